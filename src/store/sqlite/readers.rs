//! Read connections of the SQLite store: reads never queue behind writes.
//!
//! Every write goes through the one writer thread (see `writer`). Reads used to as well, so
//! a reader of a long log held that thread (20 readers replaying a 100,000-event session
//! made starting a session take 29 s), a monitor's look at its session waited behind a
//! batch of outcomes, and a read that shared a batch with writes the disk had no room for
//! failed with them. Here each read runs on a connection of its own, in WAL mode: it sees
//! the last commit (everything acknowledged) and neither waits for nor blocks the writer.
//!
//! A small pool, [`READERS`] connections opened on first use and kept; a read borrows one
//! on the blocking pool and gives it back. Each read is one read transaction, so what it
//! reads in several statements is one snapshot.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};
use tokio::sync::Semaphore;

use crate::error::StoreError;
use crate::store::sqlite::rows::backend;

/// Read connections at most: reads beyond wait for one (never for the writer).
pub(crate) const READERS: usize = 4;

pub(crate) struct Readers {
    path: PathBuf,
    busy_timeout: Duration,
    idle: Mutex<Vec<Connection>>,
    /// One permit per connection; closed with the store.
    permits: Semaphore,
}

impl Readers {
    pub(crate) fn new(path: PathBuf, busy_timeout: Duration) -> Arc<Self> {
        Arc::new(Self {
            path,
            busy_timeout,
            idle: Mutex::new(Vec::new()),
            permits: Semaphore::new(READERS),
        })
    }

    fn idle(&self) -> MutexGuard<'_, Vec<Connection>> {
        // A poisoned lock only means a panic while a connection was pushed or popped.
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on a read connection, in one read transaction, off the async runtime.
    pub(crate) async fn read<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| StoreError::Closed)?;
        let this = Arc::clone(self);
        let done = tokio::task::spawn_blocking(move || {
            let popped = this.idle().pop();
            let conn = match popped {
                Some(conn) => conn,
                None => this.open()?,
            };
            // From the connection's statement cache: `execute_batch` parsed both anew on
            // every read.
            let run = |sql: &str| conn.prepare_cached(sql).and_then(|mut s| s.execute([]));
            let result = run("BEGIN").map_err(backend).and_then(|_| f(&conn));
            // A read transaction commits nothing; ending it lets the WAL be checkpointed.
            let ended = run("COMMIT");
            if ended.is_ok() {
                this.idle().push(conn);
            }
            result
        })
        .await
        .map_err(|e| StoreError::Backend(Box::new(e)));
        drop(permit);
        done?
    }

    fn open(&self) -> Result<Connection, StoreError> {
        // Read-write flags with `query_only`: a WAL reader needs to write the shared-memory
        // index, and `query_only` makes any write through this connection an error.
        let conn = Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(backend)?;
        conn.busy_timeout(self.busy_timeout).map_err(backend)?;
        conn.pragma_update(None, "query_only", true)
            .map_err(backend)?;
        Ok(conn)
    }

    /// Closes every idle connection and refuses later reads (`Closed`); reads under way
    /// finish and drop theirs.
    pub(crate) fn close(&self) {
        self.permits.close();
        self.idle().clear();
    }
}
