//! Connection setup: the URL and its `sslmode`, the session options every connection
//! starts with, and the rustls connector.
//!
//! `sslmode` (from the URL, as libpq reads it):
//! - `disable`: plain TCP.
//! - `prefer` (the default): TLS when the server offers it, else plain; the certificate is
//!   not verified (libpq does the same).
//! - `require`: TLS or nothing; the certificate is **not** verified, unless a CA file is
//!   configured, in which case the chain must lead to it or a system root (libpq's rule: a
//!   root certificate turns `require` into `verify-ca`). The handshake signatures are always
//!   checked.
//! - `verify-ca`: TLS; the chain must lead to a system root or the CA file; the host name is
//!   not checked.
//! - `verify-full`: TLS; chain and host name are verified.
//!
//! Session options (startup parameters, so a new connection costs no extra round trip):
//! `pharox.node` (which the latency trigger of `migrate.sql` reads), `statement_timeout`,
//! `lock_timeout` (at most 500 ms, the lab's value), `idle_in_transaction_session_timeout`
//! and `application_name = pharox/NODE`. Options already in the URL (a test's
//! `search_path`, say) are kept. TCP: keepalive after 30 s idle (3 probes, 10 s apart) and
//! `tcp_user_timeout` = 3 × the statement timeout (at least 10 s), unless the URL sets them.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::config::SslMode;
use tokio_postgres_rustls::MakeRustlsConnect;
use tokio_rustls::rustls::client::WebPkiServerVerifier;
use tokio_rustls::rustls::client::danger::{
    HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier,
};
use tokio_rustls::rustls::crypto::verify_tls13_signature;
use tokio_rustls::rustls::crypto::{CryptoProvider, ring, verify_tls12_signature};
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use tokio_rustls::rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};

use super::PgSettings;
use super::error::{PgError, Scrub, mask_url};

/// How TLS is used, from the URL's `sslmode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsMode {
    /// No TLS.
    Disable,
    /// TLS if offered, unverified.
    Prefer,
    /// TLS, unverified (verified against the CA file when one is configured).
    Require,
    /// TLS, chain verified, name not checked.
    VerifyCa,
    /// TLS, chain and name verified.
    VerifyFull,
}

impl TlsMode {
    /// The `sslmode` spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            TlsMode::Disable => "disable",
            TlsMode::Prefer => "prefer",
            TlsMode::Require => "require",
            TlsMode::VerifyCa => "verify-ca",
            TlsMode::VerifyFull => "verify-full",
        }
    }
}

/// Everything needed to open a connection.
pub(crate) struct ConnSpec {
    pub config: tokio_postgres::Config,
    pub tls: MakeRustlsConnect,
    pub tls_mode: TlsMode,
    pub masked: String,
    pub scrub: Scrub,
}

/// Parses the settings' URL and builds the connector. `application` names the session
/// (`pharox/NODE` for a daemon); `node` sets `pharox.node` when given.
pub(crate) fn conn_spec(s: &PgSettings, node: Option<&str>) -> Result<ConnSpec, PgError> {
    let url = s.url.expose();
    let masked = mask_url(url);
    let (url, verify) = strip_verify_mode(url);
    let mut config = tokio_postgres::Config::from_str(&url).map_err(|e| PgError::InvalidUrl {
        url: masked.clone(),
        reason: Scrub::for_url(&url).text(super::error::chain(&e)),
    })?;
    let scrub = Scrub::new(config.get_password());
    let tls_mode = match (verify, config.get_ssl_mode()) {
        (Some(mode), _) => mode,
        (None, SslMode::Disable) => TlsMode::Disable,
        (None, SslMode::Require) => TlsMode::Require,
        (None, _) => TlsMode::Prefer,
    };
    session_options(&mut config, s.statement_timeout, node);
    let tls = connector(tls_mode, s.ca_file.as_deref())?;
    Ok(ConnSpec {
        config,
        tls,
        tls_mode,
        masked,
        scrub,
    })
}

/// tokio-postgres knows `disable`, `prefer` and `require`: `verify-ca` / `verify-full` are
/// read here and passed on as `require` (we verify in the connector).
fn strip_verify_mode(url: &str) -> (String, Option<TlsMode>) {
    for (text, mode) in [
        ("sslmode=verify-full", TlsMode::VerifyFull),
        ("sslmode=verify-ca", TlsMode::VerifyCa),
    ] {
        if url.contains(text) {
            return (url.replace(text, "sslmode=require"), Some(mode));
        }
    }
    (url.to_owned(), None)
}

