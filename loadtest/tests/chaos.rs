//! `chaos` against three real Herald nodes on a loopback Redis Cluster
//! (scripts/redis.sh): one node killed with -9 and restarted mid-load must
//! cost nothing, and Redis data flushed while messages wait for offline user
//! agents must fail the run (a checker that cannot fail proves nothing).
//! Needs the `herald` binary built (`cargo build --workspace --bins`) and
//! redis-server (`scripts/redis.sh install`).

mod common;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const NODES: usize = 3;

/// A Redis Cluster and three Herald nodes, each node started by its own
/// small shell script that records its PID, so a schedule can kill it by
/// that PID and start it again. Everything is stopped by PID on drop.
struct Nodes {
    dir: tempfile::TempDir,
    redis_ports: Vec<u16>,
    ports: Vec<u16>,
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A base port with 6 free ports and their cluster bus ports (+10000).
fn redis_base() -> u16 {
    let free = |p: u16| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok();
    (0..1000)
        .map(|_| 20000 + rand::random::<u16>() % 10000)
        .find(|b| (*b..b + 6).all(|p| free(p) && free(p + 10000)))
        .expect("six free loopback ports")
}

impl Nodes {
    fn start() -> Nodes {
        let dir = tempfile::tempdir().expect("tempdir");
        let base = redis_base();
        let redis_dir = dir.path().join("redis");
        let out = Command::new(repo().join("scripts/redis.sh"))
            .args([
                "cluster",
                redis_dir.to_str().expect("utf-8"),
                &base.to_string(),
            ])
            .env("REDIS_SH_OWNER_PID", std::process::id().to_string())
            .output()
            .expect("running scripts/redis.sh");
        assert!(
            out.status.success(),
            "redis.sh cluster: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let url = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let key = URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>());
        let mut ports = Vec::new();
        for i in 0..NODES {
            let port = free_port();
            let script = dir.path().join(format!("start{i}.sh"));
            let mut env = String::new();
            for (k, v) in UNTHROTTLED {
                env.push_str(&format!("{k}={v} "));
            }
            std::fs::write(
                &script,
                format!(
                    "#!/bin/sh\n{env}HERALD_STORE=redis HERALD_REDIS_URL='{url}' HERALD_ENDPOINT_KEYS='{key}' \
                     exec '{bin}' serve --listen 127.0.0.1:{port} --data-dir '{d}/data{i}' \
                     --public-url http://127.0.0.1:{port} >>'{d}/herald{i}.log' 2>&1 </dev/null &\n\
                     echo $! >'{d}/herald{i}.pid'\n",
                    bin = herald_bin().display(),
                    d = dir.path().display(),
                ),
            )
            .expect("writing a start script");
            ports.push(port);
        }
        let nodes = Nodes {
            dir,
            redis_ports: (base..base + 6).collect(),
            ports,
        };
        for i in 0..NODES {
            let ok = Command::new("sh").arg(nodes.script(i)).status();
            assert!(ok.is_ok_and(|s| s.success()), "starting node {i}");
        }
        for i in 0..NODES {
            nodes.wait_ready(i);
        }
        nodes
    }

    fn script(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("start{i}.sh"))
    }

    fn pid_file(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("herald{i}.pid"))
    }

