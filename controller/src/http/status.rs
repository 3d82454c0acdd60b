//! Errors as Kubernetes-style `Status` objects, so clients get one machine-readable shape:
//! `{kind: Status, status: Failure, code, reason, message, details: {name, kind, causes}}`.
//! Invalid input is 422 with one cause per problem (`{field: "spec.size", message}`).

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use cobalt_api::FieldError;
use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    pub api_version: &'static str,
    pub kind: &'static str,
    pub status: &'static str,
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub details: Option<Details>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Details {
    #[serde(skip_serializing_if = "String::is_empty")]
    pub name: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub kind: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub causes: Vec<FieldError>,
}

/// An error answer of the API.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub code: StatusCode,
    pub reason: &'static str,
    pub message: String,
    pub details: Option<Details>,
}

impl ApiError {
    pub fn new(code: StatusCode, reason: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            code,
            reason,
            message: message.into(),
            details: None,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "BadRequest", message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "NotFound", message)
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "ServiceUnavailable",
            message,
        )
    }

    /// 422 listing every problem.
    pub fn invalid(kind: &str, name: &str, causes: Vec<FieldError>) -> Self {
        let summary: Vec<String> = causes.iter().map(ToString::to_string).collect();
        ApiError {
            code: StatusCode::UNPROCESSABLE_ENTITY,
            reason: "Invalid",
            message: format!("{kind} {name:?} is invalid: {}", summary.join("; ")),
            details: Some(Details {
                name: name.into(),
                kind: kind.into(),
                causes,
            }),
        }
    }

    pub fn status(&self) -> Status {
        Status {
            api_version: "v1",
            kind: "Status",
            status: "Failure",
            code: self.code.as_u16(),
            reason: self.reason,
            message: self.message.clone(),
            details: self.details.clone(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.code, Json(self.status())).into_response()
    }
}

impl From<cobalt_store::Error> for ApiError {
    fn from(e: cobalt_store::Error) -> Self {
        use cobalt_store::Error as E;
        let message = e.to_string();
        let (code, reason) = match &e {
            E::NotFound { .. } => (StatusCode::NOT_FOUND, "NotFound"),
            E::AlreadyExists { .. } => (StatusCode::CONFLICT, "AlreadyExists"),
            E::Conflict { .. } | E::Fenced { .. } => (StatusCode::CONFLICT, "Conflict"),
            E::Compacted { .. } => (StatusCode::GONE, "Expired"),
            E::Unavailable { .. } | E::ApiUnavailable { .. } => {
                (StatusCode::SERVICE_UNAVAILABLE, "ServiceUnavailable")
            }
            E::Invalid(_) => (StatusCode::BAD_REQUEST, "BadRequest"),
            E::Forbidden(_) => (StatusCode::FORBIDDEN, "Forbidden"),
            E::Corrupt { .. } | E::Tls(_) => (StatusCode::INTERNAL_SERVER_ERROR, "InternalError"),
        };
        let mut err = ApiError::new(code, reason, message);
        if let E::NotFound { kind, name }
        | E::AlreadyExists { kind, name }
        | E::Conflict { kind, name, .. } = &e
        {
            err.details = Some(Details {
                name: name.clone(),
                kind: kind.to_string(),
                causes: vec![],
            });
        }
        err
    }
}
