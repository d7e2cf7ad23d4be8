//! The in-memory store: every trait of this module over plain maps behind
//! one lock, with RocksDB's semantics for a single node (TTL expiry by the
//! wall clock, topic replacement, oldest-first order by seq, capped counts,
//! the receipt ledger's settle-once rule). It keeps nothing across a
//! restart, so it is for tests and tools: unit tests of the session and
//! the router run on it without opening a database, and the store contract
//! tests hold it to the same cases as the real engines.
//!
//! One `std::sync::Mutex` covers everything: no step awaits while holding
//! it, and taking it once per operation makes every multi-key step (topic
//! replacement, a channel's removal, a settle) atomic, as the traits ask.

use super::{
    now_micros, now_secs, ChannelRecord, Claim, Directory, Message, Outcome, Owner, PendingReceipt,
    PutOutcome, ReceiptEvent, ReceiptState, ReceiptStore, ReceiptSub, Store, StoreError,
    StoreResult, StoreStats, UserRecord, ACK_GRACE_SECS,
};
use herald_proto::ids::{ChannelId, Uaid};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

#[derive(Default)]
pub struct MemStore {
    state: Mutex<State>,
    /// The last sequence number handed out.
    seq: AtomicU64,
    /// How many of the next deletions fail as an unreachable Redis does,
    /// so tests can drive what follows a failed ack.
    failing_deletes: AtomicU64,
}

#[derive(Default)]
struct State {
    users: BTreeMap<Uaid, UserRecord>,
    agents: HashMap<Uaid, Agent>,
    broadcasts: BTreeMap<String, String>,
    blocks: BTreeMap<String, String>,
    ledger: Ledger,
    owners: HashMap<Uaid, Owner>,
    /// Node id → its URL and when its heartbeat lapses.
    nodes: HashMap<u64, (String, Instant)>,
    /// The bridges' outbox: user agent → due time (Unix ms).
    outbox: HashMap<Uaid, u64>,
    /// Quota usage published: (id, node, message), the last `USAGE_KEPT`.
    usage: std::collections::VecDeque<(u64, u64, Vec<u8>)>,
    usage_ids: u64,
}

/// Quota usage messages kept for nodes to read (as Redis's stream keeps).
const USAGE_KEPT: usize = 256;

/// One user agent's subscriptions and queue.
#[derive(Default)]
struct Agent {
    channels: BTreeMap<ChannelId, ChannelRecord>,
    /// Keyed by seq, so iteration is oldest first.
    messages: BTreeMap<u64, Message>,
    /// (subscription, topic) → the seq last stored under it.
    topics: HashMap<(ChannelId, String), u64>,
}

#[derive(Default)]
struct Ledger {
    pending: HashMap<(Uaid, u64), PendingReceipt>,
    /// A settled message → where its receipt is listed.
    settled: HashMap<(Uaid, u64), (ReceiptSub, u64)>,
    /// Receipts by subscription and id: the order `receipts` pages in.
    events: BTreeMap<(ReceiptSub, u64), ReceiptEvent>,
}

impl MemStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// The next `n` message deletions fail (`StoreError::Unavailable`).
    pub fn fail_next_deletes(&self, n: u64) {
        self.failing_deletes.store(n, Ordering::SeqCst);
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere while holding the lock leaves the maps whole
        // (every step finishes its edits before it can panic): keep going.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Wall-clock microseconds, never repeating, as RocksDB's engine hands them
/// out (the contract says seqs are microseconds and fit an f64 exactly).
fn next_after(seq: &AtomicU64) -> u64 {
    let now = now_micros();
    let prev = seq
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |p| {
            Some(p.max(now.saturating_sub(1)) + 1)
        })
        .expect("closure always returns Some");
    prev.max(now.saturating_sub(1)) + 1
}

impl Ledger {
    fn settle(
        &mut self,
        uaid: &Uaid,
        seq: u64,
        outcome: Outcome,
        at_ms: u64,
        id: u64,
    ) -> Option<(ReceiptSub, ReceiptEvent)> {
        let p = self.pending.remove(&(*uaid, seq))?;
        let event = ReceiptEvent {
            id,
            uaid: *uaid,
            channel: p.channel,
            seq,
            outcome,
            at: at_ms,
        };
        self.events.insert((p.sub, id), event);
        self.settled.insert((*uaid, seq), (p.sub, id));
        Some((p.sub, event))
    }
}

