//! The encryption headers of a push message: what an application server
//! sends with an encrypted payload (RFC 8188 `Content-Encoding`, and for the
//! legacy `aesgcm` coding `Encryption` and `Crypto-Key`), forwarded to the
//! user agent in the notification's `headers` so it can decrypt.

use serde::{Deserialize, Serialize};

/// `{"encoding": "aes128gcm"}` or, for `aesgcm`, with `encryption` and
/// `crypto_key` too. Read leniently: a missing `encoding` reads as empty.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NotificationHeaders {
    #[serde(default)]
    pub encoding: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crypto_key: Option<String>,
}

/// The `encoding` of a payload that is not encrypted. Application servers
/// cannot send one (their pushes must be encrypted, RFC 8291); only Herald
/// makes them, for what it writes itself: the Matrix gateway's
/// notifications (proto-docs/websocket.md, "Notifications").
pub const IDENTITY: &str = "identity";

impl NotificationHeaders {
    /// The headers of a plaintext payload made by Herald itself.
    pub fn identity() -> Self {
        NotificationHeaders {
            encoding: IDENTITY.into(),
            ..Default::default()
        }
    }
}

/// Finds `name=value` in a `;`/`,`-separated header such as
/// `Crypto-Key: dh=...;p256ecdsa=...`.
pub fn header_param<'a>(header: &'a str, name: &str) -> Option<&'a str> {
    header
        .split([';', ','])
        .filter_map(|part| part.trim().split_once('='))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case(name))
        .map(|(_, v)| v.trim().trim_matches('"'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_parameters_case_blind_and_unquoted() {
        let h = r#"keyid=p256dh; dh="BAAA", P256ECDSA=BBBB"#;
        assert_eq!(header_param(h, "dh"), Some("BAAA"));
        assert_eq!(header_param(h, "p256ecdsa"), Some("BBBB"));
        assert_eq!(header_param(h, "salt"), None);
    }

    #[test]
    fn absent_parts_are_neither_written_nor_required() {
        let h = NotificationHeaders {
            encoding: "aes128gcm".into(),
            ..Default::default()
        };
        assert_eq!(
            serde_json::to_string(&h).unwrap(),
            r#"{"encoding":"aes128gcm"}"#
        );
        let read: NotificationHeaders = serde_json::from_str("{}").unwrap();
        assert_eq!(read, NotificationHeaders::default());
    }
}
