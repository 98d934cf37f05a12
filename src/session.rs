//! `SessionActor`: one running session.
//!
//! It spawns its MonitorActor first, moves the session `pending -> on-going`, keeps at most
//! `max_concurrency` ResourceWorkers running (each takes attempts from the session's queue,
//! [`dispatch`], and reports how each ended), applies the retry and failure policies, records
//! each final outcome in the store as it arrives, and finalizes (through
//! [`crate::finalizer`]) when every resource is done, on `FailFast`, on the monitor's
//! `DeadlineExpired`, on abort, or on shutdown: it kills the workers still running and
//! waits for them to exit (at most `killed_exit_wait`), so no harvest runs beside the
//! finalizer; after the finalizer it cancels the monitor and stops.
//!
//! A handler returns `Err` only on a store failure; the actor then dies and the root
//! finalizes the session from the store with `SessionCrashed`.

mod attempts;
pub(crate) mod dispatch;
pub(crate) mod messages;
pub(crate) mod state;
pub(crate) mod writes;

use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef, SupervisionEvent};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::SessionConfig;
use crate::error::SessionError;
use crate::events::{EventKind, SessionEmitter, in_span};
use crate::finalizer::{self, Deps, Finalized, Lifecycle, Mode};
use crate::model::{FinalizeReason, HarvesterId, ResourceId, SessionId, SessionStatus};
use crate::monitor::{MonitorActor, MonitorArgs};
use crate::supervisor::SupervisorMessage;
use attempts::{on_child_event, on_report, record_ended};
pub use messages::SessionMessage;
use state::{Phase, SessionState};

/// What a session's actors (session, monitor) and the root share about it.
pub(crate) struct SessionShared {
    pub(crate) id: SessionId,
    pub(crate) harvester_id: HarvesterId,
    pub(crate) resources: Arc<[ResourceId]>,
    /// The attempts' queue, shared with the workers.
    pub(crate) dispatch: dispatch::Dispatch,
    /// The workers' tasks, to wait for their exit (the root waits on it after killing the
    /// session's actor, whose dropped state aborts them).
    pub(crate) worker_exits: tokio_util::task::TaskTracker,
    /// The same `Arc` the store was given (the memory store keeps it rather than a copy).
    pub(crate) config: Arc<SessionConfig>,
    /// `started + workflow_time`, on tokio's clock (so paused-clock tests control it).
    pub(crate) deadline: Instant,
    pub(crate) deps: Arc<Deps>,
    pub(crate) emitter: SessionEmitter,
    pub(crate) root: ActorRef<SupervisorMessage>,
    /// The token of the session's attempts: cancelled on abort, fail-fast, deadline,
    /// shutdown, and when the node self-fences (then replaced by a fresh one for the
    /// attempts that start after the renewal).
    pub(crate) cancel: AttemptsToken,
    /// Taken over from a dead process by recovery: the store already moved it `on-going`.
    pub(crate) resumed: bool,
    /// Mirror of the store's finalization state, for the monitor's cheap ticks.
    pub(crate) lifecycle: Arc<Lifecycle>,
    /// When this process began to run it: a first attempt's wait for its slot counts from
    /// here.
    pub(crate) opened: Instant,
    /// Its metric handles (see `meters`).
    pub(crate) meters: crate::meters::SessionMeters,
}

/// The cancellation token a session's attempts get. One token for all of them (a clone is
/// cheaper than a child token per attempt, and they are cancelled together), replaceable:
/// a self-fenced node cuts the attempts running then, and only those, and later attempts
/// get a fresh token. No child token per session either: one costs 0.2 KiB, a tenth of
/// the budget of an idle session's memory.
#[derive(Debug, Default)]
pub(crate) struct AttemptsToken {
    /// The current token, and whether the session cancelled for good.
    current: std::sync::Mutex<(CancellationToken, bool)>,
}

impl AttemptsToken {
    fn lock(&self) -> std::sync::MutexGuard<'_, (CancellationToken, bool)> {
        // The guarded section never panics; a poisoned lock holds a valid token.
        self.current.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The token for an attempt that starts now.
    pub(crate) fn token(&self) -> CancellationToken {
        self.lock().0.clone()
    }

    /// Cancels the session's attempts for good (abort, finalization, a forced stop).
    pub(crate) fn cancel(&self) {
        let mut current = self.lock();
        current.1 = true;
        current.0.cancel();
    }

