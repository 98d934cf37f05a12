//! The watchdog: a hung harvest meets the monitor's deadline, a stuck session is escalated
//! to the root, and a crashed monitor is restarted with the deadline intact.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::faulty::FaultyStore;
use common::{FinalizerMode, Recorder, config, finished, has_event, supervisor, supervisor_on};
use harvest_supervisor::{
    EventKind, FinalizeReason, ResourceOutcome, SessionStatus, Supervisor, SupervisorConfig,
    finalizer_fn, harvest_fn,
};
use tokio::time::Instant;

#[tokio::test(start_paused = true)]
async fn finalizes_when_monitor_deadline_expires_and_hung_resources_count_as_timed_out() {
    let rec = Recorder::new(FinalizerMode::Ok);
    let sup = supervisor(config(), &rec).await; // no resource_timeout
    let started = Instant::now();
    let id = sup
        .start_session("csw", ["ok-1", "hang-2", "hang-3"])
        .await
        .expect("start");
    let record = finished(&sup, id).await;

    // workflow_time = 3 x 10 s + 100 s; the monitor ticks every 5 s.
    assert_eq!(record.workflow_time, Duration::from_secs(130));
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(130) && took <= Duration::from_secs(135),
        "{took:?}"
    );
    assert_eq!(record.reason(), Some(FinalizeReason::DeadlineExpired));
    assert_eq!(record.status, SessionStatus::FinishedSomeFailed);
    assert_eq!((record.counts.succeeded, record.counts.timed_out), (1, 2));
    let report = &rec.reports_for(id)[0];
    assert_eq!(report.outcomes[1].outcome, ResourceOutcome::TimedOut);
    assert_eq!(
        report.outcomes[1].attempts, 1,
        "the hung attempt is counted"
    );
    assert_eq!(rec.calls(), 1);

    let only_hangs = sup
        .start_session("csw", ["hang-1"])
        .await
        .expect("harvester free");
    let record = finished(&sup, only_hangs).await;
    assert_eq!(
        record.status,
        SessionStatus::FinishedAllFailed,
        "never all-ok"
    );
    sup.shutdown().await.expect("shutdown");
}

/// Counts the harvests that hang and are still alive (dropped: no longer counted).
struct Alive(Arc<AtomicUsize>);

impl Drop for Alive {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[tokio::test(start_paused = true)]
async fn a_harvest_that_ignores_its_token_is_dropped_before_the_finalizer_runs() {
    let alive = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&alive);
    let harvest = harvest_fn(move |_ctx| {
        let counter = Arc::clone(&counter);
        async move {
            counter.fetch_add(1, Ordering::SeqCst);
            let _alive = Alive(counter);
            std::future::pending::<()>().await;
            Ok(())
        }
    });
    // What the finalizer sees still harvesting when it starts.
    let seen = Arc::new(AtomicUsize::new(usize::MAX));
    let (alive_then, seen_by_finalizer) = (Arc::clone(&alive), Arc::clone(&seen));
    let finalizer = finalizer_fn(move |_report| {
        seen_by_finalizer.store(alive_then.load(Ordering::SeqCst), Ordering::SeqCst);
        async { Ok(()) }
    });
    let sup = Supervisor::builder(harvest, finalizer)
        .config(SupervisorConfig::default().with_session(config()))
        .start()
        .await
        .expect("supervisor starts");
    let id = sup
        .start_session("csw", ["a", "b", "c"])
        .await
        .expect("start");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(alive.load(Ordering::SeqCst), 3, "all three are harvesting");
    let record = finished(&sup, id).await;
    assert_eq!(record.reason(), Some(FinalizeReason::DeadlineExpired));
    // The session killed its workers first: their harvests were dropped at their await,
    // not left running beside the finalizer (or for ever).
    assert_eq!(
        seen.load(Ordering::SeqCst),
        0,
        "harvests alive at the finalizer"
    );
    assert_eq!(alive.load(Ordering::SeqCst), 0);
    sup.shutdown().await.expect("shutdown");
}

#[tokio::test(start_paused = true)]
async fn a_finalizer_that_never_returns_is_escalated_and_the_root_frees_the_harvester() {
    let rec = Recorder::new(FinalizerMode::Hang);
    let sup = supervisor(config(), &rec).await;
    let started = Instant::now();
    let id = sup
        .start_session("csw", ["ok-1", "ok-2"])
        .await
        .expect("start");
    let record = finished(&sup, id).await;
    // The claim is seen on the first tick (5 s), and watched on every tick after it (not
    // only on the monitor's store-read ticks): escalated once `escalation_grace` (20 s) is
    // over, at 25 s.
    assert!(
        started.elapsed() <= Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );

    assert!(record.status.is_terminal());
    assert_eq!(
        record.status,
        SessionStatus::FinishedAllOk,
        "the resources did succeed"
    );
    assert_eq!(record.reason(), Some(FinalizeReason::Completed));
    let error = record.finalizer_error.expect("the hang is recorded");
    assert!(error.contains("did not return"), "{error}");
    assert_eq!(record.finalizer_attempts, 1, "cut, not run again");
    assert!(
        has_event(&sup, id, |k| matches!(
            k,
            EventKind::MonitorEscalated { .. }
        ))
        .await
    );
    assert_eq!(rec.calls(), 1, "the finalizer is never started twice");
    sup.start_session("csw", ["ok-1"])
        .await
        .expect("harvester is free");
    sup.shutdown().await.expect("shutdown");
}

