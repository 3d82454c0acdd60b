//! Bearer-token authentication from a tokens file, with two roles: `admin` (everything) and
//! `reader` (GET only).
//!
//! ```yaml
//! tokens:
//!   - {name: ci, token: 3f9a…, role: admin}
//!   - {name: grafana, token: 77c1…, role: reader}
//! ```
//! Health probes (`/healthz`, `/readyz`), the OpenAPI documents (`/openapi.json`,
//! `/openapi/v3…`), `/version` and the dashboard's page `/ui` (static: what it shows it reads
//! from the API with the token it is given) need no token (like
//! Kubernetes, which lets anyone read its version).

use std::collections::HashMap;
use std::path::Path;

use axum::extract::{Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::status::ApiError;
use super::AppState;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Admin,
    Reader,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenEntry {
    #[serde(default)]
    #[allow(dead_code)] // documents who holds a token; shown in config, not used for decisions
    name: String,
    token: String,
    role: Role,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokensFile {
    tokens: Vec<TokenEntry>,
}

/// Token → role.
#[derive(Clone, Debug, Default)]
pub struct Tokens(HashMap<String, Role>);

impl Tokens {
    pub fn load(path: &Path) -> Result<Tokens, crate::config::ConfigError> {
        let file: TokensFile = crate::config::read_yaml(path)?;
        let mut map = HashMap::new();
        for entry in file.tokens {
            if entry.token.len() < 16 {
                return Err(crate::config::ConfigError::Invalid(format!(
                    "{}: a token must be at least 16 characters",
                    path.display()
                )));
            }
            map.insert(entry.token, entry.role);
        }
        Ok(Tokens(map))
    }

    pub fn role(&self, token: &str) -> Option<Role> {
        self.0.get(token).copied()
    }
}

pub async fn require_token(State(s): State<AppState>, request: Request, next: Next) -> Response {
    let Some(tokens) = &s.tokens else {
        return next.run(request).await;
    };
    let path = request.uri().path();
    if matches!(
        path,
        "/healthz" | "/readyz" | "/openapi.json" | "/version" | "/ui"
    ) || path.starts_with("/openapi/v3")
    {
        return next.run(request).await;
    }
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let role = match presented.and_then(|t| tokens.role(t)) {
        Some(r) => r,
        None => {
            return ApiError::new(
                StatusCode::UNAUTHORIZED,
                "Unauthorized",
                "a valid bearer token is required (Authorization: Bearer TOKEN)",
            )
            .into_response()
        }
    };
    let reads = matches!(*request.method(), Method::GET | Method::HEAD);
    if role == Role::Reader && !reads {
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "Forbidden",
            "this token has the reader role and cannot change anything",
        )
        .into_response();
    }
    next.run(request).await
}
