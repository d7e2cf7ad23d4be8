//! Broadcasts (Mozilla's "megaphone"): named versions, such as Firefox's
//! `remote-settings/monitor_changes`, that every subscribed user agent is
//! told about over its push websocket as soon as they change.
//!
//! The current versions live in one `watch` channel. A connection that
//! subscribed to any broadcast holds a receiver; a change wakes those
//! connections, and each works out its own delta against what it last told
//! its user agent. So a change costs one snapshot, however many connections
//! are subscribed, and no connection queues anything on behalf of another.
//!
//! Versions come from the operator API (`api`), from an upstream source
//! polled on a timer (`source`), and, with several nodes, from the shared
//! store, which every node reads every second (`sync_loop`).

pub mod api;
pub mod cli;
pub mod source;

use crate::metrics::Metrics;
use crate::store::{Store, StoreResult};
use herald_proto::protocol::Broadcasts;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// What the user agent is told for an id Herald does not know.
pub const NOT_FOUND: &str = "Broadcast not found";

/// Bounds on what one connection may subscribe to, so a hostile client
/// cannot make its session large.
pub const MAX_SUBSCRIPTIONS: usize = 64;
pub const MAX_ID_LEN: usize = 128;
pub const MAX_VERSION_LEN: usize = 256;

/// How often nodes sharing a store read its broadcast versions.
const SYNC_INTERVAL: Duration = Duration::from_secs(1);

/// The versions at one moment. `serial` grows with every change.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub serial: u64,
    pub versions: BTreeMap<String, String>,
}

/// A connection's broadcast subscriptions: id → the version its user agent
/// has (as far as Herald told it or it told Herald).
#[derive(Debug, Default)]
pub struct Subscriptions {
    known: BTreeMap<String, String>,
    /// The serial of the last snapshot compared against.
    seen: u64,
}

impl Subscriptions {
    pub fn is_empty(&self) -> bool {
        self.known.is_empty()
    }

    pub fn seen(&self) -> u64 {
        self.seen
    }

    /// Adds the user agent's ids and versions; returns what it must be
    /// told: versions that differ, and the ids Herald does not know (still
    /// followed, so they arrive if they ever appear).
    pub fn subscribe(
        &mut self,
        snapshot: &Snapshot,
        client: BTreeMap<String, String>,
    ) -> Broadcasts {
        // Catch up first, so the delta below starts from the same snapshot.
        let mut delta = self.on_change(snapshot);
        for (id, version) in client {
            if id.is_empty() || id.len() > MAX_ID_LEN || version.len() > MAX_VERSION_LEN {
                continue;
            }
            if !self.known.contains_key(&id) && self.known.len() >= MAX_SUBSCRIPTIONS {
                continue;
            }
            match snapshot.versions.get(&id) {
                Some(current) => {
                    if *current != version {
                        delta.changed.insert(id.clone(), current.clone());
                    }
                    self.known.insert(id, current.clone());
                }
                None => {
                    delta.errors.insert(id.clone(), NOT_FOUND.to_string());
                    self.known.insert(id, version);
                }
            }
        }
        delta
    }

    /// A newer snapshot: the subscribed ids whose version moved.
    pub fn on_change(&mut self, snapshot: &Snapshot) -> Broadcasts {
        let mut delta = Broadcasts::default();
        if snapshot.serial == self.seen {
            return delta;
        }
        self.seen = snapshot.serial;
        for (id, have) in self.known.iter_mut() {
            if let Some(current) = snapshot.versions.get(id) {
                if current != have {
                    *have = current.clone();
                    delta.changed.insert(id.clone(), current.clone());
                }
            }
        }
        delta
    }
}

/// Whether an id and version may be set through the API or a source.
pub fn valid(id: &str, version: &str) -> bool {
    let id_ok = !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./:".contains(&b));
    let version_ok = !version.is_empty()
        && version.len() <= MAX_VERSION_LEN
        && !version.chars().any(char::is_control);
    id_ok && version_ok
}

/// The node's current versions and the channel that announces changes.
pub struct Broadcaster {
    tx: watch::Sender<Arc<Snapshot>>,
    metrics: Arc<Metrics>,
}

impl Broadcaster {
    pub fn new(versions: BTreeMap<String, String>, metrics: Arc<Metrics>) -> Self {
        let snapshot = Snapshot {
            serial: 1,
            versions,
        };
        Broadcaster {
            tx: watch::channel(Arc::new(snapshot)).0,
            metrics,
        }
    }

    pub fn current(&self) -> Arc<Snapshot> {
        self.tx.borrow().clone()
    }

