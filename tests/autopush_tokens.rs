//! Endpoints autopush-rs handed out keep working on Herald (issue 23 §1).
//! A real websocket user agent registers with Herald; the endpoint tokens
//! autopush-rs would have given it are minted by Python's `cryptography`
//! Fernet (tests/common/fernet.rs), and a Herald with
//! `autopush_crypto_keys` must deliver pushes to them exactly as to its own.

mod common;

use common::fernet::{autopush_token, fernet_key};
use common::*;
use serde_json::json;
use std::time::Duration;

/// A Herald opening autopush-rs tokens sealed with `keys` (the setting's
/// value as written).
async fn herald_with(keys: &str) -> Herald {
    Herald::start_with(&[], &[("HERALD_AUTOPUSH_CRYPTO_KEYS", keys)]).await
}

fn v1_url(h: &Herald, token: &str) -> String {
    format!("{}/wpush/v1/{token}", h.url())
}

fn v2_url(h: &Herald, token: &str) -> String {
    format!("{}/wpush/v2/{token}", h.url())
}

fn legacy_url(h: &Herald, token: &str) -> String {
    format!("{}/wpush/{token}", h.url())
}

fn token_of(endpoint: &str) -> &str {
    endpoint.rsplit('/').next().unwrap()
}

/// Sends `text` and expects it delivered to `ua`, decrypted by its keys.
async fn delivers(ua: &mut Ua, keys: &UaKeys, endpoint: &str, app: Option<&AppServer>, aud: &str) {
    let text = format!("to {}", &token_of(endpoint)[..12]);
    let r = push(endpoint, app, aud, keys, &text, &[]).await;
    assert_eq!(
        r.status,
        201,
        "{endpoint}: {}",
        String::from_utf8_lossy(&r.body)
    );
    let n = ua.notification().await;
    assert_eq!(payload(keys, &n), text);
    ua.ack(&n).await;
}

fn status_and_errno(r: Resp) -> (u16, u64) {
    let errno = r.errno();
    (r.status, errno)
}

#[tokio::test]
async fn autopush_v1_and_legacy_endpoints_deliver_beside_heralds_own() {
    let key = fernet_key();
    let h = herald_with(&format!("[{key}]")).await;
    let keys = UaKeys::new();
    let mut ua = Ua::hello(&h, None).await;
    let (chid, own) = ua.subscribe(None).await;
    // New subscriptions keep getting Herald's own endpoints.
    assert!(own.starts_with(&format!("{}/wpush/v1/", h.url())), "{own}");
    assert_eq!(token_of(&own).len(), 80, "{own}");

    let token = autopush_token(&key, &ua.uaid, &chid, None);
    assert_eq!(token.len(), 140, "{token}");
    delivers(&mut ua, &keys, &v1_url(&h, &token), None, &h.url()).await;
    delivers(&mut ua, &keys, &legacy_url(&h, &token), None, &h.url()).await;
    delivers(&mut ua, &keys, &own, None, &h.url()).await;

    // UnifiedPush discovery answers on both forms too.
    for url in [v1_url(&h, &token), legacy_url(&h, &token)] {
        let r = request("GET", &url, &[], vec![]).await.unwrap();
        assert_eq!(r.status, 200, "{url}");
        assert_eq!(r.json()["unifiedpush"]["version"], 1);
    }
    // A v1 token is no v2 endpoint.
    let r = push(&v2_url(&h, &token), None, &h.url(), &keys, "x", &[]).await;
    assert_eq!(status_and_errno(r), (404, 102));
    assert!(ua.try_recv(Duration::from_millis(300)).await.is_none());
}

