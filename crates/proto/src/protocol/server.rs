//! The user agent's side of Mozilla's push websocket protocol
//! (proto-docs/websocket.md): the frames a user agent sends, shaped as
//! Firefox sends them, and the server's frames parsed leniently (unknown
//! fields and message types are ignored, as Firefox ignores them). Pure: no
//! I/O, so every shape is unit-tested here.

use crate::headers::NotificationHeaders;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeMap;

/// A ping, in both directions: the classic empty object.
pub const PING: &str = "{}";

/// One push message for the user agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notification {
    #[serde(rename = "channelID")]
    pub channel_id: String,
    pub version: String,
    /// The encrypted body, base64url; absent for a push without payload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headers: Option<NotificationHeaders>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<u64>,
}

/// Broadcast versions sent to a user agent: the ids whose version differs
/// from what it has, and under `errors` the ids the server does not know.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Broadcasts {
    #[serde(flatten)]
    pub changed: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
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

/// A frame from the server. The server writes it with `to_json`; a client
/// reads it with `parse`, leniently: unknown fields and message types are
/// ignored, as Firefox ignores them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "messageType", rename_all = "snake_case")]
pub enum ServerMessage {
    Hello {
        /// Empty in a refusal, which may come without one.
        uaid: String,
        status: u16,
        use_webpush: bool,
        broadcasts: Broadcasts,
    },
    Broadcast {
        broadcasts: Broadcasts,
    },
    Register {
        #[serde(rename = "channelID")]
        channel_id: String,
        status: u16,
        #[serde(rename = "pushEndpoint", skip_serializing_if = "Option::is_none")]
        push_endpoint: Option<String>,
    },
    Unregister {
        #[serde(rename = "channelID")]
        channel_id: String,
        status: u16,
    },
    Notification(Notification),
    /// The answer to the `urgency` extension.
    Urgency {
        status: u16,
    },
    /// `{}` or `{"messageType":"ping"}`.
    #[serde(skip)]
    Ping,
    /// A message type this side does not know: read, never written.
    #[serde(skip)]
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
    /// The frame's text. `Ping` is the classic `{}`; `Other` names a type
    /// this side does not know, so it is written as that type alone.
    pub fn to_json(&self) -> String {
        match self {
            ServerMessage::Ping => PING.to_string(),
            ServerMessage::Other(kind) => serde_json::json!({ "messageType": kind }).to_string(),
            // Serialising these plain structs cannot fail.
            _ => serde_json::to_string(self).expect("server message serialises"),
        }
    }

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
                    use_webpush: field("use_webpush").and_then(Value::as_bool) == Some(true),
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
            "broadcast" => ServerMessage::Broadcast {
                broadcasts: Broadcasts::from_value(field("broadcasts")),
            },
            // An extension a client may not have asked for: never fatal.
            "urgency" => match status() {
                Ok(status) => ServerMessage::Urgency { status },
                Err(_) => ServerMessage::Other(kind.to_owned()),
            },
            "ping" => ServerMessage::Ping,
            other => ServerMessage::Other(other.to_owned()),
        })
    }
}

/// A notification frame, written by hand: it is the one message sent for
/// every push, and its bulk (the payload, base64url) and its id never need
/// JSON escaping, so the payload is encoded straight into the frame instead
/// of into a string serde would then scan character by character. Gives
/// exactly what `ServerMessage::Notification(..).to_json()` would.
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

/// The `hello` status of a user agent that a private push service
/// (`user_agent_tokens`) does not admit: no `token`, or a wrong one. The
/// connection is then closed with [`CLOSE_NO_RECONNECT`]; trying again
/// with the same token cannot help.
pub const HELLO_TOKEN_REFUSED: u16 = 401;

/// The `register` status of a subscription without an application server
/// key where the service requires one (`require_vapid_key`).
pub const REGISTER_KEY_REQUIRED: u16 = 401;

/// The close code that tells a user agent not to reconnect by itself: the
/// one Firefox already honours (`kBACKOFF_WS_STATUS_CODE` in its
/// PushServiceWebSocket), in the 4000-4999 range RFC 6455 leaves to
/// applications.
pub const CLOSE_NO_RECONNECT: u16 = 4774;

