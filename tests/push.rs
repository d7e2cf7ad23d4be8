//! The application-server side and the queue, end to end: real VAPID
//! signatures, real RFC 8291 encryption from the `ece` library, a real
//! websocket user agent that decrypts what it receives.

mod common;

use common::*;
use serde_json::json;
use std::time::Duration;

#[tokio::test]
async fn a_push_is_accepted_delivered_decrypted_and_acked() {
    let h = Herald::start().await;
    let app = AppServer::new();
    let keys = UaKeys::new();
    let mut ua = Ua::hello(&h, None).await;
    let uaid = ua.uaid.clone();
    let (ch, ep) = ua.subscribe(Some(&app.public())).await;

    let r = push(&ep, Some(&app), &h.url(), &keys, "hello, world", &[]).await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.header("ttl").as_deref(), Some("60"));
    let location = r.header("location").unwrap();
    assert!(
        location.starts_with(&format!("{}/m/", h.url())),
        "{location}"
    );

    let n = ua.notification().await;
    assert_eq!(n["channelID"], ch.as_str());
    assert_eq!(n["ttl"], 60);
    assert_eq!(payload(&keys, &n), "hello, world");
    ua.ack(&n).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(ua);

    // Acknowledged: not redelivered, and the message resource is gone.
    let mut ua = Ua::hello(&h, Some(&uaid)).await;
    assert_eq!(ua.uaid, uaid);
    assert_eq!(ua.try_recv(Duration::from_millis(300)).await, None);
    assert_eq!(
        request("DELETE", &location, &[], vec![])
            .await
            .unwrap()
            .status,
        404
    );
}

#[tokio::test]
async fn unacknowledged_messages_are_redelivered_oldest_first() {
    let h = Herald::start().await;
    let keys = UaKeys::new();
    let mut ua = Ua::hello(&h, None).await;
    let uaid = ua.uaid.clone();
    let (_, ep) = ua.subscribe(None).await;
    for text in ["one", "two", "three"] {
        assert_eq!(
            push(&ep, None, &h.url(), &keys, text, &[]).await.status,
            201
        );
    }
    let mut got = vec![];
    for _ in 0..3 {
        got.push(payload(&keys, &ua.notification().await));
    }
    assert_eq!(got, ["one", "two", "three"]);
    drop(ua); // no acks

    let mut ua = Ua::hello(&h, Some(&uaid)).await;
    let first = ua.notification().await;
    assert_eq!(payload(&keys, &first), "one");
    ua.ack(&first).await;
    assert_eq!(payload(&keys, &ua.notification().await), "two");
    assert_eq!(payload(&keys, &ua.notification().await), "three");
    drop(ua);

    let mut ua = Ua::hello(&h, Some(&uaid)).await;
    assert_eq!(
        payload(&keys, &ua.notification().await),
        "two",
        "acked one is gone"
    );
}

#[tokio::test]
async fn nacked_messages_are_not_retried() {
    let h = Herald::start().await;
    let keys = UaKeys::new();
    let mut ua = Ua::hello(&h, None).await;
    let uaid = ua.uaid.clone();
    let (_, ep) = ua.subscribe(None).await;
    push(&ep, None, &h.url(), &keys, "bad", &[]).await;
    let n = ua.notification().await;
    ua.send(json!({"messageType":"nack","version": n["version"],"code":302}))
        .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(metric(&h, "herald_messages_nacked_total").await, 1.0);
    drop(ua);
    let mut ua = Ua::hello(&h, Some(&uaid)).await;
    assert_eq!(ua.try_recv(Duration::from_millis(300)).await, None);
}

