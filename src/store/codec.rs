//! Byte layouts of keys and values. Documented in proto-docs/storage.md;
//! every value starts with a format byte so layouts can evolve.

use super::{
    BridgeKind, BridgeRoute, ChannelRecord, Message, Outcome, PendingReceipt, ReceiptEvent,
    ReceiptSub, UserRecord,
};
use bytes::Bytes;
use herald_proto::headers::NotificationHeaders;
use herald_proto::ids::{ChannelId, Uaid};
use herald_proto::urgency::Urgency;

const FORMAT: u8 = 1;
/// A message with a flags byte after its channel (bit 0: receipt
/// requested). Messages without flags keep format 1, byte for byte.
const FORMAT_FLAGS: u8 = 2;
const FLAG_RECEIPT: u8 = 1;

pub fn user_key(uaid: &Uaid) -> [u8; 16] {
    uaid.0
}

pub fn channel_key(uaid: &Uaid, channel: &ChannelId) -> [u8; 32] {
    let mut k = [0u8; 32];
    k[..16].copy_from_slice(&uaid.0);
    k[16..].copy_from_slice(channel.as_bytes());
    k
}

pub fn message_key(uaid: &Uaid, seq: u64) -> [u8; 24] {
    let mut k = [0u8; 24];
    k[..16].copy_from_slice(&uaid.0);
    k[16..].copy_from_slice(&seq.to_be_bytes());
    k
}

pub fn topic_key(uaid: &Uaid, channel: &ChannelId, topic: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(32 + topic.len());
    k.extend_from_slice(&channel_key(uaid, channel));
    k.extend_from_slice(topic.as_bytes());
    k
}

pub fn seq_from_message_key(key: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(key.get(16..24)?.try_into().ok()?))
}

/// The smallest key greater than every key starting with `prefix`.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // All 0xff: nothing sorts after the prefix except longer keys; use a
    // key no real prefix reaches.
    vec![0xff; prefix.len() + 1]
}

/// A websocket user agent: format, created, last_seen (17 bytes, as ever).
/// A bridged one adds its route: kind (1 FCM, 2 APNs), then app id,
/// device token and `aps` (empty: none), each as a u16 length and bytes.
pub fn encode_user(r: &UserRecord) -> Vec<u8> {
    let mut v = Vec::with_capacity(17);
    v.push(FORMAT);
    v.extend_from_slice(&r.created.to_be_bytes());
    v.extend_from_slice(&r.last_seen.to_be_bytes());
    if let Some(route) = &r.router {
        v.push(match route.kind {
            BridgeKind::Fcm => 1,
            BridgeKind::Apns => 2,
        });
        for field in [
            route.app_id.as_str(),
            route.token.as_str(),
            route.aps.as_deref().unwrap_or(""),
        ] {
            // Registration caps every field far below 64 KiB.
            let len = field.len().min(u16::MAX as usize);
            v.extend_from_slice(&(len as u16).to_be_bytes());
            v.extend_from_slice(&field.as_bytes()[..len]);
        }
    }
    v
}

pub fn decode_user(v: &[u8]) -> Option<UserRecord> {
    if v.len() < 17 || v[0] != FORMAT {
        return None;
    }
    let router = match v.len() {
        17 => None,
        _ => Some(decode_route(&v[17..])?),
    };
    Some(UserRecord {
        created: u64::from_be_bytes(v[1..9].try_into().ok()?),
        last_seen: u64::from_be_bytes(v[9..17].try_into().ok()?),
        router,
    })
}

fn decode_route(v: &[u8]) -> Option<BridgeRoute> {
    let kind = match v.first()? {
        1 => BridgeKind::Fcm,
        2 => BridgeKind::Apns,
        _ => return None,
    };
    let mut rest = &v[1..];
    let mut fields = Vec::with_capacity(3);
    for _ in 0..3 {
        let len = u16::from_be_bytes(rest.get(..2)?.try_into().ok()?) as usize;
        let field = std::str::from_utf8(rest.get(2..2 + len)?).ok()?;
        fields.push(field.to_string());
        rest = &rest[2 + len..];
    }
    if !rest.is_empty() {
        return None;
    }
    let aps = fields.pop().filter(|a| !a.is_empty());
    let token = fields.pop()?;
    let app_id = fields.pop()?;
    Some(BridgeRoute {
        kind,
        app_id,
        token,
        aps,
    })
}

