//! SubscriptionTopic: what of a topic the daemon understands, parsed once at load time so
//! matching on the capture hot path is a type compare and a bit test.

use serde_json::Value;

use super::resource_types::is_resource_type;
use super::vocab::Content;
pub use super::vocab::Interaction;

/// A set of interactions as a bit mask: an absent `supportedInteraction` means all three.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Interactions(u8);

impl Interactions {
    pub(crate) const ALL: Interactions = Interactions(7);

    pub fn contains(self, i: Interaction) -> bool {
        self.0 & i.bit() != 0
    }
}

/// `resourceTrigger.queryCriteria`, as written (evaluated by a later version).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct QueryCriteria {
    pub previous: Option<String>,
    pub current: Option<String>,
    pub(crate) result_for_create: Option<String>,
    pub(crate) result_for_delete: Option<String>,
    pub require_both: Option<bool>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ResourceTrigger {
    pub resource_type: String,
    pub interactions: Interactions,
    pub query_criteria: Option<QueryCriteria>,
    pub fhirpath_criteria: Option<String>,
}

/// One `canFilterBy` entry: a filter parameter a subscription may use for a resource type.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct CanFilterBy {
    pub(crate) resource_type: Option<String>,
    pub(crate) parameter: String,
    /// Comparators a subscription may use (empty: any the type allows).
    pub(crate) comparators: Vec<String>,
    /// Modifiers a subscription may use (empty: any the type allows; `=` means none).
    pub(crate) modifiers: Vec<String>,
    /// `filterDefinition`: the canonical of the SearchParameter that defines the filter.
    pub(crate) filter_definition: Option<String>,
    /// An explicit FHIRPath (TOML topics: `expression` with `type`) for a filter that no
    /// SearchParameter defines.
    pub(crate) expression: Option<(String, String)>,
}

/// One `notificationShape`: for a focus of `resource_type`, the resources to add.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Shape {
    pub(crate) resource_type: String,
    /// `Encounter:patient` (source type, reference parameter, optional target type).
    pub(crate) include: Vec<String>,
    /// `Observation:encounter`: resources of that type whose parameter refers to the focus.
    pub(crate) rev_include: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct Topic {
    pub url: String,
    /// The id the API serves it under (`SubscriptionTopic/{id}`).
    pub(crate) id: String,
    pub triggers: Vec<ResourceTrigger>,
    pub(crate) can_filter_by: Vec<CanFilterBy>,
    /// The most a notification of this topic may carry (`maxContent`; TOML `max_content`):
    /// subscriptions asking for more get this.
    pub(crate) max_content: Option<Content>,
    /// `notificationShape`: what full-resource notifications add per focus type.
    pub(crate) shapes: Vec<Shape>,
    /// The resource as given, for `GET /SubscriptionTopic`.
    pub(crate) resource: Value,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum TopicError {
    #[error("not a SubscriptionTopic (resourceType is {0:?}, and not a backport Basic topic)")]
    NotATopic(String),
    #[error(
        "SubscriptionTopic {url}: maxContent {value:?} is not empty, id-only or full-resource"
    )]
    BadMaxContent { url: String, value: String },
    #[error("SubscriptionTopic.url is required")]
    MissingUrl,
    #[error("SubscriptionTopic {url}: needs at least one resourceTrigger (eventTrigger is not supported)")]
    NoTrigger { url: String },
    #[error("SubscriptionTopic {url}: resourceTrigger[{index}].resource {resource:?} is not a FHIR resource type")]
    UnknownResource {
        url: String,
        index: usize,
        resource: String,
    },
    #[error("SubscriptionTopic {url}: resourceTrigger[{index}].supportedInteraction {value:?} is not create, update or delete")]
    BadInteraction {
        url: String,
        index: usize,
        value: String,
    },
}

