//! The one record every source reads into, and the pure rules that turn
//! autopush-rs's stored fields (router type and data, headers map, payload
//! text) into Herald's types. Sources differ only in where the fields sit.

use crate::store::{BridgeKind, BridgeRoute};
use crate::token::KeyHash;
use base64::Engine;
use herald_proto::headers::NotificationHeaders;
use herald_proto::ids::{ChannelId, Uaid};
use herald_proto::urgency::Urgency;
use serde_json::Value;
use std::collections::BTreeMap;

/// autopush-rs caps TTLs at 30 days (`max_notification_ttl`); a TTL
/// recovered from an expiry time is clamped to it.
pub const MAX_AUTOPUSH_TTL: u64 = 30 * 86400;

/// autopush-rs's topic rule: up to 32 characters.
const MAX_TOPIC_LEN: usize = 32;

/// One user agent as autopush-rs stored it, in Herald's terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportedUa {
    pub uaid: Uaid,
    /// autopush's `connected_at`: milliseconds of the last hello (of the
    /// registration for a bridged user agent).
    pub connected_at_ms: u64,
    pub route: Route,
    /// In the order stored, without repeats.
    pub channels: Vec<ImportedChannel>,
    /// Only the messages still pending upstream (the sources apply
    /// autopush's read pointer); expired ones are dropped by the writer.
    pub messages: Vec<ImportedMessage>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImportedChannel {
    pub id: ChannelId,
    /// autopush-rs keeps no key per channel (a v2 endpoint carries the hash
    /// itself); only a JSON-lines export may supply one.
    pub key_hash: Option<KeyHash>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// A desktop user agent on the websocket.
    Webpush,
    Bridge(BridgeRoute),
}

/// What a router type and its data become.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Routed {
    Route(Route),
    /// A user agent autopush itself would drop on its next push.
    Skip(&'static str),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportedMessage {
    /// The upstream message id (`version`): names the message in the
    /// import ledger.
    pub id: String,
    pub channel: ChannelId,
    /// Unix seconds when autopush received it.
    pub timestamp: u64,
    pub ttl: u64,
    /// Milliseconds of receipt for a message without topic.
    pub sortkey_ms: Option<u64>,
    pub topic: Option<String>,
    pub urgency: Urgency,
    pub headers: Option<NotificationHeaders>,
    pub data: Vec<u8>,
}

impl ImportedMessage {
    pub fn expires_at(&self) -> u64 {
        self.timestamp.saturating_add(self.ttl)
    }

    /// Delivery order: receipt time, then the finer sort key, then the id
    /// so that equal times still order the same way on every run.
    pub fn order_key(&self) -> (u64, u64, &str) {
        let fine = self
            .sortkey_ms
            .unwrap_or(self.timestamp.saturating_mul(1000));
        (self.timestamp, fine, &self.id)
    }
}

/// Sequence numbers for one user agent's messages, oldest first: receipt
/// time in microseconds, bumped past the previous one on a tie. The same
/// messages always get the same numbers, and they sort below every number
/// Herald hands out later (wall-clock microseconds).
pub fn plan_seqs(messages: &mut [ImportedMessage]) -> Vec<u64> {
    messages.sort_by(|a, b| a.order_key().cmp(&b.order_key()));
    let mut prev = 0u64;
    messages
        .iter()
        .map(|m| {
            let base = match m.sortkey_ms {
                Some(ms) => ms.saturating_mul(1000),
                None => m.timestamp.saturating_mul(1_000_000),
            };
            prev = base.max(prev + 1);
            prev
        })
        .collect()
}

/// autopush-rs's `router_type` with its `router_data` (JSON; None or null
/// for `webpush`).
pub fn parse_route(router_type: &str, data: Option<&Value>) -> Result<Routed, String> {
    let data = data.filter(|v| !v.is_null());
    let field = |name: &str| -> Option<String> { data?.get(name)?.as_str().map(str::to_string) };
    match router_type {
        "webpush" => Ok(Routed::Route(Route::Webpush)),
        "gcm" => Ok(Routed::Skip(
            "gcm router (autopush drops it on the next push)",
        )),
        "fcm" => {
            let token = field("token").ok_or("fcm router_data has no \"token\"")?;
            // Old records name the app by the sender id of their credentials.
            let app_id = field("app_id")
                .or_else(|| {
                    data?
                        .get("creds")?
                        .get("senderID")?
                        .as_str()
                        .map(str::to_string)
                })
                .ok_or("fcm router_data has neither \"app_id\" nor \"creds\".\"senderID\"")?;
            Ok(bridge(BridgeKind::Fcm, app_id, token, None))
        }
        "apns" => {
            let token = field("token").ok_or("apns router_data has no \"token\"")?;
            let app_id = field("rel_channel").ok_or("apns router_data has no \"rel_channel\"")?;
            let aps = match data.and_then(|d| d.get("aps")) {
                None | Some(Value::Null) => None,
                Some(Value::String(s)) => Some(s.clone()),
                Some(other) => Some(other.to_string()),
            };
            Ok(bridge(BridgeKind::Apns, app_id, token, aps))
        }
        other => Err(format!("unknown router_type {other:?}")),
    }
}

