//! The bridge to Firebase Cloud Messaging (HTTP v1) for one app: Firefox for
//! Android and other Android apps. `POST {base_url}/v1/projects/{project_id}
//! /messages:send` with an OAuth2 access token (`fcm_auth`); the body and
//! the meaning of each answer are pure code in `fcm_wire`.

use crate::bridge::fcm_auth::{AccessTokens, ServiceAccount, TokenError};
use crate::bridge::fcm_wire::{self, Verdict};
use crate::bridge::{Bridge, Delivery, CREDENTIALS_PAUSE};
use crate::config::FcmBridgeSettings;
use crate::metrics::Metrics;
use crate::store::{BridgeKind, BridgeRoute, Message};
use anyhow::{anyhow, bail};
use bytes::Bytes;
use herald_client::http::{HttpClient, PooledClient};
use http_body_util::{BodyExt, Full};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// FCM's own host, where `base_url` points unless set.
pub const DEFAULT_BASE_URL: &str = "https://fcm.googleapis.com";

/// How long a request to FCM or the token endpoint may take before the
/// message is kept for a later try.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

pub struct FcmBridge {
    app_id: String,
    send_url: String,
    client: PooledClient<Full<Bytes>>,
    tokens: AccessTokens,
    timeout: Duration,
    metrics: Arc<Metrics>,
}

/// One answer of `messages:send`.
struct Answer {
    status: u16,
    retry_after: Option<String>,
    body: Bytes,
}

impl FcmBridge {
    /// Reads the service-account file and checks the settings; an error
    /// names the `[bridges.fcm.<app_id>]` entry and what is wrong.
    pub fn new(settings: &FcmBridgeSettings, metrics: Arc<Metrics>) -> anyhow::Result<FcmBridge> {
        let entry = format!("[bridges.fcm.{}]", settings.app_id);
        let project = &settings.project_id;
        if project.is_empty()
            || !project
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        {
            bail!("{entry}: project_id {project:?} is not a Firebase project id");
        }
        let base = settings.base_url.trim_end_matches('/');
        match base.parse::<http::Uri>() {
            Ok(u) if matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some() => {}
            _ => bail!("{entry}: base_url {base:?} is not an http(s) URL"),
        }
        // One line naming the entry and the cause, however it is printed.
        let account =
            ServiceAccount::load(&settings.credentials).map_err(|e| anyhow!("{entry}: {e:#}"))?;
        let client = HttpClient::new(settings.ca.as_deref())
            .map_err(|e| anyhow!("{entry}: ca: {e:#}"))?
            .pooled();
        let tokens = AccessTokens::new(
            account,
            client.clone(),
            REQUEST_TIMEOUT,
            metrics.clone(),
            settings.app_id.clone(),
        );
        Ok(FcmBridge {
            app_id: settings.app_id.clone(),
            send_url: format!("{base}/v1/projects/{project}/messages:send"),
            client,
            tokens,
            timeout: REQUEST_TIMEOUT,
            metrics,
        })
    }

    /// Another limit than `REQUEST_TIMEOUT` for each request (tests).
    pub fn with_timeout(mut self, timeout: Duration) -> FcmBridge {
        self.timeout = timeout;
        self.tokens.set_timeout(timeout);
        self
    }

    /// Where messages are POSTed.
    pub fn send_url(&self) -> &str {
        &self.send_url
    }

    /// One `messages:send`, counted by status and timed. `Err` when no
    /// answer came (connection failed, or not within the timeout).
    async fn post(&self, token: &str, body: &[u8]) -> Result<Answer, String> {
        let req = http::Request::post(&self.send_url)
            .header("authorization", format!("Bearer {token}"))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::copy_from_slice(body)))
            .map_err(|e| format!("cannot build the request: {e}"))?;
        let started = Instant::now();
        let answer = tokio::time::timeout(self.timeout, async {
            let resp = self.client.request(req).await?;
            let status = resp.status().as_u16();
            let retry_after = resp
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let body = resp.into_body().collect().await?.to_bytes();
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(Answer {
                status,
                retry_after,
                body,
            })
        })
        .await;
        self.metrics
            .bridge_request_seconds
            .with_label_values(&["fcm", &self.app_id])
            .observe(started.elapsed().as_secs_f64());
        let result = match answer {
            Err(_) => Err(format!("no answer from FCM within {:?}", self.timeout)),
            Ok(Err(e)) => Err(format!("FCM request failed: {e}")),
            Ok(Ok(a)) => Ok(a),
        };
        let status = match &result {
            Ok(a) => a.status.to_string(),
            Err(_) => "error".to_owned(),
        };
        self.metrics
            .bridge_requests
            .with_label_values(&["fcm", &self.app_id, &status])
            .inc();
        result
    }

    /// Sends with the current token; `Err` carries the refused token.
    async fn attempt(&self, body: &[u8], now: u64) -> Result<Delivery, Arc<str>> {
        let token = match self.tokens.get().await {
            Ok(t) => t,
            Err(e) => return Ok(token_failure(e)),
        };
        match self.post(&token, body).await {
            Err(reason) => Ok(Delivery::Retry {
                after: None,
                reason,
            }),
            Ok(a) => match fcm_wire::classify(a.status, a.retry_after.as_deref(), &a.body, now) {
                Verdict::Done(d) => Ok(d),
                Verdict::Unauthorized(_) => Err(token),
            },
        }
    }
}

/// A message that cannot be sent for want of a token.
fn token_failure(e: TokenError) -> Delivery {
    match e {
        TokenError::Unavailable(reason) => Delivery::Retry {
            after: None,
            reason: format!("no FCM access token: {reason}"),
        },
        TokenError::Refused(reason) => Delivery::Retry {
            after: Some(CREDENTIALS_PAUSE),
            reason: format!("no FCM access token: {reason}"),
        },
    }
}

#[async_trait::async_trait]
impl Bridge for FcmBridge {
    fn kind(&self) -> BridgeKind {
        BridgeKind::Fcm
    }

    fn app_id(&self) -> &str {
        &self.app_id
    }

    fn fits(&self, message: &Message) -> bool {
        fcm_wire::fits(message)
    }

    async fn send(&self, route: &BridgeRoute, message: &Message, now: u64) -> Delivery {
        let body = fcm_wire::request_body(&route.token, message, now);
        match self.attempt(&body, now).await {
            Ok(d) => d,
            // FCM refused the token (revoked, or expired early): one new
            // token and one more try; a second refusal is the credentials'
            // fault, not the message's timing.
            Err(stale) => {
                self.tokens.discard(&stale).await;
                match self.attempt(&body, now).await {
                    Ok(d) => d,
                    Err(_) => Delivery::Retry {
                        after: Some(CREDENTIALS_PAUSE),
                        reason: "FCM answered 401 to a fresh access token: check the \
                                 service account's permissions on the project"
                            .into(),
                    },
                }
            }
        }
    }
}
