//! Plain, serde-friendly configuration, validated up front.
//!
//! Durations read and write as human text (`"30s"`, `"20m"`). [`SessionConfig::validate`]
//! rejects a bad value with a [`ConfigError`] naming the field and the rule, before anything
//! starts, so a typo never turns into a session that cannot end.
//!
//! Every value has bounds, so that the watchdog stays meaningful and no time arithmetic in
//! the tree can overflow (a `Duration::MAX` or `"1000years"` is a typed error, not a panic
//! or a monitor that never looks):
//!
//! | field | bounds |
//! |---|---|
//! | `per_resource_estimate` | at most [`MAX_PER_RESOURCE_ESTIMATE`] (1 day) |
//! | `buffer` | at most [`MAX_BUFFER`] (30 days); not both zero with the estimate |
//! | `resources x estimate + buffer` | at most [`MAX_WORKFLOW_TIME`] (366 days), checked at start |
//! | `resource_timeout` | more than zero, at most [`MAX_TIMEOUT`] (30 days) |
//! | `heartbeat_timeout` | more than zero, at most [`MAX_GRACE`] (1 day) |
//! | `monitor_interval` | from [`MIN_MONITOR_INTERVAL`] (1 ms) to [`MAX_GRACE`] (1 day), and no longer than a one-resource session's budget |
//! | `escalation_grace`, `abort_grace` | at most [`MAX_GRACE`] (1 day); the escalation grace more than zero |
//! | `killed_exit_wait` | more than zero, less than `escalation_grace`, at most [`MAX_KILLED_EXIT_WAIT`] (1 h) |
//! | `max_concurrency` | 1 to [`MAX_CONCURRENCY`] (100,000) |
//! | `retry.max_attempts` | 1 to [`MAX_ATTEMPTS`] (1,000) |
//! | `retry.multiplier` | finite, 1 to [`MAX_MULTIPLIER`] (1,000) |
//! | `retry.initial_backoff`, `retry.max_backoff` | at most [`MAX_GRACE`] (1 day), max >= initial |
//! | `event_capacity` | 1 to [`MAX_EVENT_CAPACITY`] (1,048,576 events per subscriber) |
//! | `store_retry_max` | [`MIN_STORE_RETRY`] (50 ms) to [`MAX_GRACE`] (1 day) |
//! | `shutdown_timeout` | more than zero, at most [`MAX_GRACE`] (1 day) |
//! | `lease_renew_interval` | [`MIN_LEASE_RENEW`] (10 ms) to 1 hour |
//! | `lease_ttl` | at least twice `lease_renew_interval`, at most [`MAX_GRACE`] (1 day) |
//! | `rescue_interval` | [`MIN_LEASE_RENEW`] (10 ms) to [`MAX_GRACE`] (1 day) |
//! | `max_concurrent_starts` | 1 to [`MAX_CONCURRENT_STARTS`] (10,000) |
//! | `adaptive` | see [`crate::budget::AdaptiveBudget`]'s fields |
//! | `node_name` | a valid id (see [`crate::model::MAX_ID_BYTES`]) when given |

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::ConfigError;

const DAY: Duration = Duration::from_secs(86_400);

/// The longest `per_resource_estimate`.
pub const MAX_PER_RESOURCE_ESTIMATE: Duration = DAY;
/// The longest `buffer`.
pub const MAX_BUFFER: Duration = Duration::from_secs(30 * 86_400);
/// The longest budget of one session (`resources x per_resource_estimate + buffer`): a
/// watchdog that looks after more than a year watches nothing.
pub const MAX_WORKFLOW_TIME: Duration = Duration::from_secs(366 * 86_400);
/// The longest `resource_timeout`.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(30 * 86_400);
/// The longest `heartbeat_timeout`, `monitor_interval`, grace or backoff.
pub const MAX_GRACE: Duration = DAY;
/// The shortest `monitor_interval`: a shorter one is a busy loop, not a watchdog.
pub const MIN_MONITOR_INTERVAL: Duration = Duration::from_millis(1);
/// The longest `killed_exit_wait`.
pub const MAX_KILLED_EXIT_WAIT: Duration = Duration::from_secs(3600);
/// The most workers of one session alive at once.
pub const MAX_CONCURRENCY: usize = 100_000;
/// The most attempts per resource.
pub const MAX_ATTEMPTS: u32 = 1_000;
/// The largest `retry.multiplier`.
pub const MAX_MULTIPLIER: f64 = 1_000.0;
/// The most events buffered per subscriber (each slot is allocated up front).
pub const MAX_EVENT_CAPACITY: usize = 1 << 20;

