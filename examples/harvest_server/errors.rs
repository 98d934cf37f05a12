//! Errors as JSON, and the extractors that answer with them.

use super::*;

/// An error as JSON: `{"error": ..., "field"?: ..., "session_id"?: ...}` with its status.
pub(crate) struct ApiError(pub(crate) StatusCode, pub(crate) serde_json::Value);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(self.1)).into_response()
    }
}

pub(crate) fn bad_request(field: &str, error: impl std::fmt::Display) -> ApiError {
    ApiError(
        StatusCode::BAD_REQUEST,
        json!({ "error": error.to_string(), "code": "bad_request", "field": field }),
    )
}

/// An extractor's own rejection (a path or query that does not parse), as JSON.
pub(crate) fn rejected(field: &str, status: StatusCode, text: String) -> ApiError {
    ApiError(
        status,
        json!({ "error": text, "code": "bad_request", "field": field }),
    )
}

/// `GET` and `POST` on no route: JSON, like every other error.
pub(crate) async fn not_found() -> ApiError {
    ApiError(
        StatusCode::NOT_FOUND,
        json!({ "error": "no such route", "code": "not_found" }),
    )
}

pub(crate) async fn method_not_allowed() -> ApiError {
    ApiError(
        StatusCode::METHOD_NOT_ALLOWED,
        json!({ "error": "this route does not take this method", "code": "method_not_allowed" }),
    )
}

/// The path's one parameter as a `T`, or a JSON `400` naming `field`.
async fn path_param<T, S>(
    parts: &mut axum::http::request::Parts,
    state: &S,
    field: &str,
) -> Result<T, ApiError>
where
    T: serde::de::DeserializeOwned + Send,
    S: Send + Sync,
{
    match <Path<T> as axum::extract::FromRequestParts<S>>::from_request_parts(parts, state).await {
        Ok(Path(value)) => Ok(value),
        Err(e) => Err(rejected(field, e.status(), e.body_text())),
    }
}

/// A session id from the path, or a JSON `400` naming it.
pub(crate) struct SessionPath(pub(crate) SessionId);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for SessionPath {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, ApiError> {
        path_param(parts, state, "session_id").await.map(Self)
    }
}

/// A harvester id from the path, or a JSON `400` naming it (a path segment that is not
/// UTF-8 once percent-decoded).
pub(crate) struct HarvesterPath(pub(crate) String);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for HarvesterPath {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, ApiError> {
        path_param(parts, state, "harvester").await.map(Self)
    }
}

/// A query string, or a JSON `400` naming what does not parse.
pub(crate) struct JsonQuery<T>(pub(crate) T);

/// `limit` of a page: from 1 to `max`, else a `400` naming it.
pub(crate) fn page_limit(
    limit: Option<usize>,
    default: usize,
    max: usize,
) -> Result<usize, ApiError> {
    match limit {
        None => Ok(default),
        Some(n) if (1..=max).contains(&n) => Ok(n),
        Some(n) => Err(bad_request(
            "limit",
            format!("must be from 1 to {max} (got {n})"),
        )),
    }
}

impl From<SessionError> for ApiError {
    fn from(e: SessionError) -> Self {
        let status = match &e {
            SessionError::UnknownSession { .. } => StatusCode::NOT_FOUND,
            SessionError::AlreadyFinished { .. } | SessionError::Finalizing { .. } => {
                StatusCode::CONFLICT
            }
            // The store failing, the tree down, or what a later version adds.
            _ => StatusCode::SERVICE_UNAVAILABLE,
        };
        let code = match &e {
            SessionError::UnknownSession { .. } => "not_found",
            SessionError::AlreadyFinished { .. } => "already_finished",
            SessionError::Finalizing { .. } => "finalizing",
            _ => "unavailable",
        };
        ApiError(status, json!({ "error": e.to_string(), "code": code }))
    }
}
