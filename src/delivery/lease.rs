//! Leases: which process sends a subscription. A lease is a session advisory lock on one
//! connection per topic, so a process that dies loses its leases with its connection.

use std::collections::HashSet;
use std::sync::Mutex;
use tokio_postgres::Client;

use super::DeliveryError;
use crate::queue::leases;
use crate::queue::subscriptions::SubscriptionRow;

type Result<T> = std::result::Result<T, DeliveryError>;

/// The leases of one topic in this process: advisory locks on one connection of its own,
/// and the set of ids held, because session locks nest and would let two of our own sends
/// take one subscription.
pub(super) struct Leases {
    pub(crate) conn: Client,
    held: Mutex<HashSet<String>>,
}

impl Leases {
    pub(super) fn new(conn: Client) -> Self {
        Leases {
            conn,
            held: Mutex::default(),
        }
    }

    pub(super) fn held(&self) -> Vec<String> {
        self.held
            .lock()
            .map(|h| h.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Leases those of `ids` that no send of ours holds and no other instance has, and
    /// reads them, in one round trip (one per subscription made the lease connection the
    /// bottleneck of delivery at a few hundred notifications/s): the leased ids, and the
    /// rows a send may use with whether they have requeued dead letters.
    pub(super) async fn take_and_read(
        &self,
        ids: Vec<String>,
    ) -> Result<(Vec<String>, Vec<(SubscriptionRow, bool)>)> {
        let ids: Vec<String> = match self.held.lock() {
            Ok(h) => ids.into_iter().filter(|id| !h.contains(id)).collect(),
            Err(_) => return Ok((Vec::new(), Vec::new())),
        };
        if ids.is_empty() {
            return Ok((ids, Vec::new()));
        }
        let (got, rows) = leases::lease_and_read(&self.conn, &ids).await?;
        if let Ok(mut h) = self.held.lock() {
            h.extend(got.iter().cloned());
        }
        Ok((got, rows))
    }

    /// Gives the leases of `ids` back in one round trip.
    pub(super) async fn give_back(&self, ids: &[String]) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let r = leases::release_many(&self.conn, ids).await;
        if let Ok(mut h) = self.held.lock() {
            for id in ids {
                h.remove(id);
            }
        }
        Ok(r?)
    }
}
