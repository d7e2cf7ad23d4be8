//! The load generator against a minimal in-test push service, so its
//! accounting can be checked without Herald — including against a server
//! that loses messages, sends garbage or hands out endpoints off loopback.

mod common;

use bytes::Bytes;
use common::*;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

#[derive(Clone, Copy, Default)]
struct Faults {
    /// Accept but never deliver every Nth message.
    drop_every: u64,
    /// Send a non-JSON text frame before every Nth notification.
    garbage_every: u64,
    /// Hand out endpoints on this (non-loopback) host.
    foreign_endpoints: bool,
}

#[derive(Default)]
struct Ua {
    conn: u64,
    tx: Option<mpsc::UnboundedSender<String>>,
    queue: Vec<String>,
}

struct State {
    http_port: u16,
    faults: Faults,
    uas: Mutex<HashMap<String, Ua>>,
    counter: AtomicU64,
}

struct Mock {
    ws_port: u16,
    _rt: tokio::runtime::Runtime,
}

impl Mock {
    fn start(faults: Faults) -> Mock {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let (ws, http) = rt.block_on(async {
            (
                TcpListener::bind("127.0.0.1:0").await.expect("bind"),
                TcpListener::bind("127.0.0.1:0").await.expect("bind"),
            )
        });
        let ws_port = ws.local_addr().expect("addr").port();
        let state = Arc::new(State {
            http_port: http.local_addr().expect("addr").port(),
            faults,
            uas: Mutex::new(HashMap::new()),
            counter: AtomicU64::new(0),
        });
        let st = state.clone();
        rt.spawn(async move {
            while let Ok((s, _)) = ws.accept().await {
                tokio::spawn(ws_conn(s, st.clone()));
            }
        });
        rt.spawn(async move {
            while let Ok((s, _)) = http.accept().await {
                let st = state.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| post(req, st.clone()));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        Mock { ws_port, _rt: rt }
    }

    fn url(&self) -> String {
        format!("ws://127.0.0.1:{}/", self.ws_port)
    }
}

async fn ws_conn(s: tokio::net::TcpStream, st: Arc<State>) {
    // The callback's error type is fixed by tungstenite.
    #[allow(clippy::result_large_err)]
    let cb = |_req: &tokio_tungstenite::tungstenite::handshake::server::Request,
              mut resp: tokio_tungstenite::tungstenite::handshake::server::Response| {
        resp.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            "push-notification".parse().expect("header"),
        );
        Ok(resp)
    };
    let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(s, cb).await else {
        return;
    };
    let conn = st.counter.fetch_add(1, Relaxed) + 1_000_000;
    let (tx, mut rx) = mpsc::unbounded_channel::<String>();
    let mut uaid: Option<String> = None;
    loop {
        tokio::select! {
            out = rx.recv() => match out {
                Some(t) => if ws.send(Message::text(t)).await.is_err() { break },
                None => break,
            },
            msg = ws.next() => {
                let Some(Ok(Message::Text(t))) = msg else {
                    if matches!(msg, Some(Ok(Message::Ping(_))) | Some(Ok(Message::Pong(_)))) { continue }
                    break;
                };
                let v: Value = serde_json::from_str(t.as_str()).unwrap_or(Value::Null);
                let reply = match v["messageType"].as_str() {
                    Some("hello") => {
                        let id = v["uaid"].as_str().map(str::to_string).unwrap_or_else(|| {
                            format!("{:032x}", st.counter.fetch_add(1, Relaxed) + 0xabc0_0000)
                        });
                        let queued = {
                            let mut uas = st.uas.lock().expect("lock");
                            let ua = uas.entry(id.clone()).or_default();
                            ua.conn = conn;
                            ua.tx = Some(tx.clone());
                            std::mem::take(&mut ua.queue)
                        };
                        uaid = Some(id.clone());
                        let _ = ws.send(Message::text(json!({"messageType":"hello","uaid":id,"status":200,"use_webpush":true,"broadcasts":{}}).to_string())).await;
                        for q in queued {
                            let _ = tx.send(q);
                        }
                        continue;
                    }
                    Some("register") => {
                        let (Some(u), Some(ch)) = (uaid.as_deref(), v["channelID"].as_str()) else { break };
                        let host = if st.faults.foreign_endpoints { "10.9.9.9".to_string() } else { format!("127.0.0.1:{}", st.http_port) };
                        json!({"messageType":"register","channelID":ch,"status":200,"pushEndpoint":format!("http://{host}/push/{u}/{ch}")}).to_string()
                    }
                    Some(_) => continue,
                    None => "{}".to_string(),
                };
                if ws.send(Message::text(reply)).await.is_err() {
                    break;
                }
            }
        }
    }
    if let Some(u) = uaid {
        if let Some(ua) = st.uas.lock().expect("lock").get_mut(&u) {
            if ua.conn == conn {
                ua.tx = None;
            }
        }
    }
}

async fn post(
    req: Request<hyper::body::Incoming>,
    st: Arc<State>,
) -> Result<Response<Full<Bytes>>, hyper::Error> {
    let path = req.uri().path().to_string();
    let auth_ok = req
        .headers()
        .get("authorization")
        .and_then(|h| h.to_str().ok())
        .is_some_and(|a| a.starts_with("vapid t=") && a.contains(", k="));
    let ttl_ok = req.headers().get("ttl").is_some();
    let body = req.into_body().collect().await?.to_bytes();
    let parts: Vec<&str> = path.split('/').collect();
    let resp = |code: u16| {
        Response::builder()
            .status(code)
            .header("Location", "http://127.0.0.1/m/x")
            .body(Full::new(Bytes::new()))
            .expect("response")
    };
    if !auth_ok || !ttl_ok || parts.len() != 4 || parts[1] != "push" {
        return Ok(resp(400));
    }
    let (uaid, ch) = (parts[2], parts[3]);
    let n = st.counter.fetch_add(1, Relaxed) + 1;
    let f = st.faults;
    let data = base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, &body);
    let note = json!({"messageType":"notification","channelID":ch,"version":format!("v{n}"),"data":data,"headers":{"encoding":"aes128gcm"},"ttl":60}).to_string();
    let mut uas = st.uas.lock().expect("lock");
    let ua = uas.entry(uaid.to_string()).or_default();
    let delivered = f.drop_every == 0 || !n.is_multiple_of(f.drop_every);
    if delivered {
        match &ua.tx {
            Some(tx) => {
                if f.garbage_every > 0 && n.is_multiple_of(f.garbage_every) {
                    let _ = tx.send("garbage {".into());
                }
                let _ = tx.send(note);
            }
            None => ua.queue.push(note),
        }
    }
    Ok(resp(201))
}

