//! A loopback stand-in for Firebase Cloud Messaging (HTTP v1) and Google's
//! OAuth2 token endpoint, for any integration test:
//!
//! ```ignore
//! #[path = "support/fcm_mock.rs"]
//! mod fcm_mock;
//! let fcm = fcm_mock::FcmMock::start();
//! // settings: base_url = fcm.url(), credentials = fcm.credentials_path(),
//! // project_id = fcm.project_id()
//! fcm.script([fcm_mock::Reply::Unregistered]);
//! ... fcm.requests() ...
//! ```
//!
//! `POST /token` checks the RS256 grant against the service account's
//! public key (with the `rsa` crate, not the JWT library Herald signs
//! with) and its `iss`, `aud`, `scope`, `iat` and `exp`, then issues a
//! token living `expires_in` seconds (settable, so tests see refreshes).
//! `POST /v1/projects/{project}/messages:send` answers 401 to a bearer
//! token it did not issue or that ran out, records every request, and
//! otherwise answers the next scripted `Reply` (200 once the script is
//! empty) with the error JSON real FCM sends.
//!
//! The server runs on its own thread and runtime, so blocking and async
//! tests alike can use it; it stops when the `FcmMock` is dropped.
#![allow(dead_code)]

use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use rsa::pkcs8::{EncodePrivateKey, LineEnding};
use rsa::{Pkcs1v15Sign, RsaPrivateKey, RsaPublicKey};
use serde_json::{json, Value};
use sha2::Digest;
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub const SCOPE: &str = "https://www.googleapis.com/auth/firebase.messaging";
pub const CLIENT_EMAIL: &str = "herald-test@herald-test.iam.gserviceaccount.com";
pub const PROJECT_ID: &str = "herald-test";

/// What `messages:send` answers next.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// 200 `{"name":"projects/{p}/messages/{n}"}`.
    Ok,
    /// 404 NOT_FOUND / UNREGISTERED: the app was uninstalled.
    Unregistered,
    /// 400 INVALID_ARGUMENT "The registration token is not a valid FCM
    /// registration token".
    InvalidToken,
    /// 400 INVALID_ARGUMENT about the message (a bad TTL), not the token.
    InvalidArgument,
    /// 403 PERMISSION_DENIED / SENDER_ID_MISMATCH.
    SenderIdMismatch,
    /// 429 RESOURCE_EXHAUSTED / QUOTA_EXCEEDED with this `Retry-After`.
    TooManyRequests { retry_after: String },
    /// 503 UNAVAILABLE.
    Unavailable,
    /// 500 INTERNAL.
    Internal,
    /// 401 UNAUTHENTICATED, whatever the token.
    Unauthenticated,
    /// No answer at all (the client's timeout must fire).
    Stall,
}

/// One request `messages:send` received, and the status it answered.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Value,
    pub status: u16,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn android(&self) -> &Value {
        &self.body["message"]["android"]
    }
    /// `android.data`, or `message.data` (FCM takes either).
    pub fn data(&self) -> &Value {
        match self.android().get("data") {
            Some(d) => d,
            None => &self.body["message"]["data"],
        }
    }
}

struct State {
    public_key: RsaPublicKey,
    client_email: String,
    token_uri: String,
    project_id: String,
    expires_in: u64,
    /// Issued access tokens and when each runs out.
    issued: HashMap<String, Instant>,
    grants: usize,
    refused_grants: Vec<String>,
    script: VecDeque<Reply>,
    requests: Vec<Recorded>,
    sent: u64,
}

pub struct FcmMock {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    dir: tempfile::TempDir,
    credentials: PathBuf,
    /// `https://localhost:<port>` when serving TLS, `http://127.0.0.1:<port>`
    /// otherwise.
    base: String,
    /// The PEM certificate to trust (`ca` setting) when serving TLS.
    ca: Option<PathBuf>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// The service account's key, made once per test process (RSA key
/// generation is slow).
pub fn account_key() -> &'static RsaPrivateKey {
    static KEY: OnceLock<RsaPrivateKey> = OnceLock::new();
    KEY.get_or_init(|| RsaPrivateKey::new(&mut rand::thread_rng(), 2048).expect("RSA key"))
}