/// The deadline a sent message has: `ACK_GRACE_SECS` past its expiry.
fn with_grace(p: &PendingReceipt) -> u64 {
    if p.sent_at.is_some() {
        p.deadline.max(p.expires_at.saturating_add(ACK_GRACE_SECS))
    } else {
        p.deadline
    }
}

#[async_trait::async_trait]
impl Store for MemStore {
    async fn get_user(&self, uaid: &Uaid) -> StoreResult<Option<UserRecord>> {
        Ok(self.state().users.get(uaid).cloned())
    }

    async fn put_user(&self, uaid: &Uaid, record: &UserRecord) -> StoreResult<()> {
        self.state().users.insert(*uaid, record.clone());
        Ok(())
    }

    async fn drop_user(&self, uaid: &Uaid) -> StoreResult<()> {
        let mut s = self.state();
        s.users.remove(uaid);
        s.agents.remove(uaid);
        Ok(())
    }

    async fn stale_users(&self, cutoff: u64, limit: usize) -> StoreResult<Vec<Uaid>> {
        Ok(self
            .state()
            .users
            .iter()
            .filter(|(_, r)| r.last_seen < cutoff)
            .map(|(u, _)| *u)
            .take(limit)
            .collect())
    }

    async fn get_channel(
        &self,
        uaid: &Uaid,
        channel: &ChannelId,
    ) -> StoreResult<Option<ChannelRecord>> {
        Ok(self
            .state()
            .agents
            .get(uaid)
            .and_then(|a| a.channels.get(channel).copied()))
    }

    async fn put_channel(
        &self,
        uaid: &Uaid,
        channel: &ChannelId,
        record: &ChannelRecord,
    ) -> StoreResult<()> {
        let mut s = self.state();
        let agent = s.agents.entry(*uaid).or_default();
        agent.channels.insert(*channel, *record);
        Ok(())
    }

    async fn remove_channel(&self, uaid: &Uaid, channel: &ChannelId) -> StoreResult<bool> {
        let mut s = self.state();
        let Some(agent) = s.agents.get_mut(uaid) else {
            return Ok(false);
        };
        let existed = agent.channels.remove(channel).is_some();
        agent.messages.retain(|_, m| m.channel != *channel);
        agent.topics.retain(|(c, _), _| c != channel);
        Ok(existed)
    }

    async fn count_channels(&self, uaid: &Uaid, limit: usize) -> StoreResult<usize> {
        let s = self.state();
        let n = s.agents.get(uaid).map_or(0, |a| a.channels.len());
        Ok(n.min(limit))
    }

    async fn list_channels(&self, uaid: &Uaid) -> StoreResult<Vec<ChannelId>> {
        let s = self.state();
        Ok(s.agents
            .get(uaid)
            .map(|a| a.channels.keys().copied().collect())
            .unwrap_or_default())
    }

    fn next_seq(&self) -> u64 {
        next_after(&self.seq)
    }

    async fn put_message(&self, uaid: &Uaid, message: &Message) -> StoreResult<PutOutcome> {
        let mut s = self.state();
        let agent = s.agents.entry(*uaid).or_default();
        let mut replaced = None;
        if let Some(topic) = &message.topic {
            let key = (message.channel, topic.clone());
            if let Some(old) = agent.topics.insert(key, message.seq) {
                // Only a message still pending is replaced: one already
                // acknowledged is gone, and the new one stands alone.
                if old != message.seq && agent.messages.remove(&old).is_some() {
                    replaced = Some(old);
                }
            }
        }
        agent.messages.insert(message.seq, message.clone());
        Ok(PutOutcome {
            replaced,
            seq: message.seq,
            ..Default::default()
        })
    }

    async fn read_messages(
        &self,
        uaid: &Uaid,
        after: u64,
        limit: usize,
    ) -> StoreResult<Vec<Message>> {
        if limit == 0 || after == u64::MAX {
            return Ok(Vec::new());
        }
        let now = now_secs();
        let s = self.state();
        let Some(agent) = s.agents.get(uaid) else {
            return Ok(Vec::new());
        };
        Ok(agent
            .messages
            .range(after + 1..)
            .map(|(_, m)| m)
            .filter(|m| !m.expired(now))
            .take(limit)
            .cloned()
            .collect())
    }

