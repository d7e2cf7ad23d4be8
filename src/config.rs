//! Settings: defaults, overridden by a TOML file, overridden by `HERALD_*`
//! environment variables, overridden by command-line flags. Every value is
//! checked once at start; a bad one stops Herald with one line naming it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// How a setting's value is written, which decides how it is parsed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// host:port
    Addr,
    /// http:// or https:// URL
    Url,
    Path,
    /// base64url-encoded 32-byte keys, comma-separated (a list in TOML)
    Keys,
    /// one redis:// URL, or several (comma-separated, or a list in TOML)
    RedisUrls,
    /// a number with an ms/s/m/h/d suffix; bare numbers are seconds
    Duration,
    /// positive integer
    Int,
    /// integer, zero allowed
    Count,
    Bool,
    /// one of the listed strings
    OneOf(&'static [&'static str]),
    /// bearer tokens of at least 16 characters (comma-separated, or a list)
    Tokens,
    /// any text (a secret)
    Text,
    /// a tracing filter; deployment files use a plain level
    LogLevel,
    /// a count per second, minute or hour (`100/s`, `240/m`, `5000/h`), or
    /// `off`
    Rate,
    /// IP addresses or CIDR ranges (comma-separated, or a list)
    Cidrs,
}

/// What a setting is when nothing sets it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DefaultValue {
    /// This value, parsed like any other.
    Value(&'static str),
    /// Off: the feature it configures is not used.
    Unset,
    /// Computed at start from other settings or the machine; the text says
    /// how, for `--help` and README.md.
    Derived(&'static str),
}

/// One row of [`SETTINGS`].
#[derive(Clone, Copy, Debug)]
pub struct Setting {
    pub name: &'static str,
    pub kind: Kind,
    pub default: DefaultValue,
    pub help: &'static str,
}

impl Setting {
    /// The text the loader starts from: empty unless there is a fixed value.
    pub fn default_text(&self) -> &'static str {
        match self.default {
            DefaultValue::Value(v) => v,
            DefaultValue::Unset | DefaultValue::Derived(_) => "",
        }
    }

    /// The default as `--help` and README.md show it.
    pub fn shown_default(&self) -> &'static str {
        match self.default {
            DefaultValue::Value(v) | DefaultValue::Derived(v) => v,
            DefaultValue::Unset => "unset",
        }
    }

    /// `HERALD_` + the name in upper case.
    pub fn env_var(&self) -> String {
        format!("HERALD_{}", self.name.to_ascii_uppercase())
    }
}

/// The setting called `name`, if there is one.
pub fn setting_named(name: &str) -> Option<&'static Setting> {
    SETTINGS.iter().find(|s| s.name == name)
}

const fn setting(
    name: &'static str,
    kind: Kind,
    default: DefaultValue,
    help: &'static str,
) -> Setting {
    Setting {
        name,
        kind,
        default,
        help,
    }
}

/// Every setting of `herald serve`: the one table loading, `--help`, the
/// unknown-variable warning and the checks of README.md and `deploy/` are
/// derived from. The name is the TOML key; the environment variable is
/// `HERALD_` + the name in upper case.
pub const SETTINGS: &[Setting] = &[
    setting("listen", Kind::Addr, DefaultValue::Value("127.0.0.1:8080"), "address for the user-agent websocket and, unless endpoint_listen is set, the HTTP API"),
    setting("endpoint_listen", Kind::Addr, DefaultValue::Unset, "optional separate address for the application-server HTTP API"),
    setting("metrics_listen", Kind::Addr, DefaultValue::Unset, "private address serving /metrics (unset: /metrics is not served, unless metrics_public)"),
    setting("metrics_public", Kind::Bool, DefaultValue::Value("false"), "with metrics_listen unset, serve /metrics on the main listener (reachable by whoever reaches listen)"),
    setting("data_dir", Kind::Path, DefaultValue::Value("./herald-data"), "directory for the database and the generated endpoint key"),
    setting("public_url", Kind::Url, DefaultValue::Derived("http://<listen>"), "base URL of every endpoint handed out (default http://<listen>); its origin is the VAPID audience"),
    setting("endpoint_keys", Kind::Keys, DefaultValue::Derived("generated"), "base64url 32-byte keys for endpoint tokens, comma-separated; the first seals, all open"),
    setting("hello_timeout", Kind::Duration, DefaultValue::Value("10s"), "time a new websocket has to send hello"),
    setting("ping_interval", Kind::Duration, DefaultValue::Value("5m"), "idle time after which the server pings a websocket"),
    setting("ping_timeout", Kind::Duration, DefaultValue::Value("30s"), "time to answer a server ping before the connection is closed"),
    setting("max_connections", Kind::Int, DefaultValue::Value("100000"), "most websocket connections held at once"),
    setting("listen_backlog", Kind::Int, DefaultValue::Value("4096"), "connections the kernel queues on each listening socket before Herald accepts them (listen(2) backlog; capped by net.core.somaxconn); a full queue drops SYNs, which clients retry after 1 s"),
    setting("max_channels_per_uaid", Kind::Int, DefaultValue::Value("500"), "most subscriptions one user agent may hold"),
    setting("max_frame_size", Kind::Int, DefaultValue::Value("32768"), "largest websocket message accepted from a user agent, in bytes"),
    setting("client_rate_limit", Kind::Int, DefaultValue::Value("50"), "unsolicited websocket messages per second a user agent may send (bursts of twice that; acks of what was sent are free)"),
    setting("max_ttl", Kind::Duration, DefaultValue::Value("30d"), "longest TTL applied; larger requested TTLs are lowered"),
    setting("max_message_bytes", Kind::Int, DefaultValue::Value("4096"), "largest push body accepted, in bytes, counted encrypted (4096 leaves 3993 bytes of plaintext after RFC 8291's 103 bytes of framing)"),
    setting("max_stored_messages", Kind::Int, DefaultValue::Value("1000"), "most undelivered messages kept per user agent; beyond it senders get 429"),
    setting("ua_expiry", Kind::Duration, DefaultValue::Value("60d"), "user agents silent this long are dropped with their subscriptions"),
    setting("sync_writes", Kind::Bool, DefaultValue::Value("false"), "fsync every accepted message before answering (group commit)"),
    setting("delivery_window", Kind::Int, DefaultValue::Value("64"), "most unacknowledged messages in flight per connection"),
    setting("jwt_cache_size", Kind::Int, DefaultValue::Value("10000"), "verified VAPID tokens remembered"),
    setting("sweep_interval", Kind::Duration, DefaultValue::Value("1h"), "how often expired messages and silent user agents are removed"),
    setting("shutdown_timeout", Kind::Duration, DefaultValue::Value("10s"), "how long shutdown waits for connections to close"),
    setting("log_format", Kind::OneOf(&["text", "json"]), DefaultValue::Value("text"), "text or json"),
    setting("log_level", Kind::LogLevel, DefaultValue::Value("info"), "tracing filter, e.g. info or herald=debug (RUST_LOG overrides)"),
    setting("tls_cert", Kind::Path, DefaultValue::Unset, "PEM certificate chain; with tls_key, listeners speak wss:// and https://"),
    setting("tls_key", Kind::Path, DefaultValue::Unset, "PEM private key for tls_cert; both are reloaded on SIGHUP"),
    setting("store", Kind::OneOf(&["rocksdb", "redis"]), DefaultValue::Value("rocksdb"), "rocksdb (embedded, one node) or redis (shared by several nodes)"),
    setting("redis_url", Kind::RedisUrls, DefaultValue::Unset, "with store = redis: redis://host:port of a standalone Redis, or the comma-separated seed nodes of a Redis Cluster"),
    setting("redis_wait_replicas", Kind::Count, DefaultValue::Value("0"), "with store = redis: replicas that must confirm each accepted message (Redis WAIT) before 201"),
    setting("redis_wait_timeout", Kind::Duration, DefaultValue::Value("1s"), "how long an accepted message waits for redis_wait_replicas before the push answers 503"),
    setting("node_listen", Kind::Addr, DefaultValue::Unset, "with store = redis: private address for node-to-node wake-ups (/_herald/node/), which listen then refuses; unset: served on listen"),
    setting("node_url", Kind::Url, DefaultValue::Derived("http://<node_listen or listen>"), "with store = redis: the http:// URL other nodes reach this node at for wake-ups (default http://<node_listen or listen>)"),
    setting("broadcast_tokens", Kind::Tokens, DefaultValue::Unset, "bearer tokens allowed to PUT /v1/broadcasts/<id>, comma-separated; unset: the broadcast API answers 404"),
    setting("broadcast_source_url", Kind::Url, DefaultValue::Unset, "an upstream of broadcast versions to poll (JSON {\"broadcasts\":{id:version}}, as Remote Settings' /v1/__broadcasts__ or a megaphone server)"),
    setting("broadcast_source_token", Kind::Text, DefaultValue::Unset, "bearer token sent to broadcast_source_url, if it needs one"),
    setting("broadcast_poll_interval", Kind::Duration, DefaultValue::Value("30s"), "how often broadcast_source_url is polled"),
    setting("bridge_auth_keys", Kind::Tokens, DefaultValue::Unset, "keys of the mobile registration API's secrets (HMAC-SHA256 of the uaid), comma-separated, 16+ characters each; the first issues, all verify; required with any [bridges.*] table"),
    setting("autopush_auth_keys", Kind::Text, DefaultValue::Unset, "autopush-rs's AUTH_KEYS (comma-separated, or its [\"k1\",\"k2\"] form): secrets autopush issued stay valid; Herald never issues with them"),
    setting("receipt_retention", Kind::Duration, DefaultValue::Value("3d"), "how long delivery receipts stay readable on their receipt subscription"),
    setting("max_receipt_streams_per_subscription", Kind::Int, DefaultValue::Value("4"), "most event streams open at once on one receipt subscription, per node; beyond it readers get 429"),
    setting("max_receipt_streams", Kind::Int, DefaultValue::Value("10000"), "most receipt event streams a node holds open at once; beyond it readers get 429"),
    setting("receipt_stream_lifetime", Kind::Duration, DefaultValue::Value("1h"), "longest a receipt event stream stays open; it then ends and the reader resumes with Last-Event-ID"),
    setting("worker_threads", Kind::Int, DefaultValue::Derived("one per core"), "threads running connections and requests; unset: one per core"),
    setting("autopush_crypto_keys", Kind::Keys, DefaultValue::Unset, "autopush-rs's CRYPTO_KEYS ([k1,k2], Fernet keys): its /wpush/ endpoint URLs keep working; unset: only Herald's own endpoints are accepted"),
    setting("ua_rate_limit", Kind::Rate, DefaultValue::Value("240/m"), "pushes one user agent may receive, over all its subscriptions (FCM allows 240 a minute per device); beyond it and its burst senders get 429 (errno 125); off: no limit"),
    setting("ua_rate_burst", Kind::Int, DefaultValue::Value("60"), "pushes a user agent may receive at once above ua_rate_limit's pace"),
    setting("subscription_rate_limit", Kind::Rate, DefaultValue::Value("120/m"), "pushes one subscription may receive; beyond it and its burst senders get 429 (errno 125); off: no limit"),
    setting("subscription_rate_burst", Kind::Int, DefaultValue::Value("30"), "pushes a subscription may receive at once above subscription_rate_limit's pace"),
    setting("sender_rate_limit", Kind::Rate, DefaultValue::Value("1000/s"), "pushes one application server (one VAPID key) may send; beyond it and its burst it gets 429 (errno 126); off: no limit"),
    setting("sender_rate_burst", Kind::Int, DefaultValue::Value("2000"), "pushes a VAPID key may send at once above sender_rate_limit's pace"),
    setting("anonymous_rate_limit", Kind::Rate, DefaultValue::Value("50/s"), "pushes without VAPID one client address may send (IPv6 by /64); beyond it and its burst it gets 429 (errno 126); off: no limit"),
    setting("anonymous_rate_burst", Kind::Int, DefaultValue::Value("100"), "pushes without VAPID a client address may send at once above anonymous_rate_limit's pace"),
    setting("trusted_proxies", Kind::Cidrs, DefaultValue::Unset, "addresses or CIDR ranges of reverse proxies whose Forwarded / X-Forwarded-For header names the real client; unset: the peer address is the client"),
    setting("admin_tokens", Kind::Tokens, DefaultValue::Unset, "bearer tokens for the admin API (/v1/admin/…, herald admin), comma-separated, 16+ characters each; unset: the admin API answers 404"),
    setting("require_vapid_key", Kind::Bool, DefaultValue::Value("false"), "refuse new subscriptions without an application server key (websocket register status 401; registration API 400, errno 128), so every endpoint is bound to one sender"),
    setting("user_agent_tokens", Kind::Tokens, DefaultValue::Unset, "private mode: user agents must present one of these tokens in hello (and the registration API in Authorization: Bearer), comma-separated, 16+ characters each; unset: anyone may connect"),
];

