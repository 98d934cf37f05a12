//! The PostgreSQL store: sessions shared by processes on several machines, with the
//! database as the coordinator (no cluster protocol of our own).
//!
//! - `tokio-postgres` with a `deadpool-postgres` pool for reads and the few writes a
//!   session makes once (create, transitions, claim, completion), and a connection of its
//!   own for the group commit of outcomes and events (see `postgres/writer.rs`);
//! - the tables in a schema of their own (default `harvest_supervisor`) beside the
//!   application's, versioned and migrated forward (see `postgres/schema.rs`);
//! - the busy lock is a unique partial index; every compare-and-set (claim, finalizer
//!   started, completion, transitions) runs under the session's row lock and checks the
//!   writer's fence, so the exactly-once guard and fencing hold across machines;
//! - leases and their expiry are compared with the database's clock (`now()`), never a
//!   node's; a takeover is one transaction that skips rows another rescuer holds (`FOR
//!   UPDATE SKIP LOCKED`): one winner per session, no leader to get stuck.
//!
//! What a crash can lose: nothing acknowledged. Events are appended without waiting;
//! those not yet committed (at most `commit_delay` worth) can be lost by a crash, and
//! those a lost connection kept from being written are retried with the next batch.

mod finalizer;
mod listen;
mod rows;
mod schema;
mod writer;

use std::collections::HashSet;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::config::Host;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Config, NoTls};

use crate::config::SessionConfig;
use crate::error::{ConfigError, StoreError};
use crate::events::SessionEvent;
use crate::harvest::InCompletion;
use crate::model::SessionReport;
use crate::model::{
    Fence, FinalizeReason, HarvesterId, NodeId, OutcomeRecord, ResourceId, SessionId,
    SessionRecord, SessionStatus,
};
use crate::store::line::event_of_line;
use crate::store::{
    Claim, Completed, Completion, MAX_EVENT_PAGE, NODE_RETENTION, NewSession, NodeInfo, NodeRecord,
    OutcomeReceipt, ProcessId, SessionPage, SessionQuery, SessionStore, TakenOver,
    derived_outcomes,
};
use rows::{
    NODE_COLUMNS, OUTCOME_COLUMNS, RECORD_COLUMNS, backend, check_fence, count, get, millis, nanos,
    node_row, outcome_columns, outcome_row, pool, record, text, usize_of,
};
use schema::qualify;
use writer::{Target, Writer};

pub use finalizer::{PostgresFinalizer, TransactionalFinalizer};
/// The driver, as this crate uses it: a [`TransactionalFinalizer`] writes through its
/// [`tokio_postgres::Transaction`].
pub use tokio_postgres;

/// How to reach the database, and the store's settings. Built from a URL
/// ([`PostgresOptions::from_url`]) or the standard `PG*` variables
/// ([`PostgresOptions::from_env`]), then adjusted with its setters.
#[derive(Clone)]
pub struct PostgresOptions {
    config: Config,
    schema: String,
    pool_size: usize,
    commit_delay: Duration,
    connect_timeout: Duration,
    lock_timeout: Duration,
}

impl std::fmt::Debug for PostgresOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the password.
        f.debug_struct("PostgresOptions")
            .field("target", &target_of(&self.config))
            .field("schema", &self.schema)
            .field("pool_size", &self.pool_size)
            .field("commit_delay", &self.commit_delay)
            .field("connect_timeout", &self.connect_timeout)
            .field("lock_timeout", &self.lock_timeout)
            .finish()
    }
}

impl PostgresOptions {
    /// The schema the store's tables live in by default.
    pub const DEFAULT_SCHEMA: &'static str = "harvest_supervisor";
    /// The largest pool.
    pub const MAX_POOL_SIZE: usize = 1024;
    /// The longest `commit_delay`: it is the most of the audit trail a crash can lose.
    pub const MAX_COMMIT_DELAY: Duration = Duration::from_secs(1);
    /// The longest `connect_timeout`.
    pub const MAX_CONNECT_TIMEOUT: Duration = Duration::from_secs(3600);

    /// Options for the database a connection URL names: `postgres://user:password@host:
    /// port/dbname?...` or the key-value form (`host=/run/postgresql dbname=geonode`).
    /// `InvalidOptions` (field `url`) if it does not parse; nothing is connected yet.
    pub fn from_url(url: &str) -> Result<Self, StoreError> {
        let config = Config::from_str(url).map_err(|e| {
            // The driver's parse errors do not echo the URL, so no password leaks here.
            StoreError::InvalidOptions(ConfigError::new("url", e.to_string()))
        })?;
        Ok(Self::with_config(config))
    }

