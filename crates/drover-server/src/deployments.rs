//! Deployments (`/api/v1/deployments`): an artifact for a set of devices, fixed when the
//! deployment is created — by device ids, a static or dynamic group, or a filter — and then
//! followed device by device (`deployment_devices`, one row each) as the devices report.
//!
//! Sending the commands and taking the reports is the [`crate::engine`]'s work; this module
//! holds the operator's side: create, read, abort, every change audited.

use std::collections::BTreeMap;
use std::sync::Arc;

use drover_proto::api::{DeviceStatus, GroupKind, Page, Role};
use drover_proto::deploy::{
    ArtifactRef, CreateDeployment, Deployment, DeploymentDevice, DeploymentDeviceLog, DeploymentDeviceQuery,
    DeploymentListQuery, DeploymentStatus,
};
use drover_proto::update::UpdateState;

use crate::audit::{self, Event};
use crate::auth::Principal;
use crate::db::{Bind, Db, Filter, bind_all};
use crate::engine::Engine;
use crate::error::{AppError, AppResult};
use crate::filter::Compiled;
use crate::page::{CursorValue, PageRequest, SortField};
use crate::time::{now_ms, opt_rfc3339, to_rfc3339};

/// Most device ids in one `devices` list.
pub const MAX_DEVICE_IDS: usize = 10_000;

type DeploymentRow = (String, String, String, String, String, String, String, i64, i64, String, Option<i64>);
const DEPLOYMENT_COLUMNS: &str = "id, name, artifact_id, artifact_name, artifact_version, target, status, total, \
                                  created_at, created_by, finished_at";

fn to_deployment(r: DeploymentRow, counts: BTreeMap<UpdateState, u64>) -> AppResult<Deployment> {
    Ok(Deployment {
        id: r.0,
        name: r.1,
        artifact: ArtifactRef { id: r.2, name: r.3, version: r.4 },
        target: r.5,
        status: DeploymentStatus::parse(&r.6)
            .ok_or_else(|| AppError::Internal(format!("unknown deployment status {:?}", r.6)))?,
        total: u64::try_from(r.7).unwrap_or(0),
        created_at: to_rfc3339(r.8),
        created_by: r.9,
        finished_at: opt_rfc3339(r.10),
        counts,
    })
}

/// Devices per state of each deployment in `ids` (one query for the lot).
async fn counts_of(
    conn: &mut sqlx::AnyConnection,
    ids: &[String],
) -> Result<BTreeMap<String, BTreeMap<UpdateState, u64>>, sqlx::Error> {
    let mut out: BTreeMap<String, BTreeMap<UpdateState, u64>> = BTreeMap::new();
    if ids.is_empty() {
        return Ok(out);
    }
    let marks: Vec<String> = (1..=ids.len()).map(|i| format!("${i}")).collect();
    let sql = format!(
        "SELECT deployment_id, state, COUNT(*) FROM deployment_devices WHERE deployment_id IN ({}) \
         GROUP BY deployment_id, state",
        marks.join(", ")
    );
    let mut q = sqlx::query_as::<_, (String, String, i64)>(&sql);
    for id in ids {
        q = q.bind(id.clone());
    }
    for (dep, state, n) in q.fetch_all(conn).await? {
        if let Some(s) = UpdateState::parse(&state) {
            out.entry(dep).or_default().insert(s, u64::try_from(n).unwrap_or(0));
        }
    }
    Ok(out)
}

pub(crate) async fn fetch(conn: &mut sqlx::AnyConnection, org_id: &str, id: &str) -> AppResult<Deployment> {
    let row: Option<DeploymentRow> =
        sqlx::query_as(&format!("SELECT {DEPLOYMENT_COLUMNS} FROM deployments WHERE org_id = $1 AND id = $2"))
            .bind(org_id.to_string())
            .bind(id.to_string())
            .fetch_optional(&mut *conn)
            .await?;
    let row = row.ok_or_else(|| AppError::NotFound(format!("no deployment with id {id:?}")))?;
    let mut counts = counts_of(conn, std::slice::from_ref(&row.0)).await?;
    let c = counts.remove(&row.0).unwrap_or_default();
    to_deployment(row, c)
}

