//! `herald backup` and `herald restore` through real Herald processes: a
//! backup taken while pushes keep arriving holds every push answered 201
//! before it, and a fresh node on the restored data directory delivers them
//! to the user agent, whose endpoints still work; and what is refused.

mod common;

use common::redis::RedisServer;
use common::*;
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::path::Path;
use std::process::Output;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const TOKEN: &str = "admin-token-0123456789";

async fn with_admin(env: &[(&str, &str)]) -> Herald {
    let mut all = vec![
        ("HERALD_ADMIN_TOKENS", TOKEN),
        ("HERALD_MAX_STORED_MESSAGES", "100000"),
    ];
    all.extend_from_slice(env);
    Herald::start_with(&[], &all).await
}

async fn admin_backup(h: &Herald, body: &str, token: Option<&str>) -> Resp {
    let auth = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("authorization", a.as_str())).collect();
    http(
        h,
        "POST",
        "/v1/admin/backup",
        &headers,
        body.as_bytes().to_vec(),
    )
    .await
    .unwrap()
}

/// `herald ARGS`, with the admin URL and token of `h` in the environment.
fn herald(h: Option<&Herald>, args: &[&str]) -> Output {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_herald"));
    cmd.args(args);
    if let Some(h) = h {
        cmd.env("HERALD_ADMIN_URL", h.url())
            .env("HERALD_ADMIN_TOKEN", TOKEN);
    }
    cmd.output().unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Every notification until `within` passes without one, acknowledged,
/// decrypted.
async fn drain(ua: &mut Ua, keys: &UaKeys, within: Duration) -> Vec<String> {
    let mut got = Vec::new();
    while let Some(n) = ua.try_recv(within).await {
        assert_eq!(n["messageType"], "notification", "{n}");
        got.push(payload(keys, &n));
        ua.ack(&n).await;
    }
    got
}

#[tokio::test]
async fn a_backup_taken_while_pushing_restores_into_a_fresh_node_that_delivers() {
    let h = with_admin(&[]).await;
    let keys = Arc::new(UaKeys::new());
    let mut ua = Ua::hello(&h, None).await;
    let (_, first_ep) = ua.subscribe(None).await;
    let (_, second_ep) = ua.subscribe(None).await;
    let uaid = ua.uaid.clone();
    drop(ua);
    tokio::time::sleep(Duration::from_millis(100)).await;

    let mut queued = Vec::new();
    for i in 0..20 {
        let (ep, text) = if i % 2 == 0 {
            (&first_ep, format!("queued-{i}"))
        } else {
            (&second_ep, format!("queued-{i}"))
        };
        let r = push(ep, None, "", &keys, &text, &[("ttl", "3600")]).await;
        assert_eq!(r.status, 201);
        queued.push(text);
    }

    // Pushes keep arriving while the backup is taken: each 201 is noted
    // with when it came back.
    let stop = Arc::new(AtomicBool::new(false));
    let pusher = {
        let (stop, keys, ep) = (stop.clone(), keys.clone(), first_ep.clone());
        tokio::spawn(async move {
            let mut answered = Vec::new();
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let text = format!("live-{i}");
                let r = push(&ep, None, "", &keys, &text, &[("ttl", "3600")]).await;
                assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
                answered.push((text, Instant::now()));
                i += 1;
            }
            answered
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;

    let tmp = tempfile::tempdir().unwrap();
    let backup = tmp.path().join("backups/first");
    let called = Instant::now();
    let out = {
        let args = [
            "backup".to_string(),
            s(&backup).to_string(),
            "--json".into(),
        ];
        let (url, dir) = (h.url(), tmp.path().to_path_buf());
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_herald"))
                .args(&args)
                .env("HERALD_ADMIN_URL", url)
                .env("HERALD_ADMIN_TOKEN", TOKEN)
                .current_dir(dir)
                .output()
                .unwrap()
        })
        .await
        .unwrap()
    };
    let returned = Instant::now();
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let answered = pusher.await.unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let described: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(described["engine"], "rocksdb");
    assert_eq!(described["endpoint_keys"], true);
    assert_eq!(described["dir"], s(&backup));
    assert!(described["files"].as_u64().unwrap() > 3, "{described}");
    assert!(backup.join("herald-backup.json").is_file());
    let before: Vec<&String> = answered
        .iter()
        .filter(|(_, at)| *at < called)
        .map(|(t, _)| t)
        .collect();
    let after: BTreeSet<&String> = answered
        .iter()
        .filter(|(_, at)| *at > returned)
        .map(|(t, _)| t)
        .collect();
    assert!(
        !before.is_empty() && !after.is_empty(),
        "pushes answered before the call and after it"
    );
    println!(
        "backup while pushing: {} pushes 201 before the call, {} during it, {} after; took {} ms ({:?} for the CLI)",
        before.len(),
        answered.len() - before.len() - after.len(),
        after.len(),
        described["took_ms"],
        returned - called
    );
    assert_eq!(
        metric(
            &h,
            r#"herald_admin_requests_total{op="backup",outcome="ok"}"#
        )
        .await,
        1.0
    );
    let mut old = h;
    old.stop();

    // A fresh node: its own port, and a data directory filled by restore.
    let mut fresh = with_admin(&[]).await;
    fresh.stop();
    let data = tmp.path().join("restored-data");
    let out = herald(None, &["restore", s(&backup), "--data-dir", s(&data)]);
    assert!(out.status.success(), "{}", stderr(&out));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("restored the backup"), "{said}");
    fresh.data_dir = data;
    fresh.restart().await;

    let mut ua = Ua::hello(&fresh, Some(&uaid)).await;
    assert_eq!(ua.uaid, uaid, "the restored node knows the user agent");
    let got = drain(&mut ua, &keys, Duration::from_secs(2)).await;
    let got_set: BTreeSet<&String> = got.iter().collect();
    assert_eq!(got.len(), got_set.len(), "nothing twice");
    for text in queued.iter().chain(before.iter().copied()) {
        assert!(
            got_set.contains(text),
            "{text} (answered 201 before the backup) is missing"
        );
    }
    for text in &got {
        let sent = queued.contains(text) || answered.iter().any(|(t, _)| t == text);
        assert!(sent, "{text} was never sent");
        assert!(
            !after.contains(text),
            "{text} was answered after the backup returned"
        );
    }
    // Endpoints handed out by the old node reach the user agent through the
    // new one: the endpoint key came with the backup.
    let moved = second_ep.replace(&old.url(), &fresh.url());
    assert_ne!(moved, second_ep);
    let r = push(&moved, None, "", &keys, "after-restore", &[]).await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(payload(&keys, &ua.notification().await), "after-restore");
}

