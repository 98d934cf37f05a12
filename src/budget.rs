//! Adaptive budgets: a session's deadline (and optionally its per-attempt timeout) learned
//! from its harvester's history instead of guessed.
//!
//! GeoNode's `workflow_time = 20 s x resources + 1200 s` is a guess: too short kills good
//! harvests, too long leaves a stuck one undetected for hours. The store keeps how long
//! every resource took; with [`SessionConfig::adaptive`] set, a session's budget is
//! computed from the most recent successful durations of its harvester when it starts:
//!
//! - `observed` = the `quantile` of the last `window` successful durations (nearest rank;
//!   a duration runs from a resource's first attempt to its success, retries and their
//!   backoff included), and `mean` their average;
//! - the session runs `lanes = ceil(resources / max_concurrency)` rounds on each of its
//!   concurrent slots; one slot's work is budgeted as `margin x (lanes x mean +
//!   observed)`: its share at the average pace, plus one resource as slow as the quantile
//!   (the slowest it is expected to meet), with the margin on top. A sum of many
//!   durations stays close to its mean while a single one may sit far in the tail: a
//!   quantile per resource would budget a long session many times what it takes;
//! - `per_resource_estimate` = that slot's budget `/ resources` (so that GeoNode's
//!   `resources x estimate + buffer` gives it), kept between `floor` and `ceiling`;
//! - `buffer` = [`AdaptiveBudget::buffer`];
//! - with [`AdaptiveBudget::timeout_multiple`], `resource_timeout` = `observed x
//!   multiple`, at least `min_timeout` (Spark's speculation and Jenkins' elastic timeout
//!   work the same way);
//! - unless [`AdaptiveBudget::below_static`] is set, each learned value is only ever used
//!   to lengthen the config's own: the budget is never shorter than the static formula
//!   (the adaptive budget then saves good harvests from a guess that is too short, and
//!   opting in lets it catch a stuck one sooner too);
//! - until the history holds `min_samples` durations, the static formula applies.
//!
//! The choice is made once, when the session is created, and stored with it: a session
//! resumed after a crash keeps what was learned, its budget for the resources it has left
//! computed the same way (their rounds at the mean pace plus one at the quantile, with the
//! margin, never less than the stored formula gives). Its source is in the session's
//! [`EventKind::SessionStarted`](crate::EventKind::SessionStarted) event, in the
//! [`SessionReport`](crate::SessionReport) and in [`SessionConfig::budget_source`].
//!
//! Only successes are samples: a resource cut by its timeout never says how long it would
//! have taken. An adaptive timeout that is too tight therefore learns nothing from what it
//! cut; keep `timeout_multiple` generous (4 or more at a high quantile) and the static
//! timeout as the lower bound (`below_static: false`) until the history is trusted.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::{
    MAX_BUFFER, MAX_MULTIPLIER, MAX_PER_RESOURCE_ESTIMATE, MAX_TIMEOUT, MAX_WORKFLOW_TIME,
    SessionConfig,
};
use crate::error::ConfigError;

/// The most durations an adaptive budget reads from the history (its `window`).
pub const MAX_WINDOW: usize = 100_000;

