//! Stage 3: control rows vs resource changes. Subscription and SubscriptionTopic resources
//! written into the store (R4: the backport `Basic`) are not events: they register, change
//! or remove subscriptions and topics, taking effect at their place in the stream.

use std::collections::HashMap;
use std::sync::Arc;

use super::assemble::ResourceChange;
use crate::config::Config;
use crate::fhir::fields::Fields;
use crate::fhir::search::Searcher;
use crate::fhir::subscription::{self, Rules};
use crate::fhir::topic::{Interaction, Topic, TopicError};
use crate::fhir::trigger::{self, Compiled};
use crate::queue::batch::Item;
use crate::store::RowChange;

/// A topic capture matches against: configured, or created in the store.
pub struct Active {
    pub(crate) url: Arc<str>,
    pub(crate) topic: Topic,
    pub(crate) compiled: Compiled,
    /// The store resource's id, for topics that live in the store.
    pub(crate) store_id: Option<String>,
}

impl Active {
    pub fn new(topic: Topic, compiled: Compiled, store_id: Option<String>) -> Self {
        Active {
            url: Arc::from(topic.url.as_str()),
            topic,
            compiled,
            store_id,
        }
    }
}

/// What a change is to capture.
pub enum Role {
    /// Only a control row (Subscription, SubscriptionTopic).
    Control(Option<Item>),
    /// A resource change topics may match; a backport `Basic` may also be a topic.
    Resource(Option<Item>),
}

/// The topics in force at the current point of the stream.
pub struct ActiveTopics {
    pub active: Vec<Active>,
    searcher: Arc<Searcher>,
}

impl ActiveTopics {
    pub fn new(active: Vec<Active>, searcher: Arc<Searcher>) -> Self {
        ActiveTopics { active, searcher }
    }

    /// The resource types some topic triggers on, each with the members of its resources
    /// that the topics' plans read (what capture parses).
    pub fn fields(&self) -> HashMap<String, Arc<Fields>> {
        let mut out: HashMap<String, (Fields, Vec<Vec<String>>)> = HashMap::new();
        for a in &self.active {
            for t in &a.topic.triggers {
                let (f, text) = out.entry(t.resource_type.clone()).or_default();
                a.compiled.fields(&t.resource_type, f, text);
            }
        }
        out.into_iter()
            .map(|(k, (mut f, text))| {
                f.settle(text);
                (k, Arc::new(f))
            })
            .collect()
    }

    /// Sorts a change into control or resource, applying what a control row says.
    pub fn classify(&mut self, change: &ResourceChange, cfg: &Config) -> Role {
        let row = &change.current;
        match row.resource_type.as_str() {
            "Subscription" => Role::Control(self.subscription_item(row, cfg)),
            "SubscriptionTopic" => Role::Control(self.topic_change(row)),
            "Basic" => Role::Resource(self.topic_change(row)),
            _ => Role::Resource(None),
        }
    }

    /// A Subscription written into the store becomes a queue item at its place in the stream.
    fn subscription_item(&self, row: &RowChange, cfg: &Config) -> Option<Item> {
        if row.interaction == Interaction::Delete {
            return Some(Item::DeleteSubscription { id: row.id.clone() });
        }
        let resource = match row.resource() {
            Ok(Some(r)) => r,
            Ok(None) => {
                tracing::warn!(reference = %row.reference(), "Subscription row without a readable body; ignored");
                return None;
            }
            Err(e) => {
                tracing::error!(error = %e, "Subscription row is not valid JSON; recorded in error");
                return Some(Item::RefuseSubscription {
                    id: row.id.clone(),
                    topic: String::new(),
                    resource: serde_json::Value::Null,
                    reason: e.to_string(),
                });
            }
        };
        let topics: Vec<Topic> = self.active.iter().map(|a| a.topic.clone()).collect();
        let rules = Rules {
            registry: Some(&self.searcher.registry),
            format: cfg.source.fhir_version.into(),
            topics: &topics,
            refuse_private: crate::channel::private::rule(cfg.delivery.allow_private_endpoints),
            require_https_for_full_resource: cfg.delivery.require_https_for_full_resource,
            email: cfg.channels.email_rules(),
        };
        match subscription::parse(&resource, &rules) {
            Ok(spec) => Some(Item::UpsertSubscription {
                id: row.id.clone(),
                spec: Box::new(spec),
                resource,
            }),
            Err(e) => {
                tracing::error!(reference = %row.reference(), reason = %e.message, "Subscription in the store refused");
                let topic = ["topic", "criteria"]
                    .iter()
                    .find_map(|k| resource.get(*k).and_then(serde_json::Value::as_str))
                    .unwrap_or("")
                    .to_string();
                Some(Item::RefuseSubscription {
                    id: row.id.clone(),
                    topic,
                    reason: format!("{} ({})", e.message, e.expression),
                    resource,
                })
            }
        }
    }

    fn unregister(&mut self, row: &RowChange) -> Option<Item> {
        let i = self
            .active
            .iter()
            .position(|a| a.store_id.as_deref() == Some(row.id.as_str()))?;
        let a = self.active.remove(i);
        tracing::info!(topic = %a.url, reference = %row.reference(), "store topic removed");
        Some(Item::DeleteTopic {
            store_id: row.id.clone(),
        })
    }

    /// A SubscriptionTopic (or R4 backport Basic) written into the store: takes effect for
    /// the changes after it in the stream, and is recorded for restarts and delivery.
    fn topic_change(&mut self, row: &RowChange) -> Option<Item> {
        if row.interaction == Interaction::Delete {
            return self.unregister(row);
        }
        let resource = match row.resource() {
            Ok(Some(r)) => r,
            Ok(None) => return None,
            Err(e) => {
                if row.resource_type == "SubscriptionTopic" {
                    tracing::error!(error = %e, "SubscriptionTopic row is not valid JSON; ignored");
                }
                return None;
            }
        };
        let topic = match Topic::from_json(&resource) {
            Ok(t) => t,
            // An ordinary Basic resource, not a topic.
            Err(TopicError::NotATopic(_)) => return None,
            Err(e) => return self.refuse(row, &e.to_string()),
        };
        let compiled = match topic
            .evaluable()
            .map_err(|e| e.to_string())
            .and_then(|()| trigger::compile(&topic, &self.searcher.registry, &self.searcher.fp))
        {
            Ok(c) => c,
            Err(e) => return self.refuse(row, &e),
        };
        self.register(row, topic, compiled, resource)
    }

    fn refuse(&mut self, row: &RowChange, reason: &str) -> Option<Item> {
        tracing::error!(reference = %row.reference(), reason = %reason, "SubscriptionTopic in the store refused");
        self.unregister(row)
    }

    fn register(
        &mut self,
        row: &RowChange,
        topic: Topic,
        compiled: Compiled,
        resource: serde_json::Value,
    ) -> Option<Item> {
        let mine = |a: &Active| a.store_id.as_deref() == Some(row.id.as_str());
        if self
            .active
            .iter()
            .any(|a| a.topic.url == topic.url && !mine(a))
        {
            tracing::error!(reference = %row.reference(), url = %topic.url, "SubscriptionTopic in the store has the url of another topic; ignored");
            return None;
        }
        let url = topic.url.clone();
        let active = Active::new(topic, compiled, Some(row.id.clone()));
        match self.active.iter().position(mine) {
            Some(i) => self.active[i] = active,
            None => self.active.push(active),
        }
        tracing::info!(topic = %url, reference = %row.reference(), "store topic registered");
        Some(Item::UpsertTopic {
            store_id: row.id.clone(),
            url,
            resource,
        })
    }
}
