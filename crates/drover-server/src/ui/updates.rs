//! The software update pages: artifacts (list, upload, inspect, delete) and deployments (list,
//! a new one to a group, a filter or device ids, a deployment's live progress with its devices
//! and their logs, abort).
//!
//! Every change goes through the same operation as the REST API (`crate::artifacts`,
//! `crate::deployments`), which checks the role and writes the audit log. The one exception in
//! shape is the upload: the page's script sends the chosen file as the raw body of
//! `POST /api/v1/artifacts` with the session's CSRF token, so the browser streams it from disk
//! and the server streams it into the store — neither holds the whole file.

use axum::Router;
use axum::extract::{Form, Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use drover_proto::api::{DeviceListQuery, GroupListQuery};
use drover_proto::deploy::{
    Artifact, ArtifactListQuery, CreateDeployment, Deployment, DeploymentDevice, DeploymentDeviceQuery,
    DeploymentListQuery, DeploymentStatus, UpdateState,
};
use minijinja::context;
use serde::{Deserialize, Serialize};

use super::{CsrfForm, Flash, UiUser, back, check_csrf, device_names, error_page, merge, page_ctx, urlencode};
use crate::app::AppState;
use crate::auth::Principal;
use crate::error::{AppError, AppResult};
use crate::{artifacts, deployments, devices, groups};

const UPLOAD_JS: &str = include_str!("../../assets/updates.js");

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/artifacts", get(artifacts_page))
        .route("/artifacts/{id}", get(artifact_page))
        .route("/artifacts/{id}/delete", post(artifact_delete))
        .route("/deployments", get(deployments_page).post(deployment_create))
        .route("/deployments/new", get(new_deployment_page))
        .route("/deployments/{id}", get(deployment_page))
        .route("/deployments/{id}/live", get(deployment_live))
        .route("/deployments/{id}/abort", post(deployment_abort))
        .route("/deployments/{id}/devices/{device_id}/log", get(device_log_page))
        .route("/assets/updates.js", get(|| async { ([(header::CONTENT_TYPE, "application/javascript")], UPLOAD_JS) }))
}

