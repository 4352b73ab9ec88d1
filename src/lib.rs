//! fhir-cdc: FHIR topic-based Subscription notifications from the write-ahead log of a
//! Postgres-backed FHIR store.
//!
//! Data flows one way: [`capture`] (WAL → `fhir_cdc.event`) → [`queue`] → [`delivery`]
//! (dispatch → send over a [`channel`]); [`api`] serves subscriptions and status.

pub mod api;
pub mod capture;
pub mod channel;
pub mod check;
pub mod config;
pub mod db;
pub mod delivery;
pub mod error;
pub(crate) mod failpoints;
pub mod fhir;
pub mod metrics;
pub mod queue;
pub mod status;
pub mod store;
pub mod topic_registry;
