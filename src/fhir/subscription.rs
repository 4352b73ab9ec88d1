//! R5 Subscription resources: parsing and the checks the spec lists under "Managing
//! Subscriptions", turned into one typed value the queue stores.

use serde_json::Value;
use std::net::IpAddr;

use super::notification::Format;
use super::topic::{resource_type_of, Topic};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Requested,
    Active,
    Error,
    Off,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Requested => "requested",
            Status::Active => "active",
            Status::Error => "error",
            Status::Off => "off",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "requested" => Status::Requested,
            "active" => Status::Active,
            "error" => Status::Error,
            "off" => Status::Off,
            _ => return None,
        })
    }
}

/// Payload content, ordered from least to most.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Content {
    Empty,
    IdOnly,
    FullResource,
}

impl Content {
    pub fn as_str(self) -> &'static str {
        match self {
            Content::Empty => "empty",
            Content::IdOnly => "id-only",
            Content::FullResource => "full-resource",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "empty" => Content::Empty,
            "id-only" => Content::IdOnly,
            "full-resource" => Content::FullResource,
            _ => return None,
        })
    }
}

/// A `filterBy` entry as the client wrote it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Filter {
    pub resource_type: Option<String>,
    pub parameter: String,
    /// `eq`, `gt`, … (R5 filterBy.comparator); folded into `value` once checked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comparator: Option<String>,
    /// `not`, `missing`, `exact`, … (R5 filterBy.modifier, or `param:modifier`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub modifier: Option<String>,
    pub value: String,
}

impl Filter {
    /// Does an event of `resource_type` with canFilterBy `values` pass this filter? A filter
    /// applies only to the resource type it names (AND across filters is the caller's;
    /// OR across comma-separated values is here).
    pub fn matches(
        &self,
        resource_type: &str,
        values: &std::collections::HashMap<String, crate::fhir::search::value::Values>,
    ) -> bool {
        if self
            .resource_type
            .as_deref()
            .is_some_and(|t| t != resource_type)
        {
            return true;
        }
        let empty = crate::fhir::search::value::Values::Uri(Vec::new());
        let v = values.get(&self.parameter).unwrap_or(&empty);
        crate::fhir::search::value::matches(v, self.modifier.as_deref(), &self.value)
    }
}

/// The channel types (`subscription-channel-type` codes) this server delivers over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChannelType {
    RestHook,
}

impl ChannelType {
    pub const ALL: &'static [ChannelType] = &[ChannelType::RestHook];

    pub fn as_str(self) -> &'static str {
        match self {
            ChannelType::RestHook => "rest-hook",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|c| c.as_str() == s)
    }
}

/// A validated subscription, as delivery needs it.
#[derive(Debug, Clone)]
pub struct SubscriptionSpec {
    pub status: Status,
    pub topic_url: String,
    pub channel: ChannelType,
    pub endpoint: String,
    pub content: Content,
    pub content_type: String,
    pub headers: Vec<(String, String)>,
    pub heartbeat_period: Option<i32>,
    pub timeout: Option<i32>,
    pub max_count: Option<i32>,
    pub end: Option<chrono::DateTime<chrono::Utc>>,
    pub filters: Vec<Filter>,
}

/// What validation needs from the daemon's configuration.
pub struct Rules<'a> {
    pub topics: &'a [Topic],
    /// How Subscriptions are written: R5 natively, R4/R4B as the Backport IG profiles them.
    pub format: Format,
    /// The search parameters filters are evaluated with; without it filters are refused.
    pub registry: Option<&'a crate::fhir::search::registry::Registry>,
    pub allow_private_endpoints: bool,
    pub require_https_for_full_resource: bool,
}

/// Why a Subscription is refused; `code` is the OperationOutcome issue code.
#[derive(Debug, Clone, PartialEq)]
pub struct Invalid {
    pub code: &'static str,
    pub message: String,
    /// FHIRPath of the offending element.
    pub expression: &'static str,
}

