//! Scale benchmarks of supervision overhead, side by side in one run.
//!
//! ```text
//! cargo run --release --example bench_scale -- all              # every table of BENCHMARKS.md
//! cargo run --release --example bench_scale -- throughput --n 10000 --reps 5
//! cargo run --release --example bench_scale -- latency --runs 500
//! cargo run --release --example bench_scale -- watchdog --sessions 10000
//! cargo run --release --example bench_scale -- replay --n 10000 --log 100000 --readers 20
//! cargo run --release --example bench_scale -- takeover --kills 20 --signal KILL
//! cargo run --release --example bench_scale -- watchdog --sessions 10000 --sqlite
//! cargo run --release --example bench_scale -- one --imp memory --n 1000   # one case, JSON
//! HARVEST_BENCH_PG=URL cargo run --release --example bench_scale -- pg-throughput --n 10000
//! cargo run --release --example bench_scale -- takeover --kills 20 --postgres URL
//! cargo run --release --example bench_scale -- cluster --procs 3 --secs 20 --postgres URL
//! cargo run --release --example bench_scale -- idle-cluster --sessions 10000 --nodes 3 --postgres URL
//! ```
//!
//! Each throughput case runs in a fresh child process (`one`), so its peak RSS (VmHWM) is its
//! own. With `--warm`, the case is timed after one untimed run of it in that process: a
//! server's steady state (a heap that has held a session of this size, pages already
//! faulted in) rather than a fresh process's first session; its peak RSS covers both runs.
//! Implementations, all with a window of 64 in flight:
//! - `floor`: N no-op futures through a tokio `JoinSet`, then one closure;
//! - `actor`: a bare ractor parent that `spawn_linked`s no-op children, counts their
//!   terminations, then calls a closure;
//! - `memory`: one harvest-supervisor session of N no-op resources on the memory store;
//! - `sqlite`: the same on the durable store (a fresh file in a temp dir);
//! - `postgres`: the same on the PostgreSQL store (a fresh schema of the database that
//!   `HARVEST_BENCH_PG` names; dropped after).

#[path = "../benches/common/mod.rs"]
mod impls;

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand, ValueEnum};
use harvest_supervisor::store::postgres::tokio_postgres;
use harvest_supervisor::store::{PostgresOptions, PostgresStore};
use harvest_supervisor::{
    FailurePolicy, SessionRequest, SessionStore, SqliteStore, Supervisor, SupervisorConfig,
    finalizer_fn, harvest_fn,
};
use serde::{Deserialize, Serialize};

