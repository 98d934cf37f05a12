//! Adaptive budgets (issue #17): a session's deadline and resource timeout learned from its
//! harvester's history, its source said in `SessionStarted`, the report and the stored
//! config; the static formula until the history suffices, or when it cannot be read.

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use harvest_supervisor::budget::{AdaptiveBudget, BudgetSource};
use harvest_supervisor::testing::{RecordingFinalizer, ScriptedHarvester, Step};
use harvest_supervisor::{
    EventKind, FinalizeReason, ResourceOutcome, SessionConfig, SessionId, SessionStore, StartError,
    Supervisor, SupervisorConfig,
};

use common::faulty::FaultyStore;

/// 10 s per resource + 100 s, a 600 s timeout (GeoNode's), 4 at a time.
fn config() -> SessionConfig {
    common::config().with_resource_timeout(Duration::from_secs(600))
}

/// Learned below the static formula, hung attempts cut at 4 x p99.
fn adaptive() -> AdaptiveBudget {
    AdaptiveBudget::default()
        .with_min_samples(50)
        .with_below_static(true)
        .with_timeout_multiple(4.0)
}

/// `h-0 .. h-<n>`: resource `h-i` takes `(i % 10 + 1) x 100 ms`.
fn history_harvester(n: usize) -> (ScriptedHarvester, Vec<String>) {
    let mut harvester = ScriptedHarvester::new();
    let ids: Vec<String> = (0..n).map(|i| format!("h-{i}")).collect();
    for (i, id) in ids.iter().enumerate() {
        let took = Duration::from_millis(100 * (i as u64 % 10 + 1));
        harvester = harvester.resource(id.as_str(), [Step::Take(took)]);
    }
    (harvester, ids)
}

async fn start(
    harvester: ScriptedHarvester,
    store: Arc<dyn SessionStore>,
    session: SessionConfig,
) -> (Supervisor, RecordingFinalizer) {
    let finalizer = RecordingFinalizer::new();
    let supervisor = Supervisor::builder(harvester, finalizer.clone())
        .config(SupervisorConfig::default().with_session(session))
        .store(store)
        .start()
        .await
        .expect("started");
    (supervisor, finalizer)
}

async fn started_budget(supervisor: &Supervisor, id: SessionId) -> (Duration, BudgetSource) {
    let events = supervisor.events(id).await.expect("events");
    events
        .iter()
        .find_map(|e| match &e.kind {
            EventKind::SessionStarted {
                workflow_time,
                budget,
                ..
            } => Some((*workflow_time, budget.clone())),
            _ => None,
        })
        .expect("a SessionStarted event")
}

#[tokio::test(start_paused = true)]
async fn a_static_session_says_so_everywhere() {
    let (harvester, ids) = history_harvester(3);
    let (supervisor, finalizer) = start(harvester, FaultyStore::new(), config()).await;
    let id = supervisor.start_session("csw", ids).await.expect("start");
    let record = supervisor.wait_finished(id).await.expect("finished");
    assert_eq!(record.workflow_time, Duration::from_secs(3 * 10 + 100));
    assert_eq!(
        started_budget(&supervisor, id).await,
        (record.workflow_time, BudgetSource::Static)
    );
    let report = &finalizer.reports()[0];
    assert_eq!(report.budget, Some(BudgetSource::Static));
    assert_eq!(report.workflow_time, record.workflow_time);
    let stored = supervisor
        .store()
        .session_config(id)
        .await
        .expect("read")
        .expect("kept");
    assert_eq!(stored.budget_source(), &BudgetSource::Static);
    // Stored as before adaptive budgets: a version that predates them reads it.
    let json = serde_json::to_string(&stored).expect("json");
    assert!(
        !json.contains("budget_source") && !json.contains("adaptive"),
        "{json}"
    );
    supervisor.shutdown().await.expect("shutdown");
}

