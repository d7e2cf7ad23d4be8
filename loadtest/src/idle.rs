//! Scenario `idle`: open many user agents, hold them, and report what each
//! costs the server. Past one process's open-file limit the work is spread
//! over worker processes (this same binary, re-executed), and past one
//! source address's port range over 127.0.0.x source addresses.

use crate::crypto::Vapid;
use crate::fanout::{self, Arrivals, FanoutCounts, Follow, Recorder};
use crate::fleet;
use crate::net::{self, FileLimit};
use crate::proto::{self, Target};
use crate::results::{self, Common, CpuMeter, MemoryPoint, RunResult};
use crate::stats::{self, Hist, LatencySummary, Tally};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, watch, Semaphore};

#[derive(clap::Args, Clone, Debug)]
pub struct IdleArgs {
    #[command(flatten)]
    pub common: Common,
    /// User agents to open.
    #[arg(long, default_value_t = 1000)]
    pub uas: usize,
    /// Connects per second across all processes; 0 means as fast as --concurrency allows.
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// Seconds to hold the connections once connecting has finished.
    #[arg(long, default_value_t = 5.0)]
    pub hold: f64,
    /// Client processes (default: as many as the open-file limit requires).
    #[arg(long)]
    pub procs: Option<usize>,
    /// Source addresses 127.0.0.1..N (default: as many as the ephemeral port range requires).
    #[arg(long)]
    pub source_addrs: Option<usize>,
    /// Stop opening connections after this many failures in a row: the ceiling is found.
    #[arg(long, default_value_t = 200)]
    pub max_consecutive_failures: u64,
    /// Stop opening connections after this many seconds.
    #[arg(long, default_value_t = 900.0)]
    pub max_connect_secs: f64,
}

/// What one worker (process or in-process task) is told to do.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct WorkerSpec {
    /// The nodes; user agent with global index g goes to `urls[g % len]`.
    pub urls: Vec<String>,
    pub count: usize,
    /// Global index of this worker's first user agent, for spreading over
    /// source addresses consistently across workers.
    pub first_index: usize,
    pub source_addrs: usize,
    pub concurrency: usize,
    pub rate: f64,
    pub channels: usize,
    pub timeout: f64,
    pub max_consecutive_failures: u64,
    pub max_connect_secs: f64,
    /// Hard bound on the worker's life, in case the parent never releases it.
    pub max_life_secs: f64,
    /// `fanout`: which user agents follow which broadcast; their broadcast
    /// frames are timestamped and reported. None for `idle`.
    #[serde(default)]
    pub follow: Option<Follow>,
    /// Milliseconds between progress events (0: 200).
    #[serde(default)]
    pub progress_ms: u64,
}

/// Worker → parent, one JSON object per line on the worker's stdout.
#[derive(Serialize, Deserialize, Debug)]
#[serde(tag = "ev", rename_all = "snake_case")]
pub enum WorkerEvent {
    Progress {
        established: u64,
        failed: u64,
        open: u64,
        /// `fanout`: broadcast frames received so far.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        fanout: Option<FanoutCounts>,
    },
    Launched {
        established: u64,
        failed: u64,
        open: u64,
        last_established_us: u64,
        failures: BTreeMap<String, u64>,
        setup_latency: Vec<(u64, u64)>,
        nofile: FileLimit,
        /// This worker's resident memory before connecting and now, KiB.
        #[serde(default)]
        rss_start_kib: u64,
        #[serde(default)]
        rss_kib: u64,
        /// Of `established`, the user agents following a broadcast (`fanout`).
        #[serde(default)]
        followers: u64,
        /// Handshakes by the subprotocol the server selected.
        #[serde(default)]
        subprotocols: BTreeMap<String, u64>,
    },
    Final {
        dropped: u64,
        drop_reasons: BTreeMap<String, u64>,
        /// `fanout`: every broadcast frame's arrival.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        fanout: Option<Arrivals>,
    },
    Error {
        message: String,
    },
}

#[derive(Default)]
struct Counters {
    established: AtomicU64,
    failed: AtomicU64,
    open: AtomicU64,
    consecutive_failures: AtomicU64,
    last_established_us: AtomicU64,
    followers: AtomicU64,
}

