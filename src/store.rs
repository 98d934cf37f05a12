//! `SessionStore`: the one place sessions, outcomes and events live.
//!
//! The store is the authority the tree leans on when an actor cannot be trusted:
//! - the **busy lock**: [`SessionStore::create_session`] refuses a harvester that has an
//!   active session, atomically, so two starts can never both pass;
//! - the **exactly-once guard**: [`SessionStore::claim_finalization`] is a compare-and-set
//!   from "not yet claimed, not terminal"; only its winner runs the user finalizer, and
//!   [`SessionStore::complete_finalization`] writes the terminal status once and frees the
//!   harvester only if it is still held by *this* session;
//! - the **record** the monitor reads, so a stuck SessionActor cannot hide a deadline.

mod chunks;
mod columns;
mod line;
pub mod memory;
#[cfg(feature = "postgres")]
pub mod postgres;
mod receipt;
pub mod sqlite;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::config::SessionConfig;
use crate::error::StoreError;
use crate::events::SessionEvent;
use crate::harvest::InCompletion;
use crate::model::{
    Fence, FinalizeReason, HarvesterId, NodeId, OutcomeCounts, OutcomeRecord, ResourceId,
    SessionId, SessionRecord, SessionReport, SessionStatus,
};

pub use memory::MemoryStore;
#[cfg(feature = "postgres")]
pub use postgres::{PostgresOptions, PostgresStore};
pub use receipt::{OutcomeAnswer, OutcomeReceipt};
pub use sqlite::{Durability, SqliteOptions, SqliteStore};

/// A session to create, in status `pending`.
#[derive(Debug, Clone)]
pub struct NewSession {
    /// Its id.
    pub id: SessionId,
    /// Its harvester, which must be free.
    pub harvester_id: HarvesterId,
    /// The resources, unique. Shared with the running session, not copied.
    pub resources: Arc<[ResourceId]>,
    /// Creation time; the deadline counts from here.
    pub started: DateTime<Utc>,
    /// The deadline's budget.
    pub workflow_time: Duration,
    /// The session's budget and policies, kept so that a resumed session runs under them.
    /// Shared with the running session, not copied.
    pub config: Arc<SessionConfig>,
    /// The node that creates it and owns it, in epoch 1 (see [`Fence`]).
    pub owner: NodeId,
}

/// A node as it registers: one start of a supervisor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Its fresh id.
    pub id: NodeId,
    /// A name for people (logs, pages); not unique.
    pub name: Option<String>,
    /// The process (see [`ProcessId`]), so that a node on the same host can tell at once
    /// that it is gone instead of waiting for its lease to expire. `None` where it cannot
    /// be known.
    pub process: Option<ProcessId>,
}

/// A process, as another process on the same host can check it is still running: a
/// crashed node's sessions are taken over at once by a node on its host, with no lease to
/// wait out. Only where the check cannot be fooled: Linux, where the host key names the
/// boot and the PID namespace and the process's start time tells a reused PID apart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessId {
    /// The boot and the PID namespace: equal keys, same PIDs.
    pub host: String,
    /// The PID.
    pub pid: u32,
    /// When it started, in clock ticks after boot (`/proc/<pid>/stat`, field 22).
    pub start: u64,
}

/// A node as the store knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// As it registered.
    pub info: NodeInfo,
    /// When it registered.
    pub started: DateTime<Utc>,
    /// Until when its lease runs, by the store's clock.
    pub lease_until: DateTime<Utc>,
    /// Whether the lease still runs, by the store's clock, at the time of the read.
    pub live: bool,
}

/// A session a rescuing node took over: [`SessionStore::take_over`].
#[derive(Debug, Clone)]
pub struct TakenOver {
    /// The session after the takeover (owner: the rescuer, epoch bumped).
    pub record: SessionRecord,
    /// Its owner before (`None`: a session stored before nodes existed).
    pub from_node: Option<NodeId>,
}

