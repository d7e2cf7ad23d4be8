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
    pub bridge_requests: IntCounterVec,
    pub bridge_request_seconds: HistogramVec,
    pub bridge_retries: IntCounterVec,
    pub bridge_token_refreshes: IntCounterVec,
    pub bridge_drops: IntCounterVec,
    pub registrations: IntCounterVec,
    pub throttled: IntCounterVec,
    pub blocked_pushes: IntCounterVec,
    pub admin_requests: IntCounterVec,
    pub policy_refusals: IntCounterVec,
    pub matrix_notifications: IntCounterVec,
    pub matrix_devices: IntCounterVec,
}

/// A metric's name, help text and label names.
struct Def {
    name: &'static str,
    help: &'static str,
    labels: &'static [&'static str],
}

/// A histogram's `Def` with its buckets (seconds).
struct HistogramDef {
    name: &'static str,
    help: &'static str,
    labels: &'static [&'static str],
    buckets: &'static [f64],
}

// The websocket side.
const WS_CONNECTIONS: Def = Def {
    name: "herald_ws_connections",
    help: "Websocket connections open now.",
    labels: &[],
};
const WS_HELLO: Def = Def {
    name: "herald_ws_hello_total",
    help: "Hello messages by outcome.",
    labels: &["outcome"],
};
const WS_REGISTER: Def = Def {
    name: "herald_ws_register_total",
    help: "Register requests by outcome.",
    labels: &["outcome"],
};
const WS_UNREGISTER: Def = Def {
    name: "herald_ws_unregister_total",
    help: "Unregister requests by outcome.",
    labels: &["outcome"],
};

// Push messages, from acceptance to acknowledgement.
const MESSAGES_ACCEPTED: Def = Def {
    name: "herald_messages_accepted_total",
    help: "Push messages accepted from application servers, by urgency.",
    labels: &["urgency"],
};
const MESSAGES_DELIVERED: Def = Def {
    name: "herald_messages_delivered_total",
    help: "Notifications sent to user agents.",
    labels: &[],
};
const MESSAGES_ACKED: Def = Def {
    name: "herald_messages_acked_total",
    help: "Notifications acknowledged by user agents.",
    labels: &[],
};
const MESSAGES_NACKED: Def = Def {
    name: "herald_messages_nacked_total",
    help: "Notifications refused (nack) by user agents.",
    labels: &[],
};
const MESSAGES_EXPIRED: Def = Def {
    name: "herald_messages_expired_total",
    help: "Stored messages removed because their TTL ran out.",
    labels: &[],
};
const MESSAGES_REPLACED: Def = Def {
    name: "herald_messages_replaced_total",
    help: "Pending messages replaced by a newer one with the same topic.",
    labels: &[],
};
const MESSAGES_DROPPED: Def = Def {
    name: "herald_messages_dropped_total",
    help: "Messages dropped before delivery, by reason.",
    labels: &["reason"],
};

// Delivery receipts (RFC 8030 §5.1).
const RECEIPTS: Def = Def {
    name: "herald_receipts_total",
    help: "Delivery receipts recorded, by outcome (delivered, rejected, expired, cancelled, gone).",
    labels: &["outcome"],
};
const RECEIPT_STREAMS: Def = Def {
    name: "herald_receipt_streams",
    help: "Receipt subscriptions being streamed to application servers now.",
    labels: &[],
};

// The application-server API.
const HTTP_RESPONSES: Def = Def {
    name: "herald_http_responses_total",
    help: "Application-server API responses by status and errno (0 for success).",
    labels: &["status", "errno"],
};
const VAPID_FAILURES: Def = Def {
    name: "herald_vapid_failures_total",
    help: "Refused VAPID credentials by reason.",
    labels: &["reason"],
};
const JWT_CACHE: Def = Def {
    name: "herald_jwt_cache_lookups_total",
    help: "VAPID verification cache lookups by result (hit or miss).",
    labels: &["result"],
};

// The store.
const STORE_SECONDS: HistogramDef = HistogramDef {
    name: "herald_store_operation_seconds",
    help: "Store operation latency.",
    labels: &["op"],
    buckets: &[
        0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
        0.05, 0.1, 0.25, 1.0,
    ],
};
const STORE_ERRORS: Def = Def {
    name: "herald_store_errors_total",
    help: "Store operations that failed (engine unreachable, timed out, I/O error), by operation.",
    labels: &["op"],
};