    /// Options from the standard variables: `PGHOST` (a host name or a socket folder),
    /// `PGPORT`, `PGUSER`, `PGPASSWORD`, `PGDATABASE`, `PGAPPNAME`, `PGCONNECT_TIMEOUT`.
    /// Unset ones take libpq's defaults (`localhost`, 5432, the user `postgres`).
    pub fn from_env() -> Result<Self, StoreError> {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// [`PostgresOptions::from_env`] with the variables looked up by `lookup` (an empty
    /// value counts as unset, as libpq does).
    fn from_vars(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, StoreError> {
        let var = |name: &str| lookup(name).filter(|v| !v.is_empty());
        let mut config = Config::new();
        config.host(var("PGHOST").as_deref().unwrap_or("localhost"));
        if let Some(port) = var("PGPORT") {
            let port = port.parse::<u16>().map_err(|_| {
                StoreError::InvalidOptions(ConfigError::new(
                    "PGPORT",
                    format!("{port:?} is not a port number"),
                ))
            })?;
            config.port(port);
        }
        config.user(var("PGUSER").as_deref().unwrap_or("postgres"));
        if let Some(password) = var("PGPASSWORD") {
            config.password(password);
        }
        if let Some(db) = var("PGDATABASE") {
            config.dbname(db);
        }
        if let Some(app) = var("PGAPPNAME") {
            config.application_name(app);
        }
        let mut options = Self::with_config(config);
        if let Some(seconds) = var("PGCONNECT_TIMEOUT") {
            let seconds = seconds.parse::<u64>().map_err(|_| {
                StoreError::InvalidOptions(ConfigError::new(
                    "PGCONNECT_TIMEOUT",
                    format!("{seconds:?} is not a number of seconds"),
                ))
            })?;
            options.connect_timeout = Duration::from_secs(seconds);
        }
        Ok(options)
    }

    fn with_config(mut config: Config) -> Self {
        if config.get_application_name().is_none() {
            config.application_name("harvest-supervisor");
        }
        Self {
            config,
            schema: Self::DEFAULT_SCHEMA.to_owned(),
            pool_size: 8,
            commit_delay: Duration::from_millis(5),
            connect_timeout: Duration::from_secs(10),
            lock_timeout: Duration::from_secs(10),
        }
    }

    /// The schema for the store's tables (created if missing): a lower-case identifier.
    #[must_use]
    pub fn schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = schema.into();
        self
    }

    /// How many pooled connections at most (reads and session writes); the group commit
    /// and the notification listener have one each besides. Default 8.
    #[must_use]
    pub fn pool_size(mut self, size: usize) -> Self {
        self.pool_size = size;
        self
    }

    /// How long a batch of event appends alone waits for company before committing.
    /// Default 5 ms.
    #[must_use]
    pub fn commit_delay(mut self, delay: Duration) -> Self {
        self.commit_delay = delay;
        self
    }

    /// How long connecting may take before it fails as unreachable. Default 10 s.
    #[must_use]
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How long one of the store's transactions may sit idle (its process paused, its
    /// machine cut off) before the server ends it and frees the rows it locked. Default
    /// 10 s. Keep it below the supervisor's `lease_ttl`: a paused node's locks must not
    /// outlast its lease, or they would hold up the takeover of its sessions.
    #[must_use]
    pub fn lock_timeout(mut self, timeout: Duration) -> Self {
        self.lock_timeout = timeout;
        self
    }

    /// The server and database, as errors and logs name them (`host:port/dbname`; never
    /// the password).
    pub fn target(&self) -> String {
        target_of(&self.config)
    }

    /// The schema the tables live in.
    pub fn schema_name(&self) -> &str {
        &self.schema
    }

    /// Checks every setting against its bounds.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !schema::valid_schema(&self.schema) {
            return Err(ConfigError::new(
                "schema",
                format!(
                    "{:?} is not a lower-case SQL identifier ([a-z_][a-z0-9_]*, at most 63 \
                     bytes, not pg_*)",
                    self.schema
                ),
            ));
        }
        if self.pool_size == 0 || self.pool_size > Self::MAX_POOL_SIZE {
            return Err(ConfigError::new(
                "pool_size",
                format!(
                    "must be from 1 to {} (got {})",
                    Self::MAX_POOL_SIZE,
                    self.pool_size
                ),
            ));
        }
        for (field, value, max) in [
            ("commit_delay", self.commit_delay, Self::MAX_COMMIT_DELAY),
            (
                "connect_timeout",
                self.connect_timeout,
                Self::MAX_CONNECT_TIMEOUT,
            ),
            ("lock_timeout", self.lock_timeout, Self::MAX_CONNECT_TIMEOUT),
        ] {
            if value > max {
                return Err(ConfigError::new(
                    field,
                    format!(
                        "must be at most {} (got {})",
                        humantime::format_duration(max),
                        humantime::format_duration(value)
                    ),
                ));
            }
        }
        for (field, value) in [
            ("connect_timeout", self.connect_timeout),
            ("lock_timeout", self.lock_timeout),
        ] {
            if value < Duration::from_millis(1) {
                return Err(ConfigError::new(field, "must be at least 1ms"));
            }
        }
        Ok(())
    }
}

