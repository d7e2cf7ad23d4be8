//! One contract for every `Store` engine: each case is written once and run
//! against RocksDB (in a tempdir), the in-memory store, a standalone Redis
//! and a Redis Cluster
//! (real servers from scripts/redis.sh, shared by the cases of this process;
//! every case uses its own random uaids). Redis cases also look at the raw
//! keys, through plain clients, where the contract is about memory: expired
//! payloads leave by themselves, a user agent leaves nothing behind.
//!
//! The receipt ledger (`ReceiptStore`) has its own cases, on the same
//! engines.

#[path = "common/redis.rs"]
mod redis_harness;

use bytes::Bytes;
use herald::store::{
    now_micros, now_secs, ChannelRecord, Directory, MemStore, Message, Outcome, Owner, OwnerSeen,
    PendingReceipt, ReceiptEvent, ReceiptState, ReceiptStore, ReceiptSub, RedisStore, RocksStore,
    Store, UserRecord, ACK_GRACE_SECS,
};
use herald_proto::headers::NotificationHeaders;
use herald_proto::ids::{ChannelId, Uaid};
use herald_proto::urgency::Urgency;
use redis_harness::{shared_cluster, shared_server, RedisCluster, RedisServer};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Seconds a silent user agent lives in the Redis engines under test.
const UA_EXPIRY: u64 = 3600;
/// How long the Redis engines under test keep decided receipts.
const RECEIPT_RETENTION: Duration = Duration::from_secs(600);

