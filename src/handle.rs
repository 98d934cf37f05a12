//! [`Supervisor`]: the thin async handle an embedding server holds.
//!
//! Every method is one message to the root actor (or one store read); the handle adds no
//! state of its own, so servers that prefer actor messages can use
//! [`Supervisor::actor`] instead and lose nothing.

use std::sync::Arc;

use ractor::rpc::CallResult;
use ractor::{Actor, ActorRef, RpcReplyPort};
use tokio::task::JoinHandle;

use crate::config::{SessionConfig, SupervisorConfig};
use crate::error::{Error, SessionError, StartError};
use crate::events::{
    EventBus, EventKind, EventSubscription, LiveLogs, RecvError, SessionEvent, WeakEventBus,
};
use crate::finalizer::Deps;
use crate::harvest::{ResourceHarvester, SessionFinalizer};
use crate::model::{HarvesterId, OutcomeRecord, ResourceId, SessionId, SessionRecord};
use crate::store::{MemoryStore, SessionPage, SessionQuery, SessionStore};
use crate::supervisor::{HarvestSupervisor, SessionRequest, SupervisorArgs, SupervisorMessage};

/// Everything stored about one session (see [`Supervisor::report`]).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SessionDetail {
    /// The record.
    pub record: SessionRecord,
    /// Its outcomes (one per resource once it is terminal).
    pub outcomes: Vec<OutcomeRecord>,
    /// Its event log, by `seq`.
    pub events: Vec<SessionEvent>,
}

/// Builds a [`Supervisor`]: harvest and finalizer are required, the rest has defaults.
pub struct SupervisorBuilder {
    config: SupervisorConfig,
    store: Option<Arc<dyn SessionStore>>,
    harvester: Arc<dyn ResourceHarvester>,
    finalizer: Arc<dyn SessionFinalizer>,
}

impl SupervisorBuilder {
    /// Replaces the whole configuration.
    pub fn config(mut self, config: SupervisorConfig) -> Self {
        self.config = config;
        self
    }

    /// Uses this store (default: a fresh [`MemoryStore`]).
    pub fn store(mut self, store: Arc<dyn SessionStore>) -> Self {
        self.store = Some(store);
        self
    }

    /// Validates the config, registers this node (with its lease) in the store, spawns
    /// the root, and takes over the unfinished sessions of dead nodes (never a live
    /// node's: several processes may share a store). Returns once that first rescue pass
    /// is done: the sessions it took over are then owned by [`Supervisor::node_id`].
    pub async fn start(self) -> Result<Supervisor, Error> {
        self.config.validate()?;
        let bus = EventBus::new(self.config.event_capacity);
        let store = self
            .store
            .unwrap_or_else(|| Arc::new(MemoryStore::new()) as Arc<dyn SessionStore>);
        if let Some(work) = self.finalizer.in_completion()
            && !store.runs_in_completion(&work)
        {
            return Err(Error::Config(crate::ConfigError::new(
                "finalizer",
                "this finalizer runs inside the store's completing transaction: use it with \
                 the PostgreSQL store it was made for",
            )));
        }
        // The node's lease first: nobody may take over what it creates from then on.
        let node = Arc::new(crate::node::Node::new(&self.config));
        let gauges = Arc::new(crate::meters::Gauges::new());
        node.register(store.as_ref()).await?;
        let late = crate::finalizer::LateWrites::default();
        let deps = Arc::new(Deps {
            store: Arc::clone(&store),
            harvester: self.harvester,
            finalizer: self.finalizer,
            bus: bus.clone(),
            ticker: crate::monitor::ticker::Ticker::new(Arc::clone(&store), Arc::clone(&gauges)),
            gauges,
            store_retry_max: self.config.store_retry_max,
            finalizer_recovery: self.config.finalizer_recovery,
            node: Arc::clone(&node),
            late: late.clone(),
        });
        let shutdown_timeout = self.config.shutdown_timeout;
        let pulse = Arc::new(crate::supervisor::pulse::Pulse::new());
        let args = SupervisorArgs {
            config: self.config,
            deps,
            pulse: Arc::clone(&pulse),
        };
        let (root, join) = Actor::spawn(None, HarvestSupervisor, args)
            .await
            .map_err(|e| Error::Spawn(e.to_string()))?;
        node.spawn_lease_keeper(Arc::clone(&store), root.clone());
        // The root answers messages only once its start (the first rescue pass) is over.
        let ready = root
            .call(SupervisorMessage::Ready, None)
            .await
            .map_err(|e| Error::Spawn(e.to_string()))?;
        if !matches!(ready, CallResult::Success(())) {
            return Err(Error::SupervisorDown);
        }
        Ok(Supervisor {
            node: node.id(),
            lease: Arc::clone(&node),
            root,
            live: Arc::clone(bus.live()),
            bus: bus.downgrade(),
            store,
            join: std::sync::Mutex::new(Some(join)),
            shutdown_timeout,
            pulse,
            late,
        })
    }
}

