//! The agent side of enrollment: TLS that accepts any certificate, as agents do by default.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;

/// The TLS provider the proxy uses (ring, classic groups as agents and authd negotiate).
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    wazuh_proxy_core::enroll::tls::provider()
}

/// A TLS client for the enrollment port that accepts any certificate, as agents do by default.
pub fn enroll_connector() -> tokio_rustls::TlsConnector {
    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    use rustls::{DigitallySignedStruct, SignatureScheme};

    #[derive(Debug)]
    struct AnyCert;

    impl ServerCertVerifier for AnyCert {
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
            rustls::crypto::verify_tls12_signature(
                m,
                c,
                d,
                &provider().signature_verification_algorithms,
            )
        }
        fn verify_tls13_signature(
            &self,
            m: &[u8],
            c: &CertificateDer<'_>,
            d: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                m,
                c,
                d,
                &provider().signature_verification_algorithms,
            )
        }
        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            provider()
                .signature_verification_algorithms
                .supported_schemes()
        }
    }

    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCert))
        .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// Sends `request` over TLS to an enrollment front and returns the reply (read to the close)
/// and the client's local address. Write errors are ignored: the front may stop reading.
pub async fn enroll_raw(addr: SocketAddr, request: &[u8]) -> (String, SocketAddr) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tcp = TcpStream::connect(addr).await.unwrap();
    let local = tcp.local_addr().unwrap();
    let name = rustls::pki_types::ServerName::try_from("wazuh-proxy").unwrap();
    let mut tls = enroll_connector().connect(name, tcp).await.unwrap();
    let _ = tls.write_all(request).await;
    let _ = tls.flush().await;
    let mut reply = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut reply)).await;
    (String::from_utf8_lossy(&reply).into_owned(), local)
}

/// Sends `line` over TLS to an enrollment front; reads the reply to the close when `read`,
/// else goes away at once (an agent that gives up).
pub async fn enroll(addr: SocketAddr, line: &str, read: bool) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("wazuh-proxy").unwrap();
    let mut tls = enroll_connector().connect(name, tcp).await.unwrap();
    tls.write_all(line.as_bytes()).await.unwrap();
    tls.flush().await.unwrap();
    if !read {
        return String::new();
    }
    let mut reply = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut reply)).await;
    String::from_utf8_lossy(&reply).into_owned()
}
