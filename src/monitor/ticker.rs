//! One clock per supervisor and interval, driving every MonitorActor's `CheckDeadline`.
//!
//! A timer task per monitor (ractor's `send_interval`) costs a task, a timer-wheel entry and
//! a wake-up per session and tick; with 10,000 sessions that is most of an idle
//! supervisor's work. Here the monitors of one interval share one task that walks them
//! each tick. Only the clock is shared: each MonitorActor still receives its own timer
//! messages and makes every decision itself.
//!
//! Waking an idle monitor costs its cold memory (mailbox, task, state: a dozen cache lines
//! on as many pages), so the walk wakes a monitor only on a tick that can change something:
//! one it asked for ([`Registration::wake_at`]: its next read of the store or `MonitorTick`
//! event), every tick once its deadline has passed, and every tick once its session's
//! finalization is claimed or done. Those conditions are read from the clock's own
//! table and the session's lifecycle cell, which is what the monitor itself would have
//! looked at on a quiet tick. (10,000 idle sessions, 1 s interval: 3.75 -> 0.4 % of a core,
//! medians of 4 alternating runs.)
//!
//! The store is read for the monitors too, in one batch per clock: every
//! [`STORE_CHECK_EVERY`] ticks the clock reads the records of all its sessions
//! ([`SessionStore::sessions_by_id`], a query per [`STORE_BATCH`] sessions) and updates
//! their lifecycle cells, so that a session another node finished or took over is seen
//! without a query per session and tick (10,000 sessions at a 1 s interval were 1,000
//! reads a second; now 1 query per 1,000 sessions every 10 s). A monitor still reads its
//! own record when it has a decision to make.
//!
//! A monitor registers in `pre_start`; its [`Registration`] leaves the table when the
//! monitor's state is dropped (on stop and on kill alike), and a send to a dead monitor
//! removes it too.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use ractor::{ActorId, ActorRef};
use tokio::time::{Instant, MissedTickBehavior};

use crate::finalizer::Lifecycle;
use crate::model::SessionId;
use crate::monitor::MonitorMessage;
use crate::store::SessionStore;

/// Ticks between two batched reads of the sessions' records.
pub(crate) const STORE_CHECK_EVERY: u64 = 10;

/// Sessions read per query of a batched read.
pub(crate) const STORE_BATCH: usize = 1000;

/// What the clock knows of one monitor.
struct Entry {
    monitor: ActorRef<MonitorMessage>,
    id: ActorId,
    session: SessionId,
    /// Woken on every tick from here on.
    deadline: Instant,
    lifecycle: Arc<Lifecycle>,
    /// Woken on this tick (and later ones) anyway.
    due: u64,
}

impl Entry {
    fn wants(&self, tick: u64, now: Instant) -> bool {
        tick >= self.due || now >= self.deadline || self.lifecycle.is_claimed()
    }
}

/// The monitors ticked at one interval: a slab, so that a registration knows its place.
#[derive(Default)]
struct Table {
    entries: Vec<Option<Entry>>,
    free: Vec<usize>,
    /// Ticks of this clock so far; the first is 1.
    tick: u64,
}

impl Table {
    /// Empties `slot` if `id` still holds it (a slot freed by a failed send may have been
    /// given to another monitor since).
    fn release(&mut self, slot: usize, id: ActorId) {
        if let Some(place) = self.entries.get_mut(slot)
            && place.as_ref().is_some_and(|e| e.id == id)
        {
            *place = None;
            self.free.push(slot);
        }
    }
}

#[derive(Default)]
struct Bucket {
    table: Mutex<Table>,
}

impl Bucket {
    fn table(&self) -> MutexGuard<'_, Table> {
        // A poisoned lock only means a sender panicked mid-walk; the table is still valid.
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The shared clocks of one supervisor, by interval.
pub(crate) struct Ticker {
    buckets: Mutex<HashMap<Duration, Weak<Bucket>>>,
    /// Read in batches for the monitors.
    store: Arc<dyn SessionStore>,
    /// Published on every tick.
    gauges: Arc<crate::meters::Gauges>,
}

/// A monitor's place on its clock; dropping it leaves.
pub(crate) struct Registration {
    bucket: Arc<Bucket>,
    slot: usize,
    id: ActorId,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.bucket.table().release(self.slot, self.id);
    }
}

impl Registration {
    /// Asks to be woken on clock tick `tick` at the latest (deadline and lifecycle still
    /// wake the monitor earlier).
    pub(crate) fn wake_at(&self, tick: u64) {
        if let Some(Some(entry)) = self.bucket.table().entries.get_mut(self.slot)
            && entry.id == self.id
        {
            entry.due = tick;
        }
    }
}

impl Ticker {
    /// The clocks of a supervisor on `store`.
    pub(crate) fn new(store: Arc<dyn SessionStore>, gauges: Arc<crate::meters::Gauges>) -> Self {
        Self {
            buckets: Mutex::default(),
            store,
            gauges,
        }
    }

