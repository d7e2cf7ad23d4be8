//! The checks `chaos` adds to the ledger's: what each fault cost (messages
//! accepted while it was on, and how many of those ended lost), how long an
//! old socket outlived its user agent's move, and the verdict.

use super::faults::FaultRun;
use crate::mixed::ledger::{Fate, Outcome, Record, Secs};
use crate::mixed::DualOwner;
use std::collections::HashMap;

#[derive(Clone, Debug, PartialEq)]
pub struct FaultCost {
    pub label: String,
    pub accepted_during: u64,
    pub lost: u64,
}

/// Per fault, the accepted messages POSTed while it was on (from its start
/// until its heal, or until its start for a fault that was never healed)
/// and how many of them ended lost.
pub fn fault_costs(r: &Record, fates: &HashMap<u64, Fate>, runs: &[FaultRun]) -> Vec<FaultCost> {
    runs.iter()
        .map(|f| {
            let from = f.started.unwrap_or(Secs::INFINITY);
            let to = f.healed.unwrap_or(from);
            let during = r.sent.iter().filter(|m| {
                m.outcome == Outcome::Accepted && m.answered_at >= from && m.sent_at <= to
            });
            let (mut accepted_during, mut lost) = (0, 0);
            for m in during {
                accepted_during += 1;
                lost += u64::from(fates.get(&m.id) == Some(&Fate::Lost));
            }
            FaultCost {
                label: f.label.clone(),
                accepted_during,
                lost,
            }
        })
        .collect()
}

/// TTL-0 messages that ended lost and were POSTed while a fault was on or
/// before the nodes had recovered from it (its heal, plus the measured
/// recovery, plus `grace`). RFC 8030 (section 5.2) promises a TTL-0 message
/// only to a user agent that is available at that moment, and one whose
/// node the accepting node cannot reach (cut apart, a clock its peers
/// refuse, a Redis link being re-established) is not; Herald answers 201 and
/// then drops it, as autopush does. Outside every fault window a TTL-0
/// message whose user agent was up is still LOST: that is a bug.
pub fn ttl0_dropped_in_faults(
    r: &Record,
    fates: &HashMap<u64, Fate>,
    runs: &[FaultRun],
    grace: Secs,
) -> Vec<u64> {
    let windows: Vec<(Secs, Secs)> = runs
        .iter()
        .filter_map(|f| {
            let from = f.started?;
            // Never healed nor recovered: the window lasts to the end.
            let to = match (f.healed, f.recovery) {
                (Some(h), Some(rec)) => h + rec + grace,
                _ => Secs::INFINITY,
            };
            Some((from, to))
        })
        .collect();
    r.sent
        .iter()
        .filter(|m| m.ttl == 0 && fates.get(&m.id) == Some(&Fate::Lost))
        .filter(|m| {
            windows
                .iter()
                .any(|&(from, to)| m.answered_at >= from && m.sent_at <= to)
        })
        .map(|m| m.id)
        .collect()
}

/// The longest time an old socket stayed open after its user agent moved,
/// counting one still open at `now` for as long as it has been; and how
/// many were never closed.
pub fn dual_owner_max(moves: &[DualOwner], now: Secs) -> (Secs, u64) {
    let mut max: Secs = 0.0;
    let mut open = 0;
    for d in moves {
        let secs = d.secs.unwrap_or_else(|| {
            open += 1;
            now - d.moved_at
        });
        max = max.max(secs);
    }
    (max, open)
}

/// What must be zero (or within its bound) for a run to pass.
#[derive(Clone, Debug, Default)]
pub struct Counts {
    pub lost: u64,
    pub duplicates: u64,
    pub registrations_lost: u64,
    pub receipt_errors: u64,
    pub acked_redelivered_late: u64,
    pub dual_owner_max_secs: Secs,
    pub dual_owner_bound: Secs,
    /// Fault commands that could not run or failed.
    pub fault_failures: Vec<String>,
}

