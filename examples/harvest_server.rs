//! A harvesting server: the supervision tree embedded in an HTTP service (axum), on the
//! durable store, with simulated harvesters.
//!
//! ```text
//! cargo run --example harvest_server -- --db harvest_server.db --port 8080
//! TOKEN=... ; curl -X POST -H "authorization: Bearer $TOKEN" -H 'content-type: application/json' \
//!      -d '{"count": 50}' http://127.0.0.1:8080/harvesters/csw/sessions
//! curl -N http://127.0.0.1:8080/sessions/<id>/events     # live Server-Sent Events
//! ```
//!
//! | method and path | what |
//! |---|---|
//! | `POST /harvesters/{id}/sessions` | start: `{"resources": [...]}` or `{"count": N}`, optional `"config"` (a `SessionConfig`); `201`, `409` busy (with the running session), `400` naming the field |
//! | `POST /sessions/{id}/abort` | abort: `202`, `404`, `409` when already finished |
//! | `GET /sessions/{id}?offset=&limit=` | the record and a page of outcomes |
//! | `GET /harvesters/{id}/sessions?status=&before=&limit=` | history, newest first |
//! | `GET /sessions/{id}/events` | Server-Sent Events: the stored log, then live ones, until `SessionFinished` (at most `--max-streams` open: `429` past it) |
//! | `GET /sessions?status=&before=&limit=` | every harvester's sessions, newest first |
//! | `GET /` | a page that lists sessions, starts and aborts them, and draws a session's timeline |
//! | `GET /metrics` | the library's metrics, Prometheus text (`harvest_supervisor::meters` lists them) |
//! | `GET /healthz` | `200` when the supervisor answers and the store is reachable, else `503` |
//!
//! Mutating requests need `Authorization: Bearer <token>` (any case of `Bearer`; `--token`,
//! or `HARVEST_SERVER_TOKEN`, at least 16 characters, or a random one printed at start).
//! Bodies over 64 KiB get `413`, sessions over `--max-resources` a `400` (a `count` is
//! checked before any resource is made). A partial `config` is merged over the server's
//! own session config, nested fields one by one. Every error is JSON:
//! `{"error": text, "code": stable code, "field"?: what was wrong, "session_id"?: ...}`,
//! with codes `bad_request`, `bad_body`, `unauthorized`, `not_found`, `method_not_allowed`,
//! `busy`, `already_finished`, `finalizing`, `unavailable`; a page's `limit` outside its
//! range is a `400` naming it. Ctrl-C stops accepting, finalizes running sessions
//! (`Shutdown`), and closes the database.
//!
//! Logs go to stderr (`--log-format text|json`; colours only on a terminal), with one
//! access line per request; a generated token is printed there too, never on stdout.
//!
//! Simulated harvest: a resource id containing `fail` fails, `panic` panics, `hang` never
//! returns (the per-resource timeout cuts it), anything else succeeds after `--work-ms`.
//! Every route, body and error code, with curl examples: `docs/harvest_server_api.md`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use clap::Parser;
use futures::Stream;
use harvest_supervisor::{
    HarvestContext, HarvesterId, SessionConfig, SessionError, SessionEvent, SessionId,
    SessionQuery, SessionRequest, SessionStatus, SessionStore, SqliteStore, StartError, Supervisor,
    SupervisorConfig, finalizer_fn, harvest_fn,
};
use serde::{Deserialize, Serialize};
use serde_json::json;

