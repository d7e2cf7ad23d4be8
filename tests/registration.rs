//! The mobile registration API (`/v1/{type}/{app_id}/registration…`) as
//! Firefox for Android and iOS call it, against a real Herald process
//! configured with FCM and APNs bridge tables. Secrets are checked against
//! an HMAC computed here with the `hmac` crate; pushes come from an
//! application server signing VAPID with `jsonwebtoken`.

mod common;

use common::*;
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

const KEY_A: &str = "first-bridge-key-0123456789";
const KEY_B: &str = "second-bridge-key-0123456789";
/// autopush-rs's own test key (`test_legacy_signature`).
const AUTOPUSH_KEY: &str = "HJVPy4ZwF4Yz_JdvXTL8hRcwIhv742vC60Tg5Ycrvw8=";
const FCM: &str = "/v1/fcm/fenix/registration";

/// The secret autopush-rs and Herald make: lowercase hex HMAC-SHA256 of the
/// uaid's 32 hex digits, keyed by the key string's bytes.
fn secret_under(key: &str, uaid: &str) -> String {
    let mut m = Hmac::<Sha256>::new_from_slice(key.as_bytes()).unwrap();
    m.update(uaid.replace('-', "").to_ascii_lowercase().as_bytes());
    m.finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The files a bridge table names, made as the real ones are: a Google
/// service-account JSON with an RSA key, and an APNs `.p8` (PKCS#8 P-256).
fn bridge_files(dir: &Path) -> (PathBuf, PathBuf) {
    use p256::pkcs8::EncodePrivateKey as _;
    let rsa = rsa::RsaPrivateKey::new(&mut rand::thread_rng(), 2048).unwrap();
    let sa = dir.join("service-account.json");
    let pem = rsa.to_pkcs8_pem(Default::default()).unwrap();
    std::fs::write(
        &sa,
        json!({
            "type": "service_account",
            "project_id": "fenix-test",
            "private_key_id": "k1",
            "private_key": pem.as_str(),
            "client_email": "push@fenix-test.iam.gserviceaccount.com",
            "token_uri": "http://127.0.0.1:9/token",
        })
        .to_string(),
    )
    .unwrap();
    let p8 = dir.join("AuthKey_KEYID12345.p8");
    let ec = p256::SecretKey::random(&mut rand::thread_rng());
    std::fs::write(&p8, ec.to_pkcs8_pem(Default::default()).unwrap().as_bytes()).unwrap();
    (sa, p8)
}

/// A config file: `top` (settings), then an FCM app `fenix` and an APNs app
/// `firefox-ios`, both pointed at a loopback port nothing listens on.
fn write_config(dir: &Path, top: &str) -> PathBuf {
    let (sa, p8) = bridge_files(dir);
    let file = dir.join("herald.toml");
    std::fs::write(
        &file,
        format!(
            "{top}\n\
             [bridges.fcm.fenix]\nproject_id = \"fenix-test\"\ncredentials = \"{}\"\nbase_url = \"http://127.0.0.1:9\"\n\
             [bridges.apns.firefox-ios]\ntopic = \"org.mozilla.ios.Firefox\"\nsandbox = true\n\
             team_id = \"TEAMID1234\"\nkey_id = \"KEYID12345\"\nkey = \"{}\"\nbase_url = \"https://127.0.0.1:9\"\n",
            sa.display(),
            p8.display()
        ),
    )
    .unwrap();
    file
}

struct Bridged {
    h: Herald,
    dir: tempfile::TempDir,
}

async fn bridged_with(top: &str, env: &[(&str, &str)]) -> Bridged {
    let dir = tempfile::tempdir().unwrap();
    let file = write_config(dir.path(), top);
    let h = Herald::start_with(&["--config", file.to_str().unwrap()], env).await;
    Bridged { h, dir }
}

async fn bridged() -> Bridged {
    bridged_with(&format!("bridge_auth_keys = [\"{KEY_A}\"]"), &[]).await
}

async fn call(
    h: &Herald,
    method: &str,
    path: &str,
    secret: Option<&str>,
    body: Option<Value>,
) -> Resp {
    let auth = secret.map(|s| format!("webpush {s}"));
    let mut headers = vec![("content-type", "application/json")];
    if let Some(a) = &auth {
        headers.push(("authorization", a));
    }
    let body = body.map(|b| b.to_string().into_bytes()).unwrap_or_default();
    http(h, method, path, &headers, body).await.unwrap()
}

/// R1 as Firefox sends it; returns its answer after checking its shape.
async fn register(h: &Herald, path: &str, body: Value) -> Value {
    let r = call(h, "POST", path, None, Some(body)).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let v = r.json();
    for field in ["uaid", "channelID", "endpoint", "secret"] {
        assert!(v[field].is_string(), "{field} in {v}");
    }
    v
}

fn is_hyphenated_uuid(s: &str) -> bool {
    s.len() == 36
        && s.parse::<uuid::Uuid>().is_ok()
        && s.chars()
            .all(|c| c == '-' || c.is_ascii_digit() || ('a'..='f').contains(&c))
}

fn channel_set(v: &Value) -> BTreeSet<String> {
    v["channelIDs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap().to_string())
        .collect()
}

fn reg_path(uaid: &str) -> String {
    format!("{FCM}/{uaid}")
}

/// Firefox for Android's whole sequence: register, subscribe (with and
/// without a key, with a channelID of its own), token update, channel
/// list, unsubscribe, unregister.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn firefox_mobile_call_sequence() {
    let b = bridged().await;
    let h = &b.h;
    let r1 = register(h, FCM, json!({"token": "fcm-token-0001", "key": null})).await;
    let uaid = r1["uaid"].as_str().unwrap();
    let first = r1["channelID"].as_str().unwrap().to_string();
    assert!(
        is_hyphenated_uuid(uaid) && is_hyphenated_uuid(&first),
        "{r1}"
    );
    assert_eq!(r1["secret"], secret_under(KEY_A, uaid));
    let ep = r1["endpoint"].as_str().unwrap();
    assert!(ep.starts_with(&format!("{}/wpush/v1/", h.url())), "{ep}");
    let secret = r1["secret"].as_str().unwrap().to_string();
    let s = Some(secret.as_str());

    // Another channel, bound to an application server key.
    let app = AppServer::new();
    let sub = format!("{}/subscription", reg_path(uaid));
    let r = call(
        h,
        "POST",
        &sub,
        s,
        Some(json!({"token": "fcm-token-0001", "key": app.public()})),
    )
    .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let keyed = r.json();
    assert!(
        keyed["endpoint"].as_str().unwrap().contains("/wpush/v2/"),
        "{keyed}"
    );
    let keyed_ch = keyed["channelID"].as_str().unwrap().to_string();
    assert!(is_hyphenated_uuid(&keyed_ch));

    // A channelID of the client's own (the Bearer scheme works too).
    let own = "2bd1ba38-0f4b-4b6f-a0a5-7a1b8e2a0c11";
    let auth = format!("Bearer {secret}");
    let r = http(
        h,
        "POST",
        &sub,
        &[("authorization", &auth)],
        json!({"channelID": own}).to_string().into_bytes(),
    )
    .await
    .unwrap();
    assert_eq!((r.status, r.json()["channelID"].clone()), (200, json!(own)));

    // A new native token.
    let r = call(
        h,
        "PUT",
        &reg_path(uaid),
        s,
        Some(json!({"token": "fcm-token-0002"})),
    )
    .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));

    // The channel list echoes the uaid exactly as sent, in either form.
    let r = call(h, "GET", &reg_path(uaid), s, None).await;
    assert_eq!(r.status, 200);
    let list = r.json();
    assert_eq!(list["uaid"], uaid);
    let all: BTreeSet<String> = [first.clone(), keyed_ch.clone(), own.to_string()].into();
    assert_eq!(channel_set(&list), all);
    let simple = uaid.replace('-', "");
    let r = call(h, "GET", &reg_path(&simple), s, None).await;
    assert_eq!(r.json()["uaid"], simple.as_str());

    // Unsubscribe one; a second time it is gone.
    let del = format!("{sub}/{own}");
    assert_eq!(call(h, "DELETE", &del, s, None).await.status, 200);
    let again = call(h, "DELETE", &del, s, None).await;
    assert_eq!((again.status, again.errno()), (410, 106));
    let list = call(h, "GET", &reg_path(uaid), s, None).await.json();
    assert_eq!(channel_set(&list), [first.clone(), keyed_ch.clone()].into());

    // Unregister: everything goes, and the client is told to start over.
    assert_eq!(
        call(h, "DELETE", &reg_path(uaid), s, None).await.status,
        200
    );
    let gone = call(h, "GET", &reg_path(uaid), s, None).await;
    assert_eq!((gone.status, gone.errno()), (410, 103));
    let push = push(ep, None, &h.url(), &UaKeys::new(), "hi", &[]).await;
    assert_eq!(push.status, 410, "{}", String::from_utf8_lossy(&push.body));

    let ok = metric(
        h,
        "herald_registrations_total{bridge=\"fcm\",op=\"register\",outcome=\"ok\"}",
    )
    .await;
    assert_eq!(ok, 1.0);
    let gone = metric(
        h,
        "herald_registrations_total{bridge=\"fcm\",op=\"get\",outcome=\"gone\"}",
    )
    .await;
    assert_eq!(gone, 1.0);
}

