//! `MonitorActor`: the watchdog, GeoNode's `harvesting_session_monitor` done right.
//!
//! Every `monitor_interval` it looks at the session's state **without asking the
//! SessionActor**, which may be the thing that is stuck: a lifecycle cell that mirrors the
//! store's finalization state every tick, and the store's record itself on the first tick,
//! every tenth, and whenever a decision is due. Then it:
//! - stops when the session is terminal;
//! - once past `started + workflow_time`, tells the session `DeadlineExpired`;
//! - if the session has not finalized `escalation_grace` after that, or its finalizer has
//!   run for longer than `escalation_grace`, asks the root to force-finalize it.
//!
//! A store error makes the handler fail: the monitor dies, and its SessionActor restarts it
//! with the same deadline (an `Instant` fixed when the session was created).

pub(crate) mod messages;
pub(crate) mod ticker;

use std::sync::Arc;

use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::time::Instant;

use crate::events::{EventKind, in_span};
use crate::session::{SessionMessage, SessionShared};
use crate::supervisor::SupervisorMessage;
pub use messages::MonitorMessage;
use ticker::Registration;

/// The actor (stateless; see [`MonitorState`]).
pub(crate) struct MonitorActor;

/// What a monitor watches.
pub(crate) struct MonitorArgs {
    pub(crate) shared: Arc<SessionShared>,
    pub(crate) session: ActorRef<SessionMessage>,
}

/// Mutable data of one monitor.
pub(crate) struct MonitorState {
    args: MonitorArgs,
    /// This monitor's place on the supervisor's shared clock; leaves it when dropped.
    _clock: Registration,
    /// When `DeadlineExpired` was sent to the session.
    deadline_sent: Option<Instant>,
    /// When a finalization claim was first seen while the session was not yet terminal.
    claim_seen: Option<Instant>,
    /// Escalate once; the root takes it from there.
    escalated: bool,
    /// Ticks handled, to space out reads of the store.
    ticks: u64,
    /// When the last `MonitorTick` event was emitted.
    last_tick_event: Option<Instant>,
}

impl Actor for MonitorActor {
    type Msg = MonitorMessage;
    type State = MonitorState;
    type Arguments = MonitorArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: MonitorArgs,
    ) -> Result<MonitorState, ActorProcessingErr> {
        let interval = args.shared.config.monitor_interval;
        let clock = args.shared.deps.ticker.register(interval, myself.clone());
        args.shared.emitter.emit(EventKind::MonitorScheduled {
            interval,
            deadline_in: args
                .shared
                .deadline
                .saturating_duration_since(Instant::now()),
        });
        Ok(MonitorState {
            args,
            _clock: clock,
            deadline_sent: None,
            claim_seen: None,
            escalated: false,
            ticks: 0,
            last_tick_event: None,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: MonitorMessage,
        state: &mut MonitorState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            MonitorMessage::CheckDeadline => {
                // Each tick is its own root span that follows the session's, so a timer that
                // runs for hours does not grow one span without bound. Made only when a
                // subscriber wants it: this runs for every session on every tick.
                let span = if tracing::enabled!(tracing::Level::DEBUG) {
                    let span = tracing::debug_span!(parent: None, "monitor_tick", session_id = %state.args.shared.id);
                    span.follows_from(state.args.shared.emitter.span());
                    span
                } else {
                    tracing::Span::none()
                };
                in_span!(&span, check(myself, state))
            }
        }
    }
}

/// Ticks between two reads of the store when nothing else calls for one.
const STORE_CHECK_EVERY: u64 = 10;

/// `MonitorTick` events are written at most this often per session (and on the deadline):
/// with a short interval and thousands of sessions, one event per tick would flood the
/// audit trail with nothing new.
const TICK_EVENT_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

async fn check(
    myself: ActorRef<MonitorMessage>,
    state: &mut MonitorState,
) -> Result<(), ActorProcessingErr> {
    let shared = Arc::clone(&state.args.shared);
    let now = Instant::now();
    let remaining = shared.deadline.saturating_duration_since(now);
    state.ticks += 1;
    // The store is the authority; the lifecycle cell mirrors what this process wrote to
    // it. Read the store on the first tick, whenever a decision is due (the deadline has
    // passed, or a finalizer runs), and every few ticks otherwise. A failed read crashes
    // this monitor; its session restarts it.
    let decide = remaining.is_zero() || shared.lifecycle.is_claimed();
    if state.ticks == 1 || decide || state.ticks % STORE_CHECK_EVERY == 0 {
        let record = shared.deps.store.session(shared.id).await?;
        shared.lifecycle.observe(&record);
    }
    if shared.lifecycle.is_terminal() {
        myself.stop(None);
        return Ok(());
    }
    let grace = shared.config.escalation_grace;
    if shared.lifecycle.is_claimed() {
        // The finalizer is running; ticks are no longer interesting, a hung finalizer is.
        let since = *state.claim_seen.get_or_insert(now);
        if now.duration_since(since) >= grace {
            escalate(state, "the finalizer to return");
        }
        return Ok(());
    }
    let tick_event_due = state
        .last_tick_event
        .is_none_or(|at| now.duration_since(at) >= TICK_EVENT_EVERY);
    if tick_event_due || remaining.is_zero() {
        shared.emitter.emit(EventKind::MonitorTick { remaining });
        state.last_tick_event = Some(now);
    }
    if !remaining.is_zero() {
        return Ok(());
    }
    match state.deadline_sent {
        None => {
            shared.emitter.emit(EventKind::DeadlineExpired);
            state.deadline_sent = Some(now);
            if state
                .args
                .session
                .send_message(SessionMessage::DeadlineExpired)
                .is_err()
            {
                // The session actor is gone without finalizing: no point waiting.
                escalate(state, "a session actor that is gone");
            }
        }
        Some(sent) if now.duration_since(sent) >= grace => {
            escalate(state, "the session to finalize after its deadline");
        }
        Some(_) => {}
    }
    Ok(())
}

fn escalate(state: &mut MonitorState, waiting_for: &str) {
    if state.escalated {
        return;
    }
    state.escalated = true;
    let shared = &state.args.shared;
    shared.emitter.emit(EventKind::MonitorEscalated {
        waiting_for: waiting_for.to_owned(),
    });
    // If the root is gone the whole tree is going down; nothing better to do here.
    let _ = shared.root.send_message(SupervisorMessage::Escalate {
        session_id: shared.id,
    });
}
