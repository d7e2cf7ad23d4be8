//! `POST /_matrix/push/v1/notify`: read and check the whole request, judge
//! every pushkey, then push to each device that is an unbound endpoint of
//! this Herald, through the same admission and `endpoint::accept` as any
//! push. Herald never makes a request to a pushkey: one that is not its
//! own is answered in `rejected`, nothing more.

use super::payload::{self, Delivery};
use super::pushkey;
use super::request;
use crate::admission;
use crate::app::App;
use crate::endpoint::{self, Issuer, Push};
use crate::errors::{ApiError, Errno};
use crate::reply::{json, Response};
use crate::token::EndpointToken;
use bytes::Bytes;
use herald_proto::headers::NotificationHeaders;
use http::StatusCode;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use std::sync::Arc;

/// The largest notify request read. A Matrix event is at most 64 KiB, and
/// the notification carries at most its content plus a few names; what is
/// pushed is smaller still (`max_message_bytes`, the content dropped
/// first).
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// A pushkey, judged before anything is pushed.
enum Device {
    Target {
        pushkey: String,
        target: EndpointToken,
        issuer: Issuer,
    },
    Rejected(String),
}

/// What became of one device.
enum Fate {
    Pushed,
    /// Gone (410): the homeserver should delete its pusher.
    Rejected,
    /// Refused for now (a quota, a full mailbox, the store): neither pushed
    /// nor rejected, since rejecting would delete a good pusher.
    Held(ApiError),
    /// Refused for good for this message only (too large for the device's
    /// bridge even without content): dropped, the pusher kept.
    Dropped,
}

/// Handles one notify request and counts its outcome.
pub async fn notify(app: &Arc<App>, req: http::Request<Incoming>) -> Result<Response, ApiError> {
    let result = answer(app, req).await;
    let outcome = match &result {
        Ok(_) => "ok",
        Err(e) if e.status == 400 || e.status == 413 => "malformed",
        Err(e) if e.status == 403 || e.status == 429 => "throttled",
        Err(_) => "error",
    };
    app.metrics
        .matrix_notifications
        .with_label_values(&[outcome])
        .inc();
    result
}

async fn answer(app: &Arc<App>, req: http::Request<Incoming>) -> Result<Response, ApiError> {
    let (parts, body) = req.into_parts();
    // A homeserver signs nothing: it is admitted as any push without VAPID,
    // by its address, once per request, before its body is read.
    let client = crate::peer::client_addr(&app.settings, &parts);
    let sender = admission::Sender {
        client,
        key: None,
        sub: None,
    };
    admission::admit_sender(app, &sender).await?;
    let body = read_body(&parts.headers, body).await?;
    let notify = request::parse(&body)
        .map_err(|m| ApiError::new(400, Errno::InvalidMatrixNotification, m.0))?;
    let max = app.settings.max_message_bytes;
    let bodies: Vec<Bytes> = payload::bodies(&notify.notification, max)
        .into_iter()
        .map(Bytes::from)
        .collect();
    if bodies.is_empty() {
        return Err(ApiError::new(
            413,
            Errno::TooLarge,
            format!("this notification is larger than max_message_bytes ({max}) even without its content"),
        ));
    }
    let delivery = payload::delivery(&notify, app.settings.max_ttl);
    let mut rejected = Vec::new();
    let mut pushed = 0u64;
    let mut held = None;
    for device in resolve(app, &notify.pushkeys) {
        let (pushkey, target, issuer) = match device {
            Device::Rejected(key) => {
                rejected.push(key);
                continue;
            }
            Device::Target {
                pushkey,
                target,
                issuer,
            } => (pushkey, target, issuer),
        };
        match push(app, &target, issuer, &delivery, &bodies).await {
            Fate::Pushed => pushed += 1,
            Fate::Rejected => rejected.push(pushkey),
            Fate::Held(e) => {
                held.get_or_insert(e);
            }
            Fate::Dropped => {}
        }
    }
    let devices = &app.metrics.matrix_devices;
    devices.with_label_values(&["pushed"]).inc_by(pushed);
    // Nothing delivered and something held: the homeserver retries the
    // whole request later (429 or 503 with Retry-After, as for any push),
    // which duplicates nothing. Once one device has it, a retry would
    // duplicate that one's, so the held ones miss this notification.
    if let (0, Some(e)) = (pushed, held) {
        return Err(e);
    }
    devices
        .with_label_values(&["rejected"])
        .inc_by(rejected.len() as u64);
    Ok(json(
        StatusCode::OK,
        serde_json::json!({ "rejected": rejected }).to_string(),
    ))
}