/// The outcomes a terminal session derives for resources with no recorded outcome: the
/// finalization reason's missing outcome, in resource order, with no attempt counted.
/// `recorded`: the resources that have one. The same for every store.
pub(crate) fn derived_outcomes<'a>(
    record: &SessionRecord,
    resources: &'a [ResourceId],
    recorded: &std::collections::HashSet<&str>,
) -> impl Iterator<Item = OutcomeRecord> + 'a {
    let derive = record.status.is_terminal() && recorded.len() < resources.len();
    let outcome = record
        .reason()
        .unwrap_or(FinalizeReason::SessionCrashed)
        .missing_outcome();
    let missing: Vec<&'a ResourceId> = if derive {
        resources
            .iter()
            .filter(|r| !recorded.contains(r.as_str()))
            .collect()
    } else {
        Vec::new()
    };
    missing.into_iter().map(move |r| OutcomeRecord {
        resource_id: r.clone(),
        outcome: outcome.clone(),
        attempts: 0,
        elapsed: Duration::ZERO,
    })
}

/// How long the store remembers a node after its lease ended (if it owns no unfinished
/// session): a row per supervisor start would otherwise pile up for ever.
pub const NODE_RETENTION: Duration = Duration::from_secs(86_400);

/// The most events one [`SessionStore::events_after`] page holds.
pub const MAX_EVENT_PAGE: usize = 10_000;

/// A page of session history: newest first, optionally one harvester's or one status's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct SessionQuery {
    /// Only this harvester's sessions.
    pub harvester_id: Option<HarvesterId>,
    /// Only sessions in this status.
    pub status: Option<SessionStatus>,
    /// Only sessions older than this one: the `next` cursor of the previous page.
    pub before: Option<SessionId>,
    /// Page size, from 1 to [`SessionQuery::MAX_LIMIT`] (other values are clamped).
    pub limit: usize,
}

impl SessionQuery {
    /// The largest page served.
    pub const MAX_LIMIT: usize = 1000;

    /// `limit`, clamped to `1..=MAX_LIMIT`.
    pub fn page_size(&self) -> usize {
        self.limit.clamp(1, Self::MAX_LIMIT)
    }
}

impl Default for SessionQuery {
    fn default() -> Self {
        Self {
            harvester_id: None,
            status: None,
            before: None,
            limit: 50,
        }
    }
}

/// One page of [`SessionStore::query_sessions`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionPage {
    /// The sessions, newest first.
    pub sessions: Vec<SessionRecord>,
    /// Pass as `before` to get the next page; `None` on the last page.
    pub next: Option<SessionId>,
}

impl SessionPage {
    /// Cuts `newest_first` (which may hold one more than `limit`) into a page.
    pub(crate) fn from_overfetch(mut newest_first: Vec<SessionRecord>, limit: usize) -> Self {
        let more = newest_first.len() > limit;
        newest_first.truncate(limit);
        let next = if more {
            newest_first.last().map(|r| r.id)
        } else {
            None
        };
        Self {
            sessions: newest_first,
            next,
        }
    }
}

/// The answer to [`SessionStore::claim_finalization`].
#[derive(Debug, Clone)]
pub enum Claim {
    /// The caller won: it alone runs the finalizer. The record is as it was *before* the
    /// claim (so `status` tells whether the session was aborting).
    Claimed(SessionRecord),
    /// Someone else claimed it and has not completed yet.
    AlreadyClaimed(SessionRecord),
    /// The session is terminal already.
    AlreadyFinalized(SessionRecord),
}

/// What [`SessionStore::complete_finalization`] writes.
#[derive(Debug, Clone)]
pub struct Completion {
    /// Why the session ends (normally the claimed reason).
    pub reason: FinalizeReason,
    /// Terminal status.
    pub status: SessionStatus,
    /// Outcomes the finalizing process observed and the store has not recorded (their
    /// writes failed): written with the completion if there is room, in a part of it that
    /// may fail alone (a completion needs O(1) new space besides them). Resources with no
    /// outcome at all are not written: a terminal session derives them when read (see
    /// [`SessionStore::outcomes`]).
    pub unrecorded: Vec<OutcomeRecord>,
    /// Reconciled counts (their total equals the session's).
    pub counts: OutcomeCounts,
    /// The user finalizer's error, or why it did not finish.
    pub finalizer_error: Option<String>,
    /// End time.
    pub ended: DateTime<Utc>,
}