/// Variables other `herald` commands read (`herald send`, `listen`, `demo`,
/// `broadcast`): set in an operator's shell, they are not typos of a
/// setting. Kept equal to the commands' clap definitions by a unit test.
pub const OTHER_COMMANDS_ENV: &[&str] = &[
    "HERALD_ADMIN_TOKEN",
    "HERALD_ADMIN_URL",
    "HERALD_BROADCAST_TOKEN",
    "HERALD_LISTEN_STATE",
    "HERALD_LISTEN_TOKEN",
    "HERALD_PUSH_URL",
    "HERALD_VAPID_KEY",
    "HERALD_VAPID_SUBJECT",
];

/// `HERALD_*` variables in `env` that name no setting, each with the
/// closest setting's variable when one is a likely typo. Herald reads only
/// the variables of its settings, so a mistyped one would otherwise be
/// ignored without a word. `also_known` are variables read elsewhere.
pub fn unknown_env_vars<'a>(
    env: impl IntoIterator<Item = &'a str>,
    also_known: &[&str],
) -> Vec<(String, Option<String>)> {
    let known: Vec<String> = SETTINGS
        .iter()
        .map(Setting::env_var)
        .chain(also_known.iter().map(|s| s.to_string()))
        .collect();
    env.into_iter()
        .filter(|k| k.starts_with("HERALD_") && !known.iter().any(|n| n == k))
        .map(|k| {
            // Close enough to be a typo: two edits, more for long names.
            let closest = known
                .iter()
                .map(|n| (edit_distance(k, n), n))
                .min()
                .filter(|(d, n)| *d <= 2.max(n.len() / 6))
                .map(|(_, n)| n.clone());
            (k.to_string(), closest)
        })
        .collect()
}

/// Levenshtein distance, for suggesting the setting a typo meant.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

/// `herald serve` flags. Everything else is set in the file or environment.
#[derive(clap::Args, Debug, Default, Clone)]
#[command(after_long_help = settings_help())]
pub struct ServeArgs {
    #[arg(long, value_name = "ADDR", help = flag_help("listen", "Address for the websocket (GET / with Upgrade) and the HTTP API"))]
    pub listen: Option<String>,
    #[arg(long, value_name = "DIR", help = flag_help("data_dir", "Data directory, created if missing"))]
    pub data_dir: Option<String>,
    #[arg(long, value_name = "URL", help = flag_help("public_url", "Base of every endpoint URL handed out"))]
    pub public_url: Option<String>,
    /// TOML file with any of the settings listed below
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[arg(long, value_name = "FORMAT", help = flag_help("log_format", "Log format: text or json"))]
    pub log_format: Option<String>,
}

/// A flag's help with its setting's default from the table.
fn flag_help(name: &str, text: &str) -> String {
    let s = setting_named(name).expect("a flag names a setting");
    format!("{text} [default: {}]", s.shown_default())
}

/// The settings a flag may set, in `ServeArgs`' order.
const FLAG_SETTINGS: [&str; 4] = ["listen", "data_dir", "public_url", "log_format"];

fn settings_help() -> String {
    let mut s = String::from(
        "Settings (TOML key in --config FILE; environment variable HERALD_<KEY>).\n\
         Precedence: flags > environment > file > defaults. Durations: 30, 30s, 5m, 2h, 60d.\n\n",
    );
    for set in SETTINGS {
        let (name, help, d) = (set.name, set.help, set.shown_default());
        s.push_str(&format!("  {name:<22} {help} [default: {d}]\n"));
    }
    s.push_str(BRIDGES_HELP);
    s
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone)]
pub struct PublicUrl {
    /// Without a trailing slash.
    pub base: String,
    /// scheme://host[:port], the audience VAPID tokens must name.
    pub origin: String,
}

