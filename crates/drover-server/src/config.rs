//! droverd's configuration: built-in defaults, then `drover.toml` in the data directory, then
//! `DROVER_*` environment variables, then command-line flags — each overriding the one before.

use std::path::{Path, PathBuf};

use serde::Deserialize;

pub const CONFIG_FILE: &str = "drover.toml";
pub const SQLITE_FILE: &str = "drover.db";

/// The commented default configuration, as `droverd config generate` prints it and the first
/// start writes it.
pub const DEFAULT_TOML: &str = r#"# droverd configuration.
#
# Every setting can also be given as an environment variable DROVER_<NAME IN CAPITALS>
# (for example DROVER_HTTP_LISTEN) and some as command-line flags (droverd --help).
# Flags override the environment, which overrides this file.

# Address of the web UI and REST API.
http_listen = "127.0.0.1:8080"

# Where state is kept. Empty: the SQLite file drover.db in the data directory.
# PostgreSQL: "postgres://USER:PASSWORD@HOST:5432/DATABASE".
database_url = ""

# Log filter: error, warn, info, debug, trace, or per module ("info,drover_server=debug").
log = "info"

# Largest request body the API accepts, in bytes.
max_body_bytes = 1048576

# A web session ends after this many seconds without use (and after 7 days in any case).
session_idle_timeout_secs = 43200

# The fleet CA that issues device certificates. Empty: the CA made at first start in
# DATA_DIR/ca/. Give both files (PEM) to use your own CA — and to let several droverd
# replicas issue from one CA.
ca_cert_file = ""
ca_key_file = ""

# Devices: the MQTT 5 broker built into droverd (mutual TLS, fleet-CA client certificates)
# listens here. Empty: no embedded broker (then set mqtt_url).
mqtt_listen = "0.0.0.0:8883"

# An external MQTT 5 broker to consume device traffic from instead of the embedded one
# (mqtts://HOST:PORT; see docs/mosquitto.md). droverd connects with a service certificate:
# mqtt_client_cert_file/mqtt_client_key_file, or one issued by the fleet CA when empty.
# mqtt_ca_file verifies the broker (empty: the fleet CA).
mqtt_url = ""
mqtt_client_cert_file = ""
mqtt_client_key_file = ""
mqtt_ca_file = ""

# Devices enroll (and later download artifacts) over HTTPS here, with a server certificate
# from the fleet CA for the names below. Empty: off.
device_listen = "0.0.0.0:8443"

# Development only: also take enrollment on the plain-HTTP API above (http_listen), where a
# device's enrollment token travels in clear text. Off: devices enroll only on the HTTPS
# device endpoint (device_listen), and the API answers them with where to go.
insecure_enroll_over_http = false

# Enrollment without proof (no token, no pre-authorization) makes a device that waits for an
# operator. Each client address may ask for at most this many such devices a minute; more
# get 429 with Retry-After. Requests with a token or pre-authorization (a factory line) have
# their own, higher limit per address. 0: no limit.
enroll_pending_per_minute = 10
enroll_with_proof_per_minute = 600

# At most this many devices of an organization wait for an operator at once; more claims
# get 429 until some are accepted, rejected or expired. 0: no limit.
max_pending_devices = 1000

# A device nobody accepted or rejected is removed after this many days (0: never).
pending_expiry_days = 7

# Names and addresses devices use to reach this server: the device-facing certificate is
# valid for these (and for this machine's hostname).
public_names = ["localhost", "127.0.0.1"]

# Where artifact files are kept. Empty: DATA_DIR/artifacts/. Another directory: "file:///PATH".
# An S3-compatible bucket: "s3://BUCKET/PREFIX", with credentials, region and endpoint from
# AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION, AWS_ENDPOINT (and AWS_ALLOW_HTTP=true
# for an endpoint without TLS).
artifact_store = ""

# Largest artifact accepted by upload, in bytes (4 GiB).
max_artifact_size = 4294967296

