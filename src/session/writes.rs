//! Outcome writes in flight.
//!
//! A session does not wait for each outcome's commit before it handles the next message:
//! that would allow one commit (one fsync) per resource and no group commit at all. It
//! submits the write and goes on; the store commits many together. Before finalizing, the
//! session waits for every write it submitted ([`OutcomeWrites::drain`]), so a failed write
//! is never forgotten: its outcome is kept for the finalizer, which writes it with the
//! completion. A crash can lose only writes that were not yet committed, which recovery
//! then counts as `Lost` (never as success).

use std::collections::VecDeque;
use std::sync::Arc;

use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};

use crate::error::StoreError;
use crate::model::{Fence, OutcomeRecord, SessionId};
use crate::store::{OutcomeReceipt, SessionStore};

/// Submitted writes allowed in flight before the session waits for the oldest ones: bounds
/// memory when the disk is slower than the harvest.
const MAX_IN_FLIGHT: usize = 4096;

/// A write's outcome and its result.
pub(crate) type Written = (OutcomeRecord, Result<(), StoreError>);

/// The writes a session has submitted and not yet seen answered.
#[derive(Default)]
pub(crate) struct OutcomeWrites {
    /// Writes queued with a store that answers by receipt (the durable store), oldest
    /// first: it answers them about in this order, so only the front is asked.
    queued: VecDeque<(OutcomeRecord, OutcomeReceipt)>,
    /// Made at the first write a store does not answer at once: an empty set already holds
    /// two allocations, and with the memory store no session ever needs one (10,000 idle
    /// sessions: 0.17 KiB less each).
    pending: Option<FuturesUnordered<BoxFuture<'static, Written>>>,
    /// Writes answered and not yet settled; kept (and its capacity reused) across calls.
    pub(crate) answered: Vec<Written>,
}

impl OutcomeWrites {
    /// Submits the write of `record`, and moves the writes answered by now to
    /// [`Self::answered`] (those recorded in place or by receipt only if they failed: a
    /// success needs no settling). Never waits: call
    /// [`Self::throttle`] next. (Synchronous so that the worker-exit handler, which runs
    /// once per resource, keeps a small future.)
    pub(crate) fn submit(
        &mut self,
        store: &Arc<dyn SessionStore>,
        id: SessionId,
        fence: Fence,
        record: OutcomeRecord,
    ) {
        let answered = &mut self.answered;
        match store.record_outcome_now(id, fence, &record) {
            // Recorded in place (the memory store): no future at all.
            Some(Ok(())) => {}
            Some(failed) => answered.push((record, failed)),
            None => match store.queue_outcome(id, fence, &record) {
                // Queued with a receipt (the durable store): no future either.
                Some(receipt) => self.queued.push_back((record, receipt)),
                None => {
                    let store = Arc::clone(store);
                    let mut write = async move {
                        let result = store.record_outcome(id, fence, record.clone()).await;
                        (record, result)
                    }
                    .boxed();
                    // Poll once here: that sends the write to the store, and a store that
                    // answers at once never costs a slot in the set.
                    match write.as_mut().now_or_never() {
                        Some(done) => answered.push(done),
                        None => self
                            .pending
                            .get_or_insert_with(FuturesUnordered::new)
                            .push(write),
                    }
                }
            },
        }
        // Collect the writes answered meanwhile, without waiting: receipts from the front
        // (a success needs no settling), then futures (`now_or_never` leaves the
        // unfinished in the set).
        while let Some((_, receipt)) = self.queued.front_mut()
            && let Some(result) = receipt.try_answer()
        {
            if let Some((record, _)) = self.queued.pop_front()
                && result.is_err()
            {
                answered.push((record, result));
            }
        }
        if let Some(pending) = &mut self.pending {
            while let Some(Some(done)) = pending.next().now_or_never() {
                answered.push(done);
            }
        }
    }

    /// Writes submitted and not yet answered.
    fn in_flight(&self) -> usize {
        self.queued.len() + self.pending.as_ref().map_or(0, FuturesUnordered::len)
    }

    /// Whether [`Self::throttle`] has anything to wait for.
    pub(crate) fn over_limit(&self) -> bool {
        self.in_flight() > MAX_IN_FLIGHT
    }

    /// Waits for the oldest writes while more than [`MAX_IN_FLIGHT`] are unanswered.
    pub(crate) async fn throttle(&mut self) {
        while self.in_flight() > MAX_IN_FLIGHT {
            if let Some((record, receipt)) = self.queued.pop_front() {
                self.answered.push((record, receipt.answer().await));
                continue;
            }
            match self.pending.as_mut().map(|pending| pending.next()) {
                Some(next) => match next.await {
                    Some(done) => self.answered.push(done),
                    None => break,
                },
                None => break,
            }
        }
    }

    /// Waits for every submitted write (into [`Self::answered`]).
    pub(crate) async fn drain(&mut self) {
        while let Some((record, receipt)) = self.queued.pop_front() {
            self.answered.push((record, receipt.answer().await));
        }
        let Some(pending) = &mut self.pending else {
            return;
        };
        while let Some(done) = pending.next().await {
            self.answered.push(done);
        }
    }
}
