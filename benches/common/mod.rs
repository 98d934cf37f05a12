//! The four implementations measured side by side, shared by `cargo bench` and the scale
//! binary `examples/bench_scale.rs`. All keep 64 items in flight.
#![allow(dead_code)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use harvest_supervisor::{
    SessionConfig, SessionRequest, SessionStore, Supervisor, SupervisorConfig, finalizer_fn,
    harvest_fn,
};
use ractor::{Actor, ActorProcessingErr, ActorRef, SupervisionEvent};
use tokio::sync::oneshot;

/// Items in flight at once, in every implementation.
pub const WINDOW: usize = 64;

/// CPU time (user + system) of this process's live threads, from the scheduler's per-thread
/// statistics (`/proc/self/task/*/schedstat`): nanoseconds, where `/proc/self/stat` counts
/// 10 ms ticks. CPU time is what a slow or busy VM blurs least: wall time here swings 2x
/// from one minute to the next. Zero where the files do not exist.
pub fn process_cpu() -> Duration {
    let mut ns = 0u64;
    if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
        for task in tasks.flatten() {
            if let Ok(stat) = std::fs::read_to_string(task.path().join("schedstat")) {
                ns += stat
                    .split_whitespace()
                    .next()
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0);
            }
        }
    }
    Duration::from_nanos(ns)
}

/// The process CPU time of the last timed region (see [`Stopwatch`]), in nanoseconds.
static LAST_CPU_NS: AtomicU64 = AtomicU64::new(0);

/// Times a region in wall time, and notes the process CPU time it took for [`last_cpu`].
/// (Threads that end inside the region take their CPU time with them; none of ours do.)
pub struct Stopwatch {
    wall: Instant,
    cpu: Duration,
}

impl Stopwatch {
    pub fn start() -> Self {
        let cpu = process_cpu();
        Self {
            wall: Instant::now(),
            cpu,
        }
    }

