//! Device rule sets, the server half: a rule set per group (static or dynamic), versioned,
//! pushed as `down/rules` (QoS 1) to the group's devices when it changes and on each hello.
//!
//! - **Merging.** A device in several groups gets one set: the rule sets of its groups taken
//!   in order of group name; when two define the same rule id, the rule of the group whose
//!   name sorts first wins and the others are dropped (`GET /devices/{id}/rules` lists the
//!   conflicts).
//! - **Versions.** `device_rule_delivery` keeps, per device, the digest of the merged set it
//!   was last sent and a version that increases whenever that digest changes, so the version
//!   a device sees only grows (the agent ignores an older one) even when group membership,
//!   not a rule set, changed.
//! - **Delivery.** A change marks the devices concerned `pending`; a hello marks its device
//!   `pending`. Each replica's pusher looks every second for pending rows and claims each
//!   (`UPDATE … WHERE pending = 1`): only the replica whose update changed the row publishes,
//!   through the ingest loop's MQTT client (a queue, like the deployment engine). The broker
//!   keeps no session for devices, so a device offline at a change gets the set at its next
//!   hello.
//! - **Applied.** The device raises `drover.rules.applied {"version": N}`; the newest such
//!   event in `telemetry_events` is shown as the applied version.

use std::sync::Arc;
use std::time::Duration;

use drover_proto::api::Role;
use drover_proto::device::{Channel, PROTOCOL_VERSION};
use drover_proto::telemetry::{Rule, RuleSet};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, watch};

use crate::alerts::types::{DeviceRuleSet, DeviceRulesView};
use crate::audit::{self, Event};
use crate::auth::Principal;
use crate::db::{Bind, Db};
use crate::engine::Outgoing;
use crate::error::{AppError, AppResult};
use crate::time::{now_ms, to_rfc3339};

pub const APPLIED_EVENT: &str = "drover.rules.applied";
const PUSH_EVERY: Duration = Duration::from_secs(1);
const BATCH: i64 = 500;

type SetRow = (String, String, i64, String, String, i64);

fn to_set(r: SetRow) -> AppResult<DeviceRuleSet> {
    Ok(DeviceRuleSet {
        group_id: r.0,
        group_name: r.1,
        version: u64::try_from(r.2).unwrap_or(0),
        rules: serde_json::from_str(&r.3).map_err(AppError::internal)?,
        updated_by: r.4,
        updated_at: to_rfc3339(r.5),
    })
}

const SET_SQL: &str = "SELECT r.group_id, g.name, r.version, r.rules, r.updated_by, r.updated_at \
                       FROM device_rule_sets r JOIN device_groups g ON g.id = r.group_id WHERE r.org_id = $1";

/// A group of the caller's organization by id or name: (id, name).
async fn group(db: &Db, org: &str, g: &str) -> AppResult<(String, String)> {
    let row: Option<(String, String)> =
        sqlx::query_as("SELECT id, name FROM device_groups WHERE org_id = $1 AND (id = $2 OR name = $2)")
            .bind(org.to_string())
            .bind(g.to_string())
            .fetch_optional(db.pool())
            .await?;
    row.ok_or_else(|| AppError::NotFound(format!("no group {g:?}")))
}

pub async fn list(db: &Db, p: &Principal) -> AppResult<Vec<DeviceRuleSet>> {
    p.require(Role::Viewer, "listing device rule sets")?;
    let rows: Vec<SetRow> =
        sqlx::query_as(&format!("{SET_SQL} ORDER BY g.name")).bind(p.org().to_string()).fetch_all(db.pool()).await?;
    rows.into_iter().map(to_set).collect()
}

pub async fn get(db: &Db, p: &Principal, g: &str) -> AppResult<DeviceRuleSet> {
    p.require(Role::Viewer, "reading device rule sets")?;
    let (gid, name) = group(db, p.org(), g).await?;
    let row: Option<SetRow> = sqlx::query_as(&format!("{SET_SQL} AND r.group_id = $2"))
        .bind(p.org().to_string())
        .bind(gid)
        .fetch_optional(db.pool())
        .await?;
    to_set(row.ok_or_else(|| AppError::NotFound(format!("group {name:?} has no device rule set")))?)
}

