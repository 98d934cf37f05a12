//! A test kit for your harvester and finalizer (the `testing` feature).
//!
//! Test your own code against failures, hangs, retries and deadlines in milliseconds of
//! real time: run sessions on tokio's paused clock (`#[tokio::test(start_paused = true)]`,
//! which needs tokio's `test-util` feature in your dev-dependencies), where a 20-minute
//! deadline passes at once.
//!
//! - [`ScriptedHarvester`]: what each resource does, attempt by attempt (succeed, fail,
//!   panic, hang, take a while, ignore its cancellation), and how often it was tried;
//! - [`RecordingFinalizer`]: wraps a finalizer (yours, or none) and keeps every report it
//!   was given;
//! - [`run_session`]: starts a supervisor on the memory store, runs one session to its
//!   end and returns its [`SessionRun`]: record, event log, the reports;
//! - [`EventLog`]: assertions on an event log: each resource's kinds in order, "finalized
//!   once", "nothing after `SessionFinished`".
//!
//! ```
//! use harvest_supervisor::testing::{run_session, RecordingFinalizer, ScriptedHarvester, Step};
//! use harvest_supervisor::{FinalizeReason, RetryPolicy, SessionConfig, SupervisorConfig};
//! use std::time::Duration;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let harvester = ScriptedHarvester::new()
//!     .resource("flaky", [Step::fail("503"), Step::Succeed])
//!     .resource("broken", [Step::fail("404")]);
//! let finalizer = RecordingFinalizer::new();
//! let session = SessionConfig::default().with_retry(
//!     RetryPolicy::default()
//!         .with_max_attempts(2)
//!         .with_initial_backoff(Duration::from_millis(10)),
//! );
//! let run = run_session(
//!     harvester.clone(),
//!     finalizer.clone(),
//!     SupervisorConfig::default().with_session(session),
//!     ["ok", "flaky", "broken"],
//! )
//! .await
//! .expect("the session ran");
//!
//! assert_eq!(run.record.reason(), Some(FinalizeReason::Completed));
//! assert_eq!(run.report().counts.succeeded, 2);
//! assert_eq!(harvester.attempts("flaky"), 2);
//! assert_eq!(harvester.attempts("broken"), 2);
//! run.log().assert_finalized_once();
//! run.log().assert_nothing_after_finished();
//! assert_eq!(
//!     run.log().kinds_of("flaky"),
//!     ["WorkerStarted", "WorkerFailed", "WorkerRetrying", "WorkerStarted", "WorkerSucceeded"]
//! );
//! assert_eq!(finalizer.calls(), 1);
//! # }
//! ```

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;

use crate::config::SupervisorConfig;
use crate::error::{Error, SessionError, StartError};
use crate::events::{EventKind, SessionEvent};
use crate::handle::Supervisor;
use crate::harvest::{BoxError, HarvestContext, ResourceHarvester, SessionFinalizer};
use crate::model::{ResourceId, SessionRecord, SessionReport};
use crate::store::MemoryStore;

/// What one attempt of a scripted resource does.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Step {
    /// Returns `Ok(())` at once.
    Succeed,
    /// Returns this error at once.
    Fail(String),
    /// Panics with this message.
    Panic(String),
    /// Never returns by itself; ends (with an error) when the attempt is cancelled, as a
    /// well-behaved harvest does. The deadline, a per-resource timeout or an abort cuts it.
    Hang,
    /// Never returns, and ignores its cancellation token: only a kill stops it (after the
    /// abort grace), as with a harvest stuck in a call that cannot be interrupted.
    HangIgnoringCancel,
    /// Takes this long (tokio time: instant on the paused clock), then succeeds; a
    /// cancellation ends it early with an error.
    Take(Duration),
}

impl Step {
    /// [`Step::Fail`] with `error`.
    pub fn fail(error: impl Into<String>) -> Self {
        Self::Fail(error.into())
    }

    /// [`Step::Panic`] with `message`.
    pub fn panic(message: impl Into<String>) -> Self {
        Self::Panic(message.into())
    }

    async fn run(self, ctx: &HarvestContext) -> Result<(), BoxError> {
        match self {
            Step::Succeed => Ok(()),
            Step::Fail(error) => Err(error.into()),
            Step::Panic(message) => panic!("{message}"),
            Step::Hang => {
                ctx.cancel.cancelled().await;
                Err("cancelled".into())
            }
            Step::HangIgnoringCancel => std::future::pending().await,
            Step::Take(duration) => {
                tokio::select! {
                    () = tokio::time::sleep(duration) => Ok(()),
                    () = ctx.cancel.cancelled() => Err("cancelled".into()),
                }
            }
        }
    }
}

