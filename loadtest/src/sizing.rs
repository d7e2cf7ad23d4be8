//! `sizing`: how many Herald nodes and Redis shards a deployment needs,
//! recomputed from result files so that deploy/README.md's table follows
//! new measurements instead of drifting from them. The model is `plan`, a
//! pure function of the measured figures and the hardware assumed; the rest
//! reads result files and prints Markdown.

use crate::results::{read_result, RunResult};
use crate::stats;
use anyhow::{bail, Result};
use std::fmt::Write as _;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct SizingArgs {
    /// Result files: idle (memory per connection), throughput against one
    /// node (CPU per message), throughput against several nodes on Redis
    /// (Herald and Redis CPU per message; the processes must be named
    /// herald=PID and redis=PID, as bench-cluster.sh does). Several of a
    /// kind: their median.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    /// CPU cores of one Herald node.
    #[arg(long, default_value_t = 16.0)]
    pub cores_per_node: f64,
    /// RAM of one Herald node, GiB.
    #[arg(long, default_value_t = 64.0)]
    pub ram_per_node_gib: f64,
    /// Share of CPU and RAM a plan may use (0.5: half), for Herald nodes and
    /// Redis shards alike; the rest absorbs reconnect storms, peaks and, on
    /// Redis, the fork of an AOF rewrite.
    #[arg(long, default_value_t = 0.5)]
    pub headroom: f64,
    /// Kernel memory per idle connection outside the process's RSS (socket,
    /// its inode and file, epoll entry), KiB. The default was measured at
    /// 15,000 idle websockets (deploy/README.md, Sizing model).
    #[arg(long, default_value_t = DEFAULT_KERNEL_KIB)]
    pub kernel_kib_per_connection: f64,
    /// Open-file limit of one node (the unit's LimitNOFILE).
    #[arg(long, default_value_t = 1_048_576)]
    pub nofile_per_node: u64,
    /// Nodes added above what load needs, so that the others carry a lost
    /// node's connections (deploy/README.md sizes for N-1).
    #[arg(long, default_value_t = 1)]
    pub spare_nodes: u64,
    /// Pushes per second one Redis shard carries (overrides the CPU figure).
    #[arg(long)]
    pub redis_msgs_per_shard: Option<f64>,
    /// Redis CPU per push, µs (overrides the cluster result's).
    #[arg(long)]
    pub redis_us_per_message: Option<f64>,
    /// Cores one Redis shard's primary uses (Redis runs commands on one thread).
    #[arg(long, default_value_t = 1.0)]
    pub cores_per_shard: f64,
    /// RAM of one Redis server, GiB.
    #[arg(long, default_value_t = 32.0)]
    pub ram_per_shard_gib: f64,
    /// Redis memory per connected user agent, KiB (overrides the cluster
    /// idle result's).
    #[arg(long)]
    pub redis_kib_per_ua: Option<f64>,
    /// Redis servers holding each key in the measured cluster (a primary and
    /// its replicas): the idle result's Redis memory is divided by it.
    #[arg(long, default_value_t = 2)]
    pub redis_copies: u32,
    /// Connected user agents to plan for (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "10000000,100000000")]
    pub connections: Vec<u64>,
    /// Pushes per second to plan for (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1000,10000,100000")]
    pub rates: Vec<f64>,
}

/// Slab growth per socket at 15,000 idle websockets on loopback (30,000
/// sockets, both ends in one kernel): 5.0-5.1 KiB (deploy/README.md).
pub const DEFAULT_KERNEL_KIB: f64 = 5.0;

