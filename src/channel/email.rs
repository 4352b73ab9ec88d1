//! email: a short plain-text mail per notification (topic, subscription, event numbers and
//! counts; never resource content) with the notification Bundle attached as
//! `notification.json` (`application/fhir+json`) unless the payload is `empty`.
//!
//! Handshakes and heartbeats are not mailed unless `[channels.email]
//! handshake_and_heartbeat` asks for them: a handshake by mail is optional in the Backport
//! IG, and a heartbeat every few minutes in a care team's inbox helps nobody. Without one,
//! an email subscription turns active at once. Full-resource payloads over SMTP without TLS
//! are refused when the subscription is created (see `EmailRules`).

use async_trait::async_trait;
use lettre::message::header::ContentType;
use lettre::message::{Attachment, Mailbox, MultiPart, SinglePart};
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};

use super::{Accepted, Channel, Destination, Notification, SendError};
use crate::config::EmailConfig;
use crate::fhir::notification::Kind;
use crate::fhir::subscription::{mailto_addresses, ChannelType, Content};

pub(crate) struct Email {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
    subject: String,
    handshake_and_heartbeat: bool,
}

/// Why `[channels.email]` cannot be used; the daemon does not start with it.
#[derive(Debug, thiserror::Error)]
#[error("[channels.email]: {0}")]
pub struct EmailConfigError(String);

fn bad(m: impl Into<String>) -> EmailConfigError {
    EmailConfigError(m.into())
}

impl Email {
    pub(crate) fn from_config(c: &EmailConfig) -> Result<Self, EmailConfigError> {
        let url = url::Url::parse(&c.smtp).map_err(|e| bad(format!("smtp {:?}: {e}", c.smtp)))?;
        let host = url
            .host_str()
            .ok_or_else(|| bad("smtp has no host"))?
            .to_string();
        let tls = |host: &str| -> Result<TlsParameters, EmailConfigError> {
            let mut b = TlsParameters::builder(host.to_string());
            if let Some(f) = &c.ca_file {
                let pem =
                    std::fs::read(f).map_err(|e| bad(format!("ca_file {}: {e}", f.display())))?;
                let cert = Certificate::from_pem(&pem).map_err(|e| bad(format!("ca_file: {e}")))?;
                b = b.add_root_certificate(cert);
            }
            b.build().map_err(|e| bad(format!("TLS: {e}")))
        };
        let (mode, default_port) = match url.scheme() {
            "smtp" => (Tls::None, 25),
            "smtp+starttls" => (Tls::Required(tls(&host)?), 587),
            "smtps" => (Tls::Wrapper(tls(&host)?), 465),
            other => {
                return Err(bad(format!(
                    "smtp scheme {other:?}: use smtp, smtp+starttls or smtps"
                )))
            }
        };
        let mut b = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&host)
            .port(url.port().unwrap_or(default_port))
            .tls(mode);
        if let Some(user) = &c.username {
            let var = c
                .password_env
                .as_deref()
                .ok_or_else(|| bad("username needs password_env"))?;
            let pass = std::env::var(var).map_err(|_| {
                bad(format!(
                    "environment variable {var} (the SMTP password) is not set"
                ))
            })?;
            b = b.credentials(Credentials::new(user.clone(), pass));
        }
        Ok(Email {
            transport: b.build(),
            from: c
                .from
                .parse()
                .map_err(|e| bad(format!("from {:?}: {e}", c.from)))?,
            subject: c.subject.clone(),
            handshake_and_heartbeat: c.handshake_and_heartbeat,
        })
    }

    /// Connects (with TLS and login as configured) and says whether the server answers.
    pub(crate) async fn test_connection(&self) -> Result<(), String> {
        match self.transport.test_connection().await {
            Ok(true) => Ok(()),
            Ok(false) => Err("the server did not answer NOOP".into()),
            Err(e) => Err(e.to_string()),
        }
    }

    fn message(&self, n: &Notification, to: &Destination) -> Result<Message, SendError> {
        let enc = |e: &dyn std::fmt::Display| SendError::Encode(e.to_string());
        let addrs = mailto_addresses(&to.endpoint).ok_or_else(|| {
            SendError::Refused(format!("endpoint {:?} is not mailto:", to.endpoint))
        })?;
        let header = |name: &str| {
            to.headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        };
        let from: Mailbox = match header("From") {
            Some(f) => f.parse().map_err(|e| enc(&e))?,
            None => self.from.clone(),
        };
        let mut m = Message::builder()
            .from(from)
            .subject(header("Subject").unwrap_or(&self.subject));
        for a in &addrs {
            m = m.to(a.parse().map_err(|e| enc(&e))?);
        }
        if let Some(r) = header("Reply-To") {
            m = m.reply_to(r.parse().map_err(|e| enc(&e))?);
        }
        for cc in header("Cc").into_iter().flat_map(|c| c.split(',')) {
            m = m.cc(cc.trim().parse().map_err(|e| enc(&e))?);
        }
        let text = SinglePart::plain(summary(n));
        let body = if n.content == Content::Empty {
            MultiPart::mixed().singlepart(text)
        } else {
            let json = serde_json::to_vec_pretty(&n.bundle()).map_err(|e| enc(&e))?;
            let ct = ContentType::parse("application/fhir+json").map_err(|e| enc(&e))?;
            let file = Attachment::new("notification.json".to_string()).body(json, ct);
            MultiPart::mixed().singlepart(text).singlepart(file)
        };
        m.multipart(body).map_err(|e| enc(&e))
    }
}

