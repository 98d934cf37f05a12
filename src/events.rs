//! The supervision event log: what happened to a session, in order.
//!
//! Every event goes to three places at once: `tracing` (inside the session's span), the
//! in-process subscribers (a bounded broadcast: a slow subscriber loses the oldest events and
//! is told how many, it never slows supervision), and the store (the audit trail).
//! `seq` is assigned under the same lock that publishes, so every reader sees one session's
//! events in strictly increasing `seq` order.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::model::{
    Fence, FinalizeReason, HarvesterId, NodeId, OutcomeCounts, ResourceId, SessionId, SessionStatus,
};
use crate::store::SessionStore;

/// One entry of the event log. JSON-lines friendly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionEvent {
    /// Position in the session's log, from 1, strictly increasing.
    pub seq: u64,
    /// Wall-clock time of the event.
    pub at: DateTime<Utc>,
    /// The session.
    pub session_id: SessionId,
    /// Its harvester.
    pub harvester_id: HarvesterId,
    /// What happened.
    #[serde(flatten)]
    pub kind: EventKind,
}

/// What happened. Serialized with a `"kind"` tag holding the variant name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind")]
#[non_exhaustive]
pub enum EventKind {
    /// The session was created.
    SessionStarted {
        /// Resources in the session.
        total: usize,
        /// The deadline's budget.
        #[serde(
            rename = "workflow_time_ms",
            alias = "workflow_time",
            with = "crate::millis"
        )]
        workflow_time: Duration,
        /// How the budget was chosen: the static formula, or learned from the harvester's
        /// history (see [`crate::budget`]).
        #[serde(default)]
        budget: crate::budget::BudgetSource,
    },
    /// The session moved between statuses.
    StatusChanged {
        /// Old status.
        from: SessionStatus,
        /// New status.
        to: SessionStatus,
    },
    /// An attempt started.
    WorkerStarted {
        /// Resource.
        resource_id: ResourceId,
        /// Attempt number, from 1.
        attempt: u32,
    },
    /// An attempt succeeded.
    WorkerSucceeded {
        /// Resource.
        resource_id: ResourceId,
        /// Attempt number.
        attempt: u32,
        /// Duration of the attempt.
        #[serde(rename = "elapsed_ms", alias = "elapsed", with = "crate::millis")]
        elapsed: Duration,
    },
    /// An attempt returned an error.
    WorkerFailed {
        /// Resource.
        resource_id: ResourceId,
        /// Attempt number.
        attempt: u32,
        /// The error, with its sources.
        error: String,
    },
    /// An attempt panicked.
    WorkerPanicked {
        /// Resource.
        resource_id: ResourceId,
        /// Attempt number.
        attempt: u32,
        /// The panic message.
        message: String,
    },
    /// An attempt exceeded its time (or went without a heartbeat too long).
    WorkerTimedOut {
        /// Resource.
        resource_id: ResourceId,
        /// Attempt number.
        attempt: u32,
        /// Cut because its heartbeat fell silent for `heartbeat_timeout`, before its time
        /// limit (`resource_timeout`). Written only when true.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        heartbeat_silent: bool,
    },
    /// An attempt will be retried after `delay`.
    WorkerRetrying {
        /// Resource.
        resource_id: ResourceId,
        /// The attempt that will run next.
        next_attempt: u32,
        /// Backoff before it.
        #[serde(rename = "delay_ms", alias = "delay", with = "crate::millis")]
        delay: Duration,
    },
    /// An attempt ended because the session cancelled it.
    WorkerCancelled {
        /// Resource.
        resource_id: ResourceId,
        /// Attempt number.
        attempt: u32,
    },
    /// The monitor started ticking.
    MonitorScheduled {
        /// Tick period.
        #[serde(rename = "interval_ms", alias = "interval", with = "crate::millis")]
        interval: Duration,
        /// Time left until the deadline.
        #[serde(
            rename = "deadline_in_ms",
            alias = "deadline_in",
            with = "crate::millis"
        )]
        deadline_in: Duration,
    },
    /// The monitor checked the session.
    MonitorTick {
        /// Time left until the deadline (zero once past).
        #[serde(rename = "remaining_ms", alias = "remaining", with = "crate::millis")]
        remaining: Duration,
    },
    /// The monitor found the deadline passed and told the session.
    DeadlineExpired,
    /// The session did not finalize within `escalation_grace`; the root takes over.
    MonitorEscalated {
        /// What the monitor waited for.
        waiting_for: String,
    },
    /// The monitor crashed and was started again.
    MonitorRestarted {
        /// Why it crashed.
        error: String,
    },
    /// The monitor was stopped because the session finalized.
    MonitorCancelled,
    /// Someone asked to abort the session.
    AbortRequested,
    /// The user finalizer is about to run.
    FinalizerStarted {
        /// Why the session is being finalized.
        reason: FinalizeReason,
        /// Which run of the finalizer, from 1; more when recovery re-runs one a crash
        /// interrupted (see `SessionReport::finalizer_attempt`).
        #[serde(default = "first_attempt")]
        attempt: u32,
    },
    /// The user finalizer returned (or was given up on).
    FinalizerFinished {
        /// Why the session was finalized.
        reason: FinalizeReason,
        /// The terminal status.
        status: SessionStatus,
        /// The finalizer's error, if any.
        error: Option<String>,
    },
    /// The session is over and its harvester free. Always the last event of a session.
    SessionFinished {
        /// Terminal status.
        status: SessionStatus,
        /// Why it ended.
        reason: FinalizeReason,
        /// Resources in the session.
        total: usize,
        /// Reconciled counts.
        counts: OutcomeCounts,
    },
    /// The store failed a write; the session goes on (the data is kept in memory and
    /// written with the finalization).
    StoreFailed {
        /// What was being written.
        operation: String,
        /// The store's error.
        error: String,
    },
    /// A node took this session over from a dead one (after `SessionTakenOver`) and
    /// recovers it.
    Recovered {
        /// The status it was left in.
        previous_status: SessionStatus,
        /// `Some(n)`: resumed, re-harvesting the `n` resources without a success;
        /// `None`: finalized as `Interrupted`.
        resuming: Option<usize>,
    },
    /// A node took the session over from its owner, whose lease had expired (a dead or
    /// paused process); the owner's later writes for it are refused.
    SessionTakenOver {
        /// The owner before (`None`: a session stored before nodes existed).
        from_node: Option<NodeId>,
        /// The node that took it.
        by_node: NodeId,
        /// The new epoch.
        epoch: u64,
    },
    /// The owning node could not renew its lease in time and self-fenced: it cancels the
    /// session's attempts and runs no finalizer until it renews (then it goes on, if the
    /// session was not taken over meanwhile).
    LeaseLost {
        /// The node.
        node: NodeId,
    },
    /// The owning node renewed its lease after having self-fenced: attempts start again
    /// (those its fencing cut first, under their attempt numbers).
    LeaseRenewed {
        /// The node.
        node: NodeId,
    },
}

