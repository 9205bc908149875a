//! TLS client configuration for PostgreSQL connections (rustls, `ring` provider).
//!
//! Contract: [`client_config`] turns an `sslmode` (+ optional `sslrootcert`) into the rustls
//! `ClientConfig` used by *both* our replication client and tokio-postgres, so the two kinds of
//! connection always verify the server the same way:
//!
//! | sslmode            | TLS attempted | chain verified                      | hostname verified |
//! |--------------------|---------------|-------------------------------------|-------------------|
//! | disable            | no            | –                                   | –                 |
//! | allow, prefer      | yes, optional | only if `sslrootcert` is given      | no                |
//! | require            | yes, required | only if `sslrootcert` is given      | no                |
//! | verify-ca          | yes, required | yes (`sslrootcert`, else webpki roots) | no             |
//! | verify-full        | yes, required | yes (`sslrootcert`, else webpki roots) | yes            |
//!
//! Whether TLS is attempted/required (SSLRequest, fallback on `N`) is decided by the caller; this
//! module only builds the configuration. Handshake signatures are always checked, even when the
//! certificate itself is not. The provider, ring, is chosen explicitly (`builder_with_provider`), so
//! these configurations do not depend on the process default being installed first.
//! Every failure here is a configuration problem and therefore a definite error.

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};

use crate::error::{Component, Error};

const COMPONENT: Component = Component::Postgres;

/// libpq's `sslmode`; this module decides what each mode verifies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Allow,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    pub(crate) fn parse(s: &str) -> Option<SslMode> {
        Some(match s {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    /// True when a connection must fail rather than continue without TLS.
    pub fn requires_tls(self) -> bool {
        matches!(
            self,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull
        )
    }
}

/// How much of the server certificate is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verify {
    /// Encrypt only: any certificate is accepted.
    Nothing,
    /// The chain must lead to a trusted root; the name in the certificate is ignored.
    Chain,
    /// Chain and hostname (or IP address) must both match.
    ChainAndName,
}

fn verify_level(mode: SslMode, rootcert: Option<&Path>) -> Verify {
    match mode {
        SslMode::VerifyFull => Verify::ChainAndName,
        SslMode::VerifyCa => Verify::Chain,
        _ if rootcert.is_some() => Verify::Chain,
        _ => Verify::Nothing,
    }
}

/// Installs ring as the process-wide rustls provider, which libraries that build their TLS
/// configuration take from the process: reqwest (the object store's HTTP client, built with
/// `rustls-no-provider`: ARCHITECTURE.md, "Choices, and why") panics without it, and async-nats's
/// `ClientConfig::builder()` would panic as soon as a second provider were compiled in. Idempotent.
pub fn install_default_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Builds the rustls configuration for `mode`. Callers must not call this for `disable`; it still
/// returns a (never used) encrypt-only configuration in that case rather than failing.
pub(crate) fn client_config(mode: SslMode, rootcert: Option<&Path>) -> Result<ClientConfig, Error> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::definite(COMPONENT, format!("TLS configuration: {e}")))?;
    let mut config = match verify_level(mode, rootcert) {
        Verify::Nothing => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate(provider)))
            .with_no_client_auth(),
        level => {
            let roots = Arc::new(root_store(rootcert)?);
            let webpki = WebPkiServerVerifier::builder_with_provider(roots, provider)
                .build()
                .map_err(|e| Error::definite(COMPONENT, format!("TLS configuration: {e}")))?;
            if level == Verify::ChainAndName {
                builder.with_webpki_verifier(webpki).with_no_client_auth()
            } else {
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(ChainOnly(webpki)))
                    .with_no_client_auth()
            }
        }
    };
    // What libpq 17 sends; servers that predate ALPN ignore it.
    config.alpn_protocols = vec![b"postgresql".to_vec()];
    Ok(config)
}

/// The server name rustls checks (and sends as SNI when it is a DNS name).
pub(crate) fn server_name(host: &str) -> Result<ServerName<'static>, Error> {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(bare.to_string()).map_err(|e| {
        Error::definite(
            COMPONENT,
            format!("host {host:?} is not usable as a TLS server name: {e}"),
        )
    })
}

fn root_store(rootcert: Option<&Path>) -> Result<RootCertStore, Error> {
    let mut store = RootCertStore::empty();
    let Some(path) = rootcert else {
        store.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        return Ok(store);
    };
    let bad = |what: String| {
        Error::definite(COMPONENT, format!("sslrootcert {}: {what}", path.display()))
    };
    let pem = std::fs::read(path).map_err(|e| bad(format!("cannot read: {e}")))?;
    let mut added = 0usize;
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| bad(format!("invalid PEM: {e}")))?;
        store
            .add(cert)
            .map_err(|e| bad(format!("unusable certificate: {e}")))?;
        added += 1;
    }
    if added == 0 {
        return Err(bad("no PEM certificates found".into()));
    }
    Ok(store)
}

/// `require` without a root certificate: encryption against passive eavesdroppers only, like libpq.
#[derive(Debug)]
struct AcceptAnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
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
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
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

/// `verify-ca`: the full webpki verification, except that a name mismatch is accepted. rustls checks
/// the chain before the name, so a name error means the chain itself was fine.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
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
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// Finds the rustls error inside an I/O error chain (tokio-rustls wraps handshake failures in
/// `io::Error`, and `io::Error::source` skips the wrapped error itself, hence `get_ref`).
pub(crate) fn rustls_error<'a>(
    err: &'a (dyn std::error::Error + 'static),
) -> Option<&'a rustls::Error> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(r) = e.downcast_ref::<rustls::Error>() {
            return Some(r);
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if let Some(inner) = io.get_ref() {
                if let Some(r) = rustls_error(inner) {
                    return Some(r);
                }
            }
        }
        cur = e.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verification_levels_follow_libpq() {
        let root = Some(Path::new("/x.pem"));
        assert_eq!(verify_level(SslMode::Require, None), Verify::Nothing);
        assert_eq!(verify_level(SslMode::Prefer, None), Verify::Nothing);
        assert_eq!(verify_level(SslMode::Require, root), Verify::Chain);
        assert_eq!(verify_level(SslMode::VerifyCa, None), Verify::Chain);
        assert_eq!(
            verify_level(SslMode::VerifyFull, root),
            Verify::ChainAndName
        );
    }

    #[test]
    fn missing_or_empty_rootcert_is_definite() {
        let err =
            client_config(SslMode::VerifyCa, Some(Path::new("/nonexistent/root.pem"))).unwrap_err();
        assert!(!err.is_transient());
        assert!(err.message().contains("/nonexistent/root.pem"), "{err}");

        let empty = tempfile::NamedTempFile::new().unwrap();
        let err = client_config(SslMode::VerifyFull, Some(empty.path())).unwrap_err();
        assert!(err.message().contains("no PEM certificates"), "{err}");
    }

    #[test]
    fn configs_build_for_every_mode() {
        for mode in [
            SslMode::Allow,
            SslMode::Prefer,
            SslMode::Require,
            SslMode::VerifyCa,
            SslMode::VerifyFull,
        ] {
            client_config(mode, None).unwrap();
        }
    }
}
