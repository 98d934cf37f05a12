//! The test kit (`harvest_supervisor::testing`) does what it says: each step of a script,
//! the counts, the recording finalizer, and assertions that fail when they should.

use std::time::Duration;

use harvest_supervisor::testing::{
    EventLog, RecordingFinalizer, ScriptedHarvester, Step, run_session,
};
use harvest_supervisor::{
    FinalizeReason, ResourceOutcome, SessionConfig, SessionStatus, SupervisorConfig, finalizer_fn,
};

fn budget() -> SessionConfig {
    SessionConfig::default()
        .with_per_resource_estimate(Duration::from_secs(10))
        .with_buffer(Duration::from_secs(60))
        .with_monitor_interval(Duration::from_secs(5))
        .with_abort_grace(Duration::from_secs(2))
}

fn outcome(run: &harvest_supervisor::testing::SessionRun, id: &str) -> ResourceOutcome {
    run.report()
        .outcomes
        .iter()
        .find(|o| o.resource_id.as_str() == id)
        .map(|o| o.outcome.clone())
        .expect("an outcome")
}

#[tokio::test(start_paused = true)]
async fn each_step_ends_its_attempt_as_it_says() {
    let harvester = ScriptedHarvester::new()
        .resource("fails", [Step::fail("HTTP 500")])
        .resource("panics", [Step::panic("parser exploded")])
        .resource("hangs", [Step::Hang])
        .resource("slow", [Step::Take(Duration::from_secs(5))])
        .resource("too-slow", [Step::Take(Duration::from_secs(500))]);
    let config = budget().with_resource_timeout(Duration::from_secs(30));
    let started = tokio::time::Instant::now();
    let run = run_session(
        harvester.clone(),
        RecordingFinalizer::new(),
        SupervisorConfig::default().with_session(config),
        ["ok", "fails", "panics", "hangs", "slow", "too-slow"],
    )
    .await
    .expect("ran");
    assert_eq!(run.record.reason(), Some(FinalizeReason::Completed));
    assert_eq!(outcome(&run, "ok"), ResourceOutcome::Succeeded);
    assert!(
        matches!(outcome(&run, "fails"), ResourceOutcome::Failed { error } if error == "HTTP 500")
    );
    assert!(
        matches!(outcome(&run, "panics"), ResourceOutcome::Panicked { message } if message.contains("parser exploded"))
    );
    // The per-resource timeout cuts the hang and the step slower than it.
    assert_eq!(outcome(&run, "hangs"), ResourceOutcome::TimedOut);
    assert_eq!(outcome(&run, "too-slow"), ResourceOutcome::TimedOut);
    assert_eq!(outcome(&run, "slow"), ResourceOutcome::Succeeded);
    // 30 s of tokio time passed (the timeout), not 500.
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(30) && took < Duration::from_secs(60),
        "{took:?}"
    );
    assert_eq!(harvester.total_attempts(), 6);
    run.log().assert_finalized_once();
    run.log().assert_nothing_after_finished();
    run.log().assert_gapless();
}

#[tokio::test(start_paused = true)]
async fn plans_run_attempt_by_attempt_and_repeat_their_last_step() {
    let retry = harvest_supervisor::RetryPolicy::default()
        .with_max_attempts(4)
        .with_initial_backoff(Duration::from_secs(1));
    let harvester = ScriptedHarvester::new()
        .resource("twice", [Step::fail("a"), Step::fail("b"), Step::Succeed])
        .resource("always", [Step::fail("again")])
        .otherwise(Step::fail("unplanned"));
    let run = run_session(
        harvester.clone(),
        RecordingFinalizer::new(),
        SupervisorConfig::default().with_session(budget().with_retry(retry)),
        ["twice", "always", "other"],
    )
    .await
    .expect("ran");
    assert_eq!(harvester.attempts("twice"), 3);
    assert_eq!(harvester.attempts("always"), 4);
    assert_eq!(harvester.attempts("other"), 4);
    assert_eq!(harvester.attempts("never-seen"), 0);
    assert_eq!(outcome(&run, "twice"), ResourceOutcome::Succeeded);
    assert!(
        matches!(outcome(&run, "other"), ResourceOutcome::Failed { error } if error == "unplanned")
    );
    assert_eq!(run.record.status, SessionStatus::FinishedSomeFailed);
    assert_eq!(
        run.log().kinds_of("twice"),
        [
            "WorkerStarted",
            "WorkerFailed",
            "WorkerRetrying",
            "WorkerStarted",
            "WorkerFailed",
            "WorkerRetrying",
            "WorkerStarted",
            "WorkerSucceeded"
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn a_hang_that_ignores_its_cancellation_is_cut_by_the_deadline() {
    let harvester = ScriptedHarvester::new().resource("stuck", [Step::HangIgnoringCancel]);
    let run = run_session(
        harvester,
        RecordingFinalizer::new(),
        SupervisorConfig::default().with_session(budget().with_resource_timeout(None)),
        ["stuck", "ok"],
    )
    .await
    .expect("ran");
    assert_eq!(run.record.reason(), Some(FinalizeReason::DeadlineExpired));
    assert_eq!(outcome(&run, "stuck"), ResourceOutcome::TimedOut);
    assert_eq!(outcome(&run, "ok"), ResourceOutcome::Succeeded);
    run.log().assert_finalized_once();
}

#[tokio::test(start_paused = true)]
async fn the_recording_finalizer_keeps_reports_and_answers_as_the_one_it_wraps() {
    let failing = RecordingFinalizer::wrapping(finalizer_fn(|_| async {
        Err("the catalogue is read-only".into())
    }));
    let run = run_session(
        ScriptedHarvester::new(),
        failing.clone(),
        SupervisorConfig::default().with_session(budget()),
        ["a", "b"],
    )
    .await
    .expect("ran");
    assert_eq!(failing.calls(), 1);
    assert_eq!(failing.reports()[0].session_id, run.record.id);
    assert_eq!(run.reports.len(), 1);
    assert_eq!(
        run.record.finalizer_error.as_deref(),
        Some("the catalogue is read-only")
    );
}

#[test]
#[should_panic(expected = "no SessionFinished")]
fn an_unfinished_log_fails_the_finished_assertion() {
    EventLog(&[]).assert_nothing_after_finished();
}

#[test]
#[should_panic(expected = "finalized once")]
fn an_unfinished_log_fails_the_once_assertion() {
    EventLog(&[]).assert_finalized_once();
}