/// What a hello status other than 200 means, and whether retrying can help.
pub fn hello_refusal(status: u16) -> (String, bool) {
    if status == HELLO_TOKEN_REFUSED {
        return (
            format!(
                "the push service refused hello with status {status}: it serves only user agents \
                 with a token (user_agent_tokens), and this client sent none or a wrong one"
            ),
            false,
        );
    }
    (
        format!("the push service refused hello with status {status}"),
        true,
    )
}

/// What a register status other than 200 means (proto-docs/websocket.md).
pub fn register_refusal(status: u16) -> String {
    let why = match status {
        400 => "the channel ID or application server key was refused as malformed",
        REGISTER_KEY_REQUIRED => {
            "this push service requires an application server key (VAPID) for every subscription"
        }
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
    use crate::b64::encode_b64url;

    #[test]
    fn parses_server_frames() {
        assert_eq!(
            ServerMessage::parse(
                r#"{"messageType":"hello","uaid":"abc","status":200,"use_webpush":true,"broadcasts":{}}"#
            ),
            Ok(ServerMessage::Hello {
                uaid: "abc".into(),
                status: 200,
                use_webpush: true,
                broadcasts: Broadcasts::default()
            })
        );
        assert_eq!(
            ServerMessage::parse(r#"{"messageType":"hello","status":503}"#),
            Ok(ServerMessage::Hello {
                uaid: String::new(),
                status: 503,
                use_webpush: false,
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
            Ok(ServerMessage::Urgency { status: 200 })
        );
        assert_eq!(
            ServerMessage::parse(r#"{"messageType":"urgency"}"#),
            Ok(ServerMessage::Other("urgency".into()))
        );
        assert_eq!(
            ServerMessage::parse(r#"{"messageType":"subscribe","x":1}"#),
            Ok(ServerMessage::Other("subscribe".into()))
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
                    encoding: "aesgcm".into(),
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
            ServerMessage::Broadcast {
                broadcasts: Broadcasts {
                    changed: BTreeMap::from([("a".into(), "v2".into())]),
                    errors: BTreeMap::from([("x".into(), "Broadcast not found".into())]),
                }
            }
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
        assert!(register_refusal(401).contains("application server key"));
        let (why, retry) = hello_refusal(401);
        assert!(why.contains("token") && !retry, "{why}");
        assert!(hello_refusal(503).1);
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
                let serde = ServerMessage::Notification(Notification {
                    channel_id: channel.to_string(),
                    version: version.into(),
                    data: Some(encode_b64url(&data)),
                    headers: Some(headers.clone()),
                    ttl: Some(60),
                })
                .to_json();
                let ours = notification_json(&channel, version, Some((&data, &headers)), 60);
                assert_eq!(ours, serde);
            }
        }
        let bare = ServerMessage::Notification(Notification {
            channel_id: channel.to_string(),
            version: "v".into(),
            data: None,
            headers: None,
            ttl: Some(0),
        })
        .to_json();
        assert_eq!(notification_json(&channel, "v", None, 0), bare);
    }

    #[test]
    fn renders_server_messages_as_firefox_expects() {
        let hello = ServerMessage::Hello {
            uaid: "u".into(),
            status: 200,
            use_webpush: true,
            broadcasts: Broadcasts::default(),
        }
        .to_json();
        assert_eq!(
            hello,
            r#"{"messageType":"hello","uaid":"u","status":200,"use_webpush":true,"broadcasts":{}}"#
        );
        let delta = Broadcasts {
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
        let n = ServerMessage::Notification(Notification {
            channel_id: "c".into(),
            version: "v".into(),
            data: Some("AAA".into()),
            headers: Some(headers.clone()),
            ttl: Some(60),
        })
        .to_json();
        assert_eq!(
            n,
            r#"{"messageType":"notification","channelID":"c","version":"v","data":"AAA","headers":{"encoding":"aes128gcm"},"ttl":60}"#
        );
        let bare = ServerMessage::Notification(Notification {
            channel_id: "c".into(),
            version: "v".into(),
            data: None,
            headers: None,
            ttl: Some(0),
        })
        .to_json();
        assert_eq!(
            bare,
            r#"{"messageType":"notification","channelID":"c","version":"v","ttl":0}"#
        );
        let reg = ServerMessage::Register {
            channel_id: "c".into(),
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
