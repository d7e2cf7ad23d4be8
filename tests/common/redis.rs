//! Real Redis servers for tests, started and stopped (by PID) through
//! scripts/redis.sh on free loopback ports in a temporary directory.
//!
//! `RedisServer::start()` / `RedisCluster::start()` belong to one test and
//! stop on Drop. `shared_server()` / `shared_cluster()` are started once per
//! test process and shared (give each test its own uaids); statics are never
//! dropped, so the script's watchdog stops them when the process exits.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// Attempts at finding free ports before giving up (another process may
/// take a port between our check and the server's bind).
const PORT_ATTEMPTS: usize = 4;

pub fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/redis.sh")
}

/// Runs scripts/redis.sh; its stdout, trimmed, or its stderr as the error.
fn redis_sh(args: &[&str], owner_cleanup: bool) -> Result<String, String> {
    let mut cmd = Command::new(script());
    cmd.args(args)
        .env("REDIS_SH_OWNER_PID", std::process::id().to_string());
    if owner_cleanup {
        cmd.env("REDIS_SH_OWNER_RMDIR", "1");
    }
    let out = cmd
        .output()
        .map_err(|e| format!("running {}: {e}", script().display()))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(format!(
            "redis.sh {args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn port_free(port: u16) -> bool {
    std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
}

/// A base port with `count` free ports from it and, for a cluster, their bus
/// ports (+10000). Below the usual ephemeral range so outgoing connections
/// rarely take them.
fn free_ports(count: u16, with_bus: bool) -> u16 {
    for _ in 0..1000 {
        let base = 20000 + rand::random::<u16>() % 10000;
        let all_free =
            (base..base + count).all(|p| port_free(p) && (!with_bus || port_free(p + 10000)));
        if all_free {
            return base;
        }
    }
    panic!("no {count} free consecutive loopback ports");
}

fn read_pid(dir: &Path, port: u16) -> u32 {
    let file = dir.join(format!("redis-{port}.pid"));
    std::fs::read_to_string(&file)
        .unwrap_or_else(|e| panic!("{}: {e}", file.display()))
        .trim()
        .parse()
        .expect("a PID")
}

fn kill9(pid: u32) {
    let status = Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success(), "kill -9 {pid} failed");
}

/// Where servers of one harness object live: a tempdir removed on Drop, or
/// (shared servers) a kept directory the watchdog removes.
enum Dir {
    Owned(tempfile::TempDir),
    Kept(PathBuf),
}

impl Dir {
    fn new(shared: bool) -> Dir {
        let tmp = tempfile::Builder::new()
            .prefix("herald-redis-")
            .tempdir()
            .expect("tempdir");
        if shared {
            Dir::Kept(tmp.keep())
        } else {
            Dir::Owned(tmp)
        }
    }

    fn path(&self) -> &Path {
        match self {
            Dir::Owned(t) => t.path(),
            Dir::Kept(p) => p,
        }
    }
}

fn start_in(dir: &Dir, mode: &str, count: u16, shared: bool) -> (u16, String) {
    let mut last = String::new();
    for _ in 0..PORT_ATTEMPTS {
        let base = free_ports(count, mode == "cluster");
        let path = dir.path().to_str().expect("utf-8 path");
        match redis_sh(&[mode, path, &base.to_string()], shared) {
            Ok(url) => return (base, url),
            Err(e) => last = e,
        }
    }
    panic!("could not start Redis ({mode}): {last}");
}

/// One standalone Redis (no persistence).
pub struct RedisServer {
    dir: Dir,
    pub port: u16,
    url: String,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        Self::start_with(false)
    }

    fn start_with(shared: bool) -> RedisServer {
        let dir = Dir::new(shared);
        let (port, url) = start_in(&dir, "standalone", 1, shared);
        RedisServer { dir, port, url }
    }

    /// A free port and a directory with no server yet: `restart` starts
    /// it (a node started before its Redis).
    pub fn not_started() -> RedisServer {
        let dir = Dir::new(false);
        let port = free_ports(1, false);
        let url = format!("redis://127.0.0.1:{port}");
        RedisServer { dir, port, url }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn pid(&self) -> u32 {
        read_pid(self.dir.path(), self.port)
    }

    /// Kills the server without warning (it may be `restart`ed).
    pub fn kill9(&self) {
        kill9(self.pid());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !port_free(self.port) {
            assert!(std::time::Instant::now() < deadline, "port still bound");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// Starts a fresh (empty) server on the same port.
    pub fn restart(&self) {
        let path = self.dir.path().to_str().expect("utf-8 path");
        redis_sh(&["standalone", path, &self.port.to_string()], false)
            .unwrap_or_else(|e| panic!("{e}"));
    }

    /// A plain client connection, for looking at keys directly.
    pub fn client(&self) -> redis::Connection {
        redis::Client::open(self.url.as_str())
            .and_then(|c| c.get_connection())
            .expect("connect to test Redis")
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Err(e) = redis_sh(&["stop", self.dir.path().to_str().unwrap_or("")], false) {
            eprintln!("{e}");
        }
    }
}

/// A Redis Cluster: 3 primaries with one replica each, node timeout 2 s.
pub struct RedisCluster {
    dir: Dir,
    pub ports: Vec<u16>,
    url: String,
}

impl RedisCluster {
    pub fn start() -> RedisCluster {
        Self::start_with(false)
    }

    fn start_with(shared: bool) -> RedisCluster {
        let dir = Dir::new(shared);
        let (base, url) = start_in(&dir, "cluster", 6, shared);
        RedisCluster {
            dir,
            ports: (base..base + 6).collect(),
            url,
        }
    }

    /// Every node's URL, comma-separated (the seed list `RedisStore` takes).
    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn pid(&self, port: u16) -> u32 {
        read_pid(self.dir.path(), port)
    }

    pub fn kill9(&self, port: u16) {
        kill9(self.pid(port));
    }

    /// A plain client connection to one node.
    pub fn node(&self, port: u16) -> redis::Connection {
        redis::Client::open(format!("redis://127.0.0.1:{port}"))
            .and_then(|c| c.get_connection())
            .expect("connect to cluster node")
    }

    /// A connection to the first node that answers (some may be killed).
    fn any_node(&self) -> redis::Connection {
        self.ports
            .iter()
            .find_map(|port| {
                redis::Client::open(format!("redis://127.0.0.1:{port}"))
                    .and_then(|c| c.get_connection())
                    .ok()
            })
            .expect("a live cluster node")
    }

    /// The slot `key` hashes to, as the cluster computes it.
    pub fn slot_of(&self, key: &[u8]) -> u16 {
        redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query(&mut self.any_node())
            .expect("CLUSTER KEYSLOT")
    }

    /// The port of the primary currently serving `key`'s slot.
    pub fn primary_for(&self, key: &[u8]) -> u16 {
        let slot = self.slot_of(key);
        let nodes: String = redis::cmd("CLUSTER")
            .arg("NODES")
            .query(&mut self.any_node())
            .expect("CLUSTER NODES");
        nodes
            .lines()
            .find_map(|line| primary_port_serving(line, slot))
            .unwrap_or_else(|| panic!("no primary serves slot {slot}:\n{nodes}"))
    }

    /// The port of a replica of the primary on `primary`.
    pub fn replica_of(&self, primary: u16) -> u16 {
        let nodes: String = redis::cmd("CLUSTER")
            .arg("NODES")
            .query(&mut self.node(primary))
            .expect("CLUSTER NODES");
        let id = nodes
            .lines()
            .find(|l| l.contains("myself"))
            .and_then(|l| l.split_whitespace().next())
            .expect("own node id");
        nodes
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|f| f.len() > 3 && f[2].contains("slave") && f[3] == id)
            .and_then(|f| f[1].split('@').next()?.rsplit(':').next()?.parse().ok())
            .unwrap_or_else(|| panic!("no replica of {primary}:\n{nodes}"))
    }

    /// Waits (up to 5 s) until the replica `port` holds `key`.
    pub fn wait_replicated(&self, port: u16, key: &[u8]) {
        let mut conn = self.node(port);
        let _: () = redis::cmd("READONLY").query(&mut conn).expect("READONLY");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while redis::cmd("EXISTS")
            .arg(key)
            .query::<i64>(&mut conn)
            .expect("EXISTS")
            == 0
        {
            assert!(
                std::time::Instant::now() < deadline,
                "not replicated to {port}"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    pub fn pid_of_primary_for(&self, key: &[u8]) -> u32 {
        self.pid(self.primary_for(key))
    }

    /// Every key on every node (primaries and replicas) matching `pattern`.
    pub fn scan_all(&self, pattern: &str) -> Vec<(u16, Vec<u8>)> {
        let mut out = Vec::new();
        for &port in &self.ports {
            let mut conn = self.node(port);
            let keys: Vec<Vec<u8>> = redis::cmd("SCAN")
                .cursor_arg(0)
                .arg("MATCH")
                .arg(pattern)
                .arg("COUNT")
                .arg(1000)
                .clone()
                .iter::<Vec<u8>>(&mut conn)
                .expect("SCAN")
                .collect::<Result<_, _>>()
                .expect("SCAN");
            out.extend(keys.into_iter().map(|k| (port, k)));
        }
        out
    }
}

/// `<id> <ip:port@bus> <flags> <primary> <ping> <pong> <epoch> <state> <slots…>`
fn primary_port_serving(line: &str, slot: u16) -> Option<u16> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    let flags = fields.get(2)?;
    if !flags.contains("master") || flags.contains("fail") {
        return None;
    }
    let serves = fields.iter().skip(8).any(|range| {
        let mut ends = range.split('-').map(|n| n.parse::<u16>());
        match (ends.next(), ends.next()) {
            (Some(Ok(a)), Some(Ok(b))) => (a..=b).contains(&slot),
            (Some(Ok(a)), None) => a == slot,
            _ => false,
        }
    });
    let addr = fields.get(1)?.split('@').next()?;
    serves
        .then(|| addr.rsplit(':').next()?.parse().ok())
        .flatten()
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        if let Err(e) = redis_sh(&["stop", self.dir.path().to_str().unwrap_or("")], false) {
            eprintln!("{e}");
        }
    }
}

/// One standalone server for the whole test process.
pub fn shared_server() -> &'static RedisServer {
    static SERVER: OnceLock<RedisServer> = OnceLock::new();
    SERVER.get_or_init(|| RedisServer::start_with(true))
}

/// One cluster for the whole test process. Tests must not kill its nodes.
pub fn shared_cluster() -> &'static RedisCluster {
    static CLUSTER: OnceLock<RedisCluster> = OnceLock::new();
    CLUSTER.get_or_init(|| RedisCluster::start_with(true))
}
