//! FHIR resources the daemon reads and writes: topics, subscriptions, notification Bundles.

pub(crate) mod criteria_key;
pub(crate) mod criterion;
pub mod fhirpath;
pub mod fields;
pub(crate) mod model;
pub mod notification;
pub(crate) mod resource_types;
pub(crate) mod scan;
pub mod search;
pub mod subscription;
pub mod topic;
pub mod trigger;
pub(crate) mod vocab;
pub(crate) mod wire;

/// The FHIR release of the store: decides the search parameters, the FHIRPath model and the
/// notification format.
#[derive(Debug, Clone, Copy, serde::Deserialize, serde::Serialize, PartialEq, Eq)]
pub enum FhirVersion {
    R4,
    R4B,
    R5,
    R6,
}

impl FhirVersion {
    /// The embedded FHIR model of this release (octofhir-fhirschema).
    pub(crate) fn schema(self) -> octofhir_fhirschema::embedded::FhirVersion {
        use octofhir_fhirschema::embedded::FhirVersion as S;
        match self {
            FhirVersion::R4 => S::R4,
            FhirVersion::R4B => S::R4B,
            FhirVersion::R5 => S::R5,
            FhirVersion::R6 => S::R6,
        }
    }
}
