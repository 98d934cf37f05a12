//! Values as both durable stores keep them in columns: enums by their serde names,
//! durations in nanoseconds or milliseconds, counts and epochs as signed 64-bit integers
//! (saturating, never wrapping), and the fence check every write makes.

use std::time::Duration;

use crate::error::StoreError;
use crate::model::{Fence, ResourceOutcome, SessionRecord};

/// An enum as its serde name (`"on-going"`, `"deadline-expired"`).
pub(crate) fn text<T: serde::Serialize>(value: &T) -> Result<String, StoreError> {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(s)) => Ok(s),
        Ok(other) => Err(StoreError::Backend(format!("not a name: {other}").into())),
        Err(e) => Err(StoreError::Backend(Box::new(e))),
    }
}

/// A duration in nanoseconds (saturating).
pub(crate) fn nanos(d: Duration) -> i64 {
    i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)
}

/// A stored duration in nanoseconds (a negative one reads as zero).
pub(crate) fn duration(n: i64) -> Duration {
    Duration::from_nanos(u64::try_from(n).unwrap_or(0))
}

/// A count as stored (saturating).
pub(crate) fn count(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// A stored count (a negative one reads as zero).
pub(crate) fn usize_of(n: i64) -> usize {
    usize::try_from(n).unwrap_or(0)
}

/// A lease's length in whole milliseconds, as stored.
pub(crate) fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX / 2)
}

/// An epoch as stored.
pub(crate) fn epoch_value(epoch: u64) -> i64 {
    i64::try_from(epoch).unwrap_or(i64::MAX)
}

/// `Ok` if `fence` is the session's current one, else `Fenced`.
pub(crate) fn check_fence(record: &SessionRecord, fence: Fence) -> Result<(), StoreError> {
    if record.fence() == Some(fence) {
        Ok(())
    } else {
        Err(StoreError::Fenced {
            session_id: record.id,
            fence,
            holder: record.fence(),
        })
    }
}

/// The outcome stored as `name` (its [`ResourceOutcome::name`]) with `detail` (a failure's
/// error, a panic's message); `None` for a name this build does not know.
pub(crate) fn outcome_named(name: &str, detail: Option<&str>) -> Option<ResourceOutcome> {
    let detail = || detail.unwrap_or_default().to_owned();
    Some(match name {
        "succeeded" => ResourceOutcome::Succeeded,
        "failed" => ResourceOutcome::Failed { error: detail() },
        "panicked" => ResourceOutcome::Panicked { message: detail() },
        "timed-out" => ResourceOutcome::TimedOut,
        "cancelled" => ResourceOutcome::Cancelled,
        "lost" => ResourceOutcome::Lost,
        _ => return None,
    })
}