/// Which pushkeys are endpoints this Herald issued and may push to without
/// VAPID. A subscription bound to an application server key takes only
/// pushes signed with that key; the gateway cannot sign as that sender,
/// and pushing unsigned would let anyone who knows the URL bypass VAPID.
fn resolve(app: &App, pushkeys: &[String]) -> Vec<Device> {
    let autopush = app.settings.autopush_crypto_keys.is_some();
    pushkeys
        .iter()
        .map(|key| {
            let opened = pushkey::endpoint(key, autopush)
                .and_then(|(path, token)| endpoint::open_target(app, path, token).ok());
            match opened {
                Some((target, issuer)) if target.key_hash.is_none() => Device::Target {
                    pushkey: key.clone(),
                    target,
                    issuer,
                },
                Some(_) => {
                    tracing::debug!(
                        "matrix pushkey rejected: its subscription is bound to a VAPID key"
                    );
                    Device::Rejected(key.clone())
                }
                None => {
                    tracing::debug!(
                        "matrix pushkey rejected: not an endpoint of this push service"
                    );
                    Device::Rejected(key.clone())
                }
            }
        })
        .collect()
}

/// Pushes to one device: the whole notification, or without its content
/// when that is all the device's bridge takes.
async fn push(
    app: &Arc<App>,
    target: &EndpointToken,
    issuer: Issuer,
    delivery: &Delivery,
    bodies: &[Bytes],
) -> Fate {
    if let Err(e) = admission::admit_receiver(app, target).await {
        return Fate::Held(e);
    }
    for data in bodies {
        let push = Push {
            ttl: delivery.ttl,
            urgency: delivery.urgency,
            topic: delivery.topic.clone(),
            // Made by Herald itself, so plaintext: see proto-docs/websocket.md.
            headers: Some(NotificationHeaders::identity()),
            data: data.clone(),
            receipt: None,
        };
        match endpoint::accept(app, target, issuer, push).await {
            Ok(_) => return Fate::Pushed,
            Err(e) if e.errno == Errno::TooLarge => continue,
            Err(e) if e.status == 410 => return Fate::Rejected,
            Err(e) if e.status == 429 || e.status >= 500 => return Fate::Held(e),
            Err(e) => {
                tracing::warn!(errno = %e.errno, "matrix notification not pushed: {}", e.message);
                return Fate::Dropped;
            }
        }
    }
    tracing::debug!("matrix notification dropped: too large for this device's bridge");
    Fate::Dropped
}

async fn read_body(h: &http::HeaderMap, body: Incoming) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError::new(
            413,
            Errno::TooLarge,
            format!("a notify request is at most {MAX_REQUEST_BYTES} bytes"),
        )
    };
    if h.get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|l| l.trim().parse::<u64>().ok())
        .is_some_and(|l| l > MAX_REQUEST_BYTES as u64)
    {
        return Err(too_large());
    }
    let limited = Limited::new(body, MAX_REQUEST_BYTES).collect();
    let collected = tokio::time::timeout(endpoint::BODY_READ_TIMEOUT, limited)
        .await
        .map_err(|_| ApiError::body_timeout(endpoint::BODY_READ_TIMEOUT.as_secs()))?;
    match collected {
        Ok(c) => Ok(c.to_bytes()),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            Err(too_large())
        }
        Err(_) => Err(ApiError::new(
            400,
            Errno::UnreadableBody,
            "could not read the request body",
        )),
    }
}
