//! The web UI: server-rendered pages that work without JavaScript, with htmx (embedded,
//! pinned, licence included) as an optional enhancement. Every change goes through the same
//! operations as the REST API, so it is authorized and audited the same way; every form
//! carries the session's CSRF token.

use axum::Router;
use axum::extract::{Form, FromRequestParts, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use drover_proto::api::{
    AuditListQuery, ChangePassword, CreateToken, CreateUser, Role, SetPassword, TokenListQuery, UpdateUser,
    UserListQuery,
};
use minijinja::{Environment, Value, context};
use serde::Deserialize;

use crate::app::{AppState, client_ip, cookie, session_cookie, source_of};
use crate::auth::{LOGIN_CSRF_COOKIE, Principal, SESSION_COOKIE, random_secret};
use crate::error::AppError;
use crate::ops;

mod alerts;
mod fleet;
mod format;
mod groups;
mod metrics;
mod remote;
mod updates;

const HTMX: &str = include_str!("../assets/vendor/htmx-2.0.4.min.js");
const HTMX_LICENSE: &str = include_str!("../assets/vendor/htmx-2.0.4.LICENSE");
const CSS: &str = include_str!("../assets/drover.css");
const FAVICON: &str = include_str!("../assets/favicon.svg");
const NAV_JS: &str = include_str!("../assets/nav.js");

pub struct Templates {
    env: Environment<'static>,
}

impl Default for Templates {
    fn default() -> Self {
        Templates::new()
    }
}

impl Templates {
    pub fn new() -> Templates {
        let mut env = Environment::new();
        format::register(&mut env);
        for (name, src) in [
            ("base.html", include_str!("../templates/base.html")),
            ("login.html", include_str!("../templates/login.html")),
            ("overview.html", include_str!("../templates/overview.html")),
            ("audit_table.html", include_str!("../templates/audit_table.html")),
            ("audit.html", include_str!("../templates/audit.html")),
            ("users.html", include_str!("../templates/users.html")),
            ("tokens.html", include_str!("../templates/tokens.html")),
            ("account.html", include_str!("../templates/account.html")),
            ("error.html", include_str!("../templates/error.html")),
            ("devices.html", include_str!("../templates/devices.html")),
            ("devices_table.html", include_str!("../templates/devices_table.html")),
            ("device.html", include_str!("../templates/device.html")),
            ("device_decommission.html", include_str!("../templates/device_decommission.html")),
            ("devices_decommission.html", include_str!("../templates/devices_decommission.html")),
            ("enrollment.html", include_str!("../templates/enrollment.html")),
            ("groups.html", include_str!("../templates/groups.html")),
            ("group.html", include_str!("../templates/group.html")),
            ("group_preview.html", include_str!("../templates/group_preview.html")),
            ("updates_macros.html", include_str!("../templates/updates_macros.html")),
            ("artifacts.html", include_str!("../templates/artifacts.html")),
            ("artifact.html", include_str!("../templates/artifact.html")),
            ("deployments.html", include_str!("../templates/deployments.html")),
            ("deployment_new.html", include_str!("../templates/deployment_new.html")),
            ("deployment.html", include_str!("../templates/deployment.html")),
            ("deployment_live.html", include_str!("../templates/deployment_live.html")),
            ("deployment_log.html", include_str!("../templates/deployment_log.html")),
            ("alerts.html", include_str!("../templates/alerts.html")),
            ("alerts_rules.html", include_str!("../templates/alerts_rules.html")),
            ("device_rules.html", include_str!("../templates/device_rules.html")),
        ] {
            env.add_template(name, src).expect("templates compile");
        }
        for (name, src) in remote::TEMPLATES.iter().chain(metrics::TEMPLATES) {
            env.add_template(name, src).expect("templates compile");
        }
        Templates { env }
    }

    fn render(&self, name: &str, ctx: Value) -> Result<Html<String>, AppError> {
        let t = self.env.get_template(name).map_err(AppError::internal)?;
        t.render(ctx).map(Html).map_err(|e| AppError::Internal(format!("template {name}: {e:#}")))
    }
}

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/", get(overview))
        .route("/login", get(login_page).post(login_submit))
        .route("/logout", post(logout))
        .route("/account", get(account))
        .route("/account/password", post(account_password))
        .route("/users", get(users).post(users_create))
        .route("/users/{id}/{action}", post(users_action))
        .route("/tokens", get(tokens).post(tokens_create))
        .route("/tokens/{id}/revoke", post(tokens_revoke))
        .route("/audit", get(audit))
        .merge(fleet::routes())
        .merge(groups::routes())
        .merge(alerts::routes())
        .merge(updates::routes())
        .merge(remote::routes())
        .merge(metrics::routes())
        .route("/assets/drover.css", get(|| async { ([(header::CONTENT_TYPE, "text/css")], CSS) }))
        .route("/assets/favicon.svg", get(|| async { ([(header::CONTENT_TYPE, "image/svg+xml"), (header::CACHE_CONTROL, "public, max-age=86400")], FAVICON) }))
        .route("/favicon.ico", get(|| async { Redirect::permanent("/assets/favicon.svg") }))
        .route("/assets/nav.js", get(|| async { ([(header::CONTENT_TYPE, "application/javascript"), (header::CACHE_CONTROL, "no-cache")], NAV_JS) }))
        .route(
            "/assets/vendor/htmx-2.0.4.min.js",
            get(|| async { ([(header::CONTENT_TYPE, "application/javascript"), (header::CACHE_CONTROL, "public, max-age=31536000, immutable")], HTMX) }),
        )
        .route("/assets/licenses", get(|| async { ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], format!("Third-party software embedded in Drover's web UI\n\nhtmx 2.0.4 (https://htmx.org)\n\n{HTMX_LICENSE}\n\n{}\n\n{}", remote::licenses(), metrics::licenses())) }))
}

