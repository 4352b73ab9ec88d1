//! Connections to Postgres — store reads, the queue, LISTEN and replication — with the TLS
//! the URL asks for, in libpq's terms: `sslmode=disable|prefer|require|verify-ca|verify-full`
//! and `sslrootcert=<PEM file>`, checked the same way on every connection.
//!
//! tokio-postgres itself knows only disable/prefer/require and rejects `sslrootcert`, so the
//! two parameters are taken out of the URL here and turned into a rustls configuration; the
//! replication connection (pgwire-replication) gets the same settings.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore};
use tokio_postgres_rustls::MakeRustlsConnect;

/// libpq's `sslmode`. The default is `prefer`, as in libpq: TLS when the server offers it,
/// without verifying who it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum SslMode {
    Disable,
    #[default]
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    fn parse(s: &str) -> Result<Self, String> {
        Ok(match s {
            "disable" => SslMode::Disable,
            "prefer" | "allow" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(format!(
                    "sslmode={other} is not one of disable, prefer, require, verify-ca, verify-full"
                ))
            }
        })
    }

    fn verifies(self) -> bool {
        matches!(self, SslMode::VerifyCa | SslMode::VerifyFull)
    }
}

/// A connection URL split into what tokio-postgres parses and the TLS settings.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    /// The URL without `sslmode` / `sslrootcert`.
    pub(crate) url: String,
    pub(crate) mode: SslMode,
    pub(crate) root_cert: Option<PathBuf>,
}

impl Target {
    /// Splits `url` (a `postgresql://` URL or a `key=value` string). Refuses what libpq would
    /// refuse: an unknown mode, a verifying mode without a CA file.
    pub(crate) fn parse(url: &str) -> Result<Target, String> {
        let (rest, params) = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            split_url(url)?
        } else {
            split_key_values(url)
        };
        let mut mode = SslMode::default();
        let mut root_cert = None;
        for (k, v) in params {
            match k.as_str() {
                "sslmode" => mode = SslMode::parse(&v)?,
                _ => root_cert = Some(PathBuf::from(v)),
            }
        }
        if mode.verifies() && root_cert.is_none() {
            root_cert = default_root_cert();
        }
        if mode.verifies() && root_cert.is_none() {
            return Err(format!(
                "sslmode={} needs sslrootcert=<CA PEM file> in the URL (or ~/.postgresql/root.crt)",
                mode_name(mode)
            ));
        }
        if root_cert.as_deref() == Some(Path::new("system")) {
            return Err("sslrootcert=system is not supported: name the CA PEM file".into());
        }
        Ok(Target {
            url: rest,
            mode,
            root_cert,
        })
    }

    /// The tokio-postgres configuration, with the TLS requirement of the mode.
    pub(crate) fn pg_config(&self) -> Result<tokio_postgres::Config, String> {
        let mut c: tokio_postgres::Config =
            self.url.parse().map_err(|e| format!("database URL: {e}"))?;
        c.ssl_mode(match self.mode {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            _ => tokio_postgres::config::SslMode::Require,
        });
        if self.mode == SslMode::VerifyFull {
            for h in c.get_hosts() {
                if let tokio_postgres::config::Host::Tcp(h) = h {
                    if h.parse::<std::net::IpAddr>().is_ok() {
                        return Err(format!("sslmode=verify-full checks the host name in the server certificate, but the URL names the address {h}: use the name the certificate was issued for, or sslmode=verify-ca"));
                    }
                }
            }
        }
        Ok(c)
    }

    /// The rustls connector for tokio-postgres connections.
    pub(crate) fn connector(&self) -> Result<MakeRustlsConnect, String> {
        Ok(MakeRustlsConnect::new(client_config(
            self.mode,
            self.root_cert.as_deref(),
        )?))
    }

    /// The same settings for the replication connection.
    pub(crate) fn replication_tls(&self) -> pgwire_replication::TlsConfig {
        use pgwire_replication::{SslMode as M, TlsConfig};
        install_provider();
        let ca = self.root_cert.clone();
        match self.mode {
            SslMode::Disable => TlsConfig::disabled(),
            SslMode::Prefer => TlsConfig {
                mode: M::Prefer,
                ..TlsConfig::default()
            },
            SslMode::Require => TlsConfig::require(),
            SslMode::VerifyCa => TlsConfig::verify_ca(ca),
            SslMode::VerifyFull => TlsConfig::verify_full(ca),
        }
    }
}