/// `host:port/dbname`, for messages.
fn target_of(config: &Config) -> String {
    let host = match config.get_hosts().first() {
        Some(Host::Tcp(h)) => h.clone(),
        #[cfg(unix)]
        Some(Host::Unix(p)) => p.display().to_string(),
        None => "localhost".to_owned(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let db = config
        .get_dbname()
        .or(config.get_user())
        .unwrap_or("postgres");
    format!("{host}:{port}/{db}")
}

/// Sessions in a PostgreSQL database, shared by every process that opens it.
///
/// ```no_run
/// use harvest_supervisor::store::{PostgresStore, SessionStore};
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let store = PostgresStore::connect("postgres://harvester@db.example/geonode").await?;
/// println!("{} sessions", store.list_sessions().await?.len());
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct PostgresStore {
    pool: Pool,
    writer: Writer,
    listener: std::sync::Arc<listen::Listener>,
    schema: String,
    target: String,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore")
            .field("target", &self.target)
            .field("schema", &self.schema)
            .finish_non_exhaustive()
    }
}

/// A driver error met while connecting, as the typed error that names its cause.
fn connect_error(options: &PostgresOptions, e: tokio_postgres::Error) -> StoreError {
    let target = options.target();
    match e.code() {
        Some(c)
            if *c == SqlState::INVALID_PASSWORD
                || *c == SqlState::INVALID_AUTHORIZATION_SPECIFICATION =>
        {
            StoreError::AuthenticationFailed {
                target,
                user: options.config.get_user().unwrap_or_default().to_owned(),
            }
        }
        Some(c) if *c == SqlState::INVALID_CATALOG_NAME => StoreError::UnknownDatabase {
            target: target
                .rsplit_once('/')
                .map_or(target.clone(), |(server, _)| server.to_owned()),
            database: options
                .config
                .get_dbname()
                .or(options.config.get_user())
                .unwrap_or_default()
                .to_owned(),
        },
        Some(_) => StoreError::Backend(Box::new(e)),
        None => StoreError::Unreachable {
            target,
            source: Box::new(e),
        },
    }
}

impl PostgresStore {
    /// Connects to the database `url` names with default options; see
    /// [`PostgresStore::connect_with`].
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::connect_with(PostgresOptions::from_url(url)?).await
    }

    /// Connects, then creates or migrates the store's schema. A wrong address, password or
    /// database, a schema that is not ours or is newer than this build: each a typed error
    /// naming it, and the database left exactly as it was.
    pub async fn connect_with(options: PostgresOptions) -> Result<Self, StoreError> {
        options.validate().map_err(StoreError::InvalidOptions)?;
        let mut config = options.config.clone();
        config.connect_timeout(options.connect_timeout);
        // A dead server (or a cut network) is noticed within a minute, not TCP's two
        // hours: probes after 30 s of silence, every 5 s, 3 unanswered and it is gone.
        config.keepalives(true);
        config.keepalives_idle(Duration::from_secs(30));
        config.keepalives_interval(Duration::from_secs(5));
        config.keepalives_retries(3);
        // A paused or cut-off process must not hold rows locked past its lease: the server
        // ends a transaction left idle this long (and its connection; the pool makes a
        // new one).
        let mut server_options = config.get_options().unwrap_or_default().to_owned();
        server_options.push_str(&format!(
            " -c idle_in_transaction_session_timeout={}",
            options.lock_timeout.as_millis()
        ));
        config.options(server_options.trim());
        let manager = Manager::from_config(
            config.clone(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(options.pool_size)
            .runtime(Runtime::Tokio1)
            .create_timeout(Some(options.connect_timeout))
            // Every connection busy for this long (a stalled server): a transient error
            // the caller retries with backoff, not a wait without end.
            .wait_timeout(Some(options.connect_timeout))
            .build()
            .map_err(|e| StoreError::Backend(Box::new(e)))?;
        let target = options.target();
        let mut client = match pool.get().await {
            Ok(client) => client,
            Err(deadpool_postgres::PoolError::Backend(e)) => {
                return Err(connect_error(&options, e));
            }
            Err(deadpool_postgres::PoolError::Timeout(_)) => {
                return Err(StoreError::Unreachable {
                    target,
                    source: format!(
                        "no connection within {}",
                        humantime::format_duration(options.connect_timeout)
                    )
                    .into(),
                });
            }
            Err(e) => return Err(rows::pool(e)),
        };
        schema::prepare(&mut client, &options.schema, &target).await?;
        drop(client);
        let listener = listen::Listener::spawn(config.clone(), &options.schema);
        let writer = Writer::spawn(Target {
            config,
            schema: options.schema.clone(),
            commit_delay: options.commit_delay,
            events_channel: listen::channels(&options.schema).0,
        })
        .map_err(|e| StoreError::Backend(Box::new(e)))?;
        Ok(Self {
            pool,
            writer,
            listener,
            schema: options.schema,
            target,
        })
    }

    /// The schema the tables live in.
    pub fn schema(&self) -> &str {
        &self.schema
    }

    /// The server and database (`host:port/dbname`).
    pub fn target(&self) -> &str {
        &self.target
    }

    /// Commits what is queued and closes the connections; every clone is closed.
    pub async fn close(&self) {
        self.writer.close().await;
        self.listener.close();
        self.pool.close();
    }

    fn q(&self, sql: &str) -> String {
        qualify(sql, &self.schema)
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.pool.get().await.map_err(pool)
    }

    /// A pooled connection for a write, after a barrier through the writer: the write
    /// comes after every outcome and event sent before it.
    async fn write_client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.writer.barrier().await;
        self.client().await
    }

    /// One try of [`SessionStore::create_session`].
    async fn try_create(&self, new: &NewSession) -> Result<SessionRecord, StoreError> {
        let config =
            serde_json::to_string(&*new.config).map_err(|e| StoreError::Backend(Box::new(e)))?;
        let chunks: Vec<String> = new
            .resources
            .chunks(RESOURCE_CHUNK)
            .map(serde_json::to_string)
            .collect::<Result<_, _>>()
            .map_err(|e| StoreError::Backend(Box::new(e)))?;
        let firsts: Vec<i64> = (0..chunks.len())
            .map(|n| count(n.saturating_mul(RESOURCE_CHUNK)))
            .collect();
        let schema = self.schema.as_str();
        let (config, chunks, firsts) = (&config, &chunks, &firsts);
        let mut client = self.write_client().await?;
        let txn = client.transaction().await.map_err(backend)?;
        let result = async {
            let tx = &txn;
            {
                let inserted = tx
                    .query_opt(
                        &qualify(
                            "INSERT INTO @.sessions (id, harvester_id, status, total, started, \
                             workflow_time_ns, config, owner, epoch) \
                             VALUES ($1, $2, 'pending', $3, $4, $5, $6, $7, 1) \
                             ON CONFLICT (harvester_id) \
                                 WHERE status IN ('pending', 'on-going', 'aborting') DO NOTHING \
                             RETURNING key",
                            schema,
                        ),
                        &[
                            &new.id.0,
                            &new.harvester_id.as_str(),
                            &count(new.resources.len()),
                            &new.started,
                            &nanos(new.workflow_time),
                            config,
                            &new.owner.0,
                        ],
                    )
                    .await
                    .map_err(backend)?;
                let Some(row) = inserted else {
                    let holder = tx
                        .query_opt(
                            &qualify(
                                &format!(
                                    "SELECT id FROM @.sessions WHERE harvester_id = $1 \
                                     AND status IN {OPEN}"
                                ),
                                schema,
                            ),
                            &[&new.harvester_id.as_str()],
                        )
                        .await
                        .map_err(backend)?;
                    return match holder {
                        Some(row) => Err(StoreError::HarvesterBusy {
                            harvester_id: new.harvester_id.clone(),
                            session_id: SessionId(get(&row, 0)?),
                        }),
                        // Its holder finished between the two statements: try again.
                        None => Err(StoreError::Backend(Box::new(Retry))),
                    };
                };
                let key: i64 = get(&row, 0)?;
                if !chunks.is_empty() {
                    tx.execute(
                        &qualify(
                            "INSERT INTO @.resource_chunks (session_key, first_position, ids) \
                             SELECT $1, f, i FROM unnest($2::int8[], $3::text[]) AS v(f, i)",
                            schema,
                        ),
                        &[&key, firsts, chunks],
                    )
                    .await
                    .map_err(backend)?;
                }
                load(tx, schema, new.id).await
            }
        }
        .await;
        end(txn, result).await
    }

    /// Completes a claimed session, running `work` first in the same transaction (see
    /// `complete_finalization_with`).
    async fn complete(
        &self,
        id: SessionId,
        fence: Fence,
        mut completion: Completion,
        work: Option<(&dyn TransactionalFinalizer, &SessionReport)>,
    ) -> Result<Completed, StoreError> {
        let status = text(&completion.status)?;
        let reason = text(&completion.reason)?;
        let schema = self.schema.as_str();
        let mut client = self.write_client().await?;
        let txn = client.transaction().await.map_err(backend)?;
        let result = async {
            let tx = &txn;
            let before = lock(tx, schema, id).await?;
            check_fence(&before, fence)?;
            if before.status.is_terminal() {
                return Ok(Completed::AlreadyFinalized(before));
            }
            if let Some((work, report)) = work
                && let Some(error) = finalizer::run(tx, work, report).await?
            {
                completion.finalizer_error = Some(error);
            }
            if let Some(error) = &mut completion.finalizer_error
                && error.contains('\0')
            {
                *error = rows::storable(error).into_owned();
            }
            let c = completion.counts;
            // A terminal status also frees the busy lock (a partial unique index of
            // unfinished sessions): only this session's, never a newer one's.
            let row = tx
                .query_one(
                    &qualify(
                        "UPDATE @.sessions SET status = $2, finalizing = $3, ended = $4, \
                         finalizer_error = $5, succeeded = $6, failed = $7, panicked = $8, \
                         timed_out = $9, cancelled = $10, lost = $11 \
                         WHERE id = $1 RETURNING key",
                        schema,
                    ),
                    &[
                        &id.0,
                        &status,
                        &reason,
                        &completion.ended,
                        &completion.finalizer_error,
                        &count(c.succeeded),
                        &count(c.failed),
                        &count(c.panicked),
                        &count(c.timed_out),
                        &count(c.cancelled),
                        &count(c.lost),
                    ],
                )
                .await
                .map_err(backend)?;
            let key: i64 = get(&row, 0)?;
            if !completion.unrecorded.is_empty() {
                // Best effort, in a savepoint: the counts have them either way.
                tx.batch_execute("SAVEPOINT unrecorded")
                    .await
                    .map_err(backend)?;
                match insert_outcomes(tx, schema, key, &completion.unrecorded).await {
                    Ok(_) => tx
                        .batch_execute("RELEASE SAVEPOINT unrecorded")
                        .await
                        .map_err(backend)?,
                    Err(error) => {
                        tracing::warn!(
                            %error,
                            outcomes = completion.unrecorded.len(),
                            "store: the unrecorded outcomes could not be written; \
                             completing without them (the counts have them)"
                        );
                        tx.batch_execute(
                            "ROLLBACK TO SAVEPOINT unrecorded; RELEASE SAVEPOINT unrecorded",
                        )
                        .await
                        .map_err(backend)?;
                    }
                }
            }
            Ok(Completed::Now(load(tx, schema, id).await?))
        }
        .await;
        end(txn, result).await
    }

    /// Events of session `id` after `after`, at most `limit`, by `seq`.
    async fn read_events(
        &self,
        id: SessionId,
        after: u64,
        limit: usize,
    ) -> Result<Vec<SessionEvent>, StoreError> {
        let client = self.client().await?;
        let harvester_id = load(&client, &self.schema, id).await?.harvester_id;
        let sql = self.q("SELECT body FROM @.event_chunks \
             WHERE session_key = (SELECT key FROM @.sessions WHERE id = $1) AND last_seq > $2 \
             ORDER BY first_seq LIMIT 16");
        let mut events: Vec<SessionEvent> = Vec::new();
        loop {
            let last = events.last().map_or(after, |e| e.seq);
            let last_value = i64::try_from(last).unwrap_or(i64::MAX);
            let rows = client
                .query(&sql, &[&id.0, &last_value])
                .await
                .map_err(backend)?;
            if rows.is_empty() {
                return Ok(events);
            }
            for row in &rows {
                let body: &str = get(row, 0)?;
                for line in body.lines() {
                    let event = event_of_line(line, id, &harvester_id)?;
                    // In seq order, once each, whatever chunks overlap.
                    let last = events.last().map_or(after, |e| e.seq);
                    if event.seq > last {
                        events.push(event);
                        if events.len() >= limit {
                            return Ok(events);
                        }
                    }
                }
            }
        }
    }

    /// Makes appended events readable first (they are committed without anyone waiting).
    async fn see_appended_events(&self) {
        if self.writer.events_pending()
            && let Err(error) = self.writer.flush().await
        {
            tracing::debug!(%error, "store: events appended before a read were not committed");
        }
    }

    async fn ids(&self, sql: &str, node: NodeId) -> Result<Vec<SessionId>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(&self.q(sql), &[&node.0])
            .await
            .map_err(backend)?;
        rows.iter()
            .map(|r| get::<uuid::Uuid>(r, 0).map(SessionId))
            .collect()
    }
}

