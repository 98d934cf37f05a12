//! The session's work queue, shared with its workers: which resource attempt starts next,
//! which attempts are in flight, and how many workers run.
//!
//! A worker (see [`crate::worker`]) takes its next attempt here itself, right after
//! reporting the last one, so a resource costs no trip through the session's mailbox
//! before it starts: the session only hears of attempts that ended (in order, through its
//! mailbox) and decides their retries and outcomes. Everything here is under one lock,
//! never held across an `.await` (a claim logs the attempt's start under it).

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard};

use tokio::time::Instant;

use crate::model::IdHasher;
use crate::session::state::{Slot, Times};

/// An attempt a worker took: its key (for its report), resource index, attempt number and
/// times.
pub(crate) struct Claimed {
    pub(crate) key: u64,
    pub(crate) index: usize,
    pub(crate) attempt: u32,
    /// Whether this is the resource's first attempt.
    pub(crate) first: bool,
    pub(crate) started: Instant,
}

/// The queue (see the module docs).
pub(crate) struct Dispatch {
    inner: Mutex<Queue>,
    /// Room for attempts in flight: twice the session's concurrency, so that workers run
    /// on while the session reads their reports, yet never more than `max_concurrency`
    /// reports wait for it (its outcome writes may be throttled by a slow store: the
    /// workers then wait too, and nothing piles up in its mailbox). A worker takes a
    /// permit for each attempt; the session gives it back when it reads the report.
    room: tokio::sync::Semaphore,
    /// Told when the workers are killed (see [`Self::until_killed`]).
    killed: tokio::sync::Notify,
}

#[derive(Default)]
struct Queue {
    /// Whether attempts may start (the session runs, has begun, and its node is not
    /// self-fenced). Workers that find it closed end.
    open: bool,
    /// Next never-started resource index.
    next_fresh: usize,
    /// Resources in the session's list.
    total: usize,
    /// Attempts to run before fresh resources, first come first served: retries whose
    /// backoff is over, attempts cut by a self-fence. (resource index, attempt number, the
    /// resource's first start.)
    ready: VecDeque<(usize, u32, Instant)>,
    /// Attempts running, or ended with their report not yet read by the session, by key.
    in_flight: HashMap<u64, Slot, IdHasher>,
    /// The next attempt's key.
    next_key: u64,
    /// Workers running (of the current generation).
    workers: usize,
    /// Raised when the session kills its workers: a killed worker that still reaches the
    /// queue (one that did not yield) neither takes an attempt nor counts itself out again.
    generation: u32,
    /// Failures final under `FailFast` that ended with their reports unread: while any,
    /// the queue stays closed whatever else the session reads first (it finalizes on it, or, if it cuts
    /// it, opens the queue again once it has read it).
    held: u32,
    /// The session finalizes (or was killed): the queue never opens again.
    dead: bool,
}

impl Dispatch {
    /// A queue over `total` resources for at most `max_concurrency` workers, closed.
    pub(crate) fn new(total: usize, max_concurrency: usize) -> Self {
        let room = max_concurrency
            .saturating_mul(2)
            .clamp(1, tokio::sync::Semaphore::MAX_PERMITS);
        Self {
            inner: Mutex::new(Queue {
                total,
                ..Queue::default()
            }),
            room: tokio::sync::Semaphore::new(room),
            killed: tokio::sync::Notify::new(),
        }
    }

    /// For a worker: waits until an attempt may be in flight (see [`Self::room`]), then
    /// [`Self::claim`]s one.
    pub(crate) async fn next(
        &self,
        generation: u32,
        on_start: impl FnOnce(&Claimed),
    ) -> Option<Claimed> {
        // Never closed, so an error cannot happen; a worker without room would end.
        let permit = self.room.acquire().await.ok()?;
        let claimed = self.claim(generation, on_start)?;
        // Given back when the session reads the attempt's report (`take`).
        permit.forget();
        Some(claimed)
    }

