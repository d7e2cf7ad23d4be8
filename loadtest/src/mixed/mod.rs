//! The mixed load of `soak` (one node) and `chaos` (several nodes under
//! faults), then an exact account of every message. User agents connect, register and unregister channels,
//! disconnect (politely or by dropping the socket) and come back with their
//! uaid, some after a long time away; each also plays its own application
//! server, so it knows whether it was online when each POST was made. POSTs
//! carry assorted TTLs (short ones to offline user agents so they expire,
//! TTL 0 to online ones), `Topic`s (several in a row to an offline user
//! agent so earlier ones are replaced) and payload sizes, each encrypted
//! (RFC 8291) around a unique id. Notifications are decrypted, and most are
//! acked, some nacked, some left unanswered until the next connection.
//! At the end every user agent reconnects and drains; `ledger` then says
//! what became of each accepted message, and the run fails if any was lost.
//! Some POSTs ask for delivery receipts (RFC 8030 section 5.1), each user
//! agent collecting its own in one receipt subscription; at the end every
//! receipt is checked against what the ledger says became of its message
//! (`receipts`), and the run fails on any wrong, missing or extra receipt.
//! The server's memory, open files and store size are sampled throughout.

pub mod history;
pub mod ledger;
pub mod receipts;

use history::History;

use crate::crypto::{Vapid, B64_LENIENT, MAX_PLAINTEXT};
use crate::fleet;
use crate::proto::{self, Target, Ws};
use crate::results::{Common, Servers};
use crate::sender::{self, Endpoint, HttpClient, Origins, Outcome as PostOutcome};
use crate::stats::{self, Tally};
use anyhow::Result;
use base64::Engine;
use bytes::Bytes;
use ece::EcKeyComponents;
use futures_util::{SinkExt, StreamExt};
use http::{HeaderValue, Method, Request};
use http_body_util::{BodyExt, Full, Limited};
use ledger::{Answer, Conn, Outcome, Receipt, Record, Secs, Sent, Unregistration};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use uuid::Uuid;

#[derive(clap::Args, Clone, Debug)]
pub struct SoakArgs {
    #[command(flatten)]
    pub common: Common,
    /// Seconds of mixed load; the final drain comes after.
    #[arg(long, default_value_t = 60.0)]
    pub duration: f64,
    /// User agents.
    #[arg(long, default_value_t = 40)]
    pub uas: usize,
    /// The server's data directory, whose size on disk is reported.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Seconds a connection must have been up for a message it did not get
    /// to count against the server (see the rules in mixed/ledger.rs).
    #[arg(long, default_value_t = 2.0)]
    pub grace: f64,
    /// Mean seconds between a user agent's actions while online.
    #[arg(long, default_value_t = 0.5)]
    pub pace: f64,
    /// Longest time away, seconds, for the user agents that stay offline
    /// for a while (the others come back within 4-10 s).
    #[arg(long, default_value_t = 40.0)]
    pub long_offline: f64,
    /// Share of notifications nacked on first receipt (Herald deletes a
    /// nacked message, as it does an acked one).
    #[arg(long, default_value_t = 0.05)]
    pub nack: f64,
    /// Share of notifications left unanswered on first receipt (at most
    /// four per connection), to come again on the next connection.
    #[arg(long, default_value_t = 0.1)]
    pub hold: f64,
    /// Longest final drain, seconds.
    #[arg(long, default_value_t = 60.0)]
    pub drain: f64,
    /// Share of POSTs that ask for a delivery receipt (`Prefer:
    /// respond-async`); 0 asks for none.
    #[arg(long, default_value_t = 0.3)]
    pub receipts: f64,
    /// Longest wait, seconds, after the final drain for receipts still due
    /// (an unacknowledged message that was sent gets 60 s past its TTL).
    /// Receipts not due by the end of the wait are not required.
    #[arg(long, default_value_t = 75.0)]
    pub receipt_wait: f64,
    /// Seed for the user agents' choices (default: random). Timing still
    /// varies between runs.
    #[arg(long)]
    pub seed: Option<u64>,
}

/// Channels a user agent holds at most.
const MAX_CHANNELS: usize = 4;
/// Notifications a user agent leaves unanswered per connection at most: few
/// enough that the server's delivery window (64) never fills, which would
/// legitimately drop TTL-0 messages.
const MAX_HOLDS: usize = 4;
/// Plaintext sizes, so bodies range from one aes128gcm record to the 4 KiB
/// every service must take.
const SIZES: [usize; 6] = [16, 100, 500, 1500, 3000, MAX_PLAINTEXT];

pub struct Shared {
    pub start: Instant,
    pub load_end: Instant,
    /// When user agents come back for the final drain: the end of the load
    /// for `soak`; for `chaos`, once every fault is healed and the nodes
    /// have had time to settle.
    pub drain_at: Instant,
    pub limit: Duration,
    pub args: SoakArgs,
    pub targets: Vec<Target>,
    pub client: HttpClient,
    pub vapid: Vapid,
    /// Endpoint origins and the VAPID header for each.
    origins: tokio::sync::Mutex<(Origins, Vec<HeaderValue>)>,
    record: Mutex<Record>,
    next_id: AtomicU64,
    next_conn: AtomicU64,
    next_channel: AtomicUsize,
    pub accepted: AtomicU64,
    pub received: AtomicU64,
    pub online: AtomicI64,
    pub malformed: AtomicU64,
    pub errors: Tally,
    /// Each user agent's receipt subscription URL.
    subscriptions: Mutex<BTreeMap<usize, String>>,
    /// Several nodes to move between (`chaos`); None keeps each user agent
    /// on its own node (`soak`).
    pub roaming: Option<Roaming>,
    pub history: Option<History>,
}

/// What `chaos` adds: user agents move between nodes, some leaving their
/// old socket open, and every channel gets one last push at the end.
#[derive(Default)]
pub struct Roaming {
    /// Share of moves that keep reading the old socket instead of closing
    /// it, to time how long two nodes both serve the user agent.
    pub keep_old: f64,
    /// Channels whose registration the service forgot: a new uaid in a
    /// `hello` that asked for the old one, or a final push refused 404/410.
    pub registrations_lost: AtomicU64,
    /// One entry per move that kept its old socket.
    pub dual: Mutex<Vec<DualOwner>>,
    /// Old sockets still open, counted down as each ends.
    pub dual_open: AtomicI64,
}