    async fn get_message(&self, uaid: &Uaid, seq: u64) -> StoreResult<Option<Message>> {
        let now = now_secs();
        let s = self.state();
        Ok(s.agents
            .get(uaid)
            .and_then(|a| a.messages.get(&seq))
            .filter(|m| !m.expired(now))
            .cloned())
    }

    async fn delete_message(&self, uaid: &Uaid, seq: u64) -> StoreResult<bool> {
        let fail = |n: u64| n.checked_sub(1);
        if self
            .failing_deletes
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, fail)
            .is_ok()
        {
            return Err(StoreError::Unavailable(
                "mem: deletion failed on purpose".into(),
            ));
        }
        let mut s = self.state();
        Ok(s.agents
            .get_mut(uaid)
            .is_some_and(|a| a.messages.remove(&seq).is_some()))
    }

    async fn count_messages(&self, uaid: &Uaid, now: u64, limit: usize) -> StoreResult<usize> {
        let s = self.state();
        Ok(s.agents.get(uaid).map_or(0, |a| {
            a.messages
                .values()
                .filter(|m| !m.expired(now))
                .take(limit)
                .count()
        }))
    }

    async fn broadcasts(&self) -> StoreResult<BTreeMap<String, String>> {
        Ok(self.state().broadcasts.clone())
    }

    async fn put_broadcast(&self, id: &str, version: &str) -> StoreResult<()> {
        self.state()
            .broadcasts
            .insert(id.to_string(), version.to_string());
        Ok(())
    }

    async fn blocks(&self) -> StoreResult<BTreeMap<String, String>> {
        Ok(self.state().blocks.clone())
    }

    async fn put_block(&self, id: &str, record: &str) -> StoreResult<()> {
        self.state()
            .blocks
            .insert(id.to_string(), record.to_string());
        Ok(())
    }

    async fn remove_block(&self, id: &str) -> StoreResult<bool> {
        Ok(self.state().blocks.remove(id).is_some())
    }

    async fn purge_expired(&self) -> StoreResult<()> {
        let now = now_secs();
        let mut s = self.state();
        for agent in s.agents.values_mut() {
            agent.messages.retain(|_, m| !m.expired(now));
        }
        Ok(())
    }

    async fn flush(&self) -> StoreResult<()> {
        Ok(())
    }

    async fn health_check(&self) -> StoreResult<()> {
        Ok(())
    }

    async fn outbox_add(&self, uaid: &Uaid, due_ms: u64) -> StoreResult<bool> {
        let mut s = self.state();
        if s.outbox.contains_key(uaid) {
            return Ok(false);
        }
        s.outbox.insert(*uaid, due_ms);
        Ok(true)
    }

    async fn outbox_set(&self, uaid: &Uaid, due_ms: u64) -> StoreResult<()> {
        self.state().outbox.insert(*uaid, due_ms);
        Ok(())
    }

    async fn outbox_take(
        &self,
        now_ms: u64,
        lease_until_ms: u64,
        limit: usize,
    ) -> StoreResult<Vec<Uaid>> {
        let mut s = self.state();
        let mut due: Vec<(u64, Uaid)> = s
            .outbox
            .iter()
            .filter(|(_, at)| **at <= now_ms)
            .map(|(u, at)| (*at, *u))
            .collect();
        due.sort();
        due.truncate(limit);
        for (_, uaid) in &due {
            s.outbox.insert(*uaid, lease_until_ms);
        }
        Ok(due.into_iter().map(|(_, u)| u).collect())
    }

    async fn outbox_remove(&self, uaid: &Uaid) -> StoreResult<()> {
        self.state().outbox.remove(uaid);
        Ok(())
    }

    async fn outbox_due(&self, uaid: &Uaid) -> StoreResult<Option<u64>> {
        Ok(self.state().outbox.get(uaid).copied())
    }

    async fn checkpoint(
        &self,
        _dir: &std::path::Path,
    ) -> Result<&'static str, super::CheckpointError> {
        Err(super::CheckpointError::Unsupported(
            "the in-memory store keeps nothing durable to back up",
        ))
    }

    fn stats(&self) -> StoreStats {
        let s = self.state();
        let messages = s.agents.values().flat_map(|a| a.messages.values());
        let (count, bytes) =
            messages.fold((0u64, 0u64), |(n, b), m| (n + 1, b + m.data.len() as u64));
        StoreStats {
            estimated_messages: count,
            size_bytes: bytes,
            pending_compaction_bytes: 0,
        }
    }
}

