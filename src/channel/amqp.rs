//! AMQP 0-9-1 destinations (RabbitMQ and others): each notification is published to the
//! destination's exchange and routing key as a persistent message with `message_id` =
//! `<destination id>:<first eventNumber>`, `mandatory` set, on a channel in confirm mode. It
//! counts as delivered only on the broker's publisher confirm. AMQP has no de-duplication:
//! a re-publish after a crash reaches consumers again, with the same message id.

use async_trait::async_trait;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Confirmation, Connection, ConnectionProperties, ExchangeKind};
use std::collections::HashMap;
use std::time::Duration;
use tokio::sync::Mutex;

use super::broker::{self, BrokerConfigError};
use super::{Accepted, Channel, Destination, Notification, SendError};
use crate::config::{BrokerKind, DestinationConfig};
use crate::fhir::subscription::ChannelType;

/// Delivery mode 2: the broker writes the message to disk (on a durable queue).
const PERSISTENT: u8 = 2;

/// An open connection and its confirm-mode channel.
struct Open {
    conn: Connection,
    channel: lapin::Channel,
}

/// One destination: its settings and, while it works, its connection. Any failure drops
/// the connection; the next send opens a new one and checks the exchange again.
struct Target {
    cfg: DestinationConfig,
    password: Option<String>,
    open: Mutex<Option<Open>>,
}

/// The AMQP destinations of the config file, by id.
pub(crate) struct Amqp {
    targets: HashMap<String, Target>,
}

impl Amqp {
    /// The `kind = "amqp"` destinations; fails when a secret they name is not set.
    pub(crate) fn from_config(all: &[DestinationConfig]) -> Result<Self, BrokerConfigError> {
        let mut targets = HashMap::new();
        for d in all.iter().filter(|d| d.kind == BrokerKind::Amqp) {
            let t = Target {
                cfg: d.clone(),
                password: broker::password(d)?,
                open: Mutex::new(None),
            };
            targets.insert(d.id.clone(), t);
        }
        Ok(Amqp { targets })
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.targets.is_empty()
    }
}

#[async_trait]
impl Channel for Amqp {
    fn channel_type(&self) -> ChannelType {
        ChannelType::Amqp
    }

    async fn send(&self, n: &Notification, to: &Destination) -> Result<Accepted, SendError> {
        let t = self.targets.get(&n.subscription_id).ok_or_else(|| {
            SendError::Unavailable(format!("amqp destination {}", n.subscription_id))
        })?;
        let mut open = t.open.lock().await;
        let r = match tokio::time::timeout(to.timeout, publish(t, &mut open, n)).await {
            Ok(r) => r,
            Err(_) => Err(SendError::Timeout(to.timeout)),
        };
        if r.is_err() {
            if let Some(o) = open.take() {
                let _ = tokio::time::timeout(
                    Duration::from_secs(1),
                    o.conn.close(200, "fhir-cdc reconnects".into()),
                )
                .await;
            }
        }
        r.map(|()| Accepted::default())
    }
}

async fn publish(t: &Target, open: &mut Option<Open>, n: &Notification) -> Result<(), SendError> {
    if open.is_none() {
        *open = Some(connect(&t.cfg, t.password.as_deref()).await?);
    }
    let Some(o) = open.as_ref() else {
        return Err(SendError::Other("amqp connection missing".into()));
    };
    let mut headers = FieldTable::default();
    for (k, v) in broker::headers(n) {
        headers.insert(k.into(), AMQPValue::LongString(v.into()));
    }
    let props = BasicProperties::default()
        .with_message_id(broker::message_id(n).into())
        .with_content_type(broker::CONTENT_TYPE.into())
        .with_delivery_mode(PERSISTENT)
        .with_headers(headers);
    let options = BasicPublishOptions {
        mandatory: true,
        immediate: false,
    };
    let confirm = o
        .channel
        .basic_publish(
            exchange(&t.cfg),
            routing_key(&t.cfg),
            options,
            &n.body,
            props,
        )
        .await
        .map_err(|e| amqp_error(&e, &t.cfg))?
        .await
        .map_err(|e| amqp_error(&e, &t.cfg))?;
    match confirm {
        Confirmation::Ack(None) => Ok(()),
        Confirmation::Ack(Some(r)) | Confirmation::Nack(Some(r)) => {
            Err(SendError::Refused(format!(
                "the broker returned the message: {} {} (no queue is bound to {})",
                r.reply_code,
                r.reply_text,
                t.cfg.target()
            )))
        }
        Confirmation::Nack(None) => Err(SendError::Other(
            "the broker refused the message (publisher confirm nack)".into(),
        )),
        Confirmation::NotRequested => Err(SendError::Other(
            "the channel is not in confirm mode".into(),
        )),
    }
}

