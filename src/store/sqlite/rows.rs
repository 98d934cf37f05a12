//! Rows to values and back: the SQL text of records, outcomes, enums and durations.

use chrono::{DateTime, Utc};
use rusqlite::{Connection, OptionalExtension, Row, Statement, params};

use crate::error::StoreError;
use crate::model::{
    Fence, HarvesterId, NodeId, OutcomeCounts, OutcomeRecord, ResourceId, ResourceOutcome,
    SessionId, SessionRecord,
};
pub(crate) use crate::store::columns::{
    check_fence, count, duration, epoch_value, nanos, text, usize_of,
};

pub(crate) fn backend(e: rusqlite::Error) -> StoreError {
    StoreError::Backend(Box::new(e))
}

pub(super) fn parse<T: serde::de::DeserializeOwned>(s: String) -> rusqlite::Result<T> {
    serde_json::from_value(serde_json::Value::String(s)).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
    })
}

pub(super) const RECORD_COLUMNS: &str = "id, harvester_id, status, total, started, ended, workflow_time_ns, \
     finalizing, succeeded, failed, panicked, timed_out, cancelled, lost, finalizer_error, \
     finalizer_attempts, owner, epoch, abort_requested";

/// The store's clock, in milliseconds since the Unix epoch: every lease is written and
/// compared by it, in the statement that needs it (one host, one clock: never two
/// processes' readings compared).
pub(super) const NOW_MS: &str = "CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)";

/// A node id column.
pub(super) fn node_of(text: Option<String>) -> rusqlite::Result<Option<NodeId>> {
    text.map(|t| {
        uuid::Uuid::parse_str(&t).map(NodeId).map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
        })
    })
    .transpose()
}

pub(super) fn record(row: &Row<'_>) -> rusqlite::Result<SessionRecord> {
    let id: String = row.get(0)?;
    let id = uuid::Uuid::parse_str(&id).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
    })?;
    let finalizing: Option<String> = row.get(7)?;
    Ok(SessionRecord {
        id: SessionId(id),
        harvester_id: HarvesterId::from(row.get::<_, String>(1)?),
        status: parse(row.get(2)?)?,
        total: usize_of(row.get(3)?),
        started: row.get::<_, DateTime<Utc>>(4)?,
        ended: row.get::<_, Option<DateTime<Utc>>>(5)?,
        workflow_time: duration(row.get(6)?),
        finalizing: finalizing.map(parse).transpose()?,
        counts: OutcomeCounts {
            succeeded: usize_of(row.get(8)?),
            failed: usize_of(row.get(9)?),
            panicked: usize_of(row.get(10)?),
            timed_out: usize_of(row.get(11)?),
            cancelled: usize_of(row.get(12)?),
            lost: usize_of(row.get(13)?),
        },
        finalizer_error: row.get(14)?,
        finalizer_attempts: row.get(15)?,
        owner: node_of(row.get(16)?)?,
        epoch: u64::try_from(row.get::<_, i64>(17)?).unwrap_or(0),
        abort_requested: row.get(18)?,
    })
}

pub(super) fn load(conn: &Connection, id: SessionId) -> Result<SessionRecord, StoreError> {
    conn.prepare_cached(&format!(
        "SELECT {RECORD_COLUMNS} FROM sessions WHERE id = ?1"
    ))
    .and_then(|mut s| s.query_row([id.to_string()], record).optional())
    .map_err(backend)?
    .ok_or(StoreError::UnknownSession { session_id: id })
}

/// An outcome as (name, detail) columns.
pub(super) fn outcome_columns(o: &ResourceOutcome) -> (&'static str, Option<&str>) {
    match o {
        ResourceOutcome::Failed { error } => (o.name(), Some(error)),
        ResourceOutcome::Panicked { message } => (o.name(), Some(message)),
        _ => (o.name(), None),
    }
}

pub(super) fn outcome_of(name: &str, detail: Option<&str>) -> rusqlite::Result<ResourceOutcome> {
    crate::store::columns::outcome_named(name, detail).ok_or_else(|| {
        rusqlite::Error::FromSqlConversionFailure(
            0,
            rusqlite::types::Type::Text,
            format!("unknown outcome {name}").into(),
        )
    })
}

/// An outcome from `SELECT resource_id, outcome, detail, attempts, elapsed_ns`.
///
/// The text columns are borrowed from the row, not copied into `String`s first: reading a
/// session's outcomes back is in the timed path to its finalizer.
pub(super) fn outcome_row(r: &Row<'_>) -> rusqlite::Result<OutcomeRecord> {
    Ok(OutcomeRecord {
        resource_id: ResourceId::from(r.get_ref(0)?.as_str()?),
        outcome: outcome_of(r.get_ref(1)?.as_str()?, r.get_ref(2)?.as_str_or_null()?)?,
        attempts: r.get(3)?,
        elapsed: duration(r.get(4)?),
    })
}

/// The key of session `id` in the tables with a row per outcome or chunk.
pub(super) fn session_key(conn: &Connection, id: SessionId) -> Result<i64, StoreError> {
    conn.prepare_cached("SELECT key FROM sessions WHERE id = ?1")
        .and_then(|mut s| s.query_row([id.to_string()], |r| r.get(0)).optional())
        .map_err(backend)?
        .ok_or(StoreError::UnknownSession { session_id: id })
}

/// Outcomes of one session in the `outcomes` table: their rowids (`place`) are
/// `key * 2^32 + n` for the n-th outcome recorded, from 1.
#[derive(Debug, Clone, Copy)]
pub(super) struct OutcomeRange {
    /// The first place (`key * 2^32`, never used itself).
    pub(super) start: i64,
    /// The last place a session may use.
    pub(super) end: i64,
}

