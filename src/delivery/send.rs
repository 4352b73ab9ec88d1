//! Send workers: lease a subscription, send its handshake or its oldest pending event,
//! record the outcome. One subscription per worker at a time keeps each subscription in
//! eventNumber order while a slow endpoint holds up only itself.

use chrono::Utc;
use rand::Rng;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{watch, Notify};

use super::payload::Payloads;
use crate::channel::{rest_hook::RestHook, Channel, Outgoing};
use crate::config::Config;
use crate::fhir::notification::{bundle, Format, Kind, StatusInfo};
use crate::fhir::subscription::Status;
use crate::queue::{
    self,
    subscriptions::{self, FailurePolicy, SubscriptionRow},
};
use tokio_postgres::Client;

pub struct Ctx {
    pub cfg: Arc<Config>,
    pub payloads: Payloads,
    pub channel: RestHook,
    pub base_url: String,
    pub format: Format,
}

pub async fn worker(
    ctx: Arc<Ctx>,
    topic: String,
    wake: Arc<Notify>,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    // A connection of the worker's own: its session advisory locks are the leases, so a
    // dropped connection (error, crash) frees them at once.
    let mut conn: Option<Client> = None;
    loop {
        if *shutdown.borrow() {
            return Ok(());
        }
        if conn.is_none() {
            match queue::connect(ctx.cfg.queue_url()).await {
                Ok(c) => conn = Some(c),
                Err(e) => {
                    tracing::warn!(topic = %topic, error = %e, "send worker cannot reach the queue")
                }
            }
        }
        let idle = match conn.as_mut() {
            None => Duration::from_secs(1),
            Some(c) => match work_one(&ctx, c, &topic, &wake).await {
                Ok(true) => continue,
                Ok(false) => next_wait(c, &topic).await,
                Err(e) => {
                    tracing::warn!(topic = %topic, error = format!("{e:#}"), "send worker error; reconnecting");
                    conn = None;
                    Duration::from_secs(1)
                }
            },
        };
        tokio::select! {
            _ = wake.notified() => {}
            _ = tokio::time::sleep(idle) => {}
            _ = shutdown.changed() => return Ok(()),
        }
    }
}

/// How long to sleep when there is nothing to do: until the next retry is due, at most 1 s.
async fn next_wait(c: &Client, topic: &str) -> Duration {
    let max = Duration::from_secs(1);
    match subscriptions::next_retry(c, topic).await {
        Ok(Some(t)) => (t - Utc::now()).to_std().unwrap_or(Duration::ZERO).min(max),
        _ => max,
    }
}

/// Does one unit of work. Returns false when no subscription of the topic had any.
async fn work_one(ctx: &Ctx, c: &mut Client, topic: &str, wake: &Notify) -> anyhow::Result<bool> {
    let Some(mut sub) = subscriptions::lease(c, topic).await? else {
        return Ok(false);
    };
    // Another worker may find more work meanwhile.
    wake.notify_one();
    let t = sub
        .timeout
        .filter(|t| *t > 0)
        .map(|t| Duration::from_secs(t as u64))
        .unwrap_or(ctx.cfg.delivery.default_timeout());
    if sub.status == Status::Requested {
        handshake(ctx, c, &sub, t).await?;
    } else {
        // Keep the lease while the backlog drains, up to a bound so other subscriptions of
        // the topic get their turn; stop at the first failure (its retry is scheduled).
        let now = Utc::now();
        let mut went_out = false;
        if sub.next_attempt_at <= now {
            for _ in 0..BACKLOG_ROUNDS {
                match send_events(ctx, c, topic, &sub, t).await? {
                    Sent::Delivered => {
                        went_out = true;
                        // What `delivered` just wrote; later notifications report it.
                        sub.status = Status::Active;
                        sub.last_error = None;
                    }
                    Sent::Failed => {
                        went_out = true;
                        break;
                    }
                    Sent::Nothing | Sent::Deferred => break,
                }
            }
        }
        if !went_out && heartbeat_due(&sub, now) {
            heartbeat(ctx, c, &sub, t).await?;
        }
    }
    subscriptions::release(c, &sub.id).await?;
    Ok(true)
}

/// The notificationShapes of a topic (configured, or from the store).
async fn topic_shapes(ctx: &Ctx, c: &Client, topic: &str) -> Vec<crate::fhir::topic::Shape> {
    if let Some(t) = ctx.cfg.topics.iter().find(|t| t.topic.url == topic) {
        return t.topic.shapes.clone();
    }
    match queue::topics::load_store(c).await {
        Ok(list) => list
            .into_iter()
            .find(|(_, t)| t.url == topic)
            .map(|(_, t)| t.shapes)
            .unwrap_or_default(),
        Err(_) => Vec::new(),
    }
}

/// Notifications one worker sends for one subscription before giving others a turn.
const BACKLOG_ROUNDS: usize = 100;

enum Sent {
    Nothing,
    /// Fewer than maxCount events are ready and the batch window is still open.
    Deferred,
    Delivered,
    Failed,
}

fn heartbeat_due(sub: &SubscriptionRow, now: chrono::DateTime<Utc>) -> bool {
    match sub.heartbeat_period.filter(|p| *p > 0) {
        None => false,
        Some(p) => sub
            .last_sent_at
            .is_none_or(|t| t + chrono::Duration::seconds(i64::from(p)) <= now),
    }
}

