//! `HarvestSupervisor`: the root actor, one per process.
//!
//! It validates and starts sessions (the store's busy lock makes "one active session per
//! harvester" atomic), routes aborts, answers queries from the store, and is the rescuer of
//! last resort: when a SessionActor dies without having finalized, or a monitor escalates a
//! stuck one, the root stops it and finalizes the session from the store in a task of its
//! own, so that a stuck finalizer can never block the root. At start it recovers sessions an
//! earlier process left unfinished, and then, every `rescue_interval`, those of any node
//! whose lease expired (see `supervisor/recovery.rs`).

pub(crate) mod messages;
pub(crate) mod pulse;
mod recovery;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::Instrument;

use crate::config::SupervisorConfig;
use crate::error::{SessionError, StartError};
use crate::events::{EventKind, SessionEmitter};
use crate::finalizer::{self, Deps, Finalized, Lifecycle, Local, Mode};
use crate::model::{FinalizeReason, SessionId, SessionStatus};
use crate::session::{
    STOP_FINALIZED, STOP_TAKEN_OVER, SessionActor, SessionMessage, SessionShared, abort_answer,
};
use crate::store::NewSession;
pub use messages::{CreatedSession, RescuedSessions, SessionRequest, SupervisorMessage};

/// The root actor.
pub(crate) struct HarvestSupervisor;

/// What the root is started with.
pub(crate) struct SupervisorArgs {
    pub(crate) config: SupervisorConfig,
    pub(crate) deps: Arc<Deps>,
    /// Health checks' pulses, answered by the root.
    pub(crate) pulse: Arc<pulse::Pulse>,
}

/// A session whose actor is alive.
struct Running {
    actor: ActorRef<SessionMessage>,
    shared: Arc<SessionShared>,
    /// The root has stopped this actor and is finalizing the session itself.
    forcing: bool,
}

/// Mutable data of the root.
pub(crate) struct RootState {
    config: SupervisorConfig,
    deps: Arc<Deps>,
    sessions: HashMap<SessionId, Running>,
    by_actor: HashMap<ActorId, SessionId>,
    /// Finalizations the root runs itself; waited for on shutdown (up to its timeout).
    forced: Vec<JoinHandle<()>>,
    /// While shutting down: the replies to send once every session is gone.
    shutdown: Vec<RpcReplyPort<()>>,
    /// Shutting down: no new session starts.
    stopping: bool,
    /// Sessions whose creation is in flight (in tasks), with the aborts asked for them
    /// meanwhile (answered once the session runs, or its creation failed). A shutdown
    /// waits for them, up to its deadline.
    creating: HashMap<SessionId, Vec<RpcReplyPort<Result<(), SessionError>>>>,
    /// The shutdown deadline passed: what is still being created is left to the rescue.
    abandoned: bool,
    /// A rescue pass runs (in a task): no second one starts, a shutdown waits for it.
    rescuing: bool,
    /// The root itself, for the tasks it spawns to report back.
    root: ActorRef<SupervisorMessage>,
    /// Health checks' pulses (see [`pulse::Pulse`]).
    pulse: Arc<pulse::Pulse>,
    /// The starts' turns (`max_concurrent_starts`); closed at shutdown, which refuses
    /// the starts still waiting, and whenever the root's state goes (see [`Turns`]).
    starts: Turns,
}

/// The starts' turns, closed when dropped: a root that dies without a shutdown (killed
/// when it did not answer one in time, a panic) drops its state, and the starts still
/// waiting are refused rather than creating sessions nobody will run.
struct Turns(Arc<tokio::sync::Semaphore>);

impl Drop for Turns {
    fn drop(&mut self) {
        self.0.close();
    }
}