fn bridge(kind: BridgeKind, app_id: String, token: String, aps: Option<String>) -> Routed {
    Routed::Route(Route::Bridge(BridgeRoute {
        kind,
        app_id,
        token,
        aps,
    }))
}

/// autopush's headers map (`encoding`, `encryption`, `crypto_key`) for a
/// message with `data`. aesgcm headers go through the same normaliser as
/// a push to Herald, so user agents get the one form they decode.
pub fn parse_headers(
    map: Option<&BTreeMap<String, String>>,
    data: &[u8],
) -> Result<Option<NotificationHeaders>, String> {
    let map = map.filter(|m| !m.is_empty());
    if data.is_empty() {
        return Ok(None);
    }
    let map = map.ok_or("a payload without headers (no \"encoding\")")?;
    if let Some(k) = map
        .keys()
        .find(|k| !["encoding", "encryption", "crypto_key"].contains(&k.as_str()))
    {
        return Err(format!("unknown header {k:?}"));
    }
    let encoding = map
        .get("encoding")
        .ok_or("headers without \"encoding\"")?
        .trim()
        .to_ascii_lowercase();
    match encoding.as_str() {
        "aes128gcm" => Ok(Some(NotificationHeaders {
            encoding,
            encryption: None,
            crypto_key: None,
        })),
        "aesgcm" => {
            let enc = map
                .get("encryption")
                .ok_or("aesgcm without \"encryption\"")?;
            let key = map
                .get("crypto_key")
                .ok_or("aesgcm without \"crypto_key\"")?;
            let n = crate::aesgcm::normalise(enc, key)
                .map_err(|e| format!("aesgcm headers: {}", e.message))?;
            Ok(Some(NotificationHeaders {
                encoding,
                encryption: Some(n.encryption),
                crypto_key: Some(n.crypto_key),
            }))
        }
        other => Err(format!("unsupported encoding {other:?}")),
    }
}

/// The payload as autopush stores it: base64url without padding (padding
/// tolerated); empty or absent means no payload.
pub fn decode_data(text: Option<&str>) -> Result<Vec<u8>, String> {
    let text = text.unwrap_or("").trim_end_matches('=');
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(text)
        .map_err(|e| format!("data is not base64url: {e}"))
}

/// A topic as autopush allowed it (trailing `=` included); empty is none.
pub fn check_topic(topic: Option<String>) -> Result<Option<String>, String> {
    match topic {
        None => Ok(None),
        Some(t) if t.is_empty() => Ok(None),
        Some(t) if t.len() <= MAX_TOPIC_LEN && t.is_ascii() && !t.contains(char::is_whitespace) => {
            Ok(Some(t))
        }
        Some(t) => Err(format!("topic {t:?} is not an autopush topic")),
    }
}

pub fn parse_uaid(text: &str) -> Result<Uaid, String> {
    Uaid::parse(text).ok_or_else(|| format!("{text:?} is not a uaid"))
}

pub fn parse_channel(text: &str) -> Result<ChannelId, String> {
    herald_proto::ids::parse_channel_id(text).ok_or_else(|| format!("{text:?} is not a channel id"))
}

