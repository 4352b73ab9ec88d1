//! A topic's send loop: finds subscriptions with work, leases them, and runs each lease's
//! turn in a task of its own, at most `workers` at once per topic, so a hanging endpoint
//! holds up only its own subscription. The queue work around the sends is done for many
//! subscriptions at once: one query finds those with work, one leases them, two read them
//! and their requeued dead letters, one statement moves the cursors of a group of delivered
//! notifications ([`Marks`]) and one gives the leases back. A dropped lease connection ends
//! every send of the topic (their leases are gone).

use chrono::Utc;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::ctx::Ctx;
use super::lease::Leases;
use super::marks::Marks;
use super::send::{read_ahead, work_one, Backlog, Job, Turn};
use super::window::Window;
use super::{DeliveryError, TopicWakers};
use crate::config::Config;
use crate::error::{supervise, Backoff};
use crate::fhir::subscription::Filter;
use crate::queue;
use crate::queue::cursor::{self, Cursor};
use crate::queue::events::{self, Pending};
use crate::queue::leases;
use crate::queue::subscriptions::SubscriptionRow;

type Result<T> = std::result::Result<T, DeliveryError>;
type Running = JoinSet<(String, Result<Turn>)>;

/// Runs the sends of `topic` until shutdown, reconnecting when the queue goes away.
pub(super) async fn worker(
    ctx: Arc<Ctx>,
    topic: String,
    wake: TopicWakers,
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
    .map_err(|e| {
        let mut f = crate::error::Fatal::from("send", &e);
        f.error = format!("topic {topic}: {}", f.error);
        anyhow::Error::new(f)
    })
}

/// A subscription whose last turn found nothing to send: the cursor it had, how far the
/// scan looked, and its filters, which newer events are checked against here before it is
/// leased again.
struct Quiet {
    cursor: Cursor,
    scanned: i64,
    filters: Vec<Filter>,
}

/// Subscriptions whose last turn found nothing to send. They are not leased again until an
/// event passes their filters or they change: with 100 subscriptions of one patient each, an
/// event leases one subscription, not 100.
#[derive(Default)]
struct Idle(HashMap<String, Quiet>);

impl Idle {
    /// Moves every idle scan over the window's new events that do not pass its filters.
    fn catch_up(&mut self, window: &Window) {
        for q in self.0.values_mut() {
            if let Some(to) = window.nothing_after(q.scanned, &q.filters) {
                q.scanned = to;
            }
        }
    }

    fn caught_up(&self, newest: i64) -> impl Iterator<Item = &String> {
        self.0
            .iter()
            .filter(move |(_, q)| q.scanned >= newest)
            .map(|(id, _)| id)
    }

    /// Where a scan of `sub` starts: past what its last turn looked at, when its cursor is
    /// still the one that turn had.
    fn start(&self, id: &str, cursor: Cursor) -> Cursor {
        match self.0.get(id) {
            Some(q) if q.cursor == cursor && q.scanned > cursor.event_id => Cursor {
                number: cursor.number,
                event_id: q.scanned,
            },
            _ => cursor,
        }
    }
}

/// The loop's state between wake-ups.
struct Loop {
    leases: Leases,
    marks: Marks,
    window: Arc<Window>,
    idle: Idle,
    running: Running,
    /// Subscriptions with work, fetched CANDIDATES at a time: with thousands of
    /// subscriptions the query is the cost, so it is not repeated for every send.
    queue: VecDeque<String>,
    /// Leased and read, waiting for a free send slot: leasing and reading `workers` at a
    /// time keeps this loop's round trips off the path of every single send, and holding at
    /// most twice `workers` leases leaves the rest to other instances with free slots.
    ready: VecDeque<Job>,
}

async fn run_worker(
    ctx: Arc<Ctx>,
    topic: &str,
    wake: &TopicWakers,
    mut shutdown: watch::Receiver<bool>,
) -> Result<()> {
    let mut l = Loop {
        leases: Leases::new(queue::connect(ctx.cfg.queue_url()).await?),
        marks: Marks::start(ctx.pool.clone()),
        window: Arc::new(Window::start(topic, &ctx.pool).await?),
        idle: Idle::default(),
        running: JoinSet::new(),
        queue: VecDeque::new(),
        ready: VecDeque::new(),
    };
    let workers = topic_workers(&ctx.cfg, topic);
    let mut refresh = true;
    while !*shutdown.borrow() {
        if std::mem::take(&mut refresh) {
            l.window.refresh(&ctx.pool).await?;
            l.idle.catch_up(&l.window);
        }
        fill(&ctx, topic, &mut l, workers).await?;
        let idle = if l.running.is_empty() && l.queue.is_empty() && l.ready.is_empty() {
            next_wait(&l.leases.conn, topic, l.window.newest()).await
        } else {
            Duration::from_secs(1)
        };
        tokio::select! {
            Some(done) = l.running.join_next(), if !l.running.is_empty() => {
                let ended = finished(done, &mut l)?;
                l.leases.give_back(&ended).await?;
            }
            _ = wake.events.notified() => refresh = true,
            // A subscription was created, changed or requeued: what was idle may not be.
            _ = wake.deliveries.notified() => l.idle.0.clear(),
            _ = tokio::time::sleep(idle) => refresh = true,
            _ = shutdown.changed() => {}
        }
    }
    drain_on_shutdown(&ctx.cfg, l.running).await;
    Ok(())
}

