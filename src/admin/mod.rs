//! The admin API and its state: blocked senders and top senders. SEAM:
//! filled in by issue 24.

pub mod api;

use crate::admission::Sender;
use crate::errors::ApiError;
use crate::metrics::Metrics;

#[derive(Default)]
pub struct Blocks {}

impl Blocks {
    pub fn check(&self, _metrics: &Metrics, _sender: &Sender<'_>) -> Result<(), ApiError> {
        Ok(())
    }
}

#[derive(Default)]
pub struct TopSenders {}

impl TopSenders {
    pub fn record(&self, _sender: &Sender<'_>) {}
}
