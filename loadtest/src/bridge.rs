//! Scenario `bridge`: mobile devices registered through Herald's
//! registration API (`POST /v1/fcm/{app_id}/registration`), application
//! servers pushing to their endpoints, and Herald forwarding every push to
//! FCM, which here is the in-process sink of `fcm_sink`. Measures pushes
//! accepted per second, pushes arriving at the sink per second, end-to-end
//! latency (POST sent to arrival at the sink) and the server's CPU per
//! bridged message, and accounts for every accepted push: it must arrive
//! exactly once, at the device token that registered its channel.
//!
//! Matching is exact, as in `throughput`: each channel has a few
//! pre-encrypted payloads with their own random salt, the sink sees the
//! payload as the data map's `body`, and (chid, salt) names one outstanding
//! send. Herald must be started with the config `--write-config` writes
//! (or an equivalent `[bridges.fcm.<app_id>]` table pointing at the sink).

use crate::crypto::{self, Pool};
use crate::fcm_sink::{self, FcmMessage, Sink};
use crate::harness::{self, RateWatch, Run};
use crate::net;
use crate::results::{self, r2, Common, CpuMeter, ServerPid};
use crate::sender::{self, Endpoint, HttpClient, Origins, Outcome, SenderPlan};
use crate::stats::{self, Clock, Hist, LatencySummary, Tally};
use anyhow::{bail, Context, Result};
use bytes::Bytes;
use http::{HeaderValue, Method, Request, Uri};
use http_body_util::{BodyExt, Full, Limited};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::*};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use uuid::Uuid;

/// Largest plaintext whose push still fits FCM's 4096-byte data map. The
/// map `{"chid":"<36>","body":"<base64url>","con":"aes128gcm"}` has 75 bytes
/// besides the body, so the body's base64url may take 4021 bytes: a body of
/// at most 3015 bytes, which `crypto::body_len` reaches at 2815 bytes of
/// plaintext (2918-byte body; 2816 would pad to 3046).
pub const MAX_BRIDGED_PLAINTEXT: usize = 2815;

#[derive(clap::Args, Clone, Debug)]
pub struct BridgeArgs {
    /// Herald's base URL (http://host:port, loopback only): the registration
    /// API is under it.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub target: String,
    /// The `{app_id}` of the registration API: Herald's `[bridges.fcm.<app_id>]`.
    #[arg(long, default_value = "loadtest")]
    pub app_id: String,
    /// The service-account JSON Herald's bridge uses (from --write-config):
    /// the sink listens at its `token_uri`'s address and verifies grants
    /// with its key.
    #[arg(long)]
    pub credentials: Option<PathBuf>,
    /// The FCM project: the `project_id` of Herald's bridge settings.
    #[arg(long, default_value = "herald-loadtest")]
    pub project_id: String,
    /// Only write `service-account.json` and `herald-bridge.toml` (start
    /// Herald with `--config DIR/herald-bridge.toml`) into DIR, then exit.
    #[arg(long, value_name = "DIR")]
    pub write_config: Option<PathBuf>,
    /// With --write-config: where the sink will listen (loopback).
    #[arg(long, default_value = "127.0.0.1:9190")]
    pub sink: SocketAddr,
    /// Registered devices (each its own FCM token).
    #[arg(long, default_value_t = 100)]
    pub uas: usize,
    /// Channels (subscriptions) per device: the first from the registration,
    /// the others from `…/subscription`.
    #[arg(long, default_value_t = 1)]
    pub channels: usize,
    /// Concurrent senders, each with its own VAPID key (channels are bound
    /// to their sender's key) and one request in flight.
    #[arg(long, default_value_t = 16)]
    pub senders: usize,
    /// Plaintext bytes per push, at most 2815 (FCM's 4096-byte data map).
    #[arg(long, default_value_t = 1024)]
    pub payload: usize,
    /// Target push rate across all senders (open loop); 0: as fast as
    /// responses come back.
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// Seconds to send for.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Stop after this many pushes (0: no limit; --duration still bounds the run).
    #[arg(long, default_value_t = 0)]
    pub messages: u64,
    /// Seconds to wait after sending for pushes still on their way to the sink.
    #[arg(long, default_value_t = 10.0)]
    pub drain: f64,
    /// Pre-encrypted payloads per channel: the most pushes one channel may
    /// have outstanding (accepted, not yet at the sink).
    #[arg(long, default_value_t = 4)]
    pub pool: usize,
    /// TTL header of each push, seconds.
    #[arg(long, default_value_t = 60)]
    pub ttl: u32,
    /// Name of the system under test, recorded in the results.
    #[arg(long, default_value = "herald")]
    pub name: String,
    /// Where to write the JSON results (default: loadtest/results/bridge-<name>-<time>.json).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// PID of the server (NAME=PID allowed, comma-separated for several),
    /// for its CPU time and memory from /proc.
    #[arg(long, value_name = "[NAME=]PID[,...]", value_delimiter = ',', value_parser = results::parse_server_pid)]
    pub server_pid: Vec<ServerPid>,
    /// Registrations in flight at once.
    #[arg(long, default_value_t = 50)]
    pub concurrency: usize,
    /// Seconds any single request may take before it counts as failed.
    #[arg(long, default_value_t = 10.0)]
    pub timeout: f64,
}

