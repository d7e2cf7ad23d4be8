//! Checks of the deployment files in `deploy/`, without Docker or Kubernetes.
//!
//! They parse each file the way its consumer would (YAML for Kubernetes and
//! Docker Compose, JSON and PromQL for Grafana, TOML for Herald, unit-file
//! syntax for systemd, directives for nginx) and check it against what Herald
//! actually provides: its settings, metric names and labels, health endpoints
//! and default port. When one of those changes in the code, change the tables
//! at the top of this file (a test holds them to `src/config.rs` and
//! `src/metrics.rs`), and these tests point at every deployment file that has
//! to follow.
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

use herald::config::{DefaultValue, Kind, SETTINGS};

/// Settings herald.toml sets to an empty value rather than commenting out:
/// its comment explains the generated key, and `[]` loads as unset.
const WRITTEN_EMPTY: &[(&str, &str)] = &[("endpoint_keys", "[]")];

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
        "herald_receipts_total",
        MetricType::Counter,
        &[(
            "outcome",
            &["delivered", "rejected", "expired", "cancelled", "gone"],
        )],
    ),
    ("herald_receipt_streams", MetricType::Gauge, &[]),
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
    (
        "herald_store_errors_total",
        MetricType::Counter,
        &[("op", &[])],
    ),
    (
        "herald_node_wakeups_sent_total",
        MetricType::Counter,
        &[("result", &["ok", "failed"])],
    ),
    (
        "herald_node_wakeups_received_total",
        MetricType::Counter,
        &[],
    ),
    (
        "herald_node_requests_refused_total",
        MetricType::Counter,
        &[(
            "reason",
            &["bad_signature", "stale", "replayed", "window_full"],
        )],
    ),
    ("herald_node_request_seconds", MetricType::Histogram, &[]),
    ("herald_broadcast_changes_total", MetricType::Counter, &[]),
    ("herald_broadcast_messages_total", MetricType::Counter, &[]),
    (
        "herald_broadcast_subscribed_connections",
        MetricType::Gauge,
        &[],
    ),
    (
        "herald_broadcast_source_errors_total",
        MetricType::Counter,
        &[],
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

/// A setting's kind and its default written as a TOML value (None: no
/// fixed default, the setting is optional), derived from the library's table.
fn setting(key: &str) -> Option<(Kind, Option<String>)> {
    let s = herald::config::setting_named(key)?;
    let written = match s.default {
        DefaultValue::Value(v) => Some(match s.kind {
            Kind::Int | Kind::Count | Kind::Bool => v.to_string(),
            _ => format!("{v:?}"),
        }),
        DefaultValue::Unset | DefaultValue::Derived(_) => WRITTEN_EMPTY
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.to_string()),
    };
    Some((s.kind, written))
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
        Kind::RedisUrls => {
            let urls: Vec<&str> = match v {
                toml::Value::String(s) => s.split(',').map(str::trim).collect(),
                toml::Value::Array(a) => a.iter().map(|u| u.as_str().unwrap_or("")).collect(),
                _ => return bad("redis:// URLs"),
            };
            if !urls.is_empty() && urls.iter().all(|u| redis_host_port(u).is_some()) {
                Ok(())
            } else {
                bad("redis://host:port URLs (comma-separated, or a list)")
            }
        }
        Kind::Int => match v.as_integer() {
            Some(n) if n > 0 => Ok(()),
            _ => bad("a positive integer"),
        },
        Kind::Count => match v.as_integer() {
            Some(n) if n >= 0 => Ok(()),
            _ => bad("a whole number"),
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
        Kind::Tokens => {
            let tokens: Vec<&str> = match v {
                toml::Value::String(s) => s.split(',').map(str::trim).collect(),
                toml::Value::Array(a) => a.iter().map(|t| t.as_str().unwrap_or("")).collect(),
                _ => return bad("bearer tokens"),
            };
            if !tokens.is_empty() && tokens.iter().all(|t| t.len() >= 16) {
                Ok(())
            } else {
                bad("tokens of at least 16 characters (comma-separated, or a list)")
            }
        }
        Kind::Text => match v.as_str() {
            Some(s) if !s.trim().is_empty() => Ok(()),
            _ => bad("text"),
        },
    }
}

/// `host:port` of a `redis://[user:password@]host:port` URL.
fn redis_host_port(url: &str) -> Option<String> {
    let rest = url.strip_prefix("redis://")?;
    let authority = rest.split('/').next()?;
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let (host, port) = host_port.rsplit_once(':')?;
    (!host.is_empty() && port.parse::<u16>().is_ok()).then(|| host_port.to_string())
}

/// The setting a `HERALD_<NAME>` environment variable sets.
fn setting_of_env(name: &str) -> Option<&'static str> {
    let key = name.strip_prefix("HERALD_")?.to_ascii_lowercase();
    SETTINGS.iter().map(|s| s.name).find(|k| *k == key)
}