    fn lock(&self) -> MutexGuard<'_, Queue> {
        // No section under this lock panics; a poisoned lock holds a consistent queue.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// For a worker of `generation`: the next attempt to run (marked in flight), or `None`
    /// when there is none or the queue is closed, and then the worker must end (it is
    /// counted out here). `on_start` runs under the lock (it logs the start: so no start
    /// is logged after the session closed the queue and logged why).
    fn claim(&self, generation: u32, on_start: impl FnOnce(&Claimed)) -> Option<Claimed> {
        let mut q = self.lock();
        if q.generation != generation {
            return None; // killed: already counted out
        }
        let next = if q.open {
            match q.ready.pop_front() {
                Some((index, attempt, first)) => Some((index, attempt, Some(first))),
                None if q.next_fresh < q.total => {
                    let index = q.next_fresh;
                    q.next_fresh += 1;
                    Some((index, 1, None))
                }
                None => None,
            }
        } else {
            None
        };
        let Some((index, attempt, first_started)) = next else {
            q.workers = q.workers.saturating_sub(1);
            return None;
        };
        // The one clock read of an attempt's start: it times the attempt, the resource (on
        // a first attempt) and is the heartbeat's origin.
        let started = Instant::now();
        let key = q.next_key;
        q.next_key = q.next_key.wrapping_add(1);
        let times = Times {
            first_started: first_started.unwrap_or(started),
            started,
        };
        q.in_flight.insert(
            key,
            Slot {
                index,
                attempt,
                times,
                ended: None,
                holds: false,
            },
        );
        let claimed = Claimed {
            key,
            index,
            attempt,
            first: first_started.is_none(),
            started,
        };
        on_start(&claimed);
        drop(q);
        Some(claimed)
    }

    /// Opens (or closes) the queue and counts in the workers to start so that at most
    /// `max` run while there is work: how many, and their generation.
    pub(crate) fn open_for(&self, open: bool, max: usize) -> (usize, u32) {
        let mut q = self.lock();
        let open = open && q.held == 0 && !q.dead;
        q.open = open;
        if !open {
            return (0, q.generation);
        }
        let work = q
            .ready
            .len()
            .saturating_add(q.total.saturating_sub(q.next_fresh));
        let more = max.saturating_sub(q.workers).min(work);
        q.workers += more;
        (more, q.generation)
    }

    /// Closes the queue: no attempt starts until it opens again.
    pub(crate) fn close(&self) {
        self.lock().open = false;
    }

    /// Closes the queue and kills its workers: their attempts are dropped at their next
    /// `.await` ([`Self::until_killed`]), and a killed worker that still reaches the queue
    /// (one whose harvest does not yield) takes nothing.
    /// `for_good`: the session finalizes (or is killed); else (a self-fenced node's kill)
    /// it may open the queue again.
    pub(crate) fn kill(&self, for_good: bool) {
        {
            let mut q = self.lock();
            q.open = false;
            q.dead |= for_good;
            q.workers = 0;
            q.generation = q.generation.wrapping_add(1);
        }
        self.killed.notify_waiters();
    }

    /// Returns once the workers of `generation` are killed.
    pub(crate) async fn until_killed(&self, generation: u32) {
        loop {
            let killed = self.killed.notified();
            tokio::pin!(killed);
            // Registered before the look, so a kill between the two is not missed.
            killed.as_mut().enable();
            if self.lock().generation != generation {
                return;
            }
            killed.await;
        }
    }

    /// Notes how the attempt with this key ended; `false` if it is no longer in flight
    /// (the session wound down: nothing to tell). `holds`: a failure final under
    /// `FailFast`: the queue closes, and stays closed until the session has read it.
    pub(crate) fn finish(&self, key: u64, ended: crate::worker::Ended, holds: bool) -> bool {
        let mut q = self.lock();
        let Some(slot) = q.in_flight.get_mut(&key) else {
            return false;
        };
        slot.ended = Some(ended);
        slot.holds = holds;
        if holds {
            q.held = q.held.saturating_add(1);
            q.open = false;
        }
        true
    }