/// The unfinished statuses, as SQL.
const OPEN: &str = "('pending', 'on-going', 'aborting')";

async fn load(
    client: &impl deadpool_postgres::GenericClient,
    schema: &str,
    id: SessionId,
) -> Result<SessionRecord, StoreError> {
    let row = client
        .query_opt(
            &qualify(
                &format!("SELECT {RECORD_COLUMNS} FROM @.sessions WHERE id = $1"),
                schema,
            ),
            &[&id.0],
        )
        .await
        .map_err(backend)?
        .ok_or(StoreError::UnknownSession { session_id: id })?;
    record(&row)
}

/// Session `id`, locked for the rest of the transaction (claims and batches wait).
async fn lock(
    tx: &deadpool_postgres::Transaction<'_>,
    schema: &str,
    id: SessionId,
) -> Result<SessionRecord, StoreError> {
    let row = tx
        .query_opt(
            &qualify(
                &format!("SELECT {RECORD_COLUMNS} FROM @.sessions WHERE id = $1 FOR NO KEY UPDATE"),
                schema,
            ),
            &[&id.0],
        )
        .await
        .map_err(backend)?
        .ok_or(StoreError::UnknownSession { session_id: id })?;
    record(&row)
}

/// Session `id`'s key in the tables with a row per outcome or chunk.
async fn key_of(
    client: &impl deadpool_postgres::GenericClient,
    schema: &str,
    id: SessionId,
) -> Result<i64, StoreError> {
    let row = client
        .query_opt(
            &qualify("SELECT key FROM @.sessions WHERE id = $1", schema),
            &[&id.0],
        )
        .await
        .map_err(backend)?
        .ok_or(StoreError::UnknownSession { session_id: id })?;
    get(&row, 0)
}

/// Most resource ids in one `resource_chunks` row.
const RESOURCE_CHUNK: usize = 1024;

async fn read_resources(
    client: &impl deadpool_postgres::GenericClient,
    schema: &str,
    key: i64,
) -> Result<Vec<ResourceId>, StoreError> {
    let rows = client
        .query(
            &qualify(
                "SELECT first_position, ids FROM @.resource_chunks WHERE session_key = $1 \
                 ORDER BY first_position",
                schema,
            ),
            &[&key],
        )
        .await
        .map_err(backend)?;
    let mut resources = Vec::new();
    for row in &rows {
        let first: i64 = get(row, 0)?;
        if first != count(resources.len()) {
            return Err(StoreError::Backend(
                format!(
                    "the resource list of session key {key} is damaged: a chunk starts at \
                     {first}, expected {}",
                    resources.len()
                )
                .into(),
            ));
        }
        let chunk: Vec<ResourceId> =
            serde_json::from_str(get(row, 1)?).map_err(|e| StoreError::Backend(Box::new(e)))?;
        resources.extend(chunk);
    }
    Ok(resources)
}

/// Inserts outcomes (a completion's unrecorded ones) after the session's last, ignoring
/// any resource that has one, and answers how many it wrote. The session's row is locked
/// by the caller.
async fn insert_outcomes(
    tx: &impl deadpool_postgres::GenericClient,
    schema: &str,
    key: i64,
    outcomes: &[OutcomeRecord],
) -> Result<u64, StoreError> {
    let resources: Vec<&str> = outcomes.iter().map(|o| o.resource_id.as_str()).collect();
    let (names, details): (Vec<&str>, Vec<_>) =
        outcomes.iter().map(|o| outcome_columns(&o.outcome)).unzip();
    let attempts: Vec<i64> = outcomes.iter().map(|o| i64::from(o.attempts)).collect();
    let elapsed: Vec<i64> = outcomes.iter().map(|o| nanos(o.elapsed)).collect();
    let row = tx
        .query_one(
            &qualify(
                "UPDATE @.sessions SET outcome_seq = outcome_seq + $2 WHERE key = $1 \
                 RETURNING outcome_seq - $2",
                schema,
            ),
            &[&key, &count(outcomes.len())],
        )
        .await
        .map_err(backend)?;
    let after: i64 = get(&row, 0)?;
    tx.execute(
        &qualify(
            "INSERT INTO @.outcomes \
             (session_key, resource_id, ord, outcome, detail, attempts, elapsed_ns) \
             SELECT $1, r, $2 + n, o, d, a, e FROM unnest($3::text[], $4::text[], $5::text[], \
                 $6::int8[], $7::int8[]) WITH ORDINALITY AS v(r, o, d, a, e, n) \
             ORDER BY n \
             ON CONFLICT (session_key, resource_id) DO NOTHING",
            schema,
        ),
        &[
            &key, &after, &resources, &names, &details, &attempts, &elapsed,
        ],
    )
    .await
    .map_err(backend)
}

