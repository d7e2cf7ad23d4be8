//! The application-server side (RFC 8030 §5): accepting push messages on
//! endpoint URLs, cancelling them, and the UnifiedPush discovery answer.

use crate::admission;
use crate::app::App;
use crate::errors::{ApiError, Errno};
use crate::mailbox::{Mailbox, Refused};
use crate::receipts::{self, api::ReceiptRequest};
use crate::reply::{json, Response};
use crate::router::RouteResult;
use crate::store::{now_secs, BridgeRoute, ChannelRecord, Message, OwnerSeen};
use crate::token::{ApiVersion, EndpointToken, MessageId};
use crate::vapid::{parse_credentials, CacheResult};
use crate::webpush::{check_encoding, parse_topic, parse_ttl, parse_urgency};
use bytes::Bytes;
use herald_proto::headers::NotificationHeaders;
use http::{HeaderMap, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use std::sync::Arc;

/// How long a push body may take to arrive once the headers are in. hyper's
/// `header_read_timeout` covers only the headers: without this a sender
/// trickling its body a byte at a time holds a connection and a task
/// forever (slowloris).
pub const BODY_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// What a push request asks for, parsed from its headers.
struct PushRequest {
    ttl: u64,
    urgency: herald_proto::urgency::Urgency,
    topic: Option<String>,
    receipt: Option<ReceiptRequest>,
}

/// How an endpoint URL names its token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndpointPath {
    /// `/wpush/v1/<token>` or `/wpush/v2/<token>`.
    Versioned(ApiVersion),
    /// `/wpush/<token>`: autopush-rs's oldest form, which it read as v1.
    /// Herald never issued it.
    AutopushLegacy,
}

/// The subscription an endpoint names. Herald's own tokens first; then,
/// with `autopush_crypto_keys` set, autopush-rs's (told apart by length,
/// see `autopush_token::has_autopush_shape`). A token neither opens is
/// answered exactly as a forged Herald token.
/// Who sealed an endpoint token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Issuer {
    Herald,
    /// autopush-rs, under one of `autopush_crypto_keys`.
    Autopush,
}

pub fn open_target(
    app: &App,
    path: EndpointPath,
    token: &str,
) -> Result<(EndpointToken, Issuer), ApiError> {
    let autopush = app.settings.autopush_crypto_keys.as_ref();
    let from_autopush = |v| {
        autopush
            .and_then(|a| a.open_endpoint(v, token))
            .map(|t| (t, Issuer::Autopush))
    };
    let opened = match path {
        EndpointPath::Versioned(v) => app
            .tokens
            .open_endpoint(v, token)
            .map(|t| (t, Issuer::Herald))
            .or_else(|| from_autopush(v)),
        EndpointPath::AutopushLegacy => from_autopush(ApiVersion::V1),
    };
    opened.ok_or_else(ApiError::invalid_endpoint)
}

/// `POST /wpush/{v1,v2}/<token>`: parse, authorise, admit, read the body,
/// then `accept` and answer.
pub async fn push(
    app: &Arc<App>,
    path: EndpointPath,
    token: &str,
    req: http::Request<Incoming>,
) -> Result<Response, ApiError> {
    let (target, issuer) = open_target(app, path, token)?;
    let (parts, body) = req.into_parts();
    let h = &parts.headers;
    let request = parse(app, h)?;
    let signed = authorise(app, &target, h)?;
    let client = crate::peer::client_addr(&app.settings, &parts);
    admission::admit_sender(
        app,
        &admission::Sender {
            client,
            key: signed.as_ref().map(|s| &s.key_hash),
            sub: signed.as_ref().and_then(|s| s.sub.as_deref()),
        },
    )
    .await?;
    let sender = signed.map(|s| s.key_hash);
    admission::admit_receiver(app, &target).await?;
    let receipt = request
        .receipt
        .map(|r| receipts::api::bind(r, sender, &app.tokens))
        .transpose()?;
    let (headers, data) = read_body(app, h, body).await?;
    let push = Push {
        ttl: request.ttl,
        urgency: request.urgency,
        topic: request.topic,
        headers,
        data,
        receipt: receipt.as_ref().map(|(sub, _)| *sub),
    };
    let accepted = accept(app, &target, issuer, push).await?;

    let base = &app.settings.public_url.base;
    let mut response = http::Response::builder()
        .header("location", format!("{base}/m/{}", accepted.message_id))
        .header("ttl", accepted.ttl.to_string());
    response = match &receipt {
        // RFC 8030 §5.1: accepted for delivery with confirmation.
        Some((_, token)) => response
            .status(StatusCode::ACCEPTED)
            .header("link", receipts::api::link_header(base, token)),
        None => response.status(StatusCode::CREATED),
    };
    Ok(response
        .body(Full::new(Bytes::new()))
        .expect("valid response"))
}

