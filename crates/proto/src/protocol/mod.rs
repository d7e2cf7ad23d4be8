//! Mozilla's push websocket protocol (proto-docs/websocket.md), one set of
//! types for both ends: `ua` is what a user agent sends, `server` what a
//! push service sends. Each side parses the other's frames (the server
//! strictly, a client leniently) and writes its own.

pub mod server;
pub mod ua;

pub use server::{
    hello_refusal, notification_json, register_refusal, Broadcasts, Notification, ProtocolError,
    ServerMessage, PING,
};
pub use server::{CLOSE_NO_RECONNECT, HELLO_TOKEN_REFUSED, REGISTER_KEY_REQUIRED};
pub use ua::{AckUpdate, ClientMessage, ParseError};
