//! Operations on alert rules, silences and notification channels, and the read side
//! (alerts, history, deliveries). Operators change, viewers read; every change is audited in
//! its transaction.

use drover_proto::api::Role;
use drover_proto::validate;

use super::types::*;
use crate::audit::{self, Event};
use crate::auth::Principal;
use crate::db::{Bind, Db, is_unique_violation};
use crate::error::{AppError, AppResult};
use crate::filter::Compiled;
use crate::ops::new_id;
use crate::time::{now_ms, opt_rfc3339, to_rfc3339};

pub const SEVERITIES: &[&str] = &["info", "warning", "critical"];
pub const CHANNEL_KINDS: &[&str] = &["webhook", "slack", "email"];
/// Rules per organization, at most (each is evaluated every few seconds).
pub const MAX_RULES: i64 = 500;
const MAX_LIST: u32 = 500;

type RuleRow =
    (String, String, String, Option<String>, Option<String>, String, i64, i64, i64, String, i64, String, i64, i64);
const RULE_COLUMNS: &str = "id, name, severity, filter, group_id, condition, pending_s, flap_window_s, flap_changes, \
                            channels, enabled, created_by, created_at, updated_at";

fn u(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}
fn i(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn to_rule(r: RuleRow) -> AppResult<AlertRule> {
    let condition: Condition = serde_json::from_str(&r.5).map_err(AppError::internal)?;
    Ok(AlertRule {
        id: r.0,
        name: r.1,
        severity: r.2,
        filter: r.3,
        group: r.4,
        description: condition.describe(),
        condition,
        pending_s: u(r.6),
        flap_window_s: u(r.7),
        flap_changes: u(r.8),
        channels: serde_json::from_str(&r.9).unwrap_or_default(),
        enabled: r.10 != 0,
        created_by: r.11,
        created_at: to_rfc3339(r.12),
        updated_at: to_rfc3339(r.13),
    })
}

async fn fetch_rule(conn: &mut sqlx::AnyConnection, org: &str, id: &str) -> AppResult<AlertRule> {
    let row: Option<RuleRow> =
        sqlx::query_as(&format!("SELECT {RULE_COLUMNS} FROM alert_rules WHERE org_id = $1 AND (id = $2 OR name = $2)"))
            .bind(org.to_string())
            .bind(id.to_string())
            .fetch_optional(conn)
            .await?;
    to_rule(row.ok_or_else(|| AppError::NotFound(format!("no alert rule {id:?}")))?)
}

fn bad(m: impl Into<String>) -> AppError {
    AppError::BadRequest(m.into())
}

/// Checks a condition's values; the message names the field.
pub fn check_condition(c: &Condition) -> AppResult<()> {
    let metric_ok = |m: &str| {
        if drover_proto::telemetry::valid_name(m) {
            Ok(())
        } else {
            Err(bad(format!("condition.metric {m:?}: use 1 to 64 of a-z 0-9 _ . -")))
        }
    };
    let window_ok = |w: u64| {
        if (1..=86_400).contains(&w) { Ok(()) } else { Err(bad("condition.window_s: 1 to 86400 seconds")) }
    };
    match c {
        Condition::Threshold { metric, threshold, window_s, .. } => {
            metric_ok(metric)?;
            window_ok(*window_s)?;
            if !threshold.is_finite() {
                return Err(bad("condition.threshold must be a finite number"));
            }
        }
        Condition::FleetMetric { metric, threshold, window_s, aggregate, .. } => {
            metric_ok(metric)?;
            window_ok(*window_s)?;
            if !threshold.is_finite() {
                return Err(bad("condition.threshold must be a finite number"));
            }
            if *aggregate == Aggregate::Every {
                return Err(bad("condition.aggregate: a fleet metric takes avg, min or max"));
            }
        }
        Condition::Absence { minutes, .. } => {
            if !(1..=10_080).contains(minutes) {
                return Err(bad("condition.minutes: 1 to 10080 (a week)"));
            }
        }
        Condition::Event { name, min_severity, resolve_after_s } => {
            let ok = !name.is_empty()
                && name.len() <= 64
                && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_.-*".contains(&b));
            if !ok {
                return Err(bad(format!("condition.name {name:?}: an event name or glob (a-z 0-9 _ . - and *)")));
            }
            if let Some(s) = min_severity
                && !SEVERITIES.contains(&s.as_str())
            {
                return Err(bad(format!("condition.min_severity {s:?}: info, warning or critical")));
            }
            if !(1..=86_400).contains(resolve_after_s) {
                return Err(bad("condition.resolve_after_s: 1 to 86400 seconds"));
            }
        }
        Condition::FleetOffline { percent } => {
            if !(percent.is_finite() && (0.0..100.0).contains(percent)) {
                return Err(bad("condition.percent: at least 0 and below 100"));
            }
        }
    }
    Ok(())
}

fn check_severity(s: &str) -> AppResult<()> {
    if SEVERITIES.contains(&s) { Ok(()) } else { Err(bad(format!("severity {s:?}: info, warning or critical"))) }
}

async fn check_channels(db: &Db, org: &str, ids: &[String]) -> AppResult<()> {
    if ids.len() > 20 {
        return Err(bad("at most 20 channels per rule"));
    }
    for id in ids {
        let found: Option<(String,)> =
            sqlx::query_as("SELECT id FROM notification_channels WHERE org_id = $1 AND id = $2")
                .bind(org.to_string())
                .bind(id.clone())
                .fetch_optional(db.pool())
                .await?;
        if found.is_none() {
            return Err(AppError::BadRequest(format!("channels: no notification channel {id:?}")));
        }
    }
    Ok(())
}

/// The devices a rule or silence selects, as a condition on `devices d` (without the
/// organization and status tests, which the engine adds).
pub async fn selection(db: &Db, org: &str, filter: Option<&str>, group: Option<&str>) -> AppResult<Compiled> {
    let mut sql = vec!["1 = 1".to_string()];
    let mut binds = Vec::new();
    if let Some(f) = filter {
        let e = crate::filter::check(db, org, f).await?;
        let c = crate::filter::compile_for_count(&e, org);
        sql.push(c.sql);
        binds.extend(c.binds);
    }
    if let Some(g) = group {
        let row: Option<(String, Option<String>)> =
            sqlx::query_as("SELECT kind, filter FROM device_groups WHERE org_id = $1 AND id = $2")
                .bind(org.to_string())
                .bind(g.to_string())
                .fetch_optional(db.pool())
                .await?;
        match row {
            None => return Err(AppError::BadRequest(format!("group: there is no group {g:?}"))),
            Some((kind, _)) if kind == "static" => {
                sql.push("d.id IN (SELECT m.device_id FROM device_group_members m WHERE m.group_id = ?)".into());
                binds.push(Bind::Text(g.to_string()));
            }
            Some((_, f)) => {
                let e = crate::filter::check(db, org, f.as_deref().unwrap_or_default()).await?;
                let c = crate::filter::compile_for_count(&e, org);
                sql.push(c.sql);
                binds.extend(c.binds);
            }
        }
    }
    Ok(Compiled { sql: sql.join(" AND "), binds })
}

pub async fn list_rules(db: &Db, p: &Principal) -> AppResult<Vec<AlertRule>> {
    p.require(Role::Viewer, "listing alert rules")?;
    let rows: Vec<RuleRow> =
        sqlx::query_as(&format!("SELECT {RULE_COLUMNS} FROM alert_rules WHERE org_id = $1 ORDER BY name"))
            .bind(p.org().to_string())
            .fetch_all(db.pool())
            .await?;
    rows.into_iter().map(to_rule).collect()
}

/// A rule by id or name.
pub async fn get_rule(db: &Db, p: &Principal, id: &str) -> AppResult<AlertRule> {
    p.require(Role::Viewer, "reading alert rules")?;
    let mut conn = db.pool().acquire().await?;
    fetch_rule(&mut conn, p.org(), id).await
}

pub async fn create_rule(db: &Db, p: &Principal, req: CreateAlertRule) -> AppResult<AlertRule> {
    p.require(Role::Operator, "creating alert rules")?;
    validate::display_name("alert rule", &req.name).map_err(AppError::BadRequest)?;
    check_severity(&req.severity)?;
    check_condition(&req.condition)?;
    if req.pending_s > 86_400 {
        return Err(bad("pending_s: at most 86400"));
    }
    if !(1..=86_400).contains(&req.flap_window_s) || !(2..=100).contains(&req.flap_changes) {
        return Err(bad("flap_window_s: 1 to 86400; flap_changes: 2 to 100"));
    }
    let filter = req.filter.as_deref().map(str::trim).filter(|f| !f.is_empty());
    selection(db, p.org(), filter, req.group.as_deref()).await?;
    check_channels(db, p.org(), &req.channels).await?;
    let id = new_id();
    let now = now_ms();
    let mut tx = db.begin_write().await?;
    let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM alert_rules WHERE org_id = $1")
        .bind(p.org().to_string())
        .fetch_one(tx.conn())
        .await?;
    if n >= MAX_RULES {
        return Err(AppError::Conflict(format!("this organization has {MAX_RULES} alert rules, the most allowed")));
    }
    let condition = serde_json::to_string(&req.condition).map_err(AppError::internal)?;
    let inserted = sqlx::query(
        "INSERT INTO alert_rules (id, org_id, name, severity, filter, group_id, condition, pending_s, flap_window_s, \
         flap_changes, channels, enabled, event_cursor, created_by, created_at, updated_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $13, $13)",
    )
    .bind(id.clone())
    .bind(p.org().to_string())
    .bind(req.name.trim().to_string())
    .bind(req.severity.clone())
    .bind(filter.map(str::to_string))
    .bind(req.group.clone())
    .bind(condition)
    .bind(i(req.pending_s))
    .bind(i(req.flap_window_s))
    .bind(i(req.flap_changes))
    .bind(serde_json::to_string(&req.channels).unwrap_or_default())
    .bind(i64::from(req.enabled))
    .bind(now)
    .bind(p.name.clone())
    .execute(tx.conn())
    .await;
    match inserted {
        Err(e) if is_unique_violation(&e) => {
            return Err(AppError::Conflict(format!("an alert rule named {:?} exists already", req.name)));
        }
        other => other?,
    };
    let summary = format!(
        "alert rule {:?}: {}{}",
        req.name,
        req.condition.describe(),
        filter.map(|f| format!(" where {f}")).unwrap_or_default()
    );
    audit::append(
        tx.conn(),
        Event { actor: p, action: "alert_rule.create", target_kind: "alert_rule", target_id: &id, summary },
    )
    .await?;
    let r = fetch_rule(tx.conn(), p.org(), &id).await?;
    tx.commit().await?;
    Ok(r)
}

pub async fn update_rule(db: &Db, p: &Principal, id: &str, req: UpdateAlertRule) -> AppResult<AlertRule> {
    p.require(Role::Operator, "changing alert rules")?;
    if let Some(n) = &req.name {
        validate::display_name("alert rule", n).map_err(AppError::BadRequest)?;
    }
    if let Some(s) = &req.severity {
        check_severity(s)?;
    }
    if let Some(c) = &req.condition {
        check_condition(c)?;
    }
    if req.pending_s.is_some_and(|s| s > 86_400) {
        return Err(bad("pending_s: at most 86400"));
    }
    let before = get_rule(db, p, id).await?;
    let filter = req.filter.as_deref().map(str::trim);
    if let Some(f) = filter.filter(|f| !f.is_empty()) {
        selection(db, p.org(), Some(f), None).await?;
    }
    if let Some(c) = &req.channels {
        check_channels(db, p.org(), c).await?;
    }
    let mut changes = Vec::new();
    if let Some(n) = req.name.as_ref().filter(|n| **n != before.name) {
        changes.push(format!("name → {n:?}"));
    }
    if let Some(s) = req.severity.as_ref().filter(|s| **s != before.severity) {
        changes.push(format!("severity → {s}"));
    }
    if let Some(f) =
        filter.filter(|f| Some(*f) != before.filter.as_deref() && !(f.is_empty() && before.filter.is_none()))
    {
        changes.push(if f.is_empty() { "filter removed".into() } else { format!("filter → {f}") });
    }
    if let Some(c) = req.condition.as_ref().filter(|c| **c != before.condition) {
        changes.push(format!("condition → {}", c.describe()));
    }
    if let Some(s) = req.pending_s.filter(|s| *s != before.pending_s) {
        changes.push(format!("pending → {s}s"));
    }
    if let Some(c) = req.channels.as_ref().filter(|c| **c != before.channels) {
        changes.push(format!("channels → {c:?}"));
    }
    if let Some(e) = req.enabled.filter(|e| *e != before.enabled) {
        changes.push(if e { "enabled".into() } else { "disabled".into() });
    }
    if changes.is_empty() {
        return Ok(before);
    }
    let mut tx = db.begin_write().await?;
    let updated = sqlx::query(
        "UPDATE alert_rules SET name = COALESCE($1, name), severity = COALESCE($2, severity), \
         filter = CASE WHEN $3 IS NULL THEN filter WHEN $3 = '' THEN NULL ELSE $3 END, \
         condition = COALESCE($4, condition), pending_s = COALESCE($5, pending_s), \
         channels = COALESCE($6, channels), enabled = COALESCE($7, enabled), updated_at = $8 WHERE id = $9",
    )
    .bind(req.name.as_deref().map(|n| n.trim().to_string()))
    .bind(req.severity.clone())
    .bind(filter.map(str::to_string))
    .bind(req.condition.as_ref().map(|c| serde_json::to_string(c).unwrap_or_default()))
    .bind(req.pending_s.map(i))
    .bind(req.channels.as_ref().map(|c| serde_json::to_string(c).unwrap_or_default()))
    .bind(req.enabled.map(i64::from))
    .bind(now_ms())
    .bind(before.id.clone())
    .execute(tx.conn())
    .await;
    match updated {
        Err(e) if is_unique_violation(&e) => {
            return Err(AppError::Conflict(format!(
                "an alert rule named {:?} exists already",
                req.name.unwrap_or_default()
            )));
        }
        other => other?,
    };
    if req.enabled == Some(false) || req.condition.is_some() || req.filter.is_some() {
        // A changed or disabled rule starts over: its open alerts end without notification.
        sqlx::query("DELETE FROM alerts WHERE rule_id = $1").bind(before.id.clone()).execute(tx.conn()).await?;
    }
    let summary = format!("alert rule {:?}: {}", before.name, changes.join("; "));
    audit::append(
        tx.conn(),
        Event { actor: p, action: "alert_rule.update", target_kind: "alert_rule", target_id: &before.id, summary },
    )
    .await?;
    let r = fetch_rule(tx.conn(), p.org(), &before.id).await?;
    tx.commit().await?;
    Ok(r)
}

pub async fn delete_rule(db: &Db, p: &Principal, id: &str) -> AppResult<()> {
    p.require(Role::Operator, "deleting alert rules")?;
    let mut tx = db.begin_write().await?;
    let r = fetch_rule(tx.conn(), p.org(), id).await?;
    sqlx::query("DELETE FROM alerts WHERE rule_id = $1").bind(r.id.clone()).execute(tx.conn()).await?;
    sqlx::query("DELETE FROM alert_rules WHERE id = $1").bind(r.id.clone()).execute(tx.conn()).await?;
    let summary = format!("alert rule {:?} deleted ({})", r.name, r.description);
    audit::append(
        tx.conn(),
        Event { actor: p, action: "alert_rule.delete", target_kind: "alert_rule", target_id: &r.id, summary },
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

type AlertRow = (String, String, String, String, String, i64, i64, Option<i64>, Option<i64>, Option<f64>, String);

fn key_device(key: String) -> Option<String> {
    if key.is_empty() { None } else { Some(key) }
}

/// Firing first, then pending, then resolved; newest first within each: one integer, so that
/// the listing pages by keyset like every other (`since` is Unix ms, below 10^13).
const ALERT_ORDER: &str = "(CASE a.state WHEN 'firing' THEN 0 WHEN 'pending' THEN 1 ELSE 2 END) * 10000000000000 + (10000000000000 - a.since)";
const ALERT_SORTS: &[crate::page::SortField] =
    &[crate::page::SortField { name: "state", column: ALERT_ORDER, int: true }];

/// Current alerts, firing first, a page at a time.
pub async fn list_alerts(db: &Db, p: &Principal, q: &AlertListQuery) -> AppResult<drover_proto::api::Page<Alert>> {
    use crate::db::{Bind, Filter, bind_all};
    use crate::page::{CursorValue, PageRequest};
    p.require(Role::Viewer, "listing alerts")?;
    let page = PageRequest::parse(
        Some(q.limit.unwrap_or(200).clamp(1, MAX_LIST)),
        q.cursor.as_deref(),
        None,
        ALERT_SORTS,
        "state",
    )?;
    let states: Vec<&str> = match q.state.as_deref() {
        None | Some("") => vec!["pending", "firing"],
        Some(s @ ("pending" | "firing" | "resolved")) => vec![s],
        Some(s) => return Err(bad(format!("state {s:?}: pending, firing or resolved"))),
    };
    let mut f = Filter::default();
    f.and("a.org_id = ?", [Bind::Text(p.org().to_string())]);
    if let Some(rule) = q.rule.as_deref().filter(|r| !r.is_empty()) {
        f.and("(r.id = ? OR r.name = ?)", [Bind::Text(rule.to_string()), Bind::Text(rule.to_string())]);
    }
    let marks = vec!["?"; states.len()].join(", ");
    f.and(&format!("a.state IN ({marks})"), states.iter().map(|s| Bind::Text(s.to_string())));
    let id_col = "a.rule_id || ':' || a.alert_key";
    page.apply(&mut f, Some(id_col));
    let sql = format!(
        "SELECT a.rule_id, r.name, r.severity, a.alert_key, a.state, a.flapping, a.since, a.fired_at, a.resolved_at, \
         a.value, a.message FROM alerts a JOIN alert_rules r ON r.id = a.rule_id{}{}",
        f.sql(),
        page.order_limit(Some(id_col))
    );
    let rows: Vec<AlertRow> = bind_all(sqlx::query_as(&sql), &f.binds).fetch_all(db.pool()).await?;
    let rank = |state: &str| match state {
        "firing" => 0,
        "pending" => 1,
        _ => 2,
    };
    let (rows, next_cursor) = page.finish(rows, |r| {
        (
            CursorValue::Int(rank(&r.4) * 10_000_000_000_000 + (10_000_000_000_000 - r.6)),
            Some(format!("{}:{}", r.0, r.3)),
        )
    });
    let silences = super::engine::active_silences(db, p.org(), now_ms()).await?;
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        let silenced = super::engine::silenced(db, p.org(), &silences, &r.0, &r.3).await?;
        out.push(Alert {
            rule_id: r.0,
            rule_name: r.1,
            severity: r.2,
            device_id: key_device(r.3),
            state: r.4,
            flapping: r.5 != 0,
            silenced,
            since: to_rfc3339(r.6),
            fired_at: opt_rfc3339(r.7),
            resolved_at: opt_rfc3339(r.8),
            value: r.9,
            message: r.10,
        });
    }
    Ok(drover_proto::api::Page { items: out, next_cursor })
}

pub async fn history(
    db: &Db,
    p: &Principal,
    q: &HistoryQuery,
) -> AppResult<drover_proto::api::Page<AlertHistoryEntry>> {
    p.require(Role::Viewer, "reading the alert history")?;
    let limit = q.limit.unwrap_or(100).clamp(1, MAX_LIST);
    let (before_at, before_id) = match q.cursor.as_deref() {
        None | Some("") => (i64::MAX, String::new()),
        Some(c) => {
            let (a, b) = c.split_once('.').ok_or_else(|| AppError::InvalidCursor("invalid cursor".into()))?;
            (a.parse().map_err(|_| AppError::InvalidCursor("invalid cursor".into()))?, b.to_string())
        }
    };
    let rows: Vec<(String, String, String, String, i64, String, String)> = sqlx::query_as(&format!(
        "SELECT id, rule_id, rule_name, alert_key, at, event, message FROM alert_history \
         WHERE org_id = $1 AND ($2 = '' OR rule_id = $2 OR rule_name = $2) AND ($3 = '' OR alert_key = $3) \
         AND (at < $4 OR (at = $4 AND ($5 = '' OR id < $5))) ORDER BY at DESC, id DESC LIMIT {}",
        limit + 1
    ))
    .bind(p.org().to_string())
    .bind(q.rule.clone().unwrap_or_default())
    .bind(q.device.clone().unwrap_or_default())
    .bind(before_at)
    .bind(before_id)
    .fetch_all(db.pool())
    .await?;
    let more = rows.len() > limit as usize;
    let items: Vec<AlertHistoryEntry> = rows
        .into_iter()
        .take(limit as usize)
        .map(|r| AlertHistoryEntry {
            id: r.0,
            rule_id: r.1,
            rule_name: r.2,
            device_id: key_device(r.3),
            at: to_rfc3339(r.4),
            event: r.5,
            message: r.6,
        })
        .collect();
    let next_cursor = if more {
        items.last().and_then(|e| crate::time::parse(&e.at).map(|at| format!("{at}.{}", e.id)))
    } else {
        None
    };
    Ok(drover_proto::api::Page { items, next_cursor })
}

// ---- silences ----

type SilenceRow = (String, Option<String>, Option<String>, i64, i64, String, String, i64);

fn to_silence(r: SilenceRow, now: i64) -> Silence {
    Silence {
        id: r.0,
        rule: r.1,
        filter: r.2,
        active: r.3 <= now && now < r.4,
        starts_at: to_rfc3339(r.3),
        ends_at: to_rfc3339(r.4),
        reason: r.5,
        created_by: r.6,
        created_at: to_rfc3339(r.7),
    }
}

const SILENCE_COLUMNS: &str = "id, rule_id, filter, starts_at, ends_at, reason, created_by, created_at";

/// Silences that have not ended, then the most recent ended ones.
pub async fn list_silences(db: &Db, p: &Principal) -> AppResult<Vec<Silence>> {
    p.require(Role::Viewer, "listing silences")?;
    let rows: Vec<SilenceRow> = sqlx::query_as(&format!(
        "SELECT {SILENCE_COLUMNS} FROM alert_silences WHERE org_id = $1 ORDER BY ends_at DESC LIMIT 200"
    ))
    .bind(p.org().to_string())
    .fetch_all(db.pool())
    .await?;
    let now = now_ms();
    Ok(rows.into_iter().map(|r| to_silence(r, now)).collect())
}

pub async fn create_silence(db: &Db, p: &Principal, req: CreateSilence) -> AppResult<Silence> {
    p.require(Role::Operator, "creating silences")?;
    let reason = req.reason.trim();
    if reason.is_empty() || reason.chars().count() > 500 {
        return Err(bad("reason: say why, in 1 to 500 characters"));
    }
    let now = now_ms();
    let parse = |what: &str, s: &str| {
        crate::time::parse(s).ok_or_else(|| bad(format!("{what} {s:?}: use RFC 3339, e.g. 2026-11-23T18:00:00Z")))
    };
    let starts = match req.starts_at.as_deref() {
        Some(s) => parse("starts_at", s)?,
        None => now,
    };
    let ends = match (req.ends_at.as_deref(), req.duration_s) {
        (Some(e), None) => parse("ends_at", e)?,
        (None, Some(d)) if (1..=31_536_000).contains(&d) => starts + i(d) * 1000,
        (None, Some(_)) => return Err(bad("duration_s: 1 s to a year")),
        _ => return Err(bad("give ends_at or duration_s (one of them)")),
    };
    if ends <= starts || ends <= now {
        return Err(bad("the silence must end after it starts, and in the future"));
    }
    let filter = req.filter.as_deref().map(str::trim).filter(|f| !f.is_empty());
    if let Some(f) = filter {
        selection(db, p.org(), Some(f), None).await?;
    }
    let rule = match req.rule.as_deref().filter(|r| !r.is_empty()) {
        Some(r) => Some(get_rule(db, p, r).await?),
        None => None,
    };
    let id = new_id();
    let mut tx = db.begin_write().await?;
    sqlx::query(&format!(
        "INSERT INTO alert_silences ({SILENCE_COLUMNS}, org_id) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"
    ))
    .bind(id.clone())
    .bind(rule.as_ref().map(|r| r.id.clone()))
    .bind(filter.map(str::to_string))
    .bind(starts)
    .bind(ends)
    .bind(reason.to_string())
    .bind(p.name.clone())
    .bind(now)
    .bind(p.org().to_string())
    .execute(tx.conn())
    .await?;
    let summary = format!(
        "silence of {} for {} until {}: {reason}",
        rule.as_ref().map(|r| format!("rule {:?}", r.name)).unwrap_or_else(|| "every rule".into()),
        filter.unwrap_or("every device"),
        to_rfc3339(ends)
    );
    audit::append(
        tx.conn(),
        Event { actor: p, action: "silence.create", target_kind: "silence", target_id: &id, summary },
    )
    .await?;
    tx.commit().await?;
    Ok(to_silence(
        (id, rule.map(|r| r.id), filter.map(str::to_string), starts, ends, reason.to_string(), p.name.clone(), now),
        now,
    ))
}

/// Ends a silence now.
pub async fn expire_silence(db: &Db, p: &Principal, id: &str) -> AppResult<Silence> {
    p.require(Role::Operator, "expiring silences")?;
    let now = now_ms();
    let mut tx = db.begin_write().await?;
    let row: Option<SilenceRow> =
        sqlx::query_as(&format!("SELECT {SILENCE_COLUMNS} FROM alert_silences WHERE org_id = $1 AND id = $2"))
            .bind(p.org().to_string())
            .bind(id.to_string())
            .fetch_optional(tx.conn())
            .await?;
    let mut row = row.ok_or_else(|| AppError::NotFound(format!("no silence {id:?}")))?;
    if row.4 <= now {
        return Err(AppError::Conflict("this silence has ended already".into()));
    }
    row.4 = now;
    if row.3 > now {
        row.3 = now;
    }
    sqlx::query("UPDATE alert_silences SET ends_at = $1, starts_at = $2 WHERE id = $3")
        .bind(now)
        .bind(row.3)
        .bind(id.to_string())
        .execute(tx.conn())
        .await?;
    audit::append(
        tx.conn(),
        Event {
            actor: p,
            action: "silence.expire",
            target_kind: "silence",
            target_id: id,
            summary: format!("silence expired ({})", row.5),
        },
    )
    .await?;
    tx.commit().await?;
    Ok(to_silence(row, now))
}

// ---- channels ----

/// `scheme://host/…`: a webhook URL's path and query often carry its credential.
pub fn redact_url(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let host = rest.split(['/', '?', '#']).next().unwrap_or_default();
            let host = host.rsplit('@').next().unwrap_or_default();
            format!("{scheme}://{host}/…")
        }
        None => "…".into(),
    }
}

