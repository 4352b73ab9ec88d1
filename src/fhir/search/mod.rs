//! FHIR search semantics, in memory: the official SearchParameter definitions, the values
//! a resource has for a parameter, and matching a search value against them. Used for
//! canFilterBy extraction, filterBy matching and queryCriteria.

pub mod registry;
pub mod value;
