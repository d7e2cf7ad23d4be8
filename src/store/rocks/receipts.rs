//! The receipt ledger in RocksDB: one column family, record kinds told
//! apart by a one-byte prefix.
//!
//! - `p` uaid seq → pending receipt
//! - `x` deadline uaid seq → (empty): the expiry sweep's index
//! - `e` sub id → receipt: what a receipt subscription lists
//! - `o` uaid seq → sub id: a settled message's receipt, for its status
//! - `t` at sub id → uaid seq: decided receipts by age, for the purge
//!
//! Every step that reads before it writes holds the user agent's lock, so
//! each message is settled once.

use super::super::codec::{
    decode_pending, decode_receipt, encode_pending, encode_receipt, prefix_end,
};
use super::super::{
    Outcome, PendingReceipt, ReceiptEvent, ReceiptState, ReceiptStore, ReceiptSub, StoreResult,
    ACK_GRACE_SECS,
};
use super::{err, Rocks, RocksStore, RECEIPTS};
use herald_proto::ids::{ChannelId, Uaid};
use rocksdb::{Direction, IteratorMode, ReadOptions, WriteBatch};
use std::sync::atomic::{AtomicU64, Ordering};

/// Where the next expiry sweep starts reading the `x` index. Everything
/// due before it was settled by an earlier sweep, and acked messages leave
/// deletion markers there that a sweep from the start would walk every
/// second. The floor trails the last sweep by `SWEEP_OVERLAP` seconds, for
/// pushes that computed their deadline just before a sweep and indexed it
/// just after; every `FULL_SWEEP_EVERY` sweeps start from the beginning,
/// for a push stalled longer than that.
#[derive(Default)]
pub struct SweepFloor {
    floor: AtomicU64,
    sweeps: AtomicU64,
}

const SWEEP_OVERLAP: u64 = 5;
const FULL_SWEEP_EVERY: u64 = 60;

/// `kind | id 16 | n u64`: the shape of every key but the time-ordered ones.
fn key(kind: u8, id: &[u8; 16], n: u64) -> [u8; 25] {
    let mut k = [0u8; 25];
    k[0] = kind;
    k[1..17].copy_from_slice(id);
    k[17..].copy_from_slice(&n.to_be_bytes());
    k
}

/// `kind | at u64 | id 16 | n u64`: an index ordered by time.
fn timed_key(kind: u8, at: u64, id: &[u8; 16], n: u64) -> [u8; 33] {
    let mut k = [0u8; 33];
    k[0] = kind;
    k[1..9].copy_from_slice(&at.to_be_bytes());
    k[9..].copy_from_slice(&key(0, id, n)[1..]);
    k
}

fn uaid_seq_key(kind: u8, uaid: &Uaid, seq: u64) -> [u8; 25] {
    key(kind, &uaid.0, seq)
}

fn expiry_key(deadline: u64, uaid: &Uaid, seq: u64) -> [u8; 33] {
    timed_key(b'x', deadline, &uaid.0, seq)
}

fn event_key(sub: &ReceiptSub, id: u64) -> [u8; 25] {
    key(b'e', &sub.0, id)
}

fn age_key(at: u64, sub: &ReceiptSub, id: u64) -> [u8; 33] {
    timed_key(b't', at, &sub.0, id)
}

fn uaid_seq(bytes: &[u8]) -> Option<(Uaid, u64)> {
    Some((
        Uaid(bytes.get(..16)?.try_into().ok()?),
        u64::from_be_bytes(bytes.get(16..24)?.try_into().ok()?),
    ))
}

impl Rocks {
    fn pending(&self, uaid: &Uaid, seq: u64) -> StoreResult<Option<PendingReceipt>> {
        Ok(self
            .db
            .get_pinned_cf(self.cf(RECEIPTS), uaid_seq_key(b'p', uaid, seq))
            .map_err(err)?
            .and_then(|v| decode_pending(&v)))
    }

