//! Capture's lazy path (parse only the members the topics' plans read, give the FHIRPath
//! engine the complete resource when an expression has no plan) against the full path
//! (parse everything) on the workload generator's resources of every type: the same events
//! fire, with the same canFilterBy values, for every search parameter of each type.
//!
//! No Postgres: the changes go straight to the matcher, as the stream hands them over.

use bytes::Bytes;
use chrono::Utc;
use fhir_cdc::capture::assemble::{Commit, ResourceChange};
use fhir_cdc::capture::control::{Active, ActiveTopics};
use fhir_cdc::capture::matcher::Matcher;
use fhir_cdc::config::FhirVersion;
use fhir_cdc::fhir::fhirpath::FhirPath;
use fhir_cdc::fhir::fields::Fields;
use fhir_cdc::fhir::search::registry::Registry;
use fhir_cdc::fhir::search::Searcher;
use fhir_cdc::fhir::topic::{Interaction, Topic};
use fhir_cdc::fhir::trigger;
use fhir_cdc::queue::batch::QueuedEvent;
use fhir_cdc::store::{Body, Format, RowChange};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

#[path = "../support/jsonb_text.rs"]
mod jsonb;
use jsonb::jsonb_text;

/// Resources of the workload by type, at most `per_type` of each.
fn resources(per_type: usize) -> BTreeMap<String, Vec<Value>> {
    let path = crate::common::workload_file(&["3000", "7", "resources"]);
    let mut by_type: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for line in std::fs::read_to_string(&path).unwrap().lines() {
        let r: Value = serde_json::from_str(line).unwrap();
        let ty = r["resourceType"].as_str().unwrap().to_string();
        let list = by_type.entry(ty).or_default();
        if list.len() < per_type {
            list.push(r);
        }
    }
    by_type
}

/// For each type: one topic filtering by every search parameter of the type (composites
/// aside: see below), with or without a plan; one with
/// queryCriteria on its status-like and date parameters; one with a plain-path
/// fhirPathCriteria (decided on the JSON) and one only the engine decides.
fn topics(registry: &Registry, types: &[String]) -> Vec<Value> {
    let mut out = Vec::new();
    for ty in types {
        // Composite parameters (`Observation`, `Observation | Observation.component`) read
        // the resource itself, so a topic using one parses it whole: they are left out here
        // to keep the lazy path lazy; every other parameter of the type is in.
        let params: Vec<Value> = registry
            .of_type(ty)
            .iter()
            .filter(|p| p.plan.as_ref().is_none_or(|plan| plan.top_keys().is_some()))
            .map(|p| json!({"resource": ty, "filterParameter": p.code}))
            .collect();
        out.push(
            json!({"resourceType": "SubscriptionTopic", "url": format!("http://t/{ty}/all"),
            "status": "active",
            "resourceTrigger": [{"resource": ty, "supportedInteraction": ["create", "update"]}],
            "canFilterBy": params}),
        );
        let status = if registry.get(ty, "status").is_some() {
            "status:not=entered-in-error"
        } else {
            "_lastUpdated=ge2000-01-01"
        };
        out.push(
            json!({"resourceType": "SubscriptionTopic", "url": format!("http://t/{ty}/query"),
            "status": "active",
            "resourceTrigger": [{"resource": ty, "supportedInteraction": ["create", "update"],
                "queryCriteria": {"previous": status, "current": status,
                    "resultForCreate": "test-passes", "requireBoth": false}}]}),
        );
        out.push(json!({"resourceType": "SubscriptionTopic", "url": format!("http://t/{ty}/fast"),
            "status": "active",
            "resourceTrigger": [{"resource": ty, "supportedInteraction": ["create", "update"],
                "fhirPathCriteria": "%current.status = 'final' or %current.status = 'active' or %previous.status != %current.status"}]}));
        out.push(json!({"resourceType": "SubscriptionTopic", "url": format!("http://t/{ty}/engine"),
            "status": "active",
            "resourceTrigger": [{"resource": ty, "supportedInteraction": ["create", "update"],
                "fhirPathCriteria": "%current.descendants().ofType(Coding).where(code.exists()).count() > 1 or %current.identifier.exists()"}]}));
    }
    out
}

