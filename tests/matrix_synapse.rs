//! Herald's Matrix push gateway (`/_matrix/push/v1/notify`) driven by a real
//! homeserver: Synapse from PyPI (tests/support/synapse.rs), two users in a
//! room, one of them with an HTTP pusher as a UnifiedPush Matrix client sets
//! it. Every homeserver, Herald and listener runs on loopback and is stopped
//! when its guard drops.
//!
//! `harness_*` checks the harness itself against a stand-in gateway: what
//! Synapse POSTs, and what it does with `rejected`. See tests/README.md for
//! the timings.

mod common;
#[path = "support/synapse.rs"]
mod synapse;

use common::listen::{listen_ok, subscribe, Listener};
use common::{metric, request, Herald};
use serde_json::{json, Value};
use std::time::Duration;
use synapse::{NotifyRecorder, Synapse};

const APP_ID: &str = "org.unifiedpush.herald.test";

/// Two users in a private room: (alice, bob, room id).
async fn two_users_in_a_room(hs: &Synapse) -> (synapse::MatrixUser, synapse::MatrixUser, String) {
    let alice = hs.user("alice").await;
    let bob = hs.user("bob").await;
    let room = alice.create_room(&[&bob.user_id]).await;
    bob.join(&room).await;
    (alice, bob, room)
}

