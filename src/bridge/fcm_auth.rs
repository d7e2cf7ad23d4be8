//! OAuth2 for FCM HTTP v1: the Google service account Herald sends as, and
//! the access tokens it trades signed grants for (RFC 7523 JWT bearer
//! grant, as Google's "service account" flow describes it). One token is
//! shared by every send of the bridge and replaced a minute before it
//! runs out, or at once when FCM refuses it.

use crate::metrics::Metrics;
use anyhow::{anyhow, Context};
use bytes::Bytes;
use herald_client::http::PooledClient;
use http_body_util::{BodyExt, Full};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The one scope FCM's send API needs.
pub const SCOPE: &str = "https://www.googleapis.com/auth/firebase.messaging";

/// How long a grant asks for; Google allows at most an hour.
const GRANT_LIFETIME_SECS: u64 = 3600;

/// A token is replaced this long before Google says it expires, so a send
/// never leaves with a token that runs out on the way.
pub const REFRESH_MARGIN: Duration = Duration::from_secs(60);

/// What Herald needs from a service-account key file.
pub struct ServiceAccount {
    pub client_email: String,
    /// Where grants go; also their audience. Tests point it at a mock.
    pub token_uri: String,
    key: EncodingKey,
}

impl std::fmt::Debug for ServiceAccount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceAccount")
            .field("client_email", &self.client_email)
            .field("token_uri", &self.token_uri)
            .finish_non_exhaustive()
    }
}

#[derive(Serialize)]
struct GrantClaims<'a> {
    iss: &'a str,
    scope: &'a str,
    aud: &'a str,
    iat: u64,
    exp: u64,
}

impl ServiceAccount {
    /// Reads the key file at `path`; every error names the file and says
    /// what is wrong with it.
    pub fn load(path: &Path) -> anyhow::Result<ServiceAccount> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("FCM credentials {}: cannot read it", path.display()))?;
        Self::parse(&text).map_err(|e| anyhow!("FCM credentials {}: {e}", path.display()))
    }

    /// The key file's text: JSON with `client_email`, `private_key` (an
    /// RSA key, PKCS#8 PEM) and `token_uri`; other fields are ignored.
    pub fn parse(text: &str) -> Result<ServiceAccount, String> {
        let v: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| format!("not JSON ({e}); expected a Google service-account key file"))?;
        let field = |name: &str| -> Result<String, String> {
            match v.get(name) {
                Some(serde_json::Value::String(s)) if !s.trim().is_empty() => Ok(s.clone()),
                Some(_) => Err(format!("\"{name}\" must be a non-empty string")),
                None => Err(format!(
                    "no \"{name}\" field; a Google service-account key file has \
                     client_email, private_key and token_uri"
                )),
            }
        };
        let client_email = field("client_email")?;
        let pem = field("private_key")?;
        let token_uri = field("token_uri")?;
        match token_uri.parse::<http::Uri>() {
            Ok(u) if matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some() => {}
            _ => return Err(format!("\"token_uri\" {token_uri:?} is not an http(s) URL")),
        }
        let not_rsa = |e: jsonwebtoken::errors::Error| {
            format!(
                "\"private_key\" is not an RSA private key in PKCS#8 PEM \
                 (-----BEGIN PRIVATE KEY-----): {e}"
            )
        };
        let key = EncodingKey::from_rsa_pem(pem.as_bytes()).map_err(not_rsa)?;
        let account = ServiceAccount {
            client_email,
            token_uri,
            key,
        };
        // The PEM parser only unwraps the key; signing once proves it is one.
        account.assertion(0).map_err(not_rsa)?;
        Ok(account)
    }

    /// The signed grant (RS256 JWT) for a token, issued at `iat`.
    pub fn assertion(&self, iat: u64) -> Result<String, jsonwebtoken::errors::Error> {
        let claims = GrantClaims {
            iss: &self.client_email,
            scope: SCOPE,
            aud: &self.token_uri,
            iat,
            exp: iat + GRANT_LIFETIME_SECS,
        };
        jsonwebtoken::encode(&Header::new(Algorithm::RS256), &claims, &self.key)
    }
}

/// The token endpoint's answer to a grant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Granted {
    pub access_token: String,
    pub expires_in: Duration,
}

#[derive(Deserialize)]
struct TokenBody {
    access_token: String,
    expires_in: Option<u64>,
    token_type: Option<String>,
}

/// Reads a successful token answer: `{"access_token", "expires_in",
/// "token_type": "Bearer"}`. A missing `expires_in` counts as the hour
/// Google grants.
pub fn parse_token_response(body: &[u8]) -> Result<Granted, String> {
    let t: TokenBody = serde_json::from_slice(body)
        .map_err(|e| format!("token endpoint's answer is not a token ({e})"))?;
    if let Some(kind) = &t.token_type {
        if !kind.eq_ignore_ascii_case("bearer") {
            return Err(format!(
                "token endpoint issued a {kind:?} token, not Bearer"
            ));
        }
    }
    if t.access_token.is_empty() {
        return Err("token endpoint issued an empty access token".into());
    }
    Ok(Granted {
        access_token: t.access_token,
        expires_in: Duration::from_secs(t.expires_in.unwrap_or(GRANT_LIFETIME_SECS)),
    })
}

/// Why no token could be had.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenError {
    /// No answer, or a 429/5xx: worth trying again later.
    Unavailable(String),
    /// The endpoint refused the grant (4xx): the credentials are wrong,
    /// revoked or for another audience; trying again will not help.
    Refused(String),
}

