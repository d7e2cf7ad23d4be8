//! The one way Herald's clients reach an HTTP server: `herald send` and the
//! demo (pushes, receipts), `herald broadcast`, this crate's push client
//! (wss://, `herald listen`), the broadcast source, and wake-ups between
//! nodes. Plain `http://` and `https://` alike; TLS is rustls with the ring
//! provider the server side uses, trusting the Mozilla root set
//! (webpki-roots) plus the certificates of an optional CA file (`--ca
//! FILE`), so a push service with a private CA works too. Node-to-node
//! traffic alone is plain http only (`node_only`).

use anyhow::{anyhow, bail, Context};
use hyper::client::conn::http1::SendRequest;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::net::TcpStream;

/// A pooling client for `http://` and `https://` URLs (`HttpClient::pooled`).
pub type PooledClient<B> =
    hyper_util::client::legacy::Client<hyper_rustls::HttpsConnector<HttpConnector>, B>;

/// A pooling client that refuses anything but `http://` (`plain_http`).
pub type PlainClient<B> = hyper_util::client::legacy::Client<HttpConnector, B>;

/// How a plain-http client pools. The defaults are hyper's own pool.
#[derive(Clone, Copy, Debug)]
pub struct PlainPool {
    pub connect_timeout: Duration,
    pub max_idle_per_host: Option<usize>,
    pub idle_timeout: Option<Duration>,
}

/// A client for loopback and private addresses that must never speak TLS:
/// requests between the nodes of one cluster (`node_url` refuses https at
/// start) and the load generator's senders. A request to an `https://` URL
/// fails before connecting rather than reaching a peer without its TLS
/// being checked. No delay on small writes (a wake-up or a push is one
/// small POST); `connect_timeout` bounds reaching a peer that went away.
pub fn plain_http<B>(pool: PlainPool) -> PlainClient<B>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
{
    let mut connector = HttpConnector::new();
    connector.enforce_http(true);
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(pool.connect_timeout));
    let mut builder = hyper_util::client::legacy::Client::builder(TokioExecutor::new());
    if let Some(n) = pool.max_idle_per_host {
        builder.pool_max_idle_per_host(n);
    }
    if let Some(t) = pool.idle_timeout {
        builder.pool_idle_timeout(t);
    }
    builder.build(connector)
}

/// The client for requests between the nodes of one cluster: plain http,
/// hyper's default pool.
pub fn node_only<B>(connect_timeout: Duration) -> PlainClient<B>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
{
    plain_http(PlainPool {
        connect_timeout,
        max_idle_per_host: None,
        idle_timeout: None,
    })
}

