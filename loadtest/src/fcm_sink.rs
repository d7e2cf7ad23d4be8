//! An FCM-shaped HTTP server on loopback, standing in for Google at the far
//! end of Herald's FCM bridge: the OAuth2 token endpoint a service account's
//! `token_uri` names, and FCM HTTP v1's `messages:send`. It checks what a
//! real FCM would refuse (an unsigned or foreign grant, a bearer token it
//! never issued, a body that is not a v1 message) and hands every accepted
//! message to the scenario, which does the counting.
//!
//! Also makes the service-account JSON Herald reads: a fresh RSA key, so
//! the sink can verify the grants signed with it.

use anyhow::{anyhow, bail, Context, Result};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use rsa::pkcs8::{DecodePrivateKey, EncodePrivateKey, LineEnding};
use rsa::traits::PublicKeyParts;
use rsa::{RsaPrivateKey, RsaPublicKey};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;

/// The OAuth2 grant type of a service-account JWT (RFC 7523).
pub const JWT_BEARER: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
/// The scope FCM HTTP v1 needs.
pub const FCM_SCOPE: &str = "https://www.googleapis.com/auth/firebase.messaging";
/// Lifetime of the access tokens the sink issues, as Google's.
const TOKEN_LIFETIME: Duration = Duration::from_secs(3600);

/// What the sink needs from a service-account file: who signs the grants,
/// where they are sent, and the public half of the key that signs them.
pub struct Credentials {
    pub client_email: String,
    pub token_uri: String,
    /// Where the sink listens: `token_uri`'s host and port.
    pub addr: SocketAddr,
    /// `token_uri`'s path, where grants are POSTed.
    pub token_path: String,
    key: DecodingKey,
}

/// Reads a service-account JSON (`client_email`, `private_key`, `token_uri`);
/// the token URI must be plain http on a loopback address.
pub fn read_credentials(path: &Path) -> Result<Credentials> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let v: Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?;
    let field = |k: &str| {
        v[k].as_str()
            .map(str::to_string)
            .ok_or_else(|| anyhow!("{}: no string `{k}`", path.display()))
    };
    let (client_email, token_uri, pem) = (
        field("client_email")?,
        field("token_uri")?,
        field("private_key")?,
    );
    let private = RsaPrivateKey::from_pkcs8_pem(&pem).map_err(|e| {
        anyhow!(
            "{}: private_key is not an RSA PKCS#8 PEM: {e}",
            path.display()
        )
    })?;
    let public = RsaPublicKey::from(&private);
    let key = DecodingKey::from_rsa_components(
        &URL_SAFE_NO_PAD.encode(public.n().to_bytes_be()),
        &URL_SAFE_NO_PAD.encode(public.e().to_bytes_be()),
    )
    .context("public key")?;
    let (addr, token_path) = loopback_http(&token_uri)
        .with_context(|| format!("{}: token_uri {token_uri}", path.display()))?;
    Ok(Credentials {
        client_email,
        token_uri,
        addr,
        token_path,
        key,
    })
}

/// `http://<loopback ip>:<port>/<path>` split into address and path.
pub fn loopback_http(uri: &str) -> Result<(SocketAddr, String)> {
    let u: http::Uri = uri.parse().context("not a URL")?;
    if u.scheme_str() != Some("http") {
        bail!("the sink speaks plain http:// only");
    }
    let host = u.host().unwrap_or_default();
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let ip: std::net::IpAddr = host
        .parse()
        .map_err(|_| anyhow!("host {host:?} is not an IP address"))?;
    if !ip.is_loopback() {
        bail!("{ip} is not a loopback address");
    }
    let port = u.port_u16().unwrap_or(80);
    Ok((SocketAddr::new(ip, port), u.path().to_string()))
}

