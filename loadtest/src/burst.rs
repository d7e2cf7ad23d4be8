//! Scenario `burst`: many messages in flight on one channel, each
//! acknowledged with its own `ack` frame, as Firefox does (issue 9: Herald
//! used to close such a user agent with 1008 "rate limit" once more than
//! about 100 acks arrived in a burst). Two phases, both reported:
//!
//! 1. *live burst*: connected user agents; several senders POST
//!    `--messages` per channel as fast as the endpoint accepts them, while
//!    each user agent acks every notification with a frame of its own.
//! 2. *backlog drain*: the user agents disconnect, `--backlog` messages per
//!    channel are stored, and they come back with the same uaid and
//!    channelIDs and ack each stored notification individually.
//!
//! A server close in either phase is recorded (code and reason) as a failure
//! in the results and the summary. The drain reconnects after such a close,
//! as a browser would, at most `--max-reconnects` times, and counts every
//! reconnect it needed.
//!
//! Matching: every message of the run has its own pre-encrypted payload,
//! hence its own random salt, so (channelID, salt) names exactly one send
//! however many are in flight and in whatever order they arrive.

use crate::crypto::{self, Pool};
use crate::fleet;
use crate::harness::{self, RateWatch, Run};
use crate::proto::{self, Target, Ws};
use crate::results::{self, r2, Common, CpuMeter};
use crate::sender::{self, Endpoint, HttpClient, Outcome};
use crate::stats::{self, Clock, Hist, LatencySummary, Tally};
use crate::throughput::{channel_of, resolve_endpoints};
use anyhow::{bail, Result};
use futures_util::StreamExt;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering::*};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;

#[derive(clap::Args, Clone, Debug)]
pub struct BurstArgs {
    #[command(flatten)]
    pub common: Common,
    /// Connected user agents (each with --channels channels, one by default).
    #[arg(long, default_value_t = 4)]
    pub uas: usize,
    /// Messages POSTed to each channel in the live burst.
    #[arg(long, default_value_t = 1000)]
    pub messages: usize,
    /// Messages stored for each channel while its user agent is offline, then
    /// drained on reconnect. --backlog × --channels must stay under --max-stored.
    #[arg(long, default_value_t = 500)]
    pub backlog: usize,
    /// Concurrent senders, sharing one VAPID key, each with one keep-alive
    /// connection and one request in flight; all of them post to every channel.
    #[arg(long, default_value_t = 8)]
    pub senders: usize,
    /// Plaintext bytes per message.
    #[arg(long, default_value_t = 1024)]
    pub payload: usize,
    /// TTL header of each message, seconds: long enough to outlive the run.
    #[arg(long, default_value_t = 3600)]
    pub ttl: u32,
    /// Seconds to wait for notifications still owed: after the last POST of
    /// the live burst, and from reconnecting for the backlog.
    #[arg(long, default_value_t = 30.0)]
    pub drain: f64,
    /// Reconnects each user agent may make when the server closes its
    /// websocket during the drain (every close is recorded as a failure).
    #[arg(long, default_value_t = 3)]
    pub max_reconnects: u32,
    /// The server's cap on undelivered messages per user agent (Herald's
    /// max_stored_messages); the backlog is kept under it.
    #[arg(long, default_value_t = 1000)]
    pub max_stored: usize,
    /// Seconds a sender retries one message answered 429 (with a short
    /// backoff) before giving up on its channel.
    #[arg(long, default_value_t = 10.0)]
    pub retry_for: f64,
}

const LIVE: u8 = 0;
const DRAIN: u8 = 1;

fn phase_name(phase: u8) -> &'static str {
    if phase == LIVE {
        "live"
    } else {
        "drain"
    }
}

/// How the server ended a connection: the close frame's code and reason, or
/// (code None) what happened instead of a close frame.
#[derive(Clone, Debug, PartialEq)]
pub struct CloseInfo {
    pub code: Option<u16>,
    pub reason: String,
}

impl CloseInfo {
    fn from_frame(frame: Option<CloseFrame>) -> Self {
        match frame {
            Some(f) => CloseInfo {
                code: Some(u16::from(f.code)),
                reason: f.reason.as_str().to_string(),
            },
            None => CloseInfo {
                code: None,
                reason: "close frame without a code".into(),
            },
        }
    }

    fn without_frame(what: impl Into<String>) -> Self {
        CloseInfo {
            code: None,
            reason: what.into(),
        }
    }

    pub fn describe(&self) -> String {
        match self.code {
            Some(c) if self.reason.is_empty() => c.to_string(),
            Some(c) => format!("{c} {}", self.reason),
            None => self.reason.clone(),
        }
    }
}

/// Every message of the run, by id `channel * per_channel + m`: the first
/// `live` of each channel belong to the live burst, the rest to the backlog.
struct Books {
    clock: Clock,
    pool: Pool,
    per_ua: usize,
    live: usize,
    per_channel: usize,
    ids: Arc<Vec<Uuid>>,
    /// Salt of each message's payload -> message id.
    salts: HashMap<[u8; 16], u32>,
    /// When the message's (latest) POST was sent; 0 = never.
    sent_us: Vec<AtomicU64>,
    accepted: Vec<AtomicBool>,
    /// Times the message's notification was read.
    received: Vec<AtomicU32>,
    /// User agents whose live-burst connection is still open.
    open: Vec<AtomicBool>,
    phase: AtomicU8,
    latency: Hist,
    live_delivered: AtomicU64,
    /// Live-burst messages first delivered after reconnecting.
    late_live: AtomicU64,
    drain_delivered: AtomicU64,
    duplicates: [AtomicU64; 2],
    acks: [AtomicU64; 2],
    last_ack_us: [AtomicU64; 2],
    unexpected: AtomicU64,
    malformed: AtomicU64,
    accepted_total: AtomicU64,
    delivered_total: AtomicU64,
    closes: Mutex<Vec<(u8, usize, CloseInfo)>>,
}

