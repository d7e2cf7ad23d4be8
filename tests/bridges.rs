//! The FCM and APNs bridges end to end: a real Herald started from bridge
//! tables, phones registering over HTTP as Firefox for Android and iOS do,
//! an application server sending VAPID-signed, RFC 8291-encrypted pushes,
//! and the loopback mocks of tests/support as FCM and APNs. Payloads are
//! decrypted from what reached the mock, as the phone would.

#[path = "support/apns_mock.rs"]
mod apns_mock;
mod common;
#[path = "support/fcm_mock.rs"]
mod fcm_mock;

use apns_mock::{Answer, ApnsMock};
use common::bridges::*;
use common::redis::shared_cluster;
use common::*;
use fcm_mock::{FcmMock, Reply};
use serde_json::Value;
use std::time::{Duration, Instant};

const FCM_APP: &str = "fenix";
const APNS_APP: &str = "firefox-ios";
const FCM_TOKEN: &str = "fcm-device-token-0001:APA91bHun4MxP5egoKMwt2KZFBaFUH";
const APNS_TOKEN: &str = "a0b1c2d3e4f5a0b1c2d3e4f5a0b1c2d3e4f5a0b1c2d3e4f5a0b1c2d3e4f5a0b1";
const RETRY_AFTER_SECS: u64 = 3;
const ASK_RECEIPT: (&str, &str) = ("prefer", "respond-async");

fn fcm_tables(fcm: &FcmMock) -> Vec<String> {
    vec![fcm_table(
        FCM_APP,
        fcm.project_id(),
        &fcm.credentials_path(),
        &fcm.url(),
    )]
}

fn apns_tables(apns: &ApnsMock) -> Vec<String> {
    let (key, ca) = (apns.key_path(), apns.ca_path());
    let url = apns.url();
    vec![ApnsTable {
        app: APNS_APP,
        topic: apns_mock::TOPIC,
        team_id: apns_mock::TEAM_ID,
        key_id: apns_mock::KEY_ID,
        key: &key,
        base_url: &url,
        ca: &ca,
    }
    .toml()]
}

/// A site's push to `phone`, VAPID-signed by `app` and encrypted for the
/// phone's keys.
async fn send(
    h: &Herald,
    app: &AppServer,
    phone: &Phone,
    text: &str,
    extra: &[(&str, &str)],
) -> Resp {
    push(
        &phone.endpoint,
        Some(app),
        &h.url(),
        &phone.keys,
        text,
        extra,
    )
    .await
}

async fn fcm_requests(fcm: &FcmMock, n: usize, within: Duration) -> Vec<fcm_mock::Recorded> {
    eventually(within, &format!("{n} FCM requests"), || {
        let r = fcm.requests();
        (r.len() >= n).then_some(r)
    })
    .await
}

async fn apns_requests(apns: &ApnsMock, n: usize, within: Duration) -> Vec<apns_mock::Recorded> {
    eventually(within, &format!("{n} APNs requests"), || {
        let r = apns.requests();
        (r.len() >= n).then_some(r)
    })
    .await
}

/// Decrypts an FCM data map as Firefox for Android does.
fn fcm_plaintext(phone: &Phone, data: &Value) -> String {
    assert_eq!(data["chid"], phone.channel.as_str(), "{data}");
    assert_eq!(data["con"], "aes128gcm", "{data}");
    let body = unb64(data["body"].as_str().expect("body"));
    String::from_utf8(phone.keys.decrypt(&body)).unwrap()
}

/// Decrypts an APNs payload as Firefox for iOS's extension does.
fn apns_plaintext(phone: &Phone, payload: &Value) -> String {
    assert_eq!(payload["chid"], phone.channel.as_str(), "{payload}");
    assert_eq!(payload["con"], "aes128gcm", "{payload}");
    assert!(payload["aps"].is_object(), "{payload}");
    let body = unb64(payload["body"].as_str().expect("body"));
    String::from_utf8(phone.keys.decrypt(&body)).unwrap()
}

fn ttl_secs(android: &Value) -> u64 {
    let t = android["ttl"].as_str().expect("android.ttl");
    t.strip_suffix('s').unwrap().parse().unwrap()
}

fn hex_channel(phone: &Phone) -> String {
    phone.channel.replace('-', "")
}

