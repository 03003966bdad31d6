//! Remote access, the server's side (`docs/remote-access.md`): the operator's WebSockets
//! (`/api/v1/devices/{id}/terminal`, `…/files`, `…/forward`), relayed to the device over
//! per-session MQTT topics (`drover_proto::remote`, `docs/protocol.md`) by this replica's own
//! broker connection ([`hub`]); the session table and its audit entries ([`sessions`]);
//! terminal recordings ([`recording`]); a device's local web UI proxied to the browser under a
//! sandboxed capability path ([`web`]).
//!
//! Who may: operators and admins open sessions (viewers are refused), on accepted, online
//! devices of their organization; the device's own configuration decides which kinds it
//! allows, and refuses the rest (the operator sees its reason). Browser sessions (cookie) must
//! come from droverd's own pages (the `Origin` header names this server), so another site
//! cannot open a terminal with a signed-in user's cookie.

pub mod hub;
pub mod links;
pub mod recording;
mod relay;
pub mod sessions;
pub mod web;

use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::extract::ws::WebSocketUpgrade;
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use drover_proto::api::ErrorBody;
use drover_proto::remote::{self, Direction, FileDirection, FileParams, RemoteCommand, TerminalParams};
use serde::Deserialize;
use utoipa::{IntoParams, OpenApi};

use crate::app::{ApiJson, ApiPath, ApiQuery, AppState};
use crate::auth::Principal;
use crate::error::{AppError, AppResult};
use sessions::{RemoteSession, RemoteSettings, SessionKind, SessionListQuery};

pub use hub::Hub;

pub fn api_routes() -> Router<AppState> {
    Router::new()
        .route("/devices/{id}/terminal", get(terminal))
        .route("/devices/{id}/files", get(files))
        .route("/devices/{id}/forward", get(forward))
        .route("/remote-sessions", get(list_sessions))
        .route("/remote-sessions/{id}", get(get_session))
        .route("/remote-sessions/{id}/recording", get(get_recording))
        .route("/devices/{id}/web", axum::routing::post(web::open_api))
        .route("/remote-sessions/{id}/close", axum::routing::post(web::close_api))
        .route("/remote-settings", get(get_settings).put(put_settings))
}

#[derive(OpenApi)]
#[openapi(
    paths(terminal, files, forward, list_sessions, get_session, get_recording, get_settings, put_settings, web::open_api, web::close_api),
    components(schemas(RemoteSession, RemoteSettings, SessionKind, web::WebOpenRequest, web::WebOpened)),
    tags((name = "remote", description = "Remote access: terminal, file transfer and port forwarding over WebSockets relayed to the device (docs/remote-access.md); the sessions' record and recordings"))
)]
pub struct RemoteApiDoc;

/// A cookie-authenticated WebSocket must come from a page of this server.
fn check_origin(headers: &HeaderMap) -> AppResult<()> {
    if headers.contains_key(header::AUTHORIZATION) {
        return Ok(());
    }
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok()).unwrap_or_default();
    let origin = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()).unwrap_or_default();
    let origin_host = origin.split_once("://").map(|(_, h)| h).unwrap_or_default();
    if host.is_empty() || origin_host != host {
        return Err(AppError::Forbidden(
            "a remote session opened with a web session must come from this server's own pages (Origin header)".into(),
        ));
    }
    Ok(())
}

fn limits(s: &AppState) -> (Duration, Duration) {
    (
        Duration::from_secs(s.config.remote_idle_timeout_secs.max(1)),
        Duration::from_secs(s.config.remote_max_duration_secs.max(1)),
    )
}