/// The device the notification was for (Synapse sends one per request).
fn device(n: &Value) -> &Value {
    let devices = n["notification"]["devices"].as_array().expect("devices");
    assert_eq!(devices.len(), 1, "{n}");
    &devices[0]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn harness_synapse_notifies_a_loopback_gateway_and_drops_rejected_pushers() {
    let hs = Synapse::start().await;
    eprintln!("synapse answered {:?} after it was started", hs.started_in);
    let mut gateway = NotifyRecorder::start().await;
    let (alice, bob, room) = two_users_in_a_room(&hs).await;
    bob.set_pusher(APP_ID, "full-key", &gateway.url(), None)
        .await;
    bob.set_pusher(APP_ID, "id-only-key", &gateway.url(), Some("event_id_only"))
        .await;

    let event = alice.send_text(&room, "hello bob").await;
    let mut full = None;
    let mut id_only = None;
    for _ in 0..2 {
        let n = gateway
            .next(Duration::from_secs(20))
            .await
            .unwrap_or_else(|| panic!("no notify within 20 s; synapse log:\n{}", hs.logs()));
        assert_eq!(
            (n.method.as_str(), n.path.as_str()),
            ("POST", "/_matrix/push/v1/notify")
        );
        assert_eq!(n.content_type.as_deref(), Some("application/json"));
        match device(&n.body)["pushkey"].as_str() {
            Some("full-key") => full = Some(n.body),
            Some("id-only-key") => id_only = Some(n.body),
            other => panic!("notify for {other:?}: {}", n.body),
        }
    }
    let (full, id_only) = (full.unwrap(), id_only.unwrap());

    // The full format: the event, its sender and content.
    let f = &full["notification"];
    assert_eq!(f["event_id"], event.as_str(), "{full}");
    assert_eq!(f["room_id"], room.as_str(), "{full}");
    assert_eq!(f["sender"], alice.user_id.as_str(), "{full}");
    assert_eq!(f["type"], "m.room.message", "{full}");
    assert_eq!(f["content"]["body"], "hello bob", "{full}");
    // A one-to-one room's message rings (`sound`), so Synapse says "high".
    assert_eq!(f["prio"], "high", "{full}");
    assert_eq!(f["counts"]["unread"], 1, "{full}");
    let d = device(&full);
    assert_eq!(d["app_id"], APP_ID);
    assert!(
        d["data"].get("url").is_none(),
        "the gateway URL is not sent: {full}"
    );
    assert!(d["pushkey_ts"].as_u64().is_some(), "{full}");

    // event_id_only: ids and counts, nothing of the message.
    let i = &id_only["notification"];
    assert_eq!(i["event_id"], event.as_str(), "{id_only}");
    assert_eq!(i["room_id"], room.as_str(), "{id_only}");
    assert!(
        i.get("sender").is_none() && i.get("content").is_none(),
        "{id_only}"
    );
    assert_eq!(device(&id_only)["data"]["format"], "event_id_only");

    // `rejected` naming one pushkey: Synapse deletes that pusher only (the
    // other pusher's request names a key it did not send, which it ignores).
    gateway.reject(&["full-key"]);
    alice.send_text(&room, "are you there?").await;
    let mut answered = None;
    for _ in 0..2 {
        let n = gateway.next(Duration::from_secs(20)).await.expect("notify");
        if device(&n.body)["pushkey"] == "full-key" {
            answered = Some(n.answered);
        }
    }
    let answered = answered.expect("a notify for full-key");
    bob.wait_pusher_gone("full-key", Duration::from_secs(10))
        .await;
    eprintln!(
        "synapse dropped the rejected pusher {:?} after the gateway answered",
        answered.elapsed()
    );
    assert_eq!(bob.pushkeys().await, ["id-only-key"]);
}

/// Herald's gateway URL, as a Matrix client hands it to its homeserver.
fn gateway_url(h: &Herald) -> String {
    format!("{}/_matrix/push/v1/notify", h.url())
}

/// The notification a listener line carries: the gateway pushes the JSON
/// the homeserver sent, unencrypted (`identity`), without `devices`.
fn notification_in(line: &Value) -> Value {
    assert_eq!(line["encoding"], "identity", "{line}");
    let text = line["text"]
        .as_str()
        .unwrap_or_else(|| panic!("no text: {line}"));
    let body: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"));
    assert!(body["notification"].get("devices").is_none(), "{body}");
    body["notification"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_in_the_room_reaches_herald_listen_through_the_gateway() {
    let h = Herald::start().await;
    let hs = Synapse::start().await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("listen.json");
    // Subscribed as a UnifiedPush distributor subscribes: no VAPID key.
    let full = subscribe(&state, &h, "full", None).await;
    let id_only = subscribe(&state, &h, "id-only", None).await;
    let listener = Listener::start(&state, &[]);
    listener.wait_stderr("connected", Duration::from_secs(20));

    // What a UnifiedPush Matrix client asks before it hands the URL over.
    let probe = request("GET", &gateway_url(&h), &[], vec![]).await.unwrap();
    assert_eq!(probe.status, 200);
    assert_eq!(probe.json(), json!({"unifiedpush": {"gateway": "matrix"}}));

    let (alice, bob, room) = two_users_in_a_room(&hs).await;
    let full_key = full["endpoint"].as_str().unwrap();
    let id_only_key = id_only["endpoint"].as_str().unwrap();
    bob.set_pusher(APP_ID, full_key, &gateway_url(&h), None)
        .await;
    bob.set_pusher(APP_ID, id_only_key, &gateway_url(&h), Some("event_id_only"))
        .await;

    let event = alice.send_text(&room, "hello bob").await;
    let mut lines = std::collections::HashMap::new();
    for _ in 0..2 {
        let line = listener
            .try_line(Duration::from_secs(20))
            .unwrap_or_else(|| {
                panic!(
                    "nothing reached the listener within 20 s\nlistener:\n{}\nsynapse:\n{}\nherald:\n{}",
                    listener.stderr(),
                    hs.logs(),
                    h.logs()
                )
            });
        lines.insert(line["name"].as_str().unwrap().to_string(), line);
    }

    let line = &lines["full"];
    assert_eq!(line["endpoint"], full_key);
    assert!(line["ttl"].as_u64().unwrap() > 0, "{line}");
    let n = notification_in(line);
    assert_eq!(n["event_id"], event.as_str(), "{n}");
    assert_eq!(n["room_id"], room.as_str(), "{n}");
    assert_eq!(n["sender"], alice.user_id.as_str(), "{n}");
    assert_eq!(n["type"], "m.room.message", "{n}");
    assert_eq!(n["content"]["body"], "hello bob", "{n}");

    let n = notification_in(&lines["id-only"]);
    assert_eq!(n["event_id"], event.as_str(), "{n}");
    assert_eq!(n["room_id"], room.as_str(), "{n}");
    assert!(n.get("sender").is_none(), "{n}");

    // Both delivered, so neither pusher is dropped.
    let mut keys = bob.pushkeys().await;
    keys.sort();
    let mut want = vec![full_key.to_string(), id_only_key.to_string()];
    want.sort();
    assert_eq!(keys, want);
    assert_eq!(
        metric(&h, "herald_matrix_devices_total{outcome=\"pushed\"}").await,
        2.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushkeys_that_are_no_herald_endpoint_are_rejected_and_synapse_drops_their_pushers() {
    let h = Herald::start().await;
    let hs = Synapse::start().await;
    let mut foreign = NotifyRecorder::start().await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("listen.json");
    let kept = subscribe(&state, &h, "kept", None).await;
    let gone = subscribe(&state, &h, "gone", None).await;
    listen_ok(&state, &["unsubscribe", "gone"]).await;
    let listener = Listener::start(&state, &[]);
    listener.wait_stderr("connected", Duration::from_secs(20));

    let kept_key = kept["endpoint"].as_str().unwrap().to_string();
    let gone_key = gone["endpoint"].as_str().unwrap().to_string();
    // Another push service's endpoint (a server that records any request,
    // so that a relay to it would show), and a token Herald never issued.
    let foreign_key = format!(
        "http://127.0.0.1:{}/wpush/v1/someone-elses-token",
        foreign.port
    );
    let forged_key = format!("{}/wpush/v1/{}", h.url(), "A".repeat(120));

    let (alice, bob, room) = two_users_in_a_room(&hs).await;
    for key in [&kept_key, &gone_key, &foreign_key, &forged_key] {
        bob.set_pusher(APP_ID, key, &gateway_url(&h), None).await;
    }
    let event = alice.send_text(&room, "anyone?").await;

    let line = listener.line();
    assert_eq!(line["name"], "kept");
    assert_eq!(notification_in(&line)["event_id"], event.as_str());
    let within = Duration::from_secs(10);
    let mut slowest = Duration::ZERO;
    for key in [&gone_key, &foreign_key, &forged_key] {
        slowest = slowest.max(bob.wait_pusher_gone(key, within).await);
    }
    eprintln!("synapse dropped the rejected pushers within {slowest:?} of the first look");
    assert_eq!(bob.pushkeys().await, vec![kept_key]);
    assert_eq!(
        metric(&h, "herald_matrix_devices_total{outcome=\"rejected\"}").await,
        3.0
    );
    assert!(
        foreign.next(Duration::from_millis(500)).await.is_none(),
        "Herald contacted a foreign pushkey"
    );
    assert!(listener.try_line(Duration::from_millis(500)).is_none());
}
