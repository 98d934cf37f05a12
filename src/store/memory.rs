//! In-memory [`SessionStore`] on `dashmap`: for tests, and for servers that need no history
//! across restarts.
//!
//! Each session sits in its own map entry; every operation holds that entry's shard lock
//! for a short, await-free section, which is what makes the compare-and-sets atomic. The busy
//! lock is a second map, harvester -> session, taken with the entry API.

use std::collections::VecDeque;
use std::sync::Arc;

use async_trait::async_trait;
use dashmap::DashMap;
use dashmap::mapref::entry::Entry;

use crate::config::SessionConfig;
use crate::error::StoreError;
use crate::events::{EventKind, SessionEvent};
use crate::model::{
    Fence, FinalizeReason, HarvesterId, IdHasher, NodeId, OutcomeCounts, OutcomeRecord, ResourceId,
    ResourceOutcome, SessionId, SessionRecord, SessionStatus,
};
use crate::store::{
    Claim, Completed, Completion, NewSession, NodeInfo, NodeRecord, ProcessId, SessionPage,
    SessionQuery, SessionStore, TakenOver,
};

/// A node's lease, timed by tokio's clock (so that tests can pause it): one process, one
/// clock.
struct Lease {
    info: NodeInfo,
    started: chrono::DateTime<chrono::Utc>,
    until: tokio::time::Instant,
}

impl Lease {
    fn live(&self) -> bool {
        tokio::time::Instant::now() < self.until
    }

    fn record(&self) -> NodeRecord {
        let now = tokio::time::Instant::now();
        let left = self.until.saturating_duration_since(now);
        let past = now.saturating_duration_since(self.until);
        let wall = chrono::Utc::now();
        let lease_until = chrono::Duration::from_std(left)
            .ok()
            .and_then(|d| wall.checked_add_signed(d))
            .and_then(|t| {
                chrono::Duration::from_std(past)
                    .ok()
                    .and_then(|d| t.checked_sub_signed(d))
            })
            .unwrap_or(wall);
        NodeRecord {
            info: self.info.clone(),
            started: self.started,
            lease_until,
            live: self.live(),
        }
    }
}

/// `Ok` if `fence` is the session's current one.
fn check_fence(id: SessionId, r: &SessionRecord, fence: Fence) -> Result<(), StoreError> {
    if r.fence() == Some(fence) {
        Ok(())
    } else {
        Err(StoreError::Fenced {
            session_id: id,
            fence,
            holder: r.fence(),
        })
    }
}

/// `now + ttl`, or as far as the clock goes.
fn lease_end(ttl: std::time::Duration) -> tokio::time::Instant {
    let now = tokio::time::Instant::now();
    now.checked_add(ttl)
        .or_else(|| now.checked_add(std::time::Duration::from_secs(1 << 30)))
        .unwrap_or(now)
}

struct StoredSession {
    record: SessionRecord,
    resources: Arc<[ResourceId]>,
    config: Arc<SessionConfig>,
    outcomes: Vec<KeptOutcome>,
    /// The newest `event_limit` events, kept inline (one allocation for the whole log,
    /// none per event).
    events: VecDeque<KeptEvent>,
}

/// An event as kept: without its session and harvester ids, which are its session's (as
/// the durable store keeps them), and the commonest kinds in 32 bytes (see [`KeptKind`]):
/// 56 bytes in all instead of 120 for the full event. A long
/// session's log is written at two events per resource, into memory touched for the first
/// time until the ring is full; every byte less is less cache and fewer fresh pages on
/// the session's path.
struct KeptEvent {
    seq: u64,
    at: chrono::DateTime<chrono::Utc>,
    kind: KeptKind,
}

/// An event's kind as kept: the per-attempt kinds without text, and the monitor's tick,
/// inline (durations as whole nanoseconds); any other kind boxed (those carry text, or
/// come once or twice a session).
enum KeptKind {
    Started {
        resource_id: ResourceId,
        attempt: u32,
    },
    Succeeded {
        resource_id: ResourceId,
        attempt: u32,
        elapsed: u64,
    },
    TimedOut {
        resource_id: ResourceId,
        attempt: u32,
    },
    Cancelled {
        resource_id: ResourceId,
        attempt: u32,
    },
    Retrying {
        resource_id: ResourceId,
        next_attempt: u32,
        delay: u64,
    },
    Tick {
        remaining: u64,
    },
    Other(Box<EventKind>),
}

