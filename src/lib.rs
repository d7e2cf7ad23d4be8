//! Herald, a Web Push service.
//!
//! User agents hold a websocket (`connect`, driving the pure `session` state
//! machine over herald-proto's `protocol` messages); application servers POST to endpoint URLs
//! (`endpoint`, checked by `vapid` and `webpush` header parsing). Messages are
//! kept in a `store` and handed to live connections by the `router`.

pub mod aesgcm;
pub mod app;
pub mod appserver;
pub mod broadcast;
pub mod config;
pub mod connect;
pub mod datadir;
pub mod demo;
pub mod endpoint;
pub mod errors;
pub mod link;
pub mod listen;
pub mod mailbox;
pub mod metrics;
pub mod occupancy;
pub mod pending;
pub mod receipts;
pub mod reply;
pub mod router;
pub mod server;
pub mod session;
pub mod store;
pub mod tls;
pub mod token;
pub mod vapid;
pub mod webpush;
