//! Which slots a key's bucket occupies: a keyed hash, and what a sender
//! without VAPID is known by (its address; for IPv6, its /64, since one
//! host commonly holds a whole /64 and could otherwise hop addresses).

use super::table::{Slots, SLOTS};
use sha2::{Digest, Sha256};
use std::net::IpAddr;

/// SHA-256 under a secret prefix. Secret, so an attacker cannot pick keys
/// that land on a victim's slots; the same on every node of a cluster
/// (derived from the shared `endpoint_keys`), so nodes can tell each other
/// their usage by slot.
#[derive(Clone)]
pub struct Hasher {
    keyed: Sha256,
}

impl Hasher {
    pub fn new(secret: [u8; 32]) -> Hasher {
        Hasher {
            keyed: Sha256::new_with_prefix(secret),
        }
    }

    /// From the first endpoint key (the nodes of a cluster share them), or
    /// a random secret for a node that generated its own keys (it has no
    /// peers to agree with).
    pub fn from_endpoint_keys(keys: &[[u8; 32]]) -> Hasher {
        let secret = match keys.first() {
            Some(k) => {
                let mut h = Sha256::new_with_prefix(b"herald quota slots\0");
                h.update(k);
                h.finalize().into()
            }
            None => rand::random(),
        };
        Hasher::new(secret)
    }

    /// The two slots of the key made of `parts` in table `table`.
    pub fn slots(&self, table: u8, parts: &[&[u8]]) -> Slots {
        let mut h = self.keyed.clone();
        h.update([table]);
        for p in parts {
            h.update(p);
        }
        let d = h.finalize();
        let mask = (SLOTS - 1) as u32;
        let word = |i: usize| u32::from_le_bytes([d[i], d[i + 1], d[i + 2], d[i + 3]]) & mask;
        Slots([word(0), word(4)])
    }
}

/// The bytes a client address is counted by: an IPv4 address (an
/// IPv4-mapped IPv6 one too) whole, an IPv6 address by its /64.
pub fn address_key(ip: IpAddr) -> [u8; 9] {
    let mut out = [0u8; 9];
    match ip {
        IpAddr::V6(v6) if v6.to_ipv4_mapped().is_none() => {
            out[0] = 6;
            out[1..9].copy_from_slice(&v6.octets()[..8]);
        }
        other => {
            let v4 = match other {
                IpAddr::V4(v4) => v4,
                IpAddr::V6(v6) => v6.to_ipv4_mapped().expect("checked above"),
            };
            out[0] = 4;
            out[1..5].copy_from_slice(&v4.octets());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn ipv6_counts_by_64_and_mapped_ipv4_as_ipv4() {
        assert_eq!(
            address_key(ip("2001:db8:1:2:aaaa::1")),
            address_key(ip("2001:db8:1:2:ffff::9"))
        );
        assert_ne!(
            address_key(ip("2001:db8:1:2::1")),
            address_key(ip("2001:db8:1:3::1"))
        );
        assert_eq!(
            address_key(ip("::ffff:192.0.2.1")),
            address_key(ip("192.0.2.1"))
        );
        assert_ne!(address_key(ip("192.0.2.1")), address_key(ip("192.0.2.2")));
    }

    #[test]
    fn slots_depend_on_the_secret_the_table_and_the_key() {
        let (a, b) = (Hasher::new([1; 32]), Hasher::new([2; 32]));
        let s = a.slots(0, &[b"key"]);
        assert_eq!(s, a.clone().slots(0, &[b"key"]));
        assert_ne!(s, b.slots(0, &[b"key"]));
        assert_ne!(s, a.slots(1, &[b"key"]));
        assert_ne!(s, a.slots(0, &[b"kez"]));
        assert!(s.0.iter().all(|&i| (i as usize) < SLOTS));
        // Nodes sharing endpoint keys agree; others do not.
        let k = [[9u8; 32]];
        assert_eq!(
            Hasher::from_endpoint_keys(&k).slots(0, &[b"x"]),
            Hasher::from_endpoint_keys(&k).slots(0, &[b"x"])
        );
        assert_ne!(
            Hasher::from_endpoint_keys(&[]).slots(0, &[b"x"]),
            Hasher::from_endpoint_keys(&[]).slots(0, &[b"x"])
        );
    }
}
