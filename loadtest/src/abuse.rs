//! Scenario `abuse`: fairness under abuse (issue 24). Well-behaved
//! application servers, each with its own VAPID key, push at a steady
//! open-loop rate to their own subscriptions on connected user agents; a
//! baseline phase measures their end-to-end latency and delivery, then each
//! flood phase measures them again while one flooder pushes as fast as its
//! connections allow: to one subscription, to many, and (with
//! --anonymous) to many without VAPID. The target is the issue's: the
//! well-behaved lose nothing and their p99 stays within twice the baseline.
//!
//! Sends are matched to notifications as in `throughput` (a pool of
//! pre-encrypted payloads per channel, told apart by their salt); each
//! send's slot also carries its phase, so a late arrival counts where it
//! was sent.

use crate::crypto::{Pool, Vapid};
use crate::fleet::{self, FleetSpec, Setup};
use crate::harness::{self, RateWatch, Run};
use crate::proto::{self, Ws};
use crate::results::{r2, Common, CpuMeter};
use crate::sender::{self, Endpoint, HttpClient, PostOptions, Reply, SenderPlan};
use crate::stats::{self, Clock, Hist, LatencySummary, Tally};
use crate::throughput::{channel_of, resolve_endpoints};
use anyhow::{bail, Result};
use http::HeaderValue;
use serde_json::{Map, Value};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::*};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio::task::JoinSet;
use uuid::Uuid;

/// Herald's default receiver quotas (`subscription_rate_limit` 120/m,
/// `ua_rate_limit` 240/m): well-behaved senders above them would be
/// throttled themselves, which is not what this scenario measures.
const DEFAULT_SUBSCRIPTION_PER_S: f64 = 2.0;
const DEFAULT_UA_PER_S: f64 = 4.0;

#[derive(clap::Args, Clone, Debug)]
pub struct AbuseArgs {
    #[command(flatten)]
    pub common: Common,
    /// Well-behaved user agents (each with --channels subscriptions).
    #[arg(long, default_value_t = 50)]
    pub uas: usize,
    /// Well-behaved senders, each with its own VAPID key; channel c is
    /// sender c % senders's.
    #[arg(long, default_value_t = 10)]
    pub senders: usize,
    /// Well-behaved messages/s over all senders, open loop (each POST sent
    /// on schedule, whatever the previous one's answer). Spread evenly over
    /// the subscriptions; keep it under the receiver quotas.
    #[arg(long, default_value_t = 50.0)]
    pub rate: f64,
    /// Seconds each phase sends for.
    #[arg(long, default_value_t = 20.0)]
    pub duration: f64,
    /// Seconds after each phase for well-behaved notifications still on
    /// their way; those that never come are lost.
    #[arg(long, default_value_t = 10.0)]
    pub drain: f64,
    /// Pre-encrypted payloads per well-behaved channel: the most messages
    /// one channel may have outstanding.
    #[arg(long, default_value_t = 8)]
    pub pool: usize,
    /// Plaintext bytes per message (well-behaved and flood).
    #[arg(long, default_value_t = 256)]
    pub payload: usize,
    /// TTL header of each message, seconds.
    #[arg(long, default_value_t = 60)]
    pub ttl: u32,
    /// The flooder's concurrent connections, each with one request in
    /// flight, as fast as answers come back.
    #[arg(long, default_value_t = 64)]
    pub flood_connections: usize,
    /// Threads of the flooder's own runtime.
    #[arg(long, default_value_t = 1)]
    pub flood_threads: usize,
    /// The flooder's user agents (connected, acking what gets through).
    #[arg(long, default_value_t = 20)]
    pub flood_uas: usize,
    /// Subscriptions of each flood user agent; the "many" phase floods all
    /// of them, the "one" phase the first.
    #[arg(long, default_value_t = 5)]
    pub flood_channels: usize,
    /// Add a phase whose flooder pushes without VAPID (to subscriptions
    /// registered without a key), which only per-address limits can hold.
    #[arg(long)]
    pub anonymous: bool,
    /// Most p99 with flood / p99 without that still counts as fair (the
    /// issue's target: 2).
    #[arg(long, default_value_t = 2.0)]
    pub max_p99_ratio: f64,
}

/// What the flooder does in a phase.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Flood {
    None,
    One,
    Many,
    Anonymous,
}

impl Flood {
    fn phase_name(self) -> &'static str {
        match self {
            Flood::None => "baseline",
            Flood::One => "flood_one",
            Flood::Many => "flood_many",
            Flood::Anonymous => "flood_anonymous",
        }
    }
}

/// The flooder's answers in one phase.
#[derive(Default)]
struct FloodTally {
    sent: AtomicU64,
    created: AtomicU64,
    throttled: AtomicU64,
    transport: AtomicU64,
    /// 429s without `Retry-After`, which RFC 6585 says they should carry.
    no_retry_after: AtomicU64,
    /// Answers by "status errno N".
    answers: Tally,
    /// Flood notifications that reached the flood user agents.
    delivered: AtomicU64,
}