#[async_trait::async_trait]
impl ReceiptStore for MemStore {
    async fn track(&self, uaid: &Uaid, seq: u64, pending: &PendingReceipt) -> StoreResult<()> {
        self.state().ledger.pending.insert((*uaid, seq), *pending);
        Ok(())
    }

    async fn mark_sent(&self, uaid: &Uaid, seq: u64, at_ms: u64) -> StoreResult<()> {
        let mut s = self.state();
        if let Some(p) = s.ledger.pending.get_mut(&(*uaid, seq)) {
            p.sent_at.get_or_insert(at_ms);
        }
        Ok(())
    }

    async fn settle(
        &self,
        uaid: &Uaid,
        seq: u64,
        outcome: Outcome,
        at_ms: u64,
    ) -> StoreResult<Option<(ReceiptSub, ReceiptEvent)>> {
        let id = self.next_seq();
        Ok(self.state().ledger.settle(uaid, seq, outcome, at_ms, id))
    }

    async fn forget(&self, uaid: &Uaid, seq: u64) -> StoreResult<()> {
        self.state().ledger.pending.remove(&(*uaid, seq));
        Ok(())
    }

    async fn settle_all(
        &self,
        uaid: &Uaid,
        channel: Option<ChannelId>,
        outcome: Outcome,
        at_ms: u64,
    ) -> StoreResult<Vec<(ReceiptSub, ReceiptEvent)>> {
        let mut s = self.state();
        let mut seqs: Vec<u64> = s
            .ledger
            .pending
            .iter()
            .filter(|((u, _), p)| u == uaid && channel.is_none_or(|c| c == p.channel))
            .map(|((_, seq), _)| *seq)
            .collect();
        seqs.sort_unstable();
        Ok(seqs
            .into_iter()
            .filter_map(|seq| {
                let id = self.next_seq();
                s.ledger.settle(uaid, seq, outcome, at_ms, id)
            })
            .collect())
    }

    async fn settle_expired(
        &self,
        now: u64,
        limit: usize,
        at_ms: u64,
    ) -> StoreResult<Vec<(ReceiptSub, ReceiptEvent)>> {
        let mut s = self.state();
        let mut due: Vec<(u64, Uaid, u64)> = s
            .ledger
            .pending
            .iter()
            .filter(|(_, p)| p.deadline <= now)
            .map(|((u, seq), p)| (p.deadline, *u, *seq))
            .collect();
        due.sort_unstable();
        due.truncate(limit);
        let mut settled = Vec::with_capacity(due.len());
        for (_, uaid, seq) in due {
            let Some(p) = s.ledger.pending.get_mut(&(uaid, seq)) else {
                continue;
            };
            // A sent message earns its grace for the ack on its way.
            let deadline = with_grace(p);
            if deadline > now {
                p.deadline = deadline;
                continue;
            }
            let id = self.next_seq();
            settled.extend(s.ledger.settle(&uaid, seq, Outcome::Expired, at_ms, id));
        }
        Ok(settled)
    }

    async fn receipts(
        &self,
        sub: &ReceiptSub,
        after: u64,
        limit: usize,
    ) -> StoreResult<Vec<ReceiptEvent>> {
        if after == u64::MAX {
            return Ok(Vec::new());
        }
        let s = self.state();
        Ok(s.ledger
            .events
            .range((*sub, after + 1)..=(*sub, u64::MAX))
            .map(|(_, e)| *e)
            .take(limit)
            .collect())
    }

    async fn receipt_state(&self, uaid: &Uaid, seq: u64) -> StoreResult<Option<ReceiptState>> {
        let s = self.state();
        if let Some(p) = s.ledger.pending.get(&(*uaid, seq)) {
            // As the sweep will see it.
            let mut p = *p;
            p.deadline = with_grace(&p);
            return Ok(Some(ReceiptState::Pending(p)));
        }
        Ok(s.ledger
            .settled
            .get(&(*uaid, seq))
            .and_then(|key| s.ledger.events.get(key))
            .map(|e| ReceiptState::Settled(*e)))
    }

