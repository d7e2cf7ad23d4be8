//! Durable state behind traits (`Store`, `ReceiptStore`, `Directory`), so
//! nothing outside this module knows which engine is in use. RocksDB
//! (`rocks`) is the embedded default for one node; Redis or Redis Cluster
//! (`redis`) is the shared engine for several nodes; `mem` keeps
//! everything in memory with RocksDB's one-node semantics, for tests.
//! `tests/store_contract.rs` holds every engine to the same cases.

mod clock;
mod codec;
mod mem;
mod receipt;
mod redis;
mod rocks;

pub use self::redis::RedisStore;
pub use clock::SharedClock;
pub use codec::{
    decode_channel, decode_message, decode_pending, decode_receipt, decode_user, encode_channel,
    encode_message, encode_pending, encode_receipt, encode_user, message_expires_at,
};
pub use mem::MemStore;
pub use receipt::{
    Outcome, PendingReceipt, ReceiptEvent, ReceiptState, ReceiptStore, ReceiptSub, ACK_GRACE_SECS,
};
pub use rocks::RocksStore;

use crate::token::KeyHash;
use bytes::Bytes;
use herald_proto::headers::NotificationHeaders;
use herald_proto::ids::{ChannelId, Uaid};
use herald_proto::urgency::Urgency;

/// Why a store operation failed. Callers decide on the variant, never on
/// the text: each variant keeps the engine's own message for the log, and
/// nothing of it reaches an application server or a user agent (see
/// `errors::ApiError::storage`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreError {
    /// The engine cannot answer now and may soon: a Redis connection lost,
    /// refused or silent past its time limit, replicas that did not confirm
    /// a write in time, RocksDB busy or being reopened after an I/O error.
    Unavailable(String),
    /// The disk under the embedded engine failed (full, unreadable).
    /// RocksDB then refuses every write until it is reopened, which
    /// `RocksStore` schedules when it sees this variant.
    Io(String),
    /// Data or an answer the engine cannot make sense of: a corrupted
    /// file, a reply of the wrong shape, a number past what the engine
    /// holds exactly.
    Corrupt(String),
    /// The engine refused the request itself (an invalid argument or URL,
    /// a script error): the same request fails the same way again.
    Rejected(String),
    /// The background task running the operation panicked or was
    /// cancelled.
    Task(String),
}

impl StoreError {
    /// The engine's message, for logs only.
    pub fn detail(&self) -> &str {
        match self {
            StoreError::Unavailable(m)
            | StoreError::Io(m)
            | StoreError::Corrupt(m)
            | StoreError::Rejected(m)
            | StoreError::Task(m) => m,
        }
    }

    /// A stable label for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            StoreError::Unavailable(_) => "unavailable",
            StoreError::Io(_) => "io",
            StoreError::Corrupt(_) => "corrupt",
            StoreError::Rejected(_) => "rejected",
            StoreError::Task(_) => "task",
        }
    }
}

/// The engine's message alone: it already names the engine and the
/// operation, which is what a log line needs.
impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.detail())
    }
}
impl std::error::Error for StoreError {}

pub type StoreResult<T> = Result<T, StoreError>;

/// Which upstream push service reaches a bridged user agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BridgeKind {
    /// Firebase Cloud Messaging (Android). Registered as `fcm` or, the
    /// older name Firefox for Android still sends, `gcm`.
    Fcm,
    /// Apple Push Notification service (iOS).
    Apns,
}

impl BridgeKind {
    /// The name used in routes, settings, metrics and the stored record.
    pub fn as_str(self) -> &'static str {
        match self {
            BridgeKind::Fcm => "fcm",
            BridgeKind::Apns => "apns",
        }
    }

    /// The `{type}` segment of the registration API; `gcm` is FCM's old name.
    pub fn from_route_type(s: &str) -> Option<Self> {
        match s {
            "fcm" | "gcm" => Some(BridgeKind::Fcm),
            "apns" => Some(BridgeKind::Apns),
            _ => None,
        }
    }
}

/// How to reach a user agent that keeps no websocket: the upstream, the
/// app it registered for and the device token the upstream gave it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BridgeRoute {
    pub kind: BridgeKind,
    /// The `{app_id}` of the registration, naming one configured bridge.
    pub app_id: String,
    /// The FCM registration token or APNs device token.
    pub token: String,
    /// APNs only: the `aps` JSON the app registered with (alert text keys),
    /// sent as is.
    pub aps: Option<String>,
}

