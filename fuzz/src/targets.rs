//! Fuzz targets for every parser that reads outside input. Each function
//! takes raw bytes (from libFuzzer under `make fuzz`, from the corpus and a
//! seeded mutator under `cargo test`: tests/fuzz_parsers.rs includes this
//! file) and panics if a parser panics or breaks one of its properties:
//! round trips, bounds, agreement with an independent check.
//!
//! Inputs that stand for HTTP requests or environments are text, so the
//! seed corpus stays readable: `Name: value` lines, a blank line, then the
//! raw body (fuzz/corpus/*/pywebpush-* are real pywebpush requests).

use bytes::Bytes;
use herald::broadcast::{self, Snapshot, Subscriptions};
use herald::config::{parse_duration, ServeArgs, Settings};
use herald::errors::ApiError;
use herald::receipts::api as receipt_api;
use herald::router::cluster::{Evict, Wake};
use herald::store::{
    decode_channel, decode_message, decode_pending, decode_receipt, decode_user, encode_channel,
    encode_message, encode_pending, encode_receipt, encode_user, message_expires_at, Message,
};
use herald::token::{key_hash, ApiVersion, EndpointToken, MessageId, ReceiptToken, TokenCodec};
use herald::vapid::{parse_credentials, CacheResult, VapidVerifier};
use herald::webpush::{check_encoding, parse_topic, parse_ttl, parse_urgency, MAX_CRYPTO_HEADER};
use herald_proto::b64::decode_b64url;
use herald_proto::headers::header_param;
use herald_proto::ids::{parse_channel_id, Uaid};
use herald_proto::protocol::{notification_json, ClientMessage, ServerMessage};
use std::collections::BTreeMap;
use std::sync::OnceLock;

/// The clock the VAPID target verifies at. Seed tokens expire 12 h after
/// it (pywebpush's own choice of exp, captured on 2026-11-29, falls in the
/// same window), so they reach the success path.
pub const NOW: u64 = 1_795_950_000;
/// The audience seed tokens name (`public_url`'s origin).
pub const AUDIENCE: &str = "https://push.example.com";
/// Endpoint keys: the first seals, both open (rotation).
pub const TOKEN_KEYS: [[u8; 32]; 2] = [[7; 32], [9; 32]];
/// The default `max_ttl` (30 days).
const MAX_TTL: u64 = 30 * 86400;

/// A fuzz target: panics on a failure.
pub type Target = fn(&[u8]);

/// Every target, by name, for the test runner and `make fuzz`.
pub const ALL: &[(&str, Target)] = &[
    ("ws_message", ws_message),
    ("push_headers", push_headers),
    ("vapid", vapid),
    ("tokens", tokens),
    ("config", config),
    ("codec", codec),
    ("broadcast_source", broadcast_source),
    ("cluster_wire", cluster_wire),
];

pub fn codec_keys() -> &'static TokenCodec {
    static CODEC: OnceLock<TokenCodec> = OnceLock::new();
    CODEC.get_or_init(|| TokenCodec::new(&TOKEN_KEYS).expect("keys"))
}

const PRIVATE_TOKEN: &str = "fuzz-private-mode-token";

/// Settings of a private service (`user_agent_tokens`) with one token.
fn private_settings() -> &'static Settings {
    static SETTINGS: OnceLock<Settings> = OnceLock::new();
    SETTINGS.get_or_init(|| {
        let env = BTreeMap::from([(
            "HERALD_USER_AGENT_TOKENS".to_string(),
            PRIVATE_TOKEN.to_string(),
        )]);
        Settings::load(&ServeArgs::default(), &env).expect("private settings")
    })
}

