//! A fleet of user agents too large for one process: worker processes
//! (this binary re-executed as `idle-worker`) each open and hold their share,
//! from source addresses 127.0.0.x past one address's ephemeral ports, and
//! report to the parent as JSON lines. `idle` and `fanout` run on it.
//!
//! Worker side: `worker_process` / `run_worker`. Parent side: `Sizing`
//! (how many processes and source addresses) and `Workers` (start them,
//! follow their events, release them, collect their final reports).

use crate::crypto::Vapid;
use crate::fleet;
use crate::follow::{self, Arrivals, FanoutCounts, Follow, Recorder};
use crate::net::{self, FileLimit};
use crate::proto::{self, Target};
use crate::results::{self, MemoryPoint, Servers};
use crate::stats::{self, Hist, Tally};
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};

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

/// What every connection of one worker shares.
struct Worker0 {
    targets: Vec<Target>,
    /// Source addresses per node: ports are per (source, destination) pair.
    srcs: Vec<Vec<Option<IpAddr>>>,
    key: Arc<str>,
    limit: Duration,
    clock: stats::Clock,
    c: Counters,
    failures: Tally,
    drops: Tally,
    latency: Hist,
    recorder: Option<Arc<Recorder>>,
}

async fn worker_inner(
    spec: &WorkerSpec,
    events: &mpsc::UnboundedSender<WorkerEvent>,
    release: &mut watch::Receiver<bool>,
) -> Result<()> {
    let nofile = net::raise_nofile_limit();
    let rss_start_kib = results::own_rss_kib().unwrap_or(0);
    let targets = Target::all(&spec.urls).await?;
    let w = Arc::new(Worker0 {
        srcs: targets
            .iter()
            .map(|t| net::source_addrs(t.addr, spec.source_addrs))
            .collect(),
        targets,
        key: Vapid::generate()?.public_b64.into(),
        limit: stats::step_limit(spec.timeout),
        clock: stats::Clock::new(),
        c: Counters::default(),
        failures: Tally::default(),
        drops: Tally::default(),
        latency: Hist::new(),
        recorder: spec.follow.as_ref().map(|f| Arc::new(Recorder::new(&f.id))),
    });
    let progress = spawn_progress(w.clone(), events.clone(), spec.progress_ms);
    let started = Instant::now();
    launch(spec, &w, release, started).await;
    let c = &w.c;
    let _ = events.send(WorkerEvent::Launched {
        established: c.established.load(Relaxed),
        failed: c.failed.load(Relaxed),
        open: c.open.load(Relaxed),
        last_established_us: c.last_established_us.load(Relaxed),
        failures: w.failures.snapshot(),
        setup_latency: stats::to_pairs(&w.latency.merged()),
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
    let dropped_before_release = w.drops.total();
    let drop_reasons = w.drops.snapshot();
    // Give the holders time to send their close frames (bounded).
    let closing = Instant::now();
    while c.open.load(Relaxed) > 0 && closing.elapsed() < Duration::from_secs(15) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    progress.abort();
    let _ = events.send(WorkerEvent::Final {
        dropped: dropped_before_release,
        drop_reasons,
        fanout: w.recorder.as_ref().map(|r| r.arrivals()),
    });
    Ok(())
}

/// Reports the counters every `progress_ms` (0: 200) until aborted.
fn spawn_progress(
    w: Arc<Worker0>,
    events: mpsc::UnboundedSender<WorkerEvent>,
    progress_ms: u64,
) -> tokio::task::JoinHandle<()> {
    let every = Duration::from_millis(if progress_ms == 0 { 200 } else { progress_ms });
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            let ev = WorkerEvent::Progress {
                established: w.c.established.load(Relaxed),
                failed: w.c.failed.load(Relaxed),
                open: w.c.open.load(Relaxed),
                fanout: w.recorder.as_ref().map(|r| r.counts()),
            };
            if events.send(ev).is_err() {
                break;
            }
        }
    })
}

