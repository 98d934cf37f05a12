//! The rescues of last resort: a SessionActor that dies is finalized by the root; sessions a
//! dead supervisor left behind are finalized by the next one; shutdown finalizes what runs.

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::faulty::FaultyStore;
use common::{FinalizerMode, Recorder, config, finished, has_event, supervisor_on};
use harvest_supervisor::{
    EventKind, FinalizeReason, MemoryStore, ResourceOutcome, SessionStatus, SessionStore,
    SupervisorConfig,
};

#[tokio::test(start_paused = true)]
async fn a_session_actor_that_dies_is_finalized_by_the_root_as_crashed() {
    let store = FaultyStore::new();
    let rec = Recorder::new(FinalizerMode::Ok);
    let sup = supervisor_on(store.clone(), config(), &rec).await;
    // The session's first store write (pending -> on-going) fails with an error trying
    // again cannot mend: its actor dies at once.
    store.fatal_transitions.store(true, Ordering::SeqCst);
    let id = sup
        .start_session("csw", ["ok-1", "hang-2"])
        .await
        .expect("start");
    let record = finished(&sup, id).await;
    store.fatal_transitions.store(false, Ordering::SeqCst);

    assert_eq!(record.reason(), Some(FinalizeReason::SessionCrashed));
    assert_eq!(record.status, SessionStatus::FinishedAllFailed);
    assert_eq!(
        record.counts.lost, 2,
        "unrecorded outcomes are lost, never successes"
    );
    assert_eq!(rec.calls(), 1);
    sup.start_session("csw", ["ok-1"])
        .await
        .expect("harvester is free");
    sup.shutdown().await.expect("shutdown");
}

/// The session's first store write (pending -> on-going) fails for a while, as on a full
/// disk or a lost connection: the session tries it again rather than crash (it crashed,
/// and was finalized with every resource lost, before), starts nothing until it passes,
/// then runs to completion; the failures are in its log and report.
#[tokio::test(start_paused = true)]
async fn a_first_write_that_fails_for_a_while_is_tried_again_not_a_crash() {
    let store = FaultyStore::new();
    let rec = Recorder::new(FinalizerMode::Ok);
    let sup = supervisor_on(store.clone(), config(), &rec).await;
    store.failing_transitions.store(true, Ordering::SeqCst);
    let id = sup
        .start_session("csw", ["ok-1", "ok-2"])
        .await
        .expect("start");
    // Backoff 50, 100, 200 ms...: several tries fail.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let waiting = sup.session(id).await.expect("record");
    assert_eq!(waiting.status, SessionStatus::Pending, "{waiting:?}");
    assert_eq!(waiting.counts.total(), 0, "nothing started: {waiting:?}");
    store.failing_transitions.store(false, Ordering::SeqCst);
    let record = finished(&sup, id).await;

    assert_eq!(record.reason(), Some(FinalizeReason::Completed));
    assert_eq!(record.status, SessionStatus::FinishedAllOk);
    assert_eq!(record.counts.succeeded, 2);
    assert_eq!(rec.calls(), 1);
    assert!(
        !rec.reports_for(id)[0].store_errors.is_empty(),
        "the finalizer is told"
    );
    let events = sup.events(id).await.expect("events");
    let failures = events
        .iter()
        .filter(|e| {
            matches!(&e.kind, EventKind::StoreFailed { operation, .. }
                if operation == "mark the session on-going")
        })
        .count();
    assert!(failures >= 3, "{failures} failures logged: {events:?}");
    sup.shutdown().await.expect("shutdown");
}

/// How a store takes outcome writes.
#[derive(Clone, Copy)]
enum Writes {
    /// `record_outcome`, awaited.
    Awaited,
    /// `record_outcome_now`, as the memory store records them.
    InPlace,
    /// `queue_outcome`, answered by receipt, as the durable store records them.
    Queued,
    /// The same, answered only after the session handled its last outcome.
    QueuedLate,
}

#[tokio::test(start_paused = true)]
async fn failed_outcome_writes_neither_stop_the_session_nor_lose_its_outcomes() {
    failed_outcome_writes_lose_nothing(Writes::Awaited).await;
}

#[tokio::test(start_paused = true)]
async fn failed_in_place_outcome_writes_neither_stop_the_session_nor_lose_its_outcomes() {
    failed_outcome_writes_lose_nothing(Writes::InPlace).await;
}

#[tokio::test(start_paused = true)]
async fn failed_queued_outcome_writes_neither_stop_the_session_nor_lose_its_outcomes() {
    failed_outcome_writes_lose_nothing(Writes::Queued).await;
}

#[tokio::test(start_paused = true)]
async fn queued_outcome_writes_failing_late_neither_stop_the_session_nor_lose_its_outcomes() {
    failed_outcome_writes_lose_nothing(Writes::QueuedLate).await;
}

