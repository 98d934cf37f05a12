//! Opening a database file: every file we must refuse gets a typed error naming it and is
//! left byte-for-byte as it was.

use std::path::Path;
use std::time::Duration;

use harvest_supervisor::StoreError;
use harvest_supervisor::store::{SessionStore, SqliteOptions, SqliteStore};

/// Length and FNV-1a hash of the file: compared whole, printed short.
fn bytes(path: &Path) -> (usize, u64) {
    let data = std::fs::read(path).expect("read the file");
    let hash = data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    });
    (data.len(), hash)
}

/// A session record to store: `resources` on harvester "csw".
fn new_session(
    id: harvest_supervisor::SessionId,
    resources: Vec<harvest_supervisor::ResourceId>,
) -> harvest_supervisor::store::NewSession {
    harvest_supervisor::store::NewSession {
        id,
        harvester_id: "csw".into(),
        resources: resources.into(),
        started: chrono::Utc::now(),
        workflow_time: Duration::from_secs(90),
        config: Default::default(),
        owner: OWNER,
    }
}

/// The node the sessions of these tests are created by (it never registers: nothing here
/// rescues).
const OWNER: harvest_supervisor::NodeId = harvest_supervisor::NodeId(uuid::Uuid::from_u128(1));

/// The fence of a session `OWNER` created.
fn f() -> harvest_supervisor::Fence {
    harvest_supervisor::Fence::new(OWNER)
}

/// Event `seq` of session `id`.
fn event(id: harvest_supervisor::SessionId, seq: u64) -> harvest_supervisor::SessionEvent {
    harvest_supervisor::SessionEvent {
        seq,
        at: chrono::Utc::now(),
        session_id: id,
        harvester_id: "csw".into(),
        kind: harvest_supervisor::EventKind::MonitorCancelled,
    }
}

/// Appends events 1..=n to session `id` (without waiting for their commit).
fn append_events(store: &SqliteStore, id: harvest_supervisor::SessionId, n: u64) {
    for seq in 1..=n {
        store.append_event(f(), event(id, seq)).expect("append");
    }
}

async fn create(path: &Path) {
    let store = SqliteStore::open(path).await.expect("create");
    store.close().await.expect("close");
}

#[tokio::test]
async fn a_file_that_is_not_a_database_is_refused_and_untouched() {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("notes.db");
    std::fs::write(
        &path,
        b"these are my harvesting notes, not a database\n".repeat(200),
    )
    .expect("write");
    let before = bytes(&path);
    match SqliteStore::open(&path).await {
        Err(StoreError::NotADatabase { path: named }) => assert_eq!(named, path),
        Err(other) => panic!("expected NotADatabase, got {other}"),
        Ok(_) => panic!("a text file must not open"),
    }
    assert_eq!(bytes(&path), before);
}

#[tokio::test]
async fn another_applications_sqlite_database_is_refused_and_untouched() {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("other.db");
    {
        let conn = rusqlite::Connection::open(&path).expect("open");
        conn.execute_batch(
            "CREATE TABLE invoices (id INTEGER PRIMARY KEY); INSERT INTO invoices VALUES (1);",
        )
        .expect("other schema");
    }
    let before = bytes(&path);
    assert!(matches!(
        SqliteStore::open(&path).await,
        Err(StoreError::NotADatabase { .. })
    ));
    assert_eq!(bytes(&path), before);
}

#[tokio::test]
async fn a_newer_schema_is_refused_and_untouched() {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("future.db");
    create(&path).await;
    {
        let conn = rusqlite::Connection::open(&path).expect("open");
        conn.pragma_update(None, "user_version", 99).expect("bump");
        conn.pragma_update(None, "journal_mode", "DELETE")
            .expect("no wal");
    }
    let before = bytes(&path);
    match SqliteStore::open(&path).await {
        Err(StoreError::SchemaTooNew {
            found,
            supported,
            path: named,
        }) => {
            assert_eq!((found, supported), (99, 6));
            assert_eq!(named, path);
        }
        Err(other) => panic!("expected SchemaTooNew, got {other}"),
        Ok(_) => panic!("a newer schema must not open"),
    }
    assert_eq!(bytes(&path), before);
}