/// A user agent Herald has issued a uaid to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserRecord {
    /// Unix seconds.
    pub created: u64,
    /// Unix seconds of the last hello (or, for a bridged user agent, of its
    /// last registration call); user agents silent past `ua_expiry` are
    /// dropped.
    pub last_seen: u64,
    /// None for a user agent on a websocket; the upstream and device token
    /// for one reached through a bridge.
    pub router: Option<BridgeRoute>,
}

/// A subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelRecord {
    /// Hash of the application server key for key-bound (v2) subscriptions.
    pub key_hash: Option<KeyHash>,
    pub created: u64,
}

/// A push message waiting for its user agent's acknowledgement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Orders a user agent's messages (oldest first) and names the message.
    pub seq: u64,
    pub channel: ChannelId,
    /// Unix seconds after which the message must not be delivered.
    pub expires_at: u64,
    /// The TTL the application server was granted (reported to the UA).
    pub ttl: u64,
    pub urgency: Urgency,
    pub topic: Option<String>,
    /// None for a push without payload.
    pub headers: Option<NotificationHeaders>,
    pub data: Bytes,
    /// The application server asked for a receipt: the receipt ledger
    /// tracks this message (see `receipt`).
    pub receipt: bool,
}

/// Whole seconds past the second it was accepted in that a TTL-0 message
/// may still be handed to a connection: 1-2 s in all, room for a wake-up
/// to another node. One carried later (a wake-up batch held behind a
/// request to a node it could not reach, sent when the link came back)
/// reached its user agent 1 s after its receipt had been settled
/// `expired` (`make chaos`, nodes cut from each other).
pub const TTL0_HANDOVER_SECS: u64 = 1;

impl Message {
    pub fn expired(&self, now: u64) -> bool {
        self.expires_at <= now
    }

    /// A TTL-0 message whose moment has passed: it is not handed over any
    /// more, so its receipt can say `expired` (RFC 8030 §5.2: a TTL-0
    /// message is for a user agent available at once).
    pub fn too_late(&self, now: u64) -> bool {
        self.ttl == 0 && self.expires_at.saturating_add(TTL0_HANDOVER_SECS) < now
    }

    /// When the receipt of a message never sent may be settled `expired`.
    /// For TTL 0, a second after the last one it may be handed over in
    /// (`too_late`), so a message sent within its moment is marked sent
    /// before the sweep (which settles at or after this second) can find it
    /// unsent, whatever the order of the nodes' work.
    pub fn receipt_deadline(&self) -> u64 {
        let slack = if self.ttl == 0 {
            TTL0_HANDOVER_SECS + 2
        } else {
            1
        };
        self.expires_at.saturating_add(slack)
    }
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PutOutcome {
    /// The sequence number of the pending message with the same topic that
    /// this one replaced.
    pub replaced: Option<u64>,
    /// The sequence number the message was stored under. A shared store may
    /// have to pick another than the message's own (two nodes chose the same
    /// one for a user agent); callers must name the message by this one.
    pub seq: u64,
    /// Who held the user agent's connection once the message was stored.
    pub owner: OwnerSeen,
}

/// The user agent's owner as a store saw it in the step that stored a
/// message. Redis reads it in its store script, after the store, which is
/// the order a wake-up needs (a connection claimed later reads the store
/// itself): the router then makes no look-up of its own, a round trip
/// fewer for every push that crosses nodes.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum OwnerSeen {
    /// The store did not look (one node: no directory to look in).
    #[default]
    NotLooked,
    Nobody,
    Is(Owner),
}

/// Why `Store::checkpoint` made no copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckpointError {
    /// This engine has no point-in-time copy through Herald; the text says
    /// what to do instead (for Redis: its own persistence).
    Unsupported(&'static str),
    /// The target is already there: a checkpoint never writes into, or
    /// over, an existing path.
    Exists(std::path::PathBuf),
    /// The engine failed while copying (a full disk, an unwritable path).
    Store(StoreError),
}

impl std::fmt::Display for CheckpointError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CheckpointError::Unsupported(why) => f.write_str(why),
            CheckpointError::Exists(p) => write!(f, "{} already exists", p.display()),
            CheckpointError::Store(e) => write!(f, "{e}"),
        }
    }
}
impl std::error::Error for CheckpointError {}

#[derive(Debug, Default, Clone, Copy)]
pub struct StoreStats {
    pub estimated_messages: u64,
    pub size_bytes: u64,
    pub pending_compaction_bytes: u64,
}

