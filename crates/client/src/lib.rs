//! A push *client*: the user agent's side of Web Push, for anything that is
//! not a browser (a desktop app, a server, a device) and wants to receive
//! pushes through Herald or any push service speaking Mozilla's websocket
//! protocol (proto-docs/websocket.md). `herald listen` is this crate as a
//! command.
//!
//! Owns: the client's connection loop and reconnection, its state file,
//! acknowledgement and deduplication, and the one HTTP/TLS client
//! construction ([`http`]) that every client in the tree uses (this one's
//! wss://; herald's `send`, `broadcast`, `demo`, broadcast source and
//! node-to-node requests; the load generator's senders). Wire formats and
//! crypto come from herald-proto.
//!
//! Must not know: storage engines (RocksDB, Redis), metrics, command lines
//! or the server's code. `make test` checks with `cargo tree` that none of
//! rocksdb, redis or prometheus is among its dependencies.
//!
//! A [`Client`] keeps its identity and keys in a state file ([`state`]):
//! the server URL, the uaid, and per named subscription the channel,
//! endpoint, P-256 key pair and auth secret. [`Client::subscribe`] returns
//! the same JSON a browser's `PushSubscription.toJSON()` gives, for any
//! application server library. [`Client::next_event`] yields decrypted
//! messages (RFC 8291 `aes128gcm` and the legacy `aesgcm`, through
//! [`herald_proto::crypto`], the same code `herald send` encrypts with) and
//! reconnects by itself with jittered exponential backoff, resuming with
//! the stored uaid so nothing stored on the server is lost.
//!
//! ```no_run
//! use herald_client::{Client, ClientOptions, Event};
//!
//! # async fn demo() -> anyhow::Result<()> {
//! let options = ClientOptions::new("/var/lib/myapp/push.json");
//! let mut client = Client::open_or_create(options, "wss://push.example.com/")?;
//! // Hand this JSON to the application server, as a web page would.
//! let subscription = client.subscribe("alerts", None).await?;
//! println!("{}", subscription.to_json());
//! loop {
//!     match client.next_event().await? {
//!         Event::Message(message) => {
//!             if let Some(text) = message.text() {
//!                 println!("{}: {text}", message.name);
//!             }
//!             client.ack(&message).await?; // or client.defer(&message) to get it again later
//!         }
//!         Event::Disconnected { reason, retry_in } => {
//!             eprintln!("{reason}; retrying in {retry_in:?}");
//!         }
//!         _ => {}
//!     }
//! }
//! # }
//! ```
//!
//! # Delivery guarantees
//!
//! Acknowledging is explicit: a message the caller never acks (or
//! [`defers`](Client::defer)) stays on the server and is delivered again on
//! the next connection. [`Client::ack`] first records the message's identity
//! in the state file (fsynced) and only then sends the ack, and every
//! incoming message is checked against those records before it is handed
//! over; a message found there is acknowledged again and not handed over.
//!
//! Crash windows: a crash after the caller handled a message but before
//! `ack` recorded it means the message is delivered, and handled, again on
//! restart (at-least-once; only the caller could close this window, by
//! making its handling idempotent); a crash after the record but before the
//! ack reached the server means the server redelivers it and the client
//! acks it silently, so a message whose ack was sent is never handed over
//! twice.
//!
//! A message's identity is a digest of its channel and encrypted body, not
//! its `version`: the encrypted body of a Web Push message starts with a
//! random 16-byte salt, so it names one send on any push service, while not
//! every service keeps a message's `version` across redeliveries (Herald
//! does). Messages without payload are recognised by `version`, exactly on
//! services like Herald whose versions are stable.

mod backoff;
mod connection;
pub mod http;
pub mod state;

pub use herald_proto::crypto::DecryptError;
pub use herald_proto::protocol::Broadcasts;
pub use state::{State, StateFile, StoredSubscription};

use anyhow::{anyhow, bail, Context};
use backoff::Backoff;
use connection::Connection;
use herald_proto::ack::AckCode;
use herald_proto::b64::{decode_b64url, encode_b64url};
use herald_proto::crypto::ReceiverKeys;
use herald_proto::protocol::{register_refusal, ClientMessage, Notification, ServerMessage, PING};
use herald_proto::subscription::{Subscription, SubscriptionKeys};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// How a [`Client`] behaves; [`ClientOptions::new`] gives the defaults.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// The state file (created on the first subscription).
    pub state_path: PathBuf,
    /// Extra PEM CA certificates to trust for `wss://`, besides the public
    /// roots.
    pub ca_file: Option<PathBuf>,
    /// Limit for connecting, the hello exchange and each request.
    pub timeout: Duration,
    /// First reconnect delay; it doubles per failure, with jitter.
    pub min_backoff: Duration,
    pub max_backoff: Duration,
    /// After [`Client::defer`], how long until the client reconnects so the
    /// server delivers unacknowledged messages again.
    pub retry_after: Duration,
    /// Idle time before the client pings the server, and how long it waits
    /// for an answer before treating the connection as dead. Herald never
    /// counts pings at least 5 s apart against its flood limit.
    pub ping_interval: Duration,
    pub ping_timeout: Duration,
}

