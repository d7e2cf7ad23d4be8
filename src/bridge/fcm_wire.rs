//! FCM HTTP v1's wire format, as pure code: the request body a message
//! becomes, the size rule it must meet, and what an answer means. The
//! bridge (`fcm`) does the I/O around it. Every mapping here is written up
//! for operators and client authors in proto-docs/bridges.md, section FCM.

use crate::bridge::{payload_fields, Delivery, CREDENTIALS_PAUSE};
use crate::store::Message;
use herald_proto::urgency::Urgency;
use serde::Deserialize;
use serde_json::{json, Value};
use std::time::Duration;

/// FCM's limit for the `data` of a message sent to a token, counting keys
/// and values; measured, as autopush-rs does, as the data map's JSON.
pub const MAX_DATA_BYTES: usize = 4096;

/// FCM refuses a `ttl` above four weeks (400 INVALID_ARGUMENT).
pub const MAX_TTL_SECS: u64 = 2_419_200;

/// FCM asks for at least a minute's pause after QUOTA_EXCEEDED; a 429
/// without `Retry-After` waits that long.
pub const QUOTA_PAUSE: Duration = Duration::from_secs(60);

/// Bytes of the data map's JSON, the figure FCM's limit applies to.
pub fn data_len(message: &Message) -> usize {
    serde_json::to_vec(&payload_fields(message)).map_or(usize::MAX, |v| v.len())
}

/// Whether `message` stays within FCM's data limit once mapped.
pub fn fits(message: &Message) -> bool {
    data_len(message) <= MAX_DATA_BYTES
}

/// `android.collapse_key` for a Topic. FCM collapses per device, Herald's
/// topics replace per subscription: the channel id in front keeps two
/// subscriptions of one device that use the same topic from replacing
/// each other's messages at FCM.
pub fn collapse_key(message: &Message) -> Option<String> {
    message
        .topic
        .as_ref()
        .map(|t| format!("{}{t}", message.channel.simple()))
}

/// The body of `POST …/messages:send` for `message` to the device `token`,
/// with the TTL left at `now` (Unix seconds).
pub fn request_body(token: &str, message: &Message, now: u64) -> Vec<u8> {
    let ttl = message.expires_at.saturating_sub(now).min(MAX_TTL_SECS);
    let priority = if message.urgency == Urgency::High {
        "HIGH"
    } else {
        "NORMAL"
    };
    let mut android = json!({
        "ttl": format!("{ttl}s"),
        "priority": priority,
        "data": payload_fields(message),
    });
    if let Some(key) = collapse_key(message) {
        android["collapse_key"] = Value::String(key);
    }
    let body = json!({"message": {"token": token, "android": android}});
    serde_json::to_vec(&body).expect("a JSON value serialises")
}

/// FCM's error body: `{"error":{"code","message","status","details":[…]}}`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct FcmError {
    /// The canonical status, e.g. `NOT_FOUND`, `INVALID_ARGUMENT`.
    pub status: String,
    pub message: String,
    /// FCM's own codes from `details[].errorCode`, e.g. `UNREGISTERED`.
    pub error_codes: Vec<String>,
    /// `details[].fieldViolations[].field` of a `google.rpc.BadRequest`.
    pub bad_fields: Vec<String>,
}

