//! Routing between nodes that share a Redis store.
//!
//! Every node has a random id (new at each start) and announces itself in
//! the store with a heartbeat naming its `node_url`. On `hello` a node
//! compare-and-sets the user record's owner to (node, connection, time):
//! the newest connection wins, and the node it displaced is told to close
//! the old one. A node that accepts a push stores it first, then wakes the
//! owner's node with a signed request to `/_herald/node/wake` (node_auth); the
//! woken connection reads the store. A lost wake-up (the owner died, the
//! network dropped the request) therefore delays a message but never loses
//! it: the next connection of the user agent, on any node, reads the store,
//! and connected sessions re-read it every `RECHECK_INTERVAL` as well.
//! proto-docs/cluster.md explains the choice and its failure cases.

use super::local::{LocalRouter, RouteResult};
use super::node_auth::{NodeKey, ReplayWindow, Signed, MAX_NONCES};
use super::wakes::{received, NodeClient, Received, WakeUp, Wakes};
use crate::errors::ApiError;
use crate::metrics::Metrics;
use crate::store::{Claim, Directory, Message, Owner, OwnerSeen, Store, StoreResult};
use dashmap::DashMap;
use herald_client::http::node_only;
use herald_proto::ids::Uaid;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often a node renews its announcement; it counts as dead after three
/// missed renewals.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(2);
const HEARTBEAT_TTL: Duration = Duration::from_secs(6);
/// Tries of an eviction, one heartbeat apart: a peer unreachable for
/// longer than about a minute gets its connections fenced by its own
/// `reconfirm` once its heartbeat is back.
const EVICT_ATTEMPTS: u32 = 30;
/// How long a node's address is trusted from the local cache.
const NODE_URL_CACHE: Duration = Duration::from_secs(2);
/// Connected sessions re-read the store this often, so a wake-up lost on the
/// way costs at most this much delay.
pub const RECHECK_INTERVAL: Duration = Duration::from_secs(30);
/// Rounds (one per heartbeat) of waking again a user agent whose wake-up
/// was lost, before leaving it to its connection's re-read.
const REWAKE_ROUNDS: u32 = 15;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

pub const EVICT_PATH: &str = "/_herald/node/evict";
pub use super::wakes::{Wake, WireMessage, MAX_BODY as MAX_WAKES_BODY, WAKES_PATH, WAKE_PATH};

/// Close connection `conn` of `uaid`: a newer one took over elsewhere.
#[derive(Serialize, Deserialize)]
pub struct Evict {
    pub uaid: String,
    pub conn: u64,
}

/// Where a user agent is connected.
enum Holder {
    Nowhere,
    Here,
    /// On another node, which announced this URL (now or before its
    /// announcement lapsed).
    Peer(u64, String),
    /// On another node whose URL this node never learnt, and whose
    /// announcement lapsed or could not be looked up.
    Unannounced,
}

pub struct Cluster {
    node: u64,
    url: String,
    directory: Arc<dyn Directory>,
    /// Signs and sends this node's requests.
    client: NodeClient,
    /// One queue and sender task per peer node.
    wakes: Arc<Wakes>,
    /// Check other nodes' requests: one per endpoint key.
    accepted: Vec<NodeKey>,
    /// Nonces of node requests accepted lately, to refuse replays.
    replays: ReplayWindow,
    node_urls: DashMap<u64, (Option<String>, Instant)>,
    /// The URL each peer node last announced, kept after its announcement
    /// lapses (see `holder`).
    last_urls: DashMap<u64, String>,
    metrics: Arc<Metrics>,
    /// Owners of this node's connections, to release them exactly.
    owners: DashMap<(Uaid, u64), Owner>,
    /// Connections served while the store could not record their claim:
    /// nobody else knows they are here, so a later move elsewhere cannot
    /// evict them. `reconfirm` claims them again once the store answers.
    unconfirmed: DashMap<(Uaid, u64), Owner>,
}

