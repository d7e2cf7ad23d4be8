//! Writes imported user agents through the `Store` trait, so every engine
//! Herald runs on gets them the same way; the ledger keeps it idempotent.

use super::ledger::{self, Ledger};
use super::record::{plan_seqs, ImportedUa, Route};
use super::summary::{Summary, What};
use crate::store::{ChannelRecord, Message, Store, UserRecord};
use anyhow::Context;
use bytes::Bytes;
use herald_proto::ids::Uaid;
use std::sync::Arc;

/// How far past a taken sequence number to look for a free one.
const SEQ_PROBES: u64 = 1000;

pub struct Writer {
    /// None in a dry run: everything is counted, nothing written.
    store: Option<Arc<dyn Store>>,
    ledger: Ledger,
    ua_expiry: u64,
    now: u64,
}

impl Writer {
    pub fn new(store: Option<Arc<dyn Store>>, ledger: Ledger, ua_expiry: u64, now: u64) -> Self {
        Writer {
            store,
            ledger,
            ua_expiry,
            now,
        }
    }

    /// Makes the ledger durable (end of the run).
    pub async fn finish(&mut self) -> anyhow::Result<()> {
        self.ledger
            .sync()
            .with_context(|| format!("writing {}", self.ledger.path().display()))?;
        if let Some(store) = &self.store {
            store.flush().await?;
        }
        Ok(())
    }

    pub async fn write(&mut self, mut ua: ImportedUa, summary: &mut Summary) -> anyhow::Result<()> {
        let what = format!("user agent {}", ua.uaid);
        // A bridged user agent's connected_at is its registration, not a
        // sign of life (autopush never expires those by it).
        let last_seen = match ua.route {
            Route::Webpush => ua.connected_at_ms / 1000,
            Route::Bridge(_) => self.now,
        };
        if self.ua_expiry > 0 && last_seen + self.ua_expiry <= self.now {
            let reason = "silent longer than ua_expiry";
            summary.skip(What::UserAgents, reason, 1);
            summary.skip(What::Channels, reason, ua.channels.len() as u64);
            summary.skip(What::Messages, reason, ua.messages.len() as u64);
            return Ok(());
        }
        self.write_user(&ua, last_seen, summary)
            .await
            .with_context(|| what.clone())?;
        self.write_channels(&ua, last_seen, summary)
            .await
            .with_context(|| what.clone())?;
        self.write_messages(&mut ua, summary)
            .await
            .with_context(|| what.clone())?;
        self.ledger
            .flush()
            .with_context(|| format!("writing {}", self.ledger.path().display()))
    }

    async fn write_user(
        &mut self,
        ua: &ImportedUa,
        last_seen: u64,
        summary: &mut Summary,
    ) -> anyhow::Result<()> {
        let key = ledger::user_key(&ua.uaid);
        if self.ledger.contains(&key) {
            summary.users.already += 1;
            return Ok(());
        }
        if let Some(store) = &self.store {
            // A user agent already in Herald (it connected since, or the
            // ledger was lost) keeps what Herald knows.
            if store.get_user(&ua.uaid).await?.is_some() {
                summary.users.already += 1;
                self.ledger.record(key);
                return Ok(());
            }
            let record = UserRecord {
                created: last_seen,
                last_seen,
                router: match &ua.route {
                    Route::Webpush => None,
                    Route::Bridge(b) => Some(b.clone()),
                },
            };
            store.put_user(&ua.uaid, &record).await?;
        }
        summary.users.imported += 1;
        self.ledger.record(key);
        Ok(())
    }

    async fn write_channels(
        &mut self,
        ua: &ImportedUa,
        created: u64,
        summary: &mut Summary,
    ) -> anyhow::Result<()> {
        for ch in &ua.channels {
            let key = ledger::channel_key(&ua.uaid, &ch.id);
            if self.ledger.contains(&key) {
                summary.channels.already += 1;
                continue;
            }
            if let Some(store) = &self.store {
                if store.get_channel(&ua.uaid, &ch.id).await?.is_some() {
                    summary.channels.already += 1;
                    self.ledger.record(key);
                    continue;
                }
                let record = ChannelRecord {
                    key_hash: ch.key_hash,
                    created,
                };
                store.put_channel(&ua.uaid, &ch.id, &record).await?;
            }
            summary.channels.imported += 1;
            self.ledger.record(key);
        }
        Ok(())
    }

    async fn write_messages(
        &mut self,
        ua: &mut ImportedUa,
        summary: &mut Summary,
    ) -> anyhow::Result<()> {
        let seqs = plan_seqs(&mut ua.messages);
        for (m, seq) in ua.messages.iter().zip(seqs) {
            if m.expires_at() <= self.now {
                summary.skip(What::Messages, "expired", 1);
                continue;
            }
            if !ua.channels.iter().any(|c| c.id == m.channel) {
                summary.skip(What::Messages, "channel no longer subscribed", 1);
                continue;
            }
            let key = ledger::message_key(&ua.uaid, &m.id);
            if self.ledger.contains(&key) {
                summary.messages.already += 1;
                continue;
            }
            let message = Message {
                seq,
                channel: m.channel,
                expires_at: m.expires_at(),
                ttl: m.ttl,
                urgency: m.urgency,
                topic: m.topic.clone(),
                headers: m.headers.clone(),
                data: Bytes::from(m.data.clone()),
                receipt: false,
            };
            if let Some(store) = &self.store {
                match free_seq(store.as_ref(), &ua.uaid, &message).await? {
                    Some(seq) => {
                        store
                            .put_message(&ua.uaid, &Message { seq, ..message })
                            .await?;
                    }
                    None => {
                        // Written before, its ledger line lost in a crash.
                        summary.messages.already += 1;
                        self.ledger.record(key);
                        continue;
                    }
                }
            }
            summary.messages.imported += 1;
            self.ledger.record(key);
        }
        Ok(())
    }
}

/// The planned seq if nothing holds it; None if this very message already
/// does; otherwise the next free one (another message holds the planned
/// number, which RocksDB would overwrite).
async fn free_seq(store: &dyn Store, uaid: &Uaid, m: &Message) -> anyhow::Result<Option<u64>> {
    for seq in m.seq..m.seq + SEQ_PROBES {
        match store.get_message(uaid, seq).await? {
            None => return Ok(Some(seq)),
            Some(old) if old.channel == m.channel && old.data == m.data && old.topic == m.topic => {
                return Ok(None)
            }
            Some(_) => continue,
        }
    }
    anyhow::bail!("no free message sequence number near {}", m.seq)
}