impl Actor for HarvestSupervisor {
    type Msg = SupervisorMessage;
    type State = RootState;
    type Arguments = SupervisorArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: SupervisorArgs,
    ) -> Result<RootState, ActorProcessingErr> {
        let starts = Turns(Arc::new(tokio::sync::Semaphore::new(
            args.config.max_concurrent_starts.max(1),
        )));
        Ok(RootState {
            starts,
            config: args.config,
            deps: args.deps,
            sessions: HashMap::new(),
            by_actor: HashMap::new(),
            forced: Vec::new(),
            shutdown: Vec::new(),
            stopping: false,
            creating: HashMap::new(),
            abandoned: false,
            rescuing: false,
            root: myself,
            pulse: args.pulse,
        })
    }

    async fn post_start(
        &self,
        myself: ActorRef<Self::Msg>,
        state: &mut RootState,
    ) -> Result<(), ActorProcessingErr> {
        // Start-up recovery is the first rescue pass, awaited (the supervisor is ready once
        // it is over); the next come on a timer, in tasks.
        let mut found = Vec::new();
        recovery::pass(recovery::PassInput::of(state), |batch| found.extend(batch)).await;
        for recovered in found {
            recovery::apply(&myself, state, recovered).await;
        }
        schedule_rescue(&myself, &state.config);
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: SupervisorMessage,
        state: &mut RootState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            SupervisorMessage::StartSession(request, reply) => {
                if state.stopping {
                    let _ = reply.send(Err(StartError::SupervisorDown));
                } else if state.deps.node.is_fenced() {
                    // Its lease may be gone: it must not take a harvester's busy lock.
                    let node = state.deps.node.id();
                    let _ = reply.send(Err(StartError::Store(
                        crate::error::StoreError::LeaseExpired { node },
                    )));
                } else {
                    spawn_start(&myself, state, *request, reply);
                }
            }
            SupervisorMessage::SessionCreated(created) => {
                let CreatedSession {
                    session,
                    reply,
                    admitted,
                } = *created;
                let id = session.id;
                let aborts = state.creating.remove(&id).unwrap_or_default();
                let shared = session_shared(
                    &myself,
                    state,
                    id,
                    session.harvester_id,
                    session.resources,
                    session.config,
                    session.emitter,
                    false,
                );
                let answer = spawn_session(&myself, state, shared)
                    .await
                    .map(|()| id)
                    .map_err(|message| StartError::Spawn {
                        session_id: id,
                        message,
                    });
                // Its actor runs (or could not be spawned): the next start's turn.
                drop(admitted);
                if state.stopping
                    && let Some(running) = state.sessions.get(&id)
                {
                    // Created while the supervisor began to stop: it ends `shutdown` too
                    // (bounded by the shutdown's deadline, as every session).
                    let _ = running.actor.send_message(SessionMessage::Shutdown);
                }
                let _ = reply.send(answer);
                // Aborts asked while it was created take the usual way now.
                for abort in aborts {
                    abort_session(state, id, abort);
                }
                finish_shutdown_if_idle(&myself, state);
            }
            SupervisorMessage::StartFailed { session_id } => {
                if let Some(aborts) = state.creating.remove(&session_id) {
                    for abort in aborts {
                        abort_session(state, session_id, abort);
                    }
                }
                finish_shutdown_if_idle(&myself, state);
            }
            SupervisorMessage::AbortSession(id, reply) => abort_session(state, id, reply),
            // Store reads, answered in tasks: never queued behind the root's work.
            SupervisorMessage::GetSession(id, reply) => {
                let store = Arc::clone(&state.deps.store);
                tokio::spawn(async move {
                    let _ = reply.send(store.session(id).await.map_err(Into::into));
                });
            }
            SupervisorMessage::ListSessions(reply) => {
                let store = Arc::clone(&state.deps.store);
                tokio::spawn(async move {
                    let _ = reply.send(store.list_sessions().await.map_err(Into::into));
                });
            }
            SupervisorMessage::Escalate { session_id } => {
                // A session that completed since its monitor decided needs no rescue.
                let done = state
                    .sessions
                    .get(&session_id)
                    .is_some_and(|r| r.shared.lifecycle.is_terminal());
                if !done {
                    force(state, session_id, FinalizeReason::DeadlineExpired);
                }
            }
            SupervisorMessage::Shutdown(reply) => {
                state.shutdown.push(reply);
                if !state.stopping {
                    state.stopping = true;
                    // The starts still waiting for their turn are refused.
                    state.starts.0.close();
                    for running in state.sessions.values() {
                        let _ = running.actor.send_message(SessionMessage::Shutdown);
                    }
                    myself.send_after(state.config.shutdown_timeout, || {
                        SupervisorMessage::ShutdownDeadline
                    });
                }
                finish_shutdown_if_idle(&myself, state);
            }
            SupervisorMessage::ShutdownDeadline => abandon(&myself, state),
            SupervisorMessage::Ready(reply) => {
                let _ = reply.send(());
            }
            SupervisorMessage::Pulse => state.pulse.answered(),
            SupervisorMessage::Fenced(true) => {
                for running in state.sessions.values().filter(|r| !r.forcing) {
                    let _ = running.actor.send_message(SessionMessage::LeaseLost);
                }
            }
            SupervisorMessage::Fenced(false) => {
                // It owns only what it still holds: those taken over meanwhile stop, and
                // never start an attempt again; the others go on. The store is asked in a
                // task (never in the root's handler).
                let deps = Arc::clone(&state.deps);
                let running = recovery::running_of(state);
                tokio::spawn(async move {
                    recovery::stop_sessions_taken_over(&deps, running, true).await;
                });
            }
            SupervisorMessage::Rescue => {
                if !state.stopping && !state.rescuing {
                    state.rescuing = true;
                    let input = recovery::PassInput::of(state);
                    let root = myself.clone();
                    tokio::spawn(async move {
                        // Told when the pass ends however it ends.
                        let _done = RescueDone(root.clone());
                        recovery::pass(input, |batch| {
                            let _ = root.send_message(SupervisorMessage::Rescued(Box::new(
                                RescuedSessions(batch),
                            )));
                        })
                        .await;
                    });
                }
            }
            SupervisorMessage::Rescued(rescued) => {
                for recovered in rescued.0 {
                    recovery::apply(&myself, state, recovered).await;
                }
            }
            SupervisorMessage::RescuePassEnded => {
                state.rescuing = false;
                if !state.stopping {
                    schedule_rescue(&myself, &state.config);
                }
                finish_shutdown_if_idle(&myself, state);
            }
            SupervisorMessage::RescueFinished { .. } => finish_shutdown_if_idle(&myself, state),
        }
        Ok(())
    }

    // Never the default: it would stop the root whenever a session ends.
    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        state: &mut RootState,
    ) -> Result<(), ActorProcessingErr> {
        let (cell, finalized) = match &event {
            SupervisionEvent::ActorTerminated(cell, _, reason) => {
                // Finalized, or taken over by another node: nothing for this one to do.
                let done = matches!(reason.as_deref(), Some(STOP_FINALIZED | STOP_TAKEN_OVER));
                (cell, done)
            }
            SupervisionEvent::ActorFailed(cell, error) => {
                tracing::error!(actor = %cell.get_id(), %error, "session actor failed");
                (cell, false)
            }
            _ => return Ok(()),
        };
        let Some(id) = state.by_actor.remove(&cell.get_id()) else {
            return Ok(());
        };
        if let Some(running) = state.sessions.get(&id)
            && !finalized
            && !running.forcing
        {
            // Died (panic, kill, store failure) before finalizing: finalize from the store.
            force(state, id, FinalizeReason::SessionCrashed);
        }
        state.sessions.remove(&id);
        finish_shutdown_if_idle(&myself, state);
        Ok(())
    }
}

