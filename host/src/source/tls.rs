//! TLS to PostgreSQL, with rustls (the `ring` provider), for the replication
//! connection and for the ordinary (tokio-postgres) connections alike.
//!
//! ```text
//! TCP connect ─▶ SSLRequest (80877103) ─▶ 'S' ─▶ rustls handshake ─▶ startup, auth …
//!                                      └─▶ 'N' ─▶ plain (sslmode=prefer) or a definite error
//! ```
//!
//! What each `sslmode` checks (as libpq):
//!
//! | sslmode       | encrypts                       | certificate chain | host name |
//! |---------------|--------------------------------|-------------------|-----------|
//! | `disable`     | no                             | —                 | —         |
//! | `prefer`      | when the server offers TLS     | no                | no        |
//! | `require`     | yes                            | no                | no        |
//! | `verify-ca`   | yes                            | `sslrootcert`     | no        |
//! | `verify-full` | yes                            | `sslrootcert`     | yes       |
//!
//! Invariants:
//! - `prefer` and `require` encrypt but do not authenticate the server: their
//!   verifier is [`AcceptAnyServerCertificate`], named for what it does. Only the
//!   handshake signature is checked (the server holds the key of the certificate it
//!   sent).
//! - Unix sockets never use TLS (PostgreSQL does not offer it there), whatever the mode.
//! - A certificate the verifier refuses is a definite error ([`SourceError::Tls`]),
//!   never retried: an operator must change the certificate, the CA file or the
//!   mode. I/O failures during the handshake stay transient.
//! - No SCRAM channel binding: the client announces it does not support it (`n,,`).

use std::fmt;
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use super::error::SourceError;
use super::protocol::{ConnectConfig, SslMode};

/// The SSLRequest code: 1234 in the high 16 bits, 5679 in the low.
const SSL_REQUEST_CODE: i32 = 80877103;

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The rustls client configuration for `mode` (`None` for `disable`): reads and
/// parses `sslrootcert` for the verifying modes.
pub fn client_config(
    mode: SslMode,
    root_cert: Option<&Path>,
) -> Result<Option<Arc<rustls::ClientConfig>>, SourceError> {
    let provider = provider();
    let verifier: Arc<dyn ServerCertVerifier> = match mode {
        SslMode::Disable => return Ok(None),
        SslMode::Prefer | SslMode::Require => {
            Arc::new(AcceptAnyServerCertificate(provider.clone()))
        }
        SslMode::VerifyCa | SslMode::VerifyFull => {
            let path = root_cert.ok_or_else(|| SourceError::TlsSetup {
                reason: format!(
                    "sslmode={} verifies the server certificate, but no sslrootcert is set: set [source] sslrootcert to a PEM file with the CA certificate",
                    mode.as_str()
                ),
            })?;
            let roots = Arc::new(load_roots(path)?);
            let webpki = WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
                .build()
                .map_err(|e| SourceError::TlsSetup {
                    reason: format!("sslrootcert `{}`: {e}", path.display()),
                })?;
            if mode == SslMode::VerifyCa {
                Arc::new(ChainOnlyVerifier(webpki))
            } else {
                webpki
            }
        }
    };
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| SourceError::TlsSetup {
            reason: e.to_string(),
        })?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(Some(Arc::new(config)))
}

/// Every certificate of a PEM file, as trust anchors.
fn load_roots(path: &Path) -> Result<RootCertStore, SourceError> {
    let fail = |reason: String| SourceError::TlsSetup {
        reason: format!(
            "cannot use sslrootcert `{}`: {reason}; set [source] sslrootcert to a PEM file with the CA certificate(s) that signed the server's certificate",
            path.display()
        ),
    };
    let pem = std::fs::read(path).map_err(|e| fail(e.to_string()))?;
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| fail(format!("not valid PEM ({e})")))?;
        roots
            .add(cert)
            .map_err(|e| fail(format!("a certificate in it is not usable ({e})")))?;
    }
    if roots.is_empty() {
        return Err(fail("it holds no `BEGIN CERTIFICATE` block".into()));
    }
    Ok(roots)
}

/// The name the certificate is checked against (for `verify-full`) and sent as SNI.
fn server_name(host: &str) -> Result<ServerName<'static>, SourceError> {
    ServerName::try_from(host.to_owned()).map_err(|_| SourceError::TlsSetup {
        reason: format!("`{host}` is not a valid host name or IP address for TLS"),
    })
}

