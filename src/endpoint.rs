//! The application-server side (RFC 8030 §5): accepting push messages on
//! endpoint URLs, cancelling them, and the UnifiedPush discovery answer.

use crate::app::App;
use crate::errors::ApiError;
use crate::router::RouteResult;
use crate::store::{now_secs, Message, StoreError};
use crate::token::{ApiVersion, MessageId};
use crate::vapid::{parse_credentials, CacheResult};
use crate::webpush::{check_encoding, parse_topic, parse_ttl, parse_urgency};
use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use std::sync::Arc;

pub type Response = http::Response<Full<Bytes>>;

/// How long a push body may take to arrive once the headers are in. hyper's
/// `header_read_timeout` covers only the headers: without this a sender
/// trickling its body a byte at a time holds a connection and a task
/// forever (slowloris).
pub const BODY_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

fn store_err(e: StoreError) -> ApiError {
    tracing::error!("store: {e}");
    ApiError::storage(e)
}

/// Room reserved for one message under `max_stored_messages`.
struct Reservation<'a> {
    app: &'a App,
    uaid: crate::ids::Uaid,
    added: bool,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if !self.added {
            self.app.pending.released(&self.uaid);
        }
    }
}

/// `POST /wpush/{v1,v2}/<token>`.
pub async fn push(
    app: &Arc<App>,
    version: ApiVersion,
    token: &str,
    req: http::Request<Incoming>,
) -> Result<Response, ApiError> {
    let target = app
        .tokens
        .open_endpoint(version, token)
        .ok_or_else(ApiError::invalid_endpoint)?;
    let (parts, body) = req.into_parts();
    let h = &parts.headers;
    let ttl = parse_ttl(header(h, "ttl"), app.settings.max_ttl)?;
    let urgency = parse_urgency(header(h, "urgency"))?;
    let topic = parse_topic(header(h, "topic"))?;

    // Who is sending: a key-bound subscription only takes its own key.
    let creds = parse_credentials(header(h, "authorization"), header(h, "crypto-key"))?;
    match (&target.key_hash, creds) {
        (Some(_), None) => {
            return Err(ApiError::unauthorized(
                "missing",
                "this subscription requires VAPID: send Authorization: vapid t=<JWT>, k=<key>",
            ))
        }
        (bound, Some(c)) => {
            let (sender, cache) = app.vapid.verify(&c, now_secs())?;
            let result = if cache == CacheResult::Hit {
                "hit"
            } else {
                "miss"
            };
            app.metrics.jwt_cache.with_label_values(&[result]).inc();
            if bound.is_some_and(|b| b != sender) {
                return Err(ApiError::key_mismatch());
            }
        }
        (None, None) => {}
    }

    let max = app.settings.max_message_bytes;
    if header(h, "content-length")
        .and_then(|l| l.trim().parse::<u64>().ok())
        .is_some_and(|l| l > max as u64)
    {
        return Err(ApiError::too_large(max));
    }
    let data = tokio::time::timeout(BODY_READ_TIMEOUT, Limited::new(body, max).collect())
        .await
        .map_err(|_| ApiError::body_timeout(BODY_READ_TIMEOUT.as_secs()))?
        .map_err(|e| {
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                ApiError::too_large(max)
            } else {
                ApiError::new(400, 999, "could not read the request body")
            }
        })?
        .to_bytes();
    let headers = if data.is_empty() {
        None
    } else {
        Some(check_encoding(
            header(h, "content-encoding"),
            header(h, "encryption"),
            header(h, "crypto-key"),
            &data,
        )?)
    };

    let store = &app.store;
    let user = app
        .metrics
        .time("get_user", store.get_user(&target.uaid))
        .await
        .map_err(store_err)?;
    let now = now_secs();
    match user {
        Some(u) if u.last_seen + app.settings.ua_expiry.as_secs() > now => {}
        _ => return Err(ApiError::user_gone()),
    }
    let channel = app
        .metrics
        .time(
            "get_channel",
            store.get_channel(&target.uaid, &target.channel),
        )
        .await
        .map_err(store_err)?;
    // A channel re-registered with another key no longer answers to the old
    // endpoint.
    if channel.is_none_or(|c| c.key_hash != target.key_hash) {
        return Err(ApiError::subscription_gone());
    }

    let mut message = Message {
        seq: store.next_seq(),
        channel: target.channel,
        expires_at: now.saturating_add(ttl),
        ttl,
        urgency,
        topic,
        headers,
        data,
    };
    if ttl > 0 {
        let limit = app.settings.max_stored_messages;
        let room = app
            .metrics
            .time(
                "count_messages",
                app.pending
                    .reserve(store.as_ref(), &target.uaid, now, limit),
            )
            .await
            .map_err(store_err)?;
        if !room {
            return Err(ApiError::too_many_stored(limit));
        }
        // Released on every way out, including this future being dropped
        // when the sender hangs up, unless the message was added.
        let mut reservation = Reservation {
            app,
            uaid: target.uaid,
            added: false,
        };
        let outcome = app
            .metrics
            .time("put_message", store.put_message(&target.uaid, &message))
            .await
            .map_err(store_err)?;
        if outcome.replaced {
            app.metrics.messages_replaced.inc();
        } else {
            app.pending.added(&target.uaid);
            reservation.added = true;
        }
        drop(reservation);
        message.seq = outcome.seq;
    }
    // One allocation shared by the router and the connection.
    let message = Arc::new(message);
    app.metrics
        .messages_accepted
        .with_label_values(&[urgency.as_str()])
        .inc();
    let seq = message.seq;
    let routed = app.router.route(&target.uaid, message).await;
    if ttl == 0 && !matches!(routed, RouteResult::Queued | RouteResult::Woken) {
        app.metrics
            .messages_dropped
            .with_label_values(&["ttl0_offline"])
            .inc();
    }

    let id = app.tokens.message_id(&MessageId {
        uaid: target.uaid,
        channel: target.channel,
        seq,
    });
    Ok(http::Response::builder()
        .status(StatusCode::CREATED)
        .header(
            "location",
            format!("{}/m/{id}", app.settings.public_url.base),
        )
        .header("ttl", ttl.to_string())
        .body(Full::new(Bytes::new()))
        .expect("valid response"))
}