/// Whole nanoseconds, if they fit in `u64` (584 years); a longer duration is kept boxed.
fn nanos(d: std::time::Duration) -> Option<u64> {
    u64::try_from(d.as_nanos()).ok()
}

impl KeptKind {
    fn keep(kind: EventKind) -> Self {
        // A duration's guard checks it fits; the arm then cannot meet the default.
        match kind {
            EventKind::WorkerStarted {
                resource_id,
                attempt,
            } => Self::Started {
                resource_id,
                attempt,
            },
            EventKind::WorkerSucceeded {
                resource_id,
                attempt,
                elapsed,
            } if nanos(elapsed).is_some() => Self::Succeeded {
                resource_id,
                attempt,
                elapsed: nanos(elapsed).unwrap_or_default(),
            },
            EventKind::WorkerTimedOut {
                resource_id,
                attempt,
                heartbeat_silent: false,
            } => Self::TimedOut {
                resource_id,
                attempt,
            },
            EventKind::WorkerCancelled {
                resource_id,
                attempt,
            } => Self::Cancelled {
                resource_id,
                attempt,
            },
            EventKind::WorkerRetrying {
                resource_id,
                next_attempt,
                delay,
            } if nanos(delay).is_some() => Self::Retrying {
                resource_id,
                next_attempt,
                delay: nanos(delay).unwrap_or_default(),
            },
            EventKind::MonitorTick { remaining } if nanos(remaining).is_some() => Self::Tick {
                remaining: nanos(remaining).unwrap_or_default(),
            },
            other => Self::Other(Box::new(other)),
        }
    }

    fn read(&self) -> EventKind {
        use std::time::Duration;
        match self {
            Self::Started {
                resource_id,
                attempt,
            } => EventKind::WorkerStarted {
                resource_id: resource_id.clone(),
                attempt: *attempt,
            },
            Self::Succeeded {
                resource_id,
                attempt,
                elapsed,
            } => EventKind::WorkerSucceeded {
                resource_id: resource_id.clone(),
                attempt: *attempt,
                elapsed: Duration::from_nanos(*elapsed),
            },
            Self::TimedOut {
                resource_id,
                attempt,
            } => EventKind::WorkerTimedOut {
                resource_id: resource_id.clone(),
                attempt: *attempt,
                heartbeat_silent: false,
            },
            Self::Cancelled {
                resource_id,
                attempt,
            } => EventKind::WorkerCancelled {
                resource_id: resource_id.clone(),
                attempt: *attempt,
            },
            Self::Retrying {
                resource_id,
                next_attempt,
                delay,
            } => EventKind::WorkerRetrying {
                resource_id: resource_id.clone(),
                next_attempt: *next_attempt,
                delay: Duration::from_nanos(*delay),
            },
            Self::Tick { remaining } => EventKind::MonitorTick {
                remaining: Duration::from_nanos(*remaining),
            },
            Self::Other(kind) => (**kind).clone(),
        }
    }
}

/// An outcome as kept: a success (the commonest, one per resource of a harvest that
/// works) in 32 bytes instead of 72, any other boxed. Written once per resource into
/// memory touched for the first time, and read back whole by the finalizer.
enum KeptOutcome {
    Succeeded {
        resource_id: ResourceId,
        attempts: u32,
        /// Whole nanoseconds; a longer elapsed time than `u64` holds is kept boxed.
        elapsed: u64,
    },
    Other(Box<OutcomeRecord>),
}

impl StoredSession {
    /// A kept event of this session (`id`) as the event it was.
    fn event(&self, id: SessionId, e: &KeptEvent) -> SessionEvent {
        SessionEvent {
            seq: e.seq,
            at: e.at,
            session_id: id,
            harvester_id: self.record.harvester_id.clone(),
            kind: e.kind.read(),
        }
    }

    /// Resources with no recorded outcome whose outcome is derived (only once terminal).
    fn missing(&self) -> usize {
        if self.record.status.is_terminal() && self.outcomes.len() < self.resources.len() {
            self.resources
                .len()
                .saturating_sub(self.recorded_ids().len())
        } else {
            0
        }
    }

    fn recorded_ids(&self) -> std::collections::HashSet<&str> {
        self.outcomes
            .iter()
            .map(|o| o.resource_id().as_str())
            .collect()
    }

