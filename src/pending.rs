//! How many messages each user agent has waiting, kept in memory so a push
//! does not count the store. Counting means iterating the user agent's
//! messages, and right after acknowledgements that walks over their
//! deletion markers too: under load it was the largest cost of a push.
//!
//! The estimate only errs high (expired messages are not subtracted until
//! the next count), and the store is counted exactly whenever the estimate
//! reaches the limit, so a user agent is refused only when it really is full.

use crate::store::{Store, StoreResult};
use dashmap::DashMap;
use herald_proto::ids::Uaid;

/// Stored messages (an estimate that errs high) and pushes between
/// `reserve` and `added`/`released`: counting those too keeps concurrent
/// pushes from all passing the check at `limit - 1`.
#[derive(Default, Clone, Copy)]
struct Count {
    stored: usize,
    in_flight: usize,
}

#[derive(Default)]
pub struct PendingCounts {
    counts: DashMap<Uaid, Count>,
    /// Several nodes share the store: another node's acks never reach this
    /// node's counts, so the mailbox has the store count as it stores
    /// (`is_shared`) and never reserves here.
    shared: bool,
}

impl PendingCounts {
    /// For a store other nodes write to as well.
    pub fn shared() -> Self {
        PendingCounts {
            counts: DashMap::new(),
            shared: true,
        }
    }

    /// Whether other nodes write to the store too: then the store itself
    /// must check the limit as it stores (`Store::put_message_within`).
    pub fn is_shared(&self) -> bool {
        self.shared
    }

    /// Reserves room for one more message under `limit`; false when the
    /// user agent is full. A `true` must be followed by `added` (stored,
    /// replacing nothing) or `released` (not stored, or it replaced one).
    pub async fn reserve(
        &self,
        store: &dyn Store,
        uaid: &Uaid,
        now: u64,
        limit: usize,
    ) -> StoreResult<bool> {
        if let Some(mut c) = self.counts.get_mut(uaid) {
            if c.stored + c.in_flight < limit {
                c.in_flight += 1;
                return Ok(true);
            }
        }
        let exact = store.count_messages(uaid, now, limit).await?;
        let mut c = self.counts.entry(*uaid).or_default();
        c.stored = exact;
        if c.stored + c.in_flight < limit {
            c.in_flight += 1;
            Ok(true)
        } else {
            Ok(false)
        }
    }

    /// A reserved message was stored (and replaced none).
    pub fn added(&self, uaid: &Uaid) {
        if let Some(mut c) = self.counts.get_mut(uaid) {
            c.in_flight = c.in_flight.saturating_sub(1);
            c.stored += 1;
        }
    }

    /// A reservation ended without adding a message.
    pub fn released(&self, uaid: &Uaid) {
        if let Some(mut c) = self.counts.get_mut(uaid) {
            c.in_flight = c.in_flight.saturating_sub(1);
        }
    }

    /// A stored message was deleted.
    pub fn removed(&self, uaid: &Uaid) {
        if let Some(mut c) = self.counts.get_mut(uaid) {
            c.stored = c.stored.saturating_sub(1);
        }
    }

    /// Messages vanished in bulk (unregister, user agent dropped): count
    /// again next time.
    pub fn forget(&self, uaid: &Uaid) {
        self.counts.remove(uaid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{now_secs, MemStore, Message, Store};
    use herald_proto::urgency::Urgency;

    async fn put(store: &MemStore, uaid: &Uaid, ttl: u64) {
        let m = Message {
            seq: store.next_seq(),
            channel: uuid::Uuid::nil(),
            expires_at: now_secs() + ttl,
            ttl,
            urgency: Urgency::Normal,
            topic: None,
            headers: None,
            data: bytes::Bytes::new(),
            receipt: false,
        };
        store.put_message(uaid, &m).await.unwrap();
    }

    #[tokio::test]
    async fn refuses_only_when_the_store_is_really_full() {
        let store = MemStore::new();
        let counts = PendingCounts::default();
        let u = Uaid::random();
        for _ in 0..3 {
            assert!(counts.reserve(&store, &u, now_secs(), 3).await.unwrap());
            put(&store, &u, 60).await;
            counts.added(&u);
        }
        assert!(!counts.reserve(&store, &u, now_secs(), 3).await.unwrap());
        // The estimate is high after an expiry; the exact recount at the
        // limit finds the room.
        let first = store.read_messages(&u, 0, 1).await.unwrap()[0].seq;
        store.delete_message(&u, first).await.unwrap();
        assert!(counts.reserve(&store, &u, now_secs(), 3).await.unwrap());
        counts.removed(&u);
        counts.forget(&u);
        assert!(counts.reserve(&store, &u, now_secs(), 3).await.unwrap());
    }

    #[tokio::test]
    async fn pushes_in_flight_count_against_the_limit() {
        let store = MemStore::new();
        let counts = PendingCounts::default();
        let u = Uaid::random();
        // Three concurrent pushes reserve before any is stored.
        for _ in 0..3 {
            assert!(counts.reserve(&store, &u, now_secs(), 3).await.unwrap());
        }
        assert!(!counts.reserve(&store, &u, now_secs(), 3).await.unwrap());
        // One failed or replaced a message: its room is free again.
        counts.released(&u);
        assert!(counts.reserve(&store, &u, now_secs(), 3).await.unwrap());
        assert!(!counts.reserve(&store, &u, now_secs(), 3).await.unwrap());
    }
}
