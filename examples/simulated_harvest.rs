//! A simulated harvest: the main job of harvest-supervisor, end to end.
//!
//! It starts the supervision tree, harvests N simulated resources of which some fail, panic,
//! run past their timeout or hang forever, shows a progress bar, prints the supervision
//! events, and ends with a report. However the resources behave, the session must end with
//! its finalizer run exactly once and its harvester free; the example exits non-zero only
//! if the tree itself misbehaves, never because resources failed.
//!
//! Sessions live in a SQLite file (`--db`, default `simulated_harvest.db`; `--memory` for
//! none), so a run can be killed and the next run recovers what it left.
//!
//! ```text
//! cargo run --example simulated_harvest
//! cargo run --example simulated_harvest -- --resources 500 --hang-rate 0.02 --events events.jsonl
//! cargo run --example simulated_harvest -- --resource-timeout none --hang-rate 0.01   # the monitor's deadline cuts hangs
//! cargo run --example simulated_harvest -- --crash-after 50    # dies mid-session, like a power cut
//! cargo run --example simulated_harvest -- --resume            # picks the interrupted session up again
//! cargo run --example simulated_harvest -- --adaptive          # the deadline learned from earlier runs
//! ```

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use clap::Parser;
use harvest_supervisor::{
    BoxError, EventKind, EventSubscription, HarvestContext, RecoveryPolicy, RecvError,
    SessionConfig, SessionEvent, SessionId, SessionRecord, SessionReport, SessionRequest,
    SessionStore, SqliteStore, Supervisor, SupervisorConfig, finalizer_fn, harvest_fn,
};
use indicatif::{ProgressBar, ProgressStyle};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

/// Harvest simulated resources under the supervision tree.
#[derive(Parser, Debug)]
struct Args {
    /// Number of resources in the session.
    #[arg(long, default_value_t = 200)]
    resources: usize,
    /// Share of resources whose harvest returns an error.
    #[arg(long, default_value_t = 0.05)]
    fail_rate: f64,
    /// Share of resources whose harvest panics.
    #[arg(long, default_value_t = 0.02)]
    panic_rate: f64,
    /// Share of resources that run past the per-resource timeout.
    #[arg(long, default_value_t = 0.02)]
    timeout_rate: f64,
    /// Share of resources that never return at all.
    #[arg(long, default_value_t = 0.01)]
    hang_rate: f64,
    /// Most resources harvested at once.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Expected time of one resource (the deadline is resources x this + buffer).
    #[arg(long, default_value = "50ms", value_parser = humantime::parse_duration)]
    per_resource_estimate: Duration,
    /// Slack added to the deadline.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    buffer: Duration,
    /// Limit of one attempt, or "none" to leave hangs to the monitor's deadline.
    #[arg(long, default_value = "1s", value_parser = parse_limit)]
    resource_timeout: Limit,
    /// How often the monitor checks the deadline.
    #[arg(long, default_value = "250ms", value_parser = humantime::parse_duration)]
    monitor_interval: Duration,
    /// How long the monitor waits before escalating a stuck session.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    escalation_grace: Duration,
    /// Learn the deadline from this harvester's earlier sessions in the database (the
    /// static budget until it holds 50 successes): run twice to see it learned.
    #[arg(long)]
    adaptive: bool,
    /// Attempts per resource (1 = no retry).
    #[arg(long, default_value_t = 1)]
    max_attempts: u32,
    /// Write every supervision event of the session to this file, one JSON per line.
    #[arg(long)]
    events: Option<PathBuf>,
    /// Print no event lines, only the progress bar and the report.
    #[arg(long)]
    quiet: bool,
    /// Seed of the simulation, for a reproducible run.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// The database file (the durable store): sessions, outcomes and events survive a crash.
    #[arg(long, default_value = "simulated_harvest.db")]
    db: PathBuf,
    /// Keep everything in memory instead of the database file.
    #[arg(long, conflicts_with_all = ["resume", "crash_after", "postgres"])]
    memory: bool,
    /// A PostgreSQL database instead of the file (`postgres://user:pass@host/db`, or
    /// DATABASE_URL): processes on several machines share its sessions.
    #[arg(long, env = "DATABASE_URL", value_name = "URL")]
    postgres: Option<String>,
    /// Simulate a power cut: kill this process after N resources have finished. Run again
    /// (with or without --resume) to see the interrupted session recovered.
    #[arg(long, value_name = "N")]
    crash_after: Option<u64>,
    /// Resume interrupted sessions found in the database (re-harvest what had not
    /// succeeded) instead of finalizing them as interrupted; start no new session then.
    #[arg(long)]
    resume: bool,
    /// This process's node name, in logs and in the report (several processes may share
    /// one --db: each owns its sessions, and takes over those of a process that died).
    #[arg(long)]
    node_name: Option<String>,
    /// The harvester to harvest (one session at a time per harvester, across every
    /// process on the --db).
    #[arg(long, default_value = "simulated-csw")]
    harvester: String,
}

