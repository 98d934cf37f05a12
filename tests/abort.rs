//! Abort: cooperative cancel first, stop after `abort_grace`, finalize `aborted` once; and
//! abort before the session began, which must still free the harvester.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::faulty::FaultyStore;
use common::{FinalizerMode, Recorder, config, event_names, finished, supervisor, supervisor_on};
use harvest_supervisor::{FinalizeReason, ResourceOutcome, SessionError, SessionStatus};
use tokio::time::Instant;

#[tokio::test(start_paused = true)]
async fn abort_while_running_cancels_cooperatively_then_stops_workers_after_the_grace() {
    let rec = Recorder::new(FinalizerMode::Ok);
    let sup = supervisor(config(), &rec).await;
    let id = sup
        .start_session(
            "csw",
            ["ok-1", "coop-2", "hang-3", "sleep1000-4", "ok-5", "ok-6"],
        )
        .await
        .expect("start");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        sup.session(id).await.expect("record").status,
        SessionStatus::OnGoing
    );

    let asked = Instant::now();
    sup.abort(id).await.expect("abort accepted");
    assert_eq!(
        sup.session(id).await.expect("record").status,
        SessionStatus::Aborting
    );
    let record = finished(&sup, id).await;

    // hang-3 ignores its token: the session waits abort_grace (10 s) for it, no longer.
    assert_eq!(asked.elapsed(), Duration::from_secs(10));
    assert_eq!(record.status, SessionStatus::Aborted);
    assert_eq!(record.reason(), Some(FinalizeReason::Aborted));
    assert_eq!(record.counts.total(), 6);
    let report = &rec.reports_for(id)[0];
    let by_id = |rid: &str| {
        report
            .outcomes
            .iter()
            .find(|o| o.resource_id == rid)
            .map(|o| o.outcome.clone())
            .expect("outcome")
    };
    assert_eq!(by_id("ok-1"), ResourceOutcome::Succeeded);
    assert_eq!(
        by_id("coop-2"),
        ResourceOutcome::Cancelled,
        "saw its token and returned"
    );
    assert_eq!(
        by_id("hang-3"),
        ResourceOutcome::Cancelled,
        "stopped after the grace"
    );
    assert_eq!(rec.calls(), 1);

    let names = event_names(&sup, id).await;
    let abort_at = names
        .iter()
        .position(|n| *n == "AbortRequested")
        .expect("abort event");
    assert!(
        !names[abort_at..].contains(&"WorkerStarted"),
        "no attempt starts after abort"
    );

    // A second abort of the finished session is a typed error and changes nothing.
    match sup.abort(id).await {
        Err(SessionError::AlreadyFinished { status, .. }) => {
            assert_eq!(status, SessionStatus::Aborted)
        }
        other => panic!("expected AlreadyFinished, got {other:?}"),
    }
    assert_eq!(rec.calls(), 1);
    sup.start_session("csw", ["ok-1"])
        .await
        .expect("harvester is free");
    sup.shutdown().await.expect("shutdown");
}

#[tokio::test(start_paused = true)]
async fn abort_finishes_early_when_every_worker_honours_its_token() {
    let rec = Recorder::new(FinalizerMode::Ok);
    let sup = supervisor(config(), &rec).await;
    let id = sup
        .start_session("csw", ["coop-1", "coop-2"])
        .await
        .expect("start");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let asked = Instant::now();
    sup.abort(id).await.expect("abort");
    let record = finished(&sup, id).await;
    assert_eq!(asked.elapsed(), Duration::ZERO);
    assert_eq!(record.status, SessionStatus::Aborted);
    assert_eq!(record.counts.cancelled, 2);
    sup.shutdown().await.expect("shutdown");
}