impl Books {
    fn new(pool: Pool, ids: Arc<Vec<Uuid>>, per_ua: usize, live: usize) -> Result<Books> {
        let channels = ids.len();
        let per_channel = pool.per_channel;
        let total = channels * per_channel;
        let mut salts = HashMap::with_capacity(total);
        for c in 0..channels {
            for m in 0..per_channel {
                let mut salt = [0u8; 16];
                salt.copy_from_slice(&pool.body(c, m)[..16]);
                if salts.insert(salt, (c * per_channel + m) as u32).is_some() {
                    bail!("two payloads drew the same random salt; run again");
                }
            }
        }
        let zeros = |n: usize| (0..n).map(|_| AtomicU64::new(0)).collect::<Vec<_>>();
        Ok(Books {
            clock: Clock::new(),
            pool,
            per_ua,
            live,
            per_channel,
            salts,
            sent_us: zeros(total),
            accepted: (0..total).map(|_| AtomicBool::new(false)).collect(),
            received: (0..total).map(|_| AtomicU32::new(0)).collect(),
            open: (0..channels / per_ua.max(1))
                .map(|_| AtomicBool::new(false))
                .collect(),
            ids,
            phase: AtomicU8::new(LIVE),
            latency: Hist::new(),
            live_delivered: AtomicU64::new(0),
            late_live: AtomicU64::new(0),
            drain_delivered: AtomicU64::new(0),
            duplicates: Default::default(),
            acks: Default::default(),
            last_ack_us: Default::default(),
            unexpected: AtomicU64::new(0),
            malformed: AtomicU64::new(0),
            accepted_total: AtomicU64::new(0),
            delivered_total: AtomicU64::new(0),
            closes: Mutex::new(Vec::new()),
        })
    }

    fn ua_ids(&self, ua: usize) -> std::ops::Range<usize> {
        ua * self.per_ua * self.per_channel..(ua + 1) * self.per_ua * self.per_channel
    }

    fn is_live(&self, id: usize) -> bool {
        id % self.per_channel < self.live
    }

    /// Whether `ua` is still owed an accepted message (of the live burst
    /// only, or of either phase).
    fn owed(&self, ua: usize, live_only: bool) -> bool {
        self.ua_ids(ua).any(|id| {
            (!live_only || self.is_live(id))
                && self.accepted[id].load(Relaxed)
                && self.received[id].load(Relaxed) == 0
        })
    }

    /// Accepted messages (of one phase) and how many of them were never read.
    fn count(&self, live: bool) -> (u64, u64) {
        let (mut accepted, mut missing) = (0, 0);
        for id in (0..self.accepted.len()).filter(|&id| self.is_live(id) == live) {
            if self.accepted[id].load(Relaxed) {
                accepted += 1;
                if self.received[id].load(Relaxed) == 0 {
                    missing += 1;
                }
            }
        }
        (accepted, missing)
    }

    /// Books one text frame; returns the ack to send, one per notification.
    fn on_text(&self, ua: usize, text: &str) -> Option<String> {
        let n = proto::notification(text, &self.malformed)?;
        let now = self.clock.now_us();
        let ch = &*n.channel_id;
        let ack = proto::ack_json(ch, &n.version);
        let phase = self.phase.load(Relaxed);
        let id = channel_of(&self.ids, ua, self.per_ua, ch).and_then(|c| {
            let salt = n.data.as_deref().and_then(crypto::salt_from_data)?;
            let id = *self.salts.get(&salt)? as usize;
            (id / self.per_channel == c).then_some(id)
        });
        let Some(id) = id else {
            self.unexpected.fetch_add(1, Relaxed);
            return Some(ack);
        };
        if self.received[id].fetch_add(1, Relaxed) > 0 {
            self.duplicates[phase as usize].fetch_add(1, Relaxed);
            return Some(ack);
        }
        self.delivered_total.fetch_add(1, Relaxed);
        match (self.is_live(id), phase) {
            (true, LIVE) => {
                self.live_delivered.fetch_add(1, Relaxed);
                let sent = self.sent_us[id].load(Relaxed);
                if sent > 0 {
                    self.latency.record(ua, now.saturating_sub(sent));
                }
            }
            (true, _) => {
                self.late_live.fetch_add(1, Relaxed);
            }
            (false, _) => {
                self.drain_delivered.fetch_add(1, Relaxed);
            }
        }
        Some(ack)
    }

    fn acked(&self) {
        let p = self.phase.load(Relaxed) as usize;
        self.acks[p].fetch_add(1, Relaxed);
        stats::fetch_max(&self.last_ack_us[p], self.clock.now_us());
    }

    fn record_close(&self, phase: u8, ua: usize, info: CloseInfo) {
        if let Ok(mut c) = self.closes.lock() {
            c.push((phase, ua, info));
        }
    }