/// Opens `spec.count` user agents, reports, holds them until `release`.
pub async fn run_worker(
    spec: WorkerSpec,
    events: mpsc::UnboundedSender<WorkerEvent>,
    mut release: watch::Receiver<bool>,
) {
    if let Err(e) = worker_inner(&spec, &events, &mut release).await {
        let _ = events.send(WorkerEvent::Error {
            message: format!("{e:#}"),
        });
    }
}

async fn worker_inner(
    spec: &WorkerSpec,
    events: &mpsc::UnboundedSender<WorkerEvent>,
    release: &mut watch::Receiver<bool>,
) -> Result<()> {
    let nofile = net::raise_nofile_limit();
    let rss_start_kib = results::own_rss_kib().unwrap_or(0);
    let targets = Target::all(&spec.urls).await?;
    // Source addresses per node: ports are per (source, destination) pair.
    let srcs: Vec<Vec<Option<std::net::IpAddr>>> = targets
        .iter()
        .map(|t| net::source_addrs(t.addr, spec.source_addrs))
        .collect();
    let vapid = Vapid::generate()?;
    let key: Arc<str> = vapid.public_b64.into();
    let limit = stats::step_limit(spec.timeout);
    let clock = stats::Clock::new();
    let c = Arc::new(Counters::default());
    let failures = Arc::new(Tally::default());
    let drops = Arc::new(Tally::default());
    let latency = Arc::new(Hist::new());
    let sem = Arc::new(Semaphore::new(spec.concurrency.max(1)));
    let recorder = spec.follow.as_ref().map(|f| Arc::new(Recorder::new(&f.id)));

    let progress = {
        let c = c.clone();
        let events = events.clone();
        let recorder = recorder.clone();
        let every = Duration::from_millis(if spec.progress_ms == 0 {
            200
        } else {
            spec.progress_ms
        });
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                let ev = WorkerEvent::Progress {
                    established: c.established.load(Relaxed),
                    failed: c.failed.load(Relaxed),
                    open: c.open.load(Relaxed),
                    fanout: recorder.as_ref().map(|r| r.counts()),
                };
                if events.send(ev).is_err() {
                    break;
                }
            }
        })
    };

    let started = Instant::now();
    let connect_deadline = started + stats::secs(spec.max_connect_secs);
    for i in 0..spec.count {
        if c.consecutive_failures.load(Relaxed) >= spec.max_consecutive_failures
            || Instant::now() >= connect_deadline
        {
            break;
        }
        if spec.rate > 0.0 {
            let at = (started + stats::secs(i as f64 / spec.rate)).min(connect_deadline);
            tokio::time::sleep_until(at.into()).await;
            if Instant::now() >= connect_deadline {
                break;
            }
        }
        let Ok(permit) = sem.clone().acquire_owned().await else {
            break;
        };
        let g = spec.first_index + i;
        let node = g % targets.len();
        let src = srcs[node][g % srcs[node].len()];
        let channels: Vec<(uuid::Uuid, Arc<str>)> = (0..spec.channels)
            .map(|_| (proto::new_channel_id(), key.clone()))
            .collect();
        // `fanout`: this user agent follows the broadcast (at the version
        // the parent set), or is one of those that follow nothing.
        let follows = spec.follow.as_ref().filter(|f| f.follows(g));
        let broadcasts: BTreeMap<String, String> = follows
            .map(|f| [(f.id.clone(), f.version.clone())].into())
            .unwrap_or_default();
        let follower = follows.is_some();
        let recorder = recorder.clone();
        let (target, c, failures, drops, latency) = (
            targets[node].clone(),
            c.clone(),
            failures.clone(),
            drops.clone(),
            latency.clone(),
        );
        let mut release = release.clone();
        tokio::spawn(async move {
            let t0 = Instant::now();
            let regs: Vec<(uuid::Uuid, &str)> = channels.iter().map(|(u, k)| (*u, &**k)).collect();
            // Boxed so the (large) handshake state is freed once set up: the
            // task then holds little more than the socket while it idles.
            let up = Box::pin(fleet::bring_up_following(
                &target,
                src,
                &broadcasts,
                &regs,
                limit,
            ))
            .await;
            drop(permit);
            drop(regs);
            drop(channels);
            drop(broadcasts);
            let mut ws = match up {
                Ok((ws, _, _)) => ws,
                Err(f) => {
                    failures.add(f.key());
                    c.failed.fetch_add(1, Relaxed);
                    c.consecutive_failures.fetch_add(1, Relaxed);
                    return;
                }
            };
            latency.record(i, t0.elapsed().as_micros() as u64);
            c.consecutive_failures.store(0, Relaxed);
            c.open.fetch_add(1, Relaxed);
            c.established.fetch_add(1, Relaxed);
            if follower {
                c.followers.fetch_add(1, Relaxed);
            }
            stats::fetch_max(&c.last_established_us, clock.now_us());
            let ended = match &recorder {
                Some(rec) => fanout::watch(&mut ws, follower, rec, &mut release).await,
                None => fleet::hold(&mut ws, &mut release).await,
            };
            c.open.fetch_sub(1, Relaxed);
            match ended {
                Some(reason) => drops.add(reason),
                None => fleet::close(ws).await,
            }
        });
    }
    // Wait for the setups still in flight (each bounded by three step limits).
    let settle = limit * 3 + Duration::from_secs(5);
    let all = spec.concurrency.max(1) as u32;
    let _ = tokio::time::timeout(settle, sem.acquire_many(all)).await;

    let _ = events.send(WorkerEvent::Launched {
        established: c.established.load(Relaxed),
        failed: c.failed.load(Relaxed),
        open: c.open.load(Relaxed),
        last_established_us: c.last_established_us.load(Relaxed),
        failures: failures.snapshot(),
        setup_latency: stats::to_pairs(&latency.merged()),
        nofile,
        rss_start_kib,
        rss_kib: results::own_rss_kib().unwrap_or(0),
        followers: c.followers.load(Relaxed),
        subprotocols: proto::selected_subprotocols(),
    });

    let life = stats::secs(spec.max_life_secs.max(1.0));
    let _ = tokio::time::timeout(life.saturating_sub(started.elapsed()), async {
        while !*release.borrow_and_update() {
            if release.changed().await.is_err() {
                break;
            }
        }
    })
    .await;
    // Whatever the parent wants, this worker now lets go.
    let dropped_before_release = drops.total();
    let drop_reasons = drops.snapshot();
    // Give the holders time to send their close frames (bounded).
    let closing = Instant::now();
    while c.open.load(Relaxed) > 0 && closing.elapsed() < Duration::from_secs(15) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    progress.abort();
    let _ = events.send(WorkerEvent::Final {
        dropped: dropped_before_release,
        drop_reasons,
        fanout: recorder.map(|r| r.arrivals()),
    });
    Ok(())
}