/// Bytes for people: `512 B`, `1.5 KiB`, `20.0 MiB`.
fn size(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

fn some(v: &Option<String>) -> Option<&str> {
    v.as_deref().map(str::trim).filter(|v| !v.is_empty())
}

// ---------------------------------------------------------------- artifacts

#[derive(Serialize)]
struct PayloadView {
    name: String,
    role: String,
    size: String,
    sha256: String,
}

/// An artifact with what the pages show in a form for people.
#[derive(Serialize)]
struct ArtifactView {
    #[serde(flatten)]
    a: Artifact,
    size_h: String,
    payload_rows: Vec<PayloadView>,
    /// The source repository, when it is a web address worth linking.
    source_url: Option<String>,
}

fn artifact_view(a: Artifact) -> ArtifactView {
    let payload_rows = a
        .payloads
        .iter()
        .map(|p| PayloadView {
            name: p.name.clone(),
            role: p.role.clone(),
            size: size(p.size),
            sha256: p.sha256.clone(),
        })
        .collect();
    let source_url = a
        .provenance
        .as_ref()
        .and_then(|p| p.source.clone())
        .filter(|s| s.starts_with("https://") || s.starts_with("http://"));
    ArtifactView { size_h: size(a.size), payload_rows, source_url, a }
}

#[derive(Deserialize, Default)]
struct ArtifactsUi {
    name: Option<String>,
    cursor: Option<String>,
    notice: Option<String>,
    error: Option<String>,
}

async fn artifacts_page(State(s): State<AppState>, UiUser(p): UiUser, Query(q): Query<ArtifactsUi>) -> Response {
    let flash = Flash { notice: q.notice, error: q.error };
    let r: AppResult<Html<String>> = async {
        let ctx = page_ctx(&s, &p, "artifacts", &flash).await?;
        let name = some(&q.name).map(str::to_string);
        let query = ArtifactListQuery { limit: Some(100), cursor: q.cursor, name: name.clone() };
        let page = artifacts::list(&s.db, &p, &query).await?;
        let next_url = page.next_cursor.map(|c| {
            let by_name = name.as_deref().map(|n| format!("&name={}", urlencode(n))).unwrap_or_default();
            format!("/artifacts?cursor={}{by_name}", urlencode(&c))
        });
        let items: Vec<ArtifactView> = page.items.into_iter().map(artifact_view).collect();
        let extra = context! {
            artifacts => items, next_url => next_url, name => name,
            max_size => size(s.config.max_artifact_size),
        };
        s.ui.render("artifacts.html", merge(ctx, extra))
    }
    .await;
    r.map(IntoResponse::into_response).unwrap_or_else(|e| error_page(&s, e))
}

async fn artifact_page(
    State(s): State<AppState>,
    UiUser(p): UiUser,
    Path(id): Path<String>,
    Query(flash): Query<Flash>,
) -> Response {
    let r: AppResult<Html<String>> = async {
        let ctx = page_ctx(&s, &p, "artifacts", &flash).await?;
        let a = artifacts::get(&s.db, &p, &id).await?;
        // Traceability: the devices that run it now.
        let query = DeviceListQuery { limit: Some(50), artifact: Some(a.id.clone()), ..Default::default() };
        let running = devices::list_devices(&s.db, &p, &query).await?;
        let extra =
            context! { a => artifact_view(a), devices => running.items, more_devices => running.next_cursor.is_some() };
        s.ui.render("artifact.html", merge(ctx, extra))
    }
    .await;
    r.map(IntoResponse::into_response).unwrap_or_else(|e| error_page(&s, e))
}

async fn artifact_delete(
    State(s): State<AppState>,
    UiUser(p): UiUser,
    Path(id): Path<String>,
    Form(f): Form<CsrfForm>,
) -> Response {
    if let Err(e) = check_csrf(&p, &f.csrf) {
        return error_page(&s, e);
    }
    let name = artifacts::get(&s.db, &p, &id).await.map(|a| format!("{} {}", a.name, a.version));
    match artifacts::delete(&s.db, &s.store, &p, &id).await {
        Ok(()) => back("/artifacts", Ok(format!("Artifact {} deleted.", name.unwrap_or(id)))),
        // In use by an unfinished deployment: the server's reason, on the artifact's page.
        Err(e) => back(&format!("/artifacts/{}", urlencode(&id)), Err(e)),
    }
}

// ---------------------------------------------------------------- deployments

#[derive(Serialize)]
struct StateCount {
    state: &'static str,
    n: u64,
    /// `ok`, `failed`, `aborted` or `busy`: the colour it gets.
    class: &'static str,
}

fn state_class(s: UpdateState) -> &'static str {
    if s.is_failed() {
        "failed"
    } else if s == UpdateState::Aborted {
        "aborted"
    } else if s.is_final() {
        "ok"
    } else if s == UpdateState::Pending {
        "pending"
    } else {
        "busy"
    }
}

/// Percent of `n` in `total`, as a CSS width with one decimal.
fn pct(n: u64, total: u64) -> String {
    if total == 0 { "0".into() } else { format!("{:.1}", n as f64 * 100.0 / total as f64) }
}

/// A deployment with its progress worked out for the bar and the counts.
#[derive(Serialize)]
pub(super) struct DeploymentView {
    #[serde(flatten)]
    d: Deployment,
    /// Devices in a final state, and of those: done well, failed, aborted.
    done: u64,
    ok: u64,
    failed: u64,
    aborted: u64,
    pct_ok: String,
    pct_failed: String,
    pct_aborted: String,
    percent_done: u64,
    states: Vec<StateCount>,
    /// Nothing will change any more: the page stops refreshing.
    ended: bool,
}

pub(super) fn deployment_view(d: Deployment) -> DeploymentView {
    let (mut done, mut failed, mut aborted) = (0, 0, 0);
    let mut states = Vec::new();
    for s in UpdateState::ALL {
        let n = d.counts.get(&s).copied().unwrap_or(0);
        if n == 0 {
            continue;
        }
        if s.is_final() {
            done += n;
        }
        if s.is_failed() {
            failed += n;
        }
        if s == UpdateState::Aborted {
            aborted += n;
        }
        states.push(StateCount { state: s.as_str(), n, class: state_class(s) });
    }
    let ok = done - failed - aborted;
    let total = d.total.max(done);
    let ended = match d.status {
        DeploymentStatus::Active => false,
        // Aborted at once, but devices past the point of no return still finish.
        DeploymentStatus::Aborted => d.finished_at.is_some(),
        DeploymentStatus::Succeeded | DeploymentStatus::Failed => true,
    };
    DeploymentView {
        pct_ok: pct(ok, total),
        pct_failed: pct(failed, total),
        pct_aborted: pct(aborted, total),
        percent_done: (done * 100).checked_div(total).unwrap_or(0),
        done,
        ok,
        failed,
        aborted,
        states,
        ended,
        d,
    }
}

