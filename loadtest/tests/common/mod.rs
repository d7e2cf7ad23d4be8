//! Helpers shared by the integration tests: run the load generator with a
//! deadline and read back its JSON.

#![allow(dead_code)]

use serde_json::Value;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn loadtest_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_herald-loadtest"))
}

/// Output of one run of the tool.
pub struct Ran {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

/// Runs the tool with a hard deadline; a hung run fails the test instead of
/// hanging it.
pub fn run(args: &[&str], deadline: Duration) -> Ran {
    let dir = tempfile::tempdir().expect("tempdir");
    let out_path = dir.path().join("stdout");
    let err_path = dir.path().join("stderr");
    let mut child = Command::new(loadtest_bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).expect("stdout file"))
        .stderr(std::fs::File::create(&err_path).expect("stderr file"))
        .spawn()
        .expect("starting herald-loadtest");
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("waiting for herald-loadtest") {
            break Some(s);
        }
        if start.elapsed() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let ran = Ran {
        ok: status.is_some_and(|s| s.success()),
        stdout: std::fs::read_to_string(&out_path).unwrap_or_default(),
        stderr: std::fs::read_to_string(&err_path).unwrap_or_default(),
    };
    assert!(
        status.is_some(),
        "herald-loadtest {args:?} still running after {deadline:?}\nstdout:\n{}\nstderr:\n{}",
        ran.stdout,
        ran.stderr
    );
    ran
}

/// Runs `report` on `args` (results files and options) writing `html`; the
/// run must succeed. Returns the page.
pub fn report(args: &[&str], html: &Path) -> String {
    let mut all = vec!["report"];
    all.extend_from_slice(args);
    all.extend(["--out", html.to_str().expect("utf-8 path")]);
    let ran = run(&all, Duration::from_secs(30));
    assert!(ran.ok, "report failed: {}", ran.stderr);
    std::fs::read_to_string(html).expect("report written")
}

/// A fanout run without errors in which every follower heard of every change
/// once and nobody else heard anything.
pub fn assert_fanout_clean(f: &Value, followers: f64, non_followers: f64, changes: f64) {
    assert_no_errors(f);
    assert_eq!(metric(f, "followers_connected"), followers);
    assert_eq!(metric(f, "non_followers_connected"), non_followers);
    assert_eq!(metric(f, "changes_complete"), changes);
    assert_eq!(metric(f, "frames_received"), followers * changes);
    assert_eq!(metric(f, "missing"), 0.0);
    assert_eq!(metric(f, "duplicates"), 0.0);
    assert_eq!(metric(f, "non_follower_frames"), 0.0);
}

/// Runs fanout against `url` with a `token` the broadcast API at `api`
/// refuses; the run must fail saying so.
pub fn assert_fanout_token_refused(url: &str, api: &str, token: &str) {
    let ran = run(
        &[
            "fanout",
            "--url",
            url,
            "--api-url",
            api,
            "--token",
            token,
            "--uas",
            "2",
        ],
        Duration::from_secs(30),
    );
    assert!(
        !ran.ok && ran.stderr.contains("refused the token"),
        "{}",
        ran.stderr
    );
}

/// Runs a scenario that must succeed and returns its JSON results.
pub fn scenario(args: &[&str], out: &Path, deadline: Duration) -> Value {
    let mut all: Vec<&str> = args.to_vec();
    let out_s = out.to_str().expect("utf-8 path");
    all.extend(["--out", out_s]);
    let ran = run(&all, deadline);
    assert!(
        ran.ok,
        "herald-loadtest {all:?} failed\nstdout:\n{}\nstderr:\n{}",
        ran.stdout, ran.stderr
    );
    // The one-line summary goes to stdout.
    assert_eq!(ran.stdout.lines().count(), 1, "stdout: {}", ran.stdout);
    let text = std::fs::read_to_string(out).expect("results file written");
    let v: Value = serde_json::from_str(&text).expect("results are JSON");
    assert_eq!(v["tool"], "herald-loadtest");
    assert_eq!(v["summary"].as_str(), Some(ran.stdout.trim()));
    eprintln!("{}", ran.stdout.trim());
    v
}

pub fn metric(v: &Value, name: &str) -> f64 {
    v["metrics"][name]
        .as_f64()
        .unwrap_or_else(|| panic!("metric {name} missing in {}", v["metrics"]))
}

pub fn assert_no_errors(v: &Value) {
    let errors = v["errors"].as_object().expect("errors object");
    assert!(
        errors.is_empty(),
        "{} reported errors: {errors:?}",
        v["scenario"]
    );
}

/// A loopback port nothing listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding 127.0.0.1:0")
}

