//! The embedded store: RocksDB with one column family per kind of record.
//! Writes go through the WAL before they return; with `sync_writes` each
//! write is also fsynced (RocksDB groups concurrent syncs into one).

use super::codec::*;
use super::{
    now_secs, ChannelRecord, CheckpointError, Message, PutOutcome, Store, StoreError, StoreResult,
    StoreStats, UserRecord,
};
use herald_proto::ids::{ChannelId, Uaid};
use rocksdb::{
    compaction_filter::Decision, ColumnFamily, ColumnFamilyDescriptor, Direction, IteratorMode,
    MemtableFactory, Options, ReadOptions, SliceTransform, WriteBatch, WriteOptions, DB,
};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

mod error;
mod receipts;

const USERS: &str = "users";
const CHANNELS: &str = "channels";
const MESSAGES: &str = "messages";
const TOPICS: &str = "topics";
const META: &str = "meta";
/// The receipt ledger (see `receipts`).
const RECEIPTS: &str = "receipts";
const SEQ_CEILING_KEY: &[u8] = b"seq_ceiling";
/// Broadcast versions live in `meta` under this prefix + id.
const BROADCAST_PREFIX: &[u8] = b"broadcast/";
/// Blocked senders live in `meta` under this prefix + id (see `admin::blocks`).
const BLOCK_PREFIX: &[u8] = b"block/";
/// The bridges' outbox lives in `meta` under this prefix + uaid bytes; the
/// value is the due time (Unix ms, big-endian). It holds one entry per
/// bridged user agent with messages in flight, so a scan of it is short.
const OUTBOX_PREFIX: &[u8] = b"outbox/";
/// Sequence numbers are reserved in blocks so a restart (even with the clock
/// set back) never reuses one: the ceiling is persisted before any number
/// below it is handed out.
const SEQ_BLOCK: u64 = 1 << 22;
const TOPIC_LOCKS: usize = 64;
/// The write-ahead log on disk, at most (about). A WAL file can be removed
/// only once every column family has flushed what it holds, and the small
/// ones (users, channels, topics, meta, receipts) may take days to fill a
/// memtable: without a bound, the log grew by every message and ack written
/// (a one-hour soak: 130 MiB and rising, for a few MiB of live data), and a
/// restart would replay all of it. Past the bound RocksDB flushes whichever
/// column families hold the oldest log.
const MAX_WAL_BYTES: u64 = if cfg!(test) { 1 << 20 } else { 64 << 20 };

/// The RocksDB engine itself, synchronous. `RocksStore` puts the async
/// `Store` face on it.
pub struct Rocks {
    db: DB,
    write_opts: WriteOptions,
    seq: AtomicU64,
    seq_ceiling: Mutex<u64>,
    /// Topic replacement and the receipt ledger's steps are
    /// read-modify-write; serialise them per user agent.
    topic_locks: Vec<Mutex<()>>,
    expired: Option<prometheus::IntCounter>,
    /// The expiry sweep of the receipt ledger starts here (see
    /// `receipts::settle_expired`).
    receipt_sweep: receipts::SweepFloor,
    /// The outbox's add-unless-listed and take are read-modify-write.
    outbox_lock: Mutex<()>,
}

fn err(e: rocksdb::Error) -> StoreError {
    error::from_rocksdb(e)
}

fn now_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// The embedded `Store`: reads and unsynced writes run inline (memtable and
/// WAL appends, microseconds); fsyncs and whole-database scans run on the
/// blocking pool so they never hold a runtime worker.
///
/// After an I/O error (a full disk) RocksDB stops all writes with a
/// background error until `DB::Resume()`, which the C API and the `rocksdb`
/// crate do not offer; without help the store would refuse every write until
/// a restart. So an I/O error on a write schedules a reopen of the database
/// (at most one per `REOPEN_INTERVAL`), which replays the WAL and clears the
/// error once space has returned.
#[derive(Clone)]
pub struct RocksStore {
    inner: Arc<Reopenable>,
    sync_writes: bool,
}

/// How often a failing store may be closed and opened again.
const REOPEN_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

struct Reopenable {
    /// None only while a reopen failed; the next error tries again.
    db: std::sync::RwLock<Option<Arc<Rocks>>>,
    path: std::path::PathBuf,
    sync_writes: bool,
    expired: Option<prometheus::IntCounter>,
    /// The highest sequence number handed out, carried across reopens.
    seq_floor: AtomicU64,
    last_reopen: Mutex<Option<std::time::Instant>>,
}

impl RocksStore {
    /// `expired` counts messages removed because their TTL ran out.
    pub fn open(
        path: &Path,
        sync_writes: bool,
        expired: Option<prometheus::IntCounter>,
    ) -> StoreResult<Self> {
        let db = Rocks::open(path, sync_writes, expired.clone())?;
        Ok(RocksStore {
            inner: Arc::new(Reopenable {
                db: std::sync::RwLock::new(Some(Arc::new(db))),
                path: path.to_path_buf(),
                sync_writes,
                expired,
                seq_floor: AtomicU64::new(0),
                last_reopen: Mutex::new(None),
            }),
            sync_writes,
        })
    }

    /// The synchronous engine (tests, maintenance tools).
    pub fn engine(&self) -> StoreResult<Arc<Rocks>> {
        self.db()
    }

    fn db(&self) -> StoreResult<Arc<Rocks>> {
        let slot = self.inner.db.read().unwrap_or_else(|p| p.into_inner());
        match slot.as_ref() {
            Some(db) => Ok(db.clone()),
            None => {
                drop(slot);
                // The last reopen failed: try again.
                self.schedule_reopen();
                Err(StoreError::Unavailable(
                    "rocksdb: the store is being reopened after an I/O error".into(),
                ))
            }
        }
    }

    /// Schedules a reopen if `e` is an I/O error; returns `e`.
    fn noted(&self, e: StoreError) -> StoreError {
        if let StoreError::Io(_) = e {
            self.schedule_reopen();
        }
        e
    }