/// What the result files say, each figure a median over its files.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Measured {
    /// Herald's resident memory per idle connection on one node, KiB.
    pub kib_per_connection: Option<f64>,
    /// The same per Herald node of a multi-node run on Redis.
    pub cluster_kib_per_connection: Option<f64>,
    /// Herald's resident memory before the idle run, KiB: a node's floor.
    pub base_rss_kib: Option<f64>,
    /// Server CPU per delivered push against one node, µs.
    pub node_us: Option<f64>,
    /// Herald CPU per push over all nodes of a cluster run, µs.
    pub cluster_herald_us: Option<f64>,
    /// Redis CPU per push over all Redis servers of a cluster run, µs.
    pub cluster_redis_us: Option<f64>,
    /// Redis memory per connected user agent over all Redis servers, KiB.
    pub cluster_redis_kib_per_ua: Option<f64>,
    /// The files read, for the table's footnote.
    pub files: Vec<String>,
}

/// Everything the model needs, measured or assumed.
#[derive(Debug, Clone, PartialEq)]
pub struct Inputs {
    pub kib_per_connection: f64,
    pub kernel_kib_per_connection: f64,
    pub base_rss_kib: f64,
    pub herald_us: f64,
    pub cores_per_node: f64,
    pub ram_per_node_gib: f64,
    pub headroom: f64,
    pub nofile_per_node: u64,
    pub spare_nodes: u64,
    pub redis_cpu: RedisCpu,
    pub redis_kib_per_ua: f64,
    pub ram_per_shard_gib: f64,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RedisCpu {
    /// µs of Redis CPU per push, on `cores` cores per shard.
    PerMessage { us: f64, cores: f64 },
    /// Pushes per second one shard carries.
    Throughput(f64),
}

/// One line of the table.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub connections: u64,
    pub rate: f64,
    pub by_memory: u64,
    pub by_cpu: u64,
    pub by_files: u64,
    /// The largest of the three, plus the spares.
    pub nodes: u64,
    /// Connections each node holds while the spares are down.
    pub connections_per_node: u64,
    pub shards_by_cpu: u64,
    pub shards_by_memory: u64,
    pub shards: u64,
}

fn ceil_div(x: f64, per: f64) -> u64 {
    if per <= 0.0 || !per.is_finite() {
        return u64::MAX;
    }
    // A hair below an integer is that integer: the inputs are decimal.
    (x / per - 1e-9).ceil().max(0.0) as u64
}

/// The model: nodes by memory, CPU and open files, Redis shards by CPU and
/// memory, for `connections` user agents and `rate` pushes per second.
pub fn plan(i: &Inputs, connections: u64, rate: f64) -> Plan {
    let c = connections as f64;
    let usable_kib = i.ram_per_node_gib * 1024.0 * 1024.0 * i.headroom - i.base_rss_kib;
    let by_memory = ceil_div(
        c * (i.kib_per_connection + i.kernel_kib_per_connection),
        usable_kib,
    );
    let by_cpu = ceil_div(rate * i.herald_us, i.cores_per_node * i.headroom * 1e6);
    let by_files = ceil_div(c, i.nofile_per_node as f64);
    let needed = by_memory.max(by_cpu).max(by_files).max(1);
    let shards_by_cpu = match i.redis_cpu {
        RedisCpu::PerMessage { us, cores } => ceil_div(rate * us, cores * i.headroom * 1e6),
        RedisCpu::Throughput(per_shard) => ceil_div(rate, per_shard * i.headroom),
    };
    let shards_by_memory = ceil_div(
        c * i.redis_kib_per_ua,
        i.ram_per_shard_gib * 1024.0 * 1024.0 * i.headroom,
    );
    Plan {
        connections,
        rate,
        by_memory,
        by_cpu,
        by_files,
        nodes: needed + i.spare_nodes,
        connections_per_node: connections.div_ceil(needed),
        shards_by_cpu,
        shards_by_memory,
        shards: shards_by_cpu.max(shards_by_memory).max(1),
    }
}

