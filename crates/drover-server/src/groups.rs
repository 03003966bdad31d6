//! Device groups: static (members added by an operator) or dynamic (every device matching a
//! filter, evaluated live — there is no stored membership to go stale). Names are unique per
//! organization. Every change is audited.

use drover_proto::api::{
    AddGroupDevices, CreateGroup, Device, DeviceListQuery, Group, GroupDevicesAdded, GroupKind, GroupListQuery,
    GroupPreview, Page, Role, UpdateGroup,
};
use drover_proto::validate;

use crate::audit::{self, Event};
use crate::auth::Principal;
use crate::db::{Bind, Db, Filter, bind_all, is_unique_violation};
use crate::error::{AppError, AppResult};
use crate::filter::Compiled;
use crate::ops::new_id;
use crate::page::{CursorValue, PageRequest, SortField};
use crate::time::{now_ms, to_rfc3339};

/// Devices shown by a filter preview.
pub const PREVIEW_DEVICES: u32 = 20;
/// Most devices added to a static group in one request.
pub const MAX_ADD: usize = 10_000;

type GroupRow = (String, String, String, Option<String>, String, String, i64, i64);
const GROUP_COLUMNS: &str = "id, name, kind, filter, description, created_by, created_at, updated_at";

fn to_group(r: GroupRow) -> AppResult<Group> {
    Ok(Group {
        id: r.0,
        name: r.1,
        kind: GroupKind::parse(&r.2).ok_or_else(|| AppError::Internal(format!("unknown group kind {:?}", r.2)))?,
        filter: r.3,
        description: r.4,
        created_by: r.5,
        created_at: to_rfc3339(r.6),
        updated_at: to_rfc3339(r.7),
        device_count: None,
    })
}

fn check_name(name: &str) -> AppResult<()> {
    validate::display_name("group", name).map_err(AppError::BadRequest)
}

fn check_description(d: &str) -> AppResult<()> {
    if d.chars().count() > 1000 {
        return Err(AppError::BadRequest("the description is longer than 1000 characters".into()));
    }
    Ok(())
}

async fn fetch(conn: &mut sqlx::AnyConnection, org_id: &str, id: &str) -> AppResult<Group> {
    let row: Option<GroupRow> =
        sqlx::query_as(&format!("SELECT {GROUP_COLUMNS} FROM device_groups WHERE org_id = $1 AND id = $2"))
            .bind(org_id.to_string())
            .bind(id.to_string())
            .fetch_optional(conn)
            .await?;
    to_group(row.ok_or_else(|| AppError::NotFound(format!("no group with id {id:?}")))?)
}

/// Dynamic groups whose filter names the static group `name`.
async fn referencing(conn: &mut sqlx::AnyConnection, org_id: &str, name: &str) -> AppResult<Vec<String>> {
    let rows: Vec<(String, Option<String>)> =
        sqlx::query_as("SELECT name, filter FROM device_groups WHERE org_id = $1 AND kind = 'dynamic'")
            .bind(org_id.to_string())
            .fetch_all(conn)
            .await?;
    Ok(rows
        .into_iter()
        .filter(|(_, f)| {
            f.as_deref()
                .and_then(|f| drover_proto::filter::parse(f).ok())
                .is_some_and(|e| e.group_names().contains(&name))
        })
        .map(|(n, _)| n)
        .collect())
}

/// The condition selecting a group's members; `for_count` when every member is counted
/// rather than a page listed.
async fn members_condition(db: &Db, org_id: &str, g: &Group, for_count: bool) -> AppResult<Compiled> {
    match g.kind {
        GroupKind::Static => Ok(Compiled {
            sql: "EXISTS (SELECT 1 FROM device_group_members m WHERE m.group_id = ? AND m.device_id = d.id)".into(),
            binds: vec![Bind::Text(g.id.clone())],
        }),
        GroupKind::Dynamic => {
            let text = g.filter.as_deref().unwrap_or_default();
            // Saved filters were checked when saved; a static group they name cannot be
            // deleted or renamed, so this holds.
            let e = crate::filter::check(db, org_id, text).await?;
            Ok(if for_count {
                crate::filter::compile_for_count(&e, org_id)
            } else {
                crate::filter::compile(&e, org_id)
            })
        }
    }
}

const GROUP_SORTS: &[SortField] = &[
    SortField { name: "name", column: "name", int: false },
    SortField { name: "created_at", column: "created_at", int: true },
];