#[tokio::test(start_paused = true)]
async fn the_budget_is_learned_once_the_history_suffices() {
    let (harvester, ids) = history_harvester(40);
    let store: Arc<dyn SessionStore> = Arc::new(harvest_supervisor::MemoryStore::new());
    let session = config().with_adaptive(adaptive());
    let (supervisor, finalizer) = start(harvester, Arc::clone(&store), session).await;

    // 40 successes: fewer than 50, the static formula.
    let first = supervisor
        .start_session("csw", ids.clone())
        .await
        .expect("first");
    let record = supervisor.wait_finished(first).await.expect("finished");
    assert_eq!(record.workflow_time, Duration::from_secs(40 * 10 + 100));
    assert_eq!(
        started_budget(&supervisor, first).await.1,
        BudgetSource::TooFewSamples {
            samples: 0,
            needed: 50
        }
    );
    let second = supervisor
        .start_session("csw", ids.clone())
        .await
        .expect("second");
    supervisor.wait_finished(second).await.expect("finished");
    assert_eq!(
        started_budget(&supervisor, second).await.1,
        BudgetSource::TooFewSamples {
            samples: 40,
            needed: 50
        }
    );

    // 80 now: learned. Of 100..1000 ms (8 of each) the p99 is 1 s and the mean 550 ms;
    // 40 resources on 4 slots are 10 rounds each: 2 x (10 x 0.55 + 1) s = 13 s, + the
    // adaptive buffer (60 s), instead of 500 s.
    let third = supervisor
        .start_session("csw", ids.clone())
        .await
        .expect("third");
    let record = supervisor.wait_finished(third).await.expect("finished");
    assert_eq!(record.workflow_time, Duration::from_secs(13 + 60));
    let (workflow_time, source) = started_budget(&supervisor, third).await;
    assert_eq!(workflow_time, record.workflow_time);
    assert_eq!(
        source,
        BudgetSource::Adaptive {
            samples: 80,
            quantile: 0.99,
            margin: 2.0,
            observed: Duration::from_secs(1),
            mean: Duration::from_millis(550),
            learned_estimate: Duration::from_millis(325),
            learned_timeout: Some(Duration::from_secs(4)),
        }
    );
    assert_eq!(record.reason(), Some(FinalizeReason::Completed));
    assert_eq!(record.counts.succeeded, 40, "no good harvest cut");
    let report = finalizer.reports().pop().expect("a report");
    assert_eq!(report.budget, Some(source.clone()));
    // Stored as applied: a resumed session keeps what was learned (its budget for what it
    // has left is computed the same way: see the unit tests of `budget`).
    let stored = store
        .session_config(third)
        .await
        .expect("read")
        .expect("kept");
    assert_eq!(stored.budget_source(), &source);
    assert_eq!(stored.workflow_time(40), record.workflow_time);
    assert_eq!(stored.resource_timeout, Some(Duration::from_secs(4)));
    assert!(
        stored.adaptive.is_none(),
        "stored as applied, not learned again"
    );
    supervisor.shutdown().await.expect("shutdown");
}