/// Starts one task per user agent (at --rate, --concurrency at a time)
/// until all are started, too many failed in a row or the connect time is
/// up; returns once the setups in flight have finished (bounded).
async fn launch(
    spec: &WorkerSpec,
    w: &Arc<Worker0>,
    release: &watch::Receiver<bool>,
    started: Instant,
) {
    let sem = Arc::new(Semaphore::new(spec.concurrency.max(1)));
    let connect_deadline = started + stats::secs(spec.max_connect_secs);
    for i in 0..spec.count {
        if w.c.consecutive_failures.load(Relaxed) >= spec.max_consecutive_failures
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
        // `fanout`: this user agent follows the broadcast (at the version
        // the parent set), or is one of those that follow nothing.
        let follows = spec.follow.as_ref().filter(|f| f.follows(g));
        let broadcasts: BTreeMap<String, String> = follows
            .map(|f| [(f.id.clone(), f.version.clone())].into())
            .unwrap_or_default();
        let ua = OneUa {
            i,
            g,
            channels: spec.channels,
            broadcasts,
            permit,
        };
        tokio::spawn(open_and_hold(ua, w.clone(), release.clone()));
    }
    // Wait for the setups still in flight (each bounded by three step limits).
    let settle = w.limit * 3 + Duration::from_secs(5);
    let all = spec.concurrency.max(1) as u32;
    let _ = tokio::time::timeout(settle, sem.acquire_many(all)).await;
}

/// One user agent of a worker: its index here and overall, and what it
/// follows (empty: nothing, or `idle`).
struct OneUa {
    i: usize,
    g: usize,
    channels: usize,
    broadcasts: BTreeMap<String, String>,
    permit: OwnedSemaphorePermit,
}

