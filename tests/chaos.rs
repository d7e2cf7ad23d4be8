//! A short `make chaos` (scripts/chaos.sh, issue 25): three Herald nodes on
//! a Redis Cluster, every server in its own network namespace, one fault
//! (slow links to Redis) applied and healed under load, every accepted
//! message accounted for.
//! And the run that must fail: a Redis primary without persistence that
//! restarts empty (within the node timeout, so no failover) loses every
//! message and registration on its slots, and the checker must say so, or
//! the passing run proves nothing.
//!
//! Needs root and network namespaces; without them each test prints why and
//! passes, as nothing here can run. The load generator comes from the same
//! build (`cargo build --workspace --bins`, which `make test` runs first).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

/// The two runs take turns: each holds six Redis servers and three nodes,
/// on two shared cores.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Why this machine cannot run the harness, if it cannot.
fn cannot_run() -> Option<String> {
    if effective_uid() != 0 {
        return Some("not root: network namespaces need it".into());
    }
    for (tool, package) in [
        ("ip", "iproute2"),
        ("nft", "nftables"),
        ("redis-server", "redis-server"),
    ] {
        if Command::new(tool).arg("--version").output().is_err() {
            // A missing tool is the machine's setup, not this test's to hide.
            panic!("{tool} ({package}) is needed; install it with make test-deps");
        }
    }
    let name = format!("herald-chaos-probe-{}", std::process::id());
    let made = Command::new("ip").args(["netns", "add", &name]).output();
    match made {
        Ok(o) if o.status.success() => {
            let _ = Command::new("ip").args(["netns", "delete", &name]).output();
            None
        }
        Ok(o) => Some(format!(
            "no network namespaces here: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Some(format!("cannot run ip netns: {e}")),
    }
}

/// The effective uid, read from /proc rather than through libc.
fn effective_uid() -> u32 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|u| u.parse().ok())
        .unwrap_or(u32::MAX)
}

fn loadtest_bin() -> PathBuf {
    // The test binary is target/debug/deps/chaos-<hash>.
    let exe = std::env::current_exe().unwrap();
    let bin = exe
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("herald-loadtest");
    assert!(
        bin.exists(),
        "{} not found: run cargo build --workspace --bins first (make test does)",
        bin.display()
    );
    bin
}

struct Run {
    ok: bool,
    output: String,
    results: Vec<serde_json::Value>,
}

/// scripts/chaos.sh with one fault for `secs` seconds of load.
fn chaos(fault: &str, secs: u32, port: u16, strict: bool) -> Run {
    let results = tempfile::tempdir().unwrap();
    let out = Command::new(root().join("scripts/chaos.sh"))
        .env("SKIP_BUILD", "1")
        .env("HERALD_BIN", env!("CARGO_BIN_EXE_herald"))
        .env("LOADTEST_BIN", loadtest_bin())
        .env("CHAOS_SECS", secs.to_string())
        .env("CHAOS_RUN_SECS", secs.to_string())
        .env("CHAOS_FAULTS", fault)
        .env("CHAOS_UAS", "16")
        .env("CHAOS_SEED", "25")
        .env("CHAOS_PORT", port.to_string())
        .env("CHAOS_STRICT", if strict { "1" } else { "0" })
        .env("RESULTS", results.path())
        .output()
        .expect("run scripts/chaos.sh");
    let output = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let mut found = Vec::new();
    for stamp in std::fs::read_dir(results.path()).unwrap().flatten() {
        for f in std::fs::read_dir(stamp.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            let p = f.path();
            if p.extension().is_some_and(|e| e == "json") {
                let text = std::fs::read_to_string(&p).unwrap();
                found.push(serde_json::from_str(&text).unwrap());
            }
        }
    }
    eprintln!("{output}");
    Run {
        ok: out.status.success(),
        output,
        results: found,
    }
}

fn metric(run: &Run, name: &str) -> u64 {
    run.results
        .iter()
        .map(|r| r["metrics"][name].as_u64().unwrap_or(0))
        .sum()
}

#[test]
fn a_slow_link_to_redis_loses_nothing_and_recovers() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(why) = cannot_run() {
        eprintln!("skipping the chaos run: {why}");
        return;
    }
    // 150 ms each way on every link to Redis. The partitions fail this run
    // today (see proto-docs/cluster.md, "Faults measured"), so they are
    // `make chaos`'s, not `make test`'s.
    let run = chaos("slow-redis", 25, 18400, true);
    assert!(run.ok, "the chaos run failed:\n{}", run.output);
    assert!(metric(&run, "accepted") > 0, "no message was accepted");
    assert_eq!(metric(&run, "lost"), 0);
    let recovery = run.results[0]["metrics"]["fault.slow-redis.recovery_secs"].as_f64();
    assert!(
        recovery.is_some(),
        "no recovery time measured:\n{}",
        run.output
    );
}

#[test]
fn a_redis_primary_restarted_empty_is_reported_lost() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(why) = cannot_run() {
        eprintln!("skipping the chaos run: {why}");
        return;
    }
    let run = chaos("primary-restarted-empty", 25, 18420, true);
    assert!(
        !run.ok,
        "a primary restarted empty lost nothing?\n{}",
        run.output
    );
    assert!(run.output.contains("were lost"), "{}", run.output);
    assert!(
        metric(&run, "lost") + metric(&run, "registrations_lost") > 0,
        "the checker counted no loss"
    );
}