    /// Sends `monitor` a `CheckDeadline` on the next tick of the clock of `every`, then on
    /// the ticks it asks for, and on every tick once `deadline` has passed or `lifecycle`
    /// is claimed, until the registration is dropped.
    pub(crate) fn register(
        &self,
        every: Duration,
        monitor: ActorRef<MonitorMessage>,
        session: SessionId,
        deadline: Instant,
        lifecycle: Arc<Lifecycle>,
    ) -> Registration {
        let bucket = {
            let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
            match buckets.get(&every).and_then(Weak::upgrade) {
                Some(bucket) => bucket,
                None => {
                    let bucket = Arc::new(Bucket::default());
                    buckets.insert(every, Arc::downgrade(&bucket));
                    tokio::spawn(tick(
                        Arc::downgrade(&bucket),
                        every,
                        Arc::clone(&self.store),
                        Arc::clone(&self.gauges),
                    ));
                    bucket
                }
            }
        };
        let id = monitor.get_id();
        let slot = {
            let mut table = bucket.table();
            let entry = Entry {
                monitor,
                id,
                session,
                deadline,
                lifecycle,
                due: 0,
            };
            match table.free.pop() {
                Some(slot) => {
                    table.entries[slot] = Some(entry);
                    slot
                }
                None => {
                    table.entries.push(Some(entry));
                    table.entries.len() - 1
                }
            }
        };
        Registration { bucket, slot, id }
    }
}

/// The clock of one bucket. Ends once the bucket is gone (no monitor holds it).
async fn tick(
    bucket: Weak<Bucket>,
    every: Duration,
    store: Arc<dyn SessionStore>,
    gauges: Arc<crate::meters::Gauges>,
) {
    // Validation bounds `every` to a day; an instant past the clock's range ticks at once.
    let now = Instant::now();
    let mut clock = tokio::time::interval_at(now.checked_add(every).unwrap_or(now), every);
    // A late tick is not made up with a burst: the next check comes one interval later.
    clock.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        clock.tick().await;
        let Some(bucket) = bucket.upgrade() else {
            return;
        };
        gauges.publish();
        let next = bucket.table().tick + 1;
        if next.is_multiple_of(STORE_CHECK_EVERY) {
            check_store(&bucket, store.as_ref()).await;
        }
        let now = Instant::now();
        let mut table = bucket.table();
        table.tick += 1;
        let tick = table.tick;
        let Table { entries, free, .. } = &mut *table;
        for (slot, place) in entries.iter_mut().enumerate() {
            let Some(entry) = place else { continue };
            if !entry.wants(tick, now) {
                continue;
            }
            // Sending never blocks (an unbounded mailbox); a dead monitor leaves.
            let sent = entry
                .monitor
                .send_message(MonitorMessage::CheckDeadline { tick });
            if sent.is_err() {
                *place = None;
                free.push(slot);
            }
        }
    }
}

