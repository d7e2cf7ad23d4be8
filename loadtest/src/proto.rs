//! The user-agent side of the Mozilla push websocket protocol, as Firefox
//! speaks it: handshake with the `push-notification` subprotocol, `hello`,
//! `register`, `notification` and `ack` JSON messages, `{}` pings.

use crate::net;
use anyhow::{Context, Result};
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use std::borrow::Cow;
use std::net::{IpAddr, SocketAddr};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;
use uuid::Uuid;

pub type Ws = WebSocketStream<TcpStream>;

/// The websocket URL of the push service, resolved once (loopback checked).
#[derive(Clone, Debug)]
pub struct Target {
    pub url: String,
    pub addr: SocketAddr,
}

impl Target {
    pub async fn new(url: &str) -> Result<Target> {
        let uri: http::Uri = url
            .parse()
            .with_context(|| format!("invalid websocket URL {url:?}"))?;
        let (host, port) = net::host_port(&uri)?;
        if !matches!(uri.scheme_str(), Some("ws")) {
            anyhow::bail!("the user-agent URL must be ws://, got {url}");
        }
        let addr = net::loopback_addr(&host, port).await?;
        Ok(Target {
            url: url.to_string(),
            addr,
        })
    }

    /// Every --url, resolved (each loopback-checked).
    pub async fn all(urls: &[String]) -> Result<Vec<Target>> {
        if urls.is_empty() {
            anyhow::bail!("no websocket URL given");
        }
        let mut out = Vec::with_capacity(urls.len());
        for u in urls {
            out.push(Target::new(u.trim()).await?);
        }
        Ok(out)
    }
}

/// The node user agent `ua` talks to: round-robin over the --url list, the
/// same node every time it (re)connects.
pub fn target_of(targets: &[Target], ua: usize) -> &Target {
    &targets[ua % targets.len()]
}

/// Why one user agent failed, as a short key for tallies. `phase` says how
/// far it got, which is what tells client limits from server limits.
#[derive(Debug, Clone)]
pub struct Failure {
    pub phase: &'static str,
    pub reason: String,
}

impl Failure {
    pub fn new(phase: &'static str, reason: impl Into<String>) -> Self {
        Failure {
            phase,
            reason: reason.into(),
        }
    }
    pub fn key(&self) -> String {
        format!("{}: {}", self.phase, self.reason)
    }
    pub fn timeout(phase: &'static str) -> Self {
        Failure::new(phase, "timeout")
    }
}

/// Small buffers: a held connection costs a 4 KiB read buffer and no write
/// buffer, so hundreds of thousands fit in a few GiB. Messages here are at
/// most a 4 KiB payload in base64 plus JSON, well under the 64 KiB cap.
pub fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
        .max_write_buffer_size(64 * 1024)
        .max_message_size(Some(64 * 1024))
        .max_frame_size(Some(64 * 1024))
}

pub fn ws_error_name(e: &WsError) -> String {
    match e {
        WsError::ConnectionClosed | WsError::AlreadyClosed => "closed".into(),
        WsError::Io(io) => net::io_error_name(io),
        WsError::Http(resp) => format!("http {}", resp.status().as_u16()),
        WsError::Protocol(p) => format!("protocol: {p}"),
        WsError::Capacity(c) => format!("capacity: {c}"),
        WsError::Utf8(_) => "invalid utf-8".into(),
        other => format!("{other}"),
    }
}

/// TCP connect plus websocket handshake. The phase of a failure separates
/// "could not get a socket" (connect) from "server would not upgrade"
/// (handshake).
pub async fn open(target: &Target, src: Option<IpAddr>) -> Result<Ws, Failure> {
    let tcp = net::tcp_connect(target.addr, src)
        .await
        .map_err(|e| Failure::new("connect", net::io_error_name(&e)))?;
    let mut req = target
        .url
        .as_str()
        .into_client_request()
        .map_err(|e| Failure::new("handshake", ws_error_name(&e)))?;
    req.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        http::HeaderValue::from_static("push-notification"),
    );
    // tungstenite checks that the server selected the subprotocol we asked for.
    let (ws, _resp) = tokio_tungstenite::client_async_with_config(req, tcp, Some(ws_config()))
        .await
        .map_err(|e| Failure::new("handshake", ws_error_name(&e)))?;
    Ok(ws)
}

