//! Running Herald: metrics that move with traffic, health and readiness,
//! JSON logs, TLS, and split listeners.

mod common;

use common::*;
use std::sync::Arc;
use std::time::Duration;

fn value(text: &str, series: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .map(|v| v.parse().unwrap())
        .unwrap_or(0.0)
}

/// Prometheus's own linter on everything Herald exports: names, HELP and
/// TYPE lines, counter suffixes, histogram series. The traffic first makes
/// the labelled families appear (a family with no series yet is not
/// printed).
#[tokio::test]
async fn promtool_check_metrics_accepts_the_exposition() {
    let h = Herald::start().await;
    let app = AppServer::new();
    let keys = UaKeys::new();
    let mut ua = Ua::hello(&h, None).await;
    let (_, ep) = ua.subscribe(Some(&app.public())).await;
    let r = push(&ep, Some(&app), &h.url(), &keys, "x", &[("urgency", "low")]).await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let n = ua.notification().await;
    ua.ack(&n).await;
    let bad = http(&h, "POST", "/wpush/v1/forged", &[("ttl", "1")], vec![])
        .await
        .unwrap();
    assert_eq!(bad.status, 404);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let text = metrics_text(&h).await;
    for family in [
        "herald_messages_accepted_total",
        "herald_http_responses_total",
        "herald_store_operation_seconds",
    ] {
        assert!(
            text.contains(&format!("# TYPE {family} ")),
            "{family} missing:\n{text}"
        );
    }

    let mut cmd = tools::require("promtool", "prometheus");
    cmd.args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().expect("promtool starts");
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn metrics_move_with_traffic() {
    let h = Herald::start_with(&[], &[("HERALD_SWEEP_INTERVAL", "1s")]).await;
    let keys = UaKeys::new();
    let before = metrics_text(&h).await;
    assert_eq!(value(&before, "herald_ws_connections"), 0.0);

    let mut ua = Ua::hello(&h, None).await;
    let uaid = ua.uaid.clone();
    let (_, ep) = ua.subscribe(None).await;
    let m = metrics_text(&h).await;
    assert_eq!(value(&m, "herald_ws_connections"), 1.0);
    assert_eq!(value(&m, "herald_ws_hello_total{outcome=\"new\"}"), 1.0);
    assert_eq!(value(&m, "herald_ws_register_total{outcome=\"ok\"}"), 1.0);

    push(&ep, None, &h.url(), &keys, "x", &[("urgency", "high")]).await;
    let n = ua.notification().await;
    ua.ack(&n).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let m = metrics_text(&h).await;
    assert_eq!(
        value(&m, "herald_messages_accepted_total{urgency=\"high\"}"),
        1.0
    );
    assert_eq!(value(&m, "herald_messages_delivered_total"), 1.0);
    assert_eq!(value(&m, "herald_messages_acked_total"), 1.0);
    assert_eq!(
        value(
            &m,
            "herald_http_responses_total{errno=\"0\",status=\"201\"}"
        ),
        1.0
    );
    assert!(m.contains("herald_store_operation_seconds_bucket{op=\"put_message\""));

    // An expired message, removed by the background sweep.
    drop(ua);
    tokio::time::sleep(Duration::from_millis(100)).await;
    push(&ep, None, &h.url(), &keys, "x", &[("ttl", "1")]).await;
    let bad = http(&h, "POST", "/wpush/v1/forged", &[("ttl", "1")], vec![])
        .await
        .unwrap();
    assert_eq!(bad.status, 404);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let m = metrics_text(&h).await;
        if value(&m, "herald_messages_expired_total") >= 1.0 {
            assert_eq!(
                value(
                    &m,
                    "herald_http_responses_total{errno=\"102\",status=\"404\"}"
                ),
                1.0
            );
            assert_eq!(value(&m, "herald_ws_connections"), 0.0);
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "expiry never counted:\n{m}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let _ = uaid;
}

#[tokio::test]
async fn health_readiness_and_dockerflow() {
    let mut h = Herald::start().await;
    for path in ["/health", "/ready", "/__heartbeat__", "/__lbheartbeat__"] {
        assert_eq!(
            http(&h, "GET", path, &[], vec![]).await.unwrap().status,
            200,
            "{path}"
        );
    }
    let v = http(&h, "GET", "/__version__", &[], vec![])
        .await
        .unwrap()
        .json();
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));

    // A user agent that never answers the close handshake keeps the node
    // draining for a moment: readiness must already be false then.
    let _silent = Ua::hello(&h, None).await;
    std::process::Command::new("kill")
        .arg("-TERM")
        .arg(h.pid().to_string())
        .status()
        .unwrap();
    let mut saw_503 = false;
    for _ in 0..40 {
        match http(&h, "GET", "/ready", &[], vec![]).await {
            Ok(r) if r.status == 503 => {
                saw_503 = true;
                break;
            }
            Ok(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            Err(_) => break,
        }
    }
    assert!(saw_503, "/ready never answered 503 during shutdown");
    assert!(h.wait_exit().success());
}

#[tokio::test]
async fn json_logs_parse_and_keep_secrets_out() {
    let h = Herald::start_with(&["--log-format", "json"], &[("RUST_LOG", "info")]).await;
    let keys = UaKeys::new();
    let mut ua = Ua::hello(&h, None).await;
    let (_, ep) = ua.subscribe(None).await;
    push(&ep, None, &h.url(), &keys, "secret payload", &[]).await;
    ua.notification().await;
    let logs = h.logs();
    let lines: Vec<&str> = logs.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(!lines.is_empty());
    for line in &lines {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(
            v.get("level").is_some() && v.get("fields").is_some(),
            "{line}"
        );
    }
    let token = ep.rsplit('/').next().unwrap();
    assert!(!logs.contains(&ua.uaid), "full uaid logged at info");
    assert!(!logs.contains(token), "endpoint token logged at info");
}

#[tokio::test]
async fn a_bad_setting_stops_the_start_with_one_line() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env("HERALD_MAX_TTL", "forever")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("max_ttl"), "{err}");
    let help = std::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["serve", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8(help.stdout).unwrap();
    for flag in [
        "--listen",
        "--data-dir",
        "--public-url",
        "--config",
        "max_stored_messages",
        "HERALD_",
    ] {
        assert!(help.contains(flag), "serve --help lacks {flag}");
    }
}