    /// Server closes of one phase, by description.
    fn closes_in(&self, phase: u8) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        if let Ok(c) = self.closes.lock() {
            for (_, _, info) in c.iter().filter(|(p, _, _)| *p == phase) {
                *out.entry(info.describe()).or_insert(0) += 1;
            }
        }
        out
    }

    /// Distinct user agents the server closed in one phase.
    fn uas_closed_in(&self, phase: u8) -> u64 {
        let mut uas: Vec<usize> = self
            .closes
            .lock()
            .map(|c| {
                c.iter()
                    .filter(|(p, _, _)| *p == phase)
                    .map(|x| x.1)
                    .collect()
            })
            .unwrap_or_default();
        uas.sort_unstable();
        uas.dedup();
        uas.len() as u64
    }
}

/// How a user agent's connection ended.
enum Ended {
    /// Nothing more is owed.
    Done(Ws),
    /// The run told it to stop.
    Stopped(Ws),
    /// The deadline passed with messages still owed.
    TimedOut(Ws),
    /// The server closed the websocket (or the connection broke).
    Closed(CloseInfo),
}

/// Reads notifications and acks each with a frame of its own, as Firefox
/// does, until `done()`, `stop` fires or `deadline` passes. A connection
/// the server ends comes back as `Closed` with its close code and reason.
async fn ack_each(
    ua: usize,
    mut ws: Ws,
    books: &Books,
    done: impl Fn() -> bool,
    stop: &mut watch::Receiver<bool>,
    deadline: Instant,
) -> Ended {
    loop {
        if done() {
            return Ended::Done(ws);
        }
        if *stop.borrow_and_update() {
            return Ended::Stopped(ws);
        }
        tokio::select! {
            changed = stop.changed() => {
                if changed.is_err() {
                    return Ended::Stopped(ws);
                }
            }
            _ = tokio::time::sleep_until(deadline.into()) => return Ended::TimedOut(ws),
            msg = ws.next() => match msg {
                Some(Ok(Message::Text(t))) => {
                    if let Some(ack) = books.on_text(ua, t.as_str()) {
                        if let Err(f) = proto::send_text(&mut ws, ack, "ack").await {
                            return Ended::Closed(close_after_failed_send(&mut ws, &f.reason).await);
                        }
                        books.acked();
                    }
                }
                Some(Ok(Message::Close(frame))) => return Ended::Closed(CloseInfo::from_frame(frame)),
                Some(Ok(_)) => {}
                None => return Ended::Closed(CloseInfo::without_frame("connection ended without a close frame")),
                Some(Err(e)) => {
                    return Ended::Closed(CloseInfo::without_frame(format!(
                        "no close frame ({})",
                        proto::ws_error_name(&e)
                    )))
                }
            }
        }
    }
}

/// An ack could not be written: the server's close frame may still be
/// waiting to be read, and it says why.
async fn close_after_failed_send(ws: &mut Ws, why: &str) -> CloseInfo {
    let frame = tokio::time::timeout(Duration::from_secs(1), async {
        while let Some(Ok(m)) = ws.next().await {
            if let Message::Close(f) = m {
                return Some(f);
            }
        }
        None
    })
    .await;
    match frame {
        Ok(Some(f)) => CloseInfo::from_frame(f),
        _ => CloseInfo::without_frame(format!("ack could not be sent ({why})")),
    }
}

/// The application-server side, shared by both phases.
#[derive(Clone)]
struct Sending {
    books: Arc<Books>,
    endpoints: Arc<Vec<Option<Endpoint>>>,
    /// Authorization header per origin index.
    auth: Arc<Vec<http::HeaderValue>>,
    client: HttpClient,
    ttl: u32,
    limit: Duration,
    retry_for: Duration,
}

/// What one phase's senders ran into.
struct SendStats {
    too_many: AtomicU64,
    errors: Tally,
    /// Channels answered 429 for longer than --retry-for: skipped from then on.
    gave_up: Vec<AtomicBool>,
    not_sent: AtomicU64,
}

impl SendStats {
    fn new(channels: usize) -> Self {
        SendStats {
            too_many: AtomicU64::new(0),
            errors: Tally::default(),
            gave_up: (0..channels).map(|_| AtomicBool::new(false)).collect(),
            not_sent: AtomicU64::new(0),
        }
    }
}

/// Posts every message in `order` with `senders` concurrent senders, each
/// taking the next message as soon as its previous one is answered. A 429
/// (the user agent's store is full) is retried after a short backoff.
async fn send_phase(s: &Sending, order: Vec<u32>, senders: usize, st: Arc<SendStats>) {
    let order = Arc::new(order);
    let next = Arc::new(AtomicUsize::new(0));
    let mut set = JoinSet::new();
    for _ in 0..senders.max(1) {
        let (s, order, next, st) = (s.clone(), order.clone(), next.clone(), st.clone());
        set.spawn(async move {
            // This sender's POSTs, round-robin over the push nodes.
            let mut posts = 0usize;
            loop {
                let k = next.fetch_add(1, Relaxed);
                let Some(&id) = order.get(k) else { break };
                post_one(&s, id as usize, &st, &mut posts).await;
            }
        });
    }
    let mut last_print = Instant::now();
    while set.join_next().await.is_some() {
        if last_print.elapsed() > Duration::from_secs(2) {
            eprintln!(
                "  sent {}/{}",
                next.load(Relaxed).min(order.len()),
                order.len()
            );
            last_print = Instant::now();
        }
    }
}

