//! The exactly-once finalizer, and what it promises across crashes.
//!
//! Finalizing is a state transition in the store, not a flag in an actor. The store records
//! three durable steps:
//! 1. **claimed** ([`SessionStore::claim_finalization`]): a compare-and-set; the loser stops
//!    here and the winner alone goes on;
//! 2. **finalizer started** ([`SessionStore::finalizer_started`]), once the report is
//!    reconciled (every resource without an outcome gets the reason's missing outcome:
//!    `TimedOut`, `Cancelled` or `Lost`, never success), right before the user finalizer
//!    runs (its panic caught and, on the root's paths, its time bounded);
//! 3. **completed** ([`SessionStore::complete_finalization`]): terminal status, counts,
//!    finalizer error, harvester freed; written exactly once.
//!
//! Who finishes a session whose finalizer did not complete looks at those steps:
//! - [`Mode::Force`], the root rescuing a session of this process (its actor died or was
//!   escalated): claimed but not started, it runs the finalizer (it never ran); started,
//!   it completes the session with an error and does not run it again (it ran here, and
//!   was cut for hanging): within one healthy process the finalizer runs exactly once;
//! - [`Mode::Recover`], recovery of a session a dead process left: claimed but not started,
//!   it runs the finalizer; started, [`FinalizerRecovery::Rerun`] runs it again and says
//!   so in `SessionReport::finalizer_attempt`, or [`FinalizerRecovery::Skip`] records that
//!   it was interrupted. Across a crash while it runs, the finalizer runs at least once,
//!   and knowingly more.
//!
//! Every store step is retried with backoff while the store fails (a full disk, a lost
//! connection): visibly (a `StoreFailed` event and an error line per failure), keeping
//! what this process knows in memory, and with the harvester busy, since the session is
//! not finalized until the completion is written.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use chrono::Utc;
use futures::FutureExt;
use tokio::time::Instant;

use crate::config::FinalizerRecovery;
use crate::error::StoreError;
use crate::events::{EventBus, EventKind, SessionEmitter};
use crate::harvest::{ResourceHarvester, SessionFinalizer, error_chain};
use crate::model::{
    FinalizeReason, OutcomeCounts, OutcomeRecord, ResourceId, SessionId, SessionRecord,
    SessionReport, SessionStatus,
};
use crate::monitor::ticker::Ticker;
use crate::store::{Claim, Completed, Completion, SessionStore};

/// What every actor of a supervisor shares.
pub(crate) struct Deps {
    pub(crate) store: Arc<dyn SessionStore>,
    pub(crate) harvester: Arc<dyn ResourceHarvester>,
    pub(crate) finalizer: Arc<dyn SessionFinalizer>,
    pub(crate) bus: EventBus,
    /// The monitors' shared clock.
    pub(crate) ticker: Ticker,
    /// The running sessions and attempts, for the gauges.
    pub(crate) gauges: Arc<crate::meters::Gauges>,
    /// The longest wait between two tries of a failing store step.
    pub(crate) store_retry_max: Duration,
    /// What recovery does with a finalizer a crash interrupted.
    pub(crate) finalizer_recovery: FinalizerRecovery,
    /// This process's node: its id owns the sessions it creates.
    pub(crate) node: Arc<crate::node::Node>,
    /// The tasks writing outcomes a completion had to drop (see `write_late_outcomes`).
    pub(crate) late: LateWrites,
}

/// The tasks writing outcomes a completion had to drop: shutdown asks them for one last
/// try and waits for them (bounded), so that a clean stop loses nothing it could write.
#[derive(Clone, Default)]
pub(crate) struct LateWrites {
    pub(crate) tasks: tokio_util::task::TaskTracker,
    pub(crate) stop: tokio_util::sync::CancellationToken,
}

impl LateWrites {
    /// Asks every task for its last try and waits up to `bound` for them.
    pub(crate) async fn finish(&self, bound: Duration) {
        self.stop.cancel();
        self.tasks.close();
        if tokio::time::timeout(bound, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                "outcomes a completion had dropped were still being written at shutdown"
            );
        }
    }
}

/// Where a session's finalization stands, as this process last wrote it to the store.
///
/// The store is the authority; this cell mirrors its transitions (written right after them
/// by whoever made them, never by answering a question), so the monitor can look every tick
/// at no cost and read the store itself only now and then. A stuck SessionActor cannot
/// block it: it is a plain atomic.
#[derive(Debug, Default)]
pub(crate) struct Lifecycle {
    state: AtomicU8,
    /// When the finalizing actor last tried a failing store step, while it retries one
    /// (`None` otherwise): the monitor does not escalate a session that is alive and
    /// waiting for its store, since the root could do no better and would lose what the
    /// session holds in memory.
    store_retry: std::sync::Mutex<Option<Instant>>,
}

