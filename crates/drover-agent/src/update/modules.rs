//! Update modules: what installs a payload, and undoes it.
//!
//! The engine calls a module in this order (`docs/update-modules.md`): `download` (the
//! artifact is verified; stage what can be staged without changing the device),
//! `supports_rollback`, then past the point of no return `install`, `needs_reboot`, after the
//! reboot (if any) and once connected `verify`, then `commit` — or `rollback` — then
//! `failure` (after a failed update that changed the device) and always `cleanup`.
//!
//! Built in: [`FileModule`] (`file`), [`AppModule`] (`app`), [`ScriptModule`] (`script`).
//! Anything else is an [`ExternalModule`]: an executable `<modules_dir>/<payload_type>`.
//!
//! **Invariant:** every method is idempotent and safe to call again after a power cut at any
//! instant — in particular `rollback` after an `install` that was cut anywhere, or never
//! started. Built-in modules write what rollback needs to the work directory *before* they
//! change anything.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use drover_artifact::manifest::{Manifest, PayloadInfo, PayloadRole};
use drover_artifact::stream::Header;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::machine::Installed;
use super::persist::UpdateLog;
use super::proc;
use crate::config::UpdateConfig;
use crate::store::write_atomic;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ModuleError(pub String);

fn err(msg: impl Into<String>) -> ModuleError {
    ModuleError(msg.into())
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> ModuleError + '_ {
    move |e| err(format!("{}: {e}", path.display()))
}

type R<T = ()> = Result<T, ModuleError>;

/// Everything a module call sees.
pub struct Ctx<'a> {
    pub deployment: &'a str,
    pub artifact_id: &'a str,
    /// The module's work directory (`data_dir/update/work`), made empty before `download`.
    pub workdir: &'a Path,
    /// The downloaded, verified artifact file.
    pub artifact: &'a Path,
    /// Its header: `None` only if the file is gone (then only rollback-type calls work).
    pub header: Option<&'a Header>,
    pub cfg: &'a UpdateConfig,
    pub installed: &'a Installed,
    pub log: &'a UpdateLog,
}

impl Ctx<'_> {
    pub fn manifest(&self) -> R<&Manifest> {
        self.header.map(|h| &h.manifest).ok_or_else(|| err("the downloaded artifact is gone"))
    }

    pub fn arg(&self, key: &str) -> Option<&str> {
        self.header.and_then(|h| h.manifest.module_args.get(key)).map(String::as_str)
    }

    /// The install payloads, with their index in the file.
    fn install_payloads(&self) -> R<Vec<(usize, &PayloadInfo)>> {
        Ok(self.manifest()?.payloads.iter().enumerate().filter(|(_, p)| p.role == PayloadRole::Install).collect())
    }

    /// The one install payload of a module that takes exactly one.
    fn only_payload(&self, module: &str) -> R<(usize, &PayloadInfo)> {
        let mut p = self.install_payloads()?;
        if p.len() != 1 {
            return Err(err(format!(
                "the {module} module takes exactly one install payload; the artifact has {}",
                p.len()
            )));
        }
        Ok(p.remove(0))
    }

    /// Reads payload `index` from the artifact file, checking its SHA-256 at the end.
    pub fn open_payload(&self, index: usize) -> R<PayloadRead> {
        let h = self.header.ok_or_else(|| err("the downloaded artifact is gone"))?;
        let info = h.manifest.payloads.get(index).ok_or_else(|| err(format!("no payload {index}")))?;
        let offset = h.payload_offset(index).unwrap_or(0);
        let mut f = File::open(self.artifact).map_err(io_at(self.artifact))?;
        f.seek(SeekFrom::Start(offset)).map_err(io_at(self.artifact))?;
        Ok(PayloadRead {
            inner: f.take(info.size),
            hash: Some(Sha256::new()),
            expected: info.sha256.clone(),
            name: info.name.clone(),
        })
    }

    /// The environment of scripts and external modules.
    pub fn env(&self) -> Vec<(String, String)> {
        let mut env = vec![
            ("DROVER_DEPLOYMENT".to_string(), self.deployment.to_string()),
            ("DROVER_ARTIFACT_ID".to_string(), self.artifact_id.to_string()),
            ("DROVER_DEVICE_TYPE".to_string(), self.cfg.device_type.clone()),
            ("DROVER_WORKDIR".to_string(), self.workdir.display().to_string()),
        ];
        if let Some(m) = self.header.map(|h| &h.manifest) {
            env.push(("DROVER_ARTIFACT_NAME".into(), m.name.clone()));
            env.push(("DROVER_ARTIFACT_VERSION".into(), m.version.clone()));
            env.push(("DROVER_PAYLOAD_TYPE".into(), m.payload_type.clone()));
        }
        if let Some(s) = &self.installed.software {
            env.push(("DROVER_CURRENT_NAME".into(), s.name.clone()));
            env.push(("DROVER_CURRENT_VERSION".into(), s.version.clone()));
        }
        env
    }
}

/// A payload's bytes; the read that reaches its end fails with `InvalidData` when the digest
/// differs from the manifest's.
pub struct PayloadRead {
    inner: io::Take<File>,
    hash: Option<Sha256>,
    expected: String,
    name: String,
}

impl Read for PayloadRead {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Some(h) = self.hash.as_mut() {
            h.update(&buf[..n]);
        }
        if (n == 0 || self.inner.limit() == 0)
            && let Some(h) = self.hash.take()
        {
            if self.inner.limit() > 0 {
                let msg = format!("payload {:?} is truncated", self.name);
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, msg));
            }
            if hex::encode(h.finalize()) != self.expected {
                let msg = format!("payload {:?} does not match its SHA-256: the downloaded file changed", self.name);
                return Err(io::Error::new(io::ErrorKind::InvalidData, msg));
            }
        }
        Ok(n)
    }
}

