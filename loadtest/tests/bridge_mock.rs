//! `bridge` against a minimal in-test stand-in for Herald's registration
//! API and FCM bridge, so the scenario's accounting (lost, duplicated,
//! misrouted pushes; a missing API) is checked without Herald. The mock
//! forwards to the scenario's own FCM sink the way Herald does: an RS256
//! grant signed with the service account's key, then `messages:send` with
//! the bearer token it got.

mod common;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;

type Client = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Full<Bytes>,
>;

#[derive(Clone, Copy, Default)]
struct Faults {
    /// Answer 201 to every Nth push but never forward it.
    drop_every: u64,
    /// Forward every Nth push twice.
    twice_every: u64,
}

struct State {
    app_id: String,
    port: u16,
    account: Value,
    project_id: String,
    base_url: String,
    faults: Faults,
    /// Channel id -> the device token that registered it.
    channels: Mutex<HashMap<String, String>>,
    /// uaid -> device token.
    devices: Mutex<HashMap<String, String>>,
    access: tokio::sync::Mutex<Option<String>>,
    pushes: AtomicU64,
    client: Client,
}

struct BridgedMock {
    port: u16,
    _rt: tokio::runtime::Runtime,
}

impl BridgedMock {
    /// Reads the config `bridge --write-config` wrote into `dir`.
    fn start(dir: &Path, faults: Faults) -> BridgedMock {
        let toml = std::fs::read_to_string(dir.join("herald-bridge.toml")).expect("config");
        let value = |key: &str| {
            let line = toml
                .lines()
                .find(|l| l.starts_with(&format!("{key} = ")))
                .unwrap_or_else(|| panic!("{key} in {toml}"));
            serde_json::from_str::<String>(line.split_once(" = ").unwrap().1).unwrap()
        };
        let app_id = toml
            .lines()
            .find_map(|l| l.strip_prefix("[bridges.fcm.\"")?.strip_suffix("\"]"))
            .expect("bridges table")
            .to_string();
        let account: Value =
            serde_json::from_str(&std::fs::read_to_string(value("credentials")).unwrap()).unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let listener = rt.block_on(TcpListener::bind("127.0.0.1:0")).expect("bind");
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(State {
            app_id,
            port,
            account,
            project_id: value("project_id"),
            base_url: value("base_url"),
            faults,
            channels: Mutex::new(HashMap::new()),
            devices: Mutex::new(HashMap::new()),
            access: tokio::sync::Mutex::new(None),
            pushes: AtomicU64::new(0),
            client: hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http(),
        });
        rt.spawn(async move {
            loop {
                let Ok((s, _)) = listener.accept().await else {
                    continue;
                };
                let st = state.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| handle(st.clone(), req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        BridgedMock { port, _rt: rt }
    }

    fn target(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

fn reply(status: u16, body: Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
    r
}

fn new_id() -> String {
    uuid::Builder::from_random_bytes(rand::random())
        .into_uuid()
        .to_string()
}

async fn handle(
    st: Arc<State>,
    req: Request<hyper::body::Incoming>,
) -> Result<Response<Full<Bytes>>, hyper::Error> {
    let path = req.uri().path().to_string();
    let auth = req
        .headers()
        .get("authorization")
        .map(|v| v.to_str().unwrap().to_string());
    let body = req.into_body().collect().await?.to_bytes();
    let parts: Vec<&str> = path.split('/').collect();
    if let ["", "wpush", chid] = parts.as_slice() {
        let n = st.pushes.fetch_add(1, Relaxed) + 1;
        let f = st.faults;
        // n starts at 1, and is a multiple of 0 only if 0: no fault when unset.
        if !n.is_multiple_of(f.drop_every) {
            let times = if n.is_multiple_of(f.twice_every) {
                2
            } else {
                1
            };
            for _ in 0..times {
                forward(&st, chid, &body).await;
            }
        }
        return Ok(reply(201, json!({})));
    }
    let base = format!("/v1/fcm/{}/registration", st.app_id);
    let endpoint = |chid: &str| format!("http://127.0.0.1:{}/wpush/{chid}", st.port);
    if path == base {
        let v: Value = serde_json::from_slice(&body).unwrap();
        let token = v["token"].as_str().unwrap().to_string();
        let (uaid, chid) = (new_id().replace('-', ""), new_id());
        st.channels
            .lock()
            .unwrap()
            .insert(chid.clone(), token.clone());
        st.devices.lock().unwrap().insert(uaid.clone(), token);
        return Ok(reply(
            200,
            json!({"uaid": uaid, "channelID": chid, "endpoint": endpoint(&chid), "secret": format!("s{uaid}")}),
        ));
    }
    if let Some(rest) = path.strip_prefix(&format!("{base}/")) {
        if let Some(uaid) = rest.strip_suffix("/subscription") {
            assert_eq!(auth, Some(format!("webpush s{uaid}")));
            let token = st.devices.lock().unwrap()[uaid].clone();
            let chid = new_id();
            st.channels.lock().unwrap().insert(chid.clone(), token);
            return Ok(reply(
                200,
                json!({"channelID": chid, "endpoint": endpoint(&chid)}),
            ));
        }
    }
    Ok(reply(
        404,
        json!({"code": 404, "errno": 102, "message": "not found"}),
    ))
}

/// What Herald's FCM bridge does with one push: a cached access token (a
/// signed grant the first time), then `messages:send`.
async fn forward(st: &State, chid: &str, body: &[u8]) {
    let token = {
        let mut access = st.access.lock().await;
        if access.is_none() {
            *access = Some(grant(st).await);
        }
        access.clone().unwrap()
    };
    let device = st.channels.lock().unwrap()[chid].clone();
    let msg = json!({"message": {"token": device, "android": {"ttl": "60s", "priority": "NORMAL",
        "data": {"chid": chid, "body": URL_SAFE_NO_PAD.encode(body), "con": "aes128gcm"}}}});
    let req = Request::post(format!(
        "{}/v1/projects/{}/messages:send",
        st.base_url, st.project_id
    ))
    .header("authorization", format!("Bearer {token}"))
    .header("content-type", "application/json")
    .body(Full::new(Bytes::from(msg.to_string())))
    .unwrap();
    let resp = st.client.request(req).await.expect("messages:send");
    assert_eq!(resp.status(), 200);
}

async fn grant(st: &State) -> String {
    let a = &st.account;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = json!({"iss": a["client_email"], "aud": a["token_uri"],
        "scope": "https://www.googleapis.com/auth/firebase.messaging", "iat": now, "exp": now + 3600});
    let key =
        jsonwebtoken::EncodingKey::from_rsa_pem(a["private_key"].as_str().unwrap().as_bytes())
            .unwrap();
    let jwt = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256),
        &claims,
        &key,
    )
    .unwrap();
    let form =
        format!("grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer&assertion={jwt}");
    let req = Request::post(a["token_uri"].as_str().unwrap())
        .header("content-type", "application/x-www-form-urlencoded")
        .body(Full::new(Bytes::from(form)))
        .unwrap();
    let resp = st.client.request(req).await.expect("token endpoint");
    assert_eq!(resp.status(), 200);
    let v: Value =
        serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    v["access_token"].as_str().unwrap().to_string()
}

/// `bridge --write-config` into `dir` with a sink on a free loopback port.
fn write_config(dir: &Path) {
    let sink = format!("127.0.0.1:{}", free_port());
    let ran = run(
        &[
            "bridge",
            "--write-config",
            dir.to_str().unwrap(),
            "--sink",
            &sink,
            "--app-id",
            "mock-app",
        ],
        Duration::from_secs(60),
    );
    assert!(ran.ok, "{}", ran.stderr);
}

fn bridge_run(dir: &Path, target: &str, app: &str, extra: &[&str]) -> Vec<String> {
    let creds = dir.join("service-account.json");
    let mut v: Vec<String> = [
        "bridge",
        "--target",
        target,
        "--app-id",
        app,
        "--credentials",
        creds.to_str().unwrap(),
        "--uas",
        "10",
        "--channels",
        "2",
        "--senders",
        "2",
        "--payload",
        "200",
        "--duration",
        "60",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

#[test]
fn every_bridged_push_is_counted_once_at_the_sink() {
    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path());
    let mock = BridgedMock::start(dir.path(), Faults::default());
    let out = dir.path().join("bridge.json");
    let args = bridge_run(
        dir.path(),
        &mock.target(),
        "mock-app",
        &["--messages", "100"],
    );
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let b = scenario(&refs, &out, Duration::from_secs(120));
    assert_no_errors(&b);
    for (m, want) in [
        ("uas_registered", 10.0),
        ("channels", 20.0),
        ("sent", 100.0),
        ("accepted", 100.0),
        ("forwarded", 100.0),
        ("lost", 0.0),
        ("duplicates", 0.0),
        ("misrouted", 0.0),
        ("sink_sends", 100.0),
        ("sink_grants", 1.0),
    ] {
        assert_eq!(metric(&b, m), want, "{m}");
    }
    assert!(metric(&b, "forwarded_per_s") > 0.0);
    assert_latency(&b, "end_to_end", 100);
    assert_latency(&b, "registration", 10);
}

#[test]
fn lost_and_duplicated_pushes_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path());
    let faults = Faults {
        drop_every: 10,
        twice_every: 7,
    };
    let mock = BridgedMock::start(dir.path(), faults);
    let out = dir.path().join("bridge.json");
    let args = bridge_run(
        dir.path(),
        &mock.target(),
        "mock-app",
        &["--messages", "70", "--drain", "1"],
    );
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let b = scenario(&refs, &out, Duration::from_secs(120));
    // Pushes 10, 20 ... 70 never leave the mock; 7, 14 ... 63 arrive twice.
    assert_eq!(metric(&b, "accepted"), 70.0);
    assert_eq!(metric(&b, "forwarded"), 63.0);
    assert_eq!(metric(&b, "lost"), 7.0);
    assert_eq!(metric(&b, "duplicates"), 9.0);
    assert_eq!(b["errors"]["lost (accepted, never at the sink)"], 7);
    assert_eq!(b["errors"]["duplicate at the sink"], 9);
}

/// A Herald without the registration API must stop the run, loudly.
#[test]
fn a_missing_registration_api_fails_the_run() {
    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path());
    let mock = BridgedMock::start(dir.path(), Faults::default());
    let args = bridge_run(dir.path(), &mock.target(), "unknown-app", &[]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let ran = run(&refs, Duration::from_secs(60));
    assert!(!ran.ok);
    assert!(
        ran.stderr
            .contains("Herald answered 404 to POST /v1/fcm/unknown-app/registration"),
        "{}",
        ran.stderr
    );
}