/// Finds, leases and starts work up to the free send slots.
async fn fill(ctx: &Arc<Ctx>, topic: &str, l: &mut Loop, workers: usize) -> Result<()> {
    let mut free = workers.saturating_sub(l.running.len());
    if l.ready.len() < free && l.queue.is_empty() {
        let bound = ctx.channels.bound_ids();
        let limit = CANDIDATES.max(free) as i64;
        let newest = l.window.newest();
        let skip = l.leases.held();
        let idle: Vec<String> = l.idle.caught_up(newest).cloned().collect();
        let found =
            leases::with_work(&l.leases.conn, topic, newest, &skip, &idle, &bound, limit).await?;
        l.queue.extend(found);
    }
    while l.ready.len() < free && !l.queue.is_empty() {
        let next: Vec<String> = l.queue.drain(..workers.min(l.queue.len())).collect();
        let (got, rows) = l.leases.take_and_read(next).await?;
        let (work, gone) = jobs(ctx, topic, got, rows, l).await?;
        l.leases.give_back(&gone).await?;
        l.ready.extend(work);
    }
    while free > 0 {
        let Some(job) = l.ready.pop_front() else {
            break;
        };
        let (ctx, topic) = (ctx.clone(), topic.to_string());
        l.running.spawn(async move {
            let id = job.sub.id.clone();
            (id, work_one(&ctx, &topic, job).await)
        });
        free -= 1;
    }
    Ok(())
}

/// Jobs for the subscriptions just leased (`ids`) and read (`rows`, with whether each has
/// requeued dead letters, which are read here). Returns the jobs, and the ids with nothing
/// to send any more (deleted or turned off meanwhile by another process), whose leases go
/// back.
async fn jobs(
    ctx: &Ctx,
    topic: &str,
    ids: Vec<String>,
    rows: Vec<(SubscriptionRow, bool)>,
    l: &Loop,
) -> Result<(Vec<Job>, Vec<String>)> {
    let again: Vec<String> = rows
        .iter()
        .filter(|(_, r)| *r)
        .map(|(s, _)| s.id.clone())
        .collect();
    let mut requeued = HashMap::new();
    if !again.is_empty() {
        let c = ctx.conn().await?;
        let found = cursor::requeued_many(&**c, &again, read_ahead(1) as i64).await?;
        requeued = requeued_events(&c, topic, found).await?;
    }
    let gone: Vec<String> = ids
        .into_iter()
        .filter(|id| !rows.iter().any(|(s, _)| &s.id == id))
        .collect();
    let work = rows
        .into_iter()
        .map(|(sub, _)| {
            let from = l.idle.start(&sub.id, sub.cursor);
            let again = requeued.remove(&sub.id).unwrap_or_default();
            Job {
                backlog: Backlog::new(from, again),
                sub,
                window: l.window.clone(),
                marks: l.marks.clone(),
            }
        })
        .collect();
    Ok((work, gone))
}

/// The events of requeued dead letters, numbered as they were, per subscription.
async fn requeued_events(
    c: &tokio_postgres::Client,
    topic: &str,
    rows: Vec<(String, i64, i64)>,
) -> Result<HashMap<String, Vec<Pending>>> {
    let mut out: HashMap<String, Vec<Pending>> = HashMap::new();
    if rows.is_empty() {
        return Ok(out);
    }
    let ids: Vec<i64> = rows.iter().map(|r| r.2).collect();
    let found: HashMap<i64, Arc<events::TopicEvent>> = events::by_ids(c, topic, &ids)
        .await?
        .into_iter()
        .map(|e| (e.id, Arc::new(e)))
        .collect();
    for (sub, number, event_id) in rows {
        if let Some(e) = found.get(&event_id) {
            out.entry(sub).or_default().push(Pending {
                event_number: number,
                event: e.clone(),
            });
        }
    }
    Ok(out)
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

type Done = std::result::Result<(String, Result<Turn>), tokio::task::JoinError>;

/// Send tasks ended: `done` and any others already finished. Returns their subscriptions,
/// whose leases go back together; errors are logged. A task that panicked ends the topic's
/// worker, and with its lease connection every lease it held.
fn finished(done: Done, l: &mut Loop) -> Result<Vec<String>> {
    let mut ended = Vec::new();
    let mut next = Some(done);
    while let Some(d) = next {
        let (id, r) = d.map_err(|e| {
            DeliveryError::Queue(queue::QueueError::Other(format!("send task: {e}")))
        })?;
        match r {
            Ok(Turn::Idle {
                cursor,
                scanned,
                filters,
            }) => {
                let q = Quiet {
                    cursor,
                    scanned,
                    filters,
                };
                l.idle.0.insert(id.clone(), q);
            }
            Ok(Turn::Busy) => {
                l.idle.0.remove(&id);
            }
            Err(e) => {
                tracing::warn!(subscription = %id, error = %e, "send failed on the queue; the subscription is retried");
            }
        }
        ended.push(id);
        next = l.running.try_join_next();
    }
    Ok(ended)
}

/// On SIGTERM: sends under way get `[delivery] shutdown_grace_secs` to finish; what is left
/// is dropped unmarked, so its events stay pending and go out again (same eventNumbers) from
/// whichever instance leases the subscription next.
async fn drain_on_shutdown(cfg: &Config, mut running: Running) {
    let grace = Duration::from_secs(cfg.delivery.shutdown_grace_secs);
    let all_done = async { while running.join_next().await.is_some() {} };
    if tokio::time::timeout(grace, all_done).await.is_err() {
        tracing::warn!(
            grace_secs = grace.as_secs(),
            "sends still running at the end of the shutdown grace; their events stay pending"
        );
    }
}

/// How long to sleep when there is nothing to do: until the next retry is due, at most 1 s.
async fn next_wait(c: &tokio_postgres::Client, topic: &str, newest: i64) -> Duration {
    let max = Duration::from_secs(1);
    match leases::next_retry(c, topic, newest).await {
        Ok(Some(t)) => (t - Utc::now()).to_std().unwrap_or(Duration::ZERO).min(max),
        _ => max,
    }
}
