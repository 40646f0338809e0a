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
//! - SCRAM channel binding (`tls-server-end-point`, RFC 5929) is offered over TLS when
//!   the server certificate's signature algorithm names its hash (RSA PKCS#1 and
//!   ECDSA with SHA-1/2); [`super::auth`] decides whether it is required.
//! - A client certificate (`sslcert`, `sslkey`) is sent when configured; the key file
//!   must not be readable by group or others, as libpq requires.
//! - The ordinary connections read through an [`AuthWatchedSocket`], so the
//!   [`super::auth`] policy applies to tokio-postgres's authentication as it does to
//!   the replication client's.

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use super::auth::AuthRefused;
use super::auth::AuthWatch;
use super::connect::{CONNECT_TIMEOUT, ConnectConfig, SslMode};
use super::error::{SourceError, TlsFailure};

/// The SSLRequest code: 1234 in the high 16 bits, 5679 in the low.
const SSL_REQUEST_CODE: i32 = 80877103;

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The rustls client configuration for `config`'s `sslmode` (`None` for `disable`):
/// reads and parses `sslrootcert` for the verifying modes, and `sslcert` and
/// `sslkey` when a client certificate is configured.
pub fn client_config(
    config: &ConnectConfig,
) -> Result<Option<Arc<rustls::ClientConfig>>, SourceError> {
    let mode = config.sslmode;
    let provider = provider();
    let verifier: Arc<dyn ServerCertVerifier> = match mode {
        SslMode::Disable => return Ok(None),
        SslMode::Prefer | SslMode::Require => {
            Arc::new(AcceptAnyServerCertificate(provider.clone()))
        }
        SslMode::VerifyCa | SslMode::VerifyFull => {
            let path = config.sslrootcert.as_deref().ok_or_else(|| SourceError::TlsSetup {
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
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| SourceError::TlsSetup {
            reason: e.to_string(),
        })?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let client = match (&config.sslcert, &config.sslkey) {
        (None, None) => builder.with_no_client_auth(),
        (Some(cert), Some(key)) => {
            let (chain, key_der) = load_client_identity(cert, key)?;
            builder
                .with_client_auth_cert(chain, key_der)
                .map_err(|e| SourceError::TlsSetup {
                    reason: format!(
                        "sslcert `{}` and sslkey `{}` do not make a client identity ({e}): give the certificate and the private key that belongs to it",
                        cert.display(),
                        key.display()
                    ),
                })?
        }
        (Some(_), None) | (None, Some(_)) => {
            return Err(SourceError::TlsSetup {
                reason: "a client certificate needs both sslcert and sslkey: set the other one too, or neither".into(),
            });
        }
    };
    Ok(Some(Arc::new(client)))
}

/// The client certificate chain and its private key. The key file must be private
/// (no group or other permissions), as libpq requires; its bytes are zeroed after
/// parsing.
fn load_client_identity(
    cert: &Path,
    key: &Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), SourceError> {
    let fail = |path: &Path, what: &str, reason: String| SourceError::TlsSetup {
        reason: format!("cannot use {what} `{}`: {reason}", path.display()),
    };
    let pem = std::fs::read(cert).map_err(|e| fail(cert, "sslcert", e.to_string()))?;
    let chain = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| fail(cert, "sslcert", format!("not valid PEM ({e})")))?;
    if chain.is_empty() {
        return Err(fail(
            cert,
            "sslcert",
            "it holds no `BEGIN CERTIFICATE` block".into(),
        ));
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(key).map_err(|e| fail(key, "sslkey", e.to_string()))?;
        if meta.mode() & 0o077 != 0 {
            return Err(fail(
                key,
                "sslkey",
                format!(
                    "the private key file has group or world access (mode {:o}): chmod 600 it",
                    meta.mode() & 0o777
                ),
            ));
        }
    }
    let pem = zeroize::Zeroizing::new(
        std::fs::read(key).map_err(|e| fail(key, "sslkey", e.to_string()))?,
    );
    let key_der = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
        fail(
            key,
            "sslkey",
            format!(
                "no PEM private key in it ({e}); give an unencrypted PKCS#8, PKCS#1 or SEC1 key"
            ),
        )
    })?;
    Ok((chain, key_der))
}

