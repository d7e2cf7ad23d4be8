//! Scenario `storm`: every user agent drops and comes back within a short
//! window, as after a network blip or a server restart behind a proxy. The
//! numbers that matter are how long `hello` takes and whether the server
//! keeps each user agent's uaid (a new one makes Firefox drop its
//! subscriptions).

use crate::fleet;
use crate::harness::{self, Run};
use crate::net;
use crate::proto::{self, Target};
use crate::results::{r2, Common, CpuMeter};
use crate::stats::{self, Hist, LatencySummary, RateSampler, Tally};
use anyhow::{bail, Result};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio::task::JoinSet;
use uuid::Uuid;

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq)]
pub enum CloseMode {
    /// Websocket close handshake, as a browser shutting down.
    Clean,
    /// TCP close without a close frame, as a tab crash or network drop.
    Drop,
}

#[derive(clap::Args, Clone, Debug)]
pub struct StormArgs {
    #[command(flatten)]
    pub common: Common,
    /// User agents that reconnect.
    #[arg(long, default_value_t = 1000)]
    pub uas: usize,
    /// Seconds over which the reconnects are spread evenly.
    #[arg(long, default_value_t = 5.0)]
    pub window: f64,
    /// How each user agent goes away before coming back.
    #[arg(long, value_enum, default_value_t = CloseMode::Drop)]
    pub close: CloseMode,
    /// Seconds to stay connected after the window before finishing.
    #[arg(long, default_value_t = 2.0)]
    pub settle: f64,
    /// Source addresses 127.0.0.1..N (default: as many as the ephemeral port
    /// range requires for every user agent's old and new connection).
    #[arg(long)]
    pub source_addrs: Option<usize>,
}

#[derive(Default)]
struct Counts {
    attempted: AtomicU64,
    reconnected: AtomicU64,
    failed: AtomicU64,
    uaid_changed: AtomicU64,
    dropped_before: AtomicU64,
    dropped_after: AtomicU64,
}

pub async fn run(args: StormArgs) -> Result<()> {
    let common = &args.common;
    if args.uas == 0 || common.channels == 0 {
        bail!("--uas and --channels must be at least 1");
    }
    let per_ua = common.channels;
    let mut run = Run::start_without_senders(
        "storm",
        common,
        serde_json::json!({
            "uas": args.uas, "channels_per_ua": per_ua, "window_s": args.window,
            "close": format!("{:?}", args.close).to_lowercase(), "settle_s": args.settle,
            "concurrency": common.concurrency,
        }),
    )
    .await?;
    // Dropped sockets linger briefly while new ones open: leave headroom.
    if (args.uas + 200) as u64 > run.nofile.soft {
        bail!(
            "{} user agents need more than this process's {} open files",
            args.uas,
            run.nofile.soft
        );
    }
    let (targets, server, limit) = (run.targets.clone(), run.server.clone(), run.limit);
    let (_, keys) = harness::vapids(1)?;
    let ids = harness::channel_ids(args.uas * per_ua);
    eprintln!("storm: connecting {} user agents", args.uas);
    let overflows_start = net::listen_overflows();
    let up_started = Instant::now();
    let mut spec = fleet::FleetSpec::new(args.uas, per_ua, common.concurrency, limit);
    // A dropped connection's port stays in TIME_WAIT while its successor
    // takes another.
    let srcs = args
        .source_addrs
        .unwrap_or_else(|| net::source_addrs_needed(args.uas * 2));
    spec.srcs = net::source_addrs(targets[0].addr, srcs);
    run.result.metric("source_addrs", spec.srcs.len() as u64);
    let mut setup = fleet::bring_up_fleet(&targets, &spec, ids.clone(), keys).await;
    let up_secs = up_started.elapsed().as_secs_f64();
    setup.require_any("connect")?;
    let (up_count, ups) = (setup.connected, std::mem::take(&mut setup.ups));
    // Setup failures and the storm's own share one tally, as before.
    let errors = Arc::new(std::mem::take(&mut setup.errors));
    let rss_before = server.rss_each();
    let overflows_up = net::listen_overflows();

    let cpu = CpuMeter::start(&server);
    let counts = Arc::new(Counts::default());
    let hello_latency = Arc::new(Hist::new());
    let window = stats::secs(args.window);
    // A moment for every task to be waiting before the first reconnect.
    let storm_start = Instant::now() + Duration::from_millis(500);
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = JoinSet::new();
    for (i, (u, up)) in ups
        .into_iter()
        .enumerate()
        .filter_map(|(u, up)| up.map(|x| (u, x)))
        .enumerate()
    {
        let at = storm_start + window.mul_f64(i as f64 / up_count as f64);
        let (target, ids, counts, errors, hello_latency) = (
            proto::target_of(&targets, u).clone(),
            ids.clone(),
            counts.clone(),
            errors.clone(),
            hello_latency.clone(),
        );
        let stop = stop_rx.clone();
        let ua = Storming {
            u,
            src: spec.srcs[u % spec.srcs.len()],
            at,
            mode: args.close,
            limit,
            per_ua,
        };
        tasks.spawn(storm_one(
            ua,
            up,
            target,
            ids,
            counts,
            errors,
            hello_latency,
            stop,
        ));
    }

    let sampler = watch_storm(&counts, up_count, storm_start, window, limit).await;
    let storm_secs = storm_start.elapsed().as_secs_f64();
    let overflows = [overflows_start, overflows_up, net::listen_overflows()];
    record_overflows(&mut run.result, overflows);
    cpu.record(&mut run.result);
    tokio::time::sleep(stats::secs(args.settle.min(600.0))).await;
    let rss_after = server.rss_each();
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(15), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    tasks.abort_all();

    let lat = LatencySummary::from_hist(&hello_latency.merged());
    run.errors_from(&[&errors]);
    let changed = counts.uaid_changed.load(Relaxed);
    run.error_counts(&[("uaid changed on reconnect", changed)]);
    let reconnected = counts.reconnected.load(Relaxed);
    let failed = counts.failed.load(Relaxed);
    run.result.metric("uas_connected", up_count as u64);
    run.result.metric("bring_up_s", r2(up_secs));
    run.result
        .metric("reconnect_attempts", counts.attempted.load(Relaxed));
    run.result.metric("reconnected", reconnected);
    run.result.metric("failed", failed);
    run.result.metric("uaid_changed", changed);
    run.result
        .metric("dropped_before_storm", counts.dropped_before.load(Relaxed));
    run.result.metric(
        "dropped_after_reconnect",
        counts.dropped_after.load(Relaxed),
    );
    run.result.metric("storm_s", r2(storm_secs));
    run.result.metric(
        "reconnects_per_s",
        r2(if storm_secs > 0.0 {
            reconnected as f64 / storm_secs
        } else {
            0.0
        }),
    );
    run.result
        .server_rss(rss_before.as_deref(), rss_after.as_deref());
    run.result
        .latency
        .insert("reconnect_hello".into(), lat.clone());
    run.latency("setup", &setup.latency);
    run.result.rates = sampler.points;
    run.finish(format!(
        "storm[{}]: {reconnected}/{up_count} reconnected within {:.1}s ({failed} failed, {changed} uaid changed); hello {}",
        common.target,
        args.window,
        lat.short()
    ))
}

