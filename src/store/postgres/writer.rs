//! The PostgreSQL store's group commit: outcomes and events, batched.
//!
//! Outcomes and events are the bulk of the writes (two or more per resource). They go to
//! one thread with a connection of its own, which takes whatever is queued (up to
//! [`MAX_BATCH`]) and writes it in one transaction of a handful of statements: the
//! sessions' rows locked once (the fence and "not yet claimed" read under the lock, so a
//! claim waits for the batch or the batch sees the claim), all outcomes in one multi-row
//! insert, one counter update for all sessions, all event chunks in one insert (under
//! their fence), and one notification per session with new events. Then one commit, and
//! only then are the callers answered: an answer means "durable".
//!
//! Everything else (claims, transitions, completions, reads) runs on the pool, after a
//! barrier through this thread when something is queued, so it sees every write sent
//! before it, as it does on the other stores.
//!
//! When the database cannot be reached, the batch's outcomes are answered with the error
//! (sessions keep them and retry with backoff) and its events are kept, up to
//! [`MAX_RETAINED_EVENTS`], for the next batch: an outage loses no event unless it lasts
//! long enough to fill that.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use tokio_postgres::{Client, Config, NoTls};

use crate::error::StoreError;
use crate::events::SessionEvent;
use crate::model::{Fence, IdHasher, OutcomeCounts, OutcomeRecord, SessionId};
use crate::store::chunks::{ChunkRow, Chunks};
use crate::store::postgres::rows::{backend, count, epoch_value, nanos, outcome_columns};
use crate::store::postgres::schema::qualify;
use crate::store::{OutcomeAnswer, OutcomeReceipt};

/// Most operations in one transaction.
pub(crate) const MAX_BATCH: usize = 4096;

/// Operations queued at most; a full queue makes senders wait (backpressure).
const QUEUE: usize = 16 * 1024;

/// Events kept across failed commits at most (the oldest go first beyond).
pub(crate) const MAX_RETAINED_EVENTS: usize = 100_000;

/// How soon a batch that failed is tried again when nothing new arrives.
const RETRY_AFTER: Duration = Duration::from_secs(1);

enum Command {
    Outcome(SessionId, Fence, OutcomeRecord, OutcomeAnswer),
    Event(Fence, SessionEvent),
    Flush(oneshot::Sender<Result<(), StoreError>>),
    Close(oneshot::Sender<()>),
}

/// The sending half, held by the store.
#[derive(Clone)]
pub(crate) struct Writer {
    tx: SyncSender<Command>,
    /// Outcomes and events sent and not yet through a commit (or its failure).
    pending: Arc<AtomicU64>,
    /// Events sent and not yet through a commit.
    pending_events: Arc<AtomicU64>,
}

/// What the thread needs to connect and write.
pub(crate) struct Target {
    pub(crate) config: Config,
    pub(crate) schema: String,
    pub(crate) commit_delay: Duration,
    /// The channel new events are announced on (payload: the session id).
    pub(crate) events_channel: String,
}

impl Writer {
    /// Starts the thread.
    pub(crate) fn spawn(target: Target) -> std::io::Result<Self> {
        let (tx, rx) = std::sync::mpsc::sync_channel(QUEUE);
        let pending = Arc::new(AtomicU64::new(0));
        let pending_events = Arc::new(AtomicU64::new(0));
        let (p, pe) = (Arc::clone(&pending), Arc::clone(&pending_events));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        std::thread::Builder::new()
            .name("harvest-pg-writer".into())
            .spawn(move || run(&runtime, &target, &rx, &p, &pe))?;
        Ok(Self {
            tx,
            pending,
            pending_events,
        })
    }

    /// Whether anything sent has not been through a commit yet.
    pub(crate) fn busy(&self) -> bool {
        self.pending.load(Ordering::Acquire) > 0
    }

    /// Whether events were appended that no commit has taken yet.
    pub(crate) fn events_pending(&self) -> bool {
        self.pending_events.load(Ordering::Acquire) > 0
    }

    /// Records a final outcome in the next batch; the receipt is answered after the commit.
    pub(crate) fn queue_outcome(
        &self,
        id: SessionId,
        fence: Fence,
        outcome: OutcomeRecord,
    ) -> OutcomeReceipt {
        let (answer, receipt) = OutcomeReceipt::new();
        self.pending.fetch_add(1, Ordering::AcqRel);
        if self
            .send(Command::Outcome(id, fence, outcome, answer))
            .is_err()
        {
            self.pending.fetch_sub(1, Ordering::AcqRel);
        }
        receipt
    }

