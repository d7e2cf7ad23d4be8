//! One owner for the rules that span the message store, the receipt ledger
//! and the pending counts. Each step a message takes (accepted, delivered,
//! acknowledged, cancelled, expired, its subscription or user agent
//! removed) is settled here, so every caller gets the same order.
//!
//! The order follows one rule: the ledger records a fact only once the fact
//! is certain, and where a crash could fall between the two writes, the
//! side that loses nothing goes first.
//! - accept: track the receipt, reserve room, then store. Tracked before
//!   the message can be read: with several nodes a user agent may fetch
//!   and acknowledge it from the store before the push is answered (a
//!   reconnection, a re-read), and an ack that found nothing to settle left
//!   the message to be reported expired. A message refused after all has
//!   its receipt forgotten; a replaced message's too (RFC 8030 §5.4).
//! - ack/nack: settle the receipt, then delete. The user agent's frame
//!   already proves the outcome; a crash between the two redelivers a
//!   message already reported, never loses the report. A deletion that
//!   fails is retried in the background (`delete_later`), as the message
//!   would otherwise come again on every later read.
//! - cancel: delete, then settle. Only the delete tells whether the cancel
//!   came before the ack; settling first could report "cancelled" for a
//!   message the user agent then received.
//! - unsubscribe and drop a user agent: settle everything waiting as gone,
//!   then remove, then forget the pending estimate (it recounts from the
//!   store). A crash between reports a message gone that is still stored,
//!   which is about to be removed anyway.
//! - expire: the store drops expired messages by itself; the receipt
//!   ledger's own sweep (`receipts::Receipts::sweep_loop`) reports them.

use crate::app::App;
use crate::store::{now_secs, Message, Outcome, PutOutcome, ReceiptSub, StoreError, StoreResult};
use herald_proto::ids::{ChannelId, Uaid};
use std::sync::Arc;
use std::time::Duration;

/// How often an acknowledged message whose deletion failed is deleted
/// again, and how many times: about a minute, as evictions are retried
/// (router::cluster), which outlasts the store faults `make chaos` makes.
pub const DELETE_RETRY: Duration = Duration::from_secs(2);
const DELETE_ATTEMPTS: u32 = 30;

/// Why a message was not accepted.
#[derive(Debug)]
pub enum Refused {
    /// The user agent already holds `max_stored_messages` (the value).
    Full(usize),
    Store(StoreError),
}

impl From<StoreError> for Refused {
    fn from(e: StoreError) -> Self {
        Refused::Store(e)
    }
}

pub struct Mailbox<'a> {
    app: &'a App,
}

/// Room reserved for one message under `max_stored_messages`; released on
/// every way out (including the push's future being dropped when the
/// sender hangs up) unless the message was added.
struct Reservation<'a> {
    app: &'a App,
    uaid: Uaid,
    added: bool,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if !self.added {
            self.app.pending.released(&self.uaid);
        }
    }
}

impl<'a> Mailbox<'a> {
    pub fn of(app: &'a App) -> Self {
        Mailbox { app }
    }

    /// Stores `message` (a TTL-0 message is not stored) and tracks its
    /// receipt; returns the store's outcome: the sequence number the message
    /// is known by, and the user agent's owner if the store saw it.
    pub async fn accept(
        &self,
        uaid: &Uaid,
        message: &Message,
        receipt: Option<ReceiptSub>,
    ) -> Result<PutOutcome, Refused> {
        let Some(sub) = receipt else {
            return self.persist(uaid, message).await;
        };
        let receipts = &self.app.receipts;
        let deadline = message.receipt_deadline();
        let track = |seq| {
            receipts.track(
                uaid,
                seq,
                sub,
                message.channel,
                message.expires_at,
                deadline,
            )
        };
        track(message.seq).await?;
        match self.persist(uaid, message).await {
            Ok(stored) if stored.seq == message.seq => Ok(stored),
            Ok(stored) => {
                // Stored under a fresh seq (another node had taken this
                // one): the receipt follows it.
                receipts.forget(uaid, message.seq).await;
                track(stored.seq).await?;
                Ok(stored)
            }
            Err(refused) => {
                receipts.forget(uaid, message.seq).await;
                Err(refused)
            }
        }
    }

