//! The SQLite store's one connection, on a thread of its own, with group commit.
//!
//! Every operation is a job sent to this thread. The thread takes whatever is queued (up to
//! [`MAX_BATCH`]), runs it in one transaction, each job inside a savepoint so a failing job
//! rolls back alone, commits once, and only then answers the callers: an answer means
//! "durable". Under load one commit (one fsync) serves hundreds of operations; alone, an
//! operation waits for nobody. Event appends need no answer: when a batch holds nothing but
//! events, the thread waits up to `commit_delay` for more before committing, which is the
//! most a crash can lose of the audit trail (and never anything acknowledged: use
//! `flush` as a barrier).
//!
//! Events and outcomes are the bulk of the writes, so they are not opaque jobs: a batch's
//! events of one session become one row of `event_chunks` (JSON lines), and its outcomes
//! one insert each plus one counter update per session (see [`super::batch`]). Counts are
//! written before any job runs (a job may read them), so every job still sees everything
//! sent before it. Reads do not come here: they run on connections of their own
//! (`readers`), and see what is committed; [`Writer::events_pending`] tells a reader of
//! events whether a barrier is needed first.
//!
//! Blocking I/O never runs on the async runtime: callers only send and await an answer.
//!
//! A full disk: the writer keeps a reserve of room (see [`super::reserve`]). When a commit
//! fails for want of space it lets the reserve go and, until it can take it back, writes
//! no bulk: events are dropped and outcome writes refused (the sessions keep them in
//! memory), so that every byte left goes to the jobs that keep nodes and sessions alive
//! (lease renewals, claims, completions).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::time::{Duration, Instant};

use rusqlite::Connection;
use tokio::sync::oneshot;

use crate::error::StoreError;
use crate::events::SessionEvent;
use crate::model::{Fence, OutcomeRecord, SessionId};
use crate::store::chunks::Chunks;
use crate::store::sqlite::batch::{Tallies, write_chunks};
use crate::store::sqlite::reserve::Reserve;
use crate::store::{OutcomeAnswer, OutcomeReceipt};

/// Most operations in one transaction: bounds the latency a batch adds to its first job.
pub(crate) const MAX_BATCH: usize = 4096;

/// Operations queued at most; a full queue makes senders wait (backpressure from the disk).
pub(crate) const QUEUE: usize = 16 * 1024;

/// What to do after the batch's commit: answer the caller with the job's result, or with
/// the commit's error.
type Answer = Box<dyn FnOnce(Option<&str>) + Send>;

/// A job run inside the batch transaction, or told why it cannot run (the transaction
/// could not begin; the disk is full and it is bulk). A job that did not end
/// [`Ran::Done`] has its savepoint rolled back.
type Job = Box<dyn FnOnce(Result<&Connection, StoreError>) -> (Ran, Answer) + Send>;

/// How a job ended.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Ran {
    Done,
    Failed,
    /// Failed for want of room on the disk: the disk is full, as when a commit fails so.
    NoRoom,
}

/// Whether a job is refused while the disk is full.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Room {
    /// Small, and it keeps nodes and sessions alive (a renewal, a claim, a completion).
    Vital,
    /// It may write much (a new session's resources, outcomes a completion carries).
    Bulk,
}

pub(crate) enum Command {
    /// An operation whose caller waits for the answer.
    Job(Job, Room),
    /// A final outcome to record; answered after the commit.
    Outcome(SessionId, Fence, OutcomeRecord, OutcomeAnswer),
    /// An event to append (serialized on this thread, into its chunk); nobody waits.
    Event(Fence, SessionEvent),
    /// Answer once everything sent before is committed.
    Flush(oneshot::Sender<Result<(), StoreError>>),
    /// Commit what is queued, close the connection (checkpointing the WAL), then answer.
    Close(oneshot::Sender<()>),
}

impl Command {
    fn waits(&self) -> bool {
        !matches!(self, Command::Event(..))
    }
}

/// The sending half, held by the store.
#[derive(Clone)]
pub(crate) struct Writer {
    tx: SyncSender<Command>,
    /// Events sent and not yet through a commit (committed, or lost with a failed one).
    pending_events: Arc<AtomicU64>,
    /// The disk is full: bulk is refused (see [`Disk`]).
    full: Arc<AtomicBool>,
}

