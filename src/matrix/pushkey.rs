//! Which pushkeys name an endpoint of this Herald: pure, no I/O. A pushkey
//! is the endpoint URL the client was handed; whether its token opens is
//! the handler's question (`endpoint::open_target`), not this module's.
//!
//! Only the path is read. The scheme and host are whatever the homeserver
//! was given: `public_url`'s host, another name of the same service, or an
//! address behind a reverse proxy; a proxy may also mount Herald under a
//! path prefix. None of that is trusted: the token alone names the
//! subscription, and it is authenticated. A pushkey that is not such a URL
//! is never fetched, whatever it names: Herald is no relay.

use crate::endpoint::EndpointPath;
use crate::token::ApiVersion;

/// The endpoint a pushkey names: how its path names the token, and the
/// token. None when it is not an endpoint URL of the shape Herald issues
/// (`<base>/wpush/v1|v2/<token>`, or autopush-rs's `<base>/wpush/<token>`
/// when `autopush` is true), one trailing slash allowed.
pub fn endpoint(pushkey: &str, autopush: bool) -> Option<(EndpointPath, &str)> {
    let rest = pushkey
        .strip_prefix("https://")
        .or_else(|| pushkey.strip_prefix("http://"))?;
    let (host, path) = rest.split_at(rest.find('/')?);
    if host.is_empty() || path.contains(['?', '#']) {
        return None;
    }
    let path = path.strip_suffix('/').unwrap_or(path);
    let segments: Vec<&str> = path.split('/').collect();
    match segments.as_slice() {
        [.., "wpush", v, token] if version(v).is_some() && !token.is_empty() => {
            Some((EndpointPath::Versioned(version(v)?), *token))
        }
        [.., "wpush", token] if autopush && !token.is_empty() && version(token).is_none() => {
            Some((EndpointPath::AutopushLegacy, *token))
        }
        _ => None,
    }
}

fn version(v: &str) -> Option<ApiVersion> {
    match v {
        "v1" => Some(ApiVersion::V1),
        "v2" => Some(ApiVersion::V2),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const V1: EndpointPath = EndpointPath::Versioned(ApiVersion::V1);
    const V2: EndpointPath = EndpointPath::Versioned(ApiVersion::V2);

    #[test]
    fn herald_endpoints_under_any_host_prefix_or_trailing_slash() {
        for (key, want) in [
            ("https://push.example.com/wpush/v1/tok", (V1, "tok")),
            ("http://127.0.0.1:8080/wpush/v2/tok", (V2, "tok")),
            ("https://other.name/wpush/v2/tok/", (V2, "tok")),
            ("https://example.com/push/wpush/v1/tok", (V1, "tok")),
            ("http://[::1]:9/wpush/v1/tok", (V1, "tok")),
        ] {
            assert_eq!(endpoint(key, false), Some(want), "{key}");
        }
    }

    #[test]
    fn autopush_legacy_only_when_its_tokens_are_accepted() {
        let key = "https://push.example.com/wpush/tok";
        assert_eq!(endpoint(key, false), None);
        assert_eq!(
            endpoint(key, true),
            Some((EndpointPath::AutopushLegacy, "tok"))
        );
    }

    #[test]
    fn anything_else_is_not_an_endpoint() {
        for key in [
            // The spec example's pushkey: an opaque token, no URL.
            "V2h5IG9uIGVhcnRoIGRpZCB5b3UgZGVjb2RlIHRoaXM/",
            "ftp://h/wpush/v1/tok",
            "https:///wpush/v1/tok",
            "https://h",
            "https://h/wpush/v3/tok",
            "https://h/wpush/v1/",
            "https://h/wpush/v1//",
            "https://h/wpush/v1/tok//",
            "https://h/wpush/v1/tok?x=1",
            "https://h/wpush/v1/tok#f",
            "https://h/wpush/v1/a/b",
            "https://ntfy.sh/upABCDEF?up=1",
            "https://h/m/tok",
        ] {
            assert_eq!(endpoint(key, true), None, "{key}");
        }
    }
}