pub fn encode_channel(r: &ChannelRecord) -> Vec<u8> {
    let mut v = Vec::with_capacity(42);
    v.push(FORMAT);
    v.extend_from_slice(&r.created.to_be_bytes());
    match &r.key_hash {
        Some(h) => {
            v.push(1);
            v.extend_from_slice(h);
        }
        None => v.push(0),
    }
    v
}

pub fn decode_channel(v: &[u8]) -> Option<ChannelRecord> {
    if v.len() < 10 || v[0] != FORMAT {
        return None;
    }
    let created = u64::from_be_bytes(v[1..9].try_into().ok()?);
    let key_hash = match v[9] {
        0 if v.len() == 10 => None,
        1 if v.len() == 42 => Some(v[10..42].try_into().ok()?),
        _ => return None,
    };
    Some(ChannelRecord { created, key_hash })
}

/// Offset of `expires_at` in a message value, read by the compaction filter
/// without decoding the rest.
pub const EXPIRES_AT: std::ops::Range<usize> = 1..9;

pub fn message_expires_at(v: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(v.get(EXPIRES_AT)?.try_into().ok()?))
}

fn put_str(v: &mut Vec<u8>, s: &str) {
    let len = u16::try_from(s.len()).unwrap_or(u16::MAX);
    v.extend_from_slice(&len.to_be_bytes());
    v.extend_from_slice(&s.as_bytes()[..len as usize]);
}

fn take<'a>(v: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    if v.len() < n {
        return None;
    }
    let (head, tail) = v.split_at(n);
    *v = tail;
    Some(head)
}

fn take_str(v: &mut &[u8]) -> Option<String> {
    let len = u16::from_be_bytes(take(v, 2)?.try_into().ok()?) as usize;
    String::from_utf8(take(v, len)?.to_vec()).ok()
}

// format | expires_at u64 | ttl u64 | urgency u8 | channel 16 |
// [format 2: flags u8] | topic (u8 len + bytes) | encoding u8 (0 none, 1 aes128gcm, 2 aesgcm)
// [aesgcm: encryption str, crypto_key str] | data (rest)
pub fn encode_message(m: &Message) -> Vec<u8> {
    let mut v = Vec::with_capacity(64 + m.data.len());
    v.push(if m.receipt { FORMAT_FLAGS } else { FORMAT });
    v.extend_from_slice(&m.expires_at.to_be_bytes());
    v.extend_from_slice(&m.ttl.to_be_bytes());
    v.push(m.urgency as u8);
    v.extend_from_slice(m.channel.as_bytes());
    if m.receipt {
        v.push(FLAG_RECEIPT);
    }
    let topic = m.topic.as_deref().unwrap_or("");
    v.push(topic.len().min(255) as u8);
    v.extend_from_slice(&topic.as_bytes()[..topic.len().min(255)]);
    match &m.headers {
        None => v.push(0),
        Some(h) if h.encoding == "aes128gcm" => v.push(1),
        Some(h) => {
            v.push(2);
            put_str(&mut v, &h.encoding);
            put_str(&mut v, h.encryption.as_deref().unwrap_or(""));
            put_str(&mut v, h.crypto_key.as_deref().unwrap_or(""));
        }
    }
    v.extend_from_slice(&m.data);
    v
}

pub fn decode_message(seq: u64, mut v: &[u8]) -> Option<Message> {
    let v = &mut v;
    let format = take(v, 1)?[0];
    if format != FORMAT && format != FORMAT_FLAGS {
        return None;
    }
    let expires_at = u64::from_be_bytes(take(v, 8)?.try_into().ok()?);
    let ttl = u64::from_be_bytes(take(v, 8)?.try_into().ok()?);
    let urgency = Urgency::from_u8(take(v, 1)?[0])?;
    let channel = ChannelId::from_slice(take(v, 16)?).ok()?;
    // Format 2 exists only to carry a flag, so it always carries one, and
    // only the known one: every value has a single encoding.
    let flags = if format == FORMAT_FLAGS {
        match take(v, 1)?[0] {
            FLAG_RECEIPT => FLAG_RECEIPT,
            _ => return None,
        }
    } else {
        0
    };
    let tlen = take(v, 1)?[0] as usize;
    let topic = String::from_utf8(take(v, tlen)?.to_vec()).ok()?;
    let headers = match take(v, 1)?[0] {
        0 => None,
        1 => Some(NotificationHeaders {
            encoding: "aes128gcm".into(),
            encryption: None,
            crypto_key: None,
        }),
        2 => {
            let encoding = take_str(v)?;
            let encryption = take_str(v)?;
            let crypto_key = take_str(v)?;
            Some(NotificationHeaders {
                encoding,
                encryption: (!encryption.is_empty()).then_some(encryption),
                crypto_key: (!crypto_key.is_empty()).then_some(crypto_key),
            })
        }
        _ => return None,
    };
    Some(Message {
        seq,
        channel,
        expires_at,
        ttl,
        urgency,
        topic: (!topic.is_empty()).then_some(topic),
        headers,
        data: Bytes::copy_from_slice(v),
        receipt: flags & FLAG_RECEIPT != 0,
    })
}

