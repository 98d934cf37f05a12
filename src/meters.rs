//! Metrics, through the [`metrics`] facade: the application installs the exporter it likes
//! (Prometheus, StatsD, OpenTelemetry...), and with none installed they cost next to
//! nothing (the handles are no-ops).
//!
//! Labels are bounded: a harvester's id, a status, a reason, an outcome, an action, never
//! a session's or a resource's id.
//!
//! | name | kind | labels | what |
//! |---|---|---|---|
//! | `harvest_sessions_started_total` | counter | `harvester` | sessions started (created, or taken over and resumed) |
//! | `harvest_sessions_finished_total` | counter | `harvester`, `status`, `reason` | sessions made terminal by this process |
//! | `harvest_resources_total` | counter | `harvester`, `outcome` | resources of finished sessions, by final outcome (derived ones included: `lost`, `cancelled`, `timed-out`) |
//! | `harvest_attempts_total` | counter | `harvester` | attempts started |
//! | `harvest_retries_total` | counter | `harvester` | attempts scheduled again after a failure, panic or timeout |
//! | `harvest_watchdog_actions_total` | counter | `action`: `deadline`, `escalation`, `heartbeat_silence` | a deadline expired, a monitor escalated a stuck session, an attempt was cut for a silent heartbeat |
//! | `harvest_recoveries_total` | counter | `kind`: `recovered`, `taken_over` | `recovered`: sessions this process finished or resumed after a crash; `taken_over`: those of them it took from another node (counted in both) |
//! | `harvest_store_failures_total` | counter | | store operations that failed and are retried |
//! | `harvest_session_duration_seconds` | histogram | `harvester`, `status` | creation to completion |
//! | `harvest_resource_duration_seconds` | histogram | `outcome` | one attempt, start to end |
//! | `harvest_finalizer_duration_seconds` | histogram | | the user finalizer's run |
//! | `harvest_slot_wait_seconds` | histogram | | how long a resource waited for a concurrency slot before its first attempt |
//! | `harvest_start_wait_seconds` | histogram | | how long a session start waited for its turn (`max_concurrent_starts`) before its creation |
//! | `harvest_active_sessions` | gauge | | sessions running in this process (within a monitor tick; exactly 0 when idle) |
//! | `harvest_active_workers` | gauge | | attempts running in this process (within a monitor tick; exactly 0 when idle) |
//!
//! Names and labels are stable; see [`names`].

use std::time::Duration;

use metrics::{Counter, Gauge, Histogram};

use crate::model::{FinalizeReason, HarvesterId, ResourceOutcome, SessionStatus};

/// The metric names (see the table in this module's docs).
pub mod names {
    /// Counter: sessions started, by `harvester`.
    pub const SESSIONS_STARTED: &str = "harvest_sessions_started_total";
    /// Counter: sessions finished, by `harvester`, `status`, `reason`.
    pub const SESSIONS_FINISHED: &str = "harvest_sessions_finished_total";
    /// Counter: resources of finished sessions, by `harvester` and `outcome`.
    pub const RESOURCES: &str = "harvest_resources_total";
    /// Counter: attempts started, by `harvester`.
    pub const ATTEMPTS: &str = "harvest_attempts_total";
    /// Counter: retries scheduled, by `harvester`.
    pub const RETRIES: &str = "harvest_retries_total";
    /// Counter: watchdog actions, by `action`.
    pub const WATCHDOG_ACTIONS: &str = "harvest_watchdog_actions_total";
    /// Counter: recoveries and takeovers, by `kind`.
    pub const RECOVERIES: &str = "harvest_recoveries_total";
    /// Counter: failed store operations (retried).
    pub const STORE_FAILURES: &str = "harvest_store_failures_total";
    /// Histogram (seconds): session duration, by `harvester` and `status`.
    pub const SESSION_DURATION: &str = "harvest_session_duration_seconds";
    /// Histogram (seconds): attempt duration, by `outcome`.
    pub const RESOURCE_DURATION: &str = "harvest_resource_duration_seconds";
    /// Histogram (seconds): the user finalizer's run.
    pub const FINALIZER_DURATION: &str = "harvest_finalizer_duration_seconds";
    /// Histogram (seconds): wait for a concurrency slot before a first attempt.
    pub const SLOT_WAIT: &str = "harvest_slot_wait_seconds";
    /// Histogram (seconds): a start's wait for its turn (`max_concurrent_starts`).
    pub const START_WAIT: &str = "harvest_start_wait_seconds";
    /// Gauge: sessions running in this process.
    pub const ACTIVE_SESSIONS: &str = "harvest_active_sessions";
    /// Gauge: attempts running in this process.
    pub const ACTIVE_WORKERS: &str = "harvest_active_workers";
}

