//! The fleet pages: devices (with the pending ones to accept), a device's own page,
//! enrollment tokens and pre-authorization. Each works as plain forms and links; htmx only
//! refreshes the device table every few seconds so presence stays live.

use std::collections::BTreeMap;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Form, Path, Query, State};
use axum::http::{HeaderMap, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use drover_proto::api::{
    AddGroupDevices, CreateEnrollmentToken, CreatedEnrollmentToken, DeviceListQuery, DeviceStatus, GroupKind,
    GroupListQuery, PatchTags, Preauthorize, ReplaceTags, Role,
};
use minijinja::{Value, context};
use serde::Deserialize;

use super::{CsrfForm, Flash, UiUser, back, check_csrf, error_page, merge, page_ctx, safe_next, urlencode};
use crate::app::AppState;
use crate::auth::Principal;
use crate::devices;
use crate::error::{AppError, AppResult};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/devices", get(devices_page))
        .route("/devices/table", get(devices_table))
        .route("/devices/bulk", post(devices_bulk))
        .route("/devices/{id}", get(device_page))
        .route("/devices/{id}/decommission", get(decommission_page).post(device_decommission))
        .route("/devices/{id}/{action}", post(device_action))
        .route("/enrollment", get(enrollment_page))
        .route("/enrollment/tokens", post(enrollment_token_create))
        .route("/enrollment/tokens/{id}/revoke", post(enrollment_token_revoke))
        .route("/enrollment/preauthorize", post(preauthorize))
        .route("/enrollment/preauthorizations/{id}/revoke", post(preauthorization_revoke))
}

const STATUSES: [&str; 4] = ["pending", "accepted", "rejected", "decommissioned"];
const SORTS: &[(&str, &str)] = &[
    ("-created_at", "newest first"),
    ("created_at", "oldest first"),
    ("-updated_at", "recently changed"),
    ("updated_at", "least recently changed"),
    ("-last_seen_at", "recently seen"),
    ("last_seen_at", "longest unseen"),
    ("name", "name"),
    ("id", "id"),
];

/// The device list's query as the browser sends it: empty fields mean "any".
#[derive(Debug, Default, Deserialize)]
struct DevicesUi {
    status: Option<String>,
    online: Option<String>,
    filter: Option<String>,
    q: Option<String>,
    sort: Option<String>,
    /// Devices running an artifact (id, NAME or NAME@VERSION) or a build of a commit: links
    /// from an artifact's page land here.
    artifact: Option<String>,
    commit: Option<String>,
    cursor: Option<String>,
    notice: Option<String>,
    error: Option<String>,
}

fn some(v: &Option<String>) -> Option<&str> {
    v.as_deref().map(str::trim).filter(|v| !v.is_empty())
}

impl DevicesUi {
    /// The filters (not the cursor or messages) as a query string, to link and poll with.
    fn query_string(&self) -> String {
        let mut parts = Vec::new();
        for (k, v) in [
            ("status", &self.status),
            ("online", &self.online),
            ("filter", &self.filter),
            ("q", &self.q),
            ("sort", &self.sort),
            ("artifact", &self.artifact),
            ("commit", &self.commit),
        ] {
            if let Some(v) = some(v) {
                parts.push(format!("{k}={}", urlencode(v)));
            }
        }
        parts.join("&")
    }

    fn status(&self) -> AppResult<Option<DeviceStatus>> {
        some(&self.status)
            .map(|s| DeviceStatus::parse(s).ok_or_else(|| AppError::BadRequest(format!("unknown status {s:?}"))))
            .transpose()
    }

