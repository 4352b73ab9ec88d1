//! OAuth2 client credentials toward endpoints (RFC 6749 §4.4): a client secret sent as HTTP
//! Basic, or a signed client assertion (RFC 7523 `private_key_jwt`, as SMART Backend
//! Services ask for). The token is cached until shortly before it expires and shared by
//! every send to the prefix; a 401 from the endpoint drops it so the next fetch is fresh.
//!
//! Failures map to the send's error kinds: a token endpoint that cannot be reached or
//! answers 5xx/429 is retried like the endpoint itself; one that refuses the client
//! (`invalid_client`, `unauthorized_client`, `invalid_scope`, …) is a permanent refusal whose
//! reason goes to `$status`. Secrets and tokens are never logged or put in an error.

use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::{Deserialize, Serialize};
use std::time::{Duration, Instant};
use tokio::sync::Mutex;

use super::SendError;
use crate::config::EndpointAuthConfig;

/// A token is fetched again when less than this part of its lifetime is left (at most 60 s
/// before it expires), so a send never starts with a token about to lapse.
const RENEW_AT_FRACTION: f64 = 0.2;
const RENEW_AT_MOST: Duration = Duration::from_secs(60);
const ASSERTION_LIFETIME_SECS: i64 = 300;

/// Why the OAuth2 settings cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum OAuthConfigError {
    #[error("endpoint_auth {prefix}: environment variable {env} (client_secret_env) is not set")]
    MissingSecret { prefix: String, env: String },
    #[error("endpoint_auth {prefix}: cannot read private_key_jwt {path}: {why}")]
    Key {
        prefix: String,
        path: String,
        why: String,
    },
}

enum ClientAuth {
    Secret(String),
    Assertion {
        key: EncodingKey,
        alg: Algorithm,
        kid: Option<String>,
    },
}

struct Token {
    value: String,
    renew_at: Instant,
}

pub(crate) struct OAuth {
    token_url: String,
    client_id: String,
    scope: Option<String>,
    auth: ClientAuth,
    http: reqwest::Client,
    cached: Mutex<Option<Token>>,
}

#[derive(Serialize)]
struct Assertion<'a> {
    iss: &'a str,
    sub: &'a str,
    aud: &'a str,
    exp: i64,
    iat: i64,
    jti: String,
}

#[derive(Deserialize)]
struct TokenAnswer {
    access_token: String,
    #[serde(default)]
    expires_in: Option<u64>,
}

#[derive(Deserialize, Default)]
struct TokenError {
    #[serde(default)]
    error: String,
    #[serde(default)]
    error_description: Option<String>,
}

impl OAuth {
    /// `http`: the client for the token endpoint (the prefix's CA applies to it too).
    pub(crate) fn from_config(
        e: &EndpointAuthConfig,
        http: reqwest::Client,
    ) -> Result<Self, OAuthConfigError> {
        let auth = match (&e.client_secret_env, &e.private_key_jwt) {
            (Some(env), _) => {
                let secret = std::env::var(env).map_err(|_| OAuthConfigError::MissingSecret {
                    prefix: e.prefix.clone(),
                    env: env.clone(),
                })?;
                ClientAuth::Secret(secret)
            }
            (None, Some(path)) => assertion_key(e, path)?,
            (None, None) => unreachable_config(e)?,
        };
        Ok(OAuth {
            token_url: e.token_url.clone().unwrap_or_default(),
            client_id: e.client_id.clone().unwrap_or_default(),
            scope: e.scope.clone(),
            auth,
            http,
            cached: Mutex::new(None),
        })
    }

    /// A valid token: the cached one, or a new one.
    pub(crate) async fn token(&self) -> Result<String, SendError> {
        let mut cached = self.cached.lock().await;
        if let Some(t) = cached.as_ref().filter(|t| Instant::now() < t.renew_at) {
            return Ok(t.value.clone());
        }
        let t = self.fetch().await?;
        let value = t.value.clone();
        *cached = Some(t);
        Ok(value)
    }

    /// The endpoint refused `stale` (401): forget it unless another send already replaced
    /// it, and return a valid token.
    pub(crate) async fn refresh(&self, stale: &str) -> Result<String, SendError> {
        {
            let mut cached = self.cached.lock().await;
            if cached.as_ref().is_some_and(|t| t.value == stale) {
                *cached = None;
            }
        }
        self.token().await
    }

