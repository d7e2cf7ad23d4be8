//! Test harness: a real Herald process, real websocket user agents with their
//! own P-256 keys, and an application server whose VAPID signatures and
//! RFC 8291 encryption come from independent libraries (`jsonwebtoken` with
//! `p256`, and `ece`).
#![allow(dead_code)]

pub mod bridges;
pub mod fernet;
pub mod listen;
pub mod process;
pub mod redis;
pub mod tools;

use base64::Engine;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

pub fn unb64(s: &str) -> Vec<u8> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(s.trim_end_matches('='))
        .expect("base64url")
}

pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A free port below the kernel's ephemeral range (32768 and up here), so
/// that a Herald restarted on its port does not find it taken by some
/// test's outgoing connection meanwhile. The Redis harness uses 20000+.
/// Ports are handed out in turn from a random start, so tests running at
/// once in this process never pick the same one.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let start = *START.get_or_init(|| rand::random::<u16>() % 8000);
    static START: std::sync::OnceLock<u16> = std::sync::OnceLock::new();
    for _ in 0..8000 {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = 12000 + (start.wrapping_add(n)) % 8000;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in 12000..20000")
}

/// `herald serve ARGS` expected to stop at start (a refused setting, a
/// taken data directory): its exit code and stderr. Panics if it is still
/// running after 20 s, killing it first.
pub fn serve_refused(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let tmp = tempfile::tempdir().unwrap();
    let err = tmp.path().join("stderr");
    let mut child = Command::new(env!("CARGO_BIN_EXE_herald"))
        .arg("serve")
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .expect("herald starts");
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "herald serve {args:?} kept running:\n{}",
                std::fs::read_to_string(&err).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (status.code(), std::fs::read_to_string(&err).unwrap())
}

/// The quotas, on by default in Herald, off in tests that do not set them
/// (in their environment): many tests push quickly to one subscription.
pub const QUOTAS_OFF: [(&str, &str); 4] = [
    ("HERALD_UA_RATE_LIMIT", "off"),
    ("HERALD_SUBSCRIPTION_RATE_LIMIT", "off"),
    ("HERALD_SENDER_RATE_LIMIT", "off"),
    ("HERALD_ANONYMOUS_RATE_LIMIT", "off"),
];

/// A Herald process on an ephemeral port with its own data dir.
pub struct Herald {
    pub port: u16,
    pub data_dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    child: Option<Child>,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// A command the herald binary runs under from the next `restart()`
    /// (`strace ...`), empty for none; with one, `pid()` and `kill9()` are
    /// the wrapper's, not Herald's.
    pub wrapper: Vec<String>,
    log: PathBuf,
    /// The private listener serving /metrics, which the harness gives every
    /// Herald unless the test sets `HERALD_METRICS_LISTEN` or
    /// `HERALD_METRICS_PUBLIC` itself.
    metrics_port: Option<u16>,
}

impl Herald {
    pub async fn start() -> Herald {
        Self::start_with(&[], &[]).await
    }

