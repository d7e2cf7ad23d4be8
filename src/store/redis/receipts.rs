//! The receipt ledger on Redis (see `store::receipt` for its semantics).
//!
//! | key | type | content |
//! |---|---|---|
//! | `herald:rp:{uaid}` | hash | decimal seq → encoded `PendingReceipt`; expires `receipt_retention` after the latest deadline it may reach (or after the latest `track`), which only a record the sweep never saw reaches |
//! | `herald:rs:{uaid}` | hash | decimal seq → a record being settled: the encoded `PendingReceipt`, then the outcome's byte, its code (4 bytes) and unix ms (8 bytes); expires `receipt_retention` after the latest take |
//! | `herald:rx` | sorted set | the expiry sweep's index: member `<uaid hex>:<seq>`, score = deadline (unix seconds), or when to finish an interrupted settle |
//! | `herald:re:{sub}` | sorted set | a receipt subscription's receipts: member = encoded `ReceiptEvent`, score = its id; expires `receipt_retention` after its newest receipt |
//! | `herald:rk:{sub}` | hash | the same receipts by message: uaid bytes and big-endian seq → id, so a receipt is listed once however often its append is sent; expires with `herald:re:` |
//! | `herald:ro:{uaid}:<seq>` | string | a settled message's encoded `ReceiptEvent`, for `receipt_state`; `PXAT at + receipt_retention` |
//!
//! `{sub}` is the subscription's 32 hex digits. The pending hash is the
//! truth: a step decides a message's outcome by moving its record to the
//! settling hash with the outcome (one script), so exactly one caller
//! decides however many nodes race (an ack against the sweep, two sweeps).
//! `herald:rx` is only a hint: the sweep checks each member's deadline
//! against the pending record, moves members whose deadline moved, and
//! drops members whose record is gone.
//!
//! A user agent's keys and a subscription's keys are in different cluster
//! slots, so settling takes steps: take the pending record into the
//! settling hash (`{uaid}`); append the receipt (`{sub}`); write the outcome
//! and drop the settling record (`{uaid}`); drop the index member
//! (`herald:rx`). Every step after the first may be repeated, by anyone,
//! with the same result: the append lists a message's receipt once, and a
//! take of a message already being settled hands back its record and
//! outcome. So a step that fails (Redis failing over, a link reset, a node
//! killed) is finished later instead of losing the receipt: the take also
//! moves the index member to `RESUME_SECS` ahead, and the sweep, on any
//! node, finishes what is still settling when it comes due, every second
//! until it succeeds. A Redis client that sends a command again after a
//! reset connection (the cluster client does) thus never lists a receipt
//! twice nor loses one.
//!
//! With `redis_wait_replicas`, what a 201 promised (the pending record and
//! its index member), the take (the decision) and the receipt appended are
//! each waited for like a message (see `waited`); a failed `WAIT` fails the
//! call, and its caller tries again (`receipts::Settle`) or the sweep does.
//! The other steps are not waited for: a failover that undoes one only has
//! it repeated.
//!
//! `herald:rx` is one key, so in a cluster the sweep's index lives in one
//! slot: every tracked message costs its shard a ZADD and a ZREM, and
//! every ack of one a ZADD more.
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

/// How long after a take the sweep finishes a settle that has not
/// finished by then (its node failed, or Redis did, in between).
const RESUME_SECS: u64 = 5;

// Byte offsets in the codec's encodings that the scripts read or rewrite;
// a unit test below holds them to `encode_pending` and `encode_receipt`.
const PENDING_CHANNEL: std::ops::Range<usize> = 17..33;
const PENDING_EXPIRES_AT: usize = 33;
const PENDING_DEADLINE: usize = 41;
const PENDING_SENT_AT: usize = 49;
const PENDING_LEN: usize = 57;
const RECEIPT_ID: usize = 1;
const RECEIPT_UAID: std::ops::Range<usize> = 9..25;
const RECEIPT_SEQ: std::ops::Range<usize> = 41..49;
const RECEIPT_AT: usize = 54;
/// A settling record: the pending record, the outcome's byte, its code
/// and the unix ms it was decided at.
const SETTLING_LEN: usize = PENDING_LEN + 1 + 4 + 8;

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

// KEYS: the sweep's index. ARGV: score, member.
const INDEX: &str = r"
return redis.call('ZADD', KEYS[1], ARGV[1], ARGV[2])
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