/// How long an old socket stayed open after its user agent moved.
#[derive(Clone, Debug)]
pub struct DualOwner {
    /// When the new connection's `hello` reply came.
    pub moved_at: Secs,
    /// Seconds until the old node closed it or the connection ended; None
    /// while it is still open.
    pub secs: Option<Secs>,
    /// Notifications the old socket still got after the move.
    pub notifications: u64,
}

impl Shared {
    /// `push_bases` empty POSTs to each endpoint as handed out.
    pub async fn new(
        args: SoakArgs,
        targets: Vec<Target>,
        push_bases: &[String],
        limit: Duration,
        settle: Duration,
        roaming: Option<Roaming>,
        history: Option<History>,
    ) -> Result<Shared> {
        let start = Instant::now();
        let load_end = start + stats::secs(args.duration);
        Ok(Shared {
            start,
            load_end,
            drain_at: load_end + settle,
            limit,
            targets,
            client: sender::client(args.uas),
            vapid: Vapid::generate()?,
            origins: tokio::sync::Mutex::new((Origins::with_push_urls(push_bases).await?, vec![])),
            record: Mutex::new(Record::default()),
            next_id: AtomicU64::new(1),
            next_conn: AtomicU64::new(1),
            next_channel: AtomicUsize::new(0),
            accepted: AtomicU64::new(0),
            received: AtomicU64::new(0),
            online: AtomicI64::new(0),
            malformed: AtomicU64::new(0),
            errors: Tally::default(),
            subscriptions: Mutex::new(BTreeMap::new()),
            args,
            roaming,
            history,
        })
    }

    pub fn now(&self) -> Secs {
        self.start.elapsed().as_secs_f64()
    }

    pub fn record(&self) -> std::sync::MutexGuard<'_, Record> {
        self.record.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// One line of the history, if one is kept.
    pub fn log(&self, event: serde_json::Value) {
        if let Some(h) = &self.history {
            h.log(self.now(), event);
        }
    }
}

struct Channel {
    /// Soak-wide number, as the ledger knows it.
    n: usize,
    id: Uuid,
    ep: Endpoint,
    /// The subscription's private key and auth secret, to decrypt.
    keys: EcKeyComponents,
    auth: [u8; 16],
    /// Not unregistered: POSTs may go to it.
    live: bool,
}

/// The user agent's open connection.
struct Live {
    ws: Ws,
    conn: u64,
    /// When the `hello` reply came.
    up: Secs,
    since: Instant,
    /// Notifications left unanswered on this connection.
    holds: usize,
}

enum Event {
    Nothing,
    Reply {
        kind: String,
        status: Option<u32>,
        endpoint: Option<String>,
    },
    Ended {
        clean: bool,
        why: String,
    },
}

struct Ua {
    n: usize,
    sh: Arc<Shared>,
    rng: StdRng,
    uaid: Option<String>,
    channels: Vec<Channel>,
    live: Option<Live>,
    /// Ids this user agent has received (a repeat is always acked).
    seen: HashSet<u64>,
    draining: bool,
    topics: u64,
    /// The receipt subscription the first 202 named.
    receipt_sub: Option<String>,
    /// The node of the last connection attempt (index into `targets`).
    node: usize,
    /// Ids of the final pushes (`chaos`) not yet received.
    finals: HashSet<u64>,
}

/// A subscription's key pair and auth secret, as a browser makes them.
pub fn subscription_keys() -> Result<(EcKeyComponents, [u8; 16])> {
    let (pair, auth) = ece::generate_keypair_and_auth_secret()
        .map_err(|e| anyhow::anyhow!("generating subscription keys: {e}"))?;
    let comps = pair
        .raw_components()
        .map_err(|e| anyhow::anyhow!("exporting subscription keys: {e}"))?;
    Ok((comps, auth))
}

fn plaintext(id: u64, size: usize) -> Vec<u8> {
    let mut p = format!("soak id={id};").into_bytes();
    p.resize(size.max(p.len()), b'.');
    p
}

fn id_of(plain: &[u8]) -> Option<u64> {
    let rest = plain.strip_prefix(b"soak id=")?;
    let end = rest.iter().position(|&b| b == b';')?;
    std::str::from_utf8(&rest[..end]).ok()?.parse().ok()
}

/// What a POST's answer said.
#[derive(Default)]
struct Answered {
    /// The TTL the service granted (its `TTL` header).
    granted: Option<u32>,
    /// Last segment of `Location`: the message id receipts name.
    message: Option<String>,
    /// The receipt subscription in `Link`.
    receipt_sub: Option<String>,
}

const RECEIPT_REL: &str = "urn:ietf:params:push:receipt";

/// The receipt subscription URL among `Link` headers, if any.
fn receipt_link(headers: &http::HeaderMap) -> Option<String> {
    headers
        .get_all(http::header::LINK)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .find_map(|link| {
            let (url, params) = link.trim().strip_prefix('<')?.split_once('>')?;
            params
                .split(';')
                .any(|p| {
                    p.trim()
                        .strip_prefix("rel=")
                        .is_some_and(|r| r.trim_matches('"') == RECEIPT_REL)
                })
                .then(|| url.to_string())
        })
}

/// Whether two receipt subscription URLs name the same subscription: each
/// node of a cluster names it under its own public URL, so only the path
/// must match.
fn same_subscription(a: &str, b: &str) -> bool {
    let path = |u: &str| u.parse::<http::Uri>().ok().map(|u| u.path().to_string());
    a == b || path(a).is_some_and(|p| Some(p) == path(b))
}

/// What a POST asks of the service besides delivery.
struct Asks {
    ttl: u32,
    topic: Option<String>,
    /// A receipt, in the given receipt subscription if any.
    receipt: Option<Option<String>>,
}

