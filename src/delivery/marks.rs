//! Delivered marks, grouped: the send tasks of a topic hand each delivered notification's
//! new cursor to one writer, which moves whatever is waiting in one statement, one row per
//! subscription however many of its notifications the group holds. One statement per
//! notification made the queue's round trips, not the endpoints, the limit of fan-out. A
//! send task awaits its marks before it gives its lease back, so no other instance can
//! send those events again.

use deadpool_postgres::Pool;
use tokio::sync::{mpsc, oneshot};

use super::DeliveryError;
use crate::queue::cursor::{self, Advance, Cursor};
use crate::queue::QueueError;

/// Marks written per statement at most.
const MAX_GROUP: usize = 512;

/// One notification that reached its endpoint, and who waits for its mark.
struct Mark {
    advance: Advance,
    done: oneshot::Sender<Result<(), String>>,
}

/// The handle send tasks use; the writer ends when the last handle is dropped.
#[derive(Clone)]
pub(super) struct Marks {
    tx: mpsc::UnboundedSender<Mark>,
}

/// A mark handed to the writer; await it with [`Pending::wait`].
pub(super) struct Pending(oneshot::Receiver<Result<(), String>>);

impl Pending {
    /// The mark is committed (or why it is not).
    pub(super) async fn wait(self) -> Result<(), DeliveryError> {
        match self.0.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(QueueError::Other(format!("delivered mark: {e}")).into()),
            Err(_) => Err(QueueError::Other("delivered marks writer stopped".into()).into()),
        }
    }
}

impl Marks {
    /// Starts the writer on `pool`.
    pub(super) fn start(pool: Pool) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(writer(pool, rx));
        Marks { tx }
    }

    /// Hands the new cursor of `subscription` to the writer.
    pub(super) fn mark(&self, subscription: &str, to: Cursor) -> Pending {
        let (done, rx) = oneshot::channel();
        let m = Mark {
            advance: Advance {
                subscription: subscription.to_string(),
                to,
            },
            done,
        };
        // A stopped writer drops `done`, which `wait` reports.
        let _ = self.tx.send(m);
        Pending(rx)
    }
}

/// Awaits every mark in `pending`, in order; the first failure is returned after all have
/// settled, so none is left running against a lease about to be given back.
pub(super) async fn wait_all(pending: &mut Vec<Pending>) -> Result<(), DeliveryError> {
    let mut first = Ok(());
    for p in pending.drain(..) {
        let r = p.wait().await;
        if first.is_ok() {
            first = r;
        }
    }
    first
}

async fn writer(pool: Pool, mut rx: mpsc::UnboundedReceiver<Mark>) {
    while let Some(first) = rx.recv().await {
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(m) => group.push(m),
                Err(_) => break,
            }
        }
        let r = write(&pool, &group).await.map_err(|e| e.to_string());
        for m in group {
            let _ = m.done.send(r.clone());
        }
    }
}

async fn write(pool: &Pool, group: &[Mark]) -> Result<(), QueueError> {
    let marks: Vec<Advance> = group.iter().map(|m| m.advance.clone()).collect();
    let c = pool.get().await?;
    cursor::advance_many(&**c, &marks).await?;
    metrics::histogram!(crate::metrics::DELIVERED_MARKS_PER_WRITE).record(marks.len() as f64);
    Ok(())
}
