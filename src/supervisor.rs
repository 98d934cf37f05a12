//! `HarvestSupervisor`: the root actor, one per process.
//!
//! It validates and starts sessions (the store's busy lock makes "one active session per
//! harvester" atomic), routes aborts, answers queries from the store, and is the rescuer of
//! last resort: when a SessionActor dies without having finalized, or a monitor escalates a
//! stuck one, the root stops it and finalizes the session from the store in a task of its
//! own, so that a stuck finalizer can never block the root. At start it recovers sessions an
//! earlier process left unfinished.

pub(crate) mod messages;
mod recovery;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::config::SupervisorConfig;
use crate::error::{SessionError, StartError};
use crate::events::{EventKind, SessionEmitter};
use crate::finalizer::{self, Deps, Finalized, Lifecycle, Local, Mode};
use crate::model::{FinalizeReason, SessionId, SessionStatus};
use crate::session::{STOP_FINALIZED, SessionActor, SessionMessage, SessionShared};
use crate::store::NewSession;
pub use messages::{SessionRequest, SupervisorMessage};

/// The root actor.
pub(crate) struct HarvestSupervisor;

/// What the root is started with.
pub(crate) struct SupervisorArgs {
    pub(crate) config: SupervisorConfig,
    pub(crate) deps: Arc<Deps>,
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
    /// Finalizations the root runs itself; awaited on shutdown.
    forced: Vec<JoinHandle<()>>,
    /// Set while shutting down: the reply to send once every session is gone.
    shutdown: Option<RpcReplyPort<()>>,
}

impl Actor for HarvestSupervisor {
    type Msg = SupervisorMessage;
    type State = RootState;
    type Arguments = SupervisorArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: SupervisorArgs,
    ) -> Result<RootState, ActorProcessingErr> {
        Ok(RootState {
            config: args.config,
            deps: args.deps,
            sessions: HashMap::new(),
            by_actor: HashMap::new(),
            forced: Vec::new(),
            shutdown: None,
        })
    }

    async fn post_start(
        &self,
        myself: ActorRef<Self::Msg>,
        state: &mut RootState,
    ) -> Result<(), ActorProcessingErr> {
        recovery::recover(&myself, state).await;
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
                let answer = if state.shutdown.is_some() {
                    Err(StartError::SupervisorDown)
                } else {
                    start_session(&myself, state, *request).await
                };
                let _ = reply.send(answer);
            }
            SupervisorMessage::AbortSession(id, reply) => abort_session(state, id, reply).await,
            SupervisorMessage::GetSession(id, reply) => {
                let _ = reply.send(state.deps.store.session(id).await.map_err(Into::into));
            }
            SupervisorMessage::ListSessions(reply) => {
                let _ = reply.send(state.deps.store.list_sessions().await.map_err(Into::into));
            }
            SupervisorMessage::Escalate { session_id } => {
                force(state, session_id, FinalizeReason::DeadlineExpired);
            }
            SupervisorMessage::Shutdown(reply) => {
                state.shutdown = Some(reply);
                for running in state.sessions.values() {
                    let _ = running.actor.send_message(SessionMessage::Shutdown);
                }
                finish_shutdown_if_idle(&myself, state).await;
            }
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
                (cell, reason.as_deref() == Some(STOP_FINALIZED))
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
        finish_shutdown_if_idle(&myself, state).await;
        Ok(())
    }
}

async fn start_session(
    myself: &ActorRef<SupervisorMessage>,
    state: &mut RootState,
    request: SessionRequest,
) -> Result<SessionId, StartError> {
    let config = request
        .config
        .unwrap_or_else(|| state.config.session.clone());
    config.validate_for(request.resources.len())?;
    let config = Arc::new(config);
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

    let id = SessionId::new();
    let total = request.resources.len();
    let workflow_time = config.workflow_time(total);
    let deps = &state.deps;
    let resources: Arc<[_]> = request.resources.into();
    deps.store
        .create_session(NewSession {
            id,
            harvester_id: request.harvester_id.clone(),
            resources: Arc::clone(&resources),
            started: chrono::Utc::now(),
            workflow_time,
            config: Arc::clone(&config),
        })
        .await?;
    let emitter = SessionEmitter::new(
        id,
        request.harvester_id.clone(),
        0,
        deps.bus.clone(),
        Arc::clone(&deps.store),
    );
    emitter.emit(EventKind::SessionStarted {
        total,
        workflow_time,
    });
    let shared = session_shared(
        myself,
        state,
        id,
        request.harvester_id,
        resources,
        config,
        emitter,
        false,
    );
    spawn_session(myself, state, shared)
        .await
        .map(|()| id)
        .map_err(|message| StartError::Spawn {
            session_id: id,
            message,
        })
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
    let budget = config.workflow_time(resources.len());
    // Validation keeps budgets within a year; a stored budget from elsewhere that is too
    // large for the clock means "no deadline in practice" (~30 years), and an instant that
    // far is always there.
    let deadline = now
        .checked_add(budget)
        .or_else(|| now.checked_add(std::time::Duration::from_secs(1 << 30)))
        .unwrap_or(now);
    Arc::new(SessionShared {
        id,
        harvester_id,
        resources,
        config,
        deadline,
        deps: Arc::clone(&state.deps),
        emitter,
        root: myself.clone(),
        cancel: CancellationToken::new(),
        resumed,
        lifecycle: Arc::default(),
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
            let timeout = shared.config.escalation_grace;
            spawn_force(
                state,
                &shared.emitter,
                Arc::clone(&shared.lifecycle),
                id,
                FinalizeReason::SessionCrashed,
                timeout,
                false,
            );
            Err(e.to_string())
        }
    }
}