impl ClientOptions {
    pub fn new(state_path: impl Into<PathBuf>) -> ClientOptions {
        ClientOptions {
            state_path: state_path.into(),
            ca_file: None,
            timeout: Duration::from_secs(10),
            min_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(60),
            retry_after: Duration::from_secs(30),
            ping_interval: Duration::from_secs(300),
            ping_timeout: Duration::from_secs(30),
        }
    }

    /// `$XDG_STATE_HOME/herald/listen.json`, else
    /// `~/.local/state/herald/listen.json`.
    pub fn default_state_path() -> anyhow::Result<PathBuf> {
        Ok(user_state_dir("--state FILE")?.join("listen.json"))
    }
}

/// Herald's per-user state directory: `$XDG_STATE_HOME/herald`, else
/// `~/.local/state/herald` (XDG Base Directory). `flag` names the option
/// that replaces it, for the error when neither variable is set.
pub fn user_state_dir(flag: &str) -> anyhow::Result<PathBuf> {
    let base = match std::env::var_os("XDG_STATE_HOME").filter(|v| !v.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => {
            let home = std::env::var_os("HOME")
                .filter(|v| !v.is_empty())
                .ok_or_else(|| anyhow!("neither XDG_STATE_HOME nor HOME is set; pass {flag}"))?;
            PathBuf::from(home).join(".local/state")
        }
    };
    Ok(base.join("herald"))
}

/// A subscription as `PushSubscription.toJSON()` gives it, which is what
/// application servers (and `herald send --subscription`) take.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushSubscriptionJson {
    pub endpoint: String,
    /// Always null: Herald's subscriptions do not expire on a date.
    #[serde(rename = "expirationTime")]
    pub expiration_time: Option<u64>,
    pub keys: SubscriptionKeys,
}

impl PushSubscriptionJson {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("subscription serialises")
    }

    pub fn of(stored: &StoredSubscription) -> PushSubscriptionJson {
        PushSubscriptionJson {
            endpoint: stored.endpoint.clone(),
            expiration_time: None,
            keys: SubscriptionKeys {
                p256dh: stored.p256dh.clone(),
                auth: stored.auth.clone(),
            },
        }
    }
}

impl From<PushSubscriptionJson> for Subscription {
    fn from(s: PushSubscriptionJson) -> Subscription {
        Subscription {
            endpoint: s.endpoint,
            keys: Some(s.keys),
        }
    }
}

/// One received push message, decrypted.
#[derive(Debug, Clone)]
pub struct PushMessage {
    /// The subscription's name in the state file.
    pub name: String,
    pub channel_id: String,
    /// The server's name for this delivery; what an ack refers to.
    pub version: String,
    /// Seconds the application server asked the service to keep it.
    pub ttl: Option<u64>,
    /// `aes128gcm` or `aesgcm`; None for a push without payload.
    pub encoding: Option<String>,
    /// The subscription's endpoint.
    pub endpoint: String,
    /// The plaintext (None: the push had no payload), or why it could not
    /// be decrypted.
    pub payload: Result<Option<Vec<u8>>, DecryptError>,
    dedup_key: String,
    connection: u64,
}

impl PushMessage {
    /// A message that arrived on no connection, for testing code that
    /// handles messages (as `herald listen`'s tests do). Its identity is its
    /// `version`; it belongs to no connection of any [`Client`], so
    /// deferring it does nothing.
    pub fn detached(
        name: &str,
        channel_id: &str,
        version: &str,
        endpoint: &str,
        payload: Result<Option<Vec<u8>>, DecryptError>,
    ) -> PushMessage {
        let dedup_key = dedup_key(&Notification {
            channel_id: channel_id.to_string(),
            version: version.to_string(),
            data: None,
            headers: None,
            ttl: None,
        });
        PushMessage {
            name: name.to_string(),
            channel_id: channel_id.to_string(),
            version: version.to_string(),
            ttl: None,
            encoding: None,
            endpoint: endpoint.to_string(),
            payload,
            dedup_key,
            // Generations count connections from 1.
            connection: 0,
        }
    }

    /// The plaintext; None without payload or when decryption failed.
    pub fn data(&self) -> Option<&[u8]> {
        self.payload.as_ref().ok()?.as_deref()
    }

    /// The plaintext as UTF-8, when it is.
    pub fn text(&self) -> Option<&str> {
        std::str::from_utf8(self.data()?).ok()
    }

    pub fn decrypt_error(&self) -> Option<&DecryptError> {
        self.payload.as_ref().err()
    }

    /// The code [`Client::ack`] sends: 100, or 101 when decryption failed
    /// (as Firefox does; the message cannot become readable by retrying).
    pub fn ack_code(&self) -> AckCode {
        if self.payload.is_err() {
            AckCode::DECRYPTION_ERROR
        } else {
            AckCode::DELIVERED
        }
    }

    /// What identifies this message across redeliveries (see the module
    /// documentation); recorded in the state file when acknowledged.
    pub fn dedup_key(&self) -> &str {
        &self.dedup_key
    }
}

