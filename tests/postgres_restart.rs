//! The database goes away under running sessions: restarted (`pg_ctl restart`), or down
//! for longer than a lease. Writes fail meanwhile (typed errors, no panic, no busy loop);
//! sessions keep what they observed and retry with backoff; a node whose lease cannot be
//! renewed self-fences; when the database is back every session finalizes once, with every
//! outcome. This file has a test binary (and so a cluster) of its own: restarting the
//! server must not disturb other tests.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use harvest_supervisor::store::PostgresStore;
use harvest_supervisor::{
    EventKind, FinalizeReason, HarvestContext, SessionConfig, SessionReport, SessionStatus,
    SessionStore, Supervisor, SupervisorConfig, finalizer_fn, harvest_fn,
};

/// A failure guard, not a deadline under test.
const GUARD: Duration = Duration::from_secs(90);

struct Running {
    sup: Supervisor,
    store: Arc<PostgresStore>,
    finalized: Arc<AtomicUsize>,
    harvested: Arc<AtomicUsize>,
}

async fn running(pg: &common::pg::TestPg, lease_ttl: Duration, takes: Duration) -> Running {
    let store = Arc::new(
        PostgresStore::connect_with(pg.options().lock_timeout(lease_ttl / 2))
            .await
            .expect("connect"),
    );
    let finalized = Arc::new(AtomicUsize::new(0));
    let harvested = Arc::new(AtomicUsize::new(0));
    let (f, h) = (Arc::clone(&finalized), Arc::clone(&harvested));
    let sup = Supervisor::builder(
        harvest_fn(move |_ctx: HarvestContext| {
            let h = Arc::clone(&h);
            async move {
                tokio::time::sleep(takes).await;
                h.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
        }),
        finalizer_fn(move |_report: SessionReport| {
            let f = Arc::clone(&f);
            async move {
                f.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
        }),
    )
    .store(Arc::clone(&store) as Arc<dyn SessionStore>)
    .config(
        SupervisorConfig::default()
            .with_session(
                SessionConfig::default()
                    .with_max_concurrency(4)
                    .with_per_resource_estimate(Duration::from_secs(1)),
            )
            .with_lease_ttl(lease_ttl)
            .with_lease_renew_interval(lease_ttl / 4)
            .with_rescue_interval(lease_ttl / 4),
    )
    .start()
    .await
    .expect("start");
    Running {
        sup,
        store,
        finalized,
        harvested,
    }
}

/// Waits until `n` resources were harvested.
async fn harvested(r: &Running, n: usize) {
    tokio::time::timeout(GUARD, async {
        while r.harvested.load(Ordering::SeqCst) < n {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("harvesting");
}

/// Checks the session ended once, complete, its log closed by `SessionFinished`.
async fn finished_whole(r: &Running, id: harvest_supervisor::SessionId, total: usize) {
    let record = tokio::time::timeout(GUARD, r.sup.wait_finished(id))
        .await
        .expect("finalized once the database is back")
        .expect("record");
    assert_eq!(record.status, SessionStatus::FinishedAllOk, "{record:?}");
    assert_eq!(record.reason(), Some(FinalizeReason::Completed));
    assert_eq!(record.counts.succeeded, total, "every outcome recorded");
    assert_eq!(r.finalized.load(Ordering::SeqCst), 1, "finalized once");
    let outcomes = r.store.outcomes(id).await.expect("outcomes");
    assert_eq!(outcomes.len(), total);
    let events = tokio::time::timeout(GUARD, async {
        loop {
            let events = r.store.events(id).await.expect("events");
            if matches!(
                events.last().map(|e| &e.kind),
                Some(EventKind::SessionFinished { .. })
            ) {
                return events;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("SessionFinished logged");
    let finished = events
        .iter()
        .filter(|e| matches!(e.kind, EventKind::SessionFinished { .. }))
        .count();
    assert_eq!(finished, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_restart_mid_session_loses_nothing() {
    let Some(pg) = common::pg::server("a_database_restart_mid_session_loses_nothing") else {
        return;
    };
    if pg.data.is_none() {
        eprintln!(
            "SKIPPED a_database_restart_mid_session_loses_nothing: needs the cluster these tests start (HARVEST_TEST_PG is set)"
        );
        return;
    }
    let _turn = TURN.lock().await;
    let r = running(pg, Duration::from_secs(30), Duration::from_millis(20)).await;
    let resources: Vec<String> = (0..300).map(|i| format!("r{i}")).collect();
    let id = r.sup.start_session("csw", resources).await.expect("start");
    harvested(&r, 40).await;
    assert!(pg.ctl(&["-m", "fast", "restart"]), "pg_ctl restart");
    finished_whole(&r, id, 300).await;
    // And the next session starts on the restarted server.
    let next = r.sup.start_session("csw", ["again"]).await.expect("start");
    let record = r.sup.wait_finished(next).await.expect("record");
    assert_eq!(record.status, SessionStatus::FinishedAllOk);
    r.sup.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_down_longer_than_the_lease_fences_the_node_and_it_finishes_after() {
    let test = "a_database_down_longer_than_the_lease_fences_the_node_and_it_finishes_after";
    let Some(pg) = common::pg::server(test) else {
        return;
    };
    if pg.data.is_none() {
        eprintln!("SKIPPED {test}: needs the cluster these tests start (HARVEST_TEST_PG is set)");
        return;
    }
    // Not at once with the restart test: both stop the one server.
    let _turn = TURN.lock().await;
    let ttl = Duration::from_secs(2);
    // 200 resources of 100 ms, four at a time: still harvesting when the lease runs out.
    let r = running(pg, ttl, Duration::from_millis(100)).await;
    let mut events = r.sup.subscribe();
    let resources: Vec<String> = (0..200).map(|i| format!("r{i}")).collect();
    let id = r.sup.start_session("csw", resources).await.expect("start");
    harvested(&r, 30).await;
    assert!(pg.ctl(&["-m", "fast", "stop"]), "pg_ctl stop");
    // Down for longer than the lease: the node fences itself (its running attempts are
    // cut, no new one starts) and says so in the session's log.
    let lost = tokio::time::timeout(GUARD, async {
        loop {
            match events.recv().await {
                Ok(e) if matches!(e.kind, EventKind::LeaseLost { .. }) => return,
                Ok(_) => {}
                Err(e) => panic!("bus: {e:?}"),
            }
        }
    })
    .await;
    assert!(
        lost.is_ok(),
        "the node self-fenced while the database was down"
    );
    let fenced_at = r.harvested.load(Ordering::SeqCst);
    tokio::time::sleep(ttl).await;
    assert!(
        r.harvested.load(Ordering::SeqCst) <= fenced_at + 4,
        "a fenced node starts no attempt"
    );
    assert!(pg.ctl(&["start"]), "pg_ctl start");
    finished_whole(&r, id, 200).await;
    let log = r.store.events(id).await.expect("events");
    assert!(
        log.iter()
            .any(|e| matches!(e.kind, EventKind::LeaseLost { .. }))
    );
    assert!(
        log.iter()
            .any(|e| matches!(e.kind, EventKind::LeaseRenewed { .. }))
    );
    r.sup.shutdown().await.expect("shutdown");
}

/// Both tests stop the server: one at a time.
static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