#[tokio::test]
async fn autopush_v2_endpoints_bind_the_key_as_heralds_own_do() {
    let key = fernet_key();
    let h = herald_with(&key).await;
    let keys = UaKeys::new();
    let app = AppServer::new();
    let stranger = AppServer::new();
    let mut ua = Ua::hello(&h, None).await;
    let (chid, own) = ua.subscribe(Some(&app.public())).await;
    assert!(own.starts_with(&format!("{}/wpush/v2/", h.url())), "{own}");

    // The hash in the token is Python's SHA-256 of the raw key: it must
    // equal what Herald stored for the subscription.
    let token = autopush_token(&key, &ua.uaid, &chid, Some(&app.public()));
    assert_eq!(token.len(), 183, "{token}");
    let ep = v2_url(&h, &token);
    delivers(&mut ua, &keys, &ep, Some(&app), &h.url()).await;
    // With the `=` autopush-rs stripped put back.
    delivers(&mut ua, &keys, &format!("{ep}="), Some(&app), &h.url()).await;

    // Another key, or none: refused exactly as on Herald's own endpoint.
    for sender in [Some(&stranger), None] {
        let theirs = push(&ep, sender, &h.url(), &keys, "x", &[]).await;
        let ours = push(&own, sender, &h.url(), &keys, "x", &[]).await;
        let (theirs, ours) = (status_and_errno(theirs), status_and_errno(ours));
        assert_eq!(theirs, ours);
        let expected = if sender.is_some() {
            (403, 115)
        } else {
            (401, 109)
        };
        assert_eq!(theirs, expected);
    }
    // A v2 token is no v1 endpoint (that would drop the key binding).
    let r = push(&v1_url(&h, &token), None, &h.url(), &keys, "x", &[]).await;
    assert_eq!(status_and_errno(r), (404, 102));
    assert!(ua.try_recv(Duration::from_millis(300)).await.is_none());
}

#[tokio::test]
async fn every_configured_key_opens_and_other_tokens_are_forgeries() {
    let (a, b, c) = (fernet_key(), fernet_key(), fernet_key());
    // autopush-rs's own syntax, quotes and spaces included.
    let h = herald_with(&format!("[\"{b}\", \"{a}\"]")).await;
    let keys = UaKeys::new();
    let mut ua = Ua::hello(&h, None).await;
    let (chid, own) = ua.subscribe(None).await;
    for k in [&a, &b] {
        let token = autopush_token(k, &ua.uaid, &chid, None);
        delivers(&mut ua, &keys, &v1_url(&h, &token), None, &h.url()).await;
    }

    // What a forged Herald token gets is what every forgery gets.
    let mut forged_own = own.clone().into_bytes();
    let at = forged_own.len() - 10;
    forged_own[at] = if forged_own[at] == b'A' { b'B' } else { b'A' };
    let forged_own = String::from_utf8(forged_own).unwrap();
    let r = push(&forged_own, None, &h.url(), &keys, "x", &[]).await;
    let forged = status_and_errno(r);
    assert_eq!(forged, (404, 102));

    let unknown_key = autopush_token(&c, &ua.uaid, &chid, None);
    let mut altered = autopush_token(&a, &ua.uaid, &chid, None).into_bytes();
    altered[100] = if altered[100] == b'A' { b'B' } else { b'A' };
    let altered = String::from_utf8(altered).unwrap();
    let garbage_v1 = format!(
        "gAAAAAB{}",
        b64(&(0..100).map(|_| rand::random::<u8>()).collect::<Vec<u8>>())
    )[..140]
        .to_string();
    let garbage_v2 = format!("gAAAAAB{}", b64(&[7u8; 140]))[..183].to_string();
    let cases = [
        v1_url(&h, &unknown_key),
        legacy_url(&h, &unknown_key),
        v1_url(&h, &altered),
        v1_url(&h, &garbage_v1),
        legacy_url(&h, &garbage_v1),
        v2_url(&h, &garbage_v2),
        legacy_url(&h, "gAAAAAB"),
        legacy_url(&h, token_of(&own)),
    ];
    for url in cases {
        let r = push(&url, None, &h.url(), &keys, "x", &[]).await;
        assert_eq!(status_and_errno(r), forged, "{url}");
    }
    assert!(ua.try_recv(Duration::from_millis(300)).await.is_none());

    // A well-keyed token for a channel Herald does not know is gone, as
    // Herald's own would be after an unregister.
    let stray = autopush_token(&a, &ua.uaid, &uuid::Uuid::new_v4().to_string(), None);
    let r = push(&v1_url(&h, &stray), None, &h.url(), &keys, "x", &[]).await;
    assert_eq!(status_and_errno(r), (410, 106));
}

#[tokio::test]
async fn without_autopush_keys_autopush_endpoints_do_not_exist() {
    let h = Herald::start().await;
    let keys = UaKeys::new();
    let mut ua = Ua::hello(&h, None).await;
    let (chid, _) = ua.subscribe(None).await;
    let token = autopush_token(&fernet_key(), &ua.uaid, &chid, None);
    let r = push(&v1_url(&h, &token), None, &h.url(), &keys, "x", &[]).await;
    assert_eq!(status_and_errno(r), (404, 102));
    let r = push(&legacy_url(&h, &token), None, &h.url(), &keys, "x", &[]).await;
    assert_eq!(status_and_errno(r), (404, 119));
}