/// A message from the server. Borrowed where possible: notifications carry up
/// to 5.5 KiB of base64 that only needs a glance.
#[derive(Deserialize, Debug, Default)]
pub struct ServerMsg<'a> {
    #[serde(rename = "messageType", borrow, default)]
    pub message_type: Option<Cow<'a, str>>,
    #[serde(default)]
    pub uaid: Option<String>,
    #[serde(default)]
    pub status: Option<u32>,
    #[serde(rename = "channelID", borrow, default)]
    pub channel_id: Option<Cow<'a, str>>,
    #[serde(rename = "pushEndpoint", default)]
    pub push_endpoint: Option<String>,
    #[serde(borrow, default)]
    pub version: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub data: Option<Cow<'a, str>>,
}

pub fn parse(text: &str) -> Option<ServerMsg<'_>> {
    serde_json::from_str(text).ok()
}

pub fn hello_json(uaid: Option<&str>, channel_ids: &[Uuid]) -> String {
    match uaid {
        None => r#"{"messageType":"hello","use_webpush":true,"broadcasts":{}}"#.to_string(),
        Some(uaid) => {
            let ids: Vec<String> = channel_ids
                .iter()
                .map(|c| c.hyphenated().to_string())
                .collect();
            serde_json::json!({
                "messageType": "hello",
                "use_webpush": true,
                "broadcasts": {},
                "uaid": uaid,
                "channelIDs": ids,
            })
            .to_string()
        }
    }
}

pub fn register_json(channel_id: &Uuid, key_b64: &str) -> String {
    serde_json::json!({
        "messageType": "register",
        "channelID": channel_id.hyphenated().to_string(),
        "key": key_b64,
    })
    .to_string()
}

pub fn ack_json(channel_id: &str, version: &str) -> String {
    serde_json::json!({
        "messageType": "ack",
        "updates": [{"channelID": channel_id, "version": version, "code": 100}],
    })
    .to_string()
}

pub async fn send_text(ws: &mut Ws, text: String, phase: &'static str) -> Result<(), Failure> {
    ws.send(Message::text(text))
        .await
        .map_err(|e| Failure::new(phase, ws_error_name(&e)))
}

/// Reads until a text message of the wanted type arrives. Other text messages
/// are skipped (at most 64, so a chatty or broken server cannot keep us here
/// forever; the caller also bounds the time).
async fn expect(
    ws: &mut Ws,
    want: &str,
    phase: &'static str,
) -> Result<(Option<u32>, Option<String>, Option<String>), Failure> {
    for _ in 0..64 {
        let msg = match ws.next().await {
            None => return Err(Failure::new(phase, "closed")),
            Some(Err(e)) => return Err(Failure::new(phase, ws_error_name(&e))),
            Some(Ok(m)) => m,
        };
        let text = match msg {
            Message::Text(t) => t,
            Message::Close(_) => return Err(Failure::new(phase, "closed")),
            _ => continue,
        };
        let Some(m) = parse(text.as_str()) else {
            return Err(Failure::new(phase, "unparseable reply"));
        };
        if m.message_type.as_deref() == Some(want) {
            return Ok((m.status, m.uaid, m.push_endpoint));
        }
    }
    Err(Failure::new(phase, "no reply among 64 messages"))
}

