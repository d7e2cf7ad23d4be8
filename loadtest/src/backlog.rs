//! Scenario `backlog`: messages stored for user agents while they are
//! offline, then drained when they come back with the same uaid and
//! channelIDs, as a browser does after a restart.

use crate::crypto::{self, Pool, Vapid};
use crate::fleet::{self, Setup};
use crate::harness::{self, RateWatch, Run};
use crate::proto::{self, Target, Ws};
use crate::results::{self, r2, Common, CpuMeter};
use crate::sender::{self, Endpoint, Origins, Outcome};
use crate::stats::{self, Clock, Hist, Tally};
use crate::throughput::{channel_of, resolve_endpoints};
use anyhow::{bail, Result};
use futures_util::StreamExt;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;

#[derive(clap::Args, Clone, Debug)]
pub struct BacklogArgs {
    #[command(flatten)]
    pub common: Common,
    /// User agents that go offline and come back.
    #[arg(long, default_value_t = 1000)]
    pub uas: usize,
    /// Messages stored for each channel while its user agent is away.
    #[arg(long, default_value_t = 5)]
    pub messages_per_channel: usize,
    /// Concurrent senders storing the backlog.
    #[arg(long, default_value_t = 16)]
    pub senders: usize,
    /// Plaintext bytes per message.
    #[arg(long, default_value_t = 1024)]
    pub payload: usize,
    /// TTL of stored messages, seconds: long enough to outlive the send phase.
    #[arg(long, default_value_t = 3600)]
    pub ttl: u32,
    /// Seconds to wait for the whole backlog after reconnecting.
    #[arg(long, default_value_t = 120.0)]
    pub drain: f64,
    /// Distinct ciphertexts per channel (messages cycle through them).
    #[arg(long, default_value_t = 4)]
    pub pool: usize,
}

/// Per channel: how many messages were accepted for it and how many arrived.
struct Books {
    clock: Clock,
    pool: Pool,
    per_ua: usize,
    ids: Arc<Vec<Uuid>>,
    accepted: Vec<AtomicU32>,
    received: Vec<AtomicU32>,
    delivered: AtomicU64,
    unexpected: AtomicU64,
    malformed: AtomicU64,
    first_us: AtomicU64,
    last_ack_us: AtomicU64,
}

impl Books {
    fn owed(&self, ua: usize) -> bool {
        (ua * self.per_ua..(ua + 1) * self.per_ua)
            .any(|c| self.received[c].load(Relaxed) < self.accepted[c].load(Relaxed))
    }

    /// Books one text frame; returns the ack to send.
    fn on_text(&self, ua: usize, text: &str) -> Option<String> {
        let n = proto::notification(text, &self.malformed)?;
        let ch = &*n.channel_id;
        let ack = proto::ack_json(ch, &n.version);
        let owned = channel_of(&self.ids, ua, self.per_ua, ch);
        let ours = owned.filter(|&c| {
            n.data
                .as_deref()
                .and_then(crypto::salt_from_data)
                .is_some_and(|salt| self.pool.slot_of(c, &salt).is_some())
        });
        match ours {
            Some(c) => {
                self.received[c].fetch_add(1, Relaxed);
                self.delivered.fetch_add(1, Relaxed);
                let now = self.clock.now_us();
                let _ = self.first_us.compare_exchange(0, now, Relaxed, Relaxed);
            }
            None => {
                self.unexpected.fetch_add(1, Relaxed);
            }
        }
        Some(ack)
    }
}

