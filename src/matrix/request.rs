//! The body of `POST /_matrix/push/v1/notify` (Matrix Push Gateway API,
//! "notify"): pure parsing, no I/O. Everything is checked before any
//! device is pushed, so a malformed request delivers nothing.

use serde_json::{Map, Value};

/// At most this many devices in one request. Synapse sends one per request
/// (each pusher on its own); the bound keeps one request from turning into
/// thousands of stored messages.
pub const MAX_DEVICES: usize = 100;

/// The notification's `prio`: "high" unless it says "low" (the spec's
/// default is high, and a value it does not list is read as the default
/// rather than refused, so a future priority does not lose notifications).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prio {
    High,
    Low,
}

/// A parsed notify request.
#[derive(Debug, Clone, PartialEq)]
pub struct Notify {
    /// The `notification` object as the homeserver sent it, without
    /// `devices` (which names the receivers, not the event).
    pub notification: Map<String, Value>,
    /// Each device's `pushkey`, in order, duplicates removed.
    pub pushkeys: Vec<String>,
    pub prio: Prio,
}

impl Notify {
    /// A notification about no event, only the unread counts (the spec
    /// allows omitting `event_id` for those): a newer one supersedes it.
    pub fn counts_only(&self) -> bool {
        !self.notification.contains_key("event_id")
    }
}

/// Why a body is not a notify request; the text goes to the homeserver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Malformed(pub String);

fn malformed(msg: impl Into<String>) -> Malformed {
    Malformed(msg.into())
}

pub fn parse(body: &[u8]) -> Result<Notify, Malformed> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| malformed(format!("the body is not JSON: {e}")))?;
    let Value::Object(mut root) = value else {
        return Err(malformed("the body must be a JSON object"));
    };
    let mut notification = match root.remove("notification") {
        Some(Value::Object(n)) => n,
        Some(_) => return Err(malformed("`notification` must be an object")),
        None => return Err(malformed("no `notification` object")),
    };
    let devices = match notification.remove("devices") {
        Some(Value::Array(d)) => d,
        Some(_) => return Err(malformed("`notification.devices` must be a list")),
        None => return Err(malformed("no `notification.devices` list")),
    };
    if devices.len() > MAX_DEVICES {
        return Err(malformed(format!(
            "{} devices in one notification; at most {MAX_DEVICES}",
            devices.len()
        )));
    }
    let mut pushkeys: Vec<String> = Vec::with_capacity(devices.len());
    for (i, device) in devices.iter().enumerate() {
        let key = match device.get("pushkey") {
            Some(Value::String(k)) if !k.is_empty() => k,
            Some(_) => {
                return Err(malformed(format!(
                    "`devices[{i}].pushkey` must be a non-empty string"
                )))
            }
            None => return Err(malformed(format!("`devices[{i}]` has no `pushkey`"))),
        };
        if !pushkeys.contains(key) {
            pushkeys.push(key.clone());
        }
    }
    let prio = match notification.get("prio") {
        Some(Value::String(p)) if p == "low" => Prio::Low,
        _ => Prio::High,
    };
    Ok(Notify {
        notification,
        pushkeys,
        prio,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The request example of the Matrix specification
    /// (data/api/push-gateway/push_notifier.yaml).
    fn spec_example() -> Value {
        json!({
          "notification": {
            "event_id": "$3957tyerfgewrf384",
            "room_id": "!slw48wfj34rtnrf:example.com",
            "type": "m.room.message",
            "sender": "@exampleuser:matrix.org",
            "sender_display_name": "Major Tom",
            "room_name": "Mission Control",
            "room_alias": "#exampleroom:matrix.org",
            "prio": "high",
            "content": {"msgtype": "m.text", "body": "I'm floating in a most peculiar way."},
            "counts": {"unread": 2, "missed_calls": 1},
            "devices": [{
              "app_id": "org.matrix.matrixConsole.ios",
              "pushkey": "V2h5IG9uIGVhcnRoIGRpZCB5b3UgZGVjb2RlIHRoaXM/",
              "pushkey_ts": 12345678,
              "data": {},
              "tweaks": {"sound": "bing"}
            }]
          }
        })
    }

    fn parse_value(v: &Value) -> Result<Notify, Malformed> {
        parse(v.to_string().as_bytes())
    }

    #[test]
    fn the_spec_example_parses_without_its_devices() {
        let n = parse_value(&spec_example()).unwrap();
        assert_eq!(n.pushkeys, ["V2h5IG9uIGVhcnRoIGRpZCB5b3UgZGVjb2RlIHRoaXM/"]);
        assert_eq!(n.prio, Prio::High);
        assert!(!n.notification.contains_key("devices"));
        assert_eq!(n.notification["sender_display_name"], "Major Tom");
        assert!(!n.counts_only());
    }

    #[test]
    fn prio_low_is_low_and_anything_else_is_high() {
        for (prio, want) in [
            (json!("low"), Prio::Low),
            (json!("high"), Prio::High),
            (json!("urgent"), Prio::High),
            (json!(3), Prio::High),
        ] {
            let mut v = spec_example();
            v["notification"]["prio"] = prio;
            assert_eq!(parse_value(&v).unwrap().prio, want);
        }
        let mut v = spec_example();
        v["notification"].as_object_mut().unwrap().remove("prio");
        assert_eq!(parse_value(&v).unwrap().prio, Prio::High);
    }

    #[test]
    fn a_counts_only_notification_has_no_event_id() {
        let v = json!({"notification": {"counts": {"unread": 1}, "devices": [{"app_id": "a", "pushkey": "k"}]}});
        assert!(parse_value(&v).unwrap().counts_only());
    }

    #[test]
    fn duplicate_pushkeys_are_pushed_once() {
        let v = json!({"notification": {"devices": [{"pushkey": "a"}, {"pushkey": "b"}, {"pushkey": "a"}]}});
        assert_eq!(parse_value(&v).unwrap().pushkeys, ["a", "b"]);
    }

    #[test]
    fn malformed_bodies_say_what_is_wrong() {
        let cases: Vec<(&[u8], &str)> = vec![
            (b"not json", "not JSON"),
            (b"[]", "JSON object"),
            (br#"{"devices": []}"#, "no `notification`"),
            (br#"{"notification": []}"#, "must be an object"),
            (br#"{"notification": {}}"#, "no `notification.devices`"),
            (br#"{"notification": {"devices": {}}}"#, "must be a list"),
            (
                br#"{"notification": {"devices": [{"app_id": "a"}]}}"#,
                "no `pushkey`",
            ),
            (
                br#"{"notification": {"devices": [{"pushkey": 1}]}}"#,
                "non-empty string",
            ),
            (
                br#"{"notification": {"devices": [{"pushkey": ""}]}}"#,
                "non-empty string",
            ),
            (br#"{"notification": {"devices": ["k"]}}"#, "no `pushkey`"),
        ];
        for (body, want) in cases {
            let Malformed(msg) = parse(body).unwrap_err();
            assert!(
                msg.contains(want),
                "{:?}: {msg}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn too_many_devices_are_refused() {
        let devices: Vec<Value> = (0..=MAX_DEVICES)
            .map(|i| json!({"pushkey": format!("k{i}")}))
            .collect();
        let v = json!({"notification": {"devices": devices}});
        assert!(parse_value(&v).unwrap_err().0.contains("at most"));
    }
}