/// The outcomes, in [`ResourceOutcome::name`] order of [`outcome_index`].
const OUTCOMES: [&str; 6] = [
    "succeeded",
    "failed",
    "panicked",
    "timed-out",
    "cancelled",
    "lost",
];

fn outcome_index(o: &ResourceOutcome) -> usize {
    match o {
        ResourceOutcome::Succeeded => 0,
        ResourceOutcome::Failed { .. } => 1,
        ResourceOutcome::Panicked { .. } => 2,
        ResourceOutcome::TimedOut => 3,
        ResourceOutcome::Cancelled => 4,
        ResourceOutcome::Lost => 5,
    }
}

/// One session's handles, made once when it starts: a resource's metrics then cost an
/// atomic add each (nothing without a recorder), not a key built and looked up per event.
pub(crate) struct SessionMeters {
    attempts: Counter,
    retries: Counter,
    /// By [`outcome_index`].
    attempt_duration: [Histogram; 6],
    slot_wait: Histogram,
}

impl SessionMeters {
    pub(crate) fn new(harvester: &HarvesterId) -> Self {
        let h = harvester.to_string();
        Self {
            attempts: metrics::counter!(names::ATTEMPTS, "harvester" => h.clone()),
            retries: metrics::counter!(names::RETRIES, "harvester" => h),
            attempt_duration: OUTCOMES
                .map(|o| metrics::histogram!(names::RESOURCE_DURATION, "outcome" => o)),
            slot_wait: metrics::histogram!(names::SLOT_WAIT),
        }
    }

    /// An attempt starts; a first attempt after waiting `waited` for its slot.
    pub(crate) fn attempt_started(&self, waited: Option<Duration>) {
        self.attempts.increment(1);
        if let Some(waited) = waited {
            self.slot_wait.record(waited.as_secs_f64());
        }
    }

    /// An attempt ended with `outcome` after `took`.
    pub(crate) fn attempt_ended(&self, outcome: &ResourceOutcome, took: Duration) {
        if let Some(h) = self.attempt_duration.get(outcome_index(outcome)) {
            h.record(took.as_secs_f64());
        }
    }

    /// An attempt will run again.
    pub(crate) fn retried(&self) {
        self.retries.increment(1);
    }
}

/// A session starts running in this process.
pub(crate) fn session_started(harvester: &HarvesterId) {
    metrics::counter!(names::SESSIONS_STARTED, "harvester" => harvester.to_string()).increment(1);
}

/// A session this process finalized is terminal.
pub(crate) fn session_finished(
    harvester: &HarvesterId,
    status: SessionStatus,
    reason: FinalizeReason,
    counts: &crate::model::OutcomeCounts,
    took: Duration,
) {
    let h = harvester.to_string();
    metrics::counter!(
        names::SESSIONS_FINISHED,
        "harvester" => h.clone(),
        "status" => status.to_string(),
        "reason" => reason.as_str(),
    )
    .increment(1);
    for (outcome, n) in [
        ("succeeded", counts.succeeded),
        ("failed", counts.failed),
        ("panicked", counts.panicked),
        ("timed-out", counts.timed_out),
        ("cancelled", counts.cancelled),
        ("lost", counts.lost),
    ] {
        if n > 0 {
            metrics::counter!(names::RESOURCES, "harvester" => h.clone(), "outcome" => outcome)
                .increment(u64::try_from(n).unwrap_or(u64::MAX));
        }
    }
    metrics::histogram!(
        names::SESSION_DURATION,
        "harvester" => h,
        "status" => status.to_string(),
    )
    .record(took.as_secs_f64());
}

