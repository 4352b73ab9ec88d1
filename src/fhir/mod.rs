//! FHIR resources the daemon reads and writes: topics, subscriptions, notification Bundles.

pub mod aidbox_format;
pub mod criterion;
pub mod fhirpath;
pub mod notification;
pub mod resource_types;
pub mod search;
pub mod subscription;
pub mod topic;
pub mod trigger;

/// The FHIR release of the store: decides the search parameters, the FHIRPath model and the
/// notification format.
#[derive(Debug, Clone, Copy, serde::Deserialize, serde::Serialize, PartialEq, Eq)]
pub enum FhirVersion {
    R4,
    R4B,
    R5,
    R6,
}