/// Starts a session in a task: validated and written there, so that the root's queue
/// (aborts, queries, health checks, other starts) never waits for a store write. The root
/// is told when it is created (to spawn its actor) or failed.
fn spawn_start(
    myself: &ActorRef<SupervisorMessage>,
    state: &mut RootState,
    request: SessionRequest,
    reply: RpcReplyPort<Result<SessionId, StartError>>,
) {
    // The id is the root's from now: an abort for it (its `SessionStarted` may be seen
    // before the root spawns it) waits for the session instead of finding it nowhere.
    let id = SessionId::new();
    state.creating.insert(id, Vec::new());
    let deps = Arc::clone(&state.deps);
    let default = state.config.session.clone();
    let root = myself.clone();
    let starts = Arc::clone(&state.starts.0);
    tokio::spawn(async move {
        // Tells the root the creation failed however the task ends without a session
        // (an error, or a store that panicked): it never waits for it for ever.
        let mut failed = StartFailedGuard(Some((root.clone(), id)));
        // A request that cannot start is refused at once, without waiting for a turn.
        let (config, request) = match checked(default, request) {
            Ok(checked) => checked,
            Err(error) => {
                let _ = reply.send(Err(error));
                return;
            }
        };
        // Then its turn (`max_concurrent_starts`): a burst of starts queues here (in about
        // the order they came: tokio's semaphore is fair to its waiters), instead of
        // taking the whole process from the running sessions.
        let waiting = tokio::time::Instant::now();
        let Ok(admitted) = starts.acquire_owned().await else {
            // Closed: the supervisor is shutting down (or its root is gone).
            let _ = reply.send(Err(StartError::SupervisorDown));
            return;
        };
        crate::meters::start_waited(waiting.elapsed());
        if reply.is_closed() {
            // Its caller gave up while it waited (a client gone, a dropped future): no
            // session nobody asked for any more (its turn goes to the next).
            return;
        }
        match create_session(&deps, config, request, id).await {
            Ok(session) => {
                failed.0 = None;
                let created = Box::new(CreatedSession {
                    session,
                    reply,
                    admitted,
                });
                if let Err(ractor::MessagingErr::SendErr(SupervisorMessage::SessionCreated(c))) =
                    root.send_message(SupervisorMessage::SessionCreated(created))
                {
                    // The root is gone: the session stays for the rescue (the next
                    // start's, or a live node's).
                    let _ = c.reply.send(Err(StartError::SupervisorDown));
                }
            }
            Err(error) => {
                let _ = reply.send(Err(error));
            }
        }
    });
}

