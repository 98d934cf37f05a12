//! The durable store: one SQLite file (the library is bundled: nothing to install).
//!
//! - WAL journal, `synchronous = FULL` by default (an acknowledged write survives a power
//!   cut; [`Durability::Process`] trades that for speed and still survives a process kill);
//! - a versioned schema (`PRAGMA user_version`) migrated forward in one transaction, and an
//!   `application_id` so that another application's database is refused, never altered;
//! - one connection on its own thread with group commit (see `store/sqlite/writer.rs`);
//! - every compare-and-set is one SQL statement guarded by its `WHERE`, so the busy lock and
//!   the exactly-once guard hold across processes sharing the file, not only in this one.
//!
//! - a reserve of room on the disk (`<database>-reserve`, [`SqliteOptions::disk_reserve`]):
//!   when the disk fills, the room goes to lease renewals, claims and completions, and
//!   events, outcomes and new sessions are refused ([`StoreError::DiskFull`]) until the
//!   reserve can be taken again; the write-ahead log is checkpointed every MiB, so that
//!   what it holds unmoved always fits in the reserve (see `store/sqlite/reserve.rs`).
//!
//! What a crash can lose: nothing that was acknowledged (every `async` method answers after
//! its commit). Events are appended without waiting; those not yet committed (at most
//! `commit_delay` worth) can be lost. [`SqliteStore::flush`] is a barrier.

mod batch;
mod readers;
mod reserve;
mod rows;
mod schema;
mod writer;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::{OptionalExtension, params};

use crate::config::SessionConfig;
use crate::error::StoreError;
use crate::events::SessionEvent;
use crate::model::{
    Fence, FinalizeReason, HarvesterId, NodeId, OutcomeRecord, ResourceId, SessionId,
    SessionRecord, SessionStatus,
};
use crate::store::columns::millis;
use crate::store::line::event_of_line;
use crate::store::{
    Claim, Completed, Completion, MAX_EVENT_PAGE, NewSession, NodeInfo, NodeRecord, OutcomeReceipt,
    ProcessId, SessionPage, SessionQuery, SessionStore, TakenOver, derived_outcomes,
};
use readers::Readers;
use rows::{
    INSERT_OUTCOME, NOW_MS, OutcomeCursor, OutcomeRange, RECORD_COLUMNS, backend, check_fence,
    count, load, nanos, node_of, outcome_row, read_resources, record, session_key, text, usize_of,
    write_resources,
};
use writer::{Room, Writer};

/// How hard a commit tries to reach the disk.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Durability {
    /// `synchronous = FULL`: acknowledged writes survive a power cut.
    #[default]
    PowerLoss,
    /// `synchronous = NORMAL` (WAL): acknowledged writes survive a process kill; a power
    /// cut may lose the last commits.
    Process,
}

/// Options of [`SqliteStore::open_with`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct SqliteOptions {
    /// See [`Durability`].
    pub durability: Durability,
    /// How long a batch of event appends alone waits for company before committing (at
    /// most [`SqliteOptions::MAX_COMMIT_DELAY`]).
    pub commit_delay: Duration,
    /// How long to wait for another process's lock before giving up with `Locked` (at most
    /// [`SqliteOptions::MAX_BUSY_TIMEOUT`]).
    pub busy_timeout: Duration,
    /// Room kept on the disk, in a file beside the database (`<database>-reserve`), for
    /// the writes that keep the store alive when the disk fills: when a commit fails for
    /// want of space the store lets the file go, gives the room to lease renewals, claims
    /// and completions, and writes no events or outcomes (sessions keep those in memory)
    /// until it has the room back. 0 turns the reserve off (a full disk then fails every
    /// write alike). Default [`SqliteOptions::DEFAULT_DISK_RESERVE`]; at most
    /// [`SqliteOptions::MAX_DISK_RESERVE`].
    pub disk_reserve: u64,
}

impl SqliteOptions {
    /// The longest `commit_delay`: it is the most of the audit trail a crash can lose.
    pub const MAX_COMMIT_DELAY: Duration = Duration::from_secs(1);
    /// The longest `busy_timeout`.
    pub const MAX_BUSY_TIMEOUT: Duration = Duration::from_secs(3600);
    /// The default `disk_reserve`: 8 MiB, about what the write-ahead log holds between
    /// two checkpoints.
    pub const DEFAULT_DISK_RESERVE: u64 = 8 * 1024 * 1024;
    /// The largest `disk_reserve` (1 GiB).
    pub const MAX_DISK_RESERVE: u64 = 1024 * 1024 * 1024;

    /// Checks both durations against their bounds.
    pub fn validate(&self) -> Result<(), crate::ConfigError> {
        for (field, value, max) in [
            ("commit_delay", self.commit_delay, Self::MAX_COMMIT_DELAY),
            ("busy_timeout", self.busy_timeout, Self::MAX_BUSY_TIMEOUT),
        ] {
            if value > max {
                return Err(crate::ConfigError::new(
                    field,
                    format!(
                        "must be at most {} (got {})",
                        humantime::format_duration(max),
                        humantime::format_duration(value)
                    ),
                ));
            }
        }
        if self.disk_reserve > Self::MAX_DISK_RESERVE {
            return Err(crate::ConfigError::new(
                "disk_reserve",
                format!(
                    "must be at most {} bytes (got {})",
                    Self::MAX_DISK_RESERVE,
                    self.disk_reserve
                ),
            ));
        }
        Ok(())
    }
}

crate::config::setters!(SqliteOptions {
    with_durability => durability: Durability,
    with_commit_delay => commit_delay: Duration,
    with_busy_timeout => busy_timeout: Duration,
    with_disk_reserve => disk_reserve: u64,
});

