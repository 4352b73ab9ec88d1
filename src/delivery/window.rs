//! The recent events of one topic, read once and shared by every subscription of the topic
//! in this process: with 100 subscriptions an event is read and its canFilterBy values
//! parsed once, not 100 times. A subscription further behind than the window reads its
//! events from the queue itself.

use deadpool_postgres::Pool;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use super::DeliveryError;
use crate::fhir::subscription::Filter;
use crate::queue::cursor::Cursor;
use crate::queue::events::{self, Pending, TopicEvent};
use crate::queue::matched::number;
use crate::queue::QueueError;

/// Events kept at most; older ones are read from the queue when a subscription needs them.
const CAPACITY: usize = 4096;
/// Events read per query.
const CHUNK: i64 = 1000;

/// Events read per query behind the window for a subscription that wants `wanted` more
/// matches. Without filters every event matches, so no more than `wanted` are read: the
/// rest of a full chunk was parsed only to be read again at the next turn (a backlog of
/// 20,000 cost ten parses per notification). With filters a chunk is scanned for matches.
fn behind_chunk(filters: &[Filter], wanted: usize) -> i64 {
    if filters.is_empty() {
        (wanted as i64).clamp(1, CHUNK)
    } else {
        CHUNK
    }
}

/// A subscription's next matches, and how far the scan for them got.
pub(super) struct Matches {
    pub(crate) events: Vec<Pending>,
    /// The id of the last event looked at.
    pub(crate) scanned: i64,
    /// Every event known to the window was looked at.
    pub(crate) complete: bool,
}

pub(super) struct Window {
    topic: String,
    inner: Mutex<Inner>,
}

/// The window holds every event of the topic with an id in `(lo, hi]`.
struct Inner {
    lo: i64,
    hi: i64,
    events: VecDeque<Arc<TopicEvent>>,
}

impl Window {
    /// An empty window at the queue's newest event.
    pub(super) async fn start(topic: &str, pool: &Pool) -> Result<Self, DeliveryError> {
        let c = pool.get().await.map_err(QueueError::from)?;
        let newest = events::newest_id(&**c).await?;
        Ok(Window {
            topic: topic.to_string(),
            inner: Mutex::new(Inner {
                lo: newest,
                hi: newest,
                events: VecDeque::new(),
            }),
        })
    }

    /// The newest event id the window has covered.
    pub(super) fn newest(&self) -> i64 {
        self.inner.lock().map(|i| i.hi).unwrap_or(0)
    }

    /// Reads what capture queued since the last refresh. Returns the newest id covered.
    pub(super) async fn refresh(&self, pool: &Pool) -> Result<i64, DeliveryError> {
        let c = pool.get().await.map_err(QueueError::from)?;
        let mut from = self.newest();
        // The newest id and the first chunk in one round trip: what an event's latency sees.
        let (newest, mut chunk) = events::newest_and_after(&**c, &self.topic, from, CHUNK).await?;
        // Retention may remove the newest events of an idle queue: the window never goes back.
        if newest <= from {
            return Ok(from);
        }
        loop {
            let full = chunk.len() as i64 == CHUNK;
            let to = match chunk.last() {
                Some(e) if full => e.id,
                _ => newest,
            };
            self.append(from, to, chunk);
            from = to;
            if from >= newest {
                return Ok(self.newest());
            }
            chunk = events::after(&**c, &self.topic, from, newest, CHUNK).await?;
        }
    }

    /// Adds the events of `(from, to]`, unless another refresh did meanwhile.
    fn append(&self, from: i64, to: i64, chunk: Vec<TopicEvent>) {
        let Ok(mut i) = self.inner.lock() else {
            return;
        };
        if i.hi != from {
            return;
        }
        i.events.extend(chunk.into_iter().map(Arc::new));
        i.hi = to;
        while i.events.len() > CAPACITY {
            if let Some(e) = i.events.pop_front() {
                i.lo = e.id;
            }
        }
    }

    /// The next matches (at most `limit`) of a subscription with `filters` after `from`.
    pub(super) async fn matches(
        &self,
        pool: &Pool,
        mut from: Cursor,
        filters: &[Filter],
        limit: usize,
    ) -> Result<Matches, DeliveryError> {
        let mut out = Vec::new();
        loop {
            if let Some(m) = self.in_window(from, filters, limit - out.len()) {
                out.extend(m.events);
                return Ok(Matches {
                    events: out,
                    scanned: m.scanned,
                    complete: m.complete,
                });
            }
            // Behind the window: read from the queue up to where the window starts.
            let lo = self.inner.lock().map(|i| i.lo).unwrap_or(from.event_id);
            let c = pool.get().await.map_err(QueueError::from)?;
            let chunk: Vec<Arc<TopicEvent>> = events::after(
                &**c,
                &self.topic,
                from.event_id,
                lo,
                behind_chunk(filters, limit - out.len()),
            )
            .await?
            .into_iter()
            .map(Arc::new)
            .collect();
            let short = (chunk.len() as i64) < CHUNK;
            let (got, scanned) = number(from, filters, &chunk, limit - out.len());
            let taken_all = got.len() < limit - out.len();
            from = Cursor {
                number: got.last().map(|p| p.event_number).unwrap_or(from.number),
                event_id: if taken_all && short { lo } else { scanned },
            };
            out.extend(got);
            if out.len() >= limit {
                return Ok(Matches {
                    events: out,
                    scanned: from.event_id,
                    complete: false,
                });
            }
        }
    }

    /// Whether an event after `after` passes `filters`: `None` when the window does not
    /// reach back to `after`; else the id up to which nothing passes (`hi`) or the first
    /// passing event.
    pub(super) fn nothing_after(&self, after: i64, filters: &[Filter]) -> Option<i64> {
        let i = self.inner.lock().ok()?;
        if after < i.lo {
            return None;
        }
        let start = i.events.partition_point(|e| e.id <= after);
        let hit = i.events.range(start..).any(|e| e.passes(filters));
        (!hit).then_some(i.hi.max(after))
    }

    /// Matches from the window, when `from` is inside it.
    fn in_window(&self, from: Cursor, filters: &[Filter], limit: usize) -> Option<Matches> {
        let i = self.inner.lock().ok()?;
        if from.event_id < i.lo {
            return None;
        }
        let start = i.events.partition_point(|e| e.id <= from.event_id);
        let (events, scanned) = number(from, filters, i.events.range(start..), limit);
        let complete = events.len() < limit;
        Some(Matches {
            events,
            scanned: if complete {
                i.hi.max(from.event_id)
            } else {
                scanned
            },
            complete,
        })
    }
}
