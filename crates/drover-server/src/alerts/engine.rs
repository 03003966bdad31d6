//! The alert evaluator.
//!
//! Every `interval` each replica tries to take the lease row `alerts` in `job_leases`
//! (an upsert that succeeds only for the holder or once the lease has expired); the one that
//! holds it evaluates every enabled rule, so exactly one replica evaluates at a time and
//! another takes over within three intervals of the holder stopping (design decision 3).
//!
//! Per rule, each key (a device, or `""` for a fleet-level rule) has one row in `alerts`:
//!
//! - the condition holds: no row or `resolved` → `pending` (or straight to `firing` when the
//!   rule's `pending_s` is 0); `pending` for `pending_s` → `firing`; `firing` stays `firing`
//!   (one firing alert per key, notified once — de-duplication);
//! - it does not hold: `firing` → `resolved` (notified); `pending` → `resolved` (not
//!   notified: it never fired).
//!
//! **Flap suppression:** a key whose state changed between firing and resolved
//! `flap_changes` times within `flap_window_s` becomes *flapping*: one `flapping`
//! notification, then no notification for its changes until it has kept one state for
//! `flap_window_s`; then its state at that moment is notified and it stops flapping.
//!
//! **Late data never fires as if now:** metric points stored with `late = 1` are left out of
//! every window, and an event that arrived late is written to the history as `late_event`,
//! never fired or notified.
//!
//! Every change of state is written to `alert_history`; a notification is queued (in the same
//! transaction) for each of the rule's channels, marked `silenced` instead of sent when an
//! active silence matches.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::types::{AbsenceMode, Aggregate, Condition};
use crate::db::{Bind, Db};
use crate::error::{AppError, AppResult};
use crate::ops::new_id;
use crate::time::to_rfc3339;

pub const LEASE_NAME: &str = "alerts";

/// A rule as the evaluator reads it.
#[derive(Debug, Clone)]
struct Rule {
    id: String,
    org_id: String,
    name: String,
    severity: String,
    filter: Option<String>,
    group: Option<String>,
    condition: Condition,
    pending_ms: i64,
    flap_window_ms: i64,
    flap_changes: usize,
    channels: Vec<String>,
    event_cursor: i64,
}

/// What the condition says about one key now.
#[derive(Debug, Clone)]
struct Obs {
    value: Option<f64>,
    message: String,
}

#[derive(Debug, Clone)]
struct State {
    state: String,
    since: i64,
    transitions: Vec<i64>,
    flapping: bool,
}

/// Takes or renews the evaluation lease for `lease_ms`; true when this replica holds it.
pub async fn take_lease(db: &Db, holder: &str, now: i64, lease_ms: i64) -> AppResult<bool> {
    let mut tx = db.begin_write().await?;
    let n = sqlx::query(
        "INSERT INTO job_leases (name, holder, expires_at, last_run_at) VALUES ($1, $2, $3, $4) \
         ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, expires_at = excluded.expires_at, \
         last_run_at = excluded.last_run_at WHERE job_leases.holder = excluded.holder OR job_leases.expires_at < $4",
    )
    .bind(LEASE_NAME)
    .bind(holder.to_string())
    .bind(now + lease_ms)
    .bind(now)
    .execute(tx.conn())
    .await?
    .rows_affected();
    tx.commit().await?;
    Ok(n == 1)
}

/// Runs the evaluator until `stop`: every `interval`, if this replica holds the lease.
pub async fn run(db: Db, interval: Duration, mut stop: watch::Receiver<bool>) {
    let holder = format!("droverd/{}", uuid::Uuid::now_v7().simple());
    let lease_ms = i64::try_from(interval.as_millis().saturating_mul(3)).unwrap_or(i64::MAX).max(3000);
    loop {
        let now = crate::time::now_ms();
        match take_lease(&db, &holder, now, lease_ms).await {
            Ok(true) => {
                if let Err(e) = evaluate_all(&db, now).await {
                    tracing::warn!("alert evaluation: {e}");
                }
            }
            Ok(false) => {}
            Err(e) => tracing::warn!("alert evaluation lease: {e}"),
        }
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            _ = tokio::time::sleep(interval) => {}
        }
    }
}