#[derive(Debug, Clone)]
pub struct Settings {
    pub listen: SocketAddr,
    pub endpoint_listen: Option<SocketAddr>,
    pub metrics_listen: Option<SocketAddr>,
    /// Serve /metrics on `listen` when `metrics_listen` is unset.
    pub metrics_public: bool,
    /// Where `/_herald/node/…` is served instead of `listen`.
    pub node_listen: Option<SocketAddr>,
    pub data_dir: PathBuf,
    pub public_url: PublicUrl,
    pub endpoint_keys: Vec<[u8; 32]>,
    pub hello_timeout: Duration,
    pub ping_interval: Duration,
    pub ping_timeout: Duration,
    pub max_connections: usize,
    /// The listen(2) backlog of every listening socket.
    pub listen_backlog: u32,
    pub max_channels_per_uaid: usize,
    pub max_frame_size: usize,
    pub client_rate_limit: u32,
    pub max_ttl: u64,
    pub max_message_bytes: usize,
    pub max_stored_messages: usize,
    pub ua_expiry: Duration,
    pub sync_writes: bool,
    pub delivery_window: usize,
    pub jwt_cache_size: usize,
    pub sweep_interval: Duration,
    /// How long decided receipts stay readable.
    pub receipt_retention: Duration,
    pub max_receipt_streams_per_subscription: usize,
    pub max_receipt_streams: usize,
    pub receipt_stream_lifetime: Duration,
    /// Runtime worker threads; None: one per core.
    pub worker_threads: Option<usize>,
    pub shutdown_timeout: Duration,
    pub log_format: LogFormat,
    pub log_level: String,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub store: StoreKind,
    pub redis_url: Option<String>,
    pub redis_wait_replicas: u32,
    pub redis_wait_timeout: Duration,
    pub node_url: String,
    pub broadcast_tokens: Vec<String>,
    pub broadcast_source_url: Option<String>,
    pub broadcast_source_token: Option<String>,
    pub broadcast_poll_interval: Duration,
    /// Keys of the registration API's secrets; the first issues new ones.
    pub bridge_auth_keys: Vec<String>,
    /// autopush-rs's keys: secrets it issued still verify, none are issued.
    pub autopush_auth_keys: Vec<String>,
    /// The FCM and APNs bridges, from the config file's `[bridges]` table.
    pub bridges: BridgeSettings,
    /// Opens endpoint tokens autopush-rs issued; None: only Herald's own.
    pub autopush_crypto_keys: Option<crate::autopush_token::AutopushTokens>,
    /// Quotas (see `quota`); None: that limit is off.
    pub ua_rate_limit: Option<Rate>,
    pub ua_rate_burst: u32,
    pub subscription_rate_limit: Option<Rate>,
    pub subscription_rate_burst: u32,
    pub sender_rate_limit: Option<Rate>,
    pub sender_rate_burst: u32,
    pub anonymous_rate_limit: Option<Rate>,
    pub anonymous_rate_burst: u32,
    /// Peers whose `Forwarded`/`X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<crate::cidr::Cidr>,
    /// Bearer tokens of the admin API; empty: no admin API.
    pub admin_tokens: Vec<String>,
    pub require_vapid_key: bool,
    /// Private mode: tokens a user agent must present; empty: open.
    pub user_agent_tokens: Vec<String>,
}

/// A pace: `count` events per `per`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub count: u32,
    pub per: Duration,
}

impl Rate {
    pub fn per_second(&self) -> f64 {
        self.count as f64 / self.per.as_secs_f64()
    }
}

/// The upstreams mobile user agents are reached through, one entry per
/// `app_id` (the registration API's `{app_id}` segment).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BridgeSettings {
    pub fcm: Vec<FcmBridgeSettings>,
    pub apns: Vec<ApnsBridgeSettings>,
}

/// `[bridges.fcm.<app_id>]`: FCM HTTP v1 for one Firebase project.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FcmBridgeSettings {
    pub app_id: String,
    pub project_id: String,
    /// A Google service-account JSON file (`client_email`, `private_key`,
    /// `token_uri`).
    pub credentials: PathBuf,
    /// Where `v1/projects/{project_id}/messages:send` lives; FCM's own
    /// host unless set.
    pub base_url: String,
    /// Extra trusted CA certificates (PEM) for `base_url` and `token_uri`,
    /// beside the public roots.
    pub ca: Option<PathBuf>,
}

/// `[bridges.apns.<app_id>]`: APNs for one app (bundle id).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApnsBridgeSettings {
    pub app_id: String,
    /// The bundle id, sent as `apns-topic`.
    pub topic: String,
    /// Apple's development environment instead of production.
    pub sandbox: bool,
    /// APNs' host for `sandbox` unless set.
    pub base_url: String,
    pub auth: ApnsAuth,
    /// Extra trusted CA certificates (PEM) for `base_url`.
    pub ca: Option<PathBuf>,
}

/// How Herald proves to APNs that it may push for the app.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApnsAuth {
    /// A provider token (ES256 JWT) signed with a `.p8` key.
    Token {
        team_id: String,
        key_id: String,
        key: PathBuf,
    },
    /// TLS client authentication with a certificate Apple issued for the app.
    Certificate { certificate: PathBuf, key: PathBuf },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    Rocksdb,
    Redis,
}

/// One bad setting: which, from where, and what is wrong.
#[derive(Debug, PartialEq)]
pub struct ConfigError(pub String);

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for ConfigError {}

/// Each setting's text and the layer it came from ("default", "config
/// file", "environment", "flag"), the later layers winning.
struct Layered {
    values: BTreeMap<&'static str, (String, &'static str)>,
    /// The config file's `[bridges]` table: tables, not one value, so it is
    /// read apart from the flat settings (`parse_bridges`).
    bridges: Option<toml::Value>,
}

impl Layered {
    /// Defaults, then the config file, then the environment, then flags.
    fn from_layers(args: &ServeArgs, env: &BTreeMap<String, String>) -> Result<Self, ConfigError> {
        let mut l = Layered {
            values: SETTINGS
                .iter()
                .map(|s| (s.name, (s.default_text().to_string(), "default")))
                .collect(),
            bridges: None,
        };
        if let Some(path) = &args.config {
            l.read_config_file(path)?;
        }
        for s in SETTINGS {
            if let Some(v) = env.get(&s.env_var()) {
                l.values.insert(s.name, (v.clone(), "environment"));
            }
        }
        let flags = [
            &args.listen,
            &args.data_dir,
            &args.public_url,
            &args.log_format,
        ];
        for (name, flag) in FLAG_SETTINGS.into_iter().zip(flags) {
            if let Some(v) = flag {
                l.values.insert(name, (v.clone(), "flag"));
            }
        }
        Ok(l)
    }

    /// A TOML table of settings; an unknown key is an error, not a silent
    /// default.
    fn read_config_file(&mut self, path: &std::path::Path) -> Result<(), ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("config file {}: {e}", path.display())))?;
        let table: toml::Table = toml::from_str(&text)
            .map_err(|e| ConfigError(format!("config file {}: {}", path.display(), e.message())))?;
        for (key, value) in table {
            if key == "bridges" {
                self.bridges = Some(value);
                continue;
            }
            let name = setting_named(&key).map(|s| s.name).ok_or_else(|| {
                ConfigError(format!(
                    "config file {}: unknown setting `{key}`",
                    path.display()
                ))
            })?;
            let text = toml_to_string(&value)
                .map_err(|e| ConfigError(format!("setting `{name}` (config file): {e}")))?;
            self.values.insert(name, (text, "config file"));
        }
        Ok(())
    }

    fn raw(&self, name: &str) -> (&str, &'static str) {
        let (v, src) = &self.values[name];
        (v.as_str(), src)
    }

    fn get<T>(
        &self,
        name: &str,
        parse: impl Fn(&str) -> Result<T, String>,
    ) -> Result<T, ConfigError> {
        let (v, src) = self.raw(name);
        parse(v).map_err(|e| ConfigError(format!("setting `{name}` ({src}, value {v:?}): {e}")))
    }

    fn opt<T>(
        &self,
        name: &str,
        parse: impl Fn(&str) -> Result<T, String>,
    ) -> Result<Option<T>, ConfigError> {
        if self.raw(name).0.trim().is_empty() {
            return Ok(None);
        }
        self.get(name, parse).map(Some)
    }
}

impl Settings {
    /// The settings of a command run from a shell (`serve`, `import`,
    /// `restore`): its flags and the process's `HERALD_*` variables, which
    /// are returned too. A bad setting is printed, and the command should
    /// exit with the code given back.
    pub fn for_command(
        args: &ServeArgs,
    ) -> Result<(Settings, BTreeMap<String, String>), std::process::ExitCode> {
        let env = std::env::vars()
            .filter(|(k, _)| k.starts_with("HERALD_"))
            .collect();
        match Settings::load(args, &env) {
            Ok(s) => Ok((s, env)),
            Err(e) => {
                eprintln!("herald: {e}");
                Err(std::process::ExitCode::from(2))
            }
        }
    }

    /// Builds settings from the layers. `env` is passed in (rather than read
    /// here) so tests can exercise precedence without touching the process.
    pub fn load(args: &ServeArgs, env: &BTreeMap<String, String>) -> Result<Settings, ConfigError> {
        let settings = Self::parse(&Layered::from_layers(args, env)?)?;
        settings.check_combinations()?;
        Ok(settings)
    }