impl Writer {
    /// Starts the thread that owns `conn`; `reserve` is the disk room it holds (or could
    /// not take at open).
    pub(crate) fn spawn(
        conn: Connection,
        commit_delay: Duration,
        reserve: Reserve,
        busy_timeout: Duration,
    ) -> std::io::Result<Self> {
        let (tx, rx) = std::sync::mpsc::sync_channel(QUEUE);
        let pending_events = Arc::new(AtomicU64::new(0));
        let pending = Arc::clone(&pending_events);
        let disk = Disk::new(reserve, busy_timeout);
        let full = Arc::clone(&disk.shown);
        std::thread::Builder::new()
            .name("harvest-store".into())
            .spawn(move || run(conn, rx, commit_delay, &pending, disk))?;
        Ok(Self {
            tx,
            pending_events,
            full,
        })
    }

    /// Whether the disk is full and bulk is refused.
    pub(crate) fn disk_full(&self) -> bool {
        self.full.load(Ordering::Relaxed)
    }

    /// Whether events were appended that no commit has taken yet.
    pub(crate) fn events_pending(&self) -> bool {
        self.pending_events.load(Ordering::Acquire) > 0
    }

    /// Runs `f` on the connection inside the next batch; answers after the commit.
    pub(crate) async fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        self.call_with(Room::Vital, f).await
    }

    /// [`Self::call`] for a job of either kind: a bulk one is refused (`DiskFull`) while
    /// the disk is full.
    pub(crate) async fn call_with<T: Send + 'static>(
        &self,
        room: Room,
        f: impl FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::Job(job(f, reply), room))?;
        answer.await.map_err(|_| StoreError::Closed)?
    }

    /// Records a final outcome in the next batch; answers after the commit. Fails with
    /// `Finalizing` once the session is claimed for finalization.
    pub(crate) async fn outcome(
        &self,
        id: SessionId,
        fence: Fence,
        outcome: OutcomeRecord,
    ) -> Result<(), StoreError> {
        self.queue_outcome(id, fence, outcome).answer().await
    }

    /// [`Self::outcome`] without waiting: the receipt is answered after the commit (a
    /// write that cannot be sent drops its answer, which reads as `Closed`).
    pub(crate) fn queue_outcome(
        &self,
        id: SessionId,
        fence: Fence,
        outcome: OutcomeRecord,
    ) -> OutcomeReceipt {
        let (answer, receipt) = OutcomeReceipt::new();
        let _ = self.send(Command::Outcome(id, fence, outcome, answer));
        receipt
    }

    /// Queues an event for its session's chunk; never waits unless the queue is full.
    pub(crate) fn event(&self, fence: Fence, event: SessionEvent) -> Result<(), StoreError> {
        self.pending_events.fetch_add(1, Ordering::AcqRel);
        let sent = self.send(Command::Event(fence, event));
        if sent.is_err() {
            self.pending_events.fetch_sub(1, Ordering::AcqRel);
        }
        sent
    }

    /// Commits what is queued and closes the connection; later calls get `Closed`.
    pub(crate) async fn close(&self) -> Result<(), StoreError> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::Close(reply))?;
        answer.await.map_err(|_| StoreError::Closed)
    }

    /// Waits until everything sent before is committed.
    pub(crate) async fn flush(&self) -> Result<(), StoreError> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::Flush(reply))?;
        answer.await.map_err(|_| StoreError::Closed)?
    }

    fn send(&self, command: Command) -> Result<(), StoreError> {
        match self.tx.try_send(command) {
            Ok(()) => Ok(()),
            // Backpressure: the disk is behind by a whole queue. Wait for room rather than
            // drop an operation, and on a multi-thread runtime outside its scheduler, so
            // that its other tasks (timers, deadlines) go on meanwhile.
            Err(TrySendError::Full(command)) => {
                blocking(|| self.tx.send(command).map_err(|_| StoreError::Closed))
            }
            Err(TrySendError::Disconnected(_)) => Err(StoreError::Closed),
        }
    }
}

/// Runs `f`, which may block, off the scheduler of a multi-thread runtime (a current-thread
/// runtime has nowhere else to run its tasks: there it simply blocks).
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

