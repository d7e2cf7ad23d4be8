//! The JSON every scenario writes and `report` reads, the flags all
//! scenarios share, and what can be read about the server from /proc.

use crate::stats::{LatencySummary, RatePoint};
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(clap::Args, Clone, Debug)]
pub struct Common {
    /// Websocket URL of the push service (loopback only); several nodes'
    /// URLs, comma-separated, spread user agents round-robin over them.
    #[arg(
        long = "url",
        value_name = "URL[,URL...]",
        value_delimiter = ',',
        default_value = "ws://127.0.0.1:8080/"
    )]
    pub urls: Vec<String>,
    /// Base URLs (http://host:port, comma-separated, loopback only) that
    /// senders spread their POSTs over round-robin: each push endpoint keeps
    /// its path and gets the next node's scheme://host:port. Default: with
    /// several --url, the same hosts and ports (ws:// becomes http://); with
    /// one --url, the endpoints exactly as the server handed them out.
    #[arg(long, value_name = "URL[,URL...]", value_delimiter = ',')]
    pub push_urls: Vec<String>,
    /// Name of the system under test, recorded in the results; `report`
    /// groups runs by it.
    #[arg(long, default_value = "herald")]
    pub target: String,
    /// Where to write the JSON results (default: loadtest/results/<scenario>-<target>-<time>.json).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// PID of the server, to read its CPU time, resident memory and open
    /// files from /proc. Several (comma-separated, e.g. every node and its
    /// Redis) are summed, and also reported one by one under `servers`; a
    /// PID may carry a name, NAME=PID (herald=123,redis=456).
    #[arg(long, value_name = "[NAME=]PID[,...]", value_delimiter = ',', value_parser = parse_server_pid)]
    pub server_pid: Vec<ServerPid>,
    /// User-agent connection setups (connect, hello, register) in flight at once.
    #[arg(long, default_value_t = 200)]
    pub concurrency: usize,
    /// Seconds any single protocol step or request may take before it counts as failed.
    #[arg(long, default_value_t = 10.0)]
    pub timeout: f64,
    /// Channels (subscriptions) each user agent registers.
    #[arg(long, default_value_t = 1)]
    pub channels: usize,
}

impl Common {
    pub fn limit(&self) -> Duration {
        crate::stats::step_limit(self.timeout)
    }

    /// The server processes named by --server-pid.
    pub fn servers(&self) -> Servers {
        Servers(self.server_pid.iter().map(|p| ServerProc(p.pid)).collect())
    }

    /// Where senders POST: the --push-urls, else (with several --url) the
    /// websocket URLs as http:// base URLs, else nothing, which means the
    /// endpoints as handed out.
    pub fn push_bases(&self) -> Result<Vec<String>> {
        if !self.push_urls.is_empty() {
            return Ok(self.push_urls.clone());
        }
        if self.urls.len() > 1 {
            return self.urls.iter().map(|u| ws_to_http(u)).collect();
        }
        Ok(Vec::new())
    }

    /// The nodes to connect to and the push bases; bad push URLs are refused
    /// here, before anyone connects.
    pub async fn targets_and_push_bases(&self) -> Result<(Vec<crate::proto::Target>, Vec<String>)> {
        let targets = crate::proto::Target::all(&self.urls).await?;
        let push_bases = self.push_bases()?;
        crate::sender::Origins::with_push_urls(&push_bases).await?;
        Ok((targets, push_bases))
    }
}

/// `ws://host:port/...` as the base URL `http://host:port`.
pub fn ws_to_http(url: &str) -> Result<String> {
    let uri: http::Uri = url
        .parse()
        .with_context(|| format!("invalid websocket URL {url:?}"))?;
    let scheme = match uri.scheme_str() {
        Some("ws") => "http",
        Some("wss") => "https",
        _ => anyhow::bail!("cannot derive a push URL from {url}: not ws://"),
    };
    let authority = uri
        .authority()
        .with_context(|| format!("URL {url} has no host"))?;
    Ok(format!("{scheme}://{authority}"))
}

/// One --server-pid entry: a PID, optionally named (herald=123).
#[derive(Clone, Debug, PartialEq)]
pub struct ServerPid {
    pub name: Option<String>,
    pub pid: u32,
}

