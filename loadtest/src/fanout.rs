//! Scenario `fanout`: broadcasts (issue 12). Many idle user agents follow a
//! broadcast, as Firefox follows `remote-settings/monitor_changes` (they
//! send `"broadcasts": {id: version}` in `hello`), and some follow nothing.
//! The broadcast's version is then changed `--changes` times through
//! Herald's operator API (`PUT /v1/broadcasts/<id>`, the id's '/' left
//! unencoded, body = the version, `Authorization: Bearer <token>`), and for
//! each change this measures how long the server takes to tell every
//! follower: from the PUT being answered to the first and the last
//! `{"messageType":"broadcast",...}` frame, and the spread in between;
//! whether every follower heard of it exactly once and the others not at
//! all; and the server's resident memory sampled through the fan-out, so a
//! spike would show.
//!
//! The user agents are opened by `idle`'s machinery: worker processes
//! (this binary re-executed) past one process's open-file limit, source
//! addresses 127.0.0.x past one address's ephemeral ports. Each worker
//! timestamps every broadcast frame on arrival with CLOCK_MONOTONIC, which
//! the parent's timestamps of the PUT share, and reports the arrivals when
//! released.

use crate::idle::{self, WorkerEvent, WorkerSpec};
use crate::net;
use crate::proto::{self, Target, Ws};
use crate::results::{self, Common, CpuMeter, MemoryPoint, RunResult, Servers};
use crate::sender::{self, HttpClient, PushNode};
use crate::stats::{self, LatencySummary};
use anyhow::{bail, Context, Result};
use bytes::Bytes;
use futures_util::StreamExt;
use http::{HeaderValue, Method, Request};
use http_body_util::{BodyExt, Full, Limited};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::Message;

#[derive(clap::Args, Clone, Debug)]
pub struct FanoutArgs {
    #[command(flatten)]
    pub common: Common,
    /// User agents that follow the broadcast.
    #[arg(long, default_value_t = 1000)]
    pub uas: usize,
    /// User agents that follow nothing (they must get no broadcast frame);
    /// default: a tenth of --uas, at least 1.
    #[arg(long)]
    pub non_followers: Option<usize>,
    /// Base URL of the broadcast API, http://host:port (loopback only);
    /// default: the first --url as http://.
    #[arg(long)]
    pub api_url: Option<String>,
    /// Bearer token of the broadcast API (one of Herald's
    /// broadcast_tokens); default: $HERALD_BROADCAST_TOKEN.
    #[arg(long)]
    pub token: Option<String>,
    /// The broadcast id followed and changed.
    #[arg(long, default_value = "loadtest/fanout")]
    pub id: String,
    /// Versions set one after another, each measured.
    #[arg(long, default_value_t = 3)]
    pub changes: usize,
    /// Seconds to wait for every follower to hear of one change.
    #[arg(long, default_value_t = 30.0)]
    pub change_timeout: f64,
    /// Seconds to keep listening once every follower has heard of a change
    /// (for duplicates and frames to non-followers) before the next.
    #[arg(long, default_value_t = 1.0)]
    pub settle: f64,
    /// Milliseconds between samples of the server's resident memory during
    /// each fan-out.
    #[arg(long, default_value_t = 10)]
    pub sample_ms: u64,
    /// Client processes (default: as many as the open-file limit requires).
    #[arg(long)]
    pub procs: Option<usize>,
    /// Source addresses 127.0.0.1..N (default: as many as the ephemeral port range requires).
    #[arg(long)]
    pub source_addrs: Option<usize>,
    /// Stop opening connections after this many failures in a row.
    #[arg(long, default_value_t = 200)]
    pub max_consecutive_failures: u64,
    /// Stop opening connections after this many seconds.
    #[arg(long, default_value_t = 900.0)]
    pub max_connect_secs: f64,
}

/// Who follows what, as handed to every worker.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Follow {
    pub id: String,
    /// The version followers say they know in `hello`: the current one.
    pub version: String,
    /// User agents in all (followers and not).
    pub total: usize,
    pub non_followers: usize,
}

impl Follow {
    /// Whether the user agent with global index `g` follows. The
    /// non-followers are spread evenly over the indices, hence over worker
    /// processes, nodes and source addresses.
    pub fn follows(&self, g: usize) -> bool {
        if self.non_followers == 0 || self.total == 0 {
            return true;
        }
        let (m, n, g) = (self.non_followers as u128, self.total as u128, g as u128);
        (g + 1) * m / n == g * m / n
    }
}

/// Broadcast frames a worker has seen so far.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(default)]
pub struct FanoutCounts {
    /// Version -> followers that received it (each counted once).
    pub received: BTreeMap<String, u64>,
    /// Version -> frames a follower received again.
    pub duplicates: BTreeMap<String, u64>,
    /// Version ("?" when the frame did not name the id) -> frames sent to
    /// user agents that follow nothing.
    pub stray: BTreeMap<String, u64>,
    /// Broadcast frames to followers that did not name the followed id.
    pub other: u64,
    /// Followers whose connection is open.
    pub followers_open: u64,
}

