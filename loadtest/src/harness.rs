//! What every scenario does around its own steps: resolve the nodes and
//! push bases, raise the open-file limit, watch the server processes, bring
//! up the user-agent fleet, sample rates while the measured phase runs, and
//! write the results file with its elapsed time and one-line summary.
//! Scenario logic (what is sent, what is counted) stays in the scenarios.

use crate::crypto::{Pool, Vapid};
use crate::fleet::{self, FleetSpec, Setup};
use crate::net::{self, FileLimit};
use crate::proto::Target;
use crate::results::{Common, RunResult, Servers};
use crate::stats::{self, Hist, LatencySummary, RatePoint, RateSampler, Tally};
use anyhow::{bail, Result};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use uuid::Uuid;

pub struct Run<'a> {
    pub common: &'a Common,
    pub targets: Vec<Target>,
    pub push_bases: Vec<String>,
    pub nofile: FileLimit,
    pub server: Servers,
    pub limit: Duration,
    pub result: RunResult,
    started: Instant,
}

impl<'a> Run<'a> {
    /// Refuses bad URLs before anyone connects, then starts the clock.
    pub async fn start(
        scenario: &str,
        common: &'a Common,
        params: serde_json::Value,
    ) -> Result<Run<'a>> {
        let (targets, push_bases) = common.targets_and_push_bases().await?;
        let nofile = net::raise_nofile_limit();
        Ok(Run {
            common,
            targets,
            push_bases,
            nofile,
            server: common.servers(),
            limit: common.limit(),
            result: RunResult::new(scenario, common, params),
            started: Instant::now(),
        })
    }

    /// For scenarios that only connect user agents: the push bases are
    /// neither needed nor checked.
    pub async fn start_without_senders(
        scenario: &str,
        common: &'a Common,
        params: serde_json::Value,
    ) -> Result<Run<'a>> {
        let targets = Target::all(&common.urls).await?;
        let nofile = net::raise_nofile_limit();
        Ok(Run {
            common,
            targets,
            push_bases: Vec::new(),
            nofile,
            server: common.servers(),
            limit: common.limit(),
            result: RunResult::new(scenario, common, params),
            started: Instant::now(),
        })
    }

    /// For scenarios that speak only HTTP to the server (bridge): no
    /// websocket nodes, no push bases.
    pub fn start_http(scenario: &str, common: &'a Common, params: serde_json::Value) -> Run<'a> {
        Run {
            common,
            targets: Vec::new(),
            push_bases: Vec::new(),
            nofile: net::raise_nofile_limit(),
            server: common.servers(),
            limit: common.limit(),
            result: RunResult::new(scenario, common, params),
            started: Instant::now(),
        }
    }

    /// Refuses to start when `needed` descriptors would not fit under this
    /// process's open-file limit; `who` names what needs them.
    pub fn need_files(&self, needed: usize, who: &str) -> Result<()> {
        if needed as u64 > self.nofile.soft {
            bail!(
                "{who} need more than this process's {} open files",
                self.nofile.soft
            );
        }
        Ok(())
    }

    /// Refuses to start when a --server-pid cannot be read: every server
    /// figure of the run would silently be missing.
    pub fn require_readable_servers(&self) -> Result<()> {
        if let Some(pid) = self.server.unreadable() {
            bail!("cannot read /proc/{pid}/status: is --server-pid right?");
        }
        Ok(())
    }

    /// Brings up `uas` user agents with --channels channels each (user agent
    /// u registers `ids[u*channels..]`, channel c with `keys[c % len]`),
    /// --concurrency at a time, spread over the nodes.
    pub async fn bring_up(&self, uas: usize, ids: Arc<Vec<Uuid>>, keys: Arc<Vec<String>>) -> Setup {
        let spec = FleetSpec::new(
            uas,
            self.common.channels,
            self.common.concurrency,
            self.limit,
        );
        fleet::bring_up_fleet(&self.targets, &spec, ids, keys).await
    }

    /// Records a latency histogram under `name`.
    pub fn latency(&mut self, name: &str, hist: &Hist) {
        self.result
            .latency
            .insert(name.into(), LatencySummary::from_hist(&hist.merged()));
    }

    /// Adds each tally's failures to the results' errors.
    pub fn errors_from(&mut self, tallies: &[&Tally]) {
        for t in tallies {
            stats::merge_tally(&mut self.result.errors, &t.snapshot());
        }
    }

    /// Adds the named counts that are not zero to the results' errors.
    pub fn error_counts(&mut self, counts: &[(&str, u64)]) {
        for (name, n) in counts {
            if *n > 0 {
                self.result.errors.insert(name.to_string(), *n);
            }
        }
    }

    /// Total of the errors recorded so far.
    pub fn total_errors(&self) -> u64 {
        self.result.errors.values().sum()
    }

    /// Stamps the elapsed time and summary, writes the results file.
    pub fn finish(mut self, summary: String) -> Result<()> {
        self.result.elapsed_s = (self.started.elapsed().as_secs_f64() * 100.0).round() / 100.0;
        self.result.summary = summary;
        self.result.finish(self.common.out.as_deref())?;
        Ok(())
    }
}

