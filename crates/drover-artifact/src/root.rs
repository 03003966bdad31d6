//! The trust root (`root.json`): a small signed document naming the root keys (which sign
//! roots) and the release keys (which sign artifacts). Devices get their first root at
//! provisioning and accept newer ones only along a chain of signatures.
//!
//! Rules:
//! - The first root must be signed by `root_threshold` of its own root keys.
//! - A newer root is accepted only if its version is exactly the current one plus one, and it
//!   is signed by `root_threshold` of the *current* root's root keys and by its own threshold of
//!   its own root keys. Several newer roots are applied one after the other.
//! - Root signatures cover `drover-root-v1\0` followed by the canonical JSON of `signed`: the
//!   parsed struct serialized again with `serde_json::to_vec` (fixed field order, no
//!   whitespace), so `root.json` itself may be formatted freely.
//! - Artifacts are trusted when signed by a release key of the current root that is not in
//!   `revoked`. A revoked key is refused with its own error even if still listed as a release
//!   key. When the current root has expired, every artifact is refused until a newer root is
//!   applied (applying roots ignores expiry, so an expired device can recover).
//! - A key counts towards a threshold only if listed in that root's `root_keys` and not in its
//!   `revoked`; each key counts once.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::keys::{PublicKey, SigningKey};
use crate::stream::{ALG_ED25519, Header, Signature};

/// Domain separation for root signatures.
pub const ROOT_SIG_CONTEXT: &[u8] = b"drover-root-v1\0";
/// `signed.type` of a root.
pub const ROOT_TYPE: &str = "drover-root";
/// The largest `root.json` accepted, in bytes.
pub const MAX_ROOT_LEN: usize = 256 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TrustError {
    #[error("the artifact is not signed; sign it with a release key (`drover artifact sign --key KEY FILE`)")]
    Unsigned,
    #[error("the artifact is signed by key {0}, which the trust root does not list as a release key")]
    UnknownKey(String),
    #[error("the artifact is signed by key {0}, which the trust root revokes")]
    RevokedKey(String),
    #[error(
        "the signature by key {0} does not match the manifest: the artifact was altered after signing, or the signature is corrupt"
    )]
    BadSignature(String),
    #[error("the trust root has expired: apply a newer root (signed by the root keys) before installing artifacts")]
    Expired,
    #[error("invalid trust root: {0}")]
    InvalidRoot(String),
    #[error("root version {version} is signed by {have} of {what}, and needs {need}")]
    Threshold { version: u64, what: &'static str, have: usize, need: u32 },
    #[error("root version {got} cannot follow version {current}: apply version {} first", current + 1)]
    VersionSkip { current: u64, got: u64 },
}

/// A key named in a root.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RootKey {
    /// The key id of `public`.
    pub id: String,
    pub public: PublicKey,
    /// A label for people (`ci-2026`); may be empty.
    #[serde(default)]
    pub name: String,
}

impl RootKey {
    pub fn new(public: PublicKey, name: impl Into<String>) -> Self {
        RootKey { id: public.key_id(), public, name: name.into() }
    }
}

/// The signed part of a root. Field order is the canonical JSON order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Root {
    pub v: u32,
    #[serde(rename = "type")]
    pub kind: String,
    pub version: u64,
    /// RFC 3339, or `null` for never.
    pub expires: Option<String>,
    pub root_keys: Vec<RootKey>,
    pub root_threshold: u32,
    pub release_keys: Vec<RootKey>,
    /// Key ids refused everywhere, even if listed above.
    #[serde(default)]
    pub revoked: Vec<String>,
}

/// `root.json`: the signed root and its signatures.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RootDocument {
    pub signed: Root,
    pub signatures: Vec<Signature>,
}

impl Root {
    /// Version `version`, format `v` 1, type `drover-root`, threshold 1, nothing revoked.
    pub fn new(version: u64, root_keys: Vec<RootKey>, release_keys: Vec<RootKey>) -> Self {
        Root {
            v: 1,
            kind: ROOT_TYPE.into(),
            version,
            expires: None,
            root_keys,
            root_threshold: 1,
            release_keys,
            revoked: Vec::new(),
        }
    }