impl OutcomeRange {
    pub(super) fn of(key: i64) -> Result<Self, StoreError> {
        let start = key.checked_mul(1 << 32).ok_or_else(|| {
            StoreError::Backend(format!("session key {key} is out of range").into())
        })?;
        Ok(Self {
            start,
            end: start | 0xFFFF_FFFF,
        })
    }

    /// The range of session `id`.
    pub(super) fn read(conn: &Connection, id: SessionId) -> Result<Self, StoreError> {
        Self::of(session_key(conn, id)?)
    }
}

/// Records one outcome at a place; see [`OutcomeCursor::insert`].
pub(super) const INSERT_OUTCOME: &str = "INSERT INTO outcomes \
     (place, session_key, resource_id, outcome, detail, attempts, elapsed_ns) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) \
     ON CONFLICT (session_key, resource_id) DO NOTHING";

/// Where a session's next outcome goes: its key, whether it is claimed for finalization,
/// and the next place in its recorded order.
pub(super) struct OutcomeCursor {
    pub(super) key: i64,
    pub(super) finalizing: bool,
    /// The session's owner and epoch, as read.
    pub(super) fence: Option<Fence>,
    next: i64,
    end: i64,
}

impl OutcomeCursor {
    /// Reads it for session `id` (inside the writer's transaction, so nobody else appends
    /// in between).
    pub(super) fn read(conn: &Connection, id: SessionId) -> Result<Self, StoreError> {
        type Row = (i64, bool, Option<i64>, Option<NodeId>, i64);
        let (key, finalizing, last, owner, epoch): Row = conn
            .prepare_cached(
                "SELECT key, finalizing IS NOT NULL, \
                 (SELECT max(place) FROM outcomes \
                  WHERE place BETWEEN key * 4294967296 AND key * 4294967296 + 4294967295), \
                 owner, epoch \
                 FROM sessions WHERE id = ?1",
            )
            .and_then(|mut s| {
                s.query_row([id.to_string()], |r| {
                    Ok((
                        r.get(0)?,
                        r.get(1)?,
                        r.get(2)?,
                        node_of(r.get(3)?)?,
                        r.get(4)?,
                    ))
                })
                .optional()
            })
            .map_err(backend)?
            .ok_or(StoreError::UnknownSession { session_id: id })?;
        let range = OutcomeRange::of(key)?;
        Ok(Self {
            key,
            finalizing,
            fence: owner.map(|node| Fence {
                node,
                epoch: u64::try_from(epoch).unwrap_or(0),
            }),
            next: last.unwrap_or(range.start) + 1,
            end: range.end,
        })
    }

    /// Records `o` unless its resource already has an outcome; whether it did. `insert` is
    /// [`INSERT_OUTCOME`] prepared (once for many outcomes: looking a statement up in the
    /// cache was a tenth of an insert).
    ///
    /// Only a second outcome of a resource is ignored: a clash on the place (a stale
    /// cursor) is an error, never a silently dropped outcome.
    pub(super) fn insert(
        &mut self,
        insert: &mut Statement<'_>,
        o: &OutcomeRecord,
    ) -> Result<bool, StoreError> {
        if self.next > self.end {
            return Err(StoreError::Backend(
                "a session cannot record more than 2^32 - 1 outcomes".into(),
            ));
        }
        let (name, detail) = outcome_columns(&o.outcome);
        let inserted = insert
            .execute(params![
                self.next,
                self.key,
                o.resource_id.as_str(),
                name,
                detail,
                o.attempts,
                nanos(o.elapsed)
            ])
            .map_err(backend)?;
        if inserted == 1 {
            self.next += 1;
        }
        Ok(inserted == 1)
    }
}

/// Most resource ids in one `resource_chunks` row.
const RESOURCE_CHUNK: usize = 512;

/// Writes session `key`'s resource list, in chunks.
pub(super) fn write_resources(
    conn: &Connection,
    key: i64,
    resources: &[ResourceId],
) -> Result<(), StoreError> {
    let mut insert = conn
        .prepare_cached(
            "INSERT INTO resource_chunks (session_key, first_position, ids) VALUES (?1, ?2, ?3)",
        )
        .map_err(backend)?;
    for (n, chunk) in resources.chunks(RESOURCE_CHUNK).enumerate() {
        let ids = serde_json::to_string(chunk).map_err(|e| StoreError::Backend(Box::new(e)))?;
        insert
            .execute(params![key, count(n * RESOURCE_CHUNK), ids])
            .map_err(backend)?;
    }
    Ok(())
}

/// Session `key`'s resource list, in order. A gap between chunks (a damaged file) is an
/// error, never a shorter list.
pub(super) fn read_resources(conn: &Connection, key: i64) -> Result<Vec<ResourceId>, StoreError> {
    let mut s = conn
        .prepare_cached(
            "SELECT first_position, ids FROM resource_chunks WHERE session_key = ?1 \
             ORDER BY first_position",
        )
        .map_err(backend)?;
    let mut rows = s.query([key]).map_err(backend)?;
    let mut resources = Vec::new();
    while let Some(row) = rows.next().map_err(backend)? {
        let first: i64 = row.get(0).map_err(backend)?;
        if first != count(resources.len()) {
            return Err(StoreError::Backend(
                format!(
                    "the resource list of session key {key} is damaged: \
                     a chunk starts at {first}, expected {}",
                    resources.len()
                )
                .into(),
            ));
        }
        let ids = row.get_ref(1).and_then(|v| v.as_str().map_err(Into::into));
        let ids = ids.map_err(backend)?;
        let chunk: Vec<ResourceId> =
            serde_json::from_str(ids).map_err(|e| StoreError::Backend(Box::new(e)))?;
        resources.extend(chunk);
    }
    Ok(resources)
}
