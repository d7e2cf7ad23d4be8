//! The FCM bridge (`herald::bridge::fcm::FcmBridge`) against the loopback
//! FCM mock: what a message becomes on the wire (checked by decrypting it
//! the way Firefox for Android does), what each upstream answer becomes,
//! the OAuth2 grant and token cache, and the errors of bad settings.

mod common;
#[path = "support/fcm_mock.rs"]
mod fcm_mock;

use bytes::Bytes;
use common::{encrypt, now, LegacyAesgcm, UaKeys};
use fcm_mock::{FcmMock, Reply};
use herald::bridge::fcm::FcmBridge;
use herald::bridge::{Bridge, Delivery};
use herald::config::FcmBridgeSettings;
use herald::metrics::Metrics;
use herald::store::{BridgeKind, BridgeRoute, Message};
use herald_proto::headers::NotificationHeaders;
use herald_proto::urgency::Urgency;
use serde_json::Value;
use std::sync::Arc;
use std::time::Duration;

const APP: &str = "fx-android";
const DEVICE: &str = "fcm-device-token:APA91bH-0123456789";

fn settings(fcm: &FcmMock) -> FcmBridgeSettings {
    FcmBridgeSettings {
        app_id: APP.into(),
        project_id: fcm.project_id().into(),
        credentials: fcm.credentials_path(),
        base_url: fcm.url(),
        ca: None,
    }
}

fn bridge(fcm: &FcmMock) -> (FcmBridge, Arc<Metrics>) {
    let metrics = Arc::new(Metrics::new());
    let b = FcmBridge::new(&settings(fcm), metrics.clone()).expect("bridge");
    (b, metrics)
}

fn route() -> BridgeRoute {
    BridgeRoute {
        kind: BridgeKind::Fcm,
        app_id: APP.into(),
        token: DEVICE.into(),
        aps: None,
    }
}

fn message(headers: Option<NotificationHeaders>, data: Vec<u8>, ttl: u64) -> Message {
    Message {
        seq: 1,
        channel: uuid::Uuid::new_v4(),
        expires_at: now() + ttl,
        ttl,
        urgency: Urgency::Normal,
        topic: None,
        headers,
        data: Bytes::from(data),
        receipt: false,
    }
}

fn aes128gcm(keys: &UaKeys, plaintext: &[u8], ttl: u64) -> Message {
    let headers = NotificationHeaders {
        encoding: "aes128gcm".into(),
        encryption: None,
        crypto_key: None,
    };
    message(Some(headers), encrypt(keys, plaintext), ttl)
}

/// Strict base64url without padding, as application-services decodes.
fn unpadded(s: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(s)
        .unwrap_or_else(|e| panic!("{s:?} is not unpadded base64url: {e}"))
}

/// `name=` from a header split on `,` and `;` as application-services does.
fn param(header: &str, name: &str) -> Vec<u8> {
    let v = header
        .split([',', ';'])
        .filter_map(|p| p.split_once('='))
        .find(|(k, _)| *k == name)
        .unwrap_or_else(|| panic!("no {name}= in {header:?}"))
        .1;
    unpadded(v)
}

/// What Firefox for Android's push component makes of an FCM data map
/// (application-services `PushPayload` and its decrypt).
fn device_decrypt(keys: &UaKeys, data: &Value) -> Vec<u8> {
    let body = unpadded(data["body"].as_str().expect("body"));
    match data["con"].as_str().unwrap_or("aes128gcm") {
        "aes128gcm" => keys.decrypt(&body),
        "aesgcm" => {
            let dh = param(data["cryptokey"].as_str().expect("cryptokey"), "dh");
            let salt = param(data["enc"].as_str().expect("enc"), "salt");
            let block = ece::legacy::AesGcmEncryptedBlock::new(&dh, &salt, 4096, body).unwrap();
            ece::legacy::decrypt_aesgcm(&keys.components, &keys.auth, &block).expect("decrypts")
        }
        other => panic!("content encoding {other}"),
    }
}

fn requests_with(m: &Metrics, status: &str) -> u64 {
    m.bridge_requests
        .with_label_values(&["fcm", APP, status])
        .get()
}

fn refreshes(m: &Metrics) -> u64 {
    m.bridge_token_refreshes
        .with_label_values(&["fcm", APP])
        .get()
}

