//! Talking to the Cobalt API: where (`--server`, `COBALT_SERVER`, or the current context of
//! `~/.config/cobalt/config.yaml`), as whom (`--token`), and errors people can act on.
//!
//! ```yaml
//! # ~/.config/cobalt/config.yaml
//! currentContext: prod
//! contexts:
//!   - {name: prod, server: https://cobalt.example:7420, token: 3f9a…, ca: /etc/cobalt/ca.pem}
//!   - {name: local, server: http://127.0.0.1:7420}
//! ```

use std::collections::HashMap;
use std::ops::Range;
use std::path::PathBuf;
use std::time::Duration;

use reqwest::StatusCode;
use serde::Deserialize;
use serde_json::Value;

use crate::kinds::Kind;

pub const DEFAULT_SERVER: &str = "http://127.0.0.1:7420";
const API: &str = "/apis/cobalt.io/v1alpha1";
/// Deadline of one non-watch request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Threads that decode one large list at most.
const MAX_DECODE_THREADS: usize = 8;

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ConfigFile {
    #[serde(default)]
    current_context: Option<String>,
    #[serde(default)]
    contexts: Vec<ContextEntry>,
}

#[derive(Debug, Deserialize)]
struct ContextEntry {
    name: String,
    server: String,
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    ca: Option<PathBuf>,
}

/// Where and how to connect, after flags, environment and config file.
#[derive(Debug, Clone)]
pub struct Target {
    pub server: String,
    pub token: Option<String>,
    pub ca: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error("cannot reach the Cobalt API at {server}: {cause}\n  set the server with --server URL, COBALT_SERVER, or a context in ~/.config/cobalt/config.yaml")]
    Connect { server: String, cause: String },
    #[error("{0}")]
    Api(ApiFailure),
    #[error("{0}")]
    Other(String),
}

/// A Status object returned by the API.
#[derive(Debug)]
pub struct ApiFailure {
    pub code: StatusCode,
    pub reason: String,
    pub message: String,
    pub causes: Vec<(String, String)>,
}

impl std::fmt::Display for ApiFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.causes.is_empty() {
            return write!(
                f,
                "{} ({}): {}",
                self.reason,
                self.code.as_u16(),
                self.message
            );
        }
        write!(f, "{} ({}):", self.reason, self.code.as_u16())?;
        for (field, message) in &self.causes {
            write!(f, "\n  {field}: {message}")?;
        }
        Ok(())
    }
}

impl Target {
    /// `--server` > `COBALT_SERVER` (clap fills `server` from both) > context > default.
    pub fn resolve(
        server: Option<String>,
        token: Option<String>,
        context: Option<String>,
    ) -> Result<Target, CtlError> {
        let path = std::env::var_os("COBALT_CONFIG")
            .map(PathBuf::from)
            .or_else(|| {
                std::env::var_os("HOME")
                    .map(|h| PathBuf::from(h).join(".config/cobalt/config.yaml"))
            });
        let file: ConfigFile = match path.as_ref().filter(|p| p.exists()) {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .map_err(|e| CtlError::Other(format!("cannot read {}: {e}", p.display())))?;
                serde_saphyr::from_str(&text)
                    .map_err(|e| CtlError::Other(format!("{} is invalid: {e}", p.display())))?
            }
            None => ConfigFile::default(),
        };
        let wanted = context.or(file.current_context.clone());
        let entry = match &wanted {
            Some(name) => Some(file.contexts.iter().find(|c| &c.name == name).ok_or_else(
                || CtlError::Other(format!("context {name:?} is not in the config file")),
            )?),
            None => None,
        };
        Ok(Target {
            server: server
                .or_else(|| entry.map(|e| e.server.clone()))
                .unwrap_or_else(|| DEFAULT_SERVER.into()),
            token: token.or_else(|| entry.and_then(|e| e.token.clone())),
            ca: entry.and_then(|e| e.ca.clone()),
        })
    }
}

pub struct Client {
    target: Target,
    http: reqwest::Client,
}

impl Client {
    pub fn new(target: Target) -> Result<Client, CtlError> {
        let mut builder = reqwest::Client::builder().connect_timeout(Duration::from_secs(5));
        if let Some(ca) = &target.ca {
            let pem = std::fs::read(ca)
                .map_err(|e| CtlError::Other(format!("cannot read CA {}: {e}", ca.display())))?;
            let cert = reqwest::Certificate::from_pem(&pem)
                .map_err(|e| CtlError::Other(format!("CA {}: {e}", ca.display())))?;
            builder = builder.add_root_certificate(cert);
        }
        let http = builder
            .build()
            .map_err(|e| CtlError::Other(e.to_string()))?;
        Ok(Client { target, http })
    }