    /// At most one reopen per `REOPEN_INTERVAL`, on its own thread.
    fn schedule_reopen(&self) {
        let mut last = self
            .inner
            .last_reopen
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if last.is_none_or(|t| t.elapsed() >= REOPEN_INTERVAL) {
            *last = Some(std::time::Instant::now());
            let inner = self.inner.clone();
            std::thread::spawn(move || inner.reopen());
        }
    }

    fn check<T>(&self, r: StoreResult<T>) -> StoreResult<T> {
        r.map_err(|e| self.noted(e))
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Rocks) -> StoreResult<T> + Send + 'static,
    ) -> StoreResult<T> {
        let inner = self.db()?;
        let r = tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(|e| StoreError::Task(format!("rocksdb task failed: {e}")))?;
        self.check(r)
    }

    /// A write that waits for fsync with `sync_writes` goes to the blocking
    /// pool; otherwise it is a WAL append and runs inline.
    async fn write_op<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Rocks) -> StoreResult<T> + Send + 'static,
    ) -> StoreResult<T> {
        if self.sync_writes {
            self.blocking(f).await
        } else {
            let r = f(&*self.db()?);
            self.check(r)
        }
    }

    pub fn compact_messages(&self) {
        if let Ok(db) = self.db() {
            db.compact_messages()
        }
    }

    pub fn raw_message_count(&self) -> usize {
        self.db().map(|db| db.raw_message_count()).unwrap_or(0)
    }
}

impl Reopenable {
    /// Closes the database and opens it again, which clears a background
    /// error. Runs on its own thread; waits up to 2 s for operations in
    /// flight to let go of the old handle.
    fn reopen(&self) {
        let mut slot = self.db.write().unwrap_or_else(|p| p.into_inner());
        if let Some(old) = slot.as_ref() {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
            while Arc::strong_count(old) > 1 {
                if std::time::Instant::now() > deadline {
                    tracing::warn!("store reopen postponed: operations still in flight");
                    return;
                }
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            self.seq_floor
                .fetch_max(old.seq.load(Ordering::Acquire), Ordering::AcqRel);
        }
        // Close before opening: RocksDB locks its directory.
        *slot = None;
        let floor = self.seq_floor.load(Ordering::Acquire);
        match Rocks::open_from(&self.path, self.sync_writes, self.expired.clone(), floor) {
            Ok(db) => {
                tracing::warn!("store reopened after an I/O error");
                *slot = Some(Arc::new(db));
            }
            Err(e) => tracing::error!("store reopen failed, will retry: {e}"),
        }
    }
}

impl Rocks {
    /// `expired` counts messages removed because their TTL ran out.
    pub fn open(
        path: &Path,
        sync_writes: bool,
        expired: Option<prometheus::IntCounter>,
    ) -> StoreResult<Self> {
        Self::open_from(path, sync_writes, expired, 0)
    }

    /// Opens with sequence numbers above `seq_floor` (a reopen in the same
    /// process continues where the previous handle stopped).
    fn open_from(
        path: &Path,
        sync_writes: bool,
        expired: Option<prometheus::IntCounter>,
        seq_floor: u64,
    ) -> StoreResult<Self> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        // Sockets need the file descriptors far more than table files do.
        opts.set_max_open_files(512);
        // A hash-based memtable (messages, below) takes one writer at a time;
        // RocksDB still groups concurrent writes into one WAL append.
        opts.set_allow_concurrent_memtable_write(false);
        // Writers waiting for the group leader block instead of spinning and
        // yielding: on a node whose cores are busy with sockets, spinning
        // only burns the CPU the leader needs.
        opts.set_enable_write_thread_adaptive_yield(false);
        opts.set_keep_log_file_num(4);
        opts.set_max_total_wal_size(MAX_WAL_BYTES);

        let mut message_opts = Options::default();
        // Messages live for milliseconds (stored, sent, acked) and are only
        // ever read within one user agent's prefix. A hash of small
        // per-user-agent skip lists makes each insert and lookup touch a few
        // nodes instead of descending one skip list of every message in the
        // memtable, which was the largest user-space cost of a push.
        message_opts.set_prefix_extractor(SliceTransform::create_fixed_prefix(16));
        message_opts.set_memtable_factory(MemtableFactory::HashSkipList {
            bucket_count: 1 << 16,
            height: 4,
            branching_factor: 4,
        });
        let filter_counter = expired.clone();
        // Expired messages vanish whenever RocksDB compacts, with no scan on
        // the request path.
        message_opts.set_compaction_filter("herald-ttl", move |_level, _key, value| {
            match message_expires_at(value) {
                Some(exp) if exp <= now_secs() => {
                    if let Some(c) = &filter_counter {
                        c.inc();
                    }
                    Decision::Remove
                }
                _ => Decision::Keep,
            }
        });
        let mut receipt_opts = Options::default();
        // The ledger's records are small and mostly short-lived (tracked,
        // then settled within milliseconds), and its inserts land all over
        // the key space, so each one descends the memtable's skip list from
        // the top: a small memtable keeps that descent short. Flushing it
        // more often costs little, since most of it is deletion markers.
        receipt_opts.set_write_buffer_size(4 << 20);
        let cfs = vec![
            ColumnFamilyDescriptor::new(USERS, Options::default()),
            ColumnFamilyDescriptor::new(CHANNELS, Options::default()),
            ColumnFamilyDescriptor::new(MESSAGES, message_opts),
            ColumnFamilyDescriptor::new(TOPICS, Options::default()),
            ColumnFamilyDescriptor::new(META, Options::default()),
            ColumnFamilyDescriptor::new(RECEIPTS, receipt_opts),
        ];
        let db = DB::open_cf_descriptors(&opts, path, cfs).map_err(err)?;
        let mut write_opts = WriteOptions::default();
        write_opts.set_sync(sync_writes);