#[derive(Deserialize)]
struct ErrorBody {
    error: ErrorInner,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct ErrorInner {
    message: String,
    status: String,
    details: Vec<Detail>,
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct Detail {
    error_code: Option<String>,
    field_violations: Vec<FieldViolation>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct FieldViolation {
    field: String,
}

/// Reads FCM's error JSON; an empty or foreign body reads as no detail.
pub fn parse_error(body: &[u8]) -> FcmError {
    let Ok(parsed) = serde_json::from_slice::<ErrorBody>(body) else {
        return FcmError::default();
    };
    let e = parsed.error;
    FcmError {
        status: e.status,
        message: e.message,
        error_codes: e
            .details
            .iter()
            .filter_map(|d| d.error_code.clone())
            .collect(),
        bad_fields: e
            .details
            .iter()
            .flat_map(|d| d.field_violations.iter().map(|v| v.field.clone()))
            .collect(),
    }
}

impl FcmError {
    fn has_code(&self, code: &str) -> bool {
        self.error_codes.iter().any(|c| c == code) || self.status == code
    }

    /// A 400 that blames the registration token rather than the message:
    /// FCM says so in its message ("The registration token is not a valid
    /// FCM registration token") or with a field violation on
    /// `message.token`.
    fn blames_token(&self) -> bool {
        self.bad_fields.iter().any(|f| f == "message.token")
            || self
                .message
                .to_ascii_lowercase()
                .contains("registration token")
    }

    fn describe(&self, status: u16) -> String {
        let code = self
            .error_codes
            .first()
            .map(String::as_str)
            .unwrap_or(&self.status);
        match (code.is_empty(), self.message.is_empty()) {
            (true, true) => format!("FCM answered {status}"),
            (true, false) => format!("FCM answered {status}: {}", self.message),
            (false, true) => format!("FCM answered {status} {code}"),
            (false, false) => format!("FCM answered {status} {code}: {}", self.message),
        }
    }
}

/// What one answer of `messages:send` means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Done(Delivery),
    /// 401: the access token was refused; get a new one and try again.
    Unauthorized(String),
}

/// Maps an answer to a delivery outcome (the failure table in
/// proto-docs/bridges.md). `retry_after` is the header's value, `now` Unix
/// seconds for reading it when it is a date.
pub fn classify(status: u16, retry_after: Option<&str>, body: &[u8], now: u64) -> Verdict {
    let err = parse_error(body);
    let reason = err.describe(status);
    let after = retry_after.and_then(|v| parse_retry_after(v, now));
    let delivery = match status {
        200..=299 => Delivery::Accepted,
        401 => return Verdict::Unauthorized(reason),
        404 => Delivery::Gone { reason },
        400 if err.blames_token() => Delivery::Gone { reason },
        403 if err.has_code("SENDER_ID_MISMATCH") => Delivery::Gone { reason },
        // PERMISSION_DENIED: the service account may not send for the
        // project; the operator's to mend, the message's to wait.
        403 => Delivery::Retry {
            after: Some(CREDENTIALS_PAUSE),
            reason,
        },
        429 => Delivery::Retry {
            after: Some(after.unwrap_or(QUOTA_PAUSE)),
            reason,
        },
        500..=599 => Delivery::Retry { after, reason },
        _ => Delivery::Rejected { reason },
    };
    Verdict::Done(delivery)
}

/// `Retry-After` (RFC 9110 §10.2.3): delay seconds or an HTTP date, as the
/// time still to wait from `now`. A date in the past means no wait.
pub fn parse_retry_after(value: &str, now: u64) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    parse_http_date(value).map(|at| Duration::from_secs(at.saturating_sub(now)))
}

/// An IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`), the one form RFC 9110
/// lets senders generate, as Unix seconds.
pub fn parse_http_date(s: &str) -> Option<u64> {
    let (_weekday, rest) = s.split_once(", ")?;
    let parts: Vec<&str> = rest.split(' ').collect();
    let [day, month, year, time, "GMT"] = parts[..] else {
        return None;
    };
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let month = MONTHS.iter().position(|m| *m == month)? as u64 + 1;
    let day: u64 = two_digits(day)?;
    let year: u64 = year.parse().ok().filter(|y| (1970..10000).contains(y))?;
    let hms: Vec<&str> = time.split(':').collect();
    let [h, m, sec] = hms[..] else {
        return None;
    };
    let (h, m, sec) = (two_digits(h)?, two_digits(m)?, two_digits(sec)?);
    if !(1..=31).contains(&day) || h > 23 || m > 59 || sec > 60 {
        return None;
    }
    Some(days_from_civil(year, month, day) * 86_400 + h * 3600 + m * 60 + sec)
}

fn two_digits(s: &str) -> Option<u64> {
    (s.len() == 2 && s.bytes().all(|b| b.is_ascii_digit()))
        .then(|| s.parse().ok())
        .flatten()
}

/// Days from 1970-01-01 to a date of the proleptic Gregorian calendar
/// (Howard Hinnant's algorithm), for years from 1970.
fn days_from_civil(year: u64, month: u64, day: u64) -> u64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y / 400;
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use herald_proto::headers::NotificationHeaders;

    fn message(body_len: usize, encoding: Option<&str>) -> Message {
        Message {
            seq: 1,
            channel: "5b7f2ab1-0c4e-4c39-9a0e-3f7b2a9c1d11".parse().unwrap(),
            expires_at: 1_000_100,
            ttl: 300,
            urgency: Urgency::Normal,
            topic: None,
            headers: encoding.map(|e| NotificationHeaders {
                encoding: e.into(),
                encryption: None,
                crypto_key: None,
            }),
            data: Bytes::from(vec![0xfbu8; body_len]),
            receipt: false,
        }
    }