#[tokio::test]
async fn a_read_only_file_is_refused_and_untouched() {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("ro.db");
    create(&path).await;
    let before = bytes(&path);
    let mut perms = std::fs::metadata(&path).expect("meta").permissions();
    perms.set_readonly(true);
    std::fs::set_permissions(&path, perms).expect("chmod");
    let opened = SqliteStore::open(&path).await;
    assert!(
        matches!(&opened, Err(StoreError::ReadOnly { path: named }) if *named == path),
        "{:?}",
        opened.err()
    );
    assert_eq!(bytes(&path), before);
}

#[tokio::test]
async fn a_database_locked_by_another_connection_is_refused_with_its_path() {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("locked.db");
    create(&path).await;
    let holder = rusqlite::Connection::open(&path).expect("open");
    holder.execute_batch("BEGIN EXCLUSIVE").expect("lock");
    let options = SqliteOptions::default().with_busy_timeout(Duration::from_millis(50));
    let opened = SqliteStore::open_with(&path, options).await;
    let message = opened
        .as_ref()
        .err()
        .map(ToString::to_string)
        .unwrap_or_default();
    assert!(
        matches!(&opened, Err(StoreError::Locked { path: named }) if *named == path),
        "{message}"
    );
    assert!(message.contains("locked.db"), "{message}");
    holder.execute_batch("COMMIT").expect("unlock");
    let store = SqliteStore::open(&path).await.expect("opens once unlocked");
    assert!(store.list_sessions().await.expect("list").is_empty());
}

#[tokio::test]
async fn a_new_file_gets_8_kib_pages() {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("pages.db");
    create(&path).await;
    let page_size: i64 = rusqlite::Connection::open(&path)
        .expect("open")
        .pragma_query_value(None, "page_size", |r| r.get(0))
        .expect("page size");
    assert_eq!(page_size, 8 * 1024);
}

#[tokio::test]
async fn reopening_keeps_what_was_written() {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("keep.db");
    let id = harvest_supervisor::SessionId::new();
    {
        let store = SqliteStore::open(&path).await.expect("open");
        store
            .create_session(new_session(id, vec!["a".into(), "b".into()]))
            .await
            .expect("create");
    }
    let store = SqliteStore::open(&path).await.expect("reopen");
    let record = store.session(id).await.expect("record");
    assert_eq!(record.total, 2);
    assert_eq!(
        store.active_session(&"csw".into()).await.expect("lock"),
        Some(id)
    );
}

#[tokio::test]
async fn a_closed_store_answers_closed_and_keeps_what_it_committed() {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("closed.db");
    let store = SqliteStore::open(&path).await.expect("open");
    let id = harvest_supervisor::SessionId::new();
    store
        .create_session(new_session(id, vec![]))
        .await
        .expect("create");
    store.close().await.expect("close");
    assert!(matches!(store.session(id).await, Err(StoreError::Closed)));
    let reopened = SqliteStore::open(&path).await.expect("reopen");
    assert_eq!(reopened.session(id).await.expect("kept").id, id);
}

#[tokio::test]
async fn close_right_after_event_appends_still_closes_cleanly() {
    // Events alone make the writer wait for company; a close arriving then must be honoured.
    let dir = tempfile::tempdir().expect("dir");
    let store = SqliteStore::open(dir.path().join("events.db"))
        .await
        .expect("open");
    let id = harvest_supervisor::SessionId::new();
    store
        .create_session(new_session(id, vec![]))
        .await
        .expect("create");
    append_events(&store, id, 3);
    store.close().await.expect("close answers");
    let reopened = SqliteStore::open(dir.path().join("events.db"))
        .await
        .expect("reopen");
    assert_eq!(
        reopened.events(id).await.expect("events").len(),
        3,
        "events committed before close"
    );
}