/// Splits `Name: value` lines (names lower-cased, the first of a name
/// wins) from the body after the first blank line.
pub fn request(data: &[u8]) -> (BTreeMap<String, String>, &[u8]) {
    let (head, body) = match data.windows(2).position(|w| w == b"\n\n") {
        Some(i) => (&data[..i], &data[i + 2..]),
        None => (data, &data[data.len()..]),
    };
    let mut headers = BTreeMap::new();
    for line in String::from_utf8_lossy(head).split('\n') {
        if let Some((name, value)) = line.split_once(':') {
            let value = value.strip_prefix(' ').unwrap_or(value);
            let value = value.strip_suffix('\r').unwrap_or(value);
            headers
                .entry(name.trim().to_ascii_lowercase())
                .or_insert_with(|| value.to_string());
        }
    }
    (headers, body)
}

fn get<'a>(h: &'a BTreeMap<String, String>, name: &str) -> Option<&'a str> {
    h.get(name).map(String::as_str)
}

/// An error answer is sent as JSON whatever text it quotes.
fn check_api_error(e: &ApiError) {
    let v: serde_json::Value = serde_json::from_str(&e.to_json()).expect("error body is JSON");
    assert_eq!(v["errno"], e.errno.code());
    assert_eq!(v["message"], e.message.as_str());
    assert!((400..600).contains(&e.status), "{e:?}");
}

/// A uaid Herald accepted names exactly the 32 hex digits it was sent
/// (hyphens aside), so the hello reply echoes what the user agent holds.
fn check_uaid(s: &str) {
    if let Some(u) = Uaid::parse(s) {
        let canonical = u.to_string();
        assert_eq!(Uaid::parse(&canonical), Some(u));
        let sent: String = s.chars().filter(|c| *c != '-').collect();
        assert_eq!(sent.to_ascii_lowercase(), canonical, "uaid {s:?}");
    }
}

fn check_channel_id(s: &str) {
    if let Some(c) = parse_channel_id(s) {
        assert_eq!(parse_channel_id(&c.hyphenated().to_string()), Some(c));
    }
}

/// Websocket text frames from a user agent: `ClientMessage::parse` and
/// what the session does next with the fields (uaid, channel ids, keys,
/// message ids, broadcast subscriptions, the replies it renders).
pub fn ws_message(data: &[u8]) {
    // The websocket layer hands over text frames only as valid UTF-8.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let parsed = ClientMessage::parse(text);
    // Surrounding whitespace never changes the outcome.
    let padded = ClientMessage::parse(&format!("\t {text}\n"));
    match (&parsed, &padded) {
        (Ok(a), Ok(b)) => assert_eq!(a, b),
        (Err(_), Err(_)) => {}
        _ => panic!("whitespace changed the outcome: {parsed:?} vs {padded:?}"),
    }
    let msg = match parsed {
        Ok(m) => m,
        Err(e) => {
            assert!(!e.0.is_empty());
            return;
        }
    };
    let tokens = codec_keys();
    match msg {
        ClientMessage::Hello {
            uaid,
            channel_ids,
            broadcasts,
            token,
        } => {
            if let Some(u) = &uaid {
                assert!(!u.is_empty());
                check_uaid(u);
            }
            // Private mode admits exactly its own token, whatever was sent.
            let admitted = herald::policy::admit_user_agent(private_settings(), token.as_deref());
            assert_eq!(admitted.is_ok(), token.as_deref() == Some(PRIVATE_TOKEN));
            channel_ids.iter().for_each(|c| check_channel_id(c));
            subscribe(broadcasts);
            let hello = ServerMessage::Hello {
                uaid: uaid.unwrap_or_default(),
                status: 200,
                use_webpush: true,
                broadcasts: Default::default(),
            }
            .to_json();
            serde_json::from_str::<serde_json::Value>(&hello).expect("hello reply is JSON");
        }
        ClientMessage::BroadcastSubscribe { broadcasts } => subscribe(broadcasts),
        ClientMessage::Register { channel_id, key } => {
            check_channel_id(&channel_id);
            if let Some(k) = &key {
                assert!(!k.is_empty());
                let _ = decode_b64url(k);
            }
            let reply = ServerMessage::Register {
                channel_id: channel_id.clone(),
                status: 400,
                push_endpoint: None,
            }
            .to_json();
            let v: serde_json::Value = serde_json::from_str(&reply).expect("register reply");
            assert_eq!(v["channelID"], channel_id.as_str());
        }
        ClientMessage::Unregister { channel_id, .. } => check_channel_id(&channel_id),
        ClientMessage::Ack { updates } => {
            for u in &updates {
                check_channel_id(&u.channel_id);
                let _ = tokens.open_message_id(&u.version);
            }
        }
        ClientMessage::Nack { version, .. } => {
            let _ = tokens.open_message_id(&version);
        }
        ClientMessage::Urgency { .. } | ClientMessage::Ping => {}
    }
}

