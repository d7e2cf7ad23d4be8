//! Exact accounting for `soak`: a record of everything that happened (each
//! POST, each connection's lifetime, each notification received, each
//! unregistration) and a pure function that says what became of every
//! accepted message.
//!
//! Rules (`classify`), in this order, for each message the server accepted
//! (201 or 202):
//!
//! - **delivered**: received at least once (acked, nacked or not answered).
//!   A message whose TTL ran out while it was on its way may be delivered or
//!   expired; either is fine, and a received one counts as delivered.
//! - **expired**, never received, and:
//!   - TTL > 0: its TTL had run out by the end of the run (after the final
//!     drain), and no connection of its user agent was up for at least
//!     `grace` seconds within [POST sent, POST answered + TTL]. The server computes
//!     the expiry from whole seconds, so a message may die up to a second
//!     before `answered + TTL`, never after; `grace` (over a second) leaves
//!     room for that and for the server to send what it had stored.
//!   - TTL 0 (never stored, delivered only to a connection that is up at
//!     that moment): no connection was up from before the POST until
//!     `grace` seconds after its answer.
//! - **replaced**, never received, it had a `Topic`, and a later POST with
//!   the same topic to the same subscription (sent after this one was
//!   answered, and accepted or of unknown outcome) was sent before any
//!   connection of the user agent had been up for `grace` seconds since this
//!   one was sent. The later message is what replaced it.
//! - **unregistered**, never received, and its channel was unregistered
//!   (after the message was sent) before any connection had been up for
//!   `grace` seconds since it was sent: unregistering drops what is pending.
//! - otherwise **lost**: the server had every chance to deliver it.
//!
//! Each excuse needs the user agent to have had no real chance of receiving
//! the message; "up" runs from the `hello` reply to the moment the user
//! agent starts closing (or sees the server close), so time spent opening or
//! closing never counts as a chance.
//!
//! Receipts beyond the first:
//! - **redelivered** (allowed): every earlier receipt was on another
//!   connection and left unanswered, or its answer may not have reached the
//!   server (that connection did not close cleanly);
//! - **duplicate** (a server bug): an earlier receipt on a cleanly closed
//!   connection was acked or nacked (both delete the message in Herald), or
//!   the same connection got the message twice.

use std::collections::HashMap;

/// Seconds since the start of the run.
pub type Secs = f64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// 201 or 202.
    Accepted,
    /// Any other status: the server did not take the message.
    Rejected,
    /// No status (timeout, connection error): it may have been taken.
    Unknown,
}

/// One POST.
#[derive(Clone, Debug)]
pub struct Sent {
    /// The id in the encrypted payload.
    pub id: u64,
    pub ua: usize,
    /// Soak-wide channel number.
    pub channel: usize,
    pub ttl: u32,
    pub topic: Option<String>,
    pub sent_at: Secs,
    pub answered_at: Secs,
    pub outcome: Outcome,
    /// The HTTP status, when one came.
    pub status: Option<u16>,
    /// It asked for a delivery receipt (`Prefer: respond-async`).
    pub receipt: bool,
    /// Its message id (the last segment of the 202's `Location`), when it
    /// asked for a receipt and was accepted.
    pub message: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    Acked,
    Nacked,
    /// Left unanswered (held, or it arrived while closing).
    None,
}

/// One notification received and decrypted.
#[derive(Clone, Debug)]
pub struct Receipt {
    pub id: u64,
    pub conn: u64,
    pub at: Secs,
    pub answer: Answer,
}

/// One websocket connection of a user agent, from its `hello` reply.
#[derive(Clone, Debug)]
pub struct Conn {
    pub id: u64,
    pub ua: usize,
    pub up: Secs,
    pub down: Secs,
    /// The close handshake completed, so every frame sent before it (acks
    /// included) reached the server.
    pub clean: bool,
}

#[derive(Clone, Debug)]
pub struct Unregistration {
    pub channel: usize,
    pub at: Secs,
}

