//! A `SessionStore` over `MemoryStore` with faults a test can switch on: failing reads,
//! a held `pending -> on-going` transition, outcome writes that never return.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use async_trait::async_trait;
use harvest_supervisor::store::{
    Claim, Completed, Completion, NewSession, NodeInfo, NodeRecord, OutcomeAnswer, OutcomeReceipt,
    ProcessId, SessionPage, SessionQuery, TakenOver,
};
use harvest_supervisor::{
    Fence, FinalizeReason, HarvesterId, MemoryStore, NodeId, OutcomeRecord, ResourceId,
    SessionConfig, SessionEvent, SessionId, SessionRecord, SessionStatus, SessionStore, StoreError,
};
use tokio::sync::Semaphore;

/// Told of each acknowledged outcome.
pub type AckHook = Arc<dyn Fn(&OutcomeRecord) + Send + Sync>;

pub struct FaultyStore {
    pub inner: Arc<dyn SessionStore>,
    /// Called after each outcome the inner store acknowledged.
    pub on_outcome_ack: Option<AckHook>,
    /// The next this-many `session()` reads fail.
    pub failing_reads: AtomicUsize,
    /// While set, `create_session` waits for a permit of `create_gate` (a slow disk).
    pub hold_creates: AtomicBool,
    pub create_gate: Arc<Semaphore>,
    /// The ids of the sessions whose creation was held.
    pub held_creates: std::sync::Mutex<Vec<SessionId>>,
    /// While set, `pending -> on-going` waits for a permit of `begin_gate`.
    pub hold_begin: AtomicBool,
    pub begin_gate: Arc<Semaphore>,
    /// While set, `record_outcome` never returns.
    pub hang_outcome_writes: AtomicBool,
    /// While set, `record_outcome` fails (a disk error).
    pub failing_outcome_writes: AtomicBool,
    /// While set, `transition` fails (a backend error: trying again may pass).
    pub failing_transitions: AtomicBool,
    /// While set, `transition` fails for good (the store is closed).
    pub fatal_transitions: AtomicBool,
    /// While set, outcomes are recorded in place (`record_outcome_now`, as the memory store
    /// does), and fail there while `failing_outcome_writes` is set.
    pub in_place_outcomes: AtomicBool,
    /// While set, outcomes are queued with a receipt (`queue_outcome`, as the durable
    /// store does), answered from another task once the inner store acknowledged them;
    /// failing or never answered under the flags above.
    pub queued_outcomes: AtomicBool,
    /// While set, queued outcomes are answered 5 s (of tokio time) after they were queued:
    /// after the session handled its last outcome.
    pub late_answers: AtomicBool,
    /// While set, every step of finalization (claim, finalizer started, completion) fails
    /// (a full disk), and counts its failures in `failed_finalization_writes`.
    pub failing_finalization_writes: AtomicBool,
    pub failed_finalization_writes: AtomicUsize,
    /// Called after a claim this store granted; then, while `hang_after_claim` is set, the
    /// claim never returns (a process that dies between its claim and its finalizer).
    pub on_claim: Option<Arc<dyn Fn() + Send + Sync>>,
    pub hang_after_claim: AtomicBool,
    /// While set, lease renewals fail (a node cut off from its store).
    pub failing_renewals: AtomicBool,
    /// While set, lease renewals never return (a store that hangs).
    pub hanging_renewals: AtomicBool,
    /// While set, takeovers (the rescue pass's) never return.
    pub hanging_takeovers: AtomicBool,
    /// While set, `recent_durations` fails (the history cannot be read).
    pub failing_history: AtomicBool,
    /// The next this-many completions fail (a full disk at the finalization's last step).
    pub failing_completions: AtomicUsize,
    /// While set, `record_late_outcomes` fails.
    pub failing_late_outcomes: AtomicBool,
    /// While set, completions succeed without the outcomes they carry, as a store does
    /// when they do not fit (SQLite's and PostgreSQL's savepoint for them).
    pub completing_without_outcomes: AtomicBool,
    /// Answers held back while `hang_outcome_writes` is set.
    unanswered: std::sync::Mutex<Vec<OutcomeAnswer>>,
    /// Queued outcome writes not yet answered (held ones aside), and the most there ever
    /// were at once.
    pub queued_now: Arc<AtomicUsize>,
    pub queued_most: AtomicUsize,
    /// Reads counted: `session()` by session, `events_after()` in all.
    pub session_reads: std::sync::Mutex<std::collections::HashMap<SessionId, usize>>,
    pub events_after_reads: AtomicUsize,
}

