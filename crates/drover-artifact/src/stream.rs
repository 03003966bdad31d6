//! The header, and a sans-I/O verifier fed the artifact's bytes as they arrive.
//!
//! [`StreamVerifier`] checks the structure and every payload digest while the file streams by
//! (a download, or a `.part` file re-read after a restart) and keeps only the header and two
//! hash states in memory. It does not check who signed: hand [`StreamVerifier::header`] to
//! [`crate::root::TrustStore::verify_header`] as soon as it is there.

use ring::digest::{Context, SHA256};
use serde::{Deserialize, Serialize};

use crate::keys::{PublicKey, SigningKey};
use crate::manifest::Manifest;
use crate::root::TrustError;
use crate::{ARTIFACT_SIG_CONTEXT, ArtifactError, FORMAT_VERSION, MAGIC, MAX_MANIFEST_LEN, MAX_SIGNATURES_LEN};

/// One signature of the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Signature {
    /// The signer's key id (16 lowercase hex).
    pub key_id: String,
    /// `ed25519`.
    pub alg: String,
    /// Standard base64 (with padding) of the 64-byte signature.
    pub sig: String,
}

pub const ALG_ED25519: &str = "ed25519";

/// Everything before payload 0.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub manifest: Manifest,
    /// The manifest exactly as it is in the file: these bytes are signed.
    pub manifest_bytes: Vec<u8>,
    pub signatures: Vec<Signature>,
    /// Length of the header: the offset of payload 0 in the file. For a header made or
    /// changed here ([`Header::new`], [`Header::add_signature`]), the length of
    /// [`Header::to_bytes`].
    pub len: u64,
}

impl Header {
    /// A header for `manifest` (validated), serialized compactly, with no signatures yet.
    pub fn new(manifest: Manifest) -> Result<Header, ArtifactError> {
        manifest.validate()?;
        let manifest_bytes = serde_json::to_vec(&manifest).map_err(|e| ArtifactError::Manifest(e.to_string()))?;
        if manifest_bytes.len() > MAX_MANIFEST_LEN as usize {
            return Err(ArtifactError::HeaderTooLarge);
        }
        let mut h = Header { manifest, manifest_bytes, signatures: Vec::new(), len: 0 };
        h.len = h.computed_len();
        Ok(h)
    }

    fn computed_len(&self) -> u64 {
        8 + 4 + self.manifest_bytes.len() as u64 + 4 + signatures_json(&self.signatures).len() as u64
    }

    /// The length of the whole file: header plus payloads.
    pub fn total_len(&self) -> u64 {
        self.len + self.manifest.payloads_len()
    }

    /// Offset of payload `index` in the file.
    pub fn payload_offset(&self, index: usize) -> Option<u64> {
        (index < self.manifest.payloads.len())
            .then(|| self.len + self.manifest.payloads[..index].iter().map(|p| p.size).sum::<u64>())
    }

    /// Adds `key`'s signature of the manifest, replacing an earlier one by the same key.
    pub fn add_signature(&mut self, key: &SigningKey) -> Result<(), ArtifactError> {
        let sig = Signature {
            key_id: key.key_id(),
            alg: ALG_ED25519.into(),
            sig: key.sign_with_context(ARTIFACT_SIG_CONTEXT, &self.manifest_bytes),
        };
        match self.signatures.iter_mut().find(|s| s.key_id == sig.key_id) {
            Some(existing) => *existing = sig,
            None => self.signatures.push(sig),
        }
        if signatures_json(&self.signatures).len() > MAX_SIGNATURES_LEN as usize {
            return Err(ArtifactError::HeaderTooLarge);
        }
        self.len = self.computed_len();
        Ok(())
    }

    /// Checks that `key` signed this manifest: for a single trusted key, without a root.
    pub fn verify_with_key(&self, key: &PublicKey) -> Result<(), TrustError> {
        let id = key.key_id();
        let Some(sig) = self.signatures.iter().find(|s| s.key_id == id && s.alg == ALG_ED25519) else {
            return Err(match self.signatures.first() {
                None => TrustError::Unsigned,
                Some(s) => TrustError::UnknownKey(s.key_id.clone()),
            });
        };
        if key.verify_with_context(ARTIFACT_SIG_CONTEXT, &self.manifest_bytes, &sig.sig) {
            Ok(())
        } else {
            Err(TrustError::BadSignature(id))
        }
    }

