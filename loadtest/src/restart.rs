//! Scenario `restart`: how long a Herald holding a large store takes to
//! come back, after a clean stop (SIGTERM) and after kill -9 during a push
//! load (RocksDB then replays its write-ahead log). Unlike the other
//! scenarios it runs the server itself: it builds the state once with
//! `herald import autopush` (an export file it writes), then starts and
//! stops `herald serve` on it, timing from each start until the websocket
//! answers a hello (ready) and until a stored user agent gets its first
//! queued notification (first delivery).

use crate::proto::{self, Target, Ws};
use crate::results::{r2, Common, RunResult};
use crate::sender::{self, Endpoint, Origins, PostOptions};
use crate::stats::Tally;
use anyhow::{bail, Context, Result};
use base64::Engine;
use bytes::Bytes;
use futures_util::StreamExt;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::process::{Child, Command};
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;

#[derive(clap::Args, Clone, Debug)]
pub struct RestartArgs {
    #[command(flatten)]
    pub common: Common,
    /// The herald binary to run (default: the one beside this program).
    #[arg(long)]
    pub herald: Option<PathBuf>,
    /// Herald's data directory. Built with --uas user agents when it holds
    /// no store yet; reused as it is otherwise (state from an earlier run).
    #[arg(long)]
    pub data_dir: PathBuf,
    /// User agents in the store built, each with one channel.
    #[arg(long, default_value_t = 100_000)]
    pub uas: usize,
    /// Messages queued for each user agent in the store built.
    #[arg(long, default_value_t = 10)]
    pub messages_per_ua: usize,
    /// Bytes of (stand-in ciphertext) payload per stored message.
    #[arg(long, default_value_t = 1024)]
    pub payload: usize,
    /// Restarts after each kind of stop (clean, kill -9), alternating.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Seconds of push load before each stop.
    #[arg(long, default_value_t = 2.0)]
    pub load_secs: f64,
    /// Concurrent senders of that load.
    #[arg(long, default_value_t = 8)]
    pub senders: usize,
    /// Offline user agents the load stores messages for (Herald keeps at
    /// most max_stored_messages, 1000 by default, for each).
    #[arg(long, default_value_t = 64)]
    pub load_uas: usize,
}

/// How the server was stopped before a start.
#[derive(Clone, Copy, PartialEq)]
enum Stop {
    Clean,
    Kill,
}

impl Stop {
    fn name(self) -> &'static str {
        match self {
            Stop::Clean => "clean",
            Stop::Kill => "kill9",
        }
    }
}

/// The uaid and channel of stored user agent `i`, as the export names them.
fn stored_ua(i: usize) -> (String, Uuid) {
    let uaid = format!(
        "{:032x}",
        0x5f2c_0d3e_8a9b_4c1d_9e3f_4000_0000_0000u128 + i as u128
    );
    let channel = format!("{i:08x}-0000-4000-8000-{i:012x}");
    let channel = Uuid::parse_str(&channel).expect("a UUID");
    (uaid, channel)
}

