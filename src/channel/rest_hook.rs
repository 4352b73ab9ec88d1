//! rest-hook: an HTTP POST of the notification Bundle to the subscriber's endpoint.
//!
//! The private-network rule is enforced here, at send time, on the addresses a connection
//! actually goes to: a name checked when the subscription was created may resolve to a
//! private address later (DNS rebinding), and the literal forms of such addresses are many
//! (IPv4-mapped IPv6, link-local).

use async_trait::async_trait;
use chrono::Utc;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use super::http1::{Http1, Post};
use super::oauth::{OAuth, OAuthConfigError};
use super::private::{is_private_ip, PrivateAddress};
use super::{Accepted, Channel, Destination, Notification, SendError};
use crate::config::{EndpointAuthConfig, EndpointAuthKind};
use crate::fhir::subscription::ChannelType;

#[derive(Clone)]
pub(crate) struct RestHook {
    client: reqwest::Client,
    /// The lean client most sends go through; `None` when a proxy is configured in the
    /// environment (reqwest honours it).
    lean: Option<Arc<Http1>>,
    allow_private: bool,
    routes: Arc<Routes>,
}

/// `[[delivery.endpoint_auth]]`, longest prefix first: a client with a certificate (mTLS)
/// and a token source (OAuth2) per prefix.
#[derive(Default)]
struct Routes {
    mtls: Vec<(String, reqwest::Client)>,
    oauth: Vec<(String, Arc<OAuth>)>,
}

impl Routes {
    fn client_for(&self, endpoint: &str) -> Option<&reqwest::Client> {
        longest(&self.mtls, endpoint)
    }

    fn oauth_for(&self, endpoint: &str) -> Option<&Arc<OAuth>> {
        longest(&self.oauth, endpoint)
    }
}

fn longest<'a, T>(list: &'a [(String, T)], endpoint: &str) -> Option<&'a T> {
    list.iter()
        .filter(|(p, _)| endpoint.starts_with(p.as_str()))
        .max_by_key(|(p, _)| p.len())
        .map(|(_, t)| t)
}

/// Why `[[delivery.endpoint_auth]]` cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum EndpointAuthError {
    #[error("endpoint_auth {prefix}: cannot read {path}: {why}")]
    File {
        prefix: String,
        path: String,
        why: String,
    },
    #[error("endpoint_auth {prefix}: {why}")]
    Tls { prefix: String, why: String },
    #[error(transparent)]
    OAuth(#[from] OAuthConfigError),
}

impl RestHook {
    /// `allow_private`: `[delivery] allow_private_endpoints`. `concurrency`: how many sends
    /// may be under way at once (`[delivery] workers`); as many connections to one host are
    /// kept open between sends. Fewer made every send beyond them open and close a TCP (and
    /// TLS) connection of its own: with 100 subscriptions on one receiver that was most of
    /// the fan-out's cost.
    pub(crate) fn new(allow_private: bool, concurrency: usize) -> Self {
        let client = builder(allow_private, concurrency)
            .build()
            .expect("static HTTP client configuration");
        let lean = match proxy_in_environment() {
            Some(var) => {
                tracing::info!(%var, "a proxy is set in the environment: rest-hook sends go through reqwest, which uses it");
                None
            }
            None => Some(Arc::new(Http1::new(allow_private, concurrency.max(8)))),
        };
        RestHook {
            client,
            lean,
            allow_private,
            routes: Arc::default(),
        }
    }

    /// The same, with OAuth2 and mutual TLS toward the endpoints the entries name.
    pub(crate) fn with_endpoint_auth(
        allow_private: bool,
        concurrency: usize,
        entries: &[EndpointAuthConfig],
    ) -> Result<Self, EndpointAuthError> {
        let mut hook = Self::new(allow_private, concurrency);
        let mut routes = Routes::default();
        for e in entries {
            match e.kind {
                EndpointAuthKind::Mtls => {
                    let b = with_ca(builder(allow_private, concurrency), e)?;
                    let b = b.identity(identity(e)?);
                    let client = b.build().map_err(|err| tls_error(e, err))?;
                    routes.mtls.push((e.prefix.clone(), client));
                }
                EndpointAuthKind::Oauth2 => {
                    // The token endpoint is the operator's: no private-address rule.
                    let b = with_ca(builder(true, 4), e)?;
                    let http = b.build().map_err(|err| tls_error(e, err))?;
                    routes
                        .oauth
                        .push((e.prefix.clone(), Arc::new(OAuth::from_config(e, http)?)));
                }
            }
        }
        hook.routes = Arc::new(routes);
        Ok(hook)
    }