impl Default for SqliteOptions {
    fn default() -> Self {
        Self {
            durability: Durability::default(),
            commit_delay: Duration::from_millis(5),
            busy_timeout: Duration::from_secs(5),
            disk_reserve: Self::DEFAULT_DISK_RESERVE,
        }
    }
}

/// Sessions in a SQLite database file.
///
/// ```
/// use harvest_supervisor::store::{SessionStore, SqliteStore};
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let dir = std::env::temp_dir().join(format!("hs-doc-{}", std::process::id()));
/// # std::fs::create_dir_all(&dir)?;
/// let store = SqliteStore::open(dir.join("harvests.db")).await?;
/// assert!(store.list_sessions().await?.is_empty());
/// # std::fs::remove_dir_all(&dir)?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct SqliteStore {
    writer: Writer,
    /// Reads run here, never on the writer (see `sqlite/readers.rs`).
    readers: Arc<Readers>,
    path: PathBuf,
}

impl SqliteStore {
    /// Opens (or creates) the database at `path` with default options.
    pub async fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        Self::open_with(path, SqliteOptions::default()).await
    }

    /// Opens (or creates) the database at `path`. A file that is not ours, is newer than
    /// this build, is read-only or stays locked gets a typed error naming it, and is left
    /// exactly as it was.
    pub async fn open_with(
        path: impl AsRef<Path>,
        options: SqliteOptions,
    ) -> Result<Self, StoreError> {
        options.validate().map_err(StoreError::InvalidOptions)?;
        let path = path.as_ref().to_path_buf();
        let p = path.clone();
        let opts = options.clone();
        let (conn, reserve) = tokio::task::spawn_blocking(move || {
            let conn = schema::open(&p, &opts)?;
            let mut reserve = reserve::Reserve::new(&p, opts.disk_reserve);
            if let Err(e) = reserve.take() {
                // Open anyway: what is stored stays readable, and sessions can still end.
                tracing::error!(
                    path = %p.display(),
                    error = %e,
                    reserve_bytes = opts.disk_reserve,
                    "store: no room on the disk for the store's reserve: events, outcomes and \
                     new sessions are not written until there is"
                );
            }
            Ok::<_, StoreError>((conn, reserve))
        })
        .await
        .map_err(|e| StoreError::Backend(Box::new(e)))??;
        let writer = Writer::spawn(conn, options.commit_delay, reserve, options.busy_timeout)
            .map_err(|e| StoreError::Backend(Box::new(e)))?;
        let readers = Readers::new(path.clone(), options.busy_timeout);
        Ok(Self {
            writer,
            readers,
            path,
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Commits what is queued and closes the file; every clone of this store is closed.
    /// Dropping the last clone closes it too, but in the background.
    pub async fn close(&self) -> Result<(), StoreError> {
        self.readers.close();
        self.writer.close().await
    }

    /// Makes the events appended so far readable (they are committed without anyone
    /// waiting): a barrier through the writer, skipped when none is pending. A failed
    /// commit (a full disk) lost them; the read goes on with what is there.
    async fn see_appended_events(&self) {
        if self.writer.events_pending()
            && let Err(error) = self.writer.flush().await
        {
            tracing::debug!(%error, "store: events appended before a read were not committed");
        }
    }

    /// The session ids `sql` (with the node's id as `?1`) selects, on a reader.
    async fn ids_of_node(
        &self,
        node: NodeId,
        sql: &'static str,
    ) -> Result<Vec<SessionId>, StoreError> {
        self.readers
            .read(move |conn| {
                let mut s = conn.prepare_cached(sql).map_err(backend)?;
                let ids = s
                    .query_map([node.to_string()], |r| r.get::<_, String>(0))
                    .map_err(backend)?
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(backend)?;
                ids.iter()
                    .map(|i| uuid::Uuid::parse_str(i).map(SessionId))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| StoreError::Backend(Box::new(e)))
            })
            .await
    }

    /// Up to `limit` events of session `id` after `after`, in `seq` order, on a reader.
    async fn read_events(
        &self,
        id: SessionId,
        after: u64,
        limit: usize,
    ) -> Result<Vec<SessionEvent>, StoreError> {
        self.readers
            .read(move |conn| {
                let harvester_id = load(conn, id)?.harvester_id;
                let after_seq = i64::try_from(after).unwrap_or(i64::MAX);
                let mut s = conn
                    .prepare_cached(
                        "SELECT body FROM event_chunks \
                         WHERE session_key = (SELECT key FROM sessions WHERE id = ?1) \
                           AND last_seq > ?2 \
                         ORDER BY first_seq",
                    )
                    .map_err(backend)?;
                let mut rows = s
                    .query(params![id.to_string(), after_seq])
                    .map_err(backend)?;
                let mut events: Vec<SessionEvent> = Vec::new();
                'chunks: while let Some(row) = rows.next().map_err(backend)? {
                    let body = row.get_ref(0).and_then(|v| v.as_str().map_err(Into::into));
                    for line in body.map_err(backend)?.lines() {
                        let event = event_of_line(line, id, &harvester_id)?;
                        // In seq order, once each, whatever chunks overlap.
                        let last = events.last().map_or(after, |e| e.seq);
                        if event.seq > last {
                            events.push(event);
                            if events.len() >= limit {
                                break 'chunks;
                            }
                        }
                    }
                }
                Ok(events)
            })
            .await
    }
}

/// Events read per page by [`SessionStore::events`]: each page borrows a read connection
/// once, so a reader of a huge log never holds one for the whole log.
const EVENT_PAGE: usize = 4096;