/// Marks for delivery the devices of `group_id` and every device that has had rules.
async fn mark_pending(db: &Db, conn: &mut sqlx::AnyConnection, org: &str, group_id: &str) -> AppResult<u64> {
    let sel = crate::alerts::rules::selection(db, org, None, Some(group_id)).await?;
    let mut n = 1;
    let mut sql = String::new();
    for ch in sel.sql.chars() {
        if ch == '?' {
            n += 1;
            sql.push_str(&format!("${n}"));
        } else {
            sql.push(ch);
        }
    }
    let insert = format!(
        "INSERT INTO device_rule_delivery (device_id, org_id, pending) SELECT d.id, d.org_id, 1 FROM devices d \
         WHERE d.org_id = $1 AND d.status = 'accepted' AND (({sql}) OR \
         d.id IN (SELECT x.device_id FROM device_rule_delivery x WHERE x.org_id = $1)) \
         ON CONFLICT (device_id) DO UPDATE SET pending = 1"
    );
    let mut q = sqlx::query(&insert).bind(org.to_string());
    for b in sel.binds {
        q = match b {
            Bind::Int(i) => q.bind(i),
            Bind::Text(s) => q.bind(s),
        };
    }
    Ok(q.execute(&mut *conn).await?.rows_affected())
}

/// Replaces a group's rule set (a new version) and pushes it to the group's devices.
pub async fn put(db: &Db, p: &Principal, g: &str, rules: Vec<Rule>) -> AppResult<DeviceRuleSet> {
    p.require(Role::Operator, "changing device rule sets")?;
    RuleSet { v: PROTOCOL_VERSION, version: 1, rules: rules.clone() }
        .check()
        .map_err(|e| AppError::BadRequest(format!("invalid rule set: {e}")))?;
    let (gid, name) = group(db, p.org(), g).await?;
    let json = serde_json::to_string(&rules).map_err(AppError::internal)?;
    let mut tx = db.begin_write().await?;
    let old: Option<(i64, String)> = sqlx::query_as("SELECT version, rules FROM device_rule_sets WHERE group_id = $1")
        .bind(gid.clone())
        .fetch_optional(tx.conn())
        .await?;
    let version = match &old {
        Some((v, r)) if *r == json => {
            // Unchanged: nothing to write or send.
            drop(tx);
            let _ = v;
            return get(db, p, &gid).await;
        }
        Some((v, _)) => v + 1,
        None => 1,
    };
    sqlx::query(
        "INSERT INTO device_rule_sets (group_id, org_id, version, rules, updated_by, updated_at) \
         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (group_id) DO UPDATE SET version = excluded.version, \
         rules = excluded.rules, updated_by = excluded.updated_by, updated_at = excluded.updated_at",
    )
    .bind(gid.clone())
    .bind(p.org().to_string())
    .bind(version)
    .bind(json)
    .bind(p.name.clone())
    .bind(now_ms())
    .execute(tx.conn())
    .await?;
    let marked = mark_pending(db, tx.conn(), p.org(), &gid).await?;
    let ids: Vec<&str> = rules.iter().map(|r| r.id.as_str()).collect();
    let summary = format!("device rule set of group {name:?} version {version}: {} rule(s) {ids:?}", rules.len());
    audit::append(
        tx.conn(),
        Event { actor: p, action: "device_rules.put", target_kind: "group", target_id: &gid, summary },
    )
    .await?;
    tx.commit().await?;
    tracing::debug!(group = name, version, marked, "device rule set changed");
    get(db, p, &gid).await
}