/// What to do when a resource fails for good (after its retries).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FailurePolicy {
    /// Harvest what you can: a failure is recorded and the session goes on.
    #[default]
    Continue,
    /// The first final failure finalizes the session; the rest are cancelled.
    FailFast,
}

/// What a node does with the sessions it takes over from a dead node (at start, or at
/// any later rescue pass): an earlier process on the store, or another live process's
/// that died.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RecoveryPolicy {
    /// Finalize them once with `Interrupted`; unrecorded resources count as `Lost`.
    #[default]
    Finalize,
    /// Harvest again, under the same session and with a fresh deadline, every resource
    /// without a success; then finalize normally. Sessions caught aborting or finalizing
    /// are finalized as with `Finalize`.
    Resume,
}

/// What recovery does with a finalizer that a crash interrupted (its process died after
/// the store recorded "finalizer started" and before the completion).
///
/// A finalizer whose claimant died *before* it started always runs: it never ran. And
/// within one healthy process a finalizer runs exactly once (one that hangs is cut by
/// the monitor's escalation and recorded as such, never run again).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FinalizerRecovery {
    /// Run it again, with `SessionReport::finalizer_attempt` above 1 so that it knows: an
    /// idempotent finalizer dedupes by session id. At least once, knowingly.
    #[default]
    Rerun,
    /// Do not run it again: complete the session with a `finalizer_error` saying it was
    /// interrupted. At most once.
    Skip,
}

/// Retry with exponential backoff.
///
/// Attempt `n` (from 1) that fails, panics or times out is retried after
/// `initial_backoff * multiplier^(n-1)`, capped at `max_backoff`, while `n < max_attempts`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct RetryPolicy {
    /// Attempts per resource, the first included; 1 means no retry.
    pub max_attempts: u32,
    /// Delay before the second attempt.
    #[serde(with = "humantime_serde")]
    pub initial_backoff: Duration,
    /// Growth factor of the delay between attempts.
    pub multiplier: f64,
    /// Upper bound of any one delay.
    #[serde(with = "humantime_serde")]
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 1,
            initial_backoff: Duration::from_secs(1),
            multiplier: 2.0,
            max_backoff: Duration::from_secs(60),
        }
    }
}

impl RetryPolicy {
    /// The delay before attempt `failed_attempt + 1`, never more than `max_backoff`. Never
    /// panics, whatever the policy (a validated one or not).
    pub fn backoff(&self, failed_attempt: u32) -> Duration {
        let exp = i32::try_from(failed_attempt.saturating_sub(1).min(1024)).unwrap_or(1024);
        let secs = self.initial_backoff.as_secs_f64() * self.multiplier.powi(exp);
        // Float rounding can take a delay near `Duration::MAX` past it, a huge power is
        // +inf and a NaN multiplier gives NaN: all read as "as long as allowed".
        let delay = if secs.is_nan() {
            self.max_backoff
        } else {
            Duration::try_from_secs_f64(secs.max(0.0)).unwrap_or(Duration::MAX)
        };
        delay.min(self.max_backoff)
    }
}

