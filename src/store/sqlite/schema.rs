//! Opening a database file safely, and its versioned schema.
//!
//! Checks come before any write, so a file we must refuse is never touched: the file must
//! be writable, be SQLite, carry our `application_id` (or be empty), and have a schema
//! version this build knows. Then WAL is switched on and missing migrations run in one
//! transaction.

use std::path::Path;

use rusqlite::{Connection, ErrorCode, OpenFlags};

use crate::error::StoreError;
use crate::store::sqlite::{Durability, SqliteOptions};

/// The schema version this build writes. Each entry of [`MIGRATIONS`] moves one version up.
pub(super) const VERSION: i64 = 6;

/// The page size of the files this build creates (existing files keep theirs).
pub(super) const PAGE_SIZE: i64 = 8 * 1024;

/// "HRVS": marks a file as ours, so that another application's database is refused.
const APPLICATION_ID: i64 = 0x4852_5653;

/// `MIGRATIONS[n]` moves the schema from version `n` to `n + 1`.
const MIGRATIONS: &[&str] = &[
    // 0 -> 1: sessions, their resources, outcomes and events, and the busy locks.
    "CREATE TABLE sessions (
        id               TEXT PRIMARY KEY,   -- UUID v7: text order is creation order
        harvester_id     TEXT NOT NULL,
        status           TEXT NOT NULL,
        total            INTEGER NOT NULL,
        started          TEXT NOT NULL,
        ended            TEXT,
        workflow_time_ns INTEGER NOT NULL,
        finalizing       TEXT,               -- the claimed reason: the exactly-once guard
        succeeded        INTEGER NOT NULL DEFAULT 0,
        failed           INTEGER NOT NULL DEFAULT 0,
        panicked         INTEGER NOT NULL DEFAULT 0,
        timed_out        INTEGER NOT NULL DEFAULT 0,
        cancelled        INTEGER NOT NULL DEFAULT 0,
        lost             INTEGER NOT NULL DEFAULT 0,
        finalizer_error  TEXT
    );
    CREATE INDEX sessions_by_harvester ON sessions (harvester_id, id);
    CREATE INDEX sessions_by_status ON sessions (status, id);
    CREATE TABLE resources (
        session_id  TEXT NOT NULL,
        position    INTEGER NOT NULL,
        resource_id TEXT NOT NULL,
        PRIMARY KEY (session_id, position)
    ) WITHOUT ROWID;
    CREATE TABLE outcomes (
        session_id  TEXT NOT NULL,
        resource_id TEXT NOT NULL,
        outcome     TEXT NOT NULL,
        detail      TEXT,
        attempts    INTEGER NOT NULL,
        elapsed_ns  INTEGER NOT NULL,
        UNIQUE (session_id, resource_id)
    );
    CREATE TABLE events (
        session_id TEXT NOT NULL,
        seq        INTEGER NOT NULL,
        body       TEXT NOT NULL,
        PRIMARY KEY (session_id, seq)
    ) WITHOUT ROWID;
    CREATE TABLE harvester_locks (
        harvester_id TEXT PRIMARY KEY,
        session_id   TEXT NOT NULL UNIQUE
    );",
    // 1 -> 2: each session's budget (JSON), so a resumed session runs under its own.
    "ALTER TABLE sessions ADD COLUMN config TEXT;",
    // 2 -> 3: events in chunks (a batch's events of one session per row, JSON lines): a
    // row and an index entry per event cost a third of a durable session's time.
    "CREATE TABLE event_chunks (
        session_id TEXT NOT NULL,
        first_seq  INTEGER NOT NULL,
        last_seq   INTEGER NOT NULL,
        body       TEXT NOT NULL,
        PRIMARY KEY (session_id, first_seq)
    ) WITHOUT ROWID;
    INSERT INTO event_chunks (session_id, first_seq, last_seq, body)
        SELECT session_id, seq, seq, body FROM events;
    DROP TABLE events;",
    // 3 -> 4: what a durable session cost per resource, in instructions.
    // - An integer key per session in the tables with a row per outcome or chunk: every
    //   outcome insert compared the 36-character session id leading the unique index (the
    //   same in every row of a session). The key is an `INTEGER PRIMARY KEY` (never
    //   renumbered, unlike a plain rowid under VACUUM).
    // - An outcome's rowid (`place`) is `key * 2^32 + its place in the session's recorded
    //   order`: a session's outcomes are one range, read back in order without the index
    //   lookup and sort they cost, and an insert appends to the range (a `WITHOUT ROWID`
    //   table keyed by (key, order) cost a second index seek per insert).
    // - The resource list in chunks (a JSON array of up to 512 ids per row): it is written
    //   once and only ever read whole, and a row per resource was an eighth of a session.
    // Rows of sessions that no longer exist were unreadable and are not carried over.
    "CREATE TABLE sessions_v4 (
        key              INTEGER PRIMARY KEY,
        id               TEXT NOT NULL UNIQUE,   -- UUID v7: text order is creation order
        harvester_id     TEXT NOT NULL,
        status           TEXT NOT NULL,
        total            INTEGER NOT NULL,
        started          TEXT NOT NULL,
        ended            TEXT,
        workflow_time_ns INTEGER NOT NULL,
        finalizing       TEXT,                   -- the claimed reason: the exactly-once guard
        succeeded        INTEGER NOT NULL DEFAULT 0,
        failed           INTEGER NOT NULL DEFAULT 0,
        panicked         INTEGER NOT NULL DEFAULT 0,
        timed_out        INTEGER NOT NULL DEFAULT 0,
        cancelled        INTEGER NOT NULL DEFAULT 0,
        lost             INTEGER NOT NULL DEFAULT 0,
        finalizer_error  TEXT,
        config           TEXT
    );
    INSERT INTO sessions_v4 (id, harvester_id, status, total, started, ended, workflow_time_ns,
            finalizing, succeeded, failed, panicked, timed_out, cancelled, lost,
            finalizer_error, config)
        SELECT id, harvester_id, status, total, started, ended, workflow_time_ns,
            finalizing, succeeded, failed, panicked, timed_out, cancelled, lost,
            finalizer_error, config
        FROM sessions ORDER BY id;
    CREATE TABLE resource_chunks (
        session_key    INTEGER NOT NULL,
        first_position INTEGER NOT NULL,       -- from 0; chunks are contiguous
        ids            TEXT NOT NULL,          -- JSON array of resource ids, in order
        PRIMARY KEY (session_key, first_position)
    ) WITHOUT ROWID;
    INSERT INTO resource_chunks (session_key, first_position, ids)
        SELECT s.key, min(r.position), json_group_array(r.resource_id ORDER BY r.position)
        FROM resources r JOIN sessions_v4 s ON s.id = r.session_id
        GROUP BY s.key, r.position / 512;
    CREATE TABLE outcomes_v4 (
        place       INTEGER PRIMARY KEY,         -- session_key * 2^32 + recorded order
        session_key INTEGER NOT NULL,
        resource_id TEXT NOT NULL,
        outcome     TEXT NOT NULL,
        detail      TEXT,
        attempts    INTEGER NOT NULL,
        elapsed_ns  INTEGER NOT NULL
    );
    INSERT INTO outcomes_v4 (place, session_key, resource_id, outcome, detail, attempts,
            elapsed_ns)
        SELECT s.key * 4294967296 + row_number() OVER (PARTITION BY s.key ORDER BY o.rowid),
            s.key, o.resource_id, o.outcome, o.detail, o.attempts, o.elapsed_ns
        FROM outcomes o JOIN sessions_v4 s ON s.id = o.session_id;
    CREATE TABLE event_chunks_v4 (
        session_key INTEGER NOT NULL,
        first_seq   INTEGER NOT NULL,
        last_seq    INTEGER NOT NULL,
        body        TEXT NOT NULL,
        PRIMARY KEY (session_key, first_seq)
    ) WITHOUT ROWID;
    INSERT INTO event_chunks_v4 (session_key, first_seq, last_seq, body)
        SELECT s.key, c.first_seq, c.last_seq, c.body
        FROM event_chunks c JOIN sessions_v4 s ON s.id = c.session_id;
    DROP TABLE sessions;
    DROP TABLE resources;
    DROP TABLE outcomes;
    DROP TABLE event_chunks;
    ALTER TABLE sessions_v4 RENAME TO sessions;
    ALTER TABLE outcomes_v4 RENAME TO outcomes;
    ALTER TABLE event_chunks_v4 RENAME TO event_chunks;
    CREATE INDEX sessions_by_harvester ON sessions (harvester_id, id);
    CREATE INDEX sessions_by_status ON sessions (status, id);
    CREATE UNIQUE INDEX outcomes_by_resource ON outcomes (session_key, resource_id);",
    // 4 -> 5: finalization's second durable step (between the claim and the completion):
    // how many times the finalizer was started, so that recovery runs a finalizer whose
    // claimant died before it ran, and knows when it re-runs an interrupted one.
    "ALTER TABLE sessions ADD COLUMN finalizer_attempts INTEGER NOT NULL DEFAULT 0;",
    // 5 -> 6: several processes on one file. Nodes (one per supervisor start) hold leases,
    // timed in milliseconds by SQLite's clock; each session has an owner node and an epoch
    // that fence every write for it. Sessions stored before have no owner: the first
    // rescue takes them over.
    "CREATE TABLE nodes (
        id             TEXT PRIMARY KEY,
        name           TEXT,
        host           TEXT,                 -- boot and PID namespace (see ProcessId)
        pid            INTEGER,
        pid_start      INTEGER,
        started        TEXT NOT NULL,
        lease_until_ms INTEGER NOT NULL
    );
    ALTER TABLE sessions ADD COLUMN owner TEXT;
    ALTER TABLE sessions ADD COLUMN epoch INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE sessions ADD COLUMN abort_requested INTEGER NOT NULL DEFAULT 0;
    CREATE INDEX sessions_open_by_owner ON sessions (owner)
        WHERE status IN ('pending', 'on-going', 'aborting');",
];