pub fn parse_server_pid(s: &str) -> Result<ServerPid, String> {
    let (name, pid) = match s.split_once('=') {
        Some((n, p)) if !n.trim().is_empty() => (Some(n.trim().to_string()), p),
        Some(_) => return Err(format!("{s:?}: empty name before '='")),
        None => (None, s),
    };
    let pid = pid
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a PID (or NAME=PID)"))?;
    Ok(ServerPid { name, pid })
}

/// One server process over a run, when several are measured.
#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
#[serde(default)]
pub struct ServerStat {
    pub pid: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rss_before_kib: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rss_after_kib: Option<u64>,
}

/// Server resident memory against live connections, for the memory plot.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MemoryPoint {
    pub connections: u64,
    pub rss_kib: u64,
    /// Milliseconds since the workers started, so a climb can be read as a
    /// rate; 0 in results written before it was recorded.
    #[serde(default)]
    pub t_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct RunResult {
    pub tool: String,
    pub version: String,
    pub scenario: String,
    pub target: String,
    /// The websocket URL(s) as given to --url, comma-separated.
    pub url: String,
    /// The websocket URLs user agents were spread over.
    pub urls: Vec<String>,
    /// The base URLs senders spread their POSTs over; empty when they
    /// POSTed to the endpoints as handed out.
    pub push_urls: Vec<String>,
    /// Each process given to --server-pid; the server_* metrics are their sums.
    pub servers: Vec<ServerStat>,
    pub started_unix: u64,
    pub elapsed_s: f64,
    /// The one-line summary printed at the end of the run.
    pub summary: String,
    pub params: Value,
    /// Headline numbers; the report tabulates them.
    pub metrics: Map<String, Value>,
    /// Failure counts by short reason.
    pub errors: BTreeMap<String, u64>,
    pub latency: BTreeMap<String, LatencySummary>,
    /// Rates over time (accepted/s, delivered/s, hellos/s...).
    pub rates: Vec<RatePoint>,
    pub memory: Vec<MemoryPoint>,
    /// Plain-language findings, e.g. which limit stopped the run.
    pub notes: Vec<String>,
    /// The websocket subprotocol the server selected in its handshakes:
    /// "push-notification" (Herald), "none" (autopush-rs), or "mixed" when
    /// handshakes differed; empty in results written before it was recorded.
    pub subprotocol: String,
    /// Handshakes by the subprotocol selected ("push-notification", "none").
    pub subprotocols: BTreeMap<String, u64>,
    /// Figures per step, one object each, shown as their own table in the
    /// report (fanout: one per broadcast change).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rows: Vec<Map<String, Value>>,
}

impl RunResult {
    pub fn new(scenario: &str, common: &Common, params: Value) -> Self {
        let mut r = RunResult {
            tool: "herald-loadtest".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            scenario: scenario.into(),
            target: common.target.clone(),
            url: common.urls.join(","),
            urls: common.urls.clone(),
            push_urls: common.push_bases().unwrap_or_default(),
            servers: common
                .server_pid
                .iter()
                .map(|p| ServerStat {
                    pid: p.pid,
                    name: p.name.clone(),
                    ..Default::default()
                })
                .collect(),
            started_unix: unix_now(),
            params,
            ..Default::default()
        };
        let posts = matches!(scenario, "throughput" | "backlog" | "burst" | "abuse");
        if !posts {
            r.push_urls.clear();
        }
        if r.urls.len() > 1 || !r.push_urls.is_empty() {
            let mut note = format!(
                "user agents spread round-robin over {} node(s) ({})",
                r.urls.len(),
                r.urls.join(", ")
            );
            if posts {
                note += &format!(
                    "; POSTs over {}",
                    if r.push_urls.is_empty() {
                        "the endpoints as handed out".to_string()
                    } else {
                        r.push_urls.join(", ")
                    }
                );
            }
            r.notes.push(note);
        }
        r
    }

    pub fn metric(&mut self, name: &str, v: impl Into<Value>) {
        self.metrics.insert(name.into(), v.into());
    }

