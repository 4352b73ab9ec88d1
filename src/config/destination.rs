//! `[[destination]]`: operator-owned broker destinations (NATS JetStream, AMQP 0-9-1), each a
//! subscription of origin `config` with the id it names. Secrets never live in the TOML text:
//! a password comes from the environment variable `password_env` names, NATS credentials
//! from `credentials_file`.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

use super::ConfigError;
use crate::fhir::subscription::Content;

/// Which broker a destination publishes to.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum BrokerKind {
    /// NATS JetStream: a subject that an existing stream covers.
    Nats,
    /// AMQP 0-9-1 (RabbitMQ and others): an existing exchange and a routing key.
    Amqp,
}

/// One `filter` entry of a destination: the same as a Subscription's `filterBy`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DestinationFilter {
    pub(crate) resource_type: Option<String>,
    pub(crate) parameter: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) comparator: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) modifier: Option<String>,
    pub(crate) value: String,
}

/// One `[[destination]]` as written.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DestinationConfig {
    /// The id of the Subscription this destination is (`$status`, `$events`, dead letters).
    pub(crate) id: String,
    /// The SubscriptionTopic's canonical URL.
    pub topic: String,
    pub kind: BrokerKind,
    /// `nats://host:4222` (`tls://` for TLS); `amqp://user@host:5672/%2f` (`amqps://`).
    /// A user name may be in it, a password never (`password_env`).
    pub(crate) url: String,
    /// nats: the subject published to; an existing stream must cover it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) subject: Option<String>,
    /// amqp: an existing exchange (`""`: the default exchange, routing by queue name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) exchange: Option<String>,
    /// amqp: the routing key (default empty).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) routing_key: Option<String>,
    /// empty | id-only | full-resource (default id-only).
    #[serde(default = "default_content")]
    pub(crate) content: String,
    /// Events per notification (default 1).
    #[serde(default = "one")]
    pub max_count: i32,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) filter: Vec<DestinationFilter>,
    /// The environment variable holding the broker password (or, for NATS without a user
    /// in the URL, its token).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_env: Option<String>,
    /// nats: a `.creds` file (JWT and NKey seed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) credentials_file: Option<PathBuf>,
    /// PEM file of the CA that signed the broker's certificate (else the system's roots).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) tls_ca_file: Option<PathBuf>,
    /// nats: a client certificate and key (PEM) for mutual TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) tls_cert_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) tls_key_file: Option<PathBuf>,
    /// Send a handshake notification before events (default false: the operator owns it).
    #[serde(default)]
    pub handshake: bool,
    /// Seconds without a notification after which a heartbeat goes out (default: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heartbeat_period: Option<i32>,
    /// Seconds to wait for the broker's acknowledgement (default `[delivery]`'s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) timeout: Option<i32>,
}

fn default_content() -> String {
    "id-only".into()
}

fn one() -> i32 {
    1
}

impl DestinationConfig {
    pub(crate) fn content(&self) -> Content {
        Content::parse(&self.content).unwrap_or(Content::IdOnly)
    }

    /// The URL as shown in `$status` and the Subscription resource: without user info.
    pub(crate) fn public_url(&self) -> String {
        match reqwest::Url::parse(&self.url) {
            Ok(mut u) => {
                let _ = u.set_username("");
                let _ = u.set_password(None);
                u.to_string()
            }
            Err(_) => String::new(),
        }
    }

    /// Where messages go, for logs and `check`: the subject, or exchange and routing key.
    pub(crate) fn target(&self) -> String {
        match self.kind {
            BrokerKind::Nats => format!("subject {:?}", self.subject.as_deref().unwrap_or("")),
            BrokerKind::Amqp => format!(
                "exchange {:?} with routing key {:?}",
                self.exchange.as_deref().unwrap_or(""),
                self.routing_key.as_deref().unwrap_or("")
            ),
        }
    }

