//! End to end with a real browser: headless Firefox ESR subscribes through a
//! Herald via the demo page, receives and decrypts pushes in its service
//! worker, gets messages queued while it was closed (with topic replacement
//! and TTL expiry applied), and after unsubscribing its endpoint answers 410.
//!
//! Needs `firefox-esr` (scripts/install-firefox.sh). A browser that is
//! missing or cannot start fails the test with the reason; it is not skipped.

#[path = "support/firefox.rs"]
mod support;

#[path = "common/redis.rs"]
mod redis_harness;

use serde_json::{json, Value};
use std::process::Command;
use std::time::Duration;
use support::{wait_for, DemoServer, Firefox, HeraldServer, HERALD};

/// A fresh profile's first start, on a busy 2-core machine, can take a
/// while before the page has subscribed (the page itself retries).
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(150);
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(60);

struct Rig {
    dir: tempfile::TempDir,
    /// The node whose URL endpoints carry (where pushes are sent).
    herald: HeraldServer,
    /// Further nodes; Firefox connects to the last one.
    others: Vec<HeraldServer>,
    demo: DemoServer,
    firefox: Option<Firefox>,
    launches: u32,
}

impl Rig {
    fn dir() -> tempfile::TempDir {
        support::firefox_binary().unwrap_or_else(|e| panic!("{e}"));
        let mut dir = tempfile::tempdir().expect("temp dir");
        // Browser, demo and Herald logs and the profile stay behind for a
        // post-mortem when asked.
        if std::env::var_os("HERALD_E2E_KEEP").is_some() {
            dir.disable_cleanup(true);
            eprintln!("keeping {}", dir.path().display());
        }
        dir
    }

    fn new() -> Rig {
        let dir = Self::dir();
        let herald = HeraldServer::start_in(dir.path());
        Self::assemble(dir, herald, vec![])
    }

    /// One node with extra settings.
    fn with_env(env: &[(&str, &str)]) -> Rig {
        let dir = Self::dir();
        let herald = HeraldServer::start_node(dir.path(), "herald", None, env);
        Self::assemble(dir, herald, vec![])
    }

    /// Two nodes sharing a Redis: pushes go to the first, Firefox connects
    /// to the second.
    fn two_nodes(redis_url: &str) -> Rig {
        let dir = Self::dir();
        let key = base64::Engine::encode(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD,
            rand::random::<[u8; 32]>(),
        );
        let env = [
            ("HERALD_STORE", "redis"),
            ("HERALD_REDIS_URL", redis_url),
            ("HERALD_ENDPOINT_KEYS", key.as_str()),
        ];
        let a = HeraldServer::start_node(dir.path(), "node-a", None, &env);
        let b = HeraldServer::start_node(dir.path(), "node-b", Some(&a.url()), &env);
        Self::assemble(dir, a, vec![b])
    }

    fn assemble(dir: tempfile::TempDir, herald: HeraldServer, others: Vec<HeraldServer>) -> Rig {
        let demo = DemoServer::start(&herald.url(), dir.path());
        // 127.0.0.1 rather than localhost: Herald listens on IPv4 only, and
        // Firefox would try ::1 first for localhost.
        let ws = others.last().unwrap_or(&herald).ws_url();
        support::write_profile(&dir.path().join("profile"), &ws);
        Rig {
            dir,
            herald,
            others,
            demo,
            firefox: None,
            launches: 0,
        }
    }

    fn launch(&mut self, query: &str) {
        assert!(self.firefox.is_none(), "close the browser first");
        self.launches += 1;
        let log = self
            .dir
            .path()
            .join(format!("firefox-{}.log", self.launches));
        self.firefox = Some(Firefox::launch(
            &self.dir.path().join("profile"),
            &self.demo.page_url(query),
            log,
        ));
    }

    fn close(&mut self) {
        if let Some(firefox) = self.firefox.take() {
            firefox.close();
        }
    }

