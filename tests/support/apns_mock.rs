//! A mock Apple Push Notification service on loopback, for the APNs bridge
//! and any test that pushes to an iOS registration.
//!
//! Like APNs it speaks only HTTP/2 over TLS (ALPN `h2`), with a server
//! certificate from a test CA made here by `rcgen` (`ca_path()` is the CA
//! PEM a bridge's `ca` setting names). It checks what APNs checks before
//! looking at a push: the path, the `apns-topic`, and the provider token:
//! an ES256 JWT whose `kid` and `iss` are this mock's key and team ids,
//! signed (raw `r‖s`) by the `.p8` key at `key_path()`, and no older than
//! an hour. With `start_with_client_certs()` it instead requires a TLS
//! client certificate signed by the test CA (`client_cert_path()`,
//! `client_key_path()`).
//!
//! Every request that reaches it is recorded (`requests()`); a request
//! that passes the checks is answered from the script (`script(...)`),
//! and with 200 once the script is empty.
//!
//! Runs on a thread of its own with its own runtime, so it serves sync and
//! async tests alike and outlives no test: dropping the handle stops it and
//! closes its connections.
#![allow(dead_code)]

use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use p256::ecdsa::signature::Verifier;
use p256::ecdsa::{Signature, SigningKey, VerifyingKey};
use p256::pkcs8::{EncodePrivateKey, LineEnding};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::Value;
use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub const TEAM_ID: &str = "HERALDTEAM";
pub const KEY_ID: &str = "HERALDKEY1";
pub const TOPIC: &str = "org.mozilla.ios.Herald";

/// How the mock answers one push that passed its checks.
#[derive(Debug, Clone)]
pub enum Answer {
    /// 200 with an `apns-id`.
    Ok,
    /// `status` with `{"reason": reason}` (and a `timestamp` for 410), and
    /// `Retry-After` when given.
    Error {
        status: u16,
        reason: &'static str,
        retry_after: Option<u64>,
    },
    /// Resets the stream without an answer (a lost connection, as the
    /// client sees it).
    Reset,
    /// Answers 200 only after this long (a timeout, as the client sees it).
    Delay(Duration),
}

impl Answer {
    pub fn unregistered() -> Answer {
        Answer::error(410, "Unregistered")
    }
    pub fn bad_device_token() -> Answer {
        Answer::error(400, "BadDeviceToken")
    }
    pub fn too_many_requests(retry_after: Option<u64>) -> Answer {
        Answer::Error {
            status: 429,
            reason: "TooManyRequests",
            retry_after,
        }
    }
    pub fn expired_provider_token() -> Answer {
        Answer::error(403, "ExpiredProviderToken")
    }
    pub fn service_unavailable() -> Answer {
        Answer::error(503, "ServiceUnavailable")
    }
    pub fn error(status: u16, reason: &'static str) -> Answer {
        Answer::Error {
            status,
            reason,
            retry_after: None,
        }
    }
}

/// One request as the mock saw it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    /// Lower-case names; the last value of a repeated header.
    pub headers: BTreeMap<String, String>,
    /// The body as JSON (`Value::Null` when it was not JSON).
    pub body: Value,
    pub body_len: usize,
    /// The provider token's `iat`, when the token verified.
    pub token_iat: Option<u64>,
    /// The status the mock answered (0 for a reset).
    pub status: u16,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
    /// The device token from `/3/device/{token}`.
    pub fn device_token(&self) -> &str {
        self.path.strip_prefix("/3/device/").unwrap_or("")
    }
}

#[derive(Default)]
struct State {
    script: VecDeque<Answer>,
    requests: Vec<Recorded>,
}

struct Shared {
    state: Mutex<State>,
    verifying_key: VerifyingKey,
    client_certs: bool,
    connections: AtomicUsize,
}

