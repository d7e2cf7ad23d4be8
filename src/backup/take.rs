//! Taking a backup: a checkpoint of the store, the generated endpoint key,
//! then the description.

use super::meta::{self, Meta, FORMAT, KEYS_FILE, META_FILE, STORE_DIR};
use crate::store::{now_secs, CheckpointError, Store};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Why no backup was made.
#[derive(Debug)]
pub enum TakeError {
    /// The request itself is wrong (a relative path).
    Invalid(String),
    /// This store has no backup through Herald, or the directory exists.
    Refused(String),
    /// Copying failed (an unwritable or full target); nothing was left
    /// behind.
    Failed(String),
}

impl std::fmt::Display for TakeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TakeError::Invalid(m) | TakeError::Refused(m) | TakeError::Failed(m) => f.write_str(m),
        }
    }
}
impl std::error::Error for TakeError {}

/// A backup made.
#[derive(Debug)]
pub struct Taken {
    pub dir: PathBuf,
    pub meta: Meta,
    pub files: u64,
    pub bytes: u64,
    pub took: Duration,
}

impl Taken {
    /// The admin API's answer.
    pub fn to_json(&self) -> Value {
        json!({
            "dir": self.dir.display().to_string(),
            "engine": self.meta.engine,
            "created": self.meta.created,
            "herald_version": self.meta.herald_version,
            "endpoint_keys": self.meta.endpoint_keys,
            "files": self.files,
            "bytes": self.bytes,
            "took_ms": self.took.as_millis() as u64,
        })
    }
}

/// Backs `store` (and the endpoint key `data_dir` holds, if any) up into
/// `dir`, an absolute path that must not exist; its parents are made. On
/// failure `dir` is removed again, as this call made it.
pub async fn take(store: &dyn Store, data_dir: &Path, dir: &Path) -> Result<Taken, TakeError> {
    let started = Instant::now();
    if inside(dir, &data_dir.join(STORE_DIR)) {
        return Err(TakeError::Invalid(format!(
            "{}: inside the store's own directory; put the backup elsewhere",
            dir.display()
        )));
    }
    make_dir(dir)?;
    match fill(store, data_dir, dir).await {
        Ok(meta) => {
            let (files, bytes) = meta::tally(dir)
                .map_err(|e| TakeError::Failed(format!("{}: {e}", dir.display())))?;
            Ok(Taken {
                dir: dir.to_path_buf(),
                meta,
                files,
                bytes,
                took: started.elapsed(),
            })
        }
        Err(e) => {
            if let Err(rm) = std::fs::remove_dir_all(dir) {
                tracing::warn!("removing the failed backup {}: {rm}", dir.display());
            }
            Err(e)
        }
    }
}

/// Whether `path` (which may not exist yet) lies inside `dir`: the part
/// that exists with its symbolic links resolved, the rest as written (`..`
/// undoing the name before it, as `create_dir_all` would).
fn inside(path: &Path, dir: &Path) -> bool {
    use std::path::Component;
    let Ok(dir) = dir.canonicalize() else {
        return false;
    };
    let mut resolved = PathBuf::new();
    let mut exists = true;
    for part in path.components() {
        match part {
            Component::CurDir => {}
            Component::ParentDir if !exists => {
                resolved.pop();
            }
            _ => {
                resolved.push(part);
                if exists {
                    match resolved.canonicalize() {
                        Ok(real) => resolved = real,
                        Err(_) => exists = false,
                    }
                }
            }
        }
    }
    resolved.starts_with(&dir)
}

/// Creates `dir` itself (its parents as needed); refuses one that exists.
fn make_dir(dir: &Path) -> Result<(), TakeError> {
    if !dir.is_absolute() {
        return Err(TakeError::Invalid(format!(
            "{}: the backup directory must be an absolute path",
            dir.display()
        )));
    }
    if let Some(parent) = dir.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| TakeError::Failed(format!("creating {}: {e}", parent.display())))?;
    }
    std::fs::create_dir(dir).map_err(|e| match e.kind() {
        std::io::ErrorKind::AlreadyExists => TakeError::Refused(format!(
            "{} already exists; a backup goes into a new directory",
            dir.display()
        )),
        _ => TakeError::Failed(format!("creating {}: {e}", dir.display())),
    })
}

async fn fill(store: &dyn Store, data_dir: &Path, dir: &Path) -> Result<Meta, TakeError> {
    let engine = store
        .checkpoint(&dir.join(STORE_DIR))
        .await
        .map_err(|e| match e {
            CheckpointError::Unsupported(why) => TakeError::Refused(why.to_string()),
            CheckpointError::Exists(p) => {
                TakeError::Refused(format!("{} already exists", p.display()))
            }
            CheckpointError::Store(e) => TakeError::Failed(format!("checkpoint failed: {e}")),
        })?;
    let failed =
        |what: &Path, e: std::io::Error| TakeError::Failed(format!("{}: {e}", what.display()));
    let keys = data_dir.join(KEYS_FILE);
    let endpoint_keys = match std::fs::read(&keys) {
        Ok(bytes) => {
            meta::write_durably(&dir.join(KEYS_FILE), &bytes, true)
                .map_err(|e| failed(&dir.join(KEYS_FILE), e))?;
            true
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => return Err(failed(&keys, e)),
    };
    let meta = Meta {
        format: FORMAT,
        herald_version: env!("CARGO_PKG_VERSION").to_string(),
        created: now_secs(),
        engine: engine.to_string(),
        endpoint_keys,
    };
    let text = serde_json::to_string_pretty(&meta).expect("a Meta serialises");
    meta::write_durably(&dir.join(META_FILE), text.as_bytes(), false)
        .map_err(|e| failed(&dir.join(META_FILE), e))?;
    Ok(meta)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{MemStore, RocksStore};

    #[tokio::test]
    async fn a_backup_is_refused_for_an_existing_dir_a_relative_one_and_the_memory_store() {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        std::fs::create_dir(&data).unwrap();
        std::fs::write(data.join(KEYS_FILE), "key\n").unwrap();
        let store = RocksStore::open(&data.join("db"), false, None).unwrap();

        let err = take(&store, &data, Path::new("rel/dir")).await.unwrap_err();
        assert!(matches!(err, TakeError::Invalid(_)), "{err}");
        let within = data.join("x/../db/backup");
        let err = take(&store, &data, &within).await.unwrap_err();
        assert!(err.to_string().contains("inside the store"), "{err}");
        assert!(!data.join("db/backup").exists());

        let dir = tmp.path().join("backups/one");
        let taken = take(&store, &data, &dir).await.unwrap();
        assert_eq!(Meta::read(&dir).unwrap(), taken.meta);
        assert!(taken.meta.endpoint_keys);
        assert_eq!(std::fs::read(dir.join(KEYS_FILE)).unwrap(), b"key\n");

        let err = take(&store, &data, &dir).await.unwrap_err();
        assert!(matches!(err, TakeError::Refused(_)), "{err}");
        assert!(
            Meta::read(&dir).is_ok(),
            "the existing backup is left alone"
        );

        let mem = MemStore::new();
        let other = tmp.path().join("backups/two");
        let err = take(&mem, &data, &other).await.unwrap_err();
        assert!(matches!(err, TakeError::Refused(_)), "{err}");
        assert!(!other.exists(), "a refused backup leaves no directory");
    }
}
