//! `[[delivery.endpoint_auth]]`: how fhir-cdc proves who it is to receivers whose URL starts
//! with a prefix: OAuth2 client credentials (a client secret, or `private_key_jwt` as SMART
//! Backend Services use it) and mutual TLS. The operator configures these, not the
//! subscriber: the credential is the hospital's, and a Subscription cannot name it.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

use super::ConfigError;

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum EndpointAuthKind {
    Oauth2,
    Mtls,
}

/// One `[[delivery.endpoint_auth]]` entry as written.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EndpointAuthConfig {
    /// Endpoints whose URL starts with this (`https://engine.example.org/`). The longest
    /// matching prefix of each kind applies.
    pub prefix: String,
    pub kind: EndpointAuthKind,
    /// oauth2: the token endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    /// oauth2: the environment variable holding the client secret (client_secret_basic).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_secret_env: Option<String>,
    /// oauth2: … or a PEM private key that signs a client assertion (private_key_jwt).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private_key_jwt: Option<PathBuf>,
    /// The assertion's algorithm: RS384 (default for an RSA key) or ES384 (EC P-384 key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private_key_alg: Option<String>,
    /// The assertion's `kid` header, when the token server needs it to pick the key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private_key_id: Option<String>,
    /// oauth2: the scope asked for (`system/*.write`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    /// mtls: the client certificate chain (PEM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<PathBuf>,
    /// mtls: the client key (PEM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
    /// A CA (PEM) to verify with instead of the system's roots: the endpoints' certificates
    /// for an mtls entry, the token endpoint's for an oauth2 entry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
}

fn invalid(i: usize, msg: impl std::fmt::Display) -> ConfigError {
    ConfigError::Invalid(format!("delivery.endpoint_auth[{i}]: {msg}"))
}

impl EndpointAuthConfig {
    fn check(&self, i: usize) -> Result<(), ConfigError> {
        let url = url::Url::parse(&self.prefix)
            .map_err(|e| invalid(i, format!("prefix {:?} is not a URL: {e}", self.prefix)))?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            return Err(invalid(i, "prefix must be an http(s) URL with a host"));
        }
        let has = |o: &Option<String>| o.as_deref().is_some_and(|s| !s.is_empty());
        match self.kind {
            EndpointAuthKind::Oauth2 => {
                if !has(&self.token_url) || !has(&self.client_id) {
                    return Err(invalid(i, "oauth2 needs token_url and client_id"));
                }
                if has(&self.client_secret_env) == self.private_key_jwt.is_some() {
                    return Err(invalid(
                        i,
                        "oauth2 needs exactly one of client_secret_env or private_key_jwt",
                    ));
                }
                if let Some(alg) = &self.private_key_alg {
                    if !matches!(alg.as_str(), "RS384" | "ES384") {
                        return Err(invalid(i, "private_key_alg is RS384 or ES384"));
                    }
                }
                if self.cert_file.is_some() || self.key_file.is_some() {
                    return Err(invalid(
                        i,
                        "cert_file/key_file belong to a kind = \"mtls\" entry (both may share a prefix)",
                    ));
                }
            }
            EndpointAuthKind::Mtls => {
                if self.cert_file.is_none() || self.key_file.is_none() {
                    return Err(invalid(i, "mtls needs cert_file and key_file"));
                }
                if self.token_url.is_some()
                    || self.client_id.is_some()
                    || self.client_secret_env.is_some()
                    || self.private_key_jwt.is_some()
                {
                    return Err(invalid(
                        i,
                        "token_url/client_id/client_secret_env/private_key_jwt belong to a kind = \"oauth2\" entry",
                    ));
                }
            }
        }
        Ok(())
    }

    fn resolve_paths(&mut self, base: &Path) {
        for p in [
            &mut self.private_key_jwt,
            &mut self.cert_file,
            &mut self.key_file,
            &mut self.ca_file,
        ]
        .into_iter()
        .flatten()
        {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
    }
}

/// Checks every entry (and that a prefix has at most one of each kind) and resolves their
/// paths against the config file's directory.
pub(super) fn check_all(
    entries: &mut [EndpointAuthConfig],
    base: &Path,
) -> Result<(), ConfigError> {
    for (i, e) in entries.iter().enumerate() {
        e.check(i)?;
        if entries[..i]
            .iter()
            .any(|o| o.prefix == e.prefix && o.kind == e.kind)
        {
            return Err(invalid(
                i,
                format!("a second {:?} entry for prefix {}", e.kind, e.prefix),
            ));
        }
    }
    for e in entries {
        e.resolve_paths(base);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(toml_text: &str) -> Result<Vec<EndpointAuthConfig>, ConfigError> {
        #[derive(Deserialize)]
        struct F {
            endpoint_auth: Vec<EndpointAuthConfig>,
        }
        let mut f: F =
            toml::from_str(toml_text).map_err(|e| ConfigError::Invalid(e.to_string()))?;
        check_all(&mut f.endpoint_auth, Path::new("/etc/fhir-cdc"))?;
        Ok(f.endpoint_auth)
    }

    #[test]
    fn oauth2_and_mtls_may_share_a_prefix_and_paths_resolve() {
        let e = parse(
            r#"
            [[endpoint_auth]]
            prefix = "https://engine.example.org/"
            kind = "oauth2"
            token_url = "https://auth.example.org/token"
            client_id = "fhir-cdc"
            private_key_jwt = "key.pem"
            scope = "system/*.write"
            [[endpoint_auth]]
            prefix = "https://engine.example.org/"
            kind = "mtls"
            cert_file = "client.pem"
            key_file = "/abs/client-key.pem"
            "#,
        )
        .unwrap();
        assert_eq!(
            e[0].private_key_jwt.as_deref(),
            Some(Path::new("/etc/fhir-cdc/key.pem"))
        );
        assert_eq!(
            e[1].key_file.as_deref(),
            Some(Path::new("/abs/client-key.pem"))
        );
    }

    #[test]
    fn incomplete_or_mixed_entries_are_refused_with_the_reason() {
        let cases = [
            (
                r#"prefix = "https://x/"
                   kind = "oauth2"
                   client_id = "a"
                   client_secret_env = "S""#,
                "token_url and client_id",
            ),
            (
                r#"prefix = "https://x/"
                   kind = "oauth2"
                   token_url = "https://a/t"
                   client_id = "a""#,
                "exactly one of",
            ),
            (
                r#"prefix = "https://x/"
                   kind = "mtls"
                   cert_file = "c.pem""#,
                "cert_file and key_file",
            ),
            (
                r#"prefix = "engine.example.org"
                   kind = "mtls"
                   cert_file = "c.pem"
                   key_file = "k.pem""#,
                "not a URL",
            ),
            (
                r#"prefix = "https://x/"
                   kind = "oauth2"
                   token_url = "https://a/t"
                   client_id = "a"
                   client_secret_env = "S"
                   private_key_alg = "HS256""#,
                "RS384 or ES384",
            ),
        ];
        for (entry, why) in cases {
            let err = parse(&format!("[[endpoint_auth]]\n{entry}"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(why), "{entry}: {err}");
        }
        let twice = r#"
            [[endpoint_auth]]
            prefix = "https://x/"
            kind = "mtls"
            cert_file = "c.pem"
            key_file = "k.pem"
            [[endpoint_auth]]
            prefix = "https://x/"
            kind = "mtls"
            cert_file = "d.pem"
            key_file = "e.pem"
        "#;
        assert!(parse(twice).unwrap_err().to_string().contains("a second"));
    }
}
