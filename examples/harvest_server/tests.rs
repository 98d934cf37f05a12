//! HTTP-level tests against a server on an ephemeral loopback port.
use super::*;
use std::os::unix::process::CommandExt as _;

const TOKEN: &str = "test-token-of-some-length";
/// The test servers' cap on open event streams.
const TEST_MAX_STREAMS: usize = 3;

struct Server {
    base: String,
    http: reqwest::Client,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    done: tokio::task::JoinHandle<()>,
    dir: tempfile::TempDir,
    /// The app's: cancelled, every open event stream ends (after its drain).
    closing: tokio_util::sync::CancellationToken,
    /// The app itself (for a test that serves more of it, as `--admin-port` does).
    app: App,
}

impl Server {
    async fn start() -> Self {
        let dir = tempfile::tempdir().expect("dir");
        let store = SqliteStore::open(dir.path().join("s.db"))
            .await
            .expect("store");
        Self::start_on(Arc::new(store), dir, Duration::from_millis(20)).await
    }

    async fn start_on(
        store: Arc<dyn SessionStore>,
        dir: tempfile::TempDir,
        work: Duration,
    ) -> Self {
        Self::start_with(store, dir, work, None).await
    }

    async fn start_with(
        store: Arc<dyn SessionStore>,
        dir: tempfile::TempDir,
        work: Duration,
        read_token: Option<&str>,
    ) -> Self {
        Self::start_full(store, dir, work, read_token, http::HEADER_READ_TIMEOUT).await
    }

    async fn start_full(
        store: Arc<dyn SessionStore>,
        dir: tempfile::TempDir,
        work: Duration,
        read_token: Option<&str>,
        header_read_timeout: Duration,
    ) -> Self {
        let metrics = metrics_handle();
        let supervisor = supervisor(store, work, supervisor_config(None, 4))
            .await
            .expect("supervisor");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        let app = App {
            supervisor: Arc::new(supervisor),
            token: TOKEN.into(),
            read_token: read_token.map(Into::into),
            max_resources: 1000,
            defaults: Arc::new(server_session_config()),
            closing: tokio_util::sync::CancellationToken::new(),
            metrics,
            timelines: Arc::new(timeline::Timelines::new()),
            streams: Arc::new(tokio::sync::Semaphore::new(TEST_MAX_STREAMS)),
        };
        let closing = app.closing.clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let served = app.clone();
        let done = tokio::spawn(async move {
            serve(
                listener,
                served,
                async {
                    let _ = stopped.await;
                },
                header_read_timeout,
            )
            .await
            .expect("serve");
        });
        Self {
            base,
            http: reqwest::Client::new(),
            stop: Some(stop),
            done,
            dir,
            closing,
            app,
        }
    }

    async fn start_session(&self, harvester: &str, body: serde_json::Value) -> reqwest::Response {
        self.http
            .post(format!("{}/harvesters/{harvester}/sessions", self.base))
            .bearer_auth(TOKEN)
            .json(&body)
            .send()
            .await
            .expect("request")
    }

    async fn json(&self, path: &str) -> (StatusCode, serde_json::Value) {
        let r = self
            .http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .expect("request");
        let status = StatusCode::from_u16(r.status().as_u16()).expect("status");
        (status, r.json().await.unwrap_or(serde_json::Value::Null))
    }

    /// `POST /sessions/{id}/abort` with `token`.
    async fn abort(&self, id: &str, token: &str) -> reqwest::Response {
        self.http
            .post(format!("{}/sessions/{id}/abort", self.base))
            .bearer_auth(token)
            .send()
            .await
            .expect("abort")
    }

    /// Stops as Ctrl-C would, and returns the database's folder for a look inside.
    async fn stop(mut self) -> tempfile::TempDir {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.done).await;
        self.dir
    }
}

fn status(r: &reqwest::Response) -> u16 {
    r.status().as_u16()
}

/// The id of the session a `201` started (panics on anything else).
async fn started(r: reqwest::Response) -> String {
    assert_eq!(status(&r), 201, "not started");
    r.json::<serde_json::Value>().await.expect("json")["session_id"]
        .as_str()
        .expect("id")
        .to_owned()
}

