//! The load generator against a minimal in-test push service, so its
//! accounting can be checked without Herald — including against a server
//! that loses messages, sends garbage or hands out endpoints off loopback.

mod common;

use bytes::Bytes;
use common::*;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

/// The websocket subprotocol the mock selects in its handshake.
#[derive(Clone, Copy, Default, PartialEq)]
enum Subprotocol {
    /// `push-notification`, as Herald (and Firefox's expectation).
    #[default]
    Push,
    /// None at all, as autopush-rs.
    None,
    /// One the user agent never offered.
    Other,
}

/// The token the mock's broadcast API takes.
const BROADCAST_TOKEN: &str = "mock-broadcast-token-0123";

#[derive(Clone, Copy, Default)]
struct Faults {
    subprotocol: Subprotocol,
    /// Broadcast changes: skip every Nth follower (it never hears of it).
    broadcast_skip_every: u64,
    /// Broadcast changes: tell every Nth follower twice.
    broadcast_twice_every: u64,
    /// Broadcast changes go to every connection, following or not.
    broadcast_to_everyone: bool,
    /// Accept but never deliver every Nth message.
    drop_every: u64,
    /// Send a non-JSON text frame before every Nth notification.
    garbage_every: u64,
    /// Hand out endpoints on this (non-loopback) host.
    foreign_endpoints: bool,
    /// Close a websocket with 1008 "rate limit" once it has sent more than
    /// this many ack frames (0: never), as Herald did before issue 9.
    close_after_acks: u64,
    /// Answer every Nth POST with 429 without storing it.
    status_429_every: u64,
    /// Notifications in flight (sent, not acked) per connection; the rest
    /// wait their turn, and go back to the store if the connection ends
    /// (0: no limit).
    window: usize,
}

#[derive(Default)]
struct Ua {
    conn: u64,
    tx: Option<mpsc::UnboundedSender<String>>,
    queue: Vec<String>,
}

/// A connection that said hello, and the broadcasts it follows.
struct Listener {
    conn: u64,
    follows: Vec<String>,
    tx: mpsc::UnboundedSender<String>,
}

struct State {
    /// Broadcast id -> current version (the operator API's).
    broadcasts: Mutex<HashMap<String, String>>,
    listeners: Mutex<Vec<Listener>>,
    puts: AtomicU64,
    /// The HTTP port endpoints name (node 0's): the "public URL" every node
    /// shares.
    http_port: u16,
    faults: Faults,
    uas: Mutex<HashMap<String, Ua>>,
    counter: AtomicU64,
    /// Per node: hellos answered and POSTs received.
    hellos: Vec<AtomicU64>,
    posts: Vec<AtomicU64>,
}

struct Mock {
    ws_ports: Vec<u16>,
    http_ports: Vec<u16>,
    state: Arc<State>,
    _rt: tokio::runtime::Runtime,
}

impl Mock {
    fn start(faults: Faults) -> Mock {
        Mock::start_nodes(faults, 1)
    }

    /// `nodes` nodes sharing one store, as Herald nodes on one Redis: any
    /// node takes any user agent and any POST, and endpoints always name
    /// node 0's HTTP port.
    fn start_nodes(faults: Faults, nodes: usize) -> Mock {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let listeners: Vec<(TcpListener, TcpListener)> = rt.block_on(async {
            let mut v = Vec::new();
            for _ in 0..nodes {
                v.push((
                    TcpListener::bind("127.0.0.1:0").await.expect("bind"),
                    TcpListener::bind("127.0.0.1:0").await.expect("bind"),
                ));
            }
            v
        });
        let port = |l: &TcpListener| l.local_addr().expect("addr").port();
        let ws_ports: Vec<u16> = listeners.iter().map(|(w, _)| port(w)).collect();
        let http_ports: Vec<u16> = listeners.iter().map(|(_, h)| port(h)).collect();
        let state = Arc::new(State {
            broadcasts: Mutex::new(HashMap::new()),
            listeners: Mutex::new(Vec::new()),
            puts: AtomicU64::new(0),
            http_port: http_ports[0],
            faults,
            uas: Mutex::new(HashMap::new()),
            counter: AtomicU64::new(0),
            hellos: (0..nodes).map(|_| AtomicU64::new(0)).collect(),
            posts: (0..nodes).map(|_| AtomicU64::new(0)).collect(),
        });
        for (node, (ws, http)) in listeners.into_iter().enumerate() {
            let st = state.clone();
            rt.spawn(async move {
                while let Ok((s, _)) = ws.accept().await {
                    tokio::spawn(ws_conn(s, st.clone(), node));
                }
            });
            let st = state.clone();
            rt.spawn(async move {
                while let Ok((s, _)) = http.accept().await {
                    let st = st.clone();
                    tokio::spawn(async move {
                        let svc = service_fn(move |req| post(req, st.clone(), node));
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(s), svc)
                            .await;
                    });
                }
            });
        }
        Mock {
            ws_ports,
            http_ports,
            state,
            _rt: rt,
        }
    }

    fn url(&self) -> String {
        format!("ws://127.0.0.1:{}/", self.ws_ports[0])
    }

    /// Every node's websocket URL, comma-separated.
    fn urls(&self) -> String {
        let v: Vec<String> = self
            .ws_ports
            .iter()
            .map(|p| format!("ws://127.0.0.1:{p}/"))
            .collect();
        v.join(",")
    }

    fn http(&self, node: usize) -> String {
        format!("http://127.0.0.1:{}", self.http_ports[node])
    }

    fn hellos(&self) -> Vec<u64> {
        self.state.hellos.iter().map(|n| n.load(Relaxed)).collect()
    }

    fn posts(&self) -> Vec<u64> {
        self.state.posts.iter().map(|n| n.load(Relaxed)).collect()
    }
}

type MockWs = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

/// The websocket handshake, selecting the subprotocol the faults ask for.
async fn accept(s: tokio::net::TcpStream, st: &State) -> Option<MockWs> {
    let selected = match st.faults.subprotocol {
        Subprotocol::Push => Some("push-notification"),
        Subprotocol::None => None,
        Subprotocol::Other => Some("chat"),
    };
    // The callback's error type is fixed by tungstenite.
    #[allow(clippy::result_large_err)]
    let cb = |_req: &tokio_tungstenite::tungstenite::handshake::server::Request,
              mut resp: tokio_tungstenite::tungstenite::handshake::server::Response| {
        if let Some(p) = selected {
            resp.headers_mut()
                .insert("Sec-WebSocket-Protocol", p.parse().expect("header"));
        }
        Ok(resp)
    };
    tokio_tungstenite::accept_hdr_async(s, cb).await.ok()
}