#[tokio::test]
async fn header_rules_give_400_with_errnos() {
    let h = Herald::start().await;
    let keys = UaKeys::new();
    let mut ua = Ua::hello(&h, None).await;
    let (_, ep) = ua.subscribe(None).await;
    let body = encrypt(&keys, b"x");
    let post = |headers: Vec<(&'static str, String)>, body: Vec<u8>| {
        let ep = ep.clone();
        async move {
            let hs: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            request("POST", &ep, &hs, body).await.unwrap()
        }
    };
    let enc = ("content-encoding", "aes128gcm".to_string());
    let ttl = ("ttl", "60".to_string());

    let r = post(vec![enc.clone()], body.clone()).await;
    assert_eq!((r.status, r.errno()), (400, 111), "missing TTL");
    let j = r.json();
    assert_eq!(j["code"], 400);
    assert_eq!(j["error"], "Bad Request");
    assert!(j["message"].as_str().unwrap().contains("TTL"));
    for bad in ["-1", "soon", "1.5"] {
        let r = post(vec![enc.clone(), ("ttl", bad.into())], body.clone()).await;
        assert_eq!((r.status, r.errno()), (400, 112), "TTL {bad}");
    }
    let r = post(
        vec![enc.clone(), ttl.clone(), ("urgency", "asap".into())],
        body.clone(),
    )
    .await;
    assert_eq!((r.status, r.errno()), (400, 114));
    for bad in ["has space", &"a".repeat(33), "plus+slash/"] {
        let r = post(
            vec![enc.clone(), ttl.clone(), ("topic", bad.to_string())],
            body.clone(),
        )
        .await;
        assert_eq!((r.status, r.errno()), (400, 113), "topic {bad}");
    }
    let r = post(vec![ttl.clone()], body.clone()).await;
    assert_eq!(
        (r.status, r.errno()),
        (400, 101),
        "payload without Content-Encoding"
    );
    let mut broken = body.clone();
    broken[16..20].copy_from_slice(&10u32.to_be_bytes()); // rs < 18
    let r = post(vec![enc.clone(), ttl.clone()], broken).await;
    assert_eq!((r.status, r.errno()), (400, 110));
    let r = post(vec![enc.clone(), ttl.clone()], vec![1, 2, 3]).await;
    assert_eq!((r.status, r.errno()), (400, 110));
    let r = post(
        vec![("content-encoding", "aesgcm".into()), ttl.clone()],
        body.clone(),
    )
    .await;
    assert_eq!(
        (r.status, r.errno()),
        (400, 101),
        "aesgcm without Encryption/Crypto-Key"
    );

    let r = post(vec![enc.clone(), ttl.clone()], vec![0u8; 4097]).await;
    assert_eq!((r.status, r.errno()), (413, 104));
    // The same account of the limit `herald send` warns with: what is
    // counted, and what is left for plaintext.
    let message = r.json()["message"].as_str().unwrap_or_default().to_string();
    assert!(
        message.contains("encrypted body of at most 4096 bytes")
            && message.contains("framing takes 103")
            && message.contains("3993 bytes of plaintext"),
        "{message}"
    );
    let ok = post(vec![enc.clone(), ttl.clone()], body.clone()).await;
    assert_eq!(ok.status, 201);
}

#[tokio::test]
async fn ttl_above_the_maximum_is_lowered() {
    let h = Herald::start_with(&[], &[("HERALD_MAX_TTL", "1h")]).await;
    let keys = UaKeys::new();
    let mut ua = Ua::hello(&h, None).await;
    let (_, ep) = ua.subscribe(None).await;
    let r = push(&ep, None, &h.url(), &keys, "x", &[("ttl", "999999")]).await;
    assert_eq!(r.status, 201);
    assert_eq!(r.header("ttl").as_deref(), Some("3600"));
    assert_eq!(ua.notification().await["ttl"], 3600);
}

