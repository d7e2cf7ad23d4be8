//! Authentication of node-to-node requests (`/_herald/node/…`).
//!
//! Each request carries `Authorization: HeraldNode ts=<unix seconds>,
//! nonce=<16 random bytes, base64url>, sig=<HMAC-SHA256, base64url>`. The
//! HMAC covers the method, the path, the timestamp, the nonce and the body,
//! keyed from the shared endpoint key, so only a node can make one, and a
//! request cannot be altered or moved to another path. A timestamp more than
//! `MAX_SKEW` from the receiver's clock is refused, and a nonce seen within
//! that window is refused as a replay. Both clocks are the cluster's shared
//! one (`store::SharedClock`, Redis's time), not the nodes' own, so a node
//! whose clock is off still agrees with the others. proto-docs/cluster.md describes the
//! format for anyone writing a compatible node.

use crate::errors::{ApiError, Errno};
use herald_proto::b64::{decode_b64url, encode_b64url};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

/// The authorization scheme name.
pub const SCHEME: &str = "HeraldNode";
/// How far a request's timestamp may be from the receiver's clock, either
/// way. Both are Redis's time shifted into each node, so this only has to
/// absorb request latency and the shift's tolerance (2 s each side).
pub const MAX_SKEW: u64 = 15;
/// Nonces remembered at once: enough for about 8,700 node requests a second
/// sustained over the replay window (2 × `MAX_SKEW`), about 10 MB at most.
pub const MAX_NONCES: usize = 262_144;
const NONCE_BYTES: usize = 16;
const DOMAIN: &[u8] = b"herald-node-v2";

/// The HMAC key nodes share: derived from the first endpoint key, so
/// configuring the key configures the cluster.
#[derive(Clone)]
pub struct NodeKey([u8; 32]);

impl NodeKey {
    pub fn derive(endpoint_key: &[u8; 32]) -> NodeKey {
        let hk = hkdf::Hkdf::<Sha256>::new(None, endpoint_key);
        let mut okm = [0u8; 32];
        hk.expand(b"herald node-to-node hmac v2", &mut okm)
            .expect("32 bytes is a valid HKDF-SHA256 output length");
        NodeKey(okm)
    }

    fn mac(&self, method: &str, path: &str, ts: u64, nonce: &str, body: &[u8]) -> Hmac<Sha256> {
        let mut mac =
            Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes a key of any length");
        for part in [DOMAIN, method.as_bytes(), path.as_bytes()] {
            mac.update(part);
            mac.update(b"\n");
        }
        mac.update(ts.to_string().as_bytes());
        mac.update(b"\n");
        mac.update(nonce.as_bytes());
        mac.update(b"\n");
        mac.update(body);
        mac
    }

    /// The `Authorization` value for one request, with a fresh nonce.
    pub fn sign(&self, method: &str, path: &str, now: u64, body: &[u8]) -> String {
        let nonce = encode_b64url(&rand::random::<[u8; NONCE_BYTES]>());
        self.sign_with(method, path, now, &nonce, body)
    }

    fn sign_with(&self, method: &str, path: &str, ts: u64, nonce: &str, body: &[u8]) -> String {
        let sig = self
            .mac(method, path, ts, nonce, body)
            .finalize()
            .into_bytes();
        format!(
            "{SCHEME} ts={ts}, nonce={nonce}, sig={}",
            encode_b64url(&sig)
        )
    }
}

/// A parsed `Authorization` header, before its signature is checked.
#[derive(Debug, PartialEq, Eq)]
pub struct Signed<'a> {
    pub ts: u64,
    pub nonce: &'a str,
    sig: Vec<u8>,
}

fn forged(msg: &str) -> ApiError {
    ApiError::new(
        401,
        Errno::NodeForged,
        format!("not a node of this cluster: {msg}"),
    )
}

/// Reads the header; refuses one that is missing, malformed or stale
/// before the body is read.
pub fn parse(authorization: Option<&str>, now: u64) -> Result<Signed<'_>, ApiError> {
    let value = authorization.unwrap_or_default().trim();
    let Some((scheme, params)) = value.split_once(' ') else {
        return Err(forged("no HeraldNode authorization"));
    };
    if scheme != SCHEME {
        return Err(forged("no HeraldNode authorization"));
    }
    let param = |name: &str| {
        params
            .split(',')
            .filter_map(|p| p.trim().split_once('='))
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.trim())
    };
    let ts = param("ts").and_then(|t| t.parse::<u64>().ok());
    let nonce = param("nonce").filter(|n| decode_b64url(n).is_some_and(|b| b.len() == NONCE_BYTES));
    let sig = param("sig")
        .and_then(decode_b64url)
        .filter(|s| s.len() == 32);
    let (Some(ts), Some(nonce), Some(sig)) = (ts, nonce, sig) else {
        return Err(forged("malformed HeraldNode authorization"));
    };
    if ts.abs_diff(now) > MAX_SKEW {
        return Err(ApiError::new(
            401,
            Errno::NodeClockSkew,
            format!("node request timestamp is more than {MAX_SKEW} s from this node's clock"),
        ));
    }
    Ok(Signed { ts, nonce, sig })
}

