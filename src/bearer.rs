//! Bearer tokens (`Authorization: Bearer <token>`, RFC 6750): the operator
//! APIs' (`broadcast_tokens`, `admin_tokens`) and private mode's
//! (`user_agent_tokens`). Every configured token is compared, each through
//! its digest, so timing reveals neither which token matched nor how much
//! of one did.

use crate::errors::{ApiError, Errno};
use sha2::{Digest, Sha256};

/// The token of `Authorization: Bearer <token>` (scheme in any case).
pub fn token(authorization: Option<&str>) -> Option<&str> {
    let (scheme, token) = authorization?.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// Whether `given` is one of `tokens`.
pub fn one_of(tokens: &[String], given: &str) -> bool {
    let given = Sha256::digest(given.as_bytes());
    // Not `any`: it would stop at the first match.
    tokens.iter().fold(false, |found, t| {
        found | digests_equal(&Sha256::digest(t.as_bytes()), &given)
    })
}

/// Equal digests, looking at every byte whatever the first difference.
fn digests_equal(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The gate of an operator API named `api` whose tokens are the setting
/// `setting`: with none configured the API does not exist (404), so a
/// default install exposes nothing; otherwise a request without one of
/// them gets 401.
pub fn authorise_operator(
    tokens: &[String],
    headers: &http::HeaderMap,
    api: &str,
    setting: &str,
) -> Result<(), ApiError> {
    if tokens.is_empty() {
        return Err(ApiError::not_found());
    }
    let given = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    match token(given) {
        Some(t) if one_of(tokens, t) => Ok(()),
        _ => Err(ApiError::new(
            401,
            Errno::Unauthorized,
            format!("the {api} API needs Authorization: Bearer <one of {setting}>"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_read_from_authorization() {
        assert_eq!(token(Some("Bearer abc")), Some("abc"));
        assert_eq!(token(Some("bearer  abc ")), Some("abc"));
        assert_eq!(token(Some("webpush abc")), None);
        assert_eq!(token(Some("Bearer ")), None);
        assert_eq!(token(Some("Bearer")), None);
        assert_eq!(token(None), None);
    }

    #[test]
    fn exactly_the_configured_tokens_match() {
        let tokens = vec![
            "first-token-0123456789".to_string(),
            "second-token-0123456789".into(),
        ];
        assert!(one_of(&tokens, "first-token-0123456789"));
        assert!(one_of(&tokens, "second-token-0123456789"));
        for wrong in [
            "",
            "first-token-012345678",
            "first-token-01234567890",
            "FIRST-TOKEN-0123456789",
        ] {
            assert!(!one_of(&tokens, wrong), "{wrong}");
        }
        assert!(!one_of(&[], "anything"));
    }

    #[test]
    fn operator_apis_are_absent_without_tokens_and_closed_without_one() {
        let mut h = http::HeaderMap::new();
        let none: Vec<String> = Vec::new();
        assert_eq!(
            authorise_operator(&none, &h, "admin", "admin_tokens")
                .unwrap_err()
                .status,
            404
        );
        let tokens = vec!["admin-token-0123456789".to_string()];
        let e = authorise_operator(&tokens, &h, "admin", "admin_tokens").unwrap_err();
        assert_eq!(e.status, 401);
        h.insert(
            http::header::AUTHORIZATION,
            "Bearer wrong-token-000000".parse().unwrap(),
        );
        assert_eq!(
            authorise_operator(&tokens, &h, "admin", "admin_tokens")
                .unwrap_err()
                .status,
            401
        );
        h.insert(
            http::header::AUTHORIZATION,
            "Bearer admin-token-0123456789".parse().unwrap(),
        );
        assert!(authorise_operator(&tokens, &h, "admin", "admin_tokens").is_ok());
    }
}
