//! One leased subscription's turn: its handshake, its next notifications or a heartbeat.
//! Its events are its topic's events after its cursor that pass its filters, taken from
//! the topic's [`Window`]; requeued dead letters go first. Each delivered notification
//! moves the cursor through the topic's mark writer.

use chrono::Utc;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use super::ctx::Ctx;
use super::marks::{self, Marks};
use super::notify::{build_events, notify, status_info};
use super::outcome::{handshake, heartbeat, record_failure, Head};
use super::policy::{heartbeat_due, Batch, SendPolicy};
use super::window::Window;
use super::DeliveryError;
use crate::channel::SendError;
use crate::fhir::notification::Kind;
use crate::fhir::subscription::Status;
use crate::queue::cursor::{self, Cursor};
use crate::queue::events::Pending;
use crate::queue::subscriptions::SubscriptionRow;

type Result<T> = std::result::Result<T, DeliveryError>;

/// One leased subscription's send: its row as read under the lease, its requeued dead
/// letters, the topic's events and the writer of its delivered marks.
pub(super) struct Job {
    pub(crate) sub: SubscriptionRow,
    pub(crate) backlog: Backlog,
    pub(crate) window: Arc<Window>,
    pub(crate) marks: Marks,
}

/// What a turn found: `Idle` when there was nothing to send up to `scanned` from `cursor`,
/// so the loop need not lease the subscription again before newer events come.
pub(super) enum Turn {
    Busy,
    Idle {
        cursor: Cursor,
        scanned: i64,
        filters: Vec<crate::fhir::subscription::Filter>,
    },
}

/// Notifications one worker sends for one subscription before giving others a turn. Each
/// turn ends with its marks awaited and a new search and lease (several round trips), so a
/// small bound made a fast destination with a backlog spend a quarter of its time between
/// turns; other subscriptions of the topic are sent meanwhile by the other workers.
const BACKLOG_ROUNDS: usize = 500;
/// … and at most this long, so a slow endpoint does not hold a worker for 500 of its sends.
const TURN_TIME: Duration = Duration::from_secs(1);
/// Matches taken from the window at once beyond one notification's.
const READ_AHEAD_MAX: usize = 500;

/// Matches taken at once: enough for the notifications one lease sends, at most
/// READ_AHEAD_MAX (whatever maxCount asks), never fewer than one notification's.
pub(super) fn read_ahead(max: usize) -> usize {
    max.saturating_mul(BACKLOG_ROUNDS)
        .min(READ_AHEAD_MAX)
        .max(max)
}

/// A leased subscription's events, taken ahead in eventNumber order.
pub(super) struct Backlog {
    requeued: VecDeque<Pending>,
    events: VecDeque<Pending>,
    /// Where the next scan starts: the last match taken and the last event looked at.
    from: Cursor,
    /// The last scan looked at every event the window knew.
    complete: bool,
}

/// The next notification's events.
enum Next {
    Requeued(Vec<Pending>),
    /// Events after the cursor; delivering them moves the cursor to `to`.
    Events(Vec<Pending>, Cursor),
}

impl Backlog {
    pub(super) fn new(from: Cursor, requeued: Vec<Pending>) -> Self {
        Backlog {
            requeued: requeued.into(),
            events: VecDeque::new(),
            from,
            complete: false,
        }
    }

    async fn next(
        &mut self,
        ctx: &Ctx,
        w: &Window,
        sub: &SubscriptionRow,
        max: usize,
    ) -> Result<Next> {
        if !self.requeued.is_empty() {
            let n = self.requeued.len().min(max);
            return Ok(Next::Requeued(self.requeued.drain(..n).collect()));
        }
        if self.events.len() < max {
            let m = w
                .matches(&ctx.pool, self.from, &sub.filters, read_ahead(max))
                .await?;
            self.from = Cursor {
                number: m
                    .events
                    .last()
                    .map(|p| p.event_number)
                    .unwrap_or(self.from.number),
                event_id: m.scanned,
            };
            self.complete = m.complete;
            self.events.extend(m.events);
        }
        let n = self.events.len().min(max);
        let batch: Vec<Pending> = self.events.drain(..n).collect();
        let to = match batch.last() {
            // The last match known: the cursor may move over what the scan passed after it.
            Some(_) if self.events.is_empty() && self.complete => self.from,
            Some(p) => Cursor {
                number: p.event_number,
                event_id: p.event.id,
            },
            None => self.from,
        };
        Ok(Next::Events(batch, to))
    }

