//! Delivered marks, grouped: the send tasks of a topic hand each delivered notification's
//! eventNumbers to one writer, which marks whatever is waiting in one statement. One
//! statement per notification made the queue's round trips, not the endpoints, the limit
//! of fan-out. A send task awaits its marks before it gives its lease back, so no other
//! instance can send those events again.

use deadpool_postgres::Pool;
use tokio::sync::{mpsc, oneshot};

use super::DeliveryError;
use crate::queue::{subscriptions, QueueError};

/// Marks written per statement at most.
const MAX_GROUP: usize = 512;

/// One notification that reached its endpoint, and who waits for its mark.
struct Mark {
    subscription: String,
    numbers: Vec<i64>,
    done: oneshot::Sender<Result<(), String>>,
}

/// The handle send tasks use; the writer ends when the last handle is dropped.
#[derive(Clone)]
pub struct Marks {
    tx: mpsc::UnboundedSender<Mark>,
}

/// A mark handed to the writer; await it with [`Pending::wait`].
pub struct Pending(oneshot::Receiver<Result<(), String>>);

impl Pending {
    /// The mark is committed (or why it is not).
    pub async fn wait(self) -> Result<(), DeliveryError> {
        match self.0.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(QueueError::Other(format!("delivered mark: {e}")).into()),
            Err(_) => Err(QueueError::Other("delivered marks writer stopped".into()).into()),
        }
    }
}

impl Marks {
    /// Starts the writer on `pool`.
    pub fn start(pool: Pool) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(writer(pool, rx));
        Marks { tx }
    }

    /// Hands `numbers` of `subscription` to the writer.
    pub fn mark(&self, subscription: &str, numbers: Vec<i64>) -> Pending {
        let (done, rx) = oneshot::channel();
        let m = Mark {
            subscription: subscription.to_string(),
            numbers,
            done,
        };
        // A stopped writer drops `done`, which `wait` reports.
        let _ = self.tx.send(m);
        Pending(rx)
    }
}

/// Awaits every mark in `pending`, in order; the first failure is returned after all have
/// settled, so none is left running against a lease about to be given back.
pub async fn wait_all(pending: &mut Vec<Pending>) -> Result<(), DeliveryError> {
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
    let marks: Vec<(&str, &[i64])> = group
        .iter()
        .map(|m| (m.subscription.as_str(), m.numbers.as_slice()))
        .collect();
    let c = pool.get().await?;
    subscriptions::delivered_many(&**c, &marks).await?;
    let n: usize = marks.iter().map(|(_, ns)| ns.len()).sum();
    metrics::histogram!(crate::metrics::DELIVERED_MARKS_PER_WRITE).record(n as f64);
    Ok(())
}
