//! A bounded load on a running harvest server (loopback only): `streams` open event
//! streams and, `rounds` times, a timed session started and then, while it runs, `starts`
//! session starts at once, while `/healthz` is asked every 10 ms; then the same timed
//! session on the quiet server. Prints `/healthz` latencies (p50, p99, max) under load and
//! the timed session's cost per resource under load and quiet, two ways: as this client
//! saw it (its start request to the poll that found it ended: HTTP latencies on a busy
//! server included) and as the server recorded it (the session's `started` to `ended`).
//!
//! ```text
//! cargo run --release --example harvest_server -- --port 8099 --admin-port 8100 --token $TOKEN \
//!     --max-streams 1000 --max-resources 100000 --work-ms 0 --db /tmp/load.db 2>/dev/null &
//! cargo run --release --example server_load -- --base http://127.0.0.1:8099 --token $TOKEN \
//!     --health http://127.0.0.1:8100
//! ```

use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::json;

#[derive(Parser)]
struct Args {
    /// The server (loopback only: this is a load generator).
    #[arg(long, default_value = "http://127.0.0.1:8099")]
    base: String,
    /// The server's bearer token.
    #[arg(long, env = "HARVEST_SERVER_TOKEN")]
    token: String,
    /// Event streams held open during the load.
    #[arg(long, default_value_t = 200)]
    streams: usize,
    /// Session starts fired at once (each on a harvester of its own, 10 resources).
    #[arg(long, default_value_t = 500)]
    starts: usize,
    /// Resources of the timed session. Its per-resource cost is its time over its
    /// resources, so its few fixed store round trips (its start and its finalization: a
    /// few ms each while the burst shares the store's writer) must not be most of it: at
    /// 2,000 no-op resources they are about a third of its time under load, at 10,000
    /// (a large catalogue) a tenth.
    #[arg(long, default_value_t = 10_000)]
    timed: usize,
    /// Where `/healthz` is probed (default: `--base`); the server's `--admin-port`
    /// answers it from a thread of its own.
    #[arg(long)]
    health: Option<String>,
    /// Bursts of starts, one after the other (each with its timed session): more
    /// `/healthz` probes for the percentiles; the per-resource cost is their median.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Timed sessions on the quiet server, one after the other; the quiet cost is their
    /// median (10,000 no-op resources take about 120 ms: a few runs are noisy).
    #[arg(long, default_value_t = 15)]
    quiet_runs: usize,
}

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Starts a session; its id.
async fn start(
    http: &reqwest::Client,
    args: &Args,
    harvester: &str,
    count: usize,
) -> Option<String> {
    start_with(http, args, harvester, json!({ "count": count })).await
}

/// Starts a session with this body; its id.
async fn start_with(
    http: &reqwest::Client,
    args: &Args,
    harvester: &str,
    body: serde_json::Value,
) -> Option<String> {
    let r = http
        .post(format!("{}/harvesters/{harvester}/sessions", args.base))
        .bearer_auth(&args.token)
        .json(&body)
        .send()
        .await
        .ok()?;
    let body: serde_json::Value = r.json().await.ok()?;
    body["session_id"].as_str().map(str::to_owned)
}

