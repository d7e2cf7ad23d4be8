//! The state file of a push client: which server, which uaid, and for each
//! named subscription its channel, endpoint and key material; plus the
//! recently acknowledged messages, so a redelivery after a crash is
//! recognised.
//!
//! JSON, so a person can read it, with a `format` marker and a `version` so a
//! file of another program or of a later Herald is refused instead of being
//! misread. It holds private keys: it is written with mode 0600, always
//! through a temporary file renamed over the old one, so a crash leaves
//! either the old or the new file and never a torn one. A file that cannot be
//! read as this format is refused with the reason and never written to.
//!
//! Several processes may share one file (`herald listen run` keeps running
//! while `herald listen subscribe` adds a subscription), so every change is
//! read-modify-write under an exclusive `flock` on `<file>.lock`; readers
//! need no lock because a rename is atomic.

use anyhow::{anyhow, bail, Context};
use herald_proto::b64::{decode_b64url, encode_b64url};
use herald_proto::crypto::ReceiverKeys;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, VecDeque};
use std::io::Write;
use std::path::{Path, PathBuf};

/// The value of `format`: what makes a file ours.
pub const FORMAT: &str = "herald-listen-state";
/// The layout version this code reads and writes.
pub const VERSION: u32 = 1;
/// Acknowledged messages remembered. Only messages in flight when a
/// connection ended are redelivered, and a server sends at most a window of
/// them (Herald: 64), so this is far more than a redelivery can reach back.
pub const MAX_ACKED: usize = 1000;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub format: String,
    pub version: u32,
    /// The push service's websocket URL (`ws://` or `wss://`).
    pub server: String,
    /// The user agent id the server issued; none before the first hello.
    #[serde(default)]
    pub uaid: Option<String>,
    #[serde(default)]
    pub subscriptions: BTreeMap<String, StoredSubscription>,
    /// Broadcast id → the version last seen.
    #[serde(default)]
    pub broadcasts: BTreeMap<String, String>,
    /// Identities of messages already handed over and acknowledged, oldest
    /// first (see [`super::PushMessage::dedup_key`]).
    #[serde(default)]
    pub acked: VecDeque<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredSubscription {
    #[serde(rename = "channelID")]
    pub channel_id: String,
    pub endpoint: String,
    /// The P-256 private scalar, 32 bytes base64url.
    pub private_key: String,
    /// `keys.p256dh`, kept so a damaged private key is noticed.
    pub p256dh: String,
    /// `keys.auth`, 16 bytes base64url.
    pub auth: String,
    /// The application server key the subscription is bound to, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_server_key: Option<String>,
    /// Unix seconds.
    #[serde(default)]
    pub created: u64,
}

impl StoredSubscription {
    pub fn new(
        channel_id: String,
        endpoint: String,
        keys: &ReceiverKeys,
        app_server_key: Option<String>,
    ) -> Self {
        StoredSubscription {
            channel_id,
            endpoint,
            private_key: encode_b64url(&keys.private_bytes()),
            p256dh: encode_b64url(keys.public()),
            auth: encode_b64url(keys.auth()),
            app_server_key,
            created: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        }
    }

    /// What can be checked without curve arithmetic.
    fn check_lengths(&self) -> anyhow::Result<()> {
        let len = |v: &str| decode_b64url(v).map(|b| b.len());
        if len(&self.private_key) != Some(32) {
            bail!("private_key must be 32 bytes of base64url");
        }
        if len(&self.p256dh) != Some(65) {
            bail!("p256dh must be 65 bytes of base64url");
        }
        if len(&self.auth) != Some(16) {
            bail!("auth must be 16 bytes of base64url");
        }
        Ok(())
    }

