//! `report`: result files in, one self-contained HTML page out (inline SVG
//! plots, no scripts, no external assets), runs of the same scenario side by
//! side.

use crate::results::{read_result, RunResult, ServerStat};
use crate::stats::{self, LatencySummary};
use anyhow::{bail, Context, Result};
use plotters::coord::ranged1d::{AsRangedCoord, Ranged, ValueFormatter};
use plotters::prelude::*;
use serde_json::Value;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

#[derive(clap::Args, Clone, Debug)]
pub struct ReportArgs {
    /// Result files; each run is labelled with the `target` it recorded.
    pub files: Vec<PathBuf>,
    /// A result file with an explicit label, NAME=FILE (repeatable), e.g.
    /// --label herald=a.json --label autopush=b.json.
    #[arg(long = "label", value_name = "NAME=FILE")]
    pub labels: Vec<String>,
    /// Where to write the HTML page.
    #[arg(long, default_value = "report.html")]
    pub out: PathBuf,
}

#[derive(clap::Args, Clone, Debug)]
pub struct CompareArgs {
    /// Result files; each run is counted under the `target` it recorded.
    pub files: Vec<PathBuf>,
    /// A result file with an explicit target name, NAME=FILE (repeatable).
    #[arg(long = "label", value_name = "NAME=FILE")]
    pub labels: Vec<String>,
    /// Also write the table (Markdown) to this file.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

pub struct Run {
    pub label: String,
    pub file: String,
    pub r: RunResult,
    /// The label as given, before `disambiguate` appended a file name:
    /// what the side-by-side table groups by (empty: the label).
    pub group: String,
}

impl Run {
    fn group(&self) -> &str {
        if self.group.is_empty() {
            &self.label
        } else {
            &self.group
        }
    }
}

/// Reads the result files (those given with a label first); unreadable
/// ones are skipped with a warning rather than losing the lot.
fn load_runs(files: &[PathBuf], labels: &[String]) -> Result<Vec<Run>> {
    let mut inputs: Vec<(Option<String>, PathBuf)> = Vec::new();
    for l in labels {
        let Some((name, file)) = l.split_once('=') else {
            bail!("--label expects NAME=FILE, got {l:?}");
        };
        inputs.push((Some(name.to_string()), PathBuf::from(file)));
    }
    inputs.extend(files.iter().map(|f| (None, f.clone())));
    if inputs.is_empty() {
        bail!("no result files given");
    }
    let mut runs = Vec::new();
    for (label, path) in inputs {
        match read_result(&path) {
            Ok(r) => {
                let label = label.unwrap_or_else(|| r.target.clone());
                runs.push(Run {
                    group: label.clone(),
                    label,
                    file: path.display().to_string(),
                    r,
                })
            }
            Err(e) => eprintln!("report: skipping {}: {e:#}", path.display()),
        }
    }
    if runs.is_empty() {
        bail!("none of the given files is a herald-loadtest result");
    }
    Ok(runs)
}

pub fn run(args: ReportArgs) -> Result<()> {
    let mut runs = load_runs(&args.files, &args.labels)?;
    disambiguate(&mut runs);
    let html = render(&runs);
    if let Some(dir) = args.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(&args.out, html).with_context(|| format!("writing {}", args.out.display()))?;
    println!("report: {} run(s) -> {}", runs.len(), args.out.display());
    Ok(())
}

/// Two runs of one scenario under the same label get their file names
/// appended, so every column and legend entry is distinct.
fn disambiguate(runs: &mut [Run]) {
    let clashes: Vec<bool> = (0..runs.len())
        .map(|i| {
            runs.iter().enumerate().any(|(j, o)| {
                j != i && o.label == runs[i].label && o.r.scenario == runs[i].r.scenario
            })
        })
        .collect();
    for (i, clash) in clashes.into_iter().enumerate() {
        if clash {
            let stem = Path::new(&runs[i].file)
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            runs[i].label = format!("{} ({stem})", runs[i].label);
        }
    }
}

/// `compare`: the side-by-side table on stdout (and in --out).
pub fn compare(args: CompareArgs) -> Result<()> {
    let runs = load_runs(&args.files, &args.labels)?;
    let rows = side_by_side(&runs);
    if rows.is_empty() {
        bail!("no throughput, idle, storm or bridge result among the files given");
    }
    let md = markdown(&rows);
    print!("{md}");
    if let Some(out) = &args.out {
        if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        std::fs::write(out, &md).with_context(|| format!("writing {}", out.display()))?;
    }
    Ok(())
}

/// One target (system under test) in the side-by-side table: the median of
/// each figure over its runs of the scenario the figure comes from.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SideRow {
    pub target: String,
    pub throughput_runs: usize,
    pub delivered_per_s: Option<f64>,
    pub server_us_per_message: Option<f64>,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub idle_runs: usize,
    pub idle_held: Option<f64>,
    pub idle_kib_per_connection: Option<f64>,
    /// Websocket connect to `register` answered, for the idle climb: where
    /// a full accept queue shows as one-second SYN retries.
    pub idle_setup_p99_ms: Option<f64>,
    pub storm_runs: usize,
    /// The storm's bring-up, the same measure as idle's setup.
    pub storm_setup_p99_ms: Option<f64>,
    /// Connect to `hello` answered for the user agents coming back.
    pub storm_hello_p99_ms: Option<f64>,
    /// Reconnects that failed, out of those tried, summed over the runs: the
    /// p99 above counts only those that succeeded, so a server that stops
    /// answering would otherwise look fast, and a median would hide a run
    /// in which it stopped.
    pub storm_failed: Option<f64>,
    pub storm_attempts: Option<f64>,
    /// What the server's handshakes selected, over all its runs.
    pub subprotocol: String,
    pub bridge_runs: usize,
    /// Bridged pushes arriving at the FCM sink per second.
    pub bridge_forwarded_per_s: Option<f64>,
    pub bridge_us_per_message: Option<f64>,
}

