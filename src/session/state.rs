//! The SessionActor's mutable state: the worker window, retries waiting on their backoff,
//! and the phase.

use std::collections::{HashMap, VecDeque};

use ractor::{ActorCell, ActorId, ActorRef, MessagingErr};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::finalizer::{InFlight, Local};
use crate::model::{OutcomeRecord, ResourceId};
use crate::monitor::MonitorMessage;
use crate::session::SessionMessage;
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

/// One attempt in flight.
pub(crate) struct Slot {
    pub(crate) index: usize,
    pub(crate) attempt: u32,
    /// When the resource's first attempt started (elapsed counts backoff too).
    pub(crate) first_started: Instant,
    pub(crate) cell: ActorCell,
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
    /// Next never-started resource index.
    pub(crate) next_fresh: usize,
    /// Retries whose backoff is over, first come first served, before fresh resources.
    pub(crate) ready: VecDeque<(usize, u32, Instant)>,
    /// Attempts running now, by worker actor id. Its size is the window.
    pub(crate) in_flight: HashMap<ActorId, Slot>,
    /// Retries waiting on their backoff timer, by resource index.
    pub(crate) waiting: HashMap<usize, Waiting>,
    /// Resources with a final outcome.
    pub(crate) done: usize,
    pub(crate) monitor: Option<ActorRef<MonitorMessage>>,
    /// Outcome writes submitted and not yet answered.
    pub(crate) writes: OutcomeWrites,
    /// Final outcomes the store failed to record, kept for the finalizer.
    pub(crate) unrecorded: Vec<OutcomeRecord>,
    /// Store failures seen, for the report (the first [`MAX_STORE_ERRORS`]).
    pub(crate) store_errors: Vec<String>,
    pub(crate) abort_timer: Option<JoinHandle<Result<(), MessagingErr<SessionMessage>>>>,
}

impl SessionState {
    pub(crate) fn new() -> Self {
        Self {
            phase: Phase::Running,
            next_fresh: 0,
            ready: VecDeque::new(),
            in_flight: HashMap::new(),
            waiting: HashMap::new(),
            done: 0,
            monitor: None,
            writes: OutcomeWrites::default(),
            unrecorded: Vec::new(),
            store_errors: Vec::new(),
            abort_timer: None,
        }
    }

    /// The next attempt to start: a due retry first, else a fresh resource.
    pub(crate) fn next_attempt(&mut self, total: usize) -> Option<(usize, u32, Instant)> {
        if let Some(next) = self.ready.pop_front() {
            return Some(next);
        }
        if self.next_fresh < total {
            let index = self.next_fresh;
            self.next_fresh += 1;
            return Some((index, 1, Instant::now()));
        }
        None
    }

    /// Stops retry timers but keeps the waiting resources, so finalization still knows the
    /// attempts they made. Used on abort: no new attempt starts from here.
    pub(crate) fn stop_retry_timers(&self) {
        for w in self.waiting.values() {
            w.timer.abort();
        }
    }

    /// Notes a store failure for the report.
    pub(crate) fn store_failed(&mut self, error: String) {
        match self.store_errors.len() {
            n if n < MAX_STORE_ERRORS => self.store_errors.push(error),
            n if n == MAX_STORE_ERRORS => self.store_errors.push("... and more".to_owned()),
            _ => {}
        }
    }

    /// Kills every running worker, stops every timer, and hands over what only this actor
    /// knows: the unfinished resources' work, unrecorded outcomes, store errors.
    pub(crate) fn wind_down(&mut self, resources: &[ResourceId]) -> Local {
        Local {
            in_flight: self.stop_all(resources),
            unrecorded: std::mem::take(&mut self.unrecorded),
            store_errors: std::mem::take(&mut self.store_errors),
        }
    }

    fn stop_all(&mut self, resources: &[ResourceId]) -> InFlight {
        let mut unfinished = InFlight::new();
        let mut note = |index: usize, attempts: u32, first: Instant| {
            if let Some(id) = resources.get(index) {
                unfinished.insert(id.clone(), (attempts, first.elapsed()));
            }
        };
        for (_, slot) in self.in_flight.drain() {
            slot.cell.kill();
            note(slot.index, slot.attempt, slot.first_started);
        }
        for (index, w) in self.waiting.drain() {
            w.timer.abort();
            note(index, w.next_attempt - 1, w.first_started);
        }
        for (index, attempt, first) in self.ready.drain(..) {
            note(index, attempt - 1, first);
        }
        if let Some(t) = self.abort_timer.take() {
            t.abort();
        }
        unfinished
    }
}
