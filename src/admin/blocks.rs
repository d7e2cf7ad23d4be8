//! Senders the operator blocked, by VAPID key or by the `sub` of their
//! VAPID claims. The store keeps them (so they survive restarts and hold on
//! every node); each node checks every push against its own copy in memory,
//! never the store, and reads the store again every `REFRESH_INTERVAL`
//! (and at once after a change made through itself).

use crate::admission::Sender;
use crate::errors::ApiError;
use crate::metrics::Metrics;
use crate::store::{Store, StoreResult};
use crate::token::{key_hash, KeyHash};
use herald_proto::b64::{decode_b64url, encode_b64url};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// How often nodes sharing a store read its blocks: a block made on one
/// node refuses pushes on the others within this (plus one store read).
pub const REFRESH_INTERVAL: Duration = Duration::from_secs(2);
/// The longest `reason` kept with a block.
pub const MAX_REASON: usize = 500;
/// The longest `sub` that can be blocked (longer ones are not URIs a
/// sender would use).
pub const MAX_SUB: usize = 1024;

/// What a block matches.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    /// The hash of a VAPID public key (what `admission::Sender` carries).
    Key(KeyHash),
    /// The `sub` of the sender's VAPID claims, exactly.
    Sub(String),
}

impl Target {
    /// Its id in the store: `key:<base64url SHA-256 of the key>` or `sub:<sub>`.
    pub fn id(&self) -> String {
        match self {
            Target::Key(h) => format!("key:{}", encode_b64url(h)),
            Target::Sub(s) => format!("sub:{s}"),
        }
    }

    pub fn from_id(id: &str) -> Option<Target> {
        if let Some(h) = id.strip_prefix("key:") {
            return parse_key_hash(h).map(Target::Key);
        }
        id.strip_prefix("sub:").map(|s| Target::Sub(s.to_string()))
    }
}

/// The record kept with a block.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// The public key as the operator gave it, when blocked by key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vapid_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Unix seconds.
    pub created: u64,
}

/// A `PUT` or `DELETE /v1/admin/blocks` body: exactly one of `vapid_key`
/// (base64url uncompressed P-256 point), `vapid_key_hash` (as the top
/// senders list shows it) or `sub`, and an optional `reason`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockRequest {
    #[serde(default)]
    pub vapid_key: Option<String>,
    #[serde(default)]
    pub vapid_key_hash: Option<String>,
    #[serde(default)]
    pub sub: Option<String>,
    #[serde(default)]
    pub reason: Option<String>,
}

impl BlockRequest {
    /// What to block and the record to keep, or why the request is wrong.
    pub fn parse(body: &[u8], now: u64) -> Result<(Target, Record), String> {
        let req: BlockRequest = serde_json::from_slice(body).map_err(|e| {
            format!("the body must be a JSON object with vapid_key, vapid_key_hash or sub: {e}")
        })?;
        if req.reason.as_ref().is_some_and(|r| r.len() > MAX_REASON) {
            return Err(format!("reason is longer than {MAX_REASON} bytes"));
        }
        let mut record = Record {
            vapid_key: None,
            reason: req.reason,
            created: now,
        };
        let target = match (req.vapid_key, req.vapid_key_hash, req.sub) {
            (Some(k), None, None) => {
                let raw = decode_b64url(k.trim())
                    .filter(|r| r.len() == 65 && r[0] == 4)
                    .filter(|r| p256::PublicKey::from_sec1_bytes(r).is_ok())
                    .ok_or("vapid_key must be an uncompressed P-256 public key in base64url")?;
                record.vapid_key = Some(encode_b64url(&raw));
                Target::Key(key_hash(&raw))
            }
            (None, Some(h), None) => Target::Key(
                parse_key_hash(h.trim()).ok_or("vapid_key_hash must be 32 bytes in base64url")?,
            ),
            (None, None, Some(s)) => {
                let s = s.trim();
                let uri = s.starts_with("mailto:") || s.starts_with("https:");
                if !uri || s.len() > MAX_SUB || s.chars().any(char::is_control) {
                    return Err(format!(
                        "sub must be a mailto: or https: URI of at most {MAX_SUB} bytes"
                    ));
                }
                Target::Sub(s.to_string())
            }
            _ => return Err("give exactly one of vapid_key, vapid_key_hash and sub".into()),
        };
        Ok((target, record))
    }
}

