//! Capture's one error type. The kind decides what the supervisor does: reconnect (the
//! store or queue went away) or stop (configuration, or a stream we cannot read).

use crate::error::{Classify, ErrorKind};
use crate::queue::QueueError;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("queue: {0}")]
    Queue(#[from] QueueError),
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// The replication connection failed or ended.
    #[error("replication: {0}")]
    Replication(String),
    /// The stream said something we cannot read: reading it again would say the same.
    #[error("pgoutput stream: {0}")]
    Protocol(String),
    #[error("configuration: {0}")]
    Config(String),
}

impl Classify for CaptureError {
    fn kind(&self) -> ErrorKind {
        match self {
            CaptureError::Queue(e) => e.kind(),
            CaptureError::Store(e) => e.kind(),
            CaptureError::Replication(_) => ErrorKind::Retryable,
            CaptureError::Protocol(_) | CaptureError::Config(_) => ErrorKind::Fatal,
        }
    }

    fn remedy(&self) -> Option<String> {
        match self {
            CaptureError::Queue(e) => e.remedy(),
            CaptureError::Store(e) => e.remedy(),
            CaptureError::Replication(_) => None,
            CaptureError::Protocol(_) => Some(
                "report this with the log; the slot was not confirmed past the unreadable change, so nothing is lost".into(),
            ),
            CaptureError::Config(_) => Some("run `fhir-cdc check --config F`: it says what to fix".into()),
        }
    }
}

pub(crate) type Result<T> = std::result::Result<T, CaptureError>;
