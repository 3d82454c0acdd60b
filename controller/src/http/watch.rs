//! `?watch=true`: a stream of newline-delimited JSON events.
//!
//! ```text
//! {"type":"ADDED","object":{…},"resourceVersion":"42"}
//! {"type":"MODIFIED","object":{…},"resourceVersion":"43"}
//! {"type":"BOOKMARK","object":{"kind":"Volume","apiVersion":…,"metadata":{"resourceVersion":"50"}},"resourceVersion":"50"}
//! ```
//! Without `resourceVersion` the stream starts with an ADDED event per existing object; with
//! `resourceVersion=N` it continues after revision N — give the `resourceVersion` of the last
//! event line seen (each line carries the etcd revision of its change; an object's own
//! `metadata.resourceVersion` only moves with spec changes). If N has been compacted the answer
//! is 410 Gone: list again. BOOKMARKs come periodically so an idle client knows how far it is.
//!
//! With `labelSelector`, an object whose labels stop matching is sent as DELETED and one that
//! starts matching as ADDED, so a client's view is always "the matching objects".
//!
//! Bounded: the stream buffers at most `WATCH_BUFFER` lines for a slow client (then the watch
//! waits), and ends after `timeoutSeconds` (default 30 min, at most 1 h); clients re-watch.

use std::collections::HashSet;
use std::convert::Infallible;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use cobalt_api::selector::LabelSelector;
use cobalt_api::API_VERSION;
use cobalt_store::{Error, WatchEvent};
use futures::StreamExt;
use serde_json::json;
use tokio::sync::mpsc;

use super::handlers::{bounded, Params};
use super::kinds::ApiKind;
use super::status::ApiError;
use super::AppState;

const WATCH_BUFFER: usize = 256;
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1800);
const MAX_TIMEOUT: Duration = Duration::from_secs(3600);

pub async fn serve<R: ApiKind>(
    s: AppState,
    p: Params,
    headers: &axum::http::HeaderMap,
) -> Result<Response, ApiError> {
    let selector = p.selector()?;
    let fields = p.fields()?;
    let table = super::table::wanted(headers);
    // kubectl (client-go) reads a watch as `application/json`; other clients get ndjson.
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let content_type = if accept.contains("application/json") && !accept.contains("ndjson") {
        "application/json"
    } else {
        "application/x-ndjson"
    };
    let timeout = p
        .timeout_seconds
        .map(Duration::from_secs)
        .unwrap_or(DEFAULT_TIMEOUT)
        .min(MAX_TIMEOUT);
    // The watch is established before answering, so 400/410/503 are real HTTP status codes.
    let (initial, watch) = match p
        .resource_version
        .as_deref()
        .filter(|v| !v.is_empty() && *v != "0")
    {
        Some(rv) => {
            let revision: i64 = rv.parse().map_err(|_| {
                ApiError::bad_request(format!("resourceVersion {rv:?} must be a number"))
            })?;
            (Vec::new(), bounded(&s, s.store.watch::<R>(revision)).await?)
        }
        None => {
            let (items, revision) =
                bounded(&s, s.store.list::<R>(&LabelSelector::default())).await?;
            let watch = s.store.watch_after_list(&items, revision);
            (items, watch)
        }
    };
    let (tx, rx) = mpsc::channel::<Bytes>(WATCH_BUFFER);
    tokio::spawn(pump::<R>(
        watch,
        initial,
        Filter {
            labels: selector,
            fields,
            table,
            initial_events_end: p.send_initial_events == Some(true),
        },
        tx,
        timeout,
        s.bookmark_interval,
        s.shutdown.clone(),
    ));
    let body =
        Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx).map(Ok::<_, Infallible>));
    Ok(([(header::CONTENT_TYPE, content_type)], body).into_response())
}

/// Which objects a watch sends, and how.
struct Filter {
    labels: LabelSelector,
    fields: cobalt_api::event::FieldSelector,
    /// Each object as a one-row Table (kubectl get -w).
    table: bool,
    /// Mark the end of the initial events (`sendInitialEvents=true`).
    initial_events_end: bool,
}

impl Filter {
    fn matches<R: ApiKind>(&self, o: &R) -> bool {
        self.labels.matches(&o.meta().labels) && self.fields.matches_object(o.name())
    }
}

