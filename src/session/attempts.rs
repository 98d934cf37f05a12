//! Attempts: starting a ResourceWorker, hearing how it ended (its report inside
//! `ActorTerminated`, a panic as `ActorFailed`), retrying with backoff or recording the final
//! outcome, and settling outcome writes the store answered.

use std::sync::Arc;

use ractor::{Actor, ActorProcessingErr, ActorRef, SupervisionEvent};
use tokio::time::Instant;

use crate::config::FailurePolicy;
use crate::events::{EventKind, SessionEmitter};
use crate::model::{FinalizeReason, OutcomeRecord, ResourceId, ResourceOutcome};
use crate::session::state::{Phase, Slot, Times, Waiting};
use crate::session::{Session, SessionMessage, advance, finalize, spawn_monitor};
use crate::worker::{AttemptResult, ResourceWorker, WorkerArgs, WorkerState};

/// Starts attempt `attempt` of resource `index`; `first_started` is when the resource's
/// first attempt started (`None`: this is it).
pub(super) async fn start_worker(
    myself: &ActorRef<SessionMessage>,
    s: &mut Session,
    index: usize,
    attempt: u32,
    first_started: Option<Instant>,
) -> Result<(), ActorProcessingErr> {
    let Some(resource_id) = s.shared.resources.get(index).cloned() else {
        return Ok(());
    };
    // The one clock read of an attempt's start: it times the attempt, the resource (on a
    // first attempt) and is the heartbeat's origin.
    let started = Instant::now();
    s.shared.meters.attempt_started(
        first_started
            .is_none()
            .then(|| started.saturating_duration_since(s.shared.opened)),
    );
    let first_started = first_started.unwrap_or(started);
    s.shared.emitter.emit(EventKind::WorkerStarted {
        resource_id: resource_id.clone(),
        attempt,
    });
    let args = WorkerArgs {
        session: Arc::clone(&s.shared),
        resource_id,
        attempt,
        started,
        cancel: s.shared.cancel.token(),
    };
    let times = Times {
        first_started,
        started,
    };
    // Boxed: ractor's spawn future is the largest part of the worker-exit handler, and
    // ractor's mailbox loop holds that handler's future twice, for the session's whole
    // life. A small short-lived box per attempt buys ~2 KiB less per idle session.
    let spawn = Box::pin(Actor::spawn_linked(
        None,
        ResourceWorker,
        args,
        myself.get_cell(),
    ));
    match spawn.await {
        Ok((worker, _)) => {
            let slot = Slot {
                index,
                attempt,
                times,
            };
            s.st.in_flight.insert(worker.get_id(), slot);
            Ok(())
        }
        Err(e) => {
            // Could not even start: a failed attempt of this resource, not of the session.
            let error = format!("could not spawn the worker: {e}");
            let next = on_attempt(
                myself,
                s,
                (index, attempt, times),
                Ended::SpawnFailed(error),
            );
            match next {
                Some(reason) => finalize(myself, s, reason).await,
                None => Ok(()),
            }
        }
    }
}

pub(super) async fn on_child_event(
    myself: &ActorRef<SessionMessage>,
    event: SupervisionEvent,
    s: &mut Session,
) -> Result<(), ActorProcessingErr> {
    // Everything up to the awaits is synchronous, so the locals it needs never live in
    // this handler's future: ractor keeps that future, twice over, in every session's
    // mailbox loop for the session's whole life.
    let next = match child_exit(event, s) {
        Exit::Worker(slot, ended) => on_attempt(myself, s, slot, ended),
        Exit::Monitor(None) | Exit::Other => return Ok(()),
        Exit::Monitor(Some(error)) => {
            s.shared.emitter.emit(EventKind::MonitorRestarted { error });
            spawn_monitor(myself, s).await;
            return Ok(());
        }
    };
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

/// Which child exited, and how.
enum Exit {
    /// A worker's attempt ended.
    Worker((usize, u32, Times), Ended),
    /// The monitor stopped (`None`) or crashed and must be restarted (`Some(error)`).
    Monitor(Option<String>),
    /// Not a child exit, or one this session no longer tracks.
    Other,
}

fn child_exit(event: SupervisionEvent, s: &mut Session) -> Exit {
    // `Ok`: the child stopped, with its final state; `Err`: it failed (a panic, or the
    // monitor's error), with the message.
    let (cell, ending) = match event {
        SupervisionEvent::ActorTerminated(cell, final_state, _) => (cell, Ok(final_state)),
        SupervisionEvent::ActorFailed(cell, error) => (cell, Err(error.to_string())),
        _ => return Exit::Other,
    };
    let id = cell.get_id();
    if s.st.monitor.as_ref().is_some_and(|m| m.get_id() == id) {
        s.st.monitor = None;
        return match ending {
            Err(error) if s.st.phase != Phase::Finalized => Exit::Monitor(Some(error)),
            _ => Exit::Monitor(None),
        };
    }
    let Some(slot) = s.st.in_flight.remove(&id) else {
        return Exit::Other;
    };
    let ended = match ending {
        Ok(final_state) => Ended::Report(
            final_state
                .and_then(|mut b| b.take::<WorkerState>().ok())
                .and_then(|w| w.result)
                .unwrap_or_else(|| {
                    AttemptResult::Failed("the worker stopped without a report".into())
                }),
        ),
        Err(panic_message) => Ended::Panicked(panic_message),
    };
    Exit::Worker((slot.index, slot.attempt, slot.times), ended)
}

/// How an attempt ended, as the session learns it.
enum Ended {
    /// The worker stopped with its result.
    Report(AttemptResult),
    /// The user's harvest panicked (ractor's `ActorFailed`), with the message.
    Panicked(String),
    /// The worker could not be spawned.
    SpawnFailed(String),
}

/// One attempt ended: schedule its retry, or record its final outcome. Returns the reason
/// to finalize now (`FailFast`), if any. The caller then throttles the writes, and calls
/// [`advance`] (or finalizes).
fn on_attempt(
    myself: &ActorRef<SessionMessage>,
    s: &mut Session,
    (index, attempt, times): (usize, u32, Times),
    ended: Ended,
) -> Option<FinalizeReason> {
    if s.st.phase == Phase::Finalized {
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
        Ended::Report(AttemptResult::Failed(error)) | Ended::SpawnFailed(error) => {
            ResourceOutcome::Failed { error }
        }
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
    let cut = s.st.phase == Phase::Running
        && (outcome == ResourceOutcome::Cancelled || (s.st.is_fenced() && !outcome.is_success()));
    if cut {
        s.st.rare().ready.push_back((index, attempt, first_started));
        return None;
    }
    let retryable = matches!(
        outcome,
        ResourceOutcome::Failed { .. }
            | ResourceOutcome::Panicked { .. }
            | ResourceOutcome::TimedOut
    );
    if s.st.phase == Phase::Running && retryable && attempt < s.shared.config.retry.max_attempts {
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
        && s.st.phase == Phase::Running
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
