//! Sending one push message to a push service (RFC 8030 §5), as an
//! application server does: encrypt, sign, POST, and read the answer.
//!
//! Nothing here is Herald-specific; it talks to any RFC 8030 push service
//! over http:// or https:// (see [`herald_client::http`]).

use crate::appserver::encrypt::encrypt_aes128gcm;
use crate::appserver::vapid_sign::VapidKey;
use anyhow::{anyhow, bail, Context};
use bytes::Bytes;
use herald_client::http::HttpClient;
use herald_proto::subscription::{origin_of, Subscription};
use http::{header, Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// The TTL used when none is given: one day, so a message still reaches a
/// browser that is closed for a while, without piling up for weeks.
pub const DEFAULT_TTL: u32 = 86_400;

/// How long one send may take, connect to last body byte.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Error bodies larger than this are cut: we only want `errno` and `message`.
const MAX_RESPONSE_BODY: usize = 64 * 1024;

use herald_proto::urgency::Urgency;

use crate::link::parse_links;
pub use crate::link::RECEIPT as RECEIPT_REL;

/// Checks a `Topic` against RFC 8030 §5.4: at most 32 characters of the
/// base64url alphabet. Push services refuse anything else, so say so early.
pub fn validate_topic(topic: &str) -> anyhow::Result<()> {
    if !crate::webpush::is_valid_topic(topic) {
        bail!("topic must be 1 to 32 characters of the base64url alphabet (A-Z a-z 0-9 - _), got {topic:?}");
    }
    Ok(())
}

/// Per-message options.
#[derive(Debug, Clone)]
pub struct PushOptions {
    /// Seconds the push service should keep the message for an offline
    /// user agent; 0 means deliver now or never.
    pub ttl: u32,
    pub urgency: Option<Urgency>,
    /// Messages with the same topic replace each other while undelivered.
    pub topic: Option<String>,
    pub timeout: Duration,
    /// Ask for a delivery receipt (`Prefer: respond-async`); a push
    /// service that honours it answers 202 with a receipt subscription.
    pub receipt: bool,
    /// Report this message's receipt to an existing receipt subscription
    /// (sent as a `Link` with rel `urn:ietf:params:push:receipt`) rather
    /// than to a new one.
    pub receipt_subscription: Option<String>,
    /// How the push service is reached: the public roots, plus a private CA
    /// when one was given (`--ca`).
    pub client: HttpClient,
}

impl Default for PushOptions {
    fn default() -> Self {
        PushOptions {
            ttl: DEFAULT_TTL,
            urgency: None,
            topic: None,
            timeout: DEFAULT_TIMEOUT,
            receipt: false,
            receipt_subscription: None,
            client: HttpClient::default(),
        }
    }
}

/// The application server's VAPID identity: key and contact.
#[derive(Debug, Clone)]
pub struct Vapid {
    pub key: VapidKey,
    /// `mailto:` or `https:` contact for the push service's operator.
    pub subject: Option<String>,
}

/// The JSON error body push services (autopush, Herald) answer with.
/// Every field is optional so that other services' bodies still parse.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushServiceError {
    #[serde(default)]
    pub code: Option<u16>,
    #[serde(default)]
    pub errno: Option<u32>,
    #[serde(default)]
    pub error: Option<String>,
    #[serde(default)]
    pub message: Option<String>,
}

/// What the push service answered.
#[derive(Debug, Clone)]
pub struct PushResponse {
    pub status: StatusCode,
    /// The message resource (`Location`), on success.
    pub location: Option<String>,
    /// The TTL the service will actually honour, which may be lower than
    /// asked for.
    pub ttl: Option<u64>,
    /// Where the message's receipt will be reported (the `Link` with rel
    /// `urn:ietf:params:push:receipt`), when one was asked for and granted.
    pub receipt_subscription: Option<String>,
    /// The parsed error body, when the service sent a JSON one.
    pub error: Option<PushServiceError>,
    /// The raw body, for services whose errors are not JSON.
    pub body: String,
}

impl PushResponse {
    pub fn is_success(&self) -> bool {
        self.status.is_success()
    }

    /// The subscription no longer exists and should be forgotten: 410 Gone
    /// per RFC 8030 §7.3, and 404, which push services (autopush among
    /// them) answer for endpoints they do not know.
    pub fn is_gone(&self) -> bool {
        self.status == StatusCode::GONE || self.status == StatusCode::NOT_FOUND
    }

