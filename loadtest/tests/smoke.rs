//! Every scenario at tiny scale against a freshly started Herald, then
//! `report` over the results. Needs the `herald` binary built
//! (`cargo build --workspace --bins`).

mod common;

use common::*;

use std::time::Duration;

#[test]
fn every_scenario_against_herald_then_report() {
    let herald = Herald::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let url = herald.url();
    let pid = herald.child.id().to_string();
    let t = Duration::from_secs(120);
    let base = [
        "--url",
        url.as_str(),
        "--target",
        "herald",
        "--timeout",
        "10",
    ];
    let with = |extra: &[&'static str]| -> Vec<String> {
        base.iter()
            .map(|s| s.to_string())
            .chain(extra.iter().map(|s| s.to_string()))
            .collect()
    };
    let run_scenario = |name: &str, extra: &[&'static str]| {
        let mut args = vec![name.to_string()];
        args.extend(with(extra));
        args.extend(["--server-pid".to_string(), pid.clone()]);
        let refs: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
        let out = dir.path().join(format!("{name}.json"));
        let v = scenario(&refs, &out, t);
        (v, out)
    };

    let (idle, idle_f) = run_scenario("idle", &["--uas", "20", "--hold", "1", "--step", "5"]);
    assert_no_errors(&idle);
    assert_eq!(metric(&idle, "established"), 20.0);
    assert_eq!(metric(&idle, "open_at_end"), 20.0);
    assert_eq!(metric(&idle, "failed"), 0.0);
    assert!(metric(&idle, "server_rss_after_kib") > 0.0);
    assert!(metric(&idle, "connect_rate_per_s") > 0.0);
    assert!(idle["metrics"]["server_kib_per_connection"].is_number());
    assert!(!idle["memory"].as_array().expect("memory").is_empty());
    assert_latency(&idle, "setup", 20);
    // The climb in steps: at least the step the last connections landed in.
    let climb = idle["rows"].as_array().expect("climb rows");
    assert!(
        climb.iter().all(|r| r["rss_kib"].as_u64() > Some(0)),
        "{climb:?}"
    );
    assert_eq!(climb.last().expect("a climb row")["connections"], 20);
    assert!(idle["metrics"]["listen_overflows"].is_number());
    // Herald selects the subprotocol Firefox asks for.
    assert_eq!(idle["subprotocol"], "push-notification");

    let (tp, tp_f) = run_scenario(
        "throughput",
        &[
            "--uas",
            "20",
            "--senders",
            "4",
            "--messages",
            "200",
            "--duration",
            "60",
            "--payload",
            "256",
            "--verify-every",
            "1",
        ],
    );
    assert_no_errors(&tp);
    assert_eq!(metric(&tp, "sent"), 200.0);
    assert_eq!(metric(&tp, "accepted"), 200.0);
    assert_eq!(metric(&tp, "delivered"), 200.0, "delivered == sent");
    assert_eq!(metric(&tp, "lost"), 0.0);
    assert_eq!(metric(&tp, "verified_ok"), 200.0);
    assert_eq!(metric(&tp, "acks_sent"), 200.0);
    assert!(metric(&tp, "accepted_per_s") > 0.0 && metric(&tp, "delivered_per_s") > 0.0);
    assert_latency(&tp, "end_to_end", 200);
    assert!(!tp["rates"].as_array().expect("rates").is_empty());

    let (bl, bl_f) = run_scenario(
        "backlog",
        &[
            "--uas",
            "20",
            "--messages-per-channel",
            "10",
            "--senders",
            "4",
            "--payload",
            "256",
        ],
    );
    assert_no_errors(&bl);
    assert_eq!(metric(&bl, "stored"), 200.0);
    assert_eq!(metric(&bl, "delivered"), 200.0);
    assert_eq!(metric(&bl, "missing"), 0.0);
    assert_eq!(metric(&bl, "extra"), 0.0);
    assert!(metric(&bl, "drain_s") > 0.0 && metric(&bl, "drain_per_s") > 0.0);
    assert!(bl["metrics"]["server_cpu_us_per_delivered"].is_number());
    assert!(bl["summary"]
        .as_str()
        .unwrap()
        .contains("µs per delivered message"));
    assert_latency(&bl, "reconnect_hello", 20);

    let (st, st_f) = run_scenario(
        "storm",
        &["--uas", "20", "--window", "1", "--settle", "0.5"],
    );
    assert_no_errors(&st);
    assert_eq!(metric(&st, "reconnected"), 20.0);
    assert_eq!(metric(&st, "failed"), 0.0);
    assert_eq!(metric(&st, "uaid_changed"), 0.0);
    assert_latency(&st, "reconnect_hello", 20);
    // 20 user agents may come up in under 5 ms, which rounds to 0.
    assert!(st["metrics"]["bring_up_s"].is_number());
    assert!(st["metrics"]["listen_overflows_storm"].is_number());

    let html = dir.path().join("report.html");
    let label = format!("herald-label={}", tp_f.display());
    let page = report(
        &[
            idle_f.to_str().unwrap(),
            bl_f.to_str().unwrap(),
            st_f.to_str().unwrap(),
            "--label",
            &label,
        ],
        &html,
    );
    assert!(page.contains("<svg"), "report has plots");
    assert!(page.matches("<svg").count() >= 4);
    assert!(page.contains("herald-label"));
}