/// Firefox for iOS: APNs with an `aps` override, and `gcm`, FCM's old name,
/// stored as FCM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apns_and_gcm_registrations() {
    let b = bridged().await;
    let h = &b.h;
    let aps = json!({"mutable-content": 1, "alert": {"loc-key": "push"}}).to_string();
    let ios = register(
        h,
        "/v1/apns/firefox-ios/registration",
        json!({"token": "a1b2c3d4e5f60718293a4b5c6d7e8f90", "aps": aps}),
    )
    .await;
    assert_eq!(
        ios["secret"],
        secret_under(KEY_A, ios["uaid"].as_str().unwrap())
    );
    // `aps` must be the text of a JSON object, as Firefox sends it.
    let bad = call(
        h,
        "POST",
        "/v1/apns/firefox-ios/registration",
        None,
        Some(json!({"token": "a1b2c3d4e5f6", "aps": {"badge": 1}})),
    )
    .await;
    assert_eq!((bad.status, bad.errno()), (400, 108));

    let old = register(
        h,
        "/v1/GCM/fenix/registration",
        json!({"token": "gcm-token-0001"}),
    )
    .await;
    let path = format!(
        "/v1/gcm/fenix/registration/{}",
        old["uaid"].as_str().unwrap()
    );
    let list = call(h, "GET", &path, old["secret"].as_str(), None).await;
    assert_eq!(list.status, 200);
    let fcm_ok = "herald_registrations_total{bridge=\"fcm\",op=\"register\",outcome=\"ok\"}";
    assert_eq!(metric(h, fcm_ok).await, 1.0);
    let apns_ok = "herald_registrations_total{bridge=\"apns\",op=\"register\",outcome=\"ok\"}";
    assert_eq!(metric(h, apns_ok).await, 1.0);
}

