//! The legacy `aesgcm` coding's `Encryption` and `Crypto-Key` headers,
//! brought to the one form every user agent decodes before they are stored.
//!
//! Application servers send these headers in many spellings: quoted values,
//! base64 with `=` padding, spaces around `;`. Firefox strips the quotes but
//! refuses padded base64, so a padded message it was handed is dropped after
//! Herald answered 201. Herald therefore accepts what it can rewrite without
//! changing its meaning, rewrites it, and refuses (400, errno 110) what it
//! cannot. The rule is in proto-docs/http-api.md.

use crate::errors::ApiError;
use base64::Engine;

/// The headers as stored and forwarded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Normalised {
    pub encryption: String,
    pub crypto_key: String,
}

/// The aesgcm draft pads every record with a 2-byte length, so a record
/// must hold more than that.
const MIN_RS: u64 = 3;
const SALT_LEN: usize = 16;

/// Rewrites both headers in canonical form, or says why it cannot.
pub fn normalise(encryption: &str, crypto_key: &str) -> Result<Normalised, ApiError> {
    normalise_inner(encryption, crypto_key).map_err(|m| ApiError::invalid_crypto(&m))
}

fn normalise_inner(encryption: &str, crypto_key: &str) -> Result<Normalised, String> {
    let mut enc_entries = entries(encryption, "Encryption")?;
    if enc_entries.len() != 1 {
        // Layered encodings: user agents decode only the first, so the
        // rest would be ignored in silence.
        return Err(format!(
            "Encryption must hold exactly one entry, not {}",
            enc_entries.len()
        ));
    }
    let enc = enc_entries.remove(0);
    let keyid = enc.get("keyid").map(keyid_value).transpose()?;
    let salt = enc.get("salt").ok_or("Encryption header has no salt=")?;
    let salt = binary(salt, "Encryption salt")?;
    if salt.len() != SALT_LEN {
        return Err(format!(
            "Encryption salt must be {SALT_LEN} bytes of base64url, not {}",
            salt.len()
        ));
    }
    let rs = enc.get("rs").map(record_size).transpose()?;
    let mut out = Vec::new();
    if let Some(k) = keyid {
        out.push(format!("keyid={k}"));
    }
    out.push(format!("salt={}", b64(&salt)));
    if let Some(rs) = rs {
        out.push(format!("rs={rs}"));
    }
    let encryption_out = out.join(";");

    let mut keys = Vec::new();
    let mut dh_keyids = Vec::new();
    for entry in entries(crypto_key, "Crypto-Key")? {
        let kid = entry.get("keyid").map(keyid_value).transpose()?;
        let mut out = Vec::new();
        if let Some(k) = kid {
            out.push(format!("keyid={k}"));
        }
        if let Some(dh) = entry.get("dh") {
            let raw = binary(dh, "Crypto-Key dh")?;
            if p256::PublicKey::from_sec1_bytes(&raw).is_err() || raw.len() != 65 {
                return Err(
                    "Crypto-Key dh must be an uncompressed P-256 point (65 bytes) in base64url"
                        .into(),
                );
            }
            out.push(format!("dh={}", b64(&raw)));
            dh_keyids.push(kid);
        }
        if let Some(key) = entry.get("p256ecdsa") {
            out.push(format!(
                "p256ecdsa={}",
                b64(&binary(key, "Crypto-Key p256ecdsa")?)
            ));
        }
        // An entry holding only parameters user agents ignore goes away.
        if out.iter().any(|p| !p.starts_with("keyid=")) {
            keys.push(out.join(";"));
        }
    }
    if dh_keyids.is_empty() {
        return Err("Crypto-Key header has no dh=".into());
    }
    // User agents take the dh whose keyid the Encryption names, or without
    // one the first dh: make sure that lookup succeeds.
    if let Some(k) = keyid {
        if !dh_keyids.contains(&Some(k)) {
            return Err(format!(
                "Encryption keyid={k} names no Crypto-Key entry with the same keyid and a dh="
            ));
        }
    }
    Ok(Normalised {
        encryption: encryption_out,
        crypto_key: keys.join(","),
    })
}

/// One comma-separated entry's parameters, names lower-cased.
struct Entry<'a>(Vec<(String, &'a str)>);

impl<'a> Entry<'a> {
    fn get(&self, name: &str) -> Option<&'a str> {
        self.0.iter().find(|(n, _)| n == name).map(|(_, v)| *v)
    }
}

