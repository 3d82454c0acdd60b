//! The resource routes: list/watch, create, get, replace, delete, and the status subresource.
//! Every etcd round trip of a request shares one deadline, so an unreachable etcd answers 503
//! within it (DESIGN.md: "within 2 s").

use std::future::Future;

use axum::body::Bytes;
use axum::extract::{Extension, Path, State};

use super::query::Query;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use cobalt_api::event::{FieldSelector, OBJECT_FIELDS};
use cobalt_api::selector::LabelSelector;
use cobalt_api::{Claim, Machine, Snapshot, Volume, API_VERSION};
use cobalt_store::{Deleted, StatusPrecondition};
use serde::Deserialize;
use serde_json::json;

use super::kinds::{decode_body, field_error, ApiKind};
use super::scope::{self, Caller, Concerns};
use super::status::ApiError;
use super::AppState;

/// Query parameters of the resource routes.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Params {
    #[serde(default)]
    pub watch: Option<String>,
    pub resource_version: Option<String>,
    pub label_selector: Option<String>,
    /// `metadata.name=NAME` (what `kubectl wait` and `kubectl delete --wait` send).
    pub field_selector: Option<String>,
    pub dry_run: Option<String>,
    pub timeout_seconds: Option<u64>,
    /// With watch (client-go's "watch list"): end the initial ADDED events with a BOOKMARK
    /// annotated `k8s.io/initial-events-end: "true"`.
    pub send_initial_events: Option<bool>,
    /// kubectl's; Cobalt is always Strict, but the value must be one kubectl knows.
    pub field_validation: Option<String>,
    /// kubectl's; accepted and ignored (read only so that a repeated one is refused).
    pub field_manager: Option<String>,
}

impl Params {
    /// `watch=true|1|` (or `false|0`); anything else is a 400 naming the parameter.
    pub fn is_watch(&self) -> Result<bool, ApiError> {
        match self.watch.as_deref() {
            None | Some("false" | "0" | "False" | "FALSE") => Ok(false),
            Some("true" | "1" | "" | "True" | "TRUE") => Ok(true),
            Some(other) => Err(ApiError::bad_request(format!(
                "query parameters: watch={other:?} is not a boolean; use watch=true or watch=false"
            ))),
        }
    }

    /// The write options every writing route takes: whether `dryRun=All` was asked for, after
    /// checking `fieldValidation` is one of `Strict`, `Warn`, `Ignore` (Cobalt is always Strict).
    fn dry_run(&self) -> Result<bool, ApiError> {
        if let Some(v) = self.field_validation.as_deref() {
            if !matches!(v, "Strict" | "Warn" | "Ignore") {
                return Err(ApiError::bad_request(format!(
                    "query parameters: fieldValidation={v:?} is not supported; use Strict, Warn or Ignore"
                )));
            }
        }
        match self.dry_run.as_deref() {
            None => Ok(false),
            Some("All") => Ok(true),
            Some(other) => Err(ApiError::bad_request(format!(
                "dryRun={other:?} is not supported; use dryRun=All"
            ))),
        }
    }

    pub fn fields(&self) -> Result<FieldSelector, ApiError> {
        FieldSelector::parse(self.field_selector.as_deref().unwrap_or(""), OBJECT_FIELDS)
            .map_err(ApiError::bad_request)
    }

    pub fn selector(&self) -> Result<LabelSelector, ApiError> {
        self.label_selector
            .as_deref()
            .unwrap_or("")
            .parse()
            .map_err(|e: cobalt_api::selector::SelectorError| ApiError::bad_request(e.to_string()))
    }
}

/// Calls the generic handler for the kind named by the path's plural.
macro_rules! by_kind {
    ($plural:expr, $f:ident ( $($arg:expr),* )) => {
        match $plural.as_str() {
            "volumes" => $f::<Volume>($($arg),*).await,
            "machines" => $f::<Machine>($($arg),*).await,
            "snapshots" => $f::<Snapshot>($($arg),*).await,
            "claims" => $f::<Claim>($($arg),*).await,
            other => Err(ApiError::not_found(format!(
                "the API has no resource {other:?}; it serves volumes, machines, snapshots and claims"
            ))),
        }
    };
}

/// 404 for `name` of kind `R`.
fn not_found<R: ApiKind>(name: &str) -> ApiError {
    cobalt_store::Error::NotFound {
        kind: R::KIND,
        name: name.into(),
    }
    .into()
}