    /// Cancels the attempts running now; later ones get a fresh token (unless the
    /// session was cancelled for good).
    pub(crate) fn cut(&self) {
        let mut current = self.lock();
        current.0.cancel();
        if !current.1 {
            current.0 = CancellationToken::new();
        }
    }
}

/// The actor; its config is the [`SessionShared`] it is spawned with.
pub(crate) struct SessionActor;

/// The two halves of a session actor's state.
pub(crate) struct Session {
    shared: Arc<SessionShared>,
    st: SessionState,
    /// On the active-sessions gauge while the actor lives.
    _running: crate::meters::Running,
}

impl Actor for SessionActor {
    type Msg = SessionMessage;
    type State = Session;
    type Arguments = Arc<SessionShared>;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        shared: Arc<SessionShared>,
    ) -> Result<Session, ActorProcessingErr> {
        let running = shared.deps.gauges.running(crate::meters::Kind::Sessions);
        Ok(Session {
            st: SessionState::new(),
            shared,
            _running: running,
        })
    }

    async fn post_start(
        &self,
        myself: ActorRef<Self::Msg>,
        s: &mut Session,
    ) -> Result<(), ActorProcessingErr> {
        let span = s.shared.emitter.span().clone();
        in_span!(&span, begin(&myself, s))
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: SessionMessage,
        s: &mut Session,
    ) -> Result<(), ActorProcessingErr> {
        let span = s.shared.emitter.span().clone();
        // Other messages are rare (deadline, abort, retries, shutdown); attempts' ends are
        // not. Boxed, their handler's future stays out of the mailbox loop that ractor
        // allocates once per actor and sizes for every handler's future at once: that loop
        // is most of an idle session's own memory.
        match message {
            SessionMessage::AttemptEnded(report) => {
                in_span!(&span, on_report(&myself, report, s))
            }
            message => {
                Box::pin(async move { in_span!(&span, on_message(&myself, message, s)) }).await
            }
        }
    }

    // Never the default: it would stop the session whenever a worker exits.
    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        s: &mut Session,
    ) -> Result<(), ActorProcessingErr> {
        let span = s.shared.emitter.span().clone();
        in_span!(&span, on_child_event(&myself, event, s))
    }
}

async fn begin(
    myself: &ActorRef<SessionMessage>,
    s: &mut Session,
) -> Result<(), ActorProcessingErr> {
    if s.shared.deps.node.is_fenced() {
        // Spawned while its node is self-fenced (created or resumed just as it fenced):
        // nothing starts until the root passes on the renewal (`LeaseRenewed`).
        s.st.rare().fenced = true;
        s.shared.emitter.emit(EventKind::LeaseLost {
            node: s.shared.deps.node.id(),
        });
    }
    spawn_monitor(myself, s).await;
    enter(myself, s).await
}

/// The session's first write: pending to on-going. A failure that may pass (a full disk,
/// a lost connection) is tried again later, with backoff, rather than crash the session
/// (a crashed session is finalized with every resource lost).
async fn enter(
    myself: &ActorRef<SessionMessage>,
    s: &mut Session,
) -> Result<(), ActorProcessingErr> {
    let store = &s.shared.deps.store;
    let entered = if s.shared.resumed {
        // `resume_session` set it on-going; the remaining resources start now.
        Ok(true)
    } else {
        store
            .transition(
                s.shared.id,
                s.shared.emitter.fence(),
                SessionStatus::Pending,
                SessionStatus::OnGoing,
            )
            .await
    };
    let entered = match entered {
        Err(e) if e.is_transient() => {
            let rare = s.st.rare();
            let wait = rare
                .begin_retry
                .unwrap_or(crate::finalizer::STORE_RETRY_FIRST);
            rare.begin_retry = Some(crate::finalizer::store_step_failed(
                &s.shared.emitter,
                &mut rare.store_errors,
                "mark the session on-going",
                &e,
                wait,
                s.shared.deps.store_retry_max,
            ));
            myself.send_after(wait, || SessionMessage::BeginDue);
            return Ok(());
        }
        other => other?,
    };
    s.st.began();
    if entered {
        if !s.shared.resumed {
            s.shared.emitter.emit(EventKind::StatusChanged {
                from: SessionStatus::Pending,
                to: SessionStatus::OnGoing,
            });
        }
    } else {
        // Aborted while pending (the root moved it to `aborting`), or already finalized.
        let record = store.session(s.shared.id).await?;
        if record.status != SessionStatus::Aborting || record.finalizing.is_some() {
            s.st.phase = Phase::Finalized;
            stop_monitor(s, false).await;
            myself.stop(Some(STOP_FINALIZED.to_owned()));
            return Ok(());
        }
        s.st.phase = Phase::Aborting;
    }
    advance(myself, s).await
}

