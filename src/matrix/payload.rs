//! What a notification becomes on the device: the message body and its
//! TTL, urgency and topic. Pure, no I/O.
//!
//! The body is what UnifiedPush's own gateway (common-proxies) pushes, so
//! Matrix clients written for it read Herald's the same way: the JSON the
//! homeserver sent, `{"notification": {...}}`, without `devices`.

use super::request::{Notify, Prio};
use herald_proto::urgency::Urgency;
use serde_json::{json, Map, Value};

/// TTL of a high-priority notification: a day. A message notification
/// older than that is stale (the user has opened the client, which syncs,
/// or the homeserver has sent newer counts), but a phone off for a night
/// still gets what arrived meanwhile.
pub const TTL_HIGH: u64 = 24 * 60 * 60;
/// TTL of a low-priority one: an hour. Synapse marks "low" what needs no
/// sound or highlight (ordinary room messages, count updates): useful
/// soon, noise later.
pub const TTL_LOW: u64 = 60 * 60;
/// The topic of notifications that only carry unread counts: a newer one
/// replaces an undelivered older one, as only the latest counts matter.
/// Notifications about events have no topic: each event matters.
pub const COUNTS_TOPIC: &str = "matrix-counts";

/// How the message is stored and delivered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub ttl: u64,
    pub urgency: Urgency,
    pub topic: Option<String>,
}

pub fn delivery(notify: &Notify, max_ttl: u64) -> Delivery {
    let (ttl, urgency) = match notify.prio {
        Prio::High => (TTL_HIGH, Urgency::High),
        Prio::Low => (TTL_LOW, Urgency::Low),
    };
    Delivery {
        ttl: ttl.min(max_ttl),
        urgency,
        topic: notify.counts_only().then(|| COUNTS_TOPIC.to_string()),
    }
}

/// The bodies to push, best first, each at most `max` bytes: the whole
/// notification, then without the event's `content` (the spec lets a
/// pusher omit it; the client can fetch the event by its id). Empty when
/// not even the second fits.
pub fn bodies(notification: &Map<String, Value>, max: usize) -> Vec<Vec<u8>> {
    let whole = body(notification);
    let mut out = Vec::with_capacity(2);
    if whole.len() <= max {
        out.push(whole);
    }
    if notification.contains_key("content") {
        let mut slim = notification.clone();
        slim.remove("content");
        let slim = body(&slim);
        if slim.len() <= max {
            out.push(slim);
        }
    }
    out
}

fn body(notification: &Map<String, Value>) -> Vec<u8> {
    json!({ "notification": notification })
        .to_string()
        .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn notify(v: Value) -> Notify {
        super::super::request::parse(v.to_string().as_bytes()).unwrap()
    }

    fn example() -> Notify {
        notify(json!({"notification": {
            "event_id": "$e", "room_id": "!r:example.com", "prio": "high",
            "content": {"msgtype": "m.text", "body": "x".repeat(500)},
            "counts": {"unread": 2},
            "devices": [{"app_id": "a", "pushkey": "k"}]
        }}))
    }

    #[test]
    fn the_body_is_the_notification_without_devices() {
        let n = example();
        let bodies = bodies(&n.notification, 4096);
        let first: Value = serde_json::from_slice(&bodies[0]).unwrap();
        assert_eq!(first["notification"]["event_id"], "$e");
        assert_eq!(first["notification"]["counts"]["unread"], 2);
        assert!(first["notification"].get("devices").is_none());
        let second: Value = serde_json::from_slice(&bodies[1]).unwrap();
        assert!(second["notification"].get("content").is_none());
        assert_eq!(second["notification"]["event_id"], "$e");
    }

    #[test]
    fn content_goes_first_when_too_big_then_nothing_fits() {
        let n = example();
        let whole = bodies(&n.notification, usize::MAX)[0].len();
        let slim = bodies(&n.notification, usize::MAX)[1].len();
        assert_eq!(bodies(&n.notification, whole).len(), 2);
        let only_slim = bodies(&n.notification, whole - 1);
        assert_eq!(only_slim.len(), 1);
        assert_eq!(only_slim[0].len(), slim);
        assert!(bodies(&n.notification, slim - 1).is_empty());
    }

    #[test]
    fn prio_sets_ttl_and_urgency_within_max_ttl() {
        let high = delivery(&example(), 30 * 86400);
        assert_eq!(
            (high.ttl, high.urgency, high.topic),
            (TTL_HIGH, Urgency::High, None)
        );
        let mut low = example();
        low.prio = Prio::Low;
        let low = delivery(&low, 30 * 86400);
        assert_eq!((low.ttl, low.urgency), (TTL_LOW, Urgency::Low));
        assert_eq!(delivery(&example(), 600).ttl, 600);
    }

    #[test]
    fn counts_only_notifications_replace_each_other() {
        let n = notify(
            json!({"notification": {"counts": {"unread": 3}, "devices": [{"pushkey": "k"}]}}),
        );
        assert_eq!(delivery(&n, 86400).topic.as_deref(), Some(COUNTS_TOPIC));
        assert!(crate::webpush::is_valid_topic(COUNTS_TOPIC));
    }
}