    /// POSTs `body` to `to`; shared with the message channel. With OAuth2 for the endpoint,
    /// a 401 fetches a new token and tries once more before the send counts as failed.
    pub(crate) async fn post(
        &self,
        body: bytes::Bytes,
        to: &Destination,
    ) -> Result<Accepted, SendError> {
        let via = self.via(&to.endpoint)?;
        if !self.allow_private {
            via.refuse_private_literal(&to.endpoint)?;
        }
        let Some(oauth) = self.routes.oauth_for(&to.endpoint) else {
            return via.send(&body, to, None).await;
        };
        let token = oauth.token().await?;
        match via.send(&body, to, Some(&token)).await {
            Err(SendError::Status(401, _)) => {
                let fresh = oauth.refresh(&token).await?;
                via.send(&body, to, Some(&fresh)).await
            }
            other => other,
        }
    }

    /// The client for `endpoint`: its route's client certificate needs reqwest, and so do a
    /// proxy and credentials in the URL; everything else goes through the lean client.
    fn via(&self, endpoint: &str) -> Result<Via<'_>, SendError> {
        if let Some(client) = self.routes.client_for(endpoint) {
            return Ok(Via::Reqwest(client));
        }
        if let Some(lean) = &self.lean {
            if let Some(target) = lean.target(endpoint)? {
                return Ok(Via::Lean(lean, target));
            }
        }
        Ok(Via::Reqwest(&self.client))
    }
}

/// The first proxy variable reqwest would use, if any is set.
fn proxy_in_environment() -> Option<&'static str> {
    [
        "HTTP_PROXY",
        "http_proxy",
        "HTTPS_PROXY",
        "https_proxy",
        "ALL_PROXY",
        "all_proxy",
    ]
    .into_iter()
    .find(|v| std::env::var_os(v).is_some_and(|x| !x.is_empty()))
}

/// The client one send goes through.
enum Via<'a> {
    Lean(&'a Http1, Arc<super::http1::Target>),
    Reqwest(&'a reqwest::Client),
}

impl Via<'_> {
    /// A literal IP host bypasses the resolver, so it is checked here; the lean client
    /// parsed the endpoint once and kept its literal.
    fn refuse_private_literal(&self, endpoint: &str) -> Result<(), SendError> {
        let ip = match self {
            Via::Lean(_, target) => target.literal(),
            Via::Reqwest(_) => literal_host(endpoint)?,
        };
        match ip {
            Some(ip) if is_private_ip(ip) => Err(SendError::Refused(
                PrivateAddress(ip.to_string()).to_string(),
            )),
            _ => Ok(()),
        }
    }

    async fn send(
        &self,
        body: &bytes::Bytes,
        to: &Destination,
        token: Option<&str>,
    ) -> Result<Accepted, SendError> {
        match self {
            Via::Reqwest(client) => send_once(client, body, to, token).await,
            Via::Lean(http, target) => send_lean(http, target, body, to, token).await,
        }
    }
}

/// The headers beyond the subscription's own, when there are any: the signature, and the
/// OAuth2 token, which replaces any `Authorization` the subscription's headers set.
fn lean_headers(
    to: &Destination,
    body: &[u8],
    token: Option<&str>,
) -> Option<Vec<(String, String)>> {
    if to.signing_secret.is_none() && token.is_none() {
        return None;
    }
    let mut h = Vec::with_capacity(to.headers.len() + 4);
    if let Some(secret) = &to.signing_secret {
        for (name, value) in super::signing::headers(secret, body, Utc::now().timestamp()) {
            h.push((name.to_string(), value));
        }
    }
    let own = to
        .headers
        .iter()
        .filter(|(k, _)| token.is_none() || !k.eq_ignore_ascii_case("authorization"));
    h.extend(own.cloned());
    if let Some(t) = token {
        h.push(("Authorization".into(), format!("Bearer {t}")));
    }
    Some(h)
}

/// One POST through the lean client; the same headers as [`send_once`] writes.
async fn send_lean(
    http: &Http1,
    target: &super::http1::Target,
    body: &bytes::Bytes,
    to: &Destination,
    token: Option<&str>,
) -> Result<Accepted, SendError> {
    let extra = lean_headers(to, body, token);
    let post = Post {
        target,
        content_type: &to.content_type,
        headers: extra.as_deref().unwrap_or(&to.headers),
        body,
    };
    let answer = tokio::time::timeout(to.timeout, http.post(&post))
        .await
        .map_err(|_| SendError::Timeout(to.timeout))??;
    if (200..300).contains(&answer.status) {
        return Ok(Accepted {
            status: Some(answer.status),
        });
    }
    let wait = answer.retry_after.as_deref().and_then(retry_after_value);
    Err(SendError::Status(answer.status, wait))
}

