//! Scenario `throughput`: M connected user agents, K application-server
//! senders POSTing encrypted messages, end-to-end latency per message.
//!
//! Matching a notification to its send is exact without trusting any server
//! identifier: each channel has a small pool of pre-encrypted payloads, each
//! with its own random salt, and a channel never has two outstanding
//! messages from the same pool slot (a sender skips a channel whose next
//! slot is still in flight). So (channelID, salt) names exactly one
//! outstanding send, whatever order the server delivers in.

use crate::crypto::{self, Pool};
use crate::fleet::{self, Setup, Up};
use crate::harness::{self, RateWatch, Run};
use crate::proto::{self, Ws};
use crate::results::{self, r2, Common, CpuMeter};
use crate::sender::{self, Endpoint, HttpClient, Origins, Outcome, SenderPlan};
use crate::stats::{self, Clock, Hist, LatencySummary, Tally};
use anyhow::{bail, Result};
use std::sync::atomic::{AtomicU64, Ordering::*};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio::task::JoinSet;
use uuid::Uuid;

#[derive(clap::Args, Clone, Debug)]
pub struct ThroughputArgs {
    #[command(flatten)]
    pub common: Common,
    /// Connected user agents.
    #[arg(long, default_value_t = 1000)]
    pub uas: usize,
    /// Concurrent senders (application servers), each with its own VAPID key,
    /// one keep-alive connection and one request in flight.
    #[arg(long, default_value_t = 16)]
    pub senders: usize,
    /// Plaintext bytes per message, at most 3967 (the aes128gcm body pads it to a
    /// multiple of 128 and adds 102 bytes of header and tag).
    #[arg(long, default_value_t = 1024)]
    pub payload: usize,
    /// Target send rate in messages/s across all senders (open loop); 0 sends as fast as
    /// responses come back (closed loop).
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// Seconds to send for.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Stop after this many messages (0: no limit; --duration still bounds the run).
    #[arg(long, default_value_t = 0)]
    pub messages: u64,
    /// Seconds to wait after sending for notifications still on their way.
    #[arg(long, default_value_t = 10.0)]
    pub drain: f64,
    /// Pre-encrypted payloads per channel, which is also the most messages one channel
    /// may have outstanding (sent, not yet received).
    #[arg(long, default_value_t = 4)]
    pub pool: usize,
    /// TTL header of each message, seconds.
    #[arg(long, default_value_t = 60)]
    pub ttl: u32,
    /// Decrypt every Nth notification and check its plaintext (0: never; costs CPU).
    #[arg(long, default_value_t = 0)]
    pub verify_every: u64,
    /// Ask for a delivery receipt on every message (`Prefer: respond-async`,
    /// RFC 8030 §5.1): what receipts cost the server, against a run without.
    #[arg(long)]
    pub receipts: bool,
}

/// Everything user agents and senders share. Per channel: `pool` slots of
/// a send timestamp each (0 = free), nothing else.
struct Shared {
    clock: Clock,
    pool: Pool,
    per_ua: usize,
    channel_ids: Arc<Vec<Uuid>>,
    slots: Vec<AtomicU64>,
    latency: Hist,
    delivered: AtomicU64,
    unexpected: AtomicU64,
    duplicates: AtomicU64,
    malformed: AtomicU64,
    acks: AtomicU64,
    verify_every: u64,
    verify_ok: AtomicU64,
    verify_failed: AtomicU64,
    last_delivery_us: AtomicU64,
    ua_errors: Tally,
    // Sender side.
    sent: AtomicU64,
    accepted: AtomicU64,
    claimed: AtomicU64,
    delivered_after_error: AtomicU64,
    stalls: AtomicU64,
    late_sends: AtomicU64,
    max_lag_us: AtomicU64,
    send_errors: Tally,
}

