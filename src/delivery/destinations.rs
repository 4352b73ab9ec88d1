//! `[[destination]]` entries become subscriptions of origin `config` when delivery starts:
//! the same matching, numbering, order, retries, error/off and dead letters as any other.
//! A changed entry keeps its id and its cursor; an entry removed from the file turns its
//! subscription off and keeps its history. Every delivery instance runs this with the same
//! file; an unchanged entry writes nothing.

use serde_json::{json, Map, Value};
use tokio_postgres::GenericClient;

use crate::config::{BrokerKind, Config, DestinationConfig};
use crate::fhir::notification::Format;
use crate::fhir::search::registry::Registry;
use crate::fhir::subscription::{
    check_filter, ChannelType, Filter, Rules, Status, SubscriptionSpec,
};
use crate::fhir::topic::Topic;
use crate::queue::subscriptions;

/// The code system of the channel types this server adds (`nats`, `amqp`).
pub(crate) const CHANNEL_SYSTEM: &str = "https://fhir-cdc.dev/CodeSystem/channel-type";
const BACKPORT: &str = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/";

/// Writes the configured destinations and turns off those no longer configured.
pub(crate) async fn sync<C: GenericClient>(
    c: &C,
    cfg: &Config,
    topics: &[Topic],
    registry: &Registry,
) -> anyhow::Result<()> {
    let format: Format = cfg.source.fhir_version.into();
    for d in &cfg.destinations {
        let spec = spec(d, cfg, topics, registry)?;
        let resource = resource(d, &spec, format);
        let existing = subscriptions::get(c, &d.id).await?;
        if let Some(e) = &existing {
            if e.origin != "config" {
                anyhow::bail!(
                    "destination {:?}: a subscription with this id was created through the {} ({}); give the destination another id",
                    d.id, e.origin, e.topic
                );
            }
            if e.resource == resource && e.status != Status::Off {
                continue;
            }
        }
        subscriptions::upsert(c, &d.id, "config", &spec, &resource).await?;
        if !d.handshake {
            // The operator owns the destination: no handshake, active at once.
            c.execute(
                "UPDATE fhir_cdc.subscription SET handshake_done = true,
                     status = CASE WHEN status = 'requested' THEN 'active' ELSE status END
                 WHERE id = $1",
                &[&d.id],
            )
            .await?;
        }
        tracing::info!(destination = %d.id, topic = %d.topic, target = %d.target(), "destination configured");
    }
    let ids: Vec<&str> = cfg.destinations.iter().map(|d| d.id.as_str()).collect();
    let removed = c
        .query(
            "UPDATE fhir_cdc.subscription SET status = 'off', updated_at = now(),
                 last_error = 'removed from the configuration file'
             WHERE origin = 'config' AND status <> 'off' AND NOT (id = ANY($1)) RETURNING id",
            &[&ids],
        )
        .await?;
    for r in removed {
        tracing::warn!(destination = %r.get::<_, String>(0), "destination removed from the configuration: turned off, history kept");
    }
    Ok(())
}

/// The subscription a destination is, checked like an API subscription (known topic,
/// filters the topic allows, content capped by the topic's maxContent).
fn spec(
    d: &DestinationConfig,
    cfg: &Config,
    topics: &[Topic],
    registry: &Registry,
) -> anyhow::Result<SubscriptionSpec> {
    let Some(topic) = topics.iter().find(|t| t.url == d.topic) else {
        anyhow::bail!(
            "destination {:?}: unknown topic {:?} (neither a [[topic]] nor a SubscriptionTopic in the store)",
            d.id,
            d.topic
        );
    };
    let rules = Rules {
        topics,
        format: cfg.source.fhir_version.into(),
        registry: Some(registry),
        refuse_private: None,
        require_https_for_full_resource: false,
        email: cfg.channels.email_rules(),
    };
    let mut filters = Vec::with_capacity(d.filter.len());
    for (i, f) in d.filter.iter().enumerate() {
        let f = Filter {
            resource_type: f.resource_type.clone(),
            parameter: f.parameter.clone(),
            comparator: f.comparator.clone(),
            modifier: f.modifier.clone(),
            value: f.value.clone(),
            source: format!("destination.filter[{i}]"),
        };
        filters.push(
            check_filter(f, topic, &rules)
                .map_err(|e| anyhow::anyhow!("destination {:?}: {}", d.id, e.message))?,
        );
    }
    let content = match topic.max_content {
        Some(max) if d.content() > max => max,
        _ => d.content(),
    };
    Ok(SubscriptionSpec {
        status: if d.handshake {
            Status::Requested
        } else {
            Status::Active
        },
        topic_url: d.topic.clone(),
        channel: match d.kind {
            BrokerKind::Nats => ChannelType::Nats,
            BrokerKind::Amqp => ChannelType::Amqp,
        },
        endpoint: d.public_url(),
        content,
        content_type: crate::channel::broker::CONTENT_TYPE.into(),
        headers: Vec::new(),
        heartbeat_period: d.heartbeat_period,
        timeout: d.timeout,
        max_count: Some(d.max_count),
        end: None,
        filters,
        signing_secret: None,
    })
}

