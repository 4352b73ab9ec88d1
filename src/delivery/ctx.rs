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
    pub(crate) cfg: Arc<Config>,
    pub(crate) policy: SendPolicy,
    pub(crate) payloads: Payloads,
    pub(crate) channels: Channels,
    pub(crate) topics: Arc<crate::topic_registry::TopicRegistry>,
    pub(crate) base_url: String,
    pub(crate) format: Format,
    /// Queue connections for the sends' reads and writes; none is held across a send.
    pub(crate) pool: Pool,
    /// This process's recent attempts, for the console.
    pub(crate) journal: Arc<super::journal::Journal>,
}

impl Ctx {
    /// A queue connection for one step of a send.
    pub(super) async fn conn(&self) -> Result<deadpool_postgres::Object, DeliveryError> {
        Ok(self.pool.get().await.map_err(QueueError::from)?)
    }
}
