//! What every layer's error says beyond its text: whether trying again can help. The
//! supervisor ([`supervise`]) reconnects on `Retryable` and stops the task on `Fatal`, so a
//! misconfiguration is reported once instead of retried forever.

use std::future::Future;
use std::time::{Duration, Instant};
use tokio::sync::watch;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ErrorKind {
    /// The database went away, a connection broke: reconnect with backoff.
    Retryable,
    /// Configuration or a bug: retrying gives the same answer.
    Fatal,
}

/// An error that knows its [`ErrorKind`], and for a fatal one what the operator should do.
pub(crate) trait Classify: std::fmt::Display {
    fn kind(&self) -> ErrorKind;

    /// One line that tells the operator what to do about it (fatal errors; `status` and the
    /// log show it).
    fn remedy(&self) -> Option<String> {
        None
    }
}

/// A task stopped by a fatal error: what `main` prints, records for `status`
/// (`fhir_cdc.fatal_error`) and exits with.
#[derive(Debug, thiserror::Error)]
#[error("{task}: {error}")]
pub struct Fatal {
    pub(crate) task: &'static str,
    pub(crate) error: String,
    pub remedy: Option<String>,
}

impl Fatal {
    pub(crate) fn from<E: Classify>(task: &'static str, e: &E) -> Self {
        Fatal {
            task,
            error: e.to_string(),
            remedy: e.remedy(),
        }
    }
}

/// Backoff between reconnects: doubles from `initial` to `max`, and starts over once a run
/// lasted longer than `healthy`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Backoff {
    pub(crate) initial: Duration,
    pub(crate) max: Duration,
    pub(crate) healthy: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: Duration::from_millis(500),
            max: Duration::from_secs(30),
            healthy: Duration::from_secs(30),
        }
    }
}

/// Runs `run` until it returns `Ok` (a clean stop) or a fatal error, or `shutdown` flips;
/// retryable errors are logged and `run` starts again after a backoff. The one
/// connect–fail–wait–reconnect loop of the daemon.
pub(crate) async fn supervise<F, Fut, E>(
    task: &str,
    backoff: Backoff,
    mut shutdown: watch::Receiver<bool>,
    mut run: F,
) -> Result<(), E>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: Classify,
{
    let mut wait = backoff.initial;
    loop {
        if *shutdown.borrow() {
            return Ok(());
        }
        let started = Instant::now();
        let e = match run().await {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == ErrorKind::Fatal => {
                let remedy = e.remedy().unwrap_or_else(|| "-".into());
                tracing::error!(task, error = %e, remedy = %remedy, "stopped: retrying cannot fix this");
                return Err(e);
            }
            Err(e) => e,
        };
        metrics::counter!(crate::metrics::RESTARTS, "task" => task.to_string()).increment(1);
        if started.elapsed() > backoff.healthy {
            wait = backoff.initial;
        }
        tracing::warn!(task, error = %e, retry_in_ms = wait.as_millis() as u64, "stopped; reconnecting");
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.changed() => return Ok(()),
        }
        wait = (wait * 2).min(backoff.max);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[derive(Debug)]
    struct E(ErrorKind);
    impl std::fmt::Display for E {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "{:?}", self.0)
        }
    }
    impl Classify for E {
        fn kind(&self) -> ErrorKind {
            self.0
        }
    }

    fn quick() -> Backoff {
        Backoff {
            initial: Duration::from_millis(1),
            max: Duration::from_millis(2),
            healthy: Duration::from_secs(1),
        }
    }

    #[tokio::test]
    async fn retries_retryable_and_stops_on_fatal() {
        let (_tx, rx) = watch::channel(false);
        let runs = AtomicUsize::new(0);
        let r = supervise("t", quick(), rx, || {
            let n = runs.fetch_add(1, Ordering::SeqCst);
            async move {
                if n < 3 {
                    Err(E(ErrorKind::Retryable))
                } else {
                    Err(E(ErrorKind::Fatal))
                }
            }
        })
        .await;
        assert_eq!(r.unwrap_err().0, ErrorKind::Fatal);
        assert_eq!(runs.load(Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn a_clean_stop_is_not_retried() {
        let (_tx, rx) = watch::channel(false);
        let runs = AtomicUsize::new(0);
        let r: Result<(), E> = supervise("t", quick(), rx, || {
            runs.fetch_add(1, Ordering::SeqCst);
            async { Ok(()) }
        })
        .await;
        assert!(r.is_ok());
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }
}