    /// The derived outcomes of a terminal session (see [`SessionStore::outcomes`]).
    fn derived(&self) -> Vec<OutcomeRecord> {
        if !self.record.status.is_terminal() || self.outcomes.len() >= self.resources.len() {
            return Vec::new();
        }
        let recorded = self.recorded_ids();
        crate::store::derived_outcomes(&self.record, &self.resources, &recorded).collect()
    }
}

impl KeptOutcome {
    fn keep(record: &OutcomeRecord) -> Self {
        match (&record.outcome, nanos(record.elapsed)) {
            (ResourceOutcome::Succeeded, Some(elapsed)) => Self::Succeeded {
                resource_id: record.resource_id.clone(),
                attempts: record.attempts,
                elapsed,
            },
            _ => Self::Other(Box::new(record.clone())),
        }
    }

    fn read(&self) -> OutcomeRecord {
        match self {
            Self::Succeeded {
                resource_id,
                attempts,
                elapsed,
            } => OutcomeRecord {
                resource_id: resource_id.clone(),
                outcome: ResourceOutcome::Succeeded,
                attempts: *attempts,
                elapsed: std::time::Duration::from_nanos(*elapsed),
            },
            Self::Other(record) => OutcomeRecord::clone(record),
        }
    }

    fn resource_id(&self) -> &ResourceId {
        match self {
            Self::Succeeded { resource_id, .. } => resource_id,
            Self::Other(record) => &record.resource_id,
        }
    }

    fn is_success(&self) -> bool {
        match self {
            Self::Succeeded { .. } => true,
            Self::Other(record) => record.outcome.is_success(),
        }
    }
}

/// Sessions kept in process memory. Cheap to clone (shared maps).
///
/// It keeps the newest [`MemoryStore::DEFAULT_EVENT_LIMIT`] events of each session (see
/// [`MemoryStore::with_event_limit`]): a million-resource session emits millions, and a
/// memory store must not grow without bound. The durable store keeps them all.
#[derive(Clone)]
pub struct MemoryStore {
    /// Boxed: a map keeps spare room for up to as many entries again as it holds, and a
    /// session is 400 bytes (10,000 idle sessions: 0.24 KiB less each).
    sessions: Arc<DashMap<SessionId, Box<StoredSession>, IdHasher>>,
    active: Arc<DashMap<HarvesterId, SessionId>>,
    /// Each harvester's sessions, oldest first: what an adaptive start reads is its own
    /// harvester's newest sessions, not a scan of every session kept.
    by_harvester: Arc<DashMap<HarvesterId, Vec<SessionId>>>,
    nodes: Arc<DashMap<NodeId, Lease>>,
    event_limit: usize,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::with_event_limit(Self::DEFAULT_EVENT_LIMIT)
    }
}

impl MemoryStore {
    /// Events kept per session by default.
    pub const DEFAULT_EVENT_LIMIT: usize = 100_000;

    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty store keeping the newest `limit` events of each session (at least 1).
    pub fn with_event_limit(limit: usize) -> Self {
        Self {
            sessions: Arc::default(),
            active: Arc::default(),
            by_harvester: Arc::default(),
            nodes: Arc::default(),
            event_limit: limit.max(1),
        }
    }

    fn record(
        &self,
        id: SessionId,
        fence: Fence,
        outcome: &OutcomeRecord,
    ) -> Result<(), StoreError> {
        self.with(id, |s| {
            check_fence(id, &s.record, fence)?;
            if s.record.finalizing.is_some() {
                return Err(StoreError::Finalizing { session_id: id });
            }
            s.record.counts.add(&outcome.outcome);
            s.outcomes.push(KeptOutcome::keep(outcome));
            Ok(())
        })?
    }

    fn with<T>(
        &self,
        id: SessionId,
        f: impl FnOnce(&mut StoredSession) -> T,
    ) -> Result<T, StoreError> {
        let mut entry = self
            .sessions
            .get_mut(&id)
            .ok_or(StoreError::UnknownSession { session_id: id })?;
        Ok(f(entry.value_mut()))
    }
}