impl EventKind {
    /// The resource a worker event is about (`None` for the session's own events).
    pub fn resource_id(&self) -> Option<&ResourceId> {
        match self {
            Self::WorkerStarted { resource_id, .. }
            | Self::WorkerSucceeded { resource_id, .. }
            | Self::WorkerFailed { resource_id, .. }
            | Self::WorkerPanicked { resource_id, .. }
            | Self::WorkerTimedOut { resource_id, .. }
            | Self::WorkerRetrying { resource_id, .. }
            | Self::WorkerCancelled { resource_id, .. } => Some(resource_id),
            _ => None,
        }
    }

    /// The variant's name, as in the JSON `"kind"` field.
    pub fn name(&self) -> &'static str {
        match self {
            Self::SessionStarted { .. } => "SessionStarted",
            Self::StatusChanged { .. } => "StatusChanged",
            Self::WorkerStarted { .. } => "WorkerStarted",
            Self::WorkerSucceeded { .. } => "WorkerSucceeded",
            Self::WorkerFailed { .. } => "WorkerFailed",
            Self::WorkerPanicked { .. } => "WorkerPanicked",
            Self::WorkerTimedOut { .. } => "WorkerTimedOut",
            Self::WorkerRetrying { .. } => "WorkerRetrying",
            Self::WorkerCancelled { .. } => "WorkerCancelled",
            Self::MonitorScheduled { .. } => "MonitorScheduled",
            Self::MonitorTick { .. } => "MonitorTick",
            Self::DeadlineExpired => "DeadlineExpired",
            Self::MonitorEscalated { .. } => "MonitorEscalated",
            Self::MonitorRestarted { .. } => "MonitorRestarted",
            Self::MonitorCancelled => "MonitorCancelled",
            Self::AbortRequested => "AbortRequested",
            Self::FinalizerStarted { .. } => "FinalizerStarted",
            Self::FinalizerFinished { .. } => "FinalizerFinished",
            Self::SessionFinished { .. } => "SessionFinished",
            Self::StoreFailed { .. } => "StoreFailed",
            Self::Recovered { .. } => "Recovered",
            Self::SessionTakenOver { .. } => "SessionTakenOver",
            Self::LeaseLost { .. } => "LeaseLost",
            Self::LeaseRenewed { .. } => "LeaseRenewed",
        }
    }
}

/// Logs written before finalizer runs were counted hold first runs.
fn first_attempt() -> u32 {
    1
}

/// The fan-out to in-process subscribers, shared by every session of a supervisor.
#[derive(Debug, Clone)]
pub struct EventBus {
    tx: broadcast::Sender<Arc<SessionEvent>>,
    /// One channel per session someone follows (see [`SessionChannels`]).
    sessions: Arc<SessionChannels>,
    /// Sessions whose log this process still writes (see [`LiveLogs`]).
    live: Arc<LiveLogs>,
}

