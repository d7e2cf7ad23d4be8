//! Delivery receipts (RFC 8030 §5.1) end to end: a sender asks with
//! `Prefer: respond-async`, a real websocket user agent acks, nacks or
//! stays away, and the sender reads what happened from its receipt
//! subscription, as a JSON batch or as server-sent events.

mod common;

use common::*;
use http_body_util::BodyExt;
use serde_json::{json, Value};
use std::time::Duration;

const REL: &str = "urn:ietf:params:push:receipt";

/// The receipt subscription URL in a 202's `Link`.
fn receipt_url(r: &Resp) -> String {
    assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
    let link = r.header("link").expect("a Link header");
    assert!(link.contains(&format!("rel=\"{REL}\"")), "{link}");
    link[link.find('<').unwrap() + 1..link.find('>').unwrap()].to_string()
}

fn message_id(r: &Resp) -> String {
    let location = r.header("location").unwrap();
    location.rsplit('/').next().unwrap().to_string()
}

async fn batch(url: &str, after: Option<&str>) -> Value {
    let mut headers = vec![("prefer", "wait=0")];
    if let Some(a) = after {
        headers.push(("last-event-id", a));
    }
    let r = request("GET", url, &headers, vec![]).await.unwrap();
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    r.json()
}

/// Polls until the subscription lists `n` receipts (after `after`).
async fn receipts(url: &str, after: Option<&str>, n: usize) -> Vec<Value> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let b = batch(url, after).await;
        let got = b["receipts"].as_array().unwrap().clone();
        if got.len() >= n {
            return got;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} receipts of {n}: {b}",
            got.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn status(location: &str) -> Resp {
    request("GET", location, &[], vec![]).await.unwrap()
}

const ASK: (&str, &str) = ("prefer", "respond-async");

/// Sends `text` to `ep` as `app` would: encrypted for `keys`, VAPID-signed.
async fn tell(
    h: &Herald,
    app: &AppServer,
    keys: &UaKeys,
    ep: &str,
    text: &str,
    extra: &[(&str, &str)],
) -> Resp {
    push(ep, Some(app), &h.url(), keys, text, extra).await
}

#[tokio::test]
async fn an_acknowledged_message_is_reported_delivered() {
    let h = Herald::start().await;
    let app = AppServer::new();
    let keys = UaKeys::new();
    let mut ua = Ua::hello(&h, None).await;
    let (_, ep) = ua.subscribe(Some(&app.public())).await;

    let r = tell(&h, &app, &keys, &ep, "with receipt", &[ASK]).await;
    let url = receipt_url(&r);
    assert!(url.starts_with(&format!("{}/r/", h.url())), "{url}");
    let location = r.header("location").unwrap();

    let n = ua.notification().await;
    assert_eq!(payload(&keys, &n), "with receipt");
    // The version the user agent sees is the message id the sender holds.
    assert_eq!(n["version"], message_id(&r));
    // Noted off the delivery path: give it a moment.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let s = status(&location).await.json();
        if s["state"] == "sent" {
            assert!(s["sent_at"].as_u64().is_some(), "{s}");
            break;
        }
        assert_eq!(s["state"], "queued", "{s}");
        assert!(tokio::time::Instant::now() < deadline, "never sent: {s}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    ua.ack(&n).await;

    let got = receipts(&url, None, 1).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0]["outcome"], "delivered");
    assert_eq!(got[0]["message"], message_id(&r));
    assert_eq!(got[0]["location"], location.as_str());
    assert!(got[0]["at"].as_u64().unwrap() > 1_600_000_000_000);
    let s = status(&location).await.json();
    assert_eq!(s["state"], "delivered", "{s}");
    assert_eq!(s["receipt"], true);

    // Without the preference: 201, no Link, and no receipt.
    let plain = tell(&h, &app, &keys, &ep, "plain", &[]).await;
    assert_eq!(plain.status, 201);
    assert_eq!(plain.header("link"), None);
    let n = ua.notification().await;
    ua.ack(&n).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        batch(&url, None).await["receipts"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    let m = metric(&h, "herald_receipts_total{outcome=\"delivered\"}").await;
    assert_eq!(m, 1.0);
}

