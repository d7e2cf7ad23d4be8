//! The user-agent side, driven by a real websocket client against a real
//! Herald process.

mod common;

use common::*;
use serde_json::json;
use std::time::Duration;

#[tokio::test]
async fn hello_gives_a_new_uaid_and_keeps_a_known_one() {
    let h = Herald::start().await;
    let ua = Ua::hello(&h, None).await;
    assert_eq!(ua.uaid.len(), 32);
    assert!(ua
        .uaid
        .chars()
        .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
    drop(ua);

    // Known once it has subscribed.
    let mut ua = Ua::hello(&h, None).await;
    ua.subscribe(None).await;
    let first = ua.uaid.clone();
    drop(ua);
    let again = Ua::hello(&h, Some(&first)).await;
    assert_eq!(again.uaid, first, "a known uaid is kept");

    let unknown = "0123456789abcdef0123456789abcdef";
    let other = Ua::hello(&h, Some(unknown)).await;
    assert_ne!(
        other.uaid, unknown,
        "a uaid Herald never issued is replaced"
    );
    let garbage = Ua::hello(&h, Some("not-a-uaid")).await;
    assert_eq!(garbage.uaid.len(), 32);
}

#[tokio::test]
async fn hello_reply_has_exactly_the_firefox_shape() {
    let h = Herald::start().await;
    let mut ua = Ua::connect(&h).await;
    ua.send_text(r#"{"messageType":"hello","broadcasts":{},"use_webpush":true}"#)
        .await;
    let reply = ua.recv().await;
    let uaid = reply["uaid"].as_str().unwrap().to_string();
    assert_eq!(
        reply,
        json!({"messageType":"hello","uaid": uaid,"status":200,"use_webpush":true,"broadcasts":{}})
    );
    // Firefox's follow-up must not break the connection; a Herald that
    // knows no remote-settings version says so, as autopush does.
    ua.send_text(r#"{"messageType":"broadcast_subscribe","broadcasts":{"remote-settings/monitor_changes":"\"0\""}}"#)
        .await;
    assert_eq!(
        ua.recv().await,
        json!({"messageType":"broadcast","broadcasts":{"errors":{"remote-settings/monitor_changes":"Broadcast not found"}}})
    );
    ua.send_text("{}").await;
    assert_eq!(ua.recv().await, json!({}));
}

#[tokio::test]
async fn register_with_and_without_key() {
    let h = Herald::start().await;
    let mut ua = Ua::hello(&h, None).await;
    let app = AppServer::new();

    let ch = uuid::Uuid::new_v4().to_string();
    let r = ua.register(&ch, None).await;
    assert_eq!(r["status"], 200);
    assert_eq!(r["channelID"], ch.as_str());
    let ep = r["pushEndpoint"].as_str().unwrap();
    assert!(ep.starts_with(&format!("{}/wpush/v1/", h.url())), "{ep}");
    assert!(ep.len() < 1000);

    // Firefox pads the key; both forms are accepted.
    let padded =
        base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE, app.public_raw());
    assert!(padded.ends_with('='));
    for key in [padded.clone(), app.public()] {
        let ch = uuid::Uuid::new_v4().to_string();
        let r = ua.register(&ch, Some(&key)).await;
        assert_eq!(r["status"], 200, "{r}");
        assert!(r["pushEndpoint"].as_str().unwrap().contains("/wpush/v2/"));
    }

    // The same channel and key again: the same kind of endpoint.
    let ch = uuid::Uuid::new_v4().to_string();
    let first = ua.register(&ch, Some(&padded)).await;
    let again = ua.register(&ch, Some(&app.public())).await;
    assert_eq!(again["status"], 200);
    assert!(first["pushEndpoint"]
        .as_str()
        .unwrap()
        .contains("/wpush/v2/"));
    assert!(again["pushEndpoint"]
        .as_str()
        .unwrap()
        .contains("/wpush/v2/"));
    // A different key for an existing channel is a conflict.
    let conflict = ua.register(&ch, Some(&AppServer::new().public())).await;
    assert_eq!(conflict["status"], 409);
}

#[tokio::test]
async fn bad_register_gets_an_error_status_and_the_connection_stays() {
    let h = Herald::start().await;
    let mut ua = Ua::hello(&h, None).await;
    let bad_channel = ua.register("not-a-uuid", None).await;
    assert_eq!(bad_channel["status"], 400);
    assert!(bad_channel.get("pushEndpoint").is_none());
    let ch = uuid::Uuid::new_v4().to_string();
    for key in ["short", "!!!notbase64", &b64(&[4u8; 65])] {
        let r = ua.register(&ch, Some(key)).await;
        assert_eq!(r["status"], 400, "key {key}");
    }
    // Still usable.
    let (_, ep) = ua.subscribe(None).await;
    assert!(ep.contains("/wpush/v1/"));
}

#[tokio::test]
async fn channel_limit_is_enforced() {
    let h = Herald::start_with(&[], &[("HERALD_MAX_CHANNELS_PER_UAID", "2")]).await;
    let mut ua = Ua::hello(&h, None).await;
    ua.subscribe(None).await;
    ua.subscribe(None).await;
    let r = ua.register(&uuid::Uuid::new_v4().to_string(), None).await;
    assert_eq!(r["status"], 429);
}

#[tokio::test]
async fn unregister_makes_the_endpoint_gone_and_drops_pending_messages() {
    let h = Herald::start().await;
    let mut ua = Ua::hello(&h, None).await;
    let keys = UaKeys::new();
    let (ch, ep) = ua.subscribe(None).await;
    ua.send(json!({"messageType":"unregister","channelID": ch,"code":200}))
        .await;
    assert_eq!(
        ua.recv().await,
        json!({"messageType":"unregister","channelID": ch,"status":200})
    );
    let r = push(&ep, None, &h.url(), &keys, "late", &[]).await;
    assert_eq!(r.status, 410);
    assert_eq!(r.errno(), 106);

    // Pending messages of an unregistered channel are not delivered later.
    let uaid = ua.uaid.clone();
    let (ch2, ep2) = ua.subscribe(None).await;
    drop(ua);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        push(&ep2, None, &h.url(), &keys, "queued", &[])
            .await
            .status,
        201
    );
    let mut ua = Ua::hello(&h, Some(&uaid)).await;
    let n = ua.notification().await;
    assert_eq!(n["channelID"], ch2.as_str());
    ua.send(json!({"messageType":"unregister","channelID": ch2}))
        .await;
    assert_eq!(ua.recv().await["status"], 200);
    drop(ua);
    let mut ua = Ua::hello(&h, Some(&uaid)).await;
    assert_eq!(ua.try_recv(Duration::from_millis(500)).await, None);

    // A malformed channelID in unregister gets an error status.
    ua.send(json!({"messageType":"unregister","channelID":"nope"}))
        .await;
    assert_eq!(ua.recv().await["status"], 400);
}

#[tokio::test]
async fn pings_are_answered() {
    let h = Herald::start().await;
    let mut ua = Ua::hello(&h, None).await;
    ua.send_text("{}").await;
    assert_eq!(ua.recv().await, json!({}));
    ua.send(json!({"messageType":"ping"})).await;
    assert_eq!(ua.recv().await, json!({}));
}

#[tokio::test]
async fn a_second_connection_for_the_same_uaid_closes_the_first() {
    let h = Herald::start().await;
    let mut first = Ua::hello(&h, None).await;
    let keys = UaKeys::new();
    let (_, ep) = first.subscribe(None).await;
    let mut second = Ua::hello(&h, Some(&first.uaid)).await;
    assert_eq!(second.uaid, first.uaid);
    let (code, reason) = first.closed(Duration::from_secs(5)).await;
    assert_eq!(code, 1000, "{reason}");
    // Messages go to the new connection.
    assert_eq!(
        push(&ep, None, &h.url(), &keys, "hi", &[]).await.status,
        201
    );
    let n = second.notification().await;
    assert_eq!(payload(&keys, &n), "hi");
}

#[tokio::test]
async fn a_client_close_is_answered_with_the_same_code() {
    let h = Herald::start().await;
    for code in [1000, 1001, 4000] {
        let mut ua = Ua::hello(&h, None).await;
        let (answer, _) = ua.close_handshake(code, Duration::from_secs(5)).await;
        assert_eq!(answer, code, "RFC 6455 §5.5.1: the Close is echoed");
    }
    // Also before hello, and with messages waiting to be delivered.
    let mut ua = Ua::connect(&h).await;
    assert_eq!(
        ua.close_handshake(1000, Duration::from_secs(5)).await.0,
        1000
    );
    let keys = UaKeys::new();
    let mut ua = Ua::hello(&h, None).await;
    let (_, ep) = ua.subscribe(None).await;
    let r = push(&ep, None, &h.url(), &keys, "kept", &[]).await;
    assert_eq!(r.status, 201);
    let uaid = ua.uaid.clone();
    assert_eq!(
        ua.close_handshake(1000, Duration::from_secs(5)).await.0,
        1000
    );
    // Unacknowledged, so delivered again on the next connection.
    let mut ua = Ua::hello(&h, Some(&uaid)).await;
    assert_eq!(payload(&keys, &ua.notification().await), "kept");
}

#[tokio::test]
async fn garbage_frames_close_with_a_protocol_error() {
    let h = Herald::start().await;
    for bad in [
        "this is not json",
        r#"{"messageType":"launch"}"#,
        r#"{"messageType":"register"}"#,
    ] {
        let mut ua = Ua::hello(&h, None).await;
        ua.send_text(bad).await;
        let (code, reason) = ua.closed(Duration::from_secs(5)).await;
        assert_eq!(code, 1002, "{bad}: {reason}");
        assert!(!reason.is_empty());
    }
    // Anything before hello.
    let mut ua = Ua::connect(&h).await;
    ua.send(json!({"messageType":"register","channelID": uuid::Uuid::new_v4().to_string()}))
        .await;
    let (code, reason) = ua.closed(Duration::from_secs(5)).await;
    assert_eq!(code, 1002);
    assert!(reason.contains("hello"), "{reason}");
    // Binary frames.
    let mut ua = Ua::hello(&h, None).await;
    futures_util::SinkExt::send(
        &mut ua.ws,
        tokio_tungstenite::tungstenite::Message::binary(vec![1, 2, 3]),
    )
    .await
    .unwrap();
    assert_eq!(ua.closed(Duration::from_secs(5)).await.0, 1003);
}

#[tokio::test]
async fn oversized_frames_and_floods_are_refused() {
    let h = Herald::start_with(
        &[],
        &[
            ("HERALD_MAX_FRAME_SIZE", "2048"),
            ("HERALD_CLIENT_RATE_LIMIT", "5"),
        ],
    )
    .await;
    let mut ua = Ua::hello(&h, None).await;
    let big = format!(r#"{{"messageType":"ping","pad":"{}"}}"#, "x".repeat(4096));
    ua.send_text(&big).await;
    assert_eq!(ua.closed_cleanly(Duration::from_secs(5)).await.0, 1009);

    let mut ua = Ua::hello(&h, None).await;
    for _ in 0..30 {
        if futures_util::SinkExt::send(
            &mut ua.ws,
            tokio_tungstenite::tungstenite::Message::text("{}"),
        )
        .await
        .is_err()
        {
            break;
        }
    }
    let (code, reason) = ua.closed_cleanly(Duration::from_secs(5)).await;
    assert_eq!(code, 1008, "{reason}");
    assert!(reason.contains("rate"), "{reason}");
}

#[tokio::test]
async fn no_hello_within_the_timeout_closes() {
    let h = Herald::start_with(&[], &[("HERALD_HELLO_TIMEOUT", "1s")]).await;
    let mut ua = Ua::connect(&h).await;
    let started = std::time::Instant::now();
    let (code, reason) = ua.closed(Duration::from_secs(5)).await;
    assert_eq!(code, 1008, "{reason}");
    assert!(started.elapsed() >= Duration::from_millis(900));
}

#[tokio::test]
async fn dead_connections_are_closed_by_server_pings() {
    let h = Herald::start_with(
        &[],
        &[
            ("HERALD_PING_INTERVAL", "1s"),
            ("HERALD_PING_TIMEOUT", "1s"),
        ],
    )
    .await;
    // A live client (tungstenite answers pings while it reads) stays up.
    let mut live = Ua::hello(&h, None).await;
    // A dead one: nothing reads its socket, so no pong ever goes back.
    let mut dead = Ua::hello(&h, None).await;
    assert_eq!(live.try_recv(Duration::from_millis(3500)).await, None);
    live.send_text("{}").await;
    assert_eq!(live.recv().await, json!({}));
    // By now the server has given up on the dead one: its stream ends.
    let (code, _) = dead.closed(Duration::from_secs(1)).await;
    assert_eq!(code, 1006, "dropped without a close handshake");
}

#[tokio::test]
async fn restart_keeps_uaid_and_channels() {
    let mut h = Herald::start().await;
    let keys = UaKeys::new();
    let mut ua = Ua::hello(&h, None).await;
    let uaid = ua.uaid.clone();
    let (ch, ep) = ua.subscribe(None).await;
    drop(ua);
    assert!(h.stop().success(), "clean exit on SIGTERM");
    h.restart().await;
    let mut ua = Ua::hello(&h, Some(&uaid)).await;
    assert_eq!(ua.uaid, uaid);
    assert_eq!(
        push(&ep, None, &h.url(), &keys, "after restart", &[])
            .await
            .status,
        201
    );
    let n = ua.notification().await;
    assert_eq!(n["channelID"], ch.as_str());
    assert_eq!(payload(&keys, &n), "after restart");
}

#[tokio::test]
async fn shutdown_closes_websockets_with_going_away() {
    let mut h = Herald::start().await;
    let mut ua = Ua::hello(&h, None).await;
    let pid = h.pid();
    std::process::Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status()
        .unwrap();
    let (code, _) = ua.closed(Duration::from_secs(10)).await;
    assert_eq!(code, 1001);
    assert!(h.wait_exit().success());
}

#[tokio::test]
async fn connections_beyond_the_maximum_are_refused() {
    let h = Herald::start_with(&[], &[("HERALD_MAX_CONNECTIONS", "1")]).await;
    let first = Ua::hello(&h, None).await;
    let mut req =
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(h.ws_url())
            .unwrap();
    req.headers_mut().insert(
        "sec-websocket-protocol",
        "push-notification".parse().unwrap(),
    );
    match tokio_tungstenite::connect_async(req).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 503),
        other => panic!("expected 503, got {:?}", other.map(|(_, r)| r.status())),
    }
    drop(first);
    // The slot frees when the first connection ends.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let mut req =
            tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
                h.ws_url(),
            )
            .unwrap();
        req.headers_mut().insert(
            "sec-websocket-protocol",
            "push-notification".parse().unwrap(),
        );
        if tokio_tungstenite::connect_async(req).await.is_ok() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "slot never freed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Reads notifications and acks each with its own frame, as Firefox does,
