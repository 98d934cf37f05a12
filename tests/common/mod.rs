//! Shared test helpers: a scripted harvest, a recording finalizer, event collection.
//!
//! Resource ids say what their harvest does, so each test reads as its data:
//! `ok-*` succeeds, `fail-*` returns an error, `panic-*` panics, `hang-*` never returns,
//! `coop-*` waits for its cancellation token, `sleep<N>-*` takes N seconds,
//! `flaky<N>-*` fails its first N attempts.
#![allow(dead_code)]

pub mod faulty;
pub mod pg;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use harvest_supervisor::{
    BoxError, EventKind, HarvestContext, SessionConfig, SessionEvent, SessionFinalizer, SessionId,
    SessionReport, Supervisor, SupervisorConfig, harvest_fn,
};

/// Longer than any session in these tests, on the paused clock (costs no real time).
pub const TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// A budget in seconds, so deadlines are easy to reason about: 10 s per resource + 100 s.
pub fn config() -> SessionConfig {
    SessionConfig::default()
        .with_per_resource_estimate(Duration::from_secs(10))
        .with_buffer(Duration::from_secs(100))
        .with_resource_timeout(None)
        .with_heartbeat_timeout(None)
        .with_monitor_interval(Duration::from_secs(5))
        .with_escalation_grace(Duration::from_secs(20))
        .with_abort_grace(Duration::from_secs(10))
        .with_max_concurrency(4)
}

/// The harvest behaviour a resource id asks for.
pub async fn scripted(ctx: HarvestContext) -> Result<(), BoxError> {
    let id = ctx.resource_id.to_string();
    let kind = id.split('-').next().unwrap_or("");
    let number = |prefix: &str| -> u64 {
        kind.trim_start_matches(prefix)
            .parse()
            .expect("a number after the prefix")
    };
    if kind == "ok" {
        Ok(())
    } else if kind == "fail" {
        Err(format!("remote said 500 for {id}").into())
    } else if kind == "panic" {
        panic!("parser exploded on {id}")
    } else if kind == "hang" {
        std::future::pending().await
    } else if kind == "coop" {
        ctx.cancel.cancelled().await;
        Err("cancelled".into())
    } else if kind.starts_with("sleep") {
        tokio::time::sleep(Duration::from_secs(number("sleep"))).await;
        Ok(())
    } else if kind.starts_with("flaky") {
        if u64::from(ctx.attempt) <= number("flaky") {
            Err(format!("flaky attempt {}", ctx.attempt).into())
        } else {
            Ok(())
        }
    } else {
        panic!("unknown scripted resource {id}")
    }
}

/// How the recording finalizer behaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinalizerMode {
    Ok,
    Fail,
    Panic,
    Hang,
}

/// Counts finalizer runs and keeps their reports.
#[derive(Clone)]
pub struct Recorder {
    pub reports: Arc<Mutex<Vec<SessionReport>>>,
    pub calls: Arc<AtomicUsize>,
    pub mode: FinalizerMode,
}

impl Recorder {
    pub fn new(mode: FinalizerMode) -> Self {
        Self {
            reports: Arc::default(),
            calls: Arc::default(),
            mode,
        }
    }

    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    pub fn reports_for(&self, id: SessionId) -> Vec<SessionReport> {
        self.reports
            .lock()
            .expect("reports lock")
            .iter()
            .filter(|r| r.session_id == id)
            .cloned()
            .collect()
    }
}

#[async_trait::async_trait]
impl SessionFinalizer for Recorder {
    async fn finalize(&self, report: SessionReport) -> Result<(), BoxError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.reports.lock().expect("reports lock").push(report);
        match self.mode {
            FinalizerMode::Ok => Ok(()),
            FinalizerMode::Fail => Err("catalogue database is read-only".into()),
            FinalizerMode::Panic => panic!("finalizer exploded"),
            FinalizerMode::Hang => std::future::pending().await,
        }
    }
}

/// A supervisor over the scripted harvest with `session` as default budget.
pub async fn supervisor(session: SessionConfig, recorder: &Recorder) -> Supervisor {
    supervisor_on(
        Arc::new(harvest_supervisor::MemoryStore::new()),
        session,
        recorder,
    )
    .await
}

/// A supervisor over a test's own harvest, on a memory store.
pub async fn supervisor_with(
    harvest: impl harvest_supervisor::ResourceHarvester,
    session: SessionConfig,
    recorder: &Recorder,
) -> Supervisor {
    Supervisor::builder(harvest, recorder.clone())
        .config(SupervisorConfig::default().with_session(session))
        .start()
        .await
        .expect("supervisor starts")
}

/// The same, on a given store.
pub async fn supervisor_on(
    store: Arc<dyn harvest_supervisor::SessionStore>,
    session: SessionConfig,
    recorder: &Recorder,
) -> Supervisor {
    let config = SupervisorConfig::default().with_session(session);
    supervisor_configured(store, config, recorder).await
}

/// The same, with a whole supervisor `config` (leases, rescue, event capacity...).
pub async fn supervisor_configured(
    store: Arc<dyn harvest_supervisor::SessionStore>,
    config: SupervisorConfig,
    recorder: &Recorder,
) -> Supervisor {
    Supervisor::builder(harvest_fn(scripted), recorder.clone())
        .store(store)
        .config(config)
        .start()
        .await
        .expect("supervisor starts")
}

/// Waits (on the paused clock) for the session to finish, or panics after [`TIMEOUT`].
pub async fn finished(sup: &Supervisor, id: SessionId) -> harvest_supervisor::SessionRecord {
    tokio::time::timeout(TIMEOUT, sup.wait_finished(id))
        .await
        .expect("session finished before the test timeout")
        .expect("session record")
}

/// The stored event log of a session, by kind name.
pub async fn event_names(sup: &Supervisor, id: SessionId) -> Vec<&'static str> {
    sup.events(id)
        .await
        .expect("events")
        .iter()
        .map(|e: &SessionEvent| e.kind.name())
        .collect()
}

/// True if `kind` happened in the session's stored log.
pub async fn has_event(sup: &Supervisor, id: SessionId, pred: impl Fn(&EventKind) -> bool) -> bool {
    sup.events(id)
        .await
        .expect("events")
        .iter()
        .any(|e| pred(&e.kind))
}

/// `n` resource ids `"{prefix}-{i}"`.
pub fn ids(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i}")).collect()
}