/// CPU seconds and RSS growth (KiB) of the processes named `name`, if every
/// one of them was read.
fn named(r: &RunResult, name: &str) -> (Option<f64>, Option<f64>) {
    let mine: Vec<_> = r
        .servers
        .iter()
        .filter(|s| s.name.as_deref() == Some(name))
        .collect();
    if mine.is_empty() {
        return (None, None);
    }
    let cpu = mine.iter().map(|s| s.cpu_s).sum::<Option<f64>>();
    let grown = mine
        .iter()
        .map(|s| Some(s.rss_after_kib? as f64 - s.rss_before_kib? as f64))
        .sum::<Option<f64>>();
    (cpu, grown)
}

fn metric(r: &RunResult, k: &str) -> Option<f64> {
    r.metrics.get(k).and_then(serde_json::Value::as_f64)
}

/// The figures the model takes from result files. An idle run with named
/// Redis servers gives Herald's and Redis's memory apart; a throughput run
/// with named Redis servers is a cluster run, any other a one-node run.
pub fn measured(runs: &[(String, RunResult)]) -> Measured {
    let (mut kib, mut cluster_kib, mut base) = (vec![], vec![], vec![]);
    let (mut node, mut herald, mut redis, mut redis_kib) = (vec![], vec![], vec![], vec![]);
    for (_, r) in runs {
        let (herald_cpu, herald_grown) = named(r, "herald");
        let (redis_cpu, redis_grown) = named(r, "redis");
        match r.scenario.as_str() {
            "idle" => {
                let open = metric(r, "open_at_end").filter(|n| *n > 0.0);
                match (herald_grown, redis_grown, open) {
                    (Some(g), Some(rg), Some(n)) => {
                        cluster_kib.push(g / n);
                        redis_kib.push(rg / n);
                    }
                    (Some(g), None, Some(n)) => kib.push(g / n),
                    _ => kib.extend(metric(r, "server_kib_per_connection")),
                }
                // Per Herald process: a cluster run sums several nodes.
                let before: Vec<f64> = r
                    .servers
                    .iter()
                    .filter(|s| s.name.as_deref() != Some("redis"))
                    .filter_map(|s| s.rss_before_kib.map(|k| k as f64))
                    .collect();
                if !before.is_empty() {
                    base.push(before.iter().sum::<f64>() / before.len() as f64);
                }
            }
            "throughput" => {
                let delivered = metric(r, "delivered").filter(|n| *n > 0.0);
                match (redis_cpu, delivered) {
                    (Some(rc), Some(d)) => {
                        redis.push(rc * 1e6 / d);
                        herald.extend(herald_cpu.map(|h| h * 1e6 / d));
                    }
                    _ => node.extend(metric(r, "server_cpu_us_per_delivered")),
                }
            }
            _ => {}
        }
    }
    Measured {
        kib_per_connection: stats::median(kib),
        cluster_kib_per_connection: stats::median(cluster_kib),
        base_rss_kib: stats::median(base),
        node_us: stats::median(node),
        cluster_herald_us: stats::median(herald),
        cluster_redis_us: stats::median(redis),
        cluster_redis_kib_per_ua: stats::median(redis_kib),
        files: runs.iter().map(|(f, _)| f.clone()).collect(),
    }
}