    /// Everything a person needs to see why a step failed.
    fn logs(&self) -> String {
        let mut out = String::new();
        if let Some(ff) = &self.firefox {
            out.push_str(&ff.proc.log_tail(80));
            out.push('\n');
        }
        out.push_str(&self.demo.proc.log_tail(60));
        out.push('\n');
        out.push_str(&self.herald.proc.log_tail(60));
        for other in &self.others {
            out.push('\n');
            out.push_str(&other.proc.log_tail(60));
        }
        out
    }

    fn check_browser(&mut self) {
        if let Some(ff) = self.firefox.as_mut() {
            if let Some(status) = ff.proc.exited() {
                panic!("Firefox died with {status}\n{}", self.logs());
            }
        }
    }

    fn subscriptions(&self) -> Vec<Value> {
        self.demo
            .get_json("/subscriptions")
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// The subscription the page hands over once Firefox subscribed.
    fn wait_subscription(&mut self) -> Value {
        wait_for(SUBSCRIBE_TIMEOUT, || {
            self.check_browser();
            self.subscriptions().into_iter().next()
        })
        .unwrap_or_else(|| {
            panic!(
                "Firefox did not subscribe within {SUBSCRIBE_TIMEOUT:?}\n{}",
                self.logs()
            )
        })
    }

    fn received(&self) -> Vec<Option<String>> {
        self.demo
            .get_json("/received")
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|m| m["text"].as_str().map(str::to_owned))
            .collect()
    }

    fn count_received(&self, text: &str) -> usize {
        self.received()
            .iter()
            .filter(|t| t.as_deref() == Some(text))
            .count()
    }

    /// Sends through the demo's application server; asserts Herald took it.
    fn send(&self, body: Value) {
        let (status, reply) = self.demo.post_json("/send", &body);
        assert_eq!(
            status,
            200,
            "demo /send refused {body}: {reply}\n{}",
            self.logs()
        );
        let results = reply["results"].as_array().cloned().unwrap_or_default();
        assert_eq!(
            results.len(),
            1,
            "expected one subscription to send to: {reply}"
        );
        assert_eq!(
            results[0]["status"],
            201,
            "Herald did not accept {body}: {reply}\n{}",
            self.logs()
        );
    }

    fn wait_received(&mut self, text: &str, what: &str) {
        let found = wait_for(DELIVERY_TIMEOUT, || {
            self.check_browser();
            (self.count_received(text) > 0).then_some(())
        });
        assert!(
            found.is_some(),
            "{what}: {text:?} did not reach the service worker within {DELIVERY_TIMEOUT:?}; received {:?}\n{}",
            self.received(),
            self.logs()
        );
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        // Browser first: it holds connections to both servers.
        self.close();
    }
}

/// Firefox connected to one node receives what application servers send to
/// another, live and after being offline.
#[test]
fn firefox_on_one_node_receives_a_push_sent_to_another() {
    let redis = redis_harness::RedisServer::start();
    let mut rig = Rig::two_nodes(redis.url());
    rig.launch("");
    let subscription = rig.wait_subscription();
    let endpoint = subscription["endpoint"].as_str().expect("endpoint");
    assert!(
        endpoint.starts_with(&format!("{}/", rig.herald.url())),
        "{endpoint} is not on the first node"
    );
    rig.send(json!({ "text": "across nodes", "ttl": 60 }));
    rig.wait_received("across nodes", "a push to the other node");

    rig.close();
    std::thread::sleep(Duration::from_secs(1));
    rig.send(json!({ "text": "queued across nodes", "ttl": 600 }));
    rig.launch("");
    rig.wait_received("queued across nodes", "a queued push from the other node");
    rig.close();
    assert_eq!(rig.count_received("across nodes"), 1);
}

