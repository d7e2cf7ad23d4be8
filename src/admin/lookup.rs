//! What the admin API says about one user agent: its record, bridge route,
//! subscriptions, queue (never a payload) and the node holding it now.
//! Also the pure parsing of an endpoint URL and of a query string.

use crate::app::App;
use crate::endpoint::{open_target, EndpointPath, Issuer};
use crate::errors::{ApiError, Errno};
use crate::store::{now_secs, BridgeRoute, Message};
use crate::token::{ApiVersion, EndpointToken};
use herald_proto::ids::Uaid;
use serde_json::{json, Value};

/// How many of the oldest queued messages a lookup lists.
pub const OLDEST: usize = 5;
/// Counting queued messages stops here.
const COUNT_LIMIT: usize = 100_000;
/// How much of a bridge's device token a lookup shows.
const TOKEN_PREFIX: usize = 8;

/// The endpoint path and token of a push endpoint URL, whatever its host
/// (a URL handed out behind a proxy names the proxy).
pub fn parse_endpoint(url: &str) -> Option<(EndpointPath, &str)> {
    let url = url.trim();
    let after_scheme = url.split_once("://").map_or(url, |(_, rest)| rest);
    let path = &after_scheme[after_scheme.find('/')?..];
    let path = path.split(['?', '#']).next().unwrap_or(path);
    let rest = &path[path.find("/wpush/")? + "/wpush/".len()..];
    match rest.split('/').collect::<Vec<_>>().as_slice() {
        [v, token] if !token.is_empty() => {
            let version = match *v {
                "v1" => ApiVersion::V1,
                "v2" => ApiVersion::V2,
                _ => return None,
            };
            Some((EndpointPath::Versioned(version), token))
        }
        [token] if !token.is_empty() => Some((EndpointPath::AutopushLegacy, token)),
        _ => None,
    }
}

/// Opens an endpoint URL into the subscription it reaches.
pub fn open_endpoint(app: &App, url: &str) -> Result<(EndpointToken, Issuer), ApiError> {
    let (path, token) = parse_endpoint(url).ok_or_else(|| {
        ApiError::new(
            400,
            Errno::InvalidAdminRequest,
            "endpoint must be a push endpoint URL (…/wpush/v1/<token> or …/wpush/v2/<token>)",
        )
    })?;
    open_target(app, path, token).map_err(|_| {
        ApiError::new(
            404,
            Errno::InvalidEndpoint,
            "this endpoint was not issued by this push service",
        )
    })
}

pub fn no_such_user_agent() -> ApiError {
    ApiError::new(404, Errno::UserGone, "no user agent has this uaid")
}

/// Everything the operator may see of a user agent, or 404 (errno 103).
pub async fn describe(app: &App, uaid: &Uaid) -> Result<Value, ApiError> {
    let store = &app.store;
    let user = store
        .get_user(uaid)
        .await
        .map_err(ApiError::storage)?
        .ok_or_else(no_such_user_agent)?;
    let mut channels = Vec::new();
    for id in store.list_channels(uaid).await.map_err(ApiError::storage)? {
        if let Some(c) = store
            .get_channel(uaid, &id)
            .await
            .map_err(ApiError::storage)?
        {
            channels.push(json!({
                "channel_id": id.to_string(),
                "key_bound": c.key_hash.is_some(),
                "created": c.created,
            }));
        }
    }
    let now = now_secs();
    let count = store
        .count_messages(uaid, now, COUNT_LIMIT)
        .await
        .map_err(ApiError::storage)?;
    let oldest = store
        .read_messages(uaid, 0, OLDEST)
        .await
        .map_err(ApiError::storage)?;
    Ok(json!({
        "uaid": uaid.to_string(),
        "created": user.created,
        "last_seen": user.last_seen,
        "bridge": user.router.as_ref().map(bridge),
        "channels": channels,
        "messages": {
            "count": count,
            "oldest": oldest.iter().map(message).collect::<Vec<_>>(),
        },
        "connection": connection(app, uaid).await?,
    }))
}

/// The route without the device token in full: its start and length are
/// enough to tell two apart.
fn bridge(route: &BridgeRoute) -> Value {
    let prefix: String = route.token.chars().take(TOKEN_PREFIX).collect();
    json!({
        "kind": route.kind.as_str(),
        "app_id": route.app_id,
        "token": format!("{prefix}…"),
        "token_length": route.token.len(),
    })
}

/// A queued message's metadata; never its payload.
fn message(m: &Message) -> Value {
    json!({
        "seq": m.seq,
        "channel_id": m.channel.to_string(),
        "ttl": m.ttl,
        "expires": m.expires_at,
        "size": m.data.len(),
        "topic": m.topic,
        "urgency": m.urgency.as_str(),
    })
}

/// Where the user agent is connected now: this node, another node of the
/// cluster (with its URL), or null when offline.
async fn connection(app: &App, uaid: &Uaid) -> Result<Value, ApiError> {
    let cluster = app.router.cluster();
    if app.router.is_connected(uaid) {
        return Ok(json!({
            "this_node": true,
            "node": cluster.map(|c| node_id(c.node())),
            "url": cluster.map(|_| app.settings.node_url.clone()),
        }));
    }
    let Some(cluster) = cluster else {
        return Ok(Value::Null);
    };
    Ok(
        match cluster.locate(uaid).await.map_err(ApiError::storage)? {
            Some((node, url)) => json!({
                "this_node": node == cluster.node(),
                "node": node_id(node),
                "url": url,
            }),
            None => Value::Null,
        },
    )
}

/// Node ids are 63-bit: hex, so JSON readers that hold numbers as
/// doubles do not round them.
fn node_id(node: u64) -> String {
    format!("{node:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_urls_parse_whatever_the_host() {
        for (url, path, token) in [
            (
                "https://push.example.com/wpush/v1/abc",
                EndpointPath::Versioned(ApiVersion::V1),
                "abc",
            ),
            (
                "http://127.0.0.1:8080/wpush/v2/x-y_z?x=1",
                EndpointPath::Versioned(ApiVersion::V2),
                "x-y_z",
            ),
            (
                "https://proxy.example/push/wpush/v2/tok#frag",
                EndpointPath::Versioned(ApiVersion::V2),
                "tok",
            ),
            (
                "https://updates.push.services.mozilla.com/wpush/gAAAA",
                EndpointPath::AutopushLegacy,
                "gAAAA",
            ),
            (
                "/wpush/v1/rel",
                EndpointPath::Versioned(ApiVersion::V1),
                "rel",
            ),
        ] {
            assert_eq!(parse_endpoint(url), Some((path, token)), "{url}");
        }
        for bad in [
            "",
            "https://push.example.com/",
            "https://push.example.com/wpush/v3/abc",
            "https://push.example.com/wpush/v1/",
            "https://push.example.com/wpush/v1/a/b",
            "https://wpush/v1/abc",
        ] {
            assert_eq!(parse_endpoint(bad), None, "{bad}");
        }
    }
}
