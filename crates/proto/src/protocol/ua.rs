//! What a user agent sends over the push websocket (Mozilla's push
//! protocol, as Firefox speaks it): parsed strictly, as the server must
//! (an unknown message type or a malformed known one is a `ParseError`),
//! and written as Firefox writes it, for clients and load generators.

use super::server::PING;
use crate::ack::AckCode;
use crate::urgency::Urgency;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A message from the user agent.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientMessage {
    Hello {
        uaid: Option<String>,
        channel_ids: Vec<String>,
        /// Broadcast id → the version the user agent has.
        broadcasts: BTreeMap<String, String>,
        /// Herald's extension: the token a private service
        /// (`user_agent_tokens`) admits user agents by. Firefox never
        /// sends it.
        token: Option<String>,
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
        code: Option<AckCode>,
    },
    /// Extension: the lowest urgency the user agent wants delivered now
    /// (`{"messageType":"urgency","min":"low"}`, as in autopush-rs).
    Urgency {
        min: Urgency,
    },
    Ping,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AckUpdate {
    #[serde(rename = "channelID", default)]
    pub channel_id: String,
    pub version: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<AckCode>,
}

/// Why a frame could not be understood; the text goes into the close frame.
#[derive(Debug, PartialEq)]
pub struct ParseError(pub String);

// The wire shape, in both directions. Unknown fields are ignored so
// clients can add their own (Firefox sends `use_webpush` and `broadcasts`
// in hello). Absent options are not written.
#[derive(Serialize, Deserialize)]
#[serde(tag = "messageType", rename_all = "snake_case")]
enum Wire {
    Hello {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        uaid: Option<String>,
        #[serde(
            rename = "channelIDs",
            default,
            skip_serializing_if = "Option::is_none"
        )]
        channel_ids: Option<Vec<String>>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        broadcasts: Option<BTreeMap<String, serde_json::Value>>,
        /// Written as Firefox writes it; never read, so any value passes.
        #[serde(default, skip_deserializing, skip_serializing_if = "Option::is_none")]
        use_webpush: Option<bool>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        token: Option<String>,
    },
    Register {
        #[serde(rename = "channelID")]
        channel_id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        key: Option<String>,
    },
    Unregister {
        #[serde(rename = "channelID")]
        channel_id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        code: Option<u32>,
    },
    BroadcastSubscribe {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        broadcasts: Option<BTreeMap<String, serde_json::Value>>,
    },
    Ack {
        updates: Vec<AckUpdate>,
    },
    Nack {
        version: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        code: Option<AckCode>,
    },
    Urgency {
        min: String,
    },
    Ping {},
}

fn version_values(map: &BTreeMap<String, String>) -> BTreeMap<String, serde_json::Value> {
    map.iter()
        .map(|(id, v)| (id.clone(), serde_json::Value::String(v.clone())))
        .collect()
}

impl ClientMessage {
    /// The frame as Firefox writes it: `hello` always says `use_webpush`
    /// and names its channels only with a `uaid` to resume; a ping is the
    /// classic `{}`.
    pub fn to_json(&self) -> String {
        let wire = match self {
            ClientMessage::Ping => return PING.to_string(),
            ClientMessage::Hello {
                uaid,
                channel_ids,
                broadcasts,
                token,
            } => Wire::Hello {
                uaid: uaid.clone(),
                channel_ids: uaid.as_ref().map(|_| channel_ids.clone()),
                broadcasts: Some(version_values(broadcasts)),
                use_webpush: Some(true),
                token: token.clone(),
            },
            ClientMessage::Register { channel_id, key } => Wire::Register {
                channel_id: channel_id.clone(),
                key: key.clone(),
            },
            ClientMessage::Unregister { channel_id, code } => Wire::Unregister {
                channel_id: channel_id.clone(),
                code: *code,
            },
            ClientMessage::BroadcastSubscribe { broadcasts } => Wire::BroadcastSubscribe {
                broadcasts: Some(version_values(broadcasts)),
            },
            ClientMessage::Ack { updates } => Wire::Ack {
                updates: updates.clone(),
            },
            ClientMessage::Nack { version, code } => Wire::Nack {
                version: version.clone(),
                code: *code,
            },
            ClientMessage::Urgency { min } => Wire::Urgency {
                min: min.as_str().to_string(),
            },
        };
        // Plain strings, numbers and maps: serialising cannot fail.
        serde_json::to_string(&wire).expect("client message serialises")
    }

