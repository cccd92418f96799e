//! The gateway CA and the leaf certificates it mints for intercepted TLS.
//!
//! The sandbox trusts the gateway CA (the launcher installs it in the guest), so the gateway
//! can terminate the sandbox's TLS with a leaf certificate for whatever host the sandbox
//! asked for, see the request, and decide. Leaves are ECDSA P-256 (cheap to mint, about a
//! third of a millisecond) and cached in a bounded moka cache, so a busy host is minted once
//! per validity period, not once per connection.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::CertifiedKey;

use crate::datadir::{read_secret, write_new_file, FileError};
use crate::target::Host;

/// Why the CA could not be loaded or a leaf could not be minted.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// A CA file could not be read or written.
    #[error(transparent)]
    File(#[from] FileError),
    /// Only one of the two CA files exists: refusing to overwrite the other.
    #[error(
        "{present} exists but {missing} does not: restore the missing file, or remove both \
         to let the gateway create a new CA"
    )]
    HalfPresent {
        /// The file that exists.
        present: PathBuf,
        /// The file that is missing.
        missing: PathBuf,
    },
    /// A CA file is not a usable PEM certificate or key.
    #[error("{path} is not a usable CA {what}: {reason}")]
    BadPem {
        /// The file.
        path: PathBuf,
        /// "certificate" or "private key".
        what: &'static str,
        /// The parser's message.
        reason: String,
    },
    /// rcgen or rustls refused to build a certificate.
    #[error("cannot mint a certificate for {name}: {reason}")]
    Mint {
        /// The host the leaf was for.
        name: String,
        /// What went wrong.
        reason: String,
    },
}

/// The certificate authority that signs interception leaves.
pub struct GatewayCa {
    issuer: Issuer<'static, KeyPair>,
    cert_der: CertificateDer<'static>,
    cert_path: PathBuf,
}

impl std::fmt::Debug for GatewayCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayCa")
            .field("cert_path", &self.cert_path)
            .finish_non_exhaustive()
    }
}

impl GatewayCa {
    /// Loads the CA from `cert_path` and `key_path`, or creates a new one there if neither
    /// exists. Returns the CA and whether it was created.
    pub fn load_or_create(cert_path: &Path, key_path: &Path) -> Result<(Self, bool), CaError> {
        match (cert_path.exists(), key_path.exists()) {
            (true, true) => Ok((Self::load(cert_path, key_path)?, false)),
            (false, false) => Ok((Self::create(cert_path, key_path)?, true)),
            (true, false) => Err(CaError::HalfPresent {
                present: cert_path.into(),
                missing: key_path.into(),
            }),
            (false, true) => Err(CaError::HalfPresent {
                present: key_path.into(),
                missing: cert_path.into(),
            }),
        }
    }

    /// Where the CA certificate is (what sandboxes must trust).
    pub fn cert_path(&self) -> &Path {
        &self.cert_path
    }

    /// The CA certificate in DER.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    fn load(cert_path: &Path, key_path: &Path) -> Result<Self, CaError> {
        let cert_pem = std::fs::read_to_string(cert_path).map_err(|source| FileError {
            action: "cannot read",
            path: cert_path.into(),
            source,
        })?;
        let key_pem = read_secret(key_path)?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| CaError::BadPem {
            path: key_path.into(),
            what: "private key",
            reason: e.to_string(),
        })?;
        let bad_cert = |reason: String| CaError::BadPem {
            path: cert_path.into(),
            what: "certificate",
            reason,
        };
        let parsed = pem::parse(&cert_pem).map_err(|e| bad_cert(e.to_string()))?;
        if parsed.tag() != "CERTIFICATE" {
            return Err(bad_cert(format!("PEM block is {:?}", parsed.tag())));
        }
        let cert_der = CertificateDer::from(parsed.contents().to_vec());
        let issuer =
            Issuer::from_ca_cert_der(&cert_der, key).map_err(|e| bad_cert(e.to_string()))?;
        Ok(GatewayCa {
            issuer,
            cert_der,
            cert_path: cert_path.into(),
        })
    }

    fn create(cert_path: &Path, key_path: &Path) -> Result<Self, CaError> {
        let mint_err = |e: rcgen::Error| CaError::Mint {
            name: "the gateway CA".into(),
            reason: e.to_string(),
        };
        let key = KeyPair::generate().map_err(mint_err)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "Tollgate gateway CA");
        dn.push(DnType::OrganizationName, "Tollgate");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.serial_number = Some(random_serial());
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::days(1);
        params.not_after = now + time::Duration::days(3650);
        let key_pem = key.serialize_pem();
        let certified = CertifiedIssuer::self_signed(params, key).map_err(mint_err)?;
        let cert_pem = certified.pem();
        let cert_der = certified.der().clone();

        write_new_file(key_path, key_pem.as_bytes(), 0o600)?;
        write_new_file(cert_path, cert_pem.as_bytes(), 0o644)?;
        // Re-read what was written, so a created CA and a loaded one are the same thing.
        let loaded = Self::load(cert_path, key_path)?;
        debug_assert_eq!(loaded.cert_der, cert_der);
        Ok(loaded)
    }

    /// Mints a leaf certificate for `host`, valid for `validity`, chained to this CA.
    pub fn mint_leaf(&self, host: &Host, validity: Duration) -> Result<CertifiedKey, CaError> {
        let mint_err = |reason: String| CaError::Mint {
            name: host.to_string(),
            reason,
        };
        let key = KeyPair::generate().map_err(|e| mint_err(e.to_string()))?;
        let mut params = CertificateParams::default();
        let (common_name, san) = match host {
            Host::Name(name) => (
                name.clone(),
                SanType::DnsName(
                    name.clone()
                        .try_into()
                        .map_err(|e: rcgen::Error| mint_err(e.to_string()))?,
                ),
            ),
            Host::Ip(ip) => (ip.to_string(), SanType::IpAddress(*ip)),
        };
        params.subject_alt_names = vec![san];
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        params.distinguished_name = dn;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial());
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + validity;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|e| mint_err(e.to_string()))?;
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let signing_key = rustls::crypto::ring::sign::any_ecdsa_type(&key_der)
            .map_err(|e| mint_err(e.to_string()))?;
        Ok(CertifiedKey::new(
            vec![cert.der().clone(), self.cert_der.clone()],
            signing_key,
        ))
    }
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f; // a positive INTEGER
    SerialNumber::from_slice(&bytes)
}

