//! `[telemetry]` in the agent's configuration (`docs/agent.md`, "Telemetry").

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::config::ConfigError;

/// `[telemetry]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTelemetry {
    enabled: Option<bool>,
    interval_s: Option<u64>,
    disks: Option<Vec<PathBuf>>,
    socket: Option<PathBuf>,
    socket_mode: Option<String>,
    outbox_dir: Option<PathBuf>,
    outbox_max_bytes: Option<u64>,
    sync_interval_ms: Option<u64>,
    batch_max_points: Option<usize>,
    window: Option<usize>,
    ack_timeout_s: Option<u64>,
    action_timeout_s: Option<u64>,
    journal: Option<bool>,
    log_files: Option<BTreeMap<String, PathBuf>>,
    actions: Option<BTreeMap<String, Vec<String>>>,
}

/// `[telemetry]`, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TelemetryConfig {
    pub enabled: bool,
    /// Collection round: health metrics, local-interface aggregation, rules, fsync.
    pub interval: Duration,
    /// Mount points whose usage is reported.
    pub disks: Vec<PathBuf>,
    /// The local interface's Unix socket; `None`: no local interface.
    pub socket: Option<PathBuf>,
    pub socket_mode: u32,
    /// Telemetry state: outbox segments, `rules.json`.
    pub dir: PathBuf,
    pub outbox_max_bytes: u64,
    /// Longest time local-interface data waits before it is fsynced.
    pub sync_interval: Duration,
    pub batch_max_points: usize,
    /// Batches sent and not yet acknowledged.
    pub window: usize,
    pub ack_timeout: Duration,
    pub action_timeout: Duration,
    /// Whether `down/logs` may read the journal.
    pub journal: bool,
    /// Files `down/logs` may read, by the name requests use (`file:<name>`).
    pub log_files: BTreeMap<String, PathBuf>,
    /// Commands device rules may run, by name: argv, no shell.
    pub actions: BTreeMap<String, Vec<String>>,
}

impl TelemetryConfig {
    pub fn defaults(data_dir: &Path) -> Self {
        TelemetryConfig {
            enabled: true,
            interval: Duration::from_secs(30),
            disks: vec!["/".into()],
            socket: Some(data_dir.join("telemetry.sock")),
            socket_mode: 0o660,
            dir: data_dir.join("telemetry"),
            outbox_max_bytes: 16 << 20,
            sync_interval: Duration::from_millis(1000),
            batch_max_points: 500,
            window: 4,
            ack_timeout: Duration::from_secs(30),
            action_timeout: Duration::from_secs(60),
            journal: false,
            log_files: BTreeMap::new(),
            actions: BTreeMap::new(),
        }
    }
}

pub fn check(raw: Option<RawTelemetry>, data_dir: &Path) -> Result<TelemetryConfig, ConfigError> {
    let raw = raw.unwrap_or_default();
    let invalid = |m: String| ConfigError::Invalid(format!("[telemetry] {m}"));
    let d = TelemetryConfig::defaults(data_dir);
    let range = |name: &str, v: Option<u64>, def: u64, min: u64, max: u64| -> Result<u64, ConfigError> {
        let v = v.unwrap_or(def);
        if v < min || v > max {
            return Err(invalid(format!("{name} = {v}: must be between {min} and {max}")));
        }
        Ok(v)
    };
    let socket = match raw.socket {
        Some(p) if p.as_os_str().is_empty() => None,
        Some(p) => Some(p),
        None => d.socket,
    };
    let socket_mode = match raw.socket_mode {
        Some(m) => u32::from_str_radix(m.trim_start_matches("0o"), 8)
            .ok()
            .filter(|m| *m <= 0o777)
            .ok_or_else(|| invalid(format!("socket_mode {m:?}: an octal mode such as \"0660\"")))?,
        None => d.socket_mode,
    };
    let actions = raw.actions.unwrap_or_default();
    for (name, argv) in &actions {
        if !drover_proto::telemetry::valid_name(name) {
            return Err(invalid(format!("actions.{name}: names use 1 to 64 of a-z 0-9 _ . -")));
        }
        if argv.is_empty() || argv[0].is_empty() {
            return Err(invalid(format!(
                "actions.{name}: give the command as a list, e.g. [\"systemctl\", \"restart\", \"app\"]"
            )));
        }
    }
    let log_files = raw.log_files.unwrap_or_default();
    for (name, path) in &log_files {
        if !drover_proto::telemetry::valid_name(name) || !path.is_absolute() {
            return Err(invalid(format!("log_files.{name}: a name of a-z 0-9 _ . - and an absolute path")));
        }
    }
    Ok(TelemetryConfig {
        enabled: raw.enabled.unwrap_or(true),
        interval: Duration::from_secs(range("interval_s", raw.interval_s, 30, 1, 86_400)?),
        disks: raw.disks.unwrap_or(d.disks),
        socket,
        socket_mode,
        dir: raw.outbox_dir.unwrap_or(d.dir),
        outbox_max_bytes: range("outbox_max_bytes", raw.outbox_max_bytes, 16 << 20, 64 << 10, 1 << 40)?,
        sync_interval: Duration::from_millis(range("sync_interval_ms", raw.sync_interval_ms, 1000, 10, 60_000)?),
        batch_max_points: range(
            "batch_max_points",
            raw.batch_max_points.map(|n| n as u64),
            500,
            1,
            drover_proto::telemetry::MAX_BATCH_POINTS as u64,
        )? as usize,
        window: range("window", raw.window.map(|n| n as u64), 4, 1, 64)? as usize,
        ack_timeout: Duration::from_secs(range("ack_timeout_s", raw.ack_timeout_s, 30, 1, 3600)?),
        action_timeout: Duration::from_secs(range("action_timeout_s", raw.action_timeout_s, 60, 1, 3600)?),
        journal: raw.journal.unwrap_or(false),
        log_files,
        actions,
    })
}
