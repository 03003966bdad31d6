//! Ed25519 keys.
//!
//! - A signing key is stored as PEM `PRIVATE KEY` around a PKCS#8 document: the v2 document
//!   `ring` generates, or the v1 document of `openssl genpkey -algorithm ed25519`.
//! - A public key is written `ed25519:<standard base64 of the 32 raw bytes>`.
//! - A key id is the first 8 bytes of SHA-256 of the 32 raw public key bytes, as 16 lowercase
//!   hex characters.

use std::fmt;
use std::str::FromStr;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair as _, UnparsedPublicKey};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("not a PEM \"PRIVATE KEY\" file: {0}")]
    Pem(String),
    #[error("not an Ed25519 PKCS#8 private key: {0}")]
    Pkcs8(String),
    #[error("invalid public key {0:?}: expected ed25519:<base64 of 32 bytes>")]
    Public(String),
    #[error("the system random number generator failed")]
    Rng,
}

const PEM_BEGIN: &str = "-----BEGIN PRIVATE KEY-----";
const PEM_END: &str = "-----END PRIVATE KEY-----";

/// An Ed25519 private key that signs artifacts and roots.
pub struct SigningKey {
    pkcs8: Vec<u8>,
    pair: Ed25519KeyPair,
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey").field("key_id", &self.key_id()).finish_non_exhaustive()
    }
}

impl SigningKey {
    /// A new random key.
    pub fn generate() -> Result<Self, KeyError> {
        let rng = ring::rand::SystemRandom::new();
        let doc = Ed25519KeyPair::generate_pkcs8(&rng).map_err(|_| KeyError::Rng)?;
        Self::from_pkcs8(doc.as_ref())
    }

    /// From a PKCS#8 document (DER).
    pub fn from_pkcs8(der: &[u8]) -> Result<Self, KeyError> {
        // `maybe_unchecked` also takes PKCS#8 v1 (no public key inside), which OpenSSL writes.
        let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(der).map_err(|e| KeyError::Pkcs8(e.to_string()))?;
        Ok(SigningKey { pkcs8: der.to_vec(), pair })
    }

    /// From the text of a PEM file with one `PRIVATE KEY` block.
    pub fn from_pem(pem: &str) -> Result<Self, KeyError> {
        let start = pem.find(PEM_BEGIN).ok_or_else(|| KeyError::Pem(format!("no {PEM_BEGIN} line")))?;
        let body = &pem[start + PEM_BEGIN.len()..];
        let end = body.find(PEM_END).ok_or_else(|| KeyError::Pem(format!("no {PEM_END} line")))?;
        let b64: String = body[..end].chars().filter(|c| !c.is_ascii_whitespace()).collect();
        let der = B64.decode(b64).map_err(|e| KeyError::Pem(format!("bad base64: {e}")))?;
        Self::from_pkcs8(&der)
    }

    /// PEM text, base64 lines of 64 characters.
    pub fn to_pem(&self) -> String {
        let b64 = B64.encode(&self.pkcs8);
        let mut out = String::with_capacity(b64.len() + 80);
        out.push_str(PEM_BEGIN);
        out.push('\n');
        for line in b64.as_bytes().chunks(64) {
            out.push_str(std::str::from_utf8(line).unwrap_or_default());
            out.push('\n');
        }
        out.push_str(PEM_END);
        out.push('\n');
        out
    }

    pub fn public(&self) -> PublicKey {
        let mut raw = [0u8; 32];
        raw.copy_from_slice(self.pair.public_key().as_ref());
        PublicKey(raw)
    }

    pub fn key_id(&self) -> String {
        self.public().key_id()
    }

    /// Signs `context` followed by `message` (the format's domain separation).
    pub(crate) fn sign_with_context(&self, context: &[u8], message: &[u8]) -> String {
        let mut msg = Vec::with_capacity(context.len() + message.len());
        msg.extend_from_slice(context);
        msg.extend_from_slice(message);
        B64.encode(self.pair.sign(&msg).as_ref())
    }
}

