//! Reconnect delays: exponential with "equal jitter" (each delay drawn
//! between half and all of the exponential step), so thousands of clients
//! dropped by one server restart do not come back in lockstep, while each
//! still waits at least half its step.

use rand::Rng;
use std::time::Duration;

#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    min: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub(crate) fn new(min: Duration, max: Duration) -> Backoff {
        Backoff {
            min: min.max(Duration::from_millis(1)),
            max: max.max(min),
            attempt: 0,
        }
    }

    /// The step before jitter for the current attempt.
    fn step(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(30)).unwrap_or(u32::MAX);
        self.min.saturating_mul(factor).min(self.max)
    }

    /// The delay before the next attempt; each call doubles the step up to
    /// the maximum.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let step = self.step();
        self.attempt = self.attempt.saturating_add(1);
        let half = step / 2;
        half + rand::thread_rng().gen_range(Duration::ZERO..=step - half)
    }

    /// After a connection that stayed up: the next failure starts over.
    pub(crate) fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_with_jitter_up_to_the_cap() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(10));
        let mut seen = Vec::new();
        for step in [1, 2, 4, 8, 10, 10, 10] {
            let d = b.next_delay();
            let step = Duration::from_secs(step);
            assert!(
                d >= step / 2 && d <= step,
                "{d:?} outside [{:?}, {step:?}]",
                step / 2
            );
            seen.push(d);
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_secs(1));
        // Jitter: many draws at one step are not all equal.
        let draws: std::collections::HashSet<_> = (0..20)
            .map(|_| {
                let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(1));
                b.next_delay()
            })
            .collect();
        assert!(draws.len() > 1);
    }

    #[test]
    fn survives_many_attempts_without_overflow() {
        let mut b = Backoff::new(Duration::from_millis(500), Duration::from_secs(60));
        for _ in 0..200 {
            assert!(b.next_delay() <= Duration::from_secs(60));
        }
    }
}