    pub fn track_receipt(&self, uaid: &Uaid, seq: u64, p: &PendingReceipt) -> StoreResult<()> {
        let cf = self.cf(RECEIPTS);
        let mut b = WriteBatch::default();
        b.put_cf(cf, uaid_seq_key(b'p', uaid, seq), encode_pending(p));
        b.put_cf(cf, expiry_key(p.deadline, uaid, seq), []);
        self.write(b)
    }

    pub fn mark_sent(&self, uaid: &Uaid, seq: u64, at_ms: u64) -> StoreResult<()> {
        let _guard = self.topic_lock(uaid);
        let Some(mut p) = self.pending(uaid, seq)? else {
            return Ok(());
        };
        if p.sent_at.is_some() {
            return Ok(());
        }
        // The grace it earns is applied by the sweep, the rare time it
        // matters; most messages are acked long before their expiry, and
        // moving their index entry here would be two more writes each.
        p.sent_at = Some(at_ms);
        self.db
            .put_cf_opt(
                self.cf(RECEIPTS),
                uaid_seq_key(b'p', uaid, seq),
                encode_pending(&p),
                &self.write_opts,
            )
            .map_err(err)
    }

    /// A due message that was sent gets `ACK_GRACE_SECS` past its expiry
    /// for its ack: its index entry moves there. True if it moved.
    fn postpone_if_sent(&self, uaid: &Uaid, seq: u64, now: u64) -> StoreResult<bool> {
        let _guard = self.topic_lock(uaid);
        let Some(mut p) = self.pending(uaid, seq)? else {
            return Ok(false);
        };
        let deadline = p.deadline.max(p.expires_at.saturating_add(ACK_GRACE_SECS));
        if p.sent_at.is_none() || deadline <= now {
            return Ok(false);
        }
        let cf = self.cf(RECEIPTS);
        let mut b = WriteBatch::default();
        b.delete_cf(cf, expiry_key(p.deadline, uaid, seq));
        b.put_cf(cf, expiry_key(deadline, uaid, seq), []);
        p.deadline = deadline;
        b.put_cf(cf, uaid_seq_key(b'p', uaid, seq), encode_pending(&p));
        self.write(b)?;
        Ok(true)
    }

    pub fn settle(
        &self,
        uaid: &Uaid,
        seq: u64,
        outcome: Outcome,
        at_ms: u64,
    ) -> StoreResult<Option<(ReceiptSub, ReceiptEvent)>> {
        let _guard = self.topic_lock(uaid);
        let Some(p) = self.pending(uaid, seq)? else {
            return Ok(None);
        };
        let event = ReceiptEvent {
            id: self.next_seq(),
            uaid: *uaid,
            channel: p.channel,
            seq,
            outcome,
            at: at_ms,
        };
        let cf = self.cf(RECEIPTS);
        let mut b = WriteBatch::default();
        b.delete_cf(cf, uaid_seq_key(b'p', uaid, seq));
        b.delete_cf(cf, expiry_key(p.deadline, uaid, seq));
        b.put_cf(cf, event_key(&p.sub, event.id), encode_receipt(&event));
        b.put_cf(
            cf,
            uaid_seq_key(b'o', uaid, seq),
            &event_key(&p.sub, event.id)[1..],
        );
        b.put_cf(
            cf,
            age_key(at_ms, &p.sub, event.id),
            &uaid_seq_key(0, uaid, seq)[1..],
        );
        self.write(b)?;
        Ok(Some((p.sub, event)))
    }

    pub fn forget_receipt(&self, uaid: &Uaid, seq: u64) -> StoreResult<()> {
        let _guard = self.topic_lock(uaid);
        let Some(p) = self.pending(uaid, seq)? else {
            return Ok(());
        };
        let cf = self.cf(RECEIPTS);
        let mut b = WriteBatch::default();
        b.delete_cf(cf, uaid_seq_key(b'p', uaid, seq));
        b.delete_cf(cf, expiry_key(p.deadline, uaid, seq));
        self.write(b)
    }

