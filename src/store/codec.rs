//! Byte layouts of keys and values. Documented in proto-docs/storage.md;
//! every value starts with a format byte so layouts can evolve.

use super::{ChannelRecord, Message, UserRecord};
use crate::ids::{ChannelId, Uaid};
use crate::protocol::NotificationHeaders;
use crate::webpush::Urgency;
use bytes::Bytes;

const FORMAT: u8 = 1;

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

pub fn encode_user(r: &UserRecord) -> Vec<u8> {
    let mut v = Vec::with_capacity(17);
    v.push(FORMAT);
    v.extend_from_slice(&r.created.to_be_bytes());
    v.extend_from_slice(&r.last_seen.to_be_bytes());
    v
}

pub fn decode_user(v: &[u8]) -> Option<UserRecord> {
    if v.len() != 17 || v[0] != FORMAT {
        return None;
    }
    Some(UserRecord {
        created: u64::from_be_bytes(v[1..9].try_into().ok()?),
        last_seen: u64::from_be_bytes(v[9..17].try_into().ok()?),
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
// topic (u8 len + bytes) | encoding u8 (0 none, 1 aes128gcm, 2 aesgcm)
// [aesgcm: encryption str, crypto_key str] | data (rest)
pub fn encode_message(m: &Message) -> Vec<u8> {
    let mut v = Vec::with_capacity(64 + m.data.len());
    v.push(FORMAT);
    v.extend_from_slice(&m.expires_at.to_be_bytes());
    v.extend_from_slice(&m.ttl.to_be_bytes());
    v.push(m.urgency as u8);
    v.extend_from_slice(m.channel.as_bytes());
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
    if take(v, 1)? != [FORMAT] {
        return None;
    }
    let expires_at = u64::from_be_bytes(take(v, 8)?.try_into().ok()?);
    let ttl = u64::from_be_bytes(take(v, 8)?.try_into().ok()?);
    let urgency = Urgency::from_u8(take(v, 1)?[0])?;
    let channel = ChannelId::from_slice(take(v, 16)?).ok()?;
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
        for m in [
            msg(None, None),
            msg(Some(new), Some("t1")),
            msg(Some(aesgcm), None),
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
        };
        assert_eq!(decode_user(&encode_user(&u)), Some(u));
        for key_hash in [None, Some([3u8; 32])] {
            let c = ChannelRecord {
                key_hash,
                created: 9,
            };
            assert_eq!(decode_channel(&encode_channel(&c)), Some(c));
        }
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
