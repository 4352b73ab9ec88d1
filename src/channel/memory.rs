//! A channel that records what it is given, for tests of the send logic. It can be told to
//! refuse the next sends, as an endpoint that is down would.

use async_trait::async_trait;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use super::{Accepted, Channel, Destination, Notification, SendError};
use crate::fhir::subscription::ChannelType;

/// Records notifications as the channel of type `as_type`.
pub struct MemoryChannel {
    as_type: ChannelType,
    sent: Mutex<Vec<(Notification, Destination)>>,
    fail_next: AtomicUsize,
}

impl MemoryChannel {
    pub fn new(as_type: ChannelType) -> Self {
        MemoryChannel {
            as_type,
            sent: Mutex::new(Vec::new()),
            fail_next: AtomicUsize::new(0),
        }
    }

    /// The next `n` sends fail with HTTP 503.
    pub fn fail_next(&self, n: usize) {
        self.fail_next.store(n, Ordering::SeqCst);
    }

    /// What was accepted, in order.
    pub fn sent(&self) -> Vec<(Notification, Destination)> {
        self.sent.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

#[async_trait]
impl Channel for MemoryChannel {
    fn channel_type(&self) -> ChannelType {
        self.as_type
    }

    async fn send(&self, n: &Notification, to: &Destination) -> Result<Accepted, SendError> {
        let failing = self
            .fail_next
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| v.checked_sub(1))
            .is_ok();
        if failing {
            return Err(SendError::Status(503, None));
        }
        self.sent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((n.clone(), to.clone()));
        Ok(Accepted::default())
    }
}