        let persisted = db
            .get_cf(db.cf_handle(META).expect("meta cf"), SEQ_CEILING_KEY)
            .map_err(err)?
            .and_then(|v| v.try_into().ok().map(u64::from_be_bytes))
            .unwrap_or(0);
        let start = persisted.max(now_micros()).max(seq_floor);
        let store = Rocks {
            db,
            write_opts,
            seq: AtomicU64::new(start),
            seq_ceiling: Mutex::new(0),
            topic_locks: (0..TOPIC_LOCKS).map(|_| Mutex::new(())).collect(),
            expired,
            receipt_sweep: Default::default(),
            outbox_lock: Mutex::new(()),
        };
        store.raise_ceiling(start + SEQ_BLOCK)?;
        Ok(store)
    }

    fn cf(&self, name: &str) -> &ColumnFamily {
        self.db.cf_handle(name).expect("column family exists")
    }

    fn raise_ceiling(&self, to: u64) -> StoreResult<()> {
        let mut ceiling = self.seq_ceiling.lock().unwrap_or_else(|p| p.into_inner());
        if *ceiling >= to {
            return Ok(());
        }
        let mut sync = WriteOptions::default();
        sync.set_sync(true);
        self.db
            .put_cf_opt(self.cf(META), SEQ_CEILING_KEY, to.to_be_bytes(), &sync)
            .map_err(err)?;
        *ceiling = to;
        Ok(())
    }

    fn write(&self, batch: WriteBatch) -> StoreResult<()> {
        self.db.write_opt(batch, &self.write_opts).map_err(err)
    }

    /// Iterates the keys and values of one column family under a prefix.
    fn for_prefix(
        &self,
        cf: &str,
        prefix: &[u8],
        mut visit: impl FnMut(&[u8], &[u8]) -> bool,
    ) -> StoreResult<()> {
        let mut ro = ReadOptions::default();
        ro.set_iterate_upper_bound(prefix_end(prefix));
        let iter = self.db.iterator_cf_opt(
            self.cf(cf),
            ro,
            IteratorMode::From(prefix, Direction::Forward),
        );
        for item in iter {
            let (k, v) = item.map_err(err)?;
            if !visit(&k, &v) {
                break;
            }
        }
        Ok(())
    }

    fn topic_lock(&self, uaid: &Uaid) -> std::sync::MutexGuard<'_, ()> {
        let i = uaid.0[15] as usize % TOPIC_LOCKS;
        self.topic_locks[i]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    fn int_property(&self, cf: &str, name: &str) -> u64 {
        self.db
            .property_int_value_cf(self.cf(cf), name)
            .ok()
            .flatten()
            .unwrap_or(0)
    }
}

/// Reads across user agents: the messages' hash memtable otherwise only
/// iterates within the prefix a seek started in.
fn total_order() -> ReadOptions {
    let mut ro = ReadOptions::default();
    ro.set_total_order_seek(true);
    ro
}

/// Where the channel id sits in an encoded message (see codec).
const MESSAGE_CHANNEL: std::ops::Range<usize> = 18..34;

impl Rocks {
    pub fn get_user(&self, uaid: &Uaid) -> StoreResult<Option<UserRecord>> {
        Ok(self
            .db
            .get_pinned_cf(self.cf(USERS), user_key(uaid))
            .map_err(err)?
            .and_then(|v| decode_user(&v)))
    }

    pub fn put_user(&self, uaid: &Uaid, record: &UserRecord) -> StoreResult<()> {
        let mut b = WriteBatch::default();
        b.put_cf(self.cf(USERS), user_key(uaid), encode_user(record));
        self.write(b)
    }

    pub fn drop_user(&self, uaid: &Uaid) -> StoreResult<()> {
        let prefix = uaid.0;
        let end = prefix_end(&prefix);
        let mut b = WriteBatch::default();
        b.delete_cf(self.cf(USERS), user_key(uaid));
        for cf in [CHANNELS, MESSAGES, TOPICS] {
            b.delete_range_cf(self.cf(cf), &prefix[..], &end[..]);
        }
        self.write(b)
    }