/// An update module; see the module documentation.
pub trait UpdateModule: Send + Sync {
    fn name(&self) -> &str;
    /// Stage the payloads without changing what the device runs.
    fn download(&self, cx: &Ctx) -> R;
    fn supports_rollback(&self, cx: &Ctx) -> R<bool>;
    fn install(&self, cx: &Ctx) -> R;
    fn needs_reboot(&self, cx: &Ctx) -> R<bool>;
    fn verify(&self, _cx: &Ctx) -> R {
        Ok(())
    }
    fn commit(&self, cx: &Ctx) -> R;
    fn rollback(&self, cx: &Ctx) -> R;
    fn failure(&self, _cx: &Ctx) -> R {
        Ok(())
    }
    fn cleanup(&self, cx: &Ctx) -> R;
}

/// The module for `payload_type`: a built-in one, or `<modules_dir>/<payload_type>`.
pub fn for_type(payload_type: &str, cfg: &UpdateConfig) -> R<Box<dyn UpdateModule>> {
    match payload_type {
        "file" => Ok(Box::new(FileModule)),
        "app" => Ok(Box::new(AppModule)),
        "script" => Ok(Box::new(ScriptModule)),
        other => {
            if !drover_artifact::manifest::is_module_name(other) {
                return Err(err(format!("payload type {other:?} is not a module name")));
            }
            let path = cfg.modules_dir.join(other);
            match std::fs::metadata(&path) {
                Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => {
                    Ok(Box::new(ExternalModule { name: other.to_string(), path }))
                }
                Ok(_) => Err(err(format!("update module {} is not an executable file", path.display()))),
                Err(_) => Err(err(format!(
                    "no update module for payload type {other:?}: it is not built in (file, app, script) and {} does not exist",
                    path.display()
                ))),
            }
        }
    }
}

fn sync_dir(dir: &Path) -> R {
    File::open(dir).and_then(|f| f.sync_all()).map_err(io_at(dir))
}

fn remove_file_if_exists(path: &Path) -> R {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_at(path)(e)),
    }
}

fn remove_dir_if_exists(path: &Path) -> R {
    match std::fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_at(path)(e)),
    }
}

/// Copies `r` into a new file `path` with `mode`, fsynced.
fn write_new(path: &Path, r: &mut impl Read, mode: u32) -> R<u64> {
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(path).map_err(io_at(path))?;
    f.set_permissions(std::fs::Permissions::from_mode(mode)).map_err(io_at(path))?;
    let n = match io::copy(r, &mut f) {
        Ok(n) => n,
        Err(e) => {
            drop(f);
            let _ = std::fs::remove_file(path);
            return Err(err(format!("writing {}: {e}", path.display())));
        }
    };
    f.flush().and_then(|()| f.sync_all()).map_err(io_at(path))?;
    Ok(n)
}

fn read_state<T: for<'de> Deserialize<'de>>(path: &Path) -> R<Option<T>> {
    match std::fs::read(path) {
        Ok(b) => serde_json::from_slice(&b).map(Some).map_err(|e| err(format!("{}: {e}", path.display()))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_at(path)(e)),
    }
}

fn write_state<T: Serialize>(workdir: &Path, name: &str, v: &T) -> R {
    let dir = workdir.join("state");
    std::fs::create_dir_all(&dir).map_err(io_at(&dir))?;
    let path = dir.join(name);
    let bytes = serde_json::to_vec(v).map_err(|e| err(e.to_string()))?;
    write_atomic(&path, &bytes, 0o600).map_err(|e| err(e.to_string()))
}

// ---------------------------------------------------------------------------------------
// file

/// `file`: replaces one file atomically. `module_args`: `path` (absolute, under a `file_allow`
/// prefix), optional `mode` (octal; default: the replaced file's, or 0644). The replaced file
/// is kept as `<path>.drover-prev` until the commit, for rollback.
pub struct FileModule;

#[derive(Debug, Serialize, Deserialize)]
struct FileState {
    path: PathBuf,
    existed: bool,
}

const PREV_SUFFIX: &str = ".drover-prev";

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_os_string();
    s.push(suffix);
    PathBuf::from(s)
}

/// Where the new file is staged: a hidden name in the same directory, so the final rename
/// stays on one file system.
fn staged_file(target: &Path) -> PathBuf {
    let name = target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    target.with_file_name(format!(".{name}.drover-new"))
}

fn parse_mode(s: &str) -> R<u32> {
    let digits = s.trim().trim_start_matches("0o");
    match u32::from_str_radix(digits, 8) {
        Ok(m) if m <= 0o777 && !digits.is_empty() => Ok(m),
        _ => Err(err(format!("module_args mode {s:?} must be octal permission bits such as 0644"))),
    }
}

impl FileModule {
    /// The target path, checked against `file_allow` after resolving symlinks in its folder.
    fn target(cx: &Ctx) -> R<PathBuf> {
        let raw = cx.arg("path").ok_or_else(|| err("the file module needs module_args path"))?;
        let path = Path::new(raw);
        if !path.is_absolute() || path.components().any(|c| matches!(c, Component::ParentDir | Component::CurDir)) {
            return Err(err(format!("module_args path {raw:?} must be an absolute path without . or ..")));
        }
        let rooted;
        let path = match &cx.cfg.file_root {
            Some(root) => {
                rooted = root.join(path.strip_prefix("/").unwrap_or(path));
                rooted.as_path()
            }
            None => path,
        };
        let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
            return Err(err(format!("module_args path {raw:?} names no file")));
        };
        let name_s = name.to_string_lossy();
        if name_s.ends_with(PREV_SUFFIX) || name_s.ends_with(".drover-new") {
            return Err(err(format!("module_args path {raw:?}: that name is the file module's own")));
        }
        if cx.cfg.file_root.is_some() {
            // A simulated device starts empty: its folders come with the first file.
            let _ = std::fs::create_dir_all(parent);
        }
        let real_parent =
            std::fs::canonicalize(parent).map_err(|e| err(format!("the folder of {raw:?} is not usable: {e}")))?;
        let target = real_parent.join(name);
        let allowed = cx.cfg.file_allow.iter().any(|prefix| {
            let prefix = std::fs::canonicalize(prefix).unwrap_or_else(|_| prefix.clone());
            target.starts_with(&prefix)
        });
        if !allowed {
            return Err(err(format!(
                "module_args path {raw:?} is not under a file_allow prefix of this device ({})",
                if cx.cfg.file_allow.is_empty() {
                    "none configured".to_string()
                } else {
                    cx.cfg.file_allow.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
                }
            )));
        }
        if std::fs::symlink_metadata(&target).is_ok_and(|m| m.is_dir()) {
            return Err(err(format!("module_args path {raw:?} is a directory")));
        }
        Ok(target)
    }
}

