//! Rows to values and back: the SQL text of records, outcomes, enums and durations.

use std::time::Duration;

use chrono::{DateTime, Utc};
use rusqlite::{Connection, OptionalExtension, Row, params};

use crate::error::StoreError;
use crate::model::{
    HarvesterId, OutcomeCounts, OutcomeRecord, ResourceId, ResourceOutcome, SessionId,
    SessionRecord,
};

pub(crate) fn backend(e: rusqlite::Error) -> StoreError {
    StoreError::Backend(Box::new(e))
}

/// An enum as its serde name (`"on-going"`, `"deadline-expired"`).
pub(super) fn text<T: serde::Serialize>(value: &T) -> Result<String, StoreError> {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(s)) => Ok(s),
        Ok(other) => Err(StoreError::Backend(format!("not a name: {other}").into())),
        Err(e) => Err(StoreError::Backend(Box::new(e))),
    }
}

pub(super) fn parse<T: serde::de::DeserializeOwned>(s: String) -> rusqlite::Result<T> {
    serde_json::from_value(serde_json::Value::String(s)).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
    })
}

pub(super) fn nanos(d: Duration) -> i64 {
    i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)
}

pub(super) fn duration(n: i64) -> Duration {
    Duration::from_nanos(u64::try_from(n).unwrap_or(0))
}

pub(super) fn count(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

pub(super) fn usize_of(n: i64) -> usize {
    usize::try_from(n).unwrap_or(0)
}

pub(super) const RECORD_COLUMNS: &str = "id, harvester_id, status, total, started, ended, workflow_time_ns, \
     finalizing, succeeded, failed, panicked, timed_out, cancelled, lost, finalizer_error";

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

pub(super) fn outcome_of(name: &str, detail: Option<String>) -> rusqlite::Result<ResourceOutcome> {
    let detail = detail.unwrap_or_default();
    Ok(match name {
        "succeeded" => ResourceOutcome::Succeeded,
        "failed" => ResourceOutcome::Failed { error: detail },
        "panicked" => ResourceOutcome::Panicked { message: detail },
        "timed-out" => ResourceOutcome::TimedOut,
        "cancelled" => ResourceOutcome::Cancelled,
        "lost" => ResourceOutcome::Lost,
        other => {
            return Err(rusqlite::Error::FromSqlConversionFailure(
                0,
                rusqlite::types::Type::Text,
                format!("unknown outcome {other}").into(),
            ));
        }
    })
}

/// An outcome from `SELECT resource_id, outcome, detail, attempts, elapsed_ns`.
pub(super) fn outcome_row(r: &Row<'_>) -> rusqlite::Result<OutcomeRecord> {
    let name: String = r.get(1)?;
    Ok(OutcomeRecord {
        resource_id: ResourceId::from(r.get::<_, String>(0)?),
        outcome: outcome_of(&name, r.get(2)?)?,
        attempts: r.get(3)?,
        elapsed: duration(r.get(4)?),
    })
}

pub(super) fn insert_outcome(
    conn: &Connection,
    id: &str,
    o: &OutcomeRecord,
) -> rusqlite::Result<usize> {
    let (name, detail) = outcome_columns(&o.outcome);
    conn.prepare_cached(
        "INSERT OR IGNORE INTO outcomes (session_id, resource_id, outcome, detail, attempts, elapsed_ns) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(params![id, o.resource_id.as_str(), name, detail, o.attempts, nanos(o.elapsed)])
}
