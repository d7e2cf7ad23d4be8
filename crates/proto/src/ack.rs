//! Ack codes: what a user agent says about a notification in `ack` and
//! `nack` (proto-docs/websocket.md, "ack and nack").

use serde::{Deserialize, Serialize};

/// The `code` of an ack update or a nack, as sent: any JSON integer a
/// client puts there is kept, so an unknown or out-of-range code still
/// settles the message and is reported as it was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct AckCode(pub i64);

impl AckCode {
    /// Firefox acks a notification its service worker handled with 100.
    pub const DELIVERED: AckCode = AckCode(100);
    /// The payload did not decrypt with the subscription's keys.
    pub const DECRYPTION_ERROR: AckCode = AckCode(101);
    /// The message could not be delivered (its handler failed, or no
    /// subscription knows its channel).
    pub const NOT_DELIVERED: AckCode = AckCode(102);

    /// The code as a receipt reports it: codes outside `u32` become 0.
    pub fn receipt_code(self) -> u32 {
        u32::try_from(self.0).unwrap_or(0)
    }
}

impl std::fmt::Display for AckCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_range_codes_report_as_zero() {
        assert_eq!(AckCode(302).receipt_code(), 302);
        assert_eq!(AckCode(-1).receipt_code(), 0);
        assert_eq!(AckCode(i64::MAX).receipt_code(), 0);
        assert_eq!(serde_json::to_string(&AckCode::DELIVERED).unwrap(), "100");
        assert_eq!(serde_json::from_str::<AckCode>("-7").unwrap(), AckCode(-7));
    }
}