    /// The key material, checked: the private key must be a P-256 scalar
    /// whose public half is the stored `p256dh`.
    pub fn keys(&self) -> anyhow::Result<ReceiverKeys> {
        let private = decode_b64url(&self.private_key)
            .ok_or_else(|| anyhow!("private_key is not base64url"))?;
        let auth = decode_b64url(&self.auth).ok_or_else(|| anyhow!("auth is not base64url"))?;
        let keys = ReceiverKeys::from_bytes(&private, &auth)
            .ok_or_else(|| anyhow!("private_key must be a 32-byte P-256 key and auth 16 bytes"))?;
        if decode_b64url(&self.p256dh).as_deref() != Some(&keys.public()[..]) {
            bail!("p256dh does not match private_key");
        }
        Ok(keys)
    }
}

impl State {
    pub fn new(server: &str) -> State {
        State {
            format: FORMAT.to_string(),
            version: VERSION,
            server: server.to_string(),
            uaid: None,
            subscriptions: BTreeMap::new(),
            broadcasts: BTreeMap::new(),
            acked: VecDeque::new(),
        }
    }

    /// Parses and checks a state file's text. The error says what is wrong
    /// in words a person can act on.
    pub fn parse(text: &str) -> anyhow::Result<State> {
        let value: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| anyhow!("it is not valid JSON ({e}); the file is corrupt"))?;
        let format = value.get("format").and_then(|f| f.as_str());
        if format != Some(FORMAT) {
            bail!("it is not a herald listen state file (no \"format\": \"{FORMAT}\")");
        }
        match value.get("version").and_then(|v| v.as_u64()) {
            Some(v) if v == u64::from(VERSION) => {}
            Some(v) => bail!(
                "it has state format version {v}, and this herald reads only version {VERSION}"
            ),
            None => bail!("it has no numeric \"version\""),
        }
        let state: State =
            serde_json::from_value(value).map_err(|e| anyhow!("it is damaged: {e}"))?;
        state.check()?;
        Ok(state)
    }

    fn check(&self) -> anyhow::Result<()> {
        super::normalize_server_url(&self.server)
            .map_err(|e| anyhow!("it is damaged: server: {e:#}"))?;
        let mut channels = std::collections::HashSet::new();
        for (name, sub) in &self.subscriptions {
            validate_name(name).map_err(|e| anyhow!("it is damaged: {e:#}"))?;
            sub.check_lengths()
                .map_err(|e| anyhow!("it is damaged: subscription {name:?}: {e:#}"))?;
            if !channels.insert(sub.channel_id.as_str()) {
                bail!("it is damaged: channelID {} appears twice", sub.channel_id);
            }
        }
        Ok(())
    }

    /// The full check of every key pair (a P-256 multiplication each, so
    /// done when a client opens the file, not on every re-read).
    pub fn verify_keys(&self) -> anyhow::Result<()> {
        for (name, sub) in &self.subscriptions {
            sub.keys()
                .map_err(|e| anyhow!("it is damaged: subscription {name:?}: {e:#}"))?;
        }
        Ok(())
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("state serialises") + "\n"
    }

    pub fn by_channel(&self, channel_id: &str) -> Option<(&String, &StoredSubscription)> {
        self.subscriptions
            .iter()
            .find(|(_, s)| s.channel_id.eq_ignore_ascii_case(channel_id))
    }

    pub fn was_acked(&self, key: &str) -> bool {
        self.acked.iter().any(|k| k == key)
    }

    /// Remembers a message as acknowledged, forgetting the oldest past
    /// [`MAX_ACKED`].
    pub fn remember_acked(&mut self, key: &str) {
        if self.was_acked(key) {
            return;
        }
        self.acked.push_back(key.to_string());
        while self.acked.len() > MAX_ACKED {
            self.acked.pop_front();
        }
    }
}

/// Subscription names become environment values and file keys: keep them
/// to what needs no quoting.
pub fn validate_name(name: &str) -> anyhow::Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'@'));
    if !ok {
        bail!("subscription name {name:?} must be 1 to 64 characters of A-Z a-z 0-9 - _ . @");
    }
    Ok(())
}

/// The state file's path and its locks.
#[derive(Debug, Clone)]
pub struct StateFile {
    path: PathBuf,
}