fn parse_key_hash(s: &str) -> Option<KeyHash> {
    decode_b64url(s).and_then(|b| b.try_into().ok())
}

/// Every block, as the node knows it now.
#[derive(Debug, Default)]
struct Set {
    keys: HashSet<KeyHash>,
    subs: HashSet<String>,
    /// For listing: id → record.
    records: BTreeMap<String, Record>,
}

impl Set {
    fn from_store(stored: BTreeMap<String, String>) -> Set {
        let mut set = Set::default();
        for (id, record) in stored {
            let Some(target) = Target::from_id(&id) else {
                tracing::warn!(id, "ignoring a block with an unreadable id");
                continue;
            };
            match target {
                Target::Key(h) => set.keys.insert(h),
                Target::Sub(s) => set.subs.insert(s),
            };
            let record = serde_json::from_str(&record).unwrap_or_default();
            set.records.insert(id, record);
        }
        set
    }
}

/// This node's copy of the blocks.
#[derive(Default)]
pub struct Blocks {
    set: RwLock<Arc<Set>>,
}

impl Blocks {
    /// Refuses a blocked sender (403, errno 127) and counts it.
    pub fn check(&self, metrics: &Metrics, sender: &Sender<'_>) -> Result<(), ApiError> {
        let set = self.current();
        let by = if sender.key.is_some_and(|k| set.keys.contains(k)) {
            "key"
        } else if sender.sub.is_some_and(|s| set.subs.contains(s)) {
            "sub"
        } else {
            return Ok(());
        };
        metrics.blocked_pushes.with_label_values(&[by]).inc();
        Err(ApiError::sender_blocked(if by == "key" {
            "VAPID key"
        } else {
            "VAPID sub"
        }))
    }