/// Refusals, each with the status and errno the client expects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_types_apps_uaids_and_wrong_secrets() {
    let b = bridged().await;
    let h = &b.h;
    let body = json!({"token": "fcm-token-0001"});
    for path in [
        "/v1/webpush/fenix/registration",
        "/v1/adm/fenix/registration",
    ] {
        let r = call(h, "POST", path, None, Some(body.clone())).await;
        assert_eq!((r.status, r.errno()), (400, 108), "{path}");
    }
    for path in ["/v1/fcm/focus/registration", "/v1/apns/fenix/registration"] {
        let r = call(h, "POST", path, None, Some(body.clone())).await;
        assert_eq!((r.status, r.errno()), (400, 106), "{path}");
    }
    for bad in [
        json!({"token": "short"}),
        json!({"token": "with space"}),
        json!({}),
    ] {
        let r = call(h, "POST", FCM, None, Some(bad.clone())).await;
        assert_eq!((r.status, r.errno()), (400, 108), "{bad}");
    }
    let big = json!({"token": "x".repeat(9000)});
    let r = call(h, "POST", FCM, None, Some(big)).await;
    assert_eq!((r.status, r.errno()), (413, 104));

    let reg = register(h, FCM, body.clone()).await;
    let uaid = reg["uaid"].as_str().unwrap();
    let path = reg_path(uaid);
    let wrong = secret_under(KEY_B, uaid);
    for (auth, what) in [
        (None, "no header"),
        (Some("webpush".to_string()), "no secret"),
        (
            Some(format!("Basic {}", reg["secret"].as_str().unwrap())),
            "other scheme",
        ),
        (Some(format!("webpush {wrong}")), "wrong secret"),
    ] {
        let mut headers = vec![];
        if let Some(a) = &auth {
            headers.push(("authorization", a.as_str()));
        }
        let r = http(h, "GET", &path, &headers, vec![]).await.unwrap();
        assert_eq!((r.status, r.errno()), (401, 109), "{what}");
    }
    // The secret is checked before the lookup: an unknown uaid with a
    // wrong secret is 401, with its right secret 410/103 (register afresh).
    let stranger = uuid::Uuid::new_v4().to_string();
    let r = call(h, "GET", &reg_path(&stranger), Some(&wrong), None).await;
    assert_eq!((r.status, r.errno()), (401, 109));
    let r = call(
        h,
        "GET",
        &reg_path(&stranger),
        Some(&secret_under(KEY_A, &stranger)),
        None,
    )
    .await;
    assert_eq!((r.status, r.errno()), (410, 103));
    let r = call(h, "GET", &reg_path("not-a-uaid"), Some(&wrong), None).await;
    assert_eq!((r.status, r.errno()), (410, 103));
    // Unknown type on an authorised call.
    let r = call(
        h,
        "GET",
        &format!("/v1/adm/fenix/registration/{uaid}"),
        reg["secret"].as_str(),
        None,
    )
    .await;
    assert_eq!((r.status, r.errno()), (400, 108));
    // A channel that is not the user agent's, or no UUID at all.
    for chid in [uuid::Uuid::new_v4().to_string(), "nope".to_string()] {
        let r = call(
            h,
            "DELETE",
            &format!("{path}/subscription/{chid}"),
            reg["secret"].as_str(),
            None,
        )
        .await;
        assert_eq!((r.status, r.errno()), (410, 106), "{chid}");
    }
    let r = call(h, "PATCH", &path, reg["secret"].as_str(), None).await;
    assert_eq!(r.status, 405);
}

