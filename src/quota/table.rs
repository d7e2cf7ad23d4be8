//! A fixed-size table of buckets: memory stays the same whatever the
//! number of senders, subscriptions or addresses an attacker makes up.
//!
//! Every key (a subscription, a user agent, a VAPID key, an address) maps
//! to two slots by a keyed hash (`slots`), and its bucket is read as the
//! fuller of the two's emptier one, a count-min sketch of token buckets:
//! each slot's state is the bucket of *all* the keys that hash there, which
//! is at least as full as the key's own (a bucket fed by more pushes is
//! never emptier). So a collision can only make a key stricter, never
//! looser, and an honest key is refused for someone else's pushes only if
//! both its slots are shared with heavy keys. The hash's key is secret, so
//! an attacker cannot choose keys that land on a victim's slots.
//!
//! With `SLOTS` = 65536 slots, pushes spread evenly over unrelated keys
//! fill no slot unless they arrive at more than 65536 times the pace per
//! key (for the default 120/m per subscription: 131,000 pushes a second,
//! more than a node serves), so honest keys keep their own quota.

use super::bucket::Limit;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// Slots per table: a power of two (the hash is masked).
pub const SLOTS: usize = 1 << 16;

/// Where a key's bucket lives: two slot indexes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slots(pub [u32; 2]);

pub struct Table {
    limit: Limit,
    /// Each slot's GCRA state (`bucket`); 0 is a full bucket.
    tats: Box<[AtomicU64]>,
    /// Pushes charged to each slot since the last `take_usage`, for the
    /// other nodes (`share`).
    used: Box<[AtomicU32]>,
}

impl Table {
    pub fn new(limit: Limit) -> Table {
        Table {
            limit,
            tats: (0..SLOTS).map(|_| AtomicU64::new(0)).collect(),
            used: (0..SLOTS).map(|_| AtomicU32::new(0)).collect(),
        }
    }

    pub fn limit(&self) -> Limit {
        self.limit
    }

    /// Slots in the table: `SLOTS`, however many keys were seen.
    pub fn slots(&self) -> usize {
        self.tats.len()
    }

    /// Bytes the table holds, fixed at creation.
    pub fn memory_bytes(&self) -> usize {
        self.tats.len() * std::mem::size_of::<AtomicU64>()
            + self.used.len() * std::mem::size_of::<AtomicU32>()
    }

    /// Whether one more push of the key fits at `now`, without taking it;
    /// else the nanoseconds until it would.
    pub fn check(&self, at: Slots, now: u64) -> Result<(), u64> {
        let [a, b] = at.0.map(|i| self.tats[i as usize].load(Ordering::Relaxed));
        self.limit.admit(a.min(b), now).map(drop)
    }

    /// Takes one push of the key (after `check` said it fits). Two pushes
    /// checked at the same instant on two threads may both pass: the
    /// overshoot is bounded by the number of threads, and the slots still
    /// count both.
    pub fn charge(&self, at: Slots, now: u64) {
        let [a, b] = at.0;
        self.charge_slot(a, now, 1);
        if b != a {
            self.charge_slot(b, now, 1);
        }
    }

    /// `check`, then `charge` if it fits.
    pub fn admit(&self, at: Slots, now: u64) -> Result<(), u64> {
        self.check(at, now)?;
        self.charge(at, now);
        Ok(())
    }

    fn charge_slot(&self, slot: u32, now: u64, n: u32) {
        let i = slot as usize;
        let _ = self.tats[i].fetch_update(Ordering::Relaxed, Ordering::Relaxed, |tat| {
            Some(self.limit.charge(tat, now, u64::from(n)))
        });
        self.used[i].fetch_add(n, Ordering::Relaxed);
    }

