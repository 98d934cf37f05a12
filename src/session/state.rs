//! The SessionActor's mutable state: its workers, retries waiting on their backoff, and
//! the phase. (The attempts' queue is shared with the workers: see `dispatch`.)

use std::collections::HashMap;
use std::sync::Arc;

use ractor::{ActorRef, MessagingErr};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::error::StoreError;
use crate::events::{EventKind, SessionEmitter};
use crate::finalizer::{InFlight, Local};
use crate::model::{OutcomeRecord, ResourceId};
use crate::monitor::MonitorMessage;
use crate::session::SessionMessage;
use crate::session::dispatch::Dispatch;
use crate::session::writes::OutcomeWrites;

/// Store errors kept for the report; more are counted in the last line.
pub(crate) const MAX_STORE_ERRORS: usize = 20;

/// Where the session actor is. Finalization is not a phase it can leave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Starting workers and collecting outcomes.
    Running,
    /// Abort requested: no new attempts; waiting for workers up to `abort_grace`.
    Aborting,
    /// Finalized (or finalizing): everything else is ignored.
    Finalized,
}

/// When an attempt started, and when its resource's first attempt did.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Times {
    /// The resource's first attempt (its elapsed time counts every attempt and backoff).
    pub(crate) first_started: Instant,
    /// This attempt.
    pub(crate) started: Instant,
}

/// One attempt in flight (in the session's queue, by its key).
pub(crate) struct Slot {
    pub(crate) index: usize,
    pub(crate) attempt: u32,
    pub(crate) times: Times,
    /// How it ended, once it has (its report is then on its way to the session).
    pub(crate) ended: Option<crate::worker::Ended>,
    /// It ended with a failure final under `FailFast`, which holds the queue closed.
    pub(crate) holds: bool,
}

/// A resource waiting for its retry's backoff.
pub(crate) struct Waiting {
    pub(crate) next_attempt: u32,
    pub(crate) first_started: Instant,
    pub(crate) timer: JoinHandle<Result<(), MessagingErr<SessionMessage>>>,
}

/// Mutable data of one SessionActor.
pub(crate) struct SessionState {
    pub(crate) phase: Phase,
    /// The workers' tasks (at most `max_concurrency` run; see `dispatch`).
    pub(crate) workers: tokio::task::JoinSet<()>,
    /// Resources with a final outcome.
    pub(crate) done: usize,
    pub(crate) monitor: Option<ActorRef<MonitorMessage>>,
    /// Outcome writes submitted and not yet answered.
    pub(crate) writes: OutcomeWrites,
    /// The resource index of every outcome submitted, in order (see [`Local::submitted`]).
    pub(crate) submitted: Vec<u32>,
    /// Made at the first retry, abort or store failure; see [`Rare`].
    rare: Option<Box<Rare>>,
}

/// What only retries, aborts and store failures use, boxed apart: ractor keeps an actor's
/// state inside its mailbox loop for the actor's whole life, so every idle session paid
/// for these 136 bytes (10,000 idle sessions: 0.1 KiB less each).
#[derive(Default)]
pub(crate) struct Rare {
    /// Retries waiting on their backoff timer, by resource index.
    pub(crate) waiting: HashMap<usize, Waiting>,
    /// Final outcomes the store failed to record, kept for the finalizer.
    pub(crate) unrecorded: Vec<OutcomeRecord>,
    /// Store failures seen, for the report (the first [`MAX_STORE_ERRORS`]).
    pub(crate) store_errors: Vec<String>,
    pub(crate) abort_timer: Option<JoinHandle<Result<(), MessagingErr<SessionMessage>>>>,
    /// A write was refused by the session's fence: another node took the session over.
    pub(crate) taken_over: bool,
    /// The node is self-fenced: no attempt starts, and the attempts that end are run
    /// again (same attempt number) once it renews its lease.
    pub(crate) fenced: bool,
    /// The session's first write failed and is tried again after this wait (doubling):
    /// nothing starts until it passes.
    pub(crate) begin_retry: Option<std::time::Duration>,
}

impl SessionState {
    pub(crate) fn new() -> Self {
        Self {
            phase: Phase::Running,
            workers: tokio::task::JoinSet::new(),
            done: 0,
            monitor: None,
            writes: OutcomeWrites::default(),
            submitted: Vec::new(),
            rare: None,
        }
    }

    /// The rarely used part, made on first use.
    pub(crate) fn rare(&mut self) -> &mut Rare {
        self.rare.get_or_insert_with(Box::default)
    }

    /// The retry waiting for resource `index`, taken out.
    pub(crate) fn take_waiting(&mut self, index: usize) -> Option<Waiting> {
        self.rare.as_mut()?.waiting.remove(&index)
    }