/// The budget and policies of one session.
///
/// ```
/// use harvest_supervisor::SessionConfig;
/// use std::time::Duration;
///
/// // Fields left out keep GeoNode's defaults.
/// let config: SessionConfig = serde_json::from_str(
///     r#"{ "per_resource_estimate": "2s", "buffer": "5m", "max_concurrency": 32,
///          "retry": { "max_attempts": 3, "initial_backoff": "500ms" } }"#,
/// )?;
/// config.validate()?;
/// assert_eq!(config.workflow_time(100), Duration::from_secs(100 * 2 + 300));
///
/// let broken = config.with_max_concurrency(0);
/// assert_eq!(broken.validate().unwrap_err().field(), "max_concurrency");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct SessionConfig {
    /// Expected harvest time of one resource; the deadline grows with the resource count.
    #[serde(with = "humantime_serde")]
    pub per_resource_estimate: Duration,
    /// Fixed slack added to the deadline.
    #[serde(with = "humantime_serde")]
    pub buffer: Duration,
    /// Limit of one attempt; `None` leaves hung attempts to the session deadline.
    #[serde(with = "humantime_serde")]
    pub resource_timeout: Option<Duration>,
    /// Limit between two heartbeats of one attempt; `None` turns the check off.
    #[serde(with = "humantime_serde")]
    pub heartbeat_timeout: Option<Duration>,
    /// How often the monitor checks the deadline. The supervisor's shared clock looks at
    /// the deadline and the session's finalization state every interval and wakes the
    /// monitor when either calls for it; otherwise the monitor wakes every tenth interval
    /// to read the store (and about once a minute to log a `MonitorTick`).
    #[serde(with = "humantime_serde")]
    pub monitor_interval: Duration,
    /// How long the monitor waits for the session to finalize (after the deadline, or while
    /// its finalizer runs) before it asks the root to force-finalize.
    #[serde(with = "humantime_serde")]
    pub escalation_grace: Duration,
    /// How long an abort waits for workers to honour their cancellation token before
    /// stopping them.
    #[serde(with = "humantime_serde")]
    pub abort_grace: Duration,
    /// How long finalization waits for killed workers (and the root for a killed session
    /// actor) to exit before going on. A killed worker exits at its harvest's next
    /// `.await`, at once unless the harvest blocks its thread without yielding, which
    /// nothing can interrupt; the finalizer never starts beside a harvest that is still
    /// running unless this wait ran out (a warning says so). Less than
    /// `escalation_grace`, so that a session waiting for its workers is not escalated.
    #[serde(with = "humantime_serde")]
    pub killed_exit_wait: Duration,
    /// Most workers alive at once.
    pub max_concurrency: usize,
    /// Retries of failed, panicked or timed-out attempts.
    pub retry: RetryPolicy,
    /// What a final failure does to the session.
    pub failure_policy: FailurePolicy,
    /// When set, the budget (and optionally the resource timeout) is learned from the
    /// harvester's history when a session starts; see [`crate::budget`]. `None` (the
    /// default): the static formula.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adaptive: Option<crate::budget::AdaptiveBudget>,
    /// How the budget of the session this config was applied to was chosen, when it was
    /// not the static formula; set by the supervisor when the session starts (whatever a
    /// request brings). Absent for a static budget, so that a static session's stored
    /// config reads in versions that predate adaptive budgets.
    /// Boxed: absent for most sessions, and a config is kept per session (inline, it
    /// was 88 of a config's 400 bytes).
    #[serde(skip_serializing_if = "Option::is_none")]
    budget_source: Option<Box<crate::budget::BudgetSource>>,
}

impl Default for SessionConfig {
    /// GeoNode's budget: 20 s per resource + 1200 s, a 600 s hard limit per task, and a
    /// monitor every 60 s.
    fn default() -> Self {
        Self {
            per_resource_estimate: Duration::from_secs(20),
            buffer: Duration::from_secs(1200),
            resource_timeout: Some(Duration::from_secs(600)),
            heartbeat_timeout: None,
            monitor_interval: Duration::from_secs(60),
            escalation_grace: Duration::from_secs(60),
            abort_grace: Duration::from_secs(30),
            killed_exit_wait: Duration::from_millis(500),
            max_concurrency: 16,
            retry: RetryPolicy::default(),
            failure_policy: FailurePolicy::Continue,
            adaptive: None,
            budget_source: None,
        }
    }
}

impl SessionConfig {
    /// `resources x per_resource_estimate + buffer`, saturating instead of overflowing.
    pub fn workflow_time(&self, resources: usize) -> Duration {
        const NANOS: u128 = 1_000_000_000;
        let total = self
            .per_resource_estimate
            .as_nanos()
            .saturating_mul(resources as u128)
            .saturating_add(self.buffer.as_nanos());
        match u64::try_from(total / NANOS) {
            // The remainder is below one second: it always fits in u32.
            Ok(secs) => Duration::new(secs, (total % NANOS) as u32),
            Err(_) => Duration::MAX,
        }
    }