#[tokio::test]
async fn forged_tokens_are_404_and_unknown_paths_too() {
    let h = Herald::start().await;
    let keys = UaKeys::new();
    let mut ua = Ua::hello(&h, None).await;
    let (_, ep) = ua.subscribe(None).await;
    let mut forged = ep.clone();
    let last = forged.pop().unwrap();
    forged.push(if last == 'A' { 'B' } else { 'A' });
    let r = push(&forged, None, &h.url(), &keys, "x", &[]).await;
    assert_eq!((r.status, r.errno()), (404, 102));
    let v2 = ep.replace("/wpush/v1/", "/wpush/v2/");
    assert_eq!(push(&v2, None, &h.url(), &keys, "x", &[]).await.status, 404);
    let r = push(
        &format!("{}/wpush/v1/{}", h.url(), "A".repeat(80)),
        None,
        &h.url(),
        &keys,
        "x",
        &[],
    )
    .await;
    assert_eq!(r.status, 404);
    assert_eq!(
        http(&h, "GET", "/nope", &[], vec![]).await.unwrap().status,
        404
    );
    let r = request("PUT", &ep, &[], vec![]).await.unwrap();
    assert_eq!((r.status, r.errno()), (405, 118));
}

#[tokio::test]
async fn get_on_an_endpoint_is_unifiedpush_discovery() {
    let h = Herald::start().await;
    let mut ua = Ua::hello(&h, None).await;
    let (_, ep) = ua.subscribe(None).await;
    let r = request("GET", &ep, &[], vec![]).await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.json(), json!({"unifiedpush":{"version":1}}));
}

#[tokio::test]
async fn vapid_rules() {
    let h = Herald::start().await;
    let keys = UaKeys::new();
    let app = AppServer::new();
    let mut ua = Ua::hello(&h, None).await;
    let (_, bound) = ua.subscribe(Some(&app.public())).await;
    let (_, open) = ua.subscribe(None).await;
    let aud = h.url();

    let r = push(&bound, None, &aud, &keys, "x", &[]).await;
    assert_eq!((r.status, r.errno()), (401, 109), "key-bound needs VAPID");
    let r = push(&bound, Some(&AppServer::new()), &aud, &keys, "x", &[]).await;
    assert_eq!((r.status, r.errno()), (403, 115), "someone else's key");
    assert_eq!(
        push(&bound, Some(&app), &aud, &keys, "x", &[]).await.status,
        201
    );

    let send_with = |auth: String, extra: Vec<(&'static str, String)>| {
        let bound = bound.clone();
        let keys_body = encrypt(&keys, b"x");
        async move {
            let mut hs: Vec<(&str, String)> = vec![
                ("content-encoding", "aes128gcm".into()),
                ("ttl", "60".into()),
                ("authorization", auth),
            ];
            hs.extend(extra);
            let hs: Vec<(&str, &str)> = hs.iter().map(|(k, v)| (*k, v.as_str())).collect();
            request("POST", &bound, &hs, keys_body).await.unwrap()
        }
    };
    let with_claims =
        |claims: serde_json::Value| format!("vapid t={}, k={}", app.jwt(claims), app.public());
    for claims in [
        json!({"aud": "https://elsewhere.example", "exp": now() + 600}),
        json!({"aud": aud, "exp": now() - 5}),
        json!({"aud": aud, "exp": now() + 25 * 3600}),
        json!({"aud": aud}),
        json!({"aud": aud, "exp": now() + 600, "sub": "not-a-uri"}),
    ] {
        let r = send_with(with_claims(claims.clone()), vec![]).await;
        assert_eq!((r.status, r.errno()), (401, 109), "{claims}");
    }
    // HMAC-signed tokens are refused.
    let hs = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &json!({"aud": aud, "exp": now() + 600}),
        &jsonwebtoken::EncodingKey::from_secret(b"k"),
    )
    .unwrap();
    let r = send_with(format!("vapid t={hs}, k={}", app.public()), vec![]).await;
    assert_eq!(r.status, 401);
    // The legacy form: Authorization: WebPush <JWT> + Crypto-Key: p256ecdsa=<key>.
    let jwt =
        app.jwt(json!({"aud": aud, "exp": now() + 600, "sub": "https://example.com/contact"}));
    let r = send_with(
        format!("WebPush {jwt}"),
        vec![("crypto-key", format!("p256ecdsa={}", app.public()))],
    )
    .await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    // The other draft form, Authorization: Bearer <JWT>, with the same checks.
    let r = send_with(
        format!("Bearer {jwt}"),
        vec![("crypto-key", format!("p256ecdsa={}", app.public()))],
    )
    .await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let other = AppServer::new();
    let r = send_with(
        format!(
            "bearer {}",
            other.jwt(json!({"aud": aud, "exp": now() + 600}))
        ),
        vec![("crypto-key", format!("p256ecdsa={}", other.public()))],
    )
    .await;
    assert_eq!(
        (r.status, r.errno()),
        (403, 115),
        "Bearer keeps the key binding"
    );
    for claims in [
        json!({"aud": "https://elsewhere.example", "exp": now() + 600}),
        json!({"aud": aud, "exp": now() - 5}),
    ] {
        let r = send_with(
            format!("Bearer {}", app.jwt(claims.clone())),
            vec![("crypto-key", format!("p256ecdsa={}", app.public()))],
        )
        .await;
        assert_eq!((r.status, r.errno()), (401, 109), "Bearer {claims}");
    }
    let r = send_with(format!("Bearer {jwt}"), vec![]).await;
    assert_eq!((r.status, r.errno()), (401, 109), "Bearer needs Crypto-Key");

    // A subscription without a key takes any valid VAPID, or none, but not an invalid one.
    assert_eq!(
        push(&open, Some(&AppServer::new()), &aud, &keys, "x", &[])
            .await
            .status,
        201
    );
    assert_eq!(push(&open, None, &aud, &keys, "x", &[]).await.status, 201);
    let other = AppServer::new();
    let bad = format!(
        "vapid t={}, k={}",
        other.jwt(json!({"aud": "https://nope", "exp": now() + 60})),
        other.public()
    );
    let r = push(&open, None, &aud, &keys, "x", &[("authorization", &bad)]).await;
    assert_eq!(r.status, 401);
    assert!(metric(&h, "herald_vapid_failures_total{reason=\"bad_aud\"}").await >= 1.0);
}