/// An Ed25519 public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PublicKey([u8; 32]);

impl PublicKey {
    pub fn from_bytes(raw: [u8; 32]) -> Self {
        PublicKey(raw)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// First 8 bytes of SHA-256 of the raw key, 16 lowercase hex characters.
    pub fn key_id(&self) -> String {
        let d = ring::digest::digest(&ring::digest::SHA256, &self.0);
        hex::encode(&d.as_ref()[..8])
    }

    /// Whether `sig_b64` (standard base64) is this key's signature of `context` + `message`.
    pub(crate) fn verify_with_context(&self, context: &[u8], message: &[u8], sig_b64: &str) -> bool {
        let Ok(sig) = B64.decode(sig_b64) else { return false };
        let mut msg = Vec::with_capacity(context.len() + message.len());
        msg.extend_from_slice(context);
        msg.extend_from_slice(message);
        UnparsedPublicKey::new(&ED25519, &self.0).verify(&msg, &sig).is_ok()
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ed25519:{}", B64.encode(self.0))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

impl FromStr for PublicKey {
    type Err = KeyError;

    /// `ed25519:<base64>`; surrounding whitespace (a file's final newline) is ignored.
    fn from_str(s: &str) -> Result<Self, KeyError> {
        let t = s.trim();
        let bad = || KeyError::Public(t.chars().take(80).collect());
        let b64 = t.strip_prefix("ed25519:").ok_or_else(bad)?;
        let raw = B64.decode(b64).map_err(|_| bad())?;
        let raw: [u8; 32] = raw.try_into().map_err(|_| bad())?;
        Ok(PublicKey(raw))
    }
}

impl serde::Serialize for PublicKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for PublicKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

pub(crate) fn is_key_id(s: &str) -> bool {
    s.len() == 16 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_round_trip_keeps_the_key() {
        let k = SigningKey::generate().unwrap();
        let pem = k.to_pem();
        assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----\n"));
        let back = SigningKey::from_pem(&pem).unwrap();
        assert_eq!(back.public(), k.public());
        let sig = k.sign_with_context(b"ctx", b"msg");
        assert!(back.public().verify_with_context(b"ctx", b"msg", &sig));
        assert!(!back.public().verify_with_context(b"ctx", b"msh", &sig));
        assert!(!back.public().verify_with_context(b"cty", b"msg", &sig));
    }

    #[test]
    fn public_key_text_and_id() {
        let k = SigningKey::generate().unwrap().public();
        let text = k.to_string();
        assert!(text.starts_with("ed25519:"));
        assert_eq!(format!("{text}\n").parse::<PublicKey>().unwrap(), k);
        let id = k.key_id();
        assert!(is_key_id(&id), "{id}");
        let d = ring::digest::digest(&ring::digest::SHA256, k.as_bytes());
        assert_eq!(id, hex::encode(&d.as_ref()[..8]));
        for bad in ["", "ed25519:", "ed25519:AAAA", "rsa:AAAA", "ed25519:!!"] {
            assert!(bad.parse::<PublicKey>().is_err(), "{bad}");
        }
    }

    #[test]
    fn openssl_pkcs8_v1_keys_load() {
        // `openssl genpkey -algorithm ed25519` output (PKCS#8 v1, RFC 8410 test key).
        let pem = "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEINTuctv5E1hK1bbY8fdp+K06/nwoy/HU++CXqI9EdVhC\n-----END PRIVATE KEY-----\n";
        let k = SigningKey::from_pem(pem).unwrap();
        // RFC 8410 section 10.3: the matching public key.
        assert_eq!(
            hex::encode(k.public().as_bytes()),
            "19bf44096984cdfe8541bac167dc3b96c85086aa30b6b6cb0c5c38ad703166e1"
        );
        assert!(SigningKey::from_pem("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n").is_err());
        assert!(SigningKey::from_pem("hello").is_err());
    }
}