pub async fn list(db: &Db, p: &Principal, q: &GroupListQuery) -> AppResult<Page<Group>> {
    p.require(Role::Viewer, "listing groups")?;
    let page = PageRequest::parse(q.limit, q.cursor.as_deref(), q.sort.as_deref(), GROUP_SORTS, "name")?;
    let mut f = Filter::default();
    f.and("org_id = ?", [Bind::Text(p.org().to_string())]);
    if let Some(k) = q.kind {
        f.and("kind = ?", [Bind::Text(k.as_str().into())]);
    }
    // Names are unique per organization: no tie-breaker needed for them.
    let id_col = (page.sort.field.name != "name").then_some("id");
    page.apply(&mut f, id_col);
    let sql = format!("SELECT {GROUP_COLUMNS} FROM device_groups{}{}", f.sql(), page.order_limit(id_col));
    let rows: Vec<GroupRow> = bind_all(sqlx::query_as(&sql), &f.binds).fetch_all(db.pool()).await?;
    let by_name = id_col.is_none();
    let (rows, next_cursor) = page.finish(rows, |r| {
        if by_name { (CursorValue::Text(r.1.clone()), None) } else { (CursorValue::Int(r.6), Some(r.0.clone())) }
    });
    Ok(Page { items: rows.into_iter().map(to_group).collect::<AppResult<_>>()?, next_cursor })
}

/// One group, with how many devices it has now.
pub async fn get(db: &Db, p: &Principal, id: &str) -> AppResult<Group> {
    p.require(Role::Viewer, "reading groups")?;
    let mut conn = db.pool().acquire().await?;
    let mut g = fetch(&mut conn, p.org(), id).await?;
    drop(conn);
    let c = members_condition(db, p.org(), &g, true).await?;
    g.device_count = Some(crate::devices::count_where(db, p.org(), c).await?);
    Ok(g)
}

pub async fn create(db: &Db, p: &Principal, req: CreateGroup) -> AppResult<Group> {
    p.require(Role::Operator, "creating groups")?;
    check_name(&req.name)?;
    check_description(&req.description)?;
    let filter = match (req.kind, req.filter.as_deref()) {
        (GroupKind::Static, Some(_)) => {
            return Err(AppError::BadRequest("a static group has no filter: add devices to it instead".into()));
        }
        (GroupKind::Dynamic, None) => {
            return Err(AppError::BadRequest("a dynamic group needs a filter, e.g. tag.region = \"eu\"".into()));
        }
        (GroupKind::Dynamic, Some(f)) => {
            crate::filter::prepare(db, p.org(), f).await?;
            Some(f.trim().to_string())
        }
        (GroupKind::Static, None) => None,
    };
    let id = new_id();
    let now = now_ms();
    let mut tx = db.begin_write().await?;
    let inserted = sqlx::query(
        "INSERT INTO device_groups (id, org_id, name, kind, filter, description, created_by, created_at, updated_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8)",
    )
    .bind(id.clone())
    .bind(p.org().to_string())
    .bind(req.name.clone())
    .bind(req.kind.as_str())
    .bind(filter.clone())
    .bind(req.description.clone())
    .bind(p.name.clone())
    .bind(now)
    .execute(tx.conn())
    .await;
    match inserted {
        Err(e) if is_unique_violation(&e) => {
            return Err(AppError::Conflict(format!("a group named {:?} exists already", req.name)));
        }
        other => other?,
    };
    let summary = match &filter {
        Some(f) => format!("dynamic group {:?} with filter {f}", req.name),
        None => format!("static group {:?}", req.name),
    };
    audit::append(tx.conn(), Event { actor: p, action: "group.create", target_kind: "group", target_id: &id, summary })
        .await?;
    let g = fetch(tx.conn(), p.org(), &id).await?;
    tx.commit().await?;
    Ok(g)
}