#[tokio::test]
async fn flush_is_a_barrier_for_event_appends() {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("flush.db");
    let store = SqliteStore::open(&path).await.expect("open");
    let id = harvest_supervisor::SessionId::new();
    store
        .create_session(new_session(id, vec![]))
        .await
        .expect("create");
    append_events(&store, id, 50);
    store.flush().await.expect("flush");
    // Another connection sees every event the flush covered: they are committed.
    let other = SqliteStore::open(&path).await.expect("second connection");
    assert_eq!(other.events(id).await.expect("events").len(), 50);
    assert_eq!(other.last_event_seq(id).await.expect("seq"), 50);
}

#[tokio::test]
async fn reading_events_sees_every_append_before_it_across_chunks_and_sessions() {
    let dir = tempfile::tempdir().expect("dir");
    let store = SqliteStore::open(dir.path().join("chunks.db"))
        .await
        .expect("open");
    let (a, b) = (
        harvest_supervisor::SessionId::new(),
        harvest_supervisor::SessionId::new(),
    );
    store
        .create_session(new_session(a, vec![]))
        .await
        .expect("create a");
    store
        .create_session(harvest_supervisor::store::NewSession {
            harvester_id: "oai".into(),
            ..new_session(b, vec![])
        })
        .await
        .expect("create b");
    // No flush: a read queued after the appends must still see them, in order, even when
    // one batch holds more than a chunk's worth of one session interleaved with another's.
    for seq in 1..=700 {
        store.append_event(f(), event(a, seq)).expect("append a");
        if seq % 3 == 0 {
            store
                .append_event(f(), event(b, seq / 3))
                .expect("append b");
        }
    }
    let seqs = |events: Vec<harvest_supervisor::SessionEvent>| {
        events.into_iter().map(|e| e.seq).collect::<Vec<_>>()
    };
    assert_eq!(
        seqs(store.events(a).await.expect("a")),
        (1..=700).collect::<Vec<_>>()
    );
    assert_eq!(
        seqs(store.events(b).await.expect("b")),
        (1..=233).collect::<Vec<_>>()
    );
    assert_eq!(store.last_event_seq(a).await.expect("seq"), 700);
    store.close().await.expect("close");
}

#[tokio::test]
async fn outcomes_sent_before_a_claim_count_and_those_after_it_are_refused() {
    use harvest_supervisor::{FinalizeReason, OutcomeRecord, ResourceOutcome};
    let dir = tempfile::tempdir().expect("dir");
    let store = SqliteStore::open(dir.path().join("claim.db"))
        .await
        .expect("open");
    let id = harvest_supervisor::SessionId::new();
    let resources: Vec<harvest_supervisor::ResourceId> =
        (0..200).map(|i| format!("r{i}").into()).collect();
    store
        .create_session(new_session(id, resources.clone()))
        .await
        .expect("create");
    let record = |r: &harvest_supervisor::ResourceId, i: usize| OutcomeRecord {
        resource_id: r.clone(),
        outcome: if i.is_multiple_of(4) {
            ResourceOutcome::Failed { error: "no".into() }
        } else {
            ResourceOutcome::Succeeded
        },
        attempts: 1,
        elapsed: Duration::from_millis(1),
    };
    // Sent in this order without waiting, so most land in one batch of the writer: the
    // claim in the middle of a run of outcomes.
    let (before, after) = resources.split_at(100);
    let early = futures::future::join_all(
        before
            .iter()
            .enumerate()
            .map(|(i, r)| store.record_outcome(id, f(), record(r, i))),
    );
    let claim = store.claim_finalization(id, f(), FinalizeReason::Completed);
    let late = futures::future::join_all(
        after
            .iter()
            .enumerate()
            .map(|(i, r)| store.record_outcome(id, f(), record(r, i))),
    );
    let (early, claim, late) = tokio::join!(early, claim, late);
    assert!(early.iter().all(Result::is_ok), "{early:?}");
    let claimed = match claim.expect("claim") {
        harvest_supervisor::store::Claim::Claimed(before) => before,
        other => panic!("expected the claim, got {other:?}"),
    };
    assert_eq!(
        claimed.counts.total(),
        100,
        "the claim sees every earlier outcome"
    );
    assert_eq!((claimed.counts.succeeded, claimed.counts.failed), (75, 25));
    assert!(
        late.iter()
            .all(|r| matches!(r, Err(StoreError::Finalizing { .. }))),
        "{late:?}"
    );
    let recorded: Vec<_> = store
        .outcomes(id)
        .await
        .expect("outcomes")
        .into_iter()
        .map(|o| o.resource_id)
        .collect();
    assert_eq!(recorded, before, "all of them, in the order sent");
    assert_eq!(
        store.session(id).await.expect("session").counts.total(),
        100
    );
    store.close().await.expect("close");
}

