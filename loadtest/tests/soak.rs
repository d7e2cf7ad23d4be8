//! A short `soak` against a freshly started Herald: every accepted message
//! must be accounted for, and the run must have produced each kind of
//! outcome it checks (so a scenario that quietly stopped expiring or
//! replacing anything fails here), and every delivery receipt must be right.
//! Needs the `herald` binary built
//! (`cargo build --workspace --bins`).

mod common;

use common::*;
use std::time::Duration;

/// `soak` against `herald` for `secs` seconds with `uas` user agents,
/// results to `out`.
fn soak_args(herald: &Herald, secs: &str, uas: &str, out: &std::path::Path) -> Vec<String> {
    [
        "soak",
        "--url",
        &format!("ws://127.0.0.1:{}/", herald.port),
        "--server-pid",
        &herald.child.id().to_string(),
        "--data-dir",
        herald.data.to_str().expect("utf-8 path"),
        "--duration",
        secs,
        "--uas",
        uas,
        "--seed",
        "15",
        "--long-offline",
        "12",
        "--drain",
        "15",
        "--out",
        out.to_str().expect("utf-8 path"),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

#[test]
fn short_soak_against_herald_loses_nothing() {
    let herald = Herald::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("soak.json");
    let mut args = soak_args(&herald, "16", "12", &out);
    // `scenario` adds --out itself.
    args.truncate(args.len() - 2);
    // A sent but unacknowledged message gets 60 s past its TTL before its
    // receipt says expired; waiting for those would make this slow, so only
    // receipts due within a few seconds of the drain must have come (those of
    // acked, nacked and unregistered messages, and of expired ones never
    // sent). Every receipt that came must still be right.
    args.extend(["--receipts", "0.5", "--receipt-wait", "5"].map(String::from));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let v = scenario(&args, &out, Duration::from_secs(90));
    let m = |name: &str| metric(&v, name);
    assert_eq!(m("lost"), 0.0, "{}", v["notes"]);
    assert_eq!(m("duplicates"), 0.0, "{}", v["notes"]);
    assert_eq!(m("unknown"), 0.0);
    assert_eq!(m("receipt_errors"), 0.0, "{}", v["notes"]);
    assert!(m("receipts_asked") > 0.0, "{}", v["metrics"]);
    assert!(m("receipts_received") > 0.0, "{}", v["metrics"]);
    for name in [
        "accepted",
        "delivered",
        "expired",
        "replaced",
        "redelivered",
    ] {
        assert!(m(name) > 0.0, "no {name}: {}", v["metrics"]);
    }
    // Every accepted message has exactly one fate.
    assert_eq!(
        m("accepted"),
        m("delivered") + m("expired") + m("replaced") + m("unregistered") + m("lost")
    );
    assert!(m("server_rss_peak_kib") >= m("server_rss_final_kib"));
    assert!(m("server_rss_final_kib") > 0.0);
    assert!(m("server_fds_peak") >= m("server_fds_final") && m("server_fds_final") > 0.0);
    assert!(m("store_bytes_final") > 0.0);
    drop(herald);
}

/// The accounting catches a server that drops what it accepted: with a
/// delivery window of one, a notification left unanswered blocks the
/// connection, and TTL-0 messages to it are dropped though the user agent
/// is online. The run must fail and name them.
#[test]
fn soak_fails_when_the_server_drops_accepted_messages() {
    let herald = Herald::start_with(&[("HERALD_DELIVERY_WINDOW", "1")]);
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("soak.json");
    let mut args = soak_args(&herald, "12", "8", &out);
    // Every connection leaves its first notification unanswered, so every
    // TTL-0 message after it is dropped.
    args.extend(["--hold", "1", "--nack", "0", "--receipts", "0"].map(String::from));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let ran = run(&args, Duration::from_secs(90));
    assert!(!ran.ok, "stdout:\n{}\nstderr:\n{}", ran.stdout, ran.stderr);
    assert!(ran.stderr.contains("were lost"), "{}", ran.stderr);
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).expect("results written"))
            .expect("results are JSON");
    assert!(metric(&v, "lost") > 0.0);
    assert!(
        v["notes"].to_string().contains("TTL 0"),
        "lost messages are described: {}",
        v["notes"]
    );
    drop(herald);
}