/// What one client frame calls for.
enum Step {
    Reply(String),
    Nothing,
    /// The client broke the protocol: drop the connection.
    Drop,
    /// Too many acks (`close_after_acks`): close with 1008 as Herald did.
    RateLimit,
}

/// One websocket connection of the mock.
struct Conn {
    id: u64,
    node: usize,
    /// Notifications for this connection (through the window), and
    /// broadcast frames (sent at once, outside it).
    tx: mpsc::UnboundedSender<String>,
    btx: mpsc::UnboundedSender<String>,
    uaid: Option<String>,
    pending: VecDeque<String>,
    in_flight: usize,
    acks: u64,
}

impl Conn {
    fn on_frame(&mut self, st: &State, v: &Value) -> Step {
        match v["messageType"].as_str() {
            Some("hello") => Step::Reply(self.hello(st, v)),
            Some("register") => {
                let (Some(u), Some(ch)) = (self.uaid.as_deref(), v["channelID"].as_str()) else {
                    return Step::Drop;
                };
                let host = if st.faults.foreign_endpoints {
                    "10.9.9.9".to_string()
                } else {
                    format!("127.0.0.1:{}", st.http_port)
                };
                Step::Reply(json!({"messageType":"register","channelID":ch,"status":200,"pushEndpoint":format!("http://{host}/push/{u}/{ch}")}).to_string())
            }
            Some("ack") => {
                self.acks += 1;
                let n = v["updates"].as_array().map_or(0, |u| u.len());
                self.in_flight = self.in_flight.saturating_sub(n);
                if st.faults.close_after_acks > 0 && self.acks > st.faults.close_after_acks {
                    return Step::RateLimit;
                }
                Step::Nothing
            }
            Some(_) => Step::Nothing,
            None => Step::Reply("{}".to_string()),
        }
    }

    /// Takes the user agent (new, or the one named), hands this connection
    /// what was stored for it, and follows the broadcasts it names; the
    /// reply names those whose version differs, as Herald's does.
    fn hello(&mut self, st: &State, v: &Value) -> String {
        let id = v["uaid"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| format!("{:032x}", st.counter.fetch_add(1, Relaxed) + 0xabc0_0000));
        let queued = {
            let mut uas = st.uas.lock().expect("lock");
            let ua = uas.entry(id.clone()).or_default();
            ua.conn = self.id;
            ua.tx = Some(self.tx.clone());
            std::mem::take(&mut ua.queue)
        };
        self.uaid = Some(id.clone());
        st.hellos[self.node].fetch_add(1, Relaxed);
        let follows: Vec<String> = v["broadcasts"]
            .as_object()
            .map(|b| b.keys().cloned().collect())
            .unwrap_or_default();
        let mut delta = serde_json::Map::new();
        {
            let current = st.broadcasts.lock().expect("lock");
            for id in &follows {
                let known = v["broadcasts"][id].as_str();
                match current.get(id) {
                    Some(cur) if Some(cur.as_str()) != known => {
                        delta.insert(id.clone(), cur.clone().into());
                    }
                    Some(_) => {}
                    None => {
                        delta.insert("errors".into(), json!({id: "Broadcast not found"}));
                    }
                }
            }
        }
        st.listeners.lock().expect("lock").push(Listener {
            conn: self.id,
            follows,
            tx: self.btx.clone(),
        });
        // Queued behind the reply: the loop sends them on its next turn.
        for q in queued {
            let _ = self.tx.send(q);
        }
        json!({"messageType":"hello","uaid":id,"status":200,"use_webpush":true,"broadcasts":delta})
            .to_string()
    }

    /// The connection is over: it stops listening, and what it never sent
    /// goes back to the store (or to the user agent's newer connection).
    fn hand_back(mut self, st: &State, mut rx: mpsc::UnboundedReceiver<String>) {
        st.listeners
            .lock()
            .expect("lock")
            .retain(|l| l.conn != self.id);
        let Some(u) = self.uaid.take() else { return };
        rx.close();
        while let Ok(t) = rx.try_recv() {
            self.pending.push_back(t);
        }
        if let Some(ua) = st.uas.lock().expect("lock").get_mut(&u) {
            if ua.conn == self.id {
                ua.tx = None;
            }
            for t in self.pending {
                match &ua.tx {
                    Some(tx) => {
                        if let Err(e) = tx.send(t) {
                            ua.queue.push(e.0);
                        }
                    }
                    None => ua.queue.push(t),
                }
            }
        }
    }
}

/// Closes with 1008 "rate limit", as Herald did before issue 9, and lets
/// the user agent answer the close handshake.
async fn close_rate_limited(ws: &mut MockWs) {
    let frame = CloseFrame {
        code: CloseCode::Policy,
        reason: "rate limit: more than 50 messages per second".into(),
    };
    let _ = ws.send(Message::Close(Some(frame))).await;
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
}

async fn ws_conn(s: tokio::net::TcpStream, st: Arc<State>, node: usize) {
    let Some(mut ws) = accept(s, &st).await else {
        return;
    };
    let (tx, mut rx) = mpsc::unbounded_channel::<String>();
    let (btx, mut brx) = mpsc::unbounded_channel::<String>();
    let mut c = Conn {
        id: st.counter.fetch_add(1, Relaxed) + 1_000_000,
        node,
        tx,
        btx,
        uaid: None,
        pending: VecDeque::new(),
        in_flight: 0,
        acks: 0,
    };
    let window = st.faults.window;
    'conn: loop {
        while window == 0 || c.in_flight < window {
            let Some(t) = c.pending.pop_front() else {
                break;
            };
            if ws.send(Message::text(t)).await.is_err() {
                break 'conn;
            }
            c.in_flight += 1;
        }
        tokio::select! {
            out = rx.recv() => match out {
                Some(t) => c.pending.push_back(t),
                None => break,
            },
            Some(b) = brx.recv() => {
                if ws.send(Message::text(b)).await.is_err() {
                    break;
                }
            }
            msg = ws.next() => {
                let Some(Ok(Message::Text(t))) = msg else {
                    if matches!(msg, Some(Ok(Message::Ping(_))) | Some(Ok(Message::Pong(_)))) { continue }
                    break;
                };
                let v: Value = serde_json::from_str(t.as_str()).unwrap_or(Value::Null);
                match c.on_frame(&st, &v) {
                    Step::Reply(reply) => {
                        if ws.send(Message::text(reply)).await.is_err() {
                            break;
                        }
                    }
                    Step::Nothing => {}
                    Step::Drop => break,
                    Step::RateLimit => {
                        close_rate_limited(&mut ws).await;
                        break;
                    }
                }
            }
        }
    }
    c.hand_back(&st, rx);
}

