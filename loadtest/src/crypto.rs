//! What an application server does before it can POST: a VAPID key and JWT
//! (RFC 8292) and payloads encrypted for each subscription (RFC 8291
//! aes128gcm), made ahead of time so the measurement is not of our ECDH.

use anyhow::{anyhow, bail, Context, Result};
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, URL_SAFE_NO_PAD};
use base64::engine::DecodePaddingMode;
use base64::Engine;
use bytes::Bytes;
use ece::EcKeyComponents;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use p256::ecdsa::SigningKey;
use p256::pkcs8::{EncodePrivateKey, LineEnding};

/// base64url that accepts padded and unpadded input alike.
pub const B64_LENIENT: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::URL_SAFE,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Largest plaintext whose aes128gcm body fits the 4096 bytes every push
/// service must accept. The body is 86 bytes of header (salt, record size,
/// key id length, 65-byte key), the plaintext padded by `ece` to the next
/// multiple of 128 (at least one delimiter byte), and a 16-byte tag:
/// 3967 bytes pad to 3968, giving a 4070-byte body; 3968 would pad to 4096.
pub const MAX_PLAINTEXT: usize = 3967;

/// Size of the aes128gcm body `ece` makes for a plaintext of `len` bytes.
pub fn body_len(len: usize) -> usize {
    86 + (len / 128 + 1) * 128 + 16
}

/// An application server's VAPID identity.
pub struct Vapid {
    /// Uncompressed P-256 public point, base64url: the `key` in `register`
    /// and the `k=` in the Authorization header.
    pub public_b64: String,
    key: EncodingKey,
}

#[derive(serde::Serialize)]
struct Claims<'a> {
    aud: &'a str,
    exp: u64,
    sub: &'a str,
}

impl Vapid {
    pub fn generate() -> Result<Vapid> {
        let signing = SigningKey::random(&mut rand::rngs::OsRng);
        let point = signing.verifying_key().to_encoded_point(false);
        let pem = signing
            .to_pkcs8_pem(LineEnding::LF)
            .map_err(|e| anyhow!("encoding VAPID key: {e}"))?;
        let key = EncodingKey::from_ec_pem(pem.as_bytes()).context("loading VAPID key")?;
        Ok(Vapid {
            public_b64: URL_SAFE_NO_PAD.encode(point.as_bytes()),
            key,
        })
    }

    /// `Authorization: vapid t=<JWT>, k=<key>` for endpoints of one origin.
    /// Valid 12 hours, so one header serves a whole run, as a real
    /// application server reuses its token.
    pub fn authorization(&self, audience: &str) -> Result<http::HeaderValue> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let claims = Claims {
            aud: audience,
            exp: now + 12 * 3600,
            sub: "mailto:loadtest@example.com",
        };
        let jwt = jsonwebtoken::encode(&Header::new(Algorithm::ES256), &claims, &self.key)
            .context("signing VAPID JWT")?;
        http::HeaderValue::from_str(&format!("vapid t={jwt}, k={}", self.public_b64))
            .context("building Authorization header")
    }
}

/// The plaintext of pool slot `s` of channel `c`: distinct per slot, so a
/// decrypted payload names the message it came from.
pub fn plaintext(c: usize, s: usize, size: usize) -> Vec<u8> {
    let mut p = format!("herald-loadtest c={c} s={s};").into_bytes();
    p.resize(size, b'.');
    p
}

/// Pre-encrypted payloads: `per_channel` ciphertexts for each channel, each
/// made for that channel's own key pair and auth secret. Every ciphertext
/// starts with its own random 16-byte salt, which survives the trip to the
/// user agent unchanged; that salt is how a received notification is
/// matched to the exact send it came from, without decrypting.
pub struct Pool {
    pub per_channel: usize,
    pub payload: usize,
    bodies: Vec<Bytes>,
    /// Only kept when received payloads are to be decrypted and checked.
    keys: Option<Vec<(EcKeyComponents, [u8; 16])>>,
}