    fn api_query(&self) -> AppResult<DeviceListQuery> {
        let online = match some(&self.online) {
            None => None,
            Some("true") => Some(true),
            Some("false") => Some(false),
            Some(o) => return Err(AppError::BadRequest(format!("online must be true or false, not {o:?}"))),
        };
        Ok(DeviceListQuery {
            limit: Some(50),
            cursor: some(&self.cursor).map(str::to_string),
            sort: some(&self.sort).map(str::to_string),
            status: self.status()?,
            filter: some(&self.filter).map(str::to_string),
            q: some(&self.q).map(str::to_string),
            online,
            artifact: some(&self.artifact).map(str::to_string),
            commit: some(&self.commit).map(str::to_string),
        })
    }
}

/// How many devices are in each status, for the tabs.
async fn status_counts(s: &AppState, p: &Principal) -> AppResult<BTreeMap<String, i64>> {
    let rows: Vec<(String, i64)> =
        sqlx::query_as("SELECT status, COUNT(*) FROM devices WHERE org_id = $1 GROUP BY status")
            .bind(p.org().to_string())
            .fetch_all(s.db.pool())
            .await?;
    let mut counts: BTreeMap<String, i64> = rows.into_iter().collect();
    let all = counts.values().sum();
    counts.insert("all".into(), all);
    Ok(counts)
}

/// What the device table needs: the devices, the next page, and how to refresh itself.
async fn table_ctx(s: &AppState, p: &Principal, q: &DevicesUi) -> AppResult<Value> {
    let page = devices::list_devices(&s.db, p, &q.api_query()?).await?;
    let qs = q.query_string();
    let sep = if qs.is_empty() { "" } else { "&" };
    let next_url = page.next_cursor.map(|c| format!("/devices?{qs}{sep}cursor={}", urlencode(&c)));
    let pending_view = q.status()? == Some(DeviceStatus::Pending);
    // The pending list is not refreshed under the operator's ticks; the others show presence live.
    let poll_url = (!pending_view).then(|| {
        let cursor = some(&q.cursor).map(|c| format!("{sep}cursor={}", urlencode(c))).unwrap_or_default();
        format!("/devices/table?{qs}{cursor}")
    });
    Ok(context! {
        devices => page.items,
        next_url => next_url,
        poll_url => poll_url,
        bulk => p.role >= Role::Operator,
        pending_view => pending_view,
    })
}

/// Which field of the device list's form is wrong, and why: checked before the list is read so
/// the page can show the error under the field, the rest of the form as typed.
async fn field_errors(s: &AppState, p: &Principal, q: &DevicesUi) -> BTreeMap<&'static str, String> {
    let mut errors = BTreeMap::new();
    if let Err(e) = q.status() {
        errors.insert("status", e.public_message());
    }
    if let Some(o) = some(&q.online).filter(|o| *o != "true" && *o != "false") {
        errors.insert("online", format!("online must be true or false, not {o:?}"));
    }
    if some(&q.q).is_some_and(|t| t.len() > 256) {
        errors.insert("q", "at most 256 bytes".into());
    }
    if let Some(text) = some(&q.filter)
        && let Err(e) = crate::filter::check(&s.db, p.org(), text).await
    {
        errors.insert("filter", e.public_message());
    }
    if let Some(sort) = some(&q.sort)
        && !SORTS.iter().any(|(v, _)| *v == sort)
    {
        errors.insert("sort", format!("unknown sort {sort:?}"));
    }
    if let Some(c) = some(&q.commit)
        && (c.len() < 7 || c.len() > 64 || !c.bytes().all(|b| b.is_ascii_hexdigit()))
    {
        errors.insert("commit", "give a commit hash or a prefix of at least 7 hex digits".into());
    }
    errors
}

