//! The simulator's test PKI, generated at run time with rcgen: no private key
//! is ever checked in.
//!
//! One CA signs the server certificate (for `127.0.0.1` and `localhost`) and
//! the client certificates. The real portal's client certificate comes as a
//! PFX that operators convert to one PEM file holding the certificate and its
//! key; [`TestPki::write_pem_files`] writes the simulator's the same way, so
//! the consumer's `client_cert` setting takes `client.pem` and its `ca_cert`
//! setting takes `ca.pem`.

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::WebPkiClientVerifier;
use time::OffsetDateTime;

/// Common name of the valid client certificate.
pub const CLIENT_COMMON_NAME: &str = "sandbox-bridge-sim-client";
/// Organisation of every certificate the simulator's CA issues.
const ORGANISATION: &str = "KTIP sandbox simulator";
/// Client certificates start this long before "now", so a client whose clock
/// is a little behind still accepts them.
const BACKDATE: Duration = Duration::from_secs(3600);
/// Lifetime of the CA and server certificates: longer than any run.
const AUTHORITY_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("generating a certificate for the KTIP simulator")]
    Generate(#[from] rcgen::Error),
    #[error("building the KTIP simulator's TLS configuration")]
    Tls(#[from] rustls::Error),
    #[error("building the KTIP simulator's client certificate verifier")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("writing {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A certificate authority: its certificate and what it signs with.
struct Authority {
    cert: Certificate,
    issuer: Issuer<'static, KeyPair>,
}

impl Authority {
    fn generate(common_name: &str) -> Result<Authority, PkiError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params
            .distinguished_name
            .push(DnType::OrganizationName, ORGANISATION);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + AUTHORITY_LIFETIME;
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        Ok(Authority {
            cert,
            issuer: Issuer::new(params, key),
        })
    }

    fn issue_client(
        &self,
        common_name: &str,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<ClientIdentity, PkiError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params
            .distinguished_name
            .push(DnType::OrganizationName, ORGANISATION);
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.not_before = not_before;
        params.not_after = not_after;
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(ClientIdentity {
            common_name: common_name.to_string(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            not_after,
        })
    }
}

/// A client certificate with its private key.
///
/// `Debug` shows the name and expiry, never the key.
#[derive(Clone)]
pub struct ClientIdentity {
    common_name: String,
    cert_pem: String,
    key_pem: String,
    not_after: OffsetDateTime,
}

impl ClientIdentity {
    /// Certificate then private key (PKCS#8), in one PEM text: the layout of
    /// `client.pem`, and what `reqwest::Identity::from_pem` takes.
    pub fn pem(&self) -> String {
        format!("{}{}", self.cert_pem, self.key_pem)
    }

    /// The certificate alone.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn common_name(&self) -> &str {
        &self.common_name
    }

    /// End of the certificate's validity (whole seconds, as encoded).
    pub fn not_after(&self) -> SystemTime {
        self.not_after.into()
    }
}

impl fmt::Debug for ClientIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientIdentity")
            .field("common_name", &self.common_name)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// Where [`TestPki::write_pem_files`] put the files.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PkiFiles {
    pub dir: PathBuf,
    /// `ca.pem`: the CA certificate. The consumer's `ca_cert` (it signed the
    /// server certificate).
    pub ca_cert: PathBuf,
    /// `client.pem`: the valid client certificate and its key. The consumer's `client_cert`.
    pub client_cert: PathBuf,
    /// `client-expired.pem`: signed by the CA, expired a day ago.
    pub expired_client_cert: PathBuf,
    /// `client-foreign.pem`: valid, but signed by an unrelated CA.
    pub foreign_client_cert: PathBuf,
}

/// The simulator's CA, server certificate and valid client certificate.
pub struct TestPki {
    ca: Authority,
    server_cert: CertificateDer<'static>,
    server_key: KeyPair,
    client: ClientIdentity,
}