/// 1. FCM: what a push becomes at FCM, and its receipt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fcm_push_reaches_the_device_token_with_its_data_map_and_mapped_headers() {
    let fcm = FcmMock::start();
    let b = Bridged::start(&fcm_tables(&fcm), &[], &[]).await;
    let app = AppServer::new();
    let phone = Phone::register(&b.h, "fcm", FCM_APP, FCM_TOKEN, Some(&app)).await;

    let r = send(
        &b.h,
        &app,
        &phone,
        "first",
        &[("urgency", "high"), ("ttl", "600"), ASK_RECEIPT],
    )
    .await;
    let receipts_at = receipt_url(&r);
    let r = send(
        &b.h,
        &app,
        &phone,
        "second",
        &[("urgency", "low"), ("topic", "news"), ("ttl", "60")],
    )
    .await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));

    let sent = fcm_requests(&fcm, 2, Duration::from_secs(10)).await;
    let path = format!("/v1/projects/{}/messages:send", fcm.project_id());
    for s in &sent {
        assert_eq!(s.path, path);
        assert_eq!(s.status, 200);
        assert_eq!(s.body["message"]["token"], FCM_TOKEN, "{}", s.body);
    }
    // Oldest first, one at a time.
    let (first, second) = (&sent[0], &sent[1]);
    assert_eq!(fcm_plaintext(&phone, first.data()), "first");
    assert_eq!(first.android()["priority"], "HIGH", "{}", first.body);
    assert!(
        (595..=600).contains(&ttl_secs(first.android())),
        "{}",
        first.body
    );
    assert!(
        first.android().get("collapse_key").is_none(),
        "{}",
        first.body
    );

    assert_eq!(fcm_plaintext(&phone, second.data()), "second");
    assert_eq!(second.android()["priority"], "NORMAL", "{}", second.body);
    assert!(
        (55..=60).contains(&ttl_secs(second.android())),
        "{}",
        second.body
    );
    assert_eq!(
        second.android()["collapse_key"],
        format!("{}news", hex_channel(&phone)),
        "{}",
        second.body
    );

    let got = receipts(&receipts_at, 1, Duration::from_secs(10)).await;
    assert_eq!(got[0]["outcome"], "forwarded", "{got:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(fcm.requests().len(), 2, "each push sent once");
}

/// 2. APNs the same, over TLS trusted through the table's `ca`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apns_push_reaches_the_device_with_its_payload_and_mapped_headers() {
    let apns = ApnsMock::start();
    let b = Bridged::start(&apns_tables(&apns), &[], &[]).await;
    let app = AppServer::new();
    let phone = Phone::register(&b.h, "apns", APNS_APP, APNS_TOKEN, Some(&app)).await;

    let r = send(
        &b.h,
        &app,
        &phone,
        "first",
        &[("urgency", "high"), ("ttl", "600"), ASK_RECEIPT],
    )
    .await;
    let receipts_at = receipt_url(&r);
    let sent_at = now();
    let r = send(
        &b.h,
        &app,
        &phone,
        "second",
        &[("urgency", "low"), ("topic", "news"), ("ttl", "60")],
    )
    .await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));

    let sent = apns_requests(&apns, 2, Duration::from_secs(10)).await;
    for s in &sent {
        assert_eq!((s.method.as_str(), s.device_token()), ("POST", APNS_TOKEN));
        assert_eq!(s.status, 200, "{s:?}");
        assert_eq!(s.header("apns-topic"), Some(apns_mock::TOPIC));
        assert_eq!(s.header("apns-push-type"), Some("alert"));
    }
    let expiration = |s: &apns_mock::Recorded| -> u64 {
        s.header("apns-expiration")
            .expect("apns-expiration")
            .parse()
            .unwrap()
    };
    let (first, second) = (&sent[0], &sent[1]);
    assert_eq!(apns_plaintext(&phone, &first.body), "first");
    assert_eq!(first.header("apns-priority"), Some("10"));
    assert!(first.header("apns-collapse-id").is_none(), "{first:?}");
    assert!(
        (sent_at + 595..=sent_at + 600).contains(&expiration(first)),
        "{first:?}"
    );

    assert_eq!(apns_plaintext(&phone, &second.body), "second");
    assert_eq!(second.header("apns-priority"), Some("5"));
    let collapse = format!("{}news", hex_channel(&phone));
    assert_eq!(second.header("apns-collapse-id"), Some(collapse.as_str()));
    assert!(
        (sent_at + 55..=sent_at + 61).contains(&expiration(second)),
        "{second:?}"
    );

    let got = receipts(&receipts_at, 1, Duration::from_secs(10)).await;
    assert_eq!(got[0]["outcome"], "forwarded", "{got:?}");
}

