//! APNs provider tokens: the ES256 JWT that proves, on every request, that
//! Herald may push for a team's apps.
//!
//! Apple refuses a token whose `iat` is more than an hour old (403
//! `ExpiredProviderToken`) and one made anew more often than every 20
//! minutes (429 `TooManyProviderTokenUpdates`), so one token is shared by
//! every request of a bridge and replaced after `TOKEN_LIFETIME`.

use anyhow::{bail, Context};
use base64::Engine;
use p256::ecdsa::signature::Signer;
use p256::ecdsa::{Signature, SigningKey};
use p256::pkcs8::DecodePrivateKey;
use std::path::Path;
use std::sync::Mutex;

/// How long one token is used: well inside Apple's hour, well outside its
/// 20-minute refresh floor.
pub const TOKEN_LIFETIME: u64 = 50 * 60;

/// The `.p8` signing key Apple issued, with the ids the token names.
pub struct ProviderKey {
    key: SigningKey,
    key_id: String,
    team_id: String,
}

impl ProviderKey {
    /// Reads a `.p8` file: a PKCS#8 PEM holding a P-256 private key. The
    /// error names the file and what is wrong with it.
    pub fn load(path: &Path, key_id: &str, team_id: &str) -> anyhow::Result<ProviderKey> {
        let pem = std::fs::read_to_string(path)
            .with_context(|| format!("APNs key {}: cannot read it", path.display()))?;
        let key = Self::from_pem(&pem, key_id, team_id)
            .with_context(|| format!("APNs key {}", path.display()))?;
        Ok(key)
    }

    pub fn from_pem(pem: &str, key_id: &str, team_id: &str) -> anyhow::Result<ProviderKey> {
        if !pem.contains("-----BEGIN PRIVATE KEY-----") {
            bail!("not a PKCS#8 PEM (the .p8 file Apple issues starts with -----BEGIN PRIVATE KEY-----)");
        }
        let key = SigningKey::from_pkcs8_pem(pem)
            .map_err(|e| anyhow::anyhow!("not a P-256 (ES256) private key: {e}"))?;
        if key_id.is_empty() || team_id.is_empty() {
            bail!("key_id and team_id must both be set");
        }
        Ok(ProviderKey {
            key,
            key_id: key_id.to_string(),
            team_id: team_id.to_string(),
        })
    }

    /// A compact JWS (RFC 7515): base64url without padding, the signature
    /// the raw 64-byte `r‖s` that ES256 prescribes (not DER).
    pub fn sign(&self, iat: u64) -> String {
        let header = serde_json::json!({"alg": "ES256", "kid": self.key_id});
        let claims = serde_json::json!({"iss": self.team_id, "iat": iat});
        let b64 = |v: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
        let input = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        let signature: Signature = self.key.sign(input.as_bytes());
        format!("{input}.{}", b64(&signature.to_bytes()[..]))
    }
}

/// A token in use and when it was made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderToken {
    pub jwt: String,
    pub iat: u64,
}

/// The bridge's current token, shared by concurrent sends.
pub struct ProviderTokens {
    key: ProviderKey,
    current: Mutex<Option<ProviderToken>>,
}

impl ProviderTokens {
    pub fn new(key: ProviderKey) -> Self {
        ProviderTokens {
            key,
            current: Mutex::new(None),
        }
    }

    /// The token to send at `now`, and whether it was made just now.
    pub fn get(&self, now: u64) -> (ProviderToken, bool) {
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        match &*current {
            Some(t) if !stale(t.iat, now) => (t.clone(), false),
            _ => {
                let fresh = self.make(now, current.as_ref());
                *current = Some(fresh.clone());
                (fresh, true)
            }
        }
    }

    /// APNs called `refused` expired: replace it, unless a concurrent send
    /// already did, so a burst of refusals makes one new token, not many
    /// (too many would earn `TooManyProviderTokenUpdates`). Returns the
    /// token to retry with and whether it was made just now.
    pub fn renew(&self, refused: &ProviderToken, now: u64) -> (ProviderToken, bool) {
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = &*current {
            if t != refused {
                return (t.clone(), false);
            }
        }
        let fresh = self.make(now, current.as_ref());
        *current = Some(fresh.clone());
        (fresh, true)
    }