/// A signed-in person. Without a valid session the browser is sent to the sign-in page.
pub struct UiUser(pub Principal);

impl FromRequestParts<AppState> for UiUser {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, s: &AppState) -> Result<Self, Self::Rejection> {
        let to_login = || {
            let next = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
            // An htmx refresh (the device table's) whose session ended: the whole page goes to
            // sign in, and comes back to the page rather than to the fragment.
            if parts.headers.contains_key("hx-request") {
                let page = parts
                    .headers
                    .get("hx-current-url")
                    .and_then(|u| u.to_str().ok())
                    .and_then(|u| u.split_once("://").map(|(_, rest)| rest))
                    .and_then(|rest| rest.find('/').map(|i| rest[i..].to_string()))
                    .unwrap_or_else(|| "/".into());
                let to = format!("/login?next={}", urlencode(&safe_next(Some(&page))));
                return (StatusCode::UNAUTHORIZED, [("hx-redirect", to)]).into_response();
            }
            Redirect::to(&format!("/login?next={}", urlencode(next))).into_response()
        };
        let Some(c) = cookie(&parts.headers, SESSION_COOKIE) else { return Err(to_login()) };
        match ops::authenticate_session(&s.db, &c, source_of(parts), s.config.idle_timeout_ms()).await {
            Ok(p) => Ok(UiUser(p)),
            Err(AppError::Unauthorized(_)) => Err(to_login()),
            Err(e) => Err(e.into_response()),
        }
    }
}

fn urlencode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Refuses a form post whose CSRF token is not the session's.
fn check_csrf(p: &Principal, sent: &str) -> Result<(), AppError> {
    if crate::auth::csrf_matches(p.session_csrf.as_deref(), Some(sent)) {
        Ok(())
    } else {
        Err(AppError::Forbidden(
            "the form has expired or did not come from this site: reload the page and try again".into(),
        ))
    }
}

/// Context every page shares.
async fn page_ctx(s: &AppState, p: &Principal, page: &str, flash: &Flash) -> Result<Value, AppError> {
    let me = ops::me(&s.db, p).await?;
    // The navigation shows how many devices wait for an operator.
    let (pending,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM devices WHERE org_id = $1 AND status = 'pending'")
        .bind(p.org().to_string())
        .fetch_one(s.db.pool())
        .await?;
    Ok(context! {
        pending_count => pending,
        can_operate => p.role >= Role::Operator,
        me => me,
        org => me.organization,
        csrf => p.session_csrf,
        page => page,
        version => env!("CARGO_PKG_VERSION"),
        is_admin => p.role == Role::Admin,
        roles => Role::ALL.iter().map(|r| r.as_str()).collect::<Vec<_>>(),
        notice => flash.notice,
        error => flash.error,
    })
}

/// The display names of the devices a page shows by id, for `device(id, names[id])`.
async fn device_names<'a>(
    s: &AppState,
    p: &Principal,
    ids: impl IntoIterator<Item = &'a str>,
) -> Result<std::collections::BTreeMap<String, String>, AppError> {
    let ids: Vec<String> = ids.into_iter().map(str::to_string).collect();
    if ids.is_empty() {
        return Ok(Default::default());
    }
    crate::devices::display_names(&s.db, p.org(), &ids).await
}

/// Devices typed by people: ids or display names, one a line (a name may hold spaces), or
/// several on a line separated by spaces or commas. Each must name exactly one device.
async fn resolve_devices(s: &AppState, p: &Principal, text: &str) -> Result<Vec<String>, AppError> {
    let mut out: Vec<String> = Vec::new();
    let mut unknown = Vec::new();
    let one = |t: String| async move {
        let known = crate::devices::display_names(&s.db, p.org(), std::slice::from_ref(&t)).await?;
        if known.contains_key(&t) {
            return Ok::<_, AppError>(Ok(t));
        }
        let ids = crate::devices::ids_named(&s.db, p.org(), &t).await?;
        Ok(match ids.len() {
            1 => Ok(ids.into_iter().next().unwrap_or_default()),
            0 => Err(format!("no device is named {t:?}")),
            n => Err(format!("{n} devices are named {t:?}: give its id")),
        })
    };
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        match one(line.to_string()).await? {
            Ok(id) => out.push(id),
            Err(why) => {
                let words: Vec<&str> =
                    line.split(|c: char| c.is_whitespace() || c == ',').filter(|w| !w.is_empty()).collect();
                if words.len() < 2 && words.first() == Some(&line) {
                    unknown.push(why);
                    continue;
                }
                for w in words {
                    match one(w.to_string()).await? {
                        Ok(id) => out.push(id),
                        Err(why) => unknown.push(why),
                    }
                }
            }
        }
    }
    if !unknown.is_empty() {
        return Err(AppError::BadRequest(unknown.join("; ")));
    }
    out.dedup();
    Ok(out)
}