impl StateFile {
    pub fn new(path: impl Into<PathBuf>) -> StateFile {
        StateFile { path: path.into() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// [`StateFile::load`] with every key pair verified too.
    pub fn load_verified(&self) -> anyhow::Result<Option<State>> {
        let Some(state) = self.load()? else {
            return Ok(None);
        };
        state.verify_keys().with_context(|| {
            format!(
                "refusing state file {} (left untouched)",
                self.path.display()
            )
        })?;
        Ok(Some(state))
    }

    /// What identifies the file's current version cheaply: every write
    /// renames a new file into place, so the inode changes with it.
    pub fn stamp(&self) -> Option<FileStamp> {
        let meta = std::fs::metadata(&self.path).ok()?;
        #[cfg(unix)]
        let inode = {
            use std::os::unix::fs::MetadataExt;
            meta.ino()
        };
        #[cfg(not(unix))]
        let inode = 0;
        Some(FileStamp {
            inode,
            len: meta.len(),
            modified: meta.modified().ok(),
        })
    }

    /// The state, or None when there is no file yet.
    pub fn load(&self) -> anyhow::Result<Option<State>> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(anyhow::Error::new(e)
                    .context(format!("cannot read state file {}", self.path.display())))
            }
        };
        State::parse(&text).map(Some).with_context(|| {
            format!(
                "refusing state file {} (left untouched)",
                self.path.display()
            )
        })
    }

    /// Applies `change` to the current file contents (or to `fresh` when
    /// there is no file) and writes the result, all under the lock, so
    /// changes made meanwhile by other processes are kept.
    pub fn update<T>(
        &self,
        fresh: impl FnOnce() -> State,
        change: impl FnOnce(&mut State) -> anyhow::Result<T>,
    ) -> anyhow::Result<(State, T)> {
        self.update_stamped(fresh, change)
            .map(|(state, out, _)| (state, out))
    }

    /// [`StateFile::update`], also returning the stamp of the file written,
    /// taken before the lock is released.
    pub(crate) fn update_stamped<T>(
        &self,
        fresh: impl FnOnce() -> State,
        change: impl FnOnce(&mut State) -> anyhow::Result<T>,
    ) -> anyhow::Result<(State, T, Option<FileStamp>)> {
        let _lock = self.lock(".lock", true)?;
        let mut state = self.load()?.unwrap_or_else(fresh);
        let out = change(&mut state)?;
        self.write(&state)?;
        Ok((state, out, self.stamp()))
    }

    /// Held for as long as one client listens on this state: two listeners
    /// would take the uaid's connection from each other in turn.
    pub fn lock_listener(&self) -> anyhow::Result<FileLock> {
        self.lock(".listen.lock", false).map_err(|e| {
            if e.downcast_ref::<Busy>().is_some() {
                anyhow!(
                    "another client is already listening with state file {} (only one may)",
                    self.path.display()
                )
            } else {
                e
            }
        })
    }

    fn lock(&self, suffix: &str, wait: bool) -> anyhow::Result<FileLock> {
        let mut name = self.path.as_os_str().to_owned();
        name.push(suffix);
        let path = PathBuf::from(name);
        self.create_parent()?;
        let mut options = std::fs::OpenOptions::new();
        options.create(true).truncate(false).write(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let file = options
            .open(&path)
            .with_context(|| format!("cannot open lock file {}", path.display()))?;
        flock(&file, wait).with_context(|| format!("cannot lock {}", path.display()))?;
        Ok(FileLock { _file: file })
    }

    fn create_parent(&self) -> anyhow::Result<()> {
        let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) else {
            return Ok(());
        };
        if dir.exists() {
            return Ok(());
        }
        let mut builder = std::fs::DirBuilder::new();
        builder.recursive(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::DirBuilderExt;
            builder.mode(0o700);
        }
        builder
            .create(dir)
            .with_context(|| format!("cannot create directory {}", dir.display()))
    }

    /// Temp file (0600, fsynced) renamed over the old file, then the
    /// directory fsynced so the rename itself survives a power cut.
    fn write(&self, state: &State) -> anyhow::Result<()> {
        self.create_parent()?;
        let mut tmp = self.path.as_os_str().to_owned();
        tmp.push(format!(".tmp{}", std::process::id()));
        let tmp = PathBuf::from(tmp);
        let result = (|| -> anyhow::Result<()> {
            let mut options = std::fs::OpenOptions::new();
            options.write(true).create(true).truncate(true);
            #[cfg(unix)]
            {
                use std::os::unix::fs::OpenOptionsExt;
                options.mode(0o600);
            }
            let mut file = options.open(&tmp)?;
            file.write_all(state.to_json().as_bytes())?;
            file.sync_all()?;
            std::fs::rename(&tmp, &self.path)?;
            if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::File::open(dir)?.sync_all()?;
            }
            Ok(())
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result.with_context(|| format!("cannot write state file {}", self.path.display()))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileStamp {
    inode: u64,
    len: u64,
    modified: Option<std::time::SystemTime>,
}

/// An exclusive `flock`, released when dropped (or when the process dies,
/// so a crash never leaves a stale lock).
#[derive(Debug)]
pub struct FileLock {
    _file: std::fs::File,
}

#[derive(Debug)]
struct Busy;

impl std::fmt::Display for Busy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("locked by another process")
    }
}

