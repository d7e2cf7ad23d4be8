//! Herald, a Web Push service: the server and the `herald` binary.
//!
//! User agents hold a websocket (`connect`, driving the pure `session` state
//! machine over herald-proto's `protocol` messages); application servers
//! POST to endpoint URLs (`endpoint`, checked by `vapid` and `webpush`
//! header parsing). Messages are kept in a `store` (RocksDB, Redis, or in
//! memory for tests), their rules (accept, deliver, ack, cancel, expire,
//! drop) settled by the `mailbox`, and handed to live connections, here or
//! on another node, by the `router`.
//!
//! Owns: serving, storage, routing, receipts, broadcasts, settings, metrics
//! and the commands (`serve`, `send`, `listen`, `broadcast`, `demo`,
//! `vapid`). Wire formats, ids, crypto and errnos come from herald-proto;
//! HTTP clients and the push client from herald-client. Must not know: how
//! a client crate or the load generator is built; nothing outside this
//! crate depends on it but its tests and the fuzz targets.

pub mod admin;
pub mod admission;
pub mod aesgcm;
pub mod app;
pub mod appserver;
pub mod autopush_token;
pub mod backup;
pub mod bearer;
pub mod bridge;
pub mod broadcast;
pub mod cidr;
pub mod config;
pub mod connect;
pub mod datadir;
pub mod demo;
pub mod endpoint;
pub mod errors;
pub mod forwarded;
pub mod import;
pub mod link;
pub mod listen;
pub mod mailbox;
pub mod matrix;
pub mod metrics;
pub mod occupancy;
pub mod peer;
pub mod pending;
pub mod policy;
pub mod query;
pub mod quota;
pub mod receipts;
pub mod registration;
pub mod reply;
pub mod router;
pub mod server;
pub mod session;
pub mod starting;
pub mod store;
pub mod subscription;
pub mod tls;
pub mod token;
pub mod vapid;
pub mod webpush;
