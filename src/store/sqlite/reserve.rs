//! Room the store keeps on its disk for the writes that keep it alive.
//!
//! A disk can fill with the store's own bulk (a large session's outcomes and events) or
//! with anything else on it (a runaway log). Either way, SQLite then fails every commit,
//! and the small writes that matter most fail with the bulk: the node's lease renewal (a
//! node that cannot renew fences itself), a session's claim and completion. Worse, the
//! write-ahead log can end full of committed pages that no checkpoint can move into the
//! main file (that needs room too): once that happens no write passes again, however much
//! room later returns, if the bulk queued meanwhile takes it first.
//!
//! So the writer holds a file of [`Reserve::bytes`] beside the database
//! (`<database>-reserve`). When a commit fails for want of space it lets the file go (the
//! room goes to the jobs and the checkpoint) and stops writing bulk (events are dropped,
//! outcome writes refused: sessions keep them in memory and finalize from there); it
//! takes the room back, and writes bulk again, once there is room for the whole reserve.
//!
//! The file's content does not matter (it is written, not merely sized, so that the room
//! is really taken: a sparse file would take none; its bytes vary so that a compressing
//! file system takes it too). Deleting it by hand is harmless: the writer takes it again.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::error::StoreError;

/// How often a writer without its reserve tries to take it back.
pub(crate) const RETAKE_EVERY: Duration = Duration::from_secs(1);

/// The reserve file and whether this writer holds it.
pub(crate) struct Reserve {
    /// The database it serves.
    db: PathBuf,
    path: PathBuf,
    bytes: u64,
    held: bool,
    /// When the last attempt to take it failed, or it was let go.
    failed_at: Option<Instant>,
}

impl Reserve {
    /// The reserve of the database at `db` (not taken yet).
    pub(crate) fn new(db: &Path, bytes: u64) -> Self {
        let mut name = db.as_os_str().to_owned();
        name.push("-reserve");
        Self {
            db: db.to_path_buf(),
            path: PathBuf::from(name),
            bytes,
            held: false,
            failed_at: None,
        }
    }

    /// Whether the room is held (always, for a reserve of 0 bytes).
    pub(crate) fn is_held(&self) -> bool {
        self.held
    }

    /// The reserve's size.
    pub(crate) fn bytes(&self) -> u64 {
        self.bytes
    }

    /// What a refused write answers while the reserve is not held.
    pub(crate) fn refusal(&self) -> StoreError {
        StoreError::DiskFull {
            path: self.db.clone(),
            reserve_bytes: self.bytes,
        }
    }

    /// Whether an attempt to take it is due (never tried, or the last failed a while ago).
    pub(crate) fn retake_due(&self, now: Instant) -> bool {
        !self.held
            && self
                .failed_at
                .is_none_or(|at| now.saturating_duration_since(at) >= RETAKE_EVERY)
    }

    /// Takes the room: writes the whole file and syncs it. On failure (no room) nothing is
    /// left behind.
    pub(crate) fn take(&mut self) -> std::io::Result<()> {
        if self.held {
            return Ok(());
        }
        let written = if self.bytes == 0 {
            Ok(())
        } else if free_bytes(&self.path).is_some_and(|free| free < self.bytes) {
            // Not even tried: writing until the disk refuses would take, for a moment,
            // the last room of everything else on it (a log that then fails to write).
            Err(std::io::Error::new(
                std::io::ErrorKind::StorageFull,
                "less room on the disk than the reserve",
            ))
        } else {
            write_reserve(&self.path, self.bytes)
        };
        match written {
            Ok(()) => {
                self.held = true;
                self.failed_at = None;
                Ok(())
            }
            Err(e) => {
                let _ = std::fs::remove_file(&self.path);
                self.failed_at = Some(Instant::now());
                Err(e)
            }
        }
    }

    /// Gives the room back to the disk (and waits a while before taking it again).
    pub(crate) fn release(&mut self) {
        self.held = false;
        self.failed_at = Some(Instant::now());
        if self.bytes > 0
            && let Err(e) = std::fs::remove_file(&self.path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::error!(path = %self.path.display(), error = %e, "store: could not delete the disk reserve");
        }
    }
}

/// Room free to this process on the file system of `path` (its folder), where the
/// platform says.
#[cfg(unix)]
fn free_bytes(path: &Path) -> Option<u64> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let stat = rustix::fs::statvfs(dir).ok()?;
    Some(stat.f_bavail.saturating_mul(stat.f_frsize))
}

#[cfg(not(unix))]
fn free_bytes(_path: &Path) -> Option<u64> {
    None
}

/// Writes `bytes` of varying content to `path` (truncating what was there) and syncs it.
fn write_reserve(path: &Path, bytes: u64) -> std::io::Result<()> {
    const BLOCK: usize = 64 * 1024;
    let mut file = File::create(path)?;
    let mut block = vec![0u8; BLOCK];
    // xorshift: cheap bytes no file system compresses away.
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut left = bytes;
    while left > 0 {
        for word in block.chunks_exact_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            word.copy_from_slice(&state.to_le_bytes());
        }
        let n = usize::try_from(left).map_or(BLOCK, |l| l.min(BLOCK));
        file.write_all(&block[..n])?;
        left -= n as u64;
    }
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_the_whole_room_and_gives_it_back() {
        let dir = tempfile::tempdir().expect("dir");
        let db = dir.path().join("h.db");
        let mut reserve = Reserve::new(&db, 200_000);
        assert!(!reserve.is_held());
        assert!(reserve.retake_due(Instant::now()));
        reserve.take().expect("room");
        assert!(reserve.is_held());
        let file = dir.path().join("h.db-reserve");
        assert_eq!(std::fs::metadata(&file).expect("file").len(), 200_000);
        reserve.release();
        assert!(!reserve.is_held());
        assert!(!file.exists());
        assert!(!reserve.retake_due(Instant::now()), "not at once");
        // Deleted by hand while held: releasing is still quiet, taking writes it again.
        reserve.take().expect("room");
        std::fs::remove_file(&file).expect("delete");
        reserve.release();
        reserve.take().expect("room");
        assert!(file.exists());
    }

    #[test]
    fn a_failed_take_leaves_nothing_and_waits_before_the_next() {
        let dir = tempfile::tempdir().expect("dir");
        // A folder that does not exist: the file cannot be written.
        let db = dir.path().join("missing").join("h.db");
        let mut reserve = Reserve::new(&db, 1000);
        assert!(reserve.take().is_err());
        assert!(!reserve.is_held());
        let now = Instant::now();
        assert!(!reserve.retake_due(now));
        assert!(reserve.retake_due(now + RETAKE_EVERY));
    }

    #[test]
    fn a_reserve_larger_than_the_free_room_is_not_even_written() {
        let dir = tempfile::tempdir().expect("dir");
        let db = dir.path().join("h.db");
        let free = free_bytes(&db).expect("statvfs answers here");
        assert!(free > 0);
        let mut reserve = Reserve::new(&db, free.saturating_add(1 << 30));
        let e = reserve.take().expect_err("no room");
        assert_eq!(e.kind(), std::io::ErrorKind::StorageFull);
        assert!(!dir.path().join("h.db-reserve").exists());
    }

    #[test]
    fn a_reserve_of_nothing_is_always_held() {
        let dir = tempfile::tempdir().expect("dir");
        let mut reserve = Reserve::new(&dir.path().join("h.db"), 0);
        reserve.take().expect("nothing to take");
        assert!(reserve.is_held());
        assert!(!dir.path().join("h.db-reserve").exists());
    }
}