    /// The wall time since `start`; the CPU time is kept for [`last_cpu`].
    pub fn stop(self) -> Duration {
        let wall = self.wall.elapsed();
        let cpu = process_cpu().saturating_sub(self.cpu);
        LAST_CPU_NS.store(
            u64::try_from(cpu.as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        wall
    }
}

/// The CPU time of the last region a [`Stopwatch`] timed.
pub fn last_cpu() -> Duration {
    Duration::from_nanos(LAST_CPU_NS.load(Ordering::Relaxed))
}

/// Floor: N no-op futures through a `JoinSet` kept at `WINDOW`, then one closure.
pub async fn run_floor(n: usize) -> Duration {
    let start = Stopwatch::start();
    let mut set = tokio::task::JoinSet::new();
    let mut started = 0;
    let mut done = 0;
    while done < n {
        while started < n && set.len() < WINDOW {
            set.spawn(async {});
            started += 1;
        }
        if set.join_next().await.is_some() {
            done += 1;
        }
    }
    let finished = std::hint::black_box(|| done)();
    assert_eq!(finished, n);
    start.stop()
}

struct Child;
impl Actor for Child {
    type Msg = ();
    type State = ();
    type Arguments = ();
    async fn pre_start(&self, _: ActorRef<()>, _: ()) -> Result<(), ActorProcessingErr> {
        Ok(())
    }
    async fn post_start(&self, me: ActorRef<()>, _: &mut ()) -> Result<(), ActorProcessingErr> {
        me.stop(None);
        Ok(())
    }
}

struct Parent;
struct ParentState {
    n: usize,
    started: usize,
    done: usize,
    finish: Option<oneshot::Sender<()>>,
}
impl Parent {
    async fn fill(me: &ActorRef<()>, s: &mut ParentState) -> Result<(), ActorProcessingErr> {
        while s.started < s.n && s.started - s.done < WINDOW {
            Actor::spawn_linked(None, Child, (), me.get_cell()).await?;
            s.started += 1;
        }
        Ok(())
    }
}
impl Actor for Parent {
    type Msg = ();
    type State = ParentState;
    type Arguments = (usize, oneshot::Sender<()>);
    async fn pre_start(
        &self,
        _: ActorRef<()>,
        (n, finish): (usize, oneshot::Sender<()>),
    ) -> Result<ParentState, ActorProcessingErr> {
        Ok(ParentState {
            n,
            started: 0,
            done: 0,
            finish: Some(finish),
        })
    }
    async fn post_start(
        &self,
        me: ActorRef<()>,
        s: &mut ParentState,
    ) -> Result<(), ActorProcessingErr> {
        Self::fill(&me, s).await
    }
    async fn handle_supervisor_evt(
        &self,
        me: ActorRef<()>,
        evt: SupervisionEvent,
        s: &mut ParentState,
    ) -> Result<(), ActorProcessingErr> {
        if let SupervisionEvent::ActorTerminated(..) | SupervisionEvent::ActorFailed(..) = evt {
            s.done += 1;
            if s.done == s.n {
                if let Some(f) = s.finish.take() {
                    let _ = f.send(());
                }
                me.stop(None);
                return Ok(());
            }
            Self::fill(&me, s).await?;
        }
        Ok(())
    }
}

/// Actor floor: a bare ractor parent spawning no-op linked children, `WINDOW` alive.
pub async fn run_actor(n: usize) -> Duration {
    let start = Stopwatch::start();
    let (tx, rx) = oneshot::channel();
    let (_parent, join) = Actor::spawn(None, Parent, (n, tx)).await.expect("parent");
    rx.await.expect("all children done");
    let took = start.stop();
    let _ = join.await;
    took
}

/// The session budget of the benchmarks: `WINDOW` workers, no per-attempt timer.
pub fn bench_config() -> SessionConfig {
    SessionConfig::default()
        .with_max_concurrency(WINDOW)
        .with_resource_timeout(None)
}

/// One harvest-supervisor session of N no-op resources, from start to finalizer.
pub async fn run_session(n: usize, store: Option<Arc<dyn SessionStore>>) -> Duration {
    let resources: Vec<String> = (0..n).map(|i| format!("r{i}")).collect();
    let (tx, rx) = oneshot::channel::<()>();
    let tx = std::sync::Mutex::new(Some(tx));
    let finalizer = finalizer_fn(move |_| {
        let f = tx.lock().ok().and_then(|mut t| t.take());
        async move {
            if let Some(f) = f {
                let _ = f.send(());
            }
            Ok(())
        }
    });
    let mut builder = Supervisor::builder(harvest_fn(|_| async { Ok(()) }), finalizer)
        .config(SupervisorConfig::default().with_session(bench_config()));
    if let Some(store) = store {
        builder = builder.store(store);
    }
    let sup = builder.start().await.expect("supervisor");
    // The request is the caller's input, made before the clock starts (as the floors get
    // theirs); validating it (duplicate ids) is the library's work and is timed.
    let request = SessionRequest::new("bench", resources);
    let start = Stopwatch::start();
    sup.start(request).await.expect("start");
    rx.await.expect("finalized");
    let took = start.stop();
    sup.shutdown().await.expect("shutdown");
    took
}

struct Idle;
impl Actor for Idle {
    type Msg = ();
    type State = ();
    type Arguments = ();
    async fn pre_start(&self, _: ActorRef<()>, _: ()) -> Result<(), ActorProcessingErr> {
        Ok(())
    }
}

/// An actor that does nothing and stays alive: the memory floor of one actor.
pub async fn spawn_idle() -> ActorRef<()> {
    let (actor, _) = Actor::spawn(None, Idle, ()).await.expect("idle actor");
    actor
}

struct Ticking;
impl Actor for Ticking {
    type Msg = ();
    type State = tokio::task::JoinHandle<()>;
    type Arguments = Duration;
    async fn pre_start(
        &self,
        me: ActorRef<()>,
        every: Duration,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(me.send_interval(every, || ()))
    }
    async fn handle(
        &self,
        _: ActorRef<()>,
        _: (),
        _: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        Ok(())
    }
}

/// An actor whose only work is a ractor `send_interval` timer: the floor of a monitor.
pub async fn spawn_ticking(every: Duration) -> ActorRef<()> {
    let (actor, _) = Actor::spawn(None, Ticking, every)
        .await
        .expect("ticking actor");
    actor
}
