//! The application-server commands against real processes: `herald vapid`
//! key round trips, and `herald send` delivering to a websocket user agent
//! driven here (decrypted with the independent `ece` crate), reporting
//! the push service's refusals, and waiting for delivery receipts.

#[path = "support/firefox.rs"]
mod support;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use futures_util::{SinkExt, StreamExt};
use p256::elliptic_curve::sec1::ToEncodedPoint;
use p256::pkcs8::{DecodePrivateKey, LineEnding};
use p256::SecretKey;
use rand::RngCore;
use serde_json::{json, Value};
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;
use support::{HeraldServer, HERALD};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

fn herald(args: &[&str]) -> Output {
    Command::new(HERALD)
        .args(args)
        .output()
        .expect("run the herald binary")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The public key p256 itself derives from a PEM file, as an independent
/// check of what `herald vapid` prints.
fn public_key_of_pkcs8(path: &Path) -> String {
    let pem = std::fs::read_to_string(path).unwrap();
    let key = SecretKey::from_pkcs8_pem(&pem).expect("PKCS#8 P-256 key");
    URL_SAFE_NO_PAD.encode(key.public_key().to_encoded_point(false).as_bytes())
}

#[test]
fn vapid_generate_and_show_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let key_path = dir.path().join("vapid.pem");
    let key_arg = key_path.to_str().unwrap();

    let out = herald(&["vapid", "generate", "--out", key_arg]);
    assert!(out.status.success(), "generate failed: {}", stderr(&out));
    let public = stdout(&out).trim().to_owned();
    let raw = URL_SAFE_NO_PAD
        .decode(&public)
        .expect("public key is unpadded base64url");
    assert_eq!(raw.len(), 65);
    assert_eq!(raw[0], 0x04, "uncompressed point");
    assert_eq!(public, public_key_of_pkcs8(&key_path));
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key_path).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "private key readable by others: {mode:o}");
    }

    let out = herald(&["vapid", "show", key_arg]);
    assert!(out.status.success(), "show failed: {}", stderr(&out));
    assert_eq!(stdout(&out).trim(), public);

    // Never silently replaces a key.
    let before = std::fs::read(&key_path).unwrap();
    let out = herald(&["vapid", "generate", "--out", key_arg]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--force"), "{}", stderr(&out));
    assert_eq!(std::fs::read(&key_path).unwrap(), before);

    // Without --out: PEM on stdout, public key on stderr.
    let out = herald(&["vapid", "generate"]);
    assert!(out.status.success());
    let pem_path = dir.path().join("stdout.pem");
    std::fs::write(&pem_path, &out.stdout).unwrap();
    let announced = stderr(&out)
        .lines()
        .find_map(|l| l.strip_prefix("public key: "))
        .expect("public key on stderr")
        .trim()
        .to_owned();
    assert_eq!(announced, public_key_of_pkcs8(&pem_path));
    assert_ne!(announced, public, "two generated keys are equal");

    // SEC1 ("EC PRIVATE KEY"), as openssl ecparam writes it.
    let sec1_path = dir.path().join("sec1.pem");
    let secret = SecretKey::from_pkcs8_pem(&std::fs::read_to_string(&key_path).unwrap()).unwrap();
    std::fs::write(
        &sec1_path,
        secret.to_sec1_pem(LineEnding::LF).unwrap().as_bytes(),
    )
    .unwrap();
    let out = herald(&["vapid", "show", sec1_path.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out).trim(), public);

    // Garbage and missing files fail with a reason.
    let junk = dir.path().join("junk.pem");
    std::fs::write(
        &junk,
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    let out = herald(&["vapid", "show", junk.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("bad VAPID key"), "{}", stderr(&out));
    let out = herald(&[
        "vapid",
        "show",
        dir.path().join("missing.pem").to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("cannot read"), "{}", stderr(&out));
}

/// A user agent speaking Mozilla's push websocket protocol, with its own
/// RFC 8291 keys.
struct UserAgent {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    secret: SecretKey,
    auth: [u8; 16],
}

fn random_uuid() -> String {
    let mut b = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut b);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

impl UserAgent {
    async fn connect(ws_url: &str) -> UserAgent {
        let mut request = ws_url.into_client_request().unwrap();
        request.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            "push-notification".parse().unwrap(),
        );
        let (ws, _) = tokio_tungstenite::connect_async(request)
            .await
            .expect("websocket connects to herald");
        let mut auth = [0u8; 16];
        rand::rngs::OsRng.fill_bytes(&mut auth);
        let mut ua = UserAgent {
            ws,
            secret: SecretKey::random(&mut rand::rngs::OsRng),
            auth,
        };
        ua.send(json!({"messageType": "hello", "use_webpush": true, "broadcasts": {}}))
            .await;
        let hello = ua.expect("hello").await;
        assert_eq!(hello["status"], 200, "{hello}");
        ua
    }

    async fn send(&mut self, message: Value) {
        self.ws
            .send(Message::Text(message.to_string().into()))
            .await
            .expect("websocket send");
    }

    /// The next message of `kind`, skipping pings and unrelated messages.
    async fn expect(&mut self, kind: &str) -> Value {
        let read = async {
            loop {
                let frame = self
                    .ws
                    .next()
                    .await
                    .expect("websocket open")
                    .expect("websocket frame");
                let Message::Text(text) = frame else { continue };
                let value: Value = serde_json::from_str(&text).expect("server sends JSON");
                if value["messageType"] == kind {
                    return value;
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(15), read)
            .await
            .unwrap_or_else(|_| panic!("no {kind} message within 15 s"))
    }

    /// Registers a channel bound to `app_key`; returns (channelID, endpoint).
    async fn register(&mut self, app_key: &str) -> (String, String) {
        let channel = random_uuid();
        self.send(json!({"messageType": "register", "channelID": channel, "key": app_key}))
            .await;
        let reply = self.expect("register").await;
        assert_eq!(reply["status"], 200, "{reply}");
        assert_eq!(reply["channelID"], channel.as_str());
        (
            channel,
            reply["pushEndpoint"]
                .as_str()
                .expect("pushEndpoint")
                .to_owned(),
        )
    }

    fn subscription(&self, endpoint: &str) -> Value {
        json!({
            "endpoint": endpoint,
            "expirationTime": null,
            "keys": {
                "p256dh": URL_SAFE_NO_PAD.encode(self.secret.public_key().to_encoded_point(false).as_bytes()),
                "auth": URL_SAFE_NO_PAD.encode(self.auth),
            }
        })
    }

    /// Refuses the next notification, as Firefox does with code 302 when
    /// the service worker failed to handle it.
    async fn nack_next(&mut self, code: u32) {
        let n = self.expect("notification").await;
        self.send(json!({"messageType": "nack", "version": n["version"], "code": code}))
            .await;
    }

    /// Reads a notification, acks it, and returns (channelID, plaintext).
    async fn notification(&mut self) -> (String, Option<Vec<u8>>) {
        let n = self.expect("notification").await;
        let channel = n["channelID"].as_str().unwrap().to_owned();
        self.send(json!({"messageType": "ack", "updates": [
            {"channelID": channel, "version": n["version"], "code": 100}
        ]}))
        .await;
        let Some(data) = n["data"].as_str() else {
            return (channel, None);
        };
        assert_eq!(n["headers"]["encoding"], "aes128gcm", "{n}");
        let body = URL_SAFE_NO_PAD.decode(data.trim_end_matches('=')).unwrap();
        let components = ece::EcKeyComponents::new(
            self.secret.to_bytes().to_vec(),
            self.secret
                .public_key()
                .to_encoded_point(false)
                .as_bytes()
                .to_vec(),
        );
        let plain = ece::decrypt(&components, &self.auth, &body)
            .expect("ece decrypts what herald send encrypted");
        (channel, Some(plain))
    }
}

/// Runs `herald send` off the async runtime.
async fn herald_send(args: Vec<String>) -> Output {
    tokio::task::spawn_blocking(move || {
        Command::new(HERALD)
            .arg("send")
            .args(&args)
            .output()
            .expect("run herald send")
    })
    .await
    .unwrap()
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_delivers_and_reports_refusals() {
    let server = tokio::task::spawn_blocking(HeraldServer::start)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("vapid.pem");
    let out = herald(&["vapid", "generate", "--out", key.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let app_key = stdout(&out).trim().to_owned();
    let key = key.to_str().unwrap().to_owned();
    let logs = || server.proc.log_tail(40);

    let mut ua = UserAgent::connect(&server.ws_url()).await;
    let (channel, endpoint) = ua.register(&app_key).await;
    assert!(
        endpoint.starts_with(&format!("{}/", server.url())),
        "{endpoint}"
    );
    let sub_file = dir.path().join("subscription.json");
    std::fs::write(&sub_file, ua.subscription(&endpoint).to_string()).unwrap();
    let sub_file = sub_file.to_str().unwrap().to_owned();

    // A payload, with every header option, from a subscription file.
    let out = herald_send(args(&[
        "--subscription",
        &sub_file,
        "--vapid-key",
        &key,
        "--subject",
        "mailto:tests@example.com",
        "--data",
        "hello from herald send",
        "--ttl",
        "60",
        "--urgency",
        "high",
        "--topic",
        "greeting",
    ]))
    .await;
    assert!(
        out.status.success(),
        "send failed: {} {}\n{}",
        stdout(&out),
        stderr(&out),
        logs()
    );
    let printed = stdout(&out);
    assert!(printed.starts_with("201"), "{printed}");
    assert!(printed.contains("Location: "), "{printed}");
    let (got_channel, plain) = ua.notification().await;
    assert_eq!(got_channel, channel);
    assert_eq!(plain.as_deref(), Some(&b"hello from herald send"[..]));

    // No payload, subscription inline, payload from a file next.
    let inline = ua.subscription(&endpoint).to_string();
    let out = herald_send(args(&["--subscription", &inline, "--vapid-key", &key])).await;
    assert!(out.status.success(), "{}\n{}", stderr(&out), logs());
    let (_, plain) = ua.notification().await;
    assert_eq!(plain, None, "a message without payload carried data");

    let payload_file = dir.path().join("payload.bin");
    let payload: Vec<u8> = (0..=255u8).cycle().take(3000).collect();
    std::fs::write(&payload_file, &payload).unwrap();
    let out = herald_send(args(&[
        "--subscription",
        &sub_file,
        "--vapid-key",
        &key,
        "--data-file",
        payload_file.to_str().unwrap(),
    ]))
    .await;
    assert!(out.status.success(), "{}\n{}", stderr(&out), logs());
    let (_, plain) = ua.notification().await;
    assert_eq!(plain.as_deref(), Some(&payload[..]));

    refusals_are_reported(&ua, &endpoint, &sub_file, dir.path(), &key).await;

    // After the user agent unregisters, the endpoint is gone.
    ua.send(json!({"messageType": "unregister", "channelID": channel}))
        .await;
    let reply = ua.expect("unregister").await;
    assert_eq!(reply["status"], 200, "{reply}");
    let out = herald_send(args(&[
        "--subscription",
        &sub_file,
        "--vapid-key",
        &key,
        "--data",
        "x",
    ]))
    .await;
    assert!(
        !out.status.success(),
        "unregistered endpoint accepted: {}",
        stdout(&out)
    );
    assert!(
        stdout(&out).starts_with("410"),
        "{} {}",
        stdout(&out),
        stderr(&out)
    );
}

/// What `herald send` prints when the push service refuses, and what it
/// refuses itself before sending.
async fn refusals_are_reported(
    ua: &UserAgent,
    endpoint: &str,
    sub_file: &str,
    dir: &Path,
    key: &str,
) {
    // A forged endpoint: the token does not decrypt.
    let (base, _) = endpoint.rsplit_once('/').unwrap();
    let mut junk = [0u8; 64];
    rand::rngs::OsRng.fill_bytes(&mut junk);
    let forged = ua
        .subscription(&format!("{base}/{}", URL_SAFE_NO_PAD.encode(junk)))
        .to_string();
    let out = herald_send(args(&[
        "--subscription",
        &forged,
        "--vapid-key",
        key,
        "--data",
        "x",
    ]))
    .await;
    assert!(
        !out.status.success(),
        "forged endpoint accepted: {}",
        stdout(&out)
    );
    assert!(stdout(&out).starts_with("404"), "{}", stdout(&out));
    assert!(stderr(&out).contains("errno 102"), "{}", stderr(&out));

    // Another application server's key for a key-bound subscription.
    let other_key = dir.join("other.pem");
    let out = herald(&["vapid", "generate", "--out", other_key.to_str().unwrap()]);
    assert!(out.status.success());
    let out = herald_send(args(&[
        "--subscription",
        sub_file,
        "--vapid-key",
        other_key.to_str().unwrap(),
        "--data",
        "x",
    ]))
    .await;
    assert!(
        !out.status.success(),
        "wrong VAPID key accepted: {}",
        stdout(&out)
    );
    assert!(stdout(&out).starts_with("403"), "{}", stdout(&out));
    assert!(stderr(&out).contains("403"), "{}", stderr(&out));

    // No VAPID at all on a key-bound subscription.
    let out = herald_send(args(&["--subscription", sub_file, "--data", "x"])).await;
    assert!(
        !out.status.success(),
        "unsigned push accepted: {}",
        stdout(&out)
    );
    assert!(stdout(&out).starts_with("401"), "{}", stdout(&out));
    assert!(stderr(&out).contains("errno 109"), "{}", stderr(&out));

    // Bad input is refused locally, with the reason, before any request.
    let out = herald_send(args(&[
        "--subscription",
        sub_file,
        "--topic",
        "no spaces allowed",
        "--data",
        "x",
    ]))
    .await;
    assert!(!out.status.success());
    assert!(stderr(&out).contains("topic"), "{}", stderr(&out));
    let out = herald_send(args(&["--subscription", "{\"endpoint\": 5}"])).await;
    assert!(!out.status.success());
    assert!(stderr(&out).contains("subscription"), "{}", stderr(&out));
}

#[test]
fn send_fails_clearly_without_a_push_service() {
    let port = support::free_port();
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("k.pem");
    assert!(
        herald(&["vapid", "generate", "--out", key.to_str().unwrap()])
            .status
            .success()
    );
    let p256dh = URL_SAFE_NO_PAD.encode(
        SecretKey::random(&mut rand::rngs::OsRng)
            .public_key()
            .to_encoded_point(false)
            .as_bytes(),
    );
    let sub = json!({"endpoint": format!("http://127.0.0.1:{port}/wpush/v2/x"),
                     "keys": {"p256dh": p256dh, "auth": URL_SAFE_NO_PAD.encode([1u8; 16])}})
    .to_string();
    let out = herald(&[
        "send",
        "--subscription",
        &sub,
        "--vapid-key",
        key.to_str().unwrap(),
        "--data",
        "x",
    ]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("cannot connect"), "{}", stderr(&out));

    let https = sub.replace("http://", "https://");
    let out = herald(&["send", "--subscription", &https, "--data", "x"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("cannot connect"), "{}", stderr(&out));
    let out = herald(&[
        "send",
        "--subscription",
        &sub,
        "--ca",
        "/nonexistent/ca.pem",
    ]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("CA file"), "{}", stderr(&out));
}

/// A throwaway CA and a certificate for `localhost` it signed: the CA's
/// PEM, the certificate's, and the certificate's key.
fn private_ca(dir: &Path) -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "Herald test CA");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca = rcgen::CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let issuer: &rcgen::Issuer<'_, KeyPair> = &ca;
    let cert = CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .signed_by(&key, issuer)
        .unwrap();
    let write = |name: &str, text: String| {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_owned()
    };
    (
        write("ca.pem", ca.pem()),
        write("cert.pem", cert.pem()),
        write("key.pem", key.serialize_pem()),
    )
}

#[test]
fn send_speaks_https_with_a_private_ca() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = private_ca(dir.path());
    let server = HeraldServer::start_node(
        dir.path(),
        "herald",
        Some("https://localhost:{port}"),
        &[("HERALD_TLS_CERT", &cert), ("HERALD_TLS_KEY", &key)],
    );
    let vapid = dir.path().join("vapid.pem");
    let out = herald(&["vapid", "generate", "--out", vapid.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let app_key = stdout(&out).trim().to_owned();
    let vapid = vapid.to_str().unwrap();

    // A user agent over wss:// (herald listen, trusting the same CA).
    let state = dir.path().join("listen.json");
    let state = state.to_str().unwrap();
    let wss = format!("wss://localhost:{}/", server.port);
    let out = herald(&[
        "listen",
        "--state",
        state,
        "--ca",
        &ca,
        "subscribe",
        "s",
        "--server",
        &wss,
        "--vapid-key",
        &app_key,
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let sub = stdout(&out).trim().to_owned();
    let endpoint = serde_json::from_str::<Value>(&sub).unwrap()["endpoint"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        endpoint.starts_with(&format!("https://localhost:{}/", server.port)),
        "{endpoint}"
    );
    let send = |extra: &[&str], text: &str| {
        let mut a = vec!["send", "--subscription", &sub, "--vapid-key", vapid];
        a.extend_from_slice(&["--subject", "mailto:ops@example.com", "--data", text]);
        a.extend_from_slice(extra);
        herald(&a)
    };

    // The CA is private: without --ca the certificate is not trusted.
    let out = send(&[], "untrusted");
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("TLS handshake") && err.contains("certificate"),
        "{err}"
    );

    let out = send(&["--ca", &ca], "over https");
    assert!(
        out.status.success() && stdout(&out).starts_with("201"),
        "{}{}\n{}",
        stdout(&out),
        stderr(&out),
        server.proc.log_tail(20)
    );

    // Delivered: the user agent receives it.
    let mut listener = Command::new(HERALD)
        .args(["listen", "--state", state, "--ca", &ca, "run"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("herald listen run starts");
    let lines = listener.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(lines).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let line = rx.recv_timeout(Duration::from_secs(30));
    let _ = listener.kill();
    let _ = listener.wait();
    let line: Value = serde_json::from_str(&line.expect("a message within 30 s")).unwrap();
    assert_eq!(line["text"], "over https", "{line}");
}

/// A Herald, a VAPID key, and a user agent subscribed with it whose
/// subscription JSON is in a file.
struct ReceiptSetup {
    server: HeraldServer,
    _dir: tempfile::TempDir,
    key: String,
    sub_file: String,
    ua: UserAgent,
}

async fn receipt_setup() -> ReceiptSetup {
    let server = tokio::task::spawn_blocking(HeraldServer::start)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("vapid.pem");
    let out = herald(&["vapid", "generate", "--out", key.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let app_key = stdout(&out).trim().to_owned();
    let mut ua = UserAgent::connect(&server.ws_url()).await;
    let (_, endpoint) = ua.register(&app_key).await;
    let sub_file = dir.path().join("subscription.json");
    std::fs::write(&sub_file, ua.subscription(&endpoint).to_string()).unwrap();
    ReceiptSetup {
        key: key.to_str().unwrap().to_owned(),
        sub_file: sub_file.to_str().unwrap().to_owned(),
        server,
        _dir: dir,
        ua,
    }
}

impl ReceiptSetup {
    /// `herald send --receipt` with `extra` arguments, in the background.
    fn send(&self, extra: &[&str]) -> tokio::task::JoinHandle<Output> {
        let mut list = args(&[
            "--subscription",
            &self.sub_file,
            "--vapid-key",
            &self.key,
            "--data",
            "with a receipt",
            "--receipt",
            "--receipt-timeout",
            "8",
        ]);
        list.extend(args(extra));
        tokio::spawn(herald_send(list))
    }
}

/// The value of the first stdout line starting with `prefix`.
fn line<'a>(out: &'a str, prefix: &str) -> &'a str {
    out.lines()
        .find_map(|l| l.strip_prefix(prefix))
        .unwrap_or_else(|| panic!("no {prefix:?} line in {out:?}"))
}

fn message_id(out: &str) -> &str {
    line(out, "Location: ").rsplit('/').next().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_receipt_waits_for_delivery() {
    let mut s = receipt_setup().await;
    let send = s.send(&[]);
    let (_, plain) = s.ua.notification().await;
    assert_eq!(plain.as_deref(), Some(&b"with a receipt"[..]));
    let out = send.await.unwrap();
    let printed = stdout(&out);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{printed}{}\n{}",
        stderr(&out),
        s.server.proc.log_tail(20)
    );
    assert!(printed.starts_with("202 Accepted\n"), "{printed}");
    let subscription = line(&printed, "Receipt subscription: ").to_owned();
    assert!(
        subscription.starts_with(&format!("{}/r/", s.server.url())),
        "{printed}"
    );
    let first = message_id(&printed).to_owned();
    let receipt = line(&printed, "receipt: ");
    assert!(receipt.starts_with("delivered at 20"), "{printed}");
    assert!(
        receipt.ends_with(&format!("Z (message {first})")),
        "{printed}"
    );

    // Reusing the subscription: its first receipt is skipped, and the new
    // message's is reported.
    let send = s.send(&["--receipt-subscription", &subscription]);
    s.ua.notification().await;
    let out = send.await.unwrap();
    let printed = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{printed}{}", stderr(&out));
    assert_eq!(line(&printed, "Receipt subscription: "), subscription);
    let second = message_id(&printed);
    assert_ne!(second, first);
    assert!(
        line(&printed, "receipt: ").ends_with(&format!("(message {second})")),
        "{printed}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_receipt_reports_a_rejection_with_its_code() {
    let mut s = receipt_setup().await;
    let send = s.send(&[]);
    s.ua.nack_next(302).await;
    let out = send.await.unwrap();
    let printed = stdout(&out);
    assert_eq!(out.status.code(), Some(3), "{printed}{}", stderr(&out));
    let receipt = line(&printed, "receipt: ");
    assert!(receipt.starts_with("rejected (code 302) at "), "{printed}");
    assert!(
        receipt.ends_with(&format!("(message {})", message_id(&printed))),
        "{printed}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_receipt_reports_expiry_while_offline() {
    let ReceiptSetup {
        server,
        _dir,
        key,
        sub_file,
        ua,
    } = receipt_setup().await;
    drop(ua);
    // Let Herald see the user agent leave before the push arrives.
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Not waiting long enough: a distinct status, and why.
    let out = herald_send(args(&[
        "--subscription",
        &sub_file,
        "--vapid-key",
        &key,
        "--receipt",
        "--receipt-timeout",
        "1",
    ]))
    .await;
    assert_eq!(
        out.status.code(),
        Some(7),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    assert!(
        stderr(&out).contains("no receipt within 1 s; the message is queued"),
        "{}",
        stderr(&out)
    );

    let out = herald_send(args(&[
        "--subscription",
        &sub_file,
        "--vapid-key",
        &key,
        "--data",
        "too late",
        "--ttl",
        "1",
        "--receipt",
        "--receipt-timeout",
        "8",
    ]))
    .await;
    let printed = stdout(&out);
    assert_eq!(
        out.status.code(),
        Some(4),
        "{printed}{}\n{}",
        stderr(&out),
        server.proc.log_tail(20)
    );
    assert!(
        line(&printed, "receipt: ").starts_with("expired at "),
        "{printed}"
    );
}

#[test]
fn send_help_documents_the_receipt_exit_statuses() {
    let out = herald(&["send", "--help"]);
    assert!(out.status.success());
    let help = stdout(&out);
    for expected in [
        "--receipt ",
        "--receipt-subscription <URL>",
        "--receipt-timeout <SECONDS>",
        "3  rejected",
        "4  expired",
        "7  no receipt within --receipt-timeout",
    ] {
        assert!(help.contains(expected), "{expected:?} not in\n{help}");
    }
}

/// `herald demo` without `--data-dir` keeps its VAPID private key in the
/// user's state directory (`$XDG_STATE_HOME/herald/demo`, else
/// `~/.local/state/herald/demo`), never in the directory it runs from.
#[test]
fn demo_keeps_its_private_key_in_the_user_state_dir() {
    use support::{free_port, http, wait_for, Proc};
    let tmp = tempfile::tempdir().unwrap();
    let cwd = tmp.path().join("repo");
    let home = tmp.path().join("home");
    let state = tmp.path().join("state");
    std::fs::create_dir_all(&cwd).unwrap();
    let start = |xdg: Option<&Path>, log: &str| -> (Proc, String) {
        let port = free_port();
        let mut command = Command::new(HERALD);
        command
            .args(["demo", "--listen", &format!("127.0.0.1:{port}")])
            .current_dir(&cwd)
            .env("HOME", &home)
            .env_remove("XDG_STATE_HOME");
        if let Some(dir) = xdg {
            command.env("XDG_STATE_HOME", dir);
        }
        let mut proc = Proc::spawn("herald demo", command, tmp.path().join(log));
        let key = wait_for(Duration::from_secs(30), || {
            assert!(proc.exited().is_none(), "{}", proc.log_tail(20));
            http("127.0.0.1", port, "GET", "/vapid-public-key", None)
                .ok()
                .filter(|r| r.status == 200)
                .map(|r| r.body.trim().to_string())
        })
        .unwrap_or_else(|| panic!("herald demo did not answer\n{}", proc.log_tail(20)));
        (proc, key)
    };

    let (mut demo, key) = start(Some(&state), "demo1.log");
    let pem = state.join("herald/demo/vapid.pem");
    assert!(pem.is_file(), "no {}", pem.display());
    demo.stop(Duration::from_secs(5));
    // The same key on the next start: browsers' subscriptions are bound to it.
    let (mut demo, again) = start(Some(&state), "demo2.log");
    assert_eq!(again, key);
    demo.stop(Duration::from_secs(5));

    let (mut demo, _) = start(None, "demo3.log");
    assert!(home.join(".local/state/herald/demo/vapid.pem").is_file());
    demo.stop(Duration::from_secs(5));

    let left: Vec<_> = std::fs::read_dir(&cwd).unwrap().collect();
    assert!(
        left.is_empty(),
        "herald demo wrote into its working directory: {left:?}"
    );
}

/// `herald send` warns about a large payload in the same words Herald's 413
/// uses, so the two numbers add up.
#[test]
fn send_explains_the_portable_payload_budget() {
    let key = SecretKey::random(&mut rand::rngs::OsRng);
    let dead = support::free_port();
    let subscription = json!({
        "endpoint": format!("http://127.0.0.1:{dead}/wpush/v1/x"),
        "keys": {
            "p256dh": URL_SAFE_NO_PAD.encode(key.public_key().to_encoded_point(false).as_bytes()),
            "auth": URL_SAFE_NO_PAD.encode([7u8; 16]),
        }
    })
    .to_string();
    let data = "x".repeat(4000);
    let out = herald(&["send", "--subscription", &subscription, "--data", &data]);
    let err = stderr(&out);
    assert!(
        err.contains("the payload is 4000 bytes of plaintext; push services only have to accept an encrypted body of at most 4096 bytes, of which RFC 8291's framing takes 103 for one record, leaving 3993 bytes of plaintext"),
        "{err}"
    );
}
