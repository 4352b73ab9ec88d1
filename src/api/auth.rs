//! Who may use the API. Bearer JWTs as SMART Backend Services issue them (issuer, audience,
//! RS256/ES256 keys from a JWKS fetched and cached, fetched again on an unknown `kid`;
//! `exp`/`nbf` with leeway), and static tokens from environment variables. SMART scopes,
//! v1 (`system/Subscription.read`) and v2 (`system/Subscription.rs`), decide access.
//! Signature checking is `jsonwebtoken`'s; nothing here is cryptography of our own.

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use subtle::ConstantTimeEq;
use tokio::sync::{Mutex, RwLock};

use super::response::outcome;
use super::Shared;
use crate::config::AuthConfig;

/// Least time between two JWKS fetches caused by unknown key ids.
const REFETCH_EVERY: Duration = Duration::from_secs(10);

/// What a request may do, per resource type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Action {
    Create,
    Read,
    Update,
    Delete,
    Search,
}

impl Action {
    fn letter(self) -> u8 {
        match self {
            Action::Create => b'c',
            Action::Read => b'r',
            Action::Update => b'u',
            Action::Delete => b'd',
            Action::Search => b's',
        }
    }

    /// The SMART v1 word for it.
    fn v1(self) -> &'static str {
        match self {
            Action::Read | Action::Search => "read",
            _ => "write",
        }
    }
}

/// Granted scopes: `(resource type or *, letters of cruds)`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Scopes(Vec<(String, Vec<u8>)>);

impl Scopes {
    /// Everything: the API without `[api.auth]` (loopback only).
    pub(crate) fn all() -> Self {
        Scopes(vec![("*".into(), b"cruds".to_vec())])
    }

    /// `system/Subscription.read system/Observation.rs system/*.cruds`; other contexts
    /// (`user/`, `patient/`) and unknown forms grant nothing.
    pub(crate) fn parse(s: &str) -> Self {
        let grants = s
            .split_whitespace()
            .filter_map(|sc| {
                let rest = sc.strip_prefix("system/")?;
                let (ty, perm) = rest.split_once('.')?;
                let perm = perm.split('?').next().unwrap_or(perm);
                let letters = match perm {
                    "read" => b"rs".to_vec(),
                    "write" => b"cud".to_vec(),
                    "*" => b"cruds".to_vec(),
                    p if !p.is_empty() && p.bytes().all(|b| b"cruds".contains(&b)) => {
                        p.as_bytes().to_vec()
                    }
                    _ => return None,
                };
                Some((ty.to_string(), letters))
            })
            .collect();
        Scopes(grants)
    }

    pub(crate) fn allows(&self, resource: &str, action: Action) -> bool {
        self.0
            .iter()
            .any(|(ty, l)| (ty == "*" || ty == resource) && l.contains(&action.letter()))
    }
}

/// The caller, as the middleware let it in.
#[derive(Debug, Clone)]
pub(crate) struct Principal(pub Scopes);

/// The scope an action needs, as a refusal names it.
pub(crate) fn needed(resource: &str, action: Action) -> String {
    format!(
        "system/{resource}.{} (or system/{resource}.{})",
        action.v1(),
        action.letter() as char
    )
}

enum JwksSource {
    Url(String),
    File(PathBuf),
}

struct Jwt {
    issuer: String,
    audience: String,
    leeway: u64,
    source: JwksSource,
    keys: RwLock<JwkSet>,
    last_fetch: Mutex<Option<Instant>>,
    http: reqwest::Client,
}

pub(crate) struct Auth {
    jwt: Option<Jwt>,
    /// Static token secrets and their scopes.
    tokens: Vec<(Vec<u8>, Scopes)>,
}

#[derive(serde::Deserialize)]
struct Claims {
    #[serde(default)]
    scope: Option<String>,
}

impl Auth {
    /// Reads static tokens from the environment and the JWKS (a URL may be unreachable at
    /// start: it is fetched again when a token needs it).
    pub(crate) async fn from_config(cfg: &AuthConfig) -> anyhow::Result<Self> {
        let mut tokens = Vec::new();
        for t in &cfg.tokens {
            let secret = std::env::var(&t.env).unwrap_or_default();
            anyhow::ensure!(
                secret.len() >= 16,
                "[api.auth] token from environment variable {} is unset or shorter than 16 characters",
                t.env
            );
            tokens.push((secret.into_bytes(), Scopes::parse(&t.scopes)));
        }
        let source = match (&cfg.jwks_url, &cfg.jwks_file) {
            (Some(u), _) => Some(JwksSource::Url(u.clone())),
            (None, Some(f)) => Some(JwksSource::File(f.clone())),
            (None, None) => None,
        };
        let jwt = match (source, &cfg.issuer, &cfg.audience) {
            (Some(source), Some(iss), Some(aud)) => {
                Some(Jwt::load(source, iss, aud, cfg.leeway_secs).await?)
            }
            _ => None,
        };
        Ok(Auth { jwt, tokens })
    }