use impls::WINDOW;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Every benchmark, as markdown tables.
    All {
        /// Repetitions per throughput case (the median is reported).
        #[arg(long, default_value_t = 5)]
        reps: usize,
        /// Include the 1,000,000-resource sessions.
        #[arg(long)]
        million: bool,
    },
    /// Throughput of the four implementations at one N.
    Throughput {
        #[arg(long)]
        n: usize,
        #[arg(long, default_value_t = 5)]
        reps: usize,
        /// Time each case after one untimed run of it in the same process (a server's
        /// steady state rather than a fresh process's first session).
        #[arg(long)]
        warm: bool,
    },
    /// One case in this process; prints one JSON line.
    One {
        #[arg(long, value_enum)]
        imp: Imp,
        #[arg(long)]
        n: usize,
        /// Run the case once untimed first (see `throughput --warm`).
        #[arg(long)]
        warm: bool,
        /// With a metrics recorder installed (the Prometheus exporter's).
        #[arg(long)]
        metrics: bool,
    },
    /// The memory store with and without a metrics recorder (the Prometheus exporter's),
    /// in alternating fresh processes: medians and the median within-pair ratio.
    MetricsOverhead {
        #[arg(long, default_value_t = 100_000)]
        n: usize,
        #[arg(long, default_value_t = 10)]
        pairs: usize,
    },
    /// Failure-to-finalizer (FailFast) and last-outcome-to-finalizer (Continue) latency.
    Latency {
        #[arg(long, default_value_t = 500)]
        runs: usize,
    },
    /// CPU of bare ractor actors that only receive a 1 s `send_interval` tick.
    TimerFloor {
        #[arg(long, default_value_t = 10_000)]
        actors: usize,
        #[arg(long, default_value_t = 10)]
        idle_secs: u64,
    },
    /// Memory of idle bare ractor actors (the floor of a session's three actors).
    ActorMemory {
        #[arg(long, default_value_t = 30_000)]
        actors: usize,
    },
    /// A durable session's cost per resource alone, and while readers replay a long
    /// stored event log (reads must not queue behind the session's writes).
    Replay {
        /// Resources of the timed session.
        #[arg(long, default_value_t = 10_000)]
        n: usize,
        /// Events in the stored log the readers replay.
        #[arg(long, default_value_t = 100_000)]
        log: u64,
        /// Readers replaying it, each in a loop, while the session runs.
        #[arg(long, default_value_t = 20)]
        readers: usize,
        /// Pairs of runs (alone, with readers), interleaved.
        #[arg(long, default_value_t = 5)]
        reps: usize,
    },
    /// Many idle sessions, each with one slow resource, under a 1 s monitor interval.
    Watchdog {
        #[arg(long, default_value_t = 10_000)]
        sessions: usize,
        #[arg(long, default_value_t = 10)]
        idle_secs: u64,
        /// On the durable store (a fresh file) instead of the memory store.
        #[arg(long)]
        sqlite: bool,
        /// Lease renewal and rescue all but off (every hour, every day): their cost is
        /// the difference with a run without this.
        #[arg(long)]
        no_leases: bool,
    },
    /// Time from a node's death (SIGKILL) or pause (SIGSTOP: its process is there, so
    /// only its lease expiring tells, as for a node on another machine) until a live
    /// node on the same file has taken its session over.
    Takeover {
        #[arg(long, default_value_t = 20)]
        kills: usize,
        /// KILL or STOP.
        #[arg(long, default_value = "KILL")]
        signal: String,
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
        lease_ttl: Duration,
        #[arg(long, default_value = "500ms", value_parser = humantime::parse_duration)]
        renew: Duration,
        #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
        rescue: Duration,
        /// On this PostgreSQL database (a fresh schema per round) instead of SQLite.
        #[arg(long)]
        postgres: Option<String>,
    },
    /// Memory against PostgreSQL per resource, alternating fresh processes: medians and
    /// the median of the within-pair ratios. The database: `HARVEST_BENCH_PG`.
    PgThroughput {
        #[arg(long)]
        n: usize,
        #[arg(long, default_value_t = 5)]
        pairs: usize,
    },
    /// `procs` processes on one PostgreSQL database, each running sessions of `size`
    /// no-op resources back to back on a harvester of its own for `secs`: sessions and
    /// outcomes per second, in all and per process, and each process's CPU.
    Cluster {
        #[arg(long, default_value_t = 3)]
        procs: usize,
        #[arg(long, default_value_t = 20)]
        secs: u64,
        #[arg(long, default_value_t = 1000)]
        size: usize,
        #[arg(long)]
        postgres: String,
    },
    /// One process of `cluster`: prints `DONE sessions outcomes cpu_secs` at the end.
    ClusterNode {
        #[arg(long)]
        postgres: String,
        #[arg(long)]
        schema: String,
        #[arg(long)]
        harvester: String,
        #[arg(long)]
        secs: u64,
        #[arg(long)]
        size: usize,
    },
    /// `sessions` idle sessions (one resource sleeping for an hour each, 1 s monitor
    /// interval) spread over `nodes` processes on one PostgreSQL database: the database's
    /// transactions and rows read per second while they idle.
    IdleCluster {
        #[arg(long, default_value_t = 10_000)]
        sessions: usize,
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        #[arg(long, default_value_t = 30)]
        idle_secs: u64,
        #[arg(long)]
        postgres: String,
    },
    /// One process of `idle-cluster`: starts its sessions, says `READY`, idles.
    IdleNode {
        #[arg(long)]
        postgres: String,
        #[arg(long)]
        schema: String,
        #[arg(long)]
        first: usize,
        #[arg(long)]
        count: usize,
    },
    /// A node process for `takeover`: `victim` starts a session of one hanging resource
    /// and says its id; `rescuer` only rescues.
    Node {
        #[arg(long)]
        db: std::path::PathBuf,
        /// `URL schema`: on PostgreSQL instead of the `db` file.
        #[arg(long, num_args = 2)]
        postgres: Option<Vec<String>>,
        #[arg(long)]
        victim: bool,
        #[arg(long, value_parser = humantime::parse_duration)]
        lease_ttl: Duration,
        #[arg(long, value_parser = humantime::parse_duration)]
        renew: Duration,
        #[arg(long, value_parser = humantime::parse_duration)]
        rescue: Duration,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
enum Imp {
    Floor,
    Actor,
    Memory,
    Sqlite,
    Postgres,
}

#[derive(Debug, Serialize, Deserialize)]
struct Sample {
    imp: Imp,
    n: usize,
    secs: f64,
    /// Process CPU time (all threads) over the same timed region.
    cpu_secs: f64,
    peak_rss_kib: u64,
}

/// Peak resident set size of this process (VmHWM), in KiB.
fn peak_rss_kib() -> u64 {
    proc_status_kib("VmHWM:")
}

fn rss_kib() -> u64 {
    proc_status_kib("VmRSS:")
}

fn proc_status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// User + system CPU time of this process so far, from `/proc/self/stat` (in clock ticks
/// of 10 ms: `getconf CLK_TCK` is 100 on Linux).
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at state, field 3.
    let after = stat.rsplit(") ").next().unwrap_or("");
    let fields: Vec<u64> = after
        .split_whitespace()
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 here.
    let ticks = fields.get(11).copied().unwrap_or(0) + fields.get(12).copied().unwrap_or(0);
    Duration::from_millis(ticks * 10)
}

async fn run_one(imp: Imp, n: usize, warm: bool) -> Sample {
    // `warm`: the same case once untimed first; the timed one then runs on a heap (and a
    // database file) that a session of this size has used before.
    let dir = std::env::temp_dir().join(format!("hs-bench-{}", std::process::id()));
    let store: Option<Arc<dyn SessionStore>> = match imp {
        Imp::Sqlite => {
            std::fs::create_dir_all(&dir).expect("temp dir");
            Some(Arc::new(
                SqliteStore::open(dir.join("bench.db")).await.expect("db"),
            ))
        }
        Imp::Postgres => Some(Arc::new(
            pg_store(&bench_pg(), &format!("bench_{}", std::process::id())).await,
        )),
        _ => None,
    };
    let mut took = Duration::ZERO;
    for _ in 0..if warm { 2 } else { 1 } {
        took = match imp {
            // On a worker thread, where every other case's work runs (the actors): on the
            // main thread, inside `block_on`, the JoinSet ran 2.3 times slower.
            Imp::Floor => tokio::spawn(impls::run_floor(n))
                .await
                .expect("the floor's task"),
            Imp::Actor => impls::run_actor(n).await,
            // The memory store when `store` is `None`.
            Imp::Memory | Imp::Sqlite | Imp::Postgres => impls::run_session(n, store.clone()).await,
        };
    }
    drop(store);
    if imp == Imp::Sqlite {
        let _ = std::fs::remove_dir_all(&dir);
    }
    if imp == Imp::Postgres {
        drop_schema(&bench_pg(), &format!("bench_{}", std::process::id())).await;
    }
    Sample {
        imp,
        n,
        secs: took.as_secs_f64(),
        cpu_secs: impls::last_cpu().as_secs_f64(),
        peak_rss_kib: peak_rss_kib(),
    }
}