#[tokio::test]
async fn vapid_audience_is_the_public_url_origin() {
    let h = Herald::start_with(&["--public-url", "https://push.example.test/base/"], &[]).await;
    let keys = UaKeys::new();
    let app = AppServer::new();
    let mut ua = Ua::hello(&h, None).await;
    let (_, ep) = ua.subscribe(Some(&app.public())).await;
    assert!(
        ep.starts_with("https://push.example.test/base/wpush/v2/"),
        "{ep}"
    );
    // Reach it through the local port, as a proxy would.
    let local = ep.replace("https://push.example.test/base", &h.url());
    assert_eq!(
        push(&local, Some(&app), &h.url(), &keys, "x", &[])
            .await
            .status,
        401
    );
    assert_eq!(
        push(
            &local,
            Some(&app),
            "https://push.example.test",
            &keys,
            "x",
            &[]
        )
        .await
        .status,
        201
    );
}

#[tokio::test]
async fn verified_jwts_are_cached() {
    let h = Herald::start().await;
    let keys = UaKeys::new();
    let app = AppServer::new();
    let mut ua = Ua::hello(&h, None).await;
    let (_, ep) = ua.subscribe(Some(&app.public())).await;
    let auth = app.authorization(&h.url());
    for _ in 0..3 {
        let r = push(&ep, None, &h.url(), &keys, "x", &[("authorization", &auth)]).await;
        assert_eq!(r.status, 201);
    }
    assert_eq!(
        metric(&h, "herald_jwt_cache_lookups_total{result=\"miss\"}").await,
        1.0
    );
    assert_eq!(
        metric(&h, "herald_jwt_cache_lookups_total{result=\"hit\"}").await,
        2.0
    );
}