fn median_of(v: impl Iterator<Item = Option<f64>>) -> Option<f64> {
    stats::median(v.flatten())
}

/// None when no run has the figure.
fn sum_of(v: impl Iterator<Item = Option<f64>>) -> Option<f64> {
    v.flatten()
        .fold(None, |sum, x| Some(sum.unwrap_or(0.0) + x))
}

/// Throughput, idle, storm and bridge figures per target, in the order
/// targets first appear; targets with none of these scenarios are left out.
pub fn side_by_side(runs: &[Run]) -> Vec<SideRow> {
    let mut targets: Vec<&str> = Vec::new();
    for r in runs {
        if !targets.contains(&r.group()) {
            targets.push(r.group());
        }
    }
    let num = |r: &Run, k: &str| r.r.metrics.get(k).and_then(Value::as_f64);
    let mut out = Vec::new();
    for t in targets {
        let mine: Vec<&Run> = runs.iter().filter(|r| r.group() == t).collect();
        let of = |scenario: &str| -> Vec<&Run> {
            mine.iter()
                .copied()
                .filter(|r| r.r.scenario == scenario)
                .collect()
        };
        let (tp, idle, bridge, storm) = (of("throughput"), of("idle"), of("bridge"), of("storm"));
        if tp.is_empty() && idle.is_empty() && bridge.is_empty() && storm.is_empty() {
            continue;
        }
        let lat_of = |r: &Run, name: &str, f: fn(&LatencySummary) -> f64| {
            r.r.latency.get(name).filter(|l| l.count > 0).map(f)
        };
        let lat = |r: &Run, f: fn(&LatencySummary) -> f64| lat_of(r, "end_to_end", f);
        let p99 = |l: &LatencySummary| l.p99_ms;
        let mut counts = std::collections::BTreeMap::new();
        for r in tp.iter().chain(&idle).chain(&storm) {
            crate::stats::merge_tally(&mut counts, &r.r.subprotocols);
        }
        out.push(SideRow {
            target: t.to_string(),
            throughput_runs: tp.len(),
            delivered_per_s: median_of(tp.iter().map(|r| num(r, "delivered_per_s"))),
            server_us_per_message: median_of(
                tp.iter().map(|r| num(r, "server_cpu_us_per_delivered")),
            ),
            p50_ms: median_of(tp.iter().map(|r| lat(r, |l| l.p50_ms))),
            p99_ms: median_of(tp.iter().map(|r| lat(r, |l| l.p99_ms))),
            idle_runs: idle.len(),
            idle_held: median_of(idle.iter().map(|r| num(r, "open_at_end"))),
            idle_kib_per_connection: median_of(
                idle.iter().map(|r| num(r, "server_kib_per_connection")),
            ),
            idle_setup_p99_ms: median_of(idle.iter().map(|r| lat_of(r, "setup", p99))),
            storm_runs: storm.len(),
            storm_setup_p99_ms: median_of(storm.iter().map(|r| lat_of(r, "setup", p99))),
            storm_hello_p99_ms: median_of(storm.iter().map(|r| lat_of(r, "reconnect_hello", p99))),
            storm_failed: sum_of(storm.iter().map(|r| num(r, "failed"))),
            storm_attempts: sum_of(storm.iter().map(|r| num(r, "reconnect_attempts"))),
            subprotocol: crate::results::describe_subprotocols(&counts),
            bridge_runs: bridge.len(),
            bridge_forwarded_per_s: median_of(bridge.iter().map(|r| num(r, "forwarded_per_s"))),
            bridge_us_per_message: median_of(
                bridge.iter().map(|r| num(r, "server_cpu_us_per_forwarded")),
            ),
        });
    }
    out
}

const SIDE_HEADERS: [&str; 13] = [
    "target",
    "messages/s delivered",
    "server µs per delivered message",
    "latency p50 ms",
    "latency p99 ms",
    "idle: connections held",
    "idle: server KiB per connection",
    "idle: setup p99 ms",
    "storm: bring-up setup p99 ms",
    "storm: reconnect hello p99 ms",
    "websocket subprotocol",
    "bridge: pushes/s at the FCM sink",
    "bridge: server µs per bridged message",
];

fn side_cells(r: &SideRow) -> [String; 13] {
    let f = |v: Option<f64>, d: usize| v.map_or("–".to_string(), |v| format!("{v:.d$}"));
    let runs = |n: usize| {
        if n > 1 {
            format!(" ({n} runs)")
        } else {
            String::new()
        }
    };
    [
        r.target.clone(),
        format!("{}{}", f(r.delivered_per_s, 0), runs(r.throughput_runs)),
        f(r.server_us_per_message, 1),
        f(r.p50_ms, 2),
        f(r.p99_ms, 2),
        format!("{}{}", f(r.idle_held, 0), runs(r.idle_runs)),
        f(r.idle_kib_per_connection, 1),
        f(r.idle_setup_p99_ms, 1),
        f(r.storm_setup_p99_ms, 1),
        storm_hello_cell(r),
        if r.subprotocol.is_empty() {
            "–".into()
        } else {
            r.subprotocol.clone()
        },
        format!("{}{}", f(r.bridge_forwarded_per_s, 0), runs(r.bridge_runs)),
        f(r.bridge_us_per_message, 1),
    ]
}