pub async fn get(db: &Db, p: &Principal, id: &str) -> AppResult<Deployment> {
    p.require(Role::Viewer, "reading deployments")?;
    let mut conn = db.pool().acquire().await?;
    fetch(&mut conn, p.org(), id).await
}

const SORTS: &[SortField] = &[SortField { name: "created_at", column: "created_at", int: true }];

/// Newest first, optionally of one status.
pub async fn list(db: &Db, p: &Principal, q: &DeploymentListQuery) -> AppResult<Page<Deployment>> {
    p.require(Role::Viewer, "listing deployments")?;
    let page = PageRequest::parse(q.limit, q.cursor.as_deref(), None, SORTS, "-created_at")?;
    let mut f = Filter::default();
    f.and("org_id = ?", [Bind::Text(p.org().to_string())]);
    if let Some(s) = q.status {
        f.and("status = ?", [Bind::Text(s.as_str().into())]);
    }
    page.apply(&mut f, Some("id"));
    let sql = format!("SELECT {DEPLOYMENT_COLUMNS} FROM deployments{}{}", f.sql(), page.order_limit(Some("id")));
    let mut conn = db.pool().acquire().await?;
    let rows: Vec<DeploymentRow> = bind_all(sqlx::query_as(&sql), &f.binds).fetch_all(&mut *conn).await?;
    let (rows, next_cursor) = page.finish(rows, |r| (CursorValue::Int(r.8), Some(r.0.clone())));
    let ids: Vec<String> = rows.iter().map(|r| r.0.clone()).collect();
    let mut counts = counts_of(&mut conn, &ids).await?;
    let items = rows
        .into_iter()
        .map(|r| {
            let c = counts.remove(&r.0).unwrap_or_default();
            to_deployment(r, c)
        })
        .collect::<AppResult<_>>()?;
    Ok(Page { items, next_cursor })
}

type DeviceRow = (String, String, Option<i64>, Option<i64>, Option<String>, i64, i64, Option<String>);

fn to_device_row(r: DeviceRow) -> DeploymentDevice {
    DeploymentDevice {
        display_name: r.7.filter(|n| !n.is_empty()).unwrap_or_else(|| r.0.clone()),
        device_id: r.0,
        state: UpdateState::parse(&r.1).unwrap_or(UpdateState::Pending),
        bytes: r.2.and_then(|b| u64::try_from(b).ok()),
        total: r.3.and_then(|b| u64::try_from(b).ok()),
        message: r.4,
        has_log: r.5 != 0,
        updated_at: to_rfc3339(r.6),
    }
}

const DEVICE_SORTS: &[SortField] = &[SortField { name: "device_id", column: "device_id", int: false }];

/// A deployment's devices by id, optionally in one state.
pub async fn devices(db: &Db, p: &Principal, id: &str, q: &DeploymentDeviceQuery) -> AppResult<Page<DeploymentDevice>> {
    p.require(Role::Viewer, "reading deployments")?;
    let page = PageRequest::parse(q.limit, q.cursor.as_deref(), None, DEVICE_SORTS, "device_id")?;
    let mut conn = db.pool().acquire().await?;
    let exists: Option<(String,)> = sqlx::query_as("SELECT id FROM deployments WHERE org_id = $1 AND id = $2")
        .bind(p.org().to_string())
        .bind(id.to_string())
        .fetch_optional(&mut *conn)
        .await?;
    if exists.is_none() {
        return Err(AppError::NotFound(format!("no deployment with id {id:?}")));
    }
    let mut f = Filter::default();
    f.and("deployment_id = ?", [Bind::Text(id.to_string())]);
    if let Some(s) = q.state {
        f.and("state = ?", [Bind::Text(s.as_str().into())]);
    }
    page.apply(&mut f, None);
    let sql = format!(
        "SELECT device_id, state, bytes, total, message, CASE WHEN log IS NULL THEN 0 ELSE 1 END, updated_at, \
         (SELECT d.display_name FROM devices d WHERE d.id = deployment_devices.device_id) \
         FROM deployment_devices{}{}",
        f.sql(),
        page.order_limit(None)
    );
    let rows: Vec<DeviceRow> = bind_all(sqlx::query_as(&sql), &f.binds).fetch_all(&mut *conn).await?;
    let (rows, next_cursor) = page.finish(rows, |r| (CursorValue::Text(r.0.clone()), None));
    Ok(Page { items: rows.into_iter().map(to_device_row).collect(), next_cursor })
}

