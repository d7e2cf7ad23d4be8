//! The Matrix push gateway: homeservers POST notifications here, and each
//! device whose pushkey is an endpoint of this Herald gets the notification
//! as a push (proto-docs/http-api.md, "Matrix push gateway").

mod gateway;
mod payload;
mod pushkey;
mod request;

use crate::app::App;
use crate::errors::ApiError;
use crate::reply::{json, Response};
use http::{Method, StatusCode};
use hyper::body::Incoming;

/// Where homeservers POST notifications and UnifiedPush clients probe.
pub const NOTIFY_PATH: &str = "/_matrix/push/v1/notify";

/// What UnifiedPush clients expect from a GET: that this URL is a Matrix
/// gateway, so they may give it to the homeserver as the pusher's URL.
pub const PROBE_ANSWER: &str = r#"{"unifiedpush":{"gateway":"matrix"}}"#;

pub async fn handle(
    app: &std::sync::Arc<App>,
    req: http::Request<Incoming>,
) -> Result<Response, ApiError> {
    match *req.method() {
        Method::GET => Ok(json(StatusCode::OK, PROBE_ANSWER.to_string())),
        Method::POST => gateway::notify(app, req).await,
        _ => Err(ApiError::method_not_allowed()),
    }
}