/// The broadcast API, as Herald's: `PUT /v1/broadcasts/<id>` (the id may
/// hold '/'), `GET /v1/broadcasts`, behind a bearer token. A change goes to
/// every connection following the id (or, with the faults, not quite).
async fn broadcast_api(
    req: Request<hyper::body::Incoming>,
    st: Arc<State>,
) -> Result<Response<Full<Bytes>>, hyper::Error> {
    let reply = |code: u16, body: String| {
        Response::builder()
            .status(code)
            .header("Content-Type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .expect("response")
    };
    let authorised = req
        .headers()
        .get("authorization")
        .and_then(|h| h.to_str().ok())
        == Some(&format!("Bearer {BROADCAST_TOKEN}"));
    if !authorised {
        return Ok(reply(401, r#"{"errno":109}"#.into()));
    }
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let body = req.into_body().collect().await?.to_bytes();
    if method == hyper::Method::GET && path == "/v1/broadcasts" {
        let all = st.broadcasts.lock().expect("lock").clone();
        return Ok(reply(200, json!({ "broadcasts": all }).to_string()));
    }
    let Some(id) = path.strip_prefix("/v1/broadcasts/") else {
        return Ok(reply(404, "{}".into()));
    };
    if method != hyper::Method::PUT {
        return Ok(reply(405, "{}".into()));
    }
    st.puts.fetch_add(1, Relaxed);
    let version = String::from_utf8_lossy(&body).trim().to_string();
    let changed = st
        .broadcasts
        .lock()
        .expect("lock")
        .insert(id.to_string(), version.clone())
        .as_ref()
        != Some(&version);
    if changed {
        let frame = json!({"messageType":"broadcast","broadcasts":{id: version}}).to_string();
        let f = st.faults;
        let listeners = st.listeners.lock().expect("lock");
        let mut n = 0u64;
        for l in listeners.iter() {
            let follows = l.follows.iter().any(|x| x == id);
            if !follows && !f.broadcast_to_everyone {
                continue;
            }
            n += 1;
            if follows && f.broadcast_skip_every > 0 && n.is_multiple_of(f.broadcast_skip_every) {
                continue;
            }
            let _ = l.tx.send(frame.clone());
            if follows && f.broadcast_twice_every > 0 && n.is_multiple_of(f.broadcast_twice_every) {
                let _ = l.tx.send(frame.clone());
            }
        }
    }
    Ok(reply(
        200,
        json!({"id": id, "version": version, "changed": changed}).to_string(),
    ))
}

async fn post(
    req: Request<hyper::body::Incoming>,
    st: Arc<State>,
    node: usize,
) -> Result<Response<Full<Bytes>>, hyper::Error> {
    if req.uri().path().starts_with("/v1/broadcasts") {
        return broadcast_api(req, st).await;
    }
    st.posts[node].fetch_add(1, Relaxed);
    let path = req.uri().path().to_string();
    let auth_ok = req
        .headers()
        .get("authorization")
        .and_then(|h| h.to_str().ok())
        .is_some_and(|a| a.starts_with("vapid t=") && a.contains(", k="));
    let ttl_ok = req.headers().get("ttl").is_some();
    let body = req.into_body().collect().await?.to_bytes();
    let parts: Vec<&str> = path.split('/').collect();
    let resp = |code: u16| {
        Response::builder()
            .status(code)
            .header("Location", "http://127.0.0.1/m/x")
            .body(Full::new(Bytes::new()))
            .expect("response")
    };
    if !auth_ok || !ttl_ok || parts.len() != 4 || parts[1] != "push" {
        return Ok(resp(400));
    }
    let (uaid, ch) = (parts[2], parts[3]);
    let n = st.counter.fetch_add(1, Relaxed) + 1;
    let f = st.faults;
    if f.status_429_every > 0 && n.is_multiple_of(f.status_429_every) {
        return Ok(resp(429));
    }
    let data = base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, &body);
    let note = json!({"messageType":"notification","channelID":ch,"version":format!("v{n}"),"data":data,"headers":{"encoding":"aes128gcm"},"ttl":60}).to_string();
    let mut uas = st.uas.lock().expect("lock");
    let ua = uas.entry(uaid.to_string()).or_default();
    let delivered = f.drop_every == 0 || !n.is_multiple_of(f.drop_every);
    if delivered {
        match &ua.tx {
            Some(tx) => {
                if f.garbage_every > 0 && n.is_multiple_of(f.garbage_every) {
                    let _ = tx.send("garbage {".into());
                }
                // A connection on its way out: keep the message for the next.
                if let Err(e) = tx.send(note) {
                    ua.queue.push(e.0);
                }
            }
            None => ua.queue.push(note),
        }
    }
    Ok(resp(201))
}

fn out_file(dir: &tempfile::TempDir, name: &str) -> std::path::PathBuf {
    dir.path().join(name)
}

#[test]
fn scenarios_add_up_against_a_correct_server() {
    let mock = Mock::start(Faults::default());
    let dir = tempfile::tempdir().expect("tempdir");
    let url = mock.url();
    let pid = std::process::id().to_string();
    let t = Duration::from_secs(60);

    let tp = scenario(
        &[
            "throughput",
            "--url",
            &url,
            "--target",
            "mock",
            "--uas",
            "20",
            "--channels",
            "2",
            "--senders",
            "3",
            "--messages",
            "300",
            "--duration",
            "30",
            "--payload",
            "100",
            "--verify-every",
            "1",
            "--pool",
            "2",
        ],
        &out_file(&dir, "tp.json"),
        t,
    );
    assert_no_errors(&tp);
    assert_eq!(metric(&tp, "channels"), 40.0);
    assert_eq!(metric(&tp, "accepted"), 300.0);
    assert_eq!(metric(&tp, "delivered"), 300.0);
    assert_eq!(metric(&tp, "verified_ok"), 300.0);
    assert_eq!(metric(&tp, "lost"), 0.0);
    assert_eq!(metric(&tp, "body_bytes"), 230.0);
    assert_latency(&tp, "end_to_end", 300);

    // Open loop: 200 msg/s for one second is about 200 messages.
    let open = scenario(
        &[
            "throughput",
            "--url",
            &url,
            "--uas",
            "10",
            "--senders",
            "2",
            "--rate",
            "200",
            "--duration",
            "1",
        ],
        &out_file(&dir, "open.json"),
        t,
    );
    assert_no_errors(&open);
    let sent = metric(&open, "sent");
    assert!((150.0..=201.0).contains(&sent), "sent {sent}");
    assert_eq!(metric(&open, "delivered"), sent);

    let bl = scenario(
        &[
            "backlog",
            "--url",
            &url,
            "--uas",
            "15",
            "--channels",
            "2",
            "--messages-per-channel",
            "3",
            "--senders",
            "2",
        ],
        &out_file(&dir, "bl.json"),
        t,
    );
    assert_no_errors(&bl);
    assert_eq!(metric(&bl, "stored"), 90.0);
    assert_eq!(metric(&bl, "delivered"), 90.0);
    assert_latency(&bl, "reconnect_hello", 15);

    let st = scenario(
        &[
            "storm", "--url", &url, "--uas", "25", "--window", "0.5", "--settle", "0.2", "--close",
            "clean",
        ],
        &out_file(&dir, "st.json"),
        t,
    );
    assert_no_errors(&st);
    assert_eq!(metric(&st, "reconnected"), 25.0);
    assert_latency(&st, "reconnect_hello", 25);

    let idle = scenario(
        &[
            "idle",
            "--url",
            &url,
            "--uas",
            "30",
            "--hold",
            "0.5",
            "--server-pid",
            &pid,
        ],
        &out_file(&dir, "idle.json"),
        t,
    );
    assert_no_errors(&idle);
    assert_eq!(metric(&idle, "established"), 30.0);
    assert!(idle["metrics"]["stopped_by"]
        .as_str()
        .expect("stopped_by")
        .starts_with("nothing"));
}

#[test]
fn user_agents_and_posts_spread_over_several_nodes() {
    // Two nodes sharing one store; endpoints all name node 0's HTTP port.
    let mock = Mock::start_nodes(Faults::default(), 2);
    let dir = tempfile::tempdir().expect("tempdir");
    let urls = mock.urls();
    let push = format!("{},{}", mock.http(0), mock.http(1));
    let pid = std::process::id().to_string();
    let pids = format!("{pid},mock={pid}");
    let tp = scenario(
        &[
            "throughput",
            "--url",
            &urls,
            "--push-urls",
            &push,
            "--server-pid",
            &pids,
            "--uas",
            "20",
            "--senders",
            "2",
            "--messages",
            "200",
            "--duration",
            "30",
            "--verify-every",
            "1",
        ],
        &out_file(&dir, "tp.json"),
        Duration::from_secs(60),
    );
    assert_no_errors(&tp);
    assert_eq!(metric(&tp, "delivered"), 200.0);
    assert_eq!(metric(&tp, "verified_ok"), 200.0);
    assert_eq!(mock.hellos(), [10, 10], "user agents round-robin");
    let posts = mock.posts();
    assert_eq!(posts.iter().sum::<u64>(), 200);
    // Each sender alternates; 2 senders claim 200 between them.
    assert!(posts.iter().all(|&n| (80..=120).contains(&n)), "{posts:?}");
    assert_eq!(tp["urls"].as_array().expect("urls").len(), 2);
    assert_eq!(tp["url"].as_str(), Some(urls.as_str()));
    assert_eq!(tp["push_urls"][1].as_str(), Some(mock.http(1).as_str()));
    let servers = tp["servers"].as_array().expect("servers");
    assert_eq!(servers.len(), 2);
    assert_eq!(servers[1]["name"], "mock");
    assert!(servers.iter().all(|s| s["cpu_s"].is_number()));
    assert!(servers.iter().all(|s| s["rss_after_kib"].is_number()));
    assert!(tp["metrics"]["server_cpu_us_per_delivered"].is_number());

    // POSTs go where --push-urls says, not to the host the endpoints name.
    let before = mock.posts();
    let bl = scenario(
        &[
            "backlog",
            "--url",
            &urls,
            "--push-urls",
            &mock.http(1),
            "--uas",
            "6",
            "--messages-per-channel",
            "3",
            "--senders",
            "2",
        ],
        &out_file(&dir, "bl.json"),
        Duration::from_secs(60),
    );
    assert_no_errors(&bl);
    assert_eq!(metric(&bl, "delivered"), 18.0);
    let after = mock.posts();
    assert_eq!(after[0] - before[0], 0, "{after:?}");
    assert_eq!(after[1] - before[1], 18, "{after:?}");
    // Reconnects go back to each user agent's own node.
    assert_eq!(mock.hellos(), [10 + 3 + 3, 10 + 3 + 3]);

    // Idle, storm and burst spread too.
    let st = scenario(
        &[
            "storm", "--url", &urls, "--uas", "8", "--window", "0.5", "--settle", "0.2",
        ],
        &out_file(&dir, "st.json"),
        Duration::from_secs(60),
    );
    assert_no_errors(&st);
    assert_eq!(mock.hellos(), [16 + 8, 16 + 8]);
    let idle = scenario(
        &[
            "idle", "--url", &urls, "--uas", "6", "--procs", "2", "--hold", "0.2",
        ],
        &out_file(&dir, "idle.json"),
        Duration::from_secs(60),
    );
    assert_no_errors(&idle);
    assert_eq!(mock.hellos(), [24 + 3, 24 + 3]);
    let before = mock.posts();
    let b = scenario(
        &[
            "burst",
            "--url",
            &urls,
            "--push-urls",
            &push,
            "--uas",
            "2",
            "--messages",
            "20",
            "--backlog",
            "10",
            "--senders",
            "2",
        ],
        &out_file(&dir, "burst.json"),
        Duration::from_secs(60),
    );
    assert_no_errors(&b);
    assert_eq!(metric(&b, "never_delivered"), 0.0);
    assert_eq!(mock.hellos(), [27 + 2, 27 + 2]);
    let sent: Vec<u64> = mock
        .posts()
        .iter()
        .zip(&before)
        .map(|(a, b)| a - b)
        .collect();
    assert_eq!(sent.iter().sum::<u64>(), 60, "{sent:?}");
    assert!(sent.iter().all(|&n| (20..=40).contains(&n)), "{sent:?}");
}

#[test]
fn idle_spreads_over_worker_processes_and_source_addresses() {
    let mock = Mock::start(Faults::default());
    let dir = tempfile::tempdir().expect("tempdir");
    let url = mock.url();
    let idle = scenario(
        &[
            "idle",
            "--url",
            &url,
            "--uas",
            "60",
            "--procs",
            "3",
            "--source-addrs",
            "4",
            "--hold",
            "0.5",
        ],
        &out_file(&dir, "idle.json"),
        Duration::from_secs(60),
    );
    assert_no_errors(&idle);
    assert_eq!(metric(&idle, "procs"), 3.0);
    assert_eq!(metric(&idle, "established"), 60.0);
    assert_eq!(metric(&idle, "open_at_end"), 60.0);
    assert_latency(&idle, "setup", 60);
}

#[test]
fn idle_reports_a_ceiling_it_runs_into() {
    // Nothing listens: every connect is refused, the climb stops after the
    // allowed run of failures and says so.
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("ws://127.0.0.1:{}/", free_port());
    let idle = scenario(
        &[
            "idle",
            "--url",
            &url,
            "--uas",
            "1000",
            "--max-consecutive-failures",
            "20",
            "--concurrency",
            "5",
            "--hold",
            "0",
        ],
        &out_file(&dir, "idle.json"),
        Duration::from_secs(60),
    );
    assert_eq!(metric(&idle, "established"), 0.0);
    let failed = metric(&idle, "failed");
    assert!((20.0..=30.0).contains(&failed), "failed {failed}");
    let by = idle["metrics"]["stopped_by"].as_str().expect("stopped_by");
    assert!(by.contains("ECONNREFUSED"), "{by}");
}

#[test]
fn server_misbehaviour_is_counted_not_fatal() {
    let mock = Mock::start(Faults {
        drop_every: 10,
        garbage_every: 7,
        ..Faults::default()
    });
    let dir = tempfile::tempdir().expect("tempdir");
    let tp = scenario(
        &[
            "throughput",
            "--url",
            &mock.url(),
            "--uas",
            "20",
            "--senders",
            "1",
            "--messages",
            "100",
            "--duration",
            "30",
            "--drain",
            "1",
            "--pool",
            "8",
        ],
        &out_file(&dir, "tp.json"),
        Duration::from_secs(60),
    );
    assert_eq!(metric(&tp, "accepted"), 100.0);
    // The mock counter also advances on hello, so about one in ten is lost.
    let lost = metric(&tp, "lost");
    assert!((5.0..=15.0).contains(&lost), "lost {lost}");
    assert_eq!(metric(&tp, "delivered") + lost, 100.0);
    let errors = &tp["errors"];
    assert_eq!(
        errors["lost (accepted, never delivered)"].as_f64(),
        Some(lost)
    );
    assert!(
        errors["malformed server message"].as_u64().unwrap_or(0) >= 1,
        "{errors}"
    );
}

#[test]
fn never_sends_off_loopback() {
    let ran = run(
        &["throughput", "--url", "ws://10.1.2.3:80/", "--uas", "1"],
        Duration::from_secs(20),
    );
    assert!(!ran.ok);
    assert!(ran.stderr.contains("loopback"), "{}", ran.stderr);
    let ran = run(
        &["storm", "--url", "wss://127.0.0.1/"],
        Duration::from_secs(20),
    );
    assert!(
        !ran.ok && ran.stderr.contains("not supported"),
        "{}",
        ran.stderr
    );

    // A server handing out endpoints elsewhere gets no POSTs: the endpoints
    // are refused and counted.
    let mock = Mock::start(Faults {
        foreign_endpoints: true,
        ..Faults::default()
    });
    let dir = tempfile::tempdir().expect("tempdir");
    let tp = scenario(
        &[
            "throughput",
            "--url",
            &mock.url(),
            "--uas",
            "3",
            "--messages",
            "10",
            "--duration",
            "2",
            "--drain",
            "0",
        ],
        &out_file(&dir, "tp.json"),
        Duration::from_secs(60),
    );
    assert_eq!(metric(&tp, "sent"), 0.0);
    let refused: u64 = tp["errors"]
        .as_object()
        .expect("errors")
        .iter()
        .filter(|(k, _)| k.contains("not loopback") || k.contains("only loopback"))
        .map(|(_, v)| v.as_u64().unwrap_or(0))
        .sum();
    assert_eq!(refused, 3, "{}", tp["errors"]);
}

/// Metrics of a burst run the mock and the generator must agree on whatever
/// happened: every accepted message is delivered, lost or still missing.
fn assert_burst_adds_up(b: &Value) {
    let m = |n| metric(b, n);
    assert_eq!(
        m("live_delivered") + m("live_lost"),
        m("live_accepted"),
        "{}",
        b["metrics"]
    );
    assert_eq!(
        m("drain_delivered") + m("drain_missing"),
        m("drain_stored"),
        "{}",
        b["metrics"]
    );
    assert!(m("drain_late_live") <= m("live_lost"));
}

#[test]
fn burst_acks_each_notification_and_paces_on_429() {
    // A correct server that keeps at most 16 notifications in flight and
    // answers every 7th POST with 429 (a full store).
    let mock = Mock::start(Faults {
        status_429_every: 7,
        window: 16,
        ..Faults::default()
    });
    let dir = tempfile::tempdir().expect("tempdir");
    let pid = std::process::id().to_string();
    let b = scenario(
        &[
            "burst",
            "--url",
            &mock.url(),
            "--target",
            "mock",
            "--uas",
            "3",
            "--messages",
            "300",
            "--backlog",
            "200",
            "--senders",
            "4",
            "--payload",
            "64",
            "--server-pid",
            &pid,
        ],
        &out_file(&dir, "burst.json"),
        Duration::from_secs(90),
    );
    assert_no_errors(&b);
    assert_burst_adds_up(&b);
    assert_eq!(metric(&b, "uas_connected"), 3.0);
    assert_eq!(metric(&b, "live_accepted"), 900.0);
    assert_eq!(metric(&b, "live_delivered"), 900.0);
    assert_eq!(metric(&b, "live_lost"), 0.0);
    assert_eq!(metric(&b, "live_duplicates"), 0.0);
    assert_eq!(metric(&b, "live_cut_off"), 0.0);
    assert_eq!(metric(&b, "live_acks_sent"), 900.0, "one ack per message");
    assert!(metric(&b, "live_http_429") > 0.0, "429s are retried");
    assert_eq!(metric(&b, "live_http_errors"), 0.0);
    assert!(metric(&b, "live_per_s") > 0.0 && metric(&b, "drain_per_s") > 0.0);
    assert_eq!(metric(&b, "drain_stored"), 600.0);
    assert_eq!(metric(&b, "drain_delivered"), 600.0);
    assert_eq!(metric(&b, "drain_missing"), 0.0);
    assert_eq!(metric(&b, "drain_duplicates"), 0.0);
    assert_eq!(metric(&b, "drain_cut_off"), 0.0);
    assert_eq!(metric(&b, "drain_reconnects"), 0.0);
    assert_eq!(metric(&b, "drain_acks_sent"), 600.0);
    assert_eq!(metric(&b, "never_delivered"), 0.0);
    assert!(metric(&b, "client_cpu_s") > 0.0);
    assert!(b["metrics"]["server_cpu_cores"].is_number());
    assert!(b["metrics"].get("live_close").is_none());
    assert_latency(&b, "end_to_end", 900);
    assert_latency(&b, "reconnect_hello", 3);
    let summary = b["summary"].as_str().expect("summary");
    assert!(summary.starts_with("burst[mock]: live 900 accepted, 900 delivered (0 lost"));
    assert_eq!(summary.matches("not cut off").count(), 2, "{summary}");
}

#[test]
fn burst_reports_a_server_close_mid_burst_as_cut_off() {
    // Herald before issue 9: more than 20 ack frames and the websocket is
    // closed with 1008. With 10 notifications in flight a connection sees
    // at most 31 messages, so both phases are cut off every time.
    let mock = Mock::start(Faults {
        close_after_acks: 20,
        window: 10,
        ..Faults::default()
    });
    let dir = tempfile::tempdir().expect("tempdir");
    let b = scenario(
        &[
            "burst",
            "--url",
            &mock.url(),
            "--target",
            "mock",
            "--uas",
            "2",
            "--messages",
            "200",
            "--backlog",
            "100",
            "--senders",
            "2",
            "--payload",
            "64",
            "--max-reconnects",
            "2",
            "--drain",
            "10",
        ],
        &out_file(&dir, "burst.json"),
        Duration::from_secs(90),
    );
    assert_burst_adds_up(&b);
    let close = "1008 rate limit: more than 50 messages per second";
    // Live: both user agents cut off, their close code and reason recorded.
    assert_eq!(metric(&b, "live_accepted"), 400.0);
    assert_eq!(metric(&b, "live_cut_off"), 2.0);
    assert_eq!(b["metrics"]["live_close"].as_str(), Some(close));
    let delivered = metric(&b, "live_delivered");
    assert!((42.0..=62.0).contains(&delivered), "{delivered}");
    assert_eq!(metric(&b, "live_lost"), 400.0 - delivered);
    let errors = &b["errors"];
    assert_eq!(
        errors[format!("live: closed by server: {close}")].as_u64(),
        Some(2),
        "{errors}"
    );
    assert_eq!(
        errors["live: lost (accepted, not delivered while connected)"].as_f64(),
        Some(400.0 - delivered)
    );
    // Drain: cut off on every connection, three per user agent (the first
    // and two reconnects), each one recorded; the backlog never arrives.
    assert_eq!(metric(&b, "drain_stored"), 200.0);
    assert_eq!(metric(&b, "drain_cut_off"), 2.0);
    assert_eq!(metric(&b, "drain_closes"), 6.0);
    assert_eq!(metric(&b, "drain_reconnects"), 4.0);
    assert_eq!(b["metrics"]["drain_close"].as_str(), Some(close));
    assert_eq!(
        errors[format!("drain: closed by server: {close}")].as_u64(),
        Some(6),
        "{errors}"
    );
    assert!(metric(&b, "drain_late_live") >= 2.0 * 63.0);
    assert!(metric(&b, "drain_missing") > 0.0);
    assert_latency(&b, "reconnect_hello", 6);
    let summary = b["summary"].as_str().expect("summary");
    assert!(
        summary.contains(&format!("CUT OFF 2/2 ({close})")),
        "{summary}"
    );
    assert!(summary.contains("4 reconnects"), "{summary}");
    assert!(!summary.contains("not cut off"), "{summary}");
}

/// The fanout flags every run against the mock shares.
fn fanout_args<'a>(api: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec![
        "fanout",
        "--api-url",
        api,
        "--token",
        BROADCAST_TOKEN,
        "--target",
        "mock",
        "--settle",
        "0.3",
    ];
    v.extend_from_slice(extra);
    v
}