async fn devices_page(State(s): State<AppState>, UiUser(p): UiUser, Query(q): Query<DevicesUi>) -> Response {
    let flash = Flash { notice: q.notice.clone(), error: q.error.clone() };
    let errors = field_errors(&s, &p, &q).await;
    let r: AppResult<(Html<String>, bool)> = async {
        let pending_view = some(&q.status) == Some("pending");
        let ctx = page_ctx(&s, &p, if pending_view { "pending" } else { "devices" }, &flash).await?;
        // A wrong field: the page with its form as typed, the error under the field, no list.
        let (table, general) = if errors.is_empty() {
            match table_ctx(&s, &p, &q).await {
                Ok(t) => (t, None),
                Err(e @ (AppError::BadRequest(_) | AppError::InvalidCursor(_))) => {
                    (context! { devices => Vec::<()>::new() }, Some(e.public_message()))
                }
                Err(e) => return Err(e),
            }
        } else {
            (context! { devices => Vec::<()>::new() }, None)
        };
        let here = format!("/devices?{}", q.query_string());
        let form = context! {
            status => some(&q.status), online => some(&q.online), filter => some(&q.filter),
            q => some(&q.q), sort => some(&q.sort).unwrap_or("-created_at"),
            artifact => some(&q.artifact), commit => some(&q.commit),
        };
        let gq = GroupListQuery { limit: Some(500), kind: Some(GroupKind::Static), ..Default::default() };
        let static_groups = crate::groups::list(&s.db, &p, &gq).await?.items;
        let invalid = !errors.is_empty() || general.is_some();
        let extra = context! {
            counts => status_counts(&s, &p).await?,
            statuses => STATUSES,
            sorts => SORTS,
            f => form,
            errors => errors,
            invalid => invalid,
            error => general.or(flash.error.clone()),
            pending_view => pending_view,
            here => here,
            matching => q.query_string(),
            static_groups => static_groups,
            ..table
        };
        Ok((s.ui.render("devices.html", context! { ..extra, ..ctx })?, invalid))
    }
    .await;
    match r {
        Ok((html, false)) => html.into_response(),
        Ok((html, true)) => (axum::http::StatusCode::BAD_REQUEST, html).into_response(),
        Err(e) => error_page(&s, e),
    }
}

/// The device table alone, for htmx to swap in.
async fn devices_table(State(s): State<AppState>, UiUser(p): UiUser, Query(q): Query<DevicesUi>) -> Response {
    let r = async { s.ui.render("devices_table.html", table_ctx(&s, &p, &q).await?) }.await;
    r.map(IntoResponse::into_response).unwrap_or_else(|e| error_page(&s, e))
}

/// The most devices one bulk action takes when "all matching the filter" is chosen.
const BULK_MAX: usize = 5000;

/// The devices a bulk action is for: the ticked ones, or every device matching the list's
/// filter (`all=1`, the filter in `matching` as the list's query string).
async fn bulk_ids(s: &AppState, p: &Principal, fields: &[(String, String)]) -> AppResult<Vec<String>> {
    let field = |name: &str| fields.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
    if field("all") != Some("1") {
        return Ok(fields.iter().filter(|(k, _)| k == "id").map(|(_, v)| v.clone()).collect());
    }
    let uri: axum::http::Uri = format!("/devices?{}", field("matching").unwrap_or_default())
        .parse()
        .map_err(|_| AppError::BadRequest("the list's filter is malformed".into()))?;
    let Query(q) = Query::<DevicesUi>::try_from_uri(&uri)
        .map_err(|e| AppError::BadRequest(format!("the list's filter is malformed: {e}")))?;
    let mut query = DevicesUi { cursor: None, ..q }.api_query()?;
    query.limit = Some(500);
    let mut ids = Vec::new();
    loop {
        let page = devices::list_devices(&s.db, p, &query).await?;
        ids.extend(page.items.into_iter().map(|d| d.id));
        if ids.len() > BULK_MAX {
            return Err(AppError::BadRequest(format!(
                "more than {BULK_MAX} devices match: narrow the filter, or use the API"
            )));
        }
        match page.next_cursor {
            Some(c) => query.cursor = Some(c),
            None => break,
        }
    }
    Ok(ids)
}

