//! The demo's HTTP server: the page, its service worker, and a small
//! application server that stores subscriptions and sends pushes.

use crate::appserver::encrypt;
use crate::appserver::send::{send_push, validate_topic, PushOptions, Vapid, DEFAULT_TTL};
use crate::demo::state::Subscriptions;
use bytes::Bytes;
use herald_client::http::HttpClient;
use herald_proto::subscription::Subscription;
use herald_proto::urgency::Urgency;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::net::TcpListener;

const INDEX_HTML: &str = include_str!("index.html");
const APP_JS: &str = include_str!("app.js");
const SW_JS: &str = include_str!("sw.js");

/// Request bodies are subscriptions and short texts.
const MAX_REQUEST_BODY: usize = 64 * 1024;

/// How many received messages to remember; older ones are dropped.
const MAX_RECEIVED: usize = 1000;

/// A push payload the service worker reported.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Received {
    pub seq: u64,
    /// `null` for a message without payload.
    pub text: Option<String>,
    pub received_at_ms: u64,
    /// The subscription it came to, as the service worker saw it; `null`
    /// when the worker could not tell.
    pub endpoint: Option<String>,
}

/// Shared state of a running demo.
pub struct Demo {
    vapid: Vapid,
    push_url: String,
    subscriptions: Mutex<Subscriptions>,
    received: Mutex<Vec<Received>>,
    client: HttpClient,
}

impl Demo {
    pub fn new(vapid: Vapid, push_url: String, subscriptions: Subscriptions) -> Self {
        Demo {
            vapid,
            push_url,
            subscriptions: Mutex::new(subscriptions),
            received: Mutex::new(Vec::new()),
            client: HttpClient::default(),
        }
    }

    /// Sends through `client` (say, one trusting a private CA).
    pub fn with_client(mut self, client: HttpClient) -> Self {
        self.client = client;
        self
    }

    /// The `dom.push.serverURL` a browser needs for this push service.
    pub fn websocket_url(&self) -> String {
        let url = self.push_url.trim_end_matches('/');
        let url = if let Some(rest) = url.strip_prefix("https://") {
            format!("wss://{rest}")
        } else if let Some(rest) = url.strip_prefix("http://") {
            format!("ws://{rest}")
        } else {
            url.to_owned()
        };
        format!("{url}/")
    }

    fn subscriptions(&self) -> std::sync::MutexGuard<'_, Subscriptions> {
        // A panic while holding the lock leaves the list itself consistent
        // (every change is a single push/retain), so keep serving.
        self.subscriptions
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn received(&self) -> std::sync::MutexGuard<'_, Vec<Received>> {
        self.received
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Serves the demo on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, demo: Arc<Demo>) -> anyhow::Result<()> {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                // Out of file descriptors and the like: back off, don't spin.
                tracing::warn!("demo: accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let demo = demo.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| handle(demo.clone(), req));
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await
            {
                tracing::debug!("demo: connection from {peer}: {e}");
            }
        });
    }
}

type Reply = Response<Full<Bytes>>;

