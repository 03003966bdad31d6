//! File transfer: uploads written to a temporary file beside the target and renamed over it
//! only once size and SHA-256 match (no half-written file at the target, ever); downloads
//! streamed with their hash at the end. Paths must lie under `[remote] file_paths` after
//! symbolic links are resolved.

use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use drover_proto::remote::{
    Control, FileParams, FileSummary, FrameType, MAIN_STREAM, MAX_FRAME_DATA, Reason, ResetBody, StreamFlow,
};
use sha2::{Digest, Sha256};
use std::io::{Read, Write};

use tokio::sync::mpsc;

use super::{End, Shared, StreamIn, refusal};
use crate::config::RemoteConfig;

/// `path` resolved (symbolic links of its folder, and of the file itself when `follow`), if
/// it lies under one of the allowed prefixes (resolved too).
fn resolve(cfg: &RemoteConfig, path: &str, follow: bool) -> Result<PathBuf, Control> {
    let p = Path::new(path);
    let not_allowed = || refusal(Reason::PathNotAllowed, format!("{path} is not under [remote] file_paths"));
    let (Some(dir), Some(name)) = (p.parent(), p.file_name()) else { return Err(not_allowed()) };
    // A first check on the path as written, so a refusal does not reveal what exists.
    if !cfg.file_paths.iter().any(|a| p.starts_with(a)) {
        return Err(not_allowed());
    }
    let missing = |e: std::io::Error| refusal(Reason::NotFound, format!("{}: {e}", dir.display()));
    let real = if follow {
        std::fs::canonicalize(p).map_err(|e| refusal(Reason::NotFound, format!("{path}: {e}")))?
    } else {
        std::fs::canonicalize(dir).map_err(missing)?.join(name)
    };
    let under = cfg.file_paths.iter().any(|a| std::fs::canonicalize(a).is_ok_and(|a| real.starts_with(a)));
    if under { Ok(real) } else { Err(not_allowed()) }
}

pub(crate) struct Upload {
    target: PathBuf,
    size: u64,
    sha256: String,
    mode: u32,
}

/// The temporary file of an upload, removed unless it was renamed into place.
struct Temp(Option<PathBuf>);

impl Drop for Temp {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

async fn reset(sh: &Shared, reason: Reason, message: String) -> End {
    let body = ResetBody { reason, message: Some(drover_proto::remote::clip(message.clone())) };
    sh.link.send_json(FrameType::Reset, MAIN_STREAM, &body).await;
    (reason, message)
}

impl Upload {
    pub(crate) fn check(cfg: &RemoteConfig, f: &FileParams) -> Result<Upload, Control> {
        let size = f.size.unwrap_or(0);
        if size > cfg.max_file_size {
            return Err(refusal(
                Reason::TooLarge,
                format!("{size} bytes; this device takes at most {} ([remote] max_file_size)", cfg.max_file_size),
            ));
        }
        let target = resolve(cfg, &f.path, false)?;
        if target.is_dir() {
            return Err(refusal(Reason::BadRequest, format!("{} is a folder", f.path)));
        }
        Ok(Upload { target, size, sha256: f.sha256.clone().unwrap_or_default(), mode: f.mode.unwrap_or(0o644) })
    }

