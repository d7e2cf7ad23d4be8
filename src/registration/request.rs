//! Parsing the registration API's requests: path, `Authorization` and
//! bodies, with no I/O. Each refusal is the status and errno Firefox's
//! mobile push client (application-services `components/push`) expects;
//! autopush-rs gives the same ones.

use crate::errors::{ApiError, Errno};
use crate::store::BridgeKind;
use crate::subscription::parse_app_server_key;
use crate::token::KeyHash;
use herald_proto::ids::{parse_channel_id, ChannelId, Uaid};
use http::Method;
use serde::Deserialize;

/// The largest request body read. A registration carries a device token
/// (FCM's are about 160 characters), a key (88) and an `aps` of a few
/// hundred bytes at most.
pub const MAX_BODY: usize = 8 * 1024;

/// The six calls (R1–R6 of proto-docs/bridges.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `POST …/registration`: a new user agent with its first channel.
    Register,
    /// `PUT …/registration/{uaid}`: a new device token.
    Update,
    /// `GET …/registration/{uaid}`: the channel list (a daily check).
    Get,
    /// `DELETE …/registration/{uaid}`.
    Unregister,
    /// `POST …/registration/{uaid}/subscription`: another channel.
    Subscribe,
    /// `DELETE …/registration/{uaid}/subscription/{chid}`.
    Unsubscribe,
}

impl Op {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Register => "register",
            Op::Update => "update",
            Op::Get => "get",
            Op::Unregister => "unregister",
            Op::Subscribe => "subscribe",
            Op::Unsubscribe => "unsubscribe",
        }
    }
}

/// A request's path, split: `/v1/{type}/{app_id}/registration[/{uaid}[/subscription[/{chid}]]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route<'a> {
    pub op: Op,
    /// The `{type}` segment as sent.
    pub kind: &'a str,
    pub app_id: &'a str,
    /// The `{uaid}` segment as sent (GET echoes it back unchanged).
    pub uaid: Option<&'a str>,
    pub chid: Option<&'a str>,
}

/// Whether `path` is the registration API's: `/v1/<type>/<app_id>/registration…`.
pub fn claims(path: &str) -> bool {
    let mut s = path.strip_prefix("/v1/").unwrap_or("").split('/');
    s.nth(2) == Some("registration")
}

/// Which call `method` and `path` (one `claims` accepted) make: 405 for a
/// known path with another method, 404 for an unknown one.
pub fn route<'a>(method: &Method, path: &'a str) -> Result<Route<'a>, ApiError> {
    let segments: Vec<&str> = path.trim_start_matches("/v1/").split('/').collect();
    let (op, uaid, chid) = match (method, segments.as_slice()) {
        (&Method::POST, [_, _, _]) => (Op::Register, None, None),
        (&Method::PUT, [_, _, _, u]) => (Op::Update, Some(*u), None),
        (&Method::GET, [_, _, _, u]) => (Op::Get, Some(*u), None),
        (&Method::DELETE, [_, _, _, u]) => (Op::Unregister, Some(*u), None),
        (&Method::POST, [_, _, _, u, "subscription"]) => (Op::Subscribe, Some(*u), None),
        (&Method::DELETE, [_, _, _, u, "subscription", c]) => (Op::Unsubscribe, Some(*u), Some(*c)),
        (_, [_, _, _] | [_, _, _, _] | [_, _, _, _, "subscription"])
        | (_, [_, _, _, _, "subscription", _]) => return Err(ApiError::method_not_allowed()),
        _ => return Err(ApiError::not_found()),
    };
    Ok(Route {
        op,
        kind: segments[0],
        app_id: segments[1],
        uaid,
        chid,
    })
}

/// `{type}`, case-insensitive: `fcm`, its old name `gcm`, or `apns`.
pub fn bridge_kind(segment: &str) -> Result<BridgeKind, ApiError> {
    BridgeKind::from_route_type(&segment.to_ascii_lowercase()).ok_or_else(|| {
        ApiError::new(
            400,
            Errno::InvalidRegistration,
            format!("invalid router type {segment:?}: use fcm, gcm or apns"),
        )
    })
}