impl UpdateModule for FileModule {
    fn name(&self) -> &str {
        "file"
    }

    fn download(&self, cx: &Ctx) -> R {
        let target = Self::target(cx)?;
        let mode = match cx.arg("mode") {
            Some(m) => parse_mode(m)?,
            None => std::fs::metadata(&target).map(|m| m.permissions().mode() & 0o777).unwrap_or(0o644),
        };
        let (index, _) = cx.only_payload("file")?;
        let staged = staged_file(&target);
        let n = write_new(&staged, &mut cx.open_payload(index)?, mode)?;
        cx.log.line(&format!("file: staged {n} bytes for {} (mode {mode:o})", target.display()));
        Ok(())
    }

    fn supports_rollback(&self, _cx: &Ctx) -> R<bool> {
        Ok(true)
    }

    fn install(&self, cx: &Ctx) -> R {
        let target = Self::target(cx)?;
        let staged = staged_file(&target);
        if !staged.exists() {
            return Err(err(format!("the staged file {} is missing", staged.display())));
        }
        let prev = with_suffix(&target, PREV_SUFFIX);
        let dir = target.parent().unwrap_or(Path::new("/"));
        remove_file_if_exists(&prev)?;
        let existed = std::fs::symlink_metadata(&target).is_ok();
        // Rollback reads this; the old file is untouched until .drover-prev holds it.
        write_state(cx.workdir, "file.json", &FileState { path: target.clone(), existed })?;
        if existed {
            let tmp = with_suffix(&target, ".drover-prev-tmp");
            remove_file_if_exists(&tmp)?;
            if std::fs::hard_link(&target, &tmp).is_err() {
                std::fs::copy(&target, &tmp).map_err(io_at(&tmp))?;
                File::open(&tmp).and_then(|f| f.sync_all()).map_err(io_at(&tmp))?;
            }
            std::fs::rename(&tmp, &prev).map_err(io_at(&prev))?;
            sync_dir(dir)?;
        }
        std::fs::rename(&staged, &target).map_err(io_at(&target))?;
        sync_dir(dir)?;
        cx.log.line(&format!("file: replaced {}", target.display()));
        Ok(())
    }

    fn needs_reboot(&self, _cx: &Ctx) -> R<bool> {
        Ok(false)
    }

    fn commit(&self, cx: &Ctx) -> R {
        let Some(st) = read_state::<FileState>(&cx.workdir.join("state/file.json"))? else { return Ok(()) };
        remove_file_if_exists(&with_suffix(&st.path, PREV_SUFFIX))?;
        remove_file_if_exists(&staged_file(&st.path))
    }

    fn rollback(&self, cx: &Ctx) -> R {
        let Some(st) = read_state::<FileState>(&cx.workdir.join("state/file.json"))? else {
            // The install never started: only the staged file may be there.
            if let Ok(target) = Self::target(cx) {
                remove_file_if_exists(&staged_file(&target))?;
            }
            return Ok(());
        };
        let dir = st.path.parent().unwrap_or(Path::new("/")).to_path_buf();
        let prev = with_suffix(&st.path, PREV_SUFFIX);
        if st.existed {
            // No .drover-prev: the install stopped before touching the file, or this rollback
            // already put it back.
            if prev.exists() {
                std::fs::rename(&prev, &st.path).map_err(io_at(&st.path))?;
                cx.log.line(&format!("file: restored the previous {}", st.path.display()));
            }
        } else {
            remove_file_if_exists(&st.path)?;
            cx.log.line(&format!("file: removed {} (it did not exist before)", st.path.display()));
        }
        remove_file_if_exists(&staged_file(&st.path))?;
        sync_dir(&dir)
    }

    fn cleanup(&self, cx: &Ctx) -> R {
        if let Some(st) = read_state::<FileState>(&cx.workdir.join("state/file.json"))? {
            return remove_file_if_exists(&staged_file(&st.path));
        }
        if let Ok(target) = Self::target(cx) {
            remove_file_if_exists(&staged_file(&target))?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// app

/// `app`: a directory tree per version. `module_args`: `name`. The payload (a tar made by
/// `drover-artifact`'s `tree::pack_dir`) is unpacked safely into
/// `<apps_dir>/<name>/versions/<version>/`, then `<apps_dir>/<name>/current` is switched to it
/// atomically. The previous version is kept for rollback; older ones go at the commit.
pub struct AppModule;

#[derive(Debug, Serialize, Deserialize)]
struct AppState {
    name: String,
    version: String,
    /// `current`'s target before the install (`versions/1.0`), if there was one.
    prev: Option<String>,
}

const STAGED_PREFIX: &str = ".drover-staged-";

fn safe_name(kind: &str, s: &str) -> R {
    let ok = !s.is_empty()
        && s.len() <= 128
        && s != "."
        && s != ".."
        && !s.starts_with('.')
        && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '+' | '~'));
    if ok {
        Ok(())
    } else {
        Err(err(format!("app {kind} {s:?} must be a plain name (letters, digits, . _ - + ~; not starting with .)")))
    }
}

impl AppModule {
    fn names(cx: &Ctx) -> R<(String, String)> {
        let name = cx.arg("name").ok_or_else(|| err("the app module needs module_args name"))?.to_string();
        safe_name("name", &name)?;
        let version = cx.manifest()?.version.clone();
        safe_name("version", &version)?;
        Ok((name, version))
    }

    fn app_dir(cx: &Ctx, name: &str) -> PathBuf {
        cx.cfg.apps_dir.join(name)
    }

    fn current_target(app: &Path) -> Option<String> {
        std::fs::read_link(app.join("current")).ok().map(|t| t.to_string_lossy().into_owned())
    }

    /// Points `<app>/current` at `target` atomically: a new link under a temporary name,
    /// renamed over the old one.
    fn switch(app: &Path, target: &str) -> R {
        let tmp = app.join(".current.drover-tmp");
        remove_file_if_exists(&tmp)?;
        std::os::unix::fs::symlink(target, &tmp).map_err(io_at(&tmp))?;
        std::fs::rename(&tmp, app.join("current")).map_err(io_at(app))?;
        sync_dir(app)
    }
}

impl UpdateModule for AppModule {
    fn name(&self) -> &str {
        "app"
    }