/// The storm's reconnect p99 with the failures beside it, when there were
/// any, and the number of runs.
fn storm_hello_cell(r: &SideRow) -> String {
    let p99 = r
        .storm_hello_p99_ms
        .map_or("–".into(), |v| format!("{v:.1}"));
    let mut notes = Vec::new();
    if let Some(failed) = r.storm_failed.filter(|&n| n > 0.0) {
        let of = r
            .storm_attempts
            .map_or(String::new(), |n| format!(" of {n:.0}"));
        notes.push(format!("{failed:.0}{of} failed"));
    }
    if r.storm_runs > 1 {
        notes.push(format!("{} runs", r.storm_runs));
    }
    if notes.is_empty() {
        p99
    } else {
        format!("{p99} ({})", notes.join("; "))
    }
}

/// The side-by-side table in Markdown.
pub fn markdown(rows: &[SideRow]) -> String {
    let mut t = format!("| {} |\n", SIDE_HEADERS.join(" | "));
    t += &format!("|{}\n", "---|".repeat(SIDE_HEADERS.len()));
    for r in rows {
        t += &format!("| {} |\n", side_cells(r).join(" | "));
    }
    t
}

fn side_by_side_html(rows: &[SideRow]) -> String {
    let mut t = String::from("<h2>Side by side</h2>\n<p>Median of each figure over each target's throughput, idle, storm and bridge runs, failed reconnects summed (latency is throughput's end to end; setup is websocket connect to register answered, hello is a returning user agent's connect to hello answered).</p>\n<table><tr>");
    for h in SIDE_HEADERS {
        let _ = write!(t, "<th>{}</th>", esc(h));
    }
    t.push_str("</tr>\n");
    for r in rows {
        t.push_str("<tr>");
        for c in side_cells(r) {
            let _ = write!(t, "<td>{}</td>", esc(&c));
        }
        t.push_str("</tr>\n");
    }
    t.push_str("</table>\n");
    t
}

/// A run's per-step rows (fanout: one per change) as a table.
fn rows_table(run: &Run) -> String {
    let mut keys: Vec<&String> = Vec::new();
    for row in &run.r.rows {
        for k in row.keys() {
            if !keys.contains(&k) {
                keys.push(k);
            }
        }
    }
    let mut t = format!("<h3>{}: per step</h3>\n<table><tr>", esc(&run.label));
    for k in &keys {
        let _ = write!(t, "<th>{}</th>", esc(k));
    }
    t.push_str("</tr>\n");
    for row in &run.r.rows {
        t.push_str("<tr>");
        for k in &keys {
            let _ = write!(
                t,
                "<td>{}</td>",
                row.get(*k).map(fmt_value).unwrap_or_default()
            );
        }
        t.push_str("</tr>\n");
    }
    t.push_str("</table>\n");
    t
}

/// Each scenario's name, what it measures, and its main latency ("": all
/// of its latencies, one plot each).
const SCENARIOS: [(&str, &str, &str); 8] = [
    (
        "idle",
        "User agents opened (hello + register) and held; server memory per connection and what stopped the climb.",
        "setup",
    ),
    (
        "throughput",
        "Connected user agents, concurrent senders posting VAPID-signed aes128gcm messages; latency is request sent to notification received.",
        "end_to_end",
    ),
    (
        "backlog",
        "Messages stored for offline user agents, drained on reconnect with the same uaid and channelIDs.",
        "reconnect_hello",
    ),
    (
        "storm",
        "User agents dropped and reconnected within a window; latency is connect start to hello reply.",
        "reconnect_hello",
    ),
    (
        "burst",
        "Many messages in flight per channel, each acked with its own frame as Firefox does: a live burst, then a stored backlog drained on reconnect; cut_off counts user agents the server closed.",
        "end_to_end",
    ),
    (
        "fanout",
        "Idle user agents following a broadcast (and some following nothing); its version changed through the broadcast API; latency is the PUT's answer to each follower's broadcast frame; server RSS sampled through each fan-out.",
        "fanout_arrival",
    ),
    (
        "bridge",
        "Mobile devices registered through the registration API; each push forwarded by Herald's FCM bridge to the load generator's FCM sink; latency is request sent to arrival at the sink; server CPU per bridged message.",
        "end_to_end",
    ),
    (
        "abuse",
        "Well-behaved senders at a steady rate to their own subscriptions, without a flood and then while one flooder pushes as fast as it can (to one subscription, to many, optionally without VAPID); latency is request sent to notification received, per phase; the rows say what the flooder got.",
        "",
    ),
];

pub fn render(runs: &[Run]) -> String {
    let mut h = String::new();
    h.push_str("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n<title>herald-loadtest report</title>\n<style>\n");
    h.push_str(
        "body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}\
         table{border-collapse:collapse;margin:1em 0;font-size:14px}\
         td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}\
         th:first-child,td:first-child{text-align:left}\
         th{background:#f2f2f2}\
         .plots{display:flex;flex-wrap:wrap;gap:12px}\
         .plots svg{border:1px solid #ddd}\
         .note{color:#555}\
         code{font-size:13px}\n",
    );
    h.push_str("</style></head><body>\n<h1>herald-loadtest report</h1>\n");
    h.push_str(&runs_table(runs));
    let side = side_by_side(runs);
    if !side.is_empty() {
        h.push_str(&side_by_side_html(&side));
    }
    let mut names: Vec<&str> = SCENARIOS.iter().map(|s| s.0).collect();
    for run in runs {
        if !names.contains(&run.r.scenario.as_str()) {
            names.push(&run.r.scenario);
        }
    }
    for name in names {
        let group: Vec<&Run> = runs.iter().filter(|r| r.r.scenario == name).collect();
        if !group.is_empty() {
            h.push_str(&scenario_section(name, &group));
        }
    }
    h.push_str("</body></html>\n");
    h
}