    /// The attempts that ended (neither killed nor cancelled) and whose reports the
    /// session has not read: taken out, for a session that finalizes now to decide them.
    pub(crate) fn take_ended(&self) -> Vec<Slot> {
        let mut q = self.lock();
        let keys: Vec<u64> = q
            .in_flight
            .iter()
            // Killed, or cancelled by this very finalization (its token fires first):
            // unfinished, counted with the attempt made, as one still running.
            .filter(|(_, s)| {
                s.ended.as_ref().is_some_and(|e| {
                    !matches!(
                        e,
                        crate::worker::Ended::Killed
                            | crate::worker::Ended::Report(crate::worker::AttemptResult::Cancelled)
                    )
                })
            })
            .map(|(k, _)| *k)
            .collect();
        let taken: Vec<Slot> = keys.iter().filter_map(|k| q.in_flight.remove(k)).collect();
        drop(q);
        self.room.add_permits(taken.len());
        taken
    }

    /// The attempt with this key, no longer in flight (`None`: already taken out, by
    /// [`Self::drain`]).
    pub(crate) fn take(&self, key: u64) -> Option<Slot> {
        let slot = {
            let mut q = self.lock();
            let slot = q.in_flight.remove(&key);
            if slot.as_ref().is_some_and(|s| s.holds) {
                q.held = q.held.saturating_sub(1);
            }
            slot
        };
        if slot.is_some() {
            self.room.add_permits(1);
        }
        slot
    }

    /// Queues an attempt to run before fresh resources.
    pub(crate) fn push_ready(&self, index: usize, attempt: u32, first_started: Instant) {
        self.lock().ready.push_back((index, attempt, first_started));
    }

    /// Whether no attempt is in flight (every report read).
    pub(crate) fn is_idle(&self) -> bool {
        self.lock().in_flight.is_empty()
    }

