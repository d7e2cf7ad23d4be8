//! A count of things held open at once (websocket connections, receipt
//! streams) with a ceiling. A place is taken as a `Held` guard and given
//! back when the guard drops, so no way out of a connection or stream (an
//! error, a panic, a dropped future) can leak a place or give one back twice.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

#[derive(Default)]
pub struct Occupancy {
    held: AtomicUsize,
}

/// One place in an `Occupancy`; released on drop.
pub struct Held {
    of: Arc<Occupancy>,
}

impl Occupancy {
    pub fn new() -> Arc<Self> {
        Arc::new(Occupancy::default())
    }

    /// Takes a place if fewer than `max` are held; `None` when full.
    pub fn try_hold(self: &Arc<Self>, max: usize) -> Option<Held> {
        self.held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| Held { of: self.clone() })
    }

    /// Places held now.
    pub fn get(&self) -> usize {
        self.held.load(Ordering::Acquire)
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.of.held.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_are_refused_at_the_ceiling_and_given_back_on_drop() {
        let o = Occupancy::new();
        let a = o.try_hold(2).expect("first");
        let b = o.try_hold(2).expect("second");
        assert!(o.try_hold(2).is_none());
        assert_eq!(o.get(), 2);
        drop(a);
        assert_eq!(o.get(), 1);
        let c = o.try_hold(2).expect("a freed place");
        drop((b, c));
        assert_eq!(o.get(), 0);
    }

    #[test]
    fn a_refused_place_leaves_the_count_alone() {
        let o = Occupancy::new();
        assert!(o.try_hold(0).is_none());
        assert_eq!(o.get(), 0);
    }
}
