//! Payload content for notifications and `$events`: the event as a notification carries it,
//! with the resource body when the payload is full-resource, and the resources the topic's
//! notificationShape adds (include / revInclude), read from the store.

use serde_json::Value;
use std::sync::Arc;

use crate::fhir::notification::Event;
use crate::fhir::search::value::Values;
use crate::fhir::search::Searcher;
use crate::fhir::subscription::Content;
use crate::fhir::topic::{Interaction, Shape};
use crate::queue::events::{Pending, TopicEvent};
use crate::store::StoreProfile;

/// Most resources one revInclude adds to a notification.
const REV_INCLUDE_LIMIT: i64 = 50;

/// Builds notification events; reaches the store only through its profile.
#[derive(Clone)]
pub struct Payloads {
    store: Arc<dyn StoreProfile>,
    searcher: Arc<Searcher>,
}

impl Payloads {
    pub fn new(store: Arc<dyn StoreProfile>, searcher: Arc<Searcher>) -> Self {
        Payloads { store, searcher }
    }

    /// The search parameters filters are checked and evaluated with.
    pub(crate) fn search_registry(&self) -> &crate::fhir::search::registry::Registry {
        &self.searcher.registry
    }

    /// The event as a notification carries it. `shapes` are the topic's notificationShapes.
    pub(crate) async fn event(&self, content: Content, shapes: &[Shape], p: &Pending) -> Event {
        let number = p.event_number;
        let p = &*p.event;
        let mut resource = p.resource.clone();
        if resource.is_none()
            && content == Content::FullResource
            && p.interaction != Interaction::Delete
        {
            // The body was not queued (no full-resource subscription existed when the event
            // was): the event's own version, read from the store.
            resource = self.read_event_version(p).await;
        }
        let related = match (&resource, content) {
            (Some(r), Content::FullResource) => self.related(shapes, r).await,
            _ => Vec::new(),
        };
        Event {
            event_number: number,
            resource_type: p.resource_type.clone(),
            resource_id: p.resource_id.clone(),
            interaction: p.interaction,
            timestamp: p.commit_time,
            resource,
            related,
        }
    }

    /// What the notificationShapes for this focus add: `include` follows the focus's
    /// reference parameters, `revInclude` finds resources whose parameter refers to it.
    async fn related(&self, shapes: &[Shape], focus: &Value) -> Vec<Value> {
        let ty = focus["resourceType"].as_str().unwrap_or_default();
        let id = focus["id"].as_str().unwrap_or_default();
        let mut out: Vec<Value> = Vec::new();
        let add = |r: Value, out: &mut Vec<Value>| {
            let same = |x: &Value| x["resourceType"] == r["resourceType"] && x["id"] == r["id"];
            let is_focus = r["resourceType"] == ty && r["id"] == id;
            if !is_focus && !out.iter().any(same) {
                out.push(r);
            }
        };
        for shape in shapes.iter().filter(|s| s.resource_type == ty) {
            for inc in &shape.include {
                let spec = inc.split('&').next().unwrap_or(inc);
                let mut parts = spec.split(':');
                let (Some(src), Some(code)) = (parts.next(), parts.next()) else {
                    continue;
                };
                let target = parts.next();
                if src != ty {
                    continue;
                }
                let Some(param) = self.searcher.registry.get(src, code) else {
                    tracing::warn!(include = %inc, "notificationShape include names no known search parameter");
                    continue;
                };
                let prepared = self.searcher.fp.prepare(focus, None, Some(focus));
                let Ok(Values::Reference(refs)) = self.searcher.values(&prepared, &param).await
                else {
                    continue;
                };
                for r in refs {
                    let Some((rt, rid)) = r.split_once('/') else {
                        continue;
                    };
                    if target.is_some_and(|t| t != rt) {
                        continue;
                    }
                    if let Some(res) = self.read_store(rt, rid).await {
                        add(res, &mut out);
                    }
                }
            }
            for rev in &shape.rev_include {
                let spec = rev.split('&').next().unwrap_or(rev);
                let mut parts = spec.split(':');
                let (Some(src), Some(code)) = (parts.next(), parts.next()) else {
                    continue;
                };
                for res in self.referring(src, code, &format!("{ty}/{id}")).await {
                    add(res, &mut out);
                }
            }
        }
        out
    }

    /// Resources of `src` whose search parameter `code` refers to `reference`, found by the
    /// store profile on the element the parameter reads.
    async fn referring(&self, src: &str, code: &str, reference: &str) -> Vec<Value> {
        let Some(param) = self.searcher.registry.get(src, code) else {
            tracing::warn!(rev_include = %format!("{src}:{code}"), "notificationShape revInclude names no known search parameter");
            return Vec::new();
        };
        let Some(path) = element_path(src, &param.expression) else {
            tracing::debug!(rev_include = %format!("{src}:{code}"), "revInclude path not simple; skipped");
            return Vec::new();
        };
        match self
            .store
            .referring(src, &path, reference, REV_INCLUDE_LIMIT)
            .await
        {
            Ok(list) => list,
            Err(e) => {
                tracing::warn!(rev_include = %format!("{src}:{code}"), error = %e, "revInclude read failed");
                Vec::new()
            }
        }
    }

    /// The version of the event from the store's history; else the current version when it
    /// is that version. Never another version: a notification says what happened then.
    async fn read_event_version(&self, p: &TopicEvent) -> Option<Value> {
        let (ty, id) = (&p.resource_type, &p.resource_id);
        let Some(version) = &p.version_id else {
            return self.read_store(ty, id).await;
        };
        match self.store.read_version(ty, id, version).await {
            Ok(Some(r)) => return Some(r),
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(reference = %format!("{ty}/{id}"), error = %e, "store read of the event's version failed");
            }
        }
        let current = self.read_store(ty, id).await?;
        if current["meta"]["versionId"].as_str() == Some(version.as_str()) {
            return Some(current);
        }
        tracing::info!(reference = %format!("{ty}/{id}"), version = %version, "the event's version is no longer in the store; the notification carries the reference only");
        None
    }

    async fn read_store(&self, resource_type: &str, id: &str) -> Option<Value> {
        match self.store.read(resource_type, id).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(reference = %format!("{resource_type}/{id}"), error = %e, "store read for a payload failed");
                None
            }
        }
    }
}

/// The element a search parameter reads, when it is a plain one: `Observation.encounter`
/// → `encounter`.
fn element_path(src: &str, expression: &str) -> Option<String> {
    let path = expression
        .split('|')
        .next()
        .unwrap_or("")
        .trim()
        .trim_start_matches('(')
        .strip_prefix(&format!("{src}."))
        .map(|p| p.split(['.', '(', ' ']).next().unwrap_or(""))
        .unwrap_or("");
    (!path.is_empty() && path.chars().all(|c| c.is_ascii_alphanumeric())).then(|| path.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn element_paths() {
        assert_eq!(
            element_path("Observation", "Observation.encounter").as_deref(),
            Some("encounter")
        );
        assert_eq!(
            element_path(
                "Observation",
                "Observation.subject.where(resolve() is Patient)"
            )
            .as_deref(),
            Some("subject")
        );
        assert_eq!(element_path("Observation", "Condition.encounter"), None);
    }
}
