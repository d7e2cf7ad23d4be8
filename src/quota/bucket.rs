//! One token bucket as GCRA (the generic cell rate algorithm): its whole
//! state is a single number, the "theoretical arrival time" at which the
//! bucket would be full again, so a slot of the table is one atomic word
//! and needs no lock. Pure arithmetic on nanoseconds.

use crate::config::Rate;

/// A rate and a burst in GCRA terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    /// Nanoseconds one push costs: the pace's period over its count.
    pub interval: u64,
    /// Nanoseconds of credit a full bucket holds: `burst` pushes.
    pub capacity: u64,
}

impl Limit {
    /// `burst` pushes at once, then `rate`. A burst of 0 would refuse
    /// everything forever; it is read as 1, the least that lets the pace
    /// through.
    pub fn new(rate: Rate, burst: u32) -> Limit {
        let interval = (rate.per.as_nanos() / u128::from(rate.count)).max(1) as u64;
        Limit {
            interval,
            capacity: interval.saturating_mul(u64::from(burst.max(1))),
        }
    }

    /// One more push at `now` on a bucket at `tat`: the new state if it
    /// fits, else the nanoseconds until it would.
    pub fn admit(&self, tat: u64, now: u64) -> Result<u64, u64> {
        let next = tat.max(now).saturating_add(self.interval);
        let ahead = next - now;
        if ahead <= self.capacity {
            Ok(next)
        } else {
            Err(ahead - self.capacity)
        }
    }

    /// `n` pushes that were admitted elsewhere (another node) or already
    /// decided: taken whether they fit or not. Not capped at an empty
    /// bucket: the debt is what makes the other nodes' pushes count, so
    /// that N nodes together admit one rate, not N.
    pub fn charge(&self, tat: u64, now: u64, n: u64) -> u64 {
        tat.max(now).saturating_add(self.interval.saturating_mul(n))
    }
}

/// Whole seconds for `Retry-After`: rounded up, and at least 1 (0 would
/// invite an immediate retry that is refused again).
pub fn retry_after_secs(wait_ns: u64) -> u64 {
    wait_ns.div_ceil(1_000_000_000).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const SEC: u64 = 1_000_000_000;

    fn limit(count: u32, per: u64, burst: u32) -> Limit {
        Limit::new(
            Rate {
                count,
                per: Duration::from_secs(per),
            },
            burst,
        )
    }

    #[test]
    fn a_full_bucket_takes_its_burst_then_the_pace() {
        let l = limit(60, 60, 5); // one a second, five at once
        let now = 100 * SEC;
        let mut tat = 0;
        for _ in 0..5 {
            tat = l.admit(tat, now).expect("within the burst");
        }
        let wait = l.admit(tat, now).unwrap_err();
        assert_eq!(wait, SEC, "the sixth fits once one token refilled");
        assert!(l.admit(tat, now + SEC - 1).is_err());
        tat = l.admit(tat, now + SEC).unwrap();
        assert!(l.admit(tat, now + SEC).is_err());
        // Idle long enough, the bucket is full again, never fuller.
        let later = now + 3600 * SEC;
        let mut t = tat;
        for _ in 0..5 {
            t = l.admit(t, later).unwrap();
        }
        assert!(l.admit(t, later).is_err());
    }

    #[test]
    fn charges_from_elsewhere_run_into_debt() {
        let l = limit(1, 1, 10);
        let now = 50 * SEC;
        // Another node admitted 15 while this one was idle: 5 beyond a
        // full bucket, so this node waits 5 s past the first token.
        let tat = l.charge(0, now, 15);
        assert_eq!(l.admit(tat, now).unwrap_err(), 6 * SEC);
        assert!(l.admit(tat, now + 6 * SEC).is_ok());
    }

    #[test]
    fn zero_burst_still_lets_the_pace_through() {
        let l = limit(2, 1, 0);
        let tat = l.admit(0, SEC).unwrap();
        assert!(l.admit(tat, SEC).is_err());
        assert!(l.admit(tat, SEC + SEC / 2).is_ok());
    }

    #[test]
    fn retry_after_is_whole_seconds_at_least_one() {
        assert_eq!(retry_after_secs(1), 1);
        assert_eq!(retry_after_secs(SEC), 1);
        assert_eq!(retry_after_secs(SEC + 1), 2);
        assert_eq!(retry_after_secs(0), 1);
    }
}