/// One row per run: label, scenario, file, summary, nodes, subprotocol.
fn runs_table(runs: &[Run]) -> String {
    let mut h = String::from("<h2>Runs</h2>\n<table><tr><th>label</th><th>scenario</th><th>file</th><th>summary</th><th>nodes</th><th>subprotocol</th></tr>\n");
    for run in runs {
        let nodes = if run.r.urls.is_empty() {
            run.r.url.clone()
        } else {
            run.r.urls.join(" ")
        };
        let posts = if run.r.push_urls.is_empty() {
            String::new()
        } else {
            format!("; POSTs to {}", run.r.push_urls.join(" "))
        };
        let _ = writeln!(
            h,
            "<tr><td>{}</td><td>{}</td><td><code>{}</code></td><td style=\"text-align:left\">{}</td><td style=\"text-align:left\"><code>{}</code>{}</td><td>{}</td></tr>",
            esc(&run.label),
            esc(&run.r.scenario),
            esc(&run.file),
            esc(&run.r.summary),
            esc(&nodes),
            esc(&posts),
            esc(&run.r.subprotocol)
        );
    }
    h.push_str("</table>\n");
    h
}

/// One scenario's runs: what it measures, their table, per-step rows,
/// notes and plots.
fn scenario_section(name: &str, group: &[&Run]) -> String {
    let mut h = String::new();
    let (about, main_latency) = SCENARIOS
        .iter()
        .find(|s| s.0 == name)
        .map(|s| (s.1, Some(s.2).filter(|l| !l.is_empty())))
        .unwrap_or(("", None));
    let _ = writeln!(h, "<h2>{}</h2>\n<p>{}</p>", esc(name), esc(about));
    h.push_str(&table(group));
    for run in group.iter().filter(|r| !r.r.rows.is_empty()) {
        h.push_str(&rows_table(run));
    }
    for run in group {
        for n in &run.r.notes {
            let _ = writeln!(h, "<p class=\"note\">{}: {}</p>", esc(&run.label), esc(n));
        }
    }
    h.push_str("<div class=\"plots\">\n");
    latency_plots(&mut h, group, main_latency);
    rate_plot(&mut h, group);
    memory_plot(&mut h, group);
    h.push_str("</div>\n");
    h
}

/// The scenario's main latency CDF, or every latency when it has none.
fn latency_plots(h: &mut String, group: &[&Run], main_latency: Option<&str>) {
    let latency_names: Vec<String> = match main_latency {
        Some(l) => vec![l.to_string()],
        None => {
            let mut all: Vec<String> = group
                .iter()
                .flat_map(|r| r.r.latency.keys().cloned())
                .collect();
            all.sort();
            all.dedup();
            all
        }
    };
    for lname in latency_names {
        let series: Vec<(String, Vec<(f64, f64)>)> = group
            .iter()
            .filter_map(|r| {
                r.r.latency
                    .get(&lname)
                    .map(|l| (r.label.clone(), cdf_points(l)))
            })
            .filter(|(_, p)| !p.is_empty())
            .collect();
        if !series.is_empty() {
            h.push_str(&svg_or_note(cdf_chart(
                &format!("{lname} latency CDF"),
                &series,
            )));
        }
    }
}

/// Every rate of every run over time.
fn rate_plot(h: &mut String, group: &[&Run]) {
    let rate_series: Vec<(String, Vec<(f64, f64)>)> = group
        .iter()
        .flat_map(|r| {
            let mut names: Vec<&String> = r.r.rates.iter().flat_map(|p| p.rates.keys()).collect();
            names.sort();
            names.dedup();
            names
                .into_iter()
                .map(|n| {
                    let pts =
                        r.r.rates
                            .iter()
                            .filter_map(|p| p.rates.get(n).map(|v| (p.t_s, *v)))
                            .collect();
                    (format!("{} {n}", r.label), pts)
                })
                .collect::<Vec<_>>()
        })
        .filter(|(_, p): &(String, Vec<(f64, f64)>)| !p.is_empty())
        .collect();
    if !rate_series.is_empty() {
        h.push_str(&svg_or_note(linear_chart(
            "throughput over time",
            "seconds",
            "per second",
            &rate_series,
            SeriesLabelPosition::UpperRight,
        )));
    }
}

/// Server memory against open connections, for the runs that sampled it.
fn memory_plot(h: &mut String, group: &[&Run]) {
    let mem_series: Vec<(String, Vec<(f64, f64)>)> = group
        .iter()
        .filter(|r| !r.r.memory.is_empty())
        .map(|r| {
            (
                r.label.clone(),
                r.r.memory
                    .iter()
                    .map(|m| (m.connections as f64, m.rss_kib as f64 / 1024.0))
                    .collect(),
            )
        })
        .collect();
    if !mem_series.is_empty() {
        h.push_str(&svg_or_note(linear_chart(
            "server memory against connections",
            "open connections",
            "server RSS (MiB)",
            &mem_series,
            // Memory grows towards the upper right.
            SeriesLabelPosition::UpperLeft,
        )));
    }
}