#[tokio::test]
async fn an_aes128gcm_push_reaches_fcm_as_firefox_for_android_decodes_it() {
    let fcm = FcmMock::start();
    let (b, metrics) = bridge(&fcm);
    assert_eq!(b.kind(), BridgeKind::Fcm);
    assert_eq!(b.app_id(), APP);
    let keys = UaKeys::new();
    let mut m = aes128gcm(&keys, b"tab sent from desktop", 300);
    m.urgency = Urgency::High;
    m.topic = Some("sync".into());
    let sent_at = m.expires_at - 300;
    assert_eq!(b.send(&route(), &m, sent_at).await, Delivery::Accepted);

    let reqs = fcm.requests();
    assert_eq!(reqs.len(), 1);
    let r = &reqs[0];
    assert_eq!(r.path, "/v1/projects/herald-test/messages:send");
    assert!(r
        .header("authorization")
        .unwrap()
        .starts_with("Bearer ya29.mock-1-"));
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.body["message"]["token"], DEVICE);
    let a = r.android();
    assert_eq!(a["ttl"], "300s");
    assert_eq!(a["priority"], "HIGH");
    assert_eq!(a["collapse_key"], format!("{}sync", m.channel.simple()));
    let data = r.data().as_object().unwrap();
    let mut keys_sent: Vec<&str> = data.keys().map(String::as_str).collect();
    keys_sent.sort();
    assert_eq!(keys_sent, ["body", "chid", "con"]);
    assert_eq!(data["chid"], m.channel.hyphenated().to_string());
    assert_eq!(data["con"], "aes128gcm");
    assert_eq!(device_decrypt(&keys, r.data()), b"tab sent from desktop");

    assert_eq!(fcm.grants(), 1);
    assert!(fcm.refused_grants().is_empty());
    assert_eq!(requests_with(&metrics, "200"), 1);
    assert_eq!(refreshes(&metrics), 1);
    let timed = metrics
        .bridge_request_seconds
        .with_label_values(&["fcm", APP]);
    assert_eq!(timed.get_sample_count(), 1);
}

#[tokio::test]
async fn an_aesgcm_push_carries_enc_and_cryptokey_and_the_ttl_left() {
    let fcm = FcmMock::start();
    let (b, _) = bridge(&fcm);
    let keys = UaKeys::new();
    let legacy = LegacyAesgcm::encrypt(&keys.public, &keys.auth, b"legacy hello");
    // Stored as the push endpoint stores it: headers in canonical form.
    let n = herald::aesgcm::normalise(&legacy.encryption, &legacy.crypto_key)
        .unwrap_or_else(|_| panic!("ece's headers normalise"));
    let headers = NotificationHeaders {
        encoding: "aesgcm".into(),
        encryption: Some(n.encryption.clone()),
        crypto_key: Some(n.crypto_key.clone()),
    };
    let m = message(Some(headers), legacy.body, 600);
    assert_eq!(
        b.send(&route(), &m, m.expires_at - 42).await,
        Delivery::Accepted
    );
    let r = &fcm.requests()[0];
    assert_eq!(r.android()["ttl"], "42s", "the TTL still left is sent");
    assert_eq!(r.android()["priority"], "NORMAL");
    assert!(r.android().get("collapse_key").is_none());
    assert_eq!(r.data()["con"], "aesgcm");
    assert_eq!(r.data()["enc"], n.encryption.as_str());
    assert_eq!(r.data()["cryptokey"], n.crypto_key.as_str());
    assert_eq!(device_decrypt(&keys, r.data()), b"legacy hello");
}

#[tokio::test]
async fn a_push_without_payload_sends_the_channel_id_alone() {
    let fcm = FcmMock::start();
    let (b, _) = bridge(&fcm);
    for urgency in [Urgency::Low, Urgency::VeryLow, Urgency::Normal] {
        let mut m = message(None, Vec::new(), 60);
        m.urgency = urgency;
        // Sent after its TTL ran out: FCM is told 0 s (deliver now or never).
        assert_eq!(
            b.send(&route(), &m, m.expires_at + 5).await,
            Delivery::Accepted
        );
        let r = fcm.requests().pop().unwrap();
        assert_eq!(r.android()["priority"], "NORMAL", "{urgency:?}");
        assert_eq!(r.android()["ttl"], "0s");
        assert_eq!(
            r.data(),
            &serde_json::json!({"chid": m.channel.hyphenated().to_string()})
        );
    }
}

