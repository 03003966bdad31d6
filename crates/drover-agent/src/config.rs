//! The agent's configuration: `/etc/drover/agent.toml` plus drop-ins
//! `<dir of config>/config.d/*.toml`, merged in lexical order (later files win, tables merge).
//! Every field is documented in `docs/agent.md`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub const DEFAULT_CONFIG_PATH: &str = "/etc/drover/agent.toml";
pub const DEFAULT_DATA_DIR: &str = "/var/lib/drover";
pub const DEFAULT_CA_FILE: &str = "/etc/drover/ca.crt";
pub const DEFAULT_INVENTORY_SCRIPTS_DIR: &str = "/etc/drover/inventory.d";
pub const DEFAULT_MQTT_PORT: u16 = 8883;
pub const DEFAULT_ROOT_FILE: &str = "/etc/drover/root.json";
pub const DEFAULT_MODULES_DIR: &str = "/usr/lib/drover/modules";
pub const DEFAULT_HOOKS_DIR: &str = "/etc/drover/hooks.d";
pub const DEFAULT_APPS_DIR: &str = "/opt/drover/apps";
pub const DEFAULT_REBOOT_COMMAND: &str = "systemctl reboot";

/// `drover-agent run`'s exit code when the configuration cannot be read or is invalid:
/// `EX_CONFIG` of sysexits.h. Restarting cannot help, so the systemd unit lists it in
/// `RestartPreventExitStatus=`.
pub const EXIT_CONFIG: u8 = 78;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{0}")]
    Invalid(String),
}

/// One file as written: every field optional, unknown fields refused.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    server_url: Option<String>,
    mqtt_url: Option<String>,
    ca_file: Option<PathBuf>,
    data_dir: Option<PathBuf>,
    enrollment_token: Option<String>,
    enrollment_token_file: Option<PathBuf>,
    identity: Option<BTreeMap<String, String>>,
    heartbeat_interval_secs: Option<u64>,
    inventory_interval_secs: Option<u64>,
    keepalive_secs: Option<u64>,
    inventory_scripts_dir: Option<PathBuf>,
    inventory_script_timeout_secs: Option<u64>,
    log_level: Option<String>,
    update: Option<RawUpdate>,
    remote: Option<RawRemote>,
    telemetry: Option<crate::telemetry::config::RawTelemetry>,
}

/// `[remote]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRemote {
    terminal: Option<bool>,
    files: Option<bool>,
    forward: Option<bool>,
    user: Option<String>,
    allow_root: Option<bool>,
    file_paths: Option<Vec<PathBuf>>,
    max_file_size: Option<u64>,
    forward_allow: Option<Vec<String>>,
    idle_timeout_secs: Option<u64>,
    max_duration_secs: Option<u64>,
    max_sessions: Option<usize>,
}

/// `[update]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpdate {
    device_type: Option<String>,
    root_file: Option<PathBuf>,
    modules_dir: Option<PathBuf>,
    hooks_dir: Option<PathBuf>,
    health_check: Option<String>,
    verify_timeout_secs: Option<u64>,
    reboot_command: Option<String>,
    reboot_timeout_secs: Option<u64>,
    file_allow: Option<Vec<PathBuf>>,
    apps_dir: Option<PathBuf>,
    provides: Option<BTreeMap<String, String>>,
    download_retries: Option<u32>,
    download_backoff_secs: Option<u64>,
    download_backoff_max_secs: Option<u64>,
    max_artifact_size: Option<u64>,
    hook_timeout_secs: Option<u64>,
    hook_retry_interval_secs: Option<u64>,
    hook_retry_max: Option<u32>,
    module_timeout_secs: Option<u64>,
}

/// Where the broker is: `mqtts://host[:port]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerAddr {
    pub host: String,
    pub port: u16,
}

impl BrokerAddr {
    pub fn parse(url: &str) -> Result<BrokerAddr, String> {
        let rest = url
            .strip_prefix("mqtts://")
            .ok_or_else(|| format!("{url:?} must start with mqtts:// (devices connect with mutual TLS only)"))?;
        let rest = rest.trim_end_matches('/');
        let (host, port) = split_host_port(rest, DEFAULT_MQTT_PORT).map_err(|e| format!("{url:?}: {e}"))?;
        Ok(BrokerAddr { host, port })
    }
}