    pub fn stale_users(&self, cutoff: u64, limit: usize) -> StoreResult<Vec<Uaid>> {
        let mut out = Vec::new();
        for item in self.db.iterator_cf(self.cf(USERS), IteratorMode::Start) {
            let (k, v) = item.map_err(err)?;
            let stale = decode_user(&v).is_none_or(|u| u.last_seen < cutoff);
            if stale {
                if let Ok(id) = <[u8; 16]>::try_from(&k[..]) {
                    out.push(Uaid(id));
                }
                if out.len() >= limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    pub fn get_channel(
        &self,
        uaid: &Uaid,
        channel: &ChannelId,
    ) -> StoreResult<Option<ChannelRecord>> {
        Ok(self
            .db
            .get_pinned_cf(self.cf(CHANNELS), channel_key(uaid, channel))
            .map_err(err)?
            .and_then(|v| decode_channel(&v)))
    }

    pub fn put_channel(
        &self,
        uaid: &Uaid,
        channel: &ChannelId,
        record: &ChannelRecord,
    ) -> StoreResult<()> {
        let mut b = WriteBatch::default();
        b.put_cf(
            self.cf(CHANNELS),
            channel_key(uaid, channel),
            encode_channel(record),
        );
        self.write(b)
    }

    pub fn remove_channel(&self, uaid: &Uaid, channel: &ChannelId) -> StoreResult<bool> {
        let key = channel_key(uaid, channel);
        let existed = self
            .db
            .get_pinned_cf(self.cf(CHANNELS), key)
            .map_err(err)?
            .is_some();
        let mut b = WriteBatch::default();
        b.delete_cf(self.cf(CHANNELS), key);
        b.delete_range_cf(self.cf(TOPICS), &key[..], &prefix_end(&key)[..]);
        let messages = self.cf(MESSAGES);
        self.for_prefix(MESSAGES, &uaid.0, |k, v| {
            if v.get(MESSAGE_CHANNEL) == Some(channel.as_bytes().as_slice()) {
                b.delete_cf(messages, k);
            }
            true
        })?;
        self.write(b)?;
        Ok(existed)
    }

    pub fn list_channels(&self, uaid: &Uaid) -> StoreResult<Vec<ChannelId>> {
        let mut out = Vec::new();
        self.for_prefix(CHANNELS, &uaid.0, |k, _| {
            if let Some(c) = k.get(16..32).and_then(|b| <[u8; 16]>::try_from(b).ok()) {
                out.push(ChannelId::from_bytes(c));
            }
            true
        })?;
        Ok(out)
    }

    pub fn count_channels(&self, uaid: &Uaid, limit: usize) -> StoreResult<usize> {
        let mut n = 0;
        self.for_prefix(CHANNELS, &uaid.0, |_, _| {
            n += 1;
            n < limit
        })?;
        Ok(n)
    }

    pub fn next_seq(&self) -> u64 {
        let now = now_micros();
        let prev = self
            .seq
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |p| {
                Some(p.max(now - 1) + 1)
            })
            .expect("closure always returns Some");
        let seq = prev.max(now - 1) + 1;
        let ceiling = *self.seq_ceiling.lock().unwrap_or_else(|p| p.into_inner());
        if seq + SEQ_BLOCK / 2 >= ceiling {
            // If this fails the old ceiling stands; numbers above it are
            // still unique in this process, only a crash plus a clock set
            // back could collide, so log rather than fail the push.
            if let Err(e) = self.raise_ceiling(seq + SEQ_BLOCK) {
                tracing::error!("could not persist the sequence ceiling: {e}");
            }
        }
        seq
    }

    pub fn put_message(&self, uaid: &Uaid, m: &Message) -> StoreResult<PutOutcome> {
        let messages = self.cf(MESSAGES);
        let mut b = WriteBatch::default();
        b.put_cf(messages, message_key(uaid, m.seq), encode_message(m));
        let Some(topic) = &m.topic else {
            self.write(b)?;
            return Ok(PutOutcome {
                replaced: None,
                seq: m.seq,
                ..Default::default()
            });
        };
        let _guard = self.topic_lock(uaid);
        let tkey = topic_key(uaid, &m.channel, topic);
        let mut replaced = None;
        if let Some(old) = self.db.get_pinned_cf(self.cf(TOPICS), &tkey).map_err(err)? {
            if let Ok(old_seq) = <[u8; 8]>::try_from(&old[..]).map(u64::from_be_bytes) {
                let old_key = message_key(uaid, old_seq);
                if old_seq != m.seq
                    && self
                        .db
                        .get_pinned_cf(messages, old_key)
                        .map_err(err)?
                        .is_some()
                {
                    b.delete_cf(messages, old_key);
                    replaced = Some(old_seq);
                }
            }
        }
        b.put_cf(self.cf(TOPICS), &tkey, m.seq.to_be_bytes());
        self.write(b)?;
        Ok(PutOutcome {
            replaced,
            seq: m.seq,
            ..Default::default()
        })
    }

    pub fn scan_messages(
        &self,
        uaid: &Uaid,
        visit: &mut dyn FnMut(Message) -> bool,
    ) -> StoreResult<()> {
        self.for_prefix(MESSAGES, &uaid.0, |k, v| {
            match seq_from_message_key(k).and_then(|seq| decode_message(seq, v)) {
                Some(m) => visit(m),
                None => {
                    tracing::warn!("skipping an undecodable stored message");
                    true
                }
            }
        })
    }

    /// Unexpired messages above `after`, oldest first, at most `limit`.
    pub fn read_messages(
        &self,
        uaid: &Uaid,
        after: u64,
        limit: usize,
    ) -> StoreResult<Vec<Message>> {
        let now = now_secs();
        let mut out = Vec::new();
        if limit == 0 || after == u64::MAX {
            return Ok(out);
        }
        let mut ro = ReadOptions::default();
        ro.set_iterate_upper_bound(prefix_end(&uaid.0));
        let from = message_key(uaid, after + 1);
        let iter = self.db.iterator_cf_opt(
            self.cf(MESSAGES),
            ro,
            IteratorMode::From(&from, Direction::Forward),
        );
        for item in iter {
            let (k, v) = item.map_err(err)?;
            match seq_from_message_key(&k).and_then(|seq| decode_message(seq, &v)) {
                Some(m) if !m.expired(now) => out.push(m),
                Some(_) => {}
                None => tracing::warn!("skipping an undecodable stored message"),
            }
            if out.len() == limit {
                break;
            }
        }
        Ok(out)
    }

    pub fn get_message(&self, uaid: &Uaid, seq: u64) -> StoreResult<Option<Message>> {
        Ok(self
            .db
            .get_pinned_cf(self.cf(MESSAGES), message_key(uaid, seq))
            .map_err(err)?
            .and_then(|v| decode_message(seq, &v))
            .filter(|m| !m.expired(now_secs())))
    }

    pub fn delete_message(&self, uaid: &Uaid, seq: u64) -> StoreResult<bool> {
        let key = message_key(uaid, seq);
        let existed = self
            .db
            .get_pinned_cf(self.cf(MESSAGES), key)
            .map_err(err)?
            .is_some();
        if existed {
            let mut b = WriteBatch::default();
            b.delete_cf(self.cf(MESSAGES), key);
            self.write(b)?;
        }
        Ok(existed)
    }

    pub fn count_messages(&self, uaid: &Uaid, now: u64, limit: usize) -> StoreResult<usize> {
        if limit == 0 {
            return Ok(0);
        }
        let mut n = 0;
        self.for_prefix(MESSAGES, &uaid.0, |_, v| {
            if message_expires_at(v).is_some_and(|e| e > now) {
                n += 1;
            }
            n < limit
        })?;
        Ok(n)
    }

    pub fn broadcasts(&self) -> StoreResult<std::collections::BTreeMap<String, String>> {
        let mut out = std::collections::BTreeMap::new();
        self.for_prefix(META, BROADCAST_PREFIX, |k, v| {
            let id = std::str::from_utf8(&k[BROADCAST_PREFIX.len()..]);
            if let (Ok(id), Ok(v)) = (id, std::str::from_utf8(v)) {
                out.insert(id.to_string(), v.to_string());
            }
            true
        })?;
        Ok(out)
    }

    pub fn put_broadcast(&self, id: &str, version: &str) -> StoreResult<()> {
        let mut key = BROADCAST_PREFIX.to_vec();
        key.extend_from_slice(id.as_bytes());
        let mut b = WriteBatch::default();
        b.put_cf(self.cf(META), key, version.as_bytes());
        self.write(b)
    }

    pub fn blocks(&self) -> StoreResult<std::collections::BTreeMap<String, String>> {
        let mut out = std::collections::BTreeMap::new();
        self.for_prefix(META, BLOCK_PREFIX, |k, v| {
            let id = std::str::from_utf8(&k[BLOCK_PREFIX.len()..]);
            if let (Ok(id), Ok(v)) = (id, std::str::from_utf8(v)) {
                out.insert(id.to_string(), v.to_string());
            }
            true
        })?;
        Ok(out)
    }

    pub fn put_block(&self, id: &str, record: &str) -> StoreResult<()> {
        let mut b = WriteBatch::default();
        b.put_cf(self.cf(META), block_key(id), record.as_bytes());
        self.write(b)
    }

    pub fn remove_block(&self, id: &str) -> StoreResult<bool> {
        let key = block_key(id);
        let existed = self
            .db
            .get_pinned_cf(self.cf(META), &key)
            .map_err(err)?
            .is_some();
        if existed {
            let mut b = WriteBatch::default();
            b.delete_cf(self.cf(META), key);
            self.write(b)?;
        }
        Ok(existed)
    }

    pub fn purge_expired(&self) -> StoreResult<()> {
        let now = now_secs();
        let messages = self.cf(MESSAGES);
        let mut batch = WriteBatch::default();
        let mut removed = 0u64;
        for item in self
            .db
            .iterator_cf_opt(messages, total_order(), IteratorMode::Start)
        {
            let (k, v) = item.map_err(err)?;
            if message_expires_at(&v).is_none_or(|e| e <= now) {
                batch.delete_cf(messages, &k);
                removed += 1;
                if batch.len() >= 1024 {
                    self.write(std::mem::take(&mut batch))?;
                }
            }
        }
        self.write(batch)?;
        if let Some(c) = &self.expired {
            c.inc_by(removed);
        }
        Ok(())
    }

    pub fn flush(&self) -> StoreResult<()> {
        self.db.flush_wal(true).map_err(err)?;
        for cf in [USERS, CHANNELS, MESSAGES, TOPICS, META, RECEIPTS] {
            self.db.flush_cf(self.cf(cf)).map_err(err)?;
        }
        Ok(())
    }

    pub fn health_check(&self) -> StoreResult<()> {
        let mut b = WriteBatch::default();
        b.put_cf(self.cf(META), b"health", now_secs().to_be_bytes());
        self.write(b)
    }

    pub fn stats(&self) -> StoreStats {
        let mut size = 0;
        let mut pending = 0;
        for cf in [USERS, CHANNELS, MESSAGES, TOPICS, META, RECEIPTS] {
            size += self.int_property(cf, "rocksdb.total-sst-files-size")
                + self.int_property(cf, "rocksdb.cur-size-all-mem-tables");
            pending += self.int_property(cf, "rocksdb.estimate-pending-compaction-bytes");
        }
        StoreStats {
            estimated_messages: self.int_property(MESSAGES, "rocksdb.estimate-num-keys"),
            size_bytes: size,
            pending_compaction_bytes: pending,
        }
    }
}

fn block_key(id: &str) -> Vec<u8> {
    let mut key = BLOCK_PREFIX.to_vec();
    key.extend_from_slice(id.as_bytes());
    key
}

fn outbox_key(uaid: &Uaid) -> Vec<u8> {
    [OUTBOX_PREFIX, &uaid.0[..]].concat()
}

/// The bridges' outbox (see `Store::outbox_add`).
impl Rocks {
    /// A RocksDB checkpoint into `dir` (which must not exist): a flush of
    /// the memtables, then hard links to the table files (copies across
    /// filesystems) and copies of the manifest and live WAL, all taken at
    /// one sequence number, so every write that returned before is in it.
    pub fn checkpoint(&self, dir: &Path) -> StoreResult<()> {
        let cp = rocksdb::checkpoint::Checkpoint::new(&self.db).map_err(err)?;
        cp.create_checkpoint(dir).map_err(err)
    }
}

impl Rocks {
    fn outbox_guard(&self) -> std::sync::MutexGuard<'_, ()> {
        self.outbox_lock.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn outbox_due(&self, uaid: &Uaid) -> StoreResult<Option<u64>> {
        Ok(self
            .db
            .get_pinned_cf(self.cf(META), outbox_key(uaid))
            .map_err(err)?
            .and_then(|v| <[u8; 8]>::try_from(&v[..]).ok())
            .map(u64::from_be_bytes))
    }

    pub fn outbox_set(&self, uaid: &Uaid, due_ms: u64) -> StoreResult<()> {
        let mut b = WriteBatch::default();
        b.put_cf(self.cf(META), outbox_key(uaid), due_ms.to_be_bytes());
        self.write(b)
    }

    pub fn outbox_add(&self, uaid: &Uaid, due_ms: u64) -> StoreResult<bool> {
        let _g = self.outbox_guard();
        if self.outbox_due(uaid)?.is_some() {
            return Ok(false);
        }
        self.outbox_set(uaid, due_ms)?;
        Ok(true)
    }

    pub fn outbox_remove(&self, uaid: &Uaid) -> StoreResult<()> {
        let mut b = WriteBatch::default();
        b.delete_cf(self.cf(META), outbox_key(uaid));
        self.write(b)
    }

    pub fn outbox_take(
        &self,
        now_ms: u64,
        lease_until_ms: u64,
        limit: usize,
    ) -> StoreResult<Vec<Uaid>> {
        let _g = self.outbox_guard();
        let mut due = Vec::new();
        self.for_prefix(META, OUTBOX_PREFIX, |k, v| {
            let at = <[u8; 8]>::try_from(v).ok().map(u64::from_be_bytes);
            let id = <[u8; 16]>::try_from(&k[OUTBOX_PREFIX.len()..]).ok();
            if let (Some(at), Some(id)) = (at, id) {
                if at <= now_ms {
                    due.push((at, Uaid(id)));
                }
            }
            true
        })?;
        due.sort();
        due.truncate(limit);
        let mut b = WriteBatch::default();
        for (_, uaid) in &due {
            b.put_cf(
                self.cf(META),
                outbox_key(uaid),
                lease_until_ms.to_be_bytes(),
            );
        }
        self.write(b)?;
        Ok(due.into_iter().map(|(_, u)| u).collect())
    }
}

impl Rocks {
    /// Compacts the message column family now (tests and operators use it to
    /// see the TTL compaction filter at work).
    pub fn compact_messages(&self) {
        self.db
            .compact_range_cf(self.cf(MESSAGES), None::<&[u8]>, None::<&[u8]>);
    }

    /// Raw number of message records on disk, expired or not.
    pub fn raw_message_count(&self) -> usize {
        self.db
            .iterator_cf_opt(self.cf(MESSAGES), total_order(), IteratorMode::Start)
            .count()
    }
}

#[async_trait::async_trait]
impl Store for RocksStore {
    async fn get_user(&self, uaid: &Uaid) -> StoreResult<Option<UserRecord>> {
        self.db()?.get_user(uaid)
    }

    async fn put_user(&self, uaid: &Uaid, record: &UserRecord) -> StoreResult<()> {
        let (uaid, record) = (*uaid, record.clone());
        self.write_op(move |r| r.put_user(&uaid, &record)).await
    }

    async fn drop_user(&self, uaid: &Uaid) -> StoreResult<()> {
        let uaid = *uaid;
        self.write_op(move |r| r.drop_user(&uaid)).await
    }

    async fn stale_users(&self, cutoff: u64, limit: usize) -> StoreResult<Vec<Uaid>> {
        self.blocking(move |r| r.stale_users(cutoff, limit)).await
    }

    async fn get_channel(
        &self,
        uaid: &Uaid,
        channel: &ChannelId,
    ) -> StoreResult<Option<ChannelRecord>> {
        self.db()?.get_channel(uaid, channel)
    }

    async fn put_channel(
        &self,
        uaid: &Uaid,
        channel: &ChannelId,
        record: &ChannelRecord,
    ) -> StoreResult<()> {
        let (uaid, channel, record) = (*uaid, *channel, *record);
        self.write_op(move |r| r.put_channel(&uaid, &channel, &record))
            .await
    }

    async fn remove_channel(&self, uaid: &Uaid, channel: &ChannelId) -> StoreResult<bool> {
        let (uaid, channel) = (*uaid, *channel);
        self.write_op(move |r| r.remove_channel(&uaid, &channel))
            .await
    }

    async fn count_channels(&self, uaid: &Uaid, limit: usize) -> StoreResult<usize> {
        self.db()?.count_channels(uaid, limit)
    }

    async fn list_channels(&self, uaid: &Uaid) -> StoreResult<Vec<ChannelId>> {
        self.db()?.list_channels(uaid)
    }

    fn next_seq(&self) -> u64 {
        match self.db() {
            Ok(db) => db.next_seq(),
            // No database: the push fails anyway; keep numbers unique.
            Err(_) => self.inner.seq_floor.fetch_add(1, Ordering::AcqRel) + 1,
        }
    }

    async fn put_message(&self, uaid: &Uaid, message: &Message) -> StoreResult<PutOutcome> {
        if self.sync_writes {
            let (uaid, message) = (*uaid, message.clone());
            self.blocking(move |r| r.put_message(&uaid, &message)).await
        } else {
            let r = self.db()?.put_message(uaid, message);
            self.check(r)
        }
    }

    async fn read_messages(
        &self,
        uaid: &Uaid,
        after: u64,
        limit: usize,
    ) -> StoreResult<Vec<Message>> {
        self.db()?.read_messages(uaid, after, limit)
    }

    async fn get_message(&self, uaid: &Uaid, seq: u64) -> StoreResult<Option<Message>> {
        self.db()?.get_message(uaid, seq)
    }

    async fn delete_message(&self, uaid: &Uaid, seq: u64) -> StoreResult<bool> {
        let uaid = *uaid;
        self.write_op(move |r| r.delete_message(&uaid, seq)).await
    }

    async fn count_messages(&self, uaid: &Uaid, now: u64, limit: usize) -> StoreResult<usize> {
        self.db()?.count_messages(uaid, now, limit)
    }

    async fn broadcasts(&self) -> StoreResult<std::collections::BTreeMap<String, String>> {
        self.db()?.broadcasts()
    }

    async fn put_broadcast(&self, id: &str, version: &str) -> StoreResult<()> {
        let (id, version) = (id.to_string(), version.to_string());
        self.write_op(move |r| r.put_broadcast(&id, &version)).await
    }

    async fn blocks(&self) -> StoreResult<std::collections::BTreeMap<String, String>> {
        self.db()?.blocks()
    }

    async fn put_block(&self, id: &str, record: &str) -> StoreResult<()> {
        let (id, record) = (id.to_string(), record.to_string());
        self.write_op(move |r| r.put_block(&id, &record)).await
    }

    async fn remove_block(&self, id: &str) -> StoreResult<bool> {
        let id = id.to_string();
        self.write_op(move |r| r.remove_block(&id)).await
    }

    async fn purge_expired(&self) -> StoreResult<()> {
        self.blocking(|r| r.purge_expired()).await
    }

    async fn flush(&self) -> StoreResult<()> {
        self.blocking(|r| r.flush()).await
    }

    async fn health_check(&self) -> StoreResult<()> {
        self.blocking(|r| r.health_check()).await
    }

    fn stats(&self) -> StoreStats {
        self.db().map(|db| db.stats()).unwrap_or_default()
    }

    async fn checkpoint(&self, dir: &Path) -> Result<&'static str, CheckpointError> {
        if dir.symlink_metadata().is_ok() {
            return Err(CheckpointError::Exists(dir.to_path_buf()));
        }
        let db = self.db().map_err(CheckpointError::Store)?;
        let dir = dir.to_path_buf();
        // Not through `blocking`: an I/O error here is the target's (a full
        // backup disk), no reason to reopen the serving database.
        tokio::task::spawn_blocking(move || db.checkpoint(&dir))
            .await
            .map_err(|e| CheckpointError::Store(StoreError::Task(format!("checkpoint: {e}"))))?
            .map_err(CheckpointError::Store)?;
        Ok("rocksdb")
    }

    async fn outbox_add(&self, uaid: &Uaid, due_ms: u64) -> StoreResult<bool> {
        let uaid = *uaid;
        self.write_op(move |r| r.outbox_add(&uaid, due_ms)).await
    }

    async fn outbox_set(&self, uaid: &Uaid, due_ms: u64) -> StoreResult<()> {
        let uaid = *uaid;
        self.write_op(move |r| r.outbox_set(&uaid, due_ms)).await
    }

    async fn outbox_take(
        &self,
        now_ms: u64,
        lease_until_ms: u64,
        limit: usize,
    ) -> StoreResult<Vec<Uaid>> {
        self.blocking(move |r| r.outbox_take(now_ms, lease_until_ms, limit))
            .await
    }

    async fn outbox_remove(&self, uaid: &Uaid) -> StoreResult<()> {
        let uaid = *uaid;
        self.write_op(move |r| r.outbox_remove(&uaid)).await
    }

    async fn outbox_due(&self, uaid: &Uaid) -> StoreResult<Option<u64>> {
        self.db()?.outbox_due(uaid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use herald_proto::urgency::Urgency;

    fn open(dir: &Path) -> Rocks {
        Rocks::open(dir, false, None).unwrap()
    }

    /// Whether the engine `old` was replaced by a reopen within `within`.
    fn reopened(old: &std::sync::Weak<Rocks>, within: std::time::Duration) -> bool {
        let deadline = std::time::Instant::now() + within;
        while std::time::Instant::now() < deadline {
            if old.upgrade().is_none() {
                return true;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        false
    }

    /// The reopen after a full disk is decided on the variant: an I/O
    /// error reopens the database, nothing else does.
    #[test]
    fn only_io_errors_reopen_the_database() {
        let dir = tempfile::tempdir().unwrap();
        let store = RocksStore::open(dir.path(), false, None).unwrap();
        let first = Arc::downgrade(&store.engine().unwrap());
        for e in [
            StoreError::Unavailable("IO error: looks like one, is not".into()),
            StoreError::Corrupt("Corruption: bad block".into()),
            StoreError::Rejected("Invalid argument: x".into()),
            StoreError::Task("rocksdb task failed".into()),
        ] {
            assert_eq!(store.noted(e.clone()), e);
        }
        assert!(!reopened(&first, std::time::Duration::from_millis(300)));

        let io = StoreError::Io("IO error: No space left on device".into());
        assert_eq!(store.noted(io.clone()), io);
        assert!(reopened(&first, std::time::Duration::from_secs(5)));
        // The reopened store serves as before.
        let u = Uaid::random();
        let rec = UserRecord {
            created: 1,
            last_seen: 2,
            router: None,
        };
        let db = store.engine().unwrap();
        db.put_user(&u, &rec).unwrap();
        assert_eq!(db.get_user(&u).unwrap(), Some(rec));
    }

    fn wal_bytes(dir: &Path) -> u64 {
        std::fs::read_dir(dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".log"))
            .map(|e| e.metadata().map(|m| m.len()).unwrap_or(0))
            .sum()
    }

    #[test]
    fn the_write_ahead_log_stays_bounded_while_small_families_sit_idle() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path());
        // One write to a column family that then sees no more: without a
        // bound, it pins every log file written after it.
        let u = Uaid::random();
        s.put_user(
            &u,
            &UserRecord {
                created: 1,
                last_seen: 1,
                router: None,
            },
        )
        .unwrap();
        let c = uuid::Uuid::new_v4();
        let mut written = 0u64;
        while written < 12 * MAX_WAL_BYTES {
            let mut m = message(&s, c, 60, None);
            m.data = Bytes::from(vec![7u8; 2000]);
            s.put_message(&u, &m).unwrap();
            assert!(s.delete_message(&u, m.seq).unwrap());
            written += 2000;
        }
        // Flushes run in the background and lag far behind on a loaded
        // machine: the bound is what this checks, not how fast it holds,
        // so the wait is generous (it ends as soon as the WAL is small).
        // RocksDB weighs the WAL against its bound when a write comes in,
        // as writes keep doing in service; so do a few here, or a flush
        // that was due when the loop above ended may never be asked for.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
        while wal_bytes(dir.path()) > 4 * MAX_WAL_BYTES && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(50));
            let m = message(&s, c, 60, None);
            s.put_message(&u, &m).unwrap();
            assert!(s.delete_message(&u, m.seq).unwrap());
        }
        let wal = wal_bytes(dir.path());
        assert!(
            wal <= 4 * MAX_WAL_BYTES,
            "{wal} bytes of WAL after writing {written} (bound {MAX_WAL_BYTES})"
        );
        assert_eq!(s.get_user(&u).unwrap().map(|r| r.created), Some(1));
    }

