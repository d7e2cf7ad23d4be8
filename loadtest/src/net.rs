//! Sockets: the loopback-only guard, source-address spreading and the
//! open-file limit. Everything the generator sends goes through here, so the
//! loopback rule is enforced in one place.

use anyhow::{anyhow, bail, Context, Result};
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use tokio::net::{TcpSocket, TcpStream};

/// Resolves `host:port` and insists that every address is loopback. A load
/// generator pointed at the wrong host is a denial-of-service tool, so a name
/// that resolves anywhere else is refused outright rather than filtered.
pub async fn loopback_addr(host: &str, port: u16) -> Result<SocketAddr> {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = bare.parse::<IpAddr>() {
        if !ip.is_loopback() {
            bail!("refusing to send traffic to {ip}: only loopback addresses are allowed");
        }
        return Ok(SocketAddr::new(ip, port));
    }
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((bare, port))
        .await
        .with_context(|| format!("resolving {bare}"))?
        .collect();
    if addrs.is_empty() {
        bail!("{bare} resolved to no address");
    }
    if let Some(bad) = addrs.iter().find(|a| !a.ip().is_loopback()) {
        bail!(
            "refusing to send traffic to {bare}: it resolves to {} which is not loopback",
            bad.ip()
        );
    }
    // Prefer IPv4: only 127.0.0.0/8 offers many source addresses.
    Ok(addrs
        .iter()
        .find(|a| a.is_ipv4())
        .copied()
        .unwrap_or(addrs[0]))
}

/// Host and port of a `ws://`, `http://` URI; TLS schemes are refused since
/// every target is on this machine and TLS would only measure the handshake.
pub fn host_port(uri: &http::Uri) -> Result<(String, u16)> {
    let default_port = match uri.scheme_str() {
        Some("ws") | Some("http") => 80,
        Some(s @ ("wss" | "https")) => {
            bail!("{s}:// is not supported: the load generator speaks plain TCP on loopback")
        }
        Some(s) => bail!("unsupported URL scheme {s}:// in {uri}"),
        None => bail!("URL {uri} has no scheme"),
    };
    let host = uri.host().ok_or_else(|| anyhow!("URL {uri} has no host"))?;
    Ok((host.to_string(), uri.port_u16().unwrap_or(default_port)))
}

/// Source addresses to spread client sockets over. Linux picks ephemeral
/// ports per (source, destination) pair only when the socket is bound with
/// IP_BIND_ADDRESS_NO_PORT, so each extra 127.0.0.x source adds a full port
/// range towards the same server address.
pub fn source_addrs(target: SocketAddr, count: usize) -> Vec<Option<IpAddr>> {
    match target.ip() {
        IpAddr::V4(v4) if v4.is_loopback() && count > 1 => (0..count.min(250))
            .map(|i| Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1 + i as u8))))
            .collect(),
        // ::1 is the only IPv6 loopback address; nothing to spread over.
        _ => vec![None],
    }
}

/// Number of local ports the kernel hands out per source/destination pair.
pub fn ephemeral_port_count() -> usize {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().map(|p| p.parse::<usize>().ok());
            match (it.next().flatten(), it.next().flatten()) {
                (Some(lo), Some(hi)) if hi >= lo => Some(hi - lo + 1),
                _ => None,
            }
        })
        .unwrap_or(28_232)
}

/// Source addresses `connections` sockets towards one server address need.
/// Only half of each address's port range counts: Linux's connect() tries
/// the ports of one parity first (leaving the other half to bind()) and
/// scans the whole first half before it takes one from the second, so past
/// half the range every connect pays that scan. In the idle climb to 20,000
/// from one address the connect rate fell from 3,900/s to 250-900/s at
/// 14,000 connections, half of 28,232 ports; over two it stayed at 3,000-
/// 4,900/s to the top. 10 % of the half stays spare for other traffic.
pub fn source_addrs_needed(connections: usize) -> usize {
    let usable = (ephemeral_port_count() / 2 * 9 / 10).max(1);
    connections.div_ceil(usable).clamp(1, 250)
}

/// Opens a TCP connection, optionally from a chosen loopback source address.
pub async fn tcp_connect(dst: SocketAddr, src: Option<IpAddr>) -> io::Result<TcpStream> {
    debug_assert!(dst.ip().is_loopback());
    let sock = if dst.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(src) = src {
        bind_address_no_port(&sock)?;
        sock.bind(SocketAddr::new(src, 0))?;
    }
    let stream = sock.connect(dst).await?;
    // Push frames are small and latency is what we measure.
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Defers the choice of local port from bind() to connect(), where the kernel
/// knows the destination and can reuse a port already used towards others.
fn bind_address_no_port(sock: &TcpSocket) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let one: libc::c_int = 1;
    // SAFETY: plain setsockopt on a socket we own, with a correctly sized int.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            &one as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Open-file limits of this process after raising the soft limit to the hard
/// one: every client socket is a file, and the default soft limit (often
/// 1024) would otherwise be the first thing a large run measures.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub struct FileLimit {
    pub soft: u64,
    pub hard: u64,
}