#[tokio::test]
async fn nacks_and_error_acks_are_reported_rejected_with_their_code() {
    let h = Herald::start().await;
    let app = AppServer::new();
    let keys = UaKeys::new();
    let mut ua = Ua::hello(&h, None).await;
    let (ch, ep) = ua.subscribe(Some(&app.public())).await;

    let first = tell(&h, &app, &keys, &ep, "one", &[ASK]).await;
    let url = receipt_url(&first);
    let n = ua.notification().await;
    ua.send(json!({"messageType": "nack", "version": n["version"], "code": 302}))
        .await;
    let link = format!("<{url}>; rel=\"{REL}\"");
    let second = tell(&h, &app, &keys, &ep, "two", &[ASK, ("link", &link)]).await;
    assert_eq!(receipt_url(&second), url);
    let n = ua.notification().await;
    // Firefox acks a message it could not decrypt with code 101.
    ua.send(json!({"messageType": "ack", "updates": [{"channelID": ch, "version": n["version"], "code": 101}]}))
        .await;

    let got = receipts(&url, None, 2).await;
    assert_eq!(got[0]["outcome"], "rejected");
    assert_eq!(got[0]["code"], 302);
    assert_eq!(got[0]["message"], message_id(&first));
    assert_eq!(got[1]["outcome"], "rejected");
    assert_eq!(got[1]["code"], 101);
    assert_eq!(got[1]["message"], message_id(&second));
}

#[tokio::test]
async fn a_message_that_expires_offline_is_reported_expired() {
    let h = Herald::start().await;
    let app = AppServer::new();
    let keys = UaKeys::new();
    let (uaid, ep) = offline_subscription(&h, Some(&app.public())).await;

    let r = tell(&h, &app, &keys, &ep, "brief", &[ASK, ("ttl", "1")]).await;
    let url = receipt_url(&r);
    let location = r.header("location").unwrap();
    assert_eq!(status(&location).await.json()["state"], "queued");

    let got = receipts(&url, None, 1).await;
    assert_eq!(got[0]["outcome"], "expired");
    assert_eq!(got[0]["message"], message_id(&r));
    assert_eq!(status(&location).await.json()["state"], "expired");
    // And the user agent never gets it.
    let mut ua = Ua::hello(&h, Some(&uaid)).await;
    assert_eq!(ua.try_recv(Duration::from_millis(300)).await, None);
}

#[tokio::test]
async fn a_cancelled_message_is_reported_cancelled() {
    let h = Herald::start().await;
    let app = AppServer::new();
    let keys = UaKeys::new();
    let (_, ep) = offline_subscription(&h, Some(&app.public())).await;

    let r = tell(&h, &app, &keys, &ep, "never mind", &[ASK]).await;
    let url = receipt_url(&r);
    let location = r.header("location").unwrap();
    assert_eq!(
        request("DELETE", &location, &[], vec![])
            .await
            .unwrap()
            .status,
        204
    );
    let got = receipts(&url, None, 1).await;
    assert_eq!(got[0]["outcome"], "cancelled");
    assert_eq!(status(&location).await.json()["state"], "cancelled");
}

