//! Wake-ups to other nodes, batched per destination node.
//!
//! A node used to send one signed HTTP request per cross-node push; at
//! thousands of pushes a second that request (building it, signing it,
//! parsing and verifying it on the other side, two task wake-ups) cost more
//! CPU than the push itself. Now each peer node has one sender task with a
//! queue: a wake-up is put on the queue and the push answers at once; the
//! task sends everything queued in one request over the pooled keep-alive
//! connection, and while that request is on its way the next batch
//! gathers. An idle peer costs nothing; a busy one gets fewer, larger
//! requests, with no timer delaying any wake-up.
//!
//! Each wake-up carries the stored message itself (as TTL-0 messages
//! always did), so the woken node hands it to the connection as if it had
//! been pushed there, instead of reading the store. The message is in
//! Redis either way: a lost batch costs delay, never loss (cluster.rs).
//!
//! The body format is in proto-docs/cluster.md ("Wake-ups").

use super::node_auth::NodeKey;
use crate::metrics::Metrics;
use crate::store::{decode_message, encode_message, Message, SharedClock};
use bytes::Bytes;
use dashmap::DashMap;
use herald_client::http::PlainClient;
use herald_proto::ids::Uaid;
use http_body_util::{BodyExt, Full};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Where a batch goes on the receiving node.
pub const WAKES_PATH: &str = "/_herald/node/wakes";
/// The single JSON wake-up of earlier versions: still served, and used
/// towards a node that does not know `WAKES_PATH` yet (a rolling upgrade).
pub const WAKE_PATH: &str = "/_herald/node/wake";

/// The body format's first byte.
const VERSION: u8 = 1;
const LOOK: u8 = 0;
const CARRIED: u8 = 1;
/// A message whose encoding is larger travels as a bare wake-up and is
/// read from the store instead, so one push cannot swell a batch.
const MAX_CARRIED: usize = 16 * 1024;
/// A batch stops growing past this size; the rest goes in the next one.
const BATCH_BYTES: usize = 128 * 1024;
/// What a receiver reads of a batch: one batch plus its last record.
pub const MAX_BODY: usize = BATCH_BYTES + MAX_CARRIED + 64;
/// Wake-ups waiting for one peer; past this they are dropped (counted as
/// failed): the peer is not keeping up, and the messages wait in the store.
const QUEUE: usize = 65_536;
/// A sender task with nothing to send for this long ends; the next wake-up
/// for its peer starts a new one. Bounds what dead peers leave behind.
const IDLE: Duration = Duration::from_secs(30);

/// One wake-up: look in the store for `uaid`, or deliver `message`.
pub struct WakeUp {
    pub uaid: Uaid,
    pub message: Option<Arc<Message>>,
}

/// A single wake-up as JSON (`WAKE_PATH`): look in the store for `uaid`,
/// or deliver `message` now.
#[derive(Serialize, Deserialize)]
pub struct Wake {
    pub uaid: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<WireMessage>,
}

#[derive(Serialize, Deserialize)]
pub struct WireMessage {
    pub seq: u64,
    /// The store's encoding (codec), base64url.
    pub value: String,
}

impl Wake {
    /// As earlier versions sent it: only a TTL-0 message travels.
    pub fn of(w: &WakeUp, clock: &SharedClock) -> Self {
        Wake {
            uaid: w.uaid.to_string(),
            message: w
                .message
                .as_ref()
                .filter(|m| m.ttl == 0)
                .map(|m| WireMessage {
                    seq: m.seq,
                    value: herald_proto::b64::encode_b64url(&encode_carried(m, clock)),
                }),
        }
    }
}

/// A carried message's expiry travels in the shared clock, as it does in
/// the store: in the sender's own time, a receiver whose clock is 30 s
/// ahead of the sender's skips as expired a message with 30 s left (found
/// by `make chaos` once skewed nodes' wake-ups were no longer refused:
/// TTL-30 messages lost).
fn encode_carried(m: &Message, clock: &SharedClock) -> Vec<u8> {
    encode_message(&Message {
        expires_at: clock.to_shared(m.expires_at),
        ..m.clone()
    })
}

/// A carried message back in this node's clock (see `encode_carried`).
pub fn received(mut m: Message, clock: &SharedClock) -> Message {
    m.expires_at = clock.to_node(m.expires_at);
    m
}

/// What a received batch asks, record by record.
pub enum Received {
    Look(Uaid),
    Deliver(Uaid, Message),
}