/// A push whose sender is admitted and whose body is read: what `accept`
/// stores and routes.
pub struct Push {
    pub ttl: u64,
    pub urgency: herald_proto::urgency::Urgency,
    pub topic: Option<String>,
    pub headers: Option<NotificationHeaders>,
    pub data: Bytes,
    /// The receipt subscription to report the message's fate to.
    pub receipt: Option<crate::store::ReceiptSub>,
}

/// What `accept` answers: the message's id (its `/m/` resource) and TTL.
pub struct Accepted {
    pub message_id: String,
    pub ttl: u64,
}

/// Checks the subscription, persists the message and routes it to its user
/// agent (a connection here or on another node, or a bridge). Shared by
/// the endpoint and the Matrix push gateway.
pub async fn accept(
    app: &Arc<App>,
    target: &EndpointToken,
    issuer: Issuer,
    push: Push,
) -> Result<Accepted, ApiError> {
    let bridged = check_subscription(app, target, issuer).await?;
    let mut message = Message {
        seq: app.store.next_seq(),
        channel: target.channel,
        expires_at: now_secs().saturating_add(push.ttl),
        ttl: push.ttl,
        urgency: push.urgency,
        topic: push.topic,
        headers: push.headers,
        data: push.data,
        receipt: push.receipt.is_some(),
    };
    if let Some(route) = &bridged {
        check_bridge(app, target, route, &message)?;
    }
    let accepted = Mailbox::of(app)
        .accept(&target.uaid, &message, push.receipt)
        .await
        .map_err(|refused| match refused {
            Refused::Full(limit) => ApiError::too_many_stored(limit),
            Refused::Store(e) => ApiError::storage(e),
        })?;
    message.seq = accepted.seq;
    let (ttl, seq, urgency) = (message.ttl, message.seq, message.urgency);
    match bridged {
        Some(r) => crate::bridge::forward::accepted(app, target.uaid, r, message).await,
        None => route(app, &target.uaid, message, accepted.owner).await?,
    }
    app.metrics
        .messages_accepted
        .with_label_values(&[urgency.as_str()])
        .inc();
    let message_id = app.tokens.message_id(&MessageId {
        uaid: target.uaid,
        channel: target.channel,
        seq,
    });
    Ok(Accepted { message_id, ttl })
}

fn parse(app: &App, h: &HeaderMap) -> Result<PushRequest, ApiError> {
    Ok(PushRequest {
        ttl: parse_ttl(header(h, "ttl"), app.settings.max_ttl)?,
        urgency: parse_urgency(header(h, "urgency"))?,
        topic: parse_topic(header(h, "topic"))?,
        receipt: receipts::api::requested(h)?,
    })
}

/// Who is sending: a key-bound subscription only takes its own key.
/// Returns the sender (its key and `sub`) when it signed with VAPID.
fn authorise(
    app: &App,
    target: &EndpointToken,
    h: &HeaderMap,
) -> Result<Option<crate::vapid::Verified>, ApiError> {
    let creds = parse_credentials(header(h, "authorization"), header(h, "crypto-key"))?;
    match (&target.key_hash, creds) {
        (Some(_), None) => Err(ApiError::unauthorized(
            "missing",
            "this subscription requires VAPID: send Authorization: vapid t=<JWT>, k=<key>",
        )),
        (bound, Some(c)) => {
            let (sender, cache) = app.vapid.verify(&c, now_secs())?;
            let result = if cache == CacheResult::Hit {
                "hit"
            } else {
                "miss"
            };
            app.metrics.jwt_cache.with_label_values(&[result]).inc();
            if bound.is_some_and(|b| b != sender.key_hash) {
                return Err(ApiError::key_mismatch());
            }
            Ok(Some(sender))
        }
        (None, None) => Ok(None),
    }
}

