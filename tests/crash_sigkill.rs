//! Crash safety with a real process kill: a child process harvests on a database file, the
//! test SIGKILLs it (early, mid-session, between its claim and its finalizer, during its
//! finalizer, during a recovery's re-run of it), starts a supervisor on the same file, and
//! checks that nothing acknowledged was lost, that the session ends once, and that the
//! finalizer ran as the crash semantics say: once if it never started, again (told so) if
//! a crash interrupted it, or not again under `FinalizerRecovery::Skip`.
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
    BoxError, FinalizeReason, FinalizerRecovery, HarvestContext, RecoveryPolicy, ResourceOutcome,
    SessionConfig, SessionId, SessionReport, SessionStatus, SessionStore, SqliteStore, Supervisor,
    SupervisorConfig, finalizer_fn, harvest_fn,
};
use tokio::io::{AsyncBufReadExt, BufReader};

const CHILD_DB: &str = "HARVEST_CRASH_CHILD_DB";
/// What the child does: `harvest` (run a session), `claim-window` (run a session and stop
/// for ever right after claiming its finalization), or `recover` (start a supervisor on
/// the file, which recovers what the last child left, with a finalizer that takes a
/// minute).
const CHILD_MODE: &str = "HARVEST_CRASH_CHILD_MODE";
const RESOURCES: usize = 20;
/// A bound on how long the child may take to reach a kill point: a failure guard, not a
/// deadline under test.
const GUARD: Duration = Duration::from_secs(60);

/// Appends one line to the finalizer log next to the database, durably: who ran the
/// finalizer, and which run the report said it was.
fn log_finalizer_run(db: &Path, who: &str, report: &SessionReport) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(db.with_extension("finalized"))?;
    writeln!(f, "{who} {}", report.finalizer_attempt)?;
    f.sync_all()
}

/// The finalizer log: one `who attempt` line per run.
fn finalizer_runs(db: &Path) -> Vec<String> {
    std::fs::read_to_string(db.with_extension("finalized"))
        .map(|s| s.lines().map(str::to_owned).collect())
        .unwrap_or_default()
}

/// A finalizer that logs its run, says `FINALIZING`, and takes a minute.
fn slow_finalizer(db: &Path, who: &'static str) -> impl harvest_supervisor::SessionFinalizer {
    let db = db.to_path_buf();
    finalizer_fn(move |report: SessionReport| {
        let db = db.clone();
        async move {
            log_finalizer_run(&db, who, &report)?;
            say("FINALIZING".into());
            tokio::time::sleep(Duration::from_secs(60)).await;
            Ok(())
        }
    })
}

fn say(line: String) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// The child: a session of slow resources on the database named by `CHILD_DB`. It prints
/// `SESSION id`, then `ACK resource outcome` after each outcome the store acknowledged,
/// `CLAIMED` when it claimed the finalization, and `FINALIZING` when its finalizer starts
/// (which then takes a minute). In `recover` mode it only starts a supervisor on the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn child_process() {
    let Ok(db) = std::env::var(CHILD_DB) else {
        return;
    };
    let db = PathBuf::from(db);
    let mode = std::env::var(CHILD_MODE).unwrap_or_default();
    let sqlite = SqliteStore::open(&db).await.expect("child opens the db");
    if mode == "recover" {
        let _sup = Supervisor::builder(
            harvest_fn(|_| async { Ok(()) }),
            slow_finalizer(&db, "recovery-child"),
        )
        .store(Arc::new(sqlite))
        .start()
        .await
        .expect("child supervisor");
        tokio::time::sleep(Duration::from_secs(600)).await;
        return;
    }
    let mut store = FaultyStore::wrapping(Arc::new(sqlite));
    // Outcomes go the way the durable store takes them: queued, answered by receipt.
    store.queued_outcomes.store(true, Ordering::SeqCst);
    store.on_outcome_ack = Some(Arc::new(|o| {
        say(format!("ACK {} {}", o.resource_id, o.outcome.name()));
    }));
    store.on_claim = Some(Arc::new(|| say("CLAIMED".into())));
    store
        .hang_after_claim
        .store(mode == "claim-window", Ordering::SeqCst);
    let harvest = harvest_fn(|ctx: HarvestContext| async move {
        tokio::time::sleep(Duration::from_millis(40)).await;
        let n: usize = ctx.resource_id.trim_start_matches('r').parse().unwrap_or(0);
        if n % 5 == 4 {
            return Err::<(), BoxError>("remote said 500".into());
        }
        Ok(())
    });
    let sup = Supervisor::builder(harvest, slow_finalizer(&db, "child"))
        .store(Arc::new(store))
        .config(
            SupervisorConfig::default()
                .with_session(SessionConfig::default().with_max_concurrency(2)),
        )
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
#[derive(Clone, Copy, Debug, PartialEq)]
enum KillPoint {
    AfterAcks(usize),
    /// Between its claim of the finalization and its finalizer's start.
    Claimed,
    DuringFinalizer,
    /// During its finalizer, and then a second child (a recovering supervisor) during its
    /// re-run of it.
    DuringRecovery,
}

/// Runs the child until `point`, SIGKILLs it, and returns the session id and the acks.
async fn run_child_until(db: &Path, point: KillPoint) -> (SessionId, Vec<(String, String)>) {
    let mode = if point == KillPoint::Claimed {
        "claim-window"
    } else {
        "harvest"
    };
    let (session, acks) = run_child(db, mode, point).await;
    (session.expect("the child named its session"), acks)
}

