//! The application-server side: POSTing encrypted messages to push endpoints
//! over keep-alive HTTP/1.1 connections.

use crate::crypto::Vapid;
use crate::net;
use anyhow::{anyhow, Context, Result};
use bytes::Bytes;
use herald_client::http::{plain_http, PlainClient, PlainPool};
use http::{HeaderValue, Method, Request, Uri};
use http_body_util::{BodyExt, Full, Limited};
use std::net::SocketAddr;
use std::time::Duration;

pub type HttpClient = PlainClient<Full<Bytes>>;

/// One pooled client for all senders: each sender awaits its response before
/// its next request, so the pool settles at one connection per sender.
pub fn client(senders: usize) -> HttpClient {
    plain_http(PlainPool {
        connect_timeout: Duration::from_secs(10),
        max_idle_per_host: Some(senders.max(1)),
        idle_timeout: Some(Duration::from_secs(60)),
    })
}

/// A push endpoint ready to POST to: each URI names a checked loopback
/// address, so the HTTP client never resolves a name itself; the original
/// authority travels in the Host header.
#[derive(Clone, Debug)]
pub struct Endpoint {
    /// The endpoint as handed out, or (with push nodes) its path on each
    /// node in turn.
    pub uris: Vec<Uri>,
    pub host: HeaderValue,
    /// Index into `Origins`, which selects the VAPID audience.
    pub origin: usize,
}

impl Endpoint {
    /// Where a sender's `k`th POST goes: round-robin over the push nodes.
    pub fn uri(&self, k: usize) -> &Uri {
        &self.uris[k % self.uris.len()]
    }
}

/// A node senders POST to in place of the endpoint's own host.
#[derive(Clone, Debug)]
pub struct PushNode {
    pub base: String,
    pub addr: SocketAddr,
}

/// Distinct origins seen in endpoint URLs (each the VAPID audience of its
/// endpoints), and the push nodes, if any, that POSTs are spread over.
#[derive(Default)]
pub struct Origins {
    pub list: Vec<(String, Option<SocketAddr>)>,
    pub push: Vec<PushNode>,
}

/// Checks a --push-urls entry: plain http://host[:port] on loopback, no
/// path (the endpoint's path is kept).
pub async fn push_node(base: &str) -> Result<PushNode> {
    let uri: Uri = base
        .trim()
        .parse()
        .with_context(|| format!("invalid push URL {base:?}"))?;
    let (host, port) = net::host_port(&uri)?;
    if uri.scheme_str() != Some("http") {
        anyhow::bail!("push URL {base} is not http://");
    }
    if uri.path_and_query().is_some_and(|p| p.as_str() != "/") {
        anyhow::bail!(
            "push URL {base} has a path: give scheme://host:port only (each endpoint keeps its own path)"
        );
    }
    let addr = net::loopback_addr(&host, port).await?;
    Ok(PushNode {
        base: format!("http://{}", uri.authority().expect("host_port checked it")),
        addr,
    })
}

impl Origins {
    /// Origins for endpoints POSTed to as handed out (`bases` empty) or
    /// spread over the nodes at `bases`.
    pub async fn with_push_urls(bases: &[String]) -> Result<Origins> {
        let mut push = Vec::with_capacity(bases.len());
        for b in bases {
            push.push(push_node(b).await?);
        }
        Ok(Origins {
            list: Vec::new(),
            push,
        })
    }