/// An action on many devices from the device list: accept or reject (pending devices), add
/// tags, add to a static group, deploy (the new-deployment form, with those devices) or
/// decommission (after a confirmation). Each device goes through the same operation as one
/// alone, so each change is authorized and audited the same way.
async fn devices_bulk(
    State(s): State<AppState>,
    UiUser(p): UiUser,
    Form(fields): Form<Vec<(String, String)>>,
) -> Response {
    let field = |name: &str| fields.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
    if let Err(e) = check_csrf(&p, field("csrf").unwrap_or_default()) {
        return error_page(&s, e);
    }
    let action = field("action").unwrap_or_default();
    let default_back = if matches!(action, "accept" | "reject") { "/devices?status=pending" } else { "/devices" };
    let here = field("return_to").filter(|r| !r.is_empty()).map(|r| safe_next(Some(r)));
    let here = here.as_deref().unwrap_or(default_back);
    let ids = match bulk_ids(&s, &p, &fields).await {
        Ok(ids) if ids.is_empty() => {
            let why = if field("all") == Some("1") { "no device matches the filter" } else { "tick the devices first" };
            return back_to(here, Err(AppError::BadRequest(why.into())));
        }
        Ok(ids) => ids,
        Err(e) => return back_to(here, Err(e)),
    };
    let plural = |n: usize| if n == 1 { "" } else { "s" };
    let (mut done, mut failed) = (0usize, Vec::new());
    let msg = match action {
        "accept" | "reject" => {
            let to = if action == "accept" { DeviceStatus::Accepted } else { DeviceStatus::Rejected };
            for id in &ids {
                match devices::decide(&s.db, &s.ca, &p, id, to).await {
                    Ok(_) => done += 1,
                    Err(e @ AppError::Forbidden(_)) => return back_to(here, Err(e)),
                    Err(e) => failed.push(format!("{id}: {}", e.public_message())),
                }
            }
            let verb = if to == DeviceStatus::Accepted { "Accepted" } else { "Rejected" };
            format!("{verb} {done} device{}.", plural(done))
        }
        "tags" => {
            let set = match key_value_lines("tags", field("tags").unwrap_or_default()) {
                Ok(set) if set.is_empty() => {
                    return back_to(here, Err(AppError::BadRequest("type the tags to add, key=value".into())));
                }
                Ok(set) => set,
                Err(e) => return back_to(here, Err(e)),
            };
            for id in &ids {
                let req = PatchTags { set: set.clone(), remove: Vec::new() };
                match devices::patch_tags(&s.db, &p, id, req).await {
                    Ok(_) => done += 1,
                    Err(e @ AppError::Forbidden(_)) => return back_to(here, Err(e)),
                    Err(e) => failed.push(format!("{id}: {}", e.public_message())),
                }
            }
            format!("Tags added to {done} device{}.", plural(done))
        }
        "group" => {
            let Some(group) = field("group").filter(|g| !g.is_empty()) else {
                return back_to(here, Err(AppError::BadRequest("choose the static group".into())));
            };
            match crate::groups::add_devices(&s.db, &p, group, AddGroupDevices { devices: ids.clone() }).await {
                Ok(a) => {
                    return back_to(
                        here,
                        Ok(format!(
                            "{} device{} added to the group, {} were members already.",
                            a.added,
                            plural(a.added as usize),
                            a.already
                        )),
                    );
                }
                Err(e) => return back_to(here, Err(e)),
            }
        }
        "deploy" => return super::updates::new_deployment_for(&s, &p, &ids).await,
        "decommission" if field("confirm") != Some("yes") => {
            return confirm_decommission(&s, &p, &ids, here).await;
        }
        "decommission" => {
            for id in &ids {
                match devices::decide(&s.db, &s.ca, &p, id, DeviceStatus::Decommissioned).await {
                    Ok(_) => done += 1,
                    Err(e @ AppError::Forbidden(_)) => return back_to(here, Err(e)),
                    Err(e) => failed.push(format!("{id}: {}", e.public_message())),
                }
            }
            format!("Decommissioned {done} device{}: their certificates are revoked.", plural(done))
        }
        _ => return back_to(here, Err(AppError::BadRequest("choose what to do with the devices".into()))),
    };
    if failed.is_empty() {
        back_to(here, Ok(msg))
    } else {
        back_to(here, Err(AppError::BadRequest(format!("{msg} Not done: {}", failed.join("; ")))))
    }
}