/// Runs the etcd part of a request under the API deadline.
pub(crate) async fn bounded<T>(
    state: &AppState,
    fut: impl Future<Output = Result<T, cobalt_store::Error>>,
) -> Result<T, ApiError> {
    match tokio::time::timeout(state.deadline, fut).await {
        Ok(r) => r.map_err(ApiError::from),
        Err(_) => Err(ApiError::unavailable(format!(
            "etcd did not answer within {:?}; the API will recover by itself when etcd is reachable",
            state.deadline
        ))),
    }
}

pub async fn collection_get(
    State(s): State<AppState>,
    Path(plural): Path<String>,
    Query(p): Query<Params>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    if p.is_watch()? {
        return by_kind!(plural, watch_kind(s, p, &headers));
    }
    by_kind!(plural, list_kind(s, p, &headers))
}

async fn list_kind<R: ApiKind>(
    s: AppState,
    p: Params,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    let selector = p.selector()?;
    let fields = p.fields()?;
    let (mut items, revision) = bounded(&s, s.store.list::<R>(&selector)).await?;
    items.retain(|o| fields.matches_object(o.name()));
    if super::table::wanted(headers) {
        let refs: Vec<&R> = items.iter().collect();
        return Ok(Json(super::table::table(&refs, Some(revision), true)).into_response());
    }
    Ok(Json(ListBody {
        api_version: API_VERSION,
        kind: R::LIST_KIND,
        metadata: ListMeta {
            resource_version: revision.to_string(),
        },
        items: &items,
    })
    .into_response())
}

/// A list as the API answers it (`VolumeList`, …), written straight from the objects: a large
/// list is tens of megabytes, and a generic JSON copy of it first cost as much as the writing.
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct ListBody<'a, R> {
    api_version: &'static str,
    kind: &'static str,
    metadata: ListMeta,
    items: &'a [R],
}

#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct ListMeta {
    resource_version: String,
}

async fn watch_kind<R: ApiKind>(
    s: AppState,
    p: Params,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    super::watch::serve::<R>(s, p, headers).await
}

pub async fn create(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(plural): Path<String>,
    Query(p): Query<Params>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    by_kind!(plural, create_kind(s, &caller, p, &headers, &body))
}

async fn create_kind<R: ApiKind>(
    s: AppState,
    caller: &Caller,
    p: Params,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Response, ApiError> {
    let dry_run = p.dry_run()?;
    let mut object: R = decode_body(headers, body)?;
    if let Some(machine) = caller.machine() {
        scope::create(machine, &object).map_err(forbidden)?;
    }
    *object.status_mut() = None;
    object.prepare_create();
    if let Some((volume, field)) = object.requires_volume() {
        let found = bounded(&s, s.store.get::<Volume>(volume)).await?;
        let problem = match found {
            None => Some(format!("volume {volume:?} does not exist")),
            Some(v) if v.metadata.is_deleting() => {
                Some(format!("volume {volume:?} is being deleted"))
            }
            Some(_) => None,
        };
        if let Some(problem) = problem {
            return Err(field_error::<R>(object.name(), field, &problem));
        }
    }
    if dry_run {
        if bounded(&s, s.store.get::<R>(object.name()))
            .await?
            .is_some()
        {
            return Err(cobalt_store::Error::AlreadyExists {
                kind: R::KIND,
                name: object.name().into(),
            }
            .into());
        }
        let m = object.meta_mut();
        m.generation = 1;
        m.resource_version.clear();
        m.uid.clear();
        // As Kubernetes answers a dry-run create: 201, the object as it would be stored.
        return Ok((StatusCode::CREATED, Json(object)).into_response());
    }
    let created = bounded(&s, s.store.create(&object)).await?;
    Ok((StatusCode::CREATED, Json(created)).into_response())
}

pub async fn get(
    State(s): State<AppState>,
    Path((plural, name)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let table = super::table::wanted(&headers);
    by_kind!(plural, get_kind(s, &name, table))
}

async fn get_kind<R: ApiKind>(s: AppState, name: &str, table: bool) -> Result<Response, ApiError> {
    let object = bounded(&s, s.store.get::<R>(name))
        .await?
        .ok_or_else(|| not_found::<R>(name))?;
    if table {
        return Ok(Json(super::table::table(&[&object], None, true)).into_response());
    }
    Ok(Json(object).into_response())
}

/// `PATCH`: a JSON merge patch (RFC 7386, `application/merge-patch+json`) of the object, what
/// `kubectl apply` and `kubectl patch --type=merge` send for kinds kubectl has no Go types for.
/// Applied to the stored object, then checked like a replace; retried on a concurrent change
/// (at most [`PATCH_ATTEMPTS`] times) unless the patch names a `resourceVersion`, which is then
/// a precondition. `status` cannot be patched here (it is the agents' and scheduler's).
pub async fn patch(
    State(s): State<AppState>,
    Path((plural, name)): Path<(String, String)>,
    Query(p): Query<Params>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let content_type = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !content_type.starts_with("application/merge-patch+json") {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "UnsupportedMediaType",
            format!(
                "patch type {content_type:?} is not supported: Cobalt takes JSON merge patches (Content-Type: application/merge-patch+json; kubectl patch --type=merge)"
            ),
        ));
    }
    let patch: serde_json::Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("malformed JSON: {e}")))?;
    if !patch.is_object() {
        return Err(ApiError::bad_request("a merge patch must be a JSON object"));
    }
    by_kind!(plural, patch_kind(s, &name, p, &patch))
}