#[derive(Serialize)]
struct DeviceRowView {
    #[serde(flatten)]
    dd: DeploymentDevice,
    class: &'static str,
    /// `1.5 MiB of 20.0 MiB`, when the device reported download progress.
    transfer: Option<String>,
    percent: Option<u64>,
}

fn device_row(dd: DeploymentDevice) -> DeviceRowView {
    let (transfer, percent) = match (dd.bytes, dd.total) {
        // Once final there is no download in progress: what came down, if anything did, and no bar.
        (Some(b), _) if dd.state.is_final() => ((b > 0).then(|| format!("{} downloaded", size(b))), None),
        _ if dd.state.is_final() => (None, None),
        (Some(b), Some(t)) if t > 0 => (Some(format!("{} of {}", size(b), size(t))), Some(b.min(t) * 100 / t)),
        (Some(b), _) => (Some(size(b)), None),
        _ => (None, None),
    };
    DeviceRowView { class: state_class(dd.state), transfer, percent, dd }
}

const STATUSES: [DeploymentStatus; 4] =
    [DeploymentStatus::Active, DeploymentStatus::Succeeded, DeploymentStatus::Failed, DeploymentStatus::Aborted];

#[derive(Deserialize, Default)]
struct DeploymentsUi {
    status: Option<String>,
    cursor: Option<String>,
    notice: Option<String>,
    error: Option<String>,
}

async fn deployments_page(State(s): State<AppState>, UiUser(p): UiUser, Query(q): Query<DeploymentsUi>) -> Response {
    let flash = Flash { notice: q.notice, error: q.error };
    let r: AppResult<Html<String>> = async {
        let ctx = page_ctx(&s, &p, "deployments", &flash).await?;
        let status = some(&q.status)
            .map(|st| DeploymentStatus::parse(st).ok_or_else(|| AppError::BadRequest(format!("unknown status {st:?}"))))
            .transpose()?;
        let query = DeploymentListQuery { limit: Some(50), cursor: q.cursor.clone(), status };
        let page = deployments::list(&s.db, &p, &query).await?;
        let by_status = status.map(|st| format!("status={}", st.as_str())).unwrap_or_default();
        let next_url = page.next_cursor.map(|c| format!("/deployments?cursor={}&{by_status}", urlencode(&c)));
        let items: Vec<DeploymentView> = page.items.into_iter().map(deployment_view).collect();
        // The first page refreshes itself while something on it moves.
        let poll = q.cursor.is_none() && items.iter().any(|d| !d.ended);
        let poll_url = poll.then(|| format!("/deployments?{by_status}"));
        let extra = context! {
            deployments => items, next_url => next_url, poll_url => poll_url,
            status => status.map(|st| st.as_str()),
            statuses => STATUSES.iter().map(|st| st.as_str()).collect::<Vec<_>>(),
        };
        s.ui.render("deployments.html", merge(ctx, extra))
    }
    .await;
    r.map(IntoResponse::into_response).unwrap_or_else(|e| error_page(&s, e))
}

/// What the new-deployment form was given, to show it again after a mistake.
#[derive(Deserialize, Serialize, Default, Debug, Clone)]
struct NewDeploymentForm {
    #[serde(default, skip_serializing)]
    csrf: String,
    #[serde(default)]
    artifact: String,
    #[serde(default)]
    name: String,
    /// `group`, `filter` or `devices`.
    #[serde(default)]
    target: String,
    #[serde(default)]
    group: String,
    #[serde(default)]
    filter: String,
    #[serde(default)]
    devices: String,
}

impl NewDeploymentForm {
    fn request(&self) -> AppResult<CreateDeployment> {
        let name = Some(self.name.trim().to_string()).filter(|n| !n.is_empty());
        let mut req = CreateDeployment { artifact: self.artifact.trim().to_string(), name, ..Default::default() };
        if req.artifact.is_empty() {
            return Err(AppError::BadRequest("choose the artifact to deploy".into()));
        }
        match self.target.as_str() {
            "group" if !self.group.trim().is_empty() => req.group = Some(self.group.trim().to_string()),
            "group" => return Err(AppError::BadRequest("choose the group to deploy to".into())),
            "filter" if !self.filter.trim().is_empty() => req.filter = Some(self.filter.trim().to_string()),
            "filter" => return Err(AppError::BadRequest("write the filter the devices must match".into())),
            "devices" => {
                let ids: Vec<String> = self
                    .devices
                    .split(|c: char| c.is_whitespace() || c == ',')
                    .filter(|d| !d.is_empty())
                    .map(str::to_string)
                    .collect();
                if ids.is_empty() {
                    return Err(AppError::BadRequest("give the ids of the devices to deploy to".into()));
                }
                req.devices = Some(ids);
            }
            _ => return Err(AppError::BadRequest("choose the devices: a group, a filter or device ids".into())),
        }
        Ok(req)
    }
}