/// What [`Supervisor::health`] answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Health {
    /// The root actor runs and takes its messages: it has not left a health check's pulse
    /// unanswered for longer than the check's bound (see [`Supervisor::health`]).
    pub alive: bool,
    /// How long the root has left the outstanding pulse unanswered (zero when none was
    /// outstanding): its queue's latency, as a health check sees it.
    pub root_unanswered_for: std::time::Duration,
    /// How long ago the last lease renewal that succeeded was sent (the store took a write
    /// of this node's then).
    pub lease_renewed_ago: std::time::Duration,
    /// Lease renewals that failed in a row since (0 when the last one succeeded).
    pub lease_failures: u32,
    /// The node self-fenced: renewals failed for so long that its lease may have expired;
    /// it starts nothing and finalizes nothing until a renewal succeeds.
    pub fenced: bool,
    /// How often the lease is renewed ([`SupervisorConfig::lease_renew_interval`]).
    pub lease_renew_interval: std::time::Duration,
    /// The store's disk is full ([`SessionStore::disk_full`]): it keeps its last room for
    /// renewals, claims and completions, so the node goes on with the sessions it runs,
    /// but no session starts (`StoreError::DiskFull`) until there is room again. Not
    /// unhealthy (restarting would not help): an operator's alert.
    pub disk_full: bool,
}

impl Health {
    /// The store takes this node's lease renewals: the last one succeeded, not more than
    /// two renewal intervals ago (a renewal that hangs counts as failing from then), and
    /// the node is not self-fenced.
    pub fn store_ok(&self) -> bool {
        self.lease_failures == 0
            && !self.fenced
            && self.lease_renewed_ago <= self.lease_renew_interval.saturating_mul(2)
    }

    /// Alive, and the store takes this node's lease renewals ([`Health::store_ok`]).
    pub fn is_healthy(&self) -> bool {
        self.alive && self.store_ok()
    }
}

/// The running supervision tree.
///
/// ```
/// use harvest_supervisor::{finalizer_fn, harvest_fn, HarvestContext, SessionStatus, Supervisor};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let supervisor = Supervisor::builder(
///     harvest_fn(|ctx: HarvestContext| async move {
///         if ctx.resource_id == "broken" {
///             return Err("remote said 500".into());
///         }
///         Ok(())
///     }),
///     finalizer_fn(|report| async move {
///         tracing::info!(status = %report.status, "harvest over");
///         Ok(())
///     }),
/// )
/// .start()
/// .await?;
///
/// let id = supervisor.start_session("my-csw", ["a", "b", "broken"]).await?;
/// let record = supervisor.wait_finished(id).await?;
/// assert_eq!(record.status, SessionStatus::FinishedSomeFailed);
/// assert_eq!(record.counts.succeeded, 2);
/// supervisor.shutdown().await?;
/// # Ok(())
/// # }
/// ```
pub struct Supervisor {
    root: ActorRef<SupervisorMessage>,
    /// This supervisor's node.
    node: crate::model::NodeId,
    /// Its lease, as the lease keeper last saw it.
    lease: Arc<crate::node::Node>,
    /// Weak, so that subscribers hear `Closed` once the tree is gone, even while a handle
    /// lives on.
    bus: WeakEventBus,
    /// The sessions whose log this process still writes (see `wait_finished`).
    live: Arc<LiveLogs>,
    store: Arc<dyn SessionStore>,
    /// The root's task, awaited once by the first `shutdown`.
    join: std::sync::Mutex<Option<JoinHandle<()>>>,
    /// See [`SupervisorConfig::shutdown_timeout`].
    shutdown_timeout: std::time::Duration,
    /// Health checks' pulses (see [`Supervisor::health`]).
    pulse: Arc<crate::supervisor::pulse::Pulse>,
    /// Outcomes a completion had to drop, still being written.
    late: crate::finalizer::LateWrites,
}