/// A bad application server key is refused before anything is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_key_is_refused_and_nothing_is_stored() {
    let b = bridged_with(
        &format!("bridge_auth_keys = [\"{KEY_A}\"]"),
        &[("HERALD_MAX_CHANNELS_PER_UAID", "2")],
    )
    .await;
    let h = &b.h;
    let not_a_point = herald_proto::b64::encode_b64url(&[4u8; 65]);
    let r = call(
        h,
        "POST",
        FCM,
        None,
        Some(json!({"token": "fcm-token-0001", "key": not_a_point})),
    )
    .await;
    assert_eq!((r.status, r.errno()), (400, 110));
    assert_eq!(
        metric(
            h,
            "herald_registrations_total{bridge=\"fcm\",op=\"register\",outcome=\"ok\"}"
        )
        .await,
        0.0
    );

    let reg = register(h, FCM, json!({"token": "fcm-token-0001"})).await;
    let (uaid, secret) = (reg["uaid"].as_str().unwrap(), reg["secret"].as_str());
    let sub = format!("{}/subscription", reg_path(uaid));
    let chosen = uuid::Uuid::new_v4().to_string();
    let r = call(
        h,
        "POST",
        &sub,
        secret,
        Some(json!({"channelID": chosen, "key": "AAAA"})),
    )
    .await;
    assert_eq!((r.status, r.errno()), (400, 110));
    let list = call(h, "GET", &reg_path(uaid), secret, None).await.json();
    assert_eq!(
        channel_set(&list),
        [reg["channelID"].as_str().unwrap().to_string()].into()
    );

    // max_channels_per_uaid holds here as on the websocket.
    assert_eq!(call(h, "POST", &sub, secret, None).await.status, 200);
    let r = call(h, "POST", &sub, secret, None).await;
    assert_eq!((r.status, r.errno()), (400, 108));
}