    fn download(&self, cx: &Ctx) -> R {
        let (name, version) = Self::names(cx)?;
        let app = Self::app_dir(cx, &name);
        if Self::current_target(&app).as_deref() == Some(&format!("versions/{version}")) {
            return Err(err(format!(
                "version {version} of app {name} is already the current one; give the new artifact a new version"
            )));
        }
        let versions = app.join("versions");
        std::fs::create_dir_all(&versions).map_err(io_at(&versions))?;
        let staged = versions.join(format!("{STAGED_PREFIX}{version}"));
        remove_dir_if_exists(&staged)?;
        let (index, _) = cx.only_payload("app")?;
        let reader = cx.open_payload(index)?;
        if let Err(e) = drover_artifact::tree::unpack_safe(reader, &staged) {
            // Nothing of a refused payload stays on the device.
            let _ = std::fs::remove_dir_all(&staged);
            return Err(err(format!("the app payload was refused: {e}")));
        }
        sync_dir(&versions)?;
        cx.log.line(&format!("app: unpacked {name} {version} into {}", staged.display()));
        Ok(())
    }

    fn supports_rollback(&self, _cx: &Ctx) -> R<bool> {
        Ok(true)
    }

    fn install(&self, cx: &Ctx) -> R {
        let (name, version) = Self::names(cx)?;
        let app = Self::app_dir(cx, &name);
        let versions = app.join("versions");
        let staged = versions.join(format!("{STAGED_PREFIX}{version}"));
        let dest = versions.join(&version);
        let prev = Self::current_target(&app);
        let target = format!("versions/{version}");
        if prev.as_deref() == Some(target.as_str()) {
            // Only after a rollback that stopped halfway would this hold; nothing to do twice.
            return Err(err(format!("version {version} of app {name} is already current")));
        }
        if !staged.is_dir() {
            return Err(err(format!("the staged tree {} is missing", staged.display())));
        }
        write_state(
            cx.workdir,
            "app.json",
            &AppState { name: name.clone(), version: version.clone(), prev: prev.clone() },
        )?;
        // A leftover of an earlier attempt that was rolled back.
        remove_dir_if_exists(&dest)?;
        std::fs::rename(&staged, &dest).map_err(io_at(&dest))?;
        sync_dir(&versions)?;
        Self::switch(&app, &target)?;
        cx.log.line(&format!("app: {name} current -> {target} (was {})", prev.as_deref().unwrap_or("none")));
        Ok(())
    }

    fn needs_reboot(&self, _cx: &Ctx) -> R<bool> {
        Ok(false)
    }

    fn commit(&self, cx: &Ctx) -> R {
        let Some(st) = read_state::<AppState>(&cx.workdir.join("state/app.json"))? else { return Ok(()) };
        let app = Self::app_dir(cx, &st.name);
        let mut keep = vec![st.version.clone()];
        if let Some(p) = st.prev.as_deref().and_then(|p| p.strip_prefix("versions/")) {
            keep.push(p.to_string());
        }
        let versions = app.join("versions");
        for e in std::fs::read_dir(&versions).map_err(io_at(&versions))?.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if !keep.contains(&n) {
                remove_dir_if_exists(&e.path())?;
                cx.log.line(&format!("app: removed old version {n} of {}", st.name));
            }
        }
        Ok(())
    }

    fn rollback(&self, cx: &Ctx) -> R {
        let Some(st) = read_state::<AppState>(&cx.workdir.join("state/app.json"))? else {
            return self.cleanup(cx);
        };
        let app = Self::app_dir(cx, &st.name);
        let ours = format!("versions/{}", st.version);
        match &st.prev {
            Some(prev) => Self::switch(&app, prev)?,
            None => {
                if Self::current_target(&app).as_deref() == Some(ours.as_str()) {
                    remove_file_if_exists(&app.join("current"))?;
                    sync_dir(&app)?;
                }
            }
        }
        if st.prev.as_deref() != Some(ours.as_str()) {
            remove_dir_if_exists(&app.join(&ours))?;
        }
        remove_dir_if_exists(&app.join("versions").join(format!("{STAGED_PREFIX}{}", st.version)))?;
        cx.log.line(&format!("app: {} current -> {}", st.name, st.prev.as_deref().unwrap_or("none (removed)")));
        Ok(())
    }

    fn cleanup(&self, cx: &Ctx) -> R {
        let (name, version) = match read_state::<AppState>(&cx.workdir.join("state/app.json"))? {
            Some(st) => (st.name, st.version),
            None => match Self::names(cx) {
                Ok(nv) => nv,
                Err(_) => return Ok(()),
            },
        };
        remove_dir_if_exists(&Self::app_dir(cx, &name).join("versions").join(format!("{STAGED_PREFIX}{version}")))
    }
}

// ---------------------------------------------------------------------------------------
// script

/// `script`: the one payload is an executable, run once at install with the work directory
/// as its current directory and the `DROVER_*` environment (plus `DROVER_ARG_<KEY>` for each
/// of `module_args`). Exit 0 is success. It cannot be rolled back.
pub struct ScriptModule;

impl ScriptModule {
    fn path(cx: &Ctx) -> R<PathBuf> {
        let (_, info) = cx.only_payload("script")?;
        Ok(cx.workdir.join("files").join(&info.name))
    }
}

/// `DROVER_ARG_<KEY>`: the key upper-cased, anything but letters and digits as `_`.
pub fn arg_env(args: &BTreeMap<String, String>) -> Vec<(String, String)> {
    args.iter()
        .map(|(k, v)| {
            let key: String =
                k.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_uppercase() } else { '_' }).collect();
            (format!("DROVER_ARG_{key}"), v.clone())
        })
        .collect()
}

impl UpdateModule for ScriptModule {
    fn name(&self) -> &str {
        "script"
    }

