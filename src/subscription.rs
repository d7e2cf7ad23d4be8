//! Making a subscription: the one place a channel and its endpoint URL are
//! created, whether a user agent asks over its websocket (`session`) or
//! over the mobile registration API (`registration`).

use crate::app::App;
use crate::store::{ChannelRecord, StoreResult, UserRecord};
use crate::token::{key_hash, ApiVersion, EndpointToken, KeyHash};
use herald_proto::b64::decode_b64url;
use herald_proto::ids::{ChannelId, Uaid};

/// An application server key as a user agent sends it (base64url, padded
/// or not): its hash when it is an uncompressed P-256 point, else None.
pub fn parse_app_server_key(key: &str) -> Option<KeyHash> {
    decode_b64url(key)
        .filter(|raw| raw.len() == 65 && p256::PublicKey::from_sec1_bytes(raw).is_ok())
        .map(|raw| key_hash(&raw))
}

/// What asking for a subscription came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Added {
    /// Stored now, or already there with the same key (asking twice is
    /// harmless): its endpoint may be handed out.
    Subscribed,
    /// The channel exists with another application server key.
    KeyConflict,
    /// The user agent already holds `max_channels_per_uaid` (the value).
    TooMany(usize),
}

/// Adds `channel` to the user agent. `user`, when given, is written first:
/// the record of a user agent that had none stored yet.
pub async fn add_channel(
    app: &App,
    uaid: &Uaid,
    channel: &ChannelId,
    key_hash: Option<KeyHash>,
    now: u64,
    user: Option<&UserRecord>,
) -> StoreResult<Added> {
    let store = &app.store;
    match app
        .metrics
        .time("get_channel", store.get_channel(uaid, channel))
        .await?
    {
        Some(rec) if rec.key_hash == key_hash => return Ok(Added::Subscribed),
        Some(_) => return Ok(Added::KeyConflict),
        None => {}
    }
    let max = app.settings.max_channels_per_uaid;
    if store.count_channels(uaid, max).await? >= max {
        return Ok(Added::TooMany(max));
    }
    // Not waited for by itself under `redis_wait_replicas`: the channel's
    // write below is, on the same primary (one slot), after this one, and a
    // replica applies a primary's writes in order, so its `WAIT` covers
    // this record too.
    if let Some(user) = user {
        app.metrics
            .time("put_user", store.put_user(uaid, user))
            .await?;
    }
    let rec = ChannelRecord {
        key_hash,
        created: now,
    };
    app.metrics
        .time("put_channel", store.put_channel(uaid, channel, &rec))
        .await?;
    Ok(Added::Subscribed)
}

/// The push endpoint of a subscription: `/wpush/v1/` without a key,
/// `/wpush/v2/` bound to one.
pub fn endpoint_url(
    app: &App,
    uaid: Uaid,
    channel: ChannelId,
    key_hash: Option<KeyHash>,
) -> String {
    let (version, token) = app.tokens.endpoint_token(&EndpointToken {
        uaid,
        channel,
        key_hash,
    });
    let v = match version {
        ApiVersion::V1 => "v1",
        ApiVersion::V2 => "v2",
    };
    format!("{}/wpush/{v}/{token}", app.settings.public_url.base)
}
