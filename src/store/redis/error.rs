//! Redis's errors sorted into `StoreError` by what the caller must do.

use crate::store::StoreError;
use redis::{ErrorKind, RedisError, ServerErrorKind};

/// `what` names the operation for the log ("redis put_message: …").
pub(super) fn from_redis(what: &str, e: RedisError) -> StoreError {
    let message = format!("redis {what}: {e}");
    match e.kind() {
        // A reply of a shape Herald's scripts never produce.
        ErrorKind::Parse | ErrorKind::UnexpectedReturnType => StoreError::Corrupt(message),
        // Refusals that a retry repeats: a bad URL or password, a script
        // or command error, keys of two slots in one command.
        ErrorKind::InvalidClientConfig
        | ErrorKind::AuthenticationFailed
        | ErrorKind::RESP3NotSupported
        | ErrorKind::Server(
            ServerErrorKind::ResponseError
            | ServerErrorKind::NoScript
            | ServerErrorKind::CrossSlot
            | ServerErrorKind::NoPerm
            | ServerErrorKind::ExecAbort,
        ) => StoreError::Rejected(message),
        // Connections lost, refused or timed out; a cluster failing over,
        // loading or busy; anything new: the moment's condition.
        _ => StoreError::Unavailable(message),
    }
}

/// Redis did not answer within `budget`.
pub(super) fn timed_out(what: &str, budget: std::time::Duration) -> StoreError {
    StoreError::Unavailable(format!("redis {what}: no answer within {budget:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind_of(e: RedisError) -> &'static str {
        from_redis("op", e).kind()
    }

    #[test]
    fn lost_connections_and_failovers_are_unavailable() {
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert_eq!(kind_of(refused.into()), "unavailable");
        let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        assert_eq!(kind_of(reset.into()), "unavailable");
        for server in [
            ServerErrorKind::ClusterDown,
            ServerErrorKind::MasterDown,
            ServerErrorKind::TryAgain,
            ServerErrorKind::BusyLoading,
            ServerErrorKind::ReadOnly,
        ] {
            let e = RedisError::from((ErrorKind::Server(server), "down"));
            assert_eq!(kind_of(e), "unavailable", "{server:?}");
        }
    }

    #[test]
    fn refusals_and_odd_replies_are_told_apart() {
        let e = RedisError::from((ErrorKind::InvalidClientConfig, "bad URL"));
        assert_eq!(kind_of(e), "rejected");
        let e = RedisError::from((ErrorKind::Server(ServerErrorKind::CrossSlot), "slots"));
        assert_eq!(kind_of(e), "rejected");
        let e = RedisError::from((ErrorKind::UnexpectedReturnType, "not an integer"));
        assert_eq!(kind_of(e), "corrupt");
    }

    #[test]
    fn the_message_names_the_operation() {
        let e = from_redis("get_user", RedisError::from((ErrorKind::Io, "gone")));
        assert!(e.detail().starts_with("redis get_user: "), "{e}");
    }
}