    /// Queues an event for its session's chunk; never waits unless the queue is full.
    pub(crate) fn event(&self, fence: Fence, event: SessionEvent) -> Result<(), StoreError> {
        self.pending.fetch_add(1, Ordering::AcqRel);
        self.pending_events.fetch_add(1, Ordering::AcqRel);
        let sent = self.send(Command::Event(fence, event));
        if sent.is_err() {
            self.pending.fetch_sub(1, Ordering::AcqRel);
            self.pending_events.fetch_sub(1, Ordering::AcqRel);
        }
        sent
    }

    /// Waits until everything sent before is committed (or its commit failed: `Err`).
    pub(crate) async fn flush(&self) -> Result<(), StoreError> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::Flush(reply))?;
        answer.await.map_err(|_| StoreError::Closed)?
    }

    /// A barrier before a write on the pool, when something is queued: that write then
    /// comes after every outcome and event sent before it. A failed batch answered its
    /// own callers; the write goes on.
    pub(crate) async fn barrier(&self) {
        if self.busy()
            && let Err(error) = self.flush().await
        {
            tracing::debug!(%error, "store: writes queued before this one were not committed");
        }
    }

    /// Commits what is queued and stops the thread.
    pub(crate) async fn close(&self) {
        let (reply, answer) = oneshot::channel();
        if self.send(Command::Close(reply)).is_ok() {
            let _ = answer.await;
        }
    }

    fn send(&self, command: Command) -> Result<(), StoreError> {
        match self.tx.try_send(command) {
            Ok(()) => Ok(()),
            // The database is slower than the sessions: wait for room rather than drop.
            Err(TrySendError::Full(command)) => {
                self.tx.send(command).map_err(|_| StoreError::Closed)
            }
            Err(TrySendError::Disconnected(_)) => Err(StoreError::Closed),
        }
    }
}

/// The writer's connection, made again when lost.
struct Connection {
    client: Option<Client>,
}

impl Connection {
    async fn get(&mut self, config: &Config) -> Result<&mut Client, StoreError> {
        if self.client.as_ref().is_some_and(Client::is_closed) {
            self.client = None;
        }
        if self.client.is_none() {
            let (client, connection) = config.connect(NoTls).await.map_err(backend)?;
            tokio::spawn(async move {
                if let Err(error) = connection.await {
                    tracing::debug!(%error, "store: the writer's connection ended");
                }
            });
            // Event chunks (up to 256 events of JSON, tens of KiB) are compressed as they
            // are stored; with PostgreSQL's default, pglz, that compression was a third of
            // the writer's time per resource. lz4 where the server has it (PostgreSQL 14
            // or later, built with it, as the common packages are); the default otherwise.
            if let Err(error) = client
                .batch_execute("SET default_toast_compression = 'lz4'")
                .await
            {
                tracing::debug!(%error, "store: lz4 not available; event chunks use the default compression");
            }
            self.client = Some(client);
        }
        self.client.as_mut().ok_or(StoreError::Closed)
    }
}

fn run(
    runtime: &tokio::runtime::Runtime,
    target: &Target,
    rx: &Receiver<Command>,
    pending: &AtomicU64,
    pending_events: &AtomicU64,
) {
    let mut connection = Connection { client: None };
    let mut batch = Vec::with_capacity(64);
    let mut retained: Vec<ChunkRow> = Vec::new();
    let mut closing = None;
    loop {
        // Events kept from a failed commit are tried again after a while even if nothing
        // new comes.
        let first = if retained.is_empty() {
            rx.recv().ok()
        } else {
            match rx.recv_timeout(RETRY_AFTER) {
                Ok(c) => Some(c),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => break,
            }
        };
        match first {
            Some(c) => batch.push(c),
            None if retained.is_empty() => break,
            None => {}
        }
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(c) => batch.push(c),
                Err(_) => break,
            }
        }
        let only_events = batch.iter().all(|c| matches!(c, Command::Event(..)));
        if !target.commit_delay.is_zero() && only_events && !batch.is_empty() {
            let now = Instant::now();
            let until = now.checked_add(target.commit_delay).unwrap_or(now);
            while batch.len() < MAX_BATCH {
                let left = until.saturating_duration_since(Instant::now());
                match rx.recv_timeout(left) {
                    Ok(c) => {
                        let event = matches!(c, Command::Event(..));
                        batch.push(c);
                        if !event {
                            break;
                        }
                    }
                    Err(_) => break,
                }
            }
        }
        if let Some(at) = batch.iter().position(|c| matches!(c, Command::Close(_)))
            && let Some(Command::Close(reply)) = batch.drain(at..).next()
        {
            closing = Some(reply);
        }
        let sent = batch
            .iter()
            .filter(|c| matches!(c, Command::Outcome(..) | Command::Event(..)))
            .count();
        let events = batch
            .iter()
            .filter(|c| matches!(c, Command::Event(..)))
            .count();
        runtime.block_on(commit(&mut connection, target, &mut batch, &mut retained));
        pending_events.fetch_sub(u64::try_from(events).unwrap_or(0), Ordering::AcqRel);
        pending.fetch_sub(u64::try_from(sent).unwrap_or(0), Ordering::AcqRel);
        if closing.is_some() {
            break;
        }
    }
    if !retained.is_empty() {
        let lost: usize = retained.len();
        tracing::error!(
            chunks = lost,
            "store: closing with event chunks that could not be written; they are lost"
        );
    }
    drop(connection);
    runtime.block_on(tokio::task::yield_now());
    if let Some(reply) = closing {
        let _ = reply.send(());
    }
}

