//! What one push becomes on its way to APNs: the JSON payload Firefox for
//! iOS decodes and the `apns-*` header values. Pure code; the bridge
//! (`apns.rs`) does the sending.
//!
//! The payload puts the push's fields at the top level beside `aps`, as
//! strings: Firefox for iOS's notification service extension copies every
//! top-level string into the map it decrypts (channel id `chid`, body as
//! base64url `body`, content coding `con`, and aesgcm's `enc` and
//! `cryptokey`). The extension runs only for a push with
//! `mutable-content: 1` and an alert, hence the default `aps`.

use super::payload_fields;
use crate::store::Message;
use herald_proto::urgency::Urgency;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

/// APNs' limit on the whole payload of a regular (non-VoIP) push.
pub const MAX_PAYLOAD: usize = 4096;

/// The `apns-collapse-id` header's limit.
pub const MAX_COLLAPSE_ID: usize = 64;

/// The `aps` of a registration that sent none: a localized alert the app
/// replaces once it has decrypted the push.
pub fn default_aps() -> Value {
    json!({
        "alert": {
            "title-loc-key": "SentTab.NoTabArrivingNotification.title",
            "loc-key": "SentTab.NoTabArrivingNotification.body",
        },
        "mutable-content": 1,
    })
}

/// The payload for `message`, with the registration's stored `aps` (JSON
/// text) or the default. `Err` says why it cannot be built: a stored `aps`
/// that is not a JSON object (the registration API checks it, so only a
/// record written otherwise can hold one).
pub fn payload(message: &Message, aps: Option<&str>) -> Result<Vec<u8>, String> {
    payload_with_ver(message, aps, &message.seq.to_string())
}

/// `ver` names the message to the app; the message's sequence number is
/// unique per user agent and the same on every retry.
fn payload_with_ver(message: &Message, aps: Option<&str>, ver: &str) -> Result<Vec<u8>, String> {
    let aps = match aps {
        None => default_aps(),
        Some(text) => match serde_json::from_str::<Value>(text) {
            Ok(v @ Value::Object(_)) => v,
            _ => return Err("the registration's aps is not a JSON object".into()),
        },
    };
    let mut map: Map<String, Value> = payload_fields(message)
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.into()))
        .collect();
    map.insert("aps".into(), aps);
    map.insert("ver".into(), ver.into());
    Ok(Value::Object(map).to_string().into_bytes())
}

/// Whether `message` fits APNs' limit once wrapped with the default `aps`.
/// Measured with the longest `ver` a message can have, since the sequence
/// number is settled only when the message is stored.
pub fn fits(message: &Message) -> bool {
    payload_with_ver(message, None, &u64::MAX.to_string())
        .map(|p| p.len() <= MAX_PAYLOAD)
        .unwrap_or(false)
}

/// `apns-priority`: 10 sends at once, 5 lets the device batch it to save
/// power, which is what a sender asking for low urgency wants.
pub fn priority(urgency: Urgency) -> &'static str {
    match urgency {
        Urgency::High | Urgency::Normal => "10",
        Urgency::Low | Urgency::VeryLow => "5",
    }
}

/// `apns-expiration`: 0 tells APNs to try once and not store the push,
/// which is what TTL 0 means; otherwise the moment the TTL runs out.
pub fn expiration(message: &Message) -> u64 {
    if message.ttl == 0 {
        0
    } else {
        message.expires_at
    }
}

