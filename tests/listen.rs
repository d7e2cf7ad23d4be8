//! `herald listen` and the client library against a real Herald process:
//! subscriptions made by the client, pushes sent by `herald send` and by an
//! independent sender (the `ece` crate, VAPID signed by `jsonwebtoken`),
//! plaintext read from the listener's output. Every process started here is
//! killed when its guard drops, and every wait is bounded.

mod common;

use common::listen::*;
use common::*;
use herald_client::{Client, ClientOptions, Event, StateFile};
use serde_json::Value;
use std::path::Path;
use std::time::{Duration, Instant};

/// `herald send` to a subscription; returns the first line of its output.
async fn send(sub: &Value, extra: &[&str]) -> String {
    let mut args = strings(&["send", "--subscription", &sub.to_string()]);
    args.extend(strings(extra));
    let out = herald(args).await;
    assert!(
        out.status.success(),
        "herald send: {}{}",
        stdout(&out),
        stderr(&out)
    );
    stdout(&out)
}

async fn acked(h: &Herald) -> u64 {
    metrics_text(h)
        .await
        .lines()
        .find_map(|l| l.strip_prefix("herald_messages_acked_total "))
        .map(|v| v.trim().parse::<f64>().unwrap() as u64)
        .unwrap_or(0)
}

/// Waits until Herald has counted `n` acks in all.
async fn wait_acked(h: &Herald, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let seen = acked(h).await;
        if seen == n {
            return;
        }
        assert!(
            seen < n,
            "{seen} acks, expected {n}: something was acknowledged twice"
        );
        assert!(Instant::now() < deadline, "only {seen} of {n} acks arrived");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// POSTs a raw push body with the given headers.
async fn post(endpoint: &str, headers: &[(&str, &str)], body: Vec<u8>) -> Resp {
    let mut all = vec![("ttl", "60")];
    all.extend_from_slice(headers);
    request("POST", endpoint, &all, body)
        .await
        .expect("push request")
}

/// Pushes a message encrypted to someone else's keys: accepted by Herald,
/// undecryptable by the listener.
async fn push_undecryptable(endpoint: &str) {
    let stranger = UaKeys::new();
    let r = post(
        endpoint,
        &[("content-encoding", "aes128gcm")],
        encrypt(&stranger, b"not yours"),
    )
    .await;
    assert_eq!(r.status, 201);
}

fn key_bytes(sub: &Value, field: &str) -> Vec<u8> {
    unb64(sub["keys"][field].as_str().unwrap())
}

/// The subscriptions `round_trips_with_herald_send_and_an_independent_sender`
/// works with, and the VAPID key one of them is bound to.
struct Subscribed {
    open: Value,
    bound: Value,
    key_file: std::path::PathBuf,
    app_key: String,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trips_with_herald_send_and_an_independent_sender() {
    let h = Herald::start().await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("listen.json");
    let subs = subscribe_open_and_bound(&h, &state, dir.path()).await;
    listener_receives_every_kind_of_push(&h, &state, &subs).await;
    run_count_takes_a_message_queued_while_nobody_listens(&h, &state, &subs).await;
    list_and_unsubscribe(&h, &state, &subs).await;
}

async fn subscribe_open_and_bound(h: &Herald, state: &Path, dir: &Path) -> Subscribed {
    // An open subscription: exactly the shape PushSubscription.toJSON() has.
    let open = subscribe(state, h, "open", None).await;
    let fields: Vec<&String> = open.as_object().unwrap().keys().collect();
    assert_eq!(fields, ["endpoint", "expirationTime", "keys"], "{open}");
    assert!(open["expirationTime"].is_null());
    assert_eq!(key_bytes(&open, "p256dh").len(), 65);
    assert_eq!(key_bytes(&open, "auth").len(), 16);
    let endpoint = open["endpoint"].as_str().unwrap();
    assert!(
        endpoint.starts_with(&format!("{}/wpush/v1/", h.url())),
        "{endpoint}"
    );
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(state).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "state file mode {mode:o}");
    }

    // Bound to a VAPID key made by `herald vapid`.
    let key_file = dir.join("vapid.pem");
    let out = herald(strings(&[
        "vapid",
        "generate",
        "--out",
        key_file.to_str().unwrap(),
    ]))
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let app_key = stdout(&out).trim().to_string();
    let bound = subscribe(state, h, "bound", Some(&app_key)).await;
    assert!(
        bound["endpoint"].as_str().unwrap().contains("/wpush/v2/"),
        "{bound}"
    );
    // The same name and key again (by public key or by key file): the same subscription.
    assert_eq!(subscribe(state, h, "bound", Some(&app_key)).await, bound);
    assert_eq!(
        subscribe(state, h, "bound", Some(key_file.to_str().unwrap())).await,
        bound
    );
    // Another key for an existing name is refused.
    let other = AppServer::new().public();
    let out = herald(strings(&[
        "listen",
        "--state",
        state.to_str().unwrap(),
        "subscribe",
        "bound",
        "--vapid-key",
        &other,
    ]))
    .await;
    assert!(
        !out.status.success() && stderr(&out).contains("unsubscribe it first"),
        "{}",
        stderr(&out)
    );

    Subscribed {
        open,
        bound,
        key_file,
        app_key,
    }
}