/// The confirmation before many devices are decommissioned: which ones, and a form that
/// posts them again with `confirm=yes`.
async fn confirm_decommission(s: &AppState, p: &Principal, ids: &[String], here: &str) -> Response {
    let r: AppResult<Html<String>> = async {
        p.require(Role::Operator, "decommissioning devices")?;
        let ctx = page_ctx(s, p, "devices", &Flash::default()).await?;
        let names = devices::display_names(&s.db, p.org(), ids).await?;
        let extra = context! { ids => ids, names => names, return_to => here };
        s.ui.render("devices_decommission.html", merge(ctx, extra))
    }
    .await;
    r.map(IntoResponse::into_response).unwrap_or_else(|e| back_to(here, Err(e)))
}

async fn device_page(
    State(s): State<AppState>,
    UiUser(p): UiUser,
    Path(id): Path<String>,
    Query(flash): Query<Flash>,
) -> Response {
    let r: AppResult<Html<String>> = async {
        let ctx = page_ctx(&s, &p, "devices", &flash).await?;
        let device = devices::get_device_detail(&s.db, &p, &id).await?;
        let tags_text: String = device.device.tags.iter().map(|(k, v)| format!("{k}={v}\n")).collect();
        let offers = super::remote_offers(&device.device);
        s.ui.render(
            "device.html",
            merge(ctx, context! { d => device, offers => offers, tags_text => tags_text, tags_editable => true }),
        )
    }
    .await;
    r.map(IntoResponse::into_response).unwrap_or_else(|e| error_page(&s, e))
}

async fn decommission_page(
    State(s): State<AppState>,
    UiUser(p): UiUser,
    Path(id): Path<String>,
    Query(flash): Query<Flash>,
) -> Response {
    let r: AppResult<Html<String>> = async {
        let ctx = page_ctx(&s, &p, "devices", &flash).await?;
        let device = devices::get_device(&s.db, &p, &id).await?;
        s.ui.render("device_decommission.html", merge(ctx, context! { d => device }))
    }
    .await;
    r.map(IntoResponse::into_response).unwrap_or_else(|e| error_page(&s, e))
}

#[derive(Deserialize)]
struct DecommissionForm {
    csrf: String,
    confirm: Option<String>,
}

async fn device_decommission(
    State(s): State<AppState>,
    UiUser(p): UiUser,
    Path(id): Path<String>,
    Form(f): Form<DecommissionForm>,
) -> Response {
    if let Err(e) = check_csrf(&p, &f.csrf) {
        return error_page(&s, e);
    }
    let page = format!("/devices/{}", urlencode(&id));
    if f.confirm.as_deref() != Some("yes") {
        return Redirect::to(&format!("{page}/decommission")).into_response();
    }
    let r = devices::decide(&s.db, &s.ca, &p, &id, DeviceStatus::Decommissioned).await;
    back(&page, r.map(|_| "Device decommissioned: its certificate is revoked.".to_string()))
}

#[derive(Deserialize)]
struct DeviceActionForm {
    csrf: String,
    /// Where to go afterwards (the list the button was on); the device page by default.
    return_to: Option<String>,
    /// The tag form: `key=value` lines.
    tags: Option<String>,
    /// The rename form: the operator's name, empty to clear it.
    name: Option<String>,
}

