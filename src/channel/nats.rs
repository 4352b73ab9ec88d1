//! NATS JetStream destinations: each notification is published to the destination's subject
//! with `Nats-Msg-Id` = `<destination id>:<first eventNumber>`, and counts as delivered only
//! once the stream's publish acknowledgement arrives. A re-publish after a crash or a lost
//! acknowledgement carries the same id, so the stream's duplicate window drops it: the
//! stream holds each event once.

use async_nats::jetstream::{self, context::PublishErrorKind};
use async_trait::async_trait;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::OnceCell;

use super::broker::{self, BrokerConfigError};
use super::{Accepted, Channel, Destination, Notification, SendError};
use crate::config::{BrokerKind, DestinationConfig};
use crate::fhir::subscription::ChannelType;

/// One destination: its settings and, once connected, its JetStream context. The client
/// reconnects by itself after a broker restart; a publish in the meantime times out and is
/// retried with the same message id.
struct Target {
    cfg: DestinationConfig,
    password: Option<String>,
    js: OnceCell<jetstream::Context>,
}

/// The NATS destinations of the config file, by id.
pub(crate) struct Nats {
    targets: HashMap<String, Arc<Target>>,
}

impl Nats {
    /// The `kind = "nats"` destinations; fails when a secret they name is not set.
    pub(crate) fn from_config(all: &[DestinationConfig]) -> Result<Self, BrokerConfigError> {
        let mut targets = HashMap::new();
        for d in all.iter().filter(|d| d.kind == BrokerKind::Nats) {
            let t = Target {
                cfg: d.clone(),
                password: broker::password(d)?,
                js: OnceCell::new(),
            };
            targets.insert(d.id.clone(), Arc::new(t));
        }
        Ok(Nats { targets })
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.targets.is_empty()
    }
}

#[async_trait]
impl Channel for Nats {
    fn channel_type(&self) -> ChannelType {
        ChannelType::Nats
    }

    async fn send(&self, n: &Notification, to: &Destination) -> Result<Accepted, SendError> {
        let t = self.targets.get(&n.subscription_id).ok_or_else(|| {
            SendError::Unavailable(format!("nats destination {}", n.subscription_id))
        })?;
        match tokio::time::timeout(to.timeout, publish(t, n, to.timeout)).await {
            Ok(r) => r.map(|()| Accepted::default()),
            Err(_) => Err(SendError::Timeout(to.timeout)),
        }
    }
}

async fn publish(t: &Target, n: &Notification, timeout: Duration) -> Result<(), SendError> {
    let js =
        t.js.get_or_try_init(|| async {
            connect(&t.cfg, t.password.as_deref(), timeout)
                .await
                .map(jetstream::new)
        })
        .await?;
    let subject = t.cfg.subject.clone().unwrap_or_default();
    let mut msg = jetstream::message::PublishMessage::build()
        .payload(n.body.clone())
        .message_id(broker::message_id(n))
        .header("Content-Type", broker::CONTENT_TYPE);
    for (k, v) in broker::headers(n) {
        msg = msg.header(k, v);
    }
    let ack = js
        .send_publish(subject.clone(), msg)
        .await
        .map_err(|e| publish_error(e.kind(), &e.to_string(), &subject, timeout))?
        .await
        .map_err(|e| publish_error(e.kind(), &e.to_string(), &subject, timeout))?;
    if ack.duplicate {
        // Stored before (a re-publish after a crash or a lost acknowledgement): delivered.
        metrics::counter!(crate::metrics::BROKER_DUPLICATES, "destination" => t.cfg.id.clone())
            .increment(1);
    }
    Ok(())
}

/// Connects to the destination's server with its credentials and TLS settings.
pub(crate) async fn connect(
    d: &DestinationConfig,
    password: Option<&str>,
    timeout: Duration,
) -> Result<async_nats::Client, SendError> {
    let url = reqwest::Url::parse(&d.url).map_err(|e| SendError::Connect(e.to_string()))?;
    let mut o = async_nats::ConnectOptions::new()
        .name("fhir-cdc")
        .connection_timeout(timeout)
        .request_timeout(Some(timeout));
    match (url.username(), password) {
        ("", Some(token)) => o = o.token(token.to_string()),
        ("", None) => {}
        (user, pass) => o = o.user_and_password(user.into(), pass.unwrap_or_default().into()),
    }
    if let Some(f) = &d.credentials_file {
        o = o
            .credentials_file(f)
            .await
            .map_err(|e| SendError::Connect(format!("credentials_file {}: {e}", f.display())))?;
    }
    if let Some(ca) = &d.tls_ca_file {
        o = o.add_root_certificates(ca.clone()).require_tls(true);
    }
    if let (Some(cert), Some(key)) = (&d.tls_cert_file, &d.tls_key_file) {
        o = o.add_client_certificate(cert.clone(), key.clone());
    }
    if url.scheme() == "tls" {
        o = o.require_tls(true);
    }
    o.connect(d.public_url())
        .await
        .map_err(|e| SendError::Connect(format!("nats {}: {e}", d.public_url())))
}

/// A refusal that a retry cannot mend (no stream covers the subject, a message above the
/// server's limit) is permanent; the rest are retried with the same message id.
fn publish_error(kind: PublishErrorKind, text: &str, subject: &str, t: Duration) -> SendError {
    match kind {
        PublishErrorKind::StreamNotFound => SendError::Refused(format!(
            "no JetStream stream covers subject {subject:?} (nats: {text})"
        )),
        PublishErrorKind::MaxPayloadExceeded => SendError::Refused(format!("nats: {text}")),
        PublishErrorKind::TimedOut => SendError::Timeout(t),
        PublishErrorKind::BrokenPipe => SendError::Connect(format!("nats: {text}")),
        _ => SendError::Other(format!("nats publish to {subject:?}: {text}")),
    }
}

/// `check`: connects and finds the stream that covers the subject.
pub(crate) async fn probe(d: &DestinationConfig) -> Result<String, String> {
    let password = broker::password(d).map_err(|e| e.to_string())?;
    let t = Duration::from_secs(5);
    let client = connect(d, password.as_deref(), t)
        .await
        .map_err(|e| e.to_string())?;
    let subject = d.subject.clone().unwrap_or_default();
    jetstream::new(client)
        .stream_by_subject(subject.clone())
        .await
        .map(|stream| format!("stream {stream} covers subject {subject:?}"))
        .map_err(|e| format!("no JetStream stream covers subject {subject:?}: {e}"))
}
