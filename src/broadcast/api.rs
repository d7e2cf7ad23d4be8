//! The operator API for broadcasts: `PUT /v1/broadcasts/<id>` (body: the
//! new version) and `GET /v1/broadcasts`, behind a bearer token from
//! `broadcast_tokens`. With no token configured the API does not exist
//! (404), so a default install exposes nothing.

use crate::app::App;
use crate::errors::{ApiError, Errno};
use crate::reply::{json, Response};
use bytes::Bytes;
use http::StatusCode;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;

fn authorise(app: &App, req: &http::Request<Incoming>) -> Result<(), ApiError> {
    let tokens = &app.settings.broadcast_tokens;
    crate::bearer::authorise_operator(tokens, req.headers(), "broadcast", "broadcast_tokens")
}

/// `GET /v1/broadcasts`.
pub fn list(app: &App, req: &http::Request<Incoming>) -> Result<Response, ApiError> {
    authorise(app, req)?;
    let current = app.broadcaster.current();
    Ok(json(
        StatusCode::OK,
        serde_json::json!({ "broadcasts": current.versions }).to_string(),
    ))
}

/// `PUT /v1/broadcasts/<id>`.
pub async fn put(app: &App, id: &str, req: http::Request<Incoming>) -> Result<Response, ApiError> {
    authorise(app, &req)?;
    let body: Bytes = Limited::new(req.into_body(), super::MAX_VERSION_LEN + 64)
        .collect()
        .await
        .map_err(|_| ApiError::new(413, Errno::TooLarge, "the version is too long"))?
        .to_bytes();
    let version = std::str::from_utf8(&body).map(str::trim).map_err(|_| {
        ApiError::new(
            400,
            Errno::InvalidBroadcast,
            "the version must be UTF-8 text",
        )
    })?;
    if !super::valid(id, version) {
        return Err(ApiError::new(
            400,
            Errno::InvalidBroadcast,
            format!(
                "invalid broadcast: ids are 1-{} characters of A-Z a-z 0-9 - _ . / :, versions 1-{} printable characters",
                super::MAX_ID_LEN,
                super::MAX_VERSION_LEN
            ),
        ));
    }
    let changed = app
        .broadcaster
        .set(app.store.as_ref(), id, version)
        .await
        .map_err(ApiError::storage)?;
    tracing::info!(id, version, changed, "broadcast set");
    Ok(json(
        StatusCode::OK,
        serde_json::json!({ "id": id, "version": version, "changed": changed }).to_string(),
    ))
}