#[test]
fn fanout_tells_every_follower_once_and_nobody_else() {
    let mock = Mock::start(Faults::default());
    let dir = tempfile::tempdir().expect("tempdir");
    let (url, api) = (mock.url(), mock.http(0));
    let pid = std::process::id().to_string();
    let f = scenario(
        &fanout_args(
            &api,
            &[
                "--url",
                &url,
                "--uas",
                "40",
                "--non-followers",
                "8",
                "--changes",
                "3",
                "--server-pid",
                &pid,
            ],
        ),
        &out_file(&dir, "fanout.json"),
        Duration::from_secs(60),
    );
    assert_fanout_clean(&f, 40.0, 8.0, 3.0);
    assert_eq!(metric(&f, "changes"), 3.0);
    // The initial version and three changes.
    assert_eq!(mock.state.puts.load(Relaxed), 4);
    let rows = f["rows"].as_array().expect("rows");
    assert_eq!(rows.len(), 3);
    for (i, row) in rows.iter().enumerate() {
        assert_eq!(row["change"], i + 1);
        assert_eq!(row["received"], 40, "{row}");
        assert_eq!(row["followers"], 40);
        assert_eq!(row["put_status"], 200);
        let (first, last) = (
            row["first_ms"].as_f64().unwrap(),
            row["last_ms"].as_f64().unwrap(),
        );
        assert!(
            first <= row["p50_ms"].as_f64().unwrap() && row["p99_ms"].as_f64().unwrap() <= last,
            "{row}"
        );
        assert!(
            row["rss_peak_kib"].as_u64().unwrap() >= row["rss_before_kib"].as_u64().unwrap() / 2
        );
        assert!(row["rss_samples"].as_u64().unwrap() >= 2, "{row}");
    }
    assert_eq!(
        f["params"]["id"], "loadtest/fanout",
        "the id goes in the path with its '/'"
    );
    assert!(metric(&f, "server_rss_peak_kib") > 0.0);
    assert!(f["metrics"]["server_rss_peak_growth_kib"].is_number());
    assert!(f["metrics"]["last_frame_ms_max"].is_number());
    assert!(f["metrics"]["server_cpu_us_per_delivered"].is_number());
    assert!(f["metrics"]["server_cpu_us_per_broadcast_frame"].is_number());
    assert_latency(&f, "fanout_arrival", 120);
    assert_eq!(f["subprotocol"], "push-notification");
    let summary = f["summary"].as_str().expect("summary");
    assert!(
        summary.starts_with("fanout[mock]: 40/40 followers + 8/8 non-followers connected (0 failed); 3 changes, each to every follower exactly once (120 frames), 0 frames to non-followers"),
        "{summary}"
    );
    assert!(summary.contains("µs per broadcast frame"), "{summary}");

    // Spread over worker processes and source addresses, as idle does.
    let f = scenario(
        &fanout_args(
            &api,
            &[
                "--url",
                &url,
                "--uas",
                "30",
                "--non-followers",
                "6",
                "--procs",
                "3",
                "--source-addrs",
                "2",
                "--changes",
                "2",
            ],
        ),
        &out_file(&dir, "fanout-procs.json"),
        Duration::from_secs(60),
    );
    assert_no_errors(&f);
    assert_eq!(metric(&f, "procs"), 3.0);
    assert_eq!(metric(&f, "followers_connected"), 30.0);
    assert_eq!(metric(&f, "non_followers_connected"), 6.0);
    assert_eq!(metric(&f, "frames_received"), 60.0);
    assert_eq!(f["subprotocols"]["push-notification"], 36);

    // The report gives fanout its own section and the per-change table.
    let html = dir.path().join("report.html");
    let fanout_json = out_file(&dir, "fanout.json");
    let page = report(&[fanout_json.to_str().unwrap()], &html);
    assert!(page.contains("<h2>fanout</h2>") && page.contains("mock: per step"));
    assert!(page.contains("fanout_arrival latency CDF"));
}

