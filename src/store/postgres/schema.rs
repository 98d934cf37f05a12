//! The store's tables in a PostgreSQL schema of their own, versioned and migrated forward.
//!
//! Checks come before any write, so a schema we must refuse is never touched: a table of
//! one of our names without our version mark (another application's) is refused, as is a
//! version newer than this build. Migrations run in one transaction under an advisory lock,
//! so processes starting together migrate once.

use deadpool_postgres::Client;

use crate::error::StoreError;
use crate::store::postgres::rows::backend;

/// The schema version this build writes. Each entry of [`MIGRATIONS`] moves one version up.
pub(super) const VERSION: i64 = 1;

/// The table that marks a schema as ours and holds its version.
pub(super) const MARK: &str = "harvest_supervisor_schema";

/// What the mark's `application` column says.
const APPLICATION: &str = "harvest-supervisor";

/// Our tables: finding one of them without our mark means it is someone else's.
const TABLES: &[&str] = &[
    MARK,
    "sessions",
    "resource_chunks",
    "outcomes",
    "event_chunks",
    "nodes",
];

/// `MIGRATIONS[n]` moves the schema from version `n` to `n + 1`; `@.` stands for the
/// schema.
const MIGRATIONS: &[&str] = &[
    // 0 -> 1: the shape the SQLite store reached at its version 6.
    // - The busy lock is a unique partial index: one unfinished session per harvester, and
    //   a terminal status frees it in the same update.
    // - Outcomes in recorded order (`ord`); one per resource.
    // - Events and resource lists in chunks (JSON lines, JSON arrays): a row per event or
    //   per resource cost a third of a durable session's time.
    // - Leases as timestamps compared with the database's `now()`: one clock for every node.
    "CREATE TABLE @.harvest_supervisor_schema (
        application text NOT NULL,
        version     bigint NOT NULL
    );
    CREATE TABLE @.sessions (
        key                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        id                 uuid NOT NULL UNIQUE,  -- UUID v7: byte order is creation order
        harvester_id       text NOT NULL,
        status             text NOT NULL,
        total              bigint NOT NULL,
        started            timestamptz NOT NULL,
        ended              timestamptz,
        workflow_time_ns   bigint NOT NULL,
        finalizing         text,                  -- the claimed reason: the exactly-once guard
        succeeded          bigint NOT NULL DEFAULT 0,
        failed             bigint NOT NULL DEFAULT 0,
        panicked           bigint NOT NULL DEFAULT 0,
        timed_out          bigint NOT NULL DEFAULT 0,
        cancelled          bigint NOT NULL DEFAULT 0,
        lost               bigint NOT NULL DEFAULT 0,
        finalizer_error    text,
        finalizer_attempts bigint NOT NULL DEFAULT 0,
        config             text,                  -- JSON
        owner              uuid,
        epoch              bigint NOT NULL DEFAULT 0,
        abort_requested    boolean NOT NULL DEFAULT false,
        outcome_seq        bigint NOT NULL DEFAULT 0  -- the last outcome's `ord`
    );
    CREATE UNIQUE INDEX sessions_busy_lock ON @.sessions (harvester_id)
        WHERE status IN ('pending', 'on-going', 'aborting');
    CREATE INDEX sessions_by_harvester ON @.sessions (harvester_id, id);
    CREATE INDEX sessions_by_status ON @.sessions (status, id);
    CREATE INDEX sessions_open_by_owner ON @.sessions (owner)
        WHERE status IN ('pending', 'on-going', 'aborting');
    -- Read by every node after each renewal: almost always empty, so it costs nothing
    -- however many sessions a node owns.
    CREATE INDEX sessions_abort_requested ON @.sessions (owner)
        WHERE abort_requested AND status IN ('pending', 'on-going');
    CREATE TABLE @.resource_chunks (
        session_key    bigint NOT NULL,
        first_position bigint NOT NULL,           -- from 0; chunks are contiguous
        ids            text NOT NULL,             -- JSON array of resource ids, in order
        PRIMARY KEY (session_key, first_position)
    );
    -- One index: a second one (on the order) cost a fifth of an insert, and outcomes are
    -- read in order only whole or by the page, sorted then. `ord` comes from the
    -- session's `outcome_seq`, advanced by each batch under the session's row lock.
    CREATE TABLE @.outcomes (
        session_key bigint NOT NULL,
        resource_id text NOT NULL,
        ord         bigint NOT NULL,
        outcome     text NOT NULL,
        detail      text,
        attempts    bigint NOT NULL,
        elapsed_ns  bigint NOT NULL,
        PRIMARY KEY (session_key, resource_id)
    );
    CREATE TABLE @.event_chunks (
        session_key bigint NOT NULL,
        first_seq   bigint NOT NULL,
        last_seq    bigint NOT NULL,
        body        text NOT NULL,                -- JSON lines
        PRIMARY KEY (session_key, first_seq)
    );
    CREATE TABLE @.nodes (
        id          uuid PRIMARY KEY,
        name        text,
        host        text,                         -- boot and PID namespace (see ProcessId)
        pid         bigint,
        pid_start   bigint,
        started     timestamptz NOT NULL,
        lease_until timestamptz NOT NULL
    );",
];

