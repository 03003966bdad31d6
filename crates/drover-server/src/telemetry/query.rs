//! Reads of stored telemetry: a device's metrics and series, fleet aggregates per time bucket
//! over a group or a filter, top devices, and the window reads of the alert engine.
//!
//! A read picks its table by the step: steps that are whole hours read the 1-hour rollups,
//! whole quarter hours the 15-minute rollups, whole minutes the 1-minute rollups, anything
//! finer the raw points. Buckets start at
//! multiples of the step since the Unix epoch.

use drover_proto::filter::Expr;
use serde::{Deserialize, Serialize};

use crate::db::{Backend, Bind, Db, bind_all};
use crate::error::{AppError, AppResult};

use super::{HOUR_MS, MINUTE_MS, QUARTER_MS};

/// Buckets one answer holds, at most.
pub const MAX_BUCKETS: i64 = 10_000;
/// Devices a fleet answer aggregates, at most.
pub const MAX_TOP: u32 = 1000;
/// Steps chosen when the caller gives none: the smallest that gives at most
/// [`AUTO_BUCKETS`] buckets.
const STEPS: &[i64] = &[
    1_000,
    5_000,
    10_000,
    30_000,
    60_000,
    300_000,
    900_000,
    1_800_000,
    3_600_000,
    3 * 3_600_000,
    6 * 3_600_000,
    12 * 3_600_000,
    86_400_000,
    7 * 86_400_000,
];
const AUTO_BUCKETS: i64 = 300;

/// Where a read takes its values from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Resolution {
    Raw,
    #[serde(rename = "1m")]
    Minute,
    #[serde(rename = "15m")]
    Quarter,
    #[serde(rename = "1h")]
    Hour,
}

impl Resolution {
    pub fn for_step(step: i64) -> Resolution {
        if step % HOUR_MS == 0 {
            Resolution::Hour
        } else if step % QUARTER_MS == 0 {
            Resolution::Quarter
        } else if step % MINUTE_MS == 0 {
            Resolution::Minute
        } else {
            Resolution::Raw
        }
    }

    /// The table's bucket size, ms (raw points: none, 1).
    pub fn bucket_ms(self) -> i64 {
        match self {
            Resolution::Raw => 1,
            Resolution::Minute => MINUTE_MS,
            Resolution::Quarter => QUARTER_MS,
            Resolution::Hour => HOUR_MS,
        }
    }

    /// `FROM` clause part and the column expressions (time, count, sum, min, max).
    fn source(self) -> (&'static str, &'static str, &'static str, &'static str, &'static str, &'static str) {
        match self {
            Resolution::Raw => ("metric_points", "p.ts", "COUNT(*)", "SUM(p.value)", "MIN(p.value)", "MAX(p.value)"),
            Resolution::Minute => (
                "metric_rollup_1m",
                "p.bucket",
                "CAST(SUM(p.count) AS BIGINT)",
                "SUM(p.sum)",
                "MIN(p.min)",
                "MAX(p.max)",
            ),
            Resolution::Quarter => (
                "metric_rollup_15m",
                "p.bucket",
                "CAST(SUM(p.count) AS BIGINT)",
                "SUM(p.sum)",
                "MIN(p.min)",
                "MAX(p.max)",
            ),
            Resolution::Hour => (
                "metric_rollup_1h",
                "p.bucket",
                "CAST(SUM(p.count) AS BIGINT)",
                "SUM(p.sum)",
                "MIN(p.min)",
                "MAX(p.max)",
            ),
        }
    }
}

/// A checked time range and step, in Unix ms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    pub from: i64,
    pub to: i64,
    pub step: i64,
}

/// Parses a duration: `500ms`, `30s`, `5m`, `2h`, `7d`, `1w`, or plain milliseconds.
pub fn parse_duration(s: &str) -> Option<i64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: i64 = n.parse().ok()?;
    let mul = match unit {
        "" | "ms" => 1,
        "s" => 1000,
        "m" => MINUTE_MS,
        "h" => HOUR_MS,
        "d" => 86_400_000,
        "w" => 7 * 86_400_000,
        _ => return None,
    };
    n.checked_mul(mul)
}

