//! Pushes to bridged user agents through a real Herald server and real HTTP:
//! the endpoint refuses what its bridge cannot carry, accepts the rest with
//! a 201/202, and the forwarder hands it on and reports the receipt. The
//! upstream is a scripted `Bridge` in this process (the FCM and APNs mocks
//! exercise the real bridges); the bridged user agent is written to the
//! server's store as the registration API would.

mod common;

use common::*;
use herald::bridge::registry::Bridges;
use herald::bridge::{Bridge, Delivery};
use herald::config::{ServeArgs, Settings};
use herald::server::Server;
use herald::store::{BridgeKind, BridgeRoute, ChannelRecord, Message, UserRecord};
use herald::token::{ApiVersion, EndpointToken};
use herald_proto::ids::Uaid;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const APP: &str = "test-app";

/// Answers from a script (then `Accepted`), records what it was sent, and
/// takes payloads of at most `max` bytes.
struct Scripted {
    answers: Mutex<VecDeque<Delivery>>,
    sent: Mutex<Vec<Vec<u8>>>,
    max: usize,
}

#[async_trait::async_trait]
impl Bridge for Scripted {
    fn kind(&self) -> BridgeKind {
        BridgeKind::Fcm
    }
    fn app_id(&self) -> &str {
        APP
    }
    fn fits(&self, m: &Message) -> bool {
        m.data.len() <= self.max
    }
    async fn send(&self, _: &BridgeRoute, m: &Message, _: u64) -> Delivery {
        self.sent.lock().unwrap().push(m.data.to_vec());
        let next = self.answers.lock().unwrap().pop_front();
        next.unwrap_or(Delivery::Accepted)
    }
}

struct Node {
    server: Server,
    bridge: Arc<Scripted>,
    _dir: tempfile::TempDir,
}

async fn start(answers: Vec<Delivery>) -> Node {
    let dir = tempfile::tempdir().unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let env = [
        ("HERALD_LISTEN", addr.clone()),
        ("HERALD_DATA_DIR", dir.path().display().to_string()),
    ]
    .into_iter()
    .chain(common::QUOTAS_OFF.map(|(k, v)| (k, v.to_string())))
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let settings = Settings::load(&ServeArgs::default(), &env).unwrap();
    let bridge = Arc::new(Scripted {
        answers: Mutex::new(answers.into()),
        sent: Mutex::default(),
        max: 3000,
    });
    let bridges = Bridges::new(vec![bridge.clone() as Arc<dyn Bridge>]);
    let server = Server::start_with_bridges(settings, bridges).await.unwrap();
    Node {
        server,
        bridge,
        _dir: dir,
    }
}

impl Node {
    /// A bridged user agent for `app_id` with one subscription; its endpoint.
    async fn bridged(&self, app_id: &str) -> String {
        let app = &self.server.app;
        let (uaid, channel) = (Uaid::random(), uuid::Uuid::new_v4());
        let user = UserRecord {
            created: now(),
            last_seen: now(),
            router: Some(BridgeRoute {
                kind: BridgeKind::Fcm,
                app_id: app_id.into(),
                token: "device-token-1".into(),
                aps: None,
            }),
        };
        app.store.put_user(&uaid, &user).await.unwrap();
        let record = ChannelRecord {
            key_hash: None,
            created: now(),
        };
        app.store
            .put_channel(&uaid, &channel, &record)
            .await
            .unwrap();
        let target = EndpointToken {
            uaid,
            channel,
            key_hash: None,
        };
        let (version, token) = app.tokens.endpoint_token(&target);
        assert_eq!(version, ApiVersion::V1);
        format!("{}/wpush/v1/{token}", app.settings.public_url.base)
    }