pub struct ApnsMock {
    addr: SocketAddr,
    dir: tempfile::TempDir,
    shared: Arc<Shared>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ApnsMock {
    /// Token authentication: pushes must carry a provider token.
    pub fn start() -> ApnsMock {
        Self::start_inner(false)
    }

    /// Certificate authentication: connections must present a client
    /// certificate signed by the test CA; no provider token is asked for.
    pub fn start_with_client_certs() -> ApnsMock {
        Self::start_inner(true)
    }

    fn start_inner(client_certs: bool) -> ApnsMock {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::make(dir.path());
        let signing = SigningKey::random(&mut rand::rngs::OsRng);
        let p8 = signing.to_pkcs8_pem(LineEnding::LF).unwrap();
        std::fs::write(dir.path().join("AuthKey.p8"), p8.as_bytes()).unwrap();
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            verifying_key: *signing.verifying_key(),
            client_certs,
            connections: AtomicUsize::new(0),
        });
        let tls = pki.server_config(client_certs);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let serving = shared.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(serve(listener, tls, serving, stopped));
        });
        ApnsMock {
            addr,
            dir,
            shared,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// `https://127.0.0.1:PORT`, for a bridge's `base_url`.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }
    /// The test CA's certificate (PEM), for a bridge's `ca`.
    pub fn ca_path(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }
    /// The `.p8` signing key whose public half the mock verifies with.
    pub fn key_path(&self) -> PathBuf {
        self.dir.path().join("AuthKey.p8")
    }
    pub fn client_cert_path(&self) -> PathBuf {
        self.dir.path().join("client.pem")
    }
    pub fn client_key_path(&self) -> PathBuf {
        self.dir.path().join("client.key")
    }
    /// A directory that lives as long as the mock, for a test's own files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Answers for the next pushes, in order, after those still queued.
    pub fn script(&self, answers: impl IntoIterator<Item = Answer>) {
        self.state().script.extend(answers);
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.state().requests.clone()
    }

    /// TLS connections accepted so far.
    pub fn connections(&self) -> usize {
        self.shared.connections.load(Ordering::SeqCst)
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.shared.state.lock().unwrap()
    }
}

impl Drop for ApnsMock {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn serve(
    listener: std::net::TcpListener,
    tls: rustls::ServerConfig,
    shared: Arc<Shared>,
    mut stopped: tokio::sync::oneshot::Receiver<()>,
) {
    let listener = tokio::net::TcpListener::from_std(listener).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    loop {
        let stream = tokio::select! {
            _ = &mut stopped => return,
            accepted = listener.accept() => match accepted {
                Ok((s, _)) => s,
                Err(_) => continue,
            },
        };
        let acceptor = acceptor.clone();
        let shared = shared.clone();
        tokio::spawn(async move {
            // A client without the certificate asked for fails here.
            let Ok(tls) = acceptor.accept(stream).await else {
                return;
            };
            shared.connections.fetch_add(1, Ordering::SeqCst);
            let service = service_fn(move |req| handle(shared.clone(), req));
            let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tls), service)
                .await;
        });
    }
}

type Reply = Result<hyper::Response<Full<Bytes>>, std::io::Error>;

async fn handle(shared: Arc<Shared>, req: hyper::Request<hyper::body::Incoming>) -> Reply {
    let method = req.method().to_string();
    let path = req.uri().path().to_string();
    let headers: BTreeMap<String, String> = req
        .headers()
        .iter()
        .map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap_or("").to_string()))
        .collect();
    let body = req.into_body().collect().await.unwrap().to_bytes();
    let mut record = Recorded {
        method,
        path,
        body: serde_json::from_slice(&body).unwrap_or(Value::Null),
        body_len: body.len(),
        headers,
        token_iat: None,
        status: 0,
    };
    let answer = match check(&shared, &mut record) {
        Err(refusal) => refusal,
        Ok(()) => {
            let scripted = shared.state.lock().unwrap().script.pop_front();
            scripted.unwrap_or(Answer::Ok)
        }
    };
    if let Answer::Delay(d) = &answer {
        tokio::time::sleep(*d).await;
    }
    record.status = match &answer {
        Answer::Ok | Answer::Delay(_) => 200,
        Answer::Error { status, .. } => *status,
        Answer::Reset => 0,
    };
    let apns_id = record
        .header("apns-id")
        .map(str::to_string)
        .unwrap_or_else(|| uuid::Uuid::new_v4().hyphenated().to_string());
    shared.state.lock().unwrap().requests.push(record);
    respond(answer, &apns_id)
}

fn respond(answer: Answer, apns_id: &str) -> Reply {
    let builder = hyper::Response::builder().header("apns-id", apns_id);
    match answer {
        Answer::Ok | Answer::Delay(_) => Ok(builder.status(200).body(Full::default()).unwrap()),
        Answer::Reset => Err(std::io::Error::other("scripted reset")),
        Answer::Error {
            status,
            reason,
            retry_after,
        } => {
            let mut body = serde_json::json!({ "reason": reason });
            if status == 410 {
                body["timestamp"] = now_ms().into();
            }
            let mut b = builder
                .status(status)
                .header("content-type", "application/json");
            if let Some(s) = retry_after {
                b = b.header("retry-after", s.to_string());
            }
            Ok(b.body(Full::new(Bytes::from(body.to_string()))).unwrap())
        }
    }
}

