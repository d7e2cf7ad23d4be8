//! `herald-loadtest sizing` on small synthetic result files, its table
//! checked against numbers worked out by hand. Needs no server.

mod common;

use common::*;

use serde_json::json;
use std::time::Duration;

fn write(dir: &std::path::Path, name: &str, v: serde_json::Value) -> String {
    let p = dir.join(name);
    std::fs::write(&p, v.to_string()).expect("writing a result file");
    p.display().to_string()
}

fn result(
    scenario: &str,
    metrics: serde_json::Value,
    servers: serde_json::Value,
) -> serde_json::Value {
    json!({"tool": "herald-loadtest", "scenario": scenario, "target": "herald",
           "metrics": metrics, "servers": servers})
}

/// The cells of the table row that starts with `| <uas> | <rate> |`.
fn row(table: &str, uas: &str, rate: &str) -> Vec<String> {
    let start = format!("| {uas} | {rate} |");
    let line = table
        .lines()
        .find(|l| l.starts_with(&start))
        .unwrap_or_else(|| panic!("no row {start} in\n{table}"));
    line.trim_matches('|')
        .split('|')
        .map(|c| c.trim().trim_matches('*').to_string())
        .collect()
}

#[test]
fn sizing_table_matches_hand_computed_numbers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let idle = write(
        dir.path(),
        "idle.json",
        result(
            "idle",
            json!({"server_kib_per_connection": 8.0, "open_at_end": 1000}),
            json!([]),
        ),
    );
    let one = write(
        dir.path(),
        "tp.json",
        result(
            "throughput",
            json!({"server_cpu_us_per_delivered": 70.0, "delivered": 1000}),
            json!([]),
        ),
    );
    // 20 s of Herald and 5 s of Redis for 100,000 pushes: 200 and 50 µs each.
    let cluster = write(
        dir.path(),
        "cluster.json",
        result(
            "throughput",
            json!({"delivered": 100_000}),
            json!([{"pid": 1, "name": "herald", "cpu_s": 12.0},
                   {"pid": 2, "name": "herald", "cpu_s": 8.0},
                   {"pid": 3, "name": "redis", "cpu_s": 5.0}]),
        ),
    );
    let args = [
        "sizing",
        &idle,
        &one,
        &cluster,
        "--cores-per-node",
        "8",
        "--ram-per-node-gib",
        "16",
        "--headroom",
        "0.5",
        "--kernel-kib-per-connection",
        "0",
        "--nofile-per-node",
        "2000000",
        "--redis-kib-per-ua",
        "1",
        "--ram-per-shard-gib",
        "16",
        "--connections",
        "10000000,100000000",
        "--rates",
        "1000,100000",
    ];
    let ran = run(&args, Duration::from_secs(30));
    assert!(ran.ok, "sizing failed: {}", ran.stderr);
    let t = ran.stdout;
    // Columns: UAs, rate, by memory, by CPU, by files, nodes, per node,
    // shards by CPU, by memory, shards.
    // Memory: 8 KiB x 10M = 80,000,000 KiB over 8 GiB usable
    // (8,388,608 KiB): 9.54 -> 10. CPU: 1,000 x 200 µs over 4 usable cores:
    // 1. Files: 10M / 2M: 5. Redis: 1,000 x 50 µs over half a core: 1;
    // 10M KiB over 8 GiB: 1.19 -> 2.
    assert_eq!(
        row(&t, "10M", "1,000"),
        [
            "10M",
            "1,000",
            "10",
            "1",
            "5",
            "11",
            "1,000,000",
            "1",
            "2",
            "2"
        ]
    );
    // CPU: 100,000 x 200 µs = 20 cores over 4: 5. Redis: 5 cores over 0.5: 10.
    assert_eq!(
        row(&t, "10M", "100,000"),
        [
            "10M",
            "100,000",
            "10",
            "5",
            "5",
            "11",
            "1,000,000",
            "10",
            "2",
            "10"
        ]
    );
    // Memory: 800,000,000 / 8,388,608 = 95.4 -> 96; files 50; per node
    // 100M / 96 = 1,041,666.7 -> 1,041,667. Redis memory 11.9 -> 12.
    assert_eq!(
        row(&t, "100M", "100,000"),
        [
            "100M",
            "100,000",
            "96",
            "5",
            "50",
            "97",
            "1,041,667",
            "10",
            "12",
            "12"
        ]
    );
    assert!(t.contains("200.0 µs"), "cluster CPU is the one used:\n{t}");
    assert!(
        t.contains("70.0 µs"),
        "one-node CPU shown for comparison:\n{t}"
    );
    assert!(t.contains("50% of each"), "headroom stated:\n{t}");

    // Without Redis figures it says what is missing rather than guess.
    let ran = run(&["sizing", &idle, &one], Duration::from_secs(30));
    assert!(!ran.ok);
    assert!(ran.stderr.contains("no Redis CPU"), "{}", ran.stderr);
}