/// Late outcomes written per job (see [`SessionStore::record_late_outcomes`]).
const LATE_OUTCOMES_CHUNK: usize = 1000;

/// See [`SessionStore::recent_durations`]: the harvester's sessions newest first (its
/// index, backwards), then each one's successes latest first (a backward walk of its
/// outcome range: no sort). One join of the two sorted the newest session's whole range
/// before giving a row (5 ms for 100 durations next to a 10,000-resource session).
const RECENT_SESSIONS: &str =
    "SELECT key FROM sessions WHERE harvester_id = ?1 ORDER BY id DESC LIMIT ?2";
const RECENT_SUCCESSES: &str = "SELECT elapsed_ns FROM outcomes \
     WHERE place BETWEEN ?1 AND ?2 AND outcome = 'succeeded' ORDER BY place DESC LIMIT ?3";

#[async_trait]
impl SessionStore for SqliteStore {
    async fn create_session(&self, new: NewSession) -> Result<SessionRecord, StoreError> {
        // Bulk (its resources may be many): no session starts on a full disk, whose room
        // goes to those already running.
        self.writer
            .call_with(Room::Bulk, move |conn| {
                let id = new.id.to_string();
                let taken = conn
                    .prepare_cached(
                        "INSERT OR IGNORE INTO harvester_locks (harvester_id, session_id) VALUES (?1, ?2)",
                    )
                    .and_then(|mut s| s.execute(params![new.harvester_id.as_str(), id]))
                    .map_err(backend)?;
                if taken == 0 {
                    let holder: String = conn
                        .query_row(
                            "SELECT session_id FROM harvester_locks WHERE harvester_id = ?1",
                            [new.harvester_id.as_str()],
                            |r| r.get(0),
                        )
                        .map_err(backend)?;
                    let holder = uuid::Uuid::parse_str(&holder)
                        .map_err(|e| StoreError::Backend(Box::new(e)))?;
                    return Err(StoreError::HarvesterBusy {
                        harvester_id: new.harvester_id,
                        session_id: SessionId(holder),
                    });
                }
                let config = serde_json::to_string(&*new.config)
                    .map_err(|e| StoreError::Backend(Box::new(e)))?;
                conn.prepare_cached(
                    "INSERT INTO sessions (id, harvester_id, status, total, started, workflow_time_ns, \
                     config, owner, epoch) VALUES (?1, ?2, 'pending', ?3, ?4, ?5, ?6, ?7, 1)",
                )
                .and_then(|mut s| {
                    s.execute(params![
                        id,
                        new.harvester_id.as_str(),
                        count(new.resources.len()),
                        new.started,
                        nanos(new.workflow_time),
                        config,
                        new.owner.to_string()
                    ])
                })
                .map_err(backend)?;
                write_resources(conn, conn.last_insert_rowid(), &new.resources)?;
                load(conn, new.id)
            })
            .await
    }

    async fn session(&self, id: SessionId) -> Result<SessionRecord, StoreError> {
        self.readers.read(move |conn| load(conn, id)).await
    }

    async fn sessions_by_id(&self, ids: &[SessionId]) -> Result<Vec<SessionRecord>, StoreError> {
        let ids = ids.to_vec();
        // One read transaction on one connection: an indexed look-up per id, no round trip.
        self.readers
            .read(move |conn| {
                let mut records = Vec::with_capacity(ids.len());
                for id in ids {
                    match load(conn, id) {
                        Ok(record) => records.push(record),
                        Err(StoreError::UnknownSession { .. }) => {}
                        Err(e) => return Err(e),
                    }
                }
                Ok(records)
            })
            .await
    }

    async fn list_sessions(&self) -> Result<Vec<SessionRecord>, StoreError> {
        self.readers
            .read(|conn| {
                let mut s = conn
                    .prepare_cached(&format!(
                        "SELECT {RECORD_COLUMNS} FROM sessions ORDER BY id DESC"
                    ))
                    .map_err(backend)?;
                let rows = s.query_map([], record).map_err(backend)?;
                rows.collect::<Result<Vec<_>, _>>().map_err(backend)
            })
            .await
    }

    async fn query_sessions(&self, query: &SessionQuery) -> Result<SessionPage, StoreError> {
        let limit = query.page_size();
        let harvester = query.harvester_id.as_ref().map(ToString::to_string);
        let status = query.status.as_ref().map(text).transpose()?;
        let before = query.before.map(|b| b.to_string());
        self.readers
            .read(move |conn| {
                let mut s = conn
                    .prepare_cached(&format!(
                        "SELECT {RECORD_COLUMNS} FROM sessions \
                         WHERE (?1 IS NULL OR harvester_id = ?1) AND (?2 IS NULL OR status = ?2) \
                           AND (?3 IS NULL OR id < ?3) \
                         ORDER BY id DESC LIMIT ?4"
                    ))
                    .map_err(backend)?;
                let rows = s
                    .query_map(params![harvester, status, before, count(limit + 1)], record)
                    .map_err(backend)?;
                let hits = rows.collect::<Result<Vec<_>, _>>().map_err(backend)?;
                Ok(SessionPage::from_overfetch(hits, limit))
            })
            .await
    }

