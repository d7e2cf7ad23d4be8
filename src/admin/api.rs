//! `/v1/admin/…`: the operator's API (proto-docs/admin.md), behind a bearer
//! token from `admin_tokens`. With no token configured it does not exist
//! (404), as the broadcast API. Each handler parses, authorises, then acts;
//! every call is counted in `herald_admin_requests_total{op,outcome}`.

use super::blocks::{BlockRequest, Target};
use super::lookup;
use super::top::{SenderId, MINUTES};
use crate::app::App;
use crate::errors::{ApiError, Errno};
use crate::mailbox::Mailbox;
use crate::query;
use crate::reply::{json, Response};
use crate::store::now_secs;
use bytes::Bytes;
use herald_proto::b64::encode_b64url;
use herald_proto::ids::Uaid;
use http::{Method, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde_json::{json, Value};
use std::sync::Arc;

/// The largest body an admin call takes (a block: a key or `sub` and a
/// reason).
const MAX_BODY: usize = 4096;
/// `top-senders` without `minutes`.
const DEFAULT_MINUTES: usize = 5;

/// What a request asks for, from its method and path alone.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Call {
    Lookup(String),
    LookupEndpoint,
    Drop(String),
    Block,
    Unblock,
    Blocks,
    Top,
    Summary,
    Backup,
    /// A known path with the wrong method; the op it counts under.
    WrongMethod(&'static str),
}

impl Call {
    fn op(&self) -> &'static str {
        match self {
            Call::Lookup(_) | Call::LookupEndpoint => "lookup",
            Call::Drop(_) => "drop",
            Call::Block => "block",
            Call::Unblock => "unblock",
            Call::Blocks => "blocks",
            Call::Top => "top",
            Call::Summary => "summary",
            Call::Backup => "backup",
            Call::WrongMethod(op) => op,
        }
    }
}

/// Routes `/v1/admin/<rest>`; None for a path the API does not have.
fn route(method: &Method, path: &str) -> Option<Call> {
    let rest = path.strip_prefix("/v1/admin/")?;
    let segments: Vec<&str> = rest.split('/').collect();
    Some(match (method, segments.as_slice()) {
        (&Method::GET, ["user-agents"]) => Call::LookupEndpoint,
        (&Method::GET, ["user-agents", uaid]) => Call::Lookup(uaid.to_string()),
        (&Method::DELETE, ["user-agents", uaid]) => Call::Drop(uaid.to_string()),
        (_, ["user-agents"] | ["user-agents", _]) => Call::WrongMethod("lookup"),
        (&Method::PUT, ["blocks"]) => Call::Block,
        (&Method::DELETE, ["blocks"]) => Call::Unblock,
        (&Method::GET, ["blocks"]) => Call::Blocks,
        (_, ["blocks"]) => Call::WrongMethod("blocks"),
        (&Method::GET, ["top-senders"]) => Call::Top,
        (_, ["top-senders"]) => Call::WrongMethod("top"),
        (&Method::GET, ["summary"]) => Call::Summary,
        (_, ["summary"]) => Call::WrongMethod("summary"),
        (&Method::POST, ["backup"]) => Call::Backup,
        (_, ["backup"]) => Call::WrongMethod("backup"),
        _ => return None,
    })
}

/// The metric outcome of an answer's status.
fn outcome(status: u16) -> &'static str {
    match status {
        200..=299 => "ok",
        401 => "unauthorized",
        404 => "not_found",
        500.. => "error",
        _ => "refused",
    }
}

pub async fn handle(app: &App, req: http::Request<Incoming>) -> Result<Response, ApiError> {
    let Some(call) = route(req.method(), req.uri().path()) else {
        return Err(ApiError::not_found());
    };
    let op = call.op();
    let result = serve(app, call, req).await;
    let status = match &result {
        Ok(r) => r.status().as_u16(),
        Err(e) => e.status,
    };
    app.metrics
        .admin_requests
        .with_label_values(&[op, outcome(status)])
        .inc();
    result
}

