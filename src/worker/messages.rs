//! What a `ResourceWorker` says: that an attempt it ran ended, as one
//! `SessionMessage::AttemptEnded` each (how it ended is kept in the session's queue). A worker
//! takes no messages; the session times attempts itself (the queue notes when each
//! started), so a worker reads no clock unless it has a limit to watch.

/// That an attempt ended: how is kept with the attempt in the session's queue, so that
/// a session that finalizes before it reads this still records it. Made only by the
/// library's workers.
#[derive(Debug)]
pub struct AttemptReport {
    /// The attempt's key in the session's queue.
    pub(crate) key: u64,
}

/// How an attempt ended.
#[derive(Debug)]
pub(crate) enum Ended {
    /// The harvest returned, or a limit cut it.
    Report(AttemptResult),
    /// The user's harvest panicked, with the message.
    Panicked(String),
    /// The attempt was dropped before it ended (its worker was killed): not an outcome;
    /// it runs again if the session goes on (a self-fenced node's kill), else it is
    /// unfinished.
    Killed,
}

/// How one attempt ended when it was not a panic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum AttemptResult {
    /// The harvest returned `Ok`.
    Succeeded,
    /// The harvest returned an error.
    Failed(String),
    /// `resource_timeout` or `heartbeat_timeout` cut it (`heartbeat_silent`: the latter,
    /// before its time limit).
    TimedOut {
        /// Cut for a silent heartbeat.
        heartbeat_silent: bool,
    },
    /// The harvest returned an error after its cancellation token fired.
    Cancelled,
}