    #[test]
    fn aes128gcm_bodies_fit_up_to_3015_bytes() {
        // 75 bytes of JSON around the base64 of the body: 3015 bytes make
        // 4020 characters, 4095 in all; one byte more makes 4097.
        assert_eq!(data_len(&message(3015, Some("aes128gcm"))), 4095);
        assert!(fits(&message(3015, Some("aes128gcm"))));
        assert_eq!(data_len(&message(3016, Some("aes128gcm"))), 4097);
        assert!(!fits(&message(3016, Some("aes128gcm"))));
    }

    #[test]
    fn aesgcm_headers_count_against_the_limit() {
        let mut m = message(2950, Some("aesgcm"));
        assert!(fits(&m));
        let h = m.headers.as_mut().unwrap();
        h.encryption = Some(format!("salt={}", "s".repeat(22)));
        h.crypto_key = Some(format!("dh={}", "k".repeat(87)));
        let len = data_len(&m);
        // 4006 bytes without the headers; `,"enc":"…"` adds 36 and
        // `,"cryptokey":"…"` 105.
        assert_eq!(data_len(&message(2950, Some("aesgcm"))), 4006);
        assert_eq!(len, 4006 + 36 + 105);
        assert!(!fits(&m));
    }

    #[test]
    fn the_data_map_is_what_firefox_for_android_decodes() {
        let mut m = message(3, Some("aesgcm"));
        let h = m.headers.as_mut().unwrap();
        h.encryption = Some("salt=abc".into());
        h.crypto_key = Some("dh=def".into());
        let map = payload_fields(&m);
        assert_eq!(map["chid"], "5b7f2ab1-0c4e-4c39-9a0e-3f7b2a9c1d11");
        assert_eq!(map["body"], "-_v7");
        assert_eq!(map["con"], "aesgcm");
        assert_eq!(map["enc"], "salt=abc");
        assert_eq!(map["cryptokey"], "dh=def");
        let bare = payload_fields(&message(0, None));
        assert_eq!(bare.keys().copied().collect::<Vec<_>>(), ["chid"]);
    }

    #[test]
    fn the_body_carries_remaining_ttl_priority_and_collapse_key() {
        let mut m = message(1, Some("aes128gcm"));
        m.urgency = Urgency::High;
        m.topic = Some("news".into());
        let v: Value = serde_json::from_slice(&request_body("tok", &m, 1_000_040)).unwrap();
        let a = &v["message"]["android"];
        assert_eq!(v["message"]["token"], "tok");
        assert_eq!(a["ttl"], "60s");
        assert_eq!(a["priority"], "HIGH");
        assert_eq!(a["collapse_key"], "5b7f2ab10c4e4c399a0e3f7b2a9c1d11news");
        for u in [Urgency::Normal, Urgency::Low, Urgency::VeryLow] {
            m.urgency = u;
            m.topic = None;
            let v: Value = serde_json::from_slice(&request_body("t", &m, 2_000_000)).unwrap();
            let a = &v["message"]["android"];
            assert_eq!(a["priority"], "NORMAL");
            assert_eq!(a["ttl"], "0s", "an expired message has no time left");
            assert!(a.get("collapse_key").is_none());
        }
        m.expires_at = u64::MAX;
        let v: Value = serde_json::from_slice(&request_body("t", &m, 0)).unwrap();
        assert_eq!(v["message"]["android"]["ttl"], "2419200s");
    }

    const UNREGISTERED: &str = r#"{"error":{"code":404,"message":"Requested entity was not found.","status":"NOT_FOUND","details":[{"@type":"type.googleapis.com/google.firebase.fcm.v1.FcmError","errorCode":"UNREGISTERED"}]}}"#;
    const BAD_TOKEN: &str = r#"{"error":{"code":400,"message":"The registration token is not a valid FCM registration token","status":"INVALID_ARGUMENT","details":[{"@type":"type.googleapis.com/google.firebase.fcm.v1.FcmError","errorCode":"INVALID_ARGUMENT"}]}}"#;
    const BAD_FIELD: &str = r#"{"error":{"code":400,"message":"Request contains an invalid argument.","status":"INVALID_ARGUMENT","details":[{"@type":"type.googleapis.com/google.rpc.BadRequest","fieldViolations":[{"field":"message.token","description":"Invalid registration token"}]}]}}"#;
    const BAD_TTL: &str = r#"{"error":{"code":400,"message":"Invalid value at 'message.android.ttl'","status":"INVALID_ARGUMENT","details":[{"@type":"type.googleapis.com/google.rpc.BadRequest","fieldViolations":[{"field":"message.android.ttl","description":"Invalid value"}]}]}}"#;
    const MISMATCH: &str = r#"{"error":{"code":403,"message":"SenderId mismatch","status":"PERMISSION_DENIED","details":[{"@type":"type.googleapis.com/google.firebase.fcm.v1.FcmError","errorCode":"SENDER_ID_MISMATCH"}]}}"#;
    const DENIED: &str =
        r#"{"error":{"code":403,"message":"Permission denied","status":"PERMISSION_DENIED"}}"#;

