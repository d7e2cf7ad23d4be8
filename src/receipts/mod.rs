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

use crate::ids::{ChannelId, Uaid};
use crate::metrics::Metrics;
use crate::store::{Outcome, PendingReceipt, ReceiptEvent, ReceiptStore, ReceiptSub};
use dashmap::DashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;

/// How often the sweep settles messages whose TTL ran out.
const EXPIRY_SWEEP: Duration = Duration::from_secs(1);
/// Most expired messages settled per sweep; the rest wait one tick.
const EXPIRY_BATCH: usize = 1000;
/// How often receipts older than the retention are removed.
const PURGE_INTERVAL: Duration = Duration::from_secs(600);

pub struct Receipts {
    ledger: Arc<dyn ReceiptStore>,
    metrics: Arc<Metrics>,
    /// Receipt subscriptions being streamed on this node, so a new receipt
    /// wakes its readers at once. Readers also re-read every second, which
    /// is how receipts recorded by other nodes reach them.
    listeners: DashMap<ReceiptSub, Arc<Notify>>,
}

pub fn now_ms() -> u64 {
    crate::store::now_micros() / 1000
}

impl Receipts {
    pub fn new(ledger: Arc<dyn ReceiptStore>, metrics: Arc<Metrics>) -> Self {
        Receipts {
            ledger,
            metrics,
            listeners: DashMap::new(),
        }
    }

    pub fn ledger(&self) -> &dyn ReceiptStore {
        self.ledger.as_ref()
    }

    /// Starts tracking an accepted message. `ttl` 0 messages are tracked
    /// too: they expire one sweep later unless a user agent took them.
    pub async fn track(
        &self,
        uaid: &Uaid,
        seq: u64,
        sub: ReceiptSub,
        channel: ChannelId,
        expires_at: u64,
    ) -> crate::store::StoreResult<()> {
        let pending = PendingReceipt {
            sub,
            channel,
            expires_at,
            // One second of slack: a TTL-0 message expires "now", and its
            // send is noted a moment after it is routed.
            deadline: expires_at.saturating_add(1),
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
            if let Some(n) = self.listeners.get(&sub) {
                n.notify_waiters();
            }
        }
    }

    /// What a stream of `sub` waits on; `release` it when the stream ends.
    fn listen(&self, sub: ReceiptSub) -> Arc<Notify> {
        self.metrics.receipt_streams.inc();
        self.listeners.entry(sub).or_default().clone()
    }

    fn release(&self, sub: ReceiptSub, notify: Arc<Notify>) {
        self.metrics.receipt_streams.dec();
        drop(notify);
        // Only the map's own reference left: nobody streams it here now.
        self.listeners
            .remove_if(&sub, |_, n| Arc::strong_count(n) == 1);
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