    async fn purge_receipts(&self, before_ms: u64) -> StoreResult<u64> {
        let mut s = self.state();
        let ledger = &mut s.ledger;
        let old: Vec<(ReceiptSub, u64)> = ledger
            .events
            .iter()
            .filter(|(_, e)| e.at < before_ms)
            .map(|(k, _)| *k)
            .collect();
        for key in &old {
            if let Some(e) = ledger.events.remove(key) {
                ledger.settled.remove(&(e.uaid, e.seq));
            }
        }
        Ok(old.len() as u64)
    }
}

/// One node's directory: a single process is the whole cluster, so this
/// only keeps the claims and heartbeats in memory (the router's unit tests
/// need nothing more).
#[async_trait::async_trait]
impl Directory for MemStore {
    async fn claim(&self, uaid: &Uaid, owner: &Owner) -> StoreResult<Claim> {
        let mut s = self.state();
        match s.owners.get(uaid) {
            Some(cur) if cur.since > owner.since => Ok(Claim::Lost { newer: *cur }),
            _ => Ok(Claim::Won {
                replaced: s.owners.insert(*uaid, *owner),
            }),
        }
    }

    async fn release(&self, uaid: &Uaid, owner: &Owner) -> StoreResult<()> {
        let mut s = self.state();
        if s.owners.get(uaid) == Some(owner) {
            s.owners.remove(uaid);
        }
        Ok(())
    }

    async fn owner(&self, uaid: &Uaid) -> StoreResult<Option<Owner>> {
        Ok(self.state().owners.get(uaid).copied())
    }

    async fn heartbeat(&self, node: u64, url: &str, ttl: Duration) -> StoreResult<()> {
        let lapses = Instant::now() + ttl;
        self.state().nodes.insert(node, (url.to_string(), lapses));
        Ok(())
    }

    async fn node_url(&self, node: u64) -> StoreResult<Option<String>> {
        let s = self.state();
        Ok(s.nodes
            .get(&node)
            .filter(|(_, lapses)| *lapses > Instant::now())
            .map(|(url, _)| url.clone()))
    }
    async fn share_usage(
        &self,
        node: u64,
        usage: &[u8],
        cursor: Option<&str>,
    ) -> StoreResult<(String, Vec<Vec<u8>>)> {
        let mut s = self.state();
        let after = match cursor.and_then(|c| c.parse::<u64>().ok()) {
            Some(c) => c,
            None => s.usage_ids,
        };
        if !usage.is_empty() {
            s.usage_ids += 1;
            let id = s.usage_ids;
            s.usage.push_back((id, node, usage.to_vec()));
            if s.usage.len() > USAGE_KEPT {
                s.usage.pop_front();
            }
        }
        let others = s
            .usage
            .iter()
            .filter(|(id, from, _)| *id > after && *from != node)
            .map(|(_, _, m)| m.clone())
            .collect();
        Ok((s.usage_ids.to_string(), others))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner(conn: u64, since: u64) -> Owner {
        Owner {
            node: 1,
            conn,
            since,
        }
    }

    #[tokio::test]
    async fn the_newest_claim_wins_and_only_its_owner_releases() {
        let d = MemStore::new();
        let u = Uaid::random();
        let (old, new) = (owner(1, 10), owner(2, 20));
        assert_eq!(
            d.claim(&u, &old).await.unwrap(),
            Claim::Won { replaced: None }
        );
        assert_eq!(
            d.claim(&u, &new).await.unwrap(),
            Claim::Won {
                replaced: Some(old)
            }
        );
        assert_eq!(d.claim(&u, &old).await.unwrap(), Claim::Lost { newer: new });
        d.release(&u, &old).await.unwrap();
        assert_eq!(d.owner(&u).await.unwrap(), Some(new));
        d.release(&u, &new).await.unwrap();
        assert_eq!(d.owner(&u).await.unwrap(), None);
    }

    #[tokio::test]
    async fn a_node_is_reachable_until_its_heartbeat_lapses() {
        let d = MemStore::new();
        d.heartbeat(7, "http://127.0.0.1:1", Duration::from_secs(60))
            .await
            .unwrap();
        d.heartbeat(8, "http://127.0.0.1:2", Duration::ZERO)
            .await
            .unwrap();
        assert_eq!(
            d.node_url(7).await.unwrap().as_deref(),
            Some("http://127.0.0.1:1")
        );
        assert_eq!(d.node_url(8).await.unwrap(), None);
        assert_eq!(d.node_url(9).await.unwrap(), None);
    }
}
