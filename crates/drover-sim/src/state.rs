//! The state directory (`--state-dir`): each simulated device's key, certificate and id, so a
//! restarted simulator is the same fleet instead of enrolling new devices.
//!
//! Layout: `DIR/run-id` (names the fleet in serials), and per device `DIR/devices/{name}.key.pem`
//! (written before enrolling, like the agent's key), `{name}.cert.pem` and `{name}.id` (written
//! last: a device with an id file is complete). Files are written to a temporary name and
//! renamed, so a simulator killed mid-write leaves no half file behind.

use std::io;
use std::path::{Path, PathBuf};

/// Where a fleet's devices live; `None` keeps them in memory only.
#[derive(Debug, Clone)]
pub struct Store {
    dir: Option<PathBuf>,
}

/// What is on disk for one device.
#[derive(Debug, Default)]
pub struct Saved {
    pub key_pem: Option<String>,
    /// The device id and its certificate, once enrolled.
    pub enrolled: Option<(String, String)>,
}

fn write_atomic(path: &Path, text: &str) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

fn read_opt(path: &Path) -> io::Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

impl Store {
    /// Opens (creating it if needed) the state directory and returns the fleet's run id: the
    /// one stored there, or a new random one.
    pub fn open(dir: Option<&Path>) -> io::Result<(Store, String)> {
        let fresh = || format!("{:08x}", rand::random::<u32>());
        let Some(dir) = dir else {
            return Ok((Store { dir: None }, fresh()));
        };
        std::fs::create_dir_all(dir.join("devices"))?;
        let run_file = dir.join("run-id");
        let run = match read_opt(&run_file)? {
            Some(r) if !r.trim().is_empty() => r.trim().to_string(),
            _ => {
                let r = fresh();
                write_atomic(&run_file, &r)?;
                r
            }
        };
        Ok((Store { dir: Some(dir.to_path_buf()) }, run))
    }

    fn path(&self, name: &str, ext: &str) -> Option<PathBuf> {
        self.dir.as_ref().map(|d| d.join("devices").join(format!("{name}.{ext}")))
    }

    pub fn load(&self, name: &str) -> io::Result<Saved> {
        let Some(key) = self.path(name, "key.pem") else {
            return Ok(Saved::default());
        };
        let key_pem = read_opt(&key)?;
        let id = read_opt(&self.path(name, "id").unwrap_or_default())?;
        let cert = read_opt(&self.path(name, "cert.pem").unwrap_or_default())?;
        let enrolled = match (id, cert) {
            (Some(id), Some(cert)) if key_pem.is_some() && !id.trim().is_empty() => Some((id.trim().to_string(), cert)),
            _ => None,
        };
        Ok(Saved { key_pem, enrolled })
    }

    pub fn save_key(&self, name: &str, key_pem: &str) -> io::Result<()> {
        match self.path(name, "key.pem") {
            Some(p) => write_atomic(&p, key_pem),
            None => Ok(()),
        }
    }

    pub fn save_enrolled(&self, name: &str, device_id: &str, cert_pem: &str) -> io::Result<()> {
        let (Some(cert), Some(id)) = (self.path(name, "cert.pem"), self.path(name, "id")) else {
            return Ok(());
        };
        write_atomic(&cert, cert_pem)?;
        write_atomic(&id, device_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_is_complete_only_with_key_cert_and_id() {
        let dir = std::env::temp_dir().join(format!("drover-sim-state-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (s, run) = Store::open(Some(&dir)).unwrap();
        let (_, again) = Store::open(Some(&dir)).unwrap();
        assert_eq!(run, again, "the run id is kept");
        assert!(s.load("sim-00000").unwrap().key_pem.is_none());
        s.save_key("sim-00000", "KEY").unwrap();
        let l = s.load("sim-00000").unwrap();
        assert_eq!(l.key_pem.as_deref(), Some("KEY"));
        assert!(l.enrolled.is_none());
        s.save_enrolled("sim-00000", "dev-1", "CERT").unwrap();
        let l = s.load("sim-00000").unwrap();
        assert_eq!(l.enrolled, Some(("dev-1".to_string(), "CERT".to_string())));
        let (mem, r1) = Store::open(None).unwrap();
        let (_, r2) = Store::open(None).unwrap();
        assert_ne!(r1, r2);
        mem.save_key("x", "k").unwrap();
        assert!(mem.load("x").unwrap().key_pem.is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