/// Serve harvest sessions over HTTP.
#[derive(Parser, Debug, Clone)]
#[command(
    after_help = "Routes, bodies, statuses, error codes and curl examples: docs/harvest_server_api.md"
)]
struct Args {
    /// Address to bind (loopback by default: put a proxy in front to expose it).
    #[arg(long, default_value = "127.0.0.1")]
    host: std::net::IpAddr,
    /// Port (0 picks a free one).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// The database file.
    #[arg(long, default_value = "harvest_server.db")]
    db: PathBuf,
    /// A PostgreSQL database instead of the file (`postgres://user:pass@host/db`, or
    /// DATABASE_URL): servers on several machines share its sessions.
    #[arg(long, env = "DATABASE_URL", value_name = "URL")]
    postgres: Option<String>,
    /// Bearer token for mutating requests (else HARVEST_SERVER_TOKEN, else a random one).
    #[arg(long, env = "HARVEST_SERVER_TOKEN")]
    token: Option<String>,
    /// Most resources in one session.
    #[arg(long, default_value_t = 100_000)]
    max_resources: usize,
    /// Simulated work per resource, in milliseconds.
    #[arg(long, default_value_t = 50)]
    work_ms: u64,
    /// This server's node name, in logs (several servers may share one --db: each owns
    /// the sessions it starts, and takes over those of a server that died).
    #[arg(long)]
    node_name: Option<String>,
    /// How logs are written (on stderr): `text` (colours only on a terminal) or `json`
    /// (one object per line).
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
    /// Most event streams open at once; past it, `429`.
    #[arg(long, default_value_t = 256)]
    max_streams: usize,
}

/// See `--log-format`.
#[derive(clap::ValueEnum, Debug, Clone, Copy)]
enum LogFormat {
    Text,
    Json,
}

/// What the handlers share.
#[derive(Clone)]
struct App {
    supervisor: Arc<Supervisor>,
    token: Arc<str>,
    max_resources: usize,
    /// The server's session config: a request's partial `config` is merged over it.
    defaults: Arc<SessionConfig>,
    /// Cancelled when the server stops: open event streams end then (a stream of a
    /// session another server runs would otherwise hold the shutdown up).
    closing: tokio_util::sync::CancellationToken,
    /// Renders what the library's metrics recorded (Prometheus text).
    metrics: metrics_exporter_prometheus::PrometheusHandle,
    /// A permit per open event stream (`--max-streams`).
    streams: Arc<tokio::sync::Semaphore>,
}

/// The process's metrics recorder (the Prometheus exporter's, without its own HTTP
/// listener: `GET /metrics` serves it), installed once.
fn metrics_handle() -> metrics_exporter_prometheus::PrometheusHandle {
    static HANDLE: std::sync::OnceLock<metrics_exporter_prometheus::PrometheusHandle> =
        std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            // Another recorder already installed (an embedding application's) keeps its
            // place; this one then renders nothing.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

/// `GET /metrics`: the library's metrics, in Prometheus' text format (see
/// `harvest_supervisor::meters` for what each one is). Upkeep (draining histograms into
/// their summaries) runs here, on each scrape.
async fn metrics_text(State(app): State<App>) -> impl IntoResponse {
    app.metrics.run_upkeep();
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        app.metrics.render(),
    )
}

/// `GET /healthz`: `200` when the supervisor answers and the store is reachable (each
/// within 2 s), else `503`, saying which.
async fn healthz(State(app): State<App>) -> Response {
    const WITHIN: Duration = Duration::from_secs(2);
    let supervisor = tokio::time::timeout(WITHIN, app.supervisor.sessions()).await;
    let supervisor_ok = matches!(supervisor, Ok(Ok(_)));
    let store = tokio::time::timeout(WITHIN, app.supervisor.store().nodes()).await;
    let store_ok = matches!(store, Ok(Ok(_)));
    let status = if supervisor_ok && store_ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let word = |ok: bool| if ok { "ok" } else { "failing" };
    (
        status,
        Json(json!({
            "status": word(supervisor_ok && store_ok),
            "supervisor": word(supervisor_ok),
            "store": word(store_ok),
        })),
    )
        .into_response()
}

/// The shortest bearer token the server accepts at start.
const MIN_TOKEN_LEN: usize = 16;

/// Refuses an empty or short token: a server with one would reject everything, or accept
/// a guess.
fn check_token(token: &str) -> Result<(), String> {
    if token.trim().len() < MIN_TOKEN_LEN || token.trim() != token {
        return Err(format!(
            "the bearer token must be at least {MIN_TOKEN_LEN} characters, without surrounding \
             spaces (leave --token and HARVEST_SERVER_TOKEN unset for a random one)"
        ));
    }
    Ok(())
}

