//! Prometheus metrics. Names follow Prometheus conventions: `herald_` prefix,
//! `_total` counters, base units. Listed in proto-docs/http-api.md.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
};

pub struct Metrics {
    pub registry: Registry,
    pub ws_connections: IntGauge,
    pub ws_hello: IntCounterVec,
    pub ws_register: IntCounterVec,
    pub ws_unregister: IntCounterVec,
    pub messages_accepted: IntCounterVec,
    pub messages_delivered: IntCounter,
    pub messages_acked: IntCounter,
    pub messages_nacked: IntCounter,
    pub messages_expired: IntCounter,
    pub messages_replaced: IntCounter,
    pub messages_dropped: IntCounterVec,
    pub receipts: IntCounterVec,
    pub receipt_streams: IntGauge,
    pub http_responses: IntCounterVec,
    pub vapid_failures: IntCounterVec,
    pub jwt_cache: IntCounterVec,
    pub store_seconds: HistogramVec,
    pub store_errors: IntCounterVec,
    pub wakeups_sent: IntCounterVec,
    pub wakeups_received: IntCounter,
    pub node_requests_refused: IntCounterVec,
    pub node_request_seconds: Histogram,
    pub broadcast_changes: IntCounter,
    pub broadcast_frames: IntCounter,
    pub broadcast_subscribed: IntGauge,
    pub broadcast_source_errors: IntCounter,
    pub stored_messages: IntGauge,
    pub store_size: IntGauge,
    pub store_pending_compaction: IntGauge,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        fn reg<C: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: C) -> C {
            r.register(Box::new(c.clone()))
                .expect("metric names are unique");
            c
        }
        let counter = |name: &str, help: &str| reg(&registry, IntCounter::new(name, help).unwrap());
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            reg(
                &registry,
                IntCounterVec::new(Opts::new(name, help), labels).unwrap(),
            )
        };
        let gauge = |name: &str, help: &str| reg(&registry, IntGauge::new(name, help).unwrap());
        Metrics {
            ws_connections: gauge("herald_ws_connections", "Websocket connections open now."),
            ws_hello: counter_vec(
                "herald_ws_hello_total",
                "Hello messages by outcome.",
                &["outcome"],
            ),
            ws_register: counter_vec(
                "herald_ws_register_total",
                "Register requests by outcome.",
                &["outcome"],
            ),
            ws_unregister: counter_vec(
                "herald_ws_unregister_total",
                "Unregister requests by outcome.",
                &["outcome"],
            ),
            messages_accepted: counter_vec(
                "herald_messages_accepted_total",
                "Push messages accepted from application servers, by urgency.",
                &["urgency"],
            ),
            messages_delivered: counter(
                "herald_messages_delivered_total",
                "Notifications sent to user agents.",
            ),
            messages_acked: counter(
                "herald_messages_acked_total",
                "Notifications acknowledged by user agents.",
            ),
            messages_nacked: counter(
                "herald_messages_nacked_total",
                "Notifications refused (nack) by user agents.",
            ),
            messages_expired: counter(
                "herald_messages_expired_total",
                "Stored messages removed because their TTL ran out.",
            ),
            messages_replaced: counter(
                "herald_messages_replaced_total",
                "Pending messages replaced by a newer one with the same topic.",
            ),
            messages_dropped: counter_vec(
                "herald_messages_dropped_total",
                "Messages dropped before delivery, by reason.",
                &["reason"],
            ),
            receipts: counter_vec(
                "herald_receipts_total",
                "Delivery receipts recorded, by outcome (delivered, rejected, expired, cancelled, gone).",
                &["outcome"],
            ),
            receipt_streams: gauge(
                "herald_receipt_streams",
                "Receipt subscriptions being streamed to application servers now.",
            ),
            http_responses: counter_vec(
                "herald_http_responses_total",
                "Application-server API responses by status and errno (0 for success).",
                &["status", "errno"],
            ),
            vapid_failures: counter_vec(
                "herald_vapid_failures_total",
                "Refused VAPID credentials by reason.",
                &["reason"],
            ),
            jwt_cache: counter_vec(
                "herald_jwt_cache_lookups_total",
                "VAPID verification cache lookups by result (hit or miss).",
                &["result"],
            ),
            store_seconds: reg(
                &registry,
                HistogramVec::new(
                    HistogramOpts::new(
                        "herald_store_operation_seconds",
                        "Store operation latency.",
                    )
                    .buckets(vec![
                        0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005,
                        0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
                    ]),
                    &["op"],
                )
                .unwrap(),
            ),
            store_errors: counter_vec(
                "herald_store_errors_total",
                "Store operations that failed (engine unreachable, timed out, I/O error), by operation.",
                &["op"],
            ),
            wakeups_sent: counter_vec(
                "herald_node_wakeups_sent_total",
                "Wake-ups sent to the node serving a user agent, by result (ok or failed).",
                &["result"],
            ),
            wakeups_received: counter(
                "herald_node_wakeups_received_total",
                "Wake-ups received from other nodes.",
            ),
            node_requests_refused: counter_vec(
                "herald_node_requests_refused_total",
                "Node-to-node requests refused, by reason (bad_signature, stale, replayed, window_full).",
                &["reason"],
            ),
            node_request_seconds: reg(
                &registry,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "herald_node_request_seconds",
                        "Latency of requests to other nodes (wake-ups, evictions).",
                    )
                    .buckets(vec![0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25, 2.0]),
                )
                .unwrap(),
            ),
            broadcast_changes: counter(
                "herald_broadcast_changes_total",
                "Broadcast versions that changed on this node (API, upstream source or another node).",
            ),
            broadcast_frames: counter(
                "herald_broadcast_messages_total",
                "Broadcast messages sent to user agents (changes fanned out, and answers to subscriptions).",
            ),
            broadcast_subscribed: gauge(
                "herald_broadcast_subscribed_connections",
                "Connections following at least one broadcast.",
            ),
            broadcast_source_errors: counter(
                "herald_broadcast_source_errors_total",
                "Failed polls of broadcast_source_url (the last versions are kept).",
            ),
            stored_messages: gauge(
                "herald_stored_messages",
                "Messages on disk (RocksDB estimate).",
            ),
            store_size: gauge(
                "herald_store_size_bytes",
                "Store size on disk and in memtables.",
            ),
            store_pending_compaction: gauge(
                "herald_store_pending_compaction_bytes",
                "Bytes RocksDB estimates it still has to compact.",
            ),
            registry,
        }
    }

    /// Times a store call under label `op`, and counts it if it failed.
    pub async fn time<T, E>(
        &self,
        op: &str,
        f: impl std::future::Future<Output = Result<T, E>>,
    ) -> Result<T, E> {
        let timer = self.store_seconds.with_label_values(&[op]).start_timer();
        let out = f.await;
        timer.observe_duration();
        if out.is_err() {
            self.store_errors.with_label_values(&[op]).inc();
        }
        out
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding into a Vec");
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