/// What [`Client::next_event`] reports.
#[derive(Debug, Clone)]
pub enum Event {
    /// A connection is up and the server answered hello.
    Connected { uaid: String },
    /// The connection ended; the client reconnects after `retry_in`.
    Disconnected { reason: String, retry_in: Duration },
    /// A message for one of the subscriptions. Answer it with
    /// [`Client::ack`] or [`Client::defer`].
    Message(PushMessage),
    /// Broadcast versions the server announced (already stored).
    Broadcast(Broadcasts),
    /// The server no longer knew this user agent and issued a new uaid:
    /// these subscriptions are gone (their endpoints answer 410) and were
    /// removed from the state file. Subscribe again and hand the new
    /// subscriptions to the application servers.
    SubscriptionsLost { names: Vec<String>, uaid: String },
    /// A message for a channel no subscription in the state file has; it
    /// was acknowledged with code 102 so it is not redelivered.
    Dropped {
        channel_id: String,
        version: String,
        reason: String,
    },
}

/// The client. One owner drives it: `next_event`, `ack`, `subscribe` and
/// `unsubscribe` all take `&mut self` and use the same connection.
pub struct Client {
    options: ClientOptions,
    file: StateFile,
    state: State,
    /// The file version `state` was read from or written as.
    stamp: Option<state::FileStamp>,
    tls: Option<Arc<rustls::ClientConfig>>,
    conn: Option<Connection>,
    /// Counts connections, so a deferral refers to the one it came from.
    generation: u64,
    connected_at: Instant,
    last_rx: Instant,
    ping_sent: Option<Instant>,
    /// Frames read while waiting for a reply, handled by `next_event`.
    queue: VecDeque<ServerMessage>,
    events: VecDeque<Event>,
    backoff: Backoff,
    reconnect_at: Option<Instant>,
    retry_at: Option<Instant>,
    listener_lock: Option<state::FileLock>,
}

/// Why connecting failed: the network (retry later) or the state file
/// (retrying cannot help).
enum ConnectError {
    Network(anyhow::Error),
    Fatal(anyhow::Error),
}

impl Client {
    /// A client for an existing state file.
    pub fn open(options: ClientOptions) -> anyhow::Result<Client> {
        let file = StateFile::new(&options.state_path);
        let state = file.load_verified()?.ok_or_else(|| {
            anyhow!(
                "no state file at {}: subscribe first (herald listen subscribe NAME --server URL)",
                file.path().display()
            )
        })?;
        Client::with_state(options, file, state)
    }

    /// A client for `server` (`ws://`, `wss://`, or the same with `http(s)`),
    /// keeping the state file if it exists and belongs to that server. The
    /// file is written on the first change.
    pub fn open_or_create(options: ClientOptions, server: &str) -> anyhow::Result<Client> {
        let server = normalize_server_url(server)?;
        let file = StateFile::new(&options.state_path);
        let state = match file.load_verified()? {
            Some(state) if state.server != server => bail!(
                "state file {} belongs to {}, not {server}; use another --state for another server",
                file.path().display(),
                state.server
            ),
            Some(state) => state,
            None => State::new(&server),
        };
        Client::with_state(options, file, state)
    }

    fn with_state(options: ClientOptions, file: StateFile, state: State) -> anyhow::Result<Client> {
        let tls = if state.server.starts_with("wss:") || options.ca_file.is_some() {
            Some(connection::tls_config(options.ca_file.as_deref())?)
        } else {
            None
        };
        let now = Instant::now();
        Ok(Client {
            stamp: file.stamp(),
            backoff: Backoff::new(options.min_backoff, options.max_backoff),
            options,
            file,
            state,
            tls,
            conn: None,
            generation: 0,
            connected_at: now,
            last_rx: now,
            ping_sent: None,
            queue: VecDeque::new(),
            events: VecDeque::new(),
            reconnect_at: None,
            retry_at: None,
            listener_lock: None,
        })
    }

    pub fn server(&self) -> &str {
        &self.state.server
    }

    pub fn uaid(&self) -> Option<&str> {
        self.state.uaid.as_deref()
    }

    pub fn state_path(&self) -> &Path {
        self.file.path()
    }

    pub fn is_connected(&self) -> bool {
        self.conn.is_some()
    }

    /// Every subscription by name, as of the last read of the state file.
    pub fn subscriptions(&self) -> BTreeMap<String, PushSubscriptionJson> {
        self.state
            .subscriptions
            .iter()
            .map(|(name, s)| (name.clone(), PushSubscriptionJson::of(s)))
            .collect()
    }

    pub fn subscription(&self, name: &str) -> Option<PushSubscriptionJson> {
        self.state
            .subscriptions
            .get(name)
            .map(PushSubscriptionJson::of)
    }

    /// The application server key `name` is bound to, if any.
    pub fn app_server_key(&self, name: &str) -> Option<&str> {
        self.state
            .subscriptions
            .get(name)?
            .app_server_key
            .as_deref()
    }

