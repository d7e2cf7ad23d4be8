//! The application-server API's errors. Every refusal carries an HTTP status
//! and a stable `errno` from herald-proto's `Errno`; numbers shared with
//! autopush mean the same thing there, so existing client libraries
//! recognise them. `proto-docs/errors.md` lists them all.

pub use herald_proto::errno::Errno;
use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: u16,
    pub errno: Errno,
    pub message: String,
    /// Seconds, sent as `Retry-After` (429 and 503).
    pub retry_after: Option<u64>,
    /// Label for the metrics of VAPID failures.
    pub vapid_reason: Option<&'static str>,
}

#[derive(Serialize)]
struct Body<'a> {
    code: u16,
    errno: Errno,
    error: &'a str,
    message: &'a str,
}

impl ApiError {
    pub fn new(status: u16, errno: Errno, message: impl Into<String>) -> Self {
        ApiError {
            status,
            errno,
            message: message.into(),
            retry_after: None,
            vapid_reason: None,
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(&Body {
            code: self.status,
            errno: self.errno,
            error: reason_phrase(self.status),
            message: &self.message,
        })
        .expect("error body serialises")
    }

    // 400
    pub fn missing_crypto(msg: &str) -> Self {
        Self::new(400, Errno::MissingCrypto, msg)
    }
    pub fn invalid_crypto(msg: &str) -> Self {
        Self::new(400, Errno::InvalidCrypto, msg)
    }
    pub fn missing_ttl() -> Self {
        Self::new(400, Errno::MissingTtl, "missing TTL header")
    }
    pub fn invalid_ttl(v: &str) -> Self {
        Self::new(
            400,
            Errno::InvalidTtl,
            format!("invalid TTL header {v:?}: must be a non-negative integer number of seconds"),
        )
    }
    pub fn invalid_topic() -> Self {
        Self::new(
            400,
            Errno::InvalidTopic,
            "invalid Topic header: at most 32 characters of the URL-safe base64 alphabet",
        )
    }
    pub fn invalid_urgency(v: &str) -> Self {
        Self::new(
            400,
            Errno::InvalidUrgency,
            format!("invalid Urgency header {v:?}: use very-low, low, normal or high"),
        )
    }
    // 401 / 403
    pub fn unauthorized(reason: &'static str, msg: impl Into<String>) -> Self {
        let mut e = Self::new(401, Errno::Unauthorized, msg);
        e.vapid_reason = Some(reason);
        e
    }
    pub fn key_mismatch() -> Self {
        let mut e = Self::new(
            403,
            Errno::KeyMismatch,
            "the VAPID key is not the application server key this subscription was made with",
        );
        e.vapid_reason = Some("key_mismatch");
        e
    }
    // 404
    pub fn invalid_endpoint() -> Self {
        Self::new(
            404,
            Errno::InvalidEndpoint,
            "invalid endpoint: this URL was not issued by this push service",
        )
    }
    pub fn no_message() -> Self {
        Self::new(
            404,
            Errno::NoMessage,
            "no such message: it was delivered, expired, replaced or never existed",
        )
    }
    pub fn not_found() -> Self {
        Self::new(404, Errno::NotFound, "no such resource")
    }
    pub fn method_not_allowed() -> Self {
        Self::new(
            405,
            Errno::MethodNotAllowed,
            "method not allowed on this resource",
        )
    }
    // 408
    pub fn body_timeout(secs: u64) -> Self {
        Self::new(
            408,
            Errno::UnreadableBody,
            format!("the request body did not arrive within {secs} s"),
        )
    }
    // 410
    pub fn user_gone() -> Self {
        Self::new(
            410,
            Errno::UserGone,
            "this subscription's user agent is gone; stop sending to it",
        )
    }
    pub fn subscription_gone() -> Self {
        Self::new(
            410,
            Errno::SubscriptionGone,
            "this subscription was unregistered; stop sending to it",
        )
    }
    // 413
    /// The payload would not fit the bridge's upstream (FCM, APNs) once
    /// wrapped for it: their limits are smaller than `max_message_bytes`.
    pub fn too_large_for_bridge(bridge: &str) -> Self {
        Self::new(
            413,
            Errno::TooLarge,
            format!(
                "payload too large for this subscription: its user agent is reached through {bridge}, whose 4096-byte limit leaves room for about 3000 bytes of encrypted payload"
            ),
        )
    }
    pub fn too_large(max: usize) -> Self {
        Self::new(
            413,
            Errno::TooLarge,
            format!(
                "payload too large: this push service accepts {} (max_message_bytes)",
                herald_proto::crypto::body_limit_explained(max)
            ),
        )
    }
    // 429
    pub fn too_many_stored(max: usize) -> Self {
        let mut e = Self::new(
            429,
            Errno::TooManyStored,
            format!("this user agent already has {max} undelivered messages; retry later"),
        );
        e.retry_after = Some(60);
        e
    }
    /// A receiver's quota (subscription or user agent) is used up.
    pub fn receiver_rate_limited(msg: &str, retry_after: u64) -> Self {
        let mut e = Self::new(
            429,
            Errno::ReceiverRateLimited,
            format!("{msg}; retry later"),
        );
        e.retry_after = Some(retry_after);
        e
    }
    /// The sender's quota (its VAPID key, or its address without VAPID)
    /// is used up.
    pub fn sender_rate_limited(msg: &str, retry_after: u64) -> Self {
        let mut e = Self::new(429, Errno::SenderRateLimited, format!("{msg}; retry later"));
        e.retry_after = Some(retry_after);
        e
    }
    /// Reading receipts: this node already streams as many as it allows,
    /// on this receipt subscription or in all.
    pub fn too_many_receipt_streams(refused: crate::receipts::StreamRefused) -> Self {
        use crate::receipts::StreamRefused;
        let message = match refused {
            StreamRefused::Subscription(max) => format!(
                "this receipt subscription already has {max} open streams; close one, or read with Prefer: wait=0"
            ),
            StreamRefused::Node(max) => {
                format!("this node already holds {max} receipt streams; retry later")
            }
        };
        let mut e = Self::new(429, Errno::TooManyReceiptStreams, message);
        e.retry_after = Some(30);
        e
    }
    // 5xx
    /// A receipt subscription URL Herald did not issue (forged, altered,
    /// truncated), or not a URL at all: 400 on a push, 404 on a GET.
    pub fn invalid_receipt_subscription(status: u16) -> Self {
        Self::new(
            status,
            Errno::InvalidReceiptSubscription,
            "the receipt subscription was not issued by this push service",
        )
    }

    pub fn receipt_key_mismatch() -> Self {
        Self::new(
            400,
            Errno::ReceiptKeyMismatch,
            "the receipt subscription belongs to another application server key: sign with the key it was created for, or omit it to get a new one",
        )
    }

    /// The one way a store failure reaches an application server: a fixed
    /// message, whatever the variant, because the store's own error names
    /// hosts, ports, commands and engine internals. The detail goes to the
    /// log. Every variant is a 503 with `Retry-After`: even corruption or a
    /// refused request is this node's trouble, not the sender's, and
    /// another attempt may reach a node (or a reopened store) without it.
    pub fn storage(err: crate::store::StoreError) -> Self {
        use crate::store::StoreError;
        match &err {
            // Expected while Redis fails over or a full disk clears.
            StoreError::Unavailable(_) | StoreError::Io(_) => {
                tracing::warn!(kind = err.kind(), "storage unavailable: {err}")
            }
            StoreError::Corrupt(_) | StoreError::Rejected(_) | StoreError::Task(_) => {
                tracing::error!(kind = err.kind(), "storage unavailable: {err}")
            }
        }
        let mut e = Self::new(503, Errno::StorageUnavailable, STORAGE_UNAVAILABLE);
        e.retry_after = Some(10);
        e
    }
}

/// The `message` of every 503 with errno 201.
pub const STORAGE_UNAVAILABLE: &str = "storage unavailable; retry later";

pub fn reason_phrase(status: u16) -> &'static str {
    http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Error")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_has_the_four_fields() {
        let v: serde_json::Value =
            serde_json::from_str(&ApiError::invalid_endpoint().to_json()).unwrap();
        assert_eq!(v["code"], 404);
        assert_eq!(v["errno"], 102);
        assert_eq!(v["error"], "Not Found");
        assert!(v["message"].as_str().unwrap().contains("endpoint"));
    }

    #[test]
    fn storage_errors_keep_their_detail_out_of_the_body() {
        use crate::store::StoreError;
        for err in [
            StoreError::Unavailable("redis get_user: Connection refused (os error 111)".into()),
            StoreError::Io("IO error: No space left on device: db/000012.log".into()),
            StoreError::Corrupt("Corruption: bad block in db/000031.sst".into()),
            StoreError::Rejected("redis put_message: ERR user_script:12".into()),
            StoreError::Task("rocksdb task failed: panicked".into()),
        ] {
            let e = ApiError::storage(err);
            assert_eq!(
                (e.status, e.errno, e.retry_after),
                (503, Errno::StorageUnavailable, Some(10))
            );
            assert_eq!(e.message, STORAGE_UNAVAILABLE);
            let body = e.to_json();
            for engine_text in [
                "redis",
                "Connection",
                "IO error",
                "No space",
                "Corruption",
                "db/",
                "ERR",
                "rocksdb",
            ] {
                assert!(!body.contains(engine_text), "{engine_text:?} in {body}");
            }
        }
    }

    #[test]
    fn retry_after_on_backpressure() {
        assert_eq!(ApiError::too_many_stored(10).retry_after, Some(60));
        assert_eq!(ApiError::too_many_stored(10).status, 429);
    }
}
