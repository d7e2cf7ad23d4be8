//! Tables of what Herald provides (from the library where it has them) and the
//! helpers every target's checks share.

pub(crate) use std::collections::{BTreeMap, BTreeSet};
pub(crate) use std::net::SocketAddr;
pub(crate) use std::path::{Path, PathBuf};
pub(crate) use std::process::Command;

pub(crate) use base64::Engine as _;
pub(crate) use promql_parser::label::MatchOp;
pub(crate) use promql_parser::parser::{self as promql, Expr, LabelModifier};
pub(crate) use serde::Deserialize as _;
pub(crate) use serde_json::Value as Json;
pub(crate) use serde_yaml_ng::Value as Yaml;

// ---------------------------------------------------------------------------
// What Herald provides. Keep in step with the code.
// ---------------------------------------------------------------------------

pub(crate) use herald::config::{DefaultValue, Kind, SETTINGS};

/// Settings herald.toml sets to an empty value rather than commenting out:
/// its comment explains the generated key, and `[]` loads as unset.
pub(crate) const WRITTEN_EMPTY: &[(&str, &str)] = &[("endpoint_keys", "[]")];

/// The port of `--listen` in the container image and Kubernetes manifests.
pub(crate) const HTTP_PORT: i64 = 8080;
pub(crate) const LIVENESS_PATH: &str = "/health";
pub(crate) const READINESS_PATH: &str = "/ready";

#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum MetricType {
    Counter,
    Gauge,
    Histogram,
}