/// The session config this server starts sessions with.
fn server_session_config() -> SessionConfig {
    SessionConfig {
        per_resource_estimate: Duration::from_millis(200),
        buffer: Duration::from_secs(30),
        resource_timeout: Some(Duration::from_secs(5)),
        monitor_interval: Duration::from_secs(1),
        escalation_grace: Duration::from_secs(5),
        abort_grace: Duration::from_secs(2),
        ..SessionConfig::default()
    }
}

/// `given` merged over `base`: objects key by key (recursively), anything else replaced.
fn merge(base: &mut serde_json::Value, given: serde_json::Value) {
    match (base, given) {
        (serde_json::Value::Object(base), serde_json::Value::Object(given)) => {
            for (key, value) in given {
                match base.get_mut(&key) {
                    Some(slot) => merge(slot, value),
                    None => {
                        base.insert(key, value);
                    }
                }
            }
        }
        (slot, value) => *slot = value,
    }
}

/// An error as JSON: `{"error": ..., "field"?: ..., "session_id"?: ...}` with its status.
struct ApiError(StatusCode, serde_json::Value);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(self.1)).into_response()
    }
}

fn bad_request(field: &str, error: impl std::fmt::Display) -> ApiError {
    ApiError(
        StatusCode::BAD_REQUEST,
        json!({ "error": error.to_string(), "code": "bad_request", "field": field }),
    )
}

/// An extractor's own rejection (a path or query that does not parse), as JSON.
fn rejected(field: &str, status: StatusCode, text: String) -> ApiError {
    ApiError(
        status,
        json!({ "error": text, "code": "bad_request", "field": field }),
    )
}

/// `GET` and `POST` on no route: JSON, like every other error.
async fn not_found() -> ApiError {
    ApiError(
        StatusCode::NOT_FOUND,
        json!({ "error": "no such route", "code": "not_found" }),
    )
}

async fn method_not_allowed() -> ApiError {
    ApiError(
        StatusCode::METHOD_NOT_ALLOWED,
        json!({ "error": "this route does not take this method", "code": "method_not_allowed" }),
    )
}

/// A session id from the path, or a JSON `400` naming it.
struct SessionPath(SessionId);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for SessionPath {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, ApiError> {
        match Path::<SessionId>::from_request_parts(parts, state).await {
            Ok(Path(id)) => Ok(Self(id)),
            Err(e) => Err(rejected("session_id", e.status(), e.body_text())),
        }
    }
}

/// A query string, or a JSON `400` naming what does not parse.
struct JsonQuery<T>(T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> axum::extract::FromRequestParts<S>
    for JsonQuery<T>
{
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, ApiError> {
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(q)) => Ok(Self(q)),
            Err(e) => Err(rejected("query", e.status(), e.body_text())),
        }
    }
}

/// `limit` of a page: from 1 to `max`, else a `400` naming it.
fn page_limit(limit: Option<usize>, default: usize, max: usize) -> Result<usize, ApiError> {
    match limit {
        None => Ok(default),
        Some(n) if (1..=max).contains(&n) => Ok(n),
        Some(n) => Err(bad_request(
            "limit",
            format!("must be from 1 to {max} (got {n})"),
        )),
    }
}

impl From<SessionError> for ApiError {
    fn from(e: SessionError) -> Self {
        let status = match &e {
            SessionError::UnknownSession { .. } => StatusCode::NOT_FOUND,
            SessionError::AlreadyFinished { .. } | SessionError::Finalizing { .. } => {
                StatusCode::CONFLICT
            }
            SessionError::Store(_) | SessionError::SupervisorDown => {
                StatusCode::SERVICE_UNAVAILABLE
            }
        };
        let code = match &e {
            SessionError::UnknownSession { .. } => "not_found",
            SessionError::AlreadyFinished { .. } => "already_finished",
            SessionError::Finalizing { .. } => "finalizing",
            SessionError::Store(_) | SessionError::SupervisorDown => "unavailable",
        };
        ApiError(status, json!({ "error": e.to_string(), "code": code }))
    }
}