/// Parses a time: Unix ms, RFC 3339, a date, `now`, or `now-DURATION` / `-DURATION`.
pub fn parse_time(s: &str, now: i64) -> Option<i64> {
    let s = s.trim();
    if s == "now" {
        return Some(now);
    }
    if let Some(d) = s.strip_prefix("now-").or_else(|| s.strip_prefix('-')) {
        return parse_duration(d).map(|d| now - d);
    }
    if let Ok(ms) = s.parse::<i64>() {
        return Some(ms);
    }
    crate::time::parse(s)
}

/// Checks and completes `from`, `to` and `step` as a client sent them (`to` defaults to now,
/// `from` to `to` minus `default_span`, `step` to one giving about 300 buckets).
pub fn range(
    from: Option<&str>,
    to: Option<&str>,
    step: Option<&str>,
    now: i64,
    default_span: i64,
) -> AppResult<Range> {
    let bad = |m: String| AppError::BadRequest(m);
    let to = match to {
        Some(t) => parse_time(t, now)
            .ok_or_else(|| bad(format!("invalid to {t:?}: use Unix ms, RFC 3339, now or now-DURATION")))?,
        None => now,
    };
    let from = match from {
        Some(f) => parse_time(f, now)
            .ok_or_else(|| bad(format!("invalid from {f:?}: use Unix ms, RFC 3339, now-DURATION (e.g. now-24h)")))?,
        None => to - default_span,
    };
    if from >= to {
        return Err(bad(format!("the range is empty: from ({from}) must be before to ({to})")));
    }
    let span = to - from;
    let step = match step {
        Some(s) => {
            let step = parse_duration(s)
                .ok_or_else(|| bad(format!("invalid step {s:?}: use a duration such as 10s, 5m, 1h or 1d")))?;
            if step < 1000 {
                return Err(bad(format!("invalid step {s:?}: the smallest step is 1s")));
            }
            if span / step > MAX_BUCKETS {
                return Err(bad(format!(
                    "step {s:?} makes {} buckets over this range; at most {MAX_BUCKETS}: choose a larger step",
                    span / step
                )));
            }
            step
        }
        None => STEPS.iter().copied().find(|s| span / s <= AUTO_BUCKETS).unwrap_or(30 * 86_400_000),
    };
    Ok(Range { from, to, step })
}

/// One bucket of one series.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct SeriesBucket {
    /// Start of the bucket, Unix ms.
    pub t: i64,
    pub count: i64,
    pub avg: f64,
    pub min: f64,
    pub max: f64,
}

/// A device's series.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct Series {
    pub device_id: String,
    pub metric: String,
    pub from: i64,
    pub to: i64,
    pub step: i64,
    pub resolution: Resolution,
    pub points: Vec<SeriesBucket>,
}

/// A metric a device has reported, with its newest value.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct MetricInfo {
    pub name: String,
    pub last_t: Option<i64>,
    pub last_value: Option<f64>,
}

/// Checks that the device exists in the organization.
pub async fn check_device(db: &Db, org_id: &str, device_id: &str) -> AppResult<()> {
    let found: Option<(String,)> = sqlx::query_as("SELECT id FROM devices WHERE org_id = $1 AND id = $2")
        .bind(org_id.to_string())
        .bind(device_id.to_string())
        .fetch_optional(db.pool())
        .await?;
    found.map(|_| ()).ok_or_else(|| AppError::NotFound(format!("no device with id {device_id:?}")))
}

/// The metrics a device has reported, by name, with their newest value: one page of
/// `limit` (default 50, at most 500) after `cursor`.
pub async fn metric_names(
    db: &Db,
    org_id: &str,
    device_id: &str,
    limit: Option<u32>,
    cursor: Option<&str>,
) -> AppResult<drover_proto::api::Page<MetricInfo>> {
    const SORTS: &[crate::page::SortField] = &[crate::page::SortField { name: "name", column: "name", int: false }];
    let page = crate::page::PageRequest::parse(limit, cursor, None, SORTS, "name")?;
    check_device(db, org_id, device_id).await?;
    let mut f = crate::db::Filter::default();
    f.and("device_id = ?", [crate::db::Bind::Text(device_id.to_string())]);
    page.apply(&mut f, None);
    let sql = format!("SELECT id, name FROM metric_series{}{}", f.sql(), page.order_limit(None));
    let rows: Vec<(i64, String)> = crate::db::bind_all(sqlx::query_as(&sql), &f.binds).fetch_all(db.pool()).await?;
    let (rows, next_cursor) = page.finish(rows, |r| (crate::page::CursorValue::Text(r.1.clone()), None));
    let mut items = Vec::with_capacity(rows.len());
    for (id, name) in rows {
        let last: Option<(i64, f64)> =
            sqlx::query_as("SELECT ts, value FROM metric_points WHERE series_id = $1 ORDER BY ts DESC LIMIT 1")
                .bind(id)
                .fetch_optional(db.pool())
                .await?;
        items.push(MetricInfo { name, last_t: last.map(|l| l.0), last_value: last.map(|l| finite(l.1)) });
    }
    Ok(drover_proto::api::Page { items, next_cursor })
}