/// Logs read in files, pipes, journald and `docker logs` carry no terminal
/// colour codes.
#[tokio::test]
async fn logs_to_a_file_carry_no_colour_codes() {
    let h = Herald::start_with(&[], &[("RUST_LOG", "info")]).await;
    let mut ua = Ua::hello(&h, None).await;
    ua.subscribe(None).await;
    let logs = h.logs();
    assert!(logs.contains("herald ready"), "{logs}");
    assert!(
        !logs.contains('\x1b'),
        "ESC in logs written to a file:\n{logs:?}"
    );
}

#[tokio::test]
async fn a_wildcard_listen_address_without_public_url_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    for listen in ["0.0.0.0:0", "[::]:0"] {
        let (code, err) = serve_refused(
            &["--listen", listen, "--data-dir", data.to_str().unwrap()],
            &[],
        );
        assert_eq!(code, Some(2), "{err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(
            err.contains("setting `public_url`: required when `listen` is a wildcard address"),
            "{err}"
        );
    }
    let (code, err) = serve_refused(
        &[
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            data.to_str().unwrap(),
        ],
        &[("HERALD_PUBLIC_URL", "http://0.0.0.0:8080")],
    );
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("public_url") && err.contains("wildcard"),
        "{err}"
    );
    assert!(
        !data.exists(),
        "a refused start must not create the data dir"
    );
}

#[tokio::test]
async fn a_data_dir_in_use_or_not_a_directory_is_named_in_herald_words() {
    let h = Herald::start().await;
    let (code, err) = serve_refused(
        &[
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            h.data_dir.to_str().unwrap(),
        ],
        &[],
    );
    assert_ne!(code, Some(0), "{err}");
    let expected = format!(
        "data_dir {}: already in use by another herald process",
        h.data_dir.display()
    );
    assert!(err.contains(&expected), "{err}");
    assert!(!err.contains("LOCK"), "RocksDB's own words leaked: {err}");
    // The running one is unharmed.
    assert_eq!(
        http(&h, "GET", "/ready", &[], vec![]).await.unwrap().status,
        200
    );

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a-file");
    std::fs::write(&file, "not a directory").unwrap();
    let (code, err) = serve_refused(
        &[
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            file.to_str().unwrap(),
        ],
        &[],
    );
    assert_ne!(code, Some(0), "{err}");
    assert!(
        err.contains(&format!("data_dir {}: not a directory", file.display())),
        "{err}"
    );
    assert!(!err.contains("os error 17"), "{err}");
}

