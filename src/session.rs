//! One user agent's session, as a state machine over parsed messages. It
//! never touches the socket: it returns `Action`s that `connect` carries out,
//! so every rule here is testable without a network.
//!
//! Delivery: every accepted message (TTL > 0) is in the store before the
//! router hands it to a connection, so the store is the source of truth. In
//! *storage mode* the session fills its window of unacknowledged messages by
//! scanning the store (oldest first, skipping what is in flight); once a scan
//! finds nothing more, it switches to *direct mode* and sends what the router
//! hands it. Anything it cannot send at once sends it back to storage mode.

use crate::app::App;
use crate::broadcast::{Snapshot, Subscriptions};
use crate::mailbox::Mailbox;
use crate::policy::{self, Refusal};
use crate::store::{now_secs, Message, Outcome, UserRecord};
use crate::subscription::{add_channel, endpoint_url, parse_app_server_key, Added};
use crate::token::MessageId;
use herald_proto::ack::AckCode;
use herald_proto::ids::{parse_channel_id, Uaid};
use herald_proto::protocol::{Broadcasts, ClientMessage, ServerMessage, PING};
use herald_proto::urgency::Urgency;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

/// The caller's clock, read once per event. The session never reads a clock
/// itself (as quinn-proto's `handle_timeout(now)`), so its time rules (the
/// flood budget, keepalive pace, expiry, record timestamps) can be driven
/// by a test without sleeping.
#[derive(Debug, Clone, Copy)]
pub struct Now {
    /// Monotonic: the flood budget and the keepalive pace.
    pub instant: Instant,
    /// Unix seconds: record timestamps and message expiry.
    pub unix: u64,
}

impl Now {
    /// The clocks as they read now: what `connect` passes in.
    pub fn read() -> Self {
        Now {
            instant: Instant::now(),
            unix: now_secs(),
        }
    }
}

/// What the connection must do, in order.
#[derive(Debug, PartialEq)]
pub enum Action {
    Send(String),
    /// Register this connection as the user agent's (after hello).
    Bind(Uaid),
    /// Send a close frame and end the connection.
    Close(u16, String),
}

pub mod close {
    pub const NORMAL: u16 = 1000;
    pub const GOING_AWAY: u16 = 1001;
    pub const PROTOCOL: u16 = 1002;
    pub const UNSUPPORTED: u16 = 1003;
    pub const POLICY: u16 = 1008;
    pub const TOO_BIG: u16 = 1009;
    pub const INTERNAL: u16 = 1011;
    /// Do not reconnect by itself (after a refused hello).
    pub const NO_RECONNECT: u16 = herald_proto::protocol::CLOSE_NO_RECONNECT;
}

/// Register reply statuses other than 200 (see proto-docs/websocket.md).
pub mod status {
    pub const OK: u16 = 200;
    pub const BAD_REQUEST: u16 = 400;
    /// `register` without a key under `require_vapid_key`.
    pub const KEY_REQUIRED: u16 = herald_proto::protocol::REGISTER_KEY_REQUIRED;
    /// `hello` without a valid token under `user_agent_tokens`.
    pub const TOKEN_REFUSED: u16 = herald_proto::protocol::HELLO_TOKEN_REFUSED;
    pub const KEY_CONFLICT: u16 = 409;
    pub const TOO_MANY_CHANNELS: u16 = 429;
    pub const INTERNAL: u16 = 500;
}

/// One message an ack or nack frame settles.
struct Settle {
    seq: u64,
    receipt: bool,
    code: Option<AckCode>,
}

#[derive(Default)]
struct AckPlan {
    settle: Vec<Settle>,
    unsolicited: usize,
}

#[derive(Clone, Copy)]
struct InFlight {
    seq: u64,
    /// Its application server asked for a receipt.
    receipt: bool,
}

/// What an ack or nack says about a message, for its receipt. Firefox
/// acks a notification its service worker handled with code 100 (or none);
/// any other code, 101 (decryption failed) and 102 (handler failed) among
/// them, is a refusal, as is every nack.
fn ack_outcome(nack: bool, code: Option<AckCode>) -> Outcome {
    match (nack, code) {
        (true, c) => Outcome::Rejected(c.map_or(0, AckCode::receipt_code)),
        (false, None) | (false, Some(AckCode::DELIVERED)) => Outcome::Delivered,
        (false, Some(c)) => Outcome::Rejected(c.receipt_code()),
    }
}

/// Token bucket: `rate` per second, bursts of twice that.
struct RateLimit {
    tokens: f32,
    last: Instant,
}

/// A ping this long after the last one is keepalive, not flooding. Firefox
/// pings every 30 minutes, and sooner only when it suspects the network.
const FREE_PING_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

pub struct Session {
    app: Arc<App>,
    uaid: Option<Uaid>,
    /// The user agent has a user record. One that said hello without a
    /// uaid gets its record with its first subscription: an anonymous
    /// hello must cost the store nothing.
    persisted: bool,
    in_flight: Vec<InFlight>,
    storage_mode: bool,
    /// Highest sequence number any scan has seen; a routed message at or
    /// below it may already have been sent by a scan.
    max_scanned: u64,
    min_urgency: Urgency,
    rate: RateLimit,
    last_free_ping: Option<Instant>,
    /// The last read of the store failed: read again on the retry timer.
    read_failed: bool,
    /// Answered here, but their deletion failed and is being retried
    /// (`Mailbox::delete_later`): scans skip them, so this connection is not
    /// sent again what its user agent already answered. A scan that reads
    /// the whole queue drops those no longer stored. Boxed, as `broadcasts`:
    /// almost every connection has none, and a bare Vec would cost each
    /// 16 bytes more (connect's size test).
    #[allow(clippy::box_collection)]
    undeleted: Option<Box<Vec<u64>>>,
    /// Broadcasts this user agent follows; boxed so the many connections
    /// that follow none pay one pointer.
    broadcasts: Option<Box<Subscriptions>>,
}

impl Session {
    /// `now`: when the connection opened (the flood budget starts full).
    pub fn new(app: Arc<App>, now: Instant) -> Self {
        let burst = app.settings.client_rate_limit as f32 * 2.0;
        Session {
            app,
            uaid: None,
            persisted: false,
            in_flight: Vec::new(),
            storage_mode: true,
            max_scanned: 0,
            min_urgency: Urgency::VeryLow,
            rate: RateLimit {
                tokens: burst,
                last: now,
            },
            last_free_ping: None,
            read_failed: false,
            undeleted: None,
            broadcasts: None,
        }
    }