/// One evaluation if `holder` gets the lease; the number of rules evaluated, or `None`
/// when another replica holds the lease. Time is an input, so tests can move it.
pub async fn tick(db: &Db, holder: &str, now: i64) -> AppResult<Option<usize>> {
    if !take_lease(db, holder, now, 15_000).await? {
        return Ok(None);
    }
    evaluate_all(db, now).await.map(Some)
}

type RuleRow = (String, String, String, String, Option<String>, Option<String>, String, i64, i64, i64, String, i64);

async fn evaluate_all(db: &Db, now: i64) -> AppResult<usize> {
    let rows: Vec<RuleRow> = sqlx::query_as(
        "SELECT id, org_id, name, severity, filter, group_id, condition, pending_s, flap_window_s, flap_changes, \
         channels, event_cursor FROM alert_rules WHERE enabled = 1 ORDER BY org_id, id",
    )
    .fetch_all(db.pool())
    .await?;
    let mut n = 0;
    for r in rows {
        let Ok(condition) = serde_json::from_str::<Condition>(&r.6) else {
            tracing::warn!(rule = r.0, "alert rule with an unreadable condition skipped");
            continue;
        };
        let rule = Rule {
            id: r.0,
            org_id: r.1,
            name: r.2,
            severity: r.3,
            filter: r.4,
            group: r.5,
            condition,
            pending_ms: r.7.saturating_mul(1000),
            flap_window_ms: r.8.saturating_mul(1000),
            flap_changes: usize::try_from(r.9).unwrap_or(4),
            channels: serde_json::from_str(&r.10).unwrap_or_default(),
            event_cursor: r.11,
        };
        match evaluate(db, &rule, now).await {
            Ok(()) => n += 1,
            Err(e) => tracing::warn!(rule = rule.id, name = rule.name, "alert rule not evaluated: {e}"),
        }
    }
    Ok(n)
}

fn binds_query<'q>(sql: &'q str, binds: &'q [Bind]) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>> {
    let mut q = sqlx::query(sql);
    for b in binds {
        q = match b {
            Bind::Int(i) => q.bind(*i),
            Bind::Text(s) => q.bind(s.clone()),
        };
    }
    q
}

