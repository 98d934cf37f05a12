//! How to test your own finalizer (and harvester) with the test kit
//! (`harvest_supervisor::testing`, the `testing` feature), on tokio's paused clock: a
//! 20-minute deadline passes in microseconds.
//!
//! The finalizer here records each harvest in a catalogue, as a GeoNode-like server's
//! would. Its tests, at the bottom, check what a production finalizer must do:
//! - be **idempotent against a re-run**: after a crash during the finalizer, the node that
//!   takes the session over runs it again (`finalizer_attempt` 2) with the same outcomes;
//!   the catalogue must end as after one run;
//! - record a **hang cut by the deadline** as such (reason `DeadlineExpired`, the hung
//!   resource `timed-out`), not as a success nor as "still running";
//! - follow the **retry schedule**: a resource that fails twice is tried three times,
//!   after 1 s and 2 s of backoff, and counts as a success with its attempts.
//!
//! Run them: `cargo test --example test_your_finalizer`. In your own crate, add
//! `harvest-supervisor = { version = "...", features = ["testing"] }` and tokio's
//! `test-util` feature to your dev-dependencies.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use harvest_supervisor::{BoxError, SessionFinalizer, SessionId, SessionReport};

/// What the catalogue keeps of one harvest.
#[derive(Debug, Clone, PartialEq)]
pub struct HarvestSummary {
    pub harvester: String,
    pub reason: String,
    pub harvested: usize,
    pub failed: Vec<String>,
    /// How many finalizer runs wrote this entry (for the operator: more than one means
    /// a recovery re-ran it).
    pub runs: u32,
}

/// The finalizer under test: records each session in the catalogue, keyed by session id
/// (an upsert), which is what makes a re-run harmless.
#[derive(Clone, Default)]
pub struct CatalogueFinalizer {
    pub catalogue: Arc<Mutex<HashMap<SessionId, HarvestSummary>>>,
}

#[async_trait]
impl SessionFinalizer for CatalogueFinalizer {
    async fn finalize(&self, report: SessionReport) -> Result<(), BoxError> {
        let failed = report
            .outcomes
            .iter()
            .filter(|o| !o.outcome.is_success())
            .map(|o| format!("{} ({})", o.resource_id, o.outcome.name()))
            .collect();
        let summary = HarvestSummary {
            harvester: report.harvester_id.to_string(),
            reason: report.reason.as_str().to_owned(),
            harvested: report.counts.succeeded,
            failed,
            runs: report.finalizer_attempt,
        };
        let mut catalogue = self.catalogue.lock().map_err(|_| "catalogue poisoned")?;
        catalogue.insert(report.session_id, summary);
        Ok(())
    }
}

fn main() {
    println!("This example is its tests: cargo test --example test_your_finalizer");
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use harvest_supervisor::testing::{RecordingFinalizer, ScriptedHarvester, Step, run_session};
    use harvest_supervisor::{
        EventKind, FinalizeReason, ResourceOutcome, RetryPolicy, SessionConfig, SessionFinalizer,
        SupervisorConfig,
    };

    use super::*;

    fn supervisor_config(session: SessionConfig) -> SupervisorConfig {
        SupervisorConfig::default().with_session(session)
    }

    #[tokio::test(start_paused = true)]
    async fn a_re_run_of_the_finalizer_leaves_the_catalogue_as_one_run_did() {
        let mine = CatalogueFinalizer::default();
        let harvester = ScriptedHarvester::new().resource("broken", [Step::fail("HTTP 500")]);
        let run = run_session(
            harvester,
            RecordingFinalizer::wrapping(mine.clone()),
            SupervisorConfig::default(),
            ["a", "b", "broken"],
        )
        .await
        .expect("ran");
        let once = mine.catalogue.lock().expect("lock")[&run.record.id].clone();
        assert_eq!(once.harvested, 2);
        assert_eq!(once.failed, ["broken (failed)"]);

        // What recovery does after a crash during the finalizer: the same report, the
        // next attempt number.
        let mut again = run.report().clone();
        again.finalizer_attempt = 2;
        mine.finalize(again).await.expect("the re-run succeeds");
        let catalogue = mine.catalogue.lock().expect("lock");
        assert_eq!(
            catalogue.len(),
            1,
            "one entry per session, however many runs"
        );
        let twice = &catalogue[&run.record.id];
        assert_eq!(
            (twice.harvested, &twice.failed, &twice.reason),
            (once.harvested, &once.failed, &once.reason)
        );
        assert_eq!(twice.runs, 2, "and the operator can see it was re-run");
    }

    #[tokio::test(start_paused = true)]
    async fn a_hang_cut_by_the_deadline_is_recorded_as_timed_out() {
        let mine = CatalogueFinalizer::default();
        // No per-resource timeout: only the session's deadline (3 x 10 s + 60 s) cuts
        // the hung resource, as in a GeoNode harvest whose task never returns.
        let budget = SessionConfig::default()
            .with_per_resource_estimate(Duration::from_secs(10))
            .with_buffer(Duration::from_secs(60))
            .with_resource_timeout(None)
            .with_monitor_interval(Duration::from_secs(5));
        let harvester = ScriptedHarvester::new().resource("stuck", [Step::HangIgnoringCancel]);
        let started = tokio::time::Instant::now();
        let run = run_session(
            harvester,
            RecordingFinalizer::wrapping(mine.clone()),
            supervisor_config(budget),
            ["a", "stuck", "b"],
        )
        .await
        .expect("ran");
        // 90 s of tokio time, at once.
        assert!(started.elapsed() >= Duration::from_secs(90));
        assert_eq!(run.record.reason(), Some(FinalizeReason::DeadlineExpired));
        let entry = mine.catalogue.lock().expect("lock")[&run.record.id].clone();
        assert_eq!(entry.reason, "deadline-expired");
        assert_eq!(entry.harvested, 2);
        assert_eq!(entry.failed, ["stuck (timed-out)"]);
        run.log().assert_finalized_once();
        run.log().assert_nothing_after_finished();
    }

    #[tokio::test(start_paused = true)]
    async fn a_resource_that_fails_twice_is_retried_on_schedule_and_succeeds() {
        let mine = CatalogueFinalizer::default();
        let retry = RetryPolicy::default()
            .with_max_attempts(3)
            .with_initial_backoff(Duration::from_secs(1))
            .with_multiplier(2.0);
        let harvester = ScriptedHarvester::new().resource(
            "flaky",
            [Step::fail("timeout"), Step::fail("timeout"), Step::Succeed],
        );
        let run = run_session(
            harvester.clone(),
            RecordingFinalizer::wrapping(mine.clone()),
            supervisor_config(SessionConfig::default().with_retry(retry)),
            ["flaky"],
        )
        .await
        .expect("ran");
        assert_eq!(harvester.attempts("flaky"), 3);
        let delays: Vec<Duration> = run
            .events
            .iter()
            .filter_map(|e| match &e.kind {
                EventKind::WorkerRetrying { delay, .. } => Some(*delay),
                _ => None,
            })
            .collect();
        assert_eq!(delays, [Duration::from_secs(1), Duration::from_secs(2)]);
        let outcome = &run.report().outcomes[0];
        assert_eq!(outcome.outcome, ResourceOutcome::Succeeded);
        assert_eq!(outcome.attempts, 3);
        assert_eq!(
            mine.catalogue.lock().expect("lock")[&run.record.id].harvested,
            1
        );
    }
}