/// Entry point of `herald-loadtest idle-worker`: a worker process. Events go
/// to stdout as JSON lines; a `release` line (or EOF) on stdin lets go.
pub async fn worker_process(spec_json: &str) -> Result<()> {
    let spec: WorkerSpec = serde_json::from_str(spec_json).context("parsing worker spec")?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let (rel_tx, rel_rx) = watch::channel(false);
    tokio::spawn(async move {
        let mut lines = BufReader::new(tokio::io::stdin()).lines();
        // EOF or an error also mean release: the parent is gone.
        while let Ok(Some(line)) = lines.next_line().await {
            if line.trim() == "release" {
                break;
            }
        }
        let _ = rel_tx.send(true);
    });
    let work = tokio::spawn(run_worker(spec, tx, rel_rx));
    let mut out = tokio::io::stdout();
    while let Some(ev) = rx.recv().await {
        let mut line = serde_json::to_string(&ev)?;
        line.push('\n');
        if out.write_all(line.as_bytes()).await.is_err() || out.flush().await.is_err() {
            break;
        }
    }
    let _ = work.await;
    Ok(())
}

pub(crate) enum Worker {
    Local(watch::Sender<bool>),
    Child(tokio::process::Child),
}

impl Worker {
    pub(crate) async fn release(&mut self) {
        match self {
            Worker::Local(tx) => {
                let _ = tx.send(true);
            }
            Worker::Child(child) => {
                if let Some(mut stdin) = child.stdin.take() {
                    let _ = stdin.write_all(b"release\n").await;
                    // Dropping stdin closes it: EOF releases too.
                }
            }
        }
    }
}