/// until `n` distinct versions arrived. Panics if the server closes.
async fn receive_acking_each(ua: &mut Ua, n: usize, within: Duration) -> usize {
    let mut seen = std::collections::HashSet::new();
    let deadline = tokio::time::Instant::now() + within;
    while seen.len() < n {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let Some(m) = ua.try_recv(left).await else {
            panic!("only {} of {n} notifications arrived", seen.len());
        };
        assert_eq!(m["messageType"], "notification", "{m}");
        ua.ack(&m).await;
        seen.insert(m["version"].as_str().unwrap().to_string());
    }
    seen.len()
}

/// Firefox acks every notification with its own frame; a burst of them
/// answers what Herald sent and must never trip the flood limit.
#[tokio::test]
async fn a_user_agent_acking_each_of_a_burst_stays_connected() {
    const N: usize = 1000;
    let h = Herald::start().await;
    let keys = std::sync::Arc::new(UaKeys::new());
    let mut ua = Ua::hello(&h, None).await;
    let (_, ep) = ua.subscribe(None).await;
    let receiver = tokio::spawn(async move {
        let got = receive_acking_each(&mut ua, N, Duration::from_secs(120)).await;
        // Still connected and answering.
        ua.send_text("{}").await;
        assert_eq!(ua.recv().await, json!({}));
        got
    });
    // As fast as the endpoint accepts: 8 senders, retrying a 429.
    let mut senders = vec![];
    for s in 0..8 {
        let (ep, keys, aud) = (ep.clone(), keys.clone(), h.url());
        senders.push(tokio::spawn(async move {
            for i in (s..N).step_by(8) {
                loop {
                    let r = push(&ep, None, &aud, &keys, &format!("m{i}"), &[]).await;
                    match r.status {
                        201 => break,
                        429 => tokio::time::sleep(Duration::from_millis(20)).await,
                        s => panic!("push {i}: {s}"),
                    }
                }
            }
        }));
    }
    for s in senders {
        s.await.unwrap();
    }
    assert_eq!(receiver.await.unwrap(), N);
}

