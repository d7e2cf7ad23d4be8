//! Exact checking of RFC 8030 delivery receipts for `soak`: given the
//! ledger's fate of each message that asked for a receipt (`Prefer:
//! respond-async`), which receipt outcomes Herald may give it, and by when it
//! must have given one (proto-docs/http-api.md, "Delivery receipts").
//!
//! - **delivered**: the soak's answers decide it. Each ack or nack that
//!   certainly reached the server (its connection closed cleanly) settles
//!   the receipt (`delivered`, or `rejected` with the nack's code); an
//!   earlier answer on a broken connection may or may not have reached it,
//!   so its outcome is allowed too. With no answer that surely arrived, the
//!   message may instead expire (a sent, unacked message gets `SENT_GRACE`
//!   past its TTL) or go with its channel.
//! - **expired**: `expired`, or `gone` when the channel was unregistered
//!   before the server got round to expiring it.
//! - **replaced**: no receipt; `expired` is allowed when the TTL may have run
//!   out before the newer message came.
//! - **unregistered**: `gone`, or `expired` when the TTL may have run out
//!   first.
//! - **lost**: already an error; its receipt is not judged.
//!
//! A message that might have been replaced by a later one with its `Topic`
//! need not have a receipt. Every other message must have exactly one by
//! its deadline; one that is not yet due when the receipts are read may
//! lack it.

use super::ledger::{Answer, Fate, Outcome, Record, Secs, Sent};
use std::collections::HashMap;

/// The code the soak sends in its nacks.
pub const NACK_CODE: u32 = 302;
/// How long past its TTL Herald waits for the ack of a message it sent.
pub const SENT_GRACE: Secs = 60.0;
/// How long Herald may take to decide a receipt once it is due (expiry is
/// swept every second, and expiries are computed from whole seconds).
pub const DECIDE: Secs = 2.5;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Verdict {
    Delivered,
    Rejected(u32),
    Expired,
    Cancelled,
    Gone,
}

impl Verdict {
    /// From a receipt's `outcome` and `code` fields.
    pub fn parse(outcome: &str, code: Option<u64>) -> Option<Verdict> {
        Some(match outcome {
            "delivered" => Verdict::Delivered,
            "rejected" => Verdict::Rejected(code.unwrap_or(0) as u32),
            "expired" => Verdict::Expired,
            "cancelled" => Verdict::Cancelled,
            "gone" => Verdict::Gone,
            _ => return None,
        })
    }
}

/// One receipt read from user agent `ua`'s receipt subscription.
#[derive(Clone, Debug)]
pub struct DeliveryReceipt {
    pub ua: usize,
    /// The message id (last segment of the push's `Location`).
    pub message: String,
    pub verdict: Verdict,
}

