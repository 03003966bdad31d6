//! TLS material: the device key, certificates in PEM, and rustls client configurations that
//! use the ring provider explicitly (design decision 10) and trust only the given CA.

use std::sync::Arc;

use ring::signature::{EcdsaKeyPair, KeyPair as _};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::{ClientConfig, RootCertStore};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{0}")]
    Pem(String),
    #[error("{0}")]
    Key(String),
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// The ring crypto provider, the only one Drover uses.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Installs ring as the process-wide default provider; call at the start of every binary.
/// Installing twice is harmless.
pub fn install_default_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The device's key pair: ECDSA P-256, made on the device, never sent anywhere. Kept as
/// PKCS#8 (the form written to disk) and used through ring, the process's one crypto library.
pub struct DeviceKey {
    pkcs8: Vec<u8>,
    pair: EcdsaKeyPair,
}

impl std::fmt::Debug for DeviceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceKey").field("public_key", &hex::encode(self.public_key_raw())).finish()
    }
}

const ALG: &ring::signature::EcdsaSigningAlgorithm = &ring::signature::ECDSA_P256_SHA256_ASN1_SIGNING;

impl DeviceKey {
    /// A fresh ECDSA P-256 key pair.
    pub fn generate() -> Result<DeviceKey, TlsError> {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 =
            EcdsaKeyPair::generate_pkcs8(ALG, &rng).map_err(|_| TlsError::Key("cannot generate a key".into()))?;
        DeviceKey::from_pkcs8(pkcs8.as_ref().to_vec())
    }

    fn from_pkcs8(pkcs8: Vec<u8>) -> Result<DeviceKey, TlsError> {
        let rng = ring::rand::SystemRandom::new();
        let pair = EcdsaKeyPair::from_pkcs8(ALG, &pkcs8, &rng)
            .map_err(|e| TlsError::Key(format!("not a usable private key: not an ECDSA P-256 PKCS#8 key ({e})")))?;
        Ok(DeviceKey { pkcs8, pair })
    }

    /// A PKCS#8 PEM key, as [`DeviceKey::to_pem`] writes it.
    pub fn from_pem(pem: &str) -> Result<DeviceKey, TlsError> {
        let der = PrivatePkcs8KeyDer::from_pem_slice(pem.as_bytes())
            .map_err(|e| TlsError::Key(format!("not a usable private key: {e}")))?;
        DeviceKey::from_pkcs8(der.secret_pkcs8_der().to_vec())
    }

    pub fn to_pem(&self) -> String {
        crate::der::pem("PRIVATE KEY", &self.pkcs8)
    }

    /// A PKCS#10 certificate signing request for this key (its subject is ignored by the CA).
    pub fn csr_pem(&self) -> Result<String, TlsError> {
        let info = crate::der::csr_info(self.public_key_raw(), "drover-device");
        let rng = ring::rand::SystemRandom::new();
        let sig = self.pair.sign(&rng, &info).map_err(|_| TlsError::Key("CSR: cannot sign".into()))?;
        Ok(crate::der::pem("CERTIFICATE REQUEST", &crate::der::csr(&info, sig.as_ref())))
    }

    /// The raw public key (the subjectPublicKey bits of a certificate for this key).
    pub fn public_key_raw(&self) -> &[u8] {
        self.pair.public_key().as_ref()
    }

    pub fn private_key_der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.pkcs8.clone()))
    }
}

/// Every certificate in a PEM text; at least one.
pub fn certs_from_pem(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Pem(format!("{what}: not PEM certificates: {e}")))?;
    if certs.is_empty() {
        return Err(TlsError::Pem(format!("{what}: no certificate in it")));
    }
    Ok(certs)
}

/// A root store holding the certificates of each PEM text.
pub fn root_store(pems: &[(&[u8], &str)]) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for (pem, what) in pems {
        for cert in certs_from_pem(pem, what)? {
            roots.add(cert).map_err(|e| TlsError::Pem(format!("{what}: not a usable CA certificate: {e}")))?;
        }
    }
    Ok(roots)
}

/// A client configuration that trusts `roots` only and, for mutual TLS, presents `client`.
pub fn client_config(
    roots: RootCertStore,
    client: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> Result<ClientConfig, TlsError> {
    let builder = ClientConfig::builder_with_provider(provider()).with_safe_default_protocol_versions()?;
    let builder = builder.with_root_certificates(roots);
    Ok(match client {
        Some((chain, key)) => builder.with_client_auth_cert(chain, key)?,
        None => builder.with_no_client_auth(),
    })
}

/// The mutual-TLS configuration of a device's MQTT connection: trusts the CAs in `ca_pems`,
/// presents `cert_pem` with `key`.
pub fn mqtt_client_config(
    ca_pems: &[(&[u8], &str)],
    cert_pem: &[u8],
    key: &DeviceKey,
) -> Result<Arc<ClientConfig>, TlsError> {
    let roots = root_store(ca_pems)?;
    let chain = certs_from_pem(cert_pem, "device certificate")?;
    Ok(Arc::new(client_config(roots, Some((chain, key.private_key_der())))?))
}

/// What the agent needs to know about a certificate.
#[derive(Debug, Clone)]
pub struct CertInfo {
    pub common_name: Option<String>,
    pub not_before: i64,
    pub not_after: i64,
    pub public_key_raw: Vec<u8>,
}

impl CertInfo {
    pub fn parse(der: &[u8]) -> Result<CertInfo, TlsError> {
        let p = crate::der::parse_certificate(der).ok_or_else(|| TlsError::Pem("not an X.509 certificate".into()))?;
        Ok(CertInfo {
            common_name: p.common_name,
            not_before: p.not_before,
            not_after: p.not_after,
            public_key_raw: p.public_key_raw,
        })
    }

    /// The first certificate of a PEM text.
    pub fn from_pem(pem: &[u8], what: &str) -> Result<CertInfo, TlsError> {
        let certs = certs_from_pem(pem, what)?;
        CertInfo::parse(&certs[0]).map_err(|e| TlsError::Pem(format!("{what}: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_round_trips_and_csr_is_pem() {
        let k = DeviceKey::generate().unwrap();
        let again = DeviceKey::from_pem(&k.to_pem()).unwrap();
        assert_eq!(k.public_key_raw(), again.public_key_raw());
        let csr = k.csr_pem().unwrap();
        assert!(csr.starts_with("-----BEGIN CERTIFICATE REQUEST-----"), "{csr}");
        assert!(DeviceKey::from_pem("garbage").is_err());
    }

    /// Bad inputs: empty PEM, PEM of something else.
    #[test]
    fn bad_pem_is_refused_with_a_name() {
        let err = certs_from_pem(b"", "ca_file /x").unwrap_err().to_string();
        assert!(err.contains("ca_file /x") && err.contains("no certificate"), "{err}");
        let k = DeviceKey::generate().unwrap();
        assert!(certs_from_pem(k.to_pem().as_bytes(), "x").is_err());
    }
}
