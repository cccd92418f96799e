//! A CA of the test's own, for origin certificates the gateway must verify.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair, SanType};

/// The CA of every test's protected origins ([`Origin::protected`]): one per test binary, so
/// [`entra_config`] can trust it without being told.
pub fn origin_ca() -> &'static TestCa {
    static CA: std::sync::OnceLock<TestCa> = std::sync::OnceLock::new();
    CA.get_or_init(|| TestCa::new("protected origins"))
}

/// A CA of the test's own, for origin certificates the gateway must verify.
pub struct TestCa {
    pub dir: tempfile::TempDir,
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl TestCa {
    pub fn new(name: &str) -> TestCa {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("{name} test CA"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let issuer =
            CertifiedIssuer::self_signed(params, KeyPair::generate().expect("key")).expect("CA");
        std::fs::write(dir.path().join("ca.pem"), issuer.pem()).expect("write CA");
        TestCa { dir, issuer }
    }

    pub fn cert_path(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// Writes a server certificate for `names`, localhost and 127.0.0.1; returns (cert, key)
    /// paths.
    pub fn server_cert(&self, names: &[&str]) -> (PathBuf, PathBuf) {
        let key = KeyPair::generate().expect("key");
        let mut all = vec!["localhost".to_string()];
        all.extend(names.iter().map(|n| n.to_string()));
        let mut params = CertificateParams::new(all).expect("params");
        params
            .subject_alt_names
            .push(SanType::IpAddress("127.0.0.1".parse().expect("ip")));
        let cert = params.signed_by(&key, &self.issuer).expect("sign");
        // Files of their own: an origin may read them after another was issued.
        static ISSUED: AtomicUsize = AtomicUsize::new(0);
        let n = ISSUED.fetch_add(1, Ordering::Relaxed);
        let cert_path = self.dir.path().join(format!("server-{n}.pem"));
        let key_path = self.dir.path().join(format!("server-{n}-key.pem"));
        std::fs::write(&cert_path, cert.pem()).expect("write cert");
        std::fs::write(&key_path, key.serialize_pem()).expect("write key");
        (cert_path, key_path)
    }
}