/// `host`, `host:port`, `[v6]` or `[v6]:port`.
pub(crate) fn split_host_port(s: &str, default_port: u16) -> Result<(String, u16), String> {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (h, after) = rest.split_once(']').ok_or("unclosed '['")?;
        (h, after.strip_prefix(':'))
    } else {
        match s.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (s, None),
        }
    };
    if host.is_empty() || host.contains('/') {
        return Err("no host".into());
    }
    let port = match port {
        Some(p) => p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(|| format!("bad port {p:?}"))?,
        None => default_port,
    };
    Ok((host.to_string(), port))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl LogLevel {
    pub fn parse(s: &str) -> Option<LogLevel> {
        Some(match s {
            "error" => LogLevel::Error,
            "warn" => LogLevel::Warn,
            "info" => LogLevel::Info,
            "debug" => LogLevel::Debug,
            "trace" => LogLevel::Trace,
            _ => return None,
        })
    }
    pub fn to_tracing(self) -> tracing::Level {
        match self {
            LogLevel::Error => tracing::Level::ERROR,
            LogLevel::Warn => tracing::Level::WARN,
            LogLevel::Info => tracing::Level::INFO,
            LogLevel::Debug => tracing::Level::DEBUG,
            LogLevel::Trace => tracing::Level::TRACE,
        }
    }
}

/// The merged, checked configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The main file.
    pub path: PathBuf,
    /// Drop-ins that were merged, in order.
    pub dropins: Vec<PathBuf>,
    /// Base URL of the enrollment endpoint (`https://host:8443`); needed until enrolled.
    pub server_url: Option<String>,
    pub broker: BrokerAddr,
    pub mqtt_url: String,
    pub ca_file: PathBuf,
    pub data_dir: PathBuf,
    /// `enrollment_token` or `enrollment_token_file`; see [`Config::enrollment_token`].
    pub enrollment_token: Option<TokenSource>,
    /// Configured identity attributes; empty means "derive from the machine".
    pub identity: BTreeMap<String, String>,
    pub heartbeat_interval: Duration,
    pub inventory_interval: Duration,
    pub keepalive: Duration,
    pub inventory_scripts_dir: PathBuf,
    pub inventory_script_timeout: Duration,
    pub log_level: LogLevel,
    /// `[update]`: `None` unless `device_type` is set (updates disabled).
    pub update: Option<UpdateConfig>,
    /// `[remote]`: remote access; every kind is off unless switched on.
    pub remote: RemoteConfig,
    /// `[telemetry]`: collection, local interface, outbox, device rules, logs on demand.
    pub telemetry: crate::telemetry::config::TelemetryConfig,
}

/// `[remote]`: what an operator may do on this device through Drover (`docs/remote-access.md`).
/// The defaults refuse everything: each kind must be switched on by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteConfig {
    pub terminal: bool,
    pub files: bool,
    pub forward: bool,
    /// The terminal's user; `None`: the agent's own user.
    pub user: Option<String>,
    /// Whether the terminal may run as root (uid 0).
    pub allow_root: bool,
    /// Absolute path prefixes that file transfers may read and write (none by default).
    pub file_paths: Vec<PathBuf>,
    /// Largest file transferred either way, in bytes.
    pub max_file_size: u64,
    /// `host:port` or `host:*` targets port forwarding may connect to (none by default).
    pub forward_allow: Vec<String>,
    pub idle_timeout: Duration,
    pub max_duration: Duration,
    /// Sessions open at once.
    pub max_sessions: usize,
    /// Not in the TOML: the terminal's `HOME` and working directory instead of the user's
    /// home (the simulator gives each simulated device its own folder).
    pub home: Option<PathBuf>,
}

impl Default for RemoteConfig {
    fn default() -> Self {
        RemoteConfig {
            terminal: false,
            files: false,
            forward: false,
            user: None,
            allow_root: false,
            file_paths: Vec::new(),
            max_file_size: 256 << 20,
            forward_allow: Vec::new(),
            idle_timeout: Duration::from_secs(900),
            max_duration: Duration::from_secs(4 * 3600),
            max_sessions: 4,
            home: None,
        }
    }
}

/// `[update]`: how this device takes software updates (`docs/agent.md`, "Software updates").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpdateConfig {
    /// Checked against an artifact's `device_types`.
    pub device_type: String,
    /// The trust root provisioned with the device image; the current root is kept in
    /// `data_dir/update/root.json` and advanced with the roots the server sends.
    pub root_file: PathBuf,
    /// External update modules: `<modules_dir>/<payload_type>`.
    pub modules_dir: PathBuf,
    /// State hooks: `<hooks_dir>/<State>_Enter[_NN…]` and `_Leave`.
    pub hooks_dir: PathBuf,
    /// Run with `/bin/sh -c` while verifying; exit 0 means healthy.
    pub health_check: Option<String>,
    pub verify_timeout: Duration,
    /// Run with `/bin/sh -c` when an update module asks for a reboot.
    pub reboot_command: String,
    /// How long to wait for the reboot after `reboot_command` succeeded before calling it failed.
    pub reboot_timeout: Duration,
    /// Path prefixes the `file` module may write.
    pub file_allow: Vec<PathBuf>,
    /// Base directory of the `app` module.
    pub apps_dir: PathBuf,
    /// What the device image provides before any update (for artifacts' `depends`).
    pub provides: BTreeMap<String, String>,
    /// Failed download attempts before the update fails.
    pub download_retries: u32,
    pub download_backoff: Duration,
    pub download_backoff_max: Duration,
    /// Largest artifact the device accepts, in bytes.
    pub max_artifact_size: u64,
    pub hook_timeout: Duration,
    /// After a hook exits 21 ("busy, retry later").
    pub hook_retry_interval: Duration,
    /// Retries of a busy hook before the update fails.
    pub hook_retry_max: u32,
    /// How long one call of an update module may take.
    pub module_timeout: Duration,
    /// Not in the TOML: the `file` module's paths are taken under this folder (the simulator
    /// gives each simulated device one, so one artifact serves a whole simulated fleet).
    pub file_root: Option<PathBuf>,
}