    /// Each setting parsed on its own; `public_url` and `node_url` default
    /// from the listen addresses.
    fn parse(l: &Layered) -> Result<Settings, ConfigError> {
        let listen: SocketAddr = l.get("listen", parse_addr)?;
        let node_listen: Option<SocketAddr> = l.opt("node_listen", parse_addr)?;
        let public_url = public_url_or_listen(l, listen)?;
        Ok(Settings {
            listen,
            endpoint_listen: l.opt("endpoint_listen", parse_addr)?,
            metrics_listen: l.opt("metrics_listen", parse_addr)?,
            metrics_public: l.get("metrics_public", parse_bool)?,
            node_listen,
            data_dir: l.get("data_dir", parse_data_dir)?,
            public_url,
            endpoint_keys: l
                .opt("endpoint_keys", parse_endpoint_keys)?
                .unwrap_or_default(),
            hello_timeout: l.get("hello_timeout", parse_positive_duration)?,
            ping_interval: l.get("ping_interval", parse_positive_duration)?,
            ping_timeout: l.get("ping_timeout", parse_positive_duration)?,
            max_connections: l.get("max_connections", parse_count)?,
            listen_backlog: l.get("listen_backlog", parse_listen_backlog)?,
            max_channels_per_uaid: l.get("max_channels_per_uaid", parse_count)?,
            max_frame_size: l.get("max_frame_size", parse_frame_size)?,
            client_rate_limit: l.get("client_rate_limit", parse_u32_count)?,
            max_ttl: l.get("max_ttl", parse_duration)?.as_secs(),
            max_message_bytes: l.get("max_message_bytes", parse_count)?,
            max_stored_messages: l.get("max_stored_messages", parse_count)?,
            ua_expiry: l.get("ua_expiry", parse_positive_duration)?,
            sync_writes: l.get("sync_writes", parse_bool)?,
            delivery_window: l.get("delivery_window", parse_count)?,
            jwt_cache_size: l.get("jwt_cache_size", parse_count)?,
            sweep_interval: l.get("sweep_interval", parse_positive_duration)?,
            receipt_retention: l.get("receipt_retention", parse_positive_duration)?,
            max_receipt_streams_per_subscription: l
                .get("max_receipt_streams_per_subscription", parse_count)?,
            max_receipt_streams: l.get("max_receipt_streams", parse_count)?,
            receipt_stream_lifetime: l.get("receipt_stream_lifetime", parse_positive_duration)?,
            worker_threads: l.opt("worker_threads", parse_count)?,
            shutdown_timeout: l.get("shutdown_timeout", parse_duration)?,
            log_format: l.get("log_format", parse_log_format)?,
            log_level: l.get("log_level", parse_trimmed)?,
            tls_cert: l.opt("tls_cert", parse_path)?,
            tls_key: l.opt("tls_key", parse_path)?,
            store: l.get("store", parse_store_kind)?,
            redis_url: l.opt("redis_url", parse_redis_url)?,
            redis_wait_replicas: l.get("redis_wait_replicas", parse_whole_u32)?,
            redis_wait_timeout: l.get("redis_wait_timeout", parse_positive_duration)?,
            node_url: match l.opt("node_url", parse_node_url)? {
                Some(u) => u,
                None => format!("http://{}", node_listen.unwrap_or(listen)),
            },
            broadcast_tokens: l
                .opt("broadcast_tokens", parse_broadcast_tokens)?
                .unwrap_or_default(),
            broadcast_source_url: l.opt("broadcast_source_url", parse_source_url)?,
            broadcast_source_token: l.opt("broadcast_source_token", parse_trimmed)?,
            broadcast_poll_interval: l.get("broadcast_poll_interval", parse_positive_duration)?,
            bridge_auth_keys: l
                .opt("bridge_auth_keys", parse_broadcast_tokens)?
                .unwrap_or_default(),
            autopush_auth_keys: l
                .opt("autopush_auth_keys", parse_autopush_auth_keys)?
                .unwrap_or_default(),
            bridges: parse_bridges(l.bridges.as_ref())?,
            autopush_crypto_keys: l.opt(
                "autopush_crypto_keys",
                crate::autopush_token::AutopushTokens::parse,
            )?,
            ua_rate_limit: l.get("ua_rate_limit", parse_rate)?,
            ua_rate_burst: l.get("ua_rate_burst", parse_u32_count)?,
            subscription_rate_limit: l.get("subscription_rate_limit", parse_rate)?,
            subscription_rate_burst: l.get("subscription_rate_burst", parse_u32_count)?,
            sender_rate_limit: l.get("sender_rate_limit", parse_rate)?,
            sender_rate_burst: l.get("sender_rate_burst", parse_u32_count)?,
            anonymous_rate_limit: l.get("anonymous_rate_limit", parse_rate)?,
            anonymous_rate_burst: l.get("anonymous_rate_burst", parse_u32_count)?,
            trusted_proxies: l.opt("trusted_proxies", parse_cidrs)?.unwrap_or_default(),
            admin_tokens: l
                .opt("admin_tokens", parse_broadcast_tokens)?
                .unwrap_or_default(),
            require_vapid_key: l.get("require_vapid_key", parse_bool)?,
            user_agent_tokens: l
                .opt("user_agent_tokens", parse_broadcast_tokens)?
                .unwrap_or_default(),
        })
    }

    /// Rules that span settings.
    fn check_combinations(&self) -> Result<(), ConfigError> {
        let bridged = !self.bridges.fcm.is_empty() || !self.bridges.apns.is_empty();
        if bridged && self.bridge_auth_keys.is_empty() {
            return Err(ConfigError(
                "setting `bridge_auth_keys`: required with a [bridges.fcm.*] or [bridges.apns.*] table (the registration API signs its secrets with it)".into(),
            ));
        }
        if self.store == StoreKind::Redis {
            if self.redis_url.is_none() {
                return Err(ConfigError(
                    "setting `redis_url`: required with store = redis".into(),
                ));
            }
            // Every node must open every other node's endpoints and ids.
            if self.endpoint_keys.is_empty() {
                return Err(ConfigError(
                    "setting `endpoint_keys`: required with store = redis, the same on every node (generate one with `herald keygen`)".into(),
                ));
            }
        }
        if self.node_listen.is_some() && self.store != StoreKind::Redis {
            return Err(ConfigError(
                "setting `node_listen`: only with store = redis (a single node has no node-to-node traffic)".into(),
            ));
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return Err(ConfigError(
                "settings `tls_cert` and `tls_key`: set both or neither".into(),
            ));
        }
        Ok(())
    }
}

/// `public_url`, or the listen address when it names a host.
fn public_url_or_listen(l: &Layered, listen: SocketAddr) -> Result<PublicUrl, ConfigError> {
    match l.opt("public_url", parse_public_url)? {
        Some(u) => Ok(u),
        // A wildcard address accepts connections but names no host: the
        // endpoints handed out would point nowhere.
        None if listen.ip().is_unspecified() => Err(ConfigError(format!(
            "setting `public_url`: required when `listen` is a wildcard address ({listen}): \
             endpoints would be handed out as http://{listen}/..., which no application server can reach; \
             set public_url to the URL the outside world reaches Herald at, e.g. https://push.example.com"
        ))),
        None => parse_public_url(&format!("http://{listen}")).map_err(ConfigError),
    }
}

fn parse_data_dir(v: &str) -> Result<PathBuf, String> {
    if v.trim().is_empty() {
        Err("must not be empty".into())
    } else {
        Ok(PathBuf::from(v))
    }
}

fn parse_path(v: &str) -> Result<PathBuf, String> {
    Ok(PathBuf::from(v.trim()))
}

fn parse_trimmed(v: &str) -> Result<String, String> {
    Ok(v.trim().to_string())
}

