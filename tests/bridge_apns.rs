//! The APNs bridge against a mock APNs (HTTP/2 over TLS, test CA, ES256
//! provider tokens verified against the `.p8` key's public half): what a
//! push becomes on the wire, what each APNs answer becomes, provider token
//! reuse and renewal, client-certificate auth, and bad key files.
//!
//! Payloads are encrypted with the independent `ece` library and decrypted
//! from what reached the mock the way Firefox for iOS does, so a wrong
//! mapping fails here and not on a phone.

#[path = "support/apns_mock.rs"]
mod apns_mock;
mod common;

use apns_mock::{Answer, ApnsMock, Recorded, KEY_ID, TEAM_ID, TOPIC};
use base64::Engine;
use bytes::Bytes;
use herald::bridge::apns::ApnsBridge;
use herald::bridge::{Bridge, Delivery};
use herald::config::{ApnsAuth, ApnsBridgeSettings};
use herald::metrics::Metrics;
use herald::store::{BridgeKind, BridgeRoute, Message};
use herald_proto::headers::NotificationHeaders;
use herald_proto::urgency::Urgency;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

const APP: &str = "firefox-ios";
const DEVICE: &str = "a0b1c2d3e4f5a0b1c2d3e4f5a0b1c2d3e4f5a0b1c2d3e4f5a0b1c2d3e4f5a0b1";

fn settings(mock: &ApnsMock) -> ApnsBridgeSettings {
    ApnsBridgeSettings {
        app_id: APP.into(),
        topic: TOPIC.into(),
        sandbox: false,
        base_url: mock.url(),
        auth: ApnsAuth::Token {
            team_id: TEAM_ID.into(),
            key_id: KEY_ID.into(),
            key: mock.key_path(),
        },
        ca: Some(mock.ca_path()),
    }
}

fn bridge(mock: &ApnsMock) -> (ApnsBridge, Arc<Metrics>) {
    let metrics = Arc::new(Metrics::new());
    let b = ApnsBridge::new(&settings(mock), metrics.clone()).expect("bridge");
    (b, metrics)
}

fn route(aps: Option<&str>) -> BridgeRoute {
    BridgeRoute {
        kind: BridgeKind::Apns,
        app_id: APP.into(),
        token: DEVICE.into(),
        aps: aps.map(str::to_string),
    }
}

fn message(data: Vec<u8>, headers: Option<NotificationHeaders>) -> Message {
    let now = common::now();
    Message {
        seq: 42,
        channel: uuid::Uuid::new_v4(),
        expires_at: now + 600,
        ttl: 600,
        urgency: Urgency::Normal,
        topic: None,
        headers,
        data: Bytes::from(data),
        receipt: false,
    }
}

fn aes128gcm() -> Option<NotificationHeaders> {
    Some(NotificationHeaders {
        encoding: "aes128gcm".into(),
        encryption: None,
        crypto_key: None,
    })
}

fn last(mock: &ApnsMock) -> Recorded {
    mock.requests().pop().expect("a request reached the mock")
}

fn requests_with(metrics: &Metrics, status: &str) -> u64 {
    metrics
        .bridge_requests
        .with_label_values(&["apns", APP, status])
        .get()
}

/// What Firefox for iOS does with a push: every top-level string of the
/// payload goes into the map application-services decrypts (`body`
/// base64url without padding, `con` defaulting to aes128gcm, aesgcm's
/// `salt` and `dh` from `enc` and `cryptokey`).
fn decrypt_like_firefox_ios(keys: &common::UaKeys, payload: &Value) -> Vec<u8> {
    let map: std::collections::BTreeMap<&str, &str> = payload
        .as_object()
        .unwrap()
        .iter()
        .filter_map(|(k, v)| Some((k.as_str(), v.as_str()?)))
        .collect();
    let b64 = |s: &str| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(s)
            .expect("base64url without padding")
    };
    let body = b64(map["body"]);
    match map.get("con").copied().unwrap_or("aes128gcm") {
        "aes128gcm" => keys.decrypt(&body),
        "aesgcm" => {
            let param = |header: &str, name: &str| {
                map[header]
                    .split([',', ';'])
                    .filter_map(|p| p.split_once('='))
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| b64(v))
                    .unwrap_or_else(|| panic!("{header} has no {name}"))
            };
            let block = ece::legacy::AesGcmEncryptedBlock::new(
                &param("cryptokey", "dh"),
                &param("enc", "salt"),
                4096,
                body,
            )
            .unwrap();
            ece::legacy::decrypt_aesgcm(&keys.components, &keys.auth, &block).expect("decrypts")
        }
        other => panic!("coding {other}"),
    }
}