/// Minted leaves, cached by host.
///
/// Entries live for half the leaf validity, so a certificate handed out from the cache always
/// has at least half its validity left.
pub struct LeafCerts {
    ca: GatewayCa,
    validity: Duration,
    cache: moka::sync::Cache<Host, Arc<CertifiedKey>>,
}

impl LeafCerts {
    /// A cache of at most `capacity` leaves minted by `ca`.
    pub fn new(ca: GatewayCa, capacity: u64, validity: Duration) -> Self {
        LeafCerts {
            ca,
            validity,
            cache: moka::sync::Cache::builder()
                .max_capacity(capacity)
                .time_to_live(validity / 2)
                .build(),
        }
    }

    /// The leaf for `host`: from the cache, or minted once even under concurrent misses.
    pub fn get(&self, host: &Host) -> Result<Arc<CertifiedKey>, Arc<CaError>> {
        self.cache.try_get_with_by_ref(host, || {
            self.ca.mint_leaf(host, self.validity).map(Arc::new)
        })
    }

    /// How many leaves are cached now (approximate, for metrics).
    pub fn cached(&self) -> u64 {
        self.cache.run_pending_tasks();
        self.cache.entry_count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::client::danger::ServerCertVerifier;
    use rustls::pki_types::UnixTime;
    use std::os::unix::fs::PermissionsExt;

    fn new_ca(dir: &Path) -> GatewayCa {
        GatewayCa::load_or_create(&dir.join("ca.pem"), &dir.join("ca-key.pem"))
            .expect("create CA")
            .0
    }

    /// Verifies `leaf` for `name` against `ca` the way a TLS client does.
    fn verify(ca: &GatewayCa, leaf: &CertifiedKey, name: &str) -> Result<(), rustls::Error> {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(ca.cert_der().clone())
            .expect("CA is a valid root");
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .expect("verifier");
        let server_name = rustls::pki_types::ServerName::try_from(name.to_string()).unwrap();
        verifier
            .verify_server_cert(
                &leaf.cert[0],
                &leaf.cert[1..],
                &server_name,
                &[],
                UnixTime::now(),
            )
            .map(|_| ())
    }

    #[test]
    fn a_new_ca_is_written_with_a_private_key_file_and_reloaded_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, created) =
            GatewayCa::load_or_create(&dir.path().join("ca.pem"), &dir.path().join("ca-key.pem"))
                .unwrap();
        assert!(created);
        let mode = std::fs::metadata(dir.path().join("ca-key.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let (again, created) =
            GatewayCa::load_or_create(&dir.path().join("ca.pem"), &dir.path().join("ca-key.pem"))
                .unwrap();
        assert!(!created);
        assert_eq!(ca.cert_der(), again.cert_der());
    }

    #[test]
    fn leaves_verify_for_their_name_only() {
        let dir = tempfile::tempdir().unwrap();
        let ca = new_ca(dir.path());
        let leaf = ca
            .mint_leaf(
                &Host::Name("api.example.com".into()),
                Duration::from_secs(3600),
            )
            .unwrap();
        verify(&ca, &leaf, "api.example.com").expect("leaf verifies for its name");
        assert!(verify(&ca, &leaf, "other.example.com").is_err());
        let ip_leaf = ca
            .mint_leaf(
                &Host::Ip("127.0.0.1".parse().unwrap()),
                Duration::from_secs(60),
            )
            .unwrap();
        verify(&ca, &ip_leaf, "127.0.0.1").expect("IP leaf verifies for its address");
    }

    #[test]
    fn a_leaf_from_another_ca_does_not_verify() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let (ca_a, ca_b) = (new_ca(a.path()), new_ca(b.path()));
        let leaf = ca_b
            .mint_leaf(&Host::Name("x.test".into()), Duration::from_secs(60))
            .unwrap();
        assert!(verify(&ca_a, &leaf, "x.test").is_err());
    }

    #[test]
    fn the_cache_mints_once_per_host_and_stays_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let leaves = LeafCerts::new(new_ca(dir.path()), 3, Duration::from_secs(3600));
        let h = Host::Name("a.test".into());
        let first = leaves.get(&h).unwrap();
        let second = leaves.get(&h).unwrap();
        assert!(
            Arc::ptr_eq(&first, &second),
            "a cache hit returns the same leaf"
        );
        for i in 0..20 {
            leaves.get(&Host::Name(format!("h{i}.test"))).unwrap();
        }
        assert!(leaves.cached() <= 3, "cache holds {}", leaves.cached());
    }

    #[test]
    fn half_a_ca_is_an_error_not_an_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        new_ca(dir.path());
        std::fs::remove_file(dir.path().join("ca-key.pem")).unwrap();
        let err =
            GatewayCa::load_or_create(&dir.path().join("ca.pem"), &dir.path().join("ca-key.pem"))
                .unwrap_err();
        assert!(matches!(err, CaError::HalfPresent { .. }), "{err}");
        assert!(dir.path().join("ca.pem").exists());
    }
}
