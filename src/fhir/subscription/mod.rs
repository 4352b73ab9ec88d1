//! R5 Subscription resources: parsing and the checks the spec lists under "Managing
//! Subscriptions", turned into one typed value the queue stores.

use serde_json::Value;

mod element;
mod filter;
mod read;
pub(crate) mod secrets;

use super::topic::Topic;
use super::vocab::Format;
pub use super::vocab::{Content, Status};
pub use filter::{check_filter, Filter};
pub use read::{filters_from_criteria, read, Paths, Read};

/// The channel types (`subscription-channel-type` codes) this server delivers over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChannelType {
    RestHook,
    Websocket,
    Email,
    Message,
    /// NATS JetStream: operator-owned, a `[[destination]]` of the config file.
    Nats,
    /// AMQP 0-9-1 (RabbitMQ): operator-owned, a `[[destination]]` of the config file.
    Amqp,
}

impl ChannelType {
    pub(crate) const ALL: &'static [ChannelType] = &[
        ChannelType::RestHook,
        ChannelType::Websocket,
        ChannelType::Email,
        ChannelType::Message,
        ChannelType::Nats,
        ChannelType::Amqp,
    ];

    /// Brokers are destinations the operator configures; a client cannot subscribe with
    /// them through the API (they would publish into the operator's streams).
    pub(crate) fn is_broker(self) -> bool {
        matches!(self, ChannelType::Nats | ChannelType::Amqp)
    }

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            ChannelType::RestHook => "rest-hook",
            ChannelType::Websocket => "websocket",
            ChannelType::Email => "email",
            ChannelType::Message => "message",
            ChannelType::Nats => "nats",
            ChannelType::Amqp => "amqp",
        }
    }

    pub(crate) fn parse(s: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|c| c.as_str() == s)
    }
}

/// A validated subscription, as delivery needs it.
#[derive(Debug, Clone)]
pub struct SubscriptionSpec {
    pub(crate) status: Status,
    pub(crate) topic_url: String,
    pub(crate) channel: ChannelType,
    pub(crate) endpoint: String,
    pub(crate) content: Content,
    pub(crate) content_type: String,
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) heartbeat_period: Option<i32>,
    pub(crate) timeout: Option<i32>,
    pub max_count: Option<i32>,
    pub(crate) end: Option<chrono::DateTime<chrono::Utc>>,
    pub(crate) filters: Vec<Filter>,
    /// Notifications carry an HMAC-SHA256 of their body with this secret.
    pub(crate) signing_secret: Option<String>,
}

/// What validation needs from the daemon's configuration.
pub struct Rules<'a> {
    pub topics: &'a [Topic],
    /// How Subscriptions are written: R5 natively, R4/R4B as the Backport IG profiles them.
    pub format: Format,
    /// The search parameters filters are evaluated with; without it filters are refused.
    pub registry: Option<&'a crate::fhir::search::registry::Registry>,
    /// The private-address rule (`channel::private`) when private endpoints are not
    /// allowed; `None`: any host is accepted.
    pub refuse_private: Option<fn(&url::Url) -> bool>,
    pub require_https_for_full_resource: bool,
    pub email: EmailRules,
}

/// What the email channel accepts, from `[channels.email]`.
#[derive(Debug, Clone, Copy, Default)]
pub struct EmailRules {
    /// `[channels.email]` is present.
    pub(crate) configured: bool,
    /// TLS to the SMTP server, or full-resource without it allowed.
    pub(crate) full_resource_ok: bool,
}

/// Why a Subscription is refused; `code` is the OperationOutcome issue code. From [`read`]
/// the resource is invalid (HTTP 400); from [`check`] it is valid but this server will not
/// take it (422).
#[derive(Debug, Clone, PartialEq)]
pub struct Invalid {
    pub(crate) code: &'static str,
    pub message: String,
    /// FHIRPath of the offending element (`Subscription.filterBy[0]`).
    pub expression: String,
}

fn invalid(code: &'static str, expression: &str, message: impl Into<String>) -> Invalid {
    Invalid {
        code,
        message: message.into(),
        expression: expression.to_string(),
    }
}

/// Reads a Subscription and applies this server's policy to it.
pub fn parse(v: &Value, rules: &Rules<'_>) -> Result<SubscriptionSpec, Invalid> {
    check(read(v, rules.format)?, rules)
}