#[tokio::test(start_paused = true)]
async fn a_slow_store_holds_at_most_4097_outcome_writes_of_a_session_in_flight() {
    // A disk slower than the harvest: every queued write is answered 5 s (of tokio time)
    // later, while no-op resources end at once. The session waits for the oldest writes
    // once more than 4,096 are in flight, so what it holds stays bounded; it still ends
    // with every outcome.
    let store = FaultyStore::new();
    store.queued_outcomes.store(true, Ordering::SeqCst);
    store.late_answers.store(true, Ordering::SeqCst);
    let rec = Recorder::new(FinalizerMode::Ok);
    let sup = supervisor_on(store.clone(), config(), &rec).await;
    let resources: Vec<String> = (0..4_300).map(|i| format!("ok-{i}")).collect();
    let id = sup.start_session("csw", resources).await.expect("start");
    let record = finished(&sup, id).await;

    assert_eq!(record.status, SessionStatus::FinishedAllOk);
    assert_eq!(record.counts.succeeded, 4_300);
    assert_eq!(store.outcomes(id).await.expect("outcomes").len(), 4_300);
    let most = store.queued_most.load(Ordering::SeqCst);
    assert_eq!(most, 4_097, "the most outcome writes in flight at once");
    sup.shutdown().await.expect("shutdown");
}

#[tokio::test(start_paused = true)]
async fn a_slow_store_holds_the_workers_too_nothing_piles_up_behind_it() {
    // Workers take their attempts from the session's queue themselves and report each end
    // to the session; while the session waits for its oldest outcome writes (see above),
    // they may run on only until twice `max_concurrency` attempts await its reading, so
    // that a fast harvest and a slow disk pile up neither reports nor attempts.
    let store = FaultyStore::new();
    store.queued_outcomes.store(true, Ordering::SeqCst);
    store.late_answers.store(true, Ordering::SeqCst);
    let rec = Recorder::new(FinalizerMode::Ok);
    let started = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = Arc::clone(&started);
    let harvest = harvest_supervisor::harvest_fn(move |_ctx| {
        counted.fetch_add(1, Ordering::SeqCst);
        async { Ok(()) }
    });
    let sup = harvest_supervisor::Supervisor::builder(harvest, rec.clone())
        .store(store.clone())
        .config(harvest_supervisor::SupervisorConfig::default().with_session(config()))
        .start()
        .await
        .expect("supervisor starts");
    let resources: Vec<String> = (0..10_000).map(|i| format!("ok-{i}")).collect();
    let id = sup.start_session("csw", resources).await.expect("start");
    // Answers come 5 s after each write: at 1 s, the session has waited for a while.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let ran = started.load(Ordering::SeqCst);
    // 4,097 outcomes read (the writes in flight), and at most 2 x 4 attempts beyond them.
    assert!((4_097..=4_105).contains(&ran), "{ran} attempts ran");
    let record = finished(&sup, id).await;
    assert_eq!(record.counts.succeeded, 10_000);
    assert_eq!(started.load(Ordering::SeqCst), 10_000, "each resource once");
    sup.shutdown().await.expect("shutdown");
}

/// Outcome writes that fail, taken by the store in each of its ways.
async fn failed_outcome_writes_lose_nothing(writes: Writes) {
    let store = FaultyStore::new();
    store
        .in_place_outcomes
        .store(matches!(writes, Writes::InPlace), Ordering::SeqCst);
    store.queued_outcomes.store(
        matches!(writes, Writes::Queued | Writes::QueuedLate),
        Ordering::SeqCst,
    );
    store
        .late_answers
        .store(matches!(writes, Writes::QueuedLate), Ordering::SeqCst);
    let rec = Recorder::new(FinalizerMode::Ok);
    let sup = supervisor_on(store.clone(), config(), &rec).await;
    store.failing_outcome_writes.store(true, Ordering::SeqCst);
    let id = sup
        .start_session("csw", ["ok-1", "fail-2", "ok-3"])
        .await
        .expect("start");
    let record = finished(&sup, id).await;
    store.failing_outcome_writes.store(false, Ordering::SeqCst);

    // The session ended as it would have with a healthy disk...
    assert_eq!(record.reason(), Some(FinalizeReason::Completed));
    assert_eq!(record.status, SessionStatus::FinishedSomeFailed);
    assert_eq!((record.counts.succeeded, record.counts.failed), (2, 1));
    // ...the outcomes were written with the completion, and the finalizer was told.
    assert_eq!(store.outcomes(id).await.expect("outcomes").len(), 3);
    let report = &rec.reports_for(id)[0];
    assert_eq!(report.store_errors.len(), 3);
    assert!(
        report.store_errors[0].contains("injected write failure"),
        "{:?}",
        report.store_errors
    );
    assert!(has_event(&sup, id, |k| matches!(k, EventKind::StoreFailed { .. })).await);
    assert_eq!(rec.calls(), 1);
    sup.start_session("csw", ["ok-1"])
        .await
        .expect("harvester is free");
    sup.shutdown().await.expect("shutdown");
}