/// Accepts any server certificate: for `sslmode=prefer` and `require`, which encrypt
/// the connection but, as in libpq, do not authenticate the server. Handshake
/// signatures are still verified.
#[derive(Debug)]
pub struct AcceptAnyServerCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAnyServerCertificate {
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

/// `sslmode=verify-ca`: the chain must lead to `sslrootcert`, the host name is not
/// checked. webpki checks the chain before the name, so a name mismatch means the
/// chain was good.
#[derive(Debug)]
struct ChainOnlyVerifier(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnlyVerifier {
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

/// Why a handshake failed, in words an operator can act on; `None` when the error
/// is plain I/O (connection reset, ...), which stays transient.
fn describe_handshake_error(
    error: &io::Error,
    host: &str,
    mode: SslMode,
    root_cert: Option<&Path>,
) -> Option<String> {
    let tls = error.get_ref()?.downcast_ref::<rustls::Error>()?;
    let ca = root_cert.map_or_else(
        || "sslrootcert".to_owned(),
        |p| format!("sslrootcert `{}`", p.display()),
    );
    Some(match tls {
        rustls::Error::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        ) => {
            let presented = match tls {
                rustls::Error::InvalidCertificate(CertificateError::NotValidForNameContext {
                    presented,
                    ..
                }) if !presented.is_empty() => format!(" (it names {})", presented.join(", ")),
                _ => String::new(),
            };
            format!(
                "the server certificate is not valid for host `{host}`{presented} (sslmode=verify-full checks the host name): connect with a host name the certificate names, or use sslmode=verify-ca to check the chain only"
            )
        }
        rustls::Error::InvalidCertificate(
            CertificateError::UnknownIssuer | CertificateError::BadSignature,
        ) => format!(
            "the server certificate is not signed by a CA in {ca} (sslmode={}): give sslrootcert the CA that signed the server's certificate",
            mode.as_str()
        ),
        rustls::Error::InvalidCertificate(other) => format!(
            "the server certificate was refused ({other:?}, sslmode={}, {ca})",
            mode.as_str()
        ),
        other => format!("the TLS handshake failed: {other}"),
    })
}

/// Sends SSLRequest on `stream` and, when the server accepts, runs the handshake.
/// `Ok(None)`: the server refused TLS and `sslmode=prefer` goes on in plain text on
/// the same stream.
pub async fn negotiate(
    mut stream: TcpStream,
    config: &ConnectConfig,
    addr: &str,
) -> Result<Result<tokio_rustls::client::TlsStream<TcpStream>, TcpStream>, SourceError> {
    let Some(client) = client_config(config.sslmode, config.sslrootcert.as_deref())? else {
        return Ok(Err(stream));
    };
    let name = server_name(&config.host)?;
    let io_error = |source| SourceError::Io {
        addr: addr.to_owned(),
        during: "negotiating TLS",
        source,
    };
    let mut request = Vec::with_capacity(8);
    request.extend_from_slice(&8i32.to_be_bytes());
    request.extend_from_slice(&SSL_REQUEST_CODE.to_be_bytes());
    stream.write_all(&request).await.map_err(io_error)?;
    let answer = match stream.read_u8().await {
        Ok(answer) => answer,
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
            return Err(SourceError::Closed {
                addr: addr.to_owned(),
                during: "negotiating TLS",
            });
        }
        Err(e) => return Err(io_error(e)),
    };
    match answer {
        b'S' => {}
        b'N' if config.sslmode == SslMode::Prefer => return Ok(Err(stream)),
        b'N' => {
            return Err(SourceError::Tls {
                addr: addr.to_owned(),
                reason: format!(
                    "the server does not accept TLS connections, and sslmode={} requires TLS: turn on `ssl` in the server's postgresql.conf, or set sslmode = \"disable\" on a trusted network",
                    config.sslmode.as_str()
                ),
            });
        }
        other => {
            return Err(SourceError::Protocol {
                addr: addr.to_owned(),
                during: "negotiating TLS",
                reason: format!("unexpected answer {:?} to SSLRequest", char::from(other)),
            });
        }
    }
    tokio_rustls::TlsConnector::from(client)
        .connect(name, stream)
        .await
        .map(Ok)
        .map_err(|e| {
            match describe_handshake_error(
                &e,
                &config.host,
                config.sslmode,
                config.sslrootcert.as_deref(),
            ) {
                Some(reason) => SourceError::Tls {
                    addr: addr.to_owned(),
                    reason,
                },
                None => io_error(e),
            }
        })
}

/// A tokio-postgres TLS connector over rustls, for the ordinary SQL connections.
/// A TLS setup error (an unreadable `sslrootcert`) surfaces as the connection's error.
#[derive(Clone)]
pub struct MakeRustlsConnect {
    config: Result<Option<Arc<rustls::ClientConfig>>, Arc<str>>,
    mode: SslMode,
    root_cert: Option<PathBuf>,
}

impl MakeRustlsConnect {
    pub fn new(config: &ConnectConfig) -> Self {
        MakeRustlsConnect {
            config: client_config(config.sslmode, config.sslrootcert.as_deref())
                .map_err(|e| Arc::from(e.to_string())),
            mode: config.sslmode,
            root_cert: config.sslrootcert.clone(),
        }
    }
}

/// A TLS failure of an ordinary connection, already in an operator's words.
#[derive(Debug)]
pub struct TlsFailure(String);

impl fmt::Display for TlsFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TlsFailure {}

impl tokio_postgres::tls::MakeTlsConnect<tokio_postgres::Socket> for MakeRustlsConnect {
    type Stream = RustlsStream;
    type TlsConnect = RustlsConnect;
    type Error = TlsFailure;