/// The log a device attached to its report in a deployment.
pub async fn device_log(db: &Db, p: &Principal, id: &str, device_id: &str) -> AppResult<DeploymentDeviceLog> {
    p.require(Role::Viewer, "reading deployments")?;
    let row: Option<(String, Option<String>)> = sqlx::query_as(
        "SELECT dd.state, dd.log FROM deployment_devices dd JOIN deployments dep ON dep.id = dd.deployment_id \
         WHERE dep.org_id = $1 AND dd.deployment_id = $2 AND dd.device_id = $3",
    )
    .bind(p.org().to_string())
    .bind(id.to_string())
    .bind(device_id.to_string())
    .fetch_optional(db.pool())
    .await?;
    let (state, log) =
        row.ok_or_else(|| AppError::NotFound(format!("device {device_id:?} is not in deployment {id:?}")))?;
    let log = log.ok_or_else(|| AppError::NotFound(format!("device {device_id:?} sent no log for this deployment")))?;
    Ok(DeploymentDeviceLog {
        device_id: device_id.to_string(),
        state: UpdateState::parse(&state).unwrap_or(UpdateState::Pending),
        log,
    })
}

/// The accepted devices a request targets, as a condition on `devices d`, and how the
/// deployment records its target.
async fn resolve_target(db: &Db, p: &Principal, req: &CreateDeployment) -> AppResult<(Compiled, String)> {
    let given = [req.devices.is_some(), req.group.is_some(), req.filter.is_some()].iter().filter(|g| **g).count();
    if given != 1 {
        return Err(AppError::BadRequest("give exactly one of devices, group and filter".into()));
    }
    if let Some(ids) = &req.devices {
        if ids.is_empty() || ids.len() > MAX_DEVICE_IDS {
            return Err(AppError::BadRequest(format!("devices: give 1 to {MAX_DEVICE_IDS} device ids")));
        }
        let mut wanted = ids.clone();
        wanted.sort();
        wanted.dedup();
        // Every id must be an accepted device of the organization: a typo is an error, not
        // a smaller deployment.
        let mut found: Vec<(String, String)> = Vec::with_capacity(wanted.len());
        for chunk in wanted.chunks(500) {
            let marks: Vec<String> = (2..chunk.len() + 2).map(|i| format!("${i}")).collect();
            let sql = format!("SELECT id, status FROM devices WHERE org_id = $1 AND id IN ({})", marks.join(", "));
            let mut q = sqlx::query_as::<_, (String, String)>(&sql).bind(p.org().to_string());
            for d in chunk {
                q = q.bind(d.clone());
            }
            found.extend(q.fetch_all(db.pool()).await?);
        }
        let unknown: Vec<&String> = wanted.iter().filter(|w| !found.iter().any(|(f, _)| f == *w)).collect();
        if !unknown.is_empty() {
            return Err(AppError::BadRequest(format!(
                "devices: {} unknown device id(s): {}",
                unknown.len(),
                unknown.iter().take(20).map(|u| format!("{u:?}")).collect::<Vec<_>>().join(", ")
            )));
        }
        let not_accepted: Vec<String> = found
            .iter()
            .filter(|(_, s)| s != DeviceStatus::Accepted.as_str())
            .take(20)
            .map(|(id, s)| format!("{id} ({s})"))
            .collect();
        if !not_accepted.is_empty() {
            return Err(AppError::BadRequest(format!(
                "devices: only accepted devices take updates, not {}",
                not_accepted.join(", ")
            )));
        }
        let marks: Vec<&str> = wanted.iter().map(|_| "?").collect();
        let c = Compiled {
            sql: format!("d.id IN ({})", marks.join(", ")),
            binds: wanted.iter().map(|w| Bind::Text(w.clone())).collect(),
        };
        return Ok((c, "devices".into()));
    }
    if let Some(name) = &req.group {
        let g: Option<(String, String, Option<String>)> =
            sqlx::query_as("SELECT id, kind, filter FROM device_groups WHERE org_id = $1 AND name = $2")
                .bind(p.org().to_string())
                .bind(name.clone())
                .fetch_optional(db.pool())
                .await?;
        let (gid, kind, filter) = g.ok_or_else(|| AppError::BadRequest(format!("group: no group named {name:?}")))?;
        let c = match GroupKind::parse(&kind) {
            Some(GroupKind::Dynamic) => {
                let e = crate::filter::check(db, p.org(), filter.as_deref().unwrap_or_default()).await?;
                crate::filter::compile_for_count(&e, p.org())
            }
            _ => Compiled {
                sql: "d.id IN (SELECT m.device_id FROM device_group_members m WHERE m.group_id = ?)".into(),
                binds: vec![Bind::Text(gid)],
            },
        };
        return Ok((c, format!("group:{name}")));
    }
    let text = req.filter.as_deref().unwrap_or_default();
    if text.trim().is_empty() {
        return Err(AppError::BadRequest(
            "filter: empty; to deploy to every device use filter \"status = accepted\"".into(),
        ));
    }
    let e = crate::filter::check(db, p.org(), text).await?;
    Ok((crate::filter::compile_for_count(&e, p.org()), format!("filter:{}", text.trim())))
}