fn shown_target(kind: &str, target: &str) -> String {
    if kind == "email" { target.to_string() } else { redact_url(target) }
}

type ChannelRow = (String, String, String, String, String, i64);

fn to_channel(r: ChannelRow) -> Channel {
    Channel {
        target: shown_target(&r.2, &r.3),
        id: r.0,
        name: r.1,
        kind: r.2,
        created_by: r.4,
        created_at: to_rfc3339(r.5),
    }
}

pub async fn list_channels(db: &Db, p: &Principal) -> AppResult<Vec<Channel>> {
    p.require(Role::Viewer, "listing notification channels")?;
    let rows: Vec<ChannelRow> = sqlx::query_as(
        "SELECT id, name, kind, target, created_by, created_at FROM notification_channels WHERE org_id = $1 ORDER BY name",
    )
    .bind(p.org().to_string())
    .fetch_all(db.pool())
    .await?;
    Ok(rows.into_iter().map(to_channel).collect())
}

/// Email addresses of a target, checked.
pub fn email_addresses(target: &str) -> AppResult<Vec<String>> {
    let list: Vec<String> = target.split(',').map(|a| a.trim().to_string()).filter(|a| !a.is_empty()).collect();
    if list.is_empty() || list.len() > 20 {
        return Err(bad("target: 1 to 20 comma-separated email addresses"));
    }
    for a in &list {
        let ok = a.len() <= 254
            && a.split_once('@').is_some_and(|(l, d)| !l.is_empty() && d.contains('.') && !d.starts_with('.'))
            && !a.chars().any(|c| c.is_whitespace() || c.is_control() || matches!(c, '<' | '>' | ',' | ';'));
        if !ok {
            return Err(bad(format!("target: {a:?} is not an email address")));
        }
    }
    Ok(list)
}