impl BridgeArgs {
    fn common(&self) -> Common {
        Common {
            urls: vec![self.target.clone()],
            push_urls: Vec::new(),
            target: self.name.clone(),
            out: self.out.clone(),
            server_pid: self.server_pid.clone(),
            concurrency: self.concurrency,
            timeout: self.timeout,
            channels: self.channels,
        }
    }

    fn check(&self) -> Result<()> {
        if self.uas == 0 || self.senders == 0 || self.channels == 0 || self.concurrency == 0 {
            bail!("--uas, --senders, --channels and --concurrency must be at least 1");
        }
        if !(1..=64).contains(&self.pool) {
            bail!("--pool must be 1..=64");
        }
        if self.payload == 0 || self.payload > MAX_BRIDGED_PLAINTEXT {
            bail!("--payload must be 1..={MAX_BRIDGED_PLAINTEXT} bytes: FCM's data map holds 4096 bytes");
        }
        if self.app_id.is_empty()
            || !self
                .app_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        {
            bail!(
                "--app-id {:?}: letters, digits, '.', '_' and '-' only",
                self.app_id
            );
        }
        Ok(())
    }
}

pub async fn run(args: BridgeArgs) -> Result<()> {
    args.check()?;
    if let Some(dir) = &args.write_config {
        return write_config(&args, dir);
    }
    let Some(creds_path) = &args.credentials else {
        bail!(
            "--credentials is needed: make it and Herald's config with \
             `herald-loadtest bridge --write-config DIR`, start Herald with \
             `--config DIR/herald-bridge.toml`, then pass --credentials DIR/service-account.json"
        );
    };
    let creds = fcm_sink::read_credentials(creds_path)?;
    let sink = Sink::bind(creds, &args.project_id).await?;
    let sink_addr = sink.addr()?;
    let api = Api::new(&args.target, &args.app_id).await?;
    let common = args.common();
    let mut run = Run::start_http(
        "bridge",
        &common,
        json!({
            "uas": args.uas, "channels_per_ua": args.channels, "senders": args.senders,
            "payload_bytes": args.payload, "rate": args.rate, "duration_s": args.duration,
            "messages": args.messages, "pool": args.pool, "ttl": args.ttl,
            "app_id": args.app_id, "project_id": args.project_id,
            "sink": sink_addr.to_string(), "concurrency": args.concurrency,
        }),
    );
    run.need_files(
        args.concurrency + args.senders + 200,
        "registrations and senders",
    )?;
    run.require_readable_servers()?;

    let channels = args.uas * args.channels;
    eprintln!("bridge: encrypting {} payloads", channels * args.pool);
    let pool = harness::payload_pool(channels, args.pool, args.payload, false).await?;
    let (vapids, keys) = harness::vapids(args.senders)?;
    let sh = Arc::new(Shared::new(pool, args.channels, channels));
    let sink = {
        let sh = sh.clone();
        sink.serve(Arc::new(move |m| sh.on_message(&m)))
    };
    eprintln!(
        "bridge: FCM sink on {sink_addr}; registering {} devices with {} (app {})",
        args.uas, args.target, args.app_id
    );
    let client = sender::client(args.senders.max(args.concurrency));
    let devices = register_all(&args, &api, &client, &keys, &sh.setup_latency, run.limit).await?;
    let registered = devices.iter().flatten().count();
    let (endpoints, origins) = endpoints_of(&devices, args.channels, &sh.setup_errors).await?;
    sh.index
        .set(Index::new(&devices, args.channels))
        .map_err(|_| anyhow::anyhow!("index set twice"))?;
    let plans = sender::plan_senders(&vapids, &origins, endpoints.iter().map(Option::is_some))?;
    let rss_before = run.server.rss_each();
    let sent = send_and_drain(&args, &mut run, &sh, plans, Arc::new(endpoints), client).await;
    let rss_after = run.server.rss_each();
    run.result
        .server_rss(rss_before.as_deref(), rss_after.as_deref());
    let summary = record(&args, &mut run, &sh, &sent, registered, &sink.counts);
    drop(sink);
    run.finish(summary)
}

