//! The HTTP face of receipts: what a push asks for (`Prefer:
//! respond-async`, an earlier receipt subscription passed back in `Link`),
//! reading a receipt subscription (`GET /r/<token>`: server-sent events, or
//! one JSON batch with `Prefer: wait=0`), and a message's status
//! (`GET /m/<id>`). Parsing is pure; `read` and `status` do the I/O.

use super::sse;
use crate::app::App;
use crate::errors::{ApiError, Errno};
use crate::reply::{json, Response};
use crate::store::{ReceiptEvent, ReceiptState, ReceiptSub};
use crate::token::{KeyHash, MessageId, ReceiptToken, TokenCodec};
use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use std::sync::Arc;
use std::time::Duration;

pub use super::sse::StreamingBody;

pub use crate::link::RECEIPT as REL;
/// Receipts per JSON batch or per read of a stream.
const BATCH: usize = 500;
/// A stream with nothing to say still says this much this often.
const KEEPALIVE: Duration = Duration::from_secs(15);
/// With several nodes, how often a stream re-reads the ledger without being
/// woken: a receipt decided on another node arrives this way (this node is
/// only woken by what it decides itself). A single node never polls.
const SHARED_POLL: Duration = Duration::from_secs(5);

/// A push that asked for a receipt; `given` is the receipt subscription
/// token it passed back, if any.
#[derive(Debug, PartialEq, Eq)]
pub struct ReceiptRequest {
    pub given: Option<String>,
}

/// Did this push ask for a receipt? `Prefer: respond-async` asks (RFC 8030
/// §5.1); so does passing a receipt subscription back, in a `Link` with
/// rel `urn:ietf:params:push:receipt` (RFC 8030) or, as early drafts had
/// it, a `Push-Receipt` header.
pub fn requested(headers: &HeaderMap) -> Result<Option<ReceiptRequest>, ApiError> {
    let mut links = Vec::new();
    for value in headers.get_all("link") {
        let value = value
            .to_str()
            .map_err(|_| ApiError::invalid_receipt_subscription(400))?;
        links.push(value);
    }
    let mut given = crate::link::find_rel(links, REL);
    if let Some(value) = headers.get("push-receipt") {
        let value = value
            .to_str()
            .map_err(|_| ApiError::invalid_receipt_subscription(400))?;
        given = Some(value.trim().to_string());
    }
    let given = given.map(|url| token_of(&url)).transpose()?;
    if given.is_none() && !prefers(headers, "respond-async") {
        return Ok(None);
    }
    Ok(Some(ReceiptRequest { given }))
}

/// The receipt subscription this push reports to, and its token: the one
/// passed back (which must be Herald's and, when it was made for a VAPID
/// key, be used with that key), or a new one bound to the sender's key.
pub fn bind(
    request: ReceiptRequest,
    sender: Option<KeyHash>,
    tokens: &TokenCodec,
) -> Result<(ReceiptSub, String), ApiError> {
    match request.given {
        Some(token) => {
            let opened = tokens
                .open_receipt_token(&token)
                .ok_or_else(|| ApiError::invalid_receipt_subscription(400))?;
            if opened.key_hash.is_some() && opened.key_hash != sender {
                return Err(ApiError::receipt_key_mismatch());
            }
            Ok((ReceiptSub(opened.sub), token))
        }
        None => {
            let sub = ReceiptSub::random();
            let token = tokens.receipt_token(&ReceiptToken {
                sub: sub.0,
                key_hash: sender,
            });
            Ok((sub, token))
        }
    }
}

pub fn link_header(base: &str, token: &str) -> String {
    format!("<{base}/r/{token}>; rel=\"{REL}\"")
}

/// The token at the end of a receipt subscription URL (absolute or a path).
fn token_of(url: &str) -> Result<String, ApiError> {
    let path = url.split(['?', '#']).next().unwrap_or("");
    match path.rsplit_once("/r/") {
        Some((_, token)) if !token.is_empty() && !token.contains('/') => Ok(token.to_string()),
        _ => Err(ApiError::invalid_receipt_subscription(400)),
    }
}