/// 3a. A 429 with `Retry-After`: the sender has its 201 at once, the
/// message reaches FCM on the second try, not before the upstream asked.
/// 3 s, not 1: Herald's own first backoff (at most 1.25 s) plus its 1 s
/// outbox sweep could pass 1 s by chance, so only a wait longer than both
/// shows `Retry-After` is honoured.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throttled_message_is_retried_after_retry_after() {
    let fcm = FcmMock::start();
    fcm.script([Reply::TooManyRequests {
        retry_after: RETRY_AFTER_SECS.to_string(),
    }]);
    let b = Bridged::start(&fcm_tables(&fcm), &[], &[]).await;
    let app = AppServer::new();
    let phone = Phone::register(&b.h, "fcm", FCM_APP, FCM_TOKEN, Some(&app)).await;
    let retries = |h| metric_sum(h, "herald_bridge_retries_total", &["app=\"fenix\""]);
    let retries_before = retries(&b.h).await;

    let posted = Instant::now();
    let r = send(&b.h, &app, &phone, "after a while", &[("ttl", "60")]).await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    assert!(
        posted.elapsed() < Duration::from_millis(900),
        "201 before any retry"
    );

    let sent = fcm_requests(&fcm, 2, Duration::from_secs(10)).await;
    let arrived = posted.elapsed();
    assert!(
        arrived >= Duration::from_secs(RETRY_AFTER_SECS),
        "retried after {arrived:?}"
    );
    assert_eq!(sent[0].status, 429);
    assert_eq!(sent[1].status, 200);
    assert_eq!(fcm_plaintext(&phone, sent[1].data()), "after a while");
    assert!(retries(&b.h).await >= retries_before + 1.0);
}

/// 3b. An upstream that keeps failing: the message expires with its TTL,
/// the receipt says so, and nothing is sent after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_the_upstream_never_takes_expires_with_its_ttl() {
    let fcm = FcmMock::start();
    fcm.script(std::iter::repeat_n(Reply::Unavailable, 50));
    let b = Bridged::start(&fcm_tables(&fcm), &[], &[]).await;
    let app = AppServer::new();
    let phone = Phone::register(&b.h, "fcm", FCM_APP, FCM_TOKEN, Some(&app)).await;

    let r = send(&b.h, &app, &phone, "too late", &[("ttl", "2"), ASK_RECEIPT]).await;
    let got = receipts(&receipt_url(&r), 1, Duration::from_secs(10)).await;
    assert_eq!(got[0]["outcome"], "expired", "{got:?}");
    let tries = fcm.requests().len();
    assert!(tries >= 1, "tried at least once");
    assert!(fcm.requests().iter().all(|s| s.status == 503));
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(fcm.requests().len(), tries, "nothing sent after expiry");
}

/// 4. A device reported gone drops the user agent: receipt `gone`, the
/// next push 410/103, and the registration 410/103 (register afresh).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_the_upstream_reports_gone_is_dropped() {
    let fcm = FcmMock::start();
    fcm.script([Reply::Unregistered]);
    let apns = ApnsMock::start();
    apns.script([Answer::unregistered()]);
    let mut tables = fcm_tables(&fcm);
    tables.extend(apns_tables(&apns));
    let b = Bridged::start(&tables, &[], &[]).await;
    let app = AppServer::new();
    let android = Phone::register(&b.h, "fcm", FCM_APP, FCM_TOKEN, Some(&app)).await;
    let ios = Phone::register(&b.h, "apns", APNS_APP, APNS_TOKEN, Some(&app)).await;

    for phone in [&android, &ios] {
        let r = send(&b.h, &app, phone, "to nobody", &[ASK_RECEIPT]).await;
        let got = receipts(&receipt_url(&r), 1, Duration::from_secs(10)).await;
        assert_eq!(got[0]["outcome"], "gone", "{}: {got:?}", phone.kind);

        let r = send(&b.h, &app, phone, "again", &[]).await;
        assert_eq!((r.status, r.errno()), (410, 103), "{}", phone.kind);
        let r = phone.get_registration(&b.h).await;
        assert_eq!((r.status, r.errno()), (410, 103), "{}", phone.kind);
    }
    assert_eq!(fcm.requests().len(), 1);
    assert_eq!(apns.requests().len(), 1);
}