#[tokio::test]
async fn an_aes128gcm_push_arrives_with_apns_headers_and_a_payload_ios_decrypts() {
    let mock = ApnsMock::start();
    let (bridge, metrics) = bridge(&mock);
    let keys = common::UaKeys::new();
    let mut m = message(common::encrypt(&keys, b"hello iPhone"), aes128gcm());
    m.urgency = Urgency::High;
    m.topic = Some("scores".into());
    let now = common::now();

    assert_eq!(bridge.send(&route(None), &m, now).await, Delivery::Accepted);

    let r = last(&mock);
    assert_eq!(r.method, "POST");
    assert_eq!(r.path, format!("/3/device/{DEVICE}"));
    assert_eq!(r.header("apns-topic"), Some(TOPIC));
    assert_eq!(r.header("apns-push-type"), Some("alert"));
    assert_eq!(r.header("apns-priority"), Some("10"));
    let expiration = m.expires_at.to_string();
    assert_eq!(r.header("apns-expiration"), Some(expiration.as_str()));
    let collapse = format!("{}scores", m.channel.simple());
    assert_eq!(r.header("apns-collapse-id"), Some(collapse.as_str()));
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(
        r.token_iat,
        Some(now),
        "the mock verified the provider token"
    );
    assert_eq!(
        r.body["aps"],
        json!({"alert": {"title-loc-key": "SentTab.NoTabArrivingNotification.title",
                         "loc-key": "SentTab.NoTabArrivingNotification.body"},
               "mutable-content": 1})
    );
    assert_eq!(r.body["chid"], m.channel.hyphenated().to_string());
    assert_eq!(r.body["ver"], "42");
    assert_eq!(r.body["con"], "aes128gcm");
    assert_eq!(decrypt_like_firefox_ios(&keys, &r.body), b"hello iPhone");
    assert_eq!(requests_with(&metrics, "200"), 1);
    let seconds = metrics
        .bridge_request_seconds
        .with_label_values(&["apns", APP])
        .get_sample_count();
    assert_eq!(seconds, 1);
}

#[tokio::test]
async fn an_aesgcm_push_carries_its_salt_and_dh() {
    let mock = ApnsMock::start();
    let (bridge, _) = bridge(&mock);
    let keys = common::UaKeys::new();
    let legacy = common::LegacyAesgcm::encrypt(&keys.public, &keys.auth, b"legacy coding");
    // As stored by the push API: the headers in the form devices decode.
    let normalised = herald::aesgcm::normalise(&legacy.encryption, &legacy.crypto_key).unwrap();
    let m = message(
        legacy.body,
        Some(NotificationHeaders {
            encoding: "aesgcm".into(),
            encryption: Some(normalised.encryption.clone()),
            crypto_key: Some(normalised.crypto_key.clone()),
        }),
    );
    assert_eq!(
        bridge.send(&route(None), &m, common::now()).await,
        Delivery::Accepted
    );
    let r = last(&mock);
    assert_eq!(r.body["con"], "aesgcm");
    assert_eq!(r.body["enc"], normalised.encryption.as_str());
    assert_eq!(r.body["cryptokey"], normalised.crypto_key.as_str());
    assert_eq!(decrypt_like_firefox_ios(&keys, &r.body), b"legacy coding");
}

#[tokio::test]
async fn a_push_without_payload_and_a_registered_aps() {
    let mock = ApnsMock::start();
    let (bridge, _) = bridge(&mock);
    let m = message(Vec::new(), None);
    let aps = r#"{"alert":{"title":"New tab"},"mutable-content":1,"badge":2}"#;
    assert_eq!(
        bridge.send(&route(Some(aps)), &m, common::now()).await,
        Delivery::Accepted
    );
    let r = last(&mock);
    assert_eq!(
        r.body,
        json!({
            "aps": {"alert": {"title": "New tab"}, "mutable-content": 1, "badge": 2},
            "chid": m.channel.hyphenated().to_string(),
            "ver": "42",
        })
    );
}

