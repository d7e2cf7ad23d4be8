//! autopush-rs's Redis backend (`redis://…`): keys `autopush/<kind>/<uaid>`
//! with the uaid hyphenated (see proto-docs/migration.md, "Import").
//!
//! Every `autopush/` key is classified first: a kind this importer does not
//! know is an error naming the key, and keys of user agents whose user
//! record has expired (autopush has forgotten them) are counted as skipped.

use super::record::{
    check_topic, decode_data, dedupe_channels, parse_channel, parse_headers, parse_route,
    parse_uaid, ImportedChannel, ImportedMessage, ImportedUa, Routed, MAX_AUTOPUSH_TTL,
};
use super::summary::{Summary, What};
use super::Source;
use anyhow::Context;
use herald_proto::ids::{ChannelId, Uaid};
use herald_proto::urgency::Urgency;
use redis::aio::MultiplexedConnection;
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};

const PREFIX: &str = "autopush/";

/// What one `autopush/` key is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyKind {
    User(Uaid),
    /// Any other key of one user agent (channels, messages, pointers).
    OfUser(Uaid),
    /// Delivery-report bookkeeping, not a user agent's data.
    Reliability,
}

pub fn classify_key(key: &str) -> Result<KeyKind, String> {
    let unknown = || format!("unknown autopush Redis key {key:?}");
    let rest = key.strip_prefix(PREFIX).ok_or_else(unknown)?;
    let (kind, tail) = rest.split_once('/').ok_or_else(unknown)?;
    let uaid_of = |s: &str| parse_uaid(s).map_err(|e| format!("Redis key {key:?}: {e}"));
    match kind {
        "user" => Ok(KeyKind::User(uaid_of(tail)?)),
        "co" | "channels" | "msgs" | "msgs_exp" | "timestamp" => {
            Ok(KeyKind::OfUser(uaid_of(tail)?))
        }
        "msg" => {
            let (uaid, _member) = tail.split_once('/').ok_or_else(unknown)?;
            Ok(KeyKind::OfUser(uaid_of(uaid)?))
        }
        "reliability" => Ok(KeyKind::Reliability),
        _ => Err(unknown()),
    }
}

/// autopush-rs's `User` as JSON. The fields Herald has no use for are
/// still listed, so that only a field autopush never wrote is an error.
#[derive(Deserialize)]
#[allow(dead_code)]
#[serde(deny_unknown_fields)]
pub struct StoredUser {
    pub uaid: String,
    pub connected_at: u64,
    pub router_type: String,
    #[serde(default)]
    pub router_data: Option<serde_json::Value>,
    #[serde(default)]
    pub node_id: Option<String>,
    #[serde(default)]
    pub record_version: Option<u64>,
    #[serde(default)]
    pub current_timestamp: Option<u64>,
    #[serde(default)]
    pub priv_channels: Option<Vec<String>>,
    #[serde(default)]
    pub version: Option<String>,
}

pub fn parse_user(json: &str) -> Result<StoredUser, String> {
    serde_json::from_str(json).map_err(|e| format!("not autopush's user JSON: {e}"))
}

/// autopush-rs's `StorableNotification` as JSON. Versions 1.78.0 to
/// 1.82.1 never wrote `ttl`, `topic` and `sortkey_timestamp`; they are
/// recovered from the zset member and the expiry zset.
#[derive(Deserialize)]
#[allow(dead_code)]
#[serde(deny_unknown_fields)]
struct StoredMessage {
    #[serde(rename = "channelID")]
    channel_id: String,
    version: String,
    timestamp: u64,
    #[serde(default)]
    ttl: Option<u64>,
    #[serde(default)]
    topic: Option<String>,
    #[serde(default)]
    data: Option<String>,
    #[serde(default)]
    sortkey_timestamp: Option<u64>,
    #[serde(default)]
    headers: Option<BTreeMap<String, String>>,
    #[serde(default)]
    reliability_id: Option<String>,
    #[serde(default)]
    reliable_state: Option<serde_json::Value>,
}

/// The storage sort key a message is filed under (`chidmessageid`).
#[derive(Debug, PartialEq, Eq)]
pub enum Member {
    Topic {
        channel: ChannelId,
        topic: String,
    },
    Timestamp {
        ms: u64,
        channel: ChannelId,
    },
    /// `{chid}:{version}`, from before sort keys.
    Legacy {
        channel: ChannelId,
    },
}

