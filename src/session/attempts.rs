//! Attempts: starting a ResourceWorker, hearing how it ended (its report inside
//! `ActorTerminated`, a panic as `ActorFailed`), retrying with backoff or recording the final
//! outcome, and settling outcome writes the store answered.

use std::sync::Arc;

use ractor::{Actor, ActorProcessingErr, ActorRef, SupervisionEvent};
use tokio::time::Instant;

use crate::config::FailurePolicy;
use crate::error::StoreError;
use crate::events::{EventKind, SessionEmitter};
use crate::harvest::{HarvestContext, Heartbeat};
use crate::model::{FinalizeReason, OutcomeRecord, ResourceId, ResourceOutcome};
use crate::session::state::{Phase, Slot, Waiting};
use crate::session::writes::Written;
use crate::session::{Session, SessionMessage, advance, finalize, spawn_monitor};
use crate::worker::{AttemptReport, AttemptResult, ResourceWorker, WorkerArgs, WorkerState};

pub(super) async fn start_worker(
    myself: &ActorRef<SessionMessage>,
    s: &mut Session,
    index: usize,
    attempt: u32,
    first_started: Instant,
) -> Result<(), ActorProcessingErr> {
    let shared = &s.shared;
    let Some(resource_id) = shared.resources.get(index).cloned() else {
        return Ok(());
    };
    let args = WorkerArgs {
        harvester: Arc::clone(&shared.deps.harvester),
        ctx: HarvestContext {
            session_id: shared.id,
            harvester_id: shared.harvester_id.clone(),
            resource_id: resource_id.clone(),
            attempt,
            // One token for the whole session: a clone is cheaper than a child token (which
            // allocates and locks the parent), and attempts are only ever cancelled together.
            cancel: shared.cancel.clone(),
            heartbeat: Heartbeat::new(shared.config.heartbeat_timeout.is_some()),
        },
        resource_timeout: shared.config.resource_timeout,
        heartbeat_timeout: shared.config.heartbeat_timeout,
        span: tracing::info_span!(parent: shared.emitter.span(), "resource", %resource_id, attempt),
    };
    shared.emitter.emit(EventKind::WorkerStarted {
        resource_id: resource_id.clone(),
        attempt,
    });
    match Actor::spawn_linked(None, ResourceWorker, args, myself.get_cell()).await {
        Ok((worker, _)) => {
            let slot = Slot {
                index,
                attempt,
                first_started,
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
                (index, attempt, first_started),
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
            let report = final_state
                .and_then(|mut b| b.take::<WorkerState>().ok())
                .and_then(|w| w.report)
                .unwrap_or(AttemptReport {
                    result: AttemptResult::Failed("the worker stopped without a report".into()),
                    elapsed: slot.first_started.elapsed(),
                });
            on_attempt(
                myself,
                s,
                (slot.index, slot.attempt, slot.first_started),
                Ended::Report(report),
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
            on_attempt(
                myself,
                s,
                (slot.index, slot.attempt, slot.first_started),
                panicked,
            )
            .await?;
            advance(myself, s).await
        }
        _ => Ok(()),
    }
}

/// How an attempt ended, as the session learns it.
enum Ended {
    /// The worker stopped with its report.
    Report(AttemptReport),
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
    (index, attempt, first_started): (usize, u32, Instant),
    ended: Ended,
) -> Result<(), ActorProcessingErr> {
    if s.st.phase == Phase::Finalized {
        return Ok(());
    }
    let Some(resource_id) = s.shared.resources.get(index).cloned() else {
        return Ok(());
    };
    let (outcome, elapsed) = match ended {
        Ended::Report(r) => (
            match r.result {
                AttemptResult::Succeeded => ResourceOutcome::Succeeded,
                AttemptResult::Failed(error) => ResourceOutcome::Failed { error },
                AttemptResult::TimedOut => ResourceOutcome::TimedOut,
                AttemptResult::Cancelled => ResourceOutcome::Cancelled,
            },
            r.elapsed,
        ),
        Ended::Panicked(message) => (
            ResourceOutcome::Panicked { message },
            first_started.elapsed(),
        ),
        Ended::SpawnFailed(error) => (ResourceOutcome::Failed { error }, std::time::Duration::ZERO),
    };
    emit_attempt(&s.shared.emitter, &resource_id, attempt, &outcome, elapsed);

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
        elapsed: first_started.elapsed(),
    };
    let answered =
        s.st.writes
            .submit(&s.shared.deps.store, s.shared.id, record)
            .await;
    settle_writes(s, answered);
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

/// Takes note of answered outcome writes. A failed write must neither lose the outcome nor
/// stop the session: it is kept for the finalizer (which writes it with the completion) and
/// the error is reported.
pub(super) fn settle_writes(s: &mut Session, answered: Vec<Written>) {
    for (record, result) in answered {
        match result {
            Ok(()) | Err(StoreError::Finalizing { .. }) => {}
            Err(e) => {
                let error = crate::harvest::error_chain(&e);
                s.shared.emitter.emit(EventKind::StoreFailed {
                    operation: format!("record the outcome of {}", record.resource_id),
                    error: error.clone(),
                });
                s.st.store_failed(error);
                s.st.unrecorded.push(record);
            }
        }
    }
}
