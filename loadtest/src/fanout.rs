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
//! The user agents are opened by the worker fleet (`workers`): processes
//! (this binary re-executed) past one process's open-file limit, source
//! addresses 127.0.0.x past one address's ephemeral ports. Each worker
//! timestamps every broadcast frame on arrival with CLOCK_MONOTONIC, which
//! the parent's timestamps of the PUT share, and reports the arrivals when
//! released.

use crate::follow::{FanoutCounts, Follow};
use crate::harness::Run;
use crate::results::{self, r2, Common, CpuMeter, RunResult, Servers};
use crate::sender::{self, HttpClient, PushNode};
use crate::stats::{self, LatencySummary};
use crate::workers::{Sizing, WorkerSpec, Workers};
use anyhow::{bail, Context, Result};
use bytes::Bytes;
use http::{HeaderValue, Method, Request};
use http_body_util::{BodyExt, Full, Limited};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use tokio::sync::watch;

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

/// Herald's broadcast API, on loopback.
struct Api {
    client: HttpClient,
    node: PushNode,
    token: HeaderValue,
    limit: Duration,
    /// http://host:port, as given to --api-url or derived.
    base: String,
    /// Where the followed broadcast's version is set.
    put_path: String,
    /// Versions are this millisecond timestamp plus the change's number.
    base_ms: u64,
}

impl Api {
    /// Finds the API, checks that it takes the token, and sets the version
    /// followers will know (change 0) so that `hello` tells them nothing.
    async fn open(args: &FanoutArgs) -> Result<Api> {
        let common = &args.common;
        let base = match &args.api_url {
            Some(u) => u.clone(),
            None => results::ws_to_http(&common.urls[0])?,
        };
        let node = sender::push_node(&base)
            .await
            .with_context(|| format!("--api-url {base}"))?;
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
            put_path: format!("/v1/broadcasts/{}", args.id),
            base_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            base,
        };
        let base = &api.base;
        let (status, body, _) = api.request(Method::GET, "/v1/broadcasts", "").await?;
        match status {
            200 => {}
            404 => bail!(
                "{base} has no broadcast API (GET /v1/broadcasts answered 404): start Herald with HERALD_BROADCAST_TOKENS set"
            ),
            401 | 403 => bail!("{base} refused the token ({status}): {body}"),
            s => bail!("GET {base}/v1/broadcasts answered {s}: {body}"),
        }
        let put_path = &api.put_path;
        let (status, body, _) = api
            .request(Method::PUT, put_path, &version(api.base_ms, 0))
            .await?;
        if status != 200 {
            bail!("PUT {base}{put_path} answered {status}: {body}");
        }
        Ok(api)
    }

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

/// Followers' frames for `version` so far, as the workers last reported.
fn received(w: &Workers, version: &str) -> u64 {
    w.sum(|s| s.counts.received.get(version).copied().unwrap_or(0))
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
    let non = non_followers(&args);
    let total = args.uas + non;
    // Refuses URLs off loopback before anything is sent; the parameters
    // are known once the fleet is sized, below.
    let mut run = Run::start_without_senders("fanout", common, Value::Null).await?;
    let api = Api::open(&args).await?;
    let sizing = Sizing::new(total, args.procs, args.source_addrs, run.nofile);
    run.require_readable_servers()?;
    let rss_start = run.server.rss_kib();
    run.result.params = serde_json::json!({
        "uas": args.uas, "non_followers": non, "id": args.id, "changes": args.changes,
        "change_timeout_s": args.change_timeout, "settle_s": args.settle,
        "sample_ms": args.sample_ms, "procs": sizing.procs, "source_addrs": sizing.srcs,
        "channels": common.channels, "concurrency": common.concurrency,
        "api_url": api.base, "timeout_s": common.timeout,
    });
    eprintln!(
        "fanout: {} followers of {:?} and {non} user agents following nothing, over {} process(es), {} source address(es)",
        args.uas, args.id, sizing.procs, sizing.srcs
    );
    let follow = Follow {
        id: args.id.clone(),
        version: version(api.base_ms, 0),
        total,
        non_followers: non,
    };
    let (mut workers, max_life) = spawn(&args, &sizing, follow).await?;
    let connected = connect(&mut workers, &run.server, max_life, rss_start).await;
    let cpu = CpuMeter::start(&run.server);
    let changes = change_all(&args, &api, &mut workers, &run.server, &cpu, &connected).await;
    let server_cpu = cpu.record(&mut run.result);
    let rss_after = run.server.rss_kib();
    // Every arrival comes in with the workers' final reports.
    workers.release().await;
    let found = Findings::of(&workers, &changes, &mut run.result.rows);
    let phase = Measured {
        connected,
        changes,
        server_cpu,
        rss_after,
    };
    let summary = record(&args, &mut run, workers, &phase, &found, &sizing);
    run.finish(summary)
}