impl UpdateConfig {
    /// The defaults of `docs/agent.md` for `device_type`.
    pub fn new(device_type: impl Into<String>) -> UpdateConfig {
        UpdateConfig {
            device_type: device_type.into(),
            root_file: DEFAULT_ROOT_FILE.into(),
            modules_dir: DEFAULT_MODULES_DIR.into(),
            hooks_dir: DEFAULT_HOOKS_DIR.into(),
            health_check: None,
            verify_timeout: Duration::from_secs(300),
            reboot_command: DEFAULT_REBOOT_COMMAND.into(),
            reboot_timeout: Duration::from_secs(600),
            file_allow: Vec::new(),
            apps_dir: DEFAULT_APPS_DIR.into(),
            provides: BTreeMap::new(),
            download_retries: 10,
            download_backoff: Duration::from_secs(5),
            download_backoff_max: Duration::from_secs(300),
            max_artifact_size: 4 << 30,
            hook_timeout: Duration::from_secs(300),
            hook_retry_interval: Duration::from_secs(60),
            hook_retry_max: 30,
            module_timeout: Duration::from_secs(3600),
            file_root: None,
        }
    }
}

/// The drop-in folder of a config file: `<dir>/config.d`.
pub fn dropin_dir(path: &Path) -> PathBuf {
    path.parent().unwrap_or(Path::new(".")).join("config.d")
}

/// Reads `path` and its drop-ins, merges and checks them.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let mut files = vec![path.to_path_buf()];
    let dir = dropin_dir(path);
    match std::fs::read_dir(&dir) {
        Ok(entries) => {
            let mut dropins: Vec<PathBuf> = entries
                .filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "toml") && p.is_file())
                .collect();
            dropins.sort();
            files.extend(dropins);
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => return Err(ConfigError::Read { path: dir, source }),
    }
    let mut sources = Vec::new();
    for f in &files {
        let text = std::fs::read_to_string(f).map_err(|source| ConfigError::Read { path: f.clone(), source })?;
        sources.push((f.clone(), text));
    }
    from_sources(&sources)
}

/// Where the enrollment token comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    Value(String),
    /// Read when the agent enrolls (not at start: the file may be removed once enrolled).
    File(PathBuf),
}

impl Config {
    /// What this configuration switches on, as `up/hello` names it
    /// ([`drover_proto::device::CAPABILITIES`], in that order): `update` with `[update]`
    /// device_type; `telemetry` and `rules` unless `[telemetry] enabled = false`; `logs` when
    /// telemetry is on and logs on demand have a source (`journal` or `log_files`); `terminal`,
    /// `files`, `forward` as `[remote]` switches them on.
    pub fn capabilities(&self) -> Vec<String> {
        use drover_proto::device::{
            CAP_FILES, CAP_FORWARD, CAP_LOGS, CAP_RULES, CAP_TELEMETRY, CAP_TERMINAL, CAP_UPDATE,
        };
        let t = &self.telemetry;
        let r = &self.remote;
        [
            (CAP_UPDATE, self.update.is_some()),
            (CAP_TELEMETRY, t.enabled),
            (CAP_RULES, t.enabled),
            (CAP_LOGS, t.enabled && (t.journal || !t.log_files.is_empty())),
            (CAP_TERMINAL, r.terminal),
            (CAP_FILES, r.files),
            (CAP_FORWARD, r.forward),
        ]
        .into_iter()
        .filter(|(_, on)| *on)
        .map(|(name, _)| name.to_string())
        .collect()
    }

    /// The enrollment token, reading `enrollment_token_file` now if that is where it is.
    pub fn enrollment_token(&self) -> Result<Option<String>, ConfigError> {
        match &self.enrollment_token {
            None => Ok(None),
            Some(TokenSource::Value(t)) => Ok(Some(t.clone())),
            Some(TokenSource::File(path)) => {
                let token =
                    std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.clone(), source })?;
                let token = token.trim();
                if token.is_empty() {
                    return Err(ConfigError::Invalid(format!(
                        "enrollment_token_file {}: file is empty",
                        path.display()
                    )));
                }
                Ok(Some(token.to_string()))
            }
        }
    }
}