/// The exit reason of a session actor that finalized (or found its session finalized).
pub(crate) const STOP_FINALIZED: &str = "finalized";

/// The stop reason of a session actor that found its session taken over by another node:
/// it did not finalize, and must not be finalized by this process either.
pub(crate) const STOP_TAKEN_OVER: &str = "taken over";

/// Stops a session this node no longer holds (a write was fenced: another node took it
/// over while this one could not renew its lease): its attempts are cancelled and its
/// workers and monitor stopped, no finalizer runs here, and nothing more is written.
pub(crate) async fn give_up(myself: &ActorRef<SessionMessage>, s: &mut Session) {
    if s.st.phase == Phase::Finalized {
        return; // finalized, or given up, already
    }
    s.st.phase = Phase::Finalized;
    stop_taken_over(myself, s).await;
}

/// The work of [`give_up`], for a session already marked finalized (its finalization
/// found it fenced).
async fn stop_taken_over(myself: &ActorRef<SessionMessage>, s: &mut Session) {
    tracing::warn!(
        node = %s.shared.emitter.fence().node,
        "another node took this session over; this node stops it without finalizing"
    );
    s.shared.cancel.cancel();
    s.st.kill_workers(&s.shared.dispatch, true);
    let _ = s.st.wind_down(
        &s.shared.resources,
        &s.shared.dispatch,
        false,
        s.shared.config.budget_source(),
    );
    await_exits(&mut s.st.workers, s.shared.config.killed_exit_wait).await;
    stop_monitor(s, false).await;
    myself.stop(Some(STOP_TAKEN_OVER.to_owned()));
}

/// Whether `result` says the session was taken over by another node.
pub(crate) fn is_fenced<T>(result: &Result<T, crate::error::StoreError>) -> bool {
    matches!(result, Err(crate::error::StoreError::Fenced { .. }))
}

async fn on_message(
    myself: &ActorRef<SessionMessage>,
    message: SessionMessage,
    s: &mut Session,
) -> Result<(), ActorProcessingErr> {
    match message {
        // Handled before boxing (see `handle`).
        SessionMessage::AttemptEnded(report) => on_report(myself, report, s).await,
        SessionMessage::DeadlineExpired => {
            finalize(myself, s, FinalizeReason::DeadlineExpired).await
        }
        SessionMessage::Shutdown => finalize(myself, s, FinalizeReason::Shutdown).await,
        SessionMessage::AbortGraceElapsed => {
            if s.st.phase == Phase::Aborting {
                finalize(myself, s, FinalizeReason::Aborted).await?;
            }
            Ok(())
        }
        SessionMessage::AbortSession(reply) => {
            let answer = abort(myself, s).await;
            let failed = matches!(answer, Err(SessionError::Store(_)));
            let _ = reply.send(answer);
            if failed {
                return Err("store failed while aborting".into());
            }
            advance(myself, s).await
        }
        SessionMessage::RetryDue { index } => {
            if s.st.phase == Phase::Running
                && let Some(w) = s.st.take_waiting(index)
            {
                s.shared
                    .dispatch
                    .push_ready(index, w.next_attempt, w.first_started);
                advance(myself, s).await?;
            }
            Ok(())
        }
        SessionMessage::TakenOver => {
            give_up(myself, s).await;
            Ok(())
        }
        SessionMessage::LeaseLost => {
            if s.st.phase == Phase::Finalized || s.st.is_fenced() {
                return Ok(());
            }
            s.st.rare().fenced = true;
            s.shared.dispatch.close();
            s.shared.emitter.emit(EventKind::LeaseLost {
                node: s.shared.deps.node.id(),
            });
            // Cooperatively first: the running attempts' token, and a fresh one for the
            // attempts that start after the renewal; after `abort_grace`, a kill.
            s.shared.cancel.cut();
            myself.send_after(s.shared.config.abort_grace, || {
                SessionMessage::FenceGraceElapsed
            });
            Ok(())
        }
        SessionMessage::FenceGraceElapsed => {
            if s.st.phase != Phase::Finalized && s.st.is_fenced() {
                // Their attempts come back (as killed) to run again.
                s.st.kill_workers(&s.shared.dispatch, false);
            }
            Ok(())
        }
        SessionMessage::LeaseRenewed => {
            if !s.st.is_fenced() {
                return Ok(());
            }
            s.st.rare().fenced = false;
            if s.st.phase != Phase::Finalized {
                s.shared.emitter.emit(EventKind::LeaseRenewed {
                    node: s.shared.deps.node.id(),
                });
            }
            advance(myself, s).await
        }
        SessionMessage::BeginDue => {
            if s.st.phase == Phase::Running && s.st.not_begun() {
                enter(myself, s).await?;
            }
            Ok(())
        }
        SessionMessage::RespawnMonitor => {
            if s.st.phase != Phase::Finalized && s.st.monitor.is_none() {
                spawn_monitor(myself, s).await;
            }
            Ok(())
        }
    }
}

