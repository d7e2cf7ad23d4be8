//! base64url (RFC 4648 §5), the alphabet of every key, salt, payload and
//! token on Web Push's wires.

use base64::Engine;

/// Decodes base64url with or without padding (Firefox pads, most libraries
/// don't).
pub fn decode_b64url(s: &str) -> Option<Vec<u8>> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(s.trim().trim_end_matches('='))
        .ok()
}

/// Unpadded, as RFC 8291 and RFC 8292 write keys.
pub fn encode_b64url(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn padding_is_optional_on_input_and_absent_on_output() {
        assert_eq!(encode_b64url(&[0xfb, 0xff]), "-_8");
        assert_eq!(decode_b64url("-_8"), Some(vec![0xfb, 0xff]));
        assert_eq!(decode_b64url("-_8="), Some(vec![0xfb, 0xff]));
        assert_eq!(decode_b64url("+/8"), None);
    }
}