/// Comma-separated; blanks between commas are ignored.
fn comma_list(v: &str) -> Vec<String> {
    v.split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

fn parse_endpoint_keys(v: &str) -> Result<Vec<[u8; 32]>, String> {
    crate::token::parse_keys(&comma_list(v))
}

fn parse_broadcast_tokens(v: &str) -> Result<Vec<String>, String> {
    let tokens = comma_list(v);
    if tokens.iter().any(|t| t.len() < 16) {
        return Err("each token must be at least 16 characters".into());
    }
    Ok(tokens)
}

/// `100/s`, `240/m`, `5000/h`, or `off` (None).
pub fn parse_rate(v: &str) -> Result<Option<Rate>, String> {
    let v = v.trim();
    if v.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    let bad = || {
        format!("{v:?}: expected a count per second, minute or hour (100/s, 240/m, 5000/h) or off")
    };
    let (count, unit) = v.split_once('/').ok_or_else(bad)?;
    let count: u32 = count.trim().parse().map_err(|_| bad())?;
    let per = match unit.trim() {
        "s" => Duration::from_secs(1),
        "m" => Duration::from_secs(60),
        "h" => Duration::from_secs(3600),
        _ => return Err(bad()),
    };
    if count == 0 {
        return Err(format!(
            "{v:?}: a rate must be at least 1 (write off for no limit)"
        ));
    }
    Ok(Some(Rate { count, per }))
}

fn parse_cidrs(v: &str) -> Result<Vec<crate::cidr::Cidr>, String> {
    comma_list(v)
        .iter()
        .map(|c| crate::cidr::Cidr::parse(c))
        .collect()
}

fn parse_frame_size(v: &str) -> Result<usize, String> {
    let n = parse_count(v)?;
    if n < 1024 {
        Err("must be at least 1024 bytes".into())
    } else {
        Ok(n)
    }
}

/// The largest `listen_backlog` taken: 65535, the most `net.core.somaxconn`
/// could be before Linux 5.4 and far beyond any accept queue worth having
/// (the kernel caps the backlog at `somaxconn` in any case).
pub const MAX_LISTEN_BACKLOG: u32 = 65535;

fn parse_listen_backlog(v: &str) -> Result<u32, String> {
    let n = parse_u32_count(v)?;
    if n > MAX_LISTEN_BACKLOG {
        Err(format!(
            "must be at most {MAX_LISTEN_BACKLOG} (the kernel caps it at net.core.somaxconn anyway)"
        ))
    } else {
        Ok(n)
    }
}

fn parse_u32_count(v: &str) -> Result<u32, String> {
    parse_count(v).and_then(|n| u32::try_from(n).map_err(|_| "too large".to_string()))
}

fn parse_whole_u32(v: &str) -> Result<u32, String> {
    v.trim()
        .parse::<u32>()
        .map_err(|_| "expected a whole number".to_string())
}

fn parse_log_format(v: &str) -> Result<LogFormat, String> {
    match v.trim() {
        "text" => Ok(LogFormat::Text),
        "json" => Ok(LogFormat::Json),
        _ => Err("must be text or json".into()),
    }
}

fn parse_store_kind(v: &str) -> Result<StoreKind, String> {
    match v.trim() {
        "rocksdb" => Ok(StoreKind::Rocksdb),
        "redis" => Ok(StoreKind::Redis),
        _ => Err("must be rocksdb or redis".into()),
    }
}

fn toml_to_string(v: &toml::Value) -> Result<String, String> {
    match v {
        toml::Value::String(s) => Ok(s.clone()),
        toml::Value::Integer(i) => Ok(i.to_string()),
        toml::Value::Boolean(b) => Ok(b.to_string()),
        toml::Value::Float(f) => Ok(f.to_string()),
        toml::Value::Array(items) => items
            .iter()
            .map(toml_to_string)
            .collect::<Result<Vec<_>, _>>()
            .map(|v| v.join(",")),
        _ => Err("expected a string, number, boolean or list".into()),
    }
}

/// One `redis://` URL, or several comma-separated (cluster seed nodes).
fn parse_redis_url(v: &str) -> Result<String, String> {
    let urls: Vec<&str> = v
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .collect();
    if urls.is_empty() {
        return Err("expected redis://host:port".into());
    }
    for u in &urls {
        if !(u.starts_with("redis://") || u.starts_with("rediss://")) {
            return Err(format!("{u:?} is not a redis:// or rediss:// URL"));
        }
    }
    Ok(urls.join(","))
}

fn parse_source_url(v: &str) -> Result<String, String> {
    let v = v.trim();
    match v.parse::<http::Uri>() {
        Ok(u) if matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some() => {
            Ok(v.to_string())
        }
        _ => Err("expected an http:// or https:// URL".into()),
    }
}

/// Node-to-node requests are plain HTTP for now: the node client has no TLS,
/// so an https:// node_url would make every wake-up fail (and messages wait
/// for the 30 s re-read). Refused at start rather than failing quietly;
/// requests are signed, and node_listen keeps them on a private network.
fn parse_node_url(v: &str) -> Result<String, String> {
    let v = v.trim().trim_end_matches('/');
    match v.parse::<http::Uri>() {
        Ok(u) if u.scheme_str() == Some("https") => Err(
            "https:// is not supported for node-to-node requests yet: use http:// on a private network (see node_listen)"
                .into(),
        ),
        Ok(u) if u.scheme_str() == Some("http") && u.host().is_some() => Ok(v.to_string()),
        _ => Err("expected an http:// URL".into()),
    }
}

fn parse_addr(v: &str) -> Result<SocketAddr, String> {
    v.trim()
        .parse()
        .map_err(|_| "expected an address like 127.0.0.1:8080 or [::]:8080".into())
}

fn parse_count(v: &str) -> Result<usize, String> {
    match v.trim().parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(_) => Err("expected a whole number".into()),
    }
}

fn parse_bool(v: &str) -> Result<bool, String> {
    match v.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err("expected true or false".into()),
    }
}

/// `30`, `30s`, `500ms`, `5m`, `2h`, `60d`.
pub fn parse_duration(v: &str) -> Result<Duration, String> {
    let v = v.trim();
    let split = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let (num, unit) = v.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| "expected a duration like 30s, 5m, 2h or 60d".to_string())?;
    let secs = |mult: u64| {
        n.checked_mul(mult)
            .map(Duration::from_secs)
            .ok_or_else(|| "duration too large".to_string())
    };
    match unit.trim() {
        "" | "s" => secs(1),
        "ms" => Ok(Duration::from_millis(n)),
        "m" => secs(60),
        "h" => secs(3600),
        "d" => secs(86400),
        _ => Err("unknown unit: use ms, s, m, h or d".into()),
    }
}

fn parse_positive_duration(v: &str) -> Result<Duration, String> {
    let d = parse_duration(v)?;
    if d.is_zero() {
        Err("must be longer than zero".into())
    } else {
        Ok(d)
    }
}

fn parse_public_url(v: &str) -> Result<PublicUrl, String> {
    let v = v.trim().trim_end_matches('/');
    let uri: http::Uri = v.parse().map_err(|_| "not a URL".to_string())?;
    let scheme = uri.scheme_str().unwrap_or("");
    if scheme != "http" && scheme != "https" {
        return Err("must start with http:// or https://".into());
    }
    let host = uri.host().ok_or_else(|| "has no host".to_string())?;
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if bare
        .parse::<std::net::IpAddr>()
        .is_ok_and(|ip| ip.is_unspecified())
    {
        return Err(format!(
            "host {host} is a wildcard address, which no application server can reach; use the name or address clients connect to"
        ));
    }
    if uri.query().is_some() {
        return Err("must not have a query".into());
    }
    let origin = match uri.port_u16() {
        Some(p) if !((scheme == "http" && p == 80) || (scheme == "https" && p == 443)) => {
            format!("{scheme}://{host}:{p}")
        }
        _ => format!("{scheme}://{host}"),
    };
    Ok(PublicUrl {
        base: v.to_string(),
        origin: origin.to_ascii_lowercase(),
    })
}

// ---------------------------------------------------------------------------
// The `[bridges.fcm.<app_id>]` and `[bridges.apns.<app_id>]` tables
// ---------------------------------------------------------------------------

/// `--help`'s part on the bridge tables, which are no flat settings (and so
/// have no environment variable).
const BRIDGES_HELP: &str = "\nBridges to mobile devices (config file only; one table per app_id of the registration API):\n  \
[bridges.fcm.<app_id>]   project_id, credentials (service-account JSON file), base_url [default: https://fcm.googleapis.com], ca\n  \
[bridges.apns.<app_id>]  topic, sandbox [default: false], base_url [default: per sandbox], ca, and either\n                           \
team_id, key_id, key (.p8 file) or certificate, key (PEM client certificate and key)\n";

const FCM_BASE_URL: &str = "https://fcm.googleapis.com";
const APNS_BASE_URL: &str = "https://api.push.apple.com";
const APNS_SANDBOX_BASE_URL: &str = "https://api.sandbox.push.apple.com";

/// autopush-rs's `auth_keys` as it is written there (`["k1","k2"]`: quotes
/// and spaces dropped, brackets around) or as a plain comma-separated list.
fn parse_autopush_auth_keys(v: &str) -> Result<Vec<String>, String> {
    let bare: String = v.chars().filter(|c| *c != '"' && *c != ' ').collect();
    let inner = bare
        .strip_prefix('[')
        .and_then(|b| b.strip_suffix(']'))
        .unwrap_or(&bare);
    let keys = comma_list(inner);
    if keys.is_empty() {
        return Err("expected at least one key".into());
    }
    Ok(keys)
}

/// One bridge table's fields, each taken once; what is left over is an
/// unknown field. `at` is the table's dotted name for errors.
struct Fields {
    at: String,
    table: toml::Table,
}

impl Fields {
    fn new(at: String, v: &toml::Value) -> Result<Fields, ConfigError> {
        match v {
            toml::Value::Table(t) => Ok(Fields {
                at,
                table: t.clone(),
            }),
            _ => Err(ConfigError(format!("setting `{at}`: expected a table"))),
        }
    }