/// A start waited `took` for its turn.
pub(crate) fn start_waited(took: Duration) {
    metrics::histogram!(names::START_WAIT).record(took.as_secs_f64());
}

/// The user finalizer ran for `took`.
pub(crate) fn finalizer_ran(took: Duration) {
    metrics::histogram!(names::FINALIZER_DURATION).record(took.as_secs_f64());
}

/// A watchdog acted: `deadline`, `escalation` or `heartbeat_silence`.
pub(crate) fn watchdog(action: &'static str) {
    metrics::counter!(names::WATCHDOG_ACTIONS, "action" => action).increment(1);
}

/// A session was finished or resumed after a crash (`taken_over`: from another node).
pub(crate) fn recovered(taken_over: bool) {
    let kind = if taken_over {
        "taken_over"
    } else {
        "recovered"
    };
    metrics::counter!(names::RECOVERIES, "kind" => kind).increment(1);
}

/// A store operation failed (it is retried).
pub(crate) fn store_failed() {
    metrics::counter!(names::STORE_FAILURES).increment(1);
}

/// One supervisor's running sessions and attempts, counted in plain atomics and handed to
/// the gauges in deltas: at every 64th change, on every tick of the monitors' clock, and
/// whenever a count reaches zero (so an idle process reads exactly 0). A gauge update per
/// attempt start and end cost more than the rest of the metrics together (5.9 % of a
/// 10,000-resource session with the Prometheus recorder).
pub(crate) struct Gauges {
    counts: [std::sync::atomic::AtomicI64; 2],
    published: [std::sync::atomic::AtomicI64; 2],
    changes: std::sync::atomic::AtomicU64,
    gauges: [Gauge; 2],
}

/// Which count of [`Gauges`].
#[derive(Clone, Copy)]
pub(crate) enum Kind {
    Sessions = 0,
    Workers = 1,
}

impl Gauges {
    pub(crate) fn new() -> Self {
        Self {
            counts: Default::default(),
            published: Default::default(),
            changes: std::sync::atomic::AtomicU64::new(0),
            gauges: [
                metrics::gauge!(names::ACTIVE_SESSIONS),
                metrics::gauge!(names::ACTIVE_WORKERS),
            ],
        }
    }

    fn change(&self, kind: Kind, delta: i64) {
        use std::sync::atomic::Ordering::AcqRel;
        let now = self.counts[kind as usize]
            .fetch_add(delta, AcqRel)
            .saturating_add(delta);
        if now == 0 || self.changes.fetch_add(1, AcqRel).is_multiple_of(64) {
            self.publish();
        }
    }

    /// Hands the gauges what changed since the last time (exactly once each, whoever
    /// publishes concurrently).
    pub(crate) fn publish(&self) {
        use std::sync::atomic::Ordering::AcqRel;
        for ((count, published), gauge) in self.counts.iter().zip(&self.published).zip(&self.gauges)
        {
            let now = count.load(std::sync::atomic::Ordering::Acquire);
            let before = published.swap(now, AcqRel);
            let delta = now.saturating_sub(before);
            if delta != 0 {
                #[allow(clippy::cast_precision_loss)]
                gauge.increment(delta as f64);
            }
        }
    }

    /// Counts one `kind` for as long as the guard lives.
    pub(crate) fn running(self: &std::sync::Arc<Self>, kind: Kind) -> Running {
        self.change(kind, 1);
        Running {
            gauges: std::sync::Arc::clone(self),
            kind,
        }
    }
}

/// One running session or attempt, counted while it lives.
pub(crate) struct Running {
    gauges: std::sync::Arc<Gauges>,
    kind: Kind,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.gauges.change(self.kind, -1);
    }
}