impl Lifecycle {
    pub(crate) const CLAIMED: u8 = 1;
    const TERMINAL: u8 = 2;

    pub(crate) fn raise(&self, to: u8) {
        self.state.fetch_max(to, Ordering::AcqRel);
    }

    /// Finalization was claimed (by anyone).
    pub(crate) fn is_claimed(&self) -> bool {
        self.state.load(Ordering::Acquire) >= Self::CLAIMED
    }

    /// The session is terminal.
    pub(crate) fn is_terminal(&self) -> bool {
        self.state.load(Ordering::Acquire) >= Self::TERMINAL
    }

    /// Mirrors what the store says about the session.
    pub(crate) fn observe(&self, record: &SessionRecord) {
        if record.status.is_terminal() {
            self.raise(Self::TERMINAL);
        } else if record.finalizing.is_some() {
            self.raise(Self::CLAIMED);
        }
    }

    fn retry(&self) -> std::sync::MutexGuard<'_, Option<Instant>> {
        // A poisoned lock only means a panic mid-write of an `Option<Instant>`.
        self.store_retry.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the finalizing actor tried a failing store step within `within`.
    pub(crate) fn retrying_store(&self, within: Duration) -> bool {
        self.retry().is_some_and(|at| at.elapsed() <= within)
    }
}

/// Who is finalizing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// The SessionActor: only a won claim goes on.
    Own,
    /// The root, after the SessionActor of this process died or was killed: a claim left
    /// behind by the dead actor is finished (see the module docs), and the finalizer is
    /// bounded by the given timeout because nobody watches the root.
    Force { finalizer_timeout: Duration },
    /// Recovery of a session a dead process left (see the module docs), its finalizer
    /// bounded as in `Force`.
    Recover { finalizer_timeout: Duration },
}

/// How a call to [`finalize`] ended.
#[derive(Debug)]
pub(crate) enum Finalized {
    /// This call made the session terminal.
    Now(SessionRecord),
    /// Somebody else already finalized (or, for [`Mode::Own`], is finalizing) it.
    NotByUs,
}

/// Attempts and elapsed time of resources still in flight, so that their reconciled
/// outcome tells the truth about the work done.
pub(crate) type InFlight = HashMap<ResourceId, (u32, Duration)>;

/// What the finalizing actor knows that the store may not.
#[derive(Debug, Default)]
pub(crate) struct Local {
    /// Resources unfinished at finalization, with the work they had done.
    pub(crate) in_flight: InFlight,
    /// Final outcomes the store failed to record: they are the truth, and are written
    /// with the completion.
    pub(crate) unrecorded: Vec<OutcomeRecord>,
    /// Store failures seen during the session, for the report.
    pub(crate) store_errors: Vec<String>,
    /// The session's whole resource list, when the finalizing actor holds it (it never
    /// changes after the session is created; a resumed session holds only the part it
    /// re-harvests); `None`: read it from the store. A million-resource
    /// session's list is a million reference counts and 16 MB to copy, or a long read from
    /// the durable store.
    pub(crate) resources: Option<Arc<[ResourceId]>>,
    /// With `resources`: the index in it of each outcome this actor submitted, in
    /// submission order, which is the order the store lists them in. It places each
    /// recorded outcome without hashing its id; it is checked against the store's list,
    /// and any difference (a failed write, an outcome from elsewhere) falls back to
    /// finding them by id.
    pub(crate) submitted: Vec<u32>,
    /// How the session's budget was chosen, when the finalizing actor knows (it runs
    /// under the config the store keeps); `None`: read the stored config. A read less per
    /// session on the way to its finalizer.
    pub(crate) budget: Option<crate::budget::BudgetSource>,
}

/// Whether and how the finalizer runs in this finalization.
enum Run {
    /// Run it (its first run, or a re-run after a crash).
    Yes,
    /// Do not: complete with this error.
    No(String),
}