/// Records the session, subscribes to its device topic and hands the socket to the relay.
async fn start(
    s: AppState,
    p: Principal,
    ws: WebSocketUpgrade,
    device_id: &str,
    kind: SessionKind,
    detail: String,
    make: impl FnOnce(&str, bool) -> (RemoteCommand, relay::Mode),
) -> AppResult<Response> {
    let opened = sessions::open(&s.db, &p, device_id, kind, &detail).await?;
    let (mut command, mode) = make(&opened.id, opened.recording);
    let (idle, max) = limits(&s);
    command.idle_timeout_s = Some(u32::try_from(idle.as_secs()).unwrap_or(u32::MAX));
    command.max_duration_s = Some(u32::try_from(max.as_secs()).unwrap_or(u32::MAX));
    let up = remote::session_topic(device_id, &opened.id, Direction::Up);
    let inbox = match s.remote.subscribe(up).await {
        Ok(i) => i,
        Err(e) => {
            let end = sessions::Ending { reason: e.to_string(), ..Default::default() };
            sessions::close(&s.db, &p, &opened, end).await?;
            return Err(AppError::Conflict(e.to_string()));
        }
    };
    let relay =
        relay::Relay { hub: s.remote.clone(), session: opened.clone(), mode, idle_timeout: idle, max_duration: max };
    let db = s.db.clone();
    Ok(ws
        .max_message_size(1024 * 1024)
        .on_upgrade(move |socket| async move {
            let ending = relay.run(relay::Operator::Ws(Box::new(socket)), inbox, command).await;
            if let Err(e) = sessions::close(&db, &p, &opened, ending).await {
                tracing::error!(session = %opened.id, "cannot record the end of a remote session: {e}");
            }
        })
        .into_response())
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct TerminalQuery {
    /// Columns (1-1000, default 80).
    pub cols: Option<u16>,
    /// Rows (1-1000, default 24).
    pub rows: Option<u16>,
}

/// A shell on the device (PTY) over a WebSocket: binary frames are terminal bytes both ways;
/// text frames are JSON (`{"type":"resize","cols":…,"rows":…}` from the client; `opened`,
/// `exit` with the shell's status, and `error` from the server).
#[utoipa::path(get, path = "/api/v1/devices/{id}/terminal", tag = "remote", params(("id" = String, Path), TerminalQuery),
    responses((status = 101, description = "WebSocket of the terminal session"), (status = 400, body = ErrorBody),
              (status = 403, body = ErrorBody, description = "Viewers, or a browser page from another site"),
              (status = 404, body = ErrorBody), (status = 409, body = ErrorBody, description = "Device not accepted, offline, or no broker")))]