/// A heartbeat: nothing else went out for `heartbeatPeriod`. It carries the subscription's
/// status (and error) and never moves the event count.
async fn heartbeat(
    ctx: &Ctx,
    c: &mut Client,
    sub: &SubscriptionRow,
    timeout: Duration,
) -> anyhow::Result<()> {
    let info = StatusInfo {
        subscription_id: sub.id.clone(),
        status: sub.status,
        events_since_start: subscriptions::last_settled_number(&*c, &sub.id).await?,
        topic_url: sub.topic.clone(),
        errors: sub.last_error.iter().cloned().collect(),
    };
    let result = notify(ctx, sub, Kind::Heartbeat, &info, &[], timeout).await?;
    match result {
        Ok(()) => subscriptions::touched(&*c, &sub.id).await?,
        Err(e) => {
            record_failure(ctx, c, sub, &[], &e.to_string()).await?;
        }
    }
    Ok(())
}

/// Counts a failed send and schedules the retry; returns nothing, logs one line.
async fn record_failure(
    ctx: &Ctx,
    c: &mut Client,
    sub: &SubscriptionRow,
    numbers: &[i64],
    error: &str,
) -> anyhow::Result<()> {
    let policy = FailurePolicy {
        max_attempts: ctx.cfg.delivery.max_attempts,
        error_after: ctx.cfg.delivery.error_after_failures,
        off_after: ctx.cfg.delivery.off_after_failures,
    };
    let retry = backoff(ctx, sub.failures);
    let tx = c.transaction().await?;
    let status = subscriptions::send_failed(&tx, &sub.id, numbers, error, retry, policy).await?;
    tx.commit().await?;
    metrics::counter!("fhir_cdc_delivery_failures_total", "topic" => sub.topic.clone())
        .increment(1);
    tracing::warn!(
        subscription = %sub.id,
        event_number = numbers.first().copied().unwrap_or(0),
        error = %error,
        status = status.as_str(),
        retry_in_ms = retry.as_millis() as u64,
        "notification not delivered"
    );
    Ok(())
}

async fn send_events(
    ctx: &Ctx,
    c: &mut Client,
    topic: &str,
    sub: &SubscriptionRow,
    t: Duration,
) -> anyhow::Result<Sent> {
    let max = i64::from(sub.max_count.filter(|m| *m > 0).unwrap_or(1));
    let batch = subscriptions::pending(&*c, &sub.id, max).await?;
    let Some(oldest) = batch.first() else {
        return Ok(Sent::Nothing);
    };
    let window = chrono::Duration::milliseconds(ctx.cfg.delivery.batch_window_ms as i64);
    if (batch.len() as i64) < max && oldest.queued_at + window > Utc::now() {
        subscriptions::defer(&*c, &sub.id, oldest.queued_at + window).await?;
        return Ok(Sent::Deferred);
    }
    let shapes = if sub.content == crate::fhir::subscription::Content::FullResource {
        topic_shapes(ctx, c, topic).await
    } else {
        Vec::new()
    };
    let mut events = Vec::with_capacity(batch.len());
    for p in &batch {
        events.push(ctx.payloads.event(sub.content, &shapes, p).await);
    }
    let last = batch.last().map(|p| p.event_number).unwrap_or(0);
    let info = StatusInfo {
        subscription_id: sub.id.clone(),
        status: sub.status,
        events_since_start: last,
        topic_url: sub.topic.clone(),
        errors: sub.last_error.iter().cloned().collect(),
    };
    let numbers: Vec<i64> = batch.iter().map(|p| p.event_number).collect();
    let result = notify(ctx, sub, Kind::EventNotification, &info, &events, t).await?;
    match result {
        Ok(()) => {
            subscriptions::delivered(&*c, &sub.id, &numbers).await?;
            metrics::counter!("fhir_cdc_notifications_sent_total", "topic" => topic.to_string())
                .increment(1);
            for p in &batch {
                let age = (Utc::now() - p.commit_time).to_std().unwrap_or_default();
                metrics::histogram!("fhir_cdc_end_to_end_seconds").record(age.as_secs_f64());
            }
            Ok(Sent::Delivered)
        }
        Err(e) => {
            record_failure(ctx, c, sub, &numbers, &e.to_string()).await?;
            Ok(Sent::Failed)
        }
    }
}

async fn handshake(
    ctx: &Ctx,
    c: &Client,
    sub: &SubscriptionRow,
    timeout: Duration,
) -> anyhow::Result<()> {
    let info = StatusInfo {
        subscription_id: sub.id.clone(),
        status: Status::Requested,
        events_since_start: sub.events_since_start,
        topic_url: sub.topic.clone(),
        errors: vec![],
    };
    let result = notify(ctx, sub, Kind::Handshake, &info, &[], timeout).await?;
    match result {
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
/// The outer error is ours (serialisation); the inner one is the channel's.
async fn notify(
    ctx: &Ctx,
    sub: &SubscriptionRow,
    kind: Kind,
    info: &StatusInfo,
    events: &[crate::fhir::notification::Event],
    timeout: Duration,
) -> anyhow::Result<Result<(), crate::channel::SendError>> {
    let notification = bundle(
        ctx.format,
        kind,
        info,
        events,
        sub.content,
        &ctx.base_url,
        Utc::now(),
    );
    Ok(ctx
        .channel
        .send(Outgoing {
            endpoint: &sub.endpoint,
            headers: &sub.headers,
            content_type: &sub.content_type,
            body: serde_json::to_vec(&notification)?,
            timeout,
        })
        .await)
}

/// Exponential backoff with jitter: initial × 2^failures, capped, times a factor in [0.5, 1].
fn backoff(ctx: &Ctx, failures: i32) -> Duration {
    let d = &ctx.cfg.delivery;
    let exp = 2u64.saturating_pow(failures.clamp(0, 30) as u32);
    let ms = d.retry_initial_ms.saturating_mul(exp).min(d.retry_max_ms);
    let jitter: f64 = rand::rng().random_range(0.5..=1.0);
    Duration::from_millis((ms as f64 * jitter) as u64)
}
