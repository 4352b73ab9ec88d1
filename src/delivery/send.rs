//! Send workers: lease a subscription, send its handshake, its pending events or a
//! heartbeat over its channel, record the outcome. One subscription per worker at a time
//! keeps each subscription in eventNumber order while a slow endpoint holds up only itself.
//! The decisions are in [`super::policy`]; this module does the I/O around them.

use chrono::Utc;
use deadpool_postgres::Pool;
use rand::Rng;
use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;
use tokio::sync::{watch, Notify};
use tokio::task::JoinSet;
use tokio_postgres::Client;

use super::marks::{self, Marks};
use super::payload::Payloads;
use super::policy::{heartbeat_due, Batch, SendPolicy};
use super::DeliveryError;
use crate::channel::{Channels, Destination, Notification, SendError};
use crate::config::Config;
use crate::error::{supervise, Backoff};
use crate::fhir::notification::{bundle, Event, Format, Kind, StatusInfo};
use crate::fhir::subscription::{Content, Status};
use crate::queue::{
    self,
    subscriptions::{self, Failure, SubscriptionRow},
};

type Result<T> = std::result::Result<T, DeliveryError>;

pub struct Ctx {
    pub cfg: Arc<Config>,
    pub policy: SendPolicy,
    pub payloads: Payloads,
    pub channels: Channels,
    pub topics: Arc<crate::topics::Registry>,
    pub base_url: String,
    pub format: Format,
    /// Queue connections for the sends' reads and writes; none is held across a send.
    pub pool: Pool,
}

/// Runs the sends of `topic` until shutdown, reconnecting when the queue goes away.
pub async fn worker(
    ctx: Arc<Ctx>,
    topic: String,
    wake: Arc<Notify>,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let backoff = Backoff {
        initial: Duration::from_secs(1),
        ..Backoff::default()
    };
    supervise("send", backoff, shutdown.clone(), || {
        run_worker(ctx.clone(), &topic, &wake, shutdown.clone())
    })
    .await
    .map_err(|e| anyhow::anyhow!("sends of {topic}: {e}"))
}

/// The leases of one topic in this process: advisory locks on one connection of its own,
/// and the set of ids held, because session locks nest and would let two of our own sends
/// take one subscription.
struct Leases {
    conn: Client,
    held: Mutex<HashSet<String>>,
}