/// A label and the values it takes (empty: any value).
pub(crate) type Label = (&'static str, &'static [&'static str]);

/// Every metric on GET /metrics: name, type, labels.
pub(crate) const METRICS: &[(&str, MetricType, &[Label])] = &[
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
            &[
                "delivered",
                "rejected",
                "expired",
                "cancelled",
                "gone",
                "forwarded",
            ],
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
    (
        "herald_bridge_requests_total",
        MetricType::Counter,
        &[("bridge", &["fcm", "apns"]), ("app", &[]), ("status", &[])],
    ),
    (
        "herald_bridge_request_seconds",
        MetricType::Histogram,
        &[("bridge", &["fcm", "apns"]), ("app", &[])],
    ),
    (
        "herald_bridge_retries_total",
        MetricType::Counter,
        &[("bridge", &["fcm", "apns"]), ("app", &[])],
    ),
    (
        "herald_bridge_token_refreshes_total",
        MetricType::Counter,
        &[("bridge", &["fcm", "apns"]), ("app", &[])],
    ),
    (
        "herald_bridge_drops_total",
        MetricType::Counter,
        &[
            ("bridge", &["fcm", "apns"]),
            ("app", &[]),
            ("reason", &["gone", "rejected", "expired"]),
        ],
    ),
    (
        "herald_registrations_total",
        MetricType::Counter,
        &[
            ("bridge", &["fcm", "apns"]),
            (
                "op",
                &[
                    "register",
                    "update",
                    "get",
                    "unregister",
                    "subscribe",
                    "unsubscribe",
                ],
            ),
            (
                "outcome",
                &["ok", "refused", "unauthorized", "gone", "error"],
            ),
        ],
    ),
    (
        "herald_throttled_total",
        MetricType::Counter,
        &[(
            "reason",
            &["subscription", "user_agent", "sender_key", "sender_address"],
        )],
    ),
    (
        "herald_blocked_pushes_total",
        MetricType::Counter,
        &[("by", &["key", "sub"])],
    ),
    (
        "herald_admin_requests_total",
        MetricType::Counter,
        &[
            (
                "op",
                &[
                    "lookup", "drop", "block", "unblock", "blocks", "top", "summary", "backup",
                ],
            ),
            (
                "outcome",
                &["ok", "refused", "unauthorized", "not_found", "error"],
            ),
        ],
    ),
    (
        "herald_policy_refusals_total",
        MetricType::Counter,
        &[("reason", &["vapid_required", "user_agent_token"])],
    ),
    (
        "herald_matrix_notifications_total",
        MetricType::Counter,
        &[("outcome", &["ok", "malformed", "throttled", "error"])],
    ),
    (
        "herald_matrix_devices_total",
        MetricType::Counter,
        &[("outcome", &["pushed", "rejected"])],
    ),
];

/// Labels Prometheus adds to every scraped series.
pub(crate) const TARGET_LABELS: &[&str] = &["instance", "job"];

// ---------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------

pub(crate) fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy")
}

pub(crate) fn read(rel: &str) -> String {
    let path = deploy_dir().join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// Collects problems; fails the test with all of them at the end.
pub(crate) struct Problems {
    file: &'static str,
    list: Vec<String>,
}

impl Problems {
    pub(crate) fn new(file: &'static str) -> Self {
        Problems {
            file,
            list: Vec::new(),
        }
    }
    pub(crate) fn add(&mut self, msg: impl Into<String>) {
        self.list.push(msg.into());
    }
    pub(crate) fn check(&mut self, ok: bool, msg: impl Into<String>) {
        if !ok {
            self.add(msg);
        }
    }
    pub(crate) fn finish(self) {
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
pub(crate) fn setting(key: &str) -> Option<(Kind, Option<String>)> {
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
pub(crate) fn herald_duration_secs(v: &toml::Value) -> Option<u64> {
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

pub(crate) fn default_value(key: &str) -> toml::Value {
    let lit = setting(key)
        .and_then(|(_, d)| d)
        .expect("setting with a default");
    toml::from_str::<toml::Table>(&format!("v = {lit}")).expect("default parses")["v"].clone()
}

/// Checks one setting's value; returns a description of what is wrong.
pub(crate) fn check_setting_value(key: &str, v: &toml::Value) -> Result<(), String> {
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
        Kind::Rate => match v.as_str() {
            Some(s) if herald::config::parse_rate(s).is_ok() => Ok(()),
            _ => bad("a rate such as \"240/m\", or \"off\""),
        },
        Kind::Cidrs => {
            let ranges: Vec<&str> = match v {
                toml::Value::String(s) => s.split(',').map(str::trim).collect(),
                toml::Value::Array(a) => a.iter().map(|t| t.as_str().unwrap_or("")).collect(),
                _ => return bad("addresses or CIDR ranges"),
            };
            if !ranges.is_empty() && ranges.iter().all(|r| herald::cidr::Cidr::parse(r).is_ok()) {
                Ok(())
            } else {
                bad("IP addresses or CIDR ranges (comma-separated, or a list)")
            }
        }
    }
}

/// `host:port` of a `redis://[user:password@]host:port` URL.
pub(crate) fn redis_host_port(url: &str) -> Option<String> {
    let rest = url.strip_prefix("redis://")?;
    let authority = rest.split('/').next()?;
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let (host, port) = host_port.rsplit_once(':')?;
    (!host.is_empty() && port.parse::<u16>().is_ok()).then(|| host_port.to_string())
}

/// The setting a `HERALD_<NAME>` environment variable sets.
pub(crate) fn setting_of_env(name: &str) -> Option<&'static str> {
    let key = name.strip_prefix("HERALD_")?.to_ascii_lowercase();
    SETTINGS.iter().map(|s| s.name).find(|k| *k == key)
}

/// Checks a `HERALD_<NAME>=value` environment variable: a real setting, and
/// a value Herald accepts (read the way the config file's would be).
pub(crate) fn check_env_setting(name: &str, value: &str) -> Result<(), String> {
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
pub(crate) fn check_herald_toml(text: &str, p: &mut Problems, what: &str) -> toml::Table {
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
pub(crate) fn shutdown_timeout_secs(table: &toml::Table) -> u64 {
    let v = table
        .get("shutdown_timeout")
        .cloned()
        .unwrap_or_else(|| default_value("shutdown_timeout"));
    herald_duration_secs(&v).expect("shutdown_timeout is a duration")
}

pub(crate) fn port_of(addr: &str) -> Option<i64> {
    addr.parse::<SocketAddr>().ok().map(|a| i64::from(a.port()))
}

/// One request path under each of the router's public prefixes, and the
/// websocket path: what every proxy and Ingress must pass to Herald. Taken
/// from the server's own router, so a new public route cannot be forgotten.
pub(crate) fn public_request_paths() -> Vec<String> {
    let mut paths = vec![herald::server::WEBSOCKET_PATH.to_string()];
    for prefix in herald::server::PUBLIC_PATH_PREFIXES {
        assert!(prefix.starts_with('/') && prefix.ends_with('/'), "{prefix}");
        paths.push(format!("{prefix}v1/some-token"));
    }
    paths
}

pub(crate) fn seq(v: &Yaml) -> &[Yaml] {
    v.as_sequence().map(|s| s.as_slice()).unwrap_or(&[])
}

/// Kubernetes' YAML parser follows YAML 1.1, where unquoted yes/no/on/off are
/// booleans: `proxy-buffering: off` would reach the API as `false`. Such
/// values must be quoted.
pub(crate) fn check_yaml11_booleans(file: &str, text: &str, p: &mut Problems) {
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
