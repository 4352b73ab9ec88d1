//! The integration tests, in one binary (one link instead of one per file): a module per
//! area, sharing `common` (the throwaway Postgres cluster, the Aidbox-style store, the
//! receiver, the daemon as a child process, the conformance validator). Each module's doc
//! says what it proves.

// Benchmarks, examples and tests may unwrap (a panic there is a failed run, not a daemon),
// and their `pub` items are for their own modules.
#![allow(clippy::unwrap_used, unreachable_pub)]

mod common;

mod auth;
mod bad_input;
mod brokers;
mod channels;
mod conformance;
mod console;
mod crash;
mod criteria;
mod criteria_errors;
mod cursor;
mod docs;
mod e2e;
mod email;
mod endpoint_auth;
mod examples;
mod failpoints;
mod instances;
mod lazy_capture;
mod lifecycle;
mod notifications;
mod operations;
mod probes;
mod queue_flow;
mod secrets;
mod shape;
mod slot_safety;
mod status;
mod store_profiles;
mod store_safety;
mod store_topics;
mod subscription_input;
mod subscriptions;
mod tls;
mod topic_cases;
mod versions;
mod websocket;
mod workload;