    async fn record_late_outcomes(
        &self,
        id: SessionId,
        outcomes: &[OutcomeRecord],
    ) -> Result<usize, StoreError> {
        if outcomes.is_empty() {
            return Ok(0);
        }
        // Bulk: on a full disk it waits for room like any other (the session is over, its
        // counts already right; only its list of outcomes is behind). In chunks, each its
        // own job: what fits is kept, and a retry (which skips what is written) goes on
        // from there instead of needing room for all of them at once.
        let mut written = 0;
        for chunk in outcomes.chunks(LATE_OUTCOMES_CHUNK) {
            let chunk = chunk.to_vec();
            written += self
                .writer
                .call_with(Room::Bulk, move |conn| {
                    if !load(conn, id)?.status.is_terminal() {
                        return Ok(0);
                    }
                    let mut cursor = OutcomeCursor::read(conn, id)?;
                    let mut insert = conn.prepare_cached(INSERT_OUTCOME).map_err(backend)?;
                    let mut written = 0;
                    for o in &chunk {
                        written += usize::from(cursor.insert(&mut insert, o)?);
                    }
                    Ok(written)
                })
                .await?;
        }
        Ok(written)
    }

    async fn recent_durations(
        &self,
        harvester: &HarvesterId,
        limit: usize,
    ) -> Result<Vec<std::time::Duration>, StoreError> {
        let harvester = harvester.to_string();
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.readers
            .read(move |conn| {
                let keys: Vec<i64> = conn
                    .prepare_cached(RECENT_SESSIONS)
                    .and_then(|mut s| {
                        s.query_map(rusqlite::params![harvester, limit], |r| r.get(0))?
                            .collect()
                    })
                    .map_err(backend)?;
                let mut found = Vec::new();
                let mut successes = conn.prepare_cached(RECENT_SUCCESSES).map_err(backend)?;
                for key in keys {
                    let room = limit.saturating_sub(i64::try_from(found.len()).unwrap_or(i64::MAX));
                    if room <= 0 {
                        break;
                    }
                    let range = rows::OutcomeRange::of(key)?;
                    let rows = successes
                        .query_map(rusqlite::params![range.start, range.end, room], |r| {
                            r.get::<_, i64>(0)
                        })
                        .map_err(backend)?;
                    for ns in rows {
                        let ns = ns.map_err(backend)?;
                        found.push(std::time::Duration::from_nanos(
                            u64::try_from(ns).unwrap_or(0),
                        ));
                    }
                }
                Ok(found)
            })
            .await
    }

    async fn active_session(
        &self,
        harvester: &HarvesterId,
    ) -> Result<Option<SessionId>, StoreError> {
        let harvester = harvester.to_string();
        self.readers
            .read(move |conn| {
                let holder: Option<String> = conn
                    .query_row(
                        "SELECT session_id FROM harvester_locks WHERE harvester_id = ?1",
                        [harvester],
                        |r| r.get(0),
                    )
                    .optional()
                    .map_err(backend)?;
                holder
                    .map(|h| uuid::Uuid::parse_str(&h).map(SessionId))
                    .transpose()
                    .map_err(|e| StoreError::Backend(Box::new(e)))
            })
            .await
    }

    async fn resources(&self, id: SessionId) -> Result<Vec<ResourceId>, StoreError> {
        self.readers
            .read(move |conn| read_resources(conn, session_key(conn, id)?))
            .await
    }

    async fn transition(
        &self,
        id: SessionId,
        fence: Fence,
        from: SessionStatus,
        to: SessionStatus,
    ) -> Result<bool, StoreError> {
        if to.is_terminal() {
            return Ok(false);
        }
        let (from, to) = (text(&from)?, text(&to)?);
        self.writer
            .call(move |conn| {
                // Read and written in the writer's transaction: nobody writes in between.
                check_fence(&load(conn, id)?, fence)?;
                let changed = conn
                    .prepare_cached(
                        "UPDATE sessions SET status = ?3 \
                         WHERE id = ?1 AND status = ?2 AND finalizing IS NULL",
                    )
                    .and_then(|mut s| s.execute(params![id.to_string(), from, to]))
                    .map_err(backend)?;
                if changed == 0 {
                    load(conn, id)?;
                }
                Ok(changed == 1)
            })
            .await
    }

    async fn record_outcome(
        &self,
        id: SessionId,
        fence: Fence,
        outcome: OutcomeRecord,
    ) -> Result<(), StoreError> {
        self.writer.outcome(id, fence, outcome).await
    }

    fn queue_outcome(
        &self,
        id: SessionId,
        fence: Fence,
        outcome: &OutcomeRecord,
    ) -> Option<OutcomeReceipt> {
        Some(self.writer.queue_outcome(id, fence, outcome.clone()))
    }

    async fn outcomes(&self, id: SessionId) -> Result<Vec<OutcomeRecord>, StoreError> {
        self.readers
            .read(move |conn| {
                let range = OutcomeRange::read(conn, id)?;
                let mut s = conn
                    .prepare_cached(
                        "SELECT resource_id, outcome, detail, attempts, elapsed_ns FROM outcomes \
                         WHERE place BETWEEN ?1 AND ?2 ORDER BY place",
                    )
                    .map_err(backend)?;
                let rows = s
                    .query_map([range.start, range.end], outcome_row)
                    .map_err(backend)?;
                let mut all = rows.collect::<Result<Vec<_>, _>>().map_err(backend)?;
                let record = load(conn, id)?;
                if record.status.is_terminal() && all.len() < record.total {
                    let resources = read_resources(conn, session_key(conn, id)?)?;
                    let recorded: HashSet<&str> =
                        all.iter().map(|o| o.resource_id.as_str()).collect();
                    let derived: Vec<OutcomeRecord> =
                        derived_outcomes(&record, &resources, &recorded).collect();
                    all.extend(derived);
                }
                Ok(all)
            })
            .await
    }