/// A finished session whose outcome writes failed, whose first completion (carrying
/// them) failed too, and whose late writes of them fail until the test says otherwise.
async fn outcomes_dropped_by_the_completion(
    resources: &[&str],
) -> (
    Arc<FaultyStore>,
    harvest_supervisor::Supervisor,
    Recorder,
    harvest_supervisor::SessionRecord,
) {
    let store = FaultyStore::new();
    let rec = Recorder::new(FinalizerMode::Ok);
    let sup = supervisor_on(store.clone(), config(), &rec).await;
    store.failing_outcome_writes.store(true, Ordering::SeqCst);
    store.failing_completions.store(1, Ordering::SeqCst);
    store.failing_late_outcomes.store(true, Ordering::SeqCst);
    let id = sup
        .start_session("csw", resources.iter().copied())
        .await
        .expect("start");
    let record = finished(&sup, id).await;
    store.failing_outcome_writes.store(false, Ordering::SeqCst);
    (store, sup, rec, record)
}

/// Outcomes the store missed, whose completion failed and went on without them (a full
/// disk, a lost connection): written once the store takes them, so that the stored list
/// agrees with the counts instead of deriving them as `lost`.
#[tokio::test(start_paused = true)]
async fn outcomes_a_failed_completion_dropped_are_written_once_the_store_takes_them() {
    let (store, sup, rec, record) =
        outcomes_dropped_by_the_completion(&["ok-1", "fail-2", "ok-3"]).await;
    let id = record.id;
    assert_eq!((record.counts.succeeded, record.counts.failed), (2, 1));
    assert_eq!(rec.calls(), 1);
    // Completed without them: the list derives all three from the reason for now.
    let outcomes = |list: Vec<harvest_supervisor::OutcomeRecord>| -> Vec<String> {
        list.iter()
            .map(|o| format!("{}={}", o.resource_id, o.outcome.name()))
            .collect()
    };
    assert_eq!(
        outcomes(store.outcomes(id).await.expect("outcomes")),
        ["ok-1=lost", "fail-2=lost", "ok-3=lost"]
    );
    // The store takes writes again: the observed outcomes replace the derived ones.
    store.failing_late_outcomes.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(120)).await;
    let mut now = outcomes(store.outcomes(id).await.expect("outcomes"));
    now.sort();
    assert_eq!(now, ["fail-2=failed", "ok-1=succeeded", "ok-3=succeeded"]);
    sup.shutdown().await.expect("shutdown");
}

/// Outcomes the store missed, whose completion succeeded at once but could not fit them
/// (it goes on without them, and says nothing): written after it, all the same.
#[tokio::test(start_paused = true)]
async fn outcomes_a_successful_completion_could_not_fit_are_written_after_it() {
    let store = FaultyStore::new();
    let rec = Recorder::new(FinalizerMode::Ok);
    let sup = supervisor_on(store.clone(), config(), &rec).await;
    store.failing_outcome_writes.store(true, Ordering::SeqCst);
    store
        .completing_without_outcomes
        .store(true, Ordering::SeqCst);
    let id = sup
        .start_session("csw", ["ok-1", "fail-2"])
        .await
        .expect("start");
    let record = finished(&sup, id).await;
    store.failing_outcome_writes.store(false, Ordering::SeqCst);
    assert_eq!((record.counts.succeeded, record.counts.failed), (1, 1));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut now: Vec<String> = store
        .outcomes(id)
        .await
        .expect("outcomes")
        .iter()
        .map(|o| format!("{}={}", o.resource_id, o.outcome.name()))
        .collect();
    now.sort();
    assert_eq!(now, ["fail-2=failed", "ok-1=succeeded"]);
    sup.shutdown().await.expect("shutdown");
}

/// A clean shutdown gives the outcomes still waiting for the store one last try instead
/// of leaving them in a sleeping task.
#[tokio::test(start_paused = true)]
async fn shutdown_gives_late_outcomes_a_last_try() {
    let (store, sup, _rec, record) = outcomes_dropped_by_the_completion(&["ok-1", "ok-2"]).await;
    let id = record.id;
    // Long enough for its retries to wait minutes apart.
    tokio::time::sleep(Duration::from_secs(3600)).await;
    store.failing_late_outcomes.store(false, Ordering::SeqCst);
    let stopped = tokio::time::Instant::now();
    sup.shutdown().await.expect("shutdown");
    assert!(
        stopped.elapsed() < Duration::from_secs(60),
        "{:?}",
        stopped.elapsed()
    );
    let outcomes = store.outcomes(id).await.expect("outcomes");
    assert!(
        outcomes.iter().all(|o| o.outcome.is_success()),
        "written at shutdown: {outcomes:?}"
    );
}