/// Reads the records of the clock's sessions still running here, in batches, and updates
/// their lifecycle cells: a session finished, claimed or taken over elsewhere wakes its
/// monitor on this tick. A failed read is logged and skipped (a monitor reads its own record
/// before any decision).
async fn check_store(bucket: &Bucket, store: &dyn SessionStore) {
    let watched: Vec<(SessionId, Arc<Lifecycle>)> = bucket
        .table()
        .entries
        .iter()
        .flatten()
        .filter(|e| !e.lifecycle.is_claimed())
        .map(|e| (e.session, Arc::clone(&e.lifecycle)))
        .collect();
    for batch in watched.chunks(STORE_BATCH) {
        let ids: Vec<SessionId> = batch.iter().map(|(id, _)| *id).collect();
        match store.sessions_by_id(&ids).await {
            Ok(records) => {
                let cells: HashMap<SessionId, &Arc<Lifecycle>> =
                    batch.iter().map(|(id, cell)| (*id, cell)).collect();
                for record in &records {
                    if let Some(cell) = cells.get(&record.id) {
                        cell.observe(record);
                    }
                }
            }
            Err(error) => {
                tracing::warn!(%error, sessions = ids.len(), "the monitors' batched read of the store failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ractor::{Actor, ActorProcessingErr};

    /// A stand-in monitor that notes the ticks it receives.
    struct Counter;

    impl Actor for Counter {
        type Msg = MonitorMessage;
        type State = Arc<Mutex<Vec<u64>>>;
        type Arguments = Arc<Mutex<Vec<u64>>>;

        async fn pre_start(
            &self,
            _: ActorRef<MonitorMessage>,
            seen: Self::Arguments,
        ) -> Result<Self::State, ActorProcessingErr> {
            Ok(seen)
        }

        async fn handle(
            &self,
            _: ActorRef<MonitorMessage>,
            MonitorMessage::CheckDeadline { tick }: MonitorMessage,
            seen: &mut Self::State,
        ) -> Result<(), ActorProcessingErr> {
            seen.lock().map_err(|e| e.to_string())?.push(tick);
            Ok(())
        }
    }

    const EVERY: Duration = Duration::from_secs(1);

    async fn counter() -> (ActorRef<MonitorMessage>, Arc<Mutex<Vec<u64>>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (actor, _) = Actor::spawn(None, Counter, Arc::clone(&seen))
            .await
            .expect("spawn");
        (actor, seen)
    }

    fn memory_ticker() -> Ticker {
        Ticker::new(
            Arc::new(crate::store::MemoryStore::new()),
            Arc::new(crate::meters::Gauges::new()),
        )
    }

    /// Lets `n` ticks pass (and their messages be handled). Tests start half an interval
    /// off the clock's ticks, so a check never races a tick.
    async fn ticks(n: u32) {
        tokio::time::sleep(EVERY * n).await;
    }

    fn seen(seen: &Mutex<Vec<u64>>) -> Vec<u64> {
        std::mem::take(&mut *seen.lock().expect("seen"))
    }

    #[tokio::test(start_paused = true)]
    async fn a_monitor_is_woken_on_every_tick_until_it_asks_for_a_later_one() {
        let ticker = memory_ticker();
        let far = Instant::now() + EVERY * 100;
        let (actor, log) = counter().await;
        let reg = ticker.register(EVERY, actor, SessionId::new(), far, Arc::default());
        tokio::time::sleep(EVERY / 2).await;
        ticks(2).await;
        assert_eq!(seen(&log), [1, 2]);
        reg.wake_at(6);
        ticks(5).await;
        assert_eq!(seen(&log), [6, 7], "quiet ticks 3-5 are not sent");
        drop(reg);
        ticks(3).await;
        assert_eq!(
            seen(&log),
            Vec::<u64>::new(),
            "a dropped registration leaves"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_passed_deadline_or_a_claim_wakes_a_monitor_on_every_tick() {
        let ticker = memory_ticker();
        let (a, a_log) = counter().await;
        let (b, b_log) = counter().await;
        let deadline = Instant::now() + EVERY * 3;
        let lifecycle = Arc::new(Lifecycle::default());
        let reg_a = ticker.register(EVERY, a, SessionId::new(), deadline, Arc::default());
        let reg_b = ticker.register(
            EVERY,
            b,
            SessionId::new(),
            deadline + EVERY * 100,
            Arc::clone(&lifecycle),
        );
        tokio::time::sleep(EVERY / 2).await;
        ticks(1).await;
        reg_a.wake_at(100);
        reg_b.wake_at(100);
        ticks(4).await;
        assert_eq!(seen(&a_log), [1, 3, 4, 5], "from the deadline on");
        assert_eq!(seen(&b_log), [1]);
        lifecycle.raise(Lifecycle::CLAIMED);
        ticks(2).await;
        assert_eq!(seen(&b_log), [6, 7], "from the claim on");
    }

    #[tokio::test(start_paused = true)]
    async fn a_session_finished_elsewhere_wakes_its_monitor_at_the_next_batched_read() {
        use crate::store::{Completion, NewSession, SessionStore};
        let store = Arc::new(crate::store::MemoryStore::new());
        let ticker = Ticker::new(
            Arc::clone(&store) as Arc<dyn SessionStore>,
            Arc::new(crate::meters::Gauges::new()),
        );
        let owner = crate::model::NodeId::new();
        let record = store
            .create_session(NewSession {
                id: SessionId::new(),
                harvester_id: "csw".into(),
                resources: vec!["a".into()].into(),
                started: chrono::Utc::now(),
                workflow_time: Duration::from_secs(3600),
                config: Default::default(),
                owner,
            })
            .await
            .expect("create");
        let (actor, log) = counter().await;
        let lifecycle = Arc::new(Lifecycle::default());
        let reg = ticker.register(
            EVERY,
            actor,
            record.id,
            Instant::now() + EVERY * 1000,
            Arc::clone(&lifecycle),
        );
        tokio::time::sleep(EVERY / 2).await;
        ticks(1).await;
        reg.wake_at(1000);
        // Another node finishes it: only the store knows.
        let fence = crate::model::Fence::new(owner);
        store
            .claim_finalization(record.id, fence, crate::model::FinalizeReason::Completed)
            .await
            .expect("claim");
        store
            .complete_finalization(
                record.id,
                fence,
                Completion {
                    reason: crate::model::FinalizeReason::Completed,
                    status: crate::model::SessionStatus::FinishedAllOk,
                    unrecorded: Vec::new(),
                    counts: crate::model::OutcomeCounts::default(),
                    finalizer_error: None,
                    ended: chrono::Utc::now(),
                },
            )
            .await
            .expect("complete");
        let before = u32::try_from(STORE_CHECK_EVERY).expect("small") - 1;
        ticks(before - 1).await;
        assert_eq!(seen(&log), [1], "quiet until the batched read");
        assert!(!lifecycle.is_terminal());
        ticks(1).await;
        assert!(lifecycle.is_terminal(), "the batched read saw the end");
        assert_eq!(seen(&log), [STORE_CHECK_EVERY], "and woke the monitor");
    }
}
