//! `/v1/admin/…`. SEAM: filled in by issue 24.

use crate::app::App;
use crate::errors::ApiError;
use crate::reply::Response;
use hyper::body::Incoming;

pub async fn handle(_app: &App, _req: http::Request<Incoming>) -> Result<Response, ApiError> {
    Err(ApiError::not_found())
}