    /// Creates subscription `name`: a new P-256 key pair and auth secret,
    /// registered with the server (bound to `app_server_key`, the
    /// application server's base64url public key, when given, so only
    /// pushes signed with that VAPID key are accepted). Subscribing an
    /// existing name with the same key returns the existing subscription.
    pub async fn subscribe(
        &mut self,
        name: &str,
        app_server_key: Option<&str>,
    ) -> anyhow::Result<PushSubscriptionJson> {
        state::validate_name(name)?;
        let key = app_server_key.map(normalize_app_server_key).transpose()?;
        self.reload()?;
        if let Some(existing) = self.state.subscriptions.get(name) {
            if existing.app_server_key == key {
                return Ok(PushSubscriptionJson::of(existing));
            }
            bail!(
                "subscription {name:?} already exists {}; unsubscribe it first to change the key",
                match &existing.app_server_key {
                    Some(k) => format!("bound to application server key {k}"),
                    None => "without an application server key".to_string(),
                }
            );
        }
        let keys = ReceiverKeys::generate();
        let channel_id = uuid::Uuid::new_v4().to_string();
        let reply = self
            .request(register_frame(&channel_id, key.as_deref()), |m| {
                matches!(m, ServerMessage::Register { channel_id: c, .. } if c.eq_ignore_ascii_case(&channel_id))
            })
            .await?;
        let ServerMessage::Register {
            status,
            push_endpoint,
            ..
        } = reply
        else {
            unreachable!("request returns what the matcher accepted");
        };
        if status != 200 {
            bail!("{}", register_refusal(status));
        }
        let endpoint = push_endpoint
            .ok_or_else(|| anyhow!("the push service's register reply has no pushEndpoint"))?;
        herald_proto::subscription::origin_of(&endpoint).with_context(|| {
            format!("the push service handed out an unusable endpoint {endpoint:?}")
        })?;
        let stored = StoredSubscription::new(channel_id, endpoint, &keys, key);
        let json = PushSubscriptionJson::of(&stored);
        let name_owned = name.to_string();
        self.save(move |s| {
            if s.subscriptions.contains_key(&name_owned) {
                bail!("subscription {name_owned:?} was created meanwhile by another process");
            }
            s.subscriptions.insert(name_owned, stored);
            Ok(())
        })?;
        Ok(json)
    }

    /// Unregisters `name` with the server (its endpoint answers 410 from
    /// then on) and forgets its keys.
    pub async fn unsubscribe(&mut self, name: &str) -> anyhow::Result<()> {
        self.reload()?;
        let channel_id = self
            .state
            .subscriptions
            .get(name)
            .map(|s| s.channel_id.clone())
            .ok_or_else(|| {
                anyhow!(
                    "no subscription named {name:?} in {}",
                    self.file.path().display()
                )
            })?;
        let reply = self
            .request(unregister_frame(&channel_id), |m| {
                matches!(m, ServerMessage::Unregister { channel_id: c, .. } if c.eq_ignore_ascii_case(&channel_id))
            })
            .await?;
        if let ServerMessage::Unregister { status, .. } = reply {
            if status != 200 {
                bail!("the push service refused to unsubscribe with status {status}");
            }
        }
        let name = name.to_string();
        self.save(move |s| {
            s.subscriptions.remove(&name);
            Ok(())
        })
    }

    /// Follows broadcasts (`ids`), beside those already followed; versions
    /// the server announces come as [`Event::Broadcast`].
    pub async fn follow_broadcasts(&mut self, ids: &[&str]) -> anyhow::Result<()> {
        let ids: Vec<String> = ids.iter().map(|s| s.to_string()).collect();
        let added = self.save(move |s| {
            let mut added = BTreeMap::new();
            for id in ids {
                if !s.broadcasts.contains_key(&id) {
                    // An empty version differs from any the server has, so
                    // the current one is announced.
                    s.broadcasts.insert(id.clone(), String::new());
                    added.insert(id, String::new());
                }
            }
            Ok(added)
        })?;
        if !added.is_empty() {
            self.send_or_drop(ClientMessage::BroadcastSubscribe { broadcasts: added }.to_json())
                .await;
        }
        Ok(())
    }

    /// The next event, connecting and reconnecting as needed. Errors are
    /// only those retrying cannot fix (the state file cannot be read or
    /// written, another client listens with it); network trouble comes as
    /// [`Event::Disconnected`] and is retried.
    pub async fn next_event(&mut self) -> anyhow::Result<Event> {
        loop {
            if let Some(event) = self.events.pop_front() {
                return Ok(event);
            }
            if self.listener_lock.is_none() {
                self.listener_lock = Some(self.file.lock_listener()?);
            }
            if self.conn.is_none() {
                if let Some(at) = self.reconnect_at {
                    // Cleared only after the wait, so a caller that drops
                    // this future mid-wait still gets the backoff next time.
                    tokio::time::sleep_until(at).await;
                    self.reconnect_at = None;
                }
                match self.connect().await {
                    Ok(uaid) => return Ok(Event::Connected { uaid }),
                    Err(ConnectError::Fatal(e)) => return Err(e),
                    Err(ConnectError::Network(e)) => return Ok(self.lost(format!("{e:#}"))),
                }
            }
            let message = match self.queue.pop_front() {
                Some(m) => m,
                None => match self.read().await {
                    Ok(Some(m)) => m,
                    Ok(None) => continue,
                    Err(event) => return Ok(event),
                },
            };
            if let Some(event) = self.handle(message).await? {
                return Ok(event);
            }
        }
    }

    /// Acknowledges a message: recorded in the state file first, then sent
    /// (code 100, or 101 for one that did not decrypt). The server deletes
    /// it. If the connection it came on is gone, the ack still goes out on
    /// the current one, and a redelivery is recognised from the record.
    pub async fn ack(&mut self, message: &PushMessage) -> anyhow::Result<()> {
        let key = message.dedup_key.clone();
        self.save(move |s| {
            s.remember_acked(&key);
            Ok(())
        })?;
        self.send_or_drop(
            ClientMessage::ack(&message.channel_id, &message.version, message.ack_code()).to_json(),
        )
        .await;
        Ok(())
    }