/// Writes `service-account.json` (a fresh 2048-bit RSA key; `token_uri` on
/// the sink at `sink`) and `herald-bridge.toml` (the `[bridges.fcm.<app_id>]`
/// table pointing Herald at the sink, and a `bridge_auth_keys` entry) into
/// `dir`. Returns both paths.
pub fn write_config(
    dir: &Path,
    sink: SocketAddr,
    app_id: &str,
    project_id: &str,
) -> Result<(PathBuf, PathBuf)> {
    if !sink.ip().is_loopback() {
        bail!("--sink {sink}: the sink listens on loopback addresses only");
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let dir = dir
        .canonicalize()
        .with_context(|| format!("resolving {}", dir.display()))?;
    let private = RsaPrivateKey::new(&mut rand::thread_rng(), 2048).context("making RSA key")?;
    let pem = private
        .to_pkcs8_pem(LineEnding::LF)
        .map_err(|e| anyhow!("encoding RSA key: {e}"))?;
    let account = json!({
        "type": "service_account",
        "project_id": project_id,
        "private_key_id": "herald-loadtest",
        "private_key": pem.as_str(),
        "client_email": format!("herald-loadtest@{project_id}.iam.gserviceaccount.com"),
        "client_id": "0",
        "token_uri": format!("http://{sink}/token"),
    });
    let creds = dir.join("service-account.json");
    std::fs::write(&creds, serde_json::to_string_pretty(&account)?)
        .with_context(|| format!("writing {}", creds.display()))?;
    let secret: [u8; 32] = rand::random();
    let hex: String = secret.iter().map(|b| format!("{b:02x}")).collect();
    // JSON strings are valid TOML basic strings (the same escapes).
    let q = |s: &str| serde_json::to_string(s).expect("a string serializes");
    let toml = format!(
        "# Written by `herald-loadtest bridge --write-config`: Herald's FCM bridge\n\
         # for app {app_id} points at the load generator's sink on {sink}.\n\
         bridge_auth_keys = [{key}]\n\n\
         [bridges.fcm.{app}]\n\
         project_id = {project}\n\
         credentials = {creds}\n\
         base_url = {base}\n",
        key = q(&hex),
        app = q(app_id),
        project = q(project_id),
        creds = q(&creds.display().to_string()),
        base = q(&format!("http://{sink}")),
    );
    let config = dir.join("herald-bridge.toml");
    std::fs::write(&config, toml).with_context(|| format!("writing {}", config.display()))?;
    Ok((creds, config))
}

/// One message as `messages:send` received it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct FcmMessage {
    /// The device's registration token.
    pub token: String,
    /// The data map's `chid`.
    pub chid: String,
    /// `body`: the push payload, base64url.
    pub body: Option<String>,
    /// `con`: its content encoding.
    pub con: Option<String>,
    /// `android.ttl`, e.g. "60s".
    pub ttl: Option<String>,
    /// `android.priority`.
    pub priority: Option<String>,
}

/// A `messages:send` body as FCM HTTP v1 takes it: `message.token` and a
/// data map with `chid`, in `message.android.data` (where Herald puts it) or
/// `message.data`; every data value a string.
pub fn parse_send(body: &[u8]) -> Result<FcmMessage, String> {
    let v: Value = serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
    let m = v.get("message").ok_or("no `message`")?;
    let token = m["token"].as_str().ok_or("no `message.token`")?;
    let android = &m["android"];
    let data = android
        .get("data")
        .or_else(|| m.get("data"))
        .and_then(Value::as_object)
        .ok_or("no data map (`message.android.data` or `message.data`)")?;
    if let Some((k, _)) = data.iter().find(|(_, v)| !v.is_string()) {
        return Err(format!("data value `{k}` is not a string"));
    }
    let s = |k: &str| data.get(k).and_then(Value::as_str).map(str::to_string);
    let chid = s("chid").ok_or("no `chid` in the data map")?;
    let text = |v: &Value| v.as_str().map(str::to_string);
    Ok(FcmMessage {
        token: token.to_string(),
        chid,
        body: s("body"),
        con: s("con"),
        ttl: text(&android["ttl"]),
        priority: text(&android["priority"]),
    })
}

/// The project of a `/v1/projects/{project}/messages:send` path.
pub fn send_path_project(path: &str) -> Option<&str> {
    let p = path.strip_prefix("/v1/projects/")?;
    let p = p.strip_suffix("/messages:send")?;
    (!p.is_empty() && !p.contains('/')).then_some(p)
}

