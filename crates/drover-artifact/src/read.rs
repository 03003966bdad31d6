//! A pull reader over any `io::Read`: the header first, then each payload as a stream.
//!
//! A [`PayloadReader`] hashes what passes through it. When its last byte has been read and
//! the digest differs from the manifest's, that read returns `io::ErrorKind::InvalidData`
//! carrying [`ArtifactError::DigestMismatch`], so `io::copy` into a temporary file fails before
//! the caller commits anything. Who signed is checked separately, on [`Reader::header`], before
//! any payload is read.

use std::io::{self, Read};

use ring::digest::{Context, SHA256};

use crate::ArtifactError;
use crate::manifest::{Manifest, PayloadInfo};
use crate::stream::{self, Header};

/// Reads an artifact from `R` front to back, never holding a payload in memory.
pub struct Reader<R> {
    inner: R,
    header: Header,
    /// Index of the next payload to hand out.
    next: usize,
    current: Option<Current>,
}

struct Current {
    index: usize,
    remaining: u64,
    hash: Option<Context>,
    /// Set once the digest has been checked: `Some(true)` matched.
    outcome: Option<bool>,
}

fn read_exact_or_truncated<R: Read>(r: &mut R, buf: &mut [u8]) -> Result<(), ArtifactError> {
    r.read_exact(buf).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => ArtifactError::Truncated,
        _ => ArtifactError::from(e),
    })
}

impl<R: Read> Reader<R> {
    /// Reads and parses the header (magic, manifest, signatures).
    pub fn new(mut inner: R) -> Result<Self, ArtifactError> {
        let mut magic = [0u8; 8];
        // Read the magic in one go but judge it like the stream verifier: a short file that
        // starts wrong is "not an artifact", not "truncated".
        let mut got = 0;
        while got < 8 {
            match inner.read(&mut magic[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        stream::check_magic(&magic[..got])?;
        if got < 8 {
            return Err(ArtifactError::Truncated);
        }
        let mut len = [0u8; 4];
        read_exact_or_truncated(&mut inner, &mut len)?;
        let mlen = u32::from_be_bytes(len);
        stream::check_manifest_len(mlen)?;
        let mut manifest_bytes = vec![0u8; mlen as usize];
        read_exact_or_truncated(&mut inner, &mut manifest_bytes)?;
        let manifest = Manifest::parse(&manifest_bytes)?;
        read_exact_or_truncated(&mut inner, &mut len)?;
        let slen = u32::from_be_bytes(len);
        stream::check_signatures_len(slen)?;
        if slen == 0 {
            return Err(ArtifactError::Signatures("the signatures block is empty (use [] for none)".into()));
        }
        let mut sig_bytes = vec![0u8; slen as usize];
        read_exact_or_truncated(&mut inner, &mut sig_bytes)?;
        let signatures = stream::parse_signatures(&sig_bytes)?;
        let len = 8 + 4 + u64::from(mlen) + 4 + u64::from(slen);
        Ok(Reader { inner, header: Header { manifest, manifest_bytes, signatures, len }, next: 0, current: None })
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    pub fn manifest(&self) -> &Manifest {
        &self.header.manifest
    }

    /// The next payload, in manifest order; `None` after the last. A payload left unread is
    /// first read to its end and its digest checked.
    pub fn next_payload(&mut self) -> Result<Option<PayloadReader<'_, R>>, ArtifactError> {
        self.drain_current()?;
        let index = self.next;
        let Some(info) = self.header.manifest.payloads.get(index) else {
            return Ok(None);
        };
        self.current = Some(Current { index, remaining: info.size, hash: Some(Context::new(&SHA256)), outcome: None });
        self.next += 1;
        Ok(Some(PayloadReader { reader: self }))
    }

    fn drain_current(&mut self) -> Result<(), ArtifactError> {
        if self.current.is_some() {
            io::copy(&mut PayloadReader { reader: self }, &mut io::sink())?;
            self.current = None;
        }
        Ok(())
    }

    /// Reads and checks any payloads not read yet, then checks that the file ends there.
    pub fn finish(mut self) -> Result<(), ArtifactError> {
        while self.next_payload()?.is_some() {}
        self.drain_current()?;
        let mut one = [0u8; 1];
        loop {
            match self.inner.read(&mut one) {
                Ok(0) => return Ok(()),
                Ok(_) => return Err(ArtifactError::TrailingBytes),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    pub fn into_inner(self) -> R {
        self.inner
    }
}

/// One payload's bytes; see the module documentation.
pub struct PayloadReader<'a, R> {
    reader: &'a mut Reader<R>,
}

impl<R: Read> PayloadReader<'_, R> {
    pub fn info(&self) -> &PayloadInfo {
        &self.reader.header.manifest.payloads[self.current().index]
    }

    /// Position of this payload in the manifest.
    pub fn index(&self) -> usize {
        self.current().index
    }

    fn current(&self) -> &Current {
        self.reader.current.as_ref().expect("a payload reader exists only while its payload is current")
    }

    /// Reads the rest of the payload and checks its digest.
    pub fn finish(mut self) -> Result<(), ArtifactError> {
        io::copy(&mut self, &mut io::sink())?;
        Ok(())
    }

    fn mismatch(&self) -> io::Error {
        ArtifactError::DigestMismatch { payload: self.info().name.clone() }.into_io()
    }
}

impl<R: Read> Read for PayloadReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let reader = &mut *self.reader;
        let cur = reader.current.as_mut().expect("a payload reader exists only while its payload is current");
        match cur.outcome {
            Some(true) => return Ok(0),
            Some(false) => return Err(self.mismatch()),
            None => {}
        }
        let mut n = 0;
        if cur.remaining > 0 {
            if buf.is_empty() {
                return Ok(0);
            }
            let want = cur.remaining.min(buf.len() as u64) as usize;
            n = reader.inner.read(&mut buf[..want])?;
            if n == 0 {
                return Err(ArtifactError::Truncated.into_io());
            }
            cur.remaining -= n as u64;
            if let Some(h) = cur.hash.as_mut() {
                h.update(&buf[..n]);
            }
        }
        if cur.remaining == 0 {
            let digest = hex::encode(cur.hash.take().expect("hashed until the end").finish());
            let ok = digest == reader.header.manifest.payloads[cur.index].sha256;
            cur.outcome = Some(ok);
            if !ok {
                return Err(self.mismatch());
            }
        }
        Ok(n)
    }
}