/// A duration, or none at all.
#[derive(Clone, Copy, Debug)]
struct Limit(Option<Duration>);

fn parse_limit(s: &str) -> Result<Limit, humantime::DurationError> {
    if s == "none" {
        Ok(Limit(None))
    } else {
        humantime::parse_duration(s).map(|d| Limit(Some(d)))
    }
}

/// The start of every simulated panic message.
const SIMULATED_PANIC: &str = "malformed metadata";

/// What a simulated resource does.
#[derive(Clone, Copy, Debug)]
enum Behaviour {
    Succeed(Duration),
    Fail(Duration),
    Panic,
    Slow,
    Hang,
}

fn plan(args: &Args) -> HashMap<String, Behaviour> {
    let mut rng = StdRng::seed_from_u64(args.seed);
    (0..args.resources)
        .map(|i| {
            let roll: f64 = rng.random();
            let work = Duration::from_millis(rng.random_range(20..200));
            let mut edge = args.fail_rate;
            let b = if roll < edge {
                Behaviour::Fail(work)
            } else if roll < {
                edge += args.panic_rate;
                edge
            } {
                Behaviour::Panic
            } else if roll < {
                edge += args.timeout_rate;
                edge
            } {
                Behaviour::Slow
            } else if roll < edge + args.hang_rate {
                Behaviour::Hang
            } else {
                Behaviour::Succeed(work)
            };
            (format!("resource-{i:06}"), b)
        })
        .collect()
}

async fn simulate(
    plan: Arc<HashMap<String, Behaviour>>,
    ctx: HarvestContext,
) -> Result<(), BoxError> {
    match plan.get(ctx.resource_id.as_str()).copied() {
        Some(Behaviour::Succeed(work)) => {
            tokio::time::sleep(work).await;
            Ok(())
        }
        Some(Behaviour::Fail(work)) => {
            tokio::time::sleep(work).await;
            Err(format!("remote answered 500 for {}", ctx.resource_id).into())
        }
        Some(Behaviour::Panic) => panic!("{SIMULATED_PANIC} in {}", ctx.resource_id),
        // Slow: long past any sane timeout, but it would end; Hang: never.
        Some(Behaviour::Slow) => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Ok(())
        }
        Some(Behaviour::Hang) | None => std::future::pending().await,
    }
}

fn print_event(e: &SessionEvent) {
    let detail = serde_json::to_value(&e.kind)
        .ok()
        .and_then(|v| v.as_object().cloned())
        .map(|mut o| {
            o.remove("kind");
            serde_json::Value::Object(o).to_string()
        })
        .unwrap_or_default();
    eprintln!("  #{:<5} {:<18} {}", e.seq, e.kind.name(), detail);
}

/// Finalizer reports of this process, by session.
type Reports = Arc<Mutex<HashMap<SessionId, Vec<SessionReport>>>>;