/// Merges already-read files (`(path, text)`, main file first) into a checked config. Pure.
pub fn from_sources(sources: &[(PathBuf, String)]) -> Result<Config, ConfigError> {
    let mut merged = toml::Table::new();
    for (path, text) in sources {
        let table: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| ConfigError::Parse { path: path.clone(), message: e.to_string() })?;
        // Each file on its own first, so that an unknown key is reported with its file.
        RawConfig::deserialize(toml::Value::Table(table.clone()))
            .map_err(|e| ConfigError::Parse { path: path.clone(), message: e.to_string() })?;
        merge(&mut merged, table);
    }
    let main = sources.first().map(|(p, _)| p.clone()).unwrap_or_default();
    let raw = RawConfig::deserialize(toml::Value::Table(merged))
        .map_err(|e| ConfigError::Parse { path: main.clone(), message: e.to_string() })?;
    let dropins = sources.iter().skip(1).map(|(p, _)| p.clone()).collect();
    check(raw, main, dropins)
}

/// Later wins; tables merge key by key.
fn merge(into: &mut toml::Table, from: toml::Table) {
    for (k, v) in from {
        match (into.get_mut(&k), v) {
            (Some(toml::Value::Table(a)), toml::Value::Table(b)) => merge(a, b),
            (_, v) => {
                into.insert(k, v);
            }
        }
    }
}

fn secs(name: &str, v: Option<u64>, default: u64, min: u64, max: u64) -> Result<Duration, ConfigError> {
    let v = v.unwrap_or(default);
    if v < min || v > max {
        return Err(ConfigError::Invalid(format!("{name} = {v}: must be between {min} and {max}")));
    }
    Ok(Duration::from_secs(v))
}

fn check(raw: RawConfig, path: PathBuf, dropins: Vec<PathBuf>) -> Result<Config, ConfigError> {
    let invalid = |m: String| ConfigError::Invalid(m);
    let mqtt_url =
        raw.mqtt_url.ok_or_else(|| invalid("mqtt_url is not set (e.g. mqtts://drover.example:8883)".into()))?;
    let broker = BrokerAddr::parse(&mqtt_url).map_err(|e| invalid(format!("mqtt_url {e}")))?;
    let server_url = match raw.server_url {
        Some(u) => {
            let u = u.trim_end_matches('/').to_string();
            if !(u.starts_with("https://") || u.starts_with("http://")) {
                return Err(invalid(format!("server_url {u:?} must start with https:// (or http:// for development)")));
            }
            let rest = u.split_once("://").map(|(_, r)| r).unwrap_or("");
            split_host_port(rest.split('/').next().unwrap_or(""), 443)
                .map_err(|e| invalid(format!("server_url {u:?}: {e}")))?;
            Some(u)
        }
        None => None,
    };
    let enrollment_token = match (raw.enrollment_token, raw.enrollment_token_file) {
        (Some(_), Some(_)) => {
            return Err(invalid("set enrollment_token or enrollment_token_file, not both".into()));
        }
        (Some(t), None) if t.trim().is_empty() => return Err(invalid("enrollment_token is empty".into())),
        (Some(t), None) => Some(TokenSource::Value(t.trim().to_string())),
        (None, Some(f)) => Some(TokenSource::File(f)),
        (None, None) => None,
    };
    let identity = raw.identity.unwrap_or_default();
    check_identity(&identity).map_err(|e| invalid(format!("[identity]: {e}")))?;
    let log_level = match raw.log_level {
        Some(l) => LogLevel::parse(&l)
            .ok_or_else(|| invalid(format!("log_level {l:?}: expected error, warn, info, debug or trace")))?,
        None => LogLevel::Info,
    };
    let update = match raw.update {
        Some(u) => check_update(u)?,
        None => None,
    };
    let remote = check_remote(raw.remote.unwrap_or_default())?;
    let data_dir = raw.data_dir.unwrap_or_else(|| DEFAULT_DATA_DIR.into());
    let telemetry = crate::telemetry::config::check(raw.telemetry, &data_dir)?;
    Ok(Config {
        path,
        dropins,
        server_url,
        broker,
        mqtt_url,
        ca_file: raw.ca_file.unwrap_or_else(|| DEFAULT_CA_FILE.into()),
        data_dir,
        enrollment_token,
        identity,
        heartbeat_interval: secs("heartbeat_interval_secs", raw.heartbeat_interval_secs, 60, 1, 86_400)?,
        inventory_interval: secs("inventory_interval_secs", raw.inventory_interval_secs, 3600, 1, 7 * 86_400)?,
        keepalive: secs("keepalive_secs", raw.keepalive_secs, 60, 5, 65_535)?,
        inventory_scripts_dir: raw.inventory_scripts_dir.unwrap_or_else(|| DEFAULT_INVENTORY_SCRIPTS_DIR.into()),
        inventory_script_timeout: secs("inventory_script_timeout_secs", raw.inventory_script_timeout_secs, 10, 1, 600)?,
        log_level,
        update,
        remote,
        telemetry,
    })
}