#[tokio::test]
async fn a_message_replaced_by_topic_gets_no_receipt() {
    let h = Herald::start().await;
    let app = AppServer::new();
    let keys = UaKeys::new();
    let (uaid, ep) = offline_subscription(&h, Some(&app.public())).await;

    let old = tell(&h, &app, &keys, &ep, "old", &[ASK, ("topic", "score")]).await;
    let url = receipt_url(&old);
    let link = format!("<{url}>; rel=\"{REL}\"");
    let new = tell(
        &h,
        &app,
        &keys,
        &ep,
        "new",
        &[ASK, ("topic", "score"), ("link", &link)],
    )
    .await;
    assert_eq!(new.status, 202);

    let mut ua = Ua::hello(&h, Some(&uaid)).await;
    let n = ua.notification().await;
    assert_eq!(payload(&keys, &n), "new");
    ua.ack(&n).await;
    let got = receipts(&url, None, 1).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let all = batch(&url, None).await["receipts"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(all.len(), 1, "{all:?}");
    assert_eq!(got[0]["message"], message_id(&new));
    assert_eq!(got[0]["outcome"], "delivered");
    // The replaced one is simply gone.
    assert_eq!(status(&old.header("location").unwrap()).await.status, 404);
}

#[tokio::test]
async fn removing_the_subscription_reports_its_messages_gone() {
    let h = Herald::start().await;
    let app = AppServer::new();
    let keys = UaKeys::new();
    let mut ua = Ua::hello(&h, None).await;
    let (ch, ep) = ua.subscribe(Some(&app.public())).await;
    let r = tell(&h, &app, &keys, &ep, "unread", &[ASK]).await;
    let url = receipt_url(&r);
    // Received, never acknowledged, then unsubscribed.
    ua.notification().await;
    ua.send(json!({"messageType": "unregister", "channelID": ch}))
        .await;
    assert_eq!(ua.recv().await["status"], 200);
    let got = receipts(&url, None, 1).await;
    assert_eq!(got[0]["outcome"], "gone");
    assert_eq!(got[0]["message"], message_id(&r));
}

#[tokio::test]
async fn one_receipt_subscription_collects_many_messages_for_its_key_only() {
    let h = Herald::start().await;
    let app = AppServer::new();
    let keys = UaKeys::new();
    let mut ua = Ua::hello(&h, None).await;
    let (_, ep) = ua.subscribe(Some(&app.public())).await;

    let first = tell(&h, &app, &keys, &ep, "m0", &[ASK]).await;
    let url = receipt_url(&first);
    let link = format!("<{url}>; rel=\"{REL}\"");
    let mut ids = vec![message_id(&first)];
    for i in 1..5 {
        let r = tell(
            &h,
            &app,
            &keys,
            &ep,
            &format!("m{i}"),
            &[ASK, ("link", &link)],
        )
        .await;
        assert_eq!(receipt_url(&r), url);
        ids.push(message_id(&r));
    }
    for _ in 0..5 {
        let n = ua.notification().await;
        ua.ack(&n).await;
    }
    let got = receipts(&url, None, 5).await;
    let mut seen: Vec<String> = got
        .iter()
        .map(|g| g["message"].as_str().unwrap().into())
        .collect();
    seen.sort();
    ids.sort();
    assert_eq!(seen, ids);
    let event_ids: Vec<u64> = got
        .iter()
        .map(|g| g["id"].as_str().unwrap().parse().unwrap())
        .collect();
    assert!(event_ids.windows(2).all(|w| w[0] < w[1]), "{event_ids:?}");
    // Resuming after the third lists the last two.
    let after = got[2]["id"].as_str().unwrap();
    let rest = batch(&url, Some(after)).await;
    assert_eq!(rest["receipts"].as_array().unwrap().len(), 2);
    assert_eq!(rest["last_event_id"], got[4]["id"]);

    // Another application server cannot report into it...
    let (_, ep2) = ua.subscribe(None).await;
    let intruder = AppServer::new();
    let r = push(
        &ep2,
        Some(&intruder),
        &h.url(),
        &keys,
        "x",
        &[ASK, ("link", &link)],
    )
    .await;
    assert_eq!((r.status, r.errno()), (400, 122));
    let r = push(&ep2, None, &h.url(), &keys, "x", &[ASK, ("link", &link)]).await;
    assert_eq!((r.status, r.errno()), (400, 122));
    // ...nor pass a forged one.
    let forged = format!(
        "<{}/r/AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA>; rel=\"{REL}\"",
        h.url()
    );
    let r = tell(&h, &app, &keys, &ep, "x", &[ASK, ("link", &forged)]).await;
    assert_eq!((r.status, r.errno()), (400, 121));
    let r = request("GET", &format!("{}/r/forged", h.url()), &[], vec![])
        .await
        .unwrap();
    assert_eq!((r.status, r.errno()), (404, 121));
}

/// A receipt subscription with one delivered receipt; returns its URL and
/// the receipt's event id.
async fn one_receipt(h: &Herald, app: &AppServer, ua: &mut Ua, keys: &UaKeys, ep: &str) -> String {
    let url = receipt_url(&tell(h, app, keys, ep, "r", &[ASK]).await);
    let n = ua.notification().await;
    ua.ack(&n).await;
    receipts(&url, None, 1).await;
    url
}

#[tokio::test]
async fn receipt_streams_are_capped_per_subscription_and_per_node() {
    let h = Herald::start_with(
        &[],
        &[
            ("HERALD_MAX_RECEIPT_STREAMS_PER_SUBSCRIPTION", "2"),
            ("HERALD_MAX_RECEIPT_STREAMS", "3"),
        ],
    )
    .await;
    let app = AppServer::new();
    let keys = UaKeys::new();
    let mut ua = Ua::hello(&h, None).await;
    let (_, ep) = ua.subscribe(Some(&app.public())).await;
    let (one, two) = (
        one_receipt(&h, &app, &mut ua, &keys, &ep).await,
        one_receipt(&h, &app, &mut ua, &keys, &ep).await,
    );

    let a = Events::open(&one, None).await;
    let _b = Events::open(&one, None).await;
    let refused = Events::try_open(&one, None)
        .await
        .err()
        .expect("a third on one");
    assert_eq!((refused.status, refused.errno()), (429, 124));
    assert!(refused.header("retry-after").is_some());
    assert!(refused.json()["message"]
        .as_str()
        .unwrap()
        .contains("2 open streams"));
    // A JSON batch is no stream: still served.
    assert_eq!(
        batch(&one, None).await["receipts"]
            .as_array()
            .unwrap()
            .len(),
        1
    );

    let _c = Events::open(&two, None).await;
    let refused = Events::try_open(&two, None)
        .await
        .err()
        .expect("a fourth on the node");
    assert_eq!((refused.status, refused.errno()), (429, 124));
    assert!(refused.json()["message"]
        .as_str()
        .unwrap()
        .contains("3 receipt streams"));
    assert_eq!(metric(&h, "herald_receipt_streams ").await, 3.0);

    // A reader that leaves gives its place back.
    drop(a);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut d = loop {
        match Events::try_open(&two, None).await {
            Ok(events) => break events,
            Err(r) => assert_eq!(r.status, 429),
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the place was never freed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    d.next().await;
}

#[tokio::test]
async fn a_receipt_stream_ends_at_its_lifetime_and_resumes_after_last_event_id() {
    let h = Herald::start_with(&[], &[("HERALD_RECEIPT_STREAM_LIFETIME", "2s")]).await;
    let app = AppServer::new();
    let keys = UaKeys::new();
    let mut ua = Ua::hello(&h, None).await;
    let (_, ep) = ua.subscribe(Some(&app.public())).await;
    let url = one_receipt(&h, &app, &mut ua, &keys, &ep).await;
    let opened = tokio::time::Instant::now();
    let mut events = Events::open(&url, None).await;
    let (first, _) = events.next().await;
    events.ended(Duration::from_secs(5)).await;
    assert!(
        opened.elapsed() >= Duration::from_millis(1900),
        "{:?}",
        opened.elapsed()
    );

    // Meanwhile another receipt; the reader resumes where it was.
    let link = format!("<{url}>; rel=\"{REL}\"");
    let second = tell(&h, &app, &keys, &ep, "s", &[ASK, ("link", &link)]).await;
    let n = ua.notification().await;
    ua.ack(&n).await;
    let mut events = Events::open(&url, Some(&first)).await;
    let (id, e) = events.next().await;
    assert_eq!(e["message"], message_id(&second));
    assert!(id.parse::<u64>().unwrap() > first.parse::<u64>().unwrap());
}

#[tokio::test]
async fn idle_receipt_streams_wait_for_wake_ups_instead_of_polling() {
    let h = Herald::start().await;
    let app = AppServer::new();
    let keys = UaKeys::new();
    let mut ua = Ua::hello(&h, None).await;
    let (_, ep) = ua.subscribe(Some(&app.public())).await;
    let url = one_receipt(&h, &app, &mut ua, &keys, &ep).await;
    let reads = || metric(&h, "herald_store_operation_seconds_count{op=\"receipts\"}");
    let mut streams = Vec::new();
    for _ in 0..4 {
        let mut events = Events::open(&url, None).await;
        events.next().await;
        streams.push(events);
    }
    let opened = reads().await;
    assert!(
        opened >= 4.0,
        "each stream reads once when it opens: {opened}"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(reads().await, opened, "idle streams read nothing");

    // A receipt decided here wakes every reader at once.
    let link = format!("<{url}>; rel=\"{REL}\"");
    let r = tell(&h, &app, &keys, &ep, "w", &[ASK, ("link", &link)]).await;
    let n = ua.notification().await;
    let acked = tokio::time::Instant::now();
    ua.ack(&n).await;
    for events in &mut streams {
        assert_eq!(events.next().await.1["message"], message_id(&r));
    }
    assert!(
        acked.elapsed() < Duration::from_millis(900),
        "{:?}",
        acked.elapsed()
    );
    let after = reads().await;
    assert!(
        after - opened <= 8.0,
        "one or two reads per stream: {}",
        after - opened
    );
}

/// A minimal `text/event-stream` reader: (id, data) of each event.
struct Events {
    body: hyper::body::Incoming,
    buf: String,
}

impl Events {
    async fn open(url: &str, last_event_id: Option<&str>) -> Events {
        match Events::try_open(url, last_event_id).await {
            Ok(e) => e,
            Err(r) => panic!("{}: {}", r.status, String::from_utf8_lossy(&r.body)),
        }
    }

    /// The stream, or the refusal with its body.
    async fn try_open(url: &str, last_event_id: Option<&str>) -> Result<Events, Resp> {
        use hyper_util::client::legacy::Client;
        use hyper_util::rt::TokioExecutor;
        let client: Client<_, http_body_util::Empty<bytes::Bytes>> =
            Client::builder(TokioExecutor::new()).build_http();
        let mut req = http::Request::get(url).header("accept", "text/event-stream");
        if let Some(id) = last_event_id {
            req = req.header("last-event-id", id);
        }
        let resp = client
            .request(req.body(http_body_util::Empty::new()).unwrap())
            .await
            .unwrap();
        if resp.status() != 200 {
            let status = resp.status().as_u16();
            let headers = resp.headers().clone();
            let body = resp
                .into_body()
                .collect()
                .await
                .unwrap()
                .to_bytes()
                .to_vec();
            return Err(Resp {
                status,
                headers,
                body,
            });
        }
        assert_eq!(resp.headers()["content-type"], "text/event-stream");
        Ok(Events {
            body: resp.into_body(),
            buf: String::new(),
        })
    }

    /// Waits for the server to end the stream cleanly; no event may come.
    async fn ended(&mut self, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let frame = tokio::time::timeout_at(deadline, self.body.frame())
                .await
                .expect("the stream ends in time");
            match frame {
                None => break,
                Some(f) => {
                    if let Ok(chunk) = f.expect("a clean end").into_data() {
                        self.buf.push_str(std::str::from_utf8(&chunk).unwrap());
                    }
                }
            }
        }
        assert!(
            !self.buf.contains("\nid: ") && !self.buf.starts_with("id: "),
            "{}",
            self.buf
        );
    }

    async fn next(&mut self) -> (String, Value) {
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                let mut id = None;
                let mut data = None;
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("id: ") {
                        id = Some(v.to_string());
                    } else if let Some(v) = line.strip_prefix("data: ") {
                        data = Some(serde_json::from_str(v).unwrap());
                    }
                }
                if let (Some(id), Some(data)) = (id, data) {
                    return (id, data);
                }
                continue;
            }
            let frame = tokio::time::timeout(Duration::from_secs(10), self.body.frame())
                .await
                .expect("an event within 10 s")
                .expect("the stream stays open")
                .unwrap();
            if let Ok(chunk) = frame.into_data() {
                self.buf.push_str(std::str::from_utf8(&chunk).unwrap());
            }
        }
    }
}

