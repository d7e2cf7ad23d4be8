//! Processes the application-server and browser tests drive: `herald serve`,
//! `herald demo` and a headless Firefox, each killed when dropped, plus a
//! tiny blocking HTTP client for the demo's JSON API.
//!
//! Blocking on purpose: the tests only poll and wait, and keeping them out
//! of an async runtime makes every timeout an ordinary loop.
#![allow(dead_code)]

use serde_json::Value;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const HERALD: &str = env!("CARGO_BIN_EXE_herald");

/// A port nobody listens on right now (bind to 0 and release it).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind 127.0.0.1:0")
        .local_addr()
        .expect("local addr")
        .port()
}

/// Polls `check` every 200 ms until it yields a value or `timeout` passes.
pub fn wait_for<T>(timeout: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The last `n` lines of a log file, for failure messages.
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A child process in its own process group, so stopping it also stops
/// whatever it started (Firefox's content processes).
pub struct Proc {
    name: String,
    child: Option<Child>,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(name: &str, mut command: Command, log: PathBuf) -> Proc {
        let out = std::fs::File::create(&log).expect("create log file");
        let err = out.try_clone().expect("clone log handle");
        command
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0);
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({command:?}): {e}"));
        Proc {
            name: name.to_owned(),
            child: Some(child),
            log,
        }
    }

    /// `Some(status)` when the process has exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut()?.try_wait().ok().flatten()
    }

    pub fn log_tail(&self, n: usize) -> String {
        format!(
            "--- last lines of {} log ({}):\n{}",
            self.name,
            self.log.display(),
            tail(&self.log, n)
        )
    }

    /// SIGTERM to the process group, then SIGKILL if it lingers past `grace`.
    pub fn stop(&mut self, grace: Duration) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let group = format!("-{}", child.id());
        let _ = kill(&["-TERM", "--", &group]);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        // Also reaps stragglers in the group after the leader exited.
        let _ = kill(&["-KILL", "--", &group]);
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Runs kill(1); "no such process" for an already gone group is expected.
fn kill(args: &[&str]) -> std::io::Result<std::process::ExitStatus> {
    Command::new("kill")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(5));
    }
}

/// `herald serve` on an ephemeral port with a temporary data dir.
pub struct HeraldServer {
    pub port: u16,
    pub proc: Proc,
    _dir: Option<tempfile::TempDir>,
}

impl HeraldServer {
    pub fn start() -> HeraldServer {
        let dir = tempfile::tempdir().expect("temp dir");
        let (port, proc) = Self::spawn(dir.path(), "herald", None, &[]);
        HeraldServer {
            port,
            proc,
            _dir: Some(dir),
        }
    }

    /// Like [`HeraldServer::start`], with data and log under `dir`.
    pub fn start_in(dir: &Path) -> HeraldServer {
        let (port, proc) = Self::spawn(dir, "herald", None, &[]);
        HeraldServer {
            port,
            proc,
            _dir: None,
        }
    }

    /// One node of several: data and log under `dir/name`, endpoints on
    /// `public_url` (the first node's URL when None; `{port}` in it is this
    /// node's port), settings from `env`.
    pub fn start_node(
        dir: &Path,
        name: &str,
        public_url: Option<&str>,
        env: &[(&str, &str)],
    ) -> HeraldServer {
        let (port, proc) = Self::spawn(dir, name, public_url, env);
        HeraldServer {
            port,
            proc,
            _dir: None,
        }
    }

    fn spawn(
        dir: &Path,
        name: &str,
        public_url: Option<&str>,
        env: &[(&str, &str)],
    ) -> (u16, Proc) {
        let port = free_port();
        let own = format!("http://127.0.0.1:{port}");
        // `{port}` in a public URL stands for the port chosen here.
        let public_url = public_url.map(|u| u.replace("{port}", &port.to_string()));
        let public_url = public_url.as_deref();
        let mut command = Command::new(HERALD);
        command
            .arg("serve")
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--data-dir")
            .arg(dir.join(format!("{name}-data")))
            .arg("--public-url")
            .arg(public_url.unwrap_or(&own))
            .env("RUST_LOG", "info")
            // Quotas off unless `env` sets them (it comes after).
            .env("HERALD_UA_RATE_LIMIT", "off")
            .env("HERALD_SUBSCRIPTION_RATE_LIMIT", "off")
            .env("HERALD_SENDER_RATE_LIMIT", "off")
            .env("HERALD_ANONYMOUS_RATE_LIMIT", "off")
            .envs(env.iter().copied());
        let mut proc = Proc::spawn("herald serve", command, dir.join(format!("{name}.log")));
        let up = wait_for(Duration::from_secs(30), || {
            if let Some(status) = proc.exited() {
                panic!(
                    "herald serve exited at start with {status}\n{}",
                    proc.log_tail(40)
                );
            }
            TcpStream::connect(("127.0.0.1", port)).ok()
        });
        assert!(
            up.is_some(),
            "herald serve did not listen on {port} within 30 s\n{}",
            proc.log_tail(40)
        );
        (port, proc)
    }