pub async fn run(args: BacklogArgs) -> Result<()> {
    let common = &args.common;
    if args.uas == 0 || args.senders == 0 || common.channels == 0 || args.messages_per_channel == 0
    {
        bail!("--uas, --senders, --channels and --messages-per-channel must be at least 1");
    }
    let mut run = Run::start(
        "backlog",
        common,
        serde_json::json!({
            "uas": args.uas, "channels_per_ua": common.channels,
            "messages_per_channel": args.messages_per_channel, "senders": args.senders,
            "payload_bytes": args.payload, "ttl": args.ttl, "drain_s": args.drain,
            "concurrency": common.concurrency,
        }),
    )
    .await?;
    run.need_files(
        args.uas + args.senders + 100,
        &format!("{} user agents", args.uas),
    )?;
    let (offline, vapids) = subscribe(&args, &run).await?;
    // Storing and delivering one message: server CPU from the first POST
    // to the end of the drain.
    let cpu = CpuMeter::start(&run.server);
    let stored = store(&args, &run, &offline, &vapids).await?;
    let rss_stored = run.server.rss_kib();
    let drained = drain(&args, &run, &offline, stored.stored).await;
    let server_cpu = cpu.record(&mut run.result);
    if let Some(rss) = rss_stored {
        run.result.metric("server_rss_with_backlog_kib", rss);
    }
    let summary = record(&args, &mut run, &offline, &stored, &drained, server_cpu);
    run.finish(summary)
}

/// User agents that subscribed and went offline, and what their
/// application servers need to store messages for them.
struct Offline {
    setup: Setup,
    uaids: Vec<Option<String>>,
    online: usize,
    books: Arc<Books>,
    endpoints: Arc<Vec<Option<Endpoint>>>,
    origins: Origins,
}

/// Phase 1: keys, payloads and channels; every user agent subscribes, then
/// goes offline.
async fn subscribe(args: &BacklogArgs, run: &Run<'_>) -> Result<(Offline, Vec<Vapid>)> {
    let per_ua = args.common.channels;
    let channels = args.uas * per_ua;
    let per = args.pool.clamp(1, 64).min(args.messages_per_channel);
    let (vapids, keys) = harness::vapids(args.senders)?;
    let pool = harness::payload_pool(channels, per, args.payload, false).await?;
    let ids = harness::channel_ids(channels);
    eprintln!("backlog: subscribing {} user agents", args.uas);
    let mut setup = run.bring_up(args.uas, ids.clone(), keys).await;
    let (endpoints, origins) =
        resolve_endpoints(&setup.ups, per_ua, &run.push_bases, &setup.errors).await?;
    let uaids = setup.uaids();
    setup.require_any("subscribe")?;
    fleet::close_all(&mut setup.ups).await;
    let books = Arc::new(Books {
        clock: Clock::new(),
        pool,
        per_ua,
        ids,
        accepted: (0..channels).map(|_| AtomicU32::new(0)).collect(),
        received: (0..channels).map(|_| AtomicU32::new(0)).collect(),
        delivered: AtomicU64::new(0),
        unexpected: AtomicU64::new(0),
        malformed: AtomicU64::new(0),
        first_us: AtomicU64::new(0),
        last_ack_us: AtomicU64::new(0),
    });
    let offline = Offline {
        online: setup.connected,
        setup,
        uaids,
        books,
        endpoints: Arc::new(endpoints),
        origins,
    };
    Ok((offline, vapids))
}

/// What phase 2 stored.
struct Stored {
    stored: u64,
    send_secs: f64,
    errors: Arc<Tally>,
}