fn authorize(app: &App, headers: &HeaderMap) -> Result<(), ApiError> {
    // The scheme is case-insensitive (RFC 9110): `Bearer`, `bearer`, `BEARER`.
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim());
    // Compared in constant time, so the answer's timing does not leak the token.
    let matches = given.is_some_and(|g| {
        g.len() == app.token.len()
            && g.bytes()
                .zip(app.token.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    });
    if matches {
        Ok(())
    } else {
        Err(ApiError(
            StatusCode::UNAUTHORIZED,
            json!({ "error": "a valid bearer token is required", "code": "unauthorized" }),
        ))
    }
}

/// `POST /harvesters/{id}/sessions`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StartBody {
    /// The resources to harvest.
    resources: Option<Vec<String>>,
    /// Or this many simulated ones (checked against `--max-resources` before any is made).
    count: Option<u64>,
    /// Budget overrides: any `SessionConfig` fields, merged over the server's own config
    /// (nested ones, like `retry`, field by field).
    config: Option<serde_json::Value>,
}

async fn start_session(
    State(app): State<App>,
    Path(harvester): Path<String>,
    headers: HeaderMap,
    body: Result<Json<StartBody>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    authorize(&app, &headers)?;
    // Keep the rejection's own status: 413 for a body over the limit, 400/415/422 else.
    let Json(body) = body.map_err(|e| {
        ApiError(
            e.status(),
            json!({ "error": e.body_text(), "code": "bad_body", "field": "body" }),
        )
    })?;
    // Every limit before the allocation it guards: a count is checked, then made.
    let too_many = || {
        bad_request(
            "resources",
            format!("at most {} resources per session", app.max_resources),
        )
    };
    let resources = match (body.resources, body.count) {
        (Some(list), None) => list,
        (None, Some(n)) => {
            let n = usize::try_from(n)
                .ok()
                .filter(|&n| n <= app.max_resources)
                .ok_or_else(too_many)?;
            (0..n).map(|i| format!("r-{i:06}")).collect()
        }
        _ => {
            return Err(bad_request(
                "resources",
                "give either `resources` or `count`",
            ));
        }
    };
    if resources.len() > app.max_resources {
        return Err(too_many());
    }
    let mut request = SessionRequest::new(harvester, resources);
    if let Some(given) = body.config {
        let mut config =
            serde_json::to_value(&*app.defaults).map_err(|e| bad_request("config", e))?;
        merge(&mut config, given);
        request.config =
            Some(serde_json::from_value(config).map_err(|e| bad_request("config", e))?);
    }
    match app.supervisor.start(request).await {
        Ok(id) => Ok((StatusCode::CREATED, Json(json!({ "session_id": id }))).into_response()),
        Err(StartError::HarvesterBusy { session, .. }) => Err(ApiError(
            StatusCode::CONFLICT,
            json!({ "error": "the harvester is busy", "code": "busy", "session_id": session }),
        )),
        Err(StartError::InvalidConfig(e)) => Err(bad_request(&format!("config.{}", e.field()), e)),
        Err(e @ StartError::DuplicateResource { .. }) => Err(bad_request("resources", e)),
        Err(StartError::InvalidId(e)) => {
            let field = if e.kind() == "harvester_id" {
                "harvester"
            } else {
                "resources"
            };
            Err(bad_request(field, e))
        }
        Err(e) => Err(ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({ "error": e.to_string(), "code": "unavailable" }),
        )),
    }
}

async fn abort_session(
    State(app): State<App>,
    SessionPath(id): SessionPath,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authorize(&app, &headers)?;
    app.supervisor.abort(id).await?;
    Ok((StatusCode::ACCEPTED, Json(json!({ "session_id": id }))).into_response())
}

#[derive(Debug, Deserialize)]
struct Page {
    #[serde(default)]
    offset: usize,
    limit: Option<usize>,
}