    /// Herald's public URL, which endpoints start with.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn ws_url(&self) -> String {
        format!("ws://127.0.0.1:{}/", self.port)
    }
}

/// `herald demo` pointed at a Herald, on an ephemeral port.
pub struct DemoServer {
    pub port: u16,
    pub proc: Proc,
    pub data_dir: PathBuf,
}

impl DemoServer {
    pub fn start(push_url: &str, dir: &Path) -> DemoServer {
        let port = free_port();
        let data_dir = dir.join("demo-data");
        let mut command = Command::new(HERALD);
        command
            .arg("demo")
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--push-url")
            .arg(push_url)
            .arg("--data-dir")
            .arg(&data_dir)
            .env("RUST_LOG", "info");
        let mut proc = Proc::spawn("herald demo", command, dir.join("demo.log"));
        let demo_port = port;
        let up = wait_for(Duration::from_secs(30), || {
            if let Some(status) = proc.exited() {
                panic!(
                    "herald demo exited at start with {status}\n{}",
                    proc.log_tail(40)
                );
            }
            http("127.0.0.1", demo_port, "GET", "/vapid-public-key", None)
                .ok()
                .filter(|r| r.status == 200)
        });
        assert!(
            up.is_some(),
            "herald demo did not answer within 30 s\n{}",
            proc.log_tail(40)
        );
        DemoServer {
            port,
            proc,
            data_dir,
        }
    }

    /// The page URL; `localhost` because that is a secure context for
    /// service workers.
    pub fn page_url(&self, query: &str) -> String {
        format!("http://localhost:{}/{query}", self.port)
    }

    pub fn get_json(&self, path: &str) -> Value {
        let r = http("127.0.0.1", self.port, "GET", path, None).unwrap_or_else(|e| {
            panic!(
                "GET {path} on the demo failed: {e}\n{}",
                self.proc.log_tail(30)
            )
        });
        assert_eq!(r.status, 200, "GET {path}: {}", r.body);
        serde_json::from_str(&r.body)
            .unwrap_or_else(|e| panic!("GET {path} is not JSON ({e}): {}", r.body))
    }

    pub fn post_json(&self, path: &str, body: &Value) -> (u16, Value) {
        let r = http(
            "127.0.0.1",
            self.port,
            "POST",
            path,
            Some(&body.to_string()),
        )
        .unwrap_or_else(|e| {
            panic!(
                "POST {path} on the demo failed: {e}\n{}",
                self.proc.log_tail(30)
            )
        });
        let json = serde_json::from_str(&r.body).unwrap_or(Value::Null);
        (r.status, json)
    }
}

pub struct HttpReply {
    pub status: u16,
    pub body: String,
}

/// One HTTP/1.1 request with `Connection: close`; enough for a local JSON API.
pub fn http(
    host: &str,
    port: u16,
    method: &str,
    path: &str,
    json: Option<&str>,
) -> std::io::Result<HttpReply> {
    let headers: &[(&str, &str)] = match json {
        Some(_) => &[("Content-Type", "application/json")],
        None => &[],
    };
    http_with(
        host,
        port,
        method,
        path,
        headers,
        json.unwrap_or("").as_bytes(),
    )
}

/// Like [`http`], with any headers and a binary body.
pub fn http_with(
    host: &str,
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<HttpReply> {
    let mut stream = TcpStream::connect((host, port))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut request =
        format!("{method} {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    let mut request = request.into_bytes();
    request.extend_from_slice(body);
    stream.write_all(&request)?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let raw = String::from_utf8_lossy(&raw).into_owned();
    let bad = || {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("bad HTTP reply: {raw:?}"),
        )
    };
    let (head, body) = raw.split_once("\r\n\r\n").ok_or_else(bad)?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(bad)?;
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_owned()
    };
    Ok(HttpReply { status, body })
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if size == 0 || rest.len() < size {
            break;
        }
        out.push_str(&rest[..size]);
        body = rest[size..].trim_start_matches("\r\n");
    }
    out
}

