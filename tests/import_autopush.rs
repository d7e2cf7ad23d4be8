//! `herald import autopush`: autopush-rs's storage, written in its exact
//! layouts by tests/support/autopush.rs into a real Redis, a real
//! PostgreSQL (tests/support/postgres.rs) or a JSON-lines export, imported
//! by the `herald` binary, then checked through a websocket user agent that
//! says hello with its old uaid.

#[path = "support/autopush.rs"]
mod autopush;
mod common;
#[path = "support/fcm_mock.rs"]
mod fcm_mock;
#[path = "support/postgres.rs"]
mod postgres;

use autopush::{Msg, UserAgent};
use common::redis::{shared_cluster, RedisServer};
use common::*;
use serde_json::json;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};
use uuid::Uuid;

const LEDGER: &str = "autopush-import.ledger";

/// `herald import autopush --from FROM EXTRA…` into `h`'s data_dir and
/// settings.
fn import(h: &Herald, from: &str, extra: &[&str]) -> Output {
    import_cmd(h, from, extra)
        .output()
        .expect("herald import runs")
}

fn import_cmd(h: &Herald, from: &str, extra: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_herald"));
    cmd.args(["import", "autopush", "--from", from, "--data-dir"])
        .arg(&h.data_dir)
        .args(&h.args)
        .args(extra)
        .envs(h.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    cmd
}

/// The import's summary; panics with its stderr unless it succeeded.
fn imported(out: &Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "import failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The import's exit code and stderr; panics if it succeeded.
fn refused(out: &Output) -> (Option<i32>, String) {
    assert!(
        !out.status.success(),
        "import should have failed:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn has(summary: &str, line: &str) {
    assert!(
        summary.lines().any(|l| l.trim() == line),
        "no line {line:?} in:\n{summary}"
    );
}

/// Receives notifications until none comes for `quiet`, acking each when
/// `ack`; returns their payloads.
async fn drain(ua: &mut Ua, keys: &UaKeys, quiet: Duration, ack: bool) -> Vec<String> {
    let mut got = vec![];
    while let Some(n) = ua.try_recv(quiet).await {
        assert_eq!(n["messageType"], "notification", "{n}");
        got.push(payload(keys, &n));
        if ack {
            ua.ack(&n).await;
        }
    }
    got
}

/// An aesgcm (draft) message as autopush stores one: headers `encoding`,
/// `encryption`, `crypto_key`.
fn legacy(keys: &UaKeys, channel: Uuid, ms: u64, text: &str) -> Msg {
    let l = LegacyAesgcm::encrypt(&keys.public, &keys.auth, text.as_bytes());
    Msg {
        headers: vec![
            ("encoding".into(), "aesgcm".into()),
            ("encryption".into(), l.encryption),
            ("crypto_key".into(), l.crypto_key),
        ],
        ..Msg::timed(channel, ms, 86400, l.body)
    }
}

/// The plaintext of a notification in either coding, which also proves its
/// headers arrived intact.
fn open(keys: &UaKeys, n: &serde_json::Value) -> String {
    if n["headers"]["encoding"] == "aes128gcm" {
        return payload(keys, n);
    }
    assert_eq!(n["headers"]["encoding"], "aesgcm", "{n}");
    let param = |h: &str, name: &str| -> Vec<u8> {
        let v = n["headers"][h].as_str().unwrap();
        let v = v.split(';').find_map(|p| p.strip_prefix(name)).unwrap();
        unb64(v)
    };
    let block = ece::legacy::AesGcmEncryptedBlock::new(
        &param("crypto_key", "dh="),
        &param("encryption", "salt="),
        4096,
        unb64(n["data"].as_str().unwrap()),
    )
    .unwrap();
    let plain = ece::legacy::decrypt_aesgcm(&keys.components, &keys.auth, &block).unwrap();
    String::from_utf8(plain).unwrap()
}

/// A user agent last seen an hour ago with two channels and, around its
/// read pointer (10 minutes ago), one message delivered before, one that
/// expired, and four pending: "one", "two" (topic "scores"), "three",
/// "four" (aesgcm).
fn desktop(keys: &UaKeys, t: u64) -> (UserAgent, Uuid, Uuid) {
    let (c1, c2) = (Uuid::new_v4(), Uuid::new_v4());
    let mut ua = UserAgent::webpush((t - 3600) * 1000);
    ua.channels = vec![c1, c2];
    ua.pointer = Some(t - 600);
    ua.messages = vec![
        Msg::timed(c1, (t - 900) * 1000, 86400, encrypt(keys, b"acked before")),
        Msg::timed(c1, (t - 500) * 1000, 60, encrypt(keys, b"expired")),
        Msg::timed(c1, (t - 300) * 1000 + 7, 86400, encrypt(keys, b"one")),
        Msg::topical(c2, t - 200, 86400, "scores", encrypt(keys, b"two")),
        Msg::timed(c1, (t - 100) * 1000, 86400, encrypt(keys, b"three")),
        legacy(keys, c2, (t - 50) * 1000, "four"),
    ];
    (ua, c1, c2)
}

/// The route stored for `uaid` in a stopped Herald's RocksDB.
async fn stored_route(h: &Herald, uaid: Uuid) -> Option<herald::store::BridgeRoute> {
    use herald::store::Store;
    let store = herald::store::RocksStore::open(&h.data_dir.join("db"), false, None).unwrap();
    let uaid = herald_proto::ids::Uaid(*uaid.as_bytes());
    let user = store.get_user(&uaid).await.unwrap().expect("user imported");
    user.router
}

async fn stopped_herald() -> Herald {
    let mut h = Herald::start().await;
    h.stop();
    h
}

/// Hello with the old uaid: the same uaid back, then the pending messages
/// in order with their payload headers; acks them and unsubscribes `c1`.
async fn takes_over(h: &Herald, ua: &UserAgent, keys: &UaKeys, c1: Uuid, want: &[&str]) {
    let mut ws = Ua::connect(h).await;
    let ids: Vec<String> = ua
        .channels
        .iter()
        .map(|c| c.hyphenated().to_string())
        .collect();
    ws.send(json!({"messageType": "hello", "uaid": ua.hex(), "channelIDs": ids, "use_webpush": true, "broadcasts": {}}))
        .await;
    let r = ws.recv().await;
    assert_eq!(
        (r["messageType"].as_str(), r["status"].as_u64()),
        (Some("hello"), Some(200)),
        "{r}"
    );
    assert_eq!(r["uaid"], ua.hex(), "the browser keeps its uaid");
    let mut got = vec![];
    for _ in want {
        let n = ws.notification().await;
        got.push(open(keys, &n));
        ws.ack(&n).await;
    }
    assert_eq!(got, want);
    assert_eq!(ws.try_recv(Duration::from_millis(500)).await, None);
    ws.send(json!({"messageType": "unregister", "channelID": c1.hyphenated().to_string()}))
        .await;
    let r = ws.recv().await;
    assert_eq!(
        (r["messageType"].as_str(), r["status"].as_u64()),
        (Some("unregister"), Some(200)),
        "{r}"
    );
}

#[tokio::test]
async fn redis_import_keeps_uaids_channels_and_pending_messages() {
    let redis = RedisServer::start();
    let keys = UaKeys::new();
    let t = now();
    let (ua, c1, _) = desktop(&keys, t);
    let mut fcm = UserAgent::bridged(
        "fcm",
        json!({"token": "fcm-registration-token", "app_id": "fenix"}),
        // Registered long ago: a bridged user agent is not expired by it.
        (t - 200 * 86400) * 1000,
    );
    fcm.channels = vec![Uuid::new_v4()];
    let gcm = UserAgent::bridged("gcm", json!({"token": "gcm-token-1"}), t * 1000);
    let mut conn = redis.client();
    autopush::write_redis(&mut conn, &[ua.clone(), fcm.clone(), gcm], false);
    // A user agent autopush has forgotten: its user key expired, its list stayed.
    let _: () = ::redis::cmd("RPUSH")
        .arg(format!("autopush/channels/{}", Uuid::new_v4()))
        .arg(Uuid::new_v4().to_string())
        .query(&mut conn)
        .unwrap();

    let mut h = stopped_herald().await;
    let summary = imported(&import(&h, redis.url(), &[]));
    has(&summary, "user agents: 2 imported, 0 already imported");
    has(&summary, "channels: 3 imported, 0 already imported");
    has(&summary, "messages: 4 imported, 0 already imported");
    has(&summary, "skipped: 4");
    has(&summary, "messages (delivered before the import): 1");
    has(&summary, "messages (expired): 1");
    has(
        &summary,
        "user agents (gcm router (autopush drops it on the next push)): 1",
    );
    has(
        &summary,
        "user agents (no user record (already expired in autopush)): 1",
    );
    assert!(h.data_dir.join(LEDGER).exists());
    let route = stored_route(&h, fcm.uaid).await.expect("a bridged route");
    assert_eq!(
        (
            route.kind,
            route.app_id.as_str(),
            route.token.as_str(),
            route.aps
        ),
        (
            herald::store::BridgeKind::Fcm,
            "fenix",
            "fcm-registration-token",
            None
        )
    );
    assert_eq!(stored_route(&h, ua.uaid).await, None);

    h.restart().await;
    takes_over(&h, &ua, &keys, c1, &["one", "two", "three", "four"]).await;

    // Running it again changes nothing: acked messages and the dropped
    // subscription stay gone.
    h.stop();
    let again = imported(&import(&h, redis.url(), &[]));
    has(&again, "user agents: 0 imported, 2 already imported");
    has(&again, "channels: 0 imported, 3 already imported");
    has(&again, "messages: 0 imported, 4 already imported");
    h.restart().await;
    let mut ws = Ua::hello(&h, Some(&ua.hex())).await;
    assert_eq!(ws.uaid, ua.hex());
    assert_eq!(ws.try_recv(Duration::from_millis(800)).await, None);
}

#[tokio::test]
async fn redis_message_json_of_older_autopush_gets_its_ttl_and_topic_back() {
    let redis = RedisServer::start();
    let keys = UaKeys::new();
    let t = now();
    let c = Uuid::new_v4();
    let mut ua = UserAgent::webpush((t - 60) * 1000);
    ua.channels = vec![c];
    ua.messages = vec![
        Msg::topical(c, t - 30, 3600, "news", encrypt(&keys, b"topical")),
        Msg::timed(c, (t - 20) * 1000, 7200, encrypt(&keys, b"timed")),
    ];
    autopush::write_redis(&mut redis.client(), std::slice::from_ref(&ua), true);
    let mut h = stopped_herald().await;
    has(
        &imported(&import(&h, redis.url(), &[])),
        "messages: 2 imported, 0 already imported",
    );
    h.restart().await;
    let mut ws = Ua::hello(&h, Some(&ua.hex())).await;
    let a = ws.notification().await;
    let b = ws.notification().await;
    assert_eq!(
        (payload(&keys, &a), payload(&keys, &b)),
        (String::from("topical"), String::from("timed"))
    );
    // Recovered from the expiry zset (save time + ttl).
    assert_eq!(
        (a["ttl"].as_u64(), b["ttl"].as_u64()),
        (Some(3600), Some(7200)),
        "{a} {b}"
    );
}

#[tokio::test]
async fn postgres_import_keeps_uaids_channels_and_pending_messages() {
    let pg = postgres::Postgres::start().await;
    let client = pg.connect().await.unwrap();
    client
        .batch_execute(&autopush::postgres_ddl(Some("autopush")))
        .await
        .unwrap();
    let keys = UaKeys::new();
    let t = now();
    // Unlike Redis, Postgres keeps the expired row until autopush's next
    // read; the import skips it as expired.
    let (ua, c1, _) = desktop(&keys, t);
    let mut apns = UserAgent::bridged(
        "apns",
        json!({"token": "apns-device-token", "rel_channel": "firefox", "aps": "{\"mutable-content\":1}"}),
        t * 1000,
    );
    apns.channels = vec![Uuid::new_v4(), Uuid::new_v4()];
    autopush::write_postgres(&client, Some("autopush"), &[ua.clone(), apns.clone()]).await;

    let mut h = stopped_herald().await;
    let url = pg.url();
    // autopush's tables are not in the default schema.
    let (code, err) = refused(&import(&h, &url, &[]));
    assert_eq!(code, Some(1));
    assert!(err.contains("no table router"), "{err}");

    let summary = imported(&import(&h, &url, &["--pg-schema", "autopush"]));
    has(&summary, "user agents: 2 imported, 0 already imported");
    has(&summary, "channels: 4 imported, 0 already imported");
    has(&summary, "messages: 4 imported, 0 already imported");
    has(&summary, "messages (delivered before the import): 1");
    has(&summary, "messages (expired): 1");
    let route = stored_route(&h, apns.uaid).await.expect("a bridged route");
    assert_eq!(
        (
            route.kind,
            route.app_id.as_str(),
            route.token.as_str(),
            route.aps.as_deref()
        ),
        (
            herald::store::BridgeKind::Apns,
            "firefox",
            "apns-device-token",
            Some("{\"mutable-content\":1}")
        )
    );
    h.restart().await;
    takes_over(&h, &ua, &keys, c1, &["one", "two", "three", "four"]).await;
    h.stop();
    let again = imported(&import(&h, &url, &["--pg-schema", "autopush"]));
    has(&again, "messages: 0 imported, 4 already imported");
}

#[tokio::test]
async fn postgres_table_without_an_autopush_column_is_named() {
    let pg = postgres::Postgres::start().await;
    let client = pg.connect().await.unwrap();
    client
        .batch_execute(&autopush::postgres_ddl(None))
        .await
        .unwrap();
    client
        .batch_execute("ALTER TABLE message DROP COLUMN sortkey_timestamp")
        .await
        .unwrap();
    let h = stopped_herald().await;
    let (code, err) = refused(&import(&h, &pg.url(), &[]));
    assert_eq!(code, Some(1));
    assert!(
        err.contains("table message") && err.contains("sortkey_timestamp"),
        "{err}"
    );
}

#[tokio::test]
async fn jsonl_import_then_topic_replacement_and_ttl_expiry() {
    let keys = UaKeys::new();
    let t = now();
    let c = Uuid::new_v4();
    let mut ua = UserAgent::webpush((t - 60) * 1000);
    ua.channels = vec![c];
    ua.messages = vec![
        Msg::topical(c, t - 100, 3600, "scores", encrypt(&keys, b"old score")),
        // Expires 3 s from now.
        Msg::timed(c, (t - 58) * 1000, 61, encrypt(&keys, b"short-lived")),
        Msg::timed(c, (t - 50) * 1000, 3600, encrypt(&keys, b"kept")),
        Msg::timed(c, (t - 7200) * 1000, 60, encrypt(&keys, b"long gone")),
    ];
    let gcm = UserAgent::bridged("gcm", json!({"token": "gcm-token-1"}), t * 1000);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("export.jsonl");
    std::fs::write(&file, format!("{}\n\n{}\n", ua.jsonl(), gcm.jsonl())).unwrap();

    let mut h = stopped_herald().await;
    let summary = imported(&import(&h, file.to_str().unwrap(), &[]));
    has(&summary, "user agents: 1 imported, 0 already imported");
    has(&summary, "messages: 3 imported, 0 already imported");
    has(&summary, "messages (expired): 1");
    h.restart().await;
    while now() <= t + 3 {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut ws = Ua::hello(&h, Some(&ua.hex())).await;
    let got = drain(&mut ws, &keys, Duration::from_millis(800), false).await;
    assert_eq!(
        got,
        ["old score", "kept"],
        "the expired message is not delivered"
    );
    // Registering the imported channel again hands out Herald's endpoint.
    let r = ws.register(&c.hyphenated().to_string(), None).await;
    assert_eq!(r["status"], 200, "{r}");
    let endpoint = r["pushEndpoint"].as_str().unwrap().to_string();
    drop(ws);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let r = push(
        &endpoint,
        None,
        &h.url(),
        &keys,
        "new score",
        &[("topic", "scores")],
    )
    .await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let mut ws = Ua::hello(&h, Some(&ua.hex())).await;
    let got = drain(&mut ws, &keys, Duration::from_millis(800), true).await;
    assert_eq!(
        got,
        ["kept", "new score"],
        "the imported topic message was replaced"
    );
}

#[tokio::test]
async fn records_it_does_not_understand_are_named() {
    let redis = RedisServer::start();
    let mut conn = redis.client();
    let _: () = ::redis::cmd("SET")
        .arg("autopush/frobs/1")
        .arg("x")
        .query(&mut conn)
        .unwrap();
    let h = stopped_herald().await;
    let (code, err) = refused(&import(&h, redis.url(), &[]));
    assert_eq!(code, Some(1));
    assert!(
        err.contains("unknown autopush Redis key \"autopush/frobs/1\""),
        "{err}"
    );

    let _: () = ::redis::cmd("DEL")
        .arg("autopush/frobs/1")
        .query(&mut conn)
        .unwrap();
    let odd = UserAgent::bridged("carrier-pigeon", json!({"token": "coo"}), now() * 1000);
    autopush::write_redis(&mut conn, std::slice::from_ref(&odd), false);
    let (_, err) = refused(&import(&h, redis.url(), &[]));
    let key = format!("autopush/user/{}", odd.uaid.hyphenated());
    assert!(
        err.contains(&key) && err.contains("carrier-pigeon"),
        "{err}"
    );

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("export.jsonl");
    let good = UserAgent::webpush(now() * 1000);
    std::fs::write(&file, format!("{}\n{{\"uaid\":\"nope\"}}\n", good.jsonl())).unwrap();
    let (_, err) = refused(&import(&h, file.to_str().unwrap(), &[]));
    assert!(err.contains("export.jsonl line 2"), "{err}");

    let (code, err) = refused(&import(&h, "grpc://bigtable.example", &[]));
    assert_eq!(code, Some(2));
    assert!(err.contains("grpc://bigtable.example"), "{err}");
}

#[tokio::test]
async fn a_running_herald_on_rocksdb_is_not_written_behind_its_back() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("export.jsonl");
    let ua = UserAgent::webpush(now() * 1000);
    std::fs::write(&file, format!("{}\n", ua.jsonl())).unwrap();
    let h = Herald::start().await;
    let (code, err) = refused(&import(&h, file.to_str().unwrap(), &[]));
    assert_eq!(code, Some(1));
    assert!(
        err.contains("already in use by another herald process"),
        "{err}"
    );
    assert!(!h.data_dir.join(LEDGER).exists());
}

#[tokio::test]
async fn dry_run_counts_and_writes_nothing() {
    let redis = RedisServer::start();
    let keys = UaKeys::new();
    let (ua, _, _) = desktop(&keys, now());
    autopush::write_redis(&mut redis.client(), std::slice::from_ref(&ua), false);
    let mut h = stopped_herald().await;
    let summary = imported(&import(&h, redis.url(), &["--dry-run"]));
    has(&summary, "dry run: nothing was written");
    has(&summary, "user agents: 1 to import, 0 already imported");
    has(&summary, "messages: 4 to import, 0 already imported");
    assert!(!h.data_dir.join(LEDGER).exists());
    h.restart().await;
    let ws = Ua::hello(&h, Some(&ua.hex())).await;
    assert_ne!(ws.uaid, ua.hex(), "nothing was imported");
}

#[tokio::test]
async fn an_interrupted_import_resumes_where_it_stopped() {
    const N: usize = 3000;
    let redis = RedisServer::start();
    let keys = UaKeys::new();
    let t = now();
    let uas: Vec<UserAgent> = (0..N)
        .map(|i| {
            let c = Uuid::new_v4();
            let mut ua = UserAgent::webpush((t - 60) * 1000);
            ua.channels = vec![c];
            ua.messages = vec![Msg::timed(
                c,
                (t - 30) * 1000 + i as u64,
                3600,
                encrypt(&keys, b"hello"),
            )];
            ua
        })
        .collect();
    for chunk in uas.chunks(500) {
        autopush::write_redis(&mut redis.client(), chunk, false);
    }
    let mut h = stopped_herald().await;
    let ledger = h.data_dir.join(LEDGER);
    let mut child = import_cmd(&h, redis.url(), &[])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let done = std::fs::read_to_string(&ledger)
            .map(|s| s.lines().filter(|l| l.starts_with("u ")).count())
            .unwrap_or(0);
        if done >= 100 {
            break;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the import ended before it could be interrupted"
        );
        assert!(Instant::now() < deadline, "the import made no progress");
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();

    let summary = imported(&import(&h, redis.url(), &[]));
    let counts = |what: &str| -> (usize, usize) {
        let line = summary
            .lines()
            .find(|l| l.starts_with(&format!("{what}: ")))
            .unwrap_or_else(|| panic!("{summary}"));
        let nums: Vec<usize> = line
            .split(|c: char| !c.is_ascii_digit())
            .filter_map(|s| s.parse().ok())
            .collect();
        (nums[0], nums[1])
    };
    let (new, already) = counts("user agents");
    assert!(already >= 100 && new > 0 && new + already == N, "{summary}");
    let (new, already) = counts("messages");
    assert!(already >= 99 && new + already == N, "{summary}");

    h.restart().await;
    let mut sorted = uas.clone();
    sorted.sort_by_key(|u| u.uaid);
    for ua in [&sorted[0], &sorted[N / 2], &sorted[N - 1]] {
        let mut ws = Ua::hello(&h, Some(&ua.hex())).await;
        assert_eq!(ws.uaid, ua.hex());
        let got = drain(&mut ws, &keys, Duration::from_millis(500), true).await;
        assert_eq!(got, ["hello"], "each message exactly once");
    }
}

#[tokio::test]
async fn import_into_a_redis_cluster_store_while_herald_runs() {
    let cluster = shared_cluster();
    let keys = UaKeys::new();
    let (ua, c1, _) = desktop(&keys, now());
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("export.jsonl");
    std::fs::write(&file, format!("{}\n", ua.jsonl())).unwrap();
    let key = b64(&rand::random::<[u8; 32]>());
    let h = Herald::start_with(
        &[],
        &[
            ("HERALD_STORE", "redis"),
            ("HERALD_REDIS_URL", cluster.url()),
            ("HERALD_ENDPOINT_KEYS", &key),
        ],
    )
    .await;
    // The JSON-lines export holds only pending messages; the one autopush
    // had delivered is dropped here as the exporter would.
    let summary = imported(&import(&h, file.to_str().unwrap(), &[]));
    has(&summary, "user agents: 1 imported, 0 already imported");
    has(&summary, "messages: 5 imported, 0 already imported");
    has(&summary, "messages (expired): 1");
    takes_over(
        &h,
        &ua,
        &keys,
        c1,
        &["acked before", "one", "two", "three", "four"],
    )
    .await;
}

/// The whole take-over for one browser: its endpoints were sealed by
/// autopush-rs (minted here by Python's Fernet), its record comes from
/// autopush-rs's Redis. autopush-rs stored no key with a channel, so the
/// v2 endpoint's binding lives only in its token: Herald holds senders to
/// it all the same.
#[tokio::test]
async fn autopush_endpoints_deliver_after_the_import_with_their_key_binding() {
    use common::fernet::{autopush_token, fernet_key};
    let redis = RedisServer::start();
    let keys = UaKeys::new();
    let (app, stranger) = (AppServer::new(), AppServer::new());
    let mut ua = UserAgent::webpush((now() - 60) * 1000);
    let (plain, bound) = (Uuid::new_v4(), Uuid::new_v4());
    ua.channels = vec![plain, bound];
    autopush::write_redis(&mut redis.client(), std::slice::from_ref(&ua), false);

    let fernet = fernet_key();
    let mut h = Herald::start_with(&[], &[("HERALD_AUTOPUSH_CRYPTO_KEYS", &fernet)]).await;
    h.stop();
    imported(&import(&h, redis.url(), &[]));
    h.restart().await;

    let mut ws = Ua::hello(&h, Some(&ua.hex())).await;
    assert_eq!(ws.uaid, ua.hex());
    let chid = |c: Uuid| c.hyphenated().to_string();
    let v1 = format!(
        "{}/wpush/v1/{}",
        h.url(),
        autopush_token(&fernet, &ua.hex(), &chid(plain), None)
    );
    let v2 = format!(
        "{}/wpush/v2/{}",
        h.url(),
        autopush_token(&fernet, &ua.hex(), &chid(bound), Some(&app.public()))
    );
    for (endpoint, sender, text) in [(&v1, None, "by v1"), (&v2, Some(&app), "by v2")] {
        let r = push(endpoint, sender, &h.url(), &keys, text, &[]).await;
        assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
        let n = ws.notification().await;
        assert_eq!(payload(&keys, &n), text);
        ws.ack(&n).await;
    }
    // The key the token names, and no other (nor none), may push to it.
    let r = push(&v2, Some(&stranger), &h.url(), &keys, "x", &[]).await;
    assert_eq!((r.status, r.errno()), (403, 115));
    let r = push(&v2, None, &h.url(), &keys, "x", &[]).await;
    assert_eq!((r.status, r.errno()), (401, 109));
    assert_eq!(ws.try_recv(Duration::from_millis(300)).await, None);

    // Unsubscribed through the websocket: its autopush endpoint is gone too.
    ws.send(json!({"messageType": "unregister", "channelID": chid(bound)}))
        .await;
    assert_eq!(ws.recv().await["status"], 200);
    let r = push(&v2, Some(&app), &h.url(), &keys, "x", &[]).await;
    assert_eq!((r.status, r.errno()), (410, 106));
}

/// autopush-rs's registration secret for `uaid`, made by Python's own
/// hmac (not Herald's code): hex HMAC-SHA256 of the 32-hex uaid keyed by
/// the AUTH_KEYS string as written.
fn autopush_secret(auth_key: &str, uaid: &str) -> String {
    let out = Command::new("/usr/bin/python3")
        .args([
            "-c",
            "import hashlib, hmac, sys; print(hmac.new(sys.argv[1].encode(), sys.argv[2].encode(), hashlib.sha256).hexdigest(), end='')",
            auth_key,
            uaid,
        ])
        .output()
        .expect("python3 runs");
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()
}

/// A phone that registered with autopush-rs's FCM bridge: after the
/// import it keeps its uaid and the secret autopush gave it, and a push to
/// the endpoint autopush handed its site reaches its device token.
#[tokio::test]
async fn an_imported_phone_keeps_its_secret_and_is_reached_through_fcm() {
    use common::bridges::{fcm_table, Bridged};
    use common::fernet::{autopush_token, fernet_key};
    let redis = RedisServer::start();
    let fcm = fcm_mock::FcmMock::start();
    let mut phone = UserAgent::bridged(
        "fcm",
        json!({"token": "fcm-device-token-1", "app_id": "fenix"}),
        (now() - 30 * 86400) * 1000,
    );
    let chid = Uuid::new_v4();
    phone.channels = vec![chid];
    autopush::write_redis(&mut redis.client(), std::slice::from_ref(&phone), false);

    let (fernet, auth_key) = (fernet_key(), "autopush-auth-key-of-the-old-service");
    let table = fcm_table(
        "fenix",
        fcm.project_id(),
        &fcm.credentials_path(),
        &fcm.url(),
    );
    let env = [
        ("HERALD_AUTOPUSH_CRYPTO_KEYS", fernet.as_str()),
        ("HERALD_AUTOPUSH_AUTH_KEYS", auth_key),
    ];
    let mut b = Bridged::start(&[table], &[], &env).await;
    b.h.stop();
    imported(&import(&b.h, redis.url(), &[]));
    b.h.restart().await;

    // The daily check of Firefox for Android, with the secret autopush gave.
    let path = format!("/v1/fcm/fenix/registration/{}", phone.hex());
    let auth = format!("webpush {}", autopush_secret(auth_key, &phone.hex()));
    let r = http(&b.h, "GET", &path, &[("authorization", &auth)], vec![])
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(
        r.json()["channelIDs"],
        json!([chid.hyphenated().to_string()])
    );
    let wrong = format!("webpush {}", autopush_secret("another-key", &phone.hex()));
    let r = http(&b.h, "GET", &path, &[("authorization", &wrong)], vec![])
        .await
        .unwrap();
    assert_eq!((r.status, r.errno()), (401, 109));

    let token = autopush_token(&fernet, &phone.hex(), &chid.hyphenated().to_string(), None);
    let endpoint = format!("{}/wpush/v1/{token}", b.h.url());
    let keys = UaKeys::new();
    let r = push(&endpoint, None, &b.h.url(), &keys, "to the phone", &[]).await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let deadline = Instant::now() + Duration::from_secs(10);
    while fcm.requests().is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let sent = fcm.requests();
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!(sent[0].body["message"]["token"], "fcm-device-token-1");
    assert_eq!(sent[0].data()["chid"], chid.hyphenated().to_string());
}
