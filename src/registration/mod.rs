//! The registration API of user agents that keep no websocket: Firefox for
//! Android and iOS register over HTTP and receive pushes through FCM or
//! APNs (`bridge`). The calls, shapes and statuses are the ones their push
//! component speaks to autopush-rs (proto-docs/bridges.md). Their channels
//! and endpoints are ordinary Herald ones; only the user record says which
//! upstream reaches the device.
//!
//! Each call: parse (`request`), authorise (`secret`; before the user is
//! looked up, so a dropped user agent with a valid secret hears 410/103,
//! the signal to register afresh), persist, answer.

pub mod request;
pub mod secret;

use crate::app::App;
use crate::errors::{ApiError, Errno};
use crate::mailbox::Mailbox;
use crate::policy::{self, Refusal};
use crate::reply::{json, Response};
use crate::store::{now_secs, BridgeKind, BridgeRoute, UserRecord};
use crate::subscription::{add_channel, endpoint_url, Added};
use herald_proto::ids::{ChannelId, Uaid};
use http::{header, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use request::{Op, RegisterBody, Route};
use secret::SecretKeys;

pub use request::claims;

/// Answers one registration API request (a path `claims` accepted).
pub async fn handle(app: &App, req: http::Request<Incoming>) -> Result<Response, ApiError> {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path().to_string();
    let r = request::route(&parts.method, &path)?;
    let auth = parts
        .headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let result = dispatch(app, &r, auth, body).await;
    if let Ok(kind) = request::bridge_kind(r.kind) {
        let outcome = match &result {
            Ok(_) => "ok",
            Err(e) if e.status == 401 => "unauthorized",
            Err(e) if e.status == 410 => "gone",
            Err(e) if e.status >= 500 => "error",
            Err(_) => "refused",
        };
        app.metrics
            .registrations
            .with_label_values(&[kind.as_str(), r.op.as_str(), outcome])
            .inc();
    }
    result
}

async fn dispatch(
    app: &App,
    r: &Route<'_>,
    auth: Option<&str>,
    body: Incoming,
) -> Result<Response, ApiError> {
    if r.op == Op::Register {
        let kind = request::bridge_kind(r.kind)?;
        // Private mode: a new user agent shows a token; its later calls
        // show the secret it is given.
        policy::admit_user_agent(&app.settings, crate::bearer::token(auth))
            .map_err(|refusal| refused(app, refusal))?;
        let body = request::register_body(kind, &read_body(body).await?)?;
        return register(app, kind, r.app_id, body).await;
    }
    let uaid = request::parse_uaid(r.uaid.unwrap_or_default())?;
    let secret = request::secret_of(auth)?;
    if !keys(app).verify(&uaid, secret) {
        return Err(request::wrong_secret());
    }
    let kind = request::bridge_kind(r.kind)?;
    let user = bridged_user(app, &uaid).await?;
    match r.op {
        Op::Update => {
            let body = request::register_body(kind, &read_body(body).await?)?;
            update(app, &uaid, user, kind, r.app_id, body).await
        }
        Op::Get => channel_list(app, &uaid, user, r.uaid.unwrap_or_default()).await,
        Op::Unregister => {
            Mailbox::of(app)
                .drop_user_agent(&uaid)
                .await
                .map_err(ApiError::storage)?;
            ok_empty()
        }
        Op::Subscribe => {
            let body = request::subscribe_body(&read_body(body).await?)?;
            let channel = body.channel.unwrap_or_else(ChannelId::new_v4);
            let endpoint = subscribe(app, &uaid, channel, body.key, None).await?;
            ok_json(serde_json::json!({
                "channelID": channel.hyphenated().to_string(),
                "endpoint": endpoint,
            }))
        }
        Op::Unsubscribe => {
            let chid = request::parse_chid(r.chid.unwrap_or_default())?;
            match Mailbox::of(app).unsubscribe(&uaid, &chid).await {
                Ok(true) => ok_empty(),
                Ok(false) => Err(request::no_such_subscription()),
                Err(e) => Err(ApiError::storage(e)),
            }
        }
        Op::Register => unreachable!("answered above"),
    }
}

/// The keys secrets are issued and checked with.
fn keys(app: &App) -> SecretKeys {
    SecretKeys::new(
        app.settings.bridge_auth_keys.clone(),
        app.settings.autopush_auth_keys.clone(),
    )
}

/// The request body, up to `request::MAX_BODY`.
async fn read_body(body: Incoming) -> Result<bytes::Bytes, ApiError> {
    let read = tokio::time::timeout(
        crate::endpoint::BODY_READ_TIMEOUT,
        Limited::new(body, request::MAX_BODY).collect(),
    )
    .await
    .map_err(|_| ApiError::body_timeout(crate::endpoint::BODY_READ_TIMEOUT.as_secs()))?;
    match read {
        Ok(b) => Ok(b.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(ApiError::new(
            413,
            Errno::TooLarge,
            format!("registration body larger than {} bytes", request::MAX_BODY),
        )),
        Err(_) => Err(ApiError::new(400, Errno::UnreadableBody, "unreadable body")),
    }
}

/// Refuses an `{app_id}` no bridge is configured for. autopush-rs answers
/// FCM's with 400 and errno 106; Herald does the same for both bridges.
fn check_app(app: &App, kind: BridgeKind, app_id: &str) -> Result<(), ApiError> {
    let b = &app.settings.bridges;
    let known = match kind {
        BridgeKind::Fcm => b.fcm.iter().any(|f| f.app_id == app_id),
        BridgeKind::Apns => b.apns.iter().any(|a| a.app_id == app_id),
    };
    if known {
        Ok(())
    } else {
        Err(unknown_app(kind, app_id))
    }
}

fn unknown_app(kind: BridgeKind, app_id: &str) -> ApiError {
    ApiError::new(
        400,
        Errno::SubscriptionGone,
        format!(
            "invalid app ID {app_id:?}: no {} bridge has it",
            kind.as_str()
        ),
    )
}

fn route_of(kind: BridgeKind, app_id: &str, body: RegisterBody) -> BridgeRoute {
    BridgeRoute {
        kind,
        app_id: app_id.to_string(),
        token: body.token,
        aps: body.aps,
    }
}

/// R1: a new user agent, its first channel and its secret.
async fn register(
    app: &App,
    kind: BridgeKind,
    app_id: &str,
    body: RegisterBody,
) -> Result<Response, ApiError> {
    check_app(app, kind, app_id)?;
    let uaid = Uaid::random();
    // Settings refuse bridges without bridge_auth_keys, so a known app
    // always has a key to sign with.
    let secret = keys(app)
        .issue(&uaid)
        .ok_or_else(|| unknown_app(kind, app_id))?;
    let channel = body.channel.unwrap_or_else(ChannelId::new_v4);
    let key = body.key;
    let now = now_secs();
    let user = UserRecord {
        created: now,
        last_seen: now,
        router: Some(route_of(kind, app_id, body)),
    };
    let endpoint = subscribe(app, &uaid, channel, key, Some(&user)).await?;
    ok_json(serde_json::json!({
        "uaid": uuid::Uuid::from_bytes(uaid.0).hyphenated().to_string(),
        "channelID": channel.hyphenated().to_string(),
        "endpoint": endpoint,
        "secret": secret,
    }))
}

/// The stored user agent, if it is a live bridged one; anything else is
/// "not found", which tells the client to register afresh.
async fn bridged_user(app: &App, uaid: &Uaid) -> Result<UserRecord, ApiError> {
    let user = app
        .metrics
        .time("get_user", app.store.get_user(uaid))
        .await
        .map_err(ApiError::storage)?;
    let expiry = app.settings.ua_expiry.as_secs();
    match user {
        Some(u) if u.router.is_some() && u.last_seen + expiry > now_secs() => Ok(u),
        _ => Err(request::uaid_not_found()),
    }
}

/// Counts a refusal of the registration policy and gives its answer.
fn refused(app: &App, refusal: Refusal) -> ApiError {
    app.metrics
        .policy_refusals
        .with_label_values(&[refusal.as_str()])
        .inc();
    match refusal {
        Refusal::VapidRequired => ApiError::vapid_required(),
        Refusal::UserAgentToken => ApiError::user_agent_token_required(),
    }
}

/// Adds a channel and hands out its endpoint.
async fn subscribe(
    app: &App,
    uaid: &Uaid,
    channel: ChannelId,
    key: Option<crate::token::KeyHash>,
    user: Option<&UserRecord>,
) -> Result<String, ApiError> {
    policy::admit_subscription(&app.settings, key.is_some())
        .map_err(|refusal| refused(app, refusal))?;
    match add_channel(app, uaid, &channel, key, now_secs(), user).await {
        Ok(Added::Subscribed) => Ok(endpoint_url(app, *uaid, channel, key)),
        Ok(Added::KeyConflict) => Err(ApiError::new(
            409,
            Errno::InvalidRegistration,
            "this channelID is already registered with another key",
        )),
        Ok(Added::TooMany(max)) => Err(ApiError::new(
            400,
            Errno::InvalidRegistration,
            format!("this user agent already has {max} subscriptions (max_channels_per_uaid)"),
        )),
        Err(e) => Err(ApiError::storage(e)),
    }
}

/// R2: the device has a new token (and, for APNs, possibly a new `aps`).
async fn update(
    app: &App,
    uaid: &Uaid,
    user: UserRecord,
    kind: BridgeKind,
    app_id: &str,
    body: RegisterBody,
) -> Result<Response, ApiError> {
    check_app(app, kind, app_id)?;
    let record = UserRecord {
        created: user.created,
        last_seen: now_secs(),
        router: Some(route_of(kind, app_id, body)),
    };
    app.metrics
        .time("put_user", app.store.put_user(uaid, &record))
        .await
        .map_err(ApiError::storage)?;
    ok_empty()
}

/// R3: the channel list; the call also proves the device alive, so the
/// user agent's expiry restarts.
async fn channel_list(
    app: &App,
    uaid: &Uaid,
    user: UserRecord,
    sent: &str,
) -> Result<Response, ApiError> {
    let channels = app
        .metrics
        .time("list_channels", app.store.list_channels(uaid))
        .await
        .map_err(ApiError::storage)?;
    let record = UserRecord {
        last_seen: now_secs(),
        ..user
    };
    app.metrics
        .time("put_user", app.store.put_user(uaid, &record))
        .await
        .map_err(ApiError::storage)?;
    // The uaid exactly as the client sent it: it compares the string with
    // the one it stored.
    ok_json(serde_json::json!({
        "uaid": sent,
        "channelIDs": channels
            .iter()
            .map(|c| c.hyphenated().to_string())
            .collect::<Vec<_>>(),
    }))
}

fn ok_json(v: serde_json::Value) -> Result<Response, ApiError> {
    Ok(json(StatusCode::OK, v.to_string()))
}

/// PUT and DELETE: the client reads only the status.
fn ok_empty() -> Result<Response, ApiError> {
    ok_json(serde_json::json!({}))
}