    /// One ack for one notification, as Firefox sends them.
    pub fn ack(channel_id: &str, version: &str, code: AckCode) -> ClientMessage {
        ClientMessage::Ack {
            updates: vec![AckUpdate {
                channel_id: channel_id.to_string(),
                version: version.to_string(),
                code: Some(code),
            }],
        }
    }

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
                use_webpush: _,
                token,
            } => ClientMessage::Hello {
                // Firefox sends an empty string for "no uaid" in some versions.
                uaid: uaid.filter(|u| !u.is_empty()),
                channel_ids: channel_ids.unwrap_or_default(),
                broadcasts: versions(broadcasts),
                token: token.filter(|t| !t.is_empty()),
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
                token: None,
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
                token: None,
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
                    code: Some(AckCode(100))
                }]
            })
        );
        assert_eq!(
            ClientMessage::parse(r#"{"messageType":"nack","version":"v","code":302}"#),
            Ok(ClientMessage::Nack {
                version: "v".into(),
                code: Some(AckCode(302))
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
                token: None,
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
    fn hello_carries_the_private_mode_token_only_when_given() {
        let hello = |token: Option<&str>| ClientMessage::Hello {
            uaid: None,
            channel_ids: vec![],
            broadcasts: BTreeMap::new(),
            token: token.map(str::to_string),
        };
        assert_eq!(
            ClientMessage::parse(r#"{"messageType":"hello","token":"t0123456789abcdef"}"#),
            Ok(hello(Some("t0123456789abcdef")))
        );
        assert_eq!(
            ClientMessage::parse(r#"{"messageType":"hello","token":""}"#),
            Ok(hello(None))
        );
        // Firefox's hello has no token, and neither has one written without.
        assert!(!hello(None).to_json().contains("token"));
        assert!(hello(Some("t0123456789abcdef"))
            .to_json()
            .contains(r#""token":"t0123456789abcdef""#));
        // A token that is not a string is malformed, not ignored.
        assert!(ClientMessage::parse(r#"{"messageType":"hello","token":5}"#).is_err());
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
    fn value(text: &str) -> serde_json::Value {
        serde_json::from_str(text).unwrap()
    }

    #[test]
    fn frames_are_shaped_as_firefox_sends_them() {
        use serde_json::json;
        let hello = |uaid: Option<&str>, channels: &[&str], b: &BTreeMap<String, String>| {
            ClientMessage::Hello {
                uaid: uaid.map(str::to_string),
                channel_ids: channels.iter().map(|c| c.to_string()).collect(),
                broadcasts: b.clone(),
                token: None,
            }
            .to_json()
        };
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
        let register = |key: Option<&str>| {
            ClientMessage::Register {
                channel_id: "c".into(),
                key: key.map(str::to_string),
            }
            .to_json()
        };
        assert_eq!(
            value(&register(Some("BKEY"))),
            json!({"messageType": "register", "channelID": "c", "key": "BKEY"})
        );
        assert_eq!(
            value(&register(None)),
            json!({"messageType": "register", "channelID": "c"})
        );
        let unregister = ClientMessage::Unregister {
            channel_id: "c".into(),
            code: Some(200),
        };
        assert_eq!(
            value(&unregister.to_json()),
            json!({"messageType": "unregister", "channelID": "c", "code": 200})
        );
        assert_eq!(
            value(&ClientMessage::ack("c", "v", AckCode::DECRYPTION_ERROR).to_json()),
            json!({"messageType": "ack", "updates": [{"channelID": "c", "version": "v", "code": 101}]})
        );
        let nack = ClientMessage::Nack {
            version: "v".into(),
            code: None,
        };
        assert_eq!(
            value(&nack.to_json()),
            json!({"messageType": "nack", "version": "v"})
        );
        assert_eq!(
            value(&ClientMessage::BroadcastSubscribe { broadcasts: b }.to_json()),
            json!({"messageType": "broadcast_subscribe", "broadcasts": {"a/b": "\"0\""}})
        );
        assert_eq!(
            value(
                &ClientMessage::Urgency {
                    min: Urgency::VeryLow
                }
                .to_json()
            ),
            json!({"messageType": "urgency", "min": "very-low"})
        );
        assert_eq!(ClientMessage::Ping.to_json(), "{}");
    }

    #[test]
    fn what_is_written_parses_back_the_same() {
        let all = [
            ClientMessage::Hello {
                uaid: Some("0123456789abcdef0123456789abcdef".into()),
                channel_ids: vec!["a".into()],
                broadcasts: BTreeMap::from([("x".to_string(), "1".to_string())]),
                token: Some("a-user-agent-token".into()),
            },
            ClientMessage::Register {
                channel_id: "c".into(),
                key: Some("BKEY".into()),
            },
            ClientMessage::Unregister {
                channel_id: "c".into(),
                code: None,
            },
            ClientMessage::ack("c", "v", AckCode(-3)),
            ClientMessage::Nack {
                version: "v".into(),
                code: Some(AckCode(302)),
            },
            ClientMessage::Urgency { min: Urgency::High },
            ClientMessage::Ping,
        ];
        for m in all {
            assert_eq!(ClientMessage::parse(&m.to_json()), Ok(m));
        }
    }
}
