//! The supervision event log: ordered, complete, serde round-trip, and never blocked by a
//! slow subscriber.

mod common;

use std::time::Duration;

use common::{FinalizerMode, Recorder, config, finished, ids, scripted};
use harvest_supervisor::{
    EventKind, RecvError, SessionEvent, Supervisor, SupervisorConfig, harvest_fn,
};

#[tokio::test(start_paused = true)]
async fn a_session_log_runs_from_started_to_finished_in_seq_order_and_round_trips() {
    let rec = Recorder::new(FinalizerMode::Ok);
    let sup = common::supervisor(
        harvest_supervisor::SessionConfig {
            resource_timeout: Some(Duration::from_secs(20)),
            retry: harvest_supervisor::RetryPolicy {
                max_attempts: 2,
                ..Default::default()
            },
            ..config()
        },
        &rec,
    )
    .await;
    let mut live = sup.subscribe();
    let id = sup
        .start_session(
            "csw",
            ["ok-1", "fail-2", "panic-3", "sleep30-4", "flaky1-5"],
        )
        .await
        .expect("start");
    finished(&sup, id).await;
    let stored = sup.events(id).await.expect("events");

    assert_eq!(
        stored.first().map(|e| e.kind.name()),
        Some("SessionStarted")
    );
    assert_eq!(
        stored.last().map(|e| e.kind.name()),
        Some("SessionFinished")
    );
    assert!(
        stored.windows(2).all(|w| w[0].seq < w[1].seq),
        "strictly increasing seq"
    );
    assert_eq!(stored[0].seq, 1);
    for e in &stored {
        assert_eq!(e.session_id, id);
        let line = serde_json::to_string(e).expect("serialize");
        assert!(!line.contains('\n'), "one JSON per line");
        let back: SessionEvent = serde_json::from_str(&line).expect("parse");
        assert_eq!(&back, e);
    }
    for kind in [
        "MonitorScheduled",
        "StatusChanged",
        "WorkerStarted",
        "WorkerSucceeded",
        "WorkerFailed",
        "WorkerPanicked",
        "WorkerTimedOut",
        "WorkerRetrying",
        "FinalizerStarted",
        "FinalizerFinished",
        "MonitorCancelled",
    ] {
        assert!(
            stored.iter().any(|e| e.kind.name() == kind),
            "missing {kind}"
        );
    }

    // A live subscriber saw the same log, in the same order.
    let mut seen = Vec::new();
    while let Ok(Ok(e)) = tokio::time::timeout(Duration::ZERO, live.recv()).await {
        seen.push((*e).clone());
    }
    assert_eq!(seen, stored);
    sup.shutdown().await.expect("shutdown");
}

#[tokio::test(start_paused = true)]
async fn a_slow_subscriber_never_blocks_the_tree_and_is_told_what_it_missed() {
    let rec = Recorder::new(FinalizerMode::Ok);
    let sup = Supervisor::builder(harvest_fn(scripted), rec.clone())
        .config(SupervisorConfig {
            session: config(),
            event_capacity: 8,
            ..SupervisorConfig::default()
        })
        .start()
        .await
        .expect("start");
    let mut never_reads = sup.subscribe();
    let id = sup
        .start_session("csw", ids("ok", 200))
        .await
        .expect("start");
    let record = finished(&sup, id).await;
    assert_eq!(
        record.counts.succeeded, 200,
        "the session ran to the end regardless"
    );

    match never_reads.recv().await {
        Err(RecvError::Lagged { missed }) => assert!(missed > 300, "missed {missed}"),
        other => panic!("expected Lagged, got {other:?}"),
    }
    // After the gap the subscriber goes on with the newest events.
    let next = never_reads.recv().await.expect("events after the gap");
    assert_eq!(next.session_id, id);
    let stored = sup.events(id).await.expect("events");
    assert!(matches!(
        stored.last().map(|e| &e.kind),
        Some(EventKind::SessionFinished { .. })
    ));
    sup.shutdown().await.expect("shutdown");
}