/// The strings of the array `k` of `v` (none when absent).
fn strings(v: &Value, k: &str) -> Vec<String> {
    v.get(k)
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// `resourceTrigger[index]`: its resource type, interactions and criteria.
fn read_trigger(url: &str, index: usize, t: &Value) -> Result<ResourceTrigger, TopicError> {
    let resource = t.get("resource").and_then(Value::as_str).unwrap_or("");
    let ty = resource_type_of(resource);
    if !is_resource_type(ty) {
        return Err(TopicError::UnknownResource {
            url: url.to_string(),
            index,
            resource: resource.into(),
        });
    }
    let query_criteria = t.get("queryCriteria").map(|q| {
        let s = |k: &str| q.get(k).and_then(Value::as_str).map(str::to_string);
        QueryCriteria {
            previous: s("previous"),
            current: s("current"),
            result_for_create: s("resultForCreate"),
            result_for_delete: s("resultForDelete"),
            require_both: q.get("requireBoth").and_then(Value::as_bool),
        }
    });
    let fhirpath_criteria = t
        .get("fhirPathCriteria")
        .and_then(Value::as_str)
        .map(str::to_string);
    let interactions = match t.get("supportedInteraction").and_then(Value::as_array) {
        None => Interactions::ALL,
        Some(a) if a.is_empty() => Interactions::ALL,
        Some(a) => {
            let mut mask = 0u8;
            for i in a {
                let s = i.as_str().unwrap_or("");
                let parsed = Interaction::parse(s).ok_or_else(|| TopicError::BadInteraction {
                    url: url.to_string(),
                    index,
                    value: s.into(),
                })?;
                mask |= parsed.bit();
            }
            Interactions(mask)
        }
    };
    Ok(ResourceTrigger {
        resource_type: ty.to_string(),
        interactions,
        query_criteria,
        fhirpath_criteria,
    })
}

/// `canFilterBy`: entries without a `filterParameter` are skipped.
fn read_can_filter_by(v: &Value) -> Vec<CanFilterBy> {
    let Some(a) = v.get("canFilterBy").and_then(Value::as_array) else {
        return Vec::new();
    };
    a.iter()
        .filter_map(|c| {
            let parameter = c.get("filterParameter")?.as_str()?.to_string();
            let resource_type = c
                .get("resource")
                .and_then(Value::as_str)
                .map(|r| resource_type_of(r).to_string());
            let text = |k: &str| c.get(k).and_then(Value::as_str).map(str::to_string);
            Some(CanFilterBy {
                resource_type,
                parameter,
                comparators: strings(c, "comparator"),
                modifiers: strings(c, "modifier"),
                filter_definition: text("filterDefinition"),
                expression: text("expression").zip(text("type")),
            })
        })
        .collect()
}

/// `notificationShape`: the includes and revIncludes per resource type.
fn read_shapes(v: &Value) -> Vec<Shape> {
    let Some(a) = v.get("notificationShape").and_then(Value::as_array) else {
        return Vec::new();
    };
    a.iter()
        .filter_map(|n| {
            Some(Shape {
                resource_type: resource_type_of(n.get("resource")?.as_str()?).to_string(),
                include: strings(n, "include"),
                rev_include: strings(n, "revInclude"),
            })
        })
        .collect()
}

/// `http://hl7.org/fhir/StructureDefinition/Encounter` → `Encounter`.
pub(crate) fn resource_type_of(canonical: &str) -> &str {
    canonical.rsplit('/').next().unwrap_or(canonical)
}

impl Topic {
    /// Reads a SubscriptionTopic (R4B, R5, R6) or the Backport IG's R4 `Basic` form.
    /// Reading does not decide whether this version can evaluate it: see [`Topic::evaluable`].
    pub fn from_json(v: &Value) -> Result<Self, TopicError> {
        let rt = v.get("resourceType").and_then(Value::as_str).unwrap_or("");
        if rt == "Basic" && is_backport_topic(v) {
            return Self::from_json(&basic_to_topic(v));
        }
        if rt != "SubscriptionTopic" {
            return Err(TopicError::NotATopic(rt.to_string()));
        }
        let url = v
            .get("url")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .ok_or(TopicError::MissingUrl)?
            .to_string();
        let id = v
            .get("id")
            .and_then(Value::as_str)
            .map(str::to_string)
            .unwrap_or_else(|| slug(&url));
        let list = v.get("resourceTrigger").and_then(Value::as_array);
        let mut triggers = Vec::new();
        for (index, t) in list.into_iter().flatten().enumerate() {
            triggers.push(read_trigger(&url, index, t)?);
        }
        let mut resource = v.clone();
        if let Some(o) = resource.as_object_mut() {
            o.insert("id".into(), Value::String(id.clone()));
        }
        let max_content = match v.get("maxContent").and_then(Value::as_str) {
            None => None,
            Some(c) => Some(Content::parse(c).ok_or_else(|| TopicError::BadMaxContent {
                url: url.clone(),
                value: c.into(),
            })?),
        };
        Ok(Topic {
            can_filter_by: read_can_filter_by(v),
            shapes: read_shapes(v),
            url,
            id,
            triggers,
            max_content,
            resource,
        })
    }

    /// Whether the topic has something this server evaluates: at least one
    /// resourceTrigger (eventTrigger-only topics are refused). Criteria are checked when the
    /// topic is compiled against the search parameters ([`crate::fhir::trigger::compile`]).
    pub fn evaluable(&self) -> Result<(), TopicError> {
        if self.triggers.is_empty() {
            return Err(TopicError::NoTrigger {
                url: self.url.clone(),
            });
        }
        Ok(())
    }

    /// Does a change of this type and interaction fire the topic?
    pub fn matches(&self, resource_type: &str, interaction: Interaction) -> bool {
        self.triggers
            .iter()
            .any(|t| t.resource_type == resource_type && t.interactions.contains(interaction))
    }

    /// Is `parameter` a filter the topic allows for `resource_type` (or for any type)?
    pub fn allows_filter(&self, resource_type: Option<&str>, parameter: &str) -> bool {
        self.can_filter_by.iter().any(|c| {
            c.parameter == parameter
                && match (&c.resource_type, resource_type) {
                    (Some(a), Some(b)) => a == b,
                    _ => true,
                }
        })
    }
}

const TOPIC_EXT: &str = "extension-SubscriptionTopic.";

/// A `Basic` whose code is `SubscriptionTopic` or that carries the topic extensions.
fn is_backport_topic(v: &Value) -> bool {
    let coded = v["code"]["coding"]
        .as_array()
        .is_some_and(|c| c.iter().any(|c| c["code"] == "SubscriptionTopic"));
    coded
        || v["extension"].as_array().is_some_and(|a| {
            a.iter()
                .any(|e| e["url"].as_str().is_some_and(|u| u.contains(TOPIC_EXT)))
        })
}

/// The `value[x]` of an extension.
fn ext_value(e: &Value) -> Option<&Value> {
    e.as_object()?
        .iter()
        .find(|(k, _)| k.starts_with("value"))
        .map(|(_, v)| v)
}

/// Elements that repeat in SubscriptionTopic's backbone elements.
const REPEATING: &[&str] = &[
    "supportedInteraction",
    "comparator",
    "modifier",
    "include",
    "revInclude",
];

/// A complex extension as the backbone element it stands for.
fn complex(e: &Value) -> Value {
    let mut out = serde_json::Map::new();
    for sub in e["extension"].as_array().into_iter().flatten() {
        let Some(key) = sub["url"].as_str() else {
            continue;
        };
        let value = if sub.get("extension").is_some() {
            complex(sub)
        } else {
            match ext_value(sub) {
                Some(v) => v.clone(),
                None => continue,
            }
        };
        if REPEATING.contains(&key) {
            let slot = out
                .entry(key.to_string())
                .or_insert_with(|| Value::Array(vec![]));
            if let Some(a) = slot.as_array_mut() {
                a.push(value);
            }
        } else {
            out.insert(key.to_string(), value);
        }
    }
    Value::Object(out)
}

/// The Backport IG's R4 topic (`Basic` with cross-version extensions) as a SubscriptionTopic.
pub(crate) fn basic_to_topic(v: &Value) -> Value {
    let mut t = serde_json::Map::new();
    t.insert("resourceType".into(), "SubscriptionTopic".into());
    if let Some(id) = v.get("id") {
        t.insert("id".into(), id.clone());
    }
    let exts = v["extension"]
        .as_array()
        .into_iter()
        .flatten()
        .chain(v["modifierExtension"].as_array().into_iter().flatten());
    for e in exts {
        let Some(name) = e["url"].as_str().and_then(|u| u.split(TOPIC_EXT).nth(1)) else {
            continue;
        };
        match name {
            "resourceTrigger" | "canFilterBy" | "notificationShape" | "eventTrigger" => {
                let slot = t
                    .entry(name.to_string())
                    .or_insert_with(|| Value::Array(vec![]));
                if let Some(a) = slot.as_array_mut() {
                    a.push(complex(e));
                }
            }
            _ => {
                if let Some(val) = ext_value(e) {
                    t.insert(name.to_string(), val.clone());
                }
            }
        }
    }
    Value::Object(t)
}

/// A FHIR id from a URL: its last path segment, cut to the allowed characters.
fn slug(url: &str) -> String {
    let last = url.trim_end_matches('/').rsplit('/').next().unwrap_or(url);
    let s: String = last
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '-'
            }
        })
        .take(64)
        .collect();
    if s.is_empty() {
        "topic".into()
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn topic(trigger: Value) -> Result<Topic, TopicError> {
        Topic::from_json(&json!({
            "resourceType": "SubscriptionTopic",
            "url": "http://example.org/topics/enc-start",
            "status": "active",
            "resourceTrigger": [trigger],
            "canFilterBy": [{"resource": "Encounter", "filterParameter": "patient"}]
        }))
    }

    #[test]
    fn canonical_resource_and_interactions() {
        let t = topic(
            json!({"resource": "http://hl7.org/fhir/StructureDefinition/Encounter",
                             "supportedInteraction": ["create", "delete"]}),
        )
        .unwrap();
        assert_eq!(t.id, "enc-start");
        assert!(t.matches("Encounter", Interaction::Create));
        assert!(t.matches("Encounter", Interaction::Delete));
        assert!(!t.matches("Encounter", Interaction::Update));
        assert!(!t.matches("Observation", Interaction::Create));
        assert!(t.allows_filter(Some("Encounter"), "patient"));
        assert!(!t.allows_filter(Some("Encounter"), "status"));
    }

    #[test]
    fn absent_interactions_mean_all() {
        let t = topic(json!({"resource": "Encounter"})).unwrap();
        for i in [
            Interaction::Create,
            Interaction::Update,
            Interaction::Delete,
        ] {
            assert!(t.matches("Encounter", i));
        }
    }

    #[test]
    fn refusals_say_what_is_wrong() {
        assert!(matches!(
            topic(json!({"resource": "Encountr"})),
            Err(TopicError::UnknownResource { .. })
        ));
        assert!(matches!(
            topic(json!({"resource": "Encounter", "supportedInteraction": ["read"]})),
            Err(TopicError::BadInteraction { .. })
        ));
        let t = topic(
            json!({"resource": "Encounter", "queryCriteria": {"current": "status=finished"}}),
        )
        .unwrap();
        let q = t.triggers[0].query_criteria.as_ref().unwrap();
        assert_eq!(q.current.as_deref(), Some("status=finished"));
        assert!(t.evaluable().is_ok());
        assert_eq!(
            Topic::from_json(&json!({"resourceType": "Patient"})).unwrap_err(),
            TopicError::NotATopic("Patient".into())
        );
    }
}