    /// The header's bytes as they go in the file.
    pub fn to_bytes(&self) -> Vec<u8> {
        let sigs = signatures_json(&self.signatures);
        let mut out = Vec::with_capacity(16 + self.manifest_bytes.len() + sigs.len());
        out.extend_from_slice(MAGIC);
        out.push(FORMAT_VERSION);
        out.extend_from_slice(&(self.manifest_bytes.len() as u32).to_be_bytes());
        out.extend_from_slice(&self.manifest_bytes);
        out.extend_from_slice(&(sigs.len() as u32).to_be_bytes());
        out.extend_from_slice(&sigs);
        out
    }
}

fn signatures_json(sigs: &[Signature]) -> Vec<u8> {
    serde_json::to_vec(sigs).unwrap_or_else(|_| b"[]".to_vec())
}

/// Checks the 8 bytes of magic and version.
pub(crate) fn check_magic(b: &[u8]) -> Result<(), ArtifactError> {
    let n = b.len().min(7);
    if b[..n] != MAGIC[..n] {
        return Err(ArtifactError::BadMagic);
    }
    match b.get(7) {
        Some(&v) if v != FORMAT_VERSION => Err(ArtifactError::UnsupportedVersion(v)),
        _ => Ok(()),
    }
}

pub(crate) fn check_manifest_len(len: u32) -> Result<(), ArtifactError> {
    match len {
        0 => Err(ArtifactError::Manifest("the manifest is empty".into())),
        l if l > MAX_MANIFEST_LEN => Err(ArtifactError::HeaderTooLarge),
        _ => Ok(()),
    }
}

pub(crate) fn check_signatures_len(len: u32) -> Result<(), ArtifactError> {
    if len > MAX_SIGNATURES_LEN { Err(ArtifactError::HeaderTooLarge) } else { Ok(()) }
}

/// Parses the signatures block: a JSON array of signatures, key ids unique.
pub(crate) fn parse_signatures(b: &[u8]) -> Result<Vec<Signature>, ArtifactError> {
    let bad = |m: String| ArtifactError::Signatures(m);
    let sigs: Vec<Signature> = serde_json::from_slice(b).map_err(|e| bad(e.to_string()))?;
    for (i, s) in sigs.iter().enumerate() {
        if !crate::keys::is_key_id(&s.key_id) {
            return Err(bad(format!("key_id {:?} must be 16 lowercase hex characters", s.key_id)));
        }
        if s.alg.is_empty() || s.alg.len() > 32 || s.sig.len() > 1024 {
            return Err(bad(format!("signature by {} is malformed", s.key_id)));
        }
        if sigs[..i].iter().any(|o| o.key_id == s.key_id) {
            return Err(bad(format!("key {} signed twice", s.key_id)));
        }
    }
    Ok(sigs)
}

/// The result of a complete, structurally valid artifact whose payloads all match the manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub header: Header,
    /// SHA-256 of the whole file, lowercase hex: its content address.
    pub file_sha256: String,
    /// Bytes of the whole file.
    pub size: u64,
}

enum State {
    // The header's parts collect in `buf` until it has `need` bytes.
    Magic,
    ManifestLen,
    Manifest,
    SignaturesLen,
    Signatures,
    Payload { index: usize, remaining: u64 },
    Done,
    Failed,
}

/// Verifies an artifact fed in chunks of any size; see the module documentation.
pub struct StreamVerifier {
    state: State,
    buf: Vec<u8>,
    need: usize,
    manifest: Option<(Manifest, Vec<u8>)>,
    header: Option<Header>,
    file_hash: Context,
    /// The current payload's digest so far.
    payload_hash: Context,
    seen: u64,
    limit: u64,
}

impl std::fmt::Debug for StreamVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamVerifier")
            .field("bytes_seen", &self.seen)
            .field("header", &self.header.is_some())
            .field("done", &matches!(self.state, State::Done))
            .finish_non_exhaustive()
    }
}

impl Default for StreamVerifier {
    fn default() -> Self {
        Self::new()
    }
}

impl StreamVerifier {
    /// A verifier without a size limit.
    pub fn new() -> Self {
        Self::with_limit(u64::MAX)
    }

    /// A verifier that refuses an artifact longer than `max_total` bytes as soon as its header
    /// says so.
    pub fn with_limit(max_total: u64) -> Self {
        StreamVerifier {
            state: State::Magic,
            buf: Vec::with_capacity(8),
            need: 8,
            manifest: None,
            header: None,
            file_hash: Context::new(&SHA256),
            payload_hash: Context::new(&SHA256),
            seen: 0,
            limit: max_total,
        }
    }

    /// The header, once all of it has arrived.
    pub fn header(&self) -> Option<&Header> {
        self.header.as_ref()
    }

    pub fn bytes_seen(&self) -> u64 {
        self.seen
    }