    async fn outcomes_page(
        &self,
        id: SessionId,
        offset: usize,
        limit: usize,
    ) -> Result<(Vec<OutcomeRecord>, usize), StoreError> {
        self.readers
            .read(move |conn| {
                let range = OutcomeRange::read(conn, id)?;
                let stored: i64 = conn
                    .query_row(
                        "SELECT count(*) FROM outcomes WHERE place BETWEEN ?1 AND ?2",
                        [range.start, range.end],
                        |r| r.get(0),
                    )
                    .map_err(backend)?;
                let stored = usize_of(stored);
                let mut s = conn
                    .prepare_cached(
                        "SELECT resource_id, outcome, detail, attempts, elapsed_ns FROM outcomes \
                         WHERE place BETWEEN ?1 AND ?2 ORDER BY place LIMIT ?3 OFFSET ?4",
                    )
                    .map_err(backend)?;
                let rows = s
                    .query_map(
                        params![range.start, range.end, count(limit), count(offset)],
                        outcome_row,
                    )
                    .map_err(backend)?;
                let mut page = rows.collect::<Result<Vec<_>, _>>().map_err(backend)?;
                let record = load(conn, id)?;
                if !record.status.is_terminal() || stored >= record.total {
                    return Ok((page, stored));
                }
                // A terminal session with resources never recorded: they follow, derived.
                let total = record.total;
                if offset.saturating_add(limit) > stored && page.len() < limit {
                    let resources = read_resources(conn, session_key(conn, id)?)?;
                    let mut ids = conn
                        .prepare_cached(
                            "SELECT resource_id FROM outcomes WHERE place BETWEEN ?1 AND ?2",
                        )
                        .map_err(backend)?;
                    let ids = ids
                        .query_map([range.start, range.end], |r| r.get::<_, String>(0))
                        .map_err(backend)?
                        .collect::<Result<Vec<_>, _>>()
                        .map_err(backend)?;
                    let recorded: HashSet<&str> = ids.iter().map(String::as_str).collect();
                    let skip = offset.saturating_sub(stored);
                    let room = limit - page.len();
                    page.extend(
                        derived_outcomes(&record, &resources, &recorded)
                            .skip(skip)
                            .take(room),
                    );
                }
                Ok((page, total))
            })
            .await
    }

    fn append_event(&self, fence: Fence, event: SessionEvent) -> Result<(), StoreError> {
        self.writer.event(fence, event)
    }

    async fn events(&self, id: SessionId) -> Result<Vec<SessionEvent>, StoreError> {
        self.see_appended_events().await;
        let mut events = Vec::new();
        loop {
            let after = events.last().map_or(0, |e: &SessionEvent| e.seq);
            let page = self.read_events(id, after, EVENT_PAGE).await?;
            let more = page.len() == EVENT_PAGE;
            events.extend(page);
            if !more {
                return Ok(events);
            }
        }
    }

    async fn events_after(
        &self,
        id: SessionId,
        after: u64,
        limit: usize,
    ) -> Result<Vec<SessionEvent>, StoreError> {
        self.see_appended_events().await;
        self.read_events(id, after, limit.clamp(1, MAX_EVENT_PAGE))
            .await
    }

    async fn last_event_seq(&self, id: SessionId) -> Result<u64, StoreError> {
        self.see_appended_events().await;
        self.readers
            .read(move |conn| {
                load(conn, id)?;
                let seq: Option<i64> = conn
                    .query_row(
                        "SELECT max(last_seq) FROM event_chunks \
                         WHERE session_key = (SELECT key FROM sessions WHERE id = ?1)",
                        [id.to_string()],
                        |r| r.get(0),
                    )
                    .map_err(backend)?;
                Ok(seq.map_or(0, |s| u64::try_from(s).unwrap_or(0)))
            })
            .await
    }

    async fn claim_finalization(
        &self,
        id: SessionId,
        fence: Fence,
        reason: FinalizeReason,
    ) -> Result<Claim, StoreError> {
        let reason_text = text(&reason)?;
        self.writer
            .call(move |conn| {
                let before = load(conn, id)?;
                check_fence(&before, fence)?;
                if before.status.is_terminal() {
                    return Ok(Claim::AlreadyFinalized(before));
                }
                // The WHERE is the guard: another process may have claimed since `load`.
                let won = conn
                    .prepare_cached(
                        "UPDATE sessions SET finalizing = ?2 WHERE id = ?1 AND finalizing IS NULL \
                         AND status IN ('pending', 'on-going', 'aborting')",
                    )
                    .and_then(|mut s| s.execute(params![id.to_string(), reason_text]))
                    .map_err(backend)?;
                if won == 1 {
                    Ok(Claim::Claimed(before))
                } else {
                    let now = load(conn, id)?;
                    Ok(if now.status.is_terminal() {
                        Claim::AlreadyFinalized(now)
                    } else {
                        Claim::AlreadyClaimed(now)
                    })
                }
            })
            .await
    }

    async fn finalizer_started(&self, id: SessionId, fence: Fence) -> Result<u32, StoreError> {
        self.writer
            .call(move |conn| {
                check_fence(&load(conn, id)?, fence)?;
                let attempts: Option<u32> = conn
                    .prepare_cached(
                        "UPDATE sessions SET finalizer_attempts = finalizer_attempts + 1 \
                         WHERE id = ?1 AND finalizing IS NOT NULL \
                         AND status IN ('pending', 'on-going', 'aborting') \
                         RETURNING finalizer_attempts",
                    )
                    .and_then(|mut s| s.query_row([id.to_string()], |r| r.get(0)).optional())
                    .map_err(backend)?;
                match attempts {
                    Some(n) => Ok(n),
                    None => {
                        load(conn, id)?;
                        Err(StoreError::NotClaimed { session_id: id })
                    }
                }
            })
            .await
    }

