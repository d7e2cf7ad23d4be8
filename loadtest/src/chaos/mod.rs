//! Scenario `chaos`: `soak`'s mixed load over several nodes while a fault
//! schedule breaks and heals them, then an exact account of every message.
//! User agents move to another node on each reconnect, and some moves keep
//! the old socket open to time how long two nodes both serve one user agent.
//! Every operation goes to an optional history file. After the load every
//! fault is healed, the nodes settle, every user agent reconnects, drains,
//! and sends one last push to each channel it holds (which must arrive:
//! a registration the service forgot is counted). Each accepted message is
//! classified by `soak`'s ledger; `check` adds the per-fault costs, the
//! dual-owner bound and the verdict. `faults` runs the schedule and times
//! each recovery.

mod check;
mod faults;

use crate::harness::Run;
use crate::mixed::history::History;
use crate::mixed::ledger::{self, Fate, Outcome};
use crate::mixed::receipts::ReceiptTally;
use crate::mixed::{self, Roaming, ServerWatch, Shared, SoakArgs};
use crate::results::{parse_server_pid, Common, CpuMeter, RunResult, ServerPid};
use anyhow::{bail, Context, Result};
use faults::FaultRun;
use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

#[derive(clap::Args, Clone, Debug)]
pub struct ChaosArgs {
    /// Websocket URLs of the nodes (loopback), comma-separated; user agents
    /// start spread over them and move to another one on each reconnect.
    #[arg(
        long,
        value_name = "URL,URL...",
        value_delimiter = ',',
        required = true
    )]
    pub nodes: Vec<String>,
    /// Seconds of mixed load; the faults happen inside it.
    #[arg(long, default_value_t = 60.0)]
    pub duration: f64,
    /// JSON lines, one fault each (label, at, heal_at, start, heal); none
    /// runs the load without faults.
    #[arg(long)]
    pub schedule: Option<PathBuf>,
    /// Where to write the JSON results.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Every operation and its outcome, one JSON object a line.
    #[arg(long)]
    pub history: Option<PathBuf>,
    /// User agents.
    #[arg(long, default_value_t = 30)]
    pub uas: usize,
    /// Seed for the user agents' choices (default: random).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Seconds a connection must have been up for a message it did not get
    /// to count against the service (see mixed/ledger.rs).
    #[arg(long, default_value_t = 2.0)]
    pub grace: f64,
    /// Seconds between the end of the load (every fault healed) and the
    /// user agents' return for the final drain.
    #[arg(long, default_value_t = 5.0)]
    pub settle: f64,
    /// Share of POSTs that ask for a delivery receipt.
    #[arg(long, default_value_t = 0.3)]
    pub receipts: f64,
    /// Seconds after an ack on a cleanly closed connection within which the
    /// message may still come again (acks a killed node had not stored);
    /// 0 counts every such repeat.
    #[arg(long, default_value_t = 0.0)]
    pub redelivery_window: f64,
    /// Longest time, seconds, an old socket may stay open after its user
    /// agent moved to another node.
    #[arg(long, default_value_t = 10.0)]
    pub dual_owner_bound: f64,
    /// Share of moves that keep the old socket open.
    #[arg(long, default_value_t = 0.2)]
    pub keep_old: f64,
    /// Longest time away, seconds, for user agents that stay offline a while.
    #[arg(long, default_value_t = 20.0)]
    pub long_offline: f64,
    /// Longest final drain, seconds.
    #[arg(long, default_value_t = 30.0)]
    pub drain: f64,
    /// Longest wait, seconds, after the drain for receipts still due.
    #[arg(long, default_value_t = 10.0)]
    pub receipt_wait: f64,
    /// Longest time, seconds, to wait for every node to pass a probe after
    /// a heal.
    #[arg(long, default_value_t = 60.0)]
    pub recovery_limit: f64,
    /// Seconds any protocol step or request may take.
    #[arg(long, default_value_t = 10.0)]
    pub timeout: f64,
    /// Name of the system under test, recorded in the results.
    #[arg(long, default_value = "herald")]
    pub target: String,
    /// Server processes to sample, as `soak` does (NAME=PID,...).
    #[arg(long, value_name = "[NAME=]PID[,...]", value_delimiter = ',', value_parser = parse_server_pid)]
    pub server_pid: Vec<ServerPid>,
}

impl ChaosArgs {
    /// The mixed load's settings: `soak`'s defaults where chaos has no
    /// option of its own.
    fn load(&self, seed: u64) -> SoakArgs {
        SoakArgs {
            common: Common {
                urls: self.nodes.clone(),
                push_urls: Vec::new(),
                target: self.target.clone(),
                out: self.out.clone(),
                server_pid: self.server_pid.clone(),
                concurrency: 200,
                timeout: self.timeout,
                channels: 1,
            },
            duration: self.duration,
            uas: self.uas,
            data_dir: None,
            grace: self.grace,
            pace: 0.5,
            long_offline: self.long_offline,
            nack: 0.05,
            hold: 0.1,
            drain: self.drain,
            receipts: self.receipts,
            receipt_wait: self.receipt_wait,
            seed: Some(seed),
        }
    }
}

