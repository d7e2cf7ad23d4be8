//! Quotas per receiver and per sender (README, "Running a public service"):
//! a real Herald, real websocket user agents, real VAPID and encryption.
//! Each quota answers 429 with `Retry-After` and its errno, counts the
//! refusal in `herald_throttled_total`, and lets pushes through again once
//! the wait is over; two nodes on one Redis hold one limit between them.

mod common;

use common::redis::RedisServer;
use common::*;
use std::time::Duration;

/// A Herald with these quota settings (the others stay off).
async fn herald(env: &[(&str, &str)]) -> Herald {
    Herald::start_with(&[], env).await
}

/// A push of "hi" to `ep`, signed by `app` if given, with `extra` headers.
async fn send(h: &Herald, ep: &str, app: Option<&AppServer>, extra: &[(&str, &str)]) -> Resp {
    push(ep, app, &h.url(), &UaKeys::new(), "hi", extra).await
}

/// Asserts a quota refusal: 429, its errno, a whole `Retry-After` of at
/// least a second; returns the seconds.
fn refused(r: &Resp, errno: u64) -> u64 {
    assert_eq!(r.status, 429, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.errno(), errno, "{}", String::from_utf8_lossy(&r.body));
    let secs: u64 = r
        .header("retry-after")
        .expect("Retry-After on a 429")
        .parse()
        .expect("whole seconds");
    assert!(secs >= 1);
    secs
}

async fn throttled(h: &Herald, reason: &str) -> f64 {
    metric(h, &format!("herald_throttled_total{{reason=\"{reason}\"}}")).await
}

#[tokio::test]
async fn a_subscription_over_its_quota_gets_429_then_recovers() {
    let h = herald(&[
        ("HERALD_SUBSCRIPTION_RATE_LIMIT", "60/m"),
        ("HERALD_SUBSCRIPTION_RATE_BURST", "3"),
    ])
    .await;
    let (_, ep) = offline_subscription(&h, None).await;
    let (_, other) = offline_subscription(&h, None).await;
    for i in 0..3 {
        assert_eq!(send(&h, &ep, None, &[]).await.status, 201, "push {i}");
    }
    // A topic-replacing push is a push too.
    let r = send(&h, &ep, None, &[("topic", "news")]).await;
    let wait = refused(&r, 125);
    assert_eq!(wait, 1, "one a second: the next token is a second away");
    assert_eq!(throttled(&h, "subscription").await, 1.0);
    // Another subscription has its own quota.
    assert_eq!(send(&h, &other, None, &[]).await.status, 201);
    tokio::time::sleep(Duration::from_secs(wait)).await;
    assert_eq!(
        send(&h, &ep, None, &[]).await.status,
        201,
        "after Retry-After"
    );
}

#[tokio::test]
async fn a_user_agent_quota_spans_its_subscriptions() {
    let h = herald(&[
        ("HERALD_UA_RATE_LIMIT", "60/m"),
        ("HERALD_UA_RATE_BURST", "3"),
    ])
    .await;
    let mut ua = Ua::hello(&h, None).await;
    let (_, one) = ua.subscribe(None).await;
    let (_, two) = ua.subscribe(None).await;
    drop(ua);
    tokio::time::sleep(Duration::from_millis(100)).await;
    for ep in [&one, &two, &one] {
        assert_eq!(send(&h, ep, None, &[]).await.status, 201);
    }
    let wait = refused(&send(&h, &two, None, &[]).await, 125);
    assert_eq!(throttled(&h, "user_agent").await, 1.0);
    assert_eq!(throttled(&h, "subscription").await, 0.0);
    tokio::time::sleep(Duration::from_secs(wait)).await;
    assert_eq!(send(&h, &two, None, &[]).await.status, 201);
}

#[tokio::test]
async fn a_vapid_key_over_its_quota_gets_429_whatever_it_pushes_to() {
    let h = herald(&[
        ("HERALD_SENDER_RATE_LIMIT", "60/m"),
        ("HERALD_SENDER_RATE_BURST", "3"),
    ])
    .await;
    let (app, other_app) = (AppServer::new(), AppServer::new());
    let mut eps = vec![];
    for _ in 0..4 {
        eps.push(offline_subscription(&h, None).await.1);
    }
    for ep in &eps[..3] {
        assert_eq!(send(&h, ep, Some(&app), &[]).await.status, 201);
    }
    let wait = refused(&send(&h, &eps[3], Some(&app), &[]).await, 126);
    assert_eq!(throttled(&h, "sender_key").await, 1.0);
    // Another key, and a sender without VAPID (anonymous quota off), pass.
    assert_eq!(send(&h, &eps[3], Some(&other_app), &[]).await.status, 201);
    assert_eq!(send(&h, &eps[3], None, &[]).await.status, 201);
    tokio::time::sleep(Duration::from_secs(wait)).await;
    assert_eq!(send(&h, &eps[3], Some(&app), &[]).await.status, 201);
}

