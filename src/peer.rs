//! Who is on the other end of a request: the TCP peer, and the client
//! behind it when the peer is a trusted reverse proxy.

use crate::config::Settings;
use crate::forwarded::{self, Hop};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

/// The TCP peer of a request, put in its extensions by the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer(pub SocketAddr);

/// The client's address: the TCP peer, unless the peer is one of
/// `trusted_proxies`; then what its `Forwarded` header says (or, without
/// one, its `X-Forwarded-For`), read right to left past the trusted
/// proxies. From any other peer these headers are ignored: anyone can
/// write them.
pub fn client_addr(settings: &Settings, parts: &http::request::Parts) -> IpAddr {
    let peer = parts
        .extensions
        .get::<Peer>()
        .map(|p| p.0.ip())
        .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    let trusted = &settings.trusted_proxies;
    if !trusted.iter().any(|c| c.contains(peer)) {
        return peer;
    }
    let values = |name| {
        parts
            .headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
    };
    let mut hops: Vec<Hop> = forwarded::forwarded_for(values("forwarded"));
    if hops.is_empty() {
        hops = forwarded::x_forwarded_for(values("x-forwarded-for"));
    }
    forwarded::client(peer, &hops, trusted)
}
