//! Subscribers' secrets at rest: endpoint header values and signing secrets are sealed with
//! AES-256-GCM (the `aes-gcm` crate) under the operator's `[security]` key before they are
//! written to `fhir_cdc.subscription` (the `headers` and `signing_secret` columns, and the
//! same values inside the stored resource), and opened when a send reads them. The
//! subscription id is the associated data, so a sealed value copied to another row does not
//! open. Sealed text is `enc:v1:` + base64(12-byte nonce ‖ ciphertext ‖ tag).
//!
//! The key is installed once per process at start ([`install`]); every write path (API,
//! capture's store subscriptions, configured destinations) seals through it. Without a key
//! values are written as given, and `check` warns.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine;
use rand::RngCore;
use serde_json::Value;
use std::sync::OnceLock;
use tokio_postgres::GenericClient;

use crate::config::SecurityConfig;
use crate::fhir::subscription::secrets::map_secrets;

const PREFIX: &str = "enc:v1:";
const NONCE: usize = 12;

static KEY: OnceLock<Option<Aes256Gcm>> = OnceLock::new();

#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("[security] {0}")]
    Key(String),
    #[error("a sealed secret of subscription {0} does not open with the [security] key (another key, or a changed row)")]
    Open(String),
    #[error("subscriptions hold sealed secrets but no [security] secrets_key_env / secrets_key_file is configured")]
    NoKey,
    #[error(transparent)]
    Db(#[from] tokio_postgres::Error),
}

/// Reads the key `[security]` names: 32 bytes, base64.
pub fn load_key(cfg: &SecurityConfig) -> Result<Option<[u8; 32]>, SealError> {
    let text = match (&cfg.secrets_key_env, &cfg.secrets_key_file) {
        (Some(env), _) => std::env::var(env)
            .map_err(|_| SealError::Key(format!("environment variable {env} is not set")))?,
        (None, Some(path)) => std::fs::read_to_string(path)
            .map_err(|e| SealError::Key(format!("cannot read {}: {e}", path.display())))?,
        (None, None) => return Ok(None),
    };
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .map_err(|e| SealError::Key(format!("the key is not base64: {e}")))?;
    let key: [u8; 32] = bytes.try_into().map_err(|b: Vec<u8>| {
        SealError::Key(format!(
            "the key must be 32 bytes (openssl rand -base64 32), got {}",
            b.len()
        ))
    })?;
    Ok(Some(key))
}

/// Sets this process's key (once; later calls keep the first).
pub fn install(key: Option<[u8; 32]>) {
    let _ = KEY.set(key.map(|k| Aes256Gcm::new(&k.into())));
}

fn key() -> Option<&'static Aes256Gcm> {
    KEY.get().and_then(Option::as_ref)
}

pub(crate) fn is_sealed(s: &str) -> bool {
    s.starts_with(PREFIX)
}

/// Seals `plain` for subscription `id`; unchanged without a key or when already sealed.
pub(crate) fn seal(id: &str, plain: &str) -> String {
    match key() {
        Some(k) if !is_sealed(plain) => seal_with(k, id, plain),
        _ => plain.to_string(),
    }
}

fn seal_with(k: &Aes256Gcm, id: &str, plain: &str) -> String {
    let mut nonce = [0u8; NONCE];
    rand::rng().fill_bytes(&mut nonce);
    let payload = Payload {
        msg: plain.as_bytes(),
        aad: id.as_bytes(),
    };
    // Encryption fails only for messages over 64 GiB.
    let ct = k
        .encrypt(Nonce::from_slice(&nonce), payload)
        .unwrap_or_default();
    let mut out = nonce.to_vec();
    out.extend(ct);
    format!(
        "{PREFIX}{}",
        base64::engine::general_purpose::STANDARD.encode(out)
    )
}

/// Opens a value of subscription `id`; a value that is not sealed is returned as it is.
pub(crate) fn open(id: &str, stored: &str) -> Result<String, SealError> {
    let Some(b64) = stored.strip_prefix(PREFIX) else {
        return Ok(stored.to_string());
    };
    let k = key().ok_or(SealError::NoKey)?;
    let bad = || SealError::Open(id.to_string());
    let raw = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|_| bad())?;
    if raw.len() < NONCE {
        return Err(bad());
    }
    let (nonce, ct) = raw.split_at(NONCE);
    let plain = k
        .decrypt(
            Nonce::from_slice(nonce),
            Payload {
                msg: ct,
                aad: id.as_bytes(),
            },
        )
        .map_err(|_| bad())?;
    String::from_utf8(plain).map_err(|_| bad())
}