/// `r` as Aidbox stores it, at the top level (where capture reads canFilterBy members from
/// their text): references `{"resourceType", "id"}` (`uri` for absolute ones, `localRef` for
/// contained ones), choices `"value": {"Quantity": {…}}`. What the converter reads back.
fn aidbox_shape(r: &Value) -> Value {
    fn reference(v: &Value) -> Value {
        let Some(o) = v.as_object() else {
            return v.clone();
        };
        let Some(r) = o.get("reference").and_then(Value::as_str) else {
            return v.clone();
        };
        let mut out = o.clone();
        out.remove("reference");
        match r.split_once('/') {
            _ if r.starts_with('#') => {
                out.insert("localRef".into(), json!(&r[1..]));
            }
            Some((t, id)) if !id.contains('/') && t.starts_with(char::is_uppercase) => {
                out.insert("resourceType".into(), json!(t));
                out.insert("id".into(), json!(id));
            }
            _ => {
                out.insert("uri".into(), json!(r));
            }
        }
        Value::Object(out)
    }
    const CHOICES: [&str; 12] = [
        "value",
        "effective",
        "onset",
        "abatement",
        "deceased",
        "multipleBirth",
        "occurrence",
        "performed",
        "born",
        "timing",
        "medication",
        "reported",
    ];
    let mut out = serde_json::Map::new();
    for (k, v) in r.as_object().unwrap() {
        let v = match v {
            Value::Array(items) => Value::Array(items.iter().map(reference).collect()),
            v => reference(v),
        };
        let choice = CHOICES.iter().find_map(|p| {
            let ty = k.strip_prefix(p)?;
            ty.starts_with(char::is_uppercase).then_some((*p, ty))
        });
        match choice {
            Some((p, ty)) if !out.contains_key(p) => {
                // Aidbox names primitive types as FHIR does (`dateTime`), complex ones too.
                let ty = if v.is_object() {
                    ty.to_string()
                } else {
                    let mut c = ty.chars();
                    c.next().unwrap().to_lowercase().chain(c).collect()
                };
                out.insert(p.to_string(), json!({ ty: v }));
            }
            _ => {
                out.insert(k.clone(), v);
            }
        }
    }
    Value::Object(out)
}

/// A change of `current` (an update from `previous` when given), its body as the store's
/// text column holds it or, with `jsonb`, as a `jsonb` column's text output; in Aidbox's
/// format with `aidbox`.
fn change(
    current: &Value,
    previous: Option<&Value>,
    n: usize,
    jsonb: bool,
    aidbox: bool,
) -> ResourceChange {
    let body = |r: &Value| {
        let shaped;
        let r = if aidbox {
            shaped = aidbox_shape(r);
            &shaped
        } else {
            r
        };
        if jsonb {
            Body::Jsonb(Bytes::from(jsonb_text(r)))
        } else {
            Body::Text(Bytes::from(r.to_string()))
        }
    };
    let row = |r: &Value, i: Interaction| RowChange {
        resource_type: r["resourceType"].as_str().unwrap().into(),
        id: r["id"].as_str().unwrap_or("x").into(),
        version_id: Some(n.to_string()),
        last_updated: Some("2026-12-01T00:00:00+00:00".into()),
        interaction: i,
        body: body(r),
        tenant: None,
        key: None,
        format: if aidbox {
            Format::aidbox(FhirVersion::R4)
        } else {
            Format::Fhir
        },
    };
    let interaction = if previous.is_some() {
        Interaction::Update
    } else {
        Interaction::Create
    };
    ResourceChange {
        relation_id: 1,
        current: std::sync::Arc::new(row(current, interaction)),
        previous: previous.map(|p| row(p, Interaction::Update)),
        commit: Commit {
            lsn: n as u64,
            xid: n as u32,
            time: Utc::now(),
        },
    }
}