async fn abort(myself: &ActorRef<SessionMessage>, s: &mut Session) -> Result<(), SessionError> {
    let id = s.shared.id;
    let store = &s.shared.deps.store;
    match s.st.phase {
        Phase::Aborting => return Ok(()),
        Phase::Finalized => return abort_answer(&store.session(id).await?),
        Phase::Running => {}
    }
    // No attempt starts while the abort is written (`advance` opens the queue again if
    // the session turns out not to be abortable).
    s.shared.dispatch.close();
    if !store
        .transition(
            id,
            s.shared.emitter.fence(),
            SessionStatus::OnGoing,
            SessionStatus::Aborting,
        )
        .await?
    {
        return abort_answer(&store.session(id).await?);
    }
    s.shared.emitter.emit(EventKind::AbortRequested);
    s.shared.emitter.emit(EventKind::StatusChanged {
        from: SessionStatus::OnGoing,
        to: SessionStatus::Aborting,
    });
    s.st.phase = Phase::Aborting;
    s.shared.cancel.cancel();
    s.st.stop_retry_timers();
    s.st.rare().abort_timer = Some(myself.send_after(s.shared.config.abort_grace, || {
        SessionMessage::AbortGraceElapsed
    }));
    Ok(())
}

/// The answer to an abort that cannot start one, from the session's stored record: the
/// real terminal status, `Finalizing` while its finalization runs, and `Ok` if it is
/// aborting already. Never a status nobody read.
pub(crate) fn abort_answer(record: &crate::model::SessionRecord) -> Result<(), SessionError> {
    if record.status.is_terminal() {
        Err(SessionError::AlreadyFinished {
            session_id: record.id,
            status: record.status,
        })
    } else if record.status == SessionStatus::Aborting && record.finalizing.is_none() {
        Ok(())
    } else {
        Err(SessionError::Finalizing {
            session_id: record.id,
        })
    }
}

/// Starts what may start, and finalizes when nothing is left to wait for.
async fn advance(
    myself: &ActorRef<SessionMessage>,
    s: &mut Session,
) -> Result<(), ActorProcessingErr> {
    match s.st.phase {
        Phase::Finalized => Ok(()),
        Phase::Aborting => {
            if s.shared.dispatch.is_idle() {
                finalize(myself, s, FinalizeReason::Aborted).await?;
            }
            Ok(())
        }
        // Its first write has not passed yet: nothing starts.
        Phase::Running if s.st.not_begun() => Ok(()),
        Phase::Running => {
            let total = s.shared.resources.len();
            // A self-fenced node starts nothing (its lease may be gone).
            let open = !s.st.is_fenced();
            let (more, generation) = s
                .shared
                .dispatch
                .open_for(open, s.shared.config.max_concurrency);
            // Workers that ended are let go of (their results are nothing).
            while s.st.workers.try_join_next().is_some() {}
            for _ in 0..more {
                crate::worker::spawn(&mut s.st.workers, &s.shared, myself, generation);
            }
            if s.st.done == total {
                finalize(myself, s, FinalizeReason::Completed).await?;
            }
            Ok(())
        }
    }
}