#[derive(Debug, Default)]
struct Script {
    plans: HashMap<ResourceId, Vec<Step>>,
    otherwise: Option<Step>,
    attempts: HashMap<ResourceId, u32>,
}

/// A harvester whose resources do what a script says, attempt by attempt. Attempt `n`
/// of a resource runs the `n`-th step of its plan, the last step again past its end; a
/// resource without a plan runs the [`ScriptedHarvester::otherwise`] step (default
/// [`Step::Succeed`]). Clones share the script and the counts.
#[derive(Debug, Clone, Default)]
pub struct ScriptedHarvester {
    script: Arc<Mutex<Script>>,
}

impl ScriptedHarvester {
    /// Every resource succeeds until told otherwise.
    pub fn new() -> Self {
        Self::default()
    }

    fn script(&self) -> MutexGuard<'_, Script> {
        // A panicking step panics outside the lock; a poisoned lock is still whole.
        self.script.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The plan of `resource`: its attempts' steps in order (the last one repeats; an
    /// empty plan succeeds).
    #[must_use]
    pub fn resource(
        self,
        resource: impl Into<ResourceId>,
        steps: impl IntoIterator<Item = Step>,
    ) -> Self {
        self.script()
            .plans
            .insert(resource.into(), steps.into_iter().collect());
        self
    }

    /// What resources without a plan do.
    #[must_use]
    pub fn otherwise(self, step: Step) -> Self {
        self.script().otherwise = Some(step);
        self
    }

    /// How many attempts of `resource` started.
    pub fn attempts(&self, resource: impl Into<ResourceId>) -> u32 {
        self.script()
            .attempts
            .get(&resource.into())
            .copied()
            .unwrap_or(0)
    }

    /// Attempts started, all resources together.
    pub fn total_attempts(&self) -> u32 {
        self.script().attempts.values().sum()
    }
}

#[async_trait]
impl ResourceHarvester for ScriptedHarvester {
    async fn harvest(&self, ctx: HarvestContext) -> Result<(), BoxError> {
        let step = {
            let mut script = self.script();
            *script.attempts.entry(ctx.resource_id.clone()).or_insert(0) += 1;
            let index = usize::try_from(ctx.attempt.saturating_sub(1)).unwrap_or(usize::MAX);
            match script.plans.get(&ctx.resource_id) {
                Some(plan) => plan
                    .get(index)
                    .or(plan.last())
                    .cloned()
                    .unwrap_or(Step::Succeed),
                None => script.otherwise.clone().unwrap_or(Step::Succeed),
            }
        };
        step.run(&ctx).await
    }
}

type Inner = Arc<dyn SessionFinalizer>;

/// A finalizer that keeps every report it is given, then runs the finalizer it wraps
/// (yours; none by default: it succeeds). Clones share what they recorded.
#[derive(Clone)]
pub struct RecordingFinalizer {
    inner: Option<Inner>,
    reports: Arc<Mutex<Vec<SessionReport>>>,
}

impl std::fmt::Debug for RecordingFinalizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecordingFinalizer")
            .field("wraps", &self.inner.is_some())
            .field("calls", &self.calls())
            .finish()
    }
}

impl Default for RecordingFinalizer {
    fn default() -> Self {
        Self::new()
    }
}

impl RecordingFinalizer {
    /// Records, and succeeds.
    pub fn new() -> Self {
        Self {
            inner: None,
            reports: Arc::default(),
        }
    }

    /// Records, then runs `finalizer` (its answer is the answer).
    pub fn wrapping(finalizer: impl SessionFinalizer) -> Self {
        Self {
            inner: Some(Arc::new(finalizer)),
            reports: Arc::default(),
        }
    }

    fn recorded(&self) -> MutexGuard<'_, Vec<SessionReport>> {
        self.reports.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How many times it was called.
    pub fn calls(&self) -> usize {
        self.recorded().len()
    }

    /// Every report it was given, in order.
    pub fn reports(&self) -> Vec<SessionReport> {
        self.recorded().clone()
    }
}

#[async_trait]
impl SessionFinalizer for RecordingFinalizer {
    async fn finalize(&self, report: SessionReport) -> Result<(), BoxError> {
        self.recorded().push(report.clone());
        match &self.inner {
            Some(inner) => inner.finalize(report).await,
            None => Ok(()),
        }
    }
}

