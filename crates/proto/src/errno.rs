//! The `errno` of every error answer the application-server API gives
//! (proto-docs/errors.md explains each). Numbers shared with autopush mean
//! the same thing there, so existing client libraries recognise them.

/// One variant per errno in use; the discriminant is the number on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum Errno {
    MissingCrypto = 101,
    InvalidEndpoint = 102,
    UserGone = 103,
    TooLarge = 104,
    SubscriptionGone = 106,
    InvalidRegistration = 108,
    Unauthorized = 109,
    InvalidCrypto = 110,
    MissingTtl = 111,
    InvalidTtl = 112,
    InvalidTopic = 113,
    InvalidUrgency = 114,
    KeyMismatch = 115,
    TooManyStored = 116,
    NoMessage = 117,
    MethodNotAllowed = 118,
    NotFound = 119,
    InvalidBroadcast = 120,
    InvalidReceiptSubscription = 121,
    ReceiptKeyMismatch = 122,
    InvalidReceiptId = 123,
    TooManyReceiptStreams = 124,
    ReceiverRateLimited = 125,
    SenderRateLimited = 126,
    SenderBlocked = 127,
    VapidRequired = 128,
    InvalidMatrixNotification = 129,
    NodeForged = 130,
    NodeClockSkew = 131,
    NodeReplay = 132,
    NodeReplayWindowFull = 133,
    InvalidAdminRequest = 134,
    BackupRefused = 135,
    StorageUnavailable = 201,
    UnreadableBody = 999,
}

impl Errno {
    pub const ALL: [Errno; 35] = [
        Errno::MissingCrypto,
        Errno::InvalidEndpoint,
        Errno::UserGone,
        Errno::TooLarge,
        Errno::SubscriptionGone,
        Errno::InvalidRegistration,
        Errno::Unauthorized,
        Errno::InvalidCrypto,
        Errno::MissingTtl,
        Errno::InvalidTtl,
        Errno::InvalidTopic,
        Errno::InvalidUrgency,
        Errno::KeyMismatch,
        Errno::TooManyStored,
        Errno::NoMessage,
        Errno::MethodNotAllowed,
        Errno::NotFound,
        Errno::InvalidBroadcast,
        Errno::InvalidReceiptSubscription,
        Errno::ReceiptKeyMismatch,
        Errno::InvalidReceiptId,
        Errno::TooManyReceiptStreams,
        Errno::ReceiverRateLimited,
        Errno::SenderRateLimited,
        Errno::SenderBlocked,
        Errno::VapidRequired,
        Errno::InvalidMatrixNotification,
        Errno::NodeForged,
        Errno::NodeClockSkew,
        Errno::NodeReplay,
        Errno::NodeReplayWindowFull,
        Errno::InvalidAdminRequest,
        Errno::BackupRefused,
        Errno::StorageUnavailable,
        Errno::UnreadableBody,
    ];

    /// The number in the error body's `errno` field.
    pub fn code(self) -> u16 {
        self as u16
    }

    pub fn from_code(code: u16) -> Option<Errno> {
        Self::ALL.into_iter().find(|e| e.code() == code)
    }
}

impl std::fmt::Display for Errno {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.code())
    }
}

impl serde::Serialize for Errno {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u16(self.code())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ERRORS_MD: &str = include_str!("../../../proto-docs/errors.md");

    /// The errno column of proto-docs/errors.md's table.
    fn documented() -> Vec<u16> {
        ERRORS_MD
            .lines()
            .filter_map(|l| l.strip_prefix('|'))
            .filter_map(|l| l.split('|').next())
            .filter_map(|cell| cell.trim().parse().ok())
            .collect()
    }

    #[test]
    fn every_errno_is_documented_and_every_documented_one_exists() {
        let documented = documented();
        for e in Errno::ALL {
            assert!(
                documented.contains(&e.code()),
                "errno {e} ({e:?}) is missing from proto-docs/errors.md"
            );
        }
        for code in &documented {
            assert!(
                Errno::from_code(*code).is_some(),
                "proto-docs/errors.md lists errno {code}, which no Errno variant has"
            );
        }
    }

    #[test]
    fn all_lists_each_variant_once() {
        let mut codes: Vec<u16> = Errno::ALL.iter().map(|e| e.code()).collect();
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), Errno::ALL.len());
        assert_eq!(serde_json::to_string(&Errno::NotFound).unwrap(), "119");
    }
}