    pub fn settle_all(
        &self,
        uaid: &Uaid,
        channel: Option<ChannelId>,
        outcome: Outcome,
        at_ms: u64,
    ) -> StoreResult<Vec<(ReceiptSub, ReceiptEvent)>> {
        let mut prefix = [0u8; 17];
        prefix[0] = b'p';
        prefix[1..].copy_from_slice(&uaid.0);
        let mut seqs = Vec::new();
        self.for_prefix(RECEIPTS, &prefix, |k, v| {
            let matches =
                channel.is_none() || decode_pending(v).is_some_and(|p| Some(p.channel) == channel);
            if let (true, Some((_, seq))) = (matches, uaid_seq(&k[1..])) {
                seqs.push(seq);
            }
            true
        })?;
        let mut settled = Vec::with_capacity(seqs.len());
        for seq in seqs {
            settled.extend(self.settle(uaid, seq, outcome, at_ms)?);
        }
        Ok(settled)
    }

    pub fn settle_expired(
        &self,
        now: u64,
        limit: usize,
        at_ms: u64,
    ) -> StoreResult<Vec<(ReceiptSub, ReceiptEvent)>> {
        let sweep = &self.receipt_sweep;
        let from = if sweep.sweeps.fetch_add(1, Ordering::Relaxed) % FULL_SWEEP_EVERY == 0 {
            0
        } else {
            sweep.floor.load(Ordering::Relaxed)
        };
        let mut due = Vec::new();
        let mut ro = ReadOptions::default();
        let mut start = vec![b'x'];
        start.extend_from_slice(&from.to_be_bytes());
        let mut end = vec![b'x'];
        end.extend_from_slice(&now.saturating_add(1).to_be_bytes());
        ro.set_iterate_upper_bound(end);
        for item in self.db.iterator_cf_opt(
            self.cf(RECEIPTS),
            ro,
            IteratorMode::From(&start, Direction::Forward),
        ) {
            let (k, _) = item.map_err(err)?;
            let Some(deadline) = k.get(1..9).and_then(|d| d.try_into().ok()) else {
                continue;
            };
            if u64::from_be_bytes(deadline) > now || due.len() >= limit {
                break;
            }
            due.extend(uaid_seq(&k[9..]));
        }
        let complete = due.len() < limit;
        let mut settled = Vec::with_capacity(due.len());
        for (uaid, seq) in due {
            if self.postpone_if_sent(&uaid, seq, now)? {
                continue;
            }
            settled.extend(self.settle(&uaid, seq, Outcome::Expired, at_ms)?);
        }
        if complete {
            sweep
                .floor
                .store(now.saturating_sub(SWEEP_OVERLAP), Ordering::Relaxed);
        }
        Ok(settled)
    }

    pub fn receipts(
        &self,
        sub: &ReceiptSub,
        after: u64,
        limit: usize,
    ) -> StoreResult<Vec<ReceiptEvent>> {
        let mut found = Vec::new();
        let start = event_key(sub, after.saturating_add(1));
        let mut ro = ReadOptions::default();
        ro.set_iterate_upper_bound(prefix_end(&start[..17]));
        for item in self.db.iterator_cf_opt(
            self.cf(RECEIPTS),
            ro,
            IteratorMode::From(&start, Direction::Forward),
        ) {
            if found.len() >= limit || after == u64::MAX {
                break;
            }
            let (_, v) = item.map_err(err)?;
            found.extend(decode_receipt(&v));
        }
        Ok(found)
    }

    pub fn receipt_state(&self, uaid: &Uaid, seq: u64) -> StoreResult<Option<ReceiptState>> {
        if let Some(mut p) = self.pending(uaid, seq)? {
            // As the sweep will see it: a sent message has its grace (its
            // index entry moves there only when the sweep reaches it).
            if p.sent_at.is_some() {
                p.deadline = p.deadline.max(p.expires_at.saturating_add(ACK_GRACE_SECS));
            }
            return Ok(Some(ReceiptState::Pending(p)));
        }
        let cf = self.cf(RECEIPTS);
        let Some(at) = self
            .db
            .get_pinned_cf(cf, uaid_seq_key(b'o', uaid, seq))
            .map_err(err)?
        else {
            return Ok(None);
        };
        let mut key = vec![b'e'];
        key.extend_from_slice(&at);
        Ok(self
            .db
            .get_pinned_cf(cf, key)
            .map_err(err)?
            .and_then(|v| decode_receipt(&v))
            .map(ReceiptState::Settled))
    }