/// One device's metric in buckets of `r.step`.
pub async fn series(db: &Db, org_id: &str, device_id: &str, metric: &str, r: Range) -> AppResult<Series> {
    check_device(db, org_id, device_id).await?;
    check_metric(metric)?;
    let res = Resolution::for_step(r.step);
    let (table, t, c, s, lo, hi) = res.source();
    let sql = format!(
        "SELECT {t} - ({t} % $1) AS b, {c}, {s}, {lo}, {hi} FROM {table} p \
         JOIN metric_series ms ON ms.id = p.series_id WHERE ms.device_id = $2 AND ms.name = $3 \
         AND {t} >= $4 AND {t} < $5 GROUP BY b ORDER BY b"
    );
    let rows: Vec<(i64, i64, f64, f64, f64)> = sqlx::query_as(&sql)
        .bind(r.step)
        .bind(device_id.to_string())
        .bind(metric.to_string())
        .bind(r.from)
        .bind(r.to)
        .fetch_all(db.pool())
        .await?;
    Ok(Series {
        device_id: device_id.to_string(),
        metric: metric.to_string(),
        from: r.from,
        to: r.to,
        step: r.step,
        resolution: res,
        points: rows
            .into_iter()
            .map(|(t, count, sum, min, max)| SeriesBucket {
                t,
                count,
                avg: finite(finite(sum) / count.max(1) as f64),
                min: finite(min),
                max: finite(max),
            })
            .collect(),
    })
}

/// A metric name must be one the protocol allows.
pub fn check_metric(name: &str) -> AppResult<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(AppError::BadRequest(format!("invalid metric name {name:?}: use 1 to 64 of a-z 0-9 _ . -")))
    }
}

/// Which devices a fleet read covers.
#[derive(Debug, Clone)]
pub enum Scope {
    All,
    /// A group, by id or name.
    Group(String),
    /// A filter expression (already checked).
    Filter(Expr),
}

/// A condition on `devices d` selecting the scope's accepted devices of the organization.
pub async fn scope_condition(db: &Db, org_id: &str, scope: &Scope) -> AppResult<(String, Vec<Bind>)> {
    let mut sql = "d.org_id = ? AND d.status = 'accepted'".to_string();
    let mut binds = vec![Bind::Text(org_id.to_string())];
    match scope {
        Scope::All => {}
        Scope::Group(g) => {
            let row: Option<(String, String, Option<String>)> = sqlx::query_as(
                "SELECT id, kind, filter FROM device_groups WHERE org_id = $1 AND (id = $2 OR name = $2)",
            )
            .bind(org_id.to_string())
            .bind(g.clone())
            .fetch_optional(db.pool())
            .await?;
            let Some((id, kind, filter)) = row else {
                return Err(AppError::NotFound(format!("no group with id or name {g:?}")));
            };
            if kind == "static" {
                sql.push_str(" AND d.id IN (SELECT m.device_id FROM device_group_members m WHERE m.group_id = ?)");
                binds.push(Bind::Text(id));
            } else {
                let e = crate::filter::check(db, org_id, filter.as_deref().unwrap_or_default()).await?;
                let c = crate::filter::compile_for_count(&e, org_id);
                sql.push_str(&format!(" AND ({})", c.sql));
                binds.extend(c.binds);
            }
        }
        Scope::Filter(e) => {
            let c = crate::filter::compile_for_count(e, org_id);
            sql.push_str(&format!(" AND ({})", c.sql));
            binds.extend(c.binds);
        }
    }
    Ok((sql, binds))
}