/// Another RSA key, for credentials the mock must refuse.
pub fn foreign_key() -> &'static RsaPrivateKey {
    static KEY: OnceLock<RsaPrivateKey> = OnceLock::new();
    KEY.get_or_init(|| RsaPrivateKey::new(&mut rand::thread_rng(), 2048).expect("RSA key"))
}

/// Writes a Google service-account key file (PKCS#8 PEM key) into `dir`.
pub fn write_credentials(
    dir: &Path,
    name: &str,
    key: &RsaPrivateKey,
    client_email: &str,
    token_uri: &str,
) -> PathBuf {
    let pem = key.to_pkcs8_pem(LineEnding::LF).expect("PKCS#8 PEM");
    let file = json!({
        "type": "service_account",
        "project_id": PROJECT_ID,
        "private_key_id": "0123456789abcdef",
        "private_key": pem.as_str(),
        "client_email": client_email,
        "client_id": "100000000000000000001",
        "auth_uri": "https://accounts.google.com/o/oauth2/auth",
        "token_uri": token_uri,
        "universe_domain": "googleapis.com",
    });
    let path = dir.join(name);
    std::fs::write(&path, serde_json::to_vec_pretty(&file).unwrap()).expect("write credentials");
    path
}

impl FcmMock {
    /// Plain http on 127.0.0.1.
    pub fn start() -> FcmMock {
        Self::start_with(false)
    }

    /// https on `localhost` with a self-signed certificate (`ca_path()`).
    pub fn start_tls() -> FcmMock {
        Self::start_with(true)
    }

    fn start_with(tls: bool) -> FcmMock {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let dir = tempfile::tempdir().expect("temp dir");
        let (base, acceptor, ca) = if tls {
            let (acceptor, ca) = tls_acceptor(dir.path());
            (
                format!("https://localhost:{}", addr.port()),
                Some(acceptor),
                Some(ca),
            )
        } else {
            (format!("http://{addr}"), None, None)
        };
        let token_uri = format!("{base}/token");
        let credentials = write_credentials(
            dir.path(),
            "service-account.json",
            account_key(),
            CLIENT_EMAIL,
            &token_uri,
        );
        let state = Arc::new(Mutex::new(State {
            public_key: account_key().to_public_key(),
            client_email: CLIENT_EMAIL.into(),
            token_uri,
            project_id: PROJECT_ID.into(),
            expires_in: 3600,
            issued: HashMap::new(),
            grants: 0,
            refused_grants: Vec::new(),
            script: VecDeque::new(),
            requests: Vec::new(),
            sent: 0,
        }));
        let (tx, rx) = tokio::sync::oneshot::channel();
        let served = state.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("mock runtime");
            rt.block_on(serve(listener, acceptor, served, rx));
        });
        FcmMock {
            addr,
            state,
            dir,
            credentials,
            base,
            ca,
            shutdown: Some(tx),
            thread: Some(thread),
        }
    }

    /// The `base_url` to configure.
    pub fn url(&self) -> String {
        self.base.clone()
    }
    pub fn token_uri(&self) -> String {
        format!("{}/token", self.base)
    }
    /// The certificate to trust for `start_tls()`'s mock.
    pub fn ca_path(&self) -> Option<PathBuf> {
        self.ca.clone()
    }
    pub fn credentials_path(&self) -> PathBuf {
        self.credentials.clone()
    }
    pub fn project_id(&self) -> &'static str {
        PROJECT_ID
    }
    /// A directory that lives as long as the mock, for more files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Queues answers for the next `messages:send` requests, in order.
    pub fn script(&self, replies: impl IntoIterator<Item = Reply>) {
        self.state.lock().unwrap().script.extend(replies);
    }
    /// Every `messages:send` request so far, oldest first.
    pub fn requests(&self) -> Vec<Recorded> {
        self.state.lock().unwrap().requests.clone()
    }
    /// Grants verified and answered with a token.
    pub fn grants(&self) -> usize {
        self.state.lock().unwrap().grants
    }
    /// Why each refused grant was refused.
    pub fn refused_grants(&self) -> Vec<String> {
        self.state.lock().unwrap().refused_grants.clone()
    }
    /// The lifetime of tokens issued from now on.
    pub fn set_expires_in(&self, secs: u64) {
        self.state.lock().unwrap().expires_in = secs;
    }
    /// Makes every token issued so far invalid (401 on its next use).
    pub fn revoke_tokens(&self) {
        self.state.lock().unwrap().issued.clear();
    }
}