pub async fn run(args: ChaosArgs) -> Result<()> {
    if args.uas == 0 || args.duration <= 0.0 || args.grace < 1.0 || args.settle < 0.0 {
        bail!("--uas and --duration must be positive, --grace at least 1 s, --settle not negative");
    }
    if !(0.0..=1.0).contains(&args.receipts) || !(0.0..=1.0).contains(&args.keep_old) {
        bail!("--receipts and --keep-old are fractions, 0 to 1");
    }
    let schedule = match &args.schedule {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("reading the schedule {}", p.display()))?;
            faults::parse_schedule(&text)?
        }
        None => Vec::new(),
    };
    let seed = args.seed.unwrap_or_else(rand::random);
    let load = args.load(seed);
    let mut run = Run::start_without_senders(
        "chaos",
        &load.common,
        serde_json::json!({
            "nodes": args.nodes, "uas": args.uas, "duration_s": args.duration,
            "grace_s": args.grace, "settle_s": args.settle, "receipts": args.receipts,
            "redelivery_window_s": args.redelivery_window, "dual_owner_bound_s": args.dual_owner_bound,
            "keep_old": args.keep_old, "seed": seed, "schedule": schedule.iter()
                .map(|f| serde_json::json!({"label": f.label, "at": f.at, "heal_at": f.heal_at}))
                .collect::<Vec<_>>(),
        }),
    )
    .await?;
    run.need_files(args.uas * 3 + 100, &format!("{} user agents", args.uas))?;
    run.require_readable_servers()?;
    let history = args.history.as_deref().map(History::create).transpose()?;
    let roaming = Roaming {
        keep_old: args.keep_old,
        ..Default::default()
    };
    let sh = Arc::new(
        Shared::new(
            load.clone(),
            run.targets.clone(),
            &[],
            run.limit,
            crate::stats::secs(args.settle),
            Some(roaming),
            history,
        )
        .await?,
    );
    eprintln!(
        "chaos: {} user agents over {} nodes for {:.0} s (seed {seed}), {} faults, then heal, settle {:.0} s and drain",
        args.uas,
        sh.targets.len(),
        args.duration,
        schedule.len(),
        args.settle
    );
    let cpu = CpuMeter::start(&run.server);
    let watch = ServerWatch::spawn(&run.server, &sh);
    let faults_task = tokio::spawn(faults::execute(sh.clone(), schedule, args.recovery_limit));
    mixed::run_uas(&sh, seed).await;
    let fault_runs = faults_task.await.context("the fault schedule")?;
    let server = watch.stop().await;
    cpu.record(&mut run.result);

    let mut record = std::mem::take(&mut *sh.record());
    record.end = sh.now();
    let mut t = ledger::classify_within(&record, args.grace, args.redelivery_window);
    let rt = mixed::collect_receipts(&sh, &record, &t.fates).await;
    let ttl0_dropped = check::ttl0_dropped_in_faults(&record, &t.fates, &fault_runs, args.grace);
    for id in &ttl0_dropped {
        t.fates.insert(*id, Fate::Expired);
    }
    // Counted among the expired (a TTL-0 message that found nobody to take
    // it is one that expired at once), and reported on their own.
    let n = ttl0_dropped.len() as u64;
    t.lost -= n;
    t.expired += n;
    t.expired_ttl0 += n;
    t.lost_ids.retain(|id| !ttl0_dropped.contains(id));
    let costs = check::fault_costs(&record, &t.fates, &fault_runs);
    let roaming = sh.roaming.as_ref().expect("chaos roams");
    let moves = roaming
        .dual
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let (dual_max, dual_open) = check::dual_owner_max(&moves, sh.now());
    let counts = check::Counts {
        lost: t.lost,
        duplicates: t.repeated_on_one_connection,
        registrations_lost: roaming.registrations_lost.load(Relaxed),
        receipt_errors: rt.errors,
        acked_redelivered_late: t.acked_redelivered_late,
        dual_owner_max_secs: dual_max,
        dual_owner_bound: args.dual_owner_bound,
        fault_failures: fault_runs.iter().filter_map(|f| f.failed.clone()).collect(),
    };
    let account = Account {
        record,
        t,
        rt,
        runs: fault_runs,
        costs,
        moves: moves.len() as u64,
        dual_open,
        ttl0_dropped,
        counts,
    };
    account.write(&mut run.result, &args);
    if !args.server_pid.is_empty() {
        // The peaks span restarts: a killed node's figures stop at its death.
        run.result
            .metric("server_rss_peak_kib", server.peaks.rss_kib);
        run.result.metric("server_fds_peak", server.peaks.fds);
    }
    run.error_counts(&[("malformed server message", sh.malformed.load(Relaxed))]);
    run.errors_from(&[&sh.errors]);
    if let Some(h) = &sh.history {
        h.flush();
    }
    let summary = account.summary(&args, sh.targets.len());
    run.finish(summary)?;
    let failed = check::failures(&account.counts);
    if !failed.is_empty() {
        bail!("{}", failed.join("; "));
    }
    Ok(())
}