async fn device_action(
    State(s): State<AppState>,
    UiUser(p): UiUser,
    Path((id, action)): Path<(String, String)>,
    Form(f): Form<DeviceActionForm>,
) -> Response {
    if let Err(e) = check_csrf(&p, &f.csrf) {
        return error_page(&s, e);
    }
    let page = match f.return_to.as_deref().filter(|r| !r.is_empty()) {
        Some(r) => safe_next(Some(r)),
        None => format!("/devices/{}", urlencode(&id)),
    };
    let (to, done) = match action.as_str() {
        "tags" => {
            let r = async {
                let tags = key_value_lines("tags", f.tags.as_deref().unwrap_or_default())?;
                devices::replace_tags(&s.db, &p, &id, ReplaceTags { tags }).await
            }
            .await;
            return back_to(&page, r.map(|_| "Tags saved.".to_string()));
        }
        "name" => {
            let name = f.name.as_deref().map(str::trim).filter(|n| !n.is_empty()).map(str::to_string);
            let r = devices::patch_device(&s.db, &p, &id, drover_proto::api::DevicePatch { name }).await;
            return back_to(
                &page,
                r.map(|d| match d.name {
                    Some(_) => format!("Device renamed {}.", d.display_name),
                    None => format!("Name cleared: the device shows as {}.", d.display_name),
                }),
            );
        }
        "accept" => (DeviceStatus::Accepted, "accepted: its certificate is issued"),
        "reject" => (DeviceStatus::Rejected, "rejected"),
        _ => return error_page(&s, AppError::NotFound("no such action".into())),
    };
    let r = devices::decide(&s.db, &s.ca, &p, &id, to).await;
    back_to(&page, r.map(|d| format!("Device {} {done}.", d.display_name)))
}

/// Like `back`, onto a page whose address may carry a query already (an earlier message is
/// dropped).
fn back_to(page: &str, result: Result<String, AppError>) -> Response {
    let Some((path, query)) = page.split_once('?') else { return back(page, result) };
    let keep: Vec<&str> = query
        .split('&')
        .filter(|kv| !kv.is_empty() && !kv.starts_with("notice=") && !kv.starts_with("error="))
        .collect();
    let resp = back(path, result);
    let loc = resp.headers().get(header::LOCATION).and_then(|l| l.to_str().ok()).unwrap_or(path).to_string();
    let flash = loc.split_once('?').map(|(_, f)| f).unwrap_or_default();
    if keep.is_empty() {
        return resp;
    }
    Redirect::to(&format!("{path}?{}&{flash}", keep.join("&"))).into_response()
}

// ---------------------------------------------------------------- enrollment

async fn enrollment_page(State(s): State<AppState>, UiUser(p): UiUser, Query(flash): Query<Flash>) -> Response {
    render_enrollment(&s, &p, flash, None).await
}

async fn render_enrollment(
    s: &AppState,
    p: &Principal,
    flash: Flash,
    created: Option<CreatedEnrollmentToken>,
) -> Response {
    let r: AppResult<Html<String>> = async {
        let ctx = page_ctx(s, p, "enrollment", &flash).await?;
        let tq = drover_proto::api::EnrollmentTokenQuery { limit: Some(500), cursor: None };
        let tokens = devices::list_enrollment_tokens(&s.db, p, &tq).await?.items;
        let q = GroupListQuery { limit: Some(500), kind: Some(GroupKind::Static), ..Default::default() };
        let static_groups = crate::groups::list(&s.db, p, &q).await?.items;
        let pq = drover_proto::api::PreauthorizationQuery { limit: Some(100), ..Default::default() };
        let preauths = crate::preauth::list(&s.db, p, &pq).await?;
        let extra = context! {
            tokens => tokens, created => created, static_groups => static_groups,
            preauths => preauths.items, preauths_more => preauths.next_cursor.is_some(),
        };
        s.ui.render("enrollment.html", merge(ctx, extra))
    }
    .await;
    r.map(IntoResponse::into_response).unwrap_or_else(|e| error_page(s, e))
}

