//! The TOML configuration contract (`config/example.toml` documents every key).
//!
//! Secrets never need to live in the file: `FHIR_CDC_SOURCE_URL` and `FHIR_CDC_QUEUE_URL`
//! override the connection strings.

use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::fhir::topic::Topic;
use crate::fhir::trigger::OnCriteriaError;
pub use crate::fhir::FhirVersion;

mod destination;
mod endpoint_auth;
pub use destination::{BrokerKind, DestinationConfig, DestinationFilter};
pub use endpoint_auth::{EndpointAuthConfig, EndpointAuthKind};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid TOML: {source}")]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error("topic #{index}: {message}")]
    Topic { index: usize, message: String },
    #[error("{0}")]
    Invalid(String),
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ProfileKind {
    Aidbox,
    Hapi,
    Helios,
    Medplum,
    Generic,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    pub url: String,
    pub profile: ProfileKind,
    #[serde(default = "default_fhir_version")]
    pub fhir_version: FhirVersion,
    #[serde(default = "default_slot")]
    pub slot: String,
    #[serde(default = "default_slot")]
    pub publication: String,
    /// Schema holding the store's resource tables (aidbox profile).
    #[serde(default = "default_schema")]
    pub schema: String,
    /// Tables for the `generic` profile.
    #[serde(default)]
    pub tables: Vec<GenericTable>,
    /// Create the publication and slot when missing (default true).
    #[serde(default = "yes")]
    pub create_missing: bool,
    /// How often capture compares the publication with the store's tables and adds
    /// resource tables created since (seconds; default 10). Rows written to a new table
    /// before it is added are not captured.
    #[serde(default = "default_publication_refresh")]
    pub publication_refresh_secs: u64,
    /// Every this many seconds capture writes a tiny logical message of its own into the
    /// store database's WAL, so the slot can be confirmed past WAL the cluster writes
    /// elsewhere while the store is quiet (default 10; 0: off).
    #[serde(default = "default_wal_heartbeat")]
    pub wal_heartbeat_secs: u64,
    /// When slot lag is worth a warning, and when it makes `/readyz` report degraded.
    #[serde(default)]
    pub lag: LagConfig,
    /// Only changes of these tenants are captured (HAPI partition id or `default`, HFS
    /// tenant, Medplum project id); absent: all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenants: Option<Vec<String>>,
}

/// `[source.lag]`: thresholds on the slot's lag. Either figure above its limit counts.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LagConfig {
    /// WAL bytes behind the slot's confirmed position that log a warning (default 1 GiB).
    pub warn_bytes: u64,
    /// Seconds the oldest unqueued store commit may wait before a warning (default 60).
    pub warn_secs: u64,
    /// Bytes above which `/readyz` reports degraded and an error is logged (default 8 GiB).
    pub max_bytes: u64,
    /// Seconds above which `/readyz` reports degraded (default 600).
    pub max_secs: u64,
    /// How often the slot is read (default 5).
    pub check_secs: u64,
}

impl Default for LagConfig {
    fn default() -> Self {
        LagConfig {
            warn_bytes: 1 << 30,
            warn_secs: 60,
            max_bytes: 8 << 30,
            max_secs: 600,
            check_secs: 5,
        }
    }
}

/// One table of a `generic` store: which columns hold what.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GenericTable {
    /// `schema.table` or `table` (then `source.schema`).
    pub table: String,
    /// Fixed resource type of every row, or …
    pub resource_type: Option<String>,
    /// … the column that holds it.
    pub type_column: Option<String>,
    #[serde(default = "default_id_col")]
    pub id_column: String,
    #[serde(default = "default_resource_col")]
    pub resource_column: String,
    pub version_column: Option<String>,
    /// A boolean column; true means the row is a deletion (soft delete).
    pub deleted_column: Option<String>,
}

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
pub struct ApiConfig {
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// The base URL subscribers see in references; default `http://{listen}`.
    pub base_url: Option<String>,
    /// Who may use the API. Without it the API listens on loopback addresses only.
    pub auth: Option<AuthConfig>,
    /// Listen on a non-loopback address without `[api.auth]` (logged loudly at start).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_unauthenticated: bool,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            base_url: None,
            auth: None,
            allow_unauthenticated: false,
        }
    }
}