/// The subscribers of one session's events each: a follower (an open event stream) or a
/// waiter hears only its session, never woken, nor made to fall behind, by the events of
/// every other session (on a busy server, thousands a second for each of hundreds of
/// streams). A session's channel exists while someone subscribes to it.
#[derive(Debug)]
struct SessionChannels {
    capacity: usize,
    /// How many sessions have a channel: an event is published without taking the lock
    /// when none has.
    open: std::sync::atomic::AtomicUsize,
    map: Mutex<std::collections::HashMap<SessionId, broadcast::Sender<Arc<SessionEvent>>>>,
}

impl SessionChannels {
    fn map(
        &self,
    ) -> std::sync::MutexGuard<
        '_,
        std::collections::HashMap<SessionId, broadcast::Sender<Arc<SessionEvent>>>,
    > {
        // A poisoned lock only means a panic elsewhere; the map itself is intact.
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The channel of session `id`, if someone follows it.
    fn sender(&self, id: SessionId) -> Option<broadcast::Sender<Arc<SessionEvent>>> {
        if self.open.load(std::sync::atomic::Ordering::Acquire) == 0 {
            return None;
        }
        self.map().get(&id).cloned()
    }

    fn subscribe(self: &Arc<Self>, id: SessionId) -> SessionSubscription {
        let mut map = self.map();
        let rx = match map.get(&id) {
            Some(tx) => tx.subscribe(),
            None => {
                let (tx, rx) = broadcast::channel(self.capacity);
                map.insert(id, tx);
                self.open.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
                rx
            }
        };
        SessionSubscription {
            rx: Some(rx),
            id,
            channels: Arc::downgrade(self),
        }
    }

    /// Drops session `id`'s channel if nobody subscribes to it any more.
    fn release(&self, id: SessionId) {
        let mut map = self.map();
        if map.get(&id).is_some_and(|tx| tx.receiver_count() == 0) {
            map.remove(&id);
            self.open.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
        }
    }
}

/// One session's events as they are published in this process (see
/// [`SessionChannels`]). Bounded like [`EventSubscription`]: one that falls behind is told
/// how many it missed.
#[derive(Debug)]
pub(crate) struct SessionSubscription {
    /// Always set; taken out on drop, to release the channel once it is gone.
    rx: Option<broadcast::Receiver<Arc<SessionEvent>>>,
    id: SessionId,
    channels: std::sync::Weak<SessionChannels>,
}

impl SessionSubscription {
    /// The next event of the session, or how many were lost; `Closed` once the tree is
    /// gone.
    pub(crate) async fn recv(&mut self) -> Result<Arc<SessionEvent>, RecvError> {
        let Some(rx) = self.rx.as_mut() else {
            return Err(RecvError::Closed);
        };
        rx.recv().await.map_err(|e| match e {
            broadcast::error::RecvError::Lagged(missed) => RecvError::Lagged { missed },
            broadcast::error::RecvError::Closed => RecvError::Closed,
        })
    }
}

impl Drop for SessionSubscription {
    fn drop(&mut self) {
        drop(self.rx.take());
        if let Some(channels) = self.channels.upgrade() {
            channels.release(self.id);
        }
    }
}

/// The sessions whose event log is still being written in this process: from the moment
/// an emitter is made for a session until it logs `SessionFinished` (or is dropped
/// without: its actors are gone). A session that is terminal in the store and not live
/// here has its whole log written; one that is terminal and still live is about to log
/// its `SessionFinished` (its monitor is being stopped).
#[derive(Debug, Default)]
pub(crate) struct LiveLogs {
    /// Each live session's log (see [`LiveLog`]).
    map: std::sync::Mutex<std::collections::HashMap<SessionId, Arc<LiveLog>>>,
}

/// One live log: what tells its waiters when it leaves the set (so a waiter never misses
/// an end that comes without a `SessionFinished`: an emitter dropped at shutdown; one per
/// session: a session's end wakes its own waiters, not those of every other session),
/// and what it has said so far that the session's record does not (see
/// [`LiveSignals`]).
#[derive(Debug, Default)]
pub(crate) struct LiveLog {
    left: Arc<tokio::sync::Notify>,
    escalated: std::sync::atomic::AtomicBool,
    timeouts: std::sync::atomic::AtomicU32,
    heartbeat_silences: std::sync::atomic::AtomicU32,
    lease_lost: std::sync::atomic::AtomicBool,
}

impl LiveLog {
    /// Counts what `kind` says (called by the emitter, under its lock).
    fn note(&self, kind: &EventKind) {
        use std::sync::atomic::Ordering::Relaxed;
        match kind {
            EventKind::MonitorEscalated { .. } => self.escalated.store(true, Relaxed),
            EventKind::WorkerTimedOut {
                heartbeat_silent: true,
                ..
            } => {
                let _ = self
                    .heartbeat_silences
                    .fetch_update(Relaxed, Relaxed, |n| n.checked_add(1));
            }
            EventKind::WorkerTimedOut { .. } => {
                let _ = self
                    .timeouts
                    .fetch_update(Relaxed, Relaxed, |n| n.checked_add(1));
            }
            EventKind::LeaseLost { .. } => self.lease_lost.store(true, Relaxed),
            EventKind::LeaseRenewed { .. } => self.lease_lost.store(false, Relaxed),
            _ => {}
        }
    }

