//! Delivery receipts (RFC 8030 §5.1): an application server that sends
//! `Prefer: respond-async` hears what became of its message (delivered,
//! rejected, expired, cancelled or gone) on a receipt subscription it reads
//! as server-sent events or JSON batches. The ledger itself is in
//! `store::receipt`; this module decides when to write to it, wakes the
//! streams reading it, and expires what nobody acknowledged.
//!
//! Only messages that asked for a receipt ever touch the ledger, and a
//! failing ledger never fails a delivery: receipts are reported, not
//! required.

pub mod api;
mod sse;

use crate::metrics::Metrics;
use crate::occupancy::{Held, Occupancy};
use crate::store::{Outcome, PendingReceipt, ReceiptEvent, ReceiptStore, ReceiptSub};
use dashmap::DashMap;
use herald_proto::ids::{ChannelId, Uaid};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;

/// How often the sweep settles messages whose TTL ran out.
const EXPIRY_SWEEP: Duration = Duration::from_secs(1);
/// Most expired messages settled per sweep; the rest wait one tick.
const EXPIRY_BATCH: usize = 1000;
/// How often receipts older than the retention are removed.
const PURGE_INTERVAL: Duration = Duration::from_secs(600);

/// How many receipt streams this node holds open at once.
#[derive(Debug, Clone, Copy)]
pub struct StreamLimits {
    /// On one receipt subscription (`max_receipt_streams_per_subscription`).
    pub per_subscription: usize,
    /// On this node in all (`max_receipt_streams`).
    pub total: usize,
}

/// Why a stream was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamRefused {
    Subscription(usize),
    Node(usize),
}

/// The readers of one receipt subscription on this node.
#[derive(Default)]
struct Listener {
    notify: Arc<Notify>,
    streams: usize,
}

pub struct Receipts {
    ledger: Arc<dyn ReceiptStore>,
    metrics: Arc<Metrics>,
    /// Receipt subscriptions being streamed on this node, so a receipt
    /// decided here wakes its readers at once (readers do not poll; with
    /// several nodes they also re-read now and then, which is how receipts
    /// decided on other nodes reach them).
    listeners: DashMap<ReceiptSub, Listener>,
    limits: StreamLimits,
    streams: Arc<Occupancy>,
}

/// One open stream's place under the limits; gives it back when dropped,
/// however the stream ends.
pub struct StreamSlot {
    receipts: Arc<Receipts>,
    sub: ReceiptSub,
    notify: Arc<Notify>,
    /// Its place under `max_receipt_streams`, given back after `release`.
    _place: Held,
}

impl StreamSlot {
    /// Fires when a receipt of this subscription is decided on this node.
    pub fn notify(&self) -> &Notify {
        &self.notify
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.receipts.release(self.sub);
    }
}

pub fn now_ms() -> u64 {
    crate::store::now_micros() / 1000
}

impl Receipts {
    pub fn new(ledger: Arc<dyn ReceiptStore>, metrics: Arc<Metrics>, limits: StreamLimits) -> Self {
        Receipts {
            ledger,
            metrics,
            listeners: DashMap::new(),
            limits,
            streams: Occupancy::new(),
        }
    }

    pub fn ledger(&self) -> &dyn ReceiptStore {
        self.ledger.as_ref()
    }

    /// Starts tracking an accepted message with a TTL: unless it was sent,
    /// its receipt says `expired` a second after the TTL ran out.
    pub async fn track(
        &self,
        uaid: &Uaid,
        seq: u64,
        sub: ReceiptSub,
        channel: ChannelId,
        expires_at: u64,
    ) -> crate::store::StoreResult<()> {
        let deadline = expires_at.saturating_add(1);
        self.track_until(uaid, seq, sub, channel, expires_at, deadline)
            .await
    }

    /// `track` with the deadline given, `Message::receipt_deadline`: a
    /// TTL-0 message's is past the moment it may still be handed over in.
    pub async fn track_until(
        &self,
        uaid: &Uaid,
        seq: u64,
        sub: ReceiptSub,
        channel: ChannelId,
        expires_at: u64,
        deadline: u64,
    ) -> crate::store::StoreResult<()> {
        let pending = PendingReceipt {
            sub,
            channel,
            expires_at,
            deadline,
            sent_at: None,
        };
        self.ledger.track(uaid, seq, &pending).await
    }