/// The worker fleet: everyone follows the broadcast at `follow.version`
/// but the non-followers. Returns it with the longest a worker may live.
async fn spawn(args: &FanoutArgs, sizing: &Sizing, follow: Follow) -> Result<(Workers, f64)> {
    let common = &args.common;
    let per_change = args.change_timeout + args.settle + common.timeout * 2.0 + 1.0;
    let max_life = args.max_connect_secs
        + per_change * args.changes as f64
        + args.settle
        + common.timeout * 3.0
        + 120.0;
    let total = follow.total;
    let template = WorkerSpec {
        urls: common.urls.clone(),
        count: 0,
        first_index: 0,
        source_addrs: sizing.srcs,
        concurrency: common.concurrency.div_ceil(sizing.procs).max(1),
        rate: 0.0,
        channels: common.channels,
        timeout: common.timeout,
        max_consecutive_failures: args.max_consecutive_failures,
        max_connect_secs: args.max_connect_secs,
        max_life_secs: max_life,
        follow: Some(follow),
        progress_ms: 20,
    };
    let workers = Workers::spawn(sizing.procs, total, &template).await?;
    Ok((workers, max_life))
}

/// The fleet once connected.
struct Connected {
    secs: f64,
    followers: u64,
    non_followers: u64,
    rss_start: Option<u64>,
    rss: Option<u64>,
    open: u64,
}

/// Phase 1: connect everyone, then let the server settle before measuring.
async fn connect(
    workers: &mut Workers,
    server: &Servers,
    max_life: f64,
    rss_start: Option<u64>,
) -> Connected {
    let started = Instant::now();
    workers
        .until_launched(server, started + stats::secs(max_life))
        .await;
    let secs = started.elapsed().as_secs_f64();
    let established = workers.sum(|s| s.established);
    let followers = workers.sum(|s| s.followers);
    workers.absorb_for(Duration::from_millis(500)).await;
    if followers == 0 {
        eprintln!("fanout: no follower connected; nothing to measure");
    }
    Connected {
        secs,
        followers,
        non_followers: established - followers,
        rss_start,
        rss: server.rss_kib(),
        open: workers.sum(|s| s.open),
    }
}

/// Phase 2: the changes, one after another, each measured.
async fn change_all(
    args: &FanoutArgs,
    api: &Api,
    workers: &mut Workers,
    server: &Servers,
    cpu: &CpuMeter,
    connected: &Connected,
) -> Vec<Change> {
    let mut changes: Vec<Change> = Vec::new();
    if connected.followers == 0 {
        return changes;
    }
    for k in 1..=args.changes {
        let c = change_one(args, api, workers, server, cpu, k).await;
        eprintln!(
            "  change {k}/{}: {}/{} followers heard of {}{}",
            args.changes,
            received(workers, &c.version),
            c.followers_open,
            c.version,
            match (&c.put_error, c.timed_out) {
                (Some(e), _) => format!(" (PUT failed: {e})"),
                (None, true) => " (gave up waiting)".into(),
                _ => String::new(),
            }
        );
        changes.push(c);
    }
    changes
}