/// Sends `hello` and returns the uaid the server assigned (or confirmed).
pub async fn hello(
    ws: &mut Ws,
    uaid: Option<&str>,
    channel_ids: &[Uuid],
) -> Result<String, Failure> {
    send_text(ws, hello_json(uaid, channel_ids), "hello").await?;
    let (status, got, _) = expect(ws, "hello", "hello").await?;
    check_status(status, "hello")?;
    match got {
        Some(u) if !u.is_empty() => Ok(u),
        _ => Err(Failure::new("hello", "reply without uaid")),
    }
}

/// Registers a channel and returns its push endpoint URL.
pub async fn register(ws: &mut Ws, channel_id: &Uuid, key_b64: &str) -> Result<String, Failure> {
    send_text(ws, register_json(channel_id, key_b64), "register").await?;
    let (status, _, endpoint) = expect(ws, "register", "register").await?;
    check_status(status, "register")?;
    endpoint
        .filter(|e| !e.is_empty())
        .ok_or_else(|| Failure::new("register", "reply without pushEndpoint"))
}

fn check_status(status: Option<u32>, phase: &'static str) -> Result<(), Failure> {
    match status {
        Some(200) => Ok(()),
        Some(s) => Err(Failure::new(phase, format!("status {s}"))),
        None => Err(Failure::new(phase, "reply without status")),
    }
}

/// A fresh random channel ID, as Firefox makes them (UUID v4).
pub fn new_channel_id() -> Uuid {
    uuid::Builder::from_random_bytes(rand::random()).into_uuid()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hello_shapes() {
        let first: serde_json::Value = serde_json::from_str(&hello_json(None, &[])).unwrap();
        assert_eq!(first["messageType"], "hello");
        assert_eq!(first["use_webpush"], true);
        assert!(first.get("uaid").is_none());
        let c = new_channel_id();
        let again: serde_json::Value =
            serde_json::from_str(&hello_json(Some("ab12"), &[c])).unwrap();
        assert_eq!(again["uaid"], "ab12");
        assert_eq!(again["channelIDs"][0], c.hyphenated().to_string());
    }

    #[test]
    fn parses_notification_borrowing() {
        let t = r#"{"messageType":"notification","channelID":"c","version":"v\"1","data":"AAA","headers":{"encoding":"aes128gcm"},"ttl":60}"#;
        let m = parse(t).unwrap();
        assert_eq!(m.message_type.as_deref(), Some("notification"));
        assert_eq!(m.version.as_deref(), Some("v\"1"));
        assert_eq!(m.data.as_deref(), Some("AAA"));
        assert!(parse("{}").unwrap().message_type.is_none());
        assert!(parse("not json").is_none());
        assert!(parse(r#"{"status":"x"}"#).is_none());
    }

    #[test]
    fn ack_escapes() {
        let a: serde_json::Value = serde_json::from_str(&ack_json("c\"", "v")).unwrap();
        assert_eq!(a["updates"][0]["channelID"], "c\"");
        assert_eq!(a["updates"][0]["code"], 100);
    }

    #[test]
    fn channel_ids_are_v4() {
        let c = new_channel_id();
        assert_eq!(c.get_version_num(), 4);
        assert_ne!(c, new_channel_id());
    }

    #[tokio::test]
    async fn user_agents_go_round_robin_over_the_nodes() {
        let urls: Vec<String> = [
            "ws://127.0.0.1:1/",
            "ws://localhost:2/",
            "ws://127.0.0.3:3/",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let t = Target::all(&urls).await.unwrap();
        let ports: Vec<u16> = (0..7).map(|u| target_of(&t, u).addr.port()).collect();
        assert_eq!(ports, [1, 2, 3, 1, 2, 3, 1]);
        assert_eq!(target_of(&t, 4).url, "ws://localhost:2/");
        // One bad node refuses the lot.
        let bad = vec!["ws://127.0.0.1:1/".to_string(), "ws://10.0.0.1:2/".into()];
        assert!(Target::all(&bad).await.is_err());
        assert!(Target::all(&[]).await.is_err());
    }
}