/// The `tls-server-end-point` channel binding data (RFC 5929): the hash of the
/// server's certificate with the hash of its signature algorithm (SHA-256 for MD5
/// and SHA-1). `None` when the algorithm is not one PostgreSQL and airlock both know
/// (RSA PKCS#1 and ECDSA with SHA-1/2): then there is no channel binding.
pub fn tls_server_end_point(certificate: &[u8]) -> Option<Vec<u8>> {
    use sha2::Digest;
    // Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm, signature }
    let (_, cert, _) = der_element(certificate)?;
    let (_, _tbs, rest) = der_element(cert)?;
    let (_, algorithm, _) = der_element(rest)?;
    let (tag, oid, _) = der_element(algorithm)?;
    if tag != 0x06 {
        return None;
    }
    const RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01];
    const ECDSA: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04];
    enum Hash {
        Sha224,
        Sha256,
        Sha384,
        Sha512,
    }
    let hash = match oid {
        // md5WithRSA, sha1WithRSA: SHA-256, as the RFC says.
        [prefix @ .., 4 | 5] if prefix == RSA => Hash::Sha256,
        [prefix @ .., 11] if prefix == RSA => Hash::Sha256,
        [prefix @ .., 12] if prefix == RSA => Hash::Sha384,
        [prefix @ .., 13] if prefix == RSA => Hash::Sha512,
        [prefix @ .., 14] if prefix == RSA => Hash::Sha224,
        [prefix @ .., 1] if prefix == ECDSA => Hash::Sha256,
        [prefix @ .., 3, n] if prefix == ECDSA => match n {
            1 => Hash::Sha224,
            2 => Hash::Sha256,
            3 => Hash::Sha384,
            4 => Hash::Sha512,
            _ => return None,
        },
        _ => return None,
    };
    Some(match hash {
        Hash::Sha224 => sha2::Sha224::digest(certificate).to_vec(),
        Hash::Sha256 => sha2::Sha256::digest(certificate).to_vec(),
        Hash::Sha384 => sha2::Sha384::digest(certificate).to_vec(),
        Hash::Sha512 => sha2::Sha512::digest(certificate).to_vec(),
    })
}

/// One DER element: (tag, contents, what follows).
fn der_element(bytes: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = bytes.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (first as usize, rest)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | *b as usize);
        (len, &rest[n..])
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