/// Keys rotate: secrets made under an older key still verify, new ones are
/// made under the first; autopush-rs's keys verify and never issue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_and_autopush_keys() {
    let mut b = bridged().await;
    let before = register(&b.h, FCM, json!({"token": "fcm-token-0001"})).await;
    let old_uaid = before["uaid"].as_str().unwrap().to_string();
    assert_eq!(before["secret"], secret_under(KEY_A, &old_uaid));

    write_config(
        b.dir.path(),
        &format!("bridge_auth_keys = [\"{KEY_B}\", \"{KEY_A}\"]\nautopush_auth_keys = '[\"{AUTOPUSH_KEY}\"]'"),
    );
    b.h.stop();
    b.h.restart().await;
    let h = &b.h;
    let r = call(
        h,
        "GET",
        &reg_path(&old_uaid),
        before["secret"].as_str(),
        None,
    )
    .await;
    assert_eq!(r.status, 200, "the old key still verifies");

    let after = register(h, FCM, json!({"token": "fcm-token-0002"})).await;
    let uaid = after["uaid"].as_str().unwrap();
    assert_eq!(
        after["secret"],
        secret_under(KEY_B, uaid),
        "the first key issues"
    );
    for key in [KEY_A, AUTOPUSH_KEY] {
        let r = call(
            h,
            "GET",
            &reg_path(uaid),
            Some(&secret_under(key, uaid)),
            None,
        )
        .await;
        assert_eq!(r.status, 200, "a secret under {key} verifies");
    }
    let r = call(
        h,
        "GET",
        &reg_path(uaid),
        Some(&secret_under("some-other-key-0123456789", uaid)),
        None,
    )
    .await;
    assert_eq!(r.status, 401);
}

/// GET proves the device alive: the user agent's expiry restarts from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_channel_list_refreshes_expiry() {
    // Expiry is counted in whole seconds: 3 s between calls stays inside
    // 5 s however the seconds fall, two of them (6 s) would not.
    let b = bridged_with(
        &format!("bridge_auth_keys = [\"{KEY_A}\"]"),
        &[("HERALD_UA_EXPIRY", "5s")],
    )
    .await;
    let h = &b.h;
    let reg = register(h, FCM, json!({"token": "fcm-token-0001"})).await;
    let (path, secret) = (
        reg_path(reg["uaid"].as_str().unwrap()),
        reg["secret"].as_str(),
    );
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_millis(3000)).await;
        assert_eq!(call(h, "GET", &path, secret, None).await.status, 200);
    }
    tokio::time::sleep(Duration::from_millis(6500)).await;
    let r = call(h, "GET", &path, secret, None).await;
    assert_eq!((r.status, r.errno()), (410, 103));
}

/// A bridged channel's endpoint is an ordinary endpoint: VAPID binding
/// holds, and a push is accepted (201) and stored (so it can be cancelled).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_to_a_bridged_channel_is_accepted_and_stored() {
    let b = bridged().await;
    let h = &b.h;
    let app = AppServer::new();
    let reg = register(
        h,
        FCM,
        json!({"token": "fcm-token-0001", "key": app.public()}),
    )
    .await;
    let ep = reg["endpoint"].as_str().unwrap();
    let keys = UaKeys::new();
    let unsigned = push(ep, None, &h.url(), &keys, "hi", &[]).await;
    assert_eq!(unsigned.status, 401, "a key-bound endpoint needs VAPID");
    let r = push(
        ep,
        Some(&app),
        &h.url(),
        &keys,
        "hello phone",
        &[("urgency", "high")],
    )
    .await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let location = r.header("location").unwrap();
    let cancel = request("DELETE", &location, &[], vec![]).await.unwrap();
    assert_eq!(cancel.status, 204, "the message was stored");
}

/// Bad bridge settings stop Herald at start with a message naming them.
#[test]
fn bad_bridge_settings_stop_herald_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let (sa, _) = bridge_files(dir.path());
    let keys = format!("bridge_auth_keys = [\"{KEY_A}\"]\n");
    let fcm = "[bridges.fcm.fenix]\nproject_id = \"p\"\n";
    let cases = [
        (
            format!(
                "{keys}{fcm}credentials = \"{}/missing.json\"\n",
                dir.path().display()
            ),
            "bridges.fcm.fenix.credentials",
        ),
        (
            format!(
                "{keys}{fcm}credentials = \"{}\"\ncolour = \"blue\"\n",
                sa.display()
            ),
            "bridges.fcm.fenix.colour",
        ),
        (
            format!("{keys}[bridges.apns.ios]\ntopic = \"t\"\n"),
            "bridges.apns.ios.team_id",
        ),
        (
            format!("{fcm}credentials = \"{}\"\n", sa.display()),
            "bridge_auth_keys",
        ),
    ];
    for (i, (text, named)) in cases.iter().enumerate() {
        let file = dir.path().join(format!("bad{i}.toml"));
        std::fs::write(&file, text).unwrap();
        let data = dir.path().join(format!("data{i}"));
        let (code, stderr) = serve_refused(
            &[
                "--config",
                file.to_str().unwrap(),
                "--data-dir",
                data.to_str().unwrap(),
                "--listen",
                "127.0.0.1:0",
            ],
            &[],
        );
        assert_eq!(code, Some(2), "{named}: {stderr}");
        assert!(stderr.contains(&format!("`{named}`")), "{named}: {stderr}");
    }
}

