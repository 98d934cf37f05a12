//! The vocabulary of a harvest: ids, statuses, outcomes, reasons and records.
//!
//! Status names keep GeoNode's spelling (`on-going`, `finished-all-ok`, ...) on the wire, so
//! a server that already shows GeoNode sessions can show ours unchanged.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Identifies one harvesting session. Time-ordered (UUID v7), so sorting ids sorts by start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SessionId(pub Uuid);

impl SessionId {
    /// A fresh, time-ordered id.
    pub fn new() -> Self {
        Self(Uuid::now_v7())
    }
}

/// The hasher of maps keyed by ids the library makes, on per-resource paths: session ids
/// (the stores' session tables, the durable store's batches) and actor ids (a session's
/// workers in flight). Those are random UUIDs and counters, not text an outsider picks, so
/// SipHash's resistance to crafted keys buys nothing, and it cost about 150 instructions a
/// lookup, several lookups per resource. (Maps keyed by resource ids, which come from a
/// remote catalogue, keep SipHash.)
pub(crate) type IdHasher = foldhash::fast::RandomState;

impl Default for SessionId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Identifies one node: one start of a supervisor, in one process. Fresh at every start
/// (UUID v7), never reused: a restarted process is a new node, so a write fenced by an old
/// node's id can never pass again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct NodeId(pub Uuid);

impl NodeId {
    /// A fresh, time-ordered id.
    pub fn new() -> Self {
        Self(Uuid::now_v7())
    }
}

impl Default for NodeId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Who may write for a session: its owner node and the epoch the owner holds it in. Every
/// write a node makes for a session carries the fence it holds; the store refuses a write
/// whose fence is not the session's current one with [`crate::StoreError::Fenced`],
/// changing nothing. A takeover moves the session to the rescuing node and bumps the epoch,
/// so a paused node that wakes up after losing its sessions cannot write for them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Fence {
    /// The owner node.
    pub node: NodeId,
    /// The epoch: 1 at creation, one more at each takeover.
    pub epoch: u64,
}

impl Fence {
    /// The fence of a session `node` creates.
    pub fn new(node: NodeId) -> Self {
        Self { node, epoch: 1 }
    }
}

impl fmt::Display for Fence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.node, self.epoch)
    }
}

/// The longest harvester or resource id, in bytes of UTF-8.
pub const MAX_ID_BYTES: usize = 1024;

/// Why `id` is not a valid id of `kind`: empty, blank, with a control character (NUL, a
/// newline, a tab, ...), or longer than [`MAX_ID_BYTES`].
pub(crate) fn id_problem(id: &str) -> Option<&'static str> {
    if id.is_empty() {
        Some("must not be empty")
    } else if id.len() > MAX_ID_BYTES {
        Some("must be at most 1024 bytes long")
    } else if id.chars().any(char::is_control) {
        Some("must not contain control characters (NUL, newlines, tabs, ...)")
    } else if id.trim().is_empty() {
        Some("must not be blank")
    } else {
        None
    }
}

macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        ///
        /// Shared text (`Arc<str>`): a clone is a reference count, not an allocation, which
        /// matters when every event and outcome of a million-resource session names one.
        ///
        /// `From<&str>` and `From<String>` take any text; the supervisor checks every id a
        /// session is started with ([`Self::check`]) and refuses an empty or blank id, one
        /// with a control character, or one longer than [`MAX_ID_BYTES`], with
        /// [`crate::StartError::InvalidId`]. [`Self::parse`] checks up front.
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(Arc<str>);

        impl $name {
            /// The id as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }

            /// `id` as an id, if it is a valid one (see [`Self::check`]).
            pub fn parse(id: &str) -> Result<Self, crate::error::IdError> {
                let id = Self::from(id);
                id.check()?;
                Ok(id)
            }

            /// Whether this id may name a session's harvester or resource: not empty or
            /// blank, no control characters, at most [`MAX_ID_BYTES`] bytes.
            pub fn check(&self) -> Result<(), crate::error::IdError> {
                match id_problem(&self.0) {
                    None => Ok(()),
                    Some(rule) => Err(crate::error::IdError::new($kind, &self.0, rule)),
                }
            }
        }

        impl std::ops::Deref for $name {
            type Target = str;
            fn deref(&self) -> &str {
                &self.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl std::borrow::Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                &*self.0 == other
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                &*self.0 == *other
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl From<&str> for $name {
            fn from(s: &str) -> Self {
                Self(s.into())
            }
        }

        impl From<String> for $name {
            fn from(s: String) -> Self {
                Self(s.into())
            }
        }

        impl From<&String> for $name {
            fn from(s: &String) -> Self {
                Self(s.as_str().into())
            }
        }
    };
}