/// Phase 2: each sender stores --messages-per-channel messages on its
/// share of the channels (channel c is sender c % K's, whose key it
/// registered with).
async fn store(
    args: &BacklogArgs,
    run: &Run<'_>,
    off: &Offline,
    vapids: &[Vapid],
) -> Result<Stored> {
    let channels = off.books.accepted.len();
    let client = sender::client(args.senders);
    let send_errors = Arc::new(Tally::default());
    eprintln!(
        "backlog: storing {} messages for {} offline user agents",
        off.online * args.common.channels * args.messages_per_channel,
        off.online
    );
    let send_start = Instant::now();
    let mut senders = JoinSet::new();
    for (k, v) in vapids.iter().enumerate() {
        let auth: Vec<http::HeaderValue> = off
            .origins
            .list
            .iter()
            .map(|(o, _)| v.authorization(o))
            .collect::<Result<_>>()?;
        let mine: Vec<usize> = (k..channels)
            .step_by(args.senders)
            .filter(|&c| off.endpoints[c].is_some())
            .collect();
        let (books, endpoints, client, send_errors) = (
            off.books.clone(),
            off.endpoints.clone(),
            client.clone(),
            send_errors.clone(),
        );
        let (m, ttl, limit) = (args.messages_per_channel, args.ttl, run.limit);
        senders.spawn(async move {
            // This sender's POSTs, round-robin over the push nodes.
            let mut posts = 0usize;
            for j in 0..m {
                for &c in &mine {
                    let Some(ep) = endpoints[c].as_ref() else {
                        continue;
                    };
                    let body = books.pool.body(c, j % books.pool.per_channel).clone();
                    let out = sender::post(&client, ep, posts, &auth[ep.origin], body, ttl, limit);
                    posts += 1;
                    match out.await {
                        Outcome::Status(201) => {
                            books.accepted[c].fetch_add(1, Relaxed);
                        }
                        other => send_errors.add(other.key()),
                    }
                }
            }
        });
    }
    while senders.join_next().await.is_some() {}
    let send_secs = send_start.elapsed().as_secs_f64();
    let stored: u64 = off
        .books
        .accepted
        .iter()
        .map(|a| a.load(Relaxed) as u64)
        .sum();
    Ok(Stored {
        stored,
        send_secs,
        errors: send_errors,
    })
}

/// How the drain went.
struct Drained {
    start_us: u64,
    hello_latency: Arc<Hist>,
    errors: Arc<Tally>,
    uaid_changed: Arc<AtomicU64>,
    rates: Vec<stats::RatePoint>,
}

/// Phase 3: every user agent comes back with its uaid and channels and
/// takes its backlog, until all of it is in or --drain runs out.
async fn drain(args: &BacklogArgs, run: &Run<'_>, off: &Offline, stored: u64) -> Drained {
    eprintln!("backlog: {stored} stored; reconnecting");
    let books = &off.books;
    let d = Drained {
        start_us: books.clock.now_us(),
        hello_latency: Arc::new(Hist::new()),
        errors: Arc::new(Tally::default()),
        uaid_changed: Arc::new(AtomicU64::new(0)),
        rates: Vec::new(),
    };
    let sem = Arc::new(Semaphore::new(args.common.concurrency.max(1)));
    let deadline = Instant::now() + stats::secs(args.drain);
    // Drains are often short: sample finely (the phase is bounded by --drain).
    let rates = {
        let books = books.clone();
        RateWatch::spawn(&["delivered"], Duration::from_millis(100), move || {
            vec![books.delivered.load(Relaxed)]
        })
    };
    let mut uas = JoinSet::new();
    for (u, uaid) in off.uaids.iter().enumerate() {
        let Some(uaid) = uaid.clone() else { continue };
        let Ok(permit) = sem.clone().acquire_owned().await else {
            break;
        };
        let back = Returning {
            u,
            uaid,
            target: proto::target_of(&run.targets, u).clone(),
            limit: run.limit,
            deadline,
        };
        let (books, hello, errs, changed) = (
            books.clone(),
            d.hello_latency.clone(),
            d.errors.clone(),
            d.uaid_changed.clone(),
        );
        uas.spawn(async move {
            let mine = &books.ids[u * books.per_ua..(u + 1) * books.per_ua];
            let up = fleet::resume(
                &back.target,
                u,
                &back.uaid,
                mine,
                back.limit,
                &hello,
                &changed,
            )
            .await;
            drop(permit);
            match up {
                Ok(ws) => take_backlog(&back, ws, &books, &errs).await,
                Err(f) => errs.add(format!("reconnect {}", f.key())),
            }
        });
    }
    fleet::join_all_until(&mut uas, deadline + run.limit * 2, || {
        format!("  delivered {}/{stored}", books.delivered.load(Relaxed))
    })
    .await;
    Drained {
        rates: rates.stop().await,
        ..d
    }
}

/// One user agent coming back for its backlog.
struct Returning {
    u: usize,
    uaid: String,
    target: Target,
    limit: Duration,
    deadline: Instant,
}

