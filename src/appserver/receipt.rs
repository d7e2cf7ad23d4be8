//! Waiting for one message's delivery receipt (RFC 8030 §5.1): reads the
//! receipt subscription as server-sent events, reconnecting with
//! `Last-Event-ID` when the stream drops, until the receipt of that message
//! arrives. What `herald send --receipt` uses.

use crate::appserver::send::{describe_answer, request_target, PushServiceError};
use anyhow::{anyhow, Context};
use bytes::Bytes;
use herald_client::http::HttpClient;
use http::{header, Request, StatusCode};
use http_body_util::{BodyExt, Empty, Limited};
use serde::Deserialize;
use std::fmt;
use std::time::Duration;
use tokio::time::Instant;

/// Waiting before a reconnect when the server did not say (`retry:`).
const DEFAULT_RETRY: Duration = Duration::from_secs(1);
/// Error bodies larger than this are cut: we only want `errno` and `message`.
const MAX_ERROR_BODY: usize = 64 * 1024;

/// What became of a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The user agent acknowledged it.
    Delivered,
    /// The user agent refused it (a nack, or an ack with an error code).
    Rejected,
    /// Its TTL ran out before a user agent took it.
    Expired,
    /// The application server deleted it.
    Cancelled,
    /// Its subscription went away.
    Gone,
    /// FCM or APNs accepted it for a mobile user agent (the device's own
    /// delivery is not known).
    Forwarded,
    /// An outcome this client does not know.
    Other(String),
}

impl Outcome {
    pub fn parse(s: &str) -> Outcome {
        match s {
            "delivered" => Outcome::Delivered,
            "rejected" => Outcome::Rejected,
            "expired" => Outcome::Expired,
            "cancelled" => Outcome::Cancelled,
            "gone" => Outcome::Gone,
            "forwarded" => Outcome::Forwarded,
            other => Outcome::Other(other.to_owned()),
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            Outcome::Delivered => "delivered",
            Outcome::Rejected => "rejected",
            Outcome::Expired => "expired",
            Outcome::Cancelled => "cancelled",
            Outcome::Gone => "gone",
            Outcome::Forwarded => "forwarded",
            Outcome::Other(s) => s,
        }
    }
}

/// One message's receipt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    /// The event id on the receipt subscription (what `Last-Event-ID`
    /// resumes after).
    pub id: String,
    /// The message id: the last path segment of the message's `Location`.
    pub message: String,
    pub outcome: Outcome,
    /// The user agent's code for a rejection (e.g. 302), when it gave one.
    pub code: Option<u32>,
    /// When the outcome was decided, in Unix milliseconds.
    pub at_ms: u64,
}

impl Receipt {
    /// `delivered at 2026-01-02T03:04:05.678Z (message <id>)`, with the
    /// code after the outcome when there is one.
    pub fn describe(&self) -> String {
        let code = self
            .code
            .map(|c| format!(" (code {c})"))
            .unwrap_or_default();
        format!(
            "{}{code} at {} (message {})",
            self.outcome.as_str(),
            format_utc_ms(self.at_ms),
            self.message
        )
    }
}

/// No receipt came within the time allowed. Kept apart from other errors
/// so that `herald send` can exit with its own status.
#[derive(Debug)]
pub struct ReceiptTimeout {
    pub waited: Duration,
    /// Why the last attempt to read the stream failed, if it did: a
    /// timeout spent reconnecting to a dead server reads differently from
    /// one spent waiting on an undecided message.
    pub last_error: Option<String>,
}

impl fmt::Display for ReceiptTimeout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "no receipt within {} s", self.waited.as_secs_f32())?;
        if let Some(e) = &self.last_error {
            write!(f, " (last error: {e})")?;
        }
        Ok(())
    }
}

impl std::error::Error for ReceiptTimeout {}