/// What a message's receipt may be.
#[derive(Clone, Debug, PartialEq)]
pub struct Expect {
    pub allowed: Vec<Verdict>,
    /// When it must have arrived; infinite when it need never come.
    pub due: Secs,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct ReceiptTally {
    /// Accepted messages that asked for a receipt.
    pub asked: u64,
    /// Receipts read.
    pub received: u64,
    /// Receipts read, by outcome: delivered, rejected, expired, cancelled,
    /// gone.
    pub outcomes: [u64; 5],
    pub errors: u64,
    /// Asked, no receipt yet, and not due yet (or never due).
    pub undecided: u64,
    /// When those of them that must have one are due.
    pub undecided_due: Vec<Secs>,
    /// Receipts for message ids no accepted POST got, allowed when some
    /// receipt-asking POST got no answer (it may have been taken).
    pub unmatched: u64,
    /// The first few errors, described.
    pub notes: Vec<String>,
}

const KEEP_NOTES: usize = 20;

fn push(v: &mut Vec<Verdict>, x: Verdict) {
    if !v.contains(&x) {
        v.push(x);
    }
}

/// The receipt message `m` (which asked for one) may get, given its fate,
/// how the soak answered its notifications (`answers`: time, answer, and
/// whether that answer certainly reached the server, in time order), the
/// POSTs to its channel and the channel's unregistration.
pub fn expect(
    m: &Sent,
    fate: Fate,
    answers: &[(Secs, Answer, bool)],
    same_channel: &[&Sent],
    unregistered_at: Option<Secs>,
) -> Option<Expect> {
    let ttl_out = m.answered_at + m.ttl as f64;
    // Herald's expiry is whole seconds, so the TTL may run out a second early.
    let may_have_run_out_by = |t: Secs| ttl_out - 1.0 <= t;
    let unreg = unregistered_at.filter(|&u| u >= m.sent_at);
    // The first later POST with the same topic: from then on the message may
    // be replaced, which earns no receipt.
    let replaced_from = m.topic.as_ref().and_then(|topic| {
        same_channel
            .iter()
            .filter(|n| {
                n.id != m.id
                    && n.topic.as_ref() == Some(topic)
                    && n.outcome != Outcome::Rejected
                    && n.sent_at >= m.answered_at
            })
            .map(|n| n.sent_at)
            .min_by(f64::total_cmp)
    });
    let mut allowed = Vec::new();
    let due = match fate {
        Fate::Lost => return None,
        Fate::Delivered => {
            let mut settled = None;
            for &(at, answer, reached) in answers {
                match answer {
                    Answer::Acked => push(&mut allowed, Verdict::Delivered),
                    Answer::Nacked => push(&mut allowed, Verdict::Rejected(NACK_CODE)),
                    Answer::None => continue,
                }
                if reached {
                    settled = Some(at);
                    break;
                }
            }
            // Unsettled, the message waits for an ack until its TTL and the
            // grace for sent messages run out.
            let expiry = ttl_out + SENT_GRACE;
            if settled.is_none_or(|a| a >= expiry - 1.0) {
                push(&mut allowed, Verdict::Expired);
            }
            if unreg.is_some_and(|u| settled.is_none_or(|a| u <= a)) {
                push(&mut allowed, Verdict::Gone);
            }
            let mut due = settled
                .unwrap_or(expiry)
                .min(unreg.unwrap_or(Secs::INFINITY));
            if replaced_from.is_some_and(|r| settled.is_none_or(|a| r <= a)) {
                due = Secs::INFINITY;
            }
            due + DECIDE
        }
        Fate::Expired => {
            push(&mut allowed, Verdict::Expired);
            // The user agent may have been sent it on a connection that broke
            // before the notification was read, so allow the grace.
            let mut due = ttl_out + SENT_GRACE;
            if let Some(u) = unreg {
                push(&mut allowed, Verdict::Gone);
                due = due.min(u);
            }
            if replaced_from.is_some() {
                due = Secs::INFINITY;
            }
            due + DECIDE
        }
        Fate::Replaced => {
            if replaced_from.is_none_or(may_have_run_out_by) {
                push(&mut allowed, Verdict::Expired);
            }
            Secs::INFINITY
        }
        Fate::Unregistered => {
            push(&mut allowed, Verdict::Gone);
            let u = unreg.unwrap_or(Secs::INFINITY);
            if may_have_run_out_by(u) {
                push(&mut allowed, Verdict::Expired);
            }
            if replaced_from.is_some_and(|r| r <= u) {
                Secs::INFINITY
            } else {
                u + DECIDE
            }
        }
    };
    Some(Expect { allowed, due })
}

/// Checks the receipts read at `now` against the ledger's `fates`.
pub fn check(
    r: &Record,
    fates: &HashMap<u64, Fate>,
    got: &[DeliveryReceipt],
    now: Secs,
) -> ReceiptTally {
    let mut t = ReceiptTally {
        received: got.len() as u64,
        ..Default::default()
    };
    let note = |t: &mut ReceiptTally, s: String| {
        t.errors += 1;
        if t.notes.len() < KEEP_NOTES {
            t.notes.push(s);
        }
    };
    let mut clean: HashMap<u64, bool> = HashMap::new();
    for c in &r.conns {
        clean.insert(c.id, c.clean);
    }
    let mut answers: HashMap<u64, Vec<(Secs, Answer, bool)>> = HashMap::new();
    for rc in &r.receipts {
        let reached = clean.get(&rc.conn).copied().unwrap_or(false);
        answers
            .entry(rc.id)
            .or_default()
            .push((rc.at, rc.answer, reached));
    }
    for list in answers.values_mut() {
        list.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    let mut by_channel: HashMap<usize, Vec<&Sent>> = HashMap::new();
    for s in &r.sent {
        by_channel.entry(s.channel).or_default().push(s);
    }
    let mut unreg: HashMap<usize, Secs> = HashMap::new();
    for u in &r.unregistered {
        let at = unreg.entry(u.channel).or_insert(u.at);
        *at = at.min(u.at);
    }
    let mut of_message: HashMap<&str, Vec<&DeliveryReceipt>> = HashMap::new();
    for d in got {
        t.outcomes[match d.verdict {
            Verdict::Delivered => 0,
            Verdict::Rejected(_) => 1,
            Verdict::Expired => 2,
            Verdict::Cancelled => 3,
            Verdict::Gone => 4,
        }] += 1;
        of_message.entry(d.message.as_str()).or_default().push(d);
    }
    let mut matched = 0usize;
    let mut sent: Vec<&Sent> = r.sent.iter().filter(|s| s.receipt).collect();
    sent.sort_by_key(|s| s.id);
    let unanswered = sent
        .iter()
        .filter(|s| s.outcome == Outcome::Unknown)
        .count() as u64;
    for m in sent {
        if m.outcome != Outcome::Accepted {
            continue;
        }
        t.asked += 1;
        let Some(message) = m.message.as_deref() else {
            note(
                &mut t,
                format!("id {}: accepted without a message id", m.id),
            );
            continue;
        };
        let mine = of_message.get(message).map(Vec::as_slice).unwrap_or(&[]);
        matched += mine.len();
        let Some(&fate) = fates.get(&m.id) else {
            continue;
        };
        let same = by_channel.get(&m.channel).map(Vec::as_slice).unwrap_or(&[]);
        let ans = answers.get(&m.id).map(Vec::as_slice).unwrap_or(&[]);
        let Some(e) = expect(m, fate, ans, same, unreg.get(&m.channel).copied()) else {
            continue;
        };
        let story = || {
            format!(
                "id {} (message {message}, user agent {}, TTL {}, topic {:?}, POST {:.2}-{:.2} s, fate {fate:?}, answers {ans:?})",
                m.id, m.ua, m.ttl, m.topic, m.sent_at, m.answered_at
            )
        };
        match mine {
            [] if now >= e.due => note(
                &mut t,
                format!(
                    "{}: no receipt by {:.2} s (allowed {:?})",
                    story(),
                    e.due,
                    e.allowed
                ),
            ),
            [] => {
                t.undecided += 1;
                if e.due.is_finite() {
                    t.undecided_due.push(e.due);
                }
            }
            [d] if d.ua != m.ua => note(
                &mut t,
                format!("{}: receipt in user agent {}'s subscription", story(), d.ua),
            ),
            [d] if !e.allowed.contains(&d.verdict) => note(
                &mut t,
                format!(
                    "{}: receipt {:?}, allowed {:?}",
                    story(),
                    d.verdict,
                    e.allowed
                ),
            ),
            [_] => {}
            more => note(
                &mut t,
                format!(
                    "{}: {} receipts {:?}",
                    story(),
                    more.len(),
                    more.iter().map(|d| d.verdict).collect::<Vec<_>>()
                ),
            ),
        }
    }
    // A POST refused with 503 may have been stored and tracked all the
    // same: a store or a track whose answer timed out, or whose `WAIT` the
    // replicas did not confirm in time, still ran on the primary.
    let maybe_taken = r
        .sent
        .iter()
        .filter(|s| s.receipt && s.outcome == Outcome::Rejected && s.status == Some(503))
        .count() as u64;
    t.unmatched = (got.len() - matched) as u64;
    if t.unmatched > unanswered + maybe_taken {
        let s = format!(
            "{} receipts for messages no accepted POST named ({} receipt-asking POSTs went unanswered, {} were refused with 503)",
            t.unmatched, unanswered, maybe_taken
        );
        note(&mut t, s);
    }
    t
}

#[cfg(test)]
mod tests {
    use super::super::ledger::tests::got;
    use super::super::ledger::{Conn, Unregistration};
    use super::*;

    fn sent(id: u64, ttl: u32, topic: Option<&str>, at: Secs) -> Sent {
        Sent {
            receipt: true,
            message: Some(format!("m{id}")),
            ..super::super::ledger::tests::sent(id, ttl, topic, at)
        }
    }

    fn conn(id: u64, up: Secs, down: Secs, clean: bool) -> Conn {
        super::super::ledger::tests::conn_of(id, 0, up, down, clean)
    }

    fn rc(id: u64, verdict: Verdict) -> DeliveryReceipt {
        DeliveryReceipt {
            ua: 0,
            message: format!("m{id}"),
            verdict,
        }
    }

    fn fates(list: &[(u64, Fate)]) -> HashMap<u64, Fate> {
        list.iter().copied().collect()
    }

    #[test]
    fn parses_outcomes() {
        assert_eq!(
            Verdict::parse("rejected", Some(302)),
            Some(Verdict::Rejected(302))
        );
        assert_eq!(Verdict::parse("rejected", None), Some(Verdict::Rejected(0)));
        assert_eq!(Verdict::parse("delivered", None), Some(Verdict::Delivered));
        assert_eq!(Verdict::parse("gone", None), Some(Verdict::Gone));
        assert_eq!(Verdict::parse("lost", None), None);
    }

    #[test]
    fn acks_and_nacks_decide_delivered_messages() {
        let r = Record {
            sent: (1..=4).map(|i| sent(i, 600, None, 0.0)).collect(),
            receipts: vec![
                got(1, 1, 1.0, Answer::Acked),
                got(2, 1, 1.0, Answer::Nacked),
                got(3, 1, 1.0, Answer::Acked),
                got(4, 1, 1.0, Answer::Acked),
            ],
            conns: vec![conn(1, 0.0, 5.0, true)],
            ..Default::default()
        };
        let f = fates(&(1..=4).map(|i| (i, Fate::Delivered)).collect::<Vec<_>>());
        let t = check(
            &r,
            &f,
            &[
                rc(1, Verdict::Delivered),
                rc(2, Verdict::Rejected(302)),
                rc(3, Verdict::Rejected(302)),
            ],
            10.0,
        );
        assert_eq!((t.asked, t.received), (4, 3));
        // 3 acked but rejected, 4 acked and never answered.
        assert_eq!(t.errors, 2, "{:?}", t.notes);
        // Read before 4's ack was due: not yet an error.
        let t = check(&r, &f, &[rc(1, Verdict::Delivered)], 2.0);
        assert_eq!((t.errors, t.undecided), (0, 3), "{:?}", t.notes);
    }

    #[test]
    fn an_answer_on_a_broken_connection_may_not_count() {
        let r = Record {
            sent: vec![sent(1, 30, None, 0.0), sent(2, 30, None, 0.0)],
            receipts: vec![
                got(1, 1, 1.0, Answer::Nacked),
                got(1, 2, 11.0, Answer::Acked),
                // Held, and the user agent never came back for it.
                got(2, 1, 1.0, Answer::None),
            ],
            conns: vec![conn(1, 0.0, 5.0, false), conn(2, 10.0, 20.0, true)],
            ..Default::default()
        };
        let f = fates(&[(1, Fate::Delivered), (2, Fate::Delivered)]);
        for v in [Verdict::Delivered, Verdict::Rejected(302)] {
            let t = check(&r, &f, &[rc(1, v), rc(2, Verdict::Expired)], 200.0);
            assert_eq!(t.errors, 0, "{:?}", t.notes);
        }
        // The unanswered one waits out its TTL and the grace.
        let t = check(&r, &f, &[rc(1, Verdict::Delivered)], 80.0);
        assert_eq!((t.errors, t.undecided), (0, 1), "{:?}", t.notes);
        let t = check(&r, &f, &[rc(1, Verdict::Delivered)], 93.0);
        assert_eq!(t.errors, 1, "{:?}", t.notes);
        // Two receipts for one message.
        let t = check(
            &r,
            &f,
            &[
                rc(1, Verdict::Delivered),
                rc(1, Verdict::Delivered),
                rc(2, Verdict::Expired),
            ],
            200.0,
        );
        assert_eq!(t.errors, 1, "{:?}", t.notes);
    }

    #[test]
    fn expired_replaced_and_unregistered() {
        let r = Record {
            sent: vec![
                sent(1, 3, None, 0.0),
                sent(2, 600, Some("t"), 0.0),
                sent(3, 600, Some("t"), 1.0),
                sent(4, 600, None, 0.0),
                sent(5, 600, None, 0.0),
            ],
            receipts: vec![got(3, 1, 10.0, Answer::Acked)],
            conns: vec![conn(1, 10.0, 20.0, true)],
            unregistered: vec![Unregistration {
                channel: 7,
                at: 10.5,
            }],
            ..Default::default()
        };
        let f = fates(&[
            (1, Fate::Expired),
            (2, Fate::Replaced),
            (3, Fate::Delivered),
            (4, Fate::Unregistered),
            (5, Fate::Lost),
        ]);
        let good = [
            rc(1, Verdict::Expired),
            rc(3, Verdict::Delivered),
            rc(4, Verdict::Gone),
            rc(5, Verdict::Cancelled),
        ];
        let t = check(&r, &f, &good, 100.0);
        assert_eq!((t.asked, t.errors), (5, 0), "{:?}", t.notes);
        assert_eq!(t.outcomes, [1, 0, 1, 1, 1]);
        // The replaced one must have no receipt; the unregistered one none
        // but gone.
        let mut bad = good.to_vec();
        bad.push(rc(2, Verdict::Expired));
        bad[2] = rc(4, Verdict::Expired);
        let t = check(&r, &f, &bad, 100.0);
        assert_eq!(t.errors, 2, "{:?}", t.notes);
        // An expired message may wait out the sent grace; gone once its
        // channel goes.
        let t = check(&r, &f, &good[1..], 12.0);
        // The replaced one is undecided for ever.
        assert_eq!((t.errors, t.undecided), (0, 2), "{:?}", t.notes);
        assert_eq!(t.undecided_due, vec![13.0]);
        let t = check(&r, &f, &good[1..], 14.0);
        assert_eq!(t.errors, 1, "{:?}", t.notes);
    }

    #[test]
    fn stray_receipts_need_an_unanswered_post() {
        let mut a = sent(1, 600, None, 0.0);
        a.outcome = Outcome::Unknown;
        a.message = None;
        let r = Record {
            sent: vec![a],
            ..Default::default()
        };
        let t = check(&r, &HashMap::new(), &[rc(9, Verdict::Delivered)], 10.0);
        assert_eq!((t.asked, t.unmatched, t.errors), (0, 1, 0));
        let t = check(
            &r,
            &HashMap::new(),
            &[rc(9, Verdict::Delivered), rc(8, Verdict::Delivered)],
            10.0,
        );
        assert_eq!(t.errors, 1);
    }

    #[test]
    fn stray_receipts_may_be_of_a_post_refused_with_503() {
        let mut refused = sent(1, 600, None, 0.0);
        refused.outcome = Outcome::Rejected;
        refused.status = Some(410);
        refused.message = None;
        let mut r = Record {
            sent: vec![refused],
            ..Default::default()
        };
        let stray = [rc(9, Verdict::Delivered)];
        assert_eq!(check(&r, &HashMap::new(), &stray, 10.0).errors, 1);
        r.sent[0].status = Some(503);
        let t = check(&r, &HashMap::new(), &stray, 10.0);
        assert_eq!((t.unmatched, t.errors), (1, 0), "{:?}", t.notes);
    }
}
