//! Failpoints: named places where a test can make the process die, at the moments the
//! invariants are about. A failpoint is compiled in only with the `failpoints` feature
//! (`scripts/test.sh` turns it on; release builds never have it). It fires when
//! `FHIR_CDC_FAILPOINT` names it, and aborts the process at once, like a SIGKILL: nothing
//! is flushed, confirmed or marked.
//!
//! - [`QUEUE_COMMITTED`]: capture's queue transaction committed, the slot not yet confirmed.
//! - [`NUMBERED`]: a notification's events numbered, nothing sent yet.
//! - [`SENT`]: the receiver accepted a notification, its delivered mark not yet written.

pub(crate) const QUEUE_COMMITTED: &str = "queue-committed";
pub(crate) const NUMBERED: &str = "numbered";
pub(crate) const SENT: &str = "sent";

/// Dies here when `FHIR_CDC_FAILPOINT` names `name`.
#[cfg(feature = "failpoints")]
pub(crate) fn hit(name: &'static str) {
    use std::sync::OnceLock;
    static ARMED: OnceLock<Option<String>> = OnceLock::new();
    let armed = ARMED.get_or_init(|| std::env::var("FHIR_CDC_FAILPOINT").ok());
    if armed.as_deref() == Some(name) {
        eprintln!("failpoint {name} fired: aborting");
        std::process::abort();
    }
}

/// Without the `failpoints` feature, nothing.
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub(crate) fn hit(_name: &'static str) {}