impl FloodTally {
    fn record(&self, r: &Result<Reply, String>) {
        self.sent.fetch_add(1, Relaxed);
        match r {
            Ok(reply) => {
                if reply.status == 201 {
                    self.created.fetch_add(1, Relaxed);
                }
                if reply.status == 429 {
                    self.throttled.fetch_add(1, Relaxed);
                    if !reply.retry_after {
                        self.no_retry_after.fetch_add(1, Relaxed);
                    }
                }
                self.answers.add(reply.key());
            }
            Err(e) => {
                self.transport.fetch_add(1, Relaxed);
                self.answers.add(format!("transport: {e}"));
            }
        }
    }
}

/// The well-behaved senders' figures in one phase, and the flooder's.
#[derive(Default)]
struct PhaseStats {
    latency: Option<Hist>,
    sent: AtomicU64,
    accepted: AtomicU64,
    delivered: AtomicU64,
    lost: AtomicU64,
    /// Sends skipped because every pool slot of the channel was outstanding.
    skipped: AtomicU64,
    /// Well-behaved POSTs that were not 201, by answer.
    refused: Tally,
    flood: FloodTally,
}

impl PhaseStats {
    fn new() -> Self {
        PhaseStats {
            latency: Some(Hist::new()),
            ..Default::default()
        }
    }

    fn hist(&self) -> &Hist {
        self.latency.as_ref().expect("made by PhaseStats::new")
    }
}

/// A slot holds when its message was sent and in which phase: the phase
/// (plus one, so that a used slot is never 0) in the top byte, the send
/// time in microseconds below.
fn stamp(phase: usize, sent_us: u64) -> u64 {
    ((phase as u64 + 1) << 56) | (sent_us & ((1 << 56) - 1))
}

fn unstamp(v: u64) -> Option<(usize, u64)> {
    let phase = (v >> 56) as usize;
    (phase > 0).then(|| (phase - 1, v & ((1 << 56) - 1)))
}

struct Shared {
    clock: Clock,
    pool: Pool,
    per_ua: usize,
    channel_ids: Arc<Vec<Uuid>>,
    slots: Vec<AtomicU64>,
    phases: Vec<PhaseStats>,
    /// Index of the phase running now, for flood deliveries.
    current: AtomicUsize,
    unexpected: AtomicU64,
    duplicates: AtomicU64,
    malformed: AtomicU64,
    ua_errors: Tally,
    // Totals over the run, for rates over time.
    wb_delivered: AtomicU64,
    flood_sent: AtomicU64,
    flood_created: AtomicU64,
}

impl Shared {
    fn slot(&self, channel: usize, s: usize) -> &AtomicU64 {
        &self.slots[channel * self.pool.per_channel + s]
    }

    /// A notification to well-behaved user agent `ua`: matched to its send,
    /// timed into the phase it was sent in.
    fn on_well_behaved(&self, ua: usize, text: &str) -> Option<String> {
        let n = proto::notification(text, &self.malformed)?;
        let now = self.clock.now_us();
        let ack = proto::ack_json(&n.channel_id, &n.version);
        let matched = channel_of(&self.channel_ids, ua, self.per_ua, &n.channel_id).and_then(|c| {
            let salt = crate::crypto::salt_from_data(n.data.as_deref()?)?;
            Some((c, self.pool.slot_of(c, &salt)?))
        });
        let Some((c, s)) = matched else {
            self.unexpected.fetch_add(1, Relaxed);
            return Some(ack);
        };
        match unstamp(self.slot(c, s).swap(0, AcqRel)) {
            Some((phase, sent)) => {
                let p = &self.phases[phase];
                p.hist().record(ua, now.saturating_sub(sent));
                p.delivered.fetch_add(1, Relaxed);
                self.wb_delivered.fetch_add(1, Relaxed);
            }
            None => {
                self.duplicates.fetch_add(1, Relaxed);
            }
        }
        Some(ack)
    }

    /// A notification to a flood user agent: counted for the phase running.
    fn on_flood(&self, text: &str) -> Option<String> {
        let n = proto::notification(text, &self.malformed)?;
        let p = &self.phases[self.current.load(Relaxed)];
        p.flood.delivered.fetch_add(1, Relaxed);
        Some(proto::ack_json(&n.channel_id, &n.version))
    }

    /// Slots of `phase` still outstanding; with `clear`, they are given up
    /// (lost) so a later arrival counts as a duplicate.
    fn outstanding(&self, phase: usize, clear: bool) -> u64 {
        let mut n = 0;
        for s in &self.slots {
            let v = s.load(Acquire);
            if unstamp(v).is_some_and(|(p, _)| p == phase)
                && (!clear || s.compare_exchange(v, 0, AcqRel, Acquire).is_ok())
            {
                n += 1;
            }
        }
        n
    }
}