    /// `errno` from the error body, if any.
    pub fn errno(&self) -> Option<u32> {
        self.error.as_ref().and_then(|e| e.errno)
    }

    /// A one-line explanation of a refusal for people.
    pub fn describe_error(&self) -> String {
        format!(
            "push service answered {}",
            describe_answer(self.status, self.error.as_ref(), &self.body)
        )
    }
}

/// `404 Not Found, errno 102: message` from an HTTP error answer.
pub(crate) fn describe_answer(
    status: StatusCode,
    error: Option<&PushServiceError>,
    body: &str,
) -> String {
    let mut out = status.to_string();
    match error {
        Some(err) => {
            if let Some(errno) = err.errno {
                out.push_str(&format!(", errno {errno}"));
            }
            if let Some(msg) = err.message.as_deref().or(err.error.as_deref()) {
                out.push_str(&format!(": {msg}"));
            }
        }
        None if !body.trim().is_empty() => {
            let body: String = body.trim().chars().take(300).collect();
            out.push_str(&format!(": {body}"));
        }
        None => {}
    }
    out
}

/// Builds the HTTP request for one push message: encrypts `payload` (if
/// any) to the subscription's keys, adds the VAPID `Authorization` for the
/// endpoint's origin, and the RFC 8030 headers.
pub fn build_request(
    subscription: &Subscription,
    payload: Option<&[u8]>,
    vapid: Option<&Vapid>,
    options: &PushOptions,
) -> anyhow::Result<Request<Full<Bytes>>> {
    let uri: http::Uri = subscription
        .endpoint
        .parse()
        .with_context(|| format!("endpoint {:?} is not a URL", subscription.endpoint))?;
    let (authority, path) =
        request_target(&uri).with_context(|| format!("endpoint {:?}", subscription.endpoint))?;

    // The request line carries origin-form; the URI keeps the full endpoint
    // so callers (and send_request) still know where it goes.
    let mut request = Request::post(uri.clone())
        .header(header::HOST, authority.as_str())
        .header("TTL", options.ttl.to_string());
    if let Some(urgency) = options.urgency {
        request = request.header("Urgency", urgency.as_str());
    }
    if let Some(topic) = &options.topic {
        validate_topic(topic)?;
        request = request.header("Topic", topic.as_str());
    }
    if options.receipt {
        request = request.header("Prefer", "respond-async");
    }
    if let Some(url) = &options.receipt_subscription {
        if url.contains(['<', '>', '"', ' ', '\r', '\n']) {
            bail!("receipt subscription {url:?} is not a URL");
        }
        request = request.header(header::LINK, format!("<{url}>; rel=\"{RECEIPT_REL}\""));
    }
    if let Some(vapid) = vapid {
        let audience = origin_of(&subscription.endpoint)?;
        request = request.header(
            header::AUTHORIZATION,
            vapid.key.authorization(&audience, vapid.subject.as_deref()),
        );
    }
    let body = match payload {
        Some(plaintext) => {
            let keys = subscription.decoded_keys()?;
            let body = encrypt_aes128gcm(&keys.p256dh, &keys.auth, plaintext)?;
            request = request
                .header(header::CONTENT_ENCODING, "aes128gcm")
                .header(header::CONTENT_TYPE, "application/octet-stream");
            Bytes::from(body)
        }
        None => Bytes::new(),
    };
    let mut request = request
        .header(header::CONTENT_LENGTH, body.len())
        .body(Full::new(body))
        .context("cannot build the push request")?;
    // Keep the absolute URI out of the request line.
    *request.uri_mut() = path.parse().context("endpoint path is not valid")?;
    request.extensions_mut().insert(Endpoint(uri));
    Ok(request)
}

/// The `Host` value and origin-form request target of an absolute URL.
pub(crate) fn request_target(uri: &http::Uri) -> anyhow::Result<(String, String)> {
    let authority = uri.authority().ok_or_else(|| anyhow!("no host in URL"))?;
    let path = uri
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "/".to_owned());
    Ok((authority.as_str().to_owned(), path))
}

/// The full endpoint URI of a request built by [`build_request`].
#[derive(Debug, Clone)]
struct Endpoint(http::Uri);

