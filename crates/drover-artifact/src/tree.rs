//! Directory payloads: a deterministic tar of a directory, and an extractor that cannot write
//! outside its destination.
//!
//! [`pack_dir`] writes entries sorted by name (depth first, a directory before its contents)
//! with mtime 0, uid/gid 0 and no user names, so the same tree always gives the same bytes and
//! the same digest. Regular files, directories and symlinks only; permission bits are kept
//! without setuid, setgid and sticky.
//!
//! [`unpack_safe`] extracts into a new, empty directory and refuses, before writing anything
//! for the entry:
//! - absolute paths and paths with a `..` component;
//! - symlinks whose target is absolute, has a `..` after a name, or climbs above the
//!   destination (so a link's target never passes through another link and then climbs);
//! - any entry under a symlink (writing through a link), and an entry whose path is already
//!   taken (so a file cannot replace a link or be written through it);
//! - hard links, device nodes, FIFOs and other special entries.
//!
//! Modes keep the permission bits only (setuid, setgid and sticky are dropped); owners are
//! never changed. On error the destination holds a partial tree: extract into a staging
//! directory and move it into place only after `Ok`.

use std::ffi::OsStr;
use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use crate::ArtifactError;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UnpackError {
    #[error("reading the archive: {0}")]
    Io(#[from] io::Error),
    /// The artifact under the archive failed (a payload digest or truncation).
    #[error(transparent)]
    Artifact(ArtifactError),
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error("destination {0} must be a new or empty directory")]
    DestNotEmpty(PathBuf),
    #[error("refusing archive entry {path:?}: {reason}")]
    UnsafePath { path: String, reason: &'static str },
    #[error(
        "refusing symlink {path:?} -> {target:?}: its target must stay inside the destination (relative, `..` only at the start and not above the top)"
    )]
    UnsafeSymlink { path: String, target: String },
    #[error("refusing archive entry {path:?}: it lies under the symlink {link:?}")]
    UnderSymlink { path: String, link: String },
    #[error("refusing hard link {path:?}: hard links are not allowed")]
    HardLink { path: String },
    #[error("refusing archive entry {path:?}: {kind} entries are not allowed")]
    Special { path: String, kind: &'static str },
    #[error("refusing archive entry {path:?}: the path is already taken by an earlier entry")]
    Exists { path: String },
}

/// Writes a deterministic tar of `dir`'s contents to `out`; returns the bytes written.
pub fn pack_dir(dir: &Path, out: impl Write) -> Result<u64, ArtifactError> {
    let meta = fs::metadata(dir).map_err(|source| ArtifactError::File { path: dir.to_path_buf(), source })?;
    if !meta.is_dir() {
        return Err(ArtifactError::Pack { path: dir.to_path_buf(), reason: "not a directory".into() });
    }
    let mut tar = tar::Builder::new(Counter { inner: out, n: 0 });
    pack_into(&mut tar, dir, Path::new(""), 0)?;
    tar.finish()?;
    let mut counter = tar.into_inner()?;
    counter.flush()?;
    Ok(counter.n)
}

struct Counter<W> {
    inner: W,
    n: u64,
}

impl<W: Write> Write for Counter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.n += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_mtime(0);
    h.set_uid(0);
    h.set_gid(0);
    h
}

#[cfg(unix)]
fn permissions(m: &fs::Metadata) -> u32 {
    use std::os::unix::fs::PermissionsExt as _;
    m.permissions().mode() & 0o777
}

#[cfg(not(unix))]
fn permissions(m: &fs::Metadata) -> u32 {
    match (m.is_dir(), m.permissions().readonly()) {
        (true, _) => 0o755,
        (false, true) => 0o444,
        (false, false) => 0o644,
    }
}