/// `sql` with `@.` replaced by the (validated, quoted) schema.
pub(super) fn qualify(sql: &str, schema: &str) -> String {
    sql.replace("@.", &format!("\"{schema}\"."))
}

/// Creates or migrates the schema, or says precisely why not. `target` names the database
/// in errors.
pub(super) async fn prepare(
    client: &mut Client,
    schema: &str,
    target: &str,
) -> Result<(), StoreError> {
    let tx = client.transaction().await.map_err(backend)?;
    // Processes that start together take turns: the first migrates, the rest find it done.
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtext('harvest-supervisor schema ' || $1))",
        &[&schema],
    )
    .await
    .map_err(backend)?;
    let found: Vec<String> = tx
        .query(
            "SELECT c.relname::text FROM pg_catalog.pg_class c \
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relkind IN ('r', 'p', 'v', 'm', 'f') \
             ORDER BY c.relname",
            &[&schema],
        )
        .await
        .map_err(backend)?
        .iter()
        .map(|r| r.try_get::<_, String>(0))
        .collect::<Result<_, _>>()
        .map_err(backend)?;
    let ours = |t: &&String| TABLES.contains(&t.as_str());
    let version = if found.iter().any(|t| t == MARK) {
        let mark = tx
            .query(
                &qualify(
                    &format!("SELECT application, version FROM @.{MARK}"),
                    schema,
                ),
                &[],
            )
            .await
            .map_err(backend)?;
        let foreign = || StoreError::ForeignSchema {
            target: target.to_owned(),
            schema: schema.to_owned(),
            table: MARK.to_owned(),
        };
        let [row] = mark.as_slice() else {
            return Err(foreign());
        };
        let application: String = row.try_get(0).map_err(backend)?;
        if application != APPLICATION {
            return Err(foreign());
        }
        row.try_get::<_, i64>(1).map_err(backend)?
    } else if let Some(table) = found.iter().find(ours) {
        return Err(StoreError::ForeignSchema {
            target: target.to_owned(),
            schema: schema.to_owned(),
            table: table.clone(),
        });
    } else {
        0
    };
    if version > VERSION {
        return Err(StoreError::DatabaseSchemaTooNew {
            target: target.to_owned(),
            schema: schema.to_owned(),
            found: version,
            supported: VERSION,
        });
    }
    if version == VERSION {
        // Nothing to write: end the read-only transaction.
        return tx.commit().await.map_err(backend);
    }
    tx.batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS \"{schema}\""))
        .await
        .map_err(backend)?;
    let start = usize::try_from(version).unwrap_or(0);
    for step in MIGRATIONS.iter().skip(start) {
        tx.batch_execute(&qualify(step, schema))
            .await
            .map_err(backend)?;
    }
    tx.execute(&qualify(&format!("DELETE FROM @.{MARK}"), schema), &[])
        .await
        .map_err(backend)?;
    tx.execute(
        &qualify(
            &format!("INSERT INTO @.{MARK} (application, version) VALUES ($1, $2)"),
            schema,
        ),
        &[&APPLICATION, &VERSION],
    )
    .await
    .map_err(backend)?;
    tx.commit().await.map_err(backend)
}

/// Whether `schema` can name the store's schema: a lower-case SQL identifier, so it
/// needs no quoting rules of its own (`[a-z_][a-z0-9_]*`, at most 63 bytes).
pub(super) fn valid_schema(schema: &str) -> bool {
    let mut chars = schema.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_');
    first_ok
        && schema.len() <= 63
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && !schema.starts_with("pg_")
}