/// Channel ids in stored order with repeats removed (autopush's Redis list
/// is appended to without a check).
pub fn dedupe_channels(ids: impl IntoIterator<Item = ImportedChannel>) -> Vec<ImportedChannel> {
    let mut seen = std::collections::HashSet::new();
    ids.into_iter().filter(|c| seen.insert(c.id)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn msg(id: &str, ts: u64, sortkey: Option<u64>) -> ImportedMessage {
        ImportedMessage {
            id: id.into(),
            channel: ChannelId::nil(),
            timestamp: ts,
            ttl: 60,
            sortkey_ms: sortkey,
            topic: None,
            urgency: Urgency::Normal,
            headers: None,
            data: Vec::new(),
        }
    }

    #[test]
    fn seqs_follow_receipt_order_and_repeat_on_every_run() {
        let mut a = vec![
            msg("c", 1_700_000_001, Some(1_700_000_001_500)),
            msg("t", 1_700_000_001, None),
            msg("a", 1_700_000_000, Some(1_700_000_000_123)),
            msg("b", 1_700_000_000, Some(1_700_000_000_123)),
        ];
        let mut b = a.clone();
        b.reverse();
        let seqs = plan_seqs(&mut a);
        assert_eq!(plan_seqs(&mut b), seqs);
        let ids: Vec<&str> = a.iter().map(|m| m.id.as_str()).collect();
        assert_eq!(ids, ["a", "b", "t", "c"]);
        assert_eq!(
            seqs,
            [
                1_700_000_000_123_000,
                1_700_000_000_123_001,
                1_700_000_001_000_000,
                1_700_000_001_500_000
            ]
        );
    }

    #[test]
    fn routes_of_every_router_type() {
        assert_eq!(
            parse_route("webpush", Some(&Value::Null)),
            Ok(Routed::Route(Route::Webpush))
        );
        let fcm = parse_route(
            "fcm",
            Some(&json!({"token": "tok-12345", "app_id": "fenix"})),
        );
        assert_eq!(
            fcm,
            Ok(bridge(
                BridgeKind::Fcm,
                "fenix".into(),
                "tok-12345".into(),
                None
            ))
        );
        let legacy = json!({"token": "tok-12345", "creds": {"senderID": "sender-1"}});
        assert_eq!(
            parse_route("fcm", Some(&legacy)),
            Ok(bridge(
                BridgeKind::Fcm,
                "sender-1".into(),
                "tok-12345".into(),
                None
            ))
        );
        let apns = json!({"token": "dev-12345", "rel_channel": "firefox", "aps": "{\"x\":1}"});
        assert_eq!(
            parse_route("apns", Some(&apns)),
            Ok(bridge(
                BridgeKind::Apns,
                "firefox".into(),
                "dev-12345".into(),
                Some("{\"x\":1}".into())
            ))
        );
        assert!(matches!(parse_route("gcm", None), Ok(Routed::Skip(_))));
        assert!(parse_route("fcm", Some(&json!({"app_id": "fenix"})))
            .unwrap_err()
            .contains("token"));
        assert_eq!(
            parse_route("carrier-pigeon", None),
            Err("unknown router_type \"carrier-pigeon\"".into())
        );
    }

    #[test]
    fn headers_need_a_known_encoding_and_only_known_keys() {
        let map = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        assert_eq!(parse_headers(None, b""), Ok(None));
        let h = parse_headers(Some(&map(&[("encoding", "aes128gcm")])), b"x").unwrap();
        assert_eq!(h.unwrap().encoding, "aes128gcm");
        assert!(parse_headers(None, b"x").is_err());
        assert!(
            parse_headers(Some(&map(&[("encoding", "aesgcm128")])), b"x")
                .unwrap_err()
                .contains("aesgcm128")
        );
        assert!(parse_headers(
            Some(&map(&[("encoding", "aes128gcm"), ("encryption_key", "k")])),
            b"x"
        )
        .unwrap_err()
        .contains("encryption_key"));
        assert!(parse_headers(Some(&map(&[("encoding", "aesgcm")])), b"x").is_err());
    }

    #[test]
    fn data_topics_and_ids() {
        assert_eq!(decode_data(None), Ok(vec![]));
        assert_eq!(decode_data(Some("aGk")), Ok(b"hi".to_vec()));
        assert_eq!(decode_data(Some("aGk=")), Ok(b"hi".to_vec()));
        assert!(decode_data(Some("a+b/")).is_err());
        assert_eq!(check_topic(Some("".into())), Ok(None));
        assert_eq!(
            check_topic(Some("scores=".into())),
            Ok(Some("scores=".into()))
        );
        assert!(check_topic(Some("x".repeat(33))).is_err());
        assert!(parse_uaid("5f2c0d3e-8a9b-4c1d-9e3f-405162738495").is_ok());
        assert!(parse_uaid("nope").is_err());
        let c = parse_channel("0a1b2c3d-4e5f-4a6b-8c7d-8e9fa0b1c2d3").unwrap();
        let d = dedupe_channels(
            [c, c, ChannelId::nil()].map(|id| ImportedChannel { id, key_hash: None }),
        );
        assert_eq!(d.len(), 2);
        assert_eq!(d[0].id, c);
    }
}