#[tokio::test]
async fn receipts_stream_as_server_sent_events_and_resume_after_last_event_id() {
    let h = Herald::start().await;
    let app = AppServer::new();
    let keys = UaKeys::new();
    let mut ua = Ua::hello(&h, None).await;
    let (_, ep) = ua.subscribe(Some(&app.public())).await;

    let first = tell(&h, &app, &keys, &ep, "a", &[ASK]).await;
    let url = receipt_url(&first);
    let link = format!("<{url}>; rel=\"{REL}\"");
    let mut events = Events::open(&url, None).await;
    let n = ua.notification().await;
    ua.ack(&n).await;
    let (id1, e1) = events.next().await;
    assert_eq!(e1["message"], message_id(&first));
    assert_eq!(e1["outcome"], "delivered");
    assert_eq!(e1["id"], id1.as_str());

    let second = tell(&h, &app, &keys, &ep, "b", &[ASK, ("link", &link)]).await;
    let n = ua.notification().await;
    ua.ack(&n).await;
    let (id2, e2) = events.next().await;
    assert_eq!(e2["message"], message_id(&second));
    drop(events);

    // Disconnected: a receipt recorded meanwhile waits for the reader.
    let third = tell(&h, &app, &keys, &ep, "c", &[ASK, ("link", &link)]).await;
    let n = ua.notification().await;
    ua.ack(&n).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut events = Events::open(&url, Some(&id2)).await;
    let (id3, e3) = events.next().await;
    assert_eq!(e3["message"], message_id(&third));
    assert!(id3.parse::<u64>().unwrap() > id2.parse::<u64>().unwrap());
    // From the start, all three, in order.
    let mut events = Events::open(&url, None).await;
    assert_eq!(events.next().await.0, id1);
    assert_eq!(events.next().await.0, id2);
    assert_eq!(events.next().await.0, id3);
}

