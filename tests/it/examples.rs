//! The official Subscription and SubscriptionTopic examples (R5, R4B, R4 backport) read
//! without error, with the values they state.

use fhir_cdc::config::FhirVersion;
use fhir_cdc::fhir::notification::Format;
use fhir_cdc::fhir::search::registry::Registry;
use fhir_cdc::fhir::subscription::{self, Content, Rules, Status};
use fhir_cdc::fhir::topic::{Interaction, Topic};
use serde_json::Value;
use std::path::PathBuf;

fn examples() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/conformance/examples")
}

fn load(rel: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(examples().join(rel)).unwrap()).unwrap()
}

fn format_of(dir: &str) -> Format {
    match dir {
        "r5" => Format::R5,
        "r4-backport" => Format::R4Backport,
        _ => Format::R4B,
    }
}

#[test]
fn every_subscription_example_reads() {
    let mut n = 0;
    for dir in ["r5", "r4b-core", "r4b-backport", "r4-backport"] {
        for e in std::fs::read_dir(examples().join(dir)).unwrap() {
            let name = e.unwrap().file_name().into_string().unwrap();
            if !name.starts_with("Subscription-") {
                continue;
            }
            let v = load(&format!("{dir}/{name}"));
            let r = subscription::read(&v, format_of(dir));
            assert!(r.is_ok(), "{dir}/{name}: {:?}", r.err());
            n += 1;
        }
    }
    assert!(n >= 8, "only {n} Subscription examples found");
}

#[test]
fn r5_admission_subscription_values() {
    let r = subscription::read(&load("r5/Subscription-admission.json"), Format::R5).unwrap();
    assert_eq!(
        r.topic_url,
        "http://example.org/R5/SubscriptionTopic/admission"
    );
    assert_eq!(r.channel, "rest-hook");
    assert_eq!(
        r.endpoint.as_deref(),
        Some("https://example.org/Endpoints/P123")
    );
    assert_eq!(r.content, Content::IdOnly);
    assert_eq!(
        (r.heartbeat_period, r.timeout, r.max_count),
        (Some(60), Some(5), Some(100))
    );
    assert_eq!(r.filters.len(), 1);
    assert_eq!(
        (r.filters[0].parameter.as_str(), r.filters[0].value.as_str()),
        ("patient", "Patient/123")
    );
    assert!(r.end.is_some());
    assert_eq!(r.status, Status::Active);
}

#[test]
fn r4_backport_subscription_values() {
    let r = subscription::read(
        &load("r4-backport/Subscription-subscription-multi-resource.json"),
        Format::R4Backport,
    )
    .unwrap();
    assert_eq!(r.topic_url, "http://hl7.org/SubscriptionTopic/admission");
    assert_eq!(r.channel, "rest-hook");
    assert_eq!(r.content, Content::IdOnly);
    assert_eq!(r.content_type, "application/fhir+json");
    assert_eq!(
        (r.heartbeat_period, r.timeout, r.max_count),
        (Some(86400), Some(60), Some(20))
    );
    assert_eq!(r.filters.len(), 1);
    let f = &r.filters[0];
    assert_eq!(
        (
            f.resource_type.as_deref(),
            f.parameter.as_str(),
            f.value.as_str()
        ),
        (Some("Observation"), "subject", "Patient/123")
    );
    let r = subscription::read(
        &load("r4b-backport/Subscription-subscription-admission.json"),
        Format::R4B,
    )
    .unwrap();
    assert_eq!(r.filters[0].parameter, "patient");
    assert_eq!(r.filters[0].resource_type.as_deref(), Some("Encounter"));
}

#[test]
fn every_topic_example_reads() {
    let mut n = 0;
    for dir in ["r5", "r4b-core", "r4b-backport", "r4-backport"] {
        for e in std::fs::read_dir(examples().join(dir)).unwrap() {
            let name = e.unwrap().file_name().into_string().unwrap();
            if !(name.starts_with("SubscriptionTopic-") || name.starts_with("Basic-")) {
                continue;
            }
            let t = Topic::from_json(&load(&format!("{dir}/{name}")));
            assert!(t.is_ok(), "{dir}/{name}: {:?}", t.err());
            n += 1;
        }
    }
    assert!(n >= 4, "only {n} topic examples found");
}

#[test]
fn r4_basic_topic_values() {
    let t = Topic::from_json(&load("r4-backport/Basic-r4-encounter-complete.json")).unwrap();
    assert_eq!(
        t.url,
        "http://hl7.org/fhir/uv/subscriptions-backport/SubscriptionTopic/r4-encounter-complete"
    );
    assert_eq!(t.triggers.len(), 1);
    let tr = &t.triggers[0];
    assert_eq!(tr.resource_type, "Encounter");
    assert!(
        tr.interactions.contains(Interaction::Create)
            && tr.interactions.contains(Interaction::Update)
    );
    assert!(!tr.interactions.contains(Interaction::Delete));
    let q = tr.query_criteria.as_ref().unwrap();
    assert_eq!(q.previous.as_deref(), Some("status:not=finished"));
    assert_eq!(q.current.as_deref(), Some("status=finished"));
    assert_eq!(q.require_both, Some(true));
    assert!(tr
        .fhirpath_criteria
        .as_deref()
        .unwrap()
        .contains("%current.status = 'finished'"));
    assert!(t.allows_filter(Some("Encounter"), "subject"));
    assert!(t.evaluable().is_ok());
}