/// One change: PUT the next version, wait until every open follower has
/// heard of it (or --change-timeout), listen for --settle more, with the
/// server's memory sampled throughout.
async fn change_one(
    args: &FanoutArgs,
    api: &Api,
    workers: &mut Workers,
    server: &Servers,
    cpu: &CpuMeter,
    k: usize,
) -> Change {
    let v = version(api.base_ms, k);
    let cpu0 = cpu.server_secs();
    let rss_before = server.rss_kib();
    let (stop_tx, stop_rx) = watch::channel(false);
    let every = Duration::from_millis(args.sample_ms.max(1));
    let sampler = tokio::spawn(sample_rss(server.clone(), every, stop_rx));
    let sent_us = stats::mono_us();
    let put = api.request(Method::PUT, &api.put_path, &v).await;
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
    let deadline = Instant::now() + stats::secs(args.change_timeout);
    if c.put_error.is_none() {
        loop {
            let open = workers.sum(|s| s.counts.followers_open);
            if received(workers, &v) >= open {
                break;
            }
            if Instant::now() >= deadline {
                c.timed_out = true;
                break;
            }
            if !workers.next_event(Duration::from_millis(5)).await {
                break;
            }
        }
    }
    c.followers_open = workers.sum(|s| s.counts.followers_open);
    workers.absorb_for(stats::secs(args.settle)).await;
    let _ = stop_tx.send(true);
    let (peak, n) = sampler.await.unwrap_or((None, 0));
    c.rss_peak = peak;
    c.rss_samples = n;
    c.cpu_s = cpu.server_secs().zip(cpu0).map(|(a, b)| a - b);
    c
}

/// What the arrivals say, over all changes.
#[derive(Default)]
struct Findings {
    counts: FanoutCounts,
    /// From the PUT being sent, every arrival of every change.
    arrival_hist: Option<hdrhistogram::Histogram<u64>>,
    put_hist: Option<hdrhistogram::Histogram<u64>>,
    firsts: Vec<f64>,
    lasts: Vec<f64>,
    puts: Vec<f64>,
    missing: u64,
    dups: u64,
    received: u64,
    before_answer: u64,
    /// Every arrival of every change, µs after its PUT's answer, sorted.
    pooled: Vec<i64>,
    complete: u64,
    peak_growth: Option<i64>,
    peak_rss: Option<u64>,
    /// Frames for versions this run never set.
    foreign: u64,
    stray: u64,
    /// PUTs that failed, or answered `changed: false`.
    put_errors: BTreeMap<String, u64>,
}

impl Findings {
    /// Merges every worker's arrivals and books each change, one row per
    /// change into `rows`.
    fn of(workers: &Workers, changes: &[Change], rows: &mut Vec<Map<String, Value>>) -> Findings {
        let mut f = Findings::default();
        let mut at: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        for s in &workers.state {
            let c = match &s.arrivals {
                Some(a) => {
                    for (v, t) in &a.at_us {
                        at.entry(v.clone()).or_default().extend(t);
                    }
                    &a.counts
                }
                None => &s.counts,
            };
            stats::merge_tally(&mut f.counts.received, &c.received);
            stats::merge_tally(&mut f.counts.duplicates, &c.duplicates);
            stats::merge_tally(&mut f.counts.stray, &c.stray);
            f.counts.other += c.other;
        }
        let mut arrival_hist = stats::from_pairs(&[]);
        let put_hist = stats::Hist::new();
        for (i, c) in changes.iter().enumerate() {
            rows.push(f.book(i, c, &at, &mut arrival_hist, &put_hist));
        }
        f.pooled.sort_unstable();
        f.arrival_hist = Some(arrival_hist);
        f.put_hist = Some(put_hist.merged());
        f.stray = f.counts.stray.values().sum();
        let ours: Vec<&str> = changes.iter().map(|c| c.version.as_str()).collect();
        f.foreign = f
            .counts
            .received
            .iter()
            .filter(|(v, _)| !ours.contains(&v.as_str()))
            .map(|(_, n)| n)
            .sum();
        f
    }

