//! What a user agent following a broadcast records, in the worker process
//! that holds it: who follows (`Follow`), each broadcast frame's arrival
//! (`Recorder`, timestamped with CLOCK_MONOTONIC, which the parent's clock
//! shares) and the counts a worker hands back to `fanout`.

use crate::proto::{self, Ws};
use crate::stats;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::Mutex;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;

/// Who follows what, as handed to every worker.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Follow {
    pub id: String,
    /// The version followers say they know in `hello`: the current one.
    pub version: String,
    /// User agents in all (followers and not).
    pub total: usize,
    pub non_followers: usize,
}

impl Follow {
    /// Whether the user agent with global index `g` follows. The
    /// non-followers are spread evenly over the indices, hence over worker
    /// processes, nodes and source addresses.
    pub fn follows(&self, g: usize) -> bool {
        if self.non_followers == 0 || self.total == 0 {
            return true;
        }
        let (m, n, g) = (self.non_followers as u128, self.total as u128, g as u128);
        (g + 1) * m / n == g * m / n
    }
}

/// Broadcast frames a worker has seen so far.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(default)]
pub struct FanoutCounts {
    /// Version -> followers that received it (each counted once).
    pub received: BTreeMap<String, u64>,
    /// Version -> frames a follower received again.
    pub duplicates: BTreeMap<String, u64>,
    /// Version ("?" when the frame did not name the id) -> frames sent to
    /// user agents that follow nothing.
    pub stray: BTreeMap<String, u64>,
    /// Broadcast frames to followers that did not name the followed id.
    pub other: u64,
    /// Followers whose connection is open.
    pub followers_open: u64,
}

/// What a worker hands back when released: the counts, and when each
/// follower first received each version (CLOCK_MONOTONIC µs).
#[derive(Serialize, Deserialize, Clone, Debug, Default)]
#[serde(default)]
pub struct Arrivals {
    pub counts: FanoutCounts,
    pub at_us: BTreeMap<String, Vec<u64>>,
}

/// Shared by one worker's connections.
pub struct Recorder {
    id: String,
    inner: Mutex<Arrivals>,
}

#[derive(Deserialize)]
struct Frame<'a> {
    #[serde(rename = "messageType", borrow, default)]
    message_type: Option<Cow<'a, str>>,
    #[serde(default)]
    broadcasts: Option<Map<String, Value>>,
}

impl Recorder {
    pub fn new(id: &str) -> Recorder {
        Recorder {
            id: id.to_string(),
            inner: Mutex::new(Arrivals::default()),
        }
    }

    /// Books one text frame. `seen` is the connection's own list of the
    /// versions it has heard of, which tells a duplicate.
    pub fn on_text(&self, text: &str, follower: bool, seen: &mut Vec<Box<str>>) {
        let at = stats::mono_us();
        let Ok(frame) = serde_json::from_str::<Frame>(text) else {
            return;
        };
        if frame.message_type.as_deref() != Some("broadcast") {
            return;
        }
        let version = frame
            .broadcasts
            .as_ref()
            .and_then(|b| b.get(&self.id))
            .and_then(|v| v.as_str());
        let Ok(mut a) = self.inner.lock() else {
            return;
        };
        match (follower, version) {
            (false, v) => *a.counts.stray.entry(v.unwrap_or("?").into()).or_default() += 1,
            (true, None) => a.counts.other += 1,
            (true, Some(v)) if seen.iter().any(|s| &**s == v) => {
                *a.counts.duplicates.entry(v.into()).or_default() += 1
            }
            (true, Some(v)) => {
                seen.push(v.into());
                *a.counts.received.entry(v.into()).or_default() += 1;
                a.at_us.entry(v.into()).or_default().push(at);
            }
        }
    }

    fn followers_open(&self, delta: i64) {
        if let Ok(mut a) = self.inner.lock() {
            a.counts.followers_open = a.counts.followers_open.saturating_add_signed(delta);
        }
    }