/// Seals the header values of a `headers` column value (`[[name, value], …]`).
pub(crate) fn seal_headers(id: &str, headers: &mut Value) {
    for h in headers.as_array_mut().into_iter().flatten() {
        if let Some(v) = h.get_mut(1) {
            if let Some(s) = v.as_str() {
                *v = Value::String(seal(id, s));
            }
        }
    }
}

/// Seals the secrets inside a stored Subscription resource.
pub(crate) fn seal_resource(id: &str, resource: &mut Value) {
    map_secrets(resource, |s| seal(id, s));
}

/// Seals what was written before a key was configured, and proves the key opens what is
/// sealed. Run at delivery start. Without a key, sealed values are an error (sends would
/// carry ciphertext). Returns how many rows it sealed.
pub(crate) async fn seal_existing<C: GenericClient>(c: &C) -> Result<u64, SealError> {
    let rows = c
        .query(
            "SELECT id, headers, signing_secret, resource FROM fhir_cdc.subscription",
            &[],
        )
        .await?;
    let mut sealed = 0;
    for r in rows {
        let id: String = r.get(0);
        let headers: Value = r.get(1);
        let secret: Option<String> = r.get(2);
        let resource: Value = r.get(3);
        let mut values: Vec<String> = headers
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|h| h.get(1)?.as_str().map(str::to_string))
            .collect();
        values.extend(secret.clone());
        for v in values.iter().filter(|v| is_sealed(v)) {
            open(&id, v)?;
        }
        if key().is_none() {
            continue;
        }
        let (mut h2, mut r2) = (headers.clone(), resource.clone());
        seal_headers(&id, &mut h2);
        seal_resource(&id, &mut r2);
        let s2 = secret.as_deref().map(|s| seal(&id, s));
        if h2 != headers || r2 != resource || s2 != secret {
            c.execute(
                "UPDATE fhir_cdc.subscription SET headers = $2, signing_secret = $3, resource = $4
                 WHERE id = $1",
                &[&id, &h2, &s2, &r2],
            )
            .await?;
            sealed += 1;
        }
    }
    Ok(sealed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_values_open_only_for_their_subscription() {
        let k = Aes256Gcm::new(&[7u8; 32].into());
        let s = seal_with(&k, "sub-1", "Bearer SECRET123");
        assert!(is_sealed(&s));
        assert!(!s.contains("SECRET123"));
        assert_ne!(
            s,
            seal_with(&k, "sub-1", "Bearer SECRET123"),
            "a fresh nonce each time"
        );
        install(Some([7u8; 32]));
        assert_eq!(open("sub-1", &s).unwrap(), "Bearer SECRET123");
        assert!(matches!(open("sub-2", &s), Err(SealError::Open(_))));
        assert_eq!(open("sub-1", "plain").unwrap(), "plain");
        let mut tampered = s.clone();
        tampered.replace_range(s.len() - 4..s.len() - 3, "A");
        if tampered != s {
            assert!(open("sub-1", &tampered).is_err());
        }
    }

    #[test]
    fn a_key_is_32_bytes_of_base64() {
        std::env::set_var("FHIR_CDC_SEALED_TEST_KEY", "c2hvcnQ=");
        let cfg = SecurityConfig {
            secrets_key_env: Some("FHIR_CDC_SEALED_TEST_KEY".into()),
            secrets_key_file: None,
        };
        assert!(load_key(&cfg).unwrap_err().to_string().contains("32 bytes"));
        std::env::set_var(
            "FHIR_CDC_SEALED_TEST_KEY",
            base64::engine::general_purpose::STANDARD.encode([1u8; 32]),
        );
        assert_eq!(load_key(&cfg).unwrap(), Some([1u8; 32]));
        assert_eq!(load_key(&SecurityConfig::default()).unwrap(), None);
    }
}