#[tokio::test]
async fn urgency_ttl_and_topic_map_to_apns_headers() {
    let mock = ApnsMock::start();
    let (bridge, _) = bridge(&mock);
    let now = common::now();
    for (urgency, priority) in [
        (Urgency::VeryLow, "5"),
        (Urgency::Low, "5"),
        (Urgency::Normal, "10"),
        (Urgency::High, "10"),
    ] {
        let mut m = message(vec![1; 20], aes128gcm());
        m.urgency = urgency;
        m.ttl = 0;
        m.expires_at = now;
        assert_eq!(bridge.send(&route(None), &m, now).await, Delivery::Accepted);
        let r = last(&mock);
        assert_eq!(r.header("apns-priority"), Some(priority), "{urgency:?}");
        assert_eq!(r.header("apns-expiration"), Some("0"), "TTL 0: try once");
        assert_eq!(r.header("apns-collapse-id"), None, "no Topic");
    }
    // The same Topic on two subscriptions of one device never collapses
    // one into the other; the longest Topic still fits APNs' 64 bytes.
    let topic = "t".repeat(32);
    let mut ids = Vec::new();
    for _ in 0..2 {
        let mut m = message(vec![1; 20], aes128gcm());
        m.topic = Some(topic.clone());
        assert_eq!(bridge.send(&route(None), &m, now).await, Delivery::Accepted);
        let id = last(&mock).header("apns-collapse-id").unwrap().to_string();
        assert!(id.len() <= 64 && id.ends_with(&topic), "{id}");
        ids.push(id);
    }
    assert_ne!(ids[0], ids[1]);
}

#[tokio::test]
async fn the_largest_push_that_fits_is_taken_by_apns() {
    let mock = ApnsMock::start();
    let (bridge, _) = bridge(&mock);
    let largest = (0..4096)
        .rev()
        .find(|n| bridge.fits(&message(vec![7; *n], aes128gcm())))
        .unwrap();
    assert!(largest > 2800, "{largest}");
    assert!(!bridge.fits(&message(vec![7; largest + 3], aes128gcm())));
    let mut m = message(vec![7; largest], aes128gcm());
    m.seq = u64::MAX;
    assert_eq!(
        bridge.send(&route(None), &m, common::now()).await,
        Delivery::Accepted
    );
    assert!(last(&mock).body_len <= 4096);

    // A registration's own aps can push a fitting message over the limit:
    // refused without asking APNs.
    let before = mock.requests().len();
    let aps = json!({"alert": {"body": "x".repeat(300)}}).to_string();
    let d = bridge.send(&route(Some(&aps)), &m, common::now()).await;
    assert!(matches!(d, Delivery::Rejected { .. }), "{d:?}");
    assert_eq!(mock.requests().len(), before);
}

#[tokio::test]
async fn device_gone_answers_drop_the_device() {
    let mock = ApnsMock::start();
    let (bridge, metrics) = bridge(&mock);
    mock.script([
        Answer::unregistered(),
        Answer::error(410, "ExpiredToken"),
        Answer::bad_device_token(),
        Answer::error(400, "DeviceTokenNotForTopic"),
    ]);
    for want in [
        "Unregistered",
        "ExpiredToken",
        "BadDeviceToken",
        "DeviceTokenNotForTopic",
    ] {
        let d = bridge
            .send(&route(None), &message(vec![1], aes128gcm()), common::now())
            .await;
        match d {
            Delivery::Gone { reason } => assert!(reason.contains(want), "{reason}"),
            other => panic!("{want}: {other:?}"),
        }
    }
    assert_eq!(requests_with(&metrics, "410"), 2);
    assert_eq!(requests_with(&metrics, "400"), 2);
}