/// How a session's budget is learned from its harvester's history; see the
/// [module docs](self). Set it on [`SessionConfig::adaptive`].
///
/// ```
/// use harvest_supervisor::SessionConfig;
/// use harvest_supervisor::budget::AdaptiveBudget;
/// use std::time::Duration;
///
/// // The p99 of the last 10,000 successes, doubled; hung attempts cut at 4 x p99; and
/// // allowed below GeoNode's formula, so that a stuck session is caught early.
/// let config = SessionConfig::default().with_adaptive(
///     AdaptiveBudget::default()
///         .with_below_static(true)
///         .with_timeout_multiple(4.0),
/// );
/// config.validate()?;
/// // The same from JSON (fields left out keep their defaults):
/// let read: SessionConfig = serde_json::from_str(
///     r#"{ "adaptive": { "below_static": true, "timeout_multiple": 4.0 } }"#,
/// )?;
/// assert_eq!(read, config);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct AdaptiveBudget {
    /// Which quantile of the successful durations a resource is expected to stay within
    /// (more than 0, at most 1; 0.99 by default).
    pub quantile: f64,
    /// Each concurrent slot's expected work (its rounds at the mean pace plus one resource
    /// at the quantile) is multiplied by this (1 to 1,000; 2 by default).
    pub margin: f64,
    /// How many successful durations the history must hold before the learned budget
    /// applies; the static formula until then (1 to `window`; 100 by default).
    pub min_samples: usize,
    /// How many of the most recent successful durations are read (1 to [`MAX_WINDOW`];
    /// 10,000 by default).
    pub window: usize,
    /// The least per-resource estimate (more than zero; 1 ms by default).
    #[serde(with = "humantime_serde")]
    pub floor: Duration,
    /// The most per-resource estimate (at least `floor`, at most 1 day; 1 h by default).
    #[serde(with = "humantime_serde")]
    pub ceiling: Duration,
    /// The fixed slack of a learned budget, instead of the config's `buffer` (at most 30
    /// days; 60 s by default). Without `below_static`, the longer of the two.
    #[serde(with = "humantime_serde")]
    pub buffer: Duration,
    /// Whether the learned budget may be shorter than the config's static one (false by
    /// default: it only ever lengthens it).
    pub below_static: bool,
    /// When set, `resource_timeout` is learned too: the observed quantile times this (1 to
    /// 1,000). Without `below_static`, never shorter than the config's own timeout, and
    /// no timeout stays no timeout. A skewed distribution's far tail outruns any small
    /// multiple of its p99 (at 4 x p99, about 1 healthy attempt in 7,000 was cut in the
    /// simulation of BENCHMARKS.md): pair it with a retry (`retry.max_attempts` 2 or
    /// more), or keep it generous.
    pub timeout_multiple: Option<f64>,
    /// The least learned `resource_timeout` (more than zero; 1 s by default).
    #[serde(with = "humantime_serde")]
    pub min_timeout: Duration,
}

impl Default for AdaptiveBudget {
    fn default() -> Self {
        Self {
            quantile: 0.99,
            margin: 2.0,
            min_samples: 100,
            window: 10_000,
            floor: Duration::from_millis(1),
            ceiling: Duration::from_secs(3600),
            buffer: Duration::from_secs(60),
            below_static: false,
            timeout_multiple: None,
            min_timeout: Duration::from_secs(1),
        }
    }
}

crate::config::setters!(AdaptiveBudget {
    with_quantile => quantile: f64,
    with_margin => margin: f64,
    with_min_samples => min_samples: usize,
    with_window => window: usize,
    with_floor => floor: Duration,
    with_ceiling => ceiling: Duration,
    with_buffer => buffer: Duration,
    with_below_static => below_static: bool,
    with_timeout_multiple => timeout_multiple: impl Into<Option<f64>>,
    with_min_timeout => min_timeout: Duration,
});