    /// Pushes another node took on `slot`: they count here too, but are not
    /// shared again.
    pub fn charge_remote(&self, slot: u32, n: u32, now: u64) {
        if let Some(tat) = self.tats.get(slot as usize) {
            let _ = tat.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| {
                Some(self.limit.charge(t, now, u64::from(n)))
            });
        }
    }

    /// Appends (slot, pushes) for every slot charged since the last call,
    /// and starts counting anew.
    pub fn take_usage(&self, out: &mut Vec<(u32, u32)>) {
        for (i, used) in self.used.iter().enumerate() {
            if used.load(Ordering::Relaxed) != 0 {
                let n = used.swap(0, Ordering::Relaxed);
                if n != 0 {
                    out.push((i as u32, n));
                }
            }
        }
    }

    /// Puts back usage that could not be shared, to go with the next share.
    pub fn return_usage(&self, slot: u32, n: u32) {
        if let Some(used) = self.used.get(slot as usize) {
            used.fetch_add(n, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Rate;
    use crate::quota::keys::Hasher;
    use std::time::Duration;

    const SEC: u64 = 1_000_000_000;

    fn table(count: u32, per_secs: u64, burst: u32) -> Table {
        let rate = Rate {
            count,
            per: Duration::from_secs(per_secs),
        };
        Table::new(Limit::new(rate, burst))
    }

    /// The point of the table: a million distinct keys (a sender rotating
    /// keys, an attacker making up subscriptions) leave its size as it was,
    /// a heavy key among them is still held to its quota, and a key that
    /// arrives afterwards at an honest pace still gets its own.
    #[test]
    fn a_million_keys_leave_memory_and_limits_as_they_were() {
        let t = table(120, 60, 30); // the subscription default: 2/s, burst 30
        let h = Hasher::new([7; 32]);
        let (slots, bytes) = (t.slots(), t.memory_bytes());
        assert_eq!(slots, SLOTS);
        assert_eq!(bytes, SLOTS * 12);
        let heavy = h.slots(0, &[b"heavy"]);
        let mut heavy_admitted = 0u32;
        // A million one-off keys over 100 s (10,000 a second), the heavy
        // key pushing 10 a second among them.
        let start = 1000 * SEC;
        for i in 0u32..1_000_000 {
            let now = start + u64::from(i) * 100_000; // 100 µs apart
            let _ = t.admit(h.slots(0, &[&i.to_be_bytes()]), now);
            if i % 1000 == 0 && t.admit(heavy, now).is_ok() {
                heavy_admitted += 1;
            }
        }
        assert_eq!((t.slots(), t.memory_bytes()), (slots, bytes));
        // Its due over 100 s: 30 at once, then 2 a second. Never more; less
        // by the others' share of its slots (10,000 keys a second over
        // 65,536 slots, each key on two: about 0.3 a second of its 2).
        let due = 30 + 2 * 100;
        assert!(
            heavy_admitted <= due && heavy_admitted >= due * 3 / 4,
            "heavy key admitted {heavy_admitted}, its quota is {due}"
        );
        let end = start + 100 * SEC;
        let fresh = h.slots(0, &[b"an honest newcomer"]);
        let admitted = (0..40).filter(|_| t.admit(fresh, end).is_ok()).count();
        assert!(
            (28..=30).contains(&admitted),
            "a fresh key got {admitted} of its burst of 30"
        );
    }

    /// Two keys on one slot share it (stricter), but a key whose other slot
    /// is free keeps its own quota.
    #[test]
    fn collisions_only_make_a_key_stricter() {
        let t = table(1, 1, 3);
        let now = 10 * SEC;
        let (x, y, z) = (Slots([1, 2]), Slots([2, 3]), Slots([1, 3]));
        for _ in 0..3 {
            t.admit(x, now).unwrap();
        }
        assert!(t.admit(x, now).is_err());
        // y shares slot 2 with x, but slot 3 is empty: y keeps its own.
        for _ in 0..3 {
            t.admit(y, now).unwrap();
        }
        // z's slots are both full of others' pushes: refused for them.
        assert!(t.admit(z, now).is_err());
    }

    #[test]
    fn usage_is_taken_once_and_remote_usage_counts() {
        let t = table(1, 1, 10);
        let now = 10 * SEC;
        t.admit(Slots([5, 9]), now).unwrap();
        t.admit(Slots([5, 9]), now).unwrap();
        let mut out = Vec::new();
        t.take_usage(&mut out);
        assert_eq!(out, vec![(5, 2), (9, 2)]);
        out.clear();
        t.take_usage(&mut out);
        assert!(out.is_empty());
        // Another node took 6 on slots 5 and 9: two left of ten.
        t.charge_remote(5, 6, now);
        t.charge_remote(9, 6, now);
        t.charge_remote(u32::MAX, 6, now); // out of range: ignored
        t.admit(Slots([5, 9]), now).unwrap();
        t.admit(Slots([5, 9]), now).unwrap();
        assert!(t.admit(Slots([5, 9]), now).is_err());
        t.take_usage(&mut out);
        assert_eq!(
            out,
            vec![(5, 2), (9, 2)],
            "remote usage is not shared again"
        );
    }

    /// What the hot path costs: one keyed hash and one bucket check and
    /// update. Printed, not asserted (2 shared cores); run with
    /// `cargo test --release --lib quota::table -- --nocapture`.
    #[test]
    fn cost_of_one_admission() {
        let t = table(1000, 1, 2000);
        let h = Hasher::new([1; 32]);
        let n = 200_000u32;
        let key = [3u8; 32];
        let start = std::time::Instant::now();
        for i in 0..n {
            let at = h.slots(2, &[&key, &i.to_le_bytes()]);
            let _ = std::hint::black_box(t.admit(at, u64::from(i) * 1000));
        }
        let ns = start.elapsed().as_nanos() / u128::from(n);
        println!("one admission (hash + check + charge): {ns} ns");
    }
}