    /// The canonical bytes root signatures cover (after [`ROOT_SIG_CONTEXT`]).
    pub fn canonical_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn validate(&self) -> Result<(), TrustError> {
        let bad = |m: String| Err(TrustError::InvalidRoot(m));
        if self.v != 1 {
            return bad(format!("root format v {} is not supported; this build reads v 1", self.v));
        }
        if self.kind != ROOT_TYPE {
            return bad(format!("type is {:?}, expected {ROOT_TYPE:?}", self.kind));
        }
        if self.version == 0 {
            return bad("version must be 1 or more".into());
        }
        if let Some(e) = &self.expires
            && crate::rfc3339::parse(e).is_none()
        {
            return bad(format!("expires {e:?} is not an RFC 3339 time (2027-01-01T00:00:00Z)"));
        }
        if self.root_keys.is_empty() {
            return bad("root_keys must name at least one key".into());
        }
        let usable = self.root_keys.iter().filter(|k| !self.is_revoked(&k.id)).count();
        if self.root_threshold == 0 || self.root_threshold as usize > usable {
            return bad(format!(
                "root_threshold {} must be between 1 and the number of unrevoked root keys ({usable})",
                self.root_threshold
            ));
        }
        for (list, keys) in [("root_keys", &self.root_keys), ("release_keys", &self.release_keys)] {
            let mut seen = BTreeSet::new();
            for k in keys {
                if k.id != k.public.key_id() {
                    return bad(format!(
                        "{list}: id {:?} is not the key id of {} ({})",
                        k.id,
                        k.public,
                        k.public.key_id()
                    ));
                }
                if !seen.insert(&k.id) {
                    return bad(format!("{list}: key {} is listed twice", k.id));
                }
                if k.name.chars().count() > crate::manifest::MAX_LABEL || k.name.chars().any(char::is_control) {
                    return bad(format!("{list}: name of key {} must be at most 128 characters", k.id));
                }
            }
        }
        if let Some(r) = self.revoked.iter().find(|r| !crate::keys::is_key_id(r)) {
            return bad(format!("revoked: {r:?} is not a key id (16 lowercase hex characters)"));
        }
        Ok(())
    }

    pub fn is_revoked(&self, key_id: &str) -> bool {
        self.revoked.iter().any(|r| r == key_id)
    }

    /// Whether the root has expired at `now` (Unix seconds).
    pub fn is_expired_at(&self, now: i64) -> bool {
        self.expires.as_deref().and_then(crate::rfc3339::parse).is_some_and(|e| now >= e)
    }

    /// How many distinct unrevoked root keys of `self` produced a valid signature in `doc`.
    fn count_signers(&self, doc: &RootDocument) -> usize {
        let msg = doc.signed.canonical_bytes();
        let mut ok = BTreeSet::new();
        for s in doc.signatures.iter().filter(|s| s.alg == ALG_ED25519) {
            if self.is_revoked(&s.key_id) {
                continue;
            }
            if let Some(k) = self.root_keys.iter().find(|k| k.id == s.key_id)
                && k.public.verify_with_context(ROOT_SIG_CONTEXT, &msg, &s.sig)
            {
                ok.insert(&k.id);
            }
        }
        ok.len()
    }

    fn require_signed(&self, doc: &RootDocument, what: &'static str) -> Result<(), TrustError> {
        let have = self.count_signers(doc);
        if have < self.root_threshold as usize {
            return Err(TrustError::Threshold { version: doc.signed.version, what, have, need: self.root_threshold });
        }
        Ok(())
    }
}

impl RootDocument {
    /// Parses `root.json` and checks its structure (not its signatures).
    pub fn parse(bytes: &[u8]) -> Result<Self, TrustError> {
        if bytes.len() > MAX_ROOT_LEN {
            return Err(TrustError::InvalidRoot(format!("larger than {MAX_ROOT_LEN} bytes")));
        }
        let doc: RootDocument = serde_json::from_slice(bytes).map_err(|e| TrustError::InvalidRoot(e.to_string()))?;
        doc.signed.validate()?;
        if doc.signatures.iter().any(|s| !crate::keys::is_key_id(&s.key_id)) {
            return Err(TrustError::InvalidRoot("a signature's key_id is not 16 lowercase hex characters".into()));
        }
        Ok(doc)
    }

    /// Pretty JSON with a final newline, for `root.json`.
    pub fn to_json(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(self).unwrap_or_default();
        v.push(b'\n');
        v
    }

    /// Whether the root is signed by its own threshold of its own root keys.
    pub fn verify_self_signed(&self) -> Result<(), TrustError> {
        self.signed.require_signed(self, "its own root keys")
    }

    /// Key ids of the signatures, in order.
    pub fn signer_ids(&self) -> Vec<String> {
        self.signatures.iter().map(|s| s.key_id.clone()).collect()
    }
}

/// Validates `root` and signs it with each of `signers` (any keys: root keys of this root, or
/// of the root it replaces). The result may still lack signatures: see [`sign_root`].
pub fn create_root(root: Root, signers: &[&SigningKey]) -> Result<RootDocument, TrustError> {
    root.validate()?;
    let mut doc = RootDocument { signed: root, signatures: Vec::new() };
    for k in signers {
        sign_root(&mut doc, k);
    }
    Ok(doc)
}

