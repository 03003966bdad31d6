//! Where `drover login` keeps the server address and token: `$DROVER_CONFIG`, else
//! `$XDG_CONFIG_HOME/drover/config.json`, else `~/.config/drover/config.json`; readable by
//! its owner only. `DROVER_URL` and `DROVER_TOKEN` override what is saved.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::client::CliError;

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Saved {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

pub fn path(env: &dyn Fn(&str) -> Option<String>) -> PathBuf {
    if let Some(p) = env("DROVER_CONFIG").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let base = env("XDG_CONFIG_HOME")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env("HOME").unwrap_or_else(|| ".".into())).join(".config"));
    base.join("drover").join("config.json")
}

pub fn load(path: &Path) -> Result<Saved, CliError> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text)
            .map_err(|e| CliError::Config { path: path.display().to_string(), message: e.to_string() }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Saved::default()),
        Err(e) => Err(CliError::Config { path: path.display().to_string(), message: e.to_string() }),
    }
}

/// Writes the file with mode 0600 (its folder 0700): it holds a bearer token.
pub fn save(path: &Path, saved: &Saved) -> Result<(), CliError> {
    let err = |e: std::io::Error| CliError::Config { path: path.display().to_string(), message: e.to_string() };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        let mut b = std::fs::DirBuilder::new();
        b.recursive(true);
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut b, 0o700);
        b.create(dir).map_err(err)?;
    }
    let text = serde_json::to_string_pretty(saved).unwrap_or_default();
    // Write beside it and rename, so a crash never leaves half a file.
    let tmp = path.with_extension("json.tmp");
    {
        use std::io::Write as _;
        let mut o = std::fs::OpenOptions::new();
        o.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut o, 0o600);
        let mut f = o.open(&tmp).map_err(err)?;
        #[cfg(unix)]
        std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o600)).map_err(err)?;
        f.write_all(text.as_bytes()).map_err(err)?;
        f.sync_all().map_err(err)?;
    }
    std::fs::rename(&tmp, path).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_precedence() {
        let env = |k: &str| match k {
            "DROVER_CONFIG" => Some("/x/drover.json".to_string()),
            "XDG_CONFIG_HOME" => Some("/xdg".to_string()),
            "HOME" => Some("/home/ann".to_string()),
            _ => None,
        };
        assert_eq!(path(&env), PathBuf::from("/x/drover.json"));
        let env = |k: &str| if k == "HOME" { Some("/home/ann".to_string()) } else { None };
        assert_eq!(path(&env), PathBuf::from("/home/ann/.config/drover/config.json"));
        let env = |k: &str| if k == "XDG_CONFIG_HOME" { Some("/xdg".to_string()) } else { None };
        assert_eq!(path(&env), PathBuf::from("/xdg/drover/config.json"));
    }

    #[test]
    fn saves_private_and_loads_back() {
        let dir = std::env::temp_dir().join(format!("drover-cli-config-{}", std::process::id()));
        let p = dir.join("sub").join("config.json");
        let saved = Saved { url: Some("http://x".into()), token: Some("drv_secret".into()) };
        save(&p, &saved).unwrap();
        assert_eq!(load(&p).unwrap(), saved);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        }
        std::fs::write(&p, "{not json").unwrap();
        assert!(load(&p).unwrap_err().to_string().contains("config.json"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