/// Firefox follows `remote-settings/monitor_changes` through Herald: it
/// subscribes when it connects, hears the current version at once, and
/// hears a change set later through the operator API.
#[test]
fn firefox_follows_remote_settings_broadcasts() {
    const TOKEN: &str = "e2e-broadcast-token-0123";
    // /metrics on the main listener, where raw_http reads it.
    let mut rig = Rig::with_env(&[
        ("HERALD_BROADCAST_TOKENS", TOKEN),
        ("HERALD_METRICS_PUBLIC", "true"),
    ]);
    let port = rig.herald.port;
    let put = |version: &str| {
        let (status, body) = raw_http(
            port,
            "PUT",
            "/v1/broadcasts/remote-settings/monitor_changes",
            Some(TOKEN),
            version,
        );
        assert_eq!(status, 200, "{body}");
    };
    let metric = |name: &str| -> f64 {
        raw_http(port, "GET", "/metrics", None, "")
            .1
            .lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
            .unwrap_or(0.0)
    };
    put("\"1\"");
    rig.launch("");
    // Firefox subscribes with the version it has ("0"): Herald answers with 1.
    let heard = wait_for(SUBSCRIBE_TIMEOUT, || {
        rig.check_browser();
        (metric("herald_broadcast_messages_total") >= 1.0).then_some(())
    });
    assert!(
        heard.is_some(),
        "Firefox never followed the broadcast\n{}",
        rig.logs()
    );
    assert_eq!(metric("herald_broadcast_subscribed_connections"), 1.0);
    let before = metric("herald_broadcast_messages_total");
    put("\"2\"");
    let heard = wait_for(Duration::from_secs(10), || {
        (metric("herald_broadcast_messages_total") > before).then_some(())
    });
    assert!(
        heard.is_some(),
        "the change did not reach Firefox\n{}",
        rig.logs()
    );
    rig.close();
}

/// A plain HTTP/1.1 request to Herald on loopback: (status, body).
fn raw_http(port: u16, method: &str, path: &str, token: Option<&str>, body: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect to Herald");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n{auth}Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).unwrap();
    let mut raw = String::new();
    stream.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, body.to_string())
}

#[test]
fn firefox_subscribes_receives_queues_and_unsubscribes() {
    let mut rig = Rig::new();
    let subscription = subscribe_and_receive_live(&mut rig);
    firefox_acks_a_push_that_asks_for_a_receipt(&mut rig, &subscription);
    // 2c. Legacy aesgcm in each spelling application servers use: quoted
    // or not, base64 padded or not. Herald normalises the headers, so all
    // four decrypt in Firefox (which refuses padded base64).
    let forms = push_aesgcm_forms(&rig, &subscription);
    for text in &forms {
        rig.wait_received(text, "aesgcm push");
    }
    queued_while_closed_arrive_once(&mut rig, &forms);
    unsubscribing_makes_the_endpoint_gone(&mut rig, &subscription);
}

/// Steps 1 and 2: the subscription the page handed over, after a live push
/// reached its service worker.
fn subscribe_and_receive_live(rig: &mut Rig) -> Value {
    // 1. The page subscribes through Herald and hands over the subscription.
    rig.launch("");
    let subscription = rig.wait_subscription();
    let endpoint = subscription["endpoint"]
        .as_str()
        .expect("endpoint")
        .to_owned();
    assert!(
        endpoint.starts_with(&format!("{}/", rig.herald.url())),
        "endpoint {endpoint} is not on Herald's public URL {}",
        rig.herald.url()
    );
    assert!(subscription["keys"]["p256dh"].is_string() && subscription["keys"]["auth"].is_string());

    // 2. A push while the browser runs is decrypted by its service worker.
    rig.send(json!({ "text": "live message ✓", "ttl": 60, "urgency": "high" }));
    rig.wait_received("live message ✓", "live push");
    // The service worker says which subscription it came to, so the page
    // lists only this browser's messages.
    let query = format!(
        "/received?endpoint={}",
        endpoint
            .replace('%', "%25")
            .replace(':', "%3A")
            .replace('/', "%2F")
            .replace('+', "%2B")
    );
    let own = rig.demo.get_json(&query);
    assert!(
        own.as_array()
            .is_some_and(|l| l.iter().any(|m| m["text"] == "live message ✓")),
        "the page's own list lacks the message: {own}"
    );
    let foreign = rig
        .demo
        .get_json("/received?endpoint=http%3A%2F%2Felsewhere%2F");
    assert_eq!(
        foreign,
        json!([]),
        "another subscription's list is not empty"
    );

    subscription
}