    async fn persist(&self, uaid: &Uaid, message: &Message) -> Result<PutOutcome, Refused> {
        let app = self.app;
        if message.ttl == 0 {
            return Ok(PutOutcome {
                seq: message.seq,
                ..Default::default()
            });
        }
        let store = &app.store;
        let limit = app.settings.max_stored_messages;
        if app.pending.is_shared() {
            return self.persist_shared(uaid, message, limit).await;
        }
        let room = app
            .metrics
            .time(
                "count_messages",
                app.pending.reserve(store.as_ref(), uaid, now_secs(), limit),
            )
            .await?;
        if !room {
            return Err(Refused::Full(limit));
        }
        let mut reservation = Reservation {
            app,
            uaid: *uaid,
            added: false,
        };
        let outcome = app
            .metrics
            .time("put_message", store.put_message(uaid, message))
            .await?;
        match outcome.replaced {
            Some(old) => self.replaced(uaid, old).await,
            None => {
                app.pending.added(uaid);
                reservation.added = true;
            }
        }
        Ok(outcome)
    }

    /// With several nodes: the count and the store in one step of the
    /// store's, as no node knows what the others hold.
    async fn persist_shared(
        &self,
        uaid: &Uaid,
        message: &Message,
        limit: usize,
    ) -> Result<PutOutcome, Refused> {
        let app = self.app;
        let stored = app
            .store
            .put_message_within(uaid, message, now_secs(), limit);
        let Some(outcome) = app.metrics.time("put_message", stored).await? else {
            return Err(Refused::Full(limit));
        };
        if let Some(old) = outcome.replaced {
            self.replaced(uaid, old).await;
        }
        Ok(outcome)
    }

    /// A message with the same topic was stored over `old`, which will
    /// never be delivered: it gets no receipt.
    async fn replaced(&self, uaid: &Uaid, old: u64) {
        self.app.metrics.messages_replaced.inc();
        self.app.receipts.forget(uaid, old).await;
    }

    /// A message went out to its user agent.
    pub fn delivered(&self, uaid: Uaid, message: &Message) {
        if message.receipt {
            self.app.receipts.sent(uaid, message.seq);
        }
    }

    /// The user agent acknowledged (or nacked) a message: `outcome` is its
    /// receipt when one was asked for. True when the message was stored.
    pub async fn acknowledge(
        &self,
        uaid: &Uaid,
        seq: u64,
        outcome: Option<Outcome>,
    ) -> StoreResult<bool> {
        let app = self.app;
        if let Some(outcome) = outcome {
            app.receipts.settle(uaid, seq, outcome).await;
        }
        let existed = app
            .metrics
            .time("delete_message", app.store.delete_message(uaid, seq))
            .await?;
        if existed {
            app.pending.removed(uaid);
        }
        Ok(existed)
    }

    /// Deletes an acknowledged message whose deletion just failed, again
    /// every `DELETE_RETRY` until it lands, in the background: the
    /// connection carries on meanwhile. Past `DELETE_ATTEMPTS` (the store
    /// unreachable for over a minute) it gives up, logged: the message may
    /// then be delivered again until its TTL runs out.
    pub fn delete_later(app: Arc<App>, uaid: Uaid, seq: u64) {
        tokio::spawn(async move {
            for attempt in 1..=DELETE_ATTEMPTS {
                tokio::time::sleep(DELETE_RETRY).await;
                let deleted = app.store.delete_message(&uaid, seq);
                match app.metrics.time("delete_message", deleted).await {
                    Ok(existed) => {
                        if existed {
                            app.pending.removed(&uaid);
                        }
                        tracing::info!(
                            uaid = %uaid.short(),
                            attempt,
                            "an acknowledged message was deleted on a retry"
                        );
                        return;
                    }
                    Err(e) if attempt == DELETE_ATTEMPTS => tracing::error!(
                        uaid = %uaid.short(),
                        "an acknowledged message could not be deleted in {DELETE_ATTEMPTS} \
                         attempts; it may be delivered again until it expires: {e}"
                    ),
                    Err(_) => {}
                }
            }
        });
    }