    fn err(&self, field: &str, what: impl std::fmt::Display) -> ConfigError {
        ConfigError(format!(
            "setting `{}.{field}` (config file): {what}",
            self.at
        ))
    }

    fn text(&mut self, field: &str) -> Result<Option<String>, ConfigError> {
        match self.table.remove(field) {
            None => Ok(None),
            Some(toml::Value::String(s)) if !s.trim().is_empty() => Ok(Some(s.trim().to_string())),
            Some(_) => Err(self.err(field, "expected non-empty text")),
        }
    }

    fn required(&mut self, field: &str) -> Result<String, ConfigError> {
        self.text(field)?
            .ok_or_else(|| self.err(field, "missing (required)"))
    }

    /// A file Herald must read at start: it must exist and be readable now,
    /// so a wrong path stops Herald here rather than failing every push.
    fn file(&mut self, field: &str) -> Result<Option<PathBuf>, ConfigError> {
        let Some(path) = self.text(field)?.map(PathBuf::from) else {
            return Ok(None);
        };
        match std::fs::metadata(&path) {
            Ok(m) if m.is_file() => {}
            Ok(_) => return Err(self.err(field, format!("{} is not a file", path.display()))),
            Err(e) => return Err(self.err(field, format!("{}: {e}", path.display()))),
        }
        if let Err(e) = std::fs::File::open(&path) {
            return Err(self.err(field, format!("{} is unreadable: {e}", path.display())));
        }
        Ok(Some(path))
    }

    fn required_file(&mut self, field: &str) -> Result<PathBuf, ConfigError> {
        self.file(field)?
            .ok_or_else(|| self.err(field, "missing (required)"))
    }

    fn base_url(&mut self, default: &str) -> Result<String, ConfigError> {
        match self.text("base_url")? {
            None => Ok(default.to_string()),
            Some(u) => parse_source_url(&u)
                .map(|u| u.trim_end_matches('/').to_string())
                .map_err(|e| self.err("base_url", e)),
        }
    }

    fn bool(&mut self, field: &str) -> Result<bool, ConfigError> {
        match self.table.remove(field) {
            None => Ok(false),
            Some(toml::Value::Boolean(b)) => Ok(b),
            Some(_) => Err(self.err(field, "expected true or false")),
        }
    }

    /// Refuses what no rule took: a misspelt field would otherwise be
    /// ignored without a word.
    fn finish(self) -> Result<(), ConfigError> {
        match self.table.keys().next() {
            None => Ok(()),
            Some(k) => Err(ConfigError(format!(
                "setting `{}.{k}` (config file): unknown field",
                self.at
            ))),
        }
    }
}

/// `[bridges]`: `fcm` and `apns`, each a table of apps by `app_id`.
fn parse_bridges(v: Option<&toml::Value>) -> Result<BridgeSettings, ConfigError> {
    let mut out = BridgeSettings::default();
    let Some(v) = v else {
        return Ok(out);
    };
    let Some(kinds) = v.as_table() else {
        return Err(ConfigError("setting `bridges`: expected a table".into()));
    };
    for (kind, apps) in kinds {
        let Some(apps) = apps.as_table() else {
            return Err(ConfigError(format!(
                "setting `bridges.{kind}`: expected a table of apps"
            )));
        };
        for (app_id, table) in apps {
            let fields = Fields::new(format!("bridges.{kind}.{app_id}"), table)?;
            match kind.as_str() {
                "fcm" => out.fcm.push(parse_fcm(app_id, fields)?),
                "apns" => out.apns.push(parse_apns(app_id, fields)?),
                _ => {
                    return Err(ConfigError(format!(
                        "setting `bridges.{kind}`: unknown bridge (use fcm or apns)"
                    )))
                }
            }
        }
    }
    Ok(out)
}

fn parse_fcm(app_id: &str, mut f: Fields) -> Result<FcmBridgeSettings, ConfigError> {
    let s = FcmBridgeSettings {
        app_id: app_id.to_string(),
        project_id: f.required("project_id")?,
        credentials: f.required_file("credentials")?,
        base_url: f.base_url(FCM_BASE_URL)?,
        ca: f.file("ca")?,
    };
    f.finish()?;
    Ok(s)
}