#[tokio::test]
async fn busy_failing_and_silent_upstreams_are_retried() {
    let mock = ApnsMock::start();
    let (bridge, metrics) = bridge(&mock);
    let bridge = bridge.with_timeout(Duration::from_secs(1));
    mock.script([
        Answer::too_many_requests(Some(30)),
        Answer::too_many_requests(None),
        Answer::service_unavailable(),
        Answer::error(500, "InternalServerError"),
        Answer::Reset,
        Answer::Delay(Duration::from_secs(3)),
    ]);
    let mut afters = Vec::new();
    for _ in 0..6 {
        let d = bridge
            .send(&route(None), &message(vec![1], aes128gcm()), common::now())
            .await;
        match d {
            Delivery::Retry { after, .. } => afters.push(after),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(afters[0], Some(Duration::from_secs(30)), "Retry-After");
    assert!(afters[1..].iter().all(Option::is_none));
    assert_eq!(requests_with(&metrics, "429"), 2);
    assert_eq!(requests_with(&metrics, "503"), 1);
    assert_eq!(requests_with(&metrics, "500"), 1);
    assert_eq!(requests_with(&metrics, "error"), 2, "reset and timeout");

    // APNs out of reach altogether.
    let url = mock.url();
    drop(mock);
    let d = bridge
        .send(&route(None), &message(vec![1], aes128gcm()), common::now())
        .await;
    assert!(
        matches!(d, Delivery::Retry { after: None, .. }),
        "{url}: {d:?}"
    );
    assert_eq!(requests_with(&metrics, "error"), 3);
}

#[tokio::test]
async fn refusals_of_the_message_are_rejected() {
    let mock = ApnsMock::start();
    let (bridge, _) = bridge(&mock);
    mock.script([
        Answer::error(400, "BadCollapseId"),
        Answer::error(413, "PayloadTooLarge"),
    ]);
    for want in ["BadCollapseId", "PayloadTooLarge"] {
        let d = bridge
            .send(&route(None), &message(vec![1], aes128gcm()), common::now())
            .await;
        match d {
            Delivery::Rejected { reason } => assert!(reason.contains(want), "{reason}"),
            other => panic!("{want}: {other:?}"),
        }
    }
    // A bridge configured with another app's bundle id: the mock refuses
    // the topic, as APNs does.
    let mut s = settings(&mock);
    s.topic = "org.example.other".into();
    let other = ApnsBridge::new(&s, Arc::new(Metrics::new())).unwrap();
    let d = other
        .send(&route(None), &message(vec![1], aes128gcm()), common::now())
        .await;
    assert!(
        matches!(&d, Delivery::Rejected { reason } if reason.contains("TopicDisallowed")),
        "{d:?}"
    );
}

#[tokio::test]
async fn the_provider_token_is_reused_then_renewed_when_apns_calls_it_expired() {
    let mock = ApnsMock::start();
    let (bridge, metrics) = bridge(&mock);
    let refreshes = || {
        metrics
            .bridge_token_refreshes
            .with_label_values(&["apns", APP])
            .get()
    };
    let now = common::now();
    for i in 0..3 {
        let d = bridge
            .send(&route(None), &message(vec![1], aes128gcm()), now + i * 60)
            .await;
        assert_eq!(d, Delivery::Accepted);
    }
    let jwts: Vec<String> = mock
        .requests()
        .iter()
        .map(|r| r.header("authorization").unwrap().to_string())
        .collect();
    assert!(jwts.iter().all(|j| j == &jwts[0]), "one token for all");
    assert_eq!(refreshes(), 1);
    assert_eq!(mock.connections(), 1, "one long-lived HTTP/2 connection");

    // APNs says the token is expired: a new one, and the push goes out.
    mock.script([Answer::expired_provider_token()]);
    let d = bridge
        .send(&route(None), &message(vec![1], aes128gcm()), now + 180)
        .await;
    assert_eq!(d, Delivery::Accepted);
    let rs = mock.requests();
    assert_eq!(rs.len(), 5);
    assert_eq!(rs[3].status, 403);
    assert_eq!(rs[3].header("authorization"), Some(jwts[0].as_str()));
    assert_eq!(rs[4].status, 200);
    assert_ne!(rs[4].header("authorization"), Some(jwts[0].as_str()));
    assert_eq!(rs[4].token_iat, Some(now + 180));
    assert_eq!(refreshes(), 2);

    // Fifty minutes on, a new token without being asked.
    let later = now + 180 + 50 * 60;
    let d = bridge
        .send(&route(None), &message(vec![1], aes128gcm()), later)
        .await;
    assert_eq!(d, Delivery::Accepted);
    assert_eq!(last(&mock).token_iat, Some(later));
    assert_eq!(refreshes(), 3);
    assert_eq!(mock.connections(), 1);
}

#[tokio::test]
async fn refused_credentials_keep_the_message_for_later() {
    // A clock an hour and more behind APNs': every token is already
    // expired when it arrives. One renewal, then the message waits: the
    // operator's clock, not the message, is at fault.
    let mock = ApnsMock::start();
    let (bridge, metrics) = bridge(&mock);
    let d = bridge
        .send(
            &route(None),
            &message(vec![1], aes128gcm()),
            common::now() - 4000,
        )
        .await;
    assert!(
        matches!(&d, Delivery::Retry { after: Some(a), reason } if reason.contains("ExpiredProviderToken") && *a == herald::bridge::CREDENTIALS_PAUSE),
        "{d:?}"
    );
    assert_eq!(requests_with(&metrics, "403"), 2);

    // Any other refusal of the credentials waits the same way.
    mock.script([Answer::error(403, "InvalidProviderToken")]);
    let d = bridge
        .send(&route(None), &message(vec![1], aes128gcm()), common::now())
        .await;
    assert!(
        matches!(&d, Delivery::Retry { after: Some(a), reason } if reason.contains("InvalidProviderToken") && *a == herald::bridge::CREDENTIALS_PAUSE),
        "{d:?}"
    );
}

#[tokio::test]
async fn client_certificate_authentication() {
    let mock = ApnsMock::start_with_client_certs();
    let mut s = settings(&mock);
    s.auth = ApnsAuth::Certificate {
        certificate: mock.client_cert_path(),
        key: mock.client_key_path(),
    };
    let bridge = ApnsBridge::new(&s, Arc::new(Metrics::new())).unwrap();
    let d = bridge
        .send(&route(None), &message(vec![1], aes128gcm()), common::now())
        .await;
    assert_eq!(d, Delivery::Accepted);
    assert_eq!(last(&mock).header("authorization"), None);

    // Without the certificate the handshake fails: no answer, so retry.
    let (tokened, metrics) = bridge_with_timeout(&mock);
    let d = tokened
        .send(&route(None), &message(vec![1], aes128gcm()), common::now())
        .await;
    assert!(matches!(d, Delivery::Retry { .. }), "{d:?}");
    assert_eq!(requests_with(&metrics, "error"), 1);
    assert_eq!(mock.requests().len(), 1);
}

fn bridge_with_timeout(mock: &ApnsMock) -> (ApnsBridge, Arc<Metrics>) {
    let (b, m) = bridge(mock);
    (b.with_timeout(Duration::from_secs(5)), m)
}

#[test]
fn bad_key_files_are_refused_with_clear_errors() {
    let mock = ApnsMock::start();
    let dir = mock.dir();
    let error = |auth: ApnsAuth| {
        let mut s = settings(&mock);
        s.auth = auth;
        let e = ApnsBridge::new(&s, Arc::new(Metrics::new()))
            .err()
            .expect("refused");
        format!("{e:#}")
    };
    let token = |key: PathBuf| ApnsAuth::Token {
        team_id: TEAM_ID.into(),
        key_id: KEY_ID.into(),
        key,
    };
    let write = |name: &str, text: &str| {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    };

    let missing = dir.join("missing.p8");
    let e = error(token(missing.clone()));
    assert!(e.contains("bridges.apns.firefox-ios"), "{e}");
    assert!(
        e.contains(missing.to_str().unwrap()) && e.contains("cannot read"),
        "{e}"
    );

    let garbage = write("garbage.p8", "not a key\n");
    let e = error(token(garbage.clone()));
    assert!(
        e.contains(garbage.to_str().unwrap()) && e.contains("PKCS#8"),
        "{e}"
    );

    // An RSA key in PKCS#8 form: right format, wrong algorithm.
    use rsa::pkcs8::EncodePrivateKey;
    let rsa = rsa::RsaPrivateKey::new(&mut rand::thread_rng(), 1024).unwrap();
    let rsa_pem = rsa.to_pkcs8_pem(Default::default()).unwrap();
    let rsa_path = write("rsa.p8", &rsa_pem);
    let e = error(token(rsa_path.clone()));
    assert!(
        e.contains(rsa_path.to_str().unwrap()) && e.contains("P-256"),
        "{e}"
    );

    // Certificate auth: a missing certificate, a file without one, a key
    // that is no key.
    let e = error(ApnsAuth::Certificate {
        certificate: dir.join("none.pem"),
        key: mock.client_key_path(),
    });
    assert!(e.contains("none.pem") && e.contains("cannot read"), "{e}");
    let e = error(ApnsAuth::Certificate {
        certificate: garbage.clone(),
        key: mock.client_key_path(),
    });
    assert!(e.contains("no certificate"), "{e}");
    let e = error(ApnsAuth::Certificate {
        certificate: mock.client_cert_path(),
        key: garbage.clone(),
    });
    assert!(e.contains("garbage.p8") && e.contains("private key"), "{e}");

    // A CA file without certificates; a plain-http base_url.
    let mut s = settings(&mock);
    s.ca = Some(garbage);
    let e = format!(
        "{:#}",
        ApnsBridge::new(&s, Arc::new(Metrics::new())).err().unwrap()
    );
    assert!(e.contains("ca ") && e.contains("no certificate"), "{e}");
    let mut s = settings(&mock);
    s.base_url = "http://127.0.0.1:1".into();
    let e = format!(
        "{:#}",
        ApnsBridge::new(&s, Arc::new(Metrics::new())).err().unwrap()
    );
    assert!(e.contains("https://"), "{e}");
}
