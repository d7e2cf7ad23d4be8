//! The bounds that hold an internet client (issue 28, items 1, 7 and 8),
//! each reproducing the attack at small scale against a real Herald:
//! oversized VAPID tokens, oversized request heads, and what /metrics and
//! error bodies reveal. proto-docs/threat-model.md lists them all.

mod common;

use common::*;
use serde_json::json;
use std::io::{Read, Write};
use std::time::{Duration, Instant};

/// A VAPID `Authorization` whose JWT is about `len` bytes long, padded in
/// its `sub` claim (still a valid mailto: URI), signed for real.
fn padded_authorization(app: &AppServer, aud: &str, len: usize, nonce: u64) -> (String, usize) {
    let sub = |n: usize| format!("mailto:{}@example.com", "a".repeat(n));
    // The JWT grows by 4 characters for every 3 bytes of claims.
    let mut pad = (len * 3 / 4).saturating_sub(200);
    loop {
        let jwt = app.jwt(json!({"aud": aud, "exp": now() + 3600 + nonce, "sub": sub(pad)}));
        if jwt.len() >= len {
            return (format!("vapid t={jwt}, k={}", app.public()), jwt.len());
        }
        pad += 3 * (len - jwt.len()).div_ceil(4);
    }
}

#[tokio::test]
async fn vapid_tokens_over_4_kib_are_refused_and_never_cached() {
    let h = Herald::start().await;
    let app = AppServer::new();
    let keys = UaKeys::new();
    let mut ua = Ua::hello(&h, None).await;
    let (_, ep) = ua.subscribe(Some(&app.public())).await;
    let body = encrypt(&keys, b"x");

    // Many distinct, validly signed tokens just over the limit: each is
    // refused with the VAPID errno, before any is verified or remembered.
    for i in 0..40 {
        let (auth, len) = padded_authorization(&app, &h.url(), 4200, i);
        assert!(len > 4096 && len < 4400, "{len}");
        let r = request(
            "POST",
            &ep,
            &[
                ("ttl", "60"),
                ("content-encoding", "aes128gcm"),
                ("authorization", &auth),
            ],
            body.clone(),
        )
        .await
        .unwrap();
        assert_eq!(r.status, 401, "{}", String::from_utf8_lossy(&r.body));
        assert_eq!(r.errno(), 109);
        assert!(
            r.json()["message"].as_str().unwrap().contains("4096 bytes"),
            "{}",
            r.json()
        );
    }
    assert_eq!(
        metric(&h, "herald_vapid_failures_total{reason=\"jwt_too_long\"}").await,
        40.0
    );
    assert_eq!(
        metric(&h, "herald_jwt_cache_lookups_total{result=\"miss\"}").await,
        0.0,
        "no refused token reached the verifier's cache"
    );

    // A large token within the limit still works.
    let (auth, len) = padded_authorization(&app, &h.url(), 4000, 0);
    assert!((4000..=4096).contains(&len), "{len}");
    let r = request(
        "POST",
        &ep,
        &[
            ("ttl", "60"),
            ("content-encoding", "aes128gcm"),
            ("authorization", &auth),
        ],
        body,
    )
    .await
    .unwrap();
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(payload(&keys, &ua.notification().await), "x");
}

/// Writes `head` to Herald and returns what came back (status line or EOF)
/// and how long it took, reading for at most `within`.
fn send_raw(port: u16, head: &[u8], within: Duration) -> (String, Duration) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(within)).unwrap();
    let started = Instant::now();
    // Herald may refuse and close before all of it is written.
    let _ = s.write_all(head);
    let mut buf = vec![0u8; 1024];
    let answer = match s.read(&mut buf) {
        Ok(0) => "EOF".to_string(),
        Ok(n) => String::from_utf8_lossy(&buf[..n])
            .lines()
            .next()
            .unwrap_or_default()
            .to_string(),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => "EOF".to_string(),
        Err(e) => format!("no answer: {e}"),
    };
    (answer, started.elapsed())
}