/// The model's inputs from the measurements and the flags; an error names
/// what is missing.
pub fn inputs(m: &Measured, a: &SizingArgs) -> Result<Inputs> {
    if !(a.headroom > 0.0 && a.headroom <= 1.0) {
        bail!("--headroom must be in (0, 1]");
    }
    let Some(kib) = m.cluster_kib_per_connection.or(m.kib_per_connection) else {
        bail!("no idle result with server memory per connection among the files");
    };
    let Some(herald_us) = m.cluster_herald_us.or(m.node_us) else {
        bail!("no throughput result with server CPU among the files (run it with --server-pid)");
    };
    let redis_cpu = match (
        a.redis_msgs_per_shard,
        a.redis_us_per_message.or(m.cluster_redis_us),
    ) {
        (Some(n), _) => RedisCpu::Throughput(n),
        (None, Some(us)) => RedisCpu::PerMessage {
            us,
            cores: a.cores_per_shard,
        },
        (None, None) => bail!(
            "no Redis CPU: give a cluster throughput result (bench-cluster.sh), \
             --redis-us-per-message or --redis-msgs-per-shard"
        ),
    };
    let copies = f64::from(a.redis_copies.max(1));
    let Some(redis_kib_per_ua) = a
        .redis_kib_per_ua
        .or(m.cluster_redis_kib_per_ua.map(|k| k / copies))
    else {
        bail!("no Redis memory per user agent: give a cluster idle result or --redis-kib-per-ua");
    };
    Ok(Inputs {
        kib_per_connection: kib,
        kernel_kib_per_connection: a.kernel_kib_per_connection,
        base_rss_kib: m.base_rss_kib.unwrap_or(0.0),
        herald_us,
        cores_per_node: a.cores_per_node,
        ram_per_node_gib: a.ram_per_node_gib,
        headroom: a.headroom,
        nofile_per_node: a.nofile_per_node,
        spare_nodes: a.spare_nodes,
        redis_cpu,
        redis_kib_per_ua: redis_kib_per_ua.max(0.0),
        ram_per_shard_gib: a.ram_per_shard_gib,
    })
}

/// 10000000 as "10M", 1500 as "1,500".
fn count(n: f64) -> String {
    if n >= 1e6 && (n / 1e6).fract() == 0.0 {
        return format!("{}M", n / 1e6);
    }
    thousands(n)
}

/// 1500 as "1,500".
fn thousands(n: f64) -> String {
    let s = format!("{}", n.round() as u64);
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

/// The table and the assumptions behind it, as Markdown.
pub fn markdown(m: &Measured, i: &Inputs, plans: &[Plan]) -> String {
    let mut s = String::new();
    s += "| connected UAs | pushes/s | nodes by memory | by CPU | by open files | nodes (max + spare) | connections per node, spare down | Redis shards by CPU | by memory | Redis shards |\n";
    s += "|---|---|---|---|---|---|---|---|---|---|\n";
    for p in plans {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | **{}** | {} | {} | {} | **{}** |",
            count(p.connections as f64),
            count(p.rate),
            p.by_memory,
            p.by_cpu,
            p.by_files,
            p.nodes,
            thousands(p.connections_per_node as f64),
            p.shards_by_cpu,
            p.shards_by_memory,
            p.shards
        );
    }
    s += "\n";
    s += &assumptions(m, i);
    s
}

fn assumptions(m: &Measured, i: &Inputs) -> String {
    let pct = i.headroom * 100.0;
    let mut s = String::from("Assumptions:\n\n");
    let _ = writeln!(
        s,
        "- Herald node: {} cores, {} GiB RAM, planned to use {pct:.0}% of each (headroom for reconnect storms and peaks); {} spare node(s) so the rest carry a lost node's user agents.",
        i.cores_per_node, i.ram_per_node_gib, i.spare_nodes
    );
    let mem_from = if m.cluster_kib_per_connection.is_some() {
        "growth of the Herald nodes' RSS in an idle run on Redis"
    } else {
        "growth of Herald's RSS in an idle run on one node"
    };
    let _ = writeln!(
        s,
        "- Memory per connection: {:.2} KiB of Herald's RSS ({mem_from}) + {:.2} KiB of kernel memory outside RSS; {:.0} MiB RSS floor per node.",
        i.kib_per_connection,
        i.kernel_kib_per_connection,
        i.base_rss_kib / 1024.0
    );
    if let (Some(one), Some(_)) = (m.kib_per_connection, m.cluster_kib_per_connection) {
        let _ = writeln!(
            s,
            "- For comparison, one node on its own: {one:.2} KiB of RSS per connection."
        );
    }
    let cpu_from = if m.cluster_herald_us.is_some() {
        "Herald CPU over all nodes of a run on Redis (with several nodes, wake-ups included)"
    } else {
        "one node on its own (no cluster result: wake-ups between nodes not counted)"
    };
    let _ = writeln!(
        s,
        "- CPU per push (accept, deliver, ack): {:.1} µs, {cpu_from}; idle connections' pings not counted.",
        i.herald_us
    );
    if let Some(us) = m.node_us {
        let _ = writeln!(
            s,
            "- For comparison, one node without Redis: {us:.1} µs per push."
        );
    }
    let _ = writeln!(
        s,
        "- Open files: {} per node (LimitNOFILE), one per websocket. Behind a reverse proxy each (proxy address, node address) pair also holds at most one connection per local port (28,232 with the default ip_local_port_range), so give the proxy several source addresses or nodes several listen addresses.",
        thousands(i.nofile_per_node as f64)
    );
    match i.redis_cpu {
        RedisCpu::PerMessage { us, cores } => {
            let _ = writeln!(
                s,
                "- Redis CPU per push: {us:.1} µs (all Redis servers of the run, replicas included, so an overestimate for the primaries), {cores} core(s) per shard at {pct:.0}%."
            );
        }
        RedisCpu::Throughput(n) => {
            let _ = writeln!(
                s,
                "- Redis: {} pushes/s per shard (given), used to {pct:.0}%.",
                count(n)
            );
        }
    }
    let _ = writeln!(
        s,
        "- Redis memory per connected user agent: {:.2} KiB per copy, {} GiB per Redis server used to {pct:.0}%; messages stored for offline user agents come on top (deploy/README.md, Per Redis shard).",
        i.redis_kib_per_ua, i.ram_per_shard_gib
    );
    let _ = writeln!(s, "- From: {}.", m.files.join(", "));
    s
}