fn invalid(code: &'static str, expression: &'static str, message: impl Into<String>) -> Invalid {
    Invalid {
        code,
        message: message.into(),
        expression,
    }
}

/// A non-negative integer element (`heartbeatPeriod`, `timeout`, `maxCount` or their
/// backport extensions); absent or null is `None`.
fn non_negative(
    x: Option<&Value>,
    expression: &'static str,
    what: &str,
) -> Result<Option<i32>, Invalid> {
    match x {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x
            .as_i64()
            .and_then(|n| i32::try_from(n).ok())
            .filter(|n| *n >= 0)
            .map(Some)
            .ok_or_else(|| {
                invalid(
                    "value",
                    expression,
                    format!("{what} must be a non-negative integer"),
                )
            }),
    }
}

fn int_field(v: &Value, key: &'static str) -> Result<Option<i32>, Invalid> {
    non_negative(v.get(key), key, &format!("Subscription.{key}"))
}

/// A Subscription as read, before any policy: what the resource says, in R5 terms.
#[derive(Debug, Clone)]
pub struct Read {
    pub status: Status,
    pub topic_url: String,
    pub channel: String,
    pub endpoint: Option<String>,
    pub content: Content,
    pub content_type: String,
    pub headers: Vec<(String, String)>,
    pub heartbeat_period: Option<i32>,
    pub timeout: Option<i32>,
    pub max_count: Option<i32>,
    pub end: Option<chrono::DateTime<chrono::Utc>>,
    pub filters: Vec<Filter>,
}

const BACKPORT: &str = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/";

/// The value of the extension `BACKPORT{name}` among `exts`.
fn backport_ext<'a>(exts: Option<&'a Value>, name: &str) -> Option<&'a Value> {
    exts?.as_array()?.iter().find_map(|e| {
        let url = e.get("url")?.as_str()?;
        if url.strip_prefix(BACKPORT) == Some(name) {
            e.as_object()?
                .iter()
                .find(|(k, _)| k.starts_with("value"))
                .map(|(_, v)| v)
        } else {
            None
        }
    })
}

/// Reads a Subscription of the given format: R5/R6 natively, R4 and R4B as the Backport IG
/// profiles them (`criteria` = topic, extensions for filters, content, heartbeat, timeout,
/// maxCount; `channel.header` as `Name: value`).
pub fn read(v: &Value, format: Format) -> Result<Read, Invalid> {
    if v.get("resourceType").and_then(Value::as_str) != Some("Subscription") {
        return Err(invalid(
            "structure",
            "resourceType",
            "resourceType must be Subscription",
        ));
    }
    let status = match v.get("status").and_then(Value::as_str) {
        None => Status::Requested,
        Some(st) => Status::parse(st).ok_or_else(|| {
            invalid(
                "value",
                "status",
                format!("Subscription.status {st:?} is not requested, active, error or off"),
            )
        })?,
    };
    let end = match v.get("end").and_then(Value::as_str) {
        None => None,
        Some(e) => Some(
            chrono::DateTime::parse_from_rfc3339(e)
                .map_err(|_| {
                    invalid(
                        "value",
                        "end",
                        format!("Subscription.end {e:?} is not a FHIR instant"),
                    )
                })?
                .with_timezone(&chrono::Utc),
        ),
    };
    if format == Format::R5 {
        read_r5(v, status, end)
    } else {
        read_backport(v, status, end)
    }
}