fn entries<'a>(header: &'a str, what: &str) -> Result<Vec<Entry<'a>>, String> {
    let mut out = Vec::new();
    for entry in header.split(',') {
        let mut params: Vec<(String, &str)> = Vec::new();
        for param in entry.split(';').map(str::trim).filter(|p| !p.is_empty()) {
            let (name, value) = param
                .split_once('=')
                .ok_or_else(|| format!("{what} parameter {param:?} has no value"))?;
            let name = name.trim().to_ascii_lowercase();
            if name.is_empty() {
                return Err(format!("{what} parameter {param:?} has no name"));
            }
            if params.iter().any(|(n, _)| *n == name) {
                // User agents disagree on which one wins.
                return Err(format!("{what} names {name} twice in one entry"));
            }
            params.push((name.clone(), unquote(value.trim(), what, &name)?));
        }
        if !params.is_empty() {
            out.push(Entry(params));
        }
    }
    Ok(out)
}

/// A token or a quoted string without escapes: a quote or backslash inside
/// has no unquoted form that every user agent splits the same way.
fn unquote<'a>(v: &'a str, what: &str, name: &str) -> Result<&'a str, String> {
    let inner = match v.strip_prefix('"') {
        Some(rest) => rest
            .strip_suffix('"')
            .ok_or_else(|| format!("{what} {name} has an unterminated quote"))?,
        None => v,
    };
    if inner.contains(['"', '\\']) {
        return Err(format!(
            "{what} {name} holds a quote or backslash, which cannot be forwarded unquoted"
        ));
    }
    Ok(inner)
}