/// Sends `StartFailed` when dropped armed.
struct StartFailedGuard(Option<(ActorRef<SupervisorMessage>, SessionId)>);

impl Drop for StartFailedGuard {
    fn drop(&mut self) {
        if let Some((root, session_id)) = self.0.take() {
            let _ = root.send_message(SupervisorMessage::StartFailed { session_id });
        }
    }
}

/// The request's config (its own, or the default) and the request, if they can start:
/// the config valid for its resources, every id well formed, no resource twice.
fn checked(
    default: crate::config::SessionConfig,
    mut request: SessionRequest,
) -> Result<(crate::config::SessionConfig, SessionRequest), StartError> {
    let config = request.config.take().unwrap_or(default);
    config.validate_for(request.resources.len())?;
    request.harvester_id.check()?;
    let mut seen = HashSet::with_capacity(request.resources.len());
    for r in &request.resources {
        r.check()?;
        if !seen.insert(r) {
            return Err(StartError::DuplicateResource {
                resource_id: r.clone(),
            });
        }
    }
    drop(seen);
    Ok((config, request))
}

/// Creates a checked request's session in the store (the busy lock there decides
/// between concurrent starts for one harvester), its budget chosen first. Runs in a task
/// of its own; the root spawns the session's actor when it is told.
async fn create_session(
    deps: &Arc<Deps>,
    config: crate::config::SessionConfig,
    request: SessionRequest,
    id: SessionId,
) -> Result<Created, StartError> {
    // The budget: static, or learned from the harvester's history (one read, here in the
    // start's task, never in the root).
    let history = match &config.adaptive {
        // A harvester that is busy now is refused by `create_session` below: no history
        // read for a start that cannot succeed (a loop of such starts would load the
        // store with reads of up to `window` durations each).
        Some(_)
            if matches!(
                deps.store.active_session(&request.harvester_id).await,
                Ok(Some(_))
            ) =>
        {
            Ok(Vec::new())
        }
        Some(adaptive) => deps
            .store
            .recent_durations(&request.harvester_id, adaptive.window)
            .await
            .map_err(|e| {
                tracing::warn!(harvester = %request.harvester_id, error = %e,
                    "the history of durations could not be read: the static budget applies");
                e.to_string()
            }),
        None => Ok(Vec::new()),
    };
    let config = Arc::new(crate::budget::choose(
        config,
        request.resources.len(),
        history,
    ));
    if deps.node.is_fenced() {
        // It self-fenced since the root looked: its lease may be gone.
        return Err(StartError::Store(crate::error::StoreError::LeaseExpired {
            node: deps.node.id(),
        }));
    }

    let total = request.resources.len();
    let workflow_time = config.workflow_time(total);
    let resources: Arc<[_]> = request.resources.into();
    deps.store
        .create_session(NewSession {
            id,
            harvester_id: request.harvester_id.clone(),
            resources: Arc::clone(&resources),
            started: chrono::Utc::now(),
            workflow_time,
            config: Arc::clone(&config),
            owner: deps.node.id(),
        })
        .await?;
    let emitter = SessionEmitter::new(
        id,
        crate::model::Fence::new(deps.node.id()),
        request.harvester_id.clone(),
        0,
        deps.bus.clone(),
        Arc::clone(&deps.store),
    );
    emitter.emit(EventKind::SessionStarted {
        total,
        workflow_time,
        budget: config.budget_source().clone(),
    });
    Ok(Created {
        id,
        harvester_id: request.harvester_id,
        resources,
        config,
        emitter,
    })
}