#[tokio::test(start_paused = true)]
async fn a_session_actor_stuck_in_a_handler_is_force_finalized_by_the_root() {
    let store = FaultyStore::new();
    store.hang_outcome_writes.store(true, Ordering::SeqCst);
    let rec = Recorder::new(FinalizerMode::Ok);
    let sup = supervisor_on(store.clone(), config(), &rec).await;
    let started = Instant::now();
    let id = sup
        .start_session("csw", ["ok-1", "ok-2"])
        .await
        .expect("start");
    let record = finished(&sup, id).await;

    // Deadline 120 s, then escalation_grace 20 s, on 5 s ticks.
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(140) && took <= Duration::from_secs(150),
        "{took:?}"
    );
    assert_eq!(record.reason(), Some(FinalizeReason::DeadlineExpired));
    assert_eq!(record.counts.total(), 2);
    assert_eq!(
        record.counts.succeeded, 0,
        "nothing was recorded, nothing counts as success"
    );
    assert_eq!(rec.calls(), 1, "the root ran the finalizer");
    assert!(
        has_event(&sup, id, |k| matches!(
            k,
            EventKind::MonitorEscalated { .. }
        ))
        .await
    );

    store.hang_outcome_writes.store(false, Ordering::SeqCst);
    let next = sup
        .start_session("csw", ["ok-1"])
        .await
        .expect("harvester is free");
    assert_eq!(
        finished(&sup, next).await.status,
        SessionStatus::FinishedAllOk
    );
    sup.shutdown().await.expect("shutdown");
}

#[tokio::test(start_paused = true)]
async fn a_crashed_monitor_is_restarted_and_the_deadline_still_holds() {
    let store = FaultyStore::new();
    let rec = Recorder::new(FinalizerMode::Ok);
    let sup = supervisor_on(store.clone(), config(), &rec).await;
    let started = Instant::now();
    let id = sup.start_session("csw", ["hang-1"]).await.expect("start");
    // The monitor's next two reads of the record fail: it crashes, is restarted, crashes again.
    store.failing_reads.store(2, Ordering::SeqCst);
    // Ticks at 5 s (crash, restart) and 10 s (crash, restart): nobody else reads meanwhile.
    tokio::time::sleep(Duration::from_secs(12)).await;
    assert_eq!(
        store.failing_reads.load(Ordering::SeqCst),
        0,
        "the monitor took both failures"
    );
    let record = finished(&sup, id).await;

    let restarts = sup
        .events(id)
        .await
        .expect("events")
        .iter()
        .filter(|e| matches!(e.kind, EventKind::MonitorRestarted { .. }))
        .count();
    assert_eq!(restarts, 2);
    assert_eq!(record.reason(), Some(FinalizeReason::DeadlineExpired));
    let took = started.elapsed();
    // Deadline 110 s from the session's start, not from the restart.
    assert!(
        took >= Duration::from_secs(110) && took <= Duration::from_secs(116),
        "{took:?}"
    );
    assert_eq!(rec.calls(), 1);
    sup.shutdown().await.expect("shutdown");
}

