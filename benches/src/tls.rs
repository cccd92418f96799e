//! Certificates for the HTTPS configurations: a CA of the benchmark's own for the origin (the
//! proxies verify the origin against it), one for Squid's `ssl_bump`, the origin's TLS
//! acceptor and the load generator's client configurations.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// A certificate authority of the benchmark's.
pub struct BenchCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl BenchCa {
    /// A new CA named `name`.
    pub fn new(name: &str) -> anyhow::Result<BenchCa> {
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate()?)?;
        Ok(BenchCa { issuer })
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> String {
        self.issuer.pem()
    }

    /// The CA's private key, PEM (Squid signs its bumped certificates with it).
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// Writes the certificate (and, with `key`, the key) under `dir`; returns the paths.
    pub fn write(
        &self,
        dir: &Path,
        name: &str,
    ) -> anyhow::Result<(std::path::PathBuf, std::path::PathBuf)> {
        let cert = dir.join(format!("{name}.pem"));
        let key = dir.join(format!("{name}-key.pem"));
        std::fs::write(&cert, self.cert_pem())?;
        std::fs::write(&key, self.key_pem())?;
        Ok((cert, key))
    }

    /// A leaf certificate for the DNS `names` and the IP addresses `ips`, signed by this CA:
    /// (certificate, private key), PEM. The benchmark's origins and the end-to-end tests'
    /// origins both get theirs here.
    pub fn leaf_pem(
        &self,
        names: &[&str],
        ips: &[std::net::IpAddr],
    ) -> anyhow::Result<(String, String)> {
        let key = KeyPair::generate()?;
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())?;
        params
            .subject_alt_names
            .extend(ips.iter().map(|ip| rcgen::SanType::IpAddress(*ip)));
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// A server configuration with a certificate for `names`, signed by this CA.
    pub fn server_config(&self, names: &[&str]) -> anyhow::Result<Arc<rustls::ServerConfig>> {
        let (cert, key) = self.leaf_pem(names, &[])?;
        let chain =
            vec![CertificateDer::from_pem_slice(cert.as_bytes())
                .context("the origin certificate")?];
        let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).context("the origin key")?;
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
        Ok(Arc::new(config))
    }
}

/// A client configuration that trusts exactly the certificates in `ca_pem`.
pub fn client_trusting(ca_pem: &[u8]) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem) {
        roots.add(cert.context("a CA certificate")?)?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(Arc::new(config))
}