#[test]
fn policy_refuses_what_it_cannot_honour() {
    let topic = Topic::from_json(&load(
        "r4b-backport/SubscriptionTopic-r4b-encounter-complete.json",
    ))
    .unwrap();
    let mut sub = load("r4b-backport/Subscription-subscription-admission.json");
    sub["criteria"] = Value::String(topic.url.clone());
    let topics = [topic];
    let registry = Registry::load(FhirVersion::R4B);
    let rules = Rules {
        registry: Some(&registry),
        topics: &topics,
        format: Format::R4B,
        refuse_private: fhir_cdc::channel::private::rule(false),
        require_https_for_full_resource: true,
        email: Default::default(),
    };
    let e = subscription::parse(&sub, &rules).unwrap_err();
    // The element the filter came from: the backport filter-criteria extension.
    assert_eq!(
        e.expression, "Subscription._criteria.extension[0].valueString",
        "{}",
        e.message
    );
    // Without the filter it is accepted.
    sub.as_object_mut().unwrap().remove("_criteria");
    let spec = subscription::parse(&sub, &rules).unwrap();
    assert_eq!(spec.max_count, Some(20));
}

#[test]
fn every_topic_based_example_subscription_is_accepted_when_its_topic_allows_its_filters() {
    let mut n = 0;
    for (dir, version) in [
        ("r5", FhirVersion::R5),
        ("r4b-backport", FhirVersion::R4B),
        ("r4-backport", FhirVersion::R4),
    ] {
        let registry = Registry::load(version);
        for e in std::fs::read_dir(examples().join(dir)).unwrap() {
            let name = e.unwrap().file_name().into_string().unwrap();
            if !name.starts_with("Subscription-") {
                continue;
            }
            let v = load(&format!("{dir}/{name}"));
            let r = subscription::read(&v, format_of(dir)).unwrap();
            if r.channel != "rest-hook" || r.endpoint.is_none() {
                // A custom channel (zulip) this server does not have, or a rest-hook
                // without an endpoint (r5/Subscription-example): nothing could be sent.
                continue;
            }
            // A topic that allows exactly the example's filters.
            let types: Vec<String> = r
                .filters
                .iter()
                .map(|f| {
                    f.resource_type
                        .clone()
                        .unwrap_or_else(|| "Encounter".into())
                })
                .chain(["Encounter".to_string()])
                .collect();
            let topic = serde_json::json!({
                "resourceType": "SubscriptionTopic",
                "url": r.topic_url,
                "status": "active",
                "resourceTrigger": types.iter().map(|t| serde_json::json!({"resource": t})).collect::<Vec<_>>(),
                "canFilterBy": r.filters.iter().map(|f| serde_json::json!({
                    "resource": f.resource_type.clone().unwrap_or_else(|| "Encounter".into()),
                    "filterParameter": f.parameter
                })).collect::<Vec<_>>()
            });
            let topics = [Topic::from_json(&topic).unwrap()];
            let rules = Rules {
                registry: Some(&registry),
                topics: &topics,
                format: format_of(dir),
                refuse_private: fhir_cdc::channel::private::rule(false),
                require_https_for_full_resource: true,
                email: Default::default(),
            };
            let spec = subscription::parse(&v, &rules);
            assert!(spec.is_ok(), "{dir}/{name}: {:?}", spec.err());
            n += 1;
        }
    }
    assert!(n >= 5, "only {n} examples checked");
}

/// The shipped config files (the Docker image's and the annotated example) load and pass
/// validation as they are, with the environment the compose file gives.
#[test]
fn the_shipped_config_files_load() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("config");
    for name in ["docker.toml", "example.toml"] {
        let path = dir.join(name);
        let cfg = fhir_cdc::config::Config::load(&path);
        assert!(cfg.is_ok(), "{name}: {:?}", cfg.err());
    }
}