# Remote access (terminal, files, port forwarding): a session ends after this many seconds
# without data either way, and after the maximum duration in any case.
remote_idle_timeout_secs = 900
remote_max_duration_secs = 14400
# A session whose droverd stopped without ending it (a crash, a kill, a power cut) is ended as
# lost once no droverd has vouched for it for this many seconds.
remote_lost_after_secs = 120

# Alerts: seconds between evaluations (one replica evaluates at a time).
alert_interval_secs = 5

# Email notifications: the SMTP server (HOST:PORT; empty: email channels are off), how to
# secure the connection (starttls, tls, or none for a local relay), the From address and, if
# the server wants AUTH, the username and password (better: DROVER_SMTP_PASSWORD).
smtp_server = ""
smtp_security = "starttls"
smtp_from = ""
smtp_username = ""
smtp_password = ""

# Extra CA certificates (PEM) to trust for webhooks and SMTP, besides the system's. Empty: none.
notify_ca_file = ""

# Webhook and Slack channels may not point at loopback, private, link-local (cloud metadata)
# or other internal addresses, checked after DNS resolution (docs/alerts.md). Internal
# receivers to allow all the same: host names, addresses or CIDR blocks, e.g.
# ["hooks.corp.example", "10.20.0.0/16"].
notify_allow_hosts = []

# Telemetry (docs/telemetry-server.md): how long raw points, 1-minute and 1-hour rollups and
# events are kept (days); a point arriving more than late_after_secs after it was measured is
# stored as late; /metrics/fleet labels fleet aggregates by these tag keys. A TOML table: put
# it at the end of this file.
# [telemetry]
# late_after_secs = 120
# retention_raw_days = 7
# retention_1m_days = 30
# retention_1h_days = 400
# retention_events_days = 30
# prometheus_tags = ["site"]
# prometheus_metrics = ["cpu.percent", "mem.used_percent"]
# Metric series (device + name) a device, and all devices of an organization, may have; the
# points of a new name past a cap are left out and counted in the batch's acknowledgement.
# max_series_per_device = 1000
# max_series_per_org = 1000000

# Mark session cookies Secure. Set this when droverd is reached over HTTPS through a
# reverse proxy that does not send X-Forwarded-Proto.
secure_cookies = false
"#;

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub data_dir: PathBuf,
    pub http_listen: String,
    pub database_url: String,
    pub log: String,
    pub max_body_bytes: usize,
    pub session_idle_timeout_secs: u64,
    pub secure_cookies: bool,
    pub ca_cert_file: String,
    pub ca_key_file: String,
    pub mqtt_listen: String,
    pub mqtt_url: String,
    pub mqtt_client_cert_file: String,
    pub mqtt_client_key_file: String,
    pub mqtt_ca_file: String,
    pub device_listen: String,
    pub insecure_enroll_over_http: bool,
    pub enroll_pending_per_minute: u32,
    pub enroll_with_proof_per_minute: u32,
    pub max_pending_devices: u64,
    pub pending_expiry_days: u32,
    pub public_names: Vec<String>,
    pub artifact_store: String,
    pub max_artifact_size: u64,
    pub telemetry: crate::telemetry::TelemetryConfig,
    pub alerts: crate::alerts::AlertsConfig,
    pub remote_idle_timeout_secs: u64,
    pub remote_max_duration_secs: u64,
    pub remote_lost_after_secs: u64,
}