fn read_r5(
    v: &Value,
    status: Status,
    end: Option<chrono::DateTime<chrono::Utc>>,
) -> Result<Read, Invalid> {
    let topic_url = v
        .get("topic")
        .and_then(Value::as_str)
        .ok_or_else(|| invalid("required", "topic", "Subscription.topic is required"))?;
    let channel = v
        .get("channelType")
        .and_then(|c| c.get("code"))
        .and_then(Value::as_str)
        .ok_or_else(|| {
            invalid(
                "required",
                "channelType",
                "Subscription.channelType.code is required",
            )
        })?;
    let content = content_of(
        v.get("content").and_then(Value::as_str),
        "Subscription.content",
    )?;
    let mut headers = Vec::new();
    for p in v
        .get("parameter")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let name = p.get("name").and_then(Value::as_str).unwrap_or("");
        let value = p.get("value").and_then(Value::as_str).unwrap_or("");
        headers.push(header(name, value)?);
    }
    let mut filters = Vec::new();
    for f in v
        .get("filterBy")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let parameter = f
            .get("filterParameter")
            .and_then(Value::as_str)
            .ok_or_else(|| {
                invalid(
                    "required",
                    "filterBy",
                    "filterBy.filterParameter is required",
                )
            })?;
        let (parameter, modifier_in_name) = match parameter.split_once(':') {
            Some((p, m)) => (p, Some(m.to_string())),
            None => (parameter, None),
        };
        let text = |k: &str| f.get(k).and_then(Value::as_str).map(str::to_string);
        filters.push(Filter {
            resource_type: f
                .get("resourceType")
                .and_then(Value::as_str)
                .map(|r| resource_type_of(r).to_string()),
            parameter: parameter.to_string(),
            comparator: text("comparator"),
            modifier: text("modifier")
                .filter(|m| m != "=" && m != "eq")
                .or(modifier_in_name),
            value: f
                .get("value")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
        });
    }
    Ok(Read {
        status,
        topic_url: topic_url.to_string(),
        channel: channel.to_string(),
        endpoint: v
            .get("endpoint")
            .and_then(Value::as_str)
            .map(str::to_string),
        content,
        content_type: v
            .get("contentType")
            .and_then(Value::as_str)
            .unwrap_or("application/fhir+json")
            .to_string(),
        headers,
        heartbeat_period: int_field(v, "heartbeatPeriod")?,
        timeout: int_field(v, "timeout")?,
        max_count: int_field(v, "maxCount")?,
        end,
        filters,
    })
}

fn read_backport(
    v: &Value,
    status: Status,
    end: Option<chrono::DateTime<chrono::Utc>>,
) -> Result<Read, Invalid> {
    let topic_url = v.get("criteria").and_then(Value::as_str).ok_or_else(|| {
        invalid(
            "required",
            "criteria",
            "Subscription.criteria (the topic canonical) is required",
        )
    })?;
    let ch = v.get("channel").cloned().unwrap_or(Value::Null);
    // A custom channel type rides in an extension on channel.type.
    let channel = backport_ext(
        ch.get("_type").and_then(|t| t.get("extension")),
        "backport-channel-type",
    )
    .and_then(|c| c.get("code"))
    .and_then(Value::as_str)
    .or_else(|| ch.get("type").and_then(Value::as_str))
    .ok_or_else(|| {
        invalid(
            "required",
            "channelType",
            "Subscription.channel.type is required",
        )
    })?;
    let content = content_of(
        backport_ext(
            ch.get("_payload").and_then(|p| p.get("extension")),
            "backport-payload-content",
        )
        .and_then(Value::as_str),
        "backport-payload-content",
    )?;
    let mut headers = Vec::new();
    for h in ch
        .get("header")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let h = h.as_str().unwrap_or("");
        let (name, value) = h.split_once(':').ok_or_else(|| {
            invalid(
                "value",
                "parameter",
                format!("channel.header {h:?} is not `Name: value`"),
            )
        })?;
        headers.push(header(name.trim(), value.trim())?);
    }
    let ext = |name: &str| non_negative(backport_ext(ch.get("extension"), name), "extension", name);
    let mut filters = Vec::new();
    let crit_ext = v.get("_criteria").and_then(|c| c.get("extension"));
    for e in crit_ext.and_then(Value::as_array).into_iter().flatten() {
        if e.get("url")
            .and_then(Value::as_str)
            .and_then(|u| u.strip_prefix(BACKPORT))
            != Some("backport-filter-criteria")
        {
            continue;
        }
        let crit = e.get("valueString").and_then(Value::as_str).unwrap_or("");
        filters.extend(filters_from_criteria(crit)?);
    }
    Ok(Read {
        status,
        topic_url: topic_url.to_string(),
        channel: channel.to_string(),
        endpoint: ch
            .get("endpoint")
            .and_then(Value::as_str)
            .map(str::to_string),
        content,
        content_type: ch
            .get("payload")
            .and_then(Value::as_str)
            .unwrap_or("application/fhir+json")
            .to_string(),
        headers,
        heartbeat_period: ext("backport-heartbeat-period")?,
        timeout: ext("backport-timeout")?,
        max_count: ext("backport-max-count")?,
        end,
        filters,
    })
}

