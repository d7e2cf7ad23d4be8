//! Delivery to user agents that keep no websocket: mobile browsers and apps
//! reached through Firebase Cloud Messaging or the Apple Push Notification
//! service. A push to a bridged user agent is stored like any other and
//! then handed to the upstream through a `Bridge`; each upstream is one
//! implementation of that trait, so nothing else knows which one it is.

pub mod apns;
pub mod apns_auth;
pub mod apns_payload;
pub mod fcm;
pub mod fcm_auth;
pub mod fcm_wire;

use crate::store::{BridgeKind, BridgeRoute, Message};
use herald_proto::b64::encode_b64url;
use std::collections::BTreeMap;
use std::time::Duration;

/// What the upstream made of one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// The upstream took the message; it now owns delivery to the device.
    Accepted,
    /// The upstream could not take it now (429, 5xx, a timeout, a lost
    /// connection): keep the message and try again, not before `after`
    /// when the upstream said when (`Retry-After`).
    Retry {
        after: Option<Duration>,
        reason: String,
    },
    /// The device token is no longer valid (the app was uninstalled or the
    /// token replaced): the user agent is gone.
    Gone { reason: String },
    /// The upstream refused this message for good (malformed, too large,
    /// or the bridge's own credentials refused): drop the message, keep
    /// the user agent.
    Rejected { reason: String },
}

/// What both mobile push components read to decrypt a push (Firefox for
/// Android from FCM's data map, Firefox for iOS from APNs' payload): the
/// channel id, and for a push with a payload the body (base64url, no
/// padding), its content encoding and, for `aesgcm`, the `Encryption` and
/// `Crypto-Key` headers, which Herald stored already in the unquoted,
/// unpadded form the device parses. A push without payload carries only
/// its channel: there is nothing to decrypt.
pub fn payload_fields(message: &Message) -> BTreeMap<&'static str, String> {
    let mut map = BTreeMap::new();
    map.insert("chid", message.channel.hyphenated().to_string());
    if let Some(h) = &message.headers {
        map.insert("body", encode_b64url(&message.data));
        map.insert("con", h.encoding.clone());
        if let Some(enc) = &h.encryption {
            map.insert("enc", enc.clone());
        }
        if let Some(key) = &h.crypto_key {
            map.insert("cryptokey", key.clone());
        }
    }
    map
}

/// How long to wait before trying again when the upstream refuses Herald's
/// own credentials (a revoked or wrong key, a service account without the
/// right, clocks far apart). The fault is the operator's, not the
/// message's: messages are kept until their TTL, so that once the
/// credentials are mended (and Herald restarted with them) what waited is
/// delivered. `herald_bridge_requests_total` shows the refusals meanwhile.
pub const CREDENTIALS_PAUSE: Duration = Duration::from_secs(60);

/// One upstream push service, configured for one app.
#[async_trait::async_trait]
pub trait Bridge: Send + Sync + 'static {
    fn kind(&self) -> BridgeKind;
    /// The `{app_id}` it serves.
    fn app_id(&self) -> &str;
    /// Whether `message` fits the upstream's size limit once wrapped the way
    /// this bridge sends it. Checked before the message is accepted, so an
    /// application server learns at once (413) instead of never.
    fn fits(&self, message: &Message) -> bool;
    /// Sends `message` to the device `route` names. `now` (Unix seconds)
    /// gives the TTL still left, which is what the upstream is told.
    async fn send(&self, route: &BridgeRoute, message: &Message, now: u64) -> Delivery;
}

/// Durable delivery of bridged messages: the outbox, retries, settling.
pub mod forward;
/// The configured bridges by upstream and app.
pub mod registry;