/// An audit entry as a page shows it: the summary readable (a device's JSON identity becomes
/// its name, other JSON maps `key=value` lists), and where its target is.
#[derive(serde::Serialize)]
struct AuditView {
    #[serde(flatten)]
    e: drover_proto::api::AuditEntry,
    /// The target's name, when it is a device, user or group the organization still has.
    target_name: Option<String>,
    /// The page of what the entry changed.
    target_url: Option<String>,
    text: String,
}

/// The page of an audit entry's target, when it has one.
fn target_url(kind: &str, id: &str) -> Option<String> {
    if id.is_empty() || id == "-" {
        return None;
    }
    let id = urlencode(id);
    Some(match kind {
        "device" => format!("/devices/{id}"),
        "deployment" => format!("/deployments/{id}"),
        "group" => format!("/groups/{id}"),
        "artifact" => format!("/artifacts/{id}"),
        "user" => "/users".into(),
        "token" => "/tokens".into(),
        "enrollment_token" => "/enrollment".into(),
        "alert_rule" | "notification_channel" => "/alerts/rules".into(),
        "silence" => "/alerts".into(),
        "remote_session" => "/remote-sessions".into(),
        _ => return None,
    })
}

/// Rewrites the JSON objects in an audit summary for people: `{"serial":"SN-1"}` becomes
/// `name` (the device's, when given) or `serial=SN-1`.
fn readable_summary(summary: &str, name: Option<&str>) -> String {
    let mut out = String::with_capacity(summary.len());
    let mut rest = summary;
    let mut named = false;
    while let Some(start) = rest.find('{') {
        out.push_str(&rest[..start]);
        let tail = &rest[start..];
        let mut de = serde_json::Deserializer::from_str(tail)
            .into_iter::<std::collections::BTreeMap<String, serde_json::Value>>();
        match de.next() {
            Some(Ok(map)) => {
                let used = de.byte_offset();
                let text = map
                    .iter()
                    .map(|(k, v)| match v {
                        serde_json::Value::String(s) => format!("{k}={s}"),
                        v => format!("{k}={v}"),
                    })
                    .collect::<Vec<_>>()
                    .join(", ");
                match name {
                    // The first map after "device " is the device's identity.
                    Some(n) if !named && out.ends_with("device ") => {
                        out.push_str(n);
                        named = true;
                    }
                    _ if map.is_empty() => out.push_str("none"),
                    _ => out.push_str(&text),
                }
                rest = &tail[used..];
            }
            _ => {
                out.push('{');
                rest = &tail[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

async fn audit_views(
    s: &AppState,
    p: &Principal,
    entries: Vec<drover_proto::api::AuditEntry>,
) -> Result<Vec<AuditView>, AppError> {
    let names =
        device_names(s, p, entries.iter().filter(|e| e.target_kind == "device").map(|e| e.target_id.as_str())).await?;
    // Users and groups by name too (what the caller may not list stays an id).
    let mut others: std::collections::BTreeMap<(&str, String), String> = Default::default();
    if entries.iter().any(|e| e.target_kind == "user") {
        let q = UserListQuery { limit: Some(500), ..Default::default() };
        for u in ops::list_users(&s.db, p, &q).await.map(|pg| pg.items).unwrap_or_default() {
            others.insert(("user", u.id), u.username);
        }
    }
    if entries.iter().any(|e| e.target_kind == "group") {
        let q = drover_proto::api::GroupListQuery { limit: Some(500), ..Default::default() };
        for g in crate::groups::list(&s.db, p, &q).await.map(|pg| pg.items).unwrap_or_default() {
            others.insert(("group", g.id), g.name);
        }
    }
    Ok(entries
        .into_iter()
        .map(|e| {
            let target_name = match e.target_kind.as_str() {
                "device" => names.get(&e.target_id).cloned(),
                k @ ("user" | "group") => others.get(&(k, e.target_id.clone())).cloned(),
                _ => None,
            };
            let device_name = target_name.as_deref().filter(|_| e.target_kind == "device");
            AuditView {
                text: readable_summary(&e.summary, device_name),
                target_url: target_url(&e.target_kind, &e.target_id),
                target_name,
                e,
            }
        })
        .collect())
}

/// What remote access a device offers, from the capabilities of its hello: absent means the
/// device never said, and everything is offered (the device refuses what it cannot do).
fn remote_offers(d: &drover_proto::api::Device) -> Value {
    use drover_proto::device::{CAP_FILES, CAP_FORWARD, CAP_TERMINAL};
    let has = |cap: &str| d.capabilities.as_ref().is_none_or(|c| c.iter().any(|x| x == cap));
    let (terminal, files, forward) = (has(CAP_TERMINAL), has(CAP_FILES), has(CAP_FORWARD));
    context! { terminal => terminal, files => files, forward => forward, any => terminal || files || forward }
}

#[derive(Debug, Default, Deserialize)]
struct Flash {
    notice: Option<String>,
    error: Option<String>,
}

fn merge(base: Value, extra: Value) -> Value {
    context! { ..extra, ..base }
}

/// Renders a failure of a page for people rather than as JSON.
fn error_page(s: &AppState, e: AppError) -> Response {
    if let AppError::Internal(detail) = &e {
        tracing::error!(%detail, "page failed");
    }
    let status = e.status();
    let body =
        s.ui.render(
            "error.html",
            context! { status => status.as_u16(), message => e.public_message(), version => env!("CARGO_PKG_VERSION") },
        )
        .map(IntoResponse::into_response)
        .unwrap_or_else(|_| e.public_message().into_response());
    (status, body).into_response()
}

/// After a change: back to a page with a message (post/redirect/get).
fn back(path: &str, result: Result<String, AppError>) -> Response {
    let (key, msg) = match result {
        Ok(m) => ("notice", m),
        Err(e) => {
            if let AppError::Internal(detail) = &e {
                tracing::error!(%detail, "form failed");
            }
            ("error", e.public_message())
        }
    };
    Redirect::to(&format!("{path}?{key}={}", urlencode(&msg))).into_response()
}

// ---------------------------------------------------------------- sign-in

#[derive(Deserialize)]
struct LoginQuery {
    next: Option<String>,
    error: Option<String>,
}

fn safe_next(next: Option<&str>) -> String {
    // Only paths on this site: never an open redirect.
    match next {
        Some(n) if n.starts_with('/') && !n.starts_with("//") && !n.contains('\\') => n.to_string(),
        _ => "/".into(),
    }
}

async fn login_page(State(s): State<AppState>, Query(q): Query<LoginQuery>) -> Response {
    render_login(&s, q.next.as_deref(), q.error, "", StatusCode::OK)
}

fn render_login(
    s: &AppState,
    next: Option<&str>,
    error: Option<String>,
    username: &str,
    status: StatusCode,
) -> Response {
    let login_csrf = random_secret(18);
    let ctx = context! { login_csrf => login_csrf, next => safe_next(next), error => error, username => username, version => env!("CARGO_PKG_VERSION") };
    match s.ui.render("login.html", ctx) {
        Ok(html) => {
            let c = format!("{LOGIN_CSRF_COOKIE}={login_csrf}; Path=/login; HttpOnly; SameSite=Strict; Max-Age=3600");
            (status, [(header::SET_COOKIE, c)], html).into_response()
        }
        Err(e) => error_page(s, e),
    }
}

#[derive(Deserialize)]
struct LoginForm {
    username: String,
    password: String,
    csrf: String,
    next: Option<String>,
}

async fn login_submit(State(s): State<AppState>, parts: Parts, Form(f): Form<LoginForm>) -> Response {
    let expected = cookie(&parts.headers, LOGIN_CSRF_COOKIE);
    if !crate::auth::csrf_matches(expected.as_deref(), Some(&f.csrf)) {
        let msg = "The sign-in form expired or did not come from this site. Please try again.";
        return render_login(&s, f.next.as_deref(), Some(msg.into()), &f.username, StatusCode::FORBIDDEN);
    }
    let idle = s.config.idle_timeout_ms();
    match ops::login(&s.db, &s.limiter, &f.username, f.password, client_ip(&parts), source_of(&parts), idle).await {
        Ok(session) => {
            let c = session_cookie(&s, &parts.headers, &session.cookie, ops::SESSION_MAX_AGE_MS / 1000);
            let clear = format!("{LOGIN_CSRF_COOKIE}=; Path=/login; Max-Age=0");
            let mut resp = Redirect::to(&safe_next(f.next.as_deref())).into_response();
            resp.headers_mut().append(header::SET_COOKIE, c.parse().expect("cookie header"));
            resp.headers_mut().append(header::SET_COOKIE, clear.parse().expect("cookie header"));
            resp
        }
        Err(e @ (AppError::Unauthorized(_) | AppError::TooManyRequests { .. })) => {
            let status = e.status();
            render_login(&s, f.next.as_deref(), Some(e.public_message()), &f.username, status)
        }
        Err(e) => error_page(&s, e),
    }
}

#[derive(Deserialize)]
struct CsrfForm {
    csrf: String,
}

async fn logout(State(s): State<AppState>, UiUser(p): UiUser, headers: HeaderMap, Form(f): Form<CsrfForm>) -> Response {
    if let Err(e) = check_csrf(&p, &f.csrf) {
        return error_page(&s, e);
    }
    if let Some(c) = cookie(&headers, SESSION_COOKIE)
        && let Err(e) = ops::logout(&s.db, &p, &c).await
    {
        return error_page(&s, e);
    }
    let mut resp = Redirect::to("/login").into_response();
    resp.headers_mut().append(header::SET_COOKIE, session_cookie(&s, &headers, "", 0).parse().expect("cookie header"));
    resp
}

// ---------------------------------------------------------------- pages

async fn overview(State(s): State<AppState>, UiUser(p): UiUser, Query(flash): Query<Flash>) -> Response {
    let r: Result<Html<String>, AppError> = async {
        let ctx = page_ctx(&s, &p, "overview", &flash).await?;
        let count = |sql: &'static str| {
            let org = p.org().to_string();
            let db = s.db.clone();
            async move { sqlx::query_as::<_, (i64,)>(sql).bind(org).fetch_one(db.pool()).await.map(|r| r.0) }
        };
        let users = count("SELECT COUNT(*) FROM users WHERE org_id = $1").await?;
        let tokens = count("SELECT COUNT(*) FROM api_tokens WHERE org_id = $1 AND revoked_at IS NULL").await?;
        let devices = count("SELECT COUNT(*) FROM devices WHERE org_id = $1 AND status = 'accepted'").await?;
        let (online, offline) = crate::devices::presence_counts(&s.db, &p).await?;
        // Devices with a firing alert (fleet-wide alerts counted apart).
        let firing_q = crate::alerts::types::AlertListQuery { state: Some("firing".into()), ..Default::default() };
        let firing = crate::alerts::rules::list_alerts(&s.db, &p, &firing_q).await?.items;
        let mut alerting: Vec<&str> = firing.iter().filter_map(|a| a.device_id.as_deref()).collect();
        alerting.sort();
        alerting.dedup();
        let fleet_firing = firing.iter().filter(|a| a.device_id.is_none()).count();
        let active_q = drover_proto::deploy::DeploymentListQuery {
            limit: Some(5),
            cursor: None,
            status: Some(drover_proto::deploy::DeploymentStatus::Active),
        };
        let active: Vec<updates::DeploymentView> = crate::deployments::list(&s.db, &p, &active_q)
            .await?
            .items
            .into_iter()
            .map(updates::deployment_view)
            .collect();
        let failures = crate::deployments::recent_failures(&s.db, &p, 8).await?;
        let q = AuditListQuery { limit: Some(10), ..Default::default() };
        let (entries, _) = crate::audit::list(&s.db, p.org(), &q).await?;
        let entries = audit_views(&s, &p, entries).await?;
        let names = device_names(&s, &p, failures.iter().map(|f| f.device_id.as_str())).await?;
        let extra = context! {
            counts => context! {
                users => users, tokens => tokens, devices => devices, online => online, offline => offline,
                alerting => alerting.len(), fleet_firing => fleet_firing,
            },
            active => active,
            failures => failures,
            names => names,
            entries => entries,
            backend => s.db.backend().name(),
        };
        s.ui.render("overview.html", merge(ctx, extra))
    }
    .await;
    r.map(IntoResponse::into_response).unwrap_or_else(|e| error_page(&s, e))
}

async fn account(State(s): State<AppState>, UiUser(p): UiUser, Query(flash): Query<Flash>) -> Response {
    match page_ctx(&s, &p, "account", &flash).await.and_then(|ctx| s.ui.render("account.html", ctx)) {
        Ok(html) => html.into_response(),
        Err(e) => error_page(&s, e),
    }
}

#[derive(Deserialize)]
struct PasswordForm {
    csrf: String,
    current_password: String,
    new_password: String,
}

async fn account_password(State(s): State<AppState>, UiUser(p): UiUser, Form(f): Form<PasswordForm>) -> Response {
    if let Err(e) = check_csrf(&p, &f.csrf) {
        return error_page(&s, e);
    }
    let req = ChangePassword { current_password: f.current_password, new_password: f.new_password };
    match ops::change_own_password(&s.db, &p, req).await {
        // Every session ended, this one included.
        Ok(()) => {
            Redirect::to("/login?error=Password%20changed.%20Sign%20in%20with%20the%20new%20one.").into_response()
        }
        Err(e) => back("/account", Err(e)),
    }
}

#[derive(Deserialize)]
struct ListUi {
    cursor: Option<String>,
    include_revoked: Option<bool>,
    notice: Option<String>,
    error: Option<String>,
}

async fn users(State(s): State<AppState>, UiUser(p): UiUser, Query(q): Query<ListUi>) -> Response {
    render_users(&s, &p, q, None).await
}

async fn render_users(
    s: &AppState,
    p: &Principal,
    q: ListUi,
    created: Option<drover_proto::api::CreatedUser>,
) -> Response {
    let flash = Flash { notice: q.notice, error: q.error };
    let r: Result<Html<String>, AppError> = async {
        let ctx = page_ctx(s, p, "users", &flash).await?;
        let page =
            ops::list_users(&s.db, p, &UserListQuery { limit: Some(100), cursor: q.cursor, ..Default::default() })
                .await?;
        let next_url = page.next_cursor.map(|c| format!("/users?cursor={}", urlencode(&c)));
        s.ui.render(
            "users.html",
            merge(ctx, context! { users => page.items, next_url => next_url, created => created }),
        )
    }
    .await;
    r.map(IntoResponse::into_response).unwrap_or_else(|e| error_page(s, e))
}

#[derive(Deserialize)]
struct NewUserForm {
    csrf: String,
    username: String,
    role: String,
    password: Option<String>,
}

async fn users_create(State(s): State<AppState>, UiUser(p): UiUser, Form(f): Form<NewUserForm>) -> Response {
    if let Err(e) = check_csrf(&p, &f.csrf) {
        return error_page(&s, e);
    }
    let Some(role) = Role::parse(&f.role) else {
        return back("/users", Err(AppError::BadRequest(format!("unknown role {:?}", f.role))));
    };
    let req =
        CreateUser { username: f.username.trim().to_string(), role, password: f.password.filter(|p| !p.is_empty()) };
    match ops::create_user(&s.db, &p, req).await {
        Ok(created) if created.generated_password.is_some() => {
            let q = ListUi { cursor: None, include_revoked: None, notice: None, error: None };
            render_users(&s, &p, q, Some(created)).await
        }
        Ok(created) => back("/users", Ok(format!("User {} created.", created.user.username))),
        Err(e) => back("/users", Err(e)),
    }
}

#[derive(Deserialize)]
struct UserActionForm {
    csrf: String,
    role: Option<String>,
    password: Option<String>,
}

async fn users_action(
    State(s): State<AppState>,
    UiUser(p): UiUser,
    axum::extract::Path((id, action)): axum::extract::Path<(String, String)>,
    Form(f): Form<UserActionForm>,
) -> Response {
    if let Err(e) = check_csrf(&p, &f.csrf) {
        return error_page(&s, e);
    }
    let result = match action.as_str() {
        "role" => match f.role.as_deref().and_then(Role::parse) {
            Some(role) => ops::update_user(&s.db, &p, &id, UpdateUser { role: Some(role), disabled: None })
                .await
                .map(|u| format!("{} is now {}.", u.username, u.role)),
            None => Err(AppError::BadRequest("choose a role".into())),
        },
        "disable" | "enable" => {
            ops::update_user(&s.db, &p, &id, UpdateUser { role: None, disabled: Some(action == "disable") })
                .await
                .map(|u| format!("{} is {}.", u.username, if u.disabled { "disabled" } else { "enabled" }))
        }
        "delete" => ops::delete_user(&s.db, &p, &id).await.map(|()| "User deleted.".to_string()),
        "password" => ops::set_password(&s.db, &p, &id, SetPassword { password: f.password.unwrap_or_default() })
            .await
            .map(|()| "Password set.".to_string()),
        _ => Err(AppError::NotFound("no such action".into())),
    };
    back("/users", result)
}

async fn tokens(State(s): State<AppState>, UiUser(p): UiUser, Query(q): Query<ListUi>) -> Response {
    render_tokens(&s, &p, q, None).await
}

async fn render_tokens(
    s: &AppState,
    p: &Principal,
    q: ListUi,
    created: Option<drover_proto::api::CreatedToken>,
) -> Response {
    let flash = Flash { notice: q.notice, error: q.error };
    let include_revoked = q.include_revoked.unwrap_or(false);
    let r: Result<Html<String>, AppError> = async {
        let ctx = page_ctx(s, p, "tokens", &flash).await?;
        let query = TokenListQuery { limit: Some(100), cursor: q.cursor, include_revoked: Some(include_revoked), ..Default::default() };
        let page = ops::list_tokens(&s.db, p, &query).await?;
        let next_url = page
            .next_cursor
            .map(|c| format!("/tokens?cursor={}{}", urlencode(&c), if include_revoked { "&include_revoked=true" } else { "" }));
        let extra = context! { tokens => page.items, next_url => next_url, created => created, include_revoked => include_revoked };
        s.ui.render("tokens.html", merge(ctx, extra))
    }
    .await;
    r.map(IntoResponse::into_response).unwrap_or_else(|e| error_page(s, e))
}

#[derive(Deserialize)]
struct NewTokenForm {
    csrf: String,
    name: String,
    role: String,
    expires_in_days: Option<String>,
}

async fn tokens_create(State(s): State<AppState>, UiUser(p): UiUser, Form(f): Form<NewTokenForm>) -> Response {
    if let Err(e) = check_csrf(&p, &f.csrf) {
        return error_page(&s, e);
    }
    let Some(role) = Role::parse(&f.role) else {
        return back("/tokens", Err(AppError::BadRequest(format!("unknown role {:?}", f.role))));
    };
    let expires_in_days = match f.expires_in_days.as_deref().map(str::trim).filter(|v| !v.is_empty()) {
        None => None,
        Some(v) => match v.parse() {
            Ok(d) => Some(d),
            Err(_) => {
                return back("/tokens", Err(AppError::BadRequest("expiry must be a whole number of days".into())));
            }
        },
    };
    match ops::create_token(&s.db, &p, CreateToken { name: f.name, role, expires_in_days }).await {
        // The secret is shown in this response only, never in a URL.
        Ok(created) => {
            let q = ListUi { cursor: None, include_revoked: None, notice: None, error: None };
            let mut resp = render_tokens(&s, &p, q, Some(created)).await;
            resp.headers_mut().insert(header::CACHE_CONTROL, "no-store".parse().expect("header"));
            resp
        }
        Err(e) => back("/tokens", Err(e)),
    }
}

async fn tokens_revoke(
    State(s): State<AppState>,
    UiUser(p): UiUser,
    axum::extract::Path(id): axum::extract::Path<String>,
    Form(f): Form<CsrfForm>,
) -> Response {
    if let Err(e) = check_csrf(&p, &f.csrf) {
        return error_page(&s, e);
    }
    back("/tokens", ops::revoke_token(&s.db, &p, &id).await.map(|t| format!("Token {} revoked.", t.name)))
}

#[derive(Deserialize, Default)]
struct AuditUi {
    action: Option<String>,
    actor: Option<String>,
    target_kind: Option<String>,
    /// The target's id, or its name (a device's, group's, deployment's or user's).
    target: Option<String>,
    since: Option<String>,
    until: Option<String>,
    cursor: Option<String>,
    error: Option<String>,
}

/// The kinds of audit targets the filter offers: `(value, label)`. Remote sessions are
/// recorded on their device, and filtered by their actions.
const AUDIT_TARGETS: &[(&str, &str)] = &[
    ("device", "device"),
    ("remote_session", "remote session"),
    ("deployment", "deployment"),
    ("artifact", "artifact"),
    ("group", "group"),
    ("enrollment_token", "enrollment token"),
    ("alert_rule", "alert rule"),
    ("silence", "silence"),
    ("notification_channel", "notification channel"),
    ("user", "user"),
    ("token", "API token"),
    ("organization", "organization"),
    ("trust_root", "trust root"),
];

/// A time bound typed in the audit filter: a date, a date and time from a
/// `datetime-local` field (UTC), or RFC 3339. A date alone as the upper bound includes the
/// whole day.
fn audit_bound(v: &str, upper: bool) -> Result<String, String> {
    let v = v.trim();
    let bad = || format!("give a date (YYYY-MM-DD) or a date and time (YYYY-MM-DD HH:MM, UTC), not {v:?}");
    if v.len() == 10 {
        let ms = crate::time::parse(v).ok_or_else(bad)?;
        return Ok(crate::time::to_rfc3339(if upper { ms + 86_400_000 } else { ms }));
    }
    let t = v.replacen(' ', "T", 1);
    let full = match t.len() {
        16 => format!("{t}:00Z"),
        19 => format!("{t}Z"),
        _ => t,
    };
    crate::time::parse(&full).map(crate::time::to_rfc3339).ok_or_else(bad)
}

async fn audit(State(s): State<AppState>, UiUser(p): UiUser, Query(q): Query<AuditUi>) -> Response {
    let opt = |v: &Option<String>| v.as_deref().map(str::trim).filter(|v| !v.is_empty()).map(str::to_string);
    let mut errors: std::collections::BTreeMap<&str, String> = Default::default();
    let since = opt(&q.since).map(|v| audit_bound(&v, false)).transpose().unwrap_or_else(|e| {
        errors.insert("since", e);
        None
    });
    let until = opt(&q.until).map(|v| audit_bound(&v, true)).transpose().unwrap_or_else(|e| {
        errors.insert("until", e);
        None
    });
    let mut kind = opt(&q.target_kind);
    let mut action = opt(&q.action);
    if let Some(k) = kind.as_deref() {
        if !AUDIT_TARGETS.iter().any(|(v, _)| *v == k) {
            errors.insert("target_kind", format!("unknown target {k:?}"));
        } else if k == "remote_session" {
            if action.as_deref().is_some_and(|a| !a.starts_with("remote.")) {
                errors.insert("action", "a remote session's actions start with remote.".into());
            }
            action = action.or(Some("remote.".into()));
            kind = Some("device".into());
        }
    }
    // A target by name: the one device, group, deployment or user so named.
    let mut target_id = None;
    if let Some(t) = opt(&q.target) {
        let found = match kind.as_deref() {
            _ if t.len() > 200 => Err("at most 200 characters".to_string()),
            None => Err("choose the kind of target first".to_string()),
            Some("device") => match crate::devices::ids_named(&s.db, p.org(), &t).await {
                Ok(ids) if ids.len() > 1 => Err(format!("{} devices are named {t:?}: give the device's id", ids.len())),
                Ok(ids) => Ok(ids.into_iter().next()),
                Err(e) => return error_page(&s, e),
            },
            Some("group") => crate::groups::id_named(&s.db, p.org(), &t).await.map_err(|e| e.public_message()),
            Some("deployment") => match crate::deployments::ids_named(&s.db, p.org(), &t).await {
                Ok(ids) if ids.len() > 1 => {
                    Err(format!("{} deployments are named {t:?}: give the deployment's id", ids.len()))
                }
                Ok(ids) => Ok(ids.into_iter().next()),
                Err(e) => return error_page(&s, e),
            },
            Some("user") => {
                let users = ops::list_users(&s.db, &p, &UserListQuery { limit: Some(500), ..Default::default() }).await;
                Ok(users.ok().and_then(|u| u.items.into_iter().find(|u| u.username == t)).map(|u| u.id))
            }
            Some(_) => Ok(None),
        };
        match found {
            Ok(id) => target_id = Some(id.unwrap_or(t)),
            Err(e) => {
                errors.insert("target", e);
            }
        }
    }
    let r: Result<Html<String>, AppError> = async {
        let ctx = page_ctx(&s, &p, "audit", &Flash { notice: None, error: q.error.clone() }).await?;
        let (entries, next) = if errors.is_empty() {
            let query = AuditListQuery {
                limit: Some(100),
                cursor: q.cursor.clone(),
                action: action.clone(),
                actor: opt(&q.actor),
                target_kind: kind.clone(),
                target_id: target_id.clone(),
                since: since.clone(),
                until: until.clone(),
                ..Default::default()
            };
            match crate::audit::list(&s.db, p.org(), &query).await {
                Ok(r) => r,
                Err(e @ (AppError::BadRequest(_) | AppError::InvalidCursor(_))) => {
                    errors.insert("form", e.public_message());
                    (Vec::new(), None)
                }
                Err(e) => return Err(e),
            }
        } else {
            (Vec::new(), None)
        };
        let entries = audit_views(&s, &p, entries).await?;
        let next_url = next.map(|c| {
            let mut url = format!("/audit?cursor={}", urlencode(&c));
            for (k, v) in [
                ("action", &q.action),
                ("actor", &q.actor),
                ("target_kind", &q.target_kind),
                ("target", &q.target),
                ("since", &q.since),
                ("until", &q.until),
            ] {
                if let Some(v) = v.as_deref().filter(|v| !v.is_empty()) {
                    url.push_str(&format!("&{k}={}", urlencode(v)));
                }
            }
            url
        });
        let actions = [
            "device.",
            "deployment.",
            "artifact.",
            "group.",
            "remote.",
            "alert.",
            "user.",
            "token.",
            "session.",
            "organization.",
            "device.accept",
            "device.reject",
            "device.decommission",
            "device.tags",
            "deployment.create",
            "deployment.abort",
            "session.login",
            "session.logout",
        ];
        let qv = context! {
            action => q.action, actor => q.actor, target_kind => q.target_kind, target => q.target,
            since => q.since, until => q.until,
        };
        let extra = context! {
            entries => entries, next_url => next_url, q => qv, actions => actions, targets => AUDIT_TARGETS,
            errors => errors.clone(),
        };
        s.ui.render("audit.html", merge(ctx, extra))
    }
    .await;
    match r {
        Ok(html) if errors.is_empty() => html.into_response(),
        Ok(html) => (StatusCode::BAD_REQUEST, html).into_response(),
        Err(e) => error_page(&s, e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_is_never_an_open_redirect() {
        assert_eq!(safe_next(Some("/users?x=1")), "/users?x=1");
        assert_eq!(safe_next(Some("//evil.example")), "/");
        assert_eq!(safe_next(Some("https://evil.example")), "/");
        assert_eq!(safe_next(Some("/\\evil.example")), "/");
        assert_eq!(safe_next(None), "/");
    }

    #[test]
    fn audit_time_bounds() {
        assert_eq!(audit_bound("2026-12-07", false).unwrap(), "2026-12-07T00:00:00Z");
        assert_eq!(audit_bound("2026-12-07", true).unwrap(), "2026-12-08T00:00:00Z");
        assert_eq!(audit_bound("2026-12-07T13:45", true).unwrap(), "2026-12-07T13:45:00Z");
        assert_eq!(audit_bound("2026-12-07 13:45:10", false).unwrap(), "2026-12-07T13:45:10Z");
        assert!(audit_bound("yesterday", false).unwrap_err().contains("\"yesterday\""));
    }

    #[test]
    fn audit_summaries_read_as_text() {
        let s = r#"device {"mac":"02:00","serial":"SN-1"}: pending → accepted"#;
        assert_eq!(readable_summary(s, Some("gw-7")), "device gw-7: pending → accepted");
        assert_eq!(readable_summary(s, None), "device mac=02:00, serial=SN-1: pending → accepted");
        assert_eq!(readable_summary("tags {} → {\"a\":\"b\"}", None), "tags none → a=b");
        assert_eq!(readable_summary("odd { brace", None), "odd { brace");
    }

    #[test]
    fn all_templates_compile() {
        let t = Templates::new();
        assert!(t.env.get_template("users.html").is_ok());
    }
}