// Receipt ledger (see store::receipt).
// pending: format | sub 16 | channel 16 | expires_at u64 | deadline u64 |
// sent_at u64 (unix ms, 0 = not sent)
pub fn encode_pending(p: &PendingReceipt) -> Vec<u8> {
    let mut v = Vec::with_capacity(57);
    v.push(FORMAT);
    v.extend_from_slice(&p.sub.0);
    v.extend_from_slice(p.channel.as_bytes());
    v.extend_from_slice(&p.expires_at.to_be_bytes());
    v.extend_from_slice(&p.deadline.to_be_bytes());
    v.extend_from_slice(&p.sent_at.unwrap_or(0).to_be_bytes());
    v
}

pub fn decode_pending(mut v: &[u8]) -> Option<PendingReceipt> {
    let v = &mut v;
    if take(v, 1)? != [FORMAT] || v.len() != 56 {
        return None;
    }
    let sub = ReceiptSub(take(v, 16)?.try_into().ok()?);
    let channel = ChannelId::from_slice(take(v, 16)?).ok()?;
    let expires_at = u64::from_be_bytes(take(v, 8)?.try_into().ok()?);
    let deadline = u64::from_be_bytes(take(v, 8)?.try_into().ok()?);
    let sent_at = u64::from_be_bytes(take(v, 8)?.try_into().ok()?);
    Some(PendingReceipt {
        sub,
        channel,
        expires_at,
        deadline,
        sent_at: (sent_at != 0).then_some(sent_at),
    })
}

// receipt: format | id u64 | uaid 16 | channel 16 | seq u64 | outcome u8 |
// code u32 | at u64 (unix ms)
pub fn encode_receipt(e: &ReceiptEvent) -> Vec<u8> {
    let mut v = Vec::with_capacity(62);
    v.push(FORMAT);
    v.extend_from_slice(&e.id.to_be_bytes());
    v.extend_from_slice(&e.uaid.0);
    v.extend_from_slice(e.channel.as_bytes());
    v.extend_from_slice(&e.seq.to_be_bytes());
    v.push(e.outcome.to_u8());
    v.extend_from_slice(&e.outcome.code().unwrap_or(0).to_be_bytes());
    v.extend_from_slice(&e.at.to_be_bytes());
    v
}

