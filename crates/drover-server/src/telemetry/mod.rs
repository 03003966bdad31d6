//! Telemetry on the server: ingest of `up/telemetry` batches, storage in time-series tables
//! (schema v6 and v9), 1-minute, 15-minute and 1-hour rollups, retention, queries, logs on
//! demand and the Prometheus exposition of fleet aggregates (`docs/telemetry-server.md`).
//!
//! - [`ingest`] — the ingest loop hands each decoded batch to [`ingest::Ingest::submit`]; a
//!   bounded queue feeds one writer task, which coalesces the batches that arrived within a
//!   few milliseconds into one transaction ([`store::write`]) and acknowledges each batch
//!   (`down/telemetry {seq}`) only after the commit. A full queue makes `submit` wait, so
//!   the ingest loop stops reading and the broker slows the devices down: nothing is dropped.
//! - [`store`] — the write path: series ids (cached), multi-row inserts within the engines'
//!   bind-parameter limits, `ON CONFLICT DO NOTHING` so a resent batch changes nothing; the
//!   rows really inserted (counted, or named by `RETURNING` when a statement inserted only
//!   some) are added into the rollups in the same transaction, so a late point corrects the
//!   1-minute, 15-minute and 1-hour buckets it falls in. On PostgreSQL the day partitions a
//!   batch needs are made before it is written.
//! - [`maintenance`] — retention (raw points, 1-minute and 15-minute rollups, 1-hour rollups,
//!   each for its own number of days), PostgreSQL partitions made ahead and dropped whole, old
//!   log answers; run by one replica at a time through a lease row in `job_leases`.
//! - [`query`] — reads for the API, the UI, the CLI and the alert engine.
//! - [`logs`] — `POST /api/v1/devices/{id}/logs`: `down/logs`, answers stored by whichever
//!   replica receives `up/logs`, polled by the one that asked.
//! - [`prometheus`] — `GET /metrics/fleet`.
//!
//! # The Rust API for the alert engine (`crate::telemetry::query`)
//!
//! ```ignore
//! // Per-device points of `metric` in [from_ms, to_ms) for the devices of `org_id` matching
//! // `filter` (None: all accepted devices), late points (late = 1) excluded, oldest first.
//! query::device_values(&db, org_id, Some(&expr), "cpu.percent", from_ms, to_ms).await
//!     -> AppResult<Vec<DeviceValues { device_id: String, points: Vec<(i64 /*ts*/, f64)> }>>
//! // The same reduced per device: count, min, max, avg, last (late points excluded).
//! query::device_window(&db, org_id, Some(&expr), "cpu.percent", from_ms, to_ms).await
//!     -> AppResult<Vec<DeviceWindow { device_id, count: i64, min, max, avg, last: f64 }>>
//! // Events named `name` received since `since_ms` (by `received_at`, so late events are
//! // seen once when they arrive; `late` says whether they are old news), oldest first.
//! query::events_since(&db, org_id, Some(&expr), "door.open", since_ms, limit).await
//!     -> AppResult<Vec<TelemetryEvent { device_id, id, ts, received_at, late: bool,
//!                                        name, severity, data: String /* JSON */ }>>
//! ```
//! Tables (read them directly if that is easier): `metric_series (id, device_id, name)`,
//! `metric_points (series_id, ts, value, late)`, `metric_rollup_1m` / `metric_rollup_15m` /
//! `metric_rollup_1h` `(series_id, bucket, count, sum, min, max)` with `bucket` the bucket's
//! start in Unix ms, `telemetry_events (device_id, id, ts, received_at, late, name, severity, data)`.

pub mod api;
pub mod ingest;
pub mod logs;
pub mod maintenance;
pub mod prometheus;
pub mod query;
pub mod store;

/// One minute, a quarter hour and one hour, in milliseconds: the rollup bucket sizes.
pub const MINUTE_MS: i64 = 60_000;
pub const QUARTER_MS: i64 = 900_000;
pub const HOUR_MS: i64 = 3_600_000;
pub const DAY_MS: i64 = 86_400_000;