    /// Puts a batch that was not sent back in front.
    fn put_back(&mut self, next: Next) {
        match next {
            Next::Requeued(b) => b
                .into_iter()
                .rev()
                .for_each(|p| self.requeued.push_front(p)),
            Next::Events(b, _) => b.into_iter().rev().for_each(|p| self.events.push_front(p)),
        }
    }
}

/// Does the work of one leased subscription (its row was read under the lease: another
/// process may have finished it before).
pub(super) async fn work_one(ctx: &Ctx, topic: &str, job: Job) -> Result<Turn> {
    let Job {
        mut sub,
        mut backlog,
        window,
        marks,
    } = job;
    let t = ctx.policy.timeout(sub.timeout);
    if sub.status == Status::Requested {
        handshake(ctx, &sub, t).await?;
        return Ok(Turn::Busy);
    }
    let now = Utc::now();
    let cursor = sub.cursor;
    let mut out = Outgoing {
        backlog: &mut backlog,
        window: &window,
        marks: &marks,
        marked: Vec::new(),
        unmarked: None,
    };
    let went_out = sub.next_attempt_at <= now && drain(ctx, topic, &mut sub, &mut out, t).await?;
    if !went_out && heartbeat_due(sub.heartbeat_period, sub.last_sent_at, now) {
        heartbeat(ctx, &sub, t).await?;
    }
    Ok(match went_out {
        false if backlog.events.is_empty() && backlog.complete => Turn::Idle {
            cursor,
            scanned: backlog.from.event_id,
            filters: std::mem::take(&mut sub.filters),
        },
        _ => Turn::Busy,
    })
}

/// Delivered notifications of one lease between two marks at most: a mark per notification
/// made a queue write (and its wake-ups) per notification the cost of a fast destination.
/// A kill re-sends at most these, with the same eventNumbers.
const MARK_EVERY: u32 = 16;
/// How long a delivered notification waits for its mark at most, while its lease sends on.
/// Long beside a fast destination's sends; a subscription whose endpoint answers slower
/// than this is marked each notification, as before (the writer still groups those of
/// many subscriptions: 5 ms here made fan-out to 100 webhooks write more rows, not fewer).
const MARK_AFTER: Duration = Duration::from_millis(100);

/// What one lease's sends work through: the backlog, the delivered marks handed to the
/// topic's writer and not yet awaited, and the newest delivered cursor not yet handed.
struct Outgoing<'a> {
    backlog: &'a mut Backlog,
    window: &'a Window,
    marks: &'a Marks,
    marked: Vec<marks::Pending>,
    unmarked: Option<Unmarked>,
}

/// Delivered since the last mark: how many, since when, up to where.
struct Unmarked {
    to: Cursor,
    count: u32,
    since: std::time::Instant,
}

impl Outgoing<'_> {
    /// Records a delivered notification's cursor; hands a mark to the writer every
    /// MARK_EVERY notifications or MARK_AFTER.
    fn delivered(&mut self, id: &str, to: Cursor) {
        let u = self.unmarked.get_or_insert(Unmarked {
            to,
            count: 0,
            since: std::time::Instant::now(),
        });
        u.to = to;
        u.count += 1;
        if u.count >= MARK_EVERY || u.since.elapsed() >= MARK_AFTER {
            self.hand_over(id);
        }
    }

    fn hand_over(&mut self, id: &str) {
        if let Some(u) = self.unmarked.take() {
            self.marked.push(self.marks.mark(id, u.to));
        }
    }

    /// Every delivered notification's mark committed: before any other write about the
    /// subscription, and before its lease goes back.
    async fn settle(&mut self, id: &str) -> Result<()> {
        self.hand_over(id);
        marks::wait_all(&mut self.marked).await
    }
}

/// Keeps the lease while the backlog drains, up to a bound so other subscriptions of the
/// topic get their turn; stops at the first failure (its retry is scheduled). Returns
/// whether anything went out. Every delivered mark is committed before it returns, so the
/// lease never goes back with a sent notification unmarked.
async fn drain(
    ctx: &Ctx,
    topic: &str,
    sub: &mut SubscriptionRow,
    out: &mut Outgoing<'_>,
    t: Duration,
) -> Result<bool> {
    let r = drain_rounds(ctx, topic, sub, out, t).await;
    let marked = out.settle(&sub.id).await;
    let went_out = r?;
    marked?;
    Ok(went_out)
}