/// Waits for the receipt of one message on a receipt subscription.
/// `message` is the message's `Location` or just its id. Earlier receipts
/// of other messages on the same subscription are skipped.
pub async fn wait_for_receipt(
    client: &HttpClient,
    receipt_url: &str,
    message: &str,
    timeout: Duration,
) -> anyhow::Result<Receipt> {
    let url: http::Uri = receipt_url
        .parse()
        .with_context(|| format!("receipt subscription {receipt_url:?} is not a URL"))?;
    let wanted = last_segment(message);
    if wanted.is_empty() {
        anyhow::bail!("{message:?} names no message");
    }
    let deadline = Instant::now() + timeout;
    let mut parser = SseParser::new();
    let mut last_error = None;
    let follow = follow(client, &url, wanted, &mut parser, &mut last_error);
    match tokio::time::timeout_at(deadline, follow).await {
        Ok(result) => result,
        Err(_) => Err(ReceiptTimeout {
            waited: timeout,
            last_error,
        }
        .into()),
    }
}

/// Reads the stream until the receipt comes, reconnecting as `EventSource`
/// does. A failure before any stream opened is final: a wrong URL or a
/// refused subscription is better reported at once than after the timeout.
async fn follow(
    client: &HttpClient,
    url: &http::Uri,
    wanted: &str,
    parser: &mut SseParser,
    last_error: &mut Option<String>,
) -> anyhow::Result<Receipt> {
    let mut opened_once = false;
    loop {
        match read_stream(client, url, wanted, parser, &mut opened_once).await {
            Ok(Some(receipt)) => return Ok(receipt),
            Ok(None) => *last_error = None,
            Err(Failure::Final(e)) => return Err(e),
            Err(Failure::Retry(e)) if !opened_once => return Err(e),
            Err(Failure::Retry(e)) => *last_error = Some(format!("{e:#}")),
        }
        parser.end_of_stream();
        tokio::time::sleep(parser.retry().unwrap_or(DEFAULT_RETRY)).await;
    }
}

enum Failure {
    /// Reconnecting will not help.
    Final(anyhow::Error),
    Retry(anyhow::Error),
}

