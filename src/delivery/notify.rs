//! A notification Bundle for a subscription, and its send over the subscription's channel.

use chrono::Utc;
use std::time::Duration;

use super::ctx::Ctx;
use crate::channel::{Destination, Notification, SendError};
use crate::fhir::notification::{Event, Format, Kind, StatusInfo};
use crate::fhir::subscription::{Content, Status};
use crate::fhir::wire::bundle_bytes;
use crate::queue::events::Pending;
use crate::queue::subscriptions::SubscriptionRow;

pub(super) fn status_info(
    sub: &SubscriptionRow,
    status: Status,
    events_since_start: i64,
) -> StatusInfo {
    StatusInfo {
        subscription_id: sub.id.clone(),
        status,
        events_since_start,
        topic_url: sub.topic.clone(),
        errors: sub.last_error.iter().cloned().collect(),
        gaps: Vec::new(),
    }
}

/// The events as the subscription's content level carries them.
pub(super) async fn build_events(
    ctx: &Ctx,
    topic: &str,
    content: Content,
    batch: &[Pending],
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

/// Builds `sub`'s notification of `kind` and sends it over its channel within `timeout`.
pub(super) async fn notify(
    ctx: &Ctx,
    sub: &SubscriptionRow,
    kind: Kind,
    info: &StatusInfo,
    events: &[Event],
    timeout: Duration,
) -> Result<(), SendError> {
    let (n, to) = notification(ctx.format, &ctx.base_url, sub, kind, info, events, timeout)?;
    let started = std::time::Instant::now();
    let sent = ctx.channels.get(sub.channel)?.send(&n, &to).await;
    ctx.journal
        .record(&sub.id, kind, &n.event_numbers, started.elapsed(), &sent);
    sent.map(|_| ())
}

/// The notification Bundle and where it goes.
pub(super) fn notification(
    format: Format,
    base_url: &str,
    sub: &SubscriptionRow,
    kind: Kind,
    info: &StatusInfo,
    events: &[Event],
    timeout: Duration,
) -> Result<(Notification, Destination), SendError> {
    let body = bundle_bytes(
        format,
        kind,
        info,
        events,
        sub.content,
        base_url,
        Utc::now(),
    )
    .map_err(|e| SendError::Encode(e.to_string()))?;
    let n = Notification {
        kind,
        subscription_id: sub.id.clone(),
        topic: sub.topic.clone(),
        event_numbers: events.iter().map(|e| e.event_number).collect(),
        content: sub.content,
        body: body.into(),
    };
    let to = Destination {
        endpoint: sub.endpoint.clone(),
        headers: sub.headers.clone(),
        content_type: sub.content_type.clone(),
        timeout,
        signing_secret: sub.signing_secret.clone(),
    };
    Ok((n, to))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::channel::memory::MemoryChannel;
    use crate::channel::Channels;
    use crate::config::DeliveryConfig;
    use crate::delivery::policy::SendPolicy;
    use crate::fhir::notification::Event;
    use crate::fhir::subscription::ChannelType;
    use crate::fhir::topic::Interaction;
    use crate::queue::cursor::Cursor;
    use chrono::Utc;
    use serde_json::json;
    use std::sync::Arc;

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
            signing_secret: None,
            timeout: Some(3),
            max_count: Some(2),
            heartbeat_period: None,
            next_attempt_at: Utc::now(),
            last_sent_at: None,
            resource: json!({}),
            filters: vec![],
            cursor: Cursor::default(),
            head_attempts: 0,
            start_event_id: 0,
            start_number: 0,
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
        )
        .unwrap();
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
        let bundle = n.bundle();
        let status = &bundle["entry"][0]["resource"];
        assert_eq!(status["type"], "event-notification");
        assert_eq!(status["notificationEvent"].as_array().unwrap().len(), 2);
        assert_eq!(
            bundle["entry"].as_array().unwrap().len(),
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
            )
            .unwrap();
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
