//! A finalizer that fails or panics: its error is recorded on the session, the status is
//! still terminal, the harvester is free and the monitor cancelled.

mod common;

use std::time::Duration;

use common::{FinalizerMode, Recorder, config, event_names, finished, supervisor};
use harvest_supervisor::{EventKind, SessionStatus};

async fn check(mode: FinalizerMode, expected: &str) {
    let rec = Recorder::new(mode);
    let sup = supervisor(config(), &rec).await;
    let id = sup
        .start_session("csw", ["ok-1", "fail-2"])
        .await
        .expect("start");
    let record = finished(&sup, id).await;

    assert_eq!(record.status, SessionStatus::FinishedSomeFailed);
    let error = record
        .finalizer_error
        .clone()
        .expect("finalizer error recorded");
    assert!(error.contains(expected), "{error}");
    let finished_event = sup
        .events(id)
        .await
        .expect("events")
        .into_iter()
        .find_map(|e| match e.kind {
            EventKind::FinalizerFinished { error, .. } => Some(error),
            _ => None,
        })
        .expect("FinalizerFinished");
    assert_eq!(finished_event.as_deref(), Some(error.as_str()));

    tokio::time::sleep(Duration::from_secs(600)).await;
    let names = event_names(&sup, id).await;
    assert!(names.contains(&"MonitorCancelled"));
    assert_eq!(
        names.last(),
        Some(&"SessionFinished"),
        "no tick after finalization"
    );
    assert_eq!(rec.calls(), 1);
    sup.start_session("csw", ["ok-1"])
        .await
        .expect("harvester is free");
    sup.shutdown().await.expect("shutdown");
}

#[tokio::test(start_paused = true)]
async fn a_failing_finalizer_is_recorded_and_the_session_still_ends() {
    check(FinalizerMode::Fail, "catalogue database is read-only").await;
}

#[tokio::test(start_paused = true)]
async fn a_panicking_finalizer_is_recorded_and_the_session_still_ends() {
    check(
        FinalizerMode::Panic,
        "the finalizer panicked: finalizer exploded",
    )
    .await;
}