/// Finalizes once: stops the workers, runs the finalizer, cancels the monitor, stops.
async fn finalize(
    myself: &ActorRef<SessionMessage>,
    s: &mut Session,
    reason: FinalizeReason,
) -> Result<(), ActorProcessingErr> {
    if s.st.phase == Phase::Finalized {
        return Ok(());
    }
    // Once per session, and a large future: boxed, it does not enlarge every handler that
    // might finalize (see `handle`).
    Box::pin(finalize_now(myself, s, reason)).await
}

async fn finalize_now(
    myself: &ActorRef<SessionMessage>,
    s: &mut Session,
    reason: FinalizeReason,
) -> Result<(), ActorProcessingErr> {
    // What the session was doing: attempts it had not read yet are decided as then.
    let was = s.st.phase;
    s.st.phase = Phase::Finalized;
    s.shared.cancel.cancel();
    s.st.kill_workers(&s.shared.dispatch, true);
    // What ended before the session read it is decided as if read before: a final outcome
    // is recorded; a retry or a cut stays unfinished.
    record_ended(myself, s, was);
    // Every outcome write must be answered first: a failed one is reconciled from memory.
    s.st.writes.drain().await;
    s.st.settle_writes(&s.shared.emitter);
    let local = s.st.wind_down(
        &s.shared.resources,
        &s.shared.dispatch,
        !s.shared.resumed,
        s.shared.config.budget_source(),
    );
    await_exits(&mut s.st.workers, s.shared.config.killed_exit_wait).await;
    let shared = Arc::clone(&s.shared);
    let result = finalizer::finalize(
        &shared.deps,
        &shared.emitter,
        shared.id,
        reason,
        local,
        &shared.lifecycle,
        Mode::Own,
    )
    .await;
    if is_fenced(&result) {
        stop_taken_over(myself, s).await;
        return Ok(());
    }
    let result = result?;
    match result {
        Finalized::Now(record) => {
            stop_monitor(s, true).await;
            finalizer::emit_finished(&shared.emitter, &record);
        }
        Finalized::NotByUs => stop_monitor(s, false).await,
    }
    myself.stop(Some(STOP_FINALIZED.to_owned()));
    Ok(())
}

/// Waits until the killed workers have exited, so that no harvest still runs beside the
/// finalizer; after `wait` (the session's `killed_exit_wait`), goes on with a warning.
async fn await_exits(workers: &mut tokio::task::JoinSet<()>, wait: Duration) {
    if workers.is_empty() {
        return;
    }
    let exits = async { while workers.join_next().await.is_some() {} };
    if tokio::time::timeout(wait, exits).await.is_err() {
        let still = workers.len();
        tracing::warn!(
            still,
            "killed workers have not exited (a harvest that does not yield?); the finalizer runs anyway"
        );
    }
}

/// Cancels the monitor and waits until it has exited (at most `killed_exit_wait`), so that
/// none of its events can follow `SessionFinished`: a tick that began before the end
/// (its store read, its events) is over, or was dropped at its next `.await`, before the
/// caller logs the end. (Should it not have exited in time, the log is closed anyway once
/// `SessionFinished` is written: see `SessionEmitter::emit`.)
async fn stop_monitor(s: &mut Session, announce: bool) {
    if let Some(monitor) = s.st.monitor.take() {
        monitor.kill();
        if monitor
            .wait(Some(s.shared.config.killed_exit_wait))
            .await
            .is_err()
        {
            tracing::warn!("the monitor has not exited in time; its later events are dropped");
        }
        if announce {
            s.shared.emitter.emit(EventKind::MonitorCancelled);
        }
    }
}

/// Spawns the monitor (boxed: rare, and ractor's spawn future is large; see `handle`).
async fn spawn_monitor(myself: &ActorRef<SessionMessage>, s: &mut Session) {
    Box::pin(spawn_monitor_now(myself, s)).await;
}

async fn spawn_monitor_now(myself: &ActorRef<SessionMessage>, s: &mut Session) {
    let args = MonitorArgs {
        shared: Arc::clone(&s.shared),
        session: myself.clone(),
    };
    match Actor::spawn_linked(None, MonitorActor, args, myself.get_cell()).await {
        Ok((monitor, _)) => s.st.monitor = Some(monitor),
        Err(error) => {
            // pre_start failures give no supervision event: retry on our own timer, so the
            // session is never left without its watchdog.
            tracing::warn!(%error, "could not spawn the monitor; retrying");
            let retry_in = s.shared.config.monitor_interval;
            myself.send_after(retry_in, || SessionMessage::RespawnMonitor);
        }
    }
}
