//! Quotas per receiver and per sender. SEAM: filled in by issue 24.

use crate::admission::Sender;
use crate::config::Settings;
use crate::errors::ApiError;
use herald_proto::ids::{ChannelId, Uaid};

pub struct Quotas {}

impl Quotas {
    pub fn new(_settings: &Settings) -> Self {
        Quotas {}
    }

    pub async fn admit_sender(&self, _sender: &Sender<'_>) -> Result<(), ApiError> {
        Ok(())
    }

    pub async fn admit_receiver(&self, _uaid: &Uaid, _channel: &ChannelId) -> Result<(), ApiError> {
        Ok(())
    }
}
