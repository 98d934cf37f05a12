//! `ResourceWorker`: one attempt of the user's harvest for one resource.
//!
//! The attempt runs in `post_start` under the per-attempt timeout, the heartbeat watchdog and
//! the session's cancellation token; then the worker stops itself with its report in its
//! state (see [`messages`]). A panic in user code is caught by ractor and reaches the
//! SessionActor as `ActorFailed` with the panic message: it never takes the session down.
//! `kill()` drops the attempt at its next `.await`, which is how the session stops workers
//! that ignore their cancellation token.

pub(crate) mod messages;

use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::time::Instant;

use crate::events::in_span;
use crate::harvest::{HarvestContext, Heartbeat, error_chain};
use crate::model::ResourceId;
use crate::session::SessionShared;
pub(crate) use messages::{AttemptResult, WorkerMessage};

/// The actor (config lives in its arguments; it has none of its own).
pub(crate) struct ResourceWorker;

/// What one attempt needs: the session's shared part (harvester, limits, cancellation
/// token, span) and what is the attempt's own. Kept small: it is moved a few times on
/// every spawn.
pub(crate) struct WorkerArgs {
    pub(crate) session: Arc<SessionShared>,
    pub(crate) resource_id: ResourceId,
    pub(crate) attempt: u32,
    /// When the session started this attempt (the heartbeat's origin).
    pub(crate) started: Instant,
    /// The attempt's cancellation token (the session's attempts' token, see
    /// `SessionState::attempts`).
    pub(crate) cancel: tokio_util::sync::CancellationToken,
}

/// The worker's state; its final value carries the result the session reads.
pub(crate) struct WorkerState {
    args: Option<WorkerArgs>,
    pub(crate) result: Option<AttemptResult>,
    /// On the active-workers gauge while the worker (or its final state) lives.
    _running: crate::meters::Running,
}

impl Actor for ResourceWorker {
    type Msg = WorkerMessage;
    type State = WorkerState;
    type Arguments = WorkerArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: WorkerArgs,
    ) -> Result<WorkerState, ActorProcessingErr> {
        Ok(WorkerState {
            _running: args
                .session
                .deps
                .gauges
                .running(crate::meters::Kind::Workers),
            args: Some(args),
            result: None,
        })
    }

    async fn post_start(
        &self,
        myself: ActorRef<Self::Msg>,
        state: &mut WorkerState,
    ) -> Result<(), ActorProcessingErr> {
        if let Some(args) = state.args.take() {
            let span = tracing::info_span!(
                parent: args.session.emitter.span(),
                "resource",
                resource_id = %args.resource_id,
                attempt = args.attempt
            );
            state.result = Some(in_span!(&span, run_attempt(args)));
        }
        myself.stop(None);
        Ok(())
    }
}

async fn run_attempt(args: WorkerArgs) -> AttemptResult {
    let shared = &args.session;
    let resource_timeout = shared.config.resource_timeout;
    let heartbeat_timeout = shared.config.heartbeat_timeout;
    let heartbeat = Heartbeat::new(heartbeat_timeout.is_some(), args.started);
    let ctx = HarvestContext {
        session_id: shared.id,
        harvester_id: shared.harvester_id.clone(),
        resource_id: args.resource_id.clone(),
        attempt: args.attempt,
        // One token for the session's attempts: a clone is cheaper than a child token
        // (which allocates and locks the parent), and attempts are only ever cancelled
        // together.
        cancel: args.cancel.clone(),
        heartbeat: heartbeat.clone(),
    };
    let harvest = shared.deps.harvester.harvest(ctx);
    let hard = resource_timeout.and_then(|t| args.started.checked_add(t));
    let ended = if resource_timeout.is_none() && heartbeat_timeout.is_none() {
        // No limit to watch: await the harvest alone (a hang is the monitor's business).
        Some(harvest.await)
    } else {
        let silence = heartbeat_timeout.map(|t| (&heartbeat, t));
        limited(harvest, hard, silence).await
    };
    let heartbeat_silent = ended.is_none() && hard.is_none_or(|h| Instant::now() < h);
    if heartbeat_silent {
        // Cut before its time limit: the heartbeat fell silent.
        crate::meters::watchdog("heartbeat_silence");
    }
    match ended {
        Some(Ok(())) => AttemptResult::Succeeded,
        Some(Err(_)) if args.cancel.is_cancelled() => AttemptResult::Cancelled,
        Some(Err(e)) => AttemptResult::Failed(error_chain(e.as_ref())),
        None => AttemptResult::TimedOut { heartbeat_silent },
    }
}

/// Runs `harvest` until it ends (`Some`), or until `hard` passes or the heartbeat has been
/// silent for its limit (`None`). One timer, moved on when a beat moves the silence
/// deadline: a smaller future than one timer per limit, and this future lives as long as
/// the attempt.
async fn limited<F: Future>(
    harvest: F,
    hard: Option<Instant>,
    silence: Option<(&Heartbeat, Duration)>,
) -> Option<F::Output> {
    let due = || {
        let quiet = silence.and_then(|(hb, limit)| hb.last().checked_add(limit));
        match (hard, quiet) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    };
    let Some(first) = due() else {
        // Both limits are beyond the clock's range: no limit in practice.
        return Some(harvest.await);
    };
    let timer = tokio::time::sleep_until(first);
    tokio::pin!(harvest, timer);
    loop {
        tokio::select! {
            r = &mut harvest => return Some(r),
            () = &mut timer => {
                match due() {
                    Some(at) if at > Instant::now() => timer.as_mut().reset(at),
                    _ => return None,
                }
            }
        }
    }
}