/// Metrics, errors and latency percentiles, one column per run.
fn table(group: &[&Run]) -> String {
    let mut t = String::from("<table><tr><th></th>");
    for r in group {
        let _ = write!(t, "<th>{}</th>", esc(&r.label));
    }
    t.push_str("</tr>\n");
    let mut keys: Vec<&String> = Vec::new();
    for r in group {
        for k in r.r.metrics.keys() {
            if !keys.contains(&k) {
                keys.push(k);
            }
        }
    }
    for k in keys {
        let _ = write!(t, "<tr><td>{}</td>", esc(k));
        for r in group {
            let _ = write!(
                t,
                "<td>{}</td>",
                r.r.metrics.get(k).map(fmt_value).unwrap_or_default()
            );
        }
        t.push_str("</tr>\n");
    }
    // Several server processes (nodes, their store): each one's share of
    // the server_* sums above.
    let most = group.iter().map(|r| r.r.servers.len()).max().unwrap_or(0);
    if most > 1 {
        for i in 0..most {
            for what in ["", " cpu_s", " rss_after_kib"] {
                let cell = |s: &ServerStat| match what {
                    "" => match &s.name {
                        Some(n) => format!("{n} (pid {})", s.pid),
                        None => format!("pid {}", s.pid),
                    },
                    " cpu_s" => s.cpu_s.map(|c| format!("{c:.2}")).unwrap_or_default(),
                    _ => s.rss_after_kib.map(|k| k.to_string()).unwrap_or_default(),
                };
                let _ = write!(t, "<tr><td>server {}{what}</td>", i + 1);
                for r in group {
                    let v = r.r.servers.get(i).map(cell).unwrap_or_default();
                    let _ = write!(t, "<td>{}</td>", esc(&v));
                }
                t.push_str("</tr>\n");
            }
        }
    }
    let mut lat_names: Vec<&String> = group.iter().flat_map(|r| r.r.latency.keys()).collect();
    lat_names.sort();
    lat_names.dedup();
    for name in lat_names {
        for (label, get) in [
            (
                "p50",
                (|l: &LatencySummary| l.p50_ms) as fn(&LatencySummary) -> f64,
            ),
            ("p90", |l| l.p90_ms),
            ("p99", |l| l.p99_ms),
            ("p99.9", |l| l.p999_ms),
            ("max", |l| l.max_ms),
        ] {
            let _ = write!(t, "<tr><td>{} {label} (ms)</td>", esc(name));
            for r in group {
                let cell =
                    r.r.latency
                        .get(name)
                        .filter(|l| l.count > 0)
                        .map(|l| format!("{:.2}", get(l)))
                        .unwrap_or_default();
                let _ = write!(t, "<td>{cell}</td>");
            }
            t.push_str("</tr>\n");
        }
    }
    let mut err_names: Vec<&String> = group.iter().flat_map(|r| r.r.errors.keys()).collect();
    err_names.sort();
    err_names.dedup();
    for e in err_names {
        let _ = write!(t, "<tr><td>error: {}</td>", esc(e));
        for r in group {
            let _ = write!(
                t,
                "<td>{}</td>",
                r.r.errors.get(e).map(|n| n.to_string()).unwrap_or_default()
            );
        }
        t.push_str("</tr>\n");
    }
    t.push_str("</table>\n");
    t
}

fn fmt_value(v: &Value) -> String {
    match v {
        Value::Number(n) => match (n.as_u64(), n.as_i64(), n.as_f64()) {
            (Some(u), _, _) => u.to_string(),
            (_, Some(i), _) => i.to_string(),
            (_, _, Some(f)) => format!("{f:.2}"),
            _ => n.to_string(),
        },
        Value::String(s) => esc(s),
        other => esc(&other.to_string()),
    }
}

fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

/// A label safe to hand to the SVG backend (which writes text verbatim):
/// markup characters are dropped rather than escaped twice.
fn svg_text(s: &str) -> String {
    s.chars()
        .filter(|c| !matches!(c, '<' | '>' | '&' | '"' | '\''))
        .take(60)
        .collect()
}

fn svg_or_note(r: Result<String, String>) -> String {
    match r {
        Ok(svg) => svg,
        Err(e) => format!("<p class=\"note\">plot failed: {}</p>", esc(&e)),
    }
}

/// CDF points with latency > 0 (a log axis cannot show 0), in percent.
fn cdf_points(l: &LatencySummary) -> Vec<(f64, f64)> {
    l.cdf
        .iter()
        .filter(|(x, y)| x.is_finite() && y.is_finite() && *x > 0.0)
        .map(|&(x, y)| (x, y * 100.0))
        .collect()
}

/// Axis numbers without spurious decimals ("20000", not "20000.0").
fn axis_num(v: f64) -> String {
    let a = v.abs();
    if a >= 100.0 || a == 0.0 {
        format!("{v:.0}")
    } else if a >= 1.0 {
        format!("{v:.1}").trim_end_matches(".0").to_string()
    } else {
        format!("{v:.3}").trim_end_matches('0').to_string()
    }
}

const COLORS: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(23, 190, 207),
];

const SIZE: (u32, u32) = (540, 360);

fn bounds(series: &[(String, Vec<(f64, f64)>)]) -> Option<(f64, f64, f64, f64)> {
    let pts = series
        .iter()
        .flat_map(|s| s.1.iter())
        .filter(|(x, y)| x.is_finite() && y.is_finite());
    let mut b: Option<(f64, f64, f64, f64)> = None;
    for &(x, y) in pts {
        b = Some(match b {
            None => (x, x, y, y),
            Some((x0, x1, y0, y1)) => (x0.min(x), x1.max(x), y0.min(y), y1.max(y)),
        });
    }
    b
}