async fn handle(demo: Arc<Demo>, req: Request<Incoming>) -> Result<Reply, Infallible> {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let reply = match (&method, path.as_str()) {
        (&Method::GET, "/") | (&Method::GET, "/index.html") => {
            asset("text/html; charset=utf-8", INDEX_HTML)
        }
        (&Method::GET, "/app.js") => asset("text/javascript; charset=utf-8", APP_JS),
        (&Method::GET, "/sw.js") => asset("text/javascript; charset=utf-8", SW_JS),
        (&Method::GET, "/vapid-public-key") => {
            text(StatusCode::OK, demo.vapid.key.public_key_b64())
        }
        (&Method::GET, "/config") => json_reply(
            StatusCode::OK,
            &json!({
                "vapidPublicKey": demo.vapid.key.public_key_b64(),
                "pushUrl": demo.push_url,
                "websocketUrl": demo.websocket_url(),
            }),
        ),
        (&Method::GET, "/subscriptions") => {
            let list = demo.subscriptions().list().to_vec();
            json_reply(StatusCode::OK, &list)
        }
        (&Method::GET, "/received") => {
            // `?endpoint=URL`: what one browser received (the page asks for
            // its own); without it, everything (tests, curl).
            let only = req
                .uri()
                .query()
                .and_then(|q| crate::query::param(q, "endpoint"));
            let list: Vec<Received> = demo
                .received()
                .iter()
                .filter(|r| only.is_none() || r.endpoint == only)
                .cloned()
                .collect();
            json_reply(StatusCode::OK, &list)
        }
        (&Method::POST, "/subscribe") => with_body(req, |body| subscribe(&demo, &body)).await,
        (&Method::POST, "/unsubscribe") => with_body(req, |body| unsubscribe(&demo, &body)).await,
        (&Method::POST, "/received") => with_body(req, |body| received(&demo, &body)).await,
        (&Method::POST, "/log") => with_body(req, |body| page_log(&body)).await,
        (&Method::POST, "/send") => match read_body(req).await {
            Ok(body) => send(&demo, &body).await,
            Err(reply) => reply,
        },
        (
            _,
            "/" | "/index.html" | "/app.js" | "/sw.js" | "/vapid-public-key" | "/config"
            | "/subscriptions" | "/received" | "/subscribe" | "/unsubscribe" | "/log" | "/send",
        ) => error(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{method} is not allowed on {path}"),
        ),
        _ => error(StatusCode::NOT_FOUND, format!("no such page: {path}")),
    };
    Ok(reply)
}

async fn read_body(req: Request<Incoming>) -> Result<Bytes, Reply> {
    match Limited::new(req.into_body(), MAX_REQUEST_BODY)
        .collect()
        .await
    {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) => Err(error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("cannot read the request body (at most {MAX_REQUEST_BODY} bytes): {e}"),
        )),
    }
}

async fn with_body(req: Request<Incoming>, f: impl FnOnce(Bytes) -> Reply) -> Reply {
    match read_body(req).await {
        Ok(body) => f(body),
        Err(reply) => reply,
    }
}

fn subscribe(demo: &Demo, body: &[u8]) -> Reply {
    let text = String::from_utf8_lossy(body);
    let sub = match Subscription::from_json(&text) {
        Ok(sub) => sub,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("{e:#}")),
    };
    if sub.keys.is_none() {
        return error(
            StatusCode::BAD_REQUEST,
            "subscription has no keys; the demo sends encrypted payloads".into(),
        );
    }
    if !sub
        .endpoint
        .starts_with(demo.push_url.trim_end_matches('/'))
    {
        tracing::warn!(
            "demo: endpoint {} is not on --push-url {}; is the browser's dom.push.serverURL another push service?",
            sub.endpoint,
            demo.push_url
        );
    }
    let endpoint = sub.endpoint.clone();
    let mut subs = demo.subscriptions();
    match subs.add(sub) {
        Ok(new) => {
            if new {
                tracing::info!("demo: new subscription {endpoint}");
            }
            let count = subs.list().len();
            json_reply(
                if new {
                    StatusCode::CREATED
                } else {
                    StatusCode::OK
                },
                &json!({ "stored": true, "new": new, "count": count }),
            )
        }
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")),
    }
}

#[derive(Deserialize)]
struct UnsubscribeForm {
    endpoint: Option<String>,
}

fn unsubscribe(demo: &Demo, body: &[u8]) -> Reply {
    let form: UnsubscribeForm = match serde_json::from_slice(body) {
        Ok(form) => form,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("expected {{\"endpoint\": ...}}: {e}"),
            )
        }
    };
    let Some(endpoint) = form.endpoint else {
        return json_reply(StatusCode::OK, &json!({ "removed": false }));
    };
    match demo.subscriptions().remove(&endpoint) {
        Ok(removed) => {
            tracing::info!("demo: page unsubscribed {endpoint}");
            json_reply(StatusCode::OK, &json!({ "removed": removed }))
        }
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")),
    }
}