#[derive(Serialize)]
struct SessionView {
    record: harvest_supervisor::SessionRecord,
    outcomes: Vec<harvest_supervisor::OutcomeRecord>,
    outcomes_total: usize,
    next_offset: Option<usize>,
}

async fn get_session(
    State(app): State<App>,
    SessionPath(id): SessionPath,
    JsonQuery(page): JsonQuery<Page>,
) -> Result<Json<SessionView>, ApiError> {
    let limit = page_limit(page.limit, 100, 1000)?;
    let record = app.supervisor.session(id).await?;
    let (outcomes, total) = app.supervisor.outcomes_page(id, page.offset, limit).await?;
    let end = page.offset.saturating_add(outcomes.len());
    Ok(Json(SessionView {
        record,
        next_offset: (end < total).then_some(end),
        outcomes_total: total,
        outcomes,
    }))
}

#[derive(Debug, Deserialize)]
struct HistoryQuery {
    status: Option<SessionStatus>,
    before: Option<SessionId>,
    limit: Option<usize>,
}

async fn history(
    State(app): State<App>,
    Path(harvester): Path<String>,
    JsonQuery(q): JsonQuery<HistoryQuery>,
) -> Result<Json<harvest_supervisor::SessionPage>, ApiError> {
    page_of(&app, Some(HarvesterId::from(harvester)), q).await
}

/// `GET /sessions`: every harvester's sessions, newest first.
async fn all_sessions(
    State(app): State<App>,
    JsonQuery(q): JsonQuery<HistoryQuery>,
) -> Result<Json<harvest_supervisor::SessionPage>, ApiError> {
    page_of(&app, None, q).await
}

async fn page_of(
    app: &App,
    harvester_id: Option<HarvesterId>,
    q: HistoryQuery,
) -> Result<Json<harvest_supervisor::SessionPage>, ApiError> {
    let query = SessionQuery {
        harvester_id,
        status: q.status,
        before: q.before,
        limit: page_limit(q.limit, 50, SessionQuery::MAX_LIMIT)?,
    };
    Ok(Json(app.supervisor.history(&query).await?))
}

/// `GET /nodes`: the nodes (supervisor starts) on this database, newest first, with their
/// leases: which process owns which session (`owner` in a session is a node's id).
async fn nodes(
    State(app): State<App>,
) -> Result<Json<Vec<harvest_supervisor::store::NodeRecord>>, ApiError> {
    let mut nodes = app
        .supervisor
        .store()
        .nodes()
        .await
        .map_err(SessionError::from)?;
    nodes.truncate(200);
    Ok(Json(nodes))
}

/// `GET /`: the page (no build step: one static file).
async fn page() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        include_str!("assets/harvest_server.html"),
    )
}

/// How long an open event stream may still send what is logged once the server stops.
const STREAM_DRAIN: Duration = Duration::from_secs(2);