/// What a worker hands back when released: the counts, and when each
/// follower first received each version (CLOCK_MONOTONIC µs).
#[derive(Serialize, Deserialize, Clone, Debug, Default)]
#[serde(default)]
pub struct Arrivals {
    pub counts: FanoutCounts,
    pub at_us: BTreeMap<String, Vec<u64>>,
}

/// Shared by one worker's connections.
pub struct Recorder {
    id: String,
    inner: Mutex<Arrivals>,
}

#[derive(Deserialize)]
struct Frame<'a> {
    #[serde(rename = "messageType", borrow, default)]
    message_type: Option<Cow<'a, str>>,
    #[serde(default)]
    broadcasts: Option<Map<String, Value>>,
}

impl Recorder {
    pub fn new(id: &str) -> Recorder {
        Recorder {
            id: id.to_string(),
            inner: Mutex::new(Arrivals::default()),
        }
    }

    /// Books one text frame. `seen` is the connection's own list of the
    /// versions it has heard of, which tells a duplicate.
    pub fn on_text(&self, text: &str, follower: bool, seen: &mut Vec<Box<str>>) {
        let at = stats::mono_us();
        let Ok(frame) = serde_json::from_str::<Frame>(text) else {
            return;
        };
        if frame.message_type.as_deref() != Some("broadcast") {
            return;
        }
        let version = frame
            .broadcasts
            .as_ref()
            .and_then(|b| b.get(&self.id))
            .and_then(|v| v.as_str());
        let Ok(mut a) = self.inner.lock() else {
            return;
        };
        match (follower, version) {
            (false, v) => *a.counts.stray.entry(v.unwrap_or("?").into()).or_default() += 1,
            (true, None) => a.counts.other += 1,
            (true, Some(v)) if seen.iter().any(|s| &**s == v) => {
                *a.counts.duplicates.entry(v.into()).or_default() += 1
            }
            (true, Some(v)) => {
                seen.push(v.into());
                *a.counts.received.entry(v.into()).or_default() += 1;
                a.at_us.entry(v.into()).or_default().push(at);
            }
        }
    }

    fn followers_open(&self, delta: i64) {
        if let Ok(mut a) = self.inner.lock() {
            a.counts.followers_open = a.counts.followers_open.saturating_add_signed(delta);
        }
    }

    pub fn counts(&self) -> FanoutCounts {
        self.inner
            .lock()
            .map(|a| a.counts.clone())
            .unwrap_or_default()
    }

    pub fn arrivals(&self) -> Arrivals {
        self.inner.lock().map(|a| a.clone()).unwrap_or_default()
    }
}

/// Holds a connection as `fleet::hold` does, booking the broadcast frames
/// that arrive. Returns why the connection ended early, if it did.
pub async fn watch(
    ws: &mut Ws,
    follower: bool,
    rec: &Recorder,
    stop: &mut watch::Receiver<bool>,
) -> Option<String> {
    let mut seen: Vec<Box<str>> = Vec::new();
    if follower {
        rec.followers_open(1);
    }
    let ended = loop {
        if *stop.borrow_and_update() {
            break None;
        }
        tokio::select! {
            changed = stop.changed() => {
                if changed.is_err() {
                    break None;
                }
            }
            msg = ws.next() => match msg {
                None | Some(Ok(Message::Close(_))) => break Some("closed by server".into()),
                Some(Err(e)) => break Some(proto::ws_error_name(&e)),
                Some(Ok(Message::Text(t))) => rec.on_text(t.as_str(), follower, &mut seen),
                Some(Ok(_)) => {}
            }
        }
    };
    if follower {
        rec.followers_open(-1);
    }
    ended
}

/// Herald's broadcast API, on loopback.
struct Api {
    client: HttpClient,
    node: PushNode,
    token: HeaderValue,
    limit: Duration,
}

impl Api {
    /// One request; returns the status, the body and the CLOCK_MONOTONIC
    /// moment the response head arrived.
    async fn request(&self, method: Method, path: &str, body: &str) -> Result<(u16, String, u64)> {
        let uri: http::Uri = format!("http://{}{path}", self.node.addr).parse()?;
        let host = self.node.base.trim_start_matches("http://").to_string();
        let req = Request::builder()
            .method(method.clone())
            .uri(uri)
            .header(http::header::HOST, host)
            .header(http::header::AUTHORIZATION, self.token.clone())
            .header(http::header::CONTENT_TYPE, "text/plain")
            .body(Full::new(Bytes::from(body.to_string())))?;
        let exchange = async {
            let resp = self.client.request(req).await?;
            let answered = stats::mono_us();
            let status = resp.status().as_u16();
            let body = Limited::new(resp.into_body(), 64 * 1024)
                .collect()
                .await
                .map_err(|e| anyhow::anyhow!("reading the response: {e}"))?
                .to_bytes();
            Ok::<_, anyhow::Error>((
                status,
                String::from_utf8_lossy(&body).into_owned(),
                answered,
            ))
        };
        tokio::time::timeout(self.limit, exchange)
            .await
            .with_context(|| format!("{method} {path}: no answer within the step timeout"))?
            .with_context(|| format!("{method} {path}"))
    }
}

