//! A real Matrix homeserver for tests: Synapse from the virtualenv that
//! `make test-deps` (scripts/install-synapse.sh) fills, started on a free
//! loopback port with SQLite in a temporary directory, no federation and no
//! stats reporting, and stopped by its PID on Drop.
//!
//! Synapse refuses outgoing requests to private and loopback addresses
//! (`ip_range_blacklist` defaults to them); its pushers go through that
//! guarded client, so the config allows 127.0.0.1 (`ip_range_whitelist`),
//! which is what lets a pusher reach a gateway on loopback. Proxy variables
//! are removed from its environment: the pushers' client honours them.
//!
//! Users are registered through the shared-secret admin API
//! (`/_synapse/admin/v1/register`) by Synapse's own `register_new_matrix_user`,
//! which computes the HMAC as documented, then log in with their password
//! over the client-server API, as a Matrix client does.
//!
//! Needs `mod common;` in the test crate (HTTP requests go through
//! `common::request`).
#![allow(dead_code)]

use crate::common::{process, request, Resp};
use base64::Engine;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// What installs Synapse where it is missing.
pub const INSTALL: &str = "make test-deps (or scripts/install-synapse.sh)";

/// The registration shared secret of every test homeserver.
const SHARED_SECRET: &str = "herald-test-registration-secret";

/// The server name users live under (`@alice:herald.test`).
pub const SERVER_NAME: &str = "herald.test";

/// The virtualenv scripts/install-synapse.sh installs into.
pub fn venv() -> PathBuf {
    std::env::var_os("HERALD_SYNAPSE_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp/herald-synapse-venv"))
}

/// The venv's interpreter, after checking that Synapse is installed there.
fn python() -> PathBuf {
    let venv = venv();
    let python = venv.join("bin/python");
    let found = Command::new(&python)
        .args(["-c", "import synapse; print(synapse.__version__)"])
        .output();
    match found {
        Ok(out) if out.status.success() => python,
        Ok(out) => panic!(
            "Synapse is not installed in {} ({}): run {INSTALL}",
            venv.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Err(e) => panic!(
            "no Python virtualenv with Synapse at {} ({e}): run {INSTALL}",
            venv.display()
        ),
    }
}

pub struct Synapse {
    dir: tempfile::TempDir,
    pub port: u16,
    /// From spawning the process to its first answer.
    pub started_in: Duration,
    child: Child,
    log: PathBuf,
}

impl Synapse {
    /// A fresh homeserver, answering `/_matrix/client/versions`.
    pub async fn start() -> Synapse {
        let python = python();
        let begun = Instant::now();
        let dir = tempfile::Builder::new()
            .prefix("herald-synapse-")
            .tempdir()
            .expect("tempdir");
        let port = free_port();
        let config = dir.path().join("homeserver.yaml");
        // JSON is YAML, and serde_json does the quoting.
        let yaml = serde_json::to_string_pretty(&homeserver_config(dir.path(), port)).unwrap();
        std::fs::write(&config, yaml).expect("homeserver.yaml");
        std::fs::write(dir.path().join("signing.key"), signing_key()).expect("signing key");
        let log = dir.path().join("synapse.log");
        let child = Command::new(python)
            .args(["-m", "synapse.app.homeserver", "--config-path"])
            .arg(&config)
            .current_dir(dir.path())
            .env_remove("http_proxy")
            .env_remove("https_proxy")
            .env_remove("HTTP_PROXY")
            .env_remove("HTTPS_PROXY")
            .env_remove("all_proxy")
            .env_remove("ALL_PROXY")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).expect("log"))
            .stderr(std::fs::File::options().append(true).open(&log).unwrap())
            .spawn()
            .expect("synapse starts");
        process::watchdog(
            child.id(),
            "grep -q synapse.app.homeserver /proc/$pid/cmdline 2>/dev/null",
            "TERM",
        );
        let mut synapse = Synapse {
            dir,
            port,
            started_in: Duration::ZERO,
            child,
            log,
        };
        synapse.wait_ready().await;
        synapse.started_in = begun.elapsed();
        synapse
    }

    async fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let r = request("GET", &self.url("/_matrix/client/versions"), &[], vec![]).await;
            if matches!(r, Ok(ref r) if r.status == 200) {
                return;
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("synapse exited with {status} at start:\n{}", self.logs());
            }
            assert!(
                Instant::now() < deadline,
                "synapse did not answer /_matrix/client/versions within 60 s:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url())
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Registers `name` (not an admin) with the shared secret and logs in.
    pub async fn user(&self, name: &str) -> MatrixUser {
        let password = format!("{name}-password-1");
        let script = venv().join("bin/register_new_matrix_user");
        let args: Vec<String> = vec![
            "--user".into(),
            name.into(),
            "--password".into(),
            password.clone(),
            "--no-admin".into(),
            "--shared-secret".into(),
            SHARED_SECRET.into(),
            self.base_url(),
        ];
        let out = tokio::task::spawn_blocking(move || {
            Command::new(&script)
                .args(&args)
                .stdin(Stdio::null())
                .output()
                .unwrap_or_else(|e| panic!("{} ({e}); run {INSTALL}", script.display()))
        })
        .await
        .unwrap();
        assert!(
            out.status.success(),
            "register_new_matrix_user {name}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let login = json!({
            "type": "m.login.password",
            "identifier": {"type": "m.id.user", "user": name},
            "password": password,
            "initial_device_display_name": format!("{name}'s test device"),
        });
        let r = call(self, None, "POST", "/_matrix/client/v3/login", Some(login)).await;
        let v = ok(&r, "login");
        MatrixUser {
            base: self.base_url(),
            user_id: v["user_id"].as_str().expect("user_id").to_string(),
            token: v["access_token"]
                .as_str()
                .expect("access_token")
                .to_string(),
            log: self.log.clone(),
        }
    }
}