fn write_config(args: &BridgeArgs, dir: &std::path::Path) -> Result<()> {
    let (creds, config) = fcm_sink::write_config(dir, args.sink, &args.app_id, &args.project_id)?;
    println!(
        "wrote {} and {}\nstart Herald with: herald serve --config {} ...\nthen run: herald-loadtest bridge --target <Herald's base URL> --app-id {} --project-id {} --credentials {}",
        creds.display(),
        config.display(),
        config.display(),
        args.app_id,
        args.project_id,
        creds.display()
    );
    Ok(())
}

/// Herald's registration API: where to connect and which app to register for.
struct Api {
    addr: SocketAddr,
    host: HeaderValue,
    app_id: String,
}

impl Api {
    async fn new(base: &str, app_id: &str) -> Result<Api> {
        let uri: Uri = base
            .parse()
            .with_context(|| format!("invalid --target {base:?}"))?;
        if uri.scheme_str() != Some("http") {
            bail!("--target {base}: http:// only");
        }
        let (host, port) = net::host_port(&uri)?;
        let addr = net::loopback_addr(&host, port).await?;
        let authority = uri.authority().context("--target has no host")?;
        Ok(Api {
            addr,
            host: HeaderValue::from_str(authority.as_str())?,
            app_id: app_id.to_string(),
        })
    }

    fn registration_path(&self) -> String {
        format!("/v1/fcm/{}/registration", self.app_id)
    }
}

/// A device as the registration API left it: its FCM token, and its
/// channels' ids and endpoints (channel k of the device is the k-th).
#[derive(Debug, Clone)]
struct Device {
    token: String,
    channels: Vec<(Uuid, String)>,
}

/// `{"uaid","channelID","endpoint","secret"}` from a registration.
#[derive(Debug, PartialEq)]
pub struct Registered {
    pub uaid: String,
    pub channel: Uuid,
    pub endpoint: String,
    pub secret: String,
}

pub fn parse_registered(body: &[u8]) -> Result<Registered, String> {
    let v: Value = serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
    let s = |k: &str| {
        v[k].as_str()
            .map(str::to_string)
            .ok_or_else(|| format!("no string `{k}`"))
    };
    let (channel, endpoint) = parse_channel(&v)?;
    Ok(Registered {
        uaid: s("uaid")?,
        channel,
        endpoint,
        secret: s("secret")?,
    })
}

/// `channelID` (any UUID form) and `endpoint` of a registration or
/// subscription answer.
pub fn parse_channel(v: &Value) -> Result<(Uuid, String), String> {
    let id = v["channelID"].as_str().ok_or("no string `channelID`")?;
    let id = Uuid::try_parse(id).map_err(|_| format!("channelID {id:?} is not a UUID"))?;
    let ep = v["endpoint"].as_str().ok_or("no string `endpoint`")?;
    Ok((id, ep.to_string()))
}

/// Why a device could not be registered.
enum RegFail {
    /// 404 on the registration route: this Herald has no registration API.
    NoRoute(String),
    Other(String),
}

/// One JSON POST to the API: status and body.
async fn post_json(
    client: &HttpClient,
    api: &Api,
    path: &str,
    auth: Option<&str>,
    body: &Value,
    limit: Duration,
) -> Result<(u16, Bytes), String> {
    let mut req = Request::builder()
        .method(Method::POST)
        .uri(sender::rewrite(api.addr, path).map_err(|e| e.to_string())?)
        .header(http::header::HOST, api.host.clone())
        .header(http::header::CONTENT_TYPE, "application/json");
    if let Some(a) = auth {
        req = req.header(http::header::AUTHORIZATION, a);
    }
    let req = req
        .body(Full::new(Bytes::from(body.to_string())))
        .map_err(|e| format!("request: {e}"))?;
    let exchange = async {
        let resp = client.request(req).await.map_err(|e| {
            if e.is_connect() {
                "connect".to_string()
            } else {
                "request".to_string()
            }
        })?;
        let status = resp.status().as_u16();
        let b = Limited::new(resp.into_body(), 64 * 1024)
            .collect()
            .await
            .map_err(|_| "reading response body".to_string())?;
        Ok((status, b.to_bytes()))
    };
    tokio::time::timeout(limit, exchange)
        .await
        .unwrap_or_else(|_| Err("timeout".into()))
}

