//! autopush-rs's Postgres backend (`postgres://…`): tables `router`, `meta`
//! and `message` (in `--pg-schema` when autopush's `db_settings` named
//! one). The columns are checked first; a missing one is an error naming
//! the table and column.

use super::record::{
    check_topic, decode_data, dedupe_channels, parse_channel, parse_headers, parse_route,
    parse_uaid, ImportedChannel, ImportedMessage, ImportedUa, Routed,
};
use super::summary::{Summary, What};
use super::Source;
use anyhow::Context;
use herald_proto::urgency::Urgency;
use std::collections::{BTreeMap, VecDeque};
use tokio_postgres::{Client, NoTls, Row};

/// Router rows read per query.
const PAGE: i64 = 500;

/// The columns the importer reads, per table.
pub const REQUIRED: [(&str, &[&str]); 3] = [
    (
        "router",
        &[
            "uaid",
            "connected_at",
            "router_type",
            "router_data",
            "last_update",
        ],
    ),
    ("meta", &["uaid", "channel_id"]),
    (
        "message",
        &[
            "uaid",
            "channel_id",
            "chid_message_id",
            "version",
            "ttl",
            "topic",
            "timestamp",
            "data",
            "sortkey_timestamp",
            "headers",
        ],
    ),
];

/// The first required column `present` lacks, as (table, column).
pub fn missing_column(present: &[(String, String)]) -> Option<(&'static str, &'static str)> {
    REQUIRED.iter().find_map(|(table, cols)| {
        cols.iter()
            .find(|c| !present.iter().any(|(t, pc)| t == table && pc == *c))
            .map(|c| (*table, *c))
    })
}

/// `router_data` text: JSON, `null` for a websocket user agent.
pub fn parse_router_data(text: Option<&str>) -> Result<Option<serde_json::Value>, String> {
    match text.map(str::trim) {
        None | Some("") => Ok(None),
        Some(t) => serde_json::from_str(t)
            .map(Some)
            .map_err(|e| format!("router_data is not JSON: {e}")),
    }
}