impl Drop for FcmMock {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A self-signed certificate for `localhost`, written to `dir/ca.pem`.
fn tls_acceptor(dir: &Path) -> (tokio_rustls::TlsAcceptor, PathBuf) {
    use rustls::pki_types::{pem::PemObject, PrivateKeyDer};
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let ca = dir.join("ca.pem");
    std::fs::write(&ca, cert.cert.pem()).unwrap();
    let key = PrivateKeyDer::from_pem_slice(cert.signing_key.serialize_pem().as_bytes()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.cert.der().clone()], key)
        .unwrap();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    (tokio_rustls::TlsAcceptor::from(Arc::new(config)), ca)
}

async fn serve(
    listener: std::net::TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    state: Arc<Mutex<State>>,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) {
    let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
    loop {
        let stream = tokio::select! {
            _ = &mut stop => return,
            accepted = listener.accept() => match accepted {
                Ok((s, _)) => s,
                Err(_) => continue,
            },
        };
        let state = state.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| handle(req, state.clone()));
            let http = hyper::server::conn::http1::Builder::new();
            let _ = match tls {
                None => {
                    http.serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await
                }
                Some(tls) => match tls.accept(stream).await {
                    Ok(s) => {
                        http.serve_connection(hyper_util::rt::TokioIo::new(s), service)
                            .await
                    }
                    Err(_) => return,
                },
            };
        });
    }
}

type Resp = http::Response<Full<Bytes>>;

fn respond(status: u16, headers: &[(&str, &str)], body: Value) -> Resp {
    let mut b = http::Response::builder()
        .status(status)
        .header("content-type", "application/json; charset=UTF-8");
    for (n, v) in headers {
        b = b.header(*n, *v);
    }
    b.body(Full::new(Bytes::from(body.to_string()))).unwrap()
}

async fn handle(
    req: http::Request<hyper::body::Incoming>,
    state: Arc<Mutex<State>>,
) -> Result<Resp, std::convert::Infallible> {
    let path = req.uri().path().to_owned();
    let method = req.method().clone();
    let headers: Vec<(String, String)> = req
        .headers()
        .iter()
        .map(|(n, v)| (n.to_string(), String::from_utf8_lossy(v.as_bytes()).into()))
        .collect();
    let body = req.into_body().collect().await.unwrap().to_bytes();
    if method != http::Method::POST {
        return Ok(google_error(
            405,
            "Method not allowed",
            "INVALID_ARGUMENT",
            None,
        ));
    }
    if path == "/token" {
        return Ok(token_endpoint(&body, &state));
    }
    let project = state.lock().unwrap().project_id.clone();
    if path != format!("/v1/projects/{project}/messages:send") {
        return Ok(google_error(
            404,
            "Requested entity was not found.",
            "NOT_FOUND",
            None,
        ));
    }
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let reply = send_reply(&headers, &body, &state);
    let status = reply.as_ref().map_or(0, |(s, _, _)| *s);
    state.lock().unwrap().requests.push(Recorded {
        path,
        headers,
        body,
        status,
    });
    match reply {
        Some((status, headers, body)) => {
            let h: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
            Ok(respond(status, &h, body))
        }
        None => {
            std::future::pending::<()>().await;
            unreachable!()
        }
    }
}

