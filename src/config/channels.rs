//! `[channels.*]`: settings of the channels other than rest-hook.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// `[channels]`: settings of the channels other than rest-hook.
#[derive(Debug, Clone, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ChannelsConfig {
    /// Without it, email subscriptions are refused.
    pub email: Option<EmailConfig>,
    #[serde(default)]
    pub websocket: WebsocketConfig,
}

impl ChannelsConfig {
    /// What Subscription validation accepts for the email channel.
    pub(crate) fn email_rules(&self) -> crate::fhir::subscription::EmailRules {
        match &self.email {
            None => Default::default(),
            Some(e) => crate::fhir::subscription::EmailRules {
                configured: true,
                full_resource_ok: e.uses_tls() || e.allow_full_resource_without_tls,
            },
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EmailConfig {
    /// `smtp://host:port` (plain), `smtp+starttls://host:port` or `smtps://host:port`.
    pub(crate) smtp: String,
    /// The sender address, unless a subscription sets `From`.
    pub(crate) from: String,
    pub(crate) username: Option<String>,
    /// The environment variable holding the SMTP password; it is never read from the file.
    pub(crate) password_env: Option<String>,
    /// The subject, unless a subscription sets `Subject`.
    #[serde(default = "default_subject")]
    pub(crate) subject: String,
    /// PEM file of extra CA certificates for the SMTP server (a private CA).
    pub(crate) ca_file: Option<PathBuf>,
    /// Let full-resource notifications go over an SMTP connection without TLS (default false:
    /// such subscriptions are refused).
    #[serde(default)]
    pub(crate) allow_full_resource_without_tls: bool,
    /// Send handshake and heartbeat mails (default false: a handshake by mail is optional in
    /// the Backport IG; an email subscription turns active without one).
    #[serde(default)]
    pub(crate) handshake_and_heartbeat: bool,
}

impl EmailConfig {
    /// Whether the connection to the SMTP server is encrypted.
    pub(crate) fn uses_tls(&self) -> bool {
        self.smtp.starts_with("smtps://") || self.smtp.starts_with("smtp+starttls://")
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WebsocketConfig {
    /// How long a `$get-ws-binding-token` token may wait to be used, seconds (default 60).
    #[serde(default = "default_token_lifetime")]
    pub token_lifetime_secs: u64,
}

impl Default for WebsocketConfig {
    fn default() -> Self {
        WebsocketConfig {
            token_lifetime_secs: default_token_lifetime(),
        }
    }
}

fn default_subject() -> String {
    "FHIR subscription notification".into()
}

fn default_token_lifetime() -> u64 {
    60
}