fn number(what: &str, v: Option<&str>) -> AppResult<Option<u32>> {
    v.map(str::trim)
        .filter(|v| !v.is_empty())
        .map(|n| n.parse().map_err(|_| AppError::BadRequest(format!("{what} must be a whole number"))))
        .transpose()
}

/// `key=value` lines, as typed into a text box.
fn key_value_lines(what: &str, text: &str) -> AppResult<BTreeMap<String, String>> {
    drover_proto::device::parse_key_value_lines(text).map_err(|e| AppError::BadRequest(format!("{what}: {e}")))
}

async fn enrollment_token_create(
    State(s): State<AppState>,
    UiUser(p): UiUser,
    Form(fields): Form<Vec<(String, String)>>,
) -> Response {
    let field = |name: &str| fields.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
    if let Err(e) = check_csrf(&p, field("csrf").unwrap_or_default()) {
        return error_page(&s, e);
    }
    // Groups come from a multiple choice (one field each) or typed, separated by commas.
    let groups: Vec<String> = fields
        .iter()
        .filter(|(k, _)| k == "group" || k == "groups")
        .flat_map(|(_, v)| v.split(','))
        .map(str::trim)
        .filter(|g| !g.is_empty())
        .map(str::to_string)
        .collect();
    let req = (|| {
        Ok::<_, AppError>(CreateEnrollmentToken {
            name: field("name").unwrap_or_default().trim().to_string(),
            max_uses: number("max uses", field("max_uses"))?,
            expires_in_days: number("expiry", field("expires_in_days"))?,
            tags: key_value_lines("tags", field("tags").unwrap_or_default())?,
            groups,
        })
    })();
    let created = match req {
        Ok(req) => devices::create_enrollment_token(&s.db, &p, req).await,
        Err(e) => Err(e),
    };
    match created {
        // The secret is in this response only, never in a URL or a cache.
        Ok(created) => {
            let mut resp = render_enrollment(&s, &p, Flash::default(), Some(created)).await;
            resp.headers_mut().insert(header::CACHE_CONTROL, "no-store".parse().expect("header"));
            resp
        }
        Err(e) => back("/enrollment", Err(e)),
    }
}

async fn enrollment_token_revoke(
    State(s): State<AppState>,
    UiUser(p): UiUser,
    Path(id): Path<String>,
    Form(f): Form<CsrfForm>,
) -> Response {
    if let Err(e) = check_csrf(&p, &f.csrf) {
        return error_page(&s, e);
    }
    let r = devices::revoke_enrollment_token(&s.db, &p, &id).await;
    back("/enrollment", r.map(|t| format!("Enrollment token {} revoked.", t.name)))
}

async fn preauthorization_revoke(
    State(s): State<AppState>,
    UiUser(p): UiUser,
    Path(id): Path<String>,
    Form(f): Form<CsrfForm>,
) -> Response {
    if let Err(e) = check_csrf(&p, &f.csrf) {
        return error_page(&s, e);
    }
    let r = crate::preauth::revoke(&s.db, &p, &id).await;
    back(
        "/enrollment",
        r.map(|x| format!("Pre-authorization of {} revoked.", crate::devices::identity_json(&x.identity))),
    )
}

