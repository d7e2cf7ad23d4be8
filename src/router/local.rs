//! The connections of this node: a map of uaid → connection, handing each
//! connection the messages routed to it.

use crate::store::Message;
use dashmap::DashMap;
use herald_proto::ids::Uaid;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::Notify;

/// Messages queued per connection before the router stops queueing and
/// tells the connection to read its backlog from the store instead. Keeps a
/// slow user agent from holding more than this many payloads in memory.
const QUEUE: usize = 16;

/// What the router and one connection share. One small allocation, and no
/// queue storage while nothing is queued: a tokio bounded channel plus a
/// separate backlog flag cost an idle connection about 800 bytes (the
/// channel's cache-padded halves and its first block of 32 slots, allocated
/// up front), most of what a registered connection held besides its task.
#[derive(Default)]
struct Inbox {
    queue: Mutex<VecDeque<Arc<Message>>>,
    /// Woken for a queued message, a raised backlog and a close alike: one
    /// `Notify`, so an idle connection waits on one future, not two (each
    /// wait is about 100 bytes of every connection's task). `Notify` keeps
    /// one permit when nobody is waiting, so nothing raised is missed.
    arrived: Notify,
    /// A message could not be queued: the connection must look in the
    /// store for what it missed. Repeated raises collapse into one.
    backlogged: AtomicBool,
    /// Either side went: the router forgot the connection (it sees the
    /// rest of its queue, then None) or the connection ended (routing to
    /// it says NotConnected).
    closed: AtomicBool,
}

impl Inbox {
    fn queue(&self) -> MutexGuard<'_, VecDeque<Arc<Message>>> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push(&self, message: Arc<Message>) -> RouteResult {
        if self.closed.load(Ordering::Acquire) {
            return RouteResult::NotConnected;
        }
        let mut queue = self.queue();
        if queue.len() >= QUEUE {
            drop(queue);
            self.raise_backlog();
            return RouteResult::Backlogged;
        }
        queue.push_back(message);
        drop(queue);
        self.arrived.notify_one();
        RouteResult::Queued
    }

    fn take(&self) -> Option<Arc<Message>> {
        let mut queue = self.queue();
        let message = queue.pop_front();
        if queue.is_empty() && queue.capacity() > 0 {
            // Give the storage back: most connections sit idle between
            // messages, and an idle one should not keep it.
            *queue = VecDeque::new();
        }
        message
    }

    fn raise_backlog(&self) {
        self.backlogged.store(true, Ordering::Release);
        self.arrived.notify_one();
    }

    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.arrived.notify_one();
    }
}

struct Handle {
    id: u64,
    inbox: Arc<Inbox>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.inbox.close();
    }
}

/// What a connection gets when it binds its uaid.
pub struct Binding {
    pub id: u64,
    inbox: Arc<Inbox>,
}

/// What a connection's wait on its inbox returns.
#[derive(Debug)]
pub enum Routed {
    Message(Arc<Message>),
    /// Something routed here could not be queued: read the store.
    Backlog,
    /// Another connection took over the uaid; what was queued before came
    /// first.
    Closed,
}

impl Binding {
    /// The next thing routed here. Cancel-safe: a message or a raised
    /// backlog is taken only by a call that returns it.
    pub async fn recv(&self) -> Routed {
        loop {
            if let Some(m) = self.inbox.take() {
                return Routed::Message(m);
            }
            if self.inbox.backlogged.swap(false, Ordering::AcqRel) {
                return Routed::Backlog;
            }
            if self.inbox.closed.load(Ordering::Acquire) {
                return match self.inbox.take() {
                    Some(m) => Routed::Message(m),
                    None => Routed::Closed,
                };
            }
            // A push, raise or close after the checks above left a permit.
            self.inbox.arrived.notified().await;
        }
    }
}

impl Drop for Binding {
    fn drop(&mut self) {
        self.inbox.close();
    }
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
    /// The store did not say where the user agent is connected: a stored
    /// message waits there, but a TTL-0 message cannot be placed.
    Unknown,
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
        let inbox = Arc::new(Inbox::default());
        self.conns.insert(
            uaid,
            Handle {
                id,
                inbox: inbox.clone(),
            },
        );
        Binding { id, inbox }
    }

    /// Forgets a connection, unless a newer one has already taken the uaid.
    pub fn unbind(&self, uaid: &Uaid, id: u64) {
        self.conns.remove_if(uaid, |_, h| h.id == id);
    }

    pub fn route(&self, uaid: &Uaid, message: Arc<Message>) -> RouteResult {
        match self.conns.get(uaid) {
            Some(handle) => handle.inbox.push(message),
            None => RouteResult::NotConnected,
        }
    }

    /// Tells the user agent's connection to look in the store (a message
    /// was stored for it elsewhere); false if it is not connected here.
    pub fn wake(&self, uaid: &Uaid) -> bool {
        match self.conns.get(uaid) {
            Some(h) => {
                h.inbox.raise_backlog();
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

    fn seq(routed: Routed) -> u64 {
        match routed {
            Routed::Message(m) => m.seq,
            other => panic!("expected a message, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn routes_to_the_latest_binding_and_closes_the_old() {
        let r = LocalRouter::new();
        let u = Uaid::random();
        assert_eq!(r.route(&u, msg(1)), RouteResult::NotConnected);
        let first = r.bind(u);
        let second = r.bind(u);
        assert!(
            matches!(first.recv().await, Routed::Closed),
            "old connection is told to go"
        );
        assert_eq!(r.route(&u, msg(2)), RouteResult::Queued);
        assert_eq!(seq(second.recv().await), 2);
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
        assert_eq!(r.route(&u, msg(100)), RouteResult::Backlogged);
        for i in 0..QUEUE as u64 {
            assert_eq!(seq(b.recv().await), i, "what was queued comes first");
        }
        assert!(matches!(b.recv().await, Routed::Backlog));
        assert!(r.wake(&u));
        assert!(
            matches!(b.recv().await, Routed::Backlog),
            "a wake-up is a backlog too"
        );
        let nothing_more =
            tokio::time::timeout(std::time::Duration::from_millis(50), b.recv()).await;
        assert!(nothing_more.is_err(), "raises collapse into one each");
    }

    #[tokio::test]
    async fn a_taken_over_connection_gets_its_queue_then_none() {
        let r = LocalRouter::new();
        let u = Uaid::random();
        let first = r.bind(u);
        assert_eq!(r.route(&u, msg(1)), RouteResult::Queued);
        let _second = r.bind(u);
        assert_eq!(seq(first.recv().await), 1);
        assert!(matches!(first.recv().await, Routed::Closed));
    }

    /// What the router keeps per connection, besides the map's own slack
    /// (run with --nocapture to see it).
    #[test]
    fn a_connection_costs_the_router_little() {
        let inbox = std::mem::size_of::<Inbox>() + 2 * std::mem::size_of::<usize>();
        let entry = std::mem::size_of::<(Uaid, Handle)>();
        eprintln!("bytes: inbox {inbox} (with its Arc counts), map entry {entry}");
        assert!(inbox + entry <= 256, "{inbox} + {entry}");
    }

    #[tokio::test]
    async fn an_ended_connection_is_not_routed_to() {
        let r = LocalRouter::new();
        let u = Uaid::random();
        drop(r.bind(u));
        assert_eq!(r.route(&u, msg(1)), RouteResult::NotConnected);
    }
}