/// Issue 9: a user agent that acks every notification with its own frame,
/// as Firefox does, must not be cut off however many are in flight, live or
/// drained from a backlog.
#[test]
fn burst_of_individual_acks_against_herald() {
    let herald = Herald::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let url = herald.url();
    let pid = herald.child.id().to_string();
    let out = dir.path().join("burst.json");
    let b = scenario(
        &[
            "burst",
            "--url",
            &url,
            "--target",
            "herald",
            "--timeout",
            "10",
            "--server-pid",
            &pid,
            "--uas",
            "4",
            "--messages",
            "300",
            "--backlog",
            "200",
            "--senders",
            "4",
            "--payload",
            "256",
        ],
        &out,
        Duration::from_secs(180),
    );

    // The report has a section for it, whatever the outcome.
    let html = dir.path().join("report.html");
    let page = report(&[out.to_str().unwrap()], &html);
    assert!(page.contains("<h2>burst</h2>") && page.contains("live_cut_off"));

    let summary = b["summary"].as_str().expect("summary");
    assert_eq!(
        metric(&b, "live_cut_off"),
        0.0,
        "Herald closed a user agent that acked each notification individually: {} ({summary})",
        b["metrics"]["live_close"]
    );
    assert_eq!(metric(&b, "live_accepted"), 1200.0);
    assert_eq!(metric(&b, "live_lost"), 0.0);
    assert_eq!(metric(&b, "live_delivered"), 1200.0);
    assert_eq!(metric(&b, "live_duplicates"), 0.0);
    assert_eq!(metric(&b, "live_acks_sent"), 1200.0);
    assert_eq!(
        metric(&b, "drain_cut_off"),
        0.0,
        "Herald closed a user agent draining its backlog: {} ({summary})",
        b["metrics"]["drain_close"]
    );
    assert_eq!(metric(&b, "drain_reconnects"), 0.0);
    assert_eq!(metric(&b, "drain_stored"), 800.0);
    assert_eq!(metric(&b, "drain_delivered"), 800.0);
    assert_eq!(metric(&b, "drain_missing"), 0.0);
    assert_eq!(metric(&b, "drain_duplicates"), 0.0);
    assert_eq!(metric(&b, "never_delivered"), 0.0);
    assert!(metric(&b, "live_per_s") > 0.0 && metric(&b, "drain_per_s") > 0.0);
    assert!(b["metrics"]["server_cpu_s"].is_number());
    for m in [
        "server_cpu_us_per_delivered",
        "live_server_cpu_us_per_delivered",
        "drain_server_cpu_us_per_delivered",
    ] {
        assert!(b["metrics"][m].is_number(), "{m}: {}", b["metrics"]);
    }
    assert_no_errors(&b);
    assert_latency(&b, "end_to_end", 1200);
    assert_latency(&b, "reconnect_hello", 4);
    assert_eq!(summary.matches("not cut off").count(), 2, "{summary}");
}