/// The Subscription resource the API shows for a destination, in the server's format. It
/// names the broker (without credentials) and where messages go.
fn resource(d: &DestinationConfig, spec: &SubscriptionSpec, format: Format) -> Value {
    let reason = format!(
        "fhir-cdc [[destination]] (operator-owned): {} {}",
        match d.kind {
            BrokerKind::Nats => "NATS JetStream",
            BrokerKind::Amqp => "AMQP",
        },
        d.target()
    );
    let coding = json!({"system": CHANNEL_SYSTEM, "code": spec.channel.as_str()});
    let mut r = match format {
        Format::R5 => r5(d, spec, reason, coding),
        Format::R4B | Format::R4Backport => backport(d, spec, reason, coding),
    };
    r["id"] = Value::String(d.id.clone());
    r
}

fn r5(d: &DestinationConfig, spec: &SubscriptionSpec, reason: String, coding: Value) -> Value {
    let mut r = json!({
        "resourceType": "Subscription",
        "status": spec.status.as_str(),
        "reason": reason,
        "topic": d.topic,
        "channelType": coding,
        "endpoint": spec.endpoint,
        "content": spec.content.as_str(),
        "contentType": spec.content_type,
        "maxCount": d.max_count,
    });
    let o = r.as_object_mut().expect("object literal");
    optional(o, "heartbeatPeriod", d.heartbeat_period);
    optional(o, "timeout", d.timeout);
    if !spec.filters.is_empty() {
        let filters: Vec<Value> = spec
            .filters
            .iter()
            .map(|f| {
                let mut e = json!({"filterParameter": f.parameter, "value": f.value});
                if let Some(t) = &f.resource_type {
                    e["resourceType"] = t.clone().into();
                }
                if let Some(m) = &f.modifier {
                    e["modifier"] = m.clone().into();
                }
                e
            })
            .collect();
        o.insert("filterBy".into(), filters.into());
    }
    r
}

fn backport(
    d: &DestinationConfig,
    spec: &SubscriptionSpec,
    reason: String,
    coding: Value,
) -> Value {
    let ext = |name: &str, key: &str, v: Value| json!({"url": format!("{BACKPORT}{name}"), key: v});
    let mut channel_ext = vec![ext(
        "backport-max-count",
        "valuePositiveInt",
        d.max_count.into(),
    )];
    if let Some(h) = d.heartbeat_period {
        channel_ext.push(ext(
            "backport-heartbeat-period",
            "valueUnsignedInt",
            h.into(),
        ));
    }
    if let Some(t) = d.timeout {
        channel_ext.push(ext("backport-timeout", "valueUnsignedInt", t.into()));
    }
    let mut r = json!({
        "resourceType": "Subscription",
        "meta": {"profile": [format!("{BACKPORT}backport-subscription")]},
        "status": spec.status.as_str(),
        "reason": reason,
        "criteria": d.topic,
        "channel": {
            "extension": channel_ext,
            "type": "message",
            "_type": {"extension": [ext("backport-channel-type", "valueCoding", coding)]},
            "endpoint": spec.endpoint,
            "payload": spec.content_type,
            "_payload": {"extension": [ext("backport-payload-content", "valueCode", spec.content.as_str().into())]},
        },
    });
    if !spec.filters.is_empty() {
        let crit: Vec<Value> = spec
            .filters
            .iter()
            .map(|f| {
                let param = match &f.modifier {
                    Some(m) => format!("{}:{m}", f.parameter),
                    None => f.parameter.clone(),
                };
                let t = f.resource_type.as_deref().unwrap_or("Resource");
                ext(
                    "backport-filter-criteria",
                    "valueString",
                    format!("{t}?{param}={}", f.value).into(),
                )
            })
            .collect();
        r["_criteria"] = json!({"extension": crit});
    }
    r
}

fn optional(o: &mut Map<String, Value>, key: &str, v: Option<i32>) {
    if let Some(v) = v {
        o.insert(key.into(), v.into());
    }
}