    async fn sent_within(&self, n: usize, within: Duration) -> Vec<Vec<u8>> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let sent = self.bridge.sent.lock().unwrap().clone();
            if sent.len() >= n || tokio::time::Instant::now() > deadline {
                return sent;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

async fn post(endpoint: &str, body: Vec<u8>, extra: &[(&str, &str)]) -> Resp {
    let mut headers = vec![("ttl", "60"), ("content-encoding", "aes128gcm")];
    headers.extend_from_slice(extra);
    request("POST", endpoint, &headers, body).await.unwrap()
}

/// The receipts of the subscription a 202 names, as one JSON batch.
async fn receipts(r: &Resp) -> serde_json::Value {
    let link = r.header("link").expect("a Link header");
    let url = &link[link.find('<').unwrap() + 1..link.find('>').unwrap()];
    let got = request("GET", url, &[("prefer", "wait=0")], vec![])
        .await
        .unwrap();
    assert_eq!(got.status, 200);
    got.json()
}

async fn outcome_within(r: &Resp, within: Duration) -> serde_json::Value {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let batch = receipts(r).await;
        if batch["receipts"].as_array().is_some_and(|a| !a.is_empty())
            || tokio::time::Instant::now() > deadline
        {
            return batch["receipts"][0].clone();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn payload(n: usize) -> Vec<u8> {
    // An aes128gcm record's header: 16 salt, rs 4096, idlen 0; then bytes.
    let mut body = vec![7u8; 16];
    body.extend_from_slice(&4096u32.to_be_bytes());
    body.push(0);
    body.resize(n, 0x42);
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bridged_push_is_accepted_then_forwarded_with_its_receipt() {
    let node = start(vec![]).await;
    let endpoint = node.bridged(APP).await;
    let r = post(&endpoint, payload(200), &[("prefer", "respond-async")]).await;
    assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
    let sent = node.sent_within(1, Duration::from_secs(5)).await;
    assert_eq!(sent, vec![payload(200)]);
    let receipt = outcome_within(&r, Duration::from_secs(5)).await;
    assert_eq!(receipt["outcome"], "forwarded", "{receipt}");
    node.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_too_large_for_the_bridge_is_refused_before_it_is_accepted() {
    let node = start(vec![]).await;
    let endpoint = node.bridged(APP).await;
    let r = post(&endpoint, payload(3500), &[]).await;
    assert_eq!(r.status, 413, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.errno(), 104);
    assert_eq!(post(&endpoint, payload(3000), &[]).await.status, 201);
    assert_eq!(
        node.sent_within(1, Duration::from_secs(5)).await,
        vec![payload(3000)],
        "only the one that fits went out"
    );
    node.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_for_an_unconfigured_bridge_is_refused_as_gone() {
    let node = start(vec![]).await;
    let endpoint = node.bridged("another-app").await;
    let r = post(&endpoint, payload(100), &[]).await;
    assert_eq!(r.status, 410, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.errno(), 103);
    node.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_device_token_makes_later_pushes_gone() {
    let node = start(vec![Delivery::Gone {
        reason: "UNREGISTERED".into(),
    }])
    .await;
    let endpoint = node.bridged(APP).await;
    let r = post(&endpoint, payload(100), &[("prefer", "respond-async")]).await;
    assert_eq!(r.status, 202);
    let receipt = outcome_within(&r, Duration::from_secs(5)).await;
    assert_eq!(receipt["outcome"], "gone", "{receipt}");
    let later = post(&endpoint, payload(100), &[]).await;
    assert_eq!(later.status, 410);
    assert_eq!(later.errno(), 103);
    node.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_push_goes_out_from_the_sweep_after_retry_after() {
    let node = start(vec![Delivery::Retry {
        after: Some(Duration::from_secs(2)),
        reason: "429".into(),
    }])
    .await;
    let endpoint = node.bridged(APP).await;
    let r = post(&endpoint, payload(100), &[("prefer", "respond-async")]).await;
    assert_eq!(r.status, 202);
    assert_eq!(node.sent_within(1, Duration::from_secs(5)).await.len(), 1);
    // Not before Retry-After.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(node.bridge.sent.lock().unwrap().len(), 1);
    assert_eq!(node.sent_within(2, Duration::from_secs(5)).await.len(), 2);
    let receipt = outcome_within(&r, Duration::from_secs(5)).await;
    assert_eq!(receipt["outcome"], "forwarded", "{receipt}");
    node.server.shutdown().await;
}