fn run(
    conn: Connection,
    rx: Receiver<Command>,
    commit_delay: Duration,
    pending: &AtomicU64,
    mut disk: Disk,
) {
    let mut batch = Vec::with_capacity(64);
    let mut closing = None;
    while let Ok(first) = rx.recv() {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(c) => batch.push(c),
                Err(_) => break,
            }
        }
        if !commit_delay.is_zero() && !batch.iter().any(Command::waits) {
            let now = Instant::now();
            // `open_with` bounds the delay; past the clock's range, commit at once.
            let until = now.checked_add(commit_delay).unwrap_or(now);
            while batch.len() < MAX_BATCH {
                let left = until.saturating_duration_since(Instant::now());
                match rx.recv_timeout(left) {
                    Ok(c) => {
                        let waits = c.waits();
                        batch.push(c);
                        if waits {
                            break;
                        }
                    }
                    Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
                }
            }
        }
        // Only once the whole batch is gathered (the wait above may have added the close):
        // nothing after a close request runs; its senders see `Closed`.
        if let Some(at) = batch.iter().position(|c| matches!(c, Command::Close(_)))
            && let Some(Command::Close(reply)) = batch.drain(at..).next()
        {
            closing = Some(reply);
        }
        let events = batch
            .iter()
            .filter(|c| matches!(c, Command::Event(..)))
            .count();
        disk.write(&conn, &mut batch);
        // Committed, or lost with a failed commit: either way no longer pending.
        pending.fetch_sub(u64::try_from(events).unwrap_or(0), Ordering::AcqRel);
        if closing.is_some() {
            break;
        }
    }
    if let Err((_, e)) = conn.close() {
        tracing::error!(error = %e, "store: closing the database failed");
    }
    disk.reserve.release();
    if let Some(reply) = closing {
        let _ = reply.send(());
    }
}

/// How long after the disk was last full the writer still commits vital jobs apart from
/// bulk (see [`Disk::write`]).
const PRESSURE: Duration = Duration::from_secs(60);

/// The writer's room on its disk. "Full" means the reserve is not held: bulk is refused.
struct Disk {
    reserve: Reserve,
    /// When a commit last failed for want of space.
    last_full: Option<Instant>,
    /// The connection's wait for other processes' locks (a checkpoint does not wait).
    busy_timeout: Duration,
    /// Whether it is full, for the store's readers ([`Writer::disk_full`]).
    shown: Arc<AtomicBool>,
}

impl Disk {
    fn new(reserve: Reserve, busy_timeout: Duration) -> Self {
        // Without the reserve's room (a disk already full at open), no bulk is written
        // until the room is there.
        let full = !reserve.is_held();
        Self {
            reserve,
            last_full: full.then(Instant::now),
            busy_timeout,
            shown: Arc::new(AtomicBool::new(full)),
        }
    }

    fn full(&self) -> bool {
        !self.reserve.is_held()
    }

    /// The reserve, while the disk is full (bulk is then refused).
    fn refusing(&self) -> Option<&Reserve> {
        self.full().then_some(&self.reserve)
    }

    /// Commits `batch`. Normally as one transaction. While the disk is full, vital jobs
    /// only (bulk refused). For a while after it was full (the room is back but may go
    /// again), in segments, each run of vital jobs in a transaction of its own, so that a
    /// bulk write that finds the disk full again fails alone: the writes after it are
    /// then committed (vital) or refused (bulk) as when full. Order is kept either way:
    /// every job still sees what was sent before it, committed or refused.
    fn write(&mut self, conn: &Connection, batch: &mut Vec<Command>) {
        let now = Instant::now();
        if self.reserve.retake_due(now) && retake(conn, &mut self.reserve, self.busy_timeout) {
            self.shown.store(false, Ordering::Relaxed);
        }
        let pressure = self
            .last_full
            .is_some_and(|at| now.saturating_duration_since(at) < PRESSURE);
        if self.full() || !pressure {
            let failed = commit(conn, batch, self.refusing());
            self.failed_for_room(conn, failed);
            return;
        }
        let mut rest = std::mem::take(batch).into_iter().peekable();
        let mut segment = Vec::new();
        while let Some(first) = rest.next() {
            let vital = is_vital(&first);
            segment.push(first);
            while let Some(next) = rest.next_if(|c| is_vital(c) == vital) {
                segment.push(next);
            }
            let failed = commit(conn, &mut segment, self.refusing());
            self.failed_for_room(conn, failed);
        }
    }

    /// After a commit: if it failed for want of space, lets the reserve go.
    fn failed_for_room(&mut self, conn: &Connection, failed: bool) {
        if !failed {
            return;
        }
        self.last_full = Some(Instant::now());
        if self.full() {
            return;
        }
        self.reserve.release();
        self.shown.store(true, Ordering::Relaxed);
        tracing::error!(
            reserve_bytes = self.reserve.bytes(),
            "store: the disk is full: the reserve is released for lease renewals, claims \
             and completions; events, outcomes and new sessions are refused until there is \
             room for the reserve again"
        );
        checkpoint(conn, self.busy_timeout);
    }
}

