//! One websocket to the push service, over TCP (`ws://`) or TLS (`wss://`),
//! carrying text frames. TLS is rustls with the ring provider the server
//! side already uses, trusting the Mozilla root set (webpki-roots) plus any
//! CA file given, so a self-hosted Herald with a private CA works too.

use anyhow::{anyhow, bail, Context};
use futures_util::{SinkExt, StreamExt};
use rustls::pki_types::ServerName;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// A notification is at most a few KiB; anything far larger is not the
/// push protocol.
const MAX_MESSAGE: usize = 1 << 20;

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

pub(crate) struct Connection {
    ws: WebSocketStream<Box<dyn Io>>,
}

/// The client TLS configuration, shared with the HTTP clients.
pub(crate) use crate::http::tls_config;

/// Connects and completes the websocket handshake within `timeout`.
pub(crate) async fn connect(
    url: &str,
    tls: Option<&Arc<rustls::ClientConfig>>,
    timeout: Duration,
) -> anyhow::Result<Connection> {
    tokio::time::timeout(timeout, connect_inner(url, tls))
        .await
        .map_err(|_| anyhow!("no websocket to {url} within {} s", timeout.as_secs_f32()))?
}

async fn connect_inner(
    url: &str,
    tls: Option<&Arc<rustls::ClientConfig>>,
) -> anyhow::Result<Connection> {
    let uri: http::Uri = url
        .parse()
        .with_context(|| format!("{url:?} is not a URL"))?;
    let secure = match uri.scheme_str() {
        Some("ws") => false,
        Some("wss") => true,
        _ => bail!("{url:?} is not a ws:// or wss:// URL"),
    };
    let host = uri
        .host()
        .filter(|h| !h.is_empty())
        .ok_or_else(|| anyhow!("{url:?} has no host"))?;
    // IPv6 literals are bracketed in URLs but not in socket addresses.
    let bare_host = host.trim_start_matches('[').trim_end_matches(']');
    let port = uri.port_u16().unwrap_or(if secure { 443 } else { 80 });
    let tcp = TcpStream::connect((bare_host, port))
        .await
        .with_context(|| format!("cannot connect to {bare_host}:{port}"))?;
    // Acks and pings are tiny; don't hold them back.
    let _ = tcp.set_nodelay(true);
    let stream: Box<dyn Io> = if secure {
        let config = tls.ok_or_else(|| anyhow!("wss:// needs a TLS configuration"))?;
        let name = ServerName::try_from(bare_host.to_string())
            .map_err(|_| anyhow!("{bare_host:?} is not a valid TLS server name"))?;
        let tls = tokio_rustls::TlsConnector::from(config.clone())
            .connect(name, tcp)
            .await
            .with_context(|| format!("TLS handshake with {bare_host}:{port} failed"))?;
        Box::new(tls)
    } else {
        Box::new(tcp)
    };
    let mut request = url
        .into_client_request()
        .with_context(|| format!("{url:?} is not a websocket URL"))?;
    request.headers_mut().insert(
        "sec-websocket-protocol",
        http::HeaderValue::from_static("push-notification"),
    );
    request.headers_mut().insert(
        http::header::USER_AGENT,
        http::HeaderValue::from_static(concat!("herald-listen/", env!("CARGO_PKG_VERSION"))),
    );
    let config = WebSocketConfig::default()
        .max_message_size(Some(MAX_MESSAGE))
        .max_frame_size(Some(MAX_MESSAGE));
    let (ws, _) = tokio_tungstenite::client_async_with_config(request, stream, Some(config))
        .await
        .with_context(|| format!("websocket handshake with {url} failed"))?;
    Ok(Connection { ws })
}

impl Connection {
    pub(crate) async fn send(&mut self, text: String) -> anyhow::Result<()> {
        self.ws
            .send(Message::text(text))
            .await
            .context("cannot send to the push service")
    }

    /// The next text frame. Control frames are handled here (tungstenite
    /// answers pings); the end of the connection is an error saying why.
    pub(crate) async fn recv(&mut self) -> anyhow::Result<String> {
        loop {
            match self.ws.next().await {
                Some(Ok(Message::Text(text))) => return Ok(text.as_str().to_owned()),
                Some(Ok(Message::Close(Some(frame)))) => {
                    bail!(
                        "the push service closed the connection ({} {})",
                        u16::from(frame.code),
                        frame.reason
                    )
                }
                Some(Ok(Message::Close(None))) => bail!("the push service closed the connection"),
                Some(Ok(Message::Binary(_))) => {
                    bail!("the push service sent a binary frame, which the protocol does not use")
                }
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(anyhow::Error::new(e).context("connection lost")),
                None => bail!("connection lost"),
            }
        }
    }

    /// A clean close, bounded in time: a dead peer must not hold us up.
    pub(crate) async fn close(mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(2), self.ws.close(None)).await;
    }
}