fn parse_apns(app_id: &str, mut f: Fields) -> Result<ApnsBridgeSettings, ConfigError> {
    let topic = f.required("topic")?;
    let sandbox = f.bool("sandbox")?;
    let base_url = f.base_url(if sandbox {
        APNS_SANDBOX_BASE_URL
    } else {
        APNS_BASE_URL
    })?;
    let ca = f.file("ca")?;
    let token = ["team_id", "key_id"]
        .iter()
        .any(|k| f.table.contains_key(*k));
    let auth = match (token, f.table.contains_key("certificate")) {
        (true, true) => {
            return Err(f.err(
                "certificate",
                "set either team_id, key_id and key (provider token) or certificate and key (client certificate), not both",
            ))
        }
        (false, false) => {
            return Err(f.err(
                "team_id",
                "missing: set team_id, key_id and key (provider token), or certificate and key (client certificate)",
            ))
        }
        (true, false) => ApnsAuth::Token {
            team_id: f.required("team_id")?,
            key_id: f.required("key_id")?,
            key: f.required_file("key")?,
        },
        (false, true) => ApnsAuth::Certificate {
            certificate: f.required_file("certificate")?,
            key: f.required_file("key")?,
        },
    };
    f.finish()?;
    Ok(ApnsBridgeSettings {
        app_id: app_id.to_string(),
        topic,
        sandbox,
        base_url,
        auth,
        ca,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_are_valid() {
        let s = Settings::load(&ServeArgs::default(), &BTreeMap::new()).unwrap();
        assert_eq!(s.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(s.public_url.base, "http://127.0.0.1:8080");
        assert_eq!(s.public_url.origin, "http://127.0.0.1:8080");
        assert_eq!(s.data_dir, PathBuf::from("./herald-data"));
        assert_eq!(s.hello_timeout, Duration::from_secs(10));
        assert_eq!(s.max_ttl, 30 * 86400);
        assert_eq!(s.ua_expiry, Duration::from_secs(60 * 86400));
        assert!(!s.sync_writes);
    }

    /// Ties the loader to the table: every setting whose kind can be
    /// written wrong is read, and refuses a value its kind refuses, with
    /// an error that names it.
    #[test]
    fn every_setting_is_read_as_its_kind() {
        for s in SETTINGS {
            let bad = match s.kind {
                Kind::Addr => "nowhere",
                Kind::Url => "ftp://x",
                Kind::Keys | Kind::Tokens => "short",
                Kind::RedisUrls => "http://x",
                Kind::Duration => "soon",
                Kind::Int => "0",
                Kind::Count => "-1",
                Kind::Bool => "maybe",
                Kind::OneOf(_) => "neither",
                Kind::Rate => "fast",
                Kind::Cidrs => "10.0.0.0/99",
                Kind::Path | Kind::Text | Kind::LogLevel => continue,
            };
            let err = Settings::load(&ServeArgs::default(), &env(&[(&s.env_var(), bad)]))
                .expect_err(s.name);
            assert!(
                err.0.contains(&format!("`{}`", s.name)),
                "{}: {err}",
                s.name
            );
        }
    }

    #[test]
    fn the_table_is_well_formed() {
        let mut names: Vec<&str> = SETTINGS.iter().map(|s| s.name).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), SETTINGS.len(), "a setting is listed twice");
        for s in SETTINGS {
            assert!(!s.help.is_empty(), "{} has no help", s.name);
            if let (Kind::OneOf(allowed), DefaultValue::Value(v)) = (s.kind, s.default) {
                assert!(allowed.contains(&v), "{}: default {v:?}", s.name);
            }
        }
        let help = settings_help();
        assert!(help.contains("public_url"));
        assert!(help.contains("[default: http://<listen>]"), "{help}");
        assert!(flag_help("listen", "x").ends_with("[default: 127.0.0.1:8080]"));
    }

    #[test]
    fn worker_threads_default_to_one_per_core_and_must_be_positive() {
        let load = |pairs: &[(&str, &str)]| Settings::load(&ServeArgs::default(), &env(pairs));
        assert_eq!(load(&[]).unwrap().worker_threads, None);
        let one = load(&[("HERALD_WORKER_THREADS", "1")]).unwrap();
        assert_eq!(one.worker_threads, Some(1));
        assert!(load(&[("HERALD_WORKER_THREADS", "0")]).is_err());
    }

    #[test]
    fn listen_backlog_defaults_to_4096_and_refuses_zero_and_absurd_values() {
        let load = |pairs: &[(&str, &str)]| Settings::load(&ServeArgs::default(), &env(pairs));
        assert_eq!(load(&[]).unwrap().listen_backlog, 4096);
        let set = load(&[("HERALD_LISTEN_BACKLOG", " 128 ")]).unwrap();
        assert_eq!(set.listen_backlog, 128);
        let most = MAX_LISTEN_BACKLOG.to_string();
        let top = load(&[("HERALD_LISTEN_BACKLOG", most.as_str())]).unwrap();
        assert_eq!(top.listen_backlog, MAX_LISTEN_BACKLOG);
        for (bad, says) in [
            ("0", "must be at least 1"),
            ("-1", "expected a whole number"),
            ("lots", "expected a whole number"),
            ("65536", "must be at most 65535"),
            ("99999999999", "too large"),
        ] {
            let e = load(&[("HERALD_LISTEN_BACKLOG", bad)]).unwrap_err().0;
            assert!(
                e.starts_with("setting `listen_backlog` (environment"),
                "{bad}: {e}"
            );
            assert!(e.contains(says), "{bad}: {e}");
        }
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("herald.toml");
        std::fs::write(&file, "listen_backlog = 1024\n").unwrap();
        let args = ServeArgs {
            config: Some(file),
            ..ServeArgs::default()
        };
        let from_file = Settings::load(&args, &BTreeMap::new()).unwrap();
        assert_eq!(from_file.listen_backlog, 1024);
        let over = Settings::load(&args, &env(&[("HERALD_LISTEN_BACKLOG", "2048")])).unwrap();
        assert_eq!(
            over.listen_backlog, 2048,
            "the environment overrides the file"
        );
    }

    #[test]
    fn redis_mode_needs_a_url_and_shared_keys() {
        let load = |pairs: &[(&str, &str)]| Settings::load(&ServeArgs::default(), &env(pairs));
        let s = load(&[]).unwrap();
        assert_eq!(s.store, StoreKind::Rocksdb);
        assert_eq!(s.node_url, "http://127.0.0.1:8080");
        let e = load(&[("HERALD_STORE", "redis")]).unwrap_err();
        assert!(e.0.contains("redis_url"), "{e}");
        let e = load(&[
            ("HERALD_STORE", "redis"),
            ("HERALD_REDIS_URL", "redis://127.0.0.1:6379"),
        ])
        .unwrap_err();
        assert!(e.0.starts_with("setting `endpoint_keys`"), "{e}");
        let key = herald_proto::b64::encode_b64url(&[7u8; 32]);
        let s = load(&[
            ("HERALD_STORE", "redis"),
            (
                "HERALD_REDIS_URL",
                "redis://127.0.0.1:7000, redis://127.0.0.1:7001",
            ),
            ("HERALD_ENDPOINT_KEYS", &key),
            ("HERALD_NODE_URL", "http://10.0.0.5:8080/"),
        ])
        .unwrap();
        assert_eq!(
            s.redis_url.as_deref(),
            Some("redis://127.0.0.1:7000,redis://127.0.0.1:7001")
        );
        assert_eq!(s.node_url, "http://10.0.0.5:8080");
        assert!(load(&[("HERALD_STORE", "mongo")]).is_err());
        assert!(load(&[("HERALD_REDIS_URL", "http://x")]).is_err());
        assert!(load(&[("HERALD_NODE_URL", "not a url")]).is_err());
    }

    #[test]
    fn node_listen_and_node_url() {
        let load = |pairs: &[(&str, &str)]| Settings::load(&ServeArgs::default(), &env(pairs));
        let key = herald_proto::b64::encode_b64url(&[7u8; 32]);
        let redis = [
            ("HERALD_STORE", "redis"),
            ("HERALD_REDIS_URL", "redis://127.0.0.1:7000"),
            ("HERALD_ENDPOINT_KEYS", key.as_str()),
        ];
        let with = |extra: &[(&'static str, &'static str)]| {
            let mut all: Vec<(&str, &str)> = redis.to_vec();
            all.extend_from_slice(extra);
            load(&all)
        };
        let s = with(&[]).unwrap();
        assert_eq!(
            (s.node_listen, s.node_url.as_str()),
            (None, "http://127.0.0.1:8080")
        );
        // node_url follows node_listen unless set.
        let s = with(&[("HERALD_NODE_LISTEN", "10.0.0.5:8081")]).unwrap();
        assert_eq!(s.node_listen.unwrap().to_string(), "10.0.0.5:8081");
        assert_eq!(s.node_url, "http://10.0.0.5:8081");
        // https would be accepted and then fail every wake-up: refused.
        let e = with(&[("HERALD_NODE_URL", "https://10.0.0.5:8081")]).unwrap_err();
        assert!(
            e.0.contains("`node_url`") && e.0.contains("https:// is not supported"),
            "{e}"
        );
        // A single node has no node traffic to listen for.
        let e = load(&[("HERALD_NODE_LISTEN", "127.0.0.1:8081")]).unwrap_err();
        assert!(e.0.contains("`node_listen`"), "{e}");
    }

    #[test]
    fn metrics_are_private_unless_asked_otherwise() {
        let load = |pairs: &[(&str, &str)]| Settings::load(&ServeArgs::default(), &env(pairs));
        let s = load(&[]).unwrap();
        assert_eq!((s.metrics_listen, s.metrics_public), (None, false));
        assert!(
            load(&[("HERALD_METRICS_PUBLIC", "true")])
                .unwrap()
                .metrics_public
        );
        assert!(load(&[("HERALD_METRICS_PUBLIC", "maybe")]).is_err());
    }

    #[test]
    fn precedence_is_flags_env_file_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("h.toml");
        std::fs::write(
            &file,
            "listen = \"127.0.0.1:1000\"\nmax_ttl = \"1h\"\nmax_channels_per_uaid = 7\nsync_writes = true\n",
        )
        .unwrap();
        let args = ServeArgs {
            config: Some(file.clone()),
            ..Default::default()
        };
        let s = Settings::load(&args, &BTreeMap::new()).unwrap();
        assert_eq!(s.listen.port(), 1000);
        assert_eq!(s.max_ttl, 3600);
        assert_eq!(s.max_channels_per_uaid, 7);
        assert!(s.sync_writes);

        let e = env(&[
            ("HERALD_LISTEN", "127.0.0.1:2000"),
            ("HERALD_MAX_TTL", "2h"),
        ]);
        let s = Settings::load(&args, &e).unwrap();
        assert_eq!(s.listen.port(), 2000);
        assert_eq!(s.max_ttl, 7200);

        let args = ServeArgs {
            config: Some(file),
            listen: Some("127.0.0.1:3000".into()),
            ..Default::default()
        };
        let s = Settings::load(&args, &e).unwrap();
        assert_eq!(s.listen.port(), 3000);
        assert_eq!(s.public_url.base, "http://127.0.0.1:3000");
    }

    #[test]
    fn bad_values_name_the_setting() {
        let e = env(&[("HERALD_HELLO_TIMEOUT", "soon")]);
        let err = Settings::load(&ServeArgs::default(), &e).unwrap_err();
        assert!(
            err.0.contains("hello_timeout") && err.0.contains("environment"),
            "{err}"
        );

        let args = ServeArgs {
            listen: Some("nowhere".into()),
            ..Default::default()
        };
        let err = Settings::load(&args, &BTreeMap::new()).unwrap_err();
        assert!(
            err.0.contains("`listen`") && err.0.contains("flag"),
            "{err}"
        );

        let args = ServeArgs {
            public_url: Some("ftp://x".into()),
            ..Default::default()
        };
        assert!(Settings::load(&args, &BTreeMap::new())
            .unwrap_err()
            .0
            .contains("public_url"));

        let e = env(&[("HERALD_ENDPOINT_KEYS", "short")]);
        assert!(Settings::load(&ServeArgs::default(), &e)
            .unwrap_err()
            .0
            .contains("endpoint_keys"));

        let e = env(&[("HERALD_TLS_CERT", "/c.pem")]);
        assert!(Settings::load(&ServeArgs::default(), &e)
            .unwrap_err()
            .0
            .contains("tls_key"));
    }

    #[test]
    fn unknown_file_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("h.toml");
        std::fs::write(&file, "lisen = \"x\"\n").unwrap();
        let args = ServeArgs {
            config: Some(file),
            ..Default::default()
        };
        let err = Settings::load(&args, &BTreeMap::new()).unwrap_err();
        assert!(err.0.contains("unknown setting `lisen`"), "{err}");
    }

    #[test]
    fn unknown_environment_variables_are_named_with_the_closest_setting() {
        let found = unknown_env_vars(
            [
                "HERALD_MAX_TTLS",
                "HERALD_MAX_TTL",
                "HERALD_LISTEN",
                "HERALD_VAPID_KEY",
                "HERALD_PUBLICURL",
                "HERALD_SOMETHING_ELSE_ENTIRELY",
                "PATH",
            ],
            OTHER_COMMANDS_ENV,
        );
        assert_eq!(
            found,
            vec![
                (
                    "HERALD_MAX_TTLS".to_string(),
                    Some("HERALD_MAX_TTL".to_string())
                ),
                (
                    "HERALD_PUBLICURL".to_string(),
                    Some("HERALD_PUBLIC_URL".to_string())
                ),
                ("HERALD_SOMETHING_ELSE_ENTIRELY".to_string(), None),
            ]
        );
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("same", "same"), 0);
    }

    /// OTHER_COMMANDS_ENV is what the other commands' clap definitions read.
    #[test]
    fn other_commands_env_matches_their_flags() {
        use clap::{Args, Subcommand};
        fn envs(cmd: &clap::Command, out: &mut Vec<String>) {
            for a in cmd.get_arguments() {
                if let Some(e) = a.get_env() {
                    out.push(e.to_string_lossy().into_owned());
                }
            }
            for sub in cmd.get_subcommands() {
                envs(sub, out);
            }
        }
        let mut found = Vec::new();
        let new = || clap::Command::new("herald");
        for cmd in [
            crate::appserver::VapidCommand::augment_subcommands(new()),
            crate::appserver::SendArgs::augment_args(new()),
            crate::demo::DemoArgs::augment_args(new()),
            crate::broadcast::cli::BroadcastCommand::augment_subcommands(new()),
            crate::admin::cli::AdminCommand::augment_subcommands(new()),
            crate::listen::ListenArgs::augment_args(new()),
            ServeArgs::augment_args(new()),
        ] {
            envs(&cmd, &mut found);
        }
        found.sort();
        found.dedup();
        assert_eq!(found, OTHER_COMMANDS_ENV);
    }

    #[test]
    fn a_wildcard_listen_address_needs_a_public_url() {
        for listen in ["0.0.0.0:8080", "[::]:8080"] {
            let args = ServeArgs {
                listen: Some(listen.into()),
                ..Default::default()
            };
            let err = Settings::load(&args, &BTreeMap::new()).unwrap_err();
            assert!(err.0.starts_with("setting `public_url`: required"), "{err}");
            let e = env(&[("HERALD_PUBLIC_URL", "https://push.example.com")]);
            let s = Settings::load(&args, &e).unwrap();
            assert_eq!(s.public_url.origin, "https://push.example.com");
        }
        for wild in ["http://0.0.0.0:8080", "http://[::]:8080/"] {
            let e = env(&[("HERALD_PUBLIC_URL", wild)]);
            let err = Settings::load(&ServeArgs::default(), &e).unwrap_err();
            assert!(
                err.0.contains("public_url") && err.0.contains("wildcard"),
                "{err}"
            );
        }
    }

    #[test]
    fn public_url_origin() {
        let u = parse_public_url("https://Push.Example.com/").unwrap();
        assert_eq!(u.base, "https://Push.Example.com");
        assert_eq!(u.origin, "https://push.example.com");
        let u = parse_public_url("https://push.example.com:443/prefix").unwrap();
        assert_eq!(u.origin, "https://push.example.com");
        assert_eq!(u.base, "https://push.example.com:443/prefix");
        let u = parse_public_url("http://localhost:8080").unwrap();
        assert_eq!(u.origin, "http://localhost:8080");
    }

    /// Loads `toml` as the config file, with the files it names created
    /// in `dir` first.
    fn load_file(dir: &std::path::Path, toml: &str) -> Result<Settings, ConfigError> {
        for f in ["sa.json", "key.p8", "cert.pem", "ca.pem"] {
            std::fs::write(dir.join(f), "x").unwrap();
        }
        let file = dir.join("h.toml");
        std::fs::write(&file, toml.replace("DIR", &dir.display().to_string())).unwrap();
        let args = ServeArgs {
            config: Some(file),
            ..Default::default()
        };
        Settings::load(&args, &BTreeMap::new())
    }

    const KEYS: &str =
        "bridge_auth_keys = [\"0123456789abcdef-first\", \"0123456789abcdef-old\"]\n";

    #[test]
    fn bridge_tables_are_read_with_their_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let s = load_file(
            dir.path(),
            &format!(
                "{KEYS}autopush_auth_keys = '[\"k1\", \"k2\"]'\n\
                 [bridges.fcm.fenix]\nproject_id = \"p1\"\ncredentials = \"DIR/sa.json\"\n\
                 [bridges.fcm.beta]\nproject_id = \"p2\"\ncredentials = \"DIR/sa.json\"\nbase_url = \"http://127.0.0.1:9/\"\nca = \"DIR/ca.pem\"\n\
                 [bridges.apns.firefox]\ntopic = \"org.mozilla.ios.Firefox\"\nteam_id = \"T\"\nkey_id = \"K\"\nkey = \"DIR/key.p8\"\n\
                 [bridges.apns.beta]\ntopic = \"b\"\nsandbox = true\ncertificate = \"DIR/cert.pem\"\nkey = \"DIR/key.p8\"\n"
            ),
        )
        .unwrap();
        assert_eq!(s.bridge_auth_keys.len(), 2);
        assert_eq!(s.autopush_auth_keys, ["k1", "k2"]);
        let fcm: Vec<_> = s
            .bridges
            .fcm
            .iter()
            .map(|f| (f.app_id.as_str(), f.base_url.as_str()))
            .collect();
        assert!(
            fcm.contains(&("fenix", "https://fcm.googleapis.com")),
            "{fcm:?}"
        );
        assert!(fcm.contains(&("beta", "http://127.0.0.1:9")), "{fcm:?}");
        let apns = |id: &str| {
            s.bridges
                .apns
                .iter()
                .find(|a| a.app_id == id)
                .unwrap()
                .clone()
        };
        assert_eq!(apns("firefox").base_url, "https://api.push.apple.com");
        assert!(
            matches!(apns("firefox").auth, ApnsAuth::Token { ref team_id, .. } if team_id == "T")
        );
        assert_eq!(apns("beta").base_url, "https://api.sandbox.push.apple.com");
        assert!(matches!(apns("beta").auth, ApnsAuth::Certificate { .. }));
    }

    #[test]
    fn bad_bridge_tables_name_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let fcm = "[bridges.fcm.fenix]\nproject_id = \"p\"\n";
        let apns = "[bridges.apns.ios]\ntopic = \"t\"\n";
        for (toml, named) in [
            (format!("{KEYS}{fcm}"), "`bridges.fcm.fenix.credentials`"),
            (format!("{KEYS}{fcm}credentials = \"DIR/nope.json\"\n"), "`bridges.fcm.fenix.credentials`"),
            (format!("{KEYS}{fcm}credentials = \"DIR\"\n"), "`bridges.fcm.fenix.credentials`"),
            (format!("{KEYS}{fcm}credentials = \"DIR/sa.json\"\nprojectid = \"x\"\n"), "`bridges.fcm.fenix.projectid`"),
            (format!("{KEYS}{fcm}credentials = \"DIR/sa.json\"\nca = \"DIR/none.pem\"\n"), "`bridges.fcm.fenix.ca`"),
            (format!("{KEYS}{apns}"), "`bridges.apns.ios.team_id`"),
            (format!("{KEYS}{apns}team_id = \"T\"\nkey = \"DIR/key.p8\"\n"), "`bridges.apns.ios.key_id`"),
            (format!("{KEYS}{apns}team_id = \"T\"\nkey_id = \"K\"\nkey = \"DIR/gone.p8\"\n"), "`bridges.apns.ios.key`"),
            (format!("{KEYS}{apns}team_id = \"T\"\nkey_id = \"K\"\nkey = \"DIR/key.p8\"\ncertificate = \"DIR/cert.pem\"\n"), "`bridges.apns.ios.certificate`"),
            (format!("{KEYS}[bridges.adm.x]\n"), "`bridges.adm`"),
            (format!("{fcm}credentials = \"DIR/sa.json\"\n"), "`bridge_auth_keys`"),
        ] {
            let err = load_file(dir.path(), &toml).expect_err(&toml);
            assert!(err.0.contains(named), "{toml}\n=> {err}");
        }
    }

    #[test]
    fn autopush_auth_keys_take_autopush_s_form_and_a_plain_list() {
        assert_eq!(
            parse_autopush_auth_keys(r#"["a=", "b"]"#).unwrap(),
            ["a=", "b"]
        );
        assert_eq!(parse_autopush_auth_keys("a,b").unwrap(), ["a", "b"]);
        assert!(parse_autopush_auth_keys("[]").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(
            parse_duration("60d").unwrap(),
            Duration::from_secs(60 * 86400)
        );
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert!(parse_duration("5 weeks").is_err());
        assert!(parse_duration("").is_err());
        assert!(parse_positive_duration("0").is_err());
    }
}