/// What a dead process leaves: the session, its dead handle, and its finalizer's record.
type LeftBehind = (
    harvest_supervisor::SessionId,
    harvest_supervisor::Supervisor,
    Recorder,
);

/// Runs `resources` on a supervisor over `store` for a second, then kills its whole tree,
/// as a process death would.
async fn session_left_by_a_dead_process(
    store: &Arc<MemoryStore>,
    resources: &[&str],
) -> LeftBehind {
    let request = harvest_supervisor::SessionRequest::new("csw", resources.iter().copied());
    request_left_by_a_dead_process(store, request).await
}

/// The same for a whole request (its own budget included).
async fn request_left_by_a_dead_process(
    store: &Arc<MemoryStore>,
    request: harvest_supervisor::SessionRequest,
) -> LeftBehind {
    let first = Recorder::new(FinalizerMode::Ok);
    let dead = supervisor_on(store.clone(), config(), &first).await;
    let id = dead.start(request).await.expect("start");
    tokio::time::sleep(Duration::from_secs(1)).await;
    dead.actor().kill();
    tokio::time::sleep(Duration::from_secs(1)).await;
    (id, dead, first)
}

/// A supervisor over `store` that resumes what a dead one left.
async fn resuming_supervisor(
    store: &Arc<MemoryStore>,
    harvest: impl harvest_supervisor::ResourceHarvester,
    finalizer: &Recorder,
) -> harvest_supervisor::Supervisor {
    harvest_supervisor::Supervisor::builder(harvest, finalizer.clone())
        .store(store.clone())
        .config(
            SupervisorConfig::default()
                .with_session(config())
                .with_recovery(harvest_supervisor::RecoveryPolicy::Resume),
        )
        .start()
        .await
        .expect("start")
}

#[tokio::test(start_paused = true)]
async fn a_new_supervisor_finalizes_sessions_a_dead_one_left_unfinished() {
    let store = Arc::new(MemoryStore::new());
    // The process dies: every actor is gone at once, nothing finalizes.
    let (id, dead, first) =
        session_left_by_a_dead_process(&store, &["ok-1", "hang-2", "hang-3"]).await;
    let left = store.session(id).await.expect("record");
    assert_eq!(left.status, SessionStatus::OnGoing);
    assert_eq!(first.calls(), 0);
    // A handle whose tree is gone answers instead of waiting forever.
    assert!(matches!(
        tokio::time::timeout(common::TIMEOUT, dead.wait_finished(id)).await,
        Ok(Err(harvest_supervisor::SessionError::SupervisorDown))
    ));

    let next = Recorder::new(FinalizerMode::Ok);
    let sup = supervisor_on(store.clone(), config(), &next).await;
    let record = finished(&sup, id).await;
    assert_eq!(record.reason(), Some(FinalizeReason::Interrupted));
    assert_eq!(record.status, SessionStatus::FinishedSomeFailed);
    assert_eq!((record.counts.succeeded, record.counts.lost), (1, 2));
    let report = &next.reports_for(id)[0];
    assert_eq!(report.outcomes[1].outcome, ResourceOutcome::Lost);
    assert_eq!(next.calls(), 1);
    assert!(has_event(&sup, id, |k| matches!(k, EventKind::Recovered { .. })).await);
    let events = sup.events(id).await.expect("events");
    assert!(
        events.windows(2).all(|w| w[0].seq < w[1].seq),
        "seq goes on from the stored log"
    );
    sup.start_session("csw", ["ok-1"])
        .await
        .expect("harvester is free");
    sup.shutdown().await.expect("shutdown");
}

#[tokio::test(start_paused = true)]
async fn shutdown_finalizes_running_sessions_with_shutdown() {
    let store = Arc::new(MemoryStore::new());
    let rec = Recorder::new(FinalizerMode::Ok);
    let sup = supervisor_on(store.clone(), config(), &rec).await;
    let a = sup
        .start_session("a", ["ok-1", "hang-2"])
        .await
        .expect("start");
    let b = sup.start_session("b", ["coop-1"]).await.expect("start");
    tokio::time::sleep(Duration::from_secs(1)).await;
    sup.shutdown().await.expect("shutdown");

    for id in [a, b] {
        let record = store.session(id).await.expect("record");
        assert!(record.status.is_terminal(), "{record:?}");
        assert_eq!(record.reason(), Some(FinalizeReason::Shutdown));
    }
    assert_eq!(store.session(a).await.expect("a").counts.cancelled, 1);
    assert_eq!(rec.calls(), 2);
    assert_eq!(store.active_session(&"a".into()).await.expect("lock"), None);
}

