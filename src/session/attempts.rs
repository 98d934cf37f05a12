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
    };
    let times = Times {
        first_started,
        started,
    };
    match Actor::spawn_linked(None, ResourceWorker, args, myself.get_cell()).await {
        Ok((worker, _)) => {
            let slot = Slot {
                index,
                attempt,
                times,
                cell: worker.get_cell(),
            };
            s.st.in_flight.insert(worker.get_id(), slot);
            Ok(())
        }
        Err(e) => {
            // Could not even start: a failed attempt of this resource, not of the session.
            let error = format!("could not spawn the worker: {e}");
            on_attempt(
                myself,
                s,
                (index, attempt, times),
                Ended::SpawnFailed(error),
            )
            .await
        }
    }
}

pub(super) async fn on_child_event(
    myself: &ActorRef<SessionMessage>,
    event: SupervisionEvent,
    s: &mut Session,
) -> Result<(), ActorProcessingErr> {
    let is_monitor = |cell: &ractor::ActorCell| {
        s.st.monitor
            .as_ref()
            .is_some_and(|m| m.get_id() == cell.get_id())
    };
    match event {
        SupervisionEvent::ActorTerminated(cell, final_state, _) => {
            if is_monitor(&cell) {
                s.st.monitor = None;
                return Ok(());
            }
            let Some(slot) = s.st.in_flight.remove(&cell.get_id()) else {
                return Ok(());
            };
            let result = final_state
                .and_then(|mut b| b.take::<WorkerState>().ok())
                .and_then(|w| w.result)
                .unwrap_or_else(|| {
                    AttemptResult::Failed("the worker stopped without a report".into())
                });
            on_attempt(
                myself,
                s,
                (slot.index, slot.attempt, slot.times),
                Ended::Report(result),
            )
            .await?;
            advance(myself, s).await
        }
        SupervisionEvent::ActorFailed(cell, error) => {
            if is_monitor(&cell) {
                s.st.monitor = None;
                if s.st.phase != Phase::Finalized {
                    s.shared.emitter.emit(EventKind::MonitorRestarted {
                        error: error.to_string(),
                    });
                    spawn_monitor(myself, s).await;
                }
                return Ok(());
            }
            let Some(slot) = s.st.in_flight.remove(&cell.get_id()) else {
                return Ok(());
            };
            let panicked = Ended::Panicked(error.to_string());
            on_attempt(myself, s, (slot.index, slot.attempt, slot.times), panicked).await?;
            advance(myself, s).await
        }
        _ => Ok(()),
    }
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

/// One attempt ended: schedule its retry, or record its final outcome (finalizing on
/// `FailFast`). The caller then calls [`advance`].
async fn on_attempt(
    myself: &ActorRef<SessionMessage>,
    s: &mut Session,
    (index, attempt, times): (usize, u32, Times),
    ended: Ended,
) -> Result<(), ActorProcessingErr> {
    if s.st.phase == Phase::Finalized {
        return Ok(());
    }
    let Some(resource_id) = s.shared.resources.get(index).cloned() else {
        return Ok(());
    };
    let now = Instant::now();
    let outcome = match ended {
        Ended::Report(AttemptResult::Succeeded) => ResourceOutcome::Succeeded,
        Ended::Report(AttemptResult::Failed(error)) | Ended::SpawnFailed(error) => {
            ResourceOutcome::Failed { error }
        }
        Ended::Report(AttemptResult::TimedOut) => ResourceOutcome::TimedOut,
        Ended::Report(AttemptResult::Cancelled) => ResourceOutcome::Cancelled,
        Ended::Panicked(message) => ResourceOutcome::Panicked { message },
    };
    let Times {
        first_started,
        started,
    } = times;
    emit_attempt(
        &s.shared.emitter,
        &resource_id,
        attempt,
        &outcome,
        now.saturating_duration_since(started),
    );

    let retryable = matches!(
        outcome,
        ResourceOutcome::Failed { .. }
            | ResourceOutcome::Panicked { .. }
            | ResourceOutcome::TimedOut
    );
    if s.st.phase == Phase::Running && retryable && attempt < s.shared.config.retry.max_attempts {
        let delay = s.shared.config.retry.backoff(attempt);
        s.shared.emitter.emit(EventKind::WorkerRetrying {
            resource_id,
            next_attempt: attempt + 1,
            delay,
        });
        let timer = myself.send_after(delay, move || SessionMessage::RetryDue { index });
        s.st.waiting.insert(
            index,
            Waiting {
                next_attempt: attempt + 1,
                first_started,
                timer,
            },
        );
        return Ok(());
    }

    let failed = !outcome.is_success();
    let record = OutcomeRecord {
        resource_id,
        outcome,
        attempts: attempt,
        elapsed: now.saturating_duration_since(first_started),
    };
    s.st.writes
        .submit(&s.shared.deps.store, s.shared.id, record)
        .await;
    s.st.settle_writes(&s.shared.emitter);
    s.st.done += 1;
    if failed
        && s.st.phase == Phase::Running
        && s.shared.config.failure_policy == FailurePolicy::FailFast
    {
        return finalize(myself, s, FinalizeReason::FailFast).await;
    }
    Ok(())
}

fn emit_attempt(
    emitter: &SessionEmitter,
    resource_id: &ResourceId,
    attempt: u32,
    outcome: &ResourceOutcome,
    elapsed: std::time::Duration,
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
        },
        ResourceOutcome::Cancelled | ResourceOutcome::Lost => EventKind::WorkerCancelled {
            resource_id,
            attempt,
        },
    });
}
