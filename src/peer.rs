//! Who is on the other end of a request: the TCP peer, and the client
//! behind it when the peer is a trusted reverse proxy.

use crate::config::Settings;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

/// The TCP peer of a request, put in its extensions by the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer(pub SocketAddr);

/// The client's address. SEAM: issue 24 believes `Forwarded` and
/// `X-Forwarded-For` from `trusted_proxies` here.
pub fn client_addr(_settings: &Settings, parts: &http::request::Parts) -> IpAddr {
    parts
        .extensions
        .get::<Peer>()
        .map(|p| p.0.ip())
        .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED))
}