impl Shared {
    /// Counters at zero; the clock starts now, once user agents are up.
    /// `slots_per_channel` send slots per channel; every `verify_every`th
    /// message is decrypted.
    fn new(
        pool: Pool,
        per_ua: usize,
        channel_ids: Arc<Vec<Uuid>>,
        slots_per_channel: usize,
        verify_every: u64,
    ) -> Self {
        let slots = channel_ids.len() * slots_per_channel;
        Shared {
            clock: Clock::new(),
            pool,
            per_ua,
            channel_ids,
            slots: (0..slots).map(|_| AtomicU64::new(0)).collect(),
            latency: Hist::new(),
            delivered: AtomicU64::new(0),
            unexpected: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            malformed: AtomicU64::new(0),
            acks: AtomicU64::new(0),
            verify_every,
            verify_ok: AtomicU64::new(0),
            verify_failed: AtomicU64::new(0),
            last_delivery_us: AtomicU64::new(0),
            ua_errors: Tally::default(),
            sent: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            claimed: AtomicU64::new(0),
            delivered_after_error: AtomicU64::new(0),
            stalls: AtomicU64::new(0),
            late_sends: AtomicU64::new(0),
            max_lag_us: AtomicU64::new(0),
            send_errors: Tally::default(),
        }
    }

    fn slot(&self, channel: usize, s: usize) -> &AtomicU64 {
        &self.slots[channel * self.pool.per_channel + s]
    }

    /// Handles one text frame; returns the ack to send, if any.
    fn on_text(&self, ua: usize, text: &str) -> Option<String> {
        let n = proto::notification(text, &self.malformed)?;
        let now = self.clock.now_us();
        let ch = &*n.channel_id;
        let ack = proto::ack_json(ch, &n.version);
        self.acks.fetch_add(1, Relaxed);
        let Some(c) = channel_of(&self.channel_ids, ua, self.per_ua, ch) else {
            self.unexpected.fetch_add(1, Relaxed);
            return Some(ack);
        };
        let Some(data) = n.data.as_deref() else {
            self.malformed.fetch_add(1, Relaxed);
            return Some(ack);
        };
        let Some(s) = crypto::salt_from_data(data).and_then(|salt| self.pool.slot_of(c, &salt))
        else {
            self.unexpected.fetch_add(1, Relaxed);
            return Some(ack);
        };
        let sent = self.slot(c, s).swap(0, AcqRel);
        if sent == 0 {
            self.duplicates.fetch_add(1, Relaxed);
            return Some(ack);
        }
        self.latency.record(ua, now.saturating_sub(sent));
        let n = self.delivered.fetch_add(1, Relaxed) + 1;
        stats::fetch_max(&self.last_delivery_us, now);
        if self.verify_every > 0 && n.is_multiple_of(self.verify_every) {
            match self.pool.verify(c, s, data) {
                Some(true) => self.verify_ok.fetch_add(1, Relaxed),
                _ => self.verify_failed.fetch_add(1, Relaxed),
            };
        }
        Some(ack)
    }
}

/// Index of the channel `ua` owns with this channelID, if it owns one.
pub fn channel_of(ids: &[Uuid], ua: usize, per_ua: usize, channel: &str) -> Option<usize> {
    let id = Uuid::try_parse(channel).ok()?;
    (ua * per_ua..(ua + 1) * per_ua).find(|&c| ids.get(c) == Some(&id))
}

async fn ua_loop(ua: usize, ws: Ws, sh: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    fleet::ack_until(ws, &mut stop, &sh.ua_errors, |t| sh.on_text(ua, t)).await;
}