/// The answer to [`SessionStore::complete_finalization`].
#[derive(Debug, Clone)]
pub enum Completed {
    /// This call made the session terminal and freed its harvester.
    Now(SessionRecord),
    /// It was terminal already; nothing changed.
    AlreadyFinalized(SessionRecord),
}

/// What a store announces as it happens, for this process's writes and other processes'
/// alike: see [`SessionStore::signals`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum StoreSignal {
    /// New events of this session are committed.
    Events(SessionId),
    /// Another node asked to abort a session this node owns.
    AbortRequested(NodeId),
}

/// A store's announcements ([`SessionStore::signals`]): followers of a session another
/// process runs wake on them instead of polling, while they are live.
#[derive(Debug)]
pub struct StoreSignals {
    /// The announcements. A receiver that lags has missed some: look at the store again.
    pub receiver: tokio::sync::broadcast::Receiver<StoreSignal>,
    /// Whether announcements arrive now. While `false` (the store lost its connection to
    /// the server and reconnects) followers poll; when it turns `true` again they look at
    /// the store once, for what they may have missed.
    pub live: tokio::sync::watch::Receiver<bool>,
}

/// Storage of sessions, outcomes and events. Implementations must make `create_session`,
/// `transition`, `claim_finalization` and `complete_finalization` atomic per session.
///
/// ```
/// use harvest_supervisor::store::{MemoryStore, NewSession, SessionStore};
/// use harvest_supervisor::{SessionId, SessionStatus};
/// # tokio_test_block(async {
/// let store = MemoryStore::new();
/// let id = SessionId::new();
/// store.create_session(NewSession {
///     id,
///     harvester_id: "csw".into(),
///     resources: vec!["a".into()].into(),
///     started: chrono::Utc::now(),
///     workflow_time: std::time::Duration::from_secs(60),
///     config: Default::default(),
///     owner: harvest_supervisor::NodeId::new(),
/// }).await.expect("created");
/// assert_eq!(store.session(id).await.expect("stored").status, SessionStatus::Pending);
/// # });
/// # fn tokio_test_block(f: impl std::future::Future<Output = ()>) {
/// #     tokio::runtime::Builder::new_current_thread().build().expect("rt").block_on(f)
/// # }
/// ```
#[async_trait]
pub trait SessionStore: Send + Sync + 'static {
    /// Creates a `pending` session, taking its harvester's busy lock;
    /// `StoreError::HarvesterBusy` if another session of that harvester is not terminal.
    async fn create_session(&self, new: NewSession) -> Result<SessionRecord, StoreError>;

    /// One session's record.
    async fn session(&self, id: SessionId) -> Result<SessionRecord, StoreError>;

    /// The records of `ids` that exist, in no particular order (the monitors' batched
    /// look at their sessions: one query per batch, not one per session). The default
    /// reads them one by one.
    async fn sessions_by_id(&self, ids: &[SessionId]) -> Result<Vec<SessionRecord>, StoreError> {
        let mut records = Vec::with_capacity(ids.len());
        for &id in ids {
            match self.session(id).await {
                Ok(record) => records.push(record),
                Err(StoreError::UnknownSession { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(records)
    }

    /// Every session, newest first.
    async fn list_sessions(&self) -> Result<Vec<SessionRecord>, StoreError>;

    /// A page of history, newest first (keyset pagination: stable while sessions are added).
    async fn query_sessions(&self, query: &SessionQuery) -> Result<SessionPage, StoreError>;

    /// The session holding `harvester`'s busy lock, if any.
    async fn active_session(
        &self,
        harvester: &HarvesterId,
    ) -> Result<Option<SessionId>, StoreError>;

    /// A session's resources, in order.
    async fn resources(&self, id: SessionId) -> Result<Vec<ResourceId>, StoreError>;

    /// Moves the session from `from` to `to` (both non-terminal). Returns false, changing
    /// nothing, if it is not in `from` or its finalization was claimed.
    async fn transition(
        &self,
        id: SessionId,
        fence: Fence,
        from: SessionStatus,
        to: SessionStatus,
    ) -> Result<bool, StoreError>;

    /// Records a resource's final outcome. `StoreError::Finalizing` once finalization was
    /// claimed: reconciliation has already counted that resource.
    ///
    /// A session records at most one outcome per resource (resuming forgets all but the
    /// successes first), so a store need not guard against a second one. The memory store
    /// does not (it would count it again); the durable store does (its file outlives any
    /// one process, so it keeps the first and ignores the rest). Reconciliation takes the
    /// first either way.
    async fn record_outcome(
        &self,
        id: SessionId,
        fence: Fence,
        outcome: OutcomeRecord,
    ) -> Result<(), StoreError>;

    /// [`SessionStore::record_outcome`] done in place, without a future, by a store that
    /// can (one in process memory); `None`, the default, means it cannot and the caller
    /// awaits `record_outcome` instead. Sessions try this first for every outcome: a boxed
    /// future per resource is a measurable part of a memory-store session.
    fn record_outcome_now(
        &self,
        id: SessionId,
        fence: Fence,
        outcome: &OutcomeRecord,
    ) -> Option<Result<(), StoreError>> {
        let _ = (id, fence, outcome);
        None
    }

    /// [`SessionStore::record_outcome`] queued without a future, by a store that writes in
    /// the background (the durable store): returns at once with a receipt the store
    /// answers once the write is committed, or failed. `None`, the default, means the
    /// store does not queue, and the caller awaits `record_outcome` instead. Sessions try
    /// this after [`SessionStore::record_outcome_now`]: two boxed futures per resource
    /// (the async trait's and the session's) cost a durable session more than
    /// serializing the outcome.
    ///
    /// Answer every receipt, with the same results `record_outcome` would give (an
    /// [`OutcomeAnswer`] dropped unanswered reads as [`StoreError::Closed`]).
    fn queue_outcome(
        &self,
        id: SessionId,
        fence: Fence,
        outcome: &OutcomeRecord,
    ) -> Option<OutcomeReceipt> {
        let _ = (id, fence, outcome);
        None
    }

    /// The outcomes recorded so far, in the order they were recorded. Once the session is
    /// terminal, every resource has one: those with none recorded follow, in resource
    /// order, derived from the finalization's reason (`TimedOut` for a deadline,
    /// `Cancelled` for an abort, fail-fast or shutdown, `Lost` after a crash; 0 attempts),
    /// so a completion never has to write a row per missing resource.
    async fn outcomes(&self, id: SessionId) -> Result<Vec<OutcomeRecord>, StoreError>;

    /// Records, for a terminal session, those of `outcomes` (of its own resources) whose
    /// resource has no recorded outcome yet (until now derived from the reason; see [`SessionStore::outcomes`]),
    /// and answers how many it wrote. For the outcomes a session observed but the store
    /// could not take, when the completion that carried them failed and completed
    /// without them (a full disk, a lost connection): written once the store can, so that
    /// the stored outcomes agree with the session's counts. An open session's outcomes
    /// are not touched (its actor records them); writing the same ones twice writes
    /// nothing the second time. A bulk write: a store whose disk is full refuses it
    /// ([`StoreError::DiskFull`]) until there is room.
    async fn record_late_outcomes(
        &self,
        id: SessionId,
        outcomes: &[OutcomeRecord],
    ) -> Result<usize, StoreError>;

    /// How long the most recent successes of `harvester` took: the elapsed time of its
    /// `succeeded` outcomes (from the first attempt's start, retries included), newest
    /// session first (within one, in no particular order: the memory and SQLite stores
    /// give the latest recorded first, PostgreSQL its key order); at most `limit` of them.
    /// The history an adaptive budget learns from (see [`crate::budget`]).
    async fn recent_durations(
        &self,
        harvester: &HarvesterId,
        limit: usize,
    ) -> Result<Vec<std::time::Duration>, StoreError>;

    /// A page of [`SessionStore::outcomes`] (derived outcomes included): `limit` from
    /// `offset`, and how many there are in all. For admin pages of sessions too large to
    /// load whole.
    async fn outcomes_page(
        &self,
        id: SessionId,
        offset: usize,
        limit: usize,
    ) -> Result<(Vec<OutcomeRecord>, usize), StoreError>;

    /// Appends an event to the audit trail. Must not block: a durable store queues it.
    /// (Owned: a store keeps it without copying, and nobody allocates a shared copy of
    /// each event unless a bus subscriber is listening.) An event carries its session's
    /// harvester id; both stores keep it without its session and harvester ids and
    /// restore them from the session when read. Fenced like every write: an event whose
    /// fence is not the session's is dropped (a queueing store cannot say so; one that
    /// writes in place answers `Fenced`).
    fn append_event(&self, fence: Fence, event: SessionEvent) -> Result<(), StoreError>;

    /// A session's events, by `seq`. The whole log at once: a reader of a long one (a
    /// large session logs two events per resource) should page it with
    /// [`SessionStore::events_after`].
    async fn events(&self, id: SessionId) -> Result<Vec<SessionEvent>, StoreError>;

    /// A page of a session's events: the first `limit` (1 to [`MAX_EVENT_PAGE`]) with a
    /// `seq` above `after`, by `seq`. Pass the last `seq` of a page as `after` for the
    /// next; an empty page is the end of what is logged so far. (The default reads the
    /// whole log and keeps the page; both stores here read just the page.)
    async fn events_after(
        &self,
        id: SessionId,
        after: u64,
        limit: usize,
    ) -> Result<Vec<SessionEvent>, StoreError> {
        let limit = limit.clamp(1, MAX_EVENT_PAGE);
        let mut events = self.events(id).await?;
        events.retain(|e| e.seq > after);
        events.truncate(limit);
        Ok(events)
    }

    /// The highest stored `seq` of a session's events (0 if none): where a new emitter
    /// for it goes on.
    async fn last_event_seq(&self, id: SessionId) -> Result<u64, StoreError>;

    /// The exactly-once guard: claims finalization with `reason` if nobody has.
    async fn claim_finalization(
        &self,
        id: SessionId,
        fence: Fence,
        reason: FinalizeReason,
    ) -> Result<Claim, StoreError>;

    /// The second of finalization's three durable steps (claimed, finalizer started,
    /// completed): records that the finalizer of a claimed, non-terminal session starts
    /// (again) and returns which start this is, from 1. Recovery reads it back as
    /// [`SessionRecord::finalizer_attempts`]: 0 means the claimant died before its
    /// finalizer ran, so it must run; more means a run was interrupted.
    /// `StoreError::NotClaimed` if the session is not claimed, or is terminal.
    async fn finalizer_started(&self, id: SessionId, fence: Fence) -> Result<u32, StoreError>;

    /// The budget a session was started with (`None` for sessions stored before it was
    /// kept, schema version 1).
    async fn session_config(&self, id: SessionId) -> Result<Option<SessionConfig>, StoreError>;

    /// Prepares an unfinished session to be harvested again under the same id
    /// (`RecoveryPolicy::Resume`): if it is `pending` or `on-going` and nobody claimed its
    /// finalization, keeps its successes, forgets every other outcome, sets it `on-going`
    /// and returns the resources without a success, in order. `None` if it cannot resume
    /// (it was aborting or finalizing): finalize it instead.
    async fn resume_session(
        &self,
        id: SessionId,
        fence: Fence,
    ) -> Result<Option<Vec<ResourceId>>, StoreError>;

    /// Whether the store refuses bulk writes (events, outcomes, new sessions:
    /// [`StoreError::DiskFull`]) because its disk is full, keeping its last room for lease
    /// renewals, claims and completions (the SQLite store's reserve, see
    /// `SqliteOptions::disk_reserve`). A store without such a mode answers `false`.
    fn disk_full(&self) -> bool {
        false
    }

    /// Waits until every write sent before (event appends included) is durable. A store
    /// without a write queue has nothing to wait for.
    async fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }

    /// Makes a claimed session terminal (status, reason, counts, finalizer error, end
    /// time), writes the unrecorded outcomes if it can, and frees its harvester if this
    /// session still holds it. Needs O(1) new space besides the unrecorded outcomes:
    /// should those not fit, it completes without them.
    async fn complete_finalization(
        &self,
        id: SessionId,
        fence: Fence,
        completion: Completion,
    ) -> Result<Completed, StoreError>;

    /// [`SessionStore::complete_finalization`] with a finalizer's `work` run first, in
    /// the same transaction: its writes commit with the terminal status or not at all. A
    /// failure (or panic) of the work rolls back its writes alone, and the session
    /// completes with it as `finalizer_error`. Only a store that made the work can run it
    /// (see [`SessionStore::runs_in_completion`]); the default refuses.
    async fn complete_finalization_with(
        &self,
        id: SessionId,
        fence: Fence,
        completion: Completion,
        work: &InCompletion,
        report: &SessionReport,
    ) -> Result<Completed, StoreError> {
        let _ = (id, fence, completion, work, report);
        Err(StoreError::InvalidOptions(crate::ConfigError::new(
            "finalizer",
            "this finalizer runs inside the store's transaction, and this store has none \
             (it needs the PostgreSQL store)",
        )))
    }

    /// Whether this store can run `work` inside its completing transaction (see
    /// [`SessionStore::complete_finalization_with`]); checked when a supervisor starts.
    fn runs_in_completion(&self, work: &InCompletion) -> bool {
        let _ = work;
        false
    }

    /// Records an abort asked for by a node that does not own the session (unfenced: any
    /// node may ask). Only a pending or on-going session whose finalization is not
    /// claimed takes it; the record after is returned either way, so the caller can
    /// answer truthfully. Its owner learns of it from [`SessionStore::requested_aborts`].
    async fn request_abort(&self, id: SessionId) -> Result<SessionRecord, StoreError>;

    /// The sessions `node` owns that another node asked to abort, still pending or
    /// on-going and unclaimed. Read by the owner after each lease renewal.
    async fn requested_aborts(&self, node: NodeId) -> Result<Vec<SessionId>, StoreError>;

    /// The unfinished sessions `node` owns (pending, on-going or aborting): a node compares
    /// them with those it runs, to stop any that was taken over while it could not tell
    /// (one that writes nothing, e.g. a hung harvest).
    async fn open_sessions_of(&self, node: NodeId) -> Result<Vec<SessionId>, StoreError>;

    /// Registers a node with a lease of `ttl` from now, by the store's clock.
    async fn register_node(&self, node: &NodeInfo, ttl: Duration)
    -> Result<NodeRecord, StoreError>;

    /// Extends `node`'s lease to `ttl` from now (the store's clock) and returns it. A node
    /// whose lease had expired renews too: it keeps what nobody took over meanwhile (its
    /// fences say what that is). A node the store does not know (its row was removed) is
    /// registered again.
    async fn renew_lease(&self, node: &NodeInfo, ttl: Duration) -> Result<NodeRecord, StoreError>;

    /// Ends `node`'s lease now: what it still owns can be taken over at once (a clean
    /// shutdown that left sessions unfinished).
    async fn release_node(&self, node: NodeId) -> Result<(), StoreError>;

    /// Ends the lease of `node` if it is still the one registered as `process`: a rescuer
    /// that found that process gone (same host) says so, and the node's sessions can be
    /// taken over without waiting for its lease. False if nothing changed.
    async fn expire_node(&self, node: NodeId, process: &ProcessId) -> Result<bool, StoreError>;

    /// Every node the store knows, newest first, with whether its lease runs. A node whose
    /// lease ended more than [`NODE_RETENTION`] ago and that owns no unfinished session is
    /// forgotten by the next [`SessionStore::take_over`].
    async fn nodes(&self) -> Result<Vec<NodeRecord>, StoreError>;

    /// Announcements of new events and abort requests as they are committed, by any
    /// process (a PostgreSQL store listens for them); `None`, the default, if the store
    /// makes none, and followers of other processes' sessions poll.
    fn signals(&self) -> Option<StoreSignals> {
        None
    }

    /// The rescue: atomically takes over up to `limit` non-terminal sessions whose owner's
    /// lease has expired (or that have no owner), for `rescuer`, bumping each one's epoch;
    /// one winner per session however many nodes try at once. A rescuer whose own lease
    /// has expired takes nothing (`LeaseExpired`): it may be the zombie. A live node's
    /// sessions are never taken.
    async fn take_over(&self, rescuer: NodeId, limit: usize) -> Result<Vec<TakenOver>, StoreError>;
}