fn builder(allow_private: bool, concurrency: usize) -> reqwest::ClientBuilder {
    let mut b = reqwest::Client::builder()
        .user_agent(concat!("fhir-cdc/", env!("CARGO_PKG_VERSION")))
        // Redirects could lead a notification somewhere the subscription did not name.
        .redirect(reqwest::redirect::Policy::none())
        .pool_max_idle_per_host(concurrency.max(8));
    if !allow_private {
        b = b.dns_resolver(Arc::new(PublicOnly));
    }
    b
}

fn read(e: &EndpointAuthConfig, path: &std::path::Path) -> Result<Vec<u8>, EndpointAuthError> {
    std::fs::read(path).map_err(|err| EndpointAuthError::File {
        prefix: e.prefix.clone(),
        path: path.display().to_string(),
        why: err.to_string(),
    })
}

fn tls_error(e: &EndpointAuthConfig, err: impl std::fmt::Display) -> EndpointAuthError {
    EndpointAuthError::Tls {
        prefix: e.prefix.clone(),
        why: err.to_string(),
    }
}

/// The entry's CA, instead of the system's roots.
fn with_ca(
    b: reqwest::ClientBuilder,
    e: &EndpointAuthConfig,
) -> Result<reqwest::ClientBuilder, EndpointAuthError> {
    let Some(path) = &e.ca_file else {
        return Ok(b);
    };
    let certs = reqwest::Certificate::from_pem_bundle(&read(e, path)?)
        .map_err(|err| tls_error(e, format!("ca_file: {err}")))?;
    Ok(b.tls_certs_only(certs))
}

/// The client certificate chain and key, as one PEM.
fn identity(e: &EndpointAuthConfig) -> Result<reqwest::Identity, EndpointAuthError> {
    let (Some(cert), Some(key)) = (&e.cert_file, &e.key_file) else {
        return Err(tls_error(e, "mtls needs cert_file and key_file"));
    };
    let mut pem = read(e, cert)?;
    pem.push(b'\n');
    pem.extend(read(e, key)?);
    reqwest::Identity::from_pem(&pem)
        .map_err(|err| tls_error(e, format!("cert_file/key_file: {err}")))
}

/// One POST; the OAuth2 token, when there is one, replaces any `Authorization` the
/// subscription's own headers set.
async fn send_once(
    client: &reqwest::Client,
    body: &bytes::Bytes,
    to: &Destination,
    token: Option<&str>,
) -> Result<Accepted, SendError> {
    let mut req = client
        .post(&to.endpoint)
        .timeout(to.timeout)
        .header(reqwest::header::CONTENT_TYPE, to.content_type.as_str());
    if let Some(secret) = &to.signing_secret {
        for (name, value) in super::signing::headers(secret, body, Utc::now().timestamp()) {
            req = req.header(name, value);
        }
    }
    req = req.body(body.clone());
    for (k, v) in &to.headers {
        req = req.header(k.as_str(), v.as_str());
    }
    let mut request = req
        .build()
        .map_err(|e| SendError::Refused(e.without_url().to_string()))?;
    if let Some(t) = token {
        let v = reqwest::header::HeaderValue::from_str(&format!("Bearer {t}"))
            .map_err(|_| SendError::Other("the token endpoint gave an unusable token".into()))?;
        request
            .headers_mut()
            .insert(reqwest::header::AUTHORIZATION, v);
    }
    match client.execute(request).await {
        Ok(resp) if resp.status().is_success() => Ok(Accepted {
            status: Some(resp.status().as_u16()),
        }),
        Ok(resp) => Err(SendError::Status(
            resp.status().as_u16(),
            retry_after(resp.headers()),
        )),
        Err(e) if e.is_timeout() => Err(SendError::Timeout(to.timeout)),
        Err(e) => Err(connect_error(e)),
    }
}

#[async_trait]
impl Channel for RestHook {
    fn channel_type(&self) -> ChannelType {
        ChannelType::RestHook
    }

    async fn send(&self, n: &Notification, to: &Destination) -> Result<Accepted, SendError> {
        self.post(n.body.clone(), to).await
    }
}

/// Resolves names as the system does and keeps only public addresses; a name with none
/// fails the connection.
struct PublicOnly;

impl Resolve for PublicOnly {
    fn resolve(&self, name: Name) -> Resolving {
        Box::pin(async move {
            let host = name.as_str().to_string();
            let all: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let public: Vec<SocketAddr> =
                all.into_iter().filter(|a| !is_private_ip(a.ip())).collect();
            if public.is_empty() {
                return Err(
                    Box::new(PrivateAddress(host)) as Box<dyn std::error::Error + Send + Sync>
                );
            }
            Ok(Box::new(public.into_iter()) as Addrs)
        })
    }
}

