//! The receipt ledger (RFC 8030 §5.1): which accepted messages an
//! application server wants to hear the fate of, and the receipts already
//! decided. Kept apart from the message queue so that messages nobody asked
//! a receipt for never pay for it: the hot path only ever touches the ledger
//! for a message whose `receipt` flag is set.
//!
//! A tracked message is *pending* until exactly one `settle` decides its
//! outcome; every later `settle` for it is a no-op, so an ack racing the
//! expiry sweep (or two nodes sweeping) never yields two receipts.

use super::StoreResult;
use herald_proto::ids::{ChannelId, Uaid};

/// A receipt subscription: where receipts for many messages collect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ReceiptSub(pub [u8; 16]);

impl ReceiptSub {
    pub fn random() -> Self {
        ReceiptSub(rand::random())
    }
}

/// What became of a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The user agent acknowledged it.
    Delivered,
    /// The user agent nacked it, or acked it with an error code; the code.
    Rejected(u32),
    /// Its TTL ran out before the user agent acknowledged it.
    Expired,
    /// The application server deleted it.
    Cancelled,
    /// Its subscription or user agent was removed first.
    Gone,
    /// A bridge's upstream (FCM, APNs) accepted it for a device that keeps
    /// no websocket; the device's own delivery is not known.
    Forwarded,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Delivered => "delivered",
            Outcome::Rejected(_) => "rejected",
            Outcome::Expired => "expired",
            Outcome::Cancelled => "cancelled",
            Outcome::Gone => "gone",
            Outcome::Forwarded => "forwarded",
        }
    }

    pub fn code(self) -> Option<u32> {
        match self {
            Outcome::Rejected(c) => Some(c),
            _ => None,
        }
    }

    /// The byte the engines store.
    pub fn to_u8(self) -> u8 {
        match self {
            Outcome::Delivered => 1,
            Outcome::Rejected(_) => 2,
            Outcome::Expired => 3,
            Outcome::Cancelled => 4,
            Outcome::Gone => 5,
            Outcome::Forwarded => 6,
        }
    }

    pub fn from_u8(b: u8, code: u32) -> Option<Self> {
        Some(match b {
            1 => Outcome::Delivered,
            2 => Outcome::Rejected(code),
            3 => Outcome::Expired,
            4 => Outcome::Cancelled,
            5 => Outcome::Gone,
            6 => Outcome::Forwarded,
            _ => return None,
        })
    }
}

/// A message whose receipt is still to be decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PendingReceipt {
    pub sub: ReceiptSub,
    pub channel: ChannelId,
    /// Unix seconds: the message's own expiry.
    pub expires_at: u64,
    /// Unix seconds after which the sweep settles it as expired: the
    /// expiry, or later once the message was sent, so that an ack already
    /// on its way when the TTL ran out still counts as delivered.
    pub deadline: u64,
    /// Unix milliseconds of the first send to a user agent.
    pub sent_at: Option<u64>,
}

/// One receipt, as a receipt subscription lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReceiptEvent {
    /// Increases within a receipt subscription: what `Last-Event-ID` names.
    pub id: u64,
    pub uaid: Uaid,
    pub channel: ChannelId,
    pub seq: u64,
    pub outcome: Outcome,
    /// Unix milliseconds.
    pub at: u64,
}

/// What the ledger knows of one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReceiptState {
    Pending(PendingReceipt),
    Settled(ReceiptEvent),
}

/// How long after its expiry a message that was sent still waits for its
/// ack before the sweep calls it expired.
pub const ACK_GRACE_SECS: u64 = 60;

#[async_trait::async_trait]
pub trait ReceiptStore: Send + Sync + 'static {
    /// Starts tracking a stored (or, for TTL 0, routed) message.
    async fn track(&self, uaid: &Uaid, seq: u64, pending: &PendingReceipt) -> StoreResult<()>;
    /// Notes the first send of a tracked message (no-op if untracked or
    /// already noted), pushing its deadline to `ACK_GRACE_SECS` past expiry.
    async fn mark_sent(&self, uaid: &Uaid, seq: u64, at_ms: u64) -> StoreResult<()>;
    /// Decides a tracked message's outcome and records its receipt. Returns
    /// the receipt and its subscription if this call decided it; None if
    /// the message was not tracked or already decided.
    async fn settle(
        &self,
        uaid: &Uaid,
        seq: u64,
        outcome: Outcome,
        at_ms: u64,
    ) -> StoreResult<Option<(ReceiptSub, ReceiptEvent)>>;
    /// Stops tracking without a receipt (a message replaced by topic).
    async fn forget(&self, uaid: &Uaid, seq: u64) -> StoreResult<()>;
    /// Settles every pending message of a user agent, or of one of its
    /// subscriptions.
    async fn settle_all(
        &self,
        uaid: &Uaid,
        channel: Option<ChannelId>,
        outcome: Outcome,
        at_ms: u64,
    ) -> StoreResult<Vec<(ReceiptSub, ReceiptEvent)>>;
    /// Settles up to `limit` pending messages whose deadline is at or
    /// before `now` (unix seconds) as expired.
    async fn settle_expired(
        &self,
        now: u64,
        limit: usize,
        at_ms: u64,
    ) -> StoreResult<Vec<(ReceiptSub, ReceiptEvent)>>;
    /// Up to `limit` receipts of a subscription with ids above `after`,
    /// oldest first.
    async fn receipts(
        &self,
        sub: &ReceiptSub,
        after: u64,
        limit: usize,
    ) -> StoreResult<Vec<ReceiptEvent>>;
    /// What the ledger knows of a message, while it still knows.
    async fn receipt_state(&self, uaid: &Uaid, seq: u64) -> StoreResult<Option<ReceiptState>>;
    /// Removes receipts decided before `before_ms`; returns how many.
    async fn purge_receipts(&self, before_ms: u64) -> StoreResult<u64>;
}