    pub fn uaid(&self) -> Option<Uaid> {
        self.uaid
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// The serial of the broadcast snapshot this session last compared
    /// against, once it follows any broadcast.
    pub fn broadcast_serial(&self) -> Option<u64> {
        self.broadcasts
            .as_ref()
            .filter(|b| !b.is_empty())
            .map(|b| b.seen())
    }

    /// Broadcast versions changed: tell the user agent what it follows.
    pub fn on_broadcast(&mut self, snapshot: &Snapshot, out: &mut Vec<Action>) {
        if let Some(subs) = self.broadcasts.as_mut() {
            let delta = subs.on_change(snapshot);
            self.send_broadcasts(delta, out);
        }
    }

    fn send_broadcasts(&self, delta: Broadcasts, out: &mut Vec<Action>) {
        if delta.is_empty() {
            return;
        }
        self.app.metrics.broadcast_frames.inc();
        out.push(Action::Send(
            ServerMessage::Broadcast { broadcasts: delta }.to_json(),
        ));
    }

    /// Whether stored messages may be waiting that no event will announce
    /// (the last store read failed).
    pub fn needs_retry(&self) -> bool {
        self.read_failed
    }

    /// Charges `n` unsolicited messages to the flood limit; false once the
    /// budget is spent.
    fn allow(&mut self, n: usize, now: Instant) -> bool {
        if n == 0 {
            return true;
        }
        let rate = self.app.settings.client_rate_limit as f32;
        let elapsed = now.duration_since(self.rate.last).as_secs_f32();
        self.rate.last = now;
        self.rate.tokens = (self.rate.tokens + elapsed * rate).min(rate * 2.0);
        if self.rate.tokens >= n as f32 {
            self.rate.tokens -= n as f32;
            true
        } else {
            self.rate.tokens = 0.0;
            false
        }
    }

    fn flood_close(&self, out: &mut Vec<Action>) {
        out.push(Action::Close(
            close::POLICY,
            format!(
                "rate limit: more than {} messages per second",
                self.app.settings.client_rate_limit
            ),
        ));
    }

    /// How much of a message the flood limit counts before it is handled.
    /// Only what the user agent says unprompted counts: acks and nacks answer
    /// what Herald sent (they are charged once their versions are sorted,
    /// still before the store, and only for versions that were not in
    /// flight), and a ping at keepalive pace is free.
    fn upfront_charge(&mut self, msg: &ClientMessage, now: Instant) -> usize {
        match msg {
            ClientMessage::Ack { .. } | ClientMessage::Nack { .. } => 0,
            ClientMessage::Ping => match self.last_free_ping {
                Some(t) if now.duration_since(t) < FREE_PING_INTERVAL => 1,
                _ => {
                    self.last_free_ping = Some(now);
                    0
                }
            },
            _ => 1,
        }
    }

    /// A text frame from the user agent.
    pub async fn on_text(&mut self, text: &str, now: Now, out: &mut Vec<Action>) {
        let msg = match ClientMessage::parse(text) {
            Ok(m) => m,
            // Closes at once, so garbage cannot flood.
            Err(e) => {
                out.push(Action::Close(close::PROTOCOL, truncate(e.0)));
                return;
            }
        };
        let charge = self.upfront_charge(&msg, now.instant);
        if !self.allow(charge, now.instant) {
            self.flood_close(out);
            return;
        }
        let (msg, uaid) = match (msg, self.uaid) {
            (
                ClientMessage::Hello {
                    uaid,
                    broadcasts,
                    token,
                    ..
                },
                None,
            ) => {
                if let Err(refusal) = policy::admit_user_agent(&self.app.settings, token.as_deref())
                {
                    return self.refuse_hello(refusal, out);
                }
                return self.hello(uaid, broadcasts, now.unix, out).await;
            }
            (ClientMessage::Hello { .. }, Some(_)) => {
                out.push(Action::Close(
                    close::PROTOCOL,
                    "hello was already sent".into(),
                ));
                return;
            }
            (_, None) => {
                out.push(Action::Close(
                    close::PROTOCOL,
                    "the first message must be hello".into(),
                ));
                return;
            }
            (msg, Some(u)) => (msg, u),
        };
        match msg {
            ClientMessage::Hello { .. } => unreachable!("handled above"),
            ClientMessage::Register { channel_id, key } => {
                self.register(uaid, &channel_id, key.as_deref(), now.unix, out)
                    .await
            }
            ClientMessage::Unregister { channel_id, .. } => {
                self.unregister(uaid, &channel_id, out).await
            }
            ClientMessage::Ack { updates } => {
                // A frame's updates are counted, deduplicated and charged to
                // the flood limit before any of them reaches the store, so
                // one frame costs at most `delivery_window` store steps.
                let window = self.app.settings.delivery_window;
                if updates.len() > window {
                    out.push(Action::Close(
                        close::POLICY,
                        format!("an ack may carry at most {window} updates"),
                    ));
                    return;
                }
                let plan =
                    self.plan_acks(uaid, updates.iter().map(|u| (u.version.as_str(), u.code)));
                // An empty ack answers nothing.
                let unsolicited = if updates.is_empty() {
                    1
                } else {
                    plan.unsolicited
                };
                if !self.allow(unsolicited, now.instant) {
                    self.flood_close(out);
                    return;
                }
                self.acknowledge(uaid, plan.settle, false).await;
            }
            ClientMessage::Nack { version, code } => {
                let plan = self.plan_acks(uaid, std::iter::once((version.as_str(), code)));
                if !self.allow(plan.unsolicited, now.instant) {
                    self.flood_close(out);
                    return;
                }
                self.acknowledge(uaid, plan.settle, true).await;
            }
            ClientMessage::Urgency { min } => {
                if min < self.min_urgency {
                    // Messages held back by the old threshold are in the store.
                    self.storage_mode = true;
                }
                self.min_urgency = min;
                out.push(Action::Send(
                    ServerMessage::Urgency { status: status::OK }.to_json(),
                ));
            }
            ClientMessage::BroadcastSubscribe { broadcasts } => {
                let snapshot = self.app.broadcaster.current();
                let delta = self
                    .broadcasts
                    .get_or_insert_with(Default::default)
                    .subscribe(&snapshot, broadcasts);
                self.send_broadcasts(delta, out);
            }
            ClientMessage::Ping => out.push(Action::Send(PING.into())),
        }
    }

    /// A user agent private mode does not admit: told why in a hello reply
    /// without a uaid, then closed with the code that tells it not to
    /// reconnect by itself. Nothing was looked up or stored for it.
    fn refuse_hello(&self, refusal: Refusal, out: &mut Vec<Action>) {
        let metrics = &self.app.metrics;
        metrics
            .policy_refusals
            .with_label_values(&[refusal.as_str()])
            .inc();
        metrics.ws_hello.with_label_values(&["rejected"]).inc();
        out.push(Action::Send(
            ServerMessage::Hello {
                uaid: String::new(),
                status: status::TOKEN_REFUSED,
                use_webpush: true,
                broadcasts: Broadcasts::default(),
            }
            .to_json(),
        ));
        out.push(Action::Close(
            close::NO_RECONNECT,
            "this push service needs a user agent token in hello".into(),
        ));
    }

    async fn hello(
        &mut self,
        sent: Option<String>,
        client_broadcasts: BTreeMap<String, String>,
        now: u64,
        out: &mut Vec<Action>,
    ) {
        let app = &self.app;
        let expiry = app.settings.ua_expiry.as_secs();
        let mut known = None;
        let mut live = None;
        if let Some(u) = sent.as_deref().and_then(Uaid::parse) {
            match app.metrics.time("get_user", app.store.get_user(&u)).await {
                Ok(Some(rec)) if rec.last_seen + expiry > now => known = Some((u, rec)),
                Ok(Some(_)) => {
                    // Silent too long: its subscriptions are dead; start over.
                    if let Err(e) = Mailbox::of(app).drop_user_agent(&u).await {
                        tracing::warn!("dropping expired user agent: {e}");
                    }
                }
                // Not stored yet, but connected right now (a second client
                // of the same user agent, before its first subscription):
                // the same uaid, still unstored.
                Ok(None) if app.router.is_connected_anywhere(&u).await => live = Some(u),
                Ok(None) => {}
                Err(e) => {
                    tracing::error!("hello: {e}");
                    app.metrics.ws_hello.with_label_values(&["rejected"]).inc();
                    out.push(Action::Close(close::INTERNAL, "storage unavailable".into()));
                    return;
                }
            }
        }
        // A known user agent's record is refreshed (its expiry restarts);
        // a new one is only remembered once it subscribes (`register`).
        // An unknown or expired uaid gets a fresh one: it has no
        // subscriptions left for the user agent to lose. One that is
        // connected elsewhere keeps its uaid, so two clients sharing it
        // (`herald listen run` and `subscribe`) meet on one user agent.
        let (uaid, outcome) = match known {
            Some((u, rec)) => {
                let record = UserRecord {
                    created: rec.created,
                    last_seen: now,
                    router: None,
                };
                if let Err(e) = app
                    .metrics
                    .time("put_user", app.store.put_user(&u, &record))
                    .await
                {
                    tracing::error!("hello: {e}");
                    app.metrics.ws_hello.with_label_values(&["rejected"]).inc();
                    out.push(Action::Close(close::INTERNAL, "storage unavailable".into()));
                    return;
                }
                self.persisted = true;
                (u, "existing")
            }
            None => match live {
                Some(u) => (u, "existing"),
                None => (Uaid::random(), "new"),
            },
        };
        app.metrics.ws_hello.with_label_values(&[outcome]).inc();
        tracing::debug!(uaid = %uaid.short(), outcome, "hello");
        self.uaid = Some(uaid);
        let broadcasts = if client_broadcasts.is_empty() {
            Broadcasts::default()
        } else {
            let snapshot = self.app.broadcaster.current();
            self.broadcasts
                .get_or_insert_with(Default::default)
                .subscribe(&snapshot, client_broadcasts)
        };
        out.push(Action::Send(
            ServerMessage::Hello {
                uaid: uaid.to_string(),
                status: status::OK,
                use_webpush: true,
                broadcasts,
            }
            .to_json(),
        ));
        out.push(Action::Bind(uaid));
    }

    async fn register(
        &mut self,
        uaid: Uaid,
        channel_id: &str,
        key: Option<&str>,
        now: u64,
        out: &mut Vec<Action>,
    ) {
        let app = &self.app;
        let reply = |status: u16, push_endpoint: Option<String>| {
            let outcome = if status == status::OK { "ok" } else { "error" };
            app.metrics.ws_register.with_label_values(&[outcome]).inc();
            Action::Send(
                ServerMessage::Register {
                    channel_id: channel_id.to_string(),
                    status,
                    push_endpoint,
                }
                .to_json(),
            )
        };
        let Some(channel) = parse_channel_id(channel_id) else {
            out.push(reply(status::BAD_REQUEST, None));
            return;
        };
        if let Err(refusal) = policy::admit_subscription(&app.settings, key.is_some()) {
            app.metrics
                .policy_refusals
                .with_label_values(&[refusal.as_str()])
                .inc();
            out.push(reply(status::KEY_REQUIRED, None));
            return;
        }
        let key_hash = match key {
            None => None,
            Some(k) => match parse_app_server_key(k) {
                Some(hash) => Some(hash),
                None => {
                    out.push(reply(status::BAD_REQUEST, None));
                    return;
                }
            },
        };
        // The first subscription of a user agent that said hello without a
        // uaid: now it is worth a record.
        let user = (!self.persisted).then_some(UserRecord {
            created: now,
            last_seen: now,
            router: None,
        });
        match add_channel(app, &uaid, &channel, key_hash, now, user.as_ref()).await {
            Ok(Added::Subscribed) => {
                self.persisted = true;
                let endpoint = endpoint_url(app, uaid, channel, key_hash);
                out.push(reply(status::OK, Some(endpoint)));
            }
            Ok(Added::KeyConflict) => out.push(reply(status::KEY_CONFLICT, None)),
            Ok(Added::TooMany(_)) => out.push(reply(status::TOO_MANY_CHANNELS, None)),
            Err(e) => {
                tracing::error!("register: {e}");
                out.push(reply(status::INTERNAL, None));
            }
        }
    }

    async fn unregister(&mut self, uaid: Uaid, channel_id: &str, out: &mut Vec<Action>) {
        let app = &self.app;
        let status = match parse_channel_id(channel_id) {
            None => status::BAD_REQUEST,
            Some(channel) => match app
                .metrics
                .time(
                    "remove_channel",
                    Mailbox::of(app).unsubscribe(&uaid, &channel),
                )
                .await
            {
                Ok(_) => status::OK,
                Err(e) => {
                    tracing::error!("unregister: {e}");
                    status::INTERNAL
                }
            },
        };
        let outcome = if status == status::OK { "ok" } else { "error" };
        app.metrics
            .ws_unregister
            .with_label_values(&[outcome])
            .inc();
        out.push(Action::Send(
            ServerMessage::Unregister {
                channel_id: channel_id.to_string(),
                status,
            }
            .to_json(),
        ));
    }

    /// Sorts the versions of an ack or nack frame, touching nothing but this
    /// session: which messages to settle (each once, however often the
    /// frame names it) and how many versions were not in flight on this
    /// connection (unknown, foreign, repeated or answered before): those
    /// are what the flood limit counts.
    fn plan_acks<'a>(
        &mut self,
        uaid: Uaid,
        versions: impl Iterator<Item = (&'a str, Option<AckCode>)>,
    ) -> AckPlan {
        let mut plan = AckPlan::default();
        for (version, code) in versions {
            let Some(id) = self.app.tokens.open_message_id(version) else {
                tracing::debug!("ack for an unknown version");
                plan.unsolicited += 1;
                continue;
            };
            if id.uaid != uaid || plan.settle.iter().any(|a| a.seq == id.seq) {
                plan.unsolicited += 1;
                continue;
            }
            // Sent on an earlier connection, or acknowledged twice: still
            // honoured, but not an answer to this connection; and whether
            // it wants a receipt only the ledger knows.
            let receipt = match self.in_flight.iter().position(|f| f.seq == id.seq) {
                Some(i) => self.in_flight.swap_remove(i).receipt,
                None => {
                    plan.unsolicited += 1;
                    true
                }
            };
            plan.settle.push(Settle {
                seq: id.seq,
                receipt,
                code,
            });
        }
        plan
    }

    /// An ack deletes the message; so does a nack (the user agent could not
    /// handle it, and resending would fail the same way). Either decides
    /// the message's receipt, when one was asked for.
    async fn acknowledge(&mut self, uaid: Uaid, settle: Vec<Settle>, nack: bool) {
        let app = self.app.clone();
        for Settle { seq, receipt, code } in settle {
            let outcome = receipt.then(|| ack_outcome(nack, code));
            if let Err(e) = Mailbox::of(&app).acknowledge(&uaid, seq, outcome).await {
                tracing::warn!("ack: deleting the message failed, retrying: {e}");
                Mailbox::delete_later(app.clone(), uaid, seq);
                self.remember_undeleted(seq);
            }
            if nack {
                app.metrics.messages_nacked.inc();
            } else {
                app.metrics.messages_acked.inc();
            }
        }
    }

    /// Keeps at most a window's worth: past that (the store failing every
    /// deletion), the oldest may be sent again, which the user agent
    /// answers again.
    fn remember_undeleted(&mut self, seq: u64) {
        let window = self.app.settings.delivery_window;
        let list = self.undeleted.get_or_insert_with(Default::default);
        if list.len() >= window {
            list.remove(0);
        }
        list.push(seq);
    }

    fn is_undeleted(&self, seq: u64) -> bool {
        self.undeleted.as_ref().is_some_and(|l| l.contains(&seq))
    }

    /// A TTL-0 message this connection could not take at once.
    fn dropped_ttl0(&self) {
        self.app
            .metrics
            .messages_dropped
            .with_label_values(&["ttl0_offline"])
            .inc();
    }

    /// The router handed this connection a message.
    pub fn on_routed(&mut self, m: &Message, now: Now, out: &mut Vec<Action>) {
        let stored = m.ttl > 0;
        // A TTL-0 message "expires" the instant it is accepted; it is
        // handed over within its moment or never, as its receipt says.
        if self.uaid.is_none() || (stored && m.expired(now.unix)) {
            return;
        }
        if m.too_late(now.unix) {
            self.dropped_ttl0();
            return;
        }
        // Already sent here and not yet answered (a scan found it, or the
        // router handed it over twice): a second frame would reach the
        // user agent as a duplicate it must sort out itself.
        if self.in_flight.iter().any(|f| f.seq == m.seq) {
            return;
        }
        let room = self.in_flight.len() < self.app.settings.delivery_window;
        if !stored {
            // TTL 0: now or never; the store never saw it.
            if room && m.urgency >= self.min_urgency {
                self.deliver(m, out);
            } else {
                self.dropped_ttl0();
            }
            return;
        }
        if self.storage_mode || m.urgency < self.min_urgency {
            // The next scan finds it (or the threshold holds it back).
            return;
        }
        if m.seq <= self.max_scanned || !room {
            self.storage_mode = true;
            return;
        }
        self.deliver(m, out);
    }

    /// The router could not queue a message: it is waiting in the store.
    pub fn on_backlog(&mut self) {
        self.storage_mode = true;
    }

    /// Called after every event: fills the delivery window from the store
    /// while in storage mode.
    pub async fn pump(&mut self, out: &mut Vec<Action>) {
        let Some(uaid) = self.uaid else { return };
        let window = self.app.settings.delivery_window;
        while self.storage_mode && self.in_flight.len() < window {
            let (batch, complete) = match self.scan(uaid, window - self.in_flight.len()).await {
                Ok(found) => found,
                Err(e) => {
                    // The connection stays up; the messages wait in the
                    // store and the retry timer reads again.
                    tracing::warn!("reading stored messages: {e}");
                    self.read_failed = true;
                    return;
                }
            };
            self.read_failed = false;
            for m in &batch {
                self.deliver(m, out);
            }
            if complete {
                self.storage_mode = false;
            }
        }
    }

    /// Up to `room` stored messages to send, oldest first, skipping those in
    /// flight or below the urgency threshold; `complete` when nothing else
    /// is waiting.
    async fn scan(
        &mut self,
        uaid: Uaid,
        room: usize,
    ) -> crate::store::StoreResult<(Vec<Message>, bool)> {
        let app = self.app.clone();
        // One page usually covers what is in flight plus the room to fill.
        let page = room + self.in_flight.len();
        let mut batch = Vec::new();
        let mut after = 0;
        let mut still_stored = Vec::new();
        loop {
            let found = app
                .metrics
                .time("read_messages", app.store.read_messages(&uaid, after, page))
                .await?;
            let end = found.len() < page;
            for m in found {
                after = m.seq;
                self.max_scanned = self.max_scanned.max(m.seq);
                if self.is_undeleted(m.seq) {
                    still_stored.push(m.seq);
                    continue;
                }
                if m.urgency < self.min_urgency || self.in_flight.iter().any(|f| f.seq == m.seq) {
                    continue;
                }
                if batch.len() == room {
                    return Ok((batch, false));
                }
                batch.push(m);
            }
            if end {
                if let Some(list) = self.undeleted.as_mut() {
                    list.retain(|s| still_stored.contains(s));
                }
                if self.undeleted.as_ref().is_some_and(|l| l.is_empty()) {
                    self.undeleted = None;
                }
                return Ok((batch, true));
            }
        }
    }

    fn deliver(&mut self, m: &Message, out: &mut Vec<Action>) {
        let Some(uaid) = self.uaid else { return };
        let version = self.app.tokens.message_id(&MessageId {
            uaid,
            channel: m.channel,
            seq: m.seq,
        });
        let data = match (&m.headers, m.data.is_empty()) {
            (Some(h), false) => Some((&m.data[..], h)),
            _ => None,
        };
        let frame = herald_proto::protocol::notification_json(&m.channel, &version, data, m.ttl);
        self.in_flight.push(InFlight {
            seq: m.seq,
            receipt: m.receipt,
        });
        Mailbox::of(&self.app).delivered(uaid, m);
        self.app.metrics.messages_delivered.inc();
        out.push(Action::Send(frame));
    }
}

fn truncate(mut s: String) -> String {
    // Close-frame reasons must fit in 123 bytes.
    if s.len() > 120 {
        let mut cut = 120;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ServeArgs, Settings};
    use crate::metrics::Metrics;
    use crate::store::MemStore;
    use crate::token::TokenCodec;
    use bytes::Bytes;
    use serde_json::Value;
    use std::sync::OnceLock;
    use std::time::Duration;

    /// The tests' clock: `at(d)` is `d` after a fixed start, so time only
    /// moves when a test says so.
    fn at(d: Duration) -> Now {
        static START: OnceLock<Now> = OnceLock::new();
        let start = START.get_or_init(Now::read);
        Now {
            instant: start.instant + d,
            unix: start.unix + d.as_secs(),
        }
    }

    fn t0() -> Now {
        at(Duration::ZERO)
    }

    fn secs(s: f32) -> Now {
        at(Duration::from_secs_f32(s))
    }

    fn session(app: Arc<App>) -> Session {
        Session::new(app, t0().instant)
    }

    fn app(env: &[(&str, &str)]) -> Arc<App> {
        app_on(env, Arc::new(MemStore::new()))
    }

    fn app_on(env: &[(&str, &str)], store: Arc<MemStore>) -> Arc<App> {
        let env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let settings = Settings::load(&ServeArgs::default(), &env).unwrap();
        Arc::new(App::new(
            settings,
            store.clone(),
            store,
            TokenCodec::new(&[[5u8; 32]]).unwrap(),
            Arc::new(Metrics::new()),
        ))
    }

    fn sent(actions: &[Action]) -> Vec<Value> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Send(t) => Some(serde_json::from_str(t).unwrap()),
                _ => None,
            })
            .collect()
    }

    async fn step(s: &mut Session, text: &str) -> Vec<Action> {
        step_at(s, text, t0()).await
    }

    async fn step_at(s: &mut Session, text: &str, now: Now) -> Vec<Action> {
        let mut out = vec![];
        s.on_text(text, now, &mut out).await;
        s.pump(&mut out).await;
        out
    }

    async fn hello(s: &mut Session, uaid: Option<&str>) -> String {
        let msg = match uaid {
            Some(u) => format!(r#"{{"messageType":"hello","uaid":"{u}"}}"#),
            None => r#"{"messageType":"hello"}"#.to_string(),
        };
        let out = step(s, &msg).await;
        assert!(matches!(out.last(), Some(Action::Bind(_))), "{out:?}");
        sent(&out)[0]["uaid"].as_str().unwrap().to_string()
    }

    fn message(app: &App, ttl: u64, urgency: Urgency) -> Message {
        Message {
            seq: app.store.next_seq(),
            channel: uuid::Uuid::new_v4(),
            expires_at: t0().unix + ttl,
            ttl,
            urgency,
            topic: None,
            headers: None,
            data: Bytes::new(),
            receipt: false,
        }
    }

    #[tokio::test]
    async fn first_message_must_be_hello() {
        let mut s = session(app(&[]));
        let out = step(&mut s, r#"{"messageType":"register","channelID":"x"}"#).await;
        assert!(matches!(&out[..], [Action::Close(close::PROTOCOL, _)]));
    }

    const UA_TOKEN: &str = "a-user-agent-token-0123456789";

    fn refusals(a: &App, reason: &str) -> u64 {
        a.metrics.policy_refusals.with_label_values(&[reason]).get()
    }

    #[tokio::test]
    async fn private_mode_refuses_a_hello_without_the_token_and_keeps_nothing() {
        let a = app(&[("HERALD_USER_AGENT_TOKENS", UA_TOKEN)]);
        for hello in [
            r#"{"messageType":"hello","use_webpush":true,"broadcasts":{}}"#.to_string(),
            format!(r#"{{"messageType":"hello","token":"{UA_TOKEN}x"}}"#),
            r#"{"messageType":"hello","uaid":"0123456789abcdef0123456789abcdef"}"#.to_string(),
        ] {
            let mut s = session(a.clone());
            let out = step(&mut s, &hello).await;
            assert_eq!(
                sent(&out),
                vec![
                    serde_json::json!({"messageType":"hello","uaid":"","status":401,"use_webpush":true,"broadcasts":{}})
                ],
                "{hello}"
            );
            assert!(
                matches!(out.last(), Some(Action::Close(close::NO_RECONNECT, r)) if r.contains("token")),
                "{out:?}"
            );
            assert!(!out.iter().any(|a| matches!(a, Action::Bind(_))));
            assert_eq!(s.uaid(), None, "no user agent behind a refused hello");
        }
        assert_eq!(refusals(&a, "user_agent_token"), 3);

        // The right token: an ordinary hello.
        let mut s = session(a.clone());
        let out = step(
            &mut s,
            &format!(r#"{{"messageType":"hello","token":"{UA_TOKEN}"}}"#),
        )
        .await;
        assert_eq!(sent(&out)[0]["status"], 200);
        assert!(matches!(out.last(), Some(Action::Bind(_))));
        assert_eq!(refusals(&a, "user_agent_token"), 3);
    }

    #[tokio::test]
    async fn without_private_mode_a_token_is_ignored() {
        let a = app(&[]);
        let mut s = session(a.clone());
        let out = step(&mut s, r#"{"messageType":"hello","token":"whatever"}"#).await;
        assert_eq!(sent(&out)[0]["status"], 200);
        assert_eq!(refusals(&a, "user_agent_token"), 0);
    }

    #[tokio::test]
    async fn require_vapid_key_refuses_a_register_without_key_and_stores_nothing() {
        let a = app(&[("HERALD_REQUIRE_VAPID_KEY", "true")]);
        let mut s = session(a.clone());
        let uaid = Uaid::parse(&hello(&mut s, None).await).unwrap();
        let ch = uuid::Uuid::new_v4();
        let out = step(
            &mut s,
            &format!(r#"{{"messageType":"register","channelID":"{ch}"}}"#),
        )
        .await;
        assert_eq!(
            sent(&out),
            vec![
                serde_json::json!({"messageType":"register","channelID":ch.to_string(),"status":401})
            ]
        );
        assert!(
            !out.iter().any(|a| matches!(a, Action::Close(..))),
            "the connection stays"
        );
        assert_eq!(refusals(&a, "vapid_required"), 1);
        assert_eq!(a.store.get_user(&uaid).await.unwrap(), None);
        assert_eq!(a.store.count_channels(&uaid, 10).await.unwrap(), 0);

        // With a key the same channel subscribes.
        use p256::elliptic_curve::sec1::ToEncodedPoint;
        let key = herald_proto::b64::encode_b64url(
            p256::SecretKey::random(&mut rand::thread_rng())
                .public_key()
                .to_encoded_point(false)
                .as_bytes(),
        );
        let out = step(
            &mut s,
            &format!(r#"{{"messageType":"register","channelID":"{ch}","key":"{key}"}}"#),
        )
        .await;
        assert_eq!(sent(&out)[0]["status"], 200);
        assert_eq!(a.store.count_channels(&uaid, 10).await.unwrap(), 1);
        assert_eq!(refusals(&a, "vapid_required"), 1);
    }

    #[tokio::test]
    async fn hello_issues_then_keeps_a_uaid() {
        let a = app(&[]);
        let mut s = session(a.clone());
        let uaid = hello(&mut s, None).await;
        let ch = uuid::Uuid::new_v4();
        let reg = format!(r#"{{"messageType":"register","channelID":"{ch}"}}"#);
        assert_eq!(sent(&step(&mut s, &reg).await)[0]["status"], 200);
        assert_eq!(hello(&mut session(a.clone()), Some(&uaid)).await, uaid);
        assert_ne!(
            hello(&mut session(a), Some("00000000000000000000000000000000")).await,
            uaid
        );
    }

    #[tokio::test]
    async fn a_connected_uaid_is_kept_before_it_is_stored() {
        let a = app(&[]);
        let first = hello(&mut session(a.clone()), None).await;
        let u = Uaid::parse(&first).unwrap();
        // What connect.rs does with the session's Bind: the first client is
        // connected, so a second client with its uaid joins it.
        let binding = a.router.bind(u).await.unwrap();
        assert_eq!(hello(&mut session(a.clone()), Some(&first)).await, first);
        assert_eq!(a.store.get_user(&u).await.unwrap(), None, "still unstored");
        // Once nobody holds it, the unstored uaid is forgotten.
        a.router.unbind(&u, binding.id).await;
        assert_ne!(hello(&mut session(a.clone()), Some(&first)).await, first);
    }

    #[tokio::test]
    async fn a_user_agent_is_stored_with_its_first_subscription() {
        let a = app(&[]);
        let mut s = session(a.clone());
        let first = hello(&mut s, None).await;
        let u = Uaid::parse(&first).unwrap();
        // Broadcasts are followed in memory only.
        let sub = r#"{"messageType":"broadcast_subscribe","broadcasts":{"b":"v0"}}"#;
        step(&mut s, sub).await;
        assert_eq!(
            a.store.get_user(&u).await.unwrap(),
            None,
            "hello stored nothing"
        );
        // Coming back with a uaid that never subscribed: nothing to keep, and
        // still nothing stored.
        let again = hello(&mut session(a.clone()), Some(&first)).await;
        assert_ne!(again, first);
        let again = Uaid::parse(&again).unwrap();
        assert_eq!(a.store.get_user(&again).await.unwrap(), None);
        // The first register stores the user agent, and the next hello
        // refreshes it.
        let reg = format!(
            r#"{{"messageType":"register","channelID":"{}"}}"#,
            uuid::Uuid::new_v4()
        );
        assert_eq!(sent(&step(&mut s, &reg).await)[0]["status"], 200);
        let rec = a.store.get_user(&u).await.unwrap().expect("stored");
        assert_eq!(rec.created, rec.last_seen);
        assert_eq!(hello(&mut session(a.clone()), Some(&first)).await, first);
        assert_eq!(a.store.count_channels(&u, 10).await.unwrap(), 1);
    }

    #[tokio::test]
    async fn second_hello_is_a_protocol_error() {
        let mut s = session(app(&[]));
        hello(&mut s, None).await;
        let out = step(&mut s, r#"{"messageType":"hello"}"#).await;
        assert!(matches!(&out[..], [Action::Close(close::PROTOCOL, _)]));
    }

    #[tokio::test]
    async fn register_statuses() {
        let mut s = session(app(&[("HERALD_MAX_CHANNELS_PER_UAID", "1")]));
        hello(&mut s, None).await;
        async fn reg(s: &mut Session, ch: &str) -> Value {
            let text = format!(r#"{{"messageType":"register","channelID":"{ch}"}}"#);
            sent(&step(s, &text).await)[0].clone()
        }
        assert_eq!(reg(&mut s, "bogus").await["status"], 400);
        let ch = uuid::Uuid::new_v4().to_string();
        let ok = reg(&mut s, &ch).await;
        assert_eq!(ok["status"], 200);
        assert!(ok["pushEndpoint"]
            .as_str()
            .unwrap()
            .starts_with("http://127.0.0.1:8080/wpush/v1/"));
        assert_eq!(
            reg(&mut s, &ch).await["status"],
            200,
            "re-register is idempotent"
        );
        assert_eq!(
            reg(&mut s, &uuid::Uuid::new_v4().to_string()).await["status"],
            429
        );
    }

    #[tokio::test]
    async fn routed_messages_go_straight_out_in_direct_mode() {
        let a = app(&[]);
        let mut s = session(a.clone());
        let uaid = Uaid::parse(&hello(&mut s, None).await).unwrap();
        // The first pump after hello found an empty store: direct mode.
        let m = message(&a, 60, Urgency::Normal);
        a.store.put_message(&uaid, &m).await.unwrap();
        let mut out = vec![];
        s.on_routed(&m, t0(), &mut out);
        let frames = sent(&out);
        assert_eq!(frames.len(), 1);
        assert_eq!(frames[0]["messageType"], "notification");
        assert_eq!(s.in_flight(), 1);
        // Its ack deletes it from the store.
        let version = frames[0]["version"].as_str().unwrap();
        step(
            &mut s,
            &format!(
                r#"{{"messageType":"ack","updates":[{{"channelID":"x","version":"{version}"}}]}}"#
            ),
        )
        .await;
        assert_eq!(s.in_flight(), 0);
        assert!(a.store.get_message(&uaid, m.seq).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn a_message_in_flight_is_not_sent_again_when_routed_again() {
        let a = app(&[]);
        let mut s = session(a.clone());
        let uaid = Uaid::parse(&hello(&mut s, None).await).unwrap();
        let (stored, ttl0) = (
            message(&a, 60, Urgency::Normal),
            message(&a, 0, Urgency::Normal),
        );
        a.store.put_message(&uaid, &stored).await.unwrap();
        let mut out = vec![];
        for m in [&stored, &ttl0, &stored, &ttl0] {
            s.on_routed(m, t0(), &mut out);
            s.pump(&mut out).await;
        }
        assert_eq!(sent(&out).len(), 2, "each once");
        assert_eq!(s.in_flight(), 2);
    }

    /// A TTL-0 message is handed over within the second it was accepted in
    /// and the next, never later: by then its receipt may say `expired`.
    #[tokio::test]
    async fn a_ttl0_message_past_its_moment_is_dropped() {
        let a = app(&[]);
        let mut s = session(a.clone());
        hello(&mut s, None).await;
        let mut out = vec![];
        s.on_routed(&message(&a, 0, Urgency::Normal), secs(1.9), &mut out);
        assert_eq!(sent(&out).len(), 1, "in its moment");
        let late = message(&a, 0, Urgency::Normal);
        s.on_routed(&late, secs(2.0), &mut out);
        assert_eq!(sent(&out).len(), 1, "past it");
        assert!(late.receipt_deadline() > t0().unix + 2);
    }

    /// Over a lossy link to Redis an ack's deletion can fail: the message
    /// stays stored, and a scan on the same connection (the retry after a
    /// failed read, a lost wake-up) would send it again.
    #[tokio::test]
    async fn an_ack_whose_deletion_failed_is_not_sent_again_and_is_deleted_later() {
        let store = Arc::new(MemStore::new());
        let a = app_on(&[], store.clone());
        let mut s = session(a.clone());
        let uaid = Uaid::parse(&hello(&mut s, None).await).unwrap();
        let m = message(&a, 60, Urgency::Normal);
        a.store.put_message(&uaid, &m).await.unwrap();
        let mut out = vec![];
        s.on_routed(&m, t0(), &mut out);
        let version = sent(&out)[0]["version"].as_str().unwrap().to_string();
        store.fail_next_deletes(1);
        let ack = format!(
            r#"{{"messageType":"ack","updates":[{{"channelID":"x","version":"{version}"}}]}}"#
        );
        assert!(sent(&step(&mut s, &ack).await).is_empty());
        assert!(a.store.get_message(&uaid, m.seq).await.unwrap().is_some());
        s.on_backlog();
        let mut out = vec![];
        s.pump(&mut out).await;
        assert!(sent(&out).is_empty(), "sent again: {out:?}");
        assert!(s.undeleted.is_some());
        // The retry lands after DELETE_RETRY.
        let deadline = std::time::Instant::now() + crate::mailbox::DELETE_RETRY * 3;
        while a.store.get_message(&uaid, m.seq).await.unwrap().is_some() {
            assert!(std::time::Instant::now() < deadline, "never deleted");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // A whole read of the queue forgets it.
        s.on_backlog();
        s.pump(&mut out).await;
        assert!(s.undeleted.is_none());
    }

    #[tokio::test]
    async fn a_full_window_sends_delivery_back_to_the_store() {
        let a = app(&[("HERALD_DELIVERY_WINDOW", "1")]);
        let mut s = session(a.clone());
        let uaid = Uaid::parse(&hello(&mut s, None).await).unwrap();
        let (m1, m2) = (
            message(&a, 60, Urgency::Normal),
            message(&a, 60, Urgency::Normal),
        );
        let mut out = vec![];
        for m in [&m1, &m2] {
            a.store.put_message(&uaid, m).await.unwrap();
            s.on_routed(m, t0(), &mut out);
            s.pump(&mut out).await;
        }
        let frames = sent(&out);
        assert_eq!(frames.len(), 1, "only one in flight");
        let v = frames[0]["version"].as_str().unwrap().to_string();
        let out = step(
            &mut s,
            &format!(r#"{{"messageType":"ack","updates":[{{"channelID":"x","version":"{v}"}}]}}"#),
        )
        .await;
        let frames = sent(&out);
        assert_eq!(
            frames.len(),
            1,
            "the ack frees the window; the scan finds m2"
        );
        assert_eq!(frames[0]["channelID"], m2.channel.to_string());
    }

    #[tokio::test]
    async fn ttl_zero_is_dropped_when_it_cannot_go_now() {
        let a = app(&[]);
        let mut s = session(a.clone());
        hello(&mut s, None).await;
        let mut out = vec![];
        step(&mut s, r#"{"messageType":"urgency","min":"high"}"#).await;
        s.on_routed(&message(&a, 0, Urgency::Normal), t0(), &mut out);
        assert!(out.is_empty());
        s.on_routed(&message(&a, 0, Urgency::High), t0(), &mut out);
        assert_eq!(sent(&out).len(), 1);
    }

    fn cut_off(out: &[Action]) -> bool {
        matches!(out.last(), Some(Action::Close(close::POLICY, _)))
    }

    /// Whether sending `text` up to `n` times gets the connection cut off.
    async fn cut_within(s: &mut Session, text: &str, n: usize) -> bool {
        for _ in 0..n {
            if cut_off(&step(s, text).await) {
                return true;
            }
        }
        false
    }

    #[tokio::test]
    async fn unsolicited_floods_are_cut_off() {
        let a = app(&[("HERALD_CLIENT_RATE_LIMIT", "2")]);
        let mut s = session(a.clone());
        hello(&mut s, None).await;
        let register = r#"{"messageType":"register","channelID":"bogus"}"#;
        assert!(cut_within(&mut s, register, 10).await);

        // Pings faster than keepalive pace count too.
        let mut s = session(a);
        hello(&mut s, None).await;
        assert!(cut_within(&mut s, "{}", 10).await);
    }

    #[tokio::test]
    async fn acks_for_what_was_sent_are_never_a_flood() {
        let a = app(&[("HERALD_CLIENT_RATE_LIMIT", "2")]);
        let mut s = session(a.clone());
        let uaid = Uaid::parse(&hello(&mut s, None).await).unwrap();
        for i in 0..200 {
            let m = message(&a, 60, Urgency::Normal);
            a.store.put_message(&uaid, &m).await.unwrap();
            let mut out = vec![];
            s.on_routed(&m, t0(), &mut out);
            let frames = sent(&out);
            assert_eq!(frames.len(), 1, "message {i} delivered");
            let v = frames[0]["version"].as_str().unwrap();
            let ack = format!(
                r#"{{"messageType":"ack","updates":[{{"channelID":"x","version":"{v}","code":100}}]}}"#
            );
            assert!(
                !cut_off(&step(&mut s, &ack).await),
                "ack {i} cut the connection"
            );
            if i % 2 == 0 {
                continue;
            }
            // Nacks answer what was sent as well.
            let m = message(&a, 60, Urgency::Normal);
            a.store.put_message(&uaid, &m).await.unwrap();
            let mut out = vec![];
            s.on_routed(&m, t0(), &mut out);
            let v = sent(&out)[0]["version"].as_str().unwrap().to_string();
            let nack = format!(r#"{{"messageType":"nack","version":"{v}","code":302}}"#);
            assert!(
                !cut_off(&step(&mut s, &nack).await),
                "nack {i} cut the connection"
            );
        }
        assert_eq!(s.in_flight(), 0);
    }

    #[tokio::test]
    async fn acks_for_versions_never_sent_or_sent_twice_count() {
        let a = app(&[("HERALD_CLIENT_RATE_LIMIT", "2")]);
        let mut s = session(a.clone());
        let uaid = Uaid::parse(&hello(&mut s, None).await).unwrap();
        let m = message(&a, 60, Urgency::Normal);
        a.store.put_message(&uaid, &m).await.unwrap();
        let mut out = vec![];
        s.on_routed(&m, t0(), &mut out);
        let v = sent(&out)[0]["version"].as_str().unwrap().to_string();
        let ack = format!(r#"{{"messageType":"ack","updates":[{{"version":"{v}"}}]}}"#);
        assert!(!cut_off(&step(&mut s, &ack).await));
        // The same ack again, then forged versions, then empty acks.
        let repeats = cut_within(&mut s, &ack, 10).await;
        assert!(repeats, "a repeated ack is charged");
        let mut s = session(a.clone());
        hello(&mut s, None).await;
        let forged = r#"{"messageType":"ack","updates":[{"version":"not-a-version"}]}"#;
        assert!(cut_within(&mut s, forged, 10).await);
        let mut s = session(a);
        hello(&mut s, None).await;
        let empty = r#"{"messageType":"ack","updates":[]}"#;
        assert!(cut_within(&mut s, empty, 10).await);
    }

    /// Puts a message in the store, routes it, and returns its version.
    async fn delivered(s: &mut Session, a: &App, uaid: &Uaid) -> (Message, String) {
        let m = message(a, 60, Urgency::Normal);
        a.store.put_message(uaid, &m).await.unwrap();
        let mut out = vec![];
        s.on_routed(&m, t0(), &mut out);
        let v = sent(&out)[0]["version"].as_str().unwrap().to_string();
        (m, v)
    }

    fn ack_of(versions: &[&str]) -> String {
        let updates: Vec<Value> = versions
            .iter()
            .map(|v| serde_json::json!({"channelID": "x", "version": v, "code": 100}))
            .collect();
        serde_json::json!({"messageType": "ack", "updates": updates}).to_string()
    }

    #[tokio::test]
    async fn one_ack_frame_settles_each_version_once() {
        let a = app(&[]);
        let mut s = session(a.clone());
        let uaid = Uaid::parse(&hello(&mut s, None).await).unwrap();
        let (m, v) = delivered(&mut s, &a, &uaid).await;
        let out = step(&mut s, &ack_of(&[v.as_str(); 60])).await;
        assert!(!cut_off(&out), "{out:?}");
        assert_eq!(a.metrics.messages_acked.get(), 1, "settled once");
        assert!(a.store.get_message(&uaid, m.seq).await.unwrap().is_none());
        assert_eq!(s.in_flight(), 0);
    }

    #[tokio::test]
    async fn an_ack_over_the_window_is_refused_before_the_store() {
        let a = app(&[("HERALD_DELIVERY_WINDOW", "4")]);
        let mut s = session(a.clone());
        let uaid = Uaid::parse(&hello(&mut s, None).await).unwrap();
        let (m, v) = delivered(&mut s, &a, &uaid).await;
        let out = step(&mut s, &ack_of(&[v.as_str(); 5])).await;
        assert!(
            matches!(&out[..], [Action::Close(close::POLICY, r)] if r.contains("at most 4")),
            "{out:?}"
        );
        assert_eq!(a.metrics.messages_acked.get(), 0);
        assert!(a.store.get_message(&uaid, m.seq).await.unwrap().is_some());
        // Up to the window is fine.
        let mut s = session(a.clone());
        let uaid = Uaid::parse(&hello(&mut s, None).await).unwrap();
        let (_, v2) = delivered(&mut s, &a, &uaid).await;
        let out = step(&mut s, &ack_of(&[v2.as_str(); 4])).await;
        assert!(!cut_off(&out), "{out:?}");
        assert_eq!(a.metrics.messages_acked.get(), 1);
    }

    #[tokio::test]
    async fn a_flooding_ack_is_charged_before_the_store() {
        let a = app(&[("HERALD_CLIENT_RATE_LIMIT", "2")]);
        let mut s = session(a.clone());
        let uaid = Uaid::parse(&hello(&mut s, None).await).unwrap();
        let (m, v) = delivered(&mut s, &a, &uaid).await;
        // One real answer among forgeries worth more than the burst (4).
        let mut versions = vec![v.as_str()];
        versions.extend(["forged"; 10]);
        assert!(cut_off(&step(&mut s, &ack_of(&versions)).await));
        assert_eq!(a.metrics.messages_acked.get(), 0, "nothing settled");
        assert!(a.store.get_message(&uaid, m.seq).await.unwrap().is_some());
    }

    #[tokio::test]
    async fn a_ping_at_keepalive_pace_is_free() {
        let a = app(&[("HERALD_CLIENT_RATE_LIMIT", "1")]);
        let mut s = session(a);
        hello(&mut s, None).await;
        // The budget (2) is spent on unsolicited registers...
        let register = r#"{"messageType":"register","channelID":"bogus"}"#;
        assert!(!cut_off(&step(&mut s, register).await));
        // ...but the first ping is keepalive and costs nothing.
        assert_eq!(sent(&step(&mut s, "{}").await), vec![serde_json::json!({})]);
    }

    const REGISTER: &str = r#"{"messageType":"register","channelID":"bogus"}"#;

    /// Sends `text` at `now` and says whether the connection stays.
    async fn survives(s: &mut Session, text: &str, now: Now) -> bool {
        !cut_off(&step_at(s, text, now).await)
    }

    #[tokio::test]
    async fn the_flood_budget_refills_at_the_rate_up_to_the_burst() {
        let a = app(&[("HERALD_CLIENT_RATE_LIMIT", "2")]);
        // Burst 4: hello takes one, three registers the rest.
        let mut s = session(a.clone());
        hello(&mut s, None).await;
        for _ in 0..3 {
            assert!(survives(&mut s, REGISTER, t0()).await);
        }
        // A second later, two more (2 per second)...
        for _ in 0..2 {
            assert!(survives(&mut s, REGISTER, secs(1.0)).await);
        }
        // ...and no third.
        assert!(!survives(&mut s, REGISTER, secs(1.0)).await);

        // A long silence refills the burst, not more.
        let mut s = session(a);
        hello(&mut s, None).await;
        for _ in 0..4 {
            assert!(survives(&mut s, REGISTER, secs(100.0)).await);
        }
        assert!(!survives(&mut s, REGISTER, secs(100.0)).await);
    }

    #[tokio::test]
    async fn pings_are_free_only_at_keepalive_pace() {
        let a = app(&[("HERALD_CLIENT_RATE_LIMIT", "1")]);
        let mut s = session(a.clone());
        hello(&mut s, None).await;
        // Burst 2: hello and a register leave nothing.
        assert!(survives(&mut s, REGISTER, t0()).await);
        // The first ping is keepalive: free even with the budget spent.
        assert!(survives(&mut s, "{}", t0()).await);
        // One sooner than FREE_PING_INTERVAL after it is charged: the 4.9 s
        // since the register refilled the burst (2), which two pings spend.
        let soon = secs(4.9);
        assert!(survives(&mut s, "{}", soon).await);
        assert!(survives(&mut s, "{}", soon).await);
        assert!(!survives(&mut s, "{}", soon).await);

        // FREE_PING_INTERVAL after the last free ping, the next is free
        // again, even with the budget spent at that very instant.
        let mut s = session(a);
        hello(&mut s, None).await;
        assert!(survives(&mut s, "{}", t0()).await);
        let later = at(FREE_PING_INTERVAL);
        for _ in 0..2 {
            assert!(survives(&mut s, REGISTER, later).await);
        }
        assert!(survives(&mut s, "{}", later).await);
        assert!(!survives(&mut s, "{}", later).await, "then charged again");
    }

    #[tokio::test]
    async fn a_routed_message_past_its_expiry_by_the_callers_clock_is_not_sent() {
        let a = app(&[]);
        let mut s = session(a.clone());
        let uaid = Uaid::parse(&hello(&mut s, None).await).unwrap();
        let m = message(&a, 60, Urgency::Normal);
        a.store.put_message(&uaid, &m).await.unwrap();
        let mut out = vec![];
        s.on_routed(&m, secs(60.0), &mut out);
        assert!(out.is_empty(), "expired at 60 s: {out:?}");
        s.on_routed(&m, secs(59.0), &mut out);
        assert_eq!(sent(&out).len(), 1);
    }

    #[tokio::test]
    async fn hello_keeps_a_user_agent_until_ua_expiry_by_the_callers_clock() {
        let a = app(&[]);
        let expiry = a.settings.ua_expiry;
        let mut s = session(a.clone());
        let first = hello(&mut s, None).await;
        let reg = format!(
            r#"{{"messageType":"register","channelID":"{}"}}"#,
            uuid::Uuid::new_v4()
        );
        assert_eq!(sent(&step(&mut s, &reg).await)[0]["status"], 200);
        let u = Uaid::parse(&first).unwrap();
        // Each hello on a connection of its own.
        let hello_at = |now: Now| {
            let (a, text) = (
                a.clone(),
                format!(r#"{{"messageType":"hello","uaid":"{first}"}}"#),
            );
            async move {
                let out = step_at(&mut session(a), &text, now).await;
                sent(&out)[0]["uaid"].as_str().unwrap().to_string()
            }
        };
        // Just inside the expiry: kept, and its last hello recorded.
        let inside = at(expiry - Duration::from_secs(1));
        assert_eq!(hello_at(inside).await, first);
        let rec = a.store.get_user(&u).await.unwrap().unwrap();
        assert_eq!((rec.created, rec.last_seen), (t0().unix, inside.unix));
        // Silent a whole expiry since that hello: dropped, a fresh uaid.
        let past = at(expiry * 2 - Duration::from_secs(1));
        assert_ne!(hello_at(past).await, first);
        assert_eq!(a.store.get_user(&u).await.unwrap(), None);
        assert_eq!(a.store.count_channels(&u, 10).await.unwrap(), 0);
    }
}
