//! Public errors, one enum per area, each carrying the ids a caller needs to act.

use std::path::PathBuf;

use thiserror::Error;

use crate::model::{Fence, HarvesterId, NodeId, ResourceId, SessionId, SessionStatus};

/// A configuration value broke a rule.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("invalid config `{field}`: {rule}")]
pub struct ConfigError {
    field: &'static str,
    rule: String,
}

impl ConfigError {
    pub(crate) fn new(field: &'static str, rule: impl Into<String>) -> Self {
        Self {
            field,
            rule: rule.into(),
        }
    }

    /// The field, as written in the config (`"retry.max_attempts"`).
    pub fn field(&self) -> &'static str {
        self.field
    }

    /// The rule it broke, in words.
    pub fn rule(&self) -> &str {
        &self.rule
    }
}

/// An id that cannot name a harvester or a resource: empty or blank, with a control
/// character, or longer than [`crate::model::MAX_ID_BYTES`].
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("invalid {kind} {preview}: {rule}")]
pub struct IdError {
    kind: &'static str,
    /// The id as quoted in the message: escaped, and cut after 64 characters.
    preview: String,
    rule: &'static str,
}

impl IdError {
    pub(crate) fn new(kind: &'static str, id: &str, rule: &'static str) -> Self {
        const SHOWN: usize = 64;
        let mut preview = format!("{:?}", id.chars().take(SHOWN).collect::<String>());
        if id.chars().nth(SHOWN).is_some() {
            preview.push_str(&format!(" (cut; {} bytes in all)", id.len()));
        }
        Self {
            kind,
            preview,
            rule,
        }
    }

    /// Which id: `"harvester_id"` or `"resource_id"`.
    pub fn kind(&self) -> &'static str {
        self.kind
    }

    /// The rule it broke, in words.
    pub fn rule(&self) -> &'static str {
        self.rule
    }
}

/// A [`crate::SessionStore`] could not do what was asked.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum StoreError {
    /// No session with this id is stored.
    #[error("unknown session {session_id}")]
    UnknownSession {
        /// The id asked for.
        session_id: SessionId,
    },
    /// The harvester already has an active session.
    #[error("harvester {harvester_id} is busy with session {session_id}")]
    HarvesterBusy {
        /// The harvester.
        harvester_id: HarvesterId,
        /// Its running session.
        session_id: SessionId,
    },
    /// The session's finalization was already claimed; it takes no more outcomes.
    #[error("session {session_id} is already finalizing or finalized")]
    Finalizing {
        /// The session.
        session_id: SessionId,
    },
    /// The session's finalization is not claimed (or it is terminal already): a step of
    /// finalization that needs a claim was refused, changing nothing.
    #[error("session {session_id} is not claimed for finalization")]
    NotClaimed {
        /// The session.
        session_id: SessionId,
    },
    /// The write carried a fence that is not the session's: its node lost the session (it
    /// was taken over while the node could not renew its lease, e.g. a paused process).
    /// Nothing was changed.
    #[error("session {session_id} is fenced: the write came from {fence}, the session is held by {}", .holder.map_or_else(|| "nobody".to_owned(), |h| h.to_string()))]
    Fenced {
        /// The session.
        session_id: SessionId,
        /// The fence the write carried.
        fence: Fence,
        /// The session's current owner and epoch (`None`: no owner, a session stored
        /// before nodes existed).
        holder: Option<Fence>,
    },
    /// The node's lease has expired (by the store's clock): a node that may be a zombie
    /// takes nothing over until it has renewed.
    #[error("the lease of node {node} has expired")]
    LeaseExpired {
        /// The node.
        node: NodeId,
    },
    /// The file is not a harvest-supervisor database (another format, or another
    /// application's SQLite database). It was left untouched.
    #[error("{}: not a harvest-supervisor database; the file was left untouched", .path.display())]
    NotADatabase {
        /// The file.
        path: PathBuf,
    },
    /// The file was written by a newer version of this library. It was left untouched.
    #[error("{}: schema version {found} is newer than this build supports ({supported})", .path.display())]
    SchemaTooNew {
        /// The file.
        path: PathBuf,
        /// Its schema version.
        found: i64,
        /// The newest version this build knows.
        supported: i64,
    },
    /// The disk under the database is full: the store has let its reserve of room go to
    /// the writes that keep nodes and sessions alive (lease renewals, claims, completions)
    /// and refuses the rest (events, outcomes, new sessions) until there is room for the
    /// reserve again (see `SqliteOptions::disk_reserve`). Transient: sessions keep what
    /// was refused in memory and finalize from there.
    #[error(
        "{}: the disk is full: events, outcomes and new sessions are not written until there is room again for the store's reserve ({reserve_bytes} bytes)",
        .path.display()
    )]
    DiskFull {
        /// The database file.
        path: PathBuf,
        /// The room the store waits for.
        reserve_bytes: u64,
    },
    /// The file (or its folder) cannot be written.
    #[error("{}: the database is read-only", .path.display())]
    ReadOnly {
        /// The file.
        path: PathBuf,
    },
    /// Another process holds the database locked for longer than the busy timeout.
    #[error("{}: the database is locked by another connection", .path.display())]
    Locked {
        /// The file.
        path: PathBuf,
    },
    /// The database file could not be opened or prepared.
    #[error("{}: {source}", .path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// What the database said.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The database server could not be reached (refused, unknown host, timed out), or the
    /// connection to it was lost while connecting. Transient: it may come back.
    #[error("{target}: the database server cannot be reached: {source}")]
    Unreachable {
        /// The server and database (`host:port/dbname`; never a password).
        target: String,
        /// What the driver said.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The database server refused the credentials.
    #[error("{target}: authentication failed for user {user:?}")]
    AuthenticationFailed {
        /// The server and database (`host:port/dbname`).
        target: String,
        /// The user it tried.
        user: String,
    },
    /// The database named in the connection does not exist on the server.
    #[error("{target}: database {database:?} does not exist")]
    UnknownDatabase {
        /// The server (`host:port`).
        target: String,
        /// The database asked for.
        database: String,
    },
    /// The store's schema in the database holds tables that are not ours (another
    /// application's table of the same name, or our tables without our version mark). Left
    /// untouched.
    #[error(
        "{target}: schema {schema:?} holds table {table:?}, which is not a harvest-supervisor table; the schema was left untouched"
    )]
    ForeignSchema {
        /// The server and database.
        target: String,
        /// The store's schema.
        schema: String,
        /// The table found.
        table: String,
    },
    /// The store's schema in the database was written by a newer version of this library.
    /// Left untouched.
    #[error(
        "{target}: schema {schema:?} is at version {found}, newer than this build supports ({supported}); it was left untouched"
    )]
    DatabaseSchemaTooNew {
        /// The server and database.
        target: String,
        /// The store's schema.
        schema: String,
        /// Its version.
        found: i64,
        /// The newest version this build knows.
        supported: i64,
    },
    /// The store's options are out of bounds; nothing was opened.
    #[error("invalid store option: {0}")]
    InvalidOptions(#[source] ConfigError),
    /// The store's writer is gone (the store was closed, or its thread died).
    #[error("the store is closed")]
    Closed,
    /// The backend failed (I/O, database, serialization).
    #[error("store backend failed: {0}")]
    Backend(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl StoreError {
    /// Whether trying again may pass: the backend failed, the database is locked, its
    /// file or its disk is in trouble (full), its server cannot be reached. An answer the
    /// store gave (unknown session, fenced, busy, ...) is not transient.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            StoreError::Backend(_)
                | StoreError::Locked { .. }
                | StoreError::File { .. }
                | StoreError::DiskFull { .. }
                | StoreError::Unreachable { .. }
        )
    }
}

