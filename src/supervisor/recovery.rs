//! Recovery at start: sessions an earlier process left unfinished in the store are
//! finalized as `Interrupted`, or resumed under `RecoveryPolicy::Resume`.

use std::sync::Arc;

use ractor::ActorRef;

use crate::config::RecoveryPolicy;
use crate::events::{EventKind, SessionEmitter};
use crate::finalizer::Mode;
use crate::model::FinalizeReason;
use crate::supervisor::{RootState, SupervisorMessage, session_shared, spawn_force, spawn_session};

/// Takes over every session the store holds unfinished (its process is gone: this root has
/// no actor for it): finalized with `Interrupted`, or, under `RecoveryPolicy::Resume`,
/// harvested again where it had not succeeded, with a fresh deadline.
pub(super) async fn recover(myself: &ActorRef<SupervisorMessage>, state: &mut RootState) {
    let store = Arc::clone(&state.deps.store);
    // A store that cannot be read now is reported, not fatal: the root stays up to serve
    // what it can, and the next start tries again.
    let records = match store.list_sessions().await {
        Ok(records) => records,
        Err(error) => {
            tracing::error!(%error, "recovery could not list the stored sessions");
            return;
        }
    };
    for record in records {
        if record.status.is_terminal() {
            continue;
        }
        if let Err(error) = recover_one(myself, state, record.clone()).await {
            tracing::error!(session_id = %record.id, %error, "could not recover the session");
        }
    }
}

async fn recover_one(
    myself: &ActorRef<SupervisorMessage>,
    state: &mut RootState,
    record: crate::model::SessionRecord,
) -> Result<(), crate::error::StoreError> {
    let store = Arc::clone(&state.deps.store);
    let last_seq = store.last_event_seq(record.id).await?;
    let emitter = SessionEmitter::new(
        record.id,
        record.harvester_id.clone(),
        last_seq,
        state.deps.bus.clone(),
        Arc::clone(&store),
    );
    let remaining = match state.config.recovery {
        // If it cannot be reopened, it is at least finalized below.
        RecoveryPolicy::Resume => store.resume_session(record.id).await.unwrap_or_else(|error| {
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
            spawn_force(
                state,
                &emitter,
                Arc::default(),
                record.id,
                FinalizeReason::Interrupted,
                mode,
                None,
            );
        }
    }
    Ok(())
}
