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
//! | `GET /sessions/{id}/events?after=` | Server-Sent Events: the stored log (after `after`, or `Last-Event-ID`), then live ones, until `SessionFinished` (at most `--max-streams` open: `429` past it) |
//! | `GET /sessions/{id}/timeline?buckets=` | the log summarized: outcome counts per time bucket, marks, first failures, lanes when few |
//! | `GET /now` | running sessions with progress, deadline and warnings |
//! | `GET /sessions?status=&before=&limit=` | every harvester's sessions, newest first |
//! | `GET /nodes` | the nodes (supervisor starts) on this database, with their leases |
//! | `GET /` | the page: now, the sessions (filtered, paged), a session's timeline and failures |
//! | `GET /metrics` | the library's metrics, Prometheus text (`harvest_supervisor::meters` lists them) |
//! | `GET /healthz` | `200` when the supervisor is alive (its root takes its messages) and its last lease renewal (a store write) succeeded, else `503`; answered at once |
//!
//! With `--admin-port`, `/healthz` and `/metrics` are served on that port too, from a
//! thread of their own (answered however busy the main port is).
//!
//! Mutating requests need `Authorization: Bearer <token>` (any case of `Bearer`; `--token`,
//! or `HARVEST_SERVER_TOKEN`, at least 16 characters of visible ASCII, or a random one
//! printed at start);
//! with `--read-token`, the read routes need it (or the write token) too.
//! Bodies over 64 KiB get `413`, sessions over `--max-resources` a `400` (a `count` is
//! checked before any resource is made). A partial `config` is merged over the server's
//! own session config, nested fields one by one. Every error is JSON:
//! `{"error": text, "code": stable code, "field"?: what was wrong, "session_id"?: ...}`,
//! with codes `bad_request`, `bad_body`, `unauthorized`, `not_found`, `method_not_allowed`,
//! `busy`, `already_finished`, `finalizing`, `too_many_streams`, `disk_full`,
//! `unavailable`; a page's `limit` outside its range is a `400` naming it. A request's
//! head must arrive within 30 s (idle connections are closed then too), its body within
//! 30 s more (see `http`). Ctrl-C or SIGTERM finalizes running sessions (`Shutdown`), ends the
//! event streams, stops accepting (open connections get 5 s), and closes the database. A server that cannot start (a bad
//! flag, a port in use, a database it cannot open) says why on stderr and exits with 1
//! (2 for a refused token), before it opens anything when it can tell.
//!
//! Logs go to stderr (`--log-format text|json`; colours only on a terminal), with one
//! access line per request; a generated token is printed there too, never on stdout.
//!
//! Simulated harvest: a resource id containing `fail` fails, `panic` panics, `hang` never
//! returns (the per-resource timeout cuts it), anything else succeeds after `--work-ms`.
//! Every route, body and error code, with curl examples: `docs/harvest_server_api.md`.

// The server's parts: `main.rs` flags, start and stop; `api.rs` the routes; `errors.rs`
// errors as JSON and the extractors that answer with them; `streams.rs` the event streams;
// `tests.rs` the HTTP and browser tests; `assets/` the page.
mod api;
mod errors;
mod http;
mod streams;
mod timeline;

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
    SessionQuery, SessionRequest, SessionStatus, SessionStore, SqliteStore, StartError, StoreError,
    Supervisor, SupervisorConfig, finalizer_fn, harvest_fn,
};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use api::*;
use errors::*;
use streams::*;

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
    /// Bearer token for the read routes (every GET but /healthz and the page: sessions,
    /// history, events, timelines, /now, nodes, metrics; the write token reads too). Unset (and no HARVEST_SERVER_READ_TOKEN): reads are open, as for a
    /// server on loopback. `/healthz` and the page itself are always open.
    #[arg(long, env = "HARVEST_SERVER_READ_TOKEN")]
    read_token: Option<String>,
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
    /// Most event streams open at once; past it, `429` (1 to 100,000: each holds a
    /// connection and a file descriptor).
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    max_streams: u32,
    /// Also serve `/healthz` and `/metrics` on this port (same host), from a thread of
    /// their own: health checks and scrapes are then answered promptly however busy the
    /// main port and the runtime are.
    #[arg(long, value_name = "PORT")]
    admin_port: Option<u16>,
    /// Session starts created at once; more wait their turn, so that a burst of starts
    /// leaves the running sessions more of their pace (the library's
    /// `max_concurrent_starts`, 1 to 10,000).
    #[arg(long, default_value_t = 4)]
    max_concurrent_starts: usize,
}

