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

use serde_json::Value;
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
