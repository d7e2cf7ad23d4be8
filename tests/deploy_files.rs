//! Checks of the deployment files in `deploy/`, without Docker or Kubernetes.
//!
//! They parse each file the way its consumer would (YAML for Kubernetes, JSON
//! and PromQL for Grafana, TOML for Herald, unit-file syntax for systemd) and
//! check it against what Herald actually provides: its settings, metric names
//! and labels, health endpoints and default port. When one of those changes in
//! the code, change the tables at the top of this file, and these tests point
//! at every deployment file that has to follow.
//!
//! Each test gathers all the problems in its file before failing, so one run
//! shows everything to fix.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use base64::Engine as _;
use promql_parser::label::MatchOp;
use promql_parser::parser::{self as promql, Expr, LabelModifier};
use serde::Deserialize as _;
use serde_json::Value as Json;
use serde_yaml_ng::Value as Yaml;

// ---------------------------------------------------------------------------
// What Herald provides. Keep in step with the code.
// ---------------------------------------------------------------------------

/// How a setting's value is written in TOML.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    /// host:port
    Addr,
    /// http:// or https:// URL
    Url,
    Path,
    /// list of base64url-encoded 32-byte keys
    Keys,
    /// integer seconds, or a string: a number with an s/m/h/d suffix
    Duration,
    Int,
    Bool,
    /// one of the listed strings
    OneOf(&'static [&'static str]),
    LogLevel,
}