/// See `--log-format`.
#[derive(clap::ValueEnum, Debug, Clone, Copy)]
enum LogFormat {
    Text,
    Json,
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

/// The shortest bearer token the server accepts at start.
const MIN_TOKEN_LEN: usize = 16;

/// Refuses an empty or short token (a server with one would reject everything, or accept
/// a guess), and one a client cannot send: an `Authorization` header is read as visible
/// ASCII, so a token with a space, a control character or a non-ASCII letter (`ä`) could
/// never match, and every request would get `401`.
fn check_token(token: &str) -> Result<(), String> {
    let sendable = token.bytes().all(|b| b.is_ascii_graphic());
    if token.len() < MIN_TOKEN_LEN || !sendable {
        return Err(format!(
            "the bearer token must be at least {MIN_TOKEN_LEN} characters of visible ASCII \
             (letters, digits, punctuation; no spaces or other letters) (leave --token and \
             HARVEST_SERVER_TOKEN unset for a random one)"
        ));
    }
    Ok(())
}

/// The session config this server starts sessions with.
fn server_session_config() -> SessionConfig {
    SessionConfig::default()
        .with_per_resource_estimate(Duration::from_millis(200))
        .with_buffer(Duration::from_secs(30))
        .with_resource_timeout(Some(Duration::from_secs(5)))
        .with_monitor_interval(Duration::from_secs(1))
        .with_escalation_grace(Duration::from_secs(5))
        .with_abort_grace(Duration::from_secs(2))
}

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

/// Starts the tree on `store` with simulated harvesters.
async fn supervisor(
    store: Arc<dyn SessionStore>,
    work: Duration,
    config: SupervisorConfig,
) -> Result<Supervisor, Box<dyn std::error::Error>> {
    let harvest = harvest_fn(move |ctx: HarvestContext| async move {
        if ctx.resource_id.contains("hang") {
            std::future::pending::<()>().await;
        }
        // No work is no wait: tokio's timer has a resolution of 1 ms, and a zero sleep
        // would last until its next tick (on a busy runtime, longer).
        if !work.is_zero() {
            tokio::select! {
                () = tokio::time::sleep(work) => {}
                () = ctx.cancel.cancelled() => return Err("cancelled".into()),
            }
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
    Ok(Supervisor::builder(harvest, finalizer)
        .store(store)
        .config(config)
        .start()
        .await?)
}

/// Serves the admin routes (`/healthz`, `/metrics`) on `listener` from a thread and a
/// runtime of their own (see `--admin-port`), until `stop` is cancelled.
fn serve_admin(
    listener: std::net::TcpListener,
    app: App,
    stop: tokio_util::sync::CancellationToken,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    listener.set_nonblocking(true)?;
    std::thread::Builder::new()
        .name("admin-http".into())
        .spawn(move || {
            runtime.block_on(async move {
                match tokio::net::TcpListener::from_std(listener) {
                    Ok(listener) => {
                        http::serve(
                            listener,
                            admin_router(app),
                            stop.cancelled_owned(),
                            http::HEADER_READ_TIMEOUT,
                            CONNECTIONS_GRACE,
                        )
                        .await;
                    }
                    Err(error) => tracing::error!(%error, "the admin listener failed"),
                }
            });
        })
}

/// How long, once the sessions are finalized and the event streams told to end, open
/// connections get to close before the server stops waiting for them (a stream drains
/// for `STREAM_DRAIN` of it).
const CONNECTIONS_GRACE: Duration = Duration::from_secs(5);

/// How long a request's body may take to arrive: a client that declares a body and sends
/// it slowly, or never, gets a `400` rather than hold its connection and task for ever.
const BODY_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves until `shutdown` resolves, then finalizes running sessions and closes the store.
async fn serve(
    listener: tokio::net::TcpListener,
    app: App,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    header_read_timeout: Duration,
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
    // The drain waits for the open connections, and a client can hold one for ever (a
    // stream it does not read, a body it never finishes sending): past
    // `CONNECTIONS_GRACE` after the sessions are finalized, they are left to close with
    // the process, and the store is closed all the same.
    http::serve(
        listener,
        router(app),
        signal,
        header_read_timeout,
        CONNECTIONS_GRACE,
    )
    .await;
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

/// Resolves at the first Ctrl-C (SIGINT) or SIGTERM (what a service manager or a
/// container runtime sends to stop a server), naming it. Both shut down the same way.
fn stop_signal() -> std::io::Result<impl std::future::Future<Output = &'static str>> {
    #[cfg(unix)]
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    Ok(async move {
        #[cfg(unix)]
        {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => "interrupted",
                _ = term.recv() => "terminated",
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
            "interrupted"
        }
    })
}

/// The tree's settings from the command line: checked before anything is opened.
fn supervisor_config(node_name: Option<String>, max_concurrent_starts: usize) -> SupervisorConfig {
    SupervisorConfig::default()
        .with_session(server_session_config())
        .with_recovery(harvest_supervisor::RecoveryPolicy::Finalize)
        .with_node_name(node_name)
        .with_max_concurrent_starts(max_concurrent_starts)
}

/// `error` and its causes, for a person: `a: b: c`.
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause = cause.to_string();
        // Many errors already print their source in their own message.
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
        source = source.and_then(std::error::Error::source);
    }
    text
}

#[tokio::main]
async fn main() {
    if let Err(error) = run(Args::parse()).await {
        // A person reads this (a wrong flag, a busy port, a database that cannot be
        // opened): the message, not a debug dump.
        eprintln!("harvest_server: {}", chain(error.as_ref()));
        std::process::exit(1);
    }
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
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
    if let Some(read) = &args.read_token {
        let refused = check_token(read).err().or_else(|| {
            (read == &token).then(|| "the read token must differ from the write token".to_owned())
        });
        if let Some(why) = refused {
            eprintln!("harvest_server: --read-token: {why}");
            std::process::exit(2);
        }
    }
    // Checked before the store is opened (or a database file made) for a server that
    // would refuse to start.
    let config = supervisor_config(args.node_name.clone(), args.max_concurrent_starts);
    config.validate()?;
    // Bound before the tree starts, so that a port in use stops nothing half started.
    let listener = tokio::net::TcpListener::bind(SocketAddr::new(args.host, args.port))
        .await
        .map_err(|e| format!("cannot listen on {}:{}: {e}", args.host, args.port))?;
    let admin_listener = match args.admin_port {
        Some(port) => Some(
            std::net::TcpListener::bind(SocketAddr::new(args.host, port)).map_err(|e| {
                format!("cannot listen on {}:{port} (--admin-port): {e}", args.host)
            })?,
        ),
        None => None,
    };
    // Installed before the supervisor starts, so that every handle it makes records here.
    let metrics = metrics_handle();
    // Closed at exit: its write-ahead log checkpointed, its reserve of room deleted.
    let mut sqlite = None;
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
            let store = SqliteStore::open(&args.db).await?;
            sqlite = Some(store.clone());
            Arc::new(store)
        }
    };
    let supervisor = supervisor(store, Duration::from_millis(args.work_ms), config).await?;
    println!("serving on http://{}", listener.local_addr()?);
    let app = App {
        supervisor: Arc::new(supervisor),
        token: token.into(),
        read_token: args.read_token.clone().map(Into::into),
        max_resources: args.max_resources,
        defaults: Arc::new(server_session_config()),
        closing: tokio_util::sync::CancellationToken::new(),
        metrics,
        timelines: Arc::new(timeline::Timelines::new()),
        streams: Arc::new(tokio::sync::Semaphore::new(
            usize::try_from(args.max_streams).unwrap_or(usize::MAX),
        )),
    };
    let admin_stop = tokio_util::sync::CancellationToken::new();
    let admin = match admin_listener {
        Some(listener) => {
            println!(
                "admin (/healthz, /metrics) on http://{}",
                listener.local_addr()?
            );
            Some(serve_admin(listener, app.clone(), admin_stop.clone())?)
        }
        None => None,
    };
    let stop_signal = stop_signal()?;
    let served = serve(
        listener,
        app,
        async {
            let signal = stop_signal.await;
            println!("{signal}: shutting down, finalizing running sessions");
        },
        http::HEADER_READ_TIMEOUT,
    )
    .await;
    // The admin port answers until the sessions are finalized and the store closed.
    admin_stop.cancel();
    if let Some(admin) = admin {
        let _ = tokio::task::spawn_blocking(move || admin.join()).await;
    }
    if let Some(store) = sqlite
        && let Err(error) = store.close().await
    {
        tracing::warn!(%error, "the store did not close cleanly");
    }
    served
}

/// The tests' PostgreSQL server (shared with the integration tests).
#[cfg(test)]
#[path = "../../tests/common/pg.rs"]
#[allow(dead_code)]
mod test_pg;

#[cfg(test)]
mod tests;