/// Checks what every sane latency summary satisfies.
pub fn assert_latency(v: &Value, name: &str, count: u64) {
    let l = &v["latency"][name];
    assert_eq!(l["count"].as_u64(), Some(count), "{name}: {l}");
    let p50 = l["p50_ms"].as_f64().expect("p50");
    let p99 = l["p99_ms"].as_f64().expect("p99");
    let max = l["max_ms"].as_f64().expect("max");
    assert!(p50 > 0.0 && p50 <= p99 && p99 <= max, "{name}: {l}");
    let cdf = l["cdf"].as_array().expect("cdf");
    assert!(!cdf.is_empty());
    assert_eq!(cdf.last().and_then(|p| p[1].as_f64()), Some(1.0));
}

/// The herald binary: $HERALD_BIN, else next to this crate's binary (same
/// target directory), else $CARGO_TARGET_DIR/debug, else the workspace's
/// target/debug.
pub fn herald_bin() -> PathBuf {
    let mut tried = Vec::new();
    let mut candidates = Vec::new();
    if let Some(p) = std::env::var_os("HERALD_BIN") {
        candidates.push(PathBuf::from(p));
    }
    if let Some(dir) = loadtest_bin().parent() {
        candidates.push(dir.join("herald"));
    }
    if let Some(t) = std::env::var_os("CARGO_TARGET_DIR") {
        candidates.push(PathBuf::from(t).join("debug/herald"));
    }
    candidates.push(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug/herald"));
    candidates.dedup();
    for c in candidates {
        if c.is_file() {
            return c;
        }
        tried.push(c.display().to_string());
    }
    panic!(
        "the herald binary was not found (tried {}); build it first with `cargo build --workspace --bins`",
        tried.join(", ")
    );
}

/// Herald's push quotas, off.
pub const UNTHROTTLED: [(&str, &str); 4] = [
    ("HERALD_UA_RATE_LIMIT", "off"),
    ("HERALD_SUBSCRIPTION_RATE_LIMIT", "off"),
    ("HERALD_SENDER_RATE_LIMIT", "off"),
    ("HERALD_ANONYMOUS_RATE_LIMIT", "off"),
];

/// A Herald on a free loopback port with its own data directory, killed
/// (by its PID) when dropped.
pub struct Herald {
    pub child: Child,
    pub port: u16,
    pub log: PathBuf,
    pub data: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Herald {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Herald {
    pub fn start() -> Herald {
        Herald::start_with(&[])
    }

    /// Started with extra environment, such as HERALD_BROADCAST_TOKENS.
    pub fn start_with(env: &[(&str, &str)]) -> Herald {
        Herald::start_with_args(env, &[])
    }

    /// Started with extra environment and extra `serve` flags, such as
    /// `--config FILE`. Its push quotas are off (`UNTHROTTLED`): the
    /// scenarios measure the service, not its limits.
    pub fn start_with_args(env: &[(&str, &str)], args: &[&str]) -> Herald {
        let mut all = UNTHROTTLED.to_vec();
        all.extend_from_slice(env);
        Herald::start_raw(&all, args)
    }

    /// Started with its own default push quotas, plus `env` (which may set
    /// some of them): for the `abuse` scenario, which measures them.
    pub fn start_throttled(env: &[(&str, &str)]) -> Herald {
        Herald::start_raw(env, &[])
    }

    fn start_raw(env: &[(&str, &str)], args: &[&str]) -> Herald {
        let bin = herald_bin();
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let log = dir.path().join("herald.log");
        let data = dir.path().join("data");
        let logf = std::fs::File::create(&log).expect("log file");
        let child = Command::new(&bin)
            .arg("serve")
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .arg("--data-dir")
            .arg(&data)
            .args(["--public-url", &format!("http://127.0.0.1:{port}")])
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(logf.try_clone().expect("log file"))
            .stderr(logf)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
        let mut h = Herald {
            child,
            port,
            log,
            data,
            _dir: dir,
        };
        h.wait_ready();
        h
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Ready when GET /health answers 200, or (before /health exists) when
    /// a websocket upgrade is accepted.
    fn wait_ready(&mut self) {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(60) {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("herald exited during startup ({status}):\n{}", self.log());
            }
            if http_status(self.port, "GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n") == Some(200)
                || http_status(
                    self.port,
                    "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
                     Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
                     Sec-WebSocket-Protocol: push-notification\r\n\r\n",
                ) == Some(101)
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("herald did not become ready within 60 s:\n{}", self.log());
    }

    pub fn url(&self) -> String {
        format!("ws://127.0.0.1:{}/", self.port)
    }
}

pub fn http_status(port: u16, request: &str) -> Option<u16> {
    let mut s =
        TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(request.as_bytes()).ok()?;
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).ok()?;
    let head = std::str::from_utf8(&buf[..n]).ok()?;
    head.split_whitespace().nth(1)?.parse().ok()
}