/// The stored log first, then each new event, until `SessionFinished`: whichever server
/// runs the session (several may share one database), through the library's follower,
/// which reads the store page by page and only when something new may be there.
async fn events(
    State(app): State<App>,
    SessionPath(id): SessionPath,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    // A permit per open stream, held until it ends: past the cap, 429 (a thousand idle
    // streams would otherwise each hold a task and wake on every event).
    let permit = Arc::clone(&app.streams)
        .try_acquire_owned()
        .map_err(|_| {
            ApiError(
                StatusCode::TOO_MANY_REQUESTS,
                json!({ "error": "too many open event streams; try again later", "code": "too_many_streams" }),
            )
        })?;
    let mut follower = app.supervisor.follow(id, 0);
    // An unknown session is a 404, not an empty stream.
    let first = match follower.next().await {
        Some(Ok(event)) => Some(event),
        Some(Err(e)) => return Err(e.into()),
        None => None,
    };
    let closing = app.closing.clone();
    let stream = async_stream(move |tx| async move {
        let _permit = permit;
        let send = |e: &SessionEvent| {
            let data = serde_json::to_string(e).unwrap_or_default();
            Event::default()
                .event(e.kind.name())
                .id(e.seq.to_string())
                .data(data)
        };
        let Some(first) = first else {
            return;
        };
        if tx.send(send(&first)).await.is_err() {
            return;
        }
        // Set when the server stops: what is already logged is still sent (the
        // `SessionFinished` of this server's sessions, finalized just before) for up to
        // this long, then the stream ends; the client reconnects elsewhere (its
        // `Last-Event-ID` says where it was).
        let mut drain_until: Option<tokio::time::Instant> = None;
        loop {
            let next = match drain_until {
                None => tokio::select! {
                    next = follower.next() => next,
                    // The client left: its place is free at once, not at the next event.
                    () = tx.closed() => return,
                    () = closing.cancelled() => {
                        drain_until = Some(tokio::time::Instant::now() + STREAM_DRAIN);
                        continue;
                    }
                },
                Some(until) => match tokio::time::timeout_at(until, follower.next()).await {
                    Ok(next) => next,
                    Err(_) => return,
                },
            };
            match next {
                Some(Ok(e)) => {
                    if tx.send(send(&e)).await.is_err() {
                        return;
                    }
                }
                Some(Err(error)) => {
                    tracing::warn!(%error, session_id = %id, "event stream ended: the store failed");
                    return;
                }
                None => return,
            }
        }
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

/// A stream fed by a task through a small channel.
fn async_stream<F, Fut>(produce: F) -> impl Stream<Item = Result<Event, Infallible>>
where
    F: FnOnce(tokio::sync::mpsc::Sender<Event>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(produce(tx));
    futures::StreamExt::map(tokio_stream::wrappers::ReceiverStream::new(rx), Ok)
}

fn router(app: App) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/sessions", get(all_sessions))
        .route(
            "/harvesters/{id}/sessions",
            post(start_session).get(history),
        )
        .route("/sessions/{id}", get(get_session))
        .route("/sessions/{id}/abort", post(abort_session))
        .route("/sessions/{id}/events", get(events))
        .route("/nodes", get(nodes))
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(healthz))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(64 * 1024))
        // An access line per request: method, path, status, latency.
        .layer(
            tower_http::trace::TraceLayer::new_for_http()
                .make_span_with(
                    tower_http::trace::DefaultMakeSpan::new().level(tracing::Level::INFO),
                )
                .on_response(
                    tower_http::trace::DefaultOnResponse::new().level(tracing::Level::INFO),
                ),
        )
        .with_state(app)
}

/// Starts the tree on `store` with simulated harvesters.
async fn supervisor(
    store: Arc<dyn SessionStore>,
    work: Duration,
    node_name: Option<String>,
) -> Result<Supervisor, Box<dyn std::error::Error>> {
    let harvest = harvest_fn(move |ctx: HarvestContext| async move {
        if ctx.resource_id.contains("hang") {
            std::future::pending::<()>().await;
        }
        tokio::select! {
            () = tokio::time::sleep(work) => {}
            () = ctx.cancel.cancelled() => return Err("cancelled".into()),
        }
        if ctx.resource_id.contains("fail") {
            return Err(format!("remote answered 500 for {}", ctx.resource_id).into());
        }
        if ctx.resource_id.contains("panic") {
            panic!("the parser of {} gave up", ctx.resource_id);
        }
        Ok(())
    });
    let finalizer = finalizer_fn(|report| async move {
        tracing::info!(session_id = %report.session_id, status = %report.status, "session finalized");
        Ok(())
    });
    let config = SupervisorConfig {
        session: server_session_config(),
        recovery: harvest_supervisor::RecoveryPolicy::Finalize,
        node_name,
        ..SupervisorConfig::default()
    };
    Ok(Supervisor::builder(harvest, finalizer)
        .store(store)
        .config(config)
        .start()
        .await?)
}

