//! Bad input gets a typed error and changes nothing: invalid config, duplicate resource ids,
//! unknown sessions, a busy harvester (also under 100 concurrent starts).

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{FinalizerMode, Recorder, config, finished, supervisor};
use harvest_supervisor::{
    Error, SessionConfig, SessionError, SessionId, SessionRequest, StartError, Supervisor,
    SupervisorConfig, finalizer_fn, harvest_fn,
};

#[tokio::test(start_paused = true)]
async fn an_invalid_session_config_is_rejected_naming_the_field() {
    let rec = Recorder::new(FinalizerMode::Ok);
    let sup = supervisor(config(), &rec).await;
    let bad = config().with_max_concurrency(0);
    match sup
        .start(SessionRequest::new("csw", ["ok-1"]).with_config(bad))
        .await
    {
        Err(StartError::InvalidConfig(e)) => {
            assert_eq!(e.field(), "max_concurrency");
            assert!(e.to_string().contains("at least 1"), "{e}");
        }
        other => panic!("expected InvalidConfig, got {other:?}"),
    }
    // The same through `start_session_with`.
    match sup
        .start_session_with(
            "csw",
            ["ok-1"],
            config().with_resource_timeout(Duration::ZERO),
        )
        .await
    {
        Err(StartError::InvalidConfig(e)) => assert_eq!(e.field(), "resource_timeout"),
        other => panic!("expected InvalidConfig, got {other:?}"),
    }
    assert!(
        sup.sessions().await.expect("list").is_empty(),
        "nothing was created"
    );
    // A valid one is the session's own budget.
    let budget = config().with_buffer(Duration::from_secs(7));
    let id = sup
        .start_session_with("csw", ["ok-1"], budget.clone())
        .await
        .expect("harvester untouched");
    assert_eq!(
        finished(&sup, id).await.workflow_time,
        budget.workflow_time(1)
    );
    sup.start_session("csw", ["ok-1"])
        .await
        .expect("harvester untouched");
    sup.shutdown().await.expect("shutdown");
}

#[tokio::test(start_paused = true)]
async fn an_invalid_supervisor_config_fails_at_start() {
    let config = SupervisorConfig::default()
        .with_session(SessionConfig::default().with_monitor_interval(Duration::ZERO));
    let started = Supervisor::builder(
        harvest_fn(|_| async { Ok(()) }),
        finalizer_fn(|_| async { Ok(()) }),
    )
    .config(config)
    .start()
    .await;
    match started {
        Err(Error::Config(e)) => assert_eq!(e.field(), "monitor_interval"),
        Err(other) => panic!("expected a config error, got {other:?}"),
        Ok(_) => panic!("an invalid config must not start"),
    }
}

#[tokio::test(start_paused = true)]
async fn duplicate_resource_ids_are_rejected() {
    let rec = Recorder::new(FinalizerMode::Ok);
    let sup = supervisor(config(), &rec).await;
    match sup.start_session("csw", ["ok-1", "ok-2", "ok-1"]).await {
        Err(StartError::DuplicateResource { resource_id }) => assert_eq!(resource_id, "ok-1"),
        other => panic!("expected DuplicateResource, got {other:?}"),
    }
    assert!(sup.sessions().await.expect("list").is_empty());
    assert_eq!(rec.calls(), 0);
    sup.shutdown().await.expect("shutdown");
}

#[tokio::test(start_paused = true)]
async fn unknown_session_ids_are_typed_errors() {
    let rec = Recorder::new(FinalizerMode::Ok);
    let sup = supervisor(config(), &rec).await;
    let ghost = SessionId::new();
    assert!(matches!(
        sup.session(ghost).await,
        Err(SessionError::UnknownSession { session_id }) if session_id == ghost
    ));
    assert!(matches!(
        sup.abort(ghost).await,
        Err(SessionError::UnknownSession { session_id }) if session_id == ghost
    ));
    sup.shutdown().await.expect("shutdown");
}

