//! Scenario `idle`: open many user agents, hold them, and report what each
//! costs the server. Past one process's open-file limit the work is spread
//! over worker processes (`workers`), and past one source address's port
//! range over 127.0.0.x source addresses.

use crate::harness::Run;
use crate::net::{self, FileLimit};
use crate::results::{Common, CpuMeter, MemoryPoint};
use crate::stats::{self, LatencySummary};
use crate::workers::{Sizing, WorkerSpec, Workers};
use anyhow::{bail, Result};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

#[derive(clap::Args, Clone, Debug)]
pub struct IdleArgs {
    #[command(flatten)]
    pub common: Common,
    /// User agents to open.
    #[arg(long, default_value_t = 1000)]
    pub uas: usize,
    /// Connects per second across all processes; 0 means as fast as --concurrency allows.
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// Seconds to hold the connections once connecting has finished.
    #[arg(long, default_value_t = 5.0)]
    pub hold: f64,
    /// Client processes (default: as many as the open-file limit requires).
    #[arg(long)]
    pub procs: Option<usize>,
    /// Source addresses 127.0.0.1..N (default: as many as the ephemeral port range requires).
    #[arg(long)]
    pub source_addrs: Option<usize>,
    /// Stop opening connections after this many failures in a row: the ceiling is found.
    #[arg(long, default_value_t = 200)]
    pub max_consecutive_failures: u64,
    /// Stop opening connections after this many seconds.
    #[arg(long, default_value_t = 900.0)]
    pub max_connect_secs: f64,
    /// Report the server's memory and the connect rate at every multiple of
    /// this many open connections (a table in the results); 0 for none.
    #[arg(long, default_value_t = 2000)]
    pub step: u64,
}

pub async fn run(args: IdleArgs) -> Result<()> {
    let common = &args.common;
    if args.uas == 0 {
        bail!("--uas must be at least 1");
    }
    // The parameters are known once the fleet is sized, below.
    let mut run = Run::start_without_senders("idle", common, serde_json::Value::Null).await?;
    let sizing = Sizing::new(args.uas, args.procs, args.source_addrs, run.nofile);
    let pairs: usize = run
        .targets
        .iter()
        .map(|t| net::source_addrs(t.addr, sizing.srcs).len())
        .sum();
    if pairs * sizing.ports < args.uas {
        eprintln!(
            "warning: not enough source addresses/ports for {} connections",
            args.uas
        );
    }
    run.require_readable_servers()?;
    let before = ServerBefore {
        rss: run.server.rss_each(),
        fds: run.server.open_fds(),
    };
    let cpu = CpuMeter::start(&run.server);
    let overflows_before = net::listen_overflows();
    run.result.params = serde_json::json!({
        "step": args.step, "uas": args.uas, "channels": common.channels, "rate": args.rate,
        "hold_s": args.hold, "procs": sizing.procs, "source_addrs": sizing.srcs,
        "concurrency": common.concurrency, "timeout_s": common.timeout,
        "max_consecutive_failures": args.max_consecutive_failures,
    });
    eprintln!(
        "idle: {} user agents over {} process(es), {} source address(es), client open-file limit {}",
        args.uas, sizing.procs, sizing.srcs, run.nofile.soft
    );
    let max_life = args.max_connect_secs + args.hold + common.timeout * 3.0 + 120.0;
    let template = WorkerSpec {
        urls: common.urls.clone(),
        count: 0,
        first_index: 0,
        source_addrs: sizing.srcs,
        concurrency: common.concurrency.div_ceil(sizing.procs).max(1),
        rate: args.rate / sizing.procs as f64,
        channels: common.channels,
        timeout: common.timeout,
        max_consecutive_failures: args.max_consecutive_failures,
        max_connect_secs: args.max_connect_secs,
        max_life_secs: max_life,
        follow: None,
        progress_ms: 0,
    };
    let mut workers = Workers::spawn(sizing.procs, args.uas, &template).await?;
    let held = connect_and_hold(&args, &run, &mut workers, max_life).await;
    if let (Some(b), Some(a)) = (overflows_before, net::listen_overflows()) {
        run.result.metric("listen_overflows", a.saturating_sub(b));
    }
    workers.release().await;
    cpu.record(&mut run.result);
    let summary = record(&args, &mut run, workers, &sizing, &before, &held);
    run.finish(summary)
}