#[tokio::test(start_paused = true)]
async fn resume_recovery_harvests_what_had_not_succeeded_under_the_same_session() {
    let store = Arc::new(MemoryStore::new());
    let (id, _dead, first) =
        session_left_by_a_dead_process(&store, &["ok-1", "fail-2", "hang-3", "ok-4"]).await;
    assert_eq!(store.session(id).await.expect("record").counts.failed, 1);

    // The remote is healthy again: every resource harvests fine now.
    let next = Recorder::new(FinalizerMode::Ok);
    let sup = resuming_supervisor(
        &store,
        harvest_supervisor::harvest_fn(|_| async { Ok(()) }),
        &next,
    )
    .await;
    let record = finished(&sup, id).await;

    assert_eq!(record.status, SessionStatus::FinishedAllOk);
    assert_eq!(record.reason(), Some(FinalizeReason::Completed));
    assert_eq!(record.counts.succeeded, 4);
    assert_eq!(next.calls(), 1);
    assert_eq!(first.calls(), 0);
    let report = &next.reports_for(id)[0];
    assert_eq!(report.outcomes.len(), 4);
    assert!(
        has_event(&sup, id, |k| matches!(
            k,
            EventKind::Recovered {
                resuming: Some(2),
                previous_status: SessionStatus::OnGoing
            }
        ))
        .await
    );
    sup.start_session("csw", ["ok-1"])
        .await
        .expect("harvester is free");
    sup.shutdown().await.expect("shutdown");
}

#[tokio::test(start_paused = true)]
async fn a_resumed_session_runs_under_its_own_budget_not_the_new_default() {
    let store = Arc::new(MemoryStore::new());
    let own = config()
        .with_failure_policy(harvest_supervisor::FailurePolicy::FailFast)
        .with_max_concurrency(1);
    let request =
        harvest_supervisor::SessionRequest::new("csw", ["ok-1", "sleep5-2", "fail-3", "ok-4"])
            .with_config(own);
    let (id, _dead, _first) = request_left_by_a_dead_process(&store, request).await;

    // The new supervisor's default is Continue; the session's own FailFast must win.
    let next = Recorder::new(FinalizerMode::Ok);
    let sup = resuming_supervisor(
        &store,
        harvest_supervisor::harvest_fn(common::scripted),
        &next,
    )
    .await;
    let record = finished(&sup, id).await;
    assert_eq!(record.reason(), Some(FinalizeReason::FailFast));
    assert_eq!(
        record.counts.cancelled, 1,
        "ok-4 never ran: {:?}",
        record.counts
    );
    assert_eq!(next.calls(), 1);
    sup.shutdown().await.expect("shutdown");
}

#[tokio::test(start_paused = true)]
async fn a_store_that_cannot_finalize_is_retried_visibly_with_the_harvester_busy_until_it_can() {
    // The disk fills as the session ends: its claim, and every step after, fail. The
    // session keeps what it knows in memory and retries (backoff up to store_retry_max,
    // 5 s), its harvester stays busy, the watchdog does not tear it down; when the disk
    // has room again it completes within one retry interval, with the truth.
    let store = FaultyStore::new();
    let rec = Recorder::new(FinalizerMode::Ok);
    let sup = supervisor_on(store.clone(), config(), &rec).await;
    let mut events = sup.subscribe();
    store
        .failing_finalization_writes
        .store(true, Ordering::SeqCst);
    let id = sup
        .start_session("csw", ["ok-1", "fail-2", "ok-3"])
        .await
        .expect("start");
    // Past the deadline (130 s) and its escalation grace (20 s) while the store fails.
    tokio::time::sleep(Duration::from_secs(200)).await;
    let record = sup.session(id).await.expect("record");
    assert!(!record.status.is_terminal(), "{record:?}");
    assert!(matches!(
        sup.start_session("csw", ["ok-1"]).await,
        Err(harvest_supervisor::StartError::HarvesterBusy { session, .. }) if session == id
    ));
    let failures = store.failed_finalization_writes.load(Ordering::SeqCst);
    // 200 s at most 5 s apart, after a backoff from 50 ms.
    assert!((40..=60).contains(&failures), "{failures} tries");
    let mut store_failed = 0;
    while let Ok(Ok(e)) = tokio::time::timeout(Duration::ZERO, events.recv()).await {
        store_failed += usize::from(matches!(e.kind, EventKind::StoreFailed { .. }));
        assert!(
            !matches!(e.kind, EventKind::MonitorEscalated { .. }),
            "a session retrying its store is not escalated"
        );
    }
    assert_eq!(store_failed, failures, "each failure is told");
    assert_eq!(rec.calls(), 0, "no finalizer before the claim");

    store
        .failing_finalization_writes
        .store(false, Ordering::SeqCst);
    let healed = tokio::time::Instant::now();
    let record = finished(&sup, id).await;
    assert!(
        healed.elapsed() <= Duration::from_secs(5),
        "{:?}",
        healed.elapsed()
    );
    assert_eq!(record.reason(), Some(FinalizeReason::Completed));
    assert_eq!(record.status, SessionStatus::FinishedSomeFailed);
    assert_eq!((record.counts.succeeded, record.counts.failed), (2, 1));
    let report = &rec.reports_for(id)[0];
    assert_eq!((report.counts.succeeded, report.counts.failed), (2, 1));
    assert!(!report.store_errors.is_empty());
    assert!(
        report.store_errors[0].contains("disk is full"),
        "{:?}",
        report.store_errors
    );
    assert_eq!(rec.calls(), 1);
    sup.start_session("csw", ["ok-1"])
        .await
        .expect("harvester is free");
    sup.shutdown().await.expect("shutdown");
}