/// Appends one record; a message too large to carry becomes a bare one,
/// unless it has TTL 0 (never stored, so the record is its only copy).
fn encode_record(out: &mut Vec<u8>, wake: &WakeUp, clock: &SharedClock) {
    out.extend_from_slice(&wake.uaid.0);
    let value = wake
        .message
        .as_ref()
        .map(|m| (m.seq, encode_carried(m, clock)))
        .filter(|(_, v)| {
            v.len() <= MAX_CARRIED || wake.message.as_ref().is_some_and(|m| m.ttl == 0)
        });
    match value {
        Some((seq, v)) => {
            out.push(CARRIED);
            out.extend_from_slice(&seq.to_be_bytes());
            out.extend_from_slice(&(v.len() as u32).to_be_bytes());
            out.extend_from_slice(&v);
        }
        None => out.push(LOOK),
    }
}

/// The body for `wakes`, all of them in one: what `flush_one` sends for
/// the part of its queue that fits.
#[cfg(test)]
fn encode_batch<'a>(wakes: impl IntoIterator<Item = &'a WakeUp>) -> Vec<u8> {
    let mut out = vec![VERSION];
    for w in wakes {
        encode_record(&mut out, w, &SharedClock::default());
    }
    out
}

/// Reads a batch; None if any record is malformed (the signature already
/// vouched for the sender, so a bad body is a bug, refused whole).
pub fn decode_batch(mut body: &[u8]) -> Option<Vec<Received>> {
    fn take<'a>(b: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        let (head, rest) = (b.get(..n)?, b.get(n..)?);
        *b = rest;
        Some(head)
    }
    let b = &mut body;
    if take(b, 1)? != [VERSION] {
        return None;
    }
    let mut out = Vec::new();
    while !b.is_empty() {
        let uaid = Uaid(take(b, 16)?.try_into().ok()?);
        match take(b, 1)?[0] {
            LOOK => out.push(Received::Look(uaid)),
            CARRIED => {
                let seq = u64::from_be_bytes(take(b, 8)?.try_into().ok()?);
                let len = u32::from_be_bytes(take(b, 4)?.try_into().ok()?) as usize;
                let message = decode_message(seq, take(b, len)?)?;
                out.push(Received::Deliver(uaid, message));
            }
            _ => return None,
        }
    }
    Some(out)
}

/// Signs and sends node requests; cheap to clone into a task.
#[derive(Clone)]
pub struct NodeClient {
    pub client: PlainClient<Full<Bytes>>,
    pub key: NodeKey,
    /// Timestamps are the cluster's shared clock, not this node's: a node
    /// whose own clock is 30 s off must still be within the receivers'
    /// window (node_auth::MAX_SKEW).
    pub clock: SharedClock,
    pub metrics: Arc<Metrics>,
    pub timeout: Duration,
}

impl NodeClient {
    /// POSTs `body` to `path` on the node at `base` (its node_url); the
    /// answer's status, or None if none came in time.
    pub async fn post(
        &self,
        base: &str,
        path: &str,
        content_type: &str,
        body: Vec<u8>,
    ) -> Option<http::StatusCode> {
        let url = format!("{base}{path}");
        // Signed over the path the receiver sees: node_url's own path, if
        // any, and ours.
        let signed_path = url
            .parse::<http::Uri>()
            .map(|u| u.path().to_string())
            .unwrap_or_else(|_| path.to_string());
        let auth = self
            .key
            .sign("POST", &signed_path, self.clock.now_secs(), &body);
        let req = http::Request::post(&url)
            .header("authorization", auth)
            .header("content-type", content_type)
            .body(Full::new(Bytes::from(body)))
            .ok()?;
        let started = Instant::now();
        let result = tokio::time::timeout(self.timeout, async {
            let resp = self.client.request(req).await.ok()?;
            let status = resp.status();
            let _ = resp.into_body().collect().await;
            Some(status)
        })
        .await;
        self.metrics
            .node_request_seconds
            .observe(started.elapsed().as_secs_f64());
        let status = result.ok().flatten();
        if !status.is_some_and(|s| s.is_success()) {
            tracing::debug!(url = %url, ?status, "node request failed");
        }
        status
    }
}

/// The wake-up queues of this node, one per peer node.
pub struct Wakes {
    queues: DashMap<u64, mpsc::Sender<WakeUp>>,
    client: NodeClient,
    /// User agents whose wake-up was lost (a failed request, a full queue,
    /// a look-up the store did not answer), with the rounds of `Cluster::rewake`
    /// spent on them. Their messages wait in the store, and a wake-up that
    /// carries a later message does not bring them: the woken connection
    /// takes what it is handed without reading the store. So each is woken
    /// again with a bare wake-up, which makes the connection read the
    /// store, until one gets through.
    missed: DashMap<Uaid, u32>,
}

impl Wakes {
    pub fn new(client: NodeClient) -> Arc<Self> {
        Arc::new(Wakes {
            queues: DashMap::new(),
            client,
            missed: DashMap::new(),
        })
    }

    /// Notes that a wake-up for `uaid` was lost.
    pub fn missed(&self, uaid: Uaid) {
        self.missed.entry(uaid).or_insert(0);
    }