#[derive(Default, Clone)]
struct WorkerState {
    established: u64,
    failed: u64,
    open: u64,
    /// Growth of the worker's resident memory while connecting, KiB.
    rss_growth_kib: u64,
    launched: bool,
    finished: bool,
}

pub async fn run(args: IdleArgs) -> Result<()> {
    let common = &args.common;
    if args.uas == 0 {
        bail!("--uas must be at least 1");
    }
    let targets = Target::all(&common.urls).await?;
    let nofile = net::raise_nofile_limit();
    // Leave room for the runtime, stdio and the odd file besides sockets.
    let per_proc = nofile.soft.saturating_sub(100).max(1) as usize;
    let procs = args
        .procs
        .unwrap_or(args.uas.div_ceil(per_proc))
        .clamp(1, 1000);
    let ports = net::ephemeral_port_count();
    // Keep 10 % of each source address's ports spare for other traffic.
    let srcs = args
        .source_addrs
        .unwrap_or(args.uas.div_ceil(ports * 9 / 10))
        .clamp(1, 250);
    if procs * per_proc < args.uas {
        eprintln!(
            "warning: {procs} processes x {per_proc} files cannot hold {} connections; raise --procs",
            args.uas
        );
    }
    let pairs: usize = targets
        .iter()
        .map(|t| net::source_addrs(t.addr, srcs).len())
        .sum();
    if pairs * ports < args.uas {
        eprintln!(
            "warning: not enough source addresses/ports for {} connections",
            args.uas
        );
    }
    let server = common.servers();
    if let Some(pid) = server.unreadable() {
        bail!("cannot read /proc/{pid}/status: is --server-pid right?");
    }
    let rss_before = server.rss_each();
    let fds_before = server.open_fds();
    let cpu = CpuMeter::start(&server);

    let mut result = RunResult::new(
        "idle",
        common,
        serde_json::json!({
            "uas": args.uas, "channels": common.channels, "rate": args.rate,
            "hold_s": args.hold, "procs": procs, "source_addrs": srcs,
            "concurrency": common.concurrency, "timeout_s": common.timeout,
            "max_consecutive_failures": args.max_consecutive_failures,
        }),
    );
    eprintln!(
        "idle: {} user agents over {procs} process(es), {srcs} source address(es), client open-file limit {}",
        args.uas, nofile.soft
    );

    let (tx, mut rx) = mpsc::unbounded_channel::<(usize, WorkerEvent)>();
    let max_life = args.max_connect_secs + args.hold + common.timeout * 3.0 + 120.0;
    let template = WorkerSpec {
        urls: common.urls.clone(),
        count: 0,
        first_index: 0,
        source_addrs: srcs,
        concurrency: common.concurrency.div_ceil(procs).max(1),
        rate: args.rate / procs as f64,
        channels: common.channels,
        timeout: common.timeout,
        max_consecutive_failures: args.max_consecutive_failures,
        max_connect_secs: args.max_connect_secs,
        max_life_secs: max_life,
        follow: None,
        progress_ms: 0,
    };
    let mut workers = spawn_workers(procs, args.uas, &template, &tx).await?;
    drop(tx);

    let started = Instant::now();
    let mut state = vec![WorkerState::default(); procs];
    let mut failures = BTreeMap::new();
    let mut drops = BTreeMap::new();
    let mut setup_hist = stats::from_pairs(&[]);
    let mut last_established_us = 0u64;
    let mut subprotocols = BTreeMap::new();
    let mut memory = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let mut last_print = Instant::now();
    let launch_deadline = started + stats::secs(max_life);

    // Phase 1: until every worker has finished connecting.
    while !state.iter().all(|s| s.launched || s.finished) && Instant::now() < launch_deadline {
        tokio::select! {
            ev = rx.recv() => match ev {
                Some((w, ev)) => absorb(w, ev, &mut state, &mut failures, &mut drops, &mut setup_hist, &mut last_established_us, &mut result.errors, &mut subprotocols),
                None => break,
            },
            _ = tick.tick() => {
                let open: u64 = state.iter().map(|s| s.open).sum();
                if let Some(rss) = server.rss_kib() {
                    memory.push(MemoryPoint { connections: open, rss_kib: rss });
                }
                if last_print.elapsed() >= Duration::from_secs(2) {
                    let est: u64 = state.iter().map(|s| s.established).sum();
                    let failed: u64 = state.iter().map(|s| s.failed).sum();
                    eprintln!("  open {open}, established {est}, failed {failed}");
                    last_print = Instant::now();
                }
            }
        }
    }
    let connect_secs = started.elapsed().as_secs_f64();
    let established: u64 = state.iter().map(|s| s.established).sum();
    let failed: u64 = state.iter().map(|s| s.failed).sum();

    // Let the server finish allocating for the last connections before
    // reading its peak.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let server_fds_peak = server.open_fds();
    let fullest = server.fullest_fds();

    // Phase 2: hold.
    let hold_until = Instant::now() + stats::secs(args.hold);
    while Instant::now() < hold_until {
        tokio::select! {
            ev = rx.recv() => match ev {
                Some((w, ev)) => absorb(w, ev, &mut state, &mut failures, &mut drops, &mut setup_hist, &mut last_established_us, &mut result.errors, &mut subprotocols),
                None => break,
            },
            _ = tokio::time::sleep_until(hold_until.into()) => {}
            _ = tick.tick() => {
                let open: u64 = state.iter().map(|s| s.open).sum();
                if let Some(rss) = server.rss_kib() {
                    memory.push(MemoryPoint { connections: open, rss_kib: rss });
                }
            }
        }
    }
    let open_at_end: u64 = state.iter().map(|s| s.open).sum();
    let rss_after = server.rss_each();

    // Phase 3: release and collect final reports.
    for w in workers.iter_mut() {
        w.release().await;
    }
    let final_deadline = Instant::now() + Duration::from_secs(30);
    while !state.iter().all(|s| s.finished) && Instant::now() < final_deadline {
        match tokio::time::timeout_at(final_deadline.into(), rx.recv()).await {
            Ok(Some((w, ev))) => absorb(
                w,
                ev,
                &mut state,
                &mut failures,
                &mut drops,
                &mut setup_hist,
                &mut last_established_us,
                &mut result.errors,
                &mut subprotocols,
            ),
            _ => break,
        }
    }
    reap_workers(workers, &mut result.errors).await;

    // Findings.
    let dropped: u64 = drops.values().sum();
    let setup = LatencySummary::from_hist(&setup_hist);
    let connect_rate = if last_established_us > 0 {
        established as f64 / (last_established_us as f64 / 1e6)
    } else {
        0.0
    };
    stats::merge_tally(&mut result.errors, &failures);
    for (k, v) in &drops {
        result.errors.insert(format!("dropped while held: {k}"), *v);
    }
    let stopped_by = stopped_by(
        args.uas as u64,
        established,
        &failures,
        nofile,
        fullest,
        connect_secs >= args.max_connect_secs,
    );
    result.notes.push(format!("stopped by: {stopped_by}"));
    result.metric("requested", args.uas as u64);
    result.metric("established", established);
    result.metric("failed", failed);
    result.metric("open_at_end", open_at_end);
    result.metric("dropped_while_held", dropped);
    result.metric("connect_rate_per_s", round2(connect_rate));
    result.metric("connect_phase_s", round2(connect_secs));
    result.metric("procs", procs as u64);
    result.metric("source_addrs", srcs as u64);
    result.metric("client_nofile_limit", nofile.soft);
    result.metric("stopped_by", stopped_by.clone());
    let client_growth: u64 = state.iter().map(|s| s.rss_growth_kib).sum();
    if established > 0 && client_growth > 0 {
        result.metric(
            "client_kib_per_connection",
            round2(client_growth as f64 / established as f64),
        );
    }
    if let Some(slope) = slope(&memory) {
        result.metric("server_kib_per_connection_slope", round2(slope));
    }
    cpu.record(&mut result);
    let mut per_conn = None;
    result.server_rss(rss_before.as_deref(), rss_after.as_deref());
    let sum = |v: &Option<Vec<u64>>| v.as_ref().map(|v| v.iter().sum::<u64>());
    if let (Some(b), Some(a)) = (sum(&rss_before), sum(&rss_after)) {
        if open_at_end > 0 {
            let kib = (a as f64 - b as f64) / open_at_end as f64;
            per_conn = Some(kib);
            result.metric("server_kib_per_connection", round2(kib));
        }
    }
    if let Some(f) = fds_before {
        result.metric("server_fds_before", f);
    }
    if let Some(f) = server_fds_peak {
        result.metric("server_fds_peak", f);
    }
    if let Some((_, l)) = fullest {
        result.metric("server_nofile_limit", l);
    }
    result.latency.insert("setup".into(), setup.clone());
    result.set_subprotocols(subprotocols);
    result.memory = memory;
    result.elapsed_s = round2(started.elapsed().as_secs_f64());
    result.summary = format!(
        "idle[{}]: {established}/{} connected ({failed} failed, {dropped} dropped), {:.0} connects/s, setup {}, {}; stopped by {stopped_by}",
        common.target,
        args.uas,
        connect_rate,
        setup.short(),
        match per_conn {
            Some(k) => format!("server {k:.1} KiB/connection at {open_at_end}"),
            None => "server memory not measured (no --server-pid)".into(),
        },
    );
    result.finish(common.out.as_deref())?;
    Ok(())
}

