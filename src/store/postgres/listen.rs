//! The store's ear: one connection of its own (a pooled one would drop notifications) that
//! `LISTEN`s for new events and abort requests of the store's schema, from every process,
//! and announces them as [`StoreSignal`]s.
//!
//! When the connection drops, `live` turns false (followers poll meanwhile) and it
//! reconnects with backoff (100 ms doubling to 10 s, with jitter so that many nodes do not
//! knock at once); back, `live` turns true and followers look once for what they missed.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::{broadcast, watch};
use tokio_postgres::{AsyncMessage, Config, NoTls};
use tokio_util::sync::CancellationToken;

use crate::model::{NodeId, SessionId};
use crate::store::{StoreSignal, StoreSignals};

/// Announcements buffered per receiver before it lags.
const CAPACITY: usize = 4096;
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// The channels of a schema: new events (payload: a session id) and abort requests
/// (payload: the owner node's id).
pub(crate) fn channels(schema: &str) -> (String, String) {
    (format!("{schema}_events"), format!("{schema}_aborts"))
}

/// The listener; it stops when the last clone of the store drops it.
pub(crate) struct Listener {
    cancel: CancellationToken,
    tx: broadcast::Sender<StoreSignal>,
    live: watch::Receiver<bool>,
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

impl Listener {
    /// Starts listening on the current runtime.
    pub(crate) fn spawn(config: Config, schema: &str) -> Arc<Self> {
        let (tx, _) = broadcast::channel(CAPACITY);
        let (live_tx, live) = watch::channel(false);
        let cancel = CancellationToken::new();
        tokio::spawn(run(
            config,
            channels(schema),
            tx.clone(),
            live_tx,
            cancel.clone(),
        ));
        Arc::new(Self { cancel, tx, live })
    }

    pub(crate) fn signals(&self) -> StoreSignals {
        StoreSignals {
            receiver: self.tx.subscribe(),
            live: self.live.clone(),
        }
    }

    /// Stops listening.
    pub(crate) fn close(&self) {
        self.cancel.cancel();
    }
}

async fn run(
    config: Config,
    (events, aborts): (String, String),
    tx: broadcast::Sender<StoreSignal>,
    live: watch::Sender<bool>,
    cancel: CancellationToken,
) {
    let mut backoff = FIRST_BACKOFF;
    loop {
        let listened = tokio::select! {
            () = cancel.cancelled() => return,
            r = listen(&config, &events, &aborts, &tx, &live) => r,
        };
        live.send_replace(false);
        match listened {
            Ok(()) => backoff = FIRST_BACKOFF,
            Err(error) => tracing::warn!(
                %error,
                retry_in = ?backoff,
                "store: not listening for notifications (followers poll meanwhile); reconnecting"
            ),
        }
        let wait = backoff.saturating_add(crate::node::jitter(backoff / 4));
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
        backoff = backoff.saturating_mul(2).min(MAX_BACKOFF);
    }
}

/// Connects, listens, and announces until the connection ends (`Ok` once it had been
/// listening: the next try starts from the first backoff).
async fn listen(
    config: &Config,
    events: &str,
    aborts: &str,
    tx: &broadcast::Sender<StoreSignal>,
    live: &watch::Sender<bool>,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let (client, mut connection) = config.connect(NoTls).await?;
    let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
    let sql = format!("LISTEN \"{events}\"; LISTEN \"{aborts}\"");
    let subscribe = client.batch_execute(&sql);
    tokio::pin!(subscribe);
    let mut subscribed = false;
    loop {
        tokio::select! {
            done = &mut subscribe, if !subscribed => {
                done?;
                subscribed = true;
                live.send_replace(true);
                tracing::debug!(events, aborts, "store: listening for notifications");
            }
            message = messages.next() => match message {
                Some(Ok(AsyncMessage::Notification(n))) => {
                    let payload = uuid::Uuid::parse_str(n.payload());
                    let signal = match (n.channel(), payload) {
                        (c, Ok(id)) if c == events => StoreSignal::Events(SessionId(id)),
                        (c, Ok(id)) if c == aborts => StoreSignal::AbortRequested(NodeId(id)),
                        _ => continue,
                    };
                    // No receiver is not an error: nobody follows anything right now.
                    let _ = tx.send(signal);
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e.into()),
                None if subscribed => return Ok(()),
                None => return Err("the connection closed before it listened".into()),
            }
        }
    }
}