/// APNs' own checks, in its order: path, topic, provider token, payload.
fn check(shared: &Shared, r: &mut Recorded) -> Result<(), Answer> {
    if r.method != "POST" {
        return Err(Answer::error(405, "MethodNotAllowed"));
    }
    if r.device_token().is_empty() || r.device_token().contains('/') {
        return Err(Answer::error(404, "BadPath"));
    }
    match r.header("apns-topic") {
        None => return Err(Answer::error(400, "MissingTopic")),
        Some(t) if t != TOPIC => return Err(Answer::error(400, "TopicDisallowed")),
        Some(_) => {}
    }
    if !shared.client_certs {
        let Some(jwt) = r
            .header("authorization")
            .and_then(|a| a.strip_prefix("bearer "))
        else {
            return Err(Answer::error(403, "MissingProviderToken"));
        };
        let iat = verify_token(&shared.verifying_key, jwt)
            .map_err(|_| Answer::error(403, "InvalidProviderToken"))?;
        if iat + 3600 < now_s() {
            return Err(Answer::expired_provider_token());
        }
        r.token_iat = Some(iat);
    }
    if r.body_len == 0 {
        return Err(Answer::error(400, "PayloadEmpty"));
    }
    if r.body_len > 4096 {
        return Err(Answer::error(413, "PayloadTooLarge"));
    }
    Ok(())
}

/// A compact ES256 JWS with this mock's ids: its `iat`, or why not.
pub fn verify_token(key: &VerifyingKey, jwt: &str) -> Result<u64, String> {
    let b64 = |s: &str| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(s)
            .map_err(|e| format!("base64url: {e}"))
    };
    let parts: Vec<&str> = jwt.split('.').collect();
    let [header, claims, signature] = parts[..] else {
        return Err("not three parts".into());
    };
    let h: Value = serde_json::from_slice(&b64(header)?).map_err(|e| e.to_string())?;
    if h != serde_json::json!({"alg": "ES256", "kid": KEY_ID}) {
        return Err(format!("header {h}"));
    }
    let c: Value = serde_json::from_slice(&b64(claims)?).map_err(|e| e.to_string())?;
    if c["iss"] != TEAM_ID {
        return Err(format!("claims {c}"));
    }
    let iat = c["iat"].as_u64().ok_or(format!("claims {c}"))?;
    let signature = Signature::from_slice(&b64(signature)?).map_err(|e| e.to_string())?;
    key.verify(format!("{header}.{claims}").as_bytes(), &signature)
        .map_err(|e| e.to_string())?;
    Ok(iat)
}

fn now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn now_ms() -> u64 {
    now_s() * 1000
}

/// The test CA, the server's certificate and a client certificate, all
/// written beside each other.
struct Pki {
    ca: CertificateDer<'static>,
    server_chain: Vec<CertificateDer<'static>>,
    server_key: PrivateKeyDer<'static>,
}

impl Pki {
    fn make(dir: &Path) -> Pki {
        use rcgen::{
            BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose,
            IsCa, KeyPair, KeyUsagePurpose,
        };
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "Herald APNs mock CA");
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap();
        let issuer: &rcgen::Issuer<'_, KeyPair> = &ca;

        let server_key = KeyPair::generate().unwrap();
        let server = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".into()])
            .unwrap()
            .signed_by(&server_key, issuer)
            .unwrap();

        let client_key = KeyPair::generate().unwrap();
        let mut client = CertificateParams::new(Vec::<String>::new()).unwrap();
        client
            .distinguished_name
            .push(DnType::CommonName, format!("Apple Push Services: {TOPIC}"));
        client.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let client = client.signed_by(&client_key, issuer).unwrap();

        std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
        std::fs::write(dir.join("client.pem"), client.pem()).unwrap();
        std::fs::write(dir.join("client.key"), client_key.serialize_pem()).unwrap();
        Pki {
            ca: ca.der().clone(),
            server_chain: vec![server.der().clone()],
            server_key: PrivateKeyDer::from_pem_slice(server_key.serialize_pem().as_bytes())
                .unwrap(),
        }
    }

    fn server_config(&self, client_certs: bool) -> rustls::ServerConfig {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap();
        let builder = if client_certs {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(self.ca.clone()).unwrap();
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .unwrap();
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let mut config = builder
            .with_single_cert(self.server_chain.clone(), self.server_key.clone_key())
            .unwrap();
        // APNs speaks HTTP/2 only: a client that cannot is refused at ALPN.
        config.alpn_protocols = vec![b"h2".to_vec()];
        config
    }
}