/// Creates a deployment for the accepted devices the request targets (none: 400), every
/// device `pending`; the engine sends the install to those online now.
pub async fn create(db: &Db, engine: &Arc<Engine>, p: &Principal, req: CreateDeployment) -> AppResult<Deployment> {
    p.require(Role::Operator, "creating deployments")?;
    if let Some(n) = &req.name {
        drover_proto::validate::display_name("deployment", n).map_err(AppError::BadRequest)?;
    }
    let (target, target_text) = resolve_target(db, p, &req).await?;
    let mut tx = db.begin_write().await?;
    let artifact = crate::artifacts::fetch(tx.conn(), p.org(), req.artifact.trim()).await.map_err(|e| match e {
        AppError::NotFound(m) => AppError::BadRequest(format!("artifact: {m}")),
        other => other,
    })?;
    let id = uuid::Uuid::now_v7().to_string();
    let now = now_ms();
    let name = req.name.clone().unwrap_or_else(|| format!("{} {}", artifact.name, artifact.version));
    sqlx::query(
        "INSERT INTO deployments (id, org_id, name, artifact_id, artifact_name, artifact_version, target, status, total, \
         created_at, created_by) VALUES ($1, $2, $3, $4, $5, $6, $7, 'active', 0, $8, $9)",
    )
    .bind(id.clone())
    .bind(p.org().to_string())
    .bind(name.clone())
    .bind(artifact.id.clone())
    .bind(artifact.name.clone())
    .bind(artifact.version.clone())
    .bind(target_text.clone())
    .bind(now)
    .bind(crate::artifacts::principal_label(p))
    .execute(tx.conn())
    .await?;
    // One statement for any number of devices.
    let mut f = Filter::default();
    f.and("d.org_id = ?", [Bind::Text(p.org().to_string())]);
    f.and("d.status = 'accepted'", []);
    f.and(&target.sql, target.binds);
    let n = f.next_param();
    let sql = format!(
        "INSERT INTO deployment_devices (deployment_id, device_id, created_at, state, finished, updated_at) \
         SELECT ${n}, d.id, ${}, 'pending', 0, ${} FROM devices d{}",
        n + 1,
        n + 2,
        f.sql()
    );
    let mut q = sqlx::query(&sql);
    for b in &f.binds {
        q = match b {
            Bind::Int(i) => q.bind(*i),
            Bind::Text(s) => q.bind(s.clone()),
        };
    }
    let total = q.bind(id.clone()).bind(now).bind(now).execute(tx.conn()).await?.rows_affected();
    if total == 0 {
        return Err(AppError::BadRequest(format!(
            "the target ({target_text}) matches no accepted device: nothing to deploy to"
        )));
    }
    sqlx::query("UPDATE deployments SET total = $1 WHERE id = $2")
        .bind(i64::try_from(total).unwrap_or(i64::MAX))
        .bind(id.clone())
        .execute(tx.conn())
        .await?;
    let summary = format!(
        "deployment {name:?}: artifact {}@{} to {total} device(s) ({target_text})",
        artifact.name, artifact.version
    );
    audit::append(
        tx.conn(),
        Event { actor: p, action: "deployment.create", target_kind: "deployment", target_id: &id, summary },
    )
    .await?;
    let d = fetch(tx.conn(), p.org(), &id).await?;
    tx.commit().await?;
    engine.kick(&id);
    Ok(d)
}