#[test]
fn fanout_reports_missed_repeated_and_stray_frames() {
    // Every 5th connection is skipped, every 2nd told twice, and those
    // following nothing are told too. Connections are counted in the order
    // they said hello, so which are followers varies; the counts below hold
    // whatever the order (7 fifths and 17 seconds among 35, only 5 of
    // which follow nothing).
    let mock = Mock::start(Faults {
        broadcast_skip_every: 5,
        broadcast_twice_every: 2,
        broadcast_to_everyone: true,
        ..Faults::default()
    });
    let dir = tempfile::tempdir().expect("tempdir");
    let (url, api) = (mock.url(), mock.http(0));
    let f = scenario(
        &fanout_args(
            &api,
            &[
                "--url",
                &url,
                "--uas",
                "30",
                "--non-followers",
                "5",
                "--changes",
                "2",
                "--change-timeout",
                "1",
            ],
        ),
        &out_file(&dir, "fanout.json"),
        Duration::from_secs(60),
    );
    let m = |n| metric(&f, n);
    assert_eq!(m("followers_connected"), 30.0);
    assert_eq!(m("changes_complete"), 0.0);
    let missing = m("missing");
    let dups = m("duplicates");
    let stray = m("non_follower_frames");
    assert!(missing > 0.0 && dups > 0.0, "{}", f["metrics"]);
    // Each of the 5 that follow nothing, told of each of the 2 changes.
    assert_eq!(stray, 10.0, "{}", f["metrics"]);
    assert_eq!(m("frames_received") + missing, 60.0);
    let errors = &f["errors"];
    assert_eq!(errors["follower missed a change"].as_f64(), Some(missing));
    assert_eq!(
        errors["follower heard of a change more than once"].as_f64(),
        Some(dups)
    );
    assert_eq!(
        errors["broadcast frame to a user agent following nothing"].as_f64(),
        Some(stray)
    );
    assert_eq!(
        errors["gave up waiting for followers (--change-timeout)"].as_u64(),
        Some(2)
    );
    let summary = f["summary"].as_str().expect("summary");
    assert!(
        summary.contains(&format!("{} frames to non-followers", stray)),
        "{summary}"
    );
    assert!(summary.contains("missing"), "{summary}");
}