/// One identity typed as `key=value` lines, or a CSV file (uploaded or pasted) of many.
async fn preauthorize(State(s): State<AppState>, UiUser(p): UiUser, headers: HeaderMap, body: Bytes) -> Response {
    let fields = match form_fields(&headers, &body) {
        Ok(f) => f,
        Err(e) => return back("/enrollment", Err(e)),
    };
    let field = |name: &str| fields.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str()).unwrap_or_default();
    if let Err(e) = check_csrf(&p, field("csrf")) {
        return error_page(&s, e);
    }
    let csv = [field("file"), field("csv")].into_iter().find(|t| !t.trim().is_empty()).map(str::to_string);
    let identity = field("identity").to_string();
    let result = async {
        match csv {
            Some(csv) => devices::preauthorize_csv(&s.db, &p, &csv)
                .await
                .map(|r| format!("{} device identities pre-authorized from the CSV file.", r.created)),
            None if identity.trim().is_empty() => {
                Err(AppError::BadRequest("type an identity, or choose a CSV file".into()))
            }
            None => {
                let req = Preauthorize {
                    identities: vec![key_value_lines("identity", &identity)?],
                    max_uses: number("maximum uses", Some(field("max_uses")))?,
                    expires_in_days: number("expiry", Some(field("expires_in_days")))?,
                };
                devices::preauthorize(&s.db, &p, req)
                    .await
                    .map(|r| format!("{} device identities pre-authorized, {} already were.", r.added, r.already))
            }
        }
    }
    .await;
    back("/enrollment", result)
}

/// The fields of a form, URL-encoded or multipart (a file upload), as text.
fn form_fields(headers: &HeaderMap, body: &[u8]) -> AppResult<Vec<(String, String)>> {
    let ct = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or_default();
    if let Some(boundary) = ct.strip_prefix("multipart/form-data").and_then(|r| r.split("boundary=").nth(1)) {
        return multipart_fields(body, boundary.trim_matches('"'));
    }
    let text = std::str::from_utf8(body).map_err(|_| AppError::BadRequest("malformed form: not UTF-8".into()))?;
    text.split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            Ok((url_decode(k)?, url_decode(v)?))
        })
        .collect()
}

/// Decodes one `application/x-www-form-urlencoded` component.
fn url_decode(s: &str) -> AppResult<String> {
    let bad = || AppError::BadRequest("malformed form: bad percent-encoding".into());
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = b.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok()).ok_or_else(bad)?;
                out.push(u8::from_str_radix(hex, 16).map_err(|_| bad())?);
                i += 2;
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8(out).map_err(|_| bad())
}

/// A minimal multipart/form-data reader: field name and text content of each part.
fn multipart_fields(body: &[u8], boundary: &str) -> AppResult<Vec<(String, String)>> {
    let bad = |why: &str| AppError::BadRequest(format!("malformed upload: {why}"));
    let text = std::str::from_utf8(body).map_err(|_| bad("the file must be UTF-8 text"))?;
    let delim = format!("--{boundary}");
    let mut out = Vec::new();
    for part in text.split(&delim).skip(1) {
        if part.starts_with("--") {
            break;
        }
        let part = part.strip_prefix("\r\n").unwrap_or(part);
        let (head, content) = part.split_once("\r\n\r\n").ok_or_else(|| bad("a part has no headers"))?;
        let content = content.strip_suffix("\r\n").unwrap_or(content);
        let name = head
            .lines()
            .find(|l| l.to_ascii_lowercase().starts_with("content-disposition:"))
            .and_then(|l| l.split(';').map(str::trim).find_map(|a| a.strip_prefix("name=")))
            .map(|n| n.trim_matches('"').to_string())
            .ok_or_else(|| bad("a part has no name"))?;
        out.push((name, content.to_string()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multipart_fields_are_read() {
        let body = "--XyZ\r\nContent-Disposition: form-data; name=\"csrf\"\r\n\r\nabc\r\n--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"d.csv\"\r\nContent-Type: text/csv\r\n\r\nserial\r\nSN-1\r\n\r\n--XyZ--\r\n";
        let f = multipart_fields(body.as_bytes(), "XyZ").unwrap();
        assert_eq!(f[0], ("csrf".to_string(), "abc".to_string()));
        assert_eq!(f[1], ("file".to_string(), "serial\r\nSN-1\r\n".to_string()));
        assert_eq!(url_decode("a+b%3D%C3%A9").unwrap(), "a+b=é".replace('+', " "));
        assert!(url_decode("%zz").is_err());
    }
}