/// A session created in the store, its actor not spawned yet.
pub(crate) struct Created {
    id: SessionId,
    harvester_id: crate::model::HarvesterId,
    resources: Arc<[crate::model::ResourceId]>,
    config: Arc<crate::config::SessionConfig>,
    emitter: SessionEmitter,
}

/// What a new session actor is spawned with; its deadline counts from now.
#[allow(clippy::too_many_arguments)]
fn session_shared(
    myself: &ActorRef<SupervisorMessage>,
    state: &RootState,
    id: SessionId,
    harvester_id: crate::model::HarvesterId,
    resources: Arc<[crate::model::ResourceId]>,
    config: Arc<crate::config::SessionConfig>,
    emitter: SessionEmitter,
    resumed: bool,
) -> Arc<SessionShared> {
    let now = Instant::now();
    // A resumed session's budget for what it has left (a learned budget is recomputed
    // for it: see `budget::resumed_workflow_time`).
    let budget = if resumed {
        crate::budget::resumed_workflow_time(&config, resources.len())
    } else {
        config.workflow_time(resources.len())
    };
    // Validation keeps budgets within a year; a stored budget from elsewhere that is too
    // large for the clock means "no deadline in practice" (~30 years), and an instant that
    // far is always there.
    let deadline = now
        .checked_add(budget)
        .or_else(|| now.checked_add(std::time::Duration::from_secs(1 << 30)))
        .unwrap_or(now);
    let meters = crate::meters::SessionMeters::new(&harvester_id);
    let dispatch = crate::session::dispatch::Dispatch::new(resources.len(), config.max_concurrency);
    Arc::new(SessionShared {
        id,
        harvester_id,
        resources,
        dispatch,
        worker_exits: tokio_util::task::TaskTracker::new(),
        config,
        deadline,
        deps: Arc::clone(&state.deps),
        emitter,
        root: myself.clone(),
        cancel: crate::session::AttemptsToken::default(),
        resumed,
        lifecycle: Arc::default(),
        opened: now,
        meters,
    })
}