async fn post_one(s: &Sending, id: usize, st: &SendStats, posts: &mut usize) {
    let b = &s.books;
    let c = id / b.per_channel;
    let Some(ep) = s.endpoints[c].as_ref() else {
        return;
    };
    let first = Instant::now();
    let mut backoff = Duration::from_millis(5);
    loop {
        if st.gave_up[c].load(Relaxed) {
            st.not_sent.fetch_add(1, Relaxed);
            return;
        }
        b.sent_us[id].store(b.clock.now_us(), Relaxed);
        let body = b.pool.body(c, id % b.per_channel).clone();
        let out = sender::post(
            &s.client,
            ep,
            *posts,
            &s.auth[ep.origin],
            body,
            s.ttl,
            s.limit,
        );
        *posts += 1;
        match out.await {
            Outcome::Status(201) => {
                b.accepted[id].store(true, Relaxed);
                b.accepted_total.fetch_add(1, Relaxed);
                return;
            }
            Outcome::Status(429) => {
                st.too_many.fetch_add(1, Relaxed);
                if first.elapsed() >= s.retry_for {
                    st.gave_up[c].store(true, Relaxed);
                    st.not_sent.fetch_add(1, Relaxed);
                    return;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_millis(100));
            }
            other => {
                st.errors.add(other.key());
                return;
            }
        }
    }
}

/// Message ids of messages `range` of every channel, interleaved across
/// channels so every channel gets its burst at once.
fn send_order(
    books: &Books,
    endpoints: &[Option<Endpoint>],
    range: std::ops::Range<usize>,
) -> Vec<u32> {
    let channels = endpoints.len();
    range
        .flat_map(|m| (0..channels).map(move |c| (c, m)))
        .filter(|&(c, _)| endpoints[c].is_some())
        .map(|(c, m)| (c * books.per_channel + m) as u32)
        .collect()
}

async fn live_ua(ua: usize, ws: Ws, books: Arc<Books>, mut stop: watch::Receiver<bool>) {
    let forever = Instant::now() + Duration::from_secs(864_000);
    match ack_each(ua, ws, &books, || false, &mut stop, forever).await {
        Ended::Closed(info) => {
            books.open[ua].store(false, Relaxed);
            books.record_close(LIVE, ua, info);
        }
        Ended::Done(ws) | Ended::Stopped(ws) | Ended::TimedOut(ws) => fleet::close(ws).await,
    }
}

struct DrainCtx {
    targets: Vec<Target>,
    books: Arc<Books>,
    limit: Duration,
    deadline: Instant,
    max_reconnects: u32,
    hello_latency: Hist,
    errors: Tally,
    uaid_changed: AtomicU64,
    reconnects: AtomicU64,
}

