//! Files written by earlier versions of the durable store open, migrate in place, and keep
//! every session, resource, outcome (in recorded order), event and harvester lock.
//!
//! The old schemas are frozen here as those versions wrote them: the migrations must keep
//! reading them however the current schema changes.

use std::path::Path;
use std::time::Duration;

use chrono::{DateTime, Utc};
use harvest_supervisor::store::{SessionStore, SqliteStore};
use harvest_supervisor::{
    EventKind, OutcomeRecord, ResourceId, ResourceOutcome, SessionEvent, SessionId, SessionStatus,
};
use rusqlite::{Connection, params};

/// What version 1 created.
const V1: &str = "CREATE TABLE sessions (
        id               TEXT PRIMARY KEY,
        harvester_id     TEXT NOT NULL,
        status           TEXT NOT NULL,
        total            INTEGER NOT NULL,
        started          TEXT NOT NULL,
        ended            TEXT,
        workflow_time_ns INTEGER NOT NULL,
        finalizing       TEXT,
        succeeded        INTEGER NOT NULL DEFAULT 0,
        failed           INTEGER NOT NULL DEFAULT 0,
        panicked         INTEGER NOT NULL DEFAULT 0,
        timed_out        INTEGER NOT NULL DEFAULT 0,
        cancelled        INTEGER NOT NULL DEFAULT 0,
        lost             INTEGER NOT NULL DEFAULT 0,
        finalizer_error  TEXT
    );
    CREATE INDEX sessions_by_harvester ON sessions (harvester_id, id);
    CREATE INDEX sessions_by_status ON sessions (status, id);
    CREATE TABLE resources (
        session_id  TEXT NOT NULL,
        position    INTEGER NOT NULL,
        resource_id TEXT NOT NULL,
        PRIMARY KEY (session_id, position)
    ) WITHOUT ROWID;
    CREATE TABLE outcomes (
        session_id  TEXT NOT NULL,
        resource_id TEXT NOT NULL,
        outcome     TEXT NOT NULL,
        detail      TEXT,
        attempts    INTEGER NOT NULL,
        elapsed_ns  INTEGER NOT NULL,
        UNIQUE (session_id, resource_id)
    );
    CREATE TABLE events (
        session_id TEXT NOT NULL,
        seq        INTEGER NOT NULL,
        body       TEXT NOT NULL,
        PRIMARY KEY (session_id, seq)
    ) WITHOUT ROWID;
    CREATE TABLE harvester_locks (
        harvester_id TEXT PRIMARY KEY,
        session_id   TEXT NOT NULL UNIQUE
    );
    PRAGMA application_id = 1213355603;
    PRAGMA user_version = 1;";

/// What versions 2 and 3 changed: each session's config, events in chunks.
const V1_TO_V3: &str = "ALTER TABLE sessions ADD COLUMN config TEXT;
    CREATE TABLE event_chunks (
        session_id TEXT NOT NULL,
        first_seq  INTEGER NOT NULL,
        last_seq   INTEGER NOT NULL,
        body       TEXT NOT NULL,
        PRIMARY KEY (session_id, first_seq)
    ) WITHOUT ROWID;
    DROP TABLE events;
    PRAGMA user_version = 3;";

fn old_file(path: &Path, version: i64) -> Connection {
    let conn = Connection::open(path).expect("open");
    conn.execute_batch(V1).expect("v1 schema");
    if version == 3 {
        conn.execute_batch(V1_TO_V3).expect("v3 schema");
    }
    conn
}

fn pragma(path: &Path, name: &str) -> i64 {
    Connection::open(path)
        .expect("open")
        .pragma_query_value(None, name, |r| r.get(0))
        .expect(name)
}

fn version(path: &Path) -> i64 {
    pragma(path, "user_version")
}

fn at(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).expect("time").to_utc()
}

/// A session row as the old versions wrote it, with its resources and harvester lock
/// (when it is not over).
fn old_session(
    conn: &Connection,
    id: SessionId,
    harvester: &str,
    status: SessionStatus,
    resources: &[&str],
) {
    let status_text = serde_json::to_value(status).expect("status");
    conn.execute(
        "INSERT INTO sessions (id, harvester_id, status, total, started, ended, \
         workflow_time_ns, finalizing, succeeded, failed, finalizer_error) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, 90000000000, ?7, ?8, ?9, ?10)",
        params![
            id.to_string(),
            harvester,
            status_text.as_str(),
            resources.len() as i64,
            at("2026-11-20T08:00:00Z"),
            status.is_terminal().then(|| at("2026-11-20T08:05:00Z")),
            status.is_terminal().then_some("completed"),
            if status.is_terminal() { 1 } else { 2 },
            if status.is_terminal() { 0 } else { 1 },
            status.is_terminal().then_some("catalogue offline"),
        ],
    )
    .expect("session row");
    for (position, r) in resources.iter().enumerate() {
        conn.execute(
            "INSERT INTO resources (session_id, position, resource_id) VALUES (?1, ?2, ?3)",
            params![id.to_string(), position as i64, r],
        )
        .expect("resource row");
    }
    if !status.is_terminal() {
        conn.execute(
            "INSERT INTO harvester_locks (harvester_id, session_id) VALUES (?1, ?2)",
            params![harvester, id.to_string()],
        )
        .expect("lock row");
    }
}