/// POSTs one message as an application server does.
async fn post(
    client: HttpClient,
    ep: Endpoint,
    auth: HeaderValue,
    body: Bytes,
    asks: Asks,
    timeout: Duration,
) -> (PostOutcome, Answered) {
    let Asks {
        ttl,
        topic,
        receipt,
    } = asks;
    let mut req = Request::builder()
        .method(Method::POST)
        .uri(ep.uri(0).clone())
        .header(http::header::HOST, ep.host.clone())
        .header("TTL", ttl)
        .header(http::header::CONTENT_ENCODING, "aes128gcm")
        .header(http::header::CONTENT_TYPE, "application/octet-stream")
        .header(http::header::CONTENT_LENGTH, body.len())
        .header(http::header::AUTHORIZATION, auth);
    if let Some(t) = topic {
        req = req.header("Topic", t);
    }
    if let Some(sub) = receipt {
        req = req.header("Prefer", "respond-async");
        if let Some(url) = sub {
            req = req.header(
                http::header::LINK,
                format!("<{url}>; rel=\"{RECEIPT_REL}\""),
            );
        }
    }
    let req = match req.body(Full::new(body)) {
        Ok(r) => r,
        Err(e) => {
            return (
                PostOutcome::Transport(format!("request: {e}")),
                Answered::default(),
            )
        }
    };
    let exchange = async {
        let resp = client.request(req).await.map_err(|e| {
            if e.is_connect() {
                "connect".to_string()
            } else {
                "request".to_string()
            }
        })?;
        let status = resp.status().as_u16();
        let granted = resp
            .headers()
            .get("ttl")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse().ok());
        let message = resp
            .headers()
            .get(http::header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim_end_matches('/').rsplit('/').next())
            .filter(|m| !m.is_empty())
            .map(String::from);
        let receipt_sub = receipt_link(resp.headers());
        Limited::new(resp.into_body(), 64 * 1024)
            .collect()
            .await
            .map_err(|_| "reading response body".to_string())?;
        Ok::<_, String>((
            status,
            Answered {
                granted,
                message,
                receipt_sub,
            },
        ))
    };
    match tokio::time::timeout(timeout, exchange).await {
        Err(_) => (
            PostOutcome::Transport("timeout".into()),
            Answered::default(),
        ),
        Ok(Err(e)) => (PostOutcome::Transport(e), Answered::default()),
        Ok(Ok((s, a))) => (PostOutcome::Status(s), a),
    }
}

impl Ua {
    fn secs(&mut self, lo: f64, hi: f64) -> Duration {
        stats::secs(self.rng.gen_range(lo..hi.max(lo + 0.001)))
    }

    fn live_channels(&self) -> Vec<usize> {
        (0..self.channels.len())
            .filter(|&i| self.channels[i].live)
            .collect()
    }

    fn pick_channel(&mut self) -> Option<usize> {
        let live = self.live_channels();
        if live.is_empty() {
            return None;
        }
        Some(live[self.rng.gen_range(0..live.len())])
    }

    fn size(&mut self) -> usize {
        SIZES[self.rng.gen_range(0..SIZES.len())]
    }

    /// Each user agent's own node, or (roaming) any other node than the
    /// last one, at random.
    fn next_node(&mut self) -> usize {
        let n = self.sh.targets.len();
        if self.sh.roaming.is_none() || n < 2 || self.uaid.is_none() {
            return self.n % n;
        }
        (self.node + self.rng.gen_range(1..n)) % n
    }

    async fn connect(&mut self) -> bool {
        let sh = self.sh.clone();
        self.node = self.next_node();
        let target = sh.targets[self.node].clone();
        let ids: Vec<Uuid> = self
            .channels
            .iter()
            .filter(|c| c.live)
            .map(|c| c.id)
            .collect();
        let none = BTreeMap::new();
        let up = async {
            let mut ws = fleet::step("connect", sh.limit, proto::open(&target, None)).await?;
            let hello = proto::hello_following(&mut ws, self.uaid.as_deref(), &ids, &none);
            let got = fleet::step("hello", sh.limit, hello).await?;
            Ok::<_, proto::Failure>((ws, got))
        };
        match up.await {
            Ok((ws, got)) => {
                if self.uaid.as_ref().is_some_and(|u| *u != got) {
                    // Herald keeps a uaid for 60 days; a new one means the
                    // subscriptions and stored messages are gone.
                    sh.errors.add("uaid changed on reconnect");
                    if let Some(r) = &sh.roaming {
                        let gone = self.live_channels().len() as u64;
                        r.registrations_lost.fetch_add(gone, Relaxed);
                    }
                }
                let conn = sh.next_conn.fetch_add(1, Relaxed);
                sh.log(
                    serde_json::json!({"op": "hello", "ua": self.n, "node": self.node,
                    "conn": conn, "uaid": got, "asked": self.uaid}),
                );
                self.uaid = Some(got);
                self.live = Some(Live {
                    ws,
                    conn,
                    up: sh.now(),
                    since: Instant::now(),
                    holds: 0,
                });
                sh.online.fetch_add(1, Relaxed);
                true
            }
            Err(f) => {
                sh.log(
                    serde_json::json!({"op": "hello", "ua": self.n, "node": self.node,
                    "error": f.key()}),
                );
                sh.errors.add(format!("reconnect {}", f.key()));
                false
            }
        }
    }

    /// Books the end of connection `live`.
    fn ended(&mut self, live: Live, down: Secs, clean: bool) {
        self.sh.online.fetch_sub(1, Relaxed);
        self.sh.log(
            serde_json::json!({"op": "closed", "ua": self.n, "conn": live.conn,
            "down": down, "clean": clean}),
        );
        self.sh.record().conns.push(Conn {
            id: live.conn,
            ua: self.n,
            up: live.up,
            down,
            clean,
        });
    }

    /// Closes the connection: politely (close frame, reading what the
    /// server still sends, which goes unanswered) or by dropping the socket.
    async fn disconnect(&mut self, polite: bool) {
        let Some(mut live) = self.live.take() else {
            return;
        };
        let down = self.sh.now();
        if !polite {
            self.ended(live, down, false);
            return;
        }
        let mut clean = false;
        if live.ws.send(Message::Close(None)).await.is_ok() {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
            while let Ok(msg) = tokio::time::timeout_at(deadline, live.ws.next()).await {
                if let Event::Ended { clean: c, .. } = self.handle(&mut live, msg, true).await {
                    clean = c;
                    break;
                }
            }
        }
        self.ended(live, down, clean);
    }