impl Server {
    /// Waits (30 s at most) until `/now` lists running session `id` as `wanted` accepts;
    /// its entry then (`None` past 30 s).
    async fn now_when(
        &self,
        id: &str,
        wanted: impl Fn(&serde_json::Value) -> bool,
    ) -> Option<serde_json::Value> {
        tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                let (_, now) = self.json("/now").await;
                let active = now["active"].as_array().cloned().unwrap_or_default();
                if let Some(a) = active.into_iter().find(|a| a["record"]["id"] == id)
                    && wanted(&a)
                {
                    return a;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .ok()
    }

    /// Waits (30 s at most) until session `id` has status `want`; its record then.
    async fn record_when(&self, id: &str, want: &str) -> serde_json::Value {
        tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                let (_, view) = self.json(&format!("/sessions/{id}")).await;
                if view["record"]["status"] == want {
                    return view["record"].clone();
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("the session reached the status")
    }
}

async fn wait_terminal(server: &Server, id: &str) -> serde_json::Value {
    for _ in 0..400 {
        let (_, v) = server.json(&format!("/sessions/{id}")).await;
        let st = v["record"]["status"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        if st.starts_with("finished") || st == "aborted" {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("session {id} never ended");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_starts_runs_and_reads_back_with_paged_outcomes() {
    let server = Server::start().await;
    let r = server
        .start_session("csw", json!({ "resources": ["a", "b-fail", "c"] }))
        .await;
    assert_eq!(status(&r), 201);
    let id = r.json::<serde_json::Value>().await.expect("json")["session_id"]
        .as_str()
        .expect("id")
        .to_owned();
    let view = wait_terminal(&server, &id).await;
    assert_eq!(view["record"]["status"], "finished-some-failed");
    assert_eq!(view["outcomes_total"], 3);

    let (code, page) = server
        .json(&format!("/sessions/{id}?offset=1&limit=1"))
        .await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(page["outcomes"].as_array().map(Vec::len), Some(1));
    assert_eq!(page["next_offset"], 2);

    let (code, history) = server.json("/harvesters/csw/sessions?limit=10").await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(history["sessions"][0]["id"], id.as_str());

    // The owning node, by id in the session and with its lease at /nodes.
    let owner = view["record"]["owner"]
        .as_str()
        .expect("an owner")
        .to_owned();
    assert_eq!(view["record"]["epoch"], 1);
    let (code, nodes) = server.json("/nodes").await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(nodes[0]["info"]["id"], owner.as_str());
    assert_eq!(nodes[0]["live"], true);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finalizes_running_sessions_and_leaves_the_database_consistent() {
    let server = Server::start().await;
    let r = server
        .start_session("csw", json!({ "resources": ["a", "b-hang"] }))
        .await;
    let id: SessionId = serde_json::from_value(
        r.json::<serde_json::Value>().await.expect("json")["session_id"].clone(),
    )
    .expect("id");
    let (code, all) = server.json("/sessions").await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(all["sessions"][0]["id"], json!(id));
    tokio::time::sleep(Duration::from_millis(200)).await;
    // A client follows the running session: stopping must not wait for it (the hang
    // would last until the session's deadline).
    let stream = server
        .http
        .get(format!("{}/sessions/{id}/events", server.base))
        .send()
        .await
        .expect("stream");
    let reading = tokio::spawn(stream.text());
    // (The session's deadline is 30 s away: a stop that waited for it fails here.)
    let dir = tokio::time::timeout(Duration::from_secs(15), server.stop())
        .await
        .expect("the server stops with a stream open");
    let body = tokio::time::timeout(Duration::from_secs(5), reading)
        .await
        .expect("the stream ended")
        .expect("task")
        .unwrap_or_default();
    assert!(body.contains("event: SessionFinished"), "{body}");

    // What a restarted server would find: the session ended, its harvester free.
    let store = SqliteStore::open(dir.path().join("s.db"))
        .await
        .expect("reopen");
    use harvest_supervisor::SessionStore;
    let record = store.session(id).await.expect("record");
    assert_eq!(record.status, SessionStatus::FinishedSomeFailed);
    assert_eq!(
        record.reason(),
        Some(harvest_supervisor::FinalizeReason::Shutdown)
    );
    assert_eq!(
        store.active_session(&"csw".into()).await.expect("lock"),
        None
    );
    let events = store.events(id).await.expect("events");
    assert_eq!(
        events.last().map(|e| e.kind.name()),
        Some("SessionFinished"),
        "flushed"
    );
}

/// A store without room for its reserve refuses new sessions: `507 disk_full`, while
/// `/healthz` stays `200` and says `disk_full`. (The reserve cannot be written here
/// because a folder holds its name: the store then behaves as on a full disk.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_on_a_full_disk_answers_507_and_health_says_so() {
    let dir = tempfile::tempdir().expect("dir");
    std::fs::create_dir(dir.path().join("s.db-reserve")).expect("a folder in the way");
    let store = SqliteStore::open(dir.path().join("s.db"))
        .await
        .expect("opens without its reserve");
    let server = Server::start_on(Arc::new(store), dir, Duration::from_millis(20)).await;
    let refused = server.start_session("csw", json!({ "count": 3 })).await;
    assert_eq!(status(&refused), 507);
    let body: serde_json::Value = refused.json().await.expect("json");
    assert_eq!(body["code"], "disk_full", "{body}");
    let (status, health) = server.json("/healthz").await;
    assert_eq!(status, StatusCode::OK, "{health}");
    assert_eq!(health["disk_full"], true, "{health}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_harvester_answers_409_with_the_running_session() {
    let server = Server::start().await;
    let first = server
        .start_session("csw", json!({ "resources": ["hang-1"] }))
        .await;
    assert_eq!(status(&first), 201);
    let running = first.json::<serde_json::Value>().await.expect("json")["session_id"].clone();
    let second = server.start_session("csw", json!({ "count": 3 })).await;
    assert_eq!(status(&second), 409);
    let body: serde_json::Value = second.json().await.expect("json");
    assert_eq!(body["session_id"], running);

    // Abort it: 202, then 409 once it is over.
    let id = running.as_str().expect("id");
    assert_eq!(status(&server.abort(id, TOKEN).await), 202);
    let view = wait_terminal(&server, id).await;
    assert_eq!(view["record"]["status"], "aborted");
    assert_eq!(status(&server.abort(id, TOKEN).await), 409);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_clear_4xx_naming_the_problem() {
    let server = Server::start().await;
    // No token, wrong token.
    let r = server
        .http
        .post(format!("{}/harvesters/csw/sessions", server.base))
        .json(&json!({ "count": 1 }))
        .send()
        .await
        .expect("request");
    assert_eq!(status(&r), 401);
    let r = server
        .http
        .post(format!("{}/harvesters/csw/sessions", server.base))
        .bearer_auth("wrong")
        .json(&json!({ "count": 1 }))
        .send()
        .await
        .expect("request");
    assert_eq!(status(&r), 401);
    // Invalid budget: 400 naming the field.
    let r = server
        .start_session(
            "csw",
            json!({ "count": 1, "config": { "max_concurrency": 0 } }),
        )
        .await;
    assert_eq!(status(&r), 400);
    let body: serde_json::Value = r.json().await.expect("json");
    assert_eq!(body["field"], "config.max_concurrency");
    // Duplicates, neither list nor count, too many resources.
    let r = server
        .start_session("csw", json!({ "resources": ["a", "a"] }))
        .await;
    assert_eq!(status(&r), 400);
    let r = server.start_session("csw", json!({})).await;
    assert_eq!(status(&r), 400);
    let r = server.start_session("csw", json!({ "count": 1001 })).await;
    assert_eq!(status(&r), 400);
    assert_eq!(
        r.json::<serde_json::Value>().await.expect("json")["field"],
        "resources"
    );
    // A body over the limit: 413.
    let big: Vec<String> = (0..5000).map(|i| format!("resource-number-{i}")).collect();
    let r = server
        .start_session("csw", json!({ "resources": big }))
        .await;
    assert_eq!(status(&r), 413);
    // Abort needs the token too.
    let r = server
        .http
        .post(format!(
            "{}/sessions/{}/abort",
            server.base,
            SessionId::new()
        ))
        .send()
        .await
        .expect("request");
    assert_eq!(status(&r), 401);
    // Unknown session: 404 for reads and aborts.
    let ghost = SessionId::new();
    let (code, _) = server.json(&format!("/sessions/{ghost}")).await;
    assert_eq!(code, StatusCode::NOT_FOUND);
    let r = server.abort(&ghost.to_string(), TOKEN).await;
    assert_eq!(status(&r), 404);
    // Nothing of this started a session.
    let (_, history) = server.json("/harvesters/csw/sessions").await;
    assert_eq!(history["sessions"].as_array().map(Vec::len), Some(0));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_event_stream_replays_then_follows_and_ends_after_session_finished() {
    let server = Server::start().await;
    let r = server.start_session("csw", json!({ "count": 5 })).await;
    let id = started(r).await;
    // Read the whole stream: it must end by itself after SessionFinished.
    let body = tokio::time::timeout(
        Duration::from_secs(30),
        server
            .http
            .get(format!("{}/sessions/{id}/events", server.base))
            .send()
            .await
            .expect("stream")
            .text(),
    )
    .await
    .expect("the stream ended")
    .expect("body");
    let kinds: Vec<&str> = body
        .lines()
        .filter_map(|l| l.strip_prefix("event: "))
        .collect();
    assert_eq!(kinds.first(), Some(&"SessionStarted"));
    assert_eq!(kinds.last(), Some(&"SessionFinished"));
    let seqs: Vec<u64> = body
        .lines()
        .filter_map(|l| l.strip_prefix("id: "))
        .filter_map(|s| s.parse().ok())
        .collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    // A finished session replays from the store and ends at once.
    let again = server
        .http
        .get(format!("{}/sessions/{id}/events", server.base))
        .send()
        .await
        .expect("stream")
        .text()
        .await
        .expect("body");
    assert_eq!(again.matches("event: SessionFinished").count(), 1);
    server.stop().await;
}

/// The README's walk-through: two servers on one PostgreSQL database. A session
/// started on one is streamed and aborted from the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_on_one_postgres_database_share_their_sessions() {
    let Some(pg) =
        super::test_pg::server("two_servers_on_one_postgres_database_share_their_sessions")
    else {
        return;
    };
    let options = pg.options();
    let mut servers = Vec::new();
    for _ in 0..2 {
        let store = harvest_supervisor::store::PostgresStore::connect_with(options.clone())
            .await
            .expect("connect");
        let dir = tempfile::tempdir().expect("dir");
        servers.push(Server::start_on(Arc::new(store), dir, Duration::from_millis(200)).await);
    }
    let (one, two) = (&servers[0], &servers[1]);
    let r = one.start_session("csw", json!({ "count": 200 })).await;
    assert_eq!(r.status().as_u16(), 201);
    let id = r.json::<serde_json::Value>().await.expect("json")["session_id"]
        .as_str()
        .expect("id")
        .to_owned();
    // The other server sees it, and the harvester is busy there too.
    let (status, body) = two.json(&format!("/sessions/{id}")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let busy = two.start_session("csw", json!({ "count": 1 })).await;
    assert_eq!(busy.status().as_u16(), 409);
    // Stream it from the other server while it runs, and abort it from there.
    let stream = two
        .http
        .get(format!("{}/sessions/{id}/events", two.base))
        .send()
        .await
        .expect("stream");
    let aborted = two
        .http
        .post(format!("{}/sessions/{id}/abort", two.base))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("abort");
    assert!(aborted.status().is_success(), "{}", aborted.status());
    let body = tokio::time::timeout(Duration::from_secs(30), stream.text())
        .await
        .expect("the stream ended with the session")
        .expect("body");
    let kinds: Vec<&str> = body
        .lines()
        .filter_map(|l| l.strip_prefix("event: "))
        .collect();
    assert_eq!(kinds.first(), Some(&"SessionStarted"));
    assert_eq!(kinds.last(), Some(&"SessionFinished"));
    assert!(body.contains("\"aborted\""), "{body}");
    let (_, record) = one.json(&format!("/sessions/{id}")).await;
    assert_eq!(record["record"]["status"], "aborted", "{record}");
    for server in servers {
        server.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_and_sloppy_requests_get_json_errors_and_break_nothing() {
    let server = Server::start().await;
    let code = |r: &serde_json::Value| r["code"].as_str().unwrap_or_default().to_owned();
    // Counts are checked before any resource is made.
    for count in [
        json!(1_000_000_000_000u64),
        json!(u64::MAX),
        json!(-1),
        json!(1e300),
    ] {
        let r = server.start_session("csw", json!({ "count": count })).await;
        let status = r.status().as_u16();
        let body: serde_json::Value = r.json().await.expect("json");
        assert!(status == 400 || status == 422, "{count}: {status} {body}");
        assert!(body["error"].is_string(), "{body}");
    }
    // Still serving; a partial config merges over the server's (200 ms per resource
    // + 30 s), not the library's defaults.
    let r = server
        .start_session(
            "csw",
            json!({ "count": 2, "config": { "max_concurrency": 1 } }),
        )
        .await;
    assert_eq!(r.status().as_u16(), 201);
    let id = r.json::<serde_json::Value>().await.expect("json")["session_id"]
        .as_str()
        .expect("id")
        .to_owned();
    let (status, view) = server.json(&format!("/sessions/{id}")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(view["record"]["workflow_time_ms"], 30_400.0, "{view}");
    let r = server
        .start_session(
            "other",
            json!({ "count": 1, "config": { "retry": { "bogus": 1 } } }),
        )
        .await;
    assert_eq!(r.status().as_u16(), 400);
    assert_eq!(
        r.json::<serde_json::Value>().await.expect("json")["field"],
        "config"
    );
    // The scheme is case-insensitive.
    let r = server
        .http
        .post(format!("{}/sessions/{id}/abort", server.base))
        .header("authorization", format!("bearer {TOKEN}"))
        .send()
        .await
        .expect("abort");
    assert_ne!(r.status().as_u16(), 401);
    // Every error is JSON with a stable code.
    for (path, want, field) in [
        (format!("/sessions/{id}?limit=0"), 400, Some("limit")),
        (format!("/sessions/{id}?limit=abc"), 400, Some("query")),
        ("/sessions?limit=100000".to_owned(), 400, Some("limit")),
        ("/sessions/not-a-uuid".to_owned(), 400, Some("session_id")),
        (
            "/harvesters/%FF/sessions".to_owned(),
            400,
            Some("harvester"),
        ),
        ("/sessions?limt=5".to_owned(), 400, Some("query")),
        (format!("/sessions/{id}?ofset=5"), 400, Some("query")),
        ("/no/such/route".to_owned(), 404, None),
    ] {
        let (status, body) = server.json(&path).await;
        assert_eq!(status.as_u16(), want, "{path}: {body}");
        assert!(!code(&body).is_empty(), "{path}: {body}");
        if let Some(field) = field {
            assert_eq!(body["field"], field, "{path}: {body}");
        }
    }
    let r = server
        .http
        .delete(format!("{}/sessions", server.base))
        .send()
        .await
        .expect("delete");
    assert_eq!(r.status().as_u16(), 405);
    let body: serde_json::Value = r.json().await.expect("json");
    assert_eq!(code(&body), "method_not_allowed");
    // A harvester id that is not UTF-8 on a start: JSON too (it was axum's plain text).
    let r = server.start_session("%FF", json!({ "count": 1 })).await;
    assert_eq!(r.status().as_u16(), 400);
    let body: serde_json::Value = r.json().await.expect("json");
    assert_eq!(
        (code(&body).as_str(), &body["field"]),
        ("bad_request", &json!("harvester"))
    );
    server.stop().await;
}

/// A client that sends its request's head slowly, or keeps a connection idle, loses it
/// after the header-read timeout; a long response (an event stream) is not cut by it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_heads_and_idle_connections_are_closed_streams_are_not() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let dir = tempfile::tempdir().expect("dir");
    let store = SqliteStore::open(dir.path().join("s.db"))
        .await
        .expect("store");
    let timeout = Duration::from_secs(1);
    let server = Server::start_full(
        Arc::new(store),
        dir,
        Duration::from_millis(20),
        None,
        timeout,
    )
    .await;
    let addr = server.base.trim_start_matches("http://").to_owned();
    // A session that runs for a while, followed by a stream.
    let id = started(
        server
            .start_session("csw", json!({ "resources": ["a", "b-hang"] }))
            .await,
    )
    .await;
    let mut stream = server
        .http
        .get(format!("{}/sessions/{id}/events", server.base))
        .send()
        .await
        .expect("stream");
    // A head that never ends, and a connection that is never used.
    let mut slow = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    slow.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n")
        .await
        .expect("half a head");
    let mut idle = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    // Both are closed by the server (read returns 0 or an error), within the timeout and
    // some slack; without the timeout they would stay open for ever.
    for (what, socket) in [("slow head", &mut slow), ("idle", &mut idle)] {
        let mut buf = [0u8; 1024];
        let closed = tokio::time::timeout(timeout * 5, async {
            loop {
                match socket.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert!(closed.is_ok(), "{what}: still open after {:?}", timeout * 5);
    }
    // The stream outlived the timeout and still delivers: its first events arrived, and
    // the connection is not closed while the session runs.
    let first = tokio::time::timeout(Duration::from_secs(5), stream.chunk())
        .await
        .expect("an event")
        .expect("body")
        .expect("not ended");
    assert!(!first.is_empty());
    let more = tokio::time::timeout(timeout * 2, stream.chunk()).await;
    assert!(
        !matches!(more, Ok(Ok(None)) | Ok(Err(_))),
        "the stream was cut: {more:?}"
    );
    server.stop().await;
}

/// A client that holds its connection (a body declared and never sent, an event stream
/// it does not read) cannot hold up the server's stop: the sessions are finalized, then
/// open connections get `CONNECTIONS_GRACE` to close, and the store is closed anyway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_holding_connections_do_not_hold_up_the_stop() {
    use tokio::io::AsyncWriteExt as _;
    let server = Server::start().await;
    let r = server
        .start_session("csw", json!({ "resources": ["a", "b-hang"] }))
        .await;
    let id = started(r).await;
    let addr = server.base.trim_start_matches("http://").to_owned();
    // A start whose body never finishes arriving.
    let mut slow = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    slow.write_all(
        format!(
            "POST /harvesters/slow/sessions HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer \
             {TOKEN}\r\ncontent-type: application/json\r\ncontent-length: 60000\r\n\r\n{{\"count\""
        )
        .as_bytes(),
    )
    .await
    .expect("partial request");
    // An event stream of a running session, never read, on a socket with a small
    // receive buffer.
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("buffer");
    let mut unread = socket
        .connect(addr.parse().expect("addr"))
        .await
        .expect("connect");
    unread
        .write_all(format!("GET /sessions/{id}/events HTTP/1.1\r\nhost: {addr}\r\n\r\n").as_bytes())
        .await
        .expect("stream request");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let began = std::time::Instant::now();
    let dir = tokio::time::timeout(CONNECTIONS_GRACE + Duration::from_secs(10), server.stop())
        .await
        .expect("the stop does not wait for the clients");
    assert!(
        began.elapsed() < CONNECTIONS_GRACE + Duration::from_secs(10),
        "{:?}",
        began.elapsed()
    );
    // The session was finalized for the shutdown, and the store closed cleanly.
    let store = SqliteStore::open(dir.path().join("s.db"))
        .await
        .expect("reopen");
    use harvest_supervisor::SessionStore;
    let id: SessionId = serde_json::from_value(json!(id)).expect("id");
    let record = store.session(id).await.expect("record");
    assert_eq!(
        record.reason(),
        Some(harvest_supervisor::FinalizeReason::Shutdown)
    );
    drop((slow, unread));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_health_are_served() {
    let server = Server::start().await;
    let r = server.start_session("metered", json!({ "count": 3 })).await;
    let id = started(r).await;
    server.record_when(&id, "finished-all-ok").await;
    let text = server
        .http
        .get(format!("{}/metrics", server.base))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    for want in [
        "harvest_sessions_finished_total{",
        "harvester=\"metered\"",
        "harvest_resources_total{",
        "harvest_attempts_total{",
        "harvest_resource_duration_seconds",
    ] {
        assert!(text.contains(want), "{want} in\n{text}");
    }
    assert!(!text.contains(&id), "no session id in a label");
    let (status, health) = server.json("/healthz").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(health["status"], "ok", "{health}");
    assert_eq!(health["disk_full"], false, "{health}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_streams_past_the_cap_get_429_and_a_closed_one_frees_its_place() {
    let server = Server::start().await;
    let r = server
        .start_session("csw", json!({ "resources": ["a-hang", "b-hang"] }))
        .await;
    let id = started(r).await;
    let url = format!("{}/sessions/{id}/events", server.base);
    let mut open = Vec::new();
    for _ in 0..TEST_MAX_STREAMS {
        let r = server.http.get(&url).send().await.expect("stream");
        assert_eq!(r.status().as_u16(), 200);
        open.push(r);
    }
    let r = server.http.get(&url).send().await.expect("stream");
    assert_eq!(r.status().as_u16(), 429);
    let body: serde_json::Value = r.json().await.expect("json");
    assert_eq!(body["code"], "too_many_streams");
    // A client that leaves frees its place (once the server notices).
    drop(open.pop());
    let reopened = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let r = server.http.get(&url).send().await.expect("stream");
            if r.status().as_u16() == 200 {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("a place again");
    drop(reopened);
    drop(open);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_simulator_fails_panics_and_succeeds_as_the_ids_say() {
    let server = Server::start().await;
    let r = server
        .start_session("sim", json!({ "resources": ["ok-1", "fail-2", "panic-3"] }))
        .await;
    let id = started(r).await;
    let record = server.record_when(&id, "finished-some-failed").await;
    assert_eq!(record["counts"]["succeeded"], 1, "{record}");
    assert_eq!(record["counts"]["failed"], 1, "{record}");
    assert_eq!(record["counts"]["panicked"], 1, "{record}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_carries_a_content_security_policy_and_cannot_be_framed() {
    let server = Server::start().await;
    let r = server
        .http
        .get(format!("{}/", server.base))
        .send()
        .await
        .expect("page");
    let header = |name: &str| {
        r.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let csp = header("content-security-policy");
    assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
    assert!(csp.contains("script-src 'sha256-"), "{csp}");
    assert!(!csp.contains("script-src 'unsafe-inline'"), "{csp}");
    assert_eq!(header("x-content-type-options"), "nosniff");
    assert_eq!(header("x-frame-options"), "DENY");
    server.stop().await;
}

/// SIGTERM (what systemd, Docker or Kubernetes send to stop a service) stops the server
/// as Ctrl-C does, rather than kill it with its sessions left running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_asks_for_the_same_shutdown_as_ctrl_c() {
    let signal = stop_signal().expect("signal handlers");
    // Handled from here on: the signal below does not end the test process.
    let sent = std::process::Command::new("kill")
        .args(["-TERM", &std::process::id().to_string()])
        .status()
        .expect("kill");
    assert!(sent.success());
    let name = tokio::time::timeout(Duration::from_secs(10), signal)
        .await
        .expect("SIGTERM is heard");
    assert_eq!(name, "terminated");
}

/// A server that cannot start says why in a sentence, not a debug dump.
#[test]
fn startup_errors_read_as_sentences_with_their_causes() {
    let config = supervisor_config(None, 0)
        .validate()
        .expect_err("0 turns is refused");
    assert_eq!(
        chain(&config),
        "invalid config `max_concurrent_starts`: must be at least 1 and at most 10000 (got 0)"
    );
    let io = std::io::Error::other("Address already in use");
    let wrapped: Box<dyn std::error::Error> = format!("cannot listen on 127.0.0.1:80: {io}").into();
    assert_eq!(
        chain(wrapped.as_ref()),
        "cannot listen on 127.0.0.1:80: Address already in use"
    );
}

#[test]
fn an_empty_short_or_padded_token_is_refused_at_start() {
    for bad in [
        "",
        "short",
        "                    ",
        " padded-but-long-enough ",
        "a-long-enough-token with a space",
        "pässwörd-für-den-server",
        "tab\tinside-a-long-token",
    ] {
        assert!(check_token(bad).is_err(), "{bad:?}");
    }
    assert!(check_token("a-long-enough-token").is_ok());
    assert!(check_token("Punct!$%&'()*+,-./:;<=>?@[]^_`{|}~").is_ok());
}

/// A minimal WebDriver client (the W3C protocol is JSON over HTTP) for the browser test.
struct Browser {
    http: reqwest::Client,
    base: String,
    session: String,
    driver: std::process::Child,
    _profile: tempfile::TempDir,
}

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// A test that fails before `quit` still ends its chromedriver and the Chromium it
/// started: they share a process group of their own, killed whole (killing the driver
/// alone left Chromium running).
impl Drop for Browser {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-9", "--", &format!("-{}", self.driver.id())])
            .status();
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

impl Browser {
    /// Chromium under chromedriver, or `None` (with a notice) if they are not installed
    /// and `HARVEST_REQUIRE_BROWSER` is unset. CI sets it and installs them.
    async fn start() -> Option<Self> {
        let required = std::env::var_os("HARVEST_REQUIRE_BROWSER").is_some();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let driver = match std::process::Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .process_group(0)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
        {
            Ok(d) => d,
            Err(e) if !required => {
                eprintln!("skipping the browser test: chromedriver not found ({e})");
                return None;
            }
            Err(e) => panic!("chromedriver is required (HARVEST_REQUIRE_BROWSER): {e}"),
        };
        let profile = tempfile::tempdir().expect("profile dir");
        let http = reqwest::Client::new();
        let base = format!("http://127.0.0.1:{port}");
        let caps = json!({ "capabilities": { "alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                         "--no-first-run", "--disable-background-networking",
                         "--disable-component-update", "--disable-sync",
                         format!("--user-data-dir={}", profile.path().display())]
            }
        }}});
        // chromedriver takes a moment to listen.
        let mut session = None;
        for _ in 0..100 {
            if let Ok(r) = http
                .post(format!("{base}/session"))
                .json(&caps)
                .send()
                .await
            {
                let v: serde_json::Value = r.json().await.expect("session json");
                session = v["value"]["sessionId"].as_str().map(str::to_owned);
                assert!(session.is_some(), "no browser session: {v}");
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Some(Self {
            http,
            base,
            session: session.expect("chromedriver answered"),
            driver,
            _profile: profile,
        })
    }

    async fn cmd(
        &self,
        method: reqwest::Method,
        path: &str,
        body: serde_json::Value,
    ) -> serde_json::Value {
        let url = format!("{}/session/{}{path}", self.base, self.session);
        let r = self
            .http
            .request(method, url)
            .json(&body)
            .send()
            .await
            .expect("webdriver");
        let v: serde_json::Value = r.json().await.expect("webdriver json");
        assert!(v["value"]["error"].is_null(), "webdriver {path}: {v}");
        v["value"].clone()
    }

    async fn find(&self, css: &str) -> String {
        let v = self
            .cmd(
                reqwest::Method::POST,
                "/element",
                json!({ "using": "css selector", "value": css }),
            )
            .await;
        v[ELEMENT]
            .as_str()
            .unwrap_or_else(|| panic!("element id for {css}: {v}"))
            .to_owned()
    }

    async fn type_into(&self, css: &str, text: &str) {
        let e = self.find(css).await;
        self.cmd(
            reqwest::Method::POST,
            &format!("/element/{e}/clear"),
            json!({}),
        )
        .await;
        self.cmd(
            reqwest::Method::POST,
            &format!("/element/{e}/value"),
            json!({ "text": text }),
        )
        .await;
    }

    async fn click(&self, css: &str) {
        let e = self.find(css).await;
        self.cmd(
            reqwest::Method::POST,
            &format!("/element/{e}/click"),
            json!({}),
        )
        .await;
    }

    async fn script(&self, js: &str) -> serde_json::Value {
        self.cmd(
            reqwest::Method::POST,
            "/execute/sync",
            json!({ "script": js, "args": [] }),
        )
        .await
    }

    /// Saves a screenshot of the window as `target/page-screenshots/<name>.png`, for a
    /// person to look at.
    async fn screenshot(&self, name: &str) {
        use base64::Engine as _;
        let png = self
            .cmd(reqwest::Method::GET, "/screenshot", json!({}))
            .await;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(png.as_str().expect("base64 png"))
            .expect("png");
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/page-screenshots");
        std::fs::create_dir_all(&dir).expect("screenshot dir");
        std::fs::write(dir.join(format!("{name}.png")), bytes).expect("screenshot");
    }

    /// Opens `server`'s page and types the write token into it.
    async fn sign_in(&self, server: &Server) {
        self.open(&format!("{}/", server.base)).await;
        self.type_into("#token", TOKEN).await;
    }

    async fn open(&self, url: &str) {
        self.cmd(
            reqwest::Method::POST,
            "/window/rect",
            json!({ "width": 1600, "height": 1000 }),
        )
        .await;
        self.cmd(reqwest::Method::POST, "/url", json!({ "url": url }))
            .await;
    }

    /// Polls `js` (an expression) until it is true, 30 s at most.
    async fn until(&self, js: &str) {
        for _ in 0..300 {
            if self.script(&format!("return !!({js})")).await == json!(true) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("never true: {js}");
    }

    /// Ends the browser session; the driver goes when `self` is dropped.
    async fn quit(self) {
        let url = format!("{}/session/{}", self.base, self.session);
        let _ = self.http.delete(url).send().await;
    }
}

/// A server and a browser for a page test; `None` (the server stopped again) where there
/// is no browser and it is not required.
async fn server_and_browser() -> Option<(Server, Browser)> {
    let server = Server::start().await;
    let Some(browser) = Browser::start().await else {
        server.stop().await;
        return None;
    };
    Some((server, browser))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_starts_a_session_and_its_timeline_reaches_a_terminal_status() {
    let Some((server, browser)) = server_and_browser().await else {
        return;
    };
    browser.sign_in(&server).await;
    browser.type_into("#ids", "a, b-fail, c, d").await;
    browser.click("#start-button").await;

    let mut status = String::new();
    for _ in 0..200 {
        status = browser
            .script("return document.getElementById('timeline-status').textContent")
            .await
            .as_str()
            .unwrap_or_default()
            .to_owned();
        if status.starts_with("finished") || status == "aborted" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        status, "finished-some-failed",
        "the timeline shows the terminal status"
    );
    // One lane per resource, coloured by outcome; the finalizer is marked.
    let lanes = browser
        .script("return [...document.querySelectorAll('#timeline rect')].map(r => r.dataset.resource + '=' + r.getAttribute('fill'))")
        .await;
    let lanes: Vec<String> = serde_json::from_value(lanes).expect("lanes");
    assert_eq!(lanes.len(), 4, "{lanes:?}");
    assert!(lanes.contains(&"b-fail=#c62828".to_owned()), "{lanes:?}");
    assert!(lanes.contains(&"a=#2e7d32".to_owned()), "{lanes:?}");
    let finalizer_marks = browser
        .script("return document.querySelectorAll('#timeline line[stroke=\"#000\"]').length")
        .await;
    assert!(finalizer_marks.as_u64().unwrap_or(0) >= 1);
    // The budget and where it came from, beside the counts.
    let budget = browser
        .script("return document.getElementById('timeline-budget').textContent")
        .await;
    let budget = budget.as_str().unwrap_or_default();
    assert!(
        budget.starts_with("budget ") && budget.ends_with("(static)"),
        "{budget}"
    );
    // The list shows it too, without an abort button once it is over.
    browser
        .until("document.querySelector('#sessions tbody tr .status').textContent === 'finished-some-failed'")
        .await;
    browser
        .until("!document.querySelector('#sessions tbody tr .abort')")
        .await;
    browser.screenshot("small-session").await;
    browser.quit().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_shows_every_user_string_as_text_isolated_and_unaltered() {
    let Some((server, browser)) = server_and_browser().await else {
        return;
    };
    // Markup, quotes and a right-to-left override in ids; the failing ones' error texts
    // name them too (the simulator's errors do).
    let harvester = "h\u{202e}evil";
    let ids = [
        "<b>bold</b>-fail",
        "a&amp;\"q'",
        "\u{202e}dir-fail",
        "plain",
    ];
    let r = server
        .start_session(&utf8_percent(harvester), json!({ "resources": ids }))
        .await;
    let id = started(r).await;
    server.record_when(&id, "finished-some-failed").await;
    browser.sign_in(&server).await;
    let row = format!("#sessions tr[data-id=\"{id}\"]");
    browser
        .until(&format!("document.querySelector('{row}')"))
        .await;
    browser.click(&row).await;
    browser
        .until("document.getElementById('timeline-status').textContent.startsWith('finished')")
        .await;
    browser
        .until("document.querySelectorAll('#timeline text.label').length === 4")
        .await;
    // No markup was made from a string: not one <b> in the page.
    assert_eq!(
        browser
            .script("return document.querySelectorAll('b').length")
            .await,
        json!(0)
    );
    // Each lane label is the id exactly, and each id in a table is in a <bdi>.
    let labels: Vec<String> = serde_json::from_value(
        browser
            .script("return [...document.querySelectorAll('#timeline text.label')].map(t => t.textContent)")
            .await,
    )
    .expect("labels");
    for want in ids {
        assert!(labels.iter().any(|l| l == want), "{want:?} in {labels:?}");
    }
    let in_bdi: Vec<String> = serde_json::from_value(
        browser
            .script("return [...document.querySelectorAll('#sessions bdi, #failures bdi')].map(b => b.textContent)")
            .await,
    )
    .expect("bdi");
    assert!(in_bdi.iter().any(|t| t == harvester), "{in_bdi:?}");
    assert!(in_bdi.iter().any(|t| t == "<b>bold</b>-fail"), "{in_bdi:?}");
    assert!(in_bdi.iter().any(|t| t == "\u{202e}dir-fail"), "{in_bdi:?}");
    // A string holding a direction control is marked, naming it.
    let marked = browser
        .script(&format!(
            "return document.querySelector('{row} abbr.bidi').title"
        ))
        .await;
    assert!(
        marked.as_str().unwrap_or_default().contains("U+202E"),
        "{marked}"
    );
    // The override stays inside its <bdi>: the status cell beside it reads as it is.
    let status = browser
        .script(&format!(
            "return document.querySelector('{row} .status').textContent"
        ))
        .await;
    assert_eq!(status, "finished-some-failed");
    browser.screenshot("hostile-strings").await;
    browser.quit().await;
    server.stop().await;
}

/// `s` percent-encoded for a URL path segment.
fn utf8_percent(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_session_is_drawn_as_counts_per_time_bucket_updated_in_place() {
    let Some((server, browser)) = server_and_browser().await else {
        return;
    };
    browser.sign_in(&server).await;
    browser.type_into("#harvester", "big").await;
    browser.type_into("#ids", "").await;
    browser.type_into("#count", "1000").await;
    browser.click("#start-button").await;
    // Shown again twice while it runs (a double click): one stream applies, not three.
    browser.until("view && view.id && !view.terminal").await;
    browser
        .script("show(view.id); show(view.id); return 1")
        .await;
    // While it runs: the now panel lists it with its progress.
    browser
        .until("[...document.querySelectorAll('#now tbody tr')].some(r => r.textContent.includes('/ 1000'))")
        .await;
    browser.screenshot("large-session-running").await;
    browser
        .until("document.getElementById('timeline-status').textContent.startsWith('finished')")
        .await;
    // No lane per resource: bars, six kinds per bucket, and every resource counted once.
    assert_eq!(
        browser
            .script("return document.querySelectorAll('#timeline rect[data-resource]').length")
            .await,
        json!(0)
    );
    let bars = browser
        .script("return document.querySelectorAll('#timeline rect[data-kind]').length")
        .await;
    assert!(bars.as_u64().unwrap_or(0) >= 6, "{bars}");
    assert_eq!(
        browser
            .script("return view.buckets.flat().reduce((a, n) => a + n, 0)")
            .await,
        json!(1000),
        "updated in place from the stream, the buckets hold each resource once"
    );
    // The server's summary of the finished session says the same.
    let id = browser.script("return view.id").await;
    let (_, t) = server
        .json(&format!("/sessions/{}/timeline", id.as_str().expect("id")))
        .await;
    let total: u64 = t["buckets"]
        .as_array()
        .expect("buckets")
        .iter()
        .flat_map(|b| b.as_array().expect("bucket").clone())
        .map(|n| n.as_u64().expect("n"))
        .sum();
    assert_eq!(total, 1000, "{t}");
    assert!(t["lanes"].is_null());
    browser.screenshot("large-session-finished").await;
    browser.quit().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_read_token_reads_need_it_or_the_write_token_and_it_cannot_write() {
    const READ: &str = "read-token-of-some-length";
    let dir = tempfile::tempdir().expect("dir");
    let store = SqliteStore::open(dir.path().join("s.db"))
        .await
        .expect("store");
    let server =
        Server::start_with(Arc::new(store), dir, Duration::from_millis(20), Some(READ)).await;
    let id = started(
        server
            .start_session("csw", json!({ "resources": ["a"] }))
            .await,
    )
    .await;
    let get = |path: String, token: Option<&'static str>| {
        let mut r = server.http.get(format!("{}{path}", server.base));
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        async move { r.send().await.expect("request") }
    };
    let reads = [
        "/sessions".to_owned(),
        "/harvesters/csw/sessions".to_owned(),
        format!("/sessions/{id}"),
        format!("/sessions/{id}/events"),
        "/nodes".to_owned(),
        "/metrics".to_owned(),
    ];
    for path in &reads {
        for token in [None, Some("read-token-of-some-lengtX"), Some("bogus")] {
            let r = get(path.clone(), token).await;
            assert_eq!(status(&r), 401, "{path} with {token:?}");
            let body: serde_json::Value = r.json().await.expect("json");
            assert_eq!(body["code"], "unauthorized", "{path}");
        }
        for token in [READ, TOKEN] {
            let r = get(path.clone(), Some(token)).await;
            assert_eq!(status(&r), 200, "{path} with a good token");
        }
    }
    // Always open: the health check and the page (which holds no data).
    assert_eq!(status(&get("/healthz".into(), None).await), 200);
    assert_eq!(status(&get("/".into(), None).await), 200);
    // An unknown route is a 404 with or without a token.
    assert_eq!(status(&get("/nope".into(), None).await), 404);
    // The read token does not write.
    let r = server.abort(&id, READ).await;
    assert_eq!(status(&r), 401);
    let r = server
        .http
        .post(format!("{}/harvesters/other/sessions", server.base))
        .bearer_auth(READ)
        .json(&json!({ "count": 1 }))
        .send()
        .await
        .expect("request");
    assert_eq!(status(&r), 401);
    server.stop().await;
}

/// A budget learned from the harvester's history: asked for in the start's `config`,
/// said in the timeline (and on the page beside the counts).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_learned_budget_says_where_it_came_from() {
    let server = Server::start().await;
    let adaptive = json!({ "adaptive": { "min_samples": 3, "below_static": true } });
    let first = started(
        server
            .start_session("learns", json!({ "count": 4, "config": adaptive }))
            .await,
    )
    .await;
    server.record_when(&first, "finished-all-ok").await;
    let (_, t) = server.json(&format!("/sessions/{first}/timeline")).await;
    assert_eq!(t["budget"]["source"], "too-few-samples", "{t}");
    assert_eq!(t["budget"]["samples"], 0);
    let second = started(
        server
            .start_session("learns", json!({ "count": 4, "config": adaptive }))
            .await,
    )
    .await;
    server.record_when(&second, "finished-all-ok").await;
    let (status, t) = server.json(&format!("/sessions/{second}/timeline")).await;
    assert_eq!(status, StatusCode::OK, "{t}");
    assert_eq!(t["budget"]["source"], "adaptive", "{t}");
    assert_eq!(t["budget"]["samples"], 4);
    assert!(t["budget"]["observed_ms"].is_number());
    assert!(
        t["budget_text"]
            .as_str()
            .expect("text")
            .starts_with("adaptive (p99 of 4 samples"),
        "{t}"
    );
    // A bad adaptive setting is a 400 naming it.
    let r = server
        .start_session(
            "learns",
            json!({ "count": 1, "config": { "adaptive": { "quantile": 2.0 } } }),
        )
        .await;
    assert_eq!(r.status().as_u16(), 400);
    let body: serde_json::Value = r.json().await.expect("json");
    assert_eq!(body["field"], "config.adaptive.quantile", "{body}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_timeline_summary_counts_each_resource_once_retries_aside() {
    let server = Server::start().await;
    let resources: Vec<String> = (0..300)
        .map(|i| {
            if i % 10 == 0 {
                format!("r{i}-fail")
            } else {
                format!("r{i}")
            }
        })
        .collect();
    let r = server
        .start_session(
            "retried",
            json!({
                "resources": resources,
                "config": { "retry": { "max_attempts": 3, "initial_backoff": "1ms", "max_backoff": "2ms" } }
            }),
        )
        .await;
    let id = started(r).await;
    server.record_when(&id, "finished-some-failed").await;
    let (status, t) = server
        .json(&format!("/sessions/{id}/timeline?buckets=7"))
        .await;
    assert_eq!(status, StatusCode::OK, "{t}");
    let buckets = t["buckets"].as_array().expect("buckets");
    assert_eq!(buckets.len(), 7);
    let by_kind = |k: usize| -> u64 { buckets.iter().map(|b| b[k].as_u64().expect("n")).sum() };
    assert_eq!((by_kind(0), by_kind(1)), (270, 30), "{t}");
    assert_eq!(t["failures_total"], 30);
    assert_eq!(t["failures"].as_array().expect("failures").len(), 30);
    assert!(
        t["failures"][0]["text"]
            .as_str()
            .expect("text")
            .contains("-fail")
    );
    assert_eq!(
        t["failures"][0]["attempt"], 3,
        "the final attempt's failure"
    );
    assert_eq!(t["retries"], 60);
    assert_eq!(t["attempts_started"], 360);
    assert!(t["lanes"].is_null(), "300 resources: no lanes");
    assert!(t["marks"]["finalizer_finished_ms"].is_number());
    assert!(t["last_seq"].as_u64().expect("seq") > 600);
    assert_eq!(t["budget"]["source"], "static", "{t}");
    assert_eq!(t["budget_text"], "static");
    // Bad input is a 400 naming it; an unknown session a 404.
    let (status, body) = server
        .json(&format!("/sessions/{id}/timeline?buckets=0"))
        .await;
    assert_eq!(
        (status, body["field"].as_str()),
        (StatusCode::BAD_REQUEST, Some("buckets"))
    );
    let (status, _) = server
        .json(&format!(
            "/sessions/{}/timeline",
            harvest_supervisor::SessionId::new()
        ))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // The stream goes on from `after`: only what follows it.
    let r = server
        .http
        .get(format!(
            "{}/sessions/{id}/events?after={}",
            server.base,
            t["last_seq"].as_u64().expect("seq") - 1
        ))
        .send()
        .await
        .expect("stream");
    let text = r.text().await.expect("text");
    assert_eq!(text.matches("event: ").count(), 1, "{text}");
    assert!(text.contains("event: SessionFinished"), "{text}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn now_lists_running_sessions_with_their_progress_and_deadline() {
    let server = Server::start().await;
    let id = started(
        server
            .start_session("stuck", json!({ "resources": ["a", "b", "c-hang"] }))
            .await,
    )
    .await;
    let active = server
        .now_when(&id, |a| a["done"] == 2)
        .await
        .expect("the running session shows its progress");
    assert_eq!(active["record"]["total"], 3);
    assert_eq!(active["record"]["harvester_id"], "stuck");
    assert!(
        active["deadline_in_ms"].as_f64().expect("ms") > 0.0,
        "{active}"
    );
    assert_eq!(active["warnings"], json!([]), "{active}");
    let r = server.abort(&id, TOKEN).await;
    assert_eq!(status(&r), 202);
    server.record_when(&id, "aborted").await;
    let (_, now) = server.json("/now").await;
    assert!(
        !now["active"].to_string().contains(&id),
        "a finished session is not running: {now}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_follows_a_session_through_dropped_streams() {
    let Some((server, browser)) = server_and_browser().await else {
        return;
    };
    browser.sign_in(&server).await;
    // Runs until the 5 s resource timeout cuts its hanging resource.
    browser.type_into("#ids", "a, b-fail, c-hang").await;
    browser.click("#start-button").await;
    browser
        .until("view && view.id && !view.terminal && view.lastSeq > 0")
        .await;
    // Every open stream ends (after its 2 s drain), and so does each one opened after.
    server.closing.cancel();
    browser
        .until("document.getElementById('timeline-status').textContent.startsWith('finished')")
        .await;
    // Each event applied once: one lane per resource, counts as the record's.
    assert_eq!(
        browser
            .script("return document.querySelectorAll('#timeline rect[data-resource]').length")
            .await,
        json!(3)
    );
    let counts = browser.script("return view.counts").await;
    assert_eq!(
        (
            &counts["succeeded"],
            &counts["failed"],
            &counts["timed_out"]
        ),
        (&json!(1), &json!(1), &json!(1)),
        "{counts}"
    );
    browser.quit().await;
    server.stop().await;
}

/// `--admin-port`: `/healthz` and `/metrics` from a thread and runtime of their own. The
/// health check answers at once while every thread of the tree's runtime is blocked (a
/// check that waited for the root's answer timed out), then reports the root failing once
/// it has left the pulse unanswered for over 2 s, and ok again once the root runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_port_answers_while_the_runtime_is_blocked_and_tells_a_stuck_root() {
    let server = Server::start().await;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let admin_base = format!("http://{}", listener.local_addr().expect("addr"));
    let stop = tokio_util::sync::CancellationToken::new();
    let admin = serve_admin(listener, server.app.clone(), stop.clone()).expect("admin");
    let base = admin_base.clone();
    // Every worker of the tree's runtime is blocked for 4 s: both wait here for the probe,
    // then sleep.
    let all_blocked = Arc::new(std::sync::Barrier::new(3));
    let ready = Arc::clone(&all_blocked);
    // The client runs on a thread of its own.
    let probe = std::thread::spawn(move || {
        ready.wait();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async move {
            let http = reqwest::Client::new();
            let health = || async {
                let r = tokio::time::timeout(
                    Duration::from_secs(1),
                    http.get(format!("{base}/healthz")).send(),
                )
                .await
                .expect("answered within 1 s")
                .expect("request");
                let status = r.status().as_u16();
                (status, r.json::<serde_json::Value>().await.expect("json"))
            };
            let first = health().await;
            tokio::time::sleep(Duration::from_millis(2600)).await;
            (first, health().await)
        })
    });
    let blockers: Vec<_> = (0..2)
        .map(|_| {
            let barrier = Arc::clone(&all_blocked);
            tokio::spawn(async move {
                barrier.wait();
                std::thread::sleep(Duration::from_secs(4));
            })
        })
        .collect();
    let (first, later) = tokio::task::spawn_blocking(move || probe.join())
        .await
        .expect("join")
        .expect("probe");
    assert_eq!(first.0, 200, "{}", first.1);
    assert_eq!(first.1["supervisor"], "ok");
    assert_eq!(later.0, 503, "{}", later.1);
    assert_eq!(later.1["supervisor"], "failing");
    assert!(
        later.1["root_unanswered_ms"].as_u64().expect("ms") > 2000,
        "{}",
        later.1
    );
    for blocker in blockers {
        blocker.await.expect("blocker");
    }
    // The root runs again: it takes the pulse, and the next check is ok.
    let http = reqwest::Client::new();
    let healthy = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let r = http
                .get(format!("{admin_base}/healthz"))
                .send()
                .await
                .expect("request");
            if r.status().as_u16() == 200 {
                return r.json::<serde_json::Value>().await.expect("json");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("healthy again");
    assert_eq!(healthy["supervisor"], "ok");
    // The admin port serves the metrics, and nothing else (a JSON 404).
    let r = http
        .get(format!("{admin_base}/metrics"))
        .send()
        .await
        .expect("metrics");
    assert_eq!(status(&r), 200);
    let r = http
        .get(format!("{admin_base}/sessions"))
        .send()
        .await
        .expect("request");
    assert_eq!(status(&r), 404);
    assert_eq!(
        r.json::<serde_json::Value>().await.expect("json")["code"],
        "not_found"
    );
    stop.cancel();
    tokio::task::spawn_blocking(move || admin.join())
        .await
        .expect("join")
        .expect("the admin thread ends");
    server.stop().await;
}

/// `/now` tells an attempt cut for a silent heartbeat while its session still runs (the
/// simulated harvest never beats: with a `heartbeat_timeout`, a hanging resource is cut
/// by the silence, then retried).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn now_warns_of_attempts_cut_for_a_silent_heartbeat() {
    let server = Server::start().await;
    let config = json!({
        "heartbeat_timeout": "100ms",
        "resource_timeout": "1h",
        "retry": { "max_attempts": 1000, "initial_backoff": "50ms", "max_backoff": "50ms" },
    });
    let id = started(
        server
            .start_session(
                "silent",
                json!({ "resources": ["a", "b-hang"], "config": config }),
            )
            .await,
    )
    .await;
    let active = server
        .now_when(&id, |a| {
            a["warnings"].to_string().contains("heartbeat silent")
        })
        .await
        .expect("the running session warns of its silent heartbeats");
    let warnings = active["warnings"].to_string();
    assert!(
        !warnings.contains("timeouts"),
        "a silence is not a time limit: {warnings}"
    );
    let r = server.abort(&id, TOKEN).await;
    assert_eq!(status(&r), 202);
    server.record_when(&id, "aborted").await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_sessions_timeline_is_folded_once_a_running_ones_each_time() {
    // A finished session's log never changes: its summary is kept (`Cache-Status: hit`),
    // so asking again costs no fold of its whole log. A running one's is folded each time.
    let server = Server::start().await;
    let timeline = async |id: &str| {
        let r = server
            .http
            .get(format!("{}/sessions/{id}/timeline?buckets=9", server.base))
            .send()
            .await
            .expect("timeline");
        assert_eq!(r.status().as_u16(), 200);
        let cache = r
            .headers()
            .get("cache-status")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        (cache, r.text().await.expect("body"))
    };
    let running = started(
        server
            .start_session("hangs", json!({ "resources": ["hang-1", "r2"] }))
            .await,
    )
    .await;
    for _ in 0..2 {
        let (cache, _) = timeline(&running).await;
        assert_eq!(
            cache, "harvest-server; fwd=miss",
            "a running session's is not kept"
        );
    }
    let done = started(server.start_session("done", json!({ "count": 30 })).await).await;
    server.record_when(&done, "finished-all-ok").await;
    // Kept once the fold has seen the log's end (`SessionFinished` may be written just
    // after the record says finished).
    let mut first = None;
    for _ in 0..100 {
        let (cache, body) = timeline(&done).await;
        if cache == "harvest-server; hit" {
            first = Some(body);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let first = first.expect("a finished session's timeline is kept");
    let (cache, again) = timeline(&done).await;
    assert_eq!(cache, "harvest-server; hit");
    assert_eq!(again, first, "the same summary");
    let t: serde_json::Value = serde_json::from_str(&first).expect("json");
    assert_eq!(t["record"]["status"], "finished-all-ok");
    assert_eq!(t["buckets"].as_array().map(Vec::len), Some(9));
}
