//! Rows to values and back, and the driver's errors to [`StoreError`]s.

use std::borrow::Cow;

use tokio_postgres::Row;

use crate::error::StoreError;
use crate::model::{
    HarvesterId, NodeId, OutcomeCounts, OutcomeRecord, ResourceId, ResourceOutcome, SessionId,
    SessionRecord,
};
pub(crate) use crate::store::columns::{
    check_fence, count, duration, epoch_value, millis, nanos, text, usize_of,
};
use crate::store::{NodeInfo, NodeRecord, ProcessId};

/// A driver error as a store error: a lost or refused connection, a failed statement.
/// Both are [`StoreError::Backend`] (transient: writers retry them with backoff).
pub(crate) fn backend(e: tokio_postgres::Error) -> StoreError {
    StoreError::Backend(Box::new(e))
}

/// A pool error (no connection could be had) as a store error.
pub(crate) fn pool(e: deadpool_postgres::PoolError) -> StoreError {
    match e {
        deadpool_postgres::PoolError::Closed => StoreError::Closed,
        other => StoreError::Backend(Box::new(other)),
    }
}

fn parse<T: serde::de::DeserializeOwned>(s: &str) -> Result<T, StoreError> {
    serde_json::from_value(serde_json::Value::String(s.to_owned()))
        .map_err(|e| StoreError::Backend(Box::new(e)))
}

/// Reads column `i`, a typed error (never a panic) if it does not convert.
pub(crate) fn get<'a, T: tokio_postgres::types::FromSql<'a>>(
    row: &'a Row,
    i: usize,
) -> Result<T, StoreError> {
    row.try_get(i).map_err(backend)
}

/// The columns [`record`] reads, in its order.
pub(crate) const RECORD_COLUMNS: &str = "id, harvester_id, status, total, started, ended, \
     workflow_time_ns, finalizing, succeeded, failed, panicked, timed_out, cancelled, lost, \
     finalizer_error, finalizer_attempts, owner, epoch, abort_requested";

/// A session's record from a row of [`RECORD_COLUMNS`].
pub(crate) fn record(row: &Row) -> Result<SessionRecord, StoreError> {
    let finalizing: Option<&str> = get(row, 7)?;
    Ok(SessionRecord {
        id: SessionId(get(row, 0)?),
        harvester_id: HarvesterId::from(get::<&str>(row, 1)?),
        status: parse(get(row, 2)?)?,
        total: usize_of(get(row, 3)?),
        started: get(row, 4)?,
        ended: get(row, 5)?,
        workflow_time: duration(get(row, 6)?),
        finalizing: finalizing.map(parse).transpose()?,
        counts: OutcomeCounts {
            succeeded: usize_of(get(row, 8)?),
            failed: usize_of(get(row, 9)?),
            panicked: usize_of(get(row, 10)?),
            timed_out: usize_of(get(row, 11)?),
            cancelled: usize_of(get(row, 12)?),
            lost: usize_of(get(row, 13)?),
        },
        finalizer_error: get(row, 14)?,
        finalizer_attempts: u32::try_from(get::<i64>(row, 15)?).unwrap_or(u32::MAX),
        owner: get::<Option<uuid::Uuid>>(row, 16)?.map(NodeId),
        epoch: u64::try_from(get::<i64>(row, 17)?).unwrap_or(0),
        abort_requested: get(row, 18)?,
    })
}

/// An outcome as (name, detail) columns.
pub(crate) fn outcome_columns(o: &ResourceOutcome) -> (&'static str, Option<Cow<'_, str>>) {
    match o {
        ResourceOutcome::Failed { error } => (o.name(), Some(storable(error))),
        ResourceOutcome::Panicked { message } => (o.name(), Some(storable(message))),
        _ => (o.name(), None),
    }
}

/// `text` as PostgreSQL can store it: its text type has no NUL character, and one NUL in
/// a harvester's error message would otherwise fail every batch it is in. Each NUL becomes
/// U+FFFD (the replacement character); any other text is kept as it is.
pub(crate) fn storable(text: &str) -> Cow<'_, str> {
    if text.contains('\0') {
        Cow::Owned(text.replace('\0', "\u{FFFD}"))
    } else {
        Cow::Borrowed(text)
    }
}

fn outcome_of(name: &str, detail: Option<&str>) -> Result<ResourceOutcome, StoreError> {
    crate::store::columns::outcome_named(name, detail)
        .ok_or_else(|| StoreError::Backend(format!("unknown outcome {name:?}").into()))
}

/// The columns [`outcome_row`] reads.
pub(crate) const OUTCOME_COLUMNS: &str = "resource_id, outcome, detail, attempts, elapsed_ns";

/// An outcome from a row of [`OUTCOME_COLUMNS`].
pub(crate) fn outcome_row(row: &Row) -> Result<OutcomeRecord, StoreError> {
    Ok(OutcomeRecord {
        resource_id: ResourceId::from(get::<&str>(row, 0)?),
        outcome: outcome_of(get(row, 1)?, get(row, 2)?)?,
        attempts: u32::try_from(get::<i64>(row, 3)?).unwrap_or(u32::MAX),
        elapsed: duration(get(row, 4)?),
    })
}

/// The columns [`node_row`] reads.
pub(crate) const NODE_COLUMNS: &str =
    "id, name, host, pid, pid_start, started, lease_until, lease_until >= now()";

/// A node from a row of [`NODE_COLUMNS`].
pub(crate) fn node_row(row: &Row) -> Result<NodeRecord, StoreError> {
    let host: Option<String> = get(row, 2)?;
    let pid: Option<i64> = get(row, 3)?;
    let start: Option<i64> = get(row, 4)?;
    let process = match (host, pid, start) {
        (Some(host), Some(pid), Some(start)) => Some(ProcessId {
            host,
            pid: u32::try_from(pid).unwrap_or(0),
            start: u64::try_from(start).unwrap_or(0),
        }),
        _ => None,
    };
    Ok(NodeRecord {
        info: NodeInfo {
            id: NodeId(get(row, 0)?),
            name: get(row, 1)?,
            process,
        },
        started: get(row, 5)?,
        lease_until: get(row, 6)?,
        live: get(row, 7)?,
    })
}
