//! The metrics a supervisor reports through the `metrics` facade (see `meters`): what each
//! counts, that gauges fall back to zero when idle, and that no label is a session's or a
//! resource's id. Recorded with `metrics-util`'s debugging recorder, local to the test's
//! thread (a current-thread runtime runs every actor there).

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::{FinalizerMode, Recorder, config, finished, supervisor};
use harvest_supervisor::RetryPolicy;
use harvest_supervisor::meters::names;
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};

/// A metric's value, by name and sorted labels.
#[derive(Debug, Default)]
struct Seen {
    counters: HashMap<(String, Vec<(String, String)>), u64>,
    gauges: HashMap<String, f64>,
    histograms: HashMap<(String, Vec<(String, String)>), usize>,
}

impl Seen {
    /// Adds what the recorder holds to what was seen before (a debugging snapshot drains
    /// the recorder: counters and gauges read as 0 after, histograms empty).
    fn look(&mut self, snapshotter: &Snapshotter) -> &Self {
        let seen = self;
        for (key, _, _, value) in snapshotter.snapshot().into_vec() {
            let key = key.key();
            let name = key.name().to_owned();
            let mut labels: Vec<(String, String)> = key
                .labels()
                .map(|l| (l.key().to_owned(), l.value().to_owned()))
                .collect();
            labels.sort();
            match value {
                DebugValue::Counter(n) => {
                    *seen.counters.entry((name, labels)).or_default() += n;
                }
                DebugValue::Gauge(g) => {
                    *seen.gauges.entry(name).or_default() += g.into_inner();
                }
                DebugValue::Histogram(v) => {
                    *seen.histograms.entry((name, labels)).or_default() += v.len();
                }
            }
        }
        seen
    }

    /// The sum of counter `name` over the series whose labels include `with`.
    fn counter(&self, name: &str, with: &[(&str, &str)]) -> u64 {
        self.counters
            .iter()
            .filter(|((n, labels), _)| {
                n == name
                    && with
                        .iter()
                        .all(|(k, v)| labels.iter().any(|(lk, lv)| lk == k && lv == v))
            })
            .map(|(_, v)| *v)
            .sum()
    }

    /// Samples recorded in histogram `name`, over all its series.
    fn samples(&self, name: &str) -> usize {
        self.histograms
            .iter()
            .filter(|((n, _), _)| n == name)
            .map(|(_, v)| *v)
            .sum()
    }

    fn labels(&self) -> impl Iterator<Item = &(String, String)> {
        self.counters
            .keys()
            .chain(self.histograms.keys())
            .flat_map(|(_, labels)| labels.iter())
    }
}