pub fn run(a: SizingArgs) -> Result<()> {
    let mut runs = Vec::new();
    for f in &a.files {
        runs.push((f.display().to_string(), read_result(f)?));
    }
    let m = measured(&runs);
    let i = inputs(&m, &a)?;
    let mut plans = Vec::new();
    for &c in &a.connections {
        for &r in &a.rates {
            plans.push(plan(&i, c, r));
        }
    }
    print!("{}", markdown(&m, &i, &plans));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::results::ServerStat;

    fn inputs() -> Inputs {
        Inputs {
            kib_per_connection: 6.0,
            kernel_kib_per_connection: 2.0,
            base_rss_kib: 0.0,
            herald_us: 100.0,
            cores_per_node: 16.0,
            ram_per_node_gib: 64.0,
            headroom: 0.5,
            nofile_per_node: 1_048_576,
            spare_nodes: 1,
            redis_cpu: RedisCpu::PerMessage {
                us: 50.0,
                cores: 1.0,
            },
            redis_kib_per_ua: 1.0,
            ram_per_shard_gib: 32.0,
        }
    }

    #[test]
    fn memory_bound_at_many_connections_few_pushes() {
        // 10M x 8 KiB = 80,000,000 KiB over 32 GiB usable (33,554,432 KiB): 2.38 -> 3.
        let p = plan(&inputs(), 10_000_000, 1000.0);
        assert_eq!(p.by_memory, 3);
        // 1000/s x 100 µs = 0.1 s/s over 8 usable cores: 1.
        assert_eq!(p.by_cpu, 1);
        // 10M over 1,048,576 descriptors: 9.54 -> 10.
        assert_eq!(p.by_files, 10);
        assert_eq!(p.nodes, 11);
        assert_eq!(p.connections_per_node, 1_000_000);
        // 1000 x 50 µs = 0.05 of a core, half a core usable: 1 shard by CPU;
        // 10M x 1 KiB over 16 GiB usable: 0.6 -> 1.
        assert_eq!((p.shards_by_cpu, p.shards_by_memory, p.shards), (1, 1, 1));
    }

    #[test]
    fn cpu_bound_at_high_rates() {
        let p = plan(&inputs(), 10_000_000, 100_000.0);
        // 100,000 x 100 µs = 10 cores over 8: 2. Files still rule.
        assert_eq!(p.by_cpu, 2);
        // 100,000 x 50 µs = 5 cores over 0.5 per shard: 10.
        assert_eq!(p.shards_by_cpu, 10);
        let mut i = inputs();
        i.herald_us = 1000.0;
        // 100 cores over 8: 12.5 -> 13, above the 10 for files.
        let p = plan(&i, 10_000_000, 100_000.0);
        assert_eq!((p.by_cpu, p.nodes), (13, 14));
        i.redis_cpu = RedisCpu::Throughput(20_000.0);
        // 100,000 over 10,000 usable per shard.
        assert_eq!(plan(&i, 1, 100_000.0).shards_by_cpu, 10);
    }

    #[test]
    fn exact_fits_do_not_round_up() {
        let mut i = inputs();
        i.kernel_kib_per_connection = 0.0;
        i.kib_per_connection = 1.0;
        i.ram_per_node_gib = 2.0;
        // 1 GiB usable holds exactly 1,048,576 connections of 1 KiB.
        assert_eq!(plan(&i, 1_048_576, 1.0).by_memory, 1);
        assert_eq!(plan(&i, 1_048_577, 1.0).by_memory, 2);
    }

    fn server(name: &str, cpu: f64, before: u64, after: u64) -> ServerStat {
        ServerStat {
            pid: 1,
            name: Some(name.into()),
            cpu_s: Some(cpu),
            rss_before_kib: Some(before),
            rss_after_kib: Some(after),
        }
    }

    fn result(scenario: &str, metrics: serde_json::Value, servers: Vec<ServerStat>) -> RunResult {
        RunResult {
            scenario: scenario.into(),
            metrics: metrics.as_object().cloned().unwrap_or_default(),
            servers,
            ..Default::default()
        }
    }

    #[test]
    fn reads_one_node_and_cluster_runs_apart() {
        let runs = vec![
            (
                "idle.json".to_string(),
                result(
                    "idle",
                    serde_json::json!({"server_kib_per_connection": 5.5, "open_at_end": 1000}),
                    vec![],
                ),
            ),
            (
                "tp.json".to_string(),
                result(
                    "throughput",
                    serde_json::json!({"server_cpu_us_per_delivered": 60.0, "delivered": 10}),
                    vec![],
                ),
            ),
            (
                "cluster-tp.json".to_string(),
                result(
                    "throughput",
                    serde_json::json!({"delivered": 100_000, "server_cpu_us_per_delivered": 1.0}),
                    vec![
                        server("herald", 10.0, 0, 0),
                        server("herald", 20.0, 0, 0),
                        server("redis", 5.0, 0, 0),
                    ],
                ),
            ),
            (
                "cluster-idle.json".to_string(),
                result(
                    "idle",
                    serde_json::json!({"server_kib_per_connection": 99.0, "open_at_end": 1000}),
                    vec![
                        server("herald", 0.0, 20_000, 26_000),
                        server("redis", 0.0, 8_000, 10_000),
                        server("redis", 0.0, 8_000, 10_000),
                    ],
                ),
            ),
        ];
        let m = measured(&runs);
        // Herald alone: 6,000 KiB over 1,000, kept apart from one node's 5.5.
        assert_eq!(m.kib_per_connection, Some(5.5));
        assert_eq!(m.cluster_kib_per_connection, Some(6.0));
        assert_eq!(m.cluster_redis_kib_per_ua, Some(4.0));
        assert_eq!(m.base_rss_kib, Some(20_000.0));
        assert_eq!(m.node_us, Some(60.0));
        assert_eq!(m.cluster_herald_us, Some(300.0));
        assert_eq!(m.cluster_redis_us, Some(50.0));
    }

    #[test]
    fn counts_read_as_in_the_brief() {
        assert_eq!(count(10_000_000.0), "10M");
        assert_eq!(count(100_000.0), "100,000");
        assert_eq!(count(1_048_576.0), "1,048,576");
        assert_eq!(thousands(1_000_000.0), "1,000,000");
        assert_eq!(count(999.0), "999");
    }
}