    fn signals(&self) -> LiveSignals {
        use std::sync::atomic::Ordering::Relaxed;
        LiveSignals {
            escalated: self.escalated.load(Relaxed),
            timeouts: self.timeouts.load(Relaxed),
            heartbeat_silences: self.heartbeat_silences.load(Relaxed),
            lease_lost: self.lease_lost.load(Relaxed),
        }
    }
}

/// What the log of a session running in this process has said so far that its record
/// does not: the warnings an operator's "what runs now" view shows, read from memory
/// (no store I/O). Counted since this process began to write the log (its start, or its
/// takeover or resumption here). See [`crate::Supervisor::live_signals`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct LiveSignals {
    /// Its monitor escalated: the session did not finalize within `escalation_grace` of
    /// its deadline, and the root finalizes it.
    pub escalated: bool,
    /// Attempts cut by `resource_timeout` (`WorkerTimedOut` without `heartbeat_silent`).
    pub timeouts: u32,
    /// Attempts cut for a silent heartbeat (`WorkerTimedOut` with `heartbeat_silent`).
    pub heartbeat_silences: u32,
    /// This node lost its lease and the session waits (`LeaseLost` not yet followed by
    /// `LeaseRenewed`).
    pub lease_lost: bool,
}

impl LiveLogs {
    fn map(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<SessionId, Arc<LiveLog>>> {
        // A poisoned lock only means a panic elsewhere mid-insert; the map is intact.
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn insert(&self, id: SessionId) -> Arc<LiveLog> {
        Arc::clone(self.map().entry(id).or_default())
    }

    fn remove(&self, id: SessionId) {
        let removed = self.map().remove(&id);
        if let Some(log) = removed {
            log.left.notify_waiters();
        }
    }

    /// Whether this process still writes the log of `id`.
    pub(crate) fn is_live(&self, id: SessionId) -> bool {
        self.map().contains_key(&id)
    }

    /// What the live log of `id` has said so far; `None` if this process does not write it.
    pub(crate) fn signals(&self, id: SessionId) -> Option<LiveSignals> {
        self.map().get(&id).map(|log| log.signals())
    }

    /// If the log of `id` is live now: what resolves once it leaves the set after this
    /// call (armed from here on, even before it is first polled). `None` if it is not live.
    pub(crate) fn left(&self, id: SessionId) -> Option<tokio::sync::futures::OwnedNotified> {
        self.map()
            .get(&id)
            .map(|log| Arc::clone(&log.left).notified_owned())
    }
}

/// Resolves when `left` does; never without it.
pub(crate) async fn left_or_never(left: Option<tokio::sync::futures::OwnedNotified>) {
    match left {
        Some(left) => left.await,
        None => std::future::pending().await,
    }
}

impl EventBus {
    /// A bus keeping at most `capacity` events per subscriber (at least 1; the
    /// supervisor's config bounds it, see [`crate::config::MAX_EVENT_CAPACITY`]).
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.clamp(1, crate::config::MAX_EVENT_CAPACITY);
        let (tx, _) = broadcast::channel(capacity);
        Self {
            tx,
            sessions: Arc::new(SessionChannels {
                capacity,
                open: std::sync::atomic::AtomicUsize::new(0),
                map: Mutex::default(),
            }),
            live: Arc::default(),
        }
    }

    /// The sessions whose log this process still writes.
    pub(crate) fn live(&self) -> &Arc<LiveLogs> {
        &self.live
    }

    /// A new subscriber; it sees events published from now on.
    pub fn subscribe(&self) -> EventSubscription {
        EventSubscription {
            rx: self.tx.subscribe(),
        }
    }

    /// A handle that can subscribe without keeping the bus open: once the tree (the root
    /// and every session) is gone, its subscribers see [`RecvError::Closed`] instead of
    /// waiting forever.
    pub(crate) fn downgrade(&self) -> WeakEventBus {
        WeakEventBus {
            tx: self.tx.downgrade(),
            sessions: Arc::downgrade(&self.sessions),
        }
    }

    /// Whether anyone subscribes to every session's events now. (One subscribing right
    /// after this reads `false` is one that subscribed after the event: it would not have
    /// seen it either way.)
    fn listened(&self) -> bool {
        self.tx.receiver_count() > 0
    }

    fn publish(
        &self,
        event: Arc<SessionEvent>,
        session: Option<broadcast::Sender<Arc<SessionEvent>>>,
    ) {
        // An error only means nobody listens; events are in the store and in tracing anyway.
        if let Some(session) = session {
            let _ = session.send(Arc::clone(&event));
        }
        if self.listened() {
            let _ = self.tx.send(event);
        }
    }
}

/// An [`EventBus`] that does not keep it open (see [`EventBus::downgrade`]).
#[derive(Debug, Clone)]
pub(crate) struct WeakEventBus {
    tx: broadcast::WeakSender<Arc<SessionEvent>>,
    sessions: std::sync::Weak<SessionChannels>,
}

impl WeakEventBus {
    /// A subscriber of the bus, or one that is closed already if the bus is gone.
    pub(crate) fn subscribe(&self) -> EventSubscription {
        match self.tx.upgrade() {
            Some(tx) => EventSubscription { rx: tx.subscribe() },
            None => {
                let (tx, rx) = broadcast::channel(1);
                drop(tx);
                EventSubscription { rx }
            }
        }
    }

