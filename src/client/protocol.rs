//! The user agent's side of Mozilla's push websocket protocol
//! (proto-docs/websocket.md): the frames a user agent sends, shaped as
//! Firefox sends them, and the server's frames parsed leniently (unknown
//! fields and message types are ignored, as Firefox ignores them). Pure: no
//! I/O, so every shape is unit-tested here.

use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;

/// Ack codes Firefox uses (`PushServiceWebSocket.sys.mjs`).
pub const ACK_DELIVERED: u16 = 100;
/// The payload did not decrypt with the subscription's keys.
pub const ACK_DECRYPTION_ERROR: u16 = 101;
/// The message could not be delivered (here: no subscription knows its channel).
pub const ACK_NOT_DELIVERED: u16 = 102;

/// A ping, in both directions.
pub const PING: &str = "{}";

/// The first frame: `uaid` and `channelIDs` let the server resume the user
/// agent; `broadcasts` carries the versions it already has.
pub fn hello(
    uaid: Option<&str>,
    channel_ids: &[&str],
    broadcasts: &BTreeMap<String, String>,
) -> String {
    let mut msg = json!({
        "messageType": "hello",
        "use_webpush": true,
        "broadcasts": broadcasts,
    });
    if let Some(uaid) = uaid {
        msg["uaid"] = json!(uaid);
        msg["channelIDs"] = json!(channel_ids);
    }
    msg.to_string()
}

pub fn register(channel_id: &str, key: Option<&str>) -> String {
    let mut msg = json!({"messageType": "register", "channelID": channel_id});
    if let Some(key) = key {
        msg["key"] = json!(key);
    }
    msg.to_string()
}

pub fn unregister(channel_id: &str) -> String {
    json!({"messageType": "unregister", "channelID": channel_id, "code": 200}).to_string()
}

/// One ack per message, as Firefox sends them.
pub fn ack(channel_id: &str, version: &str, code: u16) -> String {
    json!({"messageType": "ack", "updates": [
        {"channelID": channel_id, "version": version, "code": code}
    ]})
    .to_string()
}

/// Broadcast ids to follow from now on, with the versions already known.
pub fn broadcast_subscribe(broadcasts: &BTreeMap<String, String>) -> String {
    json!({"messageType": "broadcast_subscribe", "broadcasts": broadcasts}).to_string()
}

/// The encryption headers a notification carries with its payload.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct NotificationHeaders {
    #[serde(default)]
    pub encoding: Option<String>,
    #[serde(default)]
    pub encryption: Option<String>,
    #[serde(default)]
    pub crypto_key: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Notification {
    #[serde(rename = "channelID")]
    pub channel_id: String,
    pub version: String,
    /// The encrypted body, base64url; absent for a push without payload.
    #[serde(default)]
    pub data: Option<String>,
    #[serde(default)]
    pub headers: Option<NotificationHeaders>,
    #[serde(default)]
    pub ttl: Option<u64>,
}

/// Broadcast versions the server announced, and the ids it refused.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Broadcasts {
    pub changed: BTreeMap<String, String>,
    pub errors: BTreeMap<String, String>,
}

impl Broadcasts {
    pub fn is_empty(&self) -> bool {
        self.changed.is_empty() && self.errors.is_empty()
    }

    /// `{"id": "version", ..., "errors": {"id": "why"}}`, as autopush and
    /// Herald send it. Values that are not strings carry nothing usable.
    fn from_value(value: Option<&Value>) -> Broadcasts {
        let mut out = Broadcasts::default();
        let Some(map) = value.and_then(Value::as_object) else {
            return out;
        };
        for (id, v) in map {
            match (id.as_str(), v) {
                ("errors", Value::Object(errors)) => {
                    out.errors = strings(errors);
                }
                (_, Value::String(version)) => {
                    out.changed.insert(id.clone(), version.clone());
                }
                _ => {}
            }
        }
        out
    }
}

fn strings(map: &Map<String, Value>) -> BTreeMap<String, String> {
    map.iter()
        .map(|(k, v)| {
            let text = v
                .as_str()
                .map(str::to_owned)
                .unwrap_or_else(|| v.to_string());
            (k.clone(), text)
        })
        .collect()
}