pub(crate) fn mode_name(m: SslMode) -> &'static str {
    match m {
        SslMode::Disable => "disable",
        SslMode::Prefer => "prefer",
        SslMode::Require => "require",
        SslMode::VerifyCa => "verify-ca",
        SslMode::VerifyFull => "verify-full",
    }
}

fn is_tls_param(k: &str) -> bool {
    k == "sslmode" || k == "sslrootcert"
}

type Params = Vec<(String, String)>;

fn split_url(url: &str) -> Result<(String, Params), String> {
    let mut u = url::Url::parse(url).map_err(|e| format!("database URL: {e}"))?;
    let (tls, rest): (Params, Params) = u
        .query_pairs()
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .partition(|(k, _)| is_tls_param(k));
    if rest.is_empty() {
        u.set_query(None);
    } else {
        u.query_pairs_mut().clear().extend_pairs(rest);
    }
    Ok((u.to_string(), tls))
}

/// `host=… sslmode=…` strings; values of the two TLS keys must not contain spaces.
fn split_key_values(s: &str) -> (String, Params) {
    let mut rest = Vec::new();
    let mut tls = Vec::new();
    for token in s.split_whitespace() {
        match token.split_once('=') {
            Some((k, v)) if is_tls_param(k.trim()) => tls.push((k.trim().into(), v.into())),
            _ => rest.push(token),
        }
    }
    (rest.join(" "), tls)
}

fn default_root_cert() -> Option<PathBuf> {
    let p = PathBuf::from(std::env::var_os("HOME")?).join(".postgresql/root.crt");
    p.exists().then_some(p)
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// pgwire-replication builds its rustls configuration with the process default provider;
/// more than one provider is linked in (reqwest brings its own), so name ours.
fn install_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn client_config(mode: SslMode, root_cert: Option<&Path>) -> Result<ClientConfig, String> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?;
    let verifier: Arc<dyn ServerCertVerifier> = match (mode, root_cert) {
        (SslMode::VerifyCa | SslMode::VerifyFull, Some(path)) => {
            let inner = WebPkiServerVerifier::builder_with_provider(
                Arc::new(load_roots(path)?),
                provider(),
            )
            .build()
            .map_err(|e| format!("TLS: {e}"))?;
            if mode == SslMode::VerifyFull {
                inner
            } else {
                Arc::new(ChainOnly(inner))
            }
        }
        _ => Arc::new(Unverified(provider())),
    };
    Ok(builder
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth())
}

fn load_roots(path: &Path) -> Result<RootCertStore, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("sslrootcert {}: {e}", path.display()))?;
    let mut roots = RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err(format!(
            "sslrootcert {}: no CA certificate in it",
            path.display()
        ));
    }
    Ok(roots)
}

/// `verify-ca`: the chain must lead to the CA; the name in it is not checked. webpki checks
/// the chain before the name, so a name error means the chain was good.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(m, c, d)
    }

    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(m, c, d)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// `prefer` / `require`: encrypted, but whoever answers is accepted (libpq's meaning). The
/// handshake signatures are still checked, so the session key belongs to that certificate.
#[derive(Debug)]
struct Unverified(Arc<CryptoProvider>);

impl ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Opens one connection with the URL's TLS settings and drives it on a task; errors of that
/// task end up as errors of the next call on the client.
pub async fn connect(url: &str) -> Result<tokio_postgres::Client, ConnectError> {
    let (client, conn) = connect_driven(url).await?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "database connection closed");
        }
    });
    Ok(client)
}

/// The stream type of a connection made here.
pub(crate) type Stream =
    <MakeRustlsConnect as tokio_postgres::tls::MakeTlsConnect<tokio_postgres::Socket>>::Stream;