/// Commits `tx` if `result` is `Ok`, else rolls it back (a typed refusal changed
/// nothing) and answers the refusal.
async fn end<T>(
    tx: deadpool_postgres::Transaction<'_>,
    result: Result<T, StoreError>,
) -> Result<T, StoreError> {
    match result {
        Ok(value) => {
            tx.commit().await.map_err(backend)?;
            Ok(value)
        }
        Err(e) => {
            let _ = tx.rollback().await;
            Err(e)
        }
    }
}

#[async_trait]
impl SessionStore for PostgresStore {
    async fn create_session(&self, new: NewSession) -> Result<SessionRecord, StoreError> {
        // The busy lock's holder may finish between the insert and the look-up of who
        // holds it: then the insert is tried again (a handful of times at most).
        for _ in 0..8 {
            match self.try_create(&new).await {
                Err(StoreError::Backend(e)) if e.is::<Retry>() => {}
                other => return other,
            }
        }
        Err(StoreError::Backend(Box::new(Retry)))
    }

    async fn session(&self, id: SessionId) -> Result<SessionRecord, StoreError> {
        let client = self.client().await?;
        load(&client, &self.schema, id).await
    }

    async fn sessions_by_id(&self, ids: &[SessionId]) -> Result<Vec<SessionRecord>, StoreError> {
        let ids: Vec<uuid::Uuid> = ids.iter().map(|id| id.0).collect();
        let client = self.client().await?;
        let rows = client
            .query(
                &self.q(&format!(
                    "SELECT {RECORD_COLUMNS} FROM @.sessions WHERE id = ANY($1)"
                )),
                &[&ids],
            )
            .await
            .map_err(backend)?;
        rows.iter().map(record).collect()
    }