    fn download(&self, cx: &Ctx) -> R {
        let (index, _) = cx.only_payload("script")?;
        let path = Self::path(cx)?;
        std::fs::create_dir_all(path.parent().unwrap_or(cx.workdir)).map_err(io_at(cx.workdir))?;
        write_new(&path, &mut cx.open_payload(index)?, 0o755)?;
        Ok(())
    }

    fn supports_rollback(&self, _cx: &Ctx) -> R<bool> {
        Ok(false)
    }

    fn install(&self, cx: &Ctx) -> R {
        let path = Self::path(cx)?;
        let mut cmd = std::process::Command::new(&path);
        cmd.current_dir(cx.workdir).envs(cx.env()).env("DROVER_STATE", "ArtifactInstall");
        cmd.envs(arg_env(&cx.manifest()?.module_args));
        cx.log.line(&format!("script: running {}", path.display()));
        let out =
            proc::run(&mut cmd, cx.cfg.module_timeout).map_err(|e| err(format!("the script could not run: {e}")))?;
        cx.log.output("script output", &format!("{}{}", out.stdout, out.stderr));
        if !out.success() {
            let said = out.last_line().map(|l| format!(": {l}")).unwrap_or_default();
            return Err(err(format!("the script failed ({}){said}", out.describe(cx.cfg.module_timeout))));
        }
        Ok(())
    }

    fn needs_reboot(&self, _cx: &Ctx) -> R<bool> {
        Ok(false)
    }

    fn commit(&self, _cx: &Ctx) -> R {
        Ok(())
    }

    fn rollback(&self, _cx: &Ctx) -> R {
        Ok(())
    }

