//! This process's node: its identity, its lease in the store, and whether it may act.
//!
//! Every supervisor start is a fresh node (a new [`NodeId`]). It registers in the store
//! with a lease of `lease_ttl`, renewed every `lease_renew_interval` by a task of its own
//! (never by an actor that a slow handler could hold up). The lease is what other nodes
//! look at before they take this node's sessions over: while it runs, nobody touches them.
//!
//! A node that cannot renew for `lease_ttl` minus a margin **self-fences**: it can no
//! longer be sure nobody took its sessions over, so it starts no attempt, cancels those
//! running, and runs no finalizer until a renewal succeeds again; then it owns exactly what
//! nobody took (every write of a taken session is refused by its fence).

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ractor::ActorRef;

use crate::supervisor::SupervisorMessage;
use tokio::time::Instant;

use crate::config::SupervisorConfig;
use crate::model::NodeId;
use crate::store::{NodeInfo, ProcessId, SessionStore};

/// This process's node, shared by the root and every session.
pub(crate) struct Node {
    info: NodeInfo,
    ttl: Duration,
    renew_every: Duration,
    /// When the last renewal that succeeded was sent (tokio's clock): the lease runs at
    /// least `ttl` from then, by any clock that does not run slower than ours.
    renewed: Mutex<Instant>,
    /// Self-fenced: the lease may have expired; do nothing that only an owner may do.
    fenced: AtomicBool,
    /// Renewals that failed in a row (0 after one that succeeded).
    failures: AtomicU32,
    /// Tells the sessions to stop their attempts when the node self-fences.
    fencing: tokio::sync::watch::Sender<bool>,
}

impl Node {
    /// A fresh node as `config` names it.
    pub(crate) fn new(config: &SupervisorConfig) -> Self {
        let (fencing, _) = tokio::sync::watch::channel(false);
        Self {
            info: NodeInfo {
                id: NodeId::new(),
                name: config.node_name.clone(),
                process: this_process(),
            },
            ttl: config.lease_ttl,
            renew_every: config.lease_renew_interval,
            renewed: Mutex::new(Instant::now()),
            fenced: AtomicBool::new(false),
            failures: AtomicU32::new(0),
            fencing,
        }
    }

    /// The node's id.
    pub(crate) fn id(&self) -> NodeId {
        self.info.id
    }

    /// Registers the node's first lease.
    pub(crate) async fn register(
        &self,
        store: &dyn SessionStore,
    ) -> Result<(), crate::error::StoreError> {
        let sent = Instant::now();
        store.register_node(&self.info, self.ttl).await?;
        self.renewed_at(sent);
        Ok(())
    }

    /// Whether the node may act as an owner: its lease certainly still runs.
    pub(crate) fn is_fenced(&self) -> bool {
        self.fenced.load(Ordering::Acquire)
    }

    /// The lease as this node last saw it: how long ago its last successful renewal was
    /// sent, how many renewals have failed since, whether the node self-fenced, and the
    /// renewal interval.
    pub(crate) fn lease(&self) -> (Duration, u32, bool, Duration) {
        let renewed = *self.renewed.lock().unwrap_or_else(|p| p.into_inner());
        (
            renewed.elapsed(),
            self.failures.load(Ordering::Acquire),
            self.is_fenced(),
            self.renew_every,
        )
    }

    /// Returns once the node is not self-fenced (at once, normally).
    pub(crate) async fn until_unfenced(&self) {
        let mut fencing = self.fencing.subscribe();
        // The sender lives as long as `self`: an error cannot happen while we borrow it.
        let _ = fencing.wait_for(|fenced| !*fenced).await;
    }

    /// How long after the last successful renewal the node self-fences: the lease's ttl
    /// less a margin (a renewal interval, at most a third of the ttl) for the time a
    /// store write and a clock reading can take.
    fn safe_for(&self) -> Duration {
        let margin = self.renew_every.min(self.ttl / 3);
        self.ttl.saturating_sub(margin)
    }

    /// How long until the node self-fences if no renewal succeeds.
    fn time_to_fence(&self) -> Duration {
        let renewed = *self.renewed.lock().unwrap_or_else(|p| p.into_inner());
        self.safe_for().saturating_sub(renewed.elapsed())
    }