/// `n` fresh channel ids.
pub fn channel_ids(n: usize) -> Arc<Vec<Uuid>> {
    Arc::new((0..n).map(|_| crate::proto::new_channel_id()).collect())
}

/// One VAPID key per sender, and their public keys for registering.
pub fn vapids(n: usize) -> Result<(Vec<Vapid>, Arc<Vec<String>>)> {
    let vapids: Vec<Vapid> = (0..n).map(|_| Vapid::generate()).collect::<Result<_>>()?;
    let keys = Arc::new(vapids.iter().map(|v| v.public_b64.clone()).collect());
    Ok((vapids, keys))
}

/// Encrypts the payload pool off the runtime: it takes seconds for large
/// fleets and would stall every connection meanwhile.
pub async fn payload_pool(
    channels: usize,
    per: usize,
    payload: usize,
    verify: bool,
) -> Result<Pool> {
    tokio::task::spawn_blocking(move || Pool::build(channels, per, payload, verify)).await?
}

/// Rates over time: samples `counts` every `every` in its own task, from
/// now until `stop`, and once more at the stop so the last interval counts.
pub struct RateWatch {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Vec<RatePoint>>,
}

impl RateWatch {
    pub fn spawn<F>(names: &[&'static str], every: Duration, counts: F) -> RateWatch
    where
        F: Fn() -> Vec<u64> + Send + 'static,
    {
        let (stop, mut stopped) = watch::channel(false);
        let mut s = RateSampler::new(names, &counts());
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = tick.tick() => s.sample(&counts()),
                    _ = stopped.changed() => break,
                }
            }
            s.sample(&counts());
            s.points
        });
        RateWatch { stop, task }
    }

    /// Stops sampling; the points so far.
    pub async fn stop(self) -> Vec<RatePoint> {
        let _ = self.stop.send(true);
        self.task.await.unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

    #[tokio::test]
    async fn rate_watch_counts_from_its_start_and_samples_at_the_stop() {
        let n = Arc::new(AtomicU64::new(5));
        let counter = n.clone();
        // An hour between ticks: only the stop takes a sample.
        let watch = RateWatch::spawn(&["x"], Duration::from_secs(3600), move || {
            vec![counter.load(Relaxed)]
        });
        n.store(105, Relaxed);
        tokio::time::sleep(Duration::from_millis(20)).await;
        let points = watch.stop().await;
        assert_eq!(points.len(), 1, "{points:?}");
        let p = &points[0];
        assert!(p.t_s >= 0.019, "{p:?}");
        // The 5 counted before the watch started are not a rate.
        let counted = p.rates["x"] * p.t_s;
        assert!((counted - 100.0).abs() < 1e-6, "{counted}");
    }
}
