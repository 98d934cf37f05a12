//! The rescue: sessions whose owner node is gone are taken over and recovered here.
//!
//! A pass runs at start (start-up recovery is the first pass) and then every
//! `rescue_interval`. It takes over, atomically and with one winner per session across
//! every process on the store, the unfinished sessions whose owner's lease has expired
//! (never a live node's), bumping each one's epoch so that the old owner, should it only
//! have been paused, can write nothing more for them. Each is then finalized with
//! `Interrupted`, or, under `RecoveryPolicy::Resume`, harvested again where it had not
//! succeeded, with a fresh deadline.

use std::sync::Arc;

use ractor::ActorRef;

use crate::config::RecoveryPolicy;
use crate::error::StoreError;
use crate::events::{EventKind, SessionEmitter};
use crate::finalizer::Mode;
use crate::model::FinalizeReason;
use crate::node::process_gone;
use crate::store::TakenOver;
use crate::supervisor::{RootState, SupervisorMessage, session_shared, spawn_force, spawn_session};

/// Sessions taken over per store call: a pass repeats until a call takes fewer.
const RESCUE_BATCH: usize = 256;

/// One rescue pass. Store failures are reported, not fatal: the next pass tries again.
pub(super) async fn rescue(myself: &ActorRef<SupervisorMessage>, state: &mut RootState) {
    let store = Arc::clone(&state.deps.store);
    let node = Arc::clone(&state.deps.node);
    if node.is_fenced() {
        tracing::warn!(node = %node.id(), "rescue skipped: this node is self-fenced");
        return;
    }
    expire_dead_neighbours(state).await;
    stop_sessions_taken_over(state).await;
    loop {
        let taken = match store.take_over(node.id(), RESCUE_BATCH).await {
            Ok(taken) => taken,
            Err(StoreError::LeaseExpired { .. }) => {
                tracing::warn!(node = %node.id(), "rescue skipped: this node's lease has expired");
                return;
            }
            Err(error) => {
                tracing::error!(%error, "rescue could not take over the sessions of dead nodes");
                return;
            }
        };
        let more = taken.len() >= RESCUE_BATCH;
        for t in taken {
            let id = t.record.id;
            tracing::warn!(
                session_id = %id,
                from_node = ?t.from_node.map(|n| n.to_string()),
                epoch = t.record.epoch,
                "took over a session whose node is gone"
            );
            if let Err(error) = recover_one(myself, state, t).await {
                tracing::error!(session_id = %id, %error, "could not recover the session");
            }
        }
        if !more {
            return;
        }
    }
}

/// Stops the sessions this node runs that the store says another node owns now: taken
/// over while this node could not renew (paused, cut off), and silent since (a hung
/// harvest writes nothing, so no fenced write told it).
pub(super) async fn stop_sessions_taken_over(state: &RootState) {
    let running: Vec<_> = state
        .sessions
        .iter()
        .filter(|(_, r)| !r.forcing)
        .map(|(id, r)| (*id, r.actor.clone()))
        .collect();
    if running.is_empty() {
        return;
    }
    let owned: std::collections::HashSet<_> = match state
        .deps
        .store
        .open_sessions_of(state.deps.node.id())
        .await
    {
        Ok(ids) => ids.into_iter().collect(),
        Err(error) => {
            tracing::debug!(%error, "could not list this node's sessions");
            return;
        }
    };
    for (id, actor) in running {
        if !owned.contains(&id) {
            // Finished meanwhile (then it is stopping anyway), or taken over.
            let _ = actor.send_message(crate::session::SessionMessage::TakenOver);
        }
    }
}

/// Ends the leases of nodes on this host whose process is gone (a crash, a SIGKILL): their
/// sessions need not wait for the lease to run out.
async fn expire_dead_neighbours(state: &RootState) {
    let store = &state.deps.store;
    let me = state.deps.node.id();
    let nodes = match store.nodes().await {
        Ok(nodes) => nodes,
        Err(error) => {
            tracing::debug!(%error, "rescue could not list the nodes");
            return;
        }
    };
    for n in nodes.into_iter().filter(|n| n.live && n.info.id != me) {
        let Some(process) = &n.info.process else {
            continue;
        };
        if process_gone(process) == Some(true) {
            match store.expire_node(n.info.id, process).await {
                Ok(true) => tracing::warn!(
                    node = %n.info.id,
                    name = ?n.info.name,
                    pid = process.pid,
                    "a node's process on this host is gone: its lease ends now"
                ),
                Ok(false) => {}
                Err(error) => tracing::debug!(%error, "could not end a dead node's lease"),
            }
        }
    }
}

async fn recover_one(
    myself: &ActorRef<SupervisorMessage>,
    state: &mut RootState,
    taken: TakenOver,
) -> Result<(), StoreError> {
    let TakenOver { record, from_node } = taken;
    let store = Arc::clone(&state.deps.store);
    let fence = record.fence().ok_or(StoreError::Fenced {
        session_id: record.id,
        fence: crate::model::Fence::new(state.deps.node.id()),
        holder: None,
    })?;
    let last_seq = store.last_event_seq(record.id).await?;
    let emitter = SessionEmitter::new(
        record.id,
        fence,
        record.harvester_id.clone(),
        last_seq,
        state.deps.bus.clone(),
        Arc::clone(&store),
    );
    emitter.emit(EventKind::SessionTakenOver {
        from_node,
        by_node: fence.node,
        epoch: fence.epoch,
    });
    // An abort another node asked for before the owner died is honoured: no resume.
    let aborted = record.abort_requested;
    let remaining = match state.config.recovery {
        _ if aborted => None,
        // If it cannot be reopened, it is at least finalized below.
        RecoveryPolicy::Resume => store
            .resume_session(record.id, fence)
            .await
            .unwrap_or_else(|error| {
                tracing::error!(session_id = %record.id, %error, "could not resume; finalizing instead");
                None
            }),
        RecoveryPolicy::Finalize => None,
    };
    emitter.emit(EventKind::Recovered {
        previous_status: record.status,
        resuming: remaining.as_ref().map(Vec::len),
    });
    match remaining {
        Some(remaining) => {
            // Its own budget; the supervisor's default for sessions stored before it was kept.
            let config = match store.session_config(record.id).await {
                Ok(Some(config)) => config,
                _ => state.config.session.clone(),
            };
            let shared = session_shared(
                myself,
                state,
                record.id,
                record.harvester_id,
                remaining.into(),
                std::sync::Arc::new(config),
                emitter,
                true,
            );
            if let Err(error) = spawn_session(myself, state, shared).await {
                tracing::error!(session_id = %record.id, %error, "could not resume the session");
            }
        }
        None => {
            let mode = Mode::Recover {
                finalizer_timeout: state.config.session.escalation_grace,
            };
            let reason = if aborted {
                FinalizeReason::Aborted
            } else {
                FinalizeReason::Interrupted
            };
            spawn_force(
                state,
                &emitter,
                Arc::default(),
                record.id,
                reason,
                mode,
                None,
            );
        }
    }
    Ok(())
}
