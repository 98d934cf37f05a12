//! The two traits an embedder implements: harvest one resource, finalize one session.
//!
//! Both are async and object-safe. Plain closures work too, through [`harvest_fn`] and
//! [`finalizer_fn`].

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::model::{HarvesterId, ResourceId, SessionId, SessionReport};

/// The error user code returns: any error, kept with its source chain until it is recorded.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Harvests one resource. Called once per attempt (a session's workers run its attempts
/// one after another, at most `max_concurrency` at a time).
///
/// The attempt may succeed, fail, panic, time out or hang: all of them end the attempt with
/// an outcome; none of them keeps the session from finalizing.
#[async_trait]
pub trait ResourceHarvester: Send + Sync + 'static {
    /// Harvest `ctx.resource_id`. Watch `ctx.cancel` to stop early on abort, and call
    /// `ctx.heartbeat.beat()` on progress when a `heartbeat_timeout` is configured.
    async fn harvest(&self, ctx: HarvestContext) -> Result<(), BoxError>;
}

/// Records a session's outcome. Runs once per session, whatever ended it.
///
/// Exactly once within one healthy process (a finalizer that hangs past `escalation_grace`
/// is cut and recorded, not run again). Across a crash the store's three durable steps
/// (claimed, finalizer started, completed) decide: a process that died after its claim and
/// before its finalizer started leaves the finalizer to the rescue (the next start's, or a live node's), which
/// runs it; one that died while the finalizer ran leaves it to be run again
/// ([`crate::FinalizerRecovery::Rerun`], the default, with
/// [`SessionReport::finalizer_attempt`] above 1) or recorded as interrupted
/// ([`crate::FinalizerRecovery::Skip`]). Make it idempotent by session id: write the
/// outcome keyed by `report.session_id` (an upsert), or look first when
/// `finalizer_attempt > 1`.
#[async_trait]
pub trait SessionFinalizer: Send + Sync + 'static {
    /// Record the outcome. An error (or a panic) is written on the session as its
    /// `finalizer_error`; the session still ends and its harvester is still freed.
    async fn finalize(&self, report: SessionReport) -> Result<(), BoxError>;

    /// `Some` for a finalizer whose work runs inside the store's own transaction that
    /// completes the session (the PostgreSQL store's transactional finalizer,
    /// `store::postgres::PostgresFinalizer`): its writes commit together with the terminal
    /// status, or not at all. [`SessionFinalizer::finalize`] is then not called. `None`,
    /// the default, for every other finalizer.
    fn in_completion(&self) -> Option<InCompletion> {
        None
    }
}

/// A finalizer's work that a store runs inside its completing transaction (see
/// [`SessionFinalizer::in_completion`]); opaque to everything but the store that made it.
#[derive(Clone)]
pub struct InCompletion(pub(crate) Arc<dyn std::any::Any + Send + Sync>);

impl InCompletion {
    /// Wraps a store's own representation of the work.
    pub fn new(work: Arc<dyn std::any::Any + Send + Sync>) -> Self {
        Self(work)
    }

    /// The store's representation, for the store that made it.
    pub fn work(&self) -> &(dyn std::any::Any + Send + Sync) {
        self.0.as_ref()
    }
}

impl std::fmt::Debug for InCompletion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("InCompletion")
    }
}

/// What one attempt knows about itself.
#[derive(Debug, Clone)]
pub struct HarvestContext {
    /// The session.
    pub session_id: SessionId,
    /// The harvester (for dispatching to the right remote).
    pub harvester_id: HarvesterId,
    /// The resource to harvest.
    pub resource_id: ResourceId,
    /// 1 for the first attempt, 2 for the first retry, ...
    pub attempt: u32,
    /// Cancelled on abort, fail-fast, deadline or shutdown: a cooperative stop request.
    /// Workers that ignore it are stopped after `abort_grace`.
    pub cancel: CancellationToken,
    /// Progress signal for `heartbeat_timeout`.
    pub heartbeat: Heartbeat,
}