#[tokio::main]
async fn main() -> Result<ExitCode, Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    // Simulated panics are expected: they show as events, not as backtraces on stderr.
    // Any other panic is a bug and keeps the default report.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let msg = info.payload().downcast_ref::<String>().map(String::as_str);
        if msg.is_some_and(|m| m.starts_with(SIMULATED_PANIC)) {
            tracing::debug!(%info, "simulated panic");
        } else {
            default_hook(info);
        }
    }));

    let args = Args::parse();
    let session = SessionConfig::default()
        .with_per_resource_estimate(args.per_resource_estimate)
        .with_buffer(args.buffer)
        .with_resource_timeout(args.resource_timeout.0)
        .with_monitor_interval(args.monitor_interval)
        .with_escalation_grace(args.escalation_grace)
        // Validated to end before the escalation grace does.
        .with_killed_exit_wait(
            SessionConfig::default()
                .killed_exit_wait
                .min(args.escalation_grace / 2),
        )
        .with_abort_grace(Duration::from_secs(1))
        .with_max_concurrency(args.concurrency)
        .with_adaptive(args.adaptive.then(|| {
            harvest_supervisor::AdaptiveBudget::default()
                .with_min_samples(50)
                .with_below_static(true)
                .with_buffer(args.buffer)
        }))
        .with_retry(
            harvest_supervisor::RetryPolicy::default()
                .with_max_attempts(args.max_attempts)
                .with_initial_backoff(Duration::from_millis(100)),
        );

    let plan = Arc::new(plan(&args));
    let reports: Reports = Arc::default();
    let harvest = {
        let plan = Arc::clone(&plan);
        harvest_fn(move |ctx| simulate(Arc::clone(&plan), ctx))
    };
    let finalizer = {
        let reports = Arc::clone(&reports);
        finalizer_fn(move |report: SessionReport| {
            let reports = Arc::clone(&reports);
            async move {
                if let Ok(mut all) = reports.lock() {
                    all.entry(report.session_id).or_default().push(report);
                }
                Ok(())
            }
        })
    };

    // Closed at exit: its write-ahead log checkpointed, its reserve of room deleted.
    let mut sqlite = None;
    let store: Arc<dyn SessionStore> = if args.memory {
        Arc::new(harvest_supervisor::MemoryStore::new())
    } else if let Some(url) = &args.postgres {
        let store = harvest_supervisor::store::PostgresStore::connect(url).await?;
        println!(
            "store: PostgreSQL {} (schema {})",
            store.target(),
            store.schema()
        );
        Arc::new(store)
    } else {
        println!("store: {}", args.db.display());
        let store = SqliteStore::open(&args.db).await?;
        sqlite = Some(store.clone());
        Arc::new(store)
    };
    let supervisor = Supervisor::builder(harvest, finalizer)
        .store(Arc::clone(&store))
        .config(
            SupervisorConfig::default()
                .with_session(session)
                .with_recovery(if args.resume {
                    RecoveryPolicy::Resume
                } else {
                    RecoveryPolicy::Finalize
                })
                .with_node_name(args.node_name.clone()),
        )
        .start()
        .await?;
    // The sessions this start took over: an earlier run's that crashed (or another
    // process's that died). A live process's sessions are its own business.
    let me = supervisor.node_id();
    let unfinished: Vec<SessionRecord> = store
        .list_sessions()
        .await?
        .into_iter()
        .filter(|r| r.owner == Some(me) && r.epoch > 1)
        .collect();

    let mut problems = Vec::new();
    for left in &unfinished {
        println!(
            "\nrecovering session {} (taken over from a dead node, {}; {}/{} outcomes recorded){}",
            left.id,
            left.status,
            left.counts.total(),
            left.total,
            if args.resume { ": resuming" } else { "" }
        );
        let record = supervisor.wait_finished(left.id).await?;
        print_record(&record, None, &reports, &node_names(&supervisor).await);
        problems.extend(check(&record, None, &reports, false));
    }

    // A --resume run that found something to resume is that resumption; otherwise harvest.
    let resuming = args.resume && !unfinished.is_empty();
    if !resuming {
        let mut events = supervisor.subscribe();
        let mut resources: Vec<String> = plan.keys().cloned().collect();
        resources.sort();
        let started = tokio::time::Instant::now();
        let id = supervisor
            .start(SessionRequest::new(args.harvester.clone(), resources))
            .await?;
        let log = follow(id, &mut events, &args, &mut problems).await?;
        let record = supervisor.session(id).await?;
        let names = node_names(&supervisor).await;
        print_record(&record, Some(started.elapsed()), &reports, &names);
        problems.extend(check(&record, Some(&log), &reports, true));
    }

    // The harvester must be free for a next session.
    match supervisor
        .start_session(args.harvester.clone(), Vec::<String>::new())
        .await
    {
        Ok(next) => {
            supervisor.wait_finished(next).await?;
        }
        Err(e) => problems.push(format!("the harvester is not free: {e}")),
    }
    supervisor.shutdown().await?;
    if let Some(store) = sqlite {
        store.close().await?;
    }

    if problems.is_empty() {
        println!("\nok: finalized exactly once, every resource accounted for, harvester free");
        Ok(ExitCode::SUCCESS)
    } else {
        for p in &problems {
            eprintln!("supervision error: {p}");
        }
        Ok(ExitCode::FAILURE)
    }
}

