//! Herald's wire formats, shared by the server (`herald`), the client
//! library (`herald-client`), the load generator and the fuzz targets.
//!
//! Owns: the push websocket messages in both directions (`protocol`), the
//! ids that cross that wire (`ids`), RFC 8030 `Urgency`, a push's
//! encryption headers (`headers`), RFC 8291/8188 payload encryption
//! (`crypto`), the subscription JSON an application server receives
//! (`subscription`), ack codes (`ack`), the application-server API's
//! errnos (`errno`) and base64url (`b64`).
//!
//! Must not know: sockets, runtimes, HTTP servers or clients, storage,
//! metrics or command lines. Everything here is pure code over bytes and
//! strings, unit-tested in place; I/O belongs to the crates that use it.

pub mod ack;
pub mod b64;
pub mod crypto;
pub mod errno;
pub mod headers;
pub mod ids;
pub mod protocol;
pub mod subscription;
pub mod urgency;