#[tokio::test(start_paused = true)]
async fn shutdown_returns_in_bounded_time_and_leaves_an_unfinishable_session_to_recovery() {
    // The disk is full for good while a session ends: shutdown cannot finalize it, and
    // must not wait for ever (nor for hours): it returns after shutdown_timeout, and the
    // next supervisor on the same store finalizes the session once the disk has room.
    let store = FaultyStore::new();
    let rec = Recorder::new(FinalizerMode::Ok);
    let sup = harvest_supervisor::Supervisor::builder(
        harvest_supervisor::harvest_fn(common::scripted),
        rec.clone(),
    )
    .store(store.clone())
    .config(
        SupervisorConfig::default()
            .with_session(config())
            .with_shutdown_timeout(Duration::from_secs(30)),
    )
    .start()
    .await
    .expect("supervisor");
    store
        .failing_finalization_writes
        .store(true, Ordering::SeqCst);
    let id = sup
        .start_session("csw", ["ok-1", "ok-2"])
        .await
        .expect("start");
    tokio::time::sleep(Duration::from_secs(10)).await;
    let asked = tokio::time::Instant::now();
    sup.shutdown().await.expect("shutdown");
    let took = asked.elapsed();
    assert!(
        took >= Duration::from_secs(30) && took <= Duration::from_secs(31),
        "{took:?}"
    );
    assert!(
        !store
            .session(id)
            .await
            .expect("record")
            .status
            .is_terminal()
    );
    assert_eq!(rec.calls(), 0);
    // Its lease ended with the shutdown: another node may take the session at once.
    let nodes = store.nodes().await.expect("nodes");
    assert!(nodes.iter().all(|n| !n.live), "{nodes:?}");

    store
        .failing_finalization_writes
        .store(false, Ordering::SeqCst);
    let next = supervisor_on(store.clone(), config(), &rec).await;
    let record = finished(&next, id).await;
    assert_eq!(record.reason(), Some(FinalizeReason::Interrupted));
    assert_eq!(rec.calls(), 1);
    next.start_session("csw", ["ok-1"])
        .await
        .expect("harvester is free");
    next.shutdown().await.expect("shutdown");
}

/// Lease arithmetic and the rescuer's timer, on tokio's paused clock: node A stops being
/// able to renew its lease (30 s, renewed every 10 s) while it harvests; node B, on the
/// same store, leaves A's session alone while the lease may still run, and takes it over
/// within `lease_ttl + rescue_interval` (+ its jitter) of A's last renewal. A self-fences
/// and runs no finalizer; B finalizes once.
#[tokio::test(start_paused = true)]
async fn a_node_that_cannot_renew_loses_its_sessions_after_its_lease_and_not_before() {
    let shared: Arc<dyn harvest_supervisor::SessionStore> = Arc::new(MemoryStore::new());
    let a_store = Arc::new(FaultyStore::wrapping(Arc::clone(&shared)));
    let nodes = |name: &str| {
        SupervisorConfig::default()
            .with_session(config())
            .with_node_name(Some(name.to_owned()))
    };
    let defaults = harvest_supervisor::SupervisorConfig::default();
    let (ttl, renew, rescue) = (
        defaults.lease_ttl,
        defaults.lease_renew_interval,
        defaults.rescue_interval,
    );
    let a_rec = Recorder::new(FinalizerMode::Ok);
    let a = harvest_supervisor::Supervisor::builder(
        harvest_supervisor::harvest_fn(common::scripted),
        a_rec.clone(),
    )
    .store(a_store.clone())
    .config(nodes("A"))
    .start()
    .await
    .expect("A");
    let id = a
        .start_session("csw", ["ok-1", "hang-2"])
        .await
        .expect("start");
    let b_rec = Recorder::new(FinalizerMode::Ok);
    let b = harvest_supervisor::Supervisor::builder(
        harvest_supervisor::harvest_fn(common::scripted),
        b_rec.clone(),
    )
    .store(Arc::clone(&shared))
    .config(nodes("B"))
    .start()
    .await
    .expect("B");
    tokio::time::sleep(Duration::from_secs(1)).await;
    // From now on A cannot renew: its last renewal is at most `renew` ago.
    a_store.failing_renewals.store(true, Ordering::SeqCst);
    let cut = tokio::time::Instant::now();
    let owner = |r: &harvest_supervisor::SessionRecord| r.owner;
    let a_node = owner(&shared.session(id).await.expect("record")).expect("owned");
    // The lease runs at least `ttl - renew` more: B must leave the session alone.
    tokio::time::sleep(ttl - renew - Duration::from_millis(100)).await;
    let record = shared.session(id).await.expect("record");
    assert_eq!(
        (record.owner, record.epoch, record.status),
        (Some(a_node), 1, SessionStatus::OnGoing)
    );
    // Taken over and finalized within ttl + rescue interval (+ a fifth of it: jitter).
    let record = finished(&b, id).await;
    let took = cut.elapsed();
    assert!(took <= ttl + rescue + rescue / 5, "took {took:?}");
    assert_eq!(record.reason(), Some(FinalizeReason::Interrupted));
    assert_eq!(record.epoch, 2);
    assert_ne!(record.owner, Some(a_node));
    assert_eq!(b_rec.calls(), 1);
    assert_eq!(
        a_rec.calls(),
        0,
        "the node that lost its lease runs no finalizer"
    );
    assert_eq!((record.counts.succeeded, record.counts.lost), (1, 1));
    let events = b.events(id).await.expect("events");
    assert!(events.iter().any(|e| matches!(
        e.kind,
        EventKind::SessionTakenOver { from_node: Some(n), epoch: 2, .. } if n == a_node
    )));
    b.start_session("csw", ["ok-1"])
        .await
        .expect("harvester free");
    b.shutdown().await.expect("shutdown B");
    a.shutdown().await.expect("shutdown A");
    assert_eq!(a_rec.calls(), 0);
}