    /// A new token always has a later `iat` than the one it replaces: ES256
    /// signing here is deterministic (RFC 6979), so the same `iat` would
    /// give the very token APNs just refused.
    fn make(&self, now: u64, previous: Option<&ProviderToken>) -> ProviderToken {
        let iat = match previous {
            Some(p) if p.iat >= now && !stale(p.iat, now) => p.iat + 1,
            _ => now,
        };
        ProviderToken {
            jwt: self.key.sign(iat),
            iat,
        }
    }
}

/// Whether a token made at `iat` is due for replacement at `now`. A clock
/// that went backwards by more than a minute also counts: the token would
/// look like it came from the future.
pub fn stale(iat: u64, now: u64) -> bool {
    now >= iat + TOKEN_LIFETIME || iat > now + 60
}

#[cfg(test)]
mod tests {
    use super::*;
    use p256::ecdsa::signature::Verifier;
    use p256::ecdsa::VerifyingKey;
    use p256::pkcs8::{EncodePrivateKey, LineEnding};

    fn key() -> (ProviderKey, VerifyingKey) {
        let sk = SigningKey::random(&mut rand::rngs::OsRng);
        let pem = sk.to_pkcs8_pem(LineEnding::LF).unwrap();
        let vk = *sk.verifying_key();
        (
            ProviderKey::from_pem(&pem, "KEYID12345", "TEAM123456").unwrap(),
            vk,
        )
    }

    fn part(jwt: &str, i: usize) -> Vec<u8> {
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(jwt.split('.').nth(i).unwrap())
            .unwrap()
    }

    #[test]
    fn the_token_is_a_compact_es256_jws() {
        let (k, vk) = key();
        let jwt = k.sign(1_700_000_000);
        assert!(!jwt.contains('='));
        let header: serde_json::Value = serde_json::from_slice(&part(&jwt, 0)).unwrap();
        assert_eq!(
            header,
            serde_json::json!({"alg": "ES256", "kid": "KEYID12345"})
        );
        let claims: serde_json::Value = serde_json::from_slice(&part(&jwt, 1)).unwrap();
        assert_eq!(
            claims,
            serde_json::json!({"iss": "TEAM123456", "iat": 1_700_000_000u64})
        );
        let sig = part(&jwt, 2);
        assert_eq!(sig.len(), 64, "raw r||s, not DER");
        let signed = jwt.rsplit_once('.').unwrap().0;
        let sig = Signature::from_slice(&sig).unwrap();
        vk.verify(signed.as_bytes(), &sig).unwrap();
    }

    #[test]
    fn tokens_are_reused_for_fifty_minutes() {
        let (k, _) = key();
        let tokens = ProviderTokens::new(k);
        let (a, made) = tokens.get(1000);
        assert!(made);
        let (b, made) = tokens.get(1000 + TOKEN_LIFETIME - 1);
        assert!(!made);
        assert_eq!(a, b);
        let (c, made) = tokens.get(1000 + TOKEN_LIFETIME);
        assert!(made);
        assert_eq!(c.iat, 1000 + TOKEN_LIFETIME);
    }

    #[test]
    fn renewing_a_refused_token_makes_one_new_token() {
        let (k, _) = key();
        let tokens = ProviderTokens::new(k);
        let (a, _) = tokens.get(1000);
        let (b, made) = tokens.renew(&a, 1000);
        assert!(made);
        assert_ne!(a.jwt, b.jwt, "same second, still a different token");
        assert_eq!(b.iat, 1001);
        // A second send refused with the old token finds the new one.
        let (c, made) = tokens.renew(&a, 1000);
        assert!(!made);
        assert_eq!(b, c);
    }

    #[test]
    fn a_clock_gone_backwards_replaces_the_token() {
        assert!(!stale(1000, 1000));
        assert!(!stale(1000, 960));
        assert!(stale(1000, 900));
        let (k, _) = key();
        let tokens = ProviderTokens::new(k);
        tokens.get(1000);
        let (t, made) = tokens.get(900);
        assert!(made);
        assert_eq!(t.iat, 900);
    }

    #[test]
    fn bad_keys_are_refused_with_a_reason() {
        let e = ProviderKey::from_pem("hello", "K", "T").err().unwrap();
        assert!(e.to_string().contains("PKCS#8"), "{e}");
        let rsa_like = "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n";
        let e = ProviderKey::from_pem(rsa_like, "K", "T").err().unwrap();
        assert!(e.to_string().contains("P-256"), "{e}");
    }
}
