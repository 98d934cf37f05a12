//! Attempts: hearing how each ended (a worker's [`AttemptReport`]), retrying with backoff
//! or recording the final outcome, and settling outcome writes the store answered; and
//! the monitor's exits.

use ractor::{ActorProcessingErr, ActorRef, SupervisionEvent};
use tokio::time::Instant;

use crate::config::FailurePolicy;
use crate::events::{EventKind, SessionEmitter};
use crate::model::{FinalizeReason, OutcomeRecord, ResourceId, ResourceOutcome};
use crate::session::state::{Phase, Times, Waiting};
use crate::session::{Session, SessionMessage, advance, finalize, spawn_monitor};
use crate::worker::{AttemptReport, AttemptResult, Ended};

/// A worker's report of an attempt that ended.
pub(super) async fn on_report(
    myself: &ActorRef<SessionMessage>,
    report: AttemptReport,
    s: &mut Session,
) -> Result<(), ActorProcessingErr> {
    // Everything up to the awaits is synchronous, so the locals it needs never live in
    // this handler's future: ractor keeps that future, twice over, in every session's
    // mailbox loop for the session's whole life.
    let Some(slot) = s.shared.dispatch.take(report.key) else {
        // Already wound down (the session finalized): nothing to hear.
        return Ok(());
    };
    let ended = slot.ended.unwrap_or(Ended::Killed);
    let next = on_attempt(
        myself,
        s,
        (slot.index, slot.attempt, slot.times),
        ended,
        None,
    );
    if s.st.writes.over_limit() {
        s.st.writes.throttle().await;
        s.st.settle_writes(&s.shared.emitter);
    }
    if s.st.taken_over() {
        // Boxed: rare, and this handler's future lives in every session's mailbox loop.
        Box::pin(super::give_up(myself, s)).await;
        return Ok(());
    }
    if let Some(reason) = next {
        return finalize(myself, s, reason).await;
    }
    advance(myself, s).await
}

/// For a session that finalizes now: decides the attempts that ended before it read
/// their reports (a worker takes its next attempt at once) as it would have had it read
/// them first, in phase `was` (the one it finalized from): a final outcome is recorded; a
/// retry or a cut stays unfinished (queued, so the finalizer counts it with its attempts);
/// what was killed, or runs still, stays unfinished.
pub(super) fn record_ended(myself: &ActorRef<SessionMessage>, s: &mut Session, was: Phase) {
    for slot in s.shared.dispatch.take_ended() {
        let ended = slot.ended.unwrap_or(Ended::Killed);
        let _ = on_attempt(
            myself,
            s,
            (slot.index, slot.attempt, slot.times),
            ended,
            Some(was),
        );
    }
}

/// The session's children are its monitor (its workers are tasks, not actors): a crashed
/// monitor is restarted.
pub(super) async fn on_child_event(
    myself: &ActorRef<SessionMessage>,
    event: SupervisionEvent,
    s: &mut Session,
) -> Result<(), ActorProcessingErr> {
    // `Ok`: the child stopped; `Err`: it failed, with the message.
    let (cell, ending) = match event {
        SupervisionEvent::ActorTerminated(cell, _, _) => (cell, Ok(())),
        SupervisionEvent::ActorFailed(cell, error) => (cell, Err(error.to_string())),
        _ => return Ok(()),
    };
    let id = cell.get_id();
    if s.st.monitor.as_ref().is_none_or(|m| m.get_id() != id) {
        return Ok(());
    }
    s.st.monitor = None;
    if let Err(error) = ending
        && s.st.phase != Phase::Finalized
    {
        s.shared.emitter.emit(EventKind::MonitorRestarted { error });
        spawn_monitor(myself, s).await;
    }
    Ok(())
}

