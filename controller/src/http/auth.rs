//! Bearer-token authentication from a tokens file, with three roles: `admin` (everything),
//! `reader` (GET only) and `machine` (a storage machine's agent: reads, and writes only what
//! concerns its machine — see [`super::scope`]).
//!
//! ```yaml
//! tokens:
//!   - {name: ci, token: 3f9a…, role: admin}
//!   - {name: grafana, token: 77c1…, role: reader}
//!   - {name: node-1, token: 5be0…, role: machine, machine: node-1}
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

use super::scope::Caller;
use super::status::ApiError;
use super::AppState;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Admin,
    Reader,
    Machine,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenEntry {
    #[serde(default)]
    #[allow(dead_code)] // documents who holds a token; shown in config, not used for decisions
    name: String,
    token: String,
    role: Role,
    /// With `role: machine`: the machine the token is for.
    #[serde(default)]
    machine: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokensFile {
    tokens: Vec<TokenEntry>,
}

/// Token → who holds it.
#[derive(Clone, Debug, Default)]
pub struct Tokens(HashMap<String, Holder>);

/// A token's role, and for a machine token its machine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Holder {
    pub role: Role,
    pub machine: Option<String>,
}

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
            let invalid = |what: String| {
                crate::config::ConfigError::Invalid(format!("{}: {what}", path.display()))
            };
            match (entry.role, &entry.machine) {
                (Role::Machine, None) => {
                    return Err(invalid(format!(
                        "token {:?}: role machine needs `machine: NAME`, the machine it is for",
                        entry.name
                    )))
                }
                (Role::Machine, Some(m)) => {
                    if let Some(e) = cobalt_api::validate::dns1123_label_problem(m) {
                        return Err(invalid(format!("token {:?}: machine: {e}", entry.name)));
                    }
                }
                (role, Some(_)) => {
                    return Err(invalid(format!(
                        "token {:?}: `machine` is only for role machine, not {role:?}",
                        entry.name
                    )))
                }
                (_, None) => {}
            }
            map.insert(
                entry.token,
                Holder {
                    role: entry.role,
                    machine: entry.machine,
                },
            );
        }
        Ok(Tokens(map))
    }

    pub fn holder(&self, token: &str) -> Option<&Holder> {
        self.0.get(token)
    }
}

pub async fn require_token(
    State(s): State<AppState>,
    mut request: Request,
    next: Next,
) -> Response {
    let Some(tokens) = &s.tokens else {
        request.extensions_mut().insert(Caller::Admin);
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
    let holder = match presented.and_then(|t| tokens.holder(t)) {
        Some(h) => h.clone(),
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
    let caller = match (holder.role, holder.machine) {
        (Role::Reader, _) if !reads => {
            return ApiError::new(
                StatusCode::FORBIDDEN,
                "Forbidden",
                "this token has the reader role and cannot change anything",
            )
            .into_response();
        }
        (Role::Machine, Some(machine)) => {
            if !reads && !machine_route(request.method(), path) {
                return ApiError::new(
                    StatusCode::FORBIDDEN,
                    "Forbidden",
                    format!(
                        "a machine token (machine {machine}) may only read, register its Machine, \
                         and write the status and the agent's finalizer of what its machine holds"
                    ),
                )
                .into_response();
            }
            Caller::Machine(machine)
        }
        _ => Caller::Admin,
    };
    request.extensions_mut().insert(caller);
    next.run(request).await
}

/// The writes a machine token may attempt (each is checked further against the stored object):
/// `PUT …/{plural}/{name}` and `…/{name}/status`, and `POST …/machines` (registration).
fn machine_route(method: &Method, path: &str) -> bool {
    let Some(rest) = path
        .strip_prefix(super::API_PREFIX)
        .and_then(|r| r.strip_prefix('/'))
    else {
        return false;
    };
    let parts: Vec<&str> = rest.split('/').collect();
    match (method, parts.as_slice()) {
        (&Method::POST, ["machines"]) => true,
        (&Method::PUT, [_, name]) | (&Method::PUT, [_, name, "status"]) => !name.is_empty(),
        _ => false,
    }
}