/// Every setting of `herald serve`: TOML key, kind, and default written as a
/// TOML value (None: no fixed default, the setting is optional).
const SETTINGS: &[(&str, Kind, Option<&str>)] = &[
    ("listen", Kind::Addr, Some(r#""127.0.0.1:8080""#)),
    ("endpoint_listen", Kind::Addr, None),
    ("metrics_listen", Kind::Addr, None),
    ("data_dir", Kind::Path, Some(r#""./herald-data""#)),
    ("public_url", Kind::Url, None),
    ("endpoint_keys", Kind::Keys, Some("[]")),
    ("hello_timeout", Kind::Duration, Some(r#""10s""#)),
    ("ping_interval", Kind::Duration, Some(r#""5m""#)),
    ("ping_timeout", Kind::Duration, Some(r#""30s""#)),
    ("max_connections", Kind::Int, Some("100000")),
    ("max_channels_per_uaid", Kind::Int, Some("500")),
    ("max_frame_size", Kind::Int, Some("32768")),
    ("client_rate_limit", Kind::Int, Some("50")),
    ("max_ttl", Kind::Duration, Some(r#""30d""#)),
    ("max_message_bytes", Kind::Int, Some("4096")),
    ("max_stored_messages", Kind::Int, Some("1000")),
    ("ua_expiry", Kind::Duration, Some(r#""60d""#)),
    ("sync_writes", Kind::Bool, Some("false")),
    ("delivery_window", Kind::Int, Some("64")),
    ("jwt_cache_size", Kind::Int, Some("10000")),
    ("sweep_interval", Kind::Duration, Some(r#""1h""#)),
    ("shutdown_timeout", Kind::Duration, Some(r#""10s""#)),
    (
        "log_format",
        Kind::OneOf(&["text", "json"]),
        Some(r#""text""#),
    ),
    ("log_level", Kind::LogLevel, Some(r#""info""#)),
    ("tls_cert", Kind::Path, None),
    ("tls_key", Kind::Path, None),
];

/// The port of `--listen` in the container image and Kubernetes manifests.
const HTTP_PORT: i64 = 8080;
const LIVENESS_PATH: &str = "/health";
const READINESS_PATH: &str = "/ready";

#[derive(Clone, Copy, Debug, PartialEq)]
enum MetricType {
    Counter,
    Gauge,
    Histogram,
}

/// A label and the values it takes (empty: any value).
type Label = (&'static str, &'static [&'static str]);

/// Every metric on GET /metrics: name, type, labels.
const METRICS: &[(&str, MetricType, &[Label])] = &[
    ("herald_ws_connections", MetricType::Gauge, &[]),
    (
        "herald_ws_hello_total",
        MetricType::Counter,
        &[("outcome", &["existing", "new", "rejected"])],
    ),
    (
        "herald_ws_register_total",
        MetricType::Counter,
        &[("outcome", &["ok", "error"])],
    ),
    (
        "herald_ws_unregister_total",
        MetricType::Counter,
        &[("outcome", &["ok", "error"])],
    ),
    (
        "herald_messages_accepted_total",
        MetricType::Counter,
        &[("urgency", &["very-low", "low", "normal", "high"])],
    ),
    ("herald_messages_delivered_total", MetricType::Counter, &[]),
    ("herald_messages_acked_total", MetricType::Counter, &[]),
    ("herald_messages_nacked_total", MetricType::Counter, &[]),
    ("herald_messages_expired_total", MetricType::Counter, &[]),
    ("herald_messages_replaced_total", MetricType::Counter, &[]),
    (
        "herald_messages_dropped_total",
        MetricType::Counter,
        &[(
            "reason",
            &["ttl0_offline", "unregistered", "cancelled", "ua_expired"],
        )],
    ),
    (
        "herald_http_responses_total",
        MetricType::Counter,
        &[("status", &[]), ("errno", &[])],
    ),
    (
        "herald_vapid_failures_total",
        MetricType::Counter,
        &[("reason", &[])],
    ),
    (
        "herald_jwt_cache_lookups_total",
        MetricType::Counter,
        &[("result", &["hit", "miss"])],
    ),
    (
        "herald_store_operation_seconds",
        MetricType::Histogram,
        &[("op", &[])],
    ),
    ("herald_stored_messages", MetricType::Gauge, &[]),
    ("herald_store_size_bytes", MetricType::Gauge, &[]),
    (
        "herald_store_pending_compaction_bytes",
        MetricType::Gauge,
        &[],
    ),
];

/// Labels Prometheus adds to every scraped series.
const TARGET_LABELS: &[&str] = &["instance", "job"];

// ---------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy")
}

fn read(rel: &str) -> String {
    let path = deploy_dir().join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// Collects problems; fails the test with all of them at the end.
struct Problems {
    file: &'static str,
    list: Vec<String>,
}

impl Problems {
    fn new(file: &'static str) -> Self {
        Problems {
            file,
            list: Vec::new(),
        }
    }
    fn add(&mut self, msg: impl Into<String>) {
        self.list.push(msg.into());
    }
    fn check(&mut self, ok: bool, msg: impl Into<String>) {
        if !ok {
            self.add(msg);
        }
    }
    fn finish(self) {
        assert!(
            self.list.is_empty(),
            "deploy/{}: {} problem(s):\n  - {}",
            self.file,
            self.list.len(),
            self.list.join("\n  - ")
        );
    }
}

fn setting(key: &str) -> Option<(Kind, Option<&'static str>)> {
    SETTINGS
        .iter()
        .find(|(k, ..)| *k == key)
        .map(|&(_, kind, default)| (kind, default))
}

/// Herald duration: integer seconds, or "<number><s|m|h|d>".
fn herald_duration_secs(v: &toml::Value) -> Option<u64> {
    match v {
        toml::Value::Integer(n) if *n >= 0 => Some(*n as u64),
        toml::Value::String(s) => {
            let unit = s.chars().last()?;
            let n: u64 = s[..s.len() - unit.len_utf8()].parse().ok()?;
            let mult = match unit {
                's' => 1,
                'm' => 60,
                'h' => 3600,
                'd' => 86400,
                _ => return None,
            };
            Some(n * mult)
        }
        _ => None,
    }
}

fn default_value(key: &str) -> toml::Value {
    let lit = setting(key)
        .and_then(|(_, d)| d)
        .expect("setting with a default");
    toml::from_str::<toml::Table>(&format!("v = {lit}")).expect("default parses")["v"].clone()
}

/// Checks one setting's value; returns a description of what is wrong.
fn check_setting_value(key: &str, v: &toml::Value) -> Result<(), String> {
    let Some((kind, _)) = setting(key) else {
        return Err(format!("`{key}` is not a Herald setting"));
    };
    let bad = |what: &str| Err(format!("`{key}` = {v}: expected {what}"));
    match kind {
        Kind::Addr => match v.as_str().map(str::parse::<SocketAddr>) {
            Some(Ok(_)) => Ok(()),
            _ => bad("a socket address such as \"127.0.0.1:8080\""),
        },
        Kind::Url => match v.as_str() {
            Some(s) if s.starts_with("https://") || s.starts_with("http://") => Ok(()),
            _ => bad("an http:// or https:// URL"),
        },
        Kind::Path => match v.as_str() {
            Some(s) if !s.is_empty() => Ok(()),
            _ => bad("a path"),
        },
        Kind::Keys => {
            let Some(list) = v.as_array() else {
                return bad("a list of keys");
            };
            for k in list {
                let decoded = k.as_str().and_then(|s| {
                    base64::engine::general_purpose::URL_SAFE_NO_PAD
                        .decode(s.trim_end_matches('='))
                        .ok()
                });
                if decoded.map(|d| d.len()) != Some(32) {
                    return bad("base64url-encoded 32-byte keys");
                }
            }
            Ok(())
        }
        Kind::Duration => match herald_duration_secs(v) {
            Some(_) => Ok(()),
            None => bad("integer seconds or a number with an s/m/h/d suffix"),
        },
        Kind::Int => match v.as_integer() {
            Some(n) if n > 0 => Ok(()),
            _ => bad("a positive integer"),
        },
        Kind::Bool => match v.as_bool() {
            Some(_) => Ok(()),
            None => bad("true or false"),
        },
        Kind::OneOf(allowed) => match v.as_str() {
            Some(s) if allowed.contains(&s) => Ok(()),
            _ => bad(&format!("one of {allowed:?}")),
        },
        Kind::LogLevel => match v.as_str() {
            Some(s) if ["error", "warn", "info", "debug", "trace"].contains(&s) => Ok(()),
            _ => bad("error, warn, info, debug or trace"),
        },
    }
}

/// Parses TOML Herald reads, checking every key and value.
fn check_herald_toml(text: &str, p: &mut Problems, what: &str) -> toml::Table {
    match toml::from_str::<toml::Table>(text) {
        Ok(table) => {
            for (key, value) in &table {
                if let Err(e) = check_setting_value(key, value) {
                    p.add(format!("{what}: {e}"));
                }
            }
            table
        }
        Err(e) => {
            p.add(format!("{what} is not valid TOML: {e}"));
            toml::Table::new()
        }
    }
}

/// Effective shutdown_timeout of a config table, in seconds.
fn shutdown_timeout_secs(table: &toml::Table) -> u64 {
    let v = table
        .get("shutdown_timeout")
        .cloned()
        .unwrap_or_else(|| default_value("shutdown_timeout"));
    herald_duration_secs(&v).expect("shutdown_timeout is a duration")
}

fn port_of(addr: &str) -> Option<i64> {
    addr.parse::<SocketAddr>().ok().map(|a| i64::from(a.port()))
}

// ---------------------------------------------------------------------------
// herald.toml
// ---------------------------------------------------------------------------

#[test]
fn example_config_names_and_documents_every_setting() {
    let mut p = Problems::new("herald.toml");
    let text = read("herald.toml");
    let active = check_herald_toml(&text, &mut p, "herald.toml");
    let lines: Vec<&str> = text.lines().collect();

    for &(key, _, default) in SETTINGS {
        // Where the setting is: an active `key = ...` line, or, for settings
        // without a default, a commented-out `# key = ...` example.
        let active_line = lines.iter().position(|l| toml_key_of(l) == Some(key));
        let commented_line = lines.iter().position(|l| {
            l.strip_prefix('#')
                .map(str::trim_start)
                .and_then(toml_key_of)
                == Some(key)
        });
        let line = match (default, active_line, commented_line) {
            (Some(_), Some(i), _) => i,
            (Some(_), None, _) => {
                p.add(format!(
                    "`{key}` has a default but no active `{key} = ...` line"
                ));
                continue;
            }
            (None, Some(i), _) => {
                p.add(format!(
                    "`{key}` has no default: show it commented out, so the example runs as is \
                     (line {})",
                    i + 1
                ));
                i
            }
            (None, None, Some(i)) => {
                let example = lines[i].trim_start_matches('#');
                check_herald_toml(example, &mut p, &format!("commented example of `{key}`"));
                i
            }
            (None, None, None) => {
                p.add(format!(
                    "`{key}` is not mentioned (neither set nor commented out)"
                ));
                continue;
            }
        };
        // The comment block right above it says what it does and its default.
        let doc: Vec<&str> = lines[..line]
            .iter()
            .rev()
            .skip_while(|l| {
                l.trim_start().starts_with('#')
                    && toml_key_of(l.trim_start_matches(['#', ' '])).is_some()
            })
            .take_while(|l| l.trim_start().starts_with('#'))
            .copied()
            .collect();
        p.check(
            doc.len() >= 2,
            format!("`{key}` needs a comment of at least two lines above it"),
        );
        p.check(
            doc.iter().any(|l| l.contains("Default")),
            format!("the comment above `{key}` does not state its default (\"Default: ...\")"),
        );
        // The example shows the real defaults.
        if let (Some(_), Some(value)) = (default, active.get(key)) {
            p.check(
                *value == default_value(key),
                format!(
                    "`{key}` = {value} in the example, but the default is {}",
                    default.unwrap()
                ),
            );
        }
    }
    p.finish();
}

/// The key of a `key = value` TOML line, if it is one.
fn toml_key_of(line: &str) -> Option<&str> {
    let (key, _) = line.split_once('=')?;
    let key = key.trim();
    (!key.is_empty() && key.chars().all(|c| c.is_ascii_lowercase() || c == '_')).then_some(key)
}

// ---------------------------------------------------------------------------
// Dockerfile
// ---------------------------------------------------------------------------

/// Dockerfile instructions (continuations joined, comments dropped), as
/// (INSTRUCTION, arguments) per stage.
fn dockerfile_stages(text: &str) -> Vec<Vec<(String, String)>> {
    let mut stages: Vec<Vec<(String, String)>> = vec![Vec::new()];
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
            continue;
        }
        if let Some(body) = trimmed.strip_suffix('\\') {
            current.push_str(body);
            current.push(' ');
            continue;
        }
        current.push_str(trimmed);
        let full = std::mem::take(&mut current);
        let (instr, args) = full.split_once(char::is_whitespace).unwrap_or((&full, ""));
        let instr = instr.to_ascii_uppercase();
        if instr == "FROM" {
            stages.push(Vec::new());
        }
        stages
            .last_mut()
            .unwrap()
            .push((instr, args.split_whitespace().collect::<Vec<_>>().join(" ")));
    }
    // Instructions before the first FROM (global ARGs) are not a stage.
    stages.retain(|s| s.first().is_some_and(|(i, _)| i == "FROM"));
    stages
}

fn instr<'a>(stage: &'a [(String, String)], name: &str) -> Vec<&'a str> {
    stage
        .iter()
        .filter(|(i, _)| i == name)
        .map(|(_, a)| a.as_str())
        .collect()
}

/// Packages installed by `apt-get install` in a stage.
fn apt_packages(stage: &[(String, String)]) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for run in instr(stage, "RUN") {
        for cmd in run.split("&&") {
            let words: Vec<&str> = cmd.split_whitespace().collect();
            if let Some(pos) = words.windows(2).position(|w| w == ["apt-get", "install"]) {
                out.extend(
                    words[pos + 2..]
                        .iter()
                        .filter(|w| !w.starts_with('-'))
                        .map(|w| w.split('=').next().unwrap().to_string()),
                );
            }
        }
    }
    out
}

/// The words of an exec-form (JSON array) instruction argument.
fn exec_form(args: &str) -> Option<Vec<String>> {
    serde_json::from_str::<Vec<String>>(args).ok()
}

fn dockerfile_user_uid(text: &str) -> Option<i64> {
    let stages = dockerfile_stages(text);
    let user = *instr(stages.last()?, "USER").last()?;
    user.split(':').next()?.parse().ok()
}

#[test]
fn dockerfile_builds_in_two_stages_and_runs_as_non_root_with_a_healthcheck() {
    let mut p = Problems::new("Dockerfile");
    let text = read("Dockerfile");
    let stages = dockerfile_stages(&text);
    p.check(
        stages.len() == 2,
        format!(
            "expected 2 stages (builder, runtime), found {}",
            stages.len()
        ),
    );
    if stages.len() < 2 {
        p.finish();
        return;
    }
    let (build, run) = (&stages[0], &stages[stages.len() - 1]);

    // Build stage: Rust on Debian bookworm, with what RocksDB needs.
    let from = instr(build, "FROM")[0];
    p.check(
        from.starts_with("rust:") && from.contains("bookworm"),
        format!("builder FROM {from}: want rust:*bookworm"),
    );
    let builder_name = from
        .split_whitespace()
        .skip_while(|w| !w.eq_ignore_ascii_case("AS"))
        .nth(1);
    p.check(builder_name.is_some(), "builder stage has no `AS name`");
    let build_pkgs = apt_packages(build);
    for pkg in ["clang", "libclang-dev"] {
        p.check(
            build_pkgs.contains(pkg),
            format!("builder does not install {pkg} (needed by RocksDB's bindgen)"),
        );
    }
    p.check(
        instr(build, "RUN").iter().any(|r| {
            r.contains("cargo build") && r.contains("--release") && r.contains("-p herald")
        }),
        "builder does not run `cargo build --release -p herald`",
    );

    // Runtime stage.
    let from = instr(run, "FROM")[0];
    p.check(
        from.starts_with("debian:bookworm-slim"),
        format!("runtime FROM {from}: want debian:bookworm-slim"),
    );
    if let Some(name) = builder_name {
        p.check(
            instr(run, "COPY")
                .iter()
                .any(|c| c.contains(&format!("--from={name}"))),
            "runtime stage copies nothing from the builder",
        );
    }
    let users = instr(run, "USER");
    match users.last() {
        None => p.add("no USER in the runtime stage: the container would run as root"),
        Some(u) => {
            let name = u.split(':').next().unwrap();
            p.check(name != "root" && name != "0", format!("USER {u} is root"));
            p.check(
                name.parse::<u32>().is_ok(),
                format!("USER {u}: use a numeric UID so runAsNonRoot can check it"),
            );
        }
    }
    p.check(
        instr(run, "EXPOSE").iter().any(|e| {
            e.split_whitespace()
                .any(|w| w.trim_end_matches("/tcp") == HTTP_PORT.to_string())
        }),
        format!("runtime stage does not EXPOSE {HTTP_PORT}"),
    );
    p.check(
        instr(run, "VOLUME").iter().any(|v| v.contains("/data")),
        "no VOLUME /data",
    );

    // The command: `serve`, listening on all interfaces of the container.
    let mut command: Vec<String> = Vec::new();
    for which in ["ENTRYPOINT", "CMD"] {
        match instr(run, which).last().map(|a| exec_form(a)) {
            Some(Some(words)) => command.extend(words),
            Some(None) => p.add(format!(
                "{which} is not in exec (JSON) form: Herald would not be PID 1 and miss SIGTERM"
            )),
            None => {}
        }
    }
    let joined = command.join(" ");
    p.check(
        command.first().is_some_and(|c| c.ends_with("herald")),
        format!("the command `{joined}` does not run herald"),
    );
    let listen = format!("--listen 0.0.0.0:{HTTP_PORT}");
    for want in ["serve", listen.as_str(), "--data-dir /data"] {
        p.check(
            joined.contains(want),
            format!("the command `{joined}` lacks `{want}`"),
        );
    }

    // HEALTHCHECK hits /health on the listen port, with a tool the image has.
    match instr(run, "HEALTHCHECK").last() {
        None => p.add("no HEALTHCHECK in the runtime stage"),
        Some(hc) => {
            let cmd = hc.split_once("CMD ").map(|(_, c)| c).unwrap_or("");
            p.check(
                cmd.contains(&format!("127.0.0.1:{HTTP_PORT}{LIVENESS_PATH}")),
                format!("HEALTHCHECK `{cmd}` does not hit 127.0.0.1:{HTTP_PORT}{LIVENESS_PATH}"),
            );
            let tool = cmd.split_whitespace().next().unwrap_or("");
            let run_pkgs = apt_packages(run);
            p.check(
                run_pkgs.contains(tool)
                    || ["/bin/sh", "sh", "/usr/local/bin/herald", "herald"].contains(&tool),
                format!("HEALTHCHECK uses `{tool}`, which the runtime stage does not install"),
            );
        }
    }
    p.check(
        instr(run, "STOPSIGNAL")
            .last()
            .is_none_or(|s| *s == "SIGTERM"),
        "STOPSIGNAL must be SIGTERM (Herald's graceful shutdown)",
    );

    // The ignore file BuildKit uses for `docker build -f deploy/Dockerfile .`
    // keeps the (huge) target/ directory out of the build context.
    let ignore = read("Dockerfile.dockerignore");
    let patterns: Vec<&str> = ignore
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    for must in ["target/", ".git/"] {
        p.check(
            patterns.contains(&must),
            format!("Dockerfile.dockerignore does not exclude {must}"),
        );
    }
    for keep in ["Cargo.toml", "Cargo.lock", "src", "loadtest"] {
        p.check(
            !patterns
                .iter()
                .any(|pat| pat.trim_end_matches('/') == keep || *pat == "*"),
            format!("Dockerfile.dockerignore excludes {keep}, which the build needs"),
        );
    }
    p.finish();
}

// ---------------------------------------------------------------------------
// systemd unit
// ---------------------------------------------------------------------------

/// A unit file as section -> key -> values (keys may repeat).
fn parse_unit(text: &str, p: &mut Problems) -> BTreeMap<String, BTreeMap<String, Vec<String>>> {
    let mut out: BTreeMap<String, BTreeMap<String, Vec<String>>> = BTreeMap::new();
    let mut section: Option<String> = None;
    let mut pending = String::new();
    for (n, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if pending.is_empty() && (line.is_empty() || line.starts_with('#') || line.starts_with(';'))
        {
            continue;
        }
        if let Some(body) = line.strip_suffix('\\') {
            pending.push_str(body);
            pending.push(' ');
            continue;
        }
        let line = format!("{pending}{line}");
        pending.clear();
        if line.starts_with('[') && line.ends_with(']') {
            section = Some(line[1..line.len() - 1].to_string());
            continue;
        }
        match (&section, line.split_once('=')) {
            (Some(s), Some((k, v))) => out
                .entry(s.clone())
                .or_default()
                .entry(k.trim().to_string())
                .or_default()
                .push(v.trim().to_string()),
            (None, _) => p.add(format!("line {}: outside any [Section]", n + 1)),
            (_, None) => p.add(format!("line {}: not `Key=value`: {line}", n + 1)),
        }
    }
    out
}

/// systemd time span ("30s", "1min", "90", "1min 30s") in seconds.
fn systemd_secs(s: &str) -> Option<u64> {
    let mut total = 0;
    for part in s.split_whitespace() {
        let digits: String = part.chars().take_while(char::is_ascii_digit).collect();
        let n: u64 = digits.parse().ok()?;
        total += n * match &part[digits.len()..] {
            "" | "s" | "sec" | "second" | "seconds" => 1,
            "m" | "min" | "minute" | "minutes" => 60,
            "h" | "hr" | "hour" | "hours" => 3600,
            _ => return None,
        };
    }
    Some(total)
}

#[test]
fn systemd_unit_is_hardened_and_stops_gracefully() {
    let mut p = Problems::new("herald.service");
    let text = read("herald.service");
    let unit = parse_unit(&text, &mut p);
    let get = |section: &str, key: &str| -> Vec<String> {
        unit.get(section)
            .and_then(|s| s.get(key))
            .cloned()
            .unwrap_or_default()
    };
    let one = |section: &str, key: &str| get(section, key).last().cloned();

    p.check(
        one("Unit", "Description").is_some(),
        "[Unit] Description= is missing",
    );
    p.check(
        one("Install", "WantedBy").is_some(),
        "[Install] WantedBy= is missing",
    );

    let exec = one("Service", "ExecStart").unwrap_or_default();
    let words: Vec<&str> = exec.split_whitespace().collect();
    p.check(
        words
            .first()
            .is_some_and(|w| w.starts_with('/') && w.ends_with("/herald"))
            && words.get(1) == Some(&"serve"),
        format!("ExecStart=`{exec}` should run `/…/herald serve`"),
    );
    // The store lives in the StateDirectory, which systemd creates and owns.
    let state = one("Service", "StateDirectory");
    p.check(state.is_some(), "StateDirectory= is missing");
    if let Some(state) = &state {
        let data_dir = words
            .windows(2)
            .find(|w| w[0] == "--data-dir")
            .map(|w| w[1]);
        p.check(
            data_dir == Some(format!("/var/lib/{state}").as_str()),
            format!(
                "ExecStart --data-dir is {data_dir:?}, want /var/lib/{state} (the StateDirectory)"
            ),
        );
    }
    p.check(
        one("Service", "User").is_some() || one("Service", "DynamicUser").as_deref() == Some("yes"),
        "neither User= nor DynamicUser=yes: the service would run as root",
    );
    p.check(
        one("Service", "User").as_deref() != Some("root"),
        "User=root",
    );

    let expect = [
        ("ExecReload", "/bin/kill -HUP $MAINPID"),
        ("KillSignal", "SIGTERM"),
        ("Restart", "on-failure"),
        ("LimitNOFILE", "1048576"),
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("PrivateDevices", "yes"),
        ("ProtectKernelTunables", "yes"),
        ("ProtectKernelModules", "yes"),
        ("ProtectControlGroups", "yes"),
        ("RestrictNamespaces", "yes"),
        ("RestrictSUIDSGID", "yes"),
        ("LockPersonality", "yes"),
        ("MemoryDenyWriteExecute", "yes"),
        ("CapabilityBoundingSet", ""),
    ];
    for (key, want) in expect {
        let got = one("Service", key);
        p.check(
            got.as_deref() == Some(want),
            format!("{key}={want} expected, found {got:?}"),
        );
    }
    let families = one("Service", "RestrictAddressFamilies").unwrap_or_default();
    for fam in ["AF_INET", "AF_INET6"] {
        p.check(
            families.split_whitespace().any(|f| f == fam),
            format!("RestrictAddressFamilies lacks {fam}"),
        );
    }
    p.check(
        get("Service", "SystemCallFilter")
            .iter()
            .any(|f| f.split_whitespace().any(|w| w == "@system-service")),
        "SystemCallFilter=@system-service is missing",
    );
    // systemd must wait longer than Herald's own graceful shutdown.
    let stop = one("Service", "TimeoutStopSec")
        .as_deref()
        .and_then(systemd_secs);
    let shutdown = herald_duration_secs(&default_value("shutdown_timeout")).unwrap();
    p.check(
        stop.is_some_and(|s| s > shutdown),
        format!("TimeoutStopSec ({stop:?} s) must exceed shutdown_timeout ({shutdown} s)"),
    );

    // systemd's own parser, when this machine has it. It warns (exit code 0)
    // about unknown keys and bad values, so any message about the unit fails.
    // ExecStart points at a stand-in executable: verify insists that the
    // binary exists, and Herald is not installed here.
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok()
    {
        let dir = tempfile::tempdir().unwrap();
        let stub = dir.path().join("herald");
        std::fs::write(&stub, "#!/bin/sh\nexit 0\n").unwrap();
        std::fs::set_permissions(&stub, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let binary = words.first().copied().unwrap_or("/usr/local/bin/herald");
        let unit_path = dir.path().join("herald.service");
        std::fs::write(&unit_path, text.replace(binary, stub.to_str().unwrap())).unwrap();
        let out = Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(&unit_path)
            .output()
            .unwrap();
        let messages = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        let about_unit: Vec<&str> = messages.lines().filter(|l| l.contains("herald")).collect();
        p.check(
            out.status.success() && about_unit.is_empty(),
            format!(
                "systemd-analyze verify: {}\n{}",
                out.status,
                about_unit.join("\n")
            ),
        );
    } else {
        println!(
            "note: systemd-analyze not found; skipped `systemd-analyze verify` of herald.service"
        );
    }
    p.finish();
}

// ---------------------------------------------------------------------------
// Kubernetes
// ---------------------------------------------------------------------------

/// Every YAML document of every file in deploy/kubernetes, with its file name.
fn kubernetes_documents(p: &mut Problems) -> Vec<(String, Yaml)> {
    let dir = deploy_dir().join("kubernetes");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
        .collect();
    files.sort();
    let mut docs = Vec::new();
    for path in files {
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        let text = std::fs::read_to_string(&path).unwrap();
        check_yaml11_booleans(&name, &text, p);
        for doc in serde_yaml_ng::Deserializer::from_str(&text) {
            match Yaml::deserialize(doc) {
                Ok(Yaml::Null) => {}
                Ok(v) => docs.push((name.clone(), v)),
                // After an error the iterator repeats it forever: stop.
                Err(e) => {
                    p.add(format!("{name}: not valid YAML: {e}"));
                    break;
                }
            }
        }
    }
    docs
}

/// Kubernetes' YAML parser follows YAML 1.1, where unquoted yes/no/on/off are
/// booleans: `proxy-buffering: off` would reach the API as `false`. Such
/// values must be quoted.
fn check_yaml11_booleans(file: &str, text: &str, p: &mut Problems) {
    for (n, line) in text.lines().enumerate() {
        let code = line.split(" #").next().unwrap();
        if code.trim_start().starts_with('#') {
            continue;
        }
        let value = code
            .rsplit_once(": ")
            .map(|(_, v)| v)
            .or_else(|| code.trim_start().strip_prefix("- "));
        if let Some(v) = value {
            if ["y", "n", "yes", "no", "on", "off"]
                .contains(&v.trim().to_ascii_lowercase().as_str())
            {
                p.add(format!(
                    "{file}:{}: unquoted `{}` is a boolean in YAML 1.1: quote it",
                    n + 1,
                    v.trim()
                ));
            }
        }
    }
}

fn kind_of(doc: &Yaml) -> &str {
    doc["kind"].as_str().unwrap_or("")
}

fn name_of(doc: &Yaml) -> &str {
    doc["metadata"]["name"].as_str().unwrap_or("")
}

fn seq(v: &Yaml) -> &[Yaml] {
    v.as_sequence().map(|s| s.as_slice()).unwrap_or(&[])
}

/// A probe's or Service's port (number or name) resolved against a
/// container's ports.
fn resolve_port(port: &Yaml, container: &Yaml) -> Option<i64> {
    if let Some(n) = port.as_i64() {
        return Some(n);
    }
    let name = port.as_str()?;
    seq(&container["ports"])
        .iter()
        .find(|p| p["name"].as_str() == Some(name))
        .and_then(|p| p["containerPort"].as_i64())
}

/// Labels and annotations must be strings: `"true"`, not `true`.
fn check_string_map(what: &str, map: &Yaml, p: &mut Problems) {
    if let Some(m) = map.as_mapping() {
        for (k, v) in m {
            p.check(
                v.is_string(),
                format!("{what} {k:?} has a non-string value {v:?}: quote it"),
            );
        }
    }
}

#[test]
fn kubernetes_manifests_are_consistent() {
    let mut p = Problems::new("kubernetes/");
    let docs = kubernetes_documents(&mut p);
    let by_kind = |kind: &str| -> Vec<&Yaml> {
        docs.iter()
            .map(|(_, d)| d)
            .filter(|d| kind_of(d) == kind)
            .collect()
    };

    for (file, doc) in &docs {
        let kind = kind_of(doc);
        p.check(
            [
                "StatefulSet",
                "Service",
                "ConfigMap",
                "Ingress",
                "Kustomization",
            ]
            .contains(&kind),
            format!("{file}: unexpected kind {kind:?}"),
        );
        p.check(
            doc["apiVersion"].is_string(),
            format!("{file}: {kind} has no apiVersion"),
        );
        if kind != "Kustomization" {
            p.check(
                !name_of(doc).is_empty(),
                format!("{file}: {kind} has no metadata.name"),
            );
            check_string_map(
                &format!("{file}: {kind} label"),
                &doc["metadata"]["labels"],
                &mut p,
            );
            check_string_map(
                &format!("{file}: {kind} annotation"),
                &doc["metadata"]["annotations"],
                &mut p,
            );
        }
    }

    // kustomization.yaml lists exactly the other manifests.
    if let Some(k) = by_kind("Kustomization").first() {
        let listed: BTreeSet<String> = seq(&k["resources"])
            .iter()
            .filter_map(|r| r.as_str().map(String::from))
            .collect();
        let present: BTreeSet<String> = docs
            .iter()
            .filter(|(_, d)| kind_of(d) != "Kustomization")
            .map(|(f, _)| f.clone())
            .collect();
        p.check(
            listed == present,
            format!("kustomization resources {listed:?} != manifest files {present:?}"),
        );
    }

    // ConfigMap: herald.toml that Herald accepts.
    let configmaps = by_kind("ConfigMap");
    let mut config = toml::Table::new();
    match configmaps
        .iter()
        .find(|c| c["data"]["herald.toml"].is_string())
    {
        None => p.add("no ConfigMap with a herald.toml key"),
        Some(cm) => {
            config = check_herald_toml(
                cm["data"]["herald.toml"].as_str().unwrap(),
                &mut p,
                "ConfigMap herald.toml",
            )
        }
    }

    let sets = by_kind("StatefulSet");
    p.check(
        sets.len() == 1,
        format!("expected one StatefulSet, found {}", sets.len()),
    );
    let Some(sts) = sets.first() else {
        p.finish();
        return;
    };
    let spec = &sts["spec"];
    let pod = &spec["template"]["spec"];
    let pod_labels = &spec["template"]["metadata"]["labels"];
    check_string_map("pod template label", pod_labels, &mut p);
    check_string_map(
        "pod template annotation",
        &spec["template"]["metadata"]["annotations"],
        &mut p,
    );
    p.check(
        spec["replicas"].as_i64() == Some(1),
        "replicas must be 1: each Herald keeps its own local store, replicas would not share user agents",
    );
    if let Some(sel) = spec["selector"]["matchLabels"].as_mapping() {
        for (k, v) in sel {
            p.check(
                pod_labels[k.as_str().unwrap_or("")] == *v,
                format!("selector {k:?}={v:?} does not match the pod labels"),
            );
        }
    } else {
        p.add("StatefulSet has no selector.matchLabels");
    }

    // Graceful shutdown fits in the grace period.
    let grace = pod["terminationGracePeriodSeconds"].as_i64();
    let shutdown = shutdown_timeout_secs(&config) as i64;
    p.check(
        grace.is_some_and(|g| g > shutdown),
        format!(
            "terminationGracePeriodSeconds {grace:?} must exceed shutdown_timeout ({shutdown} s)"
        ),
    );
    p.check(
        pod["enableServiceLinks"].as_bool() == Some(false),
        "enableServiceLinks must be false (HERALD_* service variables)",
    );

    // Non-root, matching the image's USER.
    let pod_sc = &pod["securityContext"];
    p.check(
        pod_sc["runAsNonRoot"].as_bool() == Some(true),
        "pod securityContext.runAsNonRoot must be true",
    );
    let image_uid = dockerfile_user_uid(&read("Dockerfile"));
    p.check(
        pod_sc["runAsUser"].as_i64() == image_uid,
        format!(
            "runAsUser {:?} differs from the Dockerfile's USER {image_uid:?}",
            pod_sc["runAsUser"].as_i64()
        ),
    );
    p.check(
        pod_sc["fsGroup"].as_i64().is_some(),
        "pod securityContext.fsGroup is missing: the volume may not be writable",
    );

    let containers = seq(&pod["containers"]);
    let Some(c) = containers
        .iter()
        .find(|c| c["name"].as_str() == Some("herald"))
    else {
        p.add("no container named herald");
        p.finish();
        return;
    };
    let csc = &c["securityContext"];
    p.check(
        csc["allowPrivilegeEscalation"].as_bool() == Some(false),
        "container allowPrivilegeEscalation must be false",
    );
    p.check(
        csc["readOnlyRootFilesystem"].as_bool() == Some(true),
        "container readOnlyRootFilesystem must be true",
    );
    p.check(
        seq(&csc["capabilities"]["drop"])
            .iter()
            .any(|d| d.as_str() == Some("ALL")),
        "container capabilities must drop ALL",
    );
    for part in ["requests", "limits"] {
        p.check(
            c["resources"][part]["memory"].is_string(),
            format!("resources.{part}.memory is missing"),
        );
    }

    // Arguments: serve, config from the ConfigMap mount, listen on the HTTP
    // port, data in the volume claim.
    let args: Vec<&str> = seq(&c["args"]).iter().filter_map(|a| a.as_str()).collect();
    let flag = |name: &str| args.windows(2).find(|w| w[0] == name).map(|w| w[1]);
    p.check(
        args.first() == Some(&"serve"),
        format!("args {args:?} must start with serve"),
    );
    p.check(
        flag("--listen").and_then(port_of) == Some(HTTP_PORT),
        format!(
            "--listen {:?} must be on port {HTTP_PORT}",
            flag("--listen")
        ),
    );
    let mounts = seq(&c["volumeMounts"]);
    let mount_of = |path: &str| {
        mounts
            .iter()
            .find(|m| m["mountPath"].as_str() == Some(path))
    };
    let claims: BTreeSet<&str> = seq(&spec["volumeClaimTemplates"])
        .iter()
        .filter_map(|t| t["metadata"]["name"].as_str())
        .collect();
    p.check(
        !claims.is_empty(),
        "StatefulSet has no volumeClaimTemplates",
    );
    match flag("--data-dir").and_then(mount_of) {
        Some(m) => p.check(
            claims.contains(m["name"].as_str().unwrap_or("")),
            format!(
                "--data-dir is mounted from {:?}, not from a volumeClaimTemplate",
                m["name"]
            ),
        ),
        None => p.add(format!(
            "--data-dir {:?} is not a volumeMount of the container",
            flag("--data-dir")
        )),
    }
    match flag("--config") {
        None => p.add("args lack --config (the ConfigMap's herald.toml)"),
        Some(cfg) => {
            let (dir, file) = cfg.rsplit_once('/').unwrap_or(("", cfg));
            let volume = mount_of(dir).and_then(|m| m["name"].as_str());
            let source = seq(&pod["volumes"])
                .iter()
                .find(|v| v["name"].as_str() == volume);
            let cm_name = source.and_then(|v| v["configMap"]["name"].as_str());
            p.check(
                configmaps
                    .iter()
                    .any(|cm| Some(name_of(cm)) == cm_name && cm["data"][file].is_string()),
                format!("--config {cfg}: no ConfigMap with key {file} is mounted at {dir}"),
            );
        }
    }
    for m in mounts {
        let name = m["name"].as_str().unwrap_or("");
        p.check(
            claims.contains(name)
                || seq(&pod["volumes"])
                    .iter()
                    .any(|v| v["name"].as_str() == Some(name)),
            format!("volumeMount {name:?} has no volume"),
        );
    }

    // Environment: strings only; the public URL is https (TLS at the Ingress;
    // Firefox needs wss://).
    for e in seq(&c["env"]) {
        p.check(
            e["value"].is_string() || e["valueFrom"].is_mapping(),
            format!("env {:?}: value must be a string", e["name"]),
        );
    }
    let public_url = seq(&c["env"])
        .iter()
        .find(|e| e["name"].as_str() == Some("HERALD_PUBLIC_URL"))
        .and_then(|e| e["value"].as_str());
    p.check(
        public_url.is_some_and(|u| u.starts_with("https://")),
        format!("env HERALD_PUBLIC_URL {public_url:?} must be set to an https:// URL"),
    );

    // Ports and probes.
    let http = c["ports"].as_sequence().and_then(|ps| {
        ps.iter()
            .find(|p| p["containerPort"].as_i64() == Some(HTTP_PORT))
    });
    p.check(http.is_some(), format!("no containerPort {HTTP_PORT}"));
    if let Some(metrics) = config.get("metrics_listen").and_then(|v| v.as_str()) {
        let port = port_of(metrics);
        p.check(
            seq(&c["ports"])
                .iter()
                .any(|cp| cp["containerPort"].as_i64() == port),
            format!("metrics_listen {metrics} has no containerPort"),
        );
    }
    for (probe, path) in [
        ("livenessProbe", LIVENESS_PATH),
        ("readinessProbe", READINESS_PATH),
        ("startupProbe", LIVENESS_PATH),
    ] {
        let get = &c[probe]["httpGet"];
        if probe == "startupProbe" && c[probe].is_null() {
            continue;
        }
        p.check(
            get["path"].as_str() == Some(path),
            format!("{probe} must GET {path}, has {:?}", get["path"]),
        );
        p.check(
            resolve_port(&get["port"], c) == Some(HTTP_PORT),
            format!("{probe} port {:?} is not {HTTP_PORT}", get["port"]),
        );
    }

    // Services select the pod and target its ports; the StatefulSet's
    // governing Service is headless.
    let services = by_kind("Service");
    p.check(!services.is_empty(), "no Service");
    for s in &services {
        let sel = s["spec"]["selector"].as_mapping();
        p.check(
            sel.is_some_and(|sel| {
                sel.iter()
                    .all(|(k, v)| pod_labels[k.as_str().unwrap_or("")] == *v)
            }),
            format!("Service {} does not select the Herald pod", name_of(s)),
        );
        for port in seq(&s["spec"]["ports"]) {
            let target = if port["targetPort"].is_null() {
                &port["port"]
            } else {
                &port["targetPort"]
            };
            p.check(
                resolve_port(target, c).is_some_and(|n| {
                    seq(&c["ports"])
                        .iter()
                        .any(|cp| cp["containerPort"].as_i64() == Some(n))
                }),
                format!(
                    "Service {} targetPort {target:?} is not a container port",
                    name_of(s)
                ),
            );
        }
    }
    let governing = spec["serviceName"].as_str().unwrap_or("");
    p.check(
        services
            .iter()
            .any(|s| name_of(s) == governing && s["spec"]["clusterIP"].as_str() == Some("None")),
        format!("serviceName {governing:?} is not a headless Service"),
    );

    // Ingress routes to a Service port that exists, for the public URL's host.
    for ing in by_kind("Ingress") {
        for rule in seq(&ing["spec"]["rules"]) {
            if let Some(url) = public_url {
                let host = url
                    .trim_start_matches("https://")
                    .split(['/', ':'])
                    .next()
                    .unwrap_or("");
                p.check(
                    rule["host"].as_str() == Some(host),
                    format!(
                        "Ingress host {:?} != HERALD_PUBLIC_URL host {host}",
                        rule["host"]
                    ),
                );
            }
            for path in seq(&rule["http"]["paths"]) {
                let backend = &path["backend"]["service"];
                let svc = services
                    .iter()
                    .find(|s| Some(name_of(s)) == backend["name"].as_str());
                let port = &backend["port"];
                p.check(
                    svc.is_some_and(|s| {
                        seq(&s["spec"]["ports"]).iter().any(|sp| {
                            (port["name"].is_string() && sp["name"] == port["name"])
                                || (port["number"].is_i64() && sp["port"] == port["number"])
                        })
                    }),
                    format!(
                        "Ingress backend {:?}:{port:?} is not a Service port",
                        backend["name"]
                    ),
                );
            }
        }
        p.check(
            !seq(&ing["spec"]["tls"]).is_empty(),
            "Ingress has no tls section (Firefox needs wss://)",
        );
    }
    p.finish();
}

// ---------------------------------------------------------------------------
// Grafana dashboard
// ---------------------------------------------------------------------------

/// Labels a series of this name carries, and whether it is a counter-like
/// series (to be read through rate()/increase()).
fn series(name: &str) -> Option<(BTreeSet<&'static str>, bool, &'static [Label])> {
    for &(metric, kind, labels) in METRICS {
        let mut set: BTreeSet<&str> = labels
            .iter()
            .map(|(l, _)| *l)
            .chain(TARGET_LABELS.iter().copied())
            .collect();
        let counter_like = match kind {
            MetricType::Gauge if name == metric => false,
            MetricType::Counter if name == metric => true,
            MetricType::Histogram if name == format!("{metric}_bucket") => {
                set.insert("le");
                true
            }
            MetricType::Histogram
                if name == format!("{metric}_sum") || name == format!("{metric}_count") =>
            {
                true
            }
            _ => continue,
        };
        return Some((set, counter_like, labels));
    }
    None
}

fn metric_of_series(name: &str) -> &str {
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix) {
            if METRICS
                .iter()
                .any(|(m, t, _)| *m == base && *t == MetricType::Histogram)
            {
                return base;
            }
        }
    }
    name
}

/// Grafana's variables, replaced by values PromQL accepts.
fn substitute_grafana_variables(expr: &str) -> String {
    let mut out = expr
        .replace("$__rate_interval", "5m")
        .replace("$__interval", "1m")
        .replace("$__range", "1h");
    // Any other variable (here: $instance) stands inside a regex matcher.
    while let Some(start) = out.find('$') {
        let rest = &out[start + 1..];
        let len = if rest.starts_with('{') {
            rest.find('}').map(|i| i + 1).unwrap_or(rest.len())
        } else {
            rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len())
        };
        out.replace_range(start..start + 1 + len, ".*");
    }
    out
}

/// Walks a PromQL expression: checks every selector against METRICS and
/// returns the labels its result carries.
fn check_promql(
    expr: &Expr,
    in_rate: bool,
    used: &mut BTreeSet<String>,
    problems: &mut Vec<String>,
) -> BTreeSet<String> {
    let mut check_selector = |vs: &promql::VectorSelector, as_range: bool| -> BTreeSet<String> {
        let Some(name) = vs.name.as_deref() else {
            problems.push("a selector without a metric name".into());
            return BTreeSet::new();
        };
        let Some((labels, counter_like, values)) = series(name) else {
            problems.push(format!("`{name}` is not a Herald metric"));
            return BTreeSet::new();
        };
        used.insert(metric_of_series(name).to_string());
        if counter_like && !(as_range && in_rate) {
            problems.push(format!(
                "counter `{name}` must be read through rate() or increase()"
            ));
        }
        if !counter_like && in_rate {
            problems.push(format!("gauge `{name}` inside rate()/increase()"));
        }
        for m in &vs.matchers.matchers {
            if !labels.contains(m.name.as_str()) {
                problems.push(format!("`{name}` has no label `{}`", m.name));
            }
            let allowed = values
                .iter()
                .find(|(l, _)| *l == m.name)
                .map(|(_, v)| *v)
                .unwrap_or(&[]);
            if matches!(m.op, MatchOp::Equal)
                && !allowed.is_empty()
                && !allowed.contains(&m.value.as_str())
            {
                problems.push(format!(
                    "`{name}{{{}=\"{}\"}}`: the value is not one of {allowed:?}",
                    m.name, m.value
                ));
            }
        }
        labels.into_iter().map(String::from).collect()
    };
    match expr {
        Expr::VectorSelector(vs) => check_selector(vs, false),
        Expr::MatrixSelector(ms) => check_selector(&ms.vs, true),
        Expr::Call(call) => {
            let name = call.func.name;
            let rate = matches!(name, "rate" | "irate" | "increase");
            let mut labels = BTreeSet::new();
            for arg in &call.args.args {
                labels.extend(check_promql(arg, rate, used, problems));
            }
            if name == "histogram_quantile" && !labels.remove("le") {
                problems.push(
                    "histogram_quantile over series without an `le` label (missing `by (le)`?)"
                        .into(),
                );
            }
            labels
        }
        Expr::Aggregate(agg) => {
            let inner = check_promql(&agg.expr, false, used, problems);
            if let Some(param) = &agg.param {
                check_promql(param, false, used, problems);
            }
            match &agg.modifier {
                Some(LabelModifier::Include(by)) => {
                    for l in &by.labels {
                        if !inner.contains(l) {
                            problems.push(format!(
                                "aggregation by `{l}`, a label the aggregated series do not have"
                            ));
                        }
                    }
                    by.labels.iter().cloned().collect()
                }
                Some(LabelModifier::Exclude(without)) => inner
                    .into_iter()
                    .filter(|l| !without.labels.contains(l))
                    .collect(),
                None => BTreeSet::new(),
            }
        }
        Expr::Binary(b) => {
            let mut labels = check_promql(&b.lhs, false, used, problems);
            labels.extend(check_promql(&b.rhs, false, used, problems));
            labels
        }
        Expr::Paren(e) => check_promql(&e.expr, in_rate, used, problems),
        Expr::Unary(e) => check_promql(&e.expr, in_rate, used, problems),
        Expr::Subquery(e) => check_promql(&e.expr, false, used, problems),
        Expr::NumberLiteral(_) | Expr::StringLiteral(_) | Expr::Extension(_) => BTreeSet::new(),
    }
}

#[test]
fn grafana_dashboard_queries_only_herald_metrics() {
    let mut p = Problems::new("grafana-dashboard.json");
    let dash: Json = match serde_json::from_str(&read("grafana-dashboard.json")) {
        Ok(d) => d,
        Err(e) => panic!("deploy/grafana-dashboard.json is not valid JSON: {e}"),
    };
    p.check(
        dash["schemaVersion"].as_i64().is_some_and(|v| v >= 36),
        "schemaVersion must be 36 or later",
    );
    p.check(
        dash["uid"]
            .as_str()
            .is_some_and(|u| !u.is_empty() && u.len() <= 40),
        "uid must be set (at most 40 characters)",
    );
    p.check(
        dash["title"].as_str().is_some_and(|t| !t.is_empty()),
        "title must be set",
    );

    // Data source chosen by a variable, so the dashboard imports anywhere.
    let vars = dash["templating"]["list"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let ds_var = vars
        .iter()
        .find(|v| v["type"] == "datasource" && v["query"] == "prometheus");
    p.check(
        ds_var.is_some(),
        "no Prometheus data-source variable in templating",
    );
    let ds_ref = format!(
        "${{{}}}",
        ds_var
            .and_then(|v| v["name"].as_str())
            .unwrap_or("datasource")
    );

    let mut used = BTreeSet::new();
    for var in vars.iter().filter(|v| v["type"] == "query") {
        let q = var["query"]["query"]
            .as_str()
            .or(var["query"].as_str())
            .unwrap_or("");
        if let Some(args) = q
            .strip_prefix("label_values(")
            .and_then(|r| r.strip_suffix(')'))
        {
            let (metric, label) = args.rsplit_once(',').unwrap_or((args, ""));
            match series(metric.trim()) {
                Some((labels, ..)) => p.check(
                    labels.contains(label.trim()),
                    format!("variable query {q}: no label {label}"),
                ),
                None => p.add(format!("variable query {q}: not a Herald metric")),
            }
        }
    }

    let mut ids = BTreeSet::new();
    let mut boxes: Vec<(i64, i64, i64, i64, String)> = Vec::new();
    let panels = dash["panels"].as_array().cloned().unwrap_or_default();
    p.check(!panels.is_empty(), "no panels");
    for panel in panels
        .iter()
        .flat_map(|pn| std::iter::once(pn).chain(pn["panels"].as_array().into_iter().flatten()))
    {
        let title = panel["title"].as_str().unwrap_or("(untitled)").to_string();
        p.check(
            ids.insert(panel["id"].as_i64().unwrap_or(-1)),
            format!("panel {title:?}: missing or duplicate id"),
        );
        let g = &panel["gridPos"];
        let (x, y, w, h) = (
            g["x"].as_i64(),
            g["y"].as_i64(),
            g["w"].as_i64(),
            g["h"].as_i64(),
        );
        match (x, y, w, h) {
            (Some(x), Some(y), Some(w), Some(h)) if x >= 0 && w > 0 && h > 0 && x + w <= 24 => {
                for (bx, by, bw, bh, other) in &boxes {
                    if x < bx + bw && *bx < x + w && y < by + bh && *by < y + h {
                        p.add(format!("panels {other:?} and {title:?} overlap"));
                    }
                }
                boxes.push((x, y, w, h, title.clone()));
            }
            _ => p.add(format!(
                "panel {title:?}: gridPos {g} is not within the 24-column grid"
            )),
        }
        if panel["type"] == "row" {
            continue;
        }
        p.check(
            panel["datasource"]["uid"] == ds_ref.as_str(),
            format!("panel {title:?}: datasource is not {ds_ref}"),
        );
        let targets = panel["targets"].as_array().cloned().unwrap_or_default();
        p.check(!targets.is_empty(), format!("panel {title:?}: no queries"));
        for t in targets {
            let Some(expr) = t["expr"].as_str() else {
                p.add(format!("panel {title:?}: a target without expr"));
                continue;
            };
            let parsed = match promql::parse(&substitute_grafana_variables(expr)) {
                Ok(e) => e,
                Err(e) => {
                    p.add(format!(
                        "panel {title:?}: `{expr}` is not valid PromQL: {e}"
                    ));
                    continue;
                }
            };
            let mut problems = Vec::new();
            let labels = check_promql(&parsed, false, &mut used, &mut problems);
            for problem in problems {
                p.add(format!("panel {title:?}: {problem} in `{expr}`"));
            }
            // Legend placeholders must name labels the result has.
            let legend = t["legendFormat"].as_str().unwrap_or("");
            for part in legend.split("{{").skip(1) {
                let label = part.split("}}").next().unwrap_or("").trim();
                p.check(
                    labels.contains(label),
                    format!("panel {title:?}: legend {{{{{label}}}}} is not a label of `{expr}`"),
                );
            }
        }
    }
    // Every metric has a panel, so a metric added to the code (and to METRICS)
    // shows up on the dashboard too.
    for (metric, ..) in METRICS {
        p.check(used.contains(*metric), format!("no panel shows {metric}"));
    }
    p.finish();
}

// ---------------------------------------------------------------------------
// Reverse proxies and the guide
// ---------------------------------------------------------------------------

/// nginx time ("1h", "3600s", "3600") in seconds.
fn nginx_secs(s: &str) -> Option<u64> {
    let digits: String = s.chars().take_while(char::is_ascii_digit).collect();
    let n: u64 = digits.parse().ok()?;
    Some(
        n * match &s[digits.len()..] {
            "" | "s" => 1,
            "m" => 60,
            "h" => 3600,
            "d" => 86400,
            _ => return None,
        },
    )
}

fn balanced_braces(text: &str) -> bool {
    let mut depth = 0i64;
    for line in text.lines() {
        let code = line.split('#').next().unwrap();
        for c in code.chars() {
            depth += match c {
                '{' => 1,
                '}' => -1,
                _ => 0,
            };
            if depth < 0 {
                return false;
            }
        }
    }
    depth == 0
}

#[test]
fn reverse_proxy_snippets_pass_websockets_and_keep_them_open() {
    let mut p = Problems::new("nginx.conf / Caddyfile");
    let idle = herald_duration_secs(&default_value("ping_interval")).unwrap()
        + herald_duration_secs(&default_value("ping_timeout")).unwrap();

    let nginx = read("nginx.conf");
    p.check(balanced_braces(&nginx), "nginx.conf: unbalanced braces");
    let directives: Vec<Vec<&str>> = nginx
        .lines()
        .map(|l| l.split('#').next().unwrap().trim())
        .filter(|l| l.ends_with(';'))
        .map(|l| l.trim_end_matches(';').split_whitespace().collect())
        .collect();
    let has = |d: &[&str]| directives.iter().any(|x| x.as_slice() == d);
    p.check(
        has(&["proxy_http_version", "1.1"]),
        "nginx.conf: proxy_http_version 1.1 is needed for websockets",
    );
    p.check(
        has(&["proxy_set_header", "Upgrade", "$http_upgrade"]),
        "nginx.conf: Upgrade header not passed",
    );
    p.check(
        directives
            .iter()
            .any(|d| d.len() == 3 && d[0] == "proxy_set_header" && d[1] == "Connection"),
        "nginx.conf: Connection header not set",
    );
    p.check(
        has(&["proxy_buffering", "off"]),
        "nginx.conf: proxy_buffering off is missing",
    );
    p.check(
        nginx.contains("ssl_certificate "),
        "nginx.conf: TLS is not terminated (no ssl_certificate)",
    );
    let read_timeout = directives
        .iter()
        .find(|d| d[0] == "proxy_read_timeout")
        .and_then(|d| d.get(1))
        .and_then(|v| nginx_secs(v));
    p.check(
        read_timeout.is_some_and(|t| t >= 3600 && t > idle),
        format!("nginx.conf: proxy_read_timeout {read_timeout:?} s must be at least 1h (websockets idle between pings)"),
    );

    let caddy = read("Caddyfile");
    p.check(balanced_braces(&caddy), "Caddyfile: unbalanced braces");
    p.check(
        caddy.lines().any(|l| {
            l.trim_start()
                .starts_with(&format!("reverse_proxy 127.0.0.1:{HTTP_PORT}"))
        }),
        format!("Caddyfile: no reverse_proxy to 127.0.0.1:{HTTP_PORT}"),
    );
    p.check(
        caddy.contains("flush_interval -1"),
        "Caddyfile: flush_interval -1 is missing",
    );
    p.finish();
}

#[test]
fn deploy_readme_describes_every_file() {
    let mut p = Problems::new("README.md");
    let readme = read("README.md");
    let mut stack = vec![deploy_dir()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let rel = path
                .strip_prefix(deploy_dir())
                .unwrap()
                .to_string_lossy()
                .to_string();
            let name = path.file_name().unwrap().to_string_lossy().to_string();
            if rel != "README.md" {
                p.check(
                    readme.contains(&name),
                    format!("README.md does not mention {rel}"),
                );
            }
        }
    }
    p.finish();
}
