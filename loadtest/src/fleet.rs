//! Bringing up many user agents at once and holding them: the part every
//! scenario shares.

use crate::proto::{self, Failure, Target, Ws};
use crate::stats::{Hist, Tally};
use futures_util::StreamExt;
use std::collections::BTreeMap;
use std::future::Future;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;

/// Waits for every task in `uas` until `end`, printing `progress()` to stderr
/// at most every two seconds as tasks finish; the rest are then aborted.
pub async fn join_all_until(uas: &mut JoinSet<()>, end: Instant, progress: impl Fn() -> String) {
    let mut last_print = Instant::now();
    while tokio::time::timeout_at(end.into(), uas.join_next())
        .await
        .ok()
        .flatten()
        .is_some()
    {
        if last_print.elapsed() > Duration::from_secs(2) {
            eprintln!("{}", progress());
            last_print = Instant::now();
        }
    }
    uas.abort_all();
}

/// Runs one protocol step under a deadline, naming the step on timeout.
pub async fn step<T>(
    phase: &'static str,
    limit: Duration,
    fut: impl Future<Output = Result<T, Failure>>,
) -> Result<T, Failure> {
    match tokio::time::timeout(limit, fut).await {
        Ok(r) => r,
        Err(_) => Err(Failure::timeout(phase)),
    }
}

/// Connect, `hello` (fresh, or resuming `uaid` with its channels) and
/// register `register` channels, each step bounded by `limit`. Returns the
/// socket, the uaid and one endpoint per registered channel.
pub async fn bring_up(
    target: &Target,
    src: Option<IpAddr>,
    resume: Option<(&str, &[Uuid])>,
    register: &[(Uuid, &str)],
    limit: Duration,
) -> Result<(Ws, String, Vec<String>), Failure> {
    bring_up_inner(target, src, resume, &BTreeMap::new(), register, limit).await
}

/// A fresh user agent following `broadcasts` (id -> version it knows) from
/// its `hello` on, as Firefox follows remote settings.
pub async fn bring_up_following(
    target: &Target,
    src: Option<IpAddr>,
    broadcasts: &BTreeMap<String, String>,
    register: &[(Uuid, &str)],
    limit: Duration,
) -> Result<(Ws, String, Vec<String>), Failure> {
    bring_up_inner(target, src, None, broadcasts, register, limit).await
}

async fn bring_up_inner(
    target: &Target,
    src: Option<IpAddr>,
    resume: Option<(&str, &[Uuid])>,
    broadcasts: &BTreeMap<String, String>,
    register: &[(Uuid, &str)],
    limit: Duration,
) -> Result<(Ws, String, Vec<String>), Failure> {
    let mut ws = step("connect", limit, proto::open(target, src)).await?;
    let (uaid, channels) = match resume {
        Some((u, c)) => (Some(u), c),
        None => (None, &[][..]),
    };
    let hello = proto::hello_following(&mut ws, uaid, channels, broadcasts);
    let got = step("hello", limit, hello).await?;
    let mut endpoints = Vec::with_capacity(register.len());
    for (channel, key) in register {
        endpoints.push(step("register", limit, proto::register(&mut ws, channel, key)).await?);
    }
    Ok((ws, got, endpoints))
}

/// Closes politely: close frame, then wait (briefly) for the server's.
pub async fn close(mut ws: Ws) {
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        if ws.close(None).await.is_ok() {
            while let Some(Ok(_)) = ws.next().await {}
        }
    })
    .await;
}

/// Keeps a connection open until `stop` fires, answering websocket pings (tungstenite
/// does so while we read). Returns why the connection ended early, if it did.
pub async fn hold(ws: &mut Ws, stop: &mut watch::Receiver<bool>) -> Option<String> {
    loop {
        if *stop.borrow_and_update() {
            return None;
        }
        tokio::select! {
            changed = stop.changed() => {
                if changed.is_err() {
                    return None;
                }
            }
            msg = ws.next() => match msg {
                None | Some(Ok(Message::Close(_))) => return Some("closed by server".into()),
                Some(Err(e)) => return Some(proto::ws_error_name(&e)),
                // Text here is a `{}` ping reply or a broadcast: nothing to do.
                Some(Ok(_)) => {}
            }
        }
    }
}