#[async_trait]
impl SessionStore for MemoryStore {
    async fn create_session(&self, new: NewSession) -> Result<SessionRecord, StoreError> {
        match self.active.entry(new.harvester_id.clone()) {
            Entry::Occupied(held) => Err(StoreError::HarvesterBusy {
                harvester_id: new.harvester_id,
                session_id: *held.get(),
            }),
            Entry::Vacant(slot) => {
                let mut ids = self
                    .by_harvester
                    .entry(new.harvester_id.clone())
                    // Room for one: most harvesters of a busy store have few sessions,
                    // and 10,000 idle sessions on as many harvesters pay 48 bytes less
                    // each than with a vector's first growth to four.
                    .or_insert_with(|| Vec::with_capacity(1));
                // Ids are UUID v7 (creation order): nearly always the last; kept sorted
                // whatever the caller's ids.
                let at = ids.partition_point(|id| *id < new.id);
                ids.insert(at, new.id);
                drop(ids);
                let record = SessionRecord {
                    id: new.id,
                    harvester_id: new.harvester_id,
                    status: SessionStatus::Pending,
                    total: new.resources.len(),
                    started: new.started,
                    ended: None,
                    workflow_time: new.workflow_time,
                    finalizing: None,
                    counts: OutcomeCounts::default(),
                    finalizer_error: None,
                    finalizer_attempts: 0,
                    owner: Some(new.owner),
                    epoch: 1,
                    abort_requested: false,
                };
                // Insert the session before releasing the harvester entry, so nobody sees
                // a lock pointing at a session that does not exist.
                self.sessions.insert(
                    new.id,
                    Box::new(StoredSession {
                        record: record.clone(),
                        resources: new.resources,
                        config: new.config,
                        outcomes: Vec::new(),
                        // A session logs five events by its first tick; growing from
                        // four to eight would leave a freed hole behind in every session
                        // (10,000 idle sessions: 23.9 -> 23.6 KiB each).
                        events: VecDeque::with_capacity(8.min(self.event_limit)),
                    }),
                );
                slot.insert(new.id);
                Ok(record)
            }
        }
    }

    async fn session(&self, id: SessionId) -> Result<SessionRecord, StoreError> {
        self.with(id, |s| s.record.clone())
    }

    async fn list_sessions(&self) -> Result<Vec<SessionRecord>, StoreError> {
        let mut all: Vec<SessionRecord> = self.sessions.iter().map(|s| s.record.clone()).collect();
        // Ids are UUID v7: ordering them orders by creation.
        all.sort_by_key(|r| std::cmp::Reverse(r.id));
        Ok(all)
    }

    async fn query_sessions(&self, query: &SessionQuery) -> Result<SessionPage, StoreError> {
        let limit = query.page_size();
        let mut hits: Vec<SessionRecord> = self
            .sessions
            .iter()
            .map(|s| s.record.clone())
            .filter(|r| {
                query
                    .harvester_id
                    .as_ref()
                    .is_none_or(|h| *h == r.harvester_id)
            })
            .filter(|r| query.status.is_none_or(|st| st == r.status))
            .filter(|r| query.before.is_none_or(|b| r.id < b))
            .collect();
        hits.sort_by_key(|r| std::cmp::Reverse(r.id));
        hits.truncate(limit + 1);
        Ok(SessionPage::from_overfetch(hits, limit))
    }

    async fn record_late_outcomes(
        &self,
        id: SessionId,
        outcomes: &[OutcomeRecord],
    ) -> Result<usize, StoreError> {
        self.with(id, |s| {
            if !s.record.status.is_terminal() {
                return 0;
            }
            let have: std::collections::HashSet<ResourceId> =
                s.outcomes.iter().map(|o| o.resource_id().clone()).collect();
            let mut written = 0;
            let mut seen = std::collections::HashSet::new();
            for o in outcomes {
                if !have.contains(&o.resource_id) && seen.insert(o.resource_id.clone()) {
                    s.outcomes.push(KeptOutcome::keep(o));
                    written += 1;
                }
            }
            written
        })
    }

    async fn recent_durations(
        &self,
        harvester: &HarvesterId,
        limit: usize,
    ) -> Result<Vec<std::time::Duration>, StoreError> {
        let mut found = Vec::with_capacity(limit.min(crate::budget::MAX_WINDOW));
        let Some(ids) = self.by_harvester.get(harvester) else {
            return Ok(found);
        };
        // Newest first, until the window is full. (The index's shard stays read-locked
        // meanwhile; a creation takes it only before it touches `sessions`, so the two
        // are never waited for in the other order.)
        for id in ids.iter().rev() {
            if found.len() >= limit {
                break;
            }
            // A read lock of its shard only; gone meanwhile: nothing to learn from it.
            if let Some(s) = self.sessions.get(id) {
                let successes = s.outcomes.iter().rev().filter_map(|o| match o {
                    KeptOutcome::Succeeded { elapsed, .. } => {
                        Some(std::time::Duration::from_nanos(*elapsed))
                    }
                    KeptOutcome::Other(r) if r.outcome.is_success() => Some(r.elapsed),
                    KeptOutcome::Other(_) => None,
                });
                let room = limit.saturating_sub(found.len());
                found.extend(successes.take(room));
            }
        }
        Ok(found)
    }