/// Turns `?` into numbered parameters starting at `first`.
fn number(sql: &str, first: usize) -> String {
    let mut out = String::with_capacity(sql.len() + 16);
    let mut n = first;
    for ch in sql.chars() {
        if ch == '?' {
            out.push_str(&format!("${n}"));
            n += 1;
        } else {
            out.push(ch);
        }
    }
    out
}

/// One bucket of a fleet aggregate.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct FleetBucket {
    /// Start of the bucket, Unix ms.
    pub t: i64,
    /// Devices with at least one value in the bucket.
    pub devices: i64,
    /// Mean of the devices' means.
    pub avg: f64,
    /// Smallest and largest single value.
    pub min: f64,
    pub max: f64,
    /// Median and 95th percentile of the devices' means (nearest rank).
    pub p50: f64,
    pub p95: f64,
}

/// A metric aggregated over devices, per bucket.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct FleetSeries {
    pub metric: String,
    pub from: i64,
    pub to: i64,
    pub step: i64,
    pub resolution: Resolution,
    /// Devices with a value anywhere in the range.
    pub devices: i64,
    pub buckets: Vec<FleetBucket>,
}

/// `x` as a number JSON can carry: infinities become the largest finite `f64` of their sign,
/// NaN becomes 0. Ingest refuses values over [`drover_proto::telemetry::MAX_ABS_VALUE`], so
/// this matters only for data stored before that bound (or a sum of them the database
/// computed as infinity).
pub fn finite(x: f64) -> f64 {
    if x.is_nan() { 0.0 } else { x.clamp(-f64::MAX, f64::MAX) }
}

/// The mean of `values`, without overflowing on the way (each value is divided first);
/// 0 for none.
pub fn mean(values: &[f64]) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let n = values.len() as f64;
    finite(values.iter().map(|v| finite(*v) / n).sum())
}

/// The nearest-rank percentile `p` (0–100) of sorted values.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// A metric over the devices of a scope, per bucket: device count, avg, min, max, p50, p95.
///
/// The database does the work in one pass: each device's mean per bucket (straight from the
/// rollup row when the step is the table's bucket size), then per bucket the smallest and
/// largest value and the list of the devices' means as text (`group_concat` /
/// `string_agg`, each mean in a form that reads back as the same `f64`). One row per bucket
/// crosses to droverd, which sorts each list for the exact nearest-rank percentiles.
pub async fn fleet(db: &Db, org_id: &str, scope: &Scope, metric: &str, r: Range) -> AppResult<FleetSeries> {
    check_metric(metric)?;
    let res = Resolution::for_step(r.step);
    let (cond, binds) = scope_condition(db, org_id, scope).await?;
    let (table, t) = match res {
        Resolution::Raw => ("metric_points", "p.ts"),
        Resolution::Minute => ("metric_rollup_1m", "p.bucket"),
        Resolution::Quarter => ("metric_rollup_15m", "p.bucket"),
        Resolution::Hour => ("metric_rollup_1h", "p.bucket"),
    };
    // $1 metric, $2 from, $3 to, then the scope's parameters, then the step if it is used.
    let scope_sql = number(&cond, 4);
    let step_param = format!("${}", 4 + binds.len());
    let series = format!(
        "JOIN metric_series ms ON ms.id = p.series_id WHERE ms.name = $1 AND {t} >= $2 AND {t} < $3 \
         AND ms.device_id IN (SELECT d.id FROM devices d WHERE {scope_sql})"
    );
    let per_device = match res {
        Resolution::Raw => format!(
            "SELECT p.ts - (p.ts % {step_param}) AS b, AVG(p.value) AS mean, MIN(p.value) AS lo, \
             MAX(p.value) AS hi FROM metric_points p {series} GROUP BY p.series_id, b"
        ),
        _ if r.step == res.bucket_ms() => format!(
            "SELECT p.bucket AS b, p.sum / CAST(p.count AS DOUBLE PRECISION) AS mean, p.min AS lo, p.max AS hi \
             FROM {table} p {series}"
        ),
        _ => format!(
            "SELECT p.bucket - (p.bucket % {step_param}) AS b, SUM(p.sum) / CAST(SUM(p.count) AS DOUBLE PRECISION) \
             AS mean, MIN(p.min) AS lo, MAX(p.max) AS hi FROM {table} p {series} GROUP BY p.series_id, b"
        ),
    };
    let uses_step = per_device.contains(&step_param);
    let list = match db.backend() {
        Backend::Sqlite => "group_concat(printf('%.17g', x.mean))",
        // PostgreSQL 12 and later print the shortest text that reads back exactly.
        Backend::Postgres => "string_agg(CAST(x.mean AS TEXT), ',')",
    };
    let sql = format!("SELECT x.b, MIN(x.lo), MAX(x.hi), {list} FROM ({per_device}) x GROUP BY x.b ORDER BY x.b");
    let q = sqlx::query_as::<_, (i64, f64, f64, String)>(&sql).bind(metric.to_string()).bind(r.from).bind(r.to);
    let mut q = bind_all(q, &binds);
    if uses_step {
        q = q.bind(r.step);
    }
    let rows = q.fetch_all(db.pool()).await?;
    let mut buckets = Vec::with_capacity(rows.len());
    for (b, lo, hi, list) in rows {
        let mut means = list
            .split(',')
            .map(|m| m.trim().parse::<f64>())
            .collect::<Result<Vec<f64>, _>>()
            .map_err(|e| AppError::Internal(format!("a device mean the database sent does not read back: {e}")))?;
        for m in &mut means {
            *m = finite(*m);
        }
        means.sort_unstable_by(f64::total_cmp);
        buckets.push(FleetBucket {
            t: b,
            devices: means.len() as i64,
            avg: mean(&means),
            min: finite(lo),
            max: finite(hi),
            p50: finite(percentile(&means, 50.0)),
            p95: finite(percentile(&means, 95.0)),
        });
    }
    // Devices with a value anywhere in the range: one index probe per series of the metric.
    let sql = format!(
        "SELECT COUNT(*) FROM metric_series ms WHERE ms.name = $1 \
         AND ms.device_id IN (SELECT d.id FROM devices d WHERE {scope_sql}) \
         AND EXISTS (SELECT 1 FROM {table} p WHERE p.series_id = ms.id AND {t} >= $2 AND {t} < $3)"
    );
    let q = sqlx::query_as::<_, (i64,)>(&sql).bind(metric.to_string()).bind(r.from).bind(r.to);
    let (devices,) = bind_all(q, &binds).fetch_one(db.pool()).await?;
    Ok(FleetSeries {
        metric: metric.to_string(),
        from: r.from,
        to: r.to,
        step: r.step,
        resolution: res,
        devices,
        buckets,
    })
}

