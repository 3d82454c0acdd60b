//! The kinds the API serves, and how a request body becomes a valid object.

use axum::http::HeaderMap;
use cobalt_api::validate::{
    validate_claim, validate_claim_update, validate_machine, validate_snapshot,
    validate_snapshot_update, validate_volume, validate_volume_update, ValidationErrors,
};
use cobalt_api::{Claim, FieldError, Machine, Resource, Snapshot, Volume};
use serde_json::Value;

use super::scope::Concerns;
use super::status::ApiError;

/// A kind served under `/apis/cobalt.io/v1alpha1/<plural>`.
pub trait ApiKind: Resource + schemars::JsonSchema {
    /// `VolumeList`, `MachineList`.
    const LIST_KIND: &'static str;
    fn validate(&self) -> Result<(), ValidationErrors>;
    /// Checks a replace of `old` by `self` (fields fixed at creation).
    fn validate_update(&self, _old: &Self) -> Result<(), ValidationErrors> {
        Ok(())
    }
    /// Fills in what the server derives on create (a Snapshot's `cobalt.io/volume` label).
    fn prepare_create(&mut self) {}
    /// A Volume that must exist (and not be deleting) for a create to be accepted, with the
    /// field naming it.
    fn requires_volume(&self) -> Option<(&str, &'static str)> {
        None
    }
    /// Which machines' tokens may write this object's status and the agent's finalizer.
    fn concerns(&self) -> Concerns<'_> {
        Concerns::Nobody
    }
    /// Further rules on a status written by a machine token (see [`super::scope`]).
    fn machine_status(&self, _machine: &str, _new: &Self::Status) -> Result<(), String> {
        Ok(())
    }
}

impl ApiKind for Volume {
    const LIST_KIND: &'static str = "VolumeList";
    fn validate(&self) -> Result<(), ValidationErrors> {
        validate_volume(self)
    }
    fn validate_update(&self, old: &Self) -> Result<(), ValidationErrors> {
        validate_volume_update(old, self)
    }
    fn concerns(&self) -> Concerns<'_> {
        Concerns::Machines(self.concerned_machines())
    }
    fn machine_status(&self, machine: &str, new: &Self::Status) -> Result<(), String> {
        super::scope::volume_status(machine, self, new)
    }
}

impl ApiKind for Machine {
    const LIST_KIND: &'static str = "MachineList";
    fn validate(&self) -> Result<(), ValidationErrors> {
        validate_machine(self)
    }
    fn concerns(&self) -> Concerns<'_> {
        Concerns::Machines([self.metadata.name.as_str()].into())
    }
}

impl ApiKind for Snapshot {
    const LIST_KIND: &'static str = "SnapshotList";
    fn validate(&self) -> Result<(), ValidationErrors> {
        validate_snapshot(self)
    }
    fn validate_update(&self, old: &Self) -> Result<(), ValidationErrors> {
        validate_snapshot_update(old, self)
    }
    fn prepare_create(&mut self) {
        self.metadata.labels.insert(
            cobalt_api::snapshot::VOLUME_LABEL.into(),
            self.spec.volume.clone(),
        );
    }
    fn requires_volume(&self) -> Option<(&str, &'static str)> {
        Some((&self.spec.volume, "spec.volume"))
    }
    fn concerns(&self) -> Concerns<'_> {
        Concerns::VolumeOf {
            volume: &self.spec.volume,
            held_by: self.status.as_ref().and_then(|s| s.machine.as_deref()),
        }
    }
}

impl ApiKind for Claim {
    const LIST_KIND: &'static str = "ClaimList";
    fn validate(&self) -> Result<(), ValidationErrors> {
        validate_claim(self)
    }
    fn validate_update(&self, old: &Self) -> Result<(), ValidationErrors> {
        validate_claim_update(old, self)
    }
}

/// Parses a JSON or YAML (by Content-Type) body: malformed → 400 with the position; wrong shape
/// → 422 naming the field; semantically invalid → 422 listing every problem.
pub fn decode_body<R: ApiKind>(headers: &HeaderMap, body: &[u8]) -> Result<R, ApiError> {
    let content_type = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json");
    let value: Value = if content_type.contains("yaml") {
        let text = std::str::from_utf8(body)
            .map_err(|e| ApiError::bad_request(format!("body is not UTF-8: {e}")))?;
        serde_saphyr::from_str(text)
            .map_err(|e| ApiError::bad_request(format!("malformed YAML: {e}")))?
    } else {
        serde_json::from_slice(body)
            .map_err(|e| ApiError::bad_request(format!("malformed JSON: {e}")))?
    };
    let name = value
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let object: R = cobalt_api::manifest::from_value_all(value)
        .map_err(|causes| ApiError::invalid(R::KIND, &name, causes))?;
    object
        .validate()
        .map_err(|errors| ApiError::invalid(R::KIND, &name, errors.0))?;
    Ok(object)
}

/// 422 for a single field problem.
pub fn field_error<R: Resource>(name: &str, field: &str, message: &str) -> ApiError {
    ApiError::invalid(
        R::KIND,
        name,
        vec![FieldError {
            field: field.into(),
            message: message.into(),
        }],
    )
}