/// `f` as a job of the batch, answering on `reply`.
fn job<T: Send + 'static>(
    f: impl FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    reply: oneshot::Sender<Result<T, StoreError>>,
) -> Job {
    Box::new(move |conn| {
        let result = conn.and_then(f);
        let ran = match &result {
            Ok(_) => Ran::Done,
            Err(e) if is_no_room(e) => Ran::NoRoom,
            Err(_) => Ran::Failed,
        };
        // A job that failed was rolled back to its savepoint and changed nothing: its
        // own error is the answer whether or not the batch then committed (a busy
        // harvester stays `HarvesterBusy` on a full disk).
        let answer: Answer = Box::new(move |commit_error| {
            let _ = reply.send(match (commit_error, result) {
                (_, Err(e)) => Err(e),
                (Some(e), Ok(_)) => Err(StoreError::Backend(format!("commit failed: {e}").into())),
                (None, ok) => ok,
            });
        });
        (ran, answer)
    })
}

/// Whether a job's error is SQLite's "database or disk is full" (a large job can meet it
/// before the commit, when its pages spill to the log).
pub(super) fn is_no_room(e: &StoreError) -> bool {
    match e {
        StoreError::Backend(source) => source
            .downcast_ref::<rusqlite::Error>()
            .is_some_and(is_disk_full),
        _ => false,
    }
}

fn is_vital(command: &Command) -> bool {
    matches!(command, Command::Job(_, Room::Vital))
}

/// Moves the write-ahead log into the main file and truncates it, if it can: after a
/// commit failed for want of space, the log's tail (the failed transaction's pages) is
/// room only the log can reuse; truncated, any write can.
fn checkpoint(conn: &Connection, busy_timeout: Duration) {
    // Never waiting for readers (without the locks it needs, a TRUNCATE checkpoint does
    // what a passive one does): the renewals queued behind it must not wait.
    let _ = conn.busy_timeout(Duration::ZERO);
    let done = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |row| {
        row.get::<_, i64>(0)
    });
    let _ = conn.busy_timeout(busy_timeout);
    match done {
        Ok(0) => {}
        // Busy: a reader holds an old snapshot; the next attempt may pass.
        Ok(_) => tracing::debug!("store: the checkpoint could not finish (a reader is busy)"),
        Err(e) => tracing::warn!(error = %e, "store: could not checkpoint the write-ahead log"),
    }
}

/// Tries to take the reserve back (checkpointing first, which may free room); `true`
/// when it holds it again.
fn retake(conn: &Connection, reserve: &mut Reserve, busy_timeout: Duration) -> bool {
    checkpoint(conn, busy_timeout);
    match reserve.take() {
        Ok(()) => {
            tracing::warn!(
                reserve_bytes = reserve.bytes(),
                "store: there is room on the disk again: the reserve is held, events and \
                 outcomes are written again"
            );
            true
        }
        Err(e) => {
            tracing::debug!(error = %e, "store: still no room for the reserve");
            false
        }
    }
}

/// Whether SQLite failed for want of space.
fn is_disk_full(e: &rusqlite::Error) -> bool {
    e.sqlite_error_code() == Some(rusqlite::ErrorCode::DiskFull)
}

/// Runs a statement without parameters or rows, from the connection's statement cache.
fn run_cached(conn: &Connection, sql: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(sql)?.execute([]).map(drop)
}