/// A frame from the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerMessage {
    Hello {
        uaid: String,
        status: u16,
        broadcasts: Broadcasts,
    },
    Register {
        channel_id: String,
        status: u16,
        push_endpoint: Option<String>,
    },
    Unregister {
        channel_id: String,
        status: u16,
    },
    Notification(Notification),
    Broadcast(Broadcasts),
    /// `{}` or `{"messageType":"ping"}`.
    Ping,
    /// A message type this client does not know; ignored.
    Other(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtocolError(pub String);

impl std::fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ProtocolError {}

impl ServerMessage {
    pub fn parse(text: &str) -> Result<ServerMessage, ProtocolError> {
        let value: Value = serde_json::from_str(text.trim())
            .map_err(|e| ProtocolError(format!("server sent invalid JSON: {e}")))?;
        let Value::Object(obj) = &value else {
            return Err(ProtocolError(
                "server sent JSON that is not an object".into(),
            ));
        };
        let Some(kind) = obj.get("messageType") else {
            return if obj.is_empty() {
                Ok(ServerMessage::Ping)
            } else {
                Ok(ServerMessage::Other(String::new()))
            };
        };
        let kind = kind
            .as_str()
            .ok_or_else(|| ProtocolError("messageType is not a string".into()))?;
        let field = |name: &str| obj.get(name);
        let string = |name: &str| -> Result<String, ProtocolError> {
            field(name)
                .and_then(Value::as_str)
                .map(str::to_owned)
                .ok_or_else(|| ProtocolError(format!("{kind} without a string {name}")))
        };
        let status = || -> Result<u16, ProtocolError> {
            field("status")
                .and_then(Value::as_u64)
                .and_then(|s| u16::try_from(s).ok())
                .ok_or_else(|| ProtocolError(format!("{kind} without a numeric status")))
        };
        Ok(match kind {
            "hello" => {
                let status = status()?;
                ServerMessage::Hello {
                    // A refusal may come without a uaid.
                    uaid: string("uaid").or_else(|e| {
                        if status == 200 {
                            Err(e)
                        } else {
                            Ok(String::new())
                        }
                    })?,
                    status,
                    broadcasts: Broadcasts::from_value(field("broadcasts")),
                }
            }
            "register" => ServerMessage::Register {
                channel_id: string("channelID")?,
                status: status()?,
                push_endpoint: field("pushEndpoint")
                    .and_then(Value::as_str)
                    .map(str::to_owned),
            },
            "unregister" => ServerMessage::Unregister {
                channel_id: string("channelID")?,
                status: status()?,
            },
            "notification" => ServerMessage::Notification(
                serde_json::from_value(value.clone())
                    .map_err(|e| ProtocolError(format!("malformed notification: {e}")))?,
            ),
            "broadcast" => ServerMessage::Broadcast(Broadcasts::from_value(field("broadcasts"))),
            "ping" => ServerMessage::Ping,
            other => ServerMessage::Other(other.to_owned()),
        })
    }
}

/// What a register status other than 200 means (proto-docs/websocket.md).
pub fn register_refusal(status: u16) -> String {
    let why = match status {
        400 => "the channel ID or application server key was refused as malformed",
        409 => "the channel is already registered with a different key",
        429 => "this user agent already has as many subscriptions as the server allows",
        500 => "the server could not store the subscription; try again",
        _ => "unexpected status",
    };
    format!("the push service refused the subscription with status {status}: {why}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(text: &str) -> Value {
        serde_json::from_str(text).unwrap()
    }

    #[test]
    fn frames_are_shaped_as_firefox_sends_them() {
        assert_eq!(
            value(&hello(None, &[], &BTreeMap::new())),
            json!({"messageType": "hello", "use_webpush": true, "broadcasts": {}})
        );
        let b = BTreeMap::from([("a/b".to_string(), "\"0\"".to_string())]);
        assert_eq!(
            value(&hello(Some("u1"), &["c1", "c2"], &b)),
            json!({"messageType": "hello", "use_webpush": true, "uaid": "u1",
                   "channelIDs": ["c1", "c2"], "broadcasts": {"a/b": "\"0\""}})
        );
        assert_eq!(
            value(&register("c", Some("BKEY"))),
            json!({"messageType": "register", "channelID": "c", "key": "BKEY"})
        );
        assert_eq!(
            value(&register("c", None)),
            json!({"messageType": "register", "channelID": "c"})
        );
        assert_eq!(
            value(&unregister("c")),
            json!({"messageType": "unregister", "channelID": "c", "code": 200})
        );
        assert_eq!(
            value(&ack("c", "v", ACK_DECRYPTION_ERROR)),
            json!({"messageType": "ack", "updates": [{"channelID": "c", "version": "v", "code": 101}]})
        );
        assert_eq!(
            value(&broadcast_subscribe(&b)),
            json!({"messageType": "broadcast_subscribe", "broadcasts": {"a/b": "\"0\""}})
        );
    }

    #[test]
    fn parses_server_frames() {
        assert_eq!(
            ServerMessage::parse(
                r#"{"messageType":"hello","uaid":"abc","status":200,"use_webpush":true,"broadcasts":{}}"#
            ),
            Ok(ServerMessage::Hello {
                uaid: "abc".into(),
                status: 200,
                broadcasts: Broadcasts::default()
            })
        );
        assert_eq!(
            ServerMessage::parse(r#"{"messageType":"hello","status":503}"#),
            Ok(ServerMessage::Hello {
                uaid: String::new(),
                status: 503,
                broadcasts: Broadcasts::default()
            })
        );
        assert_eq!(
            ServerMessage::parse(
                r#"{"messageType":"register","channelID":"c","status":200,"pushEndpoint":"http://h/wpush/v1/t"}"#
            ),
            Ok(ServerMessage::Register {
                channel_id: "c".into(),
                status: 200,
                push_endpoint: Some("http://h/wpush/v1/t".into())
            })
        );
        assert_eq!(
            ServerMessage::parse(r#"{"messageType":"register","channelID":"c","status":409}"#),
            Ok(ServerMessage::Register {
                channel_id: "c".into(),
                status: 409,
                push_endpoint: None
            })
        );
        assert_eq!(
            ServerMessage::parse(r#"{"messageType":"unregister","channelID":"c","status":200}"#),
            Ok(ServerMessage::Unregister {
                channel_id: "c".into(),
                status: 200
            })
        );
        assert_eq!(ServerMessage::parse("{}"), Ok(ServerMessage::Ping));
        assert_eq!(
            ServerMessage::parse(r#"{"messageType":"urgency","status":200}"#),
            Ok(ServerMessage::Other("urgency".into()))
        );
        for bad in [
            "",
            "[]",
            "nope",
            r#"{"messageType":5}"#,
            r#"{"messageType":"register"}"#,
        ] {
            assert!(ServerMessage::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn parses_notifications_with_and_without_payload() {
        let n = ServerMessage::parse(
            r#"{"messageType":"notification","channelID":"c","version":"v","data":"AAAA","headers":{"encoding":"aesgcm","encryption":"salt=x","crypto_key":"dh=y"},"ttl":60,"extra":1}"#,
        )
        .unwrap();
        assert_eq!(
            n,
            ServerMessage::Notification(Notification {
                channel_id: "c".into(),
                version: "v".into(),
                data: Some("AAAA".into()),
                headers: Some(NotificationHeaders {
                    encoding: Some("aesgcm".into()),
                    encryption: Some("salt=x".into()),
                    crypto_key: Some("dh=y".into()),
                }),
                ttl: Some(60),
            })
        );
        let bare =
            ServerMessage::parse(r#"{"messageType":"notification","channelID":"c","version":"v"}"#)
                .unwrap();
        let ServerMessage::Notification(bare) = bare else {
            panic!("not a notification")
        };
        assert_eq!((bare.data, bare.headers, bare.ttl), (None, None, None));
        assert!(ServerMessage::parse(r#"{"messageType":"notification","version":"v"}"#).is_err());
    }

    #[test]
    fn parses_broadcasts_and_their_errors() {
        let b = ServerMessage::parse(
            r#"{"messageType":"broadcast","broadcasts":{"a":"v2","n":5,"errors":{"x":"Broadcast not found"}}}"#,
        )
        .unwrap();
        assert_eq!(
            b,
            ServerMessage::Broadcast(Broadcasts {
                changed: BTreeMap::from([("a".into(), "v2".into())]),
                errors: BTreeMap::from([("x".into(), "Broadcast not found".into())]),
            })
        );
        let ServerMessage::Hello { broadcasts, .. } = ServerMessage::parse(
            r#"{"messageType":"hello","uaid":"u","status":200,"broadcasts":{"a":"v1"}}"#,
        )
        .unwrap() else {
            panic!("not hello")
        };
        assert_eq!(broadcasts.changed["a"], "v1");
        assert!(!broadcasts.is_empty());
    }

    #[test]
    fn register_refusals_are_explained() {
        assert!(register_refusal(409).contains("different key"));
        assert!(register_refusal(429).contains("409") || register_refusal(429).contains("429"));
        assert!(register_refusal(418).contains("unexpected"));
    }
}