/// Numbers `?` placeholders from `$start`.
fn number(sql: &str, start: usize) -> String {
    let mut out = String::with_capacity(sql.len() + 16);
    let mut n = start;
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

/// The selected devices as `d.id IN (…)`-able SQL, with binds after `lead` leading binds.
async fn devices_sql(db: &Db, rule: &Rule, lead: usize) -> AppResult<(String, Vec<Bind>)> {
    let sel = super::rules::selection(db, &rule.org_id, rule.filter.as_deref(), rule.group.as_deref()).await?;
    let sql = format!("SELECT d.id FROM devices d WHERE d.org_id = ? AND d.status = 'accepted' AND {}", sel.sql);
    let mut binds = vec![Bind::Text(rule.org_id.clone())];
    binds.extend(sel.binds);
    Ok((number(&sql, lead + 1), binds))
}

fn fmt_value(v: f64) -> String {
    let r = (v * 100.0).round() / 100.0;
    format!("{r}")
}

async fn observe(db: &Db, rule: &Rule, now: i64) -> AppResult<HashMap<String, Obs>> {
    let mut out = HashMap::new();
    match &rule.condition {
        Condition::Threshold { metric, op, threshold, window_s, aggregate } => {
            let (devices, dbinds) = devices_sql(db, rule, 4).await?;
            let sql = format!(
                "SELECT s.device_id, AVG(p.value), MIN(p.value), MAX(p.value), COUNT(*), \
                 SUM(CASE WHEN p.value {} $4 THEN 1 ELSE 0 END) \
                 FROM metric_series s JOIN metric_points p ON p.series_id = s.id \
                 WHERE s.name = $1 AND p.ts > $2 AND p.ts <= $3 AND p.late = 0 AND s.device_id IN ({devices}) \
                 GROUP BY s.device_id",
                op.as_str()
            );
            let mut q = sqlx::query_as::<_, (String, f64, f64, f64, i64, i64)>(&sql)
                .bind(metric.clone())
                .bind(now - i64::try_from(*window_s).unwrap_or(0) * 1000)
                .bind(now)
                .bind(*threshold);
            for b in &dbinds {
                q = match b {
                    Bind::Int(i) => q.bind(*i),
                    Bind::Text(s) => q.bind(s.clone()),
                };
            }
            for (device, avg, min, max, count, holding) in q.fetch_all(db.pool()).await? {
                let (value, holds) = match aggregate {
                    Aggregate::Avg => (avg, op.holds(avg, *threshold)),
                    Aggregate::Min => (min, op.holds(min, *threshold)),
                    Aggregate::Max => (max, op.holds(max, *threshold)),
                    Aggregate::Every => (avg, count > 0 && holding == count),
                };
                if holds {
                    let message = format!(
                        "{}({metric}) = {} {} {threshold} over the last {window_s}s ({count} points)",
                        aggregate.as_str(),
                        fmt_value(value),
                        op.symbol()
                    );
                    out.insert(device, Obs { value: Some(value), message });
                }
            }
        }
        Condition::FleetMetric { metric, op, threshold, window_s, aggregate } => {
            let (devices, dbinds) = devices_sql(db, rule, 3).await?;
            let sql = format!(
                "SELECT AVG(p.value), MIN(p.value), MAX(p.value), COUNT(*) \
                 FROM metric_series s JOIN metric_points p ON p.series_id = s.id \
                 WHERE s.name = $1 AND p.ts > $2 AND p.ts <= $3 AND p.late = 0 AND s.device_id IN ({devices})"
            );
            let mut q = sqlx::query_as::<_, (Option<f64>, Option<f64>, Option<f64>, i64)>(&sql)
                .bind(metric.clone())
                .bind(now - i64::try_from(*window_s).unwrap_or(0) * 1000)
                .bind(now);
            for b in &dbinds {
                q = match b {
                    Bind::Int(i) => q.bind(*i),
                    Bind::Text(s) => q.bind(s.clone()),
                };
            }
            let (avg, min, max, count) = q.fetch_one(db.pool()).await?;
            let value = match aggregate {
                Aggregate::Min => min,
                Aggregate::Max => max,
                _ => avg,
            };
            if let Some(v) = value
                && count > 0
                && op.holds(v, *threshold)
            {
                let message = format!(
                    "fleet {}({metric}) = {} {} {threshold} over the last {window_s}s ({count} points)",
                    aggregate.as_str(),
                    fmt_value(v),
                    op.symbol()
                );
                out.insert(String::new(), Obs { value: Some(v), message });
            }
        }
        Condition::FleetOffline { percent } => {
            let (devices, dbinds) = devices_sql(db, rule, 0).await?;
            let sql = format!(
                "SELECT COUNT(*), COALESCE(SUM(CASE WHEN x.online = 0 THEN 1 ELSE 0 END), 0) FROM devices x \
                 WHERE x.id IN ({devices})"
            );
            let (total, offline): (i64, i64) = bind_as(sqlx::query_as(&sql), &dbinds).fetch_one(db.pool()).await?;
            if total > 0 {
                let share = offline as f64 * 100.0 / total as f64;
                if share > *percent {
                    let message = format!("{offline} of {total} devices offline ({}% > {percent}%)", fmt_value(share));
                    out.insert(String::new(), Obs { value: Some(share), message });
                }
            }
        }
        Condition::Absence { mode, minutes } => {
            let cutoff = now - i64::try_from(*minutes).unwrap_or(0) * 60_000;
            let (devices, dbinds) = devices_sql(db, rule, 1).await?;
            let sql = match mode {
                AbsenceMode::Offline => format!(
                    "SELECT x.id, x.last_seen_at FROM devices x WHERE x.online = 0 AND x.last_seen_at IS NOT NULL \
                     AND x.last_seen_at < $1 AND x.id IN ({devices})"
                ),
                // Devices that have sent telemetry before, but no point stamped after the cutoff.
                AbsenceMode::Silent => format!(
                    "SELECT x.id, (SELECT MAX(p.ts) FROM metric_series s JOIN metric_points p ON p.series_id = s.id \
                     WHERE s.device_id = x.id) FROM devices x \
                     WHERE EXISTS (SELECT 1 FROM metric_series s0 WHERE s0.device_id = x.id) \
                     AND NOT EXISTS (SELECT 1 FROM metric_series s JOIN metric_points p ON p.series_id = s.id \
                     WHERE s.device_id = x.id AND p.ts > $1) AND x.id IN ({devices})"
                ),
            };
            let rows: Vec<(String, Option<i64>)> =
                bind_as(sqlx::query_as(&sql).bind(cutoff), &dbinds).fetch_all(db.pool()).await?;
            for (device, last) in rows {
                let what = if *mode == AbsenceMode::Offline { "offline" } else { "silent (no telemetry)" };
                let message = match last {
                    Some(l) => format!("{what} since {} (more than {minutes}m)", to_rfc3339(l)),
                    None => format!("{what} for more than {minutes}m"),
                };
                out.insert(device, Obs { value: None, message });
            }
        }
        Condition::Event { name, min_severity, resolve_after_s } => {
            let like = crate::filter::glob_to_like(name);
            let severities: Vec<&str> = match min_severity.as_deref() {
                Some("critical") => vec!["critical"],
                Some("warning") => vec!["warning", "critical"],
                _ => vec!["info", "warning", "critical"],
            };
            let sev_sql = severities.iter().map(|s| format!("'{s}'")).collect::<Vec<_>>().join(", ");
            let (devices, dbinds) = devices_sql(db, rule, 3).await?;
            let from = now - i64::try_from(*resolve_after_s).unwrap_or(0) * 1000;
            let sql = format!(
                "SELECT e.device_id, MAX(e.received_at), COUNT(*), MAX(e.name) FROM telemetry_events e \
                 WHERE e.late = 0 AND e.name LIKE $1 ESCAPE '\\' AND e.received_at > $2 AND e.received_at <= $3 \
                 AND e.severity IN ({sev_sql}) AND e.device_id IN ({devices}) GROUP BY e.device_id"
            );
            let rows: Vec<(String, i64, i64, String)> =
                bind_as(sqlx::query_as(&sql).bind(like).bind(from).bind(now), &dbinds).fetch_all(db.pool()).await?;
            for (device, last, count, ev) in rows {
                let message =
                    format!("event {ev} ({count} in the last {resolve_after_s}s, last at {})", to_rfc3339(last));
                out.insert(device, Obs { value: Some(count as f64), message });
            }
        }
    }
    Ok(out)
}

fn bind_as<'q, O>(
    mut q: sqlx::query::QueryAs<'q, sqlx::Any, O, sqlx::any::AnyArguments<'q>>,
    binds: &[Bind],
) -> sqlx::query::QueryAs<'q, sqlx::Any, O, sqlx::any::AnyArguments<'q>> {
    for b in binds {
        q = match b {
            Bind::Int(i) => q.bind(*i),
            Bind::Text(s) => q.bind(s.clone()),
        };
    }
    q
}

