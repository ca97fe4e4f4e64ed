//! TLS with rustls: certificate loading, server and client configurations, reloading, and
//! test certificates.
//!
//! One [`rustls::ServerConfig`] or [`rustls::ClientConfig`] is built and shared in an `Arc`
//! by every connection. The crypto provider is rustls' `ring`. PEM files are read with
//! rustls' own PEM support (`rustls::pki_types::pem`), and every error names the file and
//! what is wrong in it.

use std::fmt;
use std::io::{self, IoSlice};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

mod reads;
pub use reads::ReadAhead;

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("{context}: {detail}")]
pub struct TlsError {
    context: String,
    detail: String,
}

impl TlsError {
    fn new(context: impl Into<String>, detail: impl fmt::Display) -> Self {
        TlsError {
            context: context.into(),
            detail: detail.to_string(),
        }
    }
}

fn provider() -> Arc<CryptoProvider> {
    let mut provider = rustls::crypto::ring::default_provider();
    // TLS 1.3 AES-128-GCM first (ring lists AES-256-GCM first): 10 rounds instead of 14
    // per block, still 128-bit security. The order is our preference as a client; as a
    // server rustls follows the client's order, so clients that prefer ChaCha20 (no AES
    // instructions) keep it. The stable sort keeps the rest in ring's order.
    provider
        .cipher_suites
        .sort_by_key(|suite| suite.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    Arc::new(provider)
}

/// Plaintext bytes per TLS record we send: 64 bytes short of the TLS maximum of 16 KiB.
///
/// rustls copies each record's plaintext into a fresh buffer, just behind the 5-byte record
/// header, before encrypting it in place. That copy is a glibc `memcpy` of up to 16 KiB,
/// which on our test machine (AMD EPYC, glibc 2.36, `rep movsb` for large copies) runs at
/// 1-3 GB/s instead of 35-50 GB/s whenever `(destination - source) mod 4096` is small and
/// positive (4K aliasing; a C loop of 16 KiB copies found [1, 31] slow for every source
/// alignment tried, an earlier one about [1, 47]; distances 0, 42, 48, 64, 126, -5 and -64
/// are fast). With mimalloc (as `sockframe` uses) rustls's record buffers are
/// 4 KiB-aligned blocks, so the destination is always 5 mod 4096; a payload whose records
/// start at 0 mod 4096 (full 16 KiB records taken from a page-aligned buffer, 64 KiB per
/// write) was copied at distance 5 for 96 % of the records (counted with an `LD_PRELOAD`ed
/// `memcpy`), and that copy was 43 % of `sockframe bench`'s time in TLS throughput runs.
///
/// With 16,320-byte records the source moves by 64 bytes (mod 4096) from one record to the
/// next, so at most one record in 64 can land in the slow window, whatever the allocator. The
/// cost is 0.4 % more records (22 bytes of header and tag, and one AEAD call, each). Writes
/// must also not restart every record at the same offset: see [`RecordWrites`].
pub const RECORD_PLAINTEXT: usize = 16 * 1024 - 64;

/// `max_fragment_size` as rustls counts it: the record's plaintext plus its 5-byte header.
const MAX_FRAGMENT_SIZE: usize = RECORD_PLAINTEXT + 5;

/// The most one write hands to rustls: four whole records, just under rustls's default
/// buffer limit of 64 KiB (which it would otherwise take in full, as 4 records and a
/// 256-byte fifth, so that every 64 KiB the records start at the same offset mod 4096 again).
pub const WRITE_CHUNK: usize = 4 * RECORD_PLAINTEXT;

// Records must not start at the same offset mod 4096 again and again, and a write must be
// whole records that rustls takes in full.
const _: () = assert!(RECORD_PLAINTEXT % 4096 != 0 && WRITE_CHUNK <= 64 * 1024);

/// A TLS stream whose writes hand rustls at most [`WRITE_CHUNK`] bytes at a time (whole
/// [`RECORD_PLAINTEXT`] records), so that the source of successive records keeps moving
/// against rustls's buffers; reads pass through. See [`RECORD_PLAINTEXT`] for why.
#[derive(Debug)]
pub struct RecordWrites<S>(pub S);

impl<S: AsyncRead + Unpin> AsyncRead for RecordWrites<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for RecordWrites<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let n = buf.len().min(WRITE_CHUNK);
        Pin::new(&mut self.get_mut().0).poll_write(cx, &buf[..n])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let inner = &mut self.get_mut().0;
        // As many slices as fit in one chunk, the last one cut (on the stack: this runs at
        // every poll and holds nothing across one).
        const MAX: usize = 64;
        let mut cut = [IoSlice::new(&[]); MAX];
        let (mut count, mut total) = (0, 0);
        for b in bufs.iter().take(MAX) {
            if total == WRITE_CHUNK {
                break;
            }
            let take = b.len().min(WRITE_CHUNK - total);
            cut[count] = IoSlice::new(&b[..take]);
            count += 1;
            total += take;
        }
        Pin::new(inner).poll_write_vectored(cx, &cut[..count])
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}

