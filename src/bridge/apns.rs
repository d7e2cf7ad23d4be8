//! The APNs bridge: pushes for Firefox for iOS (and any app registered under
//! `/v1/apns/{app_id}/registration`) sent to the Apple Push Notification
//! service over HTTP/2, which is all APNs speaks.
//!
//! One long-lived connection pool per bridge (APNs asks providers to keep
//! connections open rather than reconnect per push). Authentication is a
//! provider token (`apns_auth.rs`) or a TLS client certificate. The
//! payload and header values are built in `apns_payload.rs`; this module
//! sends them and reads APNs' answer.

use super::apns_auth::{ProviderKey, ProviderToken, ProviderTokens};
use super::apns_payload::{self, MAX_PAYLOAD};
use super::{Bridge, Delivery, CREDENTIALS_PAUSE};
use crate::config::{ApnsAuth, ApnsBridgeSettings};
use crate::metrics::Metrics;
use crate::store::{BridgeKind, BridgeRoute, Message};
use anyhow::{bail, Context};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A request APNs has not answered in this long is given up and retried
/// later.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

type HttpsClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

pub struct ApnsBridge {
    app_id: String,
    topic: String,
    /// Without a trailing `/`.
    base_url: String,
    client: HttpsClient,
    /// None with client-certificate authentication.
    tokens: Option<ProviderTokens>,
    metrics: Arc<Metrics>,
    timeout: Duration,
}

impl ApnsBridge {
    /// Reads the key or certificate files and builds the connection pool;
    /// connects only when the first push goes out. Errors name the setting
    /// and the file.
    pub fn new(settings: &ApnsBridgeSettings, metrics: Arc<Metrics>) -> anyhow::Result<ApnsBridge> {
        let what = format!("bridges.apns.{}", settings.app_id);
        let base_url = settings.base_url.trim_end_matches('/').to_string();
        let uri: http::Uri = base_url
            .parse()
            .with_context(|| format!("{what}: base_url {base_url:?} is not a URL"))?;
        if uri.scheme_str() != Some("https") || uri.host().is_none() {
            bail!("{what}: base_url {base_url:?} must be an https:// URL (APNs speaks only HTTP/2 over TLS)");
        }
        if settings.topic.is_empty() {
            bail!("{what}: topic (the app's bundle id) must be set");
        }
        let (tokens, client_cert) = match &settings.auth {
            ApnsAuth::Token {
                team_id,
                key_id,
                key,
            } => {
                let key = ProviderKey::load(key, key_id, team_id)
                    .with_context(|| format!("{what}: key"))?;
                (Some(ProviderTokens::new(key)), None)
            }
            ApnsAuth::Certificate { certificate, key } => (
                None,
                Some(client_identity(certificate, key).with_context(|| what.clone())?),
            ),
        };
        let tls = tls_config(settings.ca.as_deref(), client_cert).with_context(|| what.clone())?;
        Ok(ApnsBridge {
            app_id: settings.app_id.clone(),
            topic: settings.topic.clone(),
            base_url,
            client: http2_client(tls),
            tokens,
            metrics,
            timeout: REQUEST_TIMEOUT,
        })
    }

    /// Another request timeout than `REQUEST_TIMEOUT` (tests).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// One request to APNs and its answer, recorded in the metrics.
    async fn post(
        &self,
        route: &BridgeRoute,
        message: &Message,
        body: &[u8],
        token: Option<&ProviderToken>,
    ) -> Answer {
        let request = match self.request(route, message, body, token) {
            Ok(r) => r,
            Err(e) => return Answer::Failed(format!("cannot build the request: {e}")),
        };
        let started = Instant::now();
        let answer = match tokio::time::timeout(self.timeout, self.exchange(request)).await {
            Ok(Ok(a)) => a,
            Ok(Err(e)) => Answer::Failed(e),
            Err(_) => Answer::Failed(format!("no answer within {:?}", self.timeout)),
        };
        let status = match &answer {
            Answer::Status { status, .. } => status.to_string(),
            Answer::Failed(_) => "error".to_string(),
        };
        self.metrics
            .bridge_requests
            .with_label_values(&["apns", self.app_id.as_str(), status.as_str()])
            .inc();
        self.metrics
            .bridge_request_seconds
            .with_label_values(&["apns", self.app_id.as_str()])
            .observe(started.elapsed().as_secs_f64());
        answer
    }

    fn request(
        &self,
        route: &BridgeRoute,
        message: &Message,
        body: &[u8],
        token: Option<&ProviderToken>,
    ) -> Result<hyper::Request<Full<Bytes>>, http::Error> {
        let mut b = hyper::Request::post(format!("{}/3/device/{}", self.base_url, route.token))
            .header("apns-topic", &self.topic)
            .header("apns-push-type", "alert")
            .header("apns-priority", apns_payload::priority(message.urgency))
            .header("apns-expiration", apns_payload::expiration(message))
            .header("content-type", "application/json");
        if let Some(id) = apns_payload::collapse_id(message) {
            b = b.header("apns-collapse-id", id);
        }
        if let Some(t) = token {
            b = b.header("authorization", format!("bearer {}", t.jwt));
        }
        b.body(Full::new(Bytes::copy_from_slice(body)))
    }