/// Ids the API takes in a path as they are: 1-128 of A-Z a-z 0-9 - _ . / :
fn valid_id(id: &str) -> bool {
    (1..=128).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./:".contains(&b))
        && !id.starts_with('/')
}

/// A Firefox-style version: a quoted millisecond timestamp, unique per run
/// and change.
fn version(base_ms: u64, k: usize) -> String {
    format!("\"{}\"", base_ms + k as u64)
}

/// Exact percentile of sorted values (nearest rank).
fn percentile(sorted: &[i64], q: f64) -> Option<i64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

fn median(v: &[f64]) -> Option<f64> {
    stats::median(v.iter().copied())
}

fn r2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// Samples the servers' summed RSS until `stop`; returns (peak, samples).
async fn sample_rss(
    server: Servers,
    every: Duration,
    mut stop: watch::Receiver<bool>,
) -> (Option<u64>, u64) {
    let mut peak = None;
    let mut n = 0;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        if let Some(rss) = server.rss_kib() {
            peak = Some(peak.map_or(rss, |p: u64| p.max(rss)));
            n += 1;
        }
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => break,
        }
    }
    if let Some(rss) = server.rss_kib() {
        peak = Some(peak.map_or(rss, |p: u64| p.max(rss)));
        n += 1;
    }
    (peak, n)
}

/// The parent's view of one worker.
#[derive(Default, Clone)]
struct WorkerState {
    established: u64,
    failed: u64,
    open: u64,
    followers: u64,
    launched: bool,
    finished: bool,
    counts: FanoutCounts,
    arrivals: Option<Arrivals>,
}

#[derive(Default)]
struct Parent {
    state: Vec<WorkerState>,
    failures: BTreeMap<String, u64>,
    drops: BTreeMap<String, u64>,
    errors: BTreeMap<String, u64>,
    subprotocols: BTreeMap<String, u64>,
    setup: Option<hdrhistogram::Histogram<u64>>,
    last_established_us: u64,
}

impl Parent {
    fn absorb(&mut self, w: usize, ev: WorkerEvent) {
        let s = &mut self.state[w];
        match ev {
            WorkerEvent::Progress {
                established,
                failed,
                open,
                fanout,
            } => {
                s.established = established;
                s.failed = failed;
                s.open = open;
                if let Some(c) = fanout {
                    s.counts = c;
                }
            }
            WorkerEvent::Launched {
                established,
                failed,
                open,
                last_established_us,
                failures,
                setup_latency,
                followers,
                subprotocols,
                ..
            } => {
                s.established = established;
                s.failed = failed;
                s.open = open;
                s.followers = followers;
                s.launched = true;
                stats::merge_tally(&mut self.failures, &failures);
                stats::merge_tally(&mut self.subprotocols, &subprotocols);
                let h = self.setup.get_or_insert_with(|| stats::from_pairs(&[]));
                stats::merge_pairs(h, &setup_latency);
                self.last_established_us = self.last_established_us.max(last_established_us);
            }
            WorkerEvent::Final {
                drop_reasons,
                fanout,
                ..
            } => {
                s.finished = true;
                s.open = 0;
                if let Some(a) = fanout {
                    s.counts = a.counts.clone();
                    s.arrivals = Some(a);
                }
                stats::merge_tally(&mut self.drops, &drop_reasons);
            }
            WorkerEvent::Error { message } => {
                eprintln!("worker {w}: {message}");
                *self.errors.entry(format!("worker: {message}")).or_insert(0) += 1;
                s.finished = true;
                s.open = 0;
            }
        }
    }

    fn sum(&self, f: impl Fn(&WorkerState) -> u64) -> u64 {
        self.state.iter().map(f).sum()
    }

    fn received(&self, version: &str) -> u64 {
        self.sum(|s| s.counts.received.get(version).copied().unwrap_or(0))
    }
}

/// What the parent knows of one change before the arrivals come in.
struct Change {
    version: String,
    put_status: Option<u16>,
    put_error: Option<String>,
    changed: Option<bool>,
    sent_us: u64,
    answered_us: u64,
    /// Followers whose connection was open when every arrival was in (or
    /// the wait ended).
    followers_open: u64,
    timed_out: bool,
    rss_before: Option<u64>,
    rss_peak: Option<u64>,
    rss_samples: u64,
    cpu_s: Option<f64>,
}