/// Reads every certificate in a PEM file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let context = || format!("cannot read certificates from {}", path.display());
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| TlsError::new(context(), pem_error(e)))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::new(context(), pem_error(e)))?;
    if certs.is_empty() {
        return Err(TlsError::new(
            context(),
            "no `BEGIN CERTIFICATE` section in the file",
        ));
    }
    Ok(certs)
}

/// Reads the private key in a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| {
        TlsError::new(
            format!("cannot read a private key from {}", path.display()),
            match e {
                rustls::pki_types::pem::Error::NoItemsFound => {
                    "no `BEGIN PRIVATE KEY` (or RSA / EC PRIVATE KEY) section in the file".into()
                }
                other => pem_error(other),
            },
        )
    })
}

fn pem_error(e: rustls::pki_types::pem::Error) -> String {
    match e {
        rustls::pki_types::pem::Error::Io(io) => crate::reason::plain_io_message(&io),
        other => other.to_string(),
    }
}

/// A root store with the certificates of a PEM file.
fn roots_from(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(path)? {
        roots.add(cert).map_err(|e| {
            TlsError::new(
                format!("cannot use the CA certificate in {}", path.display()),
                e,
            )
        })?;
    }
    Ok(roots)
}

/// The server's TLS settings, loaded from files and reloadable without a restart: new
/// connections use the configuration loaded last.
#[derive(Debug)]
pub struct ServerTls {
    cert: PathBuf,
    key: PathBuf,
    client_ca: Option<PathBuf>,
    current: RwLock<Arc<rustls::ServerConfig>>,
}

impl ServerTls {
    /// Loads a certificate chain and its key; with `client_ca`, clients must present a
    /// certificate signed by that CA (mutual TLS).
    pub fn from_files(
        cert: impl Into<PathBuf>,
        key: impl Into<PathBuf>,
        client_ca: Option<PathBuf>,
    ) -> Result<Self, TlsError> {
        let (cert, key) = (cert.into(), key.into());
        let config = server_config(&cert, &key, client_ca.as_deref())?;
        Ok(ServerTls {
            cert,
            key,
            client_ca,
            current: RwLock::new(config),
        })
    }

    /// Loads the files again. On error the previous configuration stays in force.
    pub fn reload(&self) -> Result<(), TlsError> {
        let config = server_config(&self.cert, &self.key, self.client_ca.as_deref())?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = config;
        Ok(())
    }

    /// Whether clients must present certificates.
    pub fn requires_client_certs(&self) -> bool {
        self.client_ca.is_some()
    }

    pub(crate) fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        let config = self
            .current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        tokio_rustls::TlsAcceptor::from(config)
    }
}

fn server_config(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let certs = load_certs(cert)?;
    let key_der = load_key(key)?;
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::new("cannot configure TLS", e))?;
    let builder = match client_ca {
        Some(ca) => {
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots_from(ca)?), provider())
                    .build()
                    .map_err(|e| {
                        TlsError::new(format!("cannot use {} as client CA", ca.display()), e)
                    })?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(certs, key_der).map_err(|e| {
        TlsError::new(
            format!(
                "the certificate {} and the key {} do not make a usable pair",
                cert.display(),
                key.display()
            ),
            e,
        )
    })?;
    config.max_fragment_size = Some(MAX_FRAGMENT_SIZE);
    Ok(Arc::new(config))
}

