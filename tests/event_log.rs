//! The supervision event log: ordered, complete, serde round-trip, and never blocked by a
//! slow subscriber.

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{FinalizerMode, Recorder, config, finished, ids, scripted};
use harvest_supervisor::{
    EventKind, RecvError, SessionEvent, Supervisor, SupervisorConfig, harvest_fn,
};

#[tokio::test(start_paused = true)]
async fn a_session_log_runs_from_started_to_finished_in_seq_order_and_round_trips() {
    let rec = Recorder::new(FinalizerMode::Ok);
    let sup = common::supervisor(
        config()
            .with_resource_timeout(Some(Duration::from_secs(20)))
            .with_retry(harvest_supervisor::RetryPolicy::default().with_max_attempts(2)),
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
        .config(
            SupervisorConfig::default()
                .with_session(config())
                .with_event_capacity(8),
        )
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

#[tokio::test(start_paused = true)]
async fn wait_finished_returns_for_a_terminal_session_whatever_its_last_stored_event() {
    let rec = Recorder::new(FinalizerMode::Ok);
    let sup = common::supervisor(config(), &rec).await;
    let id = sup.start_session("csw", ["ok-1"]).await.expect("start");
    let record = finished(&sup, id).await;
    // A stray event stored after the end (as a late monitor tick was): the record is
    // terminal, so the session is finished whatever the log's last line says.
    sup.store()
        .append_event(
            record.fence().expect("owned"),
            SessionEvent {
                seq: 1_000,
                at: chrono::Utc::now(),
                session_id: id,
                harvester_id: "csw".into(),
                kind: EventKind::MonitorTick {
                    remaining: Duration::ZERO,
                },
            },
        )
        .expect("append");
    let again = tokio::time::timeout(Duration::from_secs(5), sup.wait_finished(id))
        .await
        .expect("wait_finished never hangs on a terminal session")
        .expect("record");
    assert_eq!(again, record);
    sup.shutdown().await.expect("shutdown");
}

#[tokio::test(start_paused = true)]
async fn wait_finished_wakes_for_a_session_another_supervisor_finished() {
    // Two supervisors on one store (two processes on one database, in miniature): one
    // waits for a session the other runs, and hears of its end from the store.
    let store: std::sync::Arc<dyn harvest_supervisor::SessionStore> =
        std::sync::Arc::new(harvest_supervisor::MemoryStore::new());
    let rec = Recorder::new(FinalizerMode::Ok);
    let watcher = common::supervisor_on(std::sync::Arc::clone(&store), config(), &rec).await;
    let runner = common::supervisor_on(store, config(), &rec).await;
    let id = runner
        .start_session("csw", ["sleep30-1"])
        .await
        .expect("start");
    let started = tokio::time::Instant::now();
    let record = tokio::time::timeout(Duration::from_secs(60), watcher.wait_finished(id))
        .await
        .expect("the watcher heard of the end")
        .expect("record");
    assert!(record.status.is_terminal());
    assert!(
        started.elapsed() <= Duration::from_secs(32),
        "within a poll of the end: {:?}",
        started.elapsed()
    );
    runner.shutdown().await.expect("shutdown");
    watcher.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_finished_is_the_last_event_when_the_deadline_meets_the_last_outcome() {
    // Real threads and a real clock: the monitor checks every millisecond, and each
    // session's one resource ends within a millisecond or two of its deadline, so the
    // monitor's tick (its store read, its events) races the session's finalization on the
    // other thread, many times over.
    let cfg = config()
        .with_per_resource_estimate(Duration::from_millis(20))
        .with_buffer(Duration::from_millis(30))
        .with_monitor_interval(Duration::from_millis(1))
        .with_escalation_grace(Duration::from_millis(20))
        .with_killed_exit_wait(Duration::from_millis(10));
    let harvest = harvest_fn(|ctx: harvest_supervisor::HarvestContext| async move {
        let n: u64 = ctx.resource_id.parse().unwrap_or(0);
        tokio::time::sleep(Duration::from_micros(48_000 + n % 4_000)).await;
        Ok(())
    });
    let rec = Recorder::new(FinalizerMode::Ok);
    let sup = Supervisor::builder(harvest, rec.clone())
        .config(SupervisorConfig::default().with_session(cfg))
        .start()
        .await
        .expect("supervisor");
    for round in 0..12 {
        let mut sessions = Vec::new();
        for h in 0..100u64 {
            let id = sup
                .start_session(format!("h{h}"), [format!("{}", h * 37 + round * 11)])
                .await
                .expect("start");
            sessions.push(id);
        }
        for id in sessions {
            tokio::time::timeout(Duration::from_secs(30), sup.wait_finished(id))
                .await
                .expect("finished")
                .expect("record");
        }
    }
    // Let any late tick land before reading the logs.
    tokio::time::sleep(Duration::from_millis(200)).await;
    for record in sup.sessions().await.expect("sessions") {
        let events = sup.events(record.id).await.expect("events");
        let finished = events
            .iter()
            .filter(|e| matches!(e.kind, EventKind::SessionFinished { .. }))
            .count();
        assert_eq!(finished, 1, "{:?}", events);
        let last = events.last().map(|e| e.kind.name());
        assert_eq!(
            last,
            Some("SessionFinished"),
            "{:?}",
            &events[events.len().saturating_sub(4)..]
        );
    }
    sup.shutdown().await.expect("shutdown");
}

/// A supervisor over the scripted harvest on a fault-injecting memory store, with `config`.
async fn on_faulty_store(
    config: SupervisorConfig,
) -> (Arc<common::faulty::FaultyStore>, Supervisor) {
    let store = common::faulty::FaultyStore::new();
    let sup =
        common::supervisor_configured(store.clone(), config, &Recorder::new(FinalizerMode::Ok))
            .await;
    (store, sup)
}

/// Followers and waiters of one session are woken by that session's events only: the
/// events of every other session (thousands a second on a busy server) neither wake them
/// nor make them fall behind and read the store again. (Each used to hear every event of
/// every session on the one bus: 200 open event streams on a server cost 200 wake-ups per
/// event of any session, and a store read each time they lagged.)
#[tokio::test(start_paused = true)]
async fn a_follower_is_not_woken_by_other_sessions_events() {
    let (store, sup) = on_faulty_store(
        SupervisorConfig::default()
            .with_session(config().with_max_concurrency(8))
            // Small: a follower hearing every session's events lags at once.
            .with_event_capacity(16),
    )
    .await;
    let sup = Arc::new(sup);
    // Followed: a session whose one resource hangs until its per-resource timeout.
    let quiet = sup.start_session("quiet", ["hang-1"]).await.expect("start");
    let mut follower = sup.follow(quiet, 0);
    let followed = tokio::spawn(async move {
        let mut seen = Vec::new();
        while let Some(event) = follower.next().await {
            seen.push(event.expect("an event"));
        }
        seen
    });
    let waiting = {
        let sup = Arc::clone(&sup);
        tokio::spawn(async move { sup.wait_finished(quiet).await })
    };
    tokio::time::sleep(Duration::from_millis(10)).await;
    let (after_reads, session_reads) = (
        store.events_after_reads.load(Ordering::SeqCst),
        store.session_reads_of(quiet),
    );
    // Meanwhile a busy one: 400 resources, about 1,600 events.
    let busy = sup
        .start_session("busy", ids("ok", 400))
        .await
        .expect("start");
    finished(&sup, busy).await;
    assert_eq!(
        store.events_after_reads.load(Ordering::SeqCst) - after_reads,
        0,
        "the follower read the store again for another session's events"
    );
    assert_eq!(
        store.session_reads_of(quiet) - session_reads,
        0,
        "the waiter read the store again for another session's events"
    );
    assert!(!followed.is_finished() && !waiting.is_finished());
    // The followed session still ends, followed to its end.
    sup.abort(quiet).await.expect("abort");
    let seen = followed.await.expect("follower");
    assert!(seen.iter().all(|e| e.session_id == quiet));
    assert!(matches!(
        seen.last().map(|e| &e.kind),
        Some(EventKind::SessionFinished { .. })
    ));
    assert!(
        waiting
            .await
            .expect("waiter")
            .expect("finished")
            .status
            .is_terminal()
    );
    sup.shutdown().await.expect("shutdown");
}

/// `Supervisor::live_signals` says from memory what a running session's log has said
/// that its record does not: the same counts as its stored log, while it runs; and a
/// lost lease until it is renewed. `None` once the session is over.
#[tokio::test(start_paused = true)]
async fn live_signals_count_what_the_running_log_says() {
    let (store, sup) = on_faulty_store(
        SupervisorConfig::default()
            .with_session(config())
            .with_lease_renew_interval(Duration::from_secs(1))
            .with_lease_ttl(Duration::from_secs(10)),
    )
    .await;
    let retried = harvest_supervisor::RetryPolicy::default()
        .with_max_attempts(1000)
        .with_initial_backoff(Duration::from_secs(1))
        .with_max_backoff(Duration::from_secs(1));
    let silent = sup
        .start(
            harvest_supervisor::SessionRequest::new("silent", ["hang-1"]).with_config(
                config()
                    .with_heartbeat_timeout(Some(Duration::from_secs(2)))
                    .with_resource_timeout(Some(Duration::from_secs(3600)))
                    .with_retry(retried.clone()),
            ),
        )
        .await
        .expect("start");
    let slow = sup
        .start(
            harvest_supervisor::SessionRequest::new("slow", ["hang-2"]).with_config(
                config()
                    .with_resource_timeout(Some(Duration::from_secs(5)))
                    .with_retry(retried),
            ),
        )
        .await
        .expect("start");
    tokio::time::sleep(Duration::from_secs(20)).await;
    let counted = |events: &[harvest_supervisor::SessionEvent], silent: bool| {
        events
            .iter()
            .filter(|e| {
                matches!(e.kind, EventKind::WorkerTimedOut { heartbeat_silent, .. } if heartbeat_silent == silent)
            })
            .count() as u32
    };
    for id in [silent, slow] {
        let live = sup.live_signals(id).expect("runs here");
        let events = sup.events(id).await.expect("events");
        assert_eq!(live.heartbeat_silences, counted(&events, true), "{id}");
        assert_eq!(live.timeouts, counted(&events, false), "{id}");
        assert!(!live.escalated && !live.lease_lost);
    }
    let (silent_now, slow_now) = (
        sup.live_signals(silent).expect("runs"),
        sup.live_signals(slow).expect("runs"),
    );
    assert!(
        silent_now.heartbeat_silences >= 3 && silent_now.timeouts == 0,
        "{silent_now:?}"
    );
    assert!(
        slow_now.timeouts >= 2 && slow_now.heartbeat_silences == 0,
        "{slow_now:?}"
    );

    // The store takes no renewal for longer than the lease: the node fences, each session
    // logs `LeaseLost`; renewed, `LeaseRenewed`.
    store.failing_renewals.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(12)).await;
    assert!(sup.live_signals(silent).expect("runs").lease_lost);
    store.failing_renewals.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(!sup.live_signals(silent).expect("runs").lease_lost);

    for id in [silent, slow] {
        sup.abort(id).await.expect("abort");
        finished(&sup, id).await;
        assert_eq!(sup.live_signals(id), None, "over");
    }
    assert_eq!(sup.live_signals(harvest_supervisor::SessionId::new()), None);
    sup.shutdown().await.expect("shutdown");
}