/// Least-squares KiB per connection over the memory samples: less sensitive
/// than a before/after difference to memory the server held beforehand.
fn slope(points: &[MemoryPoint]) -> Option<f64> {
    let pts: Vec<(f64, f64)> = points
        .iter()
        .filter(|p| p.connections > 0)
        .map(|p| (p.connections as f64, p.rss_kib as f64))
        .collect();
    let n = pts.len() as f64;
    if pts.len() < 5 {
        return None;
    }
    let (mx, my) = (
        pts.iter().map(|p| p.0).sum::<f64>() / n,
        pts.iter().map(|p| p.1).sum::<f64>() / n,
    );
    let sxx: f64 = pts.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let sxy: f64 = pts.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    (sxx > 0.0).then(|| sxy / sxx)
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

#[allow(clippy::too_many_arguments)]
fn absorb(
    w: usize,
    ev: WorkerEvent,
    state: &mut [WorkerState],
    failures: &mut BTreeMap<String, u64>,
    drops: &mut BTreeMap<String, u64>,
    hist: &mut hdrhistogram::Histogram<u64>,
    last_established_us: &mut u64,
    errors: &mut BTreeMap<String, u64>,
    subprotocols: &mut BTreeMap<String, u64>,
) {
    let s = &mut state[w];
    match ev {
        WorkerEvent::Progress {
            established,
            failed,
            open,
            ..
        } => {
            s.established = established;
            s.failed = failed;
            s.open = open;
        }
        WorkerEvent::Launched {
            established,
            failed,
            open,
            last_established_us: last,
            failures: f,
            setup_latency,
            rss_start_kib,
            rss_kib,
            subprotocols: sp,
            ..
        } => {
            stats::merge_tally(subprotocols, &sp);
            s.rss_growth_kib = rss_kib.saturating_sub(rss_start_kib);
            s.established = established;
            s.failed = failed;
            s.open = open;
            s.launched = true;
            stats::merge_tally(failures, &f);
            stats::merge_pairs(hist, &setup_latency);
            *last_established_us = (*last_established_us).max(last);
        }
        WorkerEvent::Final { drop_reasons, .. } => {
            s.finished = true;
            s.open = 0;
            stats::merge_tally(drops, &drop_reasons);
        }
        WorkerEvent::Error { message } => {
            eprintln!("worker {w}: {message}");
            *errors.entry(format!("worker: {message}")).or_insert(0) += 1;
            s.finished = true;
            s.open = 0;
        }
    }
}

/// Starts `procs` workers sharing `total` user agents as evenly as they can:
/// each is told `template` with its own share (`count`, `first_index`).
pub(crate) async fn spawn_workers(
    procs: usize,
    total: usize,
    template: &WorkerSpec,
    tx: &mpsc::UnboundedSender<(usize, WorkerEvent)>,
) -> Result<Vec<Worker>> {
    let mut workers = Vec::new();
    let mut first = 0usize;
    for w in 0..procs {
        let count = total / procs + usize::from(w < total % procs);
        let spec = WorkerSpec {
            count,
            first_index: first,
            ..template.clone()
        };
        first += count;
        workers.push(spawn_worker(w, procs == 1, spec, tx.clone()).await?);
    }
    Ok(workers)
}

/// Waits up to 5 s for each worker process to exit, killing one that does
/// not and noting it in `errors`.
pub(crate) async fn reap_workers(workers: Vec<Worker>, errors: &mut BTreeMap<String, u64>) {
    for w in workers {
        if let Worker::Child(mut child) = w {
            if tokio::time::timeout(Duration::from_secs(5), child.wait())
                .await
                .is_err()
            {
                let _ = child.kill().await;
                errors.insert("worker did not exit".into(), 1);
            }
        }
    }
}

pub(crate) async fn spawn_worker(
    w: usize,
    local: bool,
    spec: WorkerSpec,
    tx: mpsc::UnboundedSender<(usize, WorkerEvent)>,
) -> Result<Worker> {
    if spec.count == 0 {
        let _ = tx.send((
            w,
            WorkerEvent::Final {
                dropped: 0,
                drop_reasons: BTreeMap::new(),
                fanout: None,
            },
        ));
        let (rel, _) = watch::channel(false);
        return Ok(Worker::Local(rel));
    }
    // One process needs no re-exec: run in this runtime.
    if local {
        let (rel_tx, rel_rx) = watch::channel(false);
        let (etx, mut erx) = mpsc::unbounded_channel();
        tokio::spawn(run_worker(spec, etx, rel_rx));
        tokio::spawn(async move {
            while let Some(ev) = erx.recv().await {
                if tx.send((w, ev)).is_err() {
                    break;
                }
            }
        });
        return Ok(Worker::Local(rel_tx));
    }
    let exe = std::env::current_exe().context("locating own executable for worker processes")?;
    let mut child = tokio::process::Command::new(exe)
        .arg("idle-worker")
        .arg("--spec")
        .arg(serde_json::to_string(&spec)?)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .context("starting worker process")?;
    let stdout = child.stdout.take().context("worker stdout")?;
    tokio::spawn(async move {
        let mut lines = BufReader::new(stdout).lines();
        let mut finished = false;
        while let Ok(Some(line)) = lines.next_line().await {
            match serde_json::from_str::<WorkerEvent>(&line) {
                Ok(ev) => {
                    finished |= matches!(ev, WorkerEvent::Final { .. } | WorkerEvent::Error { .. });
                    if tx.send((w, ev)).is_err() {
                        return;
                    }
                }
                Err(_) => eprintln!("worker {w}: unexpected output: {line}"),
            }
        }
        if !finished {
            let _ = tx.send((
                w,
                WorkerEvent::Error {
                    message: "worker exited early".into(),
                },
            ));
        }
    });
    Ok(Worker::Child(child))
}

/// Which limit ended the climb, in words a reader can act on.
fn stopped_by(
    requested: u64,
    established: u64,
    failures: &BTreeMap<String, u64>,
    client: FileLimit,
    // (descriptors in use, soft limit) of the server process nearest its limit.
    server_fds: Option<(u64, u64)>,
    timed_out: bool,
) -> String {
    if established >= requested {
        return "nothing: every requested user agent connected".into();
    }
    if timed_out {
        return "the --max-connect-secs time limit".into();
    }
    let top = failures
        .iter()
        .max_by_key(|(_, n)| **n)
        .map(|(k, n)| (k.as_str(), *n));
    let Some((reason, n)) = top else {
        return "nothing recorded (setups unfinished)".into();
    };
    let errno = reason.rsplit(": ").next().unwrap_or("");
    if reason.starts_with("connect") && net::is_client_resource_error(errno) {
        let what = if errno == "EADDRNOTAVAIL" || errno == "EADDRINUSE" {
            "this machine's ephemeral ports (use more --source-addrs)".to_string()
        } else if errno == "EMFILE" || errno == "ENFILE" {
            format!(
                "the client's open-file limit ({} per process; use more --procs)",
                client.soft
            )
        } else {
            "client memory/buffers".to_string()
        };
        return format!("{what} [{n}x {reason}]");
    }
    if let Some((fds, limit)) = server_fds {
        if fds + 64 >= limit {
            return format!(
                "the server's open-file limit ({fds} of {limit} descriptors in use) [{n}x {reason}]"
            );
        }
        return format!("the server ({reason}, {n}x) with {fds} of {limit} descriptors in use");
    }
    format!("the server ({reason}, {n}x); pass --server-pid to see its descriptor use")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(pairs: &[(&str, u64)]) -> BTreeMap<String, u64> {
        pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
    }
    const LIM: FileLimit = FileLimit {
        soft: 20000,
        hard: 20000,
    };

    #[test]
    fn names_the_limit() {
        assert!(stopped_by(10, 10, &f(&[]), LIM, None, false).starts_with("nothing"));
        let s = stopped_by(
            30000,
            19990,
            &f(&[("connect: EMFILE", 300)]),
            LIM,
            None,
            false,
        );
        assert!(s.contains("client's open-file limit"), "{s}");
        let s = stopped_by(
            30000,
            19990,
            &f(&[("connect: EADDRNOTAVAIL", 300)]),
            LIM,
            None,
            false,
        );
        assert!(s.contains("ephemeral ports"), "{s}");
        let s = stopped_by(
            30000,
            19950,
            &f(&[("handshake: ECONNRESET", 250), ("hello: timeout", 3)]),
            LIM,
            Some((19990, 20000)),
            false,
        );
        assert!(
            s.contains("server's open-file limit") && s.contains("19990 of 20000"),
            "{s}"
        );
        let s = stopped_by(
            30000,
            100,
            &f(&[("hello: status 503", 200)]),
            LIM,
            Some((150, 20000)),
            false,
        );
        assert!(s.starts_with("the server (hello: status 503"), "{s}");
        assert!(stopped_by(30000, 100, &f(&[]), LIM, None, true).contains("max-connect-secs"));
    }

    #[test]
    fn slope_fits_a_line() {
        let pts: Vec<MemoryPoint> = (0..20)
            .map(|i| MemoryPoint {
                connections: i * 100,
                rss_kib: 5000 + i * 100 * 3 + (i % 2) * 7,
            })
            .collect();
        let s = slope(&pts).unwrap();
        assert!((s - 3.0).abs() < 0.05, "{s}");
        assert!(slope(&pts[..3]).is_none());
        let flat: Vec<MemoryPoint> = (0..9)
            .map(|_| MemoryPoint {
                connections: 5,
                rss_kib: 1,
            })
            .collect();
        assert!(slope(&flat).is_none());
    }

    #[test]
    fn worker_events_round_trip_as_json_lines() {
        let ev = WorkerEvent::Launched {
            established: 5,
            failed: 1,
            open: 5,
            last_established_us: 99,
            failures: f(&[("connect: EMFILE", 1)]),
            setup_latency: vec![(100, 2), (2000, 3)],
            nofile: LIM,
            rss_start_kib: 1,
            rss_kib: 2,
            followers: 0,
            subprotocols: f(&[("none", 5)]),
        };
        let line = serde_json::to_string(&ev).unwrap();
        assert!(!line.contains('\n'));
        match serde_json::from_str::<WorkerEvent>(&line).unwrap() {
            WorkerEvent::Launched { setup_latency, .. } => assert_eq!(setup_latency.len(), 2),
            other => panic!("{other:?}"),
        }
    }
}
