//! The forwarder: hands a bridged user agent's stored messages to its
//! upstream (FCM, APNs) and settles each by the answer.
//!
//! A push to a bridged user agent is stored and answered (201/202) like any
//! other; sending happens off the request path. What makes it durable is
//! the store's outbox (`Store::outbox_add`): one entry per bridged user agent
//! with messages in flight, due when its next attempt is. The entry is
//! written on the request path, before the first attempt and before the
//! answer, due one `LEASE` later: if this node dies mid-send, the entry
//! comes due and any node's sweep (`sweep_loop`) takes it over.
//!
//! Whoever lists the entry (or takes it from the sweep) is its one sender
//! until the lease runs out; it extends the lease before each message. It
//! sends the user agent's messages one after the other, oldest first, and
//! stops at the first that must wait, so a retry never lets a later message
//! overtake an earlier one. A push that finds the entry already listed
//! leaves its message to that sender, which looks for more before it lets
//! go: it unlists first and reads again, so a message stored meanwhile is
//! either seen by it or lists the entry anew.
//!
//! What each answer does is decided by `decide`, a pure function:
//! - accepted: settled like an acknowledgement, receipt `forwarded`;
//! - gone: the user agent is dropped (receipts `gone`, later pushes 410);
//! - rejected: the message is deleted, receipt `rejected` with code
//!   `REJECTED_CODE`;
//! - retry: the message stays; the entry comes due again after a backoff
//!   (`backoff_ms`), never before the upstream's `Retry-After`, and once the
//!   next attempt would fall after the message's expiry it expires at once
//!   (receipt `expired`).

use super::{Bridge, Delivery};
use crate::app::{shutdown_begun, App};
use crate::mailbox::Mailbox;
use crate::store::{now_secs, BridgeRoute, Message, Outcome, StoreResult};
use herald_proto::ids::Uaid;
use std::sync::Arc;
use std::time::Duration;

/// How long a sender owns a user agent's outbox entry before another node
/// may take it over: longer than any one upstream request may take (the
/// bridges time out well before), short enough that a crash delays
/// delivery by no more than this.
pub const LEASE: Duration = Duration::from_secs(60);
/// How often each node looks for entries that came due.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(1);
/// User agents one node sends for at once, at most, from its sweep.
const MAX_RUNS: usize = 256;
/// Backoff after a failed attempt: from 1 s, doubling, up to 5 min.
const FIRST_BACKOFF_MS: u64 = 1_000;
const MAX_BACKOFF_MS: u64 = 300_000;
/// The code of the `rejected` receipt of a message the upstream refused
/// for good (as HTTP's 502: the gateway's upstream said no).
pub const REJECTED_CODE: u32 = 502;

fn now_ms() -> u64 {
    crate::store::now_micros() / 1000
}

fn lease_end(now_ms: u64) -> u64 {
    now_ms + LEASE.as_millis() as u64
}

/// What to do with a message after its upstream's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Settle with receipt `forwarded`, delete, go on with the next one.
    Forwarded,
    /// Drop the user agent: its device token is dead.
    DropUserAgent,
    /// Delete with receipt `rejected`, go on with the next one.
    Reject,
    /// Keep it; try again at this Unix millisecond.
    RetryAt(u64),
    /// Keep no longer: the next attempt would come after its expiry.
    /// Delete with receipt `expired`, go on with the next one.
    Expire,
}

/// How long to wait after a failed attempt: the message's age since it was
/// accepted, within 1 s and 5 min, times `jitter` (0.75 to 1.25, so that
/// user agents failing together spread out). Derived from the message, not
/// from a count kept somewhere, so a restart or another node taking over
/// continues the same doubling: tries at about 0, 1, 2, 4, 8 … s after
/// acceptance.
pub fn backoff_ms(message: &Message, now_ms: u64, jitter: f64) -> u64 {
    let accepted_ms = message.expires_at.saturating_sub(message.ttl) * 1000;
    let age = now_ms.saturating_sub(accepted_ms);
    let base = age.clamp(FIRST_BACKOFF_MS, MAX_BACKOFF_MS);
    (base as f64 * jitter.clamp(0.75, 1.25)) as u64
}