impl Pool {
    pub fn build(
        channels: usize,
        per_channel: usize,
        payload: usize,
        keep_keys: bool,
    ) -> Result<Pool> {
        if per_channel == 0 {
            bail!("pool needs at least one payload per channel");
        }
        if payload == 0 || payload > MAX_PLAINTEXT {
            bail!("payload size must be 1..={MAX_PLAINTEXT} bytes (so the aes128gcm body fits 4096 bytes)");
        }
        let threads = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .min(channels.max(1));
        let chunk = channels.div_ceil(threads).max(1);
        type Part = Result<(Vec<Bytes>, Vec<(EcKeyComponents, [u8; 16])>)>;
        let parts: Vec<Part> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..threads)
                .map(|t| {
                    let range = (t * chunk).min(channels)..((t + 1) * chunk).min(channels);
                    scope.spawn(move || -> Part {
                        let mut bodies = Vec::with_capacity(range.len() * per_channel);
                        let mut keys = Vec::new();
                        for c in range {
                            let (pair, auth) = ece::generate_keypair_and_auth_secret()
                                .map_err(|e| anyhow!("generating subscription keys: {e}"))?;
                            let comps = pair
                                .raw_components()
                                .map_err(|e| anyhow!("exporting subscription keys: {e}"))?;
                            for s in 0..per_channel {
                                let body = ece::encrypt(
                                    comps.public_key(),
                                    &auth,
                                    &plaintext(c, s, payload),
                                )
                                .map_err(|e| anyhow!("encrypting payload: {e}"))?;
                                bodies.push(Bytes::from(body));
                            }
                            if keep_keys {
                                keys.push((comps, auth));
                            }
                        }
                        Ok((bodies, keys))
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(anyhow!("encryption thread panicked")))
                })
                .collect()
        });
        let mut bodies = Vec::with_capacity(channels * per_channel);
        let mut keys = Vec::new();
        for part in parts {
            let (b, k) = part?;
            bodies.extend(b);
            keys.extend(k);
        }
        Ok(Pool {
            per_channel,
            payload,
            bodies,
            keys: keep_keys.then_some(keys),
        })
    }

    pub fn body(&self, channel: usize, slot: usize) -> &Bytes {
        &self.bodies[channel * self.per_channel + slot]
    }

    /// Which pool slot of `channel` a received salt belongs to.
    pub fn slot_of(&self, channel: usize, salt: &[u8; 16]) -> Option<usize> {
        (0..self.per_channel).find(|&s| self.body(channel, s).get(..16) == Some(&salt[..]))
    }

    pub fn bytes(&self) -> usize {
        self.bodies.iter().map(|b| b.len()).sum()
    }

    /// Decrypts a received payload with the channel's private key and checks
    /// it is the plaintext of `slot`. None when keys were not kept.
    pub fn verify(&self, channel: usize, slot: usize, data_b64: &str) -> Option<bool> {
        let keys = self.keys.as_ref()?;
        let (comps, auth) = keys.get(channel)?;
        let Ok(body) = B64_LENIENT.decode(data_b64) else {
            return Some(false);
        };
        // ece unwraps internally on some malformed inputs; a server sending
        // garbage must show up as a failed check, not kill the run.
        let out = std::panic::catch_unwind(|| ece::decrypt(comps, auth, &body));
        Some(matches!(out, Ok(Ok(p)) if p == plaintext(channel, slot, self.payload)))
    }
}

