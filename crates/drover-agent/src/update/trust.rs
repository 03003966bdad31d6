//! The trust root: the provisioned `root_file`, or the newer root kept in
//! `data_dir/update/root.json`, advanced with the roots the server sends with each install.

use std::path::Path;

use drover_artifact::root::TrustStore;

use super::persist::UpdateDir;
use crate::store::write_atomic;

fn read_root(path: &Path) -> Result<Option<TrustStore>, String> {
    match std::fs::read(path) {
        Ok(b) => TrustStore::from_initial(&b).map(Some).map_err(|e| format!("trust root {}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("trust root {}: {e}", path.display())),
    }
}

/// Checks that `root_json` can be a device's first root (signed by its own root keys).
pub fn check_root(root_json: &[u8]) -> Result<(), String> {
    TrustStore::from_initial(root_json).map(drop).map_err(|e| e.to_string())
}

/// The root in force, without the server's: the newer of the kept and the provisioned one;
/// also the kept one's version.
pub fn current(dir: &UpdateDir, root_file: &Path) -> Result<(TrustStore, Option<u64>), String> {
    let kept = read_root(&dir.root_path())?;
    let provisioned = match read_root(root_file) {
        Ok(r) => r,
        // A broken image file must not hide a good kept root.
        Err(e) if kept.is_some() => {
            tracing::warn!("{e}; using the kept root");
            None
        }
        Err(e) => return Err(e),
    };
    let kept_version = kept.as_ref().map(TrustStore::version);
    let store = match (kept, provisioned) {
        (Some(k), Some(p)) => {
            if p.version() > k.version() {
                p
            } else {
                k
            }
        }
        (Some(k), None) => k,
        (None, Some(p)) => p,
        (None, None) => {
            return Err(format!(
                "this device has no trust root: {} does not exist (set [update] root_file)",
                root_file.display()
            ));
        }
    };
    Ok((store, kept_version))
}

/// The trust store to verify with: the newer of the kept and the provisioned root, then the
/// server's `roots` applied in order (each must be signed by the root before it). A root that
/// advanced is kept.
pub fn load(dir: &UpdateDir, root_file: &Path, roots: &[String]) -> Result<TrustStore, String> {
    let (mut store, kept_version) = current(dir, root_file)?;
    for (i, r) in roots.iter().enumerate() {
        store.apply(r.as_bytes()).map_err(|e| format!("the server's trust root #{} was refused: {e}", i + 1))?;
    }
    if kept_version != Some(store.version()) {
        dir.ensure()?;
        write_atomic(&dir.root_path(), store.current_json(), 0o644).map_err(|e| e.to_string())?;
        tracing::info!(version = store.version(), "trust root is now version {}", store.version());
    }
    Ok(store)
}