fn pack_into<W: Write>(tar: &mut tar::Builder<W>, abs: &Path, rel: &Path, depth: usize) -> Result<(), ArtifactError> {
    let file_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ArtifactError::File { path, source }
    };
    let mut entries: Vec<_> =
        fs::read_dir(abs).map_err(file_err(abs))?.collect::<Result<_, _>>().map_err(file_err(abs))?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let path = e.path();
        let name = rel.join(e.file_name());
        let meta = fs::symlink_metadata(&path).map_err(file_err(&path))?;
        let ft = meta.file_type();
        if ft.is_symlink() {
            let target = fs::read_link(&path).map_err(file_err(&path))?;
            if !symlink_target_ok(target.as_os_str(), depth) {
                return Err(ArtifactError::Pack {
                    path,
                    reason: format!(
                        "symlink target {} leaves the directory, and devices would refuse it",
                        target.display()
                    ),
                });
            }
            let mut h = header(tar::EntryType::Symlink, 0o777, 0);
            tar.append_link(&mut h, &name, &target)?;
        } else if ft.is_dir() {
            let mut h = header(tar::EntryType::Directory, permissions(&meta), 0);
            tar.append_data(&mut h, &name, io::empty())?;
            pack_into(tar, &path, &name, depth + 1)?;
        } else if ft.is_file() {
            let f = fs::File::open(&path).map_err(file_err(&path))?;
            let mut h = header(tar::EntryType::Regular, permissions(&meta), meta.len());
            // take(): a file that grows while packing cannot overrun its header's size; one
            // that shrinks fails in append_data.
            tar.append_data(&mut h, &name, f.take(meta.len()))?;
        } else {
            return Err(ArtifactError::Pack {
                path,
                reason: "only regular files, directories and symlinks can be packed".into(),
            });
        }
    }
    Ok(())
}

/// The components of a `/`-separated archive path, without empty and `.` components.
fn components(raw: &[u8]) -> impl Iterator<Item = &[u8]> {
    raw.split(|&b| b == b'/').filter(|c| !c.is_empty() && *c != b".")
}

#[cfg(unix)]
fn os_bytes(s: &OsStr) -> std::borrow::Cow<'_, [u8]> {
    use std::os::unix::ffi::OsStrExt as _;
    std::borrow::Cow::Borrowed(s.as_bytes())
}

#[cfg(not(unix))]
fn os_bytes(s: &OsStr) -> std::borrow::Cow<'_, [u8]> {
    std::borrow::Cow::Owned(s.to_string_lossy().replace('\\', "/").into_bytes())
}

/// Whether a symlink at `depth` directories below the top may point at `target`: relative,
/// `..` only as leading components and no more of them than `depth`.
fn symlink_target_ok(target: &OsStr, depth: usize) -> bool {
    let raw = os_bytes(target);
    if raw.is_empty() || raw.starts_with(b"/") || raw.contains(&0) {
        return false;
    }
    let mut ups = 0;
    let mut named = false;
    for c in components(&raw) {
        if c == b".." {
            if named {
                return false;
            }
            ups += 1;
        } else {
            named = true;
        }
    }
    ups <= depth
}

#[cfg(unix)]
fn bytes_to_path(b: &[u8]) -> Option<PathBuf> {
    use std::os::unix::ffi::OsStrExt as _;
    Some(PathBuf::from(OsStr::from_bytes(b)))
}

#[cfg(not(unix))]
fn bytes_to_path(b: &[u8]) -> Option<PathBuf> {
    let s = std::str::from_utf8(b).ok()?;
    if s.contains(['\\', ':']) {
        return None;
    }
    Some(PathBuf::from(s))
}

/// Passes reads through and keeps the first read error, so an `ArtifactError` from a payload
/// reader survives the tar crate's wrapping of it.
struct Watch<R> {
    inner: R,
    failed: Option<io::Error>,
}

impl<R: Read> Read for Watch<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.inner.read(buf) {
            Ok(n) => Ok(n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Err(e),
            Err(e) => {
                let copy = io::Error::new(e.kind(), e.to_string());
                self.failed.get_or_insert(e);
                Err(copy)
            }
        }
    }
}

