//! One timer per supervisor and interval, sending every MonitorActor its `CheckDeadline`.
//!
//! A timer task per monitor (ractor's `send_interval`) costs a task, a timer-wheel entry and
//! a wake-up per session and tick; with 10,000 sessions that is most of an idle
//! supervisor's work. Here the monitors of one interval share one task that walks them
//! each tick. Each MonitorActor still receives its own timer messages; only the clock is
//! shared. A monitor registers in `pre_start`; its [`Registration`] leaves the set when the
//! monitor's state is dropped (on stop and on kill alike), and a send to a dead monitor
//! removes it too.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use ractor::{ActorId, ActorRef};
use tokio::time::{Instant, MissedTickBehavior};

use crate::monitor::MonitorMessage;

/// The monitors ticked at one interval.
#[derive(Default)]
struct Bucket {
    monitors: Mutex<HashMap<ActorId, ActorRef<MonitorMessage>>>,
}

/// The shared clocks of one supervisor, by interval.
#[derive(Default)]
pub(crate) struct Ticker {
    buckets: Mutex<HashMap<Duration, Weak<Bucket>>>,
}

/// A monitor's place in its bucket; dropping it leaves.
pub(crate) struct Registration {
    bucket: Arc<Bucket>,
    id: ActorId,
}

impl Drop for Registration {
    fn drop(&mut self) {
        // A poisoned lock only means a sender panicked mid-walk; the map is still valid.
        let mut monitors = self
            .bucket
            .monitors
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        monitors.remove(&self.id);
    }
}

impl Ticker {
    /// Sends `monitor` a `CheckDeadline` every `every` until the registration is dropped.
    pub(crate) fn register(
        &self,
        every: Duration,
        monitor: ActorRef<MonitorMessage>,
    ) -> Registration {
        let bucket = {
            let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
            match buckets.get(&every).and_then(Weak::upgrade) {
                Some(bucket) => bucket,
                None => {
                    let bucket = Arc::new(Bucket::default());
                    buckets.insert(every, Arc::downgrade(&bucket));
                    tokio::spawn(tick(Arc::downgrade(&bucket), every));
                    bucket
                }
            }
        };
        let id = monitor.get_id();
        bucket
            .monitors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, monitor);
        Registration { bucket, id }
    }
}

/// The clock of one bucket. Ends once the bucket is gone (no monitor holds it).
async fn tick(bucket: Weak<Bucket>, every: Duration) {
    let mut clock = tokio::time::interval_at(Instant::now() + every, every);
    // A late tick is not made up with a burst: the next check comes one interval later.
    clock.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        clock.tick().await;
        let Some(bucket) = bucket.upgrade() else {
            return;
        };
        let mut monitors = bucket.monitors.lock().unwrap_or_else(|p| p.into_inner());
        // Sending never blocks (an unbounded mailbox); a dead monitor is dropped here.
        monitors.retain(|_, m| m.send_message(MonitorMessage::CheckDeadline).is_ok());
    }
}