/// Reads a user agent's frames until `stop` fires, sending the ack
/// `on_text` makes of each text frame (if any), then closes politely. Why
/// the connection ended early, if it did, goes into `errors`.
pub async fn ack_until(
    mut ws: Ws,
    stop: &mut watch::Receiver<bool>,
    errors: &Tally,
    mut on_text: impl FnMut(&str) -> Option<String>,
) {
    loop {
        if *stop.borrow_and_update() {
            break;
        }
        tokio::select! {
            changed = stop.changed() => if changed.is_err() { break },
            msg = ws.next() => match msg {
                Some(Ok(Message::Text(t))) => {
                    if let Some(ack) = on_text(t.as_str()) {
                        if let Err(f) = proto::send_text(&mut ws, ack, "ack").await {
                            errors.add(format!("user agent {}", f.key()));
                            return;
                        }
                    }
                }
                Some(Ok(Message::Close(_))) | None => {
                    errors.add("user agent: closed by server");
                    return;
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    errors.add(format!("user agent: {}", proto::ws_error_name(&e)));
                    return;
                }
            }
        }
    }
    close(ws).await;
}

/// A user agent coming back with its uaid and channels (after going away or
/// while its messages were stored): its `hello` is timed into `hello`
/// (sharded by `u`) and a changed uaid counted in `uaid_changed`.
pub async fn resume(
    target: &Target,
    u: usize,
    uaid: &str,
    channels: &[Uuid],
    limit: Duration,
    hello: &Hist,
    uaid_changed: &AtomicU64,
) -> Result<Ws, Failure> {
    resume_from(target, None, u, uaid, channels, limit, hello, uaid_changed).await
}

/// `resume` from a chosen loopback source address.
#[allow(clippy::too_many_arguments)] // resume's, plus where from
pub async fn resume_from(
    target: &Target,
    src: Option<IpAddr>,
    u: usize,
    uaid: &str,
    channels: &[Uuid],
    limit: Duration,
    hello: &Hist,
    uaid_changed: &AtomicU64,
) -> Result<Ws, Failure> {
    let t0 = Instant::now();
    let (ws, got, _) = bring_up(target, src, Some((uaid, channels)), &[], limit).await?;
    hello.record(u, t0.elapsed().as_micros() as u64);
    if got != uaid {
        uaid_changed.fetch_add(1, Relaxed);
    }
    Ok(ws)
}

/// Closes every user agent still up, all at once.
pub async fn close_all(ups: &mut [Option<Up>]) {
    let mut closing = JoinSet::new();
    for up in ups.iter_mut() {
        if let Some(up) = up.take() {
            closing.spawn(close(up.ws));
        }
    }
    while closing.join_next().await.is_some() {}
}

/// Tells the user-agent tasks to stop and waits up to `grace` for them;
/// the rest are aborted.
pub async fn stop_all(stop: &watch::Sender<bool>, uas: &mut JoinSet<()>, grace: Duration) {
    let _ = stop.send(true);
    let _ = tokio::time::timeout(grace, async { while uas.join_next().await.is_some() {} }).await;
    uas.abort_all();
}

/// A fleet as brought up: who made it, how long each took, what failed.
pub struct Setup {
    pub ups: Vec<Option<Up>>,
    pub connected: usize,
    pub errors: Tally,
    pub latency: Hist,
}

impl Setup {
    /// Refuses to go on with nobody up: `verb` as in "no user agent could
    /// connect".
    pub fn require_any(&self, verb: &str) -> anyhow::Result<()> {
        if self.connected == 0 {
            anyhow::bail!("no user agent could {verb}: {:?}", self.errors.snapshot());
        }
        Ok(())
    }

    /// Each user agent's uaid, None for those that never came up.
    pub fn uaids(&self) -> Vec<Option<String>> {
        self.ups
            .iter()
            .map(|u| u.as_ref().map(|u| u.uaid.clone()))
            .collect()
    }
}