    /// Leaves a message unacknowledged so the server delivers it again:
    /// after [`ClientOptions::retry_after`] the client reconnects, which
    /// makes the server resend everything unacknowledged.
    pub fn defer(&mut self, message: &PushMessage) {
        if self.conn.is_some() && message.connection == self.generation {
            let at = Instant::now() + self.options.retry_after;
            self.retry_at = Some(self.retry_at.map_or(at, |t| t.min(at)));
        }
    }

    /// Closes the connection cleanly.
    pub async fn close(&mut self) {
        if let Some(conn) = self.conn.take() {
            conn.close().await;
        }
    }

    fn reload(&mut self) -> anyhow::Result<()> {
        let stamp = self.file.stamp();
        if let Some(state) = self.file.load()? {
            self.state = state;
            self.stamp = stamp;
        }
        Ok(())
    }

    /// Picks up changes other processes made (a subscription added or
    /// removed) for the price of a stat.
    fn reload_if_changed(&mut self) -> anyhow::Result<()> {
        if self.file.stamp() != self.stamp {
            self.reload()?;
        }
        Ok(())
    }

    fn save<T>(
        &mut self,
        change: impl FnOnce(&mut State) -> anyhow::Result<T>,
    ) -> anyhow::Result<T> {
        let server = self.state.server.clone();
        let (state, out, stamp) = self.file.update_stamped(
            || State::new(&server),
            |s| {
                if s.server != server {
                    bail!(
                        "state file {} now belongs to {}, not {server}",
                        self.file.path().display(),
                        s.server
                    );
                }
                change(s)
            },
        )?;
        self.state = state;
        self.stamp = stamp;
        Ok(out)
    }

    /// Connects, says hello, and brings the state file in line with the
    /// answer.
    async fn connect(&mut self) -> Result<String, ConnectError> {
        self.reload().map_err(ConnectError::Fatal)?;
        let (conn, uaid, broadcasts) = self.handshake().await.map_err(ConnectError::Network)?;
        if self.state.uaid.as_deref() != Some(uaid.as_str()) {
            let new = uaid.clone();
            let lost = self
                .save(move |s| {
                    let mut lost = Vec::new();
                    // Another process may have adopted this uaid already.
                    if s.uaid.as_deref() != Some(new.as_str()) {
                        if s.uaid.is_some() {
                            lost = s.subscriptions.keys().cloned().collect();
                            s.subscriptions.clear();
                            s.acked.clear();
                        }
                        s.uaid = Some(new);
                    }
                    Ok(lost)
                })
                .map_err(ConnectError::Fatal)?;
            if !lost.is_empty() {
                self.events.push_back(Event::SubscriptionsLost {
                    names: lost,
                    uaid: uaid.clone(),
                });
            }
        }
        if !broadcasts.is_empty() {
            self.note_broadcasts(&broadcasts)
                .map_err(ConnectError::Fatal)?;
            self.events.push_back(Event::Broadcast(broadcasts));
        }
        let now = Instant::now();
        self.conn = Some(conn);
        self.generation += 1;
        self.connected_at = now;
        self.last_rx = now;
        self.ping_sent = None;
        self.retry_at = None;
        Ok(uaid)
    }

    async fn handshake(&mut self) -> anyhow::Result<(Connection, String, Broadcasts)> {
        let timeout = self.options.timeout;
        let mut conn = connection::connect(&self.state.server, self.tls.as_ref(), timeout).await?;
        let channels: Vec<String> = self
            .state
            .subscriptions
            .values()
            .map(|s| s.channel_id.clone())
            .collect();
        let hello = ClientMessage::Hello {
            uaid: self.state.uaid.clone(),
            channel_ids: channels,
            broadcasts: self.state.broadcasts.clone(),
        };
        conn.send(hello.to_json()).await?;
        let deadline = Instant::now() + timeout;
        loop {
            let text = tokio::time::timeout_at(deadline, conn.recv())
                .await
                .map_err(|_| anyhow!("no answer to hello within {} s", timeout.as_secs_f32()))??;
            match ServerMessage::parse(&text)? {
                ServerMessage::Hello {
                    uaid,
                    status,
                    broadcasts,
                    ..
                } => {
                    if status != 200 {
                        bail!("the push service refused hello with status {status}");
                    }
                    if uaid.is_empty()
                        || uaid.len() > 128
                        || !uaid.bytes().all(|b| b.is_ascii_graphic())
                    {
                        bail!("the push service's hello reply has an unusable uaid {uaid:?}");
                    }
                    return Ok((conn, uaid, broadcasts));
                }
                ServerMessage::Ping | ServerMessage::Other(_) => continue,
                other => bail!("the push service sent {other:?} before answering hello"),
            }
        }
    }

    /// Drops a broken connection and schedules the next attempt.
    fn lost(&mut self, reason: String) -> Event {
        self.conn = None;
        self.queue.clear();
        self.retry_at = None;
        if self.connected_at.elapsed() >= Duration::from_secs(60) {
            self.backoff.reset();
        }
        // A connection that dies right away must not count as staying up.
        self.connected_at = Instant::now();
        let retry_in = self.backoff.next_delay();
        self.reconnect_at = Some(Instant::now() + retry_in);
        Event::Disconnected { reason, retry_in }
    }

