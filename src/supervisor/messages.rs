//! Messages of the root `HarvestSupervisor`: the API of the tree for embedders that talk to
//! actors directly. [`crate::Supervisor`] wraps them in async methods.

use ractor::RpcReplyPort;

use crate::config::SessionConfig;
use crate::error::{SessionError, StartError};
use crate::model::{HarvesterId, ResourceId, SessionId, SessionRecord};

/// A session its start task has created in the store, on its way to the root (see
/// [`SupervisorMessage::SessionCreated`]). Opaque: only the supervisor makes one.
pub struct CreatedSession {
    pub(crate) session: super::Created,
    pub(crate) reply: RpcReplyPort<Result<SessionId, StartError>>,
    /// The start's turn (see `max_concurrent_starts`), given back once its actor runs.
    pub(crate) admitted: tokio::sync::OwnedSemaphorePermit,
}

/// Sessions a rescue pass took over, on their way to the root (see
/// [`SupervisorMessage::Rescued`]). Opaque: only the supervisor makes one.
pub struct RescuedSessions(pub(crate) Vec<super::recovery::Recovery>);

impl std::fmt::Debug for RescuedSessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("RescuedSessions")
            .field(&self.0.len())
            .finish()
    }
}

impl std::fmt::Debug for CreatedSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CreatedSession")
            .field("id", &self.session.id)
            .field("harvester_id", &self.session.harvester_id)
            .field("resources", &self.session.resources.len())
            .finish_non_exhaustive()
    }
}

/// A session to start.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct SessionRequest {
    /// The harvester; it must have no active session.
    pub harvester_id: HarvesterId,
    /// The resources, each id once. Empty is fine: the session finishes `finished-all-ok`.
    pub resources: Vec<ResourceId>,
    /// This session's budget; `None` takes the supervisor's default.
    pub config: Option<SessionConfig>,
}

impl SessionRequest {
    /// A request with the supervisor's default budget.
    pub fn new<R: Into<ResourceId>>(
        harvester_id: impl Into<HarvesterId>,
        resources: impl IntoIterator<Item = R>,
    ) -> Self {
        Self {
            harvester_id: harvester_id.into(),
            resources: resources.into_iter().map(Into::into).collect(),
            config: None,
        }
    }

    /// Gives this session its own budget.
    pub fn with_config(mut self, config: SessionConfig) -> Self {
        self.config = Some(config);
        self
    }
}

/// What the root answers. Non-exhaustive: variants are added as the tree's internals need
/// them (most are sent only by the tree itself).
#[derive(Debug)]
#[non_exhaustive]
pub enum SupervisorMessage {
    /// Start a session; `HarvesterBusy` if its harvester has one running. It waits for a
    /// turn first (`SupervisorConfig::max_concurrent_starts`); if the reply port's
    /// receiver is gone by then (the caller gave up), no session is created.
    StartSession(
        Box<SessionRequest>,
        RpcReplyPort<Result<SessionId, StartError>>,
    ),
    /// Abort a session. `UnknownSession`, or `AlreadyFinished` if it is over.
    AbortSession(SessionId, RpcReplyPort<Result<(), SessionError>>),
    /// One session's record, from the store.
    GetSession(SessionId, RpcReplyPort<Result<SessionRecord, SessionError>>),
    /// Every session's record, newest first.
    ListSessions(RpcReplyPort<Result<Vec<SessionRecord>, SessionError>>),
    /// Finalize every running session with `Shutdown`, then stop the root. Replies when
    /// done, or after `shutdown_timeout` at the latest: what has not finished by then is
    /// left to the rescue (the next start's, or a live node's).
    Shutdown(RpcReplyPort<()>),
    /// From the node's lease keeper: the node self-fenced (`true`: it could not renew its
    /// lease in time) or renewed again (`false`). Passed on to every running session.
    /// Embedders never send it.
    Fenced(bool),
    /// Answered once the root has started (its first rescue pass is over).
    /// [`crate::Supervisor`]'s builder waits for it; embedders need not send it.
    Ready(RpcReplyPort<()>),
    /// From [`crate::Supervisor::health`]: the root still takes its messages (see
    /// [`crate::Health::root_unanswered_for`]). Embedders need not send it.
    Pulse,
    /// Self-sent every `rescue_interval` (with jitter): take over the sessions of nodes
    /// whose lease expired. Embedders never send it.
    Rescue,
    /// From a rescue pass's task: sessions it took over, to run again or finalize.
    /// Embedders never send it.
    Rescued(Box<RescuedSessions>),
    /// From a rescue pass's task: the pass ended; the next is scheduled. Embedders never
    /// send it.
    RescuePassEnded,
    /// Self-sent `shutdown_timeout` after `Shutdown`: stop waiting for sessions that have
    /// not finished. Embedders never send it.
    ShutdownDeadline,
    /// From a task of the root's own: its finalization of a session ended. Embedders never
    /// send it.
    RescueFinished {
        /// The session it finalized (or tried to).
        session_id: SessionId,
    },
    /// From the task that created a session in the store (off the root's handler, so that
    /// a slow store never queues the root's other work behind a start): spawn its actor and
    /// answer the caller. Embedders never send it.
    SessionCreated(Box<CreatedSession>),
    /// From a start's task: the creation of this session failed (its caller has the
    /// error). Embedders never send it.
    StartFailed {
        /// The id the session would have had.
        session_id: SessionId,
    },
    /// From a monitor: this session did not finalize within `escalation_grace`; stop its
    /// actor and finalize it from the store.
    Escalate {
        /// The stuck session.
        session_id: SessionId,
    },
}
