//! The remote-access pages: a device's terminal (xterm.js over the same WebSocket the CLI
//! uses), its file transfers and sessions, every session of the organization with the
//! recording switch (admins), and the replay of a recorded terminal session.
//!
//! The pages only show what the caller's role allows; the WebSocket and the API check again
//! (`crate::remote`), so a page is never the only guard.

use axum::Router;
use axum::extract::{Form, Path, Query, State};
use axum::http::header;
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use drover_proto::api::Role;
use minijinja::context;
use serde::Deserialize;

use super::{Flash, UiUser, back, check_csrf, device_names, error_page, merge, page_ctx};
use crate::app::AppState;
use crate::devices;
use crate::error::AppResult;
use crate::remote::sessions::{self, RemoteSettings, SessionListQuery};

const TERMINAL_JS: &str = include_str!("../../assets/terminal.js");
const XTERM_JS: &str = include_str!("../../assets/vendor/xterm-5.5.0.min.js");
const XTERM_CSS: &str = include_str!("../../assets/vendor/xterm-5.5.0.css");
const XTERM_FIT_JS: &str = include_str!("../../assets/vendor/xterm-addon-fit-0.10.0.min.js");
pub const XTERM_LICENSE: &str = include_str!("../../assets/vendor/xterm-5.5.0.LICENSE");
pub const XTERM_FIT_LICENSE: &str = include_str!("../../assets/vendor/xterm-addon-fit-0.10.0.LICENSE");

pub const TEMPLATES: &[(&str, &str)] = &[
    ("device_terminal.html", include_str!("../../templates/device_terminal.html")),
    ("device_remote.html", include_str!("../../templates/device_remote.html")),
    ("remote_sessions.html", include_str!("../../templates/remote_sessions.html")),
    ("remote_sessions_table.html", include_str!("../../templates/remote_sessions_table.html")),
    ("session_replay.html", include_str!("../../templates/session_replay.html")),
];

fn asset(content_type: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type), (header::CACHE_CONTROL, "public, max-age=31536000, immutable")], body)
        .into_response()
}

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/devices/{id}/terminal", get(terminal_page))
        .route("/devices/{id}/remote", get(device_remote_page))
        .route("/remote-sessions", get(sessions_page))
        .route("/remote-sessions/{id}/replay", get(replay_page))
        .route("/remote-settings", post(settings_submit))
        .route("/devices/{id}/web", post(web_open_submit))
        .route("/devices/{id}/web/{session}/close", post(web_close_submit))
        .route("/devices/{id}/web/{session}/address", post(web_address_submit))
        .merge(crate::remote::web::routes())
        .route(
            "/assets/terminal.js",
            get(|| async { ([(header::CONTENT_TYPE, "application/javascript")], TERMINAL_JS) }),
        )
        .route("/assets/vendor/xterm-5.5.0.min.js", get(|| async { asset("application/javascript", XTERM_JS) }))
        .route("/assets/vendor/xterm-5.5.0.css", get(|| async { asset("text/css", XTERM_CSS) }))
        .route(
            "/assets/vendor/xterm-addon-fit-0.10.0.min.js",
            get(|| async { asset("application/javascript", XTERM_FIT_JS) }),
        )
}

/// The licences of the terminal emulator, for `/assets/licenses`.
pub fn licenses() -> String {
    format!(
        "xterm.js 5.5.0 (https://xtermjs.org)\n\n{XTERM_LICENSE}\n\n@xterm/addon-fit 0.10.0 (https://xtermjs.org)\n\n{XTERM_FIT_LICENSE}"
    )
}

async fn terminal_page(
    State(s): State<AppState>,
    UiUser(p): UiUser,
    Path(id): Path<String>,
    Query(flash): Query<Flash>,
) -> Response {
    let r: AppResult<Html<String>> = async {
        p.require(Role::Operator, "opening a remote session")?;
        let ctx = page_ctx(&s, &p, "devices", &flash).await?;
        let device = devices::get_device_detail(&s.db, &p, &id).await?;
        s.ui.render(
            "device_terminal.html",
            merge(ctx, context! { offers => super::remote_offers(&device.device), d => device }),
        )
    }
    .await;
    r.map(IntoResponse::into_response).unwrap_or_else(|e| error_page(&s, e))
}