    /// Books change `i`; returns its row.
    fn book(
        &mut self,
        i: usize,
        c: &Change,
        at: &BTreeMap<String, Vec<u64>>,
        arrival_hist: &mut hdrhistogram::Histogram<u64>,
        put_hist: &stats::Hist,
    ) -> Map<String, Value> {
        let get = |m: &BTreeMap<String, u64>, v: &str| m.get(v).copied().unwrap_or(0);
        let mut row = Map::new();
        row.insert("change".into(), (i + 1).into());
        row.insert("version".into(), c.version.clone().into());
        if let Some(s) = c.put_status {
            row.insert("put_status".into(), s.into());
        }
        if let Some(e) = &c.put_error {
            *self
                .put_errors
                .entry(format!("PUT failed: {e}"))
                .or_insert(0) += 1;
            return row;
        }
        let put_ms = c.answered_us.saturating_sub(c.sent_us) as f64 / 1000.0;
        put_hist.record(i, c.answered_us.saturating_sub(c.sent_us));
        self.puts.push(put_ms);
        row.insert("put_ms".into(), r2(put_ms).into());
        if c.changed == Some(false) {
            *self
                .put_errors
                .entry("PUT answered changed: false".into())
                .or_insert(0) += 1;
        }
        let received = get(&self.counts.received, &c.version);
        let dups = get(&self.counts.duplicates, &c.version);
        let stray = get(&self.counts.stray, &c.version);
        let missing = c.followers_open.saturating_sub(received);
        self.received += received;
        self.missing += missing;
        self.dups += dups;
        if missing == 0 && dups == 0 && stray == 0 {
            self.complete += 1;
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
                self.before_answer += 1;
            }
            // The CDF counts from the PUT being sent, which every frame follows.
            arrival_hist.saturating_record((d + put_us).max(1) as u64);
        }
        self.pooled.extend_from_slice(&deltas);
        self.book_times(&deltas, &mut row);
        self.book_memory(c, &mut row);
        if let Some(cpu_s) = c.cpu_s.filter(|_| received > 0) {
            row.insert(
                "server_cpu_us_per_frame".into(),
                r2(cpu_s * 1e6 / received as f64).into(),
            );
        }
        if c.timed_out {
            row.insert("timed_out".into(), true.into());
        }
        row
    }

    /// First, last, p50 and p99 arrival after the PUT's answer.
    fn book_times(&mut self, deltas: &[i64], row: &mut Map<String, Value>) {
        let ms = |x: Option<i64>| x.map(|us| us as f64 / 1000.0);
        if let Some(f) = ms(deltas.first().copied()) {
            self.firsts.push(f);
            row.insert("first_ms".into(), r2(f).into());
        }
        if let Some(l) = ms(deltas.last().copied()) {
            self.lasts.push(l);
            row.insert("last_ms".into(), r2(l).into());
        }
        if let Some(x) = ms(percentile(deltas, 0.5)) {
            row.insert("p50_ms".into(), r2(x).into());
        }
        if let Some(x) = ms(percentile(deltas, 0.99)) {
            row.insert("p99_ms".into(), r2(x).into());
        }
    }

    /// The server's memory before and at its peak during the change.
    fn book_memory(&mut self, c: &Change, row: &mut Map<String, Value>) {
        if let Some(b) = c.rss_before {
            row.insert("rss_before_kib".into(), b.into());
        }
        if let Some(pk) = c.rss_peak {
            row.insert("rss_peak_kib".into(), pk.into());
            self.peak_rss = Some(self.peak_rss.map_or(pk, |x| x.max(pk)));
            if let Some(b) = c.rss_before {
                let g = pk as i64 - b as i64;
                row.insert("rss_peak_growth_kib".into(), g.into());
                self.peak_growth = Some(self.peak_growth.map_or(g, |x| x.max(g)));
            }
            row.insert("rss_samples".into(), c.rss_samples.into());
        }
    }

    fn pooled_ms(&self, q: f64) -> Option<f64> {
        percentile(&self.pooled, q).map(|us| us as f64 / 1000.0)
    }
}

