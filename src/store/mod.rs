//! Durable state behind one trait. RocksDB (`rocks`) is the embedded
//! default; a distributed engine will be a second implementation, so nothing
//! outside this module may know which engine is in use.

mod codec;
mod rocks;

pub use rocks::RocksStore;

use crate::ids::{ChannelId, Uaid};
use crate::protocol::NotificationHeaders;
use crate::token::KeyHash;
use crate::webpush::Urgency;
use bytes::Bytes;

#[derive(Debug)]
pub struct StoreError(pub String);

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for StoreError {}

pub type StoreResult<T> = Result<T, StoreError>;

/// A user agent Herald has issued a uaid to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UserRecord {
    /// Unix seconds.
    pub created: u64,
    /// Unix seconds of the last hello; user agents silent past `ua_expiry`
    /// are dropped.
    pub last_seen: u64,
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
}

impl Message {
    pub fn expired(&self, now: u64) -> bool {
        self.expires_at <= now
    }
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PutOutcome {
    /// A pending message with the same topic was replaced.
    pub replaced: bool,
}

#[derive(Debug, Default, Clone, Copy)]
pub struct StoreStats {
    pub estimated_messages: u64,
    pub size_bytes: u64,
    pub pending_compaction_bytes: u64,
}

pub trait Store: Send + Sync + 'static {
    fn get_user(&self, uaid: &Uaid) -> StoreResult<Option<UserRecord>>;
    fn put_user(&self, uaid: &Uaid, record: &UserRecord) -> StoreResult<()>;
    /// Removes the user agent with all its subscriptions and messages.
    fn drop_user(&self, uaid: &Uaid) -> StoreResult<()>;
    /// Up to `limit` user agents whose last hello is older than `cutoff`.
    fn stale_users(&self, cutoff: u64, limit: usize) -> StoreResult<Vec<Uaid>>;

    fn get_channel(&self, uaid: &Uaid, channel: &ChannelId) -> StoreResult<Option<ChannelRecord>>;
    fn put_channel(
        &self,
        uaid: &Uaid,
        channel: &ChannelId,
        record: &ChannelRecord,
    ) -> StoreResult<()>;
    /// Removes a subscription and its pending messages; false if it did not exist.
    fn remove_channel(&self, uaid: &Uaid, channel: &ChannelId) -> StoreResult<bool>;
    /// Counts subscriptions, stopping at `limit`.
    fn count_channels(&self, uaid: &Uaid, limit: usize) -> StoreResult<usize>;

    /// A fresh, increasing message sequence number.
    fn next_seq(&self) -> u64;
    /// Stores a message; with a topic, atomically replaces a pending message
    /// of the same subscription and topic.
    fn put_message(&self, uaid: &Uaid, message: &Message) -> StoreResult<PutOutcome>;
    /// Calls `visit` with the user agent's messages, oldest first, until it
    /// returns false.
    fn scan_messages(&self, uaid: &Uaid, visit: &mut dyn FnMut(Message) -> bool)
        -> StoreResult<()>;
    fn get_message(&self, uaid: &Uaid, seq: u64) -> StoreResult<Option<Message>>;
    /// False if it was already gone.
    fn delete_message(&self, uaid: &Uaid, seq: u64) -> StoreResult<bool>;
    /// Counts unexpired messages, stopping at `limit`.
    fn count_messages(&self, uaid: &Uaid, now: u64, limit: usize) -> StoreResult<usize>;

    /// Background upkeep: physically remove expired messages.
    fn purge_expired(&self) -> StoreResult<()>;
    /// Makes everything written so far durable (shutdown).
    fn flush(&self) -> StoreResult<()>;
    /// Proves the store can write now (readiness probe).
    fn health_check(&self) -> StoreResult<()>;
    fn stats(&self) -> StoreStats;
}

pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