    async fn fetch(&self) -> Result<Token, SendError> {
        let mut form: Vec<(&str, String)> = vec![("grant_type", "client_credentials".into())];
        if let Some(s) = &self.scope {
            form.push(("scope", s.clone()));
        }
        let mut req = self.http.post(&self.token_url);
        match &self.auth {
            ClientAuth::Secret(secret) => {
                let basic = base64::engine::general_purpose::STANDARD.encode(format!(
                    "{}:{}",
                    form_encode(&self.client_id),
                    form_encode(secret)
                ));
                req = req.header(reqwest::header::AUTHORIZATION, format!("Basic {basic}"));
            }
            ClientAuth::Assertion { key, alg, kid } => {
                form.push(("client_id", self.client_id.clone()));
                form.push((
                    "client_assertion_type",
                    "urn:ietf:params:oauth:client-assertion-type:jwt-bearer".into(),
                ));
                form.push(("client_assertion", self.assertion(key, *alg, kid)?));
            }
        }
        let body = url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs(form.iter().map(|(k, v)| (*k, v.as_str())))
            .finish();
        let started = Instant::now();
        let resp = req
            .header(
                reqwest::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .header(reqwest::header::ACCEPT, "application/json")
            .body(body)
            .send()
            .await
            .map_err(|e| SendError::Connect(format!("token endpoint: {}", e.without_url())))?;
        let status = resp.status();
        if status.is_success() {
            let answer: TokenAnswer = resp.json().await.map_err(|e| {
                SendError::Other(format!(
                    "token endpoint answered without a token: {}",
                    e.without_url()
                ))
            })?;
            let lifetime = Duration::from_secs(answer.expires_in.unwrap_or(300));
            let early = lifetime.mul_f64(RENEW_AT_FRACTION).min(RENEW_AT_MOST);
            return Ok(Token {
                value: answer.access_token,
                renew_at: started + lifetime - early,
            });
        }
        let code = status.as_u16();
        let err: TokenError = resp.json().await.unwrap_or_default();
        let why = match &err.error_description {
            Some(d) => format!("{} ({d})", err.error),
            None => err.error.clone(),
        };
        if status.is_server_error() || code == 429 || code == 408 {
            return Err(SendError::Connect(format!(
                "token endpoint answered HTTP {code} {why}"
            )));
        }
        Err(SendError::Refused(format!(
            "the token endpoint refused the client (HTTP {code}): {why}"
        )))
    }

    fn assertion(
        &self,
        key: &EncodingKey,
        alg: Algorithm,
        kid: &Option<String>,
    ) -> Result<String, SendError> {
        let now = chrono::Utc::now().timestamp();
        let claims = Assertion {
            iss: &self.client_id,
            sub: &self.client_id,
            aud: &self.token_url,
            exp: now + ASSERTION_LIFETIME_SECS,
            iat: now,
            jti: uuid::Uuid::new_v4().to_string(),
        };
        let mut header = Header::new(alg);
        header.kid = kid.clone();
        jsonwebtoken::encode(&header, &claims, key)
            .map_err(|e| SendError::Refused(format!("cannot sign the client assertion: {e}")))
    }
}

/// RFC 6749 §2.3.1: the id and secret are form-encoded before they are joined.
fn form_encode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

fn assertion_key(
    e: &EndpointAuthConfig,
    path: &std::path::Path,
) -> Result<ClientAuth, OAuthConfigError> {
    let bad = |why: String| OAuthConfigError::Key {
        prefix: e.prefix.clone(),
        path: path.display().to_string(),
        why,
    };
    let pem = std::fs::read(path).map_err(|err| bad(err.to_string()))?;
    let (key, default_alg) = match EncodingKey::from_rsa_pem(&pem) {
        Ok(k) => (k, Algorithm::RS384),
        Err(_) => (
            EncodingKey::from_ec_pem(&pem)
                .map_err(|err| bad(format!("neither an RSA nor an EC private key: {err}")))?,
            Algorithm::ES384,
        ),
    };
    let alg = match e.private_key_alg.as_deref() {
        Some("RS384") => Algorithm::RS384,
        Some("ES384") => Algorithm::ES384,
        _ => default_alg,
    };
    Ok(ClientAuth::Assertion {
        key,
        alg,
        kid: e.private_key_id.clone(),
    })
}

/// Config validation makes an oauth2 entry name a secret or a key.
fn unreachable_config(e: &EndpointAuthConfig) -> Result<ClientAuth, OAuthConfigError> {
    Err(OAuthConfigError::MissingSecret {
        prefix: e.prefix.clone(),
        env: "client_secret_env".into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_credentials_are_form_encoded_before_basic() {
        assert_eq!(form_encode("fhir cdc:1"), "fhir+cdc%3A1");
        assert_eq!(form_encode("plain"), "plain");
    }
}
