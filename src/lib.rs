//! # harvest-supervisor
//!
//! Keeps long-running harvesting sessions from ever getting stuck.
//!
//! A *session* harvests many resources of one remote catalogue (a *harvester*), then runs a
//! *finalizer* that records the outcome and frees the harvester. With a Celery chord, one
//! task that fails, times out or hangs means the finalizer never runs and the session stays
//! "on-going" forever. Here an in-process supervision tree (ractor + tokio) runs the
//! finalizer whatever happens: all done, failures, panics, timeouts, a hung task (the
//! monitor's deadline), an abort, a full disk, or a crash; **exactly once** in a healthy
//! process, and across a crash as [`SessionFinalizer`] says.
//!
//! ```text
//! HarvestSupervisor            root: busy lock, start/abort/query, rescue of last resort
//!  └─ SessionActor             one per running session
//!      ├─ MonitorActor         watchdog: deadline = resources x estimate + buffer
//!      └─ ResourceWorker ...   tasks, at most `max_concurrency`, each running attempts
//!                              one after another from the session's queue
//! ```
//!
//! - [`Supervisor`]: the async handle you hold ([`SupervisorMessage`] if you prefer actors).
//! - [`ResourceHarvester`], [`SessionFinalizer`]: what you implement (or [`harvest_fn`],
//!   [`finalizer_fn`] for closures).
//! - [`SessionConfig`]: the budget and policies, validated up front.
//! - [`SessionStore`]: where sessions, outcomes and events live ([`MemoryStore`] for tests
//!   and single runs, [`SqliteStore`] for a server, and with the `postgres` feature, on
//!   by default, [`store::PostgresStore`] for servers on several machines sharing one
//!   database; its [`store::postgres::PostgresFinalizer`] commits the finalizer's own
//!   writes with the session's terminal status).
//! - [`SessionEvent`]: the structured supervision log, to subscribe to, or read from the
//!   store.
//!
//! - [`Supervisor::follow`]: one session's log, replayed then followed live, whichever
//!   process runs the session.
//!
//! See the [`Supervisor`] docs for a complete example, and [`SessionFinalizer`] for what
//! runs how often across a crash (exactly once in a healthy process; a finalizer a crash
//! interrupted is run again, knowingly, or recorded as interrupted).

#![warn(missing_docs)]

pub mod budget;
pub mod config;
pub mod error;
pub mod events;
mod finalizer;
mod follow;
mod handle;
pub mod harvest;
pub mod meters;
mod millis;
pub mod model;
mod monitor;
mod node;
mod session;
pub mod store;
mod supervisor;
#[cfg(feature = "testing")]
pub mod testing;
mod worker;

pub use budget::{AdaptiveBudget, BudgetSource};
pub use config::{
    FailurePolicy, FinalizerRecovery, RecoveryPolicy, RetryPolicy, SessionConfig, SupervisorConfig,
};
pub use error::{ConfigError, Error, IdError, SessionError, StartError, StoreError};
pub use events::{EventKind, EventSubscription, LiveSignals, RecvError, SessionEvent};
pub use follow::EventFollower;
pub use handle::{Health, SessionDetail, Supervisor, SupervisorBuilder};
pub use harvest::{
    BoxError, HarvestContext, Heartbeat, InCompletion, ResourceHarvester, SessionFinalizer,
    finalizer_fn, harvest_fn,
};
pub use model::{
    Fence, FinalizeReason, HarvesterId, NodeId, OutcomeCounts, OutcomeRecord, ResourceId,
    ResourceOutcome, SessionId, SessionRecord, SessionReport, SessionStatus,
};
pub use store::{MemoryStore, SessionPage, SessionQuery, SessionStore, SqliteStore};
pub use supervisor::{SessionRequest, SupervisorMessage};

/// Compiles the README's code blocks as doc tests, so the embedding example cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