#[tokio::test]
async fn topic_replaces_a_pending_message_while_offline() {
    let h = Herald::start().await;
    let keys = UaKeys::new();
    let (uaid, ep) = offline_subscription(&h, None).await;
    push(
        &ep,
        None,
        &h.url(),
        &keys,
        "score 1-0",
        &[("topic", "score")],
    )
    .await;
    push(&ep, None, &h.url(), &keys, "unrelated", &[]).await;
    let r = push(
        &ep,
        None,
        &h.url(),
        &keys,
        "score 2-0",
        &[("topic", "score")],
    )
    .await;
    assert_eq!(r.status, 201);
    let mut ua = Ua::hello(&h, Some(&uaid)).await;
    let a = payload(&keys, &ua.notification().await);
    let b = payload(&keys, &ua.notification().await);
    assert_eq!([a, b], ["unrelated".to_string(), "score 2-0".to_string()]);
    assert_eq!(ua.try_recv(Duration::from_millis(300)).await, None);
    assert_eq!(metric(&h, "herald_messages_replaced_total").await, 1.0);
}

#[tokio::test]
async fn expired_messages_are_never_delivered() {
    let h = Herald::start().await;
    let keys = UaKeys::new();
    let (uaid, ep) = offline_subscription(&h, None).await;
    push(&ep, None, &h.url(), &keys, "short-lived", &[("ttl", "1")]).await;
    push(&ep, None, &h.url(), &keys, "long-lived", &[("ttl", "600")]).await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let mut ua = Ua::hello(&h, Some(&uaid)).await;
    assert_eq!(payload(&keys, &ua.notification().await), "long-lived");
    assert_eq!(ua.try_recv(Duration::from_millis(300)).await, None);
}

#[tokio::test]
async fn ttl_zero_is_delivered_only_to_a_connected_user_agent() {
    let h = Herald::start().await;
    let keys = UaKeys::new();
    let mut ua = Ua::hello(&h, None).await;
    let uaid = ua.uaid.clone();
    let (_, ep) = ua.subscribe(None).await;
    let r = push(&ep, None, &h.url(), &keys, "now", &[("ttl", "0")]).await;
    assert_eq!(r.status, 201);
    assert_eq!(r.header("ttl").as_deref(), Some("0"));
    let n = ua.notification().await;
    assert_eq!(payload(&keys, &n), "now");
    assert_eq!(n["ttl"], 0);
    drop(ua);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        push(&ep, None, &h.url(), &keys, "never", &[("ttl", "0")])
            .await
            .status,
        201
    );
    let mut ua = Ua::hello(&h, Some(&uaid)).await;
    assert_eq!(ua.try_recv(Duration::from_millis(500)).await, None);
}

#[tokio::test]
async fn urgency_threshold_holds_back_lower_messages() {
    let h = Herald::start().await;
    let keys = UaKeys::new();
    let mut ua = Ua::hello(&h, None).await;
    let (_, ep) = ua.subscribe(None).await;
    ua.send(json!({"messageType":"urgency","min":"high"})).await;
    assert_eq!(
        ua.recv().await,
        json!({"messageType":"urgency","status":200})
    );
    push(&ep, None, &h.url(), &keys, "chatter", &[("urgency", "low")]).await;
    push(&ep, None, &h.url(), &keys, "alarm", &[("urgency", "high")]).await;
    let n = ua.notification().await;
    assert_eq!(payload(&keys, &n), "alarm");
    ua.ack(&n).await;
    assert_eq!(ua.try_recv(Duration::from_millis(300)).await, None);
    ua.send(json!({"messageType":"urgency","min":"very-low"}))
        .await;
    assert_eq!(ua.recv().await["messageType"], "urgency");
    assert_eq!(payload(&keys, &ua.notification().await), "chatter");
}

#[tokio::test]
async fn delete_cancels_a_pending_message() {
    let h = Herald::start().await;
    let keys = UaKeys::new();
    let (uaid, ep) = offline_subscription(&h, None).await;
    let r = push(&ep, None, &h.url(), &keys, "oops", &[]).await;
    let location = r.header("location").unwrap();
    push(&ep, None, &h.url(), &keys, "fine", &[]).await;
    assert_eq!(
        request("DELETE", &location, &[], vec![])
            .await
            .unwrap()
            .status,
        204
    );
    let again = request("DELETE", &location, &[], vec![]).await.unwrap();
    assert_eq!((again.status, again.errno()), (404, 117));
    let bogus = request("DELETE", &format!("{}/m/bogus", h.url()), &[], vec![])
        .await
        .unwrap();
    assert_eq!(bogus.status, 404);
    let mut ua = Ua::hello(&h, Some(&uaid)).await;
    assert_eq!(payload(&keys, &ua.notification().await), "fine");
    assert_eq!(ua.try_recv(Duration::from_millis(300)).await, None);
}

