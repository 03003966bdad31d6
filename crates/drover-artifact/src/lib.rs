//! Drover's update artifact format: one streamable file that carries a signed manifest and
//! its payloads, plus the signed trust root devices use to decide which release keys to trust.
//!
//! ```text
//! "DROVERA" 0x01 | u32 BE manifest length | manifest JSON | u32 BE signatures length |
//! signatures JSON | payload 0 | payload 1 | ... | end of file
//! ```
//!
//! The format is specified for other implementations in `docs/artifact-format.md`.
//!
//! - [`keys`]: Ed25519 signing keys (PKCS#8 PEM) and public keys (`ed25519:<base64>`).
//! - [`manifest`]: what the artifact is, for which devices, and the digest of every payload.
//! - [`stream`]: a sans-I/O verifier fed bytes as they arrive; the [`stream::Header`].
//! - [`read`]: a pull reader over any `io::Read` that hands out payloads as they stream by,
//!   failing a payload's last read when its digest does not match.
//! - [`write`]: build an artifact from files; add a signature to an existing one.
//! - [`root`]: the signed trust root (`root.json`) and its rotation rules; checks who signed.
//! - [`tree`]: deterministic tar of a directory and an extractor that refuses to write outside
//!   its destination.
//!
//! A valid signature by a trusted release key over the manifest, plus payloads matching the
//! manifest's digests, means the content is authentic. Signatures cover the manifest only, so
//! a signature can be added to an artifact without touching its payloads.
//!
//! **Architecture invariant:** synchronous and free of an async runtime, so the small agent can
//! use it; the verifier in [`stream`] does no I/O at all. Time is an input where it matters
//! ([`root::TrustStore::verify_header_at`]).

pub mod keys;
pub mod manifest;
pub mod read;
pub(crate) mod rfc3339;
pub mod root;
pub mod stream;
pub mod tree;
pub mod write;

pub use keys::{KeyError, PublicKey, SigningKey};
pub use manifest::{Incompatible, Manifest, PayloadInfo, PayloadRole, Provenance};
pub use read::{PayloadReader, Reader};
pub use root::{TrustError, TrustStore};
pub use stream::{Header, Signature, StreamVerifier, Verified};
pub use tree::UnpackError;
pub use write::Builder;

/// The first seven bytes of every artifact; the eighth is the format version.
pub const MAGIC: &[u8; 7] = b"DROVERA";
/// The format version this crate reads and writes.
pub const FORMAT_VERSION: u8 = 1;
/// The largest manifest accepted, in bytes.
pub const MAX_MANIFEST_LEN: u32 = 1024 * 1024;
/// The largest signatures block accepted, in bytes.
pub const MAX_SIGNATURES_LEN: u32 = 64 * 1024;
/// Domain separation for artifact signatures: the signed message is this, then the manifest.
pub const ARTIFACT_SIG_CONTEXT: &[u8] = b"drover-artifact-v1\0";

/// Why an artifact could not be built, read or verified. Messages say what to do about it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ArtifactError {
    #[error("I/O error: {0}")]
    Io(std::io::Error),
    #[error("{path}: {source}")]
    File { path: std::path::PathBuf, source: std::io::Error },
    #[error("not a Drover artifact: the file does not start with \"DROVERA\"")]
    BadMagic,
    #[error("artifact format version {0} is not supported (this build reads version 1); update the tool or agent")]
    UnsupportedVersion(u8),
    #[error("artifact header too large: the manifest may be at most 1 MiB and the signatures 64 KiB")]
    HeaderTooLarge,
    #[error("invalid manifest: {0}")]
    Manifest(String),
    #[error("invalid signatures block: {0}")]
    Signatures(String),
    #[error("payload {payload:?} does not match the SHA-256 in the manifest: the artifact is corrupt or was altered")]
    DigestMismatch { payload: String },
    #[error("payload {payload:?} has {actual} bytes, the manifest says {expected}: it changed while being written")]
    SizeMismatch { payload: String, expected: u64, actual: u64 },
    #[error("the artifact is truncated: it ends before its last payload does (an interrupted download?)")]
    Truncated,
    #[error("the artifact has bytes after its last payload: it is corrupt, or not one artifact")]
    TrailingBytes,
    #[error("the artifact is larger than the limit of {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("cannot pack {path}: {reason}")]
    Pack { path: std::path::PathBuf, reason: String },
    #[error("signing key: {0}")]
    Key(#[from] KeyError),
    #[error("the verifier already failed on an earlier chunk; start again from the first byte")]
    AlreadyFailed,
}

impl From<std::io::Error> for ArtifactError {
    /// Unwraps an `ArtifactError` carried in an `io::Error` (as a [`PayloadReader`] returns
    /// them), so `io::copy` failures keep their precise cause.
    fn from(e: std::io::Error) -> Self {
        if !e.get_ref().is_some_and(|inner| inner.is::<ArtifactError>()) {
            return ArtifactError::Io(e);
        }
        let kind = e.kind();
        match e.into_inner().map(|inner| inner.downcast::<ArtifactError>()) {
            Some(Ok(a)) => *a,
            Some(Err(other)) => ArtifactError::Io(std::io::Error::new(kind, other)),
            None => ArtifactError::Io(kind.into()),
        }
    }
}

impl ArtifactError {
    pub(crate) fn into_io(self) -> std::io::Error {
        let kind = match &self {
            ArtifactError::Truncated => std::io::ErrorKind::UnexpectedEof,
            ArtifactError::Io(e) => e.kind(),
            _ => std::io::ErrorKind::InvalidData,
        };
        std::io::Error::new(kind, self)
    }
}

/// Lowercase hex SHA-256 of `data`.
pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, data))
}

pub(crate) fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}