/// The payload and the headers its user agent needs to decrypt it.
async fn read_body(
    app: &App,
    h: &HeaderMap,
    body: Incoming,
) -> Result<(Option<NotificationHeaders>, Bytes), ApiError> {
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
                ApiError::new(
                    400,
                    Errno::UnreadableBody,
                    "could not read the request body",
                )
            }
        })?
        .to_bytes();
    if data.is_empty() {
        return Ok((None, data));
    }
    let headers = check_encoding(
        header(h, "content-encoding"),
        header(h, "encryption"),
        header(h, "crypto-key"),
        &data,
    )?;
    Ok((Some(headers), data))
}

/// The user agent is still known and the subscription still has the key
/// the endpoint was issued for. Returns the route of a bridged user agent.
async fn check_subscription(
    app: &App,
    target: &EndpointToken,
    issuer: Issuer,
) -> Result<Option<BridgeRoute>, ApiError> {
    let (user, channel) = app
        .metrics
        .time(
            "get_user_and_channel",
            app.store
                .get_user_and_channel(&target.uaid, &target.channel),
        )
        .await
        .map_err(ApiError::storage)?;
    let router = match user {
        Some(u) if u.last_seen + app.settings.ua_expiry.as_secs() > now_secs() => u.router,
        _ => return Err(ApiError::user_gone()),
    };
    // A channel re-registered with another key no longer answers to the old
    // endpoint. autopush-rs kept no key with a channel, so one imported from
    // it has none on record: its v2 endpoint carries the key's hash sealed
    // under autopush's own keys, and `authorise` has already held the
    // sender to it.
    let bound = |c: ChannelRecord| {
        c.key_hash == target.key_hash || (issuer == Issuer::Autopush && c.key_hash.is_none())
    };
    if !channel.is_some_and(bound) {
        return Err(ApiError::subscription_gone());
    }
    Ok(router)
}

/// A bridged user agent is reachable only through a bridge this node has,
/// and only with what fits that upstream's size limit (smaller than
/// `max_message_bytes` once the bridge has wrapped the payload).
fn check_bridge(
    app: &App,
    target: &EndpointToken,
    route: &BridgeRoute,
    message: &Message,
) -> Result<(), ApiError> {
    let Some(bridge) = app.bridges.get(route.kind, &route.app_id) else {
        tracing::warn!(
            uaid = %target.uaid.short(),
            bridge = route.kind.as_str(),
            app = %route.app_id,
            "push refused: no bridge is configured for this bridged user agent's app"
        );
        return Err(ApiError::user_gone());
    };
    if !bridge.fits(message) {
        return Err(ApiError::too_large_for_bridge(route.kind.as_str()));
    }
    Ok(())
}

/// Hands the message to its user agent's connection, wherever it is. A
/// TTL-0 message whose user agent the store could not place is refused
/// (503): 201 says it was handed over or that no connection was there to
/// take it, and neither is known; the sender may try again.
async fn route(
    app: &App,
    uaid: &herald_proto::ids::Uaid,
    message: Message,
    owner: OwnerSeen,
) -> Result<(), ApiError> {
    let (ttl, seq, receipt) = (message.ttl, message.seq, message.receipt);
    // One allocation shared by the router and the connection.
    let routed = app.router.route(uaid, Arc::new(message), owner).await;
    if ttl > 0 {
        // Stored: whoever reads the store next delivers it.
        return Ok(());
    }
    match routed {
        RouteResult::Queued | RouteResult::Woken => {}
        RouteResult::Unknown => {
            if receipt {
                app.receipts.forget(uaid, seq).await;
            }
            return Err(ApiError::storage(crate::store::StoreError::Unavailable(
                "the user agent's node could not be looked up for a TTL-0 message".into(),
            )));
        }
        RouteResult::NotConnected | RouteResult::Backlogged => app
            .metrics
            .messages_dropped
            .with_label_values(&["ttl0_offline"])
            .inc(),
    }
    Ok(())
}

/// `DELETE /m/<id>`: cancel a message that has not been acknowledged.
pub async fn cancel(app: &App, id: &str) -> Result<Response, ApiError> {
    let id = app
        .tokens
        .open_message_id(id)
        .ok_or_else(ApiError::no_message)?;
    let existed = Mailbox::of(app)
        .cancel(&id.uaid, id.seq)
        .await
        .map_err(ApiError::storage)?;
    if !existed {
        return Err(ApiError::no_message());
    }
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
pub fn discovery(app: &App, path: EndpointPath, token: &str) -> Result<Response, ApiError> {
    open_target(app, path, token)?;
    Ok(json(
        StatusCode::OK,
        r#"{"unifiedpush":{"version":1}}"#.to_string(),
    ))
}