    /// Server memory before and after (each PID's, from `Servers::rss_each`):
    /// the sums as `server_rss_before_kib` and `server_rss_after_kib`, and
    /// each process's own under `servers`.
    pub fn server_rss(&mut self, before: Option<&[u64]>, after: Option<&[u64]>) {
        if let (Some(b), Some(a)) = (before, after) {
            self.metric("server_rss_before_kib", b.iter().sum::<u64>());
            self.metric("server_rss_after_kib", a.iter().sum::<u64>());
        }
        for (i, s) in self.servers.iter_mut().enumerate() {
            s.rss_before_kib = before.and_then(|b| b.get(i).copied());
            s.rss_after_kib = after.and_then(|a| a.get(i).copied());
        }
    }

    /// Records the handshakes' subprotocols (see `subprotocol`).
    pub fn set_subprotocols(&mut self, counts: BTreeMap<String, u64>) {
        self.subprotocol = describe_subprotocols(&counts);
        self.subprotocols = counts;
    }

    /// Server CPU per unit of work (`n` delivered messages, broadcast
    /// frames...) as `metric`, in microseconds; returns it for the summary.
    pub fn cpu_per(&mut self, metric: &str, server_cpu_s: Option<f64>, n: u64) -> Option<f64> {
        let us = server_cpu_s.filter(|_| n > 0).map(|s| s * 1e6 / n as f64)?;
        let us = (us * 100.0).round() / 100.0;
        self.metric(metric, us);
        Some(us)
    }

    /// Writes the JSON (to `--out` or the default place) and prints the
    /// summary. Unless a scenario recorded them itself (idle's workers run
    /// in other processes), the subprotocols are this process's handshakes.
    pub fn finish(&mut self, out: Option<&Path>) -> Result<PathBuf> {
        if self.subprotocols.is_empty() {
            self.set_subprotocols(crate::proto::selected_subprotocols());
        }
        let path = match out {
            Some(p) => p.to_path_buf(),
            None => default_dir().join(format!(
                "{}-{}-{}.json",
                self.scenario,
                sanitize(&self.target),
                self.started_unix
            )),
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let json = serde_json::to_string_pretty(self)?;
        std::fs::write(&path, json).with_context(|| format!("writing {}", path.display()))?;
        println!("{}", self.summary);
        for n in &self.notes {
            eprintln!("  note: {n}");
        }
        eprintln!("  results: {}", path.display());
        Ok(path)
    }
}

/// One word for what the handshakes selected: the one subprotocol they all
/// selected, "mixed" when they differed, "" when there were none.
pub fn describe_subprotocols(counts: &BTreeMap<String, u64>) -> String {
    let seen: Vec<&String> = counts
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(k, _)| k)
        .collect();
    match seen.as_slice() {
        [] => String::new(),
        [one] => (*one).clone(),
        _ => "mixed".into(),
    }
}

/// "server 62.1 µs per delivered message" for a summary line.
pub fn cpu_text(us: Option<f64>, per: &str) -> String {
    match us {
        Some(us) => format!("server {us:.1} µs per {per}"),
        None => format!("server µs per {per} not measured (no --server-pid)"),
    }
}

pub fn read_result(path: &Path) -> Result<RunResult> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let r: RunResult =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    if r.tool != "herald-loadtest" || r.scenario.is_empty() {
        anyhow::bail!("{} is not a herald-loadtest result", path.display());
    }
    Ok(r)
}

/// loadtest/results when run from a checkout (the usual case), else ./results.
fn default_dir() -> PathBuf {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    if crate_dir.is_dir() {
        crate_dir.join("results")
    } else {
        PathBuf::from("results")
    }
}

fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Read-only view of the server process through /proc.
#[derive(Clone, Copy, Debug)]
pub struct ServerProc(pub u32);

impl ServerProc {
    /// Resident set size (VmRSS) in KiB.
    pub fn rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.0)).ok()?;
        parse_vmrss(&status)
    }

    /// Open file descriptors right now.
    pub fn open_fds(&self) -> Option<u64> {
        std::fs::read_dir(format!("/proc/{}/fd", self.0))
            .ok()
            .map(|d| d.count() as u64)
    }

    /// The server's own soft open-file limit.
    pub fn nofile_soft_limit(&self) -> Option<u64> {
        let limits = std::fs::read_to_string(format!("/proc/{}/limits", self.0)).ok()?;
        parse_nofile(&limits)
    }
}

/// Every process given to --server-pid: several nodes, or a node and its
/// store. Figures are summed; a sum is None unless every process could be
/// read (a process that died mid-run would otherwise shrink the total).
#[derive(Clone, Debug, Default)]
pub struct Servers(pub Vec<ServerProc>);

