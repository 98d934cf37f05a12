//! The routes: what the handlers share, authorization, starting, aborting and reading
//! sessions, metrics and health.

use super::*;

/// What the handlers share.
#[derive(Clone)]
pub(crate) struct App {
    pub(crate) supervisor: Arc<Supervisor>,
    pub(crate) token: Arc<str>,
    /// Needed (or `token`) by the read routes when set.
    pub(crate) read_token: Option<Arc<str>>,
    pub(crate) max_resources: usize,
    /// The server's session config: a request's partial `config` is merged over it.
    pub(crate) defaults: Arc<SessionConfig>,
    /// Cancelled when the server stops: open event streams end then (a stream of a
    /// session another server runs would otherwise hold the shutdown up).
    pub(crate) closing: tokio_util::sync::CancellationToken,
    /// Renders what the library's metrics recorded (Prometheus text).
    pub(crate) metrics: metrics_exporter_prometheus::PrometheusHandle,
    /// A permit per open event stream (`--max-streams`).
    pub(crate) streams: Arc<tokio::sync::Semaphore>,
    /// Finished sessions' timelines, and a cap on folds at once.
    pub(crate) timelines: Arc<crate::timeline::Timelines>,
}

/// `GET /metrics`: the library's metrics, in Prometheus' text format (see
/// `harvest_supervisor::meters` for what each one is). Upkeep (draining histograms into
/// their summaries) runs here, on each scrape.
pub(crate) async fn metrics_text(State(app): State<App>) -> impl IntoResponse {
    app.metrics.run_upkeep();
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        app.metrics.render(),
    )
}

/// `GET /healthz`: `200` when the supervisor is alive (its root has not left a pulse
/// unanswered for more than 2 s) and the store takes this node's lease renewals (the last
/// one succeeded, within two renewal intervals, and the node is not self-fenced), else
/// `503`, saying which. Answered at once: no store I/O of its own and no wait in the
/// root's queue, so it never queues behind the sessions' reads and writes nor a burst of
/// starts, and a store that cannot be written shows as failing. A full disk on which the
/// store still renews (in its reserve) is `disk_full: true` with a `200`: the node is
/// not broken (restarting it would not help), but no session starts until there is room.
pub(crate) async fn healthz(State(app): State<App>) -> Response {
    const WITHIN: Duration = Duration::from_secs(2);
    let health = app.supervisor.health(WITHIN);
    let status = if health.is_healthy() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let word = |ok: bool| if ok { "ok" } else { "failing" };
    (
        status,
        Json(json!({
            "status": word(health.is_healthy()),
            "supervisor": word(health.alive),
            "store": word(health.store_ok()),
            "lease_renewed_ms_ago": u64::try_from(health.lease_renewed_ago.as_millis()).unwrap_or(u64::MAX),
            "lease_failures": health.lease_failures,
            "root_unanswered_ms": u64::try_from(health.root_unanswered_for.as_millis()).unwrap_or(u64::MAX),
            "fenced": health.fenced,
            "disk_full": health.disk_full,
        })),
    )
        .into_response()
}

/// `given` merged over `base`: objects key by key (recursively), anything else replaced.
pub(crate) fn merge(base: &mut serde_json::Value, given: serde_json::Value) {
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

/// The bearer token of a request, if any. The scheme is case-insensitive (RFC 9110):
/// `Bearer`, `bearer`, `BEARER`.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim())
}

/// `given == token`, compared in constant time (the answer's timing does not leak it).
fn same(given: &str, token: &str) -> bool {
    given.len() == token.len()
        && given
            .bytes()
            .zip(token.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

fn unauthorized(what: &str) -> ApiError {
    ApiError(
        StatusCode::UNAUTHORIZED,
        json!({ "error": format!("a valid bearer token is required ({what})"), "code": "unauthorized" }),
    )
}

/// A mutating request must carry the write token.
pub(crate) fn authorize(app: &App, headers: &HeaderMap) -> Result<(), ApiError> {
    match bearer(headers) {
        Some(given) if same(given, &app.token) => Ok(()),
        _ => Err(unauthorized("the write token")),
    }
}

/// The read routes' guard: with `--read-token` set, a request must carry it or the write
/// token; without it, reads are open.
pub(crate) async fn require_read(
    State(app): State<App>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Result<Response, ApiError> {
    if let Some(read) = &app.read_token {
        let ok = bearer(request.headers())
            .is_some_and(|given| same(given, read) || same(given, &app.token));
        if !ok {
            return Err(unauthorized("the read or the write token"));
        }
    }
    Ok(next.run(request).await)
}

/// `POST /harvesters/{id}/sessions`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct StartBody {
    /// The resources to harvest.
    resources: Option<Vec<String>>,
    /// Or this many simulated ones (checked against `--max-resources` before any is made).
    count: Option<u64>,
    /// Budget overrides: any `SessionConfig` fields, merged over the server's own config
    /// (nested ones, like `retry`, field by field).
    config: Option<serde_json::Value>,
}

pub(crate) async fn start_session(
    State(app): State<App>,
    HarvesterPath(harvester): HarvesterPath,
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
        // The store keeps its disk's last room for the sessions already running.
        Err(StartError::Store(e @ StoreError::DiskFull { .. })) => Err(ApiError(
            StatusCode::INSUFFICIENT_STORAGE,
            json!({ "error": e.to_string(), "code": "disk_full" }),
        )),
        Err(e) => Err(ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({ "error": e.to_string(), "code": "unavailable" }),
        )),
    }
}

