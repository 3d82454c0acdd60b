//! Cobalt's resource model.
//!
//! Everything users write and tools read: the [`Volume`] and [`Machine`] kinds with their
//! metadata, spec and status; byte [`Quantity`]s; [`validate`] that reports *every* problem with
//! its field path; [`manifest`] parsing of multi-document YAML/JSON with positions in errors; and
//! the JSON Schemas generated from these types ([`schema`]).
//!
//! Architecture invariant: this crate does no I/O and knows nothing of etcd, HTTP or BTRFS.
//!
//! ```
//! let docs = cobalt_api::manifest::parse_manifests(r#"
//! apiVersion: cobalt.io/v1alpha1
//! kind: Volume
//! metadata: {name: media}
//! spec: {size: 10Gi}
//! "#).unwrap();
//! assert_eq!(docs[0].name(), "media");
//! ```

pub mod claim;
pub mod compact;
pub mod condition;
pub mod duration;
pub mod event;
pub mod machine;
pub mod manifest;
pub mod meta;
pub mod quantity;
pub mod schema;
pub mod selector;
pub mod shape;
pub mod snapshot;
pub mod table;
pub mod validate;
pub mod volume;

pub use claim::{Claim, ClaimPhase, ClaimSpec, ClaimStatus, ClaimStrategy};
pub use compact::{StringMap, Text};
pub use condition::{find_condition, set_condition, Condition, ConditionStatus};
pub use machine::{Capacity, Machine, MachinePhase, MachineSpec, MachineStatus, BACKEND_LABEL};
pub use meta::{ByName, ObjectMeta, Resource, API_VERSION, LAST_APPLIED};
pub use quantity::{Quantity, QuantityError};
pub use snapshot::{Snapshot, SnapshotPhase, SnapshotSchedule, SnapshotSpec, SnapshotStatus};
pub use validate::{FieldError, ValidationErrors};
pub use volume::{
    Access, Capability, CloneSeed, Compression, Endpoint, Export, ExportClient, LastMove,
    MoveStage, MoveStatus, Placement, Usage, Volume, VolumePhase, VolumeSource, VolumeSpec,
    VolumeStatus, AGENT_FINALIZER,
};