fn out_file(dir: &tempfile::TempDir, name: &str) -> std::path::PathBuf {
    dir.path().join(name)
}

#[test]
fn scenarios_add_up_against_a_correct_server() {
    let mock = Mock::start(Faults::default());
    let dir = tempfile::tempdir().expect("tempdir");
    let url = mock.url();
    let pid = std::process::id().to_string();
    let t = Duration::from_secs(60);

    let tp = scenario(
        &[
            "throughput",
            "--url",
            &url,
            "--target",
            "mock",
            "--uas",
            "20",
            "--channels",
            "2",
            "--senders",
            "3",
            "--messages",
            "300",
            "--duration",
            "30",
            "--payload",
            "100",
            "--verify-every",
            "1",
            "--pool",
            "2",
        ],
        &out_file(&dir, "tp.json"),
        t,
    );
    assert_no_errors(&tp);
    assert_eq!(metric(&tp, "channels"), 40.0);
    assert_eq!(metric(&tp, "accepted"), 300.0);
    assert_eq!(metric(&tp, "delivered"), 300.0);
    assert_eq!(metric(&tp, "verified_ok"), 300.0);
    assert_eq!(metric(&tp, "lost"), 0.0);
    assert_eq!(metric(&tp, "body_bytes"), 230.0);
    assert_latency(&tp, "end_to_end", 300);

    // Open loop: 200 msg/s for one second is about 200 messages.
    let open = scenario(
        &[
            "throughput",
            "--url",
            &url,
            "--uas",
            "10",
            "--senders",
            "2",
            "--rate",
            "200",
            "--duration",
            "1",
        ],
        &out_file(&dir, "open.json"),
        t,
    );
    assert_no_errors(&open);
    let sent = metric(&open, "sent");
    assert!((150.0..=201.0).contains(&sent), "sent {sent}");
    assert_eq!(metric(&open, "delivered"), sent);

    let bl = scenario(
        &[
            "backlog",
            "--url",
            &url,
            "--uas",
            "15",
            "--channels",
            "2",
            "--messages-per-channel",
            "3",
            "--senders",
            "2",
        ],
        &out_file(&dir, "bl.json"),
        t,
    );
    assert_no_errors(&bl);
    assert_eq!(metric(&bl, "stored"), 90.0);
    assert_eq!(metric(&bl, "delivered"), 90.0);
    assert_latency(&bl, "reconnect_hello", 15);

    let st = scenario(
        &[
            "storm", "--url", &url, "--uas", "25", "--window", "0.5", "--settle", "0.2", "--close",
            "clean",
        ],
        &out_file(&dir, "st.json"),
        t,
    );
    assert_no_errors(&st);
    assert_eq!(metric(&st, "reconnected"), 25.0);
    assert_latency(&st, "reconnect_hello", 25);

    let idle = scenario(
        &[
            "idle",
            "--url",
            &url,
            "--uas",
            "30",
            "--hold",
            "0.5",
            "--server-pid",
            &pid,
        ],
        &out_file(&dir, "idle.json"),
        t,
    );
    assert_no_errors(&idle);
    assert_eq!(metric(&idle, "established"), 30.0);
    assert!(idle["metrics"]["stopped_by"]
        .as_str()
        .expect("stopped_by")
        .starts_with("nothing"));
}

