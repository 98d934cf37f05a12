//! `cargo bench`: the cost per resource of supervision next to its floors, at N = 1,000
//! (criterion). The scale runs (N up to 1,000,000, RSS, latency, watchdog) live in
//! `examples/bench_scale.rs`; see BENCHMARKS.md.

mod common;

use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use harvest_supervisor::{SessionStore, SqliteStore};

const N: usize = 1_000;

fn supervision(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut group = c.benchmark_group("one window of 64, per 1,000 resources");
    group.throughput(Throughput::Elements(N as u64));
    group.bench_function("floor: JoinSet", |b| {
        b.to_async(&rt).iter_custom(|iters| async move {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                total += common::run_floor(N).await;
            }
            total
        })
    });
    group.bench_function("actor floor: bare ractor", |b| {
        b.to_async(&rt).iter_custom(|iters| async move {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                total += common::run_actor(N).await;
            }
            total
        })
    });
    group.bench_function("session: memory store", |b| {
        b.to_async(&rt).iter_custom(|iters| async move {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                total += common::run_session(N, None).await;
            }
            total
        })
    });
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("bench.db");
    group.bench_function("session: sqlite store", |b| {
        b.to_async(&rt).iter_custom(|iters| {
            let path = path.clone();
            async move {
                let store = SqliteStore::open(&path).await.expect("db");
                let store: Arc<dyn SessionStore> = Arc::new(store);
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    total += common::run_session(N, Some(Arc::clone(&store))).await;
                }
                total
            }
        })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).measurement_time(Duration::from_secs(5));
    targets = supervision
}
criterion_main!(benches);
