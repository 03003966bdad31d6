//! Fixtures for the update tests: temporary folders, scripts, signed artifacts.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use drover_artifact::keys::SigningKey;
use drover_artifact::manifest::{Manifest, PayloadRole};
use drover_artifact::read::Reader;
use drover_artifact::stream::Header;
use drover_artifact::write::Builder;

pub fn temp(name: &str) -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let d = std::env::temp_dir().join(format!(
        "drover-agent-update-{}-{name}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// An executable `#!/bin/sh` script.
pub fn script(path: &Path, body: &str) {
    std::fs::write(path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// A signed artifact at `dir/<name>.drover` with `payloads` (name, bytes); its header.
pub fn artifact(dir: &Path, m: Manifest, payloads: &[(&str, &[u8])], key: &SigningKey) -> (PathBuf, Header) {
    let mut b = Builder::new(m);
    for (name, data) in payloads {
        let p = dir.join(format!("payload-{name}"));
        std::fs::write(&p, data).unwrap();
        b = b.payload(*name, p, PayloadRole::Install);
    }
    let out = dir.join("artifact.drover");
    b.build(std::fs::File::create(&out).unwrap(), &[key]).unwrap();
    let h = Reader::new(std::fs::File::open(&out).unwrap()).unwrap().header().clone();
    (out, h)
}

/// A tar of `entries` (path, contents; `None` for a directory), with raw names so that bad
/// paths (`../x`, `/abs`) can be written too.
pub fn tar(entries: &[(&str, Option<&[u8]>)], links: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut b = tar::Builder::new(&mut out);
        for (path, data) in entries {
            let mut h = tar::Header::new_gnu();
            match data {
                Some(d) => {
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_size(d.len() as u64);
                    h.set_mode(0o644);
                }
                None => {
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_size(0);
                    h.set_mode(0o755);
                }
            }
            set_raw_path(&mut h, path);
            h.set_cksum();
            b.append(&h, data.unwrap_or(&[])).unwrap();
        }
        for (path, target) in links {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Symlink);
            h.set_size(0);
            h.set_mode(0o777);
            set_raw_path(&mut h, path);
            h.set_link_name(target).unwrap();
            h.set_cksum();
            b.append(&h, &[][..]).unwrap();
        }
        b.finish().unwrap();
    }
    out
}

fn set_raw_path(h: &mut tar::Header, path: &str) {
    let name = &mut h.as_old_mut().name;
    name.fill(0);
    name[..path.len()].copy_from_slice(path.as_bytes());
}