fn firefox_acks_a_push_that_asks_for_a_receipt(rig: &mut Rig, subscription: &Value) {
    // 2b. A push asking for a delivery receipt: Firefox's own ack, sent once
    // its service worker has handled the message, reports it delivered.
    let out = Command::new(HERALD)
        .args(["send", "--subscription", &subscription.to_string()])
        .arg("--vapid-key")
        .arg(rig.demo.data_dir.join("vapid.pem"))
        .args(["--subject", "mailto:e2e@example.com"])
        .args(["--data", "with a receipt", "--ttl", "60", "--receipt"])
        .args(["--receipt-timeout", "30"])
        .output()
        .expect("run herald send");
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && printed.contains("receipt: delivered"),
        "no delivered receipt from Firefox: exit {}, stdout {printed:?}, stderr {:?}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        rig.logs()
    );
    rig.wait_received("with a receipt", "push with a receipt");
}

fn queued_while_closed_arrive_once(rig: &mut Rig, forms: &[String]) {
    // 3. While the browser is closed Herald keeps messages: a newer one
    // with the same topic replaces the older, and an expired one is dropped.
    rig.close();
    // Give Herald a moment to see the websocket go away, so these are
    // stored for an offline user agent rather than raced onto a dying
    // connection.
    std::thread::sleep(Duration::from_secs(1));
    rig.send(json!({ "text": "topic v1", "ttl": 600, "topic": "e2e-topic" }));
    rig.send(json!({ "text": "topic v2", "ttl": 600, "topic": "e2e-topic" }));
    rig.send(json!({ "text": "expires fast", "ttl": 1 }));
    rig.send(json!({ "text": "kept while offline", "ttl": 600 }));
    std::thread::sleep(Duration::from_secs(3));
    rig.launch("");
    rig.wait_received("kept while offline", "queued push");
    rig.wait_received("topic v2", "topic replacement");
    // Whatever else was queued came in the same batch; give stragglers a
    // few seconds before asserting they do not exist.
    std::thread::sleep(Duration::from_secs(5));
    let received = rig.received();
    assert_eq!(
        rig.count_received("topic v1"),
        0,
        "replaced topic message was delivered: {received:?}"
    );
    assert_eq!(
        rig.count_received("expires fast"),
        0,
        "expired message was delivered: {received:?}"
    );
    for text in [
        "live message ✓",
        "with a receipt",
        "topic v2",
        "kept while offline",
    ]
    .into_iter()
    .chain(forms.iter().map(String::as_str))
    {
        assert_eq!(
            rig.count_received(text),
            1,
            "{text:?} not delivered exactly once: {received:?}"
        );
    }
}

fn unsubscribing_makes_the_endpoint_gone(rig: &mut Rig, subscription: &Value) {
    // 4. The page unsubscribes; the endpoint is then gone.
    rig.close();
    rig.launch("?action=unsubscribe");
    let forgotten = wait_for(DELIVERY_TIMEOUT, || {
        rig.check_browser();
        rig.subscriptions().is_empty().then_some(())
    });
    assert!(
        forgotten.is_some(),
        "the page did not report unsubscribing within {DELIVERY_TIMEOUT:?}\n{}",
        rig.logs()
    );
    // Firefox sends `unregister` as unsubscribe() resolves; allow Herald a
    // few seconds to process it, but no 201 after that.
    let vapid_key = rig.demo.data_dir.join("vapid.pem");
    let subscription_json = subscription.to_string();
    let mut last = String::new();
    let gone = wait_for(Duration::from_secs(20), || {
        let out = Command::new(HERALD)
            .args(["send", "--subscription", &subscription_json, "--vapid-key"])
            .arg(&vapid_key)
            .args([
                "--subject",
                "mailto:e2e@example.com",
                "--data",
                "after unsubscribe",
                "--ttl",
                "60",
            ])
            .output()
            .expect("run herald send");
        last = format!(
            "exit {}, stdout {:?}, stderr {:?}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (!out.status.success() && String::from_utf8_lossy(&out.stdout).starts_with("410"))
            .then_some(())
    });
    assert!(
        gone.is_some(),
        "endpoint did not answer 410 after unsubscribe; last try: {last}\n{}",
        rig.logs()
    );

    // The demo, handed the stale subscription again, forgets it on the 410.
    let (status, _) = rig.demo.post_json("/subscribe", subscription);
    assert!(
        status == 200 || status == 201,
        "demo did not take the subscription back: {status}"
    );
    let (status, reply) = rig
        .demo
        .post_json("/send", &json!({ "text": "to nobody", "ttl": 60 }));
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["results"][0]["status"], 410, "{reply}");
    assert_eq!(reply["results"][0]["forgotten"], true, "{reply}");
    assert!(
        rig.subscriptions().is_empty(),
        "demo kept a gone subscription"
    );

    rig.close();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        rig.count_received("after unsubscribe") + rig.count_received("to nobody"),
        0,
        "a message reached the browser after it unsubscribed"
    );
}