impl Leases {
    fn held(&self) -> Vec<String> {
        self.held
            .lock()
            .map(|h| h.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Leases those of `ids` that no send of ours holds and no other instance has, in one
    /// round trip (one per subscription made the lease connection the bottleneck of
    /// delivery at a few hundred notifications/s).
    async fn take(&self, ids: Vec<String>) -> Result<Vec<String>> {
        let ids: Vec<String> = match self.held.lock() {
            Ok(h) => ids.into_iter().filter(|id| !h.contains(id)).collect(),
            Err(_) => return Ok(Vec::new()),
        };
        if ids.is_empty() {
            return Ok(ids);
        }
        let got = subscriptions::try_lease_many(&self.conn, &ids).await?;
        if let Ok(mut h) = self.held.lock() {
            h.extend(got.iter().cloned());
        }
        Ok(got)
    }

    /// Gives the leases of `ids` back in one round trip.
    async fn give_back(&self, ids: &[String]) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let r = subscriptions::release_many(&self.conn, ids).await;
        if let Ok(mut h) = self.held.lock() {
            for id in ids {
                h.remove(id);
            }
        }
        Ok(r?)
    }
}

/// Leases subscriptions with work and sends each in a task of its own, at most `workers` at
/// once per topic, so a hanging endpoint holds up only its own subscription. The queue
/// work around the sends is done for many subscriptions at once: one query finds those
/// with work, one leases them, two read them and their pending events, one statement marks
/// a group of notifications delivered ([`Marks`]) and one gives the leases back. A dropped
/// lease connection ends every send of the topic (their leases are gone).
async fn run_worker(
    ctx: Arc<Ctx>,
    topic: &str,
    wake: &Notify,
    mut shutdown: watch::Receiver<bool>,
) -> Result<()> {
    let leases = Leases {
        conn: queue::connect(ctx.cfg.queue_url()).await?,
        held: Mutex::default(),
    };
    let marks = Marks::start(ctx.pool.clone());
    let workers = topic_workers(&ctx.cfg, topic);
    let mut running: JoinSet<(String, Result<()>)> = JoinSet::new();
    // Subscriptions with work, fetched CANDIDATES at a time: with thousands of
    // subscriptions the query is the cost, so it is not repeated for every send.
    let mut queue: VecDeque<String> = VecDeque::new();
    // Leased and read, waiting for a free send slot: leasing and reading `workers` at a time
    // keeps this loop's round trips off the path of every single send, and holding at most
    // twice `workers` leases leaves the rest to other instances with free slots.
    let mut ready: VecDeque<Job> = VecDeque::new();
    while !*shutdown.borrow() {
        let mut free = workers.saturating_sub(running.len());
        if ready.len() < free && queue.is_empty() {
            let bound = ctx.channels.bound_ids();
            let limit = CANDIDATES.max(free) as i64;
            let held = leases.held();
            queue
                .extend(subscriptions::with_work(&leases.conn, topic, &held, &bound, limit).await?);
        }
        while ready.len() < free && !queue.is_empty() {
            let next: Vec<String> = queue.drain(..workers.min(queue.len())).collect();
            let got = leases.take(next).await?;
            let (work, gone) = read_leased(&ctx, got).await?;
            leases.give_back(&gone).await?;
            ready.extend(work.into_iter().map(|(sub, backlog)| Job {
                sub,
                backlog,
                marks: marks.clone(),
            }));
        }
        while free > 0 {
            let Some(job) = ready.pop_front() else { break };
            running.spawn(send_one(ctx.clone(), topic.to_string(), job));
            free -= 1;
        }
        let idle = if running.is_empty() && queue.is_empty() && ready.is_empty() {
            next_wait(&leases.conn, topic).await
        } else {
            Duration::from_secs(1)
        };
        tokio::select! {
            Some(done) = running.join_next(), if !running.is_empty() => {
                let ended = finished(done, &mut running)?;
                leases.give_back(&ended).await?;
            }
            _ = wake.notified() => {}
            _ = tokio::time::sleep(idle) => {}
            _ = shutdown.changed() => {}
        }
    }
    drain_on_shutdown(&ctx.cfg, running).await;
    Ok(())
}

/// One leased subscription's send: its row as read under the lease, its pending events
/// read ahead, and the writer of its delivered marks.
struct Job {
    sub: SubscriptionRow,
    backlog: Backlog,
    marks: Marks,
}

/// Reads the just-leased `ids` and their pending events (one round trip for all of them;
/// a subscription whose maxCount is larger than the events read ahead reads again).
/// Returns the sendable ones with their backlogs, and the ids with nothing to send any
/// more (deleted or turned off meanwhile by another process), whose leases go back.
async fn read_leased(
    ctx: &Ctx,
    ids: Vec<String>,
) -> Result<(Vec<(SubscriptionRow, Backlog)>, Vec<String>)> {
    if ids.is_empty() {
        return Ok((Vec::new(), Vec::new()));
    }
    let limit = read_ahead(1);
    let c = conn(ctx).await?;
    let (subs, mut events) = tokio::try_join!(
        subscriptions::sendable_many(&**c, &ids),
        subscriptions::pending_many(&**c, &ids, limit),
    )?;
    drop(c);
    let gone: Vec<String> = ids
        .into_iter()
        .filter(|id| !subs.iter().any(|s| &s.id == id))
        .collect();
    let work = subs
        .into_iter()
        .map(|s| {
            let backlog = Backlog::read(events.remove(&s.id).unwrap_or_default(), limit);
            (s, backlog)
        })
        .collect();
    Ok((work, gone))
}

/// Candidates one query fetches.
const CANDIDATES: usize = 256;

/// Sends per topic at once: the topic's `workers`, else `[delivery] workers`.
fn topic_workers(cfg: &Config, topic: &str) -> usize {
    cfg.topics
        .iter()
        .find(|c| c.topic.url == topic)
        .map(|c| c.workers)
        .unwrap_or(cfg.delivery.workers)
        .max(1)
}

type Done = std::result::Result<(String, Result<()>), tokio::task::JoinError>;

/// Send tasks ended: `done` and any others already finished. Returns their subscriptions,
/// whose leases go back together; errors are logged. A task that panicked ends the topic's
/// worker, and with its lease connection every lease it held.
fn finished(done: Done, running: &mut JoinSet<(String, Result<()>)>) -> Result<Vec<String>> {
    let mut ended = Vec::new();
    let mut next = Some(done);
    while let Some(d) = next {
        let (id, r) = d.map_err(|e| {
            DeliveryError::Queue(queue::QueueError::Other(format!("send task: {e}")))
        })?;
        if let Err(e) = r {
            tracing::warn!(subscription = %id, error = %e, "send failed on the queue; the subscription is retried");
        }
        ended.push(id);
        next = running.try_join_next();
    }
    Ok(ended)
}

/// On SIGTERM: sends under way get `[delivery] shutdown_grace_secs` to finish; what is left
/// is dropped unmarked, so its events stay pending and go out again (same eventNumbers) from
/// whichever instance leases the subscription next.
async fn drain_on_shutdown(cfg: &Config, mut running: JoinSet<(String, Result<()>)>) {
    let grace = Duration::from_secs(cfg.delivery.shutdown_grace_secs);
    let all_done = async { while running.join_next().await.is_some() {} };
    if tokio::time::timeout(grace, all_done).await.is_err() {
        tracing::warn!(
            grace_secs = grace.as_secs(),
            "sends still running at the end of the shutdown grace; their events stay pending"
        );
    }
}

/// One leased subscription: its handshake, pending events or heartbeat. Returns its id so
/// the loop gives the lease back, whatever happened.
async fn send_one(ctx: Arc<Ctx>, topic: String, job: Job) -> (String, Result<()>) {
    let id = job.sub.id.clone();
    (id, work_one(&ctx, &topic, job).await)
}

/// How long to sleep when there is nothing to do: until the next retry is due, at most 1 s.
async fn next_wait(c: &Client, topic: &str) -> Duration {
    let max = Duration::from_secs(1);
    match subscriptions::next_retry(c, topic).await {
        Ok(Some(t)) => (t - Utc::now()).to_std().unwrap_or(Duration::ZERO).min(max),
        _ => max,
    }
}

/// A queue connection for one step of a send.
async fn conn(ctx: &Ctx) -> Result<deadpool_postgres::Object> {
    Ok(ctx.pool.get().await.map_err(queue::QueueError::from)?)
}

/// Notifications one worker sends for one subscription before giving others a turn.
const BACKLOG_ROUNDS: usize = 100;

/// Does the work of one leased subscription (its row was read under the lease: another
/// process may have finished it before).
async fn work_one(ctx: &Ctx, topic: &str, job: Job) -> Result<()> {
    let Job {
        mut sub,
        mut backlog,
        marks,
    } = job;
    let t = ctx.policy.timeout(sub.timeout);
    if sub.status == Status::Requested {
        handshake(ctx, &sub, t).await?;
    } else {
        let now = Utc::now();
        let mut out = Outgoing {
            backlog: &mut backlog,
            marks: &marks,
            marked: Vec::new(),
        };
        let went_out =
            sub.next_attempt_at <= now && drain(ctx, topic, &mut sub, &mut out, t).await?;
        if !went_out && heartbeat_due(sub.heartbeat_period, sub.last_sent_at, now) {
            heartbeat(ctx, &sub, t).await?;
        }
    }
    Ok(())
}

/// Events read ahead beyond a subscription's first notification: enough for the
/// notifications one lease sends, at most READ_AHEAD_MAX (whatever maxCount asks).
fn read_ahead(max: i64) -> i64 {
    max.saturating_mul(BACKLOG_ROUNDS as i64)
        .min(READ_AHEAD_MAX)
        .max(max)
}

const READ_AHEAD_MAX: i64 = 500;

/// Pending events of one leased subscription, read ahead in eventNumber order.
struct Backlog {
    events: VecDeque<subscriptions::Pending>,
    /// Fewer than asked were pending when they were read: there were no more then.
    complete: bool,
}

impl Backlog {
    fn read(events: Vec<subscriptions::Pending>, limit: i64) -> Self {
        Backlog {
            complete: (events.len() as i64) < limit,
            events: events.into(),
        }
    }

