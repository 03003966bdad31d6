//! The telemetry write path: one call writes the batches of many devices in one transaction.
//!
//! Points are keyed by (series, ts), so a batch the device sends again (its ack was lost)
//! inserts nothing (`ON CONFLICT DO NOTHING`), and only the rows really inserted are added
//! into the 1-minute, 15-minute and 1-hour rollups. A late point is
//! therefore stored in its place and corrects the buckets it falls in, in the same
//! transaction.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::db::{Backend, Db};

use super::{DAY_MS, DROPPED_METRIC, HOUR_MS, MINUTE_MS, QUARTER_MS};

/// Rows per statement, at most: 2,048 × 6 parameters stays under SQLite's 32,766 and
/// PostgreSQL's 65,535. Smaller statements are powers of two, so a handful of statement
/// texts serve every batch size and stay prepared.
const MAX_ROWS: usize = 2048;
/// How long a count of an organization's series is used before it is counted again.
const ORG_COUNT_TTL: Duration = Duration::from_secs(10);
/// Series ids remembered, at most (then the cache starts again).
const MAX_CACHED: usize = 2_000_000;

/// Schema v9 on SQLite: 15-minute rollups, clustered by series and time like the others.
pub const MIGRATION_9_SQLITE: &str = r#"
CREATE TABLE metric_rollup_15m (
    series_id INTEGER NOT NULL,
    bucket INTEGER NOT NULL,
    count INTEGER NOT NULL,
    sum REAL NOT NULL,
    min REAL NOT NULL,
    max REAL NOT NULL,
    PRIMARY KEY (series_id, bucket)
) WITHOUT ROWID;
INSERT INTO metric_rollup_15m (series_id, bucket, count, sum, min, max)
    SELECT series_id, bucket - bucket % 900000, SUM(count), SUM(sum), MIN(min), MAX(max)
    FROM metric_rollup_1m GROUP BY series_id, bucket - bucket % 900000;
"#;

/// Schema v9 on PostgreSQL.
pub const MIGRATION_9_POSTGRES: &str = r#"
CREATE TABLE metric_rollup_15m (
    series_id BIGINT NOT NULL,
    bucket BIGINT NOT NULL,
    count BIGINT NOT NULL,
    sum DOUBLE PRECISION NOT NULL,
    min DOUBLE PRECISION NOT NULL,
    max DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (series_id, bucket)
);
INSERT INTO metric_rollup_15m (series_id, bucket, count, sum, min, max)
    SELECT series_id, bucket - bucket % 900000, SUM(count), SUM(sum), MIN(min), MAX(max)
    FROM metric_rollup_1m GROUP BY series_id, bucket - bucket % 900000;
"#;

/// One measurement.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    pub name: String,
    /// Unix ms of the measurement.
    pub t: i64,
    pub v: f64,
}

/// One device event.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub id: String,
    pub t: i64,
    pub name: String,
    pub severity: String,
    /// JSON text.
    pub data: String,
}

/// One device's batch, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub device_id: String,
    pub seq: u64,
    pub points: Vec<Point>,
    pub events: Vec<Event>,
    /// The outbox's total drop count.
    pub dropped: u64,
    /// Points left out because their time lay outside the stored window (future, too old).
    pub refused_future: u64,
    pub refused_old: u64,
}

/// What one write did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Written {
    /// Points stored now (not the ones already there).
    pub points: u64,
    /// Of those, late ones.
    pub late: u64,
    pub events: u64,
    /// Per batch (in the order given): metric names left out because making their series
    /// would pass a cap ([`SeriesLimits`]).
    pub refused_series: Vec<u64>,
    /// The points of those names, in all batches.
    pub refused_series_points: u64,
}

/// How many metric series (device + name) may exist: per device, and per organization.
/// A new name over either cap is not stored (its points are left out and counted); the
/// outbox drop counter's series is always made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeriesLimits {
    pub per_device: u64,
    pub per_org: u64,
}

impl Default for SeriesLimits {
    fn default() -> Self {
        SeriesLimits { per_device: 1000, per_org: 1_000_000 }
    }
}