/// Commands and reads from any node: B aborts a session A owns and runs (recorded in the
/// store, honoured by A within a lease renewal), and B's `wait_finished` returns for it.
#[tokio::test(start_paused = true)]
async fn a_session_owned_by_another_node_is_aborted_and_waited_for_from_this_one() {
    let shared: Arc<dyn harvest_supervisor::SessionStore> = Arc::new(MemoryStore::new());
    let a_rec = Recorder::new(FinalizerMode::Ok);
    let a = supervisor_on(Arc::clone(&shared), config(), &a_rec).await;
    let b_rec = Recorder::new(FinalizerMode::Ok);
    let b = supervisor_on(Arc::clone(&shared), config(), &b_rec).await;
    let id = a
        .start_session("csw", ["ok-1", "hang-2", "hang-3"])
        .await
        .expect("start");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let asked = tokio::time::Instant::now();
    b.abort(id).await.expect("B asks A's session to abort");
    let record = finished(&b, id).await;
    let renew = harvest_supervisor::SupervisorConfig::default().lease_renew_interval;
    assert!(
        asked.elapsed() <= renew + config().abort_grace + Duration::from_secs(2),
        "honoured within a renewal (+ the abort grace): {:?}",
        asked.elapsed()
    );
    assert_eq!(record.status, SessionStatus::Aborted);
    assert_eq!(record.reason(), Some(FinalizeReason::Aborted));
    assert_eq!(record.epoch, 1, "aborted by its owner, not taken over");
    assert_eq!((a_rec.calls(), b_rec.calls()), (1, 0));
    assert!(has_event(&a, id, |k| matches!(k, EventKind::AbortRequested)).await);
    // A second abort from B is answered truthfully.
    assert!(matches!(
        b.abort(id).await,
        Err(harvest_supervisor::SessionError::AlreadyFinished { .. })
    ));
    a.shutdown().await.expect("shutdown A");
    b.shutdown().await.expect("shutdown B");
}