    pub async fn endpoint(&mut self, url: &str) -> Result<Endpoint> {
        let uri: Uri = url
            .parse()
            .with_context(|| format!("invalid push endpoint {url:?}"))?;
        let authority = uri
            .authority()
            .ok_or_else(|| anyhow!("push endpoint {url} has no authority"))?;
        let pq = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        if !self.push.is_empty() {
            // Only the path is used: the POSTs go to the push nodes, so
            // the endpoint's own host is never contacted (it may be a
            // public name in front of the nodes).
            let default_port = match uri.scheme_str() {
                Some("http") => 80,
                Some("https") => 443,
                _ => anyhow::bail!("push endpoint {url} is not http:// or https://"),
            };
            let scheme = uri.scheme_str().unwrap_or("http");
            let host = uri.host().unwrap_or_default();
            let origin = match uri.port_u16() {
                Some(p) if p != default_port => format!("{scheme}://{host}:{p}"),
                _ => format!("{scheme}://{host}"),
            };
            let idx = self.origin_index(origin, None);
            let uris = self
                .push
                .iter()
                .map(|n| rewrite(n.addr, pq))
                .collect::<Result<_>>()?;
            return Ok(Endpoint {
                uris,
                host: HeaderValue::from_str(authority.as_str())?,
                origin: idx,
            });
        }
        let (host, port) = net::host_port(&uri)?;
        if uri.scheme_str() != Some("http") {
            anyhow::bail!("push endpoint {url} is not http://");
        }
        // The VAPID audience is the origin: scheme://host[:port], no default port.
        let origin = if port == 80 {
            format!("http://{host}")
        } else {
            format!("http://{host}:{port}")
        };
        let addr = match self.list.iter().find(|(o, _)| *o == origin) {
            Some((_, Some(a))) => *a,
            _ => net::loopback_addr(&host, port).await?,
        };
        let idx = self.origin_index(origin, Some(addr));
        Ok(Endpoint {
            uris: vec![rewrite(addr, pq)?],
            host: HeaderValue::from_str(authority.as_str())?,
            origin: idx,
        })
    }

    fn origin_index(&mut self, origin: String, addr: Option<SocketAddr>) -> usize {
        match self.list.iter().position(|(o, _)| *o == origin) {
            Some(i) => i,
            None => {
                self.list.push((origin, addr));
                self.list.len() - 1
            }
        }
    }
}

/// What one application server sends: the channels it owns and its
/// Authorization header per origin index.
#[derive(Clone)]
pub struct SenderPlan {
    pub channels: Vec<u32>,
    pub auth: Vec<HeaderValue>,
}