async fn device_remote_page(
    State(s): State<AppState>,
    UiUser(p): UiUser,
    Path(id): Path<String>,
    Query(flash): Query<Flash>,
) -> Response {
    let r: AppResult<Html<String>> = async {
        let ctx = page_ctx(&s, &p, "devices", &flash).await?;
        let device = devices::get_device_detail(&s.db, &p, &id).await?;
        let q = SessionListQuery { device: Some(id.clone()), limit: Some(100), cursor: None };
        let rows = sessions::list(&s.db, &p, &q).await?.items;
        // A new address only for the one who opened the session; the others may close it.
        let web_sessions: Vec<_> = crate::remote::links::open_on_device(&s.db, p.org(), &id)
            .await?
            .into_iter()
            .map(|w| {
                let mine = w.actor_id == p.id && p.role >= Role::Operator;
                context! { session => w.session_id, target => w.target, actor_name => w.actor_name,
                started_at => crate::time::to_rfc3339(w.started_at), mine => mine }
            })
            .collect();
        s.ui.render(
            "device_remote.html",
            merge(ctx, context! { offers => super::remote_offers(&device.device), names => std::collections::BTreeMap::from([(device.device.id.clone(), device.device.display_name.clone())]), d => device, sessions => rows, web_sessions => web_sessions }),
        )
    }
    .await;
    r.map(IntoResponse::into_response).unwrap_or_else(|e| error_page(&s, e))
}

async fn sessions_page(State(s): State<AppState>, UiUser(p): UiUser, Query(flash): Query<Flash>) -> Response {
    let r: AppResult<Html<String>> = async {
        let ctx = page_ctx(&s, &p, "remote", &flash).await?;
        let rows =
            sessions::list(&s.db, &p, &SessionListQuery { device: None, limit: Some(200), cursor: None }).await?.items;
        let settings = sessions::settings(&s.db, &p).await?;
        let names = device_names(&s, &p, rows.iter().map(|r| r.device_id.as_str())).await?;
        s.ui.render(
            "remote_sessions.html",
            merge(ctx, context! { sessions => rows, settings => settings, names => names }),
        )
    }
    .await;
    r.map(IntoResponse::into_response).unwrap_or_else(|e| error_page(&s, e))
}

async fn replay_page(
    State(s): State<AppState>,
    UiUser(p): UiUser,
    Path(id): Path<String>,
    Query(flash): Query<Flash>,
) -> Response {
    let r: AppResult<Html<String>> = async {
        p.require(Role::Operator, "replaying terminal recordings")?;
        let ctx = page_ctx(&s, &p, "remote", &flash).await?;
        let session = sessions::get(&s.db, &p, &id).await?;
        let names = device_names(&s, &p, [session.device_id.as_str()]).await?;
        s.ui.render("session_replay.html", merge(ctx, context! { session => session, names => names }))
    }
    .await;
    r.map(IntoResponse::into_response).unwrap_or_else(|e| error_page(&s, e))
}

#[derive(Deserialize)]
struct SettingsForm {
    csrf: String,
    /// Present (any value) when the box is ticked.
    recording: Option<String>,
}

async fn settings_submit(State(s): State<AppState>, UiUser(p): UiUser, Form(f): Form<SettingsForm>) -> Response {
    let result = async {
        check_csrf(&p, &f.csrf)?;
        let on = f.recording.is_some();
        sessions::set_settings(&s.db, &p, RemoteSettings { recording: on }).await?;
        Ok(format!("Recording of terminal sessions is {}.", if on { "on" } else { "off" }))
    }
    .await;
    back("/remote-sessions", result)
}

#[derive(Deserialize)]
struct WebOpenForm {
    csrf: String,
    host: String,
    port: u16,
}

/// "Open web UI": on success the browser goes to the session's capability path; a refusal
/// (the device's reason) is shown on the device's remote-access page.
async fn web_open_submit(
    State(s): State<AppState>,
    UiUser(p): UiUser,
    Path(id): Path<String>,
    Form(f): Form<WebOpenForm>,
) -> Response {
    let result = async {
        check_csrf(&p, &f.csrf)?;
        crate::remote::web::open(&s, &p, &id, &f.host, f.port).await
    }
    .await;
    match result {
        Ok(opened) => Redirect::to(&opened.url).into_response(),
        Err(e) => back(&format!("/devices/{id}/remote"), Err(e)),
    }
}

#[derive(Deserialize)]
struct CsrfForm {
    csrf: String,
}

/// "Open" on an open web UI session (its opener only): a new address for it, which the
/// browser is sent to.
async fn web_address_submit(
    State(s): State<AppState>,
    UiUser(p): UiUser,
    Path((id, session)): Path<(String, String)>,
    Form(f): Form<CsrfForm>,
) -> Response {
    let result = async {
        check_csrf(&p, &f.csrf)?;
        crate::remote::web::new_address(&s, &p, &session).await
    }
    .await;
    match result {
        Ok(opened) => Redirect::to(&opened.url).into_response(),
        Err(e) => back(&format!("/devices/{id}/remote"), Err(e)),
    }
}

async fn web_close_submit(
    State(s): State<AppState>,
    UiUser(p): UiUser,
    Path((id, session)): Path<(String, String)>,
    Form(f): Form<CsrfForm>,
) -> Response {
    let result = async {
        check_csrf(&p, &f.csrf)?;
        crate::remote::web::close(&s, &p, &session).await?;
        Ok(format!("Web UI session {session} closed."))
    }
    .await;
    back(&format!("/devices/{id}/remote"), result)
}
