//! Building artifacts from files, and adding a signature to an existing artifact.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use ring::digest::{Context, SHA256};

use crate::ArtifactError;
use crate::keys::SigningKey;
use crate::manifest::{Manifest, PayloadInfo, PayloadRole};
use crate::read::Reader;
use crate::stream::Header;

const BUF: usize = 64 * 1024;

/// Builds an artifact: payload files are hashed first (for the manifest), then streamed into
/// the output after the header. Nothing is held whole in memory.
#[derive(Debug)]
pub struct Builder {
    manifest: Manifest,
    files: Vec<(String, PathBuf, PayloadRole)>,
}

impl Builder {
    /// `manifest` gives everything but the payloads, which come from [`Builder::payload`].
    pub fn new(manifest: Manifest) -> Self {
        Builder { manifest, files: Vec::new() }
    }

    /// Adds the file at `path` as payload `name`, after those added before.
    pub fn payload(mut self, name: impl Into<String>, path: impl Into<PathBuf>, role: PayloadRole) -> Self {
        self.files.push((name.into(), path.into(), role));
        self
    }

    /// Writes the artifact to `out`, signed by each of `signers` (none: unsigned), and returns
    /// its manifest. Fails if a payload file changes between hashing and writing.
    pub fn build(self, mut out: impl Write, signers: &[&SigningKey]) -> Result<Manifest, ArtifactError> {
        let Builder { mut manifest, files } = self;
        if !manifest.payloads.is_empty() {
            return Err(ArtifactError::Manifest(
                "the builder's manifest must not list payloads: add them with Builder::payload".into(),
            ));
        }
        for (name, path, role) in &files {
            let (size, sha256) = hash_file(path)?;
            manifest.payloads.push(PayloadInfo { name: name.clone(), size, sha256, role: *role });
        }
        let mut header = Header::new(manifest)?;
        for key in signers {
            header.add_signature(key)?;
        }
        out.write_all(&header.to_bytes())?;
        for ((_, path, _), info) in files.iter().zip(&header.manifest.payloads) {
            copy_checked(path, info, &mut out)?;
        }
        out.flush()?;
        Ok(header.manifest)
    }
}

fn open(path: &Path) -> Result<File, ArtifactError> {
    File::open(path).map_err(|source| ArtifactError::File { path: path.to_path_buf(), source })
}

/// Size and lowercase hex SHA-256 of a file, read in chunks.
pub fn hash_file(path: &Path) -> Result<(u64, String), ArtifactError> {
    let mut f = open(path)?;
    let mut hash = Context::new(&SHA256);
    let mut buf = vec![0u8; BUF];
    let mut size = 0u64;
    loop {
        let n = match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(source) => return Err(ArtifactError::File { path: path.to_path_buf(), source }),
        };
        hash.update(&buf[..n]);
        size += n as u64;
    }
    Ok((size, hex::encode(hash.finish())))
}

fn copy_checked(path: &Path, info: &PayloadInfo, out: &mut impl Write) -> Result<(), ArtifactError> {
    let mut f = open(path)?.take(info.size + 1);
    let mut hash = Context::new(&SHA256);
    let mut buf = vec![0u8; BUF];
    let mut size = 0u64;
    loop {
        let n = match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(source) => return Err(ArtifactError::File { path: path.to_path_buf(), source }),
        };
        size += n as u64;
        if size > info.size {
            break;
        }
        hash.update(&buf[..n]);
        out.write_all(&buf[..n])?;
    }
    if size != info.size {
        return Err(ArtifactError::SizeMismatch { payload: info.name.clone(), expected: info.size, actual: size });
    }
    if hex::encode(hash.finish()) != info.sha256 {
        return Err(ArtifactError::DigestMismatch { payload: info.name.clone() });
    }
    Ok(())
}

/// Copies the artifact from `input` to `output` with `key`'s signature added (replacing an
/// earlier signature by the same key), checking every payload digest on the way. Returns the
/// new header. On error `output` holds a partial file: write to a temporary file and rename.
pub fn sign(input: impl Read, mut output: impl Write, key: &SigningKey) -> Result<Header, ArtifactError> {
    let mut reader = Reader::new(input)?;
    let mut header = reader.header().clone();
    header.add_signature(key)?;
    output.write_all(&header.to_bytes())?;
    while let Some(mut payload) = reader.next_payload()? {
        io::copy(&mut payload, &mut output)?;
    }
    reader.finish()?;
    output.flush()?;
    Ok(header)
}
