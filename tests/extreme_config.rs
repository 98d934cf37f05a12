//! Configs at their extremes: every duration and size has an upper bound that keeps the
//! watchdog meaningful, validation names the field, and any config that validates starts
//! sessions that end, with no panic anywhere (a property test over the whole space).

mod common;

use std::time::Duration;

use common::{FinalizerMode, Recorder, TIMEOUT, supervisor_with};
use harvest_supervisor::{
    Error, FailurePolicy, HarvestContext, RetryPolicy, SessionConfig, SessionRequest, StartError,
    Supervisor, SupervisorConfig, finalizer_fn, harvest_fn,
};
use proptest::prelude::*;

/// A thousand years, as a user would type it.
fn years_1000() -> Duration {
    humantime::parse_duration("1000years").expect("a duration")
}

#[test]
fn a_monitor_interval_beyond_any_deadline_is_rejected() {
    for interval in [Duration::MAX, years_1000(), Duration::from_secs(2 * 86_400)] {
        let c = SessionConfig::default().with_monitor_interval(interval);
        let e = c.validate().expect_err("too long an interval");
        assert_eq!(e.field(), "monitor_interval", "{interval:?}: {e}");
    }
    // Longer than the whole budget of a one-resource session: the watchdog would look only
    // after the deadline had long passed.
    let c = SessionConfig::default()
        .with_per_resource_estimate(Duration::from_secs(1))
        .with_buffer(Duration::from_secs(10))
        .with_monitor_interval(Duration::from_secs(12));
    let e = c.validate().expect_err("interval past the deadline");
    assert_eq!(e.field(), "monitor_interval");
    assert!(e.rule().contains("workflow_time"), "{e}");
}

#[test]
fn every_duration_has_an_upper_bound() {
    let huge = Duration::MAX;
    let cases: Vec<(&str, SessionConfig)> = vec![
        (
            "per_resource_estimate",
            SessionConfig::default().with_per_resource_estimate(huge),
        ),
        ("buffer", SessionConfig::default().with_buffer(huge)),
        (
            "resource_timeout",
            SessionConfig::default().with_resource_timeout(Some(huge)),
        ),
        (
            "heartbeat_timeout",
            SessionConfig::default().with_heartbeat_timeout(Some(huge)),
        ),
        (
            "escalation_grace",
            SessionConfig::default().with_escalation_grace(huge),
        ),
        (
            "abort_grace",
            SessionConfig::default().with_abort_grace(huge),
        ),
        (
            "killed_exit_wait",
            SessionConfig::default().with_killed_exit_wait(huge),
        ),
        (
            "max_concurrency",
            SessionConfig::default().with_max_concurrency(usize::MAX),
        ),
        (
            "retry.initial_backoff",
            SessionConfig::default().with_retry(
                RetryPolicy::default()
                    .with_initial_backoff(huge)
                    .with_max_backoff(huge),
            ),
        ),
        (
            "retry.max_backoff",
            SessionConfig::default().with_retry(RetryPolicy::default().with_max_backoff(huge)),
        ),
        (
            "retry.max_attempts",
            SessionConfig::default().with_retry(RetryPolicy::default().with_max_attempts(u32::MAX)),
        ),
        (
            "retry.multiplier",
            SessionConfig::default().with_retry(RetryPolicy::default().with_multiplier(1e300)),
        ),
    ];
    for (field, config) in cases {
        let e = config.validate().expect_err(field);
        assert_eq!(e.field(), field, "{e}");
    }
}

#[test]
fn the_killed_exit_wait_must_end_before_the_monitor_escalates() {
    let c = SessionConfig::default()
        .with_escalation_grace(Duration::from_secs(5))
        .with_killed_exit_wait(Duration::from_secs(5));
    let e = c.validate().expect_err("wait as long as the grace");
    assert_eq!(e.field(), "killed_exit_wait");
    assert!(e.rule().contains("escalation_grace"), "{e}");
}

#[test]
fn backoff_never_panics_whatever_the_policy() {
    for (initial, max, multiplier) in [
        (Duration::MAX, Duration::MAX, 1.0),
        (Duration::MAX, Duration::MAX, 2.0),
        (Duration::from_secs(1), Duration::MAX, 1e300),
        (
            Duration::new(u64::MAX, 999_999_999),
            Duration::MAX,
            f64::MAX,
        ),
        (Duration::ZERO, Duration::ZERO, 1.0),
    ] {
        let policy = RetryPolicy::default()
            .with_max_attempts(3)
            .with_initial_backoff(initial)
            .with_multiplier(multiplier)
            .with_max_backoff(max);
        for attempt in [0, 1, 2, 63, 64, u32::MAX] {
            let delay = policy.backoff(attempt);
            assert!(delay <= max, "{delay:?} > {max:?}");
        }
    }
}

