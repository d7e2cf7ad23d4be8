//! The user-agent websocket protocol (Mozilla's push protocol, as Firefox
//! speaks it): parsing what clients send and rendering what the server sends.
//! Pure code; `session` gives the messages their meaning.

use crate::webpush::Urgency;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A message from the user agent.
#[derive(Debug, PartialEq)]
pub enum ClientMessage {
    Hello {
        uaid: Option<String>,
        channel_ids: Vec<String>,
        /// Broadcast id → the version the user agent has.
        broadcasts: BTreeMap<String, String>,
    },
    Register {
        channel_id: String,
        key: Option<String>,
    },
    Unregister {
        channel_id: String,
        code: Option<u32>,
    },
    /// More broadcasts to follow (id → the version the user agent has).
    BroadcastSubscribe {
        broadcasts: BTreeMap<String, String>,
    },
    Ack {
        updates: Vec<AckUpdate>,
    },
    Nack {
        version: String,
        code: Option<i64>,
    },
    /// Extension: the lowest urgency the user agent wants delivered now
    /// (`{"messageType":"urgency","min":"low"}`, as in autopush-rs).
    Urgency {
        min: Urgency,
    },
    Ping,
}

#[derive(Debug, PartialEq, Deserialize)]
pub struct AckUpdate {
    #[serde(rename = "channelID", default)]
    pub channel_id: String,
    pub version: String,
    #[serde(default)]
    pub code: Option<i64>,
}

/// Why a frame could not be understood; the text goes into the close frame.
#[derive(Debug, PartialEq)]
pub struct ParseError(pub String);

// The wire shape. Unknown fields are ignored so clients can add their own
// (Firefox sends `use_webpush` and `broadcasts` in hello).
#[derive(Deserialize)]
#[serde(tag = "messageType", rename_all = "snake_case")]
enum Wire {
    Hello {
        #[serde(default)]
        uaid: Option<String>,
        #[serde(rename = "channelIDs", default)]
        channel_ids: Option<Vec<String>>,
        #[serde(default)]
        broadcasts: Option<BTreeMap<String, serde_json::Value>>,
    },
    Register {
        #[serde(rename = "channelID")]
        channel_id: String,
        #[serde(default)]
        key: Option<String>,
    },
    Unregister {
        #[serde(rename = "channelID")]
        channel_id: String,
        #[serde(default)]
        code: Option<u32>,
    },
    BroadcastSubscribe {
        #[serde(default)]
        broadcasts: Option<BTreeMap<String, serde_json::Value>>,
    },
    Ack {
        updates: Vec<AckUpdate>,
    },
    Nack {
        version: String,
        #[serde(default)]
        code: Option<i64>,
    },
    Urgency {
        min: String,
    },
    Ping {},
}

impl ClientMessage {
    pub fn parse(text: &str) -> Result<Self, ParseError> {
        let trimmed = text.trim();
        // The classic ping is an empty object in both directions.
        if trimmed == "{}" {
            return Ok(ClientMessage::Ping);
        }
        let wire: Wire = serde_json::from_str(trimmed).map_err(|e| {
            let kind = if trimmed.starts_with('{') && e.is_data() {
                "unknown or malformed message"
            } else {
                "invalid JSON"
            };
            ParseError(format!("{kind}: {e}"))
        })?;
        Ok(match wire {
            Wire::Hello {
                uaid,
                channel_ids,
                broadcasts,
            } => ClientMessage::Hello {
                // Firefox sends an empty string for "no uaid" in some versions.
                uaid: uaid.filter(|u| !u.is_empty()),
                channel_ids: channel_ids.unwrap_or_default(),
                broadcasts: versions(broadcasts),
            },
            Wire::Register { channel_id, key } => ClientMessage::Register {
                channel_id,
                key: key.filter(|k| !k.is_empty()),
            },
            Wire::Unregister { channel_id, code } => ClientMessage::Unregister { channel_id, code },
            Wire::BroadcastSubscribe { broadcasts } => ClientMessage::BroadcastSubscribe {
                broadcasts: versions(broadcasts),
            },
            Wire::Ack { updates } => ClientMessage::Ack { updates },
            Wire::Nack { version, code } => ClientMessage::Nack { version, code },
            Wire::Urgency { min } => ClientMessage::Urgency {
                min: Urgency::parse(&min)
                    .ok_or_else(|| ParseError(format!("unknown urgency {min:?}")))?,
            },
            Wire::Ping {} => ClientMessage::Ping,
        })
    }
}