pub async fn run(args: FanoutArgs) -> Result<()> {
    let common = &args.common;
    if args.uas == 0 || args.changes == 0 {
        bail!("--uas and --changes must be at least 1");
    }
    if !valid_id(&args.id) {
        bail!(
            "--id {:?}: ids are 1-128 characters of A-Z a-z 0-9 - _ . / : (not starting with /)",
            args.id
        );
    }
    let non = args.non_followers.unwrap_or((args.uas / 10).max(1));
    let total = args.uas + non;
    // Refuse URLs off loopback before anything is sent.
    Target::all(&common.urls).await?;
    let api_base = match &args.api_url {
        Some(u) => u.clone(),
        None => results::ws_to_http(&common.urls[0])?,
    };
    let node = sender::push_node(&api_base)
        .await
        .with_context(|| format!("--api-url {api_base}"))?;
    let token = match args
        .token
        .clone()
        .or_else(|| std::env::var("HERALD_BROADCAST_TOKEN").ok())
    {
        Some(t) if !t.trim().is_empty() => t,
        _ => bail!("the broadcast API needs a token: --token or $HERALD_BROADCAST_TOKEN (one of Herald's broadcast_tokens)"),
    };
    let api = Api {
        client: sender::client(1),
        node,
        token: HeaderValue::from_str(&format!("Bearer {}", token.trim()))
            .context("the token is not a valid header value")?,
        limit: common.limit(),
    };
    let put_path = format!("/v1/broadcasts/{}", args.id);
    let (status, body, _) = api.request(Method::GET, "/v1/broadcasts", "").await?;
    match status {
        200 => {}
        404 => bail!(
            "{api_base} has no broadcast API (GET /v1/broadcasts answered 404): start Herald with HERALD_BROADCAST_TOKENS set"
        ),
        401 | 403 => bail!("{api_base} refused the token ({status}): {body}"),
        s => bail!("GET {api_base}/v1/broadcasts answered {s}: {body}"),
    }
    // The version followers know: set now, so `hello` tells them nothing.
    let base_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let v0 = version(base_ms, 0);
    let (status, body, _) = api.request(Method::PUT, &put_path, &v0).await?;
    if status != 200 {
        bail!("PUT {api_base}{put_path} answered {status}: {body}");
    }

    let nofile = net::raise_nofile_limit();
    let per_proc = nofile.soft.saturating_sub(100).max(1) as usize;
    let procs = args
        .procs
        .unwrap_or(total.div_ceil(per_proc))
        .clamp(1, 1000);
    let ports = net::ephemeral_port_count();
    let srcs = args
        .source_addrs
        .unwrap_or(total.div_ceil(ports * 9 / 10))
        .clamp(1, 250);
    if procs * per_proc < total {
        eprintln!("warning: {procs} processes x {per_proc} files cannot hold {total} connections; raise --procs");
    }
    let server = common.servers();
    if let Some(pid) = server.unreadable() {
        bail!("cannot read /proc/{pid}/status: is --server-pid right?");
    }
    let rss_start = server.rss_kib();
    let mut result = RunResult::new(
        "fanout",
        common,
        serde_json::json!({
            "uas": args.uas, "non_followers": non, "id": args.id, "changes": args.changes,
            "change_timeout_s": args.change_timeout, "settle_s": args.settle,
            "sample_ms": args.sample_ms, "procs": procs, "source_addrs": srcs,
            "channels": common.channels, "concurrency": common.concurrency,
            "api_url": api_base, "timeout_s": common.timeout,
        }),
    );
    eprintln!(
        "fanout: {} followers of {:?} and {non} user agents following nothing, over {procs} process(es), {srcs} source address(es)",
        args.uas, args.id
    );

    let (tx, mut rx) = mpsc::unbounded_channel::<(usize, WorkerEvent)>();
    let per_change = args.change_timeout + args.settle + common.timeout * 2.0 + 1.0;
    let max_life = args.max_connect_secs
        + per_change * args.changes as f64
        + args.settle
        + common.timeout * 3.0
        + 120.0;
    let follow = Follow {
        id: args.id.clone(),
        version: v0.clone(),
        total,
        non_followers: non,
    };
    let template = WorkerSpec {
        urls: common.urls.clone(),
        count: 0,
        first_index: 0,
        source_addrs: srcs,
        concurrency: common.concurrency.div_ceil(procs).max(1),
        rate: 0.0,
        channels: common.channels,
        timeout: common.timeout,
        max_consecutive_failures: args.max_consecutive_failures,
        max_connect_secs: args.max_connect_secs,
        max_life_secs: max_life,
        follow: Some(follow.clone()),
        progress_ms: 20,
    };
    let mut workers = idle::spawn_workers(procs, total, &template, &tx).await?;
    drop(tx);

    let started = Instant::now();
    let mut p = Parent {
        state: vec![WorkerState::default(); procs],
        ..Default::default()
    };
    let mut memory = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let mut last_print = Instant::now();
    let launch_deadline = started + stats::secs(max_life);
    // Phase 1: connect everyone.
    while !p.state.iter().all(|s| s.launched || s.finished) && Instant::now() < launch_deadline {
        tokio::select! {
            ev = rx.recv() => match ev {
                Some((w, ev)) => p.absorb(w, ev),
                None => break,
            },
            _ = tick.tick() => {
                let open = p.sum(|s| s.open);
                if let Some(rss) = server.rss_kib() {
                    memory.push(MemoryPoint { connections: open, rss_kib: rss });
                }
                if last_print.elapsed() >= Duration::from_secs(2) {
                    eprintln!("  open {open}, established {}, failed {}", p.sum(|s| s.established), p.sum(|s| s.failed));
                    last_print = Instant::now();
                }
            }
        }
    }
    let connect_secs = started.elapsed().as_secs_f64();
    let established = p.sum(|s| s.established);
    let followers = p.sum(|s| s.followers);
    let non_connected = established - followers;

    // Let the server settle before measuring.
    absorb_for(&mut p, &mut rx, Duration::from_millis(500)).await;
    let rss_connected = server.rss_kib();
    let open_connected = p.sum(|s| s.open);
    if followers == 0 {
        eprintln!("fanout: no follower connected; nothing to measure");
    }

    // Phase 2: the changes.
    let cpu = CpuMeter::start(&server);
    let mut changes: Vec<Change> = Vec::new();
    let every = Duration::from_millis(args.sample_ms.max(1));
    for k in 1..=args.changes {
        if followers == 0 {
            break;
        }
        let v = version(base_ms, k);
        let cpu0 = cpu.server_secs();
        let rss_before = server.rss_kib();
        let (stop_tx, stop_rx) = watch::channel(false);
        let sampler = tokio::spawn(sample_rss(server.clone(), every, stop_rx));
        let sent_us = stats::mono_us();
        let put = api.request(Method::PUT, &put_path, &v).await;
        let mut c = Change {
            version: v.clone(),
            put_status: None,
            put_error: None,
            changed: None,
            sent_us,
            answered_us: stats::mono_us(),
            followers_open: 0,
            timed_out: false,
            rss_before,
            rss_peak: None,
            rss_samples: 0,
            cpu_s: None,
        };
        match put {
            Ok((status, body, answered)) => {
                c.put_status = Some(status);
                c.answered_us = answered;
                c.changed = serde_json::from_str::<Value>(&body)
                    .ok()
                    .and_then(|b| b["changed"].as_bool());
                if status != 200 {
                    c.put_error = Some(format!("status {status}: {body}"));
                }
            }
            Err(e) => c.put_error = Some(format!("{e:#}")),
        }
        // Wait until every open follower has heard of it.
        let deadline = Instant::now() + stats::secs(args.change_timeout);
        if c.put_error.is_none() {
            loop {
                let open = p.sum(|s| s.counts.followers_open);
                if p.received(&v) >= open {
                    break;
                }
                if Instant::now() >= deadline {
                    c.timed_out = true;
                    break;
                }
                tokio::select! {
                    ev = rx.recv() => match ev {
                        Some((w, ev)) => p.absorb(w, ev),
                        None => break,
                    },
                    _ = tokio::time::sleep(Duration::from_millis(5)) => {}
                }
            }
        }
        c.followers_open = p.sum(|s| s.counts.followers_open);
        absorb_for(&mut p, &mut rx, stats::secs(args.settle)).await;
        let _ = stop_tx.send(true);
        let (peak, n) = sampler.await.unwrap_or((None, 0));
        c.rss_peak = peak;
        c.rss_samples = n;
        c.cpu_s = cpu.server_secs().zip(cpu0).map(|(a, b)| a - b);
        eprintln!(
            "  change {k}/{}: {}/{} followers heard of {v}{}",
            args.changes,
            p.received(&v),
            c.followers_open,
            match (&c.put_error, c.timed_out) {
                (Some(e), _) => format!(" (PUT failed: {e})"),
                (None, true) => " (gave up waiting)".into(),
                _ => String::new(),
            }
        );
        changes.push(c);
    }
    let server_cpu = cpu.record(&mut result);
    let rss_after = server.rss_kib();

    // Phase 3: release the workers and collect every arrival.
    for w in workers.iter_mut() {
        w.release().await;
    }
    let final_deadline = Instant::now() + Duration::from_secs(30);
    while !p.state.iter().all(|s| s.finished) && Instant::now() < final_deadline {
        match tokio::time::timeout_at(final_deadline.into(), rx.recv()).await {
            Ok(Some((w, ev))) => p.absorb(w, ev),
            _ => break,
        }
    }
    idle::reap_workers(workers, &mut p.errors).await;

    // Findings, per change and overall.
    let mut counts = FanoutCounts::default();
    let mut at: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for s in &p.state {
        let c = match &s.arrivals {
            Some(a) => {
                for (v, t) in &a.at_us {
                    at.entry(v.clone()).or_default().extend(t);
                }
                &a.counts
            }
            None => &s.counts,
        };
        stats::merge_tally(&mut counts.received, &c.received);
        stats::merge_tally(&mut counts.duplicates, &c.duplicates);
        stats::merge_tally(&mut counts.stray, &c.stray);
        counts.other += c.other;
    }
    let get = |m: &BTreeMap<String, u64>, v: &str| m.get(v).copied().unwrap_or(0);
    let mut arrival_hist = stats::from_pairs(&[]);
    let put_hist = crate::stats::Hist::new();
    let (mut firsts, mut lasts, mut puts) = (Vec::new(), Vec::new(), Vec::new());
    let (mut missing_total, mut dup_total, mut received_total) = (0u64, 0u64, 0u64);
    let mut before_answer = 0u64;
    // Every arrival of every change, µs after its PUT's answer.
    let mut pooled: Vec<i64> = Vec::new();
    let mut complete = 0u64;
    let mut peak_growth: Option<i64> = None;
    let mut peak_rss: Option<u64> = None;
    for (i, c) in changes.iter().enumerate() {
        let mut row = Map::new();
        row.insert("change".into(), (i + 1).into());
        row.insert("version".into(), c.version.clone().into());
        if let Some(s) = c.put_status {
            row.insert("put_status".into(), s.into());
        }
        if let Some(e) = &c.put_error {
            *p.errors.entry(format!("PUT failed: {e}")).or_insert(0) += 1;
            result.rows.push(row);
            continue;
        }
        let put_ms = c.answered_us.saturating_sub(c.sent_us) as f64 / 1000.0;
        put_hist.record(i, c.answered_us.saturating_sub(c.sent_us));
        puts.push(put_ms);
        row.insert("put_ms".into(), r2(put_ms).into());
        if c.changed == Some(false) {
            *p.errors
                .entry("PUT answered changed: false".into())
                .or_insert(0) += 1;
        }
        let received = get(&counts.received, &c.version);
        let dups = get(&counts.duplicates, &c.version);
        let stray = get(&counts.stray, &c.version);
        let missing = c.followers_open.saturating_sub(received);
        received_total += received;
        missing_total += missing;
        dup_total += dups;
        if missing == 0 && dups == 0 && stray == 0 {
            complete += 1;
        }
        row.insert("followers".into(), c.followers_open.into());
        row.insert("received".into(), received.into());
        row.insert("missing".into(), missing.into());
        row.insert("duplicates".into(), dups.into());
        row.insert("non_follower_frames".into(), stray.into());
        let mut deltas: Vec<i64> = at
            .get(&c.version)
            .map(|t| t.iter().map(|&a| a as i64 - c.answered_us as i64).collect())
            .unwrap_or_default();
        deltas.sort_unstable();
        let put_us = c.answered_us as i64 - c.sent_us as i64;
        for &d in &deltas {
            if d < 0 {
                before_answer += 1;
            }
            // The CDF counts from the PUT being sent, which every frame follows.
            arrival_hist.saturating_record((d + put_us).max(1) as u64);
        }
        pooled.extend_from_slice(&deltas);
        let ms = |x: Option<i64>| x.map(|us| us as f64 / 1000.0);
        if let Some(f) = ms(deltas.first().copied()) {
            firsts.push(f);
            row.insert("first_ms".into(), r2(f).into());
        }
        if let Some(l) = ms(deltas.last().copied()) {
            lasts.push(l);
            row.insert("last_ms".into(), r2(l).into());
        }
        if let Some(x) = ms(percentile(&deltas, 0.5)) {
            row.insert("p50_ms".into(), r2(x).into());
        }
        if let Some(x) = ms(percentile(&deltas, 0.99)) {
            row.insert("p99_ms".into(), r2(x).into());
        }
        if let Some(b) = c.rss_before {
            row.insert("rss_before_kib".into(), b.into());
        }
        if let Some(pk) = c.rss_peak {
            row.insert("rss_peak_kib".into(), pk.into());
            peak_rss = Some(peak_rss.map_or(pk, |x| x.max(pk)));
            if let Some(b) = c.rss_before {
                let g = pk as i64 - b as i64;
                row.insert("rss_peak_growth_kib".into(), g.into());
                peak_growth = Some(peak_growth.map_or(g, |x| x.max(g)));
            }
            row.insert("rss_samples".into(), c.rss_samples.into());
        }
        if let Some(cpu_s) = c.cpu_s.filter(|_| received > 0) {
            row.insert(
                "server_cpu_us_per_frame".into(),
                r2(cpu_s * 1e6 / received as f64).into(),
            );
        }
        if c.timed_out {
            row.insert("timed_out".into(), true.into());
        }
        result.rows.push(row);
    }
    let stray_total: u64 = counts.stray.values().sum();
    // Frames for versions this run never set (other than its own changes).
    let ours: Vec<&str> = changes.iter().map(|c| c.version.as_str()).collect();
    let foreign: u64 = counts
        .received
        .iter()
        .filter(|(v, _)| !ours.contains(&v.as_str()))
        .map(|(_, n)| n)
        .sum();

    // Errors.
    result.errors = std::mem::take(&mut p.errors);
    stats::merge_tally(&mut result.errors, &p.failures);
    for (k, v) in &p.drops {
        result.errors.insert(format!("dropped while held: {k}"), *v);
    }
    for (name, n) in [
        ("follower missed a change", missing_total),
        ("follower heard of a change more than once", dup_total),
        (
            "broadcast frame to a user agent following nothing",
            stray_total,
        ),
        ("broadcast frame without the followed id", counts.other),
        (
            "broadcast frame for a version this run did not set",
            foreign,
        ),
        (
            "gave up waiting for followers (--change-timeout)",
            changes.iter().filter(|c| c.timed_out).count() as u64,
        ),
    ] {
        if n > 0 {
            result.errors.insert(name.into(), n);
        }
    }

    // Metrics.
    let failed = p.sum(|s| s.failed);
    result.metric("requested", total as u64);
    result.metric("followers_connected", followers);
    result.metric("non_followers_connected", non_connected);
    result.metric("failed", failed);
    result.metric("connect_phase_s", r2(connect_secs));
    result.metric("procs", procs as u64);
    result.metric("source_addrs", srcs as u64);
    result.metric("changes", changes.len() as u64);
    result.metric("changes_complete", complete);
    result.metric("frames_received", received_total);
    result.metric("missing", missing_total);
    result.metric("duplicates", dup_total);
    result.metric("non_follower_frames", stray_total);
    result.metric("frames_before_put_answer", before_answer);
    let mut put_f = |name: &str, v: Option<f64>| {
        if let Some(v) = v {
            result.metric(name, r2(v));
        }
    };
    put_f("first_frame_ms_median", median(&firsts));
    put_f("last_frame_ms_median", median(&lasts));
    put_f("last_frame_ms_max", lasts.iter().copied().reduce(f64::max));
    put_f("put_ms_median", median(&puts));
    let arrival = LatencySummary::from_hist(&arrival_hist);
    pooled.sort_unstable();
    let pooled_ms = |q: f64| percentile(&pooled, q).map(|us| us as f64 / 1000.0);
    put_f("arrival_p50_ms", pooled_ms(0.5));
    put_f("arrival_p99_ms", pooled_ms(0.99));
    if let Some(r) = rss_start {
        result.metric("server_rss_start_kib", r);
    }
    if let (Some(a), Some(b)) = (rss_connected, rss_start) {
        if open_connected > 0 {
            result.metric(
                "server_kib_per_connection",
                r2((a as f64 - b as f64) / open_connected as f64),
            );
        }
    }
    if let Some(b) = changes.first().and_then(|c| c.rss_before) {
        result.metric("server_rss_before_kib", b);
    }
    if let Some(pk) = peak_rss {
        result.metric("server_rss_peak_kib", pk);
    }
    if let Some(g) = peak_growth {
        result.metric("server_rss_peak_growth_kib", g);
    }
    if let Some(a) = rss_after {
        result.metric("server_rss_after_kib", a);
    }
    // One broadcast frame delivered is this scenario's delivered message.
    let cpu_us = result.cpu_per(
        "server_cpu_us_per_broadcast_frame",
        server_cpu,
        received_total,
    );
    result.cpu_per("server_cpu_us_per_delivered", server_cpu, received_total);
    result
        .latency
        .insert("fanout_arrival".into(), arrival.clone());
    result
        .latency
        .insert("put".into(), LatencySummary::from_hist(&put_hist.merged()));
    if let Some(h) = &p.setup {
        result
            .latency
            .insert("setup".into(), LatencySummary::from_hist(h));
    }
    result.set_subprotocols(std::mem::take(&mut p.subprotocols));
    result.memory = memory;
    if before_answer > 0 {
        result.notes.push(format!(
            "{before_answer} of {received_total} broadcast frames arrived before the PUT's answer (the server tells followers while it answers): their times after the answer are negative"
        ));
    }
    result.notes.push(
        "the fanout_arrival latency counts from the PUT being sent; first/last/p50/p99 in the metrics and per change count from its answer".into(),
    );
    result.notes.push(
        "arrival times are taken by the generator, which shares the machine's cores with the server: they include its own scheduling delay".into(),
    );
    result.elapsed_s = r2(started.elapsed().as_secs_f64());

    let expected: u64 = changes
        .iter()
        .filter(|c| c.put_error.is_none())
        .map(|c| c.followers_open)
        .sum();
    let delivery = if missing_total == 0 && dup_total == 0 && expected > 0 {
        format!("each to every follower exactly once ({received_total} frames)")
    } else {
        format!(
            "{received_total}/{expected} frames ({missing_total} missing, {dup_total} duplicates)"
        )
    };
    // (+ 0.0 turns a rounded -0.0 into 0.0.)
    let f = |x: Option<f64>| {
        x.map_or("–".to_string(), |v| {
            format!("{:.1} ms", (v * 10.0).round() / 10.0 + 0.0)
        })
    };
    let rss = match (
        changes.first().and_then(|c| c.rss_before),
        peak_rss,
        peak_growth,
    ) {
        (Some(b), Some(pk), Some(g)) => {
            format!("server RSS {b} KiB before, peak {pk} KiB ({g:+} KiB)")
        }
        _ => "server memory not measured (no --server-pid)".into(),
    };
    result.summary = format!(
        "fanout[{}]: {followers}/{} followers + {non_connected}/{non} non-followers connected ({failed} failed); {} changes, {delivery}, {stray_total} frames to non-followers; PUT answered in {}; after its answer: first frame {}, last {} (median of changes; worst {}), arrival p50 {}, p99 {}; {rss}; {}",
        common.target,
        args.uas,
        changes.len(),
        f(median(&puts)),
        f(median(&firsts)),
        f(median(&lasts)),
        f(lasts.iter().copied().reduce(f64::max)),
        f(pooled_ms(0.5)),
        f(pooled_ms(0.99)),
        results::cpu_text(cpu_us, "broadcast frame"),
    );
    result.finish(common.out.as_deref())?;
    Ok(())
}

