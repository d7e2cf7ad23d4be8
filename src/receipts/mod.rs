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
/// How long apart, and how often, a failed settle is tried again.
const SETTLE_RETRY: Duration = Duration::from_secs(2);
const SETTLE_ATTEMPTS: u32 = 30;

/// An outcome to decide. A failed attempt is made again, with the same
/// outcome and time: the ledger's settle is idempotent, so an attempt that
/// did land (its answer lost, or its later steps failed) is only finished,
/// and one that a failover undid is made again. Without it the message
/// would wait for the expiry sweep and get `expired` though acknowledged.
#[derive(Clone, Copy)]
enum Settle {
    One(u64, Outcome),
    All(Option<ChannelId>),
}

impl Settle {
    fn doing(self) -> &'static str {
        match self {
            Settle::One(..) => "settling a message",
            Settle::All(_) => "settling a removed subscription",
        }
    }
}

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

    /// Starts tracking an accepted message, whose receipt says `expired`
    /// after `deadline` unless it was sent (`Message::receipt_deadline`: a
    /// TTL-0 message's is past the moment it may still be handed over in).
    pub async fn track(
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

    /// Decides one message's outcome, if it asked for a receipt. A failed
    /// attempt is made again in the background (see `Settle`).
    pub async fn settle(self: &Arc<Self>, uaid: &Uaid, seq: u64, outcome: Outcome) {
        self.decide(*uaid, Settle::One(seq, outcome), now_ms())
            .await;
    }

    /// A subscription (or the whole user agent) is gone: so is every
    /// message still waiting on it.
    pub async fn settle_all(self: &Arc<Self>, uaid: &Uaid, channel: Option<ChannelId>) {
        self.decide(*uaid, Settle::All(channel), now_ms()).await;
    }

    async fn decide(self: &Arc<Self>, uaid: Uaid, what: Settle, at: u64) {
        let Err(e) = self.try_decide(&uaid, what, at).await else {
            return;
        };
        tracing::warn!("receipt ledger: {}, tried again: {e}", what.doing());
        let this = self.clone();
        tokio::spawn(async move {
            for attempt in 1..=SETTLE_ATTEMPTS {
                tokio::time::sleep(SETTLE_RETRY).await;
                match this.try_decide(&uaid, what, at).await {
                    Ok(()) => return,
                    Err(e) if attempt == SETTLE_ATTEMPTS => tracing::error!(
                        uaid = %uaid.short(),
                        "receipt ledger: {} failed {SETTLE_ATTEMPTS} times; \
                         the expiry sweep decides it instead: {e}",
                        what.doing()
                    ),
                    Err(_) => {}
                }
            }
        });
    }

    async fn try_decide(
        &self,
        uaid: &Uaid,
        what: Settle,
        at: u64,
    ) -> crate::store::StoreResult<()> {
        let found = match what {
            Settle::One(seq, outcome) => {
                Vec::from_iter(self.ledger.settle(uaid, seq, outcome, at).await?)
            }
            Settle::All(channel) => {
                self.ledger
                    .settle_all(uaid, channel, Outcome::Gone, at)
                    .await?
            }
        };
        self.recorded(found);
        Ok(())
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

/// A ledger for tests: the in-memory one, watched.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;
    use crate::store::{MemStore, ReceiptState, StoreError, StoreResult};
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

    /// `MemStore`'s ledger whose first `failures` settles fail, as Redis
    /// failing over does, and which notes whether a message was already
    /// readable in `MemStore`'s queue when its receipt was tracked.
    pub(crate) struct Watched {
        pub inner: Arc<MemStore>,
        pub failures: AtomicU32,
        pub tracked_after_stored: AtomicBool,
    }

    impl Watched {
        pub fn new(inner: Arc<MemStore>, failures: u32) -> Arc<Self> {
            Arc::new(Watched {
                inner,
                failures: AtomicU32::new(failures),
                tracked_after_stored: AtomicBool::new(false),
            })
        }

        fn fail(&self) -> StoreResult<()> {
            let left = self.failures.load(Ordering::SeqCst);
            if left == 0 {
                return Ok(());
            }
            self.failures.store(left - 1, Ordering::SeqCst);
            Err(StoreError::Unavailable("failing over".into()))
        }
    }

    #[async_trait::async_trait]
    impl ReceiptStore for Watched {
        async fn track(&self, u: &Uaid, seq: u64, p: &PendingReceipt) -> StoreResult<()> {
            use crate::store::Store;
            let queued = self.inner.read_messages(u, 0, 1000).await?;
            if queued.iter().any(|m| m.seq == seq) {
                self.tracked_after_stored.store(true, Ordering::SeqCst);
            }
            self.inner.track(u, seq, p).await
        }
        async fn mark_sent(&self, u: &Uaid, seq: u64, at: u64) -> StoreResult<()> {
            self.inner.mark_sent(u, seq, at).await
        }
        async fn settle(
            &self,
            u: &Uaid,
            seq: u64,
            outcome: Outcome,
            at: u64,
        ) -> StoreResult<Option<(ReceiptSub, ReceiptEvent)>> {
            self.fail()?;
            self.inner.settle(u, seq, outcome, at).await
        }
        async fn forget(&self, u: &Uaid, seq: u64) -> StoreResult<()> {
            self.inner.forget(u, seq).await
        }
        async fn settle_all(
            &self,
            u: &Uaid,
            channel: Option<ChannelId>,
            outcome: Outcome,
            at: u64,
        ) -> StoreResult<Vec<(ReceiptSub, ReceiptEvent)>> {
            self.fail()?;
            self.inner.settle_all(u, channel, outcome, at).await
        }
        async fn settle_expired(
            &self,
            now: u64,
            limit: usize,
            at: u64,
        ) -> StoreResult<Vec<(ReceiptSub, ReceiptEvent)>> {
            self.inner.settle_expired(now, limit, at).await
        }
        async fn receipts(
            &self,
            sub: &ReceiptSub,
            after: u64,
            limit: usize,
        ) -> StoreResult<Vec<ReceiptEvent>> {
            self.inner.receipts(sub, after, limit).await
        }
        async fn receipt_state(&self, u: &Uaid, seq: u64) -> StoreResult<Option<ReceiptState>> {
            self.inner.receipt_state(u, seq).await
        }
        async fn purge_receipts(&self, before: u64) -> StoreResult<u64> {
            self.inner.purge_receipts(before).await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::Watched;
    use super::*;
    use crate::store::MemStore;

    fn receipts(failures: u32) -> (Arc<Receipts>, Arc<Watched>) {
        let ledger = Watched::new(Arc::new(MemStore::new()), failures);
        let limits = StreamLimits {
            per_subscription: 1,
            total: 1,
        };
        let r = Receipts::new(ledger.clone(), Arc::new(Metrics::new()), limits);
        (Arc::new(r), ledger)
    }

    #[tokio::test]
    async fn an_ack_whose_settle_failed_is_settled_on_a_retry() {
        let (r, ledger) = receipts(2);
        let (u, sub, ch) = (Uaid::random(), ReceiptSub::random(), uuid::Uuid::new_v4());
        let later = crate::store::now_secs() + 3600;
        for seq in [1, 2] {
            r.track(&u, seq, sub, ch, later, later + 1).await.unwrap();
        }
        r.settle(&u, 1, Outcome::Delivered).await;
        r.settle_all(&u, Some(ch)).await;
        assert_eq!(ledger.receipts(&sub, 0, 10).await.unwrap(), []);
        let deadline = tokio::time::Instant::now() + SETTLE_RETRY * 5;
        let got = loop {
            let got: Vec<(u64, Outcome)> = ledger
                .receipts(&sub, 0, 10)
                .await
                .unwrap()
                .iter()
                .map(|e| (e.seq, e.outcome))
                .collect();
            if got.len() == 2 || tokio::time::Instant::now() > deadline {
                break got;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert_eq!(got, [(1, Outcome::Delivered), (2, Outcome::Gone)]);
    }
}