/// Broadcast subscriptions stay within their bounds whatever is asked.
fn subscribe(client: BTreeMap<String, String>) {
    let snapshot = Snapshot {
        serial: 2,
        versions: BTreeMap::from([
            (
                "remote-settings/monitor_changes".to_string(),
                "\"1700000000000\"".to_string(),
            ),
            ("herald/test".to_string(), "v2".to_string()),
        ]),
    };
    let mut subs = Subscriptions::default();
    let delta = subs.subscribe(&snapshot, client);
    assert!(delta.changed.len() + delta.errors.len() <= broadcast::MAX_SUBSCRIPTIONS);
    for id in delta.changed.keys().chain(delta.errors.keys()) {
        assert!(
            !id.is_empty() && id.len() <= broadcast::MAX_ID_LEN,
            "{id:?}"
        );
    }
    for (id, v) in &delta.changed {
        assert_eq!(snapshot.versions.get(id), Some(v));
    }
    let json = ServerMessage::Broadcast { broadcasts: delta }.to_json();
    serde_json::from_str::<serde_json::Value>(&json).expect("broadcast reply is JSON");
}

/// An application server's POST: TTL, Urgency, Topic, Content-Encoding
/// (with the RFC 8188 header of an aes128gcm body, or aesgcm's Encryption
/// and Crypto-Key), then the message as stored, read back, and rendered to
/// the user agent.
pub fn push_headers(data: &[u8]) {
    let (h, body) = request(data);
    let max_ttl = get(&h, "x-max-ttl")
        .and_then(|v| v.parse().ok())
        .unwrap_or(MAX_TTL);

    let ttl_header = get(&h, "ttl");
    let ttl = parse_ttl(ttl_header, max_ttl);
    match (&ttl, ttl_header) {
        (Ok(t), Some(v)) => {
            assert!(*t <= max_ttl);
            let v = v.trim();
            assert!(
                !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()),
                "{v:?}"
            );
            if let Ok(n) = v.parse::<u64>() {
                assert_eq!(*t, n.min(max_ttl));
            }
        }
        (Ok(_), None) => panic!("TTL is required"),
        (Err(e), _) => {
            assert_eq!(e.errno.code(), if ttl_header.is_none() { 111 } else { 112 });
            check_api_error(e);
        }
    }

    let urgency_header = get(&h, "urgency");
    let urgency = parse_urgency(urgency_header);
    match (&urgency, urgency_header) {
        (Ok(u), Some(v)) => assert_eq!(u.as_str(), v.trim().to_ascii_lowercase()),
        (Ok(u), None) => assert_eq!(u.as_str(), "normal"),
        (Err(e), _) => check_api_error(e),
    }

    let topic_header = get(&h, "topic");
    let topic = parse_topic(topic_header);
    match &topic {
        Ok(Some(t)) => {
            assert_eq!(Some(t.as_str()), topic_header);
            assert!((1..=32).contains(&t.len()), "{t:?}");
            assert!(t
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
        }
        Ok(None) => assert!(topic_header.is_none()),
        Err(e) => check_api_error(e),
    }

    receipt_headers(&h);

    // Only a body is checked for its encoding (as the endpoint does).
    let headers = if body.is_empty() {
        Ok(None)
    } else {
        check_encoding(
            get(&h, "content-encoding"),
            get(&h, "encryption"),
            get(&h, "crypto-key"),
            body,
        )
        .map(Some)
    };
    match &headers {
        Ok(Some(n)) if n.encoding == "aes128gcm" => {
            // RFC 8188 §2.1: salt 16 | rs u32 | idlen u8 | keyid | records.
            let rs = u32::from_be_bytes(body[16..20].try_into().expect("4 bytes"));
            assert!(rs >= 18);
            assert!(body.len() >= 21 + body[20] as usize + 17);
            assert!(n.encryption.is_none() && n.crypto_key.is_none());
        }
        Ok(Some(n)) => {
            assert_eq!(n.encoding, "aesgcm");
            let enc = n.encryption.as_deref().expect("aesgcm keeps Encryption");
            let salt = header_param(enc, "salt").expect("salt=");
            assert_eq!(decode_b64url(salt).map(|s| s.len()), Some(16));
            let key = n.crypto_key.as_deref().expect("aesgcm keeps Crypto-Key");
            assert!(header_param(key, "dh").is_some());
            assert!(enc.len() <= MAX_CRYPTO_HEADER && key.len() <= MAX_CRYPTO_HEADER);
            // Stored in the canonical form: no quotes or spaces, and
            // normalising it again changes nothing.
            assert!(!enc.contains(['"', ' ']) && !key.contains(['"', ' ']));
            let again = herald::aesgcm::normalise(enc, key).expect("canonical headers normalise");
            assert_eq!(
                (again.encryption.as_str(), again.crypto_key.as_str()),
                (enc, key)
            );
        }
        Ok(None) => {}
        Err(e) => check_api_error(e),
    }

    let (Ok(ttl), Ok(urgency), Ok(topic), Ok(headers)) = (ttl, urgency, topic, headers) else {
        return;
    };
    let channel = uuid::Uuid::from_bytes([0x5a; 16]);
    let message = Message {
        seq: 42,
        channel,
        expires_at: NOW.saturating_add(ttl),
        ttl,
        urgency,
        topic,
        headers,
        data: Bytes::copy_from_slice(body),
        receipt: false,
    };
    // Stored, then read back: the same message.
    let stored = encode_message(&message);
    assert_eq!(message_expires_at(&stored), Some(message.expires_at));
    assert_eq!(decode_message(42, &stored).as_ref(), Some(&message));

    // Rendered for the user agent: JSON carrying the same fields.
    let version = match get(&h, "x-version") {
        Some(v) => v.to_string(),
        None => codec_keys().message_id(&MessageId {
            uaid: Uaid([1; 16]),
            channel,
            seq: 42,
        }),
    };
    let frame = notification_json(
        &channel,
        &version,
        message.headers.as_ref().map(|n| (body, n)),
        ttl,
    );
    let v: serde_json::Value = serde_json::from_str(&frame).expect("notification is JSON");
    assert_eq!(v["messageType"], "notification");
    assert_eq!(v["channelID"], channel.hyphenated().to_string());
    assert_eq!(v["version"], version.as_str());
    assert_eq!(v["ttl"], ttl);
    if let Some(n) = &message.headers {
        let data = v["data"].as_str().expect("data");
        assert_eq!(decode_b64url(data).as_deref(), Some(body));
        assert_eq!(v["headers"]["encoding"], n.encoding.as_str());
    } else {
        assert!(v.get("data").is_none() && v.get("headers").is_none());
    }
}