/// A payload content code; absent means `empty`.
fn content_of(code: Option<&str>, what: &str) -> Result<Content, Invalid> {
    match code {
        None => Ok(Content::Empty),
        Some(s) => Content::parse(s).ok_or_else(|| {
            invalid(
                "value",
                "content",
                format!("{what} {s:?} is not empty, id-only or full-resource"),
            )
        }),
    }
}

/// `Encounter?patient=Patient/123&status=in-progress` → one filter per parameter.
pub fn filters_from_criteria(crit: &str) -> Result<Vec<Filter>, Invalid> {
    let (ty, query) = crit.split_once('?').ok_or_else(|| {
        invalid(
            "value",
            "filterBy",
            format!("filter criteria {crit:?} is not `Type?param=value`"),
        )
    })?;
    let resource_type = (!ty.is_empty()).then(|| resource_type_of(ty).to_string());
    url::form_urlencoded::parse(query.as_bytes())
        .map(|(k, v)| {
            if k.is_empty() {
                Err(invalid(
                    "value",
                    "filterBy",
                    format!("filter criteria {crit:?} has an empty parameter"),
                ))
            } else {
                let (parameter, modifier) = match k.split_once(':') {
                    Some((p, m)) => (p.to_string(), Some(m.to_string())),
                    None => (k.into_owned(), None),
                };
                Ok(Filter {
                    resource_type: resource_type.clone(),
                    parameter,
                    comparator: None,
                    modifier,
                    value: v.into_owned(),
                })
            }
        })
        .collect()
}

fn header(name: &str, value: &str) -> Result<(String, String), Invalid> {
    let ok = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        && value.bytes().all(|b| b >= 0x20 && b != 0x7f);
    if ok {
        Ok((name.to_string(), value.to_string()))
    } else {
        Err(invalid(
            "value",
            "parameter",
            format!("header {name:?} cannot be sent as an HTTP header"),
        ))
    }
}

/// Reads a Subscription and applies this server's policy to it.
pub fn parse(v: &Value, rules: &Rules<'_>) -> Result<SubscriptionSpec, Invalid> {
    check(read(v, rules.format)?, rules)
}

