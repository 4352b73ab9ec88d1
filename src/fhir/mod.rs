//! FHIR resources the daemon reads and writes: topics, subscriptions, notification Bundles.

pub mod fhirpath;
pub mod notification;
pub mod resource_types;
pub mod search;
pub mod subscription;
pub mod topic;
pub mod trigger;