#[tokio::test]
async fn receipts_survive_a_restart_between_the_push_and_the_ack() {
    let mut h = Herald::start().await;
    let app = AppServer::new();
    let keys = UaKeys::new();
    let (uaid, ep) = offline_subscription(&h, Some(&app.public())).await;
    let first = tell(&h, &app, &keys, &ep, "before", &[ASK]).await;
    let url = receipt_url(&first);
    let link = format!("<{url}>; rel=\"{REL}\"");
    let second = tell(&h, &app, &keys, &ep, "crash", &[ASK, ("link", &link)]).await;
    assert_eq!(second.status, 202);

    h.stop();
    h.restart().await;
    let mut ua = Ua::hello(&h, Some(&uaid)).await;
    let n = ua.notification().await;
    assert_eq!(payload(&keys, &n), "before");
    ua.ack(&n).await;
    let got = receipts(&url, None, 1).await;
    assert_eq!(got[0]["message"], message_id(&first));

    // A kill -9 after the second was sent but before its ack.
    let n = ua.notification().await;
    assert_eq!(payload(&keys, &n), "crash");
    drop(ua);
    h.kill9();
    h.restart().await;
    let mut ua = Ua::hello(&h, Some(&uaid)).await;
    let n = ua.notification().await;
    assert_eq!(payload(&keys, &n), "crash");
    ua.ack(&n).await;
    let got = receipts(&url, None, 2).await;
    assert_eq!(got[0]["message"], message_id(&first));
    assert_eq!(got[1]["message"], message_id(&second));
    assert_eq!(got[1]["outcome"], "delivered");
}

#[tokio::test]
async fn a_message_without_a_receipt_is_queued_until_acknowledged() {
    let h = Herald::start().await;
    let app = AppServer::new();
    let keys = UaKeys::new();
    let (uaid, ep) = offline_subscription(&h, Some(&app.public())).await;
    let r = tell(&h, &app, &keys, &ep, "plain", &[]).await;
    assert_eq!(r.status, 201);
    let location = r.header("location").unwrap();
    let s = status(&location).await.json();
    assert_eq!(
        (s["state"].as_str(), s["receipt"].as_bool()),
        (Some("queued"), Some(false))
    );
    let mut ua = Ua::hello(&h, Some(&uaid)).await;
    let n = ua.notification().await;
    ua.ack(&n).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let gone = status(&location).await;
    assert_eq!((gone.status, gone.errno()), (404, 117));
}
