//! [`Pulse`]: whether the root still takes its messages, asked without waiting in its
//! queue.
//!
//! A health check that sent the root a message and awaited the answer measured the root's
//! queue: under a burst of starts (hundreds of messages ahead of it) a healthy root
//! answered in tens of milliseconds, and an orchestrator with a tight probe timeout would
//! restart a server that was only busy. Instead a check sends the root a pulse only when
//! none is outstanding, and answers at once from how long the outstanding one has waited:
//! a root that is wedged (a handler that never returns) or gone leaves it unanswered, and
//! the checks that come once it has waited longer than their bound say so.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// The root's outstanding pulse, if any. Shared by the handle (which sends) and the root
/// (which answers).
#[derive(Debug)]
pub(crate) struct Pulse {
    /// Times are counted from here (tokio's clock: paused in tests).
    origin: Instant,
    /// When the outstanding pulse was sent, in ns since `origin`, plus one; 0 when none is.
    sent: AtomicU64,
}

impl Pulse {
    pub(crate) fn new() -> Self {
        Self {
            origin: Instant::now(),
            sent: AtomicU64::new(0),
        }
    }

    /// Now, in ns since `origin`, plus one (never 0); saturating (after 584 years).
    fn now(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_nanos())
            .unwrap_or(u64::MAX - 1)
            .saturating_add(1)
    }

    /// How long the outstanding pulse has waited for the root: zero if none was, in which
    /// case one is sent now with `send` (which says whether the root took it). `None` if
    /// the root did not take it (it is gone).
    pub(crate) fn check(&self, send: impl FnOnce() -> bool) -> Option<Duration> {
        let now = self.now();
        match self
            .sent
            .compare_exchange(0, now, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => {
                if send() {
                    Some(Duration::ZERO)
                } else {
                    self.sent.store(0, Ordering::Release);
                    None
                }
            }
            Err(sent) => Some(Duration::from_nanos(now.saturating_sub(sent))),
        }
    }

    /// The root took the outstanding pulse.
    pub(crate) fn answered(&self) {
        self.sent.store(0, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn an_unanswered_pulse_ages_and_an_answer_clears_it() {
        let pulse = Pulse::new();
        let mut sent = 0;
        // None outstanding: one is sent, and nothing has waited.
        assert_eq!(
            pulse.check(|| {
                sent += 1;
                true
            }),
            Some(Duration::ZERO)
        );
        tokio::time::advance(Duration::from_millis(1500)).await;
        // Still outstanding: not sent again, its wait grows.
        assert_eq!(
            pulse.check(|| {
                sent += 1;
                true
            }),
            Some(Duration::from_millis(1500))
        );
        tokio::time::advance(Duration::from_secs(3)).await;
        assert_eq!(
            pulse.check(|| {
                sent += 1;
                true
            }),
            Some(Duration::from_millis(4500))
        );
        assert_eq!(sent, 1);
        // Answered: the next check sends a new one.
        pulse.answered();
        assert_eq!(
            pulse.check(|| {
                sent += 1;
                true
            }),
            Some(Duration::ZERO)
        );
        assert_eq!(sent, 2);
        // A root that takes no message (gone): `None`, and the next check tries again.
        pulse.answered();
        assert_eq!(pulse.check(|| false), None);
        assert_eq!(pulse.check(|| false), None);
        assert_eq!(pulse.check(|| true), Some(Duration::ZERO));
    }
}
