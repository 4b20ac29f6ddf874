//! TLS for the enrollment front: the certificate agents see, and how the proxy checks the
//! managers' certificates.
//!
//! Agents do not verify the manager's certificate unless `<server_ca_path>` is configured, so a
//! self-signed certificate generated on first start works for them; its SHA-256 fingerprint is
//! logged so that agents which do pin it can be given the right one. Managers present
//! `sslmanager.cert`, which authd generates self-signed by default: verifying it needs that
//! certificate (or its CA) as a CA file, and [`BackendTls::NoVerify`] exists for the default
//! setup, with a warning at startup.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use sha2::{Digest, Sha256};

/// Where the certificate agents see comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerCert {
    /// A certificate chain (leaf first) and its private key, both PEM files.
    Files {
        /// The certificate chain.
        cert: PathBuf,
        /// The private key (PKCS#8, PKCS#1 or SEC1).
        key: PathBuf,
    },
    /// A self-signed certificate kept on disk: loaded when both files exist, generated and
    /// written (key with mode 0600) when neither does.
    SelfSigned {
        /// Where the certificate is kept.
        cert: PathBuf,
        /// Where the private key is kept.
        key: PathBuf,
        /// Subject alternative names for a new certificate (default `wazuh-proxy`).
        names: Vec<String>,
    },
}

impl ServerCert {
    /// A self-signed certificate kept at `cert` and `key`, named `wazuh-proxy`.
    pub fn self_signed(cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        ServerCert::SelfSigned {
            cert: cert.into(),
            key: key.into(),
            names: vec!["wazuh-proxy".to_owned()],
        }
    }
}

/// How the proxy checks the enrollment backends' certificates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendTls {
    /// Verify against the certificates in a PEM file (the managers' `sslmanager.cert`, or
    /// their CA).
    VerifyCa {
        /// The PEM file of trusted certificates.
        ca_file: PathBuf,
        /// The name to check the certificate against; `None` checks the backend's IP address.
        server_name: Option<String>,
    },
    /// Accept any certificate (`verify = false`). Encrypted but not authenticated: whoever can
    /// redirect the proxy's traffic sees passwords and keys. Logged as a warning at startup.
    NoVerify,
}

/// The certificate the proxy presents to the managers, for managers that require one
/// (authd's `<ssl_agent_ca>`): it must be signed by that CA. With `<ssl_verify_host>`, authd
/// also matches it against the connection's source address, which is then the proxy's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCert {
    /// The certificate chain (PEM, leaf first).
    pub cert: PathBuf,
    /// Its private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

impl ClientCert {
    /// Reads and checks both files: a certificate chain and a private key that rustls
    /// accepts together.
    ///
    /// # Errors
    /// [`TlsError`] naming the file that is unreadable, empty or does not match.
    pub fn check(&self) -> Result<(), TlsError> {
        let (chain, key) = self.load()?;
        ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(RootCertStore::empty())
            .with_client_auth_cert(chain, key)?;
        Ok(())
    }

    fn load(&self) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
        let chain = read_certs(&self.cert)?;
        let key = PrivateKeyDer::from_pem_file(&self.key).map_err(|e| match e {
            rustls_pki_types::pem::Error::Io(error) => TlsError::Io {
                path: self.key.clone(),
                error,
            },
            e => TlsError::Pem {
                path: self.key.clone(),
                what: format!("no usable private key ({e})"),
            },
        })?;
        Ok((chain, key))
    }
}

/// Why the TLS setup failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A file could not be read or written.
    #[error("{path}: {error}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        error: std::io::Error,
    },
    /// A PEM file holds nothing usable.
    #[error("{path}: {what}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        what: String,
    },
    /// Only one of the self-signed certificate's two files exists.
    #[error("{present} exists but {missing} does not; remove it to generate a new pair, or restore the other file")]
    HalfPair {
        /// The file that exists.
        present: PathBuf,
        /// The file that is missing.
        missing: PathBuf,
    },
    /// Certificate generation failed.
    #[error("cannot generate a self-signed certificate: {0}")]
    Generate(String),
    /// rustls refused the configuration (say, a key that does not match the certificate).
    #[error("TLS configuration refused: {0}")]
    Rustls(#[from] rustls::Error),
    /// The configured server name is not a valid DNS name or IP address.
    #[error("invalid backend server name {0:?}")]
    ServerName(String),
}

/// The crypto provider the enrollment front and its clients use: ring, chosen explicitly so that
/// no process-wide default has to be installed.
///
/// rustls 0.23.48 deprecates ring's provider because it offers no post-quantum key exchange.
/// Wazuh 4.x agents and authd negotiate classic groups (X25519, P-256) through OpenSSL, and the
/// alternative (aws-lc-rs) needs cmake and a C toolchain beyond what the build asks for today, so
/// ring stays until the agents offer a hybrid group.
#[allow(deprecated)]
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The SHA-256 fingerprint of a DER certificate, as `openssl x509 -fingerprint -sha256` prints it
/// (`AB:CD:...`).
pub fn fingerprint(der: &[u8]) -> String {
    let digest = Sha256::digest(der);
    let mut out = String::with_capacity(95);
    for (i, b) in digest.iter().enumerate() {
        if i > 0 {
            out.push(':');
        }
        let _ = write!(out, "{b:02X}");
    }
    out
}