/// Serves until `shutdown` resolves, then finalizes running sessions and closes the store.
async fn serve(
    listener: tokio::net::TcpListener,
    app: App,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), Box<dyn std::error::Error>> {
    let supervisor = Arc::clone(&app.supervisor);
    let closing = app.closing.clone();
    let stopping = Arc::clone(&supervisor);
    // On the signal: finalize what runs (`Shutdown`, bounded by the supervisor's
    // shutdown_timeout), which ends the streams of this server's sessions with their
    // `SessionFinished`; then end every other open stream, and only then let the HTTP
    // server drain (it waits for open connections).
    let signal = async move {
        shutdown.await;
        if let Err(error) = stopping.shutdown().await {
            tracing::warn!(%error, "the supervisor did not stop cleanly");
        }
        closing.cancel();
    };
    axum::serve(listener, router(app))
        .with_graceful_shutdown(signal)
        .await?;
    supervisor.shutdown().await?;
    supervisor.store().flush().await?;
    Ok(())
}

fn random_token() -> String {
    use rand::RngExt;
    let mut rng = rand::rng();
    (0..32)
        .map(|_| char::from(b"abcdefghijklmnopqrstuvwxyz0123456789"[rng.random_range(0..36)]))
        .collect()
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    // Logs on stderr: colours only on a terminal, JSON lines on request. One access line
    // per request (tower-http), at info.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "info,tower_http=info".into());
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match args.log_format {
        LogFormat::Json => logs.json().init(),
        LogFormat::Text => logs
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
    }
    let token = match &args.token {
        Some(t) => {
            if let Err(why) = check_token(t) {
                eprintln!("harvest_server: {why}");
                std::process::exit(2);
            }
            t.clone()
        }
        None => {
            let t = random_token();
            // On stderr, never with the rest of the output (which may go to a shared log).
            eprintln!("bearer token for mutating requests: {t}");
            t
        }
    };
    // Installed before the supervisor starts, so that every handle it makes records here.
    let metrics = metrics_handle();
    let store: Arc<dyn SessionStore> = match &args.postgres {
        Some(url) => {
            let store = harvest_supervisor::store::PostgresStore::connect(url).await?;
            println!(
                "store: PostgreSQL {} (schema {})",
                store.target(),
                store.schema()
            );
            Arc::new(store)
        }
        None => {
            println!("store: {}", args.db.display());
            Arc::new(SqliteStore::open(&args.db).await?)
        }
    };
    let supervisor = supervisor(
        store,
        Duration::from_millis(args.work_ms),
        args.node_name.clone(),
    )
    .await?;
    let listener = tokio::net::TcpListener::bind(SocketAddr::new(args.host, args.port)).await?;
    println!("serving on http://{}", listener.local_addr()?);
    let app = App {
        supervisor: Arc::new(supervisor),
        token: token.into(),
        max_resources: args.max_resources,
        defaults: Arc::new(server_session_config()),
        closing: tokio_util::sync::CancellationToken::new(),
        metrics,
        streams: Arc::new(tokio::sync::Semaphore::new(args.max_streams)),
    };
    serve(listener, app, async {
        let _ = tokio::signal::ctrl_c().await;
        println!("shutting down: finalizing running sessions");
    })
    .await
}

/// The tests' PostgreSQL server (shared with the integration tests).
#[cfg(test)]
#[path = "../tests/common/pg.rs"]
#[allow(dead_code)]
mod test_pg;

#[cfg(test)]
mod tests {
    //! HTTP-level tests against a server on an ephemeral loopback port.
    use super::*;

    const TOKEN: &str = "test-token-of-some-length";
    /// The test servers' cap on open event streams.
    const TEST_MAX_STREAMS: usize = 3;

    struct Server {
        base: String,
        http: reqwest::Client,
        stop: Option<tokio::sync::oneshot::Sender<()>>,
        done: tokio::task::JoinHandle<()>,
        dir: tempfile::TempDir,
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
            let metrics = metrics_handle();
            let supervisor = supervisor(store, work, None).await.expect("supervisor");
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let base = format!("http://{}", listener.local_addr().expect("addr"));
            let app = App {
                supervisor: Arc::new(supervisor),
                token: TOKEN.into(),
                max_resources: 1000,
                defaults: Arc::new(server_session_config()),
                closing: tokio_util::sync::CancellationToken::new(),
                metrics,
                streams: Arc::new(tokio::sync::Semaphore::new(TEST_MAX_STREAMS)),
            };
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let done = tokio::spawn(async move {
                serve(listener, app, async {
                    let _ = stopped.await;
                })
                .await
                .expect("serve");
            });
            Self {
                base,
                http: reqwest::Client::new(),
                stop: Some(stop),
                done,
                dir,
            }
        }