/// Sends one push message and reports what the push service answered. A
/// refusal (4xx/5xx) is a successful call with a non-success
/// [`PushResponse`]; `Err` means the message never got an answer.
pub async fn send_push(
    subscription: &Subscription,
    payload: Option<&[u8]>,
    vapid: Option<&Vapid>,
    options: &PushOptions,
) -> anyhow::Result<PushResponse> {
    let request = build_request(subscription, payload, vapid, options)?;
    send_request(&options.client, request, options.timeout).await
}

/// Sends a request made by [`build_request`].
pub async fn send_request(
    client: &HttpClient,
    request: Request<Full<Bytes>>,
    timeout: Duration,
) -> anyhow::Result<PushResponse> {
    let endpoint = request
        .extensions()
        .get::<Endpoint>()
        .map(|e| e.0.clone())
        .ok_or_else(|| anyhow!("request was not made by build_request"))?;
    match tokio::time::timeout(timeout, exchange(client, &endpoint, request)).await {
        Ok(result) => result.with_context(|| format!("push to {endpoint} failed")),
        Err(_) => bail!(
            "push to {endpoint} got no answer within {} s",
            timeout.as_secs_f32()
        ),
    }
}

async fn exchange(
    client: &HttpClient,
    endpoint: &http::Uri,
    request: Request<Full<Bytes>>,
) -> anyhow::Result<PushResponse> {
    let mut connection = client.connect(endpoint, "endpoint").await?;
    let response = connection
        .sender
        .send_request(request)
        .await
        .context("no HTTP response")?;
    let (parts, body) = response.into_parts();
    let body = Limited::new(body, MAX_RESPONSE_BODY)
        .collect()
        .await
        .map_err(|e| anyhow!("cannot read the response body: {e}"))?
        .to_bytes();
    drop(connection);

    let header_str = |name: &str| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let body = String::from_utf8_lossy(&body).into_owned();
    let error = if parts.status.is_success() {
        None
    } else {
        serde_json::from_str::<PushServiceError>(&body).ok()
    };
    let links = parts
        .headers
        .get_all(header::LINK)
        .iter()
        .filter_map(|v| v.to_str().ok());
    let receipt_subscription = links
        .flat_map(parse_links)
        .find(|link| link.has_rel(RECEIPT_REL))
        .map(|link| resolve_reference(endpoint, &link.target));
    Ok(PushResponse {
        status: parts.status,
        location: header_str("location"),
        ttl: header_str("ttl").and_then(|v| v.trim().parse().ok()),
        receipt_subscription,
        error,
        body,
    })
}