struct Cached {
    token: Arc<str>,
    /// When the fetch ended: callers that asked before then take it.
    fetched: Instant,
    good_until: Instant,
}

/// The bridge's access token, fetched when needed, one fetch at a time.
pub struct AccessTokens {
    account: ServiceAccount,
    client: PooledClient<Full<Bytes>>,
    timeout: Duration,
    current: tokio::sync::Mutex<Option<Cached>>,
    metrics: Arc<Metrics>,
    app_id: String,
}

impl AccessTokens {
    pub fn new(
        account: ServiceAccount,
        client: PooledClient<Full<Bytes>>,
        timeout: Duration,
        metrics: Arc<Metrics>,
        app_id: String,
    ) -> AccessTokens {
        AccessTokens {
            account,
            client,
            timeout,
            current: tokio::sync::Mutex::new(None),
            metrics,
            app_id,
        }
    }

    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// A token good for a send now. Sends that find none wait on the lock
    /// while the first of them fetches one, then use that one: a token
    /// fetched after a caller asked is fresh enough for it, whatever its
    /// lifetime.
    pub async fn get(&self) -> Result<Arc<str>, TokenError> {
        let asked = Instant::now();
        let mut current = self.current.lock().await;
        if let Some(c) = current.as_ref() {
            if c.fetched >= asked || Instant::now() < c.good_until {
                return Ok(c.token.clone());
            }
        }
        let started = Instant::now();
        let granted = self.fetch().await?;
        self.metrics
            .bridge_token_refreshes
            .with_label_values(&["fcm", &self.app_id])
            .inc();
        let token: Arc<str> = granted.access_token.into();
        *current = Some(Cached {
            token: token.clone(),
            fetched: Instant::now(),
            good_until: started + granted.expires_in.saturating_sub(REFRESH_MARGIN),
        });
        Ok(token)
    }

    /// Forgets `stale` after FCM refused it, unless another send already
    /// replaced it, so the next `get` fetches a new one only once.
    pub async fn discard(&self, stale: &str) {
        let mut current = self.current.lock().await;
        if current.as_ref().is_some_and(|c| &*c.token == stale) {
            *current = None;
        }
    }

    async fn fetch(&self) -> Result<Granted, TokenError> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let jwt = self
            .account
            .assertion(now)
            .map_err(|e| TokenError::Refused(format!("cannot sign the grant: {e}")))?;
        let form = format!(
            "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer&assertion={jwt}"
        );
        let req = http::Request::post(&self.account.token_uri)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(Full::new(Bytes::from(form)))
            .map_err(|e| TokenError::Refused(format!("bad token_uri: {e}")))?;
        let uri = &self.account.token_uri;
        let answer = tokio::time::timeout(self.timeout, async {
            let resp = self.client.request(req).await?;
            let status = resp.status().as_u16();
            let body = resp.into_body().collect().await?.to_bytes();
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>((status, body))
        })
        .await;
        let (status, body) = match answer {
            Err(_) => {
                return Err(TokenError::Unavailable(format!(
                    "no answer from {uri} within {:?}",
                    self.timeout
                )))
            }
            Ok(Err(e)) => return Err(TokenError::Unavailable(format!("{uri}: {e}"))),
            Ok(Ok(a)) => a,
        };
        let text = String::from_utf8_lossy(&body);
        match status {
            200..=299 => parse_token_response(&body).map_err(TokenError::Unavailable),
            429 | 500..=599 => Err(TokenError::Unavailable(format!(
                "{uri} answered {status}: {text}"
            ))),
            _ => Err(TokenError::Refused(format!(
                "{uri} refused the grant ({status}): {text}"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_key_files_say_what_is_wrong() {
        let err = |t: &str| ServiceAccount::parse(t).unwrap_err();
        assert!(err("{").starts_with("not JSON"));
        assert!(err("{}").contains("no \"client_email\" field"));
        assert!(err(r#"{"client_email":"a@b"}"#).contains("no \"private_key\" field"));
        assert!(err(r#"{"client_email":"a@b","private_key":7}"#)
            .contains("\"private_key\" must be a non-empty string"));
        let no_uri = r#"{"client_email":"a@b","private_key":"x"}"#;
        assert!(err(no_uri).contains("no \"token_uri\" field"));
        let bad_uri = r#"{"client_email":"a@b","private_key":"x","token_uri":"ftp://h/t"}"#;
        assert!(err(bad_uri).contains("is not an http(s) URL"));
        let bad_key = r#"{"client_email":"a@b","private_key":"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n","token_uri":"https://h/t"}"#;
        assert!(err(bad_key).contains("is not an RSA private key in PKCS#8 PEM"));
    }

    #[test]
    fn token_answers_are_read() {
        let ok = parse_token_response(
            br#"{"access_token":"ya29.x","expires_in":3599,"token_type":"Bearer"}"#,
        )
        .unwrap();
        assert_eq!(ok.access_token, "ya29.x");
        assert_eq!(ok.expires_in, Duration::from_secs(3599));
        let default = parse_token_response(br#"{"access_token":"t"}"#).unwrap();
        assert_eq!(default.expires_in, Duration::from_secs(3600));
        assert!(parse_token_response(br#"{"access_token":"t","token_type":"mac"}"#).is_err());
        assert!(parse_token_response(br#"{"access_token":""}"#).is_err());
        assert!(parse_token_response(br#"{"error":"invalid_grant"}"#).is_err());
    }
}