impl std::error::Error for Busy {}

#[cfg(unix)]
fn flock(file: &std::fs::File, wait: bool) -> anyhow::Result<()> {
    use std::os::unix::io::AsRawFd;
    let op = if wait {
        libc::LOCK_EX
    } else {
        libc::LOCK_EX | libc::LOCK_NB
    };
    loop {
        // SAFETY: flock on a descriptor this function's caller owns and keeps open.
        if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
            return Ok(());
        }
        let err = std::io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EWOULDBLOCK) if !wait => return Err(Busy.into()),
            _ => return Err(err.into()),
        }
    }
}

#[cfg(not(unix))]
fn flock(_file: &std::fs::File, _wait: bool) -> anyhow::Result<()> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> State {
        let mut s = State::new("ws://127.0.0.1:8080/");
        s.uaid = Some("0123456789abcdef0123456789abcdef".into());
        let keys = ReceiverKeys::generate();
        s.subscriptions.insert(
            "phone".into(),
            StoredSubscription::new(
                "7d3a1c2e-4b5f-4a6b-8c7d-9e0f1a2b3c4d".into(),
                "http://127.0.0.1:8080/wpush/v1/x".into(),
                &keys,
                None,
            ),
        );
        s
    }

    #[test]
    fn round_trips_and_checks_keys() {
        let s = sample();
        let back = State::parse(&s.to_json()).unwrap();
        assert_eq!(back, s);
        let sub = &back.subscriptions["phone"];
        assert_eq!(encode_b64url(sub.keys().unwrap().public()), sub.p256dh);
        assert_eq!(
            back.by_channel("7D3A1C2E-4B5F-4A6B-8C7D-9E0F1A2B3C4D")
                .unwrap()
                .0,
            "phone"
        );
    }

    #[test]
    fn refuses_foreign_corrupt_and_future_files_with_reasons() {
        let err = |text: &str| format!("{:#}", State::parse(text).unwrap_err());
        assert!(err("{not json").contains("corrupt"));
        assert!(err(r#"{"server":"ws://h/"}"#).contains("not a herald listen state file"));
        assert!(err(r#"[1,2]"#).contains("not a herald listen state file"));
        assert!(
            err(r#"{"format":"herald-listen-state","version":2,"server":"ws://h/"}"#)
                .contains("version 2")
        );
        assert!(err(r#"{"format":"herald-listen-state","server":"ws://h/"}"#).contains("version"));
        assert!(err(r#"{"format":"herald-listen-state","version":1}"#).contains("damaged"));
        assert!(
            err(r#"{"format":"herald-listen-state","version":1,"server":"ftp://h/"}"#)
                .contains("server")
        );
        let mut s = sample();
        s.subscriptions.get_mut("phone").unwrap().p256dh =
            encode_b64url(ReceiverKeys::generate().public());
        let verify = |s: &State| format!("{:#}", s.verify_keys().unwrap_err());
        assert!(verify(&State::parse(&s.to_json()).unwrap()).contains("p256dh does not match"));
        let mut s = sample();
        s.subscriptions.get_mut("phone").unwrap().auth = "AAAA".into();
        assert!(err(&s.to_json()).contains("16 bytes"));
        let mut s = sample();
        let copy = s.subscriptions["phone"].clone();
        s.subscriptions.insert("tablet".into(), copy);
        assert!(err(&s.to_json()).contains("appears twice"));
    }

    #[test]
    fn acked_memory_is_bounded_and_deduplicated() {
        let mut s = State::new("ws://h/");
        for i in 0..MAX_ACKED + 10 {
            s.remember_acked(&format!("k{i}"));
        }
        s.remember_acked("k20");
        assert_eq!(s.acked.len(), MAX_ACKED);
        assert!(!s.was_acked("k0"));
        assert!(s.was_acked("k10") && s.was_acked(&format!("k{}", MAX_ACKED + 9)));
    }

    #[test]
    fn names_are_plain() {
        for ok in ["phone", "a.b-c_d@e", &"x".repeat(64)] {
            validate_name(ok).unwrap();
        }
        for bad in ["", "has space", "semi;colon", &"x".repeat(65), "ü"] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn writes_owner_only_atomically_and_keeps_others_changes() {
        let dir = tempfile::tempdir().unwrap();
        let file = StateFile::new(dir.path().join("nested/listen.json"));
        assert!(file.load().unwrap().is_none());
        let (s, ()) = file
            .update(
                || State::new("ws://h/"),
                |s| {
                    s.uaid = Some("u".into());
                    Ok(())
                },
            )
            .unwrap();
        assert_eq!(file.load().unwrap().unwrap(), s);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(file.path()).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
            let dir_mode = std::fs::metadata(file.path().parent().unwrap())
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(dir_mode & 0o077, 0);
        }
        // A second writer starts from what is on disk, not from its own copy.
        file.update(
            || unreachable!(),
            |s| {
                s.remember_acked("k");
                Ok(())
            },
        )
        .unwrap();
        let (s, ()) = file
            .update(
                || unreachable!(),
                |s| {
                    s.broadcasts.insert("b".into(), "1".into());
                    Ok(())
                },
            )
            .unwrap();
        assert!(s.was_acked("k") && s.uaid.as_deref() == Some("u"));
        // A failed change writes nothing.
        let before = std::fs::read(file.path()).unwrap();
        assert!(file
            .update(|| unreachable!(), |_| -> anyhow::Result<()> { bail!("no") })
            .is_err());
        assert_eq!(std::fs::read(file.path()).unwrap(), before);
        let leftovers: Vec<_> = std::fs::read_dir(file.path().parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.contains(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[test]
    fn a_refused_file_is_never_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("listen.json");
        std::fs::write(&path, "{\"someone\":\"else\"}").unwrap();
        let file = StateFile::new(&path);
        let err = format!("{:#}", file.load().unwrap_err());
        assert!(
            err.contains("left untouched") && err.contains("not a herald listen"),
            "{err}"
        );
        assert!(file.update(|| State::new("ws://h/"), |_| Ok(())).is_err());
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "{\"someone\":\"else\"}"
        );
    }

    #[test]
    fn only_one_listener_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let file = StateFile::new(dir.path().join("listen.json"));
        let held = file.lock_listener().unwrap();
        let err = file.lock_listener().unwrap_err().to_string();
        assert!(err.contains("already listening"), "{err}");
        drop(held);
        file.lock_listener().unwrap();
    }
}
