//! Scenario `soak`: a mixed load for a long time, then an exact account of
//! every message. User agents connect, register and unregister channels,
//! disconnect (politely or by dropping the socket) and come back with their
//! uaid, some after a long time away; each also plays its own application
//! server, so it knows whether it was online when each POST was made. POSTs
//! carry assorted TTLs (short ones to offline user agents so they expire,
//! TTL 0 to online ones), `Topic`s (several in a row to an offline user
//! agent so earlier ones are replaced) and payload sizes, each encrypted
//! (RFC 8291) around a unique id. Notifications are decrypted, and most are
//! acked, some nacked, some left unanswered until the next connection.
//! At the end every user agent reconnects and drains; `ledger` then says
//! what became of each accepted message, and the run fails if any was lost.
//! Some POSTs ask for delivery receipts (RFC 8030 section 5.1), each user
//! agent collecting its own in one receipt subscription; at the end every
//! receipt is checked against what the ledger says became of its message
//! (`receipts`), and the run fails on any wrong, missing or extra receipt.
//! The server's memory, open files and store size are sampled throughout.
//! The user agents, the ledger and the receipt check live in `mixed`, which
//! `chaos` runs over several nodes.

use crate::harness::Run;
use crate::mixed::ledger::{self, Record};
use crate::mixed::{self, receipts, ServerFigures, ServerWatch, Shared};
use crate::results::{CpuMeter, RunResult};
use anyhow::{bail, Result};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

pub use crate::mixed::SoakArgs;

pub async fn run(args: SoakArgs) -> Result<()> {
    let common = &args.common;
    if args.uas == 0 || args.duration <= 0.0 || args.grace < 1.0 {
        bail!("--uas and --duration must be positive and --grace at least 1 s (the server's expiry has whole-second granularity)");
    }
    if !(0.0..=1.0).contains(&args.receipts) {
        bail!("--receipts is a fraction of POSTs, 0 to 1");
    }
    let seed = args.seed.unwrap_or_else(rand::random);
    let mut run = Run::start(
        "soak",
        common,
        serde_json::json!({
            "uas": args.uas, "duration_s": args.duration, "grace_s": args.grace,
            "pace_s": args.pace, "long_offline_s": args.long_offline, "drain_s": args.drain,
            "nack": args.nack, "hold": args.hold,
            "receipts": args.receipts, "receipt_wait_s": args.receipt_wait,
            "seed": seed, "data_dir": args.data_dir,
        }),
    )
    .await?;
    run.need_files(args.uas * 2 + 100, &format!("{} user agents", args.uas))?;
    run.require_readable_servers()?;
    let sh = Arc::new(
        Shared::new(
            args.clone(),
            run.targets.clone(),
            &run.push_bases,
            run.limit,
            Duration::ZERO,
            None,
            None,
        )
        .await?,
    );
    eprintln!(
        "soak: {} user agents for {:.0} s (seed {seed}), then a final drain",
        args.uas, args.duration
    );
    let cpu = CpuMeter::start(&run.server);
    let watch = ServerWatch::spawn(&run.server, &sh);
    mixed::run_uas(&sh, seed).await;
    let server = watch.stop().await;
    cpu.record(&mut run.result);

    let mut record = std::mem::take(&mut *sh.record());
    record.end = sh.now();
    let t = ledger::classify(&record, args.grace);
    let rt = mixed::collect_receipts(&sh, &record, &t.fates).await;
    let account = Account {
        record,
        t,
        rt,
        server,
    };
    let summary = account.record(&mut run, &sh);
    run.finish(summary)?;
    let (t, rt) = (&account.t, &account.rt);
    if t.lost > 0 {
        bail!(
            "{} accepted messages were lost (ids {:?}...)",
            t.lost,
            t.lost_ids
        );
    }
    if rt.errors > 0 {
        bail!(
            "{} receipt errors (first: {:?})",
            rt.errors,
            rt.notes.first()
        );
    }
    Ok(())
}

/// The exact account at the end of the run: what happened to each message
/// (`t`), to each receipt (`rt`), and the server's figures.
struct Account {
    record: Record,
    t: ledger::Tally,
    rt: receipts::ReceiptTally,
    server: ServerFigures,
}

impl Account {
    /// Errors, metrics and notes into the results; returns the summary.
    fn record(&self, run: &mut Run<'_>, sh: &Shared) -> String {
        let (t, rt) = (&self.t, &self.rt);
        run.error_counts(&[
            ("lost", t.lost),
            ("duplicates of acked or nacked messages", t.duplicates),
            ("notification with an id never sent", t.unknown),
            ("malformed server message", sh.malformed.load(Relaxed)),
            ("receipt errors", rt.errors),
        ]);
        run.errors_from(&[&sh.errors]);
        self.record_metrics(&mut run.result);
        self.record_notes(&mut run.result);
        let errors = sh.errors.snapshot();
        let summary = self.summary(sh);
        if !errors.is_empty() {
            eprintln!("  errors: {errors:?}");
        }
        summary
    }