    pub(crate) async fn run(self, sh: &Shared, mut rx: mpsc::UnboundedReceiver<StreamIn>) -> End {
        let dir = self.target.parent().unwrap_or(Path::new("/")).to_path_buf();
        let name = self.target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let temp_path = dir.join(format!(".{name}.drover-{:016x}.part", rand::random::<u64>()));
        let std_file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&temp_path);
        let mut file = match std_file {
            Ok(f) => f,
            Err(e) => return reset(sh, Reason::IoError, format!("{}: {e}", temp_path.display())).await,
        };
        let mut temp = Temp(Some(temp_path.clone()));
        let mut flow = StreamFlow::new();
        let mut hash = Sha256::new();
        let mut received = 0u64;
        loop {
            let Some(m) = rx.recv().await else { return (Reason::Closed, "upload cancelled".into()) };
            match m.kind {
                FrameType::Data => {
                    if let Err(e) = flow.on_received(MAIN_STREAM, m.payload.len()) {
                        return reset(sh, Reason::ProtocolError, e.to_string()).await;
                    }
                    received += m.payload.len() as u64;
                    if received > self.size {
                        return reset(sh, Reason::SizeMismatch, format!("more than the announced {} bytes", self.size))
                            .await;
                    }
                    // Plain writes: they land in the page cache; the flush to disk is below.
                    if let Err(e) = file.write_all(&m.payload) {
                        return reset(sh, Reason::IoError, format!("{}: {e}", temp_path.display())).await;
                    }
                    hash.update(&m.payload);
                    flow.on_consumed(m.payload.len());
                    if let Some(g) = flow.take_grant(false) {
                        sh.link.send(FrameType::Window, MAIN_STREAM, g, &[]).await;
                    }
                }
                FrameType::Eof => break,
                FrameType::Reset => return (Reason::Closed, "upload cancelled by the server".into()),
                _ => {}
            }
        }
        if received != self.size {
            return reset(sh, Reason::SizeMismatch, format!("{received} bytes arrived, {} announced", self.size)).await;
        }
        let got = hex::encode(hash.finalize());
        if got != self.sha256 {
            return reset(sh, Reason::HashMismatch, format!("the bytes hash to {got}, not {}", self.sha256)).await;
        }
        let (mode, target, temp_p) = (self.mode, self.target.clone(), temp_path.clone());
        let commit = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            file.sync_all()?;
            drop(file);
            std::fs::set_permissions(&temp_p, std::fs::Permissions::from_mode(mode))?;
            std::fs::rename(&temp_p, &target)?;
            // The rename itself must reach the disk before we say the file is there.
            std::fs::File::open(dir)?.sync_all()
        });
        if let Err(e) = commit.await.unwrap_or_else(|e| Err(std::io::Error::other(e))) {
            return reset(sh, Reason::IoError, format!("{}: {e}", self.target.display())).await;
        }
        temp.0 = None;
        tracing::info!(path = %self.target.display(), bytes = received, "remote access: file received");
        sh.link.send_json(FrameType::Eof, MAIN_STREAM, &FileSummary { size: received, sha256: got }).await;
        (Reason::Closed, "file written".into())
    }
}

pub(crate) struct Download {
    file: std::fs::File,
    path: PathBuf,
    pub(crate) size: u64,
}

impl Download {
    pub(crate) fn check(cfg: &RemoteConfig, f: &FileParams) -> Result<Download, Control> {
        let path = resolve(cfg, &f.path, true)?;
        let file = std::fs::File::open(&path).map_err(|e| refusal(Reason::NotFound, format!("{}: {e}", f.path)))?;
        let meta = file.metadata().map_err(|e| refusal(Reason::IoError, format!("{}: {e}", f.path)))?;
        if !meta.is_file() {
            return Err(refusal(Reason::NotFound, format!("{} is not a regular file", f.path)));
        }
        if meta.len() > cfg.max_file_size {
            return Err(refusal(
                Reason::TooLarge,
                format!(
                    "{} bytes; this device sends at most {} ([remote] max_file_size)",
                    meta.len(),
                    cfg.max_file_size
                ),
            ));
        }
        Ok(Download { file, path, size: meta.len() })
    }

    pub(crate) async fn run(self, sh: &Shared, mut rx: mpsc::UnboundedReceiver<StreamIn>) -> End {
        let mut file = self.file;
        let mut flow = StreamFlow::new();
        let mut hash = Sha256::new();
        let mut sent = 0u64;
        let mut buf = vec![0u8; MAX_FRAME_DATA];
        loop {
            // Grants that arrived meanwhile; wait for one when the window is spent.
            loop {
                let m = if flow.sendable() == 0 {
                    match rx.recv().await {
                        Some(m) => m,
                        None => return (Reason::Closed, "download cancelled".into()),
                    }
                } else {
                    match rx.try_recv() {
                        Ok(m) => m,
                        Err(_) => break,
                    }
                };
                if let Err(e) = flow.on_credit(MAIN_STREAM, m.credit) {
                    return reset(sh, Reason::ProtocolError, e.to_string()).await;
                }
                if m.kind == FrameType::Reset {
                    return (Reason::Closed, "download cancelled by the server".into());
                }
            }
            let n = match file.read(&mut buf[..flow.sendable()]) {
                Ok(n) => n,
                Err(e) => return reset(sh, Reason::IoError, format!("{}: {e}", self.path.display())).await,
            };
            if n == 0 {
                break;
            }
            hash.update(&buf[..n]);
            flow.on_sent(n);
            sent += n as u64;
            sh.link.send_data(MAIN_STREAM, 0, &buf[..n]).await;
        }
        let summary = FileSummary { size: sent, sha256: hex::encode(hash.finalize()) };
        tracing::info!(path = %self.path.display(), bytes = sent, "remote access: file sent");
        sh.link.send_json(FrameType::Eof, MAIN_STREAM, &summary).await;
        // The server closes the session once it has checked the hash.
        while let Some(m) = rx.recv().await {
            if m.kind == FrameType::Reset {
                break;
            }
        }
        (Reason::Closed, "file sent".into())
    }
}