    /// A subscriber of session `id`'s events only, or one that is closed already if the
    /// bus is gone.
    pub(crate) fn subscribe_session(&self, id: SessionId) -> SessionSubscription {
        match self.sessions.upgrade() {
            Some(sessions) => sessions.subscribe(id),
            None => SessionSubscription {
                rx: None,
                id,
                channels: std::sync::Weak::new(),
            },
        }
    }
}

/// Why [`EventSubscription::recv`] returned no event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecvError {
    /// This subscriber fell behind and lost `missed` events; the next `recv` goes on.
    #[error("subscriber lagged behind and missed {missed} events")]
    Lagged {
        /// How many events were dropped for this subscriber.
        missed: u64,
    },
    /// The supervisor is gone; no more events will come.
    #[error("the event bus is closed")]
    Closed,
}

/// One subscriber's view of the event log (all sessions).
#[derive(Debug)]
pub struct EventSubscription {
    rx: broadcast::Receiver<Arc<SessionEvent>>,
}

impl EventSubscription {
    /// The next event, or how many were lost if this subscriber fell behind.
    pub async fn recv(&mut self) -> Result<Arc<SessionEvent>, RecvError> {
        self.rx.recv().await.map_err(|e| match e {
            broadcast::error::RecvError::Lagged(missed) => RecvError::Lagged { missed },
            broadcast::error::RecvError::Closed => RecvError::Closed,
        })
    }
}

/// Awaits `$work` inside `$span`, or bare when the span is disabled (no subscriber wants
/// it): entering a disabled span still costs calls on every poll, and a `log` record each
/// time when tracing's `log` feature is on. A macro, not a function: a function would move
/// the (often large) future once more, which costs more than the span saves.
macro_rules! in_span {
    ($span:expr, $work:expr) => {{
        let span: &tracing::Span = $span;
        if span.is_disabled() {
            $work.await
        } else {
            tracing::Instrument::instrument($work, span.clone()).await
        }
    }};
}
pub(crate) use in_span;

/// Runs `work` inside `span`, or bare when the span is disabled (see [`in_span!`]).
fn in_scope<T>(span: &tracing::Span, work: impl FnOnce() -> T) -> T {
    if span.is_disabled() {
        work()
    } else {
        span.in_scope(work)
    }
}

/// Emits one session's events. Cloned into every actor that speaks for the session.
#[derive(Clone)]
pub(crate) struct SessionEmitter {
    inner: Arc<EmitterInner>,
}

struct EmitterInner {
    session_id: SessionId,
    /// This node's hold on the session: every event is appended under it.
    fence: Fence,
    harvester_id: HarvesterId,
    /// Last `seq` handed out, and the clock's date; the lock also orders publication
    /// (see module docs).
    state: Mutex<EmitState>,
    bus: EventBus,
    /// This session's entry in the bus's live logs.
    live: Arc<LiveLog>,
    store: Arc<dyn SessionStore>,
    span: tracing::Span,
}

impl Drop for EmitterInner {
    fn drop(&mut self) {
        // Gone without `SessionFinished` (its actors were stopped at shutdown): nobody
        // in this process will write this log any more.
        self.bus.live.remove(self.session_id);
    }
}

impl SessionEmitter {
    pub(crate) fn new(
        session_id: SessionId,
        fence: Fence,
        harvester_id: HarvesterId,
        last_seq: u64,
        bus: EventBus,
        store: Arc<dyn SessionStore>,
    ) -> Self {
        let span = tracing::info_span!("session", %session_id, %harvester_id);
        let live = bus.live.insert(session_id);
        Self {
            inner: Arc::new(EmitterInner {
                session_id,
                fence,
                harvester_id,
                state: Mutex::new(EmitState {
                    seq: last_seq,
                    today: Today::default(),
                    finished: false,
                }),
                bus,
                live,
                store,
                span,
            }),
        }
    }