/// How many times a patch is re-applied when the object changed under it.
pub const PATCH_ATTEMPTS: usize = 5;

async fn patch_kind<R: ApiKind>(
    s: AppState,
    name: &str,
    p: Params,
    patch: &serde_json::Value,
) -> Result<Response, ApiError> {
    let dry_run = p.dry_run()?;
    let precondition = patch
        .pointer("/metadata/resourceVersion")
        .and_then(serde_json::Value::as_str)
        .map(str::to_string);
    let mut patch = patch.clone();
    if let Some(o) = patch.as_object_mut() {
        o.remove("status");
    }
    for _ in 0..PATCH_ATTEMPTS {
        let current = bounded(&s, s.store.get_stored::<R>(name))
            .await?
            .ok_or_else(|| not_found::<R>(name))?;
        let revision = current.object_mod_revision.to_string();
        if let Some(rv) = &precondition {
            if *rv != revision {
                return Err(cobalt_store::Error::Conflict {
                    kind: R::KIND,
                    name: name.into(),
                    sent: rv.clone(),
                }
                .into());
            }
        }
        let mut target = serde_json::to_value(&current.object)
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
        if let Some(o) = target.as_object_mut() {
            o.remove("status");
        }
        cobalt_api::manifest::merge_patch(&mut target, &patch);
        if let Some(m) = target.get_mut("metadata").and_then(|m| m.as_object_mut()) {
            m.insert("resourceVersion".into(), json!(revision));
        }
        let object: R = cobalt_api::manifest::from_value(target)
            .map_err(|cause| ApiError::invalid(R::KIND, name, vec![cause]))?;
        if object.name() != name {
            return Err(field_error::<R>(name, "metadata.name", "cannot be changed"));
        }
        object
            .validate()
            .map_err(|e| ApiError::invalid(R::KIND, name, e.0))?;
        object
            .validate_update(&current.object)
            .map_err(|e| ApiError::invalid(R::KIND, name, e.0))?;
        if dry_run {
            return Ok(Json(object).into_response());
        }
        match bounded(&s, s.store.replace(&object)).await {
            Ok(replaced) => return Ok(Json(replaced).into_response()),
            Err(e) if e.status().code == 409 && precondition.is_none() => continue,
            Err(e) => return Err(e),
        }
    }
    Err(ApiError::new(
        StatusCode::CONFLICT,
        "Conflict",
        format!("{} {name} kept changing while the patch was applied ({PATCH_ATTEMPTS} attempts); try again", R::KIND),
    ))
}

pub async fn replace(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path((plural, name)): Path<(String, String)>,
    Query(p): Query<Params>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    by_kind!(plural, replace_kind(s, &caller, &name, p, &headers, &body))
}