/// A session of the batch, as locked: where its outcomes go, whether they are still
/// taken, and what the batch adds.
struct Locked {
    key: i64,
    finalizing: bool,
    fence: Option<Fence>,
    /// The session's last `ord` before this batch.
    seq: i64,
    /// Outcomes of this batch for it (their `ord`s follow `seq`).
    sent: i64,
    counts: OutcomeCounts,
}

/// One outcome on its way into the batch's insert.
struct Outcome {
    id: SessionId,
    fence: Fence,
    record: OutcomeRecord,
    answer: OutcomeAnswer,
    /// `Some`: refused before the insert (fenced, claimed, unknown session).
    refused: Option<StoreError>,
}

async fn commit(
    connection: &mut Connection,
    target: &Target,
    batch: &mut Vec<Command>,
    retained: &mut Vec<ChunkRow>,
) {
    let mut outcomes = Vec::new();
    let mut flushes = Vec::new();
    let mut chunks = Chunks::default();
    for command in batch.drain(..) {
        match command {
            Command::Outcome(id, fence, record, answer) => outcomes.push(Outcome {
                id,
                fence,
                record,
                answer,
                refused: None,
            }),
            Command::Event(fence, event) => chunks.add(fence, &event),
            Command::Flush(reply) => flushes.push(reply),
            Command::Close(reply) => drop(reply),
        }
    }
    let mut rows = std::mem::take(retained);
    rows.extend(chunks.take());
    let mut result = write(connection, target, &mut outcomes, &rows, false).await;
    if result.as_ref().is_err_and(duplicate) {
        // A resource with an outcome already (a retried write whose first try committed,
        // or two in this batch): the batch again, keeping the first of each.
        for o in &mut outcomes {
            o.refused = None;
        }
        result = write(connection, target, &mut outcomes, &rows, true).await;
    }
    let error = result.err().map(|e| e.to_string());
    if let Some(e) = &error {
        tracing::error!(
            error = %e,
            outcomes = outcomes.len(),
            event_chunks = rows.len(),
            "store: a batch could not be committed; its outcomes are answered with the \
             error, its events kept for the next batch"
        );
        *retained = keep_newest(rows);
    }
    let failed = |e: &str| StoreError::Backend(format!("commit failed: {e}").into());
    for o in outcomes {
        o.answer.send(match (o.refused, &error) {
            (Some(refusal), _) => Err(refusal),
            (None, Some(e)) => Err(failed(e)),
            (None, None) => Ok(()),
        });
    }
    for reply in flushes {
        let _ = reply.send(match &error {
            Some(e) => Err(failed(e)),
            None => Ok(()),
        });
    }
}

/// The newest chunks holding at most [`MAX_RETAINED_EVENTS`] events, in order.
fn keep_newest(rows: Vec<ChunkRow>) -> Vec<ChunkRow> {
    let mut events = 0usize;
    let mut keep = Vec::new();
    let all = rows.len();
    for row in rows.into_iter().rev() {
        let n = usize::try_from(row.last.saturating_sub(row.first).saturating_add(1)).unwrap_or(1);
        events = events.saturating_add(n);
        if events > MAX_RETAINED_EVENTS {
            break;
        }
        keep.push(row);
    }
    if keep.len() < all {
        tracing::error!(
            dropped_chunks = all - keep.len(),
            "store: too many events waiting for the database; the oldest are dropped"
        );
    }
    keep.reverse();
    keep
}