/// Base64url or standard base64, padded or not; trailing bits must be zero
/// so that one value has one encoding.
fn binary(v: &str, what: &str) -> Result<Vec<u8>, String> {
    let bare = v
        .strip_suffix("==")
        .or_else(|| v.strip_suffix('='))
        .unwrap_or(v);
    let url: String = bare
        .chars()
        .map(|c| match c {
            '+' => '-',
            '/' => '_',
            c => c,
        })
        .collect();
    match base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(&url) {
        Ok(bytes) if !bytes.is_empty() => Ok(bytes),
        _ => Err(format!("{what} is not base64url")),
    }
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// A key id is an opaque label; it is forwarded as is, so it must survive
/// without quotes: printable ASCII with no `,` `;` (which would split it).
fn keyid_value(v: &str) -> Result<&str, String> {
    let ok = v.trim() == v
        && v.bytes()
            .all(|b| (0x20..0x7f).contains(&b) && b != b',' && b != b';');
    if ok {
        Ok(v)
    } else {
        Err(format!(
            "keyid {v:?} must be printable ASCII without , or ; or surrounding spaces"
        ))
    }
}

fn record_size(v: &str) -> Result<u64, String> {
    let bad = || {
        format!(
            "Encryption rs must be an integer from {MIN_RS} to {}, not {v:?}",
            u32::MAX
        )
    };
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    match v.parse::<u64>() {
        Ok(rs) if (MIN_RS..=u64::from(u32::MAX)).contains(&rs) => Ok(rs),
        _ => Err(bad()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::{STANDARD, URL_SAFE, URL_SAFE_NO_PAD};
    use p256::elliptic_curve::sec1::ToEncodedPoint;

    fn point() -> Vec<u8> {
        let secret = p256::SecretKey::random(&mut rand::rngs::OsRng);
        secret
            .public_key()
            .to_encoded_point(false)
            .as_bytes()
            .to_vec()
    }

    /// Salt and dh bytes whose encodings hold `+`/`/` and need padding.
    fn material() -> (Vec<u8>, Vec<u8>) {
        let salt = vec![0xfb; 16];
        let dh = loop {
            let p = point();
            if STANDARD.encode(&p).contains(['+', '/']) {
                break p;
            }
        };
        (salt, dh)
    }

    fn ok(enc: &str, ck: &str) -> Normalised {
        normalise(enc, ck).unwrap_or_else(|e| panic!("{enc} / {ck}: {}", e.message))
    }

    fn refused(enc: &str, ck: &str) -> String {
        let e = normalise(enc, ck).expect_err(&format!("{enc} / {ck} was accepted"));
        assert_eq!((e.status, e.errno.code()), (400, 110));
        e.message
    }

    #[test]
    fn every_spelling_becomes_the_same_canonical_form() {
        let (salt, dh) = material();
        let (s, d) = (URL_SAFE_NO_PAD.encode(&salt), URL_SAFE_NO_PAD.encode(&dh));
        let want = Normalised {
            encryption: format!("salt={s}"),
            crypto_key: format!("dh={d}"),
        };
        for (enc, ck) in [
            (format!("salt={s}"), format!("dh={d}")),
            (format!("salt=\"{s}\""), format!("dh=\"{d}\"")),
            (
                format!("salt={}", URL_SAFE.encode(&salt)),
                format!("dh={}", URL_SAFE.encode(&dh)),
            ),
            (
                format!("salt=\"{}\"", URL_SAFE.encode(&salt)),
                format!("dh=\"{}\"", URL_SAFE.encode(&dh)),
            ),
            (
                format!(" SALT = {} ", STANDARD.encode(&salt)),
                format!(" Dh={} ;", STANDARD.encode(&dh)),
            ),
        ] {
            assert_eq!(ok(&enc, &ck), want, "{enc} / {ck}");
        }
        // Canonical input is left as it is.
        assert_eq!(ok(&want.encryption, &want.crypto_key), want);
    }

    #[test]
    fn keyid_rs_p256ecdsa_and_several_entries() {
        let (salt, dh) = material();
        let vapid = point();
        let (s, d, v) = (
            URL_SAFE_NO_PAD.encode(&salt),
            URL_SAFE_NO_PAD.encode(&dh),
            URL_SAFE_NO_PAD.encode(&vapid),
        );
        let n = ok(
            &format!(
                "rs=\"4096\"; keyid=\"p256dh\"; salt=\"{}\"",
                URL_SAFE.encode(&salt)
            ),
            &format!(
                "keyid=\"p256dh\";dh=\"{}\", p256ecdsa=\"{}\"",
                URL_SAFE.encode(&dh),
                URL_SAFE.encode(&vapid)
            ),
        );
        assert_eq!(n.encryption, format!("keyid=p256dh;salt={s};rs=4096"));
        assert_eq!(n.crypto_key, format!("keyid=p256dh;dh={d},p256ecdsa={v}"));
        // The keyid picks the second entry's dh; both are kept, in order.
        let other = URL_SAFE_NO_PAD.encode(point());
        let n = ok(
            &format!("keyid=b;salt={s}"),
            &format!("keyid=a;dh={other},keyid=b;dh={d}"),
        );
        assert_eq!(n.crypto_key, format!("keyid=a;dh={other},keyid=b;dh={d}"));
        // Key ids are opaque: a URL keeps its `:` `/` and `=`.
        let n = ok(
            &format!("keyid=\"http://example.org/k?a=1\";salt={s}"),
            &format!("keyid=\"http://example.org/k?a=1\";dh={d}"),
        );
        assert_eq!(
            n.encryption,
            format!("keyid=http://example.org/k?a=1;salt={s}")
        );
        // Unknown parameters are dropped, and entries holding nothing else.
        let n = ok(
            &format!("salt={s};future=1"),
            &format!("dh={d};x=\"y\",keyid=z;other=1"),
        );
        assert_eq!(n.encryption, format!("salt={s}"));
        assert_eq!(n.crypto_key, format!("dh={d}"));
        assert_eq!(
            ok(&format!("salt={s};rs=0018"), &format!("dh={d}")).encryption,
            format!("salt={s};rs=18")
        );
    }

    #[test]
    fn what_cannot_be_normalised_is_refused() {
        let (salt, dh) = material();
        let (s, d) = (URL_SAFE_NO_PAD.encode(&salt), URL_SAFE_NO_PAD.encode(&dh));
        let ck = format!("dh={d}");
        // The example: the keyids do not match, so no user agent finds the dh.
        let m = refused(
            "keyid=\"http://example.org/bob/keys/123\";salt=\"XZwpw6o37R-6qoZjw6KwAw==\"",
            &format!("keyid=\"a1\"; dh=\"{}\"", URL_SAFE.encode(&dh)),
        );
        assert!(m.contains("keyid"), "{m}");
        for enc in [
            String::new(),
            "rs=4096".into(),
            "salt=short".into(),
            "salt=!!!!".into(),
            format!("salt={}", URL_SAFE_NO_PAD.encode([1u8; 15])),
            format!("salt={s},salt={s}"),
            format!("salt={s};salt={s}"),
            format!("salt=\"{s}"),
            format!("salt=\"a\\\"{s}\""),
            format!("salt={s};rs=2"),
            format!("salt={s};rs=-5"),
            format!("salt={s};rs=4294967296"),
            format!("salt={s};rs=ten"),
            format!("salt={s};keyid"),
            format!("salt={s};=x"),
        ] {
            refused(&enc, &ck);
        }
        let enc = format!("salt={s}");
        for bad in [
            String::new(),
            "p256ecdsa=AAAA".into(),
            "dh=".into(),
            "dh=BBBB".into(),
            format!("dh={}", URL_SAFE_NO_PAD.encode([4u8; 65])),
            format!("dh={d};p256ecdsa=***"),
            format!("dh={d};dh={d}"),
            format!("keyid=\"a,b\";dh={d}"),
        ] {
            refused(&enc, &bad);
        }
        // A keyid with a quote inside cannot be unquoted.
        refused(&format!("keyid=\"a\"b\";salt={s}"), &ck);
    }
}
