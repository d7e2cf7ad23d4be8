//! RocksDB's errors sorted into `StoreError` by what the caller must do.
//! The `rocksdb` crate reports a status as text ("IO error: No space left
//! on device"); its `kind()` reads the code from that text, so this is the
//! one place that depends on it.

use crate::store::StoreError;
use rocksdb::ErrorKind;

pub(super) fn from_rocksdb(e: rocksdb::Error) -> StoreError {
    classify(e.kind(), e.into_string())
}

fn classify(kind: ErrorKind, message: String) -> StoreError {
    match kind {
        // A full or failing disk: RocksDB stops writing with a background
        // error that only a reopen clears.
        ErrorKind::IOError => StoreError::Io(message),
        ErrorKind::Corruption => StoreError::Corrupt(message),
        // Conditions of the moment: the same call may succeed soon. An
        // unknown code lands here too, since nothing says it would not.
        ErrorKind::Busy
        | ErrorKind::TryAgain
        | ErrorKind::TimedOut
        | ErrorKind::Incomplete
        | ErrorKind::Aborted
        | ErrorKind::MergeInProgress
        | ErrorKind::ShutdownInProgress
        | ErrorKind::Unknown => StoreError::Unavailable(message),
        ErrorKind::NotFound
        | ErrorKind::NotSupported
        | ErrorKind::InvalidArgument
        | ErrorKind::Expired
        | ErrorKind::CompactionTooLarge
        | ErrorKind::ColumnFamilyDropped => StoreError::Rejected(message),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_errors_are_io_whatever_their_subcode() {
        for text in [
            "IO error: No space left on device: While appending to file: db/000012.log",
            "IO error: While open a file for appending: db/LOCK: Permission denied",
        ] {
            assert_eq!(
                classify(ErrorKind::IOError, text.into()),
                StoreError::Io(text.into())
            );
        }
    }

    #[test]
    fn each_kind_has_its_variant_and_keeps_the_message() {
        let cases = [
            (ErrorKind::Corruption, "corrupt"),
            (ErrorKind::Busy, "unavailable"),
            (ErrorKind::TryAgain, "unavailable"),
            (ErrorKind::TimedOut, "unavailable"),
            (ErrorKind::ShutdownInProgress, "unavailable"),
            (ErrorKind::Unknown, "unavailable"),
            (ErrorKind::InvalidArgument, "rejected"),
            (ErrorKind::NotSupported, "rejected"),
            (ErrorKind::ColumnFamilyDropped, "rejected"),
        ];
        for (kind, expected) in cases {
            let e = classify(kind.clone(), "engine text".into());
            assert_eq!(e.kind(), expected, "{kind:?}");
            assert_eq!(e.detail(), "engine text");
        }
    }

    /// Real errors from the engine, not only the table: the kind is read
    /// from RocksDB's own text, so a change in that text shows here.
    #[test]
    fn real_rocksdb_errors_map_by_kind() {
        let dir = tempfile::tempdir().unwrap();
        // A directory where RocksDB's lock file should be: an I/O error.
        let mut opts = rocksdb::Options::default();
        opts.create_if_missing(true);
        let locked = dir.path().join("locked");
        std::fs::create_dir_all(locked.join("LOCK")).unwrap();
        let e = rocksdb::DB::open(&opts, &locked).unwrap_err();
        assert!(matches!(from_rocksdb(e.clone()), StoreError::Io(_)), "{e}");

        // A CURRENT file naming no manifest: corruption.
        let db = dir.path().join("db");
        drop(rocksdb::DB::open(&opts, &db).unwrap());
        std::fs::write(db.join("CURRENT"), b"MANIFEST-999999").unwrap();
        let e = rocksdb::DB::open(&opts, &db).unwrap_err();
        assert!(
            matches!(from_rocksdb(e.clone()), StoreError::Corrupt(_)),
            "{e}"
        );

        // Opening without creating: an invalid argument, refused for good.
        let e =
            rocksdb::DB::open(&rocksdb::Options::default(), dir.path().join("none")).unwrap_err();
        assert!(
            matches!(from_rocksdb(e.clone()), StoreError::Rejected(_)),
            "{e}"
        );
    }
}
