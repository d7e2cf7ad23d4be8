//! Restoring a backup into a data directory: checked first, then copied
//! (the backup stays usable), never over a store unless asked, and then
//! only after moving the old one aside.

use super::meta::{self, Meta, KEYS_FILE, STORE_DIR};
use crate::datadir;
use anyhow::{bail, Context};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A restore done.
#[derive(Debug)]
pub struct Restored {
    pub meta: Meta,
    pub files: u64,
    pub bytes: u64,
    /// What `force` moved out of the way.
    pub moved_aside: Vec<PathBuf>,
    pub took: Duration,
}

/// Copies the backup at `backup` into `data_dir`, which no Herald may hold.
/// Refuses a data directory that holds a store, or another endpoint key,
/// unless `force`, which renames them to `<name>.before-restore-<unix
/// seconds>` (nothing is deleted).
pub fn restore(backup: &Path, data_dir: &Path, force: bool) -> anyhow::Result<Restored> {
    let started = Instant::now();
    let meta = Meta::read(backup).map_err(anyhow::Error::msg)?;
    let _lock = datadir::claim(data_dir)?;
    let in_the_way = in_the_way(backup, data_dir, &meta)?;
    if !in_the_way.is_empty() && !force {
        let names: Vec<String> = in_the_way.iter().map(|p| p.display().to_string()).collect();
        bail!(
            "data_dir {} is not empty: {} would be replaced; restore into a new data_dir, or pass --force to move them aside (nothing is deleted)",
            data_dir.display(),
            names.join(" and ")
        );
    }
    let suffix = format!("before-restore-{}", crate::store::now_secs());
    let mut moved_aside = Vec::new();
    for path in in_the_way {
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        let aside = path.with_file_name(format!("{name}.{suffix}"));
        std::fs::rename(&path, &aside)
            .with_context(|| format!("moving {} aside", path.display()))?;
        moved_aside.push(aside);
    }

    let target = data_dir.join(STORE_DIR);
    let partial = data_dir.join(format!("{STORE_DIR}.restoring"));
    if partial.exists() {
        // Left by a restore that was interrupted: a partial copy, never a store.
        std::fs::remove_dir_all(&partial)
            .with_context(|| format!("removing {}", partial.display()))?;
    }
    let (files, bytes) = copy_dir(&backup.join(STORE_DIR), &partial)?;
    std::fs::rename(&partial, &target)
        .with_context(|| format!("renaming {} to {}", partial.display(), target.display()))?;
    if meta.endpoint_keys {
        let keys = std::fs::read(backup.join(KEYS_FILE))
            .with_context(|| format!("reading {}", backup.join(KEYS_FILE).display()))?;
        meta::write_durably(&data_dir.join(KEYS_FILE), &keys, true)
            .with_context(|| format!("writing {}", data_dir.join(KEYS_FILE).display()))?;
    }
    meta::sync_dir(data_dir).with_context(|| format!("syncing {}", data_dir.display()))?;
    Ok(Restored {
        meta,
        files,
        bytes,
        moved_aside,
        took: started.elapsed(),
    })
}

/// What the restore would replace: a store (a non-empty `db`), and an
/// endpoint key other than the backup's.
fn in_the_way(backup: &Path, data_dir: &Path, meta: &Meta) -> anyhow::Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    let db = data_dir.join(STORE_DIR);
    if db.is_dir() && std::fs::read_dir(&db)?.next().is_none() {
        std::fs::remove_dir(&db).with_context(|| format!("removing the empty {}", db.display()))?;
    } else if db.symlink_metadata().is_ok() {
        found.push(db);
    }
    let keys = data_dir.join(KEYS_FILE);
    if meta.endpoint_keys && keys.exists() {
        let theirs = std::fs::read(backup.join(KEYS_FILE))?;
        let ours = std::fs::read(&keys).with_context(|| format!("reading {}", keys.display()))?;
        if ours != theirs {
            found.push(keys);
        }
    }
    Ok(found)
}

/// Copies the files of `from` into the new directory `to`, each fsynced:
/// (files, bytes).
fn copy_dir(from: &Path, to: &Path) -> anyhow::Result<(u64, u64)> {
    std::fs::create_dir(to).with_context(|| format!("creating {}", to.display()))?;
    let (mut files, mut bytes) = (0, 0);
    for entry in std::fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let entry = entry?;
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        if entry.file_type()?.is_dir() {
            let (f, b) = copy_dir(&src, &dst)?;
            files += f;
            bytes += b;
            continue;
        }
        bytes += std::fs::copy(&src, &dst)
            .with_context(|| format!("copying {} to {}", src.display(), dst.display()))?;
        std::fs::File::open(&dst)
            .and_then(|f| f.sync_all())
            .with_context(|| format!("syncing {}", dst.display()))?;
        files += 1;
    }
    meta::sync_dir(to).with_context(|| format!("syncing {}", to.display()))?;
    Ok((files, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{RocksStore, Store, UserRecord};
    use herald_proto::ids::Uaid;

    #[tokio::test]
    async fn a_restore_copies_refuses_a_store_and_moves_it_aside_when_forced() {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        std::fs::create_dir(&data).unwrap();
        std::fs::write(data.join(KEYS_FILE), "key\n").unwrap();
        let uaid = Uaid([7; 16]);
        let user = UserRecord {
            created: 1,
            last_seen: 2,
            router: None,
        };
        let backup = tmp.path().join("backup");
        {
            let store = RocksStore::open(&data.join(STORE_DIR), false, None).unwrap();
            store.put_user(&uaid, &user).await.unwrap();
            super::super::take(&store, &data, &backup).await.unwrap();
        }

        let fresh = tmp.path().join("fresh");
        let done = restore(&backup, &fresh, false).unwrap();
        assert!(done.files > 0 && done.moved_aside.is_empty());
        let store = RocksStore::open(&fresh.join(STORE_DIR), false, None).unwrap();
        assert_eq!(store.get_user(&uaid).await.unwrap(), Some(user));
        drop(store);
        assert_eq!(std::fs::read(fresh.join(KEYS_FILE)).unwrap(), b"key\n");

        let err = restore(&backup, &fresh, false).unwrap_err().to_string();
        assert!(
            err.contains("is not empty") && err.contains("--force"),
            "{err}"
        );
        let done = restore(&backup, &fresh, true).unwrap();
        assert_eq!(done.moved_aside.len(), 1, "the same key stays");
        assert!(done.moved_aside[0].join("CURRENT").is_file());
        assert!(Meta::read(&backup).is_ok(), "the backup stays usable");

        let held = datadir::claim(&fresh).unwrap();
        let err = restore(&backup, &fresh, true).unwrap_err().to_string();
        assert!(err.contains("already in use by another herald"), "{err}");
        drop(held);
        let err = restore(&data, &fresh, true).unwrap_err().to_string();
        assert!(err.contains("is not a Herald backup"), "{err}");
    }
}