async fn listener_receives_every_kind_of_push(h: &Herald, state: &Path, subs: &Subscribed) {
    let Subscribed {
        open,
        bound,
        key_file,
        ..
    } = subs;
    let mut listener = Listener::start(state, &[]);
    listener.wait_stderr("connected", Duration::from_secs(20));

    // herald send, unsigned, to the open subscription.
    let printed = send(open, &["--data", "hello open", "--ttl", "120"]).await;
    assert!(printed.starts_with("201"), "{printed}");
    let line = listener.line();
    assert_eq!(line["name"], "open");
    assert_eq!(line["text"], "hello open");
    assert_eq!(line["encoding"], "aes128gcm");
    assert_eq!(line["ttl"], 120);
    assert_eq!(line["endpoint"], open["endpoint"]);
    assert_eq!(unb64(line["data"].as_str().unwrap()), b"hello open");

    // herald send, VAPID-signed, to the bound subscription; unsigned is refused.
    let printed = send(
        bound,
        &[
            "--vapid-key",
            key_file.to_str().unwrap(),
            "--subject",
            "mailto:t@example.com",
            "--data",
            "hello bound",
        ],
    )
    .await;
    assert!(printed.starts_with("201"), "{printed}");
    let line = listener.line();
    assert_eq!(
        (line["name"].as_str(), line["text"].as_str()),
        (Some("bound"), Some("hello bound"))
    );
    let out = herald(strings(&[
        "send",
        "--subscription",
        &bound.to_string(),
        "--data",
        "x",
    ]))
    .await;
    assert!(
        !out.status.success(),
        "unsigned push to a bound subscription accepted"
    );

    // Subscribed while the listener runs (it loses the connection to the
    // subscribing process for a moment and comes back), then an independent
    // sender: the ece crate encrypts, jsonwebtoken signs.
    let app = AppServer::new();
    let indie = subscribe(state, h, "indie", Some(&app.public())).await;
    let body = ece::encrypt(
        &key_bytes(&indie, "p256dh"),
        &key_bytes(&indie, "auth"),
        b"from ece",
    )
    .unwrap();
    let auth = app.authorization(&h.url());
    let r = post(
        indie["endpoint"].as_str().unwrap(),
        &[("content-encoding", "aes128gcm"), ("authorization", &auth)],
        body,
    )
    .await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let line = listener.line();
    assert_eq!(
        (line["name"].as_str(), line["text"].as_str()),
        (Some("indie"), Some("from ece"))
    );

    // A push without payload.
    send(open, &[]).await;
    let line = listener.line();
    assert_eq!(line["name"], "open");
    assert!(
        line.get("data").is_none() && line.get("text").is_none(),
        "{line}"
    );
    assert!(line["encoding"].is_null());

    wait_acked(h, 4).await;
    assert_eq!(listener.stop().code(), Some(0), "{}", listener.stderr());
}