impl Cluster {
    /// `endpoint_keys` are shared by every node: requests are signed with the
    /// first's node key and accepted with any's, so a key rotation can roll
    /// through the nodes one at a time, as it does for endpoints.
    pub fn new(
        directory: Arc<dyn Directory>,
        url: String,
        endpoint_keys: &[[u8; 32]],
        metrics: Arc<Metrics>,
    ) -> Arc<Cluster> {
        let client = NodeClient {
            client: node_only(REQUEST_TIMEOUT),
            key: NodeKey::derive(&endpoint_keys[0]),
            clock: directory.clock(),
            metrics: metrics.clone(),
            timeout: REQUEST_TIMEOUT,
        };
        Arc::new(Cluster {
            node: rand::random::<u64>() >> 1,
            url,
            directory,
            wakes: Wakes::new(client.clone()),
            client,
            accepted: endpoint_keys.iter().map(NodeKey::derive).collect(),
            replays: ReplayWindow::new(MAX_NONCES),
            node_urls: DashMap::new(),
            last_urls: DashMap::new(),
            metrics,
            owners: DashMap::new(),
            unconfirmed: DashMap::new(),
        })
    }

    pub fn node(&self) -> u64 {
        self.node
    }

    /// Renews this node's announcement forever (run as a task).
    pub async fn heartbeat_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(HEARTBEAT_INTERVAL);
        let mut lapsed = false;
        loop {
            tick.tick().await;
            match self
                .directory
                .heartbeat(self.node, &self.url, HEARTBEAT_TTL)
                .await
            {
                Ok(()) if lapsed => {
                    // While this node's announcement was out, others could
                    // not reach it to evict the user agents that moved away:
                    // claim every connection again (see `reconfirm`).
                    lapsed = false;
                    for e in self.owners.iter() {
                        self.unconfirmed.insert(*e.key(), *e.value());
                    }
                }
                Ok(()) => {}
                Err(e) => {
                    lapsed = true;
                    tracing::warn!("node heartbeat: {e}");
                }
            }
        }
    }

    /// Announces the node once, before it accepts connections.
    pub async fn announce(&self) -> crate::store::StoreResult<()> {
        self.directory
            .heartbeat(self.node, &self.url, HEARTBEAT_TTL)
            .await
    }

    /// Records connection `conn` as the user agent's; closes the connection
    /// it displaced on another node. False if a newer one already holds it.
    pub async fn claim(&self, uaid: Uaid, conn: u64) -> bool {
        let owner = Owner {
            node: self.node,
            conn,
            // In the shared clock: in its own, a node 30 s behind loses
            // every claim to a connection made on another node in the last
            // 30 s, and the user agent's old socket there stays open (found
            // by `make chaos`).
            since: self.client.clock.now_micros(),
        };
        match self.directory.claim(&uaid, &owner).await {
            Ok(Claim::Won { replaced }) => {
                self.owners.insert((uaid, conn), owner);
                if let Some(old) = replaced.filter(|o| o.node != self.node) {
                    self.evict_remote(uaid, old).await;
                }
                true
            }
            Ok(Claim::Lost { newer }) => {
                tracing::debug!(uaid = %uaid.short(), newer_node = newer.node, "a newer connection holds this user agent");
                false
            }
            Err(e) => {
                // The store is down: serve locally; the next claim fixes the
                // record, and messages wait in the store meanwhile.
                tracing::warn!("claiming a user agent: {e}");
                self.owners.insert((uaid, conn), owner);
                self.unconfirmed.insert((uaid, conn), owner);
                true
            }
        }
    }

    /// Renews the records of the user agents connected to this node, which
    /// a shared store would otherwise expire after `ua_expiry` however long
    /// they stayed connected.
    pub async fn refresh(&self, store: &dyn Store, now: u64) -> StoreResult<()> {
        let owned: Vec<(Uaid, Owner)> = self
            .owners
            .iter()
            .map(|e| (e.key().0, *e.value()))
            .collect();
        for (uaid, owner) in owned {
            if let Some(mut user) = store.get_user(&uaid).await? {
                user.last_seen = now;
                store.put_user(&uaid, &user).await?;
            }
            // Same `since`: the claim renews the record's expiry, and loses
            // only to a newer connection.
            self.directory.claim(&uaid, &owner).await?;
        }
        Ok(())
    }

    /// Claims again, with their original times, the connections whose claim
    /// the store could not take, and closes those a newer connection on
    /// another node took over meanwhile (one a user agent moved away from
    /// while this node was cut from the store would otherwise stay open,
    /// serving nothing, until the user agent closed it).
    pub async fn reconfirm(&self, local: &LocalRouter) {
        let pending: Vec<((Uaid, u64), Owner)> = self
            .unconfirmed
            .iter()
            .map(|e| (*e.key(), *e.value()))
            .collect();
        for ((uaid, conn), owner) in pending {
            if !self.owners.contains_key(&(uaid, conn)) {
                // The connection ended; `release` already forgot it.
                self.unconfirmed.remove(&(uaid, conn));
                continue;
            }
            match self.directory.claim(&uaid, &owner).await {
                Ok(Claim::Won { replaced }) => {
                    self.unconfirmed.remove(&(uaid, conn));
                    if let Some(old) = replaced.filter(|o| o.node != self.node) {
                        self.evict_remote(uaid, old).await;
                    }
                }
                Ok(Claim::Lost { newer }) => {
                    tracing::debug!(uaid = %uaid.short(), newer_node = newer.node, "closing a connection taken over while the store was unreachable");
                    self.unconfirmed.remove(&(uaid, conn));
                    self.owners.remove(&(uaid, conn));
                    local.evict(&uaid, conn);
                }
                // Still unreachable: the next round tries again.
                Err(_) => return,
            }
        }
    }

    pub async fn release(&self, uaid: &Uaid, conn: u64) {
        if let Some((_, owner)) = self.owners.remove(&(*uaid, conn)) {
            if let Err(e) = self.directory.release(uaid, &owner).await {
                tracing::debug!("releasing a user agent: {e}");
            }
        }
    }

    /// Whether any node holds a connection for `uaid` (a store error counts
    /// as no).
    pub async fn is_owned(&self, uaid: &Uaid) -> bool {
        matches!(self.directory.owner(uaid).await, Ok(Some(_)))
    }

    /// The node holding a connection for `uaid` now, with its URL (None
    /// once its heartbeat lapsed: the node is dead and the user agent
    /// offline).
    pub async fn locate(&self, uaid: &Uaid) -> StoreResult<Option<(u64, Option<String>)>> {
        let Some(owner) = self.directory.owner(uaid).await? else {
            return Ok(None);
        };
        let url = if owner.node == self.node {
            Some(self.url.clone())
        } else {
            self.node_url(owner.node).await?
        };
        Ok(Some((owner.node, url)))
    }

    /// Closes the connection of `uaid` on the node holding it, if that is
    /// another node (the operator dropped the user agent).
    pub async fn evict_owner(&self, uaid: &Uaid) -> StoreResult<bool> {
        match self.directory.owner(uaid).await? {
            Some(owner) if owner.node != self.node => {
                self.evict_remote(*uaid, owner).await;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// Where `uaid` is connected, as the store says; an error if the store
    /// did not answer.
    async fn holder(&self, uaid: &Uaid) -> StoreResult<Holder> {
        let owner = self.directory.owner(uaid).await?;
        self.holder_of(owner).await
    }

    /// Where the connection of `owner` is.
    async fn holder_of(&self, owner: Option<Owner>) -> StoreResult<Holder> {
        Ok(match owner {
            None => Holder::Nowhere,
            Some(o) if o.node == self.node => Holder::Here,
            Some(o) => match self.node_url(o.node).await {
                Ok(Some(url)) => Holder::Peer(o.node, url),
                // An announcement lapses while its node is cut from the
                // store, though the node is up and its connections are
                // served; and after the store returns it is renewed only at
                // the node's next heartbeat, up to 2 s later, which the
                // cache here can stretch by 2 s more. Node ids are new at
                // each start, so the URL a node announced is still its URL:
                // without it, `make chaos` saw the TTL-0 messages for a user
                // agent that had just connected to such a node dropped for
                // 2.4 s after the heal, though both nodes were up. A dead
                // node costs a refused request instead of a look-up.
                _ => match self.last_urls.get(&o.node) {
                    Some(url) => Holder::Peer(o.node, url.clone()),
                    None => Holder::Unannounced,
                },
            },
        })
    }

    /// Wakes the node serving `uaid`, if another live node does; `seen` is
    /// its owner as the store saw it after storing the message, if it looked
    /// (then no look-up of our own).
    pub async fn wake(&self, uaid: &Uaid, message: &Arc<Message>, seen: OwnerSeen) -> RouteResult {
        let holder = match seen {
            OwnerSeen::NotLooked => self.holder(uaid).await,
            OwnerSeen::Nobody => self.holder_of(None).await,
            OwnerSeen::Is(owner) => self.holder_of(Some(owner)).await,
        };
        let (node, url) = match holder {
            Ok(Holder::Peer(node, url)) => (node, url),
            Ok(Holder::Nowhere | Holder::Here) => return RouteResult::NotConnected,
            // Its node died (the user agent is offline), or its
            // announcement lapsed while it could not reach the store but
            // its connections stayed up (`make chaos`: a Redis primary cut
            // off held the announcements of two nodes), before this node
            // learnt its URL: `rewake` tries again until the owner changes
            // or the node is back.
            Ok(Holder::Unannounced) => {
                self.wakes.missed(*uaid);
                return RouteResult::NotConnected;
            }
            Err(e) => {
                tracing::warn!("looking up a user agent's node: {e}");
                self.wakes.missed(*uaid);
                return RouteResult::Unknown;
            }
        };
        // The push is already stored: its answer does not wait for the
        // wake-up, which goes out with the peer's next batch.
        let wake = WakeUp {
            uaid: *uaid,
            message: Some(message.clone()),
        };
        self.wakes.send(node, &url, wake);
        RouteResult::Woken
    }

    /// One round of waking again the user agents whose wake-up was lost
    /// (`Wakes::missed`), with a bare wake-up that makes their connection
    /// read the store; run every heartbeat. Without it a message whose
    /// wake-up was lost waited for the connection's own re-read, up to
    /// `RECHECK_INTERVAL`, while its user agent was online (`make chaos`
    /// saw two such messages outlive the 8 s their user agent stayed).
    pub async fn rewake(&self, local: &LocalRouter) {
        for uaid in self.wakes.to_wake_again(REWAKE_ROUNDS) {
            match self.holder(&uaid).await {
                // Connected nowhere: its next connection reads the store.
                Ok(Holder::Nowhere) => self.wakes.settled(&uaid),
                Ok(Holder::Here) => {
                    local.wake(&uaid);
                    self.wakes.settled(&uaid);
                }
                Ok(Holder::Peer(node, url)) => {
                    let wake = WakeUp {
                        uaid,
                        message: None,
                    };
                    self.wakes.send(node, &url, wake);
                }
                // No announcement (see `wake`): the next round.
                Ok(Holder::Unannounced) => {}
                // The store is still out of reach: so is every node's
                // record of it; the next round tries again.
                Err(_) => return,
            }
        }
    }

    async fn evict_remote(&self, uaid: Uaid, old: Owner) {
        let first = self.node_url(old.node).await.ok().flatten();
        let body = serde_json::to_vec(&Evict {
            uaid: uaid.to_string(),
            conn: old.conn,
        })
        .unwrap_or_default();
        let (client, directory) = (self.client.clone(), self.directory.clone());
        let wakes = self.wakes.clone();
        // Retried: a node cut from the others, or whose announcement lapsed
        // while it was cut from the store, would otherwise keep serving a
        // socket its user agent has left, with nothing to close it.
        //
        // Until it lands, the old socket still takes the pushes accepted on
        // its node, and leaves them unacknowledged in the store, where the
        // new connection would find them only at its next re-read (30 s):
        // `make chaos` saw one so for 3 s, until the user agent unregistered
        // its channel. So each round also has the new connection read the
        // store (through `rewake`, which finds the owner here), and so does
        // the eviction's success, for what the old socket held.
        tokio::spawn(async move {
            let mut url = first;
            for attempt in 0..EVICT_ATTEMPTS {
                if attempt > 0 {
                    tokio::time::sleep(HEARTBEAT_INTERVAL).await;
                    if url.is_none() {
                        url = directory.node_url(old.node).await.ok().flatten();
                    }
                }
                if let Some(u) = &url {
                    let sent = client.post(u, EVICT_PATH, "application/json", body.clone());
                    if sent.await.is_some() {
                        wakes.missed(uaid);
                        return;
                    }
                }
                wakes.missed(uaid);
            }
        });
    }

    /// The URL node `node` announced; None once its announcement lapsed.
    async fn node_url(&self, node: u64) -> StoreResult<Option<String>> {
        if let Some(cached) = self.node_urls.get(&node) {
            if cached.1.elapsed() < NODE_URL_CACHE {
                return Ok(cached.0.clone());
            }
        }
        match self.directory.node_url(node).await {
            Ok(url) => {
                if let Some(u) = &url {
                    self.last_urls.insert(node, u.clone());
                }
                self.node_urls.insert(node, (url.clone(), Instant::now()));
                Ok(url)
            }
            Err(e) => {
                tracing::warn!("looking up a node: {e}");
                Err(e)
            }
        }
    }

    /// First check of a request from another node, before its body is read:
    /// a well-formed signature header with a timestamp within the skew.
    pub fn check_header<'a>(&self, authorization: Option<&'a str>) -> Result<Signed<'a>, ApiError> {
        super::node_auth::parse(authorization, self.client.clock.now_secs())
    }

    /// Second check, with the body: the signature, then the nonce (only a
    /// verified request can take room in the replay window).
    pub fn check_request(
        &self,
        signed: &Signed<'_>,
        method: &str,
        path: &str,
        body: &[u8],
    ) -> Result<(), ApiError> {
        signed.verify(&self.accepted, method, path, body)?;
        self.replays.check(signed, self.client.clock.now_secs())
    }

    /// A wake-up from another node.
    pub fn on_wake(&self, local: &LocalRouter, wake: &Wake) -> bool {
        self.metrics.wakeups_received.inc();
        let Some(uaid) = Uaid::parse(&wake.uaid) else {
            return false;
        };
        match &wake.message {
            Some(m) => {
                let decoded = herald_proto::b64::decode_b64url(&m.value)
                    .and_then(|v| crate::store::decode_message(m.seq, &v));
                match decoded {
                    Some(message) => {
                        let message = received(message, &self.client.clock);
                        local.route(&uaid, Arc::new(message)) == RouteResult::Queued
                    }
                    None => false,
                }
            }
            None => local.wake(&uaid),
        }
    }

    /// A batch of wake-ups from another node (`WAKES_PATH`); how many
    /// reached a connection here, or None if the body is malformed.
    pub fn on_wakes(&self, local: &LocalRouter, body: &[u8]) -> Option<usize> {
        let batch = super::wakes::decode_batch(body)?;
        self.metrics.wakeups_received.inc_by(batch.len() as u64);
        let mut reached = 0;
        for r in batch {
            reached += usize::from(match r {
                Received::Look(uaid) => local.wake(&uaid),
                // Handed over as a push accepted here would be: the
                // connection sends it at once or, if busy, reads the store.
                Received::Deliver(uaid, m) => {
                    let m = received(m, &self.client.clock);
                    local.route(&uaid, Arc::new(m)) != RouteResult::NotConnected
                }
            });
        }
        Some(reached)
    }

    /// An eviction from the node that took over a user agent.
    pub fn on_evict(&self, local: &LocalRouter, evict: &Evict) -> bool {
        match Uaid::parse(&evict.uaid) {
            Some(uaid) => local.evict(&uaid, evict.conn),
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{now_micros, MemStore, StoreError};
    use std::sync::atomic::{AtomicBool, Ordering};

    /// The shared store, with its claims refused while `down` is set: a
    /// node cut from Redis.
    #[derive(Default)]
    struct Flaky {
        inner: MemStore,
        down: AtomicBool,
        /// Owner look-ups fail too.
        lookups_down: AtomicBool,
    }

    #[async_trait::async_trait]
    impl Directory for Flaky {
        async fn claim(&self, uaid: &Uaid, owner: &Owner) -> StoreResult<Claim> {
            if self.down.load(Ordering::Relaxed) {
                return Err(StoreError::Unavailable("cut".into()));
            }
            self.inner.claim(uaid, owner).await
        }
        async fn release(&self, uaid: &Uaid, owner: &Owner) -> StoreResult<()> {
            self.inner.release(uaid, owner).await
        }
        async fn owner(&self, uaid: &Uaid) -> StoreResult<Option<Owner>> {
            if self.lookups_down.load(Ordering::Relaxed) {
                return Err(StoreError::Unavailable("cut".into()));
            }
            self.inner.owner(uaid).await
        }
        async fn heartbeat(&self, node: u64, url: &str, ttl: Duration) -> StoreResult<()> {
            self.inner.heartbeat(node, url, ttl).await
        }
        async fn node_url(&self, node: u64) -> StoreResult<Option<String>> {
            self.inner.node_url(node).await
        }
        async fn share_usage(
            &self,
            node: u64,
            usage: &[u8],
            cursor: Option<&str>,
        ) -> StoreResult<(String, Vec<Vec<u8>>)> {
            self.inner.share_usage(node, usage, cursor).await
        }
    }

    /// A node on a directory that tests can cut.
    fn on_flaky() -> (Arc<Flaky>, Arc<Cluster>) {
        let dir = Arc::new(Flaky::default());
        let cluster = Cluster::new(
            dir.clone(),
            "http://127.0.0.1:1".into(),
            &[[7; 32]],
            Arc::new(Metrics::new()),
        );
        (dir, cluster)
    }

    /// A connection accepted while the store was unreachable is claimed
    /// again once it answers: kept if nobody else took the user agent,
    /// closed if a newer connection on another node did meanwhile.
    #[tokio::test]
    async fn connections_served_without_the_store_are_claimed_again() {
        let (dir, cluster) = on_flaky();
        let local = LocalRouter::new();
        let (stays, moves) = (Uaid::random(), Uaid::random());
        dir.down.store(true, Ordering::Relaxed);
        for uaid in [stays, moves] {
            let b = local.bind(uaid);
            assert!(cluster.claim(uaid, b.id).await, "served without the store");
        }
        // Still cut: nothing changes.
        cluster.reconfirm(&local).await;
        assert!(local.is_connected(&stays) && local.is_connected(&moves));
        assert_eq!(dir.inner.owner(&stays).await.unwrap(), None);

        // Meanwhile `moves` connected to another node, which could record it.
        let elsewhere = Owner {
            node: cluster.node() + 1,
            conn: 1,
            since: now_micros() + 1,
        };
        dir.inner.claim(&moves, &elsewhere).await.unwrap();
        dir.down.store(false, Ordering::Relaxed);
        cluster.reconfirm(&local).await;
        assert!(local.is_connected(&stays), "nobody else took it");
        assert_eq!(
            dir.inner.owner(&stays).await.unwrap().map(|o| o.node),
            Some(cluster.node())
        );
        assert!(!local.is_connected(&moves), "taken over: closed");
        assert_eq!(dir.inner.owner(&moves).await.unwrap(), Some(elsewhere));
        assert!(cluster.unconfirmed.is_empty());
    }

    /// A TTL-0 push must not be answered as handed over, or as dropped
    /// for want of a connection, when the store never said which it was.
    #[tokio::test]
    async fn a_user_agent_the_store_could_not_place_is_unknown() {
        let (dir, cluster) = on_flaky();
        let uaid = Uaid::random();
        let m = Arc::new(Message {
            seq: 1,
            channel: uuid::Uuid::nil(),
            expires_at: crate::store::now_secs(),
            ttl: 0,
            urgency: herald_proto::urgency::Urgency::Normal,
            topic: None,
            headers: None,
            data: bytes::Bytes::new(),
            receipt: false,
        });
        dir.lookups_down.store(true, Ordering::Relaxed);
        assert_eq!(
            cluster.wake(&uaid, &m, OwnerSeen::NotLooked).await,
            RouteResult::Unknown
        );
        // The store saw nobody as it stored the message: no look-up, so
        // none to fail.
        assert_eq!(
            cluster.wake(&uaid, &m, OwnerSeen::Nobody).await,
            RouteResult::NotConnected
        );
        dir.lookups_down.store(false, Ordering::Relaxed);
        assert_eq!(
            cluster.wake(&uaid, &m, OwnerSeen::NotLooked).await,
            RouteResult::NotConnected
        );
    }

    #[test]
    fn wake_messages_round_trip_through_json() {
        let w = Wake {
            uaid: Uaid::random().to_string(),
            message: Some(WireMessage {
                seq: 7,
                value: "AQ".into(),
            }),
        };
        let back: Wake = serde_json::from_slice(&serde_json::to_vec(&w).unwrap()).unwrap();
        assert_eq!(back.uaid, w.uaid);
        assert_eq!(back.message.unwrap().seq, 7);
        let bare: Wake = serde_json::from_str(r#"{"uaid":"x"}"#).unwrap();
        assert!(bare.message.is_none());
    }
}