/// Reads and acks notifications until nothing is owed to this user agent,
/// the drain deadline passes or the connection fails.
async fn take_backlog(back: &Returning, mut ws: Ws, books: &Books, errs: &Tally) {
    let u = back.u;
    while books.owed(u) && Instant::now() < back.deadline {
        let wait = back
            .limit
            .min(back.deadline.saturating_duration_since(Instant::now()));
        match tokio::time::timeout(wait, ws.next()).await {
            Err(_) => {
                errs.add("drain: no message within the step timeout");
                break;
            }
            Ok(Some(Ok(Message::Text(t)))) => {
                if let Some(ack) = books.on_text(u, t.as_str()) {
                    if let Err(f) = proto::send_text(&mut ws, ack, "ack").await {
                        errs.add(format!("drain {}", f.key()));
                        return;
                    }
                    stats::fetch_max(&books.last_ack_us, books.clock.now_us());
                }
            }
            Ok(Some(Ok(Message::Close(_)))) | Ok(None) => {
                errs.add("drain: closed by server");
                return;
            }
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(e))) => {
                errs.add(format!("drain: {}", proto::ws_error_name(&e)));
                return;
            }
        }
    }
    fleet::close(ws).await;
}

/// Per-channel accounting, errors, metrics and latency into the results;
/// returns the summary.
fn record(
    args: &BacklogArgs,
    run: &mut Run<'_>,
    off: &Offline,
    st: &Stored,
    d: &Drained,
    server_cpu: Option<f64>,
) -> String {
    let books = &off.books;
    let (mut delivered, mut missing, mut extra) = (0u64, 0u64, 0u64);
    for (a, r) in books.accepted.iter().zip(&books.received) {
        let (a, r) = (a.load(Relaxed) as u64, r.load(Relaxed) as u64);
        delivered += a.min(r);
        missing += a.saturating_sub(r);
        extra += r.saturating_sub(a);
    }
    let last_ack = books.last_ack_us.load(Relaxed);
    let drain_secs = if last_ack > d.start_us {
        (last_ack - d.start_us) as f64 / 1e6
    } else {
        0.0
    };
    let first = books.first_us.load(Relaxed);
    run.errors_from(&[&off.setup.errors, &st.errors, &d.errors]);
    run.error_counts(&[
        ("missing (stored, never delivered)", missing),
        ("extra deliveries (duplicates)", extra),
        ("unexpected notification", books.unexpected.load(Relaxed)),
        ("malformed server message", books.malformed.load(Relaxed)),
        ("uaid changed on reconnect", d.uaid_changed.load(Relaxed)),
    ]);
    let per_s = |n: u64, s: f64| if s > 0.0 { n as f64 / s } else { 0.0 };
    let drain_rate = per_s(delivered, drain_secs);
    let stored = st.stored;
    let result = &mut run.result;
    result.metric("uas_subscribed", off.online as u64);
    result.metric("channels", books.accepted.len() as u64);
    result.metric("stored", stored);
    result.metric("store_per_s", r2(per_s(stored, st.send_secs)));
    result.metric("delivered", delivered);
    result.metric("missing", missing);
    result.metric("extra", extra);
    // Milliseconds survive: a fast server drains a small backlog in under 5 ms.
    result.metric("drain_s", (drain_secs * 1e6).round() / 1e6);
    result.metric("drain_per_s", r2(drain_rate));
    let cpu_us = result.cpu_per("server_cpu_us_per_delivered", server_cpu, delivered);
    if first > d.start_us {
        result.metric("first_message_s", r2((first - d.start_us) as f64 / 1e6));
    }
    result.rates = d.rates.clone();
    run.latency("reconnect_hello", &d.hello_latency);
    run.latency("setup", &off.setup.latency);
    format!(
        "backlog[{}]: {stored} stored, {delivered} delivered ({missing} missing, {extra} extra), drained in {drain_secs:.2}s ({drain_rate:.0}/s), {} errors; {}",
        args.common.target,
        run.total_errors(),
        results::cpu_text(cpu_us, "delivered message"),
    )
}