/// What ranks devices in [`top`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum TopBy {
    Avg,
    Max,
    Last,
}

/// A device and its value in a ranking.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct TopRow {
    pub device_id: String,
    pub value: f64,
    /// Values the ranking saw.
    pub count: i64,
}

/// The `n` devices of a scope with the highest avg, max or last value of a metric in a range.
pub async fn top(
    db: &Db,
    org_id: &str,
    scope: &Scope,
    metric: &str,
    (from, to): (i64, i64),
    by: TopBy,
    n: u32,
) -> AppResult<Vec<TopRow>> {
    check_metric(metric)?;
    if n == 0 || n > MAX_TOP {
        return Err(AppError::BadRequest(format!("invalid n {n}: between 1 and {MAX_TOP}")));
    }
    let w = window(db, org_id, scope, metric, from, to, false).await?;
    let mut rows: Vec<TopRow> = w
        .into_iter()
        .map(|d| TopRow {
            value: match by {
                TopBy::Avg => d.avg,
                TopBy::Max => d.max,
                TopBy::Last => d.last,
            },
            device_id: d.device_id,
            count: d.count,
        })
        .collect();
    rows.sort_by(|a, b| b.value.total_cmp(&a.value).then_with(|| a.device_id.cmp(&b.device_id)));
    rows.truncate(n as usize);
    Ok(rows)
}

/// A device's points of one metric.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceValues {
    pub device_id: String,
    /// (ts, value), oldest first.
    pub points: Vec<(i64, f64)>,
}