fn exchange(d: &DestinationConfig) -> ShortString {
    d.exchange.clone().unwrap_or_default().into()
}

fn routing_key(d: &DestinationConfig) -> ShortString {
    d.routing_key.clone().unwrap_or_default().into()
}

/// Opens a connection and a confirm-mode channel, and checks that the exchange exists (a
/// passive declare: it never creates one).
async fn connect(d: &DestinationConfig, password: Option<&str>) -> Result<Open, SendError> {
    let mut url = reqwest::Url::parse(&d.url).map_err(|e| SendError::Connect(e.to_string()))?;
    if password.is_some() {
        let _ = url.set_password(password);
    }
    let props = ConnectionProperties::default().with_connection_name("fhir-cdc".into());
    let conn = match &d.tls_ca_file {
        None => Connection::connect(url.as_str(), props).await,
        Some(ca) => {
            let pem = std::fs::read_to_string(ca)
                .map_err(|e| SendError::Connect(format!("tls_ca_file {}: {e}", ca.display())))?;
            let tls = lapin::tcp::OwnedTLSConfig {
                identity: None,
                cert_chain: Some(pem),
            };
            let rt =
                lapin::runtime::default_runtime().map_err(|e| SendError::Connect(e.to_string()))?;
            Connection::connect_with_config(url.as_str(), props, tls, rt).await
        }
    }
    .map_err(|e| SendError::Connect(format!("amqp {}: {e}", d.public_url())))?;
    let channel = conn.create_channel().await.map_err(|e| amqp_error(&e, d))?;
    if !d.exchange.as_deref().unwrap_or("").is_empty() {
        let passive = ExchangeDeclareOptions {
            passive: true,
            ..ExchangeDeclareOptions::default()
        };
        channel
            .exchange_declare(
                exchange(d),
                ExchangeKind::Direct,
                passive,
                FieldTable::default(),
            )
            .await
            .map_err(|e| amqp_error(&e, d))?;
    }
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|e| amqp_error(&e, d))?;
    Ok(Open { conn, channel })
}

/// A missing exchange (404 NOT_FOUND) or refused access is permanent; the rest (a lost
/// connection, a broker restarting) is retried.
fn amqp_error(e: &lapin::Error, d: &DestinationConfig) -> SendError {
    if let lapin::ErrorKind::ProtocolError(p) = e.kind() {
        match p.kind() {
            AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND) => {
                return SendError::Refused(format!("{} does not exist (amqp: {p})", d.target()))
            }
            AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED) => {
                return SendError::Refused(format!("access to {} refused (amqp: {p})", d.target()))
            }
            _ => {}
        }
    }
    SendError::Connect(format!("amqp {}: {e}", d.public_url()))
}

/// `check`: connects and checks that the exchange exists.
pub(crate) async fn probe(d: &DestinationConfig) -> Result<String, String> {
    let password = broker::password(d).map_err(|e| e.to_string())?;
    let open = tokio::time::timeout(Duration::from_secs(5), connect(d, password.as_deref()))
        .await
        .map_err(|_| format!("amqp {}: no answer in 5 s", d.public_url()))?
        .map_err(|e| e.to_string())?;
    let _ = open.conn.close(200, "fhir-cdc check".into()).await;
    Ok(format!("{} exists", d.target()))
}
