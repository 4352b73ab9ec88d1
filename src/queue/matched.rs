//! A subscription's matches, computed from its topic's events: numbering from the cursor
//! (pure), and the scans `$status`, `$events` and turning a subscription off need.

use std::sync::Arc;
use tokio_postgres::GenericClient;

use super::cursor::Cursor;
use super::events::{self, Pending, TopicEvent};
use super::Result;
use crate::fhir::subscription::Filter;

/// What numbering needs to know of a subscription.
#[derive(Debug, Clone)]
pub struct Track {
    pub(crate) topic: String,
    pub(crate) filters: Vec<Filter>,
    pub(crate) cursor: Cursor,
    /// Numbering looking back is exact down to this event id and eventNumber.
    pub(crate) start_event_id: i64,
    pub(crate) start_number: i64,
}

/// Events read per query while scanning.
const CHUNK: i64 = 1000;

/// Numbers the events of `events` (id order, all after `from.event_id`) that pass
/// `filters`, on from `from.number`; at most `limit`. Returns them and how far the scan
/// got: the id of the last event looked at.
pub(crate) fn number<'a>(
    from: Cursor,
    filters: &[Filter],
    events: impl IntoIterator<Item = &'a Arc<TopicEvent>>,
    limit: usize,
) -> (Vec<Pending>, i64) {
    let mut out = Vec::new();
    let mut scanned = from.event_id;
    let mut n = from.number;
    for e in events {
        if out.len() >= limit {
            break;
        }
        scanned = e.id;
        if e.passes(filters) {
            n += 1;
            out.push(Pending {
                event_number: n,
                event: e.clone(),
            });
        }
    }
    (out, scanned)
}

/// The next `limit` matches after the cursor, read from the queue.
pub(crate) async fn pending<C: GenericClient>(
    c: &C,
    t: &Track,
    limit: usize,
) -> Result<Vec<Pending>> {
    let newest = events::newest_id(c).await?;
    let mut from = t.cursor;
    let mut out: Vec<Pending> = Vec::new();
    while out.len() < limit && from.event_id < newest {
        let chunk: Vec<Arc<TopicEvent>> = events::after(c, &t.topic, from.event_id, newest, CHUNK)
            .await?
            .into_iter()
            .map(Arc::new)
            .collect();
        let Some(last) = chunk.last().map(|e| e.id) else {
            break;
        };
        let (got, scanned) = number(from, &t.filters, &chunk, limit - out.len());
        from = Cursor {
            number: got.last().map(|p| p.event_number).unwrap_or(from.number),
            event_id: if got.len() < limit - out.len() {
                last
            } else {
                scanned
            },
        };
        out.extend(got);
    }
    Ok(out)
}

/// How many matches wait after the cursor.
pub async fn count_pending<C: GenericClient>(c: &C, t: &Track) -> Result<i64> {
    Ok(pending(c, t, usize::MAX).await?.len() as i64)
}

/// The matches numbered `since..=until`, at most `limit`, oldest first: settled ones
/// found looking back from the cursor (down to the start of exact numbering and what
/// retention left, `floor`), pending ones looking forward.
pub(crate) async fn between<C: GenericClient>(
    c: &C,
    t: &Track,
    floor: i64,
    since: i64,
    until: i64,
    limit: usize,
) -> Result<Vec<Pending>> {
    let mut out = settled_between(c, t, floor, since, until).await?;
    if until > t.cursor.number {
        let ahead = pending(c, t, (until - t.cursor.number) as usize).await?;
        out.extend(ahead.into_iter().filter(|p| p.event_number >= since));
    }
    out.truncate(limit);
    Ok(out)
}

/// Settled matches numbered `since..=until`, counted down from the cursor.
async fn settled_between<C: GenericClient>(
    c: &C,
    t: &Track,
    floor: i64,
    since: i64,
    until: i64,
) -> Result<Vec<Pending>> {
    let floor = floor.max(t.start_event_id);
    let mut n = t.cursor.number;
    let mut before = t.cursor.event_id;
    let mut out = Vec::new();
    while n >= since.max(t.start_number + 1) && before > floor {
        let chunk = events::before(c, &t.topic, before, floor, CHUNK).await?;
        let Some(last) = chunk.last().map(|e| e.id) else {
            break;
        };
        for e in chunk {
            if n < since || n <= t.start_number {
                break;
            }
            if e.passes(&t.filters) {
                if n <= until {
                    out.push(Pending {
                        event_number: n,
                        event: Arc::new(e),
                    });
                }
                n -= 1;
            }
        }
        before = last - 1;
    }
    out.reverse();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fhir::search::value::Values;
    use crate::fhir::topic::Interaction;
    use chrono::Utc;
    use std::collections::HashMap;

    fn ev(id: i64, patient: &str) -> Arc<TopicEvent> {
        let mut filters = HashMap::new();
        filters.insert(
            "patient".to_string(),
            Values::Reference(vec![patient.to_string()]),
        );
        Arc::new(TopicEvent {
            id,
            resource_type: "Encounter".into(),
            resource_id: format!("e{id}"),
            version_id: None,
            interaction: Interaction::Create,
            commit_time: Utc::now(),
            resource: None,
            queued_at: Utc::now(),
            filters,
        })
    }

    fn patient(p: &str) -> Vec<Filter> {
        vec![Filter {
            resource_type: Some("Encounter".into()),
            parameter: "patient".into(),
            comparator: None,
            modifier: None,
            value: p.into(),
            source: String::new(),
        }]
    }

    #[test]
    fn matches_are_numbered_on_from_the_cursor_in_event_order() {
        let events: Vec<_> = [(11, "Patient/1"), (12, "Patient/2"), (13, "Patient/1")]
            .iter()
            .map(|(id, p)| ev(*id, p))
            .collect();
        let from = Cursor {
            number: 7,
            event_id: 10,
        };
        let (got, scanned) = number(from, &patient("Patient/1"), &events, 10);
        let got: Vec<(i64, i64)> = got.iter().map(|p| (p.event_number, p.event.id)).collect();
        assert_eq!(got, [(8, 11), (9, 13)]);
        assert_eq!(scanned, 13);
        let (all, _) = number(from, &[], &events, 10);
        assert_eq!(all.len(), 3, "no filter: every event of the topic");
    }

    #[test]
    fn a_limit_stops_the_scan_at_the_last_match_taken() {
        let events: Vec<_> = (1..=5).map(|i| ev(i, "Patient/1")).collect();
        let (got, scanned) = number(Cursor::default(), &[], &events, 2);
        assert_eq!(got.len(), 2);
        assert_eq!(scanned, 2, "event 3 was not looked at");
        // The same cursor and filters give the same numbers again (a resend after a kill).
        let (again, _) = number(Cursor::default(), &[], &events, 2);
        assert_eq!(
            got.iter().map(|p| p.event_number).collect::<Vec<_>>(),
            again.iter().map(|p| p.event_number).collect::<Vec<_>>()
        );
    }
}