async fn serve(app: &App, call: Call, req: http::Request<Incoming>) -> Result<Response, ApiError> {
    authorise(app, &req)?;
    let query = req.uri().query().unwrap_or("").to_string();
    let body = match call {
        Call::Lookup(uaid) => lookup::describe(app, &parse_uaid(&uaid)?).await?,
        Call::LookupEndpoint => lookup_endpoint(app, &query).await?,
        Call::Drop(uaid) => drop_user_agent(app, &parse_uaid(&uaid)?).await?,
        Call::Block => block(app, &read_body(req).await?).await?,
        Call::Unblock => unblock(app, &read_body(req).await?).await?,
        Call::Blocks => list_blocks(app),
        Call::Top => top_senders(app, &query)?,
        Call::Summary => summary(app),
        Call::Backup => backup(app, &read_body(req).await?).await?,
        Call::WrongMethod(_) => return Err(ApiError::method_not_allowed()),
    };
    Ok(json(StatusCode::OK, body.to_string()))
}

fn authorise(app: &App, req: &http::Request<Incoming>) -> Result<(), ApiError> {
    let tokens = &app.settings.admin_tokens;
    crate::bearer::authorise_operator(tokens, req.headers(), "admin", "admin_tokens")
}

fn bad_request(message: impl Into<String>) -> ApiError {
    ApiError::new(400, Errno::InvalidAdminRequest, message)
}

fn parse_uaid(s: &str) -> Result<Uaid, ApiError> {
    Uaid::parse(s).ok_or_else(|| bad_request("the uaid must be 32 hex digits or a UUID"))
}

async fn read_body(req: http::Request<Incoming>) -> Result<Bytes, ApiError> {
    let collected = tokio::time::timeout(
        crate::endpoint::BODY_READ_TIMEOUT,
        Limited::new(req.into_body(), MAX_BODY).collect(),
    )
    .await
    .map_err(|_| ApiError::body_timeout(crate::endpoint::BODY_READ_TIMEOUT.as_secs()))?;
    collected.map(|c| c.to_bytes()).map_err(|_| {
        ApiError::new(
            413,
            Errno::TooLarge,
            format!("the body is larger than {MAX_BODY} bytes"),
        )
    })
}

/// `GET /v1/admin/user-agents?endpoint=<URL>`.
async fn lookup_endpoint(app: &App, query: &str) -> Result<Value, ApiError> {
    let url = query::param(query, "endpoint")
        .ok_or_else(|| bad_request("give ?endpoint=<endpoint URL> or /user-agents/<uaid>"))?;
    let (target, issuer) = lookup::open_endpoint(app, &url)?;
    let mut found = lookup::describe(app, &target.uaid).await?;
    found["endpoint"] = json!({
        "channel_id": target.channel.to_string(),
        "key_bound": target.key_hash.is_some(),
        "issuer": match issuer {
            crate::endpoint::Issuer::Herald => "herald",
            crate::endpoint::Issuer::Autopush => "autopush",
        },
    });
    Ok(found)
}

/// `DELETE /v1/admin/user-agents/<uaid>`: its subscriptions and messages go,
/// its endpoints answer 410, its connection (on any node) is closed.
async fn drop_user_agent(app: &App, uaid: &Uaid) -> Result<Value, ApiError> {
    app.store
        .get_user(uaid)
        .await
        .map_err(ApiError::storage)?
        .ok_or_else(lookup::no_such_user_agent)?;
    // Closed first: with Redis the record naming the node that holds the
    // connection goes with the user agent.
    let disconnected = app.router.disconnect(uaid).await;
    Mailbox::of(app)
        .drop_user_agent(uaid)
        .await
        .map_err(ApiError::storage)?;
    // A user agent that reconnected here meanwhile is closed too.
    let disconnected = app.router.local.disconnect(uaid) || disconnected;
    tracing::info!(uaid = %uaid.short(), disconnected, "user agent dropped by the operator");
    Ok(json!({ "uaid": uaid.to_string(), "dropped": true, "disconnected": disconnected }))
}