/// `[api.auth]`: OAuth 2.0 bearer JWTs as SMART Backend Services issue them, and/or static
/// tokens. Scopes (SMART v1 `system/Subscription.read`, v2 `system/Subscription.rs`) decide
/// access.
#[derive(Debug, Clone, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Required `iss` of JWTs.
    pub issuer: Option<String>,
    /// Required `aud` of JWTs.
    pub audience: Option<String>,
    /// JWKS to verify JWTs with, fetched and cached; fetched again for an unknown `kid`.
    pub jwks_url: Option<String>,
    /// … or a JWKS file.
    pub jwks_file: Option<PathBuf>,
    /// Clock leeway for `exp` and `nbf`, seconds (default 30).
    #[serde(default = "default_leeway")]
    pub leeway_secs: u64,
    /// Static tokens; each token's value is read from an environment variable.
    #[serde(default)]
    pub tokens: Vec<StaticToken>,
}

/// A static API token: its secret comes from the environment variable `env`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StaticToken {
    pub env: String,
    /// Space-separated SMART scopes.
    pub scopes: String,
}

impl ApiConfig {
    pub fn base_url(&self) -> String {
        self.base_url
            .clone()
            .unwrap_or_else(|| format!("http://{}", self.listen))
            .trim_end_matches('/')
            .to_string()
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DeliveryConfig {
    /// Allow endpoints on loopback / private networks (default false).
    #[serde(default)]
    pub allow_private_endpoints: bool,
    /// Refuse `http://` endpoints for full-resource payloads (default true).
    #[serde(default = "yes")]
    pub require_https_for_full_resource: bool,
    /// Default per-call timeout when a subscription sets none, seconds.
    #[serde(default = "default_timeout")]
    pub timeout_secs: u64,
    /// First retry delay, milliseconds; doubles per attempt with jitter.
    #[serde(default = "default_backoff_ms")]
    pub retry_initial_ms: u64,
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
    pub off_after_failures: i32,
    /// Subscriptions of one topic sent at once when the topic does not say (default 64).
    /// Each send holds no database connection, so a hanging endpoint costs one slot.
    #[serde(default = "default_workers")]
    pub workers: usize,
    /// Queue connections shared by the sends of every topic (default 8).
    #[serde(default = "default_pool_size")]
    pub pool_size: usize,
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
    pub fn default_timeout(&self) -> Duration {
        Duration::from_secs(self.timeout_secs)
    }
}

/// `[channels]`: settings of the channels other than rest-hook.
#[derive(Debug, Clone, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ChannelsConfig {
    /// Without it, email subscriptions are refused.
    pub email: Option<EmailConfig>,
    #[serde(default)]
    pub websocket: WebsocketConfig,
}

impl ChannelsConfig {
    /// What Subscription validation accepts for the email channel.
    pub fn email_rules(&self) -> crate::fhir::subscription::EmailRules {
        match &self.email {
            None => Default::default(),
            Some(e) => crate::fhir::subscription::EmailRules {
                configured: true,
                full_resource_ok: e.uses_tls() || e.allow_full_resource_without_tls,
            },
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EmailConfig {
    /// `smtp://host:port` (plain), `smtp+starttls://host:port` or `smtps://host:port`.
    pub smtp: String,
    /// The sender address, unless a subscription sets `From`.
    pub from: String,
    pub username: Option<String>,
    /// The environment variable holding the SMTP password; it is never read from the file.
    pub password_env: Option<String>,
    /// The subject, unless a subscription sets `Subject`.
    #[serde(default = "default_subject")]
    pub subject: String,
    /// PEM file of extra CA certificates for the SMTP server (a private CA).
    pub ca_file: Option<PathBuf>,
    /// Let full-resource notifications go over an SMTP connection without TLS (default false:
    /// such subscriptions are refused).
    #[serde(default)]
    pub allow_full_resource_without_tls: bool,
    /// Send handshake and heartbeat mails (default false: a handshake by mail is optional in
    /// the Backport IG; an email subscription turns active without one).
    #[serde(default)]
    pub handshake_and_heartbeat: bool,
}

impl EmailConfig {
    /// Whether the connection to the SMTP server is encrypted.
    pub fn uses_tls(&self) -> bool {
        self.smtp.starts_with("smtps://") || self.smtp.starts_with("smtp+starttls://")
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WebsocketConfig {
    /// How long a `$get-ws-binding-token` token may wait to be used, seconds (default 60).
    #[serde(default = "default_token_lifetime")]
    pub token_lifetime_secs: u64,
}

impl Default for WebsocketConfig {
    fn default() -> Self {
        WebsocketConfig {
            token_lifetime_secs: default_token_lifetime(),
        }
    }
}

fn default_subject() -> String {
    "FHIR subscription notification".into()
}

fn default_token_lifetime() -> u64 {
    60
}

#[derive(Debug, Clone, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `text` (default) or `json`.
    #[serde(default)]
    pub format: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct TopicEntry {
    /// Path of a SubscriptionTopic JSON file, relative to the config file.
    pub file: Option<PathBuf>,
    /// Send workers for this topic.
    pub workers: Option<usize>,
    /// The most a notification of this topic may carry: empty | id-only | full-resource.
    pub max_content: Option<String>,
    /// When criteria give no decision: use-query-criteria (default) | skip | notify.
    pub on_criteria_error: Option<String>,
    /// Inline topic: the same fields as the resource.
    #[serde(flatten)]
    pub inline: serde_json::Map<String, serde_json::Value>,
}

/// `[security]`: the key that encrypts subscribers' secrets (endpoint header values and
/// signing secrets) in the queue. Without it they are stored in clear and `check` says so.
#[derive(Debug, Clone, Deserialize, Serialize, Default, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SecurityConfig {
    /// The environment variable holding the key: 32 bytes, base64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secrets_key_env: Option<String>,
    /// … or a file holding it (base64, one line).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secrets_key_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
/// The configuration file as written: the TOML shape, before validation. Tests build one
/// and serialise it instead of patching TOML text.
pub struct ConfigFile {
    pub source: SourceConfig,
    #[serde(default)]
    pub queue: QueueConfig,
    #[serde(default)]
    pub api: ApiConfig,
    #[serde(default)]
    pub delivery: DeliveryConfig,
    #[serde(default)]
    pub channels: ChannelsConfig,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default, skip_serializing_if = "is_default")]
    pub security: SecurityConfig,
    #[serde(default)]
    pub topic: Vec<TopicEntry>,
    /// Operator-owned broker destinations (`[[destination]]`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub destination: Vec<DestinationConfig>,
}

/// A loaded, validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub source: SourceConfig,
    pub queue: QueueConfig,
    pub api: ApiConfig,
    pub delivery: DeliveryConfig,
    pub channels: ChannelsConfig,
    pub log: LogConfig,
    pub security: SecurityConfig,
    pub topics: Vec<ConfiguredTopic>,
    pub destinations: Vec<DestinationConfig>,
}

#[derive(Debug, Clone)]
pub struct ConfiguredTopic {
    pub topic: Topic,
    pub workers: usize,
    pub on_criteria_error: OnCriteriaError,
}

impl Config {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::from_toml(&text, base).map_err(|e| match e {
            ConfigError::Parse { source, .. } => ConfigError::Parse {
                path: path.to_path_buf(),
                source,
            },
            other => other,
        })
    }

    /// Parses TOML text; topic files are resolved against `base`.
    pub fn from_toml(text: &str, base: &Path) -> Result<Self, ConfigError> {
        let raw: ConfigFile = toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: PathBuf::new(),
            source,
        })?;
        Self::from_file(raw, base)
    }