/// The receipt headers of a push (`Prefer`, `Link`, `Push-Receipt`) and of
/// a read of a receipt subscription (`Prefer: wait`, `Last-Event-ID`).
fn receipt_headers(h: &BTreeMap<String, String>) {
    let mut map = http::HeaderMap::new();
    for (k, v) in h {
        if let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(k.as_bytes()),
            http::HeaderValue::from_str(v),
        ) {
            map.append(name, value);
        }
    }
    match receipt_api::requested(&map) {
        Ok(Some(req)) => {
            if let Some(token) = &req.given {
                assert!(!token.is_empty() && !token.contains('/'), "{token:?}");
            }
            match receipt_api::bind(req, None, codec_keys()) {
                Ok((sub, token)) => {
                    let opened = codec_keys().open_receipt_token(&token).expect("opens");
                    assert_eq!(opened.sub, sub.0);
                }
                Err(e) => {
                    assert!(matches!(e.errno.code(), 121 | 122), "{}", e.errno.code());
                    check_api_error(&e);
                }
            }
        }
        // (Judged on the header map: a value that is no valid header value
        // never reaches Herald.)
        Ok(None) => assert!(map.get("push-receipt").is_none()),
        Err(e) => {
            assert_eq!((e.status, e.errno.code()), (400, 121));
            check_api_error(&e);
        }
    }
    let _ = receipt_api::wants_batch(&map);
    if let Err(e) = receipt_api::resume_after(&map, get(h, "x-query")) {
        assert_eq!((e.status, e.errno.code()), (400, 123));
        check_api_error(&e);
    }
}