/// `DELETE /m/<id>`: cancel a message that has not been acknowledged.
pub async fn cancel(app: &App, id: &str) -> Result<Response, ApiError> {
    let id = app
        .tokens
        .open_message_id(id)
        .ok_or_else(ApiError::no_message)?;
    let existed = app
        .metrics
        .time("delete_message", app.store.delete_message(&id.uaid, id.seq))
        .await
        .map_err(store_err)?;
    if !existed {
        return Err(ApiError::no_message());
    }
    app.pending.removed(&id.uaid);
    app.metrics
        .messages_dropped
        .with_label_values(&["cancelled"])
        .inc();
    Ok(http::Response::builder()
        .status(StatusCode::NO_CONTENT)
        .body(Full::new(Bytes::new()))
        .expect("valid response"))
}

/// `GET /wpush/...`: UnifiedPush server discovery.
pub fn discovery(app: &App, version: ApiVersion, token: &str) -> Result<Response, ApiError> {
    app.tokens
        .open_endpoint(version, token)
        .ok_or_else(ApiError::invalid_endpoint)?;
    Ok(json(
        StatusCode::OK,
        r#"{"unifiedpush":{"version":1}}"#.to_string(),
    ))
}

pub fn json(status: StatusCode, body: String) -> Response {
    http::Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("valid response")
}

pub fn error_response(e: &ApiError) -> Response {
    let mut r = json(
        StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        e.to_json(),
    );
    if let Some(secs) = e.retry_after {
        r.headers_mut().insert("retry-after", secs.into());
    }
    r
}