    /// What one frame means; notifications are booked and answered here.
    async fn handle(
        &mut self,
        live: &mut Live,
        msg: Option<Result<Message, WsError>>,
        closing: bool,
    ) -> Event {
        let text = match msg {
            None => {
                return Event::Ended {
                    clean: closing,
                    why: "closed".into(),
                }
            }
            Some(Err(e)) => {
                return Event::Ended {
                    clean: false,
                    why: proto::ws_error_name(&e),
                }
            }
            Some(Ok(Message::Close(frame))) => {
                return Event::Ended {
                    clean: closing,
                    why: match frame {
                        Some(f) => format!("closed by server: {} {}", u16::from(f.code), f.reason),
                        None => "closed by server".into(),
                    },
                }
            }
            Some(Ok(Message::Text(t))) => t,
            Some(Ok(_)) => return Event::Nothing,
        };
        let Some(m) = proto::parse(text.as_str()) else {
            self.sh.malformed.fetch_add(1, Relaxed);
            return Event::Nothing;
        };
        match m.message_type.as_deref() {
            Some("notification") => {
                let (Some(ch), Some(version)) = (m.channel_id.as_deref(), m.version.as_deref())
                else {
                    self.sh.malformed.fetch_add(1, Relaxed);
                    return Event::Nothing;
                };
                self.on_notification(live, ch, version, m.data.as_deref(), closing)
                    .await;
                Event::Nothing
            }
            Some(kind) => Event::Reply {
                kind: kind.to_string(),
                status: m.status,
                endpoint: m.push_endpoint,
            },
            None => Event::Nothing,
        }
    }

    fn read_id(&self, channel: &str, data: Option<&str>) -> Option<u64> {
        let id = Uuid::try_parse(channel).ok()?;
        let ch = self.channels.iter().find(|c| c.id == id)?;
        let body = B64_LENIENT.decode(data?).ok()?;
        // ece panics on some malformed input; that is a bad frame, not a
        // reason to stop.
        let plain = std::panic::catch_unwind(|| ece::decrypt(&ch.keys, &ch.auth, &body)).ok()?;
        id_of(&plain.ok()?)
    }

    async fn on_notification(
        &mut self,
        live: &mut Live,
        channel: &str,
        version: &str,
        data: Option<&str>,
        closing: bool,
    ) {
        let sh = self.sh.clone();
        let Some(id) = self.read_id(channel, data) else {
            sh.errors
                .add("notification that does not decrypt to a soak id");
            if !closing {
                let _ = live
                    .ws
                    .send(Message::text(proto::ack_json(channel, version)))
                    .await;
            }
            return;
        };
        let mut answer = if closing {
            Answer::None
        } else if self.draining || self.seen.contains(&id) {
            Answer::Acked
        } else {
            let r: f64 = self.rng.gen();
            let args = &self.sh.args;
            if r < args.nack {
                Answer::Nacked
            } else if r < args.nack + args.hold && live.holds < MAX_HOLDS {
                live.holds += 1;
                Answer::None
            } else {
                Answer::Acked
            }
        };
        let frame = match answer {
            Answer::Acked => Some(proto::ack_json(channel, version)),
            Answer::Nacked => Some(
                serde_json::json!({"messageType": "nack", "version": version, "code": 302})
                    .to_string(),
            ),
            Answer::None => None,
        };
        if let Some(f) = frame {
            if live.ws.send(Message::text(f)).await.is_err() {
                answer = Answer::None;
            }
        }
        self.seen.insert(id);
        self.finals.remove(&id);
        sh.log(
            serde_json::json!({"op": "notification", "ua": self.n, "conn": live.conn,
            "id": id, "answer": format!("{answer:?}")}),
        );
        sh.received.fetch_add(1, Relaxed);
        sh.record().receipts.push(Receipt {
            id,
            conn: live.conn,
            at: sh.now(),
            answer,
        });
    }

    /// Runs `fut` while reading (and answering) what the server sends.
    async fn while_reading<F: Future>(&mut self, fut: F) -> F::Output {
        tokio::pin!(fut);
        loop {
            let Some(mut live) = self.live.take() else {
                return fut.await;
            };
            let msg = tokio::select! {
                out = &mut fut => {
                    self.live = Some(live);
                    return out;
                }
                msg = live.ws.next() => msg,
            };
            match self.handle(&mut live, msg, false).await {
                Event::Ended { why, .. } => {
                    self.sh.errors.add(format!("connection ended: {why}"));
                    let now = self.sh.now();
                    self.ended(live, now, false);
                }
                _ => self.live = Some(live),
            }
        }
    }

    async fn pump_for(&mut self, d: Duration) {
        self.while_reading(tokio::time::sleep(d)).await;
    }

    /// Sends a request and reads until its reply; None if the connection
    /// ended or the reply did not come in time. `sent` says whether the
    /// request left at all.
    async fn request(
        &mut self,
        text: String,
        want: &str,
        sent: &mut bool,
    ) -> Option<(Option<u32>, Option<String>)> {
        let mut live = self.live.take()?;
        if live.ws.send(Message::text(text)).await.is_err() {
            self.live = Some(live);
            return None;
        }
        *sent = true;
        let deadline = tokio::time::Instant::now() + self.sh.limit;
        let out = loop {
            let msg = match tokio::time::timeout_at(deadline, live.ws.next()).await {
                Ok(m) => m,
                Err(_) => {
                    self.sh.errors.add(format!("{want}: no reply in time"));
                    break None;
                }
            };
            match self.handle(&mut live, msg, false).await {
                Event::Reply {
                    kind,
                    status,
                    endpoint,
                } if kind == want => break Some((status, endpoint)),
                Event::Ended { why, .. } => {
                    self.sh.errors.add(format!("connection ended: {why}"));
                    let now = self.sh.now();
                    self.ended(live, now, false);
                    return None;
                }
                _ => {}
            }
        };
        self.live = Some(live);
        out
    }