/// --non-followers, or a tenth of --uas (at least 1).
fn non_followers(args: &FanoutArgs) -> usize {
    args.non_followers.unwrap_or((args.uas / 10).max(1))
}

/// What the measured phases left: the fleet connected, the changes, the
/// server's CPU over them and its memory after.
struct Measured {
    connected: Connected,
    changes: Vec<Change>,
    server_cpu: Option<f64>,
    rss_after: Option<u64>,
}

/// Errors, metrics, latency and notes into the results; returns the summary.
fn record(
    args: &FanoutArgs,
    run: &mut Run<'_>,
    mut workers: Workers,
    m: &Measured,
    f: &Findings,
    sizing: &Sizing,
) -> String {
    let (connected, changes) = (&m.connected, &m.changes[..]);
    let (server_cpu, rss_after) = (m.server_cpu, m.rss_after);
    let non = non_followers(args);
    let total = args.uas + non;
    record_errors(run, &mut workers, changes, f);
    let result = &mut run.result;
    let failed = workers.sum(|s| s.failed);
    result.metric("requested", total as u64);
    result.metric("followers_connected", connected.followers);
    result.metric("non_followers_connected", connected.non_followers);
    result.metric("failed", failed);
    result.metric("connect_phase_s", r2(connected.secs));
    result.metric("procs", sizing.procs as u64);
    result.metric("source_addrs", sizing.srcs as u64);
    result.metric("changes", changes.len() as u64);
    result.metric("changes_complete", f.complete);
    result.metric("frames_received", f.received);
    result.metric("missing", f.missing);
    result.metric("duplicates", f.dups);
    result.metric("non_follower_frames", f.stray);
    result.metric("frames_before_put_answer", f.before_answer);
    let mut put_f = |name: &str, v: Option<f64>| {
        if let Some(v) = v {
            result.metric(name, r2(v));
        }
    };
    put_f("first_frame_ms_median", median(&f.firsts));
    put_f("last_frame_ms_median", median(&f.lasts));
    put_f(
        "last_frame_ms_max",
        f.lasts.iter().copied().reduce(f64::max),
    );
    put_f("put_ms_median", median(&f.puts));
    put_f("arrival_p50_ms", f.pooled_ms(0.5));
    put_f("arrival_p99_ms", f.pooled_ms(0.99));
    let rss_before = changes.first().and_then(|c| c.rss_before);
    record_memory(result, connected, f, rss_before, rss_after);
    // One broadcast frame delivered is this scenario's delivered message.
    let cpu_us = result.cpu_per("server_cpu_us_per_broadcast_frame", server_cpu, f.received);
    result.cpu_per("server_cpu_us_per_delivered", server_cpu, f.received);
    let empty = || stats::from_pairs(&[]);
    let arrival = LatencySummary::from_hist(f.arrival_hist.as_ref().unwrap_or(&empty()));
    result
        .latency
        .insert("fanout_arrival".into(), arrival.clone());
    if let Some(h) = &f.put_hist {
        result
            .latency
            .insert("put".into(), LatencySummary::from_hist(h));
    }
    if let Some(h) = &workers.setup {
        result
            .latency
            .insert("setup".into(), LatencySummary::from_hist(h));
    }
    result.set_subprotocols(std::mem::take(&mut workers.subprotocols));
    result.memory = std::mem::take(&mut workers.memory);
    record_notes(result, f);
    summary(args, connected, changes, f, non, failed, rss_before, cpu_us)
}

