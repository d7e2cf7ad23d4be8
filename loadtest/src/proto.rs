//! The user-agent side of the Mozilla push websocket protocol, as Firefox
//! speaks it: handshake offering the `push-notification` subprotocol (the
//! server may select it, as Herald does, or none, as autopush-rs does),
//! `hello` (optionally following broadcasts), `register`, `notification`
//! and `ack` JSON messages, `{}` pings.

use crate::net;
use anyhow::{Context, Result};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use herald_proto::ack::AckCode;
use herald_proto::protocol::{ClientMessage, ServerMessage};
use http::header;
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
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

/// The websocket subprotocol Firefox asks for.
pub const SUBPROTOCOL: &str = "push-notification";

/// Handshakes that selected [`SUBPROTOCOL`] and handshakes that selected
/// none, in this process. autopush-rs selects none; Herald selects it.
static SELECTED_PUSH: AtomicU64 = AtomicU64::new(0);
static SELECTED_NONE: AtomicU64 = AtomicU64::new(0);

/// What servers selected in this process's handshakes so far, by name
/// ("push-notification", "none"); only names that occurred.
pub fn selected_subprotocols() -> BTreeMap<String, u64> {
    [
        (SUBPROTOCOL, SELECTED_PUSH.load(Relaxed)),
        ("none", SELECTED_NONE.load(Relaxed)),
    ]
    .into_iter()
    .filter(|(_, n)| *n > 0)
    .map(|(k, n)| (k.to_string(), n))
    .collect()
}

/// TCP connect plus websocket handshake. The phase of a failure separates
/// "could not get a socket" (connect) from "server would not upgrade"
/// (handshake).
pub async fn open(target: &Target, src: Option<IpAddr>) -> Result<Ws, Failure> {
    let tcp = net::tcp_connect(target.addr, src)
        .await
        .map_err(|e| Failure::new("connect", net::io_error_name(&e)))?;
    let (ws, selected) = handshake(tcp, &target.url).await?;
    match selected {
        Some(_) => SELECTED_PUSH.fetch_add(1, Relaxed),
        None => SELECTED_NONE.fetch_add(1, Relaxed),
    };
    Ok(ws)
}

/// The client half of the websocket handshake (RFC 6455 section 4), asking
/// for the `push-notification` subprotocol as Firefox does. hyper's HTTP/1.1
/// client carries the upgrade request and reads the response; tungstenite
/// then frames the same socket. tungstenite's own client is not used because
/// it refuses a server that selects no subprotocol, which is what
/// autopush-rs does (and what RFC 6455 allows: the server "may" select one
/// of those offered), so the 101 is checked here by [`check_response`].
/// The socket is taken back out of hyper, so a held connection costs what a
/// bare `WebSocketStream<TcpStream>` costs. Returns the socket and the
/// subprotocol selected (None: none).
pub async fn handshake(tcp: TcpStream, url: &str) -> Result<(Ws, Option<&'static str>), Failure> {
    let fail = |why: String| Failure::new("handshake", why);
    let uri: http::Uri = url.parse().map_err(|_| fail("invalid URL".into()))?;
    let host = uri
        .authority()
        .map(|a| a.as_str().to_string())
        .ok_or_else(|| fail("URL without host".into()))?;
    let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let path = if path.is_empty() { "/" } else { path };
    let key = tokio_tungstenite::tungstenite::handshake::client::generate_key();
    let request = http::Request::get(path)
        .header(header::HOST, host)
        .header(header::CONNECTION, "Upgrade")
        .header(header::UPGRADE, "websocket")
        .header(header::SEC_WEBSOCKET_VERSION, "13")
        .header(header::SEC_WEBSOCKET_KEY, key.as_str())
        .header(header::SEC_WEBSOCKET_PROTOCOL, SUBPROTOCOL)
        .body(Empty::<Bytes>::new())
        .map_err(|e| fail(format!("request: {e}")))?;
    // A 1 KiB read buffer holds the ~200-byte response head; hyper's
    // default 8 KiB, though freed after the upgrade, left each held
    // connection about 1 KiB more of the heap (measured with `idle`).
    let (mut sender, conn) = hyper::client::conn::http1::Builder::new()
        .read_buf_exact_size(Some(1024))
        .handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| fail(hyper_error_name(&e)))?;
    let exchange = async move {
        let mut response = sender
            .send_request(request)
            .await
            .map_err(|e| fail(hyper_error_name(&e)))?;
        let selected = check_response(response.status(), response.headers(), &key).map_err(fail)?;
        let upgraded = hyper::upgrade::on(&mut response)
            .await
            .map_err(|e| fail(hyper_error_name(&e)))?;
        Ok::<_, Failure>((upgraded, selected))
    };
    // The connection future writes and reads for `sender`; on a 101 it ends
    // by handing the socket to the upgrade, otherwise when `sender` drops.
    let (exchanged, _) = tokio::join!(exchange, conn.with_upgrades());
    let (upgraded, selected) = exchanged?;
    let parts = upgraded
        .downcast::<TokioIo<TcpStream>>()
        .map_err(|_| fail("upgraded socket of an unexpected type".into()))?;
    // Frames the server sent right behind the response head are in read_buf.
    let ws = WebSocketStream::from_partially_read(
        parts.io.into_inner(),
        parts.read_buf.to_vec(),
        Role::Client,
        Some(ws_config()),
    )
    .await;
    Ok((ws, selected))
}