/// The preferences that point Firefox's push service at a local Herald
/// (see NOTES.md), plus quiet-start settings for unattended runs.
pub fn write_profile(profile: &Path, push_ws_url: &str) {
    std::fs::create_dir_all(profile).expect("create profile dir");
    let prefs = [
        ("dom.push.serverURL", format!("\"{push_ws_url}\"")),
        ("dom.push.testing.allowInsecureServerURL", "true".into()),
        ("dom.push.enabled", "true".into()),
        ("dom.push.connection.enabled", "true".into()),
        ("permissions.default.desktop-notification", "1".into()),
        ("dom.push.testing.ignorePermission", "true".into()),
        // Pushes that show no notification eat into a per-site quota; the
        // headless browser cannot show any, so lift it.
        ("dom.push.maxQuotaPerSubscription", "1000".into()),
        ("dom.push.loglevel", "\"debug\"".into()),
        ("devtools.console.stdout.chrome", "true".into()),
        ("browser.shell.checkDefaultBrowser", "false".into()),
        ("datareporting.policy.dataSubmissionEnabled", "false".into()),
        ("toolkit.telemetry.reportingpolicy.firstRun", "false".into()),
        ("app.update.enabled", "false".into()),
        ("app.update.disabledForTesting", "true".into()),
        ("network.connectivity-service.enabled", "false".into()),
        ("network.captive-portal-service.enabled", "false".into()),
        ("network.proxy.type", "0".into()),
        // The tests kill the browser; it must not greet the next start with
        // a session-restore page instead of ours.
        ("browser.sessionstore.resume_from_crash", "false".into()),
        (
            "browser.startup.homepage_override.mstone",
            "\"ignore\"".into(),
        ),
        ("browser.aboutwelcome.enabled", "false".into()),
        // Firefox reloads visited pages in a hidden "thumbnail" container to
        // draw new-tab tiles. That copy of the demo page would subscribe
        // too, and have its subscription cleared moments later.
        ("browser.pagethumbnails.capturing_disabled", "true".into()),
        ("browser.newtabpage.enabled", "false".into()),
        (
            "browser.newtabpage.activity-stream.feeds.topsites",
            "false".into(),
        ),
    ];
    let text: String = prefs
        .iter()
        .map(|(name, value)| format!("user_pref(\"{name}\", {value});\n"))
        .collect();
    std::fs::write(profile.join("user.js"), text).expect("write user.js");
}

/// The Firefox binary the tests use.
pub fn firefox_binary() -> Result<PathBuf, String> {
    for name in ["firefox-esr", "firefox"] {
        let found = std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join(name))
                .find(|candidate| candidate.is_file())
        });
        if let Some(path) = found {
            return Ok(path);
        }
    }
    Err(
        "neither firefox-esr nor firefox is on PATH; install it with scripts/install-firefox.sh"
            .into(),
    )
}

/// A headless Firefox on a given profile, stopped when dropped.
pub struct Firefox {
    pub proc: Proc,
}

impl Firefox {
    /// Starts Firefox on `profile` at `url`. Panics with the reason if the
    /// binary is missing or the browser dies during its first seconds.
    pub fn launch(profile: &Path, url: &str, log: PathBuf) -> Firefox {
        let binary = firefox_binary().unwrap_or_else(|e| panic!("{e}"));
        let mut command = Command::new(&binary);
        command
            .args(["--headless", "--no-remote", "--profile"])
            .arg(profile)
            .arg(url)
            .env("MOZ_CRASHREPORTER_DISABLE", "1")
            .env("MOZ_DISABLE_AUTO_SAFE_MODE", "1");
        let mut proc = Proc::spawn("firefox", command, log);
        // A browser that cannot start (missing libraries, sandbox refusal)
        // exits within a few seconds; say so instead of timing out later.
        std::thread::sleep(Duration::from_secs(3));
        if let Some(status) = proc.exited() {
            panic!(
                "Firefox ({}) exited right after start with {status}; the browser cannot run here\n{}",
                binary.display(),
                proc.log_tail(40)
            );
        }
        Firefox { proc }
    }

    /// Fails with the browser's log if it died.
    pub fn assert_running(&mut self) {
        if let Some(status) = self.proc.exited() {
            panic!("Firefox died with {status}\n{}", self.proc.log_tail(60));
        }
    }

    /// Closes the browser (SIGTERM, then SIGKILL after 10 s).
    pub fn close(mut self) {
        self.proc.stop(Duration::from_secs(10));
    }
}