/// Late events that arrived since the rule's cursor: recorded in the history, never fired.
async fn record_late_events(db: &Db, rule: &Rule, now: i64) -> AppResult<()> {
    let Condition::Event { name, .. } = &rule.condition else { return Ok(()) };
    let (devices, dbinds) = devices_sql(db, rule, 3).await?;
    let sql = format!(
        "SELECT e.device_id, e.id, e.name, e.ts, e.received_at FROM telemetry_events e \
         WHERE e.late = 1 AND e.name LIKE $1 ESCAPE '\\' AND e.received_at > $2 AND e.received_at <= $3 \
         AND e.device_id IN ({devices}) ORDER BY e.received_at LIMIT 1000"
    );
    let rows: Vec<(String, String, String, i64, i64)> = bind_as(
        sqlx::query_as(&sql).bind(crate::filter::glob_to_like(name)).bind(rule.event_cursor).bind(now),
        &dbinds,
    )
    .fetch_all(db.pool())
    .await?;
    let mut tx = db.begin_write().await?;
    for (device, id, ev, ts, received) in rows {
        let message = format!(
            "late event {ev} (id {id}) from {}, received {}: stored, not fired",
            to_rfc3339(ts),
            to_rfc3339(received)
        );
        add_history(tx.conn(), rule, &device, now, "late_event", &message).await?;
    }
    sqlx::query("UPDATE alert_rules SET event_cursor = $1 WHERE id = $2")
        .bind(now)
        .bind(rule.id.clone())
        .execute(tx.conn())
        .await?;
    tx.commit().await?;
    Ok(())
}

