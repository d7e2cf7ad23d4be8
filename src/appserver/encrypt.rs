//! Message encryption for Web Push (RFC 8291) with the `aes128gcm` content
//! coding (RFC 8188), as an application server does it.
//!
//! A push message is encrypted to the user agent's `p256dh` key and `auth`
//! secret from its `PushSubscription`. Each message uses a fresh ephemeral
//! P-256 key and a random salt, so two encryptions of the same text differ.

use aes_gcm::aead::{Aead, KeyInit};
use aes_gcm::{Aes128Gcm, Nonce};
use hkdf::Hkdf;
use p256::elliptic_curve::sec1::ToEncodedPoint;
use p256::{PublicKey, SecretKey};
use rand::rngs::OsRng;
use rand::RngCore;
use sha2::Sha256;
use std::fmt;

/// The record size Herald writes. Browsers accept any size; 4096 keeps the
/// whole body of a message that fits the RFC 8291 budget in one record.
pub const DEFAULT_RECORD_SIZE: u32 = 4096;

/// Length of the `aes128gcm` header Herald writes: salt (16), rs (4),
/// idlen (1) and the 65-octet ephemeral public key.
pub const HEADER_LEN: usize = 16 + 4 + 1 + 65;

/// AES-GCM tag length.
const TAG_LEN: usize = 16;

/// Largest plaintext that every push service must accept (RFC 8291 §4):
/// 4096 octets of body minus the header, one padding octet and the tag.
pub const MAX_PORTABLE_PLAINTEXT: usize = 4096 - HEADER_LEN - 1 - TAG_LEN;

/// Why a message could not be encrypted. All come from a malformed
/// subscription, so the messages name the subscription field at fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EncryptError {
    /// `keys.p256dh` is not a 65-octet uncompressed P-256 point.
    BadP256dh(String),
    /// `keys.auth` is not 16 octets.
    BadAuth(usize),
    /// The plaintext cannot fit in a single record of the largest size.
    TooLarge(usize),
}

impl fmt::Display for EncryptError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EncryptError::BadP256dh(why) => write!(f, "subscription key p256dh is unusable: {why}"),
            EncryptError::BadAuth(len) => {
                write!(f, "subscription secret auth must be 16 bytes, got {len}")
            }
            EncryptError::TooLarge(len) => {
                write!(f, "payload of {len} bytes is too large to encrypt")
            }
        }
    }
}

impl std::error::Error for EncryptError {}

/// Encrypts `plaintext` for the user agent holding `p256dh` (65-octet
/// uncompressed point) and `auth` (16 octets), returning the complete
/// `aes128gcm` request body: header then a single record.
///
/// The record size is 4096, or just large enough for one record when the
/// plaintext is longer; RFC 8291 requires a single record, and a push service
/// may refuse bodies over 4096 octets (see [`MAX_PORTABLE_PLAINTEXT`]).
pub fn encrypt_aes128gcm(
    p256dh: &[u8],
    auth: &[u8],
    plaintext: &[u8],
) -> Result<Vec<u8>, EncryptError> {
    let ephemeral = SecretKey::random(&mut OsRng);
    let mut salt = [0u8; 16];
    OsRng.fill_bytes(&mut salt);
    encrypt_with(p256dh, auth, plaintext, &ephemeral, &salt)
}