/// Runs one case in a fresh process of this binary.
fn child_case(imp: Imp, n: usize, warm: bool) -> Sample {
    child_case_with(imp, n, warm, false)
}

/// [`child_case`], with a metrics recorder installed when `metrics`.
fn child_case_with(imp: Imp, n: usize, warm: bool, metrics: bool) -> Sample {
    let exe = std::env::current_exe().expect("this binary");
    let imp_name = format!("{imp:?}").to_lowercase();
    let mut args = vec!["one", "--imp", &imp_name];
    let n_text = n.to_string();
    args.extend(["--n", &n_text]);
    if warm {
        args.push("--warm");
    }
    if metrics {
        args.push("--metrics");
    }
    let out = Command::new(exe).args(args).output().expect("run the case");
    assert!(
        out.status.success(),
        "case {imp:?} n={n} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON sample")
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// `reps` runs of each implementation, interleaved (floor, actor, memory, sqlite, floor,
/// ...) so that a noisy neighbour slows every implementation of a run alike.
struct Runs {
    /// `samples[i][r]`: implementation `i` in run `r`.
    samples: Vec<Vec<Sample>>,
}

impl Runs {
    fn measure(imps: &[Imp], n: usize, reps: usize, warm: bool) -> Self {
        let mut samples: Vec<Vec<Sample>> = imps.iter().map(|_| Vec::new()).collect();
        for _ in 0..reps {
            for (i, imp) in imps.iter().enumerate() {
                samples[i].push(child_case(*imp, n, warm));
            }
        }
        Self { samples }
    }

    /// Median wall µs, median CPU µs (both per resource) and median peak RSS (MiB) of
    /// implementation `i`.
    fn medians(&self, i: usize) -> (f64, f64, f64) {
        let s = &self.samples[i];
        let us = median(s.iter().map(|x| x.secs * 1e6 / x.n as f64).collect());
        let cpu = median(s.iter().map(|x| x.cpu_secs * 1e6 / x.n as f64).collect());
        let rss = median(s.iter().map(|x| x.peak_rss_kib as f64 / 1024.0).collect());
        (us, cpu, rss)
    }

    /// The median over runs of `a`'s time over `b`'s in the same run (wall, CPU): the
    /// targets' "ratio from one run, median of several". Steadier than a ratio of medians
    /// when the machine drifts between runs.
    fn ratio(&self, a: usize, b: usize) -> (f64, f64) {
        let pairs = || self.samples[a].iter().zip(&self.samples[b]);
        (
            median(pairs().map(|(x, y)| x.secs / y.secs).collect()),
            median(pairs().map(|(x, y)| x.cpu_secs / y.cpu_secs).collect()),
        )
    }
}

fn throughput_table(ns: &[usize], reps: usize, million: bool, warm: bool) {
    println!(
        "| N | floor µs | actor µs | memory µs | sqlite µs | memory/actor | memory/floor | sqlite/memory | CPU µs floor / actor / memory / sqlite | CPU memory/actor | CPU sqlite/memory | peak RSS floor / actor / memory / sqlite (MiB) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    let all = [Imp::Floor, Imp::Actor, Imp::Memory, Imp::Sqlite];
    for &n in ns {
        let runs = Runs::measure(&all, n, reps, warm);
        let [(f, fc, fr), (a, ac, ar), (mm, mc, mr), (s, sc, sr)] =
            [0, 1, 2, 3].map(|i| runs.medians(i));
        let (memory_actor, memory_actor_cpu) = runs.ratio(2, 1);
        let (memory_floor, _) = runs.ratio(2, 0);
        let (sqlite_memory, sqlite_memory_cpu) = runs.ratio(3, 2);
        println!(
            "| {n} | {f:.2} | {a:.2} | {mm:.2} | {s:.2} | {memory_actor:.2} | {memory_floor:.2} | {sqlite_memory:.2} | {fc:.2} / {ac:.2} / {mc:.2} / {sc:.2} | {memory_actor_cpu:.2} | {sqlite_memory_cpu:.2} | {fr:.0} / {ar:.0} / {mr:.0} / {sr:.0} |",
        );
    }
    if million {
        let n = 1_000_000;
        let runs = Runs::measure(&[Imp::Memory, Imp::Sqlite], n, 1, warm);
        let [(mm, mc, mr), (s, sc, sr)] = [0, 1].map(|i| runs.medians(i));
        let (sqlite_memory, sqlite_memory_cpu) = runs.ratio(1, 0);
        println!(
            "| {n} (one run) | | | {mm:.2} | {s:.2} | | | {sqlite_memory:.2} | - / - / {mc:.2} / {sc:.2} | | {sqlite_memory_cpu:.2} | - / - / {mr:.0} / {sr:.0} |",
        );
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Time from the trigger (a failure under FailFast, the last outcome under Continue) to the
/// user finalizer starting, measured inside the harvest and the finalizer.
async fn latency(runs: usize) {
    for policy in [FailurePolicy::FailFast, FailurePolicy::Continue] {
        let trigger: Arc<std::sync::Mutex<Option<Instant>>> = Arc::default();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Duration>();
        let t = Arc::clone(&trigger);
        let harvest = harvest_fn(move |ctx| {
            let t = Arc::clone(&t);
            async move {
                // Let the other resources finish first, so this is the trigger.
                if ctx.resource_id == "trigger" {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    if let Ok(mut slot) = t.lock() {
                        *slot = Some(Instant::now());
                    }
                    return Err("the failure".into());
                }
                Ok(())
            }
        });
        let t = Arc::clone(&trigger);
        let finalizer = finalizer_fn(move |_| {
            let started = t.lock().ok().and_then(|s| *s).map(|at| at.elapsed());
            let tx = tx.clone();
            async move {
                if let Some(d) = started {
                    let _ = tx.send(d);
                }
                Ok(())
            }
        });
        let sup = Supervisor::builder(harvest, finalizer)
            .config(
                SupervisorConfig::default()
                    .with_session(impls::bench_config().with_failure_policy(policy)),
            )
            .start()
            .await
            .expect("supervisor");
        let mut samples = Vec::with_capacity(runs);
        for _ in 0..runs {
            let mut resources: Vec<String> = (0..8).map(|i| format!("r{i}")).collect();
            resources.push("trigger".into());
            let id = sup
                .start(SessionRequest::new("lat", resources))
                .await
                .expect("start");
            sup.wait_finished(id).await.expect("finished");
            samples.push(rx.recv().await.expect("a latency"));
        }
        samples.sort();
        println!(
            "| {policy:?} | {runs} | {:.1} | {:.1} | {:.1} |",
            percentile(&samples, 0.5).as_secs_f64() * 1e6,
            percentile(&samples, 0.99).as_secs_f64() * 1e6,
            samples.last().map_or(0.0, |d| d.as_secs_f64() * 1e6),
        );
        sup.shutdown().await.expect("shutdown");
    }
}

/// A durable session of `n` resources, alone and while `readers` tasks replay a stored log
/// of `log` events in a loop, `reps` pairs interleaved. Prints the table row.
async fn replay(n: usize, log: u64, readers: usize, reps: usize) {
    use harvest_supervisor::store::NewSession;
    use harvest_supervisor::{EventKind, SessionEvent, SessionId};
    // A node that never registers: the session is only ever read, never rescued.
    const NODE: harvest_supervisor::NodeId = harvest_supervisor::NodeId(uuid::Uuid::nil());
    let dir = std::env::temp_dir().join(format!("hs-replay-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let store = SqliteStore::open(dir.join("bench.db")).await.expect("db");
    // The long log: one finished-looking session's events, appended straight to the store.
    let old = SessionId::new();
    store
        .create_session(NewSession {
            id: old,
            harvester_id: "old".into(),
            resources: Arc::new([]),
            started: chrono::Utc::now(),
            workflow_time: Duration::from_secs(60),
            config: Arc::default(),
            owner: NODE,
        })
        .await
        .expect("old session");
    for seq in 1..=log {
        store
            .append_event(
                harvest_supervisor::Fence::new(NODE),
                SessionEvent {
                    seq,
                    at: chrono::Utc::now(),
                    session_id: old,
                    harvester_id: "old".into(),
                    kind: EventKind::WorkerSucceeded {
                        resource_id: format!("r{seq}").into(),
                        attempt: 1,
                        elapsed: Duration::from_millis(3),
                    },
                },
            )
            .expect("append");
    }
    store.flush().await.expect("flush");
    let durable = || Some(Arc::new(store.clone()) as Arc<dyn SessionStore>);
    let (mut alone, mut loaded, mut replays) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..reps {
        alone.push(impls::run_session(n, durable()).await.as_secs_f64() * 1e6 / n as f64);
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let tasks: Vec<_> = (0..readers)
            .map(|_| {
                let (store, stop, done) = (store.clone(), Arc::clone(&stop), Arc::clone(&done));
                tokio::spawn(async move {
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let events = store.events(old).await.expect("replay");
                        // The first supervisor recovers the old session: a few more events.
                        assert!(events.len() as u64 >= log);
                        done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                })
            })
            .collect();
        // Let every reader be mid-replay when the session starts.
        tokio::time::sleep(Duration::from_millis(200)).await;
        loaded.push(impls::run_session(n, durable()).await.as_secs_f64() * 1e6 / n as f64);
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for t in tasks {
            t.await.expect("reader");
        }
        replays.push(done.load(std::sync::atomic::Ordering::Relaxed) as f64);
    }
    let ratios: Vec<f64> = loaded.iter().zip(&alone).map(|(l, a)| l / a).collect();
    println!(
        "| {n} | {log} | {readers} | {:.2} | {:.2} | {:.2} | {:.0} |",
        median(alone),
        median(loaded),
        median(ratios),
        median(replays)
    );
    store.close().await.expect("close");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Many sessions, each with one resource that sleeps, under a 1 s monitor interval.
/// Write system calls of this process so far (`/proc/self/io`, `syscw`).
fn write_syscalls() -> u64 {
    std::fs::read_to_string("/proc/self/io")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("syscw:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

async fn watchdog(sessions: usize, idle: Duration, sqlite: bool, no_leases: bool) {
    let harvest = harvest_fn(|_| async {
        tokio::time::sleep(Duration::from_secs(3600)).await;
        Ok(())
    });
    let mut config = SupervisorConfig::default()
        .with_session(impls::bench_config().with_monitor_interval(Duration::from_secs(1)));
    if no_leases {
        config.lease_renew_interval = Duration::from_secs(3600);
        config.lease_ttl = Duration::from_secs(7200);
        config.rescue_interval = Duration::from_secs(86_400);
    }
    let dir = std::env::temp_dir().join(format!("hs-watchdog-{}", std::process::id()));
    let mut builder = Supervisor::builder(harvest, finalizer_fn(|_| async { Ok(()) }));
    if sqlite {
        std::fs::create_dir_all(&dir).expect("temp dir");
        let store = SqliteStore::open(dir.join("w.db")).await.expect("db");
        builder = builder.store(Arc::new(store));
    }
    let sup = builder.config(config).start().await.expect("supervisor");
    let rss_before = rss_kib();
    for i in 0..sessions {
        sup.start_session(format!("h{i}"), ["slow"])
            .await
            .expect("start");
    }
    // Let every session start its worker and monitor, then measure the idle cost.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_loaded = rss_kib();
    let cpu0 = cpu_time();
    let writes0 = write_syscalls();
    let wall0 = Instant::now();
    tokio::time::sleep(idle).await;
    let cpu = cpu_time() - cpu0;
    let writes = write_syscalls() - writes0;
    let wall = wall0.elapsed();
    let per_session_kib = (rss_loaded.saturating_sub(rss_before)) as f64 / sessions as f64;
    println!(
        "| {sessions} | {} | {} | {:.1} s | {:.2} % of one core | {:.1} KiB | {:.2} |",
        if sqlite { "sqlite" } else { "memory" },
        if no_leases { "off" } else { "default" },
        wall.as_secs_f64(),
        cpu.as_secs_f64() / wall.as_secs_f64() * 100.0,
        per_session_kib,
        writes as f64 / wall.as_secs_f64()
    );
    let _ = std::fs::remove_dir_all(&dir);
    std::process::exit(0); // the sessions would otherwise run for an hour
}

/// The PostgreSQL database of the benchmarks (`HARVEST_BENCH_PG`).
fn bench_pg() -> String {
    std::env::var("HARVEST_BENCH_PG")
        .expect("HARVEST_BENCH_PG: the URL of the PostgreSQL database to benchmark on")
}

/// A PostgreSQL store in `schema` (created if missing).
async fn pg_store(url: &str, schema: &str) -> PostgresStore {
    PostgresStore::connect_with(PostgresOptions::from_url(url).expect("url").schema(schema))
        .await
        .expect("postgres")
}

/// A plain connection to `url`, for the harness's own statements.
async fn pg_client(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(connection);
    client
}

async fn drop_schema(url: &str, schema: &str) {
    let client = pg_client(url).await;
    client
        .batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
        .await
        .expect("drop schema");
}

/// The memory store with and without a metrics recorder, in alternating fresh processes.
fn metrics_overhead(n: usize, pairs: usize) {
    let (mut without, mut with, mut ratios, mut cpu) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..pairs {
        let a = child_case_with(Imp::Memory, n, false, false);
        let b = child_case_with(Imp::Memory, n, false, true);
        ratios.push(b.secs / a.secs);
        cpu.push(b.cpu_secs / a.cpu_secs);
        without.push(a.secs * 1e6 / n as f64);
        with.push(b.secs * 1e6 / n as f64);
    }
    let (lo, hi) = ratios
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), &r| (a.min(r), b.max(r)));
    println!(
        "| {n} | {pairs} | {:.2} | {:.2} | {:.3} ({lo:.2} to {hi:.2}) | {:.3} |",
        median(without),
        median(with),
        median(ratios),
        median(cpu)
    );
}

/// Memory against PostgreSQL per resource, in alternating fresh processes.
fn pg_throughput(n: usize, pairs: usize) {
    let mut memory = Vec::new();
    let mut postgres = Vec::new();
    let mut ratios = Vec::new();
    let mut cpu_ratios = Vec::new();
    for _ in 0..pairs {
        let m = child_case(Imp::Memory, n, false);
        let p = child_case(Imp::Postgres, n, false);
        ratios.push(p.secs / m.secs);
        cpu_ratios.push(p.cpu_secs / m.cpu_secs);
        memory.push(m);
        postgres.push(p);
    }
    let us = |v: &[Sample]| median(v.iter().map(|s| s.secs * 1e6 / n as f64).collect());
    let rss = |v: &[Sample]| v.iter().map(|s| s.peak_rss_kib).max().unwrap_or(0) / 1024;
    let (lo, hi) = ratios
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), &r| (a.min(r), b.max(r)));
    println!(
        "| {n} | {pairs} | {:.2} | {:.2} | {:.2} ({lo:.2} to {hi:.2}) | {:.2} | {} / {} |",
        us(&memory),
        us(&postgres),
        median(ratios),
        median(cpu_ratios),
        rss(&memory),
        rss(&postgres),
    );
}

/// CPU time of process `pid` (user + system), from `/proc/<pid>/stat`.
fn cpu_of(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<u64> = stat
        .rsplit(") ")
        .next()
        .unwrap_or("")
        .split_whitespace()
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    let ticks = fields.get(11).copied().unwrap_or(0) + fields.get(12).copied().unwrap_or(0);
    Duration::from_millis(ticks * 10)
}

async fn cluster(procs: usize, secs: u64, size: usize, url: &str) {
    use std::io::BufRead;
    let schema = format!("cluster_{}", std::process::id());
    drop(pg_store(url, &schema).await);
    let exe = std::env::current_exe().expect("this binary");
    let children: Vec<std::process::Child> = (0..procs)
        .map(|i| {
            Command::new(&exe)
                .args([
                    "cluster-node",
                    "--postgres",
                    url,
                    "--schema",
                    &schema,
                    "--harvester",
                    &format!("h{i}"),
                    "--secs",
                    &secs.to_string(),
                    "--size",
                    &size.to_string(),
                ])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("cluster node")
        })
        .collect();
    let (mut sessions, mut outcomes, mut cpu) = (0u64, 0u64, Vec::new());
    for mut child in children {
        let stdout = child.stdout.take().expect("stdout");
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let w: Vec<&str> = line.split_whitespace().collect();
            if w.first() == Some(&"DONE") {
                sessions += w.get(1).and_then(|v| v.parse().ok()).unwrap_or(0);
                outcomes += w.get(2).and_then(|v| v.parse().ok()).unwrap_or(0);
                cpu.push(w.get(3).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0));
            }
        }
        let _ = child.wait();
    }
    drop_schema(url, &schema).await;
    let s = secs as f64;
    let cpu_text: Vec<String> = cpu
        .iter()
        .map(|c| format!("{:.0} %", c / s * 100.0))
        .collect();
    println!(
        "| {procs} | {size} | {secs} s | {:.1} | {:.0} | {:.1} | {:.0} | {} |",
        sessions as f64 / s,
        outcomes as f64 / s,
        sessions as f64 / s / procs as f64,
        outcomes as f64 / s / procs as f64,
        cpu_text.join(", ")
    );
}

async fn cluster_node(url: &str, schema: &str, harvester: &str, secs: u64, size: usize) {
    let store = pg_store(url, schema).await;
    let sup = Supervisor::builder(
        harvest_fn(|_| async { Ok(()) }),
        finalizer_fn(|_| async { Ok(()) }),
    )
    .store(Arc::new(store))
    .config(SupervisorConfig::default().with_session(impls::bench_config()))
    .start()
    .await
    .expect("supervisor");
    let cpu0 = cpu_time();
    let until = Instant::now() + Duration::from_secs(secs);
    let (mut sessions, mut outcomes) = (0u64, 0u64);
    let mut k = 0u64;
    while Instant::now() < until {
        let resources: Vec<String> = (0..size).map(|i| format!("{harvester}-{k}-r{i}")).collect();
        let id = sup
            .start_session(harvester, resources)
            .await
            .expect("start");
        sup.wait_finished(id).await.expect("finished");
        sessions += 1;
        outcomes += size as u64;
        k += 1;
    }
    let cpu = cpu_time() - cpu0;
    println!("DONE {sessions} {outcomes} {:.3}", cpu.as_secs_f64());
    sup.shutdown().await.expect("shutdown");
}

async fn idle_cluster(sessions: usize, nodes: usize, idle: Duration, url: &str) {
    use std::io::BufRead;
    let schema = format!("idle_{}", std::process::id());
    drop(pg_store(url, &schema).await);
    let exe = std::env::current_exe().expect("this binary");
    let per = sessions.div_ceil(nodes);
    let mut children = Vec::new();
    for i in 0..nodes {
        let mut child = Command::new(&exe)
            .args([
                "idle-node",
                "--postgres",
                url,
                "--schema",
                &schema,
                "--first",
                &(i * per).to_string(),
                "--count",
                &per.min(sessions.saturating_sub(i * per)).to_string(),
            ])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("idle node");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        std::io::BufReader::new(stdout)
            .read_line(&mut line)
            .expect("READY");
        assert_eq!(line.trim(), "READY");
        children.push(child);
    }
    // Let every session settle (first monitor reads, first batched read), then measure.
    tokio::time::sleep(Duration::from_secs(12)).await;
    let client = pg_client(url).await;
    let stats = "SELECT (xact_commit + xact_rollback)::float8, tup_returned::float8, \
                 tup_fetched::float8, (tup_inserted + tup_updated + tup_deleted)::float8 \
                 FROM pg_stat_database WHERE datname = current_database()";
    let read = |row: &tokio_postgres::Row| -> [f64; 4] {
        [row.get(0), row.get(1), row.get(2), row.get(3)]
    };
    let _ = client
        .batch_execute("SELECT pg_stat_clear_snapshot()")
        .await;
    let before = read(&client.query_one(stats, &[]).await.expect("stats"));
    let cpu0: Vec<Duration> = children.iter().map(|c| cpu_of(c.id())).collect();
    let wall0 = Instant::now();
    tokio::time::sleep(idle).await;
    // Backends publish their counts at most once a second: wait for them.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let _ = client
        .batch_execute("SELECT pg_stat_clear_snapshot()")
        .await;
    let after = read(&client.query_one(stats, &[]).await.expect("stats"));
    let wall = wall0.elapsed().as_secs_f64();
    let cpu: Vec<String> = children
        .iter()
        .zip(&cpu0)
        .map(|(c, c0)| {
            format!(
                "{:.1} %",
                (cpu_of(c.id()) - *c0).as_secs_f64() / wall * 100.0
            )
        })
        .collect();
    for mut child in children {
        let _ = child.kill();
        let _ = child.wait();
    }
    drop_schema(url, &schema).await;
    let rate = |i: usize| (after[i] - before[i]) / wall;
    println!(
        "| {sessions} | {nodes} | {:.0} s | {:.1} | {:.0} | {:.0} | {:.1} | {} |",
        wall,
        rate(0),
        rate(1),
        rate(2),
        rate(3),
        cpu.join(", ")
    );
}

async fn idle_node(url: &str, schema: &str, first: usize, count: usize) {
    let store = pg_store(url, schema).await;
    let sup = Supervisor::builder(
        harvest_fn(|_| async {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Ok(())
        }),
        finalizer_fn(|_| async { Ok(()) }),
    )
    .store(Arc::new(store))
    .config(
        SupervisorConfig::default()
            .with_session(impls::bench_config().with_monitor_interval(Duration::from_secs(1))),
    )
    .start()
    .await
    .expect("supervisor");
    for i in first..first + count {
        sup.start_session(format!("h{i}"), ["slow"])
            .await
            .expect("start");
    }
    println!("READY");
    use std::io::Write;
    let _ = std::io::stdout().flush();
    tokio::time::sleep(Duration::from_secs(3600)).await;
}

/// A node process for [`takeover`].
async fn node(
    db: std::path::PathBuf,
    postgres: Option<Vec<String>>,
    victim: bool,
    lease_ttl: Duration,
    renew: Duration,
    rescue: Duration,
) {
    let store: Arc<dyn SessionStore> = match postgres.as_deref() {
        Some([url, schema]) => Arc::new(
            PostgresStore::connect_with(
                PostgresOptions::from_url(url)
                    .expect("url")
                    .schema(schema.as_str())
                    .lock_timeout(lease_ttl / 2),
            )
            .await
            .expect("postgres"),
        ),
        _ => Arc::new(SqliteStore::open(&db).await.expect("db")),
    };
    let harvest = harvest_fn(|_| async {
        tokio::time::sleep(Duration::from_secs(3600)).await;
        Ok(())
    });
    let sup = Supervisor::builder(harvest, finalizer_fn(|_| async { Ok(()) }))
        .store(store)
        .config(
            SupervisorConfig::default()
                .with_lease_ttl(lease_ttl)
                .with_lease_renew_interval(renew)
                .with_rescue_interval(rescue),
        )
        .start()
        .await
        .expect("supervisor");
    if victim {
        let id = sup.start_session("csw", ["slow"]).await.expect("start");
        println!("SESSION {id}");
    } else {
        println!("READY");
    }
    use std::io::Write;
    let _ = std::io::stdout().flush();
    tokio::time::sleep(Duration::from_secs(3600)).await;
}

/// Spawns a `node` child; returns it and its first line.
fn spawn_node(
    db: &std::path::Path,
    postgres: Option<(&str, &str)>,
    victim: bool,
    times: (Duration, Duration, Duration),
) -> (std::process::Child, String) {
    use std::io::BufRead;
    let exe = std::env::current_exe().expect("this binary");
    let show = |d: Duration| format!("{}ms", d.as_millis());
    let mut args = vec![
        "node".to_owned(),
        "--db".to_owned(),
        db.display().to_string(),
        "--lease-ttl".to_owned(),
        show(times.0),
        "--renew".to_owned(),
        show(times.1),
        "--rescue".to_owned(),
        show(times.2),
    ];
    if victim {
        args.push("--victim".to_owned());
    }
    if let Some((url, schema)) = postgres {
        args.extend(["--postgres".to_owned(), url.to_owned(), schema.to_owned()]);
    }
    let mut child = Command::new(exe)
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("node");
    let mut line = String::new();
    let stdout = child.stdout.take().expect("stdout");
    std::io::BufReader::new(stdout)
        .read_line(&mut line)
        .expect("first line");
    (child, line.trim().to_owned())
}

async fn takeover(
    kills: usize,
    signal: &str,
    ttl: Duration,
    renew: Duration,
    rescue: Duration,
    postgres: Option<&str>,
) {
    let times = (ttl, renew, rescue);
    let mut took = Vec::with_capacity(kills);
    for round in 0..kills {
        let dir = std::env::temp_dir().join(format!("hs-takeover-{}-{round}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let db = dir.join("t.db");
        let schema = format!("takeover_{}_{round}", std::process::id());
        let pg = postgres.map(|url| (url, schema.as_str()));
        let (mut rescuer, _) = spawn_node(&db, pg, false, times);
        let (mut victim, line) = spawn_node(&db, pg, true, times);
        let id = line
            .strip_prefix("SESSION ")
            .and_then(|t| uuid::Uuid::parse_str(t).ok())
            .map(harvest_supervisor::SessionId)
            .expect("a session id");
        let store: Arc<dyn SessionStore> = match postgres {
            Some(url) => Arc::new(pg_store(url, &schema).await),
            None => Arc::new(SqliteStore::open(&db).await.expect("db")),
        };
        // A random point in the rescuer's cycle, as a real death would fall.
        let phase = Duration::from_millis(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| u64::from(d.subsec_nanos()))
                % u64::try_from(rescue.as_millis()).unwrap_or(1).max(1),
        );
        tokio::time::sleep(phase).await;
        let pid = victim.id().to_string();
        let _ = Command::new("kill")
            .args([&format!("-{signal}"), &pid])
            .status();
        let died = Instant::now();
        loop {
            let record = store.session(id).await.expect("record");
            if record.epoch >= 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        took.push(died.elapsed());
        let _ = Command::new("kill").args(["-CONT", &pid]).status();
        let _ = victim.kill();
        let _ = victim.wait();
        let _ = rescuer.kill();
        let _ = rescuer.wait();
        drop(store);
        if let Some(url) = postgres {
            drop_schema(url, &schema).await;
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
    took.sort_unstable();
    let at = |q: f64| {
        let i = ((took.len() as f64 - 1.0) * q).round() as usize;
        took.get(i).copied().unwrap_or_default()
    };
    println!(
        "| signal | kills | lease_ttl | renew | rescue_interval | p50 | p99 | max | ttl + rescue (+ jitter) |\n|---|---|---|---|---|---|---|---|---|"
    );
    let ms = |d: Duration| format!("{:.0} ms", d.as_secs_f64() * 1000.0);
    println!(
        "| {signal} | {kills} | {} | {} | {} | {} | {} | {} | {} |",
        ms(ttl),
        ms(renew),
        ms(rescue),
        ms(at(0.5)),
        ms(at(0.99)),
        ms(took.last().copied().unwrap_or_default()),
        ms(ttl + rescue + rescue / 5),
    );
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::One {
            imp,
            n,
            warm,
            metrics,
        } => {
            if metrics {
                metrics_exporter_prometheus::PrometheusBuilder::new()
                    .install_recorder()
                    .expect("the Prometheus recorder");
                // A server installs its recorder once, at start: its one-time set-up (the
                // clock it reads calibrates on first use) is not a session's cost.
                metrics::histogram!("bench_warm_up").record(0.0);
            }
            let sample = run_one(imp, n, warm).await;
            println!("{}", serde_json::to_string(&sample).expect("json"));
        }
        Cmd::Throughput { n, reps, warm } => throughput_table(&[n], reps, false, warm),
        Cmd::Latency { runs } => {
            println!("| policy | runs | p50 µs | p99 µs | max µs |\n|---|---|---|---|---|");
            latency(runs).await;
        }
        Cmd::TimerFloor { actors, idle_secs } => {
            let mut refs = Vec::with_capacity(actors);
            for _ in 0..actors {
                refs.push(impls::spawn_ticking(Duration::from_secs(1)).await);
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
            let cpu0 = cpu_time();
            let wall0 = Instant::now();
            tokio::time::sleep(Duration::from_secs(idle_secs)).await;
            let share = (cpu_time() - cpu0).as_secs_f64() / wall0.elapsed().as_secs_f64();
            println!(
                "| {actors} ractor actors ticked every 1 s | {:.2} % of one core |",
                share * 100.0
            );
        }
        Cmd::ActorMemory { actors } => {
            let before = rss_kib();
            let mut refs = Vec::with_capacity(actors);
            for _ in 0..actors {
                refs.push(impls::spawn_idle().await);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            let per = (rss_kib().saturating_sub(before)) as f64 / actors as f64;
            println!("| {actors} idle ractor actors | {per:.1} KiB each |");
        }
        Cmd::Replay {
            n,
            log,
            readers,
            reps,
        } => {
            println!(
                "| N | log events | readers | µs/resource alone | with readers | ratio (median of pairs) | replays meanwhile |\n|---|---|---|---|---|---|---|"
            );
            replay(n, log, readers, reps).await;
        }
        Cmd::Watchdog {
            sessions,
            idle_secs,
            sqlite,
            no_leases,
        } => {
            println!(
                "| sessions | store | leases and rescue | idle | CPU | memory per session | write syscalls/s |\n|---|---|---|---|---|---|---|"
            );
            watchdog(sessions, Duration::from_secs(idle_secs), sqlite, no_leases).await;
        }
        Cmd::Takeover {
            kills,
            signal,
            lease_ttl,
            renew,
            rescue,
            postgres,
        } => {
            takeover(
                kills,
                &signal,
                lease_ttl,
                renew,
                rescue,
                postgres.as_deref(),
            )
            .await
        }
        Cmd::Node {
            db,
            postgres,
            victim,
            lease_ttl,
            renew,
            rescue,
        } => node(db, postgres, victim, lease_ttl, renew, rescue).await,
        Cmd::MetricsOverhead { n, pairs } => {
            println!(
                "| N | pairs | µs/resource without | with a recorder | with/without (range) | CPU with/without |\n|---|---|---|---|---|---|"
            );
            metrics_overhead(n, pairs);
        }
        Cmd::PgThroughput { n, pairs } => {
            println!(
                "| N | pairs | memory µs/resource | postgres µs/resource | postgres/memory (range) | CPU postgres/memory | peak RSS memory / postgres (MiB) |\n|---|---|---|---|---|---|---|"
            );
            pg_throughput(n, pairs);
        }
        Cmd::Cluster {
            procs,
            secs,
            size,
            postgres,
        } => {
            println!(
                "| processes | resources per session | for | sessions/s | outcomes/s | sessions/s per process | outcomes/s per process | CPU per process |\n|---|---|---|---|---|---|---|---|"
            );
            cluster(procs, secs, size, &postgres).await;
        }
        Cmd::ClusterNode {
            postgres,
            schema,
            harvester,
            secs,
            size,
        } => cluster_node(&postgres, &schema, &harvester, secs, size).await,
        Cmd::IdleCluster {
            sessions,
            nodes,
            idle_secs,
            postgres,
        } => {
            println!(
                "| sessions | nodes | idle | transactions/s | rows returned/s | rows fetched/s | rows written/s | CPU per node |\n|---|---|---|---|---|---|---|---|"
            );
            idle_cluster(sessions, nodes, Duration::from_secs(idle_secs), &postgres).await;
        }
        Cmd::IdleNode {
            postgres,
            schema,
            first,
            count,
        } => idle_node(&postgres, &schema, first, count).await,
        Cmd::All { reps, million } => {
            println!(
                "## Throughput (medians of {reps} runs; a ratio is the median of its ratios within each run; window {WINDOW})\n"
            );
            throughput_table(&[1_000, 10_000, 100_000], reps, million, false);
            println!(
                "\n## Throughput, warm (each case timed after one untimed run of it in its process)\n"
            );
            throughput_table(&[1_000, 10_000, 100_000], reps, false, true);
            println!("\n## Latency to the finalizer\n");
            println!("| policy | runs | p50 µs | p99 µs | max µs |\n|---|---|---|---|---|");
            latency(500).await;
            println!("\n## Watchdog scale\n");
            let exe = std::env::current_exe().expect("this binary");
            for args in [&["watchdog"][..], &["timer-floor"], &["actor-memory"]] {
                let out = Command::new(&exe).args(args).output().expect("watchdog");
                print!("{}", String::from_utf8_lossy(&out.stdout));
                println!();
            }
        }
    }
}
