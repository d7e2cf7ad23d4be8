//! autopush-rs endpoint tokens minted by an independent Fernet: Python's
//! `cryptography` (Debian's python3-cryptography, installed by
//! scripts/install-test-tools.sh), laid out as autopush-rs's
//! `make_endpoint` writes them. Nothing here uses Herald's code.

use base64::Engine;
use std::process::Command;

/// The interpreter Debian's python3-cryptography is installed for.
const PYTHON: &str = "/usr/bin/python3";

/// uaid and channel id as raw UUID bytes; for v2 the SHA-256 of the raw
/// application server key; sealed; `=` padding dropped as in the URL.
const MINT: &str = r#"
import base64, hashlib, sys, uuid
from cryptography.fernet import Fernet
key, uaid, chid, app_key = sys.argv[1:5]
plain = uuid.UUID(uaid).bytes + uuid.UUID(chid).bytes
if app_key:
    plain += hashlib.sha256(base64.urlsafe_b64decode(app_key + "=" * (-len(app_key) % 4))).digest()
sys.stdout.write(Fernet(key.encode()).encrypt(plain).decode().rstrip("="))
"#;

/// A fresh Fernet key as autopush-rs's CRYPTO_KEYS holds them: 32 random
/// bytes, URL-safe base64 with padding.
pub fn fernet_key() -> String {
    base64::engine::general_purpose::URL_SAFE.encode(rand::random::<[u8; 32]>())
}

/// The token of an autopush-rs endpoint for `uaid`/`chid` under `key`:
/// v1 without `app_key`, v2 (key-bound) with it (base64url, as `register`
/// took it).
pub fn autopush_token(key: &str, uaid: &str, chid: &str, app_key: Option<&str>) -> String {
    let out = Command::new(PYTHON)
        .args(["-c", MINT, key, uaid, chid, app_key.unwrap_or("")])
        .output()
        .unwrap_or_else(|e| panic!("{PYTHON}: {e} (run scripts/install-test-tools.sh)"));
    assert!(
        out.status.success(),
        "minting an autopush token with Python's cryptography failed (run scripts/install-test-tools.sh): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("base64url text")
}
