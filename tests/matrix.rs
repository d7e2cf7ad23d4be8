//! The Matrix push gateway (issue 27) against a real Herald process: the
//! specification's example requests sent as a homeserver would, real
//! websocket user agents subscribed without a key receiving them, and
//! `herald listen` printing them. The real-Synapse tests are in
//! tests/matrix_synapse.rs.

mod common;

use common::*;
use serde_json::{json, Value};
use std::process::{Command, Stdio};
use std::time::Duration;

const NOTIFY: &str = "/_matrix/push/v1/notify";

/// The request example of the Matrix Push Gateway API specification
/// (matrix-org/matrix-spec, data/api/push-gateway/push_notifier.yaml),
/// its one device's pushkey replaced by `pushkeys`.
fn spec_example(pushkeys: &[&str]) -> Value {
    let mut v = json!({
      "notification": {
        "event_id": "$3957tyerfgewrf384",
        "room_id": "!slw48wfj34rtnrf:example.com",
        "type": "m.room.message",
        "sender": "@exampleuser:matrix.org",
        "sender_display_name": "Major Tom",
        "room_name": "Mission Control",
        "room_alias": "#exampleroom:matrix.org",
        "prio": "high",
        "content": {"msgtype": "m.text", "body": "I'm floating in a most peculiar way."},
        "counts": {"unread": 2, "missed_calls": 1},
        "devices": [{
          "app_id": "org.matrix.matrixConsole.ios",
          "pushkey": "V2h5IG9uIGVhcnRoIGRpZCB5b3UgZGVjb2RlIHRoaXM/",
          "pushkey_ts": 12345678,
          "data": {},
          "tweaks": {"sound": "bing"}
        }]
      }
    });
    let device = v["notification"]["devices"][0].clone();
    v["notification"]["devices"] = pushkeys
        .iter()
        .map(|k| {
            let mut d = device.clone();
            d["pushkey"] = json!(k);
            d
        })
        .collect();
    v
}

/// The spec's own example, untouched: its pushkey is no URL.
const SPEC_PUSHKEY: &str = "V2h5IG9uIGVhcnRoIGRpZCB5b3UgZGVjb2RlIHRoaXM/";

/// What the device must receive: the notification without `devices`.
fn pushed_body(request: &Value) -> Value {
    let mut n = request["notification"].clone();
    n.as_object_mut().unwrap().remove("devices");
    json!({ "notification": n })
}

async fn notify(h: &Herald, body: &Value) -> Resp {
    notify_raw(h, body.to_string().into_bytes()).await
}

async fn notify_raw(h: &Herald, body: Vec<u8>) -> Resp {
    http(
        h,
        "POST",
        NOTIFY,
        &[("content-type", "application/json")],
        body,
    )
    .await
    .expect("notify request")
}

fn rejected(r: &Resp) -> Vec<String> {
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    serde_json::from_value(r.json()["rejected"].clone()).expect("rejected is a list")
}

/// The JSON a notification frame carries: plaintext, `identity` encoded.
fn plaintext(n: &Value) -> Value {
    assert_eq!(n["headers"], json!({"encoding": "identity"}), "{n}");
    serde_json::from_slice(&unb64(n["data"].as_str().unwrap())).expect("JSON payload")
}