#[tokio::test]
async fn fits_is_fcms_data_limit_and_the_largest_fitting_push_is_taken() {
    let fcm = FcmMock::start();
    let (b, _) = bridge(&fcm);
    let headers = NotificationHeaders {
        encoding: "aes128gcm".into(),
        encryption: None,
        crypto_key: None,
    };
    let largest = message(Some(headers.clone()), vec![7; 3015], 60);
    let over = message(Some(headers), vec![7; 3016], 60);
    assert!(b.fits(&largest));
    assert!(!b.fits(&over));
    assert!(b.fits(&message(None, Vec::new(), 60)));
    assert_eq!(b.send(&route(), &largest, now()).await, Delivery::Accepted);
    // The mock, like FCM, refuses a data map over 4096 bytes.
    assert!(matches!(
        b.send(&route(), &over, now()).await,
        Delivery::Rejected { .. }
    ));
}

fn retry_after(d: &Delivery) -> Option<Duration> {
    match d {
        Delivery::Retry { after, .. } => *after,
        other => panic!("expected Retry, got {other:?}"),
    }
}

#[tokio::test]
async fn upstream_answers_become_gone_retry_or_rejected() {
    let fcm = FcmMock::start();
    let (b, metrics) = bridge(&fcm);
    let in_30s = httpdate(now() + 30);
    fcm.script([
        Reply::Unregistered,
        Reply::InvalidToken,
        Reply::SenderIdMismatch,
        Reply::TooManyRequests {
            retry_after: "7".into(),
        },
        Reply::TooManyRequests {
            retry_after: in_30s,
        },
        Reply::Unavailable,
        Reply::Internal,
        Reply::InvalidArgument,
        Reply::Ok,
    ]);
    let keys = UaKeys::new();
    let m = aes128gcm(&keys, b"x", 300);
    let mut got = Vec::new();
    for _ in 0..9 {
        got.push(b.send(&route(), &m, now()).await);
    }
    for d in &got[..3] {
        assert!(matches!(d, Delivery::Gone { .. }), "{d:?}");
    }
    let Delivery::Gone { reason } = &got[0] else {
        unreachable!()
    };
    assert!(reason.contains("404 UNREGISTERED"), "{reason}");
    assert_eq!(retry_after(&got[3]), Some(Duration::from_secs(7)));
    let dated = retry_after(&got[4]).expect("an HTTP date is honoured");
    assert!((28..=30).contains(&dated.as_secs()), "{dated:?}");
    assert_eq!(retry_after(&got[5]), None);
    assert_eq!(retry_after(&got[6]), None);
    assert!(
        matches!(&got[7], Delivery::Rejected { reason } if reason.contains("400 INVALID_ARGUMENT")),
        "{:?}",
        got[7]
    );
    assert_eq!(got[8], Delivery::Accepted);
    for (status, n) in [
        ("404", 1),
        ("400", 2),
        ("403", 1),
        ("429", 2),
        ("503", 1),
        ("500", 1),
        ("200", 1),
    ] {
        assert_eq!(requests_with(&metrics, status), n, "status {status}");
    }
}

