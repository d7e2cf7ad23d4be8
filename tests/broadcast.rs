//! Broadcasts (megaphone) through the public interfaces: websocket user
//! agents following versions, the operator API and CLI, an upstream source
//! served by a small HTTP server in the test.

mod common;

use common::*;
use futures_util::StreamExt;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const TOKEN: &str = "operator-token-0123456789";
const RS: &str = "remote-settings/monitor_changes";

async fn with_api(env: &[(&str, &str)]) -> Herald {
    let mut all = vec![("HERALD_BROADCAST_TOKENS", TOKEN)];
    all.extend_from_slice(env);
    Herald::start_with(&[], &all).await
}

async fn set(h: &Herald, id: &str, version: &str) -> Resp {
    let auth = format!("Bearer {TOKEN}");
    http(
        h,
        "PUT",
        &format!("/v1/broadcasts/{id}"),
        &[("authorization", &auth)],
        version.as_bytes().to_vec(),
    )
    .await
    .unwrap()
}

async fn hello_with(h: &Herald, broadcasts: Value) -> (Ua, Value) {
    let mut ua = Ua::connect(h).await;
    ua.send(json!({"messageType": "hello", "use_webpush": true, "broadcasts": broadcasts}))
        .await;
    let reply = ua.recv().await;
    assert_eq!(reply["messageType"], "hello", "{reply}");
    ua.uaid = reply["uaid"].as_str().unwrap().to_string();
    (ua, reply)
}

#[tokio::test]
async fn hello_reports_stale_and_unknown_broadcasts() {
    let h = with_api(&[]).await;
    assert_eq!(set(&h, RS, "\"5\"").await.status, 200);
    assert_eq!(set(&h, "other", "v1").await.status, 200);

    // Firefox's first hello: stale version and an id Herald does not know.
    let (_, reply) = hello_with(&h, json!({RS: "\"0\"", "other": "v1", "nope": "1"})).await;
    assert_eq!(
        reply["broadcasts"],
        json!({RS: "\"5\"", "errors": {"nope": "Broadcast not found"}})
    );
    // Up to date: nothing to say, and the reply keeps Firefox's shape.
    let (_, reply) = hello_with(&h, json!({RS: "\"5\""})).await;
    assert_eq!(reply["broadcasts"], json!({}));
}

#[tokio::test]
async fn subscribing_later_answers_only_when_something_differs() {
    let h = with_api(&[]).await;
    set(&h, RS, "\"7\"").await;
    let (mut ua, _) = hello_with(&h, json!({})).await;
    ua.send(json!({"messageType": "broadcast_subscribe", "broadcasts": {RS: "\"7\""}}))
        .await;
    ua.send_text("{}").await;
    assert_eq!(
        ua.recv().await,
        json!({}),
        "no broadcast message when up to date"
    );
    ua.send(json!({"messageType": "broadcast_subscribe", "broadcasts": {"x": "1"}}))
        .await;
    assert_eq!(
        ua.recv().await,
        json!({"messageType": "broadcast", "broadcasts": {"errors": {"x": "Broadcast not found"}}})
    );
    // A change now reaches the subscription, and an id that appears later
    // reaches whoever asked for it.
    set(&h, RS, "\"8\"").await;
    assert_eq!(
        ua.recv().await,
        json!({"messageType": "broadcast", "broadcasts": {RS: "\"8\""}})
    );
    set(&h, "x", "2").await;
    assert_eq!(
        ua.recv().await,
        json!({"messageType": "broadcast", "broadcasts": {"x": "2"}})
    );
}

/// One change, 1,000 followers: every one hears of it promptly, and
/// connections following nothing hear nothing.
#[tokio::test]
async fn a_change_fans_out_to_every_subscribed_connection() {
    const N: usize = 1000;
    let h = with_api(&[]).await;
    set(&h, RS, "\"1\"").await;
    let mut followers = Vec::with_capacity(N);
    for _ in 0..N {
        let (ua, _) = hello_with(&h, json!({RS: "\"1\""})).await;
        followers.push(ua);
    }
    let mut others = vec![];
    for _ in 0..20 {
        others.push(hello_with(&h, json!({})).await.0);
    }
    let got = Arc::new(AtomicUsize::new(0));
    let mut readers = vec![];
    for mut ua in followers {
        let got = got.clone();
        readers.push(tokio::spawn(async move {
            let m = ua.recv().await;
            assert_eq!(m["broadcasts"][RS], "\"2\"", "{m}");
            got.fetch_add(1, Ordering::Relaxed);
            ua
        }));
    }
    let started = Instant::now();
    assert_eq!(set(&h, RS, "\"2\"").await.status, 200);
    for r in readers {
        r.await.unwrap();
    }
    let took = started.elapsed();
    eprintln!("broadcast reached {N} connections in {took:?}");
    assert_eq!(got.load(Ordering::Relaxed), N);
    // Measured here at about 65 ms; the loadtest measures it at scale.
    assert!(took < Duration::from_secs(1), "fan-out took {took:?}");
    for mut ua in others {
        assert_eq!(ua.try_recv(Duration::from_millis(50)).await, None);
    }
}