impl FaultyStore {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::wrapping(Arc::new(MemoryStore::new())))
    }

    pub fn wrapping(inner: Arc<dyn SessionStore>) -> Self {
        Self {
            inner,
            on_outcome_ack: None,
            failing_reads: AtomicUsize::new(0),
            hold_creates: AtomicBool::new(false),
            create_gate: Arc::new(Semaphore::new(0)),
            held_creates: std::sync::Mutex::new(Vec::new()),
            hold_begin: AtomicBool::new(false),
            begin_gate: Arc::new(Semaphore::new(0)),
            hang_outcome_writes: AtomicBool::new(false),
            failing_outcome_writes: AtomicBool::new(false),
            failing_transitions: AtomicBool::new(false),
            fatal_transitions: AtomicBool::new(false),
            in_place_outcomes: AtomicBool::new(false),
            queued_outcomes: AtomicBool::new(false),
            late_answers: AtomicBool::new(false),
            failing_finalization_writes: AtomicBool::new(false),
            failed_finalization_writes: AtomicUsize::new(0),
            on_claim: None,
            hang_after_claim: AtomicBool::new(false),
            failing_renewals: AtomicBool::new(false),
            hanging_renewals: AtomicBool::new(false),
            hanging_takeovers: AtomicBool::new(false),
            failing_history: AtomicBool::new(false),
            failing_completions: AtomicUsize::new(0),
            failing_late_outcomes: AtomicBool::new(false),
            completing_without_outcomes: AtomicBool::new(false),
            unanswered: std::sync::Mutex::new(Vec::new()),
            queued_now: Arc::new(AtomicUsize::new(0)),
            queued_most: AtomicUsize::new(0),
            session_reads: std::sync::Mutex::default(),
            events_after_reads: AtomicUsize::new(0),
        }
    }
}

fn injected() -> StoreError {
    StoreError::Backend("injected read failure".into())
}

impl FaultyStore {
    /// How many times session `id`'s record was read.
    pub fn session_reads_of(&self, id: SessionId) -> usize {
        self.session_reads
            .lock()
            .expect("counts")
            .get(&id)
            .copied()
            .unwrap_or(0)
    }

    /// The injected failure of a finalization step, if they fail now.
    fn finalization_fault(&self) -> Result<(), StoreError> {
        if self.failing_finalization_writes.load(Ordering::SeqCst) {
            self.failed_finalization_writes
                .fetch_add(1, Ordering::SeqCst);
            return Err(StoreError::Backend(
                "injected write failure: database or disk is full".into(),
            ));
        }
        Ok(())
    }
}