/// A logged-in user, with the client-server calls the tests make.
pub struct MatrixUser {
    base: String,
    pub user_id: String,
    token: String,
    log: PathBuf,
}

impl MatrixUser {
    /// Sends a client-server API request as this user.
    pub async fn call(&self, method: &str, path: &str, body: Option<Value>) -> Resp {
        send_json(&self.base, Some(&self.token), method, path, body).await
    }

    async fn call_ok(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let r = self.call(method, path, body).await;
        if r.status != 200 {
            panic!(
                "{method} {path} as {}: {} {}\nsynapse log:\n{}",
                self.user_id,
                r.status,
                String::from_utf8_lossy(&r.body),
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
        r.json()
    }

    /// A private room with `invite` invited; its room id.
    pub async fn create_room(&self, invite: &[&str]) -> String {
        let v = self
            .call_ok(
                "POST",
                "/_matrix/client/v3/createRoom",
                Some(json!({"preset": "private_chat", "invite": invite})),
            )
            .await;
        v["room_id"].as_str().expect("room_id").to_string()
    }

    pub async fn join(&self, room_id: &str) {
        let path = format!("/_matrix/client/v3/join/{}", encode(room_id));
        self.call_ok("POST", &path, Some(json!({}))).await;
    }

    /// An `m.text` message; its event id.
    pub async fn send_text(&self, room_id: &str, body: &str) -> String {
        let txn = format!("t{}", rand::random::<u64>());
        let path = format!(
            "/_matrix/client/v3/rooms/{}/send/m.room.message/{txn}",
            encode(room_id)
        );
        let v = self
            .call_ok(
                "PUT",
                &path,
                Some(json!({"msgtype": "m.text", "body": body})),
            )
            .await;
        v["event_id"].as_str().expect("event_id").to_string()
    }

    /// An HTTP pusher as a UnifiedPush Matrix client sets it: `pushkey` is
    /// the push endpoint, `data.url` the gateway, `format` as the client
    /// asks (`event_id_only`, or none for the full event).
    pub async fn set_pusher(&self, app_id: &str, pushkey: &str, url: &str, format: Option<&str>) {
        let mut data = json!({"url": url});
        if let Some(f) = format {
            data["format"] = json!(f);
        }
        let body = json!({
            "kind": "http",
            "app_id": app_id,
            "pushkey": pushkey,
            "app_display_name": "Herald test",
            "device_display_name": "test phone",
            "lang": "en",
            "data": data,
        });
        self.call_ok("POST", "/_matrix/client/v3/pushers/set", Some(body))
            .await;
    }

    /// The pushkeys of this user's pushers, as Synapse lists them.
    pub async fn pushkeys(&self) -> Vec<String> {
        let v = self
            .call_ok("GET", "/_matrix/client/v3/pushers", None)
            .await;
        v["pushers"]
            .as_array()
            .expect("pushers")
            .iter()
            .map(|p| p["pushkey"].as_str().expect("pushkey").to_string())
            .collect()
    }

    /// Waits until Synapse no longer lists `pushkey`; how long that took.
    pub async fn wait_pusher_gone(&self, pushkey: &str, within: Duration) -> Duration {
        let start = Instant::now();
        loop {
            let keys = self.pushkeys().await;
            if !keys.iter().any(|k| k == pushkey) {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < within,
                "pusher {pushkey} still there after {within:?}: {keys:?}\nsynapse log:\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

async fn call(
    s: &Synapse,
    token: Option<&str>,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> Resp {
    send_json(&s.base_url(), token, method, path, body).await
}

async fn send_json(
    base: &str,
    token: Option<&str>,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> Resp {
    let auth = token.map(|t| format!("Bearer {t}"));
    let mut headers = vec![("content-type", "application/json")];
    if let Some(a) = &auth {
        headers.push(("authorization", a));
    }
    let body = body.map(|b| b.to_string().into_bytes()).unwrap_or_default();
    request(method, &format!("{base}{path}"), &headers, body)
        .await
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}

fn ok(r: &Resp, what: &str) -> Value {
    assert_eq!(
        r.status,
        200,
        "{what}: {}",
        String::from_utf8_lossy(&r.body)
    );
    r.json()
}

/// Room ids hold `!` and `:`, which go percent-encoded into a path.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// What a homeserver for one test needs, and nothing that reaches outside:
/// no federation listener, no key servers, no stats, loopback only.
fn homeserver_config(dir: &std::path::Path, port: u16) -> Value {
    let path = |name: &str| dir.join(name).to_str().unwrap().to_string();
    // Generous limits: a test's few logins and messages must never meet 429.
    let generous = json!({"per_second": 1000, "burst_count": 1000});
    json!({
        "server_name": SERVER_NAME,
        "pid_file": path("homeserver.pid"),
        "listeners": [{
            "port": port,
            "bind_addresses": ["127.0.0.1"],
            "type": "http",
            "tls": false,
            "x_forwarded": false,
            "resources": [{"names": ["client"], "compress": false}],
        }],
        "database": {"name": "sqlite3", "args": {"database": path("homeserver.db")}},
        "media_store_path": path("media"),
        "signing_key_path": path("signing.key"),
        "report_stats": false,
        "registration_shared_secret": SHARED_SECRET,
        "macaroon_secret_key": "herald-test-macaroon-secret",
        "form_secret": "herald-test-form-secret",
        "trusted_key_servers": [],
        "federation_domain_whitelist": [],
        "ip_range_whitelist": ["127.0.0.1"],
        "enable_metrics": false,
        "use_presence": false,
        "rc_message": generous,
        "rc_login": {"address": generous, "account": generous, "failed_attempts": generous},
        "rc_joins": {"local": generous, "remote": generous},
    })
}

/// An ed25519 signing key in Synapse's file format: algorithm, key id and
/// the unpadded base64 of a 32-byte seed.
fn signing_key() -> String {
    let seed: [u8; 32] = rand::random();
    let b64 = base64::engine::general_purpose::STANDARD_NO_PAD.encode(seed);
    format!("ed25519 a_herald {b64}\n")
}

/// A port below the ephemeral range, apart from the other harnesses' ranges.
fn free_port() -> u16 {
    for _ in 0..1000 {
        let port = 28000 + rand::random::<u16>() % 2000;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port for synapse")
}

impl Drop for Synapse {
    fn drop(&mut self) {
        process::stop(&mut self.child, "TERM");
    }
}

/// One POST a gateway received.
#[derive(Debug, Clone)]
pub struct Notify {
    pub method: String,
    pub path: String,
    pub content_type: Option<String>,
    pub body: Value,
    /// When the gateway answered it.
    pub answered: Instant,
}

/// A stand-in push gateway on loopback: records what the homeserver POSTs
/// and answers `{"rejected": [...]}` with the pushkeys it is told to reject.
/// It shows what Synapse sends a gateway, independent of Herald's gateway.
pub struct NotifyRecorder {
    pub port: u16,
    received: tokio::sync::mpsc::UnboundedReceiver<Notify>,
    reject: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    server: tokio::task::JoinHandle<()>,
}

impl NotifyRecorder {
    pub async fn start() -> NotifyRecorder {
        use http_body_util::{BodyExt, Full};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (tx, received) = tokio::sync::mpsc::unbounded_channel();
        let reject = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let rejecting = reject.clone();
        let server = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let tx = tx.clone();
                let rejecting = rejecting.clone();
                let service =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let tx = tx.clone();
                        let rejecting = rejecting.clone();
                        async move {
                            let method = req.method().to_string();
                            let path = req.uri().path().to_string();
                            let content_type = req
                                .headers()
                                .get("content-type")
                                .map(|v| v.to_str().unwrap_or("").to_string());
                            let bytes = req.into_body().collect().await?.to_bytes();
                            let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                            let rejected = rejecting.lock().unwrap().clone();
                            let reply = json!({ "rejected": rejected }).to_string();
                            let _ = tx.send(Notify {
                                method,
                                path,
                                content_type,
                                body,
                                answered: Instant::now(),
                            });
                            Ok::<_, hyper::Error>(
                                http::Response::builder()
                                    .header("content-type", "application/json")
                                    .body(Full::new(bytes::Bytes::from(reply)))
                                    .unwrap(),
                            )
                        }
                    });
                tokio::spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        NotifyRecorder {
            port,
            received,
            reject,
            server,
        }
    }

    /// The gateway URL a pusher's `data.url` names.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/_matrix/push/v1/notify", self.port)
    }

    /// Answers `rejected: keys` from now on.
    pub fn reject(&self, keys: &[&str]) {
        *self.reject.lock().unwrap() = keys.iter().map(|k| k.to_string()).collect();
    }

    /// The next POST within `within`, or None.
    pub async fn next(&mut self, within: Duration) -> Option<Notify> {
        tokio::time::timeout(within, self.received.recv())
            .await
            .ok()
            .flatten()
    }
}

impl Drop for NotifyRecorder {
    fn drop(&mut self) {
        self.server.abort();
    }
}