#[tokio::test]
async fn the_api_needs_a_token_and_checks_what_it_is_given() {
    let plain = Herald::start().await;
    let r = http(&plain, "GET", "/v1/broadcasts", &[], vec![])
        .await
        .unwrap();
    assert_eq!(r.status, 404, "no tokens configured: no API");
    assert_eq!(set(&plain, "a", "1").await.status, 404);

    let h = with_api(&[]).await;
    for auth in [None, Some("Bearer wrong-token-000000000"), Some(TOKEN)] {
        let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("authorization", *a)).collect();
        let r = http(&h, "PUT", "/v1/broadcasts/a", &headers, b"1".to_vec())
            .await
            .unwrap();
        assert_eq!(r.status, 401, "{auth:?}");
        assert_eq!(r.errno(), 109);
    }
    let r = set(&h, "bad%20id", "1").await;
    assert_eq!((r.status, r.errno()), (400, 120));
    let r = set(&h, "a", "").await;
    assert_eq!((r.status, r.errno()), (400, 120));
    let r = set(&h, "a", &"v".repeat(2000)).await;
    assert_eq!(r.status, 413);
    let r = set(&h, RS, "\"9\"").await;
    assert_eq!(
        r.json(),
        json!({"id": RS, "version": "\"9\"", "changed": true})
    );
    assert_eq!(set(&h, RS, "\"9\"").await.json()["changed"], false);
    let auth = format!("Bearer {TOKEN}");
    let list = http(
        &h,
        "GET",
        "/v1/broadcasts",
        &[("authorization", &auth)],
        vec![],
    )
    .await
    .unwrap();
    assert_eq!(list.json(), json!({"broadcasts": {RS: "\"9\""}}));
}

#[tokio::test]
async fn versions_survive_a_restart() {
    let mut h = with_api(&[]).await;
    set(&h, RS, "\"42\"").await;
    h.stop();
    h.restart().await;
    let (_, reply) = hello_with(&h, json!({RS: "\"0\""})).await;
    assert_eq!(reply["broadcasts"], json!({RS: "\"42\""}));
}

#[tokio::test]
async fn the_cli_sets_and_lists() {
    let h = with_api(&[]).await;
    let (mut ua, _) = hello_with(&h, json!({"cli-test": "0"})).await;
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_herald"))
            .arg("broadcast")
            .args(args)
            .args(["--server", &h.url()])
            .env("HERALD_BROADCAST_TOKEN", TOKEN)
            .output()
            .unwrap()
    };
    let out = run(&["set", "cli-test", "3"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        ua.recv().await,
        json!({"messageType": "broadcast", "broadcasts": {"cli-test": "3"}})
    );
    let out = run(&["list"]);
    assert!(out.status.success(), "{out:?}");
    let listed: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed["broadcasts"]["cli-test"], "3");
    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .args([
            "broadcast",
            "list",
            "--server",
            &h.url(),
            "--token",
            "wrong-token-000000000",
        ])
        .output()
        .unwrap();
    assert!(!bad.status.success());
}

/// A tiny upstream: answers what `body` holds now, or 500 when it is empty.
async fn upstream(body: Arc<std::sync::Mutex<String>>) -> (u16, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let body = body.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |_req| {
                    let text = body.lock().unwrap().clone();
                    async move {
                        let status = if text.is_empty() { 500 } else { 200 };
                        Ok::<_, std::convert::Infallible>(
                            http::Response::builder()
                                .status(status)
                                .body(http_body_util::Full::new(bytes::Bytes::from(text)))
                                .unwrap(),
                        )
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (port, task)
}

#[tokio::test]
async fn an_upstream_source_is_polled_and_its_failures_keep_the_last_versions() {
    let body = Arc::new(std::sync::Mutex::new(
        json!({"code": 200, "broadcasts": {RS: "\"100\""}}).to_string(),
    ));
    let (port, server) = upstream(body.clone()).await;
    let url = format!("http://127.0.0.1:{port}/v1/__broadcasts__");
    let h = Herald::start_with(
        &[],
        &[
            ("HERALD_BROADCAST_SOURCE_URL", &url),
            ("HERALD_BROADCAST_POLL_INTERVAL", "200ms"),
        ],
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let (mut ua, reply) = loop {
        let (ua, reply) = hello_with(&h, json!({RS: "\"0\""})).await;
        if reply["broadcasts"][RS] == "\"100\"" || Instant::now() > deadline {
            break (ua, reply);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(reply["broadcasts"], json!({RS: "\"100\""}));

    // The source fails: versions stay, the failure is counted.
    body.lock().unwrap().clear();
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(&h, "herald_broadcast_source_errors_total").await < 2.0 {
        assert!(Instant::now() < deadline, "source failures not counted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, reply) = hello_with(&h, json!({RS: "\"0\""})).await;
    assert_eq!(reply["broadcasts"], json!({RS: "\"100\""}));

    // It recovers with a new version, which reaches the connected follower.
    *body.lock().unwrap() = json!({"broadcasts": {RS: "\"101\""}}).to_string();
    let m = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match ua.ws.next().await {
                Some(Ok(tokio_tungstenite::tungstenite::Message::Text(t))) => {
                    break serde_json::from_str::<Value>(t.as_str()).unwrap()
                }
                Some(Ok(_)) => continue,
                other => panic!("{other:?}"),
            }
        }
    })
    .await
    .expect("the new version within 10 s");
    assert_eq!(
        m,
        json!({"messageType": "broadcast", "broadcasts": {RS: "\"101\""}})
    );
    assert!(metric(&h, "herald_broadcast_changes_total").await >= 2.0);
    server.abort();
}
