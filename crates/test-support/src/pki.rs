//! A throwaway PKI: a CA plus a leaf for `IP:127.0.0.1` / `localhost`, as PEM files and DER.

use std::path::PathBuf;
use std::sync::Arc;

/// A CA and a leaf certificate signed by it, written under a temp dir.
#[derive(Debug)]
pub struct Pki {
    /// Where the PEM files are.
    pub dir: tempfile::TempDir,
    /// The CA certificate (PEM), for clients to trust.
    pub ca_pem: PathBuf,
    /// The leaf certificate (PEM), for servers.
    pub cert_pem: PathBuf,
    /// The leaf's private key (PEM).
    pub key_pem: PathBuf,
    /// The leaf certificate (DER).
    pub cert_der: rustls::pki_types::CertificateDer<'static>,
    /// The leaf's private key (PKCS#8 DER).
    pub key_der: Vec<u8>,
}

impl Pki {
    /// Generates a new CA and leaf.
    pub fn new() -> Self {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, SanType};
        let dir = tempfile::tempdir().expect("pki temp dir");
        let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "kiln test CA");
        let ca_key = KeyPair::generate().expect("CA key");
        let ca_issuer = rcgen::CertifiedIssuer::self_signed(ca, ca_key).expect("CA cert");
        let mut leaf = CertificateParams::new(vec!["localhost".to_owned()]).expect("leaf params");
        leaf.subject_alt_names
            .push(SanType::IpAddress([127, 0, 0, 1].into()));
        leaf.distinguished_name
            .push(DnType::CommonName, "127.0.0.1");
        let leaf_key = KeyPair::generate().expect("leaf key");
        let cert = leaf.signed_by(&leaf_key, &ca_issuer).expect("leaf cert");
        let ca_pem = dir.path().join("ca.pem");
        let cert_pem = dir.path().join("cert.pem");
        let key_pem = dir.path().join("key.pem");
        std::fs::write(&ca_pem, ca_issuer.pem()).expect("write ca.pem");
        std::fs::write(&cert_pem, cert.pem()).expect("write cert.pem");
        std::fs::write(&key_pem, leaf_key.serialize_pem()).expect("write key.pem");
        Self {
            cert_der: cert.der().clone(),
            key_der: leaf_key.serialize_der(),
            dir,
            ca_pem,
            cert_pem,
            key_pem,
        }
    }

    /// A rustls server config with the leaf, offering h2 and http/1.1.
    pub fn server_config(&self) -> Arc<rustls::ServerConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(self.key_der.clone().into());
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_no_client_auth()
            .with_single_cert(vec![self.cert_der.clone()], key)
            .expect("server certificate");
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Arc::new(cfg)
    }
}

impl Default for Pki {
    fn default() -> Self {
        Self::new()
    }
}