#[tokio::test]
async fn backups_and_restores_refuse_what_they_must() {
    let plain = Herald::start().await;
    let r = admin_backup(&plain, r#"{"dir": "/tmp/x"}"#, Some(TOKEN)).await;
    assert_eq!((r.status, r.errno()), (404, 119), "no admin_tokens: no API");

    let mut h = with_admin(&[]).await;
    let tmp = tempfile::tempdir().unwrap();
    let taken = tmp.path().join("taken");
    let dir_body = |p: &Path| json!({ "dir": s(p) }).to_string();
    for token in [None, Some("wrong-token-000000000")] {
        let r = admin_backup(&h, &dir_body(&taken), token).await;
        assert_eq!((r.status, r.errno()), (401, 109), "{token:?}");
    }
    for body in ["", "{}", r#"{"dir": "relative/dir"}"#, r#"{"dir": 3}"#] {
        let r = admin_backup(&h, body, Some(TOKEN)).await;
        assert_eq!((r.status, r.errno()), (400, 134), "{body}");
    }
    let r = http(
        &h,
        "GET",
        "/v1/admin/backup",
        &[("authorization", &format!("Bearer {TOKEN}"))],
        vec![],
    )
    .await
    .unwrap();
    assert_eq!((r.status, r.errno()), (405, 118));

    let r = admin_backup(&h, &dir_body(&taken), Some(TOKEN)).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let again = admin_backup(&h, &dir_body(&taken), Some(TOKEN)).await;
    assert_eq!((again.status, again.errno()), (409, 135));
    assert!(again.json()["message"]
        .as_str()
        .unwrap()
        .contains("already exists"));
    let out = herald(Some(&h), &["backup", s(&taken)]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("409") && stderr(&out).contains("errno 135"),
        "{}",
        stderr(&out)
    );
    let out = herald(Some(&h), &["backup", "relative/dir"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("absolute path"), "{}", stderr(&out));
    for (outcome, n) in [("ok", 1.0), ("unauthorized", 2.0), ("refused", 7.0)] {
        let line = format!(r#"herald_admin_requests_total{{op="backup",outcome="{outcome}"}}"#);
        assert_eq!(metric(&h, &line).await, n, "{outcome}");
    }

    // Restore: never into the data directory of a running node, never from
    // something that is no backup, never over a store unless forced.
    let data = h.data_dir.clone();
    let out = herald(None, &["restore", s(&taken), "--data-dir", s(&data)]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("already in use by another herald process"),
        "{}",
        stderr(&out)
    );
    let out = herald(
        None,
        &[
            "backup",
            s(&tmp.path().join("offline")),
            "--data-dir",
            s(&data),
        ],
    );
    assert!(!out.status.success());
    assert!(stderr(&out).contains("already in use"), "{}", stderr(&out));
    h.stop();
    let out = herald(
        None,
        &["restore", s(&data), "--data-dir", s(&tmp.path().join("x"))],
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("is not a Herald backup"),
        "{}",
        stderr(&out)
    );
    let out = herald(None, &["restore", s(&taken), "--data-dir", s(&data)]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("is not empty") && stderr(&out).contains("--force"),
        "{}",
        stderr(&out)
    );
    let out = herald(
        None,
        &["restore", s(&taken), "--data-dir", s(&data), "--force"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let aside: Vec<String> = std::fs::read_dir(&data)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("db.before-restore-"))
        .collect();
    assert_eq!(aside.len(), 1, "the old store is moved aside, not deleted");
    assert!(data.join(&aside[0]).join("CURRENT").is_file());

    // A stopped node's store is backed up directly, and the node starts
    // on its restored store.
    let offline = tmp.path().join("offline");
    let out = herald(None, &["backup", s(&offline), "--data-dir", s(&data)]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(offline.join("herald-backup.json").is_file());
    h.restart().await;
}

#[tokio::test]
async fn a_redis_node_refuses_a_backup_and_says_why() {
    let redis = RedisServer::start();
    let key = b64(&rand::random::<[u8; 32]>());
    let h = with_admin(&[
        ("HERALD_STORE", "redis"),
        ("HERALD_REDIS_URL", redis.url()),
        ("HERALD_ENDPOINT_KEYS", &key),
    ])
    .await;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("never");
    let r = admin_backup(&h, &json!({ "dir": s(&dir) }).to_string(), Some(TOKEN)).await;
    assert_eq!((r.status, r.errno()), (409, 135));
    let message = r.json()["message"].as_str().unwrap().to_string();
    assert!(message.contains("Redis's own persistence"), "{message}");
    assert!(!dir.exists(), "a refused backup leaves no directory");
}