/// Broadcast versions are strings (Firefox sends `"\"0\""`); an entry with
/// any other value names no version Herald could compare, so it is dropped.
fn versions(map: Option<BTreeMap<String, serde_json::Value>>) -> BTreeMap<String, String> {
    map.unwrap_or_default()
        .into_iter()
        .filter_map(|(id, v)| match v {
            serde_json::Value::String(s) => Some((id, s)),
            _ => None,
        })
        .collect()
}

/// Broadcast versions sent to a user agent: the ids whose version differs
/// from what it has, and under `errors` the ids Herald does not know.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct BroadcastDelta {
    #[serde(flatten)]
    pub changed: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub errors: BTreeMap<String, String>,
}

impl BroadcastDelta {
    pub fn is_empty(&self) -> bool {
        self.changed.is_empty() && self.errors.is_empty()
    }
}

/// Headers forwarded with an encrypted payload so the user agent can decrypt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NotificationHeaders {
    pub encoding: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub encryption: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub crypto_key: Option<String>,
}

/// A message from the server.
#[derive(Debug, Serialize)]
#[serde(tag = "messageType", rename_all = "snake_case")]
pub enum ServerMessage<'a> {
    Hello {
        uaid: String,
        status: u16,
        use_webpush: bool,
        broadcasts: BroadcastDelta,
    },
    Broadcast {
        broadcasts: BroadcastDelta,
    },
    Register {
        #[serde(rename = "channelID")]
        channel_id: &'a str,
        status: u16,
        #[serde(rename = "pushEndpoint", skip_serializing_if = "Option::is_none")]
        push_endpoint: Option<String>,
    },
    Unregister {
        #[serde(rename = "channelID")]
        channel_id: &'a str,
        status: u16,
    },
    Notification {
        #[serde(rename = "channelID")]
        channel_id: String,
        version: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        data: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        headers: Option<&'a NotificationHeaders>,
        ttl: u64,
    },
    Urgency {
        status: u16,
    },
}

impl ServerMessage<'_> {
    pub fn to_json(&self) -> String {
        // Serialising these plain structs cannot fail.
        serde_json::to_string(self).expect("server message serialises")
    }
}

