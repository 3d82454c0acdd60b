//! The source side of a move: `GET /v1/moves/{volume}/stream?uid=…[&parent=…][&final=true]` on
//! the agent's `listen` address. Takes a read-only snapshot and streams it (incremental on
//! `parent` when given), after checking the caller's credential against a fresh read of the
//! volume. With `final=true` (only once the move's stage is CuttingOver) the volume is unexported
//! first and never exported again here, so the final snapshot holds every acknowledged write.
//!
//! `GET /v1/clones/{clone}/stream?uid=…` serves a clone bound to another machine a full stream
//! of a fresh snapshot of its source (which this machine holds), checked the same way against
//! the clone's `status.cloneSeed`; the snapshot is deleted once sent.
//!
//! Answers: 200 with the stream (`X-Cobalt-Snapshot` names it, `X-Cobalt-Estimate` gives the
//! bytes expected when known); 401 without a credential; 403 with a wrong one or when the volume
//! is not moving away from this machine; 404 for an unknown volume or uid; 409 when `parent` is
//! not here (the target then starts over with a full stream) or `final` comes before the
//! cut-over; 503 when the machine is already sending its maximum of streams or etcd cannot
//! confirm the request.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use cobalt_api::{MoveStage, Volume};
use serde::Deserialize;

use super::{
    credential_hash, same_digest, Moves, CLONE_SNAPSHOT_PREFIX, FINAL_SUFFIX, SNAPSHOT_PREFIX,
};
use crate::backend::BackendError;

#[derive(Debug, Deserialize)]
pub struct StreamQuery {
    pub uid: String,
    #[serde(default)]
    pub parent: Option<String>,
    #[serde(default, rename = "final")]
    pub final_: bool,
}

pub fn router(moves: Arc<Moves>) -> axum::Router {
    axum::Router::new()
        .route("/v1/moves/{volume}/stream", axum::routing::get(stream))
        .route(
            "/v1/clones/{clone}/stream",
            axum::routing::get(clone_stream),
        )
        .with_state(moves)
}

/// The bearer credential of a request, if any.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get("authorization")
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.strip_prefix("Bearer "))
}

#[derive(Debug, Deserialize)]
pub struct CloneQuery {
    /// The clone's uid.
    pub uid: String,
}

