//! herald-loadtest: a load generator for Web Push services that speak the
//! Mozilla push websocket protocol (Herald, autopush-rs). It needs only the
//! websocket URL: push endpoints come from `register` replies.

mod abuse;
mod backlog;
mod bridge;
mod burst;
mod chaos;
mod crypto;
mod fanout;
mod faultproxy;
mod fcm_sink;
mod fleet;
mod follow;
mod harness;
mod idle;
mod mixed;
mod net;
mod proto;
mod report;
mod restart;
mod results;
mod sender;
mod sizing;
mod soak;
mod stats;
mod storm;
mod throughput;
mod workers;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "herald-loadtest",
    version,
    about = "Load generator for Web Push services (Mozilla push websocket protocol + RFC 8030/8291/8292)",
    long_about = "Load generator for Web Push services (Mozilla push websocket protocol + RFC 8030/8291/8292).\n\
                  Each scenario prints a one-line summary and writes JSON results; `report` turns results into an HTML page.\n\
                  Traffic goes to loopback addresses only."
)]
struct Cli {
    /// Runtime worker threads (default: one per core).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Open and hold many user agents; report connect rate, failures and server memory per connection.
    Idle(idle::IdleArgs),
    /// Connected user agents, concurrent senders: accepted/s, delivered/s, end-to-end latency.
    Throughput(throughput::ThroughputArgs),
    /// Store messages for offline user agents, reconnect them, measure the drain.
    Backlog(backlog::BacklogArgs),
    /// Disconnect and reconnect user agents within a window; hello latency and failures.
    Storm(storm::StormArgs),
    /// Many messages in flight per channel, each acked with its own frame (as Firefox does),
    /// live and from a stored backlog; reports whether the server cut the user agent off.
    Burst(burst::BurstArgs),
    /// Idle user agents following a broadcast (and some following nothing); change its version
    /// through the broadcast API and time how long every follower takes to hear of it.
    Fanout(fanout::FanoutArgs),
    /// Restart at scale: build a large store (herald import), then start and stop `herald serve`
    /// on it (SIGTERM, and kill -9 during a push load); time to ready and to first delivery.
    Restart(restart::RestartArgs),
    /// Mobile devices registered through the registration API, pushes forwarded by Herald's
    /// FCM bridge to an in-process FCM sink: pushes/s, arrivals/s, latency, server CPU per push.
    Bridge(bridge::BridgeArgs),
    /// Mixed load for a long time (reconnects, TTLs, topics, acks, nacks, unregistrations), then
    /// an exact account of every message; fails if any accepted message was lost.
    Soak(soak::SoakArgs),
    /// Soak's mixed load over several nodes while a fault schedule breaks and heals them
    /// (user agents moving between nodes, a history file), then an exact account of every
    /// message, registration and receipt, the time each fault took to recover from, and how
    /// long an old socket outlived its user agent's move; fails on any loss.
    Chaos(chaos::ChaosArgs),
    /// Fairness under abuse: well-behaved senders' latency and delivery at a steady rate,
    /// without and then with one flooder (one subscription, many, optionally without VAPID);
    /// what the flooder got (201s, 429s by errno), checked against p99 ≤ 2× baseline.
    Abuse(abuse::AbuseArgs),
    /// A TCP proxy for fault runs: per-direction latency and bandwidth, resets (all now, or at
    /// random per chunk) and half-open links, changed at run time through a control port.
    Faultproxy(faultproxy::FaultProxyArgs),
    /// Turn result JSON files into a self-contained HTML page with SVG plots.
    Report(report::ReportArgs),
    /// Print the side-by-side table of result files (one row per target): throughput,
    /// server CPU per message, latency, idle memory per connection, bridged pushes/s.
    Compare(report::CompareArgs),
    /// Herald nodes and Redis shards for 10M and 100M connected user agents at
    /// 1k/10k/100k pushes/s, recomputed from idle and throughput result files
    /// (Markdown table and assumptions).
    Sizing(sizing::SizingArgs),
    /// Internal: one worker process of `idle`.
    #[command(hide = true)]
    IdleWorker {
        #[arg(long)]
        spec: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let command = match cli.command {
        Command::Report(args) => return finish(report::run(args)),
        Command::Compare(args) => return finish(report::compare(args)),
        Command::Sizing(args) => return finish(sizing::run(args)),
        other => other,
    };
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    rt.enable_all();
    if let Some(n) = cli.threads {
        rt.worker_threads(n.max(1));
    }
    let rt = match rt.build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("herald-loadtest: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async move {
        let work = async move {
            match command {
                Command::Idle(a) => idle::run(a).await,
                Command::Throughput(a) => throughput::run(a).await,
                Command::Backlog(a) => backlog::run(a).await,
                Command::Storm(a) => storm::run(a).await,
                Command::Burst(a) => burst::run(a).await,
                Command::Fanout(a) => fanout::run(a).await,
                Command::Soak(a) => soak::run(a).await,
                Command::Chaos(a) => chaos::run(a).await,
                Command::Bridge(a) => bridge::run(a).await,
                Command::Restart(a) => restart::run(a).await,
                Command::Abuse(a) => abuse::run(a).await,
                Command::Faultproxy(a) => faultproxy::run(a).await,
                Command::IdleWorker { spec } => workers::worker_process(&spec).await,
                Command::Report(_) | Command::Compare(_) | Command::Sizing(_) => Err(
                    anyhow::anyhow!("report, compare and sizing run outside the runtime"),
                ),
            }
        };
        tokio::select! {
            r = work => r,
            _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
        }
    });
    // Held connections would otherwise be closed one by one on drop.
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    finish(result)
}

fn finish(r: anyhow::Result<()>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("herald-loadtest: {e:#}");
            ExitCode::FAILURE
        }
    }
}
