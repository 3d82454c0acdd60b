//! The target side of a move: one task per granted move to this machine, started and stopped by
//! [`Moves::sync`] from the volume reconciler. It pulls rounds from the source, advances the
//! stage in etcd, and at the cut-over makes the volume live here and flips `status.machine` and
//! `status.endpoint` in one write. Every decision re-reads the volume from etcd first, so a
//! cancelled or redirected move is noticed before the next byte and its partial copy discarded.

use std::io::Read;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::{DateTime, Utc};
use cobalt_api::{
    set_condition, ConditionStatus, Machine, MoveStage, MoveStatus, Usage, Volume, VolumePhase,
};
use cobalt_reconcile::CancellationToken;

use super::{
    credential_hash, new_credential, Moves, Pull, CLONE_SNAPSHOT_PREFIX, FINAL_SUFFIX,
    SNAPSHOT_PREFIX,
};
use crate::backend::BackendError;
use crate::exporter::describe_rules;
use crate::volumes::{endpoint, export_spec};

/// How a pull attempt ended.
#[derive(Debug)]
enum Outcome {
    /// The volume is served here now.
    Done,
    /// The move no longer targets this machine (cancelled, redirected, deleted).
    NotWanted,
}

#[derive(Debug, thiserror::Error)]
enum PullError {
    #[error(transparent)]
    Store(#[from] cobalt_store::Error),
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error("{0}")]
    Stalled(String),
}

/// Longest pause between attempts of a stalled move.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A round this short ends the converging (few writes can land in it).
const QUICK_ROUND: Duration = Duration::from_millis(500);
/// How often progress is written during a round.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

impl Moves {
    /// Stops the pulls of volumes no longer in this agent's view (`present`: the uids it holds).
    /// A move cancelled before its cut-over leaves the target's view, so its reconciler never
    /// sees the cancellation; the pull would notice at its next fresh read, this stops it at
    /// once. What the pull made is discarded only after a fresh read agrees.
    pub fn stop_pulls_not_in(&self, present: &std::collections::HashSet<String>) {
        let mut pulls = self.pulls.lock().unwrap_or_else(|p| p.into_inner());
        pulls.retain(|uid, p| {
            let keep = present.contains(uid);
            if !keep {
                p.cancel.cancel();
            }
            keep
        });
    }

    /// Starts the pull of a move granted to this machine, stops one no longer wanted. Cheap:
    /// called by the reconciler for every volume event.
    pub fn sync(self: &Arc<Self>, v: &Volume) {
        let uid = &v.metadata.uid;
        let ours = v
            .moving()
            .filter(|m| m.to == self.machine && !v.metadata.is_deleting());
        // A pull that has flipped the volume (CleaningUp) finishes by itself: cancelling it
        // would drop its last steps.
        let finishing = ours.is_some_and(|m| m.stage == MoveStage::CleaningUp);
        let wanted = ours.filter(|_| !finishing).map(|m| m.started);
        let mut pulls = self.pulls.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = pulls.get(uid) {
            let same = ours.map(|m| m.started) == Some(p.started);
            if same && (finishing || wanted.is_some()) {
                return;
            }
            p.cancel.cancel();
            pulls.remove(uid);
        }
        if let Some(started) = wanted {
            let cancel = CancellationToken::new();
            pulls.insert(
                uid.clone(),
                Pull {
                    started,
                    cancel: cancel.clone(),
                },
            );
            let me = self.clone();
            let (name, uid) = (v.metadata.name.clone(), uid.clone());
            tokio::spawn(async move { me.pull(name.to_string(), uid, started, cancel).await });
        }
    }

