//! No store write holds up the root: while a session's creation waits on a slow store, the
//! supervisor still answers health checks, aborts, queries and other starts, and a shutdown
//! that begins meanwhile still ends that session (with `shutdown`) before it returns.

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::faulty::FaultyStore;
use common::{FinalizerMode, Recorder, config, finished, supervisor_on};
use harvest_supervisor::{FinalizeReason, SessionStatus, SessionStore, StartError};

/// Longer than any answer that does not wait for the held store write.
const PROMPTLY: Duration = Duration::from_secs(60);

/// A supervisor over the scripted harvest on `store`, with `config`.
async fn supervisor_with(
    store: &Arc<FaultyStore>,
    recorder: &Recorder,
    config: harvest_supervisor::SupervisorConfig,
) -> harvest_supervisor::Supervisor {
    common::supervisor_configured(store.clone(), config, recorder).await
}

#[tokio::test(start_paused = true)]
async fn a_start_waiting_on_the_store_holds_up_nothing_else() {
    let store = FaultyStore::new();
    let recorder = Recorder::new(FinalizerMode::Ok);
    let sup = Arc::new(supervisor_on(store.clone(), config(), &recorder).await);
    let running = sup.start_session("b", ["hang-1"]).await.expect("start b");

    store.hold_creates.store(true, Ordering::SeqCst);
    let held = tokio::spawn({
        let sup = Arc::clone(&sup);
        async move { sup.start_session("a", ["ok-1", "ok-2"]).await }
    });
    tokio::task::yield_now().await;
    // Each of these went through the root's queue behind the held start before.
    tokio::time::timeout(PROMPTLY, sup.ping())
        .await
        .expect("the root answers while a creation waits")
        .expect("alive");
    tokio::time::timeout(PROMPTLY, sup.session(running))
        .await
        .expect("a query answers while a creation waits")
        .expect("record");
    tokio::time::timeout(PROMPTLY, sup.abort(running))
        .await
        .expect("an abort answers while a creation waits")
        .expect("aborted");
    assert_eq!(finished(&sup, running).await.status, SessionStatus::Aborted);
    assert!(!held.is_finished(), "the held start is still waiting");

    // The held start completes when the store does, and its session runs as any other.
    store.create_gate.add_permits(1);
    let id = held.await.expect("task").expect("start a");
    let record = finished(&sup, id).await;
    assert_eq!(record.status, SessionStatus::FinishedAllOk);
    assert_eq!(recorder.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn concurrent_starts_waiting_on_the_store_still_admit_one_per_harvester() {
    let store = FaultyStore::new();
    let recorder = Recorder::new(FinalizerMode::Ok);
    let sup = Arc::new(supervisor_on(store.clone(), config(), &recorder).await);
    store.hold_creates.store(true, Ordering::SeqCst);
    let starts: Vec<_> = (0..8)
        .map(|_| {
            let sup = Arc::clone(&sup);
            tokio::spawn(async move { sup.start_session("same", ["ok-1"]).await })
        })
        .collect();
    tokio::task::yield_now().await;
    store.create_gate.add_permits(8);
    let mut won = Vec::new();
    for start in starts {
        match start.await.expect("task") {
            Ok(id) => won.push(id),
            Err(StartError::HarvesterBusy { .. }) => {}
            Err(other) => panic!("unexpected start error: {other}"),
        }
    }
    assert_eq!(won.len(), 1, "one start per harvester wins");
    finished(&sup, won[0]).await;
}

#[tokio::test(start_paused = true)]
async fn a_shutdown_during_a_creation_waits_for_it_and_ends_it_with_shutdown() {
    let store = FaultyStore::new();
    let recorder = Recorder::new(FinalizerMode::Ok);
    let sup = Arc::new(supervisor_on(store.clone(), config(), &recorder).await);
    store.hold_creates.store(true, Ordering::SeqCst);
    let held = tokio::spawn({
        let sup = Arc::clone(&sup);
        async move { sup.start_session("a", ["hang-1"]).await }
    });
    tokio::task::yield_now().await;
    let shutdown = tokio::spawn({
        let sup = Arc::clone(&sup);
        async move { sup.shutdown().await }
    });
    tokio::task::yield_now().await;
    // The shutdown does not return while a session it has not seen is being created.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!shutdown.is_finished(), "shutdown waits for the creation");
    store.create_gate.add_permits(1);
    let id = held.await.expect("task").expect("the start completes");
    shutdown.await.expect("task").expect("shutdown");
    let record = store.session(id).await.expect("record");
    assert_eq!(record.reason(), Some(FinalizeReason::Shutdown));
    assert_eq!(recorder.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn health_shows_a_store_that_takes_no_lease_renewal_and_its_recovery() {
    let store = FaultyStore::new();
    let recorder = Recorder::new(FinalizerMode::Ok);
    let sup = supervisor_with(
        &store,
        &recorder,
        harvest_supervisor::SupervisorConfig::default()
            .with_session(config())
            .with_lease_renew_interval(Duration::from_secs(1))
            .with_lease_ttl(Duration::from_secs(10)),
    )
    .await;
    let health = sup.health(PROMPTLY);
    assert!(health.is_healthy(), "{health:?}");

    store.failing_renewals.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let health = sup.health(PROMPTLY);
    assert!(health.alive);
    assert!(health.lease_failures >= 1, "{health:?}");
    assert!(!health.is_healthy());
    assert!(!health.fenced, "not yet: the lease still runs");
    tokio::time::sleep(Duration::from_secs(12)).await;
    let health = sup.health(PROMPTLY);
    assert!(health.fenced, "{health:?}");
    assert!(health.lease_renewed_ago >= Duration::from_secs(10));

    store.failing_renewals.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let health = sup.health(PROMPTLY);
    assert!(health.is_healthy(), "{health:?}");
    assert!(health.lease_renewed_ago <= Duration::from_secs(1));

    // A store that hangs fails no renewal for a while: the age of the last one tells.
    store.hanging_renewals.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let health = sup.health(PROMPTLY);
    assert_eq!(health.lease_failures, 0, "{health:?}");
    assert!(!health.store_ok(), "{health:?}");
    assert!(!health.is_healthy());

    sup.shutdown().await.expect("shutdown");
    assert!(!sup.health(PROMPTLY).alive, "a stopped tree is not alive");
}

/// The id of the one session whose creation the store holds, once it is held.
async fn held_id(store: &FaultyStore) -> harvest_supervisor::SessionId {
    for _ in 0..1000 {
        if let Some(id) = store.held_creates.lock().expect("lock").first() {
            return *id;
        }
        tokio::task::yield_now().await;
    }
    panic!("no creation was held");
}

#[tokio::test(start_paused = true)]
async fn an_abort_for_a_session_being_created_waits_for_it_and_aborts_it() {
    let store = FaultyStore::new();
    let recorder = Recorder::new(FinalizerMode::Ok);
    let sup = Arc::new(supervisor_on(store.clone(), config(), &recorder).await);
    store.hold_creates.store(true, Ordering::SeqCst);
    let start = tokio::spawn({
        let sup = Arc::clone(&sup);
        async move { sup.start_session("a", ["hang-1", "hang-2"]).await }
    });
    let id = held_id(&store).await;
    let abort = tokio::spawn({
        let sup = Arc::clone(&sup);
        async move { sup.abort(id).await }
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        !abort.is_finished(),
        "the abort waits for the session to exist"
    );
    store.create_gate.add_permits(1);
    assert_eq!(start.await.expect("task").expect("start"), id);
    abort.await.expect("task").expect("the abort is honoured");
    let record = finished(&sup, id).await;
    assert_eq!(record.status, SessionStatus::Aborted);
    assert_eq!(record.counts.cancelled, 2);
}

#[tokio::test(start_paused = true)]
async fn a_session_created_while_its_node_self_fenced_starts_nothing_until_it_renews() {
    let store = FaultyStore::new();
    let recorder = Recorder::new(FinalizerMode::Ok);
    let sup = Arc::new(
        supervisor_with(
            &store,
            &recorder,
            harvest_supervisor::SupervisorConfig::default()
                .with_session(config())
                .with_lease_renew_interval(Duration::from_secs(1))
                .with_lease_ttl(Duration::from_secs(6)),
        )
        .await,
    );
    store.hold_creates.store(true, Ordering::SeqCst);
    let start = tokio::spawn({
        let sup = Arc::clone(&sup);
        async move { sup.start_session("a", ["ok-1", "ok-2"]).await }
    });
    let id = held_id(&store).await;
    // The node cannot renew: it self-fences while the creation is held.
    store.failing_renewals.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert!(sup.health(PROMPTLY).fenced);
    store.create_gate.add_permits(1);
    assert_eq!(start.await.expect("task").expect("start"), id);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let started = common::has_event(&sup, id, |k| {
        matches!(k, harvest_supervisor::EventKind::WorkerStarted { .. })
    })
    .await;
    assert!(!started, "no attempt starts while the node is fenced");
    // Renewed: it runs.
    store.failing_renewals.store(false, Ordering::SeqCst);
    let record = finished(&sup, id).await;
    assert_eq!(record.status, SessionStatus::FinishedAllOk);
}

#[tokio::test(start_paused = true)]
async fn a_rescue_pass_stuck_in_the_store_holds_up_nothing_else() {
    let store = FaultyStore::new();
    let recorder = Recorder::new(FinalizerMode::Ok);
    let sup = supervisor_with(
        &store,
        &recorder,
        harvest_supervisor::SupervisorConfig::default()
            .with_session(config())
            .with_rescue_interval(Duration::from_secs(1))
            .with_shutdown_timeout(Duration::from_secs(5)),
    )
    .await;
    // The next pass (within 1.2 s) hangs in the store for good.
    store.hanging_takeovers.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(3)).await;
    tokio::time::timeout(PROMPTLY, sup.ping())
        .await
        .expect("the root answers while a rescue pass hangs")
        .expect("alive");
    let id = tokio::time::timeout(PROMPTLY, sup.start_session("a", ["ok-1"]))
        .await
        .expect("a start answers while a rescue pass hangs")
        .expect("started");
    assert_eq!(
        finished(&sup, id).await.status,
        SessionStatus::FinishedAllOk
    );
    // Shutdown is still bounded: the stuck pass is given up at the deadline.
    tokio::time::timeout(PROMPTLY, sup.shutdown())
        .await
        .expect("shutdown returns")
        .expect("shutdown");
}

/// A supervisor with `turns` start turns on a store that holds every creation until the
/// test opens its gate.
async fn with_turns(turns: usize) -> (Arc<FaultyStore>, Arc<harvest_supervisor::Supervisor>) {
    let store = FaultyStore::new();
    let recorder = Recorder::new(FinalizerMode::Ok);
    let settings = harvest_supervisor::SupervisorConfig::default()
        .with_session(config())
        .with_max_concurrent_starts(turns);
    let sup = Arc::new(supervisor_with(&store, &recorder, settings).await);
    store.hold_creates.store(true, Ordering::SeqCst);
    (store, sup)
}

/// Starts `n` sessions at once, each on a harvester of its own, in tasks.
fn start_many(
    sup: &Arc<harvest_supervisor::Supervisor>,
    n: usize,
) -> Vec<tokio::task::JoinHandle<Result<harvest_supervisor::SessionId, StartError>>> {
    (0..n)
        .map(|i| {
            let sup = Arc::clone(sup);
            tokio::spawn(async move { sup.start_session(format!("h-{i}"), ["ok-1"]).await })
        })
        .collect()
}

/// Lets the tasks run until they wait (on paused time).
async fn settle() {
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
    tokio::time::sleep(Duration::from_millis(10)).await;
}

#[tokio::test(start_paused = true)]
async fn a_burst_of_starts_is_created_a_few_at_a_time() {
    let (store, sup) = with_turns(2).await;
    let starts = start_many(&sup, 6);
    settle().await;
    // Two creations in the store at a time; the other four wait their turn.
    assert_eq!(store.held_creates.lock().expect("lock").len(), 2);
    // The root answers meanwhile.
    tokio::time::timeout(PROMPTLY, sup.ping())
        .await
        .expect("the root answers while starts wait their turn")
        .expect("alive");
    // Once the store answers, each waiting start gets its turn.
    store.create_gate.add_permits(1);
    for start in starts {
        let id = tokio::time::timeout(PROMPTLY, start)
            .await
            .expect("every start gets its turn, none waits for ever")
            .expect("task")
            .expect("started");
        assert_eq!(
            finished(&sup, id).await.status,
            SessionStatus::FinishedAllOk
        );
    }
    assert_eq!(store.held_creates.lock().expect("lock").len(), 6);
}

#[tokio::test(start_paused = true)]
async fn starts_still_waiting_for_their_turn_at_shutdown_are_refused() {
    let (store, sup) = with_turns(1).await;
    let mut starts = start_many(&sup, 3);
    settle().await;
    assert_eq!(store.held_creates.lock().expect("lock").len(), 1);
    let shutdown = tokio::spawn({
        let sup = Arc::clone(&sup);
        async move { sup.shutdown().await }
    });
    settle().await;
    // The two waiting are refused at once; the one in the store completes and is ended.
    for start in starts.drain(1..) {
        let refused = tokio::time::timeout(PROMPTLY, start)
            .await
            .expect("refused at once, not left waiting")
            .expect("task");
        assert!(matches!(refused, Err(StartError::SupervisorDown)));
    }
    store.create_gate.add_permits(1);
    let first = starts.pop().expect("the first");
    let id = tokio::time::timeout(PROMPTLY, first)
        .await
        .expect("the start in the store completes")
        .expect("task")
        .expect("started");
    tokio::time::timeout(PROMPTLY, shutdown)
        .await
        .expect("the shutdown ends")
        .expect("task")
        .expect("shutdown");
    let record = store.session(id).await.expect("record");
    assert_eq!(record.reason(), Some(FinalizeReason::Shutdown));
    assert_eq!(store.held_creates.lock().expect("lock").len(), 1);
    assert_eq!(store.list_sessions().await.expect("list").len(), 1);
}

#[tokio::test(start_paused = true)]
async fn starts_waiting_for_their_turn_when_the_root_dies_are_refused() {
    let (store, sup) = with_turns(1).await;
    let mut starts = start_many(&sup, 3);
    settle().await;
    assert_eq!(store.held_creates.lock().expect("lock").len(), 1);
    // The root dies (a crash, not a shutdown): its turns close with its state, and the
    // starts waiting for one are told the supervisor is down rather than wait for ever.
    sup.actor().kill();
    settle().await;
    for start in starts.drain(1..) {
        let refused = tokio::time::timeout(PROMPTLY, start)
            .await
            .expect("refused, not left waiting for a turn that never comes")
            .expect("task");
        assert!(
            matches!(refused, Err(StartError::SupervisorDown)),
            "{refused:?}"
        );
    }
    // The one in the store finds no root to spawn its actor and is refused as well;
    // nothing but its own creation reached the store.
    store.create_gate.add_permits(1);
    let first = starts.pop().expect("the first");
    let first = tokio::time::timeout(PROMPTLY, first)
        .await
        .expect("the start in the store is answered")
        .expect("task");
    assert!(
        matches!(first, Err(StartError::SupervisorDown)),
        "{first:?}"
    );
    assert_eq!(store.held_creates.lock().expect("lock").len(), 1);
    // A start after the root died is refused at once.
    let late = tokio::time::timeout(PROMPTLY, sup.start_session("late", ["ok-1"]))
        .await
        .expect("refused at once");
    assert!(matches!(late, Err(StartError::SupervisorDown)), "{late:?}");
}

#[tokio::test(start_paused = true)]
async fn a_start_that_cannot_start_is_refused_without_waiting_for_a_turn() {
    let (store, sup) = with_turns(1).await;
    let held = start_many(&sup, 1);
    settle().await;
    assert_eq!(store.held_creates.lock().expect("lock").len(), 1);
    // The only turn is taken; a request that can never start is told so at once.
    let invalid = harvest_supervisor::SessionRequest::new("other", ["ok-1"])
        .with_config(config().with_max_concurrency(0));
    let refused = tokio::time::timeout(PROMPTLY, sup.start(invalid))
        .await
        .expect("refused without waiting for a turn");
    assert!(
        matches!(refused, Err(StartError::InvalidConfig(_))),
        "{refused:?}"
    );
    let duplicate = tokio::time::timeout(PROMPTLY, sup.start_session("other", ["a", "a"]))
        .await
        .expect("refused without waiting for a turn");
    assert!(matches!(
        duplicate,
        Err(StartError::DuplicateResource { .. })
    ));
    store.create_gate.add_permits(1);
    for start in held {
        start.await.expect("task").expect("started");
    }
}

#[tokio::test(start_paused = true)]
async fn a_start_whose_caller_gave_up_while_it_waited_creates_nothing() {
    let (store, sup) = with_turns(1).await;
    let mut starts = start_many(&sup, 2);
    settle().await;
    assert_eq!(store.held_creates.lock().expect("lock").len(), 1);
    // The second caller goes away (a client that disconnected) while it waits its turn.
    let gone = starts.pop().expect("second");
    gone.abort();
    let _ = gone.await;
    store.create_gate.add_permits(1);
    let first = starts.pop().expect("first");
    tokio::time::timeout(PROMPTLY, first)
        .await
        .expect("the first completes")
        .expect("task")
        .expect("started");
    settle().await;
    // Its turn came and went: no session was created for it.
    assert_eq!(store.held_creates.lock().expect("lock").len(), 1);
    assert_eq!(store.list_sessions().await.expect("list").len(), 1);
    // And the turn was given back: the next start runs.
    tokio::time::timeout(PROMPTLY, sup.start_session("next", ["ok-1"]))
        .await
        .expect("the next start gets the turn")
        .expect("started");
}

#[test]
fn max_concurrent_starts_is_bounded() {
    use harvest_supervisor::SupervisorConfig;
    for bad in [0, harvest_supervisor::config::MAX_CONCURRENT_STARTS + 1] {
        let error = SupervisorConfig::default()
            .with_max_concurrent_starts(bad)
            .validate()
            .expect_err("out of bounds");
        assert_eq!(error.field(), "max_concurrent_starts");
    }
    SupervisorConfig::default()
        .with_max_concurrent_starts(harvest_supervisor::config::MAX_CONCURRENT_STARTS)
        .validate()
        .expect("the most is valid");
}