fn old_outcome(conn: &Connection, id: SessionId, resource: &str, failed: Option<&str>) {
    conn.execute(
        "INSERT INTO outcomes (session_id, resource_id, outcome, detail, attempts, elapsed_ns) \
         VALUES (?1, ?2, ?3, ?4, 1, 2000000)",
        params![
            id.to_string(),
            resource,
            if failed.is_some() {
                "failed"
            } else {
                "succeeded"
            },
            failed
        ],
    )
    .expect("outcome row");
}

fn outcome(resource: &str, failed: Option<&str>) -> OutcomeRecord {
    OutcomeRecord {
        resource_id: resource.into(),
        outcome: match failed {
            Some(error) => ResourceOutcome::Failed {
                error: error.into(),
            },
            None => ResourceOutcome::Succeeded,
        },
        attempts: 1,
        elapsed: Duration::from_millis(2),
    }
}

fn event(id: SessionId, seq: u64, resource: &str) -> SessionEvent {
    SessionEvent {
        seq,
        at: at("2026-11-20T08:01:00.25Z"),
        session_id: id,
        harvester_id: "csw".into(),
        kind: EventKind::WorkerStarted {
            resource_id: resource.into(),
            attempt: 1,
        },
    }
}

fn ids(outcomes: &[OutcomeRecord]) -> Vec<&str> {
    outcomes.iter().map(|o| o.resource_id.as_str()).collect()
}

/// Two sessions as an old version left them: `done` finished on harvester "old", and
/// `running` on-going on "csw" with outcomes recorded out of resource order.
fn old_sessions(conn: &Connection) -> (SessionId, SessionId) {
    let done = SessionId::new();
    let running = SessionId::new();
    old_session(conn, done, "old", SessionStatus::FinishedAllOk, &["x"]);
    old_session(
        conn,
        running,
        "csw",
        SessionStatus::OnGoing,
        &["r0", "r1", "r2", "r3", "r4"],
    );
    old_outcome(conn, done, "x", None);
    old_outcome(conn, running, "r3", None);
    old_outcome(conn, running, "r0", Some("boom"));
    old_outcome(conn, running, "r4", None);
    (done, running)
}