/// Registers device `u` (token `token`) with its first channel bound to
/// `keys[0]`, then subscribes one more channel per further key.
async fn register_device(
    client: &HttpClient,
    api: &Api,
    token: String,
    keys: Vec<String>,
    limit: Duration,
) -> Result<Device, RegFail> {
    let path = api.registration_path();
    let (status, body) = post_json(
        client,
        api,
        &path,
        None,
        &json!({"token": token, "key": keys[0]}),
        limit,
    )
    .await
    .map_err(|e| RegFail::Other(format!("register: {e}")))?;
    let text = || {
        String::from_utf8_lossy(&body)
            .chars()
            .take(300)
            .collect::<String>()
    };
    match status {
        200 => {}
        404 => return Err(RegFail::NoRoute(text())),
        s => return Err(RegFail::Other(format!("register: status {s} {}", text()))),
    }
    let reg = parse_registered(&body).map_err(|e| RegFail::Other(format!("register: {e}")))?;
    let mut channels = vec![(reg.channel, reg.endpoint)];
    let sub_path = format!("{path}/{}/subscription", reg.uaid);
    let auth = format!("webpush {}", reg.secret);
    for key in &keys[1..] {
        let (status, body) = post_json(
            client,
            api,
            &sub_path,
            Some(&auth),
            &json!({ "key": key }),
            limit,
        )
        .await
        .map_err(|e| RegFail::Other(format!("subscribe: {e}")))?;
        if status != 200 {
            return Err(RegFail::Other(format!("subscribe: status {status}")));
        }
        let v: Value = serde_json::from_slice(&body)
            .map_err(|e| RegFail::Other(format!("subscribe: not JSON: {e}")))?;
        channels.push(parse_channel(&v).map_err(|e| RegFail::Other(format!("subscribe: {e}")))?);
    }
    Ok(Device { token, channels })
}

/// Every device registered, --concurrency at a time; channel c is bound
/// to sender c % senders' key. Fails the run when the API is missing (404)
/// or nothing could be registered.
async fn register_all(
    args: &BridgeArgs,
    api: &Api,
    client: &HttpClient,
    keys: &Arc<Vec<String>>,
    latency: &Hist,
    limit: Duration,
) -> Result<Vec<Option<Device>>> {
    let api = Arc::new(Api {
        addr: api.addr,
        host: api.host.clone(),
        app_id: api.app_id.clone(),
    });
    let gate = Arc::new(Semaphore::new(args.concurrency));
    let run_id: u32 = rand::random();
    let mut tasks = JoinSet::new();
    for u in 0..args.uas {
        let (api, client, gate) = (api.clone(), client.clone(), gate.clone());
        let per = args.channels;
        let mine: Vec<String> = (0..per)
            .map(|k| keys[(u * per + k) % keys.len()].clone())
            .collect();
        let token = format!("loadtest-{run_id:08x}-{u}");
        tasks.spawn(async move {
            let _permit = gate.acquire_owned().await;
            let t = Instant::now();
            let r = register_device(&client, &api, token, mine, limit).await;
            (u, r, t.elapsed())
        });
    }
    let mut devices = vec![None; args.uas];
    let (mut no_route, mut first_error) = (None, None);
    let errors = Tally::default();
    while let Some(done) = tasks.join_next().await {
        let (u, r, took) = done?;
        match r {
            Ok(d) => {
                latency.record(u, took.as_micros() as u64);
                devices[u] = Some(d);
            }
            Err(RegFail::NoRoute(body)) => no_route = Some(body),
            Err(RegFail::Other(e)) => {
                errors.add(e.split(" {").next().unwrap_or(&e).to_string());
                first_error.get_or_insert(e);
            }
        }
    }
    if let Some(body) = no_route {
        bail!(
            "Herald answered 404 to POST {}: it has no registration API (issue 22's \
             `/v1/fcm/{{app_id}}/registration`); body: {body}",
            api.registration_path()
        );
    }
    if devices.iter().all(Option::is_none) {
        bail!(
            "no device could be registered: {}",
            first_error.unwrap_or_default()
        );
    }
    if errors.total() > 0 {
        eprintln!("  registration failures: {:?}", errors.snapshot());
    }
    Ok(devices)
}