    /// How the budget of the session this config belongs to was chosen (see
    /// [`crate::budget`]), as the config a session runs under says
    /// ([`crate::Supervisor::session_config`]): [`BudgetSource::Static`] for a static
    /// budget, for a session stored before adaptive budgets existed, and for a config not
    /// yet applied to a session.
    ///
    /// [`BudgetSource::Static`]: crate::budget::BudgetSource::Static
    pub fn budget_source(&self) -> &crate::budget::BudgetSource {
        static STATIC: crate::budget::BudgetSource = crate::budget::BudgetSource::Static;
        self.budget_source.as_deref().unwrap_or(&STATIC)
    }

    pub(crate) fn with_budget_source(mut self, source: crate::budget::BudgetSource) -> Self {
        self.budget_source = match source {
            crate::budget::BudgetSource::Static => None,
            other => Some(Box::new(other)),
        };
        self
    }

    /// Checks every field against its bounds (see the module docs); the first broken rule
    /// is returned.
    pub fn validate(&self) -> Result<(), ConfigError> {
        positive("escalation_grace", self.escalation_grace)?;
        at_most(
            "per_resource_estimate",
            self.per_resource_estimate,
            MAX_PER_RESOURCE_ESTIMATE,
        )?;
        at_most("buffer", self.buffer, MAX_BUFFER)?;
        if self.per_resource_estimate.is_zero() && self.buffer.is_zero() {
            return Err(ConfigError::new(
                "buffer",
                "per_resource_estimate and buffer cannot both be zero (the deadline would be now)",
            ));
        }
        if let Some(t) = self.resource_timeout {
            positive("resource_timeout", t)?;
            at_most("resource_timeout", t, MAX_TIMEOUT)?;
        }
        if let Some(t) = self.heartbeat_timeout {
            positive("heartbeat_timeout", t)?;
            at_most("heartbeat_timeout", t, MAX_GRACE)?;
        }
        if self.monitor_interval < MIN_MONITOR_INTERVAL {
            return Err(ConfigError::new(
                "monitor_interval",
                format!("must be at least {}", show(MIN_MONITOR_INTERVAL)),
            ));
        }
        at_most("monitor_interval", self.monitor_interval, MAX_GRACE)?;
        let one = self.workflow_time(1);
        if self.monitor_interval > one {
            return Err(ConfigError::new(
                "monitor_interval",
                format!(
                    "must be no longer than the workflow_time of a one-resource session ({}): \
                     the monitor would first look after the deadline",
                    show(one)
                ),
            ));
        }
        at_most("escalation_grace", self.escalation_grace, MAX_GRACE)?;
        at_most("abort_grace", self.abort_grace, MAX_GRACE)?;
        positive("killed_exit_wait", self.killed_exit_wait)?;
        at_most(
            "killed_exit_wait",
            self.killed_exit_wait,
            MAX_KILLED_EXIT_WAIT,
        )?;
        if self.killed_exit_wait >= self.escalation_grace {
            return Err(ConfigError::new(
                "killed_exit_wait",
                "must be less than escalation_grace (a session waiting for its killed workers \
                 would be escalated)",
            ));
        }
        if self.max_concurrency == 0 || self.max_concurrency > MAX_CONCURRENCY {
            return Err(ConfigError::new(
                "max_concurrency",
                format!("must be at least 1 and at most {MAX_CONCURRENCY}"),
            ));
        }
        if self.retry.max_attempts == 0 || self.retry.max_attempts > MAX_ATTEMPTS {
            return Err(ConfigError::new(
                "retry.max_attempts",
                format!("must be at least 1 (the first attempt counts) and at most {MAX_ATTEMPTS}"),
            ));
        }
        let m = self.retry.multiplier;
        if !m.is_finite() || !(1.0..=MAX_MULTIPLIER).contains(&m) {
            return Err(ConfigError::new(
                "retry.multiplier",
                format!("must be a finite number from 1.0 to {MAX_MULTIPLIER}"),
            ));
        }
        at_most(
            "retry.initial_backoff",
            self.retry.initial_backoff,
            MAX_GRACE,
        )?;
        at_most("retry.max_backoff", self.retry.max_backoff, MAX_GRACE)?;
        if self.retry.max_backoff < self.retry.initial_backoff {
            return Err(ConfigError::new(
                "retry.max_backoff",
                "must be >= retry.initial_backoff",
            ));
        }
        if let Some(adaptive) = &self.adaptive {
            adaptive.validate(self)?;
        }
        Ok(())
    }

