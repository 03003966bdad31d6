//! The artifact format end to end, on real files in temporary directories.

mod format;
mod fuzz;
mod root;
mod tree;

use std::path::{Path, PathBuf};

use drover_artifact::keys::SigningKey;
use drover_artifact::manifest::{Manifest, PayloadRole};
use drover_artifact::write::Builder;

/// A directory under the system temp dir, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        let p = std::env::temp_dir().join(format!(
            "drover-artifact-it-{tag}-{}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed),
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
        ));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn join(&self, p: &str) -> PathBuf {
        self.0.join(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Deterministic pseudo-random bytes (xorshift), so payloads are not all one value.
pub fn bytes(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

pub fn manifest() -> Manifest {
    let mut m = Manifest::new("edge-app", "1.4.2", vec!["rpi4".into(), "x86-gw".into()], "app");
    m.provides.insert("app.edge-app.version".into(), "1.4.2".into());
    m.depends.insert("os.version".into(), vec!["12".into(), "13".into()]);
    m.module_args.insert("name".into(), "edge-app".into());
    m.created_at = Some("2026-11-23T10:00:00Z".into());
    m
}

/// The payload files of [`build`]: `app.tar` (100 000 bytes), `empty` (0), `sbom.json` (300).
pub fn payload_files(dir: &TempDir) -> Vec<(String, PathBuf, PayloadRole, Vec<u8>)> {
    let mut out = Vec::new();
    for (name, data, role) in [
        ("app.tar", bytes(1, 100_000), PayloadRole::Install),
        ("empty", Vec::new(), PayloadRole::Install),
        ("sbom.json", bytes(2, 300), PayloadRole::Sbom),
    ] {
        let p = dir.join(name);
        std::fs::write(&p, &data).unwrap();
        out.push((name.to_string(), p, role, data));
    }
    out
}

/// Builds an artifact at `dir/out.drover` signed by `signers`; returns its path and payloads.
pub fn build(dir: &TempDir, signers: &[&SigningKey]) -> (PathBuf, Vec<(String, Vec<u8>)>) {
    let files = payload_files(dir);
    let mut b = Builder::new(manifest());
    for (name, path, role, _) in &files {
        b = b.payload(name.clone(), path.clone(), *role);
    }
    let out = dir.join("out.drover");
    let m = b.build(std::fs::File::create(&out).unwrap(), signers).unwrap();
    assert_eq!(m.payloads.len(), 3);
    (out, files.into_iter().map(|(n, _, _, d)| (n, d)).collect())
}

/// A first root (version 1) signed by `root_key`, naming `release` as release keys.
pub fn root_json(root_key: &SigningKey, release: &[&SigningKey], revoked: &[String]) -> Vec<u8> {
    use drover_artifact::root::{Root, RootKey, create_root};
    let mut r = Root::new(
        1,
        vec![RootKey::new(root_key.public(), "root")],
        release.iter().map(|k| RootKey::new(k.public(), "release")).collect(),
    );
    r.revoked = revoked.to_vec();
    create_root(r, &[root_key]).unwrap().to_json()
}

pub fn trust(root_key: &SigningKey, release: &[&SigningKey], revoked: &[String]) -> drover_artifact::TrustStore {
    drover_artifact::TrustStore::from_initial(&root_json(root_key, release, revoked)).unwrap()
}
