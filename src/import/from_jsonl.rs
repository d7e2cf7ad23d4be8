//! A JSON-lines file (`*.jsonl`): one user agent per line with its
//! channels and pending messages, the format an operator's export of
//! autopush-rs's Bigtable produces (documented in proto-docs/migration.md,
//! "Import"). Field names follow autopush's own JSON.

use super::record::{
    check_topic, decode_data, dedupe_channels, parse_channel, parse_headers, parse_route,
    parse_uaid, ImportedChannel, ImportedMessage, ImportedUa, Routed,
};
use super::summary::{Summary, What};
use super::Source;
use anyhow::Context;
use base64::Engine;
use herald_proto::urgency::Urgency;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::Path;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    uaid: String,
    connected_at: u64,
    router_type: String,
    #[serde(default)]
    router_data: Option<serde_json::Value>,
    #[serde(default)]
    channels: Vec<ChannelEntry>,
    #[serde(default)]
    messages: Vec<MessageEntry>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum ChannelEntry {
    Id(String),
    WithKey(KeyedChannel),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyedChannel {
    #[serde(rename = "channelID")]
    channel_id: String,
    /// base64url SHA-256 of the application server's public key.
    #[serde(default)]
    key_hash: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MessageEntry {
    #[serde(rename = "channelID")]
    channel_id: String,
    version: String,
    timestamp: u64,
    ttl: u64,
    #[serde(default)]
    topic: Option<String>,
    #[serde(default)]
    urgency: Option<Urgency>,
    #[serde(default)]
    sortkey_timestamp: Option<u64>,
    #[serde(default)]
    data: Option<String>,
    #[serde(default)]
    headers: Option<BTreeMap<String, String>>,
}

/// What one line holds: a user agent, or why it is skipped.
pub fn parse_line(text: &str) -> Result<Result<ImportedUa, &'static str>, String> {
    let line: Line =
        serde_json::from_str(text).map_err(|e| format!("not an import record: {e}"))?;
    let uaid = parse_uaid(&line.uaid)?;
    let route = match parse_route(&line.router_type, line.router_data.as_ref())? {
        Routed::Route(r) => r,
        Routed::Skip(reason) => return Ok(Err(reason)),
    };
    let channels = line
        .channels
        .into_iter()
        .map(channel)
        .collect::<Result<Vec<_>, _>>()?;
    let messages = line
        .messages
        .into_iter()
        .enumerate()
        .map(|(i, m)| message(m).map_err(|e| format!("message {i}: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Ok(ImportedUa {
        uaid,
        connected_at_ms: line.connected_at,
        route,
        channels: dedupe_channels(channels),
        messages,
    }))
}

fn channel(c: ChannelEntry) -> Result<ImportedChannel, String> {
    let (id, hash) = match c {
        ChannelEntry::Id(id) => (id, None),
        ChannelEntry::WithKey(k) => (k.channel_id, k.key_hash),
    };
    let key_hash = match hash {
        None => None,
        Some(h) => {
            let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(h.trim_end_matches('='))
                .ok()
                .and_then(|b| <[u8; 32]>::try_from(b).ok())
                .ok_or_else(|| format!("key_hash {h:?} is not base64url of 32 bytes"))?;
            Some(raw)
        }
    };
    Ok(ImportedChannel {
        id: parse_channel(&id)?,
        key_hash,
    })
}

fn message(m: MessageEntry) -> Result<ImportedMessage, String> {
    let data = decode_data(m.data.as_deref())?;
    Ok(ImportedMessage {
        id: m.version,
        channel: parse_channel(&m.channel_id)?,
        timestamp: m.timestamp,
        ttl: m.ttl,
        sortkey_ms: m.sortkey_timestamp,
        topic: check_topic(m.topic)?,
        urgency: m.urgency.unwrap_or_default(),
        headers: parse_headers(m.headers.as_ref(), &data)?,
        data,
    })
}

pub struct JsonlSource {
    path: String,
    lines: std::io::Lines<std::io::BufReader<std::fs::File>>,
    number: u64,
    total: u64,
}

impl JsonlSource {
    pub fn open(path: &str) -> anyhow::Result<JsonlSource> {
        let open =
            || std::fs::File::open(Path::new(path)).with_context(|| format!("opening {path}"));
        // A first pass counts the lines, for the progress bar.
        let total = std::io::BufReader::new(open()?)
            .lines()
            .map_while(Result::ok)
            .filter(|l| !l.trim().is_empty())
            .count() as u64;
        Ok(JsonlSource {
            path: path.to_string(),
            lines: std::io::BufReader::new(open()?).lines(),
            number: 0,
            total,
        })
    }
}

#[async_trait::async_trait]
impl Source for JsonlSource {
    fn total(&self) -> Option<u64> {
        Some(self.total)
    }

    async fn next(&mut self, summary: &mut Summary) -> anyhow::Result<Option<ImportedUa>> {
        for line in self.lines.by_ref() {
            self.number += 1;
            let line = line.with_context(|| format!("{} line {}", self.path, self.number))?;
            if line.trim().is_empty() {
                continue;
            }
            match parse_line(&line)
                .map_err(|e| anyhow::anyhow!("{} line {}: {e}", self.path, self.number))?
            {
                Ok(ua) => return Ok(Some(ua)),
                Err(reason) => summary.skip(What::UserAgents, reason, 1),
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::import::record::Route;

    const LINE: &str = r#"{"uaid":"5f2c0d3e8a9b4c1d9e3f405162738495","connected_at":1796614003123,"router_type":"webpush","router_data":null,"channels":["0a1b2c3d-4e5f-4a6b-8c7d-8e9fa0b1c2d3",{"channelID":"1a1b2c3d-4e5f-4a6b-8c7d-8e9fa0b1c2d3","key_hash":"1pNjehOs2lDZ1BicH2Afn_o6uUyB6z1UWkDYmhRRpXo"}],"messages":[{"channelID":"0a1b2c3d-4e5f-4a6b-8c7d-8e9fa0b1c2d3","version":"gAAAAAB-1","timestamp":1796614003,"ttl":3600,"topic":"scores","urgency":"high","data":"aGk","headers":{"encoding":"aes128gcm"}}]}"#;

    #[test]
    fn a_full_line() {
        let ua = parse_line(LINE).unwrap().unwrap();
        assert_eq!(ua.uaid.to_string(), "5f2c0d3e8a9b4c1d9e3f405162738495");
        assert_eq!(ua.route, Route::Webpush);
        assert_eq!(ua.channels.len(), 2);
        assert_eq!(ua.channels[0].key_hash, None);
        assert_eq!(ua.channels[1].key_hash.unwrap()[0], 0xd6);
        let m = &ua.messages[0];
        assert_eq!(
            (m.ttl, m.topic.as_deref(), m.urgency),
            (3600, Some("scores"), Urgency::High)
        );
        assert_eq!(m.data, b"hi");
    }

    #[test]
    fn gcm_is_skipped_and_mistakes_are_named() {
        let gcm = r#"{"uaid":"5f2c0d3e8a9b4c1d9e3f405162738495","connected_at":1,"router_type":"gcm","router_data":{"token":"t"}}"#;
        assert!(parse_line(gcm).unwrap().is_err());
        let extra = LINE.replace("\"router_data\"", "\"nickname\":\"x\",\"router_data\"");
        assert!(parse_line(&extra).unwrap_err().contains("nickname"));
        let bad_msg = LINE.replace("\"ttl\":3600", "\"ttl\":3600,\"priority\":1");
        assert!(parse_line(&bad_msg).unwrap_err().contains("priority"));
        let no_ttl = LINE.replace("\"ttl\":3600,", "");
        assert!(parse_line(&no_ttl).unwrap_err().contains("ttl"));
        assert!(parse_line("{").is_err());
    }
}