    /// This node's hold on the session (owner and epoch): every write for it carries it.
    pub(crate) fn fence(&self) -> Fence {
        self.inner.fence
    }

    /// The session's span, for instrumenting work done on its behalf.
    pub(crate) fn span(&self) -> &tracing::Span {
        &self.inner.span
    }

    /// Logs `kind` as the session's next event. After `SessionFinished` the log is closed:
    /// `SessionFinished` is always a session's last event, so anything later (a monitor
    /// tick that began before the end) is dropped here, with a debug line.
    pub(crate) fn emit(&self, kind: EventKind) {
        let inner = &self.inner;
        // A poisoned lock only means another emit panicked mid-way; the counter is intact.
        let mut state = inner.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.finished {
            in_scope(&inner.span, || {
                tracing::debug!(
                    event = kind.name(),
                    "event after SessionFinished dropped: the log is closed"
                );
            });
            return;
        }
        let finishing = matches!(kind, EventKind::SessionFinished { .. });
        match &kind {
            EventKind::SessionStarted { .. } => crate::meters::session_started(&inner.harvester_id),
            EventKind::DeadlineExpired => crate::meters::watchdog("deadline"),
            EventKind::MonitorEscalated { .. } => crate::meters::watchdog("escalation"),
            EventKind::Recovered { .. } => crate::meters::recovered(false),
            EventKind::SessionTakenOver { .. } => crate::meters::recovered(true),
            EventKind::StoreFailed { .. } => crate::meters::store_failed(),
            _ => {}
        }
        inner.live.note(&kind);
        state.seq += 1;
        let event = SessionEvent {
            seq: state.seq,
            at: state.today.now(),
            session_id: inner.session_id,
            harvester_id: inner.harvester_id.clone(),
            kind,
        };
        in_scope(&inner.span, || {
            tracing::debug!(seq = event.seq, event = event.kind.name(), detail = ?event.kind);
        });
        // The store owns the event; a shared copy is made only for subscribers (two
        // events per resource: an allocation each saved when nobody listens).
        let session = inner.bus.sessions.sender(inner.session_id);
        let shared = (session.is_some() || inner.bus.listened()).then(|| Arc::new(event.clone()));
        let seq = event.seq;
        if let Err(error) = inner.store.append_event(inner.fence, event) {
            in_scope(&inner.span, || {
                tracing::warn!(seq, %error, "could not store event");
            });
        }
        if finishing {
            state.finished = true;
            inner.bus.live.remove(inner.session_id);
        }
        if let Some(event) = shared {
            inner.bus.publish(event, session);
        }
    }
}

/// What an emitter's lock guards.
struct EmitState {
    /// Last `seq` handed out.
    seq: u64,
    today: Today,
    /// `SessionFinished` was logged: nothing more is.
    finished: bool,
}

/// The events' wall clock: [`Utc::now`], with the date of the last reading kept. chrono
/// works the date out from the day number on every call, a third of an event's clock
/// cost; events come thousands a second and the day changes once a day.
#[derive(Debug, Default)]
struct Today {
    /// Days since the Unix epoch of `date`.
    day: u64,
    date: Option<chrono::NaiveDate>,
}

impl Today {
    fn now(&mut self) -> DateTime<Utc> {
        match std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
            Ok(since) => self.at(since).unwrap_or_else(Utc::now),
            // A clock set before 1970: chrono's own path.
            Err(_) => Utc::now(),
        }
    }

    /// The time `since` the epoch, as [`DateTime::from_timestamp`] gives it; `None` past
    /// chrono's range.
    fn at(&mut self, since: Duration) -> Option<DateTime<Utc>> {
        const DAY: u64 = 86_400;
        let secs = since.as_secs();
        let day = secs / DAY;
        let date = match self.date {
            Some(date) if self.day == day => date,
            _ => {
                let midnight = DateTime::from_timestamp(i64::try_from(day * DAY).ok()?, 0)?;
                self.day = day;
                *self.date.insert(midnight.date_naive())
            }
        };
        let time = chrono::NaiveTime::from_num_seconds_from_midnight_opt(
            u32::try_from(secs % DAY).ok()?,
            since.subsec_nanos(),
        )?;
        Some(chrono::NaiveDateTime::new(date, time).and_utc())
    }
}

/// Sample events for tests across the crate.
#[cfg(test)]
pub(crate) mod samples {
    use std::time::Duration;

    use super::EventKind;
    use crate::model::{FinalizeReason, OutcomeCounts, ResourceId, SessionStatus};