/// Why [`run_session`] could not run its session.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunError {
    /// The supervisor did not start (an invalid config).
    #[error(transparent)]
    Supervisor(#[from] Error),
    /// The session did not start.
    #[error(transparent)]
    Start(#[from] StartError),
    /// Its end, or its log, could not be read.
    #[error(transparent)]
    Session(#[from] SessionError),
}

/// One session's end: what [`run_session`] returns.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct SessionRun {
    /// The session's final record (status, reason, counts).
    pub record: SessionRecord,
    /// Its event log, as stored.
    pub events: Vec<SessionEvent>,
    /// The reports its finalizer was given (one, unless a finalizer run was cut and
    /// recovered).
    pub reports: Vec<SessionReport>,
}

impl SessionRun {
    /// The last report the finalizer was given.
    ///
    /// # Panics
    /// If no finalizer ran (a session always ends with one, unless the finalizer given
    /// to [`run_session`] is not the one that records).
    pub fn report(&self) -> &SessionReport {
        match self.reports.last() {
            Some(report) => report,
            None => panic!("no finalizer report for session {}", self.record.id),
        }
    }

    /// Its event log, for assertions.
    pub fn log(&self) -> EventLog<'_> {
        EventLog(&self.events)
    }
}

/// Starts a supervisor of `harvester` and `finalizer` with `config` on a fresh memory
/// store, runs one session of `resources` (under `config.session`) to its end, shuts the
/// supervisor down and returns the session's record, log and reports. On tokio's paused
/// clock every deadline, timeout and backoff passes at once.
pub async fn run_session<R: Into<ResourceId>>(
    harvester: impl ResourceHarvester,
    finalizer: RecordingFinalizer,
    config: SupervisorConfig,
    resources: impl IntoIterator<Item = R>,
) -> Result<SessionRun, RunError> {
    let supervisor = Supervisor::builder(harvester, finalizer.clone())
        .store(Arc::new(MemoryStore::new()))
        .config(config)
        .start()
        .await?;
    let id = supervisor.start_session("scripted", resources).await?;
    let record = supervisor.wait_finished(id).await?;
    let events = supervisor.events(id).await?;
    let _ = supervisor.shutdown().await;
    let reports = finalizer
        .reports()
        .into_iter()
        .filter(|r| r.session_id == id)
        .collect();
    Ok(SessionRun {
        record,
        events,
        reports,
    })
}

/// Assertions on a session's event log. Each panics with the log when it fails.
#[derive(Debug, Clone, Copy)]
pub struct EventLog<'a>(pub &'a [SessionEvent]);

impl EventLog<'_> {
    /// The kinds (as in the JSON `"kind"`) of `resource`'s events, in order.
    pub fn kinds_of(&self, resource: impl Into<ResourceId>) -> Vec<&'static str> {
        let resource = resource.into();
        self.0
            .iter()
            .filter(|e| e.kind.resource_id() == Some(&resource))
            .map(|e| e.kind.name())
            .collect()
    }

    /// Every event's kind, in order.
    pub fn kinds(&self) -> Vec<&'static str> {
        self.0.iter().map(|e| e.kind.name()).collect()
    }

    /// How many events `matches` says yes to.
    pub fn count(&self, matches: impl Fn(&EventKind) -> bool) -> usize {
        self.0.iter().filter(|e| matches(&e.kind)).count()
    }

    /// The session finished once, and its finalizer finished once (one run).
    pub fn assert_finalized_once(&self) {
        let finished = self.count(|k| matches!(k, EventKind::SessionFinished { .. }));
        let runs = self.count(|k| matches!(k, EventKind::FinalizerFinished { .. }));
        assert!(
            finished == 1 && runs == 1,
            "finalized once: {finished} SessionFinished, {runs} FinalizerFinished in {:?}",
            self.kinds()
        );
    }

    /// No event follows `SessionFinished`, and there is one.
    pub fn assert_nothing_after_finished(&self) {
        let at = self
            .0
            .iter()
            .position(|e| matches!(e.kind, EventKind::SessionFinished { .. }));
        match at {
            Some(at) => assert!(
                at + 1 == self.0.len(),
                "events after SessionFinished: {:?}",
                &self.kinds()[at..]
            ),
            None => panic!("no SessionFinished in {:?}", self.kinds()),
        }
    }

    /// Sequence numbers run 1, 2, 3, ... without a gap.
    pub fn assert_gapless(&self) {
        for (i, e) in self.0.iter().enumerate() {
            assert_eq!(e.seq, i as u64 + 1, "a gap at {i} in {:?}", self.kinds());
        }
    }
}