/// Finalizes session `id` once. See the module docs.
pub(crate) async fn finalize(
    deps: &Deps,
    emitter: &SessionEmitter,
    id: SessionId,
    reason: FinalizeReason,
    mut local: Local,
    lifecycle: &Lifecycle,
    mode: Mode,
) -> Result<Finalized, StoreError> {
    let fence = emitter.fence();
    // A finalizer that runs inside the store's completing transaction (see
    // `SessionFinalizer::in_completion`): its effects commit with the completion or not
    // at all, so running it again after an interrupted run is exactly once.
    let in_completion = deps.finalizer.in_completion();
    let mut retry = Retry::new(deps, emitter, lifecycle);
    let claim = retry
        .step("claim the finalization", || {
            deps.store.claim_finalization(id, fence, reason)
        })
        .await?;
    let (before, reason, run) = match claim {
        Claim::Claimed(before) => {
            lifecycle.raise(Lifecycle::CLAIMED);
            (before, reason, Run::Yes)
        }
        Claim::AlreadyFinalized(r) => {
            lifecycle.observe(&r);
            return Ok(Finalized::NotByUs);
        }
        Claim::AlreadyClaimed(r) => {
            lifecycle.raise(Lifecycle::CLAIMED);
            // The claimant is gone: finish its work under its reason.
            let claimed = r.finalizing.unwrap_or(reason);
            let run = match (mode, r.finalizer_attempts) {
                (Mode::Own, _) => return Ok(Finalized::NotByUs),
                // It died before its finalizer started: the finalizer never ran.
                (_, 0) => Run::Yes,
                (Mode::Force { finalizer_timeout }, _) => Run::No(format!(
                    "the finalizer did not return: its session was escalated (or its actor \
                     died) while it ran, {} or more after it started; it is not run again",
                    humantime::format_duration(finalizer_timeout)
                )),
                // Its interrupted run committed nothing: run it again.
                (Mode::Recover { .. }, _) if in_completion.is_some() => Run::Yes,
                (Mode::Recover { .. }, n) => match deps.finalizer_recovery {
                    FinalizerRecovery::Rerun => Run::Yes,
                    FinalizerRecovery::Skip => Run::No(format!(
                        "the finalizer was interrupted (its process died during run {n}) and \
                         is not run again (FinalizerRecovery::Skip)"
                    )),
                },
            };
            (r, claimed, run)
        }
    };

    local.store_errors.extend(retry.take_errors());
    let (mut report, unrecorded) = loop {
        match reconcile(deps, &before, reason, &mut local).await {
            Ok(done) => break done,
            Err(e) => retry.failed("read the session's outcomes", e).await?,
        }
    };
    let status = report.status;
    let counts = report.counts;
    let started = report.started;

    // Set: the finalizer runs in the completion, with this report, within this time.
    let mut in_store: Option<(
        crate::harvest::InCompletion,
        SessionReport,
        Option<Duration>,
    )> = None;
    let finalizer_error = match run {
        Run::Yes => {
            // A self-fenced node runs no finalizer: its lease may have expired and another
            // node may be taking the session over. It waits for a renewal; then the
            // fenced write below says whether the session is still its own.
            if deps.node.is_fenced() {
                emitter.emit(EventKind::LeaseLost {
                    node: deps.node.id(),
                });
                deps.node.until_unfenced().await;
            }
            let attempt = retry
                .step("record that the finalizer starts", || {
                    deps.store.finalizer_started(id, fence)
                })
                .await?;
            report.finalizer_attempt = attempt;
            emitter.emit(EventKind::FinalizerStarted { reason, attempt });
            let timeout = match mode {
                Mode::Own => None,
                Mode::Force { finalizer_timeout } | Mode::Recover { finalizer_timeout } => {
                    Some(finalizer_timeout)
                }
            };
            match &in_completion {
                Some(work) => {
                    in_store = Some((work.clone(), report, timeout));
                    None
                }
                None => {
                    let began = Instant::now();
                    let error = run_user_finalizer(deps.finalizer.as_ref(), report, timeout).await;
                    crate::meters::finalizer_ran(began.elapsed());
                    error
                }
            }
        }
        Run::No(error) => Some(error),
    };

    // Outcomes the store missed: written with the completion if they fit, and again
    // once it is over (whatever of them the completion could not write: see
    // `write_late_outcomes`). Copied only in that rare case.
    let late = unrecorded.clone();
    let mut completion = Completion {
        reason,
        status,
        unrecorded,
        counts,
        finalizer_error: finalizer_error.clone(),
        ended: Utc::now(),
    };
    let mut tried = false;
    let completed = retry
        .step("complete the finalization", || {
            // A try whose answer was lost may have committed: a later one then finds the
            // session terminal, which is this finalization's own doing (nobody else
            // completes a session this one claimed while it lives).
            let again = std::mem::replace(&mut tried, true);
            if again && !completion.unrecorded.is_empty() {
                // The first try wrote the outcomes the store had missed with it; if it
                // failed (perhaps for want of room for them: a full disk), later tries
                // need O(1) new space. The counts still have them, as does the report.
                tracing::warn!(
                    outcomes = completion.unrecorded.len(),
                    "completing without the outcomes the store missed"
                );
                completion.unrecorded = Vec::new();
            }
            let completion = completion.clone();
            let in_store = in_store.as_ref();
            async move {
                let done = match in_store {
                    None => {
                        deps.store
                            .complete_finalization(id, fence, completion)
                            .await?
                    }
                    Some((work, report, timeout)) => {
                        // The finalizer runs inside the completion: timed with it.
                        let began = Instant::now();
                        let done =
                            complete_with(deps, id, fence, completion, work, report, *timeout)
                                .await?;
                        crate::meters::finalizer_ran(began.elapsed());
                        done
                    }
                };
                match done {
                    Completed::AlreadyFinalized(record) if again => Ok(Completed::Now(record)),
                    other => Ok(other),
                }
            }
        })
        .await?;
    lifecycle.raise(Lifecycle::TERMINAL);
    match completed {
        Completed::AlreadyFinalized(_) => Ok(Finalized::NotByUs),
        Completed::Now(record) => {
            crate::meters::session_finished(
                &record.harvester_id,
                status,
                reason,
                &counts,
                (Utc::now() - started).to_std().unwrap_or_default(),
            );
            // A finalizer that ran in the completion: its error is on the record.
            let error = if in_store.is_some() {
                record.finalizer_error.clone()
            } else {
                finalizer_error
            };
            emitter.emit(EventKind::FinalizerFinished {
                reason,
                status,
                error,
            });
            emitter.emit(EventKind::StatusChanged {
                from: before.status,
                to: status,
            });
            if !late.is_empty() {
                write_late_outcomes(deps, id, late);
            }
            Ok(Finalized::Now(record))
        }
    }
}