/// Comes back with the same uaid and channelIDs and acks every stored
/// notification individually. A server close is recorded, then (within
/// --max-reconnects) the user agent reconnects, as a browser would.
async fn drain_ua(ua: usize, uaid: String, mine: Vec<Uuid>, cx: Arc<DrainCtx>) {
    let (_keep, mut never) = watch::channel(false);
    let mut reconnects = 0u32;
    loop {
        let ws = match fleet::resume(
            proto::target_of(&cx.targets, ua),
            ua,
            &uaid,
            &mine,
            cx.limit,
            &cx.hello_latency,
            &cx.uaid_changed,
        )
        .await
        {
            Ok(ws) => ws,
            Err(f) => return cx.errors.add(format!("reconnect {}", f.key())),
        };
        let books = &cx.books;
        let done = || !books.owed(ua, false);
        match ack_each(ua, ws, books, done, &mut never, cx.deadline).await {
            Ended::Closed(info) => {
                books.record_close(DRAIN, ua, info);
                if reconnects >= cx.max_reconnects || Instant::now() >= cx.deadline {
                    return;
                }
                reconnects += 1;
                cx.reconnects.fetch_add(1, Relaxed);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Ended::TimedOut(ws) => {
                cx.errors.add("gave up waiting (--drain seconds)");
                return fleet::close(ws).await;
            }
            Ended::Done(ws) | Ended::Stopped(ws) => return fleet::close(ws).await,
        }
    }
}

fn cut_off_text(uas_closed: u64, of: usize, closes: &BTreeMap<String, u64>) -> String {
    if closes.is_empty() {
        return "not cut off".into();
    }
    let why: Vec<String> = closes.keys().cloned().collect();
    format!("CUT OFF {uas_closed}/{of} ({})", why.join("; "))
}

pub async fn run(args: BurstArgs) -> Result<()> {
    let common = &args.common;
    if args.uas == 0
        || args.senders == 0
        || common.channels == 0
        || args.messages == 0
        || args.backlog == 0
    {
        bail!("--uas, --senders, --channels, --messages and --backlog must be at least 1");
    }
    let per_ua = common.channels;
    if args.backlog * per_ua >= args.max_stored {
        bail!(
            "--backlog × --channels is {} messages per user agent: keep it under the server's {} \
             (--max-stored, Herald's max_stored_messages), or storing it only meets 429",
            args.backlog * per_ua,
            args.max_stored
        );
    }
    let mut run = Run::start(
        "burst",
        common,
        serde_json::json!({
            "uas": args.uas, "channels_per_ua": per_ua, "messages_per_channel": args.messages,
            "backlog_per_channel": args.backlog, "senders": args.senders,
            "payload_bytes": args.payload, "ttl": args.ttl, "drain_s": args.drain,
            "max_reconnects": args.max_reconnects, "max_stored": args.max_stored,
            "retry_for_s": args.retry_for, "concurrency": common.concurrency,
        }),
    )
    .await?;
    run.need_files(
        args.uas + args.senders + 100,
        &format!("{} user agents and {} senders", args.uas, args.senders),
    )?;
    let (mut fleet, sending) = connect(&args, &run).await?;
    let books = sending.books.clone();
    let rates = RateWatch::spawn(
        &["accepted", "delivered"],
        Duration::from_millis(200),
        move || {
            vec![
                books.accepted_total.load(Relaxed),
                books.delivered_total.load(Relaxed),
            ]
        },
    );
    let cpu = CpuMeter::start(&run.server);
    let live = live_burst(&args, &mut fleet, &sending).await;
    // Server CPU of the live burst (accepting and delivering), apart from
    // that of the backlog (storing, then delivering on reconnect).
    let live_cpu = cpu.server_secs();
    let drain = backlog_drain(&args, &run, &fleet, &sending).await;
    let server_cpu = cpu.record(&mut run.result);
    run.result.rates = rates.stop().await;
    let cpu = PhaseCpu {
        all: server_cpu,
        live: live_cpu,
    };
    let summary = record(&args, &mut run, &fleet, &live, &drain, cpu);
    run.finish(summary)
}

/// The user agents up for the live burst.
struct Fleet {
    setup: fleet::Setup,
    uaids: Vec<Option<String>>,
    ids: Arc<Vec<Uuid>>,
}

/// One payload per message, the user agents with their channels, and what
/// senders need to reach them (one VAPID key for all).
async fn connect(args: &BurstArgs, run: &Run<'_>) -> Result<(Fleet, Sending)> {
    let per_ua = args.common.channels;
    let channels = args.uas * per_ua;
    let per_channel = args.messages + args.backlog;
    eprintln!(
        "burst: encrypting {} payloads (one per message, each with its own salt)",
        channels * per_channel
    );
    let (vapids, keys) = harness::vapids(1)?;
    let pool = harness::payload_pool(channels, per_channel, args.payload, false).await?;
    let ids = harness::channel_ids(channels);
    let books = Arc::new(Books::new(pool, ids.clone(), per_ua, args.messages)?);

    eprintln!("burst: connecting {} user agents", args.uas);
    let setup = run.bring_up(args.uas, ids.clone(), keys).await;
    setup.require_any("connect")?;
    let (endpoints, origins) =
        resolve_endpoints(&setup.ups, per_ua, &run.push_bases, &setup.errors).await?;
    let auth = origins
        .list
        .iter()
        .map(|(o, _)| vapids[0].authorization(o))
        .collect::<Result<Vec<_>>>()?;
    let sending = Sending {
        books,
        endpoints: Arc::new(endpoints),
        auth: Arc::new(auth),
        client: sender::client(args.senders),
        ttl: args.ttl,
        limit: run.limit,
        retry_for: stats::secs(args.retry_for),
    };
    let fleet = Fleet {
        uaids: setup.uaids(),
        setup,
        ids,
    };
    Ok((fleet, sending))
}

/// What the live burst left behind.
struct Live {
    send: Arc<SendStats>,
    send_secs: f64,
    start_us: u64,
    /// Accepted and lost (accepted, not delivered while connected), as the
    /// live burst ended: late arrivals in the drain do not make up for it.
    accepted: u64,
    lost: u64,
    last_ack_us: u64,
}

/// Phase 1: connected user agents ack each notification with its own frame
/// while the senders post --messages per channel; then --drain seconds for
/// whatever is still owed.
async fn live_burst(args: &BurstArgs, fleet: &mut Fleet, s: &Sending) -> Live {
    let books = &s.books;
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut uas = JoinSet::new();
    for (u, up) in fleet.setup.ups.iter_mut().enumerate() {
        if let Some(up) = up.take() {
            books.open[u].store(true, Relaxed);
            uas.spawn(live_ua(u, up.ws, books.clone(), stop_rx.clone()));
        }
    }
    let order = send_order(books, &s.endpoints, 0..args.messages);
    eprintln!(
        "burst: live: {} user agents up; {} senders posting {} messages ({} per channel), each acked with its own frame",
        fleet.setup.connected,
        args.senders,
        order.len(),
        args.messages
    );
    let start_us = books.clock.now_us();
    let send = Arc::new(SendStats::new(books.ids.len()));
    let send_start = Instant::now();
    send_phase(s, order, args.senders, send.clone()).await;
    let send_secs = send_start.elapsed().as_secs_f64();
    let wait_deadline = Instant::now() + stats::secs(args.drain);
    let owed_live = |b: &Books| (0..args.uas).any(|u| b.open[u].load(Relaxed) && b.owed(u, true));
    let mut last_print = Instant::now();
    while owed_live(books) && Instant::now() < wait_deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        if last_print.elapsed() > Duration::from_secs(2) {
            eprintln!(
                "  delivered {}/{}",
                books.live_delivered.load(Relaxed),
                books.accepted_total.load(Relaxed)
            );
            last_print = Instant::now();
        }
    }
    fleet::stop_all(&stop_tx, &mut uas, Duration::from_secs(10)).await;
    let (accepted, lost) = books.count(true);
    Live {
        send,
        send_secs,
        start_us,
        accepted,
        lost,
        last_ack_us: books.last_ack_us[LIVE as usize].load(Relaxed),
    }
}

/// What the backlog drain left behind.
struct Drain {
    send: Arc<SendStats>,
    store_secs: f64,
    stored: u64,
    offline: usize,
    start_us: u64,
    cx: Arc<DrainCtx>,
}

