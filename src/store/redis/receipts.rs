//! The receipt ledger on Redis (see `store::receipt` for its semantics).
//!
//! | key | type | content |
//! |---|---|---|
//! | `herald:rp:{uaid}` | hash | decimal seq → encoded `PendingReceipt`; expires `receipt_retention` after the latest deadline it may reach (or after the latest `track`), which only a record the sweep never saw reaches |
//! | `herald:rx` | sorted set | the expiry sweep's index: member `<uaid hex>:<seq>`, score = deadline (unix seconds) |
//! | `herald:re:{sub}` | sorted set | a receipt subscription's receipts: member = encoded `ReceiptEvent`, score = its id; expires `receipt_retention` after its newest receipt |
//! | `herald:ro:{uaid}:<seq>` | string | a settled message's encoded `ReceiptEvent`, for `receipt_state`; `PXAT at + receipt_retention` |
//!
//! `{sub}` is the subscription's 32 hex digits. The pending hash is the
//! truth: a step decides a message's outcome by removing its field (HGET and
//! HDEL in one script), so exactly one caller wins however many nodes race
//! (an ack against the sweep, two sweeps). `herald:rx` is only a hint: the
//! sweep checks each member's deadline against the pending record, moves
//! members whose deadline moved, and drops members whose record is gone.
//!
//! A user agent's keys and a subscription's keys are in different cluster
//! slots, so settling is three steps, not one atomic script: take the
//! pending record (`{uaid}`), append the receipt (`{sub}`), write the
//! outcome (`{uaid}`), and drop the index member (`herald:rx`, beside
//! them). If a node dies, or Redis fails, between the first and the second
//! step, that message's receipt is lost: it is neither pending nor listed
//! (at most once, never twice). Between the second and the third,
//! `receipt_state` says None for a message its subscription lists. A member
//! left in `herald:rx` only costs the sweep one look. `track` writes the
//! pending record before the index member, so the sweep never drops a
//! member whose record is still on its way; a record whose member was never
//! written (a crash between the two) is never swept as expired and leaves
//! with its hash's expiry.
//!
//! `herald:rx` is one key, so in a cluster the sweep's index lives in one
//! slot: every tracked message costs its shard a ZADD and a ZREM.
//!
//! Receipt ids are Redis's clock in microseconds, or one more than the
//! subscription's newest id if that is larger: they increase within a
//! subscription across nodes, and keep increasing after an idle
//! subscription's key expired (ids stay below 2^53, exact as scores).
//!
//! Old receipts leave by themselves: keys expire `receipt_retention` after
//! their newest content, and each append or read of a subscription drops
//! its receipts older than that, so `purge_receipts` has nothing to do.

use super::{lua_count, RedisStore, LUA_BE64, MAX_EXACT_SCORE};
use crate::store::codec::{decode_pending, decode_receipt, encode_pending, encode_receipt};
use crate::store::{
    now_micros, Outcome, PendingReceipt, ReceiptEvent, ReceiptState, ReceiptStore, ReceiptSub,
    StoreError, StoreResult, ACK_GRACE_SECS,
};
use herald_proto::ids::{ChannelId, Uaid};
use redis::Script;
use std::collections::BTreeMap;
use std::sync::OnceLock;

/// The sweep's index of pending receipts by deadline.
const EXPIRY_KEY: &str = "herald:rx";

// Byte offsets in the codec's encodings that the scripts read or rewrite;
// a unit test below holds them to `encode_pending` and `encode_receipt`.
const PENDING_CHANNEL: std::ops::Range<usize> = 17..33;
const PENDING_EXPIRES_AT: usize = 33;
const PENDING_DEADLINE: usize = 41;
const PENDING_SENT_AT: usize = 49;
const PENDING_LEN: usize = 57;
const RECEIPT_ID: usize = 1;
const RECEIPT_AT: usize = 54;

/// The inverse of `LUA_BE64`, exact below 2^53.
const LUA_PACK64: &str = r"
local function pack64(n)
  local b = {}
  for i = 8, 1, -1 do
    b[i] = string.char(n % 256)
    n = math.floor(n / 256)
  end
  return table.concat(b)