/// Per-device raw points of `metric` in `[from, to)` for the devices matching `filter`
/// (`None`: all accepted devices of the organization), late points excluded.
pub async fn device_values(
    db: &Db,
    org_id: &str,
    filter: Option<&Expr>,
    metric: &str,
    from: i64,
    to: i64,
) -> AppResult<Vec<DeviceValues>> {
    let scope = filter.map(|e| Scope::Filter(e.clone())).unwrap_or(Scope::All);
    let (cond, binds) = scope_condition(db, org_id, &scope).await?;
    let sql = format!(
        "SELECT ms.device_id, p.ts, p.value FROM metric_points p JOIN metric_series ms ON ms.id = p.series_id \
         WHERE ms.name = $1 AND p.ts >= $2 AND p.ts < $3 AND p.late = 0 \
         AND ms.device_id IN (SELECT d.id FROM devices d WHERE {}) ORDER BY ms.device_id, p.ts",
        number(&cond, 4)
    );
    let q = sqlx::query_as::<_, (String, i64, f64)>(&sql).bind(metric.to_string()).bind(from).bind(to);
    let rows = bind_all(q, &binds).fetch_all(db.pool()).await?;
    let mut out: Vec<DeviceValues> = Vec::new();
    for (d, t, v) in rows {
        match out.last_mut() {
            Some(last) if last.device_id == d => last.points.push((t, v)),
            _ => out.push(DeviceValues { device_id: d, points: vec![(t, v)] }),
        }
    }
    Ok(out)
}

/// A device's values of one metric over a window, reduced.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceWindow {
    pub device_id: String,
    pub count: i64,
    pub min: f64,
    pub max: f64,
    pub avg: f64,
    /// The newest value in the window.
    pub last: f64,
}

/// [`device_values`] reduced per device in SQL (count, min, max, avg, last), late points
/// excluded.
pub async fn device_window(
    db: &Db,
    org_id: &str,
    filter: Option<&Expr>,
    metric: &str,
    from: i64,
    to: i64,
) -> AppResult<Vec<DeviceWindow>> {
    let scope = filter.map(|e| Scope::Filter(e.clone())).unwrap_or(Scope::All);
    window(db, org_id, &scope, metric, from, to, true).await
}

/// [`device_window`] over any scope, late points included (what `/metrics/fleet` shows).
pub async fn top_window(
    db: &Db,
    org_id: &str,
    scope: &Scope,
    metric: &str,
    from: i64,
    to: i64,
) -> AppResult<Vec<DeviceWindow>> {
    window(db, org_id, scope, metric, from, to, false).await
}

async fn window(
    db: &Db,
    org_id: &str,
    scope: &Scope,
    metric: &str,
    from: i64,
    to: i64,
    exclude_late: bool,
) -> AppResult<Vec<DeviceWindow>> {
    if from >= to {
        return Err(AppError::BadRequest(format!("the range is empty: from ({from}) must be before to ({to})")));
    }
    let (cond, binds) = scope_condition(db, org_id, scope).await?;
    let late = if exclude_late { " AND p.late = 0" } else { "" };
    let sql = format!(
        "SELECT ms.device_id, COUNT(*), MIN(p.value), MAX(p.value), SUM(p.value), \
         (SELECT l.value FROM metric_points l WHERE l.series_id = ms.id AND l.ts >= $2 AND l.ts < $3{} \
          ORDER BY l.ts DESC LIMIT 1) \
         FROM metric_points p JOIN metric_series ms ON ms.id = p.series_id \
         WHERE ms.name = $1 AND p.ts >= $2 AND p.ts < $3{late} \
         AND ms.device_id IN (SELECT d.id FROM devices d WHERE {}) GROUP BY ms.id, ms.device_id ORDER BY ms.device_id",
        late.replace("p.", "l."),
        number(&cond, 4)
    );
    let q = sqlx::query_as::<_, (String, i64, f64, f64, f64, f64)>(&sql).bind(metric.to_string()).bind(from).bind(to);
    let rows = bind_all(q, &binds).fetch_all(db.pool()).await?;
    Ok(rows
        .into_iter()
        .map(|(device_id, count, min, max, sum, last)| DeviceWindow {
            device_id,
            count,
            min: finite(min),
            max: finite(max),
            avg: finite(finite(sum) / count.max(1) as f64),
            last: finite(last),
        })
        .collect())
}

/// A stored device event.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct TelemetryEvent {
    pub device_id: String,
    pub id: String,
    /// When it happened on the device, Unix ms.
    pub ts: i64,
    /// When the server stored it, Unix ms.
    pub received_at: i64,
    /// It arrived more than `late_after` after it happened.
    pub late: bool,
    pub name: String,
    pub severity: String,
    /// The event's data, JSON text.
    pub data: String,
}

type EventRow = (String, String, i64, i64, i64, String, String, String);