impl Signed<'_> {
    /// Checks the signature over this request (each comparison in constant
    /// time) against the node key of every endpoint key.
    pub fn verify(
        &self,
        keys: &[NodeKey],
        method: &str,
        path: &str,
        body: &[u8],
    ) -> Result<(), ApiError> {
        keys.iter()
            .any(|k| {
                k.mac(method, path, self.ts, self.nonce, body)
                    .verify_slice(&self.sig)
                    .is_ok()
            })
            .then_some(())
            .ok_or_else(|| forged("bad signature"))
    }
}

/// Nonces of accepted requests, each kept until its timestamp leaves the
/// skew window (after which the timestamp check refuses a replay anyway).
pub struct ReplayWindow {
    inner: Mutex<Nonces>,
    capacity: usize,
}

#[derive(Default)]
struct Nonces {
    seen: HashMap<[u8; NONCE_BYTES], u64>,
    /// (forget at, nonce) in arrival order, to expire without scanning.
    order: VecDeque<(u64, [u8; NONCE_BYTES])>,
}

impl ReplayWindow {
    pub fn new(capacity: usize) -> Self {
        ReplayWindow {
            inner: Mutex::new(Nonces::default()),
            capacity,
        }
    }

    /// Records a verified request's nonce; refuses one already seen. When the
    /// window is full of live nonces the request is refused rather than a
    /// nonce forgotten early: a lost wake-up only delays a message.
    pub fn check(&self, signed: &Signed<'_>, now: u64) -> Result<(), ApiError> {
        let nonce: [u8; NONCE_BYTES] = decode_b64url(signed.nonce)
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| forged("malformed nonce"))?;
        let forget_at = signed.ts + MAX_SKEW + 1;
        let mut n = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        // Arrival order is close to timestamp order; an entry stuck behind a
        // later one is forgotten a little late, never early.
        while let Some(&(at, old)) = n.order.front() {
            if at > now {
                break;
            }
            n.order.pop_front();
            if n.seen.get(&old) == Some(&at) {
                n.seen.remove(&old);
            }
        }
        if n.seen.contains_key(&nonce) {
            return Err(ApiError::new(
                401,
                Errno::NodeReplay,
                "node request replayed: this nonce was already used",
            ));
        }
        if n.seen.len() >= self.capacity {
            let mut e = ApiError::new(
                503,
                Errno::NodeReplayWindowFull,
                "too many node requests in the replay window; retry later",
            );
            e.retry_after = Some(MAX_SKEW);
            return Err(e);
        }
        n.seen.insert(nonce, forget_at);
        n.order.push_back((forget_at, nonce));
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.inner.lock().map(|n| n.seen.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000;

    fn key() -> NodeKey {
        NodeKey::derive(&[9; 32])
    }

    fn accept(
        window: &ReplayWindow,
        auth: &str,
        path: &str,
        body: &[u8],
        now: u64,
    ) -> Result<(), u16> {
        let signed = parse(Some(auth), now).map_err(|e| e.errno.code())?;
        signed
            .verify(&[key()], "POST", path, body)
            .map_err(|e| e.errno.code())?;
        window.check(&signed, now).map_err(|e| e.errno.code())
    }

    #[test]
    fn a_signed_request_passes_once() {
        let w = ReplayWindow::new(10);
        let auth = key().sign("POST", "/_herald/node/wake", NOW, b"{}");
        assert!(auth.starts_with("HeraldNode ts=1800000000, nonce="));
        assert_eq!(accept(&w, &auth, "/_herald/node/wake", b"{}", NOW), Ok(()));
        assert_eq!(
            accept(&w, &auth, "/_herald/node/wake", b"{}", NOW + 1),
            Err(132)
        );
        // A fresh nonce passes.
        let again = key().sign("POST", "/_herald/node/wake", NOW, b"{}");
        assert_eq!(accept(&w, &again, "/_herald/node/wake", b"{}", NOW), Ok(()));
    }

    #[test]
    fn any_change_breaks_the_signature() {
        let w = ReplayWindow::new(10);
        let auth = key().sign("POST", "/_herald/node/wake", NOW, b"{\"uaid\":\"a\"}");
        assert_eq!(
            accept(&w, &auth, "/_herald/node/evict", b"{\"uaid\":\"a\"}", NOW),
            Err(130)
        );
        assert_eq!(
            accept(&w, &auth, "/_herald/node/wake", b"{\"uaid\":\"b\"}", NOW),
            Err(130)
        );
        let other = NodeKey::derive(&[8; 32]).sign("POST", "/_herald/node/wake", NOW, b"{}");
        assert_eq!(
            accept(&w, &other, "/_herald/node/wake", b"{}", NOW),
            Err(130)
        );
        let moved = auth.replace("ts=1800000000", "ts=1800000001");
        assert_eq!(
            accept(&w, &moved, "/_herald/node/wake", b"{\"uaid\":\"a\"}", NOW),
            Err(130)
        );
        assert!(w.is_empty(), "refused requests leave no nonce behind");
    }

    #[test]
    fn any_endpoint_key_is_accepted_for_a_rolling_rotation() {
        let (old, new) = (NodeKey::derive(&[9; 32]), NodeKey::derive(&[10; 32]));
        let body = b"{}";
        for signer in [&old, &new] {
            let auth = signer.sign("POST", "/p", NOW, body);
            let signed = parse(Some(&auth), NOW).unwrap();
            assert!(signed
                .verify(&[new.clone(), old.clone()], "POST", "/p", body)
                .is_ok());
        }
        let auth = new.sign("POST", "/p", NOW, body);
        let signed = parse(Some(&auth), NOW).unwrap();
        assert_eq!(
            signed
                .verify(&[old], "POST", "/p", body)
                .unwrap_err()
                .errno
                .code(),
            130
        );
    }

    #[test]
    fn malformed_and_stale_headers_are_refused() {
        let w = ReplayWindow::new(10);
        for bad in [
            "",
            "Bearer abc",
            "HeraldNode",
            "HeraldNode ts=1, nonce=AAAA, sig=AAAA",
            "HeraldNode ts=x, nonce=AAAAAAAAAAAAAAAAAAAAAA, sig=AAAA",
        ] {
            assert_eq!(accept(&w, bad, "/p", b"", NOW), Err(130), "{bad}");
        }
        let old = key().sign("POST", "/p", NOW - MAX_SKEW - 1, b"");
        assert_eq!(accept(&w, &old, "/p", b"", NOW), Err(131));
        let ahead = key().sign("POST", "/p", NOW + MAX_SKEW + 1, b"");
        assert_eq!(accept(&w, &ahead, "/p", b"", NOW), Err(131));
        let edge = key().sign("POST", "/p", NOW - MAX_SKEW, b"");
        assert_eq!(accept(&w, &edge, "/p", b"", NOW), Ok(()));
    }

    #[test]
    fn nodes_whose_clocks_are_off_agree_in_the_shared_clock() {
        use crate::store::SharedClock;
        // Redis says NOW; the sender's clock is 30 s ahead, the receiver's
        // 30 s behind. Each knows its offset from Redis.
        let (sender, receiver) = (SharedClock::default(), SharedClock::default());
        sender.set_offset(SharedClock::offset_from_readings(NOW, NOW + 30));
        receiver.set_offset(SharedClock::offset_from_readings(NOW, NOW - 30));
        let (sender_now, receiver_now) = (NOW + 30, NOW - 30);
        let w = ReplayWindow::new(10);
        let own = key().sign("POST", "/p", sender_now, b"");
        assert_eq!(accept(&w, &own, "/p", b"", receiver_now), Err(131));
        let shared = key().sign("POST", "/p", sender.to_shared(sender_now), b"");
        assert_eq!(
            accept(&w, &shared, "/p", b"", receiver.to_shared(receiver_now)),
            Ok(())
        );
        // Replays are still refused, and stale ones still age out, in the
        // shared clock.
        let again = receiver.to_shared(receiver_now + 1);
        assert_eq!(accept(&w, &shared, "/p", b"", again), Err(132));
        let late = receiver.to_shared(receiver_now + MAX_SKEW + 1);
        assert_eq!(accept(&w, &shared, "/p", b"", late), Err(131));
    }

    #[test]
    fn the_window_forgets_old_nonces_and_stays_bounded() {
        let w = ReplayWindow::new(3);
        for _ in 0..3 {
            let a = key().sign("POST", "/p", NOW, b"");
            assert_eq!(accept(&w, &a, "/p", b"", NOW), Ok(()));
        }
        // Full of live nonces: refused, not forgotten early.
        let a = key().sign("POST", "/p", NOW, b"");
        assert_eq!(accept(&w, &a, "/p", b"", NOW), Err(133));
        assert_eq!(w.len(), 3);
        // Once their timestamps are out of the skew window they go.
        let later = NOW + MAX_SKEW + 1;
        let b = key().sign("POST", "/p", later, b"");
        assert_eq!(accept(&w, &b, "/p", b"", later), Ok(()));
        assert_eq!(w.len(), 1);
    }
}