/// Spawns the session's actor and registers it. If it cannot be spawned, the session (which
/// holds its harvester) is finalized as crashed, so nothing is left stuck.
async fn spawn_session(
    myself: &ActorRef<SupervisorMessage>,
    state: &mut RootState,
    shared: Arc<SessionShared>,
) -> Result<(), String> {
    let id = shared.id;
    match Actor::spawn_linked(None, SessionActor, Arc::clone(&shared), myself.get_cell()).await {
        Ok((actor, _)) => {
            state.by_actor.insert(actor.get_id(), id);
            state.sessions.insert(
                id,
                Running {
                    actor,
                    shared,
                    forcing: false,
                },
            );
            Ok(())
        }
        Err(e) => {
            let mode = Mode::Force {
                finalizer_timeout: shared.config.escalation_grace,
            };
            spawn_force(
                state,
                &shared.emitter,
                Arc::clone(&shared.lifecycle),
                id,
                FinalizeReason::SessionCrashed,
                mode,
                None,
            );
            Err(e.to_string())
        }
    }
}

/// Aborts a session, or says truthfully why not. Never blocks the root: the store calls
/// and the session's own answer are awaited in a task, and if the session stops without
/// giving one (it was finalizing, and ractor drops a stopped actor's queued messages), the
/// answer comes from the store.
fn abort_session(
    state: &mut RootState,
    id: SessionId,
    reply: RpcReplyPort<Result<(), SessionError>>,
) {
    if let Some(waiting) = state.creating.get_mut(&id) {
        // Being created: answered once it runs (or its creation failed).
        waiting.push(reply);
        return;
    }
    let store = Arc::clone(&state.deps.store);
    let me = state.deps.node.id();
    let running = state
        .sessions
        .get(&id)
        .filter(|r| !r.forcing && !r.shared.lifecycle.is_claimed())
        .map(|r| (r.actor.clone(), Arc::clone(&r.shared)));
    tokio::spawn(async move {
        let answer = match running {
            Some((actor, shared)) => abort_running(&store, id, actor, &shared).await,
            None => abort_elsewhere(&store, id, me).await,
        };
        let _ = reply.send(answer);
    });
}

/// The abort of a session this node runs.
async fn abort_running(
    store: &Arc<dyn crate::store::SessionStore>,
    id: SessionId,
    actor: ActorRef<SessionMessage>,
    shared: &SessionShared,
) -> Result<(), SessionError> {
    // Abort before start: the store's compare-and-set decides against the session's own
    // `pending -> on-going`; the session then finalizes `aborted` as soon as it begins.
    let before_start = store
        .transition(
            id,
            shared.emitter.fence(),
            SessionStatus::Pending,
            SessionStatus::Aborting,
        )
        .await?;
    if before_start {
        shared.emitter.emit(EventKind::AbortRequested);
        shared.emitter.emit(EventKind::StatusChanged {
            from: SessionStatus::Pending,
            to: SessionStatus::Aborting,
        });
        return Ok(());
    }
    match actor.call(SessionMessage::AbortSession, None).await {
        Ok(ractor::rpc::CallResult::Success(answer)) => answer,
        // The session stopped before it read the request: it finalized.
        _ => abort_answer(&store.session(id).await?),
    }
}

/// The abort of a session not running here, or being finalized: the store has the answer.
/// A session another node owns and runs takes the request through the store; its owner
/// honours it at once (announcements) or at its next lease renewal (a rescuer finalizes it
/// `aborted`).
async fn abort_elsewhere(
    store: &Arc<dyn crate::store::SessionStore>,
    id: SessionId,
    me: crate::model::NodeId,
) -> Result<(), SessionError> {
    let record = store.session(id).await?;
    if !is_remote_and_abortable(&record, me) {
        return abort_answer(&record);
    }
    let after = store.request_abort(id).await?;
    if !after.abort_requested {
        return abort_answer(&after);
    }
    tracing::info!(
        session_id = %id,
        owner = ?after.owner.map(|o| o.to_string()),
        "abort requested from another node; its owner honours it"
    );
    Ok(())
}