/// How long the outcomes a completion could not write are tried again for (a disk full
/// for longer than this loses them, as a process that dies before does).
const LATE_OUTCOMES_FOR: Duration = Duration::from_secs(24 * 3600);

/// The longest wait between two tries of those (at least the supervisor's own).
const LATE_OUTCOMES_RETRY_MAX: Duration = Duration::from_secs(300);

/// Writes, in a task of its own, the outcomes a finalized session observed and the store
/// missed, which its completion may not have written (a full disk, a lost connection:
/// the finalization completed without them rather than wait; writing those already
/// written writes nothing). Until they are written the stored outcomes derive those
/// resources from the reason (`lost` for a completed session) while its counts have the
/// truth. Tried again with backoff (up to [`LATE_OUTCOMES_RETRY_MAX`]) while the store
/// answers with an error that may pass, for up to [`LATE_OUTCOMES_FOR`]; a shutdown asks
/// for one last try. The first failure is a warning, the next ones debug lines.
fn write_late_outcomes(deps: &Deps, id: SessionId, outcomes: Vec<OutcomeRecord>) {
    let store = Arc::clone(&deps.store);
    let retry_max = deps.store_retry_max.max(LATE_OUTCOMES_RETRY_MAX);
    let stop = deps.late.stop.clone();
    deps.late.tasks.spawn(async move {
        let began = Instant::now();
        let mut delay = STORE_RETRY_FIRST;
        let mut failures = 0u32;
        loop {
            let last = stop.is_cancelled();
            match store.record_late_outcomes(id, &outcomes).await {
                Ok(written) => {
                    if written > 0 {
                        tracing::info!(session_id = %id, written,
                            "the outcomes the completion could not write are stored now");
                    }
                    return;
                }
                Err(error)
                    if error.is_transient() && !last && began.elapsed() < LATE_OUTCOMES_FOR =>
                {
                    failures = failures.saturating_add(1);
                    if failures == 1 {
                        tracing::warn!(session_id = %id, %error, outcomes = outcomes.len(),
                            "the outcomes the completion could not write are not stored yet; \
                             trying again until the store takes them");
                    } else {
                        tracing::debug!(session_id = %id, %error, failures,
                            "late outcomes still not stored");
                    }
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = stop.cancelled() => {}
                    }
                    delay = delay.saturating_mul(2).min(retry_max);
                }
                Err(error) => {
                    tracing::error!(session_id = %id, %error, outcomes = outcomes.len(),
                        "the outcomes the completion could not write are lost: the stored \
                         list derives them from the reason, the counts have them");
                    return;
                }
            }
        }
    });
}