/// The client's TLS settings.
#[derive(Debug, Clone)]
pub struct ClientTls {
    /// The rustls configuration, shared by every connection.
    pub config: Arc<rustls::ClientConfig>,
    /// The name to verify the server's certificate against; default: the host part of the
    /// address connected to.
    pub server_name: Option<String>,
}

/// How a client checks the server and identifies itself.
#[derive(Debug, Clone, Default)]
pub struct ClientTlsOptions {
    /// Trust this CA (PEM) in addition to the system's roots.
    pub ca: Option<PathBuf>,
    /// Do not use the system's roots (only `ca`).
    pub no_system_roots: bool,
    /// Skip verifying the server's certificate. Anyone on the path can then read and change
    /// the traffic; for tests against throw-away certificates only.
    pub insecure: bool,
    /// Client certificate and key (PEM), for servers that require mutual TLS.
    pub identity: Option<(PathBuf, PathBuf)>,
    /// Name to verify the server against (default: the host of the address).
    pub server_name: Option<String>,
}

impl ClientTls {
    /// Builds the client configuration.
    pub fn new(options: &ClientTlsOptions) -> Result<Self, TlsError> {
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::new("cannot configure TLS", e))?;
        let builder = if options.insecure {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NoVerification(provider())))
        } else {
            let mut roots = RootCertStore::empty();
            if !options.no_system_roots {
                // Unreadable system roots are not fatal: a given CA may be all that is needed.
                let native = rustls_native_certs::load_native_certs();
                roots.add_parsable_certificates(native.certs);
            }
            if let Some(ca) = &options.ca {
                for cert in load_certs(ca)? {
                    roots.add(cert).map_err(|e| {
                        TlsError::new(
                            format!("cannot use the CA certificate in {}", ca.display()),
                            e,
                        )
                    })?;
                }
            }
            if roots.is_empty() {
                return Err(TlsError::new(
                    "cannot verify servers",
                    "no trusted roots (give --ca PEM)",
                ));
            }
            builder.with_root_certificates(roots)
        };
        let mut config = match &options.identity {
            Some((cert, key)) => builder
                .with_client_auth_cert(load_certs(cert)?, load_key(key)?)
                .map_err(|e| {
                    TlsError::new(
                        format!(
                            "the certificate {} and the key {} do not make a usable pair",
                            cert.display(),
                            key.display()
                        ),
                        e,
                    )
                })?,
            None => builder.with_no_client_auth(),
        };
        config.max_fragment_size = Some(MAX_FRAGMENT_SIZE);
        Ok(ClientTls {
            config: Arc::new(config),
            server_name: options.server_name.clone(),
        })
    }

    /// The name to check the server's certificate against, for a connection to `addr`.
    pub(crate) fn server_name(&self, addr: &str) -> Result<ServerName<'static>, TlsError> {
        let host = match &self.server_name {
            Some(name) => name.as_str(),
            None => host_of(addr),
        };
        ServerName::try_from(host.to_string())
            .map_err(|e| TlsError::new(format!("cannot verify the server as {host:?}"), e))
    }
}

/// The host part of `host:port`, `[v6]:port` or a bare host.
fn host_of(addr: &str) -> &str {
    if let Some(rest) = addr.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match addr.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') && port.parse::<u16>().is_ok() => host,
        _ => addr,
    }
}

/// The name in a client certificate: its first DNS name, else its common name.
pub(crate) fn certificate_name(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    if let Ok(Some(san)) = parsed.subject_alternative_name() {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(dns) = name {
                return Some((*dns).to_string());
            }
        }
    }
    parsed
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_string)
}