#[allow(clippy::too_many_arguments)]
async fn sender_loop(
    plan: SenderPlan,
    sh: Arc<Shared>,
    endpoints: Arc<Vec<Option<Endpoint>>>,
    client: HttpClient,
    deadline: Instant,
    interval: Option<Duration>,
    max_messages: u64,
    ttl: u32,
    receipts: bool,
    limit: Duration,
) {
    let per = sh.pool.per_channel;
    let n = plan.channels.len();
    let mut next_slot = vec![0u8; n];
    let mut cursor = 0usize;
    let mut next_at = Instant::now();
    // Counts this sender's POSTs, which go round-robin over the push nodes.
    let mut posts = 0usize;
    while Instant::now() < deadline {
        if let Some(iv) = interval {
            next_at += iv;
            let now = Instant::now();
            if next_at > now {
                tokio::time::sleep_until(next_at.min(deadline).into()).await;
            } else {
                let lag = (now - next_at).as_micros() as u64;
                if lag > 1000 {
                    sh.late_sends.fetch_add(1, Relaxed);
                }
                stats::fetch_max(&sh.max_lag_us, lag);
            }
            if Instant::now() >= deadline {
                break;
            }
        }
        if max_messages > 0 && sh.claimed.fetch_add(1, Relaxed) >= max_messages {
            break;
        }
        // Next of our channels whose next slot is free.
        let pick = (0..n).map(|k| (cursor + k) % n).find(|&i| {
            let c = plan.channels[i] as usize;
            sh.slot(c, next_slot[i] as usize).load(Acquire) == 0
        });
        let Some(i) = pick else {
            // Every channel has `pool` messages outstanding: the server is
            // not delivering as fast as we send. Wait rather than lose
            // exact matching.
            sh.stalls.fetch_add(1, Relaxed);
            if max_messages > 0 {
                sh.claimed.fetch_sub(1, Relaxed);
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
            continue;
        };
        cursor = i + 1;
        let c = plan.channels[i] as usize;
        let s = next_slot[i] as usize;
        next_slot[i] = ((s + 1) % per) as u8;
        let Some(ep) = endpoints[c].as_ref() else {
            continue;
        };
        let slot = sh.slot(c, s);
        let ts = sh.clock.now_us();
        slot.store(ts, Release);
        sh.sent.fetch_add(1, Relaxed);
        let out = sender::post_with(
            &client,
            ep,
            posts,
            &plan.auth[ep.origin],
            sh.pool.body(c, s).clone(),
            sender::PostOptions {
                ttl,
                receipt: receipts,
            },
            limit,
        )
        .await;
        posts += 1;
        // 202: accepted with a receipt to come (RFC 8030 §5.1).
        let accepted = if receipts { 202 } else { 201 };
        if out == Outcome::Status(accepted) {
            sh.accepted.fetch_add(1, Relaxed);
        } else {
            sh.send_errors.add(out.key());
            if slot.compare_exchange(ts, 0, AcqRel, Acquire).is_err() {
                // Delivered although the POST failed (e.g. a timeout after
                // the server stored it). It was matched, so count it.
                sh.delivered_after_error.fetch_add(1, Relaxed);
            }
        }
    }
}

/// Turns register replies into endpoints, loopback-checked (or spread over
/// the push nodes `push_bases`); bad ones are counted and their channels
/// left out.
pub async fn resolve_endpoints(
    ups: &[Option<Up>],
    per_ua: usize,
    push_bases: &[String],
    errors: &Tally,
) -> Result<(Vec<Option<Endpoint>>, Origins)> {
    let mut origins = Origins::with_push_urls(push_bases).await?;
    if !origins.push.is_empty() {
        let bases: Vec<&str> = origins.push.iter().map(|n| n.base.as_str()).collect();
        eprintln!("  POSTs go round-robin to {}", bases.join(", "));
    }
    let mut eps = vec![None; ups.len() * per_ua];
    for (u, up) in ups.iter().enumerate() {
        let Some(up) = up else { continue };
        for (k, url) in up.endpoints.iter().enumerate() {
            match origins.endpoint(url).await {
                Ok(ep) => eps[u * per_ua + k] = Some(ep),
                Err(e) => errors.add(format!("endpoint: {e:#}")),
            }
        }
    }
    Ok((eps, origins))
}

pub async fn run(args: ThroughputArgs) -> Result<()> {
    let common = &args.common;
    if args.uas == 0 || args.senders == 0 || common.channels == 0 {
        bail!("--uas, --senders and --channels must be at least 1");
    }
    if !(1..=64).contains(&args.pool) {
        bail!("--pool must be 1..=64");
    }
    let mut run = Run::start(
        "throughput",
        common,
        serde_json::json!({
            "uas": args.uas, "channels_per_ua": common.channels, "senders": args.senders,
            "payload_bytes": args.payload, "rate": args.rate, "duration_s": args.duration,
            "messages": args.messages, "pool": args.pool, "ttl": args.ttl,
            "verify_every": args.verify_every, "concurrency": common.concurrency,
            "receipts": args.receipts,
        }),
    )
    .await?;
    if (args.uas + args.senders + 100) as u64 > run.nofile.soft {
        bail!(
            "{} user agents and {} senders need more than this process's {} open files; \
             the throughput scenario runs in one process (use `idle` for the connection ceiling)",
            args.uas,
            args.senders,
            run.nofile.soft
        );
    }
    let rss_before = run.server.rss_each();
    let mut fleet = connect(&args, &run).await?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut uas = JoinSet::new();
    for (u, up) in std::mem::take(&mut fleet.setup.ups).into_iter().enumerate() {
        if let Some(up) = up {
            uas.spawn(ua_loop(u, up.ws, fleet.sh.clone(), stop_rx.clone()));
        }
    }
    let sent = send_and_drain(
        &args,
        &mut run,
        &fleet.sh,
        fleet.plans,
        fleet.endpoints,
        fleet.setup.connected,
    )
    .await;
    fleet::stop_all(&stop_tx, &mut uas, Duration::from_secs(10)).await;
    let rss_after = run.server.rss_each();
    run.result
        .server_rss(rss_before.as_deref(), rss_after.as_deref());
    let summary = record(&args, &mut run, &fleet.sh, &sent, &fleet.setup);
    run.finish(summary)
}

/// The user agents connected and registered, and what senders need.
struct Fleet {
    sh: Arc<Shared>,
    plans: Vec<SenderPlan>,
    endpoints: Arc<Vec<Option<Endpoint>>>,
    setup: Setup,
}

/// Keys, payload pool, user agents with their channels, and one sending
/// plan per VAPID key: channel c belongs to sender c % K, whose key it
/// registered with.
async fn connect(args: &ThroughputArgs, run: &Run<'_>) -> Result<Fleet> {
    let common = &args.common;
    let channels = args.uas * common.channels;
    eprintln!(
        "throughput: encrypting {} payloads for {channels} channels",
        channels * args.pool
    );
    let (vapids, keys) = harness::vapids(args.senders)?;
    let verify = args.verify_every > 0;
    let pool = harness::payload_pool(channels, args.pool, args.payload, verify).await?;
    eprintln!(
        "throughput: payload pool {:.1} MiB",
        pool.bytes() as f64 / (1 << 20) as f64
    );
    let channel_ids = harness::channel_ids(channels);

    eprintln!("throughput: connecting {} user agents", args.uas);
    let setup = run.bring_up(args.uas, channel_ids.clone(), keys).await;
    let (endpoints, origins) =
        resolve_endpoints(&setup.ups, common.channels, &run.push_bases, &setup.errors).await?;
    let endpoints = Arc::new(endpoints);
    setup.require_any("connect")?;
    let sh = Arc::new(Shared::new(
        pool,
        common.channels,
        channel_ids,
        args.pool,
        args.verify_every,
    ));
    let plans = sender::plan_senders(&vapids, &origins, endpoints.iter().map(Option::is_some))?;
    Ok(Fleet {
        sh,
        plans,
        endpoints,
        setup,
    })
}

/// What the send and drain phases measured.
struct Sent {
    send_secs: f64,
    send_start_us: u64,
    lost: u64,
    server_cpu: Option<f64>,
}

/// Senders run for --duration (sampling accepted/s and delivered/s), then
/// the user agents get --drain seconds to receive what was accepted.
async fn send_and_drain(
    args: &ThroughputArgs,
    run: &mut Run<'_>,
    sh: &Arc<Shared>,
    plans: Vec<SenderPlan>,
    endpoints: Arc<Vec<Option<Endpoint>>>,
    connected: usize,
) -> Sent {
    let client = sender::client(args.senders);
    let interval = (args.rate > 0.0).then(|| stats::secs(args.senders as f64 / args.rate));
    eprintln!(
        "throughput: {} user agents up; sending for {}s with {} senders{}",
        connected,
        args.duration,
        args.senders,
        match interval {
            Some(_) => format!(" at {} msg/s", args.rate),
            None => " as fast as possible".into(),
        }
    );
    // accepted/s and delivered/s over time, through the drain.
    let sample_every = stats::sample_interval(stats::secs(args.duration + 1.0));
    let rates = {
        let sh = sh.clone();
        RateWatch::spawn(&["accepted", "delivered"], sample_every, move || {
            vec![sh.accepted.load(Relaxed), sh.delivered.load(Relaxed)]
        })
    };

    let cpu = CpuMeter::start(&run.server);
    let send_start_us = sh.clock.now_us();
    let send_start = Instant::now();
    let deadline = send_start + stats::secs(args.duration);
    let mut senders = JoinSet::new();
    for plan in plans.into_iter().filter(|p| !p.channels.is_empty()) {
        senders.spawn(sender_loop(
            plan,
            sh.clone(),
            endpoints.clone(),
            client.clone(),
            deadline,
            interval,
            args.messages,
            args.ttl,
            args.receipts,
            run.limit,
        ));
    }
    while senders.join_next().await.is_some() {}
    let send_secs = send_start.elapsed().as_secs_f64();

    // Drain: wait for every accepted message to arrive, or give up.
    let drain_deadline = Instant::now() + stats::secs(args.drain);
    let outstanding = |sh: &Shared| sh.slots.iter().filter(|s| s.load(Acquire) != 0).count() as u64;
    while outstanding(sh) > 0 && Instant::now() < drain_deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let lost = outstanding(sh);
    let server_cpu = cpu.record(&mut run.result);
    run.result.rates = rates.stop().await;
    Sent {
        send_secs,
        send_start_us,
        lost,
        server_cpu,
    }
}

/// Rates, counts, latency and notes into the results; returns the summary.
fn record(
    args: &ThroughputArgs,
    run: &mut Run<'_>,
    sh: &Shared,
    sent: &Sent,
    setup: &Setup,
) -> String {
    let Sent {
        send_secs,
        send_start_us,
        lost,
        server_cpu,
    } = *sent;
    let (connected, channels) = (setup.connected, args.uas * args.common.channels);
    let accepted = sh.accepted.load(Relaxed);
    let delivered = sh.delivered.load(Relaxed);
    let last = sh.last_delivery_us.load(Relaxed);
    let delivery_secs = if last > send_start_us {
        (last - send_start_us) as f64 / 1e6
    } else {
        0.0
    };
    let lat = LatencySummary::from_hist(&sh.latency.merged());
    let accepted_rate = if send_secs > 0.0 {
        accepted as f64 / send_secs
    } else {
        0.0
    };
    let delivered_rate = if delivery_secs > 0.0 {
        delivered as f64 / delivery_secs
    } else {
        0.0
    };
    run.errors_from(&[&setup.errors, &sh.send_errors, &sh.ua_errors]);
    run.error_counts(&[
        ("lost (accepted, never delivered)", lost),
        ("unexpected notification", sh.unexpected.load(Relaxed)),
        ("duplicate notification", sh.duplicates.load(Relaxed)),
        ("malformed server message", sh.malformed.load(Relaxed)),
        (
            "payload failed verification",
            sh.verify_failed.load(Relaxed),
        ),
    ]);
    run.result.metric("uas_connected", connected as u64);
    run.result.metric("channels", channels as u64);
    run.result.metric("senders", args.senders as u64);
    run.result.metric("payload_bytes", args.payload as u64);
    run.result
        .metric("body_bytes", crypto::body_len(args.payload) as u64);
    run.result.metric("sent", sh.sent.load(Relaxed));
    run.result.metric("accepted", accepted);
    run.result.metric("delivered", delivered);
    run.result.metric("lost", lost);
    run.result.metric("accepted_per_s", r2(accepted_rate));
    run.result.metric("delivered_per_s", r2(delivered_rate));
    run.result.metric("send_phase_s", r2(send_secs));
    run.result.metric("acks_sent", sh.acks.load(Relaxed));
    run.result.metric(
        "delivered_after_error",
        sh.delivered_after_error.load(Relaxed),
    );
    run.result.metric("sender_stalls", sh.stalls.load(Relaxed));
    if args.rate > 0.0 {
        run.result.metric("target_rate_per_s", args.rate);
        run.result.metric("late_sends", sh.late_sends.load(Relaxed));
        run.result.metric(
            "max_schedule_lag_ms",
            r2(sh.max_lag_us.load(Relaxed) as f64 / 1000.0),
        );
    }
    if args.verify_every > 0 {
        run.result.metric("verified_ok", sh.verify_ok.load(Relaxed));
        run.result
            .metric("verify_failed", sh.verify_failed.load(Relaxed));
    }
    // What one message cost the server(s), from accept to delivery.
    let cpu_us = run
        .result
        .cpu_per("server_cpu_us_per_delivered", server_cpu, delivered);
    run.result.latency.insert("end_to_end".into(), lat.clone());
    run.latency("setup", &setup.latency);
    if sh.stalls.load(Relaxed) > 0 {
        run.result.notes.push(format!(
            "senders waited {} times for a channel with a free slot: the server delivered slower than it accepted (raise --pool or --uas to queue more)",
            sh.stalls.load(Relaxed)
        ));
    }
    if args.rate > 0.0 && accepted_rate < args.rate * 0.95 {
        run.result.notes.push(format!(
            "accepted {accepted_rate:.0}/s, below the {} msg/s target: the server or {} senders could not keep up",
            args.rate, args.senders
        ));
    }
    let total_errors = run.total_errors();
    format!(
        "throughput[{}]: {accepted} accepted ({accepted_rate:.0}/s), {delivered} delivered ({delivered_rate:.0}/s), {lost} lost, {total_errors} errors; latency {}; {}",
        run.common.target,
        lat.short(),
        results::cpu_text(cpu_us, "delivered message"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared(channels: usize, per_ua: usize, pool: usize) -> Shared {
        let ids = Arc::new((0..channels).map(|_| proto::new_channel_id()).collect());
        Shared::new(
            Pool::build(channels, pool, 32, true).unwrap(),
            per_ua,
            ids,
            pool,
            1,
        )
    }

    fn notification(sh: &Shared, c: usize, s: usize) -> String {
        proto::notification_json(
            &sh.channel_ids[c].hyphenated().to_string().to_uppercase(),
            &format!("v{c}-{s}"),
            sh.pool.body(c, s),
        )
    }

    #[test]
    fn matches_out_of_order_deliveries_exactly() {
        let sh = shared(4, 2, 3);
        // Channel 3 belongs to user agent 1. Three sends outstanding.
        sh.slot(3, 0).store(100, Relaxed);
        sh.slot(3, 1).store(200, Relaxed);
        sh.slot(3, 2).store(300, Relaxed);
        std::thread::sleep(Duration::from_millis(2));
        // Delivered in reverse order: each still matches its own send.
        for s in [2, 0, 1] {
            let ack = sh.on_text(1, &notification(&sh, 3, s)).unwrap();
            let a: serde_json::Value = serde_json::from_str(&ack).unwrap();
            assert_eq!(a["updates"][0]["version"], format!("v3-{s}"));
            assert_eq!(sh.slot(3, s).load(Relaxed), 0);
        }
        assert_eq!(sh.delivered.load(Relaxed), 3);
        assert_eq!(sh.verify_ok.load(Relaxed), 3);
        assert_eq!(sh.latency.merged().len(), 3);
        // A repeat is a duplicate, not a delivery.
        sh.on_text(1, &notification(&sh, 3, 2)).unwrap();
        assert_eq!(sh.duplicates.load(Relaxed), 1);
        assert_eq!(sh.delivered.load(Relaxed), 3);
    }

    #[test]
    fn counts_misdirected_and_broken_messages() {
        let sh = shared(4, 2, 2);
        sh.slot(0, 0).store(5, Relaxed);
        // Channel 0 is user agent 0's; delivered to user agent 1 it is unexpected.
        assert!(sh.on_text(1, &notification(&sh, 0, 0)).is_some());
        assert_eq!(sh.unexpected.load(Relaxed), 1);
        assert_eq!(sh.slot(0, 0).load(Relaxed), 5);
        // Another channel's payload on channel 0: the salt does not match.
        let mut v: serde_json::Value = serde_json::from_str(&notification(&sh, 1, 0)).unwrap();
        v["channelID"] = sh.channel_ids[0].to_string().into();
        sh.on_text(0, &v.to_string());
        assert_eq!(sh.unexpected.load(Relaxed), 2);
        // No data, garbage, pings.
        v.as_object_mut().unwrap().remove("data");
        sh.on_text(0, &v.to_string());
        assert!(sh.on_text(0, "garbage").is_none());
        assert!(sh.on_text(0, "{}").is_none());
        assert_eq!(sh.malformed.load(Relaxed), 2);
        assert_eq!(sh.delivered.load(Relaxed), 0);
    }

    #[test]
    fn channel_lookup_is_scoped_to_the_user_agent() {
        let ids: Vec<Uuid> = (0..6).map(|_| proto::new_channel_id()).collect();
        assert_eq!(channel_of(&ids, 1, 3, &ids[4].to_string()), Some(4));
        assert_eq!(channel_of(&ids, 0, 3, &ids[4].to_string()), None);
        assert_eq!(channel_of(&ids, 5, 3, &ids[4].to_string()), None);
        assert_eq!(channel_of(&ids, 0, 3, "nope"), None);
    }
}