/// VAPID: the `Authorization` (and legacy `Crypto-Key: p256ecdsa=`)
/// headers, then JWT verification. A token Herald accepts must pass an
/// independent check: the ES256 signature over `header.payload` with the
/// key as sent, exp within 24 h, the audience, a mailto:/https: sub.
pub fn vapid(data: &[u8]) {
    let (h, _) = request(data);
    let creds = match parse_credentials(get(&h, "authorization"), get(&h, "crypto-key")) {
        Ok(Some(c)) => c,
        Ok(None) => {
            assert!(get(&h, "authorization").is_none_or(|a| a.trim().is_empty()));
            return;
        }
        Err(e) => {
            assert_eq!((e.status, e.errno.code()), (401, 109));
            check_api_error(&e);
            return;
        }
    };
    let verifier = VapidVerifier::new(AUDIENCE, 4);
    let (hash, cache) = match verifier.verify(&creds, NOW) {
        Ok((sender, cache)) => (sender.key_hash, cache),
        Err(e) => {
            assert_eq!((e.status, e.errno.code()), (401, 109));
            assert!(e.vapid_reason.is_some());
            check_api_error(&e);
            return;
        }
    };
    assert_eq!(cache, CacheResult::Miss);
    let raw_key = decode_b64url(creds.key).expect("accepted key is base64url");
    assert_eq!(hash, key_hash(&raw_key));
    let exp = independent_vapid_check(creds.jwt, &raw_key);
    // Cached: the same answer, until exp.
    assert_eq!(
        verifier
            .verify(&creds, NOW)
            .ok()
            .map(|(s, c)| (s.key_hash, c)),
        Some((hash, CacheResult::Hit))
    );
    let late = verifier.verify(&creds, exp).expect_err("expired at exp");
    assert_eq!(late.vapid_reason, Some("expired"));
}

/// Returns the token's exp.
fn independent_vapid_check(jwt: &str, raw_key: &[u8]) -> u64 {
    use p256::ecdsa::signature::Verifier;
    let parts: Vec<&str> = jwt.split('.').collect();
    assert_eq!(parts.len(), 3, "{jwt:?}");
    let json = |s: &str| -> serde_json::Value {
        let bytes = decode_b64url(s).expect("JWT part is base64url");
        serde_json::from_slice(&bytes).expect("JWT part is JSON")
    };
    assert_eq!(json(parts[0])["alg"], "ES256");
    let claims = json(parts[1]);
    let exp = claims["exp"].as_u64().expect("numeric exp");
    assert!(exp > NOW && exp <= NOW + 24 * 3600 + 60, "exp {exp}");
    let aud_ok = |a: &serde_json::Value| {
        a.as_str()
            .is_some_and(|a| a.trim_end_matches('/').eq_ignore_ascii_case(AUDIENCE))
    };
    let aud = &claims["aud"];
    assert!(
        aud_ok(aud) || aud.as_array().is_some_and(|l| l.iter().any(aud_ok)),
        "aud {aud}"
    );
    if let Some(sub) = claims.get("sub") {
        let sub = sub.as_str().expect("string sub");
        assert!(
            sub.starts_with("mailto:") || sub.starts_with("https:"),
            "{sub}"
        );
    }
    let key = p256::ecdsa::VerifyingKey::from_sec1_bytes(raw_key).expect("a P-256 point");
    let sig = decode_b64url(parts[2]).expect("signature is base64url");
    let sig = p256::ecdsa::Signature::from_slice(&sig).expect("64-byte signature");
    let signed = &jwt[..parts[0].len() + 1 + parts[1].len()];
    key.verify(signed.as_bytes(), &sig)
        .expect("accepted token is signed by its key");
    exp
}