/// Which kind of user agent a connection plays.
#[derive(Clone, Copy)]
enum Role {
    WellBehaved(usize),
    Flood,
}

async fn ua_loop(role: Role, ws: Ws, sh: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    fleet::ack_until(ws, &mut stop, &sh.ua_errors, |t| match role {
        Role::WellBehaved(ua) => sh.on_well_behaved(ua, t),
        Role::Flood => sh.on_flood(t),
    })
    .await;
}

/// One well-behaved sender: its channels and its Authorization per origin.
#[derive(Clone)]

/// Targets of a flood: endpoints, a body for each, and the flooder's
/// Authorization per origin (none without VAPID).
struct FloodTargets {
    endpoints: Vec<Endpoint>,
    bodies: Vec<bytes::Bytes>,
    auth: Option<Vec<HeaderValue>>,
}

/// What every sending task of a phase needs.
#[derive(Clone)]
struct PhaseCtx {
    sh: Arc<Shared>,
    phase: usize,
    deadline: Instant,
    options: PostOptions,
    limit: Duration,
}

/// Sends on schedule, every `interval`, round-robin over the plan's
/// channels, each POST in its own task: a slow answer delays no later send,
/// so latency under flood is not hidden by the sender waiting.
async fn well_behaved(
    plan: SenderPlan,
    ctx: PhaseCtx,
    endpoints: Arc<Vec<Option<Endpoint>>>,
    client: HttpClient,
    first: Instant,
    interval: Duration,
) {
    let sh = &ctx.sh;
    let stats = &sh.phases[ctx.phase];
    let per = sh.pool.per_channel;
    let mut next_slot = vec![0usize; plan.channels.len()];
    let plan = Arc::new(plan);
    let mut posts = JoinSet::new();
    let mut next = first;
    let mut k = 0usize;
    loop {
        tokio::time::sleep_until(next.into()).await;
        if Instant::now() >= ctx.deadline {
            break;
        }
        next += interval;
        let i = k % plan.channels.len();
        k += 1;
        let c = plan.channels[i] as usize;
        let s = next_slot[i];
        let Some(ep) = endpoints[c].clone() else {
            continue;
        };
        let ts = stamp(ctx.phase, sh.clock.now_us());
        if sh
            .slot(c, s)
            .compare_exchange(0, ts, AcqRel, Acquire)
            .is_err()
        {
            stats.skipped.fetch_add(1, Relaxed);
            continue;
        }
        next_slot[i] = (s + 1) % per;
        stats.sent.fetch_add(1, Relaxed);
        let (ctx, client, plan) = (ctx.clone(), client.clone(), plan.clone());
        posts.spawn(async move {
            let sh = &ctx.sh;
            let stats = &sh.phases[ctx.phase];
            let body = sh.pool.body(c, s).clone();
            let auth = Some(&plan.auth[ep.origin]);
            let r = sender::post_reply(&client, &ep, k, auth, body, ctx.options, ctx.limit).await;
            match r {
                Ok(reply) if reply.status == 201 => {
                    stats.accepted.fetch_add(1, Relaxed);
                }
                other => {
                    let key = match other {
                        Ok(reply) => reply.key(),
                        Err(e) => format!("transport: {e}"),
                    };
                    stats.refused.add(format!("well-behaved POST: {key}"));
                    // Refused: not outstanding, unless it arrived anyway.
                    let _ = sh.slot(c, s).compare_exchange(ts, 0, AcqRel, Acquire);
                }
            }
        });
        while posts.try_join_next().is_some() {}
    }
    while posts.join_next().await.is_some() {}
}