/// Issue 12: idle user agents following a broadcast, as Firefox follows
/// remote settings, each hear of every change exactly once; those
/// following nothing hear nothing.
#[test]
fn fanout_of_broadcast_changes_against_herald() {
    let token = "smoke-broadcast-token-0123456789";
    let herald = Herald::start_with(&[("HERALD_BROADCAST_TOKENS", token)]);
    let dir = tempfile::tempdir().expect("tempdir");
    let url = herald.url();
    let api = format!("http://127.0.0.1:{}", herald.port);
    let pid = herald.child.id().to_string();
    let out = dir.path().join("fanout.json");
    let f = scenario(
        &[
            "fanout",
            "--url",
            &url,
            "--api-url",
            &api,
            "--token",
            token,
            "--target",
            "herald",
            "--server-pid",
            &pid,
            "--uas",
            "60",
            "--non-followers",
            "10",
            "--changes",
            "3",
            "--settle",
            "0.5",
        ],
        &out,
        Duration::from_secs(120),
    );
    assert_fanout_clean(&f, 60.0, 10.0, 3.0);
    assert!(metric(&f, "server_rss_peak_kib") >= metric(&f, "server_rss_before_kib"));
    assert!(f["metrics"]["server_cpu_us_per_delivered"].is_number());
    assert!(metric(&f, "last_frame_ms_max") < 10_000.0);
    assert_latency(&f, "fanout_arrival", 180);
    let rows = f["rows"].as_array().expect("rows");
    assert_eq!(rows.len(), 3);
    assert!(rows
        .iter()
        .all(|r| r["received"] == 60 && r["put_status"] == 200));
    // Herald kept the last version set.
    let versions: Vec<&str> = rows
        .iter()
        .map(|r| r["version"].as_str().unwrap())
        .collect();
    assert!(versions.windows(2).all(|w| w[0] < w[1]), "{versions:?}");

    // Without the token the API refuses, and the run says so.
    assert_fanout_token_refused(&url, &api, "not-the-token-0123456");
}

/// Issue 22: devices registered through the registration API, every push
/// forwarded by Herald's FCM bridge to the scenario's FCM sink exactly once.
#[test]
fn bridge_to_the_fcm_sink_against_herald() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let sink = format!("127.0.0.1:{port}");
    let cfg = dir.path().join("cfg");
    let cfg_s = cfg.to_str().expect("utf-8 path");
    let wrote = run(
        &[
            "bridge",
            "--write-config",
            cfg_s,
            "--sink",
            &sink,
            "--app-id",
            "smoke-app",
        ],
        Duration::from_secs(60),
    );
    assert!(wrote.ok, "--write-config failed: {}", wrote.stderr);
    let config = cfg.join("herald-bridge.toml");
    let creds = cfg.join("service-account.json");
    let herald = Herald::start_with_args(&[], &["--config", config.to_str().unwrap()]);
    let pid = herald.child.id().to_string();
    let target = format!("http://127.0.0.1:{}", herald.port);
    let out = dir.path().join("bridge.json");
    let b = scenario(
        &[
            "bridge",
            "--target",
            &target,
            "--app-id",
            "smoke-app",
            "--credentials",
            creds.to_str().unwrap(),
            "--server-pid",
            &pid,
            "--uas",
            "20",
            "--channels",
            "2",
            "--senders",
            "4",
            "--messages",
            "200",
            "--duration",
            "60",
            "--payload",
            "256",
            "--timeout",
            "10",
        ],
        &out,
        Duration::from_secs(180),
    );
    assert_no_errors(&b);
    assert_eq!(metric(&b, "uas_registered"), 20.0);
    assert_eq!(metric(&b, "channels"), 40.0);
    assert_eq!(metric(&b, "sent"), 200.0);
    assert_eq!(metric(&b, "accepted"), 200.0);
    assert_eq!(metric(&b, "forwarded"), 200.0, "every push at the sink");
    assert_eq!(metric(&b, "lost"), 0.0);
    assert_eq!(metric(&b, "duplicates"), 0.0);
    assert_eq!(metric(&b, "misrouted"), 0.0);
    assert_eq!(metric(&b, "sink_sends"), 200.0);
    // One access token serves the whole run (it lives an hour).
    assert!(metric(&b, "sink_grants") >= 1.0);
    assert!(metric(&b, "accepted_per_s") > 0.0 && metric(&b, "forwarded_per_s") > 0.0);
    assert!(b["metrics"]["server_cpu_us_per_forwarded"].is_number());
    assert!(b["summary"]
        .as_str()
        .unwrap()
        .contains("µs per bridged message"));
    assert_latency(&b, "end_to_end", 200);
    assert_latency(&b, "registration", 20);

    let html = dir.path().join("report.html");
    let page = report(&[out.to_str().unwrap()], &html);
    assert!(page.contains("<h2>bridge</h2>"));
}