/// Runs a child in `mode` until `point`, SIGKILLs it, and returns the session id it named
/// (if any) and the acks.
async fn run_child(
    db: &Path,
    mode: &str,
    point: KillPoint,
) -> (Option<SessionId>, Vec<(String, String)>) {
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
        .env(CHILD_MODE, mode)
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
                Some("CLAIMED") => at_point |= point == KillPoint::Claimed,
                Some("FINALIZING") => {
                    at_point |= matches!(
                        point,
                        KillPoint::DuringFinalizer | KillPoint::DuringRecovery
                    );
                }
                _ => {}
            }
            if at_point && (session.is_some() || mode == "recover") {
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
    let id = session.map(|id| SessionId(uuid::Uuid::parse_str(&id).expect("session id")));
    (id, acks)
}

async fn crash_and_recover(point: KillPoint) {
    crash_and_recover_with(point, RecoveryPolicy::Finalize, FinalizerRecovery::Rerun).await;
}

async fn crash_and_recover_with(
    point: KillPoint,
    recovery: RecoveryPolicy,
    finalizer_recovery: FinalizerRecovery,
) {
    if std::env::var(CHILD_DB).is_ok() {
        return; // inside a child: only `child_process` runs
    }
    let dir = tempfile::tempdir().expect("dir");
    let db = dir.path().join("harvest.db");
    let (id, acks) = run_child_until(&db, point).await;
    if point == KillPoint::DuringRecovery {
        // A second process recovers the session and re-runs its finalizer; it dies too.
        run_child(&db, "recover", point).await;
    }

    // A new "process": a supervisor on the same file recovers the session.
    let store = Arc::new(SqliteStore::open(&db).await.expect("reopen after the kill"));
    let recovered_db = db.clone();
    let sup = Supervisor::builder(
        harvest_fn(|_| async { Ok(()) }),
        finalizer_fn(move |report: SessionReport| {
            let db = recovered_db.clone();
            async move {
                log_finalizer_run(&db, "recovery", &report)?;
                Ok(())
            }
        }),
    )
    .store(store.clone())
    .config(
        SupervisorConfig::default()
            .with_recovery(recovery)
            .with_finalizer_recovery(finalizer_recovery),
    )
    .start()
    .await
    .expect("supervisor on the same file");
    let record = tokio::time::timeout(GUARD, sup.wait_finished(id))
        .await
        .expect("recovered in time")
        .expect("record");

    // The finalizer ran as the crash semantics say, across every process; the session was
    // completed once.
    assert!(record.status.is_terminal());
    let runs = finalizer_runs(&db);
    let expected: &[&str] = match (point, finalizer_recovery) {
        // It never started: recovery runs it, for the first time.
        (KillPoint::AfterAcks(_) | KillPoint::Claimed, _) => &["recovery 1"],
        // A crash interrupted it: re-run and told so, or not run again.
        (KillPoint::DuringFinalizer, FinalizerRecovery::Rerun) => &["child 1", "recovery 2"],
        (KillPoint::DuringFinalizer, FinalizerRecovery::Skip) => &["child 1"],
        (KillPoint::DuringRecovery, _) => &["child 1", "recovery-child 2", "recovery 3"],
    };
    assert_eq!(runs, expected, "{point:?}");
    assert_eq!(record.finalizer_attempts as usize, runs.len());
    match (point, recovery) {
        (KillPoint::AfterAcks(_), RecoveryPolicy::Resume) => {
            // Re-harvested on a healthy remote: the session ends as if never interrupted.
            assert_eq!(record.reason(), Some(FinalizeReason::Completed));
            assert_eq!(record.status, SessionStatus::FinishedAllOk);
        }
        (KillPoint::AfterAcks(_), RecoveryPolicy::Finalize) => {
            assert_eq!(record.reason(), Some(FinalizeReason::Interrupted));
        }
        // The child claimed it with its own reason: recovery finishes under that reason.
        (KillPoint::Claimed | KillPoint::DuringFinalizer | KillPoint::DuringRecovery, _) => {
            assert_eq!(record.reason(), Some(FinalizeReason::Completed));
            if finalizer_recovery == FinalizerRecovery::Skip {
                let error = record
                    .finalizer_error
                    .clone()
                    .expect("interrupted finalizer noted");
                assert!(error.contains("interrupted"), "{error}");
            } else {
                assert_eq!(record.finalizer_error, None, "the last run succeeded");
            }
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
    crash_and_recover_with(
        KillPoint::AfterAcks(RESOURCES / 2),
        RecoveryPolicy::Resume,
        FinalizerRecovery::Rerun,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_between_the_claim_and_the_finalizer_the_finalizer_still_runs_once() {
    crash_and_recover(KillPoint::Claimed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_during_finalization_the_finalizer_is_run_again_and_told_so() {
    crash_and_recover(KillPoint::DuringFinalizer).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_during_finalization_under_skip_the_interruption_is_recorded_not_rerun() {
    crash_and_recover_with(
        KillPoint::DuringFinalizer,
        RecoveryPolicy::Finalize,
        FinalizerRecovery::Skip,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_again_during_recovery_the_third_process_runs_the_third_attempt() {
    crash_and_recover(KillPoint::DuringRecovery).await;
}