#[derive(Deserialize)]
struct ReceivedForm {
    text: Option<String>,
    #[serde(default)]
    endpoint: Option<String>,
}

fn received(demo: &Demo, body: &[u8]) -> Reply {
    let form: ReceivedForm = match serde_json::from_slice(body) {
        Ok(form) => form,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("expected {{\"text\": ...}}: {e}"),
            )
        }
    };
    let mut list = demo.received();
    // Numbered under the list's lock, so numbers follow arrival order.
    let seq = list.last().map_or(1, |last| last.seq + 1);
    tracing::info!("demo: service worker received #{seq}: {:?}", form.text);
    list.push(Received {
        seq,
        text: form.text,
        received_at_ms: now_ms(),
        endpoint: form.endpoint,
    });
    if list.len() > MAX_RECEIVED {
        let excess = list.len() - MAX_RECEIVED;
        list.drain(..excess);
    }
    Response::builder()
        .status(StatusCode::NO_CONTENT)
        .body(Full::new(Bytes::new()))
        .expect("static response parts are valid")
}

#[derive(Deserialize)]
struct LogForm {
    message: String,
}

fn page_log(body: &[u8]) -> Reply {
    match serde_json::from_slice::<LogForm>(body) {
        Ok(form) => {
            let message: String = form.message.chars().take(500).collect();
            tracing::info!("demo page: {message}");
            Response::builder()
                .status(StatusCode::NO_CONTENT)
                .body(Full::new(Bytes::new()))
                .expect("static response parts are valid")
        }
        Err(e) => error(
            StatusCode::BAD_REQUEST,
            format!("expected {{\"message\": ...}}: {e}"),
        ),
    }
}

/// `POST /send`: what the page's form (or a test) asks the application
/// server to send.
#[derive(Deserialize)]
struct SendForm {
    /// `null`/absent sends a message without payload.
    text: Option<String>,
    ttl: Option<u32>,
    urgency: Option<String>,
    topic: Option<String>,
    /// Send only to this subscription instead of all of them.
    endpoint: Option<String>,
}

#[derive(Serialize)]
struct SendResult {
    endpoint: String,
    /// HTTP status from the push service; absent when it never answered.
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    location: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    errno: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<String>,
    /// The push service said the subscription is gone, so it was dropped.
    forgotten: bool,
}