/// One of the flooder's connections: POST after POST until the deadline,
/// walking the targets from its own offset.
async fn flood_connection(
    j: usize,
    of: usize,
    targets: Arc<FloodTargets>,
    ctx: PhaseCtx,
    client: HttpClient,
) {
    let tally = &ctx.sh.phases[ctx.phase].flood;
    let mut k = j;
    while Instant::now() < ctx.deadline {
        let t = k % targets.endpoints.len();
        let ep = &targets.endpoints[t];
        let auth = targets.auth.as_ref().map(|a| &a[ep.origin]);
        let body = targets.bodies[t].clone();
        let r = sender::post_reply(&client, ep, k / of, auth, body, ctx.options, ctx.limit).await;
        tally.record(&r);
        ctx.sh.flood_sent.fetch_add(1, Relaxed);
        if matches!(r, Ok(Reply { status: 201, .. })) {
            ctx.sh.flood_created.fetch_add(1, Relaxed);
        }
        if r.is_err() {
            // A refused connection would otherwise spin.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        k += of;
    }
}

/// The flooder, on its own threads and runtime until the phase's deadline:
/// sharing the well-behaved side's runtime, its tasks would queue ahead of
/// the user agents' reads and the generator's own delay would pass for
/// the server's.
fn spawn_flooder(
    targets: Arc<FloodTargets>,
    ctx: PhaseCtx,
    args: &AbuseArgs,
) -> std::thread::JoinHandle<()> {
    let (conns, threads) = (args.flood_connections, args.flood_threads.max(1));
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build();
        let rt = match rt {
            Ok(rt) => rt,
            Err(e) => {
                eprintln!("abuse: cannot start the flooder's runtime: {e}");
                return;
            }
        };
        rt.block_on(async move {
            // Its connections belong to this runtime.
            let client = sender::client(conns);
            let mut tasks = JoinSet::new();
            for j in 0..conns {
                let (t, ctx, client) = (targets.clone(), ctx.clone(), client.clone());
                tasks.spawn(flood_connection(j, conns, t, ctx, client));
            }
            while tasks.join_next().await.is_some() {}
        });
        rt.shutdown_timeout(Duration::from_secs(1));
    })
}