async fn run_count_takes_a_message_queued_while_nobody_listens(
    h: &Herald,
    state: &Path,
    subs: &Subscribed,
) {
    let Subscribed {
        bound, key_file, ..
    } = subs;
    // Sent while nobody listens; `run --count 1` takes it and exits.
    send(
        bound,
        &[
            "--vapid-key",
            key_file.to_str().unwrap(),
            "--data",
            "one shot",
        ],
    )
    .await;
    let args = strings(&[
        "listen",
        "--state",
        state.to_str().unwrap(),
        "run",
        "--count",
        "1",
    ]);
    let out = tokio::time::timeout(Duration::from_secs(30), herald(args))
        .await
        .expect("run --count 1 exits");
    assert!(out.status.success(), "{}", stderr(&out));
    let lines: Vec<Value> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1, "{}", stdout(&out));
    assert_eq!(lines[0]["text"], "one shot");
    wait_acked(h, 5).await;
}

async fn list_and_unsubscribe(h: &Herald, state: &Path, subs: &Subscribed) {
    let Subscribed { open, app_key, .. } = subs;
    let endpoint = open["endpoint"].as_str().unwrap();
    // list shows all three; unsubscribe makes the endpoint gone.
    let listed: Value = serde_json::from_str(&listen_ok(state, &["list", "--json"]).await).unwrap();
    assert_eq!(listed["server"], h.ws_url());
    let names: Vec<&String> = listed["subscriptions"]
        .as_object()
        .unwrap()
        .keys()
        .collect();
    assert_eq!(names, ["bound", "indie", "open"]);
    assert_eq!(
        listed["subscriptions"]["bound"]["app_server_key"],
        app_key.as_str()
    );
    assert_eq!(listed["subscriptions"]["open"]["subscription"], *open);
    let table = listen_ok(state, &["list"]).await;
    assert!(
        table.contains("bound") && table.contains("vapid") && table.contains(endpoint),
        "{table}"
    );

    listen_ok(state, &["unsubscribe", "open"]).await;
    let out = herald(strings(&[
        "send",
        "--subscription",
        &open.to_string(),
        "--data",
        "x",
    ]))
    .await;
    assert!(
        stdout(&out).starts_with("410"),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    let listed: Value = serde_json::from_str(&listen_ok(state, &["list", "--json"]).await).unwrap();
    assert!(listed["subscriptions"].get("open").is_none());
    let out = herald(strings(&[
        "listen",
        "--state",
        state.to_str().unwrap(),
        "unsubscribe",
        "open",
    ]))
    .await;
    assert!(
        !out.status.success() && stderr(&out).contains("no subscription named"),
        "{}",
        stderr(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aesgcm_and_undecryptable_messages() {
    let h = Herald::start().await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("listen.json");
    let sub = subscribe(&state, &h, "legacy", None).await;
    let endpoint = sub["endpoint"].as_str().unwrap();
    let listener = Listener::start(&state, &[]);

    // The legacy aesgcm coding, as the ece crate writes it.
    let legacy = LegacyAesgcm::encrypt(
        &key_bytes(&sub, "p256dh"),
        &key_bytes(&sub, "auth"),
        b"old but gold",
    );
    let (encryption, crypto_key) = (legacy.encryption, legacy.crypto_key);
    let r = post(
        endpoint,
        &[
            ("content-encoding", "aesgcm"),
            ("encryption", &encryption),
            ("crypto-key", &crypto_key),
        ],
        legacy.body,
    )
    .await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let line = listener.line();
    assert_eq!(
        (line["encoding"].as_str(), line["text"].as_str()),
        (Some("aesgcm"), Some("old but gold"))
    );

    // Encrypted to someone else's keys: reported, acknowledged (code 101),
    // never handed over, and not redelivered.
    push_undecryptable(endpoint).await;
    listener.wait_stderr("code 101", Duration::from_secs(20));
    assert!(
        listener.stderr().contains("cannot decrypt"),
        "{}",
        listener.stderr()
    );
    wait_acked(&h, 2).await;
    drop(listener);
    let listener = Listener::start(&state, &[]);
    listener.wait_stderr("connected", Duration::from_secs(20));
    assert!(
        listener.try_line(Duration::from_secs(1)).is_none(),
        "an acknowledged message came back"
    );
    send(&sub, &["--data", "after"]).await;
    assert_eq!(listener.line()["text"], "after");
}

/// `--count N` counts what it settles, so an undecryptable message (acked
/// with 101, never coming back) cannot leave it waiting forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn count_includes_messages_acknowledged_unhandled() {
    let h = Herald::start().await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("listen.json");
    let sub = subscribe(&state, &h, "counted", None).await;
    let endpoint = sub["endpoint"].as_str().unwrap();
    let mut listener = Listener::start(&state, &["--count", "2"]);
    send(&sub, &["--data", "readable"]).await;
    assert_eq!(listener.line()["text"], "readable");
    push_undecryptable(endpoint).await;
    let status = listener.exit_within(Duration::from_secs(20));
    assert!(status.success(), "{status}: {}", listener.stderr());
    assert!(
        listener.stderr().contains("code 101"),
        "{}",
        listener.stderr()
    );
    wait_acked(&h, 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forgotten_user_agent_and_unknown_channels_are_reported() {
    let mut h = Herald::start().await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("listen.json");
    let kept = subscribe(&state, &h, "kept", None).await;
    let gone = subscribe(&state, &h, "gone", None).await;
    let listener = Listener::start(&state, &[]);
    listener.wait_stderr("connected", Duration::from_secs(20));

    // A subscription removed from the state file behind the listener's
    // back: its messages are acknowledged with 102, not redelivered forever.
    StateFile::new(&state)
        .update(
            || unreachable!("the state file exists"),
            |s| {
                s.subscriptions.remove("gone");
                Ok(())
            },
        )
        .unwrap();
    send(&gone, &["--data", "nobody"]).await;
    listener.wait_stderr("dropped a message", Duration::from_secs(20));
    wait_acked(&h, 1).await;
    send(&kept, &["--data", "still here"]).await;
    assert_eq!(listener.line()["text"], "still here");

    // Herald loses its data: the stored uaid is unknown, the server issues
    // a new one, and the subscriptions are gone; the listener says so and
    // the state file follows.
    let old_uaid = StateFile::new(&state).load().unwrap().unwrap().uaid;
    h.stop();
    std::fs::remove_dir_all(&h.data_dir).unwrap();
    h.restart().await;
    listener.wait_stderr("no longer knew this user agent", Duration::from_secs(30));
    assert!(listener.stderr().contains("kept"), "{}", listener.stderr());
    let after = StateFile::new(&state).load().unwrap().unwrap();
    assert!(after.subscriptions.is_empty());
    assert!(after.uaid.is_some() && after.uaid != old_uaid);
    let again = subscribe(&state, &h, "kept", None).await;
    assert_ne!(again["endpoint"], kept["endpoint"]);
    send(&again, &["--data", "resubscribed"]).await;
    assert_eq!(listener.line()["text"], "resubscribed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_exec_command_gets_the_message_again_after_reconnecting() {
    let h = Herald::start().await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("listen.json");
    let sub = subscribe(&state, &h, "job", None).await;
    let flag = dir.path().join("failed-once");
    let out = dir.path().join("out");
    // Fails the first time, then records stdin and the metadata.
    let script = format!(
        "if [ -e {flag} ]; then cat >> {out}; echo \" $HERALD_NAME $HERALD_TTL $HERALD_ENCODING\" >> {out}; \
         else touch {flag}; exit 7; fi",
        flag = flag.display(),
        out = out.display()
    );
    let listener = Listener::start(&state, &["--exec", &script, "--retry-after", "1"]);
    send(&sub, &["--data", "run me", "--ttl", "300"]).await;

    let deadline = Instant::now() + Duration::from_secs(30);
    while !out.exists() {
        assert!(
            Instant::now() < deadline,
            "never redelivered; stderr:\n{}",
            listener.stderr()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_acked(&h, 1).await;
    assert!(flag.exists());
    assert_eq!(
        std::fs::read_to_string(&out).unwrap(),
        "run me job 300 aes128gcm\n"
    );
    let err = listener.stderr();
    assert!(
        err.contains("exit status: 7") && err.contains("delivered again"),
        "{err}"
    );
    assert!(
        err.contains("deferred messages are delivered again"),
        "{err}"
    );
    // Exactly once: nothing more runs.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        std::fs::read_to_string(&out).unwrap(),
        "run me job 300 aes128gcm\n"
    );
    assert!(
        listener.try_line(Duration::from_millis(10)).is_none(),
        "--exec also printed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_listener_loses_nothing_and_hands_nothing_over_twice() {
    let h = Herald::start().await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("listen.json");
    let sub = subscribe(&state, &h, "box", None).await;

    let mut listener = Listener::start(&state, &[]);
    send(&sub, &["--data", "A"]).await;
    assert_eq!(listener.line()["text"], "A");
    wait_acked(&h, 1).await;
    listener.kill9();

    // Stored while nobody listens, delivered in order after the restart.
    send(&sub, &["--data", "B"]).await;
    send(&sub, &["--data", "C"]).await;
    let mut listener = Listener::start(&state, &[]);
    assert_eq!(listener.line()["text"], "B");
    assert_eq!(listener.line()["text"], "C");
    wait_acked(&h, 3).await;
    assert!(
        listener.try_line(Duration::from_secs(1)).is_none(),
        "A came back"
    );
    listener.kill9();

    // The crash window between recording an ack and sending it: the library
    // receives D, the record is written as `ack` writes it, the process
    // "dies" before the ack leaves. The server delivers D again, and the
    // listener acknowledges it without handing it over.
    send(&sub, &["--data", "D"]).await;
    let mut options = ClientOptions::new(&state);
    options.timeout = Duration::from_secs(5);
    let mut client = Client::open(options).unwrap();
    let message = loop {
        match tokio::time::timeout(Duration::from_secs(20), client.next_event()).await {
            Ok(Ok(Event::Message(m))) => break m,
            Ok(Ok(_)) => continue,
            other => panic!("no message: {other:?}"),
        }
    };
    assert_eq!(message.text(), Some("D"));
    StateFile::new(&state)
        .update(
            || unreachable!("the state file exists"),
            |s| {
                s.remember_acked(message.dedup_key());
                Ok(())
            },
        )
        .unwrap();
    drop(client);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        acked(&h).await,
        3,
        "D was acknowledged although the ack was never sent"
    );

    let listener = Listener::start(&state, &[]);
    send(&sub, &["--data", "E"]).await;
    assert_eq!(listener.line()["text"], "E", "D was handed over twice");
    wait_acked(&h, 5).await;
    assert!(listener.try_line(Duration::from_secs(1)).is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_comes_back_by_itself_when_herald_restarts() {
    let mut h = Herald::start().await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("listen.json");
    let sub = subscribe(&state, &h, "dev", None).await;
    let listener = Listener::start(&state, &[]);
    send(&sub, &["--data", "before"]).await;
    assert_eq!(listener.line()["text"], "before");

    // A clean shutdown (close 1001) and an abrupt one.
    h.stop();
    listener.wait_stderr("reconnecting in", Duration::from_secs(10));
    h.restart().await;
    send(&sub, &["--data", "after restart"]).await;
    assert_eq!(listener.line()["text"], "after restart");

    h.kill9();
    h.restart().await;
    send(&sub, &["--data", "after kill"]).await;
    assert_eq!(listener.line()["text"], "after kill");
    let err = listener.stderr();
    let uaids: std::collections::HashSet<&str> = err
        .lines()
        .filter_map(|l| l.split("(uaid ").nth(1))
        .map(|u| u.trim_end_matches(')'))
        .collect();
    assert!(
        uaids.len() == 1 && err.matches("connected (uaid").count() >= 3,
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_or_foreign_state_files_are_refused_and_left_untouched() {
    let h = Herald::start().await;
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.json");
    subscribe(&good, &h, "x", None).await;
    let damaged = std::fs::read_to_string(&good)
        .unwrap()
        .replace("\"auth\": \"", "\"auth\": \"AA");

    let cases = [
        ("{\"format\": \"herald-listen-state\", \"vers", "corrupt"),
        (
            "{\"endpoint\": \"http://x/\", \"keys\": {}}",
            "not a herald listen state file",
        ),
        (
            "{\"format\": \"herald-listen-state\", \"version\": 99, \"server\": \"ws://h/\"}",
            "version 99",
        ),
        (damaged.as_str(), "damaged"),
    ];
    let state = dir.path().join("listen.json");
    let server = h.ws_url();
    for (text, reason) in cases {
        std::fs::write(&state, text).unwrap();
        let modified = std::fs::metadata(&state).unwrap().modified().unwrap();
        for args in [
            vec!["list"],
            vec!["run"],
            vec!["subscribe", "y", "--server", &server],
            vec!["subscribe", "y"],
            vec!["unsubscribe", "x"],
        ] {
            let mut all = strings(&["listen", "--state", state.to_str().unwrap()]);
            all.extend(strings(&args));
            let out = tokio::time::timeout(Duration::from_secs(20), herald(all))
                .await
                .expect("refused quickly");
            let err = stderr(&out);
            assert!(!out.status.success(), "{args:?} accepted {text:?}");
            assert!(
                err.contains(reason)
                    && err.contains("left untouched")
                    && err.contains(state.to_str().unwrap()),
                "{args:?} on {text:?}: {err}"
            );
            assert_eq!(
                std::fs::read_to_string(&state).unwrap(),
                text,
                "{args:?} changed the file"
            );
            assert_eq!(
                std::fs::metadata(&state).unwrap().modified().unwrap(),
                modified
            );
        }
    }
    let leftovers: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.contains(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // No state file: run says how to start.
    let missing = dir.path().join("missing.json");
    let out = herald(strings(&[
        "listen",
        "--state",
        missing.to_str().unwrap(),
        "run",
    ]))
    .await;
    assert!(
        !out.status.success() && stderr(&out).contains("subscribe first"),
        "{}",
        stderr(&out)
    );
    assert!(!missing.exists());
    // A state file belongs to one server.
    let out = herald(strings(&[
        "listen",
        "--state",
        good.to_str().unwrap(),
        "subscribe",
        "z",
        "--server",
        "ws://127.0.0.1:9/",
    ]))
    .await;
    assert!(
        !out.status.success() && stderr(&out).contains("belongs to"),
        "{}",
        stderr(&out)
    );
    // Two listeners on one state file would steal the connection from each other.
    let first = Listener::start(&good, &[]);
    first.wait_stderr("connected", Duration::from_secs(20));
    let mut second = Listener::start(&good, &[]);
    assert!(!second.exit_within(Duration::from_secs(10)).success());
    assert!(
        second.stderr().contains("already listening"),
        "{}",
        second.stderr()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcasts_are_printed_and_remembered() {
    const TOKEN: &str = "listen-test-broadcast-token";
    let h = Herald::start_with(&[], &[("HERALD_BROADCAST_TOKENS", TOKEN)]).await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("listen.json");
    subscribe(&state, &h, "b", None).await;
    let set = |version: &str| {
        strings(&[
            "broadcast",
            "set",
            "test/feed",
            version,
            "--server",
            &h.url(),
            "--token",
            TOKEN,
        ])
    };
    let out = herald(set("v1")).await;
    assert!(out.status.success(), "{}", stderr(&out));

    // Announced in the hello reply, then live.
    let mut listener = Listener::start(&state, &["--broadcast", "test/feed"]);
    assert_eq!(listener.line()["broadcasts"]["test/feed"], "v1");
    let out = herald(set("v2")).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(listener.line()["broadcasts"]["test/feed"], "v2");
    listener.kill9();

    // The version seen is kept: a restart hears only of later changes.
    let listener = Listener::start(&state, &[]);
    listener.wait_stderr("connected", Duration::from_secs(20));
    assert!(
        listener.try_line(Duration::from_millis(500)).is_none(),
        "v2 announced again"
    );
    let out = herald(set("v3")).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(listener.line()["broadcasts"]["test/feed"], "v3");
}

/// A client TLS config trusting only `ca_pem`.
fn tls_client(ca_der: &[u8]) -> std::sync::Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from(ca_der.to_vec()))
        .unwrap();
    std::sync::Arc::new(
        rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wss_with_a_private_ca() {
    let dir = tempfile::tempdir().unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let cert_path = dir.path().join("cert.pem");
    let key_path = dir.path().join("key.pem");
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.signing_key.serialize_pem()).unwrap();
    let public = "https://localhost:8443";
    let h = Herald::start_with(
        &["--public-url", public],
        &[
            ("HERALD_TLS_CERT", cert_path.to_str().unwrap()),
            ("HERALD_TLS_KEY", key_path.to_str().unwrap()),
        ],
    )
    .await;
    let server = format!("wss://localhost:{}/", h.port);
    let state = dir.path().join("listen.json");
    let state_arg = state.to_str().unwrap().to_string();

    // Not trusted without the CA.
    let out = herald(strings(&[
        "listen",
        "--state",
        &state_arg,
        "subscribe",
        "s",
        "--server",
        &server,
    ]))
    .await;
    assert!(!out.status.success());
    assert!(stderr(&out).contains("TLS handshake"), "{}", stderr(&out));
    assert!(
        !state.exists(),
        "a failed first subscription left a state file"
    );

    let ca = cert_path.to_str().unwrap();
    let out = herald(strings(&[
        "listen",
        "--state",
        &state_arg,
        "--ca",
        ca,
        "subscribe",
        "s",
        "--server",
        &server,
    ]))
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let sub: Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    let endpoint = sub["endpoint"].as_str().unwrap();
    assert!(endpoint.starts_with(public), "{endpoint}");
    let listener = Listener::start(&state, &["--ca", ca]);
    listener.wait_stderr("connected", Duration::from_secs(20));

    // Push over https to the same listener.
    let body = ece::encrypt(
        &key_bytes(&sub, "p256dh"),
        &key_bytes(&sub, "auth"),
        b"over tls",
    )
    .unwrap();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", h.port))
        .await
        .unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = tokio_rustls::TlsConnector::from(tls_client(cert.cert.der()))
        .connect(name, tcp)
        .await
        .unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = http::Request::post(endpoint.trim_start_matches(public))
        .header("host", format!("localhost:{}", h.port))
        .header("ttl", "60")
        .header("content-encoding", "aes128gcm")
        .body(http_body_util::Full::new(bytes::Bytes::from(body)))
        .unwrap();
    assert_eq!(sender.send_request(req).await.unwrap().status(), 201);
    assert_eq!(listener.line()["text"], "over tls");
}

/// Private mode (`user_agent_tokens`): `herald listen` presents its token
/// (`--token`, or `HERALD_LISTEN_TOKEN`) and receives pushes; without it,
/// it fails at once and says why, without trying again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_mode_listen_needs_its_token() {
    const TOKEN: &str = "private-mode-token-0123456789";
    let h = Herald::start_with(&[], &[("HERALD_USER_AGENT_TOKENS", TOKEN)]).await;
    let refusals = || {
        metric(
            &h,
            "herald_policy_refusals_total{reason=\"user_agent_token\"} ",
        )
    };
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("listen.json");
    let state_arg = state.to_str().unwrap();
    let server = h.ws_url();

    let out = herald(strings(&[
        "listen",
        "--state",
        state_arg,
        "subscribe",
        "phone",
        "--server",
        &server,
    ]))
    .await;
    let err = stderr(&out);
    assert!(!out.status.success(), "{err}");
    for said in ["401", "token", "--token", "HERALD_LISTEN_TOKEN"] {
        assert!(err.contains(said), "{said:?} not in {err}");
    }
    assert_eq!(refusals().await, 1.0, "a refused hello is not retried");

    let sub: Value = serde_json::from_str(
        listen_ok(
            &state,
            &["--token", TOKEN, "subscribe", "phone", "--server", &server],
        )
        .await
        .trim(),
    )
    .unwrap();
    let mut listener =
        Listener::start_with_env(&state, &["--count", "1"], &[("HERALD_LISTEN_TOKEN", TOKEN)]);
    listener.wait_stderr("connected", Duration::from_secs(20));
    send(&sub, &["--data", "for my devices only"]).await;
    assert_eq!(listener.line()["text"], "for my devices only");
    assert!(listener.exit_within(Duration::from_secs(20)).success());

    // `run` without the token: the same clear failure, and no retry loop.
    let mut listener = Listener::start(&state, &[]);
    let status = listener.exit_within(Duration::from_secs(20));
    assert!(!status.success());
    assert!(
        listener.stderr().contains("HERALD_LISTEN_TOKEN"),
        "{}",
        listener.stderr()
    );
    assert_eq!(refusals().await, 2.0);
}