/// Endpoint tokens and message ids. As text (a URL path segment): at most
/// one kind opens it, and what opens seals again to the same fields. As
/// fields: sealing opens to the same fields, only as its own kind, and no
/// single changed character opens at all.
pub fn tokens(data: &[u8]) {
    let c = codec_keys();
    if let Ok(s) = std::str::from_utf8(data) {
        let v1 = c.open_endpoint(ApiVersion::V1, s);
        let v2 = c.open_endpoint(ApiVersion::V2, s);
        let m = c.open_message_id(s);
        let r = c.open_receipt_token(s);
        let opened = usize::from(v1.is_some())
            + usize::from(v2.is_some())
            + usize::from(m.is_some())
            + usize::from(r.is_some());
        assert!(opened <= 1, "{s:?} opens as {opened} kinds");
        for (t, version) in [(v1, ApiVersion::V1), (v2, ApiVersion::V2)] {
            if let Some(t) = t {
                assert_eq!(t.key_hash.is_some(), version == ApiVersion::V2);
                let (v, again) = c.endpoint_token(&t);
                assert_eq!(v, version);
                assert_eq!(c.open_endpoint(v, &again), Some(t));
            }
        }
        if let Some(m) = m {
            assert_eq!(c.open_message_id(&c.message_id(&m)), Some(m));
        }
        if let Some(r) = r {
            assert_eq!(c.open_receipt_token(&c.receipt_token(&r)), Some(r));
        }
    }

    if data.len() < 41 {
        return;
    }
    let uaid = Uaid(data[..16].try_into().expect("16 bytes"));
    let channel = uuid::Uuid::from_bytes(data[16..32].try_into().expect("16 bytes"));
    let seq = u64::from_be_bytes(data[32..40].try_into().expect("8 bytes"));
    let pick = data[40];
    let key_hash: Option<[u8; 32]> = data
        .get(41..73)
        .filter(|_| pick & 1 == 1)
        .map(|h| h.try_into().expect("32 bytes"));
    let t = EndpointToken {
        uaid,
        channel,
        key_hash,
    };
    let receipt = ReceiptToken {
        sub: data[..16].try_into().expect("16 bytes"),
        key_hash,
    };
    assert_eq!(
        c.open_receipt_token(&c.receipt_token(&receipt)),
        Some(receipt)
    );
    let (version, sealed) = c.endpoint_token(&t);
    assert_eq!(version == ApiVersion::V2, key_hash.is_some());
    assert!(sealed.len() < 200);
    assert_eq!(c.open_endpoint(version, &sealed).as_ref(), Some(&t));
    let other = match version {
        ApiVersion::V1 => ApiVersion::V2,
        ApiVersion::V2 => ApiVersion::V1,
    };
    assert!(c.open_endpoint(other, &sealed).is_none());
    assert!(c.open_message_id(&sealed).is_none());
    let id = MessageId { uaid, channel, seq };
    let sealed_id = c.message_id(&id);
    assert_eq!(c.open_message_id(&sealed_id), Some(id));
    assert!(c.open_endpoint(ApiVersion::V1, &sealed_id).is_none());
    assert!(c.open_endpoint(ApiVersion::V2, &sealed_id).is_none());

    // Tampering: one character changed, anywhere, to any other byte.
    let replacement = data.get(73).copied().unwrap_or(b'A');
    let tamper = |token: &str| -> Option<String> {
        let mut bytes = token.as_bytes().to_vec();
        let pos = (seq as usize) % bytes.len();
        (bytes[pos] != replacement).then(|| {
            bytes[pos] = replacement;
            String::from_utf8_lossy(&bytes).into_owned()
        })
    };
    if let Some(altered) = tamper(&sealed) {
        assert!(
            c.open_endpoint(version, &altered).is_none(),
            "{altered:?} opened"
        );
    }
    if let Some(altered) = tamper(&sealed_id) {
        assert!(c.open_message_id(&altered).is_none(), "{altered:?} opened");
    }
}