    /// Validates a configuration file's contents; topic files are resolved against `base`.
    pub fn from_file(mut raw: ConfigFile, base: &Path) -> Result<Self, ConfigError> {
        if let Ok(url) = std::env::var("FHIR_CDC_SOURCE_URL") {
            raw.source.url = url;
        }
        if let Ok(url) = std::env::var("FHIR_CDC_QUEUE_URL") {
            raw.queue.url = Some(url);
        }
        check_api(&raw.api)?;
        let tenanted = matches!(
            raw.source.profile,
            ProfileKind::Hapi | ProfileKind::Helios | ProfileKind::Medplum
        );
        if raw.source.tenants.is_some() && !tenanted {
            return Err(ConfigError::Invalid(format!(
                "source.tenants: the {:?} profile has no tenants (hapi, helios and medplum do)",
                raw.source.profile
            )));
        }
        if raw.source.publication_refresh_secs == 0 {
            return Err(ConfigError::Invalid(
                "source.publication_refresh_secs must be at least 1".into(),
            ));
        }
        if raw.queue.batch_events == 0 {
            return Err(ConfigError::Invalid(
                "queue.batch_events must be at least 1".into(),
            ));
        }
        validate_ident("source.slot", &raw.source.slot)?;
        validate_ident("source.publication", &raw.source.publication)?;
        validate_ident("source.schema", &raw.source.schema)?;
        if raw.source.profile == ProfileKind::Generic && raw.source.tables.is_empty() {
            return Err(ConfigError::Invalid(
                "profile \"generic\" needs at least one [[source.tables]] entry".into(),
            ));
        }
        for t in &raw.source.tables {
            if t.resource_type.is_none() == t.type_column.is_none() {
                return Err(ConfigError::Invalid(format!(
                    "source.tables {:?}: set exactly one of resource_type or type_column",
                    t.table
                )));
            }
        }
        destination::check_all(&raw.destination)?;
        endpoint_auth::check_all(&mut raw.delivery.endpoint_auth, base)?;
        if raw.security.secrets_key_env.is_some() && raw.security.secrets_key_file.is_some() {
            return Err(ConfigError::Invalid(
                "security: set secrets_key_env or secrets_key_file, not both".into(),
            ));
        }
        if let Some(f) = &mut raw.security.secrets_key_file {
            if f.is_relative() {
                *f = base.join(&*f);
            }
        }
        for d in &mut raw.destination {
            d.resolve_paths(base);
        }
        let mut topics = Vec::new();
        for (index, entry) in raw.topic.iter().enumerate() {
            let json = match &entry.file {
                Some(file) => {
                    let p = base.join(file);
                    let text = std::fs::read_to_string(&p).map_err(|e| ConfigError::Topic {
                        index,
                        message: format!("cannot read {}: {e}", p.display()),
                    })?;
                    serde_json::from_str(&text).map_err(|e| ConfigError::Topic {
                        index,
                        message: format!("{} is not valid JSON: {e}", p.display()),
                    })?
                }
                None => {
                    let mut m = entry.inline.clone();
                    m.entry("resourceType")
                        .or_insert_with(|| "SubscriptionTopic".into());
                    serde_json::Value::Object(m)
                }
            };
            let mut json = json;
            if let (Some(mc), Some(o)) = (&entry.max_content, json.as_object_mut()) {
                o.insert("maxContent".into(), mc.clone().into());
            }
            let topic = Topic::from_json(&json)
                .and_then(|t| t.evaluable().map(|()| t))
                .map_err(|e| ConfigError::Topic {
                    index,
                    message: e.to_string(),
                })?;
            if topics
                .iter()
                .any(|t: &ConfiguredTopic| t.topic.url == topic.url)
            {
                return Err(ConfigError::Topic {
                    index,
                    message: format!("duplicate topic url {}", topic.url),
                });
            }
            let on_criteria_error = match entry.on_criteria_error.as_deref() {
                None => OnCriteriaError::default(),
                Some(s) => OnCriteriaError::parse(s).ok_or_else(|| ConfigError::Topic {
                    index,
                    message: format!(
                        "on_criteria_error = {s:?}: use use-query-criteria, skip or notify"
                    ),
                })?,
            };
            topics.push(ConfiguredTopic {
                topic,
                workers: entry.workers.unwrap_or(raw.delivery.workers).max(1),
                on_criteria_error,
            });
        }
        Ok(Config {
            source: raw.source,
            queue: raw.queue,
            api: raw.api,
            delivery: raw.delivery,
            channels: raw.channels,
            log: raw.log,
            security: raw.security,
            topics,
            destinations: raw.destination,
        })
    }