/// What `delivery` means for `message` at `now_ms`. Pure.
pub fn decide(delivery: &Delivery, message: &Message, now_ms: u64, jitter: f64) -> Step {
    match delivery {
        Delivery::Accepted => Step::Forwarded,
        Delivery::Gone { .. } => Step::DropUserAgent,
        Delivery::Rejected { .. } => Step::Reject,
        Delivery::Retry { after, .. } => {
            let wait = backoff_ms(message, now_ms, jitter);
            let told = after.map_or(0, |a| a.as_millis() as u64);
            let at = now_ms + wait.max(told);
            if at >= message.expires_at.saturating_mul(1000) {
                Step::Expire
            } else {
                Step::RetryAt(at)
            }
        }
    }
}

fn jitter() -> f64 {
    0.75 + rand::random::<f64>() * 0.5
}

fn labels(route: &BridgeRoute) -> [&str; 2] {
    [route.kind.as_str(), route.app_id.as_str()]
}

/// A message for a bridged user agent was accepted (and, unless its TTL is
/// 0, stored): list the user agent in the outbox and send, off the request
/// path. Called before the sender is answered, so an accepted message is
/// listed before anyone hears of it.
pub async fn accepted(app: &Arc<App>, uaid: Uaid, route: BridgeRoute, message: Message) {
    if message.ttl == 0 {
        // Not stored, so there is nothing to retry: one attempt, now.
        let app = app.clone();
        tokio::spawn(async move { send_once(&app, &uaid, &route, &message).await });
        return;
    }
    match app.store.outbox_add(&uaid, lease_end(now_ms())).await {
        Ok(true) => {
            let app = app.clone();
            tokio::spawn(async move { run(&app, uaid).await });
        }
        Ok(false) => tracing::debug!(
            uaid = %uaid.short(),
            seq = message.seq,
            "bridged message queued behind its user agent's earlier ones"
        ),
        Err(e) => {
            tracing::warn!(uaid = %uaid.short(), "listing a bridged message in the outbox failed, trying again in the background: {e}");
            let app = app.clone();
            tokio::spawn(async move { list_later(&app, uaid).await });
        }
    }
}

/// Lists `uaid` once the store answers again (a few tries over about half
/// a minute); without the entry its message would wait for the user
/// agent's next push, or expire.
async fn list_later(app: &Arc<App>, uaid: Uaid) {
    for wait in [1, 2, 4, 8, 16] {
        tokio::time::sleep(Duration::from_secs(wait)).await;
        match app.store.outbox_add(&uaid, now_ms()).await {
            Ok(_) => return,
            Err(e) => tracing::warn!(uaid = %uaid.short(), "listing in the outbox: {e}"),
        }
    }
    tracing::error!(uaid = %uaid.short(), "could not list a bridged user agent in the outbox; its messages wait for its next push");
}

/// Sends `uaid`'s messages while this node holds its outbox entry.
async fn run(app: &Arc<App>, uaid: Uaid) {
    let _held = app.forwarding.try_hold(usize::MAX);
    if let Err(e) = run_owned(app, &uaid).await {
        // The entry stays listed until its lease runs out; then a sweep
        // (here or on another node) tries again.
        tracing::warn!(uaid = %uaid.short(), "forwarding stopped by a store error, retried after the lease: {e}");
    }
}

/// The user agent's route and the bridge that serves it, or None when there
/// is nothing to send through (the entry is then dealt with).
async fn resolve(app: &App, uaid: &Uaid) -> StoreResult<Option<(BridgeRoute, Arc<dyn Bridge>)>> {
    let route = app.store.get_user(uaid).await?.and_then(|u| u.router);
    let Some(route) = route else {
        // Dropped, or no longer bridged: nothing of it is for a bridge.
        app.store.outbox_remove(uaid).await?;
        return Ok(None);
    };
    match app.bridges.get(route.kind, &route.app_id) {
        Some(bridge) => Ok(Some((route, bridge.clone()))),
        None => {
            // Another node (mid rolling restart) may have it configured:
            // keep the messages and look again after a lease.
            tracing::warn!(uaid = %uaid.short(), bridge = route.kind.as_str(), app = %route.app_id, "no bridge configured on this node for a bridged user agent; its messages wait");
            app.store.outbox_set(uaid, lease_end(now_ms())).await?;
            Ok(None)
        }
    }
}

/// The oldest message still to send; None once the entry is let go (or
/// taken by another node).
async fn next_message(app: &App, uaid: &Uaid) -> StoreResult<Option<Message>> {
    let store = &app.store;
    if let Some(m) = store.read_messages(uaid, 0, 1).await?.pop() {
        return Ok(Some(m));
    }
    // Unlist, then look once more: a push that found the entry listed
    // stored its message before it looked, so it is seen here, or it came
    // after the unlisting and listed the entry itself.
    store.outbox_remove(uaid).await?;
    let Some(m) = store.read_messages(uaid, 0, 1).await?.pop() else {
        return Ok(None);
    };
    if store.outbox_add(uaid, lease_end(now_ms())).await? {
        Ok(Some(m))
    } else {
        Ok(None)
    }
}