    pub fn server(&self) -> &str {
        &self.target.server
    }

    fn url(&self, kind: Kind, name: Option<&str>) -> String {
        let base = self.target.server.trim_end_matches('/');
        match name {
            Some(n) => format!("{base}{API}/{}/{n}", kind.plural()),
            None => format!("{base}{API}/{}", kind.plural()),
        }
    }

    fn request(&self, method: reqwest::Method, url: String) -> reqwest::RequestBuilder {
        let r = self.http.request(method, url);
        match &self.target.token {
            Some(t) => r.bearer_auth(t),
            None => r,
        }
    }

    async fn send(&self, r: reqwest::RequestBuilder) -> Result<(StatusCode, Value), CtlError> {
        let (code, text) = self.send_text(r).await?;
        if !code.is_success() {
            return Err(api_error(code, text));
        }
        let body: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Ok((code, body))
    }

    async fn send_text(
        &self,
        r: reqwest::RequestBuilder,
    ) -> Result<(StatusCode, String), CtlError> {
        let (code, body) = self.send_bytes(r).await?;
        Ok((code, String::from_utf8_lossy(&body).into_owned()))
    }

    async fn send_bytes(
        &self,
        r: reqwest::RequestBuilder,
    ) -> Result<(StatusCode, Vec<u8>), CtlError> {
        let resp = r
            .timeout(REQUEST_TIMEOUT)
            .send()
            .await
            .map_err(|e| self.connect_error(e))?;
        let code = resp.status();
        let body = resp.bytes().await.map_err(|e| self.connect_error(e))?;
        Ok((code, Vec::from(body)))
    }