    fn message(store: &Rocks, channel: ChannelId, ttl: u64, topic: Option<&str>) -> Message {
        Message {
            seq: store.next_seq(),
            channel,
            expires_at: now_secs() + ttl,
            ttl,
            urgency: Urgency::Normal,
            topic: topic.map(String::from),
            headers: None,
            data: Bytes::from_static(b"x"),
            receipt: false,
        }
    }

    fn seqs(store: &Rocks, uaid: &Uaid) -> Vec<u64> {
        let mut out = vec![];
        store
            .scan_messages(uaid, &mut |m| {
                out.push(m.seq);
                true
            })
            .unwrap();
        out
    }

    #[test]
    fn users_channels_and_messages_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let uaid = Uaid::random();
        let ch = uuid::Uuid::new_v4();
        let (m, last_seq) = {
            let s = open(dir.path());
            s.put_user(
                &uaid,
                &UserRecord {
                    created: 1,
                    last_seen: 2,
                    router: None,
                },
            )
            .unwrap();
            s.put_channel(
                &uaid,
                &ch,
                &ChannelRecord {
                    key_hash: Some([7; 32]),
                    created: 3,
                },
            )
            .unwrap();
            let m = message(&s, ch, 60, None);
            s.put_message(&uaid, &m).unwrap();
            (m, s.next_seq())
        };
        let s = open(dir.path());
        assert_eq!(s.get_user(&uaid).unwrap().unwrap().last_seen, 2);
        assert_eq!(
            s.get_channel(&uaid, &ch).unwrap().unwrap().key_hash,
            Some([7; 32])
        );
        assert_eq!(s.get_message(&uaid, m.seq).unwrap(), Some(m));
        assert!(
            s.next_seq() > last_seq,
            "sequence numbers never repeat across restarts"
        );
    }

    #[test]
    fn messages_scan_oldest_first_per_user() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path());
        let (a, b) = (Uaid::random(), Uaid::random());
        let ch = uuid::Uuid::new_v4();
        let mut expect = vec![];
        for _ in 0..5 {
            let m = message(&s, ch, 60, None);
            expect.push(m.seq);
            s.put_message(&a, &m).unwrap();
            s.put_message(&b, &message(&s, ch, 60, None)).unwrap();
        }
        assert_eq!(seqs(&s, &a), expect);
        assert_eq!(s.count_messages(&a, now_secs(), 100).unwrap(), 5);
        assert_eq!(s.count_messages(&a, now_secs(), 3).unwrap(), 3);
        assert!(s.delete_message(&a, expect[0]).unwrap());
        assert!(!s.delete_message(&a, expect[0]).unwrap());
        assert_eq!(seqs(&s, &a), expect[1..]);
        assert_eq!(seqs(&s, &b).len(), 5);
    }

    #[test]
    fn topic_replaces_pending_message_of_same_channel_only() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path());
        let u = Uaid::random();
        let (c1, c2) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
        let first = message(&s, c1, 60, Some("t"));
        assert!(s.put_message(&u, &first).unwrap().replaced.is_none());
        let other_channel = message(&s, c2, 60, Some("t"));
        assert!(s
            .put_message(&u, &other_channel)
            .unwrap()
            .replaced
            .is_none());
        let second = message(&s, c1, 60, Some("t"));
        assert_eq!(
            s.put_message(&u, &second).unwrap().replaced,
            Some(first.seq)
        );
        assert_eq!(seqs(&s, &u), vec![other_channel.seq, second.seq]);
        // Once acknowledged, the next message with the topic replaces nothing.
        s.delete_message(&u, second.seq).unwrap();
        assert!(s
            .put_message(&u, &message(&s, c1, 60, Some("t")))
            .unwrap()
            .replaced
            .is_none());
    }

    #[test]
    fn removing_a_channel_drops_its_messages() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path());
        let u = Uaid::random();
        let (c1, c2) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
        let rec = ChannelRecord {
            key_hash: None,
            created: 0,
        };
        s.put_channel(&u, &c1, &rec).unwrap();
        s.put_channel(&u, &c2, &rec).unwrap();
        assert_eq!(s.count_channels(&u, 10).unwrap(), 2);
        s.put_message(&u, &message(&s, c1, 60, Some("t"))).unwrap();
        let keep = message(&s, c2, 60, None);
        s.put_message(&u, &keep).unwrap();
        assert!(s.remove_channel(&u, &c1).unwrap());
        assert!(!s.remove_channel(&u, &c1).unwrap());
        assert_eq!(seqs(&s, &u), vec![keep.seq]);
        assert_eq!(s.count_channels(&u, 10).unwrap(), 1);
    }

    #[test]
    fn dropping_a_user_removes_everything() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path());
        let (u, other) = (Uaid::random(), Uaid::random());
        let ch = uuid::Uuid::new_v4();
        for id in [&u, &other] {
            s.put_user(
                id,
                &UserRecord {
                    created: 0,
                    last_seen: 10,
                    router: None,
                },
            )
            .unwrap();
            s.put_channel(
                id,
                &ch,
                &ChannelRecord {
                    key_hash: None,
                    created: 0,
                },
            )
            .unwrap();
            s.put_message(id, &message(&s, ch, 60, None)).unwrap();
        }
        s.put_user(
            &other,
            &UserRecord {
                created: 0,
                last_seen: 1000,
                router: None,
            },
        )
        .unwrap();
        assert_eq!(s.stale_users(500, 10).unwrap(), vec![u]);
        s.drop_user(&u).unwrap();
        assert!(s.get_user(&u).unwrap().is_none());
        assert!(s.get_channel(&u, &ch).unwrap().is_none());
        assert!(seqs(&s, &u).is_empty());
        assert_eq!(seqs(&s, &other).len(), 1);
    }

    #[test]
    fn expired_messages_leave_disk_by_compaction_and_sweep() {
        let dir = tempfile::tempdir().unwrap();
        let counter = prometheus::IntCounter::new("expired", "x").unwrap();
        let s = Rocks::open(dir.path(), false, Some(counter.clone())).unwrap();
        let u = Uaid::random();
        let ch = uuid::Uuid::new_v4();
        let mut dead = message(&s, ch, 0, None);
        dead.expires_at = now_secs() - 1;
        s.put_message(&u, &dead).unwrap();
        s.put_message(&u, &message(&s, ch, 600, None)).unwrap();
        assert_eq!(s.count_messages(&u, now_secs(), 10).unwrap(), 1);
        s.flush().unwrap();
        s.compact_messages();
        assert_eq!(
            s.raw_message_count(),
            1,
            "compaction filter removed the expired message"
        );
        assert_eq!(counter.get(), 1);

        let mut dead2 = message(&s, ch, 0, None);
        dead2.expires_at = now_secs() - 1;
        s.put_message(&u, &dead2).unwrap();
        assert_eq!(s.raw_message_count(), 2);
        s.purge_expired().unwrap();
        assert_eq!(
            s.raw_message_count(),
            1,
            "the sweep removed it without a compaction"
        );
        assert_eq!(counter.get(), 2);
    }
}