/// The "register afresh" answer: the client drops its uaid and registers
/// again (application-services maps 410 with errno 103 to
/// `UAIDNotRecognizedError`).
pub fn uaid_not_found() -> ApiError {
    ApiError::new(
        410,
        Errno::UserGone,
        "UAID not found: register again with POST /v1/{type}/{app_id}/registration",
    )
}

pub fn parse_uaid(segment: &str) -> Result<Uaid, ApiError> {
    Uaid::parse(segment).ok_or_else(uaid_not_found)
}

pub fn no_such_subscription() -> ApiError {
    ApiError::new(410, Errno::SubscriptionGone, "no such subscription")
}

pub fn parse_chid(segment: &str) -> Result<ChannelId, ApiError> {
    parse_channel_id(segment).ok_or_else(no_such_subscription)
}

fn unauthorized(message: &str) -> ApiError {
    ApiError::new(401, Errno::Unauthorized, message)
}

/// The secret from `Authorization: webpush <secret>` (what Firefox sends)
/// or `Bearer <secret>`, the scheme in any case.
pub fn secret_of(authorization: Option<&str>) -> Result<&str, ApiError> {
    let value = authorization
        .ok_or_else(|| unauthorized("missing Authorization header (webpush <secret>)"))?;
    match value.trim().split_once(' ') {
        Some((scheme, secret))
            if (scheme.eq_ignore_ascii_case("webpush")
                || scheme.eq_ignore_ascii_case("bearer"))
                && !secret.trim().is_empty() =>
        {
            Ok(secret.trim())
        }
        _ => Err(unauthorized(
            "malformed Authorization header: expected webpush <secret> or Bearer <secret>",
        )),
    }
}

pub fn wrong_secret() -> ApiError {
    unauthorized("incorrect secret for this uaid")
}

fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::new(400, Errno::InvalidRegistration, message)
}

fn invalid_key() -> ApiError {
    ApiError::new(
        400,
        Errno::InvalidCrypto,
        "invalid key: expected the application server's P-256 public key, uncompressed, base64url",
    )
}

/// R1 and R2's body, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegisterBody {
    /// The FCM registration token or APNs device token.
    pub token: String,
    pub channel: Option<ChannelId>,
    pub key: Option<KeyHash>,
    /// APNs only: JSON text of an object.
    pub aps: Option<String>,
}

#[derive(Deserialize)]
struct RawRegister {
    token: Option<serde_json::Value>,
    #[serde(rename = "channelID")]
    channel_id: Option<serde_json::Value>,
    key: Option<serde_json::Value>,
    aps: Option<serde_json::Value>,
}

/// `{"token", "channelID"?, "key"?, "aps"?}`; unknown fields are ignored,
/// as autopush-rs does.
pub fn register_body(kind: BridgeKind, body: &[u8]) -> Result<RegisterBody, ApiError> {
    let raw: RawRegister = serde_json::from_slice(body)
        .map_err(|e| invalid(format!("body is not the JSON object expected: {e}")))?;
    let token = match raw.token {
        Some(serde_json::Value::String(t)) if t.len() >= 8 && !t.contains(' ') => t,
        _ => {
            return Err(invalid(
                "invalid router token: at least 8 characters, no spaces",
            ))
        }
    };
    let channel = match raw.channel_id {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(c)) => {
            Some(parse_channel_id(&c).ok_or_else(|| invalid("channelID is not a UUID"))?)
        }
        Some(_) => return Err(invalid("channelID is not a UUID")),
    };
    let aps = match (kind, raw.aps) {
        (_, None | Some(serde_json::Value::Null)) | (BridgeKind::Fcm, Some(_)) => None,
        (BridgeKind::Apns, Some(serde_json::Value::String(text))) => {
            match serde_json::from_str::<serde_json::Value>(&text) {
                Ok(serde_json::Value::Object(_)) => Some(text),
                _ => return Err(invalid("invalid aps: expected the text of a JSON object")),
            }
        }
        (BridgeKind::Apns, Some(_)) => {
            return Err(invalid("invalid aps: expected the text of a JSON object"))
        }
    };
    Ok(RegisterBody {
        token,
        channel,
        key: key_of(raw.key)?,
        aps,
    })
}