/// Whether the error is a unique violation (an outcome for a resource that has one).
fn duplicate(e: &StoreError) -> bool {
    let StoreError::Backend(source) = e else {
        return false;
    };
    source
        .downcast_ref::<tokio_postgres::Error>()
        .and_then(tokio_postgres::Error::code)
        .is_some_and(|c| *c == tokio_postgres::error::SqlState::UNIQUE_VIOLATION)
}

/// Writes the batch in one transaction. Refusals are set on the outcomes; the result is
/// the transaction's. Outcomes are inserted plainly (a conflict fails the batch, which is
/// then written again with `dedupe`): `ON CONFLICT` costs a third of every insert, for a
/// case that almost never happens.
async fn write(
    connection: &mut Connection,
    target: &Target,
    outcomes: &mut [Outcome],
    rows: &[ChunkRow],
    dedupe: bool,
) -> Result<(), StoreError> {
    if outcomes.is_empty() && rows.is_empty() {
        return Ok(());
    }
    let q = |sql: &str| qualify(sql, &target.schema);
    let client = connection.get(&target.config).await?;
    let tx = client.transaction().await.map_err(backend)?;
    if !outcomes.is_empty() {
        // The sessions' rows, locked in key order (no deadlock with another batch or a
        // claim): a claim cannot slip in between this read and the insert.
        let mut ids: Vec<uuid::Uuid> = outcomes.iter().map(|o| o.id.0).collect();
        ids.sort_unstable();
        ids.dedup();
        let locked = tx
            .query(
                &q(
                    "SELECT id, key, finalizing IS NOT NULL, owner, epoch, outcome_seq \
                    FROM @.sessions WHERE id = ANY($1) ORDER BY key FOR NO KEY UPDATE",
                ),
                &[&ids],
            )
            .await
            .map_err(backend)?;
        let mut sessions: HashMap<SessionId, Locked, IdHasher> = HashMap::default();
        for row in &locked {
            let id = SessionId(row.try_get(0).map_err(backend)?);
            let owner: Option<uuid::Uuid> = row.try_get(3).map_err(backend)?;
            let epoch: i64 = row.try_get(4).map_err(backend)?;
            let fence = owner.map(|node| Fence {
                node: crate::model::NodeId(node),
                epoch: u64::try_from(epoch).unwrap_or(0),
            });
            sessions.insert(
                id,
                Locked {
                    key: row.try_get(1).map_err(backend)?,
                    finalizing: row.try_get(2).map_err(backend)?,
                    fence,
                    seq: row.try_get(5).map_err(backend)?,
                    sent: 0,
                    counts: OutcomeCounts::default(),
                },
            );
        }
        let mut ords = Vec::with_capacity(outcomes.len());
        let mut keys = Vec::with_capacity(outcomes.len());
        let mut resources = Vec::with_capacity(outcomes.len());
        let mut names = Vec::with_capacity(outcomes.len());
        let mut details = Vec::with_capacity(outcomes.len());
        let mut attempts = Vec::with_capacity(outcomes.len());
        let mut elapsed = Vec::with_capacity(outcomes.len());
        for o in outcomes.iter_mut() {
            let refusal = match sessions.get_mut(&o.id) {
                None => Some(StoreError::UnknownSession { session_id: o.id }),
                Some(l) if l.fence != Some(o.fence) => Some(StoreError::Fenced {
                    session_id: o.id,
                    fence: o.fence,
                    holder: l.fence,
                }),
                Some(l) if l.finalizing => Some(StoreError::Finalizing { session_id: o.id }),
                Some(l) => {
                    let (name, detail) = outcome_columns(&o.record.outcome);
                    l.sent += 1;
                    ords.push(l.seq.saturating_add(l.sent));
                    if !dedupe {
                        l.counts.add(&o.record.outcome);
                    }
                    keys.push(l.key);
                    resources.push(o.record.resource_id.as_str());
                    names.push(name);
                    details.push(detail);
                    attempts.push(i64::from(o.record.attempts));
                    elapsed.push(nanos(o.record.elapsed));
                    None
                }
            };
            o.refused = refusal;
        }
        if !keys.is_empty() {
            let columns = "INSERT INTO @.outcomes \
                (session_key, resource_id, ord, outcome, detail, attempts, elapsed_ns) \
                SELECT * FROM unnest($1::int8[], $2::text[], $3::int8[], $4::text[], \
                    $5::text[], $6::int8[], $7::int8[])";
            let params: [&(dyn tokio_postgres::types::ToSql + Sync); 7] = [
                &keys, &resources, &ords, &names, &details, &attempts, &elapsed,
            ];
            if dedupe {
                // The first outcome of each resource is kept, and counted.
                let inserted = tx
                    .query(
                        &q(&format!(
                            "{columns} ON CONFLICT (session_key, resource_id) DO NOTHING \
                             RETURNING session_key, outcome"
                        )),
                        &params,
                    )
                    .await
                    .map_err(backend)?;
                let by_key: HashMap<i64, SessionId> =
                    sessions.iter().map(|(id, l)| (l.key, *id)).collect();
                for row in &inserted {
                    let key: i64 = row.try_get(0).map_err(backend)?;
                    let name: &str = row.try_get(1).map_err(backend)?;
                    if let Some(l) = by_key.get(&key).and_then(|id| sessions.get_mut(id))
                        && let Some(outcome) = crate::store::columns::outcome_named(name, None)
                    {
                        l.counts.add(&outcome);
                    }
                }
            } else {
                tx.execute(&q(columns), &params).await.map_err(backend)?;
            }
            let mut columns: [Vec<i64>; 8] = Default::default();
            for l in sessions.values().filter(|l| l.sent > 0) {
                let c = l.counts;
                for (column, value) in columns.iter_mut().zip([
                    l.key,
                    count(c.succeeded),
                    count(c.failed),
                    count(c.panicked),
                    count(c.timed_out),
                    count(c.cancelled),
                    count(c.lost),
                    l.sent,
                ]) {
                    column.push(value);
                }
            }
            let [k, su, fa, pa, ti, ca, lo, se] = &columns;
            tx.execute(
                &q("UPDATE @.sessions s SET succeeded = s.succeeded + v.su, \
                    failed = s.failed + v.fa, panicked = s.panicked + v.pa, \
                    timed_out = s.timed_out + v.ti, cancelled = s.cancelled + v.ca, \
                    lost = s.lost + v.lo, outcome_seq = s.outcome_seq + v.se \
                    FROM unnest($1::int8[], $2::int8[], $3::int8[], $4::int8[], $5::int8[], \
                        $6::int8[], $7::int8[], $8::int8[]) AS v(k, su, fa, pa, ti, ca, lo, se) \
                    WHERE s.key = v.k"),
                &[k, su, fa, pa, ti, ca, lo, se],
            )
            .await
            .map_err(backend)?;
        }
    }
    if !rows.is_empty() {
        let ids: Vec<uuid::Uuid> = rows.iter().map(|r| r.session.0).collect();
        let owners: Vec<uuid::Uuid> = rows.iter().map(|r| r.fence.node.0).collect();
        let epochs: Vec<i64> = rows.iter().map(|r| epoch_value(r.fence.epoch)).collect();
        let firsts: Vec<i64> = rows.iter().map(|r| r.first).collect();
        let lasts: Vec<i64> = rows.iter().map(|r| r.last).collect();
        let bodies: Vec<&str> = rows.iter().map(|r| r.body.as_str()).collect();
        // Only under the fence the events were appended with: a chunk of a session its
        // node no longer holds (or that does not exist) inserts nothing.
        tx.execute(
            &q(
                "INSERT INTO @.event_chunks (session_key, first_seq, last_seq, body) \
                SELECT s.key, v.f, v.l, v.b FROM unnest($1::uuid[], $2::uuid[], $3::int8[], \
                    $4::int8[], $5::int8[], $6::text[]) AS v(id, owner, epoch, f, l, b) \
                JOIN @.sessions s ON s.id = v.id AND s.owner = v.owner AND s.epoch = v.epoch \
                ON CONFLICT (session_key, first_seq) DO NOTHING",
            ),
            &[&ids, &owners, &epochs, &firsts, &lasts, &bodies],
        )
        .await
        .map_err(backend)?;
        let mut sessions = ids;
        sessions.sort_unstable();
        sessions.dedup();
        // Followers on other nodes wake at the commit (see `listen`).
        tx.execute(
            "SELECT pg_notify($1, x::text) FROM unnest($2::uuid[]) AS x",
            &[&target.events_channel, &sessions],
        )
        .await
        .map_err(backend)?;
    }
    tx.commit().await.map_err(backend)
}