    /// One event of every kind, with `text` wherever a kind holds text, `d` for durations
    /// and `n` for numbers (the durable store's line tests use text that needs escaping).
    pub(crate) fn kinds(text: &str, d: Duration, n: u32) -> Vec<EventKind> {
        let r = ResourceId::from(text);
        vec![
            EventKind::SessionStarted {
                total: n as usize,
                workflow_time: d,
                budget: crate::budget::BudgetSource::Static,
            },
            EventKind::SessionStarted {
                total: n as usize,
                workflow_time: d,
                budget: crate::budget::BudgetSource::Adaptive {
                    samples: n as usize,
                    quantile: 0.99,
                    margin: 2.5,
                    observed: d,
                    mean: d,
                    learned_estimate: d,
                    learned_timeout: Some(d),
                },
            },
            EventKind::SessionStarted {
                total: n as usize,
                workflow_time: d,
                budget: crate::budget::BudgetSource::HistoryUnavailable {
                    error: text.to_owned(),
                },
            },
            EventKind::StatusChanged {
                from: SessionStatus::Pending,
                to: SessionStatus::OnGoing,
            },
            EventKind::WorkerStarted {
                resource_id: r.clone(),
                attempt: n,
            },
            EventKind::WorkerSucceeded {
                resource_id: r.clone(),
                attempt: n,
                elapsed: d,
            },
            EventKind::WorkerFailed {
                resource_id: r.clone(),
                attempt: n,
                error: text.to_owned(),
            },
            EventKind::WorkerPanicked {
                resource_id: r.clone(),
                attempt: n,
                message: text.to_owned(),
            },
            EventKind::WorkerTimedOut {
                resource_id: r.clone(),
                attempt: n,
                heartbeat_silent: false,
            },
            EventKind::WorkerTimedOut {
                resource_id: r.clone(),
                attempt: n,
                heartbeat_silent: true,
            },
            EventKind::WorkerRetrying {
                resource_id: r.clone(),
                next_attempt: n,
                delay: d,
            },
            EventKind::WorkerCancelled {
                resource_id: r,
                attempt: n,
            },
            EventKind::MonitorTick { remaining: d },
            EventKind::DeadlineExpired,
            EventKind::MonitorCancelled,
            EventKind::FinalizerStarted {
                reason: FinalizeReason::Completed,
                attempt: n,
            },
            EventKind::SessionFinished {
                status: SessionStatus::OnGoing,
                reason: FinalizeReason::FailFast,
                total: n as usize,
                counts: OutcomeCounts::default(),
            },
            EventKind::StoreFailed {
                operation: text.to_owned(),
                error: "disk \"full\"".into(),
            },
            EventKind::MonitorScheduled {
                interval: d,
                deadline_in: d,
            },
            EventKind::MonitorEscalated {
                waiting_for: text.to_owned(),
            },
            EventKind::MonitorRestarted {
                error: text.to_owned(),
            },
            EventKind::AbortRequested,
            EventKind::FinalizerFinished {
                reason: FinalizeReason::Aborted,
                status: SessionStatus::Aborted,
                error: Some(text.to_owned()),
            },
            EventKind::Recovered {
                previous_status: SessionStatus::Aborting,
                resuming: Some(n as usize),
            },
            EventKind::SessionTakenOver {
                from_node: Some(crate::model::NodeId(uuid::Uuid::from_u128(u128::from(n)))),
                by_node: crate::model::NodeId(uuid::Uuid::from_u128(7)),
                epoch: u64::from(n),
            },
            EventKind::SessionTakenOver {
                from_node: None,
                by_node: crate::model::NodeId(uuid::Uuid::max()),
                epoch: 2,
            },
            EventKind::LeaseLost {
                node: crate::model::NodeId(uuid::Uuid::nil()),
            },
            EventKind::LeaseRenewed {
                node: crate::model::NodeId(uuid::Uuid::from_u128(3)),
            },
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kept_date_reads_as_chrono_does_across_days_and_backward_steps() {
        let mut today = Today::default();
        // Midnights, a second either side, a leap day, far dates, and the clock stepping
        // back across a day boundary (the kept date must not stick).
        let secs: [u64; 12] = [
            0,
            86_399,
            86_400,
            86_401,
            1_709_164_799, // 2024-02-28T23:59:59
            1_709_164_800, // 2024-02-29
            1_709_251_200, // 2024-03-01
            1_709_164_801,
            1_795_000_000,
            1_794_999_999,
            4_102_444_800,   // 2100-01-01
            253_402_300_799, // 9999-12-31T23:59:59
        ];
        for s in secs {
            for nanos in [0, 1, 999_999_999] {
                let since = Duration::new(s, nanos);
                let expected = i64::try_from(s)
                    .ok()
                    .and_then(|s| DateTime::from_timestamp(s, nanos));
                assert_eq!(today.at(since), expected, "{s} s {nanos} ns");
            }
        }
        let now = today.now();
        assert!((Utc::now() - now).num_seconds().abs() < 5);
    }

    #[tokio::test]
    async fn nothing_is_logged_after_session_finished() {
        let store = Arc::new(crate::store::MemoryStore::new());
        let id = SessionId::new();
        store
            .create_session(crate::store::NewSession {
                id,
                harvester_id: "h".into(),
                resources: Arc::new([]),
                started: Utc::now(),
                workflow_time: Duration::from_secs(1),
                config: Arc::default(),
                owner: crate::model::NodeId(uuid::Uuid::nil()),
            })
            .await
            .expect("create");
        let bus = EventBus::new(16);
        let mut heard = bus.subscribe();
        let fence = crate::model::Fence::new(crate::model::NodeId(uuid::Uuid::nil()));
        let emitter = SessionEmitter::new(id, fence, "h".into(), 0, bus.clone(), store.clone());
        assert!(bus.live().is_live(id));
        emitter.emit(EventKind::MonitorCancelled);
        emitter.emit(EventKind::SessionFinished {
            status: SessionStatus::FinishedAllOk,
            reason: FinalizeReason::Completed,
            total: 0,
            counts: OutcomeCounts::default(),
        });
        assert!(!bus.live().is_live(id), "the log is closed");
        // A late tick, a second end: neither stored nor published.
        emitter.emit(EventKind::MonitorTick {
            remaining: Duration::ZERO,
        });
        emitter.emit(EventKind::DeadlineExpired);
        let stored: Vec<&str> = store
            .events(id)
            .await
            .expect("events")
            .iter()
            .map(|e| e.kind.name())
            .collect();
        assert_eq!(stored, ["MonitorCancelled", "SessionFinished"]);
        let mut published = Vec::new();
        while let Ok(Ok(e)) = tokio::time::timeout(Duration::from_millis(10), heard.recv()).await {
            published.push(e.kind.name());
        }
        assert_eq!(published, ["MonitorCancelled", "SessionFinished"]);
    }

    #[test]
    fn a_dropped_emitter_leaves_the_live_logs() {
        let bus = EventBus::new(4);
        let id = SessionId::new();
        let emitter = SessionEmitter::new(
            id,
            crate::model::Fence::new(crate::model::NodeId::new()),
            "h".into(),
            0,
            bus.clone(),
            Arc::new(crate::store::MemoryStore::new()),
        );
        assert!(bus.live().is_live(id));
        drop(emitter);
        assert!(!bus.live().is_live(id));
    }

    #[tokio::test]
    async fn a_session_channel_carries_its_session_only_and_lives_while_subscribed() {
        let bus = EventBus::new(4);
        let weak = bus.downgrade();
        let store: Arc<dyn SessionStore> = Arc::new(crate::store::MemoryStore::new());
        let fence = crate::model::Fence::new(crate::model::NodeId::new());
        let (a, b) = (SessionId::new(), SessionId::new());
        let emit_a = SessionEmitter::new(a, fence, "a".into(), 0, bus.clone(), store.clone());
        let emit_b = SessionEmitter::new(b, fence, "b".into(), 0, bus.clone(), store);
        let (mut first, mut second) = (weak.subscribe_session(a), weak.subscribe_session(a));
        assert_eq!(bus.sessions.map().len(), 1, "one channel per session");
        // Far more of b's events than the channel holds: a's subscribers never lag.
        for _ in 0..100 {
            emit_b.emit(EventKind::MonitorCancelled);
        }
        emit_a.emit(EventKind::DeadlineExpired);
        for sub in [&mut first, &mut second] {
            let heard = sub.recv().await.expect("a's event");
            assert_eq!((heard.session_id, heard.seq), (a, 1));
        }
        // Gone with its last subscriber: the map never grows with finished streams.
        drop(first);
        assert_eq!(bus.sessions.map().len(), 1);
        drop(second);
        assert!(bus.sessions.map().is_empty());
        assert_eq!(
            bus.sessions.open.load(std::sync::atomic::Ordering::Acquire),
            0
        );
        // Once the bus is gone (the tree stopped), a subscriber is told so.
        let mut late = weak.subscribe_session(a);
        drop((emit_a, emit_b, bus));
        assert_eq!(late.recv().await.map(|_| ()), Err(RecvError::Closed));
        assert_eq!(
            weak.subscribe_session(b).recv().await.map(|_| ()),
            Err(RecvError::Closed)
        );
    }

    #[tokio::test]
    async fn a_live_log_wakes_its_own_waiters_when_it_leaves() {
        let bus = EventBus::new(4);
        let (a, b) = (SessionId::new(), SessionId::new());
        let make = |id| {
            SessionEmitter::new(
                id,
                crate::model::Fence::new(crate::model::NodeId::new()),
                "h".into(),
                0,
                bus.clone(),
                Arc::new(crate::store::MemoryStore::new()),
            )
        };
        let (emit_a, emit_b) = (make(a), make(b));
        let left_a = bus.live().left(a).expect("a is live");
        assert!(bus.live().left(SessionId::new()).is_none());
        let mut left_a = std::pin::pin!(left_a);
        drop(emit_b);
        assert!(
            futures::poll!(left_a.as_mut()).is_pending(),
            "b's end does not wake a's waiter"
        );
        drop(emit_a);
        assert!(futures::poll!(left_a.as_mut()).is_ready());
    }
}
