//! Messages of the `MonitorActor`.

/// What a MonitorActor handles: only its own timer.
#[derive(Debug, Clone, Copy)]
pub enum MonitorMessage {
    /// Self-sent every `monitor_interval`: read the session's record and act on the deadline.
    CheckDeadline,
}
