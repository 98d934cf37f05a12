//! The rescue: sessions whose owner node is gone are taken over and recovered here.
//!
//! A pass runs at start (start-up recovery is the first pass) and then every
//! `rescue_interval`. It takes over, atomically and with one winner per session across
//! every process on the store, the unfinished sessions whose owner's lease has expired
//! (never a live node's), bumping each one's epoch so that the old owner, should it only
//! have been paused, can write nothing more for them. Each is then finalized with
//! `Interrupted`, or, under `RecoveryPolicy::Resume`, harvested again where it had not
//! succeeded, with a fresh deadline.
//!
//! The store work of a pass ([`pass`]) runs in a task of its own after the first, so that
//! a slow store never holds up the root (starts, aborts, health checks); the root spawns
//! or finalizes what it took over when told ([`apply`], `SupervisorMessage::Rescued`).

use std::sync::Arc;

use ractor::ActorRef;

use crate::config::RecoveryPolicy;
use crate::error::StoreError;
use crate::events::{EventKind, SessionEmitter};
use crate::finalizer::Deps;
use crate::finalizer::Mode;
use crate::model::FinalizeReason;
use crate::model::SessionId;
use crate::node::process_gone;
use crate::session::SessionMessage;
use crate::store::TakenOver;
use crate::supervisor::{RootState, SupervisorMessage, session_shared, spawn_force, spawn_session};

/// Sessions taken over per store call: a pass repeats until a call takes fewer.
const RESCUE_BATCH: usize = 256;

/// What a pass needs, taken from the root's state (it runs in a task of its own).
pub(super) struct PassInput {
    pub(super) deps: Arc<Deps>,
    pub(super) recovery: RecoveryPolicy,
    pub(super) default: crate::config::SessionConfig,
    /// The sessions this node runs (and does not force), to stop those taken over.
    pub(super) running: Vec<(SessionId, ActorRef<SessionMessage>)>,
}

impl PassInput {
    pub(super) fn of(state: &RootState) -> Self {
        Self {
            deps: Arc::clone(&state.deps),
            recovery: state.config.recovery,
            default: state.config.session.clone(),
            running: running_of(state),
        }
    }
}

/// The sessions this node runs and does not force.
pub(super) fn running_of(state: &RootState) -> Vec<(SessionId, ActorRef<SessionMessage>)> {
    state
        .sessions
        .iter()
        .filter(|(_, r)| !r.forcing)
        .map(|(id, r)| (*id, r.actor.clone()))
        .collect()
}

/// A session a pass took over, ready for the root to run again or finalize.
pub(crate) struct Recovery {
    record: crate::model::SessionRecord,
    emitter: SessionEmitter,
    /// `Some`: resumed, these resources to harvest again under `config`.
    remaining: Option<(Vec<crate::model::ResourceId>, crate::config::SessionConfig)>,
}

/// One rescue pass, all of its store work: ends the leases of dead neighbours, stops the
/// sessions taken over from this node, takes over those of expired nodes and prepares
/// each one. `report` gets each batch of takeovers as it is ready (the root spawns them).
/// Store failures are reported, not fatal: the next pass tries again.
pub(super) async fn pass(input: PassInput, mut report: impl FnMut(Vec<Recovery>)) {
    let PassInput {
        deps,
        recovery,
        default,
        running,
    } = input;
    let store = Arc::clone(&deps.store);
    let node = Arc::clone(&deps.node);
    if node.is_fenced() {
        tracing::warn!(node = %node.id(), "rescue skipped: this node is self-fenced");
        return;
    }
    expire_dead_neighbours(&deps).await;
    stop_sessions_taken_over(&deps, running, false).await;
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
        let mut batch = Vec::with_capacity(taken.len());
        for t in taken {
            let id = t.record.id;
            tracing::warn!(
                session_id = %id,
                from_node = ?t.from_node.map(|n| n.to_string()),
                epoch = t.record.epoch,
                "took over a session whose node is gone"
            );
            match prepare(&deps, recovery, &default, t).await {
                Ok(r) => batch.push(r),
                Err(error) => {
                    tracing::error!(session_id = %id, %error, "could not recover the session");
                }
            }
        }
        report(batch);
        if !more {
            return;
        }
    }
}