#[tokio::test]
async fn unknown_herald_environment_variables_are_warned_about() {
    let h = Herald::start_with(
        &[],
        &[
            ("HERALD_MAX_TTLS", "7d"),
            ("HERALD_COMPLETELY_UNRELATED", "1"),
            // Read by `herald send`, not a typo.
            ("HERALD_VAPID_KEY", "/nonexistent.pem"),
            ("RUST_LOG", "info"),
        ],
    )
    .await;
    let logs = h.logs();
    assert!(
        logs.contains("environment variable HERALD_MAX_TTLS is not a setting and is ignored; did you mean HERALD_MAX_TTL?"),
        "{logs}"
    );
    assert!(
        logs.contains("environment variable HERALD_COMPLETELY_UNRELATED is not a setting"),
        "{logs}"
    );
    assert!(!logs.contains("HERALD_VAPID_KEY"), "{logs}");
    let warnings = logs
        .lines()
        .filter(|l| l.contains("is not a setting"))
        .count();
    assert_eq!(warnings, 2, "{logs}");
}

/// `/__version__` names the commit this binary was built from.
#[tokio::test]
async fn version_names_the_commit_it_was_built_from() {
    let h = Herald::start().await;
    let v = http(&h, "GET", "/__version__", &[], vec![])
        .await
        .unwrap()
        .json();
    let head = std::process::Command::new("git")
        .args(["rev-parse", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8(o.stdout).unwrap().trim().to_string());
    let expected = head.as_deref().unwrap_or("unknown");
    assert_eq!(v["commit"], expected, "{v}");
    let source = match env!("CARGO_PKG_REPOSITORY") {
        "" => "unknown",
        repo => repo,
    };
    assert_eq!(v["source"], source, "{v}");
    assert!(!v.to_string().contains("example.invalid"), "{v}");
}

#[tokio::test]
async fn split_listeners() {
    let api_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let metrics_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let api = format!("127.0.0.1:{api_port}");
    let metrics = format!("127.0.0.1:{metrics_port}");
    let h = Herald::start_with(
        &[],
        &[
            ("HERALD_ENDPOINT_LISTEN", &api),
            ("HERALD_METRICS_LISTEN", &metrics),
        ],
    )
    .await;
    let keys = UaKeys::new();
    let mut ua = Ua::hello(&h, None).await;
    let (_, ep) = ua.subscribe(None).await;
    let token_path = ep.split_once("/wpush/").unwrap().1;
    let on_main = push(&ep, None, &h.url(), &keys, "x", &[]).await;
    assert_eq!(
        on_main.status, 404,
        "the main listener no longer serves the API"
    );
    let via_api = push(
        &format!("http://{api}/wpush/{token_path}"),
        None,
        &h.url(),
        &keys,
        "x",
        &[],
    )
    .await;
    assert_eq!(via_api.status, 201);
    assert_eq!(ua.notification().await["messageType"], "notification");
    assert_eq!(
        http(&h, "GET", "/metrics", &[], vec![])
            .await
            .unwrap()
            .status,
        404
    );
    let m = request("GET", &format!("http://{metrics}/metrics"), &[], vec![])
        .await
        .unwrap();
    assert!(String::from_utf8(m.body)
        .unwrap()
        .contains("herald_ws_connections 1"));
}

/// The backlog of the socket listening on 127.0.0.1:`port`, as the kernel
/// holds it: the Send-Q column `ss -ltn` shows for a LISTEN socket.
fn listen_backlog_of(port: u16) -> u32 {
    let out = std::process::Command::new("ss")
        .args(["-Hltn", &format!("sport = :{port}")])
        .output()
        .unwrap_or_else(|e| panic!("ss (iproute2) is needed by this test and cannot run: {e}"));
    let text = String::from_utf8(out.stdout).unwrap();
    let rows: Vec<Vec<&str>> = text
        .lines()
        .map(|l| l.split_whitespace().collect())
        .filter(|cols: &Vec<&str>| cols.get(3) == Some(&format!("127.0.0.1:{port}").as_str()))
        .collect();
    assert_eq!(rows.len(), 1, "one LISTEN socket on port {port}:\n{text}");
    assert_eq!(rows[0][0], "LISTEN", "{text}");
    rows[0][2].parse().unwrap()
}

/// Every listening socket gets `listen_backlog` (default 4096) rather than
/// the 128 of `TcpListener::bind`, which a connection storm overflows into
/// SYNs dropped and retried a second later; above net.core.somaxconn the
/// kernel caps it, and Herald says so at start.
#[tokio::test]
async fn listening_sockets_get_the_listen_backlog() {
    let somaxconn: u32 = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let h = Herald::start().await;
    for port in [h.port, metrics_port_of(&h)] {
        assert_eq!(listen_backlog_of(port), 4096.min(somaxconn), "port {port}");
    }
    assert!(!h.logs().contains("somaxconn"), "{}", h.logs());

    let api = format!("127.0.0.1:{}", free_port());
    let h = Herald::start_with(
        &[],
        &[
            ("HERALD_LISTEN_BACKLOG", "512"),
            ("HERALD_ENDPOINT_LISTEN", &api),
        ],
    )
    .await;
    let api_port: u16 = api.rsplit(':').next().unwrap().parse().unwrap();
    for port in [h.port, metrics_port_of(&h), api_port] {
        assert_eq!(listen_backlog_of(port), 512, "port {port}");
    }

    // A kernel whose cap is at listen_backlog's own limit cannot be
    // asked for more.
    if somaxconn >= 65535 {
        return;
    }
    let above = (somaxconn + 1).to_string();
    let h = Herald::start_with(&[], &[("HERALD_LISTEN_BACKLOG", &above)]).await;
    assert_eq!(listen_backlog_of(h.port), somaxconn, "the kernel's cap");
    let logs = h.logs();
    assert!(
        logs.contains("listen_backlog exceeds net.core.somaxconn"),
        "{logs}"
    );
}

fn metrics_port_of(h: &Herald) -> u16 {
    let url = h.metrics_url();
    let rest = url.strip_prefix("http://127.0.0.1:").unwrap();
    rest.split('/').next().unwrap().parse().unwrap()
}

/// A client TLS config trusting only the test's own CA certificate.
fn client_config(ca_der: &[u8]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from(ca_der.to_vec()))
        .unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

async fn tls_stream(
    port: u16,
    config: Arc<rustls::ClientConfig>,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .unwrap()
}

#[tokio::test]
async fn tls_serves_wss_and_https_and_reloads_on_sighup() {
    let dir = tempfile::tempdir().unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let cert_path = dir.path().join("cert.pem");
    let key_path = dir.path().join("key.pem");
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.signing_key.serialize_pem()).unwrap();
    // The public URL only shapes endpoint URLs; the test connects to the
    // harness's port directly.
    let public = "https://localhost:8443".to_string();
    let h = Herald::start_with(
        &["--public-url", &public],
        &[
            ("HERALD_TLS_CERT", cert_path.to_str().unwrap()),
            ("HERALD_TLS_KEY", key_path.to_str().unwrap()),
        ],
    )
    .await;
    let port = h.port;
    let config = client_config(cert.cert.der());

    // wss:// hello and register.
    let stream = tls_stream(port, config.clone()).await;
    let mut req = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
        format!("wss://localhost:{port}/"),
    )
    .unwrap();
    req.headers_mut().insert(
        "sec-websocket-protocol",
        "push-notification".parse().unwrap(),
    );
    let (mut ws, _) = tokio_tungstenite::client_async(req, stream).await.unwrap();
    use futures_util::{SinkExt, StreamExt};
    ws.send(tokio_tungstenite::tungstenite::Message::text(
        r#"{"messageType":"hello"}"#,
    ))
    .await
    .unwrap();
    let hello: serde_json::Value =
        serde_json::from_str(ws.next().await.unwrap().unwrap().to_text().unwrap()).unwrap();
    assert_eq!(hello["status"], 200);
    let ch = uuid::Uuid::new_v4().to_string();
    ws.send(tokio_tungstenite::tungstenite::Message::text(
        serde_json::json!({"messageType":"register","channelID": ch}).to_string(),
    ))
    .await
    .unwrap();
    let reg: serde_json::Value =
        serde_json::from_str(ws.next().await.unwrap().unwrap().to_text().unwrap()).unwrap();
    let ep = reg["pushEndpoint"].as_str().unwrap().to_string();
    assert!(ep.starts_with(&public), "{ep}");

    // https:// push over the same certificate.
    let keys = UaKeys::new();
    let path = ep.trim_start_matches(&public).to_string();
    let stream = tls_stream(port, config.clone()).await;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = http::Request::post(path)
        .header("host", format!("localhost:{port}"))
        .header("ttl", "60")
        .header("content-encoding", "aes128gcm")
        .body(http_body_util::Full::new(bytes::Bytes::from(encrypt(
            &keys,
            b"over tls",
        ))))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 201);
    let n: serde_json::Value =
        serde_json::from_str(ws.next().await.unwrap().unwrap().to_text().unwrap()).unwrap();
    assert_eq!(payload(&keys, &n), "over tls");

    // SIGHUP: a new certificate is served to new connections, the open
    // websocket stays up.
    let cert2 = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    std::fs::write(&cert_path, cert2.cert.pem()).unwrap();
    std::fs::write(&key_path, cert2.signing_key.serialize_pem()).unwrap();
    std::process::Command::new("kill")
        .arg("-HUP")
        .arg(h.pid().to_string())
        .status()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        if tokio_rustls::TlsConnector::from(client_config(cert2.cert.der()))
            .connect(name, tcp)
            .await
            .is_ok()
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "new certificate never served"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ws.send(tokio_tungstenite::tungstenite::Message::text("{}"))
        .await
        .unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap().to_text().unwrap(), "{}");
}
