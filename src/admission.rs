//! Whether a push may go ahead now, decided before its body is read: the
//! operator's blocks, the sender's quota and the receiver's quota. The
//! endpoint and the Matrix push gateway both ask here, so a new way in
//! cannot skip a limit.

use crate::app::App;
use crate::errors::ApiError;
use crate::token::EndpointToken;
use crate::token::KeyHash;
use std::net::IpAddr;

/// Who is pushing.
#[derive(Debug, Clone, Copy)]
pub struct Sender<'a> {
    /// The client's address: the TCP peer, or what a trusted proxy said.
    pub client: IpAddr,
    /// The VAPID key it signed with, if it did.
    pub key: Option<&'a KeyHash>,
    /// The `sub` of its VAPID claims, if it gave one.
    pub sub: Option<&'a str>,
}

/// Refuses a blocked sender (403) or one over its quota (429), and counts
/// the rest for the admin API's top senders.
pub async fn admit_sender(app: &App, sender: &Sender<'_>) -> Result<(), ApiError> {
    app.blocks.check(&app.metrics, sender)?;
    app.quotas.admit_sender(sender).await?;
    app.top_senders.record(sender);
    Ok(())
}

/// Refuses a push to a subscription or user agent over its quota (429).
pub async fn admit_receiver(app: &App, target: &EndpointToken) -> Result<(), ApiError> {
    app.quotas
        .admit_receiver(&target.uaid, &target.channel)
        .await
}
