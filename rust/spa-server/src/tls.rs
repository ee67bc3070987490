//! TLS: rustls (ring provider) server config from PEM files, and self-signed dev certificates.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::Path;
use std::sync::Arc;

/// A PEM certificate chain and private key.
#[derive(Debug, Clone)]
pub struct CertPair {
    /// Certificate chain (PEM).
    pub cert_pem: String,
    /// Private key (PEM).
    pub key_pem: String,
}

/// Generates a self-signed certificate for `localhost` and `127.0.0.1` (development only).
pub fn dev_cert() -> Result<CertPair, String> {
    let ck =
        rcgen::generate_simple_self_signed(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .map_err(|e| e.to_string())?;
    Ok(CertPair {
        cert_pem: ck.cert.pem(),
        key_pem: ck.signing_key.serialize_pem(),
    })
}

/// Writes a dev certificate to `dir/dev-cert.pem` and `dir/dev-key.pem` (key mode 0600).
pub fn write_dev_cert(dir: &Path) -> Result<CertPair, String> {
    let c = dev_cert()?;
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    std::fs::write(dir.join("dev-cert.pem"), &c.cert_pem).map_err(|e| e.to_string())?;
    let key = dir.join("dev-key.pem");
    std::fs::write(&key, &c.key_pem).map_err(|e| e.to_string())?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600));
    }
    Ok(c)
}

/// Reads a certificate chain and key from PEM files.
pub fn read_pem_files(cert: &Path, key: &Path) -> Result<CertPair, String> {
    Ok(CertPair {
        cert_pem: std::fs::read_to_string(cert).map_err(|e| format!("{}: {e}", cert.display()))?,
        key_pem: std::fs::read_to_string(key).map_err(|e| format!("{}: {e}", key.display()))?,
    })
}

/// A rustls server config (TLS 1.2/1.3, ALPN h2 + http/1.1).
pub fn server_config(pair: &CertPair) -> Result<Arc<rustls::ServerConfig>, String> {
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(pair.cert_pem.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(|e| format!("certificate: {e}"))?;
    let key = PrivateKeyDer::from_pem_slice(pair.key_pem.as_bytes())
        .map_err(|e| format!("private key: {e}"))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| e.to_string())?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}
