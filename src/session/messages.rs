//! Messages of the `SessionActor`.

use ractor::RpcReplyPort;

use crate::error::SessionError;

/// What a SessionActor is told.
#[derive(Debug)]
#[non_exhaustive]
pub enum SessionMessage {
    /// From one of its workers: an attempt ended (made only by the library's workers).
    AttemptEnded(crate::worker::AttemptReport),
    /// From the monitor: `started + workflow_time` has passed. Finalizes with
    /// `DeadlineExpired`; unfinished resources count as `TimedOut`.
    DeadlineExpired,
    /// From the root: abort the session (cooperative cancel first, stop after `abort_grace`).
    AbortSession(RpcReplyPort<Result<(), SessionError>>),
    /// Self-sent `abort_grace` after an abort: stop the workers still running and finalize.
    AbortGraceElapsed,
    /// Self-sent when a retry's backoff is over: the resource may start its next attempt.
    RetryDue {
        /// Index of the resource in the session's list.
        index: usize,
    },
    /// From the root: the node self-fenced (it could not renew its lease in time): start
    /// no attempt, cancel those running (and stop them after `abort_grace`).
    LeaseLost,
    /// Self-sent `abort_grace` after `LeaseLost`: stop the attempts still running.
    FenceGraceElapsed,
    /// From the root: the node renewed its lease; attempts start again (those cut by the
    /// fence first, under their attempt numbers).
    LeaseRenewed,
    /// From the root: the store says another node owns the session now. Stop without
    /// finalizing.
    TakenOver,
    /// Self-sent when the session's first write (pending to on-going) failed for a reason
    /// that may pass (a full disk, a lost connection): try again. Nothing starts until it
    /// passes; the monitor's deadline runs meanwhile.
    BeginDue,
    /// Self-sent when the monitor could not be spawned: try again.
    RespawnMonitor,
    /// From the root: the supervisor shuts down; finalize now with `Shutdown`.
    Shutdown,
}