async fn matrix_metric(h: &Herald, name: &str, outcome: &str) -> f64 {
    metric(
        h,
        &format!("herald_matrix_{name}_total{{outcome=\"{outcome}\"}}"),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_spec_example_reaches_a_websocket_user_agent() {
    let h = Herald::start().await;
    let mut ua = Ua::hello(&h, None).await;
    let (channel, endpoint) = ua.subscribe(None).await;

    let request = spec_example(&[&endpoint, SPEC_PUSHKEY]);
    let r = notify(&h, &request).await;
    assert_eq!(rejected(&r), [SPEC_PUSHKEY]);
    assert_eq!(
        r.header("content-type").as_deref(),
        Some("application/json")
    );

    let n = ua.notification().await;
    assert_eq!(n["channelID"], channel);
    assert_eq!(plaintext(&n), pushed_body(&request));
    // prio high: a day.
    assert_eq!(n["ttl"], 86400);
    ua.ack(&n).await;

    // prio low: an hour.
    let mut low = spec_example(&[&endpoint]);
    low["notification"]["prio"] = json!("low");
    assert!(rejected(&notify(&h, &low).await).is_empty());
    let n = ua.notification().await;
    assert_eq!(n["ttl"], 3600);
    assert_eq!(plaintext(&n), pushed_body(&low));
    ua.ack(&n).await;

    assert_eq!(matrix_metric(&h, "notifications", "ok").await, 2.0);
    assert_eq!(matrix_metric(&h, "devices", "pushed").await, 2.0);
    assert_eq!(matrix_metric(&h, "devices", "rejected").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_forged_gone_and_vapid_bound_pushkeys_are_rejected() {
    let h = Herald::start().await;
    // Anything a foreign pushkey names must never be contacted.
    let foreign = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    foreign.set_nonblocking(true).unwrap();
    let foreign_port = foreign.local_addr().unwrap().port();

    let mut ua = Ua::hello(&h, None).await;
    let (_, good) = ua.subscribe(None).await;
    let (gone_channel, gone) = ua.subscribe(None).await;
    ua.send(json!({"messageType": "unregister", "channelID": gone_channel}))
        .await;
    assert_eq!(ua.recv().await["status"], 200);
    let app = AppServer::new();
    let (_, bound) = ua.subscribe(Some(&app.public())).await;

    let token = good.rsplit('/').next().unwrap();
    let mut forged_token = token.to_string();
    let last = forged_token.pop().unwrap();
    forged_token.push(if last == 'A' { 'B' } else { 'A' });
    let forged = good.replace(token, &forged_token);
    let foreign_up = format!("http://127.0.0.1:{foreign_port}/upAbCdEf?up=1");
    let foreign_wpush = format!("http://127.0.0.1:{foreign_port}/wpush/v1/{forged_token}");

    let keys = [
        good.as_str(),
        forged.as_str(),
        gone.as_str(),
        bound.as_str(),
        foreign_up.as_str(),
        foreign_wpush.as_str(),
        SPEC_PUSHKEY,
    ];
    let r = notify(&h, &spec_example(&keys)).await;
    let mut got = rejected(&r);
    got.sort();
    let mut want: Vec<String> = keys[1..].iter().map(|k| k.to_string()).collect();
    want.sort();
    assert_eq!(got, want);

    // The good one was pushed, once; nothing else reached this user agent.
    let n = ua.notification().await;
    assert_eq!(
        plaintext(&n)["notification"]["event_id"],
        "$3957tyerfgewrf384"
    );
    ua.ack(&n).await;
    assert!(ua.try_recv(Duration::from_millis(300)).await.is_none());

    // Herald made no request to the foreign host.
    tokio::time::sleep(Duration::from_millis(200)).await;
    match foreign.accept() {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("the foreign pushkey's host was contacted: {other:?}"),
    }
    assert_eq!(matrix_metric(&h, "devices", "rejected").await, 6.0);
    assert_eq!(matrix_metric(&h, "devices", "pushed").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gone_user_agent_is_rejected() {
    // A user agent unseen for longer than ua_expiry is gone (410, errno 103).
    let h = Herald::start_with(&[], &[("HERALD_UA_EXPIRY", "1s")]).await;
    let (_, endpoint) = offline_subscription(&h, None).await;
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let r = notify(&h, &spec_example(&[&endpoint])).await;
    assert_eq!(rejected(&r), [endpoint]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushkeys_behind_another_host_name_or_with_a_trailing_slash() {
    // Endpoints are handed out under public_url, a name this test never
    // resolves: only the path and its token count.
    let h = Herald::start_with(&["--public-url", "https://push.example.com"], &[]).await;
    let mut ua = Ua::hello(&h, None).await;
    let (_, endpoint) = ua.subscribe(None).await;
    assert!(
        endpoint.starts_with("https://push.example.com/wpush/"),
        "{endpoint}"
    );
    let other_host = endpoint.replace("https://push.example.com", "http://herald.internal:8080");
    for key in [endpoint.clone(), format!("{endpoint}/"), other_host] {
        let r = notify(&h, &spec_example(&[&key])).await;
        assert!(rejected(&r).is_empty(), "{key}");
        let n = ua.notification().await;
        assert_eq!(
            plaintext(&n)["notification"]["room_name"],
            "Mission Control"
        );
        ua.ack(&n).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_are_refused_and_deliver_nothing() {
    let h = Herald::start().await;
    let mut ua = Ua::hello(&h, None).await;
    let (_, endpoint) = ua.subscribe(None).await;
    let good_device = json!({"app_id": "a", "pushkey": endpoint});
    let bodies: Vec<Vec<u8>> = vec![
        b"not json".to_vec(),
        b"".to_vec(),
        json!([good_device]).to_string().into_bytes(),
        json!({"devices": [good_device]}).to_string().into_bytes(),
        json!({"notification": {"event_id": "$e"}})
            .to_string()
            .into_bytes(),
        json!({"notification": {"devices": good_device}})
            .to_string()
            .into_bytes(),
        // A good device first: the bad second one stops both.
        json!({"notification": {"devices": [good_device, {"app_id": "a"}]}})
            .to_string()
            .into_bytes(),
        json!({"notification": {"devices": [good_device, {"pushkey": 7}]}})
            .to_string()
            .into_bytes(),
    ];
    for body in bodies {
        let r = notify_raw(&h, body.clone()).await;
        assert_eq!(
            (r.status, r.errno()),
            (400, 129),
            "{}",
            String::from_utf8_lossy(&body)
        );
    }
    // Over the request limit (64 KiB).
    let mut huge = spec_example(&[&endpoint]);
    huge["notification"]["content"]["body"] = json!("x".repeat(70 * 1024));
    let r = notify(&h, &huge).await;
    assert_eq!((r.status, r.errno()), (413, 104));
    // Larger than max_message_bytes even without its content.
    let mut wide = spec_example(&[&endpoint]);
    wide["notification"]["room_name"] = json!("r".repeat(5000));
    let r = notify(&h, &wide).await;
    assert_eq!((r.status, r.errno()), (413, 104));

    assert!(ua.try_recv(Duration::from_millis(500)).await.is_none());
    assert_eq!(matrix_metric(&h, "notifications", "malformed").await, 10.0);
    assert_eq!(matrix_metric(&h, "devices", "pushed").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_is_dropped_when_the_notification_would_not_fit() {
    let h = Herald::start().await;
    let mut ua = Ua::hello(&h, None).await;
    let (_, endpoint) = ua.subscribe(None).await;
    let mut long = spec_example(&[&endpoint]);
    long["notification"]["content"]["body"] = json!("y".repeat(6000));
    assert!(rejected(&notify(&h, &long).await).is_empty());
    let got = plaintext(&ua.notification().await);
    let mut want = pushed_body(&long);
    want["notification"]
        .as_object_mut()
        .unwrap()
        .remove("content");
    assert_eq!(got, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_probe_and_other_methods() {
    let h = Herald::start().await;
    let r = http(&h, "GET", NOTIFY, &[], vec![]).await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.json(), json!({"unifiedpush": {"gateway": "matrix"}}));
    for method in ["PUT", "DELETE", "PATCH"] {
        let r = http(&h, method, NOTIFY, &[], vec![]).await.unwrap();
        assert_eq!((r.status, r.errno()), (405, 118), "{method}");
    }
    let r = http(&h, "POST", "/_matrix/push/v1/other", &[], vec![])
        .await
        .unwrap();
    assert_eq!(r.status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_mailbox_holds_the_device_without_rejecting_it() {
    let h = Herald::start_with(&[], &[("HERALD_MAX_STORED_MESSAGES", "1")]).await;
    let (_, offline) = offline_subscription(&h, None).await;
    let mut ua = Ua::hello(&h, None).await;
    let (_, online) = ua.subscribe(None).await;

    assert!(rejected(&notify(&h, &spec_example(&[&offline])).await).is_empty());
    // Its only device is full: nothing was pushed, so the homeserver is
    // told to retry later, as any sender would be.
    let r = notify(&h, &spec_example(&[&offline])).await;
    assert_eq!((r.status, r.errno()), (429, 116));
    assert!(r.header("retry-after").is_some());
    // With another device pushed, the full one is neither pushed nor
    // rejected: rejecting would make the homeserver delete a good pusher.
    let r = notify(&h, &spec_example(&[&offline, &online])).await;
    assert!(rejected(&r).is_empty());
    let n = ua.notification().await;
    assert_eq!(
        plaintext(&n)["notification"]["sender"],
        "@exampleuser:matrix.org"
    );
    assert_eq!(matrix_metric(&h, "notifications", "throttled").await, 1.0);
    assert_eq!(matrix_metric(&h, "notifications", "ok").await, 2.0);
}

/// The quotas of any push hold for the gateway: a device over its own
/// quota is held (429 with `Retry-After` when nothing else was pushed),
/// never rejected; the homeserver, a sender without VAPID, has its
/// address's quota.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quotas_hold_devices_and_throttle_the_homeserver() {
    let h = Herald::start_with(
        &[],
        &[
            ("HERALD_SUBSCRIPTION_RATE_LIMIT", "1/h"),
            ("HERALD_SUBSCRIPTION_RATE_BURST", "1"),
            ("HERALD_ANONYMOUS_RATE_LIMIT", "1/h"),
            ("HERALD_ANONYMOUS_RATE_BURST", "4"),
        ],
    )
    .await;
    let mut ua = Ua::hello(&h, None).await;
    let (_, busy) = ua.subscribe(None).await;
    let (quiet_channel, quiet) = ua.subscribe(None).await;

    assert!(rejected(&notify(&h, &spec_example(&[&busy])).await).is_empty());
    let n = ua.notification().await;
    ua.ack(&n).await;
    // Its only device is over its quota: retry later, the pusher kept.
    let r = notify(&h, &spec_example(&[&busy])).await;
    assert_eq!((r.status, r.errno()), (429, 125));
    let wait: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!(wait >= 1, "{wait}");
    // Beside a device that takes it: 200, the busy one neither pushed nor
    // rejected.
    let r = notify(&h, &spec_example(&[&busy, &quiet])).await;
    assert!(rejected(&r).is_empty());
    let n = ua.notification().await;
    assert_eq!(n["channelID"], quiet_channel);
    ua.ack(&n).await;
    assert_eq!(
        metric(&h, "herald_throttled_total{reason=\"subscription\"}").await,
        2.0
    );

    // Three requests so far; the fourth is the homeserver's last before
    // its address's quota refuses it, whatever its devices.
    let (_, fresh) = ua.subscribe(None).await;
    assert_eq!(notify(&h, &spec_example(&[&fresh])).await.status, 200);
    let n = ua.notification().await;
    ua.ack(&n).await;
    let r = notify(&h, &spec_example(&[SPEC_PUSHKEY])).await;
    assert_eq!((r.status, r.errno()), (429, 126));
    assert!(r.header("retry-after").is_some());
    assert_eq!(
        metric(&h, "herald_throttled_total{reason=\"sender_address\"}").await,
        1.0
    );
    assert_eq!(matrix_metric(&h, "notifications", "throttled").await, 2.0);
    assert!(ua.try_recv(Duration::from_millis(300)).await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn application_servers_cannot_send_plaintext() {
    let h = Herald::start().await;
    let mut ua = Ua::hello(&h, None).await;
    let (_, endpoint) = ua.subscribe(None).await;
    let r = request(
        "POST",
        &endpoint,
        &[("ttl", "60"), ("content-encoding", "identity")],
        br#"{"notification":{"event_id":"$forged"}}"#.to_vec(),
    )
    .await
    .unwrap();
    assert_eq!((r.status, r.errno()), (400, 110));
    assert!(ua.try_recv(Duration::from_millis(300)).await.is_none());
}

/// `herald listen` (the client library) passes identity payloads through
/// and prints the notification's JSON as `text`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn herald_listen_prints_the_notification() {
    let h = Herald::start().await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.json");
    let state = state.to_str().unwrap().to_string();
    let run = |args: Vec<String>| {
        tokio::task::spawn_blocking(move || {
            Command::new(env!("CARGO_BIN_EXE_herald"))
                .args(&args)
                .stdin(Stdio::null())
                .output()
                .expect("run herald")
        })
    };
    let sub = run(vec![
        "listen".into(),
        "--state".into(),
        state.clone(),
        "subscribe".into(),
        "matrix".into(),
        "--server".into(),
        h.ws_url(),
    ])
    .await
    .unwrap();
    assert!(
        sub.status.success(),
        "{}",
        String::from_utf8_lossy(&sub.stderr)
    );
    let sub: Value = serde_json::from_slice(&sub.stdout).unwrap();
    let endpoint = sub["endpoint"].as_str().unwrap();

    let request = spec_example(&[endpoint]);
    assert!(rejected(&notify(&h, &request).await).is_empty());
    let listen = run(vec![
        "listen".into(),
        "--state".into(),
        state,
        "run".into(),
        "--count".into(),
        "1".into(),
    ]);
    let out = tokio::time::timeout(Duration::from_secs(30), listen)
        .await
        .expect("run --count 1 exits")
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(line["encoding"], "identity");
    let text: Value = serde_json::from_str(line["text"].as_str().unwrap()).unwrap();
    assert_eq!(text, pushed_body(&request));
}