pub fn parse_member(m: &str) -> Result<Member, String> {
    let bad = || format!("message key {m:?} is not autopush's chidmessageid");
    if let Some(rest) = m.strip_prefix("01:") {
        let (chid, topic) = rest.split_once(':').ok_or_else(bad)?;
        return Ok(Member::Topic {
            channel: parse_channel(chid)?,
            topic: topic.to_string(),
        });
    }
    if let Some(rest) = m.strip_prefix("02:") {
        let (ms, chid) = rest.split_once(':').ok_or_else(bad)?;
        return Ok(Member::Timestamp {
            ms: ms.parse().map_err(|_| bad())?,
            channel: parse_channel(chid)?,
        });
    }
    let (chid, _version) = m.split_once(':').ok_or_else(bad)?;
    Ok(Member::Legacy {
        channel: parse_channel(chid).map_err(|_| bad())?,
    })
}

/// One stored message: its JSON, the zset member it is filed under and
/// its score in `msgs_exp` (expiry, unix seconds).
pub fn parse_message(
    json: &str,
    member: &str,
    expiry: Option<u64>,
) -> Result<ImportedMessage, String> {
    let s: StoredMessage =
        serde_json::from_str(json).map_err(|e| format!("not autopush's message JSON: {e}"))?;
    let channel = parse_channel(&s.channel_id)?;
    let (member_channel, member_topic, member_ms) = match parse_member(member)? {
        Member::Topic { channel, topic } => (channel, Some(topic), None),
        Member::Timestamp { ms, channel } => (channel, None, Some(ms)),
        Member::Legacy { channel } => (channel, None, None),
    };
    if member_channel != channel {
        return Err(format!(
            "channelID {} differs from the channel in its key",
            s.channel_id
        ));
    }
    let ttl = match (s.ttl, expiry) {
        (Some(t), _) => t,
        // Expiry is save time + ttl, save time a moment after receipt.
        (None, Some(exp)) => exp.saturating_sub(s.timestamp).min(MAX_AUTOPUSH_TTL),
        (None, None) => return Err("no ttl and no expiry in msgs_exp".into()),
    };
    let data = decode_data(s.data.as_deref())?;
    Ok(ImportedMessage {
        id: s.version,
        channel,
        timestamp: s.timestamp,
        ttl,
        sortkey_ms: s.sortkey_timestamp.or(member_ms),
        topic: check_topic(s.topic.or(member_topic))?,
        urgency: Urgency::Normal,
        headers: parse_headers(s.headers.as_ref(), &data)?,
        data,
    })
}

pub struct RedisSource {
    conn: MultiplexedConnection,
    /// Each user agent's uaid as spelled in its keys, in uaid order.
    users: std::vec::IntoIter<String>,
    total: u64,
}

impl RedisSource {
    pub async fn open(url: &str, summary: &mut Summary) -> anyhow::Result<RedisSource> {
        let shown = super::redact(url);
        let client = redis::Client::open(url).with_context(|| format!("Redis URL {shown}"))?;
        let mut conn = client
            .get_multiplexed_async_connection()
            .await
            .with_context(|| format!("connecting to {shown}"))?;
        let mut users = BTreeMap::new();
        let mut others = BTreeSet::new();
        for key in scan(&mut conn).await? {
            match classify_key(&key).map_err(anyhow::Error::msg)? {
                KeyKind::User(u) => {
                    let text = key[PREFIX.len() + "user/".len()..].to_string();
                    users.insert(u, text);
                }
                KeyKind::OfUser(u) => {
                    others.insert(u);
                }
                KeyKind::Reliability => {}
            }
        }
        let orphans = others.iter().filter(|u| !users.contains_key(u)).count();
        summary.skip(
            What::UserAgents,
            "no user record (already expired in autopush)",
            orphans as u64,
        );
        Ok(RedisSource {
            conn,
            total: users.len() as u64,
            users: users.into_values().collect::<Vec<_>>().into_iter(),
        })
    }

    async fn read(&mut self, u: &str, summary: &mut Summary) -> anyhow::Result<Option<ImportedUa>> {
        let key = format!("{PREFIX}user/{u}");
        let json: Option<String> = get(&mut self.conn, &key).await?;
        let Some(json) = json else {
            summary.skip(
                What::UserAgents,
                "no user record (already expired in autopush)",
                1,
            );
            return Ok(None);
        };
        let bad = |e: String| anyhow::anyhow!("Redis key {key}: {e}");
        let user = parse_user(&json).map_err(bad)?;
        let uaid = parse_uaid(&user.uaid).map_err(bad)?;
        if parse_uaid(u).ok() != Some(uaid) {
            return Err(bad(format!("holds the record of uaid {}", user.uaid)));
        }
        let route = match parse_route(&user.router_type, user.router_data.as_ref()).map_err(bad)? {
            Routed::Route(r) => r,
            Routed::Skip(reason) => {
                summary.skip(What::UserAgents, reason, 1);
                return Ok(None);
            }
        };
        let channels = self.channels(u).await?;
        let messages = self.messages(u, summary).await?;
        Ok(Some(ImportedUa {
            uaid,
            connected_at_ms: user.connected_at,
            route,
            channels,
            messages,
        }))
    }