    /// Closes the queue and empties it: the attempts in flight, and those ready to run
    /// (as `(index, attempts made, first start)`).
    pub(crate) fn drain(&self) -> Vec<(usize, u32, Instant)> {
        let mut q = self.lock();
        q.open = false;
        let mut out: Vec<_> = q
            .in_flight
            .drain()
            .map(|(_, s)| (s.index, s.attempt, s.times.first_started))
            .collect();
        out.extend(
            q.ready
                .drain(..)
                .map(|(index, attempt, first)| (index, attempt.saturating_sub(1), first)),
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn workers_take_retries_first_and_end_when_closed_or_empty() {
        let d = Dispatch::new(2, 5);
        assert!(d.claim(0, |_| {}).is_none(), "closed: nothing starts");
        let (n, generation) = d.open_for(true, 5);
        assert_eq!(n, 2, "no more workers than work");
        let t = Instant::now();
        d.push_ready(7, 2, t);
        let a = d.claim(generation, |_| {}).unwrap();
        assert_eq!((a.index, a.attempt, a.first), (7, 2, false));
        let b = d.claim(generation, |_| {}).unwrap();
        assert_eq!((b.index, b.attempt, b.first), (0, 1, true));
        assert!(!d.is_idle());
        assert!(d.take(a.key).is_some());
        assert!(d.take(a.key).is_none(), "a report is read once");
        d.close();
        assert!(d.next(generation, |_| {}).await.is_none());
        // Both workers counted out: opening again may start one for the last resource.
        assert!(d.claim(generation, |_| {}).is_none());
        assert_eq!(d.open_for(true, 5).0, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn killed_workers_take_nothing_and_are_not_counted_twice() {
        let d = Dispatch::new(10, 3);
        let (n, old) = d.open_for(true, 3);
        assert_eq!(n, 3);
        let a = d.claim(old, |_| {}).unwrap();
        d.kill(false);
        let (n, new) = d.open_for(true, 3);
        assert_eq!(n, 3, "the killed workers are written off");
        assert!(
            d.claim(old, |_| {}).is_none(),
            "a killed worker takes nothing"
        );
        assert_eq!(d.open_for(true, 3).0, 0, "nor is it counted out again");
        assert!(d.claim(new, |_| {}).is_some());
        let drained = d.drain();
        assert_eq!(drained.len(), 2);
        assert!(drained.iter().any(|(i, n, _)| *i == a.index && *n == 1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_finalizing_session_takes_what_ended_unread_and_leaves_the_rest_unfinished() {
        use crate::worker::{AttemptResult, Ended};
        let d = Dispatch::new(10, 2);
        let (_, generation) = d.open_for(true, 2);
        let mut keys = Vec::new();
        for _ in 0..4 {
            keys.push(d.next(generation, |_| {}).await.unwrap().key);
        }
        assert!(d.finish(keys[0], Ended::Report(AttemptResult::Succeeded), false));
        assert!(d.finish(keys[1], Ended::Report(AttemptResult::Cancelled), false));
        assert!(d.finish(keys[2], Ended::Panicked("boom".into()), false));
        // keys[3] still runs.
        d.kill(false);
        let ended = d.take_ended();
        assert_eq!(ended.len(), 2, "the success and the panic: outcomes");
        assert!(
            d.take(keys[0]).is_none(),
            "taken: its report is nothing to read"
        );
        let unfinished = d.drain();
        assert_eq!(unfinished.len(), 2, "the cancelled one and the running one");
        assert!(unfinished.iter().all(|(_, attempts, _)| *attempts == 1));
        assert!(
            !d.finish(keys[3], Ended::Report(AttemptResult::Succeeded), false),
            "wound down"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_fail_fast_failure_keeps_the_queue_closed_until_read_and_a_final_kill_for_good() {
        use crate::worker::{AttemptResult, Ended};
        let d = Dispatch::new(10, 2);
        let (_, generation) = d.open_for(true, 2);
        let ok = d.next(generation, |_| {}).await.unwrap().key;
        let failed = d.next(generation, |_| {}).await.unwrap().key;
        assert!(d.finish(ok, Ended::Report(AttemptResult::Succeeded), false));
        assert!(d.finish(
            failed,
            Ended::Report(AttemptResult::Failed("x".into())),
            true
        ));
        // The session reads the success first and asks for workers: none, still closed.
        assert!(d.take(ok).is_some());
        assert_eq!(d.open_for(true, 2).0, 0);
        assert!(d.next(generation, |_| {}).await.is_none());
        // Read (and, say, cut by a self-fenced node): the queue may open again; two such
        // failures hold it until both are read.
        assert!(d.take(failed).is_some());
        assert!(d.open_for(true, 2).0 > 0);
        let a = d.next(generation, |_| {}).await.unwrap().key;
        let b = d.next(generation, |_| {}).await.unwrap().key;
        assert!(d.finish(a, Ended::Panicked("a".into()), true));
        assert!(d.finish(b, Ended::Panicked("b".into()), true));
        assert!(d.take(a).is_some());
        d.open_for(true, 2);
        assert!(
            d.next(generation, |_| {}).await.is_none(),
            "b still holds it"
        );
        assert!(d.take(b).is_some());
        d.open_for(true, 2);
        assert!(d.next(generation, |_| {}).await.is_some());
        d.kill(true);
        assert_eq!(d.open_for(true, 2).0, 0, "killed for good: never again");
    }

    #[tokio::test(start_paused = true)]
    async fn no_more_than_twice_the_concurrency_in_flight_until_reports_are_read() {
        let d = std::sync::Arc::new(Dispatch::new(100, 2));
        let (_, generation) = d.open_for(true, 2);
        let mut keys = Vec::new();
        for _ in 0..4 {
            keys.push(d.next(generation, |_| {}).await.unwrap().key);
        }
        let waiting = tokio::spawn({
            let d = std::sync::Arc::clone(&d);
            async move { d.next(generation, |_| {}).await.map(|c| c.key) }
        });
        tokio::time::sleep(std::time::Duration::from_secs(60)).await;
        assert!(
            !waiting.is_finished(),
            "a fifth attempt waits for a report to be read"
        );
        assert!(d.take(keys[0]).is_some());
        assert!(waiting.await.unwrap().is_some());
    }
}