fn prepare_dest(dest: &Path) -> Result<(), UnpackError> {
    let write_err = |source| UnpackError::Write { path: dest.to_path_buf(), source };
    match fs::symlink_metadata(dest) {
        Ok(m) if m.is_dir() => {
            if fs::read_dir(dest).map_err(write_err)?.next().is_some() {
                return Err(UnpackError::DestNotEmpty(dest.to_path_buf()));
            }
            Ok(())
        }
        Ok(_) => Err(UnpackError::DestNotEmpty(dest.to_path_buf())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => fs::create_dir(dest).map_err(write_err),
        Err(e) => Err(write_err(e)),
    }
}

/// Extracts the tar in `input` into `dest` (a new or empty directory); see the module
/// documentation for what is refused. Reads `input` to its end after the archive, so a
/// [`crate::PayloadReader`] checks its digest before this returns `Ok`.
pub fn unpack_safe(input: impl Read, dest: &Path) -> Result<(), UnpackError> {
    prepare_dest(dest)?;
    let mut watch = Watch { inner: input, failed: None };
    let result = unpack_entries(&mut watch, dest).and_then(|()| {
        io::copy(&mut watch, &mut io::sink())?;
        Ok(())
    });
    match (result, watch.failed) {
        (Ok(()), _) => Ok(()),
        // The input failed: its own error explains the failure better than what the tar
        // crate or the copy made of it.
        (Err(_), Some(original)) => Err(match ArtifactError::from(original) {
            ArtifactError::Io(e) => UnpackError::Io(e),
            a => UnpackError::Artifact(a),
        }),
        (Err(e), _) => Err(e),
    }
}

fn unpack_entries<R: Read>(input: &mut R, dest: &Path) -> Result<(), UnpackError> {
    let mut archive = tar::Archive::new(input);
    // Directory modes are set last, so a read-only directory can still be filled.
    let mut dir_modes: Vec<(PathBuf, u32)> = Vec::new();
    for entry in archive.entries()? {
        let mut entry = entry?;
        let raw = entry.path_bytes().into_owned();
        let shown = String::from_utf8_lossy(&raw).into_owned();
        let unsafe_path = |reason| UnpackError::UnsafePath { path: shown.clone(), reason };
        let kind = entry.header().entry_type();
        if kind == tar::EntryType::XGlobalHeader {
            continue;
        }
        if raw.starts_with(b"/") {
            return Err(unsafe_path("absolute paths are not allowed"));
        }
        let parts: Vec<&[u8]> = components(&raw).collect();
        if parts.contains(&&b".."[..]) {
            return Err(unsafe_path("`..` components are not allowed"));
        }
        if parts.iter().any(|p| p.contains(&0)) {
            return Err(unsafe_path("NUL in the path"));
        }
        let Some((last, parents)) = parts.split_last() else {
            if kind == tar::EntryType::Directory {
                continue; // "./": the destination itself
            }
            return Err(unsafe_path("empty path"));
        };
        match kind {
            tar::EntryType::Link => return Err(UnpackError::HardLink { path: shown }),
            tar::EntryType::Char => return Err(UnpackError::Special { path: shown, kind: "character device" }),
            tar::EntryType::Block => return Err(UnpackError::Special { path: shown, kind: "block device" }),
            tar::EntryType::Fifo => return Err(UnpackError::Special { path: shown, kind: "FIFO" }),
            tar::EntryType::Regular | tar::EntryType::Continuous => {}
            tar::EntryType::Directory | tar::EntryType::Symlink => {}
            _ => return Err(UnpackError::Special { path: shown, kind: "sparse or other special" }),
        }
        // Walk the parents: real directories only, created as needed.
        let mut at = dest.to_path_buf();
        for (i, p) in parents.iter().enumerate() {
            at.push(bytes_to_path(p).ok_or_else(|| unsafe_path("a name this system cannot represent"))?);
            match fs::symlink_metadata(&at) {
                Ok(m) if m.file_type().is_symlink() => {
                    let link = parts[..=i].iter().map(|c| String::from_utf8_lossy(c)).collect::<Vec<_>>().join("/");
                    return Err(UnpackError::UnderSymlink { path: shown, link });
                }
                Ok(m) if m.is_dir() => {}
                Ok(_) => return Err(UnpackError::Exists { path: shown }),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    fs::create_dir(&at).map_err(|source| UnpackError::Write { path: at.clone(), source })?;
                }
                Err(source) => return Err(UnpackError::Write { path: at, source }),
            }
        }
        let target = at.join(bytes_to_path(last).ok_or_else(|| unsafe_path("a name this system cannot represent"))?);
        let write_err = |source: io::Error| {
            if source.kind() == io::ErrorKind::AlreadyExists {
                UnpackError::Exists { path: shown.clone() }
            } else {
                UnpackError::Write { path: target.clone(), source }
            }
        };
        let mode = entry.header().mode().unwrap_or(0o644) & 0o777;
        match kind {
            tar::EntryType::Directory => match fs::symlink_metadata(&target) {
                Ok(m) if m.is_dir() && !m.file_type().is_symlink() => dir_modes.push((target, mode)),
                Ok(_) => return Err(UnpackError::Exists { path: shown }),
                Err(_) => {
                    fs::create_dir(&target).map_err(write_err)?;
                    dir_modes.push((target, mode));
                }
            },
            tar::EntryType::Symlink => {
                let link = entry.link_name_bytes().map(|l| l.into_owned()).unwrap_or_default();
                let link_path = bytes_to_path(&link);
                let ok = link_path.as_ref().is_some_and(|l| symlink_target_ok(l.as_os_str(), parents.len()));
                let (Some(link_path), true) = (link_path, ok) else {
                    return Err(UnpackError::UnsafeSymlink {
                        path: shown,
                        target: String::from_utf8_lossy(&link).into_owned(),
                    });
                };
                make_symlink(&link_path, &target).map_err(write_err)?;
            }
            _ => {
                // create_new: never follows or replaces what is already there (a symlink).
                let mut f = create_file(&target).map_err(write_err)?;
                // A read error here is replaced by the input's own error in unpack_safe.
                io::copy(&mut entry, &mut f).map_err(|source| UnpackError::Write { path: target.clone(), source })?;
                set_mode(&target, mode).map_err(write_err)?;
            }
        }
    }
    // Deepest first, so a read-only parent is locked after its children.
    dir_modes.sort_by_key(|(dir, _)| std::cmp::Reverse(dir.components().count()));
    for (dir, mode) in dir_modes {
        set_mode(&dir, mode).map_err(|source| UnpackError::Write { path: dir.clone(), source })?;
    }
    Ok(())
}