/// One attempt ended: schedule its retry, or record its final outcome. Returns the reason
/// to finalize now (`FailFast`), if any. The caller then throttles the writes, and calls
/// [`advance`] (or finalizes). `finalizing`: the session is finalizing from that phase,
/// and decides what ended before it read the report (see [`record_ended`]): nothing is
/// scheduled then, a retry or a cut is queued to count as unfinished.
fn on_attempt(
    myself: &ActorRef<SessionMessage>,
    s: &mut Session,
    (index, attempt, times): (usize, u32, Times),
    ended: Ended,
    finalizing: Option<Phase>,
) -> Option<FinalizeReason> {
    let phase = finalizing.unwrap_or(s.st.phase);
    if phase == Phase::Finalized {
        return None;
    }
    let resource_id = s.shared.resources.get(index).cloned()?;
    let now = Instant::now();
    let heartbeat_silent = matches!(
        ended,
        Ended::Report(AttemptResult::TimedOut {
            heartbeat_silent: true
        })
    );
    let outcome = match ended {
        Ended::Report(AttemptResult::Succeeded) => ResourceOutcome::Succeeded,
        Ended::Report(AttemptResult::Failed(error)) => ResourceOutcome::Failed { error },
        // Dropped by a kill: while the session runs (a self-fenced node's kill), a cut
        // attempt that runs again below, however late its report is read.
        Ended::Killed => ResourceOutcome::Cancelled,
        Ended::Report(AttemptResult::TimedOut { .. }) => ResourceOutcome::TimedOut,
        Ended::Report(AttemptResult::Cancelled) => ResourceOutcome::Cancelled,
        Ended::Panicked(message) => ResourceOutcome::Panicked { message },
    };
    let Times {
        first_started,
        started,
    } = times;
    s.shared
        .meters
        .attempt_ended(&outcome, now.saturating_duration_since(started));
    emit_attempt(
        &s.shared.emitter,
        &resource_id,
        attempt,
        &outcome,
        now.saturating_duration_since(started),
        heartbeat_silent,
    );

    // Cut by the node's self-fencing (cancelled while the session runs, or ended any way
    // but success while fenced): not an outcome; run again, same attempt, once the node
    // has renewed its lease.
    let cut = phase == Phase::Running
        && (outcome == ResourceOutcome::Cancelled || (s.st.is_fenced() && !outcome.is_success()));
    if cut {
        s.shared.dispatch.push_ready(index, attempt, first_started);
        return None;
    }
    let retryable = matches!(
        outcome,
        ResourceOutcome::Failed { .. }
            | ResourceOutcome::Panicked { .. }
            | ResourceOutcome::TimedOut
    );
    if phase == Phase::Running && retryable && attempt < s.shared.config.retry.max_attempts {
        if finalizing.is_some() {
            // It would have waited for its retry: unfinished, with the attempts it made.
            s.shared
                .dispatch
                .push_ready(index, attempt.saturating_add(1), first_started);
            return None;
        }
        let delay = s.shared.config.retry.backoff(attempt);
        s.shared.meters.retried();
        s.shared.emitter.emit(EventKind::WorkerRetrying {
            resource_id,
            next_attempt: attempt + 1,
            delay,
        });
        let timer = myself.send_after(delay, move || SessionMessage::RetryDue { index });
        s.st.rare().waiting.insert(
            index,
            Waiting {
                next_attempt: attempt + 1,
                first_started,
                timer,
            },
        );
        return None;
    }

    let failed = !outcome.is_success();
    let record = OutcomeRecord {
        resource_id,
        outcome,
        attempts: attempt,
        elapsed: now.saturating_duration_since(first_started),
    };
    s.st.writes.submit(
        &s.shared.deps.store,
        s.shared.id,
        s.shared.emitter.fence(),
        record,
    );
    // An index past `u32` is noted as `u32::MAX`: the finalizer checks every noted index
    // against the id it names, so a wrong one only costs it the faster walk.
    s.st.submitted
        .push(u32::try_from(index).unwrap_or(u32::MAX));
    s.st.settle_writes(&s.shared.emitter);
    s.st.done += 1;
    let fail_fast = failed
        && finalizing.is_none()
        && phase == Phase::Running
        && s.shared.config.failure_policy == FailurePolicy::FailFast;
    fail_fast.then_some(FinalizeReason::FailFast)
}

fn emit_attempt(
    emitter: &SessionEmitter,
    resource_id: &ResourceId,
    attempt: u32,
    outcome: &ResourceOutcome,
    elapsed: std::time::Duration,
    heartbeat_silent: bool,
) {
    let resource_id = resource_id.clone();
    emitter.emit(match outcome {
        ResourceOutcome::Succeeded => EventKind::WorkerSucceeded {
            resource_id,
            attempt,
            elapsed,
        },
        ResourceOutcome::Failed { error } => EventKind::WorkerFailed {
            resource_id,
            attempt,
            error: error.clone(),
        },
        ResourceOutcome::Panicked { message } => EventKind::WorkerPanicked {
            resource_id,
            attempt,
            message: message.clone(),
        },
        ResourceOutcome::TimedOut => EventKind::WorkerTimedOut {
            resource_id,
            attempt,
            heartbeat_silent,
        },
        ResourceOutcome::Cancelled | ResourceOutcome::Lost => EventKind::WorkerCancelled {
            resource_id,
            attempt,
        },
    });
}