/// Shows one event: a line, a JSON line in the `--events` file, a tick of the bar.
fn follow_step(
    e: &SessionEvent,
    bar: &ProgressBar,
    sink: &mut Option<BufWriter<File>>,
    quiet: bool,
) -> std::io::Result<()> {
    if !quiet {
        bar.suspend(|| print_event(e));
    }
    if let Some(out) = sink.as_mut() {
        serde_json::to_writer(&mut *out, e)?;
        out.write_all(b"\n")?;
    }
    match &e.kind {
        EventKind::WorkerSucceeded { .. }
        | EventKind::WorkerFailed { .. }
        | EventKind::WorkerPanicked { .. }
        | EventKind::WorkerTimedOut { .. }
        | EventKind::WorkerCancelled { .. } => bar.inc(1),
        EventKind::DeadlineExpired => bar.set_message("deadline expired"),
        _ => {}
    }
    Ok(())
}

/// Follows a session's events, with a progress bar, until `SessionFinished`.
async fn follow(
    id: SessionId,
    events: &mut EventSubscription,
    args: &Args,
    problems: &mut Vec<String>,
) -> Result<Vec<SessionEvent>, Box<dyn std::error::Error>> {
    let bar = ProgressBar::new(args.resources as u64);
    bar.set_style(ProgressStyle::with_template(
        "{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} {msg}",
    )?);
    let mut sink = match &args.events {
        Some(path) => Some(BufWriter::new(File::create(path)?)),
        None => None,
    };
    let mut log: Vec<SessionEvent> = Vec::new();
    loop {
        match events.recv().await {
            Ok(e) if e.session_id == id => {
                follow_step(&e, &bar, &mut sink, args.quiet)?;
                let finished = bar.position();
                if args.crash_after.is_some_and(|n| finished >= n) {
                    // (Not `bar.position()` inside `suspend`: that holds the bar's lock.)
                    bar.suspend(|| {
                        eprintln!(
                            "simulated crash after {finished} resources: run again to recover"
                        );
                    });
                    // No destructor, no flush, no finalizer: as a power cut would leave it.
                    std::process::exit(86);
                }
                let done = matches!(e.kind, EventKind::SessionFinished { .. });
                log.push((*e).clone());
                if done {
                    break;
                }
            }
            Ok(_) => {}
            Err(RecvError::Lagged { missed }) => {
                bar.suspend(|| eprintln!("  ({missed} events skipped: the printer fell behind)"));
            }
            Err(RecvError::Closed) => {
                problems.push("the event bus closed before the session finished".to_owned());
                break;
            }
        }
    }
    bar.finish_and_clear();
    if let Some(mut out) = sink {
        out.flush()?;
    }
    Ok(log)
}