/// What every migration keeps: records, resources, outcomes in recorded order, locks;
/// and what the migrated file then does: new outcomes after the old, resume as before.
async fn kept_and_usable(store: &SqliteStore, done: SessionId, running: SessionId) {
    let finished = store.session(done).await.expect("finished session kept");
    assert_eq!(finished.status, SessionStatus::FinishedAllOk);
    assert_eq!(finished.ended, Some(at("2026-11-20T08:05:00Z")));
    assert_eq!(
        finished.finalizer_error.as_deref(),
        Some("catalogue offline")
    );
    assert_eq!(store.resources(done).await.expect("resources"), ["x"]);
    assert_eq!(ids(&store.outcomes(done).await.expect("outcomes")), ["x"]);

    let record = store.session(running).await.expect("running session kept");
    assert_eq!(record.status, SessionStatus::OnGoing);
    assert_eq!(record.started, at("2026-11-20T08:00:00Z"));
    assert_eq!(record.workflow_time, Duration::from_secs(90));
    assert_eq!((record.counts.succeeded, record.counts.failed), (2, 1));
    assert_eq!(record.finalizing, None);
    let listed: Vec<_> = store
        .list_sessions()
        .await
        .expect("list")
        .into_iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(listed, [running, done], "newest first");
    assert_eq!(
        store.active_session(&"csw".into()).await.expect("lock"),
        Some(running)
    );
    assert_eq!(
        store.active_session(&"old".into()).await.expect("lock"),
        None
    );
    let resources: Vec<ResourceId> = ["r0", "r1", "r2", "r3", "r4"].map(Into::into).into();
    assert_eq!(
        store.resources(running).await.expect("resources"),
        resources
    );
    let outcomes = store.outcomes(running).await.expect("outcomes");
    assert_eq!(
        outcomes,
        [
            outcome("r3", None),
            outcome("r0", Some("boom")),
            outcome("r4", None)
        ],
        "in recorded order, whole"
    );
    let (page, total) = store.outcomes_page(running, 1, 1).await.expect("page");
    assert_eq!((ids(&page), total), (vec!["r0"], 3));

    // A session stored before nodes existed has no owner: nobody may write for it until a
    // live node takes it over (the first rescue pass does), in epoch 1.
    let node = harvest_supervisor::store::NodeInfo {
        id: harvest_supervisor::NodeId::new(),
        name: None,
        process: None,
    };
    let fence = harvest_supervisor::Fence {
        node: node.id,
        epoch: 1,
    };
    assert!(matches!(
        store
            .record_outcome(running, fence, outcome("r1", None))
            .await,
        Err(harvest_supervisor::StoreError::Fenced { holder: None, .. })
    ));
    store
        .register_node(&node, Duration::from_secs(30))
        .await
        .expect("register");
    let taken = store.take_over(node.id, 10).await.expect("take over");
    assert_eq!(taken.len(), 1, "only the unfinished session");
    assert_eq!(taken[0].record.id, running);
    assert_eq!(taken[0].from_node, None);
    assert_eq!(taken[0].record.fence(), Some(fence));
    // New outcomes come after the old ones; a second outcome of a resource is ignored.
    store
        .record_outcome(running, fence, outcome("r1", None))
        .await
        .expect("record");
    store
        .record_outcome(running, fence, outcome("r3", Some("again")))
        .await
        .expect("duplicate ignored");
    assert_eq!(
        ids(&store.outcomes(running).await.expect("outcomes")),
        ["r3", "r0", "r4", "r1"]
    );
    // Resuming forgets the failure and hands back the resources without a success.
    let again = store.resume_session(running, fence).await.expect("resume");
    let again: Vec<ResourceId> = again.expect("resumable").into_iter().collect();
    assert_eq!(again, ["r0", "r2"].map(ResourceId::from));
    store
        .record_outcome(running, fence, outcome("r0", None))
        .await
        .expect("record");
    assert_eq!(
        ids(&store.outcomes(running).await.expect("outcomes")),
        ["r3", "r4", "r1", "r0"]
    );
    // A new session on the free harvester works as on a fresh file.
    let fresh = SessionId::new();
    store
        .create_session(harvest_supervisor::store::NewSession {
            id: fresh,
            harvester_id: "old".into(),
            resources: vec![ResourceId::from("y")].into(),
            started: Utc::now(),
            workflow_time: Duration::from_secs(1),
            config: Default::default(),
            owner: node.id,
        })
        .await
        .expect("new session");
    store
        .record_outcome(
            fresh,
            harvest_supervisor::Fence::new(node.id),
            outcome("y", None),
        )
        .await
        .expect("record");
    assert_eq!(ids(&store.outcomes(fresh).await.expect("outcomes")), ["y"]);
}

/// Opens the old file at `path`, which migrates it, and checks what every migration keeps:
/// `running`'s events (numbered from 1) and config, and all of [`kept_and_usable`].
async fn migrates_keeping_everything(
    path: &Path,
    done: SessionId,
    running: SessionId,
    old_events: &[SessionEvent],
    config: Option<harvest_supervisor::SessionConfig>,
) {
    let store = SqliteStore::open(path).await.expect("migrates");
    assert_eq!(store.events(running).await.expect("events"), old_events);
    assert_eq!(
        store.last_event_seq(running).await.expect("seq"),
        old_events.len() as u64
    );
    assert_eq!(store.session_config(running).await.expect("answer"), config);
    kept_and_usable(&store, done, running).await;
    store.close().await.expect("close");
    assert_eq!(version(path), 6);
    assert_eq!(
        pragma(path, "page_size"),
        4096,
        "an existing file keeps its pages"
    );
}

#[tokio::test]
async fn a_version_1_file_is_migrated_in_place_and_keeps_everything() {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("v1.db");
    let (done, running, old_events) = {
        let conn = old_file(&path, 1);
        let (done, running) = old_sessions(&conn);
        // Version 1 kept a row per event, each line the whole event.
        let old_events: Vec<_> = (1..=3).map(|seq| event(running, seq, "r0")).collect();
        for e in &old_events {
            conn.execute(
                "INSERT INTO events (session_id, seq, body) VALUES (?1, ?2, ?3)",
                params![
                    running.to_string(),
                    e.seq as i64,
                    serde_json::to_string(e).expect("json")
                ],
            )
            .expect("event row");
        }
        (done, running, old_events)
    };
    // Version 1 kept no config: not known for its sessions.
    migrates_keeping_everything(&path, done, running, &old_events, None).await;
}