#[tokio::test]
async fn anonymous_senders_share_a_quota_per_address_and_cannot_forge_one() {
    let quota = [
        ("HERALD_ANONYMOUS_RATE_LIMIT", "60/m"),
        ("HERALD_ANONYMOUS_RATE_BURST", "2"),
    ];
    // No trusted proxy: X-Forwarded-For is anyone's to write, and ignored.
    let h = herald(&quota).await;
    let (_, ep) = offline_subscription(&h, None).await;
    for fake in ["198.51.100.1", "198.51.100.2"] {
        let r = send(&h, &ep, None, &[("x-forwarded-for", fake)]).await;
        assert_eq!(r.status, 201);
    }
    let r = send(&h, &ep, None, &[("x-forwarded-for", "198.51.100.3")]).await;
    refused(&r, 126);
    assert_eq!(throttled(&h, "sender_address").await, 1.0);
    // A VAPID sender has its own quota (off here), not the address's.
    assert_eq!(
        send(&h, &ep, Some(&AppServer::new()), &[]).await.status,
        201
    );

    // Behind a trusted proxy (this test's loopback peer), each client
    // named by the proxy gets its own quota.
    let mut env = quota.to_vec();
    env.push(("HERALD_TRUSTED_PROXIES", "127.0.0.0/8"));
    let h = herald(&env).await;
    let (_, ep) = offline_subscription(&h, None).await;
    let xff = |v: &'static str| [("x-forwarded-for", v)];
    for _ in 0..2 {
        let r = send(&h, &ep, None, &xff("198.51.100.1")).await;
        assert_eq!(r.status, 201);
    }
    refused(&send(&h, &ep, None, &xff("198.51.100.1")).await, 126);
    // Prepending another address does not help: the proxy appended the
    // real one last.
    refused(
        &send(&h, &ep, None, &xff("203.0.113.7, 198.51.100.1")).await,
        126,
    );
    // Trusted hops on the right are skipped.
    refused(
        &send(&h, &ep, None, &xff("198.51.100.1, 127.0.0.9")).await,
        126,
    );
    assert_eq!(send(&h, &ep, None, &xff("198.51.100.2")).await.status, 201);
    // Forwarded (RFC 7239) is believed first; IPv6 counts by /64.
    let fwd = |v: &'static str| [("forwarded", v)];
    for _ in 0..2 {
        let r = send(&h, &ep, None, &fwd(r#"for="[2001:db8:0:1::1]:4711""#)).await;
        assert_eq!(r.status, 201);
    }
    let r = send(
        &h,
        &ep,
        None,
        &fwd(r#"for="[2001:db8:0:1::2]";proto=https"#),
    )
    .await;
    refused(&r, 126);
    let r = send(&h, &ep, None, &fwd(r#"for="[2001:db8:0:2::1]""#)).await;
    assert_eq!(r.status, 201, "another /64");
}

/// A sender spread over two nodes on one Redis, pushing at 10 a second
/// against a quota of 20 at once then 1 a second: over 6 s the two nodes
/// together should admit about 26 (the global limit), not the 52 that two
/// independent nodes would.
#[tokio::test]
async fn two_nodes_on_redis_hold_one_sender_quota() {
    let redis = tokio::task::spawn_blocking(RedisServer::start)
        .await
        .unwrap();
    let key = b64(&rand::random::<[u8; 32]>());
    let quota = [
        ("HERALD_SENDER_RATE_LIMIT", "60/m"),
        ("HERALD_SENDER_RATE_BURST", "20"),
    ];
    let node = |public: Option<String>| {
        let mut env = vec![
            ("HERALD_STORE", "redis".to_string()),
            ("HERALD_REDIS_URL", redis.url().to_string()),
            ("HERALD_ENDPOINT_KEYS", key.clone()),
        ];
        env.extend(quota.iter().map(|(k, v)| (*k, v.to_string())));
        async move {
            let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let args: Vec<&str> = match &public {
                Some(p) => vec!["--public-url", p],
                None => vec![],
            };
            Herald::start_with(&args, &env).await
        }
    };
    let a = node(None).await;
    let b = node(Some(a.url())).await;
    let (_, ep) = offline_subscription(&a, None).await;
    let path = &ep[ep.find("/wpush/").unwrap()..];
    let app = AppServer::new();
    let (mut admitted, mut refusals) = (0, 0);
    for i in 0..60 {
        let via = if i % 2 == 0 { &a } else { &b };
        // TTL 0: nothing is stored for the offline user agent.
        let url = format!("{}{path}", via.url());
        let r = push(
            &url,
            Some(&app),
            &a.url(),
            &UaKeys::new(),
            "x",
            &[("ttl", "0")],
        )
        .await;
        match r.status {
            201 => admitted += 1,
            429 => {
                assert_eq!(r.errno(), 126);
                refusals += 1;
            }
            s => panic!("push {i}: {s} {}", String::from_utf8_lossy(&r.body)),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(admitted + refusals, 60);
    eprintln!("two nodes admitted {admitted} of 60 pushes (global quota about 26)");
    assert!(
        (22..=34).contains(&admitted),
        "two nodes admitted {admitted} of 60; the global quota over 6 s is about 26, two independent nodes would admit about 52"
    );
    let both = throttled(&a, "sender_key").await + throttled(&b, "sender_key").await;
    assert_eq!(both, f64::from(refusals));
}
