//! websocket: notifications go to the sockets bound to a subscription in this process.
//!
//! The [`Hub`] holds, per subscription, the sockets bound to it here. A subscription's
//! sockets live in one instance: the first bind takes a session advisory lock on the hub's
//! own queue connection and the last socket to close gives it back, so the instance holding
//! the sockets is the one whose send worker leases the subscription (`bound_ids`). Events
//! that happen while no socket is bound stay pending and go out on the next bind.

use async_trait::async_trait;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use tokio::sync::mpsc;
use tokio_postgres::Client;

use super::{Accepted, Channel, Destination, Notification, SendError};
use crate::fhir::subscription::ChannelType;

/// Text frames a socket may have waiting before it counts as too slow and is closed.
pub(crate) const SOCKET_QUEUE: usize = 1024;

/// What the hub asks a socket task to do.
#[derive(Debug)]
pub(crate) enum Frame {
    /// Write this text; say on the sender whether it was written to the socket.
    Text(String, tokio::sync::oneshot::Sender<bool>),
    /// Close with this code and reason.
    Close(u16, String),
}

#[derive(Clone)]
struct Socket {
    id: u64,
    frames: mpsc::Sender<Frame>,
    control: mpsc::UnboundedSender<Frame>,
    /// Set once its handshake went out; sends skip it until then.
    ready: bool,
}

/// Why a bind was refused.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BindError {
    #[error("subscription {0} is bound to sockets on another instance; connect there or wait until they close")]
    Elsewhere(String),
    #[error("queue: {0}")]
    Queue(String),
}

pub struct Hub {
    url: String,
    next: AtomicU64,
    subs: Mutex<HashMap<String, Vec<Socket>>>,
    /// The connection holding this instance's binding locks; `None` until the first bind.
    locks: tokio::sync::Mutex<Option<Client>>,
}

/// A socket's handles for the hub: frames to write and control (close) requests.
pub(crate) struct SocketHandle {
    pub(crate) id: u64,
    pub(crate) frames: mpsc::Receiver<Frame>,
    pub(crate) control: mpsc::UnboundedReceiver<Frame>,
    tx: mpsc::Sender<Frame>,
    ctl: mpsc::UnboundedSender<Frame>,
}

fn lock_sql(f: &str) -> String {
    format!("SELECT {f}(hashtextextended('fhir_cdc.ws.' || $1, 0))")
}

impl Hub {
    /// `url`: the queue database.
    pub fn new(url: &str) -> Self {
        Hub {
            url: url.to_string(),
            next: AtomicU64::new(1),
            subs: Mutex::default(),
            locks: tokio::sync::Mutex::new(None),
        }
    }

