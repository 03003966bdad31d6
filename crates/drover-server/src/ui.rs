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
mod groups;
mod metrics;
mod remote;
mod updates;

const HTMX: &str = include_str!("../assets/vendor/htmx-2.0.4.min.js");
const HTMX_LICENSE: &str = include_str!("../assets/vendor/htmx-2.0.4.LICENSE");
const CSS: &str = include_str!("../assets/drover.css");

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
        let audit_n = count("SELECT COUNT(*) FROM audit_log WHERE org_id = $1").await?;
        let devices = count("SELECT COUNT(*) FROM devices WHERE org_id = $1 AND status = 'accepted'").await?;
        let q = AuditListQuery { limit: Some(10), ..Default::default() };
        let (entries, _) = crate::audit::list(&s.db, p.org(), &q).await?;
        let extra = context! {
            counts => context! { users => users, tokens => tokens, audit => audit_n, devices => devices },
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
    since: Option<String>,
    until: Option<String>,
    cursor: Option<String>,
    error: Option<String>,
}

async fn audit(State(s): State<AppState>, UiUser(p): UiUser, Query(q): Query<AuditUi>) -> Response {
    let r: Result<Html<String>, AppError> = async {
        let ctx = page_ctx(&s, &p, "audit", &Flash { notice: None, error: q.error.clone() }).await?;
        let query = AuditListQuery {
            limit: Some(100),
            cursor: q.cursor.clone(),
            action: q.action.clone(),
            actor: q.actor.clone(),
            target_kind: q.target_kind.clone(),
            since: q.since.clone(),
            until: q.until.clone(),
            ..Default::default()
        };
        let (entries, next) = crate::audit::list(&s.db, p.org(), &query).await?;
        let next_url = next.map(|c| {
            let mut url = format!("/audit?cursor={}", urlencode(&c));
            for (k, v) in [("action", &q.action), ("actor", &q.actor), ("target_kind", &q.target_kind), ("since", &q.since), ("until", &q.until)] {
                if let Some(v) = v.as_deref().filter(|v| !v.is_empty()) {
                    url.push_str(&format!("&{k}={}", urlencode(v)));
                }
            }
            url
        });
        let actions = [
            "user.", "token.", "session.", "organization.", "user.create", "user.update", "user.delete", "user.set_password",
            "user.change_password", "token.create", "token.revoke", "session.login", "session.logout", "organization.update",
        ];
        let qv = context! { action => q.action, actor => q.actor, target_kind => q.target_kind, since => q.since, until => q.until };
        s.ui.render("audit.html", merge(ctx, context! { entries => entries, next_url => next_url, q => qv, actions => actions }))
    }
    .await;
    r.map(IntoResponse::into_response).unwrap_or_else(|e| match e {
        AppError::BadRequest(_) | AppError::InvalidCursor(_) => back("/audit", Err(e)),
        e => error_page(&s, e),
    })
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
    fn all_templates_compile() {
        let t = Templates::new();
        assert!(t.env.get_template("users.html").is_ok());
    }
}
