//! The subscription an application server receives from a browser: the JSON
//! of `PushSubscription.toJSON()`.

use crate::b64::decode_b64url;
use anyhow::{anyhow, bail, Context};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// `{"endpoint": "...", "keys": {"p256dh": "...", "auth": "..."}}`, as a
/// browser hands it over. Unknown fields (`expirationTime`, ...) are ignored
/// on input and not written back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subscription {
    pub endpoint: String,
    /// Absent for subscriptions that can only receive messages without a
    /// payload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keys: Option<SubscriptionKeys>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubscriptionKeys {
    /// The user agent's P-256 public key, base64url.
    pub p256dh: String,
    /// The user agent's 16-octet authentication secret, base64url.
    pub auth: String,
}

/// The decoded keys a payload is encrypted to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodedKeys {
    pub p256dh: Vec<u8>,
    pub auth: Vec<u8>,
}

impl Subscription {
    /// Parses subscription JSON, checking what can be checked without
    /// talking to the push service.
    pub fn from_json(text: &str) -> anyhow::Result<Self> {
        let sub: Subscription = serde_json::from_str(text)
            .context("subscription is not JSON of the form {\"endpoint\": ..., \"keys\": {\"p256dh\": ..., \"auth\": ...}}")?;
        sub.validate()?;
        Ok(sub)
    }

    /// Takes either inline JSON (anything starting with `{`) or the path of
    /// a file holding it, as the `--subscription` option does.
    pub fn from_arg(arg: &str) -> anyhow::Result<Self> {
        if arg.trim_start().starts_with('{') {
            return Self::from_json(arg);
        }
        let path = Path::new(arg);
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read subscription file {}", path.display()))?;
        Self::from_json(&text).with_context(|| format!("bad subscription in {}", path.display()))
    }

    fn validate(&self) -> anyhow::Result<()> {
        let uri: http::Uri = self.endpoint.parse().map_err(|e| {
            anyhow!(
                "subscription endpoint {:?} is not a URL: {e}",
                self.endpoint
            )
        })?;
        match uri.scheme_str() {
            Some("http") | Some("https") => {}
            _ => bail!(
                "subscription endpoint {:?} must be an http:// or https:// URL",
                self.endpoint
            ),
        }
        if uri.host().is_none_or(str::is_empty) {
            bail!("subscription endpoint {:?} has no host", self.endpoint);
        }
        if self.keys.is_some() {
            self.decoded_keys()?;
        }
        Ok(())
    }

    /// The keys decoded from base64url, if the subscription has any.
    pub fn decoded_keys(&self) -> anyhow::Result<DecodedKeys> {
        let keys = self
            .keys
            .as_ref()
            .ok_or_else(|| anyhow!("subscription has no keys, so it cannot receive a payload"))?;
        let p256dh = decode_b64url(&keys.p256dh)
            .ok_or_else(|| anyhow!("subscription keys.p256dh is not base64url"))?;
        let auth = decode_b64url(&keys.auth)
            .ok_or_else(|| anyhow!("subscription keys.auth is not base64url"))?;
        if p256dh.len() != 65 {
            bail!(
                "subscription keys.p256dh must decode to 65 bytes, got {}",
                p256dh.len()
            );
        }
        if auth.len() != 16 {
            bail!(
                "subscription keys.auth must decode to 16 bytes, got {}",
                auth.len()
            );
        }
        Ok(DecodedKeys { p256dh, auth })
    }
}

/// The origin (`scheme://host[:port]`) of a URL, lower-cased and without a
/// default port: the `aud` a push service expects in the VAPID token.
pub fn origin_of(url: &str) -> anyhow::Result<String> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| anyhow!("{url:?} is not a URL: {e}"))?;
    let scheme = uri
        .scheme_str()
        .ok_or_else(|| anyhow!("{url:?} has no scheme"))?
        .to_ascii_lowercase();
    let host = uri
        .host()
        .filter(|h| !h.is_empty())
        .ok_or_else(|| anyhow!("{url:?} has no host"))?
        .to_ascii_lowercase();
    let default_port = match scheme.as_str() {
        "http" => Some(80),
        "https" => Some(443),
        _ => None,
    };
    Ok(match uri.port_u16() {
        Some(port) if Some(port) != default_port => format!("{scheme}://{host}:{port}"),
        _ => format!("{scheme}://{host}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const P256DH: &str =
        "BCVxsr7N_eNgVRqvHtD0zTZsEc6-VV-JvLexhqUzORcxaOzi6-AYWXvTBHm4bjyPjs7Vd8pZGH6SRpkNtoIAiw4";
    const AUTH: &str = "BTBZMqHH6r4Tts7J_aSIgg";

    #[test]
    fn parses_browser_json() {
        let json = format!(
            r#"{{"endpoint":"http://127.0.0.1:8080/wpush/v2/abc","expirationTime":null,"keys":{{"p256dh":"{P256DH}","auth":"{AUTH}"}}}}"#
        );
        let sub = Subscription::from_arg(&json).unwrap();
        assert_eq!(sub.endpoint, "http://127.0.0.1:8080/wpush/v2/abc");
        let keys = sub.decoded_keys().unwrap();
        assert_eq!(keys.p256dh.len(), 65);
        assert_eq!(keys.auth.len(), 16);
    }

    #[test]
    fn accepts_padded_keys_and_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub.json");
        let json = format!(
            r#"{{"endpoint":"https://push.example.net/x","keys":{{"p256dh":"{P256DH}=","auth":"{AUTH}=="}}}}"#
        );
        std::fs::write(&path, json).unwrap();
        let sub = Subscription::from_arg(path.to_str().unwrap()).unwrap();
        assert_eq!(sub.decoded_keys().unwrap().auth.len(), 16);
    }

    #[test]
    fn rejects_bad_subscriptions_with_reasons() {
        let err = |s: &str| format!("{:#}", Subscription::from_arg(s).unwrap_err());
        assert!(err("{").contains("not JSON"));
        assert!(err(r#"{"endpoint":"ftp://x/y"}"#).contains("http"));
        assert!(err(r#"{"endpoint":"not a url"}"#).contains("not a URL"));
        assert!(err(&format!(
            r#"{{"endpoint":"http://h/x","keys":{{"p256dh":"{P256DH}","auth":"AAAA"}}}}"#
        ))
        .contains("16 bytes"));
        assert!(err(&format!(
            r#"{{"endpoint":"http://h/x","keys":{{"p256dh":"AAAA","auth":"{AUTH}"}}}}"#
        ))
        .contains("65 bytes"));
        assert!(err("/nonexistent/sub.json").contains("cannot read"));
    }

    #[test]
    fn keyless_subscription_is_allowed_but_has_no_keys() {
        let sub = Subscription::from_arg(r#"{"endpoint":"http://h/x"}"#).unwrap();
        assert!(sub.decoded_keys().is_err());
    }

    #[test]
    fn origins() {
        assert_eq!(
            origin_of("http://127.0.0.1:8080/wpush/v2/t").unwrap(),
            "http://127.0.0.1:8080"
        );
        assert_eq!(
            origin_of("HTTPS://Push.Example.NET:443/x").unwrap(),
            "https://push.example.net"
        );
        assert_eq!(origin_of("http://h:80/").unwrap(), "http://h");
        assert_eq!(origin_of("https://h:8443").unwrap(), "https://h:8443");
        assert!(origin_of("/relative").is_err());
    }
}