#[tokio::test]
async fn a_backlog_acked_one_by_one_drains_on_one_connection() {
    const N: usize = 500;
    let h = Herald::start().await;
    let keys = UaKeys::new();
    let mut ua = Ua::hello(&h, None).await;
    let (_, ep) = ua.subscribe(None).await;
    let uaid = ua.uaid.clone();
    drop(ua);
    tokio::time::sleep(Duration::from_millis(100)).await;
    for i in 0..N {
        let r = push(&ep, None, &h.url(), &keys, &format!("m{i}"), &[]).await;
        assert_eq!(r.status, 201, "push {i}");
    }
    let mut ua = Ua::hello(&h, Some(&uaid)).await;
    assert_eq!(
        receive_acking_each(&mut ua, N, Duration::from_secs(60)).await,
        N
    );
    // Everything was acknowledged: nothing comes back on a new connection.
    ua.send_text("{}").await;
    assert_eq!(ua.recv().await, json!({}));
    drop(ua);
    let mut ua = Ua::hello(&h, Some(&uaid)).await;
    assert_eq!(ua.try_recv(Duration::from_millis(500)).await, None);
}

#[tokio::test]
async fn a_thousand_unsolicited_registers_a_second_are_cut_off() {
    let h = Herald::start().await;
    let mut ua = Ua::hello(&h, None).await;
    let start = std::time::Instant::now();
    for _ in 0..1000 {
        let ch = uuid::Uuid::new_v4().to_string();
        let frame = json!({"messageType": "register", "channelID": ch}).to_string();
        let sent = futures_util::SinkExt::send(
            &mut ua.ws,
            tokio_tungstenite::tungstenite::Message::text(frame),
        )
        .await;
        if sent.is_err() {
            break;
        }
    }
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "the flood was slow"
    );
    let (code, reason) = ua.closed(Duration::from_secs(10)).await;
    assert_eq!(code, 1008, "{reason}");
    assert!(reason.contains("rate limit"), "{reason}");
}