    fn renewed_at(&self, sent: Instant) {
        let mut renewed = self.renewed.lock().unwrap_or_else(|p| p.into_inner());
        if sent > *renewed {
            *renewed = sent;
        }
        drop(renewed);
        if self.fenced.swap(false, Ordering::AcqRel) {
            tracing::warn!(node = %self.info.id, "lease renewed: the node acts again");
            self.fencing.send_replace(false);
        }
    }

    /// Self-fences if the last renewal is too old.
    fn check(&self) {
        let renewed = *self.renewed.lock().unwrap_or_else(|p| p.into_inner());
        let safe_for = self.safe_for();
        if renewed.elapsed() >= safe_for && !self.fenced.swap(true, Ordering::AcqRel) {
            tracing::error!(
                node = %self.info.id,
                since = %humantime::format_duration(renewed.elapsed()),
                "the node could not renew its lease: self-fenced (no attempt starts, running \
                 ones are cancelled, no finalizer runs) until it can"
            );
            self.fencing.send_replace(true);
        }
    }

    /// Keeps the lease: renews it every `lease_renew_interval` while the root lives, and
    /// ends it when the root stops (what the root's sessions left can then be taken over
    /// at once). Self-fences when renewals fail for too long.
    pub(crate) fn spawn_lease_keeper(
        self: &Arc<Self>,
        store: Arc<dyn SessionStore>,
        root: ActorRef<SupervisorMessage>,
    ) -> tokio::task::JoinHandle<()> {
        let node = Arc::clone(self);
        // A store that announces abort requests (PostgreSQL) has them honoured at once;
        // otherwise after the next renewal.
        let mut signals = store.signals();
        tokio::spawn(async move {
            let mut failures = 0u32;
            loop {
                node.failures.store(failures, Ordering::Release);
                // Sooner than the interval while renewals fail and time runs out.
                let wait = if failures == 0 {
                    node.renew_every
                } else {
                    (node.renew_every / 4).max(Duration::from_millis(10))
                };
                let renew_at = tokio::time::Instant::now()
                    .checked_add(wait)
                    .unwrap_or_else(tokio::time::Instant::now);
                loop {
                    tokio::select! {
                        () = tokio::time::sleep_until(renew_at) => break,
                        _ = root.wait(None) => return node.release(store.as_ref()).await,
                        // Another node asked to abort one of this node's sessions (or
                        // some announcement may have been missed): look.
                        heard = crate::follow::wake_on(&mut signals, |s| {
                            *s == crate::store::StoreSignal::AbortRequested(node.info.id)
                        }) => {
                            if matches!(heard, crate::follow::Wake::Look) && !node.is_fenced() {
                                node.forward_requested_aborts(store.as_ref(), &root).await;
                            }
                        }
                    }
                }
                if matches!(
                    root.get_status(),
                    ractor::ActorStatus::Stopped | ractor::ActorStatus::Stopping
                ) {
                    break;
                }
                let was_fenced = node.is_fenced();
                let sent = Instant::now();
                let renew = store.renew_lease(&node.info, node.ttl);
                // A renewal still unanswered when the node must self-fence is given up then
                // (a hung store must not delay the fencing); once fenced, it gets a
                // renewal interval.
                let limit = if was_fenced {
                    node.renew_every
                } else {
                    node.time_to_fence().max(Duration::from_millis(10))
                };
                match tokio::time::timeout(limit, renew).await {
                    Ok(Ok(_)) => {
                        failures = 0;
                        node.failures.store(0, Ordering::Release);
                        node.renewed_at(sent);
                        node.forward_requested_aborts(store.as_ref(), &root).await;
                    }
                    Ok(Err(error)) => {
                        failures = failures.saturating_add(1);
                        tracing::warn!(node = %node.info.id, %error, failures, "could not renew the lease");
                    }
                    Err(_) => {
                        failures = failures.saturating_add(1);
                        tracing::warn!(node = %node.info.id, failures, "renewing the lease timed out");
                    }
                }
                node.check();
                let fenced = node.is_fenced();
                if fenced != was_fenced
                    && root
                        .send_message(SupervisorMessage::Fenced(fenced))
                        .is_err()
                {
                    break;
                }
            }
            node.release(store.as_ref()).await;
        })
    }

    /// Ends the lease (the root stopped).
    async fn release(&self, store: &dyn SessionStore) {
        if let Err(error) = store.release_node(self.info.id).await {
            tracing::debug!(node = %self.info.id, %error, "could not end the lease");
        }
    }
}