/// FCM's error JSON: canonical `status`, and FCM's own `errorCode` in
/// `details` when there is one.
fn error_json(code: u16, message: &str, status: &str, fcm_code: Option<&str>) -> Value {
    let mut error = json!({"code": code, "message": message, "status": status});
    if let Some(c) = fcm_code {
        error["details"] = json!([{
            "@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError",
            "errorCode": c,
        }]);
    }
    json!({ "error": error })
}

fn google_error(code: u16, message: &str, status: &str, fcm_code: Option<&str>) -> Resp {
    respond(code, &[], error_json(code, message, status, fcm_code))
}

/// FCM's 4096-byte data limit counts the data map's keys and values;
/// measured here as its JSON.
fn data_len(body: &Value) -> usize {
    let android = &body["message"]["android"];
    let data = android.get("data").unwrap_or(&body["message"]["data"]);
    serde_json::to_vec(data).map_or(0, |v| v.len())
}

type Answer = (u16, Vec<(&'static str, String)>, Value);

/// The answer to one `messages:send`, or None to stall.
fn send_reply(headers: &[(String, String)], body: &Value, state: &Mutex<State>) -> Option<Answer> {
    let mut s = state.lock().unwrap();
    let bearer = headers
        .iter()
        .find(|(n, _)| n == "authorization")
        .and_then(|(_, v)| v.strip_prefix("Bearer "));
    let valid = bearer
        .and_then(|t| s.issued.get(t))
        .is_some_and(|until| Instant::now() < *until);
    let reply = if !valid {
        Reply::Unauthenticated
    } else if data_len(body) > 4096 {
        return Some((
            400,
            Vec::new(),
            error_json(
                400,
                "Message is too big",
                "INVALID_ARGUMENT",
                Some("INVALID_ARGUMENT"),
            ),
        ));
    } else {
        s.script.pop_front().unwrap_or(Reply::Ok)
    };
    let err = |code: u16, message: &str, status: &str, fcm: Option<&str>| {
        (code, Vec::new(), error_json(code, message, status, fcm))
    };
    Some(match reply {
        Reply::Ok => {
            s.sent += 1;
            let name = format!("projects/{}/messages/{}", s.project_id, s.sent);
            (200, Vec::new(), json!({ "name": name }))
        }
        Reply::Unregistered => err(
            404,
            "Requested entity was not found.",
            "NOT_FOUND",
            Some("UNREGISTERED"),
        ),
        Reply::InvalidToken => err(
            400,
            "The registration token is not a valid FCM registration token",
            "INVALID_ARGUMENT",
            Some("INVALID_ARGUMENT"),
        ),
        Reply::InvalidArgument => err(
            400,
            "Invalid value at 'message.android.ttl' (type.googleapis.com/google.protobuf.Duration), Field 'ttl', Illegal duration format; duration must end with 's'",
            "INVALID_ARGUMENT",
            Some("INVALID_ARGUMENT"),
        ),
        Reply::SenderIdMismatch => err(
            403,
            "SenderId mismatch",
            "PERMISSION_DENIED",
            Some("SENDER_ID_MISMATCH"),
        ),
        Reply::TooManyRequests { retry_after } => {
            let (c, _, b) = err(
                429,
                "Quota exceeded for quota metric 'Send requests'",
                "RESOURCE_EXHAUSTED",
                Some("QUOTA_EXCEEDED"),
            );
            (c, vec![("retry-after", retry_after)], b)
        }
        Reply::Unavailable => err(503, "The service is currently unavailable.", "UNAVAILABLE", Some("UNAVAILABLE")),
        Reply::Internal => err(500, "Internal error encountered.", "INTERNAL", Some("INTERNAL")),
        Reply::Unauthenticated => err(
            401,
            "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie or other valid authentication credential.",
            "UNAUTHENTICATED",
            None,
        ),
        Reply::Stall => return None,
    })
}

/// Google's token endpoint for the JWT bearer grant.
fn token_endpoint(body: &[u8], state: &Mutex<State>) -> Resp {
    let mut s = state.lock().unwrap();
    match check_grant(body, &s) {
        Ok(()) => {
            s.grants += 1;
            let token = format!("ya29.mock-{}-{}", s.grants, rand::random::<u64>());
            let expires_in = s.expires_in;
            s.issued.insert(
                token.clone(),
                Instant::now() + Duration::from_secs(expires_in),
            );
            respond(
                200,
                &[],
                json!({"access_token": token, "expires_in": expires_in, "token_type": "Bearer"}),
            )
        }
        Err(why) => {
            s.refused_grants.push(why.clone());
            respond(
                400,
                &[],
                json!({"error": "invalid_grant", "error_description": why}),
            )
        }
    }
}

/// Percent-decodes one `application/x-www-form-urlencoded` value.
fn form_decode(v: &str) -> Option<String> {
    let mut out = Vec::new();
    let b = v.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 2;
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

fn b64url(part: &str) -> Result<Vec<u8>, String> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part.trim_end_matches('='))
        .map_err(|e| format!("bad base64url in the JWT: {e}"))
}

/// Checks a grant as Google does: form fields, RS256 signature by the
/// service account's key, and the claims.
fn check_grant(body: &[u8], s: &State) -> Result<(), String> {
    let form = std::str::from_utf8(body).map_err(|_| "form is not UTF-8")?;
    let mut fields = HashMap::new();
    for pair in form.split('&') {
        let (k, v) = pair.split_once('=').ok_or("form pair without =")?;
        fields.insert(
            form_decode(k).ok_or("bad form")?,
            form_decode(v).ok_or("bad form")?,
        );
    }
    if fields.get("grant_type").map(String::as_str)
        != Some("urn:ietf:params:oauth:grant-type:jwt-bearer")
    {
        return Err(format!("wrong grant_type {:?}", fields.get("grant_type")));
    }
    let jwt = fields.get("assertion").ok_or("no assertion")?;
    let parts: Vec<&str> = jwt.split('.').collect();
    let [header, claims, signature] = parts[..] else {
        return Err("assertion is not a compact JWS".into());
    };
    let header: Value = serde_json::from_slice(&b64url(header)?).map_err(|e| e.to_string())?;
    if header["alg"] != "RS256" {
        return Err(format!("alg {} is not RS256", header["alg"]));
    }
    let digest = sha2::Sha256::digest(format!("{}.{}", parts[0], parts[1]).as_bytes());
    s.public_key
        .verify(
            Pkcs1v15Sign::new::<sha2::Sha256>(),
            &digest,
            &b64url(signature)?,
        )
        .map_err(|_| "Invalid JWT Signature.".to_string())?;
    let c: Value = serde_json::from_slice(&b64url(claims)?).map_err(|e| e.to_string())?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let (iat, exp) = (
        c["iat"].as_u64().ok_or("no iat")?,
        c["exp"].as_u64().ok_or("no exp")?,
    );
    if c["iss"] != s.client_email.as_str() {
        return Err(format!("iss {} is not the service account", c["iss"]));
    }
    if c["aud"] != s.token_uri.as_str() {
        return Err(format!("aud {} is not {}", c["aud"], s.token_uri));
    }
    if c["scope"] != SCOPE {
        return Err(format!("scope {} is not FCM's", c["scope"]));
    }
    if iat > now + 60 || exp <= now || exp <= iat || exp - iat > 3600 {
        return Err(format!(
            "Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable timeframe (iat {iat}, exp {exp}, now {now})"
        ));
    }
    Ok(())
}