    /// Takes the next bytes of the file. Fails as soon as anything is wrong; after a failure
    /// every call fails.
    pub fn feed(&mut self, chunk: &[u8]) -> Result<(), ArtifactError> {
        if matches!(self.state, State::Failed) {
            return Err(ArtifactError::AlreadyFailed);
        }
        let r = self.feed_inner(chunk);
        if r.is_err() {
            self.state = State::Failed;
        }
        r
    }

    fn feed_inner(&mut self, mut chunk: &[u8]) -> Result<(), ArtifactError> {
        let room = self.limit.saturating_sub(self.seen);
        if chunk.len() as u64 > room {
            return Err(ArtifactError::TooLarge { limit: self.limit });
        }
        self.file_hash.update(chunk);
        self.seen += chunk.len() as u64;
        loop {
            match &mut self.state {
                State::Done => {
                    return if chunk.is_empty() { Ok(()) } else { Err(ArtifactError::TrailingBytes) };
                }
                State::Failed => return Err(ArtifactError::AlreadyFailed),
                State::Payload { index, remaining } => {
                    if *remaining > 0 {
                        if chunk.is_empty() {
                            return Ok(());
                        }
                        let n = (*remaining).min(chunk.len() as u64) as usize;
                        self.payload_hash.update(&chunk[..n]);
                        *remaining -= n as u64;
                        chunk = &chunk[n..];
                        if *remaining > 0 {
                            return Ok(());
                        }
                    }
                    let index = *index;
                    let hash = std::mem::replace(&mut self.payload_hash, Context::new(&SHA256));
                    let manifest = &self.header.as_ref().expect("payloads follow the header").manifest;
                    let info = &manifest.payloads[index];
                    if hex::encode(hash.finish()) != info.sha256 {
                        return Err(ArtifactError::DigestMismatch { payload: info.name.clone() });
                    }
                    self.state = payload_state(manifest, index + 1);
                }
                _ => {
                    if chunk.is_empty() {
                        return Ok(());
                    }
                    let n = (self.need - self.buf.len()).min(chunk.len());
                    self.buf.extend_from_slice(&chunk[..n]);
                    chunk = &chunk[n..];
                    if matches!(self.state, State::Magic) {
                        // Refuse a wrong file at its first wrong byte.
                        check_magic(&self.buf)?;
                    }
                    if self.buf.len() == self.need {
                        self.header_part_complete()?;
                    }
                }
            }
        }
    }

    fn header_part_complete(&mut self) -> Result<(), ArtifactError> {
        let buf = std::mem::take(&mut self.buf);
        let len_of = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        match self.state {
            State::Magic => {
                self.state = State::ManifestLen;
                self.need = 4;
            }
            State::ManifestLen => {
                let len = len_of(&buf);
                check_manifest_len(len)?;
                self.state = State::Manifest;
                self.need = len as usize;
            }
            State::Manifest => {
                let m = Manifest::parse(&buf)?;
                self.manifest = Some((m, buf));
                self.state = State::SignaturesLen;
                self.need = 4;
            }
            State::SignaturesLen => {
                let len = len_of(&buf);
                check_signatures_len(len)?;
                self.state = State::Signatures;
                self.need = len as usize;
                if len == 0 {
                    return Err(ArtifactError::Signatures("the signatures block is empty (use [] for none)".into()));
                }
            }
            State::Signatures => {
                let signatures = parse_signatures(&buf)?;
                let (manifest, manifest_bytes) = self.manifest.take().expect("the manifest comes first");
                let len = 8 + 4 + manifest_bytes.len() as u64 + 4 + buf.len() as u64;
                let header = Header { manifest, manifest_bytes, signatures, len };
                if header.total_len() > self.limit {
                    return Err(ArtifactError::TooLarge { limit: self.limit });
                }
                self.state = payload_state(&header.manifest, 0);
                self.header = Some(header);
            }
            _ => unreachable!("only header parts collect bytes"),
        }
        self.buf = Vec::with_capacity(self.need.min(64 * 1024));
        Ok(())
    }

    /// The verified result; [`ArtifactError::Truncated`] unless every byte of the last payload
    /// arrived.
    pub fn finish(self) -> Result<Verified, ArtifactError> {
        match self.state {
            State::Done => {
                let header = self.header.expect("done implies a header");
                Ok(Verified { header, file_sha256: hex::encode(self.file_hash.finish()), size: self.seen })
            }
            State::Failed => Err(ArtifactError::AlreadyFailed),
            _ => Err(ArtifactError::Truncated),
        }
    }
}

fn payload_state(m: &Manifest, index: usize) -> State {
    match m.payloads.get(index) {
        Some(p) => State::Payload { index, remaining: p.size },
        None => State::Done,
    }
}