#[tokio::test(start_paused = true)]
async fn a_session_counts_its_attempts_retries_outcomes_and_durations() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _local = metrics::set_default_local_recorder(&recorder);

    let rec = Recorder::new(FinalizerMode::Ok);
    let sup = supervisor(
        config()
            .with_resource_timeout(Some(Duration::from_secs(30)))
            .with_retry(RetryPolicy::default().with_max_attempts(2)),
        &rec,
    )
    .await;
    let id = sup
        .start_session("csw", ["ok-1", "fail-2", "panic-3", "hang-4", "ok-5"])
        .await
        .expect("start");
    finished(&sup, id).await;
    let mut seen = Seen::default();
    seen.look(&snapshotter);

    assert_eq!(
        seen.counter(names::SESSIONS_STARTED, &[("harvester", "csw")]),
        1
    );
    assert_eq!(
        seen.counter(
            names::SESSIONS_FINISHED,
            &[
                ("harvester", "csw"),
                ("status", "finished-some-failed"),
                ("reason", "completed")
            ]
        ),
        1
    );
    for (outcome, n) in [
        ("succeeded", 2),
        ("failed", 1),
        ("panicked", 1),
        ("timed-out", 1),
    ] {
        assert_eq!(
            seen.counter(
                names::RESOURCES,
                &[("harvester", "csw"), ("outcome", outcome)]
            ),
            n,
            "{outcome}"
        );
    }
    // Two successes at once, three failures tried twice each.
    assert_eq!(seen.counter(names::ATTEMPTS, &[("harvester", "csw")]), 8);
    assert_eq!(seen.counter(names::RETRIES, &[("harvester", "csw")]), 3);
    assert_eq!(seen.samples(names::RESOURCE_DURATION), 8);
    assert_eq!(
        seen.samples(names::SLOT_WAIT),
        5,
        "one per resource's first attempt"
    );
    assert_eq!(seen.samples(names::FINALIZER_DURATION), 1);
    assert_eq!(seen.samples(names::SESSION_DURATION), 1);
    assert_eq!(
        seen.samples(names::START_WAIT),
        1,
        "the start's wait for its turn"
    );
    assert_eq!(seen.counter(names::WATCHDOG_ACTIONS, &[]), 0);

    sup.shutdown().await.expect("shutdown");
    let idle = seen.look(&snapshotter);
    assert_eq!(idle.gauges.get(names::ACTIVE_SESSIONS), Some(&0.0));
    assert_eq!(idle.gauges.get(names::ACTIVE_WORKERS), Some(&0.0));
    // Bounded labels only: never a session's or a resource's id.
    for (key, value) in idle.labels() {
        assert!(
            !value.contains(&id.to_string()) && !value.contains("-1") && !value.contains("-2"),
            "label {key}={value}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn watchdog_actions_are_counted_by_kind() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _local = metrics::set_default_local_recorder(&recorder);

    let rec = Recorder::new(FinalizerMode::Ok);
    // A silent attempt is cut by its heartbeat; a hang without limits meets the deadline.
    let sup = supervisor(
        config().with_heartbeat_timeout(Some(Duration::from_secs(20))),
        &rec,
    )
    .await;
    let silent = sup.start_session("quiet", ["hang-1"]).await.expect("start");
    finished(&sup, silent).await;
    let mut seen = Seen::default();
    seen.look(&snapshotter);
    assert_eq!(
        seen.counter(names::WATCHDOG_ACTIONS, &[("action", "heartbeat_silence")]),
        1
    );
    sup.shutdown().await.expect("shutdown");

    let sup = supervisor(config(), &rec).await;
    let stuck = sup.start_session("stuck", ["hang-1"]).await.expect("start");
    finished(&sup, stuck).await;
    seen.look(&snapshotter);
    assert_eq!(
        seen.counter(names::WATCHDOG_ACTIONS, &[("action", "deadline")]),
        1
    );
    assert_eq!(
        seen.counter(
            names::SESSIONS_FINISHED,
            &[("harvester", "stuck"), ("reason", "deadline-expired")]
        ),
        1
    );
    assert_eq!(
        seen.counter(
            names::RESOURCES,
            &[("harvester", "stuck"), ("outcome", "timed-out")]
        ),
        1
    );
    sup.shutdown().await.expect("shutdown");
}

#[tokio::test(start_paused = true)]
async fn the_gauges_show_what_runs_within_a_monitor_tick_and_zero_when_idle() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _local = metrics::set_default_local_recorder(&recorder);

    let rec = Recorder::new(FinalizerMode::Ok);
    let sup = supervisor(config(), &rec).await;
    let a = sup
        .start_session("a", ["sleep100-1", "sleep100-2"])
        .await
        .expect("start");
    let b = sup.start_session("b", ["sleep100-3"]).await.expect("start");
    // One tick of the monitors' clock (5 s) publishes the counts.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let mut seen = Seen::default();
    let running = seen.look(&snapshotter);
    assert_eq!(running.gauges.get(names::ACTIVE_SESSIONS), Some(&2.0));
    assert_eq!(running.gauges.get(names::ACTIVE_WORKERS), Some(&3.0));
    finished(&sup, a).await;
    finished(&sup, b).await;
    sup.shutdown().await.expect("shutdown");
    let idle = seen.look(&snapshotter);
    assert_eq!(idle.gauges.get(names::ACTIVE_SESSIONS), Some(&0.0));
    assert_eq!(idle.gauges.get(names::ACTIVE_WORKERS), Some(&0.0));
}

/// A session finished after its process died is counted as a recovery (and as a
/// takeover when taken from another node's expired lease), and each failed store write
/// that is retried as a store failure: as many as the log tells.
#[tokio::test(start_paused = true)]
async fn recoveries_and_store_failures_are_counted_as_the_log_tells() {
    use harvest_supervisor::EventKind;
    use std::sync::atomic::Ordering;

    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _local = metrics::set_default_local_recorder(&recorder);
    let store = common::faulty::FaultyStore::new();
    let rec = Recorder::new(FinalizerMode::Ok);

    // A process dies with its session running: every actor gone at once.
    let dead = common::supervisor_on(store.clone(), config(), &rec).await;
    let left = dead
        .start_session("csw", ["ok-1", "hang-2"])
        .await
        .expect("start");
    tokio::time::sleep(Duration::from_secs(1)).await;
    dead.actor().kill();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut seen = Seen::default();
    seen.look(&snapshotter);
    assert_eq!(seen.counter(names::RECOVERIES, &[]), 0);

    // The next process finalizes it; its finalization's writes fail for a while first.
    store
        .failing_finalization_writes
        .store(true, Ordering::SeqCst);
    let next = common::supervisor_on(store.clone(), config(), &rec).await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    store
        .failing_finalization_writes
        .store(false, Ordering::SeqCst);
    finished(&next, left).await;
    let events = next.events(left).await.expect("events");
    let told =
        |pick: fn(&EventKind) -> bool| events.iter().filter(|e| pick(&e.kind)).count() as u64;
    let recovered = told(|k| matches!(k, EventKind::Recovered { .. }));
    let taken = told(|k| matches!(k, EventKind::SessionTakenOver { .. }));
    let store_failed = told(|k| matches!(k, EventKind::StoreFailed { .. }));
    assert_eq!(recovered, 1, "{events:#?}");
    assert!(store_failed >= 2, "{store_failed} store failures told");
    seen.look(&snapshotter);
    assert_eq!(
        seen.counter(names::RECOVERIES, &[("kind", "recovered")]),
        recovered
    );
    assert_eq!(
        seen.counter(names::RECOVERIES, &[("kind", "taken_over")]),
        taken
    );
    assert_eq!(seen.counter(names::STORE_FAILURES, &[]), store_failed);
    assert_eq!(
        store.failed_finalization_writes.load(Ordering::SeqCst) as u64,
        store_failed,
        "each failed write counted once"
    );
    next.shutdown().await.expect("shutdown");
}