fn to_event(r: EventRow) -> TelemetryEvent {
    TelemetryEvent {
        device_id: r.0,
        id: r.1,
        ts: r.2,
        received_at: r.3,
        late: r.4 != 0,
        name: r.5,
        severity: r.6,
        data: r.7,
    }
}

/// Events named `name` stored since `since` (by arrival), of the devices matching `filter`,
/// oldest arrival first, at most `limit`.
pub async fn events_since(
    db: &Db,
    org_id: &str,
    filter: Option<&Expr>,
    name: &str,
    since: i64,
    limit: u32,
) -> AppResult<Vec<TelemetryEvent>> {
    let scope = filter.map(|e| Scope::Filter(e.clone())).unwrap_or(Scope::All);
    let (cond, binds) = scope_condition(db, org_id, &scope).await?;
    let sql = format!(
        "SELECT e.device_id, e.id, e.ts, e.received_at, e.late, e.name, e.severity, e.data FROM telemetry_events e \
         WHERE e.name = $1 AND e.received_at >= $2 AND e.device_id IN (SELECT d.id FROM devices d WHERE {}) \
         ORDER BY e.received_at, e.device_id, e.id LIMIT {}",
        number(&cond, 3),
        limit.min(100_000)
    );
    let q = sqlx::query_as::<_, EventRow>(&sql).bind(name.to_string()).bind(since);
    Ok(bind_all(q, &binds).fetch_all(db.pool()).await?.into_iter().map(to_event).collect())
}

/// A device's events in `[from, to)` by their own time, newest first.
pub async fn device_events(
    db: &Db,
    org_id: &str,
    device_id: &str,
    from: i64,
    to: i64,
    limit: u32,
) -> AppResult<Vec<TelemetryEvent>> {
    check_device(db, org_id, device_id).await?;
    let rows: Vec<EventRow> = sqlx::query_as(&format!(
        "SELECT device_id, id, ts, received_at, late, name, severity, data FROM telemetry_events \
         WHERE device_id = $1 AND ts >= $2 AND ts < $3 ORDER BY ts DESC, id LIMIT {}",
        limit.min(10_000)
    ))
    .bind(device_id.to_string())
    .bind(from)
    .bind(to)
    .fetch_all(db.pool())
    .await?;
    Ok(rows.into_iter().map(to_event).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_times() {
        assert_eq!(parse_duration("30s"), Some(30_000));
        assert_eq!(parse_duration("5m"), Some(300_000));
        assert_eq!(parse_duration("2h"), Some(7_200_000));
        assert_eq!(parse_duration("250"), Some(250));
        assert_eq!(parse_duration("5x"), None);
        assert_eq!(parse_duration(""), None);
        assert_eq!(parse_time("now-1h", 10_000_000), Some(6_400_000));
        assert_eq!(parse_time("-10s", 10_000), Some(0));
        assert_eq!(parse_time("1970-01-01T00:00:01Z", 0), Some(1000));
        assert_eq!(parse_time("soon", 0), None);
    }

    #[test]
    fn ranges_are_checked() {
        let now = 1_000_000_000;
        let r = range(Some("now-24h"), None, None, now, 3_600_000).unwrap();
        assert_eq!((r.to - r.from, r.step), (86_400_000, 300_000));
        // Bad input: an empty range, a step under a second, too many buckets, junk.
        assert!(range(Some("now"), Some("now-1h"), None, now, 1).unwrap_err().to_string().contains("empty"));
        assert!(range(None, None, Some("500ms"), now, 3_600_000).unwrap_err().to_string().contains("1s"));
        assert!(range(Some("now-30d"), None, Some("1s"), now, 1).unwrap_err().to_string().contains("buckets"));
        assert!(range(Some("yesterday"), None, None, now, 1).is_err());
        assert_eq!(Resolution::for_step(7_200_000), Resolution::Hour);
        assert_eq!(Resolution::for_step(120_000), Resolution::Minute);
        assert_eq!(Resolution::for_step(1_800_000), Resolution::Quarter);
        assert_eq!(Resolution::for_step(300_000), Resolution::Minute);
        assert_eq!(Resolution::for_step(90_000), Resolution::Raw);
    }

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<f64> = (1..=20).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 10.0);
        assert_eq!(percentile(&v, 95.0), 19.0);
        assert_eq!(percentile(&[3.0], 95.0), 3.0);
    }
}