#[test]
fn fanout_needs_the_broadcast_api_and_its_token() {
    let mock = Mock::start(Faults::default());
    let api = mock.http(0);
    assert_fanout_token_refused(&mock.url(), &api, "wrong-token-0123456");
    let ran = run(
        &[
            "fanout",
            "--url",
            &mock.url(),
            "--api-url",
            "http://10.0.0.1:80",
            "--token",
            "x",
        ],
        Duration::from_secs(30),
    );
    assert!(!ran.ok && ran.stderr.contains("loopback"), "{}", ran.stderr);
    let ran = run(
        &[
            "fanout",
            "--url",
            &mock.url(),
            "--api-url",
            &api,
            "--id",
            "a b",
            "--token",
            "x",
        ],
        Duration::from_secs(30),
    );
    assert!(!ran.ok && ran.stderr.contains("--id"), "{}", ran.stderr);
    assert_eq!(mock.state.puts.load(Relaxed), 0);
}

/// Throughput, idle and storm against a mock selecting `sub`, as target
/// `name`: each must work and record what the handshakes selected.
fn runs_against_mock(
    dir: &tempfile::TempDir,
    name: &str,
    sub: Subprotocol,
    t: Duration,
) -> Vec<std::path::PathBuf> {
    let pid = std::process::id().to_string();
    let mock = Mock::start(Faults {
        subprotocol: sub,
        ..Faults::default()
    });
    let url = mock.url();
    let tp = scenario(
        &[
            "throughput",
            "--url",
            &url,
            "--target",
            name,
            "--uas",
            "10",
            "--senders",
            "2",
            "--messages",
            "100",
            "--duration",
            "30",
            "--server-pid",
            &pid,
        ],
        &out_file(dir, &format!("{name}-tp.json")),
        t,
    );
    assert_no_errors(&tp);
    assert_eq!(metric(&tp, "delivered"), 100.0);
    let want = if sub == Subprotocol::None {
        "none"
    } else {
        "push-notification"
    };
    assert_eq!(tp["subprotocol"], want);
    assert_eq!(tp["subprotocols"][want], 10);
    assert!(tp["summary"]
        .as_str()
        .unwrap()
        .contains("µs per delivered message"));
    let idle = scenario(
        &[
            "idle",
            "--url",
            &url,
            "--target",
            name,
            "--uas",
            "12",
            "--procs",
            "2",
            "--hold",
            "0.3",
            "--server-pid",
            &pid,
        ],
        &out_file(dir, &format!("{name}-idle.json")),
        t,
    );
    assert_no_errors(&idle);
    // Counted in the worker processes, reported to the parent.
    assert_eq!(idle["subprotocol"], want);
    assert_eq!(idle["subprotocols"][want], 12);
    // bench.sh storms autopush-rs too: a server without the
    // subprotocol takes the returning user agents all the same.
    let storm = scenario(
        &[
            "storm",
            "--url",
            &url,
            "--target",
            name,
            "--uas",
            "8",
            "--window",
            "0.3",
            "--settle",
            "0.1",
            "--server-pid",
            &pid,
        ],
        &out_file(dir, &format!("{name}-storm.json")),
        t,
    );
    assert_no_errors(&storm);
    assert_eq!(metric(&storm, "reconnected"), 8.0);
    assert_eq!(storm["subprotocols"][want], 16);
    ["tp", "idle", "storm"]
        .iter()
        .map(|kind| out_file(dir, &format!("{name}-{kind}.json")))
        .collect()
}