/// The token of an `Authorization: Bearer <token>` header (scheme
/// case-insensitive).
pub fn bearer(header: Option<&str>) -> Option<&str> {
    let (scheme, token) = header?.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// The `assertion` of a form-encoded JWT-bearer grant.
pub fn parse_grant(body: &str) -> Result<String, String> {
    let grant = form_value(body, "grant_type").ok_or("no grant_type")?;
    if grant != JWT_BEARER {
        return Err(format!("grant_type {grant:?} is not {JWT_BEARER}"));
    }
    form_value(body, "assertion").ok_or_else(|| "no assertion".to_string())
}

/// The decoded value of `key` in an `application/x-www-form-urlencoded` body.
pub fn form_value(body: &str, key: &str) -> Option<String> {
    body.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (percent_decode(k)? == key).then(|| percent_decode(v))?
    })
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
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

#[derive(serde::Deserialize)]
struct GrantClaims {
    scope: String,
}

/// Counts of what the sink answered.
#[derive(Default)]
pub struct SinkCounts {
    /// Access tokens issued.
    pub grants: AtomicU64,
    /// Grants refused: bad form, bad signature, wrong iss/aud/scope, expired.
    pub grants_refused: AtomicU64,
    /// Messages answered 200.
    pub sends: AtomicU64,
    /// `messages:send` without a bearer token the sink issued (401).
    pub unauthorized: AtomicU64,
    /// `messages:send` whose body is not an FCM v1 message (400).
    pub malformed: AtomicU64,
    /// `messages:send` for another project, or an unknown path (404).
    pub not_found: AtomicU64,
}

/// Handed every message the sink accepts, at its arrival.
pub type OnMessage = Arc<dyn Fn(FcmMessage) + Send + Sync>;

struct State {
    creds: Credentials,
    project_id: String,
    tokens: Mutex<HashMap<String, Instant>>,
    counts: Arc<SinkCounts>,
    on_message: OnMessage,
}

/// The sink's listening socket, bound before anything else happens so that
/// a port in use is refused at once.
pub struct Sink {
    listener: TcpListener,
    creds: Credentials,
    project_id: String,
}

/// A running sink; stops accepting connections when dropped.
pub struct Running {
    pub counts: Arc<SinkCounts>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Sink {
    /// Binds the address of the credentials' `token_uri`.
    pub async fn bind(creds: Credentials, project_id: &str) -> Result<Sink> {
        let listener = TcpListener::bind(creds.addr).await.with_context(|| {
            format!(
                "the FCM sink cannot listen on {} (the credentials' token_uri)",
                creds.addr
            )
        })?;
        Ok(Sink {
            listener,
            creds,
            project_id: project_id.to_string(),
        })
    }

    pub fn addr(&self) -> Result<SocketAddr> {
        Ok(self.listener.local_addr()?)
    }

    /// Serves until the returned handle is dropped.
    pub fn serve(self, on_message: OnMessage) -> Running {
        let counts = Arc::new(SinkCounts::default());
        let state = Arc::new(State {
            creds: self.creds,
            project_id: self.project_id,
            tokens: Mutex::new(HashMap::new()),
            counts: counts.clone(),
            on_message,
        });
        let listener = self.listener;
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    // Out of descriptors, say: back off instead of spinning.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let state = state.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| handle(state.clone(), req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Running { counts, task }
    }
}

type Reply = Response<Full<Bytes>>;

fn reply(status: StatusCode, body: Value) -> Reply {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

/// FCM's error JSON: canonical status, message.
fn fcm_error(status: StatusCode, canonical: &str, message: &str) -> Reply {
    reply(
        status,
        json!({"error": {"code": status.as_u16(), "message": message, "status": canonical}}),
    )
}

async fn handle(
    st: Arc<State>,
    req: Request<hyper::body::Incoming>,
) -> Result<Reply, std::convert::Infallible> {
    let path = req.uri().path().to_string();
    let auth = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let post = req.method() == hyper::Method::POST;
    let body = match Limited::new(req.into_body(), 64 * 1024).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            st.counts.malformed.fetch_add(1, Relaxed);
            return Ok(fcm_error(
                StatusCode::BAD_REQUEST,
                "INVALID_ARGUMENT",
                "body unreadable or over 64 KiB",
            ));
        }
    };
    if post && path == st.creds.token_path {
        return Ok(token(&st, &body));
    }
    if !post || send_path_project(&path) != Some(st.project_id.as_str()) {
        st.counts.not_found.fetch_add(1, Relaxed);
        return Ok(fcm_error(
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
            &format!("no such route or project: {path}"),
        ));
    }
    Ok(send(&st, auth.as_deref(), &body))
}

