//! Retention and (PostgreSQL) partition upkeep, run by one replica at a time: the job takes a
//! lease row in `job_leases` (design decision 3) and runs when it holds it.
//!
//! Raw points are kept `retention_raw_days`, 1-minute rollups `retention_1m_days`, 1-hour
//! rollups `retention_1h_days`, events `retention_events_days`; answers to log requests a
//! day. On PostgreSQL raw points go by whole day partitions (a partition is dropped once its
//! last day is past the cut), and the partitions of today and the next two days are made
//! ahead. On SQLite rows are deleted a range of series at a time, each range its own short
//! transaction, so ingest is never held up for long.

use std::time::Duration;

use tokio::sync::watch;

use crate::db::{Backend, Db};

use super::store::{Cache, ensure_partitions};
use super::{DAY_MS, TelemetryConfig, days_ms};

/// The lease's name in `job_leases`.
pub const LEASE: &str = "telemetry.maintenance";
/// How often each replica tries to run the job.
pub const EVERY: Duration = Duration::from_secs(600);
/// Series per delete statement on SQLite.
const SERIES_PER_DELETE: i64 = 500;

/// What one run removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    pub points: u64,
    pub partitions_dropped: u64,
    pub rollup_1m: u64,
    /// 15-minute rollups go with the 1-minute ones (`retention_1m_days`).
    pub rollup_15m: u64,
    pub rollup_1h: u64,
    pub events: u64,
    pub log_requests: u64,
}

/// Takes (or renews) the lease `name` for `holder` until `now + ttl_ms`; false when another
/// holder's lease has not expired.
pub async fn take_lease(db: &Db, name: &str, holder: &str, now: i64, ttl_ms: i64) -> Result<bool, sqlx::Error> {
    let mut tx = db.begin_write().await?;
    let won: Option<(String,)> = sqlx::query_as(
        "INSERT INTO job_leases (name, holder, expires_at, last_run_at) VALUES ($1, $2, $3, $4) \
         ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, expires_at = excluded.expires_at, \
         last_run_at = excluded.last_run_at WHERE job_leases.expires_at < $4 OR job_leases.holder = $2 RETURNING holder",
    )
    .bind(name.to_string())
    .bind(holder.to_string())
    .bind(now + ttl_ms)
    .bind(now)
    .fetch_optional(tx.conn())
    .await?;
    tx.commit().await?;
    Ok(won.is_some())
}

/// Deletes `WHERE {col} < cut` from `table` a range of series at a time.
async fn delete_by_series(db: &Db, table: &str, col: &str, cut: i64) -> Result<u64, sqlx::Error> {
    let (lo, hi): (Option<i64>, Option<i64>) =
        sqlx::query_as("SELECT MIN(id), MAX(id) FROM metric_series").fetch_one(db.pool()).await?;
    let (Some(lo), Some(hi)) = (lo, hi) else { return Ok(0) };
    let mut n = 0;
    let mut from = lo;
    while from <= hi {
        let to = from + SERIES_PER_DELETE;
        let mut tx = db.begin_write().await?;
        n += sqlx::query(&format!("DELETE FROM {table} WHERE series_id >= $1 AND series_id < $2 AND {col} < $3"))
            .bind(from)
            .bind(to)
            .bind(cut)
            .execute(tx.conn())
            .await?
            .rows_affected();
        tx.commit().await?;
        from = to;
    }
    Ok(n)
}

/// The day partitions of `metric_points` (PostgreSQL), by day number.
pub async fn partitions(db: &Db) -> Result<Vec<i64>, sqlx::Error> {
    let rows: Vec<(String,)> = sqlx::query_as(
        "SELECT c.relname::TEXT FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
         JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = 'metric_points' \
         AND p.relnamespace = (SELECT oid FROM pg_namespace WHERE nspname = current_schema())",
    )
    .fetch_all(db.pool())
    .await?;
    let mut days: Vec<i64> =
        rows.into_iter().filter_map(|(n,)| n.strip_prefix("metric_points_d").and_then(|d| d.parse().ok())).collect();
    days.sort_unstable();
    Ok(days)
}

/// One run of the job with `now` as the time (tests pass a time days ahead).
pub async fn run_once(db: &Db, cache: &Cache, config: &TelemetryConfig, now: i64) -> Result<Report, sqlx::Error> {
    let mut r = Report::default();
    let raw_cut = now - days_ms(config.retention_raw_days);
    match db.backend() {
        Backend::Postgres => {
            let today = now.div_euclid(DAY_MS);
            ensure_partitions(db, cache, today..=today + 2).await?;
            for day in partitions(db).await? {
                if (day + 1) * DAY_MS <= raw_cut {
                    sqlx::raw_sql(&format!("DROP TABLE IF EXISTS metric_points_d{day}")).execute(db.pool()).await?;
                    r.partitions_dropped += 1;
                }
            }
            if r.partitions_dropped > 0 {
                cache.forget_days();
            }
        }
        Backend::Sqlite => {
            r.points = delete_by_series(db, "metric_points", "ts", raw_cut).await?;
        }
    }
    r.rollup_1m = delete_by_series(db, "metric_rollup_1m", "bucket", now - days_ms(config.retention_1m_days)).await?;
    r.rollup_15m = delete_by_series(db, "metric_rollup_15m", "bucket", now - days_ms(config.retention_1m_days)).await?;
    r.rollup_1h = delete_by_series(db, "metric_rollup_1h", "bucket", now - days_ms(config.retention_1h_days)).await?;
    let mut tx = db.begin_write().await?;
    r.events = sqlx::query("DELETE FROM telemetry_events WHERE ts < $1")
        .bind(now - days_ms(config.retention_events_days))
        .execute(tx.conn())
        .await?
        .rows_affected();
    r.log_requests = sqlx::query("DELETE FROM log_requests WHERE requested_at < $1")
        .bind(now - DAY_MS)
        .execute(tx.conn())
        .await?
        .rows_affected();
    tx.commit().await?;
    Ok(r)
}

/// Tries the job every [`EVERY`] (and once at start) until `stop`; runs it when this replica
/// holds the lease.
pub async fn run(
    db: Db,
    cache: std::sync::Arc<Cache>,
    config: TelemetryConfig,
    holder: String,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let now = crate::time::now_ms();
        match take_lease(&db, LEASE, &holder, now, EVERY.as_millis() as i64).await {
            Ok(true) => match run_once(&db, &cache, &config, now).await {
                Ok(r) => tracing::debug!(?r, "telemetry retention"),
                Err(e) => tracing::warn!("telemetry retention: {e}"),
            },
            Ok(false) => {}
            Err(e) => tracing::warn!("telemetry retention: cannot take the lease: {e}"),
        }
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            _ = tokio::time::sleep(EVERY) => {}
        }
    }
}