    /// Called for every connection, also with `sslmode=disable` and on Unix sockets
    /// (empty `domain`), where the connector is never used: failures wait for `connect`.
    fn make_tls_connect(&mut self, domain: &str) -> Result<RustlsConnect, TlsFailure> {
        Ok(RustlsConnect {
            config: self.config.clone(),
            host: domain.to_owned(),
            mode: self.mode,
            root_cert: self.root_cert.clone(),
        })
    }
}

pub struct RustlsConnect {
    config: Result<Option<Arc<rustls::ClientConfig>>, Arc<str>>,
    host: String,
    mode: SslMode,
    root_cert: Option<PathBuf>,
}

impl tokio_postgres::tls::TlsConnect<tokio_postgres::Socket> for RustlsConnect {
    type Stream = RustlsStream;
    type Error = TlsFailure;
    type Future = Pin<Box<dyn Future<Output = Result<RustlsStream, TlsFailure>> + Send>>;

    fn connect(self, stream: tokio_postgres::Socket) -> Self::Future {
        Box::pin(async move {
            let config = match self.config {
                Ok(Some(config)) => config,
                Ok(None) => {
                    return Err(TlsFailure(
                        "TLS was asked for although sslmode=disable".into(),
                    ));
                }
                Err(reason) => return Err(TlsFailure(reason.to_string())),
            };
            let host = self.host;
            let name = server_name(&host).map_err(|e| TlsFailure(e.to_string()))?;
            tokio_rustls::TlsConnector::from(config)
                .connect(name, stream)
                .await
                .map(|s| RustlsStream(Box::new(s)))
                .map_err(|e| {
                    TlsFailure(
                        describe_handshake_error(&e, &host, self.mode, self.root_cert.as_deref())
                            .unwrap_or_else(|| e.to_string()),
                    )
                })
        })
    }
}

/// A TLS stream of an ordinary connection.
pub struct RustlsStream(Box<tokio_rustls::client::TlsStream<tokio_postgres::Socket>>);

impl AsyncRead for RustlsStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for RustlsStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_shutdown(cx)
    }
}

impl tokio_postgres::tls::TlsStream for RustlsStream {
    fn channel_binding(&self) -> tokio_postgres::tls::ChannelBinding {
        tokio_postgres::tls::ChannelBinding::none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verifying_modes_need_a_readable_pem_root_cert() {
        let err = client_config(SslMode::VerifyFull, None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("no sslrootcert is set"), "{err}");
        let err = client_config(SslMode::VerifyCa, Some(Path::new("/nonexistent/ca.pem")))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("cannot use sslrootcert `/nonexistent/ca.pem`")
                && err.contains("PEM file"),
            "{err}"
        );
        let dir = std::env::temp_dir().join(format!("airlock-tls-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let err = client_config(SslMode::VerifyCa, Some(&empty))
            .unwrap_err()
            .to_string();
        assert!(err.contains("no `BEGIN CERTIFICATE` block"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn non_verifying_modes_build_without_a_root_cert() {
        assert!(client_config(SslMode::Disable, None).unwrap().is_none());
        assert!(client_config(SslMode::Prefer, None).unwrap().is_some());
        assert!(client_config(SslMode::Require, None).unwrap().is_some());
    }

    #[test]
    fn handshake_errors_name_the_host_and_the_ca_file() {
        let wrap = |e: rustls::Error| io::Error::new(io::ErrorKind::InvalidData, e);
        let name = wrap(rustls::Error::InvalidCertificate(
            CertificateError::NotValidForNameContext {
                expected: ServerName::try_from("db.internal").unwrap().to_owned(),
                presented: vec!["DnsName(\"localhost\")".into()],
            },
        ));
        let text =
            describe_handshake_error(&name, "db.internal", SslMode::VerifyFull, None).unwrap();
        assert!(text.contains("not valid for host `db.internal`"), "{text}");
        assert!(text.contains("localhost"), "{text}");
        let issuer = wrap(rustls::Error::InvalidCertificate(
            CertificateError::UnknownIssuer,
        ));
        let text = describe_handshake_error(
            &issuer,
            "h",
            SslMode::VerifyCa,
            Some(Path::new("/etc/ca.pem")),
        )
        .unwrap();
        assert!(
            text.contains("not signed by a CA in sslrootcert `/etc/ca.pem`"),
            "{text}"
        );
        let reset = io::Error::new(io::ErrorKind::ConnectionReset, "reset");
        assert!(describe_handshake_error(&reset, "h", SslMode::Require, None).is_none());
    }
}