impl Servers {
    fn each<T>(&self, f: impl Fn(&ServerProc) -> Option<T>) -> Option<Vec<T>> {
        if self.0.is_empty() {
            return None;
        }
        self.0.iter().map(f).collect()
    }

    /// VmRSS of each process, KiB, in --server-pid order.
    pub fn rss_each(&self) -> Option<Vec<u64>> {
        self.each(|p| p.rss_kib())
    }

    /// Total VmRSS, KiB.
    pub fn rss_kib(&self) -> Option<u64> {
        self.rss_each().map(|v| v.iter().sum())
    }

    /// Open descriptors of all the processes together.
    pub fn open_fds(&self) -> Option<u64> {
        self.each(|p| p.open_fds()).map(|v| v.iter().sum())
    }

    /// (descriptors in use, soft limit) of the process closest to its own
    /// limit: the one that would stop a climb first.
    pub fn fullest_fds(&self) -> Option<(u64, u64)> {
        self.each(|p| Some((p.open_fds()?, p.nofile_soft_limit()?)))?
            .into_iter()
            .max_by(|a, b| {
                let ra = a.0 as f64 / a.1.max(1) as f64;
                let rb = b.0 as f64 / b.1.max(1) as f64;
                ra.total_cmp(&rb)
            })
    }

    /// User + system CPU seconds of each process so far.
    pub fn cpu_each(&self) -> Option<Vec<f64>> {
        self.each(|p| p.cpu_secs())
    }

    /// The first PID whose /proc entry cannot be read, if any.
    pub fn unreadable(&self) -> Option<u32> {
        self.0.iter().find(|p| p.rss_kib().is_none()).map(|p| p.0)
    }
}

impl ServerProc {
    /// User + system CPU seconds the server has used so far.
    pub fn cpu_secs(&self) -> Option<f64> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.0)).ok()?;
        parse_stat_cpu(&stat, clock_ticks())
    }
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// utime + stime from /proc/PID/stat. The command name (field 2) may hold
/// spaces and parentheses, so fields are counted from the last ')'.
fn parse_stat_cpu(stat: &str, ticks: f64) -> Option<f64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) / ticks)
}

/// CPU seconds used by this process and its reaped children (the idle
/// workers).
pub fn client_cpu_secs() -> f64 {
    let mut total = 0.0;
    for who in [libc::RUSAGE_SELF, libc::RUSAGE_CHILDREN] {
        // SAFETY: getrusage fills the zeroed struct we pass.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        if unsafe { libc::getrusage(who, &mut ru) } == 0 {
            let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
            total += tv(ru.ru_utime) + tv(ru.ru_stime);
        }
    }
    total
}

/// CPU used by the generator and by the server over a run: with both on the
/// same cores, this is how a reader tells whether the generator, rather
/// than the server, was the bottleneck.
pub struct CpuMeter {
    server: Servers,
    wall: std::time::Instant,
    client0: f64,
    server0: Option<Vec<f64>>,
}

impl CpuMeter {
    pub fn start(server: &Servers) -> Self {
        CpuMeter {
            server: server.clone(),
            wall: std::time::Instant::now(),
            client0: client_cpu_secs(),
            server0: server.cpu_each(),
        }
    }

    /// CPU seconds the servers (summed) used since `start`.
    pub fn server_secs(&self) -> Option<f64> {
        let (now, then) = (self.server.cpu_each()?, self.server0.as_ref()?);
        Some(now.iter().zip(then).map(|(n, t)| n - t).sum())
    }

    /// Records CPU used since `start`: the generator's, the servers' summed
    /// (`server_cpu_s`, `server_cpu_cores`) and each server's under
    /// `servers`. Returns the servers' sum.
    pub fn record(&self, r: &mut RunResult) -> Option<f64> {
        let wall = self.wall.elapsed().as_secs_f64().max(1e-9);
        let client = client_cpu_secs() - self.client0;
        r.metric("client_cpu_s", r2(client));
        r.metric("client_cpu_cores", r2(client / wall));
        let (Some(now), Some(then)) = (self.server.cpu_each(), self.server0.as_ref()) else {
            return None;
        };
        let used: Vec<f64> = now.iter().zip(then).map(|(n, t)| n - t).collect();
        let total: f64 = used.iter().sum();
        r.metric("server_cpu_s", r2(total));
        r.metric("server_cpu_cores", r2(total / wall));
        for (s, u) in r.servers.iter_mut().zip(&used) {
            s.cpu_s = Some(r2(*u));
        }
        Some(total)
    }
}