#[tokio::test]
async fn ttl_topic_urgency_receipts_and_cancel_work_on_an_autopush_endpoint() {
    let key = fernet_key();
    let h = herald_with(&key).await;
    let keys = UaKeys::new();
    let app = AppServer::new();
    let mut ua = Ua::hello(&h, None).await;
    let (chid, _) = ua.subscribe(Some(&app.public())).await;
    let uaid = ua.uaid.clone();
    let ep = v2_url(&h, &autopush_token(&key, &uaid, &chid, Some(&app.public())));
    let send = |text: &'static str, extra: &'static [(&'static str, &'static str)]| {
        let (ep, app, aud, keys) = (&ep, &app, h.url(), &keys);
        async move { push(ep, Some(app), &aud, keys, text, extra).await }
    };

    // Urgency: a user agent asking for high only gets the low one later.
    ua.send(json!({"messageType": "urgency", "min": "high"}))
        .await;
    assert_eq!(ua.recv().await["status"], 200);
    assert_eq!(send("low", &[("urgency", "low")]).await.status, 201);
    assert_eq!(send("high", &[("urgency", "high")]).await.status, 201);
    let n = ua.notification().await;
    assert_eq!(payload(&keys, &n), "high");
    ua.ack(&n).await;
    assert!(ua.try_recv(Duration::from_millis(300)).await.is_none());
    drop(ua);
    tokio::time::sleep(Duration::from_millis(100)).await;

    // TTL: lowered to max_ttl, and said so.
    let r = send("capped", &[("ttl", "999999999")]).await;
    assert_eq!(r.status, 201);
    assert_eq!(r.header("ttl").as_deref(), Some("2592000"));
    // Cancel through the Location Herald answered with.
    let location = r.header("location").unwrap();
    assert!(
        location.starts_with(&format!("{}/m/", h.url())),
        "{location}"
    );
    assert_eq!(
        request("DELETE", &location, &[], vec![])
            .await
            .unwrap()
            .status,
        204
    );
    let again = request("DELETE", &location, &[], vec![]).await.unwrap();
    assert_eq!(status_and_errno(again), (404, 117));
    // Topic: the second replaces the first.
    assert_eq!(send("first", &[("topic", "score")]).await.status, 201);
    assert_eq!(send("second", &[("topic", "score")]).await.status, 201);
    // A receipt, asked for with Prefer: respond-async.
    let r = send("receipted", &[("prefer", "respond-async")]).await;
    assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
    let link = r.header("link").expect("a receipt subscription");
    let receipts_url = link[link.find('<').unwrap() + 1..link.find('>').unwrap()].to_string();

    let mut ua = Ua::hello(&h, Some(&uaid)).await;
    assert_eq!(ua.uaid, uaid);
    let mut got = Vec::new();
    for _ in 0..3 {
        let n = ua.notification().await;
        got.push(payload(&keys, &n));
        ua.ack(&n).await;
    }
    got.sort();
    assert_eq!(got, ["low", "receipted", "second"]);
    assert!(ua.try_recv(Duration::from_millis(300)).await.is_none());

    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let r = request("GET", &receipts_url, &[("prefer", "wait=0")], vec![])
            .await
            .unwrap();
        let outcomes = r.json()["receipts"].clone();
        if outcomes.as_array().is_some_and(|a| !a.is_empty()) {
            assert_eq!(outcomes[0]["outcome"], "delivered", "{outcomes}");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no receipt");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_malformed_autopush_key_stops_herald_naming_the_setting() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let good = fernet_key();
    let std_alphabet = "+/ECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
    for (value, says) in [
        (format!("[{good},short]"), "key 2 is not a Fernet key"),
        (
            format!("[{good},{std_alphabet}]"),
            "key 2 is not a Fernet key",
        ),
        (format!("[{good}"), "[key1,key2]"),
        ("[]".to_string(), "no keys"),
    ] {
        let (code, err) = serve_refused(
            &[
                "--listen",
                "127.0.0.1:0",
                "--data-dir",
                data.to_str().unwrap(),
            ],
            &[("HERALD_AUTOPUSH_CRYPTO_KEYS", &value)],
        );
        assert_eq!(code, Some(2), "{err}");
        assert!(err.contains("setting `autopush_crypto_keys`"), "{err}");
        assert!(err.contains(says), "{value}: {err}");
    }
}