    async fn session_config(&self, id: SessionId) -> Result<Option<SessionConfig>, StoreError> {
        self.readers
            .read(move |conn| {
                load(conn, id)?;
                let text: Option<String> = conn
                    .query_row(
                        "SELECT config FROM sessions WHERE id = ?1",
                        [id.to_string()],
                        |r| r.get(0),
                    )
                    .map_err(backend)?;
                text.map(|t| serde_json::from_str(&t))
                    .transpose()
                    .map_err(|e| StoreError::Backend(Box::new(e)))
            })
            .await
    }

    async fn resume_session(
        &self,
        id: SessionId,
        fence: Fence,
    ) -> Result<Option<Vec<ResourceId>>, StoreError> {
        self.writer
            .call(move |conn| {
                check_fence(&load(conn, id)?, fence)?;
                let reopened = conn
                    .prepare_cached(
                        "UPDATE sessions SET status = 'on-going', failed = 0, panicked = 0, \
                         timed_out = 0, cancelled = 0, lost = 0 \
                         WHERE id = ?1 AND finalizing IS NULL AND status IN ('pending', 'on-going')",
                    )
                    .and_then(|mut s| s.execute([id.to_string()]))
                    .map_err(backend)?;
                if reopened == 0 {
                    load(conn, id)?;
                    return Ok(None);
                }
                let key = session_key(conn, id)?;
                conn.prepare_cached(
                    "DELETE FROM outcomes WHERE session_key = ?1 AND outcome <> 'succeeded'",
                )
                .and_then(|mut s| s.execute([key]))
                .map_err(backend)?;
                let mut succeeded = conn
                    .prepare_cached("SELECT resource_id FROM outcomes WHERE session_key = ?1")
                    .map_err(backend)?;
                let succeeded = succeeded
                    .query_map([key], |r| r.get::<_, String>(0))
                    .map_err(backend)?
                    .collect::<Result<HashSet<_>, _>>()
                    .map_err(backend)?;
                let mut rest = read_resources(conn, key)?;
                rest.retain(|r| !succeeded.contains(r.as_str()));
                Ok(Some(rest))
            })
            .await
    }

    fn disk_full(&self) -> bool {
        self.writer.disk_full()
    }

    /// Waits until every write sent before (events included) is committed.
    async fn flush(&self) -> Result<(), StoreError> {
        self.writer.flush().await
    }

    async fn complete_finalization(
        &self,
        id: SessionId,
        fence: Fence,
        completion: Completion,
    ) -> Result<Completed, StoreError> {
        let status = text(&completion.status)?;
        let reason = text(&completion.reason)?;
        // With outcomes the store missed, it may write much: refused on a full disk (the
        // finalizer then completes without them; the report has them).
        let room = if completion.unrecorded.is_empty() {
            Room::Vital
        } else {
            Room::Bulk
        };
        let job = move |conn: &rusqlite::Connection| {
            check_fence(&load(conn, id)?, fence)?;
            let sid = id.to_string();
            let c = completion.counts;
            let done = conn
                .prepare_cached(
                    "UPDATE sessions SET status = ?2, finalizing = ?3, ended = ?4, \
                         finalizer_error = ?5, succeeded = ?6, failed = ?7, panicked = ?8, \
                         timed_out = ?9, cancelled = ?10, lost = ?11 \
                         WHERE id = ?1 AND status IN ('pending', 'on-going', 'aborting')",
                )
                .and_then(|mut s| {
                    s.execute(params![
                        sid,
                        status,
                        reason,
                        completion.ended,
                        completion.finalizer_error,
                        count(c.succeeded),
                        count(c.failed),
                        count(c.panicked),
                        count(c.timed_out),
                        count(c.cancelled),
                        count(c.lost),
                    ])
                })
                .map_err(backend)?;
            if done == 0 {
                return Ok(Completed::AlreadyFinalized(load(conn, id)?));
            }
            if !completion.unrecorded.is_empty() {
                // Best effort, in a savepoint of its own: if they do not fit (a full
                // disk), the completion goes on without them, unless SQLite rolled the
                // whole transaction back (then nothing below may run: it would commit
                // alone).
                write_unrecorded(conn, id, &completion.unrecorded)?;
            }
            // Only this session's own lock: never a newer session's.
            conn.prepare_cached("DELETE FROM harvester_locks WHERE session_id = ?1")
                .and_then(|mut s| s.execute([&sid]))
                .map_err(backend)?;
            Ok(Completed::Now(load(conn, id)?))
        };
        self.writer.call_with(room, job).await
    }

    async fn request_abort(&self, id: SessionId) -> Result<SessionRecord, StoreError> {
        self.writer
            .call(move |conn| {
                conn.prepare_cached(
                    "UPDATE sessions SET abort_requested = 1 WHERE id = ?1 \
                     AND status IN ('pending', 'on-going') AND finalizing IS NULL",
                )
                .and_then(|mut s| s.execute([id.to_string()]))
                .map_err(backend)?;
                load(conn, id)
            })
            .await
    }

    async fn open_sessions_of(&self, node: NodeId) -> Result<Vec<SessionId>, StoreError> {
        self.ids_of_node(
            node,
            "SELECT id FROM sessions WHERE owner = ?1 \
             AND status IN ('pending', 'on-going', 'aborting')",
        )
        .await
    }

    async fn requested_aborts(&self, node: NodeId) -> Result<Vec<SessionId>, StoreError> {
        self.ids_of_node(
            node,
            "SELECT id FROM sessions WHERE owner = ?1 AND abort_requested = 1 \
             AND status IN ('pending', 'on-going') AND finalizing IS NULL",
        )
        .await
    }

