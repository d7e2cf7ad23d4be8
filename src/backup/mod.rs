//! Backup and restore of the embedded store (proto-docs/admin.md, "Back up
//! the store"; README, "Backup and restore").
//!
//! A backup is a directory: `db/` (a checkpoint the store made while
//! serving, see `Store::checkpoint`), `endpoint-keys` when the data
//! directory held a generated one, and `herald-backup.json` (`meta`),
//! written last, so a directory without it is no backup. `take` makes one
//! (behind the admin API, or from a stopped node's data directory);
//! `restore` copies one into a data directory; `cli` is `herald backup`
//! and `herald restore`.

pub mod cli;
pub mod meta;
pub mod restore;
pub mod take;

pub use meta::Meta;
pub use take::{take, TakeError, Taken};
