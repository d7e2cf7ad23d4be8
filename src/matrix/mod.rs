//! The Matrix push gateway. SEAM: filled in by issue 27.

use crate::app::App;
use crate::errors::ApiError;
use crate::reply::Response;
use hyper::body::Incoming;

/// Where homeservers POST notifications and UnifiedPush clients probe.
pub const NOTIFY_PATH: &str = "/_matrix/push/v1/notify";

pub async fn handle(
    _app: &std::sync::Arc<App>,
    _req: http::Request<Incoming>,
) -> Result<Response, ApiError> {
    Err(ApiError::not_found())
}