    /// Reads the next frame, pinging when idle and reconnecting when a
    /// deferral is due. `Err` carries the event to report.
    async fn read(&mut self) -> Result<Option<ServerMessage>, Event> {
        enum Wake {
            Frame(anyhow::Result<String>),
            Keepalive,
            Retry,
        }
        let keepalive_at = match self.ping_sent {
            Some(sent) => sent + self.options.ping_timeout,
            None => self.last_rx + self.options.ping_interval,
        };
        let retry_at = self.retry_at;
        let conn = self.conn.as_mut().expect("connected");
        let wake = tokio::select! {
            frame = conn.recv() => Wake::Frame(frame),
            _ = tokio::time::sleep_until(keepalive_at) => Wake::Keepalive,
            _ = tokio::time::sleep_until(retry_at.unwrap_or(keepalive_at)), if retry_at.is_some() => Wake::Retry,
        };
        match wake {
            Wake::Frame(Ok(text)) => {
                self.last_rx = Instant::now();
                self.ping_sent = None;
                match ServerMessage::parse(&text) {
                    Ok(m) => Ok(Some(m)),
                    Err(e) => {
                        tracing::warn!("ignoring a frame from the push service: {e}");
                        Ok(None)
                    }
                }
            }
            Wake::Frame(Err(e)) => Err(self.lost(format!("{e:#}"))),
            Wake::Keepalive if self.ping_sent.is_some() => Err(self.lost(format!(
                "no answer to a ping within {} s",
                self.options.ping_timeout.as_secs_f32()
            ))),
            Wake::Keepalive => {
                self.ping_sent = Some(Instant::now());
                match conn.send(PING.to_string()).await {
                    Ok(()) => Ok(None),
                    Err(e) => Err(self.lost(format!("{e:#}"))),
                }
            }
            Wake::Retry => {
                if let Some(conn) = self.conn.take() {
                    conn.close().await;
                }
                self.queue.clear();
                self.retry_at = None;
                self.reconnect_at = None;
                Err(Event::Disconnected {
                    reason: "reconnecting so that deferred messages are delivered again".into(),
                    retry_in: Duration::ZERO,
                })
            }
        }
    }

    async fn handle(&mut self, message: ServerMessage) -> anyhow::Result<Option<Event>> {
        match message {
            ServerMessage::Notification(n) => self.on_notification(n).await,
            ServerMessage::Broadcast { broadcasts: b } if !b.is_empty() => {
                self.note_broadcasts(&b)?;
                Ok(Some(Event::Broadcast(b)))
            }
            // Pongs, stray replies and message types this client does not know.
            _ => Ok(None),
        }
    }

    async fn on_notification(&mut self, n: Notification) -> anyhow::Result<Option<Event>> {
        self.reload_if_changed()?;
        let Some((name, sub)) = self.state.by_channel(&n.channel_id) else {
            self.send_or_drop(
                ClientMessage::ack(&n.channel_id, &n.version, AckCode::NOT_DELIVERED).to_json(),
            )
            .await;
            return Ok(Some(Event::Dropped {
                reason: format!(
                    "no subscription in {} has channel {}",
                    self.file.path().display(),
                    n.channel_id
                ),
                channel_id: n.channel_id,
                version: n.version,
            }));
        };
        let key = dedup_key(&n);
        if self.state.was_acked(&key) {
            tracing::debug!("redelivery of an acknowledged message; acknowledging again");
            self.send_or_drop(
                ClientMessage::ack(&n.channel_id, &n.version, AckCode::DELIVERED).to_json(),
            )
            .await;
            return Ok(None);
        }
        let keys = sub
            .keys()
            .with_context(|| format!("subscription {name:?} in the state file"))?;
        let headers = n.headers.clone().unwrap_or_default();
        let payload = match &n.data {
            None => Ok(None),
            Some(data) => decode_b64url(data)
                .ok_or_else(|| DecryptError::Malformed("data is not base64url".into()))
                .and_then(|body| open_payload(&keys, &headers, body))
                .map(Some),
        };
        Ok(Some(Event::Message(PushMessage {
            name: name.clone(),
            channel_id: n.channel_id,
            version: n.version,
            ttl: n.ttl,
            encoding: n
                .data
                .as_ref()
                .map(|_| headers.encoding)
                .filter(|e| !e.is_empty()),
            endpoint: sub.endpoint.clone(),
            payload,
            dedup_key: key,
            connection: self.generation,
        })))
    }

    fn note_broadcasts(&mut self, b: &Broadcasts) -> anyhow::Result<()> {
        if b.changed.is_empty() {
            return Ok(());
        }
        let changed = b.changed.clone();
        self.save(move |s| {
            s.broadcasts.extend(changed);
            Ok(())
        })
    }

    /// Sends on the current connection, if any; a failure ends the
    /// connection and is reported by the next `next_event`.
    async fn send_or_drop(&mut self, frame: String) {
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        if let Err(e) = conn.send(frame).await {
            let event = self.lost(format!("{e:#}"));
            self.events.push_back(event);
        }
    }