async fn terminal(
    State(s): State<AppState>,
    p: Principal,
    headers: HeaderMap,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<TerminalQuery>,
    ws: WebSocketUpgrade,
) -> AppResult<Response> {
    check_origin(&headers)?;
    let (cols, rows) = (q.cols.unwrap_or(80), q.rows.unwrap_or(24));
    remote::check_size(rows, cols).map_err(AppError::BadRequest)?;
    let term = "xterm-256color";
    start(s, p, ws, &id, SessionKind::Terminal, format!("{cols}x{rows}"), |session, recording| {
        let recorder = recording.then(|| recording::Recorder::new(cols, rows, term, crate::time::now_ms() / 1000));
        (
            RemoteCommand::open_terminal(session, TerminalParams { rows, cols, term: term.into() }),
            relay::Mode::Terminal { recorder },
        )
    })
    .await
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct FilesQuery {
    /// `upload` (to the device) or `download`.
    pub op: String,
    /// Absolute path on the device.
    pub path: String,
    /// Upload: the file's size in bytes.
    pub size: Option<u64>,
    /// Upload: SHA-256 of the file, lowercase hex.
    pub sha256: Option<String>,
    /// Upload: permission bits, octal (default 644).
    pub mode: Option<String>,
}

/// A file transfer over a WebSocket. Upload: after `opened`, the client sends the bytes as
/// binary frames, then `{"type":"eof"}`; the server answers `done` with the size and SHA-256
/// once the device has checked the file and renamed it into place. Download: `opened`, `meta`
/// with the size, the bytes, then `done`. Any failure is an `error` frame; an upload cut short
/// leaves nothing on the device.
#[utoipa::path(get, path = "/api/v1/devices/{id}/files", tag = "remote", params(("id" = String, Path), FilesQuery),
    responses((status = 101, description = "WebSocket of the transfer"), (status = 400, body = ErrorBody),
              (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn files(
    State(s): State<AppState>,
    p: Principal,
    headers: HeaderMap,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<FilesQuery>,
    ws: WebSocketUpgrade,
) -> AppResult<Response> {
    check_origin(&headers)?;
    remote::check_path(&q.path).map_err(AppError::BadRequest)?;
    let direction = match q.op.as_str() {
        "upload" => FileDirection::Upload,
        "download" => FileDirection::Download,
        other => return Err(AppError::BadRequest(format!("op must be upload or download, not {other:?}"))),
    };
    let mode = match q.mode.as_deref() {
        None => None,
        Some(m) => Some(
            u32::from_str_radix(m, 8)
                .ok()
                .filter(|m| *m <= 0o7777)
                .ok_or_else(|| AppError::BadRequest(format!("mode {m:?} must be octal permission bits, e.g. 644")))?,
        ),
    };
    let params = FileParams { direction, path: q.path.clone(), size: q.size, sha256: q.sha256.clone(), mode };
    if direction == FileDirection::Upload {
        let check = RemoteCommand::open_files("check", params.clone()).check();
        check.map_err(|e| AppError::BadRequest(e.replace("an upload needs", "an upload needs the query parameter")))?;
    }
    let detail = match direction {
        FileDirection::Upload => format!("upload {} ({} bytes)", q.path, q.size.unwrap_or(0)),
        FileDirection::Download => format!("download {}", q.path),
    };
    start(s, p, ws, &id, SessionKind::Files, detail, move |session, _| {
        let mode = match direction {
            FileDirection::Upload => relay::Mode::Upload { size: params.size.unwrap_or(0) },
            FileDirection::Download => relay::Mode::Download,
        };
        (RemoteCommand::open_files(session, params), mode)
    })
    .await
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ForwardQuery {
    /// The host to reach from the device (e.g. 127.0.0.1).
    pub host: String,
    pub port: u16,
}

/// TCP connections from the device to `host:port`, multiplexed on one WebSocket: each binary
/// frame is a 4-byte connection id, a kind byte (1 open, 2 data, 3 eof, 4 reset, 5 credit),
/// then its payload; each connection starts with 256 KiB of credit each way
/// (`docs/remote-access.md`).
#[utoipa::path(get, path = "/api/v1/devices/{id}/forward", tag = "remote", params(("id" = String, Path), ForwardQuery),
    responses((status = 101, description = "WebSocket of the forward session"), (status = 400, body = ErrorBody),
              (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn forward(
    State(s): State<AppState>,
    p: Principal,
    headers: HeaderMap,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<ForwardQuery>,
    ws: WebSocketUpgrade,
) -> AppResult<Response> {
    check_origin(&headers)?;
    let target =
        if q.host.contains(':') { format!("[{}]:{}", q.host, q.port) } else { format!("{}:{}", q.host, q.port) };
    remote::Target::parse(&target).map_err(AppError::BadRequest)?;
    start(s, p, ws, &id, SessionKind::Forward, format!("to {target}"), move |session, _| {
        (RemoteCommand::open_forward(session, Some(&target)), relay::Mode::Forward { target: target.clone() })
    })
    .await
}

#[utoipa::path(get, path = "/api/v1/remote-sessions", tag = "remote", params(SessionListQuery),
    responses((status = 200, body = inline(drover_proto::api::Page<RemoteSession>), description = "Newest first"), (status = 400, body = ErrorBody)))]
async fn list_sessions(
    State(s): State<AppState>,
    p: Principal,
    ApiQuery(q): ApiQuery<SessionListQuery>,
) -> AppResult<axum::Json<drover_proto::api::Page<RemoteSession>>> {
    Ok(axum::Json(sessions::list(&s.db, &p, &q).await?))
}

#[utoipa::path(get, path = "/api/v1/remote-sessions/{id}", tag = "remote", params(("id" = String, Path)),
    responses((status = 200, body = RemoteSession), (status = 404, body = ErrorBody)))]
async fn get_session(
    State(s): State<AppState>,
    p: Principal,
    ApiPath(id): ApiPath<String>,
) -> AppResult<axum::Json<RemoteSession>> {
    Ok(axum::Json(sessions::get(&s.db, &p, &id).await?))
}

/// The asciicast v2 recording of a terminal session (operators and admins).
#[utoipa::path(get, path = "/api/v1/remote-sessions/{id}/recording", tag = "remote", params(("id" = String, Path)),
    responses((status = 200, content_type = "application/x-asciicast", description = "asciicast v2"), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn get_recording(State(s): State<AppState>, p: Principal, ApiPath(id): ApiPath<String>) -> AppResult<Response> {
    let cast = sessions::recording(&s.db, &p, &id).await?;
    Ok(([(header::CONTENT_TYPE, "application/x-asciicast")], cast).into_response())
}

#[utoipa::path(get, path = "/api/v1/remote-settings", tag = "remote", responses((status = 200, body = RemoteSettings)))]
async fn get_settings(State(s): State<AppState>, p: Principal) -> AppResult<axum::Json<RemoteSettings>> {
    Ok(axum::Json(sessions::settings(&s.db, &p).await?))
}

/// Turns the recording of terminal sessions on or off for the organization (admins; audited).
#[utoipa::path(put, path = "/api/v1/remote-settings", tag = "remote", request_body = RemoteSettings,
    responses((status = 200, body = RemoteSettings), (status = 403, body = ErrorBody)))]
async fn put_settings(
    State(s): State<AppState>,
    p: Principal,
    ApiJson(req): ApiJson<RemoteSettings>,
) -> AppResult<axum::Json<RemoteSettings>> {
    Ok(axum::Json(sessions::set_settings(&s.db, &p, req).await?))
}