/// Issue 24: well-behaved senders against a flooder, Herald with its push
/// quotas on. The sender limit is lowered (100/s, burst 100) so that the
/// flooder, at a few thousand POSTs a second here, meets it within the
/// run; the receiver limits are Herald's defaults.
#[test]
fn abuse_against_herald_with_its_quotas() {
    let herald = Herald::start_throttled(&[
        ("HERALD_SENDER_RATE_LIMIT", "100/s"),
        ("HERALD_SENDER_RATE_BURST", "100"),
    ]);
    let dir = tempfile::tempdir().expect("tempdir");
    let url = herald.url();
    let pid = herald.child.id().to_string();
    let out = dir.path().join("abuse.json");
    let a = scenario(
        &[
            "abuse",
            "--url",
            &url,
            "--target",
            "herald",
            "--timeout",
            "10",
            "--server-pid",
            &pid,
            "--uas",
            "20",
            "--senders",
            "4",
            "--rate",
            "20",
            "--duration",
            "3",
            "--drain",
            "5",
            "--flood-uas",
            "4",
            "--flood-channels",
            "3",
            "--flood-connections",
            "16",
            "--anonymous",
        ],
        &out,
        Duration::from_secs(180),
    );
    let html = dir.path().join("report.html");
    let page = report(&[out.to_str().unwrap()], &html);
    assert!(page.contains("<h2>abuse</h2>") && page.contains("flooder_429"));

    // The well-behaved senders lost nothing and were refused nothing, in
    // every phase, flood or not.
    assert_no_errors(&a);
    let phases = ["baseline", "flood_one", "flood_many", "flood_anonymous"];
    for p in phases {
        let sent = metric(&a, &format!("{p}_sent"));
        assert!(sent >= 50.0, "{p}: {sent} sent");
        assert_eq!(metric(&a, &format!("{p}_accepted")), sent, "{p}");
        assert_eq!(metric(&a, &format!("{p}_delivered")), sent, "{p}");
        assert_eq!(metric(&a, &format!("{p}_lost")), 0.0, "{p}");
        assert_latency(&a, p, sent as u64);
    }
    for p in &phases[1..] {
        assert!(metric(&a, &format!("{p}_p99_ratio")) > 0.0, "{p}");
        assert!(metric(&a, &format!("{p}_flooder_per_s")) > 0.0, "{p}");
        // Every 429 says when to come back.
        assert_eq!(
            metric(&a, &format!("{p}_flooder_429_without_retry_after")),
            0.0,
            "{p}"
        );
    }
    assert!(a["metrics"]["target_met"].is_boolean());
    assert_eq!(a["rows"].as_array().map(|r| r.len()), Some(4));

    // The flooder was held: one subscription takes its burst (30) and 2/s,
    // the rest is refused as over the receiver's quota (errno 125).
    let summary = a["summary"].as_str().unwrap_or_default();
    assert!(
        metric(&a, "flood_one_flooder_429_errno_125") > 0.0,
        "{summary}"
    );
    assert!(metric(&a, "flood_one_flooder_201") <= 60.0, "{summary}");
    // Many subscriptions: over the sender's quota (126) as well as the
    // user agents' (125).
    assert!(
        metric(&a, "flood_many_flooder_429_errno_126") > 0.0,
        "{summary}"
    );
    assert!(
        metric(&a, "flood_many_flooder_201") < metric(&a, "flood_many_flooder_sent") / 2.0,
        "{summary}"
    );
    // Without VAPID: the per-address bucket (126).
    assert!(
        metric(&a, "flood_anonymous_flooder_429_errno_126") > 0.0,
        "{summary}"
    );
}

/// `restart` builds a small store with `herald import`, then stops and
/// starts Herald on it, cleanly and with kill -9 during a push load: every
/// restart answers a hello and delivers a stored user agent's whole queue.
#[test]
fn restart_of_an_imported_store() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("ws://127.0.0.1:{}/", free_port());
    let herald = herald_bin();
    let data = dir.path().join("data");
    let out = dir.path().join("restart.json");
    let r = scenario(
        &[
            "restart",
            "--url",
            &url,
            "--herald",
            herald.to_str().expect("utf-8 path"),
            "--data-dir",
            data.to_str().expect("utf-8 path"),
            "--uas",
            "200",
            "--runs",
            "1",
            "--load-secs",
            "0.5",
            "--load-uas",
            "4",
        ],
        &out,
        Duration::from_secs(60),
    );
    assert_no_errors(&r);
    let rows = r["rows"].as_array().expect("rows");
    assert_eq!(rows.len(), 2);
    for (row, after) in rows.iter().zip(["clean", "kill9"]) {
        assert_eq!(row["after"], after);
        assert_eq!(row["drained"], 10, "{row}");
        assert!(row["load_accepted"].as_u64() > Some(0), "{row}");
        let ready = row["ready_ms"].as_f64().expect("ready_ms");
        assert!(ready > 0.0 && ready <= row["first_delivery_ms"].as_f64().expect("first"));
    }
    assert!(metric(&r, "store_bytes") > 0.0 && metric(&r, "import_s") > 0.0);
    let html = dir.path().join("report.html");
    assert!(report(&[out.to_str().unwrap()], &html).contains("restart"));
}