/// What the run found, for the results file and the summary.
struct Account {
    record: ledger::Record,
    t: ledger::Tally,
    rt: ReceiptTally,
    runs: Vec<FaultRun>,
    costs: Vec<check::FaultCost>,
    moves: u64,
    dual_open: u64,
    /// TTL-0 messages excused by a fault (`check::ttl0_dropped_in_faults`).
    ttl0_dropped: Vec<u64>,
    counts: check::Counts,
}

impl Account {
    fn count(&self, o: Outcome) -> u64 {
        self.record.sent.iter().filter(|m| m.outcome == o).count() as u64
    }

    /// Metrics (names agreed with scripts/chaos.sh) and notes.
    fn write(&self, r: &mut RunResult, args: &ChaosArgs) {
        let (t, rt, c) = (&self.t, &self.rt, &self.counts);
        for (name, v) in [
            ("accepted", t.accepted),
            ("delivered", t.delivered),
            ("expired", t.expired),
            ("replaced", t.replaced),
            ("unregistered", t.unregistered),
            ("lost", t.lost),
            ("duplicates", c.duplicates),
            ("redelivered", t.redelivered),
            ("unknown", t.unknown),
            ("rejected", self.count(Outcome::Rejected)),
            ("posts_unanswered", self.count(Outcome::Unknown)),
            ("posts", self.record.sent.len() as u64),
            ("connections", self.record.conns.len() as u64),
            ("receipts_asked", rt.asked),
            ("receipts_received", rt.received),
            ("receipt_errors", rt.errors),
            ("registrations_lost", c.registrations_lost),
            ("acked_redelivered_late", t.acked_redelivered_late),
            ("dual_owner_moves", self.moves),
            ("dual_owner_never_closed", self.dual_open),
            ("ttl0_dropped_in_faults", self.ttl0_dropped.len() as u64),
            ("delivered_unconfirmed", t.delivered_unconfirmed),
            ("delivered_after_refusal", t.delivered_after_refusal),
        ] {
            r.metric(name, v);
        }
        r.metric("dual_owner_max_secs", round3(c.dual_owner_max_secs));
        for (f, cost) in self.runs.iter().zip(&self.costs) {
            let recovery = f.recovery.map_or(-1.0, round3);
            r.metric(&format!("fault.{}.recovery_secs", f.label), recovery);
            r.metric(
                &format!("fault.{}.accepted_during", f.label),
                cost.accepted_during,
            );
            r.metric(&format!("fault.{}.lost", f.label), cost.lost);
            if f.recovery.is_none() {
                r.notes.push(format!(
                    "fault {}: the nodes did not all take and deliver a probe within {:.0} s of the heal (recovery_secs -1)",
                    f.label, args.recovery_limit
                ));
            }
        }
        for id in &t.lost_ids {
            if let Some(m) = self.record.sent.iter().find(|m| m.id == *id) {
                r.notes.push(format!(
                    "lost: id {id}, user agent {}, channel {}, TTL {}, POST {:.2}-{:.2} s",
                    m.ua, m.channel, m.ttl, m.sent_at, m.answered_at
                ));
            }
        }
        if !self.ttl0_dropped.is_empty() {
            r.notes.push(format!(
                "{} TTL-0 messages were dropped inside a fault window (counted as expired; ids {:?})",
                self.ttl0_dropped.len(),
                &self.ttl0_dropped[..self.ttl0_dropped.len().min(20)]
            ));
        }
        if self.dual_open > 0 {
            r.notes.push(format!(
                "{} old sockets were never closed after their user agent moved",
                self.dual_open
            ));
        }
        r.notes
            .extend(rt.notes.iter().map(|n| format!("receipt: {n}")));
    }

    fn summary(&self, args: &ChaosArgs, nodes: usize) -> String {
        let (t, c) = (&self.t, &self.counts);
        let recovery: Vec<String> = self
            .runs
            .iter()
            .map(|f| match f.recovery {
                Some(s) => format!("{} {s:.2} s", f.label),
                None => format!("{} none", f.label),
            })
            .collect();
        format!(
            "chaos[{}]: {:.0} s, {} user agents over {nodes} nodes, {} faults: {} accepted, {} delivered, {} expired ({} of them TTL 0 dropped in a fault), {} replaced, {} dropped by unregister, {} LOST; {} rejected; {} duplicates, {} acked redelivered late; {} registrations lost; {} receipt errors; old sockets open at most {:.2} s; recovery: {}",
            args.target,
            args.duration,
            args.uas,
            self.runs.len(),
            t.accepted,
            t.delivered,
            t.expired,
            self.ttl0_dropped.len(),
            t.replaced,
            t.unregistered,
            t.lost,
            self.count(Outcome::Rejected),
            c.duplicates,
            t.acked_redelivered_late,
            c.registrations_lost,
            c.receipt_errors,
            c.dual_owner_max_secs,
            if recovery.is_empty() { "no faults".to_string() } else { recovery.join(", ") },
        )
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}
