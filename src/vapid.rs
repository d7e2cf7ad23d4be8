//! RFC 8292 VAPID: who is sending. Parses the `Authorization` header (and
//! the legacy `WebPush`/`Bearer` + `Crypto-Key: p256ecdsa=` forms of the
//! early VAPID drafts, which libraries still send), verifies the ES256
//! JWT, and remembers tokens it has verified so an application server that
//! reuses one JWT for many messages pays for one signature check.

use crate::errors::ApiError;
use crate::token::{key_hash, KeyHash};
use dashmap::DashMap;
use herald_proto::b64::{decode_b64url, encode_b64url};
use herald_proto::headers::header_param;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use std::sync::Arc;

/// RFC 8292 §2: `exp` at most 24 hours ahead. A minute of slack absorbs
/// clock skew between the application server and Herald.
const MAX_EXP_AHEAD: u64 = 24 * 3600 + 60;

/// The longest JWT accepted. A real VAPID token (ES256 header, `aud`, `exp`,
/// `sub`) is a few hundred bytes; refusing longer ones before decoding keeps
/// a sender from making Herald parse, hash and hold large tokens.
pub const MAX_JWT_BYTES: usize = 4096;

/// The longest `sub` a cache entry keeps. A token with a longer one is
/// verified and accepted every time but never cached, so the cache's size
/// does not grow with what senders put in their claims.
pub const MAX_CACHED_SUB: usize = 256;

/// What one cache entry holds at most: the digest it is keyed by and the
/// verified result with its `sub`, whatever the size of the token. The
/// map's own overhead comes on top; `jwt_cache_size` entries of this size
/// bound the cache.
pub const CACHE_ENTRY_BYTES: usize =
    std::mem::size_of::<CacheKey>() + std::mem::size_of::<Verified>() + MAX_CACHED_SUB;

/// SHA-256 of the JWT and the key it came with: entries have a fixed size
/// however long the token, and a hit still needs the same key.
type CacheKey = [u8; 32];

fn cache_key(creds: &Credentials<'_>) -> CacheKey {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(creds.jwt.as_bytes());
    // The JWT alphabet has no space, so the two parts cannot run together.
    h.update(b" ");
    h.update(creds.key.as_bytes());
    h.finalize().into()
}

/// Credentials as they arrived, before verification.
#[derive(Debug, PartialEq, Eq)]
pub struct Credentials<'a> {
    pub jwt: &'a str,
    pub key: &'a str,
}

/// Extracts credentials; `Ok(None)` when the request has none.
pub fn parse_credentials<'a>(
    authorization: Option<&'a str>,
    crypto_key: Option<&'a str>,
) -> Result<Option<Credentials<'a>>, ApiError> {
    let Some(auth) = authorization.map(str::trim).filter(|a| !a.is_empty()) else {
        return Ok(None);
    };
    let (scheme, rest) = auth.split_once(' ').unwrap_or((auth, ""));
    let malformed = |m: &str| ApiError::unauthorized("malformed_header", m.to_string());
    if scheme.eq_ignore_ascii_case("vapid") {
        let jwt = header_param(rest, "t")
            .ok_or_else(|| malformed("vapid Authorization needs t=<JWT>"))?;
        let key = header_param(rest, "k")
            .ok_or_else(|| malformed("vapid Authorization needs k=<public key>"))?;
        Ok(Some(Credentials { jwt, key }))
    } else if scheme.eq_ignore_ascii_case("webpush") || scheme.eq_ignore_ascii_case("bearer") {
        // Drafts 00-01 of VAPID: the JWT alone, its key in Crypto-Key.
        let key = crypto_key
            .and_then(|c| header_param(c, "p256ecdsa"))
            .ok_or_else(|| {
                malformed(&format!(
                    "{scheme} Authorization needs Crypto-Key: p256ecdsa=<public key>"
                ))
            })?;
        let jwt = rest.trim();
        if jwt.is_empty() {
            return Err(malformed(&format!("{scheme} Authorization needs a JWT")));
        }
        Ok(Some(Credentials { jwt, key }))
    } else {
        Err(malformed(
            "Authorization scheme must be vapid (RFC 8292), or the legacy WebPush or Bearer",
        ))
    }
}

#[derive(Deserialize)]
struct Claims {
    #[serde(default)]
    aud: Option<serde_json::Value>,
    exp: u64,
    #[serde(default)]
    sub: Option<String>,
}

