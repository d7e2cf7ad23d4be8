//! The connections of this node: a map of uaid → connection, handing each
//! connection the messages routed to it.

use crate::store::Message;
use dashmap::DashMap;
use herald_proto::ids::Uaid;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::{mpsc, Notify};

/// Messages queued per connection before the router stops queueing and
/// tells the connection to read its backlog from the store instead. Keeps a
/// slow user agent from holding more than this many payloads in memory.
const QUEUE: usize = 16;

/// Raised when a message could not be queued: the connection must look in
/// the store for what it missed. `Notify` keeps one permit when nobody is
/// waiting, so a raise is never lost and repeated raises collapse into one.
#[derive(Default)]
pub struct Backlog(Notify);

impl Backlog {
    pub async fn wait(&self) {
        self.0.notified().await;
    }

    fn raise(&self) {
        self.0.notify_one();
    }
}

struct Handle {
    id: u64,
    tx: mpsc::Sender<Arc<Message>>,
    backlog: Arc<Backlog>,
}

/// What a connection gets when it binds its uaid.
pub struct Binding {
    pub id: u64,
    /// Closes (yields None) when another connection takes over the uaid.
    pub rx: mpsc::Receiver<Arc<Message>>,
    pub backlog: Arc<Backlog>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteResult {
    /// Queued to the user agent's connection.
    Queued,
    /// Connected but busy: the message waits in the store and the
    /// connection was told to look there.
    Backlogged,
    NotConnected,
    /// Another node serves the user agent and was told to look in the store.
    Woken,
}

#[derive(Default)]
pub struct LocalRouter {
    conns: DashMap<Uaid, Handle>,
    next_id: AtomicU64,
}

impl LocalRouter {
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes this connection the user agent's only one; an older connection
    /// for the same uaid sees its receiver close.
    pub fn bind(&self, uaid: Uaid) -> Binding {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(QUEUE);
        let backlog = Arc::new(Backlog::default());
        self.conns.insert(
            uaid,
            Handle {
                id,
                tx,
                backlog: backlog.clone(),
            },
        );
        Binding { id, rx, backlog }
    }

    /// Forgets a connection, unless a newer one has already taken the uaid.
    pub fn unbind(&self, uaid: &Uaid, id: u64) {
        self.conns.remove_if(uaid, |_, h| h.id == id);
    }

    pub fn route(&self, uaid: &Uaid, message: Arc<Message>) -> RouteResult {
        let Some(handle) = self.conns.get(uaid) else {
            return RouteResult::NotConnected;
        };
        match handle.tx.try_send(message) {
            Ok(()) => RouteResult::Queued,
            Err(mpsc::error::TrySendError::Full(_)) => {
                handle.backlog.raise();
                RouteResult::Backlogged
            }
            Err(mpsc::error::TrySendError::Closed(_)) => RouteResult::NotConnected,
        }
    }

    /// Tells the user agent's connection to look in the store (a message
    /// was stored for it elsewhere); false if it is not connected here.
    pub fn wake(&self, uaid: &Uaid) -> bool {
        match self.conns.get(uaid) {
            Some(h) => {
                h.backlog.raise();
                true
            }
            None => false,
        }
    }

    /// Closes the user agent's connection `id` if it is still the one bound
    /// (a newer connection on another node took over).
    pub fn evict(&self, uaid: &Uaid, id: u64) -> bool {
        self.conns.remove_if(uaid, |_, h| h.id == id).is_some()
    }

    /// Closes the user agent's connection, whichever it is.
    pub fn disconnect(&self, uaid: &Uaid) -> bool {
        self.conns.remove(uaid).is_some()
    }

    pub fn is_connected(&self, uaid: &Uaid) -> bool {
        self.conns.contains_key(uaid)
    }

    pub fn connected(&self) -> usize {
        self.conns.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use herald_proto::urgency::Urgency;

    fn msg(seq: u64) -> Arc<Message> {
        Arc::new(Message {
            seq,
            channel: uuid::Uuid::nil(),
            expires_at: u64::MAX,
            ttl: 60,
            urgency: Urgency::Normal,
            topic: None,
            headers: None,
            data: bytes::Bytes::new(),
            receipt: false,
        })
    }

    #[tokio::test]
    async fn routes_to_the_latest_binding_and_closes_the_old() {
        let r = LocalRouter::new();
        let u = Uaid::random();
        assert_eq!(r.route(&u, msg(1)), RouteResult::NotConnected);
        let mut first = r.bind(u);
        let mut second = r.bind(u);
        assert!(
            first.rx.recv().await.is_none(),
            "old connection is told to go"
        );
        assert_eq!(r.route(&u, msg(2)), RouteResult::Queued);
        assert_eq!(second.rx.recv().await.unwrap().seq, 2);
        r.unbind(&u, first.id);
        assert!(
            r.is_connected(&u),
            "a stale unbind does not remove the new connection"
        );
        r.unbind(&u, second.id);
        assert!(!r.is_connected(&u));
    }

    #[tokio::test]
    async fn a_full_queue_raises_the_backlog_flag() {
        let r = LocalRouter::new();
        let u = Uaid::random();
        let b = r.bind(u);
        for i in 0..QUEUE as u64 {
            assert_eq!(r.route(&u, msg(i)), RouteResult::Queued);
        }
        assert_eq!(r.route(&u, msg(99)), RouteResult::Backlogged);
        tokio::time::timeout(std::time::Duration::from_secs(1), b.backlog.wait())
            .await
            .expect("backlog signalled");
    }
}