    async fn active_session(
        &self,
        harvester: &HarvesterId,
    ) -> Result<Option<SessionId>, StoreError> {
        Ok(self.active.get(harvester).map(|s| *s))
    }

    async fn resources(&self, id: SessionId) -> Result<Vec<ResourceId>, StoreError> {
        self.with(id, |s| s.resources.to_vec())
    }

    async fn transition(
        &self,
        id: SessionId,
        fence: Fence,
        from: SessionStatus,
        to: SessionStatus,
    ) -> Result<bool, StoreError> {
        self.with(id, |s| {
            let r = &mut s.record;
            check_fence(id, r, fence)?;
            if r.status == from && r.finalizing.is_none() && !to.is_terminal() {
                r.status = to;
                Ok(true)
            } else {
                Ok(false)
            }
        })?
    }

    async fn record_outcome(
        &self,
        id: SessionId,
        fence: Fence,
        outcome: OutcomeRecord,
    ) -> Result<(), StoreError> {
        self.record(id, fence, &outcome)
    }

    fn record_outcome_now(
        &self,
        id: SessionId,
        fence: Fence,
        outcome: &OutcomeRecord,
    ) -> Option<Result<(), StoreError>> {
        Some(self.record(id, fence, outcome))
    }

    async fn outcomes(&self, id: SessionId) -> Result<Vec<OutcomeRecord>, StoreError> {
        self.with(id, |s| {
            let mut all: Vec<OutcomeRecord> = s.outcomes.iter().map(KeptOutcome::read).collect();
            all.extend(s.derived());
            all
        })
    }

    async fn outcomes_page(
        &self,
        id: SessionId,
        offset: usize,
        limit: usize,
    ) -> Result<(Vec<OutcomeRecord>, usize), StoreError> {
        self.with(id, |s| {
            let recorded = s.outcomes.iter().map(KeptOutcome::read);
            // Derived only when the page reaches past the recorded ones.
            let derived = if offset.saturating_add(limit) > s.outcomes.len() {
                s.derived()
            } else {
                Vec::new()
            };
            let total = s.outcomes.len() + s.missing();
            let page = recorded.chain(derived).skip(offset).take(limit).collect();
            (page, total)
        })
    }

    fn append_event(&self, fence: Fence, event: SessionEvent) -> Result<(), StoreError> {
        let limit = self.event_limit;
        let id = event.session_id;
        self.with(id, |s| {
            check_fence(id, &s.record, fence)?;
            let len = s.events.len();
            if len >= limit {
                s.events.pop_front();
            } else if len == s.events.capacity() {
                // Doubling, but never past the limit: a full ring is never reallocated,
                // and a long session's ring is the limit, not the next power of two (the
                // default: 100,000 events, 5.6 MB instead of 7.3).
                s.events.reserve_exact(len.max(1).min(limit - len));
            }
            s.events.push_back(KeptEvent {
                seq: event.seq,
                at: event.at,
                kind: KeptKind::keep(event.kind),
            });
            Ok(())
        })?
    }

    async fn events(&self, id: SessionId) -> Result<Vec<SessionEvent>, StoreError> {
        self.with(id, |s| s.events.iter().map(|e| s.event(id, e)).collect())
    }

    async fn events_after(
        &self,
        id: SessionId,
        after: u64,
        limit: usize,
    ) -> Result<Vec<SessionEvent>, StoreError> {
        let limit = limit.clamp(1, crate::store::MAX_EVENT_PAGE);
        self.with(id, |s| {
            // The ring is in `seq` order: find the first past `after` by bisection.
            let from = s.events.partition_point(|e| e.seq <= after);
            s.events
                .range(from..)
                .take(limit)
                .map(|e| s.event(id, e))
                .collect()
        })
    }

    async fn last_event_seq(&self, id: SessionId) -> Result<u64, StoreError> {
        self.with(id, |s| s.events.back().map_or(0, |e| e.seq))
    }