#[tokio::test]
async fn an_event_capacity_too_large_to_allocate_is_rejected_not_a_crash() {
    for capacity in [usize::MAX, usize::MAX / 2 + 1, 1 << 40] {
        let started = Supervisor::builder(
            harvest_fn(|_| async { Ok(()) }),
            finalizer_fn(|_| async { Ok(()) }),
        )
        .config(SupervisorConfig::default().with_event_capacity(capacity))
        .start()
        .await;
        match started {
            Err(Error::Config(e)) => assert_eq!(e.field(), "event_capacity"),
            Err(other) => panic!("expected a config error, got {other:?}"),
            Ok(_) => panic!("{capacity} slots per subscriber must not start"),
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_budget_too_long_for_its_resource_count_is_rejected_at_start() {
    let rec = Recorder::new(FinalizerMode::Ok);
    let sup = supervisor_with(harvest_fn(|_| async { Ok(()) }), fast(), &rec).await;
    // Valid on its own (a day per resource), but a year-long watchdog for 400 resources
    // watches nothing.
    let slow = fast().with_per_resource_estimate(Duration::from_secs(86_400));
    slow.validate().expect("valid on its own");
    let resources: Vec<String> = (0..400).map(|i| format!("r{i}")).collect();
    match sup
        .start(SessionRequest::new("csw", resources).with_config(slow))
        .await
    {
        Err(StartError::InvalidConfig(e)) => {
            assert_eq!(e.field(), "per_resource_estimate");
            assert!(e.rule().contains("workflow_time"), "{e}");
        }
        other => panic!("expected InvalidConfig, got {other:?}"),
    }
    assert!(sup.sessions().await.expect("list").is_empty());
    sup.shutdown().await.expect("shutdown");
}

fn fast() -> SessionConfig {
    SessionConfig::default()
        .with_per_resource_estimate(Duration::from_secs(10))
        .with_buffer(Duration::from_secs(100))
        .with_monitor_interval(Duration::from_secs(5))
        .with_escalation_grace(Duration::from_secs(20))
}

/// Durations from the whole range a user can type: usual values most of the time (so that
/// most configs validate and run), the edges and anything at all the rest.
fn duration() -> impl Strategy<Value = Duration> {
    prop_oneof![
        12 => (1u64..1000).prop_map(Duration::from_millis),
        12 => (1u64..120).prop_map(Duration::from_secs),
        1 => Just(Duration::ZERO),
        1 => Just(Duration::from_nanos(1)),
        1 => Just(Duration::from_secs(86_400)),
        1 => Just(Duration::from_secs(30 * 86_400)),
        1 => Just(Duration::from_secs(366 * 86_400)),
        1 => Just(Duration::MAX),
        1 => any::<u64>().prop_map(Duration::from_nanos),
        1 => any::<u64>().prop_map(Duration::from_secs),
    ]
}

fn config() -> impl Strategy<Value = SessionConfig> {
    let times = (
        duration(),
        duration(),
        proptest::option::of(duration()),
        proptest::option::of(duration()),
        duration(),
        duration(),
        duration(),
        duration(),
    );
    let rest = (
        prop_oneof![1 => Just(0usize), 20 => 1usize..8, 1 => Just(usize::MAX)],
        prop_oneof![1 => Just(0u32), 20 => 1u32..5, 1 => Just(u32::MAX)],
        duration(),
        prop_oneof![
            10 => Just(1.0f64),
            10 => Just(2.0),
            1 => Just(0.5),
            1 => Just(f64::NAN),
            1 => Just(1e300)
        ],
        duration(),
        any::<bool>(),
        // Most of the time, order the durations that validation relates (the wait before
        // the grace, the backoffs, the interval within the budget) so that the config has
        // a chance to validate; otherwise leave them as drawn.
        prop::bool::weighted(0.9),
    );
    (times, rest).prop_map(
        |(
            (estimate, buffer, timeout, heartbeat, interval, grace, abort, wait),
            (concurrency, attempts, initial, multiplier, max_backoff, fail_fast, related),
        )| {
            let (mut interval, mut wait, mut max_backoff) = (interval, wait, max_backoff);
            if related {
                wait = wait.min(grace / 2);
                max_backoff = max_backoff.max(initial);
                interval = interval.min(estimate.saturating_add(buffer));
            }
            SessionConfig::default()
                .with_per_resource_estimate(estimate)
                .with_buffer(buffer)
                .with_resource_timeout(timeout)
                .with_heartbeat_timeout(heartbeat)
                .with_monitor_interval(interval)
                .with_escalation_grace(grace)
                .with_abort_grace(abort)
                .with_killed_exit_wait(wait)
                .with_max_concurrency(concurrency)
                .with_retry(
                    RetryPolicy::default()
                        .with_max_attempts(attempts)
                        .with_initial_backoff(initial)
                        .with_multiplier(multiplier)
                        .with_max_backoff(max_backoff),
                )
                .with_failure_policy(if fail_fast {
                    FailurePolicy::FailFast
                } else {
                    FailurePolicy::Continue
                })
        },
    )
}

/// A session of resources that succeed, fail, fail twice, take a while, and one that hangs
/// until its session cancels it (or its attempt times out, or the deadline cuts it).
async fn run(config: SessionConfig) -> Result<(), TestCaseError> {
    let valid = config.validate().is_ok();
    let rec = Recorder::new(FinalizerMode::Ok);
    let harvest = harvest_fn(|ctx: HarvestContext| async move {
        match ctx.resource_id.as_str() {
            "ok" | "ok-instead-of-hang" => Ok(()),
            "fail" | "fail-instead-of-flaky" => Err("remote said 500".into()),
            "flaky" if ctx.attempt < 3 => Err("flaky".into()),
            "flaky" => Ok(()),
            "slow" => {
                tokio::time::sleep(Duration::from_secs(3)).await;
                Ok(())
            }
            _ => std::future::pending().await,
        }
    });
    let started = Supervisor::builder(harvest, rec.clone())
        .config(SupervisorConfig::default().with_session(config.clone()))
        .start()
        .await;
    let sup = match (started, valid) {
        (Ok(sup), true) => sup,
        (Err(Error::Config(_)), false) => return Ok(()),
        (Ok(_), false) => return Err(TestCaseError::fail("an invalid config started")),
        (Err(e), _) => return Err(TestCaseError::fail(format!("a valid config failed: {e}"))),
    };
    // The paused clock runs every monitor tick of the virtual time a session takes: keep
    // the resources that wait (for the deadline, or for backoffs) to configs that tick at
    // most ~100,000 times meanwhile, so each case runs in milliseconds of real time.
    let ticks = |d: Duration| d.as_nanos() / config.monitor_interval.as_nanos().max(1);
    let hang = if ticks(config.workflow_time(5)) <= 100_000 {
        "hang"
    } else {
        "ok-instead-of-hang"
    };
    let flaky = if ticks(config.retry.max_backoff.saturating_mul(2)) <= 100_000 {
        "flaky"
    } else {
        "fail-instead-of-flaky"
    };
    let id = match sup
        .start_session("csw", ["ok", "fail", flaky, "slow", hang])
        .await
    {
        Ok(id) => id,
        // A budget too long for five resources is refused, by name.
        Err(StartError::InvalidConfig(_)) => {
            sup.shutdown()
                .await
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            return Ok(());
        }
        Err(e) => return Err(TestCaseError::fail(format!("start: {e}"))),
    };
    // However long the (virtual) budget, the session ends, and a watchdog that means
    // something ends it soon after its deadline at the latest: within twice its budget
    // (the monitor looks at least once per one-resource budget), plus the wait for its
    // killed workers (the hanging harvest exits at once) and the timer wheel's rounding.
    let started = tokio::time::Instant::now();
    let bound = config
        .workflow_time(5)
        .saturating_mul(2)
        .saturating_add(config.killed_exit_wait)
        .saturating_add(Duration::from_millis(10));
    RAN.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let record = tokio::time::timeout(TIMEOUT * 400, sup.wait_finished(id))
        .await
        .map_err(|_| TestCaseError::fail("the session never finished"))?
        .map_err(|e| TestCaseError::fail(format!("record: {e}")))?;
    let took = started.elapsed();
    prop_assert!(
        took <= bound,
        "ended after {:?}, more than {:?}",
        took,
        bound
    );
    prop_assert!(record.status.is_terminal());
    prop_assert_eq!(record.counts.total(), 5);
    prop_assert_eq!(rec.calls(), 1);
    sup.shutdown()
        .await
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    Ok(())
}

/// Sessions the property test ran (configs that validated), to check that it tests
/// something.
static RAN: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

#[test]
fn any_config_that_validates_starts_sessions_that_end_without_a_panic() {
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: 2048,
        ..ProptestConfig::default()
    });
    let result = runner.run(&config(), |config| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .expect("runtime");
        rt.block_on(run(config))
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    let ran = RAN.load(std::sync::atomic::Ordering::Relaxed);
    eprintln!("{ran} of 2048 configs validated and ran a session");
    assert!(
        ran >= 50,
        "only {ran} of 2048 configs validated: the generator tests nothing"
    );
}