/// The channel binding data of an established TLS connection, if any.
pub fn end_point_of(connection: &rustls::ClientConnection) -> Option<Vec<u8>> {
    connection
        .peer_certificates()
        .and_then(|chain| chain.first())
        .and_then(|cert| tls_server_end_point(cert))
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

/// Sends SSLRequest on `stream` and, when the server accepts, runs the handshake and
/// returns the TLS stream with its channel binding data.
/// `Ok(None)`: the server refused TLS and `sslmode=prefer` goes on in plain text on
/// the same stream.
pub async fn negotiate(
    mut stream: TcpStream,
    config: &ConnectConfig,
    addr: &str,
) -> Result<
    Result<(tokio_rustls::client::TlsStream<TcpStream>, Option<Vec<u8>>), TcpStream>,
    SourceError,
> {
    let Some(client) = client_config(config)? else {
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
        .map(|tls| {
            let end_point = end_point_of(tls.get_ref().1);
            Ok((tls, end_point))
        })
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

/// The socket of an ordinary (tokio-postgres) connection, TCP or Unix. Until TLS
/// takes over (or for the whole connection without TLS) it feeds what it reads to
/// the connection's [`AuthWatch`], and fails the read when the watch refuses.
pub struct AuthWatchedSocket {
    inner: PlainSocket,
    watch: Arc<Mutex<AuthWatch>>,
    /// The next byte read is the server's answer to SSLRequest (`S` or `N`).
    ssl_answer_pending: bool,
    /// False once TLS is on: the [`RustlsStream`] watches the decrypted bytes.
    watching: bool,
}

enum PlainSocket {
    Tcp(TcpStream),
    #[cfg(unix)]
    Unix(tokio::net::UnixStream),
}

impl AuthWatchedSocket {
    /// Opens the socket `config` names; `requests_tls` says whether tokio-postgres
    /// will send SSLRequest first.
    pub async fn open(
        config: &ConnectConfig,
        watch: Arc<Mutex<AuthWatch>>,
        requests_tls: bool,
    ) -> io::Result<Self> {
        #[cfg(unix)]
        if config.is_unix_socket() {
            let stream = tokio::net::UnixStream::connect(config.socket_path()).await?;
            return Ok(Self::new(PlainSocket::Unix(stream), watch, false));
        }
        let stream = TcpStream::connect((config.host.as_str(), config.port)).await?;
        stream.set_nodelay(true)?;
        Ok(Self::new(PlainSocket::Tcp(stream), watch, requests_tls))
    }

    fn new(inner: PlainSocket, watch: Arc<Mutex<AuthWatch>>, requests_tls: bool) -> Self {
        AuthWatchedSocket {
            inner,
            watch,
            ssl_answer_pending: requests_tls,
            watching: true,
        }
    }
}

/// Feeds the bytes a read just added to `buf` to `watch`; on a refusal the bytes are
/// taken back out of `buf` and the read fails with [`AuthRefused`]. `Ok(true)` once
/// authentication is over: the caller stops watching (no lock per read after it).
fn watch_read(
    watch: &Mutex<AuthWatch>,
    buf: &mut ReadBuf<'_>,
    before: usize,
    skip: usize,
) -> io::Result<bool> {
    let fresh = &buf.filled()[before..];
    let mut watch = watch
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    match watch.feed(&fresh[skip.min(fresh.len())..]) {
        Ok(()) => Ok(watch.passive()),
        Err(reason) => {
            buf.set_filled(before);
            Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                AuthRefused(reason),
            ))
        }
    }
}

impl AsyncRead for AuthWatchedSocket {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let read = match &mut this.inner {
            PlainSocket::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            #[cfg(unix)]
            PlainSocket::Unix(s) => Pin::new(s).poll_read(cx, buf),
        };
        if !matches!(read, Poll::Ready(Ok(()))) || buf.filled().len() == before {
            return read;
        }
        let mut skip = 0;
        if this.ssl_answer_pending {
            this.ssl_answer_pending = false;
            skip = 1;
            if buf.filled()[before] == b'S' {
                this.watching = false;
            }
        }
        if this.watching && watch_read(&this.watch, buf, before, skip)? {
            this.watching = false;
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for AuthWatchedSocket {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.inner {
            PlainSocket::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            #[cfg(unix)]
            PlainSocket::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.inner {
            PlainSocket::Tcp(s) => Pin::new(s).poll_flush(cx),
            #[cfg(unix)]
            PlainSocket::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.inner {
            PlainSocket::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            #[cfg(unix)]
            PlainSocket::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// tokio-postgres's TLS connector over rustls, for one ordinary connection. A TLS
/// setup error (an unreadable `sslrootcert`) surfaces as the connection's error.
pub struct RustlsConnect {
    config: Result<Option<Arc<rustls::ClientConfig>>, Arc<str>>,
    host: String,
    mode: SslMode,
    root_cert: Option<PathBuf>,
}

impl RustlsConnect {
    pub fn new(config: &ConnectConfig) -> Self {
        RustlsConnect {
            config: client_config(config).map_err(|e| Arc::from(e.to_string())),
            host: config.host.clone(),
            mode: config.sslmode,
            root_cert: config.sslrootcert.clone(),
        }
    }
}

impl tokio_postgres::tls::TlsConnect<AuthWatchedSocket> for RustlsConnect {
    type Stream = RustlsStream;
    type Error = TlsFailure;
    type Future = Pin<Box<dyn Future<Output = Result<RustlsStream, TlsFailure>> + Send>>;

    fn connect(self, stream: AuthWatchedSocket) -> Self::Future {
        Box::pin(async move {
            let config = match self.config {
                Ok(Some(config)) => config,
                Ok(None) => {
                    return Err(TlsFailure::definite(
                        "TLS was asked for although sslmode=disable".into(),
                    ));
                }
                Err(reason) => return Err(TlsFailure::definite(reason.to_string())),
            };
            let host = self.host;
            let name = server_name(&host).map_err(|e| TlsFailure::definite(e.to_string()))?;
            let watch = stream.watch.clone();
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(name, stream)
                .await
                .map_err(|e| {
                    match describe_handshake_error(&e, &host, self.mode, self.root_cert.as_deref())
                    {
                        Some(reason) => TlsFailure::definite(reason),
                        None => TlsFailure {
                            reason: e.to_string(),
                            definite: false,
                        },
                    }
                })?;
            let end_point = end_point_of(tls.get_ref().1);
            watch
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .check
                .set_tls(end_point.is_some());
            Ok(RustlsStream {
                tls: Box::new(tls),
                watch,
                end_point,
                watching: true,
            })
        })
    }
}

/// A TLS stream of an ordinary connection: feeds the decrypted bytes to the
/// connection's [`AuthWatch`] and offers the channel binding data.
pub struct RustlsStream {
    tls: Box<tokio_rustls::client::TlsStream<AuthWatchedSocket>>,
    watch: Arc<Mutex<AuthWatch>>,
    end_point: Option<Vec<u8>>,
    /// False once authentication is over.
    watching: bool,
}

impl AsyncRead for RustlsStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let read = Pin::new(&mut *this.tls).poll_read(cx, buf);
        if this.watching
            && matches!(read, Poll::Ready(Ok(())))
            && buf.filled().len() > before
            && watch_read(&this.watch, buf, before, 0)?
        {
            this.watching = false;
        }
        read
    }
}

impl AsyncWrite for RustlsStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.tls).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.tls).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.tls).poll_shutdown(cx)
    }
}