    async fn claim_finalization(
        &self,
        id: SessionId,
        fence: Fence,
        reason: FinalizeReason,
    ) -> Result<Claim, StoreError> {
        self.with(id, |s| {
            let r = &mut s.record;
            check_fence(id, r, fence)?;
            Ok(if r.status.is_terminal() {
                Claim::AlreadyFinalized(r.clone())
            } else if r.finalizing.is_some() {
                Claim::AlreadyClaimed(r.clone())
            } else {
                let before = r.clone();
                r.finalizing = Some(reason);
                Claim::Claimed(before)
            })
        })?
    }

    async fn finalizer_started(&self, id: SessionId, fence: Fence) -> Result<u32, StoreError> {
        self.with(id, |s| {
            let r = &mut s.record;
            check_fence(id, r, fence)?;
            if r.finalizing.is_none() || r.status.is_terminal() {
                return Err(StoreError::NotClaimed { session_id: id });
            }
            r.finalizer_attempts = r.finalizer_attempts.saturating_add(1);
            Ok(r.finalizer_attempts)
        })?
    }

    async fn session_config(&self, id: SessionId) -> Result<Option<SessionConfig>, StoreError> {
        self.with(id, |s| Some(SessionConfig::clone(&s.config)))
    }

    async fn resume_session(
        &self,
        id: SessionId,
        fence: Fence,
    ) -> Result<Option<Vec<ResourceId>>, StoreError> {
        self.with(id, |s| {
            let r = &mut s.record;
            check_fence(id, r, fence)?;
            let resumable = matches!(r.status, SessionStatus::Pending | SessionStatus::OnGoing)
                && r.finalizing.is_none();
            if !resumable {
                return Ok(None);
            }
            s.outcomes.retain(KeptOutcome::is_success);
            let done: std::collections::HashSet<&ResourceId> =
                s.outcomes.iter().map(KeptOutcome::resource_id).collect();
            let remaining = s
                .resources
                .iter()
                .filter(|r| !done.contains(r))
                .cloned()
                .collect();
            r.status = SessionStatus::OnGoing;
            r.counts = OutcomeCounts {
                succeeded: s.outcomes.len(),
                ..OutcomeCounts::default()
            };
            Ok(Some(remaining))
        })?
    }

    async fn complete_finalization(
        &self,
        id: SessionId,
        fence: Fence,
        completion: Completion,
    ) -> Result<Completed, StoreError> {
        let done = self.with(id, |s| {
            check_fence(id, &s.record, fence)?;
            if s.record.status.is_terminal() {
                return Ok(Completed::AlreadyFinalized(s.record.clone()));
            }
            s.outcomes
                .extend(completion.unrecorded.iter().map(KeptOutcome::keep));
            let r = &mut s.record;
            r.status = completion.status;
            r.finalizing = Some(completion.reason);
            r.counts = completion.counts;
            r.finalizer_error = completion.finalizer_error;
            r.ended = Some(completion.ended);
            Ok(Completed::Now(r.clone()))
        })??;
        if let Completed::Now(record) = &done {
            // Free the harvester only if this session holds it: a stale finalizer must never
            // free a harvester that a newer session runs on.
            self.active
                .remove_if(&record.harvester_id, |_, holder| *holder == id);
        }
        Ok(done)
    }

    async fn request_abort(&self, id: SessionId) -> Result<SessionRecord, StoreError> {
        self.with(id, |s| {
            let r = &mut s.record;
            if matches!(r.status, SessionStatus::Pending | SessionStatus::OnGoing)
                && r.finalizing.is_none()
            {
                r.abort_requested = true;
            }
            r.clone()
        })
    }

    async fn open_sessions_of(&self, node: NodeId) -> Result<Vec<SessionId>, StoreError> {
        Ok(self
            .sessions
            .iter()
            .filter(|s| s.record.owner == Some(node) && !s.record.status.is_terminal())
            .map(|s| s.record.id)
            .collect())
    }

    async fn requested_aborts(&self, node: NodeId) -> Result<Vec<SessionId>, StoreError> {
        Ok(self
            .sessions
            .iter()
            .filter(|s| {
                let r = &s.record;
                r.owner == Some(node)
                    && r.abort_requested
                    && r.finalizing.is_none()
                    && matches!(r.status, SessionStatus::Pending | SessionStatus::OnGoing)
            })
            .map(|s| s.record.id)
            .collect())
    }

