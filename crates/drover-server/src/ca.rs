//! The fleet CA: issues each device its certificate from a CSR (the key never leaves the
//! device) and the certificate of droverd's device-facing TLS endpoints.
//!
//! Made at first start in `DATA_DIR/ca/` (`fleet-ca.key` mode 0600, `fleet-ca.crt`), or
//! given as files (`ca_cert_file`, `ca_key_file`) to use an organization's own CA — which is
//! also how several replicas share one CA.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SerialNumber,
};
use time::{Duration, OffsetDateTime};

pub const CA_DIR: &str = "ca";
pub const CA_CERT_FILE: &str = "fleet-ca.crt";
pub const CA_KEY_FILE: &str = "fleet-ca.key";

/// How long a device certificate is valid unless said otherwise; the agent renews well before.
pub const DEVICE_CERT_DAYS: i64 = 365;

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("cannot read or write the fleet CA at {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("the fleet CA at {path} is unusable: {message}")]
    Unusable { path: PathBuf, message: String },
    #[error("invalid certificate signing request: {0}")]
    InvalidCsr(String),
    #[error("invalid device id {0:?}")]
    InvalidDeviceId(String),
    #[error("cannot issue the certificate: {0}")]
    Issue(String),
}

pub struct FleetCa {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
}

/// A certificate the CA issued.
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub serial_hex: String,
    pub not_after: OffsetDateTime,
}

fn random_serial() -> SerialNumber {
    use rand::RngCore as _;
    let mut bytes = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    bytes[0] &= 0x7f; // positive
    SerialNumber::from_slice(&bytes)
}

fn write_private(path: &Path, contents: &str) -> Result<(), CaError> {
    use std::io::Write as _;
    let err = |source| CaError::Io { path: path.to_path_buf(), source };
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut o, 0o600);
    let mut f = o.open(path).map_err(err)?;
    f.write_all(contents.as_bytes()).map_err(err)?;
    f.sync_all().map_err(err)
}