/// This process's own resident set size in KiB.
pub fn own_rss_kib() -> Option<u64> {
    ServerProc(std::process::id()).rss_kib()
}

fn parse_vmrss(status: &str) -> Option<u64> {
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn parse_nofile(limits: &str) -> Option<u64> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Two decimals: enough for the figures a person reads in a result.
pub fn r2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_parsing() {
        let status = "Name:\therald\nVmPeak:\t  999 kB\nVmRSS:\t   12345 kB\nThreads: 3\n";
        assert_eq!(parse_vmrss(status), Some(12345));
        assert_eq!(parse_vmrss("Name: x\n"), None);
        let limits = "Limit                     Soft Limit           Hard Limit           Units\nMax open files            20000                20000                files\n";
        assert_eq!(parse_nofile(limits), Some(20000));
        assert_eq!(
            parse_nofile("Max open files  unlimited unlimited files"),
            None
        );
    }

    #[test]
    fn own_process_is_readable() {
        let me = ServerProc(std::process::id());
        assert!(me.rss_kib().unwrap() > 0);
        assert!(me.open_fds().unwrap() >= 3);
        assert!(me.nofile_soft_limit().unwrap() > 0);
        assert!(ServerProc(u32::MAX).rss_kib().is_none());
        assert!(me.cpu_secs().is_some());
        assert!(client_cpu_secs() > 0.0);
    }

    #[test]
    fn json_round_trip_and_rejects_foreign_json() {
        let dir = tempfile::tempdir().unwrap();
        let common = Common {
            urls: vec!["ws://127.0.0.1:1/".into()],
            push_urls: vec![],
            target: "x/y".into(),
            out: None,
            server_pid: vec![],
            concurrency: 1,
            timeout: 1.0,
            channels: 1,
        };
        let mut r = RunResult::new("idle", &common, serde_json::json!({"uas": 3}));
        r.metric("connected", 3);
        r.summary = "idle: ok".into();
        let p = r.finish(Some(&dir.path().join("a/b.json"))).unwrap();
        let back = read_result(&p).unwrap();
        assert_eq!(back.metrics["connected"], 3);
        assert_eq!(back.target, "x/y");
        assert_eq!(sanitize(&back.target), "x_y");
        let other = dir.path().join("other.json");
        std::fs::write(&other, r#"{"hello": 1}"#).unwrap();
        assert!(read_result(&other).is_err());
        std::fs::write(&other, "not json").unwrap();
        assert!(read_result(&other).is_err());
    }

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        common: Common,
    }

    fn parse(args: &[&str]) -> Result<Common, clap::Error> {
        use clap::Parser;
        Cli::try_parse_from(std::iter::once("t").chain(args.iter().copied())).map(|c| c.common)
    }

    #[test]
    fn several_urls_and_pids() {
        let one = parse(&[]).unwrap();
        assert_eq!(one.urls, ["ws://127.0.0.1:8080/"]);
        assert!(one.server_pid.is_empty());
        // One node: endpoints are used as handed out.
        assert!(one.push_bases().unwrap().is_empty());

        let c = parse(&[
            "--url",
            "ws://127.0.0.1:1/,ws://localhost:2/",
            "--server-pid",
            "10,herald=11",
            "--server-pid",
            "redis=12",
        ])
        .unwrap();
        assert_eq!(c.urls, ["ws://127.0.0.1:1/", "ws://localhost:2/"]);
        assert_eq!(
            c.push_bases().unwrap(),
            ["http://127.0.0.1:1", "http://localhost:2"]
        );
        let pids: Vec<(Option<&str>, u32)> = c
            .server_pid
            .iter()
            .map(|p| (p.name.as_deref(), p.pid))
            .collect();
        assert_eq!(
            pids,
            [(None, 10), (Some("herald"), 11), (Some("redis"), 12)]
        );
        let r = RunResult::new("throughput", &c, Value::Null);
        assert_eq!(r.url, "ws://127.0.0.1:1/,ws://localhost:2/");
        assert_eq!(r.urls.len(), 2);
        assert_eq!(r.push_urls, ["http://127.0.0.1:1", "http://localhost:2"]);
        assert_eq!(r.servers.len(), 3);
        assert_eq!(r.servers[2].name.as_deref(), Some("redis"));
        assert!(r.notes[0].contains("2 node(s)"), "{:?}", r.notes);
        assert!(r.notes[0].contains("POSTs over http://127.0.0.1:1"));
        // Scenarios that send nothing record no push URLs.
        let idle = RunResult::new("idle", &c, Value::Null);
        assert!(idle.push_urls.is_empty());
        assert!(!idle.notes[0].contains("POSTs"), "{:?}", idle.notes);

        // Explicit push URLs win, even with one --url.
        let c = parse(&["--push-urls", "http://127.0.0.1:5,http://127.0.0.1:6"]).unwrap();
        assert_eq!(c.push_bases().unwrap().len(), 2);

        assert!(parse(&["--server-pid", "abc"]).is_err());
        assert!(parse(&["--server-pid", "=5"]).is_err());
        assert!(parse(&["--server-pid", "x=-1"]).is_err());
    }

    #[test]
    fn ws_urls_become_http_bases() {
        assert_eq!(
            ws_to_http("ws://127.0.0.1:8080/").unwrap(),
            "http://127.0.0.1:8080"
        );
        assert_eq!(ws_to_http("ws://[::1]:9/x?y").unwrap(), "http://[::1]:9");
        assert_eq!(ws_to_http("ws://localhost/").unwrap(), "http://localhost");
        assert!(ws_to_http("http://127.0.0.1/").is_err());
        assert!(ws_to_http("nonsense").is_err());
    }

    #[test]
    fn several_servers_are_summed_and_kept_apart() {
        let me = ServerProc(std::process::id());
        let two = Servers(vec![me, me]);
        let one = me.rss_kib().unwrap();
        let sum = two.rss_kib().unwrap();
        // Both reads of our own (changing) RSS, a moment apart.
        assert!(sum >= one && sum <= 2 * one + 4096, "{sum} vs {one}");
        assert_eq!(two.rss_each().unwrap().len(), 2);
        assert!(two.open_fds().unwrap() >= 6);
        let (fds, limit) = two.fullest_fds().unwrap();
        assert!(fds >= 3 && limit > 0);
        assert_eq!(two.unreadable(), None);
        let with_dead = Servers(vec![me, ServerProc(u32::MAX)]);
        assert_eq!(with_dead.rss_kib(), None, "a partial sum is no sum");
        assert_eq!(with_dead.unreadable(), Some(u32::MAX));
        assert_eq!(Servers::default().rss_kib(), None);
        assert_eq!(Servers::default().cpu_each(), None);

        let mut common = parse(&[]).unwrap();
        common.server_pid = vec![
            ServerPid {
                name: Some("a".into()),
                pid: me.0,
            },
            ServerPid {
                name: None,
                pid: me.0,
            },
        ];
        let mut r = RunResult::new("throughput", &common, Value::Null);
        let meter = CpuMeter::start(&common.servers());
        let t = std::time::Instant::now();
        while t.elapsed() < Duration::from_millis(30) {
            std::hint::black_box((0..1000u64).sum::<u64>());
        }
        let total = meter.record(&mut r).unwrap();
        let each: Vec<f64> = r.servers.iter().map(|s| s.cpu_s.unwrap()).collect();
        assert_eq!(each.len(), 2);
        assert!((r.metrics["server_cpu_s"].as_f64().unwrap() - total).abs() < 0.011);
        r.server_rss(Some(&[100, 200]), Some(&[150, 260]));
        assert_eq!(r.metrics["server_rss_before_kib"], 300);
        assert_eq!(r.metrics["server_rss_after_kib"], 410);
        assert_eq!(r.servers[1].rss_after_kib, Some(260));
        let back: RunResult = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(back.servers, r.servers);
        // Results written before several servers existed still read.
        let old: RunResult =
            serde_json::from_str(r#"{"tool":"herald-loadtest","scenario":"idle","url":"ws://x/"}"#)
                .unwrap();
        assert!(old.servers.is_empty() && old.urls.is_empty());
    }
}