        async fn start_session(
            &self,
            harvester: &str,
            body: serde_json::Value,
        ) -> reqwest::Response {
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
        let abort = |server: &Server| {
            server
                .http
                .post(format!("{}/sessions/{id}/abort", server.base))
                .bearer_auth(TOKEN)
                .send()
        };
        assert_eq!(status(&abort(&server).await.expect("abort")), 202);
        let view = wait_terminal(&server, id).await;
        assert_eq!(view["record"]["status"], "aborted");
        assert_eq!(status(&abort(&server).await.expect("abort again")), 409);
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
        let r = server
            .http
            .post(format!("{}/sessions/{ghost}/abort", server.base))
            .bearer_auth(TOKEN)
            .send()
            .await
            .expect("request");
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
        let id = r.json::<serde_json::Value>().await.expect("json")["session_id"]
            .as_str()
            .expect("id")
            .to_owned();
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
        assert_eq!(view["record"]["workflow_time"], "30s 400ms", "{view}");
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
        server.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn metrics_and_health_are_served() {
        let server = Server::start().await;
        let r = server.start_session("metered", json!({ "count": 3 })).await;
        let id = r.json::<serde_json::Value>().await.expect("json")["session_id"]
            .as_str()
            .expect("id")
            .to_owned();
        tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                let (_, view) = server.json(&format!("/sessions/{id}")).await;
                if view["record"]["status"] == "finished-all-ok" {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("finished");
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
        server.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn event_streams_past_the_cap_get_429_and_a_closed_one_frees_its_place() {
        let server = Server::start().await;
        let r = server
            .start_session("csw", json!({ "resources": ["a-hang", "b-hang"] }))
            .await;
        let id = r.json::<serde_json::Value>().await.expect("json")["session_id"]
            .as_str()
            .expect("id")
            .to_owned();
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
        let id = r.json::<serde_json::Value>().await.expect("json")["session_id"]
            .as_str()
            .expect("id")
            .to_owned();
        let record = tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                let (_, view) = server.json(&format!("/sessions/{id}")).await;
                if view["record"]["status"] == "finished-some-failed" {
                    return view["record"].clone();
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("finished");
        assert_eq!(record["counts"]["succeeded"], 1, "{record}");
        assert_eq!(record["counts"]["failed"], 1, "{record}");
        assert_eq!(record["counts"]["panicked"], 1, "{record}");
        server.stop().await;
    }

    #[test]
    fn an_empty_short_or_padded_token_is_refused_at_start() {
        for bad in [
            "",
            "short",
            "                    ",
            " padded-but-long-enough ",
        ] {
            assert!(check_token(bad).is_err(), "{bad:?}");
        }
        assert!(check_token("a-long-enough-token").is_ok());
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

        async fn quit(mut self) {
            let url = format!("{}/session/{}", self.base, self.session);
            let _ = self.http.delete(url).send().await;
            let _ = self.driver.kill();
            let _ = self.driver.wait();
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_page_starts_a_session_and_its_timeline_reaches_a_terminal_status() {
        let server = Server::start().await;
        let Some(browser) = Browser::start().await else {
            server.stop().await;
            return;
        };
        browser
            .cmd(
                reqwest::Method::POST,
                "/url",
                json!({ "url": format!("{}/", server.base) }),
            )
            .await;
        browser.type_into("#token", TOKEN).await;
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
        // The list shows it too, without an abort button once it is over.
        let listed = browser
            .script("return document.querySelector('#sessions tbody tr .status').textContent")
            .await;
        assert_eq!(listed, "finished-some-failed");
        browser.quit().await;
        server.stop().await;
    }
}