/// The wait before the first retry of a store step that failed for a reason that may pass.
pub(crate) const STORE_RETRY_FIRST: Duration = Duration::from_millis(50);

/// A session's store step `what` failed with `error` and is tried again in `retry_in`:
/// logged (tracing and a `StoreFailed` event) and kept in `errors` for the report.
/// Returns the wait after the next failure: double, at most `retry_max` (and never under
/// [`STORE_RETRY_FIRST`]).
pub(crate) fn store_step_failed(
    emitter: &SessionEmitter,
    errors: &mut Vec<String>,
    what: &str,
    error: &StoreError,
    retry_in: Duration,
    retry_max: Duration,
) -> Duration {
    let text = error_chain(error);
    tracing::error!(
        operation = what,
        error = %text,
        retry_in = %humantime::format_duration(retry_in),
        "a store step of the session failed; retrying"
    );
    emitter.emit(EventKind::StoreFailed {
        operation: what.to_owned(),
        error: text.clone(),
    });
    crate::session::state::note_store_error(errors, text);
    retry_in
        .saturating_mul(2)
        .min(retry_max.max(STORE_RETRY_FIRST))
}

/// Store steps of one finalization, each tried until the store answers: with backoff from
/// [`STORE_RETRY_FIRST`] up to the supervisor's `store_retry_max`, each failure logged
/// (tracing and a `StoreFailed` event) and kept for the report. An error that trying again
/// cannot mend (an unknown session, a step the store refuses, a closed store) ends the
/// finalization with it.
struct Retry<'a> {
    deps: &'a Deps,
    emitter: &'a SessionEmitter,
    lifecycle: &'a Lifecycle,
    delay: Duration,
    errors: Vec<String>,
}

impl<'a> Retry<'a> {
    fn new(deps: &'a Deps, emitter: &'a SessionEmitter, lifecycle: &'a Lifecycle) -> Self {
        Self {
            deps,
            emitter,
            lifecycle,
            delay: STORE_RETRY_FIRST,
            errors: Vec::new(),
        }
    }

    async fn step<T, F, Fut>(&mut self, what: &str, mut step: F) -> Result<T, StoreError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, StoreError>>,
    {
        loop {
            match step().await {
                Ok(value) => {
                    *self.lifecycle.retry() = None;
                    return Ok(value);
                }
                Err(e) => self.failed(what, e).await?,
            }
        }
    }

    /// Notes a failure of `what` and waits before the next try; `Err` if trying again
    /// cannot help.
    async fn failed(&mut self, what: &str, error: StoreError) -> Result<(), StoreError> {
        if !error.is_transient() {
            *self.lifecycle.retry() = None;
            return Err(error);
        }
        let next = store_step_failed(
            self.emitter,
            &mut self.errors,
            what,
            &error,
            self.delay,
            self.deps.store_retry_max,
        );
        *self.lifecycle.retry() = Some(Instant::now());
        tokio::time::sleep(self.delay).await;
        *self.lifecycle.retry() = Some(Instant::now());
        self.delay = next;
        Ok(())
    }

    fn take_errors(&mut self) -> Vec<String> {
        std::mem::take(&mut self.errors)
    }
}

/// The last event of a session, once its monitor is cancelled and its workers stopped.
pub(crate) fn emit_finished(emitter: &SessionEmitter, record: &SessionRecord) {
    if let Some(reason) = record.reason() {
        emitter.emit(EventKind::SessionFinished {
            status: record.status,
            reason,
            total: record.total,
            counts: record.counts,
        });
    }
}

/// Builds the report: one outcome per resource, the unrecorded ones filled in.
async fn reconcile(
    deps: &Deps,
    before: &SessionRecord,
    reason: FinalizeReason,
    local: &mut Local,
) -> Result<(SessionReport, Vec<OutcomeRecord>), StoreError> {
    let stored;
    let resources: &[ResourceId] = match &local.resources {
        Some(held) => held,
        None => {
            stored = deps.store.resources(before.id).await?;
            &stored
        }
    };
    // Taken: a try after a failed read finds the outcomes by id instead (same answer).
    let recorded = Recorded::new(
        deps.store.outcomes(before.id).await?,
        resources,
        std::mem::take(&mut local.submitted),
    );
    let (outcomes, unrecorded) = match recorded {
        // The common end: the store's list, in place, is the report's.
        Recorded::Complete(all) => (all, Vec::new()),
        partial => fill_in(
            partial,
            resources,
            reason,
            &local.unrecorded,
            &local.in_flight,
        ),
    };
    let mut counts = OutcomeCounts::default();
    for record in &outcomes {
        counts.add(&record.outcome);
    }
    let aborted = reason == FinalizeReason::Aborted || before.status == SessionStatus::Aborting;
    let status = counts.terminal_status(outcomes.len(), aborted);
    let report = SessionReport {
        session_id: before.id,
        harvester_id: before.harvester_id.clone(),
        reason,
        status,
        total: outcomes.len(),
        counts,
        outcomes,
        started: before.started,
        store_errors: std::mem::take(&mut local.store_errors),
        finalizer_attempt: 1,
        workflow_time: before.workflow_time,
        budget: match local.budget.take() {
            Some(known) => Some(known),
            None => budget_of(deps, before.id).await,
        },
    };
    Ok((report, unrecorded))
}