/// The policy: a known topic, a supported channel, an acceptable endpoint, allowed filters.
pub fn check(r: Read, rules: &Rules<'_>) -> Result<SubscriptionSpec, Invalid> {
    let status =
        match r.status {
            // A client cannot declare a subscription active: the handshake decides.
            Status::Requested | Status::Active => Status::Requested,
            Status::Off => Status::Off,
            Status::Error => return Err(invalid(
                "value",
                "status",
                "Subscription.status error is set by the server; a client may set requested or off",
            )),
        };
    let topic = rules
        .topics
        .iter()
        .find(|t| t.url == r.topic_url)
        .ok_or_else(|| {
            invalid(
                "not-supported",
                "topic",
                format!("unknown SubscriptionTopic {:?}: GET /SubscriptionTopic lists the ones this server supports", r.topic_url),
            )
        })?;
    let Some(channel) = ChannelType::parse(&r.channel) else {
        let supported: Vec<&str> = ChannelType::ALL.iter().map(|c| c.as_str()).collect();
        return Err(invalid(
            "not-supported",
            "channelType",
            format!(
                "channel type {:?} is not supported; supported: {}",
                r.channel,
                supported.join(", ")
            ),
        ));
    };
    let endpoint = r.endpoint.ok_or_else(|| {
        invalid(
            "required",
            "endpoint",
            "Subscription.endpoint is required for rest-hook",
        )
    })?;
    // The topic's maxContent caps what a subscription gets.
    let content = match topic.max_content {
        Some(max) if r.content > max => max,
        _ => r.content,
    };
    check_endpoint(&endpoint, content, rules)?;
    if !r.content_type.starts_with("application/fhir+json") && r.content_type != "application/json"
    {
        return Err(invalid(
            "not-supported",
            "contentType",
            format!(
                "contentType {:?} is not supported; use application/fhir+json",
                r.content_type
            ),
        ));
    }
    let mut filters = Vec::with_capacity(r.filters.len());
    for f in r.filters {
        filters.push(check_filter(f, topic, rules)?);
    }
    Ok(SubscriptionSpec {
        status,
        topic_url: r.topic_url,
        channel,
        endpoint,
        content,
        content_type: r.content_type,
        headers: r.headers,
        heartbeat_period: r.heartbeat_period,
        timeout: r.timeout,
        max_count: r.max_count,
        end: r.end,
        filters,
    })
}

/// A filter the topic allows, on a parameter this server can evaluate, with a valid value;
/// returned with its resource type settled and any comparator folded into the value.
fn check_filter(f: Filter, topic: &Topic, rules: &Rules<'_>) -> Result<Filter, Invalid> {
    let refuse = |msg: String| invalid("not-supported", "filterBy", msg);
    let entries: Vec<_> = topic
        .can_filter_by
        .iter()
        .filter(|c| {
            c.parameter == f.parameter
                && match (&c.resource_type, &f.resource_type) {
                    (Some(a), Some(b)) => a == b,
                    _ => true,
                }
        })
        .collect();
    let Some(entry) = entries.first() else {
        return Err(refuse(format!(
            "filter {:?} is not allowed by topic {}: its canFilterBy lists {:?}",
            f.parameter,
            topic.url,
            topic
                .can_filter_by
                .iter()
                .map(|c| c.parameter.as_str())
                .collect::<Vec<_>>()
        )));
    };
    if f.comparator.is_some() && f.modifier.is_some() {
        return Err(invalid(
            "invalid",
            "filterBy",
            format!(
                "filter {:?} has both a comparator and a modifier",
                f.parameter
            ),
        ));
    }
    if let Some(c) = &f.comparator {
        if !entry.comparators.is_empty() && !entry.comparators.contains(c) {
            return Err(refuse(format!(
                "comparator {c:?} is not allowed for filter {:?} by topic {}",
                f.parameter, topic.url
            )));
        }
    }
    if let Some(m) = &f.modifier {
        if !entry.modifiers.is_empty() && !entry.modifiers.contains(m) {
            return Err(refuse(format!(
                "modifier {m:?} is not allowed for filter {:?} by topic {}",
                f.parameter, topic.url
            )));
        }
    }
    let resource_type = f
        .resource_type
        .clone()
        .or_else(|| entry.resource_type.clone())
        .or_else(|| (topic.triggers.len() == 1).then(|| topic.triggers[0].resource_type.clone()))
        .ok_or_else(|| {
            refuse(format!(
                "filter {:?}: name its resourceType (the topic has several)",
                f.parameter
            ))
        })?;
    let Some(registry) = rules.registry else {
        return Err(refuse(
            "filters are not evaluated by this server configuration".into(),
        ));
    };
    let param = registry.for_filter(entry, &resource_type).ok_or_else(|| {
        refuse(format!(
            "filter {:?} has no search parameter definition for {resource_type}; it cannot be evaluated",
            f.parameter
        ))
    })?;
    let value = match &f.comparator {
        Some(c) => format!("{c}{}", f.value),
        None => f.value.clone(),
    };
    crate::fhir::search::value::validate(param.kind, f.modifier.as_deref(), &value)
        .map_err(|e| refuse(format!("filter {:?}: {e}", f.parameter)))?;
    Ok(Filter {
        resource_type: Some(resource_type),
        parameter: f.parameter,
        comparator: None,
        modifier: f.modifier,
        value,
    })
}