string_id!(
    /// Identifies a harvester (one remote catalogue). At most one session runs per harvester.
    HarvesterId,
    "harvester_id"
);
string_id!(
    /// Identifies one resource of a session; unique within the session.
    ResourceId,
    "resource_id"
);

/// Where a session is in its life. Serialized with GeoNode's names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SessionStatus {
    /// Created; no resource has been started yet.
    Pending,
    /// Resources are being harvested.
    OnGoing,
    /// An abort was requested; workers are being cancelled.
    Aborting,
    /// Terminal: the session was aborted.
    Aborted,
    /// Terminal: every resource succeeded (or there were none).
    FinishedAllOk,
    /// Terminal: some resources succeeded, some did not.
    FinishedSomeFailed,
    /// Terminal: no resource succeeded.
    FinishedAllFailed,
}

impl SessionStatus {
    /// True for the statuses a session never leaves.
    pub fn is_terminal(self) -> bool {
        !matches!(self, Self::Pending | Self::OnGoing | Self::Aborting)
    }

    /// GeoNode's name for the status (`"on-going"`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::OnGoing => "on-going",
            Self::Aborting => "aborting",
            Self::Aborted => "aborted",
            Self::FinishedAllOk => "finished-all-ok",
            Self::FinishedSomeFailed => "finished-some-failed",
            Self::FinishedAllFailed => "finished-all-failed",
        }
    }
}

impl fmt::Display for SessionStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How one resource ended. Only `Succeeded` counts as success.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "kebab-case")]
pub enum ResourceOutcome {
    /// The harvest returned `Ok`.
    Succeeded,
    /// The harvest returned an error (its message).
    Failed {
        /// The error the harvest returned, with its sources.
        error: String,
    },
    /// The harvest panicked (the panic message).
    Panicked {
        /// The panic payload, when it was a string.
        message: String,
    },
    /// The attempt exceeded `resource_timeout`, or the session deadline cut it.
    TimedOut,
    /// The session was aborted, failed fast or shut down before the resource finished.
    Cancelled,
    /// The process running it died; found unfinished by recovery or after a crash.
    Lost,
}

impl ResourceOutcome {
    /// True only for [`ResourceOutcome::Succeeded`].
    pub fn is_success(&self) -> bool {
        matches!(self, Self::Succeeded)
    }

    /// Short kebab-case name, for logs and counters.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Succeeded => "succeeded",
            Self::Failed { .. } => "failed",
            Self::Panicked { .. } => "panicked",
            Self::TimedOut => "timed-out",
            Self::Cancelled => "cancelled",
            Self::Lost => "lost",
        }
    }
}

/// The final outcome of one resource, as recorded in the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutcomeRecord {
    /// Which resource.
    pub resource_id: ResourceId,
    /// How it ended.
    #[serde(flatten)]
    pub outcome: ResourceOutcome,
    /// Attempts made (0 when the resource never started).
    pub attempts: u32,
    /// From the first attempt's start to the final outcome, backoff included.
    #[serde(rename = "elapsed_ms", alias = "elapsed", with = "crate::millis")]
    pub elapsed: Duration,
}

/// Why a session was finalized.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FinalizeReason {
    /// Every resource reached a final outcome.
    Completed,
    /// A resource failed for good under `FailurePolicy::FailFast`.
    FailFast,
    /// The monitor's deadline (`workflow_time`) passed first.
    DeadlineExpired,
    /// An abort was requested.
    Aborted,
    /// The SessionActor died (panic, kill, stuck and escalated) before it finalized.
    SessionCrashed,
    /// Found unfinished in the store when a supervisor started (an earlier process died).
    Interrupted,
    /// The supervisor was shut down while the session ran.
    Shutdown,
}