    async fn exchange(&self, request: hyper::Request<Full<Bytes>>) -> Result<Answer, String> {
        let response = self
            .client
            .request(request)
            .await
            .map_err(|e| format!("request failed: {}", error_chain(&e)))?;
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after);
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("answer cut off: {}", error_chain(&e)))?
            .to_bytes();
        Ok(Answer::Status {
            status,
            reason: reason(&body),
            retry_after,
        })
    }

    fn token(&self, fresh: (ProviderToken, bool)) -> ProviderToken {
        if fresh.1 {
            self.metrics
                .bridge_token_refreshes
                .with_label_values(&["apns", self.app_id.as_str()])
                .inc();
        }
        fresh.0
    }
}

#[async_trait::async_trait]
impl Bridge for ApnsBridge {
    fn kind(&self) -> BridgeKind {
        BridgeKind::Apns
    }

    fn app_id(&self) -> &str {
        &self.app_id
    }

    fn fits(&self, message: &Message) -> bool {
        apns_payload::fits(message)
    }

    async fn send(&self, route: &BridgeRoute, message: &Message, now: u64) -> Delivery {
        let body = match apns_payload::payload(message, route.aps.as_deref()) {
            Ok(b) => b,
            Err(reason) => return Delivery::Rejected { reason },
        };
        // A registration's own `aps` can make a message that passed `fits`
        // too large; APNs would refuse it (413), so don't ask.
        if body.len() > MAX_PAYLOAD {
            return Delivery::Rejected {
                reason: format!(
                    "payload of {} bytes exceeds APNs' {MAX_PAYLOAD}",
                    body.len()
                ),
            };
        }
        let mut token = self.tokens.as_ref().map(|t| self.token(t.get(now)));
        let answer = self.post(route, message, &body, token.as_ref()).await;
        match classify(&answer) {
            Verdict::Done(d) => d,
            Verdict::TokenExpired => {
                // APNs judges the token's age by its own clock; make a new
                // one and try once more. A second refusal means the clocks
                // disagree or the key is wrong: nothing a retry mends.
                let (Some(tokens), Some(refused)) = (&self.tokens, &token) else {
                    return Delivery::Retry {
                        after: Some(CREDENTIALS_PAUSE),
                        reason: refusal(&answer),
                    };
                };
                token = Some(self.token(tokens.renew(refused, now)));
                let again = self.post(route, message, &body, token.as_ref()).await;
                match classify(&again) {
                    Verdict::Done(d) => d,
                    // A fresh token called expired: the clocks disagree.
                    Verdict::TokenExpired => Delivery::Retry {
                        after: Some(CREDENTIALS_PAUSE),
                        reason: refusal(&again),
                    },
                }
            }
        }
    }
}

/// What came back from one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    Status {
        status: u16,
        /// APNs' `reason`, when the body held one.
        reason: Option<String>,
        retry_after: Option<Duration>,
    },
    /// No answer: connection refused or lost, TLS failure, timeout.
    Failed(String),
}

/// What to do about an answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Done(Delivery),
    /// 403 `ExpiredProviderToken`: send again with a new token.
    TokenExpired,
}

/// The failure table of proto-docs/bridges.md ("APNs").
pub fn classify(answer: &Answer) -> Verdict {
    let (status, reason, retry_after) = match answer {
        Answer::Failed(e) => {
            return Verdict::Done(Delivery::Retry {
                after: None,
                reason: e.clone(),
            })
        }
        Answer::Status {
            status,
            reason,
            retry_after,
        } => (*status, reason.as_deref(), *retry_after),
    };
    let said = || format!("APNs {status} {}", reason.unwrap_or("(no reason)"));
    Verdict::Done(match (status, reason) {
        (200, _) => Delivery::Accepted,
        (403, Some("ExpiredProviderToken")) => return Verdict::TokenExpired,
        (410, _) | (400, Some("BadDeviceToken" | "DeviceTokenNotForTopic")) => {
            Delivery::Gone { reason: said() }
        }
        (429, _) | (500..=599, _) => Delivery::Retry {
            after: retry_after,
            reason: said(),
        },
        // InvalidProviderToken, MissingProviderToken, BadCertificate…:
        // Herald's credentials, not the message, are refused.
        (403, _) => Delivery::Retry {
            after: Some(CREDENTIALS_PAUSE),
            reason: said(),
        },
        _ => Delivery::Rejected { reason: said() },
    })
}

/// What APNs said, for logs and `Delivery` reasons.
fn refusal(answer: &Answer) -> String {
    match answer {
        Answer::Status { status, reason, .. } => {
            format!(
                "APNs {status} {}",
                reason.as_deref().unwrap_or("(no reason)")
            )
        }
        Answer::Failed(e) => e.clone(),
    }
}