fn summary(e: Option<QueuedEvent>) -> Option<(Vec<String>, Option<Value>)> {
    e.map(|e| {
        (
            e.topics.iter().map(|t| t.to_string()).collect(),
            e.filters
                .map(|f| serde_json::from_str::<Value>(&f).expect("filters are JSON")),
        )
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lazy_and_full_parsing_give_the_same_events_and_filter_values() {
    let by_type = resources(60);
    assert!(by_type.len() >= 5, "types: {:?}", by_type.keys());
    let v = FhirVersion::R4;
    let searcher = Arc::new(Searcher {
        fp: FhirPath::new(v).await.unwrap(),
        registry: Arc::new(Registry::load(v)),
    });
    let types: Vec<String> = by_type.keys().cloned().collect();
    let active: Vec<Active> = topics(&searcher.registry, &types)
        .iter()
        .map(|t| {
            let t = Topic::from_json(t).unwrap();
            let c = trigger::compile(&t, &searcher.registry, &searcher.fp).unwrap();
            Active::new(t, c, None)
        })
        .collect();
    let topics = ActiveTopics::new(active, searcher.clone());
    let lazy_fields = topics.fields();
    // The lazy path really is lazy: most members of each type are left unparsed, and the
    // canFilterBy walks of one member read their text (no `Value`) for most types.
    for (ty, f) in &lazy_fields {
        assert!(!f.is_all(), "{ty}: the plans read a bounded set of members");
    }
    let as_text = lazy_fields
        .values()
        .filter(|f| !f.text_keys().is_empty())
        .count();
    assert!(
        as_text * 2 > lazy_fields.len(),
        "{as_text} of {} types",
        lazy_fields.len()
    );
    let obs = &lazy_fields["Observation"];
    // (`code` and `value` are parsed: combo-code and combo-value-quantity read them with
    // `component`, which is not a one-member walk.)
    for k in [
        "subject",
        "effectiveDateTime",
        "effective",
        "performer",
        "identifier",
    ] {
        assert!(obs.text_keys().iter().any(|t| t == k), "Observation {k}");
    }
    let mut lazy_m = Matcher::new(searcher.clone());
    lazy_m.set_wanted(lazy_fields);
    let mut full_m = Matcher::new(searcher.clone());
    full_m.set_wanted(
        types
            .iter()
            .map(|t| (t.clone(), Arc::new(Fields::all())))
            .collect::<HashMap<_, _>>(),
    );
    let (mut compared, mut with_filters) = (0, 0);
    // FHIR JSON, and Aidbox's format (references and choices as Aidbox stores them).
    for aidbox in [false, true] {
        for list in by_type.values() {
            for (i, r) in list.iter().enumerate() {
                // A create, and an update from the type's previous resource.
                let prev = (i > 0).then(|| &list[i - 1]);
                for (c, j) in [
                    (
                        change(r, None, i, false, aidbox),
                        change(r, None, i, true, aidbox),
                    ),
                    (
                        change(r, prev, i, false, aidbox),
                        change(r, prev, i, true, aidbox),
                    ),
                ] {
                    let a = summary(lazy_m.event(&topics.active, &c).await);
                    let b = summary(full_m.event(&topics.active, &c).await);
                    assert_eq!(a, b, "{} (aidbox: {aidbox})", c.current.reference());
                    // A jsonb body is read only up to the longest name a topic keeps.
                    let a = summary(lazy_m.event(&topics.active, &j).await);
                    assert_eq!(a, b, "{} (jsonb, aidbox: {aidbox})", j.current.reference());
                    compared += 1;
                    with_filters += usize::from(b.is_some_and(|(_, f)| f.is_some()));
                }
            }
        }
    }
    // Progress: changes were compared, and they carried filter values.
    assert!(compared >= 600, "{compared} changes compared");
    assert!(with_filters >= compared / 2, "{with_filters} of {compared}");
}

/// The values `filters` holds for `topic`: its own map under `@topic` when it has one, else
/// the shared ones.
fn topic_filters(filters: &Value, topic: &str) -> Value {
    filters
        .get("@topic")
        .and_then(|own| own.get(topic))
        .cloned()
        .unwrap_or_else(|| {
            let mut shared = filters.clone();
            if let Some(o) = shared.as_object_mut() {
                o.remove("@topic");
            }
            shared
        })
}

/// Topics that share criteria or a canFilterBy set are decided once per change (the
/// matcher remembers each criteria key and each filter set); each topic must still get what
/// it gets alone. Every topic of the lazy comparison twice over (each key shared), a topic
/// whose criteria give no decision under two policies, and one filtering by one parameter:
/// on every change, the event's topics are exactly those that fire alone, and each fired
/// topic's filter values are those it has alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_sharing_criteria_each_fire_as_they_do_alone() {
    let by_type = resources(25);
    let v = FhirVersion::R4;
    let searcher = Arc::new(Searcher {
        fp: FhirPath::new(v).await.unwrap(),
        registry: Arc::new(Registry::load(v)),
    });
    let types: Vec<String> = by_type.keys().cloned().collect();
    let mut defs = topics(&searcher.registry, &types);
    let twins: Vec<Value> = defs
        .iter()
        .map(|t| {
            let mut t = t.clone();
            t["url"] = json!(format!("{}/twin", t["url"].as_str().unwrap()));
            t
        })
        .collect();
    defs.extend(twins);
    let mut extra = Vec::new();
    for ty in &types {
        // A string, not a boolean: no decision; `notify` fires and `skip` does not.
        for policy in ["notify", "skip"] {
            extra.push((
                json!({"resourceType": "SubscriptionTopic", "url": format!("http://t/{ty}/undecided/{policy}"),
                "status": "active",
                "resourceTrigger": [{"resource": ty, "supportedInteraction": ["create", "update"],
                    "fhirPathCriteria": "%current.id"}]}),
                Some(policy),
            ));
        }
        // One parameter each, of the same kind: different sets that only their names and
        // expressions tell apart.
        let params = searcher.registry.of_type(ty);
        let token = params
            .iter()
            .filter(|p| {
                p.plan
                    .as_ref()
                    .is_some_and(|plan| plan.top_keys().is_some())
            })
            .filter(|p| format!("{p:?}").contains("kind: Token"))
            .take(2);
        for (i, p) in std::iter::once("_id")
            .chain(token.map(|p| p.code.as_str()))
            .enumerate()
        {
            extra.push((
                json!({"resourceType": "SubscriptionTopic", "url": format!("http://t/{ty}/one-filter/{i}"),
                "status": "active",
                "resourceTrigger": [{"resource": ty, "supportedInteraction": ["create", "update"]}],
                "canFilterBy": [{"resource": ty, "filterParameter": p}]}),
                None,
            ));
        }
    }
    let compile = |t: &Value, policy: Option<&str>| {
        let t = Topic::from_json(t).unwrap();
        let mut c = trigger::compile(&t, &searcher.registry, &searcher.fp).unwrap();
        if let Some(p) = policy {
            c.on_error = match p {
                "notify" => trigger::OnCriteriaError::Notify,
                _ => trigger::OnCriteriaError::Skip,
            };
        }
        Active::new(t, c, None)
    };
    let all: Vec<(Value, Option<&str>)> = defs
        .into_iter()
        .map(|t| (t, None))
        .chain(extra.clone())
        .collect();
    let (mut changes, mut shared_fired, mut undecided_fired) = (0, 0, 0);
    // With every topic, then with the small ones alone: there no topic filtering by every
    // parameter puts the values of a set the matcher wrongly took as done in `shared`.
    for set in [all, extra] {
        let topics = ActiveTopics::new(
            set.iter().map(|(t, p)| compile(t, *p)).collect(),
            searcher.clone(),
        );
        let mut together = Matcher::new(searcher.clone());
        together.set_wanted(topics.fields());
        let alone: Vec<ActiveTopics> = set
            .iter()
            .map(|(t, p)| ActiveTopics::new(vec![compile(t, *p)], searcher.clone()))
            .collect();
        for list in by_type.values() {
            for (i, r) in list.iter().enumerate() {
                let prev = (i > 0).then(|| &list[i - 1]);
                for c in [
                    change(r, None, i, true, false),
                    change(r, prev, i, true, false),
                ] {
                    let got = summary(together.event(&topics.active, &c).await);
                    let mut want: Vec<String> = Vec::new();
                    for one in &alone {
                        let mut m = Matcher::new(searcher.clone());
                        m.set_wanted(one.fields());
                        let Some((fired, f)) = summary(m.event(&one.active, &c).await) else {
                            continue;
                        };
                        let url = fired[0].clone();
                        let (_, got_f) = got.as_ref().expect("a topic fired alone: an event");
                        if let Some(f) = f {
                            let mine = topic_filters(got_f.as_ref().expect("filters"), &url);
                            for (name, values) in f.as_object().unwrap() {
                                assert_eq!(
                                    mine.get(name),
                                    Some(values),
                                    "{url} {name} on {}",
                                    c.current.reference()
                                );
                            }
                        }
                        want.push(url);
                    }
                    let got_topics = got.map(|(t, _)| t).unwrap_or_default();
                    assert_eq!(got_topics, want, "{}", c.current.reference());
                    changes += 1;
                    shared_fired += got_topics.iter().filter(|t| t.ends_with("/twin")).count();
                    undecided_fired += got_topics
                        .iter()
                        .filter(|t| t.contains("/undecided/"))
                        .count();
                    assert!(!got_topics.iter().any(|t| t.ends_with("/undecided/skip")));
                }
            }
        }
    }
    // Progress: the shared keys were met, and the undecided ones fired under `notify`.
    assert!(changes >= 200, "{changes} changes");
    assert!(
        shared_fired >= changes / 2,
        "{shared_fired} twins fired over {changes} changes"
    );
    assert_eq!(
        undecided_fired, changes,
        "the notify topic fires on every change"
    );
}