pub async fn run(args: RestartArgs) -> Result<()> {
    if args.uas == 0 || args.messages_per_ua == 0 || args.runs == 0 || args.load_uas == 0 {
        bail!("--uas, --messages-per-ua, --runs and --load-uas must be at least 1");
    }
    let common = &args.common;
    let target = Target::new(common.urls.first().map(String::as_str).unwrap_or_default()).await?;
    let herald = match &args.herald {
        Some(h) => h.clone(),
        None => std::env::current_exe()?.with_file_name("herald"),
    };
    crate::net::raise_nofile_limit();
    let mut result = RunResult::new(
        "restart",
        common,
        serde_json::json!({
            "uas": args.uas, "messages_per_ua": args.messages_per_ua, "payload_bytes": args.payload,
            "runs": args.runs, "load_secs": args.load_secs, "senders": args.senders,
            "load_uas": args.load_uas,
        }),
    );
    let db = args.data_dir.join("db");
    if !db.exists() {
        let secs = build_state(&args, &herald).await?;
        result.metric("import_s", r2(secs));
    }
    result.metric("store_bytes", dir_bytes(&db, |_| true));
    let mut server = Server::start(&herald, &args.data_dir, &target).await?;
    server.wait_ready(&target, common.limit()).await?;
    let mut rows = Vec::new();
    let mut full = 0u64;
    for cycle in 0..args.runs * 2 {
        let stop = if cycle % 2 == 0 {
            Stop::Clean
        } else {
            Stop::Kill
        };
        let (load, refused) = push_load(&args, &target).await?;
        // A full mailbox (429) is Herald's rule, not a failure of the load.
        for (why, n) in refused {
            if why.starts_with("429") {
                full += n;
            } else {
                *result
                    .errors
                    .entry(format!("load push: {why}"))
                    .or_insert(0) += n;
            }
        }
        let stop_ms = server.stop(stop).await?;
        let wal = dir_bytes(&db, |n| n.ends_with(".log"));
        server = Server::start(&herald, &args.data_dir, &target).await?;
        let ready = server.wait_ready(&target, common.limit()).await?;
        let ua = next_stored_ua(&args)?;
        let got = server
            .first_delivery(&target, ua, &args, common.limit())
            .await?;
        let mut row = serde_json::Map::new();
        row.insert("after".into(), stop.name().into());
        row.insert("load_accepted".into(), load.into());
        row.insert("stop_ms".into(), stop_ms.into());
        row.insert("wal_bytes_at_start".into(), wal.into());
        row.insert("listening_ms".into(), r2(ready.listening_ms).into());
        row.insert("ready_ms".into(), r2(ready.hello_ms).into());
        row.insert("first_delivery_ms".into(), r2(got.first_ms).into());
        row.insert("drain_ms".into(), r2(got.drain_ms).into());
        row.insert("drained".into(), got.count.into());
        eprintln!("restart: {}", serde_json::Value::Object(row.clone()));
        rows.push(row);
    }
    server.stop(Stop::Clean).await?;
    result.metric("load_refused_429", full);
    record(&mut result, &args, rows);
    result.finish(common.out.as_deref()).map(|_| ())
}

/// Medians per kind of stop, the headline figures; every restart as a row.
fn record(
    result: &mut RunResult,
    args: &RestartArgs,
    rows: Vec<serde_json::Map<String, serde_json::Value>>,
) {
    let mut parts = Vec::new();
    let mut short = 0;
    for stop in [Stop::Clean, Stop::Kill] {
        let mine: Vec<_> = rows.iter().filter(|r| r["after"] == stop.name()).collect();
        for field in [
            "ready_ms",
            "first_delivery_ms",
            "drain_ms",
            "wal_bytes_at_start",
        ] {
            let mut v: Vec<f64> = mine.iter().filter_map(|r| r[field].as_f64()).collect();
            v.sort_by(f64::total_cmp);
            let median = v.get(v.len() / 2).copied().unwrap_or(0.0);
            result.metric(&format!("{}_{field}_median", stop.name()), median);
        }
        short += mine
            .iter()
            .filter(|r| r["drained"].as_u64() != Some(args.messages_per_ua as u64))
            .count();
        parts.push(format!(
            "after {}: ready {} ms, first delivery {} ms",
            stop.name(),
            result.metrics[&format!("{}_ready_ms_median", stop.name())],
            result.metrics[&format!("{}_first_delivery_ms_median", stop.name())],
        ));
    }
    if short > 0 {
        result
            .errors
            .insert("user agent not fully drained".into(), short as u64);
    }
    result.metric(
        "store_mib",
        r2(result.metrics["store_bytes"].as_f64().unwrap_or(0.0) / 1048576.0),
    );
    result.summary = format!(
        "restart: {} MiB store, {} user agents: {} (medians of {})",
        result.metrics["store_mib"],
        args.uas,
        parts.join("; "),
        args.runs
    );
    result.rows = rows;
}

/// Writes the export (one JSON line per user agent, autopush's field
/// names) beside the data directory, imports it, deletes it. Returns the
/// import's seconds.
async fn build_state(args: &RestartArgs, herald: &Path) -> Result<f64> {
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("creating {}", args.data_dir.display()))?;
    let export = args.data_dir.join("restart-export.jsonl");
    eprintln!(
        "restart: writing {} user agents to {}",
        args.uas,
        export.display()
    );
    write_export(args, &export)?;
    eprintln!("restart: importing");
    let t = Instant::now();
    let status = Command::new(herald)
        .args(["import", "autopush", "--from"])
        .arg(&export)
        .arg("--data-dir")
        .arg(&args.data_dir)
        .stdout(Stdio::null())
        .status()
        .await
        .with_context(|| format!("running {} import", herald.display()))?;
    let secs = t.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(&export);
    if !status.success() {
        bail!("herald import failed: {status}");
    }
    Ok(secs)
}