#[derive(Deserialize, Default)]
struct NewDeploymentUi {
    artifact: Option<String>,
    group: Option<String>,
}

async fn new_deployment_page(
    State(s): State<AppState>,
    UiUser(p): UiUser,
    Query(q): Query<NewDeploymentUi>,
) -> Response {
    let form = NewDeploymentForm {
        artifact: q.artifact.unwrap_or_default(),
        target: "group".into(),
        group: q.group.unwrap_or_default(),
        ..Default::default()
    };
    render_new(&s, &p, &form, None).await
}

/// The new-deployment form for devices chosen in the device list.
pub(super) async fn new_deployment_for(s: &AppState, p: &Principal, ids: &[String]) -> Response {
    let form = NewDeploymentForm { target: "devices".into(), devices: ids.join("\n"), ..Default::default() };
    render_new(s, p, &form, None).await
}

async fn render_new(s: &AppState, p: &Principal, form: &NewDeploymentForm, error: Option<AppError>) -> Response {
    let status = error.as_ref().map(AppError::status).unwrap_or(StatusCode::OK);
    // A mistake in what was typed shows under its field; anything else above the form.
    let mut errors = std::collections::BTreeMap::new();
    let mut general = None;
    if let Some(e) = error {
        let msg = e.public_message();
        let field = match &e {
            AppError::BadRequest(_) | AppError::NotFound(_) | AppError::Conflict(_) => {
                if form.artifact.trim().is_empty() || msg.contains("artifact") {
                    Some("artifact")
                } else {
                    match form.target.as_str() {
                        "group" => Some("group"),
                        "filter" => Some("filter"),
                        "devices" => Some("devices"),
                        _ => Some("target"),
                    }
                }
            }
            _ => None,
        };
        match field {
            Some(f) => {
                errors.insert(f, msg);
            }
            None => general = Some(msg),
        }
    }
    let flash = Flash { notice: None, error: general };
    let r: AppResult<Html<String>> = async {
        let ctx = page_ctx(s, p, "deployments", &flash).await?;
        let artifacts =
            artifacts::list(&s.db, p, &ArtifactListQuery { limit: Some(200), ..Default::default() }).await?;
        let groups = groups::list(&s.db, p, &GroupListQuery { limit: Some(500), ..Default::default() }).await?;
        let extra = context! { artifacts => artifacts.items, groups => groups.items, f => form, errors => errors };
        s.ui.render("deployment_new.html", merge(ctx, extra))
    }
    .await;
    match r {
        Ok(html) => (status, html).into_response(),
        Err(e) => error_page(s, e),
    }
}

async fn deployment_create(State(s): State<AppState>, UiUser(p): UiUser, Form(f): Form<NewDeploymentForm>) -> Response {
    if let Err(e) = check_csrf(&p, &f.csrf) {
        return error_page(&s, e);
    }
    // Devices may be given by name: the form keeps what was typed, the request takes ids.
    let ids = match f.target.as_str() {
        "devices" => super::resolve_devices(&s, &p, &f.devices).await.map(|ids| Some(ids.join("\n"))),
        _ => Ok(None),
    };
    let created = match ids {
        Ok(ids) => {
            let typed = NewDeploymentForm {
                devices: ids.unwrap_or_else(|| f.devices.clone()),
                csrf: String::new(),
                ..f.clone()
            };
            match typed.request() {
                Ok(req) => deployments::create(&s.db, &s.engine, &p, req).await,
                Err(e) => Err(e),
            }
        }
        Err(e) => Err(e),
    };
    match created {
        Ok(d) => back(
            &format!("/deployments/{}", urlencode(&d.id)),
            Ok(format!("Deployment {} created for {} device{}.", d.name, d.total, if d.total == 1 { "" } else { "s" })),
        ),
        Err(e) => render_new(&s, &p, &f, Some(e)).await,
    }
}