/// Keys Herald keeps per user agent (everything but node heartbeats, the
/// broadcast hash and readiness probes).
fn user_agent_keys(redis: &common::redis::RedisServer) -> Vec<String> {
    let mut conn = redis.client();
    let keys: Vec<String> = ::redis::cmd("KEYS")
        .arg("herald:*")
        .query(&mut conn)
        .unwrap();
    keys.into_iter()
        .filter(|k| {
            !k.starts_with("herald:node:")
                && !k.starts_with("herald:health:")
                && k != "herald:broadcasts"
        })
        .collect()
}

async fn anonymous_hellos(h: &Herald, n: usize) -> Vec<String> {
    let mut uaids = Vec::new();
    for i in 0..n {
        let mut ua = Ua::hello(h, None).await;
        if i % 2 == 0 {
            // What Firefox sends next; followed in memory only.
            ua.send(json!({"messageType": "broadcast_subscribe", "broadcasts": {"remote-settings/monitor_changes": "\"0\""}}))
                .await;
        }
        uaids.push(ua.uaid.clone());
    }
    uaids
}

#[tokio::test]
async fn anonymous_hellos_leave_no_user_records_in_rocksdb() {
    let mut h = Herald::start().await;
    anonymous_hellos(&h, 40).await;
    let mut ua = Ua::hello(&h, None).await;
    ua.subscribe(None).await;
    let registered = ua.uaid.clone();
    drop(ua);
    tokio::time::sleep(Duration::from_millis(200)).await;
    h.stop();
    let store = herald::store::RocksStore::open(&h.data_dir.join("db"), false, None).unwrap();
    let users = herald::store::Store::stale_users(&store, u64::MAX, usize::MAX)
        .await
        .unwrap();
    assert_eq!(
        users.iter().map(|u| u.to_string()).collect::<Vec<_>>(),
        vec![registered],
        "only the user agent that subscribed is stored"
    );
}