/// A short tally key for a failed HTTP exchange: the socket error's name
/// where there is one, as for every other phase.
fn hyper_error_name(e: &hyper::Error) -> String {
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            return net::io_error_name(io);
        }
        source = s.source();
    }
    if e.is_incomplete_message() || e.is_closed() || e.is_canceled() {
        "closed".into()
    } else if e.is_parse() || e.is_parse_status() {
        "malformed response".into()
    } else {
        e.to_string()
    }
}

/// Checks a handshake response against the key sent; returns the
/// subprotocol selected, or why the handshake failed (a short key for
/// tallies, `http 503` for a refusal as before).
pub fn check_response(
    status: http::StatusCode,
    headers: &http::HeaderMap,
    key: &str,
) -> Result<Option<&'static str>, String> {
    if status != http::StatusCode::SWITCHING_PROTOCOLS {
        return Err(format!("http {}", status.as_u16()));
    }
    let all = |name: header::HeaderName| -> Vec<&str> {
        headers
            .get_all(name)
            .iter()
            .map(|v| v.to_str().unwrap_or("\u{fffd}").trim())
            .collect()
    };
    if !all(header::UPGRADE)
        .iter()
        .any(|v| v.eq_ignore_ascii_case("websocket"))
    {
        return Err("protocol: no Upgrade: websocket".into());
    }
    if !all(header::CONNECTION)
        .iter()
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
    {
        return Err("protocol: no Connection: Upgrade".into());
    }
    let want = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    if all(header::SEC_WEBSOCKET_ACCEPT) != [want.as_str()] {
        return Err("protocol: wrong Sec-WebSocket-Accept".into());
    }
    if !all(header::SEC_WEBSOCKET_EXTENSIONS).is_empty() {
        return Err("protocol: extension selected, none offered".into());
    }
    match all(header::SEC_WEBSOCKET_PROTOCOL).as_slice() {
        [] => Ok(None),
        [p] if *p == SUBPROTOCOL => Ok(Some(SUBPROTOCOL)),
        [p] => Err(format!(
            "protocol: server selected subprotocol {p:?}, not {SUBPROTOCOL}"
        )),
        _ => Err("protocol: several subprotocols selected".into()),
    }
}

/// A message from the server, as the scenarios glance at it. Borrowed where
/// possible: notifications carry up to 5.5 KiB of base64 that only needs a
/// glance, on the path every delivered message takes, so this stays a
/// zero-copy view rather than herald-proto's owned `ServerMessage` (which
/// the replies to `hello` and `register` are read with, see `expect`).
#[derive(Deserialize, Debug, Default)]
pub struct ServerMsg<'a> {
    #[serde(rename = "messageType", borrow, default)]
    pub message_type: Option<Cow<'a, str>>,
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

/// A notification from the server, as a user agent books and acks it.
pub struct Notification<'a> {
    pub channel_id: Cow<'a, str>,
    pub version: Cow<'a, str>,
    pub data: Option<Cow<'a, str>>,
}

/// The notification in one text frame, if it is one. Anything else a server
/// may volunteer (`{}` ping replies and the like) is `None`; so is a frame
/// that is not JSON or a notification without channelID or version, which
/// is also counted in `malformed`.
pub fn notification<'a>(text: &'a str, malformed: &AtomicU64) -> Option<Notification<'a>> {
    let Some(m) = parse(text) else {
        malformed.fetch_add(1, Relaxed);
        return None;
    };
    if m.message_type.as_deref() != Some("notification") {
        return None;
    }
    let (Some(channel_id), Some(version)) = (m.channel_id, m.version) else {
        malformed.fetch_add(1, Relaxed);
        return None;
    };
    Some(Notification {
        channel_id,
        version,
        data: m.data,
    })
}

#[cfg(test)]
pub fn hello_json(uaid: Option<&str>, channel_ids: &[Uuid]) -> String {
    hello_json_following(uaid, channel_ids, &BTreeMap::new())
}