    fn current(&self) -> Arc<Set> {
        self.set.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Reads every block from the store; returns how many there are.
    pub async fn refresh(&self, store: &dyn Store) -> StoreResult<usize> {
        let set = Set::from_store(store.blocks().await?);
        let n = set.records.len();
        *self.set.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(set);
        Ok(n)
    }

    /// Stores a block and applies it on this node at once.
    pub async fn add(
        &self,
        store: &dyn Store,
        target: &Target,
        record: &Record,
    ) -> StoreResult<()> {
        let encoded = serde_json::to_string(record).unwrap_or_default();
        store.put_block(&target.id(), &encoded).await?;
        self.refresh(store).await.map(drop)
    }

    /// Removes a block; false if there was none.
    pub async fn remove(&self, store: &dyn Store, target: &Target) -> StoreResult<bool> {
        let existed = store.remove_block(&target.id()).await?;
        self.refresh(store).await?;
        Ok(existed)
    }

    /// Every block this node knows of, by id.
    pub fn list(&self) -> Vec<(String, Record)> {
        self.current()
            .records
            .iter()
            .map(|(id, r)| (id.clone(), r.clone()))
            .collect()
    }

    pub fn len(&self) -> usize {
        self.current().records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{IpAddr, Ipv4Addr};

    fn public_key() -> Vec<u8> {
        let k = p256::ecdsa::SigningKey::random(&mut rand::thread_rng());
        k.verifying_key()
            .to_encoded_point(false)
            .as_bytes()
            .to_vec()
    }

    fn parse(body: &str) -> Result<(Target, Record), String> {
        BlockRequest::parse(body.as_bytes(), 7)
    }

    #[test]
    fn parses_each_form_and_refuses_the_rest() {
        let raw = public_key();
        let b64 = encode_b64url(&raw);
        let (t, r) = parse(&format!(r#"{{"vapid_key":"{b64}=","reason":"spam"}}"#)).unwrap();
        assert_eq!(t, Target::Key(key_hash(&raw)));
        assert_eq!(r.vapid_key.as_deref(), Some(b64.as_str()));
        assert_eq!((r.reason.as_deref(), r.created), (Some("spam"), 7));
        let hash = encode_b64url(&key_hash(&raw));
        let (t2, _) = parse(&format!(r#"{{"vapid_key_hash":"{hash}"}}"#)).unwrap();
        assert_eq!(t2, t);
        assert_eq!(Target::from_id(&t.id()), Some(t));
        let (s, _) = parse(r#"{"sub":" mailto:a@example.com "}"#).unwrap();
        assert_eq!(s, Target::Sub("mailto:a@example.com".into()));
        assert_eq!(Target::from_id(&s.id()), Some(s));
        for bad in [
            "",
            "[]",
            "{}",
            r#"{"vapid_key":"AAAA"}"#,
            r#"{"vapid_key_hash":"AAAA"}"#,
            r#"{"sub":"someone"}"#,
            r#"{"sub":"mailto:a@example.com","vapid_key_hash":"x"}"#,
            r#"{"sub":"mailto:a@example.com","extra":1}"#,
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
        let long = format!(
            r#"{{"sub":"mailto:a@example.com","reason":"{}"}}"#,
            "r".repeat(501)
        );
        assert!(parse(&long).is_err());
        // A point not on the curve.
        let mut off = raw.clone();
        off[64] ^= 1;
        let off = format!(r#"{{"vapid_key":"{}"}}"#, encode_b64url(&off));
        assert!(parse(&off).is_err());
    }

    #[tokio::test]
    async fn blocks_refuse_by_key_or_sub_and_unblock() {
        let store = crate::store::MemStore::new();
        let metrics = Metrics::new();
        let blocks = Blocks::default();
        let client = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let sender =
            |key: Option<&'static KeyHash>, sub: Option<&'static str>| Sender { client, key, sub };
        static K1: KeyHash = [1u8; 32];
        static K2: KeyHash = [2u8; 32];
        blocks
            .add(&store, &Target::Key(K1), &Record::default())
            .await
            .unwrap();
        blocks
            .add(
                &store,
                &Target::Sub("mailto:b@x.org".into()),
                &Record::default(),
            )
            .await
            .unwrap();
        let err = blocks
            .check(&metrics, &sender(Some(&K1), None))
            .unwrap_err();
        assert_eq!((err.status, err.errno.code()), (403, 127));
        let err = blocks
            .check(&metrics, &sender(Some(&K2), Some("mailto:b@x.org")))
            .unwrap_err();
        assert_eq!(err.errno.code(), 127);
        blocks
            .check(&metrics, &sender(Some(&K2), Some("mailto:c@x.org")))
            .unwrap();
        blocks.check(&metrics, &sender(None, None)).unwrap();
        assert_eq!(metrics.blocked_pushes.with_label_values(&["key"]).get(), 1);
        assert_eq!(metrics.blocked_pushes.with_label_values(&["sub"]).get(), 1);
        assert_eq!(blocks.len(), 2);
        assert!(blocks.remove(&store, &Target::Key(K1)).await.unwrap());
        assert!(!blocks.remove(&store, &Target::Key(K1)).await.unwrap());
        blocks.check(&metrics, &sender(Some(&K1), None)).unwrap();
        // Another node's copy learns of the store's blocks on refresh.
        let other = Blocks::default();
        assert_eq!(other.refresh(&store).await.unwrap(), 1);
        assert!(other
            .check(&metrics, &sender(None, Some("mailto:b@x.org")))
            .is_err());
    }
}