#[tokio::test]
async fn anonymous_hellos_leave_no_keys_in_redis() {
    let redis = tokio::task::spawn_blocking(common::redis::RedisServer::start)
        .await
        .unwrap();
    let key = b64(&rand::random::<[u8; 32]>());
    let h = Herald::start_with(
        &[],
        &[
            ("HERALD_STORE", "redis"),
            ("HERALD_REDIS_URL", redis.url()),
            ("HERALD_ENDPOINT_KEYS", &key),
        ],
    )
    .await;
    let uaids = anonymous_hellos(&h, 40).await;
    // Connections own their uaid while open (cluster.md); gone once closed.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !user_agent_keys(&redis).is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{:?}",
            user_agent_keys(&redis)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Back with an unregistered uaid: a fresh one, and still nothing stored.
    let back = Ua::hello(&h, Some(&uaids[0])).await;
    assert_ne!(back.uaid, uaids[0]);
    drop(back);

    // The first register stores the user agent; it is then known.
    let mut ua = Ua::hello(&h, None).await;
    let (_, ep) = ua.subscribe(None).await;
    let uaid = ua.uaid.clone();
    drop(ua);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let keys = user_agent_keys(&redis);
    assert!(
        !keys.is_empty() && keys.iter().all(|k| k.contains(&uaid)),
        "{keys:?}"
    );
    let keys = UaKeys::new();
    let r = push(&ep, None, &h.url(), &keys, "kept", &[]).await;
    assert_eq!(r.status, 201);
    let mut ua = Ua::hello(&h, Some(&uaid)).await;
    assert_eq!(ua.uaid, uaid);
    assert_eq!(payload(&keys, &ua.notification().await), "kept");
}