/// Connects and hands back the connection for the caller to drive: the LISTEN connection
/// reads its NOTIFYs from it.
pub(crate) async fn connect_driven(
    url: &str,
) -> Result<
    (
        tokio_postgres::Client,
        tokio_postgres::Connection<tokio_postgres::Socket, Stream>,
    ),
    ConnectError,
> {
    let target = Target::parse(url).map_err(ConnectError::Config)?;
    let config = target.pg_config().map_err(ConnectError::Config)?;
    Ok(config
        .connect(target.connector().map_err(ConnectError::Config)?)
        .await?)
}

/// A pool with the URL's TLS settings.
pub(crate) fn pool(url: &str, size: usize) -> Result<deadpool_postgres::Pool, String> {
    let target = Target::parse(url)?;
    let mgr = deadpool_postgres::Manager::from_config(
        target.pg_config()?,
        target.connector()?,
        deadpool_postgres::ManagerConfig {
            recycling_method: deadpool_postgres::RecyclingMethod::Fast,
        },
    );
    deadpool_postgres::Pool::builder(mgr)
        .max_size(size)
        .build()
        .map_err(|e| e.to_string())
}

/// `e` with its causes: tokio-postgres prints "error performing TLS handshake" and keeps
/// the reason (an untrusted certificate, a wrong name) in its source.
pub(crate) fn describe(e: &tokio_postgres::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let msg = s.to_string();
        if !text.contains(&msg) {
            text = format!("{text}: {msg}");
        }
        source = s.source();
    }
    if is_certificate_error(e) {
        text.push_str(
            " (the server's certificate is not accepted under the URL's sslmode and sslrootcert)",
        );
    }
    text
}

/// Whether `e` is the server's certificate failing verification (unknown CA, wrong name,
/// expired): retrying cannot help, the daemon must stop and say so.
pub(crate) fn is_certificate_error(e: &tokio_postgres::Error) -> bool {
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        // tokio-rustls wraps the rustls error in an io::Error, whose source() skips it.
        let inner = s
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .map(|e| e as &(dyn std::error::Error + 'static));
        if let Some(r) = inner.unwrap_or(s).downcast_ref::<rustls::Error>() {
            return matches!(
                r,
                rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented
            );
        }
        source = s.source();
    }
    false
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The URL's settings cannot work: fatal, retrying changes nothing.
    #[error("database URL: {0}")]
    Config(String),
    #[error(transparent)]
    Db(#[from] tokio_postgres::Error),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_parameters_leave_the_url() {
        let t =
            Target::parse("postgresql://u@db.example:5433/fhir?sslmode=require&application_name=x")
                .unwrap();
        assert_eq!(t.mode, SslMode::Require);
        assert_eq!(
            t.url,
            "postgresql://u@db.example:5433/fhir?application_name=x"
        );
        let c = t.pg_config().unwrap();
        assert_eq!(c.get_ssl_mode(), tokio_postgres::config::SslMode::Require);
    }

    #[test]
    fn default_is_prefer_and_key_value_form_works() {
        let t = Target::parse("postgresql://u@h/db").unwrap();
        assert_eq!(
            (t.mode, t.url.as_str()),
            (SslMode::Prefer, "postgresql://u@h/db")
        );
        let t = Target::parse("host=h dbname=db sslmode=disable").unwrap();
        assert_eq!(
            (t.mode, t.url.as_str()),
            (SslMode::Disable, "host=h dbname=db")
        );
    }

    #[test]
    fn verifying_modes_need_a_ca_and_a_name() {
        let e = Target::parse("postgresql://h/db?sslmode=verify-full&sslrootcert=system");
        assert!(e.unwrap_err().contains("system"));
        let e = Target::parse("postgresql://h/db?sslmode=verify-everything").unwrap_err();
        assert!(e.contains("verify-everything"), "{e}");
        let t =
            Target::parse("postgresql://127.0.0.1/db?sslmode=verify-full&sslrootcert=/x").unwrap();
        assert!(t.pg_config().unwrap_err().contains("127.0.0.1"));
        let t =
            Target::parse("postgresql://127.0.0.1/db?sslmode=verify-ca&sslrootcert=/x").unwrap();
        assert!(t.pg_config().is_ok());
        assert!(t.connector().err().is_some_and(|e| e.contains("/x")));
    }
}