impl Node {
    /// Hands the aborts other nodes recorded for this node's sessions to the root, which
    /// aborts them as it would a local request. Read after each renewal: one read per
    /// node, not per session.
    async fn forward_requested_aborts(
        &self,
        store: &dyn SessionStore,
        root: &ActorRef<SupervisorMessage>,
    ) {
        let ids = match store.requested_aborts(self.info.id).await {
            Ok(ids) => ids,
            Err(error) => {
                tracing::debug!(%error, "could not read the aborts other nodes requested");
                return;
            }
        };
        for id in ids {
            let (reply, _answer) = ractor::concurrency::oneshot();
            if root
                .send_message(SupervisorMessage::AbortSession(id, reply.into()))
                .is_err()
            {
                return;
            }
        }
    }
}

/// This process, as another on the same host can check (Linux only: see [`ProcessId`]).
pub(crate) fn this_process() -> Option<ProcessId> {
    let pid = std::process::id();
    Some(ProcessId {
        host: host_key()?,
        pid,
        start: start_time(pid)?,
    })
}

/// Whether `process` is gone: `Some(true)` only when it ran on this host (same boot, same
/// PID namespace) and no process with its PID and start time exists any more. `None` when
/// this host cannot tell (another host, or not Linux).
pub(crate) fn process_gone(process: &ProcessId) -> Option<bool> {
    if host_key()? != process.host {
        return None;
    }
    Some(start_time(process.pid) != Some(process.start))
}

/// The boot id and the PID namespace: two processes with equal keys see the same PIDs.
fn host_key() -> Option<String> {
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let ns = std::fs::read_link("/proc/self/ns/pid").ok()?;
    Some(format!("{}/{}", boot.trim(), ns.display()))
}

/// A running process's start time in clock ticks after boot (`/proc/<pid>/stat`, field
/// 22); `None` if there is no such process, or it has exited and only waits to be reaped
/// (state `Z` or `X`: a killed child of a parent that has not waited for it yet is dead).
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold anything: count after it.
    let after = stat.get(stat.rfind(')')? + 1..)?;
    let mut fields = after.split_whitespace();
    // Field 3, the state.
    if matches!(fields.next(), Some("Z" | "X")) {
        return None;
    }
    // The start time is field 22: 18 fields after the state.
    fields.nth(18)?.parse().ok()
}

/// A random-enough extra wait up to `max`, so that nodes started together do not rescue
/// in lockstep.
pub(crate) fn jitter(max: Duration) -> Duration {
    use std::hash::BuildHasher;
    let max_ms = u64::try_from(max.as_millis()).unwrap_or(u64::MAX);
    if max_ms == 0 {
        return Duration::ZERO;
    }
    // A hasher with a per-process random seed, over a counter: no dependency for this.
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let r = foldhash::fast::RandomState::default().hash_one(n);
    Duration::from_millis(r % max_ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_alive_and_a_dead_pid_is_gone() {
        let Some(me) = this_process() else {
            return; // not Linux: nothing to tell
        };
        assert_eq!(process_gone(&me), Some(false));
        let reused = ProcessId {
            start: me.start.wrapping_add(1),
            ..me.clone()
        };
        assert_eq!(
            process_gone(&reused),
            Some(true),
            "a reused PID is another process"
        );
        let elsewhere = ProcessId {
            host: "another-host".into(),
            ..me
        };
        assert_eq!(process_gone(&elsewhere), None);
    }

    #[test]
    fn an_exited_process_not_yet_reaped_is_gone() {
        let Some(me) = this_process() else {
            return;
        };
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("sleep");
        let pid = child.id();
        let alive = ProcessId {
            host: me.host.clone(),
            pid,
            start: start_time(pid).expect("running"),
        };
        assert_eq!(process_gone(&alive), Some(false));
        child.kill().expect("kill");
        // Not waited for yet: a zombie, which is gone all the same.
        for _ in 0..100 {
            if process_gone(&alive) == Some(true) {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(process_gone(&alive), Some(true));
        child.wait().expect("reap");
        assert_eq!(process_gone(&alive), Some(true));
    }

    #[test]
    fn jitter_stays_below_its_bound() {
        for _ in 0..1000 {
            assert!(jitter(Duration::from_millis(50)) < Duration::from_millis(50));
        }
        assert_eq!(jitter(Duration::ZERO), Duration::ZERO);
    }
}