pub(crate) async fn abort_session(
    State(app): State<App>,
    SessionPath(id): SessionPath,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authorize(&app, &headers)?;
    app.supervisor.abort(id).await?;
    Ok((StatusCode::ACCEPTED, Json(json!({ "session_id": id }))).into_response())
}

/// A misspelt parameter (`limt=5`) is a `400` naming it, not silently the default.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Page {
    #[serde(default)]
    offset: usize,
    limit: Option<usize>,
}

#[derive(Serialize)]
pub(crate) struct SessionView {
    record: harvest_supervisor::SessionRecord,
    outcomes: Vec<harvest_supervisor::OutcomeRecord>,
    outcomes_total: usize,
    next_offset: Option<usize>,
}

pub(crate) async fn get_session(
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
#[serde(deny_unknown_fields)]
pub(crate) struct HistoryQuery {
    status: Option<SessionStatus>,
    before: Option<SessionId>,
    limit: Option<usize>,
}

pub(crate) async fn history(
    State(app): State<App>,
    HarvesterPath(harvester): HarvesterPath,
    JsonQuery(q): JsonQuery<HistoryQuery>,
) -> Result<Json<harvest_supervisor::SessionPage>, ApiError> {
    page_of(&app, Some(HarvesterId::from(harvester)), q).await
}

/// `GET /sessions`: every harvester's sessions, newest first.
pub(crate) async fn all_sessions(
    State(app): State<App>,
    JsonQuery(q): JsonQuery<HistoryQuery>,
) -> Result<Json<harvest_supervisor::SessionPage>, ApiError> {
    page_of(&app, None, q).await
}

pub(crate) async fn page_of(
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
pub(crate) async fn nodes(
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
pub(crate) async fn page() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CONTENT_SECURITY_POLICY, page_policy()),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::X_FRAME_OPTIONS, "DENY"),
        ],
        PAGE,
    )
}

/// The page: one static file, no build step.
const PAGE: &str = include_str!("assets/harvest_server.html");

/// The page's Content-Security-Policy: only its own inline script and style run (by their
/// SHA-256, computed once from the file), it talks only to this server, and no other site
/// may frame it. (Style attributes stay allowed: the page sets them on what it draws.)
fn page_policy() -> &'static str {
    static POLICY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    POLICY.get_or_init(|| {
        let hash = |open: &str, close: &str| -> String {
            let text = PAGE
                .split_once(open)
                .and_then(|(_, rest)| rest.split_once(close))
                .map_or("", |(inside, _)| inside);
            use base64::Engine;
            use sha2::Digest;
            let digest = sha2::Sha256::digest(text.as_bytes());
            format!(
                "'sha256-{}'",
                base64::engine::general_purpose::STANDARD.encode(digest)
            )
        };
        format!(
            "default-src 'none'; script-src {}; style-src {}; style-src-attr 'unsafe-inline'; \
             connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; \
             frame-ancestors 'none'",
            hash("<script>", "</script>"),
            hash("<style>", "</style>"),
        )
    })
}

pub(crate) fn router(app: App) -> Router {
    // Reads: open, or behind `--read-token` (the write token reads too).
    let reads = Router::new()
        .route("/sessions", get(all_sessions))
        .route("/harvesters/{id}/sessions", get(history))
        .route("/sessions/{id}", get(get_session))
        .route("/sessions/{id}/events", get(events))
        .route("/sessions/{id}/timeline", get(super::timeline::timeline))
        .route("/now", get(super::timeline::now))
        .route("/nodes", get(nodes))
        .route("/metrics", get(metrics_text))
        .route_layer(axum::middleware::from_fn_with_state(
            app.clone(),
            require_read,
        ));
    // Writes check the write token themselves; the page and the health check are open.
    let routes = Router::new()
        .route("/", get(page))
        .route("/harvesters/{id}/sessions", post(start_session))
        .route("/sessions/{id}/abort", post(abort_session))
        .route("/healthz", get(healthz))
        .merge(reads);
    served(routes, app)
}

/// The `--admin-port` routes: `/healthz` (open) and `/metrics` (as on the main port).
pub(crate) fn admin_router(app: App) -> Router {
    let routes = Router::new().route("/healthz", get(healthz)).route(
        "/metrics",
        get(metrics_text).route_layer(axum::middleware::from_fn_with_state(
            app.clone(),
            require_read,
        )),
    );
    served(routes, app)
}

/// `routes` with what every listener of the server has: JSON errors for unknown routes
/// and methods, the body's size and time limits, an access line per request.
fn served(routes: Router<App>, app: App) -> Router {
    routes
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(64 * 1024))
        .layer(tower_http::timeout::RequestBodyTimeoutLayer::new(
            super::BODY_TIMEOUT,
        ))
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