/// autopush-rs selects no subprotocol: every scenario works, and the results
/// say "none"; a server selecting another one is refused. Then `compare`
/// puts the two servers side by side.
#[test]
fn no_subprotocol_is_accepted_recorded_and_compared() {
    let dir = tempfile::tempdir().expect("tempdir");
    let t = Duration::from_secs(60);
    let mut files = Vec::new();
    for (name, sub) in [
        ("herald-mock", Subprotocol::Push),
        ("autopush-mock", Subprotocol::None),
    ] {
        files.extend(runs_against_mock(&dir, name, sub, t));
    }

    let other = Mock::start(Faults {
        subprotocol: Subprotocol::Other,
        ..Faults::default()
    });
    let ran = run(
        &[
            "throughput",
            "--url",
            &other.url(),
            "--uas",
            "2",
            "--messages",
            "1",
        ],
        t,
    );
    assert!(!ran.ok, "a foreign subprotocol must be refused");
    assert!(
        ran.stderr.contains("subprotocol \\\"chat\\\"")
            || ran.stderr.contains("subprotocol \"chat\""),
        "{}",
        ran.stderr
    );

    let md = dir.path().join("side.md");
    let mut args: Vec<&str> = vec!["compare"];
    for f in &files {
        args.push(f.to_str().unwrap());
    }
    args.extend(["--out", md.to_str().unwrap()]);
    let ran = run(&args, t);
    assert!(ran.ok, "{}", ran.stderr);
    let lines: Vec<&str> = ran.stdout.lines().collect();
    assert_eq!(lines.len(), 4, "{}", ran.stdout);
    assert!(lines[0].starts_with("| target | messages/s delivered | server µs per delivered message | latency p50 ms | latency p99 ms | idle: connections held | idle: server KiB per connection | idle: setup p99 ms | storm: bring-up setup p99 ms | storm: reconnect hello p99 ms | websocket subprotocol |"));
    // No bridge runs: their two columns are empty.
    for (line, target, proto) in [
        (2, "herald-mock", "push-notification"),
        (3, "autopush-mock", "none"),
    ] {
        let l = lines[line];
        let (start, end) = (format!("| {target} | "), format!("| {proto} | – | – |"));
        assert!(l.starts_with(&start) && l.ends_with(&end), "{l}");
    }
    let cells: Vec<&str> = lines[3].split('|').map(str::trim).collect();
    assert!(
        cells[2].parse::<f64>().unwrap() > 0.0,
        "messages/s: {}",
        lines[3]
    );
    assert!(
        cells[3].parse::<f64>().is_ok(),
        "µs per message: {}",
        lines[3]
    );
    assert_eq!(cells[6], "12", "{}", lines[3]);
    assert!(
        cells[7].parse::<f64>().is_ok(),
        "KiB per connection: {}",
        lines[3]
    );
    for (cell, what) in [
        (8, "idle setup p99"),
        (9, "storm bring-up p99"),
        (10, "storm hello p99"),
    ] {
        assert!(
            cells[cell].parse::<f64>().unwrap() > 0.0,
            "{what}: {}",
            lines[3]
        );
    }
    assert_eq!(std::fs::read_to_string(&md).unwrap(), ran.stdout);

    // The HTML report carries the same table.
    let html = dir.path().join("report.html");
    let mut args: Vec<&str> = vec!["report"];
    for f in &files {
        args.push(f.to_str().unwrap());
    }
    args.extend(["--out", html.to_str().unwrap()]);
    assert!(run(&args, t).ok);
    let page = std::fs::read_to_string(&html).unwrap();
    assert!(page.contains("<h2>Side by side</h2>") && page.contains("<td>autopush-mock</td>"));
}
