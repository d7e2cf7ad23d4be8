//! Who may subscribe (README "Who may subscribe"): the decisions behind
//! `require_vapid_key` and private mode (`user_agent_tokens`), as pure
//! functions of the settings and what a client sent, shared by the
//! websocket session and the registration API. Counting and answering are
//! the callers' job.

use crate::config::Settings;
use sha2::{Digest, Sha256};

/// Why a client was refused; the `reason` label of
/// `herald_policy_refusals_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// A new subscription without an application server key under
    /// `require_vapid_key`.
    VapidRequired,
    /// A user agent without a valid token under `user_agent_tokens`.
    UserAgentToken,
}

impl Refusal {
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::VapidRequired => "vapid_required",
            Refusal::UserAgentToken => "user_agent_token",
        }
    }
}

/// Whether a new subscription with (`has_key`) or without an application
/// server key may be made.
pub fn admit_subscription(settings: &Settings, has_key: bool) -> Result<(), Refusal> {
    if settings.require_vapid_key && !has_key {
        Err(Refusal::VapidRequired)
    } else {
        Ok(())
    }
}

/// Whether a user agent presenting `given` may connect (or, on the
/// registration API, register). Every configured token is compared, each
/// in constant time, so timing reveals neither which token nor how much of
/// one matched.
pub fn admit_user_agent(settings: &Settings, given: Option<&str>) -> Result<(), Refusal> {
    let tokens = &settings.user_agent_tokens;
    if tokens.is_empty() {
        return Ok(());
    }
    let Some(given) = given else {
        return Err(Refusal::UserAgentToken);
    };
    let given = Sha256::digest(given.as_bytes());
    // Not `any`: it would stop at the first match.
    let matched = tokens.iter().fold(false, |found, t| {
        found | digests_equal(&Sha256::digest(t.as_bytes()), &given)
    });
    if matched {
        Ok(())
    } else {
        Err(Refusal::UserAgentToken)
    }
}

/// Equal digests, looking at every byte whatever the first difference.
fn digests_equal(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The token of `Authorization: Bearer <token>` (scheme in any case).
pub fn bearer(authorization: Option<&str>) -> Option<&str> {
    let (scheme, token) = authorization?.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(env: &[(&str, &str)]) -> Settings {
        let env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Settings::load(&crate::config::ServeArgs::default(), &env).unwrap()
    }

    const T1: &str = "first-ua-token-0123456789";
    const T2: &str = "second-ua-token-0123456789";

    #[test]
    fn subscriptions_need_a_key_only_when_required() {
        let open = settings(&[]);
        assert_eq!(admit_subscription(&open, false), Ok(()));
        let strict = settings(&[("HERALD_REQUIRE_VAPID_KEY", "true")]);
        assert_eq!(
            admit_subscription(&strict, false),
            Err(Refusal::VapidRequired)
        );
        assert_eq!(admit_subscription(&strict, true), Ok(()));
    }

    #[test]
    fn private_mode_admits_exactly_the_configured_tokens() {
        let open = settings(&[]);
        assert_eq!(admit_user_agent(&open, None), Ok(()));
        assert_eq!(admit_user_agent(&open, Some("anything")), Ok(()));
        let private = settings(&[("HERALD_USER_AGENT_TOKENS", &format!("{T1},{T2}"))]);
        assert_eq!(admit_user_agent(&private, Some(T1)), Ok(()));
        assert_eq!(admit_user_agent(&private, Some(T2)), Ok(()));
        for wrong in [
            None,
            Some(""),
            Some("first-ua-token-012345678"),
            Some("first-ua-token-01234567890"),
            Some("FIRST-UA-TOKEN-0123456789"),
        ] {
            assert_eq!(
                admit_user_agent(&private, wrong),
                Err(Refusal::UserAgentToken),
                "{wrong:?}"
            );
        }
    }

    #[test]
    fn bearer_tokens_are_read_from_authorization() {
        assert_eq!(bearer(Some("Bearer abc")), Some("abc"));
        assert_eq!(bearer(Some("bearer  abc ")), Some("abc"));
        assert_eq!(bearer(Some("webpush abc")), None);
        assert_eq!(bearer(Some("Bearer ")), None);
        assert_eq!(bearer(Some("Bearer")), None);
        assert_eq!(bearer(None), None);
    }
}
