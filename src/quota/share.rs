//! Quotas across nodes (store = redis): each node keeps its own buckets,
//! so a push costs no Redis round trip, and every `SHARE_INTERVAL` tells
//! the others, through Redis, how many pushes it took on which slots; each
//! node charges those to its own buckets. proto-docs/cluster.md derives how
//! far off this is: over any stretch of time, N nodes together admit at
//! most the global limit plus (N − 1) × (burst + rate × interval).
//!
//! The message is binary: a version byte, the table size's log2 (nodes of
//! another build with another size ignore it), then 9 bytes per slot used:
//! the table (u8), the slot (u32 BE) and the count (u32 BE).

use super::table::SLOTS;
use super::Quotas;
use crate::store::Directory;
use std::sync::Arc;
use std::time::Duration;

/// How often nodes exchange usage.
pub const SHARE_INTERVAL: Duration = Duration::from_millis(500);
/// Slots per message at most (37 KiB). The busiest go first; the rest
/// stay counted and go with the next message, so usage is late, not lost.
pub const MAX_SHARED: usize = 4096;

const VERSION: u8 = 1;
const ENTRY: usize = 9;

/// One slot's usage: table, slot, pushes.
pub type Usage = (u8, u32, u32);

pub fn encode(usage: &[Usage]) -> Vec<u8> {
    if usage.is_empty() {
        return Vec::new();
    }
    let mut out = Vec::with_capacity(2 + usage.len() * ENTRY);
    out.push(VERSION);
    out.push(SLOTS.trailing_zeros() as u8);
    for (table, slot, n) in usage {
        out.push(*table);
        out.extend_from_slice(&slot.to_be_bytes());
        out.extend_from_slice(&n.to_be_bytes());
    }
    out
}

/// The usage in a message, or None if it is not one this build reads
/// (another version or table size, or cut short).
pub fn decode(msg: &[u8]) -> Option<Vec<Usage>> {
    let (head, body) = msg.split_at_checked(2)?;
    if head != [VERSION, SLOTS.trailing_zeros() as u8] || body.len() % ENTRY != 0 {
        return None;
    }
    body.chunks_exact(ENTRY)
        .map(|e| {
            let slot = u32::from_be_bytes([e[1], e[2], e[3], e[4]]);
            let n = u32::from_be_bytes([e[5], e[6], e[7], e[8]]);
            ((slot as usize) < SLOTS).then_some((e[0], slot, n))
        })
        .collect()
}

/// Keeps the `MAX_SHARED` busiest slots in `usage`, returning the rest.
pub fn split_busiest(usage: &mut Vec<Usage>) -> Vec<Usage> {
    if usage.len() <= MAX_SHARED {
        return Vec::new();
    }
    usage.select_nth_unstable_by(MAX_SHARED - 1, |a, b| b.2.cmp(&a.2));
    usage.split_off(MAX_SHARED)
}

/// Exchanges usage with the other nodes forever (run as a task on nodes
/// sharing a store).
pub async fn share_loop(quotas: Quotas, directory: Arc<dyn Directory>, node: u64) {
    let mut cursor: Option<String> = None;
    let mut tick = tokio::time::interval(SHARE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        cursor = share_once(&quotas, &*directory, node, cursor).await;
    }
}

/// One exchange; returns where to read from next time.
pub async fn share_once(
    quotas: &Quotas,
    directory: &dyn Directory,
    node: u64,
    cursor: Option<String>,
) -> Option<String> {
    let mut usage = quotas.take_usage();
    let later = split_busiest(&mut usage);
    quotas.return_usage(&later);
    let msg = encode(&usage);
    match directory.share_usage(node, &msg, cursor.as_deref()).await {
        Ok((next, others)) => {
            for m in others {
                match decode(&m) {
                    Some(u) => quotas.charge_remote(&u),
                    None => tracing::debug!("ignoring quota usage in another format"),
                }
            }
            Some(next)
        }
        Err(e) => {
            // Counted again next time: a Redis hiccup delays usage only.
            tracing::warn!("sharing quota usage: {e}");
            quotas.return_usage(&usage);
            cursor
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_round_trips_and_garbage_is_refused() {
        let u = vec![(0, 5, 2), (3, (SLOTS - 1) as u32, u32::MAX)];
        assert_eq!(decode(&encode(&u)), Some(u));
        assert!(encode(&[]).is_empty());
        let good = encode(&[(1, 1, 1)]);
        assert_eq!(decode(&good[..good.len() - 1]), None, "cut short");
        let mut other_size = good.clone();
        other_size[1] += 1;
        assert_eq!(decode(&other_size), None);
        let mut other_version = good.clone();
        other_version[0] = 9;
        assert_eq!(decode(&other_version), None);
        let mut out_of_range = good;
        out_of_range[3..7].copy_from_slice(&(SLOTS as u32).to_be_bytes());
        assert_eq!(decode(&out_of_range), None);
        assert_eq!(decode(&[]), None);
    }

    fn quotas(key: &str) -> Quotas {
        let env = [
            ("HERALD_ENDPOINT_KEYS", key),
            ("HERALD_SENDER_RATE_LIMIT", "1/h"),
            ("HERALD_SENDER_RATE_BURST", "10"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let settings =
            crate::config::Settings::load(&crate::config::ServeArgs::default(), &env).unwrap();
        Quotas::new(&settings, Arc::new(crate::metrics::Metrics::new()))
    }

    /// Two nodes on one store: what one admitted, the other charges, so
    /// together they admit the burst once, not twice.
    #[tokio::test]
    async fn nodes_charge_each_others_usage() {
        use crate::admission::Sender;
        let key = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8";
        let (a, b) = (quotas(key), quotas(key));
        let store = crate::store::MemStore::new();
        let vapid = [5u8; 32];
        let sender = Sender {
            client: "192.0.2.1".parse().unwrap(),
            key: Some(&vapid),
            sub: None,
        };
        let (ca, cb) = (
            share_once(&a, &store, 1, None).await,
            share_once(&b, &store, 2, None).await,
        );
        for _ in 0..6 {
            a.admit_sender(&sender).await.unwrap();
        }
        share_once(&a, &store, 1, ca).await;
        share_once(&b, &store, 2, cb).await;
        let admitted_b = {
            let mut n = 0;
            while b.admit_sender(&sender).await.is_ok() {
                n += 1;
            }
            n
        };
        assert_eq!(admitted_b, 4, "node b knows node a took 6 of 10");
        let refused = b.admit_sender(&sender).await.unwrap_err();
        assert_eq!(
            (refused.status, refused.errno),
            (429, crate::errors::Errno::SenderRateLimited)
        );
        assert!(refused.retry_after.unwrap() > 3000, "one an hour");
    }

    #[test]
    fn the_busiest_slots_go_first() {
        let mut u: Vec<Usage> = (0..MAX_SHARED as u32 + 10).map(|i| (0, i, i)).collect();
        let rest = split_busiest(&mut u);
        assert_eq!((u.len(), rest.len()), (MAX_SHARED, 10));
        assert!(rest.iter().all(|r| r.2 < 10));
        let mut few = vec![(0, 1, 1)];
        assert!(split_busiest(&mut few).is_empty());
    }
}