// Traffic between nodes.
const WAKEUPS_SENT: Def = Def {
    name: "herald_node_wakeups_sent_total",
    help: "Wake-ups sent to the node serving a user agent, by result (ok or failed).",
    labels: &["result"],
};
const WAKEUPS_RECEIVED: Def = Def {
    name: "herald_node_wakeups_received_total",
    help: "Wake-ups received from other nodes.",
    labels: &[],
};
const NODE_REQUESTS_REFUSED: Def = Def {
    name: "herald_node_requests_refused_total",
    help: "Node-to-node requests refused, by reason (bad_signature, stale, replayed, window_full).",
    labels: &["reason"],
};
const NODE_REQUEST_SECONDS: HistogramDef = HistogramDef {
    name: "herald_node_request_seconds",
    help: "Latency of requests to other nodes (wake-ups, evictions).",
    labels: &[],
    buckets: &[
        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25, 2.0,
    ],
};

// Broadcasts.
const BROADCAST_CHANGES: Def = Def {
    name: "herald_broadcast_changes_total",
    help: "Broadcast versions that changed on this node (API, upstream source or another node).",
    labels: &[],
};
const BROADCAST_FRAMES: Def = Def {
    name: "herald_broadcast_messages_total",
    help:
        "Broadcast messages sent to user agents (changes fanned out, and answers to subscriptions).",
    labels: &[],
};
const BROADCAST_SUBSCRIBED: Def = Def {
    name: "herald_broadcast_subscribed_connections",
    help: "Connections following at least one broadcast.",
    labels: &[],
};
const BROADCAST_SOURCE_ERRORS: Def = Def {
    name: "herald_broadcast_source_errors_total",
    help: "Failed polls of broadcast_source_url (the last versions are kept).",
    labels: &[],
};

// The store's own figures, read when metrics are scraped.
const STORED_MESSAGES: Def = Def {
    name: "herald_stored_messages",
    help: "Messages on disk (RocksDB estimate).",
    labels: &[],
};
const STORE_SIZE: Def = Def {
    name: "herald_store_size_bytes",
    help: "Store size on disk and in memtables.",
    labels: &[],
};
const STORE_PENDING_COMPACTION: Def = Def {
    name: "herald_store_pending_compaction_bytes",
    help: "Bytes RocksDB estimates it still has to compact.",
    labels: &[],
};

// Bridges to FCM and APNs: labels `bridge` (fcm, apns) and `app` (app_id).
const BRIDGE_REQUESTS: Def = Def {
    name: "herald_bridge_requests_total",
    help: "Requests to an upstream push service, by bridge, app and HTTP status (or `error` when no answer came).",
    labels: &["bridge", "app", "status"],
};
const BRIDGE_REQUEST_SECONDS: HistogramDef = HistogramDef {
    name: "herald_bridge_request_seconds",
    help: "Latency of requests to an upstream push service.",
    labels: &["bridge", "app"],
    buckets: &[
        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    ],
};
const BRIDGE_RETRIES: Def = Def {
    name: "herald_bridge_retries_total",
    help: "Bridged messages kept to be sent again after the upstream could not take them.",
    labels: &["bridge", "app"],
};
const BRIDGE_TOKEN_REFRESHES: Def = Def {
    name: "herald_bridge_token_refreshes_total",
    help: "Upstream credentials made anew (FCM access tokens, APNs provider tokens).",
    labels: &["bridge", "app"],
};
const BRIDGE_DROPS: Def = Def {
    name: "herald_bridge_drops_total",
    help: "Bridged user agents or messages given up, by reason (gone, rejected, expired).",
    labels: &["bridge", "app", "reason"],
};

// The registration API of mobile user agents.
const REGISTRATIONS: Def = Def {
    name: "herald_registrations_total",
    help: "Registration API calls by bridge, operation (register, update, get, unregister, subscribe, unsubscribe) and outcome (ok, refused, unauthorized, gone, error).",
    labels: &["bridge", "op", "outcome"],
};

// A public service: quotas, blocks, the admin API, the registration policy
// and the Matrix push gateway.
const THROTTLED: Def = Def {
    name: "herald_throttled_total",
    help: "Pushes refused 429 by a quota, by reason (subscription, user_agent, sender_key, sender_address).",
    labels: &["reason"],
};
const BLOCKED: Def = Def {
    name: "herald_blocked_pushes_total",
    help:
        "Pushes refused 403 because the operator blocked their sender, by what matched (key, sub).",
    labels: &["by"],
};
const ADMIN_REQUESTS: Def = Def {
    name: "herald_admin_requests_total",
    help: "Admin API calls by operation and outcome.",
    labels: &["op", "outcome"],
};
const POLICY_REFUSALS: Def = Def {
    name: "herald_policy_refusals_total",
    help: "Subscriptions and connections refused by the registration policy, by reason (vapid_required, user_agent_token).",
    labels: &["reason"],
};
const MATRIX_NOTIFICATIONS: Def = Def {
    name: "herald_matrix_notifications_total",
    help:
        "Matrix push gateway notifications received, by outcome (ok, malformed, throttled, error).",
    labels: &["outcome"],
};
const MATRIX_DEVICES: Def = Def {
    name: "herald_matrix_devices_total",
    help: "Matrix push gateway devices, by outcome (pushed, rejected).",
    labels: &["outcome"],
};