/// The default largest artifact: 4 GiB.
pub const DEFAULT_MAX_ARTIFACT_SIZE: u64 = 4 * 1024 * 1024 * 1024;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    http_listen: Option<String>,
    database_url: Option<String>,
    log: Option<String>,
    max_body_bytes: Option<usize>,
    session_idle_timeout_secs: Option<u64>,
    secure_cookies: Option<bool>,
    ca_cert_file: Option<String>,
    ca_key_file: Option<String>,
    mqtt_listen: Option<String>,
    mqtt_url: Option<String>,
    mqtt_client_cert_file: Option<String>,
    mqtt_client_key_file: Option<String>,
    mqtt_ca_file: Option<String>,
    device_listen: Option<String>,
    insecure_enroll_over_http: Option<bool>,
    enroll_pending_per_minute: Option<u32>,
    enroll_with_proof_per_minute: Option<u32>,
    max_pending_devices: Option<u64>,
    pending_expiry_days: Option<u32>,
    public_names: Option<Vec<String>>,
    artifact_store: Option<String>,
    max_artifact_size: Option<u64>,
    telemetry: Option<crate::telemetry::TelemetryFile>,
    alert_interval_secs: Option<u64>,
    smtp_server: Option<String>,
    smtp_security: Option<String>,
    smtp_from: Option<String>,
    smtp_username: Option<String>,
    smtp_password: Option<String>,
    notify_ca_file: Option<String>,
    notify_allow_hosts: Option<Vec<String>>,
    remote_idle_timeout_secs: Option<u64>,
    remote_max_duration_secs: Option<u64>,
    remote_lost_after_secs: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("invalid configuration in {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid value {value:?} for {name}: {message}")]
    Env { name: String, value: String, message: String },
}

/// Values given on the command line; `None` leaves the lower layers in force.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub http_listen: Option<String>,
    pub database_url: Option<String>,
    pub mqtt_listen: Option<String>,
    pub mqtt_url: Option<String>,
    pub device_listen: Option<String>,
    pub artifact_store: Option<String>,
    pub max_artifact_size: Option<u64>,
    pub telemetry: crate::telemetry::TelemetryFlags,
}

impl Config {
    /// Defaults for a data directory, with nothing read from disk or the environment.
    pub fn defaults(data_dir: &Path) -> Config {
        Config {
            data_dir: data_dir.to_path_buf(),
            http_listen: "127.0.0.1:8080".into(),
            database_url: String::new(),
            log: "info".into(),
            max_body_bytes: 1024 * 1024,
            session_idle_timeout_secs: 12 * 3600,
            secure_cookies: false,
            ca_cert_file: String::new(),
            ca_key_file: String::new(),
            mqtt_listen: "0.0.0.0:8883".into(),
            mqtt_url: String::new(),
            mqtt_client_cert_file: String::new(),
            mqtt_client_key_file: String::new(),
            mqtt_ca_file: String::new(),
            device_listen: "0.0.0.0:8443".into(),
            insecure_enroll_over_http: false,
            enroll_pending_per_minute: 10,
            enroll_with_proof_per_minute: 600,
            max_pending_devices: 1000,
            pending_expiry_days: 7,
            public_names: vec!["localhost".into(), "127.0.0.1".into()],
            artifact_store: String::new(),
            max_artifact_size: DEFAULT_MAX_ARTIFACT_SIZE,
            telemetry: crate::telemetry::TelemetryConfig::default(),
            alerts: crate::alerts::AlertsConfig::default(),
            remote_idle_timeout_secs: 900,
            remote_max_duration_secs: 4 * 3600,
            remote_lost_after_secs: 120,
        }
    }