async fn run_owned(app: &Arc<App>, uaid: &Uaid) -> StoreResult<()> {
    let Some((route, bridge)) = resolve(app, uaid).await? else {
        return Ok(());
    };
    while let Some(message) = next_message(app, uaid).await? {
        if app.is_shutting_down() {
            // Let go at once, so another node (or the next start) goes on.
            app.store.outbox_set(uaid, now_ms()).await?;
            return Ok(());
        }
        app.store.outbox_set(uaid, lease_end(now_ms())).await?;
        let delivery = bridge.send(&route, &message, now_secs()).await;
        let step = decide(&delivery, &message, now_ms(), jitter());
        tracing::debug!(uaid = %uaid.short(), seq = message.seq, bridge = route.kind.as_str(), app = %route.app_id, ?delivery, ?step, "forwarded to the upstream");
        if !settle(app, uaid, &route, &message, step).await? {
            return Ok(());
        }
    }
    Ok(())
}

/// Carries out `step`; false when nothing more is to be sent now.
async fn settle(
    app: &App,
    uaid: &Uaid,
    route: &BridgeRoute,
    message: &Message,
    step: Step,
) -> StoreResult<bool> {
    let mailbox = Mailbox::of(app);
    let m = &app.metrics;
    match step {
        Step::Forwarded => {
            mailbox.forwarded(uaid, message).await?;
        }
        Step::Reject => {
            m.bridge_drops
                .with_label_values(&[route.kind.as_str(), &route.app_id, "rejected"])
                .inc();
            mailbox
                .given_up(uaid, message, Outcome::Rejected(REJECTED_CODE))
                .await?;
        }
        Step::Expire => {
            m.bridge_drops
                .with_label_values(&[route.kind.as_str(), &route.app_id, "expired"])
                .inc();
            mailbox.given_up(uaid, message, Outcome::Expired).await?;
        }
        Step::DropUserAgent => {
            m.bridge_drops
                .with_label_values(&[route.kind.as_str(), &route.app_id, "gone"])
                .inc();
            mailbox.drop_user_agent(uaid).await?;
            app.store.outbox_remove(uaid).await?;
            return Ok(false);
        }
        Step::RetryAt(at) => {
            m.bridge_retries.with_label_values(&labels(route)).inc();
            app.store.outbox_set(uaid, at).await?;
            return Ok(false);
        }
    }
    Ok(true)
}

/// A TTL-0 message: one attempt, no outbox; anything but acceptance or a
/// dead token ends it as expired (or rejected).
async fn send_once(app: &Arc<App>, uaid: &Uaid, route: &BridgeRoute, message: &Message) {
    let Some(bridge) = app.bridges.get(route.kind, &route.app_id).cloned() else {
        return;
    };
    let _held = app.forwarding.try_hold(usize::MAX);
    let delivery = bridge.send(route, message, now_secs()).await;
    let step = match decide(&delivery, message, now_ms(), jitter()) {
        Step::RetryAt(_) => Step::Expire,
        step => step,
    };
    tracing::debug!(uaid = %uaid.short(), seq = message.seq, ?delivery, ?step, "TTL-0 message forwarded once");
    if let Err(e) = settle(app, uaid, route, message, step).await {
        tracing::warn!(uaid = %uaid.short(), "settling a TTL-0 bridged message: {e}");
    }
}

/// Takes outbox entries that came due (retries, and entries whose sender
/// died) and sends for them, every `SWEEP_INTERVAL`, until shutdown.
pub async fn sweep_loop(app: Arc<App>) {
    let mut shutdown = app.shutdown.subscribe();
    let mut tick = tokio::time::interval(SWEEP_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown_begun(&mut shutdown) => return,
        }
        sweep_once(&app).await;
    }
}

/// One look at the outbox; returns how many user agents it took.
pub async fn sweep_once(app: &Arc<App>) -> usize {
    let room = MAX_RUNS.saturating_sub(app.forwarding.get());
    if room == 0 {
        return 0;
    }
    let now = now_ms();
    match app.store.outbox_take(now, lease_end(now), room).await {
        Ok(due) => {
            for uaid in &due {
                let (app, uaid) = (app.clone(), *uaid);
                tokio::spawn(async move { run(&app, uaid).await });
            }
            due.len()
        }
        Err(e) => {
            tracing::warn!("outbox sweep: {e}");
            0
        }
    }
}