async fn send(demo: &Demo, body: &[u8]) -> Reply {
    let form: SendForm = match serde_json::from_slice(body) {
        Ok(form) => form,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("bad send form: {e}")),
    };
    let urgency = match form.urgency.as_deref().filter(|u| !u.is_empty()) {
        None => None,
        Some(u) => match Urgency::parse(u) {
            Some(u) => Some(u),
            None => {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("urgency must be very-low, low, normal or high, not {u:?}"),
                )
            }
        },
    };
    let topic = form.topic.filter(|t| !t.is_empty());
    if let Some(topic) = &topic {
        if let Err(e) = validate_topic(topic) {
            return error(StatusCode::BAD_REQUEST, format!("{e:#}"));
        }
    }
    if let Some(text) = &form.text {
        if text.len() > encrypt::MAX_PORTABLE_PLAINTEXT {
            return error(
                StatusCode::BAD_REQUEST,
                format!(
                    "text is {} bytes; push services only have to accept {}",
                    text.len(),
                    herald_proto::crypto::body_limit_explained(herald_proto::crypto::PORTABLE_BODY)
                ),
            );
        }
    }
    let options = PushOptions {
        ttl: form.ttl.unwrap_or(DEFAULT_TTL),
        urgency,
        topic,
        client: demo.client.clone(),
        ..PushOptions::default()
    };
    let targets: Vec<Subscription> = demo
        .subscriptions()
        .list()
        .iter()
        .filter(|s| form.endpoint.as_ref().is_none_or(|e| *e == s.endpoint))
        .cloned()
        .collect();
    let payload = form.text.as_deref().map(str::as_bytes);
    let sends = targets
        .iter()
        .map(|sub| send_push(sub, payload, Some(&demo.vapid), &options));
    let outcomes = futures_util::future::join_all(sends).await;

    let mut results = Vec::with_capacity(targets.len());
    for (sub, outcome) in targets.iter().zip(outcomes) {
        let result = match outcome {
            Ok(resp) => {
                let forgotten = resp.is_gone()
                    && match demo.subscriptions().remove(&sub.endpoint) {
                        Ok(removed) => removed,
                        Err(e) => {
                            tracing::error!("demo: cannot forget {}: {e:#}", sub.endpoint);
                            false
                        }
                    };
                if forgotten {
                    tracing::info!("demo: forgot {} ({})", sub.endpoint, resp.describe_error());
                } else if !resp.is_success() {
                    tracing::warn!(
                        "demo: push to {} refused: {}",
                        sub.endpoint,
                        resp.describe_error()
                    );
                }
                SendResult {
                    endpoint: sub.endpoint.clone(),
                    status: Some(resp.status.as_u16()),
                    location: resp.location.clone(),
                    errno: resp.errno(),
                    message: resp.error.as_ref().and_then(|e| e.message.clone()),
                    forgotten,
                }
            }
            Err(e) => {
                tracing::warn!("demo: push to {} failed: {e:#}", sub.endpoint);
                SendResult {
                    endpoint: sub.endpoint.clone(),
                    status: None,
                    location: None,
                    errno: None,
                    message: Some(format!("{e:#}")),
                    forgotten: false,
                }
            }
        };
        results.push(result);
    }
    json_reply(StatusCode::OK, &json!({ "results": results }))
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn asset(content_type: &'static str, body: &'static str) -> Reply {
    Response::builder()
        .header(header::CONTENT_TYPE, content_type)
        // The page and worker change with the binary; never serve stale ones.
        .header(header::CACHE_CONTROL, "no-store")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .expect("static response parts are valid")
}

fn text(status: StatusCode, body: String) -> Reply {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .header(header::CACHE_CONTROL, "no-store")
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts are valid")
}

fn json_reply<T: Serialize + ?Sized>(status: StatusCode, value: &T) -> Reply {
    let body = serde_json::to_vec(value).unwrap_or_else(|_| b"null".to_vec());
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CACHE_CONTROL, "no-store")
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts are valid")
}