    async fn pull(
        self: Arc<Self>,
        name: String,
        uid: String,
        started: DateTime<Utc>,
        cancel: CancellationToken,
    ) {
        let permit = tokio::select! {
            p = self.incoming.clone().acquire_owned() => p,
            _ = cancel.cancelled() => {
                self.discard_if_unwanted(&name, &uid).await;
                return;
            }
        };
        let credential = match new_credential() {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "cannot make a move credential");
                return;
            }
        };
        let mut backoff = Duration::from_millis(500);
        loop {
            let attempt = tokio::select! {
                r = self.pull_once(&name, &uid, started, &credential) => Some(r),
                _ = cancel.cancelled() => None,
            };
            match attempt {
                Some(Ok(Outcome::Done)) => {
                    self.discard_if_unwanted(&name, &uid).await;
                    break;
                }
                Some(Ok(Outcome::NotWanted)) | None => {
                    self.discard_if_unwanted(&name, &uid).await;
                    break;
                }
                Some(Err(e)) => {
                    tracing::warn!(volume = %name, error = %e, "move stalled; retrying");
                    let why = e.to_string();
                    let _ = self
                        .update_move(&name, started, |m, _| {
                            m.stalled = Some(why.clone());
                            true
                        })
                        .await;
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = cancel.cancelled() => {}
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
        drop(permit);
        let mut pulls = self.pulls.lock().unwrap_or_else(|p| p.into_inner());
        if pulls.get(&uid).is_some_and(|p| p.started == started) {
            pulls.remove(&uid);
        }
    }

    /// True when `v` still asks this machine to carry out the grant of `started`.
    fn wanted(&self, v: &Volume, uid: &str, started: DateTime<Utc>) -> bool {
        v.metadata.uid == uid
            && !v.metadata.is_deleting()
            && v.spec.machine.as_deref() == Some(self.machine.as_str())
            && v.moving()
                .is_some_and(|m| m.to == self.machine && m.started == started)
    }

    async fn pull_once(
        &self,
        name: &str,
        uid: &str,
        started: DateTime<Utc>,
        credential: &str,
    ) -> Result<Outcome, PullError> {
        let Some(v) = self.store.get::<Volume>(name).await? else {
            return Ok(Outcome::NotWanted);
        };
        let here = v.status.as_ref().and_then(|s| s.machine.as_deref()) == Some(&self.machine);
        if here {
            return Ok(Outcome::Done);
        }
        if !self.wanted(&v, uid, started) {
            // A committed move finishes even if spec.machine changed meanwhile.
            let committed = v.moving().is_some_and(|m| {
                m.to == self.machine && m.started == started && m.stage.is_committed()
            });
            if !committed {
                return Ok(Outcome::NotWanted);
            }
        }
        let m = v
            .moving()
            .cloned()
            .ok_or(PullError::Stalled("the move is gone".into()))?;
        let hash = credential_hash(credential);
        if m.credential_sha256.as_deref() != Some(hash.as_str()) {
            self.update_move(name, started, |m, _| {
                m.credential_sha256 = Some(hash.clone());
                true
            })
            .await?;
        }
        let peer = self
            .store
            .get::<Machine>(&m.from)
            .await?
            .and_then(|s| s.status.and_then(|s| s.agent_url))
            .ok_or_else(|| {
                PullError::Stalled(format!("machine {} publishes no agent address", m.from))
            })?;
        match m.stage {
            MoveStage::Seeding | MoveStage::Converging => {
                // Before this grant's cut-over nothing here may be live: a copy left by a
                // crash would be taken for the promoted one at the cut-over.
                self.remove_stale_copy(name, uid).await?;
                if !self.converge(&v, &m, &peer, credential).await? {
                    return Ok(Outcome::NotWanted);
                }
                let Some(v) = self.store.get::<Volume>(name).await? else {
                    return Ok(Outcome::NotWanted);
                };
                self.cut_over(&v, &peer, credential, started).await
            }
            MoveStage::CuttingOver => self.cut_over(&v, &peer, credential, started).await,
            MoveStage::CleaningUp => Ok(Outcome::Done),
        }
    }

    /// Rounds until one sends little, then the stage CuttingOver. False when the move was
    /// cancelled meanwhile.
    async fn converge(
        &self,
        v: &Volume,
        m: &MoveStatus,
        peer: &str,
        credential: &str,
    ) -> Result<bool, PullError> {
        let name = &v.metadata.name;
        let mut rounds = m.rounds;
        loop {
            let parent = self.latest_received(&v.metadata.uid).await?;
            let incremental = parent.is_some();
            let t0 = std::time::Instant::now();
            let (_, bytes) = self
                .round(v, m.started, peer, credential, parent, false)
                .await?;
            rounds += 1;
            // Converged when a round carried little — or took so little time that little can
            // have changed since (the final increment then stays small too).
            let converged = (incremental && bytes < self.config.converged_bytes)
                || t0.elapsed() < QUICK_ROUND
                || rounds >= self.config.max_rounds;
            let spec_here = Some(cobalt_api::Text::new(&self.machine));
            let advanced = self
                .update_move(name, m.started, |mv, vol| {
                    if mv.stage.is_committed() || vol.spec.machine != spec_here {
                        return false;
                    }
                    mv.rounds = rounds;
                    mv.bytes_sent += bytes;
                    mv.bytes_done = 0;
                    mv.bytes_total = None;
                    mv.stalled = None;
                    if converged {
                        mv.stage = MoveStage::CuttingOver;
                        mv.frozen = Some(Utc::now());
                    } else {
                        mv.stage = MoveStage::Converging;
                    }
                    true
                })
                .await?;
            if !advanced {
                return Ok(false);
            }
            tracing::info!(volume = %name, round = rounds, bytes, converged, "move round done");
            if converged {
                return Ok(true);
            }
        }
    }

    /// The final increment, the live volume, the export, and the one write that flips
    /// `status.machine` and `status.endpoint`.
    async fn cut_over(
        &self,
        v: &Volume,
        peer: &str,
        credential: &str,
        started: DateTime<Utc>,
    ) -> Result<Outcome, PullError> {
        let uid = v.metadata.uid.clone();
        let name = v.metadata.name.clone();
        let record = crate::plan::record(v);
        let began = v.moving().and_then(|m| m.frozen).unwrap_or_else(Utc::now);
        let b = self.backend.clone();
        let u = uid.clone();
        let live = tokio::task::spawn_blocking(move || b.get(&u))
            .await
            .map_err(|e| PullError::Stalled(e.to_string()))??;
        // A live copy here was promoted from the final snapshot by an earlier attempt (and may
        // have taken writes since): it is kept as it is.
        if live.is_none() {
            let b = self.backend.clone();
            let u = uid.clone();
            let received = tokio::task::spawn_blocking(move || b.received(&u))
                .await
                .map_err(|e| PullError::Stalled(e.to_string()))??;
            let final_snapshot = match received.iter().rev().find(|n| n.ends_with(FINAL_SUFFIX)) {
                Some(f) => f.clone(),
                None => {
                    let parent = self.latest_received(&uid).await?;
                    self.round(v, started, peer, credential, parent, true)
                        .await?
                        .0
                }
            };
            let b = self.backend.clone();
            let r = record.clone();
            tokio::task::spawn_blocking(move || b.promote(&final_snapshot, &r))
                .await
                .map_err(|e| PullError::Stalled(e.to_string()))??;
        }
        let spec = export_spec(v, self.backend.as_ref());
        let port = self.exports.exporter.port();
        let exported = port != 0 && !spec.clients.is_empty();
        let rules = describe_rules(&spec.clients);
        self.exports
            .set(&name, Some(spec))
            .await
            .map_err(|e| PullError::Stalled(format!("cannot export the volume here: {e}")))?;
        self.published.record(&uid).map_err(|e| {
            PullError::Stalled(format!("cannot record the volume as published: {e}"))
        })?;
        let me = self.machine.clone();
        let address = self.address.clone();
        let update = self
            .store
            .update_status::<Volume, _>(&name, |vol| {
                let mut s = vol.status.clone()?;
                let m = s.move_.as_mut()?;
                if vol.metadata.uid != uid
                    || m.to != me
                    || m.started != started
                    || m.stage != MoveStage::CuttingOver
                    || s.machine.as_deref() != Some(m.from.as_str())
                {
                    return None;
                }
                let now = Utc::now();
                m.stage = MoveStage::CleaningUp;
                m.stalled = None;
                m.cut_over_millis = Some((now - began).num_milliseconds().max(0) as u64);
                let from = m.from.clone();
                let (reason, message) = m.describe();
                s.machine = Some(me.clone().into());
                s.endpoint = exported.then(|| endpoint(&address, port, &name));
                s.phase = VolumePhase::Ready;
                s.usage = Some(Usage {
                    used_bytes: s.usage.as_ref().map_or(0, |u| u.used_bytes),
                    limit_bytes: record.size_bytes,
                    updated: None,
                });
                let g = vol.metadata.generation;
                let mut set = |t: &str, ok: bool, r: &str, msg: &str| {
                    let c = if ok {
                        ConditionStatus::True
                    } else {
                        ConditionStatus::False
                    };
                    set_condition(&mut s.conditions, t, c, r, msg, g, now);
                };
                set("Moving", true, reason, &message);
                set(
                    "Ready",
                    true,
                    "Moved",
                    &format!("moved from machine {from}; served by machine {me}"),
                );
                if exported {
                    set("Exported", true, "Applied", &rules);
                }
                Some(s)
            })
            .await?;
        if update.written.is_none() {
            let now_here = update
                .object
                .status
                .as_ref()
                .and_then(|s| s.machine.as_deref())
                == Some(self.machine.as_str());
            if !now_here {
                return Err(PullError::Stalled(
                    "the cut-over write did not apply (the volume changed); retrying".into(),
                ));
            }
        } else {
            tracing::info!(volume = %name, took_ms = (Utc::now() - began).num_milliseconds(), "cut over: served here now");
        }
        let b = self.backend.clone();
        let _ = tokio::task::spawn_blocking(move || b.discard_received(&uid)).await;
        Ok(Outcome::Done)
    }

    /// Feeds an HTTP body into the backend's receive (staging for `uid`), counting bytes into
    /// `counter`; a body that stalls longer than the idle timeout is an error.
    async fn receive_body(
        &self,
        resp: reqwest::Response,
        uid: &str,
        max_bytes: u64,
        counter: Arc<AtomicU64>,
    ) -> Result<Result<String, BackendError>, tokio::task::JoinError> {
        let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(8);
        let idle = self.config.idle_timeout;
        // Aborted when this future is dropped (a cancelled pull): the receive then sees the
        // stream end early and keeps nothing.
        let feeder = AbortOnDrop(tokio::spawn(async move {
            let mut resp = resp;
            loop {
                let item = match tokio::time::timeout(idle, resp.chunk()).await {
                    Ok(Ok(Some(chunk))) => {
                        counter.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                        Ok(chunk)
                    }
                    Ok(Ok(None)) => return,
                    Ok(Err(e)) => Err(std::io::Error::other(e)),
                    Err(_) => Err(std::io::Error::other(format!(
                        "nothing arrived for {idle:?}"
                    ))),
                };
                let failed = item.is_err();
                if tx.send(item).await.is_err() || failed {
                    return;
                }
            }
        }));
        let b = self.backend.clone();
        let u = uid.to_string();
        // Held by the receive itself, which outlives this future if the pull is cancelled.
        let staging = self.staging_lock(uid).lock_owned().await;
        let result = tokio::task::spawn_blocking(move || {
            let _staging = staging;
            let mut reader = ChannelReader {
                rx,
                current: Bytes::new(),
                pending_error: None,
            };
            b.receive(&u, &mut reader, max_bytes)
        })
        .await;
        drop(feeder);
        result
    }

    /// Seeds the clone `v` (bound here, provisioned nowhere) from a snapshot of its source on
    /// machine `from`: one full stream, received into staging and promoted with `record`.
    pub async fn seed_clone(
        &self,
        v: &Volume,
        from: &str,
        record: &crate::backend::VolumeRecord,
    ) -> Result<(), String> {
        let name = v.metadata.name.clone();
        let uid = v.metadata.uid.clone();
        let credential = new_credential().map_err(|e| e.to_string())?;
        let hash = credential_hash(&credential);
        let me = self.machine.clone();
        let from_ = from.to_string();
        self.store
            .update_status::<Volume, _>(&name, |vol| {
                let mut s = vol.status.clone().unwrap_or_default();
                if vol.metadata.uid != uid
                    || vol.spec.machine.as_deref() != Some(me.as_str())
                    || s.machine.is_some()
                {
                    return None;
                }
                s.clone_seed = Some(Box::new(cobalt_api::CloneSeed {
                    from: from_.clone(),
                    credential_sha256: hash.clone(),
                }));
                Some(s)
            })
            .await
            .map_err(|e| e.to_string())?;
        let peer = self
            .store
            .get::<Machine>(from)
            .await
            .map_err(|e| e.to_string())?
            .and_then(|m| m.status.and_then(|s| s.agent_url))
            .ok_or_else(|| format!("machine {from} publishes no agent address"))?;
        let url = format!("{}/v1/clones/{name}/stream", peer.trim_end_matches('/'));
        let resp = self
            .http
            .get(&url)
            .bearer_auth(&credential)
            .query(&[("uid", uid.as_str())])
            .send()
            .await
            .map_err(|e| format!("cannot reach machine {from} at {url}: {e}"))?;
        if !resp.status().is_success() {
            let code = resp.status();
            let body = resp.text().await.unwrap_or_default();
            return Err(format!("machine {from} answered {code}: {}", body.trim()));
        }
        let max_bytes = record.size_bytes.saturating_mul(2).saturating_add(64 << 20);
        let snapshot = match self
            .receive_body(resp, &uid, max_bytes, Arc::new(AtomicU64::new(0)))
            .await
        {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                return Err(format!(
                    "the stream from machine {from} did not complete: {e}"
                ))
            }
            Err(e) => return Err(e.to_string()),
        };
        let b = self.backend.clone();
        let r = record.clone();
        tokio::task::spawn_blocking(move || {
            b.promote(&snapshot, &r)?;
            b.discard_received(&r.uid)
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
        tracing::info!(volume = %name, %from, "clone seeded from a snapshot of its source on another machine");
        Ok(())
    }

    /// The newest complete snapshot received for `uid` (the parent of the next round).
    async fn latest_received(&self, uid: &str) -> Result<Option<String>, PullError> {
        let b = self.backend.clone();
        let u = uid.to_string();
        let received = tokio::task::spawn_blocking(move || b.received(&u))
            .await
            .map_err(|e| PullError::Stalled(e.to_string()))??;
        Ok(received
            .into_iter()
            .rfind(|n| n.starts_with(SNAPSHOT_PREFIX)))
    }

    /// One stream from the source, received into staging. Returns the snapshot's name and the
    /// bytes it took.
    async fn round(
        &self,
        v: &Volume,
        started: DateTime<Utc>,
        peer: &str,
        credential: &str,
        parent: Option<String>,
        final_: bool,
    ) -> Result<(String, u64), PullError> {
        let name = v.metadata.name.clone();
        let uid = v.metadata.uid.clone();
        let from = v.moving().map(|m| m.from.clone()).unwrap_or_default();
        let mut query = vec![("uid", uid.clone())];
        if let Some(p) = &parent {
            query.push(("parent", p.clone()));
        }
        if final_ {
            query.push(("final", "true".into()));
        }
        let url = format!("{}/v1/moves/{name}/stream", peer.trim_end_matches('/'));
        let resp = self
            .http
            .get(&url)
            .bearer_auth(credential)
            .query(&query)
            .send()
            .await
            .map_err(|e| {
                PullError::Stalled(format!("cannot reach machine {from} at {url}: {e}"))
            })?;
        let code = resp.status();
        if code == reqwest::StatusCode::CONFLICT && parent.is_some() {
            // The source lost the common parent: start over with a full copy.
            let b = self.backend.clone();
            let u = uid.clone();
            let _ = tokio::task::spawn_blocking(move || b.discard_received(&u)).await;
        }
        if !code.is_success() {
            let body = resp.text().await.unwrap_or_default();
            return Err(PullError::Stalled(format!(
                "machine {from} answered {code}: {}",
                body.trim()
            )));
        }
        // The source's estimate if it gave one; for a full stream, the volume's last reported
        // usage (compression may make the stream smaller).
        let estimate = resp
            .headers()
            .get("x-cobalt-estimate")
            .and_then(|h| h.to_str().ok())
            .and_then(|h| h.parse::<u64>().ok())
            .or_else(|| {
                parent.is_none().then(|| {
                    v.status
                        .as_ref()
                        .and_then(|s| s.usage.as_ref())
                        .map_or(0, |u| u.used_bytes)
                })
            })
            .filter(|e| *e > 0);
        let limit = v.granted_size_bytes().max(
            v.status
                .as_ref()
                .and_then(|s| s.usage.as_ref())
                .map_or(0, |u| u.limit_bytes),
        );
        let max_bytes = limit.saturating_mul(2).saturating_add(64 << 20);
        let received = Arc::new(AtomicU64::new(0));
        let _progress = {
            let (name, counter) = (name.clone(), received.clone());
            let store = self.store.clone();
            let me = self.machine.clone();
            AbortOnDrop(tokio::spawn(async move {
                loop {
                    tokio::time::sleep(PROGRESS_EVERY).await;
                    let done = counter.load(Ordering::Relaxed);
                    let _ = write_move(&store, &name, &me, started, |m, _| {
                        if m.stage == MoveStage::CleaningUp {
                            return false;
                        }
                        m.bytes_done = done;
                        m.bytes_total = estimate;
                        m.stalled = None;
                        true
                    })
                    .await;
                }
            }))
        };
        let t0 = Instant::now();
        let result = self
            .receive_body(resp, &uid, max_bytes, received.clone())
            .await;
        drop(_progress);
        let snapshot = match result {
            Ok(Ok(snapshot)) => snapshot,
            Ok(Err(e)) => {
                return Err(PullError::Stalled(format!(
                    "the stream from machine {from} did not complete: {e}"
                )))
            }
            Err(e) => return Err(PullError::Stalled(e.to_string())),
        };
        let bytes = received.load(Ordering::Relaxed);
        tracing::debug!(volume = %name, %snapshot, bytes, took = ?t0.elapsed(), "received");
        Ok((snapshot, bytes))
    }

    /// Writes a change to this grant's `status.move` ([`write_move`]). True when written, or
    /// when the grant is still this machine's.
    async fn update_move(
        &self,
        name: &str,
        started: DateTime<Utc>,
        change: impl Fn(&mut MoveStatus, &Volume) -> bool,
    ) -> Result<bool, PullError> {
        let update = write_move(&self.store, name, &self.machine, started, change).await?;
        Ok(update.written.is_some()
            || update
                .object
                .moving()
                .is_some_and(|m| m.to == self.machine && m.started == started))
    }

    /// At start-up, after one fresh list of the volumes: drops what was received for moves that
    /// no longer target this machine (a move cancelled while this agent was down), and the
    /// snapshots taken to seed clones elsewhere (no stream is in flight in a process that just
    /// started; one cut by a crash left its snapshot behind).
    pub async fn sweep_staging(&self) {
        let Ok((all, _)) = self.store.list::<Volume>(&Default::default()).await else {
            return;
        };
        for v in all
            .iter()
            .filter(|v| v.status.as_ref().and_then(|s| s.machine.as_deref()) == Some(&self.machine))
        {
            let b = self.backend.clone();
            let uid = v.metadata.uid.clone();
            let _ = tokio::task::spawn_blocking(move || {
                for s in b.snapshots(&uid)? {
                    if s.starts_with(CLONE_SNAPSHOT_PREFIX) {
                        b.delete_snapshot(&uid, &s)?;
                    }
                }
                Ok::<_, BackendError>(())
            })
            .await;
        }
        let b = self.backend.clone();
        let staged = match tokio::task::spawn_blocking(move || b.staged()).await {
            Ok(Ok(s)) => s,
            _ => return,
        };
        for uid in staged {
            let wanted = all.iter().any(|v| {
                v.metadata.uid == uid
                    && !v.metadata.is_deleting()
                    && v.status.as_ref().and_then(|s| s.machine.as_deref()) != Some(&self.machine)
                    && v.moving().is_some_and(|m| m.to == self.machine)
            });
            if !wanted {
                let b = self.backend.clone();
                let u = uid.clone();
                if let Ok(Ok(())) =
                    tokio::task::spawn_blocking(move || b.discard_received(&u)).await
                {
                    tracing::info!(%uid, "discarded what was received for a move no longer here");
                }
            }
        }
    }

    /// Destroys the stale copies on this machine among `volumes` ([`crate::plan::stale_here`]),
    /// each only after a fresh read agrees. Run at start-up and now and then: a stale copy can
    /// only appear while this agent was down, but it may come back to a cluster that already
    /// moved on.
    pub async fn sweep_stale_copies(&self, volumes: &[Arc<Volume>]) {
        let b = self.backend.clone();
        let on_disk = match tokio::task::spawn_blocking(move || b.list()).await {
            Ok(Ok(records)) => records,
            _ => return,
        };
        let by_uid: std::collections::HashMap<&str, &Arc<Volume>> = volumes
            .iter()
            .map(|v| (v.metadata.uid.as_str(), v))
            .collect();
        for r in on_disk {
            // A copy of a volume not in this agent's view (it concerns other machines only) is
            // stale if its volume still exists: `remove_stale_copy` reads it by the name the copy
            // was made for and checks the uid. No Volume at all: an orphan, reported in the
            // Machine's status and kept.
            let name = match by_uid.get(r.uid.as_str()) {
                Some(v) if crate::plan::stale_here(v, &self.machine) => v.metadata.name.clone(),
                Some(_) => continue,
                None => r.name.clone().into(),
            };
            if let Err(e) = self.remove_stale_copy(&name, &r.uid).await {
                tracing::warn!(volume = %name, error = %e, "a stale copy is kept for now");
            }
        }
    }

    /// Destroys this machine's copy of volume `name` (uid `uid`) if it is stale in a
    /// linearizable read of the volume. True when a copy was destroyed. A copy with snapshots
    /// other than a move's or a clone seed's is kept and reported: those were taken of data
    /// this machine once served.
    async fn remove_stale_copy(&self, name: &str, uid: &str) -> Result<bool, PullError> {
        let b = self.backend.clone();
        let u = uid.to_string();
        let present = tokio::task::spawn_blocking(move || b.get(&u))
            .await
            .map_err(|e| PullError::Stalled(e.to_string()))??;
        if present.is_none() {
            return Ok(false);
        }
        let Some(fresh) = self.store.get::<Volume>(name).await? else {
            return Ok(false);
        };
        if fresh.metadata.uid != uid || !crate::plan::stale_here(&fresh, &self.machine) {
            return Ok(false);
        }
        let held_by = fresh
            .status
            .as_ref()
            .and_then(|s| s.machine.clone())
            .unwrap_or_default();
        if self.published.contains(uid) {
            // etcd says another machine serves it, but this machine once did: etcd may have
            // been restored from an old backup. A person decides.
            return Err(PullError::Stalled(format!(
                "machine {} holds a copy of this volume that it once served, while etcd says machine {held_by} serves it; the copy is kept — if it is not wanted, remove it by hand (uid {uid})",
                self.machine
            )));
        }
        // No receive for this uid runs meanwhile (destroying clears its staging too).
        let _staging = self.staging_lock(uid).lock_owned().await;
        if self.backend.can(cobalt_api::Capability::Snapshot) {
            let b = self.backend.clone();
            let u = uid.to_string();
            let kept: Vec<String> = tokio::task::spawn_blocking(move || b.snapshots(&u))
                .await
                .map_err(|e| PullError::Stalled(e.to_string()))??
                .into_iter()
                .filter(|s| {
                    !s.starts_with(SNAPSHOT_PREFIX) && !s.starts_with(CLONE_SNAPSHOT_PREFIX)
                })
                .collect();
            if !kept.is_empty() {
                return Err(PullError::Stalled(format!(
                    "the stale copy here has snapshots ({}); it is kept",
                    kept.join(", ")
                )));
            }
        }
        self.exports
            .set(name, None)
            .await
            .map_err(|e| PullError::Stalled(format!("cannot unexport the stale copy: {e}")))?;
        let b = self.backend.clone();
        let u = uid.to_string();
        tokio::task::spawn_blocking(move || b.destroy(&u))
            .await
            .map_err(|e| PullError::Stalled(e.to_string()))??;
        tracing::warn!(volume = %name, %uid, %held_by, "destroyed a stale copy: the volume's data is served by another machine and this copy was never published");
        Ok(true)
    }

    /// Drops what was received for a move that no longer targets this machine, or that has
    /// finished here — after a fresh read confirms it (staging only; a live volume is never
    /// touched here).
    async fn discard_if_unwanted(&self, name: &str, uid: &str) {
        let mut finished_here = false;
        let still = match self.store.get::<Volume>(name).await {
            Ok(Some(v)) => {
                finished_here = v.metadata.uid == uid
                    && v.status.as_ref().and_then(|s| s.machine.as_deref()) == Some(&self.machine);
                v.metadata.uid == uid
                    && !finished_here
                    && v.moving()
                        .is_some_and(|m| m.to == self.machine && !v.metadata.is_deleting())
            }
            Ok(None) => false,
            Err(e) => {
                tracing::warn!(volume = %name, error = %e, "cannot confirm the move was dropped; keeping what was received");
                return;
            }
        };
        if still {
            return;
        }
        // After a receive still running for a cancelled pull has finished.
        let staging = self.staging_lock(uid).lock_owned().await;
        let b = self.backend.clone();
        let u = uid.to_string();
        match tokio::task::spawn_blocking(move || {
            let _staging = staging;
            b.discard_received(&u)
        })
        .await
        {
            Ok(Ok(())) if finished_here => {
                tracing::debug!(volume = %name, "the finished move's staging is cleared")
            }
            Ok(Ok(())) => {
                tracing::info!(volume = %name, "move dropped: discarded what was received")
            }
            Ok(Err(e)) => {
                tracing::warn!(volume = %name, error = %e, "discarding a dropped move's data")
            }
            Err(_) => {}
        }
    }
}

/// Writes a change to the `status.move` of the grant `started` to machine `me` (and the Moving
/// condition and phase that follow from it); `change` returns false to write nothing.
async fn write_move(
    store: &cobalt_store::Store,
    name: &str,
    me: &str,
    started: DateTime<Utc>,
    change: impl Fn(&mut MoveStatus, &Volume) -> bool,
) -> Result<cobalt_store::StatusUpdate<Volume>, cobalt_store::Error> {
    store
        .update_status::<Volume, _>(name, |vol| {
            let mut s = vol.status.clone()?;
            let m = s.move_.as_mut()?;
            if m.to != me || m.started != started || !change(m, vol) {
                return None;
            }
            let (reason, message) = m.describe();
            if m.stage < MoveStage::CleaningUp {
                s.phase = VolumePhase::Moving;
            }
            set_condition(
                &mut s.conditions,
                "Moving",
                ConditionStatus::True,
                reason,
                &message,
                vol.metadata.generation,
                Utc::now(),
            );
            Some(s)
        })
        .await
}

/// Aborts a spawned task when dropped, so helpers never outlive the pull that started them.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A blocking `Read` over chunks sent from an async task.
struct ChannelReader {
    rx: tokio::sync::mpsc::Receiver<std::io::Result<Bytes>>,
    current: Bytes,
    pending_error: Option<std::io::Error>,
}

impl Read for ChannelReader {
    /// Waits for one chunk, then takes whatever else has already arrived, so the receiver gets
    /// large writes (HTTP chunks are small) without waiting longer.
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if let Some(e) = self.pending_error.take() {
            return Err(e);
        }
        while self.current.is_empty() {
            match self.rx.blocking_recv() {
                Some(Ok(chunk)) => self.current = chunk,
                Some(Err(e)) => return Err(e),
                None => return Ok(0),
            }
        }
        let mut n = 0;
        loop {
            let take = (buf.len() - n).min(self.current.len());
            buf[n..n + take].copy_from_slice(&self.current[..take]);
            self.current = self.current.slice(take..);
            n += take;
            if n == buf.len() || !self.current.is_empty() {
                return Ok(n);
            }
            match self.rx.try_recv() {
                Ok(Ok(chunk)) => self.current = chunk,
                // An error or the end is reported by the next call.
                Ok(Err(e)) => {
                    self.pending_error = Some(e);
                    return Ok(n);
                }
                Err(_) => return Ok(n),
            }
        }
    }
}