/// Push endpoints by channel index, loopback-checked.
async fn endpoints_of(
    devices: &[Option<Device>],
    per: usize,
    errors: &Tally,
) -> Result<(Vec<Option<Endpoint>>, Origins)> {
    let mut origins = Origins::with_push_urls(&[]).await?;
    let mut eps = vec![None; devices.len() * per];
    for (u, d) in devices.iter().enumerate() {
        let Some(d) = d else {
            errors.add("registration failed");
            continue;
        };
        for (k, (_, url)) in d.channels.iter().enumerate() {
            match origins.endpoint(url).await {
                Ok(ep) => eps[u * per + k] = Some(ep),
                Err(e) => errors.add(format!("endpoint: {e:#}")),
            }
        }
    }
    Ok((eps, origins))
}

/// Who each channel id is and which device token must receive it.
struct Index {
    by_chid: HashMap<Uuid, usize>,
    /// Device token by device index.
    tokens: Vec<String>,
}

impl Index {
    fn new(devices: &[Option<Device>], per: usize) -> Index {
        let mut by_chid = HashMap::new();
        let mut tokens = vec![String::new(); devices.len()];
        for (u, d) in devices.iter().enumerate() {
            let Some(d) = d else { continue };
            tokens[u] = d.token.clone();
            for (k, (id, _)) in d.channels.iter().enumerate() {
                by_chid.insert(*id, u * per + k);
            }
        }
        Index { by_chid, tokens }
    }
}

/// What senders and the sink share. Per channel: `pool` slots of a send
/// timestamp each (0 = free).
struct Shared {
    clock: Clock,
    pool: Pool,
    per_ua: usize,
    index: OnceLock<Index>,
    slots: Vec<AtomicU64>,
    latency: Hist,
    post_latency: Hist,
    setup_latency: Hist,
    setup_errors: Tally,
    forwarded: AtomicU64,
    duplicates: AtomicU64,
    misrouted: AtomicU64,
    unexpected: AtomicU64,
    last_arrival_us: AtomicU64,
    sent: AtomicU64,
    accepted: AtomicU64,
    claimed: AtomicU64,
    forwarded_after_error: AtomicU64,
    stalls: AtomicU64,
    send_errors: Tally,
}

impl Shared {
    /// `channels` channels, `per_ua` of them per device.
    fn new(pool: Pool, per_ua: usize, channels: usize) -> Shared {
        let slots = channels * pool.per_channel;
        Shared {
            clock: Clock::new(),
            pool,
            per_ua,
            index: OnceLock::new(),
            slots: (0..slots).map(|_| AtomicU64::new(0)).collect(),
            latency: Hist::new(),
            post_latency: Hist::new(),
            setup_latency: Hist::new(),
            setup_errors: Tally::default(),
            forwarded: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            misrouted: AtomicU64::new(0),
            unexpected: AtomicU64::new(0),
            last_arrival_us: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            claimed: AtomicU64::new(0),
            forwarded_after_error: AtomicU64::new(0),
            stalls: AtomicU64::new(0),
            send_errors: Tally::default(),
        }
    }

    fn slot(&self, channel: usize, s: usize) -> &AtomicU64 {
        &self.slots[channel * self.pool.per_channel + s]
    }

    /// One message at the sink: which send it is, whether it reached the
    /// device token that registered its channel, whether it came before.
    fn on_message(&self, m: &FcmMessage) {
        let now = self.clock.now_us();
        let found = self.index.get().and_then(|ix| {
            let c = *ix.by_chid.get(&Uuid::try_parse(&m.chid).ok()?)?;
            Some((c, ix.tokens[c / self.per_ua] == m.token))
        });
        let Some((c, right_device)) = found else {
            self.unexpected.fetch_add(1, Relaxed);
            return;
        };
        if !right_device {
            self.misrouted.fetch_add(1, Relaxed);
            return;
        }
        let slot = m
            .body
            .as_deref()
            .and_then(crypto::salt_from_data)
            .and_then(|salt| self.pool.slot_of(c, &salt));
        let Some(s) = slot else {
            self.unexpected.fetch_add(1, Relaxed);
            return;
        };
        let sent = self.slot(c, s).swap(0, AcqRel);
        if sent == 0 {
            self.duplicates.fetch_add(1, Relaxed);
            return;
        }
        self.latency.record(c, now.saturating_sub(sent));
        self.forwarded.fetch_add(1, Relaxed);
        stats::fetch_max(&self.last_arrival_us, now);
    }