#[async_trait]
impl SessionStore for FaultyStore {
    async fn create_session(&self, new: NewSession) -> Result<SessionRecord, StoreError> {
        if self.hold_creates.load(Ordering::SeqCst) {
            self.held_creates
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(new.id);
            let _permit = self.create_gate.acquire().await;
        }
        self.inner.create_session(new).await
    }
    async fn sessions_by_id(&self, ids: &[SessionId]) -> Result<Vec<SessionRecord>, StoreError> {
        self.inner.sessions_by_id(ids).await
    }
    async fn session(&self, id: SessionId) -> Result<SessionRecord, StoreError> {
        *self
            .session_reads
            .lock()
            .expect("counts")
            .entry(id)
            .or_default() += 1;
        let fail = self
            .failing_reads
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if fail {
            return Err(injected());
        }
        self.inner.session(id).await
    }
    async fn list_sessions(&self) -> Result<Vec<SessionRecord>, StoreError> {
        self.inner.list_sessions().await
    }
    async fn query_sessions(&self, q: &SessionQuery) -> Result<SessionPage, StoreError> {
        self.inner.query_sessions(q).await
    }
    async fn record_late_outcomes(
        &self,
        id: SessionId,
        outcomes: &[OutcomeRecord],
    ) -> Result<usize, StoreError> {
        if self.failing_late_outcomes.load(Ordering::SeqCst) {
            return Err(StoreError::Backend(
                "injected write failure: database or disk is full".into(),
            ));
        }
        self.inner.record_late_outcomes(id, outcomes).await
    }
    async fn recent_durations(
        &self,
        h: &HarvesterId,
        limit: usize,
    ) -> Result<Vec<std::time::Duration>, StoreError> {
        if self.failing_history.load(Ordering::SeqCst) {
            return Err(injected());
        }
        self.inner.recent_durations(h, limit).await
    }
    async fn active_session(&self, h: &HarvesterId) -> Result<Option<SessionId>, StoreError> {
        self.inner.active_session(h).await
    }
    async fn resources(&self, id: SessionId) -> Result<Vec<ResourceId>, StoreError> {
        self.inner.resources(id).await
    }
    async fn transition(
        &self,
        id: SessionId,
        fence: Fence,
        from: SessionStatus,
        to: SessionStatus,
    ) -> Result<bool, StoreError> {
        if self.failing_transitions.load(Ordering::SeqCst) {
            return Err(StoreError::Backend("injected transition failure".into()));
        }
        if self.fatal_transitions.load(Ordering::SeqCst) {
            return Err(StoreError::Closed);
        }
        if from == SessionStatus::Pending
            && to == SessionStatus::OnGoing
            && self.hold_begin.load(Ordering::SeqCst)
        {
            let _permit = self.begin_gate.acquire().await;
        }
        self.inner.transition(id, fence, from, to).await
    }
    async fn record_outcome(
        &self,
        id: SessionId,
        fence: Fence,
        o: OutcomeRecord,
    ) -> Result<(), StoreError> {
        if self.hang_outcome_writes.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        if self.failing_outcome_writes.load(Ordering::SeqCst) {
            return Err(StoreError::Backend("injected write failure".into()));
        }
        let ack = o.clone();
        self.inner.record_outcome(id, fence, o).await?;
        if let Some(hook) = &self.on_outcome_ack {
            hook(&ack);
        }
        Ok(())
    }
    fn record_outcome_now(
        &self,
        id: SessionId,
        fence: Fence,
        o: &OutcomeRecord,
    ) -> Option<Result<(), StoreError>> {
        if !self.in_place_outcomes.load(Ordering::SeqCst) {
            return None;
        }
        if self.failing_outcome_writes.load(Ordering::SeqCst) {
            return Some(Err(StoreError::Backend("injected write failure".into())));
        }
        self.inner.record_outcome_now(id, fence, o)
    }
    fn queue_outcome(
        &self,
        id: SessionId,
        fence: Fence,
        o: &OutcomeRecord,
    ) -> Option<OutcomeReceipt> {
        if !self.queued_outcomes.load(Ordering::SeqCst) {
            return None;
        }
        let (answer, receipt) = OutcomeReceipt::new();
        if self.hang_outcome_writes.load(Ordering::SeqCst) {
            self.unanswered.lock().expect("lock").push(answer);
            return Some(receipt);
        }
        let late = self.late_answers.load(Ordering::SeqCst);
        let inner_write: futures::future::BoxFuture<'static, Result<(), StoreError>> =
            if self.failing_outcome_writes.load(Ordering::SeqCst) {
                let failure = Err(StoreError::Backend("injected write failure".into()));
                if !late {
                    answer.send(failure);
                    return Some(receipt);
                }
                Box::pin(async move { failure })
            } else {
                match self.inner.queue_outcome(id, fence, o) {
                    Some(inner) => Box::pin(inner.answer()),
                    None => {
                        let inner = Arc::clone(&self.inner);
                        let o = o.clone();
                        Box::pin(async move { inner.record_outcome(id, fence, o).await })
                    }
                }
            };
        let hook = self.on_outcome_ack.clone();
        let ack = o.clone();
        let now = self.queued_now.fetch_add(1, Ordering::SeqCst) + 1;
        self.queued_most.fetch_max(now, Ordering::SeqCst);
        let queued_now = Arc::clone(&self.queued_now);
        tokio::spawn(async move {
            if late {
                tokio::time::sleep(std::time::Duration::from_secs(5)).await;
            }
            let result = inner_write.await;
            if result.is_ok()
                && let Some(hook) = &hook
            {
                hook(&ack);
            }
            queued_now.fetch_sub(1, Ordering::SeqCst);
            answer.send(result);
        });
        Some(receipt)
    }
    async fn outcomes(&self, id: SessionId) -> Result<Vec<OutcomeRecord>, StoreError> {
        self.inner.outcomes(id).await
    }
    async fn outcomes_page(
        &self,
        id: SessionId,
        offset: usize,
        limit: usize,
    ) -> Result<(Vec<OutcomeRecord>, usize), StoreError> {
        self.inner.outcomes_page(id, offset, limit).await
    }
    fn append_event(&self, fence: Fence, event: SessionEvent) -> Result<(), StoreError> {
        self.inner.append_event(fence, event)
    }
    async fn events(&self, id: SessionId) -> Result<Vec<SessionEvent>, StoreError> {
        self.inner.events(id).await
    }
    async fn events_after(
        &self,
        id: SessionId,
        after: u64,
        limit: usize,
    ) -> Result<Vec<SessionEvent>, StoreError> {
        self.events_after_reads.fetch_add(1, Ordering::SeqCst);
        self.inner.events_after(id, after, limit).await
    }
    async fn last_event_seq(&self, id: SessionId) -> Result<u64, StoreError> {
        self.inner.last_event_seq(id).await
    }
    async fn claim_finalization(
        &self,
        id: SessionId,
        fence: Fence,
        reason: FinalizeReason,
    ) -> Result<Claim, StoreError> {
        self.finalization_fault()?;
        let claim = self.inner.claim_finalization(id, fence, reason).await?;
        if matches!(claim, Claim::Claimed(_)) {
            if let Some(hook) = &self.on_claim {
                hook();
            }
            if self.hang_after_claim.load(Ordering::SeqCst) {
                std::future::pending::<()>().await;
            }
        }
        Ok(claim)
    }
    async fn finalizer_started(&self, id: SessionId, fence: Fence) -> Result<u32, StoreError> {
        self.finalization_fault()?;
        self.inner.finalizer_started(id, fence).await
    }
    async fn session_config(&self, id: SessionId) -> Result<Option<SessionConfig>, StoreError> {
        self.inner.session_config(id).await
    }
    async fn resume_session(
        &self,
        id: SessionId,
        fence: Fence,
    ) -> Result<Option<Vec<ResourceId>>, StoreError> {
        self.inner.resume_session(id, fence).await
    }
    async fn flush(&self) -> Result<(), StoreError> {
        self.inner.flush().await
    }
    async fn complete_finalization(
        &self,
        id: SessionId,
        fence: Fence,
        mut c: Completion,
    ) -> Result<Completed, StoreError> {
        self.finalization_fault()?;
        if self.completing_without_outcomes.load(Ordering::SeqCst) {
            c.unrecorded.clear();
        }
        if self
            .failing_completions
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(StoreError::Backend(
                "injected write failure: database or disk is full".into(),
            ));
        }
        self.inner.complete_finalization(id, fence, c).await
    }
    async fn request_abort(&self, id: SessionId) -> Result<SessionRecord, StoreError> {
        self.inner.request_abort(id).await
    }
    async fn open_sessions_of(&self, node: NodeId) -> Result<Vec<SessionId>, StoreError> {
        self.inner.open_sessions_of(node).await
    }
    async fn requested_aborts(&self, node: NodeId) -> Result<Vec<SessionId>, StoreError> {
        self.inner.requested_aborts(node).await
    }
    async fn register_node(
        &self,
        node: &NodeInfo,
        ttl: std::time::Duration,
    ) -> Result<NodeRecord, StoreError> {
        self.inner.register_node(node, ttl).await
    }
    async fn renew_lease(
        &self,
        node: &NodeInfo,
        ttl: std::time::Duration,
    ) -> Result<NodeRecord, StoreError> {
        if self.failing_renewals.load(Ordering::SeqCst) {
            return Err(StoreError::Backend("injected renewal failure".into()));
        }
        if self.hanging_renewals.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        self.inner.renew_lease(node, ttl).await
    }
    async fn release_node(&self, node: NodeId) -> Result<(), StoreError> {
        self.inner.release_node(node).await
    }
    async fn expire_node(&self, node: NodeId, process: &ProcessId) -> Result<bool, StoreError> {
        self.inner.expire_node(node, process).await
    }
    async fn nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        self.inner.nodes().await
    }
    async fn take_over(&self, rescuer: NodeId, limit: usize) -> Result<Vec<TakenOver>, StoreError> {
        if self.hanging_takeovers.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        self.inner.take_over(rescuer, limit).await
    }
    fn signals(&self) -> Option<harvest_supervisor::store::StoreSignals> {
        self.inner.signals()
    }
}