impl AdaptiveBudget {
    /// Checks every field against its bounds, and that a learned budget always leaves the
    /// monitor of `config` time to look (`floor + buffer >= monitor_interval`).
    pub(crate) fn validate(&self, config: &SessionConfig) -> Result<(), ConfigError> {
        let q = self.quantile;
        if !q.is_finite() || q <= 0.0 || q > 1.0 {
            return Err(ConfigError::new(
                "adaptive.quantile",
                "must be a number more than 0 and at most 1 (0.99 is the 99th percentile)",
            ));
        }
        multiple("adaptive.margin", self.margin)?;
        if self.window == 0 || self.window > MAX_WINDOW {
            return Err(ConfigError::new(
                "adaptive.window",
                format!("must be at least 1 and at most {MAX_WINDOW}"),
            ));
        }
        if self.min_samples == 0 || self.min_samples > self.window {
            return Err(ConfigError::new(
                "adaptive.min_samples",
                "must be at least 1 and at most adaptive.window",
            ));
        }
        if self.floor.is_zero() {
            return Err(ConfigError::new(
                "adaptive.floor",
                "must be greater than zero",
            ));
        }
        if self.ceiling > MAX_PER_RESOURCE_ESTIMATE {
            return Err(ConfigError::new(
                "adaptive.ceiling",
                "must be at most 1day (the most per_resource_estimate may be)",
            ));
        }
        if self.floor > self.ceiling {
            return Err(ConfigError::new(
                "adaptive.floor",
                "must be at most adaptive.ceiling",
            ));
        }
        if self.buffer > MAX_BUFFER {
            return Err(ConfigError::new(
                "adaptive.buffer",
                "must be at most 30days (the most buffer may be)",
            ));
        }
        if self.below_static && self.floor.saturating_add(self.buffer) < config.monitor_interval {
            return Err(ConfigError::new(
                "adaptive.buffer",
                "adaptive.floor + adaptive.buffer must be at least monitor_interval: a learned \
                 budget could end before the monitor first looks",
            ));
        }
        if let Some(m) = self.timeout_multiple {
            multiple("adaptive.timeout_multiple", m)?;
        }
        if self.min_timeout.is_zero() || self.min_timeout > MAX_TIMEOUT {
            return Err(ConfigError::new(
                "adaptive.min_timeout",
                "must be greater than zero and at most 30days",
            ));
        }
        Ok(())
    }
}

fn multiple(field: &'static str, m: f64) -> Result<(), ConfigError> {
    if !m.is_finite() || !(1.0..=MAX_MULTIPLIER).contains(&m) {
        return Err(ConfigError::new(
            field,
            format!("must be a finite number from 1.0 to {MAX_MULTIPLIER}"),
        ));
    }
    Ok(())
}

/// How a session's budget was chosen: in its `SessionStarted` event, its report and its
/// stored config ([`SessionConfig::budget_source`]). Serialized with a `"source"` tag.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(tag = "source", rename_all = "kebab-case")]
#[non_exhaustive]
pub enum BudgetSource {
    /// The config's static formula: no adaptive budget was asked for.
    #[default]
    Static,
    /// An adaptive budget was asked for, but the history held fewer successful durations
    /// than `min_samples`: the static formula.
    TooFewSamples {
        /// Successful durations found.
        samples: usize,
        /// `min_samples`.
        needed: usize,
    },
    /// An adaptive budget was asked for, but the history could not be read: the static
    /// formula.
    HistoryUnavailable {
        /// Why.
        error: String,
    },
    /// A budget was learned, but the config it made was not valid for the session: the
    /// static formula.
    LearnedInvalid {
        /// Why.
        error: String,
    },
    /// Learned from the history. The values the session runs under are in its config
    /// (without `below_static`, the longer of the learned and the static ones).
    Adaptive {
        /// Successful durations read.
        samples: usize,
        /// The quantile taken.
        quantile: f64,
        /// The margin applied (kept so that a session resumed with fewer resources gets
        /// the same budget for them).
        #[serde(default = "default_margin")]
        margin: f64,
        /// The quantile's value among the samples.
        #[serde(rename = "observed_ms", with = "crate::millis")]
        observed: Duration,
        /// The samples' average.
        #[serde(rename = "mean_ms", with = "crate::millis", default)]
        mean: Duration,
        /// The per-resource estimate learned (before the static formula's floor).
        #[serde(rename = "learned_estimate_ms", with = "crate::millis")]
        learned_estimate: Duration,
        /// The resource timeout learned, when `timeout_multiple` asked for one.
        #[serde(
            rename = "learned_timeout_ms",
            with = "crate::millis::option",
            default,
            skip_serializing_if = "Option::is_none"
        )]
        learned_timeout: Option<Duration>,
    },
}

impl BudgetSource {
    /// Whether the budget was learned from the history.
    pub fn is_adaptive(&self) -> bool {
        matches!(self, Self::Adaptive { .. })
    }
}

