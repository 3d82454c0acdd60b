//! The agent's writes through a controller's API with its machine token (config `api:`;
//! ARCHITECTURE.md "Least privilege"). With it, the agent's etcd credentials need only read the
//! prefix, hold the machine's liveness key and write events; the API lets the token write only
//! what concerns this machine.
//!
//! Every request has a deadline ([`REQUEST_TIMEOUT`]); an unreachable or failing API is
//! [`cobalt_store::Error::ApiUnavailable`], which the reconcilers retry with backoff like an
//! unreachable etcd.

use std::path::Path;
use std::time::Duration;

use cobalt_store::remote::Pending;
use cobalt_store::{Error, RemoteWrites, StatusPrecondition};
use reqwest::{Method, StatusCode};

/// Deadline of one API request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

const API_PREFIX: &str = "/apis/cobalt.io/v1alpha1";

pub struct ApiWrites {
    server: String,
    token: String,
    http: reqwest::Client,
}

impl ApiWrites {
    /// `server` is the controllers' URL (`https://cobalt.example:7420`), `token` the machine's
    /// token, `ca` the CA of the API's certificate when it is not in the system's roots.
    pub fn new(server: &str, token: &str, ca: Option<&Path>) -> Result<ApiWrites, String> {
        let mut builder = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .connect_timeout(REQUEST_TIMEOUT);
        if let Some(ca) = ca {
            let pem = std::fs::read(ca).map_err(|e| format!("api.ca {}: {e}", ca.display()))?;
            let cert = reqwest::Certificate::from_pem(&pem)
                .map_err(|e| format!("api.ca {}: {e}", ca.display()))?;
            builder = builder.add_root_certificate(cert);
        }
        Ok(ApiWrites {
            server: server.trim_end_matches('/').to_string(),
            token: token.to_string(),
            http: builder.build().map_err(|e| format!("api: {e}"))?,
        })
    }

    async fn send(
        &self,
        method: Method,
        path: String,
        kind: &'static str,
        name: &str,
        body: Vec<u8>,
        precondition: Option<StatusPrecondition>,
    ) -> Result<(Vec<u8>, Option<i64>), Error> {
        let url = format!("{}{API_PREFIX}/{path}", self.server);
        let mut request = self
            .http
            .request(method, &url)
            .bearer_auth(&self.token)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body);
        if let Some(p) = precondition {
            request = request.header(StatusPrecondition::HEADER, p.to_header());
        }
        let unavailable = |cause: String| Error::ApiUnavailable {
            server: self.server.clone(),
            cause,
        };
        let response = request
            .send()
            .await
            .map_err(|e| unavailable(e.to_string()))?;
        let code = response.status();
        let written = response
            .headers()
            .get(StatusPrecondition::WRITTEN_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        let answer = response
            .bytes()
            .await
            .map_err(|e| unavailable(e.to_string()))?
            .to_vec();
        if code.is_success() {
            return Ok((answer, written));
        }
        let status: serde_json::Value = serde_json::from_slice(&answer).unwrap_or_default();
        let message = status["message"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| String::from_utf8_lossy(&answer).into_owned());
        let name = name.to_string();
        Err(match code {
            StatusCode::NOT_FOUND => Error::NotFound { kind, name },
            StatusCode::CONFLICT if status["reason"] == "AlreadyExists" => {
                Error::AlreadyExists { kind, name }
            }
            StatusCode::CONFLICT => Error::Conflict {
                kind,
                name,
                sent: message,
            },
            StatusCode::FORBIDDEN | StatusCode::UNAUTHORIZED => {
                Error::Forbidden(format!("the API at {}: {message}", self.server))
            }
            c if c.is_server_error() => unavailable(format!("{c}: {message}")),
            c => Error::Invalid(format!("the API answered {c}: {message}")),
        })
    }
}

impl RemoteWrites for ApiWrites {
    fn create<'a>(
        &'a self,
        kind: &'static str,
        plural: &'static str,
        body: Vec<u8>,
    ) -> Pending<'a, Vec<u8>> {
        Box::pin(async move {
            let name = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["metadata"]["name"].as_str().map(str::to_string))
                .unwrap_or_default();
            Ok(self
                .send(Method::POST, plural.to_string(), kind, &name, body, None)
                .await?
                .0)
        })
    }

    fn replace<'a>(
        &'a self,
        kind: &'static str,
        plural: &'static str,
        name: &'a str,
        body: Vec<u8>,
    ) -> Pending<'a, Vec<u8>> {
        Box::pin(async move {
            Ok(self
                .send(
                    Method::PUT,
                    format!("{plural}/{name}"),
                    kind,
                    name,
                    body,
                    None,
                )
                .await?
                .0)
        })
    }

    fn write_status<'a>(
        &'a self,
        kind: &'static str,
        plural: &'static str,
        name: &'a str,
        body: Vec<u8>,
        expect: StatusPrecondition,
    ) -> Pending<'a, (Vec<u8>, Option<i64>)> {
        Box::pin(async move {
            self.send(
                Method::PUT,
                format!("{plural}/{name}/status"),
                kind,
                name,
                body,
                Some(expect),
            )
            .await
        })
    }
}