    /// Stops retry timers but keeps the waiting resources, so finalization still knows the
    /// attempts they made. Used on abort: no new attempt starts from here.
    pub(crate) fn stop_retry_timers(&self) {
        for w in self.rare.iter().flat_map(|r| r.waiting.values()) {
            w.timer.abort();
        }
    }

    /// Takes note of answered outcome writes. A failed write must neither lose the outcome
    /// nor stop the session: it is kept for the finalizer (which writes it with the
    /// completion) and the error is reported.
    pub(crate) fn settle_writes(&mut self, emitter: &SessionEmitter) {
        for (record, result) in self.writes.answered.drain(..) {
            match result {
                Ok(()) | Err(StoreError::Finalizing { .. }) => {}
                // Another node holds the session now: the outcome is its business (it
                // re-harvests or counts the resource lost), and this actor stops.
                Err(StoreError::Fenced { .. }) => {
                    self.rare.get_or_insert_with(Box::default).taken_over = true;
                }
                Err(e) => {
                    let error = crate::harvest::error_chain(&e);
                    emitter.emit(EventKind::StoreFailed {
                        operation: format!("record the outcome of {}", record.resource_id),
                        error: error.clone(),
                    });
                    let rare = self.rare.get_or_insert_with(Box::default);
                    note_store_error(&mut rare.store_errors, error);
                    rare.unrecorded.push(record);
                }
            }
        }
    }

    /// Whether the node is self-fenced (see [`Rare::fenced`]).
    pub(crate) fn is_fenced(&self) -> bool {
        self.rare.as_ref().is_some_and(|r| r.fenced)
    }

    /// The session's first write passed.
    pub(crate) fn began(&mut self) {
        if let Some(rare) = &mut self.rare {
            rare.begin_retry = None;
        }
    }

    /// Whether the session's first write has yet to pass (see [`Rare::begin_retry`]).
    pub(crate) fn not_begun(&self) -> bool {
        self.rare.as_ref().is_some_and(|r| r.begin_retry.is_some())
    }

    /// Whether a write found the session taken over by another node.
    pub(crate) fn taken_over(&self) -> bool {
        self.rare.as_ref().is_some_and(|r| r.taken_over)
    }

    /// Kills every worker still running (the queue closed, and they written off): a
    /// killed worker drops its attempt at its next `.await` and reports it as killed.
    /// (The queue tells them; the abort is for a worker between attempts.)
    pub(crate) fn kill_workers(&mut self, dispatch: &Dispatch, for_good: bool) {
        dispatch.kill(for_good);
        self.workers.abort_all();
    }

    /// Forgets the workers ([`Self::kill_workers`] stopped them), stops every timer, and
    /// hands over what only this actor knows: the unfinished resources' work, unrecorded
    /// outcomes, store errors.
    /// `whole`: `resources` is the session's whole list (a resumed session holds only
    /// what it re-harvests).
    pub(crate) fn wind_down(
        &mut self,
        resources: &Arc<[ResourceId]>,
        dispatch: &Dispatch,
        whole: bool,
        budget: &crate::budget::BudgetSource,
    ) -> Local {
        let in_flight = self.stop_all(resources, dispatch);
        let (unrecorded, store_errors) = match &mut self.rare {
            Some(rare) => (
                std::mem::take(&mut rare.unrecorded),
                std::mem::take(&mut rare.store_errors),
            ),
            None => Default::default(),
        };
        Local {
            in_flight,
            unrecorded,
            store_errors,
            resources: whole.then(|| Arc::clone(resources)),
            submitted: if whole {
                std::mem::take(&mut self.submitted)
            } else {
                Vec::new()
            },
            budget: Some(budget.clone()),
        }
    }

    fn stop_all(&mut self, resources: &[ResourceId], dispatch: &Dispatch) -> InFlight {
        let mut unfinished = InFlight::new();
        let mut note = |index: usize, attempts: u32, first: Instant| {
            if let Some(id) = resources.get(index) {
                unfinished.insert(id.clone(), (attempts, first.elapsed()));
            }
        };
        // In flight (with the attempts made so far), and ready to run again (made one
        // fewer).
        for (index, attempts, first) in dispatch.drain() {
            note(index, attempts, first);
        }
        if let Some(rare) = &mut self.rare {
            for (index, w) in rare.waiting.drain() {
                w.timer.abort();
                note(index, w.next_attempt - 1, w.first_started);
            }
            if let Some(t) = rare.abort_timer.take() {
                t.abort();
            }
        }
        unfinished
    }
}

/// Keeps the first [`MAX_STORE_ERRORS`] store errors, then one line saying there were more.
pub(crate) fn note_store_error(errors: &mut Vec<String>, error: String) {
    match errors.len() {
        n if n < MAX_STORE_ERRORS => errors.push(error),
        n if n == MAX_STORE_ERRORS => errors.push("... and more".to_owned()),
        _ => {}
    }
}
