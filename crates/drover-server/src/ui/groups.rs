//! The group pages: the list, creating static and dynamic groups, a group with its members,
//! the dynamic group editor with a live preview of what its filter matches, and static group
//! members added and removed by hand.

use axum::Router;
use axum::extract::{Form, Path, Query, State};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use drover_proto::api::{AddGroupDevices, CreateGroup, DeviceListQuery, GroupKind, GroupListQuery, UpdateGroup};
use minijinja::context;
use serde::Deserialize;

use super::{CsrfForm, Flash, UiUser, back, check_csrf, error_page, merge, page_ctx, urlencode};
use crate::app::AppState;
use crate::auth::Principal;
use crate::error::{AppError, AppResult};
use crate::groups;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/groups", get(groups_page).post(group_create))
        .route("/groups/preview", get(preview))
        .route("/groups/{id}", get(group_page))
        .route("/groups/{id}/edit", post(group_edit))
        .route("/groups/{id}/delete", post(group_delete))
        .route("/groups/{id}/devices", post(group_add))
        .route("/groups/{id}/devices/{device_id}/remove", post(group_remove))
}

#[derive(Deserialize, Default)]
struct GroupsUi {
    cursor: Option<String>,
    notice: Option<String>,
    error: Option<String>,
}

async fn groups_page(State(s): State<AppState>, UiUser(p): UiUser, Query(q): Query<GroupsUi>) -> Response {
    let flash = Flash { notice: q.notice, error: q.error };
    render_groups(&s, &p, flash, q.cursor, None, None).await
}

/// The groups page; after a failed create, with the form as typed and the error under its field.
async fn render_groups(
    s: &AppState,
    p: &Principal,
    flash: Flash,
    cursor: Option<String>,
    form: Option<&NewGroupForm>,
    error: Option<AppError>,
) -> Response {
    let status = error.as_ref().map(AppError::status).unwrap_or(axum::http::StatusCode::OK);
    let mut errors = std::collections::BTreeMap::new();
    let mut flash = flash;
    if let Some(e) = error {
        let msg = e.public_message();
        match &e {
            AppError::BadRequest(_) | AppError::Conflict(_) if msg.contains("filter") => {
                errors.insert("filter", msg);
            }
            AppError::BadRequest(_) | AppError::Conflict(_) if msg.contains("name") => {
                errors.insert("name", msg);
            }
            _ => flash.error = Some(msg),
        }
    }
    let r: AppResult<Html<String>> = async {
        let ctx = page_ctx(s, p, "groups", &flash).await?;
        let query = GroupListQuery { limit: Some(100), cursor, ..Default::default() };
        let page = groups::list(&s.db, p, &query).await?;
        let next_url = page.next_cursor.map(|c| format!("/groups?cursor={}", urlencode(&c)));
        let extra = context! { groups => page.items, next_url => next_url, f => form, errors => errors };
        s.ui.render("groups.html", merge(ctx, extra))
    }
    .await;
    match r {
        Ok(html) => (status, html).into_response(),
        Err(e) => error_page(s, e),
    }
}

#[derive(Deserialize, serde::Serialize)]
struct NewGroupForm {
    #[serde(skip_serializing)]
    csrf: String,
    name: String,
    kind: String,
    filter: Option<String>,
    description: Option<String>,
}

async fn group_create(State(s): State<AppState>, UiUser(p): UiUser, Form(f): Form<NewGroupForm>) -> Response {
    if let Err(e) = check_csrf(&p, &f.csrf) {
        return error_page(&s, e);
    }
    let Some(kind) = GroupKind::parse(&f.kind) else {
        return back("/groups", Err(AppError::BadRequest("choose static or dynamic".into())));
    };
    let filter = match kind {
        GroupKind::Dynamic => f.filter.clone().filter(|f| !f.trim().is_empty()),
        GroupKind::Static => None,
    };
    let req = CreateGroup {
        name: f.name.trim().to_string(),
        kind,
        filter,
        description: f.description.clone().unwrap_or_default(),
    };
    match groups::create(&s.db, &p, req).await {
        Ok(g) => back(&format!("/groups/{}", urlencode(&g.id)), Ok(format!("Group {} created.", g.name))),
        Err(e @ AppError::Forbidden(_)) => back("/groups", Err(e)),
        Err(e) => render_groups(&s, &p, Flash::default(), None, Some(&f), Some(e)).await,
    }
}

#[derive(Deserialize, Default)]
struct GroupUi {
    cursor: Option<String>,
    notice: Option<String>,
    error: Option<String>,
}

