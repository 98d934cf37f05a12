//! The exactly-once promise under random schedules: outcomes, hangs, retries, fail-fast, an
//! abort and the deadline, some of them landing on the very same instant.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::faulty::FaultyStore;
use common::{FinalizerMode, Recorder, TIMEOUT, config, supervisor_on};
use harvest_supervisor::{EventKind, FailurePolicy, RetryPolicy, SessionRequest, SessionStatus};
use proptest::prelude::*;

#[derive(Debug, Clone)]
struct Schedule {
    resources: Vec<String>,
    abort_at: Option<u64>,
    max_concurrency: usize,
    max_attempts: u32,
    fail_fast: bool,
    resource_timeout: Option<u64>,
    finalizer: FinalizerMode,
    /// Outcome writes never return from this many seconds on: the session actor gets stuck
    /// and only the monitor's escalation and the root can end it.
    stuck_store_at: Option<u64>,
}

/// Deadline of a schedule: 10 s per resource + 100 s (see `common::config`).
fn deadline(n: usize) -> u64 {
    10 * n as u64 + 100
}

fn schedule() -> impl Strategy<Value = Schedule> {
    (1usize..12).prop_flat_map(|n| {
        let d = deadline(n);
        // Sleep lengths that hit the deadline's instant exactly, or just before/after it.
        let sleep = prop_oneof![1u64..40, Just(d), Just(d - 5), Just(d + 5)];
        let resource = prop_oneof![
            Just("ok".to_owned()),
            Just("fail".to_owned()),
            Just("panic".to_owned()),
            Just("hang".to_owned()),
            Just("coop".to_owned()),
            (1u64..3).prop_map(|k| format!("flaky{k}")),
            sleep.prop_map(|s| format!("sleep{s}")),
        ];
        (
            proptest::collection::vec(resource, n),
            proptest::option::of(prop_oneof![0u64..60, Just(d), Just(d + 10)]),
            1usize..5,
            1u32..4,
            any::<bool>(),
            proptest::option::of(prop_oneof![Just(15u64), Just(d)]),
            prop_oneof![
                6 => Just(FinalizerMode::Ok),
                1 => Just(FinalizerMode::Fail),
                1 => Just(FinalizerMode::Panic),
                2 => Just(FinalizerMode::Hang),
            ],
            proptest::option::of(0u64..40),
        )
            .prop_map(
                |(
                    kinds,
                    abort_at,
                    max_concurrency,
                    max_attempts,
                    fail_fast,
                    resource_timeout,
                    finalizer,
                    stuck_store_at,
                )| {
                    Schedule {
                        finalizer,
                        stuck_store_at,
                        resources: kinds
                            .iter()
                            .enumerate()
                            .map(|(i, k)| format!("{k}-{i}"))
                            .collect(),
                        abort_at,
                        max_concurrency,
                        max_attempts,
                        fail_fast,
                        resource_timeout,
                    }
                },
            )
    })
}

async fn run(s: Schedule) -> Result<(), TestCaseError> {
    let rec = Recorder::new(s.finalizer);
    let cfg = config()
        .with_max_concurrency(s.max_concurrency)
        .with_resource_timeout(s.resource_timeout.map(Duration::from_secs))
        .with_failure_policy(if s.fail_fast {
            FailurePolicy::FailFast
        } else {
            FailurePolicy::Continue
        })
        .with_retry(
            RetryPolicy::default()
                .with_max_attempts(s.max_attempts)
                .with_initial_backoff(Duration::from_secs(1))
                .with_multiplier(2.0)
                .with_max_backoff(Duration::from_secs(4)),
        );
    let store = FaultyStore::new();
    let sup = supervisor_on(store.clone(), cfg, &rec).await;
    if let Some(at) = s.stuck_store_at {
        let store = store.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(at)).await;
            store.hang_outcome_writes.store(true, Ordering::SeqCst);
        });
    }
    let total = s.resources.len();
    let id = sup
        .start(SessionRequest::new("csw", s.resources.clone()))
        .await
        .map_err(|e| TestCaseError::fail(format!("start: {e}")))?;
    if let Some(at) = s.abort_at {
        let root = sup.actor().clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(at)).await;
            // Finished sessions answer AlreadyFinished; both are fine here.
            let _ = root
                .call(
                    |r| harvest_supervisor::SupervisorMessage::AbortSession(id, r),
                    None,
                )
                .await;
        });
    }
    let record = tokio::time::timeout(TIMEOUT, sup.wait_finished(id))
        .await
        .map_err(|_| TestCaseError::fail("session never finished"))?
        .map_err(|e| TestCaseError::fail(format!("record: {e}")))?;
    // Long after: late timers, aborts and ticks must change nothing.
    tokio::time::sleep(Duration::from_secs(2 * deadline(total))).await;
    let after = sup
        .session(id)
        .await
        .map_err(|e| TestCaseError::fail(e.to_string()))?;

    prop_assert_eq!(rec.calls(), 1, "finalizer runs exactly once");
    prop_assert!(record.status.is_terminal());
    prop_assert_eq!(&after, &record, "nothing changes after finalization");
    let c = record.counts;
    prop_assert_eq!(
        c.succeeded + c.failed + c.panicked + c.timed_out + c.cancelled + c.lost,
        total
    );
    let report = &rec.reports_for(id)[0];
    prop_assert_eq!(report.outcomes.len(), total);
    prop_assert_eq!(report.counts, c);
    if record.status == SessionStatus::FinishedAllOk {
        prop_assert!(report.outcomes.iter().all(|o| o.outcome.is_success()));
    }
    let events = sup
        .events(id)
        .await
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert!(events.windows(2).all(|w| w[0].seq < w[1].seq));
    let count = |f: fn(&EventKind) -> bool| events.iter().filter(|e| f(&e.kind)).count();
    prop_assert_eq!(
        count(|k| matches!(k, EventKind::FinalizerStarted { .. })),
        1
    );
    prop_assert_eq!(count(|k| matches!(k, EventKind::SessionFinished { .. })), 1);
    let last_is_finished = matches!(
        events.last().map(|e| &e.kind),
        Some(EventKind::SessionFinished { .. })
    );
    prop_assert!(last_is_finished, "SessionFinished is the last event");
    store.hang_outcome_writes.store(false, Ordering::SeqCst);
    sup.start_session("csw", Vec::<String>::new())
        .await
        .map_err(|e| TestCaseError::fail(format!("harvester not free: {e}")))?;
    sup.shutdown()
        .await
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn every_schedule_finalizes_exactly_once_and_reconciles(s in schedule()) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .expect("runtime");
        rt.block_on(run(s))?;
    }
}