/// The policy: a known topic, a supported channel, an acceptable endpoint, allowed filters.
pub(crate) fn check(r: Read, rules: &Rules<'_>) -> Result<SubscriptionSpec, Invalid> {
    let status =
        match r.status {
            // A client cannot declare a subscription active: the handshake decides.
            Status::Requested | Status::Active => Status::Requested,
            Status::Off => Status::Off,
            Status::Error => return Err(invalid(
                "value",
                r.paths.status,
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
                r.paths.topic,
                format!("unknown SubscriptionTopic {:?}: GET /SubscriptionTopic lists the ones this server supports", r.topic_url),
            )
        })?;
    let Some(channel) = ChannelType::parse(&r.channel).filter(|c| !c.is_broker()) else {
        let supported: Vec<&str> = ChannelType::ALL
            .iter()
            .filter(|c| !c.is_broker())
            .map(|c| c.as_str())
            .collect();
        return Err(invalid(
            "not-supported",
            r.paths.channel,
            format!(
                "channel type {:?} is not supported; supported: {}",
                r.channel,
                supported.join(", ")
            ),
        ));
    };
    // The topic's maxContent caps what a subscription gets.
    let content = match topic.max_content {
        Some(max) if r.content > max => max,
        _ => r.content,
    };
    let endpoint = channel_endpoint(channel, r.endpoint, r.paths.endpoint, content, rules)?;
    if !r.content_type.starts_with("application/fhir+json") && r.content_type != "application/json"
    {
        return Err(invalid(
            "not-supported",
            r.paths.content_type,
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
        signing_secret: r.signing_secret,
    })
}

/// The endpoint as the channel needs it: an http(s) URL for rest-hook and message, `mailto:`
/// addresses for email, nothing for websocket (the client connects to us).
fn channel_endpoint(
    channel: ChannelType,
    endpoint: Option<String>,
    path: &str,
    content: Content,
    rules: &Rules<'_>,
) -> Result<String, Invalid> {
    if channel == ChannelType::Websocket {
        return Ok(String::new());
    }
    if channel == ChannelType::Email && !rules.email.configured {
        return Err(invalid(
            "not-supported",
            path,
            "the email channel is not configured on this server ([channels.email])",
        ));
    }
    let endpoint = endpoint.ok_or_else(|| {
        invalid(
            "required",
            path,
            format!("{path} is required for {}", channel.as_str()),
        )
    })?;
    if channel == ChannelType::Email {
        check_mailto(&endpoint, path, content, rules)?;
    } else {
        check_endpoint(&endpoint, path, content, rules)?;
    }
    Ok(endpoint)
}

/// The addresses of a `mailto:` endpoint (comma-separated), without query parameters.
pub(crate) fn mailto_addresses(endpoint: &str) -> Option<Vec<String>> {
    let rest = endpoint.strip_prefix("mailto:")?;
    let rest = rest.split('?').next().unwrap_or_default();
    let addrs: Vec<String> = rest
        .split(',')
        .map(|a| a.trim().replace("%40", "@"))
        .filter(|a| !a.is_empty())
        .collect();
    let valid = |a: &String| {
        let mut parts = a.splitn(2, '@');
        matches!((parts.next(), parts.next()), (Some(l), Some(d)) if !l.is_empty() && !d.is_empty())
            && !a.chars().any(|c| c.is_whitespace() || c == '<' || c == '>')
    };
    (!addrs.is_empty() && addrs.iter().all(valid)).then_some(addrs)
}

fn check_mailto(
    endpoint: &str,
    path: &str,
    content: Content,
    rules: &Rules<'_>,
) -> Result<(), Invalid> {
    if mailto_addresses(endpoint).is_none() {
        return Err(invalid(
            "value",
            path,
            "an email endpoint is mailto: followed by one or more comma-separated addresses",
        ));
    }
    if content == Content::FullResource && !rules.email.full_resource_ok {
        return Err(invalid(
            "security",
            path,
            "full-resource by email needs an SMTP connection with TLS (channels.email.smtp is plain smtp://; set allow_full_resource_without_tls to accept)",
        ));
    }
    Ok(())
}

fn check_endpoint(
    endpoint: &str,
    path: &str,
    content: Content,
    rules: &Rules<'_>,
) -> Result<(), Invalid> {
    let url = url::Url::parse(endpoint).map_err(|e| {
        invalid(
            "value",
            path,
            format!("endpoint is not an absolute URL: {e}"),
        )
    })?;
    match url.scheme() {
        "https" => {}
        "http" => {
            if content == Content::FullResource && rules.require_https_for_full_resource {
                return Err(invalid(
                    "security",
                    path,
                    "full-resource payloads need an https endpoint (delivery.require_https_for_full_resource)",
                ));
            }
        }
        other => {
            return Err(invalid(
                "value",
                path,
                format!("rest-hook endpoint scheme {other:?} is not http or https"),
            ))
        }
    }
    if rules.refuse_private.is_some_and(|private| private(&url)) {
        return Err(invalid(
            "security",
            path,
            "endpoint is on a loopback or private network (delivery.allow_private_endpoints is false)",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::channel::private::is_private_host;
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
                refuse_private: (!private).then_some(is_private_host as fn(&url::Url) -> bool),
                require_https_for_full_resource: https,
                email: EmailRules::default(),
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
                "filterBy[0]",
            ),
            (json!({"status": "error"}), "status"),
            (json!({"maxCount": -1}), "maxCount"),
            (json!({"end": "tomorrow"}), "end"),
        ];
        for (extra, expr) in cases {
            let e = check(sub(extra.clone()), false, true).unwrap_err();
            assert_eq!(
                e.expression,
                format!("Subscription.{expr}"),
                "{extra}: {}",
                e.message
            );
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
            assert_eq!(
                e.expression, "Subscription.filterBy[0]",
                "{r}: {}",
                e.message
            );
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
            refuse_private: Some(is_private_host),
            email: EmailRules::default(),
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