    async fn list_sessions(&self) -> Result<Vec<SessionRecord>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                &self.q(&format!(
                    "SELECT {RECORD_COLUMNS} FROM @.sessions ORDER BY id DESC"
                )),
                &[],
            )
            .await
            .map_err(backend)?;
        rows.iter().map(record).collect()
    }

    async fn query_sessions(&self, query: &SessionQuery) -> Result<SessionPage, StoreError> {
        let limit = query.page_size();
        let harvester = query.harvester_id.as_ref().map(ToString::to_string);
        let status = query.status.as_ref().map(text).transpose()?;
        let before = query.before.map(|b| b.0);
        let client = self.client().await?;
        let rows = client
            .query(
                &self.q(&format!(
                    "SELECT {RECORD_COLUMNS} FROM @.sessions \
                     WHERE ($1::text IS NULL OR harvester_id = $1) \
                       AND ($2::text IS NULL OR status = $2) \
                       AND ($3::uuid IS NULL OR id < $3) \
                     ORDER BY id DESC LIMIT $4"
                )),
                &[
                    &harvester,
                    &status,
                    &before,
                    &count(limit.saturating_add(1)),
                ],
            )
            .await
            .map_err(backend)?;
        let hits = rows.iter().map(record).collect::<Result<Vec<_>, _>>()?;
        Ok(SessionPage::from_overfetch(hits, limit))
    }

    async fn record_late_outcomes(
        &self,
        id: SessionId,
        outcomes: &[OutcomeRecord],
    ) -> Result<usize, StoreError> {
        if outcomes.is_empty() {
            return Ok(0);
        }
        let schema = self.schema.as_str();
        let mut client = self.write_client().await?;
        let txn = client.transaction().await.map_err(backend)?;
        let result = async {
            let tx = &txn;
            if !lock(tx, schema, id).await?.status.is_terminal() {
                return Ok(0);
            }
            let key = key_of(tx, schema, id).await?;
            let written = insert_outcomes(tx, schema, key, outcomes).await?;
            Ok(usize::try_from(written).unwrap_or(usize::MAX))
        }
        .await;
        end(txn, result).await
    }

    async fn recent_durations(
        &self,
        harvester: &HarvesterId,
        limit: usize,
    ) -> Result<Vec<std::time::Duration>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let client = self.client().await?;
        // The newest sessions (at most `limit`: each gives at least one or nothing), each
        // one's successes in the order of its primary key (no index has the recorded
        // order, and sorting a long session's outcomes cost every start a scan of them):
        // the rows come presorted by session, so the outer order stops at the limit.
        let rows = client
            .query(
                &self.q("SELECT o.elapsed_ns FROM \
                     (SELECT key, id FROM @.sessions WHERE harvester_id = $1 \
                      ORDER BY id DESC LIMIT $2) s \
                     CROSS JOIN LATERAL \
                     (SELECT elapsed_ns FROM @.outcomes \
                      WHERE session_key = s.key AND outcome = 'succeeded' LIMIT $2) o \
                     ORDER BY s.id DESC LIMIT $2"),
                &[&harvester.as_str(), &limit],
            )
            .await
            .map_err(backend)?;
        rows.iter()
            .map(|r| {
                get::<i64>(r, 0)
                    .map(|ns| std::time::Duration::from_nanos(u64::try_from(ns).unwrap_or(0)))
            })
            .collect()
    }

    async fn active_session(
        &self,
        harvester: &HarvesterId,
    ) -> Result<Option<SessionId>, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                &self.q(&format!(
                    "SELECT id FROM @.sessions WHERE harvester_id = $1 AND status IN {OPEN}"
                )),
                &[&harvester.as_str()],
            )
            .await
            .map_err(backend)?;
        row.map(|r| get::<uuid::Uuid>(&r, 0).map(SessionId))
            .transpose()
    }

    async fn resources(&self, id: SessionId) -> Result<Vec<ResourceId>, StoreError> {
        let client = self.client().await?;
        let key = key_of(&client, &self.schema, id).await?;
        read_resources(&client, &self.schema, key).await
    }

    async fn transition(
        &self,
        id: SessionId,
        fence: Fence,
        from: SessionStatus,
        to: SessionStatus,
    ) -> Result<bool, StoreError> {
        if to.is_terminal() {
            return Ok(false);
        }
        let (from, to) = (text(&from)?, text(&to)?);
        let schema = self.schema.as_str();
        let (from, to) = (&from, &to);
        let mut client = self.write_client().await?;
        let txn = client.transaction().await.map_err(backend)?;
        let result = async {
            let tx = &txn;
            {
                check_fence(&lock(tx, schema, id).await?, fence)?;
                let changed = tx
                    .execute(
                        &qualify(
                            "UPDATE @.sessions SET status = $3 \
                             WHERE id = $1 AND status = $2 AND finalizing IS NULL",
                            schema,
                        ),
                        &[&id.0, from, to],
                    )
                    .await
                    .map_err(backend)?;
                Ok(changed == 1)
            }
        }
        .await;
        end(txn, result).await
    }

    async fn record_outcome(
        &self,
        id: SessionId,
        fence: Fence,
        outcome: OutcomeRecord,
    ) -> Result<(), StoreError> {
        self.writer.queue_outcome(id, fence, outcome).answer().await
    }

    fn queue_outcome(
        &self,
        id: SessionId,
        fence: Fence,
        outcome: &OutcomeRecord,
    ) -> Option<OutcomeReceipt> {
        Some(self.writer.queue_outcome(id, fence, outcome.clone()))
    }

    async fn outcomes(&self, id: SessionId) -> Result<Vec<OutcomeRecord>, StoreError> {
        let (page, _) = self.outcomes_page(id, 0, usize::MAX).await?;
        Ok(page)
    }

    async fn outcomes_page(
        &self,
        id: SessionId,
        offset: usize,
        limit: usize,
    ) -> Result<(Vec<OutcomeRecord>, usize), StoreError> {
        self.writer.barrier().await;
        let mut client = self.client().await?;
        // One snapshot: the record and its outcomes agree.
        let tx = client
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .map_err(backend)?;
        let schema = self.schema.as_str();
        let record = load(&tx, schema, id).await?;
        let key = key_of(&tx, schema, id).await?;
        let stored: i64 = get(
            &tx.query_one(
                &qualify(
                    "SELECT count(*) FROM @.outcomes WHERE session_key = $1",
                    schema,
                ),
                &[&key],
            )
            .await
            .map_err(backend)?,
            0,
        )?;
        let stored = usize_of(stored);
        let rows = tx
            .query(
                &qualify(
                    &format!(
                        "SELECT {OUTCOME_COLUMNS} FROM @.outcomes WHERE session_key = $1 \
                         ORDER BY ord LIMIT $2 OFFSET $3"
                    ),
                    schema,
                ),
                &[&key, &count(limit), &count(offset)],
            )
            .await
            .map_err(backend)?;
        let mut page = rows
            .iter()
            .map(outcome_row)
            .collect::<Result<Vec<_>, _>>()?;
        if !record.status.is_terminal() || stored >= record.total {
            tx.commit().await.map_err(backend)?;
            return Ok((page, stored));
        }
        // A terminal session with resources never recorded: they follow, derived.
        if offset.saturating_add(limit) > stored && page.len() < limit {
            let resources = read_resources(&tx, schema, key).await?;
            let ids: Vec<String> = tx
                .query(
                    &qualify(
                        "SELECT resource_id FROM @.outcomes WHERE session_key = $1",
                        schema,
                    ),
                    &[&key],
                )
                .await
                .map_err(backend)?
                .iter()
                .map(|r| get::<String>(r, 0))
                .collect::<Result<_, _>>()?;
            let recorded: HashSet<&str> = ids.iter().map(String::as_str).collect();
            let skip = offset.saturating_sub(stored);
            let room = limit.saturating_sub(page.len());
            page.extend(
                derived_outcomes(&record, &resources, &recorded)
                    .skip(skip)
                    .take(room),
            );
        }
        tx.commit().await.map_err(backend)?;
        Ok((page, record.total))
    }

    fn append_event(&self, fence: Fence, event: SessionEvent) -> Result<(), StoreError> {
        self.writer.event(fence, event)
    }

    async fn events(&self, id: SessionId) -> Result<Vec<SessionEvent>, StoreError> {
        self.see_appended_events().await;
        let mut events = Vec::new();
        loop {
            let after = events.last().map_or(0, |e: &SessionEvent| e.seq);
            let page = self.read_events(id, after, MAX_EVENT_PAGE).await?;
            let more = page.len() == MAX_EVENT_PAGE;
            events.extend(page);
            if !more {
                return Ok(events);
            }
        }
    }

    async fn events_after(
        &self,
        id: SessionId,
        after: u64,
        limit: usize,
    ) -> Result<Vec<SessionEvent>, StoreError> {
        self.see_appended_events().await;
        self.read_events(id, after, limit.clamp(1, MAX_EVENT_PAGE))
            .await
    }

    async fn last_event_seq(&self, id: SessionId) -> Result<u64, StoreError> {
        self.see_appended_events().await;
        let client = self.client().await?;
        let key = key_of(&client, &self.schema, id).await?;
        let row = client
            .query_one(
                &self.q("SELECT max(last_seq) FROM @.event_chunks WHERE session_key = $1"),
                &[&key],
            )
            .await
            .map_err(backend)?;
        let seq: Option<i64> = get(&row, 0)?;
        Ok(seq.map_or(0, |s| u64::try_from(s).unwrap_or(0)))
    }

    async fn claim_finalization(
        &self,
        id: SessionId,
        fence: Fence,
        reason: FinalizeReason,
    ) -> Result<Claim, StoreError> {
        let reason = text(&reason)?;
        let schema = self.schema.as_str();
        let reason = &reason;
        let mut client = self.write_client().await?;
        let txn = client.transaction().await.map_err(backend)?;
        let result = async {
            let tx = &txn;
            {
                let before = lock(tx, schema, id).await?;
                check_fence(&before, fence)?;
                if before.status.is_terminal() {
                    return Ok(Claim::AlreadyFinalized(before));
                }
                if before.finalizing.is_some() {
                    return Ok(Claim::AlreadyClaimed(before));
                }
                tx.execute(
                    &qualify(
                        "UPDATE @.sessions SET finalizing = $2 WHERE id = $1",
                        schema,
                    ),
                    &[&id.0, reason],
                )
                .await
                .map_err(backend)?;
                Ok(Claim::Claimed(before))
            }
        }
        .await;
        end(txn, result).await
    }

    async fn finalizer_started(&self, id: SessionId, fence: Fence) -> Result<u32, StoreError> {
        let schema = self.schema.as_str();
        let mut client = self.write_client().await?;
        let txn = client.transaction().await.map_err(backend)?;
        let result = async {
            let tx = &txn;
            {
                let record = lock(tx, schema, id).await?;
                check_fence(&record, fence)?;
                if record.finalizing.is_none() || record.status.is_terminal() {
                    return Err(StoreError::NotClaimed { session_id: id });
                }
                let row = tx
                    .query_one(
                        &qualify(
                            "UPDATE @.sessions SET finalizer_attempts = finalizer_attempts + 1 \
                             WHERE id = $1 RETURNING finalizer_attempts",
                            schema,
                        ),
                        &[&id.0],
                    )
                    .await
                    .map_err(backend)?;
                Ok(u32::try_from(get::<i64>(&row, 0)?).unwrap_or(u32::MAX))
            }
        }
        .await;
        end(txn, result).await
    }

    async fn session_config(&self, id: SessionId) -> Result<Option<SessionConfig>, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                &self.q("SELECT config FROM @.sessions WHERE id = $1"),
                &[&id.0],
            )
            .await
            .map_err(backend)?
            .ok_or(StoreError::UnknownSession { session_id: id })?;
        let text: Option<&str> = get(&row, 0)?;
        text.map(serde_json::from_str)
            .transpose()
            .map_err(|e| StoreError::Backend(Box::new(e)))
    }

    async fn resume_session(
        &self,
        id: SessionId,
        fence: Fence,
    ) -> Result<Option<Vec<ResourceId>>, StoreError> {
        let schema = self.schema.as_str();
        let mut client = self.write_client().await?;
        let txn = client.transaction().await.map_err(backend)?;
        let result = async {
            let tx = &txn;
            {
                let record = lock(tx, schema, id).await?;
                check_fence(&record, fence)?;
                if record.finalizing.is_some()
                    || !matches!(
                        record.status,
                        SessionStatus::Pending | SessionStatus::OnGoing
                    )
                {
                    return Ok(None);
                }
                let row = tx
                    .query_one(
                        &qualify(
                            "UPDATE @.sessions SET status = 'on-going', failed = 0, \
                             panicked = 0, timed_out = 0, cancelled = 0, lost = 0 \
                             WHERE id = $1 RETURNING key",
                            schema,
                        ),
                        &[&id.0],
                    )
                    .await
                    .map_err(backend)?;
                let key: i64 = get(&row, 0)?;
                tx.execute(
                    &qualify(
                        "DELETE FROM @.outcomes WHERE session_key = $1 AND outcome <> 'succeeded'",
                        schema,
                    ),
                    &[&key],
                )
                .await
                .map_err(backend)?;
                let succeeded: HashSet<String> = tx
                    .query(
                        &qualify(
                            "SELECT resource_id FROM @.outcomes WHERE session_key = $1",
                            schema,
                        ),
                        &[&key],
                    )
                    .await
                    .map_err(backend)?
                    .iter()
                    .map(|r| get::<String>(r, 0))
                    .collect::<Result<_, _>>()?;
                let mut rest = read_resources(tx, schema, key).await?;
                rest.retain(|r| !succeeded.contains(r.as_str()));
                Ok(Some(rest))
            }
        }
        .await;
        end(txn, result).await
    }

    async fn flush(&self) -> Result<(), StoreError> {
        self.writer.flush().await
    }

    async fn complete_finalization(
        &self,
        id: SessionId,
        fence: Fence,
        completion: Completion,
    ) -> Result<Completed, StoreError> {
        self.complete(id, fence, completion, None).await
    }

    async fn complete_finalization_with(
        &self,
        id: SessionId,
        fence: Fence,
        completion: Completion,
        work: &InCompletion,
        report: &SessionReport,
    ) -> Result<Completed, StoreError> {
        let Some(work) = finalizer::work_of(work) else {
            return Err(StoreError::InvalidOptions(ConfigError::new(
                "finalizer",
                "this work was not made by the PostgreSQL store",
            )));
        };
        self.complete(id, fence, completion, Some((work.as_ref(), report)))
            .await
    }

    fn runs_in_completion(&self, work: &InCompletion) -> bool {
        finalizer::work_of(work).is_some()
    }

    async fn request_abort(&self, id: SessionId) -> Result<SessionRecord, StoreError> {
        let schema = self.schema.as_str();
        let mut client = self.write_client().await?;
        let txn = client.transaction().await.map_err(backend)?;
        let result = async {
            let tx = &txn;
            {
                tx.execute(
                    &qualify(
                        "UPDATE @.sessions SET abort_requested = true WHERE id = $1 \
                         AND status IN ('pending', 'on-going') AND finalizing IS NULL",
                        schema,
                    ),
                    &[&id.0],
                )
                .await
                .map_err(backend)?;
                let record = load(tx, schema, id).await?;
                // The owner hears of it at once (delivered at the commit), not at its
                // next lease renewal.
                if let (true, Some(owner)) = (record.abort_requested, record.owner) {
                    tx.execute(
                        "SELECT pg_notify($1, $2)",
                        &[&listen::channels(schema).1, &owner.to_string()],
                    )
                    .await
                    .map_err(backend)?;
                }
                Ok(record)
            }
        }
        .await;
        end(txn, result).await
    }

    async fn requested_aborts(&self, node: NodeId) -> Result<Vec<SessionId>, StoreError> {
        self.ids(
            "SELECT id FROM @.sessions WHERE owner = $1 AND abort_requested \
             AND status IN ('pending', 'on-going') AND finalizing IS NULL ORDER BY id",
            node,
        )
        .await
    }

    async fn open_sessions_of(&self, node: NodeId) -> Result<Vec<SessionId>, StoreError> {
        self.ids(
            "SELECT id FROM @.sessions WHERE owner = $1 \
             AND status IN ('pending', 'on-going', 'aborting') ORDER BY id",
            node,
        )
        .await
    }

    async fn register_node(
        &self,
        node: &NodeInfo,
        ttl: Duration,
    ) -> Result<NodeRecord, StoreError> {
        let client = self.client().await?;
        let process = node.process.as_ref();
        let row = client
            .query_one(
                &self.q(&format!(
                    "INSERT INTO @.nodes (id, name, host, pid, pid_start, started, lease_until) \
                     VALUES ($1, $2, $3, $4, $5, now(), now() + $6 * interval '1 millisecond') \
                     ON CONFLICT (id) DO UPDATE SET lease_until = excluded.lease_until \
                     RETURNING {NODE_COLUMNS}"
                )),
                &[
                    &node.id.0,
                    &node.name,
                    &process.map(|p| p.host.as_str()),
                    &process.map(|p| i64::from(p.pid)),
                    &process.map(|p| i64::try_from(p.start).unwrap_or(i64::MAX)),
                    &(millis(ttl) as f64),
                ],
            )
            .await
            .map_err(backend)?;
        node_row(&row)
    }

    async fn renew_lease(&self, node: &NodeInfo, ttl: Duration) -> Result<NodeRecord, StoreError> {
        let renewed = {
            let client = self.client().await?;
            client
                .query_opt(
                    &self.q(&format!(
                        "UPDATE @.nodes SET lease_until = now() + $2 * interval '1 millisecond' \
                         WHERE id = $1 RETURNING {NODE_COLUMNS}"
                    )),
                    &[&node.id.0, &(millis(ttl) as f64)],
                )
                .await
                .map_err(backend)?
        };
        match renewed {
            Some(row) => node_row(&row),
            None => self.register_node(node, ttl).await,
        }
    }

    async fn release_node(&self, node: NodeId) -> Result<(), StoreError> {
        let client = self.client().await?;
        client
            .execute(
                &self.q("UPDATE @.nodes SET lease_until = \
                     least(lease_until, now() - interval '1 millisecond') WHERE id = $1"),
                &[&node.0],
            )
            .await
            .map_err(backend)?;
        Ok(())
    }

    async fn expire_node(&self, node: NodeId, process: &ProcessId) -> Result<bool, StoreError> {
        let client = self.client().await?;
        let changed = client
            .execute(
                &self.q(
                    "UPDATE @.nodes SET lease_until = now() - interval '1 millisecond' \
                     WHERE id = $1 AND host = $2 AND pid = $3 AND pid_start = $4 \
                     AND lease_until >= now()",
                ),
                &[
                    &node.0,
                    &process.host,
                    &i64::from(process.pid),
                    &i64::try_from(process.start).unwrap_or(i64::MAX),
                ],
            )
            .await
            .map_err(backend)?;
        Ok(changed == 1)
    }

    async fn nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                &self.q(&format!(
                    "SELECT {NODE_COLUMNS} FROM @.nodes ORDER BY id DESC"
                )),
                &[],
            )
            .await
            .map_err(backend)?;
        rows.iter().map(node_row).collect()
    }

    fn signals(&self) -> Option<crate::store::StoreSignals> {
        Some(self.listener.signals())
    }

    async fn take_over(&self, rescuer: NodeId, limit: usize) -> Result<Vec<TakenOver>, StoreError> {
        let limit = count(limit);
        let retention = millis(NODE_RETENTION) as f64;
        let schema = self.schema.as_str();
        let mut client = self.write_client().await?;
        let txn = client.transaction().await.map_err(backend)?;
        let result = async {
            let tx = &txn;
            {
                let live: bool = get(
                    &tx.query_one(
                        &qualify(
                            "SELECT EXISTS (SELECT 1 FROM @.nodes \
                             WHERE id = $1 AND lease_until >= now())",
                            schema,
                        ),
                        &[&rescuer.0],
                    )
                    .await
                    .map_err(backend)?,
                    0,
                )?;
                if !live {
                    return Err(StoreError::LeaseExpired { node: rescuer });
                }
                // Forget nodes long gone that own nothing unfinished.
                tx.execute(
                    &qualify(
                        &format!(
                            "DELETE FROM @.nodes n WHERE lease_until < now() - $1 * interval '1 millisecond' \
                             AND NOT EXISTS (SELECT 1 FROM @.sessions s WHERE s.owner = n.id \
                                             AND s.status IN {OPEN})"
                        ),
                        schema,
                    ),
                    &[&retention],
                )
                .await
                .map_err(backend)?;
                // Rows another rescuer holds are skipped, not waited for: each session
                // has one winner, and nobody queues behind anyone.
                let orphans = tx
                    .query(
                        &qualify(
                            &format!(
                                "SELECT s.key, s.owner FROM @.sessions s \
                                 WHERE s.status IN {OPEN} \
                                   AND NOT EXISTS (SELECT 1 FROM @.nodes n \
                                       WHERE n.id = s.owner AND n.lease_until >= now()) \
                                 ORDER BY s.id LIMIT $1 FOR NO KEY UPDATE OF s SKIP LOCKED"
                            ),
                            schema,
                        ),
                        &[&limit],
                    )
                    .await
                    .map_err(backend)?;
                let mut taken = Vec::with_capacity(orphans.len());
                for row in &orphans {
                    let key: i64 = get(row, 0)?;
                    let from_node: Option<uuid::Uuid> = get(row, 1)?;
                    // Checked again on the row as it is now: a row another rescuer took
                    // over and committed between this statement's snapshot and its lock
                    // comes back from `FOR UPDATE` with the join not re-evaluated (its new
                    // owner is live). Only this row lock makes the check exact.
                    let updated = tx
                        .query_opt(
                            &qualify(
                                &format!(
                                    "UPDATE @.sessions s SET owner = $2, epoch = s.epoch + 1 \
                                     WHERE s.key = $1 AND s.status IN {OPEN} \
                                       AND NOT EXISTS (SELECT 1 FROM @.nodes n \
                                           WHERE n.id = s.owner AND n.lease_until >= now()) \
                                     RETURNING {RECORD_COLUMNS}"
                                ),
                                schema,
                            ),
                            &[&key, &rescuer.0],
                        )
                        .await
                        .map_err(backend)?;
                    if let Some(updated) = updated {
                        taken.push(TakenOver {
                            record: record(&updated)?,
                            from_node: from_node.map(NodeId),
                        });
                    }
                }
                Ok(taken)
            }
        }
        .await;
        end(txn, result).await
    }
}