/// Stops the sessions this node runs that the store says another node owns now: taken
/// over while this node could not renew (paused, cut off), and silent since (a hung
/// harvest writes nothing, so no fenced write told it). With `renewed`, the others are
/// told the lease is renewed, after (so that a session taken over never starts an attempt
/// again); they are told so too when the store cannot say.
pub(super) async fn stop_sessions_taken_over(
    deps: &Deps,
    running: Vec<(SessionId, ActorRef<SessionMessage>)>,
    renewed: bool,
) {
    if running.is_empty() {
        return;
    }
    let owned: Option<std::collections::HashSet<_>> =
        match deps.store.open_sessions_of(deps.node.id()).await {
            Ok(ids) => Some(ids.into_iter().collect()),
            Err(error) => {
                tracing::debug!(%error, "could not list this node's sessions");
                None
            }
        };
    for (id, actor) in running {
        if owned.as_ref().is_some_and(|owned| !owned.contains(&id)) {
            // Finished meanwhile (then it is stopping anyway), or taken over.
            let _ = actor.send_message(SessionMessage::TakenOver);
        } else if renewed {
            let _ = actor.send_message(SessionMessage::LeaseRenewed);
        }
    }
}

/// Ends the leases of nodes on this host whose process is gone (a crash, a SIGKILL): their
/// sessions need not wait for the lease to run out.
async fn expire_dead_neighbours(deps: &Deps) {
    let store = &deps.store;
    let me = deps.node.id();
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

/// The store work of one takeover: its log goes on, its takeover is logged, and it is
/// resumed (under `RecoveryPolicy::Resume`, unless an abort was asked) or left to finalize.
async fn prepare(
    deps: &Deps,
    recovery: RecoveryPolicy,
    default: &crate::config::SessionConfig,
    taken: TakenOver,
) -> Result<Recovery, StoreError> {
    let TakenOver { record, from_node } = taken;
    let store = Arc::clone(&deps.store);
    let fence = record.fence().ok_or(StoreError::Fenced {
        session_id: record.id,
        fence: crate::model::Fence::new(deps.node.id()),
        holder: None,
    })?;
    let last_seq = store.last_event_seq(record.id).await?;
    let emitter = SessionEmitter::new(
        record.id,
        fence,
        record.harvester_id.clone(),
        last_seq,
        deps.bus.clone(),
        Arc::clone(&store),
    );
    emitter.emit(EventKind::SessionTakenOver {
        from_node,
        by_node: fence.node,
        epoch: fence.epoch,
    });
    // An abort another node asked for before the owner died is honoured: no resume.
    let remaining = match recovery {
        _ if record.abort_requested => None,
        // If it cannot be reopened, it is at least finalized.
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
    let remaining = match remaining {
        Some(remaining) => {
            // Its own budget; the supervisor's default for sessions stored before it was kept.
            let config = match store.session_config(record.id).await {
                Ok(Some(config)) => config,
                _ => default.clone(),
            };
            Some((remaining, config))
        }
        None => None,
    };
    Ok(Recovery {
        record,
        emitter,
        remaining,
    })
}

/// The root's part of a takeover: runs the session again, or finalizes it.
pub(super) async fn apply(
    myself: &ActorRef<SupervisorMessage>,
    state: &mut RootState,
    recovered: Recovery,
) {
    let Recovery {
        record,
        emitter,
        remaining,
    } = recovered;
    match remaining {
        Some((remaining, config)) => {
            let shared = session_shared(
                myself,
                state,
                record.id,
                record.harvester_id,
                remaining.into(),
                Arc::new(config),
                emitter,
                true,
            );
            let id = record.id;
            if let Err(error) = spawn_session(myself, state, shared).await {
                tracing::error!(session_id = %id, %error, "could not resume the session");
            } else if state.stopping
                && let Some(running) = state.sessions.get(&id)
            {
                // Taken over as the supervisor began to stop: it ends `shutdown` too.
                let _ = running.actor.send_message(SessionMessage::Shutdown);
            }
        }
        None => {
            let mode = Mode::Recover {
                finalizer_timeout: state.config.session.escalation_grace,
            };
            let reason = if record.abort_requested {
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
}