#[cfg(unix)]
fn create_file(path: &Path) -> io::Result<fs::File> {
    use std::os::unix::fs::OpenOptionsExt as _;
    fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)
}

#[cfg(not(unix))]
fn create_file(path: &Path) -> io::Result<fs::File> {
    fs::OpenOptions::new().write(true).create_new(true).open(path)
}

#[cfg(unix)]
fn set_mode(path: &Path, mode: u32) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
}

#[cfg(not(unix))]
fn set_mode(_path: &Path, _mode: u32) -> io::Result<()> {
    Ok(())
}

#[cfg(unix)]
fn make_symlink(target: &Path, link: &Path) -> io::Result<()> {
    std::os::unix::fs::symlink(target, link)
}

#[cfg(not(unix))]
fn make_symlink(_target: &Path, _link: &Path) -> io::Result<()> {
    Err(io::Error::new(io::ErrorKind::Unsupported, "symlinks are extracted on Unix only"))
}

#[cfg(test)]
mod tests {
    use super::symlink_target_ok;
    use std::ffi::OsStr;

    #[test]
    fn symlink_targets() {
        for (t, depth, ok) in [
            ("x", 0, true),
            ("a/b", 0, true),
            ("./x", 0, true),
            ("..", 1, true),
            ("../x", 1, true),
            ("../../x", 1, false),
            ("../x", 0, false),
            ("a/../x", 3, false),
            ("/etc/passwd", 5, false),
            ("", 0, false),
        ] {
            assert_eq!(symlink_target_ok(OsStr::new(t), depth), ok, "{t} at depth {depth}");
        }
    }
}