    /// Sends a request and waits for the reply `is_reply` accepts,
    /// connecting first if needed; retried (on a new connection) a few
    /// times, which is safe because register and unregister are idempotent
    /// for one channel ID.
    async fn request(
        &mut self,
        frame: String,
        is_reply: impl Fn(&ServerMessage) -> bool,
    ) -> anyhow::Result<ServerMessage> {
        const ATTEMPTS: u32 = 3;
        let mut last = anyhow!("not attempted");
        for attempt in 0..ATTEMPTS {
            if attempt > 0 {
                let pause = Duration::from_millis(250 * u64::from(attempt))
                    + Duration::from_millis(rand::random::<u64>() % 250);
                tokio::time::sleep(pause).await;
            }
            if self.conn.is_none() {
                match self.connect().await {
                    Ok(_) => {}
                    Err(ConnectError::Fatal(e)) => return Err(e),
                    Err(ConnectError::Network(e)) => {
                        last = e;
                        continue;
                    }
                }
            }
            match self.exchange(&frame, &is_reply).await {
                Ok(reply) => return Ok(reply),
                Err(e) => {
                    self.conn = None;
                    self.queue.clear();
                    last = e;
                }
            }
        }
        Err(last.context(format!(
            "no answer from the push service at {} after {ATTEMPTS} attempts",
            self.state.server
        )))
    }

    async fn exchange(
        &mut self,
        frame: &str,
        is_reply: &impl Fn(&ServerMessage) -> bool,
    ) -> anyhow::Result<ServerMessage> {
        let timeout = self.options.timeout;
        let conn = self.conn.as_mut().expect("connected");
        conn.send(frame.to_string()).await?;
        let deadline = Instant::now() + timeout;
        loop {
            let text = tokio::time::timeout_at(deadline, conn.recv())
                .await
                .map_err(|_| anyhow!("no answer within {} s", timeout.as_secs_f32()))??;
            self.last_rx = Instant::now();
            let Ok(message) = ServerMessage::parse(&text) else {
                continue;
            };
            if is_reply(&message) {
                return Ok(message);
            }
            if matches!(
                message,
                ServerMessage::Notification(_) | ServerMessage::Broadcast { .. }
            ) {
                self.queue.push_back(message);
            }
        }
    }

    /// Events that arose outside [`Client::next_event`] (during `subscribe`
    /// or `unsubscribe`), for callers that never call it.
    pub fn take_events(&mut self) -> Vec<Event> {
        self.events.drain(..).collect()
    }
}

fn register_frame(channel_id: &str, key: Option<&str>) -> String {
    ClientMessage::Register {
        channel_id: channel_id.to_string(),
        key: key.map(str::to_string),
    }
    .to_json()
}

/// Firefox says 200 when it drops a subscription itself.
/// The plaintext of a payload: decrypted with the subscription's keys, or
/// as it came when its encoding is `identity`. Only the push service makes
/// those (the Matrix gateway's notifications, proto-docs/websocket.md);
/// application servers cannot send them.
fn open_payload(
    keys: &ReceiverKeys,
    headers: &herald_proto::headers::NotificationHeaders,
    body: Vec<u8>,
) -> Result<Vec<u8>, DecryptError> {
    match headers.encoding.as_str() {
        "" => Err(DecryptError::Malformed(
            "a payload without headers.encoding".into(),
        )),
        herald_proto::headers::IDENTITY => Ok(body),
        encoding => keys.decrypt(
            encoding,
            headers.encryption.as_deref(),
            headers.crypto_key.as_deref(),
            &body,
        ),
    }
}

fn unregister_frame(channel_id: &str) -> String {
    ClientMessage::Unregister {
        channel_id: channel_id.to_string(),
        code: Some(200),
    }
    .to_json()
}

/// The digest that names a message across deliveries (see the module
/// documentation).
fn dedup_key(n: &Notification) -> String {
    let mut h = Sha256::new();
    match &n.data {
        Some(data) => {
            let headers = n.headers.clone().unwrap_or_default();
            h.update(b"payload\0");
            h.update(n.channel_id.to_ascii_lowercase());
            // An absent part hashes as an empty one, as it always has, so
            // keys remembered in existing state files stay valid.
            for part in [
                headers.encoding,
                headers.encryption.unwrap_or_default(),
                headers.crypto_key.unwrap_or_default(),
            ] {
                h.update([0]);
                h.update(part);
            }
            h.update([0]);
            h.update(data.trim_end_matches('='));
        }
        None => {
            h.update(b"version\0");
            h.update(&n.version);
        }
    }
    encode_b64url(&h.finalize()[..16])
}

/// `ws://` / `wss://` URL with a path, from any of ws, wss, http, https.
pub(crate) fn normalize_server_url(url: &str) -> anyhow::Result<String> {
    let uri: ::http::Uri = url
        .trim()
        .parse()
        .map_err(|e| anyhow!("{url:?} is not a URL: {e}"))?;
    let scheme = match uri.scheme_str().map(str::to_ascii_lowercase).as_deref() {
        Some("ws") | Some("http") => "ws",
        Some("wss") | Some("https") => "wss",
        _ => bail!("{url:?} must be a ws://, wss://, http:// or https:// URL"),
    };
    let authority = uri
        .authority()
        .filter(|a| !a.host().is_empty())
        .ok_or_else(|| anyhow!("{url:?} has no host"))?;
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let path = if path.is_empty() { "/" } else { path };
    Ok(format!("{scheme}://{authority}{path}"))
}