/// The metric series that carries each device's outbox drop counter.
pub const DROPPED_METRIC: &str = "drover.outbox.dropped";

/// Telemetry settings (`[telemetry]` in `drover.toml`, `DROVER_TELEMETRY_*`, flags).
#[derive(Debug, Clone, PartialEq)]
pub struct TelemetryConfig {
    /// A point or event that arrives this long after its timestamp is stored with `late = 1`.
    pub late_after_secs: u64,
    /// Days raw points are kept.
    pub retention_raw_days: u64,
    /// Days 1-minute rollups are kept.
    pub retention_1m_days: u64,
    /// Days 1-hour rollups are kept.
    pub retention_1h_days: u64,
    /// Days events are kept.
    pub retention_events_days: u64,
    /// Tag keys whose values label the fleet aggregates of `/metrics/fleet`.
    pub prometheus_tags: Vec<String>,
    /// Metric names exposed on `/metrics/fleet`.
    pub prometheus_metrics: Vec<String>,
    /// A point stamped more than this many seconds after the server's time is not stored
    /// (the device's clock is ahead, or unset and garbage); nor is one older than the raw
    /// retention. Both are counted and named in the batch's acknowledgement.
    pub max_future_secs: u64,
    /// Most metric series (names) one device may have; points of a new name past it are left
    /// out and counted in the batch's acknowledgement (`refused_series`).
    pub max_series_per_device: u64,
    /// Most metric series the devices of one organization may have together.
    pub max_series_per_org: u64,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            late_after_secs: 120,
            retention_raw_days: 7,
            retention_1m_days: 30,
            retention_1h_days: 400,
            retention_events_days: 30,
            prometheus_tags: Vec::new(),
            prometheus_metrics: vec!["cpu.percent".into(), "mem.used_percent".into()],
            max_future_secs: 300,
            max_series_per_device: 1000,
            max_series_per_org: 1_000_000,
        }
    }
}

impl TelemetryConfig {
    pub fn series_limits(&self) -> store::SeriesLimits {
        store::SeriesLimits { per_device: self.max_series_per_device, per_org: self.max_series_per_org }
    }

    pub fn late_after_ms(&self) -> i64 {
        i64::try_from(self.late_after_secs.saturating_mul(1000)).unwrap_or(i64::MAX)
    }

    /// The timestamps stored at `now` (Unix ms): from the raw retention's start to
    /// `max_future_secs` ahead.
    pub fn window(&self, now: i64) -> std::ops::RangeInclusive<i64> {
        let ahead = i64::try_from(self.max_future_secs.saturating_mul(1000)).unwrap_or(i64::MAX);
        now.saturating_sub(days_ms(self.retention_raw_days))..=now.saturating_add(ahead)
    }
}

fn days_ms(days: u64) -> i64 {
    i64::try_from(days).unwrap_or(i64::MAX / DAY_MS).saturating_mul(DAY_MS)
}

/// The `[telemetry]` table of `drover.toml`.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetryFile {
    late_after_secs: Option<u64>,
    retention_raw_days: Option<u64>,
    retention_1m_days: Option<u64>,
    retention_1h_days: Option<u64>,
    retention_events_days: Option<u64>,
    prometheus_tags: Option<Vec<String>>,
    prometheus_metrics: Option<Vec<String>>,
    max_future_secs: Option<u64>,
    max_series_per_device: Option<u64>,
    max_series_per_org: Option<u64>,
}