    pub fn purge_receipts(&self, before_ms: u64) -> StoreResult<u64> {
        let cf = self.cf(RECEIPTS);
        let mut ro = ReadOptions::default();
        ro.set_iterate_upper_bound(prefix_end(b"t"));
        let mut b = WriteBatch::default();
        let mut removed = 0u64;
        for item in self
            .db
            .iterator_cf_opt(cf, ro, IteratorMode::From(b"t", Direction::Forward))
        {
            let (k, v) = item.map_err(err)?;
            let Some(at) = k.get(1..9).and_then(|d| d.try_into().ok()) else {
                continue;
            };
            if u64::from_be_bytes(at) >= before_ms {
                break;
            }
            b.delete_cf(cf, &k);
            let mut event = vec![b'e'];
            event.extend_from_slice(&k[9..]);
            b.delete_cf(cf, event);
            if let Some((uaid, seq)) = uaid_seq(&v) {
                b.delete_cf(cf, uaid_seq_key(b'o', &uaid, seq));
            }
            removed += 1;
            if b.len() >= 1024 {
                self.write(std::mem::take(&mut b))?;
            }
        }
        self.write(b)?;
        Ok(removed)
    }
}

#[async_trait::async_trait]
impl ReceiptStore for RocksStore {
    async fn track(&self, uaid: &Uaid, seq: u64, pending: &PendingReceipt) -> StoreResult<()> {
        let (uaid, pending) = (*uaid, *pending);
        self.write_op(move |r| r.track_receipt(&uaid, seq, &pending))
            .await
    }

    async fn mark_sent(&self, uaid: &Uaid, seq: u64, at_ms: u64) -> StoreResult<()> {
        let uaid = *uaid;
        self.write_op(move |r| r.mark_sent(&uaid, seq, at_ms)).await
    }

    async fn settle(
        &self,
        uaid: &Uaid,
        seq: u64,
        outcome: Outcome,
        at_ms: u64,
    ) -> StoreResult<Option<(ReceiptSub, ReceiptEvent)>> {
        let uaid = *uaid;
        self.write_op(move |r| r.settle(&uaid, seq, outcome, at_ms))
            .await
    }

    async fn forget(&self, uaid: &Uaid, seq: u64) -> StoreResult<()> {
        let uaid = *uaid;
        self.write_op(move |r| r.forget_receipt(&uaid, seq)).await
    }

    async fn settle_all(
        &self,
        uaid: &Uaid,
        channel: Option<ChannelId>,
        outcome: Outcome,
        at_ms: u64,
    ) -> StoreResult<Vec<(ReceiptSub, ReceiptEvent)>> {
        let uaid = *uaid;
        self.blocking(move |r| r.settle_all(&uaid, channel, outcome, at_ms))
            .await
    }

    async fn settle_expired(
        &self,
        now: u64,
        limit: usize,
        at_ms: u64,
    ) -> StoreResult<Vec<(ReceiptSub, ReceiptEvent)>> {
        self.blocking(move |r| r.settle_expired(now, limit, at_ms))
            .await
    }

    async fn receipts(
        &self,
        sub: &ReceiptSub,
        after: u64,
        limit: usize,
    ) -> StoreResult<Vec<ReceiptEvent>> {
        let sub = *sub;
        self.blocking(move |r| r.receipts(&sub, after, limit)).await
    }

    async fn receipt_state(&self, uaid: &Uaid, seq: u64) -> StoreResult<Option<ReceiptState>> {
        self.db()?.receipt_state(uaid, seq)
    }

    async fn purge_receipts(&self, before_ms: u64) -> StoreResult<u64> {
        self.blocking(move |r| r.purge_receipts(before_ms)).await
    }
}
