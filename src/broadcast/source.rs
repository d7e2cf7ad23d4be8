//! Polling an upstream source of broadcast versions: Mozilla Remote
//! Settings' `/v1/__broadcasts__`, a megaphone server's `/v1/broadcasts`, or
//! anything answering `{"broadcasts": {id: version}}`. A failing source
//! keeps the last versions; it shows in `herald_broadcast_source_errors_total`
//! and in the log, and never stops Herald.

use super::{valid, Broadcaster};
use crate::metrics::Metrics;
use crate::store::Store;
use bytes::Bytes;
use herald_client::http::{HttpClient, PooledClient};
use http_body_util::{BodyExt, Empty, Limited};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// A list of versions is small; anything bigger is not one.
const MAX_BODY: usize = 1 << 20;

/// The versions a source's answer names; errors say what is wrong with it.
pub fn parse(body: &[u8]) -> Result<BTreeMap<String, String>, String> {
    #[derive(serde::Deserialize)]
    struct Answer {
        broadcasts: BTreeMap<String, serde_json::Value>,
    }
    let answer: Answer = serde_json::from_slice(body)
        .map_err(|e| format!("not a broadcasts answer ({{\"broadcasts\":{{…}}}}): {e}"))?;
    Ok(answer
        .broadcasts
        .into_iter()
        .filter_map(|(id, v)| match v {
            serde_json::Value::String(v) if valid(&id, &v) => Some((id, v)),
            _ => None,
        })
        .collect())
}

pub struct Source {
    url: http::Uri,
    token: Option<String>,
    client: PooledClient<Empty<Bytes>>,
}

impl Source {
    pub fn new(url: &str, token: Option<String>) -> anyhow::Result<Source> {
        Ok(Source {
            url: url.parse()?,
            token,
            client: HttpClient::default().pooled(),
        })
    }

    pub async fn fetch(&self) -> Result<BTreeMap<String, String>, String> {
        let mut req = http::Request::get(self.url.clone()).header("accept", "application/json");
        if let Some(t) = &self.token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let req = req.body(Empty::new()).map_err(|e| e.to_string())?;
        let resp = tokio::time::timeout(REQUEST_TIMEOUT, self.client.request(req))
            .await
            .map_err(|_| format!("no answer within {REQUEST_TIMEOUT:?}"))?
            .map_err(|e| format!("request failed: {e}"))?;
        let status = resp.status();
        let body = tokio::time::timeout(
            REQUEST_TIMEOUT,
            Limited::new(resp.into_body(), MAX_BODY).collect(),
        )
        .await
        .map_err(|_| "body too slow".to_string())?
        .map_err(|e| format!("reading the body: {e}"))?
        .to_bytes();
        if !status.is_success() {
            return Err(format!("answered {status}"));
        }
        parse(&body)
    }
}

/// Polls forever (run as a task): new versions go to the store and to this
/// node's connections.
pub async fn poll_loop(
    source: Source,
    interval: Duration,
    broadcaster: Arc<Broadcaster>,
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tick.tick().await;
        let versions = match source.fetch().await {
            Ok(v) => v,
            Err(e) => {
                metrics.broadcast_source_errors.inc();
                // Once per outage at warn; the metric counts every failure.
                if failing {
                    tracing::debug!(url = %source.url, "broadcast source: {e}");
                } else {
                    tracing::warn!(url = %source.url, "broadcast source failing, keeping the last versions: {e}");
                }
                failing = true;
                continue;
            }
        };
        if failing {
            tracing::info!(url = %source.url, "broadcast source answering again");
            failing = false;
        }
        let current = broadcaster.current();
        for (id, version) in versions {
            if current.versions.get(&id) == Some(&version) {
                continue;
            }
            if let Err(e) = broadcaster.set(store.as_ref(), &id, &version).await {
                tracing::warn!("storing broadcast {id}: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_remote_settings_and_megaphone_answers() {
        let rs =
            br#"{"code":200,"broadcasts":{"remote-settings/monitor_changes":"\"1700000000123\""}}"#;
        assert_eq!(
            parse(rs)
                .unwrap()
                .get("remote-settings/monitor_changes")
                .map(String::as_str),
            Some("\"1700000000123\"")
        );
        // Entries that are not valid id/version strings are skipped.
        let odd = br#"{"broadcasts":{"a":1,"b c":"1","ok":"v"}}"#;
        assert_eq!(parse(odd).unwrap().len(), 1);
        assert!(parse(b"[]").is_err());
        assert!(parse(b"{\"other\":{}}").is_err());
    }
}