/// An IMF-fixdate, written independently of the bridge's parser.
fn httpdate(unix: u64) -> String {
    let out = std::process::Command::new("date")
        .args([
            "-u",
            "-d",
            &format!("@{unix}"),
            "+%a, %d %b %Y %H:%M:%S GMT",
        ])
        .env("LC_ALL", "C")
        .output()
        .expect("date");
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

#[tokio::test]
async fn no_answer_in_time_and_no_connection_are_retried() {
    let fcm = FcmMock::start();
    let (b, metrics) = bridge(&fcm);
    let b = b.with_timeout(Duration::from_millis(500));
    fcm.script([Reply::Stall]);
    let m = message(None, Vec::new(), 60);
    let d = b.send(&route(), &m, now()).await;
    assert!(
        matches!(&d, Delivery::Retry { after: None, reason } if reason.contains("no answer")),
        "{d:?}"
    );
    assert_eq!(requests_with(&metrics, "error"), 1);

    // FCM unreachable (nothing listens there); the token endpoint works.
    let mut s = settings(&fcm);
    s.base_url = dead_url();
    let metrics = Arc::new(Metrics::new());
    let b = FcmBridge::new(&s, metrics.clone()).unwrap();
    let d = b.send(&route(), &m, now()).await;
    assert!(matches!(d, Delivery::Retry { after: None, .. }), "{d:?}");
    assert_eq!(requests_with(&metrics, "error"), 1);

    // And the token endpoint unreachable: retried too, nothing sent.
    let mut s = settings(&fcm);
    s.credentials = fcm_mock::write_credentials(
        fcm.dir(),
        "dead-token-uri.json",
        fcm_mock::account_key(),
        fcm_mock::CLIENT_EMAIL,
        &format!("{}/token", dead_url()),
    );
    let sent = fcm.requests().len();
    let b = FcmBridge::new(&s, Arc::new(Metrics::new())).unwrap();
    let d = b.send(&route(), &m, now()).await;
    assert!(
        matches!(&d, Delivery::Retry { reason, .. } if reason.starts_with("no FCM access token")),
        "{d:?}"
    );
    assert_eq!(fcm.requests().len(), sent);
}

/// A loopback URL nothing listens on.
fn dead_url() -> String {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    format!("http://{}", closed.local_addr().unwrap())
}

#[tokio::test]
async fn the_access_token_is_shared_then_refreshed_before_it_expires() {
    let fcm = FcmMock::start();
    // 62 s tokens are replaced after 2 s (a minute before they run out).
    fcm.set_expires_in(62);
    let (b, metrics) = bridge(&fcm);
    let m = message(None, Vec::new(), 60);
    // Eight sends at once with no token yet: one grant serves them all.
    let r = route();
    let sends = (0..8).map(|_| b.send(&r, &m, now()));
    for d in futures_util::future::join_all(sends).await {
        assert_eq!(d, Delivery::Accepted);
    }
    assert_eq!(b.send(&route(), &m, now()).await, Delivery::Accepted);
    assert_eq!(fcm.grants(), 1);
    let bearers = |fcm: &FcmMock| -> Vec<String> {
        fcm.requests()
            .iter()
            .map(|r| r.header("authorization").unwrap().to_owned())
            .collect()
    };
    let first = bearers(&fcm);
    assert!(first.iter().all(|t| *t == first[0]));

    tokio::time::sleep(Duration::from_millis(2200)).await;
    assert_eq!(b.send(&route(), &m, now()).await, Delivery::Accepted);
    assert_eq!(fcm.grants(), 2);
    assert_ne!(bearers(&fcm).last().unwrap(), &first[0]);
    assert_eq!(refreshes(&metrics), 2);
    assert!(fcm.requests().iter().all(|r| r.status == 200));
}

#[tokio::test]
async fn a_refused_token_is_replaced_once_and_the_send_tried_again() {
    let fcm = FcmMock::start();
    let (b, metrics) = bridge(&fcm);
    let m = message(None, Vec::new(), 60);
    assert_eq!(b.send(&route(), &m, now()).await, Delivery::Accepted);
    fcm.revoke_tokens();
    assert_eq!(b.send(&route(), &m, now()).await, Delivery::Accepted);
    let statuses: Vec<u16> = fcm.requests().iter().map(|r| r.status).collect();
    assert_eq!(statuses, [200, 401, 200]);
    assert_eq!(fcm.grants(), 2);
    assert_eq!(refreshes(&metrics), 2);

    // A fresh token refused too: the credentials are at fault, not the
    // message; one retry only, then the message waits for them to be mended.
    fcm.script([Reply::Unauthenticated, Reply::Unauthenticated]);
    let d = b.send(&route(), &m, now()).await;
    assert!(
        matches!(&d, Delivery::Retry { after: Some(a), reason } if reason.contains("401") && *a == herald::bridge::CREDENTIALS_PAUSE),
        "{d:?}"
    );
    assert_eq!(fcm.requests().len(), 5);
    assert_eq!(fcm.grants(), 3);
    assert_eq!(requests_with(&metrics, "401"), 3);
}

#[tokio::test]
async fn a_grant_signed_with_another_key_is_refused_by_the_token_endpoint() {
    let fcm = FcmMock::start();
    let forged = fcm_mock::write_credentials(
        fcm.dir(),
        "other-key.json",
        fcm_mock::foreign_key(),
        fcm_mock::CLIENT_EMAIL,
        &fcm.token_uri(),
    );
    let mut s = settings(&fcm);
    s.credentials = forged;
    let b = FcmBridge::new(&s, Arc::new(Metrics::new())).expect("a well-formed key file");
    let d = b
        .send(&route(), &message(None, Vec::new(), 60), now())
        .await;
    assert!(
        matches!(&d, Delivery::Retry { after: Some(a), reason } if reason.contains("Invalid JWT Signature") && *a == herald::bridge::CREDENTIALS_PAUSE),
        "{d:?}"
    );
    assert_eq!(fcm.refused_grants(), ["Invalid JWT Signature."]);
    assert_eq!(fcm.grants(), 0);
    assert!(fcm.requests().is_empty(), "nothing is sent without a token");
}

fn start_error(s: &FcmBridgeSettings) -> String {
    match FcmBridge::new(s, Arc::new(Metrics::new())) {
        Ok(_) => panic!("{s:?} was accepted"),
        Err(e) => e.to_string(),
    }
}

#[tokio::test]
async fn bad_settings_and_key_files_are_refused_at_start_saying_why() {
    let fcm = FcmMock::start();
    let dir = fcm.dir();
    let path_of = |name: &str, text: &str| {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let ec_pem = {
        use p256::pkcs8::EncodePrivateKey;
        let key = p256::SecretKey::random(&mut rand::thread_rng());
        key.to_pkcs8_pem(Default::default()).unwrap().to_string()
    };
    let ec_file = serde_json::json!({
        "client_email": fcm_mock::CLIENT_EMAIL,
        "private_key": ec_pem,
        "token_uri": fcm.token_uri(),
    });
    let cases = [
        (dir.join("absent.json"), "cannot read it"),
        (path_of("garbage.json", "not json"), "not JSON"),
        (
            path_of(
                "no-key.json",
                r#"{"client_email":"a@b","token_uri":"https://h/t"}"#,
            ),
            "no \"private_key\" field",
        ),
        (
            path_of("ec.json", &ec_file.to_string()),
            "not an RSA private key in PKCS#8 PEM",
        ),
    ];
    for (path, why) in cases {
        let mut s = settings(&fcm);
        s.credentials = path.clone();
        let e = start_error(&s);
        assert!(
            e.starts_with(&format!(
                "[bridges.fcm.{APP}]: FCM credentials {}",
                path.display()
            )),
            "{e}"
        );
        assert!(e.contains(why), "{e} should say {why}");
    }
    let mut s = settings(&fcm);
    s.project_id = "a/b".into();
    assert!(start_error(&s).contains("project_id \"a/b\""));
    let mut s = settings(&fcm);
    s.base_url = "fcm.googleapis.com".into();
    assert!(start_error(&s).contains("base_url \"fcm.googleapis.com\" is not an http(s) URL"));
    let mut s = settings(&fcm);
    s.ca = Some(dir.join("no-ca.pem"));
    assert!(start_error(&s).contains("cannot read CA file"));
}

#[tokio::test]
async fn https_upstreams_are_reached_trusting_the_ca_setting() {
    let fcm = FcmMock::start_tls();
    assert!(fcm.url().starts_with("https://"));
    let mut s = settings(&fcm);
    s.ca = fcm.ca_path();
    let b = FcmBridge::new(&s, Arc::new(Metrics::new())).unwrap();
    let m = message(None, Vec::new(), 60);
    assert_eq!(b.send(&route(), &m, now()).await, Delivery::Accepted);
    assert_eq!(fcm.grants(), 1);
    assert_eq!(fcm.requests().len(), 1);

    // Without the CA the mock's certificate is not trusted: nothing can
    // be sent, and the message is kept for a later try.
    s.ca = None;
    let b = FcmBridge::new(&s, Arc::new(Metrics::new())).unwrap();
    let d = b.send(&route(), &m, now()).await;
    assert!(
        matches!(&d, Delivery::Retry { reason, .. } if reason.starts_with("no FCM access token")),
        "{d:?}"
    );
    assert_eq!(fcm.grants(), 1);
}