/// Resolves a link target against the URL of the request it came with,
/// for the forms push services use: absolute, `//host/path` and `/path`.
pub(crate) fn resolve_reference(base: &http::Uri, reference: &str) -> String {
    let scheme = base.scheme_str().unwrap_or("http");
    if reference.contains("://") {
        reference.to_owned()
    } else if let Some(rest) = reference.strip_prefix("//") {
        format!("{scheme}://{rest}")
    } else if reference.starts_with('/') {
        match base.authority() {
            Some(authority) => format!("{scheme}://{authority}{reference}"),
            None => reference.to_owned(),
        }
    } else {
        reference.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;
    use herald_proto::subscription::SubscriptionKeys;
    use p256::elliptic_curve::sec1::ToEncodedPoint;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn subscription(endpoint: &str) -> (Subscription, p256::SecretKey, [u8; 16]) {
        let ua = p256::SecretKey::random(&mut rand::rngs::OsRng);
        let auth = [7u8; 16];
        let sub = Subscription {
            endpoint: endpoint.to_owned(),
            keys: Some(SubscriptionKeys {
                p256dh: URL_SAFE_NO_PAD.encode(ua.public_key().to_encoded_point(false).as_bytes()),
                auth: URL_SAFE_NO_PAD.encode(auth),
            }),
        };
        (sub, ua, auth)
    }

    #[test]
    fn request_carries_rfc8030_headers_and_decryptable_body() {
        let (sub, ua, auth) = subscription("http://push.test:8080/wpush/v2/tok?x=1");
        let vapid = Vapid {
            key: VapidKey::generate(),
            subject: Some("mailto:a@b.c".into()),
        };
        let options = PushOptions {
            ttl: 30,
            urgency: Some(Urgency::High),
            topic: Some("news".into()),
            ..PushOptions::default()
        };
        let req = build_request(&sub, Some(b"hi"), Some(&vapid), &options).unwrap();
        assert_eq!(req.uri(), "/wpush/v2/tok?x=1");
        let h = req.headers();
        assert_eq!(h["host"], "push.test:8080");
        assert_eq!(h["ttl"], "30");
        assert_eq!(h["urgency"], "high");
        assert_eq!(h["topic"], "news");
        assert_eq!(h["content-encoding"], "aes128gcm");
        let auth_header = h["authorization"].to_str().unwrap();
        assert!(auth_header.starts_with("vapid t="));
        assert!(auth_header.ends_with(&format!(", k={}", vapid.key.public_key_b64())));
        let jwt = auth_header["vapid t=".len()..].split(',').next().unwrap();
        let claims = jwt.split('.').nth(1).unwrap();
        let claims: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(claims).unwrap()).unwrap();
        assert_eq!(claims["aud"], "http://push.test:8080");
        assert_eq!(claims["sub"], "mailto:a@b.c");

        let body = req.body().clone();
        let body = futures_body(body);
        assert_eq!(h["content-length"], body.len().to_string());
        let components = ece::EcKeyComponents::new(
            ua.to_bytes().to_vec(),
            ua.public_key().to_encoded_point(false).as_bytes().to_vec(),
        );
        assert_eq!(ece::decrypt(&components, &auth, &body).unwrap(), b"hi");
    }

    fn futures_body(body: Full<Bytes>) -> Bytes {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(body.collect())
            .unwrap()
            .to_bytes()
    }

    #[test]
    fn no_payload_means_no_encoding_and_empty_body() {
        let sub = Subscription {
            endpoint: "http://h/e".into(),
            keys: None,
        };
        let req = build_request(&sub, None, None, &PushOptions::default()).unwrap();
        assert!(req.headers().get("content-encoding").is_none());
        assert!(req.headers().get("authorization").is_none());
        assert_eq!(req.headers()["content-length"], "0");
        assert_eq!(req.headers()["ttl"], DEFAULT_TTL.to_string());
        // A payload needs keys.
        assert!(build_request(&sub, Some(b"x"), None, &PushOptions::default()).is_err());
    }

    #[test]
    fn receipt_options_become_prefer_and_link() {
        let sub = Subscription {
            endpoint: "http://h/e".into(),
            keys: None,
        };
        let plain = build_request(&sub, None, None, &PushOptions::default()).unwrap();
        assert!(plain.headers().get("prefer").is_none());
        assert!(plain.headers().get("link").is_none());
        let options = PushOptions {
            receipt: true,
            receipt_subscription: Some("http://h/r/tok".into()),
            ..PushOptions::default()
        };
        let req = build_request(&sub, None, None, &options).unwrap();
        assert_eq!(req.headers()["prefer"], "respond-async");
        let link = req.headers()["link"].to_str().unwrap();
        assert_eq!(
            link,
            "<http://h/r/tok>; rel=\"urn:ietf:params:push:receipt\""
        );
        // What we send, our own parser reads back.
        assert_eq!(parse_links(link)[0].target, "http://h/r/tok");
        assert!(parse_links(link)[0].has_rel(RECEIPT_REL));
        let bad = PushOptions {
            receipt_subscription: Some("http://h/r/a>, <x".into()),
            ..PushOptions::default()
        };
        assert!(build_request(&sub, None, None, &bad).is_err());
    }

    #[test]
    fn link_targets_resolve_against_the_endpoint() {
        let base: http::Uri = "http://push.test:8080/wpush/v2/tok".parse().unwrap();
        assert_eq!(resolve_reference(&base, "http://o/r/a"), "http://o/r/a");
        assert_eq!(
            resolve_reference(&base, "/r/a"),
            "http://push.test:8080/r/a"
        );
        assert_eq!(resolve_reference(&base, "//o:1/r/a"), "http://o:1/r/a");
    }

    #[test]
    fn topics_follow_rfc8030() {
        assert!(validate_topic("abc-DEF_123").is_ok());
        assert!(validate_topic(&"a".repeat(32)).is_ok());
        assert!(validate_topic(&"a".repeat(33)).is_err());
        assert!(validate_topic("").is_err());
        assert!(validate_topic("with space").is_err());
        assert!(validate_topic("a=").is_err());
    }

    #[test]
    fn other_schemes_are_refused_clearly() {
        let (sub, _, _) = subscription("ftp://push.example.net/x");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let err = rt
            .block_on(send_push(&sub, Some(b"x"), None, &PushOptions::default()))
            .unwrap_err();
        assert!(
            format!("{err:#}").contains("unsupported endpoint scheme"),
            "{err:#}"
        );
    }

    /// A one-shot fake push service: records the request, answers `reply`.
    async fn fake_service(reply: String) -> (String, tokio::task::JoinHandle<Vec<u8>>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut seen = Vec::new();
            let mut buf = [0u8; 4096];
            // Read headers and the announced body before answering.
            loop {
                let n = socket.read(&mut buf).await.unwrap();
                seen.extend_from_slice(&buf[..n]);
                let text = String::from_utf8_lossy(&seen).to_ascii_lowercase();
                if let Some(end) = text.find("\r\n\r\n") {
                    let len: usize = text
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .map(|v| v.trim().parse().unwrap())
                        .unwrap_or(0);
                    if seen.len() >= end + 4 + len {
                        break;
                    }
                }
                if n == 0 {
                    break;
                }
            }
            socket.write_all(reply.as_bytes()).await.unwrap();
            socket.shutdown().await.unwrap();
            seen
        });
        (format!("http://{addr}/wpush/v2/tok"), task)
    }

    #[test]
    fn reads_success_and_error_answers() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let (endpoint, task) = fake_service(
                "HTTP/1.1 201 Created\r\nLocation: http://x/m/1\r\nTTL: 10\r\nContent-Length: 0\r\n\r\n"
                    .to_owned(),
            )
            .await;
            let (sub, _, _) = subscription(&endpoint);
            let resp = send_push(&sub, Some(b"x"), None, &PushOptions::default())
                .await
                .unwrap();
            assert!(resp.is_success());
            assert_eq!(resp.location.as_deref(), Some("http://x/m/1"));
            assert_eq!(resp.ttl, Some(10));
            let seen = String::from_utf8_lossy(&task.await.unwrap()).into_owned();
            assert!(seen.starts_with("POST /wpush/v2/tok HTTP/1.1\r\n"), "{seen}");
            assert_eq!(resp.receipt_subscription, None);

            // A 202 with the receipt subscription among other links, one
            // relative.
            let (endpoint, _task) = fake_service(
                "HTTP/1.1 202 Accepted\r\nLocation: http://x/m/2\r\nLink: </y>; rel=\"next\"\r\n\
                 Link: </r/tok>; rel=\"urn:ietf:params:push:receipt\"\r\nContent-Length: 0\r\n\r\n"
                    .to_owned(),
            )
            .await;
            let (sub, _, _) = subscription(&endpoint);
            let options = PushOptions {
                receipt: true,
                ..PushOptions::default()
            };
            let resp = send_push(&sub, None, None, &options).await.unwrap();
            assert_eq!(resp.status, StatusCode::ACCEPTED);
            let origin = endpoint.trim_end_matches("/wpush/v2/tok");
            assert_eq!(
                resp.receipt_subscription,
                Some(format!("{origin}/r/tok"))
            );

            let body = r#"{"code":410,"errno":106,"error":"Gone","message":"Subscription expired"}"#;
            let reply = format!(
                "HTTP/1.1 410 Gone\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            let (endpoint, _task) = fake_service(reply).await;
            let (sub, _, _) = subscription(&endpoint);
            let resp = send_push(&sub, None, None, &PushOptions::default())
                .await
                .unwrap();
            assert!(!resp.is_success());
            assert!(resp.is_gone());
            assert_eq!(resp.errno(), Some(106));
            assert_eq!(
                resp.describe_error(),
                "push service answered 410 Gone, errno 106: Subscription expired"
            );
        });
    }

    #[test]
    fn unreachable_service_is_an_error() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        // Bind then drop to get a port nobody listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let (sub, _, _) = subscription(&format!("http://127.0.0.1:{port}/x"));
        let err = rt
            .block_on(send_push(&sub, None, None, &PushOptions::default()))
            .unwrap_err();
        assert!(format!("{err:#}").contains("cannot connect"), "{err:#}");
    }
}