#[tokio::test(start_paused = true)]
async fn a_hang_is_cut_by_the_learned_timeout_long_before_the_static_one() {
    let (harvester, ids) = history_harvester(100);
    let harvester = harvester.resource("stuck", [Step::Hang]);
    let store: Arc<dyn SessionStore> = Arc::new(harvest_supervisor::MemoryStore::new());
    let session = config().with_adaptive(adaptive());
    let (supervisor, _finalizer) = start(harvester, Arc::clone(&store), session.clone()).await;
    let learn = supervisor.start_session("csw", ids).await.expect("history");
    supervisor.wait_finished(learn).await.expect("finished");

    // One resource, hung: cut at 4 x p99 (4 s), where the static budget waits for its
    // deadline (10 s + 100 s) or its 600 s timeout.
    let begun = tokio::time::Instant::now();
    let stuck = supervisor
        .start_session("csw", ["stuck"])
        .await
        .expect("stuck");
    let record = supervisor.wait_finished(stuck).await.expect("finished");
    let adaptive_took = begun.elapsed();
    assert_eq!(record.counts.timed_out, 1);
    assert!(adaptive_took < Duration::from_secs(10), "{adaptive_took:?}");

    // The same with the static budget: the 600 s timeout.
    let begun = tokio::time::Instant::now();
    let stuck = supervisor
        .start_session_with("csw", ["stuck"], config())
        .await
        .expect("static");
    let record = supervisor.wait_finished(stuck).await.expect("finished");
    assert_eq!(record.counts.timed_out, 1);
    assert!(begun.elapsed() >= Duration::from_secs(110));
    assert!(
        begun.elapsed() >= adaptive_took * 10,
        "{:?} against {adaptive_took:?}",
        begun.elapsed()
    );
    let outcomes = supervisor.outcomes(stuck).await.expect("outcomes");
    assert_eq!(outcomes[0].outcome, ResourceOutcome::TimedOut);
    supervisor.shutdown().await.expect("shutdown");
}

#[tokio::test(start_paused = true)]
async fn without_below_static_the_learned_budget_only_lengthens() {
    // A harvester slower than the static guess: 30 s a resource against 10 s.
    let mut harvester = ScriptedHarvester::new();
    let ids: Vec<String> = (0..60).map(|i| format!("slow-{i}")).collect();
    for id in &ids {
        harvester = harvester.resource(id.as_str(), [Step::Take(Duration::from_secs(30))]);
    }
    let session = config()
        .with_max_concurrency(1)
        .with_adaptive(AdaptiveBudget::default().with_min_samples(20));
    let store: Arc<dyn SessionStore> = Arc::new(harvest_supervisor::MemoryStore::new());
    let (supervisor, _finalizer) = start(harvester, store, session).await;
    // The static budget (60 x 10 s + 100 s) is too short for 60 x 30 s: the first session
    // is cut by its deadline.
    let first = supervisor
        .start_session("csw", ids.clone())
        .await
        .expect("first");
    let record = supervisor.wait_finished(first).await.expect("finished");
    assert_eq!(record.reason(), Some(FinalizeReason::DeadlineExpired));
    assert_eq!(record.counts.succeeded, 23, "{:?}", record.counts);
    // Learned from those successes: 2 x (60 x 30 s + 30 s) for the 60, the static buffer
    // kept (longer).
    let second = supervisor
        .start_session("csw", ids.clone())
        .await
        .expect("second");
    let record = supervisor.wait_finished(second).await.expect("finished");
    assert_eq!(
        record.workflow_time,
        Duration::from_secs(2 * (60 * 30 + 30) + 100)
    );
    assert_eq!(record.reason(), Some(FinalizeReason::Completed));
    assert_eq!(record.counts.succeeded, 60);
    supervisor.shutdown().await.expect("shutdown");
}

#[tokio::test(start_paused = true)]
async fn an_unreadable_history_leaves_the_static_budget() {
    let (harvester, ids) = history_harvester(3);
    let faulty = FaultyStore::new();
    faulty.failing_history.store(true, Ordering::SeqCst);
    let session = config().with_adaptive(adaptive());
    let (supervisor, _finalizer) = start(harvester, faulty.clone(), session).await;
    let id = supervisor
        .start_session("csw", ids)
        .await
        .expect("started anyway");
    let record = supervisor.wait_finished(id).await.expect("finished");
    assert_eq!(record.workflow_time, Duration::from_secs(3 * 10 + 100));
    assert!(matches!(
        started_budget(&supervisor, id).await.1,
        BudgetSource::HistoryUnavailable { error } if error.contains("injected")
    ));
    supervisor.shutdown().await.expect("shutdown");
}