#[tokio::test]
async fn options_beyond_their_bounds_are_a_typed_error_not_a_panic() {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("h.db");
    for (field, options) in [
        (
            "busy_timeout",
            SqliteOptions::default().with_busy_timeout(Duration::MAX),
        ),
        (
            "busy_timeout",
            SqliteOptions::default().with_busy_timeout(Duration::from_secs(30 * 86_400)),
        ),
        (
            "commit_delay",
            SqliteOptions::default().with_commit_delay(Duration::MAX),
        ),
        (
            "disk_reserve",
            SqliteOptions::default().with_disk_reserve(u64::MAX),
        ),
    ] {
        match SqliteStore::open_with(&path, options).await {
            Err(StoreError::InvalidOptions(e)) => assert_eq!(e.field(), field, "{e}"),
            Err(other) => panic!("expected InvalidOptions, got {other:?}"),
            Ok(_) => panic!("{field} out of bounds must not open"),
        }
    }
    assert!(!path.exists(), "nothing was created");
}

/// The reserve of room is a file beside the database, written whole at open, removed at
/// close; a store without room for it at open still opens (what it holds stays readable)
/// and says its disk is full.
#[tokio::test]
async fn the_disk_reserve_is_a_file_beside_the_database_while_it_is_open() {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("h.db");
    let reserve = dir.path().join("h.db-reserve");
    let store = SqliteStore::open_with(&path, SqliteOptions::default().with_disk_reserve(300_000))
        .await
        .expect("open");
    assert_eq!(std::fs::metadata(&reserve).expect("reserve").len(), 300_000);
    assert!(!store.disk_full());
    store.close().await.expect("close");
    assert!(!reserve.exists(), "removed at close");

    let none = SqliteStore::open_with(&path, SqliteOptions::default().with_disk_reserve(0))
        .await
        .expect("open");
    assert!(!reserve.exists(), "no reserve asked for");
    assert!(!none.disk_full());
    none.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_never_queue_behind_writes() {
    // Another connection holds the write lock: the store's writer waits for it (up to its
    // busy timeout). Reads of records, outcomes and events answer meanwhile.
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("h.db");
    let store = SqliteStore::open_with(
        &path,
        SqliteOptions::default().with_busy_timeout(Duration::from_secs(10)),
    )
    .await
    .expect("open");
    let id = harvest_supervisor::SessionId::new();
    store
        .create_session(new_session(id, vec!["a".into(), "b".into()]))
        .await
        .expect("create");
    append_events(&store, id, 3);
    store.flush().await.expect("flush");

    let blocker = rusqlite::Connection::open(&path).expect("open");
    blocker
        .execute_batch("BEGIN IMMEDIATE")
        .expect("hold the write lock");
    let writer = store.clone();
    let write = tokio::spawn(async move {
        writer
            .transition(
                id,
                f(),
                harvest_supervisor::SessionStatus::Pending,
                harvest_supervisor::SessionStatus::OnGoing,
            )
            .await
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!write.is_finished(), "the write waits for the lock");

    let quick = Duration::from_secs(2);
    let record = tokio::time::timeout(quick, store.session(id))
        .await
        .expect("a read does not wait for the writer")
        .expect("record");
    assert_eq!(record.status, harvest_supervisor::SessionStatus::Pending);
    let page = tokio::time::timeout(quick, store.events_after(id, 1, 10))
        .await
        .expect("nor does an event page")
        .expect("page");
    assert_eq!(page.iter().map(|e| e.seq).collect::<Vec<_>>(), [2, 3]);
    tokio::time::timeout(quick, store.outcomes(id))
        .await
        .expect("nor outcomes")
        .expect("outcomes");
    tokio::time::timeout(quick, store.list_sessions())
        .await
        .expect("nor the history")
        .expect("list");

    blocker.execute_batch("ROLLBACK").expect("release");
    assert!(write.await.expect("task").expect("transition"));
    assert_eq!(
        store.session(id).await.expect("record").status,
        harvest_supervisor::SessionStatus::OnGoing,
        "a read after an acknowledged write sees it"
    );
    store.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_long_gone_are_forgotten_by_the_next_rescue() {
    use harvest_supervisor::store::NodeInfo;
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("nodes.db");
    let store = SqliteStore::open(&path).await.expect("open");
    let node = || NodeInfo {
        id: harvest_supervisor::NodeId::new(),
        name: None,
        process: None,
    };
    let (gone, recent, rescuer) = (node(), node(), node());
    let minute = Duration::from_secs(60);
    for n in [&gone, &recent, &rescuer] {
        store.register_node(n, minute).await.expect("register");
    }
    store.flush().await.expect("flush");
    {
        // Age the leases: `gone`'s ended two days ago, `recent`'s an hour ago.
        let conn = rusqlite::Connection::open(&path).expect("raw");
        conn.busy_timeout(Duration::from_secs(5)).expect("busy");
        for (id, ago_ms) in [(gone.id, 2 * 86_400_000_i64), (recent.id, 3_600_000)] {
            conn.execute(
                "UPDATE nodes SET lease_until_ms = \
                 CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER) - ?2 WHERE id = ?1",
                rusqlite::params![id.to_string(), ago_ms],
            )
            .expect("age");
        }
    }
    store.take_over(rescuer.id, 10).await.expect("rescue");
    let mut ids: Vec<_> = store
        .nodes()
        .await
        .expect("nodes")
        .into_iter()
        .map(|n| n.info.id)
        .collect();
    ids.sort();
    let mut want = vec![recent.id, rescuer.id];
    want.sort();
    assert_eq!(ids, want, "only the node gone for over a day is forgotten");
    store.close().await.expect("close");
}

/// A writer behind by a whole queue (another connection holds the write lock) makes the
/// sender of one more write wait for room; on a multi-thread runtime that wait must not
/// hold one of the runtime's workers (with one worker, every timer of the process,
/// deadlines included, stopped until the disk caught up).
#[test]
fn a_full_write_queue_does_not_stop_the_runtime() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("h.db");
    let store = runtime
        .block_on(SqliteStore::open_with(
            &path,
            SqliteOptions::default().with_busy_timeout(Duration::from_secs(60)),
        ))
        .expect("open");
    let id = harvest_supervisor::SessionId::new();
    let blocker = rusqlite::Connection::open(&path).expect("open");
    blocker
        .execute_batch("BEGIN IMMEDIATE")
        .expect("hold the write lock");
    // More events than the writer's queue holds (16,384, and a batch of 4,096 taken).
    let appender = {
        let store = store.clone();
        runtime.spawn(async move { append_events(&store, id, 30_000) })
    };
    let ticks = Arc::new(AtomicUsize::new(0));
    let (fifty, heard) = std::sync::mpsc::sync_channel(1);
    let ticker = {
        let ticks = Arc::clone(&ticks);
        runtime.spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(10)).await;
                if ticks.fetch_add(1, Ordering::Relaxed) + 1 == 50 {
                    let _ = fifty.try_send(());
                }
            }
        })
    };
    // Heard on this thread, outside the runtime (whose clock is what is under test): the
    // runtime's timers must fire while the appender waits for room. 20 s is a guard.
    let _ = heard.recv_timeout(Duration::from_secs(20));
    let fired = ticks.load(Ordering::Relaxed);
    let waiting = !appender.is_finished();
    // Release the lock before asserting: a failure must not leave the runtime stuck.
    blocker.execute_batch("ROLLBACK").expect("release");
    assert!(
        fired >= 50,
        "the runtime's timers stopped: {fired} ticks in 20 s"
    );
    assert!(waiting, "the appender waited for room");
    runtime.block_on(async {
        appender.await.expect("appended");
        ticker.abort();
        store.flush().await.expect("flush");
        store.close().await.expect("close");
    });
}