    async fn register_node(
        &self,
        node: &NodeInfo,
        ttl: Duration,
    ) -> Result<NodeRecord, StoreError> {
        let node = node.clone();
        let ttl_ms = millis(ttl);
        self.writer
            .call(move |conn| {
                let process = node.process.as_ref();
                conn.prepare_cached(&format!(
                    "INSERT INTO nodes (id, name, host, pid, pid_start, started, lease_until_ms) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, {NOW_MS} + ?7) \
                     ON CONFLICT (id) DO UPDATE SET lease_until_ms = excluded.lease_until_ms"
                ))
                .and_then(|mut s| {
                    s.execute(params![
                        node.id.to_string(),
                        node.name,
                        process.map(|p| p.host.as_str()),
                        process.map(|p| p.pid),
                        process.map(|p| i64::try_from(p.start).unwrap_or(i64::MAX)),
                        chrono::Utc::now(),
                        ttl_ms,
                    ])
                })
                .map_err(backend)?;
                load_node(conn, node.id)
            })
            .await
    }

    async fn renew_lease(&self, node: &NodeInfo, ttl: Duration) -> Result<NodeRecord, StoreError> {
        let info = node.clone();
        let ttl_ms = millis(ttl);
        let renewed = self
            .writer
            .call(move |conn| {
                let changed = conn
                    .prepare_cached(&format!(
                        "UPDATE nodes SET lease_until_ms = {NOW_MS} + ?2 WHERE id = ?1"
                    ))
                    .and_then(|mut s| s.execute(params![info.id.to_string(), ttl_ms]))
                    .map_err(backend)?;
                if changed == 0 {
                    return Ok(None);
                }
                load_node(conn, info.id).map(Some)
            })
            .await?;
        match renewed {
            Some(record) => Ok(record),
            None => self.register_node(node, ttl).await,
        }
    }

    async fn release_node(&self, node: NodeId) -> Result<(), StoreError> {
        self.writer
            .call(move |conn| {
                conn.prepare_cached(&format!(
                    "UPDATE nodes SET lease_until_ms = min(lease_until_ms, {NOW_MS} - 1) \
                     WHERE id = ?1"
                ))
                .and_then(|mut s| s.execute([node.to_string()]))
                .map_err(backend)?;
                Ok(())
            })
            .await
    }

    async fn expire_node(&self, node: NodeId, process: &ProcessId) -> Result<bool, StoreError> {
        let process = process.clone();
        self.writer
            .call(move |conn| {
                let changed = conn
                    .prepare_cached(&format!(
                        "UPDATE nodes SET lease_until_ms = {NOW_MS} - 1 \
                         WHERE id = ?1 AND host = ?2 AND pid = ?3 AND pid_start = ?4 \
                         AND lease_until_ms >= {NOW_MS}"
                    ))
                    .and_then(|mut s| {
                        s.execute(params![
                            node.to_string(),
                            process.host,
                            process.pid,
                            i64::try_from(process.start).unwrap_or(i64::MAX),
                        ])
                    })
                    .map_err(backend)?;
                Ok(changed == 1)
            })
            .await
    }

    async fn nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        self.readers
            .read(|conn| {
                let mut s = conn
                    .prepare_cached(&format!(
                        "SELECT {NODE_COLUMNS} FROM nodes ORDER BY id DESC"
                    ))
                    .map_err(backend)?;
                let rows = s.query_map([], node_row).map_err(backend)?;
                rows.collect::<Result<Vec<_>, _>>().map_err(backend)
            })
            .await
    }

    async fn take_over(&self, rescuer: NodeId, limit: usize) -> Result<Vec<TakenOver>, StoreError> {
        let limit = count(limit);
        self.writer
            .call(move |conn| {
                // One transaction on the writer (`BEGIN IMMEDIATE` holds the file's write
                // lock): the sessions read here cannot change before they are updated, in
                // this process or any other, so each has one winner.
                let me = rescuer.to_string();
                let live: bool = conn
                    .prepare_cached(&format!(
                        "SELECT EXISTS (SELECT 1 FROM nodes WHERE id = ?1 AND lease_until_ms >= {NOW_MS})"
                    ))
                    .and_then(|mut s| s.query_row([&me], |r| r.get(0)))
                    .map_err(backend)?;
                if !live {
                    return Err(StoreError::LeaseExpired { node: rescuer });
                }
                // Forget nodes long gone that own nothing unfinished.
                conn.prepare_cached(&format!(
                    "DELETE FROM nodes WHERE lease_until_ms < {NOW_MS} - ?1 \
                     AND id NOT IN (SELECT owner FROM sessions WHERE owner IS NOT NULL \
                                    AND status IN ('pending', 'on-going', 'aborting'))"
                ))
                .and_then(|mut s| s.execute([millis(crate::store::NODE_RETENTION)]))
                .map_err(backend)?;
                let mut s = conn
                    .prepare_cached(&format!(
                        "SELECT id, owner FROM sessions \
                         WHERE status IN ('pending', 'on-going', 'aborting') \
                           AND (owner IS NULL OR owner NOT IN \
                                (SELECT id FROM nodes WHERE lease_until_ms >= {NOW_MS})) \
                         ORDER BY id LIMIT ?1"
                    ))
                    .map_err(backend)?;
                let orphans = s
                    .query_map([limit], |r| {
                        Ok((r.get::<_, String>(0)?, node_of(r.get(1)?)?))
                    })
                    .map_err(backend)?
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(backend)?;
                let mut taken = Vec::with_capacity(orphans.len());
                for (id, from_node) in orphans {
                    conn.prepare_cached(
                        "UPDATE sessions SET owner = ?2, epoch = epoch + 1 WHERE id = ?1",
                    )
                    .and_then(|mut s| s.execute([&id, &me]))
                    .map_err(backend)?;
                    let id = uuid::Uuid::parse_str(&id)
                        .map_err(|e| StoreError::Backend(Box::new(e)))?;
                    taken.push(TakenOver {
                        record: load(conn, SessionId(id))?,
                        from_node,
                    });
                }
                Ok(taken)
            })
            .await
    }
}