/// Everything connected and ready to send.
struct Fleets {
    sh: Arc<Shared>,
    plans: Vec<SenderPlan>,
    endpoints: Arc<Vec<Option<Endpoint>>>,
    setups: Vec<(&'static str, Setup)>,
    /// Flood targets by phase kind: one, many, anonymous.
    one: Arc<FloodTargets>,
    many: Arc<FloodTargets>,
    anonymous: Option<Arc<FloodTargets>>,
}

pub async fn run(args: AbuseArgs) -> Result<()> {
    check_args(&args)?;
    let mut phases = vec![Flood::None, Flood::One, Flood::Many];
    if args.anonymous {
        phases.push(Flood::Anonymous);
    }
    let mut run = Run::start("abuse", &args.common, params(&args)).await?;
    let uas = args.uas + args.flood_uas * (1 + args.anonymous as usize);
    run.need_files(
        uas + args.flood_connections + args.senders * 4 + 100,
        "the user agents and senders",
    )?;
    let mut fleets = connect(&args, &run, phases.len()).await?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = JoinSet::new();
    for (name, setup) in fleets.setups.iter_mut() {
        for (u, up) in std::mem::take(&mut setup.ups).into_iter().enumerate() {
            let role = match *name {
                "well-behaved" => Role::WellBehaved(u),
                _ => Role::Flood,
            };
            if let Some(up) = up {
                tasks.spawn(ua_loop(role, up.ws, fleets.sh.clone(), stop_rx.clone()));
            }
        }
    }
    let rates = {
        let sh = fleets.sh.clone();
        let every =
            stats::sample_interval(stats::secs((args.duration + 1.0) * phases.len() as f64));
        let names = ["well-behaved delivered", "flood sent", "flood accepted"];
        RateWatch::spawn(&names, every, move || {
            vec![
                sh.wb_delivered.load(Relaxed),
                sh.flood_sent.load(Relaxed),
                sh.flood_created.load(Relaxed),
            ]
        })
    };
    let plans = std::mem::take(&mut fleets.plans);
    let plans = Arc::new(plans);
    let mut cpu = Vec::new();
    let whole = CpuMeter::start(&run.server);
    for (p, flood) in phases.iter().enumerate() {
        cpu.push(run_phase(&args, &run, &fleets, &plans, p, *flood).await);
    }
    whole.record(&mut run.result);
    run.result.rates = rates.stop().await;
    fleet::stop_all(&stop_tx, &mut tasks, Duration::from_secs(10)).await;
    let summary = record(&args, &mut run, &fleets.sh, &phases, &cpu, &fleets.setups);
    run.finish(summary)
}

fn check_args(args: &AbuseArgs) -> Result<()> {
    let c = args.common.channels;
    if args.uas == 0 || args.senders == 0 || c == 0 {
        bail!("--uas, --senders and --channels must be at least 1");
    }
    if args.flood_uas == 0 || args.flood_channels == 0 || args.flood_connections == 0 {
        bail!("--flood-uas, --flood-channels and --flood-connections must be at least 1");
    }
    let positive = |x: f64| x.is_finite() && x > 0.0;
    if !positive(args.rate) || !positive(args.duration) {
        bail!("--rate and --duration must be above 0");
    }
    if !(1..=64).contains(&args.pool) {
        bail!("--pool must be 1..=64");
    }
    if args.senders > args.uas * c {
        bail!("--senders must not outnumber the well-behaved subscriptions (--uas × --channels)");
    }
    Ok(())
}

fn params(args: &AbuseArgs) -> Value {
    serde_json::json!({
        "uas": args.uas, "channels_per_ua": args.common.channels, "senders": args.senders,
        "rate": args.rate, "duration_s": args.duration, "drain_s": args.drain,
        "pool": args.pool, "payload_bytes": args.payload, "ttl": args.ttl,
        "flood_connections": args.flood_connections,
        "flood_threads": args.flood_threads, "flood_uas": args.flood_uas,
        "flood_channels": args.flood_channels, "anonymous": args.anonymous,
        "max_p99_ratio": args.max_p99_ratio, "concurrency": args.common.concurrency,
    })
}

/// Keys, payloads, the well-behaved fleet and the flooder's fleets.
async fn connect(args: &AbuseArgs, run: &Run<'_>, phases: usize) -> Result<Fleets> {
    let common = &args.common;
    let channels = args.uas * common.channels;
    let (vapids, keys) = harness::vapids(args.senders)?;
    let flooder = Vapid::generate()?;
    let pool = harness::payload_pool(channels, args.pool, args.payload, false).await?;
    let channel_ids = harness::channel_ids(channels);
    eprintln!(
        "abuse: connecting {} well-behaved user agents and {} of the flooder's",
        args.uas,
        args.flood_uas * (1 + args.anonymous as usize)
    );
    let wb = run.bring_up(args.uas, channel_ids.clone(), keys).await;
    wb.require_any("connect")?;
    let (endpoints, origins) =
        resolve_endpoints(&wb.ups, common.channels, &run.push_bases, &wb.errors).await?;
    let plans = sender::plan_senders(&vapids, &origins, endpoints.iter().map(Option::is_some))?;
    let (flood_setup, many) = flood_fleet(args, run, Some(&flooder)).await?;
    let one = Arc::new(FloodTargets {
        endpoints: many.endpoints[..1].to_vec(),
        bodies: many.bodies[..1].to_vec(),
        auth: many.auth.clone(),
    });
    let mut setups = vec![("well-behaved", wb), ("flood", flood_setup)];
    let anonymous = if args.anonymous {
        let (s, t) = flood_fleet(args, run, None).await?;
        setups.push(("anonymous flood", s));
        Some(Arc::new(t))
    } else {
        None
    };
    let sh = Arc::new(Shared {
        clock: Clock::new(),
        slots: (0..channels * args.pool)
            .map(|_| AtomicU64::new(0))
            .collect(),
        pool,
        per_ua: common.channels,
        channel_ids,
        phases: (0..phases).map(|_| PhaseStats::new()).collect(),
        current: AtomicUsize::new(0),
        unexpected: AtomicU64::new(0),
        duplicates: AtomicU64::new(0),
        malformed: AtomicU64::new(0),
        ua_errors: Tally::default(),
        wb_delivered: AtomicU64::new(0),
        flood_sent: AtomicU64::new(0),
        flood_created: AtomicU64::new(0),
    });
    Ok(Fleets {
        sh,
        plans,
        endpoints: Arc::new(endpoints),
        setups,
        one,
        many: Arc::new(many),
        anonymous,
    })
}

/// The flooder's user agents and their subscriptions, registered with its
/// key (or with none).
async fn flood_fleet(
    args: &AbuseArgs,
    run: &Run<'_>,
    flooder: Option<&Vapid>,
) -> Result<(Setup, FloodTargets)> {
    let n = args.flood_uas * args.flood_channels;
    let key = flooder.map(|v| v.public_b64.clone()).unwrap_or_default();
    let spec = FleetSpec::new(
        args.flood_uas,
        args.flood_channels,
        args.common.concurrency,
        run.limit,
    );
    let ids = harness::channel_ids(n);
    let setup = fleet::bring_up_fleet(&run.targets, &spec, ids, Arc::new(vec![key])).await;
    setup.require_any("connect for the flooder")?;
    let (eps, origins) = resolve_endpoints(
        &setup.ups,
        args.flood_channels,
        &run.push_bases,
        &setup.errors,
    )
    .await?;
    let pool = harness::payload_pool(n, 1, args.payload, false).await?;
    let mut targets = FloodTargets {
        endpoints: Vec::new(),
        bodies: Vec::new(),
        auth: None,
    };
    for (c, ep) in eps.into_iter().enumerate() {
        if let Some(ep) = ep {
            targets.endpoints.push(ep);
            targets.bodies.push(pool.body(c, 0).clone());
        }
    }
    if targets.endpoints.is_empty() {
        bail!("none of the flooder's subscriptions has an endpoint");
    }
    if let Some(v) = flooder {
        let auth = origins
            .list
            .iter()
            .map(|(o, _)| v.authorization(o))
            .collect::<Result<_>>()?;
        targets.auth = Some(auth);
    }
    Ok((setup, targets))
}

/// One phase: the well-behaved senders for --duration (and the flooder,
/// if any, alongside), then up to --drain for what is still on its way.
/// Returns the CPU cores the servers and the generator used while sending.
async fn run_phase(
    args: &AbuseArgs,
    run: &Run<'_>,
    fleets: &Fleets,
    plans: &Arc<Vec<SenderPlan>>,
    p: usize,
    flood: Flood,
) -> (Option<f64>, f64) {
    let sh = &fleets.sh;
    sh.current.store(p, Relaxed);
    eprintln!(
        "abuse: phase {}: {} msg/s well-behaved for {}s{}",
        flood.phase_name(),
        args.rate,
        args.duration,
        match flood {
            Flood::None => String::new(),
            _ => format!(", flooder on {} connections", args.flood_connections),
        }
    );
    let start = Instant::now();
    let ctx = PhaseCtx {
        sh: sh.clone(),
        phase: p,
        deadline: start + stats::secs(args.duration),
        options: PostOptions {
            ttl: args.ttl,
            receipt: false,
        },
        limit: run.limit,
    };
    let cpu = CpuMeter::start(&run.server);
    let client0 = crate::results::client_cpu_secs();
    let mut tasks = JoinSet::new();
    let targets = match flood {
        Flood::None => None,
        Flood::One => Some(fleets.one.clone()),
        Flood::Many => Some(fleets.many.clone()),
        Flood::Anonymous => fleets.anonymous.clone(),
    };
    let flooder = targets.map(|t| spawn_flooder(t, ctx.clone(), args));
    // Each sender's share of the rate, the senders' schedules staggered.
    let interval = stats::secs(args.senders as f64 / args.rate);
    let client = sender::client(args.senders * 4);
    for (k, plan) in plans
        .iter()
        .enumerate()
        .filter(|(_, p)| !p.channels.is_empty())
    {
        let plan = plan.clone();
        let first = start + interval.mul_f64(k as f64 / args.senders as f64);
        tasks.spawn(well_behaved(
            plan,
            ctx.clone(),
            fleets.endpoints.clone(),
            client.clone(),
            first,
            interval,
        ));
    }
    while tasks.join_next().await.is_some() {}
    if let Some(f) = flooder {
        if !matches!(
            tokio::task::spawn_blocking(move || f.join()).await,
            Ok(Ok(()))
        ) {
            eprintln!("abuse: the flooder's thread failed");
        }
    }
    let wall = start.elapsed().as_secs_f64().max(1e-9);
    let cores = cpu.server_secs().map(|s| s / wall);
    let client_cores = (crate::results::client_cpu_secs() - client0) / wall;
    let drain_until = Instant::now() + stats::secs(args.drain);
    while sh.outstanding(p, false) > 0 && Instant::now() < drain_until {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    sh.phases[p].lost.store(sh.outstanding(p, true), Relaxed);
    (cores, client_cores)
}

/// One phase's figures, as they go into the results.
#[derive(Debug, Clone, PartialEq)]
struct Figures {
    name: &'static str,
    flood: bool,
    sent: u64,
    accepted: u64,
    delivered: u64,
    lost: u64,
    refused: u64,
    p50_ms: f64,
    p99_ms: f64,
}

/// The target, phase by phase against the baseline: nothing lost
/// or refused, and p99 within `max_ratio` of the baseline's. Returns each
/// flood phase's ratio and the reasons the target was missed (none: met).
fn verdict(figs: &[Figures], max_ratio: f64) -> (Vec<Option<f64>>, Vec<String>) {
    let mut why = Vec::new();
    let base = figs.iter().find(|f| !f.flood);
    let base_p99 = base.map(|b| b.p99_ms).filter(|p| *p > 0.0);
    if base_p99.is_none() {
        why.push("no baseline latency to compare with".to_string());
    }
    let mut ratios = Vec::new();
    for f in figs {
        if f.lost > 0 || f.refused > 0 {
            why.push(format!(
                "{}: {} lost, {} refused",
                f.name, f.lost, f.refused
            ));
        }
        if f.sent > 0 && f.delivered == 0 {
            why.push(format!("{}: nothing delivered", f.name));
        }
        let ratio = match (f.flood, base_p99) {
            (true, Some(b)) if f.p99_ms > 0.0 => Some(f.p99_ms / b),
            _ => None,
        };
        if let Some(r) = ratio.filter(|r| *r > max_ratio) {
            why.push(format!(
                "{}: p99 {:.2}× the baseline's (target ≤ {max_ratio}×)",
                f.name, r
            ));
        }
        ratios.push(ratio);
    }
    (ratios, why)
}

/// Per phase: a row, prefixed metrics and a latency; then the verdict.
/// Returns the summary line.
fn record(
    args: &AbuseArgs,
    run: &mut Run<'_>,
    sh: &Shared,
    phases: &[Flood],
    cpu: &[(Option<f64>, f64)],
    setups: &[(&'static str, Setup)],
) -> String {
    let mut figs = Vec::new();
    for (p, flood) in phases.iter().enumerate() {
        let st = &sh.phases[p];
        let lat = LatencySummary::from_hist(&st.hist().merged());
        figs.push(Figures {
            name: flood.phase_name(),
            flood: *flood != Flood::None,
            sent: st.sent.load(Relaxed),
            accepted: st.accepted.load(Relaxed),
            delivered: st.delivered.load(Relaxed),
            lost: st.lost.load(Relaxed),
            refused: st.refused.total(),
            p50_ms: lat.p50_ms,
            p99_ms: lat.p99_ms,
        });
        run.result.latency.insert(flood.phase_name().into(), lat);
    }
    let (ratios, why) = verdict(&figs, args.max_p99_ratio);
    let mut parts = Vec::new();
    for (p, f) in figs.iter().enumerate() {
        let st = &sh.phases[p];
        let fl = &st.flood;
        let mut row = Map::new();
        let mut put = |k: &str, v: Value, run: &mut Run<'_>| {
            row.insert(k.to_string(), v.clone());
            run.result.metric(&format!("{}_{k}", f.name), v);
        };
        put("sent", f.sent.into(), run);
        put("accepted", f.accepted.into(), run);
        put("delivered", f.delivered.into(), run);
        put("lost", f.lost.into(), run);
        put("refused", f.refused.into(), run);
        put("skipped", st.skipped.load(Relaxed).into(), run);
        put("p50_ms", r2(f.p50_ms).into(), run);
        put("p99_ms", r2(f.p99_ms).into(), run);
        if let Some((server, client)) = cpu.get(p).copied() {
            if let Some(c) = server {
                put("server_cpu_cores", r2(c).into(), run);
            }
            put("client_cpu_cores", r2(client).into(), run);
        }
        let mut text = format!(
            "{} p99 {:.2} ms, {}/{} delivered, {} lost",
            f.name, f.p99_ms, f.delivered, f.sent, f.lost
        );
        if f.flood {
            let sent = fl.sent.load(Relaxed);
            let created = fl.created.load(Relaxed);
            let throttled = fl.throttled.load(Relaxed);
            let per_s = r2(sent as f64 / args.duration);
            put("p99_ratio", ratios[p].map(r2).into(), run);
            put("flooder_sent", sent.into(), run);
            put("flooder_per_s", per_s.into(), run);
            put("flooder_201", created.into(), run);
            put("flooder_429", throttled.into(), run);
            for errno in [125u64, 126] {
                let n = fl
                    .answers
                    .snapshot()
                    .get(&format!("429 errno {errno}"))
                    .copied();
                put(
                    &format!("flooder_429_errno_{errno}"),
                    n.unwrap_or(0).into(),
                    run,
                );
            }
            let other = sent - created - throttled;
            put("flooder_other", other.into(), run);
            put(
                "flooder_429_without_retry_after",
                fl.no_retry_after.load(Relaxed).into(),
                run,
            );
            put("flooder_delivered", fl.delivered.load(Relaxed).into(), run);
            row.insert(
                "flooder_answers".into(),
                serde_json::to_value(fl.answers.snapshot()).unwrap_or_default(),
            );
            let ratio = ratios[p].map(|r| format!(" ({r:.2}×)")).unwrap_or_default();
            text = format!(
                "{} p99 {:.2} ms{ratio}, {}/{} delivered, {} lost; flooder {sent} sent ({per_s:.0}/s), {created} accepted, {throttled} 429",
                f.name, f.p99_ms, f.delivered, f.sent, f.lost
            );
        }
        let mut named = Map::new();
        named.insert("phase".into(), f.name.into());
        named.extend(row);
        run.result.rows.push(named);
        parts.push(text);
        for (k, n) in st.refused.snapshot() {
            run.result.errors.insert(format!("{}: {k}", f.name), n);
        }
        if f.lost > 0 {
            run.result.errors.insert(
                format!("{}: lost (accepted, never delivered)", f.name),
                f.lost,
            );
        }
    }
    record_setups_and_rates(args, run, sh, setups);
    let met = why.is_empty();
    run.result
        .metric("target_max_p99_ratio", args.max_p99_ratio);
    run.result.metric("target_met", met);
    run.result
        .notes
        .extend(why.iter().map(|w| format!("target missed: {w}")));
    let verdict = if met {
        "met".to_string()
    } else {
        format!("NOT met ({})", why.join("; "))
    };
    format!(
        "abuse[{}]: {}; target (nothing lost, p99 ≤ {}× baseline): {verdict}",
        run.common.target,
        parts.join("; "),
        args.max_p99_ratio
    )
}

/// What the setup and the user agents saw, and the well-behaved load per
/// receiver against Herald's default quotas.
fn record_setups_and_rates(
    args: &AbuseArgs,
    run: &mut Run<'_>,
    sh: &Shared,
    setups: &[(&'static str, Setup)],
) {
    for (name, s) in setups {
        for (k, n) in s.errors.snapshot() {
            run.result.errors.insert(format!("{name} {k}"), n);
        }
        run.result.metric(
            &format!("{}_uas_connected", name.replace([' ', '-'], "_")),
            s.connected as u64,
        );
    }
    run.errors_from(&[&sh.ua_errors]);
    run.error_counts(&[
        ("unexpected notification", sh.unexpected.load(Relaxed)),
        ("duplicate notification", sh.duplicates.load(Relaxed)),
        ("malformed server message", sh.malformed.load(Relaxed)),
    ]);
    let per_sub = args.rate / (args.uas * args.common.channels) as f64;
    let per_ua = args.rate / args.uas as f64;
    run.result
        .metric("per_subscription_rate_per_s", r2(per_sub));
    run.result.metric("per_ua_rate_per_s", r2(per_ua));
    if per_sub > DEFAULT_SUBSCRIPTION_PER_S || per_ua > DEFAULT_UA_PER_S {
        run.result.notes.push(format!(
            "well-behaved senders push {per_sub:.2}/s per subscription and {per_ua:.2}/s per user agent, above Herald's default receiver quotas ({DEFAULT_SUBSCRIPTION_PER_S}/s, {DEFAULT_UA_PER_S}/s): raise --uas or lower --rate"
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fig(name: &'static str, flood: bool, p99: f64) -> Figures {
        Figures {
            name,
            flood,
            sent: 100,
            accepted: 100,
            delivered: 100,
            lost: 0,
            refused: 0,
            p50_ms: p99 / 2.0,
            p99_ms: p99,
        }
    }

    #[test]
    fn stamps_carry_phase_and_time_and_are_never_zero() {
        assert_eq!(unstamp(0), None);
        let v = stamp(0, 0);
        assert_ne!(v, 0);
        assert_eq!(unstamp(v), Some((0, 0)));
        assert_eq!(unstamp(stamp(3, 123_456_789)), Some((3, 123_456_789)));
    }

    #[test]
    fn the_target_holds_within_twice_the_baseline_and_nothing_lost() {
        let figs = [
            fig("baseline", false, 4.0),
            fig("flood_one", true, 8.0),
            fig("flood_many", true, 5.0),
        ];
        let (ratios, why) = verdict(&figs, 2.0);
        assert_eq!(ratios, vec![None, Some(2.0), Some(1.25)]);
        assert!(why.is_empty(), "{why:?}");
    }

    #[test]
    fn the_target_is_missed_by_a_slow_p99_a_loss_or_a_refusal() {
        let mut slow = fig("flood_one", true, 8.1);
        let (_, why) = verdict(&[fig("baseline", false, 4.0), slow.clone()], 2.0);
        assert_eq!(why.len(), 1);
        assert!(why[0].contains("flood_one: p99 2.02×"), "{why:?}");
        slow.p99_ms = 1.0;
        slow.lost = 1;
        let (_, why) = verdict(&[fig("baseline", false, 4.0), slow.clone()], 2.0);
        assert_eq!(why, vec!["flood_one: 1 lost, 0 refused".to_string()]);
        slow.lost = 0;
        slow.refused = 3;
        let (_, why) = verdict(&[fig("baseline", false, 4.0), slow], 2.0);
        assert_eq!(why, vec!["flood_one: 0 lost, 3 refused".to_string()]);
        // Without a baseline there is nothing to compare with.
        let (ratios, why) = verdict(&[fig("flood_one", true, 3.0)], 2.0);
        assert_eq!(ratios, vec![None]);
        assert!(why[0].contains("no baseline"), "{why:?}");
    }

    #[test]
    fn flood_answers_are_counted_by_errno() {
        let t = FloodTally::default();
        let reply = |status, errno, retry_after| {
            Ok(Reply {
                status,
                errno,
                retry_after,
            })
        };
        t.record(&reply(201, None, false));
        t.record(&reply(429, Some(125), true));
        t.record(&reply(429, Some(126), false));
        t.record(&reply(429, Some(126), true));
        t.record(&Err("timeout".into()));
        assert_eq!(t.sent.load(Relaxed), 5);
        assert_eq!(t.created.load(Relaxed), 1);
        assert_eq!(t.throttled.load(Relaxed), 3);
        assert_eq!(t.no_retry_after.load(Relaxed), 1);
        assert_eq!(t.transport.load(Relaxed), 1);
        let a = t.answers.snapshot();
        assert_eq!(a.get("429 errno 126"), Some(&2));
        assert_eq!(a.get("201"), Some(&1));
        assert_eq!(a.get("transport: timeout"), Some(&1));
    }
}
