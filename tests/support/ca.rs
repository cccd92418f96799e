//! A CA of the test's own, for origin certificates the gateway must verify.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use tollgate_benches::tls::BenchCa;

/// The CA of every test's protected origins ([`Origin::protected`]): one per test binary, so
/// [`entra_config`] can trust it without being told.
pub fn origin_ca() -> &'static TestCa {
    static CA: std::sync::OnceLock<TestCa> = std::sync::OnceLock::new();
    CA.get_or_init(|| TestCa::new("protected origins"))
}

/// A CA of the test's own, for origin certificates the gateway must verify (the benchmark's
/// CA, with its certificate and the leaves it signs written to files for the origins).
pub struct TestCa {
    pub dir: tempfile::TempDir,
    ca: BenchCa,
}

impl TestCa {
    pub fn new(name: &str) -> TestCa {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = BenchCa::new(&format!("{name} test CA")).expect("CA");
        std::fs::write(dir.path().join("ca.pem"), ca.cert_pem()).expect("write CA");
        TestCa { dir, ca }
    }

    pub fn cert_path(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// Writes a server certificate for `names`, localhost and 127.0.0.1; returns (cert, key)
    /// paths.
    pub fn server_cert(&self, names: &[&str]) -> (PathBuf, PathBuf) {
        let mut all = vec!["localhost"];
        all.extend_from_slice(names);
        let (cert, key) = self
            .ca
            .leaf_pem(&all, &["127.0.0.1".parse().expect("ip")])
            .expect("sign");
        // Files of their own: an origin may read them after another was issued.
        static ISSUED: AtomicUsize = AtomicUsize::new(0);
        let n = ISSUED.fetch_add(1, Ordering::Relaxed);
        let cert_path = self.dir.path().join(format!("server-{n}.pem"));
        let key_path = self.dir.path().join(format!("server-{n}-key.pem"));
        std::fs::write(&cert_path, cert).expect("write cert");
        std::fs::write(&key_path, key).expect("write key");
        (cert_path, key_path)
    }
}