fn write_export(args: &RestartArgs, path: &Path) -> Result<()> {
    let now = crate::results::unix_now();
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let mut noise = 0x9e37_79b9_7f4a_7c15u64;
    let mut data = vec![0u8; args.payload];
    for i in 0..args.uas {
        let (uaid, channel) = stored_ua(i);
        let messages: Vec<_> = (0..args.messages_per_ua)
            .map(|k| {
                // Incompressible, like real ciphertext.
                for b in data.iter_mut() {
                    noise ^= noise << 13;
                    noise ^= noise >> 7;
                    noise ^= noise << 17;
                    *b = noise as u8;
                }
                serde_json::json!({
                    "channelID": channel.to_string(), "version": format!("r{i}-{k}"), "timestamp": now,
                    "ttl": 86400, "sortkey_timestamp": now * 1000 + k as u64,
                    "data": b64.encode(&data), "headers": {"encoding": "aes128gcm"},
                })
            })
            .collect();
        let line = serde_json::json!({
            "uaid": uaid, "connected_at": now * 1000, "router_type": "webpush",
            "router_data": null, "channels": [channel.to_string()], "messages": messages,
        });
        writeln!(out, "{line}")?;
    }
    out.flush()?;
    Ok(())
}

/// A stored user agent no earlier restart drained (this run's or an
/// earlier run's on the same data directory): all its messages are queued.
/// The count of those used is kept in the data directory.
fn next_stored_ua(args: &RestartArgs) -> Result<usize> {
    let path = args.data_dir.join("restart-used");
    let used: usize = std::fs::read_to_string(&path)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    if used >= args.uas {
        bail!(
            "every stored user agent in {} has been drained: delete it to build a fresh store",
            args.data_dir.display()
        );
    }
    std::fs::write(&path, (used + 1).to_string())
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(used)
}

/// Bytes of the files directly in `dir` whose names pass `keep`.
fn dir_bytes(dir: &Path, keep: impl Fn(&str) -> bool) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| keep(&e.file_name().to_string_lossy()))
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum()
}

/// `herald serve` started by this scenario; killed if the scenario fails.
struct Server {
    child: Child,
    started: Instant,
}

struct Ready {
    listening_ms: f64,
    hello_ms: f64,
}

struct Delivered {
    first_ms: f64,
    drain_ms: f64,
    count: usize,
}