    async fn channels(&mut self, u: &str) -> anyhow::Result<Vec<ImportedChannel>> {
        let key = format!("{PREFIX}channels/{u}");
        let ids: Vec<String> = query(
            &mut self.conn,
            redis::cmd("LRANGE").arg(&key).arg(0).arg(-1),
            &key,
        )
        .await?;
        let parsed = ids
            .iter()
            .map(|c| {
                parse_channel(c)
                    .map(|id| ImportedChannel { id, key_hash: None })
                    .map_err(|e| anyhow::anyhow!("Redis key {key}: {e}"))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(dedupe_channels(parsed))
    }

    /// The pending messages by autopush's rule: zset score (save second) at
    /// or after the read pointer. The pointer is inclusive upstream, so the
    /// last messages acked in that second come along too (nothing is lost).
    async fn messages(
        &mut self,
        u: &str,
        summary: &mut Summary,
    ) -> anyhow::Result<Vec<ImportedMessage>> {
        let ptr_key = format!("{PREFIX}timestamp/{u}");
        let pointer: Option<String> = get(&mut self.conn, &ptr_key).await?;
        let pointer: f64 = match pointer {
            None => 0.0,
            Some(p) => p
                .trim()
                .parse::<u64>()
                .map_err(|_| anyhow::anyhow!("Redis key {ptr_key}: {p:?} is not a timestamp"))?
                as f64,
        };
        let zkey = format!("{PREFIX}msgs/{u}");
        let members: Vec<(String, f64)> = query(
            &mut self.conn,
            redis::cmd("ZRANGE")
                .arg(&zkey)
                .arg(0)
                .arg(-1)
                .arg("WITHSCORES"),
            &zkey,
        )
        .await?;
        let mut out = Vec::new();
        for (member, score) in members {
            if score < pointer {
                summary.skip(What::Messages, "delivered before the import", 1);
                continue;
            }
            let key = format!("{PREFIX}msg/{u}/{member}");
            let json: Option<String> = get(&mut self.conn, &key).await?;
            let Some(json) = json else {
                // Its payload key expired (EXAT save time + ttl).
                summary.skip(What::Messages, "expired", 1);
                continue;
            };
            let exp_key = format!("{PREFIX}msgs_exp/{u}");
            let expiry: Option<f64> = query(
                &mut self.conn,
                redis::cmd("ZSCORE").arg(&exp_key).arg(&member),
                &exp_key,
            )
            .await?;
            let m = parse_message(&json, &member, expiry.map(|e| e as u64))
                .map_err(|e| anyhow::anyhow!("Redis key {key}: {e}"))?;
            out.push(m);
        }
        Ok(out)
    }
}

#[async_trait::async_trait]
impl Source for RedisSource {
    fn total(&self) -> Option<u64> {
        Some(self.total)
    }

    async fn next(&mut self, summary: &mut Summary) -> anyhow::Result<Option<ImportedUa>> {
        while let Some(u) = self.users.next() {
            if let Some(ua) = self.read(&u, summary).await? {
                return Ok(Some(ua));
            }
        }
        Ok(None)
    }
}

async fn scan(conn: &mut MultiplexedConnection) -> anyhow::Result<Vec<String>> {
    let mut cursor: u64 = 0;
    let mut keys = Vec::new();
    loop {
        let (next, batch): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{PREFIX}*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(conn)
            .await
            .context("SCAN of autopush/*")?;
        for k in batch {
            let k = String::from_utf8(k).map_err(|e| {
                anyhow::anyhow!(
                    "Redis key {:?} is not UTF-8, not autopush's",
                    String::from_utf8_lossy(e.as_bytes())
                )
            })?;
            keys.push(k);
        }
        if next == 0 {
            return Ok(keys);
        }
        cursor = next;
    }
}

async fn get(conn: &mut MultiplexedConnection, key: &str) -> anyhow::Result<Option<String>> {
    query(conn, redis::cmd("GET").arg(key), key).await
}

/// A command about `key`, its error naming the key (a wrong type means the
/// data is not autopush's).
async fn query<T: redis::FromRedisValue>(
    conn: &mut MultiplexedConnection,
    cmd: &redis::Cmd,
    key: &str,
) -> anyhow::Result<T> {
    cmd.query_async(conn)
        .await
        .with_context(|| format!("Redis key {key}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHID: &str = "0a1b2c3d-4e5f-4a6b-8c7d-8e9fa0b1c2d3";

    #[test]
    fn classifies_every_autopush_key_and_refuses_others() {
        let u = "5f2c0d3e-8a9b-4c1d-9e3f-405162738495";
        let uaid = parse_uaid(u).unwrap();
        assert_eq!(
            classify_key(&format!("autopush/user/{u}")),
            Ok(KeyKind::User(uaid))
        );
        for kind in ["co", "channels", "msgs", "msgs_exp", "timestamp"] {
            assert_eq!(
                classify_key(&format!("autopush/{kind}/{u}")),
                Ok(KeyKind::OfUser(uaid))
            );
        }
        assert_eq!(
            classify_key(&format!("autopush/msg/{u}/01:{CHID}:scores")),
            Ok(KeyKind::OfUser(uaid))
        );
        assert_eq!(
            classify_key("autopush/reliability/x/received"),
            Ok(KeyKind::Reliability)
        );
        assert_eq!(
            classify_key("autopush/frobs/1"),
            Err("unknown autopush Redis key \"autopush/frobs/1\"".into())
        );
        assert!(classify_key("autopush/user/zzz")
            .unwrap_err()
            .contains("zzz"));
    }

    #[test]
    fn members_of_each_form() {
        let c = parse_channel(CHID).unwrap();
        assert_eq!(
            parse_member(&format!("01:{CHID}:sco=res")),
            Ok(Member::Topic {
                channel: c,
                topic: "sco=res".into()
            })
        );
        assert_eq!(
            parse_member(&format!("02:1796614003123:{CHID}")),
            Ok(Member::Timestamp {
                ms: 1796614003123,
                channel: c
            })
        );
        assert_eq!(
            parse_member(&format!("{CHID}:gAAAAAB")),
            Ok(Member::Legacy { channel: c })
        );
        assert!(parse_member("02:soon:x").is_err());
    }

    #[test]
    fn current_message_json() {
        let json = format!(
            r#"{{"channelID":"{CHID}","version":"gAAAAAB-v","timestamp":1796614003,"ttl":3600,"data":"aGk","sortkey_timestamp":1796614003123,"headers":{{"encoding":"aes128gcm"}}}}"#
        );
        let m =
            parse_message(&json, &format!("02:1796614003123:{CHID}"), Some(1796617604)).unwrap();
        assert_eq!(
            (m.ttl, m.sortkey_ms, m.topic.as_deref()),
            (3600, Some(1796614003123), None)
        );
        assert_eq!(m.data, b"hi");
        assert_eq!(m.id, "gAAAAAB-v");
        assert_eq!(m.headers.unwrap().encoding, "aes128gcm");
    }

    #[test]
    fn old_message_json_recovers_ttl_topic_and_sortkey() {
        let json = format!(r#"{{"channelID":"{CHID}","version":"v1","timestamp":1796614003}}"#);
        let m = parse_message(&json, &format!("01:{CHID}:scores"), Some(1796614065)).unwrap();
        assert_eq!(
            (m.ttl, m.topic.as_deref(), m.sortkey_ms),
            (62, Some("scores"), None)
        );
        let m =
            parse_message(&json, &format!("02:1796614003999:{CHID}"), Some(1796614063)).unwrap();
        assert_eq!((m.ttl, m.sortkey_ms), (60, Some(1796614003999)));
        assert!(parse_message(&json, &format!("02:1:{CHID}"), None)
            .unwrap_err()
            .contains("no ttl"));
    }

    #[test]
    fn unknown_fields_and_mismatched_channels_are_errors() {
        let json = format!(
            r#"{{"channelID":"{CHID}","version":"v","timestamp":1,"ttl":1,"colour":"red"}}"#
        );
        assert!(parse_message(&json, &format!("02:1:{CHID}"), None)
            .unwrap_err()
            .contains("colour"));
        let other = "00000000-0000-4000-8000-000000000000";
        let json = format!(r#"{{"channelID":"{CHID}","version":"v","timestamp":1,"ttl":1}}"#);
        assert!(parse_message(&json, &format!("02:1:{other}"), None).is_err());
        assert!(parse_user(r#"{"uaid":"x","connected_at":1}"#).is_err());
        let u = parse_user(
            r#"{"uaid":"5f2c0d3e8a9b4c1d9e3f405162738495","connected_at":1796614003123,"router_type":"webpush","router_data":null,"node_id":"http://a:8081","record_version":1,"priv_channels":[]}"#,
        )
        .unwrap();
        assert_eq!(
            (u.connected_at, u.router_type.as_str()),
            (1796614003123, "webpush")
        );
    }
}