/// The commented `[[destination]]` examples of config/example.toml, uncommented, load and
/// pass validation: the keys the docs and the example show are the ones the code takes.
#[test]
fn the_example_destinations_load_when_uncommented() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("config");
    let text = std::fs::read_to_string(dir.join("example.toml")).unwrap();
    let start = text
        .find("# [[destination]]")
        .expect("example destinations");
    let mut out = text[..start].to_string();
    for line in text[start..].lines() {
        match line.strip_prefix("# ") {
            Some(l) if !l.starts_with(' ') => out.push_str(l),
            _ => {}
        }
        out.push('\n');
    }
    let cfg = fhir_cdc::config::Config::from_toml(&out, &dir)
        .unwrap_or_else(|e| panic!("{e}\n{}", &out[start..]));
    let kinds: Vec<_> = cfg.destinations.iter().map(|d| d.kind).collect();
    assert_eq!(
        kinds,
        [
            fhir_cdc::config::BrokerKind::Nats,
            fhir_cdc::config::BrokerKind::Amqp
        ]
    );
    assert!(cfg
        .destinations
        .iter()
        .all(|d| cfg.topics.iter().any(|t| t.topic.url == d.topic)));
}

/// The metric names `src/metrics.rs` declares.
fn exported_metrics() -> Vec<String> {
    let src =
        std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src/metrics.rs"))
            .unwrap();
    src.lines()
        .filter_map(|l| {
            let l = l.trim();
            l.strip_prefix("pub const ")
                .or_else(|| l.strip_prefix("pub(crate) const "))
        })
        .filter_map(|l| l.split('"').nth(1))
        .filter(|n| n.starts_with("fhir_cdc_"))
        .map(str::to_string)
        .collect()
}

/// Every `fhir_cdc_…` name in `text`, with a histogram's series suffix taken off.
fn named_metrics(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find("fhir_cdc_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..end];
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        out.push(base.to_string());
        rest = &tail[end..];
    }
    out
}

/// The alert rules and the dashboard name only metrics the daemon exports.
#[test]
fn deploy_files_name_only_exported_metrics() {
    let exported = exported_metrics();
    assert!(exported.len() >= 20, "{exported:?}");
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("deploy");
    for f in ["prometheus/alerts.yaml", "grafana/fhir-cdc.json"] {
        let text = std::fs::read_to_string(root.join(f)).unwrap();
        let named = named_metrics(&text);
        assert!(named.len() >= 5, "{f} names {named:?}");
        for n in named {
            assert!(
                exported.contains(&n),
                "{f} names {n}, which the daemon does not export"
            );
        }
    }
    assert_eq!(
        named_metrics("rate(fhir_cdc_end_to_end_seconds_bucket[5m]) fhir_cdc_nope"),
        ["fhir_cdc_end_to_end_seconds", "fhir_cdc_nope"]
    );
}

/// The configuration the Kubernetes ConfigMap carries loads.
#[test]
fn the_kubernetes_config_loads() {
    let text = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes/configmap.yaml"),
    )
    .unwrap();
    let body: String = text
        .lines()
        .skip_while(|l| l.trim() != "config.toml: |")
        .skip(1)
        .map(|l| l.strip_prefix("    ").unwrap_or(l.trim()))
        .collect::<Vec<_>>()
        .join("\n");
    assert!(body.contains("[source]"), "{body}");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(&path, body).unwrap();
    let cfg = fhir_cdc::config::Config::load(&path);
    assert!(cfg.is_ok(), "{:?}", cfg.err());
}

/// The commented `[[delivery.endpoint_auth]]` and `[security]` examples of
/// config/example.toml, uncommented, load and pass validation.
#[test]
fn the_example_endpoint_auth_and_security_load_when_uncommented() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("config");
    let text = std::fs::read_to_string(dir.join("example.toml")).unwrap();
    let start = text
        .find("# [[delivery.endpoint_auth]]")
        .expect("example endpoint_auth");
    let end = text
        .find("# [channels.websocket]")
        .expect("the next section");
    let mut out = text[..start].to_string();
    for line in text[start..end].lines() {
        // Settings only (a table header or `key = value`), not the prose around them.
        if let Some(l) = line.strip_prefix("# ") {
            let key = l.split(" = ").next().unwrap_or("");
            let setting = !key.is_empty()
                && l.contains(" = ")
                && key.chars().all(|c| c.is_ascii_lowercase() || c == '_');
            if l.starts_with('[') || setting {
                out.push_str(l);
            }
        }
        out.push('\n');
    }
    out.push_str(&text[end..]);
    let cfg = fhir_cdc::config::Config::from_toml(&out, &dir)
        .unwrap_or_else(|e| panic!("{e}\n{}", &out[start..]));
    let kinds: Vec<_> = cfg
        .delivery
        .endpoint_auth
        .iter()
        .map(|e| (e.prefix.as_str(), e.kind))
        .collect();
    use fhir_cdc::config::EndpointAuthKind::{Mtls, Oauth2};
    assert_eq!(
        kinds,
        [
            ("https://engine.example.org/", Oauth2),
            ("https://engine.example.org/", Mtls)
        ]
    );
    assert_eq!(
        cfg.security.secrets_key_env.as_deref(),
        Some("FHIR_CDC_SECRETS_KEY")
    );
}