/// Accept-queue overflows (machine-wide counters read at the start, after
/// bring-up and after the storm) per phase, so a full queue shows in the
/// phase that filled it.
fn record_overflows(result: &mut crate::results::RunResult, at: [Option<u64>; 3]) {
    for (name, from, to) in [
        ("listen_overflows_bring_up", at[0], at[1]),
        ("listen_overflows_storm", at[1], at[2]),
    ] {
        if let (Some(a), Some(b)) = (from, to) {
            result.metric(name, b.saturating_sub(a));
        }
    }
}

/// One user agent of the storm: where and how it goes away and comes back.
struct Storming {
    u: usize,
    /// The source address it came up from, kept for its reconnect.
    src: Option<IpAddr>,
    at: Instant,
    mode: CloseMode,
    limit: Duration,
    per_ua: usize,
}

/// Holds until this user agent's moment, goes away, reconnects resuming its
/// uaid and channels, and holds again until `stop`.
#[allow(clippy::too_many_arguments)] // each is a shared handle the task owns
async fn storm_one(
    ua: Storming,
    up: fleet::Up,
    target: Target,
    ids: Arc<Vec<Uuid>>,
    counts: Arc<Counts>,
    errors: Arc<Tally>,
    hello_latency: Arc<Hist>,
    mut stop: watch::Receiver<bool>,
) {
    let Storming {
        u,
        src,
        at,
        mode,
        limit,
        per_ua,
    } = ua;
    let mut ws = up.ws;
    // Hold until this user agent's moment. The sender is kept alive
    // (never fired) so only the sleep or a server drop ends the wait.
    let (_never, mut early) = watch::channel(false);
    tokio::select! {
        _ = tokio::time::sleep_until(at.into()) => {}
        ended = fleet::hold(&mut ws, &mut early) => {
            if let Some(reason) = ended {
                counts.dropped_before.fetch_add(1, Relaxed);
                errors.add(format!("dropped before storm: {reason}"));
            }
            tokio::time::sleep_until(at.into()).await;
        }
    }
    match mode {
        CloseMode::Clean => fleet::close(ws).await,
        CloseMode::Drop => drop(ws),
    }
    counts.attempted.fetch_add(1, Relaxed);
    let mine = &ids[u * per_ua..(u + 1) * per_ua];
    let back = fleet::resume_from(
        &target,
        src,
        u,
        &up.uaid,
        mine,
        limit,
        &hello_latency,
        &counts.uaid_changed,
    );
    match back.await {
        Ok(mut ws) => {
            counts.reconnected.fetch_add(1, Relaxed);
            match fleet::hold(&mut ws, &mut stop).await {
                Some(reason) => {
                    counts.dropped_after.fetch_add(1, Relaxed);
                    errors.add(format!("dropped after reconnect: {reason}"));
                }
                None => fleet::close(ws).await,
            }
        }
        Err(f) => {
            counts.failed.fetch_add(1, Relaxed);
            errors.add(format!("reconnect {}", f.key()));
        }
    }
}

/// Samples reconnects/s until every user agent has reconnected or failed
/// after the window closed, or the last one could no longer finish.
async fn watch_storm(
    counts: &Counts,
    up_count: usize,
    storm_start: Instant,
    window: Duration,
    limit: Duration,
) -> RateSampler {
    let every = stats::sample_interval(window + Duration::from_secs(1));
    let mut sampler = RateSampler::new(&["reconnects"], &[0]);
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    let end_of_window = storm_start + window;
    // Every reconnect is bounded by two step limits after its moment.
    let hard_end = end_of_window + limit * 2 + Duration::from_secs(1);
    let mut last_print = Instant::now();
    loop {
        tick.tick().await;
        sampler.sample(&[counts.reconnected.load(Relaxed)]);
        let done = counts.reconnected.load(Relaxed) + counts.failed.load(Relaxed);
        if last_print.elapsed() >= Duration::from_secs(2) {
            eprintln!(
                "  reconnected {}/{up_count}",
                counts.reconnected.load(Relaxed)
            );
            last_print = Instant::now();
        }
        if (done as usize >= up_count && Instant::now() >= end_of_window)
            || Instant::now() >= hard_end
        {
            break;
        }
    }
    sampler
}
