//! Crash safety with a real process kill: a child process harvests on a database file, the
//! test SIGKILLs it (early, mid-session, during its finalizer), starts a supervisor on the
//! same file, and checks that nothing acknowledged was lost and that the session ends once.
//!
//! The child is this same test binary, run again with `CHILD_DB` set on the test
//! `child_process`, which does nothing in a normal run.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::faulty::FaultyStore;
use harvest_supervisor::{
    BoxError, FinalizeReason, HarvestContext, RecoveryPolicy, ResourceOutcome, SessionConfig,
    SessionId, SessionReport, SessionStatus, SessionStore, SqliteStore, Supervisor,
    SupervisorConfig, finalizer_fn, harvest_fn,
};
use tokio::io::{AsyncBufReadExt, BufReader};

const CHILD_DB: &str = "HARVEST_CRASH_CHILD_DB";
const RESOURCES: usize = 20;
/// A bound on how long the child may take to reach a kill point: a failure guard, not a
/// deadline under test.
const GUARD: Duration = Duration::from_secs(60);

/// Appends one line to the finalizer log next to the database, durably.
fn log_finalizer_run(db: &Path, who: &str) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(db.with_extension("finalized"))?;
    writeln!(f, "{who}")?;
    f.sync_all()
}

fn finalizer_runs(db: &Path) -> usize {
    std::fs::read_to_string(db.with_extension("finalized"))
        .map(|s| s.lines().count())
        .unwrap_or(0)
}

fn say(line: String) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// The child: a session of slow resources on the database named by `CHILD_DB`. It prints
/// `SESSION id`, then `ACK resource outcome` after each outcome the store acknowledged, and
/// `FINALIZING` when its finalizer starts (which then takes a minute).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn child_process() {
    let Ok(db) = std::env::var(CHILD_DB) else {
        return;
    };
    let db = PathBuf::from(db);
    let sqlite = SqliteStore::open(&db).await.expect("child opens the db");
    let mut store = FaultyStore::wrapping(Arc::new(sqlite));
    // Outcomes go the way the durable store takes them: queued, answered by receipt.
    store.queued_outcomes.store(true, Ordering::SeqCst);
    store.on_outcome_ack = Some(Arc::new(|o| {
        say(format!("ACK {} {}", o.resource_id, o.outcome.name()));
    }));
    let harvest = harvest_fn(|ctx: HarvestContext| async move {
        tokio::time::sleep(Duration::from_millis(40)).await;
        let n: usize = ctx.resource_id.trim_start_matches('r').parse().unwrap_or(0);
        if n % 5 == 4 {
            return Err::<(), BoxError>("remote said 500".into());
        }
        Ok(())
    });
    let finalizer_db = db.clone();
    let finalizer = finalizer_fn(move |_report: SessionReport| {
        let db = finalizer_db.clone();
        async move {
            log_finalizer_run(&db, "child")?;
            say("FINALIZING".into());
            tokio::time::sleep(Duration::from_secs(60)).await;
            Ok(())
        }
    });
    let sup = Supervisor::builder(harvest, finalizer)
        .store(Arc::new(store))
        .config(SupervisorConfig {
            session: SessionConfig {
                max_concurrency: 2,
                ..SessionConfig::default()
            },
            ..SupervisorConfig::default()
        })
        .start()
        .await
        .expect("child supervisor");
    let resources: Vec<String> = (0..RESOURCES).map(|i| format!("r{i}")).collect();
    let id = sup.start_session("csw", resources).await.expect("start");
    say(format!("SESSION {id}"));
    // Wait to be killed.
    tokio::time::sleep(Duration::from_secs(600)).await;
}

/// Where the parent kills the child.
#[derive(Clone, Copy, Debug)]
enum KillPoint {
    AfterAcks(usize),
    DuringFinalizer,
}