    fn outstanding(&self) -> u64 {
        self.slots.iter().filter(|s| s.load(Acquire) != 0).count() as u64
    }
}

/// What the send and drain phases measured.
struct Sent {
    send_secs: f64,
    send_start_us: u64,
    lost: u64,
    server_cpu: Option<f64>,
}

/// Senders run for --duration, then the sink gets --drain seconds to see
/// what was accepted.
async fn send_and_drain(
    args: &BridgeArgs,
    run: &mut Run<'_>,
    sh: &Arc<Shared>,
    plans: Vec<SenderPlan>,
    endpoints: Arc<Vec<Option<Endpoint>>>,
    client: HttpClient,
) -> Sent {
    let interval = (args.rate > 0.0).then(|| stats::secs(args.senders as f64 / args.rate));
    eprintln!(
        "bridge: sending for {}s with {} senders{}",
        args.duration,
        args.senders,
        match interval {
            Some(_) => format!(" at {} pushes/s", args.rate),
            None => " as fast as possible".into(),
        }
    );
    let sample_every = stats::sample_interval(stats::secs(args.duration + 1.0));
    let rates = {
        let sh = sh.clone();
        RateWatch::spawn(&["accepted", "forwarded"], sample_every, move || {
            vec![sh.accepted.load(Relaxed), sh.forwarded.load(Relaxed)]
        })
    };
    let cpu = CpuMeter::start(&run.server);
    let send_start_us = sh.clock.now_us();
    let send_start = Instant::now();
    let how = Pace {
        deadline: send_start + stats::secs(args.duration),
        interval,
        max_messages: args.messages,
        ttl: args.ttl,
        limit: run.limit,
    };
    let mut senders = JoinSet::new();
    for plan in plans.into_iter().filter(|p| !p.channels.is_empty()) {
        let (sh, endpoints, client) = (sh.clone(), endpoints.clone(), client.clone());
        senders.spawn(async move { sender_loop(plan, &sh, &endpoints, &client, how).await });
    }
    while senders.join_next().await.is_some() {}
    let send_secs = send_start.elapsed().as_secs_f64();
    let drain_deadline = Instant::now() + stats::secs(args.drain);
    while sh.outstanding() > 0 && Instant::now() < drain_deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let lost = sh.outstanding();
    let server_cpu = cpu.record(&mut run.result);
    run.result.rates = rates.stop().await;
    Sent {
        send_secs,
        send_start_us,
        lost,
        server_cpu,
    }
}

/// How a sender paces itself.
#[derive(Clone, Copy)]
struct Pace {
    deadline: Instant,
    interval: Option<Duration>,
    max_messages: u64,
    ttl: u32,
    limit: Duration,
}