    /// The user agents to wake again this round, oldest rounds counted up;
    /// those tried `rounds` times already are given up (the connection's
    /// own re-read of the store comes within `RECHECK_INTERVAL` anyway).
    pub fn to_wake_again(&self, rounds: u32) -> Vec<Uaid> {
        self.missed.retain(|_, tried| *tried < rounds);
        self.missed
            .iter_mut()
            .map(|mut e| {
                *e.value_mut() += 1;
                *e.key()
            })
            .collect()
    }

    /// `uaid` needs no further wake-up (its node read the store, or it is
    /// connected nowhere).
    pub fn settled(&self, uaid: &Uaid) {
        self.missed.remove(uaid);
    }

    /// Queues `wake` for node `node` at `url`; false if it was dropped
    /// (the peer's queue is full).
    pub fn send(self: &Arc<Self>, node: u64, url: &str, wake: WakeUp) -> bool {
        let mut wake = wake;
        // Twice at most: a queue whose task just ended idle is replaced.
        for _ in 0..2 {
            let tx = self
                .queues
                .entry(node)
                .or_insert_with(|| self.start(node, url.to_string()))
                .clone();
            match tx.try_send(wake) {
                Ok(()) => return true,
                Err(mpsc::error::TrySendError::Full(w)) => {
                    self.count(false, 1);
                    self.missed(w.uaid);
                    return false;
                }
                Err(mpsc::error::TrySendError::Closed(w)) => {
                    self.queues.remove_if(&node, |_, q| q.same_channel(&tx));
                    wake = w;
                }
            }
        }
        self.missed(wake.uaid);
        false
    }

    fn start(self: &Arc<Self>, node: u64, url: String) -> mpsc::Sender<WakeUp> {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(self.clone().run(node, url, rx, tx.clone()));
        tx
    }

    /// One peer's sender: one request at a time, each carrying everything
    /// queued meanwhile (up to `BATCH_BYTES`).
    async fn run(
        self: Arc<Self>,
        node: u64,
        url: String,
        mut rx: mpsc::Receiver<WakeUp>,
        tx: mpsc::Sender<WakeUp>,
    ) {
        let mut pending: Vec<WakeUp> = Vec::new();
        loop {
            if pending.is_empty() {
                match tokio::time::timeout(IDLE, rx.recv_many(&mut pending, 1024)).await {
                    Ok(0) => return,
                    Ok(_) => {}
                    Err(_) => {
                        // Idle: hand the peer's slot back. A wake-up queued
                        // since then is sent below; one queued after
                        // `close` fails to queue and starts a new task.
                        self.queues.remove_if(&node, |_, q| q.same_channel(&tx));
                        drop(tx);
                        rx.close();
                        while let Some(w) = rx.recv().await {
                            pending.push(w);
                        }
                        self.flush_all(&url, &mut pending).await;
                        return;
                    }
                }
            } else {
                // Whatever arrived while the last request was out.
                while pending.len() < 1024 {
                    match rx.try_recv() {
                        Ok(w) => pending.push(w),
                        Err(_) => break,
                    }
                }
            }
            self.flush_one(&url, &mut pending).await;
        }
    }

    async fn flush_all(&self, url: &str, pending: &mut Vec<WakeUp>) {
        while !pending.is_empty() {
            self.flush_one(url, pending).await;
        }
    }

    /// Sends the front of `pending` (up to `BATCH_BYTES`) in one request
    /// and removes it.
    async fn flush_one(&self, url: &str, pending: &mut Vec<WakeUp>) {
        let mut body = vec![VERSION];
        let mut n = 0;
        for w in pending.iter() {
            if n > 0 && body.len() >= BATCH_BYTES {
                break;
            }
            encode_record(&mut body, w, &self.client.clock);
            n += 1;
        }
        let batch: Vec<WakeUp> = pending.drain(..n).collect();
        let status = self
            .client
            .post(url, WAKES_PATH, "application/octet-stream", body)
            .await;
        let ok = match status {
            Some(s) if s.is_success() => true,
            Some(http::StatusCode::NOT_FOUND) => self.one_by_one(url, &batch).await,
            _ => false,
        };
        self.count(ok, batch.len() as u64);
        for w in &batch {
            match (ok, &w.message) {
                (false, _) => self.missed(w.uaid),
                // A bare wake-up got through: the connection reads the store.
                (true, None) => self.settled(&w.uaid),
                (true, Some(_)) => {}
            }
        }
    }

    /// A peer of an earlier version answers 404 to batches: each wake-up
    /// as the single JSON request it knows.
    async fn one_by_one(&self, url: &str, batch: &[WakeUp]) -> bool {
        let mut ok = true;
        for w in batch {
            let body = serde_json::to_vec(&Wake::of(w, &self.client.clock)).unwrap_or_default();
            let status = self
                .client
                .post(url, WAKE_PATH, "application/json", body)
                .await;
            ok &= status.is_some_and(|s| s.is_success());
        }
        ok
    }

