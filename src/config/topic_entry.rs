//! `[[topic]]`: SubscriptionTopics from files or written inline, checked and loaded.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

use super::{ConfigError, ConfiguredTopic};
use crate::fhir::topic::Topic;
use crate::fhir::trigger::OnCriteriaError;

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct TopicEntry {
    /// Path of a SubscriptionTopic JSON file, relative to the config file.
    pub(crate) file: Option<PathBuf>,
    /// Send workers for this topic.
    pub(crate) workers: Option<usize>,
    /// The most a notification of this topic may carry: empty | id-only | full-resource.
    pub(crate) max_content: Option<String>,
    /// When criteria give no decision: use-query-criteria (default) | skip | notify.
    pub(crate) on_criteria_error: Option<String>,
    /// Inline topic: the same fields as the resource.
    #[serde(flatten)]
    pub(crate) inline: serde_json::Map<String, serde_json::Value>,
}

/// Reads, checks and compiles the `[[topic]]` entries; `default_workers` is
/// `[delivery] workers`.
pub(super) fn load(
    entries: &[TopicEntry],
    base: &Path,
    default_workers: usize,
) -> Result<Vec<ConfiguredTopic>, ConfigError> {
    let mut topics = Vec::new();
    for (index, entry) in entries.iter().enumerate() {
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
            workers: entry.workers.unwrap_or(default_workers).max(1),
            on_criteria_error,
        });
    }
    Ok(topics)
}