#[tokio::test]
async fn push_without_payload_and_legacy_aesgcm() {
    let h = Herald::start().await;
    let keys = UaKeys::new();
    let mut ua = Ua::hello(&h, None).await;
    let (ch, ep) = ua.subscribe(None).await;
    let r = request("POST", &ep, &[("ttl", "60")], vec![])
        .await
        .unwrap();
    assert_eq!(r.status, 201);
    let n = ua.notification().await;
    assert_eq!(n["channelID"], ch.as_str());
    assert!(n.get("data").is_none() && n.get("headers").is_none(), "{n}");
    ua.ack(&n).await;

    // aesgcm (draft): encrypt with ece's legacy scheme; headers go to the UA.
    let legacy = LegacyAesgcm::encrypt(&keys.public, &keys.auth, b"legacy");
    let (enc_h, ck_h) = (legacy.encryption, legacy.crypto_key);
    let r = request(
        "POST",
        &ep,
        &[
            ("ttl", "60"),
            ("content-encoding", "aesgcm"),
            ("encryption", &enc_h),
            ("crypto-key", &ck_h),
        ],
        legacy.body,
    )
    .await
    .unwrap();
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let n = ua.notification().await;
    assert_eq!(n["headers"]["encoding"], "aesgcm");
    assert_eq!(n["headers"]["encryption"], enc_h.as_str());
    assert_eq!(n["headers"]["crypto_key"], ck_h.as_str());
    let block = ece::legacy::AesGcmEncryptedBlock::new(
        &unb64(ck_h.trim_start_matches("dh=").split(';').next().unwrap()),
        &unb64(enc_h.trim_start_matches("salt=").split(';').next().unwrap()),
        4096,
        unb64(n["data"].as_str().unwrap()),
    )
    .unwrap();
    let plain = ece::legacy::decrypt_aesgcm(&keys.components, &keys.auth, &block).unwrap();
    assert_eq!(plain, b"legacy");
}

/// The value of `name=` in a canonical `;`/`,`-separated header.
fn param<'a>(header: &'a str, name: &str) -> &'a str {
    header
        .split([';', ','])
        .find_map(|p| p.strip_prefix(&format!("{name}=")))
        .unwrap_or_else(|| panic!("no {name}= in {header}"))
}

