//! The registration API's secret: what a mobile client proves it owns a
//! uaid with. It is a pure function of the uaid and a key, so nothing is
//! stored and a secret never changes for its uaid: lowercase hex of
//! HMAC-SHA256, keyed by the key's UTF-8 bytes as configured (not decoded),
//! over the uaid as 32 lowercase hex digits. That is how autopush-rs makes
//! them, so secrets it issued verify here under the same key strings.

use herald_proto::ids::Uaid;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The keys secrets are made and checked with.
#[derive(Clone, Debug, Default)]
pub struct SecretKeys {
    /// `bridge_auth_keys`: the first issues, all verify (rotation).
    issuing: Vec<String>,
    /// `autopush_auth_keys`: verify only, for user agents autopush-rs
    /// registered.
    legacy: Vec<String>,
}

impl SecretKeys {
    pub fn new(issuing: Vec<String>, legacy: Vec<String>) -> Self {
        SecretKeys { issuing, legacy }
    }

    /// The secret handed out with a new uaid; None without a key.
    pub fn issue(&self, uaid: &Uaid) -> Option<String> {
        let key = self.issuing.first()?;
        let tag = mac(key, uaid).finalize().into_bytes();
        Some(tag.iter().map(|b| format!("{b:02x}")).collect())
    }

    /// Whether `secret` is the uaid's secret under any key. Only the exact
    /// form issued (64 lowercase hex digits) is accepted, and each key's tag
    /// is compared in constant time.
    pub fn verify(&self, uaid: &Uaid, secret: &str) -> bool {
        let Some(tag) = decode_lower_hex(secret) else {
            return false;
        };
        // Every key is tried, whichever matches, so the time taken does not
        // tell which key (if any) the secret was made with.
        let mut ok = false;
        for key in self.issuing.iter().chain(&self.legacy) {
            ok |= mac(key, uaid).verify_slice(&tag).is_ok();
        }
        ok
    }
}

fn mac(key: &str, uaid: &Uaid) -> Hmac<Sha256> {
    let mut m = Hmac::<Sha256>::new_from_slice(key.as_bytes()).expect("HMAC takes any key length");
    m.update(uaid.to_string().as_bytes());
    m
}

/// 64 lowercase hex digits as 32 bytes.
fn decode_lower_hex(s: &str) -> Option<[u8; 32]> {
    let b = s.as_bytes();
    if b.len() != 64
        || !b
            .iter()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(c))
    {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&s[i * 2..i * 2 + 2], 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "HJVPy4ZwF4Yz_JdvXTL8hRcwIhv742vC60Tg5Ycrvw8=";
    const UAID: &str = "729e5104f5f04abc9196085340317dea";
    const SECRET: &str = "f694963453adf5dedcc379bbdd6900d692b6e09f1c91f44169bfcd2f941bf36c";

    /// autopush-rs's own vector (`test_legacy_signature`).
    #[test]
    fn matches_autopush_s_test_vector() {
        let uaid = Uaid::parse(UAID).unwrap();
        let keys = SecretKeys::new(vec![KEY.into()], vec![]);
        assert_eq!(keys.issue(&uaid).as_deref(), Some(SECRET));
        assert!(keys.verify(&uaid, SECRET));
        // The hyphenated uaid is the same uaid, so the same secret.
        let hyphenated = Uaid::parse("729e5104-f5f0-4abc-9196-085340317dea").unwrap();
        assert!(keys.verify(&hyphenated, SECRET));
    }

    #[test]
    fn the_first_key_issues_and_every_key_verifies() {
        let uaid = Uaid::random();
        let old = SecretKeys::new(vec!["old-key-0123456789".into()], vec![]);
        let rotated = SecretKeys::new(
            vec!["new-key-0123456789".into(), "old-key-0123456789".into()],
            vec![KEY.into()],
        );
        let old_secret = old.issue(&uaid).unwrap();
        let new_secret = rotated.issue(&uaid).unwrap();
        assert_ne!(old_secret, new_secret);
        assert!(rotated.verify(&uaid, &old_secret));
        assert!(rotated.verify(&uaid, &new_secret));
        assert!(!old.verify(&uaid, &new_secret));
        // Legacy keys verify but never issue.
        let autopush = SecretKeys::new(vec![KEY.into()], vec![])
            .issue(&uaid)
            .unwrap();
        assert!(rotated.verify(&uaid, &autopush));
        assert!(SecretKeys::new(vec![], vec![KEY.into()])
            .issue(&uaid)
            .is_none());
    }

    #[test]
    fn anything_but_the_exact_secret_is_refused() {
        let uaid = Uaid::parse(UAID).unwrap();
        let keys = SecretKeys::new(vec![KEY.into()], vec![]);
        assert!(!keys.verify(&Uaid::random(), SECRET));
        assert!(!keys.verify(&uaid, &SECRET.to_ascii_uppercase()));
        assert!(!keys.verify(&uaid, &SECRET[..62]));
        assert!(!keys.verify(&uaid, ""));
        let mut flipped = SECRET.to_string();
        flipped.replace_range(0..1, "e");
        assert!(!keys.verify(&uaid, &flipped));
        assert!(!SecretKeys::default().verify(&uaid, SECRET));
    }
}