/// A cheap, clonable progress signal for one attempt.
///
/// With `heartbeat_timeout` set, an attempt that goes longer than that without a beat is
/// cut and counts as `TimedOut`, even while `resource_timeout` is far away.
#[derive(Debug, Clone)]
pub struct Heartbeat {
    origin: Instant,
    /// Milliseconds from `origin` to the last beat; `None` when nobody watches (no
    /// `heartbeat_timeout`), so an attempt that cannot time out by silence allocates nothing.
    last_ms: Option<Arc<AtomicU64>>,
}

impl Heartbeat {
    /// A heartbeat that is watched (`watched`) or merely accepted, for an attempt that
    /// started at `origin`.
    pub(crate) fn new(watched: bool, origin: Instant) -> Self {
        Self {
            origin,
            last_ms: watched.then(|| Arc::new(AtomicU64::new(0))),
        }
    }

    /// Says "still making progress".
    pub fn beat(&self) {
        if let Some(last) = &self.last_ms {
            let ms = u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX);
            last.fetch_max(ms, Ordering::Relaxed);
        }
    }

    /// When the last beat happened (the attempt's start if none yet, or if unwatched).
    pub fn last(&self) -> Instant {
        let ms = self
            .last_ms
            .as_ref()
            .map_or(0, |l| l.load(Ordering::Relaxed));
        // Milliseconds since the origin always fit after it; if not, the origin.
        self.origin
            .checked_add(std::time::Duration::from_millis(ms))
            .unwrap_or(self.origin)
    }
}

/// A [`ResourceHarvester`] made from an async closure.
pub struct HarvestFn<F>(F);

/// Wraps `f(ctx) -> impl Future<Output = Result<(), BoxError>>` as a [`ResourceHarvester`].
///
/// ```
/// use harvest_supervisor::{harvest_fn, HarvestContext};
/// let harvester = harvest_fn(|ctx: HarvestContext| async move {
///     tracing::info!(resource = %ctx.resource_id, "harvested");
///     Ok(())
/// });
/// # let _ = harvester;
/// ```
pub fn harvest_fn<F, Fut>(f: F) -> HarvestFn<F>
where
    F: Fn(HarvestContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), BoxError>> + Send + 'static,
{
    HarvestFn(f)
}

#[async_trait]
impl<F, Fut> ResourceHarvester for HarvestFn<F>
where
    F: Fn(HarvestContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), BoxError>> + Send + 'static,
{
    async fn harvest(&self, ctx: HarvestContext) -> Result<(), BoxError> {
        (self.0)(ctx).await
    }
}

/// A [`SessionFinalizer`] made from an async closure.
pub struct FinalizerFn<F>(F);

/// Wraps `f(report) -> impl Future<Output = Result<(), BoxError>>` as a [`SessionFinalizer`].
///
/// Written inline, the closure's `Ok(())` and its `?` on any error type need no
/// annotation; a closure bound to a variable first is typed before it meets this bound,
/// so it needs one (`Ok::<(), BoxError>(())`).
///
/// ```
/// use harvest_supervisor::finalizer_fn;
///
/// let finalizer = finalizer_fn(|report| async move {
///     let total: u64 = report.total.to_string().parse()?; // any error type
///     tracing::info!(total, "recorded");
///     Ok(())
/// });
/// # let _ = finalizer;
/// ```
pub fn finalizer_fn<F, Fut>(f: F) -> FinalizerFn<F>
where
    F: Fn(SessionReport) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), BoxError>> + Send + 'static,
{
    FinalizerFn(f)
}

#[async_trait]
impl<F, Fut> SessionFinalizer for FinalizerFn<F>
where
    F: Fn(SessionReport) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), BoxError>> + Send + 'static,
{
    async fn finalize(&self, report: SessionReport) -> Result<(), BoxError> {
        (self.0)(report).await
    }
}

/// Renders an error with its whole `source` chain: `outer: inner: root`.
pub(crate) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}
