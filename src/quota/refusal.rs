//! What a sender over a quota is told: 429 with `Retry-After` and an errno
//! saying whose quota it was, the receiver's (125) or its own (126).

use super::Kind;
use crate::errors::ApiError;

pub fn refusal(kind: Kind, retry_after: u64) -> ApiError {
    match kind {
        Kind::Subscription => ApiError::receiver_rate_limited(
            "this subscription has received more pushes than its quota (subscription_rate_limit)",
            retry_after,
        ),
        Kind::UserAgent => ApiError::receiver_rate_limited(
            "this subscription's user agent has received more pushes than its quota (ua_rate_limit)",
            retry_after,
        ),
        Kind::SenderKey => ApiError::sender_rate_limited(
            "this VAPID key has sent more pushes than its quota (sender_rate_limit)",
            retry_after,
        ),
        Kind::SenderAddress => ApiError::sender_rate_limited(
            "pushes without VAPID from this address exceed their quota (anonymous_rate_limit); sign with VAPID for a quota of your own",
            retry_after,
        ),
    }
}
