//! What every scenario does around its own steps: resolve the nodes and
//! push bases, raise the open-file limit, watch the server processes, and
//! write the results file with its elapsed time and one-line summary.

use crate::net::{self, FileLimit};
use crate::proto::Target;
use crate::results::{Common, RunResult, Servers};
use crate::stats::{self, Tally};
use anyhow::Result;
use std::time::{Duration, Instant};

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