/// One connection: `Some` when the receipt came, `None` when the stream
/// ended without it.
async fn read_stream(
    client: &HttpClient,
    url: &http::Uri,
    wanted: &str,
    parser: &mut SseParser,
    opened_once: &mut bool,
) -> Result<Option<Receipt>, Failure> {
    let (host, path) = request_target(url).map_err(Failure::Final)?;
    let mut connection = client
        .connect::<Empty<Bytes>>(url, "receipt subscription")
        .await
        .map_err(Failure::Retry)?;
    let mut request = Request::get(path)
        .header(header::HOST, host)
        .header(header::ACCEPT, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache");
    if !parser.last_event_id().is_empty() {
        request = request.header("Last-Event-ID", parser.last_event_id());
    }
    let request = request
        .body(Empty::new())
        .map_err(|e| Failure::Final(anyhow!("cannot build the request: {e}")))?;
    let response = connection
        .sender
        .send_request(request)
        .await
        .map_err(|e| Failure::Retry(anyhow!("no HTTP response from {url}: {e}")))?;
    let status = response.status();
    if status != StatusCode::OK {
        let body = Limited::new(response.into_body(), MAX_ERROR_BODY)
            .collect()
            .await
            .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
            .unwrap_or_default();
        let error = serde_json::from_str::<PushServiceError>(&body).ok();
        let error = anyhow!(
            "receipt subscription answered {}",
            describe_answer(status, error.as_ref(), &body)
        );
        return Err(if status.is_server_error() {
            Failure::Retry(error)
        } else {
            Failure::Final(error)
        });
    }
    let content_type = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !content_type
        .to_ascii_lowercase()
        .starts_with("text/event-stream")
    {
        return Err(Failure::Final(anyhow!(
            "receipt subscription {url} answered {content_type:?}, not text/event-stream"
        )));
    }
    *opened_once = true;
    let mut body = response.into_body();
    while let Some(frame) = body.frame().await {
        let frame =
            frame.map_err(|e| Failure::Retry(anyhow!("receipt stream from {url} broke: {e}")))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        for event in parser.feed(&data) {
            if let Some(receipt) = receipt_of(&event).map_err(Failure::Final)? {
                if receipt.message == wanted {
                    return Ok(Some(receipt));
                }
            }
        }
    }
    Ok(None)
}

/// The message's state as its push service reports it on `GET <Location>`
/// (Herald answers `{"state": "queued" | "sent" | ...}`): why a receipt is
/// late.
pub async fn message_state(
    client: &HttpClient,
    location: &str,
    timeout: Duration,
) -> anyhow::Result<String> {
    #[derive(Deserialize)]
    struct Status {
        state: String,
    }
    let url: http::Uri = location
        .parse()
        .with_context(|| format!("Location {location:?} is not a URL"))?;
    let (host, path) = request_target(&url)?;
    let ask = async {
        let mut connection = client.connect::<Empty<Bytes>>(&url, "Location").await?;
        let request = Request::get(path)
            .header(header::HOST, host)
            .header(header::ACCEPT, "application/json")
            .body(Empty::new())?;
        let response = connection.sender.send_request(request).await?;
        let status = response.status();
        let body = Limited::new(response.into_body(), MAX_ERROR_BODY)
            .collect()
            .await
            .map_err(|e| anyhow!("cannot read the answer: {e}"))?
            .to_bytes();
        if status != StatusCode::OK {
            let text = String::from_utf8_lossy(&body);
            let error = serde_json::from_str::<PushServiceError>(&text).ok();
            anyhow::bail!("{}", describe_answer(status, error.as_ref(), &text));
        }
        let parsed: Status =
            serde_json::from_slice(&body).context("the answer has no message state")?;
        Ok(parsed.state)
    };
    tokio::time::timeout(timeout, ask)
        .await
        .map_err(|_| anyhow!("no answer within {} s", timeout.as_secs_f32()))?
}

/// The receipt an event carries; `None` for events of other types.
fn receipt_of(event: &SseEvent) -> anyhow::Result<Option<Receipt>> {
    #[derive(Deserialize)]
    struct Wire {
        id: Option<String>,
        message: Option<String>,
        location: Option<String>,
        outcome: String,
        code: Option<u32>,
        at: Option<u64>,
    }
    if event.event != "receipt" {
        return Ok(None);
    }
    let wire: Wire = serde_json::from_str(&event.data)
        .with_context(|| format!("receipt event {:?} is not a receipt", event.data))?;
    let message = wire
        .message
        .or_else(|| wire.location.as_deref().map(|l| last_segment(l).to_owned()))
        .ok_or_else(|| anyhow!("receipt event {:?} names no message", event.data))?;
    Ok(Some(Receipt {
        id: wire.id.unwrap_or_else(|| event.id.clone()),
        message,
        outcome: Outcome::parse(&wire.outcome),
        code: wire.code,
        at_ms: wire.at.unwrap_or(0),
    }))
}

/// A message id from its `Location` (or the id itself).
fn last_segment(location: &str) -> &str {
    let path = location.split(['?', '#']).next().unwrap_or("");
    let path = path.trim_end_matches('/');
    path.rsplit('/').next().unwrap_or(path)
}

/// One dispatched server-sent event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    /// The last event id at dispatch (ids carry over to later events
    /// that have none).
    pub id: String,
    /// The event type; "message" when the event named none.
    pub event: String,
    /// The data lines, joined with newlines.
    pub data: String,
}

/// An incremental `text/event-stream` parser, as the WHATWG HTML standard
/// (§9.2.6) specifies it: any chunking of the stream yields the same events.
#[derive(Debug, Default)]
pub struct SseParser {
    line: Vec<u8>,
    /// The previous chunk ended in CR: a LF starting the next one belongs
    /// to the same line break.
    after_cr: bool,
    /// A line was seen on this connection (so a BOM is no longer possible).
    started: bool,
    data: String,
    event: String,
    id_buffer: String,
    last_event_id: String,
    retry: Option<Duration>,
}

impl SseParser {
    pub fn new() -> SseParser {
        SseParser::default()
    }

