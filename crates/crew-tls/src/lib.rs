//! TLS for agent connections that leave the machine.
//!
//! The trust model is certificate pinning, not a PKI: a controller that
//! needs TLS makes a fresh key pair and a self-signed certificate when it
//! starts, and tells each agent it launches the SHA-256 of that
//! certificate (`CREW_TLS_SHA256`, next to the address and the launch
//! secret). An agent accepts exactly that certificate and nothing else, so
//! no certificate authority, host name or clock is involved, and the
//! fingerprint is no secret: knowing it does not let anyone impersonate the
//! controller, which alone holds the private key (in memory, never on
//! disk). What TLS adds to the launch secret is confidentiality: the
//! secret and every job, output and log line cross the network encrypted,
//! and nobody on the path can take over a connection.
//!
//! Only TLS 1.3 is offered, with the `ring` provider given explicitly (the
//! process-wide default provider is never installed or read, so another
//! crate's choice cannot change ours).

use std::fmt;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};

/// The name agents ask for in the TLS handshake (the pin, not the name, is
/// what they check).
const SERVER_NAME: &str = "crew-controller";

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// The certificate or key could not be made.
    #[error("could not make the controller's TLS certificate: {0}")]
    Certificate(String),
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    /// A fingerprint is not 64 hexadecimal digits.
    #[error("{0:?} is not a SHA-256 fingerprint (64 hexadecimal digits)")]
    Fingerprint(String),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The SHA-256 of a DER certificate, as 64 lowercase hexadecimal digits.
pub fn fingerprint(cert_der: &[u8]) -> String {
    let digest = Sha256::digest(cert_der);
    let mut hex = String::with_capacity(64);
    for b in digest {
        hex.push_str(&format!("{b:02x}"));
    }
    hex
}

/// Parses a fingerprint as given in `CREW_TLS_SHA256` (case-insensitive,
/// `:` separators allowed, as tools print them).
pub fn parse_fingerprint(text: &str) -> Result<[u8; 32], TlsError> {
    let digits: String = text.trim().chars().filter(|c| *c != ':').collect();
    let bad = || TlsError::Fingerprint(text.to_owned());
    if digits.len() != 64 || !digits.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(bad());
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(digits.get(2 * i..2 * i + 2).ok_or_else(bad)?, 16).map_err(|_| bad())?;
    }
    Ok(out)
}

/// The controller's side: an ephemeral certificate and the acceptor that
/// presents it.
#[derive(Clone)]
pub struct ControllerTls {
    acceptor: tokio_rustls::TlsAcceptor,
    fingerprint: String,
}

impl fmt::Debug for ControllerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ControllerTls").field("fingerprint", &self.fingerprint).finish_non_exhaustive()
    }
}

impl ControllerTls {
    /// A fresh ECDSA P-256 key pair and a self-signed certificate for it,
    /// held in memory only.
    pub fn generate() -> Result<Self, TlsError> {
        let key = rcgen::KeyPair::generate().map_err(|e| TlsError::Certificate(e.to_string()))?;
        let params = rcgen::CertificateParams::new(vec![SERVER_NAME.to_owned()])
            .map_err(|e| TlsError::Certificate(e.to_string()))?;
        let cert = params.self_signed(&key).map_err(|e| TlsError::Certificate(e.to_string()))?;
        let cert_der: CertificateDer<'static> = cert.der().clone();
        let fingerprint = fingerprint(&cert_der);
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let config = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_no_client_auth()
            .with_single_cert(vec![cert_der], key_der)?;
        Ok(Self { acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)), fingerprint })
    }

    /// The certificate's SHA-256, which agents pin.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// The acceptor for agent connections (TLS 1.3, this certificate).
    pub fn acceptor(&self) -> &tokio_rustls::TlsAcceptor {
        &self.acceptor
    }
}

/// The agent's side: a connector that accepts only the certificate whose
/// SHA-256 is `pin`.
pub fn connector(pin: [u8; 32]) -> Result<tokio_rustls::TlsConnector, TlsError> {
    let provider = provider();
    let verifier = Arc::new(Pinned { pin, provider: provider.clone() });
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// The server name agents send.
pub fn server_name() -> ServerName<'static> {
    ServerName::try_from(SERVER_NAME).expect("a valid DNS name")
}

/// Accepts one certificate, by its SHA-256; the handshake signature is
/// still checked against that certificate's key, which proves the peer
/// holds the private key.
#[derive(Debug)]
struct Pinned {
    pin: [u8; 32],
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if Sha256::digest(end_entity.as_ref()).as_slice() == self.pin {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(rustls::CertificateError::ApplicationVerificationFailure))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn fingerprints_parse_in_the_forms_tools_print() {
        let hex = fingerprint(b"certificate");
        assert_eq!(hex.len(), 64);
        let bytes = parse_fingerprint(&hex).expect("own form");
        assert_eq!(parse_fingerprint(&hex.to_uppercase()).expect("upper case"), bytes);
        let colons: Vec<String> = bytes.iter().map(|b| format!("{b:02X}")).collect();
        assert_eq!(parse_fingerprint(&colons.join(":")).expect("colons"), bytes);
        for bad in ["", "abc", &hex[..62], &format!("{}zz", &hex[..62]), &format!("+{}", &hex[..63])] {
            assert!(parse_fingerprint(bad).is_err(), "{bad:?}");
        }
    }

    async fn handshake(server: &ControllerTls, pin: [u8; 32]) -> std::io::Result<Vec<u8>> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let acceptor = server.acceptor().clone();
        let served = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await?;
            let mut tls = acceptor.accept(tcp).await?;
            tls.write_all(b"welcome").await?;
            tls.shutdown().await?;
            Ok::<_, std::io::Error>(())
        });
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        let connector = connector(pin).map_err(std::io::Error::other)?;
        let mut tls = connector.connect(server_name(), tcp).await?;
        let mut got = Vec::new();
        tls.read_to_end(&mut got).await?;
        served.await.map_err(std::io::Error::other)??;
        Ok(got)
    }

    #[tokio::test]
    async fn an_agent_accepts_the_pinned_certificate_only() {
        let server = ControllerTls::generate().expect("certificate");
        let pin = parse_fingerprint(server.fingerprint()).expect("pin");
        assert_eq!(handshake(&server, pin).await.expect("handshake with the right pin"), b"welcome");
        // Another controller's certificate (or a man in the middle's).
        let other = ControllerTls::generate().expect("certificate");
        assert_ne!(other.fingerprint(), server.fingerprint(), "every controller has its own key");
        let err = handshake(&other, pin).await.expect_err("a certificate that is not pinned");
        assert!(err.to_string().contains("certificate"), "{err}");
    }
}