/// Waits (until `deadline`) for this node's sends in flight to finish;
/// whatever is left stays in the outbox for the next start or another
/// node.
pub async fn drain(app: &App, deadline: tokio::time::Instant) {
    while app.forwarding.get() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ServeArgs, Settings};
    use crate::metrics::Metrics;
    use crate::store::{
        BridgeKind, ChannelRecord, MemStore, ReceiptState, ReceiptSub, Store, UserRecord,
    };
    use crate::token::TokenCodec;
    use bytes::Bytes;
    use herald_proto::urgency::Urgency;
    use std::collections::VecDeque;
    use std::sync::Mutex;

    /// Stands in for an upstream: answers from a script (then `Accepted`)
    /// and records the seqs it was sent, in order.
    #[derive(Default)]
    struct Scripted {
        answers: Mutex<VecDeque<Delivery>>,
        sent: Mutex<Vec<u64>>,
    }

    impl Scripted {
        fn answering(answers: Vec<Delivery>) -> Arc<Self> {
            Arc::new(Scripted {
                answers: Mutex::new(answers.into()),
                sent: Mutex::default(),
            })
        }
        fn sent(&self) -> Vec<u64> {
            self.sent.lock().unwrap().clone()
        }
    }

    #[async_trait::async_trait]
    impl Bridge for Scripted {
        fn kind(&self) -> BridgeKind {
            BridgeKind::Fcm
        }
        fn app_id(&self) -> &str {
            "app"
        }
        fn fits(&self, m: &Message) -> bool {
            m.data.len() <= 3000
        }
        async fn send(&self, _: &BridgeRoute, m: &Message, _: u64) -> Delivery {
            self.sent.lock().unwrap().push(m.seq);
            let next = self.answers.lock().unwrap().pop_front();
            next.unwrap_or(Delivery::Accepted)
        }
    }

    fn route() -> BridgeRoute {
        BridgeRoute {
            kind: BridgeKind::Fcm,
            app_id: "app".into(),
            token: "device-token".into(),
            aps: None,
        }
    }

    struct Fixture {
        app: Arc<App>,
        bridge: Arc<Scripted>,
        uaid: Uaid,
        channel: herald_proto::ids::ChannelId,
        sub: ReceiptSub,
    }

    async fn fixture(answers: Vec<Delivery>) -> Fixture {
        let settings = Settings::load(&ServeArgs::default(), &Default::default()).unwrap();
        let store = Arc::new(MemStore::new());
        let bridge = Scripted::answering(answers);
        let app = App::new(
            settings,
            store.clone(),
            store.clone(),
            TokenCodec::new(&[[5u8; 32]]).unwrap(),
            Arc::new(Metrics::new()),
        )
        .with_bridges(super::super::registry::Bridges::new(vec![bridge.clone()]));
        let (uaid, channel) = (Uaid::random(), uuid::Uuid::new_v4());
        let now = now_secs();
        let user = UserRecord {
            created: now,
            last_seen: now,
            router: Some(route()),
        };
        store.put_user(&uaid, &user).await.unwrap();
        let record = ChannelRecord {
            key_hash: None,
            created: now,
        };
        store.put_channel(&uaid, &channel, &record).await.unwrap();
        Fixture {
            app: Arc::new(app),
            bridge,
            uaid,
            channel,
            sub: ReceiptSub::random(),
        }
    }

    impl Fixture {
        /// A message accepted as the endpoint accepts one, with a receipt.
        async fn push(&self, ttl: u64) -> Message {
            let mut m = message(self.app.store.next_seq(), ttl);
            m.channel = self.channel;
            m.seq = Mailbox::of(&self.app)
                .accept(&self.uaid, &m, Some(self.sub))
                .await
                .unwrap()
                .seq;
            m
        }

        /// What the endpoint does after accepting, waiting for the send.
        async fn forward(&self) {
            if self
                .app
                .store
                .outbox_add(&self.uaid, lease_end(now_ms()))
                .await
                .unwrap()
            {
                run(&self.app, self.uaid).await;
            }
        }

        async fn outcome(&self, seq: u64) -> Option<Outcome> {
            match self
                .app
                .receipts
                .ledger()
                .receipt_state(&self.uaid, seq)
                .await
                .unwrap()
            {
                Some(ReceiptState::Settled(e)) => Some(e.outcome),
                _ => None,
            }
        }

        async fn stored(&self) -> Vec<u64> {
            let all = self.app.store.read_messages(&self.uaid, 0, 100).await;
            all.unwrap().iter().map(|m| m.seq).collect()
        }

        async fn due(&self) -> Option<u64> {
            self.app.store.outbox_due(&self.uaid).await.unwrap()
        }

        fn counter(&self, reason: &str) -> u64 {
            let m = &self.app.metrics;
            match reason {
                "retries" => m.bridge_retries.with_label_values(&["fcm", "app"]).get(),
                r => m.bridge_drops.with_label_values(&["fcm", "app", r]).get(),
            }
        }
    }

    fn message(seq: u64, ttl: u64) -> Message {
        Message {
            seq,
            channel: uuid::Uuid::nil(),
            expires_at: now_secs() + ttl,
            ttl,
            urgency: Urgency::Normal,
            topic: None,
            headers: None,
            data: Bytes::new(),
            receipt: true,
        }
    }

    fn retry(after: Option<u64>) -> Delivery {
        Delivery::Retry {
            after: after.map(Duration::from_secs),
            reason: "503".into(),
        }
    }

    #[test]
    fn each_answer_has_its_step() {
        let m = message(1, 600);
        let now = now_ms();
        assert_eq!(decide(&Delivery::Accepted, &m, now, 1.0), Step::Forwarded);
        let gone = Delivery::Gone {
            reason: "UNREGISTERED".into(),
        };
        assert_eq!(decide(&gone, &m, now, 1.0), Step::DropUserAgent);
        let rejected = Delivery::Rejected {
            reason: "INVALID_ARGUMENT".into(),
        };
        assert_eq!(decide(&rejected, &m, now, 1.0), Step::Reject);
        assert_eq!(
            decide(&retry(None), &m, now, 1.0),
            Step::RetryAt(now + 1000)
        );
        assert_eq!(
            decide(&retry(Some(120)), &m, now, 1.0),
            Step::RetryAt(now + 120_000),
            "never before Retry-After"
        );
        assert_eq!(
            decide(&retry(Some(600)), &m, now, 1.0),
            Step::Expire,
            "a retry due after the expiry gives up now"
        );
    }

    #[test]
    fn backoff_doubles_from_one_second_to_five_minutes_with_jitter() {
        let m = message(1, 86_400);
        let accepted = (m.expires_at - m.ttl) * 1000;
        let after = |s: u64| backoff_ms(&m, accepted + s * 1000, 1.0);
        assert_eq!(after(0), 1000);
        assert_eq!(after(1), 1000);
        assert_eq!(after(2), 2000);
        assert_eq!(after(4), 4000);
        assert_eq!(after(3600), 300_000);
        assert_eq!(backoff_ms(&m, accepted + 8000, 0.75), 6000);
        assert_eq!(backoff_ms(&m, accepted + 8000, 1.25), 10_000);
        assert_eq!(backoff_ms(&m, accepted + 8000, 9.0), 10_000, "clamped");
    }

    #[tokio::test]
    async fn accepted_messages_are_settled_forwarded_in_order() {
        let f = fixture(vec![]).await;
        let (a, b, c) = (f.push(60).await, f.push(60).await, f.push(60).await);
        f.forward().await;
        assert_eq!(f.bridge.sent(), vec![a.seq, b.seq, c.seq]);
        assert_eq!(f.stored().await, Vec::<u64>::new());
        for m in [&a, &b, &c] {
            assert_eq!(f.outcome(m.seq).await, Some(Outcome::Forwarded));
        }
        assert_eq!(f.due().await, None, "nothing left: unlisted");
    }

    #[tokio::test]
    async fn a_dead_token_drops_the_user_agent() {
        let f = fixture(vec![Delivery::Gone {
            reason: "UNREGISTERED".into(),
        }])
        .await;
        let (a, b) = (f.push(60).await, f.push(60).await);
        f.forward().await;
        assert_eq!(f.bridge.sent(), vec![a.seq]);
        assert_eq!(f.app.store.get_user(&f.uaid).await.unwrap(), None);
        assert_eq!(f.stored().await, Vec::<u64>::new());
        assert_eq!(f.outcome(a.seq).await, Some(Outcome::Gone));
        assert_eq!(f.outcome(b.seq).await, Some(Outcome::Gone));
        assert_eq!(f.due().await, None);
        assert_eq!(f.counter("gone"), 1);
    }

    #[tokio::test]
    async fn a_refused_message_is_dropped_and_the_next_goes_out() {
        let f = fixture(vec![Delivery::Rejected {
            reason: "INVALID_ARGUMENT".into(),
        }])
        .await;
        let (a, b) = (f.push(60).await, f.push(60).await);
        f.forward().await;
        assert_eq!(f.bridge.sent(), vec![a.seq, b.seq]);
        assert_eq!(
            f.outcome(a.seq).await,
            Some(Outcome::Rejected(REJECTED_CODE))
        );
        assert_eq!(f.outcome(b.seq).await, Some(Outcome::Forwarded));
        assert_eq!(f.counter("rejected"), 1);
        assert!(f.app.store.get_user(&f.uaid).await.unwrap().is_some());
    }

    #[tokio::test]
    async fn a_retry_keeps_every_message_in_order_until_the_sweep_takes_it() {
        let f = fixture(vec![retry(Some(30))]).await;
        let (a, b) = (f.push(600).await, f.push(600).await);
        let before = now_ms();
        f.forward().await;
        assert_eq!(f.bridge.sent(), vec![a.seq], "b waits behind a");
        assert_eq!(f.stored().await, vec![a.seq, b.seq]);
        let due = f.due().await.expect("listed for the retry");
        assert!(due >= before + 30_000, "not before Retry-After");
        assert_eq!(f.counter("retries"), 1);
        assert_eq!(f.outcome(a.seq).await, None, "still pending");

        // A push meanwhile waits behind the retry instead of jumping it.
        let c = f.push(600).await;
        f.forward().await;
        assert_eq!(f.bridge.sent(), vec![a.seq]);
        assert_eq!(f.due().await, Some(due));

        // Not due yet: the sweep leaves it.
        assert_eq!(sweep_once(&f.app).await, 0);
        f.app.store.outbox_set(&f.uaid, now_ms()).await.unwrap();
        assert_eq!(sweep_once(&f.app).await, 1);
        for _ in 0..200 {
            if f.due().await.is_none() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(f.bridge.sent(), vec![a.seq, a.seq, b.seq, c.seq]);
        assert_eq!(f.outcome(a.seq).await, Some(Outcome::Forwarded));
        assert_eq!(f.stored().await, Vec::<u64>::new());
    }

    #[tokio::test]
    async fn a_message_out_of_time_expires_and_the_next_goes_out() {
        let f = fixture(vec![retry(Some(120))]).await;
        let (a, b) = (f.push(60).await, f.push(600).await);
        f.forward().await;
        assert_eq!(f.bridge.sent(), vec![a.seq, b.seq]);
        assert_eq!(f.outcome(a.seq).await, Some(Outcome::Expired));
        assert_eq!(f.outcome(b.seq).await, Some(Outcome::Forwarded));
        assert_eq!(f.counter("expired"), 1);
        assert_eq!(f.counter("retries"), 0);
    }

    #[tokio::test]
    async fn a_message_stored_while_the_sender_lets_go_is_not_stranded() {
        let f = fixture(vec![]).await;
        // The sender's entry is listed; a push finds it so and leaves its
        // message to the sender, which must then see it.
        assert!(f.app.store.outbox_add(&f.uaid, 1).await.unwrap());
        let a = f.push(60).await;
        assert!(!f.app.store.outbox_add(&f.uaid, 1).await.unwrap());
        run(&f.app, f.uaid).await;
        assert_eq!(f.bridge.sent(), vec![a.seq]);
        assert_eq!(f.due().await, None);
    }

    #[tokio::test]
    async fn a_user_agent_without_a_configured_bridge_keeps_its_messages() {
        let f = fixture(vec![]).await;
        let mut other = route();
        other.app_id = "unconfigured".into();
        let user = UserRecord {
            created: 1,
            last_seen: now_secs(),
            router: Some(other),
        };
        f.app.store.put_user(&f.uaid, &user).await.unwrap();
        let a = f.push(600).await;
        f.forward().await;
        assert!(f.bridge.sent().is_empty());
        assert_eq!(f.stored().await, vec![a.seq]);
        assert!(f.due().await.is_some_and(|d| d > now_ms()));
    }

    #[tokio::test]
    async fn shutdown_lets_go_of_the_entry_at_once() {
        let f = fixture(vec![]).await;
        let a = f.push(600).await;
        f.app.begin_shutdown();
        f.forward().await;
        assert!(f.bridge.sent().is_empty());
        assert_eq!(f.stored().await, vec![a.seq]);
        assert!(f.due().await.is_some_and(|d| d <= now_ms()));
    }
}