/// Everything Herald keeps. Async so that a networked engine never blocks a
/// runtime worker; the embedded engine answers inline (its reads and writes
/// are memory and WAL appends) and moves only fsyncs off the workers.
///
/// Every multi-key step of one user agent (store with topic replacement,
/// ack, unregister, drop) is atomic in every engine.
#[async_trait::async_trait]
pub trait Store: Send + Sync + 'static {
    async fn get_user(&self, uaid: &Uaid) -> StoreResult<Option<UserRecord>>;
    async fn put_user(&self, uaid: &Uaid, record: &UserRecord) -> StoreResult<()>;
    /// Removes the user agent with all its subscriptions and messages.
    async fn drop_user(&self, uaid: &Uaid) -> StoreResult<()>;
    /// Up to `limit` user agents whose last hello is older than `cutoff`.
    /// An engine that expires silent user agents by itself returns none.
    async fn stale_users(&self, cutoff: u64, limit: usize) -> StoreResult<Vec<Uaid>>;

    async fn get_channel(
        &self,
        uaid: &Uaid,
        channel: &ChannelId,
    ) -> StoreResult<Option<ChannelRecord>>;
    /// The user agent's record and one of its subscriptions: what every
    /// push checks first. Redis answers both in one round trip.
    async fn get_user_and_channel(
        &self,
        uaid: &Uaid,
        channel: &ChannelId,
    ) -> StoreResult<(Option<UserRecord>, Option<ChannelRecord>)> {
        let user = self.get_user(uaid).await?;
        Ok((user, self.get_channel(uaid, channel).await?))
    }
    async fn put_channel(
        &self,
        uaid: &Uaid,
        channel: &ChannelId,
        record: &ChannelRecord,
    ) -> StoreResult<()>;
    /// Removes a subscription and its pending messages; false if it did not exist.
    async fn remove_channel(&self, uaid: &Uaid, channel: &ChannelId) -> StoreResult<bool>;
    /// Counts subscriptions, stopping at `limit`.
    async fn count_channels(&self, uaid: &Uaid, limit: usize) -> StoreResult<usize>;
    /// Every subscription of the user agent (the registration API's channel
    /// list), in no particular order.
    async fn list_channels(&self, uaid: &Uaid) -> StoreResult<Vec<ChannelId>>;

    /// A fresh, increasing message sequence number.
    fn next_seq(&self) -> u64;
    /// Stores a message; with a topic, atomically replaces a pending message
    /// of the same subscription and topic. With several nodes, returns only
    /// once the message is as durable as the engine was asked to make it
    /// (replicas included).
    async fn put_message(&self, uaid: &Uaid, message: &Message) -> StoreResult<PutOutcome>;
    /// `put_message` unless the user agent already holds `limit` unexpired
    /// messages (None then). For a store several nodes write to, where the
    /// count cannot be kept in memory: Redis counts and stores in one
    /// script, so one round trip and an exact limit.
    async fn put_message_within(
        &self,
        uaid: &Uaid,
        message: &Message,
        now: u64,
        limit: usize,
    ) -> StoreResult<Option<PutOutcome>> {
        if self.count_messages(uaid, now, limit).await? >= limit {
            return Ok(None);
        }
        self.put_message(uaid, message).await.map(Some)
    }
    /// Up to `limit` of the user agent's unexpired messages with a sequence
    /// number above `after`, oldest first.
    async fn read_messages(
        &self,
        uaid: &Uaid,
        after: u64,
        limit: usize,
    ) -> StoreResult<Vec<Message>>;
    async fn get_message(&self, uaid: &Uaid, seq: u64) -> StoreResult<Option<Message>>;
    /// False if it was already gone.
    async fn delete_message(&self, uaid: &Uaid, seq: u64) -> StoreResult<bool>;
    /// Counts unexpired messages, stopping at `limit`.
    async fn count_messages(&self, uaid: &Uaid, now: u64, limit: usize) -> StoreResult<usize>;

    /// Every broadcast id with its current version (see `broadcast`).
    async fn broadcasts(&self) -> StoreResult<std::collections::BTreeMap<String, String>>;
    async fn put_broadcast(&self, id: &str, version: &str) -> StoreResult<()>;

    /// Every sender the operator blocked (see `admin::blocks`): its id
    /// (`key:…` or `sub:…`) → its record, both opaque to the engine.
    async fn blocks(&self) -> StoreResult<std::collections::BTreeMap<String, String>>;
    /// Adds a block, or replaces the record of one with the same id.
    async fn put_block(&self, id: &str, record: &str) -> StoreResult<()>;
    /// Removes a block; false if there was none.
    async fn remove_block(&self, id: &str) -> StoreResult<bool>;

    /// Background upkeep: physically remove expired messages.
    async fn purge_expired(&self) -> StoreResult<()>;
    /// Makes everything written so far durable (shutdown).
    async fn flush(&self) -> StoreResult<()>;
    /// Proves the store can write now (readiness probe).
    async fn health_check(&self) -> StoreResult<()>;
    fn stats(&self) -> StoreStats;

    /// Writes a consistent point-in-time copy of the whole store into
    /// `dir`, which must not exist yet (its parent must): everything
    /// acknowledged before the call is in it, while the store keeps
    /// serving. Returns the engine's name, for the backup's description.
    /// Optional: an engine that cannot refuses with `Unsupported`.
    async fn checkpoint(&self, dir: &std::path::Path) -> Result<&'static str, CheckpointError> {
        let _ = dir;
        Err(CheckpointError::Unsupported(
            "this store engine cannot be backed up through Herald",
        ))
    }

    // The outbox: bridged user agents with messages still to hand to their
    // upstream (see `bridge::forward`), each with the Unix millisecond its
    // next attempt is due. One entry per user agent, not per message: its
    // messages go out one after the other, oldest first.

    /// Lists `uaid` due at `due_ms` unless it is listed already; true if
    /// this call listed it, which makes the caller the one sending until
    /// `due_ms` (a lease: past it, any node's sweep may take over).
    async fn outbox_add(&self, uaid: &Uaid, due_ms: u64) -> StoreResult<bool>;
    /// Lists `uaid` due at `due_ms`, whether it was listed or not (a retry
    /// scheduled, a lease extended).
    async fn outbox_set(&self, uaid: &Uaid, due_ms: u64) -> StoreResult<()>;
    /// Claims up to `limit` user agents due at or before `now_ms`, oldest
    /// due first: each is moved to `lease_until_ms` in the same atomic step,
    /// so no other caller, on any node, takes it again before then.
    async fn outbox_take(
        &self,
        now_ms: u64,
        lease_until_ms: u64,
        limit: usize,
    ) -> StoreResult<Vec<Uaid>>;
    /// Unlists `uaid` (nothing left to send, or the user agent is gone).
    async fn outbox_remove(&self, uaid: &Uaid) -> StoreResult<()>;
    /// When `uaid` is due, while it is listed.
    async fn outbox_due(&self, uaid: &Uaid) -> StoreResult<Option<u64>>;
}