/// A notification frame, written by hand: it is the one message sent for
/// every push, and its bulk (the payload, base64url) and its id never need
/// JSON escaping, so the payload is encoded straight into the frame instead
/// of into a string serde would then scan character by character. Gives
/// exactly what `ServerMessage::Notification` would.
pub fn notification_json(
    channel_id: &uuid::Uuid,
    version: &str,
    data: Option<(&[u8], &NotificationHeaders)>,
    ttl: u64,
) -> String {
    use base64::Engine;
    use std::fmt::Write;
    let data_len = data.map_or(0, |(d, _)| d.len().div_ceil(3) * 4);
    let mut out = String::with_capacity(128 + version.len() + data_len);
    out.push_str(r#"{"messageType":"notification","channelID":""#);
    let _ = write!(out, "{}", channel_id.hyphenated());
    out.push_str(r#"","version":"#);
    // Message ids are base64url, but escape anyway: cheap for a short string.
    push_json_str(&mut out, version);
    if let Some((bytes, headers)) = data {
        out.push_str(r#","data":""#);
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode_string(bytes, &mut out);
        out.push_str(r#"","headers":"#);
        out.push_str(&serde_json::to_string(headers).expect("headers serialise"));
    }
    let _ = write!(out, r#","ttl":{ttl}}}"#);
    out
}

fn push_json_str(out: &mut String, s: &str) {
    if s.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        out.push('"');
        out.push_str(s);
        out.push('"');
    } else {
        out.push_str(&serde_json::to_string(s).expect("a string serialises"));
    }
}

/// The server's answer to a ping.
pub const PING_REPLY: &str = "{}";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_firefox_sends() {
        assert_eq!(
            ClientMessage::parse(r#"{"messageType":"hello","broadcasts":{},"use_webpush":true}"#),
            Ok(ClientMessage::Hello {
                uaid: None,
                channel_ids: vec![],
                broadcasts: BTreeMap::new(),
            })
        );
        assert_eq!(
            ClientMessage::parse(
                r#"{"messageType":"hello","uaid":"0123456789abcdef0123456789abcdef","channelIDs":["a","b"],"broadcasts":{"remote-settings/monitor_changes":"\"0\""},"use_webpush":true}"#
            ),
            Ok(ClientMessage::Hello {
                uaid: Some("0123456789abcdef0123456789abcdef".into()),
                channel_ids: vec!["a".into(), "b".into()],
                broadcasts: BTreeMap::from([(
                    "remote-settings/monitor_changes".to_string(),
                    "\"0\"".to_string()
                )]),
            })
        );
        assert_eq!(
            ClientMessage::parse(r#"{"channelID":"c","messageType":"register","key":"BAAA=="}"#),
            Ok(ClientMessage::Register {
                channel_id: "c".into(),
                key: Some("BAAA==".into())
            })
        );
        assert_eq!(
            ClientMessage::parse(r#"{"channelID":"c","messageType":"unregister","code":200}"#),
            Ok(ClientMessage::Unregister {
                channel_id: "c".into(),
                code: Some(200)
            })
        );
        assert_eq!(
            ClientMessage::parse(
                r#"{"messageType":"broadcast_subscribe","broadcasts":{"remote-settings/monitor_changes":"\"0\""}}"#
            ),
            Ok(ClientMessage::BroadcastSubscribe {
                broadcasts: BTreeMap::from([(
                    "remote-settings/monitor_changes".to_string(),
                    "\"0\"".to_string()
                )]),
            })
        );
        // A version that is not a string names nothing comparable.
        assert_eq!(
            ClientMessage::parse(
                r#"{"messageType":"broadcast_subscribe","broadcasts":{"a":1,"b":"2"}}"#
            ),
            Ok(ClientMessage::BroadcastSubscribe {
                broadcasts: BTreeMap::from([("b".to_string(), "2".to_string())]),
            })
        );
        assert_eq!(
            ClientMessage::parse(
                r#"{"messageType":"ack","updates":[{"channelID":"c","version":"v","code":100}]}"#
            ),
            Ok(ClientMessage::Ack {
                updates: vec![AckUpdate {
                    channel_id: "c".into(),
                    version: "v".into(),
                    code: Some(100)
                }]
            })
        );
        assert_eq!(
            ClientMessage::parse(r#"{"messageType":"nack","version":"v","code":302}"#),
            Ok(ClientMessage::Nack {
                version: "v".into(),
                code: Some(302)
            })
        );
        assert_eq!(ClientMessage::parse("{}"), Ok(ClientMessage::Ping));
        assert_eq!(
            ClientMessage::parse(r#"{"messageType":"ping"}"#),
            Ok(ClientMessage::Ping)
        );
        assert_eq!(
            ClientMessage::parse(r#"{"messageType":"urgency","min":"high"}"#),
            Ok(ClientMessage::Urgency { min: Urgency::High })
        );
    }

    #[test]
    fn empty_uaid_and_key_mean_absent() {
        assert_eq!(
            ClientMessage::parse(r#"{"messageType":"hello","uaid":""}"#),
            Ok(ClientMessage::Hello {
                uaid: None,
                channel_ids: vec![],
                broadcasts: BTreeMap::new(),
            })
        );
        assert_eq!(
            ClientMessage::parse(r#"{"messageType":"register","channelID":"c","key":""}"#),
            Ok(ClientMessage::Register {
                channel_id: "c".into(),
                key: None
            })
        );
    }

    #[test]
    fn rejects_garbage_with_a_reason() {
        for bad in [
            "garbage",
            "[]",
            r#"{"messageType":"launch"}"#,
            r#"{"messageType":"register"}"#,
            r#"{"messageType":"urgency","min":"whenever"}"#,
            r#"{"no":"type"}"#,
        ] {
            let err = ClientMessage::parse(bad).unwrap_err();
            assert!(!err.0.is_empty(), "{bad}");
        }
    }

    #[test]
    fn the_hand_written_notification_is_what_serde_would_write() {
        let channel = uuid::Uuid::new_v4();
        let data: Vec<u8> = (0..=255u8).cycle().take(3001).collect();
        for headers in [
            NotificationHeaders {
                encoding: "aes128gcm".into(),
                encryption: None,
                crypto_key: None,
            },
            NotificationHeaders {
                encoding: "aesgcm".into(),
                encryption: Some("salt=\"quoted\"".into()),
                crypto_key: Some("dh=abc".into()),
            },
        ] {
            for version in ["gAAAAABh-_x", "needs \"escaping\""] {
                let serde = ServerMessage::Notification {
                    channel_id: channel.to_string(),
                    version: version.into(),
                    data: Some(crate::webpush::encode_b64url(&data)),
                    headers: Some(&headers),
                    ttl: 60,
                }
                .to_json();
                let ours = notification_json(&channel, version, Some((&data, &headers)), 60);
                assert_eq!(ours, serde);
            }
        }
        let bare = ServerMessage::Notification {
            channel_id: channel.to_string(),
            version: "v".into(),
            data: None,
            headers: None,
            ttl: 0,
        }
        .to_json();
        assert_eq!(notification_json(&channel, "v", None, 0), bare);
    }

    #[test]
    fn renders_server_messages_as_firefox_expects() {
        let hello = ServerMessage::Hello {
            uaid: "u".into(),
            status: 200,
            use_webpush: true,
            broadcasts: BroadcastDelta::default(),
        }
        .to_json();
        assert_eq!(
            hello,
            r#"{"messageType":"hello","uaid":"u","status":200,"use_webpush":true,"broadcasts":{}}"#
        );
        let delta = BroadcastDelta {
            changed: BTreeMap::from([("a".to_string(), "v2".to_string())]),
            errors: BTreeMap::from([("x".to_string(), "Broadcast not found".to_string())]),
        };
        assert_eq!(
            ServerMessage::Broadcast { broadcasts: delta }.to_json(),
            r#"{"messageType":"broadcast","broadcasts":{"a":"v2","errors":{"x":"Broadcast not found"}}}"#
        );
        let headers = NotificationHeaders {
            encoding: "aes128gcm".into(),
            encryption: None,
            crypto_key: None,
        };
        let n = ServerMessage::Notification {
            channel_id: "c".into(),
            version: "v".into(),
            data: Some("AAA".into()),
            headers: Some(&headers),
            ttl: 60,
        }
        .to_json();
        assert_eq!(
            n,
            r#"{"messageType":"notification","channelID":"c","version":"v","data":"AAA","headers":{"encoding":"aes128gcm"},"ttl":60}"#
        );
        let bare = ServerMessage::Notification {
            channel_id: "c".into(),
            version: "v".into(),
            data: None,
            headers: None,
            ttl: 0,
        }
        .to_json();
        assert_eq!(
            bare,
            r#"{"messageType":"notification","channelID":"c","version":"v","ttl":0}"#
        );
        let reg = ServerMessage::Register {
            channel_id: "c",
            status: 400,
            push_endpoint: None,
        }
        .to_json();
        assert_eq!(
            reg,
            r#"{"messageType":"register","channelID":"c","status":400}"#
        );
    }
}