impl tokio_postgres::tls::TlsStream for RustlsStream {
    fn channel_binding(&self) -> tokio_postgres::tls::ChannelBinding {
        match &self.end_point {
            Some(hash) => tokio_postgres::tls::ChannelBinding::tls_server_end_point(hash.clone()),
            None => tokio_postgres::tls::ChannelBinding::none(),
        }
    }
}

impl ConnectConfig {
    /// Opens an ordinary SQL connection (at most [`CONNECT_TIMEOUT`]): TLS as
    /// `sslmode` says, and every authentication request checked against the
    /// [`super::auth::AuthPolicy`] before tokio-postgres answers it. The caller drives the
    /// returned connection (e.g. in a spawned task).
    pub async fn connect_sql(
        &self,
    ) -> Result<
        (
            tokio_postgres::Client,
            tokio_postgres::Connection<AuthWatchedSocket, RustlsStream>,
        ),
        SourceError,
    > {
        self.check_tls()?;
        let addr = self.addr();
        let pg = self.tokio_postgres_config();
        let watch = Arc::new(Mutex::new(AuthWatch::new(self.auth)));
        let requests_tls = pg.get_ssl_mode() != tokio_postgres::config::SslMode::Disable;
        let setup = async {
            let socket = AuthWatchedSocket::open(self, watch.clone(), requests_tls)
                .await
                .map_err(|source| SourceError::Connect {
                    addr: addr.clone(),
                    source,
                })?;
            pg.connect_raw(socket, RustlsConnect::new(self))
                .await
                .map_err(|e| SourceError::from_sql(&addr, &self.user, "connecting", e))
        };
        tokio::time::timeout(CONNECT_TIMEOUT, setup)
            .await
            .map_err(|_| SourceError::ConnectTimeout {
                addr: addr.clone(),
                seconds: CONNECT_TIMEOUT.as_secs(),
            })?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tls_config(mode: SslMode, root: Option<&Path>) -> ConnectConfig {
        let mut config = ConnectConfig::new("localhost", 5432, "app", None, "app");
        config.sslmode = mode;
        config.sslrootcert = root.map(Path::to_path_buf);
        config
    }

    #[test]
    fn verifying_modes_need_a_readable_pem_root_cert() {
        let err = client_config(&tls_config(SslMode::VerifyFull, None))
            .unwrap_err()
            .to_string();
        assert!(err.contains("no sslrootcert is set"), "{err}");
        let err = client_config(&tls_config(
            SslMode::VerifyCa,
            Some(Path::new("/nonexistent/ca.pem")),
        ))
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
        let err = client_config(&tls_config(SslMode::VerifyCa, Some(&empty)))
            .unwrap_err()
            .to_string();
        assert!(err.contains("no `BEGIN CERTIFICATE` block"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn non_verifying_modes_build_without_a_root_cert() {
        assert!(
            client_config(&tls_config(SslMode::Disable, None))
                .unwrap()
                .is_none()
        );
        assert!(
            client_config(&tls_config(SslMode::Prefer, None))
                .unwrap()
                .is_some()
        );
        assert!(
            client_config(&tls_config(SslMode::Require, None))
                .unwrap()
                .is_some()
        );
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