/// [`encrypt_aes128gcm`] with a caller-chosen ephemeral key and salt. Only
/// for reproducing known-answer vectors: reusing either leaks plaintext.
pub fn encrypt_with(
    p256dh: &[u8],
    auth: &[u8],
    plaintext: &[u8],
    ephemeral: &SecretKey,
    salt: &[u8; 16],
) -> Result<Vec<u8>, EncryptError> {
    if p256dh.len() != 65 || p256dh[0] != 0x04 {
        return Err(EncryptError::BadP256dh(format!(
            "expected 65 bytes starting with 0x04 (uncompressed point), got {} bytes",
            p256dh.len()
        )));
    }
    let ua_public = PublicKey::from_sec1_bytes(p256dh)
        .map_err(|_| EncryptError::BadP256dh("not a point on P-256".into()))?;
    if auth.len() != 16 {
        return Err(EncryptError::BadAuth(auth.len()));
    }
    // One record holds plaintext, the 0x02 delimiter and the tag.
    let record_len = plaintext
        .len()
        .checked_add(1 + TAG_LEN)
        .filter(|n| u32::try_from(*n).is_ok())
        .ok_or(EncryptError::TooLarge(plaintext.len()))?;
    let rs = DEFAULT_RECORD_SIZE.max(record_len as u32);

    let as_public = ephemeral.public_key().to_encoded_point(false);
    let as_public = as_public.as_bytes();

    let shared = p256::ecdh::diffie_hellman(ephemeral.to_nonzero_scalar(), ua_public.as_affine());

    // RFC 8291 §3.4: mix the auth secret and both public keys into the IKM.
    let mut key_info = Vec::with_capacity(14 + 65 + 65);
    key_info.extend_from_slice(b"WebPush: info\0");
    key_info.extend_from_slice(p256dh);
    key_info.extend_from_slice(as_public);
    let mut ikm = [0u8; 32];
    Hkdf::<Sha256>::new(Some(auth), shared.raw_secret_bytes())
        .expand(&key_info, &mut ikm)
        .expect("32 bytes is a valid HKDF-SHA256 output length");

    // RFC 8188 §2.2/2.3: content key and nonce from the salt.
    let prk = Hkdf::<Sha256>::new(Some(salt), &ikm);
    let mut cek = [0u8; 16];
    prk.expand(b"Content-Encoding: aes128gcm\0", &mut cek)
        .expect("16 bytes is a valid HKDF-SHA256 output length");
    let mut nonce = [0u8; 12];
    prk.expand(b"Content-Encoding: nonce\0", &mut nonce)
        .expect("12 bytes is a valid HKDF-SHA256 output length");

    // Sequence number 0, so the nonce is used as derived. 0x02 marks the
    // last (only) record; no further padding.
    let mut record = Vec::with_capacity(plaintext.len() + 1);
    record.extend_from_slice(plaintext);
    record.push(0x02);
    let cipher = Aes128Gcm::new_from_slice(&cek).expect("AES-128 key is 16 bytes");
    let sealed = cipher
        .encrypt(&Nonce::from(nonce), record.as_slice())
        .map_err(|_| EncryptError::TooLarge(plaintext.len()))?;

    let mut body = Vec::with_capacity(HEADER_LEN + sealed.len());
    body.extend_from_slice(salt);
    body.extend_from_slice(&rs.to_be_bytes());
    body.push(65);
    body.extend_from_slice(as_public);
    body.extend_from_slice(&sealed);
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    struct Ua {
        private: Vec<u8>,
        public: Vec<u8>,
        auth: [u8; 16],
    }

    fn user_agent() -> Ua {
        let key = SecretKey::random(&mut OsRng);
        let mut auth = [0u8; 16];
        OsRng.fill_bytes(&mut auth);
        Ua {
            private: key.to_bytes().to_vec(),
            public: key.public_key().to_encoded_point(false).as_bytes().to_vec(),
            auth,
        }
    }

    fn ece_decrypt(ua: &Ua, body: &[u8]) -> Vec<u8> {
        let components = ece::EcKeyComponents::new(ua.private.clone(), ua.public.clone());
        ece::decrypt(&components, &ua.auth, body).expect("ece decrypts our body")
    }

    /// The worked example of RFC 8291 §5, byte for byte.
    #[test]
    fn matches_rfc8291_example() {
        let as_private = hex("c9f58f89813e9f8e872e71f42aa64e1757c9254dcc62b72ddc010bb4043ea11c");
        let ua_public = hex("042571b2becdfde360551aaf1ed0f4cd366c11cebe555f89bcb7b186a53339173168ece2ebe018597bd30479b86e3c8f8eced577ca59187e9246990db682008b0e");
        let auth = hex("05305932a1c7eabe13b6cec9fda48882");
        let salt: [u8; 16] = hex("0c6bfaadad67958803092d454676f397").try_into().unwrap();
        let ephemeral = SecretKey::from_slice(&as_private).unwrap();
        let body = encrypt_with(
            &ua_public,
            &auth,
            b"When I grow up, I want to be a watermelon",
            &ephemeral,
            &salt,
        )
        .unwrap();
        let expected = hex("0c6bfaadad67958803092d454676f397000010004104fe33f4ab0dea71914db55823f73b54948f41306d920732dbb9a59a53286482200e597a7b7bc260ba1c227998580992e93973002f3012a28ae8f06bbb78e5ec0ff297de5b429bba7153d3a4ae0caa091fd425f3b4b5414add8ab37a19c1bbb05cf5cb5b2a2e0562d558635641ec52812c6c8ff42e95ccb86be7cd");
        assert_eq!(body, expected);
    }

    #[test]
    fn ece_crate_decrypts_random_messages() {
        let ua = user_agent();
        for text in [&b""[..], b"x", b"hello, herald", &[0xffu8; 3993][..]] {
            let body = encrypt_aes128gcm(&ua.public, &ua.auth, text).unwrap();
            assert_eq!(body.len(), HEADER_LEN + text.len() + 1 + TAG_LEN);
            assert_eq!(&body[16..20], &4096u32.to_be_bytes());
            assert_eq!(body[20], 65);
            assert_eq!(ece_decrypt(&ua, &body), text);
        }
    }

    #[test]
    fn fresh_salt_and_key_every_time() {
        let ua = user_agent();
        let a = encrypt_aes128gcm(&ua.public, &ua.auth, b"same").unwrap();
        let b = encrypt_aes128gcm(&ua.public, &ua.auth, b"same").unwrap();
        assert_ne!(a[..16], b[..16], "salt reused");
        assert_ne!(a[21..86], b[21..86], "ephemeral key reused");
    }

    #[test]
    fn long_payload_grows_the_single_record() {
        let ua = user_agent();
        let text = vec![b'a'; 5000];
        let body = encrypt_aes128gcm(&ua.public, &ua.auth, &text).unwrap();
        assert_eq!(&body[16..20], &(5000u32 + 17).to_be_bytes());
        assert_eq!(ece_decrypt(&ua, &body), text);
    }

    #[test]
    fn wrong_auth_secret_does_not_decrypt() {
        let ua = user_agent();
        let body = encrypt_aes128gcm(&ua.public, &ua.auth, b"secret").unwrap();
        let mut other = Ua {
            auth: ua.auth,
            ..user_agent()
        };
        other.private.clone_from(&ua.private);
        other.public.clone_from(&ua.public);
        other.auth[0] ^= 1;
        let components = ece::EcKeyComponents::new(other.private, other.public);
        assert!(ece::decrypt(&components, &other.auth, &body).is_err());
    }

    #[test]
    fn rejects_malformed_subscription_keys() {
        let ua = user_agent();
        assert!(matches!(
            encrypt_aes128gcm(&ua.public[..33], &ua.auth, b"x"),
            Err(EncryptError::BadP256dh(_))
        ));
        let mut off_curve = ua.public.clone();
        off_curve[64] ^= 1;
        assert!(matches!(
            encrypt_aes128gcm(&off_curve, &ua.auth, b"x"),
            Err(EncryptError::BadP256dh(_))
        ));
        assert_eq!(
            encrypt_aes128gcm(&ua.public, &ua.auth[..12], b"x"),
            Err(EncryptError::BadAuth(12))
        );
    }
}