/// Appends the session settings to the URL's own `options`.
fn session_options(config: &mut tokio_postgres::Config, timeout: Duration, node: Option<&str>) {
    let statement_ms = timeout.as_millis().max(1);
    let lock_ms = statement_ms.min(500);
    let mut opts = config.get_options().unwrap_or_default().to_owned();
    let mut add = |kv: String| {
        if !opts.is_empty() {
            opts.push(' ');
        }
        opts.push_str(&kv);
    };
    if let Some(node) = node {
        add(format!("-c pharox.node={}", escape_option(node)));
    }
    add(format!("-c statement_timeout={statement_ms}"));
    add(format!("-c lock_timeout={lock_ms}"));
    add("-c idle_in_transaction_session_timeout=5000".to_owned());
    config.options(&opts);
    if config.get_application_name().is_none() {
        config.application_name(format!("pharox/{}", node.unwrap_or("check")));
    }
    config.connect_timeout(timeout);
    // Dead peers are noticed in about a minute instead of TCP's hours: keepalive probes on
    // idle connections, and a limit on unacknowledged data (a query sent into a partition).
    if config.get_keepalives_idle() == Duration::from_secs(2 * 60 * 60) {
        config.keepalives_idle(Duration::from_secs(30));
        config.keepalives_interval(Duration::from_secs(10));
        config.keepalives_retries(3);
    }
    if config.get_tcp_user_timeout().is_none() {
        config.tcp_user_timeout((timeout * 3).max(Duration::from_secs(10)));
    }
}

/// Backslash-escapes spaces and backslashes (the server splits `options` on spaces).
fn escape_option(v: &str) -> String {
    v.replace('\\', "\\\\").replace(' ', "\\ ")
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(ring::default_provider())
}

/// The rustls connector for a mode. `disable` still gets one (it is never used).
fn connector(
    mode: TlsMode,
    ca_file: Option<&std::path::Path>,
) -> Result<MakeRustlsConnect, PgError> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| PgError::Tls(e.to_string()))?;
    let verify = match mode {
        TlsMode::Disable | TlsMode::Prefer => false,
        TlsMode::Require => ca_file.is_some(),
        TlsMode::VerifyCa | TlsMode::VerifyFull => true,
    };
    let config = if !verify {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerify(provider)))
            .with_no_client_auth()
    } else {
        let roots = Arc::new(roots(ca_file)?);
        let webpki = WebPkiServerVerifier::builder_with_provider(roots, provider)
            .build()
            .map_err(|e| PgError::Tls(e.to_string()))?;
        if mode == TlsMode::VerifyFull {
            builder.with_webpki_verifier(webpki).with_no_client_auth()
        } else {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(ChainOnly(webpki)))
                .with_no_client_auth()
        }
    };
    Ok(MakeRustlsConnect::new(config))
}

/// The system roots plus the PEM certificates of `ca_file`.
fn roots(ca_file: Option<&std::path::Path>) -> Result<RootCertStore, PgError> {
    let mut roots = RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    if let Some(path) = ca_file {
        let bad = |e: &dyn std::fmt::Display| PgError::Tls(format!("{}: {e}", path.display()));
        for cert in CertificateDer::pem_file_iter(path).map_err(|e| bad(&e))? {
            roots.add(cert.map_err(|e| bad(&e))?).map_err(|e| bad(&e))?;
        }
    }
    if roots.is_empty() {
        return Err(PgError::Tls(
            "no trusted root certificate (system store empty and no ca_file)".into(),
        ));
    }
    Ok(roots)
}

/// `sslmode=require`/`prefer`: any certificate, but a sound handshake.
#[derive(Debug)]
struct NoVerify(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, tokio_rustls::rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, tokio_rustls::rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, tokio_rustls::rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `sslmode=verify-ca`: the chain is verified, a name mismatch is accepted.
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
    ) -> Result<ServerCertVerified, tokio_rustls::rustls::Error> {
        use tokio_rustls::rustls::Error::InvalidCertificate;
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, tokio_rustls::rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, tokio_rustls::rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(url: &str) -> PgSettings {
        PgSettings::new(url, "node-a")
    }

    #[test]
    fn reads_sslmode_and_keeps_url_options() {
        let spec = conn_spec(
            &settings("postgres://u:pw@h/db?sslmode=verify-full&options=-csearch_path%3Dt1"),
            Some("node a"),
        )
        .unwrap();
        assert_eq!(spec.tls_mode, TlsMode::VerifyFull);
        let opts = spec.config.get_options().unwrap();
        assert!(
            opts.starts_with("-csearch_path=t1 -c pharox.node=node\\ a"),
            "{opts}"
        );
        assert!(
            opts.contains("-c statement_timeout=2000 -c lock_timeout=500"),
            "{opts}"
        );
        assert_eq!(spec.config.get_application_name(), Some("pharox/node a"));
        for (url, mode) in [
            ("postgres://h/db", TlsMode::Prefer),
            ("postgres://h/db?sslmode=disable", TlsMode::Disable),
            ("postgres://h/db?sslmode=require", TlsMode::Require),
            ("postgres://h/db?sslmode=verify-ca", TlsMode::VerifyCa),
        ] {
            assert_eq!(
                conn_spec(&settings(url), None).unwrap().tls_mode,
                mode,
                "{url}"
            );
        }
    }

    #[test]
    fn a_bad_url_is_reported_masked() {
        let e = conn_spec(&settings("postgres://u:hunter22@h/db?sslmode=bogus"), None)
            .err()
            .unwrap();
        let text = e.to_string();
        assert!(!text.contains("hunter22"), "{text}");
        assert!(text.contains("u:***@h"), "{text}");
    }
}
