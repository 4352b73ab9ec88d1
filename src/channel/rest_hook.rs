//! rest-hook: an HTTP POST of the notification Bundle to the subscriber's endpoint.

use super::{Channel, Outgoing, SendError};

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

impl Channel for RestHook {
    async fn send(&self, out: Outgoing<'_>) -> Result<(), SendError> {
        let mut req = self
            .client
            .post(out.endpoint)
            .timeout(out.timeout)
            .header(reqwest::header::CONTENT_TYPE, out.content_type)
            .body(out.body);
        for (k, v) in out.headers {
            req = req.header(k.as_str(), v.as_str());
        }
        match req.send().await {
            Ok(resp) if resp.status().is_success() => Ok(()),
            Ok(resp) => Err(SendError::Status(resp.status().as_u16())),
            Err(e) if e.is_timeout() => Err(SendError::Timeout(out.timeout)),
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
