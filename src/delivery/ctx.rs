//! What every send of this process shares.

use deadpool_postgres::Pool;
use std::sync::Arc;

use super::payload::Payloads;
use super::policy::SendPolicy;
use super::DeliveryError;
use crate::channel::Channels;
use crate::config::Config;
use crate::fhir::notification::Format;
use crate::queue::QueueError;

pub(super) struct Ctx {
    pub cfg: Arc<Config>,
    pub policy: SendPolicy,
    pub payloads: Payloads,
    pub channels: Channels,
    pub topics: Arc<crate::topic_registry::TopicRegistry>,
    pub base_url: String,
    pub format: Format,
    /// Queue connections for the sends' reads and writes; none is held across a send.
    pub pool: Pool,
    /// This process's recent attempts, for the console.
    pub journal: Arc<super::journal::Journal>,
}

impl Ctx {
    /// A queue connection for one step of a send.
    pub(super) async fn conn(&self) -> Result<deadpool_postgres::Object, DeliveryError> {
        Ok(self.pool.get().await.map_err(QueueError::from)?)
    }
}
