//! RFC 8030 request headers (TTL, Urgency, Topic) and the payload encodings
//! of RFC 8291/8188 (`aes128gcm`) and the legacy `aesgcm` draft. Herald never
//! decrypts; it only checks that a payload is shaped so a user agent can.

use crate::errors::ApiError;
use herald_proto::headers::NotificationHeaders;
use herald_proto::urgency::Urgency;

/// `TTL` is required; values above `max_ttl` are lowered, not refused.
pub fn parse_ttl(value: Option<&str>, max_ttl: u64) -> Result<u64, ApiError> {
    let value = value.ok_or_else(ApiError::missing_ttl)?.trim();
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ApiError::invalid_ttl(value));
    }
    // A run of digits too long for u64 is still a valid (huge) TTL.
    Ok(value.parse::<u64>().unwrap_or(u64::MAX).min(max_ttl))
}

pub fn parse_urgency(value: Option<&str>) -> Result<Urgency, ApiError> {
    match value {
        None => Ok(Urgency::Normal),
        Some(v) => Urgency::parse(v).ok_or_else(|| ApiError::invalid_urgency(v)),
    }
}

/// RFC 8030 §5.4: at most 32 characters of the URL-safe base64 alphabet.
pub fn parse_topic(value: Option<&str>) -> Result<Option<String>, ApiError> {
    let Some(v) = value else { return Ok(None) };
    if is_valid_topic(v) {
        Ok(Some(v.to_string()))
    } else {
        Err(ApiError::invalid_topic())
    }
}