    async fn register_node(
        &self,
        node: &NodeInfo,
        ttl: std::time::Duration,
    ) -> Result<NodeRecord, StoreError> {
        let lease = Lease {
            info: node.clone(),
            started: chrono::Utc::now(),
            until: lease_end(ttl),
        };
        let record = lease.record();
        self.nodes.insert(node.id, lease);
        Ok(record)
    }

    async fn renew_lease(
        &self,
        node: &NodeInfo,
        ttl: std::time::Duration,
    ) -> Result<NodeRecord, StoreError> {
        match self.nodes.get_mut(&node.id) {
            Some(mut lease) => {
                lease.until = lease_end(ttl);
                Ok(lease.record())
            }
            None => self.register_node(node, ttl).await,
        }
    }

    async fn release_node(&self, node: NodeId) -> Result<(), StoreError> {
        if let Some(mut lease) = self.nodes.get_mut(&node) {
            lease.until = tokio::time::Instant::now();
        }
        Ok(())
    }

    async fn expire_node(&self, node: NodeId, process: &ProcessId) -> Result<bool, StoreError> {
        Ok(match self.nodes.get_mut(&node) {
            Some(mut lease) if lease.info.process.as_ref() == Some(process) && lease.live() => {
                lease.until = tokio::time::Instant::now();
                true
            }
            _ => false,
        })
    }