    fn cleanup(&self, _cx: &Ctx) -> R {
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// external

/// An executable `<modules_dir>/<payload_type>`, called as `<module> <State> <workdir>`; see
/// `docs/update-modules.md`.
pub struct ExternalModule {
    name: String,
    path: PathBuf,
}

impl ExternalModule {
    fn call(&self, cx: &Ctx, state: &str) -> R<String> {
        let mut cmd = std::process::Command::new(&self.path);
        cmd.arg(state).arg(cx.workdir).current_dir(cx.workdir).envs(cx.env()).env("DROVER_STATE", state);
        if let Some(h) = cx.header {
            cmd.envs(arg_env(&h.manifest.module_args));
        }
        let out = proc::run(&mut cmd, cx.cfg.module_timeout)
            .map_err(|e| err(format!("update module {} could not run: {e}", self.path.display())))?;
        cx.log.output(&format!("module {} {state}", self.name), &format!("{}{}", out.stdout, out.stderr));
        if !out.success() {
            let said = out.last_line().map(|l| format!(": {l}")).unwrap_or_default();
            return Err(err(format!(
                "update module {} {state} failed ({}){said}",
                self.name,
                out.describe(cx.cfg.module_timeout)
            )));
        }
        Ok(out.stdout)
    }

    /// A state answered with `Yes` or `No` on stdout (nothing: `No`).
    fn query(&self, cx: &Ctx, state: &str) -> R<bool> {
        let out = self.call(cx, state)?;
        match out.trim() {
            "Yes" => Ok(true),
            "No" | "" => Ok(false),
            other => Err(err(format!("update module {} {state} printed {other:?}; expected Yes or No", self.name))),
        }
    }
}

impl UpdateModule for ExternalModule {
    fn name(&self) -> &str {
        &self.name
    }

    fn download(&self, cx: &Ctx) -> R {
        let h = cx.header.ok_or_else(|| err("the downloaded artifact is gone"))?;
        let m = &h.manifest;
        let w = cx.workdir;
        for d in ["files", "header", "tmp"] {
            let p = w.join(d);
            remove_dir_if_exists(&p)?;
            std::fs::create_dir_all(&p).map_err(io_at(&p))?;
        }
        let put = |rel: &str, bytes: &[u8]| std::fs::write(w.join(rel), bytes).map_err(io_at(&w.join(rel)));
        put("version", b"1\n")?;
        put("current_device_type", format!("{}\n", cx.cfg.device_type).as_bytes())?;
        let current = serde_json::to_vec_pretty(cx.installed).unwrap_or_default();
        put("current_software.json", &current)?;
        put("header/manifest.json", &h.manifest_bytes)?;
        put("header/module_args.json", &serde_json::to_vec_pretty(&m.module_args).unwrap_or_default())?;
        put("header/artifact_name", format!("{}\n", m.name).as_bytes())?;
        put("header/artifact_version", format!("{}\n", m.version).as_bytes())?;
        put("header/payload_type", format!("{}\n", m.payload_type).as_bytes())?;
        for (index, info) in cx.install_payloads()? {
            let path = w.join("files").join(&info.name);
            write_new(&path, &mut cx.open_payload(index)?, 0o644)?;
        }
        self.call(cx, "Download").map(drop)
    }

    fn supports_rollback(&self, cx: &Ctx) -> R<bool> {
        self.query(cx, "SupportsRollback")
    }

    fn install(&self, cx: &Ctx) -> R {
        self.call(cx, "ArtifactInstall").map(drop)
    }

    fn needs_reboot(&self, cx: &Ctx) -> R<bool> {
        self.query(cx, "NeedsArtifactReboot")
    }

    fn verify(&self, cx: &Ctx) -> R {
        self.call(cx, "ArtifactVerify").map(drop)
    }

    fn commit(&self, cx: &Ctx) -> R {
        self.call(cx, "ArtifactCommit").map(drop)
    }

    fn rollback(&self, cx: &Ctx) -> R {
        self.call(cx, "ArtifactRollback").map(drop)
    }

    fn failure(&self, cx: &Ctx) -> R {
        self.call(cx, "ArtifactFailure").map(drop)
    }

    fn cleanup(&self, cx: &Ctx) -> R {
        if !cx.workdir.is_dir() {
            return Ok(());
        }
        self.call(cx, "Cleanup").map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::update::testutil::{artifact, script, tar, temp};
    use drover_artifact::keys::SigningKey;

    struct Fx {
        dir: PathBuf,
        cfg: UpdateConfig,
        key: SigningKey,
        log: UpdateLog,
        installed: Installed,
    }

    impl Fx {
        fn new(name: &str) -> Fx {
            let dir = temp(name);
            let mut cfg = UpdateConfig::new("rpi4");
            cfg.file_allow = vec![dir.join("etc")];
            cfg.apps_dir = dir.join("apps");
            cfg.modules_dir = dir.join("modules");
            std::fs::create_dir_all(dir.join("etc")).unwrap();
            std::fs::create_dir_all(dir.join("work")).unwrap();
            std::fs::create_dir_all(dir.join("modules")).unwrap();
            Fx {
                dir,
                cfg,
                key: SigningKey::generate().unwrap(),
                log: UpdateLog::none(),
                installed: Installed::default(),
            }
        }

        /// Builds an artifact of `payload_type` and runs `f` with its context.
        fn with<T>(
            &self,
            payload_type: &str,
            version: &str,
            args: &[(&str, &str)],
            payloads: &[(&str, &[u8])],
            f: impl FnOnce(&Ctx) -> T,
        ) -> T {
            let mut m = Manifest::new("thing", version, vec!["rpi4".into()], payload_type);
            for (k, v) in args {
                m.module_args.insert(k.to_string(), v.to_string());
            }
            let adir = self.dir.join(format!("artifact-{version}"));
            std::fs::create_dir_all(&adir).unwrap();
            let (path, header) = artifact(&adir, m, payloads, &self.key);
            let work = self.dir.join("work");
            let cx = Ctx {
                deployment: "dep-1",
                artifact_id: "0123",
                workdir: &work,
                artifact: &path,
                header: Some(&header),
                cfg: &self.cfg,
                installed: &self.installed,
                log: &self.log,
            };
            f(&cx)
        }

        /// A fresh work directory, as the engine makes one per deployment.
        fn new_deployment(&self) {
            let _ = std::fs::remove_dir_all(self.dir.join("work"));
            std::fs::create_dir_all(self.dir.join("work")).unwrap();
        }
    }

    impl Drop for Fx {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn read(p: &Path) -> String {
        std::fs::read_to_string(p).unwrap_or_else(|e| format!("<{e}>"))
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .map(|r| r.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        v.sort();
        v
    }

    #[test]
    fn file_replaces_atomically_and_rolls_back() {
        let fx = Fx::new("file");
        let target = fx.dir.join("etc/app.conf");
        std::fs::write(&target, "old\n").unwrap();
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o600)).unwrap();
        let path = target.display().to_string();
        let m = FileModule;
        fx.with("file", "2", &[("path", &path)], &[("app.conf", b"new\n")], |cx| {
            m.download(cx).unwrap();
            // Staging changes nothing the device uses.
            assert_eq!(read(&target), "old\n");
            assert_eq!(names(&fx.dir.join("etc")), [".app.conf.drover-new", "app.conf"]);
            assert!(m.supports_rollback(cx).unwrap());
            m.install(cx).unwrap();
            assert_eq!(read(&target), "new\n");
            assert_eq!(std::fs::metadata(&target).unwrap().permissions().mode() & 0o777, 0o600, "mode kept");
            assert_eq!(read(&fx.dir.join("etc/app.conf.drover-prev")), "old\n");
            assert!(!m.needs_reboot(cx).unwrap());
            m.rollback(cx).unwrap();
            assert_eq!(read(&target), "old\n");
            assert_eq!(names(&fx.dir.join("etc")), ["app.conf"]);
            // Again (a power cut during the rollback): still the old file.
            m.rollback(cx).unwrap();
            assert_eq!(read(&target), "old\n");
        });
        fx.new_deployment();
        fx.with("file", "3", &[("path", &path), ("mode", "0640")], &[("app.conf", b"v3\n")], |cx| {
            m.download(cx).unwrap();
            m.install(cx).unwrap();
            m.commit(cx).unwrap();
            m.cleanup(cx).unwrap();
            assert_eq!(read(&target), "v3\n");
            assert_eq!(std::fs::metadata(&target).unwrap().permissions().mode() & 0o777, 0o640);
            assert_eq!(names(&fx.dir.join("etc")), ["app.conf"], "commit drops .drover-prev");
        });
        // A file that did not exist: rollback removes it.
        fx.new_deployment();
        let fresh = fx.dir.join("etc/new.conf").display().to_string();
        fx.with("file", "4", &[("path", &fresh)], &[("new.conf", b"x")], |cx| {
            m.download(cx).unwrap();
            m.install(cx).unwrap();
            assert_eq!(read(Path::new(&fresh)), "x");
            m.rollback(cx).unwrap();
            assert!(!Path::new(&fresh).exists());
        });
    }

    /// A power cut inside the install, at each point: rollback always gives the old file.
    #[test]
    fn file_rollback_after_a_cut_anywhere_in_the_install() {
        let fx = Fx::new("file-cut");
        let target = fx.dir.join("etc/app.conf");
        let path = target.display().to_string();
        let m = FileModule;
        for cut in 0..3 {
            fx.new_deployment();
            std::fs::write(&target, "old").unwrap();
            fx.with("file", "2", &[("path", &path)], &[("app.conf", b"new")], |cx| {
                m.download(cx).unwrap();
                let prev = fx.dir.join("etc/app.conf.drover-prev");
                // The install's own steps, stopped after `cut` of them.
                if cut >= 1 {
                    write_state(cx.workdir, "file.json", &FileState { path: target.clone(), existed: true }).unwrap();
                }
                if cut >= 2 {
                    std::fs::hard_link(&target, &prev).unwrap();
                }
                m.rollback(cx).unwrap();
                assert_eq!(read(&target), "old", "cut after {cut} steps");
                assert!(!fx.dir.join("etc/.app.conf.drover-new").exists());
            });
        }
    }

    /// Bad input: paths outside `file_allow`, through a symlink, relative, with `..`, and a
    /// bad mode. Nothing is written.
    #[test]
    fn file_refuses_paths_outside_file_allow() {
        let fx = Fx::new("file-allow");
        std::fs::create_dir_all(fx.dir.join("secret")).unwrap();
        std::os::unix::fs::symlink(fx.dir.join("secret"), fx.dir.join("etc/link")).unwrap();
        let m = FileModule;
        let cases = [
            (fx.dir.join("secret/x").display().to_string(), "file_allow"),
            (fx.dir.join("etc/link/x").display().to_string(), "file_allow"),
            (format!("{}/etc/../secret/x", fx.dir.display()), "without . or .."),
            ("etc/x".to_string(), "absolute"),
            (fx.dir.join("etc/missing/x").display().to_string(), "not usable"),
        ];
        for (path, want) in cases {
            fx.with("file", "2", &[("path", &path)], &[("x", b"evil")], |cx| {
                let e = m.download(cx).unwrap_err().to_string();
                assert!(e.contains(want), "{path}: {e}");
            });
        }
        fx.with(
            "file",
            "2",
            &[("path", &fx.dir.join("etc/x").display().to_string()), ("mode", "4755")],
            &[("x", b"x")],
            |cx| {
                assert!(m.download(cx).unwrap_err().to_string().contains("mode"));
            },
        );
        fx.with("file", "2", &[], &[("x", b"x")], |cx| {
            assert!(m.download(cx).unwrap_err().to_string().contains("module_args path"));
        });
        assert_eq!(names(&fx.dir.join("secret")), Vec::<String>::new());
        assert_eq!(names(&fx.dir.join("etc")), ["link"]);
    }

    /// The simulator's `file_root`: the artifact's absolute path lands under the device's folder.
    #[test]
    fn file_root_puts_paths_under_a_folder() {
        let mut fx = Fx::new("file-root");
        let root = fx.dir.join("device-7");
        fx.cfg.file_root = Some(root.clone());
        fx.cfg.file_allow = vec![root.clone()];
        let m = FileModule;
        fx.with("file", "1", &[("path", "/etc/app/app.conf")], &[("app.conf", b"sim")], |cx| {
            m.download(cx).unwrap();
            m.install(cx).unwrap();
        });
        assert_eq!(read(&root.join("etc/app/app.conf")), "sim");
        fx.with("file", "2", &[("path", "/etc/../../escape")], &[("x", b"x")], |cx| {
            assert!(m.download(cx).is_err());
        });
    }

    fn app_tar(version: &str) -> Vec<u8> {
        tar(&[("bin", None), ("bin/run", Some(format!("v{version}").as_bytes()))], &[("run", "bin/run")])
    }

    #[test]
    fn app_swaps_current_rolls_back_and_commit_keeps_two() {
        let fx = Fx::new("app");
        let m = AppModule;
        let app = fx.dir.join("apps/edge");
        let install = |v: &str, commit: bool| {
            fx.new_deployment();
            let t = app_tar(v);
            fx.with("app", v, &[("name", "edge")], &[("app.tar", &t)], |cx| {
                m.download(cx).unwrap();
                m.install(cx).unwrap();
                if commit {
                    m.commit(cx).unwrap();
                }
                m.cleanup(cx).unwrap();
            });
        };
        install("1", true);
        assert_eq!(std::fs::read_link(app.join("current")).unwrap(), Path::new("versions/1"));
        assert_eq!(read(&app.join("current/run")), "v1");
        install("2", true);
        install("3", true);
        assert_eq!(read(&app.join("current/bin/run")), "v3");
        assert_eq!(names(&app.join("versions")), ["2", "3"], "current and previous kept");
        // 4 installed, then rolled back: 3 again, 4 gone.
        fx.new_deployment();
        let t = app_tar("4");
        fx.with("app", "4", &[("name", "edge")], &[("app.tar", &t)], |cx| {
            m.download(cx).unwrap();
            assert_eq!(read(&app.join("current/run")), "v3", "staging changes nothing");
            m.install(cx).unwrap();
            assert_eq!(read(&app.join("current/run")), "v4");
            m.rollback(cx).unwrap();
            m.rollback(cx).unwrap();
            m.cleanup(cx).unwrap();
        });
        assert_eq!(read(&app.join("current/run")), "v3");
        assert_eq!(names(&app.join("versions")), ["2", "3"]);
        // The current version again: refused before anything changes.
        fx.new_deployment();
        let t = app_tar("3");
        fx.with("app", "3", &[("name", "edge")], &[("app.tar", &t)], |cx| {
            assert!(m.download(cx).unwrap_err().to_string().contains("already the current one"));
        });
        // A first install rolled back leaves no app at all.
        fx.new_deployment();
        let t = app_tar("1");
        fx.with("app", "1", &[("name", "other")], &[("app.tar", &t)], |cx| {
            m.download(cx).unwrap();
            m.install(cx).unwrap();
            m.rollback(cx).unwrap();
        });
        assert!(std::fs::symlink_metadata(fx.dir.join("apps/other/current")).is_err());
        assert_eq!(names(&fx.dir.join("apps/other/versions")), Vec::<String>::new());
    }

    /// Bad input: app payloads that climb out with `..`, use absolute paths, or escape through
    /// a symlink; a bad name. Each is refused at staging and the device is unchanged.
    #[test]
    fn app_refuses_escaping_payloads_and_leaves_nothing() {
        let fx = Fx::new("app-escape");
        let m = AppModule;
        let app = fx.dir.join("apps/edge");
        fx.with("app", "1", &[("name", "edge")], &[("app.tar", &app_tar("1"))], |cx| {
            m.download(cx).unwrap();
            m.install(cx).unwrap();
            m.commit(cx).unwrap();
        });
        let evil: Vec<(&str, Vec<u8>)> = vec![
            ("dot-dot", tar(&[("ok", Some(b"fine")), ("../../../escaped", Some(b"evil"))], &[])),
            ("absolute", tar(&[(&format!("{}/escaped", fx.dir.display()), Some(b"evil"))], &[])),
            ("symlink-out", tar(&[], &[("out", "../../../..")])),
            ("nested-link-out", tar(&[("d", None)], &[("d/up", "../../x")])),
            ("write-through", {
                let mut t = tar(&[], &[("l", "../..")]);
                t.truncate(t.len() - 1024);
                let more = tar(&[("l/escaped", Some(b"evil"))], &[]);
                t.extend_from_slice(&more);
                t
            }),
        ];
        for (what, payload) in &evil {
            fx.new_deployment();
            fx.with("app", "2", &[("name", "edge")], &[("app.tar", payload)], |cx| {
                let e = m.download(cx);
                let e = e.expect_err(what).to_string();
                assert!(e.contains("refused"), "{what}: {e}");
                m.cleanup(cx).unwrap();
            });
            assert_eq!(names(&app.join("versions")), ["1"], "{what}: nothing left behind");
            assert_eq!(read(&app.join("current/run")), "v1", "{what}");
            assert!(!fx.dir.join("escaped").exists() && !fx.dir.join("apps/escaped").exists(), "{what}");
        }
        for bad in ["../x", ".hidden", "a/b", ""] {
            fx.with("app", "2", &[("name", bad)], &[("app.tar", &app_tar("2"))], |cx| {
                assert!(m.download(cx).unwrap_err().to_string().contains("plain name"), "{bad}");
            });
        }
        fx.with("app", "../2", &[("name", "edge")], &[("app.tar", &app_tar("2"))], |cx| {
            assert!(m.download(cx).unwrap_err().to_string().contains("version"));
        });
    }

    #[test]
    fn script_runs_once_with_its_environment() {
        let fx = Fx::new("script");
        let m = ScriptModule;
        let out = fx.dir.join("out");
        let body = format!(
            "#!/bin/sh\necho \"$DROVER_ARTIFACT_NAME $DROVER_ARTIFACT_VERSION $DROVER_ARG_TARGET_HOST $(pwd)\" > {}\n",
            out.display()
        );
        fx.with("script", "5", &[("target-host", "h1")], &[("run.sh", body.as_bytes())], |cx| {
            m.download(cx).unwrap();
            assert!(!m.supports_rollback(cx).unwrap());
            m.install(cx).unwrap();
        });
        assert_eq!(read(&out), format!("thing 5 h1 {}\n", fx.dir.join("work").display()));
        // Bad input: a failing script.
        fx.with("script", "6", &[], &[("run.sh", b"#!/bin/sh\necho 'no space left' >&2\nexit 4\n")], |cx| {
            m.download(cx).unwrap();
            let e = m.install(cx).unwrap_err().to_string();
            assert!(e.contains("exit status 4") && e.contains("no space left"), "{e}");
        });
        fx.with("script", "7", &[], &[("a", b"x"), ("b", b"y")], |cx| {
            assert!(m.download(cx).unwrap_err().to_string().contains("exactly one"));
        });
    }

    /// An external module written in shell: the states it is called with, the work directory
    /// it sees, and its Yes/No answers.
    #[test]
    fn external_module_protocol() {
        let fx = Fx::new("external");
        let calls = fx.dir.join("calls");
        script(
            &fx.cfg.modules_dir.join("deb"),
            &format!(
                r#"state="$1"; work="$2"
echo "$state $(basename "$work") $DROVER_STATE" >> {calls}
case "$state" in
  Download) test -f "$work/files/pkg.deb" && test -f "$work/header/manifest.json" || exit 9
            grep -q '"payload_type":"deb"' "$work/header/manifest.json" || exit 8 ;;
  SupportsRollback) echo Yes ;;
  NeedsArtifactReboot) echo No ;;
  ArtifactInstall) cp "$work/files/pkg.deb" "$work/tmp/installed" ;;
  ArtifactVerify) test -f "$work/tmp/installed" ;;
esac
"#,
                calls = calls.display()
            ),
        );
        let m = for_type("deb", &fx.cfg).unwrap();
        fx.with("deb", "1", &[], &[("pkg.deb", b"deb bytes")], |cx| {
            m.download(cx).unwrap();
            assert!(m.supports_rollback(cx).unwrap());
            m.install(cx).unwrap();
            assert!(!m.needs_reboot(cx).unwrap());
            m.verify(cx).unwrap();
            m.commit(cx).unwrap();
            m.cleanup(cx).unwrap();
            assert_eq!(read(&cx.workdir.join("tmp/installed")), "deb bytes");
            assert_eq!(read(&cx.workdir.join("version")), "1\n");
            assert_eq!(read(&cx.workdir.join("current_device_type")), "rpi4\n");
        });
        let states: Vec<String> = read(&calls).lines().map(|l| l.to_string()).collect();
        assert_eq!(
            states,
            [
                "Download work Download",
                "SupportsRollback work SupportsRollback",
                "ArtifactInstall work ArtifactInstall",
                "NeedsArtifactReboot work NeedsArtifactReboot",
                "ArtifactVerify work ArtifactVerify",
                "ArtifactCommit work ArtifactCommit",
                "Cleanup work Cleanup"
            ]
        );
        // Bad input: an answer that is neither Yes nor No; a failing state; no module.
        script(
            &fx.cfg.modules_dir.join("odd"),
            "case \"$1\" in SupportsRollback) echo maybe;; ArtifactInstall) echo 'disk full' >&2; exit 2;; esac",
        );
        let odd = for_type("odd", &fx.cfg).unwrap();
        fx.with("odd", "1", &[], &[("p", b"x")], |cx| {
            assert!(odd.supports_rollback(cx).unwrap_err().to_string().contains("expected Yes or No"));
            let e = odd.install(cx).unwrap_err().to_string();
            assert!(e.contains("odd ArtifactInstall failed (exit status 2): disk full"), "{e}");
        });
        let e = for_type("rauc", &fx.cfg).err().unwrap().to_string();
        assert!(e.contains("no update module for payload type \"rauc\""), "{e}");
    }

    /// Bad input: the artifact file changed after it was verified; the payload reader says so.
    #[test]
    fn payload_reader_checks_the_digest() {
        let fx = Fx::new("digest");
        fx.with("file", "1", &[], &[("p", b"hello world")], |cx| {
            let mut s = String::new();
            cx.open_payload(0).unwrap().read_to_string(&mut s).unwrap();
            assert_eq!(s, "hello world");
            let mut bytes = std::fs::read(cx.artifact).unwrap();
            let n = bytes.len();
            bytes[n - 1] ^= 1;
            std::fs::write(cx.artifact, &bytes).unwrap();
            let e = cx.open_payload(0).unwrap().read_to_end(&mut Vec::new()).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidData);
            std::fs::write(cx.artifact, &bytes[..n - 2]).unwrap();
            let e = cx.open_payload(0).unwrap().read_to_end(&mut Vec::new()).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        });
    }
}