/// Reads every series of these devices into `out`.
async fn read_series(
    tx: &mut crate::db::WriteTx,
    backend: Backend,
    devices: &[&str],
    out: &mut HashMap<(String, String), i64>,
) -> Result<(), sqlx::Error> {
    for chunk in devices.chunks(MAX_ROWS) {
        let sql = format!(
            "SELECT id, device_id, name FROM metric_series WHERE device_id IN {}",
            values(1, chunk.len(), backend)
        );
        let mut q = sqlx::query_as::<_, (i64, String, String)>(&sql);
        for d in chunk {
            q = q.bind(d.to_string());
        }
        for (id, d, name) in q.fetch_all(tx.conn()).await? {
            out.insert((d, name), id);
        }
    }
    Ok(())
}

/// Of the new series `new` (none exists), those the caps allow, in order; the others go to
/// `refused`. `existing` holds every series of the devices concerned.
async fn within_caps<'a>(
    tx: &mut crate::db::WriteTx,
    backend: Backend,
    cache: &Cache,
    new: &[(&'a str, &'a str)],
    existing: &HashMap<(String, String), i64>,
    limits: SeriesLimits,
    refused: &mut HashSet<(&'a str, &'a str)>,
) -> Result<Vec<(&'a str, &'a str)>, sqlx::Error> {
    if new.is_empty() {
        return Ok(Vec::new());
    }
    let mut devices: Vec<&str> = new.iter().map(|(d, _)| *d).collect();
    devices.sort_unstable();
    devices.dedup();
    let mut per_device: HashMap<&str, u64> = devices.iter().map(|d| (*d, 0)).collect();
    for (d, _) in existing.keys() {
        if let Some(n) = per_device.get_mut(d.as_str()) {
            *n += 1;
        }
    }
    // The organizations of the devices with room left, and how many series each has (counted
    // at most every ORG_COUNT_TTL: a device at its cap sending new names costs no count).
    devices.retain(|d| per_device.get(d).is_some_and(|n| *n < limits.per_device));
    let mut org_of: HashMap<String, String> = HashMap::new();
    for chunk in devices.chunks(MAX_ROWS) {
        let sql = format!("SELECT id, org_id FROM devices WHERE id IN {}", values(1, chunk.len(), backend));
        let mut q = sqlx::query_as::<_, (String, String)>(&sql);
        for d in chunk {
            q = q.bind(d.to_string());
        }
        org_of.extend(q.fetch_all(tx.conn()).await?);
    }
    let mut per_org: HashMap<String, u64> = HashMap::new();
    let mut orgs: Vec<&String> = org_of.values().collect();
    orgs.sort_unstable();
    orgs.dedup();
    for org in orgs {
        let cached = {
            let c = cache.org_series.lock().unwrap_or_else(|e| e.into_inner());
            c.get(org).filter(|(_, at)| at.elapsed() < ORG_COUNT_TTL).map(|(n, _)| *n)
        };
        let n = match cached {
            Some(n) => n,
            None => {
                let (n,): (i64,) = sqlx::query_as(
                    "SELECT COUNT(*) FROM metric_series s JOIN devices d ON d.id = s.device_id WHERE d.org_id = $1",
                )
                .bind(org.clone())
                .fetch_one(tx.conn())
                .await?;
                let n = u64::try_from(n).unwrap_or(0);
                cache.org_series.lock().unwrap_or_else(|e| e.into_inner()).insert(org.clone(), (n, Instant::now()));
                n
            }
        };
        per_org.insert(org.clone(), n);
    }
    let mut allowed = Vec::with_capacity(new.len());
    for &(d, name) in new {
        if name == DROPPED_METRIC {
            allowed.push((d, name));
            continue;
        }
        let dn = per_device.entry(d).or_default();
        let org = org_of.get(d).and_then(|o| per_org.get_mut(o));
        let org_full = org.as_ref().is_some_and(|n| **n >= limits.per_org);
        if *dn >= limits.per_device || org_full {
            refused.insert((d, name));
            continue;
        }
        *dn += 1;
        if let Some(n) = org {
            *n += 1;
        }
        allowed.push((d, name));
    }
    // What this write adds, so that the cached counts stay close until the next count.
    let mut c = cache.org_series.lock().unwrap_or_else(|e| e.into_inner());
    for (org, n) in per_org {
        if let Some(e) = c.get_mut(&org) {
            e.0 = e.0.max(n);
        }
    }
    Ok(allowed)
}