/// `headers` text: a JSON map, or `null`/empty/`{}` for none.
pub fn parse_headers_text(text: Option<&str>) -> Result<Option<BTreeMap<String, String>>, String> {
    match text.map(str::trim) {
        None | Some("") | Some("null") => Ok(None),
        Some(t) => serde_json::from_str(t).map_err(|e| format!("headers are not a JSON map: {e}")),
    }
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

pub struct PostgresSource {
    client: Client,
    /// `schema.` or empty, quoted.
    prefix: String,
    total: u64,
    page: VecDeque<Row>,
    last_uaid: String,
    exhausted: bool,
}

impl PostgresSource {
    pub async fn open(dsn: &str, schema: Option<&str>) -> anyhow::Result<PostgresSource> {
        let (client, connection) = tokio_postgres::connect(dsn, NoTls)
            .await
            .with_context(|| format!("connecting to {}", super::redact(dsn)))?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::error!("postgres connection: {e}");
            }
        });
        let rows = client
            .query(
                "SELECT table_name::text, column_name::text FROM information_schema.columns \
                 WHERE table_schema::text = COALESCE($1::text, current_schema()::text) \
                 AND table_name IN ('router', 'meta', 'message')",
                &[&schema],
            )
            .await
            .context("reading the table layout")?;
        let present: Vec<(String, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        if let Some((table, column)) = missing_column(&present) {
            let schema = schema.unwrap_or("the current schema");
            if present.iter().any(|(t, _)| t == table) {
                anyhow::bail!("postgres table {table} in {schema} has no column {column}: not autopush-rs's schema");
            }
            anyhow::bail!("postgres: no table {table} in {schema}: not autopush-rs's schema (is --pg-schema right?)");
        }
        let prefix = schema
            .map(|s| format!("{}.", quote_ident(s)))
            .unwrap_or_default();
        let total: i64 = client
            .query_one(&format!("SELECT count(*) FROM {prefix}router"), &[])
            .await
            .context("counting router rows")?
            .get(0);
        Ok(PostgresSource {
            client,
            prefix,
            total: total as u64,
            page: VecDeque::new(),
            last_uaid: String::new(),
            exhausted: false,
        })
    }

    async fn next_row(&mut self) -> anyhow::Result<Option<Row>> {
        if self.page.is_empty() && !self.exhausted {
            let p = &self.prefix;
            let rows = self
                .client
                .query(
                    &format!(
                        "SELECT uaid::text, connected_at, router_type::text, router_data, last_update \
                         FROM {p}router WHERE uaid > $1 ORDER BY uaid LIMIT $2"
                    ),
                    &[&self.last_uaid, &PAGE],
                )
                .await
                .context("reading router rows")?;
            self.exhausted = (rows.len() as i64) < PAGE;
            if let Some(last) = rows.last() {
                self.last_uaid = last.get(0);
            }
            self.page.extend(rows);
        }
        Ok(self.page.pop_front())
    }

    async fn read(
        &mut self,
        row: Row,
        summary: &mut Summary,
    ) -> anyhow::Result<Option<ImportedUa>> {
        let uaid_text: String = row.get(0);
        let bad = |e: String| anyhow::anyhow!("postgres router row {uaid_text}: {e}");
        let connected_at: Option<i64> = row.get(1);
        let router_type: String = row.get(2);
        let router_data: Option<String> = row.get(3);
        let last_update: Option<i64> = row.get(4);
        let uaid = parse_uaid(&uaid_text).map_err(bad)?;
        let data = parse_router_data(router_data.as_deref()).map_err(bad)?;
        let route = match parse_route(&router_type, data.as_ref()).map_err(bad)? {
            Routed::Route(r) => r,
            Routed::Skip(reason) => {
                summary.skip(What::UserAgents, reason, 1);
                return Ok(None);
            }
        };
        let p = &self.prefix;
        let rows = self
            .client
            .query(
                &format!(
                    "SELECT channel_id::text FROM {p}meta WHERE uaid = $1 ORDER BY channel_id"
                ),
                &[&uaid_text],
            )
            .await
            .context("reading meta rows")?;
        let channels = rows
            .iter()
            .map(|r| {
                let c: String = r.get(0);
                parse_channel(&c)
                    .map(|id| ImportedChannel { id, key_hash: None })
                    .map_err(|e| anyhow::anyhow!("postgres meta row ({uaid_text}, {c}): {e}"))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let messages = self.messages(&uaid_text, last_update, summary).await?;
        Ok(Some(ImportedUa {
            uaid,
            connected_at_ms: connected_at.unwrap_or(0).max(0) as u64,
            route,
            channels: dedupe_channels(channels),
            messages,
        }))
    }

    /// Pending by autopush's rule: every topic message, and timestamp
    /// messages received after the read pointer (`last_update`, strict).
    async fn messages(
        &mut self,
        uaid: &str,
        pointer: Option<i64>,
        summary: &mut Summary,
    ) -> anyhow::Result<Vec<ImportedMessage>> {
        let p = &self.prefix;
        let rows = self
            .client
            .query(
                &format!(
                    "SELECT chid_message_id::text, channel_id::text, version, ttl, topic::text, \
                     timestamp, data, sortkey_timestamp, headers \
                     FROM {p}message WHERE uaid = $1 ORDER BY timestamp, sortkey_timestamp, chid_message_id"
                ),
                &[&uaid],
            )
            .await
            .context("reading message rows")?;
        let mut out = Vec::new();
        for r in rows {
            let key: String = r.get(0);
            let m = message_row(&r)
                .map_err(|e| anyhow::anyhow!("postgres message row ({uaid}, {key}): {e}"))?;
            let delivered =
                m.topic.is_none() && pointer.is_some_and(|ptr| (m.timestamp as i64) <= ptr);
            if delivered {
                summary.skip(What::Messages, "delivered before the import", 1);
                continue;
            }
            out.push(m);
        }
        Ok(out)
    }
}

fn message_row(r: &Row) -> Result<ImportedMessage, String> {
    let channel: String = r.try_get(1).map_err(|e| e.to_string())?;
    let version: Option<String> = r.try_get(2).map_err(|e| e.to_string())?;
    let ttl: Option<i64> = r.try_get(3).map_err(|e| e.to_string())?;
    let topic: Option<String> = r.try_get(4).map_err(|e| e.to_string())?;
    let timestamp: Option<i64> = r.try_get(5).map_err(|e| e.to_string())?;
    let data: Option<String> = r.try_get(6).map_err(|e| e.to_string())?;
    let sortkey: Option<i64> = r.try_get(7).map_err(|e| e.to_string())?;
    let headers: Option<String> = r.try_get(8).map_err(|e| e.to_string())?;
    let nonneg = |v: Option<i64>, name: &str| -> Result<u64, String> {
        v.filter(|v| *v >= 0)
            .map(|v| v as u64)
            .ok_or_else(|| format!("{name} is missing or negative"))
    };
    let data = decode_data(data.as_deref())?;
    let headers = parse_headers_text(headers.as_deref())?;
    Ok(ImportedMessage {
        id: version.ok_or("version is missing")?,
        channel: parse_channel(&channel)?,
        timestamp: nonneg(timestamp, "timestamp")?,
        ttl: nonneg(ttl, "ttl")?,
        sortkey_ms: sortkey.filter(|v| *v > 0).map(|v| v as u64),
        topic: check_topic(topic)?,
        urgency: Urgency::Normal,
        headers: parse_headers(headers.as_ref(), &data)?,
        data,
    })
}

#[async_trait::async_trait]
impl Source for PostgresSource {
    fn total(&self) -> Option<u64> {
        Some(self.total)
    }

    async fn next(&mut self, summary: &mut Summary) -> anyhow::Result<Option<ImportedUa>> {
        while let Some(row) = self.next_row().await? {
            if let Some(ua) = self.read(row, summary).await? {
                return Ok(Some(ua));
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_first_missing_column() {
        let mut present: Vec<(String, String)> = REQUIRED
            .iter()
            .flat_map(|(t, cols)| cols.iter().map(move |c| (t.to_string(), c.to_string())))
            .collect();
        assert_eq!(missing_column(&present), None);
        present.retain(|(t, c)| !(t == "message" && c == "sortkey_timestamp"));
        assert_eq!(
            missing_column(&present),
            Some(("message", "sortkey_timestamp"))
        );
    }

    #[test]
    fn text_columns() {
        assert_eq!(
            parse_router_data(Some("null")),
            Ok(Some(serde_json::Value::Null))
        );
        assert!(parse_router_data(Some("{")).is_err());
        assert_eq!(parse_headers_text(Some("null")), Ok(None));
        assert_eq!(parse_headers_text(Some("{}")), Ok(Some(BTreeMap::new())));
        assert_eq!(
            parse_headers_text(Some(r#"{"encoding":"aes128gcm"}"#))
                .unwrap()
                .unwrap()["encoding"],
            "aes128gcm"
        );
        assert!(parse_headers_text(Some("[1]")).is_err());
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
    }
}
