//! The update state on disk, under `data_dir/update/`:
//!
//! | path | what |
//! | --- | --- |
//! | `state.json` | the job in flight ([`Job`]) and the last final report, written before every step |
//! | `installed.json` | what Drover installed: software and provides ([`Installed`]) |
//! | `root.json` | the trust root the device trusts now |
//! | `<artifact id>.part` | the artifact being downloaded (kept until the update ends) |
//! | `work/` | the update module's work directory for the job in flight |
//! | `logs/<deployment>.log` | what the agent did, with hook and module output; the last few kept |
//!
//! JSON files are written atomically (temporary file, fsync, rename, fsync of the folder).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use drover_proto::update::UpdateReport;
use serde::{Deserialize, Serialize};

use super::machine::{Installed, Job};
use crate::store::write_atomic;

/// Logs of this many past deployments are kept.
const KEEP_LOGS: usize = 5;

#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Persisted {
    pub v: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<Job>,
    /// The last final report, re-sent after every reconnect until the next deployment starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last: Option<UpdateReport>,
}

/// Paths of the update state.
#[derive(Debug, Clone)]
pub struct UpdateDir {
    dir: PathBuf,
}

fn io_err(path: &Path, e: impl std::fmt::Display) -> String {
    format!("{}: {e}", path.display())
}

impl UpdateDir {
    /// `data_dir/update`.
    pub fn new(data_dir: &Path) -> UpdateDir {
        UpdateDir { dir: data_dir.join("update") }
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }
    pub fn state_path(&self) -> PathBuf {
        self.dir.join("state.json")
    }
    pub fn installed_path(&self) -> PathBuf {
        self.dir.join("installed.json")
    }
    pub fn root_path(&self) -> PathBuf {
        self.dir.join("root.json")
    }
    pub fn part_path(&self, artifact_id: &str) -> PathBuf {
        self.dir.join(format!("{artifact_id}.part"))
    }
    pub fn work_dir(&self) -> PathBuf {
        self.dir.join("work")
    }
    pub fn log_path(&self, deployment: &str) -> PathBuf {
        self.dir.join("logs").join(format!("{deployment}.log"))
    }

    pub fn ensure(&self) -> Result<(), String> {
        std::fs::create_dir_all(self.dir.join("logs")).map_err(|e| io_err(&self.dir, e))
    }

    /// The persisted state; empty when there is none. A corrupt file is an error: the agent
    /// must not forget an update in flight and leave a device half-installed.
    pub fn load(&self) -> Result<Persisted, String> {
        let path = self.state_path();
        match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| io_err(&path, e)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Persisted { v: 1, ..Persisted::default() }),
            Err(e) => Err(io_err(&path, e)),
        }
    }

    pub fn save(&self, p: &Persisted) -> Result<(), String> {
        self.ensure()?;
        let bytes = serde_json::to_vec_pretty(p).map_err(|e| e.to_string())?;
        write_atomic(&self.state_path(), &bytes, 0o600).map_err(|e| e.to_string())
    }

    pub fn load_installed(&self) -> Result<Installed, String> {
        let path = self.installed_path();
        match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| io_err(&path, e)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Installed::default()),
            Err(e) => Err(io_err(&path, e)),
        }
    }

    pub fn save_installed(&self, i: &Installed) -> Result<(), String> {
        self.ensure()?;
        let bytes = serde_json::to_vec_pretty(i).map_err(|e| e.to_string())?;
        write_atomic(&self.installed_path(), &bytes, 0o644).map_err(|e| e.to_string())
    }

    /// Removes logs of older deployments, keeping the newest few and `keep`.
    pub fn prune_logs(&self, keep: &str) {
        let Ok(entries) = std::fs::read_dir(self.dir.join("logs")) else { return };
        let mut logs: Vec<(std::time::SystemTime, PathBuf)> = entries
            .flatten()
            .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
            .filter(|(_, p)| p.file_stem().is_some_and(|s| s != keep))
            .collect();
        logs.sort();
        let n = logs.len().saturating_sub(KEEP_LOGS - 1);
        for (_, p) in logs.into_iter().take(n) {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// One update's log: lines with a time stamp, appended to `logs/<deployment>.log` and mirrored
/// to the agent's own log.
#[derive(Debug)]
pub struct UpdateLog {
    path: PathBuf,
    file: Mutex<Option<std::fs::File>>,
    deployment: String,
}

impl UpdateLog {
    pub fn open(dir: &UpdateDir, deployment: &str) -> UpdateLog {
        let path = dir.log_path(deployment);
        let _ = dir.ensure();
        let file = std::fs::OpenOptions::new().create(true).append(true).open(&path).ok();
        UpdateLog { path, file: Mutex::new(file), deployment: deployment.to_string() }
    }

    /// A log that only goes to the agent's own log (tests).
    pub fn none() -> UpdateLog {
        UpdateLog { path: PathBuf::new(), file: Mutex::new(None), deployment: String::new() }
    }

    pub fn line(&self, text: &str) {
        tracing::info!(deployment = %self.deployment, "{text}");
        self.raw(&format!("{} {text}\n", crate::der::format_time(now_secs())));
    }

    pub fn warn(&self, text: &str) {
        tracing::warn!(deployment = %self.deployment, "{text}");
        self.raw(&format!("{} {text}\n", crate::der::format_time(now_secs())));
    }

    /// Output of a hook or module, each line indented under a header line.
    pub fn output(&self, what: &str, text: &str) {
        let text = text.trim_end();
        if text.is_empty() {
            return;
        }
        tracing::debug!(deployment = %self.deployment, "{what}:\n{text}");
        let mut out = format!("{} {what}:\n", crate::der::format_time(now_secs()));
        for l in text.lines() {
            out.push_str("  | ");
            out.push_str(l);
            out.push('\n');
        }
        self.raw(&out);
    }

    fn raw(&self, s: &str) {
        let mut f = self.file.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = f.as_mut() {
            let _ = f.write_all(s.as_bytes());
        }
    }

    /// Everything logged so far (for the report's tail).
    pub fn read(&self) -> String {
        if self.path.as_os_str().is_empty() {
            return String::new();
        }
        let bytes = std::fs::read(&self.path).unwrap_or_default();
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

pub fn now_secs() -> i64 {
    now_ms() / 1000
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips_and_corruption_is_an_error() {
        let dir = crate::update::testutil::temp("persist");
        let u = UpdateDir::new(&dir);
        assert_eq!(u.load().unwrap().job, None);
        let mut p = Persisted { v: 1, ..Persisted::default() };
        p.last = Some(UpdateReport::new("d1", drover_proto::update::UpdateState::Success));
        u.save(&p).unwrap();
        assert_eq!(u.load().unwrap(), p);
        // Bad input: a corrupt state file is not silently read as "nothing in flight".
        std::fs::write(u.state_path(), b"{\"v\":1,\"job\":{").unwrap();
        assert!(u.load().unwrap_err().contains("state.json"));
        let log = UpdateLog::open(&u, "d1");
        log.line("hello");
        log.output("hook X", "a\nb\n");
        let text = log.read();
        assert!(text.contains("hello\n") && text.contains("hook X:\n  | a\n  | b\n"), "{text}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
