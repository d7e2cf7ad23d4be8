//! The clock the nodes of one cluster share: Redis's.
//!
//! Node clocks drift and can be set wrong, but every node already talks to
//! the same Redis, and Redis enforces expiry in its own time. So whatever
//! several nodes compare (expiry times, receipt deadlines, the timestamps of
//! node-to-node requests) is kept in Redis's clock: each node holds its
//! offset from it (`RedisStore` reads Redis's `TIME` now and then) and
//! shifts its own readings by it, and so does the owner record's `since`,
//! which decides which of two connections of a user agent is the newer.
//! Ordering between messages (seqs) still follows each node's own clock;
//! see proto-docs/cluster.md.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

/// A difference up to this many seconds is left alone: two clocks both kept
/// by NTP differ by less, and the seconds of two readings taken a moment
/// apart can differ by one.
pub const TOLERANCE_SECS: i64 = 2;

/// The shared clock's offset from this node's, in seconds (0 on one node,
/// or while the two agree within `TOLERANCE_SECS`). Clones share it.
#[derive(Clone, Default, Debug)]
pub struct SharedClock(Arc<AtomicI64>);

impl SharedClock {
    pub fn offset(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }

    pub fn set_offset(&self, secs: i64) {
        self.0.store(secs, Ordering::Relaxed);
    }

    /// The offset to use, given one reading of each clock.
    pub fn offset_from_readings(shared_secs: u64, node_secs: u64) -> i64 {
        let d = shared_secs as i64 - node_secs as i64;
        if d.abs() > TOLERANCE_SECS {
            d
        } else {
            0
        }
    }

    /// Now, in unix seconds of the shared clock.
    pub fn now_secs(&self) -> u64 {
        self.to_shared(super::now_secs())
    }

    /// Now, in unix microseconds of the shared clock.
    pub fn now_micros(&self) -> u64 {
        super::now_micros().saturating_add_signed(self.offset().saturating_mul(1_000_000))
    }

    /// A node time (unix seconds) in the shared clock; "never" (u64::MAX)
    /// stays never.
    pub fn to_shared(&self, t: u64) -> u64 {
        shift(t, self.offset())
    }

    /// A shared time (unix seconds) back in this node's clock.
    pub fn to_node(&self, t: u64) -> u64 {
        shift(t, -self.offset())
    }

    /// Whether this is the last clone: whoever else used it is gone.
    pub(crate) fn is_alone(&self) -> bool {
        Arc::strong_count(&self.0) == 1
    }
}

fn shift(t: u64, by: i64) -> u64 {
    if t == u64::MAX {
        t
    } else {
        t.saturating_add_signed(by)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_offset_is_applied_past_the_tolerance_and_undone_on_the_way_back() {
        assert_eq!(SharedClock::offset_from_readings(1000, 999), 0);
        assert_eq!(SharedClock::offset_from_readings(1000, 1002), 0);
        assert_eq!(SharedClock::offset_from_readings(1030, 1000), 30);
        assert_eq!(SharedClock::offset_from_readings(1000, 1030), -30);
        let clock = SharedClock::default();
        clock.set_offset(-30);
        // A node 30 s ahead: its 1050 is Redis's 1020, and back.
        assert_eq!(clock.to_shared(1050), 1020);
        assert_eq!(clock.to_node(clock.to_shared(1050)), 1050);
        assert_eq!(clock.to_shared(u64::MAX), u64::MAX);
        assert_eq!(clock.to_shared(10), 0);
        // Two readings a moment apart may fall in different seconds.
        assert!(clock.now_secs().abs_diff(super::super::now_secs() - 30) <= 1);
        let micros = clock
            .now_micros()
            .abs_diff(super::super::now_micros() - 30_000_000);
        assert!(micros < 1_000_000, "{micros}");
    }
}