/// Phase 2: the user agents are offline (their live sockets closed);
/// --backlog messages per channel are stored; they come back and ack each
/// stored notification, reconnecting after a server close.
async fn backlog_drain(args: &BurstArgs, run: &Run<'_>, fleet: &Fleet, s: &Sending) -> Drain {
    let books = &s.books;
    let per_channel = args.messages + args.backlog;
    books.phase.store(DRAIN, Relaxed);
    let order = send_order(books, &s.endpoints, args.messages..per_channel);
    let offline = fleet.uaids.iter().filter(|u| u.is_some()).count();
    eprintln!(
        "burst: drain: {offline} user agents offline; storing {} messages",
        order.len()
    );
    let send = Arc::new(SendStats::new(books.ids.len()));
    let store_start = Instant::now();
    send_phase(s, order, args.senders, send.clone()).await;
    let store_secs = store_start.elapsed().as_secs_f64();
    let (stored, _) = books.count(false);
    eprintln!("burst: drain: {stored} stored; reconnecting");
    let start_us = books.clock.now_us();
    let cx = Arc::new(DrainCtx {
        targets: run.targets.clone(),
        books: books.clone(),
        limit: run.limit,
        deadline: Instant::now() + stats::secs(args.drain),
        max_reconnects: args.max_reconnects,
        hello_latency: Hist::new(),
        errors: Tally::default(),
        uaid_changed: AtomicU64::new(0),
        reconnects: AtomicU64::new(0),
    });
    let per_ua = args.common.channels;
    let mut uas = JoinSet::new();
    for (u, uaid) in fleet.uaids.iter().enumerate() {
        let Some(uaid) = uaid.clone() else { continue };
        let mine = fleet.ids[u * per_ua..(u + 1) * per_ua].to_vec();
        uas.spawn(drain_ua(u, uaid, mine, cx.clone()));
    }
    // Each reconnect is bounded by the step limit; allow them all.
    let limit = run.limit;
    let hard_end = cx.deadline + limit * (2 * (args.max_reconnects.min(100) + 1)) + limit;
    fleet::join_all_until(&mut uas, hard_end, || {
        format!("  drained {}/{stored}", books.drain_delivered.load(Relaxed))
    })
    .await;
    Drain {
        send,
        store_secs,
        stored,
        offline,
        start_us,
        cx,
    }
}

/// Server CPU seconds over the whole run and over the live burst.
struct PhaseCpu {
    all: Option<f64>,
    live: Option<f64>,
}

/// Durations to the millisecond: a small burst can finish in under 5 ms.
fn r3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn secs_between(from: u64, to: u64) -> f64 {
    if to > from {
        (to - from) as f64 / 1e6
    } else {
        0.0
    }
}

fn per_s(n: u64, s: f64) -> f64 {
    if s > 0.0 {
        n as f64 / s
    } else {
        0.0
    }
}

/// Both phases' errors, metrics, latency and notes into the results;
/// returns the summary.
fn record(
    args: &BurstArgs,
    run: &mut Run<'_>,
    fleet: &Fleet,
    live: &Live,
    drain: &Drain,
    cpu: PhaseCpu,
) -> String {
    let books = &drain.cx.books;
    record_errors(run, &fleet.setup.errors, live, drain);
    let result = &mut run.result;
    let (live_accepted, live_lost) = (live.accepted, live.lost);
    let (_, live_never) = books.count(true);
    let live_delivered = books.live_delivered.load(Relaxed);
    let live_dups = books.duplicates[LIVE as usize].load(Relaxed);
    let live_secs = secs_between(live.start_us, live.last_ack_us);
    let live_rate = per_s(live_delivered, live_secs);
    let live_closes = books.closes_in(LIVE);
    let live_closed = books.uas_closed_in(LIVE);
    let connected = fleet.setup.connected;
    result.metric("uas_connected", connected as u64);
    result.metric("channels", books.ids.len() as u64);
    result.metric("live_accepted", live_accepted);
    result.metric("live_delivered", live_delivered);
    result.metric("live_lost", live_lost);
    result.metric("live_duplicates", live_dups);
    result.metric("live_cut_off", live_closed);
    if !live_closes.is_empty() {
        let why: Vec<&str> = live_closes.keys().map(|s| s.as_str()).collect();
        result.metric("live_close", why.join("; "));
    }
    result.metric("live_last_ack_s", r3(live_secs));
    result.metric("live_per_s", r2(live_rate));
    result.metric("live_send_s", r3(live.send_secs));
    result.metric(
        "live_accepted_per_s",
        r2(per_s(live_accepted, live.send_secs)),
    );
    result.metric("live_acks_sent", books.acks[LIVE as usize].load(Relaxed));
    result.metric("live_http_429", live.send.too_many.load(Relaxed));
    result.metric("live_http_errors", live.send.errors.total());
    let d = record_drain(result, drain);
    result.metric("never_delivered", live_never + d.missing);
    let cpu_us = result.cpu_per(
        "server_cpu_us_per_delivered",
        cpu.all,
        books.delivered_total.load(Relaxed),
    );
    result.cpu_per("live_server_cpu_us_per_delivered", cpu.live, live_delivered);
    let drain_cpu = cpu.all.zip(cpu.live).map(|(all, live)| all - live);
    result.cpu_per(
        "drain_server_cpu_us_per_delivered",
        drain_cpu,
        d.delivered + books.late_live.load(Relaxed),
    );
    let lat = LatencySummary::from_hist(&books.latency.merged());
    result.latency.insert("end_to_end".into(), lat.clone());
    run.latency("reconnect_hello", &drain.cx.hello_latency);
    run.latency("setup", &fleet.setup.latency);
    let result = &mut run.result;
    if !live_closes.is_empty() {
        result.notes.push(format!(
            "the server closed the websocket of {live_closed} of {connected} user agents during the live burst while they acked each notification with its own frame ({})",
            live_closes.keys().cloned().collect::<Vec<_>>().join("; ")
        ));
    }
    let reconnects = drain.cx.reconnects.load(Relaxed);
    if reconnects > 0 {
        result.notes.push(format!(
            "the drain needed {reconnects} reconnects after server closes"
        ));
    }
    let too_many = live.send.too_many.load(Relaxed) + drain.send.too_many.load(Relaxed);
    if too_many > 0 {
        result.notes.push(format!(
            "senders were answered 429 {too_many} times and backed off: the user agents' stores were full"
        ));
    }
    let stored = drain.stored;
    format!(
        "burst[{}]: live {live_accepted} accepted, {live_delivered} delivered ({live_lost} lost, {live_dups} duplicates), last ack {live_secs:.3}s ({live_rate:.0}/s), {}, {} x 429, latency {}; \
         drain {stored} stored, {} delivered ({} missing, {} duplicates) in {:.3}s ({:.0}/s), {}, {reconnects} reconnects; {} errors; {}",
        args.common.target,
        cut_off_text(live_closed, connected, &live_closes),
        live.send.too_many.load(Relaxed),
        lat.short(),
        d.delivered,
        d.missing,
        d.dups,
        d.secs,
        d.rate,
        cut_off_text(d.closed, drain.offline, &d.closes),
        run.total_errors(),
        results::cpu_text(cpu_us, "delivered message"),
    )
}