#[tokio::test]
async fn aesgcm_headers_reach_the_user_agent_normalised() {
    use base64::engine::general_purpose::URL_SAFE;
    use base64::Engine;
    let h = Herald::start().await;
    let keys = UaKeys::new();
    let mut ua = Ua::hello(&h, None).await;
    let (_, ep) = ua.subscribe(None).await;
    let legacy = LegacyAesgcm::encrypt(&keys.public, &keys.auth, b"padded");
    let (salt, dh) = (
        unb64(param(&legacy.encryption, "salt")),
        unb64(param(&legacy.crypto_key, "dh")),
    );
    // Quoted, padded, spaced, with key ids, a VAPID key in a second entry
    // and a parameter no user agent reads.
    let vapid = AppServer::new().public_raw();
    let encryption = format!(
        "keyid=\"p256dh\"; salt=\"{}\"; rs=\"4096\"",
        URL_SAFE.encode(&salt)
    );
    let crypto_key = format!(
        "keyid=\"p256dh\"; dh=\"{}\"; future=1, p256ecdsa=\"{}\"",
        URL_SAFE.encode(&dh),
        URL_SAFE.encode(&vapid)
    );
    let send = |encryption: String, crypto_key: String| {
        let (ep, body) = (ep.clone(), legacy.body.clone());
        async move {
            request(
                "POST",
                &ep,
                &[
                    ("ttl", "60"),
                    ("content-encoding", "aesgcm"),
                    ("encryption", &encryption),
                    ("crypto-key", &crypto_key),
                ],
                body,
            )
            .await
            .unwrap()
        }
    };
    let r = send(encryption, crypto_key).await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let n = ua.notification().await;
    let (enc_out, ck_out) = (
        n["headers"]["encryption"].as_str().unwrap(),
        n["headers"]["crypto_key"].as_str().unwrap(),
    );
    assert_eq!(enc_out, format!("keyid=p256dh;salt={};rs=4096", b64(&salt)));
    assert_eq!(
        ck_out,
        format!("keyid=p256dh;dh={},p256ecdsa={}", b64(&dh), b64(&vapid))
    );
    // What arrived decrypts with exactly the headers that came with it.
    let block = ece::legacy::AesGcmEncryptedBlock::new(
        &unb64(param(ck_out, "dh")),
        &unb64(param(enc_out, "salt")),
        param(enc_out, "rs").parse().unwrap(),
        unb64(n["data"].as_str().unwrap()),
    )
    .unwrap();
    let plain = ece::legacy::decrypt_aesgcm(&keys.components, &keys.auth, &block).unwrap();
    assert_eq!(plain, b"padded");
    ua.ack(&n).await;

    // What no user agent could decode is refused, not accepted and lost.
    for (encryption, crypto_key) in [
        // The example: the Encryption keyid names no Crypto-Key entry.
        (
            "keyid=\"http://example.org/bob/keys/123\";salt=\"XZwpw6o37R-6qoZjw6KwAw==\""
                .to_string(),
            format!("keyid=\"a1\"; dh=\"{}\"", URL_SAFE.encode(&dh)),
        ),
        (
            format!("salt={}", b64(&salt)),
            "dh=\"JcqK-OLkJZlJ3sJJWstJCA\"".to_string(),
        ),
        (format!("salt=\"{}", b64(&salt)), format!("dh={}", b64(&dh))),
        (
            format!("salt={};rs=1", b64(&salt)),
            format!("dh={}", b64(&dh)),
        ),
    ] {
        let r = send(encryption.clone(), crypto_key.clone()).await;
        assert_eq!(
            (r.status, r.errno()),
            (400, 110),
            "{encryption} / {crypto_key}: {}",
            String::from_utf8_lossy(&r.body)
        );
    }
    assert_eq!(ua.try_recv(Duration::from_millis(300)).await, None);
}

