//! What NATS and AMQP messages share: the message id a consumer (and JetStream's duplicate
//! window) de-duplicates by, the headers, and the secrets a destination's connection needs.

use super::Notification;
use crate::config::DestinationConfig;

/// The content type of every message: the body is the notification Bundle, exactly as a
/// rest-hook POST carries it.
pub(crate) const CONTENT_TYPE: &str = "application/fhir+json";

/// `<destination id>:<first eventNumber>`: a re-publish of the same events (after a crash,
/// or a lost acknowledgement) carries the same id. Handshakes and heartbeats carry no
/// events; theirs name the kind and are unique.
pub(crate) fn message_id(n: &Notification) -> String {
    match n.event_numbers.first() {
        Some(first) => format!("{}:{first}", n.subscription_id),
        None => format!(
            "{}:{}:{}",
            n.subscription_id,
            n.kind.as_str(),
            uuid::Uuid::new_v4()
        ),
    }
}

/// Headers of every message, so a consumer can route and de-duplicate without parsing the
/// body: the topic, the subscription (destination) id, the notification type and the first
/// and last eventNumber it carries (absent for a handshake or heartbeat).
pub(crate) fn headers(n: &Notification) -> Vec<(&'static str, String)> {
    let mut h = vec![
        ("Fhir-Topic", n.topic.clone()),
        ("Fhir-Subscription", n.subscription_id.clone()),
        ("Fhir-Notification-Type", n.kind.as_str().to_string()),
    ];
    if let (Some(first), Some(last)) = (n.event_numbers.first(), n.event_numbers.last()) {
        h.push(("Fhir-Event-First", first.to_string()));
        h.push(("Fhir-Event-Last", last.to_string()));
    }
    h
}

/// A destination's password (or NATS token), read once from the environment variable its
/// `password_env` names.
pub(crate) fn password(d: &DestinationConfig) -> Result<Option<String>, BrokerConfigError> {
    let Some(var) = &d.password_env else {
        return Ok(None);
    };
    std::env::var(var).map(Some).map_err(|_| {
        BrokerConfigError(format!(
            "destination {:?}: password_env names {var}, which is not set in the environment",
            d.id
        ))
    })
}

/// A destination that cannot be used as configured (a secret missing from the environment).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BrokerConfigError(pub String);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fhir::notification::Kind;
    use crate::fhir::subscription::Content;

    fn n(kind: Kind, numbers: Vec<i64>) -> Notification {
        Notification {
            kind,
            subscription_id: "enc-nats".into(),
            topic: "http://t".into(),
            event_numbers: numbers,
            content: Content::IdOnly,
            body: bytes::Bytes::from_static(b"{}"),
        }
    }

    #[test]
    fn the_message_id_is_the_destination_and_first_event_number() {
        assert_eq!(
            message_id(&n(Kind::EventNotification, vec![7, 8, 9])),
            "enc-nats:7"
        );
        let hb1 = message_id(&n(Kind::Heartbeat, vec![]));
        let hb2 = message_id(&n(Kind::Heartbeat, vec![]));
        assert!(hb1.starts_with("enc-nats:heartbeat:"), "{hb1}");
        assert_ne!(hb1, hb2, "heartbeats must not be de-duplicated away");
    }

    #[test]
    fn headers_carry_the_first_and_last_event_number() {
        let h = headers(&n(Kind::EventNotification, vec![7, 8, 9]));
        assert!(h.contains(&("Fhir-Event-First", "7".into())));
        assert!(h.contains(&("Fhir-Event-Last", "9".into())));
        assert!(h.contains(&("Fhir-Subscription", "enc-nats".into())));
        let h = headers(&n(Kind::Handshake, vec![]));
        assert!(!h.iter().any(|(k, _)| k.starts_with("Fhir-Event")));
    }
}