fn check_remote(raw: RawRemote) -> Result<RemoteConfig, ConfigError> {
    let invalid = |m: String| ConfigError::Invalid(format!("[remote] {m}"));
    let d = RemoteConfig::default();
    let file_paths = raw.file_paths.unwrap_or_default();
    if let Some(p) = file_paths.iter().find(|p| !p.is_absolute()) {
        return Err(invalid(format!("file_paths {}: must be an absolute path", p.display())));
    }
    let forward_allow = raw.forward_allow.unwrap_or_default();
    for a in &forward_allow {
        let ok = a
            .rsplit_once(':')
            .is_some_and(|(h, p)| !h.is_empty() && (p == "*" || drover_proto::remote::Target::parse(a).is_ok()));
        if !ok {
            return Err(invalid(format!("forward_allow {a:?}: expected host:port or host:*")));
        }
    }
    if let Some(u) = &raw.user
        && (u.is_empty() || u.len() > 32 || u.contains(['\0', ':', '/']))
    {
        return Err(invalid(format!("user {u:?} is not a user name")));
    }
    let max_sessions = raw.max_sessions.unwrap_or(d.max_sessions);
    if !(1..=64).contains(&max_sessions) {
        return Err(invalid(format!("max_sessions = {max_sessions}: must be between 1 and 64")));
    }
    let secs_in = |name: &str, v: Option<u64>, default: Duration, max: u64| {
        secs(name, v, default.as_secs(), 1, max).map_err(|e| invalid(e.to_string()))
    };
    Ok(RemoteConfig {
        terminal: raw.terminal.unwrap_or(false),
        files: raw.files.unwrap_or(false),
        forward: raw.forward.unwrap_or(false),
        user: raw.user,
        allow_root: raw.allow_root.unwrap_or(false),
        file_paths,
        max_file_size: raw.max_file_size.unwrap_or(d.max_file_size),
        forward_allow,
        idle_timeout: secs_in("idle_timeout_secs", raw.idle_timeout_secs, d.idle_timeout, 7 * 86_400)?,
        max_duration: secs_in("max_duration_secs", raw.max_duration_secs, d.max_duration, 30 * 86_400)?,
        max_sessions,
        home: None,
    })
}

fn check_update(raw: RawUpdate) -> Result<Option<UpdateConfig>, ConfigError> {
    let invalid = |m: String| ConfigError::Invalid(format!("[update] {m}"));
    let Some(device_type) = raw.device_type else {
        return Ok(None);
    };
    if device_type.is_empty() || device_type.len() > 128 || device_type.chars().any(char::is_control) {
        return Err(invalid(format!("device_type {device_type:?} must be 1 to 128 characters")));
    }
    let d = UpdateConfig::new(device_type);
    let command = |name: &str, v: Option<String>| -> Result<Option<String>, ConfigError> {
        match v {
            Some(c) if c.trim().is_empty() => Err(invalid(format!("{name} is empty"))),
            other => Ok(other),
        }
    };
    let secs_in = |name: &str, v: Option<u64>, default: Duration, min: u64, max: u64| {
        secs(name, v, default.as_secs(), min, max).map_err(|e| invalid(e.to_string()))
    };
    let file_allow = raw.file_allow.unwrap_or_default();
    if let Some(p) = file_allow.iter().find(|p| !p.is_absolute()) {
        return Err(invalid(format!("file_allow {}: must be an absolute path", p.display())));
    }
    for (name, p) in [
        ("root_file", &raw.root_file),
        ("modules_dir", &raw.modules_dir),
        ("hooks_dir", &raw.hooks_dir),
        ("apps_dir", &raw.apps_dir),
    ] {
        if let Some(p) = p
            && !p.is_absolute()
        {
            return Err(invalid(format!("{name} {}: must be an absolute path", p.display())));
        }
    }
    let provides = raw.provides.unwrap_or_default();
    if let Some(k) = provides
        .keys()
        .find(|k| k.is_empty() || k.len() > 128 || k.chars().any(|c| c.is_whitespace() || c.is_control()))
    {
        return Err(invalid(format!("provides key {k:?} must be 1 to 128 characters without whitespace")));
    }
    let max_artifact_size = raw.max_artifact_size.unwrap_or(d.max_artifact_size);
    if max_artifact_size < 1024 {
        return Err(invalid(format!("max_artifact_size = {max_artifact_size}: must be at least 1024 bytes")));
    }
    let download_retries = raw.download_retries.unwrap_or(d.download_retries);
    if download_retries > 1000 {
        return Err(invalid(format!("download_retries = {download_retries}: must be between 0 and 1000")));
    }
    let hook_retry_max = raw.hook_retry_max.unwrap_or(d.hook_retry_max);
    if hook_retry_max > 1000 {
        return Err(invalid(format!("hook_retry_max = {hook_retry_max}: must be between 0 and 1000")));
    }
    let download_backoff = secs_in("download_backoff_secs", raw.download_backoff_secs, d.download_backoff, 1, 3600)?;
    let download_backoff_max =
        secs_in("download_backoff_max_secs", raw.download_backoff_max_secs, d.download_backoff_max, 1, 86_400)?;
    if download_backoff_max < download_backoff {
        return Err(invalid("download_backoff_max_secs must not be below download_backoff_secs".into()));
    }
    Ok(Some(UpdateConfig {
        root_file: raw.root_file.unwrap_or(d.root_file),
        modules_dir: raw.modules_dir.unwrap_or(d.modules_dir),
        hooks_dir: raw.hooks_dir.unwrap_or(d.hooks_dir),
        health_check: command("health_check", raw.health_check)?,
        verify_timeout: secs_in("verify_timeout_secs", raw.verify_timeout_secs, d.verify_timeout, 1, 86_400)?,
        reboot_command: command("reboot_command", raw.reboot_command)?.unwrap_or(d.reboot_command),
        reboot_timeout: secs_in("reboot_timeout_secs", raw.reboot_timeout_secs, d.reboot_timeout, 1, 86_400)?,
        file_allow,
        apps_dir: raw.apps_dir.unwrap_or(d.apps_dir),
        provides,
        download_retries,
        download_backoff,
        download_backoff_max,
        max_artifact_size,
        hook_timeout: secs_in("hook_timeout_secs", raw.hook_timeout_secs, d.hook_timeout, 1, 86_400)?,
        hook_retry_interval: secs_in(
            "hook_retry_interval_secs",
            raw.hook_retry_interval_secs,
            d.hook_retry_interval,
            1,
            86_400,
        )?,
        hook_retry_max,
        module_timeout: secs_in("module_timeout_secs", raw.module_timeout_secs, d.module_timeout, 1, 7 * 86_400)?,
        file_root: None,
        device_type: d.device_type,
    }))
}