fn check_endpoint(endpoint: &str, content: Content, rules: &Rules<'_>) -> Result<(), Invalid> {
    let url = url::Url::parse(endpoint).map_err(|e| {
        invalid(
            "value",
            "endpoint",
            format!("endpoint is not an absolute URL: {e}"),
        )
    })?;
    match url.scheme() {
        "https" => {}
        "http" => {
            if content == Content::FullResource && rules.require_https_for_full_resource {
                return Err(invalid(
                    "security",
                    "endpoint",
                    "full-resource payloads need an https endpoint (delivery.require_https_for_full_resource)",
                ));
            }
        }
        other => {
            return Err(invalid(
                "value",
                "endpoint",
                format!("rest-hook endpoint scheme {other:?} is not http or https"),
            ))
        }
    }
    if !rules.allow_private_endpoints && is_private_host(&url) {
        return Err(invalid(
            "security",
            "endpoint",
            "endpoint is on a loopback or private network (delivery.allow_private_endpoints is false)",
        ));
    }
    Ok(())
}

fn is_private_host(url: &url::Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(d)) => d == "localhost" || d.ends_with(".localhost"),
        Some(url::Host::Ipv4(ip)) => is_private_ip(IpAddr::V4(ip)),
        Some(url::Host::Ipv6(ip)) => is_private_ip(IpAddr::V6(ip)),
        None => true,
    }
}