/// Stops a deployment: devices still `pending` become `aborted` at once; devices that are
/// downloading (or were sent the install) get an abort; devices past the point of no return
/// finish and report as usual.
pub async fn abort(db: &Db, engine: &Arc<Engine>, p: &Principal, id: &str) -> AppResult<Deployment> {
    p.require(Role::Operator, "aborting deployments")?;
    let mut tx = db.begin_write().await?;
    // Taking the row first serializes with the engine finishing the deployment meanwhile.
    sqlx::query("UPDATE deployments SET status = status WHERE org_id = $1 AND id = $2")
        .bind(p.org().to_string())
        .bind(id.to_string())
        .execute(tx.conn())
        .await?;
    let before = fetch(tx.conn(), p.org(), id).await?;
    match before.status {
        DeploymentStatus::Active => {}
        DeploymentStatus::Aborted => return Ok(before),
        s => {
            return Err(AppError::Conflict(format!("the deployment has finished ({}): nothing to abort", s.as_str())));
        }
    }
    let now = now_ms();
    let notify: Vec<(String,)> = sqlx::query_as(
        "SELECT device_id FROM deployment_devices WHERE deployment_id = $1 AND finished = 0 \
         AND (state = 'downloading' OR (state = 'pending' AND sent_at IS NOT NULL))",
    )
    .bind(id.to_string())
    .fetch_all(tx.conn())
    .await?;
    let freed: Vec<(String,)> =
        sqlx::query_as("SELECT device_id FROM deployment_devices WHERE deployment_id = $1 AND state = 'pending'")
            .bind(id.to_string())
            .fetch_all(tx.conn())
            .await?;
    sqlx::query(
        "UPDATE deployment_devices SET state = 'aborted', finished = 1, message = 'aborted by an operator', \
         updated_at = $1 WHERE deployment_id = $2 AND state = 'pending'",
    )
    .bind(now)
    .bind(id.to_string())
    .execute(tx.conn())
    .await?;
    sqlx::query("UPDATE deployments SET status = 'aborted' WHERE id = $1")
        .bind(id.to_string())
        .execute(tx.conn())
        .await?;
    finish_if_done(tx.conn(), id, now).await?;
    let summary = format!(
        "deployment {:?} aborted: {} device(s) had not started, {} told to stop",
        before.name,
        freed.len(),
        notify.iter().filter(|(d,)| !freed.iter().any(|(f,)| f == d)).count()
    );
    audit::append(
        tx.conn(),
        Event { actor: p, action: "deployment.abort", target_kind: "deployment", target_id: id, summary },
    )
    .await?;
    let after = fetch(tx.conn(), p.org(), id).await?;
    tx.commit().await?;
    engine.send_abort(id, notify.into_iter().map(|(d,)| d).collect());
    // Devices that had not started may have another deployment queued behind this one.
    engine.dispatch_next(freed.into_iter().map(|(d,)| d).collect());
    Ok(after)
}

/// The states of a row not yet final, as an SQL list: `'pending', 'downloading', …`.
fn in_flight_states() -> &'static str {
    static LIST: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    LIST.get_or_init(|| {
        UpdateState::ALL
            .iter()
            .filter(|s| !s.is_final())
            .map(|s| format!("'{}'", s.as_str()))
            .collect::<Vec<_>>()
            .join(", ")
    })
}