    /// The scopes a bearer token grants, or why it is refused.
    pub(crate) async fn authenticate(&self, token: &str) -> Result<Scopes, String> {
        for (secret, scopes) in &self.tokens {
            if bool::from(secret.as_slice().ct_eq(token.as_bytes())) {
                return Ok(scopes.clone());
            }
        }
        match &self.jwt {
            Some(jwt) if token.matches('.').count() == 2 => jwt.verify(token).await,
            _ => Err("unknown token".into()),
        }
    }
}

impl Jwt {
    /// A verifier with its key set loaded; a JWKS URL unreachable at start is fetched again
    /// when a token needs it, a JWKS file must read.
    async fn load(source: JwksSource, iss: &str, aud: &str, leeway: u64) -> anyhow::Result<Self> {
        let jwt = Jwt {
            issuer: iss.to_string(),
            audience: aud.to_string(),
            leeway,
            source,
            keys: RwLock::new(JwkSet { keys: Vec::new() }),
            last_fetch: Mutex::new(None),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()?,
        };
        if let Err(e) = jwt.refresh(true).await {
            match jwt.source {
                JwksSource::File(_) => return Err(e),
                JwksSource::Url(_) => {
                    tracing::warn!(error = %e, "JWKS not reachable at start; fetched again when a token needs it")
                }
            }
        }
        Ok(jwt)
    }

    /// Loads the key set. `force` (at start) is not rate-limited; fetches for unknown key
    /// ids are, at most one per [`REFETCH_EVERY`], so a flood of bad tokens cannot make us
    /// hammer the issuer.
    async fn refresh(&self, force: bool) -> anyhow::Result<()> {
        if !force {
            let mut last = self.last_fetch.lock().await;
            if last.is_some_and(|t| t.elapsed() < REFETCH_EVERY) {
                return Ok(());
            }
            *last = Some(Instant::now());
        }
        let set: JwkSet = match &self.source {
            JwksSource::File(p) => serde_json::from_str(&std::fs::read_to_string(p)?)?,
            JwksSource::Url(u) => {
                self.http
                    .get(u)
                    .send()
                    .await?
                    .error_for_status()?
                    .json()
                    .await?
            }
        };
        *self.keys.write().await = set;
        Ok(())
    }

    async fn key(&self, kid: Option<&str>) -> Option<DecodingKey> {
        let keys = self.keys.read().await;
        let jwk = match kid {
            Some(kid) => keys.find(kid),
            None if keys.keys.len() == 1 => keys.keys.first(),
            None => None,
        }?;
        DecodingKey::from_jwk(jwk).ok()
    }

    async fn verify(&self, token: &str) -> Result<Scopes, String> {
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| format!("malformed token: {e}"))?;
        if !matches!(header.alg, Algorithm::RS256 | Algorithm::ES256) {
            return Err(format!(
                "algorithm {:?} is not accepted (RS256, ES256)",
                header.alg
            ));
        }
        let kid = header.kid.as_deref();
        let key = match self.key(kid).await {
            Some(k) => k,
            None => {
                // A key rotated in since the last fetch.
                self.refresh(false)
                    .await
                    .map_err(|e| format!("JWKS unavailable: {e}"))?;
                self.key(kid).await.ok_or("no key for the token's kid")?
            }
        };
        let mut v = Validation::new(header.alg);
        v.set_issuer(&[&self.issuer]);
        v.set_audience(&[&self.audience]);
        v.leeway = self.leeway;
        v.validate_nbf = true;
        v.set_required_spec_claims(&["exp", "iss", "aud"]);
        let data = jsonwebtoken::decode::<Claims>(token, &key, &v)
            .map_err(|e| format!("token refused: {e}"))?;
        Ok(Scopes::parse(data.claims.scope.as_deref().unwrap_or("")))
    }
}

