//! Fixture generator: what autopush-rs (1.83) stores about its user agents,
//! written in its exact layouts into a real Redis, a real PostgreSQL, or a
//! JSON-lines export, for `herald import autopush` to read.
//!
//! Layouts (from autopush-rs's source and schema, see
//! proto-docs/migration.md "Import"): Redis keys `autopush/<kind>/<uaid
//! hyphenated>`; Postgres tables `router`, `meta`, `message`.
#![allow(dead_code)]

use base64::Engine;
use serde_json::{json, Value};
use uuid::Uuid;

/// autopush's `MAX_ROUTER_TTL_SECS` (the Redis user key's expiry).
const ROUTER_TTL: u64 = 60 * 86400;

#[derive(Clone, Debug)]
pub struct Msg {
    pub channel: Uuid,
    /// The message id autopush handed out (a Fernet token upstream).
    pub version: String,
    /// Unix seconds of receipt.
    pub timestamp: u64,
    pub ttl: u64,
    pub topic: Option<String>,
    /// Milliseconds; autopush sets it for messages without topic.
    pub sortkey_ms: Option<u64>,
    pub data: Vec<u8>,
    /// `encoding` (and for aesgcm `encryption`, `crypto_key`).
    pub headers: Vec<(String, String)>,
}

impl Msg {
    /// A payload message without topic received at `ms`.
    pub fn timed(channel: Uuid, ms: u64, ttl: u64, body: Vec<u8>) -> Msg {
        Msg {
            channel,
            version: format!("gAAAAAB-{}", Uuid::new_v4().simple()),
            timestamp: ms / 1000,
            ttl,
            topic: None,
            sortkey_ms: Some(ms),
            data: body,
            headers: vec![("encoding".into(), "aes128gcm".into())],
        }
    }

    /// A payload message with a topic received at `secs`.
    pub fn topical(channel: Uuid, secs: u64, ttl: u64, topic: &str, body: Vec<u8>) -> Msg {
        Msg {
            topic: Some(topic.into()),
            sortkey_ms: None,
            timestamp: secs,
            ..Msg::timed(channel, secs * 1000, ttl, body)
        }
    }

    /// autopush's storage sort key (`chidmessageid`).
    pub fn chidmessageid(&self) -> String {
        match (&self.topic, self.sortkey_ms) {
            (Some(t), _) => format!("01:{}:{t}", self.channel.hyphenated()),
            (None, Some(ms)) => format!("02:{ms}:{}", self.channel.hyphenated()),
            (None, None) => format!("{}:{}", self.channel.hyphenated(), self.version),
        }
    }

    fn data_b64(&self) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&self.data)
    }

    fn headers_json(&self) -> Option<Value> {
        (!self.data.is_empty()).then(|| {
            Value::Object(
                self.headers
                    .iter()
                    .map(|(k, v)| (k.clone(), json!(v)))
                    .collect(),
            )
        })
    }

    /// `StorableNotification` JSON as 1.82.2 and later write it; `old`
    /// leaves out ttl, topic and sortkey_timestamp as 1.78.0–1.82.1 did.
    pub fn json(&self, old: bool) -> Value {
        let mut v = json!({
            "channelID": self.channel.hyphenated().to_string(),
            "version": self.version,
            "timestamp": self.timestamp,
        });
        if !old {
            v["ttl"] = json!(self.ttl);
            if let Some(t) = &self.topic {
                v["topic"] = json!(t);
            }
            if let Some(ms) = self.sortkey_ms {
                v["sortkey_timestamp"] = json!(ms);
            }
        }
        if !self.data.is_empty() {
            v["data"] = json!(self.data_b64());
        }
        if let Some(h) = self.headers_json() {
            v["headers"] = h;
        }
        v
    }
}

