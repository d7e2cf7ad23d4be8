//! The import ledger: one line per user agent, subscription and message
//! already written to the store, in a file inside `data_dir`. It is what
//! makes the import idempotent and resumable: a second run, or a run after
//! an interruption, writes only what the ledger lacks. Keyed by upstream
//! ids, so a message Herald has delivered and deleted since, or a
//! subscription the browser has dropped, is not brought back.
//!
//! Appending lines is crash-safe enough: a line cut short by a crash has no
//! newline and is ignored (and cut off at the next run), and what it named is found in the store again
//! (the writer checks before writing).

use herald_proto::ids::{ChannelId, Uaid};
use sha2::{Digest, Sha256};
use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The file's name inside `data_dir`.
pub const LEDGER_FILE: &str = "autopush-import.ledger";

pub struct Ledger {
    path: PathBuf,
    done: HashSet<String>,
    /// None for a dry run, which only reads.
    file: Option<std::fs::File>,
    unwritten: String,
}

impl Ledger {
    pub fn open(path: &Path, writable: bool) -> std::io::Result<Ledger> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(e),
        };
        let file = if writable {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)?;
            lock(&f, path)?;
            if !text.ends_with('\n') {
                // Drop the line a crash cut short, so the next one starts
                // clean (ending it with a newline would make it count).
                f.set_len(text.rfind('\n').map_or(0, |i| i as u64 + 1))?;
            }
            Some(f)
        } else {
            None
        };
        Ok(Ledger {
            path: path.to_path_buf(),
            done: parse(&text),
            file,
            unwritten: String::new(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn contains(&self, key: &str) -> bool {
        self.done.contains(key)
    }

    /// Notes a key as written; it reaches the file at the next `flush`.
    pub fn record(&mut self, key: String) {
        self.unwritten.push_str(&key);
        self.unwritten.push('\n');
        self.done.insert(key);
    }

    /// Appends what was recorded (one write per user agent).
    pub fn flush(&mut self) -> std::io::Result<()> {
        if let Some(f) = &mut self.file {
            f.write_all(self.unwritten.as_bytes())?;
        }
        self.unwritten.clear();
        Ok(())
    }

    pub fn sync(&mut self) -> std::io::Result<()> {
        self.flush()?;
        match &self.file {
            Some(f) => f.sync_data(),
            None => Ok(()),
        }
    }
}

/// One import at a time per ledger; released when the process ends.
fn lock(f: &std::fs::File, path: &Path) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: flock on a descriptor this function's caller keeps open.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(std::io::Error::other(format!(
            "{} is locked: another import into this data_dir is running",
            path.display()
        )));
    }
    Ok(())
}

/// Complete lines only: a last line without newline was cut by a crash.
fn parse(text: &str) -> HashSet<String> {
    let complete = match text.rfind('\n') {
        Some(i) => &text[..i],
        None => "",
    };
    complete
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect()
}

pub fn user_key(uaid: &Uaid) -> String {
    format!("u {uaid}")
}

pub fn channel_key(uaid: &Uaid, channel: &ChannelId) -> String {
    format!("c {uaid} {}", channel.simple())
}

/// Upstream message ids are long Fernet tokens; a digest keeps lines short.
pub fn message_key(uaid: &Uaid, upstream_id: &str) -> String {
    let digest = Sha256::digest(upstream_id.as_bytes());
    let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("m {uaid} {hex}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_what_was_flushed_and_ignores_a_cut_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(LEDGER_FILE);
        let u = Uaid([7; 16]);
        let mut l = Ledger::open(&path, true).unwrap();
        l.record(user_key(&u));
        l.record(message_key(&u, "gAAAAAB-one"));
        l.flush().unwrap();
        l.record(message_key(&u, "never flushed"));
        drop(l);
        // A crash in the middle of a line.
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        f.write_all(b"m cut-sh").unwrap();
        drop(f);

        let mut l = Ledger::open(&path, true).unwrap();
        assert!(l.contains(&user_key(&u)));
        assert!(l.contains(&message_key(&u, "gAAAAAB-one")));
        assert!(!l.contains(&message_key(&u, "never flushed")));
        assert!(!l.contains("m cut-sh"));
        l.record(channel_key(&u, &ChannelId::nil()));
        l.sync().unwrap();
        let l = Ledger::open(&path, false).unwrap();
        assert!(l.contains(&channel_key(&u, &ChannelId::nil())));
        assert!(!l.contains("m cut-sh"));
    }

    #[test]
    fn a_dry_run_ledger_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(LEDGER_FILE);
        let mut l = Ledger::open(&path, false).unwrap();
        l.record(user_key(&Uaid([1; 16])));
        l.sync().unwrap();
        assert!(!path.exists());
    }
}