async fn replace_kind<R: ApiKind>(
    s: AppState,
    caller: &Caller,
    name: &str,
    p: Params,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Response, ApiError> {
    let dry_run = p.dry_run()?;
    let object: R = decode_body(headers, body)?;
    if object.name() != name {
        return Err(field_error::<R>(
            name,
            "metadata.name",
            &format!("{:?} does not match the URL's {name:?}", object.name()),
        ));
    }
    if object.meta().resource_version.is_empty() {
        return Err(field_error::<R>(
            name,
            "metadata.resourceVersion",
            "is required: send the resourceVersion you read, so a concurrent change is not overwritten",
        ));
    }
    // Read the stored object to check what may not change; the replace itself is still guarded
    // by the resourceVersion, so a change between this read and the write is a 409.
    let current = bounded(&s, s.store.get_stored::<R>(name))
        .await?
        .ok_or_else(|| not_found::<R>(name))?;
    if current.object_mod_revision.to_string() != object.meta().resource_version {
        return Err(cobalt_store::Error::Conflict {
            kind: R::KIND,
            name: name.into(),
            sent: object.meta().resource_version.to_string(),
        }
        .into());
    }
    if let Some(machine) = caller.machine() {
        let concerned = concerns(&s, machine, &current.object).await?;
        scope::replace(machine, &current.object, &object, concerned).map_err(forbidden)?;
    }
    object
        .validate_update(&current.object)
        .map_err(|e| ApiError::invalid(R::KIND, name, e.0))?;
    if dry_run {
        return Ok(Json(object).into_response());
    }
    let replaced = bounded(&s, s.store.replace(&object)).await?;
    Ok(Json(replaced).into_response())
}

pub async fn delete(
    State(s): State<AppState>,
    Path((plural, name)): Path<(String, String)>,
    Query(p): Query<Params>,
) -> Result<Response, ApiError> {
    by_kind!(plural, delete_kind(s, &name, p))
}

async fn delete_kind<R: ApiKind>(s: AppState, name: &str, p: Params) -> Result<Response, ApiError> {
    if R::KIND == "Machine" {
        refuse_deleting_a_machine_with_volumes(&s, name).await?;
    }
    if R::KIND == "Volume" {
        refuse_deleting_a_volume_with_snapshots(&s, name).await?;
    }
    if p.dry_run()? {
        let object = bounded(&s, s.store.get::<R>(name))
            .await?
            .ok_or_else(|| not_found::<R>(name))?;
        return Ok(Json(object).into_response());
    }
    match bounded(&s, s.store.delete::<R>(name, p.resource_version.as_deref())).await? {
        Deleted::Gone(object) => Ok((StatusCode::OK, Json(object)).into_response()),
        // Finalizers remain: accepted, the object goes when they are done.
        Deleted::Pending(object) => Ok((StatusCode::ACCEPTED, Json(object)).into_response()),
    }
}

/// A Machine that still holds volumes (or is the target of a move) cannot be deleted: 409
/// naming them. Drain it first; once it is empty it can go.
async fn refuse_deleting_a_machine_with_volumes(s: &AppState, name: &str) -> Result<(), ApiError> {
    let (volumes, _) = bounded(s, s.store.list::<cobalt_api::Volume>(&Default::default())).await?;
    let mut held: Vec<&str> = volumes
        .iter()
        .filter(|v| {
            v.ledger_machines().any(|m| m == name) || v.spec.machine.as_deref() == Some(name)
        })
        .map(|v| v.metadata.name.as_str())
        .collect();
    if held.is_empty() {
        return Ok(());
    }
    held.sort();
    Err(ApiError::new(
        StatusCode::CONFLICT,
        "Conflict",
        format!(
            "machine {name} holds {} volume{}: {}; drain it first (cobaltctl drain {name} --wait)",
            held.len(),
            if held.len() == 1 { "" } else { "s" },
            list_some(&held),
        ),
    ))
}

/// A Volume with Snapshots cannot be deleted: 409 naming them (its data would take theirs with
/// it). Delete the snapshots first (`cobaltctl delete volume/NAME --with-snapshots`).
async fn refuse_deleting_a_volume_with_snapshots(s: &AppState, name: &str) -> Result<(), ApiError> {
    let Some(volume) = bounded(s, s.store.get::<Volume>(name)).await? else {
        return Ok(());
    };
    // Every Snapshot, not only those labelled with the volume: a label can be edited.
    let (snapshots, _) = bounded(s, s.store.list::<Snapshot>(&Default::default())).await?;
    let mut held: Vec<&str> = snapshots
        .iter()
        .filter(|x| x.belongs_to(name, &volume.metadata.uid))
        .map(|x| x.metadata.name.as_str())
        .collect();
    if held.is_empty() {
        return Ok(());
    }
    held.sort();
    Err(ApiError::new(
        StatusCode::CONFLICT,
        "Conflict",
        format!(
            "volume {name} has {} snapshot{}: {}; delete them first (cobaltctl delete volume/{name} --with-snapshots deletes both)",
            held.len(),
            if held.len() == 1 { "" } else { "s" },
            list_some(&held),
        ),
    ))
}

/// Up to 20 names joined, with a count of the rest.
fn list_some(names: &[&str]) -> String {
    let shown = names
        .iter()
        .take(20)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > 20 {
        format!("{shown} and {} more", names.len() - 20)
    } else {
        shown
    }
}

#[derive(Debug, serde::Deserialize)]
pub struct DrainPlanQuery {
    #[serde(default)]
    pub pinned: bool,
}

/// `GET machines/NAME/drainplan[?pinned=true]`: where a drain of the machine would move each of
/// its volumes now (the planner with no concurrency bound), and what would block it. Changes
/// nothing.
/// `PUT claims/NAME/hold`: renews a held claim (`spec.holdSeconds`) — keeps its etcd lease
/// alive, or starts a new one — and answers the claim. `cobaltctl claim --hold` calls this every
/// third of the hold time; when the calls stop, the lease expires and the claim is released.
pub async fn hold(
    State(s): State<AppState>,
    Path((plural, name)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    if plural != "claims" {
        return Err(ApiError::not_found("hold exists for claims only"));
    }
    let Some(claim) = bounded(&s, s.store.get::<Claim>(&name)).await? else {
        return Err(not_found::<Claim>(&name));
    };
    let Some(secs) = claim.spec.hold_seconds else {
        return Err(ApiError::invalid(
            "Claim",
            &name,
            vec![cobalt_api::FieldError {
                field: "spec.holdSeconds".into(),
                message: "is not set: only a held claim can be renewed".into(),
            }],
        ));
    };
    bounded(
        &s,
        s.store
            .hold_claim(&name, std::time::Duration::from_secs(secs.into())),
    )
    .await?;
    Ok(axum::Json(claim).into_response())
}

pub async fn drain_plan(
    State(s): State<AppState>,
    Path((plural, name)): Path<(String, String)>,
    Query(q): Query<DrainPlanQuery>,
) -> Result<Response, ApiError> {
    use crate::scheduler::rebalance::{plan, DrainView, Policy};
    use std::sync::Arc;
    if plural != "machines" {
        return Err(ApiError::not_found("drainplan exists for machines only"));
    }
    let (machines, _) =
        bounded(&s, s.store.list::<cobalt_api::Machine>(&Default::default())).await?;
    if !machines.iter().any(|m| m.metadata.name == name) {
        return Err(not_found::<cobalt_api::Machine>(&name));
    }
    let (volumes, _) = bounded(&s, s.store.list::<cobalt_api::Volume>(&Default::default())).await?;
    let alive = bounded(&s, s.store.alive_machines()).await?;
    let machines: Vec<Arc<cobalt_api::Machine>> = machines.into_iter().map(Arc::new).collect();
    let volumes: Vec<Arc<cobalt_api::Volume>> = volumes.into_iter().map(Arc::new).collect();
    let alive = Arc::new(std::sync::RwLock::new(alive));
    let policy = Policy {
        enabled: false,
        max_out: usize::MAX,
        max_in: usize::MAX,
        max_moves: usize::MAX,
        max_bytes: u64::MAX,
        ..Policy::default()
    };
    let views: Vec<_> = volumes
        .iter()
        .filter_map(|v| crate::scheduler::balancer::volume_view(v, &policy))
        .collect();
    let p = plan(
        &crate::scheduler::binding::machine_views(&machines, &alive, &volumes),
        &views,
        &[DrainView {
            machine: name.clone(),
            pinned_too: q.pinned,
        }],
        &policy,
    );
    let d = p.drains.first();
    Ok(Json(serde_json::json!({
        "machine": name,
        "left": d.map_or(0, |d| d.left),
        "moves": p.proposals.iter().map(|x| serde_json::json!({
            "volume": x.volume, "from": x.from, "to": x.to, "bytes": x.bytes,
        })).collect::<Vec<_>>(),
        "blocked": d.map(|d| d.blocked.iter().map(|(v, why)| serde_json::json!({
            "volume": v, "reason": why,
        })).collect::<Vec<_>>()).unwrap_or_default(),
    }))
    .into_response())
}

pub async fn get_status(
    State(s): State<AppState>,
    Path((plural, name)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    by_kind!(plural, get_kind(s, &name, false))
}

pub async fn replace_status(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path((plural, name)): Path<(String, String)>,
    Query(p): Query<Params>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    by_kind!(
        plural,
        replace_status_kind(s, &caller, &name, p, &headers, &body)
    )
}

async fn replace_status_kind<R: ApiKind>(
    s: AppState,
    caller: &Caller,
    name: &str,
    p: Params,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Response, ApiError> {
    let dry_run = p.dry_run()?;
    let object: R = decode_body(headers, body)?;
    if object.name() != name {
        return Err(field_error::<R>(
            name,
            "metadata.name",
            "does not match the URL",
        ));
    }
    let Some(status) = object.status().cloned() else {
        return Err(field_error::<R>(
            name,
            "status",
            "is required on the status subresource",
        ));
    };
    // A write sent with the revisions its sender read (as an agent's store sends it) is made
    // only if they are still current: 409 otherwise, and the sender reads again.
    let expect = match headers.get(StatusPrecondition::HEADER) {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(StatusPrecondition::parse)
                .ok_or_else(|| {
                    ApiError::bad_request(format!(
                        "header {} must be <object create revision>/<status mod revision>",
                        StatusPrecondition::HEADER
                    ))
                })?,
        ),
    };
    // A machine token is checked inside the write, against the object the write reads (so a
    // status is never written past a change that ended the machine's concern). A Snapshot's
    // concern goes through its volume, read first; a dry run is checked against a read.
    let machine = caller.machine();
    let volume_concerned = match machine {
        Some(machine) if dry_run || R::KIND == <Snapshot as cobalt_api::Resource>::KIND => {
            let stored = bounded(&s, s.store.get::<R>(name))
                .await?
                .ok_or_else(|| not_found::<R>(name))?;
            let concerned = concerns(&s, machine, &stored).await?;
            machine_may_write_status(machine, &stored, &status, concerned).map_err(forbidden)?;
            concerned
        }
        _ => false,
    };
    if dry_run {
        return Ok(Json(object).into_response());
    }
    let mut refused = None;
    let change = |current: &R| {
        if let Some(machine) = machine {
            if let Err(why) = machine_may_write_status(machine, current, &status, volume_concerned)
            {
                refused = Some(why);
                return None;
            }
        }
        Some(status.clone())
    };
    let update = match expect {
        Some(expect) => bounded(&s, s.store.update_status_if::<R, _>(name, expect, change)).await?,
        None => bounded(&s, s.store.update_status::<R, _>(name, change)).await?,
    };
    if let Some(why) = refused {
        return Err(forbidden(why));
    }
    let mut response = Json(update.object).into_response();
    if let Some(written) = update.written {
        response.headers_mut().insert(
            StatusPrecondition::WRITTEN_HEADER,
            axum::http::HeaderValue::from(written),
        );
    }
    Ok(response)
}

/// Whether `machine` may write `status` on `current`; `volume_concerned` is what
/// [`concerns`] found (for a Snapshot, through its volume).
fn machine_may_write_status<R: ApiKind>(
    machine: &str,
    current: &R,
    status: &R::Status,
    volume_concerned: bool,
) -> Result<(), String> {
    let concerned = match current.concerns() {
        Concerns::Machines(m) => m.contains(machine),
        Concerns::VolumeOf { held_by, .. } => volume_concerned || held_by == Some(machine),
        Concerns::Nobody => false,
    };
    scope::status(machine, current, concerned)?;
    current.machine_status(machine, status)
}

/// 403 with the reason a machine token may not do something.
fn forbidden(why: String) -> ApiError {
    ApiError::new(StatusCode::FORBIDDEN, "Forbidden", why)
}

/// Whether `object` concerns `machine` (for a Snapshot, through its volume, read here).
async fn concerns<R: ApiKind>(s: &AppState, machine: &str, object: &R) -> Result<bool, ApiError> {
    Ok(match object.concerns() {
        Concerns::Nobody => false,
        Concerns::Machines(m) => m.contains(machine),
        Concerns::VolumeOf { volume, held_by } => {
            held_by == Some(machine)
                || bounded(s, s.store.get::<Volume>(volume))
                    .await?
                    .is_some_and(|v| v.concerned_machines().contains(machine))
        }
    })
}
