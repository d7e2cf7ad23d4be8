//! Server-sent events (the WHATWG `text/event-stream` format) carrying
//! receipts: what browsers' `EventSource` and any line reader can follow
//! through proxies that dropped HTTP/2 server push.

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use std::convert::Infallible;
use tokio::sync::mpsc;

pub type StreamingBody = UnsyncBoxBody<Bytes, Infallible>;

/// A body fed by the returned sender; it ends when the sender is dropped.
pub fn channel(depth: usize) -> (mpsc::Sender<Bytes>, StreamingBody) {
    let (tx, rx) = mpsc::channel::<Bytes>(depth);
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|chunk| (Ok::<_, Infallible>(Frame::data(chunk)), rx))
    });
    (tx, StreamBody::new(stream).boxed_unsync())
}

/// One event: `id` is what the client's `Last-Event-ID` will carry back.
/// `data` must be a single line (JSON without raw newlines is).
pub fn event(id: u64, name: &str, data: &str) -> Bytes {
    debug_assert!(!data.contains('\n'));
    Bytes::from(format!("id: {id}\nevent: {name}\ndata: {data}\n\n"))
}

/// A comment line: keeps idle proxies from closing the stream and shows
/// a dead reader quickly.
pub fn comment(text: &str) -> Bytes {
    Bytes::from(format!(": {text}\n\n"))
}

/// How long a reader waits before reconnecting after a dropped stream.
pub fn retry(ms: u64) -> Bytes {
    Bytes::from(format!("retry: {ms}\n\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_follow_the_event_stream_format() {
        assert_eq!(
            event(7, "receipt", r#"{"a":1}"#),
            Bytes::from_static(b"id: 7\nevent: receipt\ndata: {\"a\":1}\n\n")
        );
        assert_eq!(comment("hi"), Bytes::from_static(b": hi\n\n"));
        assert_eq!(retry(2000), Bytes::from_static(b"retry: 2000\n\n"));
    }

    #[tokio::test]
    async fn the_body_carries_what_is_sent_then_ends() {
        let (tx, body) = channel(4);
        tx.send(Bytes::from_static(b"one")).await.unwrap();
        tx.send(Bytes::from_static(b"two")).await.unwrap();
        drop(tx);
        let all = body.collect().await.unwrap().to_bytes();
        assert_eq!(all, Bytes::from_static(b"onetwo"));
    }
}