/// Self-fencing, on the paused clock: a node that cannot renew its lease for `lease_ttl`
/// minus a margin starts nothing, cancels its running attempts and refuses new sessions;
/// once it renews (nobody took its session over meanwhile) the cut attempts run again
/// under their attempt numbers and the session finishes as if nothing happened.
#[tokio::test(start_paused = true)]
async fn a_node_that_cannot_renew_fences_itself_and_goes_on_once_it_can() {
    let store = FaultyStore::new();
    let rec = Recorder::new(FinalizerMode::Ok);
    let harvest =
        harvest_supervisor::harvest_fn(|ctx: harvest_supervisor::HarvestContext| async move {
            tokio::select! {
                () = tokio::time::sleep(Duration::from_secs(30)) => Ok(()),
                () = ctx.cancel.cancelled() => Err("cancelled".into()),
            }
        });
    let session = harvest_supervisor::SessionConfig::default()
        .with_per_resource_estimate(Duration::from_secs(60))
        .with_buffer(Duration::from_secs(60))
        .with_max_concurrency(2);
    let sup = harvest_supervisor::Supervisor::builder(harvest, rec.clone())
        .store(store.clone())
        .config(SupervisorConfig::default().with_session(session))
        .start()
        .await
        .expect("supervisor");
    let resources: Vec<String> = (0..6).map(|i| format!("r{i}")).collect();
    let id = sup.start_session("csw", resources).await.expect("start");
    tokio::time::sleep(Duration::from_secs(1)).await;
    store.failing_renewals.store(true, Ordering::SeqCst);
    // Registered at 0, lease 30 s, margin 10 s: fenced by 20 s (+ a quarter renewal).
    tokio::time::sleep(Duration::from_secs(22)).await;
    assert!(has_event(&sup, id, |k| matches!(k, EventKind::LeaseLost { .. })).await);
    assert!(matches!(
        sup.start_session("other", ["x"]).await,
        Err(harvest_supervisor::StartError::Store(
            harvest_supervisor::StoreError::LeaseExpired { .. }
        ))
    ));
    store.failing_renewals.store(false, Ordering::SeqCst);
    let record = finished(&sup, id).await;
    assert_eq!(record.status, SessionStatus::FinishedAllOk);
    assert_eq!(record.epoch, 1);
    assert_eq!(rec.calls(), 1);
    let outcomes = sup.outcomes(id).await.expect("outcomes");
    assert!(outcomes.iter().all(|o| o.attempts == 1), "{outcomes:?}");
    let events = sup.events(id).await.expect("events");
    let at = |name: &str| events.iter().position(|e| e.kind.name() == name);
    let (lost, renewed) = (
        at("LeaseLost").expect("lost"),
        at("LeaseRenewed").expect("renewed"),
    );
    assert!(lost < renewed);
    let between = &events[lost..renewed];
    assert!(
        !between.iter().any(|e| e.kind.name() == "WorkerStarted"),
        "nothing starts while fenced"
    );
    assert_eq!(
        between
            .iter()
            .filter(|e| e.kind.name() == "WorkerCancelled")
            .count(),
        2,
        "the two running attempts were cut"
    );
    sup.shutdown().await.expect("shutdown");
}

/// A node that lost a session it cannot hear about (its harvest hangs and writes nothing)
/// stops it once it can renew again: its next rescue pass sees the session is another
/// node's, and the session actor stops (its attempts are cancelled) without finalizing.
#[tokio::test(start_paused = true)]
async fn a_node_stops_a_silent_session_that_was_taken_over() {
    let shared: Arc<dyn harvest_supervisor::SessionStore> = Arc::new(MemoryStore::new());
    let a_store = Arc::new(FaultyStore::wrapping(Arc::clone(&shared)));
    let cut = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let starts = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = Arc::clone(&cut);
    let started = Arc::clone(&starts);
    let hang_until_cancelled =
        harvest_supervisor::harvest_fn(move |ctx: harvest_supervisor::HarvestContext| {
            let seen = Arc::clone(&seen);
            started.fetch_add(1, Ordering::SeqCst);
            async move {
                ctx.cancel.cancelled().await;
                seen.store(true, Ordering::SeqCst);
                Err("cancelled".into())
            }
        });
    let a_rec = Recorder::new(FinalizerMode::Ok);
    let a = harvest_supervisor::Supervisor::builder(hang_until_cancelled, a_rec.clone())
        .store(a_store.clone())
        .config(SupervisorConfig::default().with_session(config()))
        .start()
        .await
        .expect("A");
    let id = a.start_session("csw", ["silent"]).await.expect("start");
    let b_rec = Recorder::new(FinalizerMode::Ok);
    let b = supervisor_on(Arc::clone(&shared), config(), &b_rec).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    a_store.failing_renewals.store(true, Ordering::SeqCst);
    let record = finished(&b, id).await;
    assert_eq!(record.reason(), Some(FinalizeReason::Interrupted));
    assert_eq!(b_rec.calls(), 1);
    // A's self-fencing cancelled the attempt already; it waits to run it again.
    assert!(cut.swap(false, Ordering::SeqCst));
    a_store.failing_renewals.store(false, Ordering::SeqCst);
    let defaults = harvest_supervisor::SupervisorConfig::default();
    tokio::time::sleep(defaults.lease_renew_interval + defaults.rescue_interval * 2).await;
    assert_eq!(
        starts.load(Ordering::SeqCst),
        1,
        "A started no attempt again for a session it no longer owns"
    );
    assert!(!cut.load(Ordering::SeqCst));
    assert_eq!(a_rec.calls(), 0, "A runs no finalizer for it");
    let after = shared.session(id).await.expect("record");
    assert_eq!(after, record, "and writes nothing");
    a.shutdown().await.expect("shutdown A");
    b.shutdown().await.expect("shutdown B");
}
