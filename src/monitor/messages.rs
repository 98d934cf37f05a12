//! Messages of the `MonitorActor`.

/// What a MonitorActor handles: only its own timer.
#[derive(Debug, Clone, Copy)]
pub enum MonitorMessage {
    /// Sent by the shared clock (see `ticker`): read the session's state and act on the
    /// deadline. `tick` counts the clock's ticks; the monitor asks for its next one.
    CheckDeadline {
        /// The clock's tick this message is for.
        tick: u64,
    },
}