/// The endpoint's host when it is an IP literal.
fn literal_host(endpoint: &str) -> Result<Option<IpAddr>, SendError> {
    let url = url::Url::parse(endpoint).map_err(|e| SendError::Refused(e.to_string()))?;
    Ok(super::http1::literal(&url))
}

/// A connection error; the private-address refusal is told apart because retrying it is
/// pointless.
fn connect_error(e: reqwest::Error) -> SendError {
    let mut cur: &(dyn std::error::Error + 'static) = &e;
    loop {
        if let Some(p) = cur.downcast_ref::<PrivateAddress>() {
            return SendError::Refused(p.to_string());
        }
        match cur.source() {
            Some(next) => cur = next,
            None => break,
        }
    }
    if e.is_connect() {
        SendError::Connect(cur.to_string())
    } else {
        SendError::Other(e.without_url().to_string())
    }
}

/// `Retry-After` as a delay: delta-seconds or an HTTP date.
fn retry_after(h: &reqwest::header::HeaderMap) -> Option<Duration> {
    retry_after_value(h.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?)
}

fn retry_after_value(v: &str) -> Option<Duration> {
    let v = v.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = chrono::DateTime::parse_from_rfc2822(v).ok()?;
    Some(
        (at.with_timezone(&Utc) - Utc::now())
            .to_std()
            .unwrap_or(Duration::ZERO),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::{HeaderMap, HeaderValue, RETRY_AFTER};

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        let mut h = HeaderMap::new();
        assert_eq!(retry_after(&h), None);
        h.insert(RETRY_AFTER, HeaderValue::from_static("120"));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(120)));
        let later = (Utc::now() + chrono::Duration::seconds(60)).to_rfc2822();
        h.insert(RETRY_AFTER, HeaderValue::from_str(&later).unwrap());
        let d = retry_after(&h).unwrap();
        assert!(
            d > Duration::from_secs(55) && d <= Duration::from_secs(60),
            "{d:?}"
        );
        h.insert(
            RETRY_AFTER,
            HeaderValue::from_static("Sun, 06 Nov 1994 08:49:37 GMT"),
        );
        assert_eq!(retry_after(&h), Some(Duration::ZERO), "a past date: now");
        h.insert(RETRY_AFTER, HeaderValue::from_static("soon"));
        assert_eq!(retry_after(&h), None);
    }

    #[test]
    fn literal_private_addresses_in_every_form_are_refused() {
        let client = reqwest::Client::new();
        let lean = Http1::new(false, 8);
        let refused = |u: &str| {
            let target = lean.target(u).unwrap().unwrap();
            let both = [
                Via::Reqwest(&client).refuse_private_literal(u),
                Via::Lean(&lean, target).refuse_private_literal(u),
            ];
            both.map(|r| matches!(r, Err(SendError::Refused(_))))
        };
        for u in [
            "http://127.0.0.1:9/x",
            "http://10.1.2.3/x",
            "http://169.254.169.254/latest/meta-data",
            "http://[::1]/x",
            "http://[::ffff:127.0.0.1]/x",
            "http://[::ffff:10.0.0.1]/x",
            "http://[fe80::1]/x",
            "http://[fd00::1]/x",
            "http://0.0.0.0/x",
        ] {
            assert_eq!(refused(u), [true, true], "{u}");
        }
        assert_eq!(refused("https://93.184.216.34/x"), [false, false]);
        assert_eq!(refused("https://example.org/x"), [false, false]);
    }

    #[tokio::test]
    async fn a_name_that_resolves_to_loopback_is_not_connected_to() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = tokio::spawn(async move {
            tokio::time::timeout(Duration::from_secs(2), listener.accept())
                .await
                .is_ok()
        });
        let to = Destination {
            endpoint: format!("http://localhost:{port}/hook"),
            headers: vec![],
            content_type: "application/fhir+json".into(),
            timeout: Duration::from_secs(2),
            signing_secret: None,
        };
        let e = RestHook::new(false, 8)
            .post(bytes::Bytes::from_static(b"{}"), &to)
            .await
            .unwrap_err();
        assert!(matches!(e, SendError::Refused(_)), "{e}");
        assert!(e.to_string().contains("resolves only to loopback"), "{e}");
        assert!(
            !accepted.await.unwrap(),
            "no connection reached the listener"
        );
        // The same endpoint with private endpoints allowed does connect.
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap();
        let accepted = tokio::spawn(async move { listener.accept().await.is_ok() });
        let to = Destination {
            timeout: Duration::from_millis(300),
            ..to
        };
        let _ = RestHook::new(true, 8)
            .post(bytes::Bytes::from_static(b"{}"), &to)
            .await;
        assert!(accepted.await.unwrap());
    }
}