#[tokio::test]
async fn an_oversized_request_head_is_refused_without_waiting_for_its_end() {
    let h = Herald::start().await;
    // 24 KiB of one header and no blank line: with hyper's default buffer
    // (about 400 KB) Herald would keep reading and hold it for 30 s.
    let mut head = b"POST /wpush/v1/x HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: ".to_vec();
    head.extend(std::iter::repeat_n(b'a', 24 * 1024));
    let (answer, took) = send_raw(h.port, &head, Duration::from_secs(5));
    assert!(
        answer.starts_with("HTTP/1.1 431") || answer == "EOF",
        "{answer} after {took:?}"
    );
    assert!(took < Duration::from_secs(3), "{took:?}");

    // More headers than any push needs: refused as well (hyper's count limit).
    let mut head = b"POST /wpush/v1/x HTTP/1.1\r\nHost: 127.0.0.1\r\n".to_vec();
    for i in 0..120 {
        head.extend(format!("X-H{i}: 1\r\n").as_bytes());
    }
    head.extend(b"\r\n");
    let (answer, _) = send_raw(h.port, &head, Duration::from_secs(5));
    assert!(
        answer.starts_with("HTTP/1.1 431") || answer == "EOF",
        "{answer}"
    );

    // Herald is still serving.
    assert_eq!(
        http(&h, "GET", "/health", &[], vec![])
            .await
            .unwrap()
            .status,
        200
    );
}

#[tokio::test]
async fn a_push_with_the_largest_legitimate_headers_is_accepted() {
    let h = Herald::start().await;
    let app = AppServer::new();
    let keys = UaKeys::new();
    let mut ua = Ua::hello(&h, None).await;
    let (_, ep) = ua.subscribe(Some(&app.public())).await;
    // aesgcm with Encryption and Crypto-Key near their 4096-byte limit (a
    // long keyid) and a VAPID token near its own: about 12 KB of headers.
    let legacy = LegacyAesgcm::encrypt(&keys.public, &keys.auth, b"big");
    // One keyid names the Crypto-Key's dh from Encryption (a keyid that
    // names no dh is refused), sized so the longer header nears the limit.
    let (encryption, crypto_key) = (legacy.encryption, legacy.crypto_key);
    let keyid = "k".repeat(4090 - encryption.len().max(crypto_key.len()) - ";keyid=".len());
    let (encryption, crypto_key) = (
        format!("{encryption};keyid={keyid}"),
        format!("{crypto_key};keyid={keyid}"),
    );
    assert!(encryption.len() > 4000 && encryption.len() <= 4096);
    assert!(crypto_key.len() > 4000 && crypto_key.len() <= 4096);
    let (auth, len) = padded_authorization(&app, &h.url(), 4050, 0);
    assert!(len <= 4096, "{len}");
    let r = request(
        "POST",
        &ep,
        &[
            ("ttl", "60"),
            ("content-encoding", "aesgcm"),
            ("encryption", &encryption),
            ("crypto-key", &crypto_key),
            ("authorization", &auth),
        ],
        legacy.body,
    )
    .await
    .unwrap();
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let n = ua.notification().await;
    assert_eq!(n["headers"]["encoding"], "aesgcm");
}

#[tokio::test]
async fn metrics_are_off_the_public_listener_unless_configured() {
    // Neither metrics_listen nor metrics_public: not served at all.
    let h = Herald::start_with(&[], &[("HERALD_METRICS_PUBLIC", "false")]).await;
    let r = http(&h, "GET", "/metrics", &[], vec![]).await.unwrap();
    assert_eq!(r.status, 404);
    assert_eq!(r.errno(), 119);

    // metrics_listen (as the harness sets by default): there, and only there.
    let h = Herald::start().await;
    assert_eq!(
        http(&h, "GET", "/metrics", &[], vec![])
            .await
            .unwrap()
            .status,
        404
    );
    assert!(metrics_text(&h).await.contains("herald_ws_connections"));

    // The explicit opt-in serves it on the main listener.
    let h = Herald::start_with(&[], &[("HERALD_METRICS_PUBLIC", "true")]).await;
    let r = http(&h, "GET", "/metrics", &[], vec![]).await.unwrap();
    assert_eq!(r.status, 200);
    assert!(String::from_utf8(r.body)
        .unwrap()
        .contains("herald_ws_connections"));
}