// KEYS: pending hash, settling hash. ARGV: due ('' for any deadline), the
// outcome's suffix, seconds the settling hash lives, seq...
// Takes each pending record whose deadline is at or before `due` into the
// settling hash with the outcome; hands back those already settling as
// they are; reports the deadlines of those not yet due.
// Returns {taken seqs, settling records, later seqs, later deadlines}.
const TAKE: &str = r"
local due = tonumber(ARGV[1])
local ts, tv, ls, ld = {}, {}, {}, {}
for i = 4, #ARGV do
  local s = redis.call('HGET', KEYS[2], ARGV[i])
  local v = not s and redis.call('HGET', KEYS[1], ARGV[i])
  if v then
    local deadline = be64(v, PENDING_DEADLINE)
    if due and deadline > due then
      ls[#ls + 1] = ARGV[i]
      ld[#ld + 1] = deadline
    else
      s = v .. ARGV[2]
      redis.call('HSET', KEYS[2], ARGV[i], s)
      redis.call('HDEL', KEYS[1], ARGV[i])
    end
  end
  if s then
    ts[#ts + 1] = ARGV[i]
    tv[#tv + 1] = s
  end
end
if #ts > 0 then redis.call('EXPIRE', KEYS[2], ARGV[3]) end
return {ts, tv, ls, ld}
";

// KEYS: pending hash, settling hash. ARGV: channel id bytes ('' for every
// channel), the outcome's suffix, seconds the settling hash lives.
// Returns {taken seqs, settling records}: those already settling first.
const TAKE_ALL: &str = r"
local function mine(v)
  return ARGV[1] == '' or string.sub(v, PENDING_CHANNEL_FROM, PENDING_CHANNEL_TO) == ARGV[1]
end
local ts, tv = {}, {}
local settling = redis.call('HGETALL', KEYS[2])
for i = 1, #settling, 2 do
  if mine(settling[i + 1]) then
    ts[#ts + 1] = settling[i]
    tv[#tv + 1] = settling[i + 1]
  end
end
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  local v = all[i + 1]
  if mine(v) then
    local s = v .. ARGV[2]
    redis.call('HSET', KEYS[2], all[i], s)
    redis.call('HDEL', KEYS[1], all[i])
    ts[#ts + 1] = all[i]
    tv[#tv + 1] = s
  end
end
if #ts > 0 then redis.call('EXPIRE', KEYS[2], ARGV[3]) end
return {ts, tv}
";

// KEYS: pending hash. ARGV: seq. Returns how many records it removed.
const FORGET: &str = r"
return redis.call('HDEL', KEYS[1], ARGV[1])
";

// The key of a receipt in its subscription's by-message hash.
const LUA_RECEIPT_KEY: &str = r"
local function receipt_key(e)
  return string.sub(e, RECEIPT_UAID_FROM, RECEIPT_UAID_TO) .. string.sub(e, RECEIPT_SEQ_FROM, RECEIPT_SEQ_TO)
end
";

// KEYS: events zset, by-message hash. ARGV: retention ms, encoded receipt
// (id ignored)...
// Returns {ids, fresh}: the id each receipt is listed under, and 1 where
// this call listed it, 0 where an earlier append of it had.
const APPEND: &str = r"
local retention = tonumber(ARGV[1])
local t = redis.call('TIME')
local id = tonumber(t[1]) * 1000000 + tonumber(t[2])
local last = redis.call('ZRANGE', KEYS[1], -1, -1)[1]
if last and be64(last, RECEIPT_ID) >= id then id = be64(last, RECEIPT_ID) + 1 end
local ids, fresh, newest = {}, {}, 0
for i = 2, #ARGV do
  local e = ARGV[i]
  local at = be64(e, RECEIPT_AT)
  if at > newest then newest = at end
  local known = redis.call('HGET', KEYS[2], receipt_key(e))
  if known then
    ids[#ids + 1] = tonumber(known)
    fresh[#fresh + 1] = 0
  else
    redis.call('ZADD', KEYS[1], id, string.sub(e, 1, RECEIPT_ID) .. pack64(id) .. string.sub(e, RECEIPT_ID + 9))
    redis.call('HSET', KEYS[2], receipt_key(e), string.format('%.0f', id))
    ids[#ids + 1] = id
    fresh[#fresh + 1] = 1
    id = id + 1
  end
end
local cutoff = newest - retention
for _ = 1, 16 do
  local head = redis.call('ZRANGE', KEYS[1], 0, 63)
  local old = 0
  for _, m in ipairs(head) do
    if be64(m, RECEIPT_AT) >= cutoff then break end
    redis.call('ZREM', KEYS[1], m)
    redis.call('HDEL', KEYS[2], receipt_key(m))
    old = old + 1
  end
  if old < 64 then break end
end
local until_ms = newest + retention
for _, k in ipairs(KEYS) do
  if redis.call('PEXPIRETIME', k) < until_ms then
    redis.call('PEXPIREAT', k, until_ms)
  end
end
return {ids, fresh}
";

// KEYS: events zset, by-message hash. ARGV: after, limit, cutoff (unix ms).
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
      redis.call('HDEL', KEYS[2], receipt_key(m))
    else
      out[#out + 1] = m
      if #out >= limit then break end
    end
  end
  from = '(' .. string.format('%.0f', be64(batch[#batch], RECEIPT_ID))
end
return out
";

// KEYS: settling hash, outcome keys. ARGV: per outcome key, the seq, the
// encoded receipt and unix ms to live until.
const FINISH: &str = r"
for i = 2, #KEYS do
  local j = 3 * (i - 2)
  redis.call('SET', KEYS[i], ARGV[j + 2], 'PXAT', ARGV[j + 3])
  redis.call('HDEL', KEYS[1], ARGV[j + 1])
end
return 0
";

// KEYS: pending hash, outcome key, settling hash. ARGV: seq.
// Returns {1, pending}, {2, receipt}, {3, settling record} or {}.
const STATE: &str = r"
local v = redis.call('HGET', KEYS[1], ARGV[1])
if v then return {1, v} end
v = redis.call('GET', KEYS[2])
if v then return {2, v} end
v = redis.call('HGET', KEYS[3], ARGV[1])
if v then return {3, v} end
return {}
";

struct Scripts {
    track: Script,
    index: Script,
    mark_sent: Script,
    take: Script,
    take_all: Script,
    forget: Script,
    append: Script,
    read: Script,
    finish: Script,
    state: Script,
}

fn scripts() -> &'static Scripts {
    static SCRIPTS: OnceLock<Scripts> = OnceLock::new();
    SCRIPTS.get_or_init(|| {
        let script = |body: &str| {
            let from_to = |s: String, name: &str, r: &std::ops::Range<usize>| {
                s.replace(&format!("{name}_FROM"), &(r.start + 1).to_string())
                    .replace(&format!("{name}_TO"), &r.end.to_string())
            };
            let body = format!("{LUA_RECEIPT_KEY}{body}");
            let body = from_to(body, "PENDING_CHANNEL", &PENDING_CHANNEL);
            let body = from_to(body, "RECEIPT_UAID", &RECEIPT_UAID);
            let body = from_to(body, "RECEIPT_SEQ", &RECEIPT_SEQ)
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
            index: script(INDEX),
            mark_sent: script(MARK_SENT),
            take: script(TAKE),
            take_all: script(TAKE_ALL),
            forget: script(FORGET),
            append: script(APPEND),
            read: script(READ),
            finish: script(FINISH),
            state: script(STATE),
        }
    })
}

impl super::Keys {
    fn pending_receipts(&self) -> String {
        format!("herald:rp:{}", self.tag)
    }
    fn settling_receipts(&self) -> String {
        format!("herald:rs:{}", self.tag)
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

fn by_message_key(sub: &ReceiptSub) -> String {
    format!("herald:rk:{{{}}}", sub_hex(sub))
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

/// What a take appends to a pending record: the outcome it decides, and
/// when.
fn settling_suffix(outcome: Outcome, at_ms: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(SETTLING_LEN - PENDING_LEN);
    v.push(outcome.to_u8());
    v.extend_from_slice(&outcome.code().unwrap_or(0).to_be_bytes());
    v.extend_from_slice(&at_ms.to_be_bytes());
    v
}

/// A message being settled: its pending record, and the outcome decided
/// for it at unix ms `at`.
#[derive(Debug, PartialEq)]
struct Settling {
    seq: u64,
    pending: PendingReceipt,
    outcome: Outcome,
    at: u64,
}

fn decode_settling(seq: u64, v: &[u8]) -> Option<Settling> {
    if v.len() != SETTLING_LEN {
        return None;
    }
    let (record, rest) = v.split_at(PENDING_LEN);
    let (kind, rest) = rest.split_first()?;
    let (code, at) = rest.split_at(4);
    Some(Settling {
        seq,
        pending: decode_pending(record)?,
        outcome: Outcome::from_u8(*kind, u32::from_be_bytes(code.try_into().ok()?))?,
        at: u64::from_be_bytes(at.try_into().ok()?),
    })
}

/// Records taken from (or found in) one user agent's settling hash.
struct Taken {
    seqs: Vec<u64>,
    records: Vec<Vec<u8>>,
}

impl Taken {
    fn decoded(self) -> Vec<Settling> {
        self.seqs
            .into_iter()
            .zip(self.records)
            .filter_map(|(seq, v)| {
                let s = decode_settling(seq, &v);
                if s.is_none() {
                    tracing::warn!("dropping an undecodable settling receipt");
                }
                s
            })
            .collect()
    }
}

/// A receipt appended to its subscription; `fresh` when this append, not
/// an earlier one, listed it.
struct Appended {
    sub: ReceiptSub,
    event: ReceiptEvent,
    fresh: bool,
}

impl RedisStore {
    fn retention_ms(&self) -> u64 {
        self.receipt_retention.as_millis().min(u128::from(u64::MAX)) as u64
    }

    /// A take's invocation (TAKE or TAKE_ALL): `uaid`'s pending and
    /// settling hashes, which records (`which`), and the outcome and time
    /// to settle them with. Also returns the pending hash's key, the slot to
    /// wait on.
    fn take_invocation<'s>(
        &self,
        script: &'s Script,
        uaid: &Uaid,
        which: impl redis::ToRedisArgs,
        (outcome, at_ms): (Outcome, u64),
    ) -> (redis::ScriptInvocation<'s>, String) {
        let keys = super::Keys::new(uaid);
        let records = keys.pending_receipts();
        let mut inv = script.prepare_invoke();
        inv.key(&records)
            .key(keys.settling_receipts())
            .arg(which)
            .arg(settling_suffix(outcome, at_ms))
            .arg(self.receipt_retention.as_secs().max(1));
        (inv, records)
    }

    /// Takes the given records of `uaid` to settle them as `outcome`: all
    /// of them with `due` None, else those whose deadline is at or before
    /// `due`. Those already being settled come back with their own
    /// outcome. Also returns the seqs and deadlines of those not yet due.
    async fn take(
        &self,
        uaid: &Uaid,
        due: Option<u64>,
        seqs: &[u64],
        (outcome, at_ms): (Outcome, u64),
    ) -> StoreResult<(Taken, Vec<(u64, u64)>)> {
        let due = due.map(|d| d.to_string()).unwrap_or_default();
        let (mut inv, records) = self.take_invocation(&scripts().take, uaid, due, (outcome, at_ms));
        for seq in seqs {
            inv.arg(*seq);
        }
        // Waited for: a decision a failover undid would leave the message
        // to be swept as expired however it was answered.
        type Took = (Vec<u64>, Vec<Vec<u8>>, Vec<u64>, Vec<u64>);
        let (seqs, records, later, deadlines) = self
            .eval_waited("settle", &scripts().take, &inv, &records, |t: &Took| {
                !t.0.is_empty()
            })
            .await?;
        Ok((
            Taken { seqs, records },
            later.into_iter().zip(deadlines).collect(),
        ))
    }

    /// Appends each settling message's receipt to its subscription, once
    /// however often this runs for it.
    async fn append(&self, uaid: &Uaid, settling: &[Settling]) -> StoreResult<Vec<Appended>> {
        let mut appended: Vec<Appended> = settling
            .iter()
            .map(|s| Appended {
                sub: s.pending.sub,
                event: ReceiptEvent {
                    id: 0,
                    uaid: *uaid,
                    channel: s.pending.channel,
                    seq: s.seq,
                    outcome: s.outcome,
                    at: s.at,
                },
                fresh: false,
            })
            .collect();
        let mut by_sub: BTreeMap<ReceiptSub, Vec<usize>> = BTreeMap::new();
        for (i, a) in appended.iter().enumerate() {
            by_sub.entry(a.sub).or_default().push(i);
        }
        let retention = self.retention_ms();
        for (sub, indices) in by_sub {
            let events = events_key(&sub);
            let mut inv = scripts().append.prepare_invoke();
            inv.key(&events).key(by_message_key(&sub)).arg(retention);
            for &i in &indices {
                inv.arg(encode_receipt(&appended[i].event));
            }
            // A receipt the application server reads must outlive a
            // failover, as the message did.
            let (ids, fresh): (Vec<u64>, Vec<u8>) = self
                .eval_waited("settle", &scripts().append, &inv, &events, |_| true)
                .await?;
            if ids.len() != indices.len() || fresh.len() != indices.len() {
                return Err(StoreError::Corrupt(format!(
                    "redis settle: {} ids for {} receipts",
                    ids.len(),
                    indices.len()
                )));
            }
            for ((i, id), fresh) in indices.into_iter().zip(ids).zip(fresh) {
                appended[i].event.id = id;
                appended[i].fresh = fresh == 1;
            }
        }
        Ok(appended)
    }

    /// Writes the outcomes of appended receipts and ends their settling.
    async fn finish(&self, uaid: &Uaid, appended: &[Appended]) -> StoreResult<()> {
        let keys = super::Keys::new(uaid);
        let retention = self.retention_ms();
        let mut inv = scripts().finish.prepare_invoke();
        inv.key(keys.settling_receipts());
        for a in appended {
            let until = a
                .event
                .at
                .saturating_add(retention)
                .min(MAX_EXACT_SCORE - 1);
            inv.key(keys.outcome(a.event.seq))
                .arg(a.event.seq)
                .arg(encode_receipt(&a.event))
                .arg(until);
        }
        self.eval::<i64>("settle", &inv).await.map(drop)
    }

    async fn unindex(&self, members: &[String]) -> StoreResult<()> {
        if members.is_empty() {
            return Ok(());
        }
        let mut cmd = redis::cmd("ZREM");
        cmd.arg(EXPIRY_KEY).arg(members);
        self.query::<i64>("settle", &cmd).await.map(drop)
    }

    /// Has the sweep finish these settles `RESUME_SECS` from now if they
    /// have not finished by then (XX: never re-adds a finished one).
    async fn resume_later(&self, members: &[String]) -> StoreResult<()> {
        if members.is_empty() {
            return Ok(());
        }
        let at = self.clock.now_secs().saturating_add(RESUME_SECS);
        let mut cmd = redis::cmd("ZADD");
        cmd.arg(EXPIRY_KEY).arg("XX");
        for m in members {
            cmd.arg(at).arg(m);
        }
        self.query::<i64>("settle", &cmd).await.map(drop)
    }

    /// Settles what `take` took: appends the receipts, writes the outcomes
    /// and drops the index members. Returns the receipts this call listed.
    /// If a step fails, what is left stays settling for the sweep to finish
    /// (`moved_ahead`: the take's caller already moved the members for that).
    async fn settle_taken(
        &self,
        uaid: &Uaid,
        taken: Taken,
        moved_ahead: bool,
    ) -> StoreResult<Vec<(ReceiptSub, ReceiptEvent)>> {
        if taken.seqs.is_empty() {
            return Ok(Vec::new());
        }
        let members: Vec<String> = taken
            .seqs
            .iter()
            .map(|&seq| expiry_member(uaid, seq))
            .collect();
        let settling = taken.decoded();
        let resume = async {
            if moved_ahead {
                Ok(())
            } else {
                self.resume_later(&members).await
            }
        };
        let (resume, appended) = tokio::join!(resume, self.append(uaid, &settling));
        if let Err(e) = resume {
            tracing::warn!("receipt ledger: an interrupted settle waits for its deadline: {e}");
        }
        let appended = appended?;
        self.finish(uaid, &appended).await?;
        self.unindex(&members).await?;
        Ok(appended
            .into_iter()
            .filter(|a| a.fresh)
            .map(|a| (a.sub, a.event))
            .collect())
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
        let records = super::Keys::new(uaid).pending_receipts();
        let mut inv = scripts().track.prepare_invoke();
        inv.key(&records)
            .arg(seq)
            .arg(encode_pending(pending))
            .arg(keep_until);
        // Both are part of the 201's promise of a receipt, so both are
        // waited for like the message.
        self.eval_waited::<i64>("track", &scripts().track, &inv, &records, |_| true)
            .await?;
        // Only once the record is there: a sweep that found the member
        // first would drop it as stale.
        let mut inv = scripts().index.prepare_invoke();
        inv.key(EXPIRY_KEY)
            .arg(deadline)
            .arg(expiry_member(uaid, seq));
        self.eval_waited::<i64>("track", &scripts().index, &inv, EXPIRY_KEY, |_| true)
            .await
            .map(drop)
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
        // Moved before the take's answer is known: a take that ran but
        // whose answer was lost is finished by the sweep as soon.
        let member = [expiry_member(uaid, seq)];
        let seqs = [seq];
        let (resume, took) = tokio::join!(
            self.resume_later(&member),
            self.take(uaid, None, &seqs, (outcome, at_ms))
        );
        let (taken, _) = took?;
        if taken.seqs.is_empty() {
            return Ok(None);
        }
        let settled = self.settle_taken(uaid, taken, resume.is_ok()).await?;
        Ok(settled.into_iter().next())
    }

    async fn forget(&self, uaid: &Uaid, seq: u64) -> StoreResult<()> {
        let mut inv = scripts().forget.prepare_invoke();
        inv.key(super::Keys::new(uaid).pending_receipts()).arg(seq);
        let removed: i64 = self.eval("forget", &inv).await?;
        if removed == 0 {
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
        let which: &[u8] = channel.as_ref().map_or(&[], |c| c.as_bytes());
        let (inv, records) =
            self.take_invocation(&scripts().take_all, uaid, which, (outcome, at_ms));
        type Took = (Vec<u64>, Vec<Vec<u8>>);
        let (seqs, records) = self
            .eval_waited(
                "settle_all",
                &scripts().take_all,
                &inv,
                &records,
                |t: &Took| !t.0.is_empty(),
            )
            .await?;
        if seqs.is_empty() {
            return Ok(Vec::new());
        }
        self.settle_taken(uaid, Taken { seqs, records }, false)
            .await
    }

    /// Several nodes may sweep at once: each settles what it took first.
    /// Settles that stopped half-way come due here too, and are finished
    /// with the outcome they were given.
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
        let mut failed = None;
        for (uaid, seqs) in by_uaid {
            let (taken, later) = match self
                .take(&uaid, Some(now), &seqs, (Outcome::Expired, at_ms))
                .await
            {
                Ok(t) => t,
                Err(e) => {
                    failed = Some(e);
                    continue;
                }
            };
            // Members whose record is gone were settled or forgotten by a
            // step that did not get to drop them.
            stale.extend(
                seqs.iter()
                    .filter(|s| !taken.seqs.contains(s) && !later.iter().any(|(l, _)| l == *s))
                    .map(|&s| expiry_member(&uaid, s)),
            );
            moved.extend(later.into_iter().map(|(s, d)| (d, expiry_member(&uaid, s))));
            // One user agent's shard failing must not hold up the others'.
            match self.settle_taken(&uaid, taken, false).await {
                Ok(done) => settled.extend(done),
                Err(e) => failed = Some(e),
            }
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
        match failed {
            Some(e) if settled.is_empty() => Err(e),
            Some(e) => {
                tracing::warn!("receipt ledger: expiry sweep, some left for the next: {e}");
                Ok(settled)
            }
            None => Ok(settled),
        }
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
            .key(by_message_key(sub))
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
            .key(keys.settling_receipts())
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
            // Decided, not yet listed: its id is not known yet.
            Some((3, v)) => decode_settling(seq, &v).map(|s| {
                ReceiptState::Settled(ReceiptEvent {
                    id: 0,
                    uaid: *uaid,
                    channel: s.pending.channel,
                    seq,
                    outcome: s.outcome,
                    at: s.at,
                })
            }),
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
        assert_eq!(v[RECEIPT_UAID], e.uaid.0);
        assert_eq!(v[RECEIPT_SEQ], e.seq.to_be_bytes());
        assert_eq!(v[RECEIPT_AT..RECEIPT_AT + 8], e.at.to_be_bytes());
        assert_eq!(v.len(), RECEIPT_AT + 8);
    }

    #[test]
    fn a_settling_record_keeps_its_outcome() {
        let p = pending();
        for outcome in [Outcome::Delivered, Outcome::Rejected(302), Outcome::Expired] {
            let mut v = encode_pending(&p);
            v.extend(settling_suffix(outcome, 1_765_000_000_123));
            assert_eq!(v.len(), SETTLING_LEN);
            assert_eq!(
                decode_settling(9, &v),
                Some(Settling {
                    seq: 9,
                    pending: p,
                    outcome,
                    at: 1_765_000_000_123
                })
            );
            assert_eq!(decode_settling(9, &v[..SETTLING_LEN - 1]), None);
        }
        // A pending record alone is not one being settled.
        assert_eq!(decode_settling(9, &encode_pending(&p)), None);
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
        assert_eq!(Slot::for_key(k.settling_receipts()), slot);
        let sub = ReceiptSub::random();
        assert!(events_key(&sub).ends_with(&format!("{{{}}}", sub_hex(&sub))));
        assert_eq!(
            Slot::for_key(by_message_key(&sub)),
            Slot::for_key(events_key(&sub))
        );
        assert_eq!(sub_hex(&sub).len(), 32);
    }
}