/// Takes in worker events for `d`.
async fn absorb_for(
    p: &mut Parent,
    rx: &mut mpsc::UnboundedReceiver<(usize, WorkerEvent)>,
    d: Duration,
) {
    let until = Instant::now() + d;
    while let Ok(Some((w, ev))) = tokio::time::timeout_at(until.into(), rx.recv()).await {
        p.absorb(w, ev);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_followers_are_spread_evenly() {
        let f = Follow {
            id: "x".into(),
            version: "1".into(),
            total: 110,
            non_followers: 10,
        };
        let non: Vec<usize> = (0..110).filter(|&g| !f.follows(g)).collect();
        assert_eq!(non.len(), 10);
        assert!(non.windows(2).all(|w| w[1] - w[0] == 11), "{non:?}");
        let all = Follow {
            non_followers: 0,
            ..f.clone()
        };
        assert!((0..110).all(|g| all.follows(g)));
        let none = Follow {
            non_followers: 110,
            ..f
        };
        assert!((0..110).all(|g| !none.follows(g)));
    }

    #[test]
    fn recorder_books_firsts_duplicates_and_strays() {
        let r = Recorder::new("a/b");
        let frame = |v: &str| {
            serde_json::json!({"messageType": "broadcast", "broadcasts": {"a/b": v, "other": "x"}})
                .to_string()
        };
        let (mut s1, mut s2, mut s3) = (Vec::new(), Vec::new(), Vec::new());
        r.on_text(&frame("\"1\""), true, &mut s1);
        r.on_text(&frame("\"1\""), true, &mut s2);
        r.on_text(&frame("\"1\""), true, &mut s1); // again on the same connection
        r.on_text(&frame("\"2\""), true, &mut s1);
        r.on_text(&frame("\"1\""), false, &mut s3); // follows nothing
        r.on_text(
            r#"{"messageType":"broadcast","broadcasts":{"errors":{"a/b":"Broadcast not found"}}}"#,
            true,
            &mut s2,
        );
        r.on_text(
            r#"{"messageType":"broadcast","broadcasts":{}}"#,
            false,
            &mut s3,
        );
        r.on_text("{}", true, &mut s1);
        r.on_text("not json", true, &mut s1);
        r.on_text(r#"{"messageType":"notification"}"#, true, &mut s1);
        let a = r.arrivals();
        assert_eq!(a.counts.received["\"1\""], 2);
        assert_eq!(a.counts.received["\"2\""], 1);
        assert_eq!(a.counts.duplicates["\"1\""], 1);
        assert_eq!(a.counts.stray["\"1\""], 1);
        assert_eq!(a.counts.stray["?"], 1);
        assert_eq!(a.counts.other, 1);
        assert_eq!(a.at_us["\"1\""].len(), 2);
        assert!(a.at_us["\"1\""].iter().all(|&t| t > 0));
        // Counts travel as JSON lines between processes.
        let back: Arrivals = serde_json::from_str(&serde_json::to_string(&a).unwrap()).unwrap();
        assert_eq!(back.counts, a.counts);
    }

    #[test]
    fn ids_versions_and_percentiles() {
        assert!(valid_id("loadtest/fanout"));
        assert!(valid_id("remote-settings/monitor_changes"));
        assert!(!valid_id(""));
        assert!(!valid_id("/x"));
        assert!(!valid_id("a b"));
        assert!(!valid_id("a%2Fb"));
        assert!(!valid_id(&"x".repeat(129)));
        assert_eq!(version(1700000000000, 2), "\"1700000000002\"");
        let v: Vec<i64> = (1..=100).collect();
        assert_eq!(percentile(&v, 0.5), Some(50));
        assert_eq!(percentile(&v, 0.99), Some(99));
        assert_eq!(percentile(&v, 1.0), Some(100));
        assert_eq!(percentile(&[-5], 0.5), Some(-5));
        assert_eq!(percentile(&[], 0.5), None);
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0]), Some(2.5));
        assert_eq!(median(&[]), None);
    }
}
