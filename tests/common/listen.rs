//! `herald listen` driven as a user runs it: the subscribe and list
//! commands run to completion, and `Listener` holds a running
//! `herald listen run` whose JSON lines a test reads. Shared by
//! tests/listen.rs and the tests of what reaches a listener from elsewhere
//! (tests/matrix_synapse.rs).

use super::Herald;
use serde_json::Value;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub const HERALD: &str = env!("CARGO_BIN_EXE_herald");

/// Runs a `herald` command to completion, off the async runtime.
pub async fn herald(args: Vec<String>) -> Output {
    tokio::task::spawn_blocking(move || {
        Command::new(HERALD)
            .args(&args)
            .stdin(Stdio::null())
            .output()
            .expect("run herald")
    })
    .await
    .unwrap()
}

pub fn strings(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `herald listen --state STATE <args>`, which must succeed.
pub async fn listen_ok(state: &Path, args: &[&str]) -> String {
    let mut all = strings(&["listen", "--state", state.to_str().unwrap()]);
    all.extend(strings(args));
    let out = herald(all).await;
    assert!(
        out.status.success(),
        "herald listen {args:?} failed: {}{}",
        stdout(&out),
        stderr(&out)
    );
    stdout(&out)
}

/// Subscribes NAME and returns the subscription JSON.
pub async fn subscribe(state: &Path, h: &Herald, name: &str, key: Option<&str>) -> Value {
    let server = h.ws_url();
    let mut args = vec!["subscribe", name, "--server", &server];
    if let Some(k) = key {
        args.extend(["--vapid-key", k]);
    }
    serde_json::from_str(listen_ok(state, &args).await.trim()).expect("subscription JSON")
}

/// A running `herald listen run`: stdout lines arrive on a channel, stderr
/// goes to a file.
pub struct Listener {
    child: Option<Child>,
    lines: mpsc::Receiver<String>,
    err: PathBuf,
    _dir: tempfile::TempDir,
}

impl Listener {
    pub fn start(state: &Path, extra: &[&str]) -> Listener {
        Listener::start_with_env(state, extra, &[])
    }

    pub fn start_with_env(state: &Path, extra: &[&str], env: &[(&str, &str)]) -> Listener {
        let dir = tempfile::tempdir().unwrap();
        let err = dir.path().join("stderr");
        let mut child = Command::new(HERALD)
            .args(["listen", "--state", state.to_str().unwrap(), "run"])
            .args(extra)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&err).unwrap())
            .spawn()
            .expect("herald listen run starts");
        let out = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Listener {
            child: Some(child),
            lines,
            err,
            _dir: dir,
        }
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.err).unwrap_or_default()
    }

    /// The next JSON line within `within`.
    pub fn try_line(&self, within: Duration) -> Option<Value> {
        let line = tokio::task::block_in_place(|| self.lines.recv_timeout(within)).ok()?;
        Some(serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}")))
    }

    pub fn line(&self) -> Value {
        self.try_line(Duration::from_secs(20))
            .unwrap_or_else(|| panic!("no message within 20 s; stderr:\n{}", self.stderr()))
    }

    /// Waits until stderr mentions `text`.
    pub fn wait_stderr(&self, text: &str, within: Duration) {
        let deadline = Instant::now() + within;
        while !self.stderr().contains(text) {
            assert!(
                Instant::now() < deadline,
                "stderr never said {text:?}:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// SIGTERM, which must end it cleanly.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("running");
        Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = c.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                panic!("herald listen ignored SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn exit_within(&mut self, within: Duration) -> std::process::ExitStatus {
        let c = self.child.as_mut().expect("running");
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = c.try_wait().unwrap() {
                self.child = None;
                return status;
            }
            assert!(Instant::now() < deadline, "herald listen did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.kill9();
    }
}