    fn count(&self, ok: bool, n: u64) {
        self.client
            .metrics
            .wakeups_sent
            .with_label_values(&[if ok { "ok" } else { "failed" }])
            .inc_by(n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::now_secs;

    fn wakes() -> Arc<Wakes> {
        let metrics = Arc::new(Metrics::new());
        Wakes::new(NodeClient {
            client: herald_client::http::node_only(Duration::from_secs(1)),
            key: NodeKey::derive(&[7; 32]),
            metrics,
            timeout: Duration::from_secs(1),
            clock: Default::default(),
        })
    }

    #[tokio::test]
    async fn lost_wake_ups_are_tried_again_for_a_bounded_number_of_rounds() {
        let w = wakes();
        let (a, b) = (Uaid::random(), Uaid::random());
        w.missed(a);
        w.missed(a);
        assert_eq!(w.to_wake_again(3), vec![a], "noted once");
        w.missed(b);
        w.settled(&b);
        // A further loss does not restart the count.
        w.missed(a);
        assert_eq!(w.to_wake_again(3), vec![a]);
        assert_eq!(w.to_wake_again(3), vec![a]);
        assert!(w.to_wake_again(3).is_empty(), "given up after 3 rounds");
    }
    use herald_proto::urgency::Urgency;

    fn message(seq: u64, ttl: u64, len: usize) -> Arc<Message> {
        Arc::new(Message {
            seq,
            channel: uuid::Uuid::new_v4(),
            expires_at: now_secs() + ttl,
            ttl,
            urgency: Urgency::Normal,
            topic: Some("t".into()),
            headers: None,
            data: Bytes::from(vec![7u8; len]),
            receipt: false,
        })
    }

    #[test]
    fn a_carried_message_keeps_its_expiry_between_skewed_clocks() {
        // Redis says T; the sender runs 30 s behind, the receiver 30 s ahead.
        const T: u64 = 1_800_000_000;
        let (sender, receiver) = (SharedClock::default(), SharedClock::default());
        sender.set_offset(SharedClock::offset_from_readings(T, T - 30));
        receiver.set_offset(SharedClock::offset_from_readings(T, T + 30));
        let mut m = (*message(7, 30, 10)).clone();
        m.expires_at = T - 30 + 30; // 30 s left, in the sender's clock
        let mut body = vec![VERSION];
        let wake = WakeUp {
            uaid: Uaid::random(),
            message: Some(Arc::new(m)),
        };
        encode_record(&mut body, &wake, &sender);
        let Some(Received::Deliver(_, got)) = decode_batch(&body).unwrap().pop() else {
            panic!("a carried message");
        };
        let got = received(got, &receiver);
        assert_eq!(
            got.expires_at,
            T + 30 + 30,
            "30 s left, in the receiver's clock"
        );
        assert!(!got.expired(T + 30));
    }

    #[test]
    fn batches_round_trip_and_refuse_truncation() {
        let (a, b, c) = (Uaid::random(), Uaid::random(), Uaid::random());
        let wakes = [
            WakeUp {
                uaid: a,
                message: None,
            },
            WakeUp {
                uaid: b,
                message: Some(message(42, 60, 100)),
            },
            // Too large to carry: a bare wake-up, read from the store.
            WakeUp {
                uaid: c,
                message: Some(message(43, 60, MAX_CARRIED)),
            },
            // TTL 0 is carried whatever its size: nothing else holds it.
            WakeUp {
                uaid: c,
                message: Some(message(44, 0, MAX_CARRIED)),
            },
        ];
        let body = encode_batch(&wakes);
        let got = decode_batch(&body).unwrap();
        assert_eq!(got.len(), 4);
        assert!(matches!(got[0], Received::Look(u) if u == a));
        match &got[1] {
            Received::Deliver(u, m) => {
                assert_eq!(*u, b);
                assert_eq!((m.seq, m.ttl, m.data.len()), (42, 60, 100));
                assert_eq!(m.topic.as_deref(), Some("t"));
            }
            Received::Look(_) => panic!("not carried"),
        }
        assert!(matches!(got[2], Received::Look(u) if u == c));
        assert!(matches!(&got[3], Received::Deliver(u, m) if *u == c && m.seq == 44));
        for cut in 1..body.len() {
            if let Some(partial) = decode_batch(&body[..cut]) {
                // Cut exactly between records.
                assert!(partial.len() < 4, "{cut}");
            }
        }
        assert!(decode_batch(&[]).is_none());
        assert!(decode_batch(&[2]).is_none(), "another version");
        assert_eq!(decode_batch(&[VERSION]).unwrap().len(), 0);
    }
}