pub fn decode_receipt(mut v: &[u8]) -> Option<ReceiptEvent> {
    let v = &mut v;
    if take(v, 1)? != [FORMAT] || v.len() != 61 {
        return None;
    }
    let id = u64::from_be_bytes(take(v, 8)?.try_into().ok()?);
    let uaid = Uaid(take(v, 16)?.try_into().ok()?);
    let channel = ChannelId::from_slice(take(v, 16)?).ok()?;
    let seq = u64::from_be_bytes(take(v, 8)?.try_into().ok()?);
    let kind = take(v, 1)?[0];
    let code = u32::from_be_bytes(take(v, 4)?.try_into().ok()?);
    // Only a rejection has a code: anything else with one is not a value
    // this codec wrote (found by the codec fuzz target).
    if code != 0 && kind != Outcome::Rejected(0).to_u8() {
        return None;
    }
    let at = u64::from_be_bytes(take(v, 8)?.try_into().ok()?);
    Some(ReceiptEvent {
        id,
        uaid,
        channel,
        seq,
        outcome: Outcome::from_u8(kind, code)?,
        at,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(headers: Option<NotificationHeaders>, topic: Option<&str>) -> Message {
        Message {
            seq: 42,
            channel: uuid::Uuid::new_v4(),
            expires_at: 1_700_000_000,
            ttl: 60,
            urgency: Urgency::Low,
            topic: topic.map(String::from),
            headers,
            data: Bytes::from_static(b"\x00\x01payload"),
            receipt: false,
        }
    }

    #[test]
    fn messages_round_trip() {
        let aesgcm = NotificationHeaders {
            encoding: "aesgcm".into(),
            encryption: Some("salt=abc".into()),
            crypto_key: Some("dh=def".into()),
        };
        let new = NotificationHeaders {
            encoding: "aes128gcm".into(),
            encryption: None,
            crypto_key: None,
        };
        let receipt = Message {
            receipt: true,
            ..msg(Some(new.clone()), Some("t2"))
        };
        for m in [
            msg(None, None),
            msg(Some(new), Some("t1")),
            msg(Some(aesgcm), None),
            receipt,
        ] {
            let v = encode_message(&m);
            assert_eq!(message_expires_at(&v), Some(m.expires_at));
            assert_eq!(decode_message(42, &v), Some(m));
        }
        assert_eq!(decode_message(1, &[]), None);
        assert_eq!(decode_message(1, &[9, 9, 9]), None);
    }

    #[test]
    fn records_round_trip() {
        let u = UserRecord {
            created: 5,
            last_seen: 6,
            router: None,
        };
        assert_eq!(encode_user(&u).len(), 17);
        assert_eq!(decode_user(&encode_user(&u)), Some(u));
        for (kind, aps) in [
            (BridgeKind::Fcm, None),
            (
                BridgeKind::Apns,
                Some(r#"{"alert":{"loc-key":"x"}}"#.to_string()),
            ),
        ] {
            let u = UserRecord {
                created: 5,
                last_seen: 6,
                router: Some(BridgeRoute {
                    kind,
                    app_id: "org.mozilla.firefox".into(),
                    token: "dev-token:1".into(),
                    aps,
                }),
            };
            let v = encode_user(&u);
            assert_eq!(decode_user(&v), Some(u));
            // A truncated or extended record is refused, never misread.
            assert_eq!(decode_user(&v[..v.len() - 1]), None);
            assert_eq!(decode_user(&[&v[..], &[0][..]].concat()), None);
        }
        for key_hash in [None, Some([3u8; 32])] {
            let c = ChannelRecord {
                key_hash,
                created: 9,
            };
            assert_eq!(decode_channel(&encode_channel(&c)), Some(c));
        }
    }

    #[test]
    fn receipt_records_round_trip() {
        let p = PendingReceipt {
            sub: ReceiptSub([7; 16]),
            channel: uuid::Uuid::new_v4(),
            expires_at: 10,
            deadline: 70,
            sent_at: Some(9_000),
        };
        assert_eq!(decode_pending(&encode_pending(&p)), Some(p));
        let unsent = PendingReceipt { sent_at: None, ..p };
        assert_eq!(decode_pending(&encode_pending(&unsent)), Some(unsent));
        for outcome in [
            Outcome::Delivered,
            Outcome::Rejected(302),
            Outcome::Expired,
            Outcome::Cancelled,
            Outcome::Gone,
            Outcome::Forwarded,
        ] {
            let e = ReceiptEvent {
                id: 5,
                uaid: Uaid([2; 16]),
                channel: p.channel,
                seq: 99,
                outcome,
                at: 1_700_000_000_000,
            };
            assert_eq!(decode_receipt(&encode_receipt(&e)), Some(e));
        }
        assert_eq!(decode_pending(&[1, 2, 3]), None);
        assert_eq!(decode_receipt(&[]), None);
    }

    #[test]
    fn keys_sort_by_uaid_then_seq() {
        let u = Uaid([1; 16]);
        assert!(message_key(&u, 1) < message_key(&u, 2));
        assert!(message_key(&u, 256) > message_key(&u, 255));
        assert_eq!(seq_from_message_key(&message_key(&u, 77)), Some(77));
        assert_eq!(prefix_end(&[1, 2, 0xff]), vec![1, 3]);
        assert_eq!(prefix_end(&[0xff]), vec![0xff, 0xff]);
    }
}