    /// For a connection that subscribed to something.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.tx.subscribe()
    }

    /// Connections following broadcasts now.
    pub fn subscribed(&self) -> usize {
        self.tx.receiver_count()
    }

    /// Takes these versions; returns how many changed. Connections are
    /// woken only when something did.
    pub fn apply(&self, versions: impl IntoIterator<Item = (String, String)>) -> usize {
        let mut changed = 0;
        self.tx.send_if_modified(|snap| {
            let mut next: Option<BTreeMap<String, String>> = None;
            for (id, version) in versions {
                let map = next.as_ref().unwrap_or(&snap.versions);
                if map.get(&id) == Some(&version) {
                    continue;
                }
                next.get_or_insert_with(|| snap.versions.clone())
                    .insert(id, version);
                changed += 1;
            }
            match next {
                Some(versions) => {
                    *snap = Arc::new(Snapshot {
                        serial: snap.serial + 1,
                        versions,
                    });
                    true
                }
                None => false,
            }
        });
        self.metrics.broadcast_changes.inc_by(changed as u64);
        changed
    }

    /// Stores a version (so it survives restarts and reaches other nodes),
    /// then announces it here.
    pub async fn set(&self, store: &dyn Store, id: &str, version: &str) -> StoreResult<bool> {
        store.put_broadcast(id, version).await?;
        Ok(self.apply([(id.to_string(), version.to_string())]) > 0)
    }
}

/// With several nodes: picks up versions other nodes stored (run as a task).
pub async fn sync_loop(broadcaster: Arc<Broadcaster>, store: Arc<dyn Store>) {
    let mut tick = tokio::time::interval(SYNC_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match store.broadcasts().await {
            Ok(versions) => {
                broadcaster.apply(versions);
            }
            Err(e) => tracing::debug!("reading broadcast versions: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(serial: u64, pairs: &[(&str, &str)]) -> Snapshot {
        Snapshot {
            serial,
            versions: pairs
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect(),
        }
    }

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn subscribing_reports_stale_and_unknown_ids_only() {
        let s = snap(3, &[("a", "1"), ("b", "2")]);
        let mut subs = Subscriptions::default();
        let d = subs.subscribe(&s, map(&[("a", "1"), ("b", "1"), ("x", "9")]));
        assert_eq!(d.changed, map(&[("b", "2")]));
        assert_eq!(d.errors, map(&[("x", NOT_FOUND)]));
        // Nothing new: nothing to say.
        assert!(subs.subscribe(&s, map(&[("a", "1")])).is_empty());
    }

    #[test]
    fn changes_reach_only_subscribed_ids_once() {
        let mut subs = Subscriptions::default();
        subs.subscribe(&snap(1, &[("a", "1"), ("b", "1")]), map(&[("a", "1")]));
        let d = subs.on_change(&snap(2, &[("a", "2"), ("b", "2")]));
        assert_eq!(d.changed, map(&[("a", "2")]));
        assert!(subs
            .on_change(&snap(2, &[("a", "2"), ("b", "2")]))
            .is_empty());
        // An unknown id that appears later is delivered.
        subs.subscribe(&snap(2, &[("a", "2")]), map(&[("later", "0")]));
        let d = subs.on_change(&snap(3, &[("a", "2"), ("later", "5")]));
        assert_eq!(d.changed, map(&[("later", "5")]));
    }

    #[test]
    fn subscriptions_are_bounded() {
        let mut subs = Subscriptions::default();
        let many: BTreeMap<String, String> = (0..1000)
            .map(|i| (format!("id{i}"), "v".to_string()))
            .collect();
        subs.subscribe(&snap(1, &[]), many);
        assert_eq!(subs.known.len(), MAX_SUBSCRIPTIONS);
        let long = map(&[(&"x".repeat(MAX_ID_LEN + 1), "v")]);
        let mut subs = Subscriptions::default();
        assert!(subs.subscribe(&snap(1, &[]), long).is_empty());
        assert!(subs.is_empty());
    }

    #[test]
    fn ids_and_versions_are_checked() {
        assert!(valid("remote-settings/monitor_changes", "\"1700000000\""));
        assert!(!valid("", "1"));
        assert!(!valid("a b", "1"));
        assert!(!valid("a", ""));
        assert!(!valid("a", "x\ny"));
        assert!(!valid(&"a".repeat(MAX_ID_LEN + 1), "1"));
    }

    #[test]
    fn apply_wakes_only_on_change() {
        let b = Broadcaster::new(map(&[("a", "1")]), Arc::new(Metrics::new()));
        let mut rx = b.subscribe();
        rx.borrow_and_update();
        assert_eq!(b.apply(map(&[("a", "1")])), 0);
        assert!(!rx.has_changed().unwrap());
        assert_eq!(b.apply(map(&[("a", "2"), ("c", "1")])), 2);
        assert!(rx.has_changed().unwrap());
        let s = rx.borrow_and_update().clone();
        assert_eq!(s.serial, 2);
        assert_eq!(s.versions, map(&[("a", "2"), ("c", "1")]));
        assert_eq!(b.subscribed(), 1);
    }
}