/// Whether a read of a receipt subscription asked for one JSON batch
/// (`Prefer: wait=0`) rather than a stream.
pub fn wants_batch(headers: &HeaderMap) -> bool {
    preference(headers, "wait").as_deref() == Some("0")
}

/// Whether a `Prefer` header (RFC 7240) carries `pref` (with any value).
fn prefers(headers: &HeaderMap, pref: &str) -> bool {
    preference(headers, pref).is_some()
}

/// The value of preference `pref` ("" when it has none).
fn preference(headers: &HeaderMap, pref: &str) -> Option<String> {
    headers
        .get_all("prefer")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .find_map(|item| {
            let first = item.split(';').next().unwrap_or("").trim();
            let (name, value) = first.split_once('=').unwrap_or((first, ""));
            name.trim()
                .eq_ignore_ascii_case(pref)
                .then(|| value.trim().trim_matches('"').to_string())
        })
}

/// Where a reader resumes: `Last-Event-ID` (what `EventSource` sends on
/// reconnecting), or `?after=` for readers that cannot set headers.
pub fn resume_after(headers: &HeaderMap, query: Option<&str>) -> Result<u64, ApiError> {
    let from_query = query.and_then(|q| {
        q.split('&')
            .find_map(|kv| kv.strip_prefix("after=").map(str::to_string))
    });
    let raw = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .or(from_query);
    match raw.as_deref().map(str::trim) {
        None | Some("") => Ok(0),
        Some(v) => v.parse().map_err(|_| {
            ApiError::new(
                400,
                Errno::InvalidReceiptId,
                "Last-Event-ID (or ?after=) must be the id of a receipt this subscription sent",
            )
        }),
    }
}

fn event_json(app: &App, e: &ReceiptEvent) -> String {
    let id = app.tokens.message_id(&MessageId {
        uaid: e.uaid,
        channel: e.channel,
        seq: e.seq,
    });
    let mut v = serde_json::json!({
        "id": e.id.to_string(),
        "message": id,
        "location": format!("{}/m/{id}", app.settings.public_url.base),
        "outcome": e.outcome.as_str(),
        "at": e.at,
    });
    if let Some(code) = e.outcome.code() {
        v["code"] = code.into();
    }
    v.to_string()
}

/// `GET /r/<token>`: the receipts of a receipt subscription.
pub async fn read(
    app: &Arc<App>,
    token: &str,
    headers: &HeaderMap,
    query: Option<&str>,
) -> Result<http::Response<sse::StreamingBody>, ApiError> {
    use http_body_util::{BodyExt, Full};
    let sub = app
        .tokens
        .open_receipt_token(token)
        .map(|t| ReceiptSub(t.sub))
        .ok_or_else(|| ApiError::invalid_receipt_subscription(404))?;
    let after = resume_after(headers, query)?;
    if wants_batch(headers) {
        let found = app
            .metrics
            .time(
                "receipts",
                app.receipts.ledger().receipts(&sub, after, BATCH + 1),
            )
            .await
            .map_err(ApiError::storage)?;
        let more = found.len() > BATCH;
        let found = &found[..found.len().min(BATCH)];
        let last = found.last().map_or(after, |e| e.id);
        let items: Vec<serde_json::Value> = found
            .iter()
            .map(|e| serde_json::from_str(&event_json(app, e)).expect("valid JSON"))
            .collect();
        let body = serde_json::json!({
            "receipts": items,
            "last_event_id": last.to_string(),
            "more": more,
        })
        .to_string();
        return Ok(http::Response::builder()
            .status(StatusCode::OK)
            .header("content-type", "application/json")
            .header("preference-applied", "wait=0")
            .body(Full::new(Bytes::from(body)).boxed_unsync())
            .expect("valid response"));
    }
    let slot = app
        .receipts
        .listen(sub)
        .map_err(ApiError::too_many_receipt_streams)?;
    let (tx, body) = sse::channel(16);
    tokio::spawn(stream(app.clone(), sub, slot, after, tx));
    Ok(http::Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-store")
        // nginx and its kin buffer responses unless told not to.
        .header("x-accel-buffering", "no")
        .body(body)
        .expect("valid response"))
}