/// What a request needs: `None` for the open endpoints (metadata, health, metrics).
pub(crate) fn required(method: &Method, path: &str) -> Option<(&'static str, Action)> {
    // `/ws`: the binding token is the credential (browsers cannot send headers there).
    if matches!(
        path,
        "/metadata" | "/healthz" | "/livez" | "/readyz" | "/metrics" | "/ws"
    ) {
        return None;
    }
    // The console's page and script carry no data; what it shows comes from
    // `/console/api/*`, guarded as a search of Subscriptions.
    if matches!(
        path,
        "/console" | "/console/console.js" | "/console/console.css"
    ) {
        return None;
    }
    if path.starts_with("/console/") {
        return Some(("Subscription", Action::Search));
    }
    if path.starts_with("/SubscriptionTopic") {
        return Some(("SubscriptionTopic", Action::Read));
    }
    if path.ends_with("/$status")
        || path.ends_with("/$events")
        || path.ends_with("/$get-ws-binding-token")
    {
        return Some(("Subscription", Action::Read));
    }
    let one = path.trim_start_matches("/Subscription").len() > 1;
    Some(match (method, one) {
        (&Method::POST, _) => ("Subscription", Action::Create),
        (&Method::PUT, _) => ("Subscription", Action::Update),
        (&Method::DELETE, _) => ("Subscription", Action::Delete),
        (_, true) => ("Subscription", Action::Read),
        (_, false) => ("Subscription", Action::Search),
    })
}

fn unauthorized(why: &str) -> Response {
    let mut r = outcome(
        StatusCode::UNAUTHORIZED,
        "login",
        &format!("authentication required: {why}"),
        None,
    )
    .into_response();
    let challenge = format!(
        "Bearer realm=\"fhir-cdc\", error=\"invalid_token\", error_description=\"{}\"",
        why.replace('"', "'")
    );
    if let Ok(v) = HeaderValue::from_str(&challenge) {
        r.headers_mut().insert(header::WWW_AUTHENTICATE, v);
    }
    r
}

/// Authenticates and authorises every request before its handler; the handler finds the
/// caller as a [`Principal`] extension.
pub(crate) async fn middleware(State(s): State<Shared>, mut req: Request, next: Next) -> Response {
    let Some(auth) = &s.auth else {
        req.extensions_mut().insert(Principal(Scopes::all()));
        return next.run(req).await;
    };
    let Some((resource, action)) = required(req.method(), req.uri().path()) else {
        return next.run(req).await;
    };
    let bearer = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim)
        .filter(|t| !t.is_empty());
    let Some(token) = bearer else {
        return unauthorized("no bearer token");
    };
    let scopes = match auth.authenticate(token).await {
        Ok(s) => s,
        Err(e) => {
            tracing::info!(error = %e, "API request refused: bad token");
            return unauthorized(&e);
        }
    };
    if !scopes.allows(resource, action) {
        let need = needed(resource, action);
        return outcome(
            StatusCode::FORBIDDEN,
            "forbidden",
            &format!("this needs scope {need}"),
            None,
        )
        .into_response();
    }
    req.extensions_mut().insert(Principal(scopes));
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smart_scopes_v1_and_v2() {
        let s = Scopes::parse(
            "system/Subscription.read system/Encounter.rs user/Observation.read system/Patient.cud",
        );
        assert!(s.allows("Subscription", Action::Read));
        assert!(s.allows("Subscription", Action::Search));
        assert!(!s.allows("Subscription", Action::Create));
        assert!(s.allows("Encounter", Action::Read));
        assert!(
            !s.allows("Observation", Action::Read),
            "user/ context grants nothing here"
        );
        assert!(s.allows("Patient", Action::Delete));
        assert!(!s.allows("Patient", Action::Read));
        let w = Scopes::parse("system/*.write");
        assert!(
            w.allows("Subscription", Action::Update) && !w.allows("Subscription", Action::Read)
        );
        assert!(Scopes::parse("system/Subscription.xyz").0.is_empty());
    }

    #[test]
    fn what_each_route_needs() {
        use Action::*;
        assert_eq!(required(&Method::GET, "/metrics"), None);
        assert_eq!(
            required(&Method::GET, "/console"),
            None,
            "the page has no data"
        );
        assert_eq!(required(&Method::GET, "/console/console.js"), None);
        assert_eq!(
            required(&Method::GET, "/console/api/state"),
            Some(("Subscription", Action::Search))
        );
        assert_eq!(
            required(&Method::GET, "/console/api/attempts/x"),
            Some(("Subscription", Action::Search))
        );
        assert_eq!(
            required(&Method::GET, "/Subscription"),
            Some(("Subscription", Search))
        );
        assert_eq!(
            required(&Method::GET, "/Subscription/x"),
            Some(("Subscription", Read))
        );
        assert_eq!(
            required(&Method::POST, "/Subscription"),
            Some(("Subscription", Create))
        );
        assert_eq!(
            required(&Method::PUT, "/Subscription/x"),
            Some(("Subscription", Update))
        );
        assert_eq!(
            required(&Method::DELETE, "/Subscription/x"),
            Some(("Subscription", Delete))
        );
        assert_eq!(
            required(&Method::POST, "/Subscription/x/$events"),
            Some(("Subscription", Read))
        );
        assert_eq!(
            required(&Method::GET, "/SubscriptionTopic/x"),
            Some(("SubscriptionTopic", Read))
        );
    }
}