/// Opens `path` for the store, or says precisely why not.
/// How much the write-ahead log grows before a checkpoint moves it into the database.
const WAL_CHECKPOINT_BYTES: i64 = 1024 * 1024;

pub(super) fn open(path: &Path, options: &SqliteOptions) -> Result<Connection, StoreError> {
    let refuse = |e: rusqlite::Error| classify(path, e);
    if let Ok(meta) = std::fs::metadata(path)
        && meta.permissions().readonly()
    {
        // Checked by hand: as root, SQLite would write through the permission bits.
        return Err(StoreError::ReadOnly {
            path: path.to_path_buf(),
        });
    }
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(refuse)?;
    conn.busy_timeout(options.busy_timeout).map_err(refuse)?;

    // Reading the header is where a file that is not SQLite fails.
    let app: i64 = conn
        .pragma_query_value(None, "application_id", |r| r.get(0))
        .map_err(refuse)?;
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(refuse)?;
    let tables: i64 = conn
        .query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get(0))
        .map_err(refuse)?;
    if app != APPLICATION_ID && (app != 0 || tables > 0) {
        return Err(StoreError::NotADatabase {
            path: path.to_path_buf(),
        });
    }
    if version > VERSION {
        return Err(StoreError::SchemaTooNew {
            path: path.to_path_buf(),
            found: version,
            supported: VERSION,
        });
    }

    if tables == 0 {
        // Only a file without tables takes a page size. 8 KiB rather than 4: a batch
        // appends outcomes, index entries and event chunks, and every page it dirties is
        // one write to the WAL and another at checkpoint. At 100,000 resources, 4 -> 8
        // KiB: pwrite 28k -> 17k, pread 9.7k -> 5.3k. 16 KiB halves the calls again but
        // costs more in SQLite's own work (larger pages to shift within): 40 paired runs,
        // 8 against 16 KiB, wall -7 to -12 % (median paired difference), CPU -7 to -10 %.
        conn.pragma_update(None, "page_size", PAGE_SIZE)
            .map_err(refuse)?;
    }
    conn.pragma_update(None, "journal_mode", "WAL")
        .map_err(refuse)?;
    // Checkpoint every MiB of log rather than SQLite's 1,000 pages (8 MiB here): on a disk
    // that fills, what the log holds unmoved must fit in the store's reserve for the
    // checkpoint that lets the log start over (see `reserve.rs`), and a small log is a
    // short recovery after a crash.
    let page: i64 = conn
        .pragma_query_value(None, "page_size", |r| r.get(0))
        .map_err(refuse)?;
    conn.pragma_update(
        None,
        "wal_autocheckpoint",
        (WAL_CHECKPOINT_BYTES / page.max(512)).max(16),
    )
    .map_err(refuse)?;
    let sync = match options.durability {
        Durability::PowerLoss => "FULL",
        Durability::Process => "NORMAL",
    };
    conn.pragma_update(None, "synchronous", sync)
        .map_err(refuse)?;

    // Take the write lock once now: a database another process keeps locked is refused at
    // open, not at the first outcome of a session.
    conn.execute_batch("BEGIN IMMEDIATE").map_err(refuse)?;
    let migrated = migrate(&conn, version);
    let end = if migrated.is_ok() {
        "COMMIT"
    } else {
        "ROLLBACK"
    };
    conn.execute_batch(end).map_err(refuse)?;
    migrated.map_err(refuse)?;
    // Statement journals in memory. Each job of a batch runs in a savepoint, whose
    // journal keeps the old content of every page the job changes; past 64 KiB (eight
    // pages) SQLite spilled it to a temporary file: under a burst of 500 small sessions,
    // 9,900 writes (55 MiB) to unlinked temporary files beside 14,000 to the log. In
    // memory, a job's journal is at most the pages it changes that existed before it
    // began (tens of KiB for a claim or a completion; for a resume of a session of a
    // million resources, the pages of its failed outcomes, a few tens of MiB). Set after
    // the migrations, whose sorts may need more room than memory should give them.
    conn.pragma_update(None, "temp_store", "MEMORY")
        .map_err(refuse)?;
    Ok(conn)
}

fn migrate(conn: &Connection, from: i64) -> rusqlite::Result<()> {
    let start = usize::try_from(from).unwrap_or(0);
    for step in MIGRATIONS.iter().skip(start) {
        conn.execute_batch(step)?;
    }
    if from < VERSION {
        conn.pragma_update(None, "application_id", APPLICATION_ID)?;
        conn.pragma_update(None, "user_version", VERSION)?;
    }
    Ok(())
}

fn classify(path: &Path, e: rusqlite::Error) -> StoreError {
    let path = path.to_path_buf();
    match e.sqlite_error_code() {
        Some(ErrorCode::NotADatabase) => StoreError::NotADatabase { path },
        Some(ErrorCode::ReadOnly) => StoreError::ReadOnly { path },
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => StoreError::Locked { path },
        _ => StoreError::File {
            path,
            source: Box::new(e),
        },
    }
}