/// R5's body, `{"channelID"?, "key"?}` (Firefox also sends its `token`,
/// which is ignored). An empty body asks for a random channel, unbound.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SubscribeBody {
    pub channel: Option<ChannelId>,
    pub key: Option<KeyHash>,
}

pub fn subscribe_body(body: &[u8]) -> Result<SubscribeBody, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(SubscribeBody::default());
    }
    let raw: RawRegister = serde_json::from_slice(body)
        .map_err(|e| invalid(format!("body is not the JSON object expected: {e}")))?;
    let channel = match raw.channel_id {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(c)) => {
            Some(parse_channel_id(&c).ok_or_else(|| invalid("channelID is not a UUID"))?)
        }
        Some(_) => return Err(invalid("channelID is not a UUID")),
    };
    Ok(SubscribeBody {
        channel,
        key: key_of(raw.key)?,
    })
}

/// `key`: absent, null or empty (Firefox for Android turns an empty key
/// into null) means an unbound subscription.
fn key_of(v: Option<serde_json::Value>) -> Result<Option<KeyHash>, ApiError> {
    match v {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(k)) if k.is_empty() => Ok(None),
        Some(serde_json::Value::String(k)) => {
            parse_app_server_key(&k).map(Some).ok_or_else(invalid_key)
        }
        Some(_) => Err(invalid_key()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: &str = "/v1/fcm/fenix/registration";
    const U: &str = "729e5104f5f04abc9196085340317dea";

    #[test]
    fn paths_name_the_call() {
        assert!(claims(P));
        assert!(claims(&format!("{P}/{U}/subscription/x")));
        assert!(!claims("/v1/broadcasts"));
        assert!(!claims("/v1/broadcasts/x"));
        assert!(!claims("/wpush/v1/fcm/x/registration"));
        let r = route(&Method::POST, P).unwrap();
        assert_eq!(
            (r.op, r.kind, r.app_id, r.uaid),
            (Op::Register, "fcm", "fenix", None)
        );
        let one = format!("{P}/{U}");
        let sub = format!("{P}/{U}/subscription");
        let chan = format!("{P}/{U}/subscription/abc");
        assert_eq!(route(&Method::PUT, &one).unwrap().op, Op::Update);
        assert_eq!(route(&Method::GET, &one).unwrap().uaid, Some(U));
        assert_eq!(route(&Method::DELETE, &one).unwrap().op, Op::Unregister);
        assert_eq!(route(&Method::POST, &sub).unwrap().op, Op::Subscribe);
        let d = route(&Method::DELETE, &chan).unwrap();
        assert_eq!((d.op, d.chid), (Op::Unsubscribe, Some("abc")));
        let status = |m: &Method, p: &str| route(m, p).unwrap_err().status;
        assert_eq!(status(&Method::GET, P), 405);
        assert_eq!(status(&Method::POST, &one), 405);
        assert_eq!(status(&Method::GET, &chan), 405);
        assert_eq!(status(&Method::GET, &format!("{P}/{U}/other")), 404);
    }

    #[test]
    fn types_are_fcm_gcm_and_apns_in_any_case() {
        assert_eq!(bridge_kind("fcm").unwrap(), BridgeKind::Fcm);
        assert_eq!(bridge_kind("GCM").unwrap(), BridgeKind::Fcm);
        assert_eq!(bridge_kind("Apns").unwrap(), BridgeKind::Apns);
        for bad in ["webpush", "adm", "", "fcm2"] {
            let e = bridge_kind(bad).unwrap_err();
            assert_eq!(
                (e.status, e.errno),
                (400, Errno::InvalidRegistration),
                "{bad}"
            );
        }
    }

    #[test]
    fn ids_that_do_not_parse_are_gone() {
        assert!(parse_uaid(U).is_ok());
        assert!(parse_uaid("729e5104-f5f0-4abc-9196-085340317dea").is_ok());
        let e = parse_uaid("nope").unwrap_err();
        assert_eq!((e.status, e.errno), (410, Errno::UserGone));
        let e = parse_chid("nope").unwrap_err();
        assert_eq!((e.status, e.errno), (410, Errno::SubscriptionGone));
    }

    #[test]
    fn authorization_takes_webpush_or_bearer() {
        assert_eq!(secret_of(Some("webpush abc")).unwrap(), "abc");
        assert_eq!(secret_of(Some("WebPush abc")).unwrap(), "abc");
        assert_eq!(secret_of(Some("Bearer abc")).unwrap(), "abc");
        assert_eq!(secret_of(Some("bearer  abc ")).unwrap(), "abc");
        for bad in [
            None,
            Some(""),
            Some("abc"),
            Some("Basic abc"),
            Some("webpush "),
        ] {
            let e = secret_of(bad).unwrap_err();
            assert_eq!((e.status, e.errno), (401, Errno::Unauthorized), "{bad:?}");
        }
    }

    fn app_key() -> String {
        use p256::elliptic_curve::sec1::ToEncodedPoint;
        let secret = p256::SecretKey::random(&mut rand::thread_rng());
        let point = secret.public_key().to_encoded_point(false);
        herald_proto::b64::encode_b64url(point.as_bytes())
    }

    #[test]
    fn register_bodies() {
        let key = app_key();
        let chid = "0a1b2c3d-0000-4000-8000-000000000001";
        let b = register_body(
            BridgeKind::Apns,
            format!(r#"{{"token":"abcdefgh","channelID":"{chid}","key":"{key}=","aps":"{{\"badge\":1}}","extra":1}}"#)
                .as_bytes(),
        )
        .unwrap();
        assert_eq!(b.token, "abcdefgh");
        assert_eq!(b.channel, parse_channel_id(chid));
        assert!(b.key.is_some());
        assert_eq!(b.aps.as_deref(), Some(r#"{"badge":1}"#));
        // What Firefox sends: no channelID, key null.
        let b = register_body(BridgeKind::Fcm, br#"{"token":"abcdefgh","key":null}"#).unwrap();
        assert_eq!((b.channel, b.key, b.aps), (None, None, None));
        for bad in [
            &br#"{"token":"short"}"#[..],
            br#"{"token":"has a space"}"#,
            br#"{"key":null}"#,
            br#"{"token":12345678}"#,
            br#"{"token":"abcdefgh","channelID":"x"}"#,
            b"not json",
            b"[]",
        ] {
            let e = register_body(BridgeKind::Fcm, bad).unwrap_err();
            assert_eq!(
                (e.status, e.errno),
                (400, Errno::InvalidRegistration),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        for aps in [r#""[1]""#, r#"{"badge":1}"#, r#""{""#] {
            let body = format!(r#"{{"token":"abcdefgh","aps":{aps}}}"#);
            assert!(
                register_body(BridgeKind::Apns, body.as_bytes()).is_err(),
                "{aps}"
            );
        }
        for k in [r#""AAAA""#, r#""not base64!""#, "5"] {
            let body = format!(r#"{{"token":"abcdefgh","key":{k}}}"#);
            let e = register_body(BridgeKind::Fcm, body.as_bytes()).unwrap_err();
            assert_eq!((e.status, e.errno), (400, Errno::InvalidCrypto), "{k}");
        }
    }

    #[test]
    fn subscribe_bodies() {
        assert_eq!(subscribe_body(b"").unwrap(), SubscribeBody::default());
        let b =
            subscribe_body(format!(r#"{{"token":"t","key":"{}"}}"#, app_key()).as_bytes()).unwrap();
        assert!(b.key.is_some() && b.channel.is_none());
        assert_eq!(
            subscribe_body(br#"{"key":"AAAA"}"#).unwrap_err().errno,
            Errno::InvalidCrypto
        );
        assert_eq!(
            subscribe_body(b"{").unwrap_err().errno,
            Errno::InvalidRegistration
        );
    }
}