/// Adds `key`'s signature to `doc`, replacing an earlier one by the same key.
pub fn sign_root(doc: &mut RootDocument, key: &SigningKey) {
    let sig = Signature {
        key_id: key.key_id(),
        alg: ALG_ED25519.into(),
        sig: key.sign_with_context(ROOT_SIG_CONTEXT, &doc.signed.canonical_bytes()),
    };
    match doc.signatures.iter_mut().find(|s| s.key_id == sig.key_id) {
        Some(existing) => *existing = sig,
        None => doc.signatures.push(sig),
    }
}

/// The root a device trusts now, and the rules for moving to a newer one.
#[derive(Debug, Clone)]
pub struct TrustStore {
    doc: RootDocument,
    json: Vec<u8>,
}

impl TrustStore {
    /// Trusts `root_json` if it is signed by its own threshold of its own root keys: the first
    /// root, installed at provisioning, or the root persisted by [`TrustStore::current_json`].
    pub fn from_initial(root_json: &[u8]) -> Result<Self, TrustError> {
        let doc = RootDocument::parse(root_json)?;
        doc.verify_self_signed()?;
        Ok(TrustStore { doc, json: root_json.to_vec() })
    }

    /// Moves to `newer_root_json` if it is the next version and signed by both the current
    /// root keys and its own (see the module documentation). `Ok(false)` for a root that is not
    /// newer than the current one.
    pub fn apply(&mut self, newer_root_json: &[u8]) -> Result<bool, TrustError> {
        let doc = RootDocument::parse(newer_root_json)?;
        let current = self.doc.signed.version;
        if doc.signed.version <= current {
            return Ok(false);
        }
        if doc.signed.version != current + 1 {
            return Err(TrustError::VersionSkip { current, got: doc.signed.version });
        }
        self.doc.signed.require_signed(&doc, "the current root's root keys")?;
        doc.verify_self_signed()?;
        self.doc = doc;
        self.json = newer_root_json.to_vec();
        Ok(true)
    }

    /// Applies each root in order (older and equal versions are skipped); true if any advanced.
    /// Stops at the first refused root, keeping the roots accepted before it.
    pub fn apply_chain<'a>(&mut self, roots: impl IntoIterator<Item = &'a [u8]>) -> Result<bool, TrustError> {
        let mut advanced = false;
        for r in roots {
            advanced |= self.apply(r)?;
        }
        Ok(advanced)
    }

    pub fn version(&self) -> u64 {
        self.doc.signed.version
    }

    pub fn root(&self) -> &Root {
        &self.doc.signed
    }

    /// The current root's bytes, exactly as received: persist these.
    pub fn current_json(&self) -> &[u8] {
        &self.json
    }

    /// Which trusted release key signed `h`, now (system clock). See
    /// [`TrustStore::verify_header_at`].
    pub fn verify_header(&self, h: &Header) -> Result<String, TrustError> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
            .unwrap_or(0);
        self.verify_header_at(h, now)
    }

    /// The key id of a trusted release key whose signature of `h`'s manifest is valid, at
    /// `now` (Unix seconds). When none is: [`TrustError::Expired`] if the root has expired,
    /// else `RevokedKey` if a revoked key signed, else `BadSignature` if a release key's
    /// signature is invalid, else `UnknownKey`, else `Unsigned`.
    pub fn verify_header_at(&self, h: &Header, now: i64) -> Result<String, TrustError> {
        let root = &self.doc.signed;
        if root.is_expired_at(now) {
            return Err(TrustError::Expired);
        }
        let (mut revoked, mut bad, mut unknown) = (None, None, None);
        for s in &h.signatures {
            if root.is_revoked(&s.key_id) {
                revoked.get_or_insert_with(|| s.key_id.clone());
                continue;
            }
            let key = root.release_keys.iter().find(|k| k.id == s.key_id);
            match key {
                Some(k) if s.alg == ALG_ED25519 => {
                    if k.public.verify_with_context(crate::ARTIFACT_SIG_CONTEXT, &h.manifest_bytes, &s.sig) {
                        return Ok(k.id.clone());
                    }
                    bad.get_or_insert_with(|| s.key_id.clone());
                }
                _ => {
                    unknown.get_or_insert_with(|| s.key_id.clone());
                }
            }
        }
        Err(if let Some(id) = revoked {
            TrustError::RevokedKey(id)
        } else if let Some(id) = bad {
            TrustError::BadSignature(id)
        } else if let Some(id) = unknown {
            TrustError::UnknownKey(id)
        } else {
            TrustError::Unsigned
        })
    }
}