/// `require_vapid_key` on the registration API: a new registration or
/// subscription without `key` is 400 errno 128 and stores nothing; with a
/// key both work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_vapid_key_refuses_registrations_without_key() {
    let b = bridged_with(
        &format!("bridge_auth_keys = [\"{KEY_A}\"]\nrequire_vapid_key = true"),
        &[],
    )
    .await;
    let h = &b.h;
    let refused = "herald_policy_refusals_total{reason=\"vapid_required\"} ";
    let r = call(
        h,
        "POST",
        FCM,
        None,
        Some(json!({"token": "fcm-token-0001"})),
    )
    .await;
    assert_eq!((r.status, r.errno()), (400, 128), "{}", r.json());
    assert!(r.json()["message"].as_str().unwrap().contains("key"));
    assert_eq!(metric(h, refused).await, 1.0);
    assert_eq!(
        metric(
            h,
            "herald_registrations_total{bridge=\"fcm\",op=\"register\",outcome=\"ok\"}"
        )
        .await,
        0.0
    );

    let key = AppServer::new().public();
    let reg = register(h, FCM, json!({"token": "fcm-token-0001", "key": key})).await;
    let (uaid, secret) = (reg["uaid"].as_str().unwrap(), reg["secret"].as_str());
    let sub = format!("{}/subscription", reg_path(uaid));
    let r = call(h, "POST", &sub, secret, Some(json!({}))).await;
    assert_eq!((r.status, r.errno()), (400, 128));
    assert_eq!(metric(h, refused).await, 2.0);
    let r = call(h, "POST", &sub, secret, Some(json!({"key": key}))).await;
    assert_eq!(r.status, 200, "{}", r.json());
    let list = call(h, "GET", &reg_path(uaid), secret, None).await.json();
    assert_eq!(channel_set(&list).len(), 2, "{list}");
}

/// Private mode on the registration API: a new registration needs
/// `Authorization: Bearer <token>` (401 errno 109 otherwise); the calls
/// after it use the secret it hands out, as always.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_mode_registration_needs_a_bearer_token() {
    const TOKEN: &str = "private-mode-token-0123456789";
    let b = bridged_with(
        &format!("bridge_auth_keys = [\"{KEY_A}\"]\nuser_agent_tokens = [\"{TOKEN}\"]"),
        &[],
    )
    .await;
    let h = &b.h;
    let refused = "herald_policy_refusals_total{reason=\"user_agent_token\"} ";
    let body = json!({"token": "fcm-token-0001"}).to_string().into_bytes();
    let with = |auth: Option<String>| {
        let body = body.clone();
        async move {
            let mut headers = vec![("content-type", "application/json")];
            if let Some(a) = &auth {
                headers.push(("authorization", a.as_str()));
            }
            http(h, "POST", FCM, &headers, body).await.unwrap()
        }
    };
    for (n, auth) in [
        None,
        Some(format!("Bearer {TOKEN}x")),
        // The registration API's other scheme is for secrets, not tokens.
        Some(format!("webpush {TOKEN}")),
    ]
    .into_iter()
    .enumerate()
    {
        let r = with(auth.clone()).await;
        assert_eq!((r.status, r.errno()), (401, 109), "{auth:?}");
        assert_eq!(metric(h, refused).await, (n + 1) as f64);
    }
    let r = with(Some(format!("Bearer {TOKEN}"))).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let reg = r.json();
    let (uaid, secret) = (reg["uaid"].as_str().unwrap(), reg["secret"].as_str());
    let sub = format!("{}/subscription", reg_path(uaid));
    assert_eq!(call(h, "POST", &sub, secret, None).await.status, 200);
    let list = call(h, "GET", &reg_path(uaid), secret, None).await;
    assert_eq!(list.status, 200);
    assert_eq!(channel_set(&list.json()).len(), 2);
    assert_eq!(metric(h, refused).await, 3.0);
}
