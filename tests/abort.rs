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