async fn drain_rounds(
    ctx: &Ctx,
    topic: &str,
    sub: &mut SubscriptionRow,
    out: &mut Outgoing<'_>,
    t: Duration,
) -> Result<bool> {
    let mut went_out = false;
    let started = std::time::Instant::now();
    for _ in 0..BACKLOG_ROUNDS {
        if started.elapsed() >= TURN_TIME {
            break;
        }
        match send_events(ctx, topic, sub, out, t).await? {
            Sent::Delivered => {
                went_out = true;
                // What the mark writes; later notifications report it.
                if sub.status == Status::Error {
                    sub.status = Status::Active;
                }
                sub.failures = 0;
                sub.head_attempts = 0;
                sub.last_error = None;
            }
            Sent::Failed => return Ok(true),
            Sent::Nothing | Sent::Deferred => break,
        }
    }
    Ok(went_out)
}

enum Sent {
    Nothing,
    /// Fewer than maxCount events are ready and the batch window is still open.
    Deferred,
    Delivered,
    Failed,
}

/// Sends the subscription's next notification. Its delivered mark is handed to the
/// topic's writer (grouped, [`MARK_EVERY`]); the marks before it are awaited before any
/// other write about the subscription (a failure or a deferral), so they land in order.
async fn send_events(
    ctx: &Ctx,
    topic: &str,
    sub: &mut SubscriptionRow,
    out: &mut Outgoing<'_>,
    t: Duration,
) -> Result<Sent> {
    let max = SendPolicy::max_count(sub.max_count) as usize;
    let next = out.backlog.next(ctx, out.window, sub, max).await?;
    let (batch, requeued) = match &next {
        Next::Requeued(b) => (b.as_slice(), true),
        Next::Events(b, _) => (b.as_slice(), false),
    };
    let Some(oldest) = batch.first() else {
        return Ok(Sent::Nothing);
    };
    let wait = ctx
        .policy
        .batch(batch.len(), max as i64, oldest.event.queued_at, Utc::now());
    if let (Batch::WaitUntil(at), false) = (wait, requeued) {
        out.settle(&sub.id).await?;
        crate::queue::subscriptions::defer(&**ctx.conn().await?, &sub.id, at).await?;
        out.backlog.put_back(next);
        return Ok(Sent::Deferred);
    }
    crate::failpoints::hit(crate::failpoints::NUMBERED);
    let events = build_events(ctx, topic, sub.content, batch).await;
    let last = batch.last().map(|p| p.event_number).unwrap_or(0);
    let info = status_info(sub, sub.status, last.max(sub.cursor.number));
    match notify(ctx, sub, Kind::EventNotification, &info, &events, t).await {
        Ok(()) => {
            crate::failpoints::hit(crate::failpoints::SENT);
            delivered(ctx, sub, out, &next).await?;
            metrics::counter!(crate::metrics::NOTIFICATIONS_SENT, "topic" => topic.to_string())
                .increment(1);
            for p in batch {
                let age = (Utc::now() - p.event.commit_time)
                    .to_std()
                    .unwrap_or_default();
                metrics::histogram!(crate::metrics::END_TO_END_SECONDS).record(age.as_secs_f64());
            }
            Ok(Sent::Delivered)
        }
        // No socket of a websocket subscription is bound here any more: the events wait.
        Err(SendError::NoListener) => {
            out.backlog.put_back(next);
            Ok(Sent::Nothing)
        }
        Err(e) => {
            out.settle(&sub.id).await?;
            let head = match &next {
                Next::Requeued(b) => Head::Requeued(b),
                Next::Events(b, to) => Head::Events { batch: b, to: *to },
            };
            record_failure(ctx, sub, head, &e).await?;
            Ok(Sent::Failed)
        }
    }
}

/// Records a delivered notification: the cursor moves through the mark writer; requeued
/// dead letters are removed at once.
async fn delivered(
    ctx: &Ctx,
    sub: &mut SubscriptionRow,
    out: &mut Outgoing<'_>,
    next: &Next,
) -> Result<()> {
    match next {
        Next::Events(_, to) => {
            out.delivered(&sub.id, *to);
            sub.cursor = *to;
        }
        Next::Requeued(b) => {
            out.settle(&sub.id).await?;
            let numbers: Vec<i64> = b.iter().map(|p| p.event_number).collect();
            cursor::requeued_delivered(&**ctx.conn().await?, &sub.id, &numbers).await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_ahead_covers_a_lease_of_notifications_but_never_less_than_one() {
        assert_eq!(read_ahead(1), BACKLOG_ROUNDS);
        assert_eq!(read_ahead(10), READ_AHEAD_MAX);
        assert_eq!(
            read_ahead(2_000),
            2_000,
            "a whole maxCount batch, however large"
        );
    }
}