/// The token endpoint: a verified grant gets a fresh access token.
fn token(st: &State, body: &[u8]) -> Reply {
    match verify_grant(st, body) {
        Ok(()) => {
            let token = format!("lt-{:032x}", rand::random::<u128>());
            let mut tokens = st.tokens.lock().expect("token table");
            tokens.insert(token.clone(), Instant::now() + TOKEN_LIFETIME);
            drop(tokens);
            st.counts.grants.fetch_add(1, Relaxed);
            reply(
                StatusCode::OK,
                json!({"access_token": token, "expires_in": TOKEN_LIFETIME.as_secs(), "token_type": "Bearer"}),
            )
        }
        Err(e) => {
            st.counts.grants_refused.fetch_add(1, Relaxed);
            eprintln!("  FCM sink: grant refused: {e}");
            reply(
                StatusCode::BAD_REQUEST,
                json!({"error": "invalid_grant", "error_description": e}),
            )
        }
    }
}

/// RS256 signature under the service account's key, `iss` its email,
/// `aud` its token URI, unexpired, with FCM's scope.
fn verify_grant(st: &State, body: &[u8]) -> Result<(), String> {
    let form = std::str::from_utf8(body).map_err(|_| "body is not UTF-8")?;
    let jwt = parse_grant(form)?;
    let mut v = Validation::new(Algorithm::RS256);
    v.set_audience(&[&st.creds.token_uri]);
    v.set_issuer(&[&st.creds.client_email]);
    v.set_required_spec_claims(&["exp", "iss", "aud"]);
    let claims = jsonwebtoken::decode::<GrantClaims>(&jwt, &st.creds.key, &v)
        .map_err(|e| format!("JWT: {e}"))?
        .claims;
    if !claims.scope.split_whitespace().any(|s| s == FCM_SCOPE) {
        return Err(format!("scope {:?} lacks {FCM_SCOPE}", claims.scope));
    }
    Ok(())
}

