//! `MonitorActor`: the watchdog, GeoNode's `harvesting_session_monitor` done right.
//!
//! It is woken by the supervisor's shared clock (see [`ticker`]) on the `monitor_interval`
//! ticks that can change something, and looks at the session's state **without asking
//! the SessionActor**, which may be the thing that is stuck: a lifecycle cell that mirrors
//! the store's finalization state, and the store's record itself on its first tick, every
//! tenth, and whenever a decision is due. Then it:
//! - stops when the session is terminal;
//! - once past `started + workflow_time`, tells the session `DeadlineExpired`;
//! - if the session has not finalized `escalation_grace` after that, or its finalizer has
//!   run for longer than `escalation_grace`, asks the root to force-finalize it.
//!
//! The clock itself looks at the deadline and the lifecycle cell on every tick, so a
//! quiet tick (nothing due, nothing claimed) costs the clock a table entry and leaves the
//! monitor's memory cold; the monitor asks for its next store-read or event tick itself.
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
    clock: Registration,
    /// The clock's tick this monitor first handled: its ticks count from there.
    first_tick: Option<u64>,
    /// When `DeadlineExpired` was sent to the session.
    deadline_sent: Option<Instant>,
    /// When a finalization claim was first seen while the session was not yet terminal.
    claim_seen: Option<Instant>,
    /// Escalate once; the root takes it from there.
    escalated: bool,
    /// A `MonitorTick` event every this many ticks (about [`TICK_EVENT_EVERY`]).
    tick_event_every: u64,
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
        let clock = args.shared.deps.ticker.register(
            interval,
            myself.clone(),
            args.shared.id,
            args.shared.deadline,
            Arc::clone(&args.shared.lifecycle),
        );
        args.shared.emitter.emit(EventKind::MonitorScheduled {
            interval,
            deadline_in: args
                .shared
                .deadline
                .saturating_duration_since(Instant::now()),
        });
        Ok(MonitorState {
            args,
            clock,
            first_tick: None,
            deadline_sent: None,
            claim_seen: None,
            escalated: false,
            tick_event_every: ticks_per_event(interval),
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: MonitorMessage,
        state: &mut MonitorState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            MonitorMessage::CheckDeadline { tick } => {
                // Each tick is its own root span that follows the session's, so a timer that
                // runs for hours does not grow one span without bound. Made only when a
                // subscriber wants it: this runs for thousands of sessions.
                let span = if tracing::enabled!(tracing::Level::DEBUG) {
                    let span = tracing::debug_span!(parent: None, "monitor_tick", session_id = %state.args.shared.id);
                    span.follows_from(state.args.shared.emitter.span());
                    span
                } else {
                    tracing::Span::none()
                };
                in_span!(&span, check(myself, state, tick))
            }
        }
    }
}

/// `MonitorTick` events are written at most this often per session (and on the deadline):
/// with a short interval and thousands of sessions, one event per tick would flood the
/// audit trail with nothing new.
const TICK_EVENT_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

async fn check(
    myself: ActorRef<MonitorMessage>,
    state: &mut MonitorState,
    tick: u64,
) -> Result<(), ActorProcessingErr> {
    let now = Instant::now();
    let shared = Arc::clone(&state.args.shared);
    let remaining = shared.deadline.saturating_duration_since(now);
    // Ticks of this monitor's life so far: 0 on its first.
    let n = tick.saturating_sub(*state.first_tick.get_or_insert(tick));
    // The store is the authority; the lifecycle cell mirrors what this process wrote to
    // it, and what the clock's batched reads of the store found (every few ticks, see
    // `ticker`). Read the store here on the first tick and whenever a decision is due (the
    // deadline has passed, or a finalizer runs). A failed read crashes this monitor; its
    // session restarts it.
    let lifecycle = &shared.lifecycle;
    let decide = remaining.is_zero() || lifecycle.is_claimed();
    if n == 0 || decide {
        let record = shared.deps.store.session(shared.id).await?;
        lifecycle.observe(&record);
    }
    if lifecycle.is_terminal() {
        myself.stop(None);
        return Ok(());
    }
    // The next tick with something to do when nothing else calls for one: a
    // `MonitorTick` event. (The clock wakes this monitor on every tick anyway once the
    // deadline has passed, or a finalization is claimed or done, which its batched reads
    // of the store also see.)
    let to_next = |every: u64| every - n % every;
    state.clock.wake_at(tick + to_next(state.tick_event_every));
    if !decide && !n.is_multiple_of(state.tick_event_every) {
        // Woken for nothing to record (the first tick's read done).
        return Ok(());
    }
    let grace = shared.config.escalation_grace;
    if lifecycle.is_claimed() {
        // The finalizer is running; ticks are no longer interesting, a hung finalizer is.
        let since = *state.claim_seen.get_or_insert(now);
        if now.duration_since(since) >= grace {
            escalate(state, "the finalizer to return");
        }
        return Ok(());
    }
    // The session may have ended while this tick read the store: nothing to say then.
    if lifecycle.is_terminal() {
        myself.stop(None);
        return Ok(());
    }
    shared.emitter.emit(EventKind::MonitorTick { remaining });
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

/// How many ticks of `interval` make [`TICK_EVENT_EVERY`] (at least one).
fn ticks_per_event(interval: std::time::Duration) -> u64 {
    let every = TICK_EVENT_EVERY.as_nanos() / interval.as_nanos().max(1);
    u64::try_from(every).unwrap_or(u64::MAX).max(1)
}

fn escalate(state: &mut MonitorState, waiting_for: &str) {
    if state.escalated {
        return;
    }
    let shared = &state.args.shared;
    if shared
        .lifecycle
        .retrying_store(shared.config.escalation_grace)
    {
        // Alive, and waiting for its store (a full disk, a lost connection): the root
        // could do no better, and would lose the outcomes the session holds in memory.
        tracing::warn!(
            waiting_for,
            "not escalating: the session is retrying its store"
        );
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