/// The drain's figures, as recorded and as the summary quotes them.
struct DrainFigures {
    delivered: u64,
    missing: u64,
    dups: u64,
    secs: f64,
    rate: f64,
    closed: u64,
    closes: BTreeMap<String, u64>,
}

/// The backlog drain's metrics.
fn record_drain(result: &mut crate::results::RunResult, drain: &Drain) -> DrainFigures {
    let books = &drain.cx.books;
    let delivered = books.drain_delivered.load(Relaxed);
    let (_, missing) = books.count(false);
    let dups = books.duplicates[DRAIN as usize].load(Relaxed);
    let secs = secs_between(
        drain.start_us,
        books.last_ack_us[DRAIN as usize].load(Relaxed),
    );
    let rate = per_s(delivered, secs);
    let closes = books.closes_in(DRAIN);
    let closed = books.uas_closed_in(DRAIN);
    result.metric("drain_stored", drain.stored);
    result.metric(
        "drain_store_per_s",
        r2(per_s(drain.stored, drain.store_secs)),
    );
    result.metric("drain_delivered", delivered);
    result.metric("drain_missing", missing);
    result.metric("drain_duplicates", dups);
    result.metric("drain_late_live", books.late_live.load(Relaxed));
    result.metric("drain_s", r3(secs));
    result.metric("drain_per_s", r2(rate));
    result.metric("drain_cut_off", closed);
    result.metric("drain_closes", closes.values().copied().sum::<u64>());
    if !closes.is_empty() {
        let why: Vec<&str> = closes.keys().map(|s| s.as_str()).collect();
        result.metric("drain_close", why.join("; "));
    }
    result.metric("drain_reconnects", drain.cx.reconnects.load(Relaxed));
    result.metric("drain_acks_sent", books.acks[DRAIN as usize].load(Relaxed));
    result.metric("drain_http_429", drain.send.too_many.load(Relaxed));
    result.metric("drain_http_errors", drain.send.errors.total());
    DrainFigures {
        delivered,
        missing,
        dups,
        secs,
        rate,
        closed,
        closes,
    }
}