/// The mail text: what happened, by number, never what the resources say.
pub(crate) fn summary(n: &Notification) -> String {
    let kind = match n.kind {
        Kind::Handshake => "handshake",
        Kind::Heartbeat => "heartbeat",
        _ => "event-notification",
    };
    let mut s = format!(
        "FHIR subscription notification\n\nType: {kind}\nSubscription: {}\nTopic: {}\n",
        n.subscription_id, n.topic
    );
    match (n.event_numbers.first(), n.event_numbers.last()) {
        (Some(a), Some(b)) if a == b => s.push_str(&format!("Events: 1 (event number {a})\n")),
        (Some(a), Some(b)) => s.push_str(&format!(
            "Events: {} (event numbers {a} to {b})\n",
            n.event_numbers.len()
        )),
        _ => {}
    }
    if n.content != Content::Empty {
        s.push_str("\nThe notification Bundle is attached as notification.json.\n");
    }
    s
}

#[async_trait]
impl Channel for Email {
    fn channel_type(&self) -> ChannelType {
        ChannelType::Email
    }

    async fn send(&self, n: &Notification, to: &Destination) -> Result<Accepted, SendError> {
        if matches!(n.kind, Kind::Handshake | Kind::Heartbeat) && !self.handshake_and_heartbeat {
            return Ok(Accepted::default());
        }
        let m = self.message(n, to)?;
        match tokio::time::timeout(to.timeout, self.transport.send(m)).await {
            Err(_) => Err(SendError::Timeout(to.timeout)),
            Ok(Ok(_)) => Ok(Accepted::default()),
            Ok(Err(e)) if e.is_permanent() => Err(SendError::Refused(format!("SMTP: {e}"))),
            Ok(Err(e)) => Err(SendError::Connect(format!("SMTP: {e}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::time::Duration;

    fn n(content: Content, numbers: Vec<i64>) -> Notification {
        Notification {
            kind: Kind::EventNotification,
            subscription_id: "s1".into(),
            topic: "http://t".into(),
            event_numbers: numbers,
            content,
            body: serde_json::to_vec(&json!({"resourceType": "Bundle", "entry": [{"resource": {"resourceType": "Patient", "name": [{"family": "Secret"}]}}]}))
            .unwrap()
            .into(),
        }
    }

    fn email() -> Email {
        Email::from_config(
            &toml::from_str(
                r#"smtp = "smtp://127.0.0.1:2525"
from = "cdc@example.org""#,
            )
            .unwrap(),
        )
        .unwrap()
    }

    #[test]
    fn the_text_names_numbers_never_content() {
        let s = summary(&n(Content::FullResource, vec![4, 5, 6]));
        assert!(s.contains("Events: 3 (event numbers 4 to 6)"), "{s}");
        assert!(s.contains("Topic: http://t"));
        assert!(!s.contains("Secret"));
        assert!(summary(&n(Content::IdOnly, vec![7])).contains("Events: 1 (event number 7)"));
    }

    #[test]
    fn headers_from_the_subscription_and_the_attachment() {
        let to = Destination {
            endpoint: "mailto:a@example.org,b@example.org".into(),
            headers: vec![
                ("Subject".into(), "Critical lab".into()),
                ("Cc".into(), "c@example.org".into()),
                ("Reply-To".into(), "ward@example.org".into()),
            ],
            content_type: "application/fhir+json".into(),
            timeout: Duration::from_secs(1),
            signing_secret: None,
        };
        let raw = String::from_utf8(
            email()
                .message(&n(Content::IdOnly, vec![1]), &to)
                .unwrap()
                .formatted(),
        )
        .unwrap();
        for want in [
            "Subject: Critical lab",
            "To: a@example.org, b@example.org",
            "Cc: c@example.org",
            "Reply-To: ward@example.org",
            "From: cdc@example.org",
            "filename=\"notification.json\"",
            "application/fhir+json",
        ] {
            assert!(raw.contains(want), "{want} missing in\n{raw}");
        }
        let empty = String::from_utf8(
            email()
                .message(&n(Content::Empty, vec![1]), &to)
                .unwrap()
                .formatted(),
        )
        .unwrap();
        assert!(
            !empty.contains("notification.json\""),
            "no attachment for empty"
        );
    }

    #[test]
    fn a_bad_config_is_named() {
        let e = Email::from_config(
            &toml::from_str(
                r#"smtp = "imap://x"
from = "a@b""#,
            )
            .unwrap(),
        )
        .err()
        .unwrap();
        assert!(e.to_string().contains("scheme"), "{e}");
        let e = Email::from_config(
            &toml::from_str(
                r#"smtp = "smtp://x"
from = "a@b"
username = "u"
password_env = "FHIR_CDC_TEST_NO_SUCH_VAR""#,
            )
            .unwrap(),
        )
        .err()
        .unwrap();
        assert!(e.to_string().contains("FHIR_CDC_TEST_NO_SUCH_VAR"), "{e}");
    }
}