/// The server before any user agent connected.
struct ServerBefore {
    rss: Option<Vec<u64>>,
    fds: Option<u64>,
}

/// What connecting and holding showed.
struct Held {
    connect_secs: f64,
    established: u64,
    failed: u64,
    /// Descriptors in use once everyone connected, and (in use, limit) of
    /// the server process nearest its limit.
    fds_peak: Option<u64>,
    fullest: Option<(u64, u64)>,
    open_at_end: u64,
    rss_after: Option<Vec<u64>>,
}

/// Phase 1, until every worker has finished connecting; phase 2, hold for
/// --hold seconds.
async fn connect_and_hold(
    args: &IdleArgs,
    run: &Run<'_>,
    workers: &mut Workers,
    max_life: f64,
) -> Held {
    let started = Instant::now();
    workers
        .until_launched(&run.server, started + stats::secs(max_life))
        .await;
    let connect_secs = started.elapsed().as_secs_f64();
    // Let the server finish allocating for the last connections before
    // reading its peak.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let fds_peak = run.server.open_fds();
    let fullest = run.server.fullest_fds();
    workers
        .hold_until(&run.server, Instant::now() + stats::secs(args.hold))
        .await;
    Held {
        connect_secs,
        established: workers.sum(|s| s.established),
        failed: workers.sum(|s| s.failed),
        fds_peak,
        fullest,
        open_at_end: workers.sum(|s| s.open),
        rss_after: run.server.rss_each(),
    }
}

/// Errors, metrics, the limit that stopped the climb, memory and latency
/// into the results; returns the summary.
fn record(
    args: &IdleArgs,
    run: &mut Run<'_>,
    mut workers: Workers,
    sizing: &Sizing,
    before: &ServerBefore,
    h: &Held,
) -> String {
    let result = &mut run.result;
    stats::merge_tally(&mut result.errors, &workers.errors);
    let dropped: u64 = workers.drops.values().sum();
    let setup_hist = workers
        .setup
        .take()
        .unwrap_or_else(|| stats::from_pairs(&[]));
    let setup = LatencySummary::from_hist(&setup_hist);
    let (established, failed, open_at_end) = (h.established, h.failed, h.open_at_end);
    let connect_rate = if workers.last_established_us > 0 {
        established as f64 / (workers.last_established_us as f64 / 1e6)
    } else {
        0.0
    };
    stats::merge_tally(&mut result.errors, &workers.failures);
    for (k, v) in &workers.drops {
        result.errors.insert(format!("dropped while held: {k}"), *v);
    }
    let stopped_by = stopped_by(
        args.uas as u64,
        established,
        &workers.failures,
        run.nofile,
        h.fullest,
        h.connect_secs >= args.max_connect_secs,
    );
    result.notes.push(format!("stopped by: {stopped_by}"));
    result.metric("requested", args.uas as u64);
    result.metric("established", established);
    result.metric("failed", failed);
    result.metric("open_at_end", open_at_end);
    result.metric("dropped_while_held", dropped);
    result.metric("connect_rate_per_s", round2(connect_rate));
    result.metric("connect_phase_s", round2(h.connect_secs));
    result.metric("procs", sizing.procs as u64);
    result.metric("source_addrs", sizing.srcs as u64);
    result.metric("client_nofile_limit", run.nofile.soft);
    result.metric("stopped_by", stopped_by.clone());
    let client_growth: u64 = workers.sum(|s| s.rss_growth_kib);
    if established > 0 && client_growth > 0 {
        result.metric(
            "client_kib_per_connection",
            round2(client_growth as f64 / established as f64),
        );
    }
    if let Some(slope) = slope(&workers.memory) {
        result.metric("server_kib_per_connection_slope", round2(slope));
    }
    let mut per_conn = None;
    result.server_rss(before.rss.as_deref(), h.rss_after.as_deref());
    let sum = |v: &Option<Vec<u64>>| v.as_ref().map(|v| v.iter().sum::<u64>());
    if let (Some(b), Some(a)) = (sum(&before.rss), sum(&h.rss_after)) {
        if open_at_end > 0 {
            let kib = (a as f64 - b as f64) / open_at_end as f64;
            per_conn = Some(kib);
            result.metric("server_kib_per_connection", round2(kib));
        }
    }
    if let Some(f) = before.fds {
        result.metric("server_fds_before", f);
    }
    if let Some(f) = h.fds_peak {
        result.metric("server_fds_peak", f);
    }
    if let Some((_, l)) = h.fullest {
        result.metric("server_nofile_limit", l);
    }
    result.latency.insert("setup".into(), setup.clone());
    result.set_subprotocols(std::mem::take(&mut workers.subprotocols));
    result.memory = std::mem::take(&mut workers.memory);
    result.rows = climb(&result.memory, args.step);
    for r in &result.rows {
        eprintln!("  climb: {}", serde_json::Value::Object(r.clone()));
    }
    format!(
        "idle[{}]: {established}/{} connected ({failed} failed, {dropped} dropped), {:.0} connects/s, setup {}, {}; stopped by {stopped_by}",
        args.common.target,
        args.uas,
        connect_rate,
        setup.short(),
        match per_conn {
            Some(k) => format!("server {k:.1} KiB/connection at {open_at_end}"),
            None => "server memory not measured (no --server-pid)".into(),
        },
    )
}