/// The connection serving a user agent, when several nodes share a store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    /// Random per process start: a restarted node is a new node.
    pub node: u64,
    /// The connection's id on that node.
    pub conn: u64,
    /// Unix microseconds of the connection's hello; the newest wins.
    pub since: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// This connection now serves the user agent; `replaced` is the one it
    /// displaced, which must be closed.
    Won { replaced: Option<Owner> },
    /// A newer connection already serves the user agent.
    Lost { newer: Owner },
}

/// Who serves which user agent, and how to reach each node: what nodes
/// sharing a store need to route to each other.
#[async_trait::async_trait]
pub trait Directory: Send + Sync + 'static {
    /// Compare-and-set on the user record: `owner` becomes the user agent's
    /// connection unless one with a later `since` already is.
    async fn claim(&self, uaid: &Uaid, owner: &Owner) -> StoreResult<Claim>;
    /// Clears the owner if it is still `owner` (a connection ended).
    async fn release(&self, uaid: &Uaid, owner: &Owner) -> StoreResult<()>;
    async fn owner(&self, uaid: &Uaid) -> StoreResult<Option<Owner>>;
    /// Announces that `node` is alive at `url` for `ttl`.
    async fn heartbeat(&self, node: u64, url: &str, ttl: std::time::Duration) -> StoreResult<()>;
    /// Where a live node is; None once its heartbeat lapsed.
    async fn node_url(&self, node: u64) -> StoreResult<Option<String>>;
    /// The clock the nodes compare times in (node requests' timestamps):
    /// the shared store's, or this node's own when nothing is shared.
    fn clock(&self) -> SharedClock {
        SharedClock::default()
    }
    /// The quotas' exchange (see `quota::share`): publishes `usage` from
    /// `node` (nothing when empty) and returns what the other nodes
    /// published after `cursor`, with the cursor to pass next time. A None
    /// cursor starts from now.
    async fn share_usage(
        &self,
        node: u64,
        usage: &[u8],
        cursor: Option<&str>,
    ) -> StoreResult<(String, Vec<Vec<u8>>)>;
}

pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub fn now_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}