#[test]
fn idle_spreads_over_worker_processes_and_source_addresses() {
    let mock = Mock::start(Faults::default());
    let dir = tempfile::tempdir().expect("tempdir");
    let url = mock.url();
    let idle = scenario(
        &[
            "idle",
            "--url",
            &url,
            "--uas",
            "60",
            "--procs",
            "3",
            "--source-addrs",
            "4",
            "--hold",
            "0.5",
        ],
        &out_file(&dir, "idle.json"),
        Duration::from_secs(60),
    );
    assert_no_errors(&idle);
    assert_eq!(metric(&idle, "procs"), 3.0);
    assert_eq!(metric(&idle, "established"), 60.0);
    assert_eq!(metric(&idle, "open_at_end"), 60.0);
    assert_latency(&idle, "setup", 60);
}

#[test]
fn idle_reports_a_ceiling_it_runs_into() {
    // Nothing listens: every connect is refused, the climb stops after the
    // allowed run of failures and says so.
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("ws://127.0.0.1:{}/", free_port());
    let idle = scenario(
        &[
            "idle",
            "--url",
            &url,
            "--uas",
            "1000",
            "--max-consecutive-failures",
            "20",
            "--concurrency",
            "5",
            "--hold",
            "0",
        ],
        &out_file(&dir, "idle.json"),
        Duration::from_secs(60),
    );
    assert_eq!(metric(&idle, "established"), 0.0);
    let failed = metric(&idle, "failed");
    assert!((20.0..=30.0).contains(&failed), "failed {failed}");
    let by = idle["metrics"]["stopped_by"].as_str().expect("stopped_by");
    assert!(by.contains("ECONNREFUSED"), "{by}");
}

#[test]
fn server_misbehaviour_is_counted_not_fatal() {
    let mock = Mock::start(Faults {
        drop_every: 10,
        garbage_every: 7,
        foreign_endpoints: false,
    });
    let dir = tempfile::tempdir().expect("tempdir");
    let tp = scenario(
        &[
            "throughput",
            "--url",
            &mock.url(),
            "--uas",
            "20",
            "--senders",
            "1",
            "--messages",
            "100",
            "--duration",
            "30",
            "--drain",
            "1",
            "--pool",
            "8",
        ],
        &out_file(&dir, "tp.json"),
        Duration::from_secs(60),
    );
    assert_eq!(metric(&tp, "accepted"), 100.0);
    // The mock counter also advances on hello, so about one in ten is lost.
    let lost = metric(&tp, "lost");
    assert!((5.0..=15.0).contains(&lost), "lost {lost}");
    assert_eq!(metric(&tp, "delivered") + lost, 100.0);
    let errors = &tp["errors"];
    assert_eq!(
        errors["lost (accepted, never delivered)"].as_f64(),
        Some(lost)
    );
    assert!(
        errors["malformed server message"].as_u64().unwrap_or(0) >= 1,
        "{errors}"
    );
}

#[test]
fn never_sends_off_loopback() {
    let ran = run(
        &["throughput", "--url", "ws://10.1.2.3:80/", "--uas", "1"],
        Duration::from_secs(20),
    );
    assert!(!ran.ok);
    assert!(ran.stderr.contains("loopback"), "{}", ran.stderr);
    let ran = run(
        &["storm", "--url", "wss://127.0.0.1/"],
        Duration::from_secs(20),
    );
    assert!(
        !ran.ok && ran.stderr.contains("not supported"),
        "{}",
        ran.stderr
    );

    // A server handing out endpoints elsewhere gets no POSTs: the endpoints
    // are refused and counted.
    let mock = Mock::start(Faults {
        foreign_endpoints: true,
        ..Faults::default()
    });
    let dir = tempfile::tempdir().expect("tempdir");
    let tp = scenario(
        &[
            "throughput",
            "--url",
            &mock.url(),
            "--uas",
            "3",
            "--messages",
            "10",
            "--duration",
            "2",
            "--drain",
            "0",
        ],
        &out_file(&dir, "tp.json"),
        Duration::from_secs(60),
    );
    assert_eq!(metric(&tp, "sent"), 0.0);
    let refused: u64 = tp["errors"]
        .as_object()
        .expect("errors")
        .iter()
        .filter(|(k, _)| k.contains("not loopback") || k.contains("only loopback"))
        .map(|(_, v)| v.as_u64().unwrap_or(0))
        .sum();
    assert_eq!(refused, 3, "{}", tp["errors"]);
}