/// `messages:send`: an issued, unexpired bearer token and a v1 message.
fn send(st: &State, auth: Option<&str>, body: &[u8]) -> Reply {
    let valid = bearer(auth).is_some_and(|t| {
        let tokens = st.tokens.lock().expect("token table");
        tokens.get(t).is_some_and(|exp| *exp > Instant::now())
    });
    if !valid {
        st.counts.unauthorized.fetch_add(1, Relaxed);
        return fcm_error(
            StatusCode::UNAUTHORIZED,
            "UNAUTHENTICATED",
            "Request had invalid authentication credentials.",
        );
    }
    match parse_send(body) {
        Ok(m) => {
            (st.on_message)(m);
            let n = st.counts.sends.fetch_add(1, Relaxed) + 1;
            reply(
                StatusCode::OK,
                json!({"name": format!("projects/{}/messages/{n}", st.project_id)}),
            )
        }
        Err(e) => {
            st.counts.malformed.fetch_add(1, Relaxed);
            eprintln!("  FCM sink: malformed message: {e}");
            fcm_error(StatusCode::BAD_REQUEST, "INVALID_ARGUMENT", &e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn send_bodies_are_parsed_as_fcm_v1_messages() {
        let body = br#"{"message":{"token":"dev-token-1","android":{"ttl":"60s","priority":"HIGH",
            "data":{"chid":"5f2b1c3a-0000-4000-8000-000000000001","body":"AAEC","con":"aes128gcm"}}}}"#;
        let m = parse_send(body).unwrap();
        assert_eq!(m.token, "dev-token-1");
        assert_eq!(m.chid, "5f2b1c3a-0000-4000-8000-000000000001");
        assert_eq!(m.body.as_deref(), Some("AAEC"));
        assert_eq!(m.con.as_deref(), Some("aes128gcm"));
        assert_eq!(m.ttl.as_deref(), Some("60s"));
        assert_eq!(m.priority.as_deref(), Some("HIGH"));
        // `message.data` is accepted too; a push without payload has only chid.
        let m = parse_send(br#"{"message":{"token":"t","data":{"chid":"c"}}}"#).unwrap();
        assert_eq!((m.chid.as_str(), m.body, m.ttl), ("c", None, None));
        for (bad, why) in [
            (&b"nope"[..], "not JSON"),
            (br#"{"token":"t"}"#, "no `message`"),
            (
                br#"{"message":{"data":{"chid":"c"}}}"#,
                "no `message.token`",
            ),
            (br#"{"message":{"token":"t"}}"#, "no data map"),
            (
                br#"{"message":{"token":"t","data":{"body":"x"}}}"#,
                "no `chid`",
            ),
            (
                br#"{"message":{"token":"t","data":{"chid":"c","ttl":5}}}"#,
                "not a string",
            ),
        ] {
            let e = parse_send(bad).unwrap_err();
            assert!(e.contains(why), "{e} for {}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn paths_bearers_and_grants() {
        assert_eq!(
            send_path_project("/v1/projects/p-1/messages:send"),
            Some("p-1")
        );
        assert_eq!(send_path_project("/v1/projects//messages:send"), None);
        assert_eq!(send_path_project("/v1/projects/a/b/messages:send"), None);
        assert_eq!(send_path_project("/v1/projects/p/messages"), None);
        assert_eq!(bearer(Some("Bearer abc")), Some("abc"));
        assert_eq!(bearer(Some("bearer  abc ")), Some("abc"));
        assert_eq!(bearer(Some("Basic abc")), None);
        assert_eq!(bearer(Some("Bearer ")), None);
        assert_eq!(bearer(None), None);
        let form =
            "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer&assertion=a.b.c";
        assert_eq!(parse_grant(form).unwrap(), "a.b.c");
        // Unescaped colons are fine too; '+' is a space.
        let form = format!("assertion=x.y&grant_type={JWT_BEARER}");
        assert_eq!(parse_grant(&form).unwrap(), "x.y");
        assert!(parse_grant("grant_type=password&assertion=x").is_err());
        assert!(parse_grant(&format!("grant_type={JWT_BEARER}")).is_err());
        assert_eq!(form_value("a=1+2%21&b", "a").as_deref(), Some("1 2!"));
        assert_eq!(form_value("a=%zz", "a"), None);
        assert_eq!(form_value("b", "b").as_deref(), Some(""));
    }

    #[test]
    fn token_uris_must_be_loopback_http() {
        let (a, p) = loopback_http("http://127.0.0.1:9190/token").unwrap();
        assert_eq!(
            (a.to_string().as_str(), p.as_str()),
            ("127.0.0.1:9190", "/token")
        );
        assert!(loopback_http("http://[::1]:1/t").is_ok());
        assert!(loopback_http("https://127.0.0.1:1/t").is_err());
        assert!(loopback_http("http://10.0.0.1:1/t").is_err());
        assert!(loopback_http("http://localhost:1/t").is_err());
    }

    /// The whole exchange Herald's bridge makes, against a sink on a real
    /// socket: a signed grant, then messages with and without its token.
    #[tokio::test]
    async fn sink_verifies_grants_and_bearer_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let sink_addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let (creds_path, toml) = write_config(dir.path(), sink_addr, "app.1", "proj").unwrap();
        let toml = std::fs::read_to_string(toml).unwrap();
        assert!(toml.contains("[bridges.fcm.\"app.1\"]"), "{toml}");
        assert!(toml.contains(&format!("base_url = \"http://{sink_addr}\"")));
        let account: Value =
            serde_json::from_str(&std::fs::read_to_string(&creds_path).unwrap()).unwrap();
        let creds = read_credentials(&creds_path).unwrap();
        assert_eq!(creds.addr, sink_addr);
        let got = Arc::new(Mutex::new(Vec::new()));
        let g = got.clone();
        let sink = Sink::bind(creds, "proj").await.unwrap();
        let running = sink.serve(Arc::new(move |m| g.lock().unwrap().push(m)));
        let client = crate::sender::client(1);
        let post = |path: &str, auth: Option<String>, ctype: &str, body: String| {
            let mut r = Request::post(format!("http://{sink_addr}{path}"))
                .header(http::header::CONTENT_TYPE, ctype);
            if let Some(a) = auth {
                r = r.header(http::header::AUTHORIZATION, a);
            }
            let req = r.body(Full::new(Bytes::from(body))).unwrap();
            let client = client.clone();
            async move {
                let resp = client.request(req).await.unwrap();
                let status = resp.status().as_u16();
                let b = resp.into_body().collect().await.unwrap().to_bytes();
                (status, serde_json::from_slice::<Value>(&b).unwrap())
            }
        };
        let now = crate::results::unix_now();
        let key = jsonwebtoken::EncodingKey::from_rsa_pem(
            account["private_key"].as_str().unwrap().as_bytes(),
        )
        .unwrap();
        let grant = |aud: &str, scope: &str| {
            let claims = json!({"iss": account["client_email"], "aud": aud, "scope": scope,
                "iat": now, "exp": now + 3600});
            let jwt =
                jsonwebtoken::encode(&jsonwebtoken::Header::new(Algorithm::RS256), &claims, &key)
                    .unwrap();
            format!("grant_type={JWT_BEARER}&assertion={jwt}")
        };
        let form = "application/x-www-form-urlencoded";
        let token_uri = account["token_uri"].as_str().unwrap();
        let (s, v) = post("/token", None, form, grant(token_uri, FCM_SCOPE)).await;
        assert_eq!(s, 200, "{v}");
        assert_eq!(v["token_type"], "Bearer");
        let access = v["access_token"].as_str().unwrap().to_string();
        // Another audience, or no FCM scope: refused.
        let (s, _) = post("/token", None, form, grant("http://x/token", FCM_SCOPE)).await;
        assert_eq!(s, 400);
        let (s, v) = post("/token", None, form, grant(token_uri, "email")).await;
        assert_eq!((s, v["error"].as_str()), (400, Some("invalid_grant")));

        let msg = json!({"message": {"token": "dev-1", "android": {"ttl": "60s",
            "data": {"chid": "c-1", "body": "AAA", "con": "aes128gcm"}}}})
        .to_string();
        let json_ct = "application/json";
        let send_path = "/v1/projects/proj/messages:send";
        let (s, v) = post(
            send_path,
            Some(format!("Bearer {access}")),
            json_ct,
            msg.clone(),
        )
        .await;
        assert_eq!(s, 200, "{v}");
        assert_eq!(v["name"], "projects/proj/messages/1");
        let (s, v) = post(
            send_path,
            Some("Bearer forged".into()),
            json_ct,
            msg.clone(),
        )
        .await;
        assert_eq!(
            (s, v["error"]["status"].as_str()),
            (401, Some("UNAUTHENTICATED"))
        );
        let (s, _) = post(send_path, None, json_ct, msg.clone()).await;
        assert_eq!(s, 401);
        let other = "/v1/projects/other/messages:send";
        let (s, _) = post(other, Some(format!("Bearer {access}")), json_ct, msg).await;
        assert_eq!(s, 404);
        let (s, _) = post(
            send_path,
            Some(format!("Bearer {access}")),
            json_ct,
            "{}".into(),
        )
        .await;
        assert_eq!(s, 400);

        let got = got.lock().unwrap().clone();
        assert_eq!(got.len(), 1);
        assert_eq!(
            (got[0].token.as_str(), got[0].chid.as_str()),
            ("dev-1", "c-1")
        );
        let c = &running.counts;
        assert_eq!(c.grants.load(Relaxed), 1);
        assert_eq!(c.grants_refused.load(Relaxed), 2);
        assert_eq!(c.sends.load(Relaxed), 1);
        assert_eq!(c.unauthorized.load(Relaxed), 2);
        assert_eq!(c.not_found.load(Relaxed), 1);
        assert_eq!(c.malformed.load(Relaxed), 1);
    }
}