/// Why the run fails; empty when it passes. The first line always says how
/// many accepted messages were lost, as `soak`'s failure does.
pub fn failures(c: &Counts) -> Vec<String> {
    let mut out = Vec::new();
    for (n, what) in [
        (
            c.duplicates,
            "duplicates (received again on one connection)",
        ),
        (c.registrations_lost, "registrations lost"),
        (c.receipt_errors, "receipt errors"),
        (
            c.acked_redelivered_late,
            "acked messages redelivered after the redelivery window",
        ),
    ] {
        if n > 0 {
            out.push(format!("{n} {what}"));
        }
    }
    if c.dual_owner_max_secs > c.dual_owner_bound {
        out.push(format!(
            "an old socket stayed open {:.1} s after its user agent moved (bound {:.1} s)",
            c.dual_owner_max_secs, c.dual_owner_bound
        ));
    }
    out.extend(
        c.fault_failures
            .iter()
            .map(|f| format!("fault command failed: {f}")),
    );
    if c.lost > 0 || !out.is_empty() {
        out.insert(0, format!("{} accepted messages were lost", c.lost));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mixed::ledger::tests::{conn_of as conn, got};
    use crate::mixed::ledger::{self, Answer, Sent};

    fn sent(id: u64, ua: usize, at: Secs, ttl: u32) -> Sent {
        Sent {
            ua,
            channel: ua,
            answered_at: at + 0.1,
            ..ledger::tests::sent(id, ttl, None, at)
        }
    }

    fn fault(label: &str, started: Secs, healed: Secs) -> FaultRun {
        FaultRun {
            label: label.into(),
            started: Some(started),
            healed: Some(healed),
            ..Default::default()
        }
    }

    /// A TTL-0 message dropped while two nodes were cut apart is excused;
    /// one dropped after the nodes had recovered is not, nor is a message
    /// with a TTL lost inside the window.
    #[test]
    fn only_ttl0_messages_inside_a_fault_window_are_excused() {
        let r = Record {
            sent: vec![
                sent(1, 0, 12.0, 0),
                sent(2, 0, 21.0, 0),
                sent(3, 0, 40.0, 0),
                sent(4, 0, 13.0, 3600),
            ],
            conns: vec![conn(1, 0, 0.0, 60.0, true)],
            end: 60.0,
            ..Default::default()
        };
        let t = ledger::classify(&r, 2.0);
        assert_eq!(t.lost, 4);
        let mut cut = fault("cut", 10.0, 20.0);
        cut.recovery = Some(0.5);
        assert_eq!(
            ttl0_dropped_in_faults(&r, &t.fates, &[cut], 2.0),
            vec![1, 2]
        );
        // A fault never recovered from excuses TTL 0 to the end of the run.
        let mut stuck = fault("stuck", 10.0, 20.0);
        stuck.recovery = None;
        assert_eq!(
            ttl0_dropped_in_faults(&r, &t.fates, &[stuck], 2.0),
            vec![1, 2, 3]
        );
        assert!(ttl0_dropped_in_faults(&r, &t.fates, &[], 2.0).is_empty());
    }

    /// A message accepted during a partition and never delivered though its
    /// user agent came back for long: LOST, and charged to that fault.
    #[test]
    fn a_message_lost_during_a_fault_is_charged_to_it() {
        let r = Record {
            sent: vec![
                sent(1, 0, 12.0, 3600),
                sent(2, 0, 14.0, 3600),
                sent(3, 0, 30.0, 3600),
            ],
            receipts: vec![
                got(2, 2, 41.0, Answer::Acked),
                got(3, 2, 42.0, Answer::Acked),
            ],
            conns: vec![conn(1, 0, 0.0, 11.0, true), conn(2, 0, 40.0, 60.0, true)],
            end: 60.0,
            ..Default::default()
        };
        let t = ledger::classify(&r, 2.0);
        assert_eq!(t.lost, 1);
        assert_eq!(t.lost_ids, vec![1]);
        let costs = fault_costs(
            &r,
            &t.fates,
            &[fault("cut", 10.0, 20.0), fault("slow", 25.0, 35.0)],
        );
        assert_eq!(
            costs[0],
            FaultCost {
                label: "cut".into(),
                accepted_during: 2,
                lost: 1
            }
        );
        assert_eq!(
            costs[1],
            FaultCost {
                label: "slow".into(),
                accepted_during: 1,
                lost: 0
            }
        );
        let f = failures(&Counts {
            lost: t.lost,
            ..Default::default()
        });
        assert_eq!(f, vec!["1 accepted messages were lost".to_string()]);
    }

    /// Acked on a cleanly closed connection, then back 20 s later: late with
    /// a 5 s window, and the run fails on it.
    #[test]
    fn a_late_redelivery_of_an_acked_message_fails_the_run() {
        let r = Record {
            sent: vec![sent(1, 0, 1.0, 3600)],
            receipts: vec![
                got(1, 1, 2.0, Answer::Acked),
                got(1, 2, 22.0, Answer::Acked),
            ],
            conns: vec![conn(1, 0, 0.0, 5.0, true), conn(2, 0, 20.0, 30.0, true)],
            end: 30.0,
            ..Default::default()
        };
        let t = ledger::classify_within(&r, 2.0, 5.0);
        assert_eq!((t.lost, t.acked_redelivered_late), (0, 1));
        let counts = Counts {
            acked_redelivered_late: t.acked_redelivered_late,
            duplicates: t.repeated_on_one_connection,
            ..Default::default()
        };
        let f = failures(&counts);
        assert!(f[0].contains("were lost"), "{f:?}");
        assert!(
            f[1].contains("redelivered after the redelivery window"),
            "{f:?}"
        );
        // Within a 30 s window the same history passes.
        let t = ledger::classify_within(&r, 2.0, 30.0);
        assert_eq!((t.acked_redelivered_late, t.redelivered), (0, 1));
    }

    #[test]
    fn lost_registrations_and_wrong_receipts_fail_the_run() {
        for counts in [
            Counts {
                registrations_lost: 1,
                ..Default::default()
            },
            Counts {
                receipt_errors: 2,
                ..Default::default()
            },
            Counts {
                fault_failures: vec!["kill: start [\"kill\"]: exit status: 1".into()],
                ..Default::default()
            },
        ] {
            let f = failures(&counts);
            assert_eq!(f.len(), 2, "{f:?}");
            assert_eq!(f[0], "0 accepted messages were lost");
        }
        assert!(failures(&Counts::default()).is_empty());
    }

    /// An old socket the old node never closed counts for as long as it has
    /// been open, so a service that never fences fails the bound.
    #[test]
    fn a_dual_owner_beyond_the_bound_fails_the_run() {
        let moves = vec![
            DualOwner {
                moved_at: 5.0,
                secs: Some(0.2),
                notifications: 0,
            },
            DualOwner {
                moved_at: 10.0,
                secs: None,
                notifications: 3,
            },
        ];
        let (max, open) = dual_owner_max(&moves, 40.0);
        assert_eq!((max, open), (30.0, 1));
        let f = failures(&Counts {
            dual_owner_max_secs: max,
            dual_owner_bound: 10.0,
            ..Default::default()
        });
        assert!(f[1].contains("stayed open 30.0 s"), "{f:?}");
        let (max, _) = dual_owner_max(&moves[..1], 40.0);
        assert!(failures(&Counts {
            dual_owner_max_secs: max,
            dual_owner_bound: 10.0,
            ..Default::default()
        })
        .is_empty());
    }
}