    /// Feeds a chunk; returns the events it completed.
    pub fn feed(&mut self, chunk: &[u8]) -> Vec<SseEvent> {
        let mut events = Vec::new();
        for &byte in chunk {
            match byte {
                b'\n' if self.after_cr => self.after_cr = false,
                b'\n' | b'\r' => {
                    self.after_cr = byte == b'\r';
                    let line = std::mem::take(&mut self.line);
                    // The stream may start with a BOM, which chunking can
                    // split: strip it from the first whole line.
                    let line = if self.started {
                        &line[..]
                    } else {
                        line.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&line)
                    };
                    self.started = true;
                    let line = String::from_utf8_lossy(line);
                    if let Some(event) = self.process_line(&line) {
                        events.push(event);
                    }
                }
                _ => {
                    self.after_cr = false;
                    self.line.push(byte);
                }
            }
        }
        events
    }

    /// The stream ended: an unfinished event is dropped, but the last
    /// event id and retry time carry over to the next connection.
    pub fn end_of_stream(&mut self) {
        self.line.clear();
        self.after_cr = false;
        self.started = false;
        self.data.clear();
        self.event.clear();
        self.id_buffer = self.last_event_id.clone();
    }

    /// What a reconnect sends as `Last-Event-ID` ("" for none).
    pub fn last_event_id(&self) -> &str {
        &self.last_event_id
    }

    /// The reconnection time the server asked for.
    pub fn retry(&self) -> Option<Duration> {
        self.retry
    }

    fn process_line(&mut self, line: &str) -> Option<SseEvent> {
        if line.is_empty() {
            return self.dispatch();
        }
        if line.starts_with(':') {
            return None;
        }
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line, ""),
        };
        match field {
            "event" => self.event = value.to_owned(),
            "data" => {
                self.data.push_str(value);
                self.data.push('\n');
            }
            "id" if !value.contains('\0') => self.id_buffer = value.to_owned(),
            "retry" if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) => {
                if let Ok(ms) = value.parse() {
                    self.retry = Some(Duration::from_millis(ms));
                }
            }
            _ => {}
        }
        None
    }

    fn dispatch(&mut self) -> Option<SseEvent> {
        self.last_event_id = self.id_buffer.clone();
        let event = std::mem::take(&mut self.event);
        if self.data.is_empty() {
            return None;
        }
        let mut data = std::mem::take(&mut self.data);
        data.pop();
        Some(SseEvent {
            id: self.last_event_id.clone(),
            event: if event.is_empty() {
                "message".to_owned()
            } else {
                event
            },
            data,
        })
    }
}