    /// Files named relative to the config file's directory.
    pub(super) fn resolve_paths(&mut self, base: &std::path::Path) {
        for p in [
            &mut self.credentials_file,
            &mut self.tls_ca_file,
            &mut self.tls_cert_file,
            &mut self.tls_key_file,
        ]
        .into_iter()
        .flatten()
        {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
    }

    fn check(&self) -> Result<(), String> {
        if !is_fhir_id(&self.id) {
            return Err("id must be a FHIR id: letters, digits, '-' and '.', at most 64".into());
        }
        if Content::parse(&self.content).is_none() {
            return Err(format!(
                "content = {:?}: use empty, id-only or full-resource",
                self.content
            ));
        }
        if self.max_count < 1 {
            return Err("max_count must be at least 1".into());
        }
        if self.heartbeat_period.is_some_and(|h| h < 1) || self.timeout.is_some_and(|t| t < 1) {
            return Err("heartbeat_period and timeout are seconds, at least 1".into());
        }
        self.check_url()?;
        match self.kind {
            BrokerKind::Nats => self.check_nats(),
            BrokerKind::Amqp => self.check_amqp(),
        }
    }

    fn check_url(&self) -> Result<(), String> {
        let u = reqwest::Url::parse(&self.url)
            .map_err(|e| format!("url {:?} is not a URL: {e}", self.public_url()))?;
        let schemes: &[&str] = match self.kind {
            BrokerKind::Nats => &["nats", "tls"],
            BrokerKind::Amqp => &["amqp", "amqps"],
        };
        if !schemes.contains(&u.scheme()) {
            return Err(format!(
                "url scheme {:?} is not one of {schemes:?}",
                u.scheme()
            ));
        }
        if u.password().is_some() {
            return Err(
                "url holds a password: put it in an environment variable and name it with password_env"
                    .into(),
            );
        }
        if u.host_str().unwrap_or("").is_empty() {
            return Err("url has no host".into());
        }
        Ok(())
    }

    fn check_nats(&self) -> Result<(), String> {
        let subject = self.subject.as_deref().unwrap_or("");
        let valid = !subject.is_empty()
            && !subject
                .chars()
                .any(|c| c.is_whitespace() || c == '*' || c == '>')
            && subject.split('.').all(|t| !t.is_empty());
        if !valid {
            return Err(format!(
                "subject {subject:?}: a nats destination needs a subject without wildcards"
            ));
        }
        if self.exchange.is_some() || self.routing_key.is_some() {
            return Err("exchange and routing_key are for amqp destinations".into());
        }
        if self.tls_cert_file.is_some() != self.tls_key_file.is_some() {
            return Err("tls_cert_file and tls_key_file go together".into());
        }
        Ok(())
    }

    fn check_amqp(&self) -> Result<(), String> {
        if self.exchange.is_none() {
            return Err(
                "an amqp destination needs exchange (\"\" for the default exchange)".into(),
            );
        }
        if self.subject.is_some() {
            return Err("subject is for nats destinations".into());
        }
        if self.credentials_file.is_some() || self.tls_cert_file.is_some() {
            return Err(
                "credentials_file and tls_cert_file are for nats destinations (amqp: user in the url, password_env)"
                    .into(),
            );
        }
        Ok(())
    }
}

fn is_fhir_id(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
}

/// Checks every destination and that ids are unique.
pub(super) fn check_all(destinations: &[DestinationConfig]) -> Result<(), ConfigError> {
    for (i, d) in destinations.iter().enumerate() {
        d.check()
            .map_err(|m| ConfigError::Invalid(format!("destination {:?}: {m}", d.id)))?;
        if destinations[..i].iter().any(|o| o.id == d.id) {
            return Err(ConfigError::Invalid(format!(
                "destination {:?}: the id is used twice",
                d.id
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nats() -> DestinationConfig {
        toml::from_str(
            r#"
            id = "encounters-to-nats"
            topic = "http://example.org/topic/encounter-start"
            kind = "nats"
            url = "nats://127.0.0.1:4222"
            subject = "fhir.encounters"
            "#,
        )
        .unwrap()
    }

    #[test]
    fn the_issue_example_is_valid_with_its_defaults() {
        let d = nats();
        assert!(d.check().is_ok());
        assert_eq!(d.content(), Content::IdOnly);
        assert_eq!(d.max_count, 1);
        assert!(!d.handshake);
    }

    #[test]
    fn a_password_in_the_url_is_refused_and_never_shown() {
        let mut d = nats();
        d.url = "nats://u:secret@127.0.0.1:4222".into();
        let e = d.check().unwrap_err();
        assert!(e.contains("password_env"), "{e}");
        assert!(!e.contains("secret"), "{e}");
        assert_eq!(d.public_url(), "nats://127.0.0.1:4222");
    }

    #[test]
    fn kinds_take_only_their_own_settings() {
        let mut d = nats();
        d.subject = Some("fhir.*".into());
        assert!(d.check().unwrap_err().contains("wildcards"));
        let mut d = nats();
        d.kind = BrokerKind::Amqp;
        d.url = "amqp://guest@127.0.0.1:5672/%2f".into();
        assert!(d.check().unwrap_err().contains("needs exchange"));
        d.subject = None;
        d.exchange = Some("fhir".into());
        assert!(d.check().is_ok());
        d.url = "nats://127.0.0.1:4222".into();
        assert!(d.check().unwrap_err().contains("scheme"));
    }

    #[test]
    fn ids_are_fhir_ids_and_unique() {
        let mut d = nats();
        d.id = "has space".into();
        assert!(d.check().is_err());
        let e = check_all(&[nats(), nats()]).unwrap_err().to_string();
        assert!(e.contains("used twice"), "{e}");
    }
}