/// How the session's budget was chosen, from its stored config (for the report only: a
/// failed read leaves it out rather than holding up the finalization).
async fn budget_of(
    deps: &Deps,
    id: crate::model::SessionId,
) -> Option<crate::budget::BudgetSource> {
    match deps.store.session_config(id).await {
        // A session stored without its config (an earlier version's) had a static budget.
        Ok(config) => Some(config.map_or(crate::budget::BudgetSource::Static, |c| {
            c.budget_source().clone()
        })),
        Err(error) => {
            tracing::warn!(session_id = %id, %error, "the session's config could not be read for its report");
            None
        }
    }
}

/// One outcome per resource, in resource order: the recorded one, else the one the store
/// failed to record, else the reason's missing outcome with the work done. The second
/// list holds the outcomes the store failed to record, to write with the completion (the
/// missing ones the store derives itself once the session is terminal).
fn fill_in(
    mut recorded: Recorded,
    resources: &[ResourceId],
    reason: FinalizeReason,
    unrecorded: &[OutcomeRecord],
    in_flight: &InFlight,
) -> (Vec<OutcomeRecord>, Vec<OutcomeRecord>) {
    let mut unrecorded: HashMap<&ResourceId, &OutcomeRecord> =
        unrecorded.iter().map(|o| (&o.resource_id, o)).collect();
    let mut outcomes = Vec::with_capacity(resources.len());
    let mut to_write = Vec::new();
    for (index, resource_id) in resources.iter().enumerate() {
        let record = if let Some(r) = recorded.take(index, resource_id) {
            r
        } else if let Some(r) = unrecorded.remove(resource_id) {
            to_write.push(r.clone());
            r.clone()
        } else {
            let (attempts, elapsed) = in_flight
                .get(resource_id)
                .copied()
                .unwrap_or((0, Duration::ZERO));
            OutcomeRecord {
                resource_id: resource_id.clone(),
                outcome: reason.missing_outcome(),
                attempts,
                elapsed,
            }
        };
        outcomes.push(record);
    }
    (outcomes, to_write)
}

/// No outcome for this resource (in [`Recorded::Placed`]).
const NONE: u32 = u32::MAX;

/// A session's recorded outcomes, taken out by resource in resource order: placed by the
/// indices the session noted when it submitted them, or else found by id.
///
/// Placing allocates no second list of outcomes: for a large session each such list is
/// megabytes of fresh memory, faulted in page by page on the path to the finalizer.
enum Recorded {
    /// Exactly one outcome per resource, permuted in place into resource order.
    Complete(Vec<OutcomeRecord>),
    /// Some resources have no outcome (or one has several): `slots[at[i]]` holds the
    /// outcome of `resources[i]` unless `at[i]` is [`NONE`].
    Placed {
        slots: Vec<Option<OutcomeRecord>>,
        at: Vec<u32>,
    },
    /// The indices did not match the store's list.
    ById(InOrder),
}