    /// Reads all layers. `env` is the process environment (a parameter so tests can give their own).
    pub fn load(
        data_dir: &Path,
        env: &dyn Fn(&str) -> Option<String>,
        flags: &Overrides,
    ) -> Result<Config, ConfigError> {
        let mut c = Config::defaults(data_dir);
        let path = data_dir.join(CONFIG_FILE);
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                let f: FileConfig = toml::from_str(&text)
                    .map_err(|e| ConfigError::Parse { path: path.clone(), message: e.message().to_string() })?;
                c.apply_file(f);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(ConfigError::Read { path, source }),
        }
        c.apply_env(env)?;
        if let Some(v) = &flags.http_listen {
            c.http_listen = v.clone();
        }
        if let Some(v) = &flags.database_url {
            c.database_url = v.clone();
        }
        if let Some(v) = &flags.mqtt_listen {
            c.mqtt_listen = v.clone();
        }
        if let Some(v) = &flags.mqtt_url {
            c.mqtt_url = v.clone();
        }
        if let Some(v) = &flags.device_listen {
            c.device_listen = v.clone();
        }
        if let Some(v) = &flags.artifact_store {
            c.artifact_store = v.clone();
        }
        if let Some(v) = flags.max_artifact_size {
            c.max_artifact_size = v;
        }
        c.telemetry.apply_flags(&flags.telemetry);
        Ok(c)
    }

    fn apply_file(&mut self, f: FileConfig) {
        if let Some(v) = f.http_listen {
            self.http_listen = v;
        }
        if let Some(v) = f.database_url {
            self.database_url = v;
        }
        if let Some(v) = f.log {
            self.log = v;
        }
        if let Some(v) = f.max_body_bytes {
            self.max_body_bytes = v;
        }
        if let Some(v) = f.session_idle_timeout_secs {
            self.session_idle_timeout_secs = v;
        }
        if let Some(v) = f.secure_cookies {
            self.secure_cookies = v;
        }
        if let Some(v) = f.ca_cert_file {
            self.ca_cert_file = v;
        }
        if let Some(v) = f.ca_key_file {
            self.ca_key_file = v;
        }
        let strings = [
            (f.mqtt_listen, &mut self.mqtt_listen),
            (f.mqtt_url, &mut self.mqtt_url),
            (f.mqtt_client_cert_file, &mut self.mqtt_client_cert_file),
            (f.mqtt_client_key_file, &mut self.mqtt_client_key_file),
            (f.mqtt_ca_file, &mut self.mqtt_ca_file),
            (f.device_listen, &mut self.device_listen),
            (f.artifact_store, &mut self.artifact_store),
        ];
        for (value, field) in strings {
            if let Some(v) = value {
                *field = v;
            }
        }
        if let Some(v) = f.public_names {
            self.public_names = v;
        }
        if let Some(v) = f.insecure_enroll_over_http {
            self.insecure_enroll_over_http = v;
        }
        if let Some(v) = f.enroll_pending_per_minute {
            self.enroll_pending_per_minute = v;
        }
        if let Some(v) = f.enroll_with_proof_per_minute {
            self.enroll_with_proof_per_minute = v;
        }
        if let Some(v) = f.max_pending_devices {
            self.max_pending_devices = v;
        }
        if let Some(v) = f.pending_expiry_days {
            self.pending_expiry_days = v;
        }
        if let Some(v) = f.max_artifact_size {
            self.max_artifact_size = v;
        }
        if let Some(t) = f.telemetry {
            self.telemetry.apply_file(t);
        }
        if let Some(v) = f.alert_interval_secs {
            self.alerts.interval_secs = v;
        }
        let a = &mut self.alerts;
        for (value, field) in [
            (f.smtp_server, &mut a.smtp_server),
            (f.smtp_security, &mut a.smtp_security),
            (f.smtp_from, &mut a.smtp_from),
            (f.smtp_username, &mut a.smtp_username),
            (f.smtp_password, &mut a.smtp_password),
            (f.notify_ca_file, &mut a.notify_ca_file),
        ] {
            if let Some(v) = value {
                *field = v;
            }
        }
        if let Some(v) = f.notify_allow_hosts {
            self.alerts.notify_allow_hosts = v;
        }
        if let Some(v) = f.remote_idle_timeout_secs {
            self.remote_idle_timeout_secs = v;
        }
        if let Some(v) = f.remote_max_duration_secs {
            self.remote_max_duration_secs = v;
        }
        if let Some(v) = f.remote_lost_after_secs {
            self.remote_lost_after_secs = v;
        }
    }

    fn apply_env(&mut self, env: &dyn Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        fn parsed<T: std::str::FromStr>(name: &str, value: String) -> Result<T, ConfigError>
        where
            T::Err: std::fmt::Display,
        {
            value.parse().map_err(|e: T::Err| ConfigError::Env { name: name.into(), value, message: e.to_string() })
        }
        if let Some(v) = env("DROVER_HTTP_LISTEN") {
            self.http_listen = v;
        }
        if let Some(v) = env("DROVER_DATABASE_URL") {
            self.database_url = v;
        }
        if let Some(v) = env("DROVER_LOG") {
            self.log = v;
        }
        if let Some(v) = env("DROVER_MAX_BODY_BYTES") {
            self.max_body_bytes = parsed("DROVER_MAX_BODY_BYTES", v)?;
        }
        if let Some(v) = env("DROVER_SESSION_IDLE_TIMEOUT_SECS") {
            self.session_idle_timeout_secs = parsed("DROVER_SESSION_IDLE_TIMEOUT_SECS", v)?;
        }
        if let Some(v) = env("DROVER_ALERT_INTERVAL_SECS") {
            self.alerts.interval_secs = parsed("DROVER_ALERT_INTERVAL_SECS", v)?;
        }
        for (name, field) in [
            ("DROVER_SMTP_SERVER", &mut self.alerts.smtp_server),
            ("DROVER_SMTP_SECURITY", &mut self.alerts.smtp_security),
            ("DROVER_SMTP_FROM", &mut self.alerts.smtp_from),
            ("DROVER_SMTP_USERNAME", &mut self.alerts.smtp_username),
            ("DROVER_SMTP_PASSWORD", &mut self.alerts.smtp_password),
            ("DROVER_NOTIFY_CA_FILE", &mut self.alerts.notify_ca_file),
        ] {
            if let Some(v) = env(name) {
                *field = v;
            }
        }
        if let Some(v) = env("DROVER_NOTIFY_ALLOW_HOSTS") {
            self.alerts.notify_allow_hosts =
                v.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect();
        }
        if let Some(v) = env("DROVER_REMOTE_IDLE_TIMEOUT_SECS") {
            self.remote_idle_timeout_secs = parsed("DROVER_REMOTE_IDLE_TIMEOUT_SECS", v)?;
        }
        if let Some(v) = env("DROVER_REMOTE_MAX_DURATION_SECS") {
            self.remote_max_duration_secs = parsed("DROVER_REMOTE_MAX_DURATION_SECS", v)?;
        }
        if let Some(v) = env("DROVER_REMOTE_LOST_AFTER_SECS") {
            self.remote_lost_after_secs = parsed("DROVER_REMOTE_LOST_AFTER_SECS", v)?;
        }
        if let Some(v) = env("DROVER_CA_CERT_FILE") {
            self.ca_cert_file = v;
        }
        if let Some(v) = env("DROVER_CA_KEY_FILE") {
            self.ca_key_file = v;
        }
        for (name, field) in [
            ("DROVER_MQTT_LISTEN", &mut self.mqtt_listen),
            ("DROVER_MQTT_URL", &mut self.mqtt_url),
            ("DROVER_MQTT_CLIENT_CERT_FILE", &mut self.mqtt_client_cert_file),
            ("DROVER_MQTT_CLIENT_KEY_FILE", &mut self.mqtt_client_key_file),
            ("DROVER_MQTT_CA_FILE", &mut self.mqtt_ca_file),
            ("DROVER_DEVICE_LISTEN", &mut self.device_listen),
            ("DROVER_ARTIFACT_STORE", &mut self.artifact_store),
        ] {
            if let Some(v) = env(name) {
                *field = v;
            }
        }
        if let Some(v) = env("DROVER_PUBLIC_NAMES") {
            self.public_names = v.split(',').map(|n| n.trim().to_string()).filter(|n| !n.is_empty()).collect();
        }
        if let Some(v) = env("DROVER_MAX_ARTIFACT_SIZE") {
            self.max_artifact_size = parsed("DROVER_MAX_ARTIFACT_SIZE", v)?;
        }
        self.telemetry.apply_env(env)?;
        if let Some(v) = env("DROVER_SECURE_COOKIES") {
            self.secure_cookies = parsed("DROVER_SECURE_COOKIES", v)?;
        }
        if let Some(v) = env("DROVER_INSECURE_ENROLL_OVER_HTTP") {
            self.insecure_enroll_over_http = parsed("DROVER_INSECURE_ENROLL_OVER_HTTP", v)?;
        }
        if let Some(v) = env("DROVER_ENROLL_PENDING_PER_MINUTE") {
            self.enroll_pending_per_minute = parsed("DROVER_ENROLL_PENDING_PER_MINUTE", v)?;
        }
        if let Some(v) = env("DROVER_ENROLL_WITH_PROOF_PER_MINUTE") {
            self.enroll_with_proof_per_minute = parsed("DROVER_ENROLL_WITH_PROOF_PER_MINUTE", v)?;
        }
        if let Some(v) = env("DROVER_MAX_PENDING_DEVICES") {
            self.max_pending_devices = parsed("DROVER_MAX_PENDING_DEVICES", v)?;
        }
        if let Some(v) = env("DROVER_PENDING_EXPIRY_DAYS") {
            self.pending_expiry_days = parsed("DROVER_PENDING_EXPIRY_DAYS", v)?;
        }
        Ok(())
    }

    /// The database URL in force: the configured one, or the SQLite file in the data dir.
    pub fn effective_database_url(&self) -> String {
        if self.database_url.is_empty() {
            format!("sqlite://{}?mode=rwc", self.data_dir.join(SQLITE_FILE).display())
        } else {
            self.database_url.clone()
        }
    }

    pub fn idle_timeout_ms(&self) -> i64 {
        i64::try_from(self.session_idle_timeout_secs.saturating_mul(1000)).unwrap_or(i64::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn tmp_dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("drover-config-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn the_generated_default_parses_to_the_defaults() {
        let d = tmp_dir("default");
        std::fs::write(d.join(CONFIG_FILE), DEFAULT_TOML).unwrap();
        let c = Config::load(&d, &|_| None, &Overrides::default()).unwrap();
        assert_eq!(c, Config::defaults(&d));
    }

    #[test]
    fn flags_beat_environment_beats_file() {
        let d = tmp_dir("layers");
        std::fs::write(d.join(CONFIG_FILE), "http_listen = \"0.0.0.0:1\"\nlog = \"debug\"\nmax_body_bytes = 10\n")
            .unwrap();
        let env: HashMap<&str, &str> = [("DROVER_HTTP_LISTEN", "0.0.0.0:2"), ("DROVER_MAX_BODY_BYTES", "20")].into();
        let get = |k: &str| env.get(k).map(|v| v.to_string());
        let c = Config::load(&d, &get, &Overrides::default()).unwrap();
        assert_eq!((c.http_listen.as_str(), c.log.as_str(), c.max_body_bytes), ("0.0.0.0:2", "debug", 20));
        let flags = Overrides { http_listen: Some("0.0.0.0:3".into()), ..Default::default() };
        let c = Config::load(&d, &get, &flags).unwrap();
        assert_eq!(c.http_listen, "0.0.0.0:3");
    }

    #[test]
    fn bad_values_are_named() {
        let d = tmp_dir("bad");
        std::fs::write(d.join(CONFIG_FILE), "htp_listen = \"x\"\n").unwrap();
        let e = Config::load(&d, &|_| None, &Overrides::default()).unwrap_err().to_string();
        assert!(e.contains("htp_listen"), "{e}");
        std::fs::remove_file(d.join(CONFIG_FILE)).unwrap();
        let e = Config::load(&d, &|k| (k == "DROVER_MAX_BODY_BYTES").then(|| "lots".into()), &Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("DROVER_MAX_BODY_BYTES") && e.contains("lots"), "{e}");
    }
}