#[tokio::test(start_paused = true)]
async fn a_session_stuck_between_its_claim_and_its_finalizer_still_gets_its_finalizer_run() {
    // The session claims its finalization, then its actor is stuck (a store call that
    // never returns) before the finalizer starts. The monitor escalates; the root finds
    // the claim with no finalizer started, so the finalizer never ran: it runs it.
    let store = FaultyStore::wrapping(Arc::new(harvest_supervisor::MemoryStore::new()));
    store.hang_after_claim.store(true, Ordering::SeqCst);
    let store = Arc::new(store);
    let rec = Recorder::new(FinalizerMode::Ok);
    let sup = supervisor_on(store.clone(), config(), &rec).await;
    let id = sup
        .start_session("csw", ["ok-1", "fail-2"])
        .await
        .expect("start");
    let record = finished(&sup, id).await;

    assert_eq!(rec.calls(), 1, "the finalizer ran, once");
    assert_eq!(record.finalizer_error, None);
    assert_eq!(record.finalizer_attempts, 1);
    assert_eq!(
        record.reason(),
        Some(FinalizeReason::Completed),
        "the claimed reason"
    );
    assert_eq!(record.status, SessionStatus::FinishedSomeFailed);
    let report = &rec.reports_for(id)[0];
    assert_eq!(report.finalizer_attempt, 1);
    assert_eq!((report.counts.succeeded, report.counts.failed), (1, 1));
    assert!(
        has_event(&sup, id, |k| matches!(
            k,
            EventKind::MonitorEscalated { .. }
        ))
        .await
    );
    store.hang_after_claim.store(false, Ordering::SeqCst);
    sup.start_session("csw", ["ok-1"])
        .await
        .expect("harvester is free");
    sup.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn escalation_never_completes_a_session_while_its_finalizer_still_runs() {
    // A finalizer that blocks its thread (no `.await` to be dropped at) until the test
    // releases it, long after the escalation grace: the monitor escalates, the root kills
    // the session actor, but the kill cannot take effect until the finalizer returns. The
    // root must wait for the actor to be gone: the session stays unfinished, and its
    // harvester busy, until then. (A blocked thread stops a paused clock too: this test
    // runs on the real one, and waits for events, not for fixed times, where it can.)
    use std::sync::atomic::AtomicBool;
    let running = Arc::new(AtomicBool::new(false));
    let finished_running = Arc::new(AtomicBool::new(false));
    let (r, f) = (Arc::clone(&running), Arc::clone(&finished_running));
    let (release, released) = std::sync::mpsc::channel::<()>();
    let released = std::sync::Mutex::new(released);
    let finalizer = finalizer_fn(move |_report| {
        r.store(true, Ordering::SeqCst);
        if let Ok(released) = released.lock() {
            // Bounded, so that a failing test cannot hang for ever.
            let _ = released.recv_timeout(Duration::from_secs(60));
        }
        f.store(true, Ordering::SeqCst);
        async { Ok(()) }
    });
    let sup = Supervisor::builder(harvest_fn(common::scripted), finalizer)
        .config(
            SupervisorConfig::default().with_session(
                config()
                    .with_monitor_interval(Duration::from_millis(20))
                    .with_escalation_grace(Duration::from_millis(200))
                    .with_killed_exit_wait(Duration::from_millis(50)),
            ),
        )
        .start()
        .await
        .expect("supervisor");
    let id = sup.start_session("csw", ["ok-1"]).await.expect("start");
    while !running.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Escalated (after 200 ms of grace), and the root's kill attempted (its 50 ms wait
    // for the actor's exit run out several times over), the finalizer still blocked.
    tokio::time::timeout(Duration::from_secs(30), async {
        while !has_event(&sup, id, |k| {
            matches!(k, EventKind::MonitorEscalated { .. })
        })
        .await
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("escalated");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!finished_running.load(Ordering::SeqCst));
    let record = sup.session(id).await.expect("record");
    assert!(
        !record.status.is_terminal(),
        "completed while its finalizer still runs: {record:?}"
    );
    assert!(
        matches!(
            sup.start_session("csw", ["ok-2"]).await,
            Err(harvest_supervisor::StartError::HarvesterBusy { .. })
        ),
        "the harvester was freed while the finalizer still runs"
    );
    release.send(()).expect("the finalizer waits");
    let record = tokio::time::timeout(Duration::from_secs(10), sup.wait_finished(id))
        .await
        .expect("finished once the finalizer returned")
        .expect("record");
    assert!(finished_running.load(Ordering::SeqCst));
    assert!(record.status.is_terminal());
    sup.shutdown().await.expect("shutdown");
}

#[tokio::test(start_paused = true)]
async fn a_force_finalized_session_has_no_harvest_running_beside_its_finalizer() {
    // The session actor is stuck in a handler (an outcome write that never returns), so the
    // root kills it; its workers are tasks, not actors, and must be gone (their harvests
    // dropped) before the root runs the finalizer, as a killed actor's children would be.
    let store = FaultyStore::new();
    store.hang_outcome_writes.store(true, Ordering::SeqCst);
    let alive = Arc::new(AtomicUsize::new(0));
    let in_harvest = Arc::clone(&alive);
    let harvest = harvest_fn(move |ctx: harvest_supervisor::HarvestContext| {
        in_harvest.fetch_add(1, Ordering::SeqCst);
        let guard = Alive(Arc::clone(&in_harvest));
        async move {
            let _guard = guard;
            if ctx.resource_id.as_str().starts_with("hang") {
                std::future::pending::<()>().await;
            }
            Ok(())
        }
    });
    let alive_at_finalizer = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (seen, count) = (Arc::clone(&alive_at_finalizer), Arc::clone(&alive));
    let finalizer = finalizer_fn(move |_report| {
        seen.lock().unwrap().push(count.load(Ordering::SeqCst));
        async { Ok(()) }
    });
    let sup = Supervisor::builder(harvest, finalizer)
        .store(store.clone())
        .config(SupervisorConfig::default().with_session(config()))
        .start()
        .await
        .expect("supervisor starts");
    let id = sup
        .start_session("csw", ["hang-1", "ok-2", "hang-3"])
        .await
        .expect("start");
    let record = finished(&sup, id).await;
    assert!(
        has_event(&sup, id, |k| matches!(
            k,
            EventKind::MonitorEscalated { .. }
        ))
        .await,
        "the root finalized it"
    );
    assert_eq!(record.reason(), Some(FinalizeReason::DeadlineExpired));
    assert_eq!(
        *alive_at_finalizer.lock().unwrap(),
        [0],
        "no harvest alive then"
    );
    store.hang_outcome_writes.store(false, Ordering::SeqCst);
    sup.shutdown().await.expect("shutdown");
}