/// Least-squares KiB per connection over the memory samples: less sensitive
/// than a before/after difference to memory the server held beforehand.
fn slope(points: &[MemoryPoint]) -> Option<f64> {
    let pts: Vec<(f64, f64)> = points
        .iter()
        .filter(|p| p.connections > 0)
        .map(|p| (p.connections as f64, p.rss_kib as f64))
        .collect();
    let n = pts.len() as f64;
    if pts.len() < 5 {
        return None;
    }
    let (mx, my) = (
        pts.iter().map(|p| p.0).sum::<f64>() / n,
        pts.iter().map(|p| p.1).sum::<f64>() / n,
    );
    let sxx: f64 = pts.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let sxy: f64 = pts.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    (sxx > 0.0).then(|| sxy / sxx)
}

/// The climb in steps: at the first sample past each multiple of `step`
/// connections (and at the top, where the climb stopped), the server's RSS,
/// and over the step before it KiB per added connection and connections
/// added per second, so a slope that bends or a rate that falls as the
/// count grows shows where it happens.
fn climb(points: &[MemoryPoint], step: u64) -> Vec<serde_json::Map<String, serde_json::Value>> {
    let mut rows = Vec::new();
    if step == 0 {
        return rows;
    }
    let top = points.iter().map(|p| p.connections).max().unwrap_or(0);
    // From the last sample with no connection yet, so the first step counts
    // the server's RSS before any connection.
    let mut prev = points.iter().take_while(|p| p.connections == 0).last();
    let mut next = step.min(top.max(1));
    for p in points {
        if p.connections < next {
            continue;
        }
        let mut row = serde_json::Map::new();
        row.insert("connections".into(), p.connections.into());
        row.insert("t_s".into(), round2(p.t_ms as f64 / 1000.0).into());
        row.insert("rss_kib".into(), p.rss_kib.into());
        if let Some(q) = prev {
            let added = (p.connections - q.connections) as f64;
            let kib = (p.rss_kib as f64 - q.rss_kib as f64) / added;
            row.insert("kib_per_connection_step".into(), round2(kib).into());
            let secs = p.t_ms.saturating_sub(q.t_ms) as f64 / 1000.0;
            if secs > 0.0 {
                row.insert("connects_per_s_step".into(), round2(added / secs).into());
            }
        }
        rows.push(row);
        prev = Some(p);
        if p.connections >= top {
            break;
        }
        next = ((p.connections / step + 1) * step).min(top);
    }
    rows
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// Which limit ended the climb, in words a reader can act on.
fn stopped_by(
    requested: u64,
    established: u64,
    failures: &BTreeMap<String, u64>,
    client: FileLimit,
    // (descriptors in use, soft limit) of the server process nearest its limit.
    server_fds: Option<(u64, u64)>,
    timed_out: bool,
) -> String {
    if established >= requested {
        return "nothing: every requested user agent connected".into();
    }
    if timed_out {
        return "the --max-connect-secs time limit".into();
    }
    let top = failures
        .iter()
        .max_by_key(|(_, n)| **n)
        .map(|(k, n)| (k.as_str(), *n));
    let Some((reason, n)) = top else {
        return "nothing recorded (setups unfinished)".into();
    };
    let errno = reason.rsplit(": ").next().unwrap_or("");
    if reason.starts_with("connect") && net::is_client_resource_error(errno) {
        let what = if errno == "EADDRNOTAVAIL" || errno == "EADDRINUSE" {
            "this machine's ephemeral ports (use more --source-addrs)".to_string()
        } else if errno == "EMFILE" || errno == "ENFILE" {
            format!(
                "the client's open-file limit ({} per process; use more --procs)",
                client.soft
            )
        } else {
            "client memory/buffers".to_string()
        };
        return format!("{what} [{n}x {reason}]");
    }
    if let Some((fds, limit)) = server_fds {
        if fds + 64 >= limit {
            return format!(
                "the server's open-file limit ({fds} of {limit} descriptors in use) [{n}x {reason}]"
            );
        }
        return format!("the server ({reason}, {n}x) with {fds} of {limit} descriptors in use");
    }
    format!("the server ({reason}, {n}x); pass --server-pid to see its descriptor use")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(pairs: &[(&str, u64)]) -> BTreeMap<String, u64> {
        pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
    }
    const LIM: FileLimit = FileLimit {
        soft: 20000,
        hard: 20000,
    };

    #[test]
    fn names_the_limit() {
        assert!(stopped_by(10, 10, &f(&[]), LIM, None, false).starts_with("nothing"));
        let s = stopped_by(
            30000,
            19990,
            &f(&[("connect: EMFILE", 300)]),
            LIM,
            None,
            false,
        );
        assert!(s.contains("client's open-file limit"), "{s}");
        let s = stopped_by(
            30000,
            19990,
            &f(&[("connect: EADDRNOTAVAIL", 300)]),
            LIM,
            None,
            false,
        );
        assert!(s.contains("ephemeral ports"), "{s}");
        let s = stopped_by(
            30000,
            19950,
            &f(&[("handshake: ECONNRESET", 250), ("hello: timeout", 3)]),
            LIM,
            Some((19990, 20000)),
            false,
        );
        assert!(
            s.contains("server's open-file limit") && s.contains("19990 of 20000"),
            "{s}"
        );
        let s = stopped_by(
            30000,
            100,
            &f(&[("hello: status 503", 200)]),
            LIM,
            Some((150, 20000)),
            false,
        );
        assert!(s.starts_with("the server (hello: status 503"), "{s}");
        assert!(stopped_by(30000, 100, &f(&[]), LIM, None, true).contains("max-connect-secs"));
    }

    #[test]
    fn climb_reports_each_step() {
        let pts: Vec<MemoryPoint> = [
            (0, 100, 0),
            (0, 100, 250),
            (900, 1000, 500),
            (2100, 2200, 750),
            (4500, 4600, 1000),
            (4600, 4700, 1250),
        ]
        .iter()
        .map(|&(connections, rss_kib, t_ms)| MemoryPoint {
            connections,
            rss_kib,
            t_ms,
        })
        .collect();
        let rows = climb(&pts, 2000);
        assert_eq!(rows.len(), 3, "{rows:?}");
        assert_eq!(rows[0]["connections"], 2100);
        assert_eq!(rows[0]["kib_per_connection_step"], 1.0);
        assert_eq!(rows[0]["connects_per_s_step"], 4200.0);
        assert_eq!(rows[1]["connections"], 4500);
        assert_eq!(rows[1]["connects_per_s_step"], 9600.0);
        // The top, short of the next step.
        assert_eq!(rows[2]["connections"], 4600);
        assert_eq!(rows[2]["kib_per_connection_step"], 1.0);
        assert!(climb(&pts, 0).is_empty());
    }

    #[test]
    fn slope_fits_a_line() {
        let pts: Vec<MemoryPoint> = (0..20)
            .map(|i| MemoryPoint {
                connections: i * 100,
                rss_kib: 5000 + i * 100 * 3 + (i % 2) * 7,
                t_ms: 0,
            })
            .collect();
        let s = slope(&pts).unwrap();
        assert!((s - 3.0).abs() < 0.05, "{s}");
        assert!(slope(&pts[..3]).is_none());
        let flat: Vec<MemoryPoint> = (0..9)
            .map(|_| MemoryPoint {
                connections: 5,
                rss_kib: 1,
                t_ms: 0,
            })
            .collect();
        assert!(slope(&flat).is_none());
    }
}
