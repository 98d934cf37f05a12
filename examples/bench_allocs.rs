//! Heap allocations per resource, side by side: the one benchmark this noisy VM cannot
//! blur. Counts every allocation (and its bytes) made while each implementation of
//! `benches/common` runs N resources, divided by N.
//!
//! ```text
//! cargo run --release --example bench_allocs -- 100000
//! ```
//!
//! Timing lives in `bench_scale` and `cargo bench`; this binary's counting allocator would
//! distort it.

#[path = "../benches/common/mod.rs"]
mod impls;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use harvest_supervisor::SqliteStore;

/// The system allocator, counting.
struct Counting;

static ALLOCS: AtomicU64 = AtomicU64::new(0);
static BYTES: AtomicU64 = AtomicU64::new(0);

// SAFETY: every call is forwarded unchanged to the system allocator; the counters are
// plain atomics that never allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        BYTES.fetch_add(layout.size() as u64, Ordering::Relaxed);
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `alloc`/`realloc` above with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        BYTES.fetch_add(layout.size() as u64, Ordering::Relaxed);
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        BYTES.fetch_add(new_size as u64, Ordering::Relaxed);
        // SAFETY: forwarded unchanged.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn snapshot() -> (u64, u64) {
    (
        ALLOCS.load(Ordering::Relaxed),
        BYTES.load(Ordering::Relaxed),
    )
}

async fn count<F: std::future::Future>(name: &str, n: usize, run: F) {
    let before = snapshot();
    run.await;
    let after = snapshot();
    println!(
        "| {name} | {:.1} | {:.0} |",
        (after.0 - before.0) as f64 / n as f64,
        (after.1 - before.1) as f64 / n as f64
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(100_000);
    println!(
        "N = {n}\n\n| implementation | allocations per resource | bytes allocated per resource |"
    );
    println!("|---|---|---|");
    count("floor", n, impls::run_floor(n)).await;
    count("actor", n, impls::run_actor(n)).await;
    count("memory", n, impls::run_session(n, None)).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let store = SqliteStore::open(dir.path().join("bench.db"))
        .await
        .expect("db");
    count(
        "sqlite",
        n,
        impls::run_session(n, Some(Arc::new(store.clone()))),
    )
    .await;
    store.close().await.expect("close");
}
