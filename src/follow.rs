//! [`EventFollower`]: one session's event log, replayed from the store and then followed
//! as it grows, whichever process runs the session.
//!
//! A session this process runs is followed on the in-process bus (no store read per
//! event). One another process runs is read from the store when the store announces new
//! events (PostgreSQL's notifications), or every [`Supervisor::WAIT_POLL`] when it cannot
//! (SQLite, or while the notification connection is down).

use std::collections::VecDeque;
use std::sync::Arc;

use tokio::sync::broadcast::error::RecvError as SignalRecvError;

use crate::error::SessionError;
use crate::events::{EventKind, LiveLogs, RecvError, SessionEvent, SessionSubscription};
use crate::handle::Supervisor;
use crate::model::SessionId;
use crate::store::{SessionStore, StoreSignal, StoreSignals};

/// Events read from the store per page.
const PAGE: usize = 1000;

/// What woke a follower up.
pub(crate) enum Wake {
    /// New events of the session may be in the store (or some announcement was missed,
    /// or announcements resumed after a gap): look.
    Look,
    /// The store makes no more announcements.
    Gone,
}

/// Waits for new events of session `id` to be announced: see [`wake_on`].
pub(crate) async fn store_wake(signals: &mut Option<StoreSignals>, id: SessionId) -> Wake {
    wake_on(signals, |s| *s == StoreSignal::Events(id)).await
}

/// Waits for a store announcement that `wanted` accepts, a gap (a lagging receiver: some
/// may have been missed), or a change of `live` (when announcements resume, some may have
/// been missed; when they stop, the caller polls): each time, look at the store. Pending
/// for ever without signals; `Gone` once the store makes no more.
pub(crate) async fn wake_on(
    signals: &mut Option<StoreSignals>,
    wanted: impl Fn(&StoreSignal) -> bool,
) -> Wake {
    let Some(s) = signals.as_mut() else {
        return std::future::pending().await;
    };
    loop {
        tokio::select! {
            received = s.receiver.recv() => match received {
                Ok(signal) if wanted(&signal) => return Wake::Look,
                Ok(_) => {}
                Err(SignalRecvError::Lagged(_)) => return Wake::Look,
                Err(SignalRecvError::Closed) => {
                    *signals = None;
                    return Wake::Gone;
                }
            },
            changed = s.live.changed() => {
                if changed.is_err() {
                    *signals = None;
                    return Wake::Gone;
                }
                return Wake::Look;
            }
        }
    }
}

