//! The busiest senders of the last minutes, in bounded memory: one
//! Space-Saving sketch (Metwally, Agrawal and El Abbadi, 2005) of
//! `COUNTERS` counters per minute, in a ring of `MINUTES` minutes. However
//! many keys and addresses push, it holds `MINUTES × COUNTERS` counters; a
//! sender pushing more than 1/`COUNTERS` of a minute's pushes is always in
//! that minute's sketch, with its count overestimated by at most the
//! counter's recorded error. Per node: each node sees only its own pushes.

use crate::admission::Sender;
use crate::token::KeyHash;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;

/// How far back `top` can look.
pub const MINUTES: usize = 10;
/// Counters per minute: the most senders one minute can tell apart.
pub const COUNTERS: usize = 64;
/// A longer `sub` is not kept beside its counter (it is only a hint for
/// the operator; `vapid::MAX_CACHED_SUB` is the same bound).
const MAX_SUB: usize = 256;

/// Whom a counter counts: a VAPID key, or the client address of pushes
/// without VAPID.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SenderId {
    Key(KeyHash),
    Address(IpAddr),
}

impl SenderId {
    pub fn of(sender: &Sender<'_>) -> SenderId {
        match sender.key {
            Some(k) => SenderId::Key(*k),
            None => SenderId::Address(sender.client),
        }
    }
}

#[derive(Debug, Clone)]
struct Counter {
    id: SenderId,
    count: u64,
    /// How much of `count` may belong to the senders this counter replaced.
    error: u64,
    /// The `sub` last seen with this sender.
    sub: Option<Box<str>>,
}

/// One Space-Saving sketch.
#[derive(Debug, Clone, Default)]
pub struct Sketch {
    counters: Vec<Counter>,
    /// Sender → its counter's index, so a push finds its counter at once.
    index: HashMap<SenderId, usize>,
}

impl Sketch {
    /// Counts one push of `id`. A sender without a counter takes the
    /// smallest one's place, inheriting its count as its error.
    pub fn offer(&mut self, id: SenderId, sub: Option<&str>) {
        let sub = sub.filter(|s| s.len() <= MAX_SUB);
        if let Some(&i) = self.index.get(&id) {
            let c = &mut self.counters[i];
            c.count += 1;
            if sub.is_some() && c.sub.as_deref() != sub {
                c.sub = sub.map(Box::from);
            }
            return;
        }
        let fresh = Counter {
            id,
            count: 1,
            error: 0,
            sub: sub.map(Box::from),
        };
        if self.counters.len() < COUNTERS {
            self.index.insert(id, self.counters.len());
            self.counters.push(fresh);
            return;
        }
        let (i, min) = self
            .counters
            .iter()
            .enumerate()
            .min_by_key(|(_, c)| c.count)
            .map(|(i, c)| (i, c.count))
            .expect("a full sketch has counters");
        self.index.remove(&self.counters[i].id);
        self.index.insert(id, i);
        self.counters[i] = Counter {
            count: min + 1,
            error: min,
            ..fresh
        };
    }

    /// The most a sender without a counter may have pushed: the smallest
    /// count once the sketch is full, else nothing.
    fn floor(&self) -> u64 {
        if self.counters.len() < COUNTERS {
            0
        } else {
            self.counters.iter().map(|c| c.count).min().unwrap_or(0)
        }
    }

    pub fn len(&self) -> usize {
        self.counters.len()
    }

    pub fn is_empty(&self) -> bool {
        self.counters.is_empty()
    }
}

/// One sender's volume over the minutes asked for: its true count is
/// within `count ± error`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub id: SenderId,
    pub sub: Option<String>,
    pub count: u64,
    pub error: u64,
}

/// Merges minutes' sketches. A sender missing from a full minute may have
/// pushed up to that minute's smallest count there, which its error
/// takes in.
pub fn merge<'a>(sketches: impl Iterator<Item = &'a Sketch> + Clone) -> Vec<Entry> {
    let mut merged: HashMap<SenderId, Entry> = HashMap::new();
    for s in sketches.clone() {
        for c in &s.counters {
            let e = merged.entry(c.id).or_insert(Entry {
                id: c.id,
                sub: None,
                count: 0,
                error: 0,
            });
            e.count += c.count;
            e.error += c.error;
            if c.sub.is_some() {
                e.sub = c.sub.as_deref().map(str::to_string);
            }
        }
    }
    for s in sketches {
        let floor = s.floor();
        if floor == 0 {
            continue;
        }
        for e in merged.values_mut() {
            if !s.index.contains_key(&e.id) {
                e.error += floor;
            }
        }
    }
    let mut out: Vec<Entry> = merged.into_values().collect();
    out.sort_by(|a, b| b.count.cmp(&a.count).then(a.error.cmp(&b.error)));
    out
}

/// A ring of per-minute sketches.
#[derive(Debug, Default)]
struct Ring {
    /// Slot `m % MINUTES` holds minute `m` (Unix minutes) when its tag says so.
    slots: [(u64, Sketch); MINUTES],
}