/// Brings one user agent up and holds it (booking broadcast frames for
/// `fanout`) until `release`.
async fn open_and_hold(ua: OneUa, w: Arc<Worker0>, mut release: watch::Receiver<bool>) {
    let OneUa {
        i,
        g,
        channels,
        broadcasts,
        permit,
    } = ua;
    let node = g % w.targets.len();
    let src = w.srcs[node][g % w.srcs[node].len()];
    let follower = !broadcasts.is_empty();
    let t0 = Instant::now();
    let ids: Vec<uuid::Uuid> = (0..channels).map(|_| proto::new_channel_id()).collect();
    let regs: Vec<(uuid::Uuid, &str)> = ids.iter().map(|u| (*u, &*w.key)).collect();
    // Boxed so the (large) handshake state is freed once set up: the
    // task then holds little more than the socket while it idles.
    let up = Box::pin(fleet::bring_up_following(
        &w.targets[node],
        src,
        &broadcasts,
        &regs,
        w.limit,
    ))
    .await;
    drop(permit);
    drop(regs);
    drop(ids);
    drop(broadcasts);
    let c = &w.c;
    let mut ws = match up {
        Ok((ws, _, _)) => ws,
        Err(f) => {
            w.failures.add(f.key());
            c.failed.fetch_add(1, Relaxed);
            c.consecutive_failures.fetch_add(1, Relaxed);
            return;
        }
    };
    w.latency.record(i, t0.elapsed().as_micros() as u64);
    c.consecutive_failures.store(0, Relaxed);
    c.open.fetch_add(1, Relaxed);
    c.established.fetch_add(1, Relaxed);
    if follower {
        c.followers.fetch_add(1, Relaxed);
    }
    stats::fetch_max(&c.last_established_us, w.clock.now_us());
    let ended = match &w.recorder {
        Some(rec) => follow::watch(&mut ws, follower, rec, &mut release).await,
        None => fleet::hold(&mut ws, &mut release).await,
    };
    c.open.fetch_sub(1, Relaxed);
    match ended {
        Some(reason) => w.drops.add(reason),
        None => fleet::close(ws).await,
    }
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

/// How a parent reaches one worker to release it.
enum Worker {
    Local(watch::Sender<bool>),
    Child(tokio::process::Child),
}

impl Worker {
    async fn release(&mut self) {
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

/// How many worker processes and source addresses a fleet of `total`
/// user agents needs.
pub struct Sizing {
    pub procs: usize,
    pub srcs: usize,
    /// Ephemeral ports per source address.
    pub ports: usize,
}

impl Sizing {
    /// Unless given, as many processes as the open-file limit requires and
    /// as many source addresses as the ephemeral port range requires; warns
    /// when the processes cannot hold them all.
    pub fn new(total: usize, procs: Option<usize>, srcs: Option<usize>, nofile: FileLimit) -> Self {
        // Leave room for the runtime, stdio and the odd file besides sockets.
        let per_proc = nofile.soft.saturating_sub(100).max(1) as usize;
        let procs = procs.unwrap_or(total.div_ceil(per_proc)).clamp(1, 1000);
        let ports = net::ephemeral_port_count();
        let srcs = srcs
            .unwrap_or_else(|| net::source_addrs_needed(total))
            .clamp(1, 250);
        if procs * per_proc < total {
            eprintln!(
                "warning: {procs} processes x {per_proc} files cannot hold {total} connections; raise --procs"
            );
        }
        Sizing { procs, srcs, ports }
    }
}

/// The parent's view of one worker.
#[derive(Default, Clone)]
pub struct WorkerState {
    pub established: u64,
    pub failed: u64,
    pub open: u64,
    /// `fanout`: of `established`, the followers.
    pub followers: u64,
    /// Growth of the worker's resident memory while connecting, KiB.
    pub rss_growth_kib: u64,
    pub launched: bool,
    pub finished: bool,
    /// `fanout`: broadcast frames so far, then every arrival when released.
    pub counts: FanoutCounts,
    pub arrivals: Option<Arrivals>,
}

/// The parent side: every worker's state and what they reported, merged.
pub struct Workers {
    pub state: Vec<WorkerState>,
    pub failures: BTreeMap<String, u64>,
    pub drops: BTreeMap<String, u64>,
    /// Workers that failed or did not exit.
    pub errors: BTreeMap<String, u64>,
    pub subprotocols: BTreeMap<String, u64>,
    /// Setup latency of every worker's user agents, once one has launched.
    pub setup: Option<hdrhistogram::Histogram<u64>>,
    pub last_established_us: u64,
    /// Server memory against open connections, sampled while connecting
    /// and holding.
    pub memory: Vec<MemoryPoint>,
    started: Instant,
    rx: mpsc::UnboundedReceiver<(usize, WorkerEvent)>,
    workers: Vec<Worker>,
}

impl Workers {
    /// Starts `procs` workers sharing `total` user agents as evenly as they
    /// can: each is told `template` with its own share (`count`,
    /// `first_index`).
    pub async fn spawn(procs: usize, total: usize, template: &WorkerSpec) -> Result<Workers> {
        let (tx, rx) = mpsc::unbounded_channel::<(usize, WorkerEvent)>();
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
        Ok(Workers {
            state: vec![WorkerState::default(); procs],
            failures: BTreeMap::new(),
            drops: BTreeMap::new(),
            errors: BTreeMap::new(),
            subprotocols: BTreeMap::new(),
            setup: None,
            last_established_us: 0,
            memory: Vec::new(),
            started: Instant::now(),
            rx,
            workers,
        })
    }

    pub fn sum(&self, f: impl Fn(&WorkerState) -> u64) -> u64 {
        self.state.iter().map(f).sum()
    }

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
                rss_start_kib,
                rss_kib,
                followers,
                subprotocols,
                ..
            } => {
                s.established = established;
                s.failed = failed;
                s.open = open;
                s.followers = followers;
                s.rss_growth_kib = rss_kib.saturating_sub(rss_start_kib);
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

    /// Waits up to `wait` for one event and takes it in; false once every
    /// worker is gone.
    pub async fn next_event(&mut self, wait: Duration) -> bool {
        match tokio::time::timeout(wait, self.rx.recv()).await {
            Ok(Some((w, ev))) => {
                self.absorb(w, ev);
                true
            }
            Ok(None) => false,
            Err(_) => true,
        }
    }

    /// Takes in events for `d`.
    pub async fn absorb_for(&mut self, d: Duration) {
        let end = Instant::now() + d;
        while let Ok(Some((w, ev))) = tokio::time::timeout_at(end.into(), self.rx.recv()).await {
            self.absorb(w, ev);
        }
    }

    fn sample_memory(&mut self, server: &Servers) {
        let open = self.sum(|s| s.open);
        if let Some(rss) = server.rss_kib() {
            self.memory.push(MemoryPoint {
                connections: open,
                rss_kib: rss,
                t_ms: self.started.elapsed().as_millis() as u64,
            });
        }
    }

    /// Until every worker has finished connecting (or `deadline`): events
    /// taken in, server memory sampled, progress printed every 2 s.
    pub async fn until_launched(&mut self, server: &Servers, deadline: Instant) {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        let mut last_print = Instant::now();
        while !self.state.iter().all(|s| s.launched || s.finished) && Instant::now() < deadline {
            tokio::select! {
                ev = self.rx.recv() => match ev {
                    Some((w, ev)) => self.absorb(w, ev),
                    None => break,
                },
                _ = tick.tick() => {
                    self.sample_memory(server);
                    if last_print.elapsed() >= Duration::from_secs(2) {
                        eprintln!(
                            "  open {}, established {}, failed {}",
                            self.sum(|s| s.open),
                            self.sum(|s| s.established),
                            self.sum(|s| s.failed)
                        );
                        last_print = Instant::now();
                    }
                }
            }
        }
    }

    /// Holds the fleet until `until`, taking in events and sampling server
    /// memory.
    pub async fn hold_until(&mut self, server: &Servers, until: Instant) {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        while Instant::now() < until {
            tokio::select! {
                ev = self.rx.recv() => match ev {
                    Some((w, ev)) => self.absorb(w, ev),
                    None => break,
                },
                _ = tokio::time::sleep_until(until.into()) => {}
                _ = tick.tick() => self.sample_memory(server),
            }
        }
    }

    /// Releases every worker, collects their final reports (for up to 30 s)
    /// and waits for the processes to exit.
    pub async fn release(&mut self) {
        for w in self.workers.iter_mut() {
            w.release().await;
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.state.iter().all(|s| s.finished) && Instant::now() < deadline {
            match tokio::time::timeout_at(deadline.into(), self.rx.recv()).await {
                Ok(Some((w, ev))) => self.absorb(w, ev),
                _ => break,
            }
        }
        self.reap().await;
    }

    /// Waits up to 5 s for each worker process to exit, killing one that
    /// does not and noting it in `errors`.
    async fn reap(&mut self) {
        for w in std::mem::take(&mut self.workers) {
            if let Worker::Child(mut child) = w {
                if tokio::time::timeout(Duration::from_secs(5), child.wait())
                    .await
                    .is_err()
                {
                    let _ = child.kill().await;
                    self.errors.insert("worker did not exit".into(), 1);
                }
            }
        }
    }
}

async fn spawn_worker(
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

#[cfg(test)]
mod tests {
    use super::*;

    fn f(pairs: &[(&str, u64)]) -> BTreeMap<String, u64> {
        pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
    }

    const LIM: FileLimit = FileLimit {
        soft: 1100,
        hard: 1100,
    };

    #[test]
    fn sizing_spreads_over_processes_by_the_open_file_limit() {
        // 1000 connections per process under a 1100-file limit.
        assert_eq!(Sizing::new(2500, None, None, LIM).procs, 3);
        assert_eq!(Sizing::new(1000, None, None, LIM).procs, 1);
        assert_eq!(Sizing::new(10, Some(0), None, LIM).procs, 1);
        let given = Sizing::new(10, Some(4), Some(7), LIM);
        assert_eq!((given.procs, given.srcs), (4, 7));
        assert_eq!(Sizing::new(10, None, Some(999), LIM).srcs, 250);
        assert!(Sizing::new(10, None, None, LIM).ports > 0);
    }

    #[tokio::test]
    async fn workers_with_nobody_to_open_report_final_and_release() {
        let template = WorkerSpec {
            urls: vec!["ws://127.0.0.1:9/".into()],
            count: 0,
            first_index: 0,
            source_addrs: 1,
            concurrency: 1,
            rate: 0.0,
            channels: 1,
            timeout: 1.0,
            max_consecutive_failures: 1,
            max_connect_secs: 1.0,
            max_life_secs: 1.0,
            follow: None,
            progress_ms: 0,
        };
        // Two workers with nobody to open: each reports its Final at once.
        let mut w = Workers::spawn(2, 0, &template).await.unwrap();
        w.release().await;
        assert!(w.state.iter().all(|s| s.finished));
        assert!(w.errors.is_empty(), "{:?}", w.errors);
        assert_eq!(w.sum(|s| s.established), 0);
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