impl Recorded {
    /// `submitted[k]`: the index in `resources` of `recorded[k]`, if the caller knows it.
    fn new(
        recorded: Vec<OutcomeRecord>,
        resources: &[ResourceId],
        mut submitted: Vec<u32>,
    ) -> Self {
        let index = |k: u32| usize::try_from(k).ok();
        let matches = recorded.len() == submitted.len()
            && u32::try_from(recorded.len()).is_ok_and(|n| n < NONE)
            && recorded.iter().zip(&submitted).all(|(r, &i)| {
                index(i)
                    .and_then(|i| resources.get(i))
                    .is_some_and(|id| *id == r.resource_id)
            });
        if !matches {
            return Self::ById(InOrder::new(recorded));
        }
        // `at[i]`: the first outcome of `resources[i]`.
        let mut at = vec![NONE; resources.len()];
        let mut placed = 0;
        for (k, &i) in (0u32..).zip(&submitted) {
            if let Some(first) = index(i).and_then(|i| at.get_mut(i))
                && *first == NONE
            {
                *first = k;
                placed += 1;
            }
        }
        if placed == resources.len() && recorded.len() == placed {
            // `submitted` is a permutation of the positions: move each outcome home.
            let mut recorded = recorded;
            for k in 0..recorded.len() {
                while let Some(home) = submitted.get(k).and_then(|&i| index(i))
                    && home != k
                {
                    recorded.swap(k, home);
                    submitted.swap(k, home);
                }
            }
            return Self::Complete(recorded);
        }
        Self::Placed {
            slots: recorded.into_iter().map(Some).collect(),
            at,
        }
    }

    /// The outcome recorded for `resource_id`, which is `resources[index]`.
    fn take(&mut self, index: usize, resource_id: &ResourceId) -> Option<OutcomeRecord> {
        match self {
            Self::Complete(all) => all.get(index).cloned(),
            Self::Placed { slots, at } => {
                let k = at.get(index).copied().filter(|&k| k != NONE)?;
                slots
                    .get_mut(usize::try_from(k).ok()?)
                    .and_then(Option::take)
            }
            Self::ById(in_order) => in_order.take(resource_id),
        }
    }
}

/// A session's recorded outcomes, found by id in resource order.
///
/// Outcomes are recorded about in resource order (at most a window of attempts apart), so
/// the walk keeps only those that came early in a map and meets the rest in the stream.
/// A map of all of them cost a hash and a cache miss to build and another to take each of
/// N outcomes (~5 % of a 100,000-resource session, in the timed path to the finalizer).
/// A resource with no outcome makes the walk read the rest of the stream into the map:
/// correct, only as slow as a full map.
struct InOrder {
    stream: std::vec::IntoIter<OutcomeRecord>,
    early: HashMap<ResourceId, OutcomeRecord>,
}

impl InOrder {
    fn new(recorded: Vec<OutcomeRecord>) -> Self {
        Self {
            stream: recorded.into_iter(),
            early: HashMap::new(),
        }
    }

    /// The outcome recorded for `id`, if any (the first, should there be several).
    fn take(&mut self, id: &ResourceId) -> Option<OutcomeRecord> {
        if !self.early.is_empty()
            && let Some(r) = self.early.remove(id)
        {
            return Some(r);
        }
        for r in self.stream.by_ref() {
            if r.resource_id == *id {
                return Some(r);
            }
            self.early.entry(r.resource_id.clone()).or_insert(r);
        }
        None
    }
}

/// Completes with the finalizer's work inside the store's transaction, within `timeout`:
/// past it the work is dropped (its transaction rolled back) and the session completes
/// with that as its error, without the work.
async fn complete_with(
    deps: &Deps,
    id: SessionId,
    fence: crate::model::Fence,
    completion: Completion,
    work: &crate::harvest::InCompletion,
    report: &SessionReport,
    timeout: Option<Duration>,
) -> Result<Completed, StoreError> {
    let run = deps
        .store
        .complete_finalization_with(id, fence, completion.clone(), work, report);
    let Some(limit) = timeout else {
        return run.await;
    };
    match tokio::time::timeout(limit, run).await {
        Ok(done) => done,
        Err(_) => {
            let completion = Completion {
                finalizer_error: Some(format!(
                    "the finalizer did not return within {}; its transaction was rolled back",
                    humantime::format_duration(limit)
                )),
                ..completion
            };
            deps.store
                .complete_finalization(id, fence, completion)
                .await
        }
    }
}

/// Runs the user's finalizer; any error, panic or overrun becomes the recorded error.
async fn run_user_finalizer(
    finalizer: &dyn SessionFinalizer,
    report: SessionReport,
    timeout: Option<Duration>,
) -> Option<String> {
    let run = AssertUnwindSafe(finalizer.finalize(report)).catch_unwind();
    let result = match timeout {
        None => run.await,
        Some(limit) => match tokio::time::timeout(limit, run).await {
            Ok(r) => r,
            Err(_) => {
                return Some(format!(
                    "the finalizer did not return within {}",
                    humantime::format_duration(limit)
                ));
            }
        },
    };
    match result {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(error_chain(e.as_ref())),
        Err(panic) => Some(format!(
            "the finalizer panicked: {}",
            panic_message(&*panic)
        )),
    }
}