/// Columns of [`node_row`].
const NODE_COLUMNS: &str = "id, name, host, pid, pid_start, started, lease_until_ms, \
     lease_until_ms >= CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)";

fn node_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<NodeRecord> {
    let id = node_of(Some(row.get(0)?))?.unwrap_or(NodeId(uuid::Uuid::nil()));
    let host: Option<String> = row.get(2)?;
    let pid: Option<u32> = row.get(3)?;
    let start: Option<i64> = row.get(4)?;
    let process = match (host, pid, start) {
        (Some(host), Some(pid), Some(start)) => Some(ProcessId {
            host,
            pid,
            start: u64::try_from(start).unwrap_or(0),
        }),
        _ => None,
    };
    let until_ms: i64 = row.get(6)?;
    Ok(NodeRecord {
        info: NodeInfo {
            id,
            name: row.get(1)?,
            process,
        },
        started: row.get(5)?,
        lease_until: chrono::DateTime::from_timestamp_millis(until_ms).unwrap_or_default(),
        live: row.get(7)?,
    })
}

fn load_node(conn: &rusqlite::Connection, node: NodeId) -> Result<NodeRecord, StoreError> {
    conn.prepare_cached(&format!("SELECT {NODE_COLUMNS} FROM nodes WHERE id = ?1"))
        .and_then(|mut s| s.query_row([node.to_string()], node_row))
        .map_err(backend)
}

/// Writes outcomes a session observed and could not record, with its completion, in a
/// savepoint: should they not fit, they are rolled back alone and the completion (O(1)
/// new space) goes on. The session's counts, written with the completion, have them
/// either way.
///
/// But SQLite answers some errors (a full disk met by a statement without a statement
/// journal, an I/O error) by rolling back the whole transaction: the batch's and this
/// job's work is gone, and a statement run after it would commit on its own (the
/// harvester's lock freed while the session stays open). That error is returned.
fn write_unrecorded(
    conn: &rusqlite::Connection,
    id: SessionId,
    unrecorded: &[OutcomeRecord],
) -> Result<(), StoreError> {
    let run = |sql: &str| {
        conn.prepare_cached(sql)
            .and_then(|mut s| s.execute([]).map(drop))
    };
    if let Err(e) = run("SAVEPOINT unrecorded") {
        tracing::warn!(error = %e, "store: could not write the unrecorded outcomes");
        return Ok(());
    }
    let written = (|| {
        let mut cursor = OutcomeCursor::read(conn, id)?;
        let mut insert = conn.prepare_cached(INSERT_OUTCOME).map_err(backend)?;
        for o in unrecorded {
            cursor.insert(&mut insert, o)?;
        }
        Ok::<(), StoreError>(())
    })();
    let end = match written {
        Ok(()) => run("RELEASE unrecorded"),
        Err(error) if conn.is_autocommit() => return Err(error),
        Err(error) => {
            tracing::warn!(
                %error,
                outcomes = unrecorded.len(),
                "store: the unrecorded outcomes do not fit; completing without them \
                 (the counts have them)"
            );
            run("ROLLBACK TO unrecorded").and_then(|()| run("RELEASE unrecorded"))
        }
    };
    if let Err(e) = end {
        tracing::warn!(error = %e, "store: savepoint failed");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unrecorded_outcomes_that_fill_the_disk_never_leave_the_completion_writing_alone() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("h.db");
        let conn = schema::open(&path, &SqliteOptions::default()).expect("open");
        let id = SessionId::new();
        conn.execute(
            "INSERT INTO sessions (id, harvester_id, status, total, started, workflow_time_ns, \
             config, owner, epoch) VALUES (?1, 'h', 'on-going', 1, ?2, 1, '{}', NULL, 1)",
            params![id.to_string(), chrono::Utc::now()],
        )
        .expect("session");
        let pages: i64 = conn
            .query_row("PRAGMA page_count", [], |r| r.get(0))
            .expect("pages");
        conn.pragma_update(None, "max_page_count", pages + 2)
            .expect("limit");
        let unrecorded: Vec<OutcomeRecord> = (0..20_000)
            .map(|i| OutcomeRecord {
                resource_id: ResourceId::parse(&format!("resource-{i:06}-{}", "x".repeat(100)))
                    .expect("id"),
                outcome: crate::model::ResourceOutcome::Succeeded,
                attempts: 1,
                elapsed: Duration::from_millis(5),
            })
            .collect();

        conn.execute_batch("BEGIN IMMEDIATE").expect("begin");
        conn.execute(
            "UPDATE sessions SET status = 'finished' WHERE id = ?1",
            [id.to_string()],
        )
        .expect("update");
        let written = write_unrecorded(&conn, id, &unrecorded);
        // They do not fit. Either SQLite undid only their savepoint (the completion goes on
        // inside its transaction) or it rolled the whole transaction back (the completion
        // must stop: whatever it ran next would commit on its own).
        match written {
            Ok(()) => assert!(!conn.is_autocommit(), "went on outside any transaction"),
            Err(e) => {
                assert!(conn.is_autocommit(), "{e}");
                assert!(writer::is_no_room(&e), "{e}");
            }
        }
    }
}