/// Whether `record` is a session another node than `me` holds, that an abort can still
/// reach (pending or on-going, unclaimed).
fn is_remote_and_abortable(record: &crate::model::SessionRecord, me: crate::model::NodeId) -> bool {
    record.owner != Some(me)
        && record.finalizing.is_none()
        && matches!(
            record.status,
            SessionStatus::Pending | SessionStatus::OnGoing
        )
}

/// Stops a session's actor and finalizes the session from the store, once.
fn force(state: &mut RootState, id: SessionId, reason: FinalizeReason) {
    let Some(running) = state.sessions.get_mut(&id) else {
        return;
    };
    if running.forcing {
        return;
    }
    running.forcing = true;
    running.shared.cancel.cancel();
    // Its workers are killed now (their attempts dropped at their next `.await`, none
    // started any more), not when its dropped state reaches this root: ractor hands a
    // killed actor's state over in its termination event.
    running.shared.dispatch.kill(true);
    // Its children (the monitor) are killed with it: noted first, so that the
    // finalization waits for them, and for its workers, too.
    let actor = running.actor.get_cell();
    let children = actor.get_children();
    // Kill, not stop: a stuck handler never returns, and kill drops it at its next await.
    actor.kill();
    let killed = Killed {
        actor,
        children,
        workers: running.shared.worker_exits.clone(),
        wait: running.shared.config.killed_exit_wait,
    };
    let emitter = running.shared.emitter.clone();
    let mode = Mode::Force {
        finalizer_timeout: running.shared.config.escalation_grace,
    };
    let lifecycle = Arc::clone(&running.shared.lifecycle);
    spawn_force(state, &emitter, lifecycle, id, reason, mode, Some(killed));
}

/// Tells the root that a rescue pass ended, when dropped.
struct RescueDone(ActorRef<SupervisorMessage>);

impl Drop for RescueDone {
    fn drop(&mut self) {
        let _ = self.0.send_message(SupervisorMessage::RescuePassEnded);
    }
}

/// Tells the root that its rescue of a session ended, when dropped.
struct ReportBack(ActorRef<SupervisorMessage>, SessionId);

impl Drop for ReportBack {
    fn drop(&mut self) {
        let _ = self
            .0
            .send_message(SupervisorMessage::RescueFinished { session_id: self.1 });
    }
}

/// A session actor the root killed, and its children, to wait for before finalizing.
pub(crate) struct Killed {
    actor: ractor::ActorCell,
    children: Vec<ractor::ActorCell>,
    /// Its workers' tasks (aborted when its state is dropped).
    workers: tokio_util::task::TaskTracker,
    /// The session's `killed_exit_wait`.
    wait: std::time::Duration,
}

impl Killed {
    /// Returns once the session actor has exited: never while it still runs (its own
    /// finalizer may be what is stuck, and completing now would free the harvester beside
    /// it). A killed actor exits at its next `.await`; one that blocks its thread is
    /// waited for, with a warning every `killed_exit_wait`. Its children (monitor,
    /// workers) get one `killed_exit_wait`: a harvest that blocks its thread cannot be
    /// stopped, and the finalizer goes on with a warning, as it does in the session.
    async fn gone(self) {
        let mut waited = 0u32;
        while self.actor.wait(Some(self.wait)).await.is_err() {
            waited = waited.saturating_add(1);
            tracing::warn!(
                waited_for = %humantime::format_duration(self.wait.saturating_mul(waited)),
                "the killed session actor has not exited (does its finalizer block its \
                 thread?): the session stays unfinished, its harvester busy, until it does"
            );
        }
        self.workers.close();
        let children = futures::future::join(
            futures::future::join_all(self.children.iter().map(|c| c.wait(None))),
            self.workers.wait(),
        );
        if tokio::time::timeout(self.wait, children).await.is_err() {
            tracing::warn!(
                "workers of the killed session have not exited (a harvest that does not \
                 yield?); the session is finalized anyway"
            );
        }
    }
}