/// RFC 8030 §5.4's rule, shared by the server and `herald send`.
pub fn is_valid_topic(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= 32
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The longest `Encryption` or `Crypto-Key` header an aesgcm push may carry.
pub const MAX_CRYPTO_HEADER: usize = 4096;

/// What the request's encryption headers say about a non-empty body.
pub fn check_encoding(
    content_encoding: Option<&str>,
    encryption: Option<&str>,
    crypto_key: Option<&str>,
    body: &[u8],
) -> Result<NotificationHeaders, ApiError> {
    let encoding = content_encoding
        .map(|e| e.trim().to_ascii_lowercase())
        .ok_or_else(|| {
            ApiError::missing_crypto(
                "a payload needs a Content-Encoding header (aes128gcm or aesgcm)",
            )
        })?;
    match encoding.as_str() {
        "aes128gcm" => {
            check_aes128gcm_header(body)?;
            Ok(NotificationHeaders {
                encoding,
                encryption: None,
                crypto_key: None,
            })
        }
        "aesgcm" => {
            let encryption = encryption.ok_or_else(|| {
                ApiError::missing_crypto("aesgcm needs an Encryption header with salt=")
            })?;
            let crypto_key = crypto_key.ok_or_else(|| {
                ApiError::missing_crypto("aesgcm needs a Crypto-Key header with dh=")
            })?;
            // Stored with the message and sent on to the user agent whole,
            // so bounded: real ones are a few hundred bytes, and the store
            // keeps at most 64 KiB of each.
            if encryption.len() > MAX_CRYPTO_HEADER || crypto_key.len() > MAX_CRYPTO_HEADER {
                return Err(ApiError::invalid_crypto(&format!(
                    "Encryption and Crypto-Key headers are limited to {MAX_CRYPTO_HEADER} bytes"
                )));
            }
            // Stored and forwarded in the one form user agents decode.
            let normalised = crate::aesgcm::normalise(encryption, crypto_key)?;
            Ok(NotificationHeaders {
                encoding,
                encryption: Some(normalised.encryption),
                crypto_key: Some(normalised.crypto_key),
            })
        }
        other => Err(ApiError::invalid_crypto(&format!(
            "unsupported Content-Encoding {other:?}; use aes128gcm"
        ))),
    }
}

/// RFC 8188 §2.1: salt (16) | rs (u32) | idlen (u8) | keyid, then at least
/// one record carrying a 16-byte tag and a padding delimiter.
fn check_aes128gcm_header(body: &[u8]) -> Result<(), ApiError> {
    if body.len() < 21 {
        return Err(ApiError::invalid_crypto(
            "aes128gcm body is shorter than its 21-byte header",
        ));
    }
    let rs = u32::from_be_bytes([body[16], body[17], body[18], body[19]]);
    if rs < 18 {
        return Err(ApiError::invalid_crypto(
            "aes128gcm record size must be at least 18",
        ));
    }
    let idlen = body[20] as usize;
    let header_len = 21 + idlen;
    if body.len() < header_len + 17 {
        return Err(ApiError::invalid_crypto(
            "aes128gcm body ends before its key id and first record",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use herald_proto::b64::encode_b64url;

    /// Only Herald itself makes plaintext (`identity`) payloads, for the
    /// Matrix gateway: an application server's push must be encrypted.
    #[test]
    fn application_servers_cannot_send_identity_payloads() {
        for coding in ["identity", "IDENTITY", " identity "] {
            let e = check_encoding(Some(coding), None, None, b"{\"hi\":1}").unwrap_err();
            assert_eq!(
                (e.status, e.errno),
                (400, crate::errors::Errno::InvalidCrypto),
                "{coding}"
            );
        }
    }

    #[test]
    fn ttl_rules() {
        assert_eq!(parse_ttl(Some("60"), 1000).unwrap(), 60);
        assert_eq!(parse_ttl(Some("0"), 1000).unwrap(), 0);
        assert_eq!(parse_ttl(Some("5000"), 1000).unwrap(), 1000);
        assert_eq!(
            parse_ttl(Some("99999999999999999999999"), 1000).unwrap(),
            1000
        );
        assert_eq!(parse_ttl(None, 1000).unwrap_err().errno.code(), 111);
        for bad in ["", "-1", "1.5", "ten", " "] {
            assert_eq!(
                parse_ttl(Some(bad), 1000).unwrap_err().errno.code(),
                112,
                "{bad}"
            );
        }
    }

    #[test]
    fn urgency_rules() {
        assert_eq!(parse_urgency(None).unwrap(), Urgency::Normal);
        assert_eq!(parse_urgency(Some("very-low")).unwrap(), Urgency::VeryLow);
        assert_eq!(parse_urgency(Some("HIGH")).unwrap(), Urgency::High);
        assert!(parse_urgency(Some("urgent")).is_err());
        assert!(Urgency::VeryLow < Urgency::Low && Urgency::Normal < Urgency::High);
        for u in [
            Urgency::VeryLow,
            Urgency::Low,
            Urgency::Normal,
            Urgency::High,
        ] {
            assert_eq!(Urgency::from_u8(u as u8), Some(u));
            assert_eq!(Urgency::parse(u.as_str()), Some(u));
        }
    }

    #[test]
    fn topic_rules() {
        assert_eq!(parse_topic(None).unwrap(), None);
        assert_eq!(
            parse_topic(Some("a-b_C9")).unwrap().as_deref(),
            Some("a-b_C9")
        );
        assert!(parse_topic(Some(&"a".repeat(32))).is_ok());
        assert!(parse_topic(Some(&"a".repeat(33))).is_err());
        assert!(parse_topic(Some("with space")).is_err());
        assert!(parse_topic(Some("plus+")).is_err());
        assert!(parse_topic(Some("")).is_err());
    }

    fn aes128gcm_body(rs: u32, idlen: u8, records: usize) -> Vec<u8> {
        let mut b = vec![7u8; 16];
        b.extend_from_slice(&rs.to_be_bytes());
        b.push(idlen);
        b.extend(std::iter::repeat_n(4u8, idlen as usize));
        b.extend(std::iter::repeat_n(0u8, records));
        b
    }

    #[test]
    fn aes128gcm_header_must_parse() {
        let ok = aes128gcm_body(4096, 65, 40);
        assert!(check_encoding(Some("aes128gcm"), None, None, &ok).is_ok());
        let small_rs = aes128gcm_body(17, 65, 40);
        assert_eq!(
            check_encoding(Some("aes128gcm"), None, None, &small_rs)
                .unwrap_err()
                .errno
                .code(),
            110
        );
        let truncated = aes128gcm_body(4096, 65, 0);
        assert!(check_encoding(Some("aes128gcm"), None, None, &truncated).is_err());
        assert!(check_encoding(Some("aes128gcm"), None, None, &[1, 2, 3]).is_err());
        assert_eq!(
            check_encoding(None, None, None, &ok)
                .unwrap_err()
                .errno
                .code(),
            101
        );
        assert_eq!(
            check_encoding(Some("gzip"), None, None, &ok)
                .unwrap_err()
                .errno
                .code(),
            110
        );
    }

    #[test]
    fn aesgcm_needs_salt_and_dh_and_is_normalised() {
        use p256::elliptic_curve::sec1::ToEncodedPoint;
        let dh = p256::SecretKey::random(&mut rand::rngs::OsRng)
            .public_key()
            .to_encoded_point(false)
            .as_bytes()
            .to_vec();
        let (salt, dh) = (encode_b64url(&[1u8; 16]), encode_b64url(&dh));
        let enc = format!("salt={salt}");
        let ck = format!("dh={dh}");
        let h = check_encoding(
            Some("aesgcm"),
            Some(&format!("salt=\"{salt}\"")),
            Some(&format!("dh=\"{dh}\"")),
            b"x",
        )
        .unwrap();
        assert_eq!(h.encoding, "aesgcm");
        assert_eq!(h.encryption.as_deref(), Some(enc.as_str()));
        assert_eq!(h.crypto_key.as_deref(), Some(ck.as_str()));
        assert_eq!(
            check_encoding(Some("aesgcm"), None, Some(&ck), b"x")
                .unwrap_err()
                .errno
                .code(),
            101
        );
        assert_eq!(
            check_encoding(Some("aesgcm"), Some(&enc), None, b"x")
                .unwrap_err()
                .errno
                .code(),
            101
        );
        assert_eq!(
            check_encoding(Some("aesgcm"), Some("salt=short"), Some(&ck), b"x")
                .unwrap_err()
                .errno
                .code(),
            110
        );
        assert_eq!(
            check_encoding(Some("aesgcm"), Some(&enc), Some("p256ecdsa=C"), b"x")
                .unwrap_err()
                .errno
                .code(),
            110
        );
    }
}
