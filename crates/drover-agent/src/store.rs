//! The agent's data folder (`data_dir`, default `/var/lib/drover`):
//!
//! | file | what |
//! | --- | --- |
//! | `device.key` | the private key, PKCS#8 PEM, mode 0600; made here, never sent |
//! | `device.crt` | the certificate the fleet CA issued for it |
//! | `ca.crt` | the fleet CA certificate received at enrollment |
//! | `device.json` | `{"device_id": …}` |
//!
//! Every file is written atomically (temporary file, fsync, rename, fsync of the folder), so a
//! power cut leaves either the old or the new file, never half of one.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::tls::{CertInfo, DeviceKey};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io { path: path.to_path_buf(), source }
}

#[derive(Debug, Serialize, Deserialize)]
struct DeviceFile {
    device_id: String,
}

/// A device that has everything it needs to connect.
#[derive(Debug)]
pub struct Provisioned {
    pub device_id: String,
    pub key: DeviceKey,
    pub cert_pem: String,
    pub ca_pem: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
}

impl Store {
    pub fn new(dir: impl Into<PathBuf>) -> Store {
        Store { dir: dir.into() }
    }
    pub fn dir(&self) -> &Path {
        &self.dir
    }
    pub fn key_path(&self) -> PathBuf {
        self.dir.join("device.key")
    }
    pub fn cert_path(&self) -> PathBuf {
        self.dir.join("device.crt")
    }
    pub fn ca_path(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }
    pub fn device_json_path(&self) -> PathBuf {
        self.dir.join("device.json")
    }

    fn ensure_dir(&self) -> Result<(), StoreError> {
        if !self.dir.is_dir() {
            std::fs::create_dir_all(&self.dir).map_err(io(&self.dir))?;
            std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(0o700)).map_err(io(&self.dir))?;
        }
        Ok(())
    }

    /// The device key, made now if there is none yet.
    pub fn load_or_create_key(&self) -> Result<DeviceKey, StoreError> {
        let path = self.key_path();
        match std::fs::read_to_string(&path) {
            Ok(pem) => DeviceKey::from_pem(&pem).map_err(|e| StoreError::Invalid { path, message: e.to_string() }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.ensure_dir()?;
                let key = DeviceKey::generate()
                    .map_err(|e| StoreError::Invalid { path: path.clone(), message: e.to_string() })?;
                write_atomic(&path, key.to_pem().as_bytes(), 0o600)?;
                tracing::info!(path = %path.display(), "made a new device key");
                Ok(key)
            }
            Err(source) => Err(StoreError::Io { path, source }),
        }
    }

    /// Stores what the CA issued; `device.json` last, so it is there only when the rest is.
    pub fn save_enrolled(&self, device_id: &str, cert_pem: &str, ca_pem: &str) -> Result<(), StoreError> {
        self.ensure_dir()?;
        write_atomic(&self.cert_path(), cert_pem.as_bytes(), 0o644)?;
        write_atomic(&self.ca_path(), ca_pem.as_bytes(), 0o644)?;
        let json = serde_json::to_vec_pretty(&DeviceFile { device_id: device_id.to_string() })
            .map_err(|e| StoreError::Invalid { path: self.device_json_path(), message: e.to_string() })?;
        write_atomic(&self.device_json_path(), &json, 0o644)
    }

    /// The provisioned identity, `None` if the device has not enrolled yet (no `device.json`
    /// or no certificate). A present but unusable file is an error, not a reason to re-enroll.
    pub fn load_provisioned(&self) -> Result<Option<Provisioned>, StoreError> {
        let json_path = self.device_json_path();
        let json = match std::fs::read(&json_path) {
            Ok(j) => j,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(StoreError::Io { path: json_path, source }),
        };
        let file: DeviceFile = serde_json::from_slice(&json)
            .map_err(|e| StoreError::Invalid { path: json_path.clone(), message: e.to_string() })?;
        let cert_path = self.cert_path();
        let cert_pem = match std::fs::read_to_string(&cert_path) {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(StoreError::Io { path: cert_path, source }),
        };
        let key_path = self.key_path();
        let key_pem = std::fs::read_to_string(&key_path).map_err(io(&key_path))?;
        let key = DeviceKey::from_pem(&key_pem)
            .map_err(|e| StoreError::Invalid { path: key_path, message: e.to_string() })?;
        let info = CertInfo::from_pem(cert_pem.as_bytes(), "device.crt")
            .map_err(|e| StoreError::Invalid { path: cert_path.clone(), message: e.to_string() })?;
        if info.public_key_raw != key.public_key_raw() {
            return Err(StoreError::Invalid {
                path: cert_path,
                message: "the certificate is not for device.key (remove device.json to enroll again)".into(),
            });
        }
        if info.common_name.as_deref() != Some(file.device_id.as_str()) {
            return Err(StoreError::Invalid {
                path: cert_path,
                message: format!(
                    "the certificate names {:?}, device.json says {:?}",
                    info.common_name.unwrap_or_default(),
                    file.device_id
                ),
            });
        }
        let ca_pem = match std::fs::read_to_string(self.ca_path()) {
            Ok(c) => Some(c),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(source) => return Err(StoreError::Io { path: self.ca_path(), source }),
        };
        Ok(Some(Provisioned { device_id: file.device_id, key, cert_pem, ca_pem }))
    }
}

/// Writes a file so that it is either entirely old or entirely new after a crash: a
/// temporary file with the final mode, fsync, rename over the target, fsync the folder.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), StoreError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let result = (|| {
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(&tmp)?;
        // The mode given to open is filtered by the umask; set it exactly.
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(io(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_is_made_once_with_mode_0600() {
        let dir = std::env::temp_dir().join(format!("drover-agent-store-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = Store::new(dir.join("data"));
        let k1 = store.load_or_create_key().unwrap();
        let k2 = store.load_or_create_key().unwrap();
        assert_eq!(k1.public_key_raw(), k2.public_key_raw());
        let mode = std::fs::metadata(store.key_path()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(store.load_provisioned().unwrap().is_none());
        // No temporary files are left behind.
        let names: Vec<_> = std::fs::read_dir(store.dir()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("device.key")]);
        // Bad input: a corrupt key file is an error, never silently replaced.
        std::fs::write(store.key_path(), "not a key").unwrap();
        assert!(store.load_or_create_key().unwrap_err().to_string().contains("device.key"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