    pub fn queue_url(&self) -> &str {
        self.queue.url.as_deref().unwrap_or(&self.source.url)
    }
}

/// The API's safe default: no `[api.auth]` means loopback only, unless the operator says
/// otherwise in so many words; an `[api.auth]` must say how tokens are checked.
fn check_api(api: &ApiConfig) -> Result<(), ConfigError> {
    match &api.auth {
        None if !api.listen.ip().is_loopback() && !api.allow_unauthenticated => {
            Err(ConfigError::Invalid(format!(
                "api.listen = {} is not a loopback address and [api.auth] is missing: anyone who reaches it could \
                 subscribe to every matching resource (PHI). Configure [api.auth] (JWT issuer/audience/JWKS or \
                 static tokens), listen on 127.0.0.1, or set api.allow_unauthenticated = true",
                api.listen
            )))
        }
        None => Ok(()),
        Some(a) => {
            let jwt = a.jwks_url.is_some() || a.jwks_file.is_some();
            if jwt && (a.issuer.is_none() || a.audience.is_none()) {
                return Err(ConfigError::Invalid(
                    "[api.auth] with a JWKS needs issuer and audience".into(),
                ));
            }
            if !jwt && a.tokens.is_empty() {
                return Err(ConfigError::Invalid(
                    "[api.auth] needs jwks_url or jwks_file (with issuer and audience), or [[api.auth.tokens]]".into(),
                ));
            }
            Ok(())
        }
    }
}