/// Raw access to the Redis behind an engine.
enum Raw {
    Server(&'static RedisServer),
    Cluster(&'static RedisCluster),
}

impl Raw {
    /// A connection to the node holding `key` (the primary, in a cluster:
    /// replicas lag).
    fn conn_for(&self, key: &str) -> redis::Connection {
        match self {
            Raw::Server(s) => s.client(),
            Raw::Cluster(c) => c.node(c.primary_for(key.as_bytes())),
        }
    }

    fn query<T: redis::FromRedisValue>(&self, key: &str, cmd: &mut redis::Cmd) -> T {
        cmd.query(&mut self.conn_for(key)).expect("raw Redis query")
    }

    fn exists(&self, key: &str) -> bool {
        self.query::<i64>(key, redis::cmd("EXISTS").arg(key)) == 1
    }

    /// Unix seconds at which `key` expires; -1 none, -2 no key.
    fn expiretime(&self, key: &str) -> i64 {
        self.query(key, redis::cmd("EXPIRETIME").arg(key))
    }

    /// Every key of `uaid` where its data lives.
    fn keys_of(&self, uaid: &Uaid) -> Vec<String> {
        let tag = format!("{{{uaid}}}");
        let mut conn = self.conn_for(&tag);
        redis::cmd("SCAN")
            .cursor_arg(0)
            .arg("MATCH")
            .arg(format!("herald:*{tag}*"))
            .arg("COUNT")
            .arg(1000)
            .clone()
            .iter::<String>(&mut conn)
            .expect("SCAN")
            .collect::<Result<_, _>>()
            .expect("SCAN")
    }
}

fn user_key(uaid: &Uaid) -> String {
    format!("herald:u:{{{uaid}}}")
}
fn payload_key(uaid: &Uaid, seq: u64) -> String {
    format!("herald:p:{{{uaid}}}:{seq}")
}
fn messages_key(uaid: &Uaid) -> String {
    format!("herald:m:{{{uaid}}}")
}
fn topics_key(uaid: &Uaid) -> String {
    format!("herald:t:{{{uaid}}}")
}
fn channels_key(uaid: &Uaid) -> String {
    format!("herald:c:{{{uaid}}}")
}

/// An engine under test. `peer` is a second node on the same data (for
/// RocksDB, which one process opens once, the same store); `ledger` and
/// `ledger_peer` are their receipt ledgers.
struct Engine {
    store: Arc<dyn Store>,
    peer: Arc<dyn Store>,
    ledger: Arc<dyn ReceiptStore>,
    ledger_peer: Arc<dyn ReceiptStore>,
    raw: Option<Raw>,
    _dir: Option<tempfile::TempDir>,
}

async fn rocks() -> Engine {
    let dir = tempfile::tempdir().unwrap();
    let rocks = RocksStore::open(dir.path(), false, None).unwrap();
    let store: Arc<dyn Store> = Arc::new(rocks.clone());
    let ledger: Arc<dyn ReceiptStore> = Arc::new(rocks);
    Engine {
        peer: store.clone(),
        store,
        ledger_peer: ledger.clone(),
        ledger,
        raw: None,
        _dir: Some(dir),
    }
}

/// One process, one store: its peer is itself, as with RocksDB.
async fn memory() -> Engine {
    let mem = Arc::new(MemStore::new());
    Engine {
        store: mem.clone(),
        peer: mem.clone(),
        ledger: mem.clone(),
        ledger_peer: mem,
        raw: None,
        _dir: None,
    }
}

async fn connect(url: &str) -> Arc<RedisStore> {
    let store = RedisStore::connect(url, None, UA_EXPIRY).await.unwrap();
    Arc::new(store.with_receipt_retention(RECEIPT_RETENTION))
}

async fn redis_engine(url: &str, raw: Raw) -> Engine {
    let (store, peer) = (connect(url).await, connect(url).await);
    Engine {
        store: store.clone(),
        peer: peer.clone(),
        ledger: store,
        ledger_peer: peer,
        raw: Some(raw),
        _dir: None,
    }
}

async fn standalone() -> Engine {
    let server = shared_server();
    redis_engine(server.url(), Raw::Server(server)).await
}

async fn cluster() -> Engine {
    let cluster = shared_cluster();
    redis_engine(cluster.url(), Raw::Cluster(cluster)).await
}

fn user(last_seen: u64) -> UserRecord {
    UserRecord {
        created: last_seen.saturating_sub(100),
        last_seen,
        router: None,
    }
}

fn channel_record(key_hash: Option<[u8; 32]>) -> ChannelRecord {
    ChannelRecord {
        key_hash,
        created: now_secs(),
    }
}

fn message(store: &dyn Store, channel: ChannelId, ttl: u64, topic: Option<&str>) -> Message {
    Message {
        seq: store.next_seq(),
        channel,
        expires_at: now_secs() + ttl,
        ttl,
        urgency: Urgency::Normal,
        topic: topic.map(String::from),
        headers: Some(NotificationHeaders {
            encoding: "aes128gcm".into(),
            encryption: None,
            crypto_key: None,
        }),
        data: Bytes::from(format!("payload {}", rand_u32())),
        receipt: false,
    }
}

fn rand_u32() -> u32 {
    rand::random()
}

fn new_channel() -> ChannelId {
    uuid::Uuid::new_v4()
}

async fn seqs(store: &dyn Store, uaid: &Uaid) -> Vec<u64> {
    let all = store.read_messages(uaid, 0, 10_000).await.unwrap();
    all.iter().map(|m| m.seq).collect()
}

async fn users_round_trip_and_drop(e: Engine) {
    let s = &*e.store;
    let u = Uaid::random();
    assert_eq!(s.get_user(&u).await.unwrap(), None);
    let now = now_secs();
    s.put_user(&u, &user(now)).await.unwrap();
    assert_eq!(s.get_user(&u).await.unwrap(), Some(user(now)));
    s.put_user(&u, &user(now + 1)).await.unwrap();
    assert_eq!(s.get_user(&u).await.unwrap(), Some(user(now + 1)));

    let (c1, c2) = (new_channel(), new_channel());
    s.put_channel(&u, &c1, &channel_record(None)).await.unwrap();
    s.put_channel(&u, &c2, &channel_record(Some([7; 32])))
        .await
        .unwrap();
    let m1 = message(s, c1, 600, Some("t"));
    s.put_message(&u, &m1).await.unwrap();
    s.put_message(&u, &message(s, c2, 600, None)).await.unwrap();

    let other = Uaid::random();
    s.put_user(&other, &user(now)).await.unwrap();
    s.put_channel(&other, &c1, &channel_record(None))
        .await
        .unwrap();
    s.put_message(&other, &message(s, c1, 600, Some("t")))
        .await
        .unwrap();

    if let Some(raw) = &e.raw {
        // Silent user agents vanish by themselves, subscriptions with them.
        for key in [user_key(&u), channels_key(&u)] {
            let at = raw.expiretime(&key);
            let want = (now + UA_EXPIRY) as i64;
            assert!((want - 5..=want + 5).contains(&at), "{key} expires at {at}");
        }
        // user, channels, messages, expiries, topics, two payloads.
        assert_eq!(raw.keys_of(&u).len(), 7, "{:?}", raw.keys_of(&u));
    }

    e.peer.drop_user(&u).await.unwrap();
    assert_eq!(s.get_user(&u).await.unwrap(), None);
    assert_eq!(s.get_channel(&u, &c1).await.unwrap(), None);
    assert_eq!(s.count_channels(&u, 10).await.unwrap(), 0);
    assert!(seqs(s, &u).await.is_empty());
    assert_eq!(s.count_messages(&u, now, 10).await.unwrap(), 0);
    assert_eq!(s.get_message(&u, m1.seq).await.unwrap(), None);
    if let Some(raw) = &e.raw {
        assert_eq!(raw.keys_of(&u), Vec::<String>::new());
    }
    // Nobody else's data went with it.
    assert!(s.get_user(&other).await.unwrap().is_some());
    assert!(s.get_channel(&other, &c1).await.unwrap().is_some());
    assert_eq!(seqs(s, &other).await.len(), 1);
    s.drop_user(&other).await.unwrap();
}

async fn channels_and_their_removal(e: Engine) {
    let s = &*e.store;
    let u = Uaid::random();
    let (c1, c2, missing) = (new_channel(), new_channel(), new_channel());
    let r1 = channel_record(Some([3; 32]));
    let r2 = channel_record(None);
    s.put_channel(&u, &c1, &r1).await.unwrap();
    s.put_channel(&u, &c2, &r2).await.unwrap();
    assert_eq!(s.get_channel(&u, &c1).await.unwrap(), Some(r1));
    assert_eq!(s.get_channel(&u, &c2).await.unwrap(), Some(r2));
    assert_eq!(s.get_channel(&u, &missing).await.unwrap(), None);
    assert_eq!(s.count_channels(&u, 10).await.unwrap(), 2);
    assert_eq!(s.count_channels(&u, 1).await.unwrap(), 1);
    let mut listed = e.peer.list_channels(&u).await.unwrap();
    listed.sort();
    let mut both = vec![c1, c2];
    both.sort();
    assert_eq!(listed, both, "every channel listed, from any node");
    assert!(s.list_channels(&Uaid::random()).await.unwrap().is_empty());
    // Re-registering overwrites.
    s.put_channel(&u, &c1, &r2).await.unwrap();
    assert_eq!(s.get_channel(&u, &c1).await.unwrap(), Some(r2));
    assert_eq!(s.count_channels(&u, 10).await.unwrap(), 2);

    s.put_message(&u, &message(s, c1, 600, Some("t")))
        .await
        .unwrap();
    s.put_message(&u, &message(s, c1, 600, None)).await.unwrap();
    let keep = message(s, c2, 600, Some("t"));
    s.put_message(&u, &keep).await.unwrap();

    assert!(e.peer.remove_channel(&u, &c1).await.unwrap());
    assert!(!s.remove_channel(&u, &c1).await.unwrap());
    assert!(!s.remove_channel(&u, &missing).await.unwrap());
    assert_eq!(s.get_channel(&u, &c1).await.unwrap(), None);
    assert_eq!(s.count_channels(&u, 10).await.unwrap(), 1);
    assert_eq!(s.list_channels(&u).await.unwrap(), vec![c2]);
    assert_eq!(seqs(s, &u).await, vec![keep.seq]);
    assert_eq!(s.count_messages(&u, now_secs(), 10).await.unwrap(), 1);
    if let Some(raw) = &e.raw {
        let fields: Vec<Vec<u8>> =
            raw.query(&topics_key(&u), redis::cmd("HKEYS").arg(topics_key(&u)));
        assert!(
            fields.iter().all(|f| !f.starts_with(c1.as_bytes())),
            "c1's topics are gone"
        );
        assert_eq!(fields.len(), 1, "c2's topic stays");
    }
    // c1's topic went with it; c2's is still there.
    s.put_channel(&u, &c1, &r1).await.unwrap();
    let fresh = s
        .put_message(&u, &message(s, c1, 600, Some("t")))
        .await
        .unwrap();
    assert!(fresh.replaced.is_none());
    let again = s
        .put_message(&u, &message(s, c2, 600, Some("t")))
        .await
        .unwrap();
    assert!(again.replaced.is_some());
    s.drop_user(&u).await.unwrap();
}

async fn messages_oldest_first_with_paging(e: Engine) {
    let s = &*e.store;
    let u = Uaid::random();
    let ch = new_channel();
    let header_kinds = [
        None,
        Some(NotificationHeaders {
            encoding: "aes128gcm".into(),
            encryption: None,
            crypto_key: None,
        }),
        Some(NotificationHeaders {
            encoding: "aesgcm".into(),
            encryption: Some("salt=abc".into()),
            crypto_key: Some("dh=def".into()),
        }),
    ];
    let mut stored = Vec::new();
    for i in 0..6 {
        let mut m = message(s, ch, 600, None);
        m.headers = header_kinds[i % 3].clone();
        m.urgency = [Urgency::VeryLow, Urgency::Low, Urgency::High][i % 3];
        m.data = if m.headers.is_none() {
            Bytes::new()
        } else {
            Bytes::from(vec![i as u8; 100 + i])
        };
        let node = if i % 2 == 0 { &e.store } else { &e.peer };
        assert!(node.put_message(&u, &m).await.unwrap().replaced.is_none());
        stored.push(m);
    }
    assert_eq!(s.read_messages(&u, 0, 100).await.unwrap(), stored);
    assert_eq!(s.read_messages(&u, 0, 2).await.unwrap(), stored[..2]);
    assert_eq!(
        s.read_messages(&u, stored[1].seq, 3).await.unwrap(),
        stored[2..5]
    );
    assert_eq!(
        s.read_messages(&u, stored[4].seq, 3).await.unwrap(),
        stored[5..]
    );
    assert!(s
        .read_messages(&u, stored[5].seq, 3)
        .await
        .unwrap()
        .is_empty());
    assert!(s.read_messages(&u, 0, 0).await.unwrap().is_empty());
    for m in &stored {
        assert_eq!(s.get_message(&u, m.seq).await.unwrap().as_ref(), Some(m));
    }
    assert_eq!(
        s.get_message(&Uaid::random(), stored[0].seq).await.unwrap(),
        None
    );

    assert!(e.peer.delete_message(&u, stored[0].seq).await.unwrap());
    assert!(!s.delete_message(&u, stored[0].seq).await.unwrap());
    assert_eq!(s.get_message(&u, stored[0].seq).await.unwrap(), None);
    assert_eq!(s.read_messages(&u, 0, 100).await.unwrap(), stored[1..]);
    assert_eq!(s.count_messages(&u, now_secs(), 100).await.unwrap(), 5);
    s.drop_user(&u).await.unwrap();
}

async fn topics_replace_pending_messages(e: Engine) {
    let s = &*e.store;
    let u = Uaid::random();
    let (c1, c2) = (new_channel(), new_channel());
    let first = message(s, c1, 600, Some("t"));
    assert!(s.put_message(&u, &first).await.unwrap().replaced.is_none());
    let other_channel = message(s, c2, 600, Some("t"));
    assert!(s
        .put_message(&u, &other_channel)
        .await
        .unwrap()
        .replaced
        .is_none());
    let other_topic = message(s, c1, 600, Some("u"));
    assert!(s
        .put_message(&u, &other_topic)
        .await
        .unwrap()
        .replaced
        .is_none());
    let second = message(&*e.peer, c1, 600, Some("t"));
    assert!(e
        .peer
        .put_message(&u, &second)
        .await
        .unwrap()
        .replaced
        .is_some());
    assert_eq!(
        seqs(s, &u).await,
        vec![other_channel.seq, other_topic.seq, second.seq]
    );
    assert_eq!(s.get_message(&u, first.seq).await.unwrap(), None);
    assert_eq!(s.count_messages(&u, now_secs(), 100).await.unwrap(), 3);
    // Once acknowledged, the next message with the topic replaces nothing.
    assert!(s.delete_message(&u, second.seq).await.unwrap());
    let third = message(s, c1, 600, Some("t"));
    assert!(s.put_message(&u, &third).await.unwrap().replaced.is_none());
    assert_eq!(
        seqs(s, &u).await,
        vec![other_channel.seq, other_topic.seq, third.seq]
    );
    s.drop_user(&u).await.unwrap();
}

/// Sleeps until the wall clock has passed unix second `at`.
async fn sleep_past(at: u64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while now_secs() <= at {
        assert!(Instant::now() < deadline, "clock did not pass {at}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    // Redis expires keys with millisecond precision at `at * 1000`.
    tokio::time::sleep(Duration::from_millis(20)).await;
}

async fn expired_messages_are_never_returned(e: Engine) {
    let s = &*e.store;
    let u = Uaid::random();
    let ch = new_channel();
    let mut dead = message(s, ch, 0, None);
    dead.expires_at = now_secs() - 1;
    s.put_message(&u, &dead).await.unwrap();
    let long = message(s, ch, 600, Some("t"));
    s.put_message(&u, &long).await.unwrap();
    let mut short = message(s, ch, 2, Some("s"));
    short.expires_at = now_secs() + 2;
    s.put_message(&u, &short).await.unwrap();

    assert_eq!(s.get_message(&u, dead.seq).await.unwrap(), None);
    assert_eq!(seqs(s, &u).await, vec![long.seq, short.seq]);
    assert_eq!(s.count_messages(&u, now_secs(), 10).await.unwrap(), 2);
    // `now` decides, not only the engine's clock.
    assert_eq!(s.count_messages(&u, short.expires_at, 10).await.unwrap(), 1);
    if let Some(raw) = &e.raw {
        assert!(!raw.exists(&payload_key(&u, dead.seq)), "never stored");
        let short_key = payload_key(&u, short.seq);
        assert_eq!(raw.expiretime(&short_key), short.expires_at as i64);
        // Nothing outlives its content, nothing dies before it.
        assert_eq!(raw.expiretime(&messages_key(&u)), long.expires_at as i64);
        assert_eq!(raw.expiretime(&topics_key(&u)), long.expires_at as i64);
        let expiries = format!("herald:x:{{{u}}}");
        assert_eq!(raw.expiretime(&expiries), long.expires_at as i64);
    }

    sleep_past(short.expires_at).await;
    if let Some(raw) = &e.raw {
        // Gone by itself: no sweep has run and nothing has read it.
        assert!(!raw.exists(&payload_key(&u, short.seq)));
    }
    assert_eq!(s.get_message(&u, short.seq).await.unwrap(), None);
    assert_eq!(s.count_messages(&u, now_secs(), 10).await.unwrap(), 1);
    assert_eq!(seqs(s, &u).await, vec![long.seq]);
    if let Some(raw) = &e.raw {
        let pending: Vec<String> = raw.query(
            &messages_key(&u),
            redis::cmd("ZRANGE").arg(messages_key(&u)).arg(0).arg(-1),
        );
        assert_eq!(
            pending,
            vec![long.seq.to_string()],
            "the expired member was pruned"
        );
    }
    s.purge_expired().await.unwrap();
    assert_eq!(seqs(s, &u).await, vec![long.seq]);
    s.drop_user(&u).await.unwrap();
}

async fn counting_stops_at_the_limit(e: Engine) {
    let s = &*e.store;
    let u = Uaid::random();
    let ch = new_channel();
    for _ in 0..10 {
        s.put_message(&u, &message(s, ch, 600, None)).await.unwrap();
    }
    let now = now_secs();
    assert_eq!(s.count_messages(&u, now, 3).await.unwrap(), 3);
    assert_eq!(s.count_messages(&u, now, 10).await.unwrap(), 10);
    assert_eq!(s.count_messages(&u, now, 100).await.unwrap(), 10);
    assert_eq!(s.count_messages(&u, now, usize::MAX).await.unwrap(), 10);
    assert_eq!(s.count_messages(&u, now, 0).await.unwrap(), 0);
    assert_eq!(s.count_messages(&u, now + 601, 100).await.unwrap(), 0);
    assert_eq!(
        s.count_messages(&Uaid::random(), now, 100).await.unwrap(),
        0
    );
    s.drop_user(&u).await.unwrap();
}

/// The count a push is refused by must match the queue through everything
/// that changes it: a store, a replacement by topic, an ack (delete), a
/// removed subscription, expiry, and a user agent dropped and reused.
async fn counts_stay_exact(e: Engine) {
    let s = &*e.store;
    let u = Uaid::random();
    let (c1, c2) = (new_channel(), new_channel());
    s.put_channel(&u, &c1, &channel_record(None)).await.unwrap();
    s.put_channel(&u, &c2, &channel_record(None)).await.unwrap();
    let count = |now: u64| async move { s.count_messages(&u, now, 1000).await.unwrap() };
    assert_eq!(count(now_secs()).await, 0);
    let mut kept = Vec::new();
    for i in 0..5 {
        let m = message(s, if i % 2 == 0 { c1 } else { c2 }, 600, None);
        s.put_message(&u, &m).await.unwrap();
        kept.push(m);
    }
    assert_eq!(count(now_secs()).await, 5);
    // Replacing by topic keeps the count; the peer's replacement too.
    let t1 = message(s, c1, 600, Some("t"));
    s.put_message(&u, &t1).await.unwrap();
    assert_eq!(count(now_secs()).await, 6);
    let t2 = message(&*e.peer, c1, 600, Some("t"));
    assert!(e
        .peer
        .put_message(&u, &t2)
        .await
        .unwrap()
        .replaced
        .is_some());
    assert_eq!(count(now_secs()).await, 6);
    // Acks, once each.
    assert!(s.delete_message(&u, kept[0].seq).await.unwrap());
    assert!(!e.peer.delete_message(&u, kept[0].seq).await.unwrap());
    assert_eq!(count(now_secs()).await, 5);
    assert!(s.delete_message(&u, t2.seq).await.unwrap());
    assert_eq!(count(now_secs()).await, 4);
    // Removing a subscription takes its messages (kept[2], kept[4]: c1).
    assert!(s.remove_channel(&u, &c1).await.unwrap());
    assert_eq!(count(now_secs()).await, 2);
    assert!(!s.remove_channel(&u, &c1).await.unwrap());
    assert!(!s.remove_channel(&u, &new_channel()).await.unwrap());
    assert_eq!(count(now_secs()).await, 2);
    // Expiry: by the caller's clock, then by the engine's own.
    let short = message(s, c2, 1, None);
    s.put_message(&u, &short).await.unwrap();
    assert_eq!(count(now_secs()).await, 3);
    assert_eq!(count(short.expires_at).await, 2);
    sleep_past(short.expires_at).await;
    assert_eq!(count(now_secs()).await, 2);
    let after = message(s, c2, 600, None);
    s.put_message(&u, &after).await.unwrap();
    assert_eq!(count(now_secs()).await, 3);
    assert_eq!(count(now_secs() + 601).await, 0);
    // A dropped user agent counts nothing, and starts from zero.
    s.drop_user(&u).await.unwrap();
    assert_eq!(count(now_secs()).await, 0);
    s.put_message(&u, &message(s, c2, 600, None)).await.unwrap();
    assert_eq!(count(now_secs()).await, 1);
    s.drop_user(&u).await.unwrap();
    if let Some(raw) = &e.raw {
        assert!(raw.keys_of(&u).is_empty(), "{:?}", raw.keys_of(&u));
    }
}

async fn seqs_increase(e: Engine) {
    let start = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64;
    let mut last = 0;
    for _ in 0..10_000 {
        let seq = e.store.next_seq();
        assert!(seq > last, "{seq} after {last}");
        last = seq;
    }
    let first = e.store.next_seq();
    assert!(first >= start, "seqs are wall-clock microseconds");
    assert!(first < 1 << 53, "and fit in an f64 exactly");
}

/// Two nodes storing for one user agent at once lose nothing, whatever
/// their sequence numbers do.
async fn concurrent_nodes_lose_nothing(e: Engine) {
    const EACH: usize = 200;
    let u = Uaid::random();
    let ch = new_channel();
    let mut tasks = Vec::new();
    for (name, node) in [("a", e.store.clone()), ("b", e.peer.clone())] {
        for i in 0..EACH {
            let node = node.clone();
            tasks.push(tokio::spawn(async move {
                let mut m = message(&*node, ch, 600, None);
                m.data = Bytes::from(format!("{name}{i}"));
                node.put_message(&u, &m).await.unwrap();
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    let all = e.store.read_messages(&u, 0, 10 * EACH).await.unwrap();
    assert_eq!(all.len(), 2 * EACH);
    assert!(all.windows(2).all(|w| w[0].seq < w[1].seq), "oldest first");
    let mut data: Vec<String> = all
        .iter()
        .map(|m| String::from_utf8(m.data.to_vec()).unwrap())
        .collect();
    data.sort();
    let mut want: Vec<String> = (0..EACH)
        .flat_map(|i| [format!("a{i}"), format!("b{i}")])
        .collect();
    want.sort();
    assert_eq!(data, want);
    assert_eq!(
        e.store
            .count_messages(&u, now_secs(), usize::MAX)
            .await
            .unwrap(),
        2 * EACH
    );
    e.store.drop_user(&u).await.unwrap();
}

async fn health_check_and_flush_work(e: Engine) {
    e.store.health_check().await.unwrap();
    e.peer.health_check().await.unwrap();
    e.store.flush().await.unwrap();
    e.store.purge_expired().await.unwrap();
}

/// Blocked senders: listed by every node of a shared store, replaced by
/// id, removed once. The Redis engines share one server between cases, so
/// this case looks only at its own ids.
async fn blocks_are_shared_and_removed_once(e: Engine) {
    let tag = Uaid::random().to_string();
    let (key, sub) = (
        format!("key:{tag}"),
        format!("sub:mailto:{tag}@example.com"),
    );
    let mine = |all: std::collections::BTreeMap<String, String>| {
        all.into_iter()
            .filter(|(id, _)| id.contains(&tag))
            .collect::<Vec<_>>()
    };
    assert!(mine(e.store.blocks().await.unwrap()).is_empty());
    e.store.put_block(&key, r#"{"reason":"a"}"#).await.unwrap();
    e.store.put_block(&sub, r#"{"reason":"b"}"#).await.unwrap();
    e.store.put_block(&key, r#"{"reason":"c"}"#).await.unwrap();
    let expected = vec![
        (key.clone(), r#"{"reason":"c"}"#.to_string()),
        (sub.clone(), r#"{"reason":"b"}"#.to_string()),
    ];
    assert_eq!(mine(e.store.blocks().await.unwrap()), expected);
    assert_eq!(mine(e.peer.blocks().await.unwrap()), expected);
    assert!(e.peer.remove_block(&key).await.unwrap());
    assert!(!e.store.remove_block(&key).await.unwrap());
    assert_eq!(mine(e.store.blocks().await.unwrap()), expected[1..]);
    assert!(e.store.remove_block(&sub).await.unwrap());
    assert!(mine(e.peer.blocks().await.unwrap()).is_empty());
}

// The receipt ledger.

/// Cases that sweep expired receipts take this: a sweep settles every due
/// message of the shared Redis, not only its own case's. Every other case
/// tracks messages due long after any sweep's `now`.
static SWEEPS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn now_ms() -> u64 {
    now_micros() / 1000
}

/// Unsent, due when it expires.
fn pending(sub: ReceiptSub, channel: ChannelId, expires_at: u64) -> PendingReceipt {
    PendingReceipt {
        sub,
        channel,
        expires_at,
        deadline: expires_at,
        sent_at: None,
    }
}

/// Tracked until long after any sweep of these cases looks.
fn pending_later(sub: ReceiptSub, channel: ChannelId) -> PendingReceipt {
    pending(sub, channel, now_secs() + 3600)
}

fn expiry_member(uaid: &Uaid, seq: u64) -> String {
    format!("{uaid}:{seq}")
}

/// Whether the sweep's index still lists a message (Redis only).
fn indexed(raw: &Raw, uaid: &Uaid, seq: u64) -> bool {
    let score: Option<f64> = raw.query(
        "herald:rx",
        redis::cmd("ZSCORE")
            .arg("herald:rx")
            .arg(expiry_member(uaid, seq)),
    );
    score.is_some()
}

async fn receipts_settle_once(e: Engine) {
    let (l, peer) = (&*e.ledger, &*e.ledger_peer);
    let (u, ch, sub) = (Uaid::random(), new_channel(), ReceiptSub::random());
    let seq = e.store.next_seq();
    let p = pending_later(sub, ch);
    l.track(&u, seq, &p).await.unwrap();
    assert_eq!(
        l.receipt_state(&u, seq).await.unwrap(),
        Some(ReceiptState::Pending(p))
    );
    let at = now_ms();
    let (got_sub, event) = l
        .settle(&u, seq, Outcome::Delivered, at)
        .await
        .unwrap()
        .expect("the first settle decides");
    assert_eq!(got_sub, sub);
    assert_eq!(
        (
            event.uaid,
            event.channel,
            event.seq,
            event.outcome,
            event.at
        ),
        (u, ch, seq, Outcome::Delivered, at)
    );
    assert!(event.id > 0);
    // Decided once, whoever asks again and with whatever outcome.
    assert_eq!(l.settle(&u, seq, Outcome::Expired, at).await.unwrap(), None);
    assert_eq!(
        peer.settle(&u, seq, Outcome::Cancelled, at).await.unwrap(),
        None
    );
    assert_eq!(
        l.receipt_state(&u, seq).await.unwrap(),
        Some(ReceiptState::Settled(event))
    );
    assert_eq!(l.receipts(&sub, 0, 10).await.unwrap(), vec![event]);

    // Untracked: nothing to decide.
    let untracked = e.store.next_seq();
    assert_eq!(
        l.settle(&u, untracked, Outcome::Delivered, at)
            .await
            .unwrap(),
        None
    );
    assert_eq!(l.receipt_state(&u, untracked).await.unwrap(), None);

    // Forgotten: no receipt, ever.
    let gone = e.store.next_seq();
    l.track(&u, gone, &pending_later(sub, ch)).await.unwrap();
    l.forget(&u, gone).await.unwrap();
    l.forget(&u, gone).await.unwrap();
    assert_eq!(l.receipt_state(&u, gone).await.unwrap(), None);
    assert_eq!(
        l.settle(&u, gone, Outcome::Delivered, at).await.unwrap(),
        None
    );

    // A rejection keeps its code.
    let rejected = e.store.next_seq();
    l.track(&u, rejected, &pending_later(sub, ch))
        .await
        .unwrap();
    let (_, r) = peer
        .settle(&u, rejected, Outcome::Rejected(301), at + 1)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(r.outcome, Outcome::Rejected(301));
    assert!(r.id > event.id);
    assert_eq!(l.receipts(&sub, 0, 10).await.unwrap(), vec![event, r]);

    if let Some(raw) = &e.raw {
        for s in [seq, gone, rejected] {
            assert!(!indexed(raw, &u, s), "settled or forgotten: not indexed");
        }
        // Everything kept expires with the retention.
        let retention = RECEIPT_RETENTION.as_millis() as i64;
        let outcome_key = format!("herald:ro:{{{u}}}:{seq}");
        let pexpiretime = |key: &str| -> i64 { raw.query(key, redis::cmd("PEXPIRETIME").arg(key)) };
        assert_eq!(pexpiretime(&outcome_key), at as i64 + retention);
        let events_key = format!("herald:re:{{{}}}", Uaid(sub.0));
        assert_eq!(pexpiretime(&events_key), at as i64 + 1 + retention);
        let pending_key = format!("herald:rp:{{{u}}}");
        assert!(!raw.exists(&pending_key), "nothing pending is left");
        assert!(raw.exists(&outcome_key));
        assert!(!raw.exists(&format!("herald:ro:{{{u}}}:{gone}")));
    }
}

/// A sent message waits `ACK_GRACE_SECS` past its expiry for its ack; an
/// unsent one is swept when it expires.
async fn receipts_sent_wait_for_their_ack(e: Engine) {
    let _sweeping = SWEEPS.lock().await;
    let l = &*e.ledger;
    let (u, ch, sub) = (Uaid::random(), new_channel(), ReceiptSub::random());
    let expires = now_secs() - 1000;
    let (sent, unsent) = (e.store.next_seq(), e.store.next_seq());
    l.track(&u, sent, &pending(sub, ch, expires)).await.unwrap();
    l.track(&u, unsent, &pending(sub, ch, expires))
        .await
        .unwrap();
    let sent_at = now_ms();
    l.mark_sent(&u, sent, sent_at).await.unwrap();
    // The first send counts; later ones change nothing.
    l.mark_sent(&u, sent, sent_at + 5).await.unwrap();
    l.mark_sent(&u, e.store.next_seq(), sent_at).await.unwrap();
    let Some(ReceiptState::Pending(p)) = l.receipt_state(&u, sent).await.unwrap() else {
        panic!("still pending")
    };
    assert_eq!(p.sent_at, Some(sent_at));
    assert_eq!(p.deadline, expires + ACK_GRACE_SECS);
    assert_eq!(p.expires_at, expires);

    let at = now_ms();
    let swept = l.settle_expired(expires, 1000, at).await.unwrap();
    assert_eq!(swept.len(), 1, "{swept:?}");
    let (s, ev) = swept[0];
    assert_eq!((s, ev.seq, ev.outcome), (sub, unsent, Outcome::Expired));
    let before_grace = expires + ACK_GRACE_SECS - 1;
    assert_eq!(l.settle_expired(before_grace, 1000, at).await.unwrap(), []);
    assert!(matches!(
        l.receipt_state(&u, sent).await.unwrap(),
        Some(ReceiptState::Pending(_))
    ));
    let swept = l
        .settle_expired(expires + ACK_GRACE_SECS, 1000, at)
        .await
        .unwrap();
    assert_eq!(swept.len(), 1, "{swept:?}");
    assert_eq!(
        (swept[0].1.seq, swept[0].1.outcome),
        (sent, Outcome::Expired)
    );
    assert_eq!(l.settle_expired(now_secs(), 1000, at).await.unwrap(), []);

    // An ack within the grace wins over the sweep.
    let acked = e.store.next_seq();
    l.track(&u, acked, &pending(sub, ch, expires))
        .await
        .unwrap();
    l.mark_sent(&u, acked, at).await.unwrap();
    assert!(l
        .settle(&u, acked, Outcome::Delivered, at)
        .await
        .unwrap()
        .is_some());
    assert_eq!(l.settle_expired(now_secs(), 1000, at).await.unwrap(), []);
    let outcomes: Vec<(u64, Outcome)> = l
        .receipts(&sub, 0, 10)
        .await
        .unwrap()
        .iter()
        .map(|e| (e.seq, e.outcome))
        .collect();
    assert_eq!(
        outcomes,
        [
            (unsent, Outcome::Expired),
            (sent, Outcome::Expired),
            (acked, Outcome::Delivered)
        ]
    );
    if let Some(raw) = &e.raw {
        for s in [sent, unsent, acked] {
            assert!(!indexed(raw, &u, s));
        }
    }
}

/// Two nodes sweeping at once settle each expired message exactly once,
/// and leave the ones not yet due.
async fn receipts_expire_once_across_nodes(e: Engine) {
    const N: usize = 60;
    let _sweeping = SWEEPS.lock().await;
    let sub = ReceiptSub::random();
    let ch = new_channel();
    let now = now_secs();
    let uaids: Vec<Uaid> = (0..4).map(|_| Uaid::random()).collect();
    let mut due = Vec::new();
    for i in 0..N {
        let u = uaids[i % uaids.len()];
        let seq = e.store.next_seq();
        let node = if i % 2 == 0 {
            &e.ledger
        } else {
            &e.ledger_peer
        };
        node.track(&u, seq, &pending(sub, ch, now - 100 + (i as u64 % 7)))
            .await
            .unwrap();
        due.push((u, seq));
    }
    let later = e.store.next_seq();
    e.ledger
        .track(&uaids[0], later, &pending_later(sub, ch))
        .await
        .unwrap();

    let mut sweeps = Vec::new();
    for node in [e.ledger.clone(), e.ledger_peer.clone()] {
        sweeps.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            loop {
                let batch = node.settle_expired(now, 7, now_ms()).await.unwrap();
                if batch.is_empty() {
                    return mine;
                }
                mine.extend(batch);
            }
        }));
    }
    let mut settled = Vec::new();
    for s in sweeps {
        settled.extend(s.await.unwrap());
    }
    let mut got: Vec<(Uaid, u64)> = settled.iter().map(|(_, e)| (e.uaid, e.seq)).collect();
    got.sort();
    due.sort();
    assert_eq!(got, due, "each once");
    assert!(settled
        .iter()
        .all(|(s, e)| *s == sub && e.outcome == Outcome::Expired));
    assert!(matches!(
        e.ledger.receipt_state(&uaids[0], later).await.unwrap(),
        Some(ReceiptState::Pending(_))
    ));
    let listed = e.ledger.receipts(&sub, 0, 10 * N).await.unwrap();
    assert_eq!(listed.len(), N);
    assert!(listed.windows(2).all(|w| w[0].id < w[1].id));
    e.ledger.forget(&uaids[0], later).await.unwrap();
}

async fn receipts_settle_all_of_a_channel_or_user_agent(e: Engine) {
    let l = &*e.ledger;
    let (u, other) = (Uaid::random(), Uaid::random());
    let (c1, c2) = (new_channel(), new_channel());
    let (s1, s2) = (ReceiptSub::random(), ReceiptSub::random());
    let mut on_c1 = Vec::new();
    for sub in [s1, s2, s1] {
        let seq = e.store.next_seq();
        l.track(&u, seq, &pending_later(sub, c1)).await.unwrap();
        on_c1.push((sub, seq));
    }
    let on_c2 = e.store.next_seq();
    l.track(&u, on_c2, &pending_later(s2, c2)).await.unwrap();
    let others = e.store.next_seq();
    l.track(&other, others, &pending_later(s1, c1))
        .await
        .unwrap();

    let at = now_ms();
    let mut gone = e
        .ledger_peer
        .settle_all(&u, Some(c1), Outcome::Gone, at)
        .await
        .unwrap();
    gone.sort_by_key(|(_, e)| e.seq);
    let got: Vec<(ReceiptSub, u64)> = gone.iter().map(|(s, e)| (*s, e.seq)).collect();
    assert_eq!(got, on_c1);
    assert!(gone
        .iter()
        .all(|(_, e)| e.outcome == Outcome::Gone && e.channel == c1 && e.uaid == u));
    let rest = l
        .settle_all(&u, None, Outcome::Cancelled, at)
        .await
        .unwrap();
    assert_eq!(rest.len(), 1);
    assert_eq!((rest[0].0, rest[0].1.seq), (s2, on_c2));
    assert_eq!(rest[0].1.outcome, Outcome::Cancelled);
    assert_eq!(l.settle_all(&u, None, Outcome::Gone, at).await.unwrap(), []);
    assert!(matches!(
        l.receipt_state(&other, others).await.unwrap(),
        Some(ReceiptState::Pending(_))
    ));
    for (_, seq) in &on_c1 {
        assert!(matches!(
            l.receipt_state(&u, *seq).await.unwrap(),
            Some(ReceiptState::Settled(ReceiptEvent {
                outcome: Outcome::Gone,
                ..
            }))
        ));
    }
    assert_eq!(l.receipts(&s1, 0, 10).await.unwrap().len(), 2);
    assert_eq!(l.receipts(&s2, 0, 10).await.unwrap().len(), 2);
    if let Some(raw) = &e.raw {
        for (_, seq) in &on_c1 {
            assert!(!indexed(raw, &u, *seq));
        }
        assert!(!indexed(raw, &u, on_c2));
        assert!(indexed(raw, &other, others));
    }
    l.forget(&other, others).await.unwrap();
}

/// `receipts` pages like `Last-Event-ID`: ids above `after`, oldest first,
/// increasing within a subscription whichever node settled.
async fn receipts_page_by_id(e: Engine) {
    let (sub, noise) = (ReceiptSub::random(), ReceiptSub::random());
    let ch = new_channel();
    let mut events = Vec::new();
    for i in 0..6 {
        let u = Uaid::random();
        let node = if i % 2 == 0 {
            &e.ledger
        } else {
            &e.ledger_peer
        };
        for s in [sub, noise] {
            let seq = e.store.next_seq();
            node.track(&u, seq, &pending_later(s, ch)).await.unwrap();
            let (got, event) = node
                .settle(&u, seq, Outcome::Delivered, now_ms())
                .await
                .unwrap()
                .unwrap();
            assert_eq!(got, s);
            if s == sub {
                events.push(event);
            }
        }
    }
    assert!(events.windows(2).all(|w| w[0].id < w[1].id), "{events:?}");
    let l = &*e.ledger;
    assert_eq!(l.receipts(&sub, 0, 100).await.unwrap(), events);
    assert_eq!(
        l.receipts(&sub, events[1].id, 2).await.unwrap(),
        events[2..4]
    );
    assert_eq!(
        e.ledger_peer
            .receipts(&sub, events[3].id - 1, 100)
            .await
            .unwrap(),
        events[3..]
    );
    assert_eq!(l.receipts(&sub, events[5].id, 100).await.unwrap(), []);
    assert_eq!(l.receipts(&sub, u64::MAX, 100).await.unwrap(), []);
    assert_eq!(l.receipts(&sub, 0, 0).await.unwrap(), []);
    assert_eq!(l.receipts(&ReceiptSub::random(), 0, 10).await.unwrap(), []);
}

/// Receipts older than the retention leave: through `purge_receipts` on
/// RocksDB, by themselves on Redis (which is told the retention up front).
async fn receipts_purge_old_ones(e: Engine) {
    let l = &*e.ledger;
    let (u, ch, sub) = (Uaid::random(), new_channel(), ReceiptSub::random());
    let retention = RECEIPT_RETENTION.as_millis() as u64;
    let now = now_ms();
    let settle = |at: u64| {
        let seq = e.store.next_seq();
        async move {
            l.track(&u, seq, &pending_later(sub, ch)).await.unwrap();
            l.settle(&u, seq, Outcome::Delivered, at)
                .await
                .unwrap()
                .unwrap()
                .1
        }
    };
    let old = settle(now - 2 * retention).await;
    let fresh = settle(now).await;
    // Out of order: an old decision recorded after a newer one.
    let late_old = settle(now - retention - 1000).await;
    let purged = l.purge_receipts(now - retention).await.unwrap();
    if e.raw.is_none() {
        assert_eq!(purged, 2);
    }
    assert_eq!(l.receipts(&sub, 0, 10).await.unwrap(), vec![fresh]);
    for gone in [old, late_old] {
        assert_eq!(l.receipt_state(&u, gone.seq).await.unwrap(), None);
    }
    assert_eq!(
        l.receipt_state(&u, fresh.seq).await.unwrap(),
        Some(ReceiptState::Settled(fresh))
    );
    assert_eq!(l.purge_receipts(now - retention).await.unwrap(), 0);
}

/// The `receipt` flag travels with the message.
async fn messages_keep_their_receipt_flag(e: Engine) {
    let s = &*e.store;
    let u = Uaid::random();
    let ch = new_channel();
    let mut asked = message(s, ch, 600, Some("t"));
    asked.receipt = true;
    let plain = message(s, ch, 600, None);
    s.put_message(&u, &asked).await.unwrap();
    e.peer.put_message(&u, &plain).await.unwrap();
    let read = s.read_messages(&u, 0, 10).await.unwrap();
    assert_eq!(read, vec![asked.clone(), plain.clone()]);
    assert!(read[0].receipt && !read[1].receipt);
    assert_eq!(
        e.peer.get_message(&u, asked.seq).await.unwrap(),
        Some(asked)
    );
    s.drop_user(&u).await.unwrap();
}

/// Serialises this process's outbox cases on one engine: `outbox_take`
/// sees every entry listed in it.
static OUTBOX: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The bridges' outbox lists each user agent once, keeps the first due time
/// on a second add, hands out due entries oldest first, and leases what it
/// hands out so neither node takes it again before the lease runs out.
async fn outbox_lists_claims_and_leases(e: Engine) {
    let _outbox = OUTBOX.lock().await;
    let (u1, u2, u3) = (Uaid::random(), Uaid::random(), Uaid::random());
    let mine = [u1, u2, u3];
    let only_mine =
        |v: Vec<Uaid>| -> Vec<Uaid> { v.into_iter().filter(|u| mine.contains(u)).collect() };
    let base = now_ms();
    let s = &*e.store;
    assert_eq!(s.outbox_due(&u1).await.unwrap(), None);
    assert!(s.outbox_add(&u1, base - 3000).await.unwrap());
    assert!(
        !e.peer.outbox_add(&u1, base + 999_999).await.unwrap(),
        "listed already"
    );
    assert_eq!(s.outbox_due(&u1).await.unwrap(), Some(base - 3000));
    assert!(e.peer.outbox_add(&u2, base - 2000).await.unwrap());
    assert!(s.outbox_add(&u3, base + 60_000).await.unwrap());
    s.outbox_set(&u2, base - 1000).await.unwrap();
    assert_eq!(e.peer.outbox_due(&u2).await.unwrap(), Some(base - 1000));

    let lease = base + 30_000;
    assert_eq!(
        only_mine(s.outbox_take(base, lease, 1).await.unwrap()),
        [u1],
        "oldest due first"
    );
    assert_eq!(s.outbox_due(&u1).await.unwrap(), Some(lease));
    assert_eq!(
        only_mine(e.peer.outbox_take(base, lease, 10).await.unwrap()),
        [u2]
    );
    assert_eq!(
        only_mine(s.outbox_take(base, lease, 10).await.unwrap()),
        [],
        "leased"
    );
    let mut again = only_mine(e.peer.outbox_take(lease, lease + 60_000, 10).await.unwrap());
    again.sort();
    let mut want = vec![u1, u2];
    want.sort();
    assert_eq!(
        again, want,
        "taken again once the lease ran out, and not u3"
    );

    s.outbox_remove(&u1).await.unwrap();
    assert_eq!(e.peer.outbox_due(&u1).await.unwrap(), None);
    s.outbox_remove(&u1).await.unwrap();
    assert!(
        s.outbox_add(&u1, base).await.unwrap(),
        "listed anew after removal"
    );
    for u in mine {
        e.peer.outbox_remove(&u).await.unwrap();
    }
    assert_eq!(
        only_mine(s.outbox_take(u64::MAX >> 12, lease, 100).await.unwrap()),
        []
    );
}

/// Two nodes sweeping the outbox at once take each due entry exactly once.
async fn outbox_entries_are_taken_once_across_nodes(e: Engine) {
    const N: usize = 40;
    let _outbox = OUTBOX.lock().await;
    let base = now_ms();
    let mut listed: Vec<Uaid> = (0..N).map(|_| Uaid::random()).collect();
    for (i, u) in listed.iter().enumerate() {
        let node = if i % 2 == 0 { &e.store } else { &e.peer };
        assert!(node.outbox_add(u, base - 1000 + i as u64).await.unwrap());
    }
    let mut sweeps = Vec::new();
    for node in [e.store.clone(), e.peer.clone()] {
        sweeps.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            loop {
                let batch = node.outbox_take(base, base + 60_000, 7).await.unwrap();
                if batch.is_empty() {
                    return mine;
                }
                mine.extend(batch);
            }
        }));
    }
    let mut taken = Vec::new();
    for s in sweeps {
        taken.extend(s.await.unwrap());
    }
    taken.retain(|u| listed.contains(u));
    taken.sort();
    listed.sort();
    assert_eq!(taken, listed, "each once");
    for u in &listed {
        e.store.outbox_remove(u).await.unwrap();
    }
}

macro_rules! contract {
    ($($case:ident),* $(,)?) => {$(
        mod $case {
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn rocksdb() {
                super::$case(rocks().await).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn memory() {
                super::$case(super::memory().await).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn redis() {
                super::$case(standalone().await).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn redis_cluster() {
                super::$case(cluster().await).await
            }
        }
    )*};
}

contract!(
    users_round_trip_and_drop,
    channels_and_their_removal,
    messages_oldest_first_with_paging,
    topics_replace_pending_messages,
    expired_messages_are_never_returned,
    counting_stops_at_the_limit,
    counts_stay_exact,
    seqs_increase,
    concurrent_nodes_lose_nothing,
    health_check_and_flush_work,
    blocks_are_shared_and_removed_once,
    receipts_settle_once,
    receipts_sent_wait_for_their_ack,
    receipts_expire_once_across_nodes,
    receipts_settle_all_of_a_channel_or_user_agent,
    receipts_page_by_id,
    receipts_purge_old_ones,
    messages_keep_their_receipt_flag,
    outbox_lists_claims_and_leases,
    outbox_entries_are_taken_once_across_nodes,
);

// Redis only.

/// Two nodes may hand out the same seq for one user agent; the second store
/// notices and takes a fresh one instead of overwriting.
async fn seq_collision_takes_a_fresh_seq(url: &str) {
    let (a, b) = (connect(url).await, connect(url).await);
    let u = Uaid::random();
    let ch = new_channel();
    let first = message(&*a, ch, 600, None);
    let mut clash = message(&*b, ch, 600, None);
    clash.seq = first.seq;
    a.put_message(&u, &first).await.unwrap();
    let stored_as = b.put_message(&u, &clash).await.unwrap().seq;
    assert_ne!(stored_as, first.seq);
    assert_eq!(b.seq_collisions(), 1);
    let all = a.read_messages(&u, 0, 10).await.unwrap();
    assert_eq!(all.len(), 2);
    assert_eq!(all[0], first, "the first message was not overwritten");
    assert_eq!(all[1].data, clash.data);
    assert_eq!(all[1].seq, stored_as);
    a.drop_user(&u).await.unwrap();
}

#[tokio::test]
async fn redis_seq_collision_takes_a_fresh_seq() {
    seq_collision_takes_a_fresh_seq(shared_server().url()).await;
}

#[tokio::test]
async fn redis_cluster_seq_collision_takes_a_fresh_seq() {
    seq_collision_takes_a_fresh_seq(shared_cluster().url()).await;
}

/// A store whose answer was lost (a reset connection) is sent again by the
/// Redis client with the same seq and bytes; the message must stay stored
/// once, not be taken for a collision and stored twice (`make chaos`,
/// lossy links: the user agent got it twice). Nor may the message itself
/// make the resend "full".
async fn a_resent_store_is_stored_once(url: &str) {
    let store = connect(url).await;
    let u = Uaid::random();
    let m = message(&*store, new_channel(), 600, Some("t"));
    let first = store.put_message(&u, &m).await.unwrap();
    let again = store.put_message(&u, &m).await.unwrap();
    assert_eq!((first.seq, again.seq, again.replaced), (m.seq, m.seq, None));
    assert_eq!(store.seq_collisions(), 0);
    let within = store
        .put_message_within(&u, &m, now_secs(), 1)
        .await
        .unwrap();
    assert_eq!(
        within.map(|o| o.seq),
        Some(m.seq),
        "the message counted against itself"
    );
    assert_eq!(seqs(&*store, &u).await, vec![m.seq]);
    store.drop_user(&u).await.unwrap();
}

#[tokio::test]
async fn redis_a_resent_store_is_stored_once() {
    a_resent_store_is_stored_once(shared_server().url()).await;
}

#[tokio::test]
async fn redis_cluster_a_resent_store_is_stored_once() {
    a_resent_store_is_stored_once(shared_cluster().url()).await;
}

/// A store answers who held the user agent's connection once the message
/// was in: the node that took the push wakes that node without a look-up
/// of its own.
async fn a_store_says_who_holds_the_user_agent(url: &str) {
    let store = connect(url).await;
    let u = Uaid::random();
    let m = message(&*store, new_channel(), 600, None);
    assert_eq!(
        store.put_message(&u, &m).await.unwrap().owner,
        OwnerSeen::Nobody
    );
    let owner = Owner {
        node: u64::MAX >> 2,
        conn: 3,
        since: now_micros(),
    };
    store.claim(&u, &owner).await.unwrap();
    let m = message(&*store, new_channel(), 600, Some("t"));
    let stored = store.put_message_within(&u, &m, now_secs(), 10).await;
    assert_eq!(stored.unwrap().unwrap().owner, OwnerSeen::Is(owner));
    store.release(&u, &owner).await.unwrap();
    let m = message(&*store, new_channel(), 600, None);
    assert_eq!(
        store.put_message(&u, &m).await.unwrap().owner,
        OwnerSeen::Nobody
    );
    store.drop_user(&u).await.unwrap();
}

#[tokio::test]
async fn redis_a_store_says_who_holds_the_user_agent() {
    a_store_says_who_holds_the_user_agent(shared_server().url()).await;
}

#[tokio::test]
async fn redis_cluster_a_store_says_who_holds_the_user_agent() {
    a_store_says_who_holds_the_user_agent(shared_cluster().url()).await;
}

/// A settle that fails half-way (here, one subscription's receipts
/// unwritable; in `make chaos`, a failover or a reset link) keeps its
/// decision: a later settle of the message and the sweep both finish it
/// with the outcome first given, and each receipt is listed once though
/// its append ran twice.
async fn an_interrupted_settle_is_finished_later(e: Engine) {
    let raw = e.raw.as_ref().expect("a Redis engine");
    let (l, peer) = (&*e.ledger, &*e.ledger_peer);
    let (u, ch) = (Uaid::random(), new_channel());
    // Appended in the order of their bytes: the broken one second.
    let mut subs = [ReceiptSub::random(), ReceiptSub::random()];
    subs.sort();
    let [listed_first, broken] = subs;
    let (first, second) = (e.store.next_seq(), e.store.next_seq());
    l.track(&u, first, &pending_later(listed_first, ch))
        .await
        .unwrap();
    l.track(&u, second, &pending_later(broken, ch))
        .await
        .unwrap();
    let events = format!("herald:re:{{{}}}", Uaid(broken.0));
    raw.query::<()>(
        &events,
        redis::cmd("SET").arg(&events).arg("not a sorted set"),
    );

    let at = now_ms();
    assert!(
        l.settle_all(&u, Some(ch), Outcome::Gone, at).await.is_err(),
        "the append to the broken subscription fails"
    );
    for seq in [first, second] {
        match l.receipt_state(&u, seq).await.unwrap() {
            Some(ReceiptState::Settled(r)) => assert_eq!(r.outcome, Outcome::Gone),
            other => panic!("decided, not yet listed: {other:?}"),
        }
    }
    raw.query::<()>(&events, redis::cmd("DEL").arg(&events));

    // An ack arriving again finds the decision, not a pending message.
    let again = peer
        .settle(&u, second, Outcome::Delivered, at + 5)
        .await
        .unwrap()
        .expect("finished by this call");
    assert_eq!((again.0, again.1.seq), (broken, second));
    assert_eq!((again.1.outcome, again.1.at), (Outcome::Gone, at));
    {
        // The sweep finishes the rest once it comes due.
        let _sweeping = SWEEPS.lock().await;
        let later = now_secs() + 60;
        while !l
            .settle_expired(later, 1000, now_ms())
            .await
            .unwrap()
            .is_empty()
        {}
    }
    for (sub, seq) in [(listed_first, first), (broken, second)] {
        let listed = l.receipts(&sub, 0, 10).await.unwrap();
        assert_eq!(listed.len(), 1, "listed once: {listed:?}");
        assert_eq!((listed[0].seq, listed[0].outcome), (seq, Outcome::Gone));
        assert_eq!(
            l.receipt_state(&u, seq).await.unwrap(),
            Some(ReceiptState::Settled(listed[0]))
        );
        assert!(!indexed(raw, &u, seq), "finished: not indexed");
    }
    assert!(!raw.exists(&format!("herald:rs:{{{u}}}")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_an_interrupted_settle_is_finished_later() {
    an_interrupted_settle_is_finished_later(standalone().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster_an_interrupted_settle_is_finished_later() {
    an_interrupted_settle_is_finished_later(cluster().await).await;
}

#[tokio::test]
async fn redis_one_seed_is_enough_to_find_the_cluster() {
    let cluster = shared_cluster();
    let seed = format!("redis://127.0.0.1:{}", cluster.ports[3]);
    let store = RedisStore::connect(&seed, None, UA_EXPIRY).await.unwrap();
    assert!(store.is_cluster());
    let standalone = connect(shared_server().url()).await;
    assert!(!standalone.is_cluster());
    // Many user agents land on every shard.
    for _ in 0..20 {
        let u = Uaid::random();
        store.put_user(&u, &user(now_secs())).await.unwrap();
        assert!(store.get_user(&u).await.unwrap().is_some());
        store.drop_user(&u).await.unwrap();
    }
}

#[tokio::test]
async fn redis_cluster_keys_of_one_user_agent_share_one_slot() {
    let cluster = shared_cluster();
    let store = connect(cluster.url()).await;
    let u = Uaid::random();
    let (c1, c2) = (new_channel(), new_channel());
    store.put_user(&u, &user(now_secs())).await.unwrap();
    for ch in [c1, c2] {
        store
            .put_channel(&u, &ch, &channel_record(None))
            .await
            .unwrap();
        for topic in [Some("t"), None, Some("t")] {
            store
                .put_message(&u, &message(&*store, ch, 600, topic))
                .await
                .unwrap();
        }
    }
    let keys = cluster.scan_all(&format!("herald:*{{{u}}}*"));
    let slot = cluster.slot_of(user_key(&u).as_bytes());
    let mut kinds: Vec<&str> = keys
        .iter()
        .map(|(_, k)| {
            let key = std::str::from_utf8(k).unwrap();
            assert_eq!(cluster.slot_of(k), slot, "{key}");
            &key[..9]
        })
        .collect();
    kinds.sort();
    kinds.dedup();
    assert_eq!(
        kinds,
        [
            "herald:c:",
            "herald:m:",
            "herald:p:",
            "herald:t:",
            "herald:u:",
            "herald:x:"
        ]
    );
    let primary = cluster.primary_for(user_key(&u).as_bytes());
    assert!(
        keys.iter().filter(|(port, _)| *port == primary).count() >= 8,
        "user, channels, messages, expiries, topics and 4 pending payloads on the primary"
    );
    store.drop_user(&u).await.unwrap();
}

async fn assert_fails_fast<T>(
    what: &str,
    fut: impl std::future::Future<Output = Result<T, herald::store::StoreError>>,
) {
    let start = Instant::now();
    let result = tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .unwrap_or_else(|_| panic!("{what} hung"));
    let took = start.elapsed();
    let Err(err) = result else {
        panic!("{what} succeeded without Redis")
    };
    assert!(took < Duration::from_secs(3), "{what} took {took:?}");
    // The contract: a Redis that is gone is a condition of the moment,
    // which callers answer with 503 and Retry-After, never a refusal.
    assert!(
        matches!(err, herald::store::StoreError::Unavailable(_)),
        "{what}: {err:?}"
    );
}

#[tokio::test]
async fn redis_unreachable_fails_fast_and_recovers() {
    // Nothing listens on a port just released.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("redis://127.0.0.1:{closed}");
    assert_fails_fast("connect", RedisStore::connect(&url, None, UA_EXPIRY)).await;
    let seeds = format!("{url},redis://127.0.0.1:{}", closed.wrapping_add(1));
    assert_fails_fast(
        "cluster connect",
        RedisStore::connect(&seeds, None, UA_EXPIRY),
    )
    .await;

    let server = RedisServer::start();
    let store = connect(server.url()).await;
    let u = Uaid::random();
    store.put_user(&u, &user(now_secs())).await.unwrap();
    server.kill9();
    assert_fails_fast("get_user", store.get_user(&u)).await;
    let m = message(&*store, new_channel(), 600, Some("t"));
    assert_fails_fast("put_message", store.put_message(&u, &m)).await;
    assert_fails_fast("health_check", store.health_check()).await;
    assert_fails_fast("read_messages", store.read_messages(&u, 0, 10)).await;

    // The same store works again once Redis is back (empty: no persistence).
    server.restart();
    let deadline = Instant::now() + Duration::from_secs(10);
    while store.health_check().await.is_err() {
        assert!(Instant::now() < deadline, "no recovery after restart");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Scripts are loaded again on the fresh server.
    store.put_message(&u, &m).await.unwrap();
    assert_eq!(store.read_messages(&u, 0, 10).await.unwrap(), vec![m]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster_primary_killed_fails_fast_then_fails_over() {
    let cluster = RedisCluster::start();
    let store = connect(cluster.url()).await;
    let u = Uaid::random();
    let ch = new_channel();
    let before = message(&*store, ch, 600, None);
    store.put_message(&u, &before).await.unwrap();
    // Replication is asynchronous: let the replica catch up before the kill.
    let primary = cluster.primary_for(user_key(&u).as_bytes());
    let replica = cluster.replica_of(primary);
    cluster.wait_replicated(replica, payload_key(&u, before.seq).as_bytes());
    cluster.kill9(primary);

    // Every call answers within the op timeout, error or not, until the
    // replica is promoted (about 4 s with a 2 s node timeout).
    let deadline = Instant::now() + Duration::from_secs(20);
    let after = message(&*store, ch, 600, None);
    loop {
        let start = Instant::now();
        let result = store.put_message(&u, &after).await;
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "took {:?}",
            start.elapsed()
        );
        let err = match result {
            Ok(_) => break,
            Err(e) => e,
        };
        // A failover is a condition of the moment: callers answer 503 with
        // Retry-After and try again, never treat it as a refusal.
        assert!(
            matches!(err, herald::store::StoreError::Unavailable(_)),
            "during failover: {err:?}"
        );
        assert!(Instant::now() < deadline, "no failover: {err:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A put that timed out may still have landed on the promoted replica:
    // at least once, never lost.
    let all = store.read_messages(&u, 0, 10).await.unwrap();
    assert_eq!(all[0], before);
    assert!(all.len() >= 2 && all[1..].iter().all(|m| m.data == after.data));
    assert_eq!(cluster.primary_for(user_key(&u).as_bytes()), replica);
}