#[tokio::test(start_paused = true)]
async fn a_bad_adaptive_setting_is_refused_at_start_naming_the_field() {
    let (harvester, ids) = history_harvester(3);
    let (supervisor, _finalizer) = start(
        harvester,
        Arc::new(harvest_supervisor::MemoryStore::new()),
        config(),
    )
    .await;
    let bad = config().with_adaptive(AdaptiveBudget::default().with_quantile(1.5));
    match supervisor.start_session_with("csw", ids.clone(), bad).await {
        Err(StartError::InvalidConfig(e)) => assert_eq!(e.field(), "adaptive.quantile"),
        other => panic!("not refused: {other:?}"),
    }
    // A learned budget that could end before the monitor first looks.
    let bad = config()
        .with_monitor_interval(Duration::from_secs(90))
        .with_adaptive(adaptive().with_buffer(Duration::from_secs(10)));
    match supervisor.start_session_with("csw", ids, bad).await {
        Err(StartError::InvalidConfig(e)) => assert_eq!(e.field(), "adaptive.buffer"),
        other => panic!("not refused: {other:?}"),
    }
    supervisor.shutdown().await.expect("shutdown");
}

/// A session resumed after a crash with few resources left gets the learned budget for
/// those, not a few thousandths of the whole session's (the learned estimate is a share
/// of a budget spread over every resource).
#[tokio::test(start_paused = true)]
async fn a_resumed_session_gets_a_learned_budget_for_what_it_has_left() {
    let store = Arc::new(harvest_supervisor::MemoryStore::new());
    let harvest = || harvest_supervisor::harvest_fn(common::scripted);
    // A history of 50 successes: 49 of 1 s and one of 100 s (its p99).
    let first = Supervisor::builder(harvest(), RecordingFinalizer::new())
        .config(SupervisorConfig::default().with_session(common::config()))
        .store(store.clone())
        .start()
        .await
        .expect("started");
    let mut ids: Vec<String> = (0..49).map(|i| format!("sleep1-h{i}")).collect();
    ids.push("sleep100-h".into());
    let history = first.start_session("csw", ids).await.expect("history");
    first.wait_finished(history).await.expect("finished");
    first.shutdown().await.expect("shutdown");

    // 400 resources, 16 at a time: learned 2 x (25 x 2.98 s + 100 s) for the session.
    // The last 16 (one of them takes 150 s) are running when the process dies.
    let learned = common::config().with_max_concurrency(16).with_adaptive(
        AdaptiveBudget::default()
            .with_min_samples(50)
            .with_below_static(true),
    );
    let mut ids: Vec<String> = (0..399).map(|i| format!("sleep1-r{i}")).collect();
    ids.push("sleep150-last".into());
    let dead = Supervisor::builder(harvest(), RecordingFinalizer::new())
        .config(SupervisorConfig::default().with_session(common::config()))
        .store(store.clone())
        .start()
        .await
        .expect("started");
    let id = dead
        .start_session_with("csw", ids, learned)
        .await
        .expect("start");
    tokio::time::sleep(Duration::from_millis(24_500)).await;
    dead.actor().kill();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let done = store.outcomes(id).await.expect("outcomes").len();
    assert!(
        (380..=390).contains(&done),
        "{done} recorded before the crash"
    );

    // Resumed: the 16 left get 2 x (1 round x 2.98 s + 100 s) + 60 s, not 16 x 0.87 s +
    // 60 s (which the 150 s one would outlive).
    let finalizer = RecordingFinalizer::new();
    let next = Supervisor::builder(harvest(), finalizer.clone())
        .config(
            SupervisorConfig::default()
                .with_session(common::config())
                .with_recovery(harvest_supervisor::RecoveryPolicy::Resume),
        )
        .store(store.clone())
        .start()
        .await
        .expect("started");
    let record = next.wait_finished(id).await.expect("finished");
    assert_eq!(
        record.reason(),
        Some(FinalizeReason::Completed),
        "{record:?}"
    );
    assert_eq!(record.counts.succeeded, 400);
    assert_eq!(finalizer.calls(), 1);
    next.shutdown().await.expect("shutdown");
}