/// Runs the child until `point`, SIGKILLs it, and returns the session id and the acks.
async fn run_child_until(db: &Path, point: KillPoint) -> (SessionId, Vec<(String, String)>) {
    let exe = std::env::current_exe().expect("test binary");
    let mut child = tokio::process::Command::new(exe)
        .args([
            "--exact",
            "child_process",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env(CHILD_DB, db)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn the child");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut session = None;
    let mut acks = Vec::new();
    // The child may acknowledge outcomes before it prints its session id: read until both
    // the kill point and the id are there.
    let reached = tokio::time::timeout(GUARD, async {
        let mut at_point = false;
        while let Some(line) = lines.next_line().await.expect("read child") {
            // libtest prints `test child_process ... ` before the child's first line.
            let line = line.rsplit("... ").next().unwrap_or_default();
            let mut words = line.split_whitespace();
            match words.next() {
                Some("SESSION") => session = words.next().map(str::to_owned),
                Some("ACK") => {
                    let r = words.next().unwrap_or_default().to_owned();
                    let o = words.next().unwrap_or_default().to_owned();
                    acks.push((r, o));
                    at_point |= matches!(point, KillPoint::AfterAcks(n) if acks.len() >= n);
                }
                Some("FINALIZING") => at_point |= matches!(point, KillPoint::DuringFinalizer),
                _ => {}
            }
            if at_point && session.is_some() {
                return;
            }
        }
        panic!("the child ended before the kill point {point:?}");
    })
    .await;
    reached.unwrap_or_else(|_| panic!("the child never reached {point:?}"));
    child.start_kill().expect("SIGKILL");
    let status = child.wait().await.expect("reap");
    assert!(!status.success(), "the child was killed, it did not exit");
    let id = session.expect("the child named its session");
    let id = SessionId(uuid::Uuid::parse_str(&id).expect("session id"));
    (id, acks)
}

async fn crash_and_recover(point: KillPoint) {
    crash_and_recover_with(point, RecoveryPolicy::Finalize).await;
}

async fn crash_and_recover_with(point: KillPoint, recovery: RecoveryPolicy) {
    if std::env::var(CHILD_DB).is_ok() {
        return; // inside a child: only `child_process` runs
    }
    let dir = tempfile::tempdir().expect("dir");
    let db = dir.path().join("harvest.db");
    let (id, acks) = run_child_until(&db, point).await;

    // A new "process": a supervisor on the same file recovers the session.
    let store = Arc::new(SqliteStore::open(&db).await.expect("reopen after the kill"));
    let recovered_db = db.clone();
    let sup = Supervisor::builder(
        harvest_fn(|_| async { Ok(()) }),
        finalizer_fn(move |_report: SessionReport| {
            let db = recovered_db.clone();
            async move {
                log_finalizer_run(&db, "recovery")?;
                Ok(())
            }
        }),
    )
    .store(store.clone())
    .config(SupervisorConfig {
        recovery,
        ..SupervisorConfig::default()
    })
    .start()
    .await
    .expect("supervisor on the same file");
    let record = tokio::time::timeout(GUARD, sup.wait_finished(id))
        .await
        .expect("recovered in time")
        .expect("record");

    // Finalized exactly once across both processes.
    assert!(record.status.is_terminal());
    assert_eq!(finalizer_runs(&db), 1, "{point:?}");
    match (point, recovery) {
        (KillPoint::AfterAcks(_), RecoveryPolicy::Resume) => {
            // Re-harvested on a healthy remote: the session ends as if never interrupted.
            assert_eq!(record.reason(), Some(FinalizeReason::Completed));
            assert_eq!(record.status, SessionStatus::FinishedAllOk);
        }
        (KillPoint::DuringFinalizer, _) => {
            // The child claimed and started it: recovery completes it without a rerun.
            assert_eq!(record.reason(), Some(FinalizeReason::Completed));
            let error = record
                .finalizer_error
                .clone()
                .expect("interrupted finalizer noted");
            assert!(error.contains("did not complete"), "{error}");
        }
        (KillPoint::AfterAcks(_), RecoveryPolicy::Finalize) => {
            assert_eq!(record.reason(), Some(FinalizeReason::Interrupted));
        }
    }

    // Every acknowledged outcome is there, as acknowledged (a resumed session harvests its
    // failures again, so only its successes must survive as they were).
    let outcomes = store.outcomes(id).await.expect("outcomes");
    let resumed = recovery == RecoveryPolicy::Resume && matches!(point, KillPoint::AfterAcks(_));
    for (resource, outcome) in acks.iter().filter(|(_, o)| !resumed || o == "succeeded") {
        let stored = outcomes
            .iter()
            .find(|o| o.resource_id.as_str() == resource)
            .unwrap_or_else(|| panic!("acknowledged outcome of {resource} lost"));
        assert_eq!(stored.outcome.name(), outcome);
    }
    // Totals reconcile; the unfinished are lost, never successes.
    let c = record.counts;
    assert_eq!(c.total(), RESOURCES);
    assert_eq!(outcomes.len(), RESOURCES);
    let acked_ok = acks.iter().filter(|(_, o)| o == "succeeded").count();
    assert!(c.succeeded >= acked_ok);
    if matches!(point, KillPoint::AfterAcks(_)) && !resumed {
        assert_eq!(
            c.lost,
            outcomes
                .iter()
                .filter(|o| o.outcome == ResourceOutcome::Lost)
                .count()
        );
        assert!(c.lost > 0, "the child was killed with work left");
        assert_ne!(record.status, SessionStatus::FinishedAllOk);
    }

    // The harvester can start a new session.
    let next = sup
        .start_session("csw", ["again"])
        .await
        .expect("harvester is free");
    let next = tokio::time::timeout(GUARD, sup.wait_finished(next))
        .await
        .expect("next session in time")
        .expect("record");
    assert_eq!(next.status, SessionStatus::FinishedAllOk);
    sup.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_early_loses_nothing_acknowledged() {
    crash_and_recover(KillPoint::AfterAcks(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_mid_session_loses_nothing_acknowledged() {
    crash_and_recover(KillPoint::AfterAcks(RESOURCES / 2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_mid_session_and_resumed_harvests_the_rest_under_the_same_session() {
    crash_and_recover_with(KillPoint::AfterAcks(RESOURCES / 2), RecoveryPolicy::Resume).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_during_finalization_is_completed_without_a_second_run() {
    crash_and_recover(KillPoint::DuringFinalizer).await;
}