/// Every failure of both phases, each under its phase's name.
fn record_errors(run: &mut Run<'_>, setup_errors: &Tally, live: &Live, drain: &Drain) {
    let books = &drain.cx.books;
    run.errors_from(&[setup_errors]);
    let errors = &mut run.result.errors;
    for (phase, st) in [(LIVE, &live.send), (DRAIN, &drain.send)] {
        let name = phase_name(phase);
        for (k, n) in st.errors.snapshot() {
            errors.insert(format!("{name}: {k}"), n);
        }
        let not_sent = st.not_sent.load(Relaxed);
        if not_sent > 0 {
            errors.insert(
                format!("{name}: not sent (429 for longer than --retry-for)"),
                not_sent,
            );
        }
    }
    for (k, n) in drain.cx.errors.snapshot() {
        errors.insert(format!("drain: {k}"), n);
    }
    for phase in [LIVE, DRAIN] {
        for (why, n) in books.closes_in(phase) {
            errors.insert(format!("{}: closed by server: {why}", phase_name(phase)), n);
        }
    }
    let (_, drain_missing) = books.count(false);
    run.error_counts(&[
        (
            "live: lost (accepted, not delivered while connected)",
            live.lost,
        ),
        (
            "live: duplicate notification",
            books.duplicates[LIVE as usize].load(Relaxed),
        ),
        ("drain: missing (stored, never delivered)", drain_missing),
        (
            "drain: duplicate notification",
            books.duplicates[DRAIN as usize].load(Relaxed),
        ),
        ("unexpected notification", books.unexpected.load(Relaxed)),
        ("malformed server message", books.malformed.load(Relaxed)),
        (
            "uaid changed on reconnect",
            drain.cx.uaid_changed.load(Relaxed),
        ),
    ]);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `channels` channels, `per_ua` per user agent, `live` + `backlog` messages each.
    fn books(channels: usize, per_ua: usize, live: usize, backlog: usize) -> Books {
        let pool = Pool::build(channels, live + backlog, 32, false).unwrap();
        let ids = Arc::new((0..channels).map(|_| proto::new_channel_id()).collect());
        Books::new(pool, ids, per_ua, live).unwrap()
    }

    fn notification(b: &Books, c: usize, m: usize, version: &str) -> String {
        proto::notification_json(
            &b.ids[c].hyphenated().to_string(),
            version,
            b.pool.body(c, m),
        )
    }

    #[test]
    fn each_of_many_in_flight_messages_is_matched_and_acked_alone() {
        let b = books(2, 1, 300, 50);
        for id in 0..350 {
            b.accepted[id].store(true, Relaxed);
            b.sent_us[id].store(1, Relaxed);
        }
        assert!(b.owed(0, true) && b.owed(0, false));
        // All 300 live messages of channel 0 in flight, delivered in reverse.
        for m in (0..300).rev() {
            let ack = b
                .on_text(0, &notification(&b, 0, m, &format!("v{m}")))
                .unwrap();
            let a: serde_json::Value = serde_json::from_str(&ack).unwrap();
            assert_eq!(a["messageType"], "ack");
            let updates = a["updates"].as_array().unwrap();
            assert_eq!(updates.len(), 1, "one update per ack frame");
            assert_eq!(updates[0]["version"], format!("v{m}"));
        }
        assert_eq!(b.live_delivered.load(Relaxed), 300);
        assert_eq!(b.latency.merged().len(), 300);
        assert!(!b.owed(0, true), "live burst complete");
        assert!(b.owed(0, false), "backlog still owed");
        assert_eq!(b.count(true), (300, 0));
        assert_eq!(b.count(false), (50, 50));
        // The same message again is a duplicate.
        b.on_text(0, &notification(&b, 0, 7, "again")).unwrap();
        assert_eq!(b.duplicates[LIVE as usize].load(Relaxed), 1);
        assert_eq!(b.live_delivered.load(Relaxed), 300);
    }

    #[test]
    fn drain_phase_books_backlog_late_live_and_strays() {
        let b = books(4, 2, 3, 2);
        for id in 0..b.accepted.len() {
            b.accepted[id].store(true, Relaxed);
        }
        b.phase.store(DRAIN, Relaxed);
        // User agent 1 owns channels 2 and 3.
        b.on_text(1, &notification(&b, 2, 1, "x")).unwrap(); // live, arriving late
        b.on_text(1, &notification(&b, 3, 4, "y")).unwrap(); // backlog
        b.on_text(1, &notification(&b, 3, 4, "y")).unwrap(); // again
        assert_eq!(b.late_live.load(Relaxed), 1);
        assert_eq!(b.drain_delivered.load(Relaxed), 1);
        assert_eq!(b.duplicates[DRAIN as usize].load(Relaxed), 1);
        assert_eq!(b.live_delivered.load(Relaxed), 0);
        // Channel 0 is user agent 0's: unexpected for user agent 1.
        assert!(b.on_text(1, &notification(&b, 0, 0, "z")).is_some());
        // Channel 3's id with channel 2's payload: salt belongs elsewhere.
        let mut v: serde_json::Value = serde_json::from_str(&notification(&b, 2, 0, "w")).unwrap();
        v["channelID"] = b.ids[3].to_string().into();
        assert!(b.on_text(1, &v.to_string()).is_some());
        assert_eq!(b.unexpected.load(Relaxed), 2);
        assert!(b.on_text(1, "{}").is_none());
        assert!(b.on_text(1, "not json").is_none());
        assert_eq!(b.malformed.load(Relaxed), 1);
        assert!(b.owed(0, false) && b.owed(1, false));
    }

    #[test]
    fn closes_are_described_and_counted_per_user_agent() {
        let b = books(3, 1, 1, 1);
        let policy = CloseInfo {
            code: Some(1008),
            reason: "rate limit: more than 50 messages per second".into(),
        };
        b.record_close(LIVE, 0, policy.clone());
        b.record_close(LIVE, 2, policy.clone());
        b.record_close(DRAIN, 1, policy.clone());
        b.record_close(
            DRAIN,
            1,
            CloseInfo::without_frame("no close frame (ECONNRESET)"),
        );
        assert_eq!(b.uas_closed_in(LIVE), 2);
        assert_eq!(b.uas_closed_in(DRAIN), 1);
        let live = b.closes_in(LIVE);
        assert_eq!(
            live.get("1008 rate limit: more than 50 messages per second"),
            Some(&2)
        );
        assert_eq!(b.closes_in(DRAIN).values().sum::<u64>(), 2);
        assert_eq!(
            cut_off_text(2, 3, &live),
            "CUT OFF 2/3 (1008 rate limit: more than 50 messages per second)"
        );
        assert_eq!(cut_off_text(0, 3, &BTreeMap::new()), "not cut off");
        assert_eq!(CloseInfo::from_frame(None).code, None);
    }

    #[test]
    fn send_order_interleaves_channels_and_skips_missing_endpoints() {
        let b = books(3, 1, 2, 2);
        let ep = Endpoint {
            uris: vec!["http://127.0.0.1:1/x".parse().unwrap()],
            host: http::HeaderValue::from_static("127.0.0.1:1"),
            origin: 0,
        };
        let eps = vec![Some(ep.clone()), None, Some(ep)];
        assert_eq!(send_order(&b, &eps, 0..2), vec![0, 8, 1, 9]);
        assert_eq!(send_order(&b, &eps, 2..4), vec![2, 10, 3, 11]);
    }
}
