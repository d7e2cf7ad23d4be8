//! Finds the live connection of a user agent and hands it a message. On one
//! node every connection is local (`local`); when nodes share a Redis store,
//! `cluster` records which node serves each user agent and wakes that node.
//! Callers see one `Router` either way.

pub mod cluster;
mod local;
pub mod node_auth;
mod wakes;

pub use cluster::Cluster;
pub use local::{Binding, LocalRouter, RouteResult, Routed};

use crate::store::{Message, OwnerSeen};
use herald_proto::ids::Uaid;
use std::sync::Arc;

#[derive(Default)]
pub struct Router {
    pub local: LocalRouter,
    cluster: Option<Arc<Cluster>>,
}

impl Router {
    /// One node: every user agent is connected here or nowhere.
    pub fn new() -> Self {
        Self::default()
    }

    /// Several nodes sharing the directory `cluster` speaks to.
    pub fn clustered(cluster: Arc<Cluster>) -> Self {
        Router {
            local: LocalRouter::new(),
            cluster: Some(cluster),
        }
    }

    pub fn cluster(&self) -> Option<&Arc<Cluster>> {
        self.cluster.as_ref()
    }

    /// Makes this connection the user agent's only one, on this node and on
    /// every other; None if a newer connection elsewhere already holds it.
    pub async fn bind(&self, uaid: Uaid) -> Option<Binding> {
        let binding = self.local.bind(uaid);
        if let Some(cluster) = &self.cluster {
            if !cluster.claim(uaid, binding.id).await {
                self.local.unbind(&uaid, binding.id);
                return None;
            }
        }
        Some(binding)
    }

    /// Closes the connections a newer one elsewhere took over while this
    /// node could not record its own (see `Cluster::reconfirm`).
    pub async fn reconfirm(&self) {
        if let Some(cluster) = &self.cluster {
            cluster.reconfirm(&self.local).await;
        }
    }

    /// Wakes again the user agents whose wake-up was lost on the way to
    /// another node (see `Cluster::rewake`).
    pub async fn rewake(&self) {
        if let Some(cluster) = &self.cluster {
            cluster.rewake(&self.local).await;
        }
    }

    /// Forgets a connection, unless a newer one has already taken the uaid.
    pub async fn unbind(&self, uaid: &Uaid, id: u64) {
        self.local.unbind(uaid, id);
        if let Some(cluster) = &self.cluster {
            cluster.release(uaid, id).await;
        }
    }

    /// Hands a stored (or TTL-0) message to the user agent's connection,
    /// wherever it is; `owner` is where the store saw it, if it looked.
    pub async fn route(&self, uaid: &Uaid, message: Arc<Message>, owner: OwnerSeen) -> RouteResult {
        // One map lookup per push: the local attempt says whether it is here.
        let local = self.local.route(uaid, message.clone());
        match (&self.cluster, local) {
            (Some(cluster), RouteResult::NotConnected) => cluster.wake(uaid, &message, owner).await,
            _ => local,
        }
    }

    pub fn is_connected(&self, uaid: &Uaid) -> bool {
        self.local.is_connected(uaid)
    }

    /// Whether a connection for `uaid` is open on this node or, with
    /// several nodes, on any node.
    pub async fn is_connected_anywhere(&self, uaid: &Uaid) -> bool {
        if self.local.is_connected(uaid) {
            return true;
        }
        match &self.cluster {
            Some(cluster) => cluster.is_owned(uaid).await,
            None => false,
        }
    }

    /// Closes the user agent's connection, here or on the node holding
    /// it; true if one was found (a store error counts as none elsewhere).
    pub async fn disconnect(&self, uaid: &Uaid) -> bool {
        let here = self.local.disconnect(uaid);
        let there = match &self.cluster {
            Some(cluster) if !here => cluster.evict_owner(uaid).await.unwrap_or(false),
            _ => false,
        };
        here || there
    }

    pub fn connected(&self) -> usize {
        self.local.connected()
    }
}
