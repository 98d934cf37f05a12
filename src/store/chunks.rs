//! A batch's events gathered into chunk rows: one row per session per batch (up to
//! [`CHUNK_EVENTS`] events, JSON lines), the shape both durable stores keep events in.
//!
//! A row and an index entry per event cost a third of a durable session's time; a chunk
//! costs one of each per batch. Gathering is the same for every backend; each writes the
//! rows its own way, only under the fence the events were appended with.

use std::collections::HashMap;

use crate::events::SessionEvent;
use crate::model::{Fence, IdHasher, SessionId};
use crate::store::line::write_event_line;

/// Most events in one `event_chunks` row.
pub(crate) const CHUNK_EVENTS: usize = 256;

/// One session's events of one batch, on their way to one `event_chunks` row.
pub(crate) struct Chunk {
    pub(crate) session: SessionId,
    /// The fence its events were appended under: the row is written only if it is still
    /// the session's.
    pub(crate) fence: Fence,
    pub(crate) first: i64,
    pub(crate) last: i64,
    count: usize,
    /// JSON lines (serde_json escapes newlines inside strings, so a line is an event),
    /// written here directly: UTF-8, checked once when the row is taken.
    body: Vec<u8>,
}

/// A chunk ready to be written: its body checked to be UTF-8.
pub(crate) struct ChunkRow {
    pub(crate) session: SessionId,
    pub(crate) fence: Fence,
    pub(crate) first: i64,
    pub(crate) last: i64,
    pub(crate) body: String,
}

/// The chunks a batch is gathering, at most one open per session.
#[derive(Default)]
pub(crate) struct Chunks {
    chunks: Vec<Chunk>,
    open: HashMap<SessionId, usize, IdHasher>,
}

impl Chunks {
    /// Adds `event`'s line. Serialized here, on the writer, straight into its chunk: not
    /// into a `String` per event on the runtime, copied into the chunk and freed here (a
    /// cross-thread free per event).
    pub(crate) fn add(&mut self, fence: Fence, event: &SessionEvent) {
        let session = event.session_id;
        let seq = i64::try_from(event.seq).unwrap_or(i64::MAX);
        let open = self.open.get(&session).copied().filter(|&at| {
            self.chunks
                .get(at)
                .is_some_and(|c| c.count < CHUNK_EVENTS && seq > c.last && c.fence == fence)
        });
        let at = open.unwrap_or_else(|| {
            self.open.insert(session, self.chunks.len());
            self.chunks.push(Chunk {
                session,
                fence,
                first: seq,
                last: seq,
                count: 0,
                body: Vec::with_capacity(4096),
            });
            self.chunks.len() - 1
        });
        let Some(chunk) = self.chunks.get_mut(at) else {
            return;
        };
        let mark = chunk.body.len();
        if chunk.count > 0 {
            chunk.body.push(b'\n');
        }
        match write_event_line(&mut chunk.body, event) {
            Ok(()) => {
                if chunk.count == 0 {
                    chunk.first = seq;
                }
                chunk.last = seq;
                chunk.count += 1;
            }
            Err(e) => {
                chunk.body.truncate(mark);
                tracing::warn!(
                    error = %e,
                    session = %session,
                    seq,
                    "store: could not serialize an event"
                );
            }
        }
    }

    /// Takes the gathered chunks as rows, in the order they were opened; the next batch
    /// starts empty.
    pub(crate) fn take(&mut self) -> Vec<ChunkRow> {
        self.open.clear();
        self.chunks
            .drain(..)
            .filter(|c| c.count > 0)
            .filter_map(|c| match String::from_utf8(c.body) {
                Ok(body) => Some(ChunkRow {
                    session: c.session,
                    fence: c.fence,
                    first: c.first,
                    last: c.last,
                    body,
                }),
                Err(e) => {
                    tracing::warn!(error = %e, session = %c.session, "store: an event chunk is not UTF-8");
                    None
                }
            })
            .collect()
    }
}