async fn add_history(
    conn: &mut sqlx::AnyConnection,
    rule: &Rule,
    key: &str,
    at: i64,
    event: &str,
    message: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO alert_history (id, org_id, rule_id, rule_name, alert_key, at, event, message) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(new_id())
    .bind(rule.org_id.clone())
    .bind(rule.id.clone())
    .bind(rule.name.clone())
    .bind(key.to_string())
    .bind(at)
    .bind(event.to_string())
    .bind(message.to_string())
    .execute(conn)
    .await?;
    Ok(())
}

/// Active silences of an organization: (rule id, device filter).
pub async fn active_silences(db: &Db, org: &str, now: i64) -> AppResult<Vec<(Option<String>, Option<String>)>> {
    Ok(sqlx::query_as(
        "SELECT rule_id, filter FROM alert_silences WHERE org_id = $1 AND starts_at <= $2 AND ends_at > $2",
    )
    .bind(org.to_string())
    .bind(now)
    .fetch_all(db.pool())
    .await?)
}

/// True when one of `silences` matches the rule and the key (a device, or `""`: fleet).
pub async fn silenced(
    db: &Db,
    org: &str,
    silences: &[(Option<String>, Option<String>)],
    rule_id: &str,
    key: &str,
) -> AppResult<bool> {
    for (rule, filter) in silences {
        if rule.as_deref().is_some_and(|r| r != rule_id) {
            continue;
        }
        match filter {
            None => return Ok(true),
            Some(_) if key.is_empty() => continue,
            Some(f) => {
                let sel = super::rules::selection(db, org, Some(f), None).await?;
                let sql =
                    number(&format!("SELECT 1 FROM devices d WHERE d.id = ? AND d.org_id = ? AND {}", sel.sql), 1);
                let mut binds = vec![Bind::Text(key.to_string()), Bind::Text(org.to_string())];
                binds.extend(sel.binds);
                if binds_query(&sql, &binds).fetch_optional(db.pool()).await?.is_some() {
                    return Ok(true);
                }
            }
        }
    }
    Ok(false)
}

async fn evaluate(db: &Db, rule: &Rule, now: i64) -> AppResult<()> {
    if matches!(rule.condition, Condition::Event { .. }) {
        record_late_events(db, rule, now).await?;
    }
    let holding = observe(db, rule, now).await?;
    let rows: Vec<(String, String, i64, String, i64)> =
        sqlx::query_as("SELECT alert_key, state, since, transitions, flapping FROM alerts WHERE rule_id = $1")
            .bind(rule.id.clone())
            .fetch_all(db.pool())
            .await?;
    let mut states: HashMap<String, State> = rows
        .into_iter()
        .map(|(k, state, since, t, f)| {
            (k, State { state, since, transitions: serde_json::from_str(&t).unwrap_or_default(), flapping: f != 0 })
        })
        .collect();
    let mut keys: HashSet<String> = holding.keys().cloned().collect();
    keys.extend(states.iter().filter(|(_, s)| s.state != "resolved" || s.flapping).map(|(k, _)| k.clone()));
    if keys.is_empty() {
        return Ok(());
    }
    let silences = Arc::new(active_silences(db, &rule.org_id, now).await?);
    let mut keys: Vec<String> = keys.into_iter().collect();
    keys.sort();
    for key in keys {
        let obs = holding.get(&key);
        let prev = states.remove(&key);
        step(db, rule, &key, prev, obs, now, &silences).await?;
    }
    Ok(())
}

// `value` is bound as a number with a flag beside it, never as a NULL: on PostgreSQL a
// statement cached with a NULL of another type refuses a later float (binary format).