impl Ring {
    fn offer(&mut self, minute: u64, id: SenderId, sub: Option<&str>) {
        let slot = &mut self.slots[(minute % MINUTES as u64) as usize];
        if slot.0 != minute {
            *slot = (minute, Sketch::default());
        }
        slot.1.offer(id, sub);
    }

    /// The last `minutes` minutes up to and including `now_minute`.
    fn top(&self, now_minute: u64, minutes: usize) -> Vec<Entry> {
        let from = now_minute.saturating_sub(minutes.clamp(1, MINUTES) as u64 - 1);
        merge(
            self.slots
                .iter()
                .filter(move |(m, _)| (from..=now_minute).contains(m))
                .map(|(_, s)| s),
        )
    }
}

/// The busiest senders of the last minutes, for the admin API.
#[derive(Default)]
pub struct TopSenders {
    ring: Mutex<Ring>,
}

impl TopSenders {
    /// Counts one admitted push.
    pub fn record(&self, sender: &Sender<'_>) {
        self.record_at(now_minute(), SenderId::of(sender), sender.sub);
    }

    pub fn record_at(&self, minute: u64, id: SenderId, sub: Option<&str>) {
        self.lock().offer(minute, id, sub);
    }

    /// The senders of the last `minutes` (1 to `MINUTES`), busiest first.
    pub fn top(&self, minutes: usize) -> Vec<Entry> {
        self.top_at(now_minute(), minutes)
    }

    pub fn top_at(&self, now_minute: u64, minutes: usize) -> Vec<Entry> {
        self.lock().top(now_minute, minutes)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Ring> {
        self.ring.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn now_minute() -> u64 {
    crate::store::now_secs() / 60
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn addr(n: u32) -> SenderId {
        SenderId::Address(IpAddr::V4(Ipv4Addr::from(n)))
    }

    fn key(n: u8) -> SenderId {
        SenderId::Key([n; 32])
    }

    #[test]
    fn exact_while_there_are_counters_to_spare() {
        let mut s = Sketch::default();
        for i in 0..10u32 {
            for _ in 0..=i {
                s.offer(addr(i), None);
            }
        }
        let top = merge(std::iter::once(&s));
        assert_eq!(top.len(), 10);
        assert_eq!((top[0].id, top[0].count, top[0].error), (addr(9), 10, 0));
        assert!(top.iter().all(|e| e.error == 0));
    }

    /// A heavy sender among 10,000 one-off senders comes first, the sketch
    /// stays at `COUNTERS` counters, and every reported count is within its
    /// error of the truth.
    #[test]
    fn a_heavy_hitter_is_found_among_many_light_ones_in_bounded_memory() {
        let mut s = Sketch::default();
        let mut truth: HashMap<SenderId, u64> = HashMap::new();
        for i in 0..10_000u32 {
            s.offer(addr(i), None);
            *truth.entry(addr(i)).or_default() += 1;
            if i % 20 == 0 {
                s.offer(key(1), Some("mailto:heavy@example.com"));
                *truth.entry(key(1)).or_default() += 1;
            }
            if i % 50 == 0 {
                s.offer(key(2), None);
                *truth.entry(key(2)).or_default() += 1;
            }
            assert!(s.len() <= COUNTERS);
            assert!(s.index.len() <= COUNTERS);
        }
        let top = merge(std::iter::once(&s));
        assert_eq!(top[0].id, key(1));
        assert_eq!(top[0].sub.as_deref(), Some("mailto:heavy@example.com"));
        assert_eq!(top[1].id, key(2));
        for e in &top {
            let t = truth[&e.id];
            assert!(e.count >= t && e.count - e.error <= t, "{e:?} true {t}");
        }
    }

    #[test]
    fn minutes_are_merged_and_old_ones_forgotten() {
        let t = TopSenders::default();
        let m = 1_000_000;
        for _ in 0..5 {
            t.record_at(m - 3, key(1), None);
        }
        for _ in 0..3 {
            t.record_at(m, key(2), None);
            t.record_at(m - 1, key(2), None);
        }
        let last2 = t.top_at(m, 2);
        assert_eq!(last2.len(), 1);
        assert_eq!((last2[0].id, last2[0].count), (key(2), 6));
        let last5 = t.top_at(m, 5);
        assert_eq!((last5[0].id, last5[0].count), (key(2), 6));
        assert_eq!((last5[1].id, last5[1].count), (key(1), 5));
        // The ring reuses minute m-3's slot ten minutes on.
        t.record_at(m + 7, key(3), None);
        assert!(t.top_at(m + 7, MINUTES).iter().all(|e| e.id != key(1)));
        assert_eq!(t.top_at(m + 30, MINUTES), vec![]);
    }

    /// A sender missing from a full minute may have pushed there up to that
    /// minute's smallest count: its error says so.
    #[test]
    fn absence_from_a_full_minute_widens_the_error() {
        let mut full = Sketch::default();
        for i in 0..COUNTERS as u32 {
            full.offer(addr(i), None);
            full.offer(addr(i), None);
        }
        let mut other = Sketch::default();
        other.offer(key(9), None);
        let merged = merge([&full, &other].into_iter());
        let e = merged.iter().find(|e| e.id == key(9)).unwrap();
        assert_eq!((e.count, e.error), (1, 2));
    }
}