    fn connect_error(&self, e: reqwest::Error) -> CtlError {
        let mut cause = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            cause = format!("{cause}: {s}");
            source = s.source();
        }
        CtlError::Connect {
            server: self.target.server.clone(),
            cause,
        }
    }

    pub async fn get(&self, kind: Kind, name: &str) -> Result<Option<Value>, CtlError> {
        match self
            .send(self.request(reqwest::Method::GET, self.url(kind, Some(name))))
            .await
        {
            Ok((_, v)) => Ok(Some(v)),
            Err(CtlError::Api(f)) if f.code == StatusCode::NOT_FOUND => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// GET of a subresource, e.g. `machines/NAME/drainplan?pinned=true`.
    pub async fn get_sub(
        &self,
        kind: Kind,
        name: &str,
        sub: &str,
        query: &[(&str, &str)],
    ) -> Result<Value, CtlError> {
        let url = format!("{}/{sub}", self.url(kind, Some(name)));
        Ok(self
            .send(self.request(reqwest::Method::GET, url).query(query))
            .await?
            .1)
    }

    /// The server's `/version`.
    pub async fn server_version(&self) -> Result<Value, CtlError> {
        let url = format!("{}/version", self.target.server.trim_end_matches('/'));
        Ok(self.send(self.request(reqwest::Method::GET, url)).await?.1)
    }

    /// Events (`/api/v1/events`), narrowed by a field selector such as
    /// `involvedObject.kind=Volume,involvedObject.name=web`.
    pub async fn events(&self, field_selector: &str) -> Result<Value, CtlError> {
        let url = format!("{}/api/v1/events", self.target.server.trim_end_matches('/'));
        let r = self
            .request(reqwest::Method::GET, url)
            .query(&[("fieldSelector", field_selector)]);
        Ok(self.send(r).await?.1)
    }

    pub async fn list(&self, kind: Kind, selector: Option<&str>) -> Result<Value, CtlError> {
        let mut r = self.request(reqwest::Method::GET, self.url(kind, None));
        if let Some(s) = selector {
            r = r.query(&[("labelSelector", s)]);
        }
        Ok(self.send(r).await?.1)
    }

    /// Every object of `kind`, by name: what `apply` and `diff` of many manifests compare
    /// against. A large cluster's list is tens of megabytes of JSON, and what a repository
    /// re-applied unchanged waits for once it has arrived is reading it, so it is kept as sent
    /// and its items are decoded only when asked for ([`Listed`]), on every core (the server is
    /// done by then).
    pub async fn list_by_name(&self, kind: Kind) -> Result<Listed, CtlError> {
        let (code, body) = self
            .send_bytes(self.request(reqwest::Method::GET, self.url(kind, None)))
            .await?;
        if !code.is_success() {
            return Err(api_error(code, String::from_utf8_lossy(&body).into_owned()));
        }
        tokio::task::spawn_blocking(move || Listed::index(body))
            .await
            .map_err(|e| CtlError::Other(format!("decoding the list failed: {e}")))?
    }

    pub async fn create(&self, kind: Kind, body: &Value, dry_run: bool) -> Result<Value, CtlError> {
        let mut r = self
            .request(reqwest::Method::POST, self.url(kind, None))
            .json(body);
        if dry_run {
            r = r.query(&[("dryRun", "All")]);
        }
        Ok(self.send(r).await?.1)
    }

    pub async fn replace(
        &self,
        kind: Kind,
        name: &str,
        body: &Value,
        dry_run: bool,
    ) -> Result<Value, CtlError> {
        let mut r = self
            .request(reqwest::Method::PUT, self.url(kind, Some(name)))
            .json(body);
        if dry_run {
            r = r.query(&[("dryRun", "All")]);
        }
        Ok(self.send(r).await?.1)
    }

    /// Renews a held claim (`PUT claims/NAME/hold`); answers the claim.
    pub async fn hold(&self, name: &str) -> Result<Value, CtlError> {
        let url = format!("{}/hold", self.url(Kind::Claim, Some(name)));
        Ok(self.send(self.request(reqwest::Method::PUT, url)).await?.1)
    }

    pub async fn delete(&self, kind: Kind, name: &str) -> Result<Value, CtlError> {
        Ok(self
            .send(self.request(reqwest::Method::DELETE, self.url(kind, Some(name))))
            .await?
            .1)
    }

    /// Opens a watch; yields parsed event lines.
    pub async fn watch(
        &self,
        kind: Kind,
        resource_version: Option<&str>,
        selector: Option<&str>,
    ) -> Result<WatchStream, CtlError> {
        let mut r = self
            .request(reqwest::Method::GET, self.url(kind, None))
            .query(&[("watch", "true")]);
        if let Some(rv) = resource_version {
            r = r.query(&[("resourceVersion", rv)]);
        }
        if let Some(s) = selector {
            r = r.query(&[("labelSelector", s)]);
        }
        let resp = r.send().await.map_err(|e| self.connect_error(e))?;
        let code = resp.status();
        if !code.is_success() {
            let text = resp.text().await.unwrap_or_default();
            let body: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
            return Err(CtlError::Api(failure(code, &body)));
        }
        Ok(WatchStream {
            resp,
            buf: String::new(),
        })
    }
}

pub struct WatchStream {
    resp: reqwest::Response,
    buf: String,
}

impl WatchStream {
    /// The next event line, or `None` when the server ended the stream.
    pub async fn next(&mut self) -> Result<Option<Value>, CtlError> {
        loop {
            if let Some(i) = self.buf.find('\n') {
                let line: String = self.buf.drain(..=i).collect();
                return serde_json::from_str(line.trim())
                    .map(Some)
                    .map_err(|e| CtlError::Other(format!("bad watch line: {e}")));
            }
            match self
                .resp
                .chunk()
                .await
                .map_err(|e| CtlError::Other(format!("watch stream broke: {e}")))?
            {
                Some(chunk) => self.buf.push_str(&String::from_utf8_lossy(&chunk)),
                None => return Ok(None),
            }
        }
    }
}

/// One list of a kind as the server sent it, each item found by its name. An item is decoded
/// only when asked for: a repository re-applied against a cluster holding more than it decodes
/// the objects its files name, not the whole list.
pub struct Listed {
    body: String,
    /// Each item's name and where its JSON is in `body`.
    items: HashMap<String, Range<usize>>,
}

impl Listed {
    /// Checks the body is a list and finds each item's name, the items split over the
    /// machine's cores (at most [`MAX_DECODE_THREADS`]).
    pub(crate) fn index(body: Vec<u8>) -> Result<Listed, CtlError> {
        #[derive(Deserialize)]
        struct List<'a> {
            #[serde(default, borrow)]
            items: Vec<&'a serde_json::value::RawValue>,
        }
        #[derive(Deserialize)]
        struct Named<'a> {
            #[serde(borrow)]
            metadata: Name<'a>,
        }
        #[derive(Deserialize)]
        struct Name<'a> {
            #[serde(borrow)]
            name: std::borrow::Cow<'a, str>,
        }
        let body = String::from_utf8(body)
            .map_err(|e| CtlError::Other(format!("the server's list is not valid: {e}")))?;
        let list: List = serde_json::from_str(&body).map_err(invalid_list)?;
        let start = body.as_ptr() as usize;
        let index = |items: &[&serde_json::value::RawValue]| {
            items
                .iter()
                .map(|raw| {
                    let named: Named = serde_json::from_str(raw.get())?;
                    // `raw` is a slice of `body`: where it starts there.
                    let at = raw.get().as_ptr() as usize - start;
                    Ok((named.metadata.name.into_owned(), at..at + raw.get().len()))
                })
                .collect::<Result<Vec<_>, serde_json::Error>>()
        };
        let mut items = HashMap::with_capacity(list.items.len());
        for part in on_every_core(&list.items, index) {
            items.extend(part.map_err(invalid_list)?);
        }
        Ok(Listed { body, items })
    }

    /// Every item's name and JSON.
    pub fn raw(&self) -> impl Iterator<Item = (&str, &str)> {
        self.items
            .iter()
            .map(|(name, at)| (name.as_str(), &self.body[at.clone()]))
    }

    /// The items called `names` (those the list has), decoded on every core.
    pub fn decode(&self, names: &[&str]) -> Result<HashMap<String, Value>, CtlError> {
        let wanted: Vec<(&str, &str)> = names
            .iter()
            .filter_map(|name| Some((*name, &self.body[self.items.get(*name)?.clone()])))
            .collect();
        let decode = |items: &[(&str, &str)]| {
            items
                .iter()
                .map(|(name, json)| Ok((name.to_string(), serde_json::from_str(json)?)))
                .collect::<Result<Vec<_>, serde_json::Error>>()
        };
        let mut out = HashMap::with_capacity(wanted.len());
        for part in on_every_core(&wanted, decode) {
            out.extend(part.map_err(invalid_list)?);
        }
        Ok(out)
    }
}