/// Sends to its channels round-robin, never reusing a pool slot still
/// outstanding (so (chid, salt) stays unique), until the deadline or the
/// message limit.
async fn sender_loop(
    plan: SenderPlan,
    sh: &Shared,
    endpoints: &[Option<Endpoint>],
    client: &HttpClient,
    how: Pace,
) {
    let per = sh.pool.per_channel;
    let n = plan.channels.len();
    let mut next_slot = vec![0u8; n];
    let (mut cursor, mut posts) = (0usize, 0usize);
    let mut next_at = Instant::now();
    while Instant::now() < how.deadline {
        if let Some(iv) = how.interval {
            next_at += iv;
            if next_at > Instant::now() {
                tokio::time::sleep_until(next_at.min(how.deadline).into()).await;
            }
            if Instant::now() >= how.deadline {
                break;
            }
        }
        if how.max_messages > 0 && sh.claimed.fetch_add(1, Relaxed) >= how.max_messages {
            break;
        }
        let pick = (0..n).map(|k| (cursor + k) % n).find(|&i| {
            let c = plan.channels[i] as usize;
            sh.slot(c, next_slot[i] as usize).load(Acquire) == 0
        });
        let Some(i) = pick else {
            // Every channel has `pool` pushes outstanding: Herald forwards
            // slower than it accepts. Wait rather than lose exact matching.
            sh.stalls.fetch_add(1, Relaxed);
            if how.max_messages > 0 {
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
        let out = sender::post(
            client,
            ep,
            posts,
            &plan.auth[ep.origin],
            sh.pool.body(c, s).clone(),
            how.ttl,
            how.limit,
        )
        .await;
        posts += 1;
        sh.post_latency
            .record(c, sh.clock.now_us().saturating_sub(ts));
        if out == Outcome::Status(201) {
            sh.accepted.fetch_add(1, Relaxed);
        } else {
            sh.send_errors.add(out.key());
            if slot.compare_exchange(ts, 0, AcqRel, Acquire).is_err() {
                // At the sink although the POST failed (a timeout after
                // Herald stored it): matched, so counted.
                sh.forwarded_after_error.fetch_add(1, Relaxed);
            }
        }
    }
}

/// Counts, rates, latency and notes into the results; returns the summary.
fn record(
    args: &BridgeArgs,
    run: &mut Run<'_>,
    sh: &Shared,
    sent: &Sent,
    registered: usize,
    sink: &fcm_sink::SinkCounts,
) -> String {
    let accepted = sh.accepted.load(Relaxed);
    let forwarded = sh.forwarded.load(Relaxed);
    let last = sh.last_arrival_us.load(Relaxed);
    let arrival_secs = last.saturating_sub(sent.send_start_us) as f64 / 1e6;
    let per_s = |n: u64, s: f64| if s > 0.0 { n as f64 / s } else { 0.0 };
    let (accepted_rate, forwarded_rate) = (
        per_s(accepted, sent.send_secs),
        per_s(forwarded, arrival_secs),
    );
    let lat = LatencySummary::from_hist(&sh.latency.merged());
    run.errors_from(&[&sh.setup_errors, &sh.send_errors]);
    let c = |a: &AtomicU64| a.load(Relaxed);
    run.error_counts(&[
        ("lost (accepted, never at the sink)", sent.lost),
        ("duplicate at the sink", c(&sh.duplicates)),
        ("at the sink for another device token", c(&sh.misrouted)),
        ("unexpected message at the sink", c(&sh.unexpected)),
        ("sink: grant refused", c(&sink.grants_refused)),
        ("sink: 401 (bearer token not issued)", c(&sink.unauthorized)),
        ("sink: 400 (not an FCM v1 message)", c(&sink.malformed)),
        ("sink: 404 (wrong project or path)", c(&sink.not_found)),
    ]);
    let m = &mut run.result;
    m.metric("uas_registered", registered as u64);
    m.metric("channels", (registered * args.channels) as u64);
    m.metric("senders", args.senders as u64);
    m.metric("payload_bytes", args.payload as u64);
    m.metric("body_bytes", crypto::body_len(args.payload) as u64);
    m.metric("sent", c(&sh.sent));
    m.metric("accepted", accepted);
    m.metric("forwarded", forwarded);
    m.metric("lost", sent.lost);
    m.metric("duplicates", c(&sh.duplicates));
    m.metric("misrouted", c(&sh.misrouted));
    m.metric("forwarded_after_error", c(&sh.forwarded_after_error));
    m.metric("accepted_per_s", r2(accepted_rate));
    m.metric("forwarded_per_s", r2(forwarded_rate));
    m.metric("send_phase_s", r2(sent.send_secs));
    m.metric("sender_stalls", c(&sh.stalls));
    m.metric("sink_grants", c(&sink.grants));
    m.metric("sink_sends", c(&sink.sends));
    if args.rate > 0.0 {
        m.metric("target_rate_per_s", args.rate);
    }
    let cpu_us = m.cpu_per("server_cpu_us_per_forwarded", sent.server_cpu, forwarded);
    m.latency.insert("end_to_end".into(), lat.clone());
    run.latency("post", &sh.post_latency);
    run.latency("registration", &sh.setup_latency);
    if c(&sh.stalls) > 0 {
        run.result.notes.push(format!(
            "senders waited {} times for a channel with a free slot: Herald forwarded slower than it accepted (raise --pool or --uas to queue more)",
            c(&sh.stalls)
        ));
    }
    if args.rate > 0.0 && accepted_rate < args.rate * 0.95 {
        run.result.notes.push(format!(
            "accepted {accepted_rate:.0}/s, below the {} pushes/s target",
            args.rate
        ));
    }
    let total_errors = run.total_errors();
    format!(
        "bridge[{}]: {accepted} accepted ({accepted_rate:.0}/s), {forwarded} at the FCM sink ({forwarded_rate:.0}/s), {} lost, {} duplicates, {total_errors} errors; latency {}; {}",
        run.common.target,
        sent.lost,
        c(&sh.duplicates),
        lat.short(),
        results::cpu_text(cpu_us, "bridged message"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registration_answers_are_parsed() {
        let r = parse_registered(
            br#"{"uaid":"3f1b5f2ea8e04b7d9b7b0f4c4e7a9a10","channelID":"5F2B1C3A-0000-4000-8000-000000000001",
                "endpoint":"http://127.0.0.1:1/wpush/v2/abc","secret":"f694"}"#,
        )
        .unwrap();
        assert_eq!(r.uaid, "3f1b5f2ea8e04b7d9b7b0f4c4e7a9a10");
        assert_eq!(
            r.channel.to_string(),
            "5f2b1c3a-0000-4000-8000-000000000001"
        );
        assert_eq!(
            (r.endpoint.as_str(), r.secret.as_str()),
            ("http://127.0.0.1:1/wpush/v2/abc", "f694")
        );
        assert!(
            parse_registered(br#"{"uaid":"u","channelID":"x","endpoint":"e","secret":"s"}"#)
                .unwrap_err()
                .contains("not a UUID")
        );
        assert!(parse_registered(
            br#"{"channelID":"5f2b1c3a00004000800000000000000a","endpoint":"e","secret":"s"}"#
        )
        .unwrap_err()
        .contains("uaid"));
        assert!(parse_registered(b"<html>").is_err());
    }

    #[test]
    fn bridged_payload_limit_is_fcms_data_map() {
        let map = |payload: usize| {
            let body = vec![0u8; crypto::body_len(payload)];
            json!({"chid": Uuid::nil().hyphenated().to_string(),
                   "body": base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, body),
                   "con": "aes128gcm"})
            .to_string()
            .len()
        };
        assert!(map(MAX_BRIDGED_PLAINTEXT) <= 4096);
        assert!(map(MAX_BRIDGED_PLAINTEXT + 1) > 4096);
    }

    /// The sink's callback: exact matching of (chid, salt), the device
    /// token checked, repeats counted as duplicates.
    #[test]
    fn arrivals_are_matched_to_their_send_once() {
        let pool = Pool::build(4, 2, 32, false).unwrap();
        let sh = Shared::new(pool, 2, 4);
        let ids: Vec<Uuid> = (0..4).map(|_| crate::proto::new_channel_id()).collect();
        let devices: Vec<Option<Device>> = (0..2)
            .map(|u| {
                Some(Device {
                    token: format!("tok-{u}"),
                    channels: (0..2).map(|k| (ids[u * 2 + k], String::new())).collect(),
                })
            })
            .collect();
        let msg = |c: usize, s: usize, token: &str| FcmMessage {
            token: token.into(),
            chid: ids[c].to_string(),
            body: Some(base64::Engine::encode(
                &base64::engine::general_purpose::URL_SAFE_NO_PAD,
                sh.pool.body(c, s),
            )),
            con: Some("aes128gcm".into()),
            ..Default::default()
        };
        sh.slot(3, 1).store(5, Relaxed);
        // Before the index exists nothing can be matched.
        sh.on_message(&msg(3, 1, "tok-1"));
        assert_eq!(sh.unexpected.load(Relaxed), 1);
        assert!(sh.index.set(Index::new(&devices, 2)).is_ok());
        // Channel 3 is device 1's: at device 0's token it is misrouted.
        sh.on_message(&msg(3, 1, "tok-0"));
        assert_eq!(sh.misrouted.load(Relaxed), 1);
        sh.on_message(&msg(3, 1, "tok-1"));
        assert_eq!(sh.forwarded.load(Relaxed), 1);
        assert_eq!(sh.outstanding(), 0);
        sh.on_message(&msg(3, 1, "tok-1"));
        assert_eq!(sh.duplicates.load(Relaxed), 1);
        // Another channel's payload under channel 2's id: no such salt.
        let mut wrong = msg(0, 0, "tok-1");
        wrong.chid = ids[2].to_string();
        sh.on_message(&wrong);
        assert_eq!(sh.unexpected.load(Relaxed), 2);
        assert_eq!(sh.latency.merged().len(), 1);
    }
}
