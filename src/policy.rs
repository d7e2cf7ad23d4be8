//! Who may subscribe (README "Who may subscribe"): the decisions behind
//! `require_vapid_key` and private mode (`user_agent_tokens`), as pure
//! functions of the settings and what a client sent, shared by the
//! websocket session and the registration API. Counting and answering are
//! the callers' job.

use crate::config::Settings;

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
/// registration API, register). Compared as crate::bearer compares tokens:
/// timing reveals neither which token nor how much of one matched.
pub fn admit_user_agent(settings: &Settings, given: Option<&str>) -> Result<(), Refusal> {
    let tokens = &settings.user_agent_tokens;
    if tokens.is_empty() {
        return Ok(());
    }
    match given {
        Some(g) if crate::bearer::one_of(tokens, g) => Ok(()),
        _ => Err(Refusal::UserAgentToken),
    }
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
}
