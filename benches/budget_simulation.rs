//! Adaptive budgets against GeoNode's static formula (issue #17), simulated on tokio's
//! paused clock: days of harvesting in seconds, the same every run (seeded draws).
//!
//! A harvester whose resources take skewed (log-normal) times builds a history; then
//! healthy sessions run under each budget (how many are cut although nothing was wrong),
//! and sessions with one hung resource (how long from the hang until the session is
//! finalized and the harvester free again). Each attempt draws its own time (a slow answer
//! is not always slow again); a hung resource hangs at every attempt.
//!
//! `cargo bench --bench budget_simulation` prints the tables of BENCHMARKS.md.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use harvest_supervisor::budget::AdaptiveBudget;
use harvest_supervisor::{
    BoxError, FinalizeReason, HarvestContext, MemoryStore, SessionConfig, Supervisor,
    SupervisorConfig, finalizer_fn, harvest_fn,
};
use tokio::time::Instant;

/// A resource's time: log-normal, median 2 s, sigma 1 (mean 3.3 s, p99 20 s, p99.9 44 s):
/// most are quick, a few take ten times as long.
const MEDIAN_SECS: f64 = 2.0;
const SIGMA: f64 = 1.0;
/// Sessions of these sizes, in turn.
const SIZES: [usize; 3] = [10, 100, 1000];
/// Healthy sessions per budget, and sessions with a hang per budget and size.
const HEALTHY: usize = 600;
const HUNG: usize = 10;

fn main() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .expect("a runtime");
    runtime.block_on(simulate());
}

/// SplitMix64: a well-mixed 64-bit value of `x`.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// A uniform draw in (0, 1] from `x`.
fn unit(x: u64) -> f64 {
    ((x >> 11) as f64 + 1.0) / (1u64 << 53) as f64
}

/// The time resource `id` takes (the same for the same id): log-normal by Box-Muller.
fn duration_of(id: &str) -> Duration {
    // FNV-1a of the id, then two mixed draws.
    let seed = id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    let (u1, u2) = (unit(mix(seed)), unit(mix(seed ^ 0x5555)));
    let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
    Duration::from_secs_f64(MEDIAN_SECS * (SIGMA * z).exp())
}

/// When the hung attempt of the running session started.
type HangStart = Arc<Mutex<Option<Instant>>>;

/// Counts an attempt cut short: dropped (by its timeout) or cancelled before it ended.
struct CutGuard(Arc<AtomicU64>, bool);