/// A sender whose VAPID token checked out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    exp: u64,
    /// The hash of its public key, to compare with a key-bound
    /// subscription's and with the operator's blocks.
    pub key_hash: KeyHash,
    /// The `sub` of its claims (a `mailto:` or `https:` URI), if it gave one:
    /// the operator may block a sender by it.
    pub sub: Option<Arc<str>>,
}

/// The outcome of a cache lookup, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheResult {
    Hit,
    Miss,
}

pub struct VapidVerifier {
    audience: String,
    cache: DashMap<CacheKey, Verified>,
    capacity: usize,
}

impl VapidVerifier {
    pub fn new(audience: &str, capacity: usize) -> Self {
        VapidVerifier {
            audience: audience.to_ascii_lowercase(),
            cache: DashMap::new(),
            capacity,
        }
    }

    /// Verifies credentials at unix time `now`; returns who signed them.
    pub fn verify(
        &self,
        creds: &Credentials<'_>,
        now: u64,
    ) -> Result<(Verified, CacheResult), ApiError> {
        if creds.jwt.len() > MAX_JWT_BYTES {
            return Err(ApiError::unauthorized(
                "jwt_too_long",
                format!("VAPID token is longer than {MAX_JWT_BYTES} bytes"),
            ));
        }
        let cache_key = cache_key(creds);
        if let Some(v) = self.cache.get(&cache_key).map(|e| e.clone()) {
            if v.exp > now {
                return Ok((v, CacheResult::Hit));
            }
            self.cache.remove(&cache_key);
            return Err(ApiError::unauthorized("expired", "VAPID token has expired"));
        }
        let verified = self.verify_uncached(creds, now)?;
        if verified
            .sub
            .as_ref()
            .is_none_or(|s| s.len() <= MAX_CACHED_SUB)
        {
            self.remember(cache_key, verified.clone(), now);
        }
        Ok((verified, CacheResult::Miss))
    }

    fn remember(&self, key: CacheKey, v: Verified, now: u64) {
        if self.cache.len() >= self.capacity {
            self.cache.retain(|_, e| e.exp > now);
            if self.cache.len() >= self.capacity {
                // Still full of live tokens: forget them all rather than
                // grow; the cost is one more signature check each.
                self.cache.clear();
            }
        }
        self.cache.insert(key, v);
    }