/// A transaction to run again (its precondition changed between two statements).
#[derive(Debug)]
struct Retry;

impl std::fmt::Display for Retry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the busy lock changed hands during the create; try again")
    }
}

impl std::error::Error for Retry {}

#[cfg(test)]
mod tests {
    use super::*;

    /// Options from these variables only (the process's own environment untouched).
    fn from(vars: &[(&str, &str)]) -> Result<PostgresOptions, StoreError> {
        let vars: std::collections::HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        PostgresOptions::from_vars(|name| vars.get(name).cloned())
    }

    #[test]
    fn the_pg_variables_name_the_database_and_unset_ones_take_libpq_defaults() {
        let options = from(&[]).expect("defaults");
        assert_eq!(options.target(), "localhost:5432/postgres");
        assert_eq!(options.config.get_user(), Some("postgres"));
        assert_eq!(
            options.config.get_application_name(),
            Some("harvest-supervisor")
        );
        assert_eq!(options.connect_timeout, Duration::from_secs(10));

        let options = from(&[
            ("PGHOST", "/run/postgresql"),
            ("PGPORT", "5433"),
            ("PGUSER", "harvester"),
            ("PGPASSWORD", "s3cret-pass"),
            ("PGDATABASE", "geonode"),
            ("PGAPPNAME", "geonode-harvest"),
            ("PGCONNECT_TIMEOUT", "3"),
        ])
        .expect("options");
        // A host starting with `/` is a socket folder.
        assert!(matches!(
            options.config.get_hosts(),
            [Host::Unix(dir)] if dir == std::path::Path::new("/run/postgresql")
        ));
        assert_eq!(options.target(), "/run/postgresql:5433/geonode");
        assert_eq!(options.config.get_user(), Some("harvester"));
        assert_eq!(options.config.get_password(), Some(&b"s3cret-pass"[..]));
        assert_eq!(
            options.config.get_application_name(),
            Some("geonode-harvest")
        );
        assert_eq!(options.connect_timeout, Duration::from_secs(3));
        assert!(
            !format!("{options:?}").contains("s3cret"),
            "never the password in Debug"
        );
        // Empty counts as unset.
        let options = from(&[("PGHOST", ""), ("PGPORT", ""), ("PGUSER", "")]).expect("options");
        assert_eq!(options.target(), "localhost:5432/postgres");
    }

    #[test]
    fn a_pg_variable_that_does_not_parse_is_an_error_naming_it() {
        for (name, value) in [
            ("PGPORT", "54321x"),
            ("PGPORT", "70000"),
            ("PGCONNECT_TIMEOUT", "soon"),
            ("PGCONNECT_TIMEOUT", "-1"),
        ] {
            match from(&[(name, value)]) {
                Err(StoreError::InvalidOptions(e)) => {
                    assert_eq!(e.field(), name);
                    assert!(e.to_string().contains(value), "{e}");
                }
                other => panic!("{name}={value}: {other:?}"),
            }
        }
    }
}