fn cdf_chart(title: &str, series: &[(String, Vec<(f64, f64)>)]) -> Result<String, String> {
    let (x0, x1, _, _) = bounds(series).ok_or("no data")?;
    let lo = (x0 / 1.5).max(1e-3);
    let hi = (x1 * 1.5).max(lo * 10.0);
    chart(
        title,
        "latency (ms, log scale)",
        "% at or below",
        series,
        (lo..hi).log_scale(),
        0.0..100.0,
        // A CDF leaves its lower right empty.
        SeriesLabelPosition::LowerRight,
    )
}

fn linear_chart(
    title: &str,
    xl: &str,
    yl: &str,
    series: &[(String, Vec<(f64, f64)>)],
    legend: SeriesLabelPosition,
) -> Result<String, String> {
    let (x0, x1, _, y1) = bounds(series).ok_or("no data")?;
    let x0 = x0.min(0.0);
    let x1 = if x1 > x0 { x1 } else { x0 + 1.0 };
    // Headroom above the data so the legend does not cover it.
    let y1 = if y1 > 0.0 {
        y1 * (1.15 + 0.08 * series.len() as f64)
    } else {
        1.0
    };
    chart(title, xl, yl, series, x0..x1, 0.0..y1, legend)
}

fn chart<X>(
    title: &str,
    xl: &str,
    yl: &str,
    series: &[(String, Vec<(f64, f64)>)],
    x: X,
    y: std::ops::Range<f64>,
    legend: SeriesLabelPosition,
) -> Result<String, String>
where
    X: AsRangedCoord<Value = f64>,
    X::CoordDescType: Ranged<ValueType = f64> + ValueFormatter<f64>,
{
    let mut buf = String::new();
    {
        let root = SVGBackend::with_string(&mut buf, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let mut ch = ChartBuilder::on(&root)
            .caption(svg_text(title), ("sans-serif", 16))
            .margin(10)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(x, y)
            .map_err(|e| e.to_string())?;
        ch.configure_mesh()
            .x_label_formatter(&|v| axis_num(*v))
            .y_label_formatter(&|v| axis_num(*v))
            .x_desc(svg_text(xl))
            .y_desc(svg_text(yl))
            .label_style(("sans-serif", 12))
            .draw()
            .map_err(|e| e.to_string())?;
        for (i, (name, pts)) in series.iter().enumerate() {
            let color = COLORS[i % COLORS.len()];
            ch.draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))
                .map_err(|e| e.to_string())?
                .label(svg_text(name))
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2))
                });
            if pts.len() == 1 {
                ch.draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled())))
                    .map_err(|e| e.to_string())?;
            }
        }
        ch.configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.3))
            .position(legend)
            .label_font(("sans-serif", 12))
            .draw()
            .map_err(|e| e.to_string())?;
        root.present().map_err(|e| e.to_string())?;
    }
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::results::MemoryPoint;
    use crate::stats::{Hist, RatePoint};

    fn sample(scenario: &str, target: &str, scale: u64) -> RunResult {
        let hist = Hist::new();
        for i in 1..=500u64 {
            hist.record(0, i * 37 * scale);
        }
        let mut r = RunResult {
            tool: "herald-loadtest".into(),
            scenario: scenario.into(),
            target: target.into(),
            summary: format!("{scenario} <b>summary</b>"),
            ..Default::default()
        };
        r.metrics
            .insert("accepted_per_s".into(), serde_json::json!(1234.567));
        r.metrics.insert(
            "stopped_by".into(),
            serde_json::json!("the server's <limit>"),
        );
        r.errors.insert("status 503".into(), 3);
        r.latency.insert(
            "end_to_end".into(),
            LatencySummary::from_hist(&hist.merged()),
        );
        r.latency
            .insert("setup".into(), LatencySummary::from_hist(&hist.merged()));
        r.rates = (1..10)
            .map(|t| RatePoint {
                t_s: t as f64,
                rates: [("accepted".to_string(), 100.0 * t as f64)]
                    .into_iter()
                    .collect(),
            })
            .collect();
        r.memory = (0..5)
            .map(|i| MemoryPoint {
                connections: i * 1000,
                rss_kib: 10_000 + i * 3000,
                t_ms: 0,
            })
            .collect();
        r
    }

    #[test]
    fn renders_side_by_side_with_plots() {
        let runs = vec![
            Run {
                label: "herald".into(),
                file: "a.json".into(),
                r: sample("throughput", "herald", 1),
                group: String::new(),
            },
            Run {
                label: "autopush".into(),
                file: "b.json".into(),
                r: sample("throughput", "autopush", 3),
                group: String::new(),
            },
            Run {
                label: "herald".into(),
                file: "c.json".into(),
                r: sample("idle", "herald", 1),
                group: String::new(),
            },
        ];
        let html = render(&runs);
        assert!(html.starts_with("<!DOCTYPE html>"));
        // Per scenario: latency CDF, rates over time, memory against connections.
        assert_eq!(html.matches("<svg").count(), 6);
        assert!(html.contains("<th>herald</th><th>autopush</th>"));
        assert!(html.contains("1234.57"));
        // Content from result files is escaped, never markup.
        assert!(html.contains("&lt;b&gt;summary&lt;/b&gt;"));
        assert!(html.contains("the server&#39;s &lt;limit&gt;"));
        assert!(!html.contains("<b>summary"));
        assert!(!html.contains("<script"));
    }

    #[test]
    fn empty_and_degenerate_runs_do_not_break_rendering() {
        let mut r = RunResult {
            tool: "herald-loadtest".into(),
            scenario: "storm".into(),
            ..Default::default()
        };
        r.latency
            .insert("reconnect_hello".into(), LatencySummary::default());
        r.rates = vec![RatePoint {
            t_s: 0.0,
            rates: [("x".to_string(), 0.0)].into_iter().collect(),
        }];
        r.memory = vec![MemoryPoint {
            connections: 0,
            rss_kib: 0,
            t_ms: 0,
        }];
        let html = render(&[Run {
            label: "t".into(),
            file: "f".into(),
            r,
            group: String::new(),
        }]);
        assert!(html.contains("<h2>storm</h2>"));
        let mut odd = sample("custom", "x", 1);
        odd.latency
            .get_mut("end_to_end")
            .unwrap()
            .cdf
            .push((f64::NAN, 0.5));
        let html = render(&[Run {
            label: "x".into(),
            file: "f".into(),
            r: odd,
            group: String::new(),
        }]);
        assert!(html.contains("<h2>custom</h2>") && html.contains("<svg"));
    }

    #[test]
    fn burst_runs_get_their_own_section() {
        let mut r = sample("burst", "herald", 1);
        r.metrics
            .insert("live_cut_off".into(), serde_json::json!(4));
        r.metrics.insert(
            "live_close".into(),
            serde_json::json!("1008 rate limit: more than 50 messages per second"),
        );
        let html = render(&[Run {
            label: "herald".into(),
            file: "burst.json".into(),
            r,
            group: String::new(),
        }]);
        assert!(html.contains("<h2>burst</h2>"));
        assert!(html.contains("acked with its own frame"));
        assert!(html.contains("<td>live_cut_off</td><td>4</td>"));
        assert!(html.contains("<td>1008 rate limit: more than 50 messages per second</td>"));
        assert!(html.contains("end_to_end latency CDF"));
    }

    #[test]
    fn several_nodes_show_their_urls_and_each_server() {
        let mut a = sample("throughput", "cluster", 1);
        a.urls = vec!["ws://127.0.0.1:1/".into(), "ws://127.0.0.1:2/".into()];
        a.push_urls = vec!["http://127.0.0.1:1".into(), "http://127.0.0.1:2".into()];
        a.servers = vec![
            ServerStat {
                pid: 11,
                name: Some("herald".into()),
                cpu_s: Some(1.5),
                rss_before_kib: Some(10),
                rss_after_kib: Some(20),
            },
            ServerStat {
                pid: 12,
                name: None,
                cpu_s: Some(0.25),
                rss_before_kib: None,
                rss_after_kib: Some(30),
            },
        ];
        let mut b = sample("throughput", "one", 2);
        b.url = "ws://127.0.0.1:9/".into();
        let html = render(&[
            Run {
                label: "cluster".into(),
                file: "a.json".into(),
                r: a,
                group: String::new(),
            },
            Run {
                label: "one".into(),
                file: "b.json".into(),
                r: b,
                group: String::new(),
            },
        ]);
        assert!(html.contains("<code>ws://127.0.0.1:1/ ws://127.0.0.1:2/</code>; POSTs to http://127.0.0.1:1 http://127.0.0.1:2"));
        assert!(html.contains("<code>ws://127.0.0.1:9/</code></td>"));
        assert!(html.contains("<td>server 1</td><td>herald (pid 11)</td><td></td>"));
        assert!(html.contains("<td>server 1 cpu_s</td><td>1.50</td><td></td>"));
        assert!(html.contains("<td>server 2 rss_after_kib</td><td>30</td><td></td>"));
        assert!(html.contains("<td>server 2</td><td>pid 12</td>"));
    }

    #[test]
    fn side_by_side_takes_medians_per_target() {
        let tp = |target: &str, rate: f64, us: Option<f64>| {
            let mut r = sample("throughput", target, 1);
            r.metrics
                .insert("delivered_per_s".into(), serde_json::json!(rate));
            if let Some(us) = us {
                r.metrics
                    .insert("server_cpu_us_per_delivered".into(), serde_json::json!(us));
            }
            r.subprotocols = [("push-notification".to_string(), 3)].into();
            r
        };
        let mut idle = sample("idle", "autopush", 1);
        idle.metrics
            .insert("open_at_end".into(), serde_json::json!(19000));
        idle.metrics
            .insert("server_kib_per_connection".into(), serde_json::json!(27.94));
        idle.subprotocols = [("none".to_string(), 19000)].into();
        let run = |label: &str, r: RunResult| Run {
            label: label.into(),
            file: "f.json".into(),
            r,
            group: String::new(),
        };
        let storm = |scale: u64, with_setup: bool| {
            let mut r = sample("storm", "autopush", scale);
            let hello = r.latency.remove("setup").unwrap();
            if with_setup {
                r.latency.insert("setup".into(), hello.clone());
            }
            r.latency.insert("reconnect_hello".into(), hello);
            let failed = if with_setup { 0 } else { 12 };
            r.metrics.insert("failed".into(), serde_json::json!(failed));
            r.metrics
                .insert("reconnect_attempts".into(), serde_json::json!(500));
            r
        };
        let runs = vec![
            run("herald", tp("herald", 100.0, Some(50.0))),
            run("herald", tp("herald", 300.0, Some(70.0))),
            run("herald", tp("herald", 200.0, None)),
            run("autopush", idle),
            run("other", sample("backlog", "other", 1)),
            run("autopush", storm(1, true)),
            run("autopush", storm(3, false)),
            run("herald", {
                let mut b = sample("bridge", "herald", 1);
                b.metrics
                    .insert("forwarded_per_s".into(), serde_json::json!(900.4));
                b.metrics.insert(
                    "server_cpu_us_per_forwarded".into(),
                    serde_json::json!(120.0),
                );
                b
            }),
        ];
        let rows = side_by_side(&runs);
        assert_eq!(
            rows.len(),
            2,
            "targets without throughput, idle, storm or bridge are left out"
        );
        assert_eq!(rows[0].target, "herald");
        assert_eq!(rows[0].throughput_runs, 3);
        assert_eq!(rows[0].delivered_per_s, Some(200.0));
        assert_eq!(rows[0].server_us_per_message, Some(60.0));
        assert_eq!(rows[0].idle_kib_per_connection, None);
        assert_eq!(rows[0].subprotocol, "push-notification");
        assert_eq!(rows[1].target, "autopush");
        assert_eq!(rows[1].delivered_per_s, None);
        assert_eq!(rows[1].idle_held, Some(19000.0));
        assert_eq!(rows[1].subprotocol, "none");
        // sample()'s latencies: 37 µs steps to 18.5 ms, p99 at 18.31 ms
        // (three times that for scale 3, whose bring-up is left out).
        let (p99, hello) = (rows[1].idle_setup_p99_ms, rows[1].storm_hello_p99_ms);
        assert!((p99.unwrap() - 18.31).abs() < 0.05, "{p99:?}");
        assert_eq!(rows[1].storm_runs, 2);
        assert_eq!(rows[1].storm_setup_p99_ms, p99);
        assert_eq!(rows[0].storm_runs, 0);
        assert_eq!(rows[0].idle_setup_p99_ms, None);
        // The two storm runs' reconnect p99s, 18.31 and 3 × 18.31: their median.
        assert!((hello.unwrap() - 2.0 * 18.31).abs() < 0.2, "{hello:?}");
        let md = markdown(&rows);
        let lines: Vec<&str> = md.lines().collect();
        assert_eq!(lines.len(), 4);
        assert!(lines[1].starts_with("|---|"));
        assert!(
            lines[2].starts_with("| herald | 200 (3 runs) | 60.0 | "),
            "{}",
            lines[2]
        );
        assert!(
            lines[2].ends_with(" | – | – | – | – | – | push-notification | 900 | 120.0 |"),
            "{}",
            lines[2]
        );
        assert_eq!(
            lines[3],
            "| autopush | – | – | – | – | 19000 | 27.9 | 18.3 | 18.3 | 36.6 (12 of 1000 failed; 2 runs) | none | – | – |"
        );
        // A server that answered no returning user agent has no p99 to show.
        let dead = SideRow {
            storm_runs: 1,
            storm_failed: Some(500.0),
            storm_attempts: Some(500.0),
            ..Default::default()
        };
        assert_eq!(storm_hello_cell(&dead), "– (500 of 500 failed)");
        // Disambiguated labels still group under the name given.
        let mut two = vec![
            run("herald", tp("herald", 1.0, None)),
            run("herald", tp("herald", 3.0, None)),
        ];
        for (i, r) in two.iter_mut().enumerate() {
            r.group = r.label.clone();
            r.file = format!("run{i}.json");
        }
        disambiguate(&mut two);
        assert_ne!(two[0].label, two[1].label);
        assert_eq!(side_by_side(&two).len(), 1);
        let html = render(&two);
        assert!(html.contains("<h2>Side by side</h2>"));
    }

    #[test]
    fn axis_numbers_are_short() {
        assert_eq!(axis_num(20000.0), "20000");
        assert_eq!(axis_num(2.0), "2");
        assert_eq!(axis_num(2.5), "2.5");
        assert_eq!(axis_num(0.5), "0.5");
        assert_eq!(axis_num(0.0), "0");
        assert_eq!(axis_num(-150.4), "-150");
    }

    #[test]
    fn duplicate_labels_get_file_names() {
        let mut runs = vec![
            Run {
                label: "herald".into(),
                file: "x/run1.json".into(),
                r: sample("storm", "herald", 1),
                group: String::new(),
            },
            Run {
                label: "herald".into(),
                file: "x/run2.json".into(),
                r: sample("storm", "herald", 1),
                group: String::new(),
            },
            Run {
                label: "herald".into(),
                file: "x/run3.json".into(),
                r: sample("idle", "herald", 1),
                group: String::new(),
            },
        ];
        disambiguate(&mut runs);
        assert_eq!(runs[0].label, "herald (run1)");
        assert_eq!(runs[1].label, "herald (run2)");
        assert_eq!(runs[2].label, "herald");
    }

    #[test]
    fn cli_reads_files_and_labels() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.json");
        let b = dir.path().join("b.json");
        std::fs::write(
            &a,
            serde_json::to_string(&sample("throughput", "herald", 1)).unwrap(),
        )
        .unwrap();
        std::fs::write(
            &b,
            serde_json::to_string(&sample("throughput", "herald", 2)).unwrap(),
        )
        .unwrap();
        let junk = dir.path().join("junk.json");
        std::fs::write(&junk, "{").unwrap();
        let out = dir.path().join("r/report.html");
        run(ReportArgs {
            files: vec![a.clone(), junk.clone()],
            labels: vec![format!("other={}", b.display())],
            out: out.clone(),
        })
        .unwrap();
        let html = std::fs::read_to_string(&out).unwrap();
        assert!(html.contains("<th>other</th>") && html.contains("<th>herald</th>"));
        assert!(run(ReportArgs {
            files: vec![junk],
            labels: vec![],
            out: out.clone()
        })
        .is_err());
        assert!(run(ReportArgs {
            files: vec![],
            labels: vec!["nolabel".into()],
            out
        })
        .is_err());
    }
}
