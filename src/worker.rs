//! `ResourceWorker`: a task that runs the session's resource attempts one after another.
//!
//! A session runs at most `max_concurrency` workers. Each takes its next attempt from the
//! session's queue ([`crate::session::dispatch`]) itself, runs it under the per-attempt
//! timeout, the heartbeat watchdog and the session's cancellation token, notes how it
//! ended in the queue and tells the SessionActor (a message, [`AttemptReport`]), and takes
//! the next one; it ends when the queue is empty or closed. A resource thus costs no actor
//! and no trip through the session's mailbox before it starts: under load, those trips
//! through tokio's run queues were most of a short resource's time. (A failure that is
//! final under `FailFast` closes the queue at once, so nothing starts while the session
//! reads it; an outcome the session had not read when it finalized is still recorded.)
//!
//! A panic in user code is caught around the attempt and reported with its message: it
//! never takes the worker, nor the session, down. The session (or the root, forcing a
//! stuck session) kills its workers through the queue (the attempt is dropped at its next
//! `.await`) when it finalizes, or when its node self-fenced and the attempts ignored
//! their cancellation; an attempt dropped so is reported as [`Ended::Killed`].

pub(crate) mod messages;

use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use ractor::ActorRef;
use tokio::time::Instant;

use crate::events::{EventKind, in_span};
use crate::harvest::{HarvestContext, Heartbeat, error_chain};
use crate::model::ResourceId;
use crate::session::SessionShared;
use crate::session::dispatch::Claimed;
use crate::session::messages::SessionMessage;
pub(crate) use messages::{AttemptReport, AttemptResult, Ended};

/// Starts a worker of `generation` (see [`crate::session::dispatch::Dispatch::open_for`])
/// in the session's set of workers.
pub(crate) fn spawn(
    workers: &mut tokio::task::JoinSet<()>,
    shared: &Arc<SessionShared>,
    session: &ActorRef<SessionMessage>,
    generation: u32,
) {
    let work = run(Arc::clone(shared), session.clone(), generation);
    workers.spawn(shared.worker_exits.track_future(work));
}

/// The worker: attempts until the queue has none for it, or until the session (or the
/// root) kills its workers, whichever comes first (the attempt is dropped then).
async fn run(shared: Arc<SessionShared>, session: ActorRef<SessionMessage>, generation: u32) {
    tokio::select! {
        () = attempts(&shared, &session, generation) => {}
        () = shared.dispatch.until_killed(generation) => {}
    }
}

async fn attempts(
    shared: &Arc<SessionShared>,
    session: &ActorRef<SessionMessage>,
    generation: u32,
) {
    loop {
        // The attempt's token is taken under the queue's lock, as its start is logged: a
        // self-fencing session closes the queue before it cancels the running attempts'
        // token, so an attempt is either not started or cancelled with the others.
        let mut cancel = None;
        let claimed = shared.dispatch.next(generation, |c| {
            cancel = Some(shared.cancel.token());
            if let Some(resource_id) = shared.resources.get(c.index).cloned() {
                shared.emitter.emit(EventKind::WorkerStarted {
                    resource_id,
                    attempt: c.attempt,
                });
            }
        });
        let Some(claimed) = claimed.await else {
            return;
        };
        let cancel = cancel.unwrap_or_else(|| shared.cancel.token());
        let ended = attempt(shared, session, &claimed, cancel).await;
        // The session will finalize on a failure final under FailFast: the queue closes
        // now and stays closed until the session has read it, so nothing starts meanwhile
        // (it opens the queue again if it decides otherwise, e.g. a self-fenced node's
        // cut).
        let holds = fails_fast(shared, &claimed, &ended);
        // Kept in the queue, then told: should the session finalize before it reads the
        // report, it still decides this outcome (see `Dispatch::take_ended`).
        if shared.dispatch.finish(claimed.key, ended, holds)
            && session
                .send_message(SessionMessage::AttemptEnded(AttemptReport {
                    key: claimed.key,
                }))
                .is_err()
        {
            return; // the session is gone
        }
        // A harvest that never waits would keep this worker's thread for the whole
        // session: give way once tokio's cooperative budget is spent.
        tokio::task::consume_budget().await;
    }
}

/// Whether the session will finalize with `FailFast` on this attempt: a failure with no
/// retry left, under that policy.
fn fails_fast(shared: &SessionShared, c: &Claimed, ended: &Ended) -> bool {
    let failed = matches!(
        ended,
        Ended::Panicked(_)
            | Ended::Report(AttemptResult::Failed(_) | AttemptResult::TimedOut { .. })
    );
    failed
        && shared.config.failure_policy == crate::config::FailurePolicy::FailFast
        && c.attempt >= shared.config.retry.max_attempts
}

/// One attempt, with its panic caught.
async fn attempt(
    shared: &Arc<SessionShared>,
    session: &ActorRef<SessionMessage>,
    c: &Claimed,
    cancel: tokio_util::sync::CancellationToken,
) -> Ended {
    shared.meters.attempt_started(
        c.first
            .then(|| c.started.saturating_duration_since(shared.opened)),
    );
    let _running = shared.deps.gauges.running(crate::meters::Kind::Workers);
    let Some(resource_id) = shared.resources.get(c.index).cloned() else {
        return Ended::Report(AttemptResult::Failed("no such resource".into()));
    };
    // Reports the attempt as killed if it is dropped before it ends (a kill).
    let mut unreported = Unreported {
        shared,
        session,
        key: Some(c.key),
    };
    let span = tracing::info_span!(
        parent: shared.emitter.span(),
        "resource",
        resource_id = %resource_id,
        attempt = c.attempt
    );
    let args = WorkerArgs {
        session: shared,
        resource_id,
        attempt: c.attempt,
        started: c.started,
        cancel,
    };
    let ended = std::panic::AssertUnwindSafe(async { in_span!(&span, run_attempt(args)) })
        .catch_unwind()
        .await;
    unreported.key = None;
    match ended {
        Ok(result) => Ended::Report(result),
        Err(panic) => Ended::Panicked(panic_message(panic.as_ref())),
    }
}

/// A panic's message (its payload, when it is a string).
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic whose payload is not a string".to_owned()
    }
}

/// Tells the session that an attempt was dropped before it ended, when dropped armed.
struct Unreported<'a> {
    shared: &'a SessionShared,
    session: &'a ActorRef<SessionMessage>,
    key: Option<u64>,
}

impl Drop for Unreported<'_> {
    fn drop(&mut self) {
        if let Some(key) = self.key.take()
            && self.shared.dispatch.finish(key, Ended::Killed, false)
        {
            let _ = self
                .session
                .send_message(SessionMessage::AttemptEnded(AttemptReport { key }));
        }
    }
}

/// What one attempt needs: the session's shared part (harvester, limits, cancellation
/// token, span) and what is the attempt's own.
struct WorkerArgs<'a> {
    session: &'a SessionShared,
    resource_id: ResourceId,
    attempt: u32,
    /// When this attempt started (the heartbeat's origin).
    started: Instant,
    /// The attempt's cancellation token (see `SessionShared::cancel`).
    cancel: tokio_util::sync::CancellationToken,
}

async fn run_attempt(args: WorkerArgs<'_>) -> AttemptResult {
    let shared = args.session;
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