impl std::fmt::Display for BudgetSource {
    /// One line for a person: `static`, `static (12 of 100 samples)`, `adaptive (p99 of
    /// 4000 samples: 3.2s)`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Static => f.write_str("static"),
            Self::TooFewSamples { samples, needed } => {
                write!(f, "static ({samples} of {needed} samples)")
            }
            Self::HistoryUnavailable { error } => {
                write!(f, "static (history unavailable: {error})")
            }
            Self::LearnedInvalid { error } => {
                write!(f, "static (learned budget invalid: {error})")
            }
            Self::Adaptive {
                samples,
                quantile,
                observed,
                ..
            } => write!(
                f,
                "adaptive (p{} of {samples} samples: {})",
                (quantile * 10_000.0).round() / 100.0,
                humantime::format_duration(round_ms(*observed))
            ),
        }
    }
}

fn default_margin() -> f64 {
    AdaptiveBudget::default().margin
}

/// The budget of a session resumed with `resources` left to harvest, under the config it
/// was stored with: the stored formula's, or for a learned budget, the same slot
/// computation for what is left (the learned estimate is a share of the whole session's
/// budget, and would give a few resources left far too little), whichever is longer.
pub(crate) fn resumed_workflow_time(config: &SessionConfig, resources: usize) -> Duration {
    let formula = config.workflow_time(resources);
    let BudgetSource::Adaptive {
        margin,
        mean,
        observed,
        ..
    } = config.budget_source()
    else {
        return formula;
    };
    if resources == 0 || !margin.is_finite() || *margin < 1.0 {
        return formula;
    }
    let lanes = resources.div_ceil(config.max_concurrency.max(1)) as f64;
    let slot = secs(margin * (lanes * mean.as_secs_f64() + observed.as_secs_f64()));
    let learned = slot.saturating_add(config.buffer).min(MAX_WORKFLOW_TIME);
    formula.max(learned)
}

