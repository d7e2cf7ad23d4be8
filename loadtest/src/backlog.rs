//! Scenario `backlog`: messages stored for user agents while they are
//! offline, then drained when they come back with the same uaid and
//! channelIDs, as a browser does after a restart.

use crate::crypto::{self, Pool, Vapid};
use crate::fleet::{self, FleetSpec};
use crate::net;
use crate::proto;
use crate::results::{self, Common, CpuMeter, RunResult};
use crate::sender::{self, Endpoint, Outcome};
use crate::stats::{self, Clock, Hist, LatencySummary, RateSampler, Tally};
use crate::throughput::{channel_of, resolve_endpoints};
use anyhow::{bail, Result};
use futures_util::StreamExt;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{watch, Semaphore};
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
    let (targets, push_bases) = common.targets_and_push_bases().await?;
    let nofile = net::raise_nofile_limit();
    if (args.uas + args.senders + 100) as u64 > nofile.soft {
        bail!(
            "{} user agents need more than this process's {} open files",
            args.uas,
            nofile.soft
        );
    }
    let server = common.servers();
    let limit = common.limit();
    let per_ua = common.channels;
    let channels = args.uas * per_ua;
    let per = args.pool.clamp(1, 64).min(args.messages_per_channel);
    let mut result = RunResult::new(
        "backlog",
        common,
        serde_json::json!({
            "uas": args.uas, "channels_per_ua": per_ua,
            "messages_per_channel": args.messages_per_channel, "senders": args.senders,
            "payload_bytes": args.payload, "ttl": args.ttl, "drain_s": args.drain,
            "concurrency": common.concurrency,
        }),
    );
    let run_start = Instant::now();
    let errors = Tally::default();

    // Phase 1: subscribe, then go offline.
    let vapids: Vec<Vapid> = (0..args.senders)
        .map(|_| Vapid::generate())
        .collect::<Result<_>>()?;
    let keys: Arc<Vec<String>> = Arc::new(vapids.iter().map(|v| v.public_b64.clone()).collect());
    let payload = args.payload;
    let pool =
        tokio::task::spawn_blocking(move || Pool::build(channels, per, payload, false)).await??;
    let ids: Arc<Vec<Uuid>> = Arc::new((0..channels).map(|_| proto::new_channel_id()).collect());
    eprintln!("backlog: subscribing {} user agents", args.uas);
    let setup_latency = Hist::new();
    let spec = FleetSpec::new(args.uas, per_ua, common.concurrency, limit);
    let mut ups = fleet::bring_up_all(
        &targets,
        &spec,
        ids.clone(),
        keys.clone(),
        &errors,
        &setup_latency,
    )
    .await;
    let (endpoints, origins) = resolve_endpoints(&ups, per_ua, &push_bases, &errors).await?;
    let uaids: Vec<Option<String>> = ups
        .iter()
        .map(|u| u.as_ref().map(|u| u.uaid.clone()))
        .collect();
    let online = uaids.iter().filter(|u| u.is_some()).count();
    if online == 0 {
        bail!("no user agent could subscribe: {:?}", errors.snapshot());
    }
    let mut closing = JoinSet::new();
    for up in ups.iter_mut() {
        if let Some(up) = up.take() {
            closing.spawn(fleet::close(up.ws));
        }
    }
    while closing.join_next().await.is_some() {}

    // Phase 2: store the backlog.
    let books = Arc::new(Books {
        clock: Clock::new(),
        pool,
        per_ua,
        ids: ids.clone(),
        accepted: (0..channels).map(|_| AtomicU32::new(0)).collect(),
        received: (0..channels).map(|_| AtomicU32::new(0)).collect(),
        delivered: AtomicU64::new(0),
        unexpected: AtomicU64::new(0),
        malformed: AtomicU64::new(0),
        first_us: AtomicU64::new(0),
        last_ack_us: AtomicU64::new(0),
    });
    let endpoints: Arc<Vec<Option<Endpoint>>> = Arc::new(endpoints);
    let client = sender::client(args.senders);
    let send_errors = Arc::new(Tally::default());
    eprintln!(
        "backlog: storing {} messages for {online} offline user agents",
        online * per_ua * args.messages_per_channel
    );
    let cpu = CpuMeter::start(&server);
    let send_start = Instant::now();
    let mut senders = JoinSet::new();
    for (k, v) in vapids.iter().enumerate() {
        let auth: Vec<http::HeaderValue> = origins
            .list
            .iter()
            .map(|(o, _)| v.authorization(o))
            .collect::<Result<_>>()?;
        let mine: Vec<usize> = (k..channels)
            .step_by(args.senders)
            .filter(|&c| endpoints[c].is_some())
            .collect();
        let (books, endpoints, client, send_errors) = (
            books.clone(),
            endpoints.clone(),
            client.clone(),
            send_errors.clone(),
        );
        let (m, ttl) = (args.messages_per_channel, args.ttl);
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
    let stored: u64 = books.accepted.iter().map(|a| a.load(Relaxed) as u64).sum();
    let rss_stored = server.rss_kib();

    // Phase 3: come back and drain.
    eprintln!("backlog: {stored} stored; reconnecting");
    let hello_latency = Arc::new(Hist::new());
    let reconnect_errors = Arc::new(Tally::default());
    let uaid_changed = Arc::new(AtomicU64::new(0));
    let sem = Arc::new(Semaphore::new(common.concurrency.max(1)));
    let drain_start_us = books.clock.now_us();
    let drain_start = Instant::now();
    let drain_deadline = drain_start + stats::secs(args.drain);
    let (samp_stop_tx, mut samp_stop) = watch::channel(false);
    let sampler = {
        let books = books.clone();
        // Drains are often short: sample finely (the phase is bounded by --drain).
        let every = Duration::from_millis(100);
        tokio::spawn(async move {
            let mut s = RateSampler::new(&["delivered"], &[books.delivered.load(Relaxed)]);
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = tick.tick() => s.sample(&[books.delivered.load(Relaxed)]),
                    _ = samp_stop.changed() => break,
                }
            }
            s.sample(&[books.delivered.load(Relaxed)]);
            s.points
        })
    };
    let mut uas = JoinSet::new();
    for (u, uaid) in uaids.iter().enumerate() {
        let Some(uaid) = uaid.clone() else { continue };
        let Ok(permit) = sem.clone().acquire_owned().await else {
            break;
        };
        let target = proto::target_of(&targets, u).clone();
        let (books, ids) = (books.clone(), ids.clone());
        let (hello_latency, errs, uaid_changed) = (
            hello_latency.clone(),
            reconnect_errors.clone(),
            uaid_changed.clone(),
        );
        uas.spawn(async move {
            let t0 = Instant::now();
            let mine = &ids[u * per_ua..(u + 1) * per_ua];
            let up = fleet::bring_up(&target, None, Some((&uaid, mine)), &[], limit).await;
            drop(permit);
            let (mut ws, got, _) = match up {
                Ok(x) => x,
                Err(f) => return errs.add(format!("reconnect {}", f.key())),
            };
            hello_latency.record(u, t0.elapsed().as_micros() as u64);
            if got != uaid {
                uaid_changed.fetch_add(1, Relaxed);
            }
            while books.owed(u) && Instant::now() < drain_deadline {
                let wait = limit.min(drain_deadline.saturating_duration_since(Instant::now()));
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
        });
    }
    fleet::join_all_until(&mut uas, drain_deadline + limit * 2, || {
        format!("  delivered {}/{stored}", books.delivered.load(Relaxed))
    })
    .await;
    let server_cpu = cpu.record(&mut result);
    let _ = samp_stop_tx.send(true);
    let rates = sampler.await.unwrap_or_default();

    let mut delivered = 0u64;
    let mut missing = 0u64;
    let mut extra = 0u64;
    for c in 0..channels {
        let (a, r) = (
            books.accepted[c].load(Relaxed) as u64,
            books.received[c].load(Relaxed) as u64,
        );
        delivered += a.min(r);
        missing += a.saturating_sub(r);
        extra += r.saturating_sub(a);
    }
    let last_ack = books.last_ack_us.load(Relaxed);
    let drain_secs = if last_ack > drain_start_us {
        (last_ack - drain_start_us) as f64 / 1e6
    } else {
        0.0
    };
    let first = books.first_us.load(Relaxed);
    let r2 = |x: f64| (x * 100.0).round() / 100.0;
    stats::merge_tally(&mut result.errors, &errors.snapshot());
    stats::merge_tally(&mut result.errors, &send_errors.snapshot());
    stats::merge_tally(&mut result.errors, &reconnect_errors.snapshot());
    for (name, n) in [
        ("missing (stored, never delivered)", missing),
        ("extra deliveries (duplicates)", extra),
        ("unexpected notification", books.unexpected.load(Relaxed)),
        ("malformed server message", books.malformed.load(Relaxed)),
        ("uaid changed on reconnect", uaid_changed.load(Relaxed)),
    ] {
        if n > 0 {
            result.errors.insert(name.into(), n);
        }
    }
    let drain_rate = if drain_secs > 0.0 {
        delivered as f64 / drain_secs
    } else {
        0.0
    };
    result.metric("uas_subscribed", online as u64);
    result.metric("channels", channels as u64);
    result.metric("stored", stored);
    result.metric(
        "store_per_s",
        r2(if send_secs > 0.0 {
            stored as f64 / send_secs
        } else {
            0.0
        }),
    );
    result.metric("delivered", delivered);
    result.metric("missing", missing);
    result.metric("extra", extra);
    // Milliseconds survive: a fast server drains a small backlog in under 5 ms.
    result.metric("drain_s", (drain_secs * 1e6).round() / 1e6);
    result.metric("drain_per_s", r2(drain_rate));
    // Storing and delivering one message: server CPU from the first POST
    // to the end of the drain.
    let cpu_us = result.cpu_per("server_cpu_us_per_delivered", server_cpu, delivered);
    if first > drain_start_us {
        result.metric("first_message_s", r2((first - drain_start_us) as f64 / 1e6));
    }
    if let Some(rss) = rss_stored {
        result.metric("server_rss_with_backlog_kib", rss);
    }
    result.latency.insert(
        "reconnect_hello".into(),
        LatencySummary::from_hist(&hello_latency.merged()),
    );
    result.latency.insert(
        "setup".into(),
        LatencySummary::from_hist(&setup_latency.merged()),
    );
    result.rates = rates;
    result.elapsed_s = r2(run_start.elapsed().as_secs_f64());
    let total_errors: u64 = result.errors.values().sum();
    result.summary = format!(
        "backlog[{}]: {stored} stored, {delivered} delivered ({missing} missing, {extra} extra), drained in {drain_secs:.2}s ({drain_rate:.0}/s), {total_errors} errors; {}",
        common.target,
        results::cpu_text(cpu_us, "delivered message"),
    );
    result.finish(common.out.as_deref())?;
    Ok(())
}