#[tokio::test]
async fn a_version_3_file_is_migrated_in_place_and_keeps_everything() {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("v3.db");
    let (done, running, old_events) = {
        let conn = old_file(&path, 3);
        let (done, running) = old_sessions(&conn);
        let config = harvest_supervisor::SessionConfig::default();
        conn.execute(
            "UPDATE sessions SET config = ?2 WHERE id = ?1",
            params![
                running.to_string(),
                serde_json::to_string(&config).expect("config")
            ],
        )
        .expect("config");
        // Two chunks of lines without the ids (what versions 3 wrote).
        let old_events: Vec<_> = (1..=5).map(|seq| event(running, seq, "r1")).collect();
        let line = |e: &SessionEvent| {
            let mut v = serde_json::to_value(e).expect("json");
            let map = v.as_object_mut().expect("object");
            map.remove("session_id");
            map.remove("harvester_id");
            v.to_string()
        };
        for (first, last) in [(1usize, 3usize), (4, 5)] {
            let body: Vec<String> = old_events[first - 1..last].iter().map(line).collect();
            conn.execute(
                "INSERT INTO event_chunks (session_id, first_seq, last_seq, body) \
                 VALUES (?1, ?2, ?3, ?4)",
                params![
                    running.to_string(),
                    first as i64,
                    last as i64,
                    body.join("\n")
                ],
            )
            .expect("chunk row");
        }
        // Rows of a session that is gone: nothing can read them, the migration drops them.
        old_outcome(&conn, SessionId::new(), "orphan", None);
        (done, running, old_events)
    };
    let config = Some(harvest_supervisor::SessionConfig::default());
    migrates_keeping_everything(&path, done, running, &old_events, config).await;
}

#[tokio::test]
async fn a_failing_migration_leaves_the_file_as_it_was() {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("broken.db");
    {
        let conn = old_file(&path, 3);
        old_sessions(&conn);
        // A table in the way of the migration's new one.
        conn.execute_batch("CREATE TABLE outcomes_v4 (x); PRAGMA journal_mode = DELETE;")
            .expect("obstacle");
    }
    assert!(SqliteStore::open(&path).await.is_err());
    assert_eq!(version(&path), 3);
    let conn = Connection::open(&path).expect("open");
    let rows: i64 = conn
        .query_row("SELECT count(*) FROM outcomes", [], |r| r.get(0))
        .expect("old outcomes still there");
    assert_eq!(rows, 4);
}

#[tokio::test]
async fn resource_lists_longer_than_a_chunk_keep_their_order_migrated_or_new() {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("long.db");
    // Ids that need escaping in JSON, and rows inserted out of position order.
    let names: Vec<String> = (0..1100).map(|i| format!("r\"{i}\"\n\u{e9}")).collect();
    let old = SessionId::new();
    {
        let conn = old_file(&path, 3);
        old_session(&conn, old, "csw", SessionStatus::OnGoing, &[]);
        for i in (0..names.len()).rev() {
            conn.execute(
                "INSERT INTO resources (session_id, position, resource_id) VALUES (?1, ?2, ?3)",
                params![old.to_string(), i as i64, names[i]],
            )
            .expect("resource row");
        }
    }
    let store = SqliteStore::open(&path).await.expect("migrates");
    let node = harvest_supervisor::store::NodeInfo {
        id: harvest_supervisor::NodeId::new(),
        name: None,
        process: None,
    };
    store
        .register_node(&node, Duration::from_secs(30))
        .await
        .expect("register");
    let taken = store.take_over(node.id, 10).await.expect("take over");
    let fence = taken[0].record.fence().expect("owned now");
    let want: Vec<ResourceId> = names.iter().map(ResourceId::from).collect();
    assert_eq!(store.resources(old).await.expect("resources"), want);
    let fresh = SessionId::new();
    store
        .create_session(harvest_supervisor::store::NewSession {
            id: fresh,
            harvester_id: "other".into(),
            resources: want.clone().into(),
            started: Utc::now(),
            workflow_time: Duration::from_secs(1),
            config: Default::default(),
            owner: node.id,
        })
        .await
        .expect("new session");
    assert_eq!(store.resources(fresh).await.expect("resources"), want);
    // Resuming hands back the ones without a success, in order, across chunks.
    for i in [0, 511, 512, 1099] {
        store
            .record_outcome(old, fence, outcome(&names[i], None))
            .await
            .expect("record");
    }
    let rest = store
        .resume_session(old, fence)
        .await
        .expect("resume")
        .expect("resumable");
    let mut expected = want;
    for i in [1099, 512, 511, 0] {
        expected.remove(i);
    }
    assert_eq!(rest, expected);
    store.close().await.expect("close");

    // A lost chunk (a damaged file) is an error, not a shorter list.
    Connection::open(&path)
        .expect("open")
        .execute(
            "DELETE FROM resource_chunks WHERE first_position = 512 AND session_key = \
             (SELECT key FROM sessions WHERE id = ?1)",
            [fresh.to_string()],
        )
        .expect("lose a chunk");
    let store = SqliteStore::open(&path).await.expect("reopen");
    assert!(matches!(
        store.resources(fresh).await,
        Err(harvest_supervisor::StoreError::Backend(_))
    ));
    store.close().await.expect("close");
}
