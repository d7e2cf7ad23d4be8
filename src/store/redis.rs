//! Redis, standalone or Redis Cluster (Valkey works too), as the shared store
//! that lets several Herald nodes serve the same user agents.
//!
//! Every key of one user agent carries its uaid as a hash tag, so all of
//! them live in one cluster slot and every multi-key step runs as one Lua
//! script on one node, atomically. Values use the same encodings as the
//! embedded engine (`codec`).
//!
//! | key | type | content |
//! |---|---|---|
//! | `herald:u:{uaid}` | string | encoded `UserRecord`; expires `ua_expiry` after the last `put_user` |
//! | `herald:c:{uaid}` | hash | channel id bytes → encoded `ChannelRecord`; expiry refreshed with the user |
//! | `herald:m:{uaid}` | sorted set | pending seqs (member = decimal seq, score = seq); expires with its newest message |
//! | `herald:x:{uaid}` | sorted set | the same seqs scored by `expires_at`, so counting live messages is one `ZCOUNT`; expires with its newest message |
//! | `herald:p:{uaid}:<seq>` | string | encoded `Message`, `EXAT expires_at` |
//! | `herald:t:{uaid}` | hash | channel id bytes + topic → decimal seq; expires with its newest message |
//! | `herald:broadcasts` | hash | broadcast id → version |
//! | `herald:blocks` | hash | blocked sender id → its record (see `admin::blocks`) |
//!
//! The receipt ledger's keys (`herald:rp:`, `herald:rx`, `herald:re:`,
//! `herald:ro:`) are described in `receipts`; the bridges' outbox
//! (`herald:ob`) in `outbox`.
//!
//! Needs Redis 7.0 or later (Valkey 7.2+) for `EXPIRETIME`.

use super::codec::{
    decode_channel, decode_message, decode_user, encode_channel, encode_message, encode_user,
    EXPIRES_AT,
};
use super::{
    now_micros, now_secs, ChannelRecord, Message, OwnerSeen, PutOutcome, SharedClock, Store,
    StoreError, StoreResult, StoreStats, UserRecord,
};
use herald_proto::ids::{ChannelId, Uaid};
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, FromRedisValue, Pipeline, RedisError, RedisFuture, Script, ScriptInvocation};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Per attempt to open a TCP connection to one node.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Per attempt to get one answer from one node.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(1);
/// Whole store operation, retries and reconnects included: a dead Redis must
/// turn into an error (503) quickly rather than a hanging request.
const OP_TIMEOUT: Duration = Duration::from_secs(2);
/// Whole of `connect`, cluster discovery included.
const CONNECT_BUDGET: Duration = Duration::from_millis(2500);
/// Seq collisions need two nodes in the same microsecond for one user
/// agent; several in a row mean something else is wrong.
const MAX_SEQ_ATTEMPTS: usize = 8;
/// Where the channel id sits in an encoded message (see codec; rocks.rs
/// reads the same bytes). A unit test below holds it to `encode_message`.
const MESSAGE_CHANNEL: std::ops::Range<usize> = 18..34;
/// Seqs are passed to Redis as sorted-set scores, which are f64.
const MAX_EXACT_SCORE: u64 = 1 << 53;

/// How long decided receipts stay listed unless `with_receipt_retention`
/// says otherwise.
const DEFAULT_RECEIPT_RETENTION: Duration = Duration::from_secs(3 * 24 * 3600);

/// Broadcast id → version (see `broadcast`).
const BROADCASTS_KEY: &str = "herald:broadcasts";
/// Blocked sender id → record (see `admin::blocks`).
const BLOCKS_KEY: &str = "herald:blocks";

const PUT_COLLISION: i64 = -1;
const PUT_FULL: i64 = -2;

/// How often a node compares its clock with Redis's (see `SharedClock`).
const SKEW_CHECK_INTERVAL: Duration = Duration::from_secs(10);

/// Shared by every script: the big-endian u64 at byte `off` (0-based) of `s`.
/// Exact while below 2^53, which unix seconds are.
const LUA_BE64: &str = r"
local function be64(s, off)
  local n = 0
  for i = off + 1, off + 8 do n = n * 256 + (string.byte(s, i) or 0) end
  return n
end
";

// KEYS: messages zset, payload key, topics hash, expiries zset (and the
// owner record, read by PUT_THEN_OWNER, which wraps this).
// ARGV: seq, encoded message, expires_at, topic field ('' for none), payload
// key prefix, expires_at offset, limit (0: none).
// Returns 0 stored, -1 seq taken, -2 full (`limit` unexpired messages held
// already), or the seq of the pending message it replaced (seqs are
// positive and below 2^53, so exact as Lua numbers).
// The same seq holding these very bytes is this call's own earlier attempt:
// the cluster client sends a script again when its connection resets, and
// the first attempt may have run with only its answer lost. Taken for a
// collision, that stored the message a second time under a fresh seq, so
// its user agent got it twice (`make chaos`, lossy links). It answers 0,
// before the limit (which counts the message already): what the first
// attempt replaced is not known again, so a receipt asked for that message
// is not forgotten (the rare cost of a lost answer, against a duplicate).
// Every command here runs once whatever the queue holds, except when the
// expiries zset is missing: then it is built from the queue (a queue stored
// before it existed, or one whose entries all expired; members whose payload
// expired are pruned on the way, so each is visited once). It is built
// before the count, which reads it, and an empty queue costs one ZRANGE.
const PUT_MESSAGE: &str = r"
local at = tonumber(ARGV[3])
local now = tonumber(redis.call('TIME')[1])
if at <= now then return 0 end
if redis.call('GET', KEYS[2]) == ARGV[2] then return 0 end
if redis.call('EXISTS', KEYS[4]) == 0 then
  for _, s in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
    local head = redis.call('GETRANGE', ARGV[5] .. s, ARGV[6], ARGV[6] + 7)
    if head == '' then
      redis.call('ZREM', KEYS[1], s)
    else
      redis.call('ZADD', KEYS[4], be64(head, 0), s)
    end
  end