    fn subs(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<Socket>>> {
        self.subs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new socket's channels.
    pub(crate) fn socket(&self) -> SocketHandle {
        let (tx, frames) = mpsc::channel(SOCKET_QUEUE);
        let (ctl, control) = mpsc::unbounded_channel();
        SocketHandle {
            id: self.next.fetch_add(1, Ordering::Relaxed),
            frames,
            control,
            tx,
            ctl,
        }
    }

    /// Binds socket `s` to `sub` (not ready yet: its handshake goes first).
    pub(crate) async fn bind(&self, sub: &str, s: &SocketHandle) -> Result<(), BindError> {
        let here = self.subs().contains_key(sub);
        if !here {
            self.lock(sub).await?;
        }
        let socket = Socket {
            id: s.id,
            frames: s.tx.clone(),
            control: s.ctl.clone(),
            ready: false,
        };
        self.subs().entry(sub.to_string()).or_default().push(socket);
        Ok(())
    }

    async fn lock(&self, sub: &str) -> Result<(), BindError> {
        let mut guard = self.locks.lock().await;
        if guard.is_none() {
            let c = crate::db::connect(&self.url)
                .await
                .map_err(|e| BindError::Queue(e.to_string()))?;
            *guard = Some(c);
        }
        let Some(c) = guard.as_ref() else {
            return Err(BindError::Queue("no connection".into()));
        };
        match c
            .query_one(&lock_sql("pg_try_advisory_lock"), &[&sub])
            .await
        {
            Ok(r) if r.get::<_, bool>(0) => Ok(()),
            Ok(_) => Err(BindError::Elsewhere(sub.to_string())),
            Err(e) => {
                // The connection (and every lock on it) is gone: no socket here is bound
                // any more as far as other instances know.
                *guard = None;
                drop(guard);
                self.close_all(1011, "lost the queue connection; bind again");
                Err(BindError::Queue(crate::db::describe(&e)))
            }
        }
    }

    /// The socket's handshake went out: it gets notifications from now on.
    pub(crate) fn ready(&self, sub: &str, socket: u64) {
        if let Some(v) = self.subs().get_mut(sub) {
            v.iter_mut()
                .filter(|s| s.id == socket)
                .for_each(|s| s.ready = true);
        }
    }

    /// Takes socket `socket` off every subscription; gives back the binding lock of those
    /// it was the last socket of.
    pub(crate) async fn unbind_socket(&self, socket: u64) {
        let emptied: Vec<String> = {
            let mut subs = self.subs();
            subs.values_mut().for_each(|v| v.retain(|s| s.id != socket));
            let empty: Vec<String> = subs
                .iter()
                .filter(|(_, v)| v.is_empty())
                .map(|(k, _)| k.clone())
                .collect();
            empty.iter().for_each(|k| {
                subs.remove(k);
            });
            empty
        };
        let guard = self.locks.lock().await;
        if let Some(c) = guard.as_ref() {
            for sub in emptied {
                let _ = c.query_one(&lock_sql("pg_advisory_unlock"), &[&sub]).await;
            }
        }
    }

    /// Closes every socket of `sub` with `reason` (the subscription was deleted or ended).
    pub(crate) fn close(&self, sub: &str, reason: &str) {
        if let Some(v) = self.subs().get(sub) {
            for s in v {
                let _ = s.control.send(Frame::Close(1000, reason.to_string()));
            }
        }
    }

    fn close_all(&self, code: u16, reason: &str) {
        for v in self.subs().values() {
            for s in v {
                let _ = s.control.send(Frame::Close(code, reason.to_string()));
            }
        }
    }

    /// Closes the sockets of bound subscriptions that were deleted or turned off (on any
    /// instance), and checks that the lock connection still holds; run every few seconds.
    pub async fn sweep(&self) {
        let ids = self.ids();
        if ids.is_empty() {
            return;
        }
        let guard = self.locks.lock().await;
        let Some(c) = guard.as_ref() else { return };
        let rows = c
            .query(
                "SELECT id, status FROM fhir_cdc.subscription WHERE id = ANY($1)",
                &[&ids],
            )
            .await;
        drop(guard);
        let rows = match rows {
            Ok(r) => r,
            Err(_) => {
                *self.locks.lock().await = None;
                self.close_all(1011, "lost the queue connection; bind again");
                return;
            }
        };
        let status: HashMap<String, String> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        for id in ids {
            match status.get(&id).map(String::as_str) {
                None => self.close(&id, "subscription deleted"),
                Some("off") => self.close(&id, "subscription is off"),
                _ => {}
            }
        }
    }

    fn ids(&self) -> Vec<String> {
        let subs = self.subs();
        metrics::gauge!(crate::metrics::WEBSOCKET_BOUND).set(subs.len() as f64);
        subs.keys().cloned().collect()
    }
}

#[async_trait]
impl Channel for Hub {
    fn channel_type(&self) -> ChannelType {
        ChannelType::Websocket
    }

    /// Writes the Bundle to every ready socket of the subscription; delivered once at least
    /// one socket wrote it (so a socket that dies with frames queued does not count them as
    /// sent). A socket whose queue is full is too slow: it is closed (its client binds again
    /// and gets what is pending).
    async fn send(&self, n: &Notification, to: &Destination) -> Result<Accepted, SendError> {
        let text =
            String::from_utf8(n.body.to_vec()).map_err(|e| SendError::Encode(e.to_string()))?;
        let sockets: Vec<Socket> = self
            .subs()
            .get(&n.subscription_id)
            .map(|v| v.iter().filter(|s| s.ready).cloned().collect())
            .unwrap_or_default();
        let mut written = Vec::new();
        for s in sockets {
            let (tx, rx) = tokio::sync::oneshot::channel();
            match s.frames.try_send(Frame::Text(text.clone(), tx)) {
                Ok(()) => written.push(rx),
                Err(_) => {
                    let _ = s
                        .control
                        .send(Frame::Close(1013, "client too slow; bind again".into()));
                }
            }
        }
        let any = async {
            let mut ok = false;
            for rx in written {
                ok |= rx.await.unwrap_or(false);
            }
            ok
        };
        match tokio::time::timeout(to.timeout, any).await {
            Ok(true) => Ok(Accepted::default()),
            Ok(false) => Err(SendError::NoListener),
            Err(_) => Err(SendError::Timeout(to.timeout)),
        }
    }

    fn bound_ids(&self) -> Vec<String> {
        self.ids()
    }
}