/// APNs' error body: `{"reason": "...", "timestamp": ...}`.
pub fn reason(body: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    v.get("reason")?.as_str().map(str::to_string)
}

/// `Retry-After` as delay-seconds. APNs documents none; an HTTP date (or
/// anything else) leaves the retry schedule to the caller's backoff.
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    value.trim().parse::<u64>().ok().map(Duration::from_secs)
}

/// hyper's errors say little at the top ("client error (Connect)"); the
/// cause is further down.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

/// A client certificate chain and its key, for certificate authentication.
type Identity = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>);

fn client_identity(certificate: &Path, key: &Path) -> anyhow::Result<Identity> {
    let certs = pem_certificates(certificate, "certificate")?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| {
        anyhow::anyhow!(
            "key {}: no usable private key in PEM form ({e})",
            key.display()
        )
    })?;
    Ok((certs, key))
}

fn pem_certificates(path: &Path, what: &str) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| anyhow::anyhow!("{what} {}: cannot read it ({e})", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("{what} {}: not PEM ({e})", path.display()))?;
    if certs.is_empty() {
        bail!("{what} {}: holds no certificate", path.display());
    }
    Ok(certs)
}

/// The public roots, plus `ca` when set; with a client certificate when
/// APNs is to know the app by it.
fn tls_config(
    ca: Option<&Path>,
    identity: Option<Identity>,
) -> anyhow::Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = ca {
        for cert in pem_certificates(path, "ca")? {
            roots
                .add(cert)
                .with_context(|| format!("ca {}: an unusable certificate", path.display()))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_root_certificates(roots);
    Ok(match identity {
        None => builder.with_no_client_auth(),
        Some((certs, key)) => builder
            .with_client_auth_cert(certs, key)
            .context("certificate and key do not form a usable pair")?,
    })
}

/// HTTP/2 only, ALPN `h2`; pings keep the connection open through NATs
/// and tell a dead one from an idle one.
fn http2_client(tls: rustls::ClientConfig) -> HttpsClient {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(REQUEST_TIMEOUT));
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http2()
        .wrap_connector(http);
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(600))
        .http2_keep_alive_interval(Duration::from_secs(60))
        .http2_keep_alive_timeout(Duration::from_secs(20))
        .build(connector)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(status: u16, reason: Option<&str>, retry_after: Option<u64>) -> Verdict {
        classify(&Answer::Status {
            status,
            reason: reason.map(str::to_string),
            retry_after: retry_after.map(Duration::from_secs),
        })
    }

    fn kind(v: Verdict) -> &'static str {
        match v {
            Verdict::TokenExpired => "token",
            Verdict::Done(Delivery::Accepted) => "accepted",
            Verdict::Done(Delivery::Gone { .. }) => "gone",
            Verdict::Done(Delivery::Retry { .. }) => "retry",
            Verdict::Done(Delivery::Rejected { .. }) => "rejected",
        }
    }

    #[test]
    fn the_failure_table() {
        let table = [
            (200, None, "accepted"),
            (410, Some("Unregistered"), "gone"),
            (410, Some("ExpiredToken"), "gone"),
            (410, None, "gone"),
            (400, Some("BadDeviceToken"), "gone"),
            (400, Some("DeviceTokenNotForTopic"), "gone"),
            (400, Some("BadCollapseId"), "rejected"),
            (400, Some("TopicDisallowed"), "rejected"),
            (403, Some("ExpiredProviderToken"), "token"),
            (403, Some("InvalidProviderToken"), "retry"),
            (403, Some("BadCertificate"), "retry"),
            (413, Some("PayloadTooLarge"), "rejected"),
            (429, Some("TooManyRequests"), "retry"),
            (429, Some("TooManyProviderTokenUpdates"), "retry"),
            (500, Some("InternalServerError"), "retry"),
            (503, Some("ServiceUnavailable"), "retry"),
            (502, None, "retry"),
        ];
        for (s, r, want) in table {
            assert_eq!(kind(status(s, r, None)), want, "{s} {r:?}");
        }
        assert_eq!(kind(classify(&Answer::Failed("reset".into()))), "retry");
    }

    #[test]
    fn retry_after_is_honoured() {
        assert_eq!(
            status(429, Some("TooManyRequests"), Some(30)),
            Verdict::Done(Delivery::Retry {
                after: Some(Duration::from_secs(30)),
                reason: "APNs 429 TooManyRequests".into()
            })
        );
        assert_eq!(parse_retry_after(" 120 "), Some(Duration::from_secs(120)));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), None);
    }

    #[test]
    fn reasons_are_read_from_the_body() {
        assert_eq!(
            reason(br#"{"reason":"Unregistered","timestamp":1700000000000}"#),
            Some("Unregistered".into())
        );
        assert_eq!(reason(b""), None);
        assert_eq!(reason(b"<html>"), None);
        assert_eq!(reason(br#"{"reason":3}"#), None);
    }
}