/// Checks a `HERALD_<NAME>=value` environment variable: a real setting, and
/// a value Herald accepts (read the way the config file's would be).
fn check_env_setting(name: &str, value: &str) -> Result<(), String> {
    let Some(key) = setting_of_env(name) else {
        return Err(format!("{name} is not a Herald setting"));
    };
    let (kind, _) = setting(key).unwrap();
    let v = match kind {
        Kind::Int | Kind::Count => value
            .parse::<i64>()
            .map_or_else(|_| toml::Value::String(value.into()), toml::Value::Integer),
        Kind::Bool => value
            .parse::<bool>()
            .map_or_else(|_| toml::Value::String(value.into()), toml::Value::Boolean),
        Kind::Keys => toml::Value::Array(
            value
                .split(',')
                .map(|k| toml::Value::String(k.trim().into()))
                .collect(),
        ),
        _ => toml::Value::String(value.into()),
    };
    check_setting_value(key, &v).map_err(|e| format!("{name}: {e}"))
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
// The tables above, against the code
// ---------------------------------------------------------------------------

#[test]
fn settings_and_metrics_tables_match_the_code() {
    let mut p = Problems::new("../tests/deploy_files.rs");
    // Settings come from the library's table; what this file derives from it
    // (a default written as TOML) must read back as the code's default.
    for s in SETTINGS {
        let Some((_, Some(_))) = setting(s.name) else {
            continue;
        };
        let ours = match default_value(s.name) {
            toml::Value::String(v) => v,
            toml::Value::Array(a) => a
                .iter()
                .map(|v| v.as_str().unwrap_or("").to_string())
                .collect::<Vec<_>>()
                .join(","),
            other => other.to_string(),
        };
        p.check(
            ours == s.default_text(),
            format!(
                "`{}`: default {ours:?} here, {:?} in src/config.rs",
                s.name,
                s.default_text()
            ),
        );
    }
    p.check(
        WRITTEN_EMPTY.iter().all(|(k, _)| setting(k).is_some()),
        format!("WRITTEN_EMPTY names a setting src/config.rs lacks: {WRITTEN_EMPTY:?}"),
    );

    // Metrics: every one listed here is registered in src/metrics.rs (the
    // same rule for ones only the code has).
    let src = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/metrics.rs"))
        .expect("src/metrics.rs");
    let registered: BTreeSet<String> = src
        .split("\"herald_")
        .skip(1)
        .filter_map(|rest| rest.split('"').next())
        .map(|name| format!("herald_{name}"))
        .collect();
    let listed: BTreeSet<String> = METRICS.iter().map(|(m, ..)| m.to_string()).collect();
    let missing: Vec<&String> = listed.difference(&registered).collect();
    p.check(
        missing.is_empty(),
        format!("METRICS lists {missing:?}, which src/metrics.rs does not register"),
    );
    let unlisted: Vec<&String> = registered.difference(&listed).collect();
    p.check(
        unlisted.is_empty(),
        format!("metrics in src/metrics.rs that deploy/ does not list: {unlisted:?}"),
    );
    p.finish();
}

// ---------------------------------------------------------------------------
// README.md's configuration reference
// ---------------------------------------------------------------------------

/// The rows of README.md's "Configuration reference" table: the settings a
/// row names (`a`, `b` in its first cell) and its default cell, backticks
/// removed.
fn readme_settings_rows(readme: &str) -> Vec<(Vec<String>, String)> {
    let section = readme
        .split("### Configuration reference")
        .nth(1)
        .expect("README.md has a Configuration reference section");
    section
        .lines()
        .skip_while(|l| !l.starts_with("| setting |"))
        .skip(2)
        .take_while(|l| l.starts_with('|'))
        .map(|row| {
            let cells: Vec<&str> = row.split('|').map(str::trim).collect();
            let names = cells[1]
                .split(',')
                .map(|n| n.trim().trim_matches('`').to_string())
                .collect();
            (names, cells[2].replace('`', ""))
        })
        .collect()
}

#[test]
fn readme_configuration_table_matches_the_settings() {
    let mut p = Problems::new("../README.md");
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("README.md");
    let rows = readme_settings_rows(&readme);
    p.check(!rows.is_empty(), "the configuration table has no rows");
    let mut seen = BTreeSet::new();
    for (names, default) in &rows {
        for name in names {
            let Some(s) = herald::config::setting_named(name) else {
                p.add(format!(
                    "`{name}` is in the configuration table but is no setting"
                ));
                continue;
            };
            p.check(
                seen.insert(name.clone()),
                format!("`{name}` is listed twice"),
            );
            p.check(
                *default == s.shown_default(),
                format!(
                    "`{name}`: default {default:?} in README.md, {:?} in src/config.rs",
                    s.shown_default()
                ),
            );
        }
    }
    for s in SETTINGS {
        p.check(
            seen.contains(s.name),
            format!("`{}` is missing from the configuration table", s.name),
        );
    }
    p.finish();
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

    for key in SETTINGS.iter().map(|s| s.name) {
        let (_, default) = setting(key).expect("a setting");
        // Where the setting is: an active `key = ...` line, or, for settings
        // without a default, a commented-out `# key = ...` example.
        let active_line = lines.iter().position(|l| toml_key_of(l) == Some(key));
        let commented_line = lines.iter().position(|l| {
            l.strip_prefix('#')
                .map(str::trim_start)
                .and_then(toml_key_of)
                == Some(key)
        });
        let line = match (&default, active_line, commented_line) {
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
        if let (Some(written), Some(value)) = (&default, active.get(key)) {
            p.check(
                *value == default_value(key),
                format!("`{key}` = {value} in the example, but the default is {written}"),
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

/// Parses every YAML document of a file (an error ends the file).
fn yaml_documents(name: &str, text: &str, p: &mut Problems) -> Vec<Yaml> {
    check_yaml11_booleans(name, text, p);
    let mut docs = Vec::new();
    for doc in serde_yaml_ng::Deserializer::from_str(text) {
        match Yaml::deserialize(doc) {
            Ok(Yaml::Null) => {}
            Ok(v) => docs.push(v),
            // After an error the iterator repeats it forever: stop.
            Err(e) => {
                p.add(format!("{name}: not valid YAML: {e}"));
                break;
            }
        }
    }
    docs
}

fn kubernetes_dir() -> PathBuf {
    deploy_dir().join("kubernetes")
}

/// A path under deploy/kubernetes, as written in messages.
fn kubernetes_rel(path: &Path) -> String {
    let base = kubernetes_dir().canonicalize().unwrap();
    let path = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    path.strip_prefix(&base)
        .map(|r| r.to_string_lossy().to_string())
        .unwrap_or_else(|_| path.to_string_lossy().to_string())
}

fn yaml_files_in(dir: &Path) -> BTreeSet<PathBuf> {
    std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
        .collect()
}

/// What `kubectl apply -k DIR` applies, read the way kustomize reads it:
/// the kustomization's resources, files or directories with their own
/// kustomization (the layouts here use no patches or generators, which this
/// does not model). Returns every document with the file it came from
/// (relative to deploy/kubernetes); `files` collects every file read.
fn kustomize_static(
    dir: &Path,
    p: &mut Problems,
    files: &mut BTreeSet<PathBuf>,
) -> Vec<(String, Yaml)> {
    let kfile = dir.join("kustomization.yaml");
    let rel_dir = kubernetes_rel(dir);
    let Ok(text) = std::fs::read_to_string(&kfile) else {
        p.add(format!("{rel_dir}: no kustomization.yaml"));
        return Vec::new();
    };
    files.insert(kfile.canonicalize().unwrap());
    let kdocs = yaml_documents(&kubernetes_rel(&kfile), &text, p);
    let Some(k) = kdocs.first() else {
        return Vec::new();
    };
    p.check(
        kind_of(k) == "Kustomization" && k["apiVersion"].is_string(),
        format!("{rel_dir}/kustomization.yaml: not a Kustomization with an apiVersion"),
    );
    for unsupported in [
        "patches",
        "patchesStrategicMerge",
        "configMapGenerator",
        "secretGenerator",
        "components",
    ] {
        p.check(
            k[unsupported].is_null(),
            format!("{rel_dir}/kustomization.yaml: `{unsupported}` is not modelled by this test"),
        );
    }
    let mut docs = Vec::new();
    let mut listed = BTreeSet::new();
    for r in seq(&k["resources"]) {
        let Some(r) = r.as_str() else {
            p.add(format!(
                "{rel_dir}/kustomization.yaml: a resource that is not a string"
            ));
            continue;
        };
        let path = dir.join(r);
        if path.is_dir() {
            // kustomize refuses a base that contains the including
            // directory ("cycle detected").
            let (base, this) = (path.canonicalize().unwrap(), dir.canonicalize().unwrap());
            p.check(
                !this.starts_with(&base),
                format!("{rel_dir}/kustomization.yaml: resource {r} contains this directory (kustomize: cycle detected)"),
            );
            if !this.starts_with(&base) {
                docs.extend(kustomize_static(&path, p, files));
            }
        } else if path.is_file() {
            let name = kubernetes_rel(&path);
            listed.insert(path.canonicalize().unwrap());
            files.insert(path.canonicalize().unwrap());
            let text = std::fs::read_to_string(&path).unwrap();
            for doc in yaml_documents(&name, &text, p) {
                docs.push((name.clone(), doc));
            }
        } else {
            p.add(format!(
                "{rel_dir}/kustomization.yaml: resource {r} does not exist"
            ));
        }
    }
    // Every manifest beside the kustomization is one of its resources.
    for f in yaml_files_in(dir) {
        let f = f.canonicalize().unwrap();
        if f.file_name().is_some_and(|n| n == "kustomization.yaml") {
            continue;
        }
        p.check(
            listed.contains(&f),
            format!(
                "{}: not listed in {rel_dir}/kustomization.yaml",
                kubernetes_rel(&f)
            ),
        );
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

/// Whether a `matchLabels` selector picks pods with these labels.
fn selects(match_labels: &Yaml, pod_labels: &Yaml) -> bool {
    match_labels.as_mapping().is_some_and(|sel| {
        !sel.is_empty()
            && sel
                .iter()
                .all(|(k, v)| pod_labels[k.as_str().unwrap_or("")] == *v)
    })
}

/// One request path under each of the router's public prefixes, and the
/// websocket path: what every proxy and Ingress must pass to Herald. Taken
/// from the server's own router, so a new public route cannot be forgotten.
fn public_request_paths() -> Vec<String> {
    let mut paths = vec![herald::server::WEBSOCKET_PATH.to_string()];
    for prefix in herald::server::PUBLIC_PATH_PREFIXES {
        assert!(prefix.starts_with('/') && prefix.ends_with('/'), "{prefix}");
        paths.push(format!("{prefix}v1/some-token"));
    }
    paths
}

/// Whether an Ingress rule's paths send `request_path` to a backend
/// (Kubernetes path matching: Exact, or Prefix by whole path elements).
fn ingress_routes(rule: &Yaml, request_path: &str) -> bool {
    seq(&rule["http"]["paths"]).iter().any(|path| {
        let p = path["path"].as_str().unwrap_or("/");
        match path["pathType"].as_str() {
            Some("Exact") => p == request_path,
            _ => {
                let prefix: Vec<&str> = p.split('/').filter(|s| !s.is_empty()).collect();
                let req: Vec<&str> = request_path.split('/').filter(|s| !s.is_empty()).collect();
                req.len() >= prefix.len() && req[..prefix.len()] == prefix[..]
            }
        }
    })
}

/// The parts of a Herald workload the layout-specific checks look at.
struct Workload {
    spec: Yaml,
    pod: Yaml,
    pod_labels: Yaml,
    container: Yaml,
    /// herald.toml of the ConfigMap mounted as --config.
    config: toml::Table,
    /// Volume claim templates (StatefulSet only).
    claims: BTreeSet<String>,
}

impl Workload {
    fn env(&self, name: &str) -> Option<&Yaml> {
        seq(&self.container["env"])
            .iter()
            .find(|e| e["name"].as_str() == Some(name))
    }
    fn env_value(&self, name: &str) -> Option<&str> {
        self.env(name).and_then(|e| e["value"].as_str())
    }
    fn args(&self) -> Vec<&str> {
        seq(&self.container["args"])
            .iter()
            .filter_map(|a| a.as_str())
            .collect()
    }
    fn flag(&self, name: &str) -> Option<&str> {
        let args = self.args();
        args.windows(2).find(|w| w[0] == name).map(|w| w[1])
    }
    /// A string setting as Herald would see it: the environment beats the
    /// file, which beats the default.
    fn setting(&self, key: &str) -> Option<String> {
        self.env_value(&format!("HERALD_{}", key.to_ascii_uppercase()))
            .map(String::from)
            .or_else(|| {
                self.config
                    .get(key)
                    .and_then(|v| v.as_str())
                    .map(String::from)
            })
            .or_else(|| {
                setting(key)
                    .and_then(|(_, d)| d)
                    .and_then(|_| default_value(key).as_str().map(String::from))
            })
    }
}

/// Seconds a container's preStop hook sleeps (`sleep N` or the sleep action).
fn pre_stop_secs(container: &Yaml) -> i64 {
    let hook = &container["lifecycle"]["preStop"];
    if let Some(s) = hook["sleep"]["seconds"].as_i64() {
        return s;
    }
    let cmd: Vec<&str> = seq(&hook["exec"]["command"])
        .iter()
        .filter_map(|c| c.as_str())
        .collect();
    match cmd.as_slice() {
        [sleep, n] if sleep.ends_with("sleep") => n.parse().unwrap_or(0),
        _ => 0,
    }
}

/// Checks every layout makes alike: the kinds, the one Herald workload of
/// `kind`, its pod, container, config, probes, Services and Ingress.
fn check_herald_layout(docs: &[(String, Yaml)], kind: &str, p: &mut Problems) -> Option<Workload> {
    let by_kind = |k: &str| -> Vec<&Yaml> {
        docs.iter()
            .map(|(_, d)| d)
            .filter(|d| kind_of(d) == k)
            .collect()
    };
    let mut seen = BTreeSet::new();
    for (file, doc) in docs {
        let k = kind_of(doc);
        p.check(
            [
                "StatefulSet",
                "Deployment",
                "PodDisruptionBudget",
                "Service",
                "ConfigMap",
                "Ingress",
            ]
            .contains(&k),
            format!("{file}: unexpected kind {k:?}"),
        );
        p.check(
            doc["apiVersion"].is_string(),
            format!("{file}: {k} has no apiVersion"),
        );
        p.check(
            !name_of(doc).is_empty(),
            format!("{file}: {k} has no metadata.name"),
        );
        p.check(
            seen.insert((k.to_string(), name_of(doc).to_string())),
            format!("{file}: a second {k} named {:?}", name_of(doc)),
        );
        check_string_map(&format!("{file}: {k} label"), &doc["metadata"]["labels"], p);
        check_string_map(
            &format!("{file}: {k} annotation"),
            &doc["metadata"]["annotations"],
            p,
        );
    }
    for other in ["StatefulSet", "Deployment"].iter().filter(|k| **k != kind) {
        p.check(
            by_kind(other).is_empty(),
            format!("a {other} beside the {kind}: one workload per layout"),
        );
    }
    let workloads = by_kind(kind);
    p.check(
        workloads.len() == 1,
        format!("expected one {kind}, found {}", workloads.len()),
    );
    let w = *workloads.first()?;
    let spec = w["spec"].clone();
    let pod = spec["template"]["spec"].clone();
    let pod_labels = spec["template"]["metadata"]["labels"].clone();
    check_string_map("pod template label", &pod_labels, p);
    check_string_map(
        "pod template annotation",
        &spec["template"]["metadata"]["annotations"],
        p,
    );
    p.check(
        selects(&spec["selector"]["matchLabels"], &pod_labels),
        format!("{kind} selector.matchLabels does not match the pod labels"),
    );
    let Some(c) = seq(&pod["containers"])
        .iter()
        .find(|c| c["name"].as_str() == Some("herald"))
        .cloned()
    else {
        p.add("no container named herald");
        return None;
    };

    // Arguments: serve, config from a ConfigMap mount, listen on the HTTP
    // port.
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
    let configmaps = by_kind("ConfigMap");
    let mut config = toml::Table::new();
    match flag("--config") {
        None => p.add("args lack --config (the ConfigMap's herald.toml)"),
        Some(cfg) => {
            let (dir, file) = cfg.rsplit_once('/').unwrap_or(("", cfg));
            let volume = mount_of(dir).and_then(|m| m["name"].as_str());
            let source = seq(&pod["volumes"])
                .iter()
                .find(|v| v["name"].as_str() == volume);
            let cm_name = source.and_then(|v| v["configMap"]["name"].as_str());
            match configmaps
                .iter()
                .find(|cm| Some(name_of(cm)) == cm_name && cm["data"][file].is_string())
            {
                Some(cm) => {
                    config = check_herald_toml(
                        cm["data"][file].as_str().unwrap(),
                        p,
                        &format!("ConfigMap {} {file}", name_of(cm)),
                    )
                }
                None => p.add(format!(
                    "--config {cfg}: no ConfigMap with key {file} is mounted at {dir}"
                )),
            }
        }
    }
    let claims: BTreeSet<String> = seq(&spec["volumeClaimTemplates"])
        .iter()
        .filter_map(|t| t["metadata"]["name"].as_str().map(String::from))
        .collect();
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

    // Graceful shutdown (after any preStop pause) fits in the grace period.
    let grace = pod["terminationGracePeriodSeconds"].as_i64();
    let stop = shutdown_timeout_secs(&config) as i64 + pre_stop_secs(&c);
    p.check(
        grace.is_some_and(|g| g > stop),
        format!(
            "terminationGracePeriodSeconds {grace:?} must exceed preStop + shutdown_timeout ({stop} s)"
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

    // Environment: strings or references; every HERALD_* is a setting with a
    // value Herald accepts (values built from $(VAR) are checked per layout).
    for e in seq(&c["env"]) {
        let name = e["name"].as_str().unwrap_or("");
        p.check(
            e["value"].is_string() || e["valueFrom"].is_mapping(),
            format!("env {name:?}: value must be a string"),
        );
        if name.starts_with("HERALD_") {
            match e["value"].as_str() {
                Some(v) if !v.contains("$(") => {
                    if let Err(err) = check_env_setting(name, v) {
                        p.add(format!("env {err}"));
                    }
                }
                _ => p.check(
                    setting_of_env(name).is_some(),
                    format!("env {name} is not a Herald setting"),
                ),
            }
        }
    }
    let public_url = seq(&c["env"])
        .iter()
        .find(|e| e["name"].as_str() == Some("HERALD_PUBLIC_URL"))
        .and_then(|e| e["value"].as_str())
        .map(String::from);
    p.check(
        public_url
            .as_deref()
            .is_some_and(|u| u.starts_with("https://")),
        format!("env HERALD_PUBLIC_URL {public_url:?} must be set to an https:// URL"),
    );

    // Ports and probes.
    p.check(
        seq(&c["ports"])
            .iter()
            .any(|cp| cp["containerPort"].as_i64() == Some(HTTP_PORT)),
        format!("no containerPort {HTTP_PORT}"),
    );
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
            resolve_port(&get["port"], &c) == Some(HTTP_PORT),
            format!("{probe} port {:?} is not {HTTP_PORT}", get["port"]),
        );
    }

    // Services select the pods and target their ports.
    let services = by_kind("Service");
    p.check(!services.is_empty(), "no Service");
    for s in &services {
        p.check(
            selects(&s["spec"]["selector"], &pod_labels),
            format!("Service {} does not select the Herald pods", name_of(s)),
        );
        for port in seq(&s["spec"]["ports"]) {
            let target = if port["targetPort"].is_null() {
                &port["port"]
            } else {
                &port["targetPort"]
            };
            p.check(
                resolve_port(target, &c).is_some_and(|n| {
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

    // The Ingress: for the public URL's host, to Service ports that exist,
    // with TLS, and only for the public paths.
    for ing in by_kind("Ingress") {
        for rule in seq(&ing["spec"]["rules"]) {
            if let Some(url) = &public_url {
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
                p.check(
                    ["Exact", "Prefix"].contains(&path["pathType"].as_str().unwrap_or("")),
                    format!(
                        "Ingress path {:?}: pathType must be Exact or Prefix (ImplementationSpecific differs between controllers)",
                        path["path"]
                    ),
                );
            }
            for public in public_request_paths() {
                p.check(
                    ingress_routes(rule, &public),
                    format!("Ingress does not route {public}, a public path of Herald's router (herald::server::PUBLIC_PATH_PREFIXES)"),
                );
            }
            for private in ["/_herald/node/wake", "/_herald/node/evict", "/metrics"] {
                p.check(
                    !ingress_routes(rule, private),
                    format!("Ingress routes {private}, which must stay private"),
                );
            }
        }
        p.check(
            !seq(&ing["spec"]["tls"]).is_empty(),
            "Ingress has no tls section (Firefox needs wss://)",
        );
    }
    Some(Workload {
        spec,
        pod,
        pod_labels,
        container: c,
        config,
        claims,
    })
}

/// `kubectl kustomize DIR`, when kubectl is installed: the documents
/// kustomize itself builds, or a problem.
fn kubectl_kustomize(dir: &Path, p: &mut Problems) -> Option<Vec<Yaml>> {
    let out = match Command::new("kubectl").arg("kustomize").arg(dir).output() {
        Ok(out) => out,
        Err(_) => {
            println!(
                "note: kubectl not found; skipped `kubectl kustomize {}`",
                kubernetes_rel(dir)
            );
            return None;
        }
    };
    if !out.status.success() {
        p.add(format!(
            "kubectl kustomize {}: {}",
            kubernetes_rel(dir),
            String::from_utf8_lossy(&out.stderr)
        ));
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    Some(yaml_documents("kubectl kustomize output", &text, p))
}

/// kustomize's build has the same objects as `kustomize_static`, each with
/// the common labels.
fn compare_with_kustomize(dir: &Path, docs: &[(String, Yaml)], p: &mut Problems) {
    let Some(built) = kubectl_kustomize(dir, p) else {
        return;
    };
    let ids = |d: &Yaml| (kind_of(d).to_string(), name_of(d).to_string());
    let ours: BTreeSet<_> = docs.iter().map(|(_, d)| ids(d)).collect();
    let theirs: BTreeSet<_> = built.iter().map(ids).collect();
    p.check(
        ours == theirs,
        format!(
            "kubectl kustomize {} builds {theirs:?}, expected {ours:?}",
            kubernetes_rel(dir)
        ),
    );
    for d in &built {
        p.check(
            d["metadata"]["labels"]["app.kubernetes.io/part-of"].as_str() == Some("herald"),
            format!(
                "kubectl kustomize {}: {} {} lacks the label app.kubernetes.io/part-of",
                kubernetes_rel(dir),
                kind_of(d),
                name_of(d)
            ),
        );
    }
}

#[test]
fn kubernetes_manifests_are_consistent() {
    let mut p = Problems::new("kubernetes/");
    let mut files = BTreeSet::new();
    let single = kustomize_static(&kubernetes_dir(), &mut p, &mut files);
    let redis = kustomize_static(&kubernetes_dir().join("redis"), &mut p, &mut files);
    // Every manifest belongs to one of the two layouts.
    let mut stack = vec![kubernetes_dir()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if matches!(
                path.extension().and_then(|e| e.to_str()),
                Some("yaml" | "yml")
            ) {
                p.check(
                    files.contains(&path.canonicalize().unwrap()),
                    format!(
                        "{}: part of neither `kubectl apply -k deploy/kubernetes` nor deploy/kubernetes/redis",
                        kubernetes_rel(&path)
                    ),
                );
            }
        }
    }
    compare_with_kustomize(&kubernetes_dir(), &single, &mut p);
    compare_with_kustomize(&kubernetes_dir().join("redis"), &redis, &mut p);
    p.finish();
}

#[test]
fn kubernetes_single_node_is_one_statefulset_pod_with_a_volume() {
    let mut p = Problems::new("kubernetes/ (one node on RocksDB)");
    let docs = kustomize_static(&kubernetes_dir(), &mut p, &mut BTreeSet::new());
    let Some(w) = check_herald_layout(&docs, "StatefulSet", &mut p) else {
        p.finish();
        return;
    };
    p.check(
        w.spec["replicas"].as_i64() == Some(1),
        "replicas must be 1: each Herald on RocksDB keeps its own local store, replicas would not share user agents",
    );
    p.check(
        w.setting("store").as_deref() == Some("rocksdb"),
        "the single-node layout must keep the embedded store (store = \"rocksdb\")",
    );
    p.check(
        w.pod["securityContext"]["fsGroup"].as_i64().is_some(),
        "pod securityContext.fsGroup is missing: the volume may not be writable",
    );
    p.check(
        !w.claims.is_empty(),
        "StatefulSet has no volumeClaimTemplates",
    );
    let mounts = seq(&w.container["volumeMounts"]);
    match w
        .flag("--data-dir")
        .and_then(|d| mounts.iter().find(|m| m["mountPath"].as_str() == Some(d)))
    {
        Some(m) => p.check(
            w.claims.contains(m["name"].as_str().unwrap_or("")),
            format!(
                "--data-dir is mounted from {:?}, not from a volumeClaimTemplate",
                m["name"]
            ),
        ),
        None => p.add(format!(
            "--data-dir {:?} is not a volumeMount of the container",
            w.flag("--data-dir")
        )),
    }
    // The StatefulSet's governing Service is headless.
    let governing = w.spec["serviceName"].as_str().unwrap_or("");
    p.check(
        docs.iter().any(|(_, s)| {
            kind_of(s) == "Service"
                && name_of(s) == governing
                && s["spec"]["clusterIP"].as_str() == Some("None")
        }),
        format!("serviceName {governing:?} is not a headless Service"),
    );
    p.finish();
}

#[test]
fn kubernetes_redis_layout_runs_three_stateless_nodes() {
    let mut p = Problems::new("kubernetes/redis/ (several nodes on Redis)");
    let docs = kustomize_static(
        &kubernetes_dir().join("redis"),
        &mut p,
        &mut BTreeSet::new(),
    );
    let Some(w) = check_herald_layout(&docs, "Deployment", &mut p) else {
        p.finish();
        return;
    };
    let replicas = w.spec["replicas"].as_i64().unwrap_or(1);
    p.check(replicas == 3, format!("replicas {replicas}: want 3 nodes"));

    // Stateless: no claims, no persistent volumes.
    p.check(
        seq(&w.pod["volumes"])
            .iter()
            .all(|v| v["persistentVolumeClaim"].is_null()),
        "a persistentVolumeClaim volume: nodes on Redis keep nothing locally",
    );

    // Redis mode, with its required settings.
    p.check(
        w.setting("store").as_deref() == Some("redis"),
        "store is not \"redis\" (HERALD_STORE or herald.toml)",
    );
    p.check(
        w.config.contains_key("redis_url") || w.env("HERALD_REDIS_URL").is_some(),
        "no redis_url in herald.toml or the environment",
    );
    // Some(optional) when the variable comes from a Secret.
    let secret_ref = |name: &str| -> Option<bool> {
        let r = &w.env(name)?["valueFrom"]["secretKeyRef"];
        r["name"].as_str()?;
        Some(r["optional"].as_bool().unwrap_or(false))
    };
    match secret_ref("HERALD_ENDPOINT_KEYS") {
        Some(optional) => p.check(
            !optional,
            "HERALD_ENDPOINT_KEYS must not be optional: Herald refuses to start in redis mode without it",
        ),
        None => p.add("HERALD_ENDPOINT_KEYS must come from a Secret (secretKeyRef): every node needs the same key, and it is a secret"),
    }
    p.check(
        !w.config.contains_key("endpoint_keys"),
        "endpoint_keys in a ConfigMap: keep the key in a Secret",
    );
    if w.env("HERALD_REDIS_URL").is_some() {
        p.check(
            secret_ref("HERALD_REDIS_URL").is_some(),
            "HERALD_REDIS_URL must come from a Secret (it may hold a password)",
        );
    }

    // node_url: this pod's own IP (downward API) and the --listen port.
    let env = seq(&w.container["env"]);
    match w.env_value("HERALD_NODE_URL") {
        None => p.add(
            "HERALD_NODE_URL is not set: the default http://0.0.0.0:8080 reaches no other node",
        ),
        Some(url) => {
            let mut expanded = url.to_string();
            let position = |name: &str| env.iter().position(|e| e["name"].as_str() == Some(name));
            let own = position("HERALD_NODE_URL").unwrap();
            for part in url.split("$(").skip(1) {
                let var = part.split(')').next().unwrap_or("");
                let field = position(var).map(|i| &env[i]["valueFrom"]["fieldRef"]["fieldPath"]);
                p.check(
                    position(var).is_some_and(|i| i < own),
                    format!("HERALD_NODE_URL uses $({var}), which is not defined before it (Kubernetes expands only earlier variables)"),
                );
                p.check(
                    field.and_then(|f| f.as_str()) == Some("status.podIP"),
                    format!(
                        "$({var}) in HERALD_NODE_URL must be the pod IP (fieldRef status.podIP)"
                    ),
                );
                expanded = expanded.replace(&format!("$({var})"), "10.1.2.3");
            }
            p.check(
                url.contains("$("),
                format!("HERALD_NODE_URL {url:?} must name the pod's own IP ($(POD_IP)), not a shared address"),
            );
            match check_env_setting("HERALD_NODE_URL", &expanded) {
                Err(e) => p.add(e),
                Ok(()) => {
                    let port = expanded
                        .trim_start_matches("http://")
                        .trim_start_matches("https://")
                        .split('/')
                        .next()
                        .and_then(|a| a.rsplit_once(':'))
                        .and_then(|(_, port)| port.parse::<i64>().ok());
                    p.check(
                        port == w.flag("--listen").and_then(port_of),
                        format!("HERALD_NODE_URL {url:?}: port is not the --listen port"),
                    );
                }
            }
        }
    }

    // Spread over machines, sized, and updated without losing capacity.
    let anti =
        seq(&w.pod["affinity"]["podAntiAffinity"]
            ["preferredDuringSchedulingIgnoredDuringExecution"])
        .iter()
        .map(|t| &t["podAffinityTerm"])
        .chain(seq(
            &w.pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        ));
    let mut spread = false;
    for term in anti {
        spread |= term["topologyKey"].as_str() == Some("kubernetes.io/hostname")
            && selects(&term["labelSelector"]["matchLabels"], &w.pod_labels);
    }
    p.check(
        spread,
        "no podAntiAffinity on kubernetes.io/hostname selecting the Herald pods: replicas may share a machine",
    );
    for c in seq(&w.pod["topologySpreadConstraints"]) {
        p.check(
            selects(&c["labelSelector"]["matchLabels"], &w.pod_labels),
            "a topologySpreadConstraint that does not select the Herald pods",
        );
    }
    for r in ["cpu", "memory"] {
        p.check(
            !w.container["resources"]["requests"][r].is_null(),
            format!("resources.requests.{r} is missing"),
        );
    }
    p.check(
        w.container["resources"]["limits"]["cpu"].is_null(),
        "a CPU limit: throttling delays every websocket at once",
    );
    p.check(
        w.spec["strategy"]["rollingUpdate"]["maxUnavailable"].as_i64() == Some(0),
        "strategy.rollingUpdate.maxUnavailable must be 0: start a new node before stopping an old one",
    );
    let pdbs: Vec<&Yaml> = docs
        .iter()
        .map(|(_, d)| d)
        .filter(|d| kind_of(d) == "PodDisruptionBudget")
        .collect();
    p.check(pdbs.len() == 1, "expected one PodDisruptionBudget");
    for pdb in pdbs {
        p.check(
            selects(&pdb["spec"]["selector"]["matchLabels"], &w.pod_labels),
            "the PodDisruptionBudget does not select the Herald pods",
        );
        let allows = pdb["spec"]["maxUnavailable"]
            .as_i64()
            .or_else(|| pdb["spec"]["minAvailable"].as_i64().map(|m| replicas - m));
        p.check(
            allows.is_some_and(|n| n >= 1 && n < replicas),
            format!("the PodDisruptionBudget allows {allows:?} pods down: want at least 1 and fewer than {replicas}"),
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

/// nginx directives (`name args...;`), comments dropped.
fn nginx_directives(text: &str) -> Vec<Vec<&str>> {
    text.lines()
        .map(|l| l.split('#').next().unwrap().trim())
        .filter(|l| l.ends_with(';'))
        .map(|l| l.trim_end_matches(';').split_whitespace().collect())
        .collect()
}

/// nginx blocks opened by a line starting with `word` (`location`,
/// `upstream`): the words before `{`, and the directives inside.
fn nginx_blocks<'a>(text: &'a str, word: &str) -> Vec<(Vec<&'a str>, Vec<Vec<&'a str>>)> {
    let lines: Vec<&str> = text
        .lines()
        .map(|l| l.split('#').next().unwrap().trim())
        .collect();
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let Some(head) = line.strip_suffix('{') else {
            continue;
        };
        let head: Vec<&str> = head.split_whitespace().collect();
        if head.first() != Some(&word) {
            continue;
        }
        let mut depth = 0i64;
        let mut body = Vec::new();
        for (j, l) in lines.iter().enumerate().skip(i) {
            if j > i && depth == 1 && l.ends_with(';') {
                body.push(l.trim_end_matches(';').split_whitespace().collect());
            }
            depth += l.matches('{').count() as i64 - l.matches('}').count() as i64;
            if depth <= 0 {
                break;
            }
        }
        out.push((head, body));
    }
    out
}

/// What every nginx file in front of Herald needs for websockets and pushes,
/// and its refusal of the node-to-node paths.
/// The location nginx picks for `path`: an exact `=` match, else the
/// longest prefix; regex locations are not used in deploy/ and are refused
/// here rather than modelled.
fn nginx_location<'a, 'b>(
    locations: &'b [(Vec<&'a str>, Vec<Vec<&'a str>>)],
    path: &str,
) -> Option<&'b (Vec<&'a str>, Vec<Vec<&'a str>>)> {
    if let Some(exact) = locations
        .iter()
        .find(|(head, _)| head.len() == 3 && head[1] == "=" && head[2] == path)
    {
        return Some(exact);
    }
    locations
        .iter()
        .filter_map(|l| {
            let prefix = match l.0.as_slice() {
                [_, prefix] => *prefix,
                [_, "^~", prefix] => *prefix,
                _ => return None,
            };
            path.starts_with(prefix).then_some((prefix.len(), l))
        })
        .max_by_key(|(len, _)| *len)
        .map(|(_, l)| l)
}

fn check_nginx_proxy(file: &str, text: &str, p: &mut Problems) {
    let idle = herald_duration_secs(&default_value("ping_interval")).unwrap()
        + herald_duration_secs(&default_value("ping_timeout")).unwrap();
    p.check(balanced_braces(text), format!("{file}: unbalanced braces"));
    let directives = nginx_directives(text);
    let has = |d: &[&str]| directives.iter().any(|x| x.as_slice() == d);
    p.check(
        has(&["proxy_http_version", "1.1"]),
        format!("{file}: proxy_http_version 1.1 is needed for websockets"),
    );
    p.check(
        has(&["proxy_set_header", "Upgrade", "$http_upgrade"]),
        format!("{file}: Upgrade header not passed"),
    );
    p.check(
        directives
            .iter()
            .any(|d| d.len() == 3 && d[0] == "proxy_set_header" && d[1] == "Connection"),
        format!("{file}: Connection header not set"),
    );
    p.check(
        has(&["proxy_buffering", "off"]),
        format!("{file}: proxy_buffering off is missing"),
    );
    let read_timeout = directives
        .iter()
        .find(|d| d[0] == "proxy_read_timeout")
        .and_then(|d| d.get(1))
        .and_then(|v| nginx_secs(v));
    p.check(
        read_timeout.is_some_and(|t| t >= 3600 && t > idle),
        format!("{file}: proxy_read_timeout {read_timeout:?} s must be at least 1h (websockets idle between pings)"),
    );
    // /_herald/ (node-to-node wake-ups and evictions) is refused, by a
    // location regexes cannot override.
    let locations = nginx_blocks(text, "location");
    let refuses = |d: &Vec<&str>| {
        (d.first() == Some(&"return") && d.get(1).is_some_and(|s| s.starts_with('4')))
            || d.as_slice() == ["deny", "all"]
    };
    p.check(
        locations.iter().any(|(head, body)| {
            head.len() == 3
                && ["^~", "="].contains(&head[1])
                && head[2].starts_with("/_herald")
                && body.iter().any(refuses)
        }),
        format!("{file}: no `location ^~ /_herald/ {{ return 404; }}`: the node-to-node paths must not be reachable through the proxy"),
    );
    p.check(
        locations.iter().any(|(head, body)| {
            head.get(1) == Some(&"=")
                && head.get(2) == Some(&"/metrics")
                && body.iter().any(refuses)
        }),
        format!("{file}: /metrics is not refused"),
    );
    p.check(
        locations
            .iter()
            .all(|(head, _)| !head.iter().any(|w| w.starts_with('~'))),
        format!("{file}: regex locations are not checked by this test; use prefix locations"),
    );
    for public in public_request_paths() {
        let proxied = nginx_location(&locations, &public).is_some_and(|(_, body)| {
            body.iter().any(|d| d.first() == Some(&"proxy_pass")) && !body.iter().any(refuses)
        });
        p.check(
            proxied,
            format!("{file}: {public} (a public path of Herald's router) is not proxied to Herald"),
        );
    }
}

#[test]
fn reverse_proxy_snippets_pass_websockets_and_keep_them_open() {
    let mut p = Problems::new("nginx.conf / nginx-cluster.conf / Caddyfile");
    let nginx = read("nginx.conf");
    check_nginx_proxy("nginx.conf", &nginx, &mut p);
    p.check(
        nginx.contains("ssl_certificate "),
        "nginx.conf: TLS is not terminated (no ssl_certificate)",
    );
    p.check(
        nginx_blocks(&nginx, "upstream")
            .iter()
            .flat_map(|(_, body)| body)
            .any(|d| {
                d.first() == Some(&"server")
                    && d.get(1) == Some(&format!("127.0.0.1:{HTTP_PORT}").as_str())
            }),
        format!("nginx.conf: no upstream server 127.0.0.1:{HTTP_PORT}"),
    );

    // The cluster file is a whole nginx.conf spreading over several nodes.
    let cluster = read("nginx-cluster.conf");
    check_nginx_proxy("nginx-cluster.conf", &cluster, &mut p);
    let top = nginx_directives(&cluster);
    let limit = top
        .iter()
        .find(|d| d[0] == "worker_rlimit_nofile")
        .and_then(|d| d.get(1)?.parse::<u64>().ok());
    let per_worker = top
        .iter()
        .find(|d| d[0] == "worker_connections")
        .and_then(|d| d.get(1)?.parse::<u64>().ok());
    p.check(
        per_worker.is_some_and(|w| w > 1024) && limit.is_some_and(|l| Some(l) >= per_worker),
        format!("nginx-cluster.conf: worker_connections {per_worker:?} must exceed nginx's default 1024 (two sockets per websocket) and fit in worker_rlimit_nofile {limit:?}"),
    );
    let upstreams = nginx_blocks(&cluster, "upstream");
    let servers: Vec<&str> = upstreams
        .iter()
        .flat_map(|(_, body)| body)
        .filter(|d| d.first() == Some(&"server"))
        .filter_map(|d| d.get(1).copied())
        .collect();
    p.check(
        servers.len() >= 2,
        format!("nginx-cluster.conf: upstream servers {servers:?}: want several nodes"),
    );
    for (head, _) in &upstreams {
        let name = head.get(1).copied().unwrap_or("");
        p.check(
            top.iter().any(|d| {
                d[0] == "proxy_pass" && d.get(1) == Some(&format!("http://{name}").as_str())
            }),
            format!("nginx-cluster.conf: upstream {name} is not proxied to"),
        );
    }

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
    p.check(
        caddy
            .lines()
            .any(|l| l.trim() == "respond /_herald/* 404" || l.trim() == "respond /_herald/* 403"),
        "Caddyfile: /_herald/* is not refused (respond /_herald/* 404)",
    );
    // Caddy sends everything to reverse_proxy except what a `respond`
    // answers first.
    for public in public_request_paths() {
        let refused_by = caddy.lines().map(str::trim).find(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            words.first() == Some(&"respond")
                && words.get(1).is_some_and(|m| match m.strip_suffix('*') {
                    Some(prefix) => public.starts_with(prefix),
                    None => *m == public,
                })
        });
        p.check(
            refused_by.is_none(),
            format!("Caddyfile: {public} (a public path of Herald's router) is refused by {refused_by:?}"),
        );
    }
    p.finish();
}

// ---------------------------------------------------------------------------
// Docker Compose: several nodes on a Redis Cluster
// ---------------------------------------------------------------------------

/// Compose's interpolation of `$$`, `${NAME:-default}`, `${NAME-default}`,
/// `${NAME:?message}`, `${NAME}` and `$NAME`, with every variable unset (as
/// on a machine with no .env): defaults apply, a required one becomes
/// `<NAME>` and is recorded in `required`.
fn compose_interpolate(s: &str, required: &mut BTreeSet<String>) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(r) = after.strip_prefix('$') {
            out.push('$');
            rest = r;
        } else if let Some(r) = after.strip_prefix('{') {
            let end = r.find('}').unwrap_or(r.len());
            let inner = &r[..end];
            let name_end = inner
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(inner.len());
            let (name, op) = inner.split_at(name_end);
            if let Some(default) = op.strip_prefix(":-").or_else(|| op.strip_prefix('-')) {
                out.push_str(default);
            } else if op.starts_with(":?") || op.starts_with('?') {
                required.insert(name.to_string());
                out.push_str(&format!("<{name}>"));
            }
            rest = r.get(end + 1..).unwrap_or("");
        } else {
            let name_end = after
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(after.len());
            rest = &after[name_end..];
        }
    }
    out.push_str(rest);
    out
}

/// A Compose file's value with every string interpolated.
fn compose_interpolate_all(v: &Yaml, required: &mut BTreeSet<String>) -> Yaml {
    match v {
        Yaml::String(s) => Yaml::String(compose_interpolate(s, required)),
        Yaml::Sequence(items) => Yaml::Sequence(
            items
                .iter()
                .map(|i| compose_interpolate_all(i, required))
                .collect(),
        ),
        Yaml::Mapping(m) => Yaml::Mapping(
            m.iter()
                .map(|(k, v)| (k.clone(), compose_interpolate_all(v, required)))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// A service's command as words (list form, or a string split on spaces).
fn compose_words(v: &Yaml) -> Vec<String> {
    match v {
        Yaml::String(s) => s.split_whitespace().map(String::from).collect(),
        _ => seq(v)
            .iter()
            .map(|w| match w {
                Yaml::String(s) => s.clone(),
                Yaml::Number(n) => n.to_string(),
                Yaml::Bool(b) => b.to_string(),
                _ => String::new(),
            })
            .collect(),
    }
}

/// A service's environment as name → value (map or `NAME=value` list).
fn compose_env(service: &Yaml) -> BTreeMap<String, String> {
    let env = &service["environment"];
    if let Some(list) = env.as_sequence() {
        return list
            .iter()
            .filter_map(|e| e.as_str()?.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
    }
    env.as_mapping()
        .map(|m| {
            m.iter()
                .map(|(k, v)| {
                    let v = match v {
                        Yaml::String(s) => s.clone(),
                        Yaml::Number(n) => n.to_string(),
                        Yaml::Bool(b) => b.to_string(),
                        _ => String::new(),
                    };
                    (k.as_str().unwrap_or("").to_string(), v)
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Compose duration ("30s", "1m30s", "500ms") in seconds.
fn compose_secs(s: &str) -> Option<f64> {
    let mut total = 0.0;
    let mut rest = s.trim();
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let n: f64 = rest[..digits].parse().ok()?;
        let unit_end = rest[digits..]
            .find(|c: char| c.is_ascii_digit())
            .map_or(rest.len(), |i| digits + i);
        total += n * match &rest[digits..unit_end] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 0.001,
            _ => return None,
        };
        rest = &rest[unit_end..];
    }
    Some(total)
}

fn ipv4(s: &str) -> Option<u32> {
    s.parse::<std::net::Ipv4Addr>().ok().map(u32::from)
}

/// Whether `addr` is inside `cidr` ("a.b.c.d/n").
fn in_cidr(addr: u32, cidr: &str) -> bool {
    let Some((net, bits)) = cidr.split_once('/') else {
        return false;
    };
    let (Some(net), Ok(bits)) = (ipv4(net), bits.parse::<u32>()) else {
        return false;
    };
    let mask = if bits == 0 {
        0
    } else {
        u32::MAX << (32 - bits.min(32))
    };
    addr & mask == net & mask
}

/// The value after `flag` in a word list.
fn word_after<'a>(words: &'a [String], flag: &str) -> Option<&'a str> {
    words
        .windows(2)
        .find(|w| w[0] == flag)
        .map(|w| w[1].as_str())
}

#[test]
fn docker_compose_cluster_is_consistent() {
    let mut p = Problems::new("docker-compose.cluster.yml");
    let text = read("docker-compose.cluster.yml");
    check_yaml11_booleans("docker-compose.cluster.yml", &text, &mut p);
    let mut raw: Yaml = match serde_yaml_ng::from_str(&text) {
        Ok(v) => v,
        Err(e) => panic!("deploy/docker-compose.cluster.yml is not valid YAML: {e}"),
    };
    if let Err(e) = raw.apply_merge() {
        p.add(format!("YAML merge keys (<<): {e}"));
    }
    // Top-level keys Compose knows (x-* are extensions).
    if let Some(m) = raw.as_mapping() {
        for k in m.keys().filter_map(|k| k.as_str()) {
            p.check(
                k.starts_with("x-")
                    || [
                        "name", "services", "networks", "volumes", "secrets", "configs",
                    ]
                    .contains(&k),
                format!("unknown top-level key {k:?}"),
            );
        }
    }
    let mut required = BTreeSet::new();
    let doc = compose_interpolate_all(&raw, &mut required);
    let Some(services) = doc["services"].as_mapping() else {
        p.add("no services");
        p.finish();
        return;
    };
    let service_names: BTreeSet<&str> = services.keys().filter_map(|k| k.as_str()).collect();
    let declared_volumes: BTreeSet<&str> = doc["volumes"]
        .as_mapping()
        .map(|m| m.keys().filter_map(|k| k.as_str()).collect())
        .unwrap_or_default();
    let declared_networks: BTreeSet<&str> = doc["networks"]
        .as_mapping()
        .map(|m| m.keys().filter_map(|k| k.as_str()).collect())
        .unwrap_or_default();
    let depends = |svc: &Yaml| -> BTreeMap<String, String> {
        match &svc["depends_on"] {
            Yaml::Sequence(list) => list
                .iter()
                .filter_map(|d| d.as_str())
                .map(|d| (d.to_string(), "service_started".to_string()))
                .collect(),
            Yaml::Mapping(m) => m
                .iter()
                .map(|(k, v)| {
                    (
                        k.as_str().unwrap_or("").to_string(),
                        v["condition"]
                            .as_str()
                            .unwrap_or("service_started")
                            .to_string(),
                    )
                })
                .collect(),
            _ => BTreeMap::new(),
        }
    };

    // References between services, volumes and networks resolve.
    for (name, svc) in services {
        let name = name.as_str().unwrap_or("");
        for dep in depends(svc).keys() {
            p.check(
                service_names.contains(dep.as_str()),
                format!("{name}: depends_on {dep}, which is not a service"),
            );
        }
        for v in seq(&svc["volumes"]) {
            let source = v.as_str().and_then(|s| s.split(':').next()).unwrap_or("");
            if source.starts_with("./") || source.starts_with("../") {
                p.check(
                    deploy_dir().join(source).exists(),
                    format!(
                        "{name}: mounts {source}, which does not exist next to the Compose file"
                    ),
                );
            } else if !source.starts_with('/') {
                p.check(
                    declared_volumes.contains(source),
                    format!("{name}: volume {source} is not declared under volumes"),
                );
            }
        }
        let networks: Vec<&str> = match &svc["networks"] {
            Yaml::Sequence(l) => l.iter().filter_map(|n| n.as_str()).collect(),
            Yaml::Mapping(m) => m.keys().filter_map(|n| n.as_str()).collect(),
            _ => Vec::new(),
        };
        for n in networks {
            p.check(
                declared_networks.contains(n),
                format!("{name}: network {n} is not declared under networks"),
            );
        }
    }

    // --- The Redis Cluster: six nodes, as deploy/README.md recommends.
    let image_of = |svc: &Yaml| svc["image"].as_str().unwrap_or("").to_string();
    let redis_nodes: Vec<(&str, &Yaml)> = services
        .iter()
        .filter(|(_, s)| {
            image_of(s).starts_with("redis:")
                && compose_words(&s["command"])
                    .first()
                    .is_some_and(|c| c == "redis-server")
        })
        .map(|(k, s)| (k.as_str().unwrap_or(""), s))
        .collect();
    p.check(
        redis_nodes.len() == 6,
        format!(
            "{} Redis nodes: want 6 (3 primaries, 3 replicas)",
            redis_nodes.len()
        ),
    );
    let subnet_cfg = doc["networks"].as_mapping().and_then(|m| {
        m.values()
            .find_map(|n| seq(&n["ipam"]["config"]).first().cloned())
    });
    let subnet = subnet_cfg
        .as_ref()
        .and_then(|c| c["subnet"].as_str())
        .map(String::from);
    let ip_range = subnet_cfg
        .as_ref()
        .and_then(|c| c["ip_range"].as_str())
        .map(String::from);
    let mut fixed = BTreeSet::new();
    let mut redis_addrs = BTreeSet::new();
    for (name, svc) in &redis_nodes {
        p.check(
            image_of(svc).starts_with("redis:7"),
            format!(
                "{name}: image {} is not redis:7 (Herald needs Redis 7 or later)",
                image_of(svc)
            ),
        );
        let words = compose_words(&svc["command"]);
        for (flag, want) in [
            ("--cluster-enabled", "yes"),
            ("--appendonly", "yes"),
            ("--appendfsync", "everysec"),
            ("--maxmemory-policy", "noeviction"),
            ("--cluster-require-full-coverage", "no"),
        ] {
            p.check(
                word_after(&words, flag) == Some(want),
                format!("{name}: {flag} {want} is missing from its command"),
            );
        }
        p.check(
            word_after(&words, "--cluster-config-file").is_some(),
            format!("{name}: no --cluster-config-file"),
        );
        p.check(
            word_after(&words, "--maxmemory").is_some(),
            format!("{name}: no --maxmemory (noeviction needs a limit to act on)"),
        );
        let timeout =
            word_after(&words, "--cluster-node-timeout").and_then(|t| t.parse::<u64>().ok());
        p.check(
            timeout.is_some_and(|t| (1000..=15000).contains(&t)),
            format!("{name}: --cluster-node-timeout {timeout:?} ms: set it, between 1000 and Redis's default 15000"),
        );
        let port = word_after(&words, "--port").unwrap_or("6379").to_string();
        redis_addrs.insert(format!("{name}:{port}"));
        p.check(
            seq(&svc["volumes"])
                .iter()
                .any(|v| v.as_str().is_some_and(|s| s.ends_with(":/data"))),
            format!("{name}: no volume at /data: the AOF and nodes.conf would not survive the container"),
        );
        p.check(
            !svc["healthcheck"]["test"].is_null(),
            format!("{name}: no healthcheck (the init service waits for it)"),
        );
        // A fixed address inside the network, outside the dynamic range.
        let addr = svc["networks"]
            .as_mapping()
            .and_then(|m| m.values().find_map(|n| n["ipv4_address"].as_str()))
            .and_then(ipv4);
        match (addr, &subnet) {
            (Some(a), Some(net)) => {
                p.check(in_cidr(a, net), format!("{name}: ipv4_address outside the subnet {net}"));
                p.check(
                    !ip_range.as_deref().is_some_and(|r| in_cidr(a, r)),
                    format!("{name}: ipv4_address inside ip_range, where Docker may give it to another container"),
                );
                p.check(fixed.insert(a), format!("{name}: ipv4_address used twice"));
            }
            _ => p.add(format!(
                "{name}: no fixed ipv4_address in a network with an ipam subnet (the cluster remembers its peers by address)"
            )),
        }
    }

    // --- The one-shot that creates the cluster.
    let init: Vec<(&str, &Yaml)> = services
        .iter()
        .filter(|(_, s)| {
            compose_words(&s["command"])
                .join(" ")
                .contains("--cluster create")
        })
        .map(|(k, s)| (k.as_str().unwrap_or(""), s))
        .collect();
    p.check(
        init.len() == 1,
        "no one-shot service running `redis-cli --cluster create`",
    );
    let init_name = init.first().map(|(n, _)| n.to_string()).unwrap_or_default();
    if let Some((name, svc)) = init.first() {
        p.check(
            image_of(svc).starts_with("redis:7"),
            format!("{name}: image {} is not redis:7", image_of(svc)),
        );
        p.check(
            svc["restart"].is_null() || svc["restart"].as_str() == Some("no"),
            format!("{name}: a one-shot must not restart"),
        );
        let script = compose_words(&svc["command"]).join("\n");
        // Shell variables assigned in the script (name="value"), expanded in
        // the create command.
        let mut vars = BTreeMap::new();
        for line in script.lines() {
            if let Some((k, v)) = line.trim().split_once("=\"") {
                if k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                    vars.insert(k.to_string(), v.trim_end_matches('"').to_string());
                }
            }
        }
        let create = script
            .lines()
            .find(|l| l.contains("--cluster create"))
            .unwrap_or("");
        let mut words: Vec<String> = Vec::new();
        for w in create.split_whitespace() {
            match w
                .strip_prefix('$')
                .map(|v| v.trim_matches(|c| c == '{' || c == '}'))
            {
                Some(var) => words.extend(
                    vars.get(var)
                        .map(|v| v.split_whitespace().map(String::from).collect::<Vec<_>>())
                        .unwrap_or_default(),
                ),
                None => words.push(w.to_string()),
            }
        }
        let listed: BTreeSet<String> = words
            .iter()
            .filter(|w| w.contains(':') && !w.starts_with('-'))
            .cloned()
            .collect();
        p.check(
            listed == redis_addrs,
            format!(
                "{name}: --cluster create lists {listed:?}, the Redis nodes are {redis_addrs:?}"
            ),
        );
        p.check(
            word_after(&words, "--cluster-replicas") == Some("1"),
            format!("{name}: --cluster-replicas 1 is missing"),
        );
        p.check(
            words.iter().any(|w| w == "--cluster-yes"),
            format!("{name}: --cluster-yes is missing (it would wait for a \"yes\")"),
        );
        let deps = depends(svc);
        for (node, _) in &redis_nodes {
            p.check(
                deps.get(*node).map(String::as_str) == Some("service_healthy"),
                format!("{name}: does not wait for {node} to be healthy"),
            );
        }
    }

    // --- The Herald nodes.
    let herald_nodes: Vec<(&str, &Yaml)> = services
        .iter()
        .filter(|(_, s)| {
            s["build"]["dockerfile"].as_str() == Some("deploy/Dockerfile")
                || image_of(s).starts_with("herald")
        })
        .map(|(k, s)| (k.as_str().unwrap_or(""), s))
        .collect();
    p.check(
        herald_nodes.len() == 3,
        format!("{} Herald nodes: want 3", herald_nodes.len()),
    );
    let raw_services = &raw["services"];
    let mut shared: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
    let mut node_urls = BTreeSet::new();
    for (name, svc) in &herald_nodes {
        if let Some(build) = svc["build"].as_mapping() {
            let context = build.get("context").and_then(|c| c.as_str()).unwrap_or(".");
            p.check(
                deploy_dir().join(context).join("Cargo.toml").exists()
                    && deploy_dir().join(context).join(svc["build"]["dockerfile"].as_str().unwrap_or("")).exists(),
                format!("{name}: build context {context} is not the repository root with deploy/Dockerfile"),
            );
        }
        let words = compose_words(&svc["command"]);
        p.check(
            words.first().is_some_and(|w| w == "serve"),
            format!("{name}: command {words:?} must be `serve ...`"),
        );
        let listen = word_after(&words, "--listen").unwrap_or("");
        p.check(
            port_of(listen) == Some(HTTP_PORT) && listen.starts_with("0.0.0.0:"),
            format!("{name}: --listen {listen:?}: want 0.0.0.0:{HTTP_PORT}"),
        );
        let env = compose_env(svc);
        let raw_env = compose_env(&raw_services[*name]);
        for (k, v) in &env {
            if k.starts_with("HERALD_") && !v.starts_with('<') {
                if let Err(e) = check_env_setting(k, v) {
                    p.add(format!("{name}: {e}"));
                }
            } else if k.starts_with("HERALD_") {
                p.check(
                    setting_of_env(k).is_some(),
                    format!("{name}: {k} is not a Herald setting"),
                );
            }
        }
        p.check(
            env.get("HERALD_STORE").map(String::as_str) == Some("redis"),
            format!("{name}: HERALD_STORE must be redis"),
        );
        for k in [
            "HERALD_REDIS_URL",
            "HERALD_ENDPOINT_KEYS",
            "HERALD_PUBLIC_URL",
        ] {
            match raw_env.get(k) {
                Some(v) => {
                    shared.entry(k).or_default().insert(v.clone());
                }
                None => p.add(format!("{name}: {k} is not set")),
            }
        }
        // The endpoint key: a reference to a required variable, never a
        // literal key in the file.
        let keys = raw_env
            .get("HERALD_ENDPOINT_KEYS")
            .cloned()
            .unwrap_or_default();
        p.check(
            keys.starts_with("${") && keys.contains(":?"),
            format!("{name}: HERALD_ENDPOINT_KEYS {keys:?} must be a required variable (${{HERALD_ENDPOINT_KEYS:?...}}), not a key written in the file"),
        );
        // The Redis URL names the cluster's nodes.
        let urls: BTreeSet<String> = env
            .get("HERALD_REDIS_URL")
            .map(|u| {
                u.split(',')
                    .filter_map(|u| redis_host_port(u.trim()))
                    .collect()
            })
            .unwrap_or_default();
        p.check(
            urls == redis_addrs,
            format!("{name}: HERALD_REDIS_URL names {urls:?}, the Redis nodes are {redis_addrs:?}"),
        );
        // node_url: this very node, by its service name, on --listen's port.
        let node_url = env.get("HERALD_NODE_URL").cloned().unwrap_or_default();
        p.check(
            node_url == format!("http://{name}:{HTTP_PORT}"),
            format!("{name}: HERALD_NODE_URL {node_url:?}: want http://{name}:{HTTP_PORT}, where the other nodes reach this one"),
        );
        p.check(
            node_urls.insert(node_url.clone()),
            format!("{name}: HERALD_NODE_URL shared with another node"),
        );
        let deps = depends(svc);
        p.check(
            deps.get(&init_name).map(String::as_str) == Some("service_completed_successfully"),
            format!("{name}: must start after {init_name} completed successfully"),
        );
        let grace = svc["stop_grace_period"].as_str().and_then(compose_secs);
        let shutdown = herald_duration_secs(&default_value("shutdown_timeout")).unwrap() as f64;
        p.check(
            grace.is_some_and(|g| g > shutdown),
            format!(
                "{name}: stop_grace_period {grace:?} s must exceed shutdown_timeout ({shutdown} s)"
            ),
        );
        p.check(
            !svc["ulimits"]["nofile"].is_null(),
            format!("{name}: no ulimits.nofile (one descriptor per websocket)"),
        );
        let health = compose_words(&svc["healthcheck"]["test"]).join(" ");
        p.check(
            [READINESS_PATH, LIVENESS_PATH]
                .iter()
                .any(|path| health.contains(&format!("127.0.0.1:{HTTP_PORT}{path}"))),
            format!("{name}: healthcheck `{health}` does not hit /ready or /health"),
        );
    }
    for (k, values) in &shared {
        p.check(
            values.len() == 1,
            format!("{k} differs between the Herald nodes: {values:?}"),
        );
    }
    p.check(
        required.contains("HERALD_ENDPOINT_KEYS"),
        "HERALD_ENDPOINT_KEYS is not a required variable",
    );

    // --- nginx in front: the cluster config, after the nodes, published
    // where public_url says.
    let nginx: Vec<(&str, &Yaml)> = services
        .iter()
        .filter(|(_, s)| image_of(s).starts_with("nginx"))
        .map(|(k, s)| (k.as_str().unwrap_or(""), s))
        .collect();
    p.check(nginx.len() == 1, "no nginx service");
    if let Some((name, svc)) = nginx.first() {
        let mount = seq(&svc["volumes"])
            .iter()
            .filter_map(|v| v.as_str())
            .find(|v| v.starts_with("./nginx-cluster.conf:"))
            .unwrap_or("");
        p.check(
            mount.starts_with("./nginx-cluster.conf:/etc/nginx/nginx.conf"),
            format!("{name}: nginx-cluster.conf (a whole nginx.conf) is not mounted at /etc/nginx/nginx.conf"),
        );
        let conf = read("nginx-cluster.conf");
        let upstream: BTreeSet<String> = nginx_blocks(&conf, "upstream")
            .iter()
            .flat_map(|(_, body)| body)
            .filter(|d| d.first() == Some(&"server"))
            .filter_map(|d| d.get(1).map(|s| s.to_string()))
            .collect();
        let nodes: BTreeSet<String> = herald_nodes
            .iter()
            .map(|(n, _)| format!("{n}:{HTTP_PORT}"))
            .collect();
        p.check(
            upstream == nodes,
            format!("nginx-cluster.conf upstream {upstream:?} != the Herald nodes {nodes:?}"),
        );
        let deps = depends(svc);
        for (node, _) in &herald_nodes {
            p.check(
                deps.contains_key(*node),
                format!(
                    "{name}: does not depend on {node} (nginx resolves its upstreams at start)"
                ),
            );
        }
        // public_url's port is nginx's published port.
        let listen_port = nginx_directives(&conf)
            .iter()
            .find(|d| d[0] == "listen")
            .and_then(|d| d.get(1)?.rsplit(':').next()?.parse::<u16>().ok());
        let published: Vec<(String, String)> = seq(&svc["ports"])
            .iter()
            .filter_map(|p| p.as_str())
            .filter_map(|p| {
                let (host, container) = p.rsplit_once(':')?;
                let host_port = host.rsplit(':').next()?;
                Some((host_port.to_string(), container.to_string()))
            })
            .collect();
        let public = shared
            .get("HERALD_PUBLIC_URL")
            .and_then(|v| v.iter().next())
            .map(|v| compose_interpolate(v, &mut BTreeSet::new()))
            .unwrap_or_default();
        let public_port = public
            .split("://")
            .nth(1)
            .and_then(|r| r.split('/').next())
            .and_then(|a| a.rsplit_once(':'))
            .map(|(_, port)| port.to_string());
        p.check(
            published.iter().any(|(host, container)| {
                Some(host) == public_port.as_ref()
                    && Some(container.as_str()) == listen_port.map(|l| l.to_string()).as_deref()
            }),
            format!("{name}: publishes {published:?}, but HERALD_PUBLIC_URL is {public} and nginx listens on {listen_port:?}"),
        );
    }
    p.finish();
}

/// Every `N KiB` in a sentence (or table cell) of `text` about memory per
/// connection.
fn per_connection_kib(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    for sentence in text.split(". ").flat_map(|s| s.split('|')) {
        let lower = sentence.to_ascii_lowercase().replace('\n', " ");
        if !(lower.contains("per idle connection")
            || lower.contains("per connection")
            || lower.contains("per idle registered connection"))
        {
            continue;
        }
        let words: Vec<&str> = lower.split_whitespace().collect();
        for pair in words.windows(2) {
            let number = pair[0].trim_start_matches(['(', '*']);
            if pair[1].starts_with("kib") && number.parse::<f64>().is_ok() {
                found.push(number.to_string());
            }
        }
    }
    found
}

/// The README's measured per-connection memory: figures in sentences about
/// it, and the cells of tables whose header has a "KiB per connection"
/// column.
fn readme_per_connection_figures(readme: &str) -> BTreeSet<String> {
    let mut figures: BTreeSet<String> = per_connection_kib(readme).into_iter().collect();
    let mut columns: Vec<usize> = Vec::new();
    for line in readme.lines() {
        let cells: Vec<&str> = line
            .trim()
            .trim_matches('|')
            .split('|')
            .map(str::trim)
            .collect();
        if !line.trim_start().starts_with('|') {
            columns.clear();
            continue;
        }
        if cells.iter().any(|c| c.contains("KiB per connection")) {
            columns = (0..cells.len())
                .filter(|&i| cells[i].contains("KiB per connection"))
                .collect();
            continue;
        }
        for &i in &columns {
            if let Some(cell) = cells.get(i) {
                let n = cell.trim_matches('*');
                if n.parse::<f64>().is_ok() {
                    figures.insert(n.to_string());
                }
            }
        }
    }
    figures
}

/// deploy/README.md links to the README's measurements rather than
/// repeating them; any per-connection figure it does quote must be one the
/// README measured (it once said 5.0 KiB where the README said 5.7).
#[test]
fn deploy_readme_quotes_no_per_connection_figure_the_readme_lacks() {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let measured = readme_per_connection_figures(&readme);
    assert!(
        measured.contains("5.7"),
        "README's per-connection figures not found (the parser is stale): {measured:?}"
    );
    let deploy = read("README.md");
    let quoted = per_connection_kib(&deploy);
    let stray: Vec<&String> = quoted.iter().filter(|q| !measured.contains(*q)).collect();
    assert!(
        stray.is_empty(),
        "deploy/README.md quotes {stray:?} KiB per connection; README.md measures {measured:?}: link to README instead"
    );
    // The check bites: the old wording is caught.
    let old = "5.6 KiB of resident memory per idle connection with `store = \"redis\"`; the embedded store measures 5.0 KiB per connection";
    assert_eq!(per_connection_kib(old), ["5.6", "5.0"]);
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
            // Below a subdirectory of a subdirectory (kubernetes/redis/...),
            // the name alone is ambiguous: the directory must be named too.
            let parent = Path::new(&rel)
                .parent()
                .filter(|d| d.components().count() >= 2)
                .and_then(|d| d.file_name())
                .map(|d| d.to_string_lossy().to_string());
            let mentioned = match &parent {
                None => readme.contains(&name),
                Some(dir) => {
                    readme.contains(&format!("{dir}/{name}"))
                        || (readme.contains(&format!("{dir}/")) && readme.contains(&name))
                }
            };
            if rel != "README.md" {
                p.check(mentioned, format!("README.md does not mention {rel}"));
            }
        }
    }
    p.finish();
}

/// GitHub's anchor for a Markdown heading.
fn heading_anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

fn markdown_anchors(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix('#'))
        .map(|h| heading_anchor(h.trim_start_matches('#')))
        .collect()
}

#[test]
fn deploy_readme_documents_several_nodes_on_redis() {
    let mut p = Problems::new("README.md");
    let readme = read("README.md");
    let Some(start) = readme.find("\n## Several nodes on Redis\n") else {
        p.add("no \"## Several nodes on Redis\" section");
        p.finish();
        return;
    };
    let section = &readme[start + 1..];
    let section = &section[..section[3..].find("\n## ").map_or(section.len(), |i| i + 3)];
    for must in [
        "`store = \"redis\"`",
        "`redis_url`",
        "`endpoint_keys`",
        "`public_url`",
        "`node_url`",
        "`redis_wait_replicas`",
        "`redis_wait_timeout`",
        "herald keygen",
        "/_herald/",
        "noeviction",
        "`appendfsync`",
        "`everysec`",
        "`always`",
        "`cluster-node-timeout`",
        "`maxmemory`",
        "status.podIP",
        "docker-compose.cluster.yml",
        "kubernetes/redis/",
        "proto-docs/storage.md",
        "proto-docs/cluster.md",
    ] {
        p.check(
            section.contains(must),
            format!("\"Several nodes on Redis\" does not mention {must}"),
        );
    }

    // Links: files relative to deploy/ exist, anchors name headings.
    let anchors = markdown_anchors(&readme);
    for part in readme.split("](").skip(1) {
        let target = part.split(')').next().unwrap_or("");
        if target.starts_with("http://") || target.starts_with("https://") {
            continue;
        }
        let (file, anchor) = target.split_once('#').unwrap_or((target, ""));
        if file.is_empty() {
            p.check(
                anchors.contains(anchor),
                format!("link to #{anchor}: no such heading"),
            );
            continue;
        }
        let path = deploy_dir().join(file);
        match std::fs::read_to_string(&path) {
            Ok(text) => p.check(
                anchor.is_empty() || markdown_anchors(&text).contains(anchor),
                format!("link to {target}: no such heading in {file}"),
            ),
            Err(_) => p.check(path.exists(), format!("link to {target}: no such file")),
        }
    }
    p.finish();
}