/// 5. Access tokens are refreshed before they run out (Herald keeps one
/// until 60 s before its `expires_in`), and shared until then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fcm_access_tokens_are_reused_then_refreshed() {
    let fcm = FcmMock::start();
    fcm.set_expires_in(63);
    let b = Bridged::start(&fcm_tables(&fcm), &[], &[]).await;
    let app = AppServer::new();
    let phone = Phone::register(&b.h, "fcm", FCM_APP, FCM_TOKEN, Some(&app)).await;

    for text in ["one", "two"] {
        assert_eq!(send(&b.h, &app, &phone, text, &[]).await.status, 201);
    }
    fcm_requests(&fcm, 2, Duration::from_secs(10)).await;
    assert_eq!(fcm.grants(), 1, "one token for both");
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(send(&b.h, &app, &phone, "three", &[]).await.status, 201);
    let sent = fcm_requests(&fcm, 3, Duration::from_secs(10)).await;
    assert_eq!(fcm.grants(), 2, "a new token after the first ran low");
    assert!(
        fcm.refused_grants().is_empty(),
        "{:?}",
        fcm.refused_grants()
    );
    let texts: Vec<String> = sent
        .iter()
        .map(|s| fcm_plaintext(&phone, s.data()))
        .collect();
    assert_eq!(texts, ["one", "two", "three"]);
    assert!(sent.iter().all(|s| s.status == 200), "{sent:?}");
    let bearer = |s: &fcm_mock::Recorded| s.header("authorization").unwrap().to_string();
    assert_eq!(bearer(&sent[0]), bearer(&sent[1]));
    assert_ne!(bearer(&sent[1]), bearer(&sent[2]));
}

/// 6. A payload within `max_message_bytes` that the upstream could not
/// take is refused before it is accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_too_large_for_the_upstream_is_refused_with_413() {
    let fcm = FcmMock::start();
    let apns = ApnsMock::start();
    let mut tables = fcm_tables(&fcm);
    tables.extend(apns_tables(&apns));
    let b = Bridged::start(&tables, &[], &[]).await;
    let app = AppServer::new();
    let android = Phone::register(&b.h, "fcm", FCM_APP, FCM_TOKEN, Some(&app)).await;
    let ios = Phone::register(&b.h, "apns", APNS_APP, APNS_TOKEN, Some(&app)).await;
    // 3500 bytes encrypt to 3603: under the default 4096 of
    // `max_message_bytes`, over FCM's 3015 and APNs' 2883.
    let text = "x".repeat(3500);

    let (_, ws_endpoint) = offline_subscription(&b.h, None).await;
    let ws_keys = UaKeys::new();
    let r = push(&ws_endpoint, None, &b.h.url(), &ws_keys, &text, &[]).await;
    assert_eq!(r.status, 201, "a websocket user agent takes it");

    for phone in [&android, &ios] {
        let r = send(&b.h, &app, phone, &text, &[]).await;
        assert_eq!((r.status, r.errno()), (413, 104), "{}", phone.kind);
    }
    // A push that fits still goes through, and is the only one sent.
    for phone in [&android, &ios] {
        assert_eq!(send(&b.h, &app, phone, "small", &[]).await.status, 201);
    }
    let f = fcm_requests(&fcm, 1, Duration::from_secs(10)).await;
    let a = apns_requests(&apns, 1, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!((fcm.requests().len(), apns.requests().len()), (1, 1));
    assert_eq!(fcm_plaintext(&android, f[0].data()), "small");
    assert_eq!(apns_plaintext(&ios, &a[0].body), "small");
}