#[derive(Deserialize, Default)]
struct DeploymentUi {
    state: Option<String>,
    cursor: Option<String>,
    notice: Option<String>,
    error: Option<String>,
}

impl DeploymentUi {
    fn device_query(&self) -> AppResult<DeploymentDeviceQuery> {
        let state = some(&self.state)
            .map(|st| UpdateState::parse(st).ok_or_else(|| AppError::BadRequest(format!("unknown state {st:?}"))))
            .transpose()?;
        Ok(DeploymentDeviceQuery { limit: Some(100), cursor: some(&self.cursor).map(str::to_string), state })
    }

    /// The device table's state filter and page, to refresh the same view.
    fn query_string(&self) -> String {
        let mut parts = Vec::new();
        for (k, v) in [("state", &self.state), ("cursor", &self.cursor)] {
            if let Some(v) = some(v) {
                parts.push(format!("{k}={}", urlencode(v)));
            }
        }
        parts.join("&")
    }
}

/// What the live part of a deployment's page shows: progress, counts, abort, the devices.
async fn live_ctx(s: &AppState, p: &Principal, id: &str, q: &DeploymentUi) -> AppResult<minijinja::Value> {
    let d = deployments::get(&s.db, p, id).await?;
    let devices = deployments::devices(&s.db, p, id, &q.device_query()?).await?;
    let state = some(&q.state).map(str::to_string);
    let next_url = devices.next_cursor.map(|c| {
        let by_state = state.as_deref().map(|st| format!("&state={}", urlencode(st))).unwrap_or_default();
        format!("/deployments/{}?cursor={}{by_state}", urlencode(id), urlencode(&c))
    });
    let view = deployment_view(d);
    let poll_url = (!view.ended).then(|| format!("/deployments/{}/live?{}", urlencode(id), q.query_string()));
    Ok(context! {
        dep => view,
        devices => devices.items.into_iter().map(device_row).collect::<Vec<_>>(),
        next_url => next_url,
        poll_url => poll_url,
        state => state,
        states => UpdateState::ALL.iter().map(|st| st.as_str()).collect::<Vec<_>>(),
        can_operate => p.role >= drover_proto::api::Role::Operator,
        csrf => p.session_csrf,
    })
}

async fn deployment_page(
    State(s): State<AppState>,
    UiUser(p): UiUser,
    Path(id): Path<String>,
    Query(q): Query<DeploymentUi>,
) -> Response {
    let flash = Flash { notice: q.notice.clone(), error: q.error.clone() };
    let r: AppResult<Html<String>> = async {
        let ctx = page_ctx(&s, &p, "deployments", &flash).await?;
        let live = live_ctx(&s, &p, &id, &q).await?;
        s.ui.render("deployment.html", merge(ctx, live))
    }
    .await;
    r.map(IntoResponse::into_response).unwrap_or_else(|e| error_page(&s, e))
}

/// The live part alone, for htmx to swap in every two seconds while the deployment moves.
async fn deployment_live(
    State(s): State<AppState>,
    UiUser(p): UiUser,
    Path(id): Path<String>,
    Query(q): Query<DeploymentUi>,
) -> Response {
    let r = async { s.ui.render("deployment_live.html", live_ctx(&s, &p, &id, &q).await?) }.await;
    r.map(IntoResponse::into_response).unwrap_or_else(|e| error_page(&s, e))
}

async fn deployment_abort(
    State(s): State<AppState>,
    UiUser(p): UiUser,
    Path(id): Path<String>,
    Form(f): Form<CsrfForm>,
) -> Response {
    if let Err(e) = check_csrf(&p, &f.csrf) {
        return error_page(&s, e);
    }
    let r = deployments::abort(&s.db, &s.engine, &p, &id).await.map(|d| {
        let (done, total) = (d.counts.iter().filter(|(st, _)| st.is_final()).map(|(_, n)| n).sum::<u64>(), d.total);
        if done == total {
            format!("Deployment {} aborted.", d.name)
        } else {
            format!(
                "Deployment {} aborted. {} device{} past the point of no return will finish and report.",
                d.name,
                total - done,
                if total - done == 1 { "" } else { "s" }
            )
        }
    });
    back(&format!("/deployments/{}", urlencode(&id)), r)
}