#[derive(Clone, Debug)]
pub struct UserAgent {
    pub uaid: Uuid,
    /// Milliseconds of the last hello.
    pub connected_at_ms: u64,
    pub router_type: String,
    /// `null` for webpush.
    pub router_data: Value,
    pub channels: Vec<Uuid>,
    pub messages: Vec<Msg>,
    /// autopush's read pointer (unix s): Redis `autopush/timestamp`,
    /// Postgres `router.last_update`.
    pub pointer: Option<u64>,
}

impl UserAgent {
    pub fn webpush(connected_at_ms: u64) -> UserAgent {
        UserAgent {
            uaid: Uuid::new_v4(),
            connected_at_ms,
            router_type: "webpush".into(),
            router_data: Value::Null,
            channels: Vec::new(),
            messages: Vec::new(),
            pointer: None,
        }
    }

    pub fn bridged(router_type: &str, router_data: Value, connected_at_ms: u64) -> UserAgent {
        UserAgent {
            router_type: router_type.into(),
            router_data,
            ..UserAgent::webpush(connected_at_ms)
        }
    }

    /// The uaid as Firefox stored it from autopush's hello (32 hex).
    pub fn hex(&self) -> String {
        self.uaid.simple().to_string()
    }

    fn user_json(&self) -> Value {
        json!({
            "uaid": self.hex(),
            "connected_at": self.connected_at_ms,
            "router_type": self.router_type,
            "router_data": self.router_data,
            "node_id": "http://autoconnect-1:8081",
            "record_version": 1,
            "priv_channels": [],
        })
    }