async fn block(app: &App, body: &[u8]) -> Result<Value, ApiError> {
    let (target, record) = BlockRequest::parse(body, now_secs()).map_err(bad_request)?;
    app.blocks
        .add(app.store.as_ref(), &target, &record)
        .await
        .map_err(ApiError::storage)?;
    tracing::info!(id = %target.id(), reason = ?record.reason, "sender blocked");
    Ok(block_json(&target.id(), &record))
}

async fn unblock(app: &App, body: &[u8]) -> Result<Value, ApiError> {
    let (target, _) = BlockRequest::parse(body, now_secs()).map_err(bad_request)?;
    let existed = app
        .blocks
        .remove(app.store.as_ref(), &target)
        .await
        .map_err(ApiError::storage)?;
    if !existed {
        return Err(ApiError::new(
            404,
            Errno::NotFound,
            "this sender is not blocked",
        ));
    }
    tracing::info!(id = %target.id(), "sender unblocked");
    Ok(json!({ "id": target.id(), "unblocked": true }))
}

fn block_json(id: &str, record: &super::blocks::Record) -> Value {
    let mut v = json!({ "id": id, "created": record.created, "reason": record.reason });
    match Target::from_id(id) {
        Some(Target::Key(h)) => {
            v["vapid_key_hash"] = json!(encode_b64url(&h));
            v["vapid_key"] = json!(record.vapid_key);
        }
        Some(Target::Sub(s)) => v["sub"] = json!(s),
        None => {}
    }
    v
}

fn list_blocks(app: &App) -> Value {
    let blocks: Vec<Value> = app
        .blocks
        .list()
        .iter()
        .map(|(id, r)| block_json(id, r))
        .collect();
    json!({ "blocks": blocks })
}

/// `GET /v1/admin/top-senders?minutes=N`.
fn top_senders(app: &App, query: &str) -> Result<Value, ApiError> {
    let minutes = match query::param(query, "minutes") {
        None => DEFAULT_MINUTES,
        Some(m) => m
            .parse::<usize>()
            .ok()
            .filter(|m| (1..=MINUTES).contains(m))
            .ok_or_else(|| bad_request(format!("minutes must be 1 to {MINUTES}")))?,
    };
    let senders: Vec<Value> = app
        .top_senders
        .top(minutes)
        .into_iter()
        .map(|e| {
            let mut v = json!({ "count": e.count, "error": e.error });
            match e.id {
                SenderId::Key(h) => {
                    v["vapid_key_hash"] = json!(encode_b64url(&h));
                    v["sub"] = json!(e.sub);
                }
                SenderId::Address(a) => v["address"] = json!(a.to_string()),
            }
            v
        })
        .collect();
    Ok(json!({ "minutes": minutes, "scope": "this node", "senders": senders }))
}

/// `GET /v1/admin/summary`.
fn summary(app: &App) -> Value {
    let stats = app.store.stats();
    let counter =
        |vec: &prometheus::IntCounterVec, label: &str| vec.with_label_values(&[label]).get();
    let throttled: serde_json::Map<String, Value> =
        ["subscription", "user_agent", "sender_key", "sender_address"]
            .into_iter()
            .map(|r| (r.to_string(), json!(counter(&app.metrics.throttled, r))))
            .collect();
    json!({
        "connections": app.connections.get(),
        "user_agents_connected": app.router.connected(),
        "store": {
            "estimated_messages": stats.estimated_messages,
            "size_bytes": stats.size_bytes,
        },
        "throttled": throttled,
        "blocked_pushes": {
            "key": counter(&app.metrics.blocked_pushes, "key"),
            "sub": counter(&app.metrics.blocked_pushes, "sub"),
        },
        "blocks": app.blocks.len(),
    })
}