fn line(kind: &str, object: serde_json::Value, revision: i64) -> Bytes {
    let mut text = json!({"type": kind, "object": object, "resourceVersion": revision.to_string()})
        .to_string();
    text.push('\n');
    Bytes::from(text)
}

async fn pump<R: ApiKind>(
    mut watch: cobalt_store::ResourceWatch<R>,
    initial: Vec<R>,
    filter: Filter,
    tx: mpsc::Sender<Bytes>,
    timeout: Duration,
    bookmark_every: Duration,
    shutdown: cobalt_reconcile::CancellationToken,
) {
    // Tables carry their column definitions in the first event only, as Kubernetes sends them.
    let mut first = true;
    let mut to_json = |o: &R| {
        if filter.table {
            let t = super::table::table(&[o], None, first);
            first = false;
            t
        } else {
            serde_json::to_value(o).unwrap_or_default()
        }
    };
    // What the client already knows: for a resumed watch, the matching objects at its revision.
    let mut visible: HashSet<String> = watch
        .objects()
        .filter(|o| initial.is_empty() && filter.matches(*o))
        .map(|o| o.name().to_string())
        .collect();
    let start_rev = watch.revision();
    for object in initial.iter().filter(|o| filter.matches(*o)) {
        visible.insert(object.name().to_string());
        if tx
            .send(line("ADDED", to_json(object), start_rev))
            .await
            .is_err()
        {
            return;
        }
    }
    if filter.initial_events_end {
        let mut b: serde_json::Value = json!({"apiVersion": API_VERSION, "kind": R::KIND, "metadata": {
            "resourceVersion": start_rev.to_string(),
            "annotations": {"k8s.io/initial-events-end": "true"},
        }});
        if filter.table {
            b = json!({"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": b["metadata"].clone(), "rows": []});
        }
        if tx.send(line("BOOKMARK", b, start_rev)).await.is_err() {
            return;
        }
    }
    let deadline = tokio::time::sleep(timeout);
    tokio::pin!(deadline);
    let mut bookmarks =
        tokio::time::interval_at(tokio::time::Instant::now() + bookmark_every, bookmark_every);
    loop {
        let out = tokio::select! {
            _ = &mut deadline => return,
            _ = tx.closed() => return,
            _ = shutdown.cancelled() => return,
            // Tables have no bookmark form kubectl reads; it does not ask for them.
            _ = bookmarks.tick() => (!filter.table).then(|| bookmark::<R>(watch.revision())),
            event = watch.next() => match event {
                Ok(WatchEvent::Progress { revision }) => (!filter.table).then(|| bookmark::<R>(revision)),
                Ok(WatchEvent::Added { object, revision } | WatchEvent::Modified { object, revision }) => {
                    let name = object.name().to_string();
                    let matches = filter.matches(&*object);
                    let was = visible.contains(&name);
                    match (was, matches) {
                        (false, true) => { visible.insert(name); Some(line("ADDED", to_json(&object), revision)) }
                        (true, true) => Some(line("MODIFIED", to_json(&object), revision)),
                        (true, false) => { visible.remove(&name); Some(line("DELETED", to_json(&object), revision)) }
                        (false, false) => None,
                    }
                }
                Ok(WatchEvent::Deleted { object, revision }) => {
                    visible.remove(object.name()).then(|| line("DELETED", to_json(&object), revision))
                }
                Err(e @ Error::Compacted { .. }) => {
                    let status = ApiError::from(e).status();
                    let _ = tx.send(line("ERROR", serde_json::to_value(status).unwrap_or_default(), watch.revision())).await;
                    return;
                }
                // etcd unreachable: the store's watch resumes by itself; keep the client waiting.
                Err(_) => None,
            },
        };
        if let Some(bytes) = out {
            if tx.send(bytes).await.is_err() {
                return;
            }
        }
    }
}

fn bookmark<R: ApiKind>(revision: i64) -> Bytes {
    line(
        "BOOKMARK",
        json!({"apiVersion": API_VERSION, "kind": R::KIND, "metadata": {"resourceVersion": revision.to_string()}}),
        revision,
    )
}
