//! Capability tokens: endpoint URLs and message ids are AES-256-GCM sealed
//! blobs, so a forged or altered one is rejected without touching the store,
//! and nothing in a URL reveals which user agent it reaches.
//!
//! Layout (before base64url): nonce (12) | ciphertext | tag (16). The
//! additional data names the kind of token, so an endpoint token cannot be
//! replayed as a message id or moved between the v1 and v2 paths.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use anyhow::{bail, Context};
use herald_proto::ids::{ChannelId, Uaid};
use sha2::{Digest, Sha256};
use std::path::Path;

const AAD_V1: &[u8] = b"herald endpoint v1";
const AAD_V2: &[u8] = b"herald endpoint v2";
const AAD_MSG: &[u8] = b"herald message id";
const AAD_RECEIPT: &[u8] = b"herald receipt subscription";

pub type KeyHash = [u8; 32];

/// The hash that binds a v2 endpoint to its application server key.
pub fn key_hash(raw_public_key: &[u8]) -> KeyHash {
    Sha256::digest(raw_public_key).into()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApiVersion {
    V1,
    V2,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointToken {
    pub uaid: Uaid,
    pub channel: ChannelId,
    pub key_hash: Option<KeyHash>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MessageId {
    pub uaid: Uaid,
    pub channel: ChannelId,
    pub seq: u64,
}

/// A receipt subscription URL's contents: which subscription, and the
/// application server key it belongs to when the sender used VAPID.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReceiptToken {
    pub sub: [u8; 16],
    pub key_hash: Option<KeyHash>,
}

/// Seals and opens tokens. The first key seals; every key opens, so keys can
/// be rotated without invalidating endpoints already handed out.
pub struct TokenCodec {
    keys: Vec<Aes256Gcm>,
    /// Derives message ids' nonces from their contents (see `message_id`).
    nonce_key: [u8; 32],
}

impl TokenCodec {
    pub fn new(keys: &[[u8; 32]]) -> anyhow::Result<Self> {
        if keys.is_empty() {
            bail!("at least one endpoint key is needed");
        }
        let mut nonce_key = [0u8; 32];
        hkdf::Hkdf::<Sha256>::new(None, &keys[0])
            .expand(b"herald message id nonce v1", &mut nonce_key)
            .expect("32 bytes is a valid HKDF-SHA256 output length");
        Ok(TokenCodec {
            keys: keys
                .iter()
                .map(|k| Aes256Gcm::new_from_slice(k).expect("32-byte key"))
                .collect(),
            nonce_key,
        })
    }

    fn seal(&self, aad: &[u8], plain: &[u8]) -> String {
        self.seal_with(aad, plain, rand::random())
    }

    fn seal_with(&self, aad: &[u8], plain: &[u8], nonce: [u8; 12]) -> String {
        let sealed = self.keys[0]
            .encrypt(&Nonce::from(nonce), Payload { msg: plain, aad })
            .expect("AES-GCM sealing does not fail for short inputs");
        let mut out = Vec::with_capacity(12 + sealed.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        herald_proto::b64::encode_b64url(&out)
    }

    fn open(&self, aad: &[u8], token: &str) -> Option<Vec<u8>> {
        // Longer than any token we make: refuse before decoding.
        if token.len() > 512 {
            return None;
        }
        let raw = herald_proto::b64::decode_b64url(token)?;
        if raw.len() < 12 + 16 {
            return None;
        }
        let (nonce, sealed) = raw.split_at(12);
        let nonce = Nonce::from(<[u8; 12]>::try_from(nonce).ok()?);
        self.keys
            .iter()
            .find_map(|k| k.decrypt(&nonce, Payload { msg: sealed, aad }).ok())
    }

    pub fn endpoint_token(&self, t: &EndpointToken) -> (ApiVersion, String) {
        let mut plain = Vec::with_capacity(64);
        plain.extend_from_slice(&t.uaid.0);
        plain.extend_from_slice(t.channel.as_bytes());
        match &t.key_hash {
            Some(h) => {
                plain.extend_from_slice(h);
                (ApiVersion::V2, self.seal(AAD_V2, &plain))
            }
            None => (ApiVersion::V1, self.seal(AAD_V1, &plain)),
        }
    }

    pub fn open_endpoint(&self, version: ApiVersion, token: &str) -> Option<EndpointToken> {
        let (aad, len) = match version {
            ApiVersion::V1 => (AAD_V1, 32),
            ApiVersion::V2 => (AAD_V2, 64),
        };
        let plain = self.open(aad, token)?;
        if plain.len() != len {
            return None;
        }
        Some(EndpointToken {
            uaid: Uaid(plain[..16].try_into().ok()?),
            channel: ChannelId::from_slice(&plain[16..32]).ok()?,
            key_hash: (len == 64).then(|| plain[32..64].try_into().expect("32 bytes")),
        })
    }

    /// The same message always gets the same id, on every delivery and on
    /// every node sharing the key, so user agents and senders can recognise
    /// a redelivery. The nonce is a keyed hash of the contents (a synthetic
    /// IV): equal nonces come only with equal contents, so AES-GCM's nonce
    /// is never reused for two different messages.
    pub fn message_id(&self, m: &MessageId) -> String {
        let mut plain = [0u8; 40];
        plain[..16].copy_from_slice(&m.uaid.0);
        plain[16..32].copy_from_slice(m.channel.as_bytes());
        plain[32..].copy_from_slice(&m.seq.to_be_bytes());
        let mut h = Sha256::new();
        h.update(self.nonce_key);
        h.update(plain);
        let digest = h.finalize();
        let nonce: [u8; 12] = digest[..12].try_into().expect("12 of 32 bytes");
        self.seal_with(AAD_MSG, &plain, nonce)
    }

    pub fn receipt_token(&self, t: &ReceiptToken) -> String {
        let mut plain = Vec::with_capacity(48);
        plain.extend_from_slice(&t.sub);
        if let Some(h) = &t.key_hash {
            plain.extend_from_slice(h);
        }
        self.seal(AAD_RECEIPT, &plain)
    }

    pub fn open_receipt_token(&self, token: &str) -> Option<ReceiptToken> {
        let plain = self.open(AAD_RECEIPT, token)?;
        let sub = plain.get(..16)?.try_into().ok()?;
        let key_hash = match plain.len() {
            16 => None,
            48 => Some(plain[16..].try_into().ok()?),
            _ => return None,
        };
        Some(ReceiptToken { sub, key_hash })
    }

    pub fn open_message_id(&self, id: &str) -> Option<MessageId> {
        let plain = self.open(AAD_MSG, id)?;
        if plain.len() != 40 {
            return None;
        }
        Some(MessageId {
            uaid: Uaid(plain[..16].try_into().ok()?),
            channel: ChannelId::from_slice(&plain[16..32]).ok()?,
            seq: u64::from_be_bytes(plain[32..40].try_into().ok()?),
        })
    }
}

/// Decodes configured keys (base64url, 32 bytes each).
pub fn parse_keys(values: &[String]) -> Result<Vec<[u8; 32]>, String> {
    values
        .iter()
        .map(|v| {
            herald_proto::b64::decode_b64url(v)
                .and_then(|k| <[u8; 32]>::try_from(k).ok())
                .ok_or_else(|| "each key must be 32 bytes of base64url".to_string())
        })
        .collect()
}

/// A fresh endpoint key, base64url, as `endpoint_keys` takes it.
pub fn generate_key() -> String {
    let key: [u8; 32] = rand::random();
    herald_proto::b64::encode_b64url(&key)
}

/// With no keys configured, endpoints must still survive restarts: keep a
/// generated key in the data dir and reuse it.
pub fn load_or_create_keys(data_dir: &Path) -> anyhow::Result<Vec<[u8; 32]>> {
    let path = data_dir.join("endpoint-keys");
    if path.exists() {
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let lines: Vec<String> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(String::from)
            .collect();
        let keys = parse_keys(&lines).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        if keys.is_empty() {
            bail!("{} holds no keys", path.display());
        }
        return Ok(keys);
    }
    let key: [u8; 32] = rand::random();
    let text = format!(
        "# Herald endpoint token key (base64url). Keep it secret and keep it:\n# losing it invalidates every endpoint URL handed out.\n{}\n",
        herald_proto::b64::encode_b64url(&key)
    );
    write_private(&path, text.as_bytes())?;
    Ok(vec![key])
}

fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn codec() -> TokenCodec {
        TokenCodec::new(&[[1u8; 32]]).unwrap()
    }

    fn sample(key: bool) -> EndpointToken {
        EndpointToken {
            uaid: Uaid::random(),
            channel: uuid::Uuid::new_v4(),
            key_hash: key.then(|| key_hash(b"k")),
        }
    }

    #[test]
    fn endpoint_tokens_round_trip_and_stay_short() {
        let c = codec();
        for with_key in [false, true] {
            let t = sample(with_key);
            let (v, s) = c.endpoint_token(&t);
            assert_eq!(v == ApiVersion::V2, with_key);
            assert!(s.len() < 200);
            assert_eq!(c.open_endpoint(v, &s), Some(t));
        }
    }

    #[test]
    fn tokens_are_bound_to_their_path_and_kind() {
        let c = codec();
        let (_, v1) = c.endpoint_token(&sample(false));
        let (_, v2) = c.endpoint_token(&sample(true));
        assert!(c.open_endpoint(ApiVersion::V2, &v1).is_none());
        assert!(c.open_endpoint(ApiVersion::V1, &v2).is_none());
        assert!(c.open_message_id(&v1).is_none());
        assert!(c.open_receipt_token(&v1).is_none());
        let r = c.receipt_token(&ReceiptToken {
            sub: [4; 16],
            key_hash: None,
        });
        assert!(c.open_endpoint(ApiVersion::V1, &r).is_none());
        assert!(c.open_message_id(&r).is_none());
    }

    #[test]
    fn receipt_tokens_round_trip_with_and_without_a_key() {
        let c = codec();
        for key_hash in [None, Some(key_hash(b"k"))] {
            let t = ReceiptToken {
                sub: rand::random(),
                key_hash,
            };
            let s = c.receipt_token(&t);
            assert_eq!(c.open_receipt_token(&s), Some(t));
            let mut bytes = herald_proto::b64::decode_b64url(&s).unwrap();
            bytes[14] ^= 1;
            assert!(c
                .open_receipt_token(&herald_proto::b64::encode_b64url(&bytes))
                .is_none());
        }
    }

    #[test]
    fn forged_or_altered_tokens_are_rejected() {
        let c = codec();
        let (v, s) = c.endpoint_token(&sample(true));
        let mut bytes = herald_proto::b64::decode_b64url(&s).unwrap();
        bytes[20] ^= 1;
        let altered = herald_proto::b64::encode_b64url(&bytes);
        assert!(c.open_endpoint(v, &altered).is_none());
        assert!(c.open_endpoint(v, "").is_none());
        assert!(c.open_endpoint(v, "!!!").is_none());
        assert!(c.open_endpoint(v, &"A".repeat(5000)).is_none());
        let other = TokenCodec::new(&[[2u8; 32]]).unwrap();
        assert!(other.open_endpoint(v, &s).is_none());
    }

    #[test]
    fn rotation_keeps_old_tokens_valid() {
        let old = codec();
        let (v, s) = old.endpoint_token(&sample(false));
        let rotated = TokenCodec::new(&[[9u8; 32], [1u8; 32]]).unwrap();
        assert!(rotated.open_endpoint(v, &s).is_some());
        let (v2, s2) = rotated.endpoint_token(&sample(false));
        assert!(
            old.open_endpoint(v2, &s2).is_none(),
            "new tokens use the new key"
        );
    }

    #[test]
    fn message_ids_round_trip() {
        let c = codec();
        let m = MessageId {
            uaid: Uaid::random(),
            channel: uuid::Uuid::new_v4(),
            seq: 1234567890123,
        };
        assert_eq!(c.open_message_id(&c.message_id(&m)), Some(m));
    }

    #[test]
    fn a_message_keeps_its_id_and_no_two_share_one() {
        let c = codec();
        let m = MessageId {
            uaid: Uaid::random(),
            channel: uuid::Uuid::new_v4(),
            seq: 42,
        };
        assert_eq!(
            c.message_id(&m),
            c.message_id(&m),
            "stable across deliveries"
        );
        let other = MessageId { seq: 43, ..m };
        assert_ne!(c.message_id(&m), c.message_id(&other));
        // Another node with the same key names it the same way.
        let twin = codec();
        assert_eq!(twin.message_id(&m), c.message_id(&m));
    }

    #[test]
    fn generated_key_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let a = load_or_create_keys(dir.path()).unwrap();
        let b = load_or_create_keys(dir.path()).unwrap();
        assert_eq!(a, b);
        std::fs::write(dir.path().join("endpoint-keys"), "bogus\n").unwrap();
        assert!(load_or_create_keys(dir.path()).is_err());
    }
}