#[tokio::test]
async fn one_ack_frame_settles_each_version_once_and_is_bounded() {
    let h = Herald::start().await;
    let keys = UaKeys::new();
    let mut ua = Ua::hello(&h, None).await;
    let (ch, ep) = ua.subscribe(None).await;
    let acked = || metric(&h, "herald_messages_acked_total ");

    // 60 copies of one version (within the window of 64): settled once.
    assert_eq!(push(&ep, None, &h.url(), &keys, "a", &[]).await.status, 201);
    let n = ua.notification().await;
    let update = json!({"channelID": ch, "version": n["version"], "code": 100});
    ua.send(json!({"messageType": "ack", "updates": vec![update.clone(); 60]}))
        .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while acked().await < 1.0 {
        assert!(tokio::time::Instant::now() < deadline, "never acked");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(acked().await, 1.0);
    // The connection is still up and serves the next message.
    assert_eq!(push(&ep, None, &h.url(), &keys, "b", &[]).await.status, 201);
    let n = ua.notification().await;
    assert_eq!(payload(&keys, &n), "b");

    // 100 copies: more than the window, refused before any is applied.
    let update = json!({"channelID": ch, "version": n["version"], "code": 100});
    ua.send(json!({"messageType": "ack", "updates": vec![update; 100]}))
        .await;
    let (code, reason) = ua.closed(Duration::from_secs(5)).await;
    assert_eq!(code, 1008, "{reason}");
    assert!(reason.contains("at most 64"), "{reason}");
    assert_eq!(acked().await, 1.0, "nothing applied");
    // The message is still stored and comes again.
    let mut ua = Ua::hello(&h, Some(&ua.uaid)).await;
    assert_eq!(payload(&keys, &ua.notification().await), "b");
}

/// `require_vapid_key`: a register without `key` is answered 401 and
/// stores nothing; the connection stays, and the same channel with a key
/// subscribes.
#[tokio::test]
async fn require_vapid_key_refuses_a_register_without_key() {
    let h = Herald::start_with(&[], &[("HERALD_REQUIRE_VAPID_KEY", "true")]).await;
    let refused = "herald_policy_refusals_total{reason=\"vapid_required\"} ";
    let mut ua = Ua::hello(&h, None).await;
    let ch = uuid::Uuid::new_v4().to_string();
    let r = ua.register(&ch, None).await;
    assert_eq!(
        r,
        json!({"messageType": "register", "channelID": ch, "status": 401})
    );
    assert_eq!(metric(&h, refused).await, 1.0);
    // Nothing stored: a uaid that never registered is not kept.
    let uaid = ua.uaid.clone();
    drop(ua);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut ua = Ua::hello(&h, Some(&uaid)).await;
    assert_ne!(ua.uaid, uaid, "the refused register stored the user agent");

    let app = AppServer::new();
    let r = ua.register(&ch, Some(&app.public())).await;
    assert_eq!(r["status"], 200, "{r}");
    let ep = r["pushEndpoint"].as_str().unwrap().to_string();
    assert!(ep.contains("/wpush/v2/"), "{ep}");
    let keys = UaKeys::new();
    let sent = push(&ep, Some(&app), &h.url(), &keys, "bound", &[]).await;
    assert_eq!(sent.status, 201);
    assert_eq!(payload(&keys, &ua.notification().await), "bound");
    assert_eq!(metric(&h, refused).await, 1.0);
}

/// Private mode: a hello without the token, or with a wrong one, is
/// answered with status 401 and no uaid, then closed with 4774 (do not
/// reconnect); the right token connects as usual.
#[tokio::test]
async fn private_mode_needs_a_token_in_hello() {
    const TOKEN: &str = "private-mode-token-0123456789";
    let h = Herald::start_with(&[], &[("HERALD_USER_AGENT_TOKENS", TOKEN)]).await;
    let refused = "herald_policy_refusals_total{reason=\"user_agent_token\"} ";
    let firefox = json!({"messageType": "hello", "use_webpush": true, "broadcasts": {}});
    let mut wrong = firefox.clone();
    wrong["token"] = json!(format!("{TOKEN}-not"));
    for (n, hello) in [firefox.clone(), wrong].into_iter().enumerate() {
        let mut ua = Ua::connect(&h).await;
        ua.send(hello.clone()).await;
        assert_eq!(
            ua.recv().await,
            json!({"messageType": "hello", "uaid": "", "status": 401, "use_webpush": true, "broadcasts": {}}),
            "{hello}"
        );
        let (code, reason) = ua.closed_cleanly(Duration::from_secs(5)).await;
        assert_eq!(code, 4774, "{reason}");
        assert!(reason.contains("token"), "{reason}");
        assert_eq!(metric(&h, refused).await, (n + 1) as f64);
    }

    let mut right = firefox;
    right["token"] = json!(TOKEN);
    let mut ua = Ua::connect(&h).await;
    ua.send(right).await;
    let reply = ua.recv().await;
    assert_eq!(reply["status"], 200, "{reply}");
    ua.uaid = reply["uaid"].as_str().unwrap().to_string();
    let keys = UaKeys::new();
    let (_, ep) = ua.subscribe(None).await;
    assert_eq!(
        push(&ep, None, &h.url(), &keys, "hi", &[]).await.status,
        201
    );
    assert_eq!(payload(&keys, &ua.notification().await), "hi");
    assert_eq!(metric(&h, refused).await, 2.0);
}
