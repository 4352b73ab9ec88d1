//! The TOML configuration contract (`config/example.toml` documents every key).
//!
//! Secrets never need to live in the file: `FHIR_CDC_SOURCE_URL` and `FHIR_CDC_QUEUE_URL`
//! override the connection strings.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

use crate::fhir::topic::Topic;
use crate::fhir::trigger::OnCriteriaError;
pub use crate::fhir::FhirVersion;

mod api;
mod channels;
mod delivery;
mod destination;
mod endpoint_auth;
mod source;
mod topic_entry;
pub use api::{ApiConfig, AuthConfig, StaticToken};
pub(crate) use channels::{ChannelsConfig, EmailConfig};
pub(crate) use delivery::{DeliveryConfig, QueueConfig};
pub use destination::{BrokerKind, DestinationConfig, DestinationFilter};
pub use endpoint_auth::{EndpointAuthConfig, EndpointAuthKind};
pub use source::{GenericTable, LagConfig, ProfileKind, SourceConfig};
pub use topic_entry::TopicEntry;

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

#[derive(Debug, Clone, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `text` (default) or `json`.
    #[serde(default)]
    pub format: Option<String>,
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
    pub(crate) secrets_key_file: Option<PathBuf>,
}

impl SecurityConfig {
    /// One source of the key at most; a key file is relative to the config file.
    fn check(&mut self, base: &Path) -> Result<(), ConfigError> {
        if self.secrets_key_env.is_some() && self.secrets_key_file.is_some() {
            return Err(ConfigError::Invalid(
                "security: set secrets_key_env or secrets_key_file, not both".into(),
            ));
        }
        if let Some(f) = &mut self.secrets_key_file {
            if f.is_relative() {
                *f = base.join(&*f);
            }
        }
        Ok(())
    }
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
    pub(crate) log: LogConfig,
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
    pub(crate) queue: QueueConfig,
    pub(crate) api: ApiConfig,
    pub delivery: DeliveryConfig,
    pub(crate) channels: ChannelsConfig,
    pub log: LogConfig,
    pub security: SecurityConfig,
    pub topics: Vec<ConfiguredTopic>,
    pub destinations: Vec<DestinationConfig>,
}

#[derive(Debug, Clone)]
pub struct ConfiguredTopic {
    pub topic: Topic,
    pub(crate) workers: usize,
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
    pub(crate) fn from_file(mut raw: ConfigFile, base: &Path) -> Result<Self, ConfigError> {
        if let Ok(url) = std::env::var("FHIR_CDC_SOURCE_URL") {
            raw.source.url = url;
        }
        if let Ok(url) = std::env::var("FHIR_CDC_QUEUE_URL") {
            raw.queue.url = Some(url);
        }
        api::check_api(&raw.api)?;
        source::check(&raw.source)?;
        if raw.queue.batch_events == 0 {
            return Err(ConfigError::Invalid(
                "queue.batch_events must be at least 1".into(),
            ));
        }
        destination::check_all(&raw.destination)?;
        endpoint_auth::check_all(&mut raw.delivery.endpoint_auth, base)?;
        raw.security.check(base)?;
        for d in &mut raw.destination {
            d.resolve_paths(base);
        }
        let topics = topic_entry::load(&raw.topic, base, raw.delivery.workers)?;
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

pub(crate) fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}
pub(crate) fn yes() -> bool {
    true
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
        assert_eq!(c.topics[0].workers, 128);
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