pub async fn update(db: &Db, p: &Principal, id: &str, req: UpdateGroup) -> AppResult<Group> {
    p.require(Role::Operator, "changing groups")?;
    if let Some(n) = &req.name {
        check_name(n)?;
    }
    if let Some(d) = &req.description {
        check_description(d)?;
    }
    if let Some(f) = &req.filter {
        // Checked before the write lock: it reads group names.
        crate::filter::prepare(db, p.org(), f).await?;
    }
    let mut tx = db.begin_write().await?;
    let before = fetch(tx.conn(), p.org(), id).await?;
    if req.filter.is_some() && before.kind == GroupKind::Static {
        return Err(AppError::BadRequest("a static group has no filter: add devices to it instead".into()));
    }
    let mut changes = Vec::new();
    if let Some(n) = req.name.as_ref().filter(|n| **n != before.name) {
        if before.kind == GroupKind::Static {
            let users = referencing(tx.conn(), p.org(), &before.name).await?;
            if !users.is_empty() {
                return Err(AppError::Conflict(format!(
                    "the filter of dynamic group(s) {users:?} names this group; change them first"
                )));
            }
        }
        changes.push(format!("name {:?} → {n:?}", before.name));
    }
    let filter = req.filter.as_deref().map(str::trim);
    if let Some(f) = filter.filter(|f| Some(*f) != before.filter.as_deref()) {
        changes.push(format!("filter {} → {f}", before.filter.as_deref().unwrap_or_default()));
    }
    if let Some(d) = req.description.as_ref().filter(|d| **d != before.description) {
        changes.push(format!("description → {d:?}"));
    }
    if changes.is_empty() {
        return Ok(before);
    }
    let updated = sqlx::query(
        "UPDATE device_groups SET name = COALESCE($1, name), filter = COALESCE($2, filter), \
         description = COALESCE($3, description), updated_at = $4 WHERE id = $5",
    )
    .bind(req.name.clone())
    .bind(filter.map(str::to_string))
    .bind(req.description.clone())
    .bind(now_ms())
    .bind(id.to_string())
    .execute(tx.conn())
    .await;
    match updated {
        Err(e) if is_unique_violation(&e) => {
            return Err(AppError::Conflict(format!("a group named {:?} exists already", req.name.unwrap_or_default())));
        }
        other => other?,
    };
    let summary = format!("group {:?}: {}", before.name, changes.join("; "));
    audit::append(tx.conn(), Event { actor: p, action: "group.update", target_kind: "group", target_id: id, summary })
        .await?;
    let g = fetch(tx.conn(), p.org(), id).await?;
    tx.commit().await?;
    Ok(g)
}

pub async fn delete(db: &Db, p: &Principal, id: &str) -> AppResult<()> {
    p.require(Role::Operator, "deleting groups")?;
    let mut tx = db.begin_write().await?;
    let g = fetch(tx.conn(), p.org(), id).await?;
    if g.kind == GroupKind::Static {
        let users = referencing(tx.conn(), p.org(), &g.name).await?;
        if !users.is_empty() {
            return Err(AppError::Conflict(format!(
                "the filter of dynamic group(s) {users:?} names this group; change them first"
            )));
        }
    }
    let members = sqlx::query("DELETE FROM device_group_members WHERE group_id = $1")
        .bind(id.to_string())
        .execute(tx.conn())
        .await?
        .rows_affected();
    sqlx::query("DELETE FROM device_groups WHERE id = $1").bind(id.to_string()).execute(tx.conn()).await?;
    let summary = match g.kind {
        GroupKind::Static => format!("static group {:?} deleted ({members} members)", g.name),
        GroupKind::Dynamic => format!("dynamic group {:?} deleted (filter {})", g.name, g.filter.unwrap_or_default()),
    };
    audit::append(tx.conn(), Event { actor: p, action: "group.delete", target_kind: "group", target_id: id, summary })
        .await?;
    tx.commit().await?;
    Ok(())
}

/// A group's devices, with the same query options as the device list.
pub async fn devices(db: &Db, p: &Principal, id: &str, q: &DeviceListQuery) -> AppResult<Page<Device>> {
    p.require(Role::Viewer, "listing devices")?;
    let mut conn = db.pool().acquire().await?;
    let g = fetch(&mut conn, p.org(), id).await?;
    drop(conn);
    let c = members_condition(db, p.org(), &g, false).await?;
    crate::devices::list_where(db, p.org(), q, Some(c)).await
}