/// Names that are spliced into SQL (slot, publication, schema) must be plain identifiers.
fn validate_ident(what: &str, v: &str) -> Result<(), ConfigError> {
    let ok = !v.is_empty()
        && v.len() <= 63
        && v.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && !v.starts_with(|c: char| c.is_ascii_digit());
    if ok {
        Ok(())
    } else {
        Err(ConfigError::Invalid(format!(
            "{what} = {v:?}: use lower-case letters, digits and '_' (at most 63)"
        )))
    }
}

fn default_fhir_version() -> FhirVersion {
    FhirVersion::R5
}
fn default_slot() -> String {
    "fhir_cdc".into()
}
fn default_leeway() -> u64 {
    30
}
fn default_wal_heartbeat() -> u64 {
    10
}
fn default_publication_refresh() -> u64 {
    10
}
fn default_schema() -> String {
    "public".into()
}
fn default_id_col() -> String {
    "id".into()
}
fn default_resource_col() -> String {
    "resource".into()
}
fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

fn yes() -> bool {
    true
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
fn default_listen() -> SocketAddr {
    "127.0.0.1:8090".parse().expect("literal")
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
    64
}

fn default_pool_size() -> usize {
    8
}

fn default_grace() -> u64 {
    10
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOPIC: &str = r#"
[source]
url = "postgresql://postgres@127.0.0.1:55432/fhir"
profile = "aidbox"
[[topic]]
url = "http://example.org/topic/enc"
status = "active"
resourceTrigger = [{ resource = "Encounter", supportedInteraction = ["create"] }]
"#;

    #[test]
    fn inline_topic_and_defaults() {
        let c = Config::from_toml(TOPIC, Path::new(".")).unwrap();
        assert_eq!(c.source.slot, "fhir_cdc");
        assert_eq!(c.source.fhir_version, FhirVersion::R5);
        assert!(!c.delivery.allow_private_endpoints);
        assert!(c.delivery.require_https_for_full_resource);
        assert_eq!(c.topics.len(), 1);
        assert_eq!(c.topics[0].topic.url, "http://example.org/topic/enc");
        assert_eq!(c.topics[0].workers, 64);
        assert_eq!(c.api.base_url(), "http://127.0.0.1:8090");
    }

    #[test]
    fn bad_slot_name_is_refused() {
        let t = TOPIC.replace(
            "profile = \"aidbox\"",
            "profile = \"aidbox\"\nslot = \"x; drop\"",
        );
        let e = Config::from_toml(&t, Path::new(".")).unwrap_err();
        assert!(e.to_string().contains("source.slot"), "{e}");
    }

    #[test]
    fn unknown_key_is_refused() {
        let t = TOPIC.replace("[source]", "[source]\nsloot = \"x\"");
        assert!(Config::from_toml(&t, Path::new(".")).is_err());
    }

    #[test]
    fn shipped_examples_load() {
        for f in ["config/example.toml", "config/docker.toml"] {
            let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(f);
            let c = Config::load(&p).unwrap_or_else(|e| panic!("{f}: {e}"));
            assert_eq!(c.topics.len(), 2, "{f}");
            assert_eq!(c.topics[0].topic.id, "encounter-start");
        }
    }

    #[test]
    fn a_config_file_survives_serialisation() {
        // Tests write configs by serialising a ConfigFile: nothing may be lost on the way.
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/example.toml");
        let text = std::fs::read_to_string(&p).unwrap();
        let file: ConfigFile = toml::from_str(&text).unwrap();
        let again = toml::to_string(&file).unwrap();
        let base = p.parent().unwrap();
        let (a, b) = (
            Config::from_toml(&text, base).unwrap(),
            Config::from_toml(&again, base).unwrap(),
        );
        assert_eq!(format!("{:?}", a.source), format!("{:?}", b.source));
        assert_eq!(format!("{:?}", a.delivery), format!("{:?}", b.delivery));
        assert_eq!(format!("{:?}", a.queue), format!("{:?}", b.queue));
        let urls = |c: &Config| {
            c.topics
                .iter()
                .map(|t| t.topic.url.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(urls(&a), urls(&b));
        assert_eq!(
            a.topics
                .iter()
                .map(|t| t.topic.triggers.clone())
                .collect::<Vec<_>>(),
            b.topics
                .iter()
                .map(|t| t.topic.triggers.clone())
                .collect::<Vec<_>>()
        );
    }

    #[test]
    fn generic_needs_tables() {
        let t = TOPIC.replace("\"aidbox\"", "\"generic\"");
        let e = Config::from_toml(&t, Path::new(".")).unwrap_err();
        assert!(e.to_string().contains("source.tables"), "{e}");
    }
}