impl Drop for CutGuard {
    fn drop(&mut self) {
        if self.1 {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
}

async fn harvest(
    ctx: HarvestContext,
    hang: HangStart,
    cuts: Arc<AtomicU64>,
) -> Result<(), BoxError> {
    if ctx.resource_id.as_str().ends_with("-hang") {
        hang.lock().expect("hang").get_or_insert_with(Instant::now);
        ctx.cancel.cancelled().await;
        return Err("cancelled while hung".into());
    }
    // A slow answer is not always slow again: each attempt draws its own time.
    let took = duration_of(&format!("{}#{}", ctx.resource_id, ctx.attempt));
    let mut guard = CutGuard(cuts, true);
    tokio::select! {
        () = tokio::time::sleep(took) => {
            guard.1 = false;
            Ok(())
        }
        () = ctx.cancel.cancelled() => Err("cancelled".into()),
    }
}

/// What one session did.
struct Run {
    size: usize,
    budget: Duration,
    took: Duration,
    /// Attempts cut by the per-attempt timeout (retried or not).
    attempts_cut: u64,
    /// Resources that ended timed out (their last attempt cut, or the deadline).
    resources_cut: usize,
    /// Ended by the deadline.
    past_deadline: bool,
    /// From the hang to the end, for a session with one.
    hang_to_end: Option<Duration>,
}

struct Sim {
    supervisor: Supervisor,
    hang: HangStart,
    cuts: Arc<AtomicU64>,
    sessions: usize,
}

impl Sim {
    async fn run(&mut self, config: &SessionConfig, size: usize, hung: bool) -> Run {
        self.sessions += 1;
        let n = self.sessions;
        let mut ids: Vec<String> = (0..size).map(|i| format!("s{n}-r{i}")).collect();
        if hung {
            // Somewhere in the first half, so that its slot has work queued behind it.
            let at = (mix(n as u64) as usize) % size.div_ceil(2);
            ids[at] = format!("s{n}-hang");
        }
        *self.hang.lock().expect("hang") = None;
        let started = Instant::now();
        let id = self
            .supervisor
            .start_session_with("csw", ids, config.clone())
            .await
            .expect("started");
        let record = self.supervisor.wait_finished(id).await.expect("finished");
        let took = started.elapsed();
        let hang_at = *self.hang.lock().expect("hang");
        Run {
            size,
            budget: record.workflow_time,
            took,
            attempts_cut: self.cuts.swap(0, Ordering::SeqCst),
            resources_cut: record.counts.timed_out,
            past_deadline: record.reason() == Some(FinalizeReason::DeadlineExpired),
            hang_to_end: hang_at.map(|at| at.elapsed()),
        }
    }
}

fn percentile(values: &mut [Duration], q: f64) -> Duration {
    values.sort_unstable();
    let rank = ((q * values.len() as f64).ceil() as usize).clamp(1, values.len());
    values[rank - 1]
}

fn show(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s >= 3600.0 {
        format!("{:.1} h", s / 3600.0)
    } else if s >= 60.0 {
        format!("{:.1} min", s / 60.0)
    } else {
        format!("{s:.0} s")
    }
}

async fn simulate() {
    let hang: HangStart = Arc::default();
    let cuts = Arc::new(AtomicU64::new(0));
    let harvester = {
        let (hang, cuts) = (Arc::clone(&hang), Arc::clone(&cuts));
        harvest_fn(move |ctx| harvest(ctx, Arc::clone(&hang), Arc::clone(&cuts)))
    };
    let supervisor = Supervisor::builder(harvester, finalizer_fn(|_| async { Ok(()) }))
        .config(SupervisorConfig::default())
        .store(Arc::new(MemoryStore::with_event_limit(16)))
        .start()
        .await
        .expect("a supervisor");
    let mut sim = Sim {
        supervisor,
        hang,
        cuts,
        sessions: 0,
    };

    // GeoNode's budget: 20 s x resources + 1200 s, a 600 s limit per task, 16 at a time,
    // no retry.
    let geonode = SessionConfig::default();
    // The deadline learned (p99 x 2 for one resource, the mean pace for the rest, 60 s of
    // slack), allowed below GeoNode's; the 600 s task limit kept.
    let deadline = AdaptiveBudget::default().with_below_static(true);
    let budgets = [
        ("A: GeoNode static", geonode.clone()),
        (
            "B: adaptive deadline",
            geonode.clone().with_adaptive(deadline.clone()),
        ),
        (
            "C: B + timeout 4 x p99",
            geonode
                .clone()
                .with_adaptive(deadline.clone().with_timeout_multiple(4.0)),
        ),
        (
            "D: C + one retry",
            geonode
                .clone()
                .with_retry(geonode.retry.clone().with_max_attempts(2))
                .with_adaptive(deadline.with_timeout_multiple(4.0)),
        ),
    ];

    // A history: ten sessions of 100 (1,000 successes).
    for _ in 0..10 {
        sim.run(&geonode, 100, false).await;
    }

    println!("## Healthy sessions ({HEALTHY} per budget, sizes {SIZES:?} in turn)\n");
    println!(
        "| budget | size | median budget | median session | longest session | attempts cut | \
         sessions with a resource cut | sessions past the deadline |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    let mut healthy: Vec<Vec<Run>> = budgets.iter().map(|_| Vec::new()).collect();
    for i in 0..HEALTHY {
        let size = SIZES[i % SIZES.len()];
        for (b, (_, config)) in budgets.iter().enumerate() {
            let run = sim.run(config, size, false).await;
            healthy[b].push(run);
        }
    }
    for size in SIZES {
        for (b, (name, _)) in budgets.iter().enumerate() {
            let runs: Vec<&Run> = healthy[b].iter().filter(|r| r.size == size).collect();
            let mut budget: Vec<Duration> = runs.iter().map(|r| r.budget).collect();
            let mut took: Vec<Duration> = runs.iter().map(|r| r.took).collect();
            let attempts_cut: u64 = runs.iter().map(|r| r.attempts_cut).sum();
            let resource_cut = runs.iter().filter(|r| r.resources_cut > 0).count();
            let past = runs.iter().filter(|r| r.past_deadline).count();
            println!(
                "| {name} | {size} | {} | {} | {} | {attempts_cut} | {resource_cut} of {n} | \
                 {past} of {n} |",
                show(percentile(&mut budget, 0.5)),
                show(percentile(&mut took, 0.5)),
                show(percentile(&mut took, 1.0)),
                n = runs.len()
            );
        }
    }

    println!(
        "\n## One resource hung for good ({HUNG} sessions per cell): from the hang until the \
         session is finalized (median)\n"
    );
    // GeoNode itself: a task at its time limit leaves the chord's body unrun, so only the
    // monitor's `workflow_time` finalizes the session (BACKGROUND.md).
    let chord = (
        "GeoNode (its monitor)",
        geonode.clone().with_resource_timeout(None),
    );
    let hung_budgets: Vec<&(&str, SessionConfig)> =
        std::iter::once(&chord).chain(budgets.iter()).collect();
    let names: Vec<&str> = hung_budgets.iter().map(|(n, _)| *n).collect();
    println!("| size | {} | GeoNode / B |", names.join(" | "));
    println!("|---:|{}---:|", "---:|".repeat(names.len()));
    for size in SIZES {
        let mut medians = Vec::new();
        for (_, config) in &hung_budgets {
            let mut waits = Vec::new();
            for _ in 0..HUNG {
                let run = sim.run(config, size, true).await;
                waits.push(run.hang_to_end.expect("the hang started"));
            }
            medians.push(percentile(&mut waits, 0.5));
        }
        let cells: Vec<String> = medians.iter().map(|d| show(*d)).collect();
        println!(
            "| {size} | {} | {:.0}x |",
            cells.join(" | "),
            medians[0].as_secs_f64() / medians[2].as_secs_f64().max(1e-9)
        );
    }
    sim.supervisor.shutdown().await.expect("shutdown");
}