/// Runs and commits one batch; `refuse_bulk` (the disk is full) drops its events and
/// refuses its outcomes. `true` when it failed for want of space.
fn commit(conn: &Connection, batch: &mut Vec<Command>, refuse_bulk: Option<&Reserve>) -> bool {
    let mut answers: Vec<Answer> = Vec::with_capacity(batch.len());
    let mut recorded = Vec::new();
    let mut flushes = Vec::new();
    let mut chunks = Chunks::default();
    let mut tallies = Tallies::default();
    // A gathered write that failed: the batch rolls back rather than commit half of it.
    let mut failed: Option<rusqlite::Error> = None;
    // Bulk this batch did not write (a flush in it fails: not everything is committed).
    let mut dropped = false;
    // A write failed for want of room: the disk is full, whether or not the rest commits.
    let mut no_room = false;
    // SQLite rolled the whole transaction back itself (it does on a full disk met by a
    // statement without a statement journal, on an I/O error): nothing more may run on
    // the connection in this batch, since each statement would commit on its own.
    let mut gone = false;
    let begun = conn.execute_batch("BEGIN IMMEDIATE");
    if let Err(e) = &begun {
        tracing::error!(error = %e, "store: could not begin a transaction");
    }
    let lost = || StoreError::Backend("the batch's transaction was rolled back".into());
    for command in batch.drain(..) {
        match command {
            Command::Job(job, Room::Bulk) if let Some(reserve) = refuse_bulk => {
                answers.push(job(Err(reserve.refusal())).1);
            }
            Command::Job(job, _) if begun.is_err() => answers.push(job(Err(StoreError::Closed)).1),
            Command::Job(job, _) if gone => answers.push(job(Err(lost())).1),
            Command::Job(job, _) => {
                if let Err(e) = tallies.write(conn) {
                    no_room |= is_disk_full(&e);
                    failed.get_or_insert(e);
                }
                if conn.is_autocommit() {
                    gone = true;
                    answers.push(job(Err(lost())).1);
                    continue;
                }
                // Prepared once and reused: parsing these twice per job was a tenth of the
                // writer's time.
                if let Err(e) = run_cached(conn, "SAVEPOINT job") {
                    tracing::error!(error = %e, "store: savepoint failed");
                    answers.push(job(Err(StoreError::Closed)).1);
                    continue;
                }
                let (ran, answer) = job(Ok(conn));
                no_room |= ran == Ran::NoRoom;
                let ended = if ran == Ran::Done {
                    run_cached(conn, "RELEASE job")
                } else {
                    run_cached(conn, "ROLLBACK TO job")
                        .and_then(|()| run_cached(conn, "RELEASE job"))
                };
                if let Err(e) = ended {
                    tracing::error!(error = %e, "store: savepoint failed");
                }
                answers.push(answer);
            }
            Command::Outcome(_, _, _, reply) if let Some(reserve) = refuse_bulk => {
                dropped = true;
                reply.send(Err(reserve.refusal()));
            }
            Command::Outcome(_, _, _, reply) if begun.is_err() => {
                reply.send(Err(StoreError::Closed));
            }
            Command::Outcome(_, _, _, reply) if gone => reply.send(Err(lost())),
            Command::Outcome(id, fence, outcome, reply) => {
                let result = tallies.record(conn, id, fence, &outcome);
                no_room |= result.as_ref().is_err_and(is_no_room);
                recorded.push((reply, result));
            }
            Command::Event(..) if refuse_bulk.is_some() => dropped = true,
            Command::Event(..) if begun.is_err() || gone => {}
            Command::Event(fence, event) => chunks.add(fence, &event),
            Command::Flush(reply) => flushes.push(reply),
            // Taken out of the batch by `run` before it commits.
            Command::Close(reply) => drop(reply),
        }
        if begun.is_ok() && !gone && conn.is_autocommit() {
            gone = true;
        }
    }
    if begun.is_ok() && !gone {
        write_chunks(conn, &mut chunks);
        if let Err(e) = tallies.write(conn) {
            no_room |= is_disk_full(&e);
            failed.get_or_insert(e);
        }
        gone = conn.is_autocommit();
    }
    if gone {
        tracing::error!(
            no_room,
            "store: SQLite rolled the batch's transaction back; its writes are answered as \
             failed"
        );
    }
    let committed = match (begun, failed) {
        // Rolled back already: nothing to commit, nothing to roll back.
        (Ok(()), _) if gone => Err(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(if no_room {
                rusqlite::ffi::SQLITE_FULL
            } else {
                rusqlite::ffi::SQLITE_ABORT
            }),
            Some("the batch's transaction was rolled back".into()),
        )),
        (Ok(()), None) => conn.execute_batch("COMMIT").inspect_err(|_| {
            // Leave no half transaction behind for the next batch.
            let _ = conn.execute_batch("ROLLBACK");
        }),
        (Ok(()), Some(e)) => {
            tracing::error!(error = %e, "store: could not count outcomes; rolling back the batch");
            let _ = conn.execute_batch("ROLLBACK");
            Err(e)
        }
        (Err(e), _) => Err(e),
    };
    let disk_full = no_room || committed.as_ref().err().is_some_and(is_disk_full);
    let error = committed.err().map(|e| e.to_string());
    let commit_failed = |e: &str| StoreError::Backend(format!("commit failed: {e}").into());
    for answer in answers {
        answer(error.as_deref());
    }
    for (reply, result) in recorded {
        reply.send(match &error {
            Some(e) => Err(commit_failed(e)),
            None => result,
        });
    }
    for reply in flushes {
        let _ = reply.send(match (&error, refuse_bulk) {
            (Some(e), _) => Err(commit_failed(e)),
            (None, Some(reserve)) if dropped => Err(reserve.refusal()),
            (None, _) => Ok(()),
        });
    }
    disk_full
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A database at `dir` with a table `t`, in WAL mode, that may grow by only a few
    /// pages more (SQLite's `max_page_count`: a real "database or disk is full").
    fn tight(dir: &std::path::Path) -> (Connection, std::path::PathBuf) {
        let db = dir.join("h.db");
        let conn = Connection::open(&db).expect("open");
        conn.execute_batch("PRAGMA journal_mode = WAL; CREATE TABLE t (x BLOB)")
            .expect("schema");
        let pages: i64 = conn
            .query_row("PRAGMA page_count", [], |r| r.get(0))
            .expect("pages");
        conn.pragma_update(None, "max_page_count", pages + 4)
            .expect("limit");
        (conn, db)
    }

    /// A job inserting a blob of `bytes` into `t`.
    fn insert(bytes: usize, room: Room) -> (Command, oneshot::Receiver<Result<(), StoreError>>) {
        let (reply, answer) = oneshot::channel();
        let f = move |conn: &Connection| {
            conn.execute("INSERT INTO t VALUES (?1)", [vec![7u8; bytes]])
                .map(drop)
                .map_err(crate::store::sqlite::rows::backend)
        };
        (Command::Job(job(f, reply), room), answer)
    }

    fn rows(conn: &Connection) -> i64 {
        conn.query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .expect("count")
    }

    #[test]
    fn a_job_that_meets_a_full_disk_fails_its_whole_batch_and_lets_the_reserve_go() {
        let dir = tempfile::tempdir().expect("dir");
        let (conn, db) = tight(dir.path());
        let mut reserve = Reserve::new(&db, 4096);
        reserve.take().expect("room");
        let mut disk = Disk::new(reserve, Duration::from_millis(10));

        let (before, before_answer) = insert(10, Room::Vital);
        let (big, big_answer) = insert(1 << 20, Room::Bulk);
        let (after, after_answer) = insert(10, Room::Vital);
        let mut batch = vec![before, big, after];
        disk.write(&conn, &mut batch);

        // SQLite rolled the transaction back at the large insert: the job before it is
        // undone, and the one after it must not have run on its own (it would have
        // committed alone). Each is answered as failed.
        assert!(big_answer.blocking_recv().expect("answer").is_err());
        assert!(before_answer.blocking_recv().expect("answer").is_err());
        assert!(after_answer.blocking_recv().expect("answer").is_err());
        assert_eq!(rows(&conn), 0);
        assert!(conn.is_autocommit(), "no transaction left open");
        // The disk is full: the reserve goes to the vital writes, bulk is refused.
        assert!(disk.full());
        assert!(disk.shown.load(Ordering::Relaxed));
        assert!(!dir.path().join("h.db-reserve").exists());

        // Vital jobs still commit while it is full; bulk ones are refused.
        let (vital, vital_answer) = insert(10, Room::Vital);
        let (bulk, bulk_answer) = insert(10, Room::Bulk);
        let mut batch = vec![vital, bulk];
        disk.write(&conn, &mut batch);
        assert!(vital_answer.blocking_recv().expect("answer").is_ok());
        assert!(matches!(
            bulk_answer.blocking_recv().expect("answer"),
            Err(StoreError::DiskFull { .. })
        ));
        assert_eq!(rows(&conn), 1);
    }

    #[test]
    fn a_job_that_fails_otherwise_keeps_the_reserve() {
        let dir = tempfile::tempdir().expect("dir");
        let db = dir.path().join("h.db");
        let conn = Connection::open(&db).expect("open");
        let mut reserve = Reserve::new(&db, 4096);
        reserve.take().expect("room");
        let mut disk = Disk::new(reserve, Duration::from_millis(10));
        let (reply, answer) = oneshot::channel::<Result<(), StoreError>>();
        let mut batch = vec![Command::Job(
            job(|_| Err(StoreError::Backend("no such table".into())), reply),
            Room::Vital,
        )];
        disk.write(&conn, &mut batch);
        assert!(answer.blocking_recv().expect("answer").is_err());
        assert!(!disk.full());
    }
}