fn record_errors(run: &mut Run<'_>, workers: &mut Workers, changes: &[Change], f: &Findings) {
    let errors = &mut run.result.errors;
    *errors = std::mem::take(&mut workers.errors);
    stats::merge_tally(errors, &f.put_errors);
    stats::merge_tally(errors, &workers.failures);
    for (k, v) in &workers.drops {
        errors.insert(format!("dropped while held: {k}"), *v);
    }
    run.error_counts(&[
        ("follower missed a change", f.missing),
        ("follower heard of a change more than once", f.dups),
        ("broadcast frame to a user agent following nothing", f.stray),
        ("broadcast frame without the followed id", f.counts.other),
        (
            "broadcast frame for a version this run did not set",
            f.foreign,
        ),
        (
            "gave up waiting for followers (--change-timeout)",
            changes.iter().filter(|c| c.timed_out).count() as u64,
        ),
    ]);
}

/// The server's memory: at the start, per connection, around the changes.
fn record_memory(
    result: &mut RunResult,
    connected: &Connected,
    f: &Findings,
    rss_before: Option<u64>,
    rss_after: Option<u64>,
) {
    if let Some(r) = connected.rss_start {
        result.metric("server_rss_start_kib", r);
    }
    if let (Some(a), Some(b)) = (connected.rss, connected.rss_start) {
        if connected.open > 0 {
            result.metric(
                "server_kib_per_connection",
                r2((a as f64 - b as f64) / connected.open as f64),
            );
        }
    }
    if let Some(b) = rss_before {
        result.metric("server_rss_before_kib", b);
    }
    if let Some(pk) = f.peak_rss {
        result.metric("server_rss_peak_kib", pk);
    }
    if let Some(g) = f.peak_growth {
        result.metric("server_rss_peak_growth_kib", g);
    }
    if let Some(a) = rss_after {
        result.metric("server_rss_after_kib", a);
    }
}

fn record_notes(result: &mut RunResult, f: &Findings) {
    if f.before_answer > 0 {
        result.notes.push(format!(
            "{} of {} broadcast frames arrived before the PUT's answer (the server tells followers while it answers): their times after the answer are negative",
            f.before_answer, f.received
        ));
    }
    result.notes.push(
        "the fanout_arrival latency counts from the PUT being sent; first/last/p50/p99 in the metrics and per change count from its answer".into(),
    );
    result.notes.push(
        "arrival times are taken by the generator, which shares the machine's cores with the server: they include its own scheduling delay".into(),
    );
}

/// The one-line summary.
#[allow(clippy::too_many_arguments)] // each is a figure the line quotes
fn summary(
    args: &FanoutArgs,
    connected: &Connected,
    changes: &[Change],
    f: &Findings,
    non: usize,
    failed: u64,
    rss_before: Option<u64>,
    cpu_us: Option<f64>,
) -> String {
    let (missing_total, dup_total, received_total) = (f.missing, f.dups, f.received);
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
    let ms = |x: Option<f64>| {
        x.map_or("–".to_string(), |v| {
            format!("{:.1} ms", (v * 10.0).round() / 10.0 + 0.0)
        })
    };
    let rss = match (rss_before, f.peak_rss, f.peak_growth) {
        (Some(b), Some(pk), Some(g)) => {
            format!("server RSS {b} KiB before, peak {pk} KiB ({g:+} KiB)")
        }
        _ => "server memory not measured (no --server-pid)".into(),
    };
    format!(
        "fanout[{}]: {}/{} followers + {}/{non} non-followers connected ({failed} failed); {} changes, {delivery}, {} frames to non-followers; PUT answered in {}; after its answer: first frame {}, last {} (median of changes; worst {}), arrival p50 {}, p99 {}; {rss}; {}",
        args.common.target,
        connected.followers,
        args.uas,
        connected.non_followers,
        changes.len(),
        f.stray,
        ms(median(&f.puts)),
        ms(median(&f.firsts)),
        ms(median(&f.lasts)),
        ms(f.lasts.iter().copied().reduce(f64::max)),
        ms(f.pooled_ms(0.5)),
        ms(f.pooled_ms(0.99)),
        results::cpu_text(cpu_us, "broadcast frame"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

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