impl Supervisor {
    /// How often [`Supervisor::wait_finished`] looks at the store for an end it cannot
    /// hear of (a session another process finished).
    pub const WAIT_POLL: std::time::Duration = std::time::Duration::from_secs(1);

    /// Starts building a supervisor around the user's harvest and finalizer.
    pub fn builder(
        harvester: impl ResourceHarvester,
        finalizer: impl SessionFinalizer,
    ) -> SupervisorBuilder {
        SupervisorBuilder {
            config: SupervisorConfig::default(),
            store: None,
            harvester: Arc::new(harvester),
            finalizer: Arc::new(finalizer),
        }
    }

    /// This supervisor's node: a fresh id at every start, the owner of the sessions it
    /// starts or takes over (see [`SessionRecord::owner`]).
    pub fn node_id(&self) -> crate::model::NodeId {
        self.node
    }

    /// The root actor, for embedders that send [`SupervisorMessage`]s themselves.
    pub fn actor(&self) -> &ActorRef<SupervisorMessage> {
        &self.root
    }

    /// The store the tree writes to.
    pub fn store(&self) -> &Arc<dyn SessionStore> {
        &self.store
    }

    async fn call<T: Send + 'static>(
        &self,
        msg: impl FnOnce(RpcReplyPort<T>) -> SupervisorMessage,
    ) -> Option<T> {
        match self.root.call(msg, None).await {
            Ok(CallResult::Success(v)) => Some(v),
            _ => None,
        }
    }

    /// Starts a session of `resources` on `harvester_id` with the supervisor's default
    /// budget and policies (`SupervisorConfig::session`); [`Self::start_session_with`]
    /// gives one session its own.
    pub async fn start_session<R: Into<ResourceId>>(
        &self,
        harvester_id: impl Into<HarvesterId>,
        resources: impl IntoIterator<Item = R>,
    ) -> Result<SessionId, StartError> {
        self.start(SessionRequest::new(harvester_id, resources))
            .await
    }

    /// Starts a session of `resources` on `harvester_id` under `config` (its budget,
    /// timeouts, retries and policies) instead of the supervisor's default. The config is
    /// checked first, against the session's size too: an invalid one is
    /// [`StartError::InvalidConfig`], naming the field.
    ///
    /// ```
    /// use harvest_supervisor::{finalizer_fn, harvest_fn, SessionConfig, Supervisor};
    /// use std::time::Duration;
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let supervisor = Supervisor::builder(
    ///     harvest_fn(|_| async { Ok(()) }),
    ///     finalizer_fn(|_| async { Ok(()) }),
    /// )
    /// .start()
    /// .await?;
    /// // GeoNode's 20 s per resource is far too long for this catalogue.
    /// let budget = SessionConfig::default()
    ///     .with_per_resource_estimate(Duration::from_secs(2))
    ///     .with_buffer(Duration::from_secs(60))
    ///     .with_resource_timeout(Duration::from_secs(30));
    /// let id = supervisor
    ///     .start_session_with("csw", ["a", "b"], budget)
    ///     .await?;
    /// let record = supervisor.wait_finished(id).await?;
    /// assert_eq!(record.workflow_time, Duration::from_secs(2 * 2 + 60));
    /// supervisor.shutdown().await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn start_session_with<R: Into<ResourceId>>(
        &self,
        harvester_id: impl Into<HarvesterId>,
        resources: impl IntoIterator<Item = R>,
        config: SessionConfig,
    ) -> Result<SessionId, StartError> {
        self.start(SessionRequest::new(harvester_id, resources).with_config(config))
            .await
    }

    /// Starts a session described by `request`.
    pub async fn start(&self, request: SessionRequest) -> Result<SessionId, StartError> {
        self.call(|r| SupervisorMessage::StartSession(Box::new(request), r))
            .await
            .unwrap_or(Err(StartError::SupervisorDown))
    }

    /// Aborts a running session: workers see their cancellation token, and are stopped after
    /// `abort_grace`; the session ends `aborted`. A finished session answers
    /// [`SessionError::AlreadyFinished`] and is left as it was.
    ///
    /// ```
    /// use harvest_supervisor::{finalizer_fn, harvest_fn, HarvestContext, SessionStatus, Supervisor};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let supervisor = Supervisor::builder(
    ///     // A polite harvest: it returns as soon as the session is cancelled.
    ///     harvest_fn(|ctx: HarvestContext| async move {
    ///         ctx.cancel.cancelled().await;
    ///         Err("cancelled".into())
    ///     }),
    ///     finalizer_fn(|_| async { Ok(()) }),
    /// )
    /// .start()
    /// .await?;
    /// let id = supervisor.start_session("csw", ["a", "b"]).await?;
    /// supervisor.abort(id).await?;
    /// let record = supervisor.wait_finished(id).await?;
    /// assert_eq!(record.status, SessionStatus::Aborted);
    /// assert_eq!(record.counts.cancelled, 2);
    /// # supervisor.shutdown().await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn abort(&self, id: SessionId) -> Result<(), SessionError> {
        self.call(|r| SupervisorMessage::AbortSession(id, r))
            .await
            .unwrap_or(Err(SessionError::SupervisorDown))
    }

    /// One session's record, from the store: `UnknownSession` if there is none. Like every
    /// read of the handle (`sessions`, `active_session`, `history`, `report`, `events`,
    /// `outcomes`, `wait_finished` for a finished session), it answers after
    /// [`Supervisor::shutdown`] too; what needs the tree (`start`, `abort`) answers
    /// `SupervisorDown` then.
    pub async fn session(&self, id: SessionId) -> Result<SessionRecord, SessionError> {
        Ok(self.store.session(id).await?)
    }

    /// Every session, newest first, from the store (also after shutdown).
    pub async fn sessions(&self) -> Result<Vec<SessionRecord>, SessionError> {
        Ok(self.store.list_sessions().await?)
    }

    /// The session that holds `harvester` busy now (started and not yet finalized, by
    /// this process or another on the same store), if any: a start for it would answer
    /// `HarvesterBusy`. From the store (also after shutdown).
    ///
    /// ```
    /// # use harvest_supervisor::{finalizer_fn, harvest_fn, HarvestContext, Supervisor};
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let supervisor = Supervisor::builder(
    ///     harvest_fn(|_: HarvestContext| std::future::pending()),
    ///     finalizer_fn(|_| async { Ok(()) }),
    /// )
    /// .start()
    /// .await?;
    /// assert!(supervisor.active_session("csw").await?.is_none());
    /// let id = supervisor.start_session("csw", ["slow"]).await?;
    /// let busy = supervisor.active_session("csw").await?.expect("busy");
    /// assert_eq!(busy.id, id);
    /// supervisor.abort(id).await?;
    /// supervisor.wait_finished(id).await?;
    /// assert!(supervisor.active_session("csw").await?.is_none(), "free again");
    /// # supervisor.shutdown().await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn active_session(
        &self,
        harvester: impl Into<crate::model::HarvesterId>,
    ) -> Result<Option<SessionRecord>, SessionError> {
        let harvester = harvester.into();
        let Some(id) = self.store.active_session(&harvester).await? else {
            return Ok(None);
        };
        match self.store.session(id).await {
            Ok(record) => Ok(Some(record)),
            // Gone between the two reads cannot happen (sessions are never deleted), but a
            // store that says so is not a busy harvester.
            Err(crate::StoreError::UnknownSession { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Whether the supervision tree answers: `Ok` once its root has read every message sent
    /// before this one, `SupervisorDown` if it has stopped. The root does no store I/O in
    /// its handler (starts, aborts and reads run in tasks of their own), so neither a slow
    /// store nor a burst of starts delays the answer; wrap it in a timeout to detect a
    /// wedged tree.
    pub async fn ping(&self) -> Result<(), SessionError> {
        self.call(SupervisorMessage::Ready)
            .await
            .ok_or(SessionError::SupervisorDown)
    }

    /// The health of this supervisor for a health check, at once (no store I/O, and no
    /// waiting in the root's queue): whether the root runs and takes its messages, and how
    /// its lease in the store fares.
    ///
    /// The root is asked with a pulse, sent when none is outstanding; the answer is how
    /// long the outstanding one has waited ([`Health::root_unanswered_for`]): not alive
    /// once that is longer than `within`, or once the root is gone. So a busy root (a
    /// burst of starts queued ahead) is alive, and a wedged one is reported by the checks
    /// that come more than `within` after the first unanswered pulse (a health check
    /// polled every few seconds sees it one period later). [`Supervisor::ping`] waits for
    /// the root's answer instead.
    ///
    /// The lease is renewed by a write every [`SupervisorConfig::lease_renew_interval`]; a
    /// store that refuses it (unreachable, full disk) shows at the next renewal, one that
    /// hangs once the last success is more than two intervals old: without a health check
    /// adding store I/O of its own or queueing behind the sessions' reads.
    ///
    /// ```
    /// # use harvest_supervisor::{finalizer_fn, harvest_fn, HarvestContext, Supervisor};
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let supervisor = Supervisor::builder(
    /// #     harvest_fn(|_: HarvestContext| async { Ok(()) }),
    /// #     finalizer_fn(|_| async { Ok(()) }),
    /// # ).start().await?;
    /// let health = supervisor.health(std::time::Duration::from_secs(2));
    /// assert!(health.is_healthy());
    /// assert_eq!(health.lease_failures, 0);
    /// # supervisor.shutdown().await?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn health(&self, within: std::time::Duration) -> Health {
        let running = matches!(self.root.get_status(), ractor::ActorStatus::Running);
        let waited = self
            .pulse
            .check(|| self.root.send_message(SupervisorMessage::Pulse).is_ok());
        let (renewed_ago, failures, fenced, interval) = self.lease.lease();
        Health {
            alive: running && waited.is_some_and(|waited| waited <= within),
            root_unanswered_for: waited.unwrap_or_default(),
            lease_renewed_ago: renewed_ago,
            lease_failures: failures,
            fenced,
            lease_renew_interval: interval,
            disk_full: self.store.disk_full(),
        }
    }

    /// What the log of session `id` has said so far that its record does not (escalation,
    /// attempts cut by a time limit or a silent heartbeat, a lost lease), if this process
    /// runs it: from memory, for an operator's "what runs now" view without reading each
    /// running session's log. `None` if this process does not write its log (not started
    /// or taken over here, or already finished): read its events instead.
    ///
    /// ```
    /// # use harvest_supervisor::{finalizer_fn, harvest_fn, HarvestContext, Supervisor};
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let supervisor = Supervisor::builder(
    ///     harvest_fn(|_: HarvestContext| std::future::pending()),
    ///     finalizer_fn(|_| async { Ok(()) }),
    /// )
    /// .start()
    /// .await?;
    /// let id = supervisor.start_session("csw", ["slow"]).await?;
    /// let signals = supervisor.live_signals(id).expect("runs here");
    /// assert_eq!((signals.timeouts, signals.escalated), (0, false));
    /// supervisor.abort(id).await?;
    /// supervisor.wait_finished(id).await?;
    /// assert!(supervisor.live_signals(id).is_none(), "over");
    /// # supervisor.shutdown().await?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn live_signals(&self, id: SessionId) -> Option<crate::events::LiveSignals> {
        self.live.signals(id)
    }

    /// A page of history for an admin page: newest first, by harvester and/or status.
    pub async fn history(&self, query: &SessionQuery) -> Result<SessionPage, SessionError> {
        Ok(self.store.query_sessions(query).await?)
    }

    /// One session's full report: its record, its outcomes and its event log.
    pub async fn report(&self, id: SessionId) -> Result<SessionDetail, SessionError> {
        Ok(SessionDetail {
            record: self.store.session(id).await?,
            outcomes: self.store.outcomes(id).await?,
            events: self.store.events(id).await?,
        })
    }

    /// The config session `id` runs (or ran) under, as applied: a learned budget's values
    /// in its fields, and how they were chosen in
    /// [`SessionConfig::budget_source`](crate::SessionConfig::budget_source). `None` for a
    /// session stored without one (by a version that did not keep it).
    ///
    /// ```
    /// use harvest_supervisor::{finalizer_fn, harvest_fn, BudgetSource, Supervisor};
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let supervisor = Supervisor::builder(
    ///     harvest_fn(|_| async { Ok(()) }),
    ///     finalizer_fn(|_| async { Ok(()) }),
    /// )
    /// .start()
    /// .await?;
    /// let id = supervisor.start_session("csw", ["a"]).await?;
    /// let config = supervisor.session_config(id).await?.expect("kept");
    /// assert_eq!(config.budget_source(), &BudgetSource::Static);
    /// # supervisor.shutdown().await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn session_config(
        &self,
        id: SessionId,
    ) -> Result<Option<crate::SessionConfig>, SessionError> {
        Ok(self.store.session_config(id).await?)
    }

    /// The outcomes recorded for a session (all of them, reconciled, once it is terminal).
    pub async fn outcomes(&self, id: SessionId) -> Result<Vec<OutcomeRecord>, SessionError> {
        Ok(self.store.outcomes(id).await?)
    }

    /// A page of a session's outcomes (`limit` from `offset`) and how many there are in all.
    pub async fn outcomes_page(
        &self,
        id: SessionId,
        offset: usize,
        limit: usize,
    ) -> Result<(Vec<OutcomeRecord>, usize), SessionError> {
        Ok(self.store.outcomes_page(id, offset, limit).await?)
    }

    /// A session's stored event log, whole. A long one (two events per resource) is better
    /// read page by page with [`Supervisor::events_after`]. What is stored depends on the
    /// store: the durable ones keep every event; [`MemoryStore`] keeps the newest
    /// [`MemoryStore::DEFAULT_EVENT_LIMIT`] (100,000) per session by default
    /// ([`MemoryStore::with_event_limit`]), so a longer log read from it starts later
    /// than `seq` 1.
    pub async fn events(&self, id: SessionId) -> Result<Vec<SessionEvent>, SessionError> {
        Ok(self.store.events(id).await?)
    }

    /// A page of a session's stored event log: up to `limit` events (at most
    /// [`crate::store::MAX_EVENT_PAGE`]) with a `seq` above `after`. Start at 0, go on from
    /// the last `seq` of each page; an empty page is the end of what is logged so far.
    /// Each page is one short read: a reader of a huge log never holds it whole, nor a
    /// store connection for all of it.
    pub async fn events_after(
        &self,
        id: SessionId,
        after: u64,
        limit: usize,
    ) -> Result<Vec<SessionEvent>, SessionError> {
        Ok(self.store.events_after(id, after, limit).await?)
    }

    /// Follows one session's event log: the stored events after `after` (0: from the
    /// start), then each new one as it is appended, until `SessionFinished`, whichever
    /// process runs the session (see [`EventFollower`](crate::EventFollower)). The follower holds no store
    /// connection between reads, and reads the store only when there may be something new.
    ///
    /// ```
    /// # use harvest_supervisor::{Supervisor, finalizer_fn, harvest_fn, EventKind};
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let supervisor = Supervisor::builder(
    /// #     harvest_fn(|_| async { Ok(()) }),
    /// #     finalizer_fn(|_| async { Ok(()) }),
    /// # ).start().await?;
    /// let id = supervisor.start_session("csw", ["a", "b"]).await?;
    /// let mut log = supervisor.follow(id, 0);
    /// let mut last = None;
    /// while let Some(event) = log.next().await {
    ///     last = Some(event?.kind);
    /// }
    /// assert!(matches!(last, Some(EventKind::SessionFinished { .. })));
    /// # supervisor.shutdown().await?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn follow(&self, id: SessionId, after: u64) -> crate::follow::EventFollower {
        crate::follow::EventFollower::new(
            id,
            after,
            Arc::clone(&self.store),
            Arc::clone(&self.live),
            self.bus.subscribe_session(id),
        )
    }

    /// Follows the event log of every session from now on. Subscribers are bounded
    /// ([`crate::SupervisorConfig::event_capacity`]): one that falls behind gets
    /// [`RecvError::Lagged`] with the number it missed, and never slows the tree.
    ///
    /// ```
    /// use harvest_supervisor::{finalizer_fn, harvest_fn, EventKind, Supervisor};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let supervisor = Supervisor::builder(
    ///     harvest_fn(|_| async { Ok(()) }),
    ///     finalizer_fn(|_| async { Ok(()) }),
    /// )
    /// .start()
    /// .await?;
    /// let mut events = supervisor.subscribe();
    /// let id = supervisor.start_session("csw", ["a"]).await?;
    /// loop {
    ///     let event = events.recv().await?;
    ///     println!("{}", serde_json::to_string(&*event)?); // JSON lines
    ///     if event.session_id == id && matches!(event.kind, EventKind::SessionFinished { .. }) {
    ///         break;
    ///     }
    /// }
    /// # supervisor.shutdown().await?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn subscribe(&self) -> EventSubscription {
        self.bus.subscribe()
    }

    /// Waits until the session is over, and returns its terminal record: its finalizer
    /// done, its harvester free, and (for a session this process ran) its log complete,
    /// `SessionFinished` last.
    ///
    /// It decides from the session's status in the store, so it returns at once for a
    /// session that is already terminal, whatever its log holds, and it wakes for a
    /// session that another supervisor finished on the same store (another process on
    /// the same database): this one's events wake it at once; another's too on a store
    /// that announces them (PostgreSQL), else within [`Supervisor::WAIT_POLL`].
    /// `SupervisorDown` if this supervisor stops first with the session still unfinished.
    pub async fn wait_finished(&self, id: SessionId) -> Result<SessionRecord, SessionError> {
        // Subscribed before the first read, so no end between the two is missed.
        let mut events = self.bus.subscribe_session(id);
        let mut signals = self.store.signals();
        let now = tokio::time::Instant::now();
        let first = now.checked_add(Self::WAIT_POLL).unwrap_or(now);
        let mut poll = tokio::time::interval_at(first, Self::WAIT_POLL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // Armed before looking, so that a log leaving the live set after the look
            // (its `SessionFinished`, or its emitter dropped) wakes this wait.
            let armed = self.live.left(id);
            let record = self.store.session(id).await?;
            // Terminal and no longer logged here: its `SessionFinished` is written (or
            // another process wrote the end).
            let live = self.live.is_live(id);
            if record.status.is_terminal() && !live {
                return Ok(record);
            }
            if live && armed.is_none() {
                // Logged here since it was armed (resumed in this process): arm again.
                continue;
            }
            let left = crate::events::left_or_never(armed);
            tokio::pin!(left);
            // Wait for something that can change the answer: this session's end, lost
            // events, or (for a session another process runs: this one's bus never
            // carries its end) the store's announcement of new events for it, or, when
            // the store makes none, the next look at the store.
            let listening = crate::follow::listening(&signals);
            loop {
                tokio::select! {
                    received = events.recv() => match received {
                        Ok(e) if e.session_id == id
                            && matches!(e.kind, EventKind::SessionFinished { .. }) => break,
                        Ok(_) => {}
                        Err(RecvError::Lagged { .. }) => break,
                        Err(RecvError::Closed) => {
                            let record = self.store.session(id).await?;
                            return if record.status.is_terminal() {
                                Ok(record)
                            } else {
                                Err(SessionError::SupervisorDown)
                            };
                        }
                    },
                    wake = crate::follow::store_wake(&mut signals, id), if !live => {
                        if matches!(wake, crate::follow::Wake::Look) {
                            break;
                        }
                    }
                    _ = poll.tick(), if !live && !listening => break,
                    () = &mut left, if live => break,
                }
            }
        }
    }

    /// Finalizes every running session with `Shutdown` and stops the tree. Takes `&self`,
    /// so a server can call it while request handlers still hold the handle; calls after
    /// the first return at once.
    ///
    /// Returns within [`SupervisorConfig::shutdown_timeout`] (and a few seconds' grace if
    /// the root itself is stuck): a session that has not finished by then is left, as a
    /// crash would leave it, to the rescue (the next start's, or a live node's).
    pub async fn shutdown(&self) -> Result<(), Error> {
        let bound = self.shutdown_timeout.saturating_add(Self::SHUTDOWN_GRACE);
        let answered = self
            .root
            .call(SupervisorMessage::Shutdown, Some(bound))
            .await;
        if !matches!(answered, Ok(CallResult::Success(()))) {
            // Busy past its own deadline, or gone: stop it (a no-op if gone).
            self.root.kill();
        }
        // Take the handle out before awaiting: the lock is never held across an await.
        let join = self.join.lock().ok().and_then(|mut j| j.take());
        if let Some(join) = join {
            match tokio::time::timeout(Self::SHUTDOWN_GRACE, join).await {
                Ok(joined) => joined.map_err(|_| Error::SupervisorDown)?,
                Err(_) => {
                    tracing::error!("the supervisor did not stop in time; leaving it");
                    return Err(Error::SupervisorDown);
                }
            }
        }
        // Outcomes a completion had to drop: one last try each (the tree is gone: no new
        // ones come), bounded.
        self.late.finish(Self::SHUTDOWN_GRACE).await;
        // End the lease now, not whenever the lease keeper gets to it: what shutdown left
        // unfinished can be taken over at once by another node, even if this process
        // exits right away.
        let release = self.store.release_node(self.node);
        match tokio::time::timeout(Self::SHUTDOWN_GRACE, release).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::warn!(%error, "could not end this node's lease"),
            Err(_) => tracing::warn!("ending this node's lease timed out"),
        }
        Ok(())
    }

    /// What [`Supervisor::shutdown`] allows the root beyond `shutdown_timeout`.
    const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(5);
}
