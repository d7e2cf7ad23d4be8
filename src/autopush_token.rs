//! Endpoint tokens issued by Mozilla's autopush-rs, so the endpoints it
//! handed out keep working after Herald takes its place.
//!
//! autopush-rs seals a token with Fernet (AES-128-CBC + HMAC-SHA256) under
//! the keys of its `CRYPTO_KEYS` setting, which Herald reads as
//! `autopush_crypto_keys`. Plaintext: v1 is the uaid's 16 raw bytes then
//! the channel id's 16; v2 appends the SHA-256 of the subscription's raw
//! application-server public key, the same hash as [`crate::token::key_hash`].
//! The URL carries the Fernet text with its `=` padding removed.
//!
//! Herald never mints these: new subscriptions get Herald's own tokens.

use crate::token::{ApiVersion, EndpointToken};
use fernet::{Fernet, MultiFernet};
use herald_proto::ids::{ChannelId, Uaid};

/// URL lengths of autopush-rs's tokens (Fernet text without `=`): 105 and
/// 137 bytes of Fernet token. Herald's own endpoint tokens are 80 and 123
/// characters, so a length alone tells the two formats apart.
pub const V1_LEN: usize = 140;
pub const V2_LEN: usize = 183;

/// Every Fernet token starts with the version byte 0x80 followed by a
/// 64-bit timestamp whose top bytes are zero for centuries yet.
const PREFIX: &str = "gAAAAA";

/// The keys of `autopush_crypto_keys`, tried in order (autopush-rs's
/// MultiFernet: it sealed with the first, and any may have sealed a token
/// still in use).
#[derive(Clone)]
pub struct AutopushTokens {
    keys: MultiFernet,
    count: usize,
}

/// Keys are secrets: never printed.
impl std::fmt::Debug for AutopushTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AutopushTokens({} keys)", self.count)
    }
}

