//! VAPID (RFC 8292) for application servers: the P-256 key pair that
//! identifies an application server, and the signed JWT that proves it.

use anyhow::{anyhow, bail, Context};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use herald_proto::b64::decode_b64url;
use p256::ecdsa::signature::Signer;
use p256::ecdsa::{Signature, SigningKey};
use p256::elliptic_curve::sec1::ToEncodedPoint;
use p256::pkcs8::{DecodePrivateKey, EncodePrivateKey, LineEnding};
use p256::SecretKey;
use rand::rngs::OsRng;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How long a signed token stays valid. RFC 8292 caps `exp` at 24 hours;
/// half of that leaves room for clock skew between us and the push service.
pub const TOKEN_LIFETIME: Duration = Duration::from_secs(12 * 60 * 60);

/// An application server's VAPID key pair.
#[derive(Clone)]
pub struct VapidKey {
    secret: SecretKey,
}

impl std::fmt::Debug for VapidKey {
    // Never print the private half, even in debug logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VapidKey")
            .field("public_key", &self.public_key_b64())
            .finish_non_exhaustive()
    }
}

impl VapidKey {
    /// A new random key pair.
    pub fn generate() -> Self {
        VapidKey {
            secret: SecretKey::random(&mut OsRng),
        }
    }

    /// Wraps an existing P-256 secret key.
    pub fn from_secret(secret: SecretKey) -> Self {
        VapidKey { secret }
    }

    /// Reads a private key in any of the forms application servers keep them:
    /// PKCS#8 PEM (`BEGIN PRIVATE KEY`, what `herald vapid generate` and
    /// `openssl genpkey` write), SEC1 PEM (`BEGIN EC PRIVATE KEY`, what
    /// `openssl ecparam -genkey` writes), or the bare base64url 32-byte scalar
    /// that the `web-push` tools print.
    pub fn from_text(text: &str) -> anyhow::Result<Self> {
        let trimmed = text.trim();
        if trimmed.contains("-----BEGIN PRIVATE KEY-----") {
            let secret = SecretKey::from_pkcs8_pem(trimmed)
                .map_err(|e| anyhow!("not a P-256 PKCS#8 private key: {e}"))?;
            return Ok(VapidKey { secret });
        }
        if trimmed.contains("-----BEGIN EC PRIVATE KEY-----") {
            let secret = SecretKey::from_sec1_pem(trimmed)
                .map_err(|e| anyhow!("not a P-256 SEC1 private key: {e}"))?;
            return Ok(VapidKey { secret });
        }
        if trimmed.contains("-----BEGIN") {
            bail!("unsupported PEM block; expected \"PRIVATE KEY\" (PKCS#8) or \"EC PRIVATE KEY\" (SEC1)");
        }
        let raw = decode_b64url(trimmed)
            .ok_or_else(|| anyhow!("neither a PEM private key nor a base64url private key"))?;
        if raw.len() != 32 {
            bail!(
                "a raw base64url VAPID private key must be 32 bytes, got {}",
                raw.len()
            );
        }
        let secret = SecretKey::from_slice(&raw)
            .map_err(|_| anyhow!("the 32 bytes are not a valid P-256 private key"))?;
        Ok(VapidKey { secret })
    }

    /// Reads a key file (see [`VapidKey::from_text`] for the accepted forms).
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read VAPID key {}", path.display()))?;
        Self::from_text(&text).with_context(|| format!("bad VAPID key in {}", path.display()))
    }

    /// The private key as PKCS#8 PEM.
    pub fn to_pkcs8_pem(&self) -> anyhow::Result<String> {
        let pem = self
            .secret
            .to_pkcs8_pem(LineEnding::LF)
            .map_err(|e| anyhow!("cannot encode private key: {e}"))?;
        Ok(pem.to_string())
    }

    /// The public key as the 65-octet uncompressed point.
    pub fn public_key_raw(&self) -> Vec<u8> {
        self.secret
            .public_key()
            .to_encoded_point(false)
            .as_bytes()
            .to_vec()
    }

    /// The public key as base64url without padding: the browser's
    /// `applicationServerKey` and the `k=` of the Authorization header.
    pub fn public_key_b64(&self) -> String {
        URL_SAFE_NO_PAD.encode(self.public_key_raw())
    }

    /// Signs a VAPID JWT for pushes to `audience` (an origin such as
    /// `https://push.example.net`) valid until `expires`.
    pub fn sign_jwt(&self, audience: &str, subject: Option<&str>, expires: SystemTime) -> String {
        let exp = expires
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let mut claims = serde_json::json!({ "aud": audience, "exp": exp });
        if let Some(sub) = subject {
            claims["sub"] = serde_json::Value::String(sub.to_owned());
        }
        let header = URL_SAFE_NO_PAD.encode(br#"{"typ":"JWT","alg":"ES256"}"#);
        let claims = URL_SAFE_NO_PAD.encode(claims.to_string());
        let signing_input = format!("{header}.{claims}");
        // ES256 is ECDSA over SHA-256 with the signature as raw r || s (JWS
        // §3.4), which is exactly p256's fixed-size encoding.
        let signature: Signature = SigningKey::from(&self.secret).sign(signing_input.as_bytes());
        format!(
            "{signing_input}.{}",
            URL_SAFE_NO_PAD.encode(signature.to_bytes())
        )
    }

    /// The `Authorization` header value for a push to `audience`, with a
    /// token valid for [`TOKEN_LIFETIME`] from now.
    pub fn authorization(&self, audience: &str, subject: Option<&str>) -> String {
        let jwt = self.sign_jwt(audience, subject, SystemTime::now() + TOKEN_LIFETIME);
        format!("vapid t={jwt}, k={}", self.public_key_b64())
    }
}