/// Settings from the environment (`HERALD_*=value` lines), flags
/// (`--listen=...` lines) and, after a `[toml]` line, a config file; and
/// every value as a duration, against an independent reading.
pub fn config(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let (lines, toml) = match text.split_once("[toml]\n") {
        Some((l, t)) => (l, Some(t)),
        None => (&*text, None),
    };
    let mut env = BTreeMap::new();
    let mut args = ServeArgs::default();
    for line in lines.lines() {
        if let Some((k, v)) = line.split_once('=') {
            check_duration(v);
            match k {
                "--listen" => args.listen = Some(v.to_string()),
                "--data-dir" => args.data_dir = Some(v.to_string()),
                "--public-url" => args.public_url = Some(v.to_string()),
                "--log-format" => args.log_format = Some(v.to_string()),
                _ => {
                    env.insert(k.to_string(), v.to_string());
                }
            }
        }
    }
    let file = toml.map(|t| {
        let path = std::env::temp_dir().join(format!(
            "herald-fuzz-config-{}-{:?}.toml",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::write(&path, t).expect("writing the config file");
        path
    });
    args.config = file.clone();
    let loaded = Settings::load(&args, &env);
    if let Some(f) = &file {
        let _ = std::fs::remove_file(f);
    }
    match loaded {
        Ok(s) => {
            assert!(s.max_frame_size >= 1024);
            for d in [
                s.hello_timeout,
                s.ping_interval,
                s.ping_timeout,
                s.ua_expiry,
                s.sweep_interval,
                s.redis_wait_timeout,
                s.broadcast_poll_interval,
            ] {
                assert!(!d.is_zero());
            }
            for n in [
                s.max_connections,
                s.max_channels_per_uaid,
                s.max_message_bytes,
                s.max_stored_messages,
                s.delivery_window,
                s.jwt_cache_size,
            ] {
                assert!(n >= 1);
            }
            assert_eq!(s.tls_cert.is_some(), s.tls_key.is_some());
            let origin = &s.public_url.origin;
            assert!(origin.starts_with("http://") || origin.starts_with("https://"));
            assert_eq!(origin, &origin.to_ascii_lowercase());
            assert!(!s.public_url.base.ends_with('/'));
            if s.store == herald::config::StoreKind::Redis {
                assert!(s.redis_url.is_some() && !s.endpoint_keys.is_empty());
            }
            assert!(s.broadcast_tokens.iter().all(|t| t.len() >= 16));
        }
        Err(e) => assert!(
            e.0.starts_with("setting") || e.0.starts_with("config file"),
            "{e}"
        ),
    }
}

/// `parse_duration` against a reading of its documented grammar: digits,
/// then nothing, ms, s, m, h or d (whitespace around either ignored).
fn check_duration(v: &str) {
    use std::time::Duration;
    let got = parse_duration(v);
    let t = v.trim();
    let digits = t.bytes().take_while(u8::is_ascii_digit).count();
    let (num, unit) = t.split_at(digits);
    let mult: Option<u128> = match unit.trim() {
        "" | "s" => Some(1000),
        "ms" => Some(1),
        "m" => Some(60_000),
        "h" => Some(3_600_000),
        "d" => Some(86_400_000),
        _ => None,
    };
    let expected = match (num.parse::<u64>(), mult) {
        (Ok(n), Some(m)) => {
            let ms = n as u128 * m;
            let secs = u64::try_from(ms / 1000).ok();
            secs.map(|s| Duration::new(s, (ms % 1000) as u32 * 1_000_000))
        }
        _ => None,
    };
    assert_eq!(got.ok(), expected, "duration {v:?}");
}

/// Values read back from the store. What decodes encodes again to the same
/// value (messages: to one that decodes the same).
pub fn codec(data: &[u8]) {
    let Some((&which, v)) = data.split_first() else {
        return;
    };
    match which % 5 {
        0 => {
            if let Some(u) = decode_user(v) {
                assert_eq!(encode_user(&u), v);
            }
        }
        1 => {
            if let Some(c) = decode_channel(v) {
                assert_eq!(encode_channel(&c), v);
            }
        }
        3 => {
            if let Some(p) = decode_pending(v) {
                assert_eq!(encode_pending(&p), v);
            }
        }
        4 => {
            if let Some(e) = decode_receipt(v) {
                assert_eq!(encode_receipt(&e), v);
            }
        }
        _ => {
            let seq = u64::from(which);
            if let Some(m) = decode_message(seq, v) {
                assert_eq!(m.seq, seq);
                assert_eq!(m.receipt, v[0] == 2);
                assert_eq!(message_expires_at(v), Some(m.expires_at));
                let again = encode_message(&m);
                assert_eq!(decode_message(seq, &again), Some(m.clone()));
                // The one non-canonical form: aes128gcm spelled out as a
                // legacy header set (encoding byte 2). Format 2 has a flags
                // byte before the topic.
                let flags = usize::from(v[0] == 2);
                let at = 1 + 8 + 8 + 1 + 16 + flags + 1 + v[34 + flags] as usize;
                if v[at] != 2 {
                    assert_eq!(again, v);
                }
            }
        }
    }
}

/// An upstream source's answer of broadcast versions.
pub fn broadcast_source(data: &[u8]) {
    match broadcast::source::parse(data) {
        Ok(versions) => {
            // (A Value may refuse what parse skips: a number beyond f64.)
            let all: Option<serde_json::Value> = serde_json::from_slice(data).ok();
            for (id, v) in &versions {
                assert!(broadcast::valid(id, v), "{id:?} {v:?}");
                if let Some(all) = &all {
                    assert_eq!(all["broadcasts"][id], v.as_str());
                }
            }
        }
        Err(e) => assert!(!e.is_empty()),
    }
}

/// Node-to-node requests: a wake-up (with a TTL-0 message in the store's
/// encoding) and an eviction.
pub fn cluster_wire(data: &[u8]) {
    if let Ok(w) = serde_json::from_slice::<Wake>(data) {
        check_uaid(&w.uaid);
        if let Some(m) = &w.message {
            if let Some(msg) = decode_b64url(&m.value).and_then(|v| decode_message(m.seq, &v)) {
                assert_eq!(msg.seq, m.seq);
                let again = encode_message(&msg);
                assert_eq!(decode_message(m.seq, &again), Some(msg));
            }
        }
        let back: Wake = serde_json::from_slice(&serde_json::to_vec(&w).expect("serialises"))
            .expect("reads back");
        assert_eq!(back.uaid, w.uaid);
        assert_eq!(
            back.message.map(|m| (m.seq, m.value)),
            w.message.map(|m| (m.seq, m.value))
        );
    }
    if let Ok(e) = serde_json::from_slice::<Evict>(data) {
        check_uaid(&e.uaid);
        let back: Evict = serde_json::from_slice(&serde_json::to_vec(&e).expect("serialises"))
            .expect("reads back");
        assert_eq!((back.uaid, back.conn), (e.uaid, e.conn));
    }
}