/// The text of a panic payload.
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic with a non-string payload".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ResourceOutcome;

    fn outcome(id: &str, attempts: u32) -> OutcomeRecord {
        OutcomeRecord {
            resource_id: id.into(),
            outcome: ResourceOutcome::Succeeded,
            attempts,
            elapsed: Duration::ZERO,
        }
    }

    fn ids(names: &[&str]) -> Vec<ResourceId> {
        names.iter().map(|n| ResourceId::from(*n)).collect()
    }

    /// How [`Recorded`] found them.
    #[derive(Debug, PartialEq)]
    enum Way {
        Complete,
        Placed,
        ById,
    }

    /// Takes every resource's outcome (its `attempts`) in order, and says which way.
    fn take_all(
        recorded: Vec<OutcomeRecord>,
        resources: &[ResourceId],
        submitted: &[u32],
    ) -> (Way, Vec<Option<u32>>) {
        let mut r = Recorded::new(recorded, resources, submitted.to_vec());
        let way = match r {
            Recorded::Complete(_) => Way::Complete,
            Recorded::Placed { .. } => Way::Placed,
            Recorded::ById(_) => Way::ById,
        };
        let found = resources
            .iter()
            .enumerate()
            .map(|(i, id)| r.take(i, id).map(|o| o.attempts))
            .collect();
        (way, found)
    }

    /// Outcomes recorded in this order, each with its place in the list as `attempts`.
    fn recorded(names: &[&str]) -> Vec<OutcomeRecord> {
        (0..).zip(names).map(|(i, id)| outcome(id, i)).collect()
    }

    #[test]
    fn noted_indices_place_outcomes_as_the_walk_by_id_finds_them() {
        let resources = ids(&["a", "b", "c", "d", "e", "f"]);
        // Recorded out of order, "c" and "f" never, "b" twice (the first one counts).
        let names = ["b", "a", "e", "b", "d"];
        let by_id = take_all(recorded(&names), &resources, &[]);
        assert_eq!(
            by_id,
            (
                Way::ById,
                vec![Some(1), Some(0), None, Some(4), Some(2), None]
            )
        );
        let placed = take_all(recorded(&names), &resources, &[1, 0, 4, 1, 3]);
        assert_eq!(placed, (Way::Placed, by_id.1.clone()));
        // Any noted index that does not name its outcome's resource, a missing or an
        // extra one, or one out of range: found by id, with the same answer.
        for wrong in [
            &[1, 0, 4, 1, 2][..],
            &[1, 0, 4, 1][..],
            &[1, 0, 4, 1, 3, 5][..],
            &[1, 0, 4, 1, 9][..],
            &[1, 0, 4, 1, u32::MAX][..],
        ] {
            assert_eq!(
                take_all(recorded(&names), &resources, wrong),
                by_id,
                "{wrong:?}"
            );
        }
    }

    #[test]
    fn one_outcome_each_is_put_in_resource_order_in_place() {
        let resources = ids(&["a", "b", "c", "d", "e", "f"]);
        // Two cycles (a c e b, d f) and in order; then one resource recorded twice and
        // another never: the same outcomes, placed instead.
        let names = ["c", "e", "b", "f", "a", "d"];
        let submitted = [2, 4, 1, 5, 0, 3];
        let expected = vec![Some(4), Some(2), Some(0), Some(5), Some(1), Some(3)];
        assert_eq!(
            take_all(recorded(&names), &resources, &submitted),
            (Way::Complete, expected.clone())
        );
        assert_eq!(take_all(recorded(&names), &resources, &[]).1, expected);
        let in_order = ["a", "b", "c", "d", "e", "f"];
        assert_eq!(
            take_all(recorded(&in_order), &resources, &[0, 1, 2, 3, 4, 5]),
            (Way::Complete, (0..6).map(Some).collect())
        );
        let twice = ["c", "e", "b", "f", "a", "c"];
        assert_eq!(
            take_all(recorded(&twice), &resources, &[2, 4, 1, 5, 0, 2]),
            (
                Way::Placed,
                vec![Some(4), Some(2), Some(0), None, Some(1), Some(3)]
            )
        );
    }

    #[test]
    fn nothing_recorded_places_nothing() {
        let resources = ids(&["a", "b"]);
        assert_eq!(
            take_all(Vec::new(), &resources, &[]),
            (Way::Placed, vec![None, None])
        );
        assert_eq!(take_all(Vec::new(), &[], &[]), (Way::Complete, vec![]));
    }
}