    /// [`Self::validate`], and the budget of a session of `resources` no longer than
    /// [`MAX_WORKFLOW_TIME`].
    pub fn validate_for(&self, resources: usize) -> Result<(), ConfigError> {
        self.validate()?;
        let budget = self.workflow_time(resources);
        if budget > MAX_WORKFLOW_TIME {
            return Err(ConfigError::new(
                "per_resource_estimate",
                format!(
                    "{resources} resources x {} + buffer {} gives a workflow_time of {}, \
                     longer than the most a session may take ({}): lower the estimate",
                    show(self.per_resource_estimate),
                    show(self.buffer),
                    show(budget),
                    show(MAX_WORKFLOW_TIME)
                ),
            ));
        }
        Ok(())
    }
}

/// A duration as a person reads it (`"1day"`, `"30s"`).
fn show(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

fn positive(field: &'static str, d: Duration) -> Result<(), ConfigError> {
    if d.is_zero() {
        return Err(ConfigError::new(field, "must be greater than zero"));
    }
    Ok(())
}

fn at_most(field: &'static str, d: Duration, max: Duration) -> Result<(), ConfigError> {
    if d > max {
        return Err(ConfigError::new(
            field,
            format!("must be at most {} (got {})", show(max), show(d)),
        ));
    }
    Ok(())
}

/// Settings of the whole tree.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct SupervisorConfig {
    /// The budget a session gets unless its request brings its own.
    pub session: SessionConfig,
    /// Events buffered per subscriber (1 to [`MAX_EVENT_CAPACITY`]); a subscriber further
    /// behind than this loses the oldest and is told how many.
    pub event_capacity: usize,
    /// What to do with the sessions this node takes over from a dead node (at start, or
    /// at a later rescue pass).
    pub recovery: RecoveryPolicy,
    /// What recovery does with a finalizer that a crash interrupted.
    pub finalizer_recovery: FinalizerRecovery,
    /// The longest wait between two tries of a store step that fails (a full disk, a lost
    /// connection) while a session is finalized: tries start 50 ms apart and double up
    /// to this, so once the store works again the session completes within this long.
    /// From [`MIN_STORE_RETRY`] to [`MAX_GRACE`].
    #[serde(with = "humantime_serde")]
    pub store_retry_max: Duration,
    /// The longest [`crate::Supervisor::shutdown`] waits for running sessions to finalize
    /// (with reason `Shutdown`): a session that has not finished by then (its store
    /// cannot complete it, its finalizer hangs) is left, as a crash would leave it, to the
    /// next node that takes it over (its lease ends at shutdown). More than zero, at most [`MAX_GRACE`] (1 day).
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// A name for this node (this process's supervisor) in logs, events and pages; the
    /// node's id is fresh at every start whatever its name. Several nodes may share a name.
    pub node_name: Option<String>,
    /// How long a node's lease lasts after each renewal (default 30 s), by the store's
    /// clock. Other nodes take over a node's sessions only once its lease has expired: a
    /// dead node's sessions wait this long plus up to a `rescue_interval` (a crashed
    /// process on the same host is noticed at once). At least twice
    /// `lease_renew_interval`.
    #[serde(with = "humantime_serde")]
    pub lease_ttl: Duration,
    /// How often the lease is renewed (default 10 s): one store write per node, whatever
    /// the number of sessions.
    #[serde(with = "humantime_serde")]
    pub lease_renew_interval: Duration,
    /// How often the node looks for sessions of dead nodes to take over (default 15 s,
    /// plus a random part of up to a fifth of it, so that nodes do not rescue in step).
    /// The first look is at start.
    #[serde(with = "humantime_serde")]
    pub rescue_interval: Duration,
    /// How many session starts are created at once (default 4, 1 to
    /// [`MAX_CONCURRENT_STARTS`]): more wait their turn, in about the order they came (a
    /// request that cannot start, an invalid config or id, is refused at once). A burst
    /// of starts (every harvester's cron at the same minute, 500 API calls at once) then
    /// takes a bounded share of the process: the sessions already running keep more of
    /// their pace, where creating hundreds of sessions at once left each of them a sliver of the
    /// CPU. A start's wait counts in no session's budget (its deadline counts from its
    /// creation); it is the `harvest_start_wait_seconds` metric. Starts still waiting at
    /// shutdown are refused with [`crate::StartError::SupervisorDown`].
    pub max_concurrent_starts: usize,
}