pub async fn create_channel(
    db: &Db,
    p: &Principal,
    req: CreateChannel,
    email_ready: bool,
    allow: &super::target::AllowList,
) -> AppResult<CreatedChannel> {
    p.require(Role::Operator, "creating notification channels")?;
    validate::display_name("channel", &req.name).map_err(AppError::BadRequest)?;
    let target = req.target.trim().to_string();
    match req.kind.as_str() {
        "webhook" | "slack" => {
            let ok = (target.starts_with("https://") || target.starts_with("http://"))
                && target.len() <= 2000
                && !target.chars().any(|c| c.is_whitespace() || c.is_control())
                && target.split_once("://").is_some_and(|(_, r)| !r.is_empty() && !r.starts_with('/'));
            if !ok {
                return Err(bad("target: an http:// or https:// URL"));
            }
            // Internal addresses are refused (a name that does not resolve yet is checked
            // again at every send).
            super::target::check(&target, allow, true).await.map_err(bad)?;
        }
        "email" => {
            email_addresses(&target)?;
            if !email_ready {
                return Err(bad(
                    "email channels need an SMTP server: set smtp_server and smtp_from in droverd's configuration",
                ));
            }
        }
        k => return Err(bad(format!("kind {k:?}: webhook, slack or email"))),
    }
    let secret = (req.kind == "webhook").then(|| format!("whsec_{}", crate::auth::random_secret(32)));
    let id = new_id();
    let now = now_ms();
    let mut tx = db.begin_write().await?;
    let inserted = sqlx::query(
        "INSERT INTO notification_channels (id, org_id, name, kind, target, secret, created_by, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(id.clone())
    .bind(p.org().to_string())
    .bind(req.name.trim().to_string())
    .bind(req.kind.clone())
    .bind(target.clone())
    .bind(secret.clone().unwrap_or_default())
    .bind(p.name.clone())
    .bind(now)
    .execute(tx.conn())
    .await;
    match inserted {
        Err(e) if is_unique_violation(&e) => {
            return Err(AppError::Conflict(format!("a channel named {:?} exists already", req.name)));
        }
        other => other?,
    };
    let summary = format!("{} channel {:?} to {}", req.kind, req.name, shown_target(&req.kind, &target));
    audit::append(
        tx.conn(),
        Event {
            actor: p,
            action: "notification_channel.create",
            target_kind: "notification_channel",
            target_id: &id,
            summary,
        },
    )
    .await?;
    tx.commit().await?;
    let channel = to_channel((id, req.name.trim().to_string(), req.kind, target, p.name.clone(), now));
    Ok(CreatedChannel { channel, secret })
}

pub async fn delete_channel(db: &Db, p: &Principal, id: &str) -> AppResult<()> {
    p.require(Role::Operator, "deleting notification channels")?;
    let mut tx = db.begin_write().await?;
    let row: Option<(String, String)> =
        sqlx::query_as("SELECT name, kind FROM notification_channels WHERE org_id = $1 AND (id = $2 OR name = $2)")
            .bind(p.org().to_string())
            .bind(id.to_string())
            .fetch_optional(tx.conn())
            .await?;
    let (name, kind) = row.ok_or_else(|| AppError::NotFound(format!("no notification channel {id:?}")))?;
    let users: Vec<(String, String)> = sqlx::query_as("SELECT name, channels FROM alert_rules WHERE org_id = $1")
        .bind(p.org().to_string())
        .fetch_all(tx.conn())
        .await?;
    let real_id: (String,) = sqlx::query_as("SELECT id FROM notification_channels WHERE org_id = $1 AND name = $2")
        .bind(p.org().to_string())
        .bind(name.clone())
        .fetch_one(tx.conn())
        .await?;
    let using: Vec<String> = users
        .into_iter()
        .filter(|(_, c)| serde_json::from_str::<Vec<String>>(c).unwrap_or_default().contains(&real_id.0))
        .map(|(n, _)| n)
        .collect();
    if !using.is_empty() {
        return Err(AppError::Conflict(format!("alert rule(s) {using:?} notify this channel; change them first")));
    }
    sqlx::query("DELETE FROM notification_channels WHERE id = $1").bind(real_id.0.clone()).execute(tx.conn()).await?;
    audit::append(
        tx.conn(),
        Event {
            actor: p,
            action: "notification_channel.delete",
            target_kind: "notification_channel",
            target_id: &real_id.0,
            summary: format!("{kind} channel {name:?} deleted"),
        },
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

pub async fn deliveries(db: &Db, p: &Principal, q: &DeliveryQuery) -> AppResult<Vec<Delivery>> {
    p.require(Role::Viewer, "reading notification deliveries")?;
    let limit = i64::from(q.limit.unwrap_or(100).clamp(1, MAX_LIST));
    let rows: Vec<(
        String,
        String,
        Option<String>,
        String,
        String,
        String,
        String,
        i64,
        Option<String>,
        i64,
        Option<i64>,
    )> = sqlx::query_as(&format!(
        "SELECT n.id, n.channel_id, c.name, n.rule_id, n.alert_key, n.event, n.status, n.attempts, n.last_error, \
             n.created_at, n.sent_at FROM notifications n LEFT JOIN notification_channels c ON c.id = n.channel_id \
             WHERE n.org_id = $1 AND ($2 = '' OR n.channel_id = $2 OR c.name = $2) AND ($3 = '' OR n.rule_id = $3) \
             ORDER BY n.created_at DESC, n.id DESC LIMIT {limit}"
    ))
    .bind(p.org().to_string())
    .bind(q.channel.clone().unwrap_or_default())
    .bind(q.rule.clone().unwrap_or_default())
    .fetch_all(db.pool())
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| Delivery {
            id: r.0,
            channel_id: r.1,
            channel_name: r.2.unwrap_or_else(|| "(deleted)".into()),
            rule_id: r.3,
            device_id: key_device(r.4),
            event: r.5,
            status: r.6,
            attempts: u(r.7),
            last_error: r.8,
            created_at: to_rfc3339(r.9),
            sent_at: opt_rfc3339(r.10),
        })
        .collect())
}
