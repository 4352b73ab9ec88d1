//! Channels: how a notification leaves the daemon. One trait, so send workers do not care
//! which channel a subscription uses.

pub mod rest_hook;

use std::future::Future;
use std::time::Duration;

/// One notification ready to go out.
pub struct Outgoing<'a> {
    pub endpoint: &'a str,
    pub headers: &'a [(String, String)],
    pub content_type: &'a str,
    pub body: Vec<u8>,
    pub timeout: Duration,
}

/// Why a send failed. Texts name the endpoint's answer, never the payload.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("endpoint answered HTTP {0}")]
    Status(u16),
    #[error("connection failed: {0}")]
    Connect(String),
    #[error("{0}")]
    Other(String),
}

pub trait Channel: Send + Sync {
    fn send(&self, out: Outgoing<'_>) -> impl Future<Output = Result<(), SendError>> + Send;
}
