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
    /// Websocket URL of the push service (loopback only).
    #[arg(long, default_value = "ws://127.0.0.1:8080/")]
    pub url: String,
    /// Name of the system under test, recorded in the results; `report`
    /// groups runs by it.
    #[arg(long, default_value = "herald")]
    pub target: String,
    /// Where to write the JSON results (default: loadtest/results/<scenario>-<target>-<time>.json).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// PID of the server, to read its resident memory (and open files) from /proc.
    #[arg(long)]
    pub server_pid: Option<u32>,
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
}

/// Server resident memory against live connections, for the memory plot.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MemoryPoint {
    pub connections: u64,
    pub rss_kib: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct RunResult {
    pub tool: String,
    pub version: String,
    pub scenario: String,
    pub target: String,
    pub url: String,
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
}

impl RunResult {
    pub fn new(scenario: &str, common: &Common, params: Value) -> Self {
        RunResult {
            tool: "herald-loadtest".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            scenario: scenario.into(),
            target: common.target.clone(),
            url: common.url.clone(),
            started_unix: unix_now(),
            params,
            ..Default::default()
        }
    }

    pub fn metric(&mut self, name: &str, v: impl Into<Value>) {
        self.metrics.insert(name.into(), v.into());
    }

    /// Writes the JSON (to `--out` or the default place) and prints the summary.
    pub fn finish(&self, out: Option<&Path>) -> Result<PathBuf> {
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
    server: Option<ServerProc>,
    wall: std::time::Instant,
    client0: f64,
    server0: Option<f64>,
}

impl CpuMeter {
    pub fn start(server: Option<ServerProc>) -> Self {
        CpuMeter {
            server,
            wall: std::time::Instant::now(),
            client0: client_cpu_secs(),
            server0: server.and_then(|s| s.cpu_secs()),
        }
    }

    pub fn record(&self, r: &mut RunResult) {
        let wall = self.wall.elapsed().as_secs_f64().max(1e-9);
        let r2 = |x: f64| (x * 100.0).round() / 100.0;
        let client = client_cpu_secs() - self.client0;
        r.metric("client_cpu_s", r2(client));
        r.metric("client_cpu_cores", r2(client / wall));
        if let (Some(s), Some(s0)) = (self.server.and_then(|s| s.cpu_secs()), self.server0) {
            r.metric("server_cpu_s", r2(s - s0));
            r.metric("server_cpu_cores", r2((s - s0) / wall));
        }
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
            url: "ws://127.0.0.1:1/".into(),
            target: "x/y".into(),
            out: None,
            server_pid: None,
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
}