/// The shortest `lease_renew_interval` and `rescue_interval`.
pub const MIN_LEASE_RENEW: Duration = Duration::from_millis(10);

/// The longest `lease_renew_interval`.
pub const MAX_LEASE_RENEW: Duration = Duration::from_secs(3600);

/// The shortest `store_retry_max`.
pub const MIN_STORE_RETRY: Duration = Duration::from_millis(50);

/// The most `max_concurrent_starts`.
pub const MAX_CONCURRENT_STARTS: usize = 10_000;

impl Default for SupervisorConfig {
    fn default() -> Self {
        Self {
            session: SessionConfig::default(),
            event_capacity: 4096,
            recovery: RecoveryPolicy::default(),
            finalizer_recovery: FinalizerRecovery::default(),
            store_retry_max: Duration::from_secs(5),
            shutdown_timeout: Duration::from_secs(20),
            node_name: None,
            lease_ttl: Duration::from_secs(30),
            lease_renew_interval: Duration::from_secs(10),
            rescue_interval: Duration::from_secs(15),
            max_concurrent_starts: 4,
        }
    }
}

impl SupervisorConfig {
    /// Checks the session defaults and the tree's own settings.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.session.validate()?;
        if self.event_capacity == 0 || self.event_capacity > MAX_EVENT_CAPACITY {
            return Err(ConfigError::new(
                "event_capacity",
                format!(
                    "must be at least 1 and at most {MAX_EVENT_CAPACITY} (each subscriber's \
                     slots are allocated up front)"
                ),
            ));
        }
        if self.store_retry_max < MIN_STORE_RETRY {
            return Err(ConfigError::new(
                "store_retry_max",
                format!("must be at least {}", show(MIN_STORE_RETRY)),
            ));
        }
        at_most("store_retry_max", self.store_retry_max, MAX_GRACE)?;
        positive("shutdown_timeout", self.shutdown_timeout)?;
        at_most("shutdown_timeout", self.shutdown_timeout, MAX_GRACE)?;
        for (field, value, max) in [
            (
                "lease_renew_interval",
                self.lease_renew_interval,
                MAX_LEASE_RENEW,
            ),
            ("rescue_interval", self.rescue_interval, MAX_GRACE),
        ] {
            if value < MIN_LEASE_RENEW {
                return Err(ConfigError::new(
                    field,
                    format!("must be at least {}", show(MIN_LEASE_RENEW)),
                ));
            }
            at_most(field, value, max)?;
        }
        at_most("lease_ttl", self.lease_ttl, MAX_GRACE)?;
        if self.lease_ttl < self.lease_renew_interval.saturating_mul(2) {
            return Err(ConfigError::new(
                "lease_ttl",
                format!(
                    "must be at least twice lease_renew_interval ({}), so that one late \
                     renewal does not lose the lease (got {})",
                    show(self.lease_renew_interval),
                    show(self.lease_ttl)
                ),
            ));
        }
        if self.max_concurrent_starts == 0 || self.max_concurrent_starts > MAX_CONCURRENT_STARTS {
            return Err(ConfigError::new(
                "max_concurrent_starts",
                format!(
                    "must be at least 1 and at most {MAX_CONCURRENT_STARTS} (got {})",
                    self.max_concurrent_starts
                ),
            ));
        }
        if let Some(name) = &self.node_name
            && let Some(rule) = crate::model::id_problem(name)
        {
            return Err(ConfigError::new("node_name", rule));
        }
        Ok(())
    }
}

/// Chainable setters, one per field (`with_<field>`): the configs are `#[non_exhaustive]`
/// (a field added later breaks no construction downstream), so they are built from their
/// `Default` (or a value at hand) with these, or changed field by field.
macro_rules! setters {
    ($ty:ident { $($setter:ident => $field:ident: $t:ty),* $(,)? }) => {
        impl $ty {
            $(
                #[doc = concat!(
                    "Returns this ", stringify!($ty), " with [`", stringify!($field),
                    "`](Self::", stringify!($field), ") set to `value`."
                )]
                #[must_use]
                // `value` is the field's type, or `impl Into<Option<T>>` for an optional
                // one (`with_resource_timeout(Duration::from_secs(5))` or `(None)`).
                #[allow(clippy::useless_conversion)]
                pub fn $setter(mut self, value: $t) -> Self {
                    self.$field = value.into();
                    self
                }
            )*
        }
    };
}
pub(crate) use setters;