/// The nodes' names (or ids) on the store, by id.
async fn node_names(supervisor: &Supervisor) -> HashMap<harvest_supervisor::NodeId, String> {
    let nodes = supervisor.store().nodes().await.unwrap_or_default();
    nodes
        .into_iter()
        .map(|n| {
            let id = n.info.id;
            (id, n.info.name.unwrap_or_else(|| id.to_string()))
        })
        .collect()
}

fn print_record(
    record: &SessionRecord,
    took: Option<Duration>,
    reports: &Reports,
    names: &HashMap<harvest_supervisor::NodeId, String>,
) {
    println!("\nsession {}", record.id);
    println!("  status          {}", record.status);
    let owner = record.owner.map_or("-".to_owned(), |n| {
        names.get(&n).cloned().unwrap_or_else(|| n.to_string())
    });
    let taken = if record.epoch > 1 { ", taken over" } else { "" };
    println!("  owner node      {owner} (epoch {}{taken})", record.epoch);
    println!(
        "  reason          {}",
        record.reason().map_or("-".to_owned(), |r| format!("{r:?}"))
    );
    let c = record.counts;
    println!(
        "  resources       {} = {} ok + {} failed + {} panicked + {} timed out + {} cancelled + {} lost",
        record.total, c.succeeded, c.failed, c.panicked, c.timed_out, c.cancelled, c.lost
    );
    let report = reports
        .lock()
        .ok()
        .and_then(|r| r.get(&record.id).and_then(|v| v.last().cloned()));
    // To the millisecond: a learned budget is not a round number.
    let millis = u64::try_from(record.workflow_time.as_millis()).unwrap_or(u64::MAX);
    println!(
        "  workflow time   {}",
        humantime::format_duration(Duration::from_millis(millis))
    );
    if let Some(budget) = report.as_ref().and_then(|r| r.budget.as_ref()) {
        println!("  budget          {budget}");
    }
    if let Some(took) = took {
        println!("  took            {took:.2?}");
    }
    if let Some(err) = &record.finalizer_error {
        println!("  finalizer error {err}");
    }
    if let Some(o) = report
        .as_ref()
        .and_then(|r| r.outcomes.iter().max_by_key(|o| o.elapsed))
    {
        println!(
            "  slowest         {} ({}, {:.2?})",
            o.resource_id,
            o.outcome.name(),
            o.elapsed
        );
    }
}

/// The tree's promises for one session: the only reasons to exit non-zero.
fn check(
    record: &SessionRecord,
    log: Option<&[SessionEvent]>,
    reports: &Reports,
    finalized_here: bool,
) -> Vec<String> {
    let mut problems = Vec::new();
    if !record.status.is_terminal() {
        problems.push(format!("session {} is still {}", record.id, record.status));
    }
    let runs = reports
        .lock()
        .map(|r| r.get(&record.id).map_or(0, Vec::len))
        .unwrap_or(0);
    // A recovered session's finalizer may have been started by the crashed run already.
    if runs > 1 || (finalized_here && runs != 1) {
        problems.push(format!(
            "the finalizer of {} ran {runs} times here",
            record.id
        ));
    }
    if record.counts.total() != record.total {
        problems.push(format!(
            "counts of {} add up to {} of {}",
            record.id,
            record.counts.total(),
            record.total
        ));
    }
    if let Some(log) = log {
        if log.first().map(|e| e.kind.name()) != Some("SessionStarted")
            || log.last().map(|e| e.kind.name()) != Some("SessionFinished")
        {
            problems
                .push("the event log does not run from SessionStarted to SessionFinished".into());
        }
        if log.windows(2).any(|w| w[0].seq >= w[1].seq) {
            problems.push("event seq is not strictly increasing".into());
        }
    }
    problems
}