/// Builds metrics from their definitions into one registry.
struct Registrar<'a>(&'a Registry);

impl Registrar<'_> {
    fn register<C: prometheus::core::Collector + Clone + 'static>(&self, c: C) -> C {
        self.0
            .register(Box::new(c.clone()))
            .expect("metric names are unique");
        c
    }
    fn counter(&self, d: Def) -> IntCounter {
        self.register(IntCounter::new(d.name, d.help).expect("a valid metric"))
    }
    fn counter_vec(&self, d: Def) -> IntCounterVec {
        self.register(
            IntCounterVec::new(Opts::new(d.name, d.help), d.labels).expect("a valid metric"),
        )
    }
    fn gauge(&self, d: Def) -> IntGauge {
        self.register(IntGauge::new(d.name, d.help).expect("a valid metric"))
    }
    fn histogram(&self, d: HistogramDef) -> Histogram {
        let opts = HistogramOpts::new(d.name, d.help).buckets(d.buckets.to_vec());
        self.register(Histogram::with_opts(opts).expect("a valid metric"))
    }
    fn histogram_vec(&self, d: HistogramDef) -> HistogramVec {
        let opts = HistogramOpts::new(d.name, d.help).buckets(d.buckets.to_vec());
        self.register(HistogramVec::new(opts, d.labels).expect("a valid metric"))
    }
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let r = Registrar(&registry);
        Metrics {
            ws_connections: r.gauge(WS_CONNECTIONS),
            ws_hello: r.counter_vec(WS_HELLO),
            ws_register: r.counter_vec(WS_REGISTER),
            ws_unregister: r.counter_vec(WS_UNREGISTER),
            messages_accepted: r.counter_vec(MESSAGES_ACCEPTED),
            messages_delivered: r.counter(MESSAGES_DELIVERED),
            messages_acked: r.counter(MESSAGES_ACKED),
            messages_nacked: r.counter(MESSAGES_NACKED),
            messages_expired: r.counter(MESSAGES_EXPIRED),
            messages_replaced: r.counter(MESSAGES_REPLACED),
            messages_dropped: r.counter_vec(MESSAGES_DROPPED),
            receipts: r.counter_vec(RECEIPTS),
            receipt_streams: r.gauge(RECEIPT_STREAMS),
            http_responses: r.counter_vec(HTTP_RESPONSES),
            vapid_failures: r.counter_vec(VAPID_FAILURES),
            jwt_cache: r.counter_vec(JWT_CACHE),
            store_seconds: r.histogram_vec(STORE_SECONDS),
            store_errors: r.counter_vec(STORE_ERRORS),
            wakeups_sent: r.counter_vec(WAKEUPS_SENT),
            wakeups_received: r.counter(WAKEUPS_RECEIVED),
            node_requests_refused: r.counter_vec(NODE_REQUESTS_REFUSED),
            node_request_seconds: r.histogram(NODE_REQUEST_SECONDS),
            broadcast_changes: r.counter(BROADCAST_CHANGES),
            broadcast_frames: r.counter(BROADCAST_FRAMES),
            broadcast_subscribed: r.gauge(BROADCAST_SUBSCRIBED),
            broadcast_source_errors: r.counter(BROADCAST_SOURCE_ERRORS),
            stored_messages: r.gauge(STORED_MESSAGES),
            store_size: r.gauge(STORE_SIZE),
            store_pending_compaction: r.gauge(STORE_PENDING_COMPACTION),
            bridge_requests: r.counter_vec(BRIDGE_REQUESTS),
            bridge_request_seconds: r.histogram_vec(BRIDGE_REQUEST_SECONDS),
            bridge_retries: r.counter_vec(BRIDGE_RETRIES),
            bridge_token_refreshes: r.counter_vec(BRIDGE_TOKEN_REFRESHES),
            bridge_drops: r.counter_vec(BRIDGE_DROPS),
            registrations: r.counter_vec(REGISTRATIONS),
            throttled: r.counter_vec(THROTTLED),
            blocked_pushes: r.counter_vec(BLOCKED),
            admin_requests: r.counter_vec(ADMIN_REQUESTS),
            policy_refusals: r.counter_vec(POLICY_REFUSALS),
            matrix_notifications: r.counter_vec(MATRIX_NOTIFICATIONS),
            matrix_devices: r.counter_vec(MATRIX_DEVICES),
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