/// Identity attributes as the enrollment endpoint accepts them: 1 to 16, keys as for inventory,
/// values 1 to 256 bytes.
pub fn check_identity(identity: &BTreeMap<String, String>) -> Result<(), String> {
    if identity.len() > 16 {
        return Err(format!("{} attributes, at most 16", identity.len()));
    }
    drover_proto::device::check_inventory(identity)?;
    if let Some((k, _)) = identity.iter().find(|(_, v)| v.is_empty() || v.len() > 256) {
        return Err(format!("{k:?}: value must be 1 to 256 bytes"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn src(files: &[(&str, &str)]) -> Vec<(PathBuf, String)> {
        files.iter().map(|(p, t)| (PathBuf::from(p), t.to_string())).collect()
    }

    const MAIN: &str = r#"
server_url = "https://drover.example:8443/"
mqtt_url = "mqtts://drover.example"
[identity]
serial = "SN-1"
"#;

    #[test]
    fn defaults_and_main_file() {
        let c = from_sources(&src(&[("/etc/drover/agent.toml", MAIN)])).unwrap();
        assert_eq!(c.server_url.as_deref(), Some("https://drover.example:8443"));
        assert_eq!(c.broker, BrokerAddr { host: "drover.example".into(), port: 8883 });
        assert_eq!(c.data_dir, PathBuf::from("/var/lib/drover"));
        assert_eq!(c.ca_file, PathBuf::from("/etc/drover/ca.crt"));
        assert_eq!(c.heartbeat_interval, Duration::from_secs(60));
        assert_eq!(c.keepalive, Duration::from_secs(60));
        assert_eq!(c.inventory_scripts_dir, PathBuf::from("/etc/drover/inventory.d"));
        assert_eq!(c.log_level, LogLevel::Info);
        assert_eq!(c.identity["serial"], "SN-1");
        assert!(c.dropins.is_empty());
    }

    /// Bad input: two drop-ins overriding the same scalar and extending a table.
    #[test]
    fn dropins_merge_in_order_later_wins_tables_merge() {
        let c = from_sources(&src(&[
            ("/etc/drover/agent.toml", MAIN),
            ("/etc/drover/config.d/10-site.toml", "heartbeat_interval_secs = 30\n[identity]\nsite = \"a\"\n"),
            ("/etc/drover/config.d/20-local.toml", "heartbeat_interval_secs = 15\nmqtt_url = \"mqtts://[::1]:1884\"\n"),
        ]))
        .unwrap();
        assert_eq!(c.heartbeat_interval, Duration::from_secs(15));
        assert_eq!(c.broker, BrokerAddr { host: "::1".into(), port: 1884 });
        assert_eq!(c.identity.len(), 2);
        assert_eq!(c.identity["serial"], "SN-1");
        assert_eq!(c.identity["site"], "a");
        assert_eq!(c.dropins.len(), 2);
    }

    /// Bad input: a misspelled key in a drop-in; the error names the key and the file.
    #[test]
    fn unknown_key_names_key_and_file() {
        let err = from_sources(&src(&[
            ("/etc/drover/agent.toml", MAIN),
            ("/etc/drover/config.d/50-typo.toml", "heartbeat_intervall_secs = 5\n"),
        ]))
        .unwrap_err()
        .to_string();
        assert!(err.contains("/etc/drover/config.d/50-typo.toml"), "{err}");
        assert!(err.contains("heartbeat_intervall_secs"), "{err}");
    }

    /// Bad inputs: missing, malformed and out-of-range values each get a message naming them.
    #[test]
    fn invalid_values_are_explained() {
        let cases: &[(&str, &str)] = &[
            ("server_url = \"https://x\"\n", "mqtt_url is not set"),
            ("mqtt_url = \"mqtt://x:1883\"\n", "mqtts://"),
            ("mqtt_url = \"mqtts://x:99999\"\n", "bad port"),
            ("mqtt_url = \"mqtts://x\"\nserver_url = \"ftp://x\"\n", "server_url"),
            ("mqtt_url = \"mqtts://x\"\nkeepalive_secs = 0\n", "keepalive_secs = 0"),
            ("mqtt_url = \"mqtts://x\"\nheartbeat_interval_secs = \"60\"\n", "heartbeat_interval_secs"),
            ("mqtt_url = \"mqtts://x\"\nlog_level = \"loud\"\n", "log_level"),
            ("mqtt_url = \"mqtts://x\"\nenrollment_token = \"a\"\nenrollment_token_file = \"/t\"\n", "not both"),
            ("mqtt_url = \"mqtts://x\"\n[identity]\n\"bad key\" = \"x\"\n", "[identity]"),
            ("mqtt_url = \"mqtts://x\"\n[identity]\nserial = \"\"\n", "1 to 256"),
            ("mqtt_url = = 1\n", "agent.toml"),
        ];
        for (text, want) in cases {
            let err = from_sources(&src(&[("/etc/drover/agent.toml", text)])).unwrap_err().to_string();
            assert!(err.contains(want), "{text:?}: {err:?} should mention {want:?}");
        }
    }

    #[test]
    fn updates_are_off_without_device_type_and_defaults_apply() {
        let c = from_sources(&src(&[("/etc/drover/agent.toml", MAIN)])).unwrap();
        assert!(c.update.is_none());
        // A table without device_type still leaves updates off.
        let c =
            from_sources(&src(&[("/etc/drover/agent.toml", &format!("{MAIN}\n[update]\napps_dir = \"/srv/apps\"\n"))]))
                .unwrap();
        assert!(c.update.is_none());
        let c = from_sources(&src(&[
            ("/etc/drover/agent.toml", &format!("{MAIN}\n[update]\ndevice_type = \"rpi4\"\n")),
            (
                "/etc/drover/config.d/10-update.toml",
                "[update]\nfile_allow = [\"/etc/app/\"]\nhealth_check = \"systemctl is-active app\"\nverify_timeout_secs = 60\n[update.provides]\n\"os.version\" = \"12\"\n",
            ),
        ]))
        .unwrap();
        let u = c.update.unwrap();
        assert_eq!(u.device_type, "rpi4");
        assert_eq!(u.root_file, PathBuf::from("/etc/drover/root.json"));
        assert_eq!(u.reboot_command, "systemctl reboot");
        assert_eq!(u.file_allow, vec![PathBuf::from("/etc/app/")]);
        assert_eq!(u.health_check.as_deref(), Some("systemctl is-active app"));
        assert_eq!(u.verify_timeout, Duration::from_secs(60));
        assert_eq!(u.provides["os.version"], "12");
        assert_eq!(u.download_retries, 10);
        assert_eq!(u.hooks_dir, PathBuf::from("/etc/drover/hooks.d"));
    }

    /// Bad inputs in `[update]`: each named.
    #[test]
    fn invalid_update_values_are_explained() {
        let cases: &[(&str, &str)] = &[
            ("device_type = \"\"\n", "device_type"),
            ("device_type = \"x\"\nfile_allow = [\"etc/app\"]\n", "file_allow etc/app: must be an absolute path"),
            ("device_type = \"x\"\napps_dir = \"apps\"\n", "apps_dir"),
            ("device_type = \"x\"\nverify_timeout_secs = 0\n", "verify_timeout_secs = 0"),
            ("device_type = \"x\"\nreboot_command = \" \"\n", "reboot_command is empty"),
            ("device_type = \"x\"\nmax_artifact_size = 10\n", "max_artifact_size"),
            (
                "device_type = \"x\"\ndownload_backoff_secs = 60\ndownload_backoff_max_secs = 10\n",
                "download_backoff_max_secs",
            ),
            ("device_type = \"x\"\nrollback = true\n", "rollback"),
            ("device_type = \"x\"\n[update.provides]\n\"a b\" = \"1\"\n", "provides key"),
        ];
        for (text, want) in cases {
            let text = format!("mqtt_url = \"mqtts://x\"\n[update]\n{text}");
            let err = from_sources(&src(&[("/etc/drover/agent.toml", &text)])).unwrap_err().to_string();
            assert!(err.contains(want), "{text:?}: {err:?} should mention {want:?}");
        }
    }

    #[test]
    fn files_on_disk_with_dropins_and_token_file() {
        let dir = std::env::temp_dir().join(format!("drover-agent-cfg-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("config.d")).unwrap();
        let token = dir.join("token");
        std::fs::write(&token, "dre_secret\n").unwrap();
        std::fs::write(dir.join("agent.toml"), MAIN).unwrap();
        std::fs::write(dir.join("config.d/b.toml"), format!("enrollment_token_file = {:?}\n", token)).unwrap();
        std::fs::write(dir.join("config.d/a.toml"), "keepalive_secs = 30\n").unwrap();
        std::fs::write(dir.join("config.d/ignored.conf"), "nonsense").unwrap();
        let c = load(&dir.join("agent.toml")).unwrap();
        assert_eq!(c.enrollment_token().unwrap().as_deref(), Some("dre_secret"));
        std::fs::write(&token, "\n").unwrap();
        assert!(c.enrollment_token().unwrap_err().to_string().contains("empty"));
        assert_eq!(c.keepalive, Duration::from_secs(30));
        assert_eq!(c.dropins, vec![dir.join("config.d/a.toml"), dir.join("config.d/b.toml")]);
        let err = load(&dir.join("missing.toml")).unwrap_err().to_string();
        assert!(err.contains("missing.toml"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The hello's capabilities follow what the configuration switches on.
    #[test]
    fn capabilities_follow_the_configuration() {
        let caps = |extra: &str| {
            from_sources(&src(&[("/etc/drover/agent.toml", MAIN), ("/etc/drover/config.d/c.toml", extra)]))
                .unwrap()
                .capabilities()
        };
        // Defaults: telemetry (and so rules) on; no updates, no log source, no remote access.
        assert_eq!(caps(""), ["telemetry", "rules"]);
        assert_eq!(caps("[telemetry]\nenabled = false\n"), Vec::<String>::new());
        assert_eq!(caps("[update]\ndevice_type = \"rpi4\"\n"), ["update", "telemetry", "rules"]);
        assert_eq!(caps("[telemetry]\njournal = true\n"), ["telemetry", "rules", "logs"]);
        assert_eq!(caps("[telemetry.log_files]\napp = \"/var/log/app.log\"\n"), ["telemetry", "rules", "logs"]);
        // Logs on demand are part of telemetry: off with it, whatever the sources.
        assert_eq!(caps("[telemetry]\nenabled = false\njournal = true\n"), Vec::<String>::new());
        assert_eq!(caps("[remote]\nterminal = true\n"), ["telemetry", "rules", "terminal"]);
        let all = caps(
            "[update]\ndevice_type = \"x\"\n[telemetry]\njournal = true\n\
             [remote]\nterminal = true\nfiles = true\nforward = true\n",
        );
        assert_eq!(all, drover_proto::device::CAPABILITIES);
    }

    /// Bad input: a relative file path, a forward target without a port, a user name with a
    /// slash, zero sessions, an unknown key in `[remote]`.
    #[test]
    fn remote_defaults_refuse_everything_and_bad_values_are_named() {
        let c = from_sources(&src(&[("/etc/drover/agent.toml", MAIN)])).unwrap();
        assert_eq!(c.remote, RemoteConfig::default());
        assert!(!c.remote.terminal && !c.remote.files && !c.remote.forward && !c.remote.allow_root);
        assert!(c.remote.file_paths.is_empty() && c.remote.forward_allow.is_empty());
        let on = "[remote]\nterminal = true\nfiles = true\nuser = \"op\"\nfile_paths = [\"/srv/data\"]\n\
                  forward_allow = [\"127.0.0.1:80\", \"localhost:*\"]\nidle_timeout_secs = 60\n";
        let c =
            from_sources(&src(&[("/etc/drover/agent.toml", MAIN), ("/etc/drover/config.d/remote.toml", on)])).unwrap();
        assert!(c.remote.terminal && c.remote.files && !c.remote.forward);
        assert_eq!(c.remote.user.as_deref(), Some("op"));
        assert_eq!(c.remote.idle_timeout, Duration::from_secs(60));
        assert_eq!(c.remote.forward_allow.len(), 2);
        for (bad, what) in [
            ("[remote]\nfile_paths = [\"srv\"]\n", "file_paths"),
            ("[remote]\nforward_allow = [\"localhost\"]\n", "forward_allow"),
            ("[remote]\nuser = \"a/b\"\n", "user"),
            ("[remote]\nmax_sessions = 0\n", "max_sessions"),
            ("[remote]\nshell = \"/bin/sh\"\n", "shell"),
        ] {
            let err = from_sources(&src(&[("/etc/drover/agent.toml", MAIN), ("/etc/drover/config.d/r.toml", bad)]))
                .unwrap_err()
                .to_string();
            assert!(err.contains(what), "{bad}: {err}");
        }
    }
}