/// One plan per VAPID key, the channels that have an endpoint (`present`,
/// by channel index) dealt round-robin over them.
pub fn plan_senders(
    vapids: &[Vapid],
    origins: &Origins,
    present: impl IntoIterator<Item = bool>,
) -> Result<Vec<SenderPlan>> {
    let mut plans = vapids
        .iter()
        .map(|v| {
            let auth = origins
                .list
                .iter()
                .map(|(origin, _)| v.authorization(origin))
                .collect::<Result<_>>()?;
            Ok(SenderPlan {
                channels: Vec::new(),
                auth,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let senders = plans.len();
    for (c, here) in present.into_iter().enumerate() {
        if here && senders > 0 {
            plans[c % senders].channels.push(c as u32);
        }
    }
    Ok(plans)
}

/// The endpoint's path (and query) on another node: only
/// scheme://host:port change.
pub fn rewrite(addr: SocketAddr, path_and_query: &str) -> Result<Uri> {
    let pq = if path_and_query.starts_with('/') {
        path_and_query.to_string()
    } else {
        format!("/{path_and_query}")
    };
    Ok(format!("http://{addr}{pq}").parse()?)
}

/// What became of one POST: the HTTP status, or why there was none.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Status(u16),
    Transport(String),
}

impl Outcome {
    pub fn key(&self) -> String {
        match self {
            Outcome::Status(s) => format!("status {s}"),
            Outcome::Transport(t) => format!("transport: {t}"),
        }
    }
}

/// POSTs one message to `ep`; `k` (a sender's count of its POSTs) picks
/// the push node.
pub async fn post(
    client: &HttpClient,
    ep: &Endpoint,
    k: usize,
    authorization: &HeaderValue,
    body: Bytes,
    ttl: u32,
    timeout: Duration,
) -> Outcome {
    let options = PostOptions {
        ttl,
        receipt: false,
    };
    post_with(client, ep, k, authorization, body, options, timeout).await
}

/// Per-message request options.
#[derive(Debug, Clone, Copy)]
pub struct PostOptions {
    pub ttl: u32,
    /// Ask for a delivery receipt (`Prefer: respond-async`); the service
    /// answers 202 instead of 201.
    pub receipt: bool,
}

pub async fn post_with(
    client: &HttpClient,
    ep: &Endpoint,
    k: usize,
    authorization: &HeaderValue,
    body: Bytes,
    options: PostOptions,
    timeout: Duration,
) -> Outcome {
    let auth = Some(authorization);
    match post_reply(client, ep, k, auth, body, options, timeout).await {
        Ok(r) => Outcome::Status(r.status),
        Err(e) => Outcome::Transport(e),
    }
}

/// What the service answered to one POST, beyond its status: the `errno`
/// of an error body and whether a `Retry-After` came with it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reply {
    pub status: u16,
    pub errno: Option<u64>,
    pub retry_after: bool,
}

impl Reply {
    /// "201", "429 errno 125", "503": a refusal named as a client author
    /// would look it up in proto-docs/errors.md.
    pub fn key(&self) -> String {
        match self.errno {
            Some(e) => format!("{} errno {e}", self.status),
            None => self.status.to_string(),
        }
    }
}

/// The `errno` of a JSON error body, if it is one.
pub fn errno_of(body: &[u8]) -> Option<u64> {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()?
        .get("errno")?
        .as_u64()
}

/// POSTs one message; without `authorization` it goes unsigned, as an
/// application server without VAPID sends. Err names a transport failure.
pub async fn post_reply(
    client: &HttpClient,
    ep: &Endpoint,
    k: usize,
    authorization: Option<&HeaderValue>,
    body: Bytes,
    options: PostOptions,
    timeout: Duration,
) -> Result<Reply, String> {
    let len = body.len();
    let mut req = Request::builder()
        .method(Method::POST)
        .uri(ep.uri(k).clone())
        .header(http::header::HOST, ep.host.clone())
        .header("TTL", options.ttl)
        .header(http::header::CONTENT_ENCODING, "aes128gcm")
        .header(http::header::CONTENT_TYPE, "application/octet-stream")
        .header(http::header::CONTENT_LENGTH, len);
    if let Some(a) = authorization {
        req = req.header(http::header::AUTHORIZATION, a.clone());
    }
    if options.receipt {
        req = req.header("prefer", "respond-async");
    }
    let req = match req.body(Full::new(body)) {
        Ok(r) => r,
        Err(e) => return Err(format!("request: {e}")),
    };
    let exchange = async {
        let resp = client.request(req).await.map_err(|e| {
            let mut name = if e.is_connect() { "connect" } else { "request" }.to_string();
            // The io::Error underneath says more than hyper's wrapper does.
            let mut src: Option<&dyn std::error::Error> = std::error::Error::source(&e);
            while let Some(s) = src {
                if let Some(io) = s.downcast_ref::<std::io::Error>() {
                    name = format!("{name} {}", net::io_error_name(io));
                    break;
                }
                src = s.source();
            }
            name
        })?;
        let status = resp.status().as_u16();
        let retry_after = resp.headers().contains_key(http::header::RETRY_AFTER);
        // Read the (small) body so the connection goes back to the pool; a
        // server sending a huge one is cut off rather than buffered.
        let body = Limited::new(resp.into_body(), 64 * 1024)
            .collect()
            .await
            .map_err(|_| "reading response body".to_string())?
            .to_bytes();
        let errno = if status >= 400 { errno_of(&body) } else { None };
        Ok::<Reply, String>(Reply {
            status,
            errno,
            retry_after,
        })
    };
    match tokio::time::timeout(timeout, exchange).await {
        Err(_) => Err("timeout".into()),
        Ok(r) => r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn endpoints_are_pinned_to_loopback() {
        let mut o = Origins::default();
        let a = o
            .endpoint("http://localhost:8080/wpush/v1/abc?x=1")
            .await
            .unwrap();
        assert_eq!(a.host, "localhost:8080");
        assert_eq!(a.uris.len(), 1);
        let u = a.uri(7);
        assert!(u.host().unwrap().starts_with("127.") || u.host().unwrap() == "[::1]");
        assert_eq!(u.path_and_query().unwrap().as_str(), "/wpush/v1/abc?x=1");
        assert_eq!(o.list[0].0, "http://localhost:8080");
        let b = o.endpoint("http://localhost:8080/other").await.unwrap();
        assert_eq!(b.origin, a.origin);
        let c = o.endpoint("http://127.0.0.1/p").await.unwrap();
        assert_eq!(o.list[c.origin].0, "http://127.0.0.1");
        assert!(o.endpoint("http://192.168.1.1/p").await.is_err());
        assert!(o.endpoint("https://127.0.0.1/p").await.is_err());
        assert!(o.endpoint("not a url").await.is_err());
    }

    #[test]
    fn error_bodies_name_their_errno() {
        let body = br#"{"code":429,"errno":125,"error":"Too Many Requests","message":"m"}"#;
        assert_eq!(errno_of(body), Some(125));
        assert_eq!(errno_of(b"not json"), None);
        assert_eq!(errno_of(br#"{"code":429}"#), None);
        let r = Reply {
            status: 429,
            errno: Some(126),
            retry_after: true,
        };
        assert_eq!(r.key(), "429 errno 126");
        let plain = Reply {
            status: 201,
            errno: None,
            retry_after: false,
        };
        assert_eq!(plain.key(), "201");
    }

    #[tokio::test]
    async fn post_to_closed_port_is_a_transport_error() {
        // Bind then drop to find a port nothing listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut o = Origins::default();
        let ep = o
            .endpoint(&format!("http://127.0.0.1:{port}/x"))
            .await
            .unwrap();
        let out = post(
            &client(1),
            &ep,
            0,
            &HeaderValue::from_static("vapid t=x, k=y"),
            Bytes::from_static(b"abc"),
            60,
            Duration::from_secs(5),
        )
        .await;
        match out {
            Outcome::Transport(t) => assert!(t.contains("connect"), "{t}"),
            other => panic!("expected transport error, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn endpoints_are_spread_over_push_nodes_keeping_their_path() {
        let bases = vec![
            "http://127.0.0.1:9001".to_string(),
            "http://localhost:9002/".to_string(),
            "http://127.0.0.3:9003".to_string(),
        ];
        let mut o = Origins::with_push_urls(&bases).await.unwrap();
        assert_eq!(o.push[1].base, "http://localhost:9002");
        let a = o
            .endpoint("http://127.0.0.1:8080/wpush/v1/abc?x=1")
            .await
            .unwrap();
        assert_eq!(a.uris.len(), 3);
        let hosts: Vec<String> = (0..6)
            .map(|k| a.uri(k).authority().unwrap().to_string())
            .collect();
        assert_eq!(hosts[0], "127.0.0.1:9001");
        assert!(hosts[1].ends_with(":9002") && hosts[1].starts_with("127."));
        assert_eq!(hosts[2], "127.0.0.3:9003");
        assert_eq!(hosts[3..], hosts[..3], "round-robin");
        for k in 0..3 {
            assert_eq!(a.uri(k).scheme_str(), Some("http"));
            assert_eq!(
                a.uri(k).path_and_query().unwrap().as_str(),
                "/wpush/v1/abc?x=1"
            );
        }
        // The audience and Host stay the endpoint's own: every node shares
        // the public URL.
        assert_eq!(a.host, "127.0.0.1:8080");
        assert_eq!(o.list[a.origin].0, "http://127.0.0.1:8080");
        // A public name in front of the nodes is never contacted, so it may
        // be anything, https included; its default port is left out.
        let b = o
            .endpoint("https://push.example.com:443/wpush/v1/def")
            .await
            .unwrap();
        assert_eq!(o.list[b.origin].0, "https://push.example.com");
        assert_eq!(b.uri(1).authority().unwrap().port_u16(), Some(9002));
        assert_eq!(b.uri(1).path(), "/wpush/v1/def");
        let c = o.endpoint("http://127.0.0.1:8080/other").await.unwrap();
        assert_eq!(c.origin, a.origin);
        assert!(o.endpoint("ftp://127.0.0.1/x").await.is_err());
    }

    #[tokio::test]
    async fn push_nodes_must_be_plain_http_on_loopback() {
        assert!(push_node("http://127.0.0.1:1").await.is_ok());
        assert!(push_node("http://[::1]:1/").await.is_ok());
        for bad in [
            "http://10.0.0.1:80",
            "http://192.168.1.1",
            "https://127.0.0.1:1",
            "ws://127.0.0.1:1",
            "http://127.0.0.1:1/prefix",
            "http://127.0.0.1:1/?q",
            "not a url",
        ] {
            assert!(push_node(bad).await.is_err(), "{bad} accepted");
        }
        assert!(
            Origins::with_push_urls(&["http://127.0.0.1:1".into(), "http://8.8.8.8:1".into()])
                .await
                .is_err()
        );
    }
}