impl TestPki {
    /// A fresh PKI whose client certificate expires `client_valid_for` from now.
    pub fn generate(client_valid_for: Duration) -> Result<TestPki, PkiError> {
        let ca = Authority::generate("KTIP sandbox simulator CA")?;

        let mut params =
            CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])?;
        params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + AUTHORITY_LIFETIME;
        let server_key = KeyPair::generate()?;
        let server_cert = params.signed_by(&server_key, &ca.issuer)?.der().clone();

        let client = ca.issue_client(CLIENT_COMMON_NAME, now - BACKDATE, now + client_valid_for)?;
        Ok(TestPki {
            ca,
            server_cert,
            server_key,
            client,
        })
    }

    /// The CA certificate: what clients trust the server by.
    pub fn ca_pem(&self) -> String {
        self.ca.cert.pem()
    }

    /// The valid client certificate.
    pub fn client(&self) -> &ClientIdentity {
        &self.client
    }

    /// Another client certificate signed by this PKI's CA.
    pub fn issue_client(
        &self,
        common_name: &str,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<ClientIdentity, PkiError> {
        self.ca
            .issue_client(common_name, not_before.into(), not_after.into())
    }

    /// A client certificate of this CA that expired a day ago.
    pub fn expired_client(&self) -> Result<ClientIdentity, PkiError> {
        let now = SystemTime::now();
        let day = Duration::from_secs(24 * 3600);
        self.issue_client("sandbox-bridge-sim-expired", now - 30 * day, now - day)
    }

    /// A valid client certificate signed by an unrelated CA, which the server refuses.
    pub fn foreign_client() -> Result<ClientIdentity, PkiError> {
        let now = OffsetDateTime::now_utc();
        Authority::generate("Some other CA")?.issue_client(
            "sandbox-bridge-sim-foreign",
            now - BACKDATE,
            now + AUTHORITY_LIFETIME,
        )
    }

    /// Writes `ca.pem`, `client.pem`, `client-expired.pem` and
    /// `client-foreign.pem` into `dir` (created if needed). Files holding a
    /// private key are readable by their owner only.
    pub fn write_pem_files(&self, dir: &Path) -> Result<PkiFiles, PkiError> {
        std::fs::create_dir_all(dir).map_err(|source| PkiError::Write {
            path: dir.to_path_buf(),
            source,
        })?;
        let files = PkiFiles {
            dir: dir.to_path_buf(),
            ca_cert: dir.join("ca.pem"),
            client_cert: dir.join("client.pem"),
            expired_client_cert: dir.join("client-expired.pem"),
            foreign_client_cert: dir.join("client-foreign.pem"),
        };
        write_file(&files.ca_cert, &self.ca_pem())?;
        write_file(&files.client_cert, &self.client.pem())?;
        write_file(&files.expired_client_cert, &self.expired_client()?.pem())?;
        write_file(
            &files.foreign_client_cert,
            &TestPki::foreign_client()?.pem(),
        )?;
        Ok(files)
    }

    /// TLS 1.2 and 1.3, HTTP/1.1, and a client certificate signed by the CA
    /// required: a client without one fails the handshake.
    pub(super) fn server_config(&self) -> Result<rustls::ServerConfig, PkiError> {
        // An explicit provider: the process-wide default is ambiguous when
        // several crypto providers are compiled in.
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca.cert.der().clone())?;
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.server_key.serialize_der()));
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(rustls::DEFAULT_VERSIONS)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(vec![self.server_cert.clone()], key)?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(config)
    }
}

fn write_file(path: &Path, contents: &str) -> Result<(), PkiError> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    options
        .open(path)
        .and_then(|mut f| f.write_all(contents.as_bytes()))
        .map_err(|source| PkiError::Write {
            path: path.to_path_buf(),
            source,
        })
}

/// The subject of a DER certificate, e.g. `CN=sandbox-bridge-sim-client, O=...`.
pub(super) fn subject_of(der: &[u8]) -> Option<String> {
    x509_parser::parse_x509_certificate(der)
        .ok()
        .map(|(_, cert)| cert.subject().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn first_cert_der(pem: &str) -> Vec<u8> {
        let (_, block) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
        block.contents
    }

    #[test]
    fn client_pem_holds_certificate_then_key_and_its_expiry_is_exposed() {
        let pki = TestPki::generate(Duration::from_secs(10 * 24 * 3600)).unwrap();
        let pem = pki.client().pem();
        let cert_at = pem.find("-----BEGIN CERTIFICATE-----").unwrap();
        let key_at = pem.find("-----BEGIN PRIVATE KEY-----").unwrap();
        assert!(cert_at < key_at, "{pem}");
        assert!(!format!("{:?}", pki.client()).contains("PRIVATE"));

        let der = first_cert_der(&pem);
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        let not_after = cert.validity().not_after.timestamp();
        let exposed = pki
            .client()
            .not_after()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        assert_eq!(not_after, exposed);
        let days_left = (not_after - OffsetDateTime::now_utc().unix_timestamp()) / 86_400;
        assert!((9..=10).contains(&days_left), "{days_left}");
        assert_eq!(
            subject_of(&der).unwrap(),
            format!("CN={CLIENT_COMMON_NAME}, O={ORGANISATION}")
        );
    }

    #[test]
    fn writes_the_pem_files_private_keys_owner_only() {
        let pki = TestPki::generate(Duration::from_secs(3600)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let files = pki.write_pem_files(&dir.path().join("pki")).unwrap();
        let ca = std::fs::read_to_string(&files.ca_cert).unwrap();
        assert_eq!(ca, pki.ca_pem());
        assert!(!ca.contains("PRIVATE KEY"));
        for path in [
            &files.client_cert,
            &files.expired_client_cert,
            &files.foreign_client_cert,
        ] {
            let text = std::fs::read_to_string(path).unwrap();
            assert!(text.contains("CERTIFICATE") && text.contains("PRIVATE KEY"));
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                let mode = std::fs::metadata(path).unwrap().permissions().mode();
                assert_eq!(mode & 0o777, 0o600, "{}", path.display());
            }
        }
        assert!(pki.expired_client().unwrap().not_after() < SystemTime::now());
        pki.server_config().unwrap();
    }
}
