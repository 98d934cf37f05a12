//! What one batch gathers before writing it: events into chunk rows, and outcome counts
//! into one counter update per session.
//!
//! Both are written inside the batch's transaction, before anything that could read them
//! (see `writer`), so batching changes how many rows and statements a commit costs, never
//! what a reader sees or what a crash can lose.

use std::collections::HashMap;
use std::collections::hash_map::Entry;

use rusqlite::{CachedStatement, Connection};

use crate::error::StoreError;
use crate::model::{Fence, IdHasher, OutcomeCounts, OutcomeRecord, SessionId};
use crate::store::chunks::Chunks;
use crate::store::sqlite::rows::{INSERT_OUTCOME, OutcomeCursor, backend};

/// Writes the chunks a batch gathered (inside the batch's transaction).
pub(super) fn write_chunks(conn: &Connection, chunks: &mut Chunks) {
    for chunk in chunks.take() {
        // The key looked up once per chunk; a chunk of a session that does not exist
        // (nothing could read it), or that its node no longer holds (fenced), inserts
        // nothing.
        let inserted = conn
            .prepare_cached(
                "INSERT OR IGNORE INTO event_chunks (session_key, first_seq, last_seq, body) \
                     SELECT key, ?2, ?3, ?4 FROM sessions \
                     WHERE id = ?1 AND owner = ?5 AND epoch = ?6",
            )
            .and_then(|mut s| {
                s.execute((
                    chunk.session.to_string(),
                    chunk.first,
                    chunk.last,
                    &chunk.body,
                    chunk.fence.node.to_string(),
                    super::rows::epoch_value(chunk.fence.epoch),
                ))
            });
        if let Ok(0) = inserted {
            tracing::debug!(
                session = %chunk.session,
                fence = %chunk.fence,
                first_seq = chunk.first,
                last_seq = chunk.last,
                "store: events of a session this node does not hold were dropped (fenced)"
            );
        }
        if let Err(e) = inserted {
            tracing::warn!(
                error = %e,
                session = %chunk.session,
                first_seq = chunk.first,
                last_seq = chunk.last,
                "store: could not write events"
            );
        }
    }
}

/// Outcomes recorded in this batch, counted per session until the counters are written.
///
/// Recording an outcome is one insert (its statement prepared once per batch); the
/// session's counters get one update per batch, and whether the session is still open
/// (not claimed for finalization) is read once per batch, not once per outcome.
#[derive(Default)]
pub(super) struct Tallies<'c> {
    sessions: HashMap<SessionId, Tally, IdHasher>,
    insert: Option<CachedStatement<'c>>,
}

struct Tally {
    /// Where the session's outcomes go, read when this batch first met the session (no
    /// job ran since).
    cursor: OutcomeCursor,
    counts: OutcomeCounts,
}

impl<'c> Tallies<'c> {
    /// Records `outcome` on session `id` unless the session is claimed for finalization.
    pub(super) fn record(
        &mut self,
        conn: &'c Connection,
        id: SessionId,
        fence: Fence,
        outcome: &OutcomeRecord,
    ) -> Result<(), StoreError> {
        let tally = match self.sessions.entry(id) {
            Entry::Occupied(tally) => tally.into_mut(),
            Entry::Vacant(place) => place.insert(Tally {
                cursor: OutcomeCursor::read(conn, id)?,
                counts: OutcomeCounts::default(),
            }),
        };
        // The fence read with the cursor (once per session per batch): no extra round trip.
        if tally.cursor.fence != Some(fence) {
            return Err(StoreError::Fenced {
                session_id: id,
                fence,
                holder: tally.cursor.fence,
            });
        }
        if tally.cursor.finalizing {
            return Err(StoreError::Finalizing { session_id: id });
        }
        // One statement: it succeeds or changes nothing. A duplicate is ignored and not
        // counted twice.
        let insert = match &mut self.insert {
            Some(insert) => insert,
            None => self
                .insert
                .insert(conn.prepare_cached(INSERT_OUTCOME).map_err(backend)?),
        };
        if tally.cursor.insert(insert, outcome)? {
            tally.counts.add(&outcome.outcome);
        }
        Ok(())
    }

    /// Adds the counts to the sessions' counters and forgets what it knew: the next job
    /// may claim a session, so openness is read again afterwards.
    pub(super) fn write(&mut self, conn: &Connection) -> rusqlite::Result<()> {
        for tally in self.sessions.drain().map(|(_, tally)| tally) {
            let c = tally.counts;
            if c.total() == 0 {
                continue;
            }
            let n = |v: usize| i64::try_from(v).unwrap_or(i64::MAX);
            conn.prepare_cached(
                "UPDATE sessions SET succeeded = succeeded + ?2, failed = failed + ?3, \
                 panicked = panicked + ?4, timed_out = timed_out + ?5, \
                 cancelled = cancelled + ?6, lost = lost + ?7 WHERE key = ?1",
            )?
            .execute((
                tally.cursor.key,
                n(c.succeeded),
                n(c.failed),
                n(c.panicked),
                n(c.timed_out),
                n(c.cancelled),
                n(c.lost),
            ))?;
        }
        Ok(())
    }
}
