//! How many messages each user agent has waiting, kept in memory so a push
//! does not count the store. Counting means iterating the user agent's
//! messages, and right after acknowledgements that walks over their
//! deletion markers too: under load it was the largest cost of a push.
//!
//! The estimate only errs high (expired messages are not subtracted until
//! the next count), and the store is counted exactly whenever the estimate
//! reaches the limit, so a user agent is refused only when it really is full.

use crate::ids::Uaid;
use crate::store::{Store, StoreResult};
use dashmap::DashMap;

#[derive(Default)]
pub struct PendingCounts {
    counts: DashMap<Uaid, usize>,
    /// Several nodes share the store: another node's acks never reach this
    /// node's counts, so count in the store every time.
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

    /// Whether one more message fits under `limit`.
    pub async fn has_room(
        &self,
        store: &dyn Store,
        uaid: &Uaid,
        now: u64,
        limit: usize,
    ) -> StoreResult<bool> {
        if self.shared {
            return Ok(store.count_messages(uaid, now, limit).await? < limit);
        }
        if self.counts.get(uaid).is_some_and(|c| *c < limit) {
            return Ok(true);
        }
        let exact = store.count_messages(uaid, now, limit).await?;
        self.counts.insert(*uaid, exact);
        Ok(exact < limit)
    }

    /// A message was stored (and replaced none).
    pub fn added(&self, uaid: &Uaid) {
        if let Some(mut c) = self.counts.get_mut(uaid) {
            *c += 1;
        }
    }

    /// A stored message was deleted.
    pub fn removed(&self, uaid: &Uaid) {
        if let Some(mut c) = self.counts.get_mut(uaid) {
            *c = c.saturating_sub(1);
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
    use crate::store::{now_secs, Message, RocksStore, Store};
    use crate::webpush::Urgency;

    async fn put(store: &RocksStore, uaid: &Uaid, ttl: u64) {
        let m = Message {
            seq: store.next_seq(),
            channel: uuid::Uuid::nil(),
            expires_at: now_secs() + ttl,
            ttl,
            urgency: Urgency::Normal,
            topic: None,
            headers: None,
            data: bytes::Bytes::new(),
        };
        store.put_message(uaid, &m).await.unwrap();
    }

    #[tokio::test]
    async fn refuses_only_when_the_store_is_really_full() {
        let dir = tempfile::tempdir().unwrap();
        let store = RocksStore::open(dir.path(), false, None).unwrap();
        let counts = PendingCounts::default();
        let u = Uaid::random();
        for _ in 0..3 {
            assert!(counts.has_room(&store, &u, now_secs(), 3).await.unwrap());
            put(&store, &u, 60).await;
            counts.added(&u);
        }
        assert!(!counts.has_room(&store, &u, now_secs(), 3).await.unwrap());
        // The estimate is high after an expiry; the exact recount at the
        // limit finds the room.
        let first = store.read_messages(&u, 0, 1).await.unwrap()[0].seq;
        store.delete_message(&u, first).await.unwrap();
        assert!(counts.has_room(&store, &u, now_secs(), 3).await.unwrap());
        counts.removed(&u);
        counts.forget(&u);
        assert!(counts.has_room(&store, &u, now_secs(), 3).await.unwrap());
    }
}
