//! Query parameters whose errors are API errors: a malformed or repeated parameter
//! (`?watch=x`, `?dryRun=All&dryRun=All`) is a 400 `Status` object naming it, like every other
//! error the API returns — not axum's plain-text rejection.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

use super::status::ApiError;

/// Like `axum::extract::Query`, rejecting with a JSON `Status`.
pub struct Query<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        axum::extract::Query::<T>::try_from_uri(&parts.uri)
            .map(|axum::extract::Query(t)| Query(t))
            .map_err(|e| ApiError::bad_request(format!("query parameters: {}", e.body_text())))
    }
}
