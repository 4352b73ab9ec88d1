//! rest-hook: an HTTP POST of the notification Bundle to the subscriber's endpoint.

use async_trait::async_trait;

use super::{Channel, Destination, Notification, SendError};
use crate::fhir::subscription::ChannelType;

#[derive(Clone)]
pub struct RestHook {
    client: reqwest::Client,
}

impl RestHook {
    pub fn new() -> Self {
        let client = reqwest::Client::builder()
            .user_agent(concat!("fhir-cdc/", env!("CARGO_PKG_VERSION")))
            // Redirects could lead a notification somewhere the subscription did not name.
            .redirect(reqwest::redirect::Policy::none())
            .pool_max_idle_per_host(8)
            .build()
            .expect("static HTTP client configuration");
        RestHook { client }
    }
}

impl Default for RestHook {
    fn default() -> Self {
        Self::new()
    }
}

#[async_trait]
impl Channel for RestHook {
    fn channel_type(&self) -> ChannelType {
        ChannelType::RestHook
    }

    async fn send(&self, n: &Notification, to: &Destination) -> Result<(), SendError> {
        let body = serde_json::to_vec(&n.bundle).map_err(|e| SendError::Encode(e.to_string()))?;
        let mut req = self
            .client
            .post(&to.endpoint)
            .timeout(to.timeout)
            .header(reqwest::header::CONTENT_TYPE, to.content_type.as_str())
            .body(body);
        for (k, v) in &to.headers {
            req = req.header(k.as_str(), v.as_str());
        }
        match req.send().await {
            Ok(resp) if resp.status().is_success() => Ok(()),
            Ok(resp) => Err(SendError::Status(resp.status().as_u16())),
            Err(e) if e.is_timeout() => Err(SendError::Timeout(to.timeout)),
            Err(e) if e.is_connect() => Err(SendError::Connect(root_cause(&e))),
            Err(e) => Err(SendError::Other(e.without_url().to_string())),
        }
    }
}

/// The innermost error text ("Connection refused (os error 111)"), which says more than
/// the wrappers around it.
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}
