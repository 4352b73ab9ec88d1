//! What a send's outcome writes: a failure (retry, dead letters, error/off), a heartbeat, a
//! handshake. Delivered marks go through [`super::marks`].

use rand::Rng;
use std::time::Duration;

use super::ctx::Ctx;
use super::notify::{notify, status_info};
use super::DeliveryError;
use crate::channel::SendError;
use crate::fhir::notification::Kind;
use crate::fhir::subscription::Status;
use crate::queue::cursor::{self, Cursor, Failure};
use crate::queue::events::Pending;
use crate::queue::matched;
use crate::queue::subscriptions::{self, SubscriptionRow};

type Result<T> = std::result::Result<T, DeliveryError>;

/// The notification that failed: events after the cursor, or requeued dead letters.
pub(super) enum Head<'a> {
    /// Events after the cursor; giving up on them moves the cursor to `to`.
    Events {
        batch: &'a [Pending],
        to: Cursor,
    },
    Requeued(&'a [Pending]),
    /// A heartbeat: no events.
    Nothing,
}

impl Head<'_> {
    fn events(&self) -> &[Pending] {
        match self {
            Head::Events { batch, .. } | Head::Requeued(batch) => batch,
            Head::Nothing => &[],
        }
    }
}

/// Counts a failed send and schedules the retry. The head's events become dead letters
/// when the endpoint refused them for good or their attempts ran out, and every pending
/// event does when the subscription turns off. Logs one line.
pub(super) async fn record_failure(
    ctx: &Ctx,
    sub: &SubscriptionRow,
    head: Head<'_>,
    e: &SendError,
) -> Result<()> {
    let error = &e.to_string();
    let p = &ctx.policy;
    let backoff = p.backoff(sub.failures, rand::rng().random_range(0.5..=1.0));
    let retry_in = p.retry_delay(backoff, e.retry_after());
    let new_status = p.status_after_failure(sub.failures, sub.status, e.is_permanent());
    let failure = Failure {
        error,
        retry_in,
        new_status,
        had_events: !head.events().is_empty(),
    };
    let mut c = ctx.conn().await?;
    let tx = c.transaction().await?;
    cursor::failed(&tx, &sub.id, &failure).await?;
    let exhausted = sub.head_attempts + 1 >= p.max_attempts;
    let reason = if e.is_permanent() {
        Some(format!("refused by the endpoint, not retried: {error}"))
    } else if exhausted {
        Some(format!(
            "gave up after {} attempts: {error}",
            p.max_attempts
        ))
    } else if new_status == Status::Off {
        Some(format!(
            "subscription turned off after {} consecutive failures: {error}",
            p.off_after
        ))
    } else {
        None
    };
    let mut after = sub.cursor;
    if let Some(reason) = &reason {
        after = give_up(&tx, sub, &head, reason).await?;
    }
    if new_status == Status::Off {
        let reason = format!(
            "subscription turned off after {} consecutive failures: {error}",
            p.off_after
        );
        dead_letter_rest(&tx, sub, after, &reason).await?;
    }
    tx.commit().await?;
    metrics::counter!(crate::metrics::DELIVERY_FAILURES, "topic" => sub.topic.clone()).increment(1);
    tracing::warn!(
        subscription = %sub.id,
        event_number = head.events().first().map(|p| p.event_number).unwrap_or(0),
        error = %error,
        status = new_status.as_str(),
        retry_in_ms = retry_in.as_millis() as u64,
        "notification not delivered"
    );
    Ok(())
}

/// Dead-letters the head's events; returns the cursor after them.
async fn give_up(
    tx: &tokio_postgres::Transaction<'_>,
    sub: &SubscriptionRow,
    head: &Head<'_>,
    reason: &str,
) -> Result<Cursor> {
    let pairs: Vec<(i64, i64)> = head
        .events()
        .iter()
        .map(|p| (p.event_number, p.event.id))
        .collect();
    match head {
        Head::Events { to, .. } => {
            cursor::dead_letter(tx, &sub.id, &pairs, reason, Some(*to)).await?;
            Ok(*to)
        }
        Head::Requeued(_) => {
            cursor::dead_letter(tx, &sub.id, &pairs, reason, None).await?;
            Ok(sub.cursor)
        }
        Head::Nothing => Ok(sub.cursor),
    }
}

/// A subscription turned off: every event still pending after `after` becomes a dead
/// letter, and the cursor moves past them.
async fn dead_letter_rest(
    tx: &tokio_postgres::Transaction<'_>,
    sub: &SubscriptionRow,
    after: Cursor,
    reason: &str,
) -> Result<()> {
    let mut track = sub.track();
    track.cursor = after;
    let rest = matched::pending(tx, &track, usize::MAX).await?;
    let Some(last) = rest.last() else {
        return Ok(());
    };
    let to = Cursor {
        number: last.event_number,
        event_id: last.event.id,
    };
    let pairs: Vec<(i64, i64)> = rest.iter().map(|p| (p.event_number, p.event.id)).collect();
    cursor::dead_letter(tx, &sub.id, &pairs, reason, Some(to)).await?;
    Ok(())
}

/// A heartbeat: nothing else went out for `heartbeatPeriod`. It carries the subscription's
/// status (and error) and never moves the event count.
pub(super) async fn heartbeat(ctx: &Ctx, sub: &SubscriptionRow, t: Duration) -> Result<()> {
    let info = status_info(sub, sub.status, sub.cursor.number);
    match notify(ctx, sub, Kind::Heartbeat, &info, &[], t).await {
        Ok(()) => subscriptions::touched(&**ctx.conn().await?, &sub.id).await?,
        Err(SendError::NoListener) => {}
        Err(e) => record_failure(ctx, sub, Head::Nothing, &e).await?,
    }
    Ok(())
}

pub(super) async fn handshake(ctx: &Ctx, sub: &SubscriptionRow, t: Duration) -> Result<()> {
    let mut info = status_info(sub, Status::Requested, sub.cursor.number);
    info.errors.clear();
    let sent = notify(ctx, sub, Kind::Handshake, &info, &[], t).await;
    let c = &**ctx.conn().await?;
    match sent {
        Err(SendError::NoListener) => {}
        Ok(()) => {
            subscriptions::handshake_ok(c, &sub.id).await?;
            tracing::info!(subscription = %sub.id, "handshake accepted; subscription active");
        }
        Err(e) => {
            let msg = format!("handshake failed: {e}");
            subscriptions::handshake_failed(c, &sub.id, &msg).await?;
            tracing::warn!(subscription = %sub.id, error = %e, "handshake failed; subscription in error");
        }
    }
    Ok(())
}