    fn record_metrics(&self, result: &mut RunResult) {
        let (t, rt, record, s) = (&self.t, &self.rt, &self.record, &self.server);
        for (name, v) in [
            ("accepted", t.accepted),
            ("accepted_ttl0", t.accepted_ttl0),
            ("delivered", t.delivered),
            ("expired", t.expired),
            ("expired_ttl0", t.expired_ttl0),
            ("replaced", t.replaced),
            ("unregistered", t.unregistered),
            ("lost", t.lost),
            ("redelivered", t.redelivered),
            ("duplicates", t.duplicates),
            ("unknown", t.unknown),
            ("delivered_unconfirmed", t.delivered_unconfirmed),
            ("delivered_after_refusal", t.delivered_after_refusal),
            ("posts", record.sent.len() as u64),
            ("receipts", record.receipts.len() as u64),
            ("connections", record.conns.len() as u64),
            ("unregistrations", record.unregistered.len() as u64),
            ("receipts_asked", rt.asked),
            ("receipts_received", rt.received),
            ("receipt_errors", rt.errors),
            ("receipts_undecided", rt.undecided),
            ("receipts_unmatched", rt.unmatched),
            ("receipts_delivered", rt.outcomes[0]),
            ("receipts_rejected", rt.outcomes[1]),
            ("receipts_expired", rt.outcomes[2]),
            ("receipts_cancelled", rt.outcomes[3]),
            ("receipts_gone", rt.outcomes[4]),
            ("server_rss_peak_kib", s.peaks.rss_kib),
            ("server_fds_peak", s.peaks.fds),
        ] {
            result.metric(name, v);
        }
        if let Some(v) = s.rss {
            result.metric("server_rss_final_kib", v);
        }
        if let Some(v) = s.fds {
            result.metric("server_fds_final", v);
        }
        if let Some(v) = s.store {
            result.metric("store_bytes_final", v);
            result.metric("store_bytes_peak", s.peaks.store);
        }
    }

    /// Enough about each lost message to reproduce its story by hand, the
    /// first duplicates, and what the receipt check found.
    fn record_notes(&self, result: &mut RunResult) {
        let (t, rt, record) = (&self.t, &self.rt, &self.record);
        for id in &t.lost_ids {
            let Some(m) = record.sent.iter().find(|m| m.id == *id) else {
                continue;
            };
            let conns: Vec<String> = record
                .conns
                .iter()
                .filter(|c| c.ua == m.ua)
                .map(|c| format!("{:.2}-{:.2}", c.up, c.down))
                .collect();
            result.notes.push(format!(
                "lost: id {id}, user agent {}, channel {}, TTL {}, topic {:?}, POST {:.2}-{:.2} s; user agent up {}",
                m.ua,
                m.channel,
                m.ttl,
                m.topic,
                m.sent_at,
                m.answered_at,
                conns.join(", ")
            ));
        }
        if !t.duplicate_ids.is_empty() {
            result.notes.push(format!(
                "ids received again after an ack or nack (first few): {:?}",
                t.duplicate_ids
            ));
        }
        for n in &rt.notes {
            result.notes.push(format!("receipt: {n}"));
        }
    }

    fn summary(&self, sh: &Shared) -> String {
        let (t, rt, s) = (&self.t, &self.rt, &self.server);
        let args = &sh.args;
        let server_text = match (s.rss, s.fds) {
            (Some(rss), Some(fds)) => format!(
                "server RSS peak {:.1} MiB, final {:.1} MiB; open files peak {}, final {fds}",
                mixed::mib(s.peaks.rss_kib),
                mixed::mib(rss),
                s.peaks.fds
            ),
            _ => "server figures not measured (no --server-pid)".into(),
        };
        let store_text = match s.store {
            Some(b) => format!(
                "store {:.2} MiB on disk (peak {:.2} MiB)",
                b as f64 / 1048576.0,
                s.peaks.store as f64 / 1048576.0
            ),
            None => "store size not measured (no --data-dir)".into(),
        };
        format!(
            "soak[{}]: {:.0} s, {} user agents, {} connections: {} accepted, {} delivered, {} expired, {} replaced, {} dropped by unregister, {} LOST; {} redelivered after an unanswered receipt, {} duplicates of acked messages; {} receipts asked, {} received, {} receipt errors; {server_text}; {store_text}; {} other errors",
            args.common.target,
            args.duration,
            args.uas,
            self.record.conns.len(),
            t.accepted,
            t.delivered,
            t.expired,
            t.replaced,
            t.unregistered,
            t.lost,
            t.redelivered,
            t.duplicates,
            rt.asked,
            rt.received,
            rt.errors,
            sh.errors.total(),
        )
    }
}
