//! FHIR messaging: the notification Bundle wrapped in a `message` Bundle whose first entry
//! is a `MessageHeader` (focus: the notification), POSTed to the subscription's endpoint (a
//! FHIR base or its `$process-message`) with the rest-hook rules for headers, TLS, private
//! addresses, `Retry-After` and refusals.

use async_trait::async_trait;
use chrono::{SecondsFormat, Utc};
use serde_json::{json, Value};

use super::rest_hook::RestHook;
use super::{Accepted, Channel, Destination, Notification, SendError};
use crate::fhir::notification::Format;
use crate::fhir::subscription::ChannelType;

/// The MessageHeader event, as in the official R5 example
/// `Bundle-notification-message-id-only.json`.
pub(crate) const EVENT_SYSTEM: &str = "http://example.org/fhir/message-events";
pub(crate) const EVENT_CODE: &str = "subscription-notification";

pub(crate) struct Message {
    http: RestHook,
    format: Format,
    base_url: String,
}

impl Message {
    pub(crate) fn new(http: RestHook, format: Format, base_url: String) -> Self {
        Message {
            http,
            format,
            base_url,
        }
    }
}

#[async_trait]
impl Channel for Message {
    fn channel_type(&self) -> ChannelType {
        ChannelType::Message
    }

    async fn send(&self, n: &Notification, to: &Destination) -> Result<Accepted, SendError> {
        let wrapped = wrap(self.format, &self.base_url, &n.bundle());
        let body = serde_json::to_vec(&wrapped).map_err(|e| SendError::Encode(e.to_string()))?;
        self.http.post(body.into(), to).await
    }
}

/// The message Bundle carrying `notification`.
pub(crate) fn wrap(format: Format, base_url: &str, notification: &Value) -> Value {
    let header_id = uuid::Uuid::new_v4().to_string();
    let focus_id = notification["id"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let focus_url = format!("urn:uuid:{focus_id}");
    // R5 renamed MessageHeader.source.endpoint (R4, R4B) to endpointUrl.
    let source = match format {
        Format::R5 => json!({"endpointUrl": base_url}),
        Format::R4B | Format::R4Backport => json!({"endpoint": base_url}),
    };
    let header = json!({
        "resourceType": "MessageHeader",
        "id": header_id,
        "eventCoding": {"system": EVENT_SYSTEM, "code": EVENT_CODE},
        "source": source,
        "focus": [{"reference": focus_url}],
    });
    json!({
        "resourceType": "Bundle",
        "id": uuid::Uuid::new_v4().to_string(),
        "type": "message",
        "timestamp": Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true),
        "entry": [
            {"fullUrl": format!("urn:uuid:{header_id}"), "resource": header},
            {"fullUrl": focus_url, "resource": notification},
        ],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_header_comes_first_and_points_at_the_notification() {
        let n = json!({"resourceType": "Bundle", "id": "n1", "type": "subscription-notification"});
        for (f, key) in [
            (Format::R5, "endpointUrl"),
            (Format::R4B, "endpoint"),
            (Format::R4Backport, "endpoint"),
        ] {
            let m = wrap(f, "https://cdc.example/fhir", &n);
            assert_eq!(m["type"], "message");
            let h = &m["entry"][0]["resource"];
            assert_eq!(h["resourceType"], "MessageHeader");
            assert_eq!(h["source"][key], "https://cdc.example/fhir");
            assert_eq!(h["focus"][0]["reference"], "urn:uuid:n1");
            assert_eq!(m["entry"][1]["fullUrl"], "urn:uuid:n1");
            assert_eq!(m["entry"][1]["resource"], n);
        }
    }
}
