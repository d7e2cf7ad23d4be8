//! Identifiers that cross the wire: user-agent ids (uaid) and channel ids.

use std::fmt;

/// A user agent's id: 16 random bytes, written as 32 lowercase hex digits
/// (the form Firefox stores and sends back in `hello`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Uaid(pub [u8; 16]);

impl Uaid {
    pub fn random() -> Self {
        Uaid(rand::random())
    }

    /// Accepts the 32-hex form Herald hands out and, for clients that were
    /// given a hyphenated UUID by another server, that form too.
    pub fn parse(s: &str) -> Option<Self> {
        let hex: String = s.chars().filter(|c| *c != '-').collect();
        // Hex digits only: `from_str_radix` alone would take "+f" as 0x0f.
        if hex.len() != 32 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let mut out = [0u8; 16];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(hex.get(i * 2..i * 2 + 2)?, 16).ok()?;
        }
        Some(Uaid(out))
    }

    /// A short prefix for logs: enough to correlate, not enough to address.
    pub fn short(&self) -> String {
        self.to_string()[..8].to_string()
    }
}

impl fmt::Display for Uaid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Uaid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Uaid({})", self.short())
    }
}

/// Channel ids are UUIDs chosen by the user agent.
pub type ChannelId = uuid::Uuid;

/// Parses a channelID as a user agent sends it (hyphenated UUID; the simple
/// 32-hex form is accepted too).
pub fn parse_channel_id(s: &str) -> Option<ChannelId> {
    uuid::Uuid::try_parse(s).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uaid_round_trips_through_hex() {
        let u = Uaid::random();
        let s = u.to_string();
        assert_eq!(s.len(), 32);
        assert!(s
            .chars()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        assert_eq!(Uaid::parse(&s), Some(u));
    }

    #[test]
    fn uaid_accepts_hyphenated_and_rejects_garbage() {
        let u = Uaid::parse("0123456789abcdef0123456789ABCDEF").unwrap();
        assert_eq!(Uaid::parse("01234567-89ab-cdef-0123-456789abcdef"), Some(u));
        assert_eq!(Uaid::parse(""), None);
        assert_eq!(Uaid::parse("xyz"), None);
        assert_eq!(Uaid::parse("0123456789abcdef0123456789abcdeg"), None);
        assert_eq!(Uaid::parse("é123456789abcdef0123456789abcde"), None);
    }

    #[test]
    fn channel_ids_parse_like_firefox_sends_them() {
        assert!(parse_channel_id("2f1c8e1a-3b7d-4c55-9a0e-2d4c6f8b1a23").is_some());
        assert!(parse_channel_id("not-a-uuid").is_none());
        assert!(parse_channel_id("").is_none());
    }
}
