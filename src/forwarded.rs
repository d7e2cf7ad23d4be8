//! Who a reverse proxy says the client is: `Forwarded` (RFC 7239, its
//! `for=` parameters) and `X-Forwarded-For`. Pure parsing; `peer` decides
//! when to believe it.
//!
//! Each proxy appends the address it received the request from, so the
//! list reads client first, nearest proxy last. Anything left of the
//! first proxy Herald trusts was written by whoever it did not trust —
//! possibly the client itself, prepending a lie — so the client is the
//! right-most address that is not a trusted proxy.

use crate::cidr::Cidr;
use std::net::IpAddr;

/// One hop of the list: an address, or something that is not one
/// (`unknown`, an obfuscated `_name`, garbage).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hop {
    Addr(IpAddr),
    Opaque,
}

/// The client behind `peer` (a trusted proxy): walking from the right, the
/// first hop that is not a trusted proxy. A hop that is not an address
/// cannot be told apart from its neighbours, so the proxy that reported it
/// stands for it (conservative: those clients share that proxy's quota).
/// If every hop is a trusted proxy, the left-most one is the client.
pub fn client(peer: IpAddr, hops: &[Hop], trusted: &[Cidr]) -> IpAddr {
    let is_trusted = |ip: IpAddr| trusted.iter().any(|c| c.contains(ip));
    let mut reporter = peer;
    for hop in hops.iter().rev() {
        match *hop {
            Hop::Addr(ip) if is_trusted(ip) => reporter = ip,
            Hop::Addr(ip) => return ip,
            Hop::Opaque => return reporter,
        }
    }
    reporter
}

/// The `for=` hops of `Forwarded` header values, in order (several header
/// lines are one list, as if joined by commas). An element without `for`
/// is an opaque hop.
pub fn forwarded_for<'a>(values: impl IntoIterator<Item = &'a str>) -> Vec<Hop> {
    let mut hops = Vec::new();
    for value in values {
        for element in split_outside_quotes(value, ',') {
            if element.trim().is_empty() {
                continue;
            }
            let node = split_outside_quotes(element, ';')
                .into_iter()
                .find_map(|pair| {
                    let (name, v) = pair.split_once('=')?;
                    name.trim()
                        .eq_ignore_ascii_case("for")
                        .then(|| unquote(v.trim()))
                });
            hops.push(node.map_or(Hop::Opaque, |n| parse_node(&n)));
        }
    }
    hops
}

/// The hops of `X-Forwarded-For` header values, in order.
pub fn x_forwarded_for<'a>(values: impl IntoIterator<Item = &'a str>) -> Vec<Hop> {
    values
        .into_iter()
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|h| !h.is_empty())
        .map(parse_node)
        .collect()
}

/// RFC 7239 §6 node: `192.0.2.43`, `192.0.2.43:47011`, `[2001:db8::1]`,
/// `[2001:db8::1]:4711`; X-Forwarded-For also carries bare IPv6.
fn parse_node(node: &str) -> Hop {
    let node = node.trim();
    let addr = if let Some(rest) = node.strip_prefix('[') {
        rest.split_once(']').map(|(a, _)| a)
    } else if node.matches(':').count() == 1 {
        node.split_once(':').map(|(a, _)| a)
    } else {
        Some(node)
    };
    match addr.and_then(|a| a.parse::<IpAddr>().ok()) {
        Some(ip) => Hop::Addr(ip),
        None => Hop::Opaque,
    }
}

/// Splits on `sep` except inside a quoted string (which may hold it).
fn split_outside_quotes(s: &str, sep: char) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut start, mut quoted, mut escaped) = (0, false, false);
    for (i, c) in s.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            c if c == sep && !quoted => {
                parts.push(&s[start..i]);
                start = i + c.len_utf8();
            }
            _ => {}
        }
    }
    parts.push(&s[start..]);
    parts
}

/// A token as is; a quoted string without its quotes and escapes.
fn unquote(v: &str) -> String {
    let Some(inner) = v.strip_prefix('"').and_then(|r| r.strip_suffix('"')) else {
        return v.to_string();
    };
    let mut out = String::with_capacity(inner.len());
    let mut escaped = false;
    for c in inner.chars() {
        if escaped || c != '\\' {
            out.push(c);
            escaped = false;
        } else {
            escaped = true;
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

    fn a(s: &str) -> Hop {
        Hop::Addr(ip(s))
    }

    #[test]
    fn rfc_7239_examples_are_read() {
        assert_eq!(
            forwarded_for([r#"for="_gazonk""#]),
            vec![Hop::Opaque],
            "obfuscated"
        );
        assert_eq!(
            forwarded_for([r#"For="[2001:db8:cafe::17]:4711""#]),
            vec![a("2001:db8:cafe::17")]
        );
        assert_eq!(
            forwarded_for(["for=192.0.2.60;proto=http;by=203.0.113.43"]),
            vec![a("192.0.2.60")]
        );
        assert_eq!(
            forwarded_for(["for=192.0.2.43, for=198.51.100.17"]),
            vec![a("192.0.2.43"), a("198.51.100.17")]
        );
        assert_eq!(
            forwarded_for(["for=192.0.2.43:47011", "for=unknown", "proto=https"]),
            vec![a("192.0.2.43"), Hop::Opaque, Hop::Opaque]
        );
        // A quoted comma or semicolon does not split.
        assert_eq!(
            forwarded_for([r#"by="a,b;c";for="198.51.100.1", for=10.0.0.1"#]),
            vec![a("198.51.100.1"), a("10.0.0.1")]
        );
        assert_eq!(forwarded_for(["for=\"[::1\""]), vec![Hop::Opaque]);
    }

    #[test]
    fn x_forwarded_for_takes_ports_brackets_and_bare_ipv6() {
        assert_eq!(
            x_forwarded_for([
                "203.0.113.5, 10.0.0.2:8080",
                "2001:db8::7 , [2001:db8::8]:443"
            ]),
            vec![
                a("203.0.113.5"),
                a("10.0.0.2"),
                a("2001:db8::7"),
                a("2001:db8::8")
            ]
        );
        assert_eq!(x_forwarded_for(["nonsense, ,"]), vec![Hop::Opaque]);
    }

    #[test]
    fn the_client_is_the_right_most_untrusted_hop() {
        let trusted = [Cidr::parse("10.0.0.0/8").unwrap()];
        let peer = ip("10.0.0.1");
        // The client prepended a lie; the proxy appended the truth.
        let hops = [a("1.1.1.1"), a("203.0.113.9"), a("10.0.0.5")];
        assert_eq!(client(peer, &hops, &trusted), ip("203.0.113.9"));
        // Only trusted proxies: the left-most is where it came from.
        assert_eq!(
            client(peer, &[a("10.0.0.7"), a("10.0.0.5")], &trusted),
            ip("10.0.0.7")
        );
        assert_eq!(client(peer, &[], &trusted), peer);
        // Unknown beyond a trusted proxy: that proxy stands for it.
        assert_eq!(
            client(
                peer,
                &[a("203.0.113.9"), Hop::Opaque, a("10.0.0.5")],
                &trusted
            ),
            ip("10.0.0.5")
        );
        assert_eq!(client(peer, &[Hop::Opaque], &trusted), peer);
    }
}