    /// Notes that a tracked message went out to its user agent, off the
    /// delivery path.
    pub fn sent(self: &Arc<Self>, uaid: Uaid, seq: u64) {
        let this = self.clone();
        tokio::spawn(async move {
            if let Err(e) = this.ledger.mark_sent(&uaid, seq, now_ms()).await {
                tracing::warn!("receipt ledger: marking a message sent: {e}");
            }
        });
    }

    /// Decides one message's outcome, if it asked for a receipt.
    pub async fn settle(&self, uaid: &Uaid, seq: u64, outcome: Outcome) {
        match self.ledger.settle(uaid, seq, outcome, now_ms()).await {
            Ok(found) => self.recorded(found),
            Err(e) => tracing::warn!("receipt ledger: settling a message: {e}"),
        }
    }

    /// A subscription (or the whole user agent) is gone: so is every
    /// message still waiting on it.
    pub async fn settle_all(&self, uaid: &Uaid, channel: Option<ChannelId>) {
        match self
            .ledger
            .settle_all(uaid, channel, Outcome::Gone, now_ms())
            .await
        {
            Ok(found) => self.recorded(found),
            Err(e) => tracing::warn!("receipt ledger: settling a removed subscription: {e}"),
        }
    }

    /// A message replaced by one with the same topic gets no receipt
    /// (RFC 8030 §5.4).
    pub async fn forget(&self, uaid: &Uaid, seq: u64) {
        if let Err(e) = self.ledger.forget(uaid, seq).await {
            tracing::warn!("receipt ledger: forgetting a replaced message: {e}");
        }
    }

    fn recorded(&self, found: impl IntoIterator<Item = (ReceiptSub, ReceiptEvent)>) {
        for (sub, event) in found {
            self.metrics
                .receipts
                .with_label_values(&[event.outcome.as_str()])
                .inc();
            if let Some(l) = self.listeners.get(&sub) {
                l.notify.notify_waiters();
            }
        }
    }

    /// A place for one more stream of `sub`, within the limits.
    pub fn listen(self: &Arc<Self>, sub: ReceiptSub) -> Result<StreamSlot, StreamRefused> {
        let total = self.limits.total;
        let place = self
            .streams
            .try_hold(total)
            .ok_or(StreamRefused::Node(total))?;
        let mut l = self.listeners.entry(sub).or_default();
        if l.streams >= self.limits.per_subscription {
            drop(l);
            drop(place);
            return Err(StreamRefused::Subscription(self.limits.per_subscription));
        }
        l.streams += 1;
        let notify = l.notify.clone();
        drop(l);
        self.metrics.receipt_streams.inc();
        Ok(StreamSlot {
            receipts: self.clone(),
            sub,
            notify,
            _place: place,
        })
    }

    fn release(&self, sub: ReceiptSub) {
        self.metrics.receipt_streams.dec();
        if let Some(mut l) = self.listeners.get_mut(&sub) {
            l.streams = l.streams.saturating_sub(1);
        }
        self.listeners.remove_if(&sub, |_, l| l.streams == 0);
    }

    /// Settles expired messages every second and purges receipts past
    /// their retention; runs for the life of the server.
    pub async fn sweep_loop(self: Arc<Self>, retention: Duration) {
        let mut tick = tokio::time::interval(EXPIRY_SWEEP);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_purge = tokio::time::Instant::now();
        loop {
            tick.tick().await;
            if let Err(e) = self.sweep_expired().await {
                tracing::warn!("receipt ledger: expiry sweep: {e}");
            }
            if last_purge.elapsed() >= PURGE_INTERVAL {
                last_purge = tokio::time::Instant::now();
                let before = now_ms().saturating_sub(retention.as_millis() as u64);
                match self.ledger.purge_receipts(before).await {
                    Ok(n) if n > 0 => tracing::info!(removed = n, "purged old receipts"),
                    Ok(_) => {}
                    Err(e) => tracing::warn!("receipt ledger: purge: {e}"),
                }
            }
        }
    }

    /// One pass of the expiry sweep; returns how many messages it settled.
    pub async fn sweep_expired(&self) -> crate::store::StoreResult<usize> {
        let mut total = 0;
        loop {
            let found = self
                .ledger
                .settle_expired(crate::store::now_secs(), EXPIRY_BATCH, now_ms())
                .await?;
            let n = found.len();
            total += n;
            self.recorded(found);
            if n < EXPIRY_BATCH {
                return Ok(total);
            }
        }
    }
}