/// Series ids by device and name, and (PostgreSQL) the day partitions known to exist.
#[derive(Debug, Default)]
pub struct Cache {
    series: Mutex<HashMap<String, HashMap<String, i64>>>,
    cached: std::sync::atomic::AtomicUsize,
    days: Mutex<HashSet<i64>>,
    /// Series per organization as last counted, and when (for the caps).
    org_series: Mutex<HashMap<String, (u64, Instant)>>,
}

impl Cache {
    fn put(&self, rows: Vec<(i64, String, String)>) {
        let mut s = self.series.lock().unwrap_or_else(|e| e.into_inner());
        let n = self.cached.fetch_add(rows.len(), std::sync::atomic::Ordering::Relaxed);
        if n > MAX_CACHED {
            s.clear();
            self.cached.store(rows.len(), std::sync::atomic::Ordering::Relaxed);
        }
        for (id, device, name) in rows {
            s.entry(device).or_default().insert(name, id);
        }
    }

    /// Forgets the partitions (after retention dropped some).
    pub fn forget_days(&self) {
        self.days.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
}

/// Statement sizes for `n` rows: full chunks, then powers of two.
fn chunk_sizes(mut n: usize) -> Vec<usize> {
    let mut out = Vec::new();
    while n >= MAX_ROWS {
        out.push(MAX_ROWS);
        n -= MAX_ROWS;
    }
    while n > 0 {
        let p = 1usize << (usize::BITS - 1 - n.leading_zeros());
        out.push(p);
        n -= p;
    }
    out
}

/// `(?, ?, …), (…)` (SQLite) or `($1, $2, …), (…)` (PostgreSQL) for `rows` rows of `cols`
/// parameters. SQLite looks numbered parameters up by name, which makes preparing and binding
/// a statement of thousands of them quadratic (1.5 s instead of 40 ms for 2,048 rows of 4).
fn values(rows: usize, cols: usize, backend: Backend) -> String {
    let mut s = String::with_capacity(rows * cols * 6);
    for r in 0..rows {
        if r > 0 {
            s.push(',');
        }
        s.push('(');
        for c in 0..cols {
            if c > 0 {
                s.push(',');
            }
            match backend {
                Backend::Sqlite => s.push('?'),
                Backend::Postgres => {
                    s.push('$');
                    s.push_str(&(r * cols + c + 1).to_string());
                }
            }
        }
        s.push(')');
    }
    s
}

/// Makes the day partitions of `metric_points` these timestamps need (PostgreSQL).
pub async fn ensure_partitions(db: &Db, cache: &Cache, days: impl IntoIterator<Item = i64>) -> Result<(), sqlx::Error> {
    if db.backend() != Backend::Postgres {
        return Ok(());
    }
    let missing: Vec<i64> = {
        let known = cache.days.lock().unwrap_or_else(|e| e.into_inner());
        let mut m: Vec<i64> = days.into_iter().filter(|d| !known.contains(d)).collect();
        m.sort_unstable();
        m.dedup();
        m
    };
    for day in missing {
        let sql = format!(
            "CREATE TABLE IF NOT EXISTS metric_points_d{day} PARTITION OF metric_points FOR VALUES FROM ({}) TO ({})",
            day * DAY_MS,
            (day + 1) * DAY_MS
        );
        if let Err(e) = sqlx::raw_sql(&sql).execute(db.pool()).await {
            // Another replica made it at the same moment: fine. Anything else is an error.
            let exists: Option<(i64,)> =
                sqlx::query_as("SELECT 1::BIGINT FROM pg_class WHERE relname = $1 AND relkind = 'r'")
                    .bind(format!("metric_points_d{day}"))
                    .fetch_optional(db.pool())
                    .await?;
            if exists.is_none() {
                return Err(e);
            }
        }
        cache.days.lock().unwrap_or_else(|e| e.into_inner()).insert(day);
    }
    Ok(())
}

/// Writes these batches in one transaction (through the writer queue on SQLite). `now` is the
/// time of arrival; a point older than `now - late_after_ms` is late.
pub async fn write(
    db: &Db,
    cache: &Cache,
    batches: &[Batch],
    now: i64,
    late_after_ms: i64,
) -> Result<Written, sqlx::Error> {
    write_limited(db, cache, batches, now, late_after_ms, SeriesLimits::default()).await
}

/// As [`write`], with the series caps given.
pub async fn write_limited(
    db: &Db,
    cache: &Cache,
    batches: &[Batch],
    now: i64,
    late_after_ms: i64,
    limits: SeriesLimits,
) -> Result<Written, sqlx::Error> {
    let mut written = Written::default();
    // The dropped counter (once the outbox dropped anything) as a point of its own series, at
    // the batch's newest time, so a resent batch repeats it exactly.
    let dropped_points: Vec<Option<Point>> = batches
        .iter()
        .map(|b| {
            (b.dropped > 0).then(|| Point {
                name: DROPPED_METRIC.into(),
                t: b.points.iter().map(|p| p.t).chain(b.events.iter().map(|e| e.t)).max().unwrap_or(now),
                v: b.dropped as f64,
            })
        })
        .collect();
    if db.backend() == Backend::Postgres {
        let days = batches.iter().flat_map(|b| b.points.iter().map(|p| p.t.div_euclid(DAY_MS)));
        let days: Vec<i64> = days.chain(dropped_points.iter().flatten().map(|p| p.t.div_euclid(DAY_MS))).collect();
        ensure_partitions(db, cache, days).await?;
    }
    let mut tx = db.begin_write().await?;

    // Series ids: cached (one lock for the whole write), else made (ON CONFLICT: another
    // replica may make them too).
    let mut ids: Vec<Option<i64>> = Vec::with_capacity(batches.iter().map(|b| b.points.len() + 1).sum());
    let mut missing: Vec<(&str, &str)> = Vec::new();
    {
        let series = cache.series.lock().unwrap_or_else(|e| e.into_inner());
        let mut seen: HashSet<(&str, &str)> = HashSet::new();
        for (b, dp) in batches.iter().zip(&dropped_points) {
            let known = series.get(&b.device_id);
            for p in b.points.iter().chain(dp.iter()) {
                let id = known.and_then(|m| m.get(&p.name)).copied();
                if id.is_none() && seen.insert((&b.device_id, &p.name)) {
                    missing.push((&b.device_id, &p.name));
                }
                ids.push(id);
            }
        }
    }
    // Series not in the cache: those that exist are read back; new ones are made within the
    // caps (per device, per organization); the names over a cap are refused.
    let mut fresh: HashMap<(String, String), i64> = HashMap::new();
    let mut refused: HashSet<(&str, &str)> = HashSet::new();
    if !missing.is_empty() {
        let devices: Vec<&str> = {
            let mut d: Vec<&str> = missing.iter().map(|(d, _)| *d).collect();
            d.sort_unstable();
            d.dedup();
            d
        };
        read_series(&mut tx, db.backend(), &devices, &mut fresh).await?;
        let new: Vec<(&str, &str)> =
            missing.iter().copied().filter(|(d, n)| !fresh.contains_key(&(d.to_string(), n.to_string()))).collect();
        let allowed = within_caps(&mut tx, db.backend(), cache, &new, &fresh, limits, &mut refused).await?;
        let mut at = 0;
        for n in chunk_sizes(allowed.len()) {
            let sql = format!(
                "INSERT INTO metric_series (device_id, name) VALUES {} ON CONFLICT (device_id, name) DO NOTHING",
                values(n, 2, db.backend())
            );
            let mut q = sqlx::query(&sql);
            for (d, name) in &allowed[at..at + n] {
                q = q.bind(d.to_string()).bind(name.to_string());
            }
            q.execute(tx.conn()).await?;
            at += n;
        }
        if !allowed.is_empty() {
            read_series(&mut tx, db.backend(), &devices, &mut fresh).await?;
        }
    }

    // Points, in key order, without duplicates within this write.
    let mut rows: Vec<(i64, i64, f64, i64)> = Vec::with_capacity(ids.len());
    let late_before = now.saturating_sub(late_after_ms);
    let mut i = 0;
    for (b, dp) in batches.iter().zip(&dropped_points) {
        let mut names: HashSet<&str> = HashSet::new();
        for p in b.points.iter().chain(dp.iter()) {
            let id = ids[i].or_else(|| fresh.get(&(b.device_id.clone(), p.name.clone())).copied());
            i += 1;
            let Some(id) = id else {
                if refused.contains(&(b.device_id.as_str(), p.name.as_str())) {
                    written.refused_series_points += 1;
                    names.insert(&p.name);
                }
                continue;
            };
            rows.push((id, p.t, p.v, i64::from(p.t < late_before)));
        }
        written.refused_series.push(names.len() as u64);
    }
    rows.sort_unstable_by_key(|r| (r.0, r.1));
    rows.dedup_by_key(|r| (r.0, r.1));

    // Each statement inserts without RETURNING first (decoding every inserted row back costs
    // more than the insert); when it inserted fewer rows than it carried (a batch sent again),
    // it is rolled back to a savepoint and run again with RETURNING, which names the rows
    // really inserted — only those go into the rollups.
    let mut inserted: Vec<(i64, i64, f64)> = Vec::with_capacity(rows.len());
    let mut at = 0;
    for n in chunk_sizes(rows.len()) {
        let chunk = &rows[at..at + n];
        at += n;
        let insert = format!(
            "INSERT INTO metric_points (series_id, ts, value, late) VALUES {} ON CONFLICT (series_id, ts) DO NOTHING",
            values(n, 4, db.backend())
        );
        sqlx::query("SAVEPOINT telemetry_points").execute(tx.conn()).await?;
        let mut q = sqlx::query(&insert);
        for r in chunk {
            q = q.bind(r.0).bind(r.1).bind(r.2).bind(r.3);
        }
        let done = q.execute(tx.conn()).await?.rows_affected();
        if done == n as u64 || done == 0 {
            sqlx::query("RELEASE SAVEPOINT telemetry_points").execute(tx.conn()).await?;
            if done > 0 {
                inserted.extend(chunk.iter().map(|r| (r.0, r.1, r.2)));
            }
            continue;
        }
        sqlx::query("ROLLBACK TO SAVEPOINT telemetry_points").execute(tx.conn()).await?;
        sqlx::query("RELEASE SAVEPOINT telemetry_points").execute(tx.conn()).await?;
        let sql = format!("{insert} RETURNING series_id, ts, value");
        let mut q = sqlx::query_as::<_, (i64, i64, f64)>(&sql);
        for r in chunk {
            q = q.bind(r.0).bind(r.1).bind(r.2).bind(r.3);
        }
        inserted.extend(q.fetch_all(tx.conn()).await?);
    }
    written.points = inserted.len() as u64;
    written.late = inserted.iter().filter(|(_, t, _)| *t < late_before).count() as u64;

    // Rollups: the inserted rows added into their buckets.
    for (table, size) in
        [("metric_rollup_1m", MINUTE_MS), ("metric_rollup_15m", QUARTER_MS), ("metric_rollup_1h", HOUR_MS)]
    {
        let mut buckets: HashMap<(i64, i64), (i64, f64, f64, f64)> = HashMap::new();
        for &(s, t, v) in &inserted {
            let e = buckets.entry((s, t - t.rem_euclid(size))).or_insert((0, 0.0, f64::INFINITY, f64::NEG_INFINITY));
            e.0 += 1;
            e.1 += v;
            e.2 = e.2.min(v);
            e.3 = e.3.max(v);
        }
        let mut buckets: Vec<_> = buckets.into_iter().collect();
        buckets.sort_unstable_by_key(|(k, _)| *k);
        let (lo, hi) = match db.backend() {
            Backend::Sqlite => ("MIN", "MAX"),
            Backend::Postgres => ("LEAST", "GREATEST"),
        };
        let mut at = 0;
        for n in chunk_sizes(buckets.len()) {
            let sql = format!(
                "INSERT INTO {table} (series_id, bucket, count, sum, min, max) VALUES {} \
                 ON CONFLICT (series_id, bucket) DO UPDATE SET count = {table}.count + excluded.count, \
                 sum = {table}.sum + excluded.sum, min = {lo}({table}.min, excluded.min), \
                 max = {hi}({table}.max, excluded.max)",
                values(n, 6, db.backend())
            );
            let mut q = sqlx::query(&sql);
            for ((s, b), (c, sum, min, max)) in &buckets[at..at + n] {
                q = q.bind(*s).bind(*b).bind(*c).bind(*sum).bind(*min).bind(*max);
            }
            q.execute(tx.conn()).await?;
            at += n;
        }
    }

    // Events, idempotent by (device, id).
    let events: Vec<(&str, &Event)> =
        batches.iter().flat_map(|b| b.events.iter().map(move |e| (b.device_id.as_str(), e))).collect();
    let mut at = 0;
    for n in chunk_sizes(events.len()) {
        let sql = format!(
            "INSERT INTO telemetry_events (device_id, id, ts, received_at, late, name, severity, data) VALUES {} \
             ON CONFLICT (device_id, id) DO NOTHING",
            values(n, 8, db.backend())
        );
        let mut q = sqlx::query(&sql);
        for (d, e) in &events[at..at + n] {
            q = q
                .bind(d.to_string())
                .bind(e.id.clone())
                .bind(e.t)
                .bind(now)
                .bind(i64::from(e.t < late_before))
                .bind(e.name.clone())
                .bind(e.severity.clone())
                .bind(e.data.clone());
        }
        written.events += q.execute(tx.conn()).await?.rows_affected();
        at += n;
    }

    // Per device: the newest batch stored and the outbox's drop counter.
    let mut devices: HashMap<&str, (i64, i64)> = HashMap::new();
    for b in batches {
        let e = devices.entry(&b.device_id).or_insert((0, 0));
        e.0 = e.0.max(i64::try_from(b.seq).unwrap_or(i64::MAX));
        e.1 = e.1.max(i64::try_from(b.dropped).unwrap_or(i64::MAX));
    }
    let mut devices: Vec<_> = devices.into_iter().collect();
    devices.sort_unstable();
    let mut at = 0;
    let (hi, t) = match db.backend() {
        Backend::Sqlite => ("MAX", "telemetry_devices"),
        Backend::Postgres => ("GREATEST", "telemetry_devices"),
    };
    for n in chunk_sizes(devices.len()) {
        let sql = format!(
            "INSERT INTO telemetry_devices (device_id, last_seq, dropped, updated_at) VALUES {} \
             ON CONFLICT (device_id) DO UPDATE SET last_seq = {hi}({t}.last_seq, excluded.last_seq), \
             dropped = {hi}({t}.dropped, excluded.dropped), updated_at = excluded.updated_at",
            values(n, 4, db.backend())
        );
        let mut q = sqlx::query(&sql);
        for (d, (seq, dropped)) in &devices[at..at + n] {
            q = q.bind(d.to_string()).bind(*seq).bind(*dropped).bind(now);
        }
        q.execute(tx.conn()).await?;
        at += n;
    }

    tx.commit().await?;
    if !fresh.is_empty() {
        cache.put(fresh.into_iter().map(|((d, n), id)| (id, d, n)).collect());
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_come_in_few_sizes() {
        assert_eq!(chunk_sizes(0), Vec::<usize>::new());
        assert_eq!(chunk_sizes(1), vec![1]);
        assert_eq!(chunk_sizes(7), vec![4, 2, 1]);
        assert_eq!(chunk_sizes(5000), vec![2048, 2048, 512, 256, 128, 8]);
        assert_eq!(chunk_sizes(5000).iter().sum::<usize>(), 5000);
        assert_eq!(values(2, 3, Backend::Postgres), "($1,$2,$3),($4,$5,$6)");
        assert_eq!(values(2, 2, Backend::Sqlite), "(?,?),(?,?)");
    }
}