/// The server side: the rustls configuration and the leaf certificate's fingerprint.
pub(crate) fn server_config(source: &ServerCert) -> Result<(Arc<ServerConfig>, String), TlsError> {
    let (cert_path, key_path) = match source {
        ServerCert::Files { cert, key } => (cert, key),
        ServerCert::SelfSigned { cert, key, names } => {
            match (cert.exists(), key.exists()) {
                (true, true) => {}
                (false, false) => generate(cert, key, names)?,
                (true, false) => {
                    return Err(TlsError::HalfPair {
                        present: cert.clone(),
                        missing: key.clone(),
                    })
                }
                (false, true) => {
                    return Err(TlsError::HalfPair {
                        present: key.clone(),
                        missing: cert.clone(),
                    })
                }
            }
            (cert, key)
        }
    };
    let chain = read_certs(cert_path)?;
    let key = PrivateKeyDer::from_pem_file(key_path).map_err(|e| TlsError::Pem {
        path: key_path.clone(),
        what: format!("no usable private key ({e})"),
    })?;
    let fp = fingerprint(&chain[0]);
    let config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    Ok((Arc::new(config), fp))
}

/// The client side, towards the managers, with a client certificate when given.
pub(crate) fn client_config(
    backend: &BackendTls,
    client_cert: Option<&ClientCert>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let builder =
        ClientConfig::builder_with_provider(provider()).with_safe_default_protocol_versions()?;
    let config = match backend {
        BackendTls::VerifyCa { ca_file, .. } => {
            let mut roots = RootCertStore::empty();
            for cert in read_certs(ca_file)? {
                roots.add(cert).map_err(|e| TlsError::Pem {
                    path: ca_file.clone(),
                    what: format!("unusable CA certificate ({e})"),
                })?;
            }
            let builder = builder.with_root_certificates(roots);
            match client_cert {
                Some(c) => {
                    let (chain, key) = c.load()?;
                    builder.with_client_auth_cert(chain, key)?
                }
                None => builder.with_no_client_auth(),
            }
        }
        BackendTls::NoVerify => {
            let builder = builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AcceptAny(
                    provider().signature_verification_algorithms,
                )));
            match client_cert {
                Some(c) => {
                    let (chain, key) = c.load()?;
                    builder.with_client_auth_cert(chain, key)?
                }
                None => builder.with_no_client_auth(),
            }
        }
    };
    Ok(Arc::new(config))
}

/// The name a backend's certificate is checked against.
pub(crate) fn backend_name(
    backend: &BackendTls,
    addr: std::net::SocketAddr,
) -> Result<ServerName<'static>, TlsError> {
    match backend {
        BackendTls::VerifyCa {
            server_name: Some(name),
            ..
        } => ServerName::try_from(name.clone()).map_err(|_| TlsError::ServerName(name.clone())),
        _ => Ok(ServerName::IpAddress(addr.ip().into())),
    }
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let iter = CertificateDer::pem_file_iter(path).map_err(|e| pem_or_io(path, e))?;
    let certs = iter
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_or_io(path, e))?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: path.to_owned(),
            what: "no certificate found".to_owned(),
        });
    }
    Ok(certs)
}

fn pem_or_io(path: &Path, e: rustls_pki_types::pem::Error) -> TlsError {
    match e {
        rustls_pki_types::pem::Error::Io(error) => TlsError::Io {
            path: path.to_owned(),
            error,
        },
        other => TlsError::Pem {
            path: path.to_owned(),
            what: other.to_string(),
        },
    }
}

fn generate(cert: &Path, key: &Path, names: &[String]) -> Result<(), TlsError> {
    let names = if names.is_empty() {
        vec!["wazuh-proxy".to_owned()]
    } else {
        names.to_vec()
    };
    let generated =
        rcgen::generate_simple_self_signed(names).map_err(|e| TlsError::Generate(e.to_string()))?;
    let key_pem = zeroize::Zeroizing::new(generated.key_pair.serialize_pem());
    write_new(key, key_pem.as_bytes(), 0o600)?;
    write_new(cert, generated.cert.pem().as_bytes(), 0o644)?;
    tracing::info!(cert = %cert.display(), key = %key.display(), "generated a self-signed enrollment certificate");
    Ok(())
}

/// Writes a file that must not exist yet (never overwrites a certificate or key).
fn write_new(path: &Path, data: &[u8], mode: u32) -> Result<(), TlsError> {
    let io = |error| TlsError::Io {
        path: path.to_owned(),
        error,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    let mut file = options.open(path).map_err(io)?;
    file.write_all(data).map_err(io)?;
    file.sync_all().map_err(io)
}

/// Accepts any certificate, but still checks the handshake signatures, so the session is at
/// least bound to the certificate that was presented.
#[derive(Debug)]
struct AcceptAny(WebPkiSupportedAlgorithms);

impl ServerCertVerifier for AcceptAny {
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
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_schemes()
    }
}