    /// One line of the JSON-lines export format.
    pub fn jsonl(&self) -> String {
        json!({
            "uaid": self.hex(),
            "connected_at": self.connected_at_ms,
            "router_type": self.router_type,
            "router_data": self.router_data,
            "channels": self.channels.iter().map(|c| c.hyphenated().to_string()).collect::<Vec<_>>(),
            "messages": self.messages.iter().map(|m| m.json(false)).collect::<Vec<_>>(),
        })
        .to_string()
    }
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Writes `uas` as autopush-rs's Redis backend does. Channels are appended
/// twice (autopush's RPUSH does not dedupe). A message already past its
/// expiry gets its zset entries but no payload key, as Redis's EXAT leaves
/// it. `old` writes the message JSON of 1.78.0–1.82.1.
pub fn write_redis(conn: &mut redis::Connection, uas: &[UserAgent], old: bool) {
    let now = now();
    let mut p = redis::pipe();
    for ua in uas {
        let u = ua.uaid.hyphenated().to_string();
        p.cmd("SET")
            .arg(format!("autopush/user/{u}"))
            .arg(ua.user_json().to_string())
            .arg("EX")
            .arg(ROUTER_TTL)
            .ignore();
        p.cmd("SET")
            .arg(format!("autopush/co/{u}"))
            .arg(ua.connected_at_ms)
            .arg("EX")
            .arg(ROUTER_TTL)
            .ignore();
        for c in ua.channels.iter().chain(ua.channels.first()) {
            p.cmd("RPUSH")
                .arg(format!("autopush/channels/{u}"))
                .arg(c.hyphenated().to_string())
                .ignore();
        }
        if let Some(ptr) = ua.pointer {
            p.cmd("SET")
                .arg(format!("autopush/timestamp/{u}"))
                .arg(ptr)
                .ignore();
        }
        for m in &ua.messages {
            let member = m.chidmessageid();
            // Saved the moment it arrived (the zset score is the save time).
            let saved = m.timestamp;
            let expiry = saved + m.ttl;
            if expiry > now {
                p.cmd("SET")
                    .arg(format!("autopush/msg/{u}/{member}"))
                    .arg(m.json(old).to_string())
                    .arg("EXAT")
                    .arg(expiry)
                    .ignore();
            }
            p.cmd("ZADD")
                .arg(format!("autopush/msgs/{u}"))
                .arg(saved)
                .arg(&member)
                .ignore();
            p.cmd("ZADD")
                .arg(format!("autopush/msgs_exp/{u}"))
                .arg(expiry)
                .arg(&member)
                .ignore();
        }
    }
    p.query::<()>(conn).expect("write autopush's Redis layout");
}

/// autopush-rs's Postgres schema (its migration), in `schema` if given.
pub fn postgres_ddl(schema: Option<&str>) -> String {
    let (create_schema, p) = match schema {
        Some(s) => (format!("CREATE SCHEMA {s};"), format!("{s}.")),
        None => (String::new(), String::new()),
    };
    format!(
        "{create_schema}
        CREATE TABLE {p}router (
            uaid varchar(40) NOT NULL PRIMARY KEY UNIQUE,
            connected_at bigint, router_type varchar(100), router_data text,
            last_connect bigint, node_id varchar(100), record_version bigint,
            version text, last_update bigint, expiry bigint,
            priv_channels varchar(40)[]);
        CREATE TABLE {p}meta (
            channel_id varchar(40) NOT NULL,
            uaid varchar(40) NOT NULL REFERENCES {p}router ON DELETE cascade,
            PRIMARY KEY (uaid, channel_id));
        CREATE TABLE {p}reliability (
            id varchar(40) NOT NULL PRIMARY KEY, states jsonb,
            last_update_timestamp bigint);
        CREATE TABLE {p}message (
            uaid varchar(40) NOT NULL REFERENCES {p}router ON DELETE cascade,
            channel_id varchar(40), chid_message_id varchar(100), version text,
            ttl bigint, expiry bigint, topic varchar, timestamp bigint,
            data text, sortkey_timestamp bigint, headers text,
            reliability_id varchar(40) REFERENCES {p}reliability(id),
            PRIMARY KEY (uaid, chid_message_id));
        CREATE UNIQUE INDEX ON {p}message (chid_message_id);
        CREATE INDEX ON {p}meta (uaid);"
    )
}

/// Writes `uas` as autopush-rs's Postgres backend does (schema created
/// first with `postgres_ddl`).
pub async fn write_postgres(
    client: &tokio_postgres::Client,
    schema: Option<&str>,
    uas: &[UserAgent],
) {
    let p = schema.map(|s| format!("{s}.")).unwrap_or_default();
    for ua in uas {
        let hex = ua.hex();
        let data = ua.router_data.to_string();
        client
            .execute(
                &format!(
                    "INSERT INTO {p}router (uaid, connected_at, router_type, router_data, node_id, \
                     record_version, version, last_update, expiry, priv_channels) \
                     VALUES ($1, $2, $3, $4, 'http://autoconnect-1:8081', 1, $5, $6, $7, '{{}}')"
                ),
                &[
                    &hex,
                    &(ua.connected_at_ms as i64),
                    &ua.router_type,
                    &data,
                    &Uuid::new_v4().simple().to_string(),
                    &ua.pointer.map(|v| v as i64),
                    &((ua.connected_at_ms / 1000 + ROUTER_TTL) as i64),
                ],
            )
            .await
            .expect("insert router row");
        for c in &ua.channels {
            client
                .execute(
                    &format!("INSERT INTO {p}meta (uaid, channel_id) VALUES ($1, $2)"),
                    &[&hex, &c.simple().to_string()],
                )
                .await
                .expect("insert meta row");
        }
        for m in &ua.messages {
            let headers = m
                .headers_json()
                .map(|h| h.to_string())
                .unwrap_or_else(|| "null".into());
            client
                .execute(
                    &format!(
                        "INSERT INTO {p}message (uaid, channel_id, chid_message_id, version, ttl, \
                         expiry, topic, timestamp, data, sortkey_timestamp, headers) \
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
                    ),
                    &[
                        &hex,
                        &m.channel.simple().to_string(),
                        &m.chidmessageid(),
                        &m.version,
                        &(m.ttl as i64),
                        &((m.timestamp + m.ttl) as i64),
                        &m.topic,
                        &(m.timestamp as i64),
                        &m.data_b64(),
                        &m.sortkey_ms.map(|v| v as i64),
                        &headers,
                    ],
                )
                .await
                .expect("insert message row");
        }
    }
}