    /// A bridge's upstream (FCM, APNs) took a message: it is settled like
    /// an acknowledgement, with the receipt `forwarded`. True when it was
    /// still stored.
    pub async fn forwarded(&self, uaid: &Uaid, message: &Message) -> StoreResult<bool> {
        self.given_up(uaid, message, Outcome::Forwarded).await
    }

    /// A bridged message leaves without reaching its upstream (refused for
    /// good, or out of time): its receipt is `outcome`, then it is deleted.
    pub async fn given_up(
        &self,
        uaid: &Uaid,
        message: &Message,
        outcome: Outcome,
    ) -> StoreResult<bool> {
        let receipt = message.receipt.then_some(outcome);
        self.acknowledge(uaid, message.seq, receipt).await
    }

    /// The application server withdrew a message; false when it was no
    /// longer stored (delivered, expired or never there).
    pub async fn cancel(&self, uaid: &Uaid, seq: u64) -> StoreResult<bool> {
        let app = self.app;
        let existed = app
            .metrics
            .time("delete_message", app.store.delete_message(uaid, seq))
            .await?;
        if existed {
            app.receipts.settle(uaid, seq, Outcome::Cancelled).await;
            app.pending.removed(uaid);
        }
        Ok(existed)
    }

    /// The user agent unsubscribed `channel`; true when it was subscribed.
    pub async fn unsubscribe(&self, uaid: &Uaid, channel: &ChannelId) -> StoreResult<bool> {
        let app = self.app;
        app.receipts.settle_all(uaid, Some(*channel)).await;
        let removed = app.store.remove_channel(uaid, channel).await;
        app.pending.forget(uaid);
        removed
    }

    /// Removes a user agent with everything it holds (silent too long).
    pub async fn drop_user_agent(&self, uaid: &Uaid) -> StoreResult<()> {
        let app = self.app;
        app.receipts.settle_all(uaid, None).await;
        let dropped = app.store.drop_user(uaid).await;
        app.pending.forget(uaid);
        dropped
    }

    /// Removes messages whose TTL ran out.
    pub async fn expire(&self) -> StoreResult<()> {
        self.app.store.purge_expired().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ServeArgs, Settings};
    use crate::metrics::Metrics;
    use crate::receipts::testing::Watched;
    use crate::store::{MemStore, ReceiptState, ReceiptStore, Store};
    use crate::token::TokenCodec;
    use bytes::Bytes;
    use herald_proto::urgency::Urgency;
    use std::sync::atomic::Ordering;

    #[tokio::test]
    async fn a_receipt_is_tracked_before_its_message_can_be_read() {
        let store = Arc::new(MemStore::new());
        let ledger = Watched::new(store.clone(), 0);
        let settings = Settings::load(&ServeArgs::default(), &Default::default()).unwrap();
        let app = App::new(
            settings,
            store.clone(),
            ledger.clone(),
            TokenCodec::new(&[[5u8; 32]]).unwrap(),
            Arc::new(Metrics::new()),
        );
        let uaid = Uaid::random();
        let message = Message {
            seq: store.next_seq(),
            channel: uuid::Uuid::new_v4(),
            expires_at: now_secs() + 600,
            ttl: 600,
            urgency: Urgency::Normal,
            topic: None,
            headers: None,
            data: Bytes::from_static(b"x"),
            receipt: true,
        };
        let seq = Mailbox::of(&app)
            .accept(&uaid, &message, Some(ReceiptSub::random()))
            .await
            .unwrap()
            .seq;
        assert_eq!(store.read_messages(&uaid, 0, 10).await.unwrap().len(), 1);
        assert!(matches!(
            ledger.receipt_state(&uaid, seq).await.unwrap(),
            Some(ReceiptState::Pending(_))
        ));
        assert!(
            !ledger.tracked_after_stored.load(Ordering::SeqCst),
            "an ack between the store and the track would have found nothing to settle"
        );
    }
}
