//! `[api]` and `[api.auth]`: where the API listens and who may use it.

use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::PathBuf;

use super::ConfigError;

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// The base URL subscribers see in references; default `http://{listen}`.
    pub base_url: Option<String>,
    /// Who may use the API. Without it the API listens on loopback addresses only.
    pub auth: Option<AuthConfig>,
    /// Listen on a non-loopback address without `[api.auth]` (logged loudly at start).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_unauthenticated: bool,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            base_url: None,
            auth: None,
            allow_unauthenticated: false,
        }
    }
}

/// `[api.auth]`: OAuth 2.0 bearer JWTs as SMART Backend Services issue them, and/or static
/// tokens. Scopes (SMART v1 `system/Subscription.read`, v2 `system/Subscription.rs`) decide
/// access.
#[derive(Debug, Clone, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Required `iss` of JWTs.
    pub issuer: Option<String>,
    /// Required `aud` of JWTs.
    pub audience: Option<String>,
    /// JWKS to verify JWTs with, fetched and cached; fetched again for an unknown `kid`.
    pub jwks_url: Option<String>,
    /// … or a JWKS file.
    pub jwks_file: Option<PathBuf>,
    /// Clock leeway for `exp` and `nbf`, seconds (default 30).
    #[serde(default = "default_leeway")]
    pub leeway_secs: u64,
    /// Static tokens; each token's value is read from an environment variable.
    #[serde(default)]
    pub tokens: Vec<StaticToken>,
}

/// A static API token: its secret comes from the environment variable `env`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StaticToken {
    pub env: String,
    /// Space-separated SMART scopes.
    pub scopes: String,
}

impl ApiConfig {
    pub(crate) fn base_url(&self) -> String {
        self.base_url
            .clone()
            .unwrap_or_else(|| format!("http://{}", self.listen))
            .trim_end_matches('/')
            .to_string()
    }
}

/// The API's safe default: no `[api.auth]` means loopback only, unless the operator says
/// otherwise in so many words; an `[api.auth]` must say how tokens are checked.
pub(super) fn check_api(api: &ApiConfig) -> Result<(), ConfigError> {
    match &api.auth {
        None if !api.listen.ip().is_loopback() && !api.allow_unauthenticated => {
            Err(ConfigError::Invalid(format!(
                "api.listen = {} is not a loopback address and [api.auth] is missing: anyone who reaches it could \
                 subscribe to every matching resource (PHI). Configure [api.auth] (JWT issuer/audience/JWKS or \
                 static tokens), listen on 127.0.0.1, or set api.allow_unauthenticated = true",
                api.listen
            )))
        }
        None => Ok(()),
        Some(a) => {
            let jwt = a.jwks_url.is_some() || a.jwks_file.is_some();
            if jwt && (a.issuer.is_none() || a.audience.is_none()) {
                return Err(ConfigError::Invalid(
                    "[api.auth] with a JWKS needs issuer and audience".into(),
                ));
            }
            if !jwt && a.tokens.is_empty() {
                return Err(ConfigError::Invalid(
                    "[api.auth] needs jwks_url or jwks_file (with issuer and audience), or [[api.auth.tokens]]".into(),
                ));
            }
            Ok(())
        }
    }
}

fn default_listen() -> SocketAddr {
    "127.0.0.1:8090".parse().expect("literal")
}
fn default_leeway() -> u64 {
    30
}