impl AutopushTokens {
    /// Parses the setting's value as autopush-rs parsed `CRYPTO_KEYS`.
    pub fn parse(value: &str) -> Result<Self, String> {
        let keys = parse_key_list(value)?
            .iter()
            .enumerate()
            .map(|(i, k)| {
                Fernet::new(k).ok_or_else(|| {
                    format!(
                        "key {} is not a Fernet key (32 bytes of URL-safe base64, as autopush-rs's CRYPTO_KEYS holds)",
                        i + 1
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(AutopushTokens {
            count: keys.len(),
            keys: MultiFernet::new(keys),
        })
    }

    /// The endpoint an autopush-rs token names, if one of the keys sealed
    /// it and its contents fit `version`. autopush-rs gave its tokens no
    /// lifetime, so none is checked; the Fernet crate still refuses a token
    /// stamped more than 60 s in the future.
    pub fn open_endpoint(&self, version: ApiVersion, token: &str) -> Option<EndpointToken> {
        if !has_autopush_shape(token) {
            return None;
        }
        let plain = self.keys.decrypt(token).ok()?;
        let with_key = match (version, plain.len()) {
            (ApiVersion::V1, 32) => false,
            (ApiVersion::V2, 64) => true,
            _ => return None,
        };
        Some(EndpointToken {
            uaid: Uaid(plain[..16].try_into().ok()?),
            channel: ChannelId::from_slice(&plain[16..32]).ok()?,
            key_hash: with_key.then(|| plain[32..64].try_into().expect("32 bytes")),
        })
    }
}

/// Whether `token` is shaped like an autopush-rs endpoint token: 140 (v1)
/// or 183 (v2) characters once trailing `=` are dropped, starting `gAAAAA`.
/// No Herald token has either length.
pub fn has_autopush_shape(token: &str) -> bool {
    let t = token.trim_end_matches('=');
    (t.len() == V1_LEN || t.len() == V2_LEN) && t.starts_with(PREFIX)
}

/// autopush-rs's list syntax: every `"` and whitespace removed, then
/// `[k1,k2]`. A bare `k1,k2` (and so a TOML list, which the loader joins
/// with commas) is accepted too.
pub fn parse_key_list(value: &str) -> Result<Vec<String>, String> {
    let compact: String = value
        .chars()
        .filter(|c| *c != '"' && !c.is_whitespace())
        .collect();
    let inner = match (compact.strip_prefix('['), compact.ends_with(']')) {
        (Some(rest), true) => &rest[..rest.len() - 1],
        (None, false) => compact.as_str(),
        _ => return Err("a list must be written [key1,key2] or key1,key2".into()),
    };
    if inner.is_empty() {
        return Err("no keys: give autopush-rs's CRYPTO_KEYS, or leave the setting unset".into());
    }
    let keys: Vec<String> = inner.split(',').map(String::from).collect();
    if keys.iter().any(String::is_empty) {
        return Err("an empty key in the list (two commas, or one at an end)".into());
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::key_hash;

    // An independent vector: made with Python's `cryptography` Fernet at a
    // fixed time and IV (see the issue 23 research notes).
    const KEY1: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
    const KEY2: &str = "ZGVmZ2hpamtsbW5vcHFyc3R1dnd4eXp7fH1-f4CBgoM=";
    const UAID: &str = "5f2c0d3e8a9b4c1d9e3f405162738495";
    const CHID: &str = "0a1b2c3d-4e5f-4a6b-8c7d-8e9fa0b1c2d3";
    const V1: &str = "gAAAAABlU_EAEREREREREREREREREREREQNH5ktxWowBrWN9HRMc9rEdI3o5tZYl6U9lY6q6kh_DLao8D9UiV5P6haop9joypdF4nPTvwaEqWEUBJCOOUcuuHoqid8icqvk3fiZi7pRZ";
    const V2: &str = "gAAAAABlU_EAEREREREREREREREREREREQNH5ktxWowBrWN9HRMc9rEdI3o5tZYl6U9lY6q6kh_D01kWC4NeWLB1D2aMmwGjLwWrDgdfoyYkSAtYY9XAxMVjf8emwA4sr0zPedDkvtFn3XzlidJFWeH0iswDPqOeFRahPUdA5xQf8pY81X8Zmak";
    const VAPID_PUBLIC: &str =
        "BPnr5GQUfMEC2SMk0JnZJ8GlDkLVegihFv_sCimBnYxlcLr30SiIkCpqDB1nrdEDEjyFmrab-OlDHJOEkw1Lfu4";

    fn expected(key: bool) -> EndpointToken {
        let raw = herald_proto::b64::decode_b64url(VAPID_PUBLIC).unwrap();
        EndpointToken {
            uaid: Uaid::parse(UAID).unwrap(),
            channel: CHID.parse().unwrap(),
            key_hash: key.then(|| key_hash(&raw)),
        }
    }

    #[test]
    fn opens_v1_and_v2_tokens_made_by_another_fernet() {
        let t = AutopushTokens::parse(KEY1).unwrap();
        assert_eq!(t.open_endpoint(ApiVersion::V1, V1), Some(expected(false)));
        // v2's hash is SHA-256 of the raw key, as Herald's own key hash.
        assert_eq!(t.open_endpoint(ApiVersion::V2, V2), Some(expected(true)));
        // With its `=` padding kept, as some senders may have stored it.
        let padded = format!("{V2}=");
        assert_eq!(
            t.open_endpoint(ApiVersion::V2, &padded),
            Some(expected(true))
        );
    }

    #[test]
    fn a_token_must_match_its_path_version() {
        let t = AutopushTokens::parse(KEY1).unwrap();
        assert_eq!(t.open_endpoint(ApiVersion::V2, V1), None);
        assert_eq!(t.open_endpoint(ApiVersion::V1, V2), None);
    }

    #[test]
    fn every_configured_key_opens_and_others_do_not() {
        let rotated = AutopushTokens::parse(&format!("[{KEY2},{KEY1}]")).unwrap();
        assert_eq!(
            rotated.open_endpoint(ApiVersion::V1, V1),
            Some(expected(false))
        );
        let other = AutopushTokens::parse(KEY2).unwrap();
        assert_eq!(other.open_endpoint(ApiVersion::V1, V1), None);
    }

    #[test]
    fn altered_or_misshapen_tokens_are_refused() {
        let t = AutopushTokens::parse(KEY1).unwrap();
        // One character changed in the ciphertext, then in the HMAC.
        for at in [60, 130] {
            let mut b = V1.as_bytes().to_vec();
            b[at] = if b[at] == b'A' { b'B' } else { b'A' };
            let altered = String::from_utf8(b).unwrap();
            assert_eq!(t.open_endpoint(ApiVersion::V1, &altered), None, "{at}");
        }
        assert_eq!(t.open_endpoint(ApiVersion::V1, &V1[..139]), None);
        assert_eq!(t.open_endpoint(ApiVersion::V1, ""), None);
        assert_eq!(t.open_endpoint(ApiVersion::V1, &"!".repeat(140)), None);
        assert_eq!(
            t.open_endpoint(ApiVersion::V1, &format!("gAAAAA{}", "A".repeat(134))),
            None
        );
    }

    #[test]
    fn shape_tells_autopush_from_herald_tokens() {
        assert!(has_autopush_shape(V1));
        assert!(has_autopush_shape(V2));
        assert!(has_autopush_shape(&format!("{V2}=")));
        // Herald's lengths (80, 123), even when they happen to start alike.
        assert!(!has_autopush_shape(&format!("gAAAAAB{}", "x".repeat(73))));
        assert!(!has_autopush_shape(&format!("gAAAAAB{}", "x".repeat(116))));
        // Autopush's length without the Fernet version byte.
        assert!(!has_autopush_shape(&format!("hAAAAAB{}", &V1[7..])));
        // Herald's real tokens, whatever their random first bytes.
        let codec = crate::token::TokenCodec::new(&[[3u8; 32]]).unwrap();
        for key in [None, Some([7u8; 32])] {
            let (_, s) = codec.endpoint_token(&EndpointToken {
                key_hash: key,
                ..expected(false)
            });
            assert!(!has_autopush_shape(&s), "{s}");
        }
    }

    #[test]
    fn key_lists_are_read_as_autopush_reads_them() {
        let both = vec![KEY2.to_string(), KEY1.to_string()];
        for written in [
            format!("[{KEY2},{KEY1}]"),
            format!("[\"{KEY2}\", \"{KEY1}\"]"),
            format!("{KEY2},{KEY1}"),
            format!(" {KEY2} , {KEY1} "),
        ] {
            assert_eq!(parse_key_list(&written).unwrap(), both, "{written}");
        }
        assert_eq!(parse_key_list(KEY1).unwrap(), vec![KEY1.to_string()]);
        for bad in ["[]", "", "[k1", "k1]", "[k1,,k2]", "k1,"] {
            assert!(parse_key_list(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn malformed_keys_are_refused_naming_which() {
        // Too short, standard alphabet, not base64.
        let std_alphabet = "+/ECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
        for bad in ["short", std_alphabet, "!!!!"] {
            let e = AutopushTokens::parse(&format!("[{KEY1},{bad}]")).unwrap_err();
            assert!(e.starts_with("key 2 "), "{e}");
        }
        assert!(format!("{:?}", AutopushTokens::parse(KEY1).unwrap()).contains("1 keys"));
        assert!(!format!("{:?}", AutopushTokens::parse(KEY1).unwrap()).contains("AAEC"));
    }
}