impl Server {
    /// Its log goes to serve.log in the data directory. Push quotas are
    /// off: the load is one test client, not abuse.
    async fn start(herald: &Path, data_dir: &Path, target: &Target) -> Result<Server> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(data_dir.join("serve.log"))?;
        let started = Instant::now();
        let child = Command::new(herald)
            .arg("serve")
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--listen")
            .arg(target.addr.to_string())
            .envs([
                ("HERALD_UA_RATE_LIMIT", "off"),
                ("HERALD_SUBSCRIPTION_RATE_LIMIT", "off"),
                ("HERALD_SENDER_RATE_LIMIT", "off"),
                ("HERALD_ANONYMOUS_RATE_LIMIT", "off"),
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", herald.display()))?;
        Ok(Server { child, started })
    }

    fn ms(&self) -> f64 {
        self.started.elapsed().as_secs_f64() * 1000.0
    }

    /// Retries connect and hello (a new user agent) until one is answered.
    async fn wait_ready(&mut self, target: &Target, limit: Duration) -> Result<Ready> {
        let deadline = self.started + limit.max(Duration::from_secs(600));
        let mut listening_ms = None;
        let none = BTreeMap::new();
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("herald serve exited while starting: {status} (see serve.log)");
            }
            if Instant::now() > deadline {
                bail!(
                    "herald serve did not answer a hello in {:?}",
                    deadline - self.started
                );
            }
            if let Ok(tcp) = crate::net::tcp_connect(target.addr, None).await {
                listening_ms.get_or_insert(self.ms());
                if let Ok((mut ws, _)) = proto::handshake(tcp, &target.url).await {
                    let hello = proto::hello_following(&mut ws, None, &[], &none);
                    if let Ok(Ok(_)) = tokio::time::timeout(limit, hello).await {
                        let hello_ms = self.ms();
                        return Ok(Ready {
                            listening_ms: listening_ms.unwrap_or(hello_ms),
                            hello_ms,
                        });
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// Stored user agent `ua` says hello with its uaid and channel; times
    /// its first notification from the start of the server, and the rest
    /// of its queue (each acked) from the first.
    async fn first_delivery(
        &self,
        target: &Target,
        ua: usize,
        args: &RestartArgs,
        limit: Duration,
    ) -> Result<Delivered> {
        let (uaid, channel) = stored_ua(ua);
        let mut ws = proto::open(target, None)
            .await
            .map_err(|f| anyhow::anyhow!("{}", f.key()))?;
        proto::hello_following(&mut ws, Some(&uaid), &[channel], &BTreeMap::new())
            .await
            .map_err(|f| anyhow::anyhow!("stored user agent's {}", f.key()))?;
        let mut first = None;
        let mut count = 0;
        let malformed = AtomicU64::new(0);
        while count < args.messages_per_ua {
            let text = match tokio::time::timeout(limit, ws.next()).await {
                Ok(Some(Ok(Message::Text(t)))) => t,
                Ok(Some(Ok(_))) => continue,
                _ => break,
            };
            let Some(n) = proto::notification(text.as_str(), &malformed) else {
                continue;
            };
            first.get_or_insert_with(|| (self.ms(), Instant::now()));
            count += 1;
            let ack = proto::ack_json(&n.channel_id, &n.version);
            proto::send_text(&mut ws, ack, "ack")
                .await
                .map_err(|f| anyhow::anyhow!("{}", f.key()))?;
        }
        let Some((first_ms, at)) = first else {
            bail!("stored user agent {uaid} received nothing");
        };
        Ok(Delivered {
            first_ms,
            drain_ms: at.elapsed().as_secs_f64() * 1000.0,
            count,
        })
    }

    /// SIGTERM and wait for the exit (returns how long it took), or
    /// SIGKILL.
    async fn stop(&mut self, how: Stop) -> Result<u64> {
        let pid = self.child.id().context("herald serve already exited")? as i32;
        let t = Instant::now();
        let sig = if how == Stop::Clean {
            libc::SIGTERM
        } else {
            libc::SIGKILL
        };
        // SAFETY: kill(2) on the child this scenario started and still owns.
        unsafe { libc::kill(pid, sig) };
        self.child.wait().await?;
        Ok(t.elapsed().as_millis() as u64)
    }
}

/// Registers --load-uas fresh user agents (one channel each, no VAPID
/// key), lets them go, then POSTs to them from --senders for --load-secs;
/// returns the pushes accepted and the refusals by reason. The server's
/// stop follows at once, so a kill -9 lands with writes still in its
/// write-ahead log.
async fn push_load(args: &RestartArgs, target: &Target) -> Result<(u64, BTreeMap<String, u64>)> {
    let mut origins = Origins::default();
    let mut endpoints = Vec::new();
    for _ in 0..args.load_uas {
        let mut ws: Ws = proto::open(target, None)
            .await
            .map_err(|f| anyhow::anyhow!("{}", f.key()))?;
        proto::hello_following(&mut ws, None, &[], &BTreeMap::new())
            .await
            .map_err(|f| anyhow::anyhow!("{}", f.key()))?;
        let url = proto::register(&mut ws, &proto::new_channel_id(), "")
            .await
            .map_err(|f| anyhow::anyhow!("{}", f.key()))?;
        endpoints.push(origins.endpoint(&url).await?);
    }
    let endpoints: Arc<Vec<Endpoint>> = Arc::new(endpoints);
    let client = sender::client(args.senders);
    // A valid aes128gcm header (rs 4096, no key id) and 1 KiB of record.
    let mut body = vec![0u8; 16];
    body.extend(4096u32.to_be_bytes());
    body.push(0);
    body.extend(std::iter::repeat_n(7u8, 1024));
    let body = Bytes::from(body);
    let stop = Arc::new(AtomicBool::new(false));
    let accepted = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(Tally::default());
    let mut tasks = tokio::task::JoinSet::new();
    for s in 0..args.senders {
        let (client, endpoints, body) = (client.clone(), endpoints.clone(), body.clone());
        let (stop, accepted, refused) = (stop.clone(), accepted.clone(), refused.clone());
        tasks.spawn(async move {
            let options = PostOptions {
                ttl: 3600,
                receipt: false,
            };
            let mut k = s;
            while !stop.load(Relaxed) {
                let ep = &endpoints[k % endpoints.len()];
                let reply = sender::post_reply(
                    &client,
                    ep,
                    k,
                    None,
                    body.clone(),
                    options,
                    Duration::from_secs(10),
                )
                .await;
                match reply {
                    Ok(r) if r.status == 201 => {
                        accepted.fetch_add(1, Relaxed);
                    }
                    Ok(r) => refused.add(r.key()),
                    Err(e) => refused.add(e),
                }
                k += 1;
            }
        });
    }
    tokio::time::sleep(Duration::from_secs_f64(args.load_secs)).await;
    stop.store(true, Relaxed);
    tasks.abort_all();
    Ok((accepted.load(Relaxed), refused.snapshot()))
}