pub fn is_private_ip(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v) => {
            v.is_loopback()
                || v.is_private()
                || v.is_link_local()
                || v.is_unspecified()
                || v.is_broadcast()
        }
        IpAddr::V6(v) => {
            v.is_loopback() || v.is_unspecified() || (v.segments()[0] & 0xfe00) == 0xfc00
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fhir::search::registry::Registry;
    use crate::fhir::FhirVersion;
    use serde_json::json;
    use std::sync::LazyLock;

    static REGISTRY: LazyLock<Registry> = LazyLock::new(|| Registry::load(FhirVersion::R5));

    fn topics() -> Vec<Topic> {
        vec![Topic::from_json(&json!({
            "resourceType": "SubscriptionTopic",
            "url": "http://example.org/t/enc",
            "resourceTrigger": [{"resource": "Encounter"}],
            "canFilterBy": [
                {"resource": "Encounter", "filterParameter": "patient"},
                {"resource": "Encounter", "filterParameter": "date", "comparator": ["ge", "le"]},
                {"resource": "Encounter", "filterParameter": "status", "modifier": ["not"]}
            ]
        }))
        .unwrap()]
    }

    fn sub(extra: Value) -> Value {
        let mut base = json!({
            "resourceType": "Subscription",
            "status": "requested",
            "topic": "http://example.org/t/enc",
            "channelType": {"system": "http://terminology.hl7.org/CodeSystem/subscription-channel-type", "code": "rest-hook"},
            "endpoint": "https://hooks.example.org/fhir",
            "content": "id-only",
            "parameter": [{"name": "Authorization", "value": "Bearer x"}]
        });
        for (k, v) in extra.as_object().unwrap() {
            base[k] = v.clone();
        }
        base
    }

    fn check(v: Value, private: bool, https: bool) -> Result<SubscriptionSpec, Invalid> {
        let t = topics();
        parse(
            &v,
            &Rules {
                registry: Some(&REGISTRY),
                topics: &t,
                format: Format::R5,
                allow_private_endpoints: private,
                require_https_for_full_resource: https,
            },
        )
    }

    #[test]
    fn accepts_a_plain_rest_hook() {
        let s = check(
            sub(json!({"heartbeatPeriod": 60, "maxCount": 5})),
            false,
            true,
        )
        .unwrap();
        assert_eq!(s.status, Status::Requested);
        assert_eq!(s.content, Content::IdOnly);
        assert_eq!(s.headers, vec![("Authorization".into(), "Bearer x".into())]);
        assert_eq!(s.heartbeat_period, Some(60));
        assert_eq!(s.max_count, Some(5));
    }

    #[test]
    fn refusals() {
        let cases = [
            (json!({"topic": "http://nope"}), "topic"),
            (json!({"channelType": {"code": "sms"}}), "channelType"),
            (json!({"endpoint": "not a url"}), "endpoint"),
            (json!({"endpoint": "ftp://x.org/"}), "endpoint"),
            (json!({"endpoint": "https://127.0.0.1:9/"}), "endpoint"),
            (json!({"endpoint": "https://localhost/"}), "endpoint"),
            (
                json!({"content": "full-resource", "endpoint": "http://hooks.example.org/"}),
                "endpoint",
            ),
            (json!({"content": "everything"}), "content"),
            (
                json!({"filterBy": [{"filterParameter": "class", "value": "x"}]}),
                "filterBy",
            ),
            (json!({"status": "error"}), "status"),
            (json!({"maxCount": -1}), "maxCount"),
            (json!({"end": "tomorrow"}), "end"),
        ];
        for (extra, expr) in cases {
            let e = check(sub(extra.clone()), false, true).unwrap_err();
            assert_eq!(e.expression, expr, "{extra}: {}", e.message);
        }
    }

    #[test]
    fn filters_are_checked_and_normalised() {
        let f = |filters: Value| check(sub(json!({"filterBy": filters})), false, true);
        let ok = f(json!([{"filterParameter": "patient", "value": "Patient/1"},
                          {"filterParameter": "date", "comparator": "ge", "value": "2024-01-01"},
                          {"filterParameter": "status", "modifier": "not", "value": "cancelled"}]))
        .unwrap();
        assert_eq!(ok.filters.len(), 3);
        assert_eq!(ok.filters[0].resource_type.as_deref(), Some("Encounter"));
        assert_eq!(
            ok.filters[1].value, "ge2024-01-01",
            "comparator folded into the value"
        );
        assert_eq!(ok.filters[2].modifier.as_deref(), Some("not"));
        let refused = [
            json!([{"filterParameter": "date", "comparator": "gt", "value": "2024"}]),
            json!([{"filterParameter": "status", "modifier": "text", "value": "x"}]),
            json!([{"filterParameter": "date", "comparator": "ge", "modifier": "missing", "value": "true"}]),
            json!([{"filterParameter": "date", "comparator": "ge", "value": "last tuesday"}]),
            json!([{"filterParameter": "subject", "value": "Patient/1"}]),
        ];
        for r in refused {
            let e = f(r.clone()).unwrap_err();
            assert_eq!(e.expression, "filterBy", "{r}: {}", e.message);
        }
    }

    #[test]
    fn topic_max_content_caps_the_payload() {
        let mut t = topics();
        t[0].max_content = Some(Content::IdOnly);
        let rules = Rules {
            registry: Some(&REGISTRY),
            topics: &t,
            format: Format::R5,
            allow_private_endpoints: false,
            require_https_for_full_resource: true,
        };
        let s = parse(
            &sub(json!({"content": "full-resource", "endpoint": "http://hooks.example.org/"})),
            &rules,
        )
        .unwrap();
        assert_eq!(s.content, Content::IdOnly);
        assert!(Content::Empty < Content::IdOnly && Content::IdOnly < Content::FullResource);
    }

    #[test]
    fn private_and_http_allowed_when_configured() {
        let s = check(
            sub(json!({"content": "full-resource", "endpoint": "http://127.0.0.1:9000/hook"})),
            true,
            false,
        )
        .unwrap();
        assert_eq!(s.content, Content::FullResource);
    }
}