#[tokio::test(start_paused = true)]
async fn a_second_start_for_a_busy_harvester_names_the_running_session() {
    let rec = Recorder::new(FinalizerMode::Ok);
    let sup = supervisor(config(), &rec).await;
    let first = sup.start_session("csw", ["sleep5-1"]).await.expect("start");
    match sup.start_session("csw", ["ok-1"]).await {
        Err(StartError::HarvesterBusy {
            harvester_id,
            session,
        }) => {
            assert_eq!(harvester_id, "csw");
            assert_eq!(session, first);
        }
        other => panic!("expected HarvesterBusy, got {other:?}"),
    }
    // Another harvester is not affected.
    sup.start_session("wms", ["ok-1"])
        .await
        .expect("other harvester");
    finished(&sup, first).await;
    sup.start_session("csw", ["ok-1"])
        .await
        .expect("free again");
    sup.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_hundred_concurrent_starts_for_one_harvester_have_exactly_one_winner() {
    let rec = Recorder::new(FinalizerMode::Ok);
    let sup = Arc::new(supervisor(config(), &rec).await);
    let starts = (0..100).map(|i| {
        let sup = Arc::clone(&sup);
        tokio::spawn(async move { sup.start_session("csw", [format!("sleep5-{i}")]).await })
    });
    let results = futures::future::join_all(starts).await;
    let mut winners = Vec::new();
    let mut busy = 0;
    for r in results {
        match r.expect("task") {
            Ok(id) => winners.push(id),
            Err(StartError::HarvesterBusy { .. }) => busy += 1,
            Err(other) => panic!("unexpected error {other:?}"),
        }
    }
    assert_eq!(winners.len(), 1);
    assert_eq!(busy, 99);
    assert_eq!(sup.sessions().await.expect("list").len(), 1);
    sup.abort(winners[0]).await.expect("abort");
}

#[tokio::test(start_paused = true)]
async fn empty_blank_control_and_overlong_ids_are_rejected_naming_the_rule() {
    let rec = Recorder::new(FinalizerMode::Ok);
    let sup = supervisor(config(), &rec).await;
    let long = "x".repeat(60_000);
    let bad = [
        "",
        " ",
        "\t",
        "a\0b",
        "line\nbreak",
        "bell\u{7}",
        "del\u{7f}",
        &long,
    ];
    for id in bad {
        match sup.start_session(id, ["ok-1"]).await {
            Err(StartError::InvalidId(e)) => {
                assert_eq!(e.kind(), "harvester_id", "{e}");
                assert!(
                    e.to_string().len() < 300,
                    "the error quotes a bounded id: {e}"
                );
            }
            other => panic!("harvester id {id:?}: expected InvalidId, got {other:?}"),
        }
        match sup.start_session("csw", ["ok-1", id]).await {
            Err(StartError::InvalidId(e)) => assert_eq!(e.kind(), "resource_id", "{e}"),
            other => panic!("resource id {id:?}: expected InvalidId, got {other:?}"),
        }
    }
    assert!(
        sup.sessions().await.expect("list").is_empty(),
        "nothing was created"
    );
    // The longest accepted id, and ids with spaces or non-ASCII letters inside, are fine.
    let longest = "y".repeat(harvest_supervisor::model::MAX_ID_BYTES);
    let id = sup
        .start_session("csw", [longest.as_str(), "a b", "Zürich-ß-東京"])
        .await
        .expect("valid ids");
    finished(&sup, id).await;
    assert!(harvest_supervisor::HarvesterId::parse("").is_err());
    assert!(harvest_supervisor::ResourceId::parse("ok").is_ok());
    sup.shutdown().await.expect("shutdown");
}

#[test]
fn lease_and_rescue_settings_out_of_bounds_are_rejected_naming_the_field() {
    let ok = SupervisorConfig::default();
    assert!(ok.validate().is_ok());
    let cases: Vec<(&str, SupervisorConfig)> = vec![
        (
            "lease_ttl",
            ok.clone()
                .with_lease_ttl(Duration::from_secs(19))
                .with_lease_renew_interval(Duration::from_secs(10)),
        ),
        ("lease_ttl", ok.clone().with_lease_ttl(Duration::MAX)),
        (
            "lease_renew_interval",
            ok.clone()
                .with_lease_renew_interval(Duration::from_millis(1)),
        ),
        (
            "lease_renew_interval",
            ok.clone().with_lease_renew_interval(Duration::MAX),
        ),
        (
            "rescue_interval",
            ok.clone().with_rescue_interval(Duration::ZERO),
        ),
        (
            "rescue_interval",
            ok.clone().with_rescue_interval(Duration::MAX),
        ),
        ("node_name", ok.clone().with_node_name(Some(" ".into()))),
        ("node_name", ok.clone().with_node_name(Some("a\nb".into()))),
    ];
    for (field, config) in cases {
        match config.validate() {
            Err(e) => assert_eq!(e.field(), field, "{e}"),
            Ok(()) => panic!("{field}: accepted {config:?}"),
        }
    }
    // The tightest valid lease: twice the renewal.
    let tight = ok
        .with_lease_ttl(Duration::from_millis(20))
        .with_lease_renew_interval(Duration::from_millis(10))
        .with_rescue_interval(Duration::from_millis(10))
        .with_node_name(Some("node-1".into()));
    assert!(tight.validate().is_ok());
}