/// `apns-collapse-id` for the push's `Topic`. APNs collapses per device and
/// app, Web Push per subscription, so the id is scoped to the channel: its
/// 32 hex digits and the topic (at most 32 characters) fit the 64 bytes.
/// A longer topic, which the push API does not accept, is hashed to keep
/// within the limit.
pub fn collapse_id(message: &Message) -> Option<String> {
    let topic = message.topic.as_deref()?;
    let chid = message.channel.simple().to_string();
    if chid.len() + topic.len() <= MAX_COLLAPSE_ID {
        return Some(format!("{chid}{topic}"));
    }
    let digest = Sha256::digest(topic.as_bytes());
    let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    Some(format!("{chid}{hex}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use herald_proto::headers::NotificationHeaders;

    fn message(data: &[u8], headers: Option<NotificationHeaders>) -> Message {
        Message {
            seq: 7,
            channel: uuid::Uuid::parse_str("0f2e7c3a-1b2c-4d5e-8f90-a1b2c3d4e5f6").unwrap(),
            expires_at: 1_700_000_600,
            ttl: 600,
            urgency: Urgency::Normal,
            topic: None,
            headers,
            data: Bytes::copy_from_slice(data),
            receipt: false,
        }
    }

    fn aes128gcm() -> Option<NotificationHeaders> {
        Some(NotificationHeaders {
            encoding: "aes128gcm".into(),
            encryption: None,
            crypto_key: None,
        })
    }

    fn json_of(m: &Message, aps: Option<&str>) -> Value {
        serde_json::from_slice(&payload(m, aps).unwrap()).unwrap()
    }

    #[test]
    fn aes128gcm_payload_carries_body_and_coding() {
        let m = message(b"\xff\x00hello", aes128gcm());
        assert_eq!(
            json_of(&m, None),
            json!({
                "aps": default_aps(),
                "chid": "0f2e7c3a-1b2c-4d5e-8f90-a1b2c3d4e5f6",
                "ver": "7",
                "body": "_wBoZWxsbw",
                "con": "aes128gcm",
            })
        );
    }

    #[test]
    fn aesgcm_payload_carries_its_headers() {
        let m = message(
            b"x",
            Some(NotificationHeaders {
                encoding: "aesgcm".into(),
                encryption: Some("salt=abc".into()),
                crypto_key: Some("dh=def".into()),
            }),
        );
        let v = json_of(&m, None);
        assert_eq!(v["con"], "aesgcm");
        assert_eq!(v["enc"], "salt=abc");
        assert_eq!(v["cryptokey"], "dh=def");
    }

    #[test]
    fn a_push_without_payload_names_only_its_channel() {
        let v = json_of(&message(b"", None), None);
        let keys: Vec<&String> = v.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["aps", "chid", "ver"]);
    }

    #[test]
    fn a_stored_aps_replaces_the_default() {
        let v = json_of(&message(b"", None), Some(r#"{"alert":"hi","badge":3}"#));
        assert_eq!(v["aps"], json!({"alert": "hi", "badge": 3}));
        let e = payload(&message(b"", None), Some(r#""a string""#)).unwrap_err();
        assert!(e.contains("aps"), "{e}");
        assert!(payload(&message(b"", None), Some("{not json")).is_err());
    }

    #[test]
    fn fits_measures_the_whole_payload() {
        // Overhead with the default aps, chid, a 20-digit ver and
        // con=aes128gcm; the base64 of the body makes up the rest.
        let overhead = payload_with_ver(&message(b"", aes128gcm()), None, &u64::MAX.to_string())
            .unwrap()
            .len();
        let room = MAX_PAYLOAD - overhead;
        let largest = room / 4 * 3; // base64 of n bytes is 4n/3 characters
        assert!(fits(&message(&vec![0; largest], aes128gcm())));
        assert!(!fits(&message(&vec![0; largest + 3], aes128gcm())));
    }

    #[test]
    fn urgency_maps_to_priority() {
        assert_eq!(priority(Urgency::High), "10");
        assert_eq!(priority(Urgency::Normal), "10");
        assert_eq!(priority(Urgency::Low), "5");
        assert_eq!(priority(Urgency::VeryLow), "5");
    }

    #[test]
    fn ttl_zero_means_expiration_zero() {
        let mut m = message(b"", None);
        assert_eq!(expiration(&m), 1_700_000_600);
        m.ttl = 0;
        assert_eq!(expiration(&m), 0);
    }

    #[test]
    fn collapse_id_is_scoped_to_the_channel_and_short_enough() {
        let mut m = message(b"", None);
        assert_eq!(collapse_id(&m), None);
        m.topic = Some("a".repeat(32));
        let id = collapse_id(&m).unwrap();
        assert_eq!(
            id,
            format!("0f2e7c3a1b2c4d5e8f90a1b2c3d4e5f6{}", "a".repeat(32))
        );
        assert_eq!(id.len(), MAX_COLLAPSE_ID);
        let mut other = m.clone();
        other.channel = uuid::Uuid::nil();
        assert_ne!(collapse_id(&other), collapse_id(&m));
        m.topic = Some("b".repeat(40));
        let id = collapse_id(&m).unwrap();
        assert_eq!(id.len(), 64);
        assert!(id.starts_with("0f2e7c3a1b2c4d5e8f90a1b2c3d4e5f6"));
    }
}
