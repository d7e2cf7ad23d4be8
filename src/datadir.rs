//! The data directory: made if missing, and claimed by one Herald at a time.
//!
//! RocksDB refuses a second opener with "While lock file: …/LOCK: Resource
//! temporarily unavailable", and a data_dir that is a file fails with "File
//! exists (os error 17)"; neither says what to fix. Herald checks both first
//! and holds its own lock for as long as it runs, which also keeps two
//! processes from generating the endpoint key at once.

use std::fs::File;
use std::path::{Path, PathBuf};

/// Name of the lock file inside the data directory.
pub const LOCK_FILE: &str = "herald.lock";

/// Held while Herald runs; the lock goes with the process, so a crash
/// leaves nothing stale behind.
#[derive(Debug)]
pub struct DataDirLock {
    _file: File,
}

#[derive(Debug)]
pub enum DataDirError {
    NotADirectory(PathBuf),
    Create(PathBuf, std::io::Error),
    InUse(PathBuf),
    Lock(PathBuf, std::io::Error),
}

impl std::fmt::Display for DataDirError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DataDirError::NotADirectory(p) => write!(
                f,
                "data_dir {}: not a directory (a file is in the way); point data_dir at a directory, which is created if missing",
                p.display()
            ),
            DataDirError::Create(p, e) => {
                write!(f, "data_dir {}: cannot create it: {e}", p.display())
            }
            DataDirError::InUse(p) => write!(
                f,
                "data_dir {}: already in use by another herald process (lock held on {}); stop it, or give this one its own data_dir",
                p.display(),
                p.join(LOCK_FILE).display()
            ),
            DataDirError::Lock(p, e) => write!(
                f,
                "data_dir {}: cannot lock {}: {e}",
                p.display(),
                p.join(LOCK_FILE).display()
            ),
        }
    }
}

impl std::error::Error for DataDirError {}

/// Creates `dir` if missing and locks it for this process.
pub fn claim(dir: &Path) -> Result<DataDirLock, DataDirError> {
    if dir.exists() && !dir.is_dir() {
        return Err(DataDirError::NotADirectory(dir.to_path_buf()));
    }
    std::fs::create_dir_all(dir).map_err(|e| match e.kind() {
        // A file somewhere along the path.
        std::io::ErrorKind::AlreadyExists | std::io::ErrorKind::NotADirectory => {
            DataDirError::NotADirectory(dir.to_path_buf())
        }
        _ => DataDirError::Create(dir.to_path_buf(), e),
    })?;
    let path = dir.join(LOCK_FILE);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| DataDirError::Lock(dir.to_path_buf(), e))?;
    try_lock(&file).map_err(|e| match e.raw_os_error() {
        Some(libc::EWOULDBLOCK) => DataDirError::InUse(dir.to_path_buf()),
        _ => DataDirError::Lock(dir.to_path_buf(), e),
    })?;
    Ok(DataDirLock { _file: file })
}

fn try_lock(file: &File) -> std::io::Result<()> {
    use std::os::unix::io::AsRawFd;
    loop {
        // SAFETY: flock on a descriptor owned by `file`, which outlives the call.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(());
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EINTR) {
            return Err(err);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_claim_at_a_time_and_files_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a/b");
        let held = claim(&dir).unwrap();
        // flock locks belong to the open file, so a second open in this
        // process conflicts just as another process would.
        let err = claim(&dir).unwrap_err();
        assert!(matches!(err, DataDirError::InUse(_)), "{err}");
        assert!(err
            .to_string()
            .contains("already in use by another herald process"));
        drop(held);
        claim(&dir).unwrap();

        let file = tmp.path().join("file");
        std::fs::write(&file, "x").unwrap();
        let err = claim(&file).unwrap_err();
        assert!(
            err.to_string()
                .contains("not a directory (a file is in the way)"),
            "{err}"
        );
        let err = claim(&file.join("below")).unwrap_err();
        assert!(
            err.to_string()
                .contains("not a directory (a file is in the way)"),
            "{err}"
        );
    }
}