impl FinalizeReason {
    /// Its kebab-case name, as in JSON (`"deadline-expired"`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Completed => "completed",
            Self::FailFast => "fail-fast",
            Self::DeadlineExpired => "deadline-expired",
            Self::Aborted => "aborted",
            Self::SessionCrashed => "session-crashed",
            Self::Interrupted => "interrupted",
            Self::Shutdown => "shutdown",
        }
    }

    /// The outcome a resource with nothing recorded gets under this reason: never success.
    pub fn missing_outcome(self) -> ResourceOutcome {
        match self {
            Self::DeadlineExpired => ResourceOutcome::TimedOut,
            Self::Aborted | Self::FailFast | Self::Shutdown => ResourceOutcome::Cancelled,
            Self::Completed | Self::SessionCrashed | Self::Interrupted => ResourceOutcome::Lost,
        }
    }
}

/// How many resources ended which way.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutcomeCounts {
    /// `Succeeded`.
    pub succeeded: usize,
    /// `Failed`.
    pub failed: usize,
    /// `Panicked`.
    pub panicked: usize,
    /// `TimedOut`.
    pub timed_out: usize,
    /// `Cancelled`.
    pub cancelled: usize,
    /// `Lost`.
    pub lost: usize,
}

impl OutcomeCounts {
    /// Counts one more outcome.
    pub fn add(&mut self, outcome: &ResourceOutcome) {
        let slot = match outcome {
            ResourceOutcome::Succeeded => &mut self.succeeded,
            ResourceOutcome::Failed { .. } => &mut self.failed,
            ResourceOutcome::Panicked { .. } => &mut self.panicked,
            ResourceOutcome::TimedOut => &mut self.timed_out,
            ResourceOutcome::Cancelled => &mut self.cancelled,
            ResourceOutcome::Lost => &mut self.lost,
        };
        *slot += 1;
    }

    /// Sum of every count: equals the session's total once it is finalized.
    pub fn total(&self) -> usize {
        self.succeeded + self.failed + self.panicked + self.timed_out + self.cancelled + self.lost
    }

    /// Everything but `succeeded`.
    pub fn unsuccessful(&self) -> usize {
        self.total() - self.succeeded
    }

    /// The terminal status these counts give, for `total` resources, under `reason`.
    ///
    /// An abort always ends `aborted` (GeoNode's `aborting -> aborted`); otherwise success
    /// must be proven for every resource of the total to be `finished-all-ok`.
    pub fn terminal_status(&self, total: usize, aborted: bool) -> SessionStatus {
        if aborted {
            SessionStatus::Aborted
        } else if self.succeeded == total {
            SessionStatus::FinishedAllOk
        } else if self.succeeded == 0 {
            SessionStatus::FinishedAllFailed
        } else {
            SessionStatus::FinishedSomeFailed
        }
    }
}

/// The store's record of one session: what an admin page shows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionRecord {
    /// The session.
    pub id: SessionId,
    /// The harvester it harvests.
    pub harvester_id: HarvesterId,
    /// Current status.
    pub status: SessionStatus,
    /// Number of resources.
    pub total: usize,
    /// When the session was created; the deadline counts from here.
    pub started: DateTime<Utc>,
    /// When finalization completed.
    pub ended: Option<DateTime<Utc>>,
    /// `resources x per_resource_estimate + buffer`.
    #[serde(
        rename = "workflow_time_ms",
        alias = "workflow_time",
        with = "crate::millis"
    )]
    pub workflow_time: Duration,
    /// Set once finalization was claimed (the exactly-once guard), with its reason.
    /// Serialized as `reason` (what it is to a reader: why the session ends or ended).
    #[serde(rename = "reason", alias = "finalizing")]
    pub finalizing: Option<FinalizeReason>,
    /// Outcomes recorded so far; reconciled against `total` at finalization.
    pub counts: OutcomeCounts,
    /// The user finalizer's error, or why it did not finish.
    pub finalizer_error: Option<String>,
    /// How many times the finalizer was started (the store's second durable step, between
    /// the claim and the completion): 0 before it first runs; more than 1 when a crash
    /// interrupted an earlier run and recovery ran it again.
    #[serde(default)]
    pub finalizer_attempts: u32,
    /// The node that owns the session: the only one whose writes for it the store accepts
    /// (`None` for sessions stored before nodes existed: any live node may take them over).
    #[serde(default)]
    pub owner: Option<NodeId>,
    /// The epoch its owner holds it in: 1 at creation, one more at each takeover.
    #[serde(default)]
    pub epoch: u64,
    /// Another node asked for an abort (see [`crate::Supervisor::abort`]): the owner
    /// honours it at its next lease renewal, a rescuer finalizes it `aborted`.
    #[serde(default)]
    pub abort_requested: bool,
}