/// Feeds one stream until its reader leaves, its lifetime is up or the
/// server shuts down. It reads the ledger when woken by a receipt decided on
/// this node, (with several nodes) every `SHARED_POLL`, and after each
/// keepalive: a fresh wait is only armed together with a read, so no wake-up
/// can fall between two waits unseen.
async fn stream(
    app: Arc<App>,
    sub: ReceiptSub,
    slot: super::StreamSlot,
    mut after: u64,
    tx: tokio::sync::mpsc::Sender<Bytes>,
) {
    let mut shutdown = app.shutdown.subscribe();
    let poll = app.router.cluster().is_some().then_some(SHARED_POLL);
    let end = tokio::time::Instant::now() + app.settings.receipt_stream_lifetime;
    let mut quiet_since = tokio::time::Instant::now();
    let _ = tx.send(sse::retry(2000)).await;
    loop {
        let woken = slot.notify().notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        match app
            .metrics
            .time(
                "receipts",
                app.receipts.ledger().receipts(&sub, after, BATCH),
            )
            .await
        {
            Ok(found) => {
                let full = found.len() == BATCH;
                let mut gone = false;
                for e in &found {
                    after = e.id;
                    let frame = sse::event(e.id, "receipt", &event_json(&app, e));
                    if tx.send(frame).await.is_err() {
                        gone = true;
                        break;
                    }
                    quiet_since = tokio::time::Instant::now();
                }
                if gone {
                    break;
                }
                if full {
                    continue;
                }
            }
            Err(e) => tracing::warn!("receipt stream: reading receipts: {e}"),
        }
        let keepalive = quiet_since + KEEPALIVE;
        tokio::select! {
            _ = &mut woken => {}
            _ = sleep_opt(poll) => {}
            _ = tokio::time::sleep_until(keepalive) => {
                if tx.send(sse::comment("keepalive")).await.is_err() {
                    break;
                }
                quiet_since = tokio::time::Instant::now();
            }
            _ = tokio::time::sleep_until(end) => {
                // A clean end: the reader resumes after the last id it saw.
                let _ = tx.send(sse::comment("stream lifetime reached; reconnect with Last-Event-ID")).await;
                break;
            }
            _ = tx.closed() => break,
            _ = crate::app::shutdown_begun(&mut shutdown) => break,
        }
    }
    drop(slot);
}