/// 7. A message the upstream has not taken survives kill -9: after a
/// restart on the same data dir it is sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pending_bridged_message_survives_kill_9() {
    let fcm = FcmMock::start();
    fcm.script([Reply::Unavailable]);
    let mut b = Bridged::start(&fcm_tables(&fcm), &[], &[]).await;
    let app = AppServer::new();
    let phone = Phone::register(&b.h, "fcm", FCM_APP, FCM_TOKEN, Some(&app)).await;

    let r = send(&b.h, &app, &phone, "kept", &[("ttl", "120"), ASK_RECEIPT]).await;
    let receipts_at = receipt_url(&r);
    fcm_requests(&fcm, 1, Duration::from_secs(10)).await;
    // Let the retry be scheduled, not yet due (the first comes ~1 s after
    // acceptance): the crash catches the message between two attempts.
    tokio::time::sleep(Duration::from_millis(200)).await;
    b.h.kill9();
    assert_eq!(fcm.requests().len(), 1, "killed before the retry");
    b.h.restart().await;

    let sent = fcm_requests(&fcm, 2, Duration::from_secs(15)).await;
    assert_eq!(sent[1].status, 200);
    assert_eq!(fcm_plaintext(&phone, sent[1].data()), "kept");
    let got = receipts(&receipts_at, 1, Duration::from_secs(10)).await;
    assert_eq!(got[0]["outcome"], "forwarded", "{got:?}");
}

/// 8. Redis Cluster: a node that never saw the registration accepts a push
/// and forwards it, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_accepted_by_another_cluster_node_is_forwarded_once() {
    let cluster = tokio::task::spawn_blocking(shared_cluster).await.unwrap();
    let fcm = FcmMock::start();
    let tables = fcm_tables(&fcm);
    let key = b64(&rand::random::<[u8; 32]>());
    let env = [
        ("HERALD_STORE", "redis"),
        ("HERALD_REDIS_URL", cluster.url()),
        ("HERALD_ENDPOINT_KEYS", key.as_str()),
    ];
    let a = Bridged::start(&tables, &[], &env).await;
    let public = a.h.url();
    let node_b = Bridged::start(&tables, &["--public-url", &public], &env).await;
    let app = AppServer::new();
    let token = format!("fcm-cluster-{}", rand::random::<u64>());
    let phone = Phone::register(&a.h, "fcm", FCM_APP, &token, Some(&app)).await;

    let path = &phone.endpoint[phone.endpoint.find("/wpush/").unwrap()..];
    let via_b = format!("{}{path}", node_b.h.url());
    let r = push(
        &via_b,
        Some(&app),
        &public,
        &phone.keys,
        "via b",
        &[ASK_RECEIPT],
    )
    .await;
    let receipts_at = receipt_url(&r);
    let sent = fcm_requests(&fcm, 1, Duration::from_secs(10)).await;
    assert_eq!(sent[0].body["message"]["token"], token.as_str());
    assert_eq!(fcm_plaintext(&phone, sent[0].data()), "via b");
    let got = receipts(&receipts_at, 1, Duration::from_secs(10)).await;
    assert_eq!(got[0]["outcome"], "forwarded", "{got:?}");
    // Both nodes sweep the outbox every second: still one send.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(fcm.requests().len(), 1);
}

/// 7b. Killed while FCM holds the request unanswered: the outbox entry's
/// lease (`forward::LEASE`, 60 s) runs out after the restart and the
/// message is sent then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bridged_message_in_flight_at_kill_9_is_sent_after_the_lease() {
    let fcm = FcmMock::start();
    fcm.script([Reply::Stall]);
    let mut b = Bridged::start(&fcm_tables(&fcm), &[], &[]).await;
    let app = AppServer::new();
    let phone = Phone::register(&b.h, "fcm", FCM_APP, FCM_TOKEN, Some(&app)).await;

    let r = send(&b.h, &app, &phone, "in flight", &[("ttl", "300")]).await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    fcm_requests(&fcm, 1, Duration::from_secs(10)).await;
    let killed = Instant::now();
    b.h.kill9();
    b.h.restart().await;

    let sent = fcm_requests(&fcm, 2, Duration::from_secs(75)).await;
    let after = killed.elapsed();
    assert_eq!(sent[1].status, 200);
    assert_eq!(fcm_plaintext(&phone, sent[1].data()), "in flight");
    assert!(
        after <= Duration::from_secs(70),
        "sent {after:?} after the kill"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(fcm.requests().len(), 2, "sent once after the restart");
}
