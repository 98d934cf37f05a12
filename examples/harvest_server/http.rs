//! The HTTP server loop: axum's router on hyper, with the timeouts `axum::serve` leaves
//! out.
//!
//! `axum::serve` gives hyper no timer, so hyper's header-read timeout is off: a client
//! that sends its request headers slowly, or never, and every idle keep-alive
//! connection, held a file descriptor and a task for ever. Here each connection gets
//! tokio's timer and `header_read_timeout`, which hyper applies whenever a connection
//! waits for a request's head, so it closes idle connections too (a long response, such
//! as an event stream, is not waiting for a head and is not cut). Otherwise as
//! `axum::serve`, but HTTP/1 only (the page, curl and every client speak it; HTTP/2
//! without TLS is rare, and its detection waited for a silent connection for ever) and
//! without upgrades (no route uses one), with a graceful stop that lets requests in
//! flight finish; past `grace`, the connections still open are left to close with the
//! process.

use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;

/// How long a connection may take to send a request's head, and stay idle between
/// requests.
pub(crate) const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves `router` on `listener` until `stop` resolves; then stops accepting and waits
/// for the open connections to finish, at most `grace` (and says so if some had to be
/// left open).
pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    router: axum::Router,
    stop: impl Future<Output = ()>,
    header_read_timeout: Duration,
    grace: Duration,
) {
    // HTTP/1 only, and without upgrades (no route upgrades; an event stream is a plain
    // response): the `auto` builder's sniffing for HTTP/2's preface, which the upgrading
    // form always does, waits for the first bytes with no timeout, so a connection that
    // never sends any would be held for ever.
    let mut builder = Builder::new(TokioExecutor::new()).http1_only();
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout);
    let connections = GracefulShutdown::new();
    tokio::pin!(stop);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut stop => break,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            // A connection that failed before it was accepted: the next one is fine.
            Err(error)
                if matches!(
                    error.kind(),
                    std::io::ErrorKind::ConnectionAborted
                        | std::io::ErrorKind::ConnectionReset
                        | std::io::ErrorKind::ConnectionRefused
                ) =>
            {
                continue;
            }
            Err(error) => {
                // The process is out of something (descriptors: EMFILE): wait a little
                // before the next try, as axum does.
                tracing::warn!(%error, "could not accept a connection");
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    () = &mut stop => break,
                }
            }
        };
        let service = TowerToHyperService::new(router.clone());
        let connection = builder
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        let connection = connections.watch(connection);
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(error = %error, "connection ended with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(grace, connections.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            grace_secs = grace.as_secs(),
            "connections still open after the grace: left to close with the process"
        );
    }
}
