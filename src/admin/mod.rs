//! The admin API (`/v1/admin/…`, `herald admin`) and the state it keeps on
//! each node: blocked senders (`blocks`) and the busiest senders of the
//! last minutes (`top`). `lookup` describes one user agent; `api` routes
//! and authorises; `cli` is the command line.

pub mod api;
pub mod blocks;
pub mod cli;
pub mod lookup;
pub mod top;

pub use blocks::Blocks;
pub use top::TopSenders;
