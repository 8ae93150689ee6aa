//! rustls client configuration (ring provider, webpki roots plus an optional extra CA).

use std::sync::Arc;

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

use crate::config::UploadConfig;
use crate::error::UploadError;

pub(crate) fn client_config(cfg: &UploadConfig) -> Result<Arc<rustls::ClientConfig>, UploadError> {
    let mut roots = rustls::RootCertStore::empty();
    if cfg.webpki_roots {
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    }
    if let Some(path) = &cfg.extra_ca_pem {
        let certs = CertificateDer::pem_file_iter(path)
            .map_err(|e| UploadError::Config(format!("cannot read CA {}: {e}", path.display())))?;
        let mut n = 0;
        for cert in certs {
            let cert =
                cert.map_err(|e| UploadError::Config(format!("bad CA {}: {e}", path.display())))?;
            roots
                .add(cert)
                .map_err(|e| UploadError::Config(format!("bad CA {}: {e}", path.display())))?;
            n += 1;
        }
        if n == 0 {
            return Err(UploadError::Config(format!(
                "no certificate in {}",
                path.display()
            )));
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| UploadError::Config(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = if cfg.http1_only {
        vec![b"http/1.1".to_vec()]
    } else {
        vec![b"h2".to_vec(), b"http/1.1".to_vec()]
    };
    Ok(Arc::new(tls))
}