async fn group_page(
    State(s): State<AppState>,
    UiUser(p): UiUser,
    Path(id): Path<String>,
    Query(q): Query<GroupUi>,
) -> Response {
    let flash = Flash { notice: q.notice, error: q.error };
    let r: AppResult<Html<String>> = async {
        let ctx = page_ctx(&s, &p, "groups", &flash).await?;
        let group = groups::get(&s.db, &p, &id).await?;
        let query = DeviceListQuery { limit: Some(100), cursor: q.cursor, ..Default::default() };
        let members = groups::devices(&s.db, &p, &id, &query).await?;
        let next_url = members.next_cursor.map(|c| format!("/groups/{}?cursor={}", urlencode(&id), urlencode(&c)));
        let extra = context! { g => group, devices => members.items, next_url => next_url };
        s.ui.render("group.html", merge(ctx, extra))
    }
    .await;
    r.map(IntoResponse::into_response).unwrap_or_else(|e| error_page(&s, e))
}

#[derive(Deserialize)]
struct EditGroupForm {
    csrf: String,
    name: Option<String>,
    filter: Option<String>,
    description: Option<String>,
}

async fn group_edit(
    State(s): State<AppState>,
    UiUser(p): UiUser,
    Path(id): Path<String>,
    Form(f): Form<EditGroupForm>,
) -> Response {
    if let Err(e) = check_csrf(&p, &f.csrf) {
        return error_page(&s, e);
    }
    let req = UpdateGroup {
        name: f.name.map(|n| n.trim().to_string()).filter(|n| !n.is_empty()),
        filter: f.filter,
        description: f.description,
    };
    let r = groups::update(&s.db, &p, &id, req).await;
    back(&format!("/groups/{}", urlencode(&id)), r.map(|g| format!("Group {} saved.", g.name)))
}

async fn group_delete(
    State(s): State<AppState>,
    UiUser(p): UiUser,
    Path(id): Path<String>,
    Form(f): Form<CsrfForm>,
) -> Response {
    if let Err(e) = check_csrf(&p, &f.csrf) {
        return error_page(&s, e);
    }
    match groups::delete(&s.db, &p, &id).await {
        Ok(_) => back("/groups", Ok("Group deleted.".into())),
        Err(e) => back(&format!("/groups/{}", urlencode(&id)), Err(e)),
    }
}

#[derive(Deserialize)]
struct AddDevicesForm {
    csrf: String,
    /// Device names or ids, one a line, or separated by spaces or commas.
    devices: String,
}

async fn group_add(
    State(s): State<AppState>,
    UiUser(p): UiUser,
    Path(id): Path<String>,
    Form(f): Form<AddDevicesForm>,
) -> Response {
    if let Err(e) = check_csrf(&p, &f.csrf) {
        return error_page(&s, e);
    }
    let r = match super::resolve_devices(&s, &p, &f.devices).await {
        Ok(devices) if devices.is_empty() => {
            Err(AppError::BadRequest("give the names or ids of the devices to add".into()))
        }
        Ok(devices) => groups::add_devices(&s.db, &p, &id, AddGroupDevices { devices }).await,
        Err(e) => Err(e),
    };
    back(
        &format!("/groups/{}", urlencode(&id)),
        r.map(|a| format!("{} devices added, {} were members already.", a.added, a.already)),
    )
}

async fn group_remove(
    State(s): State<AppState>,
    UiUser(p): UiUser,
    Path((id, device_id)): Path<(String, String)>,
    Form(f): Form<CsrfForm>,
) -> Response {
    if let Err(e) = check_csrf(&p, &f.csrf) {
        return error_page(&s, e);
    }
    let r = groups::remove_device(&s.db, &p, &id, &device_id).await;
    back(&format!("/groups/{}", urlencode(&id)), r.map(|_| "Device removed from the group.".to_string()))
}

#[derive(Deserialize)]
struct PreviewUi {
    filter: Option<String>,
}

/// What a filter matches now: a fragment for htmx (and a plain page without JavaScript).
async fn preview(State(s): State<AppState>, UiUser(p): UiUser, Query(q): Query<PreviewUi>) -> Response {
    let filter = q.filter.unwrap_or_default();
    if filter.trim().is_empty() {
        return Html("<p class=\"muted\">Type a filter to see which devices it matches.</p>".to_string())
            .into_response();
    }
    let result = match drover_proto::filter::parse(&filter) {
        // Said here with the column, before asking the database.
        Err(e) => Err((e.to_string(), Some(e.column))),
        Ok(_) => groups::preview(&s.db, &p, &filter).await.map_err(|e| (e.public_message(), None)),
    };
    let ctx = match result {
        Ok(pv) => context! { filter => filter, preview => pv },
        Err((message, column)) => context! {
            filter => filter, error => message, caret => column.map(|c| " ".repeat(c.saturating_sub(1)) + "^"),
        },
    };
    s.ui.render("group_preview.html", ctx).map(IntoResponse::into_response).unwrap_or_else(|e| error_page(&s, e))
}