end
";

// KEYS: pending hash. ARGV: seq, encoded pending, unix seconds the hash
// must live until.
const TRACK: &str = r"
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
if redis.call('EXPIRETIME', KEYS[1]) < tonumber(ARGV[3]) then
  redis.call('EXPIREAT', KEYS[1], ARGV[3])
end
return 0
";

// KEYS: pending hash. ARGV: seq, sent_at (unix ms, > 0), grace seconds.
// Returns the new deadline, or 0 if untracked or already sent.
const MARK_SENT: &str = r"
local v = redis.call('HGET', KEYS[1], ARGV[1])
if not v or #v ~= PENDING_LEN or be64(v, PENDING_SENT_AT) ~= 0 then return 0 end
local deadline = be64(v, PENDING_DEADLINE)
local late = be64(v, PENDING_EXPIRES_AT) + tonumber(ARGV[3])
if late > deadline then deadline = late end
v = string.sub(v, 1, PENDING_DEADLINE) .. pack64(deadline) .. pack64(tonumber(ARGV[2]))
redis.call('HSET', KEYS[1], ARGV[1], v)
return deadline
";

// KEYS: pending hash. ARGV: due ('' for any deadline), seq...
// Takes (removes and returns) each pending record whose deadline is at or
// before `due`; reports the deadlines of those not yet due.
// Returns {taken seqs, taken records, later seqs, later deadlines}.
const TAKE: &str = r"
local due = tonumber(ARGV[1])
local ts, tv, ls, ld = {}, {}, {}, {}
for i = 2, #ARGV do
  local v = redis.call('HGET', KEYS[1], ARGV[i])
  if v then
    local deadline = be64(v, PENDING_DEADLINE)
    if due and deadline > due then
      ls[#ls + 1] = ARGV[i]
      ld[#ld + 1] = deadline
    else
      redis.call('HDEL', KEYS[1], ARGV[i])
      ts[#ts + 1] = ARGV[i]
      tv[#tv + 1] = v
    end
  end
end
return {ts, tv, ls, ld}
";

// KEYS: pending hash. ARGV: channel id bytes ('' for every channel).
// Returns {taken seqs, taken records}.
const TAKE_ALL: &str = r"
local all = redis.call('HGETALL', KEYS[1])
local ts, tv = {}, {}
for i = 1, #all, 2 do
  local v = all[i + 1]
  if ARGV[1] == '' or string.sub(v, PENDING_CHANNEL_FROM, PENDING_CHANNEL_TO) == ARGV[1] then
    redis.call('HDEL', KEYS[1], all[i])
    ts[#ts + 1] = all[i]
    tv[#tv + 1] = v
  end
end
return {ts, tv}
";

// KEYS: events zset. ARGV: retention ms, encoded receipt (id ignored)...
// Returns the ids given to the receipts, in order.
const APPEND: &str = r"
local retention = tonumber(ARGV[1])
local t = redis.call('TIME')
local id = tonumber(t[1]) * 1000000 + tonumber(t[2])
local last = redis.call('ZRANGE', KEYS[1], -1, -1)[1]
if last and be64(last, RECEIPT_ID) >= id then id = be64(last, RECEIPT_ID) + 1 end
local ids, newest = {}, 0
for i = 2, #ARGV do
  local e = ARGV[i]
  local at = be64(e, RECEIPT_AT)
  if at > newest then newest = at end
  redis.call('ZADD', KEYS[1], id, string.sub(e, 1, RECEIPT_ID) .. pack64(id) .. string.sub(e, RECEIPT_ID + 9))
  ids[#ids + 1] = id
  id = id + 1
end
local cutoff = newest - retention
for _ = 1, 16 do
  local head = redis.call('ZRANGE', KEYS[1], 0, 63)
  local old = 0
  for _, m in ipairs(head) do
    if be64(m, RECEIPT_AT) >= cutoff then break end
    redis.call('ZREM', KEYS[1], m)
    old = old + 1
  end
  if old < 64 then break end
end
local until_ms = newest + retention
if redis.call('PEXPIRETIME', KEYS[1]) < until_ms then
  redis.call('PEXPIREAT', KEYS[1], until_ms)
end
return ids
";

// KEYS: events zset. ARGV: after, limit, cutoff (unix ms).
// Receipts older than the cutoff are dropped, not returned.
const READ: &str = r"
local limit, cutoff = tonumber(ARGV[2]), tonumber(ARGV[3])
local out = {}
local from = '(' .. ARGV[1]
while #out < limit do
  local batch = redis.call('ZRANGEBYSCORE', KEYS[1], from, '+inf', 'LIMIT', 0, 128)
  if #batch == 0 then break end
  for _, m in ipairs(batch) do
    if be64(m, RECEIPT_AT) < cutoff then
      redis.call('ZREM', KEYS[1], m)
    else
      out[#out + 1] = m
      if #out >= limit then break end
    end
  end
  from = '(' .. string.format('%.0f', be64(batch[#batch], RECEIPT_ID))
end
return out
";

// KEYS: outcome keys. ARGV: per key, encoded receipt and unix ms to live until.
const OUTCOMES: &str = r"
for i, k in ipairs(KEYS) do
  redis.call('SET', k, ARGV[2 * i - 1], 'PXAT', ARGV[2 * i])
end
return 0
";

// KEYS: pending hash, outcome key. ARGV: seq.
// Returns {1, pending}, {2, receipt} or {}.
const STATE: &str = r"
local v = redis.call('HGET', KEYS[1], ARGV[1])
if v then return {1, v} end
v = redis.call('GET', KEYS[2])
if v then return {2, v} end
return {}
";

struct Scripts {
    track: Script,
    mark_sent: Script,
    take: Script,
    take_all: Script,
    append: Script,
    read: Script,
    outcomes: Script,
    state: Script,
}

fn scripts() -> &'static Scripts {
    static SCRIPTS: OnceLock<Scripts> = OnceLock::new();
    SCRIPTS.get_or_init(|| {
        let script = |body: &str| {
            let body = body
                .replace(
                    "PENDING_CHANNEL_FROM",
                    &(PENDING_CHANNEL.start + 1).to_string(),
                )
                .replace("PENDING_CHANNEL_TO", &PENDING_CHANNEL.end.to_string())
                .replace("PENDING_EXPIRES_AT", &PENDING_EXPIRES_AT.to_string())
                .replace("PENDING_DEADLINE", &PENDING_DEADLINE.to_string())
                .replace("PENDING_SENT_AT", &PENDING_SENT_AT.to_string())
                .replace("PENDING_LEN", &PENDING_LEN.to_string())
                .replace("RECEIPT_ID", &RECEIPT_ID.to_string())
                .replace("RECEIPT_AT", &RECEIPT_AT.to_string());
            Script::new(&format!("{LUA_BE64}{LUA_PACK64}{body}"))
        };
        Scripts {
            track: script(TRACK),
            mark_sent: script(MARK_SENT),
            take: script(TAKE),
            take_all: script(TAKE_ALL),
            append: script(APPEND),
            read: script(READ),
            outcomes: script(OUTCOMES),
            state: script(STATE),
        }
    })
}

impl super::Keys {
    fn pending_receipts(&self) -> String {
        format!("herald:rp:{}", self.tag)
    }
    fn outcome(&self, seq: u64) -> String {
        format!("herald:ro:{}:{seq}", self.tag)
    }
}

fn sub_hex(sub: &ReceiptSub) -> String {
    // The same 32 lowercase hex digits as a uaid.
    Uaid(sub.0).to_string()
}

fn events_key(sub: &ReceiptSub) -> String {
    format!("herald:re:{{{}}}", sub_hex(sub))
}

fn expiry_member(uaid: &Uaid, seq: u64) -> String {
    format!("{uaid}:{seq}")
}

fn parse_expiry_member(m: &str) -> Option<(Uaid, u64)> {
    let (uaid, seq) = m.split_once(':')?;
    Some((Uaid::parse(uaid)?, seq.parse().ok()?))
}

fn now_ms() -> u64 {
    now_micros() / 1000
}

/// A score Redis holds exactly; larger values never occur as seqs or
/// deadlines, so failing beats silently rounding them.
fn exact(what: &str, n: u64) -> StoreResult<u64> {
    if n < MAX_EXACT_SCORE {
        Ok(n)
    } else {
        Err(StoreError::Corrupt(format!(
            "redis {what}: {n} exceeds 2^53"
        )))
    }
}

/// Pending records taken from one user agent's hash.
struct Taken {
    seqs: Vec<u64>,
    records: Vec<Vec<u8>>,
}

impl Taken {
    fn decoded(self) -> Vec<(u64, PendingReceipt)> {
        self.seqs
            .into_iter()
            .zip(self.records)
            .filter_map(|(seq, v)| {
                let p = decode_pending(&v);
                if p.is_none() {
                    tracing::warn!("dropping an undecodable pending receipt");
                }
                Some((seq, p?))
            })
            .collect()
    }
}

impl RedisStore {
    fn retention_ms(&self) -> u64 {
        self.receipt_retention.as_millis().min(u128::from(u64::MAX)) as u64
    }

    /// Takes the given pending records of `uaid`: all of them with `due`
    /// None, else those whose deadline is at or before `due`. Also returns
    /// the seqs and deadlines of those not yet due.
    async fn take(
        &self,
        uaid: &Uaid,
        due: Option<u64>,
        seqs: &[u64],
    ) -> StoreResult<(Taken, Vec<(u64, u64)>)> {
        let mut inv = scripts().take.prepare_invoke();
        inv.key(super::Keys::new(uaid).pending_receipts());
        match due {
            Some(due) => inv.arg(due),
            None => inv.arg(""),
        };
        for seq in seqs {
            inv.arg(*seq);
        }
        let (seqs, records, later, deadlines): (Vec<u64>, Vec<Vec<u8>>, Vec<u64>, Vec<u64>) =
            self.eval("settle", &inv).await?;
        Ok((
            Taken { seqs, records },
            later.into_iter().zip(deadlines).collect(),
        ))
    }

    /// Records the receipts of messages just taken from `uaid`'s pending
    /// records: appends each to its subscription, then writes the outcomes.
    async fn record(
        &self,
        uaid: &Uaid,
        taken: Vec<(u64, PendingReceipt)>,
        outcome: Outcome,
        at_ms: u64,
    ) -> StoreResult<Vec<(ReceiptSub, ReceiptEvent)>> {
        if taken.is_empty() {
            return Ok(Vec::new());
        }
        let mut settled: Vec<(ReceiptSub, ReceiptEvent)> = taken
            .iter()
            .map(|(seq, p)| {
                let event = ReceiptEvent {
                    id: 0,
                    uaid: *uaid,
                    channel: p.channel,
                    seq: *seq,
                    outcome,
                    at: at_ms,
                };
                (p.sub, event)
            })
            .collect();
        let mut by_sub: BTreeMap<ReceiptSub, Vec<usize>> = BTreeMap::new();
        for (i, (sub, _)) in settled.iter().enumerate() {
            by_sub.entry(*sub).or_default().push(i);
        }
        let retention = self.retention_ms();
        for (sub, indices) in by_sub {
            let mut inv = scripts().append.prepare_invoke();
            inv.key(events_key(&sub)).arg(retention);
            for &i in &indices {
                inv.arg(encode_receipt(&settled[i].1));
            }
            let ids: Vec<u64> = self.eval("settle", &inv).await?;
            if ids.len() != indices.len() {
                return Err(StoreError::Corrupt(format!(
                    "redis settle: {} ids for {} receipts",
                    ids.len(),
                    indices.len()
                )));
            }
            for (i, id) in indices.into_iter().zip(ids) {
                settled[i].1.id = id;
            }
        }
        let keys = super::Keys::new(uaid);
        let until = at_ms.saturating_add(retention).min(MAX_EXACT_SCORE - 1);
        let mut inv = scripts().outcomes.prepare_invoke();
        for (_, event) in &settled {
            inv.key(keys.outcome(event.seq))
                .arg(encode_receipt(event))
                .arg(until);
        }
        self.eval::<i64>("settle", &inv).await?;
        Ok(settled)
    }

    async fn unindex(&self, members: &[String]) -> StoreResult<()> {
        if members.is_empty() {
            return Ok(());
        }
        let mut cmd = redis::cmd("ZREM");
        cmd.arg(EXPIRY_KEY).arg(members);
        self.query::<i64>("settle", &cmd).await.map(drop)
    }

    /// Settles what `take` took, and drops the index members of `uaid`.
    async fn settle_taken(
        &self,
        uaid: &Uaid,
        taken: Taken,
        outcome: Outcome,
        at_ms: u64,
    ) -> StoreResult<Vec<(ReceiptSub, ReceiptEvent)>> {
        let members: Vec<String> = taken
            .seqs
            .iter()
            .map(|&seq| expiry_member(uaid, seq))
            .collect();
        let (settled, unindexed) = tokio::join!(
            self.record(uaid, taken.decoded(), outcome, at_ms),
            self.unindex(&members)
        );
        unindexed?;
        settled
    }
}

#[async_trait::async_trait]
impl ReceiptStore for RedisStore {
    async fn track(&self, uaid: &Uaid, seq: u64, pending: &PendingReceipt) -> StoreResult<()> {
        let seq = exact("track", seq)?;
        // In Redis's clock, which every node's sweep compares with (see
        // `SharedClock`): a node 30 s ahead would otherwise call "expired"
        // what another node's user agent acknowledged in time.
        let pending = &PendingReceipt {
            expires_at: self.clock.to_shared(pending.expires_at),
            deadline: self.clock.to_shared(pending.deadline),
            ..*pending
        };
        let deadline = exact("track", pending.deadline)?;
        // The sweep must get to see it: its deadline may already be past
        // (a message tracked late), or move by up to the grace.
        let latest = deadline
            .max(pending.expires_at.saturating_add(ACK_GRACE_SECS))
            .max(self.clock.now_secs());
        let keep_until = latest
            .saturating_add(self.receipt_retention.as_secs())
            .min(MAX_EXACT_SCORE - 1);
        let mut inv = scripts().track.prepare_invoke();
        inv.key(super::Keys::new(uaid).pending_receipts())
            .arg(seq)
            .arg(encode_pending(pending))
            .arg(keep_until);
        self.eval::<i64>("track", &inv).await?;
        // Only once the record is there: a sweep that found the member
        // first would drop it as stale.
        let mut cmd = redis::cmd("ZADD");
        cmd.arg(EXPIRY_KEY)
            .arg(deadline)
            .arg(expiry_member(uaid, seq));
        self.query::<i64>("track", &cmd).await.map(drop)
    }

    async fn mark_sent(&self, uaid: &Uaid, seq: u64, at_ms: u64) -> StoreResult<()> {
        let mut inv = scripts().mark_sent.prepare_invoke();
        // 0 means "not sent" in the encoding.
        inv.key(super::Keys::new(uaid).pending_receipts())
            .arg(seq)
            .arg(at_ms.clamp(1, MAX_EXACT_SCORE - 1))
            .arg(ACK_GRACE_SECS);
        let deadline: u64 = self.eval("mark_sent", &inv).await?;
        if deadline == 0 {
            return Ok(());
        }
        // XX: a settle that removed the member meanwhile has the last word.
        let mut cmd = redis::cmd("ZADD");
        cmd.arg(EXPIRY_KEY)
            .arg("XX")
            .arg(deadline)
            .arg(expiry_member(uaid, seq));
        self.query::<i64>("mark_sent", &cmd).await.map(drop)
    }

    async fn settle(
        &self,
        uaid: &Uaid,
        seq: u64,
        outcome: Outcome,
        at_ms: u64,
    ) -> StoreResult<Option<(ReceiptSub, ReceiptEvent)>> {
        let (taken, _) = self.take(uaid, None, &[seq]).await?;
        if taken.seqs.is_empty() {
            return Ok(None);
        }
        let settled = self.settle_taken(uaid, taken, outcome, at_ms).await?;
        Ok(settled.into_iter().next())
    }

    async fn forget(&self, uaid: &Uaid, seq: u64) -> StoreResult<()> {
        let (taken, _) = self.take(uaid, None, &[seq]).await?;
        if taken.seqs.is_empty() {
            return Ok(());
        }
        self.unindex(&[expiry_member(uaid, seq)]).await
    }

    async fn settle_all(
        &self,
        uaid: &Uaid,
        channel: Option<ChannelId>,
        outcome: Outcome,
        at_ms: u64,
    ) -> StoreResult<Vec<(ReceiptSub, ReceiptEvent)>> {
        let mut inv = scripts().take_all.prepare_invoke();
        inv.key(super::Keys::new(uaid).pending_receipts());
        match &channel {
            Some(c) => inv.arg(c.as_bytes().as_slice()),
            None => inv.arg(""),
        };
        let (seqs, records): (Vec<u64>, Vec<Vec<u8>>) = self.eval("settle_all", &inv).await?;
        if seqs.is_empty() {
            return Ok(Vec::new());
        }
        self.settle_taken(uaid, Taken { seqs, records }, outcome, at_ms)
            .await
    }

    /// Several nodes may sweep at once: each settles what it took first.
    async fn settle_expired(
        &self,
        now: u64,
        limit: usize,
        at_ms: u64,
    ) -> StoreResult<Vec<(ReceiptSub, ReceiptEvent)>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        // Deadlines are in Redis's clock (see `track`).
        let now = self.clock.to_shared(now);
        let mut cmd = redis::cmd("ZRANGEBYSCORE");
        cmd.arg(EXPIRY_KEY)
            .arg("-inf")
            .arg(now.min(MAX_EXACT_SCORE))
            .arg("LIMIT")
            .arg(0)
            .arg(lua_count(limit));
        let due: Vec<String> = self.query("settle_expired", &cmd).await?;
        let mut stale = Vec::new();
        let mut by_uaid: BTreeMap<Uaid, Vec<u64>> = BTreeMap::new();
        for m in due {
            match parse_expiry_member(&m) {
                Some((uaid, seq)) => by_uaid.entry(uaid).or_default().push(seq),
                None => stale.push(m),
            }
        }
        let mut settled = Vec::new();
        let mut moved = Vec::new();
        for (uaid, seqs) in by_uaid {
            let (taken, later) = self.take(&uaid, Some(now), &seqs).await?;
            // Members whose record is gone were settled or forgotten by a
            // step that did not get to drop them.
            stale.extend(
                seqs.iter()
                    .filter(|s| !taken.seqs.contains(s) && !later.iter().any(|(l, _)| l == *s))
                    .map(|&s| expiry_member(&uaid, s)),
            );
            moved.extend(later.into_iter().map(|(s, d)| (d, expiry_member(&uaid, s))));
            settled.extend(
                self.settle_taken(&uaid, taken, Outcome::Expired, at_ms)
                    .await?,
            );
        }
        self.unindex(&stale).await?;
        if !moved.is_empty() {
            // Their deadline moved (a send noted before the member was
            // written): index them where they belong.
            let mut cmd = redis::cmd("ZADD");
            cmd.arg(EXPIRY_KEY).arg("XX");
            for (deadline, member) in &moved {
                cmd.arg(*deadline).arg(member);
            }
            self.query::<i64>("settle_expired", &cmd).await?;
        }
        Ok(settled)
    }

    /// Receipts older than the retention are never listed (see
    /// `with_receipt_retention`).
    async fn receipts(
        &self,
        sub: &ReceiptSub,
        after: u64,
        limit: usize,
    ) -> StoreResult<Vec<ReceiptEvent>> {
        // Ids stay below 2^53: nothing comes after a larger one.
        if limit == 0 || after >= MAX_EXACT_SCORE {
            return Ok(Vec::new());
        }
        let mut inv = scripts().read.prepare_invoke();
        inv.key(events_key(sub))
            .arg(after)
            .arg(lua_count(limit))
            .arg(now_ms().saturating_sub(self.retention_ms()));
        let found: Vec<Vec<u8>> = self.eval("receipts", &inv).await?;
        Ok(found
            .iter()
            .filter_map(|v| {
                let e = decode_receipt(v);
                if e.is_none() {
                    tracing::warn!("skipping an undecodable receipt");
                }
                e
            })
            .collect())
    }

    async fn receipt_state(&self, uaid: &Uaid, seq: u64) -> StoreResult<Option<ReceiptState>> {
        let keys = super::Keys::new(uaid);
        let mut inv = scripts().state.prepare_invoke();
        inv.key(keys.pending_receipts())
            .key(keys.outcome(seq))
            .arg(seq);
        let found: Option<(u8, Vec<u8>)> = match self
            .eval::<Vec<redis::Value>>("receipt_state", &inv)
            .await?
            .as_slice()
        {
            [kind, v] => redis::from_redis_value_ref::<u8>(kind)
                .ok()
                .zip(redis::from_redis_value_ref::<Vec<u8>>(v).ok()),
            _ => None,
        };
        Ok(match found {
            Some((1, v)) => decode_pending(&v).map(|p| {
                ReceiptState::Pending(PendingReceipt {
                    expires_at: self.clock.to_node(p.expires_at),
                    deadline: self.clock.to_node(p.deadline),
                    ..p
                })
            }),
            Some((2, v)) => decode_receipt(&v).map(ReceiptState::Settled),
            _ => None,
        })
    }

    /// Nothing to sweep: receipts leave by themselves after the retention
    /// (key expiry, and pruning whenever a subscription is appended to or
    /// read), like user agents do (`stale_users`).
    async fn purge_receipts(&self, _before_ms: u64) -> StoreResult<u64> {
        Ok(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use redis::cluster_routing::Slot;

    fn pending() -> PendingReceipt {
        PendingReceipt {
            sub: ReceiptSub([0xaa; 16]),
            channel: uuid::Uuid::from_bytes([0xcc; 16]),
            expires_at: 0x0102_0304_0506_0708,
            deadline: 0x1112_1314_1516_1718,
            sent_at: Some(0x2122_2324_2526_2728),
        }
    }

    #[test]
    fn script_offsets_match_the_codec() {
        let p = pending();
        let v = encode_pending(&p);
        assert_eq!(v.len(), PENDING_LEN);
        assert_eq!(&v[PENDING_CHANNEL], p.channel.as_bytes());
        let at = |off: usize| &v[off..off + 8];
        assert_eq!(at(PENDING_EXPIRES_AT), p.expires_at.to_be_bytes());
        assert_eq!(at(PENDING_DEADLINE), p.deadline.to_be_bytes());
        assert_eq!(at(PENDING_SENT_AT), p.sent_at.unwrap().to_be_bytes());
        let e = ReceiptEvent {
            id: 0x3132_3334_3536_3738,
            uaid: Uaid([0xbb; 16]),
            channel: p.channel,
            seq: 7,
            outcome: Outcome::Rejected(9),
            at: 0x4142_4344_4546_4748,
        };
        let v = encode_receipt(&e);
        assert_eq!(v[RECEIPT_ID..RECEIPT_ID + 8], e.id.to_be_bytes());
        assert_eq!(v[RECEIPT_AT..RECEIPT_AT + 8], e.at.to_be_bytes());
        assert_eq!(v.len(), RECEIPT_AT + 8);
    }

    #[test]
    fn expiry_members_round_trip() {
        let u = Uaid::random();
        let m = expiry_member(&u, 1_700_000_000_000_000);
        assert_eq!(parse_expiry_member(&m), Some((u, 1_700_000_000_000_000)));
        for bad in ["", "x:1", &format!("{u}"), &format!("{u}:-1")] {
            assert_eq!(parse_expiry_member(bad), None, "{bad}");
        }
    }

    #[test]
    fn ledger_keys_share_their_owners_slot() {
        let k = super::super::Keys::new(&Uaid::random());
        let slot = Slot::for_key(k.user());
        assert_eq!(Slot::for_key(k.pending_receipts()), slot);
        assert_eq!(Slot::for_key(k.outcome(42)), slot);
        let sub = ReceiptSub::random();
        assert!(events_key(&sub).ends_with(&format!("{{{}}}", sub_hex(&sub))));
        assert_eq!(sub_hex(&sub).len(), 32);
    }
}