    fn wait_ready(&self, i: usize) {
        let start = Instant::now();
        let req = "GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
        while http_status(self.ports[i], req) != Some(200) {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "node {i} not ready: {}",
                std::fs::read_to_string(self.dir.path().join(format!("herald{i}.log")))
                    .unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn urls(&self) -> String {
        self.ports
            .iter()
            .map(|p| format!("ws://127.0.0.1:{p}/"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Writes `lines` as the schedule file.
    fn schedule(&self, lines: &[serde_json::Value]) -> PathBuf {
        let path = self.dir.path().join("schedule.jsonl");
        let text: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
        std::fs::write(&path, text.join("\n")).expect("writing the schedule");
        path
    }

    /// `chaos` with `extra` options; results and history in the tempdir.
    fn chaos(&self, schedule: &Path, extra: &[&str]) -> (Ran, PathBuf, PathBuf) {
        let out = self.dir.path().join("chaos.json");
        let history = self.dir.path().join("history.jsonl");
        let mut args = vec![
            "chaos".to_string(),
            "--nodes".into(),
            self.urls(),
            "--schedule".into(),
            schedule.display().to_string(),
            "--out".into(),
            out.display().to_string(),
            "--history".into(),
            history.display().to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        (run(&args, Duration::from_secs(120)), out, history)
    }
}

impl Drop for Nodes {
    fn drop(&mut self) {
        for i in 0..NODES {
            if let Ok(pid) = std::fs::read_to_string(self.pid_file(i)) {
                let _ = Command::new("kill").args(["-9", pid.trim()]).status();
            }
        }
        let _ = Command::new(repo().join("scripts/redis.sh"))
            .args(["stop", self.dir.path().join("redis").to_str().unwrap_or("")])
            .status();
    }
}

fn results(out: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(out).expect("results written"))
        .expect("results are JSON")
}

#[test]
fn a_node_killed_and_restarted_mid_load_loses_nothing() {
    let nodes = Nodes::start();
    let kill = format!("kill -9 $(cat '{}')", nodes.pid_file(1).display());
    let schedule = nodes.schedule(&[serde_json::json!({
        "label": "kill9:n1", "at": 5.0, "heal_at": 8.0,
        "start": ["sh", "-c", kill],
        "heal": ["sh", nodes.script(1).display().to_string()],
    })]);
    // A killed node may have delivered a message whose ack it never
    // stored: it comes again, as proto-docs allows, within seconds.
    let (ran, out, history) = nodes.chaos(
        &schedule,
        &[
            "--duration",
            "15",
            "--uas",
            "12",
            "--seed",
            "25",
            "--settle",
            "4",
            "--drain",
            "15",
            "--receipt-wait",
            "5",
            "--redelivery-window",
            "15",
        ],
    );
    assert!(ran.ok, "stdout:\n{}\nstderr:\n{}", ran.stdout, ran.stderr);
    let v = results(&out);
    let m = |name: &str| metric(&v, name);
    for name in [
        "lost",
        "duplicates",
        "registrations_lost",
        "receipt_errors",
        "acked_redelivered_late",
        "unknown",
        "fault.kill9:n1.lost",
    ] {
        assert_eq!(m(name), 0.0, "{name}: {}", v["notes"]);
    }
    assert!(m("accepted") > 50.0, "{}", v["metrics"]);
    assert!(
        m("fault.kill9:n1.accepted_during") > 0.0,
        "{}",
        v["metrics"]
    );
    let recovery = m("fault.kill9:n1.recovery_secs");
    assert!((0.0..30.0).contains(&recovery), "{}", v["metrics"]);
    assert!(m("dual_owner_max_secs") <= 10.0);
    assert_eq!(
        m("accepted"),
        m("delivered") + m("expired") + m("replaced") + m("unregistered") + m("lost")
    );
    let h = std::fs::read_to_string(history).expect("history written");
    for op in [
        "\"fault start\"",
        "\"fault heal\"",
        "\"probe\"",
        "\"hello\"",
        "\"post\"",
        "\"notification\"",
    ] {
        assert!(h.contains(op), "no {op} in the history");
    }
}

/// FLUSHALL on every primary while messages wait for offline user agents
/// (Redis without persistence losing its data): the run must count them
/// lost, and the registrations with them.
#[test]
fn redis_data_flushed_mid_load_fails_the_run() {
    let nodes = Nodes::start();
    let flush: Vec<String> = nodes
        .redis_ports
        .iter()
        .map(|p| format!("redis-cli -p {p} FLUSHALL >/dev/null 2>&1;"))
        .collect();
    let schedule = nodes.schedule(&[serde_json::json!({
        "label": "flushall", "at": 8.0,
        "start": ["sh", "-c", format!("{} true", flush.join(" "))],
    })]);
    let (ran, out, _) = nodes.chaos(
        &schedule,
        &[
            "--duration",
            "12",
            "--uas",
            "12",
            "--seed",
            "26",
            "--settle",
            "2",
            "--drain",
            "8",
            "--receipt-wait",
            "2",
            "--recovery-limit",
            "10",
        ],
    );
    assert!(!ran.ok, "stdout:\n{}\nstderr:\n{}", ran.stdout, ran.stderr);
    assert!(ran.stderr.contains("were lost"), "{}", ran.stderr);
    let v = results(&out);
    assert!(metric(&v, "lost") > 0.0, "{}", v["metrics"]);
    assert!(metric(&v, "registrations_lost") > 0.0, "{}", v["metrics"]);
}
