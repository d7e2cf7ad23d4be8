//! Quotas per receiver and per sender: token buckets (`bucket`) in
//! fixed-size tables (`table`), one per kind of key, checked before a
//! push's body is read. Over a quota the push is answered 429 with
//! `Retry-After` (`refusal`). Nodes sharing a Redis store exchange their
//! usage now and then (`share`) so a limit holds across them.
//!
//! The hot path is one keyed hash and one atomic update per bucket: no
//! lock, no allocation, no await, no Redis.

pub mod bucket;
pub mod keys;
mod refusal;
pub mod share;
pub mod table;

use crate::admission::Sender;
use crate::config::{Rate, Settings};
use crate::errors::ApiError;
use crate::metrics::Metrics;
use herald_proto::ids::{ChannelId, Uaid};
use keys::Hasher;
use std::sync::Arc;
use std::time::Instant;
use table::Table;

/// The kinds of bucket, each its own table (`Kind as u8` also tells their
/// slots apart in the hash and in shared usage).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Subscription = 0,
    UserAgent = 1,
    SenderKey = 2,
    SenderAddress = 3,
}

impl Kind {
    const ALL: [Kind; 4] = [
        Kind::Subscription,
        Kind::UserAgent,
        Kind::SenderKey,
        Kind::SenderAddress,
    ];

    /// The `reason` label of `herald_throttled_total`.
    pub fn label(self) -> &'static str {
        match self {
            Kind::Subscription => "subscription",
            Kind::UserAgent => "user_agent",
            Kind::SenderKey => "sender_key",
            Kind::SenderAddress => "sender_address",
        }
    }
}

/// Cheap to clone: the tables are shared with the task exchanging usage.
#[derive(Clone)]
pub struct Quotas(Arc<Inner>);

struct Inner {
    hasher: Hasher,
    /// By `Kind`; None where the limit is off.
    tables: [Option<Table>; 4],
    /// Bucket times are nanoseconds since this instant.
    epoch: Instant,
    metrics: Arc<Metrics>,
}

impl Quotas {
    pub fn new(settings: &Settings, metrics: Arc<Metrics>) -> Self {
        let s = settings;
        let table =
            |rate: Option<Rate>, burst: u32| rate.map(|r| Table::new(bucket::Limit::new(r, burst)));
        Quotas(Arc::new(Inner {
            hasher: Hasher::from_endpoint_keys(&s.endpoint_keys),
            tables: [
                table(s.subscription_rate_limit, s.subscription_rate_burst),
                table(s.ua_rate_limit, s.ua_rate_burst),
                table(s.sender_rate_limit, s.sender_rate_burst),
                table(s.anonymous_rate_limit, s.anonymous_rate_burst),
            ],
            epoch: Instant::now(),
            metrics,
        }))
    }

    fn now(&self) -> u64 {
        // Starts at 1 s so that a fresh slot (0) is a full bucket at once.
        self.0.epoch.elapsed().as_nanos() as u64 + 1_000_000_000
    }

    fn table(&self, kind: Kind) -> Option<&Table> {
        self.0.tables[kind as usize].as_ref()
    }

    /// Per VAPID key, or per client address without VAPID.
    pub async fn admit_sender(&self, sender: &Sender<'_>) -> Result<(), ApiError> {
        let addr = keys::address_key(sender.client);
        let (kind, part): (Kind, &[u8]) = match sender.key {
            Some(key) => (Kind::SenderKey, key),
            None => (Kind::SenderAddress, &addr),
        };
        let Some(table) = self.table(kind) else {
            return Ok(());
        };
        let at = self.0.hasher.slots(kind as u8, &[part]);
        table
            .admit(at, self.now())
            .map_err(|wait| self.refuse(kind, wait))
    }

    /// Per subscription and per user agent: both must have room, and a
    /// push refused by one takes nothing from the other.
    pub async fn admit_receiver(&self, uaid: &Uaid, channel: &ChannelId) -> Result<(), ApiError> {
        let now = self.now();
        let h = &self.0.hasher;
        let buckets = [
            (Kind::Subscription, &[&uaid.0[..], channel.as_bytes()][..]),
            (Kind::UserAgent, &[&uaid.0[..]][..]),
        ]
        .map(|(kind, parts)| {
            self.table(kind)
                .map(|t| (kind, t, h.slots(kind as u8, parts)))
        });
        // The longest wait: the push fits only once both have room.
        let mut refused: Option<(Kind, u64)> = None;
        for (kind, table, at) in buckets.iter().flatten() {
            if let Err(wait) = table.check(*at, now) {
                if refused.is_none_or(|(_, w)| wait > w) {
                    refused = Some((*kind, wait));
                }
            }
        }
        if let Some((kind, wait)) = refused {
            return Err(self.refuse(kind, wait));
        }
        for (_, table, at) in buckets.iter().flatten() {
            table.charge(*at, now);
        }
        Ok(())
    }

    fn refuse(&self, kind: Kind, wait_ns: u64) -> ApiError {
        self.0
            .metrics
            .throttled
            .with_label_values(&[kind.label()])
            .inc();
        refusal::refusal(kind, bucket::retry_after_secs(wait_ns))
    }

    /// Every slot charged on this node since the last call, to tell the
    /// other nodes (`share`).
    pub fn take_usage(&self) -> Vec<share::Usage> {
        let mut out = Vec::new();
        let mut slots = Vec::new();
        for kind in Kind::ALL {
            if let Some(t) = self.table(kind) {
                slots.clear();
                t.take_usage(&mut slots);
                out.extend(slots.iter().map(|&(s, n)| (kind as u8, s, n)));
            }
        }
        out
    }

    /// Usage taken but not shared: shared with the next exchange.
    pub fn return_usage(&self, usage: &[share::Usage]) {
        for &(kind, slot, n) in usage {
            if let Some(t) = self.by_index(kind) {
                t.return_usage(slot, n);
            }
        }
    }

    /// Pushes other nodes took: they count here as well.
    pub fn charge_remote(&self, usage: &[share::Usage]) {
        let now = self.now();
        for &(kind, slot, n) in usage {
            if let Some(t) = self.by_index(kind) {
                t.charge_remote(slot, n, now);
            }
        }
    }

    fn by_index(&self, kind: u8) -> Option<&Table> {
        self.0.tables.get(kind as usize).and_then(Option::as_ref)
    }

    /// Bytes all the tables hold (fixed at start).
    pub fn memory_bytes(&self) -> usize {
        self.0
            .tables
            .iter()
            .flatten()
            .map(Table::memory_bytes)
            .sum()
    }
}