async fn abort_session(
    state: &mut RootState,
    id: SessionId,
    reply: RpcReplyPort<Result<(), SessionError>>,
) {
    let store = &state.deps.store;
    if let Some(running) = state.sessions.get(&id)
        && !running.forcing
    {
        // Abort before start: the store's compare-and-set decides against the session's own
        // `pending -> on-going`; the session then finalizes `aborted` as soon as it begins.
        match store
            .transition(id, SessionStatus::Pending, SessionStatus::Aborting)
            .await
        {
            Ok(true) => {
                running.shared.emitter.emit(EventKind::AbortRequested);
                running.shared.emitter.emit(EventKind::StatusChanged {
                    from: SessionStatus::Pending,
                    to: SessionStatus::Aborting,
                });
                let _ = reply.send(Ok(()));
            }
            Ok(false) => {
                if let Err(ractor::MessagingErr::SendErr(SessionMessage::AbortSession(reply))) =
                    running
                        .actor
                        .send_message(SessionMessage::AbortSession(reply))
                {
                    let _ = reply.send(Err(SessionError::AlreadyFinished {
                        session_id: id,
                        status: SessionStatus::Aborting,
                    }));
                }
            }
            Err(e) => {
                let _ = reply.send(Err(e.into()));
            }
        }
        return;
    }
    let answer = match store.session(id).await {
        Ok(record) => Err(SessionError::AlreadyFinished {
            session_id: id,
            status: record.status,
        }),
        Err(e) => Err(e.into()),
    };
    let _ = reply.send(answer);
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
    // Kill, not stop: a stuck handler never returns, and kill drops it at its next await.
    running.actor.kill();
    let emitter = running.shared.emitter.clone();
    let timeout = running.shared.config.escalation_grace;
    let lifecycle = Arc::clone(&running.shared.lifecycle);
    spawn_force(state, &emitter, lifecycle, id, reason, timeout, true);
}

/// Attempts of a forced finalization against a failing store, and their backoff: about
/// five minutes in all before giving up (the next start's recovery tries again).
const FORCE_ATTEMPTS: u32 = 10;
const FORCE_RETRY_FIRST: std::time::Duration = std::time::Duration::from_secs(1);
const FORCE_RETRY_MAX: std::time::Duration = std::time::Duration::from_secs(60);

fn spawn_force(
    state: &mut RootState,
    emitter: &SessionEmitter,
    lifecycle: Arc<Lifecycle>,
    id: SessionId,
    reason: FinalizeReason,
    finalizer_timeout: std::time::Duration,
    had_monitor: bool,
) {
    let deps = Arc::clone(&state.deps);
    let emitter = emitter.clone();
    let span = emitter.span().clone();
    let task = tokio::spawn(
        async move {
            let mode = Mode::Force { finalizer_timeout };
            let mut delay = FORCE_RETRY_FIRST;
            for attempt in 1..=FORCE_ATTEMPTS {
                match finalizer::finalize(
                    &deps,
                    &emitter,
                    id,
                    reason,
                    Local::default(),
                    &lifecycle,
                    mode,
                )
                    .await
                {
                    Ok(Finalized::Now(record)) => {
                        if had_monitor {
                            // It died with its session actor (children are killed with it).
                            emitter.emit(EventKind::MonitorCancelled);
                        }
                        finalizer::emit_finished(&emitter, &record);
                        return;
                    }
                    Ok(Finalized::NotByUs) => return,
                    Err(error) => {
                        // The store is the guard: without it nothing can be finalized safely.
                        // Try again; a claim made before the failure is completed then.
                        tracing::error!(%error, attempt, "could not finalize the session; retrying");
                        tokio::time::sleep(delay).await;
                        delay = delay.saturating_mul(2).min(FORCE_RETRY_MAX);
                    }
                }
            }
            tracing::error!("gave up finalizing the session: the store keeps failing");
        }
        .instrument(span),
    );
    state.forced.retain(|t| !t.is_finished());
    state.forced.push(task);
}

async fn finish_shutdown_if_idle(myself: &ActorRef<SupervisorMessage>, state: &mut RootState) {
    if state.shutdown.is_none() || !state.sessions.is_empty() {
        return;
    }
    for task in state.forced.drain(..) {
        let _ = task.await;
    }
    if let Some(reply) = state.shutdown.take() {
        let _ = reply.send(());
    }
    myself.stop(Some("shutdown".to_owned()));
}