/// An application server key as base64url without padding, checked to be
/// an uncompressed P-256 point (what `herald vapid generate` prints).
pub fn normalize_app_server_key(key: &str) -> anyhow::Result<String> {
    let raw = decode_b64url(key)
        .ok_or_else(|| anyhow!("application server key {key:?} is not base64url"))?;
    if raw.len() != 65 || raw[0] != 4 || p256::PublicKey::from_sec1_bytes(&raw).is_err() {
        bail!(
            "application server key must be a 65-byte uncompressed P-256 public key in base64url \
             (as `herald vapid generate` prints), got {} bytes",
            raw.len()
        );
    }
    Ok(encode_b64url(&raw))
}

#[cfg(test)]
mod tests {
    use super::*;
    use herald_proto::headers::NotificationHeaders;

    fn notification(data: Option<&str>, version: &str) -> Notification {
        Notification {
            channel_id: "C".into(),
            version: version.into(),
            data: data.map(str::to_owned),
            headers: data.map(|_| NotificationHeaders {
                encoding: "aes128gcm".into(),
                ..Default::default()
            }),
            ttl: Some(60),
        }
    }

    #[test]
    fn a_redelivery_keeps_its_identity_though_the_version_changes() {
        let a = dedup_key(&notification(Some("AAAA"), "v1"));
        assert_eq!(a, dedup_key(&notification(Some("AAAA="), "v2")));
        assert_ne!(a, dedup_key(&notification(Some("AAAB"), "v1")));
        let mut other_channel = notification(Some("AAAA"), "v1");
        other_channel.channel_id = "D".into();
        assert_ne!(a, dedup_key(&other_channel));
        // Without payload only the version can tell messages apart.
        assert_ne!(
            dedup_key(&notification(None, "v1")),
            dedup_key(&notification(None, "v2"))
        );
        assert_eq!(
            dedup_key(&notification(None, "v1")),
            dedup_key(&notification(None, "v1"))
        );
    }

    #[test]
    fn server_urls_are_normalised() {
        assert_eq!(
            normalize_server_url("http://127.0.0.1:8080").unwrap(),
            "ws://127.0.0.1:8080/"
        );
        assert_eq!(
            normalize_server_url("HTTPS://push.example.com/x?y=1").unwrap(),
            "wss://push.example.com/x?y=1"
        );
        assert_eq!(
            normalize_server_url("wss://[::1]:8443/").unwrap(),
            "wss://[::1]:8443/"
        );
        for bad in ["", "ftp://h/", "/relative", "ws://"] {
            assert!(normalize_server_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn app_server_keys_are_checked_and_unpadded() {
        let key = encode_b64url(ReceiverKeys::generate().public());
        assert_eq!(normalize_app_server_key(&format!("{key}=")).unwrap(), key);
        assert!(normalize_app_server_key("AAAA").is_err());
        let mut raw = decode_b64url(&key).unwrap();
        raw[64] ^= 1;
        assert!(normalize_app_server_key(&encode_b64url(&raw)).is_err());
    }

    #[test]
    fn subscription_json_is_what_browsers_give() {
        let keys = ReceiverKeys::generate();
        let stored = StoredSubscription::new("c".into(), "http://h/wpush/v1/t".into(), &keys, None);
        let json: serde_json::Value =
            serde_json::from_str(&PushSubscriptionJson::of(&stored).to_json()).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "endpoint": "http://h/wpush/v1/t",
                "expirationTime": null,
                "keys": {"p256dh": encode_b64url(keys.public()), "auth": encode_b64url(keys.auth())}
            })
        );
        let sub = Subscription::from_json(&json.to_string()).unwrap();
        assert_eq!(sub.decoded_keys().unwrap().p256dh, keys.public().to_vec());
    }

    #[test]
    fn identity_payloads_pass_through_and_others_are_decrypted() {
        let keys = ReceiverKeys::generate();
        let json = br#"{"notification":{"event_id":"$e"}}"#.to_vec();
        let identity = NotificationHeaders::identity();
        assert_eq!(open_payload(&keys, &identity, json.clone()).unwrap(), json);
        // The same bytes claimed to be encrypted are not taken as plaintext.
        let encrypted = NotificationHeaders {
            encoding: "aes128gcm".into(),
            ..Default::default()
        };
        assert!(open_payload(&keys, &encrypted, json.clone()).is_err());
        assert!(open_payload(&keys, &NotificationHeaders::default(), json).is_err());
    }

    #[test]
    fn ack_code_follows_decryption() {
        let mut m = PushMessage {
            name: "n".into(),
            channel_id: "c".into(),
            version: "v".into(),
            ttl: None,
            encoding: None,
            endpoint: "e".into(),
            payload: Ok(Some(b"hi".to_vec())),
            dedup_key: "k".into(),
            connection: 1,
        };
        assert_eq!((m.ack_code(), m.text()), (AckCode(100), Some("hi")));
        m.payload = Err(DecryptError::NotForUs);
        assert_eq!((m.ack_code(), m.data()), (AckCode(101), None));
        assert!(m.decrypt_error().is_some());
    }
}