    #[test]
    fn errors_are_parsed_from_fcm_json() {
        let e = parse_error(UNREGISTERED.as_bytes());
        assert_eq!(e.status, "NOT_FOUND");
        assert_eq!(e.error_codes, ["UNREGISTERED"]);
        assert_eq!(
            parse_error(BAD_FIELD.as_bytes()).bad_fields,
            ["message.token"]
        );
        assert_eq!(
            parse_error(b"<html>bad gateway</html>"),
            FcmError::default()
        );
        assert_eq!(parse_error(b""), FcmError::default());
    }

    fn delivery(status: u16, retry_after: Option<&str>, body: &str) -> Delivery {
        match classify(status, retry_after, body.as_bytes(), 1_000) {
            Verdict::Done(d) => d,
            v => panic!("{status} gave {v:?}"),
        }
    }

    #[test]
    fn answers_map_to_outcomes() {
        assert_eq!(delivery(200, None, r#"{"name":"x"}"#), Delivery::Accepted);
        for (status, body) in [
            (404, UNREGISTERED),
            (404, ""),
            (400, BAD_TOKEN),
            (400, BAD_FIELD),
            (403, MISMATCH),
        ] {
            assert!(
                matches!(delivery(status, None, body), Delivery::Gone { .. }),
                "{status} {body}"
            );
        }
        // The service account may not send: kept until that is mended.
        assert!(matches!(
            delivery(403, None, DENIED),
            Delivery::Retry { after: Some(a), .. } if a == CREDENTIALS_PAUSE
        ));
        for (status, body) in [(400, BAD_TTL), (413, ""), (405, "")] {
            assert!(
                matches!(delivery(status, None, body), Delivery::Rejected { .. }),
                "{status} {body}"
            );
        }
        let Delivery::Gone { reason } = delivery(404, None, UNREGISTERED) else {
            unreachable!()
        };
        assert_eq!(
            reason,
            "FCM answered 404 UNREGISTERED: Requested entity was not found."
        );
        assert!(matches!(
            classify(401, None, b"", 0),
            Verdict::Unauthorized(_)
        ));
    }

    #[test]
    fn retries_honour_retry_after() {
        let after = |d: Delivery| match d {
            Delivery::Retry { after, .. } => after,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            after(delivery(429, Some("7"), "")),
            Some(Duration::from_secs(7))
        );
        assert_eq!(after(delivery(429, None, "")), Some(QUOTA_PAUSE));
        assert_eq!(after(delivery(503, None, "")), None);
        assert_eq!(
            after(delivery(500, Some("2"), "")),
            Some(Duration::from_secs(2))
        );
        assert_eq!(after(delivery(502, Some("soon"), "")), None);
    }

    #[test]
    fn retry_after_reads_seconds_and_http_dates() {
        // 1994-11-06T08:49:37Z, RFC 9110's example.
        let then = 784_111_777;
        assert_eq!(parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT"), Some(then));
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:50:07 GMT", then),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:00 GMT", then),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_http_date("Thu, 01 Jan 1970 00:00:00 GMT"), Some(0));
        assert_eq!(
            parse_http_date("Tue, 29 Feb 2000 23:59:59 GMT"),
            Some(951_868_799)
        );
        assert_eq!(
            parse_retry_after(" 120 ", 0),
            Some(Duration::from_secs(120))
        );
        for bad in [
            "",
            "-1",
            "Sunday, 06-Nov-94 08:49:37 GMT",
            "Sun Nov  6 08:49:37 1994",
            "Sun, 06 Nov 1994 08:49:37 UTC",
            "Sun, 6 Nov 1994 08:49:37 GMT",
            "Sun, 06 Foo 1994 08:49:37 GMT",
            "Sun, 06 Nov 1994 24:00:00 GMT",
        ] {
            assert_eq!(parse_retry_after(bad, 0), None, "{bad:?}");
        }
    }
}