/// Ends the deployment when none of its devices is unfinished: `succeeded`, `failed` (any
/// device failed, rolled back or was incompatible), or kept `aborted`; sets `finished_at`.
/// The caller holds the deployment's row (or SQLite's writer lock).
pub(crate) async fn finish_if_done(conn: &mut sqlx::AnyConnection, id: &str, now: i64) -> Result<bool, sqlx::Error> {
    // Runs for every device's final report: one row still in flight ends the check, found
    // through the (deployment, state) index — not a count of the deployment's rows, which
    // would make a rollout's bookkeeping grow with the square of its devices.
    let open: Option<String> = sqlx::query_scalar(&format!(
        "SELECT device_id FROM deployment_devices WHERE deployment_id = $1 AND state IN ({}) LIMIT 1",
        in_flight_states()
    ))
    .bind(id.to_string())
    .fetch_optional(&mut *conn)
    .await?;
    if open.is_some() {
        return Ok(false);
    }
    // `succeeded` only when every device runs the artifact: a failure, a rollback, an
    // incompatible device or one that ended `aborted` (decommissioned mid-way) fails it.
    let failed: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM deployment_devices WHERE deployment_id = $1 \
         AND state NOT IN ('success', 'already-installed')",
    )
    .bind(id.to_string())
    .fetch_one(&mut *conn)
    .await?;
    let done = sqlx::query(
        "UPDATE deployments SET finished_at = $1, \
         status = CASE WHEN status = 'aborted' THEN 'aborted' WHEN $2 > 0 THEN 'failed' ELSE 'succeeded' END \
         WHERE id = $3 AND finished_at IS NULL",
    )
    .bind(now)
    .bind(failed)
    .bind(id.to_string())
    .execute(&mut *conn)
    .await?
    .rows_affected();
    Ok(done > 0)
}

/// A decommissioned device will never report: its unfinished rows end as `aborted`, and
/// the deployments they belong to may finish. Runs in the decommission's transaction.
pub(crate) async fn end_for_device(
    conn: &mut sqlx::AnyConnection,
    device_id: &str,
    now: i64,
) -> Result<(), sqlx::Error> {
    let deps: Vec<(String,)> =
        sqlx::query_as("SELECT deployment_id FROM deployment_devices WHERE device_id = $1 AND finished = 0")
            .bind(device_id.to_string())
            .fetch_all(&mut *conn)
            .await?;
    if deps.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "UPDATE deployment_devices SET state = 'aborted', finished = 1, message = 'the device was decommissioned', \
         updated_at = $1 WHERE device_id = $2 AND finished = 0",
    )
    .bind(now)
    .bind(device_id.to_string())
    .execute(&mut *conn)
    .await?;
    for (dep,) in deps {
        sqlx::query("UPDATE deployments SET status = status WHERE id = $1")
            .bind(dep.clone())
            .execute(&mut *conn)
            .await?;
        finish_if_done(conn, &dep, now).await?;
    }
    Ok(())
}

/// A device whose update ended badly, for the overview's "recent failures".
#[derive(Debug, Clone, serde::Serialize)]
pub struct RecentFailure {
    pub deployment_id: String,
    pub deployment_name: String,
    pub device_id: String,
    pub state: String,
    pub message: Option<String>,
    pub at: String,
}

/// The latest deployment devices that ended in failure or were rolled back, newest first.
pub async fn recent_failures(db: &Db, p: &Principal, limit: u32) -> AppResult<Vec<RecentFailure>> {
    p.require(Role::Viewer, "reading deployments")?;
    let rows: Vec<(String, String, String, String, Option<String>, i64)> = sqlx::query_as(&format!(
        "SELECT d.id, d.name, dd.device_id, dd.state, dd.message, dd.updated_at FROM deployment_devices dd \
         JOIN deployments d ON d.id = dd.deployment_id \
         WHERE d.org_id = $1 AND dd.state IN ('failure', 'rolled-back') \
         ORDER BY dd.updated_at DESC LIMIT {}",
        limit.clamp(1, 100)
    ))
    .bind(p.org().to_string())
    .fetch_all(db.pool())
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| RecentFailure {
            deployment_id: r.0,
            deployment_name: r.1,
            device_id: r.2,
            state: r.3,
            message: r.4,
            at: to_rfc3339(r.5),
        })
        .collect())
}

/// The ids of the organization's deployments named `name`, newest first.
pub async fn ids_named(db: &Db, org: &str, name: &str) -> AppResult<Vec<String>> {
    let rows: Vec<(String,)> = sqlx::query_as(
        "SELECT id FROM deployments WHERE org_id = $1 AND name = $2 ORDER BY created_at DESC, id LIMIT 100",
    )
    .bind(org.to_string())
    .bind(name.trim().to_string())
    .fetch_all(db.pool())
    .await?;
    Ok(rows.into_iter().map(|r| r.0).collect())
}
