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
use tracing::Instrument;

use crate::harvest::{HarvestContext, Heartbeat, ResourceHarvester, error_chain};
pub(crate) use messages::{AttemptReport, AttemptResult, WorkerMessage};

/// The actor (config lives in its arguments; it has none of its own).
pub(crate) struct ResourceWorker;

/// What one attempt needs.
pub(crate) struct WorkerArgs {
    pub(crate) harvester: Arc<dyn ResourceHarvester>,
    pub(crate) ctx: HarvestContext,
    pub(crate) resource_timeout: Option<Duration>,
    pub(crate) heartbeat_timeout: Option<Duration>,
    /// `resource` span (with `resource_id` and `attempt`) inside the session's span.
    pub(crate) span: tracing::Span,
}

/// The worker's state; its final value is the report the session reads.
pub(crate) struct WorkerState {
    args: Option<WorkerArgs>,
    pub(crate) report: Option<AttemptReport>,
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
            args: Some(args),
            report: None,
        })
    }

    async fn post_start(
        &self,
        myself: ActorRef<Self::Msg>,
        state: &mut WorkerState,
    ) -> Result<(), ActorProcessingErr> {
        if let Some(args) = state.args.take() {
            let span = args.span.clone();
            state.report = Some(run_attempt(args).instrument(span).await);
        }
        myself.stop(None);
        Ok(())
    }
}

async fn run_attempt(args: WorkerArgs) -> AttemptReport {
    let started = Instant::now();
    let cancel = args.ctx.cancel.clone();
    let heartbeat = args.ctx.heartbeat.clone();
    let harvest = args.harvester.harvest(args.ctx);
    let ended = if args.resource_timeout.is_none() && args.heartbeat_timeout.is_none() {
        // No limit to watch: await the harvest alone (a hang is the monitor's business).
        Some(harvest.await)
    } else {
        let limit = async {
            match args.resource_timeout {
                Some(t) => tokio::time::sleep(t).await,
                None => std::future::pending().await,
            }
        };
        let idle = async {
            match args.heartbeat_timeout {
                Some(t) => idle_watch(&heartbeat, t).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = harvest => Some(r),
            () = limit => None,
            () = idle => None,
        }
    };
    let result = match ended {
        Some(Ok(())) => AttemptResult::Succeeded,
        Some(Err(_)) if cancel.is_cancelled() => AttemptResult::Cancelled,
        Some(Err(e)) => AttemptResult::Failed(error_chain(e.as_ref())),
        None => AttemptResult::TimedOut,
    };
    AttemptReport {
        result,
        elapsed: started.elapsed(),
    }
}

/// Returns once the heartbeat has been silent for `limit`.
async fn idle_watch(heartbeat: &Heartbeat, limit: Duration) {
    loop {
        let due = heartbeat.last() + limit;
        if Instant::now() >= due {
            return;
        }
        tokio::time::sleep_until(due).await;
    }
}