/// Telemetry flags of `droverd` (they override the file and the environment).
#[derive(Debug, Default, Clone, clap::Args)]
pub struct TelemetryFlags {
    /// Days raw telemetry points are kept ([telemetry] retention_raw_days, default 7).
    #[arg(long, global = true)]
    pub retention_raw_days: Option<u64>,
    /// Days 1-minute rollups are kept (retention_1m_days, default 30).
    #[arg(long = "retention-1m-days", global = true)]
    pub retention_1m_days: Option<u64>,
    /// Days 1-hour rollups are kept (retention_1h_days, default 400).
    #[arg(long = "retention-1h-days", global = true)]
    pub retention_1h_days: Option<u64>,
    /// Seconds after which an arriving point counts as late (late_after_secs, default 120).
    #[arg(long, global = true)]
    pub late_after_secs: Option<u64>,
    /// Tag keys whose values label /metrics/fleet, comma-separated (prometheus_tags).
    #[arg(long, global = true)]
    pub prometheus_tags: Option<String>,
    /// Metrics exposed on /metrics/fleet, comma-separated (prometheus_metrics).
    #[arg(long, global = true)]
    pub prometheus_metrics: Option<String>,
}

fn list(v: &str) -> Vec<String> {
    v.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect()
}

impl TelemetryConfig {
    pub fn apply_file(&mut self, f: TelemetryFile) {
        let nums = [
            (f.late_after_secs, &mut self.late_after_secs),
            (f.retention_raw_days, &mut self.retention_raw_days),
            (f.retention_1m_days, &mut self.retention_1m_days),
            (f.retention_1h_days, &mut self.retention_1h_days),
            (f.retention_events_days, &mut self.retention_events_days),
            (f.max_future_secs, &mut self.max_future_secs),
            (f.max_series_per_device, &mut self.max_series_per_device),
            (f.max_series_per_org, &mut self.max_series_per_org),
        ];
        for (v, field) in nums {
            if let Some(v) = v {
                *field = v;
            }
        }
        if let Some(v) = f.prometheus_tags {
            self.prometheus_tags = v;
        }
        if let Some(v) = f.prometheus_metrics {
            self.prometheus_metrics = v;
        }
    }

    pub fn apply_env(&mut self, env: &dyn Fn(&str) -> Option<String>) -> Result<(), crate::config::ConfigError> {
        let nums = [
            ("DROVER_TELEMETRY_LATE_AFTER_SECS", &mut self.late_after_secs),
            ("DROVER_RETENTION_RAW_DAYS", &mut self.retention_raw_days),
            ("DROVER_RETENTION_1M_DAYS", &mut self.retention_1m_days),
            ("DROVER_RETENTION_1H_DAYS", &mut self.retention_1h_days),
            ("DROVER_RETENTION_EVENTS_DAYS", &mut self.retention_events_days),
            ("DROVER_TELEMETRY_MAX_FUTURE_SECS", &mut self.max_future_secs),
            ("DROVER_TELEMETRY_MAX_SERIES_PER_DEVICE", &mut self.max_series_per_device),
            ("DROVER_TELEMETRY_MAX_SERIES_PER_ORG", &mut self.max_series_per_org),
        ];
        for (name, field) in nums {
            if let Some(v) = env(name) {
                *field = v.parse().map_err(|e: std::num::ParseIntError| crate::config::ConfigError::Env {
                    name: name.into(),
                    value: v.clone(),
                    message: e.to_string(),
                })?;
            }
        }
        if let Some(v) = env("DROVER_PROMETHEUS_TAGS") {
            self.prometheus_tags = list(&v);
        }
        if let Some(v) = env("DROVER_PROMETHEUS_METRICS") {
            self.prometheus_metrics = list(&v);
        }
        Ok(())
    }

    pub fn apply_flags(&mut self, f: &TelemetryFlags) {
        let nums = [
            (f.late_after_secs, &mut self.late_after_secs),
            (f.retention_raw_days, &mut self.retention_raw_days),
            (f.retention_1m_days, &mut self.retention_1m_days),
            (f.retention_1h_days, &mut self.retention_1h_days),
        ];
        for (v, field) in nums {
            if let Some(v) = v {
                *field = v;
            }
        }
        if let Some(v) = &f.prometheus_tags {
            self.prometheus_tags = list(v);
        }
        if let Some(v) = &f.prometheus_metrics {
            self.prometheus_metrics = list(v);
        }
    }
}