    pub fn counts(&self) -> FanoutCounts {
        self.inner
            .lock()
            .map(|a| a.counts.clone())
            .unwrap_or_default()
    }

    pub fn arrivals(&self) -> Arrivals {
        self.inner.lock().map(|a| a.clone()).unwrap_or_default()
    }
}

/// Holds a connection as `fleet::hold` does, booking the broadcast frames
/// that arrive. Returns why the connection ended early, if it did.
pub async fn watch(
    ws: &mut Ws,
    follower: bool,
    rec: &Recorder,
    stop: &mut watch::Receiver<bool>,
) -> Option<String> {
    let mut seen: Vec<Box<str>> = Vec::new();
    if follower {
        rec.followers_open(1);
    }
    let ended = loop {
        if *stop.borrow_and_update() {
            break None;
        }
        tokio::select! {
            changed = stop.changed() => {
                if changed.is_err() {
                    break None;
                }
            }
            msg = ws.next() => match msg {
                None | Some(Ok(Message::Close(_))) => break Some("closed by server".into()),
                Some(Err(e)) => break Some(proto::ws_error_name(&e)),
                Some(Ok(Message::Text(t))) => rec.on_text(t.as_str(), follower, &mut seen),
                Some(Ok(_)) => {}
            }
        }
    };
    if follower {
        rec.followers_open(-1);
    }
    ended
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_followers_are_spread_evenly() {
        let f = Follow {
            id: "x".into(),
            version: "1".into(),
            total: 110,
            non_followers: 10,
        };
        let non: Vec<usize> = (0..110).filter(|&g| !f.follows(g)).collect();
        assert_eq!(non.len(), 10);
        assert!(non.windows(2).all(|w| w[1] - w[0] == 11), "{non:?}");
        let all = Follow {
            non_followers: 0,
            ..f.clone()
        };
        assert!((0..110).all(|g| all.follows(g)));
        let none = Follow {
            non_followers: 110,
            ..f
        };
        assert!((0..110).all(|g| !none.follows(g)));
    }

    #[test]
    fn recorder_books_firsts_duplicates_and_strays() {
        let r = Recorder::new("a/b");
        let frame = |v: &str| {
            serde_json::json!({"messageType": "broadcast", "broadcasts": {"a/b": v, "other": "x"}})
                .to_string()
        };
        let (mut s1, mut s2, mut s3) = (Vec::new(), Vec::new(), Vec::new());
        r.on_text(&frame("\"1\""), true, &mut s1);
        r.on_text(&frame("\"1\""), true, &mut s2);
        r.on_text(&frame("\"1\""), true, &mut s1); // again on the same connection
        r.on_text(&frame("\"2\""), true, &mut s1);
        r.on_text(&frame("\"1\""), false, &mut s3); // follows nothing
        r.on_text(
            r#"{"messageType":"broadcast","broadcasts":{"errors":{"a/b":"Broadcast not found"}}}"#,
            true,
            &mut s2,
        );
        r.on_text(
            r#"{"messageType":"broadcast","broadcasts":{}}"#,
            false,
            &mut s3,
        );
        r.on_text("{}", true, &mut s1);
        r.on_text("not json", true, &mut s1);
        r.on_text(r#"{"messageType":"notification"}"#, true, &mut s1);
        let a = r.arrivals();
        assert_eq!(a.counts.received["\"1\""], 2);
        assert_eq!(a.counts.received["\"2\""], 1);
        assert_eq!(a.counts.duplicates["\"1\""], 1);
        assert_eq!(a.counts.stray["\"1\""], 1);
        assert_eq!(a.counts.stray["?"], 1);
        assert_eq!(a.counts.other, 1);
        assert_eq!(a.at_us["\"1\""].len(), 2);
        assert!(a.at_us["\"1\""].iter().all(|&t| t > 0));
        // Counts travel as JSON lines between processes.
        let back: Arrivals = serde_json::from_str(&serde_json::to_string(&a).unwrap()).unwrap();
        assert_eq!(back.counts, a.counts);
    }
}