/// `POST /v1/admin/backup` with `{"dir": "<absolute path>"}`: a checkpoint
/// of the store into a new directory on this node's machine.
async fn backup(app: &App, body: &[u8]) -> Result<Value, ApiError> {
    let dir = parse_backup_request(body).map_err(bad_request)?;
    let taken = crate::backup::take(app.store.as_ref(), &app.settings.data_dir, &dir)
        .await
        .map_err(|e| {
            use crate::backup::TakeError;
            let status = match &e {
                TakeError::Invalid(_) => return bad_request(e.to_string()),
                TakeError::Refused(_) => 409,
                TakeError::Failed(_) => {
                    tracing::error!("backup into {} failed: {e}", dir.display());
                    500
                }
            };
            ApiError::new(status, Errno::BackupRefused, e.to_string())
        })?;
    tracing::info!(
        dir = %dir.display(),
        files = taken.files,
        bytes = taken.bytes,
        took_ms = taken.took.as_millis() as u64,
        "store backed up"
    );
    Ok(taken.to_json())
}

fn parse_backup_request(body: &[u8]) -> Result<std::path::PathBuf, String> {
    let v: Value = serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
    let dir = v
        .get("dir")
        .and_then(Value::as_str)
        .filter(|d| !d.is_empty())
        .ok_or("the body must be {\"dir\": \"<absolute path on the server>\"}")?;
    let dir = std::path::PathBuf::from(dir);
    if !dir.is_absolute() {
        return Err(format!(
            "{}: the backup directory must be an absolute path",
            dir.display()
        ));
    }
    Ok(dir)
}

/// Keeps this node's copy of the blocks in step with the store, for nodes
/// sharing one: every `blocks::REFRESH_INTERVAL`.
pub async fn sync_blocks(app: Arc<App>) {
    let mut tick = tokio::time::interval(super::blocks::REFRESH_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Err(e) = app.blocks.refresh(app.store.as_ref()).await {
            tracing::debug!("reading blocks: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_and_ops() {
        let r = |m: Method, p: &str| route(&m, p);
        assert_eq!(
            r(Method::GET, "/v1/admin/user-agents/abc"),
            Some(Call::Lookup("abc".into()))
        );
        assert_eq!(
            r(Method::GET, "/v1/admin/user-agents"),
            Some(Call::LookupEndpoint)
        );
        assert_eq!(
            r(Method::DELETE, "/v1/admin/user-agents/abc"),
            Some(Call::Drop("abc".into()))
        );
        assert_eq!(r(Method::PUT, "/v1/admin/blocks"), Some(Call::Block));
        assert_eq!(r(Method::DELETE, "/v1/admin/blocks"), Some(Call::Unblock));
        assert_eq!(r(Method::GET, "/v1/admin/blocks"), Some(Call::Blocks));
        assert_eq!(r(Method::GET, "/v1/admin/top-senders"), Some(Call::Top));
        assert_eq!(r(Method::GET, "/v1/admin/summary"), Some(Call::Summary));
        assert_eq!(
            r(Method::POST, "/v1/admin/summary").map(|c| c.op()),
            Some("summary")
        );
        assert_eq!(r(Method::POST, "/v1/admin/backup"), Some(Call::Backup));
        assert_eq!(
            r(Method::GET, "/v1/admin/backup").map(|c| c.op()),
            Some("backup")
        );
        assert_eq!(r(Method::GET, "/v1/admin/nothing"), None);
        assert_eq!(r(Method::GET, "/v1/admin/user-agents/a/b"), None);
        assert_eq!(
            [200, 401, 404, 400, 405, 413, 503].map(outcome),
            [
                "ok",
                "unauthorized",
                "not_found",
                "refused",
                "refused",
                "refused",
                "error"
            ]
        );
    }
}