/// `hello` following `broadcasts` (id -> the version this user agent
/// knows), as Firefox follows `remote-settings/monitor_changes`. The frames
/// this module sends are herald-proto's `ClientMessage`s, the same types
/// Herald parses and herald-client sends.
pub fn hello_json_following(
    uaid: Option<&str>,
    channel_ids: &[Uuid],
    broadcasts: &BTreeMap<String, String>,
) -> String {
    ClientMessage::Hello {
        uaid: uaid.map(str::to_string),
        channel_ids: channel_ids
            .iter()
            .map(|c| c.hyphenated().to_string())
            .collect(),
        broadcasts: broadcasts.clone(),
        token: None,
    }
    .to_json()
}

/// A notification frame as a server sends it, for tests.
#[cfg(test)]
pub fn notification_json(channel_id: &str, version: &str, body: &[u8]) -> String {
    use herald_proto::headers::NotificationHeaders;
    herald_proto::protocol::ServerMessage::Notification(herald_proto::protocol::Notification {
        channel_id: channel_id.to_string(),
        version: version.to_string(),
        data: Some(herald_proto::b64::encode_b64url(body)),
        headers: Some(NotificationHeaders {
            encoding: "aes128gcm".into(),
            ..Default::default()
        }),
        ttl: Some(60),
    })
    .to_json()
}

/// An empty `key_b64` registers without an application server key: the
/// subscription then takes pushes without VAPID.
pub fn register_json(channel_id: &Uuid, key_b64: &str) -> String {
    ClientMessage::Register {
        channel_id: channel_id.hyphenated().to_string(),
        key: (!key_b64.is_empty()).then(|| key_b64.to_string()),
    }
    .to_json()
}

pub fn ack_json(channel_id: &str, version: &str) -> String {
    ClientMessage::ack(channel_id, version, AckCode::DELIVERED).to_json()
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
        // Replies are read with herald-proto's lenient client-side parser;
        // its refusals of a known type ("hello without a numeric status")
        // are few and fixed, so they serve as failure keys, while JSON
        // errors (which carry positions) share one key.
        let m = match ServerMessage::parse(text.as_str()) {
            Ok(m) => m,
            Err(e) if e.0.starts_with("server sent") => {
                return Err(Failure::new(phase, "unparseable reply"))
            }
            Err(e) => return Err(Failure::new(phase, e.0)),
        };
        match (want, m) {
            ("hello", ServerMessage::Hello { uaid, status, .. }) => {
                return Ok((Some(u32::from(status)), Some(uaid), None))
            }
            (
                "register",
                ServerMessage::Register {
                    status,
                    push_endpoint,
                    ..
                },
            ) => return Ok((Some(u32::from(status)), None, push_endpoint)),
            _ => {}
        }
    }
    Err(Failure::new(phase, "no reply among 64 messages"))
}