/// The salt at the front of an aes128gcm body, read from the notification's
/// base64url `data` without decoding the rest of it.
pub fn salt_from_data(data: &str) -> Option<[u8; 16]> {
    let head = data.as_bytes().get(..24)?;
    let mut out = [0u8; 18];
    let n = B64_LENIENT.decode_slice(head, &mut out).ok()?;
    if n < 16 {
        return None;
    }
    let mut salt = [0u8; 16];
    salt.copy_from_slice(&out[..16]);
    Some(salt)
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::URL_SAFE;

    #[test]
    fn pool_round_trip_and_matching() {
        let pool = Pool::build(3, 2, 100, true).unwrap();
        assert_eq!(pool.bytes(), 6 * body_len(100));
        for c in 0..3 {
            for s in 0..2 {
                let data = URL_SAFE_NO_PAD.encode(pool.body(c, s));
                let salt = salt_from_data(&data).unwrap();
                assert_eq!(pool.slot_of(c, &salt), Some(s));
                assert_eq!(pool.verify(c, s, &data), Some(true));
                // Padded base64url, as some servers send, decodes the same.
                assert_eq!(
                    pool.verify(c, s, &URL_SAFE.encode(pool.body(c, s))),
                    Some(true)
                );
                // Another slot's plaintext or another channel's key fails.
                assert_eq!(pool.verify(c, 1 - s, &data), Some(false));
                assert_eq!(pool.verify((c + 1) % 3, s, &data), Some(false));
                assert_eq!(pool.slot_of((c + 1) % 3, &salt), None);
            }
        }
    }

    #[test]
    fn verify_rejects_garbage_without_panicking() {
        let pool = Pool::build(1, 1, 10, true).unwrap();
        let long = "A".repeat(200);
        let zeros = URL_SAFE_NO_PAD.encode([0u8; 120]);
        for junk in ["", "AAAA", "!!!", &long, &zeros] {
            assert_eq!(pool.verify(0, 0, junk), Some(false), "{junk}");
        }
        let no_keys = Pool::build(1, 1, 10, false).unwrap();
        assert_eq!(no_keys.verify(0, 0, "x"), None);
    }

    #[test]
    fn salt_needs_enough_data() {
        assert!(salt_from_data("short").is_none());
        assert!(salt_from_data("ééééééééééééééééééééééééé").is_none());
        assert!(salt_from_data(&URL_SAFE_NO_PAD.encode([7u8; 18])).is_some());
    }

    #[test]
    fn payload_bounds() {
        assert!(Pool::build(1, 1, 0, false).is_err());
        assert!(Pool::build(1, 1, MAX_PLAINTEXT + 1, false).is_err());
        let max = Pool::build(1, 1, MAX_PLAINTEXT, false).unwrap();
        assert_eq!(max.body(0, 0).len(), body_len(MAX_PLAINTEXT));
        assert!(body_len(MAX_PLAINTEXT) <= 4096 && body_len(MAX_PLAINTEXT + 1) > 4096);
        for len in [1, 127, 128, 1000] {
            assert_eq!(
                Pool::build(1, 1, len, false).unwrap().body(0, 0).len(),
                body_len(len)
            );
        }
    }

    #[test]
    fn vapid_header_is_a_valid_es256_jwt() {
        let v = Vapid::generate().unwrap();
        let h = v.authorization("http://127.0.0.1:8080").unwrap();
        let s = h.to_str().unwrap();
        let (t, k) = s
            .strip_prefix("vapid t=")
            .and_then(|r| r.split_once(", k="))
            .unwrap();
        assert_eq!(k, v.public_b64);
        let point = URL_SAFE_NO_PAD.decode(k).unwrap();
        assert_eq!(point.len(), 65);
        let dk = jsonwebtoken::DecodingKey::from_ec_components(
            &URL_SAFE_NO_PAD.encode(&point[1..33]),
            &URL_SAFE_NO_PAD.encode(&point[33..65]),
        )
        .unwrap();
        let mut val = jsonwebtoken::Validation::new(Algorithm::ES256);
        val.set_audience(&["http://127.0.0.1:8080"]);
        let data = jsonwebtoken::decode::<serde_json::Value>(t, &dk, &val).unwrap();
        assert_eq!(data.claims["sub"], "mailto:loadtest@example.com");
    }
}
