//! A full disk, for real: the durable store on a 14 MiB tmpfs, a 30,000-resource session that
//! fills it. The session must not be finalized from what the full disk kept (it would report
//! most successes as lost): it keeps the truth in memory, and completes (in the store's
//! reserve of room, or within one retry interval once a little space returns: completion
//! needs O(1) new space). If space never returns, shutdown still returns in bounded time
//! and the next start recovers the session. A disk filled by the store's own bulk never
//! fences its node (the reserve keeps its renewals going); a disk that something else keeps
//! full does, until space returns.
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
use harvest_supervisor::store::{SessionStore, SqliteOptions};
use harvest_supervisor::{
    EventKind, FinalizeReason, ResourceHarvester, SessionConfig, SessionId, SessionStatus,
    SqliteStore, StartError, Supervisor, SupervisorConfig, harvest_fn,
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

    /// The disk grows to `size` (room returns), its files kept.
    fn grow(&self, size: &str) {
        let grown = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(self.dir.path())
            .status();
        assert!(matches!(grown, Ok(s) if s.success()), "remount: {grown:?}");
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
    supervisor_of(db, harvest_fn(|_| async { Ok(()) }), rec, config).await
}

/// The disk: room for the store's reserve (8 MiB by default) and a few MiB more, which
/// the session below more than fills.
const DISK: &str = "14m";

/// A supervisor of `harvester` on a store at `db` (with the default reserve of room).
async fn supervisor_of(
    db: &Path,
    harvester: impl ResourceHarvester,
    rec: &Recorder,
    config: SupervisorConfig,
) -> (Supervisor, SqliteStore) {
    let store = SqliteStore::open_with(db, SqliteOptions::default())
        .await
        .expect("open on the tmpfs");
    let sup = Supervisor::builder(harvester, rec.clone())
        .store(Arc::new(store.clone()))
        .config(
            config
                .with_session(SessionConfig::default().with_max_concurrency(64))
                .with_store_retry_max(Duration::from_millis(200))
                .with_shutdown_timeout(Duration::from_secs(2)),
        )
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
    let Some(disk) = Tmpfs::mount(DISK) else {
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
        let active = sup.active_session("csw").await.expect("read");
        assert_eq!(active.map(|r| r.id), Some(id));
        // Refused: the harvester is busy (and on a full disk no session starts anyway).
        match sup.start_session("csw", ["again"]).await {
            Err(StartError::HarvesterBusy { session, .. }) => assert_eq!(session, id),
            Err(StartError::Store(harvest_supervisor::StoreError::DiskFull { .. })) => {}
            other => panic!("{other:?}"),
        }
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
    assert!(sup.active_session("csw").await.expect("read").is_none());
    // The harvester is free; a session starts once the store has room for its reserve
    // again (a quarter of a megabyte is not that much), and is refused, saying why, until.
    match sup.start_session("csw", ["again"]).await {
        Ok(_) | Err(StartError::Store(harvest_supervisor::StoreError::DiskFull { .. })) => {}
        Err(e) => panic!("{e}"),
    }
    sup.shutdown().await.expect("shutdown");
    let _ = store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_that_stays_full_does_not_hold_up_shutdown_and_the_next_start_recovers() {
    let Some(disk) = Tmpfs::mount(DISK) else {
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

/// The lease settings of the tests below: a node whose renewals fail for 2 s fences.
fn short_lease() -> SupervisorConfig {
    SupervisorConfig::default()
        .with_lease_renew_interval(Duration::from_millis(250))
        .with_lease_ttl(Duration::from_secs(2))
}

/// Starts a session once the store has room for its reserve again (it tries every
/// second); until then a start is refused, and says why.
async fn start_once_there_is_room(sup: &Supervisor) -> SessionId {
    tokio::time::timeout(GUARD, async {
        loop {
            match sup.start_session("other", ["x"]).await {
                Ok(id) => return id,
                Err(StartError::Store(harvest_supervisor::StoreError::DiskFull { .. })) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("{e}"),
            }
        }
    })
    .await
    .expect("starts once there is room")
}

/// Polls the node's health until `wanted` says yes.
async fn health_until(
    sup: &Supervisor,
    what: &str,
    wanted: impl Fn(&harvest_supervisor::Health) -> bool,
) -> harvest_supervisor::Health {
    tokio::time::timeout(GUARD, async {
        loop {
            let health = sup.health(Duration::from_secs(2));
            if wanted(&health) {
                return health;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{what}: {:?}", sup.health(Duration::from_secs(2))))
}

/// The store's own bulk fills the disk and it stays full, for longer than the lease: the
/// node keeps renewing in the room the store kept (it found, before this test existed,
/// its renewals failing with the bulk, fenced, and stayed fenced even after the disk grew:
/// the bulk queued meanwhile took the new room first), and the session completes with
/// the truth while the disk is still full.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_its_own_bulk_filled_never_fences_the_node() {
    let Some(disk) = Tmpfs::mount(DISK) else {
        return;
    };
    let rec = Recorder::new(FinalizerMode::Ok);
    let (sup, store) = supervisor_with(&disk.path().join("harvests.db"), &rec, short_lease()).await;
    let saw_disk_full = std::sync::atomic::AtomicBool::new(false);
    let never_fenced = async {
        loop {
            let health = sup.health(Duration::from_secs(2));
            assert!(!health.fenced, "fenced by its own bulk: {health:?}");
            if health.disk_full {
                saw_disk_full.store(true, std::sync::atomic::Ordering::Relaxed);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let run = async {
        let (id, _) = fill_the_disk(&sup).await;
        let record = tokio::time::timeout(GUARD, sup.wait_finished(id))
            .await
            .expect("completed on the full disk")
            .expect("record");
        assert_eq!(record.status, SessionStatus::FinishedAllOk);
        assert_eq!(record.counts.succeeded, RESOURCES);
        assert_eq!(rec.calls(), 1);
        // Longer than the lease since the disk filled: never fenced.
        tokio::time::sleep(Duration::from_secs(3)).await;
    };
    tokio::select! {
        () = never_fenced => unreachable!(),
        () = run => {}
    }
    assert!(
        saw_disk_full.load(std::sync::atomic::Ordering::Relaxed),
        "health said the disk was full"
    );
    // Completed without the outcomes the store missed (they did not fit); once the disk
    // has room, they are written and the stored list agrees with the counts (it derived
    // them as `lost` until then).
    disk.grow("64m");
    let id = sup
        .history(&harvest_supervisor::SessionQuery::default())
        .await
        .expect("history")
        .sessions[0]
        .id;
    let agreed = async {
        loop {
            let outcomes = sup.outcomes(id).await.expect("outcomes");
            let succeeded = outcomes.iter().filter(|o| o.outcome.is_success()).count();
            if succeeded == RESOURCES {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    tokio::time::timeout(GUARD, agreed)
        .await
        .expect("the stored outcomes agree with the counts once there is room");
    let again = start_once_there_is_room(&sup).await;
    sup.wait_finished(again).await.expect("finished");
    sup.shutdown().await.expect("shutdown");
    let _ = store.close().await;
}

/// Something else (a runaway log) keeps the disk full for longer than the lease, taking
/// even the room the store gave up: the node's renewals fail and it fences (health says
/// so, starts are refused, the running session waits). Once space returns, the next
/// renewal lifts the fence and the session completes with the truth.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_something_else_keeps_full_fences_the_node_until_space_returns() {
    let Some(disk) = Tmpfs::mount(DISK) else {
        return;
    };
    const COUNT: usize = 200;
    // The session's attempts wait for the gate: it runs while the disk fills.
    let (gate, opened) = tokio::sync::watch::channel(false);
    let harvester = harvest_fn(move |_| {
        let mut opened = opened.clone();
        async move {
            let _ = opened.wait_for(|open| *open).await;
            Ok(())
        }
    });
    let rec = Recorder::new(FinalizerMode::Ok);
    let (sup, store) = supervisor_of(
        &disk.path().join("harvests.db"),
        harvester,
        &rec,
        short_lease(),
    )
    .await;
    let resources: Vec<String> = (0..COUNT).map(|i| format!("r{i}")).collect();
    let id = sup.start_session("csw", resources).await.expect("start");

    // The hog: appends whenever there is room (looking every 2 ms), until told to stop.
    // (Real time, as in every test here: a real disk, the store's own thread, a lease.)
    let hog_path = disk.path().join("runaway.log");
    let stop = tokio_util::sync::CancellationToken::new();
    let hog = {
        let stop = stop.clone();
        let mut file = std::fs::File::create(&hog_path).expect("hog file");
        tokio::spawn(async move {
            use std::io::Write;
            let block = vec![0x5a_u8; 16 * 1024];
            while !stop.is_cancelled() {
                // Small writes to a tmpfs: they do not hold the worker.
                while file.write_all(&block).is_ok() {}
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(2)) => {}
                    () = stop.cancelled() => {}
                }
            }
        })
    };
    let fenced = health_until(&sup, "the node fences while the disk stays full", |h| {
        h.fenced
    })
    .await;
    assert!(!fenced.store_ok() && !fenced.is_healthy(), "{fenced:?}");
    assert!(fenced.lease_failures > 0, "{fenced:?}");
    assert!(fenced.disk_full, "{fenced:?}");
    assert!(matches!(
        sup.start_session("other", ["x"]).await,
        Err(StartError::Store(
            harvest_supervisor::StoreError::LeaseExpired { .. }
        ))
    ));
    let record = sup.session(id).await.expect("record");
    assert!(!record.status.is_terminal(), "{record:?}");

    // Space returns: the hog stops and its file goes.
    stop.cancel();
    hog.await.expect("hog");
    std::fs::remove_file(&hog_path).expect("free the disk");
    gate.send_replace(true);
    let record = tokio::time::timeout(GUARD, sup.wait_finished(id))
        .await
        .expect("completed once space returned")
        .expect("record");
    assert_eq!(
        record.status,
        SessionStatus::FinishedAllOk,
        "{record:?} {:?}",
        rec.reports_for(id).first().map(|r| &r.outcomes[..3])
    );
    assert_eq!(record.counts.succeeded, COUNT);
    assert_eq!(rec.calls(), 1);
    let healthy = health_until(&sup, "healthy once renewals pass again", |h| h.is_healthy()).await;
    assert!(!healthy.fenced);
    let again = start_once_there_is_room(&sup).await;
    assert!(!sup.health(Duration::from_secs(2)).disk_full);
    sup.wait_finished(again).await.expect("finished");
    // Events are written again: the new session's log is whole.
    store.flush().await.expect("flush once there is room");
    let events = sup.events(again).await.expect("events");
    assert!(
        events
            .iter()
            .any(|e| matches!(e.kind, EventKind::SessionFinished { .. })),
        "{events:?}"
    );
    sup.shutdown().await.expect("shutdown");
    let _ = store.close().await;
}