/// A session could not be started.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum StartError {
    /// One active session per harvester: this one is running.
    #[error("harvester {harvester_id} is busy with session {session}")]
    HarvesterBusy {
        /// The harvester asked for.
        harvester_id: HarvesterId,
        /// The session that holds it.
        session: SessionId,
    },
    /// The same resource id appears twice in the request.
    #[error("resource id {resource_id} appears more than once")]
    DuplicateResource {
        /// The repeated id.
        resource_id: ResourceId,
    },
    /// The request's budget is invalid.
    #[error(transparent)]
    InvalidConfig(#[from] ConfigError),
    /// The harvester id or a resource id is not a valid id.
    #[error(transparent)]
    InvalidId(#[from] IdError),
    /// The store refused or failed.
    #[error("store: {0}")]
    Store(#[source] StoreError),
    /// The session actor could not be spawned; the session was finalized as crashed.
    #[error("could not spawn the session actor for {session_id}: {message}")]
    Spawn {
        /// The session that was created and then finalized.
        session_id: SessionId,
        /// ractor's spawn error.
        message: String,
    },
    /// The supervisor is not running (shut down, or its actor died).
    #[error("the supervisor is not running")]
    SupervisorDown,
}

impl From<StoreError> for StartError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::HarvesterBusy {
                harvester_id,
                session_id,
            } => Self::HarvesterBusy {
                harvester_id,
                session: session_id,
            },
            other => Self::Store(other),
        }
    }
}

/// A question or command about one session failed.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum SessionError {
    /// No session with this id.
    #[error("unknown session {session_id}")]
    UnknownSession {
        /// The id asked for.
        session_id: SessionId,
    },
    /// The session already ended: abort changes nothing.
    #[error("session {session_id} is already {status}")]
    AlreadyFinished {
        /// The session.
        session_id: SessionId,
        /// Its terminal status, as stored.
        status: SessionStatus,
    },
    /// The session is being finalized (its finalizer runs, or the supervisor is finishing
    /// it after a crash or an escalation): abort changes nothing; it ends with the reason
    /// it is being finalized for.
    #[error("session {session_id} is being finalized")]
    Finalizing {
        /// The session.
        session_id: SessionId,
    },
    /// The store failed.
    #[error("store: {0}")]
    Store(#[source] StoreError),
    /// The supervisor is not running.
    #[error("the supervisor is not running")]
    SupervisorDown,
}

impl From<StoreError> for SessionError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::UnknownSession { session_id } => Self::UnknownSession { session_id },
            other => Self::Store(other),
        }
    }
}

/// Any error of this crate.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum Error {
    /// See [`ConfigError`].
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// See [`StoreError`].
    #[error(transparent)]
    Store(#[from] StoreError),
    /// See [`StartError`].
    #[error(transparent)]
    Start(#[from] StartError),
    /// See [`SessionError`].
    #[error(transparent)]
    Session(#[from] SessionError),
    /// The root actor could not be spawned.
    #[error("could not spawn the supervisor: {0}")]
    Spawn(String),
    /// The supervisor is not running.
    #[error("the supervisor is not running")]
    SupervisorDown,
}