/// Adds devices to a static group: all of them, or none when any id is unknown.
pub async fn add_devices(db: &Db, p: &Principal, id: &str, req: AddGroupDevices) -> AppResult<GroupDevicesAdded> {
    p.require(Role::Operator, "changing group members")?;
    if req.devices.is_empty() || req.devices.len() > MAX_ADD {
        return Err(AppError::BadRequest(format!("give 1 to {MAX_ADD} device ids")));
    }
    let mut wanted = req.devices.clone();
    wanted.sort();
    wanted.dedup();
    let mut tx = db.begin_write().await?;
    let g = fetch(tx.conn(), p.org(), id).await?;
    if g.kind == GroupKind::Dynamic {
        return Err(AppError::Conflict(format!(
            "{:?} is a dynamic group: its members are the devices matching its filter",
            g.name
        )));
    }
    let mut found: Vec<String> = Vec::with_capacity(wanted.len());
    for chunk in wanted.chunks(500) {
        let marks: Vec<String> = (2..chunk.len() + 2).map(|i| format!("${i}")).collect();
        let sql = format!("SELECT id FROM devices WHERE org_id = $1 AND id IN ({})", marks.join(", "));
        let mut q = sqlx::query_as::<_, (String,)>(&sql).bind(p.org().to_string());
        for d in chunk {
            q = q.bind(d.clone());
        }
        found.extend(q.fetch_all(tx.conn()).await?.into_iter().map(|(d,)| d));
    }
    if found.len() != wanted.len() {
        let missing: Vec<&String> = wanted.iter().filter(|w| !found.contains(w)).take(20).collect();
        let n = wanted.len() - found.len();
        return Err(AppError::NotFound(format!(
            "{n} unknown device id(s), nothing added: {}{}",
            missing.iter().map(|m| format!("{m:?}")).collect::<Vec<_>>().join(", "),
            if n > missing.len() { ", …" } else { "" }
        )));
    }
    let now = now_ms();
    let mut added = 0u32;
    for d in &wanted {
        let exists: Option<(i64,)> =
            sqlx::query_as("SELECT 1 FROM device_group_members WHERE group_id = $1 AND device_id = $2")
                .bind(id.to_string())
                .bind(d.clone())
                .fetch_optional(tx.conn())
                .await?;
        if exists.is_none() {
            sqlx::query("INSERT INTO device_group_members (group_id, device_id, added_at) VALUES ($1, $2, $3)")
                .bind(id.to_string())
                .bind(d.clone())
                .bind(now)
                .execute(tx.conn())
                .await?;
            added += 1;
        }
    }
    let already = u32::try_from(wanted.len()).unwrap_or(u32::MAX) - added;
    if added > 0 {
        let sample: Vec<&str> = wanted.iter().take(5).map(String::as_str).collect();
        let summary = format!(
            "{added} device(s) added to group {:?} ({}{})",
            g.name,
            sample.join(", "),
            if wanted.len() > 5 { ", …" } else { "" }
        );
        audit::append(
            tx.conn(),
            Event { actor: p, action: "group.add_devices", target_kind: "group", target_id: id, summary },
        )
        .await?;
    }
    tx.commit().await?;
    Ok(GroupDevicesAdded { added, already })
}

pub async fn remove_device(db: &Db, p: &Principal, id: &str, device_id: &str) -> AppResult<()> {
    p.require(Role::Operator, "changing group members")?;
    let mut tx = db.begin_write().await?;
    let g = fetch(tx.conn(), p.org(), id).await?;
    if g.kind == GroupKind::Dynamic {
        return Err(AppError::Conflict(format!(
            "{:?} is a dynamic group: change its filter or the device's tags instead",
            g.name
        )));
    }
    let n = sqlx::query("DELETE FROM device_group_members WHERE group_id = $1 AND device_id = $2")
        .bind(id.to_string())
        .bind(device_id.to_string())
        .execute(tx.conn())
        .await?
        .rows_affected();
    if n == 0 {
        return Err(AppError::NotFound(format!("device {device_id:?} is not a member of group {:?}", g.name)));
    }
    let summary = format!("device {device_id} removed from group {:?}", g.name);
    audit::append(
        tx.conn(),
        Event { actor: p, action: "group.remove_device", target_kind: "group", target_id: id, summary },
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

/// What a filter would match: the count and the newest few devices (the UI's live preview).
pub async fn preview(db: &Db, p: &Principal, filter: &str) -> AppResult<GroupPreview> {
    p.require(Role::Viewer, "previewing filters")?;
    let e = crate::filter::check(db, p.org(), filter).await?;
    let count = crate::devices::count_where(db, p.org(), crate::filter::compile_for_count(&e, p.org())).await?;
    let q = DeviceListQuery { limit: Some(PREVIEW_DEVICES), ..Default::default() };
    let page = crate::devices::list_where(db, p.org(), &q, Some(crate::filter::compile(&e, p.org()))).await?;
    Ok(GroupPreview { count, devices: page.items })
}

/// The id of the organization's group named `name`, if there is one.
pub async fn id_named(db: &Db, org: &str, name: &str) -> AppResult<Option<String>> {
    let row: Option<(String,)> = sqlx::query_as("SELECT id FROM device_groups WHERE org_id = $1 AND name = $2")
        .bind(org.to_string())
        .bind(name.trim().to_string())
        .fetch_optional(db.pool())
        .await?;
    Ok(row.map(|r| r.0))
}