setters!(RetryPolicy {
    with_max_attempts => max_attempts: u32,
    with_initial_backoff => initial_backoff: Duration,
    with_multiplier => multiplier: f64,
    with_max_backoff => max_backoff: Duration,
});

setters!(SessionConfig {
    with_per_resource_estimate => per_resource_estimate: Duration,
    with_buffer => buffer: Duration,
    with_resource_timeout => resource_timeout: impl Into<Option<Duration>>,
    with_heartbeat_timeout => heartbeat_timeout: impl Into<Option<Duration>>,
    with_monitor_interval => monitor_interval: Duration,
    with_escalation_grace => escalation_grace: Duration,
    with_abort_grace => abort_grace: Duration,
    with_killed_exit_wait => killed_exit_wait: Duration,
    with_max_concurrency => max_concurrency: usize,
    with_retry => retry: RetryPolicy,
    with_failure_policy => failure_policy: FailurePolicy,
    with_adaptive => adaptive: impl Into<Option<crate::budget::AdaptiveBudget>>,
});

setters!(SupervisorConfig {
    with_session => session: SessionConfig,
    with_event_capacity => event_capacity: usize,
    with_recovery => recovery: RecoveryPolicy,
    with_finalizer_recovery => finalizer_recovery: FinalizerRecovery,
    with_store_retry_max => store_retry_max: Duration,
    with_shutdown_timeout => shutdown_timeout: Duration,
    with_node_name => node_name: impl Into<Option<String>>,
    with_lease_ttl => lease_ttl: Duration,
    with_lease_renew_interval => lease_renew_interval: Duration,
    with_rescue_interval => rescue_interval: Duration,
    with_max_concurrent_starts => max_concurrent_starts: usize,
});

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workflow_time_is_geonodes_formula() {
        let c = SessionConfig::default();
        assert_eq!(c.workflow_time(10), Duration::from_secs(10 * 20 + 1200));
        assert_eq!(c.workflow_time(0), Duration::from_secs(1200));
        let huge = SessionConfig {
            per_resource_estimate: Duration::MAX,
            ..SessionConfig::default()
        };
        assert_eq!(huge.workflow_time(2), Duration::MAX);
        assert_eq!(
            c.workflow_time(1_000_000),
            Duration::from_secs(20_000_000 + 1200)
        );
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let r = RetryPolicy {
            max_attempts: 10,
            initial_backoff: Duration::from_secs(1),
            multiplier: 2.0,
            max_backoff: Duration::from_secs(5),
        };
        assert_eq!(r.backoff(1), Duration::from_secs(1));
        assert_eq!(r.backoff(2), Duration::from_secs(2));
        assert_eq!(r.backoff(3), Duration::from_secs(4));
        assert_eq!(r.backoff(4), Duration::from_secs(5));
        assert_eq!(r.backoff(u32::MAX), Duration::from_secs(5));
    }

    #[test]
    fn config_reads_human_durations() {
        let c: SessionConfig = serde_json::from_str(
            r#"{"per_resource_estimate":"2s","buffer":"1m","resource_timeout":"30s","max_concurrency":4}"#,
        )
        .expect("parse");
        assert_eq!(c.per_resource_estimate, Duration::from_secs(2));
        assert_eq!(c.buffer, Duration::from_secs(60));
        assert_eq!(c.max_concurrency, 4);
        c.validate().expect("valid");
    }

    #[test]
    fn invalid_fields_are_named() {
        let mut c = SessionConfig {
            max_concurrency: 0,
            ..SessionConfig::default()
        };
        assert_eq!(
            c.validate().expect_err("invalid").field(),
            "max_concurrency"
        );
        c.max_concurrency = 1;
        c.retry.max_attempts = 0;
        assert_eq!(
            c.validate().expect_err("invalid").field(),
            "retry.max_attempts"
        );
        c.retry.max_attempts = 1;
        c.monitor_interval = Duration::ZERO;
        assert_eq!(
            c.validate().expect_err("invalid").field(),
            "monitor_interval"
        );
    }
}