#[derive(Clone, Debug, Default)]
pub struct Record {
    pub sent: Vec<Sent>,
    pub receipts: Vec<Receipt>,
    pub conns: Vec<Conn>,
    pub unregistered: Vec<Unregistration>,
    /// When the record was closed (after the final drain): a message whose
    /// TTL may not have run out by then cannot have expired.
    pub end: Secs,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fate {
    Delivered,
    Expired,
    Replaced,
    Unregistered,
    Lost,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Tally {
    pub accepted: u64,
    pub accepted_ttl0: u64,
    pub delivered: u64,
    pub expired: u64,
    /// TTL-0 messages among `expired`.
    pub expired_ttl0: u64,
    pub replaced: u64,
    pub unregistered: u64,
    pub lost: u64,
    /// Messages received again after an unanswered receipt (allowed).
    pub redelivered: u64,
    /// Messages received again after an ack or nack, or twice on one
    /// connection (a bug).
    pub duplicates: u64,
    /// Among `duplicates`: received after an ack or nack on a cleanly closed
    /// connection, more than the redelivery window later.
    pub acked_redelivered_late: u64,
    /// Among `duplicates`: received twice on one connection.
    pub repeated_on_one_connection: u64,
    /// Receipts of ids never POSTed.
    pub unknown: u64,
    /// Received, though their POST got no status.
    pub delivered_unconfirmed: u64,
    /// Received, though their POST was refused (a 503 after `WAIT` found
    /// too few replicas: the write had landed, only its durability was not
    /// confirmed).
    pub delivered_after_refusal: u64,
    /// The first lost and duplicated ids, for the report.
    pub lost_ids: Vec<u64>,
    pub duplicate_ids: Vec<u64>,
    /// Each accepted message's fate, for checking its delivery receipt.
    pub fates: HashMap<u64, Fate>,
}

const KEEP_IDS: usize = 20;

/// Whether one of `conns` (the user agent's) was up for at least `grace`
/// seconds within [from, to].
fn had_chance(conns: &[&Conn], from: Secs, to: Secs, grace: Secs) -> bool {
    conns
        .iter()
        .any(|c| c.down.min(to) - c.up.max(from) >= grace)
}

/// What became of accepted message `m` (see the module doc), given its
/// receipts, its user agent's connections, the POSTs to its channel and the
/// channel's unregistration.
pub fn fate(
    m: &Sent,
    received: bool,
    conns: &[&Conn],
    same_channel: &[&Sent],
    unregistered_at: Option<Secs>,
    end: Secs,
    grace: Secs,
) -> Fate {
    if received {
        return Fate::Delivered;
    }
    let expired = if m.ttl == 0 {
        !conns
            .iter()
            .any(|c| c.up <= m.sent_at && c.down >= m.answered_at + grace)
    } else {
        let latest = m.answered_at + m.ttl as f64;
        latest <= end && !had_chance(conns, m.sent_at, latest, grace)
    };
    if expired {
        return Fate::Expired;
    }
    if let Some(topic) = &m.topic {
        let replaced = same_channel
            .iter()
            .filter(|n| {
                n.id != m.id
                    && n.topic.as_ref() == Some(topic)
                    && n.ttl > 0
                    && n.outcome != Outcome::Rejected
                    && n.sent_at >= m.answered_at
            })
            .any(|n| !had_chance(conns, m.sent_at, n.sent_at, grace));
        if replaced {
            return Fate::Replaced;
        }
    }
    if let Some(at) = unregistered_at {
        if at >= m.sent_at && !had_chance(conns, m.sent_at, at, grace) {
            return Fate::Unregistered;
        }
    }
    Fate::Lost
}

/// Classifies every accepted message and every repeated receipt.
pub fn classify(r: &Record, grace: Secs) -> Tally {
    classify_within(r, grace, 0.0)
}

/// As `classify`, but a message received again within `window` seconds of
/// its ack (or nack) on a cleanly closed connection counts as redelivered,
/// not as a duplicate: after a node dies, proto-docs allows acks that had
/// not reached the store to be repeated.
pub fn classify_within(r: &Record, grace: Secs, window: Secs) -> Tally {
    let mut t = Tally::default();
    let mut conns_of: HashMap<usize, Vec<&Conn>> = HashMap::new();
    let mut conn_by_id: HashMap<u64, &Conn> = HashMap::new();
    for c in &r.conns {
        conns_of.entry(c.ua).or_default().push(c);
        conn_by_id.insert(c.id, c);
    }
    let mut receipts: HashMap<u64, Vec<&Receipt>> = HashMap::new();
    for rc in &r.receipts {
        receipts.entry(rc.id).or_default().push(rc);
    }
    // A refused POST whose message arrived anyway had, in fact, an outcome
    // the sender could not know: it may have replaced an earlier message
    // with its topic like any other, so it counts as unknown here.
    let sent: Vec<Sent> = r
        .sent
        .iter()
        .map(|s| match s.outcome {
            Outcome::Rejected if receipts.contains_key(&s.id) => Sent {
                outcome: Outcome::Unknown,
                ..s.clone()
            },
            _ => s.clone(),
        })
        .collect();
    let mut by_channel: HashMap<usize, Vec<&Sent>> = HashMap::new();
    let mut by_id: HashMap<u64, &Sent> = HashMap::new();
    for s in &sent {
        by_channel.entry(s.channel).or_default().push(s);
        by_id.insert(s.id, s);
    }
    let mut unreg: HashMap<usize, Secs> = HashMap::new();
    for u in &r.unregistered {
        let at = unreg.entry(u.channel).or_insert(u.at);
        *at = at.min(u.at);
    }
    for list in receipts.values_mut() {
        list.sort_by(|a, b| a.at.total_cmp(&b.at));
    }

    let none: Vec<&Conn> = Vec::new();
    let mut sent: Vec<&Sent> = r.sent.iter().collect();
    sent.sort_by_key(|s| s.id);
    for m in sent {
        let received = receipts.contains_key(&m.id);
        if m.outcome != Outcome::Accepted {
            match m.outcome {
                Outcome::Unknown if received => t.delivered_unconfirmed += 1,
                Outcome::Rejected if received => t.delivered_after_refusal += 1,
                _ => {}
            }
            continue;
        }
        t.accepted += 1;
        if m.ttl == 0 {
            t.accepted_ttl0 += 1;
        }
        let conns = conns_of.get(&m.ua).unwrap_or(&none);
        let same = by_channel.get(&m.channel).map(Vec::as_slice).unwrap_or(&[]);
        let f = fate(
            m,
            received,
            conns,
            same,
            unreg.get(&m.channel).copied(),
            r.end,
            grace,
        );
        t.fates.insert(m.id, f);
        match f {
            Fate::Delivered => t.delivered += 1,
            Fate::Expired => {
                t.expired += 1;
                if m.ttl == 0 {
                    t.expired_ttl0 += 1;
                }
            }
            Fate::Replaced => t.replaced += 1,
            Fate::Unregistered => t.unregistered += 1,
            Fate::Lost => {
                t.lost += 1;
                if t.lost_ids.len() < KEEP_IDS {
                    t.lost_ids.push(m.id);
                }
            }
        }
    }

    let mut ids: Vec<&u64> = receipts.keys().collect();
    ids.sort();
    for id in ids {
        let list = &receipts[id];
        if !by_id.contains_key(id) {
            t.unknown += 1;
            continue;
        }
        let (mut same, mut late) = (false, false);
        for (k, rc) in list.iter().enumerate().skip(1) {
            for e in &list[..k] {
                let clean = conn_by_id.get(&e.conn).is_some_and(|c| c.clean);
                same |= e.conn == rc.conn;
                late |= e.answer != Answer::None && clean && rc.at - e.at > window;
            }
        }
        let again = list.len() > 1;
        t.repeated_on_one_connection += u64::from(same);
        t.acked_redelivered_late += u64::from(late);
        if same || late {
            t.duplicates += 1;
            if t.duplicate_ids.len() < KEEP_IDS {
                t.duplicate_ids.push(*id);
            }
        } else if again {
            t.redelivered += 1;
        }
    }
    t
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    const G: Secs = 2.0;

    /// An accepted POST without a receipt; tests change what they need.
    pub(crate) fn sent(id: u64, ttl: u32, topic: Option<&str>, at: Secs) -> Sent {
        Sent {
            id,
            ua: 0,
            channel: 7,
            ttl,
            topic: topic.map(String::from),
            sent_at: at,
            answered_at: at + 0.01,
            outcome: Outcome::Accepted,
            status: Some(201),
            receipt: false,
            message: None,
        }
    }

    fn conn(id: u64, up: Secs, down: Secs) -> Conn {
        conn_of(id, 0, up, down, true)
    }

    pub(crate) fn conn_of(id: u64, ua: usize, up: Secs, down: Secs, clean: bool) -> Conn {
        Conn {
            id,
            ua,
            up,
            down,
            clean,
        }
    }

    pub(crate) fn got(id: u64, conn: u64, at: Secs, answer: Answer) -> Receipt {
        Receipt {
            id,
            conn,
            at,
            answer,
        }
    }

    /// Classified with the run ending long after everything in `r`,
    /// unless `r` says when it ended.
    fn one(r: &Record) -> Tally {
        let mut r = r.clone();
        if r.end == 0.0 {
            r.end = 1e9;
        }
        classify(&r, G)
    }

    #[test]
    fn received_is_delivered_even_past_its_ttl() {
        let r = Record {
            sent: vec![sent(1, 1, None, 0.0)],
            receipts: vec![got(1, 1, 30.0, Answer::Acked)],
            conns: vec![conn(1, 29.0, 40.0)],
            ..Default::default()
        };
        let t = one(&r);
        assert_eq!((t.accepted, t.delivered, t.lost), (1, 1, 0));
    }

    #[test]
    fn short_ttl_to_an_offline_user_agent_expires() {
        // Offline from 0 to 10; TTL 3 ran out at 3.01 at the latest.
        let mut r = Record {
            sent: vec![sent(1, 3, None, 0.0)],
            conns: vec![conn(1, 10.0, 30.0)],
            ..Default::default()
        };
        assert_eq!(one(&r).expired, 1);
        // Back 1.5 s before the latest expiry: too short a chance to count.
        r.conns = vec![conn(1, 1.51, 30.0)];
        assert_eq!(one(&r).expired, 1);
        // Back with most of the TTL left: it should have come.
        r.conns = vec![conn(1, 0.5, 30.0)];
        let t = one(&r);
        assert_eq!((t.expired, t.lost, t.lost_ids.clone()), (0, 1, vec![1]));
    }

    #[test]
    fn long_ttl_never_received_is_lost() {
        let r = Record {
            sent: vec![sent(1, 3600, None, 0.0)],
            conns: vec![conn(1, 100.0, 110.0)],
            ..Default::default()
        };
        assert_eq!(one(&r).lost, 1);
        // No connection after it at all (say the final drain failed): its
        // TTL had not run out by the end, so nothing excuses it.
        let r = Record {
            sent: vec![sent(1, 3600, None, 0.0)],
            end: 200.0,
            ..Default::default()
        };
        assert_eq!(one(&r).lost, 1);
        let r = Record {
            sent: vec![sent(1, 60, None, 0.0)],
            end: 200.0,
            ..Default::default()
        };
        assert_eq!(one(&r).expired, 1);
    }

    #[test]
    fn ttl_zero_needs_a_connection_spanning_the_post() {
        let mut r = Record {
            sent: vec![sent(1, 0, None, 5.0)],
            conns: vec![conn(1, 0.0, 10.0)],
            ..Default::default()
        };
        let t = one(&r);
        assert_eq!((t.accepted_ttl0, t.lost), (1, 1));
        // Closing right after the answer: the server may drop it.
        r.conns = vec![conn(1, 0.0, 5.5)];
        let t = one(&r);
        assert_eq!((t.expired, t.expired_ttl0), (1, 1));
        // Offline: dropped by design.
        r.conns = vec![conn(1, 6.0, 20.0)];
        assert_eq!(one(&r).expired_ttl0, 1);
    }

    #[test]
    fn topic_replacement_while_offline() {
        let r = Record {
            sent: vec![
                sent(1, 600, Some("t"), 0.0),
                sent(2, 600, Some("t"), 1.0),
                sent(3, 600, Some("t"), 2.0),
            ],
            receipts: vec![got(3, 1, 10.0, Answer::Acked)],
            conns: vec![conn(1, 10.0, 20.0)],
            ..Default::default()
        };
        let t = one(&r);
        assert_eq!((t.replaced, t.delivered, t.lost), (2, 1, 0));
    }

    #[test]
    fn topic_is_no_excuse_when_the_user_agent_was_there() {
        // Online from 0.5 to 8: message 1 should have gone out before 2.
        let r = Record {
            sent: vec![sent(1, 600, Some("t"), 0.0), sent(2, 600, Some("t"), 5.0)],
            receipts: vec![got(2, 1, 5.1, Answer::Acked)],
            conns: vec![conn(1, 0.5, 8.0)],
            ..Default::default()
        };
        assert_eq!(one(&r).lost, 1);
        // Another topic, another channel, a rejected or an earlier POST
        // replace nothing.
        let mut other = sent(2, 600, Some("u"), 1.0);
        let mut elsewhere = sent(3, 600, Some("t"), 1.0);
        elsewhere.channel = 8;
        let mut rejected = sent(4, 600, Some("t"), 1.0);
        rejected.outcome = Outcome::Rejected;
        let r = Record {
            sent: vec![sent(1, 600, Some("t"), 0.5), sent(0, 600, Some("t"), 0.0)],
            conns: vec![conn(1, 10.0, 20.0)],
            ..Default::default()
        };
        let t = one(&r);
        assert_eq!((t.replaced, t.lost), (1, 1), "only the earlier is replaced");
        other.id = 5;
        let r = Record {
            sent: vec![sent(1, 600, Some("t"), 0.0), other, elsewhere, rejected],
            receipts: vec![
                got(5, 1, 10.0, Answer::Acked),
                got(3, 1, 10.0, Answer::Acked),
            ],
            conns: vec![conn(1, 10.0, 20.0)],
            ..Default::default()
        };
        let t = one(&r);
        assert_eq!((t.accepted, t.delivered, t.lost, t.replaced), (3, 2, 1, 0));
        assert_eq!(t.lost_ids, vec![1]);
    }

    #[test]
    fn unregistering_drops_what_is_pending() {
        let mut r = Record {
            sent: vec![sent(1, 600, None, 0.0)],
            conns: vec![conn(1, 10.0, 20.0)],
            unregistered: vec![Unregistration {
                channel: 7,
                at: 10.5,
            }],
            ..Default::default()
        };
        assert_eq!(one(&r).unregistered, 1);
        // Unregistered long after the user agent came back: lost.
        r.unregistered[0].at = 15.0;
        assert_eq!(one(&r).lost, 1);
        // Another channel's unregistration excuses nothing.
        r.unregistered[0] = Unregistration {
            channel: 8,
            at: 10.5,
        };
        assert_eq!(one(&r).lost, 1);
    }

    #[test]
    fn redeliveries_and_duplicates() {
        let mut unclean = conn(2, 10.0, 20.0);
        unclean.clean = false;
        let r = Record {
            sent: (1..=5).map(|i| sent(i, 600, None, 0.0)).collect(),
            receipts: vec![
                // Held, then acked on the next connection: allowed.
                got(1, 1, 1.0, Answer::None),
                got(1, 3, 31.0, Answer::Acked),
                // Acked on a clean connection, then again: a bug.
                got(2, 1, 1.0, Answer::Acked),
                got(2, 3, 31.0, Answer::Acked),
                // Twice on one connection: a bug.
                got(3, 1, 1.0, Answer::None),
                got(3, 1, 2.0, Answer::Acked),
                // Acked on a connection that broke: the ack may be lost.
                got(4, 2, 11.0, Answer::Acked),
                got(4, 3, 31.0, Answer::Acked),
                // Nacked (deletes in Herald), then again: a bug.
                got(5, 1, 1.0, Answer::Nacked),
                got(5, 3, 31.0, Answer::Acked),
                // Never POSTed.
                got(99, 1, 1.0, Answer::Acked),
            ],
            conns: vec![conn(1, 0.0, 5.0), unclean, conn(3, 30.0, 40.0)],
            ..Default::default()
        };
        let t = one(&r);
        assert_eq!(t.delivered, 5);
        assert_eq!(t.redelivered, 2);
        assert_eq!(t.duplicates, 3);
        assert_eq!(t.duplicate_ids, vec![2, 3, 5]);
        assert_eq!(t.acked_redelivered_late, 2);
        assert_eq!(t.repeated_on_one_connection, 1);
        assert_eq!(t.unknown, 1);
    }

    #[test]
    fn a_redelivery_window_excuses_only_early_repeats_of_acked_messages() {
        let r = Record {
            sent: (1..=3).map(|i| sent(i, 600, None, 0.0)).collect(),
            receipts: vec![
                // Acked, closed cleanly, back 4 s later: inside a 5 s window.
                got(1, 1, 1.0, Answer::Acked),
                got(1, 2, 5.0, Answer::Acked),
                // Back 29 s later: outside it.
                got(2, 1, 1.0, Answer::Acked),
                got(2, 2, 30.0, Answer::Acked),
                // Twice on one connection is never excused.
                got(3, 2, 6.0, Answer::None),
                got(3, 2, 7.0, Answer::Acked),
            ],
            conns: vec![conn(1, 0.0, 2.0), conn(2, 4.0, 40.0)],
            ..Default::default()
        };
        let t = classify_within(&r, G, 5.0);
        assert_eq!(t.redelivered, 1);
        assert_eq!(t.duplicates, 2);
        assert_eq!(t.acked_redelivered_late, 1);
        assert_eq!(t.repeated_on_one_connection, 1);
        assert_eq!(t.duplicate_ids, vec![2, 3]);
        // Without a window every repeat after an ack counts.
        assert_eq!(classify(&r, G).acked_redelivered_late, 2);
    }

    #[test]
    fn unconfirmed_posts_are_not_accepted_but_noted_when_received() {
        let mut a = sent(1, 600, None, 0.0);
        a.outcome = Outcome::Unknown;
        let mut b = sent(2, 600, None, 0.0);
        b.outcome = Outcome::Rejected;
        let r = Record {
            sent: vec![a, b],
            receipts: vec![got(1, 1, 1.0, Answer::Acked)],
            conns: vec![conn(1, 0.0, 5.0)],
            ..Default::default()
        };
        let t = one(&r);
        assert_eq!((t.accepted, t.lost, t.delivered_unconfirmed), (0, 0, 1));
    }

    #[test]
    fn a_refused_post_that_arrived_anyway_can_replace_by_topic() {
        let first = sent(1, 600, Some("t"), 0.0);
        let mut second = sent(2, 600, Some("t"), 1.0);
        second.outcome = Outcome::Rejected;
        let mut r = Record {
            sent: vec![first, second],
            receipts: vec![got(2, 1, 5.0, Answer::Acked)],
            conns: vec![conn(1, 4.0, 8.0)],
            end: 10.0,
            ..Default::default()
        };
        let t = one(&r);
        assert_eq!((t.replaced, t.lost, t.delivered_after_refusal), (1, 0, 1));
        // Refused and never seen: it replaced nothing, the first is lost.
        r.receipts.clear();
        let t = one(&r);
        assert_eq!((t.replaced, t.lost, t.delivered_after_refusal), (0, 1, 0));
    }
}