/// Finalizes a session from the store in a task of the root's (see [`Mode`]): after the
/// killed session actor and its children are gone, if there were any. Store failures are
/// retried inside [`finalizer::finalize`] for as long as they last (shutdown stops the
/// task, leaving the session to the rescue (the next start's, or a live node's)).
pub(crate) fn spawn_force(
    state: &mut RootState,
    emitter: &SessionEmitter,
    lifecycle: Arc<Lifecycle>,
    id: SessionId,
    reason: FinalizeReason,
    mode: Mode,
    killed: Option<Killed>,
) {
    let deps = Arc::clone(&state.deps);
    let emitter = emitter.clone();
    let span = emitter.span().clone();
    let had_monitor = killed.is_some();
    let root = state.root.clone();
    let task = tokio::spawn(
        async move {
            // Told when this ends however it ends (a shutdown waits for it).
            let _report = ReportBack(root, id);
            if let Some(killed) = killed {
                killed.gone().await;
            }
            let finalized = finalizer::finalize(
                &deps,
                &emitter,
                id,
                reason,
                Local::default(),
                &lifecycle,
                mode,
            )
            .await;
            match finalized {
                Ok(Finalized::Now(record)) => {
                    if had_monitor {
                        // It died with its session actor (children are killed with it).
                        emitter.emit(EventKind::MonitorCancelled);
                    }
                    finalizer::emit_finished(&emitter, &record);
                }
                Ok(Finalized::NotByUs) => {
                    // Finalized by the session itself, which may have been killed before
                    // it logged the end: log it (once; a closed log ignores it).
                    if let Ok(record) = deps.store.session(id).await {
                        finalizer::emit_finished(&emitter, &record);
                    }
                }
                Err(error @ crate::error::StoreError::Fenced { .. }) => {
                    tracing::warn!(
                        %error,
                        "another node took the session over; this node does not finalize it"
                    );
                }
                Err(error) => {
                    tracing::error!(
                        %error,
                        "could not finalize the session; the rescue (the next start's, or a live node's) will"
                    );
                }
            }
        }
        .instrument(span),
    );
    state.forced.retain(|t| !t.is_finished());
    state.forced.push(task);
}

/// Sends the next `Rescue` after `rescue_interval` and up to a fifth more.
fn schedule_rescue(myself: &ActorRef<SupervisorMessage>, config: &SupervisorConfig) {
    let every = config.rescue_interval;
    let wait = every.saturating_add(crate::node::jitter(every / 5));
    myself.send_after(wait, || SupervisorMessage::Rescue);
}

/// Ends the shutdown once every session is gone and every rescue has ended.
fn finish_shutdown_if_idle(myself: &ActorRef<SupervisorMessage>, state: &mut RootState) {
    let creating = (!state.creating.is_empty() || state.rescuing) && !state.abandoned;
    if !state.stopping || !state.sessions.is_empty() || creating {
        return;
    }
    state.forced.retain(|t| !t.is_finished());
    if !state.forced.is_empty() {
        return; // each tells the root when it ends
    }
    for reply in state.shutdown.drain(..) {
        let _ = reply.send(());
    }
    myself.stop(Some("shutdown".to_owned()));
}

/// `shutdown_timeout` after `Shutdown`: what has not finished is left to the next start's
/// recovery (its store records say how far it got), so that shutdown returns in bounded
/// time even while a store cannot complete a session or a finalizer hangs.
fn abandon(myself: &ActorRef<SupervisorMessage>, state: &mut RootState) {
    if !state.stopping {
        return;
    }
    // Creations still in flight are not waited for: their sessions, if the store took
    // them, are left to the rescue (the root is gone when they report).
    state.abandoned = true;
    for (id, running) in state.sessions.drain() {
        tracing::warn!(
            session_id = %id,
            timeout = %humantime::format_duration(state.config.shutdown_timeout),
            "shutdown: the session did not finish in time; the rescue (the next start's, or a live node's) will"
        );
        running.shared.dispatch.kill(true);
        running.actor.kill();
    }
    state.by_actor.clear();
    for task in state.forced.drain(..) {
        task.abort();
    }
    finish_shutdown_if_idle(myself, state);
}
