//! R5 Subscription resources: parsing and the checks the spec lists under "Managing
//! Subscriptions", turned into one typed value the queue stores.

use serde_json::Value;
use std::net::IpAddr;

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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
#[derive(Debug, Clone, PartialEq)]
pub struct Filter {
    pub resource_type: Option<String>,
    pub parameter: String,
    pub value: String,
}

/// A validated subscription, as delivery needs it.
#[derive(Debug, Clone)]
pub struct SubscriptionSpec {
    pub status: Status,
    pub topic_url: String,
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

fn int_field(v: &Value, key: &'static str) -> Result<Option<i32>, Invalid> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x
            .as_i64()
            .and_then(|n| i32::try_from(n).ok())
            .filter(|n| *n >= 0)
            .map(Some)
            .ok_or_else(|| {
                invalid(
                    "value",
                    key,
                    format!("Subscription.{key} must be a non-negative integer"),
                )
            }),
    }
}

pub fn parse(v: &Value, rules: &Rules<'_>) -> Result<SubscriptionSpec, Invalid> {
    if v.get("resourceType").and_then(Value::as_str) != Some("Subscription") {
        return Err(invalid(
            "structure",
            "resourceType",
            "resourceType must be Subscription",
        ));
    }
    let status = match v.get("status").and_then(Value::as_str) {
        None => Status::Requested,
        // A client cannot declare a subscription active: the handshake decides.
        Some("requested") | Some("active") => Status::Requested,
        Some("off") => Status::Off,
        Some(other) => {
            return Err(invalid(
                "value",
                "status",
                format!("Subscription.status {other:?}: a client may set requested or off"),
            ))
        }
    };
    let topic_url = v
        .get("topic")
        .and_then(Value::as_str)
        .ok_or_else(|| invalid("required", "topic", "Subscription.topic is required"))?;
    let topic = rules
        .topics
        .iter()
        .find(|t| t.url == topic_url)
        .ok_or_else(|| {
            invalid(
                "not-supported",
                "topic",
                format!("unknown SubscriptionTopic {topic_url:?}: GET /SubscriptionTopic lists the ones this server supports"),
            )
        })?;
    let channel = v
        .get("channelType")
        .and_then(|c| c.get("code"))
        .and_then(Value::as_str);
    match channel {
        Some("rest-hook") => {}
        Some(other) => {
            return Err(invalid(
                "not-supported",
                "channelType",
                format!("channel type {other:?} is not supported; supported: rest-hook"),
            ))
        }
        None => {
            return Err(invalid(
                "required",
                "channelType",
                "Subscription.channelType.code is required",
            ))
        }
    }
    let content = match v.get("content").and_then(Value::as_str) {
        None => Content::Empty,
        Some(s) => Content::parse(s).ok_or_else(|| {
            invalid(
                "value",
                "content",
                format!("Subscription.content {s:?} is not empty, id-only or full-resource"),
            )
        })?,
    };
    let endpoint = v.get("endpoint").and_then(Value::as_str).ok_or_else(|| {
        invalid(
            "required",
            "endpoint",
            "Subscription.endpoint is required for rest-hook",
        )
    })?;
    check_endpoint(endpoint, content, rules)?;
    let content_type = v
        .get("contentType")
        .and_then(Value::as_str)
        .unwrap_or("application/fhir+json");
    if !content_type.starts_with("application/fhir+json") && content_type != "application/json" {
        return Err(invalid(
            "not-supported",
            "contentType",
            format!("contentType {content_type:?} is not supported; use application/fhir+json"),
        ));
    }
    let mut headers = Vec::new();
    for p in v
        .get("parameter")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let name = p.get("name").and_then(Value::as_str).unwrap_or("");
        let value = p.get("value").and_then(Value::as_str).unwrap_or("");
        let header_ok = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            && value.bytes().all(|b| b >= 0x20 && b != 0x7f);
        if !header_ok {
            return Err(invalid(
                "value",
                "parameter",
                format!("Subscription.parameter {name:?} cannot be sent as an HTTP header"),
            ));
        }
        headers.push((name.to_string(), value.to_string()));
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
        let resource_type = f
            .get("resourceType")
            .and_then(Value::as_str)
            .map(|r| resource_type_of(r).to_string());
        if !topic.allows_filter(resource_type.as_deref(), parameter) {
            return Err(invalid(
                "not-supported",
                "filterBy",
                format!(
                    "filter {parameter:?} is not allowed by topic {topic_url}: its canFilterBy lists {:?}",
                    topic.can_filter_by.iter().map(|c| c.parameter.as_str()).collect::<Vec<_>>()
                ),
            ));
        }
        let value = f
            .get("value")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        filters.push(Filter {
            resource_type,
            parameter: parameter.to_string(),
            value,
        });
    }
    if !filters.is_empty() {
        // Matching filters needs search-parameter evaluation in capture; until it exists a
        // filtered subscription would receive other patients' events, so it is refused.
        return Err(invalid(
            "not-supported",
            "filterBy",
            "filterBy is validated but not yet evaluated by this server version; subscribe without filters",
        ));
    }
    Ok(SubscriptionSpec {
        status,
        topic_url: topic_url.to_string(),
        endpoint: endpoint.to_string(),
        content,
        content_type: content_type.to_string(),
        headers,
        heartbeat_period: int_field(v, "heartbeatPeriod")?,
        timeout: int_field(v, "timeout")?,
        max_count: int_field(v, "maxCount")?,
        end: match v.get("end").and_then(Value::as_str) {
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
        },
        filters,
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
    use serde_json::json;

    fn topics() -> Vec<Topic> {
        vec![Topic::from_json(&json!({
            "resourceType": "SubscriptionTopic",
            "url": "http://example.org/t/enc",
            "resourceTrigger": [{"resource": "Encounter"}],
            "canFilterBy": [{"resource": "Encounter", "filterParameter": "patient"}]
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
                topics: &t,
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
                json!({"filterBy": [{"filterParameter": "status", "value": "x"}]}),
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