    async fn register(&mut self) {
        let sh = self.sh.clone();
        let (keys, auth) = match subscription_keys() {
            Ok(k) => k,
            Err(e) => return sh.errors.add(format!("{e}")),
        };
        let id = proto::new_channel_id();
        let text = proto::register_json(&id, &sh.vapid.public_b64);
        let reply = self.request(text, "register", &mut false).await;
        let url = match reply {
            Some((Some(200), Some(url))) => url,
            Some((status, _)) => return sh.errors.add(format!("register: status {status:?}")),
            None => return,
        };
        let ep = {
            let mut g = sh.origins.lock().await;
            let ep = match g.0.endpoint(&url).await {
                Ok(ep) => ep,
                Err(e) => return sh.errors.add(format!("register: {e}")),
            };
            while g.1.len() < g.0.list.len() {
                let header = sh.vapid.authorization(&g.0.list[g.1.len()].0);
                match header {
                    Ok(h) => g.1.push(h),
                    Err(e) => return sh.errors.add(format!("VAPID: {e}")),
                }
            }
            ep
        };
        self.channels.push(Channel {
            n: sh.next_channel.fetch_add(1, Relaxed),
            id,
            ep,
            keys,
            auth,
            live: true,
        });
    }

    async fn unregister(&mut self, i: usize) {
        let sh = self.sh.clone();
        let at = sh.now();
        let text = serde_json::json!({
            "messageType": "unregister",
            "channelID": self.channels[i].id.hyphenated().to_string(),
            "code": 200,
        })
        .to_string();
        let mut sent = false;
        let reply = self.request(text, "unregister", &mut sent).await;
        // Once the request has left, whatever the reply, the channel may be
        // gone: no more POSTs to it, and its pending messages may have been
        // dropped from `at` on. One that never left excuses nothing.
        self.channels[i].live = !sent;
        sh.log(serde_json::json!({"op": "unregister", "ua": self.n,
            "channel": self.channels[i].n, "sent": sent, "status": reply.as_ref().map(|r| r.0)}));
        if sent {
            sh.record().unregistered.push(Unregistration {
                channel: self.channels[i].n,
                at,
            });
        }
        match reply {
            Some((Some(200), _)) | None => {}
            Some((status, _)) => sh.errors.add(format!("unregister: status {status:?}")),
        }
    }

    /// One message to channel `i`, encrypted around a fresh id; its id and
    /// the status it was answered with, if any.
    async fn send(&mut self, i: usize, ttl: u32, topic: Option<String>) -> (u64, Option<u16>) {
        let sh = self.sh.clone();
        let id = sh.next_id.fetch_add(1, Relaxed);
        let size = self.size();
        let ch = &self.channels[i];
        let body = match ece::encrypt(ch.keys.public_key(), &ch.auth, &plaintext(id, size)) {
            Ok(b) => Bytes::from(b),
            Err(e) => {
                sh.errors.add(format!("encrypting: {e}"));
                return (id, None);
            }
        };
        let (ep, channel) = (ch.ep.clone(), ch.n);
        let auth = sh.origins.lock().await.1[ep.origin].clone();
        let asked = sh.args.receipts > 0.0 && self.rng.gen_bool(sh.args.receipts.min(1.0));
        let receipt = asked.then(|| self.receipt_sub.clone());
        let sent_at = sh.now();
        sh.log(
            serde_json::json!({"op": "post", "ua": self.n, "channel": channel, "id": id,
            "ttl": ttl, "topic": topic, "receipt": asked}),
        );
        let fut = post(
            sh.client.clone(),
            ep,
            auth,
            body,
            Asks {
                ttl,
                topic: topic.clone(),
                receipt,
            },
            sh.limit,
        );
        let (out, answered) = self.while_reading(fut).await;
        let status = match &out {
            PostOutcome::Status(s) => Some(*s),
            PostOutcome::Transport(_) => None,
        };
        sh.log(
            serde_json::json!({"op": "answered", "ua": self.n, "id": id, "status": status,
            "error": match &out { PostOutcome::Transport(t) => Some(t.as_str()), _ => None }}),
        );
        let outcome = match out {
            PostOutcome::Status(s @ (201 | 202)) => {
                sh.accepted.fetch_add(1, Relaxed);
                if asked {
                    self.took_receipt(s, &answered);
                }
                Outcome::Accepted
            }
            PostOutcome::Status(s) => {
                sh.errors.add(format!("POST: status {s}"));
                Outcome::Rejected
            }
            PostOutcome::Transport(t) => {
                sh.errors.add(format!("POST: {t}"));
                Outcome::Unknown
            }
        };
        sh.record().sent.push(Sent {
            id,
            ua: self.n,
            channel,
            // A service may lower the TTL asked for (RFC 8030 section 5.2);
            // what it granted is what it must honour.
            ttl: answered.granted.unwrap_or(ttl),
            topic,
            sent_at,
            answered_at: sh.now(),
            outcome,
            status,
            receipt: asked,
            message: answered.message.filter(|_| asked),
        });
        (id, status)
    }

    /// Checks the answer to a POST that asked for a receipt, and keeps the
    /// receipt subscription the first one named.
    fn took_receipt(&mut self, status: u16, a: &Answered) {
        let errors = &self.sh.errors;
        if status != 202 {
            errors.add(format!("POST asking for a receipt: status {status}"));
        }
        if a.message.is_none() {
            errors.add("POST asking for a receipt: no Location");
        }
        match (&a.receipt_sub, &self.receipt_sub) {
            (None, _) => errors.add("POST asking for a receipt: no receipt Link"),
            (Some(got), Some(mine)) if !same_subscription(got, mine) => {
                errors.add("POST asking for a receipt: another receipt subscription")
            }
            (Some(_), Some(_)) => {}
            (Some(got), None) => {
                self.receipt_sub = Some(got.clone());
                self.sh
                    .subscriptions
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(self.n, got.clone());
            }
        }
    }