fn round_ms(d: Duration) -> Duration {
    Duration::from_millis(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The config a session of `resources` runs under, given the successful durations its
/// harvester's history holds (newest first, at most `window`; `Err` if they could not be
/// read), and how it was chosen. `config` has been validated for `resources`; so is the
/// answer (a learned budget that would not validate falls back to the static one).
pub(crate) fn choose(
    config: SessionConfig,
    resources: usize,
    history: Result<Vec<Duration>, String>,
) -> SessionConfig {
    let Some(adaptive) = config.adaptive.clone() else {
        return config.with_budget_source(BudgetSource::Static);
    };
    let mut samples = match history {
        Ok(samples) => samples,
        Err(error) => {
            return config.with_budget_source(BudgetSource::HistoryUnavailable { error });
        }
    };
    samples.truncate(adaptive.window);
    if samples.len() < adaptive.min_samples {
        let source = BudgetSource::TooFewSamples {
            samples: samples.len(),
            needed: adaptive.min_samples,
        };
        return config.with_budget_source(source);
    }
    let mean = average(&samples);
    let observed = quantile(&mut samples, adaptive.quantile);
    let learned_estimate = estimate(&adaptive, &config, mean, observed, resources);
    let learned_timeout = adaptive
        .timeout_multiple
        .map(|m| scale(observed, m).clamp(adaptive.min_timeout, MAX_TIMEOUT));

    let mut applied = config.clone();
    if adaptive.below_static {
        applied.per_resource_estimate = learned_estimate;
        applied.buffer = adaptive.buffer;
        if learned_timeout.is_some() {
            applied.resource_timeout = learned_timeout;
        }
    } else {
        applied.per_resource_estimate = learned_estimate.max(config.per_resource_estimate);
        applied.buffer = adaptive.buffer.max(config.buffer);
        // No timeout is longer than any.
        if let (Some(static_t), Some(learned)) = (config.resource_timeout, learned_timeout) {
            applied.resource_timeout = Some(learned.max(static_t));
        }
    }
    // The longest budget a session may have, whatever the history says.
    if applied.workflow_time(resources) > MAX_WORKFLOW_TIME {
        applied.per_resource_estimate = most_estimate(resources, applied.buffer);
    }
    let source = BudgetSource::Adaptive {
        samples: samples.len(),
        quantile: adaptive.quantile,
        margin: adaptive.margin,
        observed,
        mean,
        learned_estimate,
        learned_timeout,
    };
    // Stored as applied: a session started again from this config is static, with the
    // values learned this time (no second learning on top of the first).
    applied.adaptive = None;
    let applied = applied.with_budget_source(source);
    match applied.validate_for(resources) {
        Ok(()) => applied,
        Err(error) => {
            tracing::warn!(%error, "the learned budget is not valid: the static one applies");
            let error = error.to_string();
            config.with_budget_source(BudgetSource::LearnedInvalid { error })
        }
    }
}

/// The nearest-rank `q` quantile of `samples` (not empty; reordered).
fn quantile(samples: &mut [Duration], q: f64) -> Duration {
    let n = samples.len();
    // 1 <= rank <= n: `q` is in (0, 1]. The product is rounded down by a hair first:
    // 0.07 x 100 is 7.000000000000001 in floating point, whose ceiling would be rank 8.
    let rank = ((q * n as f64 - 1e-9).ceil() as usize).clamp(1, n.max(1));
    let index = rank - 1;
    match samples.get(index) {
        Some(_) => *samples.select_nth_unstable(index).1,
        None => Duration::ZERO,
    }
}

/// The average of `samples` (not empty), exact to the nanosecond.
fn average(samples: &[Duration]) -> Duration {
    let sum: u128 = samples.iter().map(Duration::as_nanos).sum();
    let mean = sum / (samples.len().max(1) as u128);
    Duration::from_nanos(u64::try_from(mean).unwrap_or(u64::MAX))
}

/// `margin x (lanes x mean + observed) / resources`, `lanes = ceil(resources /
/// concurrency)`, between the floor and the ceiling (see the module docs).
fn estimate(
    adaptive: &AdaptiveBudget,
    config: &SessionConfig,
    mean: Duration,
    observed: Duration,
    resources: usize,
) -> Duration {
    if resources == 0 {
        return adaptive.floor;
    }
    let lanes = resources.div_ceil(config.max_concurrency.max(1)) as f64;
    let slot = adaptive.margin * (lanes * mean.as_secs_f64() + observed.as_secs_f64());
    secs(slot / resources as f64).clamp(adaptive.floor, adaptive.ceiling)
}

/// `d x m`, saturating at `Duration::MAX`.
fn scale(d: Duration, m: f64) -> Duration {
    secs(d.as_secs_f64() * m)
}

/// Seconds as a duration: NaN or negative is zero, past `Duration::MAX` is `MAX`.
fn secs(s: f64) -> Duration {
    Duration::try_from_secs_f64(s).unwrap_or(if s > 0.0 {
        Duration::MAX
    } else {
        Duration::ZERO
    })
}

/// The longest estimate that keeps `resources x estimate + buffer` within
/// [`MAX_WORKFLOW_TIME`].
fn most_estimate(resources: usize, buffer: Duration) -> Duration {
    let room = MAX_WORKFLOW_TIME.saturating_sub(buffer).as_nanos();
    let each = room / (resources.max(1) as u128);
    Duration::from_nanos(u64::try_from(each).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// 1..=100 ms: p99 is 99 ms, p50 50 ms.
    fn hundred() -> Vec<Duration> {
        (1..=100).rev().map(ms).collect()
    }

    /// Within a microsecond (the estimate is a share of the budget, rounded to the
    /// nanosecond, and multiplied back).
    fn close(a: Duration, b: Duration) {
        assert!(
            a.abs_diff(b) < Duration::from_micros(1),
            "{a:?} is not {b:?}"
        );
    }

    fn learned(config: &SessionConfig) -> (Duration, Option<Duration>) {
        match config.budget_source() {
            BudgetSource::Adaptive {
                learned_estimate,
                learned_timeout,
                ..
            } => (*learned_estimate, *learned_timeout),
            other => panic!("not adaptive: {other:?}"),
        }
    }

    #[test]
    fn without_adaptive_the_config_is_static() {
        let c = choose(SessionConfig::default(), 10, Ok(hundred()));
        assert_eq!(c.budget_source(), &BudgetSource::Static);
        assert_eq!(c.per_resource_estimate, Duration::from_secs(20));
    }

    #[test]
    fn too_few_samples_or_no_history_keep_the_static_formula() {
        let config = SessionConfig::default()
            .with_adaptive(AdaptiveBudget::default().with_below_static(true));
        let c = choose(config.clone(), 10, Ok(hundred()[..99].to_vec()));
        assert_eq!(
            c.budget_source(),
            &BudgetSource::TooFewSamples {
                samples: 99,
                needed: 100
            }
        );
        assert_eq!(c.workflow_time(10), config.workflow_time(10));
        let c = choose(config.clone(), 10, Err("gone".into()));
        assert!(matches!(
            c.budget_source(),
            BudgetSource::HistoryUnavailable { .. }
        ));
        assert_eq!(c.workflow_time(10), config.workflow_time(10));
    }

    #[test]
    fn the_estimate_is_the_quantile_times_the_margin_per_concurrent_lane() {
        let adaptive = AdaptiveBudget::default()
            .with_below_static(true)
            .with_timeout_multiple(4.0);
        let config = SessionConfig::default()
            .with_max_concurrency(10)
            .with_adaptive(adaptive);
        // Mean 50.5 ms, p99 99 ms. 100 resources on 10 slots: 10 rounds each, budgeted
        // 2 x (10 x 50.5 + 99) ms = 1208 ms.
        let c = choose(config.clone(), 100, Ok(hundred()));
        assert_eq!(c.per_resource_estimate, Duration::from_micros(12_080));
        assert_eq!(c.workflow_time(100), ms(1208) + Duration::from_secs(60));
        assert_eq!(
            c.resource_timeout,
            Some(Duration::from_secs(1)),
            "min_timeout"
        );
        assert_eq!(
            learned(&c),
            (Duration::from_micros(12_080), Some(Duration::from_secs(1)))
        );
        assert!(c.adaptive.is_none(), "stored as applied");
        // 15 resources on 10 slots: two rounds, 2 x (2 x 50.5 + 99) ms.
        let c = choose(config.clone(), 15, Ok(hundred()));
        close(c.workflow_time(15), ms(400) + Duration::from_secs(60));
        // Fewer resources than slots: one round, 2 x (50.5 + 99) ms.
        let c = choose(config, 3, Ok(hundred()));
        close(c.workflow_time(3), ms(299) + Duration::from_secs(60));
    }

    #[test]
    fn without_below_static_it_only_ever_lengthens() {
        let adaptive = AdaptiveBudget::default().with_timeout_multiple(4.0);
        let config = SessionConfig::default()
            .with_max_concurrency(1)
            .with_adaptive(adaptive);
        let fast = choose(config.clone(), 5, Ok(hundred()));
        assert_eq!(fast.workflow_time(5), config.workflow_time(5));
        assert_eq!(fast.resource_timeout, config.resource_timeout);
        assert!(fast.budget_source().is_adaptive());
        // A slow harvester: 200 s per resource, one at a time: 5 resources budgeted
        // 2 x (5 x 200 + 200) s; timeouts of 4 x 200 s (longer than the static 600 s).
        let slow: Vec<_> = (0..200).map(|_| Duration::from_secs(200)).collect();
        let c = choose(config.clone(), 5, Ok(slow.clone()));
        assert_eq!(c.per_resource_estimate, Duration::from_secs(480));
        assert_eq!(c.buffer, config.buffer);
        assert_eq!(c.resource_timeout, Some(Duration::from_secs(800)));
        // Learned 4 x 100 s is shorter than the static 600 s: the static one stays.
        let slowish: Vec<_> = (0..200).map(|_| Duration::from_secs(100)).collect();
        let c = choose(config.clone(), 5, Ok(slowish));
        assert_eq!(c.resource_timeout, Some(Duration::from_secs(600)));
        assert_eq!(learned(&c).1, Some(Duration::from_secs(400)));
        // No static timeout: none learned either.
        let none = config.with_resource_timeout(None);
        let c = choose(none, 5, Ok(hundred()));
        assert_eq!(c.resource_timeout, None);
    }

    #[test]
    fn the_window_and_quantile_take_the_newest_samples_by_rank() {
        let adaptive = AdaptiveBudget::default()
            .with_below_static(true)
            .with_window(10)
            .with_min_samples(10)
            .with_quantile(0.5)
            .with_margin(1.0);
        let config = SessionConfig::default()
            .with_max_concurrency(1)
            .with_adaptive(adaptive);
        // Newest first: 100, 99, ... 91 are the window; its median (rank 5) is 95, its
        // mean 95.5: one resource, one slot: 95.5 + 95 ms.
        let c = choose(config.clone(), 1, Ok(hundred()));
        assert_eq!(c.per_resource_estimate, Duration::from_micros(190_500));
        let c = choose(config.clone(), 1, Ok(vec![ms(7); 10]));
        assert_eq!(c.per_resource_estimate, ms(14));
        // q = 1 is the longest.
        let c = choose(
            config.with_adaptive(
                AdaptiveBudget::default()
                    .with_below_static(true)
                    .with_quantile(1.0)
                    .with_margin(1.0)
                    .with_min_samples(1),
            ),
            1,
            Ok(hundred()),
        );
        assert_eq!(c.per_resource_estimate, Duration::from_micros(150_500));
    }

    #[test]
    fn extremes_stay_within_the_bounds() {
        let adaptive = AdaptiveBudget::default()
            .with_below_static(true)
            .with_min_samples(1)
            .with_margin(MAX_MULTIPLIER)
            .with_ceiling(MAX_PER_RESOURCE_ESTIMATE)
            .with_timeout_multiple(MAX_MULTIPLIER);
        let config = SessionConfig::default()
            .with_max_concurrency(1)
            .with_adaptive(adaptive);
        // Durations of a year each: the ceiling, the timeout's bound, the year's budget.
        let c = choose(config.clone(), 1_000_000, Ok(vec![Duration::MAX; 3]));
        assert!(c.budget_source().is_adaptive());
        assert!(c.workflow_time(1_000_000) <= MAX_WORKFLOW_TIME);
        assert_eq!(c.resource_timeout, Some(MAX_TIMEOUT));
        c.validate_for(1_000_000).expect("valid");
        // Zero durations: the floor.
        let c = choose(config.clone(), 10, Ok(vec![Duration::ZERO; 3]));
        assert_eq!(c.per_resource_estimate, ms(1));
        c.validate_for(10).expect("valid");
        // No resources at all.
        let c = choose(config, 0, Ok(vec![ms(5); 3]));
        assert_eq!(c.workflow_time(0), Duration::from_secs(60));
    }

    #[test]
    fn a_resumed_session_gets_the_learned_budget_for_what_it_has_left() {
        let config = SessionConfig::default()
            .with_max_concurrency(16)
            .with_adaptive(AdaptiveBudget::default().with_below_static(true));
        // 1,000 resources: 63 rounds per slot; the estimate is a thousandth of the slot's
        // 2 x (63 x 50.5 + 99) ms.
        let applied = choose(config.clone(), 1000, Ok(hundred()));
        close(applied.per_resource_estimate, Duration::from_micros(6_561));
        assert_eq!(
            resumed_workflow_time(&applied, 1000),
            applied.workflow_time(1000)
        );
        // 16 left after a crash: one round, 2 x (50.5 + 99) ms, not 16 thousandths.
        close(
            resumed_workflow_time(&applied, 16),
            ms(299) + Duration::from_secs(60),
        );
        assert!(resumed_workflow_time(&applied, 16) > applied.workflow_time(16));
        // A static budget resumes as it always did.
        let fixed = choose(SessionConfig::default(), 1000, Ok(hundred()));
        assert_eq!(resumed_workflow_time(&fixed, 16), fixed.workflow_time(16));
    }

    #[test]
    fn the_rank_is_exact_where_floating_point_is_not() {
        // 0.07 x 100 = 7.000000000000001: still the 7th.
        let mut samples: Vec<Duration> = (1..=100).map(ms).collect();
        assert_eq!(quantile(&mut samples, 0.07), ms(7));
        assert_eq!(quantile(&mut samples, 0.5), ms(50));
        assert_eq!(quantile(&mut samples, 0.001), ms(1));
        assert_eq!(quantile(&mut samples, 1.0), ms(100));
        assert_eq!(quantile(&mut [ms(3)], 0.99), ms(3));
    }

    #[test]
    fn bad_settings_are_named() {
        let cases = [
            (
                AdaptiveBudget::default().with_quantile(0.0),
                "adaptive.quantile",
            ),
            (
                AdaptiveBudget::default().with_quantile(f64::NAN),
                "adaptive.quantile",
            ),
            (
                AdaptiveBudget::default().with_quantile(1.5),
                "adaptive.quantile",
            ),
            (
                AdaptiveBudget::default().with_margin(0.5),
                "adaptive.margin",
            ),
            (
                AdaptiveBudget::default().with_margin(f64::INFINITY),
                "adaptive.margin",
            ),
            (AdaptiveBudget::default().with_window(0), "adaptive.window"),
            (
                AdaptiveBudget::default().with_window(MAX_WINDOW + 1),
                "adaptive.window",
            ),
            (
                AdaptiveBudget::default().with_min_samples(0),
                "adaptive.min_samples",
            ),
            (
                AdaptiveBudget::default()
                    .with_window(10)
                    .with_min_samples(11),
                "adaptive.min_samples",
            ),
            (
                AdaptiveBudget::default().with_floor(Duration::ZERO),
                "adaptive.floor",
            ),
            (
                AdaptiveBudget::default().with_floor(Duration::from_secs(7200)),
                "adaptive.floor",
            ),
            (
                AdaptiveBudget::default().with_ceiling(Duration::MAX),
                "adaptive.ceiling",
            ),
            (
                AdaptiveBudget::default().with_buffer(Duration::MAX),
                "adaptive.buffer",
            ),
            (
                AdaptiveBudget::default()
                    .with_below_static(true)
                    .with_buffer(Duration::from_secs(1)),
                "adaptive.buffer",
            ),
            (
                AdaptiveBudget::default().with_timeout_multiple(0.0),
                "adaptive.timeout_multiple",
            ),
            (
                AdaptiveBudget::default().with_min_timeout(Duration::ZERO),
                "adaptive.min_timeout",
            ),
        ];
        for (adaptive, field) in cases {
            let config = SessionConfig::default().with_adaptive(adaptive);
            let error = config.validate().expect_err(field);
            assert_eq!(error.field(), field, "{error}");
        }
        SessionConfig::default()
            .with_adaptive(AdaptiveBudget::default())
            .validate()
            .expect("the defaults are valid");
    }

    #[test]
    fn the_source_reads_back_and_shows_in_one_line() {
        let source = BudgetSource::Adaptive {
            samples: 4000,
            quantile: 0.99,
            margin: 2.0,
            observed: ms(3200),
            mean: ms(800),
            learned_estimate: ms(400),
            learned_timeout: None,
        };
        let json = serde_json::to_string(&source).expect("json");
        assert_eq!(
            json,
            r#"{"source":"adaptive","samples":4000,"quantile":0.99,"margin":2.0,"observed_ms":3200.0,"mean_ms":800.0,"learned_estimate_ms":400.0}"#
        );
        assert_eq!(
            serde_json::from_str::<BudgetSource>(&json).expect("reads"),
            source
        );
        assert_eq!(
            source.to_string(),
            "adaptive (p99 of 4000 samples: 3s 200ms)"
        );
        assert_eq!(BudgetSource::Static.to_string(), "static");
        let fine = BudgetSource::Adaptive {
            samples: 10,
            quantile: 0.9999,
            margin: 2.0,
            observed: ms(5),
            mean: ms(1),
            learned_estimate: ms(1),
            learned_timeout: None,
        };
        assert_eq!(fine.to_string(), "adaptive (p99.99 of 10 samples: 5ms)");
    }
}
