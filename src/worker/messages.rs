//! What a `ResourceWorker` says. It takes no commands: it runs one attempt from `post_start`
//! and stops. Its report travels in its final state, which ractor hands to the SessionActor
//! inside `SupervisionEvent::ActorTerminated`, so the report and the worker's exit arrive as
//! one event and can never be seen out of order. A panic arrives as `ActorFailed` instead.
//! The session times attempts itself (it knows when it spawned the worker and when it heard
//! of its exit), so a worker reads no clock unless it has a limit to watch.

/// A worker takes no messages (the enum has no variants).
#[derive(Debug)]
pub(crate) enum WorkerMessage {}

/// How one attempt ended (a panic is reported by ractor, not here).
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