    async fn online_phase(&mut self, until: Instant) {
        if self.live_channels().is_empty() {
            self.register().await;
        }
        // Sometimes straight after hello, racing the stored messages.
        if self.live_channels().len() > 1 && self.rng.gen_bool(0.15) {
            if let Some(i) = self.pick_channel() {
                self.unregister(i).await;
            }
        }
        let pace = self.sh.args.pace;
        while Instant::now() < until && self.live.is_some() {
            let r: f64 = self.rng.gen();
            let live = self.live_channels().len();
            if r < 0.6 {
                if let Some(i) = self.pick_channel() {
                    // TTL 0 only once the stored backlog has had time to
                    // arrive, so the delivery window has room.
                    let settled = self
                        .live
                        .as_ref()
                        .is_some_and(|l| l.since.elapsed() > Duration::from_secs(1));
                    let ttl = match self.rng.gen_range(0..10) {
                        0..=3 if settled => 0,
                        0..=5 => 30,
                        6..=7 => 300,
                        _ => 3600,
                    };
                    self.send(i, ttl, None).await;
                }
            } else if r < 0.66 && live < MAX_CHANNELS {
                self.register().await;
            } else if r < 0.69 && live > 1 {
                if let Some(i) = self.pick_channel() {
                    self.unregister(i).await;
                }
            }
            let d = self.secs(pace * 0.5, pace * 1.5);
            self.pump_for(d).await;
        }
    }

    async fn offline_phase(&mut self, until: Instant) {
        // Short TTLs first, so they run out before the user agent is back.
        for _ in 0..self.rng.gen_range(1..=3) {
            if let Some(i) = self.pick_channel() {
                let ttl = self.rng.gen_range(1..=3);
                self.send(i, ttl, None).await;
            }
        }
        if self.rng.gen_bool(0.7) {
            if let Some(i) = self.pick_channel() {
                self.topics += 1;
                let topic = format!("u{}t{}", self.n, self.topics);
                for _ in 0..self.rng.gen_range(2..=4) {
                    self.send(i, 600, Some(topic.clone())).await;
                }
            }
        }
        for _ in 0..self.rng.gen_range(1..=3) {
            let d = self.secs(0.1, 1.0);
            tokio::time::sleep(d).await;
            if let Some(i) = self.pick_channel() {
                let ttl = if self.rng.gen_bool(0.5) { 60 } else { 3600 };
                self.send(i, ttl, None).await;
            }
        }
        tokio::time::sleep_until(until.into()).await;
    }