/// Waits until session `id` is terminal: how long from `since` as this client saw it
/// (its start request to the poll that found it ended, every 5 ms), and as the server
/// recorded it (the session's own `started` to `ended`).
async fn finished(
    http: &reqwest::Client,
    args: &Args,
    id: &str,
    since: Instant,
) -> (Duration, Duration) {
    loop {
        if let Ok(r) = http
            .get(format!("{}/sessions/{id}?limit=1", args.base))
            .send()
            .await
            && let Ok(view) = r.json::<serde_json::Value>().await
            && let Some(ended) = view["record"]["ended"].as_str()
        {
            let seen = since.elapsed();
            let at = |t: &str| chrono::DateTime::parse_from_rfc3339(t).expect("an RFC 3339 time");
            let started = view["record"]["started"].as_str().expect("started");
            let recorded = (at(ended) - at(started))
                .to_std()
                .expect("ended after it started");
            return (seen, recorded);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Starts the timed session: its id, and when it was asked for.
async fn start_timed(http: &reqwest::Client, args: &Args, harvester: &str) -> (String, Instant) {
    let since = Instant::now();
    let id = start(http, args, harvester, args.timed)
        .await
        .expect("the timed session starts");
    (id, since)
}

/// The timed session's µs per resource: as the client saw it, and as the server recorded
/// it.
async fn timed_cost(
    http: &reqwest::Client,
    args: &Args,
    (id, since): (String, Instant),
) -> (f64, f64) {
    let (seen, recorded) = finished(http, args, &id, since).await;
    let per = |d: Duration| d.as_secs_f64() * 1e6 / args.timed as f64;
    (per(seen), per(recorded))
}

/// The median of `values`.
fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    assert!(
        args.base.starts_with("http://127.0.0.1") || args.base.starts_with("http://localhost"),
        "loopback only"
    );
    let http = reqwest::Client::new();
    let run = std::process::id();

    // Something for the streams to follow: a session that runs through the load (its one
    // resource hangs until the server's per-resource timeout).
    let followed = start_with(
        &http,
        &args,
        &format!("load-{run}-followed"),
        json!({ "resources": ["hang-followed"] }),
    )
    .await
    .expect("a session to follow");
    let mut open = Vec::new();
    for _ in 0..args.streams {
        let r = http
            .get(format!("{}/sessions/{followed}/events", args.base))
            .send()
            .await
            .expect("a stream");
        open.push(r.bytes_stream());
    }
    println!("{} streams open", open.len());

    // /healthz every 10 ms while the load runs.
    // The probe is an outside health checker: a thread and a runtime of its own, so that it
    // never waits behind this generator's own requests (they share the machine's cores with
    // the server, and would otherwise count in its latencies).
    let base = args.health.clone().unwrap_or_else(|| args.base.clone());
    assert!(
        base.starts_with("http://127.0.0.1") || base.starts_with("http://localhost"),
        "loopback only"
    );
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let probe = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("the probe's runtime");
        runtime.block_on(async move {
            let probing = reqwest::Client::new();
            let mut took = Vec::new();
            let mut failed = 0usize;
            while !*stopped.borrow() {
                let t = Instant::now();
                match probing.get(format!("{base}/healthz")).send().await {
                    Ok(r) if r.status().is_success() => took.push(t.elapsed()),
                    _ => failed += 1,
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            (took, failed)
        })
    });

    let load_started = Instant::now();
    let mut started = 0usize;
    let mut under_load = Vec::new();
    for round in 0..args.rounds {
        let starts = futures::future::join_all((0..args.starts).map(|i| {
            let http = http.clone();
            let args = &args;
            async move { start(&http, args, &format!("load-{run}-{round}-{i}"), 10).await }
        }));
        // A running session: started, then the burst comes.
        let timed = start_timed(&http, &args, &format!("load-{run}-{round}-timed")).await;
        let (accepted, cost) = tokio::join!(starts, timed_cost(&http, &args, timed));
        started += accepted.iter().filter(|s| s.is_some()).count();
        under_load.push(cost);
    }
    let load_took = load_started.elapsed();
    let (under_load, recorded_under_load): (Vec<f64>, Vec<f64>) = under_load.into_iter().unzip();
    let (under_load, recorded_under_load) = (median(under_load), median(recorded_under_load));
    let _ = stop.send(true);
    let (mut took, failed) = probe.join().expect("probe");
    took.sort_unstable();
    // The streams close.
    drop(open);

    // The same session on a quiet server (the load's sessions ended).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut quiet = Vec::new();
    for round in 0..args.quiet_runs {
        let timed = start_timed(&http, &args, &format!("load-{run}-{round}-quiet")).await;
        quiet.push(timed_cost(&http, &args, timed).await);
    }
    let (quiet, recorded_quiet): (Vec<f64>, Vec<f64>) = quiet.into_iter().unzip();
    let (quiet, recorded_quiet) = (median(quiet), median(recorded_quiet));

    println!(
        "| streams | rounds x starts (accepted) | load took | /healthz probes | p50 | p99 | max | failed | µs/resource under load (median) | quiet | ratio | recorded: under load | quiet | ratio |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    );
    let ms = |d: Duration| format!("{:.1} ms", d.as_secs_f64() * 1000.0);
    println!(
        "| {} | {} x {} ({started}) | {:.2} s | {} | {} | {} | {} | {failed} | {under_load:.1} | {quiet:.1} | {:.2} | {recorded_under_load:.1} | {recorded_quiet:.1} | {:.2} |",
        args.streams,
        args.rounds,
        args.starts,
        load_took.as_secs_f64(),
        took.len(),
        ms(percentile(&took, 0.5)),
        ms(percentile(&took, 0.99)),
        ms(took.last().copied().unwrap_or_default()),
        under_load / quiet,
        recorded_under_load / recorded_quiet,
    );
}