/// Sends `hello`, following `broadcasts` (none if empty), and returns the
/// uaid the server assigned (or confirmed).
pub async fn hello_following(
    ws: &mut Ws,
    uaid: Option<&str>,
    channel_ids: &[Uuid],
    broadcasts: &BTreeMap<String, String>,
) -> Result<String, Failure> {
    send_text(
        ws,
        hello_json_following(uaid, channel_ids, broadcasts),
        "hello",
    )
    .await?;
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
    fn notifications_and_what_is_malformed() {
        let malformed = AtomicU64::new(0);
        let n = notification(
            r#"{"messageType":"notification","channelID":"c","version":"v","data":"d"}"#,
            &malformed,
        )
        .expect("a notification");
        assert_eq!((&*n.channel_id, &*n.version), ("c", "v"));
        assert_eq!(n.data.as_deref(), Some("d"));
        assert!(notification("{}", &malformed).is_none());
        assert_eq!(malformed.load(Relaxed), 0);
        assert!(notification("not json", &malformed).is_none());
        assert!(notification(r#"{"messageType":"notification"}"#, &malformed).is_none());
        assert_eq!(malformed.load(Relaxed), 2);
    }

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
    fn hello_can_follow_broadcasts() {
        let follow: BTreeMap<String, String> = [("a/b".to_string(), "\"7\"".to_string())].into();
        let v: serde_json::Value =
            serde_json::from_str(&hello_json_following(None, &[], &follow)).unwrap();
        assert_eq!(v["broadcasts"]["a/b"], "\"7\"");
        assert!(v.get("uaid").is_none());
        let v: serde_json::Value =
            serde_json::from_str(&hello_json_following(Some("u"), &[], &follow)).unwrap();
        assert_eq!(v["broadcasts"]["a/b"], "\"7\"");
        assert_eq!(v["uaid"], "u");
        let plain: serde_json::Value = serde_json::from_str(&hello_json(None, &[])).unwrap();
        assert_eq!(plain["broadcasts"], serde_json::json!({}));
    }

    fn response(key: &str, extra: &str) -> String {
        let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
        format!(
            "HTTP/1.1 101 Switching Protocols\r\nupgrade: WebSocket\r\nConnection: keep-alive, Upgrade\r\n\
             Sec-WebSocket-Accept: {accept}\r\n{extra}\r\n"
        )
    }

    /// `check_response` on a response head as a server writes it.
    fn check_head(head: &str, key: &str) -> Result<Option<&'static str>, String> {
        let mut lines = head.split("\r\n");
        let status = lines
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .and_then(|s| s.parse::<http::StatusCode>().ok())
            .expect("status line");
        let mut headers = http::HeaderMap::new();
        for line in lines.filter(|l| !l.is_empty()) {
            let (name, value) = line.split_once(':').expect("header line");
            headers.append(
                header::HeaderName::from_bytes(name.trim().as_bytes()).unwrap(),
                value.trim().parse().unwrap(),
            );
        }
        check_response(status, &headers, key)
    }

    #[test]
    fn handshake_accepts_push_notification_or_no_subprotocol() {
        let key = "dGhlIHNhbXBsZSBub25jZQ==";
        let with = response(key, "Sec-WebSocket-Protocol: push-notification\r\n");
        assert_eq!(check_head(&with, key), Ok(Some(SUBPROTOCOL)));
        // autopush-rs selects none: accepted, and reported as such.
        assert_eq!(check_head(&response(key, ""), key), Ok(None));
        let other = response(key, "Sec-WebSocket-Protocol: chat\r\n");
        let e = check_head(&other, key).unwrap_err();
        assert!(
            e.contains("\"chat\"") && e.contains("not push-notification"),
            "{e}"
        );
        let two = response(
            key,
            "Sec-WebSocket-Protocol: push-notification\r\nSec-WebSocket-Protocol: chat\r\n",
        );
        assert!(check_head(&two, key).is_err());
        // Not an upgrade, or not to our key.
        assert_eq!(
            check_head("HTTP/1.1 503 Service Unavailable\r\n\r\n", key),
            Err("http 503".into())
        );
        let wrong = response("AAAAAAAAAAAAAAAAAAAAAA==", "");
        assert!(check_head(&wrong, key).unwrap_err().contains("Accept"));
        let no_upgrade = with.replace("upgrade: WebSocket\r\n", "");
        assert!(check_head(&no_upgrade, key).is_err());
        let ext = response(key, "Sec-WebSocket-Extensions: permessage-deflate\r\n");
        assert!(check_head(&ext, key).is_err());
    }

    /// A one-shot server answering the handshake with `extra` headers, then
    /// sending one text frame right behind the response head.
    async fn serve_once(extra: &'static str) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("ws://{}/", l.local_addr().unwrap());
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut buf = vec![0u8; 4096];
            let mut got = Vec::new();
            while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = s.read(&mut buf).await.unwrap();
                got.extend_from_slice(&buf[..n]);
            }
            // Header names arrive in lower case from hyper; HTTP says case
            // does not matter there.
            let req = String::from_utf8(got).unwrap();
            let value = |name: &str| {
                req.lines()
                    .find_map(|l| {
                        let (n, v) = l.split_once(':')?;
                        n.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
                    })
                    .unwrap()
            };
            assert_eq!(value("Sec-WebSocket-Protocol"), "push-notification");
            let key = value("Sec-WebSocket-Key");
            let mut out = response(&key, extra).into_bytes();
            // An unmasked server text frame "{}" in the same write.
            out.extend_from_slice(&[0x81, 2, b'{', b'}']);
            s.write_all(&out).await.unwrap();
            // Hold the socket until the client is done.
            let _ = s.read(&mut buf).await;
        });
        url
    }

    #[tokio::test]
    async fn open_records_what_the_server_selected() {
        let before = selected_subprotocols();
        let n = |m: &BTreeMap<String, u64>, k: &str| m.get(k).copied().unwrap_or(0);
        for (extra, _) in [
            ("", "none"),
            ("Sec-WebSocket-Protocol: push-notification\r\n", SUBPROTOCOL),
        ] {
            let t = Target::new(&serve_once(extra).await).await.unwrap();
            let mut ws = open(&t, None).await.unwrap();
            // Bytes that arrived with the response head are not lost.
            match ws.next().await {
                Some(Ok(Message::Text(t))) => assert_eq!(t.as_str(), "{}"),
                other => panic!("{other:?}"),
            }
        }
        let after = selected_subprotocols();
        assert!(n(&after, "none") > n(&before, "none"));
        assert!(n(&after, SUBPROTOCOL) > n(&before, SUBPROTOCOL));
        let t = Target::new(&serve_once("Sec-WebSocket-Protocol: chat\r\n").await)
            .await
            .unwrap();
        let f = open(&t, None).await.err().unwrap();
        assert_eq!(f.phase, "handshake");
        assert!(f.reason.contains("chat"), "{}", f.reason);
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