/// What to write for one key.
struct Plan {
    state: String,
    since: i64,
    fired_at: Option<i64>,
    resolved_at: Option<i64>,
    transitions: Vec<i64>,
    flapping: bool,
    history: Vec<(&'static str, String)>,
    notify: Option<&'static str>,
}

/// The state machine of one key; pure.
fn plan(rule: &Rule, prev: Option<&State>, obs: Option<&Obs>, now: i64) -> Option<Plan> {
    let cur = prev.map(|p| p.state.as_str()).unwrap_or("resolved");
    let mut p = Plan {
        state: cur.to_string(),
        since: prev.map(|p| p.since).unwrap_or(now),
        fired_at: None,
        resolved_at: None,
        transitions: prev.map(|p| p.transitions.clone()).unwrap_or_default(),
        flapping: prev.is_some_and(|p| p.flapping),
        history: Vec::new(),
        notify: None,
    };
    let msg = obs.map(|o| o.message.clone()).unwrap_or_default();
    let mut changed_fr = false;
    match (cur, obs.is_some()) {
        ("resolved", true) => {
            p.since = now;
            if rule.pending_ms == 0 {
                p.state = "firing".into();
                p.fired_at = Some(now);
                changed_fr = true;
            } else {
                p.state = "pending".into();
                p.history.push(("pending", msg.clone()));
            }
        }
        ("pending", true) if now - p.since >= rule.pending_ms => {
            p.state = "firing".into();
            p.fired_at = Some(now);
            changed_fr = true;
        }
        ("pending", false) => {
            p.state = "resolved".into();
            p.history.push(("pending_ended", "the condition stopped holding before the alert fired".into()));
        }
        ("firing", false) => {
            p.state = "resolved".into();
            p.resolved_at = Some(now);
            changed_fr = true;
        }
        _ => {}
    }
    p.transitions.retain(|t| *t > now - rule.flap_window_ms);
    if changed_fr {
        p.transitions.push(now);
        let what = if p.state == "firing" { "firing" } else { "resolved" };
        let m = if what == "firing" { msg.clone() } else { "the condition no longer holds".into() };
        p.history.push((what, m));
        if p.flapping {
            // Held back while flapping.
        } else if p.transitions.len() >= rule.flap_changes {
            p.flapping = true;
            p.history.push((
                "flapping",
                format!(
                    "{} changes within {}s: notifications held until it settles",
                    p.transitions.len(),
                    rule.flap_window_ms / 1000
                ),
            ));
            p.notify = Some("flapping");
        } else {
            p.notify = Some(if what == "firing" { "firing" } else { "resolved" });
        }
    } else if p.flapping && p.transitions.is_empty() && p.state != "pending" {
        p.flapping = false;
        p.history.push(("flapping_ended", format!("settled as {}", p.state)));
        p.notify = Some(if p.state == "firing" { "firing" } else { "resolved" });
    } else if prev.is_some() && p.state == cur && p.history.is_empty() && p.notify.is_none() {
        // Nothing changed but the value: written only for firing/pending alerts.
        if cur == "resolved" {
            return None;
        }
    }
    Some(p)
}

#[allow(clippy::too_many_arguments)]
async fn step(
    db: &Db,
    rule: &Rule,
    key: &str,
    prev: Option<State>,
    obs: Option<&Obs>,
    now: i64,
    silences: &[(Option<String>, Option<String>)],
) -> AppResult<()> {
    let Some(p) = plan(rule, prev.as_ref(), obs, now) else { return Ok(()) };
    let silenced = match p.notify {
        Some(_) => silenced(db, &rule.org_id, silences, &rule.id, key).await?,
        None => false,
    };
    let mut tx = db.begin_write().await?;
    let transitions = serde_json::to_string(&p.transitions).unwrap_or_else(|_| "[]".into());
    let value = obs.and_then(|o| o.value);
    let message = obs.map(|o| o.message.clone()).unwrap_or_default();
    if prev.is_some() {
        sqlx::query(
            "UPDATE alerts SET state = $1, since = $2, fired_at = COALESCE($3, fired_at), \
             resolved_at = CASE WHEN $1 = 'resolved' THEN COALESCE($4, resolved_at) ELSE NULL END, \
             value = CASE WHEN $13 = 1 THEN $5 ELSE value END, message = CASE WHEN $6 = '' THEN message ELSE $6 END, transitions = $7, \
             flapping = $8, notified_state = COALESCE($9, notified_state), updated_at = $10 \
             WHERE rule_id = $11 AND alert_key = $12",
        )
        .bind(p.state.clone())
        .bind(p.since)
        .bind(p.fired_at)
        .bind(p.resolved_at)
        .bind(value.unwrap_or(0.0))
        .bind(message.clone())
        .bind(transitions)
        .bind(i64::from(p.flapping))
        .bind(p.notify.map(str::to_string))
        .bind(now)
        .bind(rule.id.clone())
        .bind(key.to_string())
        .bind(i64::from(value.is_some()))
        .execute(tx.conn())
        .await?;
    } else {
        sqlx::query(
            "INSERT INTO alerts (rule_id, alert_key, org_id, state, since, fired_at, resolved_at, value, message, \
             transitions, flapping, notified_state, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, \
             CASE WHEN $14 = 1 THEN $8 ELSE NULL END, $9, $10, $11, $12, $13)",
        )
        .bind(rule.id.clone())
        .bind(key.to_string())
        .bind(rule.org_id.clone())
        .bind(p.state.clone())
        .bind(p.since)
        .bind(p.fired_at)
        .bind(p.resolved_at)
        .bind(value.unwrap_or(0.0))
        .bind(message.clone())
        .bind(transitions)
        .bind(i64::from(p.flapping))
        .bind(p.notify.unwrap_or_default().to_string())
        .bind(now)
        .bind(i64::from(value.is_some()))
        .execute(tx.conn())
        .await?;
    }
    for (event, m) in &p.history {
        add_history(tx.conn(), rule, key, now, event, m).await?;
    }
    if let Some(event) = p.notify {
        if silenced {
            add_history(tx.conn(), rule, key, now, "silenced", &format!("{event} notification muted by a silence"))
                .await?;
        }
        let payload = serde_json::json!({
            "v": 1,
            "event": event,
            "state": p.state,
            "rule": {"id": rule.id, "name": rule.name, "severity": rule.severity, "condition": rule.condition.describe()},
            "device_id": if key.is_empty() { None } else { Some(key) },
            "value": value,
            "message": if event == "resolved" { "the condition no longer holds".to_string() } else { message.clone() },
            "since": to_rfc3339(p.since),
            "at": to_rfc3339(now),
        });
        super::notify::enqueue(tx.conn(), &rule.org_id, &rule.channels, &rule.id, key, event, &payload, silenced, now)
            .await?;
    }
    tx.commit().await.map_err(AppError::from)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(pending_s: i64) -> Rule {
        Rule {
            id: "r".into(),
            org_id: "o".into(),
            name: "n".into(),
            severity: "warning".into(),
            filter: None,
            group: None,
            condition: Condition::FleetOffline { percent: 10.0 },
            pending_ms: pending_s * 1000,
            flap_window_ms: 60_000,
            flap_changes: 3,
            channels: vec![],
            event_cursor: 0,
        }
    }

    fn apply(prev: Option<State>, p: &Plan) -> State {
        let _ = prev;
        State { state: p.state.clone(), since: p.since, transitions: p.transitions.clone(), flapping: p.flapping }
    }

    fn obs() -> Obs {
        Obs { value: Some(1.0), message: "m".into() }
    }

    #[test]
    fn pending_then_firing_then_resolved_each_notified_once() {
        let r = rule(10);
        let p = plan(&r, None, Some(&obs()), 0).unwrap();
        assert_eq!((p.state.as_str(), p.notify), ("pending", None));
        let s = apply(None, &p);
        let p = plan(&r, Some(&s), Some(&obs()), 5_000).unwrap();
        assert_eq!((p.state.as_str(), p.notify), ("pending", None));
        let p = plan(&r, Some(&s), Some(&obs()), 10_000).unwrap();
        assert_eq!((p.state.as_str(), p.notify), ("firing", Some("firing")));
        let s = apply(Some(s), &p);
        let p = plan(&r, Some(&s), Some(&obs()), 15_000).unwrap();
        assert_eq!((p.state.as_str(), p.notify), ("firing", None), "de-duplicated");
        let p = plan(&r, Some(&s), None, 20_000).unwrap();
        assert_eq!((p.state.as_str(), p.notify), ("resolved", Some("resolved")));
    }

    #[test]
    fn flapping_is_notified_once_then_the_settled_state() {
        let r = rule(0);
        let mut s: Option<State> = None;
        let mut notes = Vec::new();
        for (i, holds) in [true, false, true, false, true].into_iter().enumerate() {
            let now = i as i64 * 1000;
            let o = obs();
            let p = plan(&r, s.as_ref(), holds.then_some(&o), now).unwrap();
            notes.extend(p.notify);
            s = Some(apply(s, &p));
        }
        assert_eq!(notes, ["firing", "resolved", "flapping"]);
        assert!(s.as_ref().unwrap().flapping);
        // Still firing a window later: settled, notified as firing.
        let o = obs();
        let p = plan(&r, s.as_ref(), Some(&o), 70_000).unwrap();
        assert_eq!((p.notify, p.flapping), (Some("firing"), false));
    }
}
