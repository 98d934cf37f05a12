//! History for an admin page, end to end on the durable store: sessions by harvester and
//! status, newest first, paginated; one session's report with its outcomes and events.
//!
//! Real time, not the paused clock: the store answers from its own thread, and a paused
//! runtime would jump its clock forward while waiting for it.

mod common;

use std::sync::Arc;

use common::{FinalizerMode, Recorder, config, supervisor_on};
use harvest_supervisor::{SessionQuery, SessionStatus, SqliteStore};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_pages_newest_first_and_a_report_has_outcomes_and_events() {
    let dir = tempfile::tempdir().expect("dir");
    let store = Arc::new(
        SqliteStore::open(dir.path().join("h.db"))
            .await
            .expect("open"),
    );
    let rec = Recorder::new(FinalizerMode::Ok);
    let sup = supervisor_on(store, config(), &rec).await;

    let mut csw = Vec::new();
    for i in 0..3 {
        let resources = if i == 1 {
            vec!["ok-1", "fail-2"]
        } else {
            vec!["ok-1", "ok-2"]
        };
        let id = sup.start_session("csw", resources).await.expect("start");
        sup.wait_finished(id).await.expect("finished");
        csw.push(id);
    }
    let wms = sup.start_session("wms", ["ok-1"]).await.expect("start");
    sup.wait_finished(wms).await.expect("finished");

    let first = sup
        .history(&SessionQuery {
            harvester_id: Some("csw".into()),
            limit: 2,
            ..SessionQuery::default()
        })
        .await
        .expect("page 1");
    let ids: Vec<_> = first.sessions.iter().map(|r| r.id).collect();
    assert_eq!(ids, vec![csw[2], csw[1]]);
    let second = sup
        .history(&SessionQuery {
            harvester_id: Some("csw".into()),
            limit: 2,
            before: first.next,
            ..SessionQuery::default()
        })
        .await
        .expect("page 2");
    assert_eq!(
        second.sessions.iter().map(|r| r.id).collect::<Vec<_>>(),
        vec![csw[0]]
    );
    assert_eq!(second.next, None);

    let failed = sup
        .history(&SessionQuery {
            status: Some(SessionStatus::FinishedSomeFailed),
            ..SessionQuery::default()
        })
        .await
        .expect("by status");
    assert_eq!(failed.sessions.len(), 1);
    assert_eq!(failed.sessions[0].id, csw[1]);

    let report = sup.report(csw[1]).await.expect("report");
    assert_eq!(report.record.status, SessionStatus::FinishedSomeFailed);
    assert_eq!(report.outcomes.len(), 2);
    assert_eq!(
        report.events.first().map(|e| e.kind.name()),
        Some("SessionStarted")
    );
    assert_eq!(
        report.events.last().map(|e| e.kind.name()),
        Some("SessionFinished")
    );
    assert!(report.events.windows(2).all(|w| w[0].seq < w[1].seq));
    sup.shutdown().await.expect("shutdown");
}
