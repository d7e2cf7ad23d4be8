//! The state every connection and request shares.

use crate::bridge::registry::Bridges;
use crate::broadcast::Broadcaster;
use crate::config::Settings;
use crate::metrics::Metrics;
use crate::occupancy::Occupancy;
use crate::pending::PendingCounts;
use crate::receipts::Receipts;
use crate::router::Router;
use crate::store::{ReceiptStore, Store};
use crate::token::TokenCodec;
use crate::vapid::VapidVerifier;
use std::sync::Arc;
use tokio::sync::watch;

pub struct App {
    pub settings: Settings,
    pub store: Arc<dyn Store>,
    pub tokens: TokenCodec,
    pub router: Router,
    pub metrics: Arc<Metrics>,
    pub vapid: VapidVerifier,
    pub pending: PendingCounts,
    pub receipts: Arc<Receipts>,
    pub broadcaster: Arc<Broadcaster>,
    /// Flips to true once when shutdown begins; connections watch it.
    pub shutdown: watch::Sender<bool>,
    /// Websocket connections open now (including those still before hello).
    pub connections: Arc<Occupancy>,
    /// The upstreams (FCM, APNs) this node reaches bridged user agents
    /// through; empty unless configured.
    pub bridges: Bridges,
    /// Bridged user agents this node is sending for now (see
    /// `bridge::forward`); shutdown waits for them.
    pub forwarding: Arc<Occupancy>,
    /// Pushes each sender and receiver may make (see `quota`).
    pub quotas: crate::quota::Quotas,
    /// Senders the operator blocked through the admin API.
    pub blocks: crate::admin::Blocks,
    /// The busiest senders of the last minutes, for the admin API.
    pub top_senders: crate::admin::TopSenders,
}

impl App {
    pub fn new(
        settings: Settings,
        store: Arc<dyn Store>,
        ledger: Arc<dyn ReceiptStore>,
        tokens: TokenCodec,
        metrics: Arc<Metrics>,
    ) -> Self {
        let vapid = VapidVerifier::new(&settings.public_url.origin, settings.jwt_cache_size);
        let broadcaster = Arc::new(Broadcaster::new(Default::default(), metrics.clone()));
        let stream_limits = crate::receipts::StreamLimits {
            per_subscription: settings.max_receipt_streams_per_subscription,
            total: settings.max_receipt_streams,
        };
        let quotas = crate::quota::Quotas::new(&settings, metrics.clone());
        App {
            quotas,
            blocks: Default::default(),
            top_senders: Default::default(),
            settings,
            store,
            tokens,
            router: Router::new(),
            metrics: metrics.clone(),
            vapid,
            pending: PendingCounts::default(),
            receipts: Arc::new(Receipts::new(ledger, metrics, stream_limits)),
            broadcaster,
            shutdown: watch::channel(false).0,
            connections: Occupancy::new(),
            bridges: Bridges::default(),
            forwarding: Occupancy::new(),
        }
    }

    /// Reaches bridged user agents through `bridges`.
    pub fn with_bridges(mut self, bridges: Bridges) -> Self {
        self.bridges = bridges;
        self
    }

    /// Routes through `router` (several nodes) instead of this node only.
    pub fn with_router(mut self, router: Router) -> Self {
        if router.cluster().is_some() {
            self.pending = PendingCounts::shared();
        }
        self.router = router;
        self
    }

    pub fn begin_shutdown(&self) {
        self.shutdown.send_replace(true);
    }

    pub fn is_shutting_down(&self) -> bool {
        *self.shutdown.borrow()
    }
}

/// Resolves once shutdown has begun. (Wraps `watch::Receiver::wait_for` so
/// the borrow it returns is not held across the caller's awaits.)
pub async fn shutdown_begun(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|v| *v).await;
}