impl SessionRecord {
    /// The fence a write for this session must carry (its owner and epoch); `None` for a
    /// session stored before nodes existed, which must be taken over before it is written.
    pub fn fence(&self) -> Option<Fence> {
        self.owner.map(|node| Fence {
            node,
            epoch: self.epoch,
        })
    }

    /// The reason the session was finalized with, once terminal.
    pub fn reason(&self) -> Option<FinalizeReason> {
        if self.status.is_terminal() {
            self.finalizing
        } else {
            None
        }
    }
}

/// What the finalizer is given: the reconciled outcome of the whole session.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct SessionReport {
    /// The session.
    pub session_id: SessionId,
    /// Its harvester.
    pub harvester_id: HarvesterId,
    /// Why it is being finalized.
    pub reason: FinalizeReason,
    /// The terminal status it will get.
    pub status: SessionStatus,
    /// Number of resources.
    pub total: usize,
    /// Reconciled counts: `counts.total() == total`.
    pub counts: OutcomeCounts,
    /// One final outcome per resource, in resource order.
    pub outcomes: Vec<OutcomeRecord>,
    /// When the session was created.
    pub started: DateTime<Utc>,
    /// Store failures during the session (an outcome the store could not record is still
    /// in `outcomes`, from the session's memory). Empty when all went well.
    #[serde(default)]
    pub store_errors: Vec<String>,
    /// Which run of the finalizer this is, from 1. More than 1 only when an earlier run was
    /// interrupted (its process died while it ran) and recovery runs it again
    /// (`FinalizerRecovery::Rerun`): an idempotent finalizer dedupes by `session_id`.
    #[serde(default = "first_attempt")]
    pub finalizer_attempt: u32,
    /// The session's budget (`workflow_time`), from its start to its deadline.
    #[serde(
        rename = "workflow_time_ms",
        alias = "workflow_time",
        with = "crate::millis",
        default
    )]
    pub workflow_time: std::time::Duration,
    /// How the budget was chosen (static, or learned from the history; see
    /// [`crate::budget`]); `None` when the session's stored config could not be read.
    #[serde(default)]
    pub budget: Option<crate::budget::BudgetSource>,
}

fn first_attempt() -> u32 {
    1
}

#[cfg(test)]
mod tests {
    use super::*;

    const REASONS: [FinalizeReason; 7] = [
        FinalizeReason::Completed,
        FinalizeReason::FailFast,
        FinalizeReason::DeadlineExpired,
        FinalizeReason::Aborted,
        FinalizeReason::SessionCrashed,
        FinalizeReason::Interrupted,
        FinalizeReason::Shutdown,
    ];

    #[test]
    fn statuses_serialize_with_geonode_names() {
        let json = serde_json::to_string(&SessionStatus::FinishedSomeFailed).expect("serialize");
        assert_eq!(json, "\"finished-some-failed\"");
        let back: SessionStatus = serde_json::from_str("\"on-going\"").expect("parse");
        assert_eq!(back, SessionStatus::OnGoing);
    }

    #[test]
    fn reasons_names_are_their_json_names() {
        for reason in REASONS {
            let json = serde_json::to_string(&reason).expect("serialize");
            assert_eq!(json, format!("\"{}\"", reason.as_str()));
        }
    }

    #[test]
    fn zero_resources_is_all_ok_and_missing_is_never_success() {
        let counts = OutcomeCounts::default();
        assert_eq!(
            counts.terminal_status(0, false),
            SessionStatus::FinishedAllOk
        );
        for reason in REASONS {
            assert!(!reason.missing_outcome().is_success());
        }
    }

    #[test]
    fn terminal_status_follows_counts() {
        let mut c = OutcomeCounts::default();
        c.add(&ResourceOutcome::Succeeded);
        c.add(&ResourceOutcome::TimedOut);
        assert_eq!(
            c.terminal_status(2, false),
            SessionStatus::FinishedSomeFailed
        );
        assert_eq!(c.terminal_status(2, true), SessionStatus::Aborted);
        let mut f = OutcomeCounts::default();
        f.add(&ResourceOutcome::Lost);
        assert_eq!(
            f.terminal_status(1, false),
            SessionStatus::FinishedAllFailed
        );
    }
}