async fn sleep_opt(d: Option<Duration>) {
    match d {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}

/// `GET /m/<id>`: what Herald knows of a message.
pub async fn status(app: &App, id: &str) -> Result<Response, ApiError> {
    let m = app
        .tokens
        .open_message_id(id)
        .ok_or_else(ApiError::no_message)?;
    let state = app
        .receipts
        .ledger()
        .receipt_state(&m.uaid, m.seq)
        .await
        .map_err(ApiError::storage)?;
    let body = match state {
        Some(ReceiptState::Pending(p)) => {
            let mut v = serde_json::json!({
                "message": id,
                "state": if p.sent_at.is_some() { "sent" } else { "queued" },
                "receipt": true,
                "expires_at": p.expires_at,
            });
            if let Some(at) = p.sent_at {
                v["sent_at"] = at.into();
            }
            v
        }
        Some(ReceiptState::Settled(e)) => {
            let mut v = serde_json::json!({
                "message": id,
                "state": e.outcome.as_str(),
                "receipt": true,
                "at": e.at,
            });
            if let Some(code) = e.outcome.code() {
                v["code"] = code.into();
            }
            v
        }
        None => {
            // No receipt was asked for: only the queue knows it, and only
            // until it is acknowledged.
            let stored = app
                .store
                .get_message(&m.uaid, m.seq)
                .await
                .map_err(ApiError::storage)?
                .ok_or_else(ApiError::no_message)?;
            serde_json::json!({
                "message": id,
                "state": "queued",
                "receipt": false,
                "expires_at": stored.expires_at,
            })
        }
    };
    Ok(json(StatusCode::OK, body.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    #[test]
    fn respond_async_asks_for_a_receipt() {
        assert_eq!(requested(&headers(&[])).unwrap(), None);
        assert_eq!(
            requested(&headers(&[("prefer", "return=minimal")])).unwrap(),
            None
        );
        for p in [
            "respond-async",
            "Respond-Async",
            "wait=10, respond-async",
            "respond-async; x=1",
        ] {
            assert_eq!(
                requested(&headers(&[("prefer", p)])).unwrap(),
                Some(ReceiptRequest { given: None }),
                "{p}"
            );
        }
    }

    #[test]
    fn a_receipt_subscription_comes_back_in_link_or_push_receipt() {
        let link = format!("<https://push.example/r/abc>; rel=\"{REL}\"");
        let got = requested(&headers(&[("prefer", "respond-async"), ("link", &link)])).unwrap();
        assert_eq!(got.unwrap().given.as_deref(), Some("abc"));
        // Among other links, with several rel types, without Prefer.
        let many = format!("</x/y>; rel=\"next\", </r/def>; rel=\"other {REL}\"");
        let got = requested(&headers(&[("link", &many)])).unwrap();
        assert_eq!(got.unwrap().given.as_deref(), Some("def"));
        let got = requested(&headers(&[("push-receipt", "https://h/r/ghi")])).unwrap();
        assert_eq!(got.unwrap().given.as_deref(), Some("ghi"));
        // A Link with another rel is not a receipt request.
        assert_eq!(
            requested(&headers(&[("link", "</r/abc>; rel=\"next\"")])).unwrap(),
            None
        );
        // Not a receipt subscription URL at all.
        let bad = format!("<https://push.example/elsewhere>; rel=\"{REL}\"");
        assert_eq!(
            requested(&headers(&[("link", &bad)]))
                .unwrap_err()
                .errno
                .code(),
            121
        );
    }

    #[test]
    fn bound_subscriptions_only_take_their_own_key() {
        let tokens = TokenCodec::new(&[[9u8; 32]]).unwrap();
        let key = crate::token::key_hash(b"app server key");
        let (sub, token) = bind(ReceiptRequest { given: None }, Some(key), &tokens).unwrap();
        let again = bind(
            ReceiptRequest {
                given: Some(token.clone()),
            },
            Some(key),
            &tokens,
        )
        .unwrap();
        assert_eq!(again, (sub, token.clone()));
        let other = crate::token::key_hash(b"another key");
        for sender in [Some(other), None] {
            let e = bind(
                ReceiptRequest {
                    given: Some(token.clone()),
                },
                sender,
                &tokens,
            )
            .unwrap_err();
            assert_eq!((e.status, e.errno.code()), (400, 122));
        }
        let forged = bind(
            ReceiptRequest {
                given: Some("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA".into()),
            },
            Some(key),
            &tokens,
        )
        .unwrap_err();
        assert_eq!((forged.status, forged.errno.code()), (400, 121));
    }

    #[test]
    fn readers_resume_after_the_last_event_they_saw() {
        assert_eq!(resume_after(&headers(&[]), None).unwrap(), 0);
        assert_eq!(
            resume_after(&headers(&[("last-event-id", "42")]), None).unwrap(),
            42
        );
        assert_eq!(resume_after(&headers(&[]), Some("x=1&after=7")).unwrap(), 7);
        assert_eq!(
            resume_after(&headers(&[("last-event-id", "nope")]), None)
                .unwrap_err()
                .errno
                .code(),
            123
        );
        assert_eq!(
            preference(&headers(&[("prefer", "respond-async, wait=0")]), "wait").as_deref(),
            Some("0")
        );
    }
}