    /// Back one last time, acking everything, until nothing has come for
    /// two seconds (and the connection has been up longer than the grace).
    async fn final_drain(&mut self) {
        self.disconnect(true).await;
        self.draining = true;
        tokio::time::sleep_until(self.sh.drain_at.into()).await;
        for _ in 0..5 {
            if self.connect().await {
                break;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        if self.live.is_none() {
            self.sh.errors.add("final drain: could not reconnect");
            return;
        }
        if self.sh.roaming.is_some() {
            self.final_pushes().await;
        }
        let start = Instant::now();
        let hard = start + stats::secs(self.sh.args.drain);
        let least = stats::secs(self.sh.args.grace + 1.0);
        let mut quiet_since = Instant::now();
        loop {
            let before = self.seen.len();
            let got = self.sh.received.load(Relaxed);
            self.pump_for(Duration::from_millis(250)).await;
            if self.seen.len() != before || self.sh.received.load(Relaxed) != got {
                quiet_since = Instant::now();
            }
            if self.live.is_none() {
                break;
            }
            let quiet = quiet_since.elapsed() >= Duration::from_secs(2);
            if start.elapsed() >= least && quiet && self.finals.is_empty() {
                break;
            }
            if Instant::now() > hard {
                self.sh
                    .errors
                    .add("final drain: still receiving at --drain");
                break;
            }
        }
        self.disconnect(true).await;
    }

    /// One last push to every channel the user agent believes registered;
    /// each must be accepted and arrive (`chaos`'s registration check).
    async fn final_pushes(&mut self) {
        for i in self.live_channels() {
            let (id, status) = self.send(i, 3600, None).await;
            match status {
                Some(201 | 202) if !self.seen.contains(&id) => {
                    self.finals.insert(id);
                }
                Some(404 | 410) => {
                    if let Some(r) = &self.sh.roaming {
                        r.registrations_lost.fetch_add(1, Relaxed);
                    }
                    self.sh
                        .log(serde_json::json!({"op": "registration lost", "ua": self.n,
                        "channel": self.channels[i].n, "status": status}));
                }
                _ => {}
            }
        }
    }

    /// Moves to another node while still reading the old socket (`chaos`):
    /// the old node must close it once the new one has claimed the user
    /// agent (from the new `hello` reply), and `watch_old_socket` times how
    /// long that takes.
    async fn move_keeping_old(&mut self) {
        let Some(live) = self.live.take() else {
            return;
        };
        let sh = self.sh.clone();
        let now = sh.now();
        // For the ledger the old connection ends here: what it still gets
        // goes unanswered, so the service owes it to the new connection.
        sh.online.fetch_sub(1, Relaxed);
        sh.record().conns.push(Conn {
            id: live.conn,
            ua: self.n,
            up: live.up,
            down: now,
            clean: false,
        });
        sh.log(
            serde_json::json!({"op": "move", "ua": self.n, "conn": live.conn,
            "from": self.node}),
        );
        // Only a new connection that is up displaces the old one; if it
        // failed, nothing asked the old node to let go.
        if !self.connect().await {
            return;
        }
        if let Some(r) = &sh.roaming {
            let slot = {
                let mut d = r.dual.lock().unwrap_or_else(|p| p.into_inner());
                d.push(DualOwner {
                    moved_at: sh.now(),
                    secs: None,
                    notifications: 0,
                });
                d.len() - 1
            };
            r.dual_open.fetch_add(1, Relaxed);
            tokio::spawn(watch_old_socket(sh.clone(), live.ws, slot, live.conn));
        }
    }

    async fn run(mut self) {
        let end = self.sh.load_end;
        // Spread the first connections over a second.
        let d = self.secs(0.0, 1.0);
        tokio::time::sleep(d).await;
        if self.connect().await {
            for _ in 0..self.sh.args.common.channels.max(1) {
                self.register().await;
            }
        }
        while Instant::now() < end {
            if self.live.is_some() {
                let d = self.secs(3.0, 12.0);
                self.online_phase((Instant::now() + d).min(end)).await;
                let keep_old = self.sh.roaming.as_ref().map_or(0.0, |r| r.keep_old);
                if Instant::now() < end && self.rng.gen_bool(keep_old.clamp(0.0, 1.0)) {
                    self.move_keeping_old().await;
                    continue;
                }
                let polite = self.rng.gen_bool(0.85);
                self.disconnect(polite).await;
            }
            if Instant::now() >= end {
                break;
            }
            let away = if self.rng.gen_bool(0.3) {
                self.secs(10.0, self.sh.args.long_offline.max(10.5))
            } else {
                self.secs(4.0, 10.0)
            };
            self.offline_phase((Instant::now() + away).min(end)).await;
            if Instant::now() < end {
                self.connect().await;
            }
        }
        self.final_drain().await;
    }
}

/// Reads an old socket after its user agent moved on, until the old node
/// closes it or the connection ends; records how long that took.
async fn watch_old_socket(sh: Arc<Shared>, mut ws: Ws, slot: usize, conn: u64) {
    let Some(r) = &sh.roaming else {
        return;
    };
    let from = Instant::now();
    let hard = sh.drain_at + Duration::from_secs(60);
    let mut notifications = 0;
    let closed = loop {
        match tokio::time::timeout_at(hard.into(), ws.next()).await {
            Err(_) => break false,
            Ok(None | Some(Err(_)) | Some(Ok(Message::Close(_)))) => break true,
            Ok(Some(Ok(Message::Text(t)))) => {
                if t.contains("\"notification\"") {
                    notifications += 1;
                }
            }
            Ok(Some(Ok(_))) => {}
        }
    };
    let secs = from.elapsed().as_secs_f64();
    sh.log(
        serde_json::json!({"op": "old socket", "conn": conn, "closed": closed,
        "secs": secs, "notifications": notifications}),
    );
    let mut d = r.dual.lock().unwrap_or_else(|p| p.into_inner());
    d[slot].notifications = notifications;
    if closed {
        d[slot].secs = Some(secs);
    }
    r.dual_open.fetch_sub(1, Relaxed);
}

/// Reads user agent `ua`'s receipts after `cursor` (the last event id read)
/// into `out`, a batch at a time, and moves `cursor` on.
async fn read_receipts(
    client: &HttpClient,
    url: &str,
    ua: usize,
    cursor: &mut Option<String>,
    out: &mut Vec<receipts::DeliveryReceipt>,
    timeout: Duration,
) -> Result<(), String> {
    let uri: http::Uri = url.parse().map_err(|_| "bad receipt URL".to_string())?;
    let host = uri
        .authority()
        .map(|a| a.as_str().to_string())
        .ok_or("receipt URL without a host")?;
    // Each batch holds at most 500; this bounds a server that says `more`
    // for ever.
    for _ in 0..10_000 {
        let mut req = Request::builder()
            .method(Method::GET)
            .uri(uri.clone())
            .header(http::header::HOST, host.as_str())
            .header("Prefer", "wait=0");
        if let Some(c) = cursor.as_deref() {
            req = req.header("Last-Event-ID", c);
        }
        let req = req
            .body(Full::new(Bytes::new()))
            .map_err(|e| format!("request: {e}"))?;
        let exchange = async {
            let resp = client
                .request(req)
                .await
                .map_err(|_| "request".to_string())?;
            let status = resp.status().as_u16();
            let body = Limited::new(resp.into_body(), 4 << 20)
                .collect()
                .await
                .map_err(|_| "reading response body".to_string())?
                .to_bytes();
            Ok::<_, String>((status, body))
        };
        let (status, body) = tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| "timeout".to_string())??;
        if status != 200 {
            return Err(format!("status {status}"));
        }
        let v: serde_json::Value =
            serde_json::from_slice(&body).map_err(|_| "not JSON".to_string())?;
        let list = v["receipts"].as_array().ok_or("no receipts array")?;
        for r in list {
            let (Some(message), Some(outcome)) = (r["message"].as_str(), r["outcome"].as_str())
            else {
                return Err("receipt without message or outcome".into());
            };
            let verdict = receipts::Verdict::parse(outcome, r["code"].as_u64())
                .ok_or_else(|| format!("unknown outcome {outcome:?}"))?;
            out.push(receipts::DeliveryReceipt {
                ua,
                message: message.to_string(),
                verdict,
            });
        }
        if let Some(last) = v["last_event_id"].as_str() {
            *cursor = Some(last.to_string());
        } else if !list.is_empty() {
            return Err("receipts without last_event_id".into());
        }
        if v["more"].as_bool() != Some(true) {
            return Ok(());
        }
        if list.is_empty() {
            return Err("an empty batch with more to come".into());
        }
    }
    Err("more batches than any run makes".into())
}

/// After the run, reads every receipt subscription until each receipt due
/// within `--receipt-wait` has come (or the wait is over), then checks them.
pub async fn collect_receipts(
    sh: &Shared,
    record: &ledger::Record,
    fates: &std::collections::HashMap<u64, ledger::Fate>,
) -> receipts::ReceiptTally {
    let subs: Vec<(usize, String)> = sh
        .subscriptions
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .map(|(k, v)| (*k, v.clone()))
        .collect();
    let wait_end = sh.now() + sh.args.receipt_wait.max(0.0);
    let mut cursors: BTreeMap<usize, Option<String>> = BTreeMap::new();
    let mut got = Vec::new();
    let mut failed: HashSet<usize> = HashSet::new();
    loop {
        let read_at = sh.now();
        for (ua, url) in &subs {
            if failed.contains(ua) {
                continue;
            }
            let cursor = cursors.entry(*ua).or_default();
            let read = read_receipts(&sh.client, url, *ua, cursor, &mut got, sh.limit).await;
            if let Err(e) = read {
                sh.errors.add(format!("reading receipts: {e}"));
                failed.insert(*ua);
            }
        }
        let t = receipts::check(record, fates, &got, read_at);
        let waiting = t.undecided_due.iter().any(|&d| d <= wait_end);
        if !waiting || sh.now() >= wait_end {
            return t;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// Bytes the files under `dir` take on disk.
fn disk_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => disk_bytes(&e.path()),
            Ok(m) => m.blocks() * 512,
            Err(_) => 0,
        })
        .sum()
}

#[derive(Default, Clone, Copy)]
pub struct Peaks {
    pub rss_kib: u64,
    pub fds: u64,
    pub store: u64,
}

impl Peaks {
    fn raise(&mut self, rss_kib: u64, fds: u64, store: u64) {
        self.rss_kib = self.rss_kib.max(rss_kib);
        self.fds = self.fds.max(fds);
        self.store = self.store.max(store);
    }
}

pub fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// Starts every user agent and waits for them all. Each ends on its own
/// (every step is bounded); the hard end only guards against a hang.
pub async fn run_uas(sh: &Arc<Shared>, seed: u64) {
    let args = &sh.args;
    let mut uas = JoinSet::new();
    for n in 0..args.uas {
        let ua = Ua {
            n,
            sh: sh.clone(),
            rng: StdRng::seed_from_u64(seed.wrapping_add(n as u64)),
            uaid: None,
            channels: Vec::new(),
            live: None,
            seen: HashSet::new(),
            draining: false,
            topics: 0,
            receipt_sub: None,
            node: 0,
            finals: HashSet::new(),
        };
        uas.spawn(ua.run());
    }
    let hard_end = sh.drain_at + stats::secs(args.long_offline + args.drain + 60.0);
    let mut finished = 0;
    while let Ok(Some(_)) = tokio::time::timeout_at(hard_end.into(), uas.join_next()).await {
        finished += 1;
    }
    if finished < args.uas {
        sh.errors.add_n(
            "user agent still running at the end",
            (args.uas - finished) as u64,
        );
        uas.abort_all();
    }
}

/// Server figures every second for the peaks, with a progress line now
/// and then.
pub struct ServerWatch {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    peaks: Arc<Mutex<Peaks>>,
    server: Servers,
    data_dir: Option<PathBuf>,
}

/// The server's figures at the end and at their peaks.
pub struct ServerFigures {
    pub peaks: Peaks,
    pub rss: Option<u64>,
    pub fds: Option<u64>,
    pub store: Option<u64>,
}

impl ServerWatch {
    pub fn spawn(server: &Servers, sh: &Arc<Shared>) -> ServerWatch {
        let peaks = Arc::new(Mutex::new(Peaks::default()));
        let (stop, mut stop_rx) = watch::channel(false);
        let (srv, p, sh) = (server.clone(), peaks.clone(), sh.clone());
        let dir = sh.args.data_dir.clone();
        // About a dozen progress lines per run, at most one a minute.
        let every = ((sh.args.duration / 12.0) as u64).clamp(5, 60);
        let data_dir = dir.clone();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            let mut n = 0u64;
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop_rx.changed() => break,
                }
                let rss = srv.rss_kib().unwrap_or(0);
                let fds = srv.open_fds().unwrap_or(0);
                let store = dir.as_deref().map(disk_bytes).unwrap_or(0);
                p.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .raise(rss, fds, store);
                n += 1;
                if n.is_multiple_of(every) {
                    eprintln!(
                        "  {:>5.0} s: {} accepted, {} received, {} online; server {:.1} MiB, {fds} files, store {:.1} MiB",
                        sh.now(),
                        sh.accepted.load(Relaxed),
                        sh.received.load(Relaxed),
                        sh.online.load(Relaxed),
                        mib(rss),
                        store as f64 / 1048576.0,
                    );
                }
            }
        });
        ServerWatch {
            stop,
            task,
            peaks,
            server: server.clone(),
            data_dir,
        }
    }

    /// Stops sampling; the final figures, counted into the peaks.
    pub async fn stop(self) -> ServerFigures {
        let _ = self.stop.send(true);
        let _ = self.task.await;
        let rss = self.server.rss_kib();
        let fds = self.server.open_fds();
        let store = self.data_dir.as_deref().map(disk_bytes);
        let mut peaks = *self.peaks.lock().unwrap_or_else(|p| p.into_inner());
        peaks.raise(rss.unwrap_or(0), fds.unwrap_or(0), store.unwrap_or(0));
        ServerFigures {
            peaks,
            rss,
            fds,
            store,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_travel_in_the_plaintext() {
        assert_eq!(id_of(&plaintext(42, 100)), Some(42));
        assert_eq!(plaintext(42, 100).len(), 100);
        // Too small a size still carries the id.
        assert_eq!(id_of(&plaintext(123456789, 1)), Some(123456789));
        assert_eq!(id_of(b"herald-loadtest c=1 s=2;"), None);
        assert_eq!(id_of(b"soak id=x;"), None);
    }

    #[test]
    fn a_receipt_subscription_is_the_same_under_another_node() {
        let a = "http://127.0.0.1:8001/r/tok1";
        assert!(same_subscription(a, "http://127.0.0.1:8002/r/tok1"));
        assert!(!same_subscription(a, "http://127.0.0.1:8001/r/tok2"));
        assert!(same_subscription("not a url", "not a url"));
    }

    #[test]
    fn encrypted_ids_decrypt() {
        let (keys, auth) = subscription_keys().unwrap();
        let body = ece::encrypt(keys.public_key(), &auth, &plaintext(7, MAX_PLAINTEXT)).unwrap();
        assert!(body.len() <= 4096);
        let plain = ece::decrypt(&keys, &auth, &body).unwrap();
        assert_eq!(id_of(&plain), Some(7));
    }

    #[test]
    fn disk_bytes_counts_nested_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("a")).unwrap();
        std::fs::write(dir.path().join("a/f"), vec![1u8; 10000]).unwrap();
        assert!(disk_bytes(dir.path()) >= 10000);
        assert_eq!(disk_bytes(&dir.path().join("missing")), 0);
    }
}