/// Checks that a VAPID `sub` is a contact URI as RFC 8292 §2.1 asks.
pub fn validate_subject(subject: &str) -> anyhow::Result<()> {
    let ok = subject
        .strip_prefix("mailto:")
        .or_else(|| subject.strip_prefix("https://"))
        .is_some_and(|rest| !rest.is_empty() && !rest.contains(char::is_whitespace));
    if !ok {
        bail!("VAPID subject must be a mailto: or https: URI, got {subject:?}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{decode, Algorithm, DecodingKey, Validation};

    #[derive(serde::Deserialize)]
    struct Claims {
        aud: String,
        exp: u64,
        sub: Option<String>,
    }

    fn decoding_key(key: &VapidKey) -> DecodingKey {
        let raw = key.public_key_raw();
        DecodingKey::from_ec_components(
            &URL_SAFE_NO_PAD.encode(&raw[1..33]),
            &URL_SAFE_NO_PAD.encode(&raw[33..65]),
        )
        .unwrap()
    }

    #[test]
    fn jwt_verifies_with_jsonwebtoken() {
        let key = VapidKey::generate();
        let auth = key.authorization("http://127.0.0.1:8080", Some("mailto:ops@example.com"));
        let (t, k) = auth
            .strip_prefix("vapid t=")
            .and_then(|rest| rest.split_once(", k="))
            .unwrap();
        assert_eq!(k, key.public_key_b64());
        assert_eq!(decode_b64url(k).unwrap().len(), 65);

        let mut validation = Validation::new(Algorithm::ES256);
        validation.set_audience(&["http://127.0.0.1:8080"]);
        let data = decode::<Claims>(t, &decoding_key(&key), &validation).unwrap();
        assert_eq!(data.claims.aud, "http://127.0.0.1:8080");
        assert_eq!(data.claims.sub.as_deref(), Some("mailto:ops@example.com"));
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let lifetime = data.claims.exp - now;
        assert!(
            (11 * 3600..=12 * 3600).contains(&lifetime),
            "exp {lifetime}s ahead"
        );
        assert_eq!(data.header.typ.as_deref(), Some("JWT"));
    }

    #[test]
    fn jwt_from_another_key_fails_verification() {
        let key = VapidKey::generate();
        let other = VapidKey::generate();
        let t = key.sign_jwt("http://a", None, SystemTime::now() + TOKEN_LIFETIME);
        let mut validation = Validation::new(Algorithm::ES256);
        validation.set_audience(&["http://a"]);
        assert!(decode::<Claims>(&t, &decoding_key(&other), &validation).is_err());
        let claims = decode::<Claims>(&t, &decoding_key(&key), &validation).unwrap();
        assert!(claims.claims.sub.is_none());
    }

    #[test]
    fn reads_pkcs8_sec1_and_raw_forms() {
        let key = VapidKey::generate();
        let pkcs8 = key.to_pkcs8_pem().unwrap();
        assert!(pkcs8.starts_with("-----BEGIN PRIVATE KEY-----"));
        assert_eq!(
            VapidKey::from_text(&pkcs8).unwrap().public_key_b64(),
            key.public_key_b64()
        );

        let sec1 = key.secret.to_sec1_pem(LineEnding::LF).unwrap();
        assert!(sec1.starts_with("-----BEGIN EC PRIVATE KEY-----"));
        assert_eq!(
            VapidKey::from_text(&sec1).unwrap().public_key_b64(),
            key.public_key_b64()
        );

        let raw = URL_SAFE_NO_PAD.encode(key.secret.to_bytes());
        assert_eq!(
            VapidKey::from_text(&raw).unwrap().public_key_b64(),
            key.public_key_b64()
        );
    }

    #[test]
    fn rejects_other_keys_and_garbage() {
        assert!(
            VapidKey::from_text("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----")
                .is_err()
        );
        assert!(VapidKey::from_text("not a key").is_err());
        assert!(VapidKey::from_text(&URL_SAFE_NO_PAD.encode([1u8; 16])).is_err());
    }

    #[test]
    fn subject_must_be_a_contact_uri() {
        assert!(validate_subject("mailto:ops@example.com").is_ok());
        assert!(validate_subject("https://example.com/contact").is_ok());
        assert!(validate_subject("ops@example.com").is_err());
        assert!(validate_subject("mailto:").is_err());
        assert!(validate_subject("http://example.com").is_err());
    }
}
