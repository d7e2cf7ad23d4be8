//! The application-server side: POSTing encrypted messages to push endpoints
//! over keep-alive HTTP/1.1 connections.

use crate::net;
use anyhow::{anyhow, Context, Result};
use bytes::Bytes;
use http::{HeaderValue, Method, Request, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use std::net::SocketAddr;
use std::time::Duration;

pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// One pooled client for all senders: each sender awaits its response before
/// its next request, so the pool settles at one connection per sender.
pub fn client(senders: usize) -> HttpClient {
    let mut conn = HttpConnector::new();
    conn.set_nodelay(true);
    conn.enforce_http(true);
    conn.set_connect_timeout(Some(Duration::from_secs(10)));
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(senders.max(1))
        .pool_idle_timeout(Duration::from_secs(60))
        .build(conn)
}

/// A push endpoint ready to POST to: the URI names the checked loopback
/// address, so the HTTP client never resolves a name itself; the original
/// authority travels in the Host header.
#[derive(Clone, Debug)]
pub struct Endpoint {
    pub uri: Uri,
    pub host: HeaderValue,
    /// Index into `Origins`, which selects the VAPID audience.
    pub origin: usize,
}

/// Distinct origins seen in endpoint URLs, each resolved and loopback-checked
/// once.
#[derive(Default)]
pub struct Origins {
    pub list: Vec<(String, SocketAddr)>,
}

impl Origins {
    pub async fn endpoint(&mut self, url: &str) -> Result<Endpoint> {
        let uri: Uri = url
            .parse()
            .with_context(|| format!("invalid push endpoint {url:?}"))?;
        let (host, port) = net::host_port(&uri)?;
        if uri.scheme_str() != Some("http") {
            anyhow::bail!("push endpoint {url} is not http://");
        }
        let authority = uri
            .authority()
            .ok_or_else(|| anyhow!("push endpoint {url} has no authority"))?;
        // The VAPID audience is the origin: scheme://host[:port], no default port.
        let origin = if port == 80 {
            format!("http://{host}")
        } else {
            format!("http://{host}:{port}")
        };
        let idx = match self.list.iter().position(|(o, _)| *o == origin) {
            Some(i) => i,
            None => {
                let addr = net::loopback_addr(&host, port).await?;
                self.list.push((origin, addr));
                self.list.len() - 1
            }
        };
        let addr = self.list[idx].1;
        let pq = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        Ok(Endpoint {
            uri: format!("http://{addr}{pq}").parse()?,
            host: HeaderValue::from_str(authority.as_str())?,
            origin: idx,
        })
    }
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

pub async fn post(
    client: &HttpClient,
    ep: &Endpoint,
    authorization: &HeaderValue,
    body: Bytes,
    ttl: u32,
    timeout: Duration,
) -> Outcome {
    let len = body.len();
    let req = Request::builder()
        .method(Method::POST)
        .uri(ep.uri.clone())
        .header(http::header::HOST, ep.host.clone())
        .header("TTL", ttl)
        .header(http::header::CONTENT_ENCODING, "aes128gcm")
        .header(http::header::CONTENT_TYPE, "application/octet-stream")
        .header(http::header::CONTENT_LENGTH, len)
        .header(http::header::AUTHORIZATION, authorization.clone())
        .body(Full::new(body));
    let req = match req {
        Ok(r) => r,
        Err(e) => return Outcome::Transport(format!("request: {e}")),
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
        // Read the (small) body so the connection goes back to the pool; a
        // server sending a huge one is cut off rather than buffered.
        Limited::new(resp.into_body(), 64 * 1024)
            .collect()
            .await
            .map_err(|_| "reading response body".to_string())?;
        Ok::<u16, String>(status)
    };
    match tokio::time::timeout(timeout, exchange).await {
        Err(_) => Outcome::Transport("timeout".into()),
        Ok(Err(e)) => Outcome::Transport(e),
        Ok(Ok(s)) => Outcome::Status(s),
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
        assert!(a.uri.host().unwrap().starts_with("127.") || a.uri.host().unwrap() == "[::1]");
        assert_eq!(
            a.uri.path_and_query().unwrap().as_str(),
            "/wpush/v1/abc?x=1"
        );
        assert_eq!(o.list[0].0, "http://localhost:8080");
        let b = o.endpoint("http://localhost:8080/other").await.unwrap();
        assert_eq!(b.origin, a.origin);
        let c = o.endpoint("http://127.0.0.1/p").await.unwrap();
        assert_eq!(o.list[c.origin].0, "http://127.0.0.1");
        assert!(o.endpoint("http://192.168.1.1/p").await.is_err());
        assert!(o.endpoint("https://127.0.0.1/p").await.is_err());
        assert!(o.endpoint("not a url").await.is_err());
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
}