fn error(status: StatusCode, message: String) -> Reply {
    json_reply(status, &json!({ "error": message }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::appserver::VapidKey;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;
    use p256::elliptic_curve::sec1::ToEncodedPoint;
    use serde_json::Value;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn start(dir: &std::path::Path) -> u16 {
        let demo = Arc::new(Demo::new(
            Vapid {
                key: VapidKey::generate(),
                subject: Some("mailto:t@example.com".into()),
            },
            "http://127.0.0.1:9".into(),
            Subscriptions::load(dir).unwrap(),
        ));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(serve(listener, demo));
        port
    }

    async fn call(port: u16, method: &str, path: &str, body: &str) -> (u16, String) {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes()).await.unwrap();
        let mut raw = String::new();
        s.read_to_string(&mut raw).await.unwrap();
        let (head, body) = raw.split_once("\r\n\r\n").unwrap();
        let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
        (status, body.to_owned())
    }

    fn subscription(endpoint: &str) -> String {
        let key = p256::SecretKey::random(&mut rand::rngs::OsRng);
        serde_json::json!({
            "endpoint": endpoint,
            "keys": {
                "p256dh": URL_SAFE_NO_PAD.encode(key.public_key().to_encoded_point(false).as_bytes()),
                "auth": URL_SAFE_NO_PAD.encode([3u8; 16]),
            }
        })
        .to_string()
    }

    #[tokio::test]
    async fn api_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let port = start(dir.path()).await;

        let (status, page) = call(port, "GET", "/", "").await;
        assert_eq!(status, 200);
        assert!(page.contains("/app.js"));
        let (status, key) = call(port, "GET", "/vapid-public-key", "").await;
        assert_eq!(status, 200);
        assert_eq!(URL_SAFE_NO_PAD.decode(key.trim()).unwrap().len(), 65);

        // A port nobody listens on: the send fails locally and is reported
        // per subscription, not as a server error.
        let dead = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let endpoint = format!("http://127.0.0.1:{dead}/wpush/v2/t");
        let sub = subscription(&endpoint);
        assert_eq!(call(port, "POST", "/subscribe", &sub).await.0, 201);
        assert_eq!(call(port, "POST", "/subscribe", &sub).await.0, 200);
        let (_, list) = call(port, "GET", "/subscriptions", "").await;
        assert_eq!(
            serde_json::from_str::<Value>(&list)
                .unwrap()
                .as_array()
                .unwrap()
                .len(),
            1
        );
        let (status, reply) = call(port, "POST", "/send", r#"{"text":"hi","ttl":5}"#).await;
        assert_eq!(status, 200);
        let reply: Value = serde_json::from_str(&reply).unwrap();
        assert!(reply["results"][0].get("status").is_none(), "{reply}");
        assert!(reply["results"][0]["message"]
            .as_str()
            .unwrap()
            .contains("cannot connect"));
        assert_eq!(reply["results"][0]["forgotten"], false);

        let (status, _) = call(port, "POST", "/send", r#"{"urgency":"urgent"}"#).await;
        assert_eq!(status, 400);
        let (status, _) = call(port, "POST", "/send", r#"{"topic":"a b"}"#).await;
        assert_eq!(status, 400);
        assert_eq!(call(port, "POST", "/subscribe", "{}").await.0, 400);
        assert_eq!(call(port, "GET", "/send", "").await.0, 405);
        assert_eq!(call(port, "GET", "/nope", "").await.0, 404);

        assert_eq!(
            call(port, "POST", "/received", r#"{"text":"one"}"#).await.0,
            204
        );
        assert_eq!(
            call(port, "POST", "/received", r#"{"text":null}"#).await.0,
            204
        );
        let (_, got) = call(port, "GET", "/received", "").await;
        let got: Value = serde_json::from_str(&got).unwrap();
        assert_eq!(got[0]["seq"], 1);
        assert_eq!(got[0]["text"], "one");
        assert_eq!(got[1]["seq"], 2);
        assert!(got[1]["text"].is_null());

        let gone = serde_json::json!({ "endpoint": endpoint }).to_string();
        let (_, reply) = call(port, "POST", "/unsubscribe", &gone).await;
        assert_eq!(
            serde_json::from_str::<Value>(&reply).unwrap()["removed"],
            true
        );
        let (_, list) = call(port, "GET", "/subscriptions", "").await;
        assert_eq!(list, "[]");
    }

    /// Each browser's page sees what came to its own subscription only.
    #[tokio::test]
    async fn received_messages_are_listed_per_subscription() {
        let dir = tempfile::tempdir().unwrap();
        let port = start(dir.path()).await;
        let mine = "http://127.0.0.1:8080/wpush/v2/mine+a/b";
        let report = |text: &str, endpoint: &str| {
            serde_json::json!({ "text": text, "endpoint": endpoint }).to_string()
        };
        for body in [
            report("for me", mine),
            report(
                "for another browser",
                "http://127.0.0.1:8080/wpush/v2/other",
            ),
        ] {
            assert_eq!(call(port, "POST", "/received", &body).await.0, 204);
        }
        let query = format!(
            "/received?endpoint={}",
            mine.replace('+', "%2B")
                .replace('/', "%2F")
                .replace(':', "%3A")
        );
        let (_, got) = call(port, "GET", &query, "").await;
        let got: Value = serde_json::from_str(&got).unwrap();
        let texts: Vec<&str> = got
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["text"].as_str().unwrap())
            .collect();
        assert_eq!(texts, ["for me"]);
        let (_, all) = call(port, "GET", "/received", "").await;
        assert_eq!(
            serde_json::from_str::<Value>(&all)
                .unwrap()
                .as_array()
                .unwrap()
                .len(),
            2
        );
    }
}