end
local limit = tonumber(ARGV[7])
if limit > 0 and redis.call('ZCOUNT', KEYS[4], '(' .. now, '+inf') >= limit then return -2 end
if not redis.call('SET', KEYS[2], ARGV[2], 'NX', 'EXAT', ARGV[3]) then return -1 end
redis.call('ZADD', KEYS[1], ARGV[1], ARGV[1])
redis.call('ZADD', KEYS[4], ARGV[3], ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now)
local function outlive(key)
  if redis.call('EXPIRETIME', key) < at then redis.call('EXPIREAT', key, ARGV[3]) end
end
outlive(KEYS[1])
outlive(KEYS[4])
if ARGV[4] == '' then return 0 end
local replaced = 0
local old = redis.call('HGET', KEYS[3], ARGV[4])
if old and old ~= ARGV[1] then
  if redis.call('DEL', ARGV[5] .. old) == 1 then replaced = tonumber(old) end
  redis.call('ZREM', KEYS[1], old)
  redis.call('ZREM', KEYS[4], old)
end
redis.call('HSET', KEYS[3], ARGV[4], ARGV[1])
outlive(KEYS[3])
return replaced
";

// KEYS: messages zset, expiries zset. ARGV: after, limit, now, payload key prefix, expires_at offset.
// Returns {pruned, seqs, values}.
const READ_MESSAGES: &str = r"
local limit, now, off = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[5])
local seqs, values, pruned = {}, {}, 0
local from = '(' .. ARGV[1]
while #seqs < limit do
  local batch = redis.call('ZRANGEBYSCORE', KEYS[1], from, '+inf', 'LIMIT', 0, 128)
  if #batch == 0 then break end
  for _, s in ipairs(batch) do
    local v = redis.call('GET', ARGV[4] .. s)
    if not v then
      redis.call('ZREM', KEYS[1], s)
      redis.call('ZREM', KEYS[2], s)
      pruned = pruned + 1
    elseif be64(v, off) > now then
      seqs[#seqs + 1] = s
      values[#values + 1] = v
      if #seqs >= limit then break end
    end
  end
  from = '(' .. batch[#batch]
end
return {pruned, seqs, values}
";

// KEYS: messages zset, payload key, expiries zset. ARGV: seq. Returns 1 if
// the payload existed.
const DELETE_MESSAGE: &str = r"
local existed = redis.call('DEL', KEYS[2])
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
return existed
";

// KEYS: channels hash, messages zset, topics hash, expiries zset.
// ARGV: channel id bytes, payload key prefix, channel offset in a message.
// Returns {existed, pruned}. An unknown channel costs one HDEL: messages are
// only stored for a channel that exists, so there is nothing to scan for.
const REMOVE_CHANNEL: &str = r"
local existed = redis.call('HDEL', KEYS[1], ARGV[1])
if existed == 0 then return {0, 0} end
local off = tonumber(ARGV[3])
local pruned = 0
for _, s in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
  local ch = redis.call('GETRANGE', ARGV[2] .. s, off, off + 15)
  if ch == '' then
    redis.call('ZREM', KEYS[2], s)
    redis.call('ZREM', KEYS[4], s)
    pruned = pruned + 1
  elseif ch == ARGV[1] then
    redis.call('DEL', ARGV[2] .. s)
    redis.call('ZREM', KEYS[2], s)
    redis.call('ZREM', KEYS[4], s)
  end
end
for _, f in ipairs(redis.call('HKEYS', KEYS[3])) do
  if string.sub(f, 1, 16) == ARGV[1] then redis.call('HDEL', KEYS[3], f) end
end
return {existed, pruned}
";

// KEYS: user, channels hash, messages zset, topics hash, expiries zset.
// ARGV: payload key prefix.
const DROP_USER: &str = r"
for _, s in ipairs(redis.call('ZRANGE', KEYS[3], 0, -1)) do
  redis.call('DEL', ARGV[1] .. s)
end
return redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5])
";

// KEYS: user, channels hash. ARGV: encoded record, expiry in seconds (0: never).
// The channels expire with the user so a silent user agent leaves nothing.
const PUT_USER: &str = r"
if tonumber(ARGV[2]) > 0 then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
  redis.call('EXPIRE', KEYS[2], ARGV[2])
else
  redis.call('SET', KEYS[1], ARGV[1])
  redis.call('PERSIST', KEYS[2])
end
return 0
";

// Runs PUT_MESSAGE's body as `put`, then reads the user agent's owner
// (KEYS[5], `herald:o`, in the same slot) after the store, so the node that
// accepted the push knows whom to wake without a round trip of its own.
// Answers {put's answer, owner} or {put's answer} when no node holds it.
const PUT_THEN_OWNER: &str = r"
local answer = put()
local owner = redis.call('GET', KEYS[5])
if owner then return {answer, owner} end
return {answer}
";

// KEYS: channels hash. ARGV: channel id bytes, encoded record, expiry (0: never).
const PUT_CHANNEL: &str = r"
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
if tonumber(ARGV[3]) > 0 then redis.call('EXPIRE', KEYS[1], ARGV[3]) end
return 0
";

struct Scripts {
    put_message: Script,
    read_messages: Script,
    delete_message: Script,
    remove_channel: Script,
    drop_user: Script,
    put_user: Script,
    put_channel: Script,
}

impl Scripts {
    fn new() -> Self {
        let with_be64 = |body: &str| Script::new(&format!("{LUA_BE64}{body}"));
        Scripts {
            put_message: with_be64(&format!(
                "local function put()\n{PUT_MESSAGE}\nend\n{PUT_THEN_OWNER}"
            )),
            read_messages: with_be64(READ_MESSAGES),
            delete_message: Script::new(DELETE_MESSAGE),
            remove_channel: Script::new(REMOVE_CHANNEL),
            drop_user: Script::new(DROP_USER),
            put_user: Script::new(PUT_USER),
            put_channel: Script::new(PUT_CHANNEL),
        }
    }
}

/// One type for both deployments so every command path is shared.
#[derive(Clone)]
enum Conn {
    Standalone(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, redis::Value> {
        match self {
            Conn::Standalone(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Conn::Standalone(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Standalone(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// The keys of one user agent; the `{uaid}` hash tag puts them in one slot.
struct Keys {
    tag: String,
}

/// The store script's answer code (`PUT_MESSAGE`'s), if the answer has one.
fn put_code(answer: &[redis::Value]) -> Option<i64> {
    redis::from_redis_value_ref::<i64>(answer.first()?).ok()
}

/// The owner `PUT_THEN_OWNER` read; an unreadable owner record counts as
/// none (the wake-up is then skipped, and the user agent's connection finds
/// the message at its next read of the store). Read in place, without a
/// copy: this runs for every push on a cluster.
fn put_owner(answer: &[redis::Value]) -> OwnerSeen {
    let text = match answer.get(1) {
        Some(redis::Value::BulkString(b)) => std::str::from_utf8(b).ok(),
        Some(redis::Value::SimpleString(s)) => Some(s.as_str()),
        _ => None,
    };
    text.and_then(directory::decode_owner)
        .map_or(OwnerSeen::Nobody, OwnerSeen::Is)
}

impl Keys {
    fn new(uaid: &Uaid) -> Self {
        Keys {
            tag: format!("{{{uaid}}}"),
        }
    }
    fn user(&self) -> String {
        format!("herald:u:{}", self.tag)
    }
    fn channels(&self) -> String {
        format!("herald:c:{}", self.tag)
    }
    fn messages(&self) -> String {
        format!("herald:m:{}", self.tag)
    }
    fn topics(&self) -> String {
        format!("herald:t:{}", self.tag)
    }
    fn expiries(&self) -> String {
        format!("herald:x:{}", self.tag)
    }
    /// Scripts build payload keys of seqs they find from this prefix.
    fn payload_prefix(&self) -> String {
        format!("herald:p:{}:", self.tag)
    }
    fn payload(&self, seq: u64) -> String {
        format!("herald:p:{}:{seq}", self.tag)
    }
}

fn topic_field(channel: &ChannelId, topic: &str) -> Vec<u8> {
    let mut f = Vec::with_capacity(16 + topic.len());
    f.extend_from_slice(channel.as_bytes());
    f.extend_from_slice(topic.as_bytes());
    f
}

fn redis_err(what: &str, e: RedisError) -> StoreError {
    error::from_redis(what, e)
}

/// Scripts take counts as Lua numbers (f64).
fn lua_count(n: usize) -> u64 {
    (n as u64).min(MAX_EXACT_SCORE)
}

/// The seed URLs of `url`: one, or several separated by commas.
fn parse_seeds(url: &str) -> StoreResult<Vec<String>> {
    let seeds: Vec<String> = url
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect();
    if seeds.is_empty() {
        return Err(StoreError::Rejected("redis: no URL given".into()));
    }
    Ok(seeds)
}

/// Whether the server at `url` runs in cluster mode (`INFO cluster`).
async fn cluster_enabled(url: &str) -> StoreResult<bool> {
    let client = redis::Client::open(url).map_err(|e| redis_err("URL", e))?;
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(Some(RESPONSE_TIMEOUT));
    let mut conn = client
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .map_err(|e| redis_err("connect", e))?;
    let info: String = redis::cmd("INFO")
        .arg("cluster")
        .query_async(&mut conn)
        .await
        .map_err(|e| redis_err("INFO cluster", e))?;
    Ok(info.lines().any(|l| l.trim() == "cluster_enabled:1"))
}

async fn open_standalone(url: &str) -> StoreResult<Conn> {
    let client = redis::Client::open(url).map_err(|e| redis_err("URL", e))?;
    // Few, short reconnect attempts: while Redis is down each request should
    // fail fast, and the next one starts a fresh attempt anyway.
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(Some(RESPONSE_TIMEOUT))
        .set_number_of_retries(2)
        .set_max_delay(Duration::from_millis(200));
    let manager = ConnectionManager::new_with_config(client, config)
        .await
        .map_err(|e| redis_err("connect", e))?;
    Ok(Conn::Standalone(manager))
}

async fn open_cluster(seeds: &[String]) -> StoreResult<Conn> {
    open_cluster_with(seeds, 3, Some(OP_TIMEOUT)).await
}

/// A cluster connection that retries a failed call `retries` times, within
/// `overall` if set.
async fn open_cluster_with(
    seeds: &[String],
    retries: u32,
    overall: Option<Duration>,
) -> StoreResult<Conn> {
    let client = ClusterClientBuilder::new(seeds.iter().map(String::as_str))
        .connection_timeout(CONNECT_TIMEOUT)
        .response_timeout(RESPONSE_TIMEOUT)
        .overall_response_timeout(overall)
        .retries(retries)
        .build()
        .map_err(|e| redis_err("cluster URL", e))?;
    let conn = client
        .get_async_connection()
        .await
        .map_err(|e| redis_err("cluster connect", e))?;
    Ok(Conn::Cluster(conn))
}

async fn open(seeds: &[String]) -> StoreResult<Conn> {
    if seeds.len() > 1 || cluster_enabled(&seeds[0]).await? {
        open_cluster(seeds).await
    } else {
        open_standalone(&seeds[0]).await
    }
}

/// The Redis engine; see the module documentation for its keys.
pub struct RedisStore {
    /// Every call but waited writes; replaced on a cluster when calls time
    /// out (renew.rs says why).
    conn: Arc<renew::Current>,
    scripts: Scripts,
    seq: AtomicU64,
    /// Seconds a silent user agent lives; 0 keeps it forever.
    ua_expiry_secs: u64,
    expired: Option<prometheus::IntCounter>,
    seq_collisions: AtomicU64,
    /// Replicas that must confirm each stored message, and for how long to
    /// wait for them.
    wait: Option<(u32, Duration)>,
    /// How long decided receipts are kept (Redis expires them by itself,
    /// so it must know the retention up front).
    receipt_retention: Duration,
    /// Redis's clock, which every node compares expiry times and receipt
    /// deadlines in. Why: they are written by one node but enforced by Redis
    /// and compared by every other node. A node 30 s behind stored messages
    /// whose TTL was 30 s or less already expired, still answering 201
    /// (found by `make chaos`), and one 30 s ahead skipped, as expired,
    /// messages other nodes had stored. So they cross the store boundary in
    /// Redis's time: shifted on the way in, back on the way out.
    clock: SharedClock,
    /// Where waited writes go (waited.rs says why).
    lane: waited::Lane,
}

/// Reads Redis's clock once; None when it does not answer.
async fn read_offset(conn: &Conn) -> Option<i64> {
    let mut c = conn.clone();
    let cmd = redis::cmd("TIME");
    let time: Result<redis::RedisResult<(u64, u64)>, _> =
        tokio::time::timeout(OP_TIMEOUT, cmd.query_async(&mut c)).await;
    match time {
        Ok(Ok((secs, _micros))) => Some(SharedClock::offset_from_readings(secs, now_secs())),
        _ => None,
    }
}

/// Keeps `clock` in step with Redis's every `SKEW_CHECK_INTERVAL` while the
/// store lives. A failed reading keeps the last value.
async fn watch_clock(conn: Arc<renew::Current>, clock: SharedClock) {
    loop {
        if let Some(d) = read_offset(&conn.get()).await {
            note_offset(&clock, d);
        }
        if clock.is_alone() {
            return;
        }
        tokio::time::sleep(SKEW_CHECK_INTERVAL).await;
        if clock.is_alone() {
            return;
        }
    }
}

fn note_offset(clock: &SharedClock, d: i64) {
    if d != clock.offset() {
        tracing::warn!(
            skew_secs = d,
            "this node's clock differs from Redis's; expiry times, receipt deadlines and node requests' timestamps are kept in Redis's time"
        );
    }
    clock.set_offset(d);
}

impl RedisStore {
    /// Connects to Redis. `url` is one `redis://host:port` or a
    /// comma-separated list of them. The rule for the mode:
    ///
    /// - several URLs: Redis Cluster, the URLs being seed nodes;
    /// - one URL: whatever the server says in `INFO cluster`
    ///   (`cluster_enabled:1` means Redis Cluster with that one seed,
    ///   anything else a standalone server, a primary of which is expected).
    ///
    /// `expired` counts messages found expired and pruned (Redis drops their
    /// payloads by itself, so messages whose user agent never reads again
    /// are not counted). User agents and their subscriptions expire
    /// `ua_expiry_secs` after their last `put_user` (0: never).
    ///
    /// Gives up with an error after about 2.5 s.
    pub async fn connect(
        url: &str,
        expired: Option<prometheus::IntCounter>,
        ua_expiry_secs: u64,
    ) -> StoreResult<RedisStore> {
        let seeds = parse_seeds(url)?;
        let conn = tokio::time::timeout(CONNECT_BUDGET, open(&seeds))
            .await
            .map_err(|_| {
                StoreError::Unavailable(format!(
                    "redis connect: no answer from {url} within {CONNECT_BUDGET:?}"
                ))
            })??;
        // Read before anything is stored or signed in Redis's time.
        let clock = SharedClock::default();
        let offset = read_offset(&conn).await.ok_or_else(|| {
            StoreError::Unavailable(format!("redis connect: no answer to TIME from {url}"))
        })?;
        note_offset(&clock, offset);
        let lane = waited::Lane::new(seeds.clone(), matches!(conn, Conn::Cluster(_)));
        let conn = renew::Current::new(conn, seeds);
        tokio::spawn(watch_clock(conn.clone(), clock.clone()));
        Ok(RedisStore {
            clock,
            lane,
            conn,
            scripts: Scripts::new(),
            seq: AtomicU64::new(now_micros()),
            ua_expiry_secs,
            expired,
            seq_collisions: AtomicU64::new(0),
            wait: None,
            receipt_retention: DEFAULT_RECEIPT_RETENTION,
        })
    }

    /// Makes every `put_message` wait until `replicas` replicas have the
    /// write (Redis `WAIT`), failing after `timeout`. Replication stays
    /// asynchronous: this narrows what a failover can lose to what was
    /// written but not yet answered (see proto-docs/storage.md).
    pub fn wait_for(mut self, replicas: u32, timeout: Duration) -> Self {
        self.wait = (replicas > 0).then_some((replicas, timeout));
        self
    }

    /// Keeps decided receipts (and what `receipt_state` knows of settled
    /// messages) for `retention` after their decision, 3 days by default.
    /// Redis drops them by itself after that; `purge_receipts` is a no-op.
    pub fn with_receipt_retention(mut self, retention: Duration) -> Self {
        self.receipt_retention = retention;
        self
    }

    /// Whether this store talks to a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        self.conn.is_cluster()
    }

    /// How many times a message had to take a new seq because another node
    /// had stored one under the same seq for the same user agent.
    pub fn seq_collisions(&self) -> u64 {
        self.seq_collisions.load(Ordering::Relaxed)
    }

    async fn bounded<T>(
        &self,
        what: &str,
        fut: impl Future<Output = redis::RedisResult<T>>,
    ) -> StoreResult<T> {
        match tokio::time::timeout(OP_TIMEOUT, fut).await {
            Ok(result) => result.map_err(|e| {
                if e.is_timeout() {
                    self.conn.timed_out();
                }
                redis_err(what, e)
            }),
            Err(_) => {
                self.conn.timed_out();
                Err(error::timed_out(what, OP_TIMEOUT))
            }
        }
    }

    async fn query<T: FromRedisValue>(&self, what: &str, cmd: &Cmd) -> StoreResult<T> {
        let mut conn = self.conn.get();
        self.bounded(what, cmd.query_async(&mut conn)).await
    }

    /// EVALSHA, loading the script first where the node does not know it.
    async fn eval<T: FromRedisValue>(
        &self,
        what: &str,
        invocation: &ScriptInvocation<'_>,
    ) -> StoreResult<T> {
        let mut conn = self.conn.get();
        self.bounded(what, invocation.invoke_async(&mut conn)).await
    }

    /// A stored message with its expiry back in this node's time.
    fn in_node_time(&self, m: Message) -> Message {
        Message {
            expires_at: self.clock.to_node(m.expires_at),
            ..m
        }
    }

    fn count_expired(&self, n: u64) {
        if let (Some(c), true) = (&self.expired, n > 0) {
            c.inc_by(n);
        }
    }

    /// `store_message` with no limit for None.
    async fn put_checked(
        &self,
        uaid: &Uaid,
        m: &Message,
        limit: Option<usize>,
    ) -> StoreResult<Option<PutOutcome>> {
        self.store_message(uaid, m, limit.unwrap_or(0)).await
    }

    /// Runs the store script; with `wait_for`, on the waited-write lane and
    /// followed by `WAIT` there, failing unless the replicas confirmed a
    /// message it stored.
    async fn run_put(
        &self,
        uaid: &Uaid,
        inv: &ScriptInvocation<'_>,
    ) -> StoreResult<(i64, OwnerSeen)> {
        let kept = |a: &Vec<redis::Value>| {
            put_code(a).is_some_and(|r| r != PUT_COLLISION && r != PUT_FULL)
        };
        let answer = self
            .eval_confirmed("put_message", &self.scripts.put_message, inv, uaid, kept)
            .await?;
        let code = put_code(&answer).ok_or_else(|| {
            StoreError::Corrupt(format!("redis put_message: unexpected answer {answer:?}"))
        })?;
        Ok((code, put_owner(&answer)))
    }

    /// Runs a script whose success someone is told of (a 201, a register's
    /// 200): with `wait_for`, on the waited-write lane and followed by
    /// `WAIT`, failing unless the replicas confirmed it whenever `kept` says
    /// its answer wrote something.
    async fn eval_confirmed<T: FromRedisValue>(
        &self,
        what: &str,
        script: &Script,
        inv: &ScriptInvocation<'_>,
        uaid: &Uaid,
        kept: impl Fn(&T) -> bool,
    ) -> StoreResult<T> {
        let slot_key = Keys::new(uaid).messages();
        self.eval_waited(what, script, inv, &slot_key, kept).await
    }

    /// `eval_confirmed` for a script whose keys are in `slot_key`'s slot
    /// and whose answer is any value.
    async fn eval_waited<T: FromRedisValue>(
        &self,
        what: &str,
        script: &Script,
        inv: &ScriptInvocation<'_>,
        slot_key: &str,
        kept: impl Fn(&T) -> bool,
    ) -> StoreResult<T> {
        let Some((replicas, timeout)) = self.wait else {
            return self.eval::<T>(what, inv).await;
        };
        let (answer, confirmed) = self
            .lane
            .eval_and_wait::<T>(what, script, inv, slot_key, (replicas, timeout))
            .await?;
        if kept(&answer) && confirmed < i64::from(replicas) {
            // Replicas lagging or failing over: the write may still reach
            // them, but the promise was not kept in time.
            return Err(StoreError::Unavailable(format!(
                "redis WAIT after {what}: {confirmed} of {replicas} replicas confirmed within {timeout:?}"
            )));
        }
        Ok(answer)
    }

    /// Stores `m`, under a fresh seq if another node already took `m.seq`
    /// for this user agent; the outcome names the seq it was stored under.
    /// None if the user agent holds `limit` unexpired messages (0: no
    /// limit, which callers pass as None).
    async fn store_message(
        &self,
        uaid: &Uaid,
        m: &Message,
        limit: usize,
    ) -> StoreResult<Option<PutOutcome>> {
        if m.expired(now_secs()) {
            // It could never be read; storing it would only cost memory.
            return Ok(Some(PutOutcome {
                replaced: None,
                seq: m.seq,
                ..Default::default()
            }));
        }
        let keys = Keys::new(uaid);
        let expires_at = self.clock.to_shared(m.expires_at);
        let value = encode_message(&Message {
            expires_at,
            ..m.clone()
        });
        let topic = m
            .topic
            .as_deref()
            .map(|t| topic_field(&m.channel, t))
            .unwrap_or_default();
        let mut seq = m.seq;
        for _ in 0..MAX_SEQ_ATTEMPTS {
            if seq >= MAX_EXACT_SCORE {
                return Err(StoreError::Corrupt(format!(
                    "redis: seq {seq} exceeds 2^53"
                )));
            }
            let mut inv = self.scripts.put_message.prepare_invoke();
            inv.key(keys.messages())
                .key(keys.payload(seq))
                .key(keys.topics())
                .key(keys.expiries())
                .key(keys.owner())
                .arg(seq)
                .arg(&value)
                .arg(expires_at)
                .arg(&topic)
                .arg(keys.payload_prefix())
                .arg(EXPIRES_AT.start)
                .arg(lua_count(limit));
            let (answer, owner) = self.run_put(uaid, &inv).await?;
            match answer {
                PUT_COLLISION => {
                    self.seq_collisions.fetch_add(1, Ordering::Relaxed);
                    seq = self.next_seq();
                }
                PUT_FULL => return Ok(None),
                r => {
                    return Ok(Some(PutOutcome {
                        replaced: u64::try_from(r).ok().filter(|&old| old > 0),
                        seq,
                        owner,
                    }))
                }
            }
        }
        // Each fresh seq collided too: rare enough that a later attempt,
        // with later seqs, succeeds.
        Err(StoreError::Unavailable(format!(
            "redis put_message: no free seq after {MAX_SEQ_ATTEMPTS} attempts"
        )))
    }
}

#[async_trait::async_trait]
impl Store for RedisStore {
    async fn get_user(&self, uaid: &Uaid) -> StoreResult<Option<UserRecord>> {
        let v: Option<Vec<u8>> = self
            .query("get_user", redis::cmd("GET").arg(Keys::new(uaid).user()))
            .await?;
        Ok(v.and_then(|v| decode_user(&v)))
    }

    async fn put_user(&self, uaid: &Uaid, record: &UserRecord) -> StoreResult<()> {
        let keys = Keys::new(uaid);
        let mut inv = self.scripts.put_user.prepare_invoke();
        inv.key(keys.user())
            .key(keys.channels())
            .arg(encode_user(record))
            .arg(self.ua_expiry_secs);
        self.eval::<i64>("put_user", &inv).await.map(drop)
    }

    async fn drop_user(&self, uaid: &Uaid) -> StoreResult<()> {
        let keys = Keys::new(uaid);
        let mut inv = self.scripts.drop_user.prepare_invoke();
        inv.key(keys.user())
            .key(keys.channels())
            .key(keys.messages())
            .key(keys.topics())
            .key(keys.expiries())
            .arg(keys.payload_prefix());
        self.eval::<i64>("drop_user", &inv).await.map(drop)
    }

    /// User agents expire by themselves (key expiry), so there are never
    /// stale ones to report.
    async fn stale_users(&self, _cutoff: u64, _limit: usize) -> StoreResult<Vec<Uaid>> {
        Ok(Vec::new())
    }

    async fn get_channel(
        &self,
        uaid: &Uaid,
        channel: &ChannelId,
    ) -> StoreResult<Option<ChannelRecord>> {
        let mut cmd = redis::cmd("HGET");
        cmd.arg(Keys::new(uaid).channels())
            .arg(channel.as_bytes().as_slice());
        let v: Option<Vec<u8>> = self.query("get_channel", &cmd).await?;
        Ok(v.and_then(|v| decode_channel(&v)))
    }

    /// Both reads in one pipeline: the keys share the user agent's slot, so
    /// one node answers both in one round trip.
    async fn get_user_and_channel(
        &self,
        uaid: &Uaid,
        channel: &ChannelId,
    ) -> StoreResult<(Option<UserRecord>, Option<ChannelRecord>)> {
        let keys = Keys::new(uaid);
        let mut pipe = redis::pipe();
        pipe.cmd("GET")
            .arg(keys.user())
            .cmd("HGET")
            .arg(keys.channels())
            .arg(channel.as_bytes().as_slice());
        let mut conn = self.conn.get();
        let (user, channel): (Option<Vec<u8>>, Option<Vec<u8>>) = self
            .bounded("get_user_and_channel", pipe.query_async(&mut conn))
            .await?;
        Ok((
            user.and_then(|v| decode_user(&v)),
            channel.and_then(|v| decode_channel(&v)),
        ))
    }

    async fn put_channel(
        &self,
        uaid: &Uaid,
        channel: &ChannelId,
        record: &ChannelRecord,
    ) -> StoreResult<()> {
        let mut inv = self.scripts.put_channel.prepare_invoke();
        inv.key(Keys::new(uaid).channels())
            .arg(channel.as_bytes().as_slice())
            .arg(encode_channel(record))
            .arg(self.ua_expiry_secs);
        // A registration answered 200 and lost in a failover leaves the
        // user agent with an endpoint that answers 410 (`make chaos` lost
        // one so with redis_wait_replicas = 1): waited like a message.
        let put_channel = &self.scripts.put_channel;
        self.eval_confirmed("put_channel", put_channel, &inv, uaid, |_: &i64| true)
            .await
            .map(drop)
    }

    async fn remove_channel(&self, uaid: &Uaid, channel: &ChannelId) -> StoreResult<bool> {
        let keys = Keys::new(uaid);
        let mut inv = self.scripts.remove_channel.prepare_invoke();
        inv.key(keys.channels())
            .key(keys.messages())
            .key(keys.topics())
            .key(keys.expiries())
            .arg(channel.as_bytes().as_slice())
            .arg(keys.payload_prefix())
            .arg(MESSAGE_CHANNEL.start);
        let (existed, pruned): (i64, u64) = self.eval("remove_channel", &inv).await?;
        self.count_expired(pruned);
        Ok(existed > 0)
    }

    async fn count_channels(&self, uaid: &Uaid, limit: usize) -> StoreResult<usize> {
        let n: usize = self
            .query(
                "count_channels",
                redis::cmd("HLEN").arg(Keys::new(uaid).channels()),
            )
            .await?;
        Ok(n.min(limit))
    }

    async fn list_channels(&self, uaid: &Uaid) -> StoreResult<Vec<ChannelId>> {
        let fields: Vec<Vec<u8>> = self
            .query(
                "list_channels",
                redis::cmd("HKEYS").arg(Keys::new(uaid).channels()),
            )
            .await?;
        fields
            .iter()
            .map(|f| {
                <[u8; 16]>::try_from(f.as_slice())
                    .map(ChannelId::from_bytes)
                    .map_err(|_| {
                        StoreError::Corrupt(
                            "redis list_channels: a channel field is not 16 bytes".into(),
                        )
                    })
            })
            .collect()
    }

    /// Wall-clock microseconds, forced to increase within this process.
    /// Nodes may hand out the same number; `put_message` detects that.
    fn next_seq(&self) -> u64 {
        let now = now_micros();
        let step = |prev: u64| prev.max(now.saturating_sub(1)) + 1;
        let prev = self
            .seq
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |p| Some(step(p)))
            .unwrap_or_else(|p| p);
        step(prev)
    }

    /// On a seq collision the message is stored under a fresh seq, which
    /// the outcome reports. With `wait_for`, returns only once that many
    /// replicas have the write.
    async fn put_message(&self, uaid: &Uaid, message: &Message) -> StoreResult<PutOutcome> {
        let outcome = self.put_checked(uaid, message, None).await?;
        // With no limit the script never answers "full".
        outcome.ok_or_else(|| StoreError::Corrupt("redis put_message: full without a limit".into()))
    }

    /// One script counts and stores, so the limit holds exactly however
    /// many nodes push at once; it reads Redis's clock, not `now`.
    async fn put_message_within(
        &self,
        uaid: &Uaid,
        message: &Message,
        _now: u64,
        limit: usize,
    ) -> StoreResult<Option<PutOutcome>> {
        if limit == 0 {
            return Ok(None);
        }
        self.put_checked(uaid, message, Some(limit)).await
    }

    async fn read_messages(
        &self,
        uaid: &Uaid,
        after: u64,
        limit: usize,
    ) -> StoreResult<Vec<Message>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let keys = Keys::new(uaid);
        let mut inv = self.scripts.read_messages.prepare_invoke();
        inv.key(keys.messages())
            .key(keys.expiries())
            .arg(after)
            .arg(lua_count(limit))
            .arg(self.clock.now_secs())
            .arg(keys.payload_prefix())
            .arg(EXPIRES_AT.start);
        let (pruned, seqs, values): (u64, Vec<u64>, Vec<Vec<u8>>) =
            self.eval("read_messages", &inv).await?;
        self.count_expired(pruned);
        Ok(seqs
            .into_iter()
            .zip(values)
            .filter_map(|(seq, v)| {
                let m = decode_message(seq, &v).map(|m| self.in_node_time(m));
                if m.is_none() {
                    tracing::warn!("skipping an undecodable stored message");
                }
                m
            })
            .collect())
    }

    async fn get_message(&self, uaid: &Uaid, seq: u64) -> StoreResult<Option<Message>> {
        let v: Option<Vec<u8>> = self
            .query(
                "get_message",
                redis::cmd("GET").arg(Keys::new(uaid).payload(seq)),
            )
            .await?;
        let now = now_secs();
        Ok(v.and_then(|v| decode_message(seq, &v))
            .map(|m| self.in_node_time(m))
            .filter(|m| !m.expired(now)))
    }

    async fn delete_message(&self, uaid: &Uaid, seq: u64) -> StoreResult<bool> {
        let keys = Keys::new(uaid);
        let mut inv = self.scripts.delete_message.prepare_invoke();
        inv.key(keys.messages())
            .key(keys.payload(seq))
            .key(keys.expiries())
            .arg(seq);
        let existed: i64 = self.eval("delete_message", &inv).await?;
        Ok(existed > 0)
    }

    /// One `ZCOUNT` on the expiries zset, whatever the queue holds: every
    /// push counts, including those refused as over the limit.
    async fn count_messages(&self, uaid: &Uaid, now: u64, limit: usize) -> StoreResult<usize> {
        if limit == 0 {
            return Ok(0);
        }
        let mut cmd = redis::cmd("ZCOUNT");
        cmd.arg(Keys::new(uaid).expiries())
            .arg(format!("({}", self.clock.to_shared(now)))
            .arg("+inf");
        let n: usize = self.query("count_messages", &cmd).await?;
        Ok(n.min(limit))
    }

    /// Nothing to sweep: payloads expire by themselves (`EXAT`), the sorted
    /// set and topic hash expire with their newest message, and members left
    /// by expired payloads are pruned whenever the user agent's messages are
    /// read (and trimmed from the expiries zset on every store).
    async fn purge_expired(&self) -> StoreResult<()> {
        Ok(())
    }

    /// One hash for the whole cluster: few ids, read by every node each
    /// second, written rarely.
    async fn broadcasts(&self) -> StoreResult<std::collections::BTreeMap<String, String>> {
        self.query("broadcasts", redis::cmd("HGETALL").arg(BROADCASTS_KEY))
            .await
    }

    async fn put_broadcast(&self, id: &str, version: &str) -> StoreResult<()> {
        self.query::<i64>(
            "put_broadcast",
            redis::cmd("HSET").arg(BROADCASTS_KEY).arg(id).arg(version),
        )
        .await
        .map(drop)
    }

    /// One hash, like broadcasts: a few entries read by every node every
    /// few seconds, written by operators.
    async fn blocks(&self) -> StoreResult<std::collections::BTreeMap<String, String>> {
        self.query("blocks", redis::cmd("HGETALL").arg(BLOCKS_KEY))
            .await
    }

    async fn put_block(&self, id: &str, record: &str) -> StoreResult<()> {
        self.query::<i64>(
            "put_block",
            redis::cmd("HSET").arg(BLOCKS_KEY).arg(id).arg(record),
        )
        .await
        .map(drop)
    }

    async fn remove_block(&self, id: &str) -> StoreResult<bool> {
        self.query::<i64>("remove_block", redis::cmd("HDEL").arg(BLOCKS_KEY).arg(id))
            .await
            .map(|n| n > 0)
    }

    /// Durability is Redis's own configuration (AOF, replicas).
    async fn flush(&self) -> StoreResult<()> {
        Ok(())
    }

    /// Writes and reads back a short-lived key of its own: concurrent probes
    /// cannot confuse each other, and over time they reach every shard.
    async fn health_check(&self) -> StoreResult<()> {
        let key = format!("herald:health:{{{}}}", Uaid::random());
        let stamp = now_micros().to_string();
        let mut set = redis::cmd("SET");
        set.arg(&key).arg(&stamp).arg("EX").arg(10);
        self.query::<()>("health_check", &set).await?;
        let read: Option<String> = self
            .query("health_check", redis::cmd("GET").arg(&key))
            .await?;
        match read {
            Some(v) if v == stamp => Ok(()),
            other => Err(StoreError::Corrupt(format!(
                "redis health_check: wrote {stamp}, read back {other:?}"
            ))),
        }
    }

    /// `stats` is synchronous and Redis's figures are a round trip (and,
    /// in a cluster, one per shard) away: report nothing rather than guess.
    fn stats(&self) -> StoreStats {
        StoreStats::default()
    }

    async fn checkpoint(
        &self,
        _dir: &std::path::Path,
    ) -> Result<&'static str, super::CheckpointError> {
        Err(super::CheckpointError::Unsupported(
            "store = \"redis\": Herald keeps nothing of its own to back up; Redis's own persistence (RDB snapshots, AOF) and its BGSAVE are the backup (see deploy/README.md, \"Redis persistence\")",
        ))
    }

    async fn outbox_add(&self, uaid: &Uaid, due_ms: u64) -> StoreResult<bool> {
        self.outbox_add_impl(uaid, due_ms).await
    }

    async fn outbox_set(&self, uaid: &Uaid, due_ms: u64) -> StoreResult<()> {
        self.outbox_set_impl(uaid, due_ms).await
    }

    async fn outbox_take(
        &self,
        now_ms: u64,
        lease_until_ms: u64,
        limit: usize,
    ) -> StoreResult<Vec<Uaid>> {
        self.outbox_take_impl(now_ms, lease_until_ms, limit).await
    }

    async fn outbox_remove(&self, uaid: &Uaid) -> StoreResult<()> {
        self.outbox_remove_impl(uaid).await
    }

    async fn outbox_due(&self, uaid: &Uaid) -> StoreResult<Option<u64>> {
        self.outbox_due_impl(uaid).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use herald_proto::urgency::Urgency;
    use redis::cluster_routing::Slot;

    #[test]
    fn message_offsets_match_the_codec() {
        let m = Message {
            seq: 1,
            channel: uuid::Uuid::new_v4(),
            expires_at: 0x0102_0304_0506_0708,
            ttl: 60,
            urgency: Urgency::High,
            topic: Some("t".into()),
            headers: None,
            data: Bytes::from_static(b"x"),
            receipt: true,
        };
        let v = encode_message(&m);
        assert_eq!(&v[MESSAGE_CHANNEL], m.channel.as_bytes());
        assert_eq!(
            &v[EXPIRES_AT],
            &m.expires_at.to_be_bytes(),
            "scripts read expires_at at EXPIRES_AT"
        );
    }

    #[test]
    fn every_key_of_a_user_agent_is_in_one_slot() {
        let uaid = Uaid::random();
        let k = Keys::new(&uaid);
        let slot = Slot::for_key(k.user());
        for key in [
            k.channels(),
            k.messages(),
            k.topics(),
            k.expiries(),
            k.payload(1_700_000_000_000_000),
            format!("{}42", k.payload_prefix()),
        ] {
            assert_eq!(Slot::for_key(&key), slot, "{key}");
        }
        assert_eq!(k.payload(7), format!("{}7", k.payload_prefix()));
    }

    #[test]
    fn seeds_split_on_commas() {
        assert_eq!(
            parse_seeds(" redis://a:1, redis://b:2 ,").unwrap(),
            vec!["redis://a:1", "redis://b:2"]
        );
        assert!(parse_seeds(" , ").is_err());
    }

    #[test]
    fn seqs_fit_in_exact_scores() {
        assert!(now_micros() < MAX_EXACT_SCORE);
    }
}

/// Redis's errors as `StoreError`s.
mod error;

/// Writes that wait for replicas.
mod waited;

/// Replacing a cluster connection that stopped seeing failovers.
mod renew;

/// Which node serves which user agent (several Herald nodes on one Redis).
mod directory;

/// The receipt ledger (RFC 8030 §5.1).
mod receipts;

/// The bridges' outbox (see `bridge::forward`).
mod outbox;

/// The quotas' usage exchange between nodes.
mod usage;