/// The client TLS configuration: public roots plus the PEM certificates in
/// `ca_file`. ALPN offers HTTP/1.1, which both the push API and the
/// websocket upgrade speak.
pub fn tls_config(ca_file: Option<&Path>) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = ca_file {
        let certs = CertificateDer::pem_file_iter(path)
            .with_context(|| format!("cannot read CA file {}", path.display()))?
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("CA file {} is not PEM", path.display()))?;
        if certs.is_empty() {
            bail!("CA file {} holds no certificate", path.display());
        }
        for cert in certs {
            roots.add(cert).with_context(|| {
                format!("CA file {} holds an unusable certificate", path.display())
            })?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// What a client trusts; cheap to clone.
#[derive(Clone, Debug)]
pub struct HttpClient {
    tls: Arc<rustls::ClientConfig>,
}

impl Default for HttpClient {
    /// The public roots only, built once per process.
    fn default() -> Self {
        static PUBLIC: OnceLock<HttpClient> = OnceLock::new();
        PUBLIC
            .get_or_init(|| HttpClient::new(None).expect("the public roots load"))
            .clone()
    }
}

impl HttpClient {
    /// Trusts the public roots and, with `ca_file`, that file's CAs too.
    pub fn new(ca_file: Option<&Path>) -> anyhow::Result<HttpClient> {
        Ok(HttpClient {
            tls: tls_config(ca_file)?,
        })
    }

    pub fn tls(&self) -> &Arc<rustls::ClientConfig> {
        &self.tls
    }

    /// A pooling client for many requests to `http://` or `https://` URLs
    /// (absolute URIs in the requests).
    pub fn pooled<B>(&self) -> PooledClient<B>
    where
        B: hyper::body::Body + Send + 'static,
        B::Data: Send,
    {
        let mut config = (*self.tls).clone();
        // hyper-rustls sets ALPN itself from the protocols enabled.
        config.alpn_protocols.clear();
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(config)
            .https_or_http()
            .enable_http1()
            .build();
        hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build(connector)
    }

    /// One HTTP/1.1 connection to the host of `url` (`http://` or
    /// `https://`); `what` names the URL in errors ("endpoint", "receipt
    /// subscription").
    pub async fn connect<B>(&self, url: &http::Uri, what: &str) -> anyhow::Result<Connection<B>>
    where
        B: hyper::body::Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let https = match url.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            other => bail!("unsupported {what} scheme {other:?}: use http:// or https://"),
        };
        let host = url.host().ok_or_else(|| anyhow!("{what} has no host"))?;
        // IPv6 literals come bracketed in URIs but not in socket addresses.
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let port = url.port_u16().unwrap_or(if https { 443 } else { 80 });
        let tcp = TcpStream::connect((host, port))
            .await
            .with_context(|| format!("cannot connect to {host}:{port}"))?;
        let _ = tcp.set_nodelay(true);
        if !https {
            return Connection::start(tcp).await;
        }
        let name = ServerName::try_from(host.to_owned())
            .with_context(|| format!("{host:?} is not a valid TLS server name"))?;
        let tls = tokio_rustls::TlsConnector::from(self.tls.clone())
            .connect(name, tcp)
            .await
            .with_context(|| {
                format!(
                    "TLS handshake with {host}:{port} failed (for a private CA, pass --ca FILE)"
                )
            })?;
        Connection::start(tls).await
    }
}

/// An HTTP/1.1 connection. A task drives it until this is dropped, so a
/// streamed response body must be read before dropping it.
pub struct Connection<B> {
    pub sender: SendRequest<B>,
    driver: tokio::task::JoinHandle<()>,
}

impl<B> Connection<B>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    async fn start<S>(stream: S) -> anyhow::Result<Self>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .context("HTTP handshake failed")?;
        let driver = tokio::spawn(async move {
            // Its errors surface on the request or the body being read.
            let _ = connection.await;
        });
        Ok(Connection { sender, driver })
    }
}

impl<B> Drop for Connection<B> {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_file_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let e = format!("{:#}", HttpClient::new(Some(&missing)).unwrap_err());
        assert!(e.contains("missing.pem"), "{e}");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let e = format!("{:#}", HttpClient::new(Some(&empty)).unwrap_err());
        assert!(e.contains("no certificate"), "{e}");
        assert!(HttpClient::new(None).is_ok());
    }

    /// The node client reaches an http:// node and refuses an https://
    /// URL to the same address without opening a connection.
    #[tokio::test]
    async fn the_node_client_speaks_plain_http_only() {
        use http_body_util::{BodyExt, Full};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client: PlainClient<Full<bytes::Bytes>> = node_only(Duration::from_secs(2));
        let post = |scheme: &str| {
            http::Request::post(format!("{scheme}://{addr}/_herald/node/wake"))
                .body(Full::new(bytes::Bytes::from_static(b"{}")))
                .unwrap()
        };

        let refused = client.request(post("https")).await.unwrap_err();
        assert!(refused.is_connect(), "{refused:?}");
        let accepted = tokio::time::timeout(Duration::from_millis(200), listener.accept()).await;
        assert!(accepted.is_err(), "an https:// request opened a connection");

        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let service = hyper::service::service_fn(|_req| async {
                Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                    bytes::Bytes::from_static(b"{\"done\":true}"),
                )))
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
        let resp = client.request(post("http")).await.unwrap();
        assert_eq!(resp.status(), 200);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"{\"done\":true}");
        server.abort();
    }

    #[tokio::test]
    async fn only_http_and_https_urls() {
        let client = HttpClient::default();
        let url: http::Uri = "ftp://127.0.0.1/x".parse().unwrap();
        let e = client
            .connect::<http_body_util::Empty<bytes::Bytes>>(&url, "endpoint")
            .await
            .err()
            .unwrap();
        assert!(e.to_string().contains("scheme"), "{e}");
    }
}