pub fn raise_nofile_limit() -> FileLimit {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit write to / read from a valid rlimit struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return FileLimit { soft: 0, hard: 0 };
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim.rlim_cur = lim.rlim_max;
            }
        }
    }
    FileLimit {
        soft: lim.rlim_cur,
        hard: lim.rlim_max,
    }
}

/// Short name for an I/O error, used as a key when counting failures, so a
/// run reports "EMFILE" rather than a sentence per occurrence.
pub fn io_error_name(e: &io::Error) -> String {
    if let Some(code) = e.raw_os_error() {
        let name = match code {
            libc::EMFILE => "EMFILE",
            libc::ENFILE => "ENFILE",
            libc::EADDRNOTAVAIL => "EADDRNOTAVAIL",
            libc::EADDRINUSE => "EADDRINUSE",
            libc::ECONNREFUSED => "ECONNREFUSED",
            libc::ECONNRESET => "ECONNRESET",
            libc::ECONNABORTED => "ECONNABORTED",
            libc::ETIMEDOUT => "ETIMEDOUT",
            libc::EPIPE => "EPIPE",
            libc::ENOBUFS => "ENOBUFS",
            libc::ENOMEM => "ENOMEM",
            libc::EAGAIN => "EAGAIN",
            libc::ENETUNREACH => "ENETUNREACH",
            _ => return format!("errno {code}"),
        };
        return name.to_string();
    }
    format!("{:?}", e.kind())
}

/// True when the error means this process, not the server, ran out of a
/// resource (files or ports).
pub fn is_client_resource_error(name: &str) -> bool {
    matches!(
        name,
        "EMFILE" | "ENFILE" | "EADDRNOTAVAIL" | "EADDRINUSE" | "ENOBUFS" | "ENOMEM"
    )
}

/// The kernel's count of connections dropped because a listening socket's
/// accept queue was full (`TcpExtListenOverflows`, what `nstat` shows), for
/// the whole machine: other listeners' overflows count too, so a run reads
/// it before and after. None where /proc/net/netstat is unreadable.
pub fn listen_overflows() -> Option<u64> {
    parse_listen_overflows(&std::fs::read_to_string("/proc/net/netstat").ok()?)
}

/// /proc/net/netstat pairs a line of names with a line of values per prefix.
fn parse_listen_overflows(text: &str) -> Option<u64> {
    let mut lines = text.lines();
    while let (Some(names), Some(values)) = (lines.next(), lines.next()) {
        if !names.starts_with("TcpExt:") {
            continue;
        }
        let at = names
            .split_whitespace()
            .position(|n| n == "ListenOverflows")?;
        return values.split_whitespace().nth(at)?.parse().ok();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn refuses_non_loopback() {
        assert!(loopback_addr("10.0.0.1", 80).await.is_err());
        assert!(loopback_addr("8.8.8.8", 80).await.is_err());
        assert!(loopback_addr("127.0.0.1", 80).await.is_ok());
        assert!(loopback_addr("[::1]", 80).await.is_ok());
        assert!(loopback_addr("localhost", 80)
            .await
            .unwrap()
            .ip()
            .is_loopback());
    }

    #[test]
    fn schemes() {
        let u: http::Uri = "ws://127.0.0.1:9/".parse().unwrap();
        assert_eq!(host_port(&u).unwrap(), ("127.0.0.1".into(), 9));
        let u: http::Uri = "http://localhost/x".parse().unwrap();
        assert_eq!(host_port(&u).unwrap(), ("localhost".into(), 80));
        let u: http::Uri = "wss://127.0.0.1/".parse().unwrap();
        assert!(host_port(&u).is_err());
    }

    #[test]
    fn spreads_over_ipv4_loopback_only() {
        let v4: SocketAddr = "127.0.0.1:80".parse().unwrap();
        let v6: SocketAddr = "[::1]:80".parse().unwrap();
        let s = source_addrs(v4, 3);
        assert_eq!(s.len(), 3);
        assert_eq!(s[2], Some("127.0.0.3".parse().unwrap()));
        assert_eq!(source_addrs(v4, 1), vec![None]);
        assert_eq!(source_addrs(v6, 5), vec![None]);
    }

    #[test]
    fn limit_is_raised_to_hard() {
        let l = raise_nofile_limit();
        assert_eq!(l.soft, l.hard);
    }
    #[test]
    fn reads_listen_overflows_from_netstat() {
        let text = "TcpExt: SyncookiesSent ListenOverflows ListenDrops\n\
                    TcpExt: 3 473 480\n\
                    IpExt: InNoRoutes\nIpExt: 0\n";
        assert_eq!(parse_listen_overflows(text), Some(473));
        assert_eq!(parse_listen_overflows("IpExt: A\nIpExt: 1\n"), None);
    }
}