impl FleetCa {
    /// The CA in `dir`, made there (key mode 0600) when absent.
    pub fn load_or_create(dir: &Path, organization: &str) -> Result<FleetCa, CaError> {
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        if cert_path.exists() || key_path.exists() {
            return FleetCa::from_files(&cert_path, &key_path);
        }
        let err = |source| CaError::Io { path: dir.to_path_buf(), source };
        let mut b = std::fs::DirBuilder::new();
        b.recursive(true);
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut b, 0o700);
        b.create(dir).map_err(err)?;
        let key = KeyPair::generate().map_err(|e| CaError::Issue(e.to_string()))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("Drover fleet CA ({organization})"));
        dn.push(DnType::OrganizationName, organization.to_string());
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::minutes(5);
        params.not_after = now + Duration::days(20 * 365);
        params.serial_number = Some(random_serial());
        let cert = params.self_signed(&key).map_err(|e| CaError::Issue(e.to_string()))?;
        // Key first: a crash between the two leaves a key without a certificate, which the
        // next start reports instead of silently making a second CA.
        write_private(&key_path, &key.serialize_pem())?;
        std::fs::write(&cert_path, cert.pem()).map_err(|source| CaError::Io { path: cert_path.clone(), source })?;
        tracing::info!(path = %dir.display(), "created the fleet CA");
        FleetCa::from_files(&cert_path, &key_path)
    }

    /// An existing CA: its certificate and private key, both PEM.
    pub fn from_files(cert_path: &Path, key_path: &Path) -> Result<FleetCa, CaError> {
        let read =
            |p: &Path| std::fs::read_to_string(p).map_err(|source| CaError::Io { path: p.to_path_buf(), source });
        let cert_pem = read(cert_path)?;
        let key_pem = read(key_path)?;
        let key = KeyPair::from_pem(&key_pem)
            .map_err(|e| CaError::Unusable { path: key_path.to_path_buf(), message: format!("private key: {e}") })?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key)
            .map_err(|e| CaError::Unusable { path: cert_path.to_path_buf(), message: format!("certificate: {e}") })?;
        Ok(FleetCa { issuer, cert_pem })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Issues a device's client certificate from its CSR. Only the CSR's public key is used
    /// (after checking the CSR's signature proves the device holds the private key): the
    /// subject is the device id, the usage is TLS client authentication.
    pub fn issue_device(&self, csr_pem: &str, device_id: &str) -> Result<Issued, CaError> {
        let now = OffsetDateTime::now_utc();
        self.issue_device_valid(csr_pem, device_id, now - Duration::minutes(5), now + Duration::days(DEVICE_CERT_DAYS))
    }

    /// As [`FleetCa::issue_device`], with an explicit validity period.
    pub fn issue_device_valid(
        &self,
        csr_pem: &str,
        device_id: &str,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<Issued, CaError> {
        if !drover_proto::device::valid_device_id(device_id) {
            return Err(CaError::InvalidDeviceId(device_id.to_string()));
        }
        if csr_pem.len() > 16 * 1024 {
            return Err(CaError::InvalidCsr("larger than 16 KiB".into()));
        }
        let mut csr =
            CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| CaError::InvalidCsr(e.to_string()))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, device_id.to_string());
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.not_before = not_before;
        params.not_after = not_after;
        let serial = random_serial();
        let serial_hex = hex::encode(serial.as_ref());
        params.serial_number = Some(serial);
        params.use_authority_key_identifier_extension = true;
        csr.params = params;
        let cert = csr.signed_by(&self.issuer).map_err(|e| CaError::Issue(e.to_string()))?;
        Ok(Issued { cert_pem: cert.pem(), serial_hex, not_after })
    }

    /// A server certificate for droverd's device-facing endpoints (MQTT, enrollment, downloads),
    /// with its new private key. `names` are DNS names or IP addresses.
    pub fn issue_server(&self, names: &[String]) -> Result<(String, String), CaError> {
        let params = CertificateParams::new(names.to_vec()).map_err(|e| CaError::Issue(e.to_string()))?;
        let cn = names.first().cloned().unwrap_or_else(|| "droverd".into());
        let usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        self.issue_with_new_key(params, cn, usages, ExtendedKeyUsagePurpose::ServerAuth)
    }

    /// A client certificate for a Drover service (a droverd replica consuming device traffic):
    /// common name `service:{name}`, which no device id can be. Returns (cert, key) PEM.
    pub fn issue_service(&self, name: &str) -> Result<(String, String), CaError> {
        let usages = vec![KeyUsagePurpose::DigitalSignature];
        self.issue_with_new_key(
            CertificateParams::default(),
            format!("service:{name}"),
            usages,
            ExtendedKeyUsagePurpose::ClientAuth,
        )
    }

    /// Signs a leaf certificate for a new key pair, valid from five minutes ago for 397 days.
    fn issue_with_new_key(
        &self,
        mut params: CertificateParams,
        common_name: String,
        key_usages: Vec<KeyUsagePurpose>,
        purpose: ExtendedKeyUsagePurpose,
    ) -> Result<(String, String), CaError> {
        let key = KeyPair::generate().map_err(|e| CaError::Issue(e.to_string()))?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = key_usages;
        params.extended_key_usages = vec![purpose];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::minutes(5);
        params.not_after = now + Duration::days(397);
        params.serial_number = Some(random_serial());
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer).map_err(|e| CaError::Issue(e.to_string()))?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use rustls::server::WebPkiClientVerifier;
    use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};

    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("drover-ca-{name}-{}-{}", std::process::id(), rand::random::<u32>()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn certs(pem: &str) -> Vec<CertificateDer<'static>> {
        CertificateDer::pem_slice_iter(pem.as_bytes()).map(|c| c.unwrap()).collect()
    }

    fn device_key_and_csr() -> (KeyPair, String) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, "whatever the device claims");
        let csr = params.serialize_request(&key).unwrap().pem().unwrap();
        (key, csr)
    }

    /// A real TLS 1.3 handshake in memory: a server that requires client certificates from
    /// `ca`, and a client presenting `chain` with `key`. Returns the server's view of the
    /// client's certificate, or the error.
    fn handshake(
        ca: &FleetCa,
        client_chain: &str,
        client_key: &KeyPair,
    ) -> Result<Vec<CertificateDer<'static>>, rustls::Error> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = RootCertStore::empty();
        for c in certs(ca.cert_pem()) {
            roots.add(c).unwrap();
        }
        let roots = Arc::new(roots);
        let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone()).build().unwrap();
        let (server_cert, server_key) = ca.issue_server(&["localhost".into()]).unwrap();
        let server = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs(&server_cert), PrivateKeyDer::from_pem_slice(server_key.as_bytes()).unwrap())
            .unwrap();
        let client = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(
                certs(client_chain),
                PrivateKeyDer::from_pem_slice(client_key.serialize_pem().as_bytes()).unwrap(),
            )
            .unwrap();
        let mut s = ServerConnection::new(Arc::new(server)).unwrap();
        let mut c = ClientConnection::new(Arc::new(client), ServerName::try_from("localhost").unwrap()).unwrap();
        for _ in 0..20 {
            let mut buf = Vec::new();
            while c.wants_write() {
                c.write_tls(&mut buf).unwrap();
            }
            let mut rd = &buf[..];
            while !rd.is_empty() {
                s.read_tls(&mut rd).unwrap();
            }
            s.process_new_packets()?;
            let mut buf = Vec::new();
            while s.wants_write() {
                s.write_tls(&mut buf).unwrap();
            }
            let mut rd = &buf[..];
            while !rd.is_empty() {
                c.read_tls(&mut rd).unwrap();
            }
            c.process_new_packets()?;
            if !s.is_handshaking() && !c.is_handshaking() {
                return Ok(s.peer_certificates().map(|p| p.to_vec()).unwrap_or_default());
            }
        }
        panic!("handshake did not finish");
    }

    #[test]
    fn first_start_creates_a_private_ca_and_later_starts_reuse_it() {
        let dir = tmp("create");
        let ca = FleetCa::load_or_create(&dir, "default").unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(dir.join(CA_KEY_FILE)).unwrap().permissions().mode() & 0o777, 0o600);
        }
        let again = FleetCa::load_or_create(&dir, "default").unwrap();
        assert_eq!(ca.cert_pem(), again.cert_pem());
        // A key without its certificate is reported, not replaced.
        std::fs::remove_file(dir.join(CA_CERT_FILE)).unwrap();
        let err = FleetCa::load_or_create(&dir, "default").err().unwrap().to_string();
        assert!(err.contains(CA_CERT_FILE), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_device_certificate_from_its_csr_passes_mutual_tls_with_the_device_id_as_subject() {
        let dir = tmp("mtls");
        let ca = FleetCa::load_or_create(&dir, "default").unwrap();
        let (key, csr) = device_key_and_csr();
        let issued = ca.issue_device(&csr, "dev-0042").unwrap();
        let peer = handshake(&ca, &issued.cert_pem, &key).expect("the fleet CA's device certificate is accepted");
        let parsed = x509_parser::parse_x509_certificate(&peer[0]).unwrap().1;
        let cn = parsed.subject().iter_common_name().next().unwrap().as_str().unwrap().to_string();
        assert_eq!(cn, "dev-0042", "the CA sets the subject, not the device");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Tried: a certificate from another CA, an expired certificate, a CSR whose signature
    /// does not match its key, garbage instead of a CSR, a device id with topic characters.
    #[test]
    fn forged_expired_and_malformed_inputs_are_refused() {
        let dir = tmp("refuse");
        let ca = FleetCa::load_or_create(&dir, "default").unwrap();
        let other_dir = tmp("other");
        let other = FleetCa::load_or_create(&other_dir, "someone else").unwrap();
        let (key, csr) = device_key_and_csr();

        let forged = other.issue_device(&csr, "dev-1").unwrap();
        let err = handshake(&ca, &forged.cert_pem, &key).unwrap_err();
        assert!(format!("{err:?}").contains("UnknownIssuer"), "{err:?}");

        let now = OffsetDateTime::now_utc();
        let expired = ca.issue_device_valid(&csr, "dev-1", now - Duration::days(30), now - Duration::days(1)).unwrap();
        let err = handshake(&ca, &expired.cert_pem, &key).unwrap_err();
        assert!(format!("{err:?}").contains("Expired"), "{err:?}");

        // Flip one byte inside the CSR's signature.
        let der = rustls::pki_types::CertificateSigningRequestDer::from_pem_slice(csr.as_bytes()).unwrap();
        let mut bytes = der.as_ref().to_vec();
        let last = bytes.len() - 3;
        bytes[last] ^= 0x01;
        use base64::Engine as _;
        let tampered = format!(
            "-----BEGIN CERTIFICATE REQUEST-----\n{}\n-----END CERTIFICATE REQUEST-----\n",
            base64::engine::general_purpose::STANDARD.encode(&bytes)
        );
        assert!(matches!(ca.issue_device(&tampered, "dev-1"), Err(CaError::InvalidCsr(_))));
        assert!(matches!(ca.issue_device("not a csr", "dev-1"), Err(CaError::InvalidCsr(_))));
        assert!(matches!(ca.issue_device(&csr, "dev/+/#"), Err(CaError::InvalidDeviceId(_))));
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::remove_dir_all(&other_dir);
    }
}