    fn verify_uncached(&self, creds: &Credentials<'_>, now: u64) -> Result<Verified, ApiError> {
        let raw_key = decode_b64url(creds.key)
            .filter(|k| k.len() == 65 && k[0] == 4)
            .ok_or_else(|| {
                ApiError::unauthorized(
                    "bad_key",
                    "VAPID public key must be a base64url uncompressed P-256 point",
                )
            })?;
        p256::PublicKey::from_sec1_bytes(&raw_key).map_err(|_| {
            ApiError::unauthorized("bad_key", "VAPID public key is not a point on P-256")
        })?;
        let header = jsonwebtoken::decode_header(creds.jwt).map_err(|_| {
            ApiError::unauthorized("bad_jwt", "VAPID token is not a JWT signed with ES256")
        })?;
        if header.alg != Algorithm::ES256 {
            return Err(ApiError::unauthorized(
                "bad_alg",
                format!(
                    "VAPID token must be signed with ES256, not {:?}",
                    header.alg
                ),
            ));
        }
        let decoding = DecodingKey::from_ec_components(
            &encode_b64url(&raw_key[1..33]),
            &encode_b64url(&raw_key[33..65]),
        )
        .map_err(|_| ApiError::unauthorized("bad_key", "VAPID public key is unusable"))?;
        let mut validation = Validation::new(Algorithm::ES256);
        validation.validate_aud = false;
        validation.validate_exp = false;
        validation.set_required_spec_claims(&["exp"]);
        let claims = jsonwebtoken::decode::<Claims>(creds.jwt, &decoding, &validation)
            .map_err(|e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::MissingRequiredClaim(_)
                | jsonwebtoken::errors::ErrorKind::Json(_) => ApiError::unauthorized(
                    "bad_claims",
                    "VAPID token claims must include a numeric exp",
                ),
                jsonwebtoken::errors::ErrorKind::InvalidSignature => ApiError::unauthorized(
                    "bad_signature",
                    "VAPID signature does not match the key",
                ),
                _ => ApiError::unauthorized("bad_jwt", format!("VAPID token is invalid: {e}")),
            })?
            .claims;
        if claims.exp <= now {
            return Err(ApiError::unauthorized("expired", "VAPID token has expired"));
        }
        if claims.exp > now + MAX_EXP_AHEAD {
            return Err(ApiError::unauthorized(
                "exp_too_far",
                "VAPID token exp is more than 24 hours ahead",
            ));
        }
        let aud_ok = match &claims.aud {
            Some(serde_json::Value::String(a)) => self.audience_matches(a),
            Some(serde_json::Value::Array(list)) => list
                .iter()
                .any(|a| a.as_str().is_some_and(|a| self.audience_matches(a))),
            _ => false,
        };
        if !aud_ok {
            return Err(ApiError::unauthorized(
                "bad_aud",
                format!("VAPID token aud must be {}", self.audience),
            ));
        }
        if let Some(sub) = &claims.sub {
            if !(sub.starts_with("mailto:") || sub.starts_with("https:")) {
                return Err(ApiError::unauthorized(
                    "bad_sub",
                    "VAPID sub must be a mailto: or https: URI",
                ));
            }
        }
        Ok(Verified {
            exp: claims.exp,
            key_hash: key_hash(&raw_key),
            sub: claims.sub.map(Arc::from),
        })
    }

    fn audience_matches(&self, aud: &str) -> bool {
        aud.trim_end_matches('/')
            .eq_ignore_ascii_case(&self.audience)
    }

    pub fn cached(&self) -> usize {
        self.cache.len()
    }

    /// Bytes the cache's entries may hold at most (not counting the map's
    /// overhead).
    pub fn cached_bytes(&self) -> usize {
        self.cache.len() * CACHE_ENTRY_BYTES
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header};
    use p256::ecdsa::SigningKey;
    use p256::pkcs8::EncodePrivateKey;

    const AUD: &str = "https://push.example.com";

    struct Sender {
        key: SigningKey,
    }

    impl Sender {
        fn new() -> Self {
            Sender {
                key: SigningKey::random(&mut rand::thread_rng()),
            }
        }
        fn public(&self) -> String {
            encode_b64url(self.key.verifying_key().to_encoded_point(false).as_bytes())
        }
        fn jwt(&self, claims: serde_json::Value) -> String {
            let pem = self.key.to_pkcs8_pem(Default::default()).unwrap();
            let enc = EncodingKey::from_ec_pem(pem.as_bytes()).unwrap();
            jsonwebtoken::encode(&Header::new(Algorithm::ES256), &claims, &enc).unwrap()
        }
    }

    fn now() -> u64 {
        crate::store::now_secs()
    }

    fn check(v: &VapidVerifier, jwt: &str, key: &str) -> Result<(KeyHash, CacheResult), ApiError> {
        v.verify(&Credentials { jwt, key }, now())
            .map(|(s, c)| (s.key_hash, c))
    }

    #[test]
    fn parses_both_header_forms() {
        assert_eq!(parse_credentials(None, None).unwrap(), None);
        assert_eq!(
            parse_credentials(Some("vapid t=a.b.c, k=KEY"), None).unwrap(),
            Some(Credentials {
                jwt: "a.b.c",
                key: "KEY"
            })
        );
        assert_eq!(
            parse_credentials(Some("WebPush a.b.c"), Some("dh=x;p256ecdsa=KEY")).unwrap(),
            Some(Credentials {
                jwt: "a.b.c",
                key: "KEY"
            })
        );
        assert!(parse_credentials(Some("WebPush a.b.c"), None).is_err());
        for scheme in ["Bearer", "bearer", "BEARER"] {
            assert_eq!(
                parse_credentials(
                    Some(&format!("{scheme} a.b.c")),
                    Some("dh=x; p256ecdsa=\"KEY\"")
                )
                .unwrap(),
                Some(Credentials {
                    jwt: "a.b.c",
                    key: "KEY"
                })
            );
        }
        assert!(parse_credentials(Some("Bearer x"), None).is_err());
        assert!(parse_credentials(Some("Bearer"), Some("p256ecdsa=KEY")).is_err());
        assert!(parse_credentials(Some("Basic dXNlcg=="), Some("p256ecdsa=KEY")).is_err());
        assert!(parse_credentials(Some("vapid k=KEY"), None).is_err());
    }

    #[test]
    fn accepts_a_good_token_and_caches_it() {
        let s = Sender::new();
        let v = VapidVerifier::new(AUD, 10);
        let jwt = s.jwt(
            serde_json::json!({"aud": AUD, "exp": now() + 3600, "sub": "mailto:a@example.com"}),
        );
        let (h1, r1) = check(&v, &jwt, &s.public()).unwrap();
        assert_eq!(r1, CacheResult::Miss);
        let (h2, r2) = check(&v, &jwt, &s.public()).unwrap();
        assert_eq!(r2, CacheResult::Hit);
        assert_eq!(h1, h2);
        assert_eq!(h1, key_hash(&decode_b64url(&s.public()).unwrap()));
    }

    #[test]
    fn refuses_each_bad_claim() {
        let s = Sender::new();
        let v = VapidVerifier::new(AUD, 10);
        let cases = [
            (
                serde_json::json!({"aud": AUD, "exp": now() - 10}),
                "expired",
            ),
            (
                serde_json::json!({"aud": AUD, "exp": now() + 25 * 3600}),
                "exp_too_far",
            ),
            (
                serde_json::json!({"aud": "https://other.example", "exp": now() + 60}),
                "bad_aud",
            ),
            (serde_json::json!({"exp": now() + 60}), "bad_aud"),
            (serde_json::json!({"aud": AUD}), "bad_claims"),
            (
                serde_json::json!({"aud": AUD, "exp": now() + 60, "sub": "someone"}),
                "bad_sub",
            ),
        ];
        for (claims, reason) in cases {
            let err = check(&v, &s.jwt(claims.clone()), &s.public()).unwrap_err();
            assert_eq!((err.status, err.errno.code()), (401, 109));
            assert_eq!(err.vapid_reason, Some(reason), "{claims}");
        }
    }

    #[test]
    fn refuses_wrong_key_and_other_algorithms() {
        let (s, other) = (Sender::new(), Sender::new());
        let v = VapidVerifier::new(AUD, 10);
        let jwt = s.jwt(serde_json::json!({"aud": AUD, "exp": now() + 60}));
        assert_eq!(
            check(&v, &jwt, &other.public()).unwrap_err().vapid_reason,
            Some("bad_signature")
        );
        assert_eq!(
            check(&v, &jwt, "short").unwrap_err().vapid_reason,
            Some("bad_key")
        );
        let hs = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &serde_json::json!({"aud": AUD, "exp": now() + 60}),
            &EncodingKey::from_secret(b"secret"),
        )
        .unwrap();
        assert_eq!(
            check(&v, &hs, &s.public()).unwrap_err().vapid_reason,
            Some("bad_alg")
        );
        // alg "none": header {"alg":"none"} with an empty signature.
        let none = format!(
            "{}.{}.",
            encode_b64url(br#"{"alg":"none","typ":"JWT"}"#),
            encode_b64url(format!(r#"{{"aud":"{AUD}","exp":{}}}"#, now() + 60).as_bytes())
        );
        assert!(check(&v, &none, &s.public()).is_err());
        assert!(check(&v, "garbage", &s.public()).is_err());
    }

    #[test]
    fn long_tokens_are_refused_before_decoding() {
        let s = Sender::new();
        let v = VapidVerifier::new(AUD, 10);
        // A valid token just under the limit is accepted...
        // Padded with a claim Herald does not keep (a long `sub` is kept,
        // so it is not cached: see `a_long_sub_is_not_cached`).
        let pad = |n: usize| "a".repeat(n);
        let mut n = 2000;
        let fits = loop {
            let jwt = s.jwt(serde_json::json!({"aud": AUD, "exp": now() + 60, "jti": pad(n)}));
            if jwt.len() > MAX_JWT_BYTES {
                break s.jwt(serde_json::json!({"aud": AUD, "exp": now() + 60, "jti": pad(n - 8)}));
            }
            n += 8;
        };
        assert!(fits.len() <= MAX_JWT_BYTES && fits.len() > MAX_JWT_BYTES - 16);
        check(&v, &fits, &s.public()).unwrap();
        // ...one signed the same way but longer is not, and is not cached.
        let long = s.jwt(serde_json::json!({"aud": AUD, "exp": now() + 60, "jti": pad(n + 8)}));
        assert!(long.len() > MAX_JWT_BYTES);
        let err = check(&v, &long, &s.public()).unwrap_err();
        assert_eq!((err.status, err.errno.code()), (401, 109));
        assert_eq!(err.vapid_reason, Some("jwt_too_long"));
        // Not even a garbage token that long is looked at.
        let err = check(&v, &"x".repeat(MAX_JWT_BYTES + 1), &s.public()).unwrap_err();
        assert_eq!(err.vapid_reason, Some("jwt_too_long"));
        assert_eq!(v.cached(), 1);
    }

    #[test]
    fn cache_memory_does_not_grow_with_token_size() {
        let s = Sender::new();
        let v = VapidVerifier::new(AUD, 50);
        // Distinct tokens near the size limit, more than the cache holds.
        let jti = "b".repeat(2800);
        for i in 0..120 {
            let jwt = s.jwt(serde_json::json!({"aud": AUD, "exp": now() + 60 + i, "jti": jti}));
            assert!(jwt.len() > 3500);
            check(&v, &jwt, &s.public()).unwrap();
            assert!(v.cached() <= 50);
            assert!(v.cached_bytes() <= 50 * CACHE_ENTRY_BYTES);
        }
        // Each entry is a digest and a result with a `sub` of at most
        // MAX_CACHED_SUB bytes: a small fraction of the (over 3,500-byte)
        // token it stands for.
        assert!(v.cached() > 0);
        assert!(
            v.cached_bytes() * 8 < v.cached() * 3500,
            "{}",
            v.cached_bytes()
        );
    }

    #[test]
    fn the_sub_is_returned_and_cached_with_the_key() {
        let s = Sender::new();
        let v = VapidVerifier::new(AUD, 10);
        let jwt = s.jwt(
            serde_json::json!({"aud": AUD, "exp": now() + 60, "sub": "mailto:ops@example.com"}),
        );
        let creds = Credentials {
            jwt: &jwt,
            key: &s.public(),
        };
        let (first, r1) = v.verify(&creds, now()).unwrap();
        let (again, r2) = v.verify(&creds, now()).unwrap();
        assert_eq!((r1, r2), (CacheResult::Miss, CacheResult::Hit));
        assert_eq!(first.sub.as_deref(), Some("mailto:ops@example.com"));
        assert_eq!(first, again);
        let anonymous = s.jwt(serde_json::json!({"aud": AUD, "exp": now() + 60}));
        let (none, _) = v
            .verify(
                &Credentials {
                    jwt: &anonymous,
                    key: &s.public(),
                },
                now(),
            )
            .unwrap();
        assert_eq!(none.sub, None);
        assert_eq!(none.key_hash, first.key_hash);
    }

    #[test]
    fn a_long_sub_is_not_cached() {
        let s = Sender::new();
        let v = VapidVerifier::new(AUD, 10);
        let sub = format!("mailto:{}@example.com", "c".repeat(MAX_CACHED_SUB));
        let jwt = s.jwt(serde_json::json!({"aud": AUD, "exp": now() + 60, "sub": sub}));
        let creds = Credentials {
            jwt: &jwt,
            key: &s.public(),
        };
        for _ in 0..2 {
            let (got, r) = v.verify(&creds, now()).unwrap();
            assert_eq!(r, CacheResult::Miss);
            assert_eq!(got.sub.as_deref(), Some(sub.as_str()));
        }
        assert_eq!(v.cached(), 0);
    }

    #[test]
    fn a_cached_token_needs_the_same_key() {
        let (s, other) = (Sender::new(), Sender::new());
        let v = VapidVerifier::new(AUD, 10);
        let jwt = s.jwt(serde_json::json!({"aud": AUD, "exp": now() + 60}));
        check(&v, &jwt, &s.public()).unwrap();
        assert_eq!(
            check(&v, &jwt, &other.public()).unwrap_err().vapid_reason,
            Some("bad_signature")
        );
    }

    #[test]
    fn cache_is_bounded() {
        let s = Sender::new();
        let v = VapidVerifier::new(AUD, 3);
        for i in 0..10 {
            let jwt = s.jwt(serde_json::json!({"aud": AUD, "exp": now() + 60 + i}));
            check(&v, &jwt, &s.public()).unwrap();
            assert!(v.cached() <= 3);
        }
    }
}
