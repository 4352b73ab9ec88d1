//! Channels: how a notification leaves the daemon. One object-safe trait, chosen per
//! subscription by its `channel` column, so send workers do not care which channel a
//! subscription uses and a new channel is one new file here.

pub(crate) mod amqp;
pub(crate) mod broker;
pub(crate) mod email;
pub(crate) mod http1;
/// A recording channel for tests (not in the release binary).
#[cfg(any(test, feature = "test-utils"))]
pub mod memory;
pub(crate) mod message;
pub(crate) mod nats;
pub(crate) mod oauth;
pub mod private;
pub(crate) mod rest_hook;
pub(crate) mod signing;
pub mod websocket;

use async_trait::async_trait;
use serde_json::Value;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crate::fhir::notification::Kind;
use crate::fhir::subscription::ChannelType;

/// A built notification Bundle.
#[derive(Debug, Clone)]
pub struct Notification {
    pub(crate) kind: Kind,
    pub(crate) subscription_id: String,
    pub(crate) topic: String,
    /// The eventNumbers it carries (none for a handshake or heartbeat).
    pub(crate) event_numbers: Vec<i64>,
    pub(crate) content: crate::fhir::subscription::Content,
    /// The Bundle as JSON, written once (`fhir::wire`) and sent as it is.
    pub(crate) body: bytes::Bytes,
}

impl Notification {
    /// The Bundle as a JSON value, for channels that wrap or reformat it (message, email)
    /// and for tests.
    pub(crate) fn bundle(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

/// Where and how a subscription wants its notifications: its channel settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destination {
    pub(crate) endpoint: String,
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) content_type: String,
    pub(crate) timeout: Duration,
    /// The subscription's signing secret: rest-hook requests then carry signature headers.
    pub(crate) signing_secret: Option<String>,
}

/// What a receiver said when it took a notification: the HTTP status for the channels that
/// have one (rest-hook, message), for the console's attempt list.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Accepted {
    pub(crate) status: Option<u16>,
}

/// Why a send failed. Texts name the endpoint's answer, never the payload. None stops the
/// daemon. Transient kinds are retried with backoff (a `Retry-After` is honoured); a
/// permanent refusal ([`SendError::is_permanent`]) dead-letters its events at once and
/// turns the subscription to `error` without waiting for more failures.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SendError {
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    /// The answer's status and its `Retry-After`, if any.
    #[error("endpoint answered HTTP {0}")]
    Status(u16, Option<Duration>),
    /// This server will not send there (a private address when they are not allowed).
    #[error("refused: {0}")]
    Refused(String),
    #[error("connection failed: {0}")]
    Connect(String),
    #[error("notification could not be encoded: {0}")]
    Encode(String),
    #[error("channel {0} is not available in this process")]
    Unavailable(String),
    /// A websocket subscription whose sockets all closed: not a failure, the events wait
    /// for the next bind.
    #[error("no client is bound")]
    NoListener,
    #[error("{0}")]
    Other(String),
}

impl SendError {
    /// Retrying the same notification cannot succeed: the endpoint refused it as a client
    /// error (4xx other than 408 Request Timeout and 429 Too Many Requests), or this server
    /// refuses the destination.
    pub(crate) fn is_permanent(&self) -> bool {
        match self {
            SendError::Status(c, _) => (400..500).contains(c) && *c != 408 && *c != 429,
            SendError::Refused(_) | SendError::Encode(_) => true,
            _ => false,
        }
    }

    /// How long the endpoint asked us to wait (`Retry-After`).
    pub(crate) fn retry_after(&self) -> Option<Duration> {
        match self {
            SendError::Status(_, r) => *r,
            _ => None,
        }
    }
}

#[async_trait]
pub(crate) trait Channel: Send + Sync {
    fn channel_type(&self) -> ChannelType;

    /// Sends one notification; `Ok` means the receiver accepted it.
    async fn send(&self, n: &Notification, to: &Destination) -> Result<Accepted, SendError>;

    /// Subscriptions this channel can reach from this process only (websocket: the ones
    /// with a socket bound here). Empty for channels that reach anywhere.
    fn bound_ids(&self) -> Vec<String> {
        Vec::new()
    }
}

/// Why the channels could not be set up from the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ChannelsError {
    #[error(transparent)]
    Email(#[from] email::EmailConfigError),
    #[error(transparent)]
    Broker(#[from] broker::BrokerConfigError),
    #[error(transparent)]
    EndpointAuth(#[from] rest_hook::EndpointAuthError),
}

/// The channels of this process, by type.
#[derive(Clone, Default)]
pub struct Channels {
    by_type: HashMap<ChannelType, Arc<dyn Channel>>,
}

impl Channels {
    /// Every channel the daemon delivers over, with its production implementation.
    /// `hub`: the websocket sockets of this process, shared with the API that accepts them.
    /// Fails on an unusable `[channels.email]`, or a `[[destination]]` whose secret is not
    /// in the environment.
    pub fn standard(
        cfg: &crate::config::Config,
        hub: Arc<websocket::Hub>,
    ) -> Result<Self, ChannelsError> {
        // Every topic's sends may be under way at once, possibly to one host.
        let concurrency = cfg.topics.iter().map(|t| t.workers).sum::<usize>();
        let http = rest_hook::RestHook::with_endpoint_auth(
            cfg.delivery.allow_private_endpoints,
            concurrency.max(cfg.delivery.workers),
            &cfg.delivery.endpoint_auth,
        )?;
        let format = cfg.source.fhir_version.into();
        let mut channels = Channels::default()
            .with(Arc::new(http.clone()))
            .with(Arc::new(message::Message::new(
                http,
                format,
                cfg.api.base_url(),
            )))
            .with(hub);
        if let Some(e) = &cfg.channels.email {
            channels = channels.with(Arc::new(email::Email::from_config(e)?));
        }
        let nats = nats::Nats::from_config(&cfg.destinations)?;
        if !nats.is_empty() {
            channels = channels.with(Arc::new(nats));
        }
        let amqp = amqp::Amqp::from_config(&cfg.destinations)?;
        if !amqp.is_empty() {
            channels = channels.with(Arc::new(amqp));
        }
        Ok(channels)
    }

    pub(crate) fn with(mut self, c: Arc<dyn Channel>) -> Self {
        self.by_type.insert(c.channel_type(), c);
        self
    }

    /// Every subscription bound to this process by any channel.
    pub(crate) fn bound_ids(&self) -> Vec<String> {
        self.by_type.values().flat_map(|c| c.bound_ids()).collect()
    }

    pub(crate) fn get(&self, t: Option<ChannelType>) -> Result<&Arc<dyn Channel>, SendError> {
        let t = t.ok_or_else(|| SendError::Unavailable("(unknown)".into()))?;
        self.by_type
            .get(&t)
            .ok_or_else(|| SendError::Unavailable(t.as_str().into()))
    }
}
