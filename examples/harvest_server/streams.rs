//! `GET /sessions/{id}/events`: Server-Sent Events, through the library's follower.

use super::*;

/// How long an open event stream may still send what is logged once the server stops.
pub(crate) const STREAM_DRAIN: Duration = Duration::from_secs(2);

/// The stored log first, then each new event, until `SessionFinished`: whichever server
/// runs the session (several may share one database), through the library's follower,
/// which reads the store page by page and only when something new may be there.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct EventsQuery {
    /// Only events after this `seq` (the page's summary ends there).
    after: Option<u64>,
}

pub(crate) async fn events(
    State(app): State<App>,
    SessionPath(id): SessionPath,
    JsonQuery(q): JsonQuery<EventsQuery>,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    // Where to go on from: `?after=`, else a reconnecting client's `Last-Event-ID` (the
    // `seq` of the last event it got), else the start.
    let after = match q.after {
        Some(after) => after,
        None => match headers.get("last-event-id") {
            None => 0,
            Some(v) => v
                .to_str()
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .ok_or_else(|| bad_request("Last-Event-ID", "not an event's seq"))?,
        },
    };
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
    // An unknown session is a 404, not an empty stream.
    app.supervisor.session(id).await?;
    let mut follower = app.supervisor.follow(id, after);
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
                    // A client that does not read fills the channel: the send waits, but
                    // never past the server's stop (the client resumes elsewhere from
                    // its `Last-Event-ID`).
                    let event = send(&e);
                    let sent = match drain_until {
                        None => {
                            let sending = tx.send(event);
                            tokio::pin!(sending);
                            tokio::select! {
                                // A send that can go goes first: the stop only bounds it.
                                biased;
                                sent = &mut sending => sent.is_ok(),
                                () = closing.cancelled() => {
                                    let until = tokio::time::Instant::now() + STREAM_DRAIN;
                                    drain_until = Some(until);
                                    matches!(
                                        tokio::time::timeout_at(until, sending).await,
                                        Ok(Ok(()))
                                    )
                                }
                            }
                        }
                        Some(until) => matches!(
                            tokio::time::timeout_at(until, tx.send(event)).await,
                            Ok(Ok(()))
                        ),
                    };
                    if !sent {
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
pub(crate) fn async_stream<F, Fut>(produce: F) -> impl Stream<Item = Result<Event, Infallible>>
where
    F: FnOnce(tokio::sync::mpsc::Sender<Event>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(produce(tx));
    futures::StreamExt::map(tokio_stream::wrappers::ReceiverStream::new(rx), Ok)
}