    async fn nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        let mut all: Vec<NodeRecord> = self.nodes.iter().map(|l| l.record()).collect();
        all.sort_by_key(|n| std::cmp::Reverse(n.info.id));
        Ok(all)
    }

    async fn take_over(&self, rescuer: NodeId, limit: usize) -> Result<Vec<TakenOver>, StoreError> {
        if !self.nodes.get(&rescuer).is_some_and(|l| l.live()) {
            return Err(StoreError::LeaseExpired { node: rescuer });
        }
        // Forget nodes long gone that own nothing unfinished.
        let now = tokio::time::Instant::now();
        let owners: std::collections::HashSet<NodeId> = self
            .sessions
            .iter()
            .filter(|s| !s.record.status.is_terminal())
            .filter_map(|s| s.record.owner)
            .collect();
        self.nodes.retain(|id, lease| {
            owners.contains(id)
                || now.saturating_duration_since(lease.until) <= crate::store::NODE_RETENTION
        });
        let live = |owner: Option<NodeId>| {
            owner.is_some_and(|o| self.nodes.get(&o).is_some_and(|l| l.live()))
        };
        // Candidates first (no entry lock is held while the nodes map is read), then each
        // taken under its entry's lock, checked again there: one winner per session.
        let candidates: Vec<(SessionId, Option<NodeId>)> = self
            .sessions
            .iter()
            .filter(|s| !s.record.status.is_terminal())
            .map(|s| (s.record.id, s.record.owner))
            .filter(|(_, owner)| !live(*owner))
            .take(limit)
            .collect();
        let mut taken = Vec::with_capacity(candidates.len());
        for (id, seen_owner) in candidates {
            let Some(mut entry) = self.sessions.get_mut(&id) else {
                continue;
            };
            let r = &mut entry.record;
            if r.status.is_terminal() || r.owner != seen_owner {
                continue; // finalized or taken by someone else meanwhile
            }
            let from_node = r.owner;
            r.owner = Some(rescuer);
            r.epoch = r.epoch.saturating_add(1);
            taken.push(TakenOver {
                record: r.clone(),
                from_node,
            });
        }
        Ok(taken)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A store keeping `limit` events per session, with one session in it.
    const NODE: NodeId = NodeId(uuid::Uuid::nil());

    async fn one_session(limit: usize) -> (MemoryStore, SessionId) {
        let store = MemoryStore::with_event_limit(limit);
        let id = SessionId::new();
        store
            .create_session(NewSession {
                id,
                harvester_id: "h".into(),
                resources: Arc::new([]),
                started: chrono::Utc::now(),
                workflow_time: std::time::Duration::from_secs(1),
                config: Arc::default(),
                owner: NODE,
            })
            .await
            .expect("create");
        (store, id)
    }

    fn append(store: &MemoryStore, id: SessionId, seq: u64) {
        let event = SessionEvent {
            seq,
            at: chrono::Utc::now(),
            session_id: id,
            harvester_id: "h".into(),
            kind: EventKind::MonitorCancelled,
        };
        store.append_event(Fence::new(NODE), event).expect("append");
    }

    async fn stored_seqs(store: &MemoryStore, id: SessionId) -> Vec<u64> {
        let events = store.events(id).await.expect("events");
        events.iter().map(|e| e.seq).collect()
    }

    #[tokio::test]
    async fn keeps_only_the_newest_events_of_a_session() {
        let (store, id) = one_session(3).await;
        for seq in 1..=5 {
            append(&store, id, seq);
        }
        assert_eq!(stored_seqs(&store, id).await, [3, 4, 5]);
        assert_eq!(store.last_event_seq(id).await.expect("seq"), 5);
    }

    #[tokio::test]
    async fn an_event_ring_never_grows_past_its_limit() {
        let (store, id) = one_session(20).await;
        for seq in 1..=100 {
            append(&store, id, seq);
            let room = store.sessions.get(&id).map(|s| s.events.capacity());
            assert!(room.is_some_and(|r| r <= 20), "{room:?} after {seq} events");
        }
        assert_eq!(
            stored_seqs(&store, id).await,
            (81..=100).collect::<Vec<_>>()
        );
    }

    #[tokio::test]
    async fn every_kind_of_event_reads_back_as_it_was_appended() {
        let (store, id) = one_session(100).await;
        // Zero, a usual elapsed time, and one too long to keep inline.
        let durations = [Duration::ZERO, Duration::new(1, 500), Duration::MAX];
        let kinds: Vec<EventKind> = durations
            .iter()
            .flat_map(|&d| crate::events::samples::kinds("r-1", d, 3))
            .collect();
        let appended: Vec<SessionEvent> = (1..)
            .zip(&kinds)
            .map(|(seq, kind)| SessionEvent {
                seq,
                at: chrono::Utc::now(),
                session_id: id,
                harvester_id: "h".into(),
                kind: kind.clone(),
            })
            .collect();
        for event in &appended {
            store
                .append_event(Fence::new(NODE), event.clone())
                .expect("append");
        }
        assert_eq!(store.events(id).await.expect("events"), appended);
    }

    #[tokio::test]
    async fn an_elapsed_time_too_long_for_nanoseconds_is_kept_whole() {
        let (store, id) = one_session(1).await;
        let record = OutcomeRecord {
            resource_id: "r".into(),
            outcome: ResourceOutcome::Succeeded,
            attempts: 1,
            elapsed: Duration::MAX,
        };
        store.record(id, Fence::new(NODE), &record).expect("record");
        assert_eq!(store.outcomes(id).await.expect("outcomes"), [record]);
    }

    #[tokio::test(start_paused = true)]
    async fn nodes_long_gone_that_own_nothing_unfinished_are_forgotten() {
        let store = MemoryStore::new();
        let node = |n: u128| NodeInfo {
            id: NodeId(uuid::Uuid::from_u128(n)),
            name: None,
            process: None,
        };
        let (gone, owner, rescuer) = (node(1), node(2), node(3));
        let second = Duration::from_secs(1);
        store.register_node(&gone, second).await.expect("gone");
        store.register_node(&owner, second).await.expect("owner");
        let id = SessionId::new();
        store
            .create_session(NewSession {
                id,
                harvester_id: "h".into(),
                resources: Arc::new([]),
                started: chrono::Utc::now(),
                workflow_time: second,
                config: Arc::default(),
                owner: owner.id,
            })
            .await
            .expect("create");
        tokio::time::sleep(crate::store::NODE_RETENTION + 2 * second).await;
        let day = crate::store::NODE_RETENTION;
        store.register_node(&rescuer, day).await.expect("rescuer");
        let known = |store: &MemoryStore| {
            let ids: Vec<NodeId> = store.nodes.iter().map(|n| *n.key()).collect();
            ids
        };
        // The owner of an unfinished session is kept (its session is taken over now).
        let taken = store.take_over(rescuer.id, 10).await.expect("rescue");
        assert_eq!(taken.len(), 1);
        let mut ids = known(&store);
        ids.sort();
        assert_eq!(ids, [owner.id, rescuer.id]);
        // Once it owns nothing unfinished, it goes too.
        store.take_over(rescuer.id, 10).await.expect("rescue");
        assert_eq!(known(&store), [rescuer.id]);
    }

    #[test]
    #[cfg(target_pointer_width = "64")]
    fn kept_events_and_outcomes_stay_small() {
        // Two per resource, written where the ring has not been before: see `KeptEvent`.
        assert!(std::mem::size_of::<KeptEvent>() <= 56);
        // One per resource, the same way.
        assert!(std::mem::size_of::<KeptOutcome>() <= 32);
    }
}