pub async fn delete(db: &Db, p: &Principal, g: &str) -> AppResult<()> {
    p.require(Role::Operator, "deleting device rule sets")?;
    let (gid, name) = group(db, p.org(), g).await?;
    let mut tx = db.begin_write().await?;
    let n = sqlx::query("DELETE FROM device_rule_sets WHERE group_id = $1 AND org_id = $2")
        .bind(gid.clone())
        .bind(p.org().to_string())
        .execute(tx.conn())
        .await?
        .rows_affected();
    if n == 0 {
        return Err(AppError::NotFound(format!("group {name:?} has no device rule set")));
    }
    mark_pending(db, tx.conn(), p.org(), &gid).await?;
    audit::append(
        tx.conn(),
        Event {
            actor: p,
            action: "device_rules.delete",
            target_kind: "group",
            target_id: &gid,
            summary: format!("device rule set of group {name:?} deleted"),
        },
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

/// The merged rule set of a device: rules, source groups in merge order, conflicts.
pub async fn merged(db: &Db, org: &str, device_id: &str) -> AppResult<(Vec<Rule>, Vec<String>, Vec<String>)> {
    let sets: Vec<SetRow> =
        sqlx::query_as(&format!("{SET_SQL} ORDER BY g.name, g.id")).bind(org.to_string()).fetch_all(db.pool()).await?;
    let mut rules: Vec<Rule> = Vec::new();
    let mut from: Vec<String> = Vec::new();
    let mut conflicts = Vec::new();
    for s in sets {
        let sel = crate::alerts::rules::selection(db, org, None, Some(&s.0)).await?;
        let mut n = 2;
        let mut cond = String::new();
        for ch in sel.sql.chars() {
            if ch == '?' {
                n += 1;
                cond.push_str(&format!("${n}"));
            } else {
                cond.push(ch);
            }
        }
        let sql = format!("SELECT 1 FROM devices d WHERE d.id = $1 AND d.org_id = $2 AND {cond}");
        let mut q = sqlx::query(&sql).bind(device_id.to_string()).bind(org.to_string());
        for b in sel.binds {
            q = match b {
                Bind::Int(i) => q.bind(i),
                Bind::Text(t) => q.bind(t),
            };
        }
        if q.fetch_optional(db.pool()).await?.is_none() {
            continue;
        }
        let set: Vec<Rule> = serde_json::from_str(&s.3).map_err(AppError::internal)?;
        for r in set {
            if let Some(i) = rules.iter().position(|x| x.id == r.id) {
                conflicts.push(format!("rule {:?}: group {:?} wins over {:?}", r.id, from[i], s.1));
            } else {
                rules.push(r);
                from.push(s.1.clone());
            }
        }
    }
    let mut groups = from.clone();
    groups.dedup();
    Ok((rules, groups, conflicts))
}

fn digest(rules: &[Rule]) -> String {
    if rules.is_empty() {
        return String::new();
    }
    hex::encode(Sha256::digest(serde_json::to_string(rules).unwrap_or_default().as_bytes()))
}

pub async fn device_view(db: &Db, p: &Principal, device_id: &str) -> AppResult<DeviceRulesView> {
    p.require(Role::Viewer, "reading device rules")?;
    let found: Option<(String,)> = sqlx::query_as("SELECT id FROM devices WHERE org_id = $1 AND id = $2")
        .bind(p.org().to_string())
        .bind(device_id.to_string())
        .fetch_optional(db.pool())
        .await?;
    if found.is_none() {
        return Err(AppError::NotFound(format!("no device {device_id:?}")));
    }
    let (rules, groups, conflicts) = merged(db, p.org(), device_id).await?;
    let version: Option<(i64,)> = sqlx::query_as("SELECT version FROM device_rule_delivery WHERE device_id = $1")
        .bind(device_id.to_string())
        .fetch_optional(db.pool())
        .await?;
    let applied: Option<(i64, String)> = sqlx::query_as(
        "SELECT ts, data FROM telemetry_events WHERE device_id = $1 AND name = $2 ORDER BY ts DESC LIMIT 1",
    )
    .bind(device_id.to_string())
    .bind(APPLIED_EVENT)
    .fetch_optional(db.pool())
    .await
    .unwrap_or(None);
    let applied_version = applied
        .as_ref()
        .and_then(|(_, d)| serde_json::from_str::<serde_json::Value>(d).ok())
        .and_then(|v| v["version"].as_u64());
    Ok(DeviceRulesView {
        device_id: device_id.to_string(),
        version: version.map(|(v,)| u64::try_from(v).unwrap_or(0)).unwrap_or(0),
        rules,
        groups,
        conflicts,
        applied_version,
        applied_at: applied.map(|(ts, _)| to_rfc3339(ts)),
    })
}

/// The hello hook: the device gets its rule set again (if it has or had one).
pub async fn on_hello(db: &Db, device_id: &str) -> AppResult<()> {
    let row: Option<(String, i64, i64)> = sqlx::query_as(
        "SELECT d.org_id, (SELECT COUNT(*) FROM device_rule_delivery x WHERE x.device_id = d.id), \
         (SELECT COUNT(*) FROM device_rule_sets r WHERE r.org_id = d.org_id) FROM devices d \
         WHERE d.id = $1 AND d.status = 'accepted'",
    )
    .bind(device_id.to_string())
    .fetch_optional(db.pool())
    .await?;
    let Some((org, has_row, sets)) = row else { return Ok(()) };
    if has_row == 0 && sets == 0 {
        return Ok(());
    }
    let mut tx = db.begin_write().await?;
    sqlx::query(
        "INSERT INTO device_rule_delivery (device_id, org_id, pending) VALUES ($1, $2, 1) \
         ON CONFLICT (device_id) DO UPDATE SET pending = 1",
    )
    .bind(device_id.to_string())
    .bind(org)
    .execute(tx.conn())
    .await?;
    tx.commit().await?;
    Ok(())
}

/// Sends pending rule sets; the number published.
pub async fn push_pending(db: &Db, out: &mpsc::Sender<Outgoing>) -> AppResult<usize> {
    let rows: Vec<(String, String, String, i64)> = sqlx::query_as(&format!(
        "SELECT device_id, org_id, digest, version FROM device_rule_delivery WHERE pending = 1 LIMIT {BATCH}"
    ))
    .fetch_all(db.pool())
    .await?;
    let mut sent = 0;
    for (device, org, old_digest, old_version) in rows {
        let (rules, _, _) = merged(db, &org, &device).await?;
        let d = digest(&rules);
        let version = if d == old_digest { old_version } else { old_version + 1 };
        let mut tx = db.begin_write().await?;
        let claimed = sqlx::query(
            "UPDATE device_rule_delivery SET pending = 0, digest = $1, version = $2, sent_at = $3 \
             WHERE device_id = $4 AND pending = 1 AND version = $5",
        )
        .bind(d.clone())
        .bind(version)
        .bind(now_ms())
        .bind(device.clone())
        .bind(old_version)
        .execute(tx.conn())
        .await?
        .rows_affected();
        tx.commit().await?;
        if claimed != 1 || (version == 0 && rules.is_empty()) {
            // Another replica sent it, or the device never had rules and still has none.
            continue;
        }
        let set = RuleSet { v: PROTOCOL_VERSION, version: u64::try_from(version).unwrap_or(0), rules };
        let payload = serde_json::to_vec(&set).unwrap_or_default();
        let topic = drover_proto::device::topic(&device, Channel::Rules);
        if out.send(Outgoing { topic, payload }).await.is_err() {
            return Ok(sent);
        }
        sent += 1;
    }
    Ok(sent)
}

/// Starts the pusher with the ingest loop's MQTT client (QoS 1), until `stop`.
pub fn start(db: Db, client: rumqttc::v5::AsyncClient, stop: watch::Receiver<bool>) {
    let (tx, mut rx) = mpsc::channel::<Outgoing>(1024);
    let mut s1 = stop.clone();
    tokio::spawn(async move {
        loop {
            let msg = tokio::select! {
                _ = s1.wait_for(|s| *s) => return,
                m = rx.recv() => match m { Some(m) => m, None => return },
            };
            let qos = rumqttc::v5::mqttbytes::QoS::AtLeastOnce;
            if let Err(e) = client.publish(msg.topic, qos, false, msg.payload).await {
                tracing::warn!("cannot publish a device rule set: {e}");
            }
        }
    });
    start_with(db, tx, stop);
}

/// As [`start`], handing messages to `out` (tests read it).
pub fn start_with(db: Db, out: mpsc::Sender<Outgoing>, mut stop: watch::Receiver<bool>) {
    let out = Arc::new(out);
    tokio::spawn(async move {
        loop {
            if let Err(e) = push_pending(&db, &out).await {
                tracing::warn!("device rule sets: {e}");
            }
            tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                _ = tokio::time::sleep(PUSH_EVERY) => {}
            }
        }
    });
}
