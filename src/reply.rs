//! Whole (non-streamed) HTTP responses and how errors become them: shared
//! by every HTTP handler.

use crate::errors::ApiError;
use bytes::Bytes;
use http::StatusCode;
use http_body_util::Full;

pub type Response = http::Response<Full<Bytes>>;

pub fn json(status: StatusCode, body: String) -> Response {
    http::Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("valid response")
}

pub fn error_response(e: &ApiError) -> Response {
    let mut r = json(
        StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        e.to_json(),
    );
    if let Some(secs) = e.retry_after {
        r.headers_mut().insert("retry-after", secs.into());
    }
    r
}