    /// `args` are extra `herald serve` flags; `env` extra environment.
    pub async fn start_with(args: &[&str], env: &[(&str, &str)]) -> Herald {
        let tmp = tempfile::tempdir().unwrap();
        let sets_metrics = env
            .iter()
            .any(|(k, _)| *k == "HERALD_METRICS_LISTEN" || *k == "HERALD_METRICS_PUBLIC");
        let metrics_port = (!sets_metrics).then(free_port);
        let mut env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        if let Some(p) = metrics_port {
            env.push(("HERALD_METRICS_LISTEN".into(), format!("127.0.0.1:{p}")));
        }
        for (k, v) in QUOTAS_OFF {
            if !env.iter().any(|(set, _)| set == k) {
                env.push((k.to_string(), v.to_string()));
            }
        }
        let mut h = Herald {
            port: free_port(),
            data_dir: tmp.path().join("data"),
            log: tmp.path().join("herald.log"),
            _tmp: Some(tmp),
            child: None,
            args: args.iter().map(|s| s.to_string()).collect(),
            env,
            wrapper: Vec::new(),
            metrics_port,
        };
        h.spawn().await;
        h
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Where GET /metrics is served: the harness's private listener, the
    /// test's own `HERALD_METRICS_LISTEN`, or else the main listener.
    pub fn metrics_url(&self) -> String {
        if let Some(p) = self.metrics_port {
            return format!("http://127.0.0.1:{p}/metrics");
        }
        match self.env.iter().find(|(k, _)| k == "HERALD_METRICS_LISTEN") {
            Some((_, addr)) => format!("http://{addr}/metrics"),
            None => format!("{}/metrics", self.url()),
        }
    }

    pub fn ws_url(&self) -> String {
        format!("ws://127.0.0.1:{}/", self.port)
    }

    async fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let bin = env!("CARGO_BIN_EXE_herald");
        let mut cmd = match self.wrapper.split_first() {
            Some((w, rest)) => {
                let mut c = Command::new(w);
                c.args(rest).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        let child = cmd
            .arg("serve")
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", self.port))
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(&self.args)
            .env("RUST_LOG", "herald=debug")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("herald starts");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        let tls = self.env.iter().any(|(k, _)| k == "HERALD_TLS_CERT");
        loop {
            if tls {
                // Plain HTTP cannot probe a TLS listener; a TCP accept will do.
                if TcpStream::connect(("127.0.0.1", self.port)).await.is_ok() {
                    return;
                }
            } else if let Ok(r) = http(self, "GET", "/health", &[], vec![]).await {
                if r.status == 200 {
                    return;
                }
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("herald exited with {status} at start:\n{}", self.logs());
            }
            assert!(
                Instant::now() < deadline,
                "herald did not answer /health:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(s) = child.try_wait().unwrap() {
                return s;
            }
            assert!(Instant::now() < deadline, "herald did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the process to exit on its own (after a signal sent elsewhere).
    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(s) = child.try_wait().unwrap() {
                return s;
            }
            assert!(Instant::now() < deadline, "herald did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL: no shutdown, no flush.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("running");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// Starts again on the same port and data dir.
    pub async fn restart(&mut self) {
        assert!(self.child.is_none(), "stop or kill first");
        self.spawn().await;
    }
}

impl Drop for Herald {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub struct Resp {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|_| {
            panic!(
                "not JSON ({}): {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .map(|v| v.to_str().unwrap().to_string())
    }
    pub fn errno(&self) -> u64 {
        self.json()["errno"].as_u64().expect("errno")
    }

    /// A storage failure as every application server must see it: 503,
    /// errno 201, `Retry-After`, and the fixed message only. Nothing of the
    /// engine's own error (hosts, ports, files, RocksDB's or Redis's words)
    /// may reach the body.
    pub fn assert_storage_unavailable(&self) {
        let body = String::from_utf8_lossy(&self.body);
        assert_eq!(self.status, 503, "{body}");
        assert_eq!(self.errno(), 201, "{body}");
        assert!(self.header("retry-after").is_some(), "{body}");
        assert_eq!(
            self.json()["message"],
            "storage unavailable; retry later",
            "{body}"
        );
        for engine_text in [
            "IO error",
            "No space",
            "Connection refused",
            "redis",
            "rocksdb",
            "127.0.0.1",
            "os error",
        ] {
            assert!(!body.contains(engine_text), "{engine_text:?} in {body}");
        }
    }
}

pub async fn request(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> Result<Resp, String> {
    let client: Client<_, Full<bytes::Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut b = http::Request::builder().method(method).uri(url);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let req = b
        .body(Full::new(bytes::Bytes::from(body)))
        .map_err(|e| e.to_string())?;
    let resp = tokio::time::timeout(Duration::from_secs(10), client.request(req))
        .await
        .map_err(|_| "timeout".to_string())?
        .map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes()
        .to_vec();
    Ok(Resp {
        status,
        headers,
        body,
    })
}

pub async fn http(
    h: &Herald,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> Result<Resp, String> {
    request(method, &format!("{}{path}", h.url()), headers, body).await
}

/// A user agent's subscription keys (RFC 8291 receiver side).
/// A payload in the legacy `aesgcm` coding as the `ece` crate writes it: the
/// `Encryption` and `Crypto-Key` header values and the body.
pub struct LegacyAesgcm {
    pub encryption: String,
    pub crypto_key: String,
    pub body: Vec<u8>,
}

impl LegacyAesgcm {
    pub fn encrypt(public: &[u8], auth: &[u8], plaintext: &[u8]) -> LegacyAesgcm {
        let block = ece::legacy::encrypt_aesgcm(public, auth, plaintext).expect("aesgcm");
        let headers = block.headers(None);
        let get = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.clone())
                .unwrap_or_else(|| panic!("ece wrote no {name}"))
        };
        LegacyAesgcm {
            encryption: get("Encryption"),
            crypto_key: get("Crypto-Key"),
            body: unb64(&block.body()),
        }
    }
}

pub struct UaKeys {
    pub components: ece::EcKeyComponents,
    pub public: Vec<u8>,
    pub auth: [u8; 16],
}

impl UaKeys {
    pub fn new() -> UaKeys {
        let (pair, auth) = ece::generate_keypair_and_auth_secret().unwrap();
        UaKeys {
            components: pair.raw_components().unwrap(),
            public: pair.pub_as_raw().unwrap(),
            auth,
        }
    }

    pub fn decrypt(&self, body: &[u8]) -> Vec<u8> {
        ece::decrypt(&self.components, &self.auth, body).expect("decrypts")
    }
}

/// An application server: a VAPID key pair signing real ES256 JWTs.
pub struct AppServer {
    key: p256::ecdsa::SigningKey,
}

impl AppServer {
    pub fn new() -> AppServer {
        AppServer {
            key: p256::ecdsa::SigningKey::random(&mut rand::thread_rng()),
        }
    }

    pub fn public_raw(&self) -> Vec<u8> {
        self.key
            .verifying_key()
            .to_encoded_point(false)
            .as_bytes()
            .to_vec()
    }

    pub fn public(&self) -> String {
        b64(&self.public_raw())
    }

    pub fn jwt(&self, claims: Value) -> String {
        use p256::pkcs8::EncodePrivateKey;
        let pem = self.key.to_pkcs8_pem(Default::default()).unwrap();
        let key = jsonwebtoken::EncodingKey::from_ec_pem(pem.as_bytes()).unwrap();
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256),
            &claims,
            &key,
        )
        .unwrap()
    }

    /// `Authorization` for an endpoint with origin `aud`.
    pub fn authorization(&self, aud: &str) -> String {
        let jwt =
            self.jwt(json!({"aud": aud, "exp": now() + 3600, "sub": "mailto:ops@example.com"}));
        format!("vapid t={jwt}, k={}", self.public())
    }
}

impl AppServer {
    /// `Authorization` for an endpoint with origin `aud`, naming `sub` as
    /// the sender's contact in its claims.
    pub fn authorization_as(&self, aud: &str, sub: &str) -> String {
        let jwt = self.jwt(json!({"aud": aud, "exp": now() + 3600, "sub": sub}));
        format!("vapid t={jwt}, k={}", self.public())
    }
}

/// Encrypts for a subscription with the independent `ece` library.
pub fn encrypt(keys: &UaKeys, plaintext: &[u8]) -> Vec<u8> {
    ece::encrypt(&keys.public, &keys.auth, plaintext).unwrap()
}

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A websocket user agent speaking the push protocol.
pub struct Ua {
    pub ws: Ws,
    pub uaid: String,
}

impl Ua {
    pub async fn connect(h: &Herald) -> Ua {
        Ua::connect_url(&h.ws_url()).await
    }

    /// Connects to a Herald this harness did not start (a container, an
    /// installed package), by its websocket URL.
    pub async fn connect_url(ws_url: &str) -> Ua {
        let mut req = ws_url.into_client_request().unwrap();
        req.headers_mut().insert(
            "sec-websocket-protocol",
            "push-notification".parse().unwrap(),
        );
        let (ws, resp) = tokio_tungstenite::connect_async(req)
            .await
            .expect("websocket connects");
        assert_eq!(
            resp.headers()
                .get("sec-websocket-protocol")
                .map(|v| v.to_str().unwrap()),
            Some("push-notification")
        );
        Ua {
            ws,
            uaid: String::new(),
        }
    }

    /// Connects and says hello (as a new user agent when `uaid` is None).
    pub async fn hello(h: &Herald, uaid: Option<&str>) -> Ua {
        Ua::hello_url(&h.ws_url(), uaid).await
    }

    /// [`Ua::hello`] to a Herald at `ws_url`.
    pub async fn hello_url(ws_url: &str, uaid: Option<&str>) -> Ua {
        let mut ua = Ua::connect_url(ws_url).await;
        let mut msg = json!({"messageType": "hello", "use_webpush": true, "broadcasts": {}});
        if let Some(u) = uaid {
            msg["uaid"] = json!(u);
        }
        ua.send(msg).await;
        let reply = ua.recv().await;
        assert_eq!(reply["messageType"], "hello");
        assert_eq!(reply["status"], 200);
        ua.uaid = reply["uaid"].as_str().unwrap().to_string();
        ua
    }

    pub async fn send(&mut self, v: Value) {
        self.ws.send(Message::text(v.to_string())).await.unwrap();
    }

    pub async fn send_text(&mut self, t: &str) {
        self.ws.send(Message::text(t.to_string())).await.unwrap();
    }

    /// The next JSON message (pings and pongs skipped), within 5 s.
    pub async fn recv(&mut self) -> Value {
        self.try_recv(Duration::from_secs(5))
            .await
            .expect("a message within 5 s")
    }

    pub async fn try_recv(&mut self, within: Duration) -> Option<Value> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let frame = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .ok()??;
            match frame {
                Ok(Message::Text(t)) => return Some(serde_json::from_str(t.as_str()).unwrap()),
                Ok(Message::Close(f)) => panic!("closed by server: {f:?}"),
                Ok(_) => continue,
                Err(e) => panic!("websocket error: {e}"),
            }
        }
    }

    /// Waits for the server to close; returns the close code and reason.
    pub async fn closed(&mut self, within: Duration) -> (u16, String) {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => panic!("not closed within {within:?}"),
                Ok(None) => return (1006, String::new()),
                Ok(Some(Ok(Message::Close(Some(f))))) => {
                    return (f.code.into(), f.reason.to_string())
                }
                Ok(Some(Ok(Message::Close(None)))) => return (1005, String::new()),
                Ok(Some(Ok(_))) => continue,
                Ok(Some(Err(_))) => return (1006, String::new()),
            }
        }
    }

    /// Like [`Ua::closed`], and then the server must end the TCP connection
    /// cleanly (after the client's answering Close), not reset it.
    pub async fn closed_cleanly(&mut self, within: Duration) -> (u16, String) {
        let close = self.closed(within).await;
        assert_ne!(close.0, 1006, "no close frame from the server");
        match tokio::time::timeout(within, self.ws.next()).await {
            Ok(None) => close,
            other => panic!("after the server's close {close:?}: {other:?}"),
        }
    }

    /// Starts the closing handshake with `code` and returns the code and
    /// reason of the server's answering Close frame: (1006, "") when the
    /// connection ended without one. Panics if the server then fails to
    /// end the TCP connection cleanly within `within`.
    pub async fn close_handshake(&mut self, code: u16, within: Duration) -> (u16, String) {
        use tokio_tungstenite::tungstenite::protocol::CloseFrame;
        let frame = CloseFrame {
            code: code.into(),
            reason: "client leaving".into(),
        };
        self.ws.send(Message::Close(Some(frame))).await.unwrap();
        let answer = self.closed(within).await;
        if answer.0 != 1006 {
            // After the handshake the server closes TCP: a clean end of
            // stream, not a reset.
            match tokio::time::timeout(within, self.ws.next()).await {
                Ok(None) => {}
                other => panic!("after the close handshake: {other:?}"),
            }
        }
        answer
    }

    pub async fn register(&mut self, channel: &str, key: Option<&str>) -> Value {
        let mut msg = json!({"messageType": "register", "channelID": channel});
        if let Some(k) = key {
            msg["key"] = json!(k);
        }
        self.send(msg).await;
        let r = self.recv().await;
        assert_eq!(r["messageType"], "register");
        r
    }

    /// Registers a fresh channel and returns (channelID, endpoint).
    pub async fn subscribe(&mut self, app_key: Option<&str>) -> (String, String) {
        let ch = uuid::Uuid::new_v4().to_string();
        let r = self.register(&ch, app_key).await;
        assert_eq!(r["status"], 200, "{r}");
        (ch, r["pushEndpoint"].as_str().unwrap().to_string())
    }

    pub async fn ack(&mut self, n: &Value) {
        self.send(json!({"messageType": "ack", "updates": [{"channelID": n["channelID"], "version": n["version"], "code": 100}]}))
            .await;
    }

    /// Expects a notification; returns it.
    pub async fn notification(&mut self) -> Value {
        let n = self.recv().await;
        assert_eq!(n["messageType"], "notification", "{n}");
        n
    }
}

/// A subscription whose user agent has gone offline: (uaid, endpoint).
pub async fn offline_subscription(h: &Herald, app_key: Option<&str>) -> (String, String) {
    let mut ua = Ua::hello(h, None).await;
    let (_, ep) = ua.subscribe(app_key).await;
    let uaid = ua.uaid.clone();
    drop(ua);
    // Let the server see the close before anything is sent.
    tokio::time::sleep(Duration::from_millis(100)).await;
    (uaid, ep)
}

/// Sends an encrypted push as an application server would.
pub async fn push(
    endpoint: &str,
    app: Option<&AppServer>,
    aud: &str,
    keys: &UaKeys,
    text: &str,
    extra: &[(&str, &str)],
) -> Resp {
    let body = encrypt(keys, text.as_bytes());
    let auth = app.map(|a| a.authorization(aud));
    let mut headers: Vec<(&str, &str)> = vec![("content-encoding", "aes128gcm")];
    if !extra.iter().any(|(k, _)| k.eq_ignore_ascii_case("ttl")) {
        headers.push(("ttl", "60"));
    }
    if let Some(a) = &auth {
        headers.push(("authorization", a));
    }
    headers.extend_from_slice(extra);
    request("POST", endpoint, &headers, body)
        .await
        .expect("push request")
}

/// Decrypts a notification's payload with the subscription keys.
pub fn payload(keys: &UaKeys, n: &Value) -> String {
    assert_eq!(n["headers"]["encoding"], "aes128gcm");
    String::from_utf8(keys.decrypt(&unb64(n["data"].as_str().unwrap()))).unwrap()
}

pub fn path_exists(p: &Path) -> bool {
    p.exists()
}

/// The text of GET /metrics, wherever this Herald serves it.
pub async fn metrics_text(h: &Herald) -> String {
    let r = request("GET", &h.metrics_url(), &[], vec![]).await.unwrap();
    assert_eq!(r.status, 200, "GET {}", h.metrics_url());
    String::from_utf8(r.body).unwrap()
}

/// The value of the first metric line starting with `line_start` (0 if absent).
pub async fn metric(h: &Herald, line_start: &str) -> f64 {
    let text = metrics_text(h).await;
    text.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .map(|v| v.parse().unwrap())
        .unwrap_or(0.0)
}