    /// The next notification needs a fresh read: fewer than `max` are held and more may be
    /// pending.
    fn needs_read(&self, max: i64) -> bool {
        (self.events.len() as i64) < max && !self.complete
    }

    /// The next notification's events: `max`, or fewer when fewer are pending.
    async fn next(
        &mut self,
        ctx: &Ctx,
        sub: &str,
        max: i64,
    ) -> Result<Vec<subscriptions::Pending>> {
        if self.needs_read(max) {
            let limit = read_ahead(max);
            *self = Backlog::read(
                subscriptions::pending(&**conn(ctx).await?, sub, limit).await?,
                limit,
            );
        }
        let n = self.events.len().min(max as usize);
        Ok(self.events.drain(..n).collect())
    }
}

/// What one lease's sends work through: the backlog read ahead, and the delivered marks
/// handed to the topic's writer and not yet awaited.
struct Outgoing<'a> {
    backlog: &'a mut Backlog,
    marks: &'a Marks,
    marked: Vec<marks::Pending>,
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
    let marked = marks::wait_all(&mut out.marked).await;
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
    for _ in 0..BACKLOG_ROUNDS {
        match send_events(ctx, topic, sub, out, t).await? {
            Sent::Delivered => {
                went_out = true;
                // What `delivered` just wrote; later notifications report it.
                if sub.status == Status::Error {
                    sub.status = Status::Active;
                }
                sub.failures = 0;
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

fn status_info(sub: &SubscriptionRow, status: Status, events_since_start: i64) -> StatusInfo {
    StatusInfo {
        subscription_id: sub.id.clone(),
        status,
        events_since_start,
        topic_url: sub.topic.clone(),
        errors: sub.last_error.iter().cloned().collect(),
        gaps: Vec::new(),
    }
}

/// A heartbeat: nothing else went out for `heartbeatPeriod`. It carries the subscription's
/// status (and error) and never moves the event count.
async fn heartbeat(ctx: &Ctx, sub: &SubscriptionRow, t: Duration) -> Result<()> {
    let settled = subscriptions::last_settled_number(&**conn(ctx).await?, &sub.id).await?;
    let info = status_info(sub, sub.status, settled);
    match notify(ctx, sub, Kind::Heartbeat, &info, &[], t).await {
        Ok(()) => subscriptions::touched(&**conn(ctx).await?, &sub.id).await?,
        Err(SendError::NoListener) => {}
        Err(e) => record_failure(ctx, sub, &[], &e).await?,
    }
    Ok(())
}

/// Counts a failed send and schedules the retry; logs one line.
async fn record_failure(
    ctx: &Ctx,
    sub: &SubscriptionRow,
    numbers: &[i64],
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
        max_attempts: p.max_attempts,
        new_status,
        off_after: p.off_after,
        dead_now: e.is_permanent(),
    };
    let mut c = conn(ctx).await?;
    let tx = c.transaction().await?;
    subscriptions::send_failed(&tx, &sub.id, numbers, &failure).await?;
    tx.commit().await?;
    metrics::counter!(crate::metrics::DELIVERY_FAILURES, "topic" => sub.topic.clone()).increment(1);
    tracing::warn!(
        subscription = %sub.id,
        event_number = numbers.first().copied().unwrap_or(0),
        error = %error,
        status = new_status.as_str(),
        retry_in_ms = retry_in.as_millis() as u64,
        "notification not delivered"
    );
    Ok(())
}

/// Sends the subscription's next notification. Its delivered mark is handed to the
/// topic's writer; the marks before it are awaited before any other write about the
/// subscription (a failure or a deferral), so they land in order.
async fn send_events(
    ctx: &Ctx,
    topic: &str,
    sub: &SubscriptionRow,
    out: &mut Outgoing<'_>,
    t: Duration,
) -> Result<Sent> {
    let max = SendPolicy::max_count(sub.max_count);
    if out.backlog.needs_read(max) {
        // A fresh read must not see sent events whose marks are still in flight.
        marks::wait_all(&mut out.marked).await?;
    }
    let batch = out.backlog.next(ctx, &sub.id, max).await?;
    let Some(oldest) = batch.first() else {
        return Ok(Sent::Nothing);
    };
    if let Batch::WaitUntil(at) = ctx
        .policy
        .batch(batch.len(), max, oldest.queued_at, Utc::now())
    {
        marks::wait_all(&mut out.marked).await?;
        subscriptions::defer(&**conn(ctx).await?, &sub.id, at).await?;
        return Ok(Sent::Deferred);
    }
    let events = build_events(ctx, topic, sub.content, &batch).await;
    let last = batch.last().map(|p| p.event_number).unwrap_or(0);
    let info = status_info(sub, sub.status, last);
    let numbers: Vec<i64> = batch.iter().map(|p| p.event_number).collect();
    match notify(ctx, sub, Kind::EventNotification, &info, &events, t).await {
        Ok(()) => {
            out.marked.push(out.marks.mark(&sub.id, numbers));
            metrics::counter!(crate::metrics::NOTIFICATIONS_SENT, "topic" => topic.to_string())
                .increment(1);
            for p in &batch {
                let age = (Utc::now() - p.commit_time).to_std().unwrap_or_default();
                metrics::histogram!(crate::metrics::END_TO_END_SECONDS).record(age.as_secs_f64());
            }
            Ok(Sent::Delivered)
        }
        // No socket of a websocket subscription is bound here any more: the events wait.
        Err(SendError::NoListener) => Ok(Sent::Nothing),
        Err(e) => {
            marks::wait_all(&mut out.marked).await?;
            record_failure(ctx, sub, &numbers, &e).await?;
            Ok(Sent::Failed)
        }
    }
}

/// The events as the subscription's content level carries them.
async fn build_events(
    ctx: &Ctx,
    topic: &str,
    content: Content,
    batch: &[subscriptions::Pending],
) -> Vec<Event> {
    let shapes = if content == Content::FullResource {
        ctx.topics.shapes(topic).await
    } else {
        Vec::new()
    };
    let mut events = Vec::with_capacity(batch.len());
    for p in batch {
        events.push(ctx.payloads.event(content, &shapes, p).await);
    }
    events
}

async fn handshake(ctx: &Ctx, sub: &SubscriptionRow, t: Duration) -> Result<()> {
    let mut info = status_info(sub, Status::Requested, sub.events_since_start);
    info.errors.clear();
    let sent = notify(ctx, sub, Kind::Handshake, &info, &[], t).await;
    let c = &**conn(ctx).await?;
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

/// Builds `sub`'s notification of `kind` and sends it over its channel within `timeout`.
async fn notify(
    ctx: &Ctx,
    sub: &SubscriptionRow,
    kind: Kind,
    info: &StatusInfo,
    events: &[Event],
    timeout: Duration,
) -> std::result::Result<(), SendError> {
    let (n, to) = notification(ctx.format, &ctx.base_url, sub, kind, info, events, timeout);
    ctx.channels.get(sub.channel)?.send(&n, &to).await
}

/// The notification Bundle and where it goes.
fn notification(
    format: Format,
    base_url: &str,
    sub: &SubscriptionRow,
    kind: Kind,
    info: &StatusInfo,
    events: &[Event],
    timeout: Duration,
) -> (Notification, Destination) {
    let bundle = bundle(
        format,
        kind,
        info,
        events,
        sub.content,
        base_url,
        Utc::now(),
    );
    let n = Notification {
        kind,
        subscription_id: sub.id.clone(),
        topic: sub.topic.clone(),
        event_numbers: events.iter().map(|e| e.event_number).collect(),
        content: sub.content,
        bundle,
    };
    let to = Destination {
        endpoint: sub.endpoint.clone(),
        headers: sub.headers.clone(),
        content_type: sub.content_type.clone(),
        timeout,
    };
    (n, to)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::channel::memory::MemoryChannel;
    use crate::config::DeliveryConfig;
    use crate::fhir::subscription::ChannelType;
    use crate::fhir::topic::Interaction;
    use serde_json::json;

    fn sub() -> SubscriptionRow {
        SubscriptionRow {
            id: "s1".into(),
            origin: "api".into(),
            topic: "http://t".into(),
            status: Status::Active,
            channel: Some(ChannelType::RestHook),
            endpoint: "http://receiver/hook".into(),
            content: Content::IdOnly,
            content_type: "application/fhir+json".into(),
            headers: vec![("X-Test".into(), "yes".into())],
            timeout: Some(3),
            max_count: Some(2),
            heartbeat_period: None,
            next_attempt_at: Utc::now(),
            last_sent_at: None,
            resource: json!({}),
            events_since_start: 0,
            handshake_done: true,
            failures: 0,
            last_error: None,
            created_at: Utc::now(),
        }
    }

    fn event(n: i64) -> Event {
        Event {
            event_number: n,
            resource_type: "Encounter".into(),
            resource_id: format!("e{n}"),
            interaction: Interaction::Create,
            timestamp: Utc::now(),
            resource: None,
            related: vec![],
        }
    }

    #[tokio::test]
    async fn a_batch_goes_out_on_the_subscriptions_channel_with_its_settings() {
        let ch = Arc::new(MemoryChannel::new(ChannelType::RestHook));
        let channels = Channels::default().with(ch.clone());
        let s = sub();
        let policy = SendPolicy::from(&DeliveryConfig::default());
        let info = status_info(&s, s.status, 2);
        let events = [event(1), event(2)];
        let (n, to) = notification(
            Format::R5,
            "http://base",
            &s,
            Kind::EventNotification,
            &info,
            &events,
            policy.timeout(s.timeout),
        );
        channels
            .get(s.channel)
            .unwrap()
            .send(&n, &to)
            .await
            .unwrap();
        let sent = ch.sent();
        assert_eq!(sent.len(), 1);
        let (n, to) = &sent[0];
        assert_eq!(to.timeout, Duration::from_secs(3));
        assert_eq!(to.headers, vec![("X-Test".to_string(), "yes".to_string())]);
        assert_eq!(n.kind, Kind::EventNotification);
        let status = &n.bundle["entry"][0]["resource"];
        assert_eq!(status["type"], "event-notification");
        assert_eq!(status["notificationEvent"].as_array().unwrap().len(), 2);
        assert_eq!(
            n.bundle["entry"].as_array().unwrap().len(),
            3,
            "status + 2 id-only entries"
        );
    }

    #[tokio::test]
    async fn failures_walk_the_subscription_to_error_and_off() {
        let ch = Arc::new(MemoryChannel::new(ChannelType::RestHook));
        ch.fail_next(60);
        let channels = Channels::default().with(ch.clone());
        let policy = SendPolicy::from(&DeliveryConfig::default());
        let mut s = sub();
        let mut statuses = Vec::new();
        while s.status != Status::Off {
            let info = status_info(&s, s.status, 1);
            let (n, to) = notification(
                Format::R5,
                "http://b",
                &s,
                Kind::EventNotification,
                &info,
                &[event(1)],
                Duration::from_secs(1),
            );
            let e = channels
                .get(s.channel)
                .unwrap()
                .send(&n, &to)
                .await
                .unwrap_err();
            assert!(matches!(e, SendError::Status(503, _)));
            s.status = policy.status_after_failure(s.failures, s.status, false);
            s.failures += 1;
            statuses.push(s.status);
        }
        assert_eq!(statuses.len(), 50);
        assert_eq!(statuses[1], Status::Active);
        assert_eq!(statuses[2], Status::Error);
        assert!(ch.sent().is_empty());
    }

    fn pending(n: i64) -> subscriptions::Pending {
        subscriptions::Pending {
            event_number: n,
            event_id: n,
            attempts: 0,
            resource_type: "Encounter".into(),
            resource_id: format!("e{n}"),
            version_id: None,
            interaction: Interaction::Create,
            commit_time: Utc::now(),
            resource: None,
            queued_at: Utc::now(),
        }
    }

    #[test]
    fn read_ahead_covers_a_lease_of_notifications_but_never_less_than_one() {
        assert_eq!(read_ahead(1), BACKLOG_ROUNDS as i64);
        assert_eq!(read_ahead(10), READ_AHEAD_MAX);
        assert_eq!(
            read_ahead(2_000),
            2_000,
            "a whole maxCount batch, however large"
        );
    }

    #[test]
    fn a_backlog_read_short_knows_nothing_else_was_pending() {
        let short = Backlog::read((1..=3).map(pending).collect(), 5);
        assert!(short.complete);
        let full = Backlog::read((1..=5).map(pending).collect(), 5);
        assert!(!full.complete, "as many as asked: more may be pending");
        assert_eq!(
            full.events
                .iter()
                .map(|p| p.event_number)
                .collect::<Vec<_>>(),
            [1, 2, 3, 4, 5]
        );
    }

    #[test]
    fn a_channel_this_process_lacks_is_a_send_error_not_a_panic() {
        let channels = Channels::default();
        assert!(matches!(
            channels.get(Some(ChannelType::RestHook)),
            Err(SendError::Unavailable(_))
        ));
        assert!(matches!(channels.get(None), Err(SendError::Unavailable(_))));
    }
}