async fn device_log_page(
    State(s): State<AppState>,
    UiUser(p): UiUser,
    Path((id, device_id)): Path<(String, String)>,
    Query(flash): Query<Flash>,
) -> Response {
    let r: AppResult<Html<String>> = async {
        let ctx = page_ctx(&s, &p, "deployments", &flash).await?;
        let d = deployments::get(&s.db, &p, &id).await?;
        let log = deployments::device_log(&s.db, &p, &id, &device_id).await?;
        let names = device_names(&s, &p, [log.device_id.as_str()]).await?;
        s.ui.render("deployment_log.html", merge(ctx, context! { dep => d, log => log, names => names }))
    }
    .await;
    r.map(IntoResponse::into_response).unwrap_or_else(|e| error_page(&s, e))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use drover_proto::deploy::ArtifactRef;

    use super::*;

    fn deployment(status: DeploymentStatus, total: u64, counts: &[(UpdateState, u64)]) -> Deployment {
        Deployment {
            id: "d1".into(),
            name: "edge-app 1.4.2".into(),
            artifact: ArtifactRef { id: "ab".repeat(32), name: "edge-app".into(), version: "1.4.2".into() },
            target: "group:lab".into(),
            status,
            created_at: "2026-11-23T07:06:27.299Z".into(),
            created_by: "user:ann".into(),
            finished_at: None,
            total,
            counts: counts.iter().copied().collect::<BTreeMap<_, _>>(),
        }
    }

    #[test]
    fn a_finished_device_shows_no_download_in_progress() {
        let dd = |state, bytes, total| DeploymentDevice {
            device_id: "d".into(),
            display_name: "gw-1".into(),
            state,
            bytes,
            total,
            message: None,
            has_log: false,
            updated_at: "2026-01-01T00:00:00Z".into(),
        };
        let r = device_row(dd(UpdateState::Downloading, Some(100), Some(509)));
        assert_eq!((r.transfer.as_deref(), r.percent), (Some("100 B of 509 B"), Some(19)));
        // Done with nothing counted (the report that ended it carried no progress): nothing shown.
        let r = device_row(dd(UpdateState::Success, Some(0), Some(509)));
        assert_eq!((r.transfer, r.percent), (None, None));
        let r = device_row(dd(UpdateState::Failure, Some(509), Some(509)));
        assert_eq!((r.transfer.as_deref(), r.percent), (Some("509 B downloaded"), None));
    }

    #[test]
    fn progress_splits_done_into_success_failure_and_aborted() {
        use UpdateState::*;
        let v = deployment_view(deployment(
            DeploymentStatus::Active,
            8,
            &[(Success, 2), (AlreadyInstalled, 1), (RolledBack, 1), (Downloading, 2), (Pending, 2)],
        ));
        assert_eq!((v.done, v.ok, v.failed, v.aborted, v.percent_done), (4, 3, 1, 0, 50));
        assert_eq!((v.pct_ok.as_str(), v.pct_failed.as_str()), ("37.5", "12.5"));
        let order: Vec<&str> = v.states.iter().map(|s| s.state).collect();
        assert_eq!(order, ["pending", "downloading", "success", "rolled-back", "already-installed"]);
        assert!(!v.ended);
        // Aborted, but a device still installing: the page keeps refreshing until it reports.
        let v = deployment_view(deployment(DeploymentStatus::Aborted, 2, &[(Aborted, 1), (Installing, 1)]));
        assert!(!v.ended);
        let empty = deployment_view(deployment(DeploymentStatus::Succeeded, 0, &[]));
        assert_eq!((empty.pct_ok.as_str(), empty.percent_done, empty.ended), ("0", 0, true));
    }

    #[test]
    fn the_form_asks_for_exactly_one_target() {
        let mut f =
            NewDeploymentForm { artifact: "edge-app@1.0".into(), target: "devices".into(), ..Default::default() };
        f.devices = "a1, b2\nc3".into();
        assert_eq!(f.request().unwrap().devices.unwrap(), ["a1", "b2", "c3"]);
        f.target = "group".into();
        assert!(f.request().unwrap_err().to_string().contains("choose the group"));
        f.group = "lab".into();
        let req = f.request().unwrap();
        assert_eq!((req.group.as_deref(), req.devices, req.filter), (Some("lab"), None, None));
        f.target = "everything".into();
        assert!(f.request().is_err());
        f.artifact = " ".into();
        assert!(f.request().unwrap_err().to_string().contains("artifact"));
        assert_eq!(size(1536), "1.5 KiB");
    }
}