/// Sleeps until `at`, or for ever without it.
async fn sleep_until_or_never(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Whether the store's announcements arrive now.
pub(crate) fn listening(signals: &Option<StoreSignals>) -> bool {
    signals.as_ref().is_some_and(|s| *s.live.borrow())
}

/// One session's events, in `seq` order, each once: the stored log first, then what is
/// appended, until `SessionFinished` (after which [`EventFollower::next`] answers `None`).
/// Made by [`Supervisor::follow`].
pub struct EventFollower {
    id: SessionId,
    store: Arc<dyn SessionStore>,
    live: Arc<LiveLogs>,
    /// This session's events as this process publishes them.
    bus: SessionSubscription,
    signals: Option<StoreSignals>,
    poll: tokio::time::Interval,
    buffered: VecDeque<SessionEvent>,
    /// The last `seq` handed out.
    last: u64,
    /// When the session was first seen terminal with nothing new to read (see `next`).
    terminal_since: Option<tokio::time::Instant>,
    done: bool,
}

impl std::fmt::Debug for EventFollower {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventFollower")
            .field("session_id", &self.id)
            .field("last", &self.last)
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

impl EventFollower {
    pub(crate) fn new(
        id: SessionId,
        after: u64,
        store: Arc<dyn SessionStore>,
        live: Arc<LiveLogs>,
        bus: SessionSubscription,
    ) -> Self {
        let signals = store.signals();
        let now = tokio::time::Instant::now();
        let first = now.checked_add(Supervisor::WAIT_POLL).unwrap_or(now);
        let mut poll = tokio::time::interval_at(first, Supervisor::WAIT_POLL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Self {
            id,
            store,
            live,
            bus,
            signals,
            poll,
            buffered: VecDeque::new(),
            last: after,
            terminal_since: None,
            done: false,
        }
    }

    /// The session followed.
    pub fn session_id(&self) -> SessionId {
        self.id
    }

    /// The next event; `None` after `SessionFinished` (or once a finished session's log
    /// has no more). `Err` if the session is unknown or the store fails (the follower can
    /// be asked again: it goes on from the last event it handed out).
    pub async fn next(&mut self) -> Option<Result<SessionEvent, SessionError>> {
        loop {
            if let Some(event) = self.buffered.pop_front() {
                if event.seq <= self.last {
                    continue;
                }
                self.last = event.seq;
                if matches!(event.kind, EventKind::SessionFinished { .. }) {
                    self.done = true;
                    self.buffered.clear();
                }
                return Some(Ok(event));
            }
            if self.done {
                return None;
            }
            // Armed before looking (see `wait_finished`).
            let armed = self.live.left(self.id);
            let page = match self.store.events_after(self.id, self.last, PAGE).await {
                Ok(page) => page,
                Err(e) => return Some(Err(e.into())),
            };
            if !page.is_empty() {
                self.buffered.extend(page);
                self.terminal_since = None;
                continue;
            }
            let here = self.live.is_live(self.id);
            if here && armed.is_none() {
                // Logged here since it was armed (resumed in this process): arm again.
                continue;
            }
            let left = crate::events::left_or_never(armed);
            tokio::pin!(left);
            // Set: the session is terminal and its log has said nothing new since then;
            // it ends when this passes.
            let mut ending: Option<tokio::time::Instant> = None;
            if !here {
                // Nothing new and nobody here logs it. Finished: its owner appends
                // `SessionFinished` just after the terminal status (a commit delay later),
                // so the log may still grow for a moment: it is over once a whole poll
                // interval has passed with nothing new (a log stored by an older version,
                // or cut by a crash, ends without `SessionFinished`). A wake-up alone does
                // not end it: it may announce events already read.
                match self.store.session(self.id).await {
                    Ok(record) if record.status.is_terminal() => {
                        let now = tokio::time::Instant::now();
                        let since = *self.terminal_since.get_or_insert(now);
                        let until = since.checked_add(Supervisor::WAIT_POLL).unwrap_or(since);
                        if now >= until {
                            self.done = true;
                            return None;
                        }
                        ending = Some(until);
                    }
                    Ok(_) => {}
                    Err(e) => return Some(Err(e.into())),
                }
            }
            // Wait for something that can bring new events.
            let listening = listening(&self.signals);
            loop {
                tokio::select! {
                    received = self.bus.recv() => match received {
                        Ok(e) if e.session_id == self.id && e.seq > self.last => {
                            self.buffered.push_back((*e).clone());
                            break;
                        }
                        Ok(_) => {}
                        Err(RecvError::Lagged { .. }) => break,
                        // The tree is gone: what is stored is all there will be here.
                        Err(RecvError::Closed) => {
                            if self.buffered.is_empty() {
                                return match self.store.events_after(self.id, self.last, PAGE).await {
                                    Ok(page) if !page.is_empty() => {
                                        self.buffered.extend(page);
                                        break;
                                    }
                                    Ok(_) => {
                                        self.done = true;
                                        None
                                    }
                                    Err(e) => Some(Err(e.into())),
                                };
                            }
                            break;
                        }
                    },
                    wake = store_wake(&mut self.signals, self.id), if !here => {
                        if matches!(wake, Wake::Look) {
                            break;
                        }
                    }
                    _ = self.poll.tick(), if !here && !listening => break,
                    () = sleep_until_or_never(ending) => break,
                    () = &mut left, if here => break,
                }
            }
        }
    }
}