/// Accepts any server certificate: what `--insecure` asks for.
#[derive(Debug)]
struct NoVerification(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerification {
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

/// PEM files of a throw-away CA and the certificates it signed, from [`generate`].
#[derive(Debug, Clone)]
pub struct Generated {
    /// The CA certificate (give it to clients as `--ca`, to servers as `--client-ca`).
    pub ca_cert: String,
    /// The CA's private key.
    pub ca_key: String,
    /// The server certificate, valid for the names given.
    pub server_cert: String,
    /// The server's private key.
    pub server_key: String,
    /// A client certificate (name `sockframe-client`), for mutual TLS.
    pub client_cert: String,
    /// The client's private key.
    pub client_key: String,
}

/// Creates a local CA and a server and a client certificate signed by it. `names` are the
/// server's DNS names or IP addresses (e.g. `localhost`, `127.0.0.1`).
pub fn generate(names: &[String], client_name: &str) -> Result<Generated, TlsError> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
    let err = |e: rcgen::Error| TlsError::new("cannot create certificates", e);

    let ca_key = KeyPair::generate().map_err(err)?;
    let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "sockframe local CA");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca.self_signed(&ca_key).map_err(err)?;

    let server_key = KeyPair::generate().map_err(err)?;
    let mut server = CertificateParams::new(names.to_vec()).map_err(err)?;
    server.distinguished_name.push(
        DnType::CommonName,
        names.first().map_or("localhost", |n| n.as_str()),
    );
    let server_cert = server
        .signed_by(&server_key, &ca_cert, &ca_key)
        .map_err(err)?;

    let client_key = KeyPair::generate().map_err(err)?;
    let mut client = CertificateParams::new(vec![client_name.to_string()]).map_err(err)?;
    client
        .distinguished_name
        .push(DnType::CommonName, client_name);
    let client_cert = client
        .signed_by(&client_key, &ca_cert, &ca_key)
        .map_err(err)?;

    Ok(Generated {
        ca_cert: ca_cert.pem(),
        ca_key: ca_key.serialize_pem(),
        server_cert: server_cert.pem(),
        server_key: server_key.serialize_pem(),
        client_cert: client_cert.pem(),
        client_key: client_key.serialize_pem(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aes_128_gcm_is_preferred_and_nothing_is_dropped() {
        let ours = provider();
        assert_eq!(
            ours.cipher_suites[0].suite(),
            rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
        );
        let ring = rustls::crypto::ring::default_provider();
        assert_eq!(ours.cipher_suites.len(), ring.cipher_suites.len());
    }

    #[test]
    fn our_configurations_send_records_of_record_plaintext() {
        let client = ClientTls::new(&ClientTlsOptions {
            insecure: true,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(client.config.max_fragment_size, Some(RECORD_PLAINTEXT + 5));
    }

    /// Takes every write in full and remembers its size.
    #[derive(Default)]
    struct Sizes(Vec<usize>);

    impl AsyncWrite for Sizes {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.get_mut().0.push(buf.len());
            Poll::Ready(Ok(buf.len()))
        }

        fn poll_write_vectored(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let n = bufs.iter().map(|b| b.len()).sum();
            self.get_mut().0.push(n);
            Poll::Ready(Ok(n))
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn writes_are_cut_into_whole_chunks() {
        use tokio::io::AsyncWriteExt;
        let data = vec![7u8; 3 * WRITE_CHUNK + 100];
        let mut w = RecordWrites(Sizes::default());
        w.write_all(&data).await.unwrap();
        assert_eq!(w.0.0, [WRITE_CHUNK, WRITE_CHUNK, WRITE_CHUNK, 100]);

        // Vectored: slices gathered up to one chunk, the last one cut.
        let mut w = RecordWrites(Sizes::default());
        let (a, b) = (vec![1u8; 1000], vec![2u8; 2 * WRITE_CHUNK]);
        let n = w
            .write_vectored(&[IoSlice::new(&a), IoSlice::new(&b)])
            .await
            .unwrap();
        assert_eq!(n, WRITE_CHUNK);
        let n = w.write_vectored(&[IoSlice::new(&a)]).await.unwrap();
        assert_eq!(n, 1000);
        assert_eq!(w.0.0, [WRITE_CHUNK, 1000]);
    }

    #[test]
    fn host_is_taken_from_the_address() {
        assert_eq!(host_of("localhost:1234"), "localhost");
        assert_eq!(host_of("127.0.0.1:1"), "127.0.0.1");
        assert_eq!(host_of("[::1]:1234"), "::1");
        assert_eq!(host_of("example.org"), "example.org");
    }

    #[test]
    fn missing_files_are_named_in_the_error() {
        let e = load_certs(Path::new("/nonexistent/cert.pem")).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/cert.pem"), "{e}");
    }
}