#[tokio::test]
async fn stored_messages_per_user_agent_are_bounded_with_429() {
    let h = Herald::start_with(&[], &[("HERALD_MAX_STORED_MESSAGES", "2")]).await;
    let keys = UaKeys::new();
    let (uaid, ep) = offline_subscription(&h, None).await;
    assert_eq!(push(&ep, None, &h.url(), &keys, "1", &[]).await.status, 201);
    assert_eq!(push(&ep, None, &h.url(), &keys, "2", &[]).await.status, 201);
    let r = push(&ep, None, &h.url(), &keys, "3", &[]).await;
    assert_eq!((r.status, r.errno()), (429, 116));
    assert!(r.header("retry-after").is_some());
    // Draining makes room again.
    let mut ua = Ua::hello(&h, Some(&uaid)).await;
    for _ in 0..2 {
        let n = ua.notification().await;
        ua.ack(&n).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(push(&ep, None, &h.url(), &keys, "4", &[]).await.status, 201);
}

#[tokio::test]
async fn in_flight_messages_are_bounded_by_the_delivery_window() {
    let h = Herald::start_with(&[], &[("HERALD_DELIVERY_WINDOW", "2")]).await;
    let keys = UaKeys::new();
    let (uaid, ep) = offline_subscription(&h, None).await;
    for i in 0..5 {
        push(&ep, None, &h.url(), &keys, &format!("m{i}"), &[]).await;
    }
    let mut ua = Ua::hello(&h, Some(&uaid)).await;
    let a = ua.notification().await;
    let b = ua.notification().await;
    assert_eq!(
        ua.try_recv(Duration::from_millis(400)).await,
        None,
        "window of 2 is full"
    );
    ua.ack(&a).await;
    assert_eq!(payload(&keys, &ua.notification().await), "m2");
    ua.ack(&b).await;
    assert_eq!(payload(&keys, &ua.notification().await), "m3");
    // A live push while the window is full waits its turn, in order.
    push(&ep, None, &h.url(), &keys, "live", &[]).await;
    assert_eq!(ua.try_recv(Duration::from_millis(300)).await, None);
    // m2 and m3 stay unacknowledged: a new connection gets them again first.
    drop(ua);
    let mut ua = Ua::hello(&h, Some(&uaid)).await;
    let mut seen = vec![];
    for _ in 0..4 {
        let n = ua.notification().await;
        seen.push(payload(&keys, &n));
        ua.ack(&n).await;
    }
    assert_eq!(seen, ["m2", "m3", "m4", "live"]);
}

#[tokio::test]
async fn silent_user_agents_are_dropped_and_their_endpoints_gone() {
    let h = Herald::start_with(
        &[],
        &[("HERALD_UA_EXPIRY", "2s"), ("HERALD_SWEEP_INTERVAL", "1s")],
    )
    .await;
    let keys = UaKeys::new();
    let mut ua = Ua::hello(&h, None).await;
    let uaid = ua.uaid.clone();
    let (_, ep) = ua.subscribe(None).await;
    drop(ua);
    tokio::time::sleep(Duration::from_millis(3200)).await;
    let r = push(&ep, None, &h.url(), &keys, "x", &[]).await;
    assert_eq!((r.status, r.errno()), (410, 103));
    let ua = Ua::hello(&h, Some(&uaid)).await;
    assert_ne!(ua.uaid, uaid, "a dropped uaid is replaced");
}

#[tokio::test]
async fn nothing_accepted_is_lost_on_kill_9() {
    for sync in ["false", "true"] {
        let mut h = Herald::start_with(&[], &[("HERALD_SYNC_WRITES", sync)]).await;
        let keys = UaKeys::new();
        let app = AppServer::new();
        let (uaid, ep) = offline_subscription(&h, Some(&app.public())).await;
        for i in 0..20 {
            let r = push(&ep, Some(&app), &h.url(), &keys, &format!("msg {i}"), &[]).await;
            assert_eq!(r.status, 201);
        }
        h.kill9();
        h.restart().await;
        let mut ua = Ua::hello(&h, Some(&uaid)).await;
        assert_eq!(ua.uaid, uaid, "user agent survived");
        for i in 0..20 {
            let n = ua.notification().await;
            assert_eq!(payload(&keys, &n), format!("msg {i}"), "sync_writes={sync}");
            ua.ack(&n).await;
        }
        // The endpoint issued before the crash still works.
        assert_eq!(
            push(&ep, Some(&app), &h.url(), &keys, "after", &[])
                .await
                .status,
            201
        );
        assert_eq!(payload(&keys, &ua.notification().await), "after");
    }
}

/// A message keeps its id: the version of every delivery is the id in the
/// Location the sender got, so a user agent can tell a redelivery.
#[tokio::test]
async fn a_redelivered_message_keeps_its_version() {
    let h = Herald::start().await;
    let keys = UaKeys::new();
    let mut ua = Ua::hello(&h, None).await;
    let uaid = ua.uaid.clone();
    let (_, ep) = ua.subscribe(None).await;
    let r = push(&ep, None, &h.url(), &keys, "same", &[]).await;
    assert_eq!(r.status, 201);
    let location = r.header("location").unwrap();
    let first = ua.notification().await;
    let version = first["version"].as_str().unwrap().to_string();
    assert!(
        location.ends_with(&format!("/m/{version}")),
        "{location} vs {version}"
    );
    drop(ua); // unacknowledged
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let mut ua = Ua::hello(&h, Some(&uaid)).await;
    assert_eq!(ua.notification().await["version"], version.as_str());
}