/// Pushes one aesgcm message per spelling of its `Encryption` and
/// `Crypto-Key` headers (quoted or not × padded base64 or not), signed with
/// the demo's VAPID key; returns the texts sent. Each must be accepted.
fn push_aesgcm_forms(rig: &Rig, subscription: &Value) -> Vec<String> {
    use base64::engine::general_purpose::{URL_SAFE, URL_SAFE_NO_PAD};
    use base64::Engine;
    let endpoint = subscription["endpoint"].as_str().unwrap();
    let key = |name: &str| {
        URL_SAFE_NO_PAD
            .decode(
                subscription["keys"][name]
                    .as_str()
                    .unwrap()
                    .trim_end_matches('='),
            )
            .unwrap()
    };
    let (p256dh, auth) = (key("p256dh"), key("auth"));
    let vapid = herald::appserver::VapidKey::from_file(&rig.demo.data_dir.join("vapid.pem"))
        .expect("the demo's VAPID key");
    let audience = herald::appserver::origin_of(endpoint).unwrap();
    let url: http::Uri = endpoint.parse().unwrap();
    let mut sent = Vec::new();
    for quoted in [false, true] {
        for padded in [false, true] {
            let text = format!(
                "aesgcm {} {}",
                if quoted { "quoted" } else { "unquoted" },
                if padded { "padded" } else { "unpadded" }
            );
            let block = ece::legacy::encrypt_aesgcm(&p256dh, &auth, text.as_bytes()).unwrap();
            let headers = block.headers(None);
            let value = |header: &str, name: &str| {
                let h = &headers.iter().find(|(k, _)| *k == header).unwrap().1;
                let v = h
                    .split(';')
                    .find_map(|p| p.trim().strip_prefix(&format!("{name}=")))
                    .unwrap();
                URL_SAFE_NO_PAD.decode(v).unwrap()
            };
            let (salt, dh) = (value("Encryption", "salt"), value("Crypto-Key", "dh"));
            let enc = |b: &[u8]| {
                let s = if padded {
                    URL_SAFE.encode(b)
                } else {
                    URL_SAFE_NO_PAD.encode(b)
                };
                if quoted {
                    format!("\"{s}\"")
                } else {
                    s
                }
            };
            let (encryption, crypto_key) = if quoted {
                (
                    format!("keyid=\"p256dh\"; salt={}; rs=\"4096\"", enc(&salt)),
                    format!("keyid=\"p256dh\"; dh={}", enc(&dh)),
                )
            } else {
                (
                    format!("salt={};rs=4096", enc(&salt)),
                    format!("dh={}", enc(&dh)),
                )
            };
            let authorization = vapid.authorization(&audience, Some("mailto:e2e@example.com"));
            let body = URL_SAFE_NO_PAD.decode(block.body()).unwrap();
            let reply = support::http_with(
                url.host().unwrap(),
                url.port_u16().unwrap_or(80),
                "POST",
                url.path(),
                &[
                    ("TTL", "60"),
                    ("Content-Encoding", "aesgcm"),
                    ("Encryption", &encryption),
                    ("Crypto-Key", &crypto_key),
                    ("Authorization", &authorization),
                ],
                &body,
            )
            .expect("push to Herald");
            assert_eq!(
                reply.status, 201,
                "{text}: Herald refused {encryption} / {crypto_key}: {}",
                reply.body
            );
            sent.push(text);
        }
    }
    sent
}
