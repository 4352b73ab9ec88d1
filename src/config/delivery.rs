//! `[queue]` and `[delivery]`: where the queue lives and how sends behave.

use serde::{Deserialize, Serialize};
use std::time::Duration;

use super::EndpointAuthConfig;

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct QueueConfig {
    /// Database holding schema `fhir_cdc`; defaults to the source database.
    pub url: Option<String>,
    /// Events per queue write: committed store transactions are flushed together once
    /// they hold this many, and a larger store transaction is written in chunks of this
    /// many into one queue transaction that commits with it (memory stays flat).
    #[serde(default = "default_batch")]
    pub batch_events: usize,
    /// Longest time a committed store transaction waits before it is queued while the
    /// queue writer is busy with the last batch (an idle writer takes it at once).
    #[serde(default = "default_flush_ms")]
    pub flush_ms: u64,
    /// How long delivered events stay in the queue for `$events`, hours (default 168 = 7
    /// days). Pending and dead-lettered events are never removed by retention.
    #[serde(default = "default_retention")]
    pub retention_hours: u64,
}

impl Default for QueueConfig {
    fn default() -> Self {
        toml::from_str("").expect("defaults")
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DeliveryConfig {
    /// Allow endpoints on loopback / private networks (default false).
    #[serde(default)]
    pub(crate) allow_private_endpoints: bool,
    /// Refuse `http://` endpoints for full-resource payloads (default true).
    #[serde(default = "super::yes")]
    pub require_https_for_full_resource: bool,
    /// Default per-call timeout when a subscription sets none, seconds.
    #[serde(default = "default_timeout")]
    pub timeout_secs: u64,
    /// First retry delay, milliseconds; doubles per attempt with jitter.
    #[serde(default = "default_backoff_ms")]
    pub(crate) retry_initial_ms: u64,
    /// Largest retry delay, milliseconds.
    #[serde(default = "default_backoff_max_ms")]
    pub retry_max_ms: u64,
    /// Attempts per event before it goes to `dead_letter`.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: i32,
    /// Consecutive failures that turn a subscription to `error`.
    #[serde(default = "default_error_after")]
    pub error_after_failures: i32,
    /// Consecutive failures that turn it `off` (pending events go to `dead_letter`).
    #[serde(default = "default_off_after")]
    pub(crate) off_after_failures: i32,
    /// Subscriptions of one topic sent at once when the topic does not say (default 128).
    /// Each send holds no database connection, so a hanging endpoint costs one slot.
    #[serde(default = "default_workers")]
    pub(crate) workers: usize,
    /// Queue connections shared by the sends of every topic (default 8).
    #[serde(default = "default_pool_size")]
    pub(crate) pool_size: usize,
    /// On SIGTERM, how long sends under way may take to finish before the process exits;
    /// unfinished ones stay pending and go out again (default 10).
    #[serde(default = "default_grace")]
    pub shutdown_grace_secs: u64,
    /// How long a notification may wait for more events to fill `maxCount`, milliseconds.
    /// 0 (default): send what is ready.
    #[serde(default)]
    pub batch_window_ms: u64,
    /// OAuth2 client credentials and mutual TLS toward endpoints, by URL prefix.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoint_auth: Vec<EndpointAuthConfig>,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        toml::from_str("").expect("defaults")
    }
}

impl DeliveryConfig {
    pub(crate) fn default_timeout(&self) -> Duration {
        Duration::from_secs(self.timeout_secs)
    }
}

fn default_batch() -> usize {
    5000
}
fn default_retention() -> u64 {
    168
}
fn default_flush_ms() -> u64 {
    20
}
fn default_timeout() -> u64 {
    10
}
fn default_backoff_ms() -> u64 {
    500
}
fn default_backoff_max_ms() -> u64 {
    300_000
}
fn default_max_attempts() -> i32 {
    20
}
fn default_error_after() -> i32 {
    3
}
fn default_off_after() -> i32 {
    50
}
fn default_workers() -> usize {
    // 64 left a second wave of a 100-subscription fan-out to run at a third of the
    // concurrency; 128 sent 10,000 subscriptions' notifications 25% faster (bench.sh).
    128
}
fn default_pool_size() -> usize {
    8
}
fn default_grace() -> u64 {
    10
}