/// `GET /v1/clones/{clone}/stream?uid=…`: a full stream of a fresh snapshot of the clone's
/// source, which this machine holds, for the machine the clone is bound to. The credential must
/// hash to the clone's `status.cloneSeed.credentialSha256`; the snapshot is deleted once sent.
async fn clone_stream(
    State(moves): State<Arc<Moves>>,
    Path(name): Path<String>,
    Query(q): Query<CloneQuery>,
    headers: HeaderMap,
) -> Response {
    let Some(credential) = bearer(&headers) else {
        return refuse(
            StatusCode::UNAUTHORIZED,
            "a clone-seed credential is required",
        );
    };
    let here = moves.machine.as_str();
    let clone = match moves.store.get::<Volume>(&name).await {
        Ok(Some(v)) if v.metadata.uid == q.uid => v,
        Ok(_) => {
            return refuse(
                StatusCode::NOT_FOUND,
                format!("no volume {name} with that uid"),
            )
        }
        Err(e) => {
            return refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("cannot confirm the clone: {e}"),
            )
        }
    };
    let status = clone.status.as_ref();
    let authorized = status
        .and_then(|s| s.clone_seed.as_ref())
        .is_some_and(|seed| {
            seed.from == here && same_digest(&seed.credential_sha256, &credential_hash(credential))
        });
    if !authorized || status.and_then(|s| s.machine.as_ref()).is_some() {
        return refuse(
            StatusCode::FORBIDDEN,
            format!("volume {name} is not being seeded from machine {here}"),
        );
    }
    let Some(source) = clone.spec.source.as_ref().and_then(|s| s.volume.clone()) else {
        return refuse(
            StatusCode::FORBIDDEN,
            format!("volume {name} is not a clone"),
        );
    };
    let src = match moves.store.get::<Volume>(&source).await {
        Ok(Some(v)) if v.status.as_ref().and_then(|s| s.machine.as_deref()) == Some(here) => v,
        Ok(_) => {
            return refuse(
                StatusCode::CONFLICT,
                format!("the source {source} is not on machine {here}"),
            )
        }
        Err(e) => {
            return refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("cannot confirm the source: {e}"),
            )
        }
    };
    let permit = match outgoing_slot(&moves) {
        Ok(p) => p,
        Err(busy) => return refuse(StatusCode::SERVICE_UNAVAILABLE, busy),
    };
    let snapshot = format!(
        "{CLONE_SNAPSHOT_PREFIX}{}-{}",
        clone.metadata.uid,
        chrono::Utc::now().timestamp_millis()
    );
    let backend = moves.backend.clone();
    let (u, s) = (src.metadata.uid.clone(), snapshot.clone());
    let prepared = tokio::task::spawn_blocking(move || {
        backend.snapshot(&u, &s)?;
        backend.send(&u, &s, None)
    })
    .await;
    match prepared {
        Ok(Ok(send)) => {
            let cleanup = (
                moves.backend.clone(),
                src.metadata.uid.clone(),
                snapshot.clone(),
            );
            respond(moves, send, permit, &snapshot, Some(cleanup))
        }
        Ok(Err(e)) => refuse(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        Err(e) => refuse(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// Bytes per body chunk of a stream.
const CHUNK: usize = 1 << 20;

/// One of the machine's outgoing stream slots, or why none is free.
fn outgoing_slot(moves: &Arc<Moves>) -> Result<tokio::sync::OwnedSemaphorePermit, String> {
    moves.outgoing.clone().try_acquire_owned().map_err(|_| {
        format!(
            "machine {} is already sending {} streams",
            moves.machine, moves.config.max_outgoing
        )
    })
}

fn refuse(code: StatusCode, why: impl Into<String>) -> Response {
    (code, format!("{}\n", why.into())).into_response()
}

async fn stream(
    State(moves): State<Arc<Moves>>,
    Path(name): Path<String>,
    Query(q): Query<StreamQuery>,
    headers: HeaderMap,
) -> Response {
    let Some(credential) = bearer(&headers) else {
        return refuse(StatusCode::UNAUTHORIZED, "a move credential is required");
    };
    // A fresh read: the cache could be behind a cancellation or a new credential.
    let v = match moves.store.get::<Volume>(&name).await {
        Ok(Some(v)) => v,
        Ok(None) => return refuse(StatusCode::NOT_FOUND, format!("no volume {name}")),
        Err(e) => {
            return refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("cannot confirm the move: {e}"),
            )
        }
    };
    let here = moves.machine.as_str();
    let Some(m) = v.moving().filter(|m| {
        m.from == here && v.status.as_ref().and_then(|s| s.machine.as_deref()) == Some(here)
    }) else {
        return refuse(
            StatusCode::FORBIDDEN,
            format!("volume {name} is not moving away from machine {here}"),
        );
    };
    let authorized = m
        .credential_sha256
        .as_deref()
        .is_some_and(|h| same_digest(h, &credential_hash(credential)));
    if !authorized {
        return refuse(StatusCode::FORBIDDEN, "the credential is not this move's");
    }
    if v.metadata.uid != q.uid {
        return refuse(
            StatusCode::NOT_FOUND,
            format!("volume {name} has another uid now"),
        );
    }
    let permit = match outgoing_slot(&moves) {
        Ok(p) => p,
        Err(busy) => return refuse(StatusCode::SERVICE_UNAVAILABLE, busy),
    };
    let uid = v.metadata.uid.clone();
    if q.final_ {
        if m.stage != MoveStage::CuttingOver {
            return refuse(
                StatusCode::CONFLICT,
                "the final stream comes after the cut-over has begun",
            );
        }
        // From here on this machine takes no more writes for the volume.
        moves.freeze(&uid);
        if let Err(e) = moves.exports.set(&name, None).await {
            return refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("cannot stop serving the volume: {e}"),
            );
        }
        tracing::info!(volume = %name, "cut-over: stopped serving; sending the final increment");
    }
    let snapshot = format!(
        "{SNAPSHOT_PREFIX}{:013}{}",
        chrono::Utc::now().timestamp_millis(),
        if q.final_ { FINAL_SUFFIX } else { "" }
    );
    let backend = moves.backend.clone();
    let (u, s, parent) = (uid.clone(), snapshot.clone(), q.parent.clone());
    let prepared = tokio::task::spawn_blocking(move || {
        if let Some(p) = &parent {
            if !backend.snapshots(&u)?.contains(p) {
                return Err(BackendError::UnknownSnapshot {
                    uid: u.clone(),
                    name: p.clone(),
                });
            }
        }
        backend.snapshot(&u, &s)?;
        // Older move snapshots are no longer anyone's parent.
        for old in backend.snapshots(&u)? {
            if old.starts_with(SNAPSHOT_PREFIX) && old != s && Some(&old) != parent.as_ref() {
                backend.delete_snapshot(&u, &old)?;
            }
        }
        backend.send(&u, &s, parent.as_deref())
    })
    .await;
    let send = match prepared {
        Ok(Ok(send)) => send,
        Ok(Err(e @ BackendError::UnknownSnapshot { .. })) => {
            return refuse(StatusCode::CONFLICT, e.to_string())
        }
        Ok(Err(e)) => return refuse(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        Err(e) => return refuse(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    respond(moves, send, permit, &snapshot, None)
}

/// Streams `send` as the response body, paced by the machine's rate limit, holding `permit`
/// until the stream ends; `cleanup` names a snapshot to delete once it has (or has failed).
fn respond(
    moves: Arc<Moves>,
    send: crate::backend::stream::SendStream,
    permit: tokio::sync::OwnedSemaphorePermit,
    snapshot: &str,
    cleanup: Option<(Arc<dyn crate::backend::Backend>, String, String)>,
) -> Response {
    let estimate = send.estimate;
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(8);
    tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let _permit = permit;
        let mut send = send;
        loop {
            // Fill a whole chunk (the pipe hands out at most its size per read).
            let mut buf = vec![0u8; CHUNK];
            let mut n = 0;
            let read = loop {
                match send.read(&mut buf[n..]) {
                    Ok(0) => break Ok(()),
                    Ok(k) => {
                        n += k;
                        if n == buf.len() {
                            break Ok(());
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => break Err(e),
                }
            };
            let item = match (read, n) {
                (Ok(()), 0) => break,
                (Ok(()), n) => {
                    buf.truncate(n);
                    std::thread::sleep(moves.limiter.delay(n));
                    Ok(Bytes::from(buf))
                }
                (Err(e), _) => Err(e),
            };
            let failed = item.is_err();
            // The receiver went away: dropping `send` stops `btrfs send`.
            if tx.blocking_send(item).is_err() || failed {
                break;
            }
        }
        drop(send);
        if let Some((backend, uid, name)) = cleanup {
            if let Err(e) = backend.delete_snapshot(&uid, &name) {
                tracing::warn!(%uid, snapshot = %name, error = %e, "deleting a sent snapshot");
            }
        }
    });
    let body = Body::from_stream(futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    }));
    let mut response = Response::new(body);
    let h = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(snapshot) {
        h.insert("x-cobalt-snapshot", v);
    }
    if let Some(e) = estimate {
        h.insert("x-cobalt-estimate", HeaderValue::from(e));
    }
    response
}