#[tokio::test(start_paused = true)]
async fn abort_while_pending_ends_aborted_and_frees_the_harvester() {
    let store = FaultyStore::new();
    store.hold_begin.store(true, Ordering::SeqCst);
    let rec = Recorder::new(FinalizerMode::Ok);
    let sup = supervisor_on(store.clone(), config(), &rec).await;
    let id = sup
        .start_session("csw", ["ok-1", "ok-2"])
        .await
        .expect("start");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        sup.session(id).await.expect("record").status,
        SessionStatus::Pending
    );

    sup.abort(id).await.expect("abort accepted while pending");
    store.hold_begin.store(false, Ordering::SeqCst);
    store.begin_gate.add_permits(1);
    let record = finished(&sup, id).await;

    assert_eq!(record.status, SessionStatus::Aborted);
    assert_eq!(record.counts.cancelled, 2, "nothing ran, nothing succeeded");
    assert_eq!(rec.calls(), 1);
    assert!(!event_names(&sup, id).await.contains(&"WorkerStarted"));
    sup.start_session("csw", ["ok-1"])
        .await
        .expect("harvester is free");
    sup.shutdown().await.expect("shutdown");
}

/// A supervisor over the scripted harvest whose finalizer takes ten seconds (of tokio
/// time) and counts its runs in `calls`.
async fn with_slow_finalizer(
    calls: &std::sync::Arc<std::sync::atomic::AtomicUsize>,
) -> harvest_supervisor::Supervisor {
    let calls = std::sync::Arc::clone(calls);
    let finalizer = harvest_supervisor::finalizer_fn(move |_| {
        calls.fetch_add(1, Ordering::SeqCst);
        async {
            tokio::time::sleep(Duration::from_secs(10)).await;
            Ok(())
        }
    });
    harvest_supervisor::Supervisor::builder(
        harvest_supervisor::harvest_fn(common::scripted),
        finalizer,
    )
    .config(harvest_supervisor::SupervisorConfig::default().with_session(config()))
    .start()
    .await
    .expect("supervisor")
}

#[tokio::test(start_paused = true)]
async fn an_abort_while_the_finalizer_runs_is_answered_finalizing_then_with_the_real_status() {
    let calls = std::sync::Arc::default();
    let sup = with_slow_finalizer(&calls).await;
    let id = sup
        .start_session("csw", ["ok-1", "fail-2"])
        .await
        .expect("start");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(calls.load(Ordering::SeqCst), 1, "the finalizer is running");
    // The supervisor is fine: the answer says the session is being finalized, at once.
    let asked = Instant::now();
    match sup.abort(id).await {
        Err(SessionError::Finalizing { session_id }) => assert_eq!(session_id, id),
        other => panic!("expected Finalizing, got {other:?}"),
    }
    assert!(
        asked.elapsed() < Duration::from_secs(1),
        "not after the finalizer"
    );
    let record = finished(&sup, id).await;
    assert_eq!(record.status, SessionStatus::FinishedSomeFailed);
    match sup.abort(id).await {
        Err(SessionError::AlreadyFinished { session_id, status }) => {
            assert_eq!(
                (session_id, status),
                (id, SessionStatus::FinishedSomeFailed)
            );
        }
        other => panic!("expected AlreadyFinished, got {other:?}"),
    }
    assert_eq!(
        record.reason(),
        Some(FinalizeReason::Completed),
        "not aborted"
    );
    sup.shutdown().await.expect("shutdown");
}

#[tokio::test(start_paused = true)]
async fn an_abort_queued_behind_the_finalization_is_answered_truthfully_not_supervisor_down() {
    // Many aborts in flight when the session ends: each is answered by the session, or,
    // when the session stopped before reading it, from the store; never `SupervisorDown`.
    let sup = std::sync::Arc::new(with_slow_finalizer(&std::sync::Arc::default()).await);
    let id = sup.start_session("csw", ["sleep3-1"]).await.expect("start");
    let mut aborts = Vec::new();
    for at in [2_999u64, 3_000, 3_000, 3_001, 3_002, 8_000, 13_000, 14_000] {
        let sup = std::sync::Arc::clone(&sup);
        aborts.push(tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(at)).await;
            sup.abort(id).await
        }));
    }
    let record = finished(&sup, id).await;
    for abort in aborts {
        match abort.await.expect("task") {
            Ok(()) => {}
            Err(SessionError::Finalizing { session_id }) => assert_eq!(session_id, id),
            Err(SessionError::AlreadyFinished { status, .. }) => {
                assert_eq!(status, record.status)
            }
            Err(other) => panic!("a live supervisor answered {other:?}"),
        }
    }
    sup.shutdown().await.expect("shutdown");
}
