//! What a backup directory holds, and its description file.

use serde::{Deserialize, Serialize};
use std::path::Path;

/// The description, written last: its presence marks a complete backup.
pub const META_FILE: &str = "herald-backup.json";
/// The store's copy, named as in a data directory (`<data_dir>/db`).
pub const STORE_DIR: &str = "db";
/// The generated endpoint key, named as in a data directory.
pub const KEYS_FILE: &str = "endpoint-keys";
/// The layout this Herald writes and reads.
pub const FORMAT: u32 = 1;

/// `herald-backup.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    /// The layout (`FORMAT`).
    pub format: u32,
    /// The Herald that took it.
    pub herald_version: String,
    /// Unix seconds when the checkpoint was taken.
    pub created: u64,
    /// The store engine (`rocksdb`).
    pub engine: String,
    /// Whether `endpoint-keys` is in the backup (it is when the node
    /// generated its key rather than reading `endpoint_keys`).
    pub endpoint_keys: bool,
}

impl Meta {
    /// Reads and checks the description of the backup at `dir`: one this
    /// Herald can restore, complete.
    pub fn read(dir: &Path) -> Result<Meta, String> {
        if !dir.is_dir() {
            return Err(format!("{}: no such directory", dir.display()));
        }
        let path = dir.join(META_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(format!(
                    "{} is not a Herald backup: it has no {META_FILE} (a backup still being taken, or one that failed, has none)",
                    dir.display()
                ))
            }
            Err(e) => return Err(format!("{}: {e}", path.display())),
        };
        let meta: Meta = serde_json::from_str(&text)
            .map_err(|e| format!("{}: not a backup description: {e}", path.display()))?;
        if meta.format != FORMAT {
            return Err(format!(
                "{}: backup format {} (Herald {}); this Herald reads format {FORMAT}",
                path.display(),
                meta.format,
                meta.herald_version
            ));
        }
        if meta.engine != "rocksdb" {
            return Err(format!(
                "{}: a backup of a {} store; only rocksdb backups are restored",
                path.display(),
                meta.engine
            ));
        }
        if !dir.join(STORE_DIR).join("CURRENT").is_file() {
            return Err(format!(
                "{}: incomplete backup, {STORE_DIR}/CURRENT is missing",
                dir.display()
            ));
        }
        if meta.endpoint_keys && !dir.join(KEYS_FILE).is_file() {
            return Err(format!(
                "{}: incomplete backup, {KEYS_FILE} is missing",
                dir.display()
            ));
        }
        Ok(meta)
    }
}

/// How many files, and bytes, are under `dir` (a file hard-linked from
/// the live store counts in full).
pub fn tally(dir: &Path) -> std::io::Result<(u64, u64)> {
    let (mut files, mut bytes) = (0, 0);
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        if kind.is_dir() {
            let (f, b) = tally(&entry.path())?;
            files += f;
            bytes += b;
        } else {
            files += 1;
            bytes += entry.metadata()?.len();
        }
    }
    Ok((files, bytes))
}

/// Writes `bytes` to `path` through a temporary file, fsynced, then
/// renamed into place, with mode 0600 when `private`.
pub fn write_durably(path: &Path, bytes: &[u8], private: bool) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    if private {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

/// fsyncs a directory, so the names made in it survive a crash.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> Meta {
        Meta {
            format: FORMAT,
            herald_version: "0.1.0".into(),
            created: 1_767_780_000,
            engine: "rocksdb".into(),
            endpoint_keys: true,
        }
    }

    #[test]
    fn only_a_complete_backup_of_this_format_is_accepted() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let err = Meta::read(&dir.join("none")).unwrap_err();
        assert!(err.contains("no such directory"), "{err}");
        let err = Meta::read(dir).unwrap_err();
        assert!(err.contains("is not a Herald backup"), "{err}");

        let write = |m: &Meta| {
            std::fs::write(dir.join(META_FILE), serde_json::to_string(m).unwrap()).unwrap()
        };
        write(&meta());
        let err = Meta::read(dir).unwrap_err();
        assert!(err.contains("db/CURRENT is missing"), "{err}");
        std::fs::create_dir(dir.join(STORE_DIR)).unwrap();
        std::fs::write(dir.join(STORE_DIR).join("CURRENT"), "MANIFEST-000001\n").unwrap();
        let err = Meta::read(dir).unwrap_err();
        assert!(err.contains("endpoint-keys is missing"), "{err}");
        std::fs::write(dir.join(KEYS_FILE), "k\n").unwrap();
        assert_eq!(Meta::read(dir).unwrap(), meta());

        write(&Meta {
            format: FORMAT + 1,
            ..meta()
        });
        let err = Meta::read(dir).unwrap_err();
        assert!(err.contains("this Herald reads format 1"), "{err}");
        write(&Meta {
            engine: "redis".into(),
            ..meta()
        });
        let err = Meta::read(dir).unwrap_err();
        assert!(err.contains("only rocksdb backups"), "{err}");
        std::fs::write(dir.join(META_FILE), "{").unwrap();
        let err = Meta::read(dir).unwrap_err();
        assert!(err.contains("not a backup description"), "{err}");
        assert_eq!(tally(dir).unwrap(), (3, 1 + 16 + 2));
    }
}