fn invalid_list(e: serde_json::Error) -> CtlError {
    CtlError::Other(format!("the server's list is not valid: {e}"))
}

/// `work` over `items` split into one part per core (at most [`MAX_DECODE_THREADS`]), each
/// part on a thread of its own; the parts' results in order.
pub(crate) fn on_every_core<T: Sync, R: Send>(
    items: &[T],
    work: impl Fn(&[T]) -> R + Sync,
) -> Vec<R> {
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, MAX_DECODE_THREADS);
    let per_thread = items.len().div_ceil(threads).max(1);
    let work = &work;
    std::thread::scope(|s| {
        let running: Vec<_> = items
            .chunks(per_thread)
            .map(|part| s.spawn(move || work(part)))
            .collect();
        running
            .into_iter()
            .map(|t| t.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    })
}

/// The API error an unsuccessful answer carries (a body that is not JSON is kept as text).
fn api_error(code: StatusCode, text: String) -> CtlError {
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    CtlError::Api(failure(code, &body))
}

fn failure(code: StatusCode, body: &Value) -> ApiFailure {
    let causes = body["details"]["causes"]
        .as_array()
        .map(|cs| {
            cs.iter()
                .map(|c| {
                    (
                        c["field"].as_str().unwrap_or("").to_string(),
                        c["message"].as_str().unwrap_or("").to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    ApiFailure {
        code,
        reason: body["reason"]
            .as_str()
            .unwrap_or(code.canonical_reason().unwrap_or("Error"))
            .to_string(),
        message: body["message"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| body.to_string()),
        causes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn list(items: Vec<Value>) -> Listed {
        let body = json!({"apiVersion": "cobalt.io/v1alpha1", "kind": "VolumeList",
                          "metadata": {"resourceVersion": "7"}, "items": items});
        Listed::index(body.to_string().into_bytes()).unwrap()
    }

    #[test]
    fn a_listed_item_is_found_by_name_and_decoded_as_sent() {
        let items: Vec<Value> = (0..50)
            .map(|i| json!({"metadata": {"name": format!("v{i}"), "labels": {"note": "a \"quoted\" \\ value"}}, "spec": {"size": "1Gi"}}))
            .collect();
        let listed = list(items.clone());
        assert_eq!(listed.raw().count(), 50);
        let decoded = listed.decode(&["v3", "v49", "absent"]).unwrap();
        assert_eq!(decoded.len(), 2, "a name the list lacks is left out");
        assert_eq!(decoded["v3"], items[3]);
        assert_eq!(decoded["v49"], items[49]);
        for (name, raw) in listed.raw() {
            let v: Value = serde_json::from_str(raw).unwrap();
            assert_eq!(v["metadata"]["name"], name);
        }
        assert!(list(vec![]).decode(&["v1"]).unwrap().is_empty());
    }

    #[test]
    fn a_list_that_is_not_one_is_refused_saying_so() {
        for body in [
            &b"not json"[..],
            b"{\"items\": [{\"spec\": {}}]}",
            b"\xff\xfe",
        ] {
            let Err(e) = Listed::index(body.to_vec()) else {
                panic!("{:?} was taken for a list", String::from_utf8_lossy(body));
            };
            assert!(
                e.to_string().contains("the server's list is not valid"),
                "{e}"
            );
        }
    }
}