/// `bring_up_all` with its own failure tally and latency histogram.
pub async fn bring_up_fleet(
    targets: &[Target],
    spec: &FleetSpec,
    channel_ids: Arc<Vec<Uuid>>,
    keys: Arc<Vec<String>>,
) -> Setup {
    let (errors, latency) = (Tally::default(), Hist::new());
    let ups = bring_up_all(targets, spec, channel_ids, keys, &errors, &latency).await;
    let connected = ups.iter().filter(|u| u.is_some()).count();
    Setup {
        ups,
        connected,
        errors,
        latency,
    }
}

/// A user agent that made it through hello and registration.
pub struct Up {
    pub ws: Ws,
    pub uaid: String,
    pub endpoints: Vec<String>,
}

pub struct FleetSpec {
    pub uas: usize,
    pub channels_per_ua: usize,
    pub concurrency: usize,
    pub limit: Duration,
    pub srcs: Vec<Option<IpAddr>>,
}

impl FleetSpec {
    /// All user agents from the default source address.
    pub fn new(uas: usize, channels_per_ua: usize, concurrency: usize, limit: Duration) -> Self {
        FleetSpec {
            uas,
            channels_per_ua,
            concurrency,
            limit,
            srcs: vec![None],
        }
    }
}

/// Brings up `uas` user agents, `concurrency` at a time, user agent `u` on
/// node `u % targets.len()`. User agent `u` registers channels
/// `u*channels_per_ua ..`, with `key_of(channel)` as the application server
/// key. Failures are tallied, not fatal.
pub async fn bring_up_all(
    targets: &[Target],
    spec: &FleetSpec,
    channel_ids: Arc<Vec<Uuid>>,
    keys: Arc<Vec<String>>,
    failures: &Tally,
    latency: &Hist,
) -> Vec<Option<Up>> {
    let sem = Arc::new(Semaphore::new(spec.concurrency.max(1)));
    let mut set = JoinSet::new();
    let mut out: Vec<Option<Up>> = (0..spec.uas).map(|_| None).collect();
    let mut last_print = Instant::now();
    let mut done = 0usize;
    for u in 0..spec.uas {
        let Ok(permit) = sem.clone().acquire_owned().await else {
            break;
        };
        let target = proto::target_of(targets, u).clone();
        let ids = channel_ids.clone();
        let keys = keys.clone();
        let src = spec.srcs[u % spec.srcs.len()];
        let per = spec.channels_per_ua;
        let limit = spec.limit;
        set.spawn(async move {
            let started = Instant::now();
            let regs: Vec<(Uuid, &str)> = (u * per..(u + 1) * per)
                .map(|c| (ids[c], keys[c % keys.len()].as_str()))
                .collect();
            let r = bring_up(&target, src, None, &regs, limit).await;
            drop(permit);
            (u, started.elapsed(), r)
        });
        // Reap as we go so finished setups do not pile up in the set.
        while let Some(res) = set.try_join_next() {
            done += 1;
            collect(res, &mut out, failures, latency);
        }
        if last_print.elapsed() > Duration::from_secs(2) {
            eprintln!("  connected {done}/{} user agents", spec.uas);
            last_print = Instant::now();
        }
    }
    while let Some(res) = set.join_next().await {
        collect(res, &mut out, failures, latency);
    }
    out
}

type SetupResult = (usize, Duration, Result<(Ws, String, Vec<String>), Failure>);

fn collect(
    res: Result<SetupResult, tokio::task::JoinError>,
    out: &mut [Option<Up>],
    failures: &Tally,
    latency: &Hist,
) {
    match res {
        Ok((u, took, Ok((ws, uaid, endpoints)))) => {
            latency.record(u, took.as_micros() as u64);
            out[u] = Some(Up {
                ws,
                uaid,
                endpoints,
            });
        }
        Ok((_, _, Err(f))) => failures.add(format!("setup {}", f.key())),
        Err(_) => failures.add("setup: task failed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fleet_with_nobody_up_is_refused_with_its_failures() {
        let setup = Setup {
            ups: vec![None, None],
            connected: 0,
            errors: Tally::default(),
            latency: Hist::new(),
        };
        setup.errors.add_n("setup connect: ECONNREFUSED", 2);
        let e = setup.require_any("subscribe").unwrap_err().to_string();
        assert!(e.starts_with("no user agent could subscribe"), "{e}");
        assert!(e.contains("ECONNREFUSED"), "{e}");
        assert_eq!(setup.uaids(), vec![None, None]);
    }
}
