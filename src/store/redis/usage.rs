//! The quotas' exchange on Redis (see `quota::share`): one stream,
//! `herald:quota`, each entry a node's usage since its last entry (fields
//! `n`: node id, `u`: the message). Trimmed to about `KEPT` entries, so it
//! stays small whatever the traffic; each node reads what came after its
//! cursor, every half second, well before that many entries pile up.

use super::RedisStore;
use crate::store::{StoreError, StoreResult};
use redis::Value;

const STREAM: &str = "herald:quota";
const KEPT: usize = 256;

impl RedisStore {
    pub(super) async fn exchange_usage(
        &self,
        node: u64,
        usage: &[u8],
        cursor: Option<&str>,
    ) -> StoreResult<(String, Vec<Vec<u8>>)> {
        let cursor = match cursor {
            Some(c) => c.to_string(),
            None => self.latest_usage_id().await?,
        };
        if !usage.is_empty() {
            self.query::<Value>(
                "share_usage",
                redis::cmd("XADD")
                    .arg(STREAM)
                    .arg("MAXLEN")
                    .arg("~")
                    .arg(KEPT)
                    .arg("*")
                    .arg("n")
                    .arg(node)
                    .arg("u")
                    .arg(usage),
            )
            .await?;
        }
        let reply: Value = self
            .query(
                "read_usage",
                redis::cmd("XREAD")
                    .arg("COUNT")
                    .arg(KEPT)
                    .arg("STREAMS")
                    .arg(STREAM)
                    .arg(&cursor),
            )
            .await?;
        let entries = stream_entries(reply)
            .ok_or_else(|| StoreError::Rejected("redis XREAD: unexpected reply".into()))?;
        let next = entries.last().map_or(cursor, |e| e.0.clone());
        let own = node.to_string();
        let others = entries
            .into_iter()
            .filter(|(_, from, _)| *from != own)
            .map(|(_, _, u)| u)
            .collect();
        Ok((next, others))
    }

    /// The id of the stream's newest entry ("0-0" when empty): reading
    /// starts after it, so a node starting up does not charge usage from
    /// before its time.
    async fn latest_usage_id(&self) -> StoreResult<String> {
        let reply: Value = self
            .query(
                "read_usage",
                redis::cmd("XREVRANGE")
                    .arg(STREAM)
                    .arg("+")
                    .arg("-")
                    .arg("COUNT")
                    .arg(1),
            )
            .await?;
        let id = match reply {
            Value::Array(entries) => entries.into_iter().next().and_then(entry).map(|e| e.0),
            _ => None,
        };
        Ok(id.unwrap_or_else(|| "0-0".into()))
    }
}

/// XREAD's answer for one stream: (id, node, usage) per entry; nil (no new
/// entries) is an empty list. RESP2 answers an array of [key, entries],
/// RESP3 a map of key → entries.
fn stream_entries(reply: Value) -> Option<Vec<(String, String, Vec<u8>)>> {
    let entries = match reply {
        Value::Nil => return Some(Vec::new()),
        Value::Array(streams) => match streams.into_iter().next()? {
            Value::Array(kv) => kv.into_iter().nth(1)?,
            _ => return None,
        },
        Value::Map(streams) => streams.into_iter().next()?.1,
        _ => return None,
    };
    match entries {
        Value::Array(es) => Some(es.into_iter().filter_map(entry).collect()),
        _ => None,
    }
}

/// One stream entry, [id, [field, value, …]], as (id, node, usage).
fn entry(v: Value) -> Option<(String, String, Vec<u8>)> {
    let Value::Array(parts) = v else { return None };
    let mut parts = parts.into_iter();
    let id = text(parts.next()?)?;
    let fields: Vec<Vec<u8>> = match parts.next()? {
        Value::Array(f) => f.into_iter().filter_map(bytes).collect(),
        Value::Map(m) => m
            .into_iter()
            .flat_map(|(k, v)| [bytes(k), bytes(v)])
            .flatten()
            .collect(),
        _ => return None,
    };
    let (mut node, mut usage) = (None, None);
    for pair in fields.chunks_exact(2) {
        match pair[0].as_slice() {
            b"n" => node = String::from_utf8(pair[1].clone()).ok(),
            b"u" => usage = Some(pair[1].clone()),
            _ => {}
        }
    }
    Some((id, node?, usage?))
}

fn bytes(v: Value) -> Option<Vec<u8>> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.into_bytes()),
        _ => None,
    }
}

fn text(v: Value) -> Option<String> {
    String::from_utf8(bytes(v)?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &[u8]) -> Value {
        Value::BulkString(s.to_vec())
    }

    fn one(id: &str, node: &str, usage: &[u8]) -> Value {
        Value::Array(vec![
            bulk(id.as_bytes()),
            Value::Array(vec![
                bulk(b"n"),
                bulk(node.as_bytes()),
                bulk(b"u"),
                bulk(usage),
            ]),
        ])
    }

    #[test]
    fn xread_answers_in_resp2_and_resp3_are_read() {
        let entries = Value::Array(vec![one("1-0", "7", b"\x01"), one("2-0", "8", b"\x02")]);
        let want = vec![
            ("1-0".to_string(), "7".to_string(), vec![1u8]),
            ("2-0".to_string(), "8".to_string(), vec![2u8]),
        ];
        let resp2 = Value::Array(vec![Value::Array(vec![
            bulk(STREAM.as_bytes()),
            entries.clone(),
        ])]);
        assert_eq!(stream_entries(resp2).unwrap(), want);
        let resp3 = Value::Map(vec![(bulk(STREAM.as_bytes()), entries)]);
        assert_eq!(stream_entries(resp3).unwrap(), want);
        assert_eq!(stream_entries(Value::Nil).unwrap(), vec![]);
        assert!(stream_entries(Value::Int(3)).is_none());
    }
}