/// Unix milliseconds as RFC 3339 UTC, e.g. `2026-01-02T03:04:05.678Z`.
pub fn format_utc_ms(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Days to a civil date: Howard Hinnant's `civil_from_days`.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn ev(id: &str, event: &str, data: &str) -> SseEvent {
        SseEvent {
            id: id.into(),
            event: event.into(),
            data: data.into(),
        }
    }

    #[test]
    fn sse_fields_comments_and_dispatch() {
        let mut p = SseParser::new();
        let stream = b"retry: 2500\n\n: keepalive\n\nid: 7\nevent: receipt\ndata: {\"a\":1}\n\n\
                       data: one\ndata:two\ndata\n\nid\nevent: x\n\n\
                       data: after reset\n\nweird field: y\nid: 8\0\ndata: z\n\n";
        let events = p.feed(stream);
        assert_eq!(
            events,
            [
                ev("7", "receipt", "{\"a\":1}"),
                // Ids carry over; several data lines join with newlines;
                // only one space after the colon is stripped.
                ev("7", "message", "one\ntwo\n"),
                // An empty `id` resets it; an event type without data is
                // dropped, and does not leak into the next event.
                ev("", "message", "after reset"),
                // Unknown fields are ignored, and ids with NUL too.
                ev("", "message", "z"),
            ]
        );
        assert_eq!(p.retry(), Some(Duration::from_millis(2500)));
        assert_eq!(p.last_event_id(), "");
        p.feed(b"retry: soon\n\nretry\n\n");
        assert_eq!(p.retry(), Some(Duration::from_millis(2500)));
    }

    #[test]
    fn sse_any_chunking_and_line_ending_gives_the_same_events() {
        let text = "\u{feff}id: 1\r\nevent: receipt\rdata:  spaced\r\n\r\nid: 2\ndata: x\n\n";
        let want = [ev("1", "receipt", " spaced"), ev("2", "message", "x")];
        let bytes = text.as_bytes();
        for split in 0..=bytes.len() {
            let mut p = SseParser::new();
            let mut got = p.feed(&bytes[..split]);
            got.extend(p.feed(&bytes[split..]));
            assert_eq!(got, want, "split at {split}");
        }
        let mut p = SseParser::new();
        let got: Vec<_> = bytes.iter().flat_map(|b| p.feed(&[*b])).collect();
        assert_eq!(got, want);
        assert_eq!(p.last_event_id(), "2");
    }

    #[test]
    fn sse_unfinished_events_are_dropped_when_the_stream_ends() {
        let mut p = SseParser::new();
        assert_eq!(
            p.feed(b"id: 1\ndata: a\n\nid: 2\nevent: receipt\ndata: b\n"),
            [ev("1", "message", "a")]
        );
        p.end_of_stream();
        // The id of the unfinished event was never dispatched.
        assert_eq!(p.last_event_id(), "1");
        assert_eq!(p.feed(b"data: c\n\n"), [ev("1", "message", "c")]);
    }

    #[test]
    fn receipts_parse_from_events() {
        let data = r#"{"id":"5","message":"abc","location":"http://h/m/abc","outcome":"rejected","code":302,"at":1767225600123}"#;
        let r = receipt_of(&ev("5", "receipt", data)).unwrap().unwrap();
        assert_eq!(
            r,
            Receipt {
                id: "5".into(),
                message: "abc".into(),
                outcome: Outcome::Rejected,
                code: Some(302),
                at_ms: 1_767_225_600_123,
            }
        );
        assert_eq!(
            r.describe(),
            "rejected (code 302) at 2026-01-01T00:00:00.123Z (message abc)"
        );
        let only_location = r#"{"location":"http://h/m/xyz","outcome":"delivered","at":0}"#;
        let r = receipt_of(&ev("6", "receipt", only_location))
            .unwrap()
            .unwrap();
        assert_eq!((r.id.as_str(), r.message.as_str()), ("6", "xyz"));
        assert_eq!(
            r.describe(),
            "delivered at 1970-01-01T00:00:00.000Z (message xyz)"
        );
        assert_eq!(receipt_of(&ev("7", "message", "hello")).unwrap(), None);
        assert!(receipt_of(&ev("8", "receipt", "not json")).is_err());
        assert_eq!(
            Outcome::parse("teleported"),
            Outcome::Other("teleported".into())
        );
        assert_eq!(Outcome::parse("forwarded"), Outcome::Forwarded);
        assert_eq!(Outcome::Forwarded.as_str(), "forwarded");
    }

    #[test]
    fn messages_match_by_the_last_segment_of_their_location() {
        assert_eq!(last_segment("http://h:1/m/abc"), "abc");
        assert_eq!(last_segment("http://h/m/abc/?x=1#f"), "abc");
        assert_eq!(last_segment("abc"), "abc");
    }

    #[test]
    fn utc_times_format_as_rfc3339() {
        assert_eq!(format_utc_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(format_utc_ms(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(format_utc_ms(1_709_251_199_999), "2024-02-29T23:59:59.999Z");
        assert_eq!(format_utc_ms(4_102_444_800_000), "2100-01-01T00:00:00.000Z");
    }

    /// A fake receipt subscription: answers each connection with the next
    /// of `replies` and records the requests.
    async fn fake_stream(replies: Vec<String>) -> (String, tokio::task::JoinHandle<Vec<String>>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let mut seen = Vec::new();
            for reply in replies {
                let (mut socket, _) = listener.accept().await.unwrap();
                let mut request = Vec::new();
                let mut buf = [0u8; 1024];
                while !request.ends_with(b"\r\n\r\n") {
                    let n = socket.read(&mut buf).await.unwrap();
                    assert!(n > 0, "client left mid-request");
                    request.extend_from_slice(&buf[..n]);
                }
                seen.push(String::from_utf8_lossy(&request).to_ascii_lowercase());
                socket.write_all(reply.as_bytes()).await.unwrap();
                // Closing without a length or chunked end drops the stream.
                socket.shutdown().await.unwrap();
            }
            seen
        });
        (format!("http://{addr}/r/tok"), task)
    }

    fn sse_reply(events: &str) -> String {
        format!("HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n{events}")
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn waits_across_a_dropped_stream_resuming_after_the_last_event() {
        rt().block_on(async {
            let other = r#"{"id":"1","message":"other","outcome":"delivered","at":1}"#;
            let mine = r#"{"id":"2","message":"mine","outcome":"expired","at":2}"#;
            let (url, task) = fake_stream(vec![
                sse_reply(&format!(
                    "retry: 10\n\n: hi\n\nid: 1\nevent: receipt\ndata: {other}\n\nid: 2\nevent: rec"
                )),
                sse_reply(&format!("id: 2\nevent: receipt\ndata: {mine}\n\n")),
            ])
            .await;
            let started = Instant::now();
            let r = wait_for_receipt(
                &HttpClient::default(),
                &url,
                "http://h/m/mine",
                Duration::from_secs(5),
            )
            .await
            .unwrap();
            assert!(started.elapsed() < Duration::from_secs(2));
            assert_eq!((r.id.as_str(), r.outcome), ("2", Outcome::Expired));
            let seen = task.await.unwrap();
            assert!(
                seen[0].starts_with("get /r/tok http/1.1\r\n"),
                "{}",
                seen[0]
            );
            assert!(seen[0].contains("accept: text/event-stream"), "{}", seen[0]);
            assert!(!seen[0].contains("last-event-id"), "{}", seen[0]);
            assert!(seen[1].contains("last-event-id: 1\r\n"), "{}", seen[1]);
        });
    }

    #[test]
    fn refusals_fail_at_once_and_silence_times_out() {
        rt().block_on(async {
            let body = r#"{"code":404,"errno":121,"message":"No such receipt subscription"}"#;
            let (url, _task) = fake_stream(vec![format!(
                "HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )])
            .await;
            let err = wait_for_receipt(&HttpClient::default(), &url, "m", Duration::from_secs(5))
                .await
                .unwrap_err();
            assert!(err.downcast_ref::<ReceiptTimeout>().is_none());
            assert_eq!(
                format!("{err:#}"),
                "receipt subscription answered 404 Not Found, errno 121: No such receipt subscription"
            );

            // Streams that end without the receipt are followed until the
            // time is up.
            let (url, _task) = fake_stream(vec![sse_reply("retry: 10\n\n"); 1000]).await;
            let err = wait_for_receipt(&HttpClient::default(), &url, "m", Duration::from_millis(300))
                .await
                .unwrap_err();
            let timeout = err.downcast_ref::<ReceiptTimeout>().expect("a timeout");
            assert_eq!(timeout.waited, Duration::from_millis(300));

            // Nobody listening: said at once, not after the timeout.
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let err = wait_for_receipt(
                &HttpClient::default(),
                &format!("http://127.0.0.1:{port}/r/x"),
                "m",
                Duration::from_secs(5),
            )
            .await
            .unwrap_err();
            assert!(format!("{err:#}").contains("cannot connect"), "{err:#}");
            let err = wait_for_receipt(
                &HttpClient::default(),
                "ftp://h/r/x",
                "m",
                Duration::from_secs(5),
            )
            .await
            .unwrap_err();
            assert!(
                format!("{err:#}").contains("unsupported receipt subscription scheme"),
                "{err:#}"
            );
        });
    }
}
