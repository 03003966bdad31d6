//! The remote-session table, the organization's recording setting and terminal recordings:
//! every session is a row from the moment it is allowed (who, device, kind, start) to its end
//! (end, bytes each way, why it ended), and both moments are in the audit log, each in the
//! same transaction as the row's change.

use crate::db::{Bind, Filter, bind_all};
use crate::page::{CursorValue, PageRequest, SortField};
use drover_proto::api::Page;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use drover_proto::api::Role;

use crate::audit::{self, Event};
use crate::auth::Principal;
use crate::db::Db;
use crate::error::{AppError, AppResult};
use crate::time::{now_ms, opt_rfc3339, to_rfc3339};

/// Schema version 8, the same on both engines (BIGINT is an integer to SQLite).
pub const MIGRATION_8: &str = r#"
CREATE TABLE remote_sessions (
    id TEXT PRIMARY KEY,
    org_id TEXT NOT NULL REFERENCES organizations(id),
    device_id TEXT NOT NULL REFERENCES devices(id),
    actor_kind TEXT NOT NULL,
    actor_id TEXT NOT NULL,
    actor_name TEXT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('terminal', 'files', 'forward')),
    detail TEXT NOT NULL,
    started_at BIGINT NOT NULL,
    ended_at BIGINT,
    bytes_in BIGINT NOT NULL DEFAULT 0,
    bytes_out BIGINT NOT NULL DEFAULT 0,
    end_reason TEXT,
    recording BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX remote_sessions_org_started ON remote_sessions (org_id, started_at, id);
CREATE INDEX remote_sessions_device_started ON remote_sessions (device_id, started_at);
CREATE TABLE remote_recordings (
    session_id TEXT PRIMARY KEY REFERENCES remote_sessions(id),
    org_id TEXT NOT NULL REFERENCES organizations(id),
    size BIGINT NOT NULL,
    truncated BIGINT NOT NULL,
    cast_text TEXT NOT NULL
);
CREATE TABLE remote_settings (
    org_id TEXT PRIMARY KEY REFERENCES organizations(id),
    recording BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    updated_by TEXT NOT NULL
);
"#;

/// Schema version 10: when a droverd relaying the session last vouched for it, so that a
/// session whose droverd stopped without ending it can be ended as lost.
/// The partial index keeps the sweep for lost sessions to the open ones.
pub const MIGRATION_10: &str = "ALTER TABLE remote_sessions ADD COLUMN alive_at BIGINT;
CREATE INDEX remote_sessions_open ON remote_sessions (started_at) WHERE ended_at IS NULL;";

/// The largest recording kept for one terminal session; output beyond it is not recorded
/// (the recording says so) but the session goes on.
pub const MAX_RECORDING_BYTES: usize = 16 * 1024 * 1024;

/// What a session does on the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum SessionKind {
    Terminal,
    Files,
    Forward,
}

impl SessionKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SessionKind::Terminal => "terminal",
            SessionKind::Files => "files",
            SessionKind::Forward => "forward",
        }
    }

    fn parse(s: &str) -> SessionKind {
        match s {
            "terminal" => SessionKind::Terminal,
            "files" => SessionKind::Files,
            _ => SessionKind::Forward,
        }
    }
}

/// One remote session, as `GET /api/v1/remote-sessions` lists it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RemoteSession {
    pub id: String,
    pub device_id: String,
    /// `user`, `token` or `system`.
    pub actor_kind: String,
    pub actor_id: String,
    pub actor_name: String,
    pub kind: SessionKind,
    /// What was asked for: the terminal size, the file and direction, the forwarded address.
    pub detail: String,
    pub started_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_at: Option<String>,
    /// Bytes from the device to the operator.
    pub bytes_in: i64,
    /// Bytes from the operator to the device.
    pub bytes_out: i64,
    /// Why it ended (`closed`, `exit 0`, `idle timeout`, `max duration`, `device: …`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_reason: Option<String>,
    /// A recording of this terminal session exists (`GET …/remote-sessions/{id}/recording`).
    pub recorded: bool,
}

#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct SessionListQuery {
    /// Only this device's sessions.
    pub device: Option<String>,
    /// Page size, newest first (default 100, at most 500).
    pub limit: Option<u32>,
    pub cursor: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RemoteSettings {
    /// Terminal sessions of this organization are recorded (asciicast v2).
    pub recording: bool,
}

type Row = (String, String, String, String, String, String, String, i64, Option<i64>, i64, i64, Option<String>, i64);

const COLUMNS: &str = "id, device_id, actor_kind, actor_id, actor_name, kind, detail, started_at, ended_at, \
                       bytes_in, bytes_out, end_reason, recording";

fn to_session(r: Row) -> RemoteSession {
    RemoteSession {
        id: r.0,
        device_id: r.1,
        actor_kind: r.2,
        actor_id: r.3,
        actor_name: r.4,
        kind: SessionKind::parse(&r.5),
        detail: r.6,
        started_at: to_rfc3339(r.7),
        ended_at: opt_rfc3339(r.8),
        bytes_in: r.9,
        bytes_out: r.10,
        end_reason: r.11,
        recorded: r.12 != 0,
    }
}

/// A session the caller may open now: the row exists and its start is audited.
#[derive(Debug, Clone)]
pub struct Opened {
    pub id: String,
    pub org_id: String,
    pub device_id: String,
    pub recording: bool,
}

/// Checks that the caller may open a session of `kind` on `device_id` (operator role, the
/// device accepted in the caller's organization), then records the session's start.
pub async fn open(db: &Db, p: &Principal, device_id: &str, kind: SessionKind, detail: &str) -> AppResult<Opened> {
    p.require(Role::Operator, "opening a remote session")?;
    let mut tx = db.begin_write().await?;
    let status: Option<(String, i64)> =
        sqlx::query_as("SELECT status, online FROM devices WHERE org_id = $1 AND id = $2")
            .bind(p.org().to_string())
            .bind(device_id.to_string())
            .fetch_optional(tx.conn())
            .await?;
    match status {
        None => return Err(AppError::NotFound(format!("no device with id {device_id:?}"))),
        Some((s, _)) if s != "accepted" => {
            return Err(AppError::Conflict(format!("device {device_id} is {s}, not accepted: no remote access")));
        }
        Some((_, 0)) => {
            return Err(AppError::Conflict(format!(
                "device {device_id} is offline: remote access needs the device connected"
            )));
        }
        Some(_) => {}
    }
    let recording = kind == SessionKind::Terminal && recording_on(tx.conn(), p.org()).await?;
    let id = crate::ops::new_id();
    sqlx::query(
        "INSERT INTO remote_sessions (id, org_id, device_id, actor_kind, actor_id, actor_name, kind, detail, \
         started_at, recording) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
    )
    .bind(id.clone())
    .bind(p.org().to_string())
    .bind(device_id.to_string())
    .bind(p.kind.as_str().to_string())
    .bind(p.id.clone())
    .bind(p.name.clone())
    .bind(kind.as_str().to_string())
    .bind(detail.to_string())
    .bind(now_ms())
    .bind(i64::from(recording))
    .execute(tx.conn())
    .await?;
    let summary = format!(
        "{} session {id} opened on device {device_id} ({detail}){}",
        kind.as_str(),
        if recording { ", recorded" } else { "" }
    );
    audit::append(
        tx.conn(),
        Event { actor: p, action: "remote.open", target_kind: "device", target_id: device_id, summary },
    )
    .await?;
    tx.commit().await?;
    Ok(Opened { id, org_id: p.org().to_string(), device_id: device_id.to_string(), recording })
}

/// How a session ended, with its byte counts and, for a recorded terminal, the recording.
#[derive(Debug, Clone, Default)]
pub struct Ending {
    pub reason: String,
    pub bytes_in: i64,
    pub bytes_out: i64,
    pub recording: Option<(String, bool)>,
}

/// Records the end of a session (once; a second call changes nothing) and audits it.
pub async fn close(db: &Db, p: &Principal, s: &Opened, end: Ending) -> AppResult<()> {
    let mut tx = db.begin_write().await?;
    let done = sqlx::query(
        "UPDATE remote_sessions SET ended_at = $1, bytes_in = $2, bytes_out = $3, end_reason = $4 \
         WHERE id = $5 AND ended_at IS NULL",
    )
    .bind(now_ms())
    .bind(end.bytes_in)
    .bind(end.bytes_out)
    .bind(end.reason.clone())
    .bind(s.id.clone())
    .execute(tx.conn())
    .await?;
    if done.rows_affected() == 0 {
        return Ok(());
    }
    let mut recorded = "";
    if let Some((cast, truncated)) = end.recording {
        sqlx::query(
            "INSERT INTO remote_recordings (session_id, org_id, size, truncated, cast_text) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(s.id.clone())
        .bind(s.org_id.clone())
        .bind(cast.len() as i64)
        .bind(i64::from(truncated))
        .bind(cast)
        .execute(tx.conn())
        .await?;
        recorded = ", recording kept";
    } else if s.recording {
        sqlx::query("UPDATE remote_sessions SET recording = 0 WHERE id = $1")
            .bind(s.id.clone())
            .execute(tx.conn())
            .await?;
    }
    let summary = format!(
        "session {} on device {} ended ({}): {} bytes from the device, {} bytes to it{recorded}",
        s.id, s.device_id, end.reason, end.bytes_in, end.bytes_out
    );
    audit::append(
        tx.conn(),
        Event { actor: p, action: "remote.close", target_kind: "device", target_id: &s.device_id, summary },
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

/// Marks the sessions this droverd relays as alive at `now`.
pub async fn keep_alive(db: &Db, ids: &[String], now: i64) -> AppResult<()> {
    if ids.is_empty() {
        return Ok(());
    }
    let mut tx = db.begin_write().await?;
    for id in ids {
        sqlx::query("UPDATE remote_sessions SET alive_at = $1 WHERE id = $2 AND ended_at IS NULL")
            .bind(now)
            .bind(id.clone())
            .execute(tx.conn())
            .await?;
    }
    tx.commit().await?;
    Ok(())
}

/// Ends every open session no droverd has vouched for since `now - lost_after_ms` — its
/// droverd stopped without ending it — as `lost`, at the last moment it was known alive, and
/// audits each end as droverd's own. Any replica may run it: each row is ended once. Returns
/// how many were ended.
pub async fn close_lost(db: &Db, now: i64, lost_after_ms: i64) -> AppResult<usize> {
    let cutoff = now - lost_after_ms;
    let rows: Vec<(String, String, String, i64)> = sqlx::query_as(
        "SELECT id, org_id, device_id, COALESCE(alive_at, started_at) FROM remote_sessions \
         WHERE ended_at IS NULL AND COALESCE(alive_at, started_at) < $1 \
         AND NOT EXISTS (SELECT 1 FROM remote_web w WHERE w.session_id = remote_sessions.id) LIMIT 1000",
    )
    .bind(cutoff)
    .fetch_all(db.pool())
    .await?;
    let mut ended = 0;
    for (id, org, device, last) in rows {
        let mut tx = db.begin_write().await?;
        let done = sqlx::query(
            "UPDATE remote_sessions SET ended_at = $1, end_reason = 'lost' \
             WHERE id = $2 AND ended_at IS NULL AND COALESCE(alive_at, started_at) < $3",
        )
        .bind(last)
        .bind(id.clone())
        .bind(cutoff)
        .execute(tx.conn())
        .await?;
        if done.rows_affected() == 0 {
            continue;
        }
        let system = Principal::system(Some(&org));
        let summary = format!(
            "session {id} on device {device} ended (lost): the droverd relaying it stopped without ending it; \
             last known alive {}",
            to_rfc3339(last)
        );
        audit::append(
            tx.conn(),
            Event { actor: &system, action: "remote.close", target_kind: "device", target_id: &device, summary },
        )
        .await?;
        tx.commit().await?;
        ended += 1;
    }
    Ok(ended)
}

const SORTS: &[SortField] = &[SortField { name: "started_at", column: "started_at", int: true }];

/// Sessions, newest first, a page at a time.
pub async fn list(db: &Db, p: &Principal, q: &SessionListQuery) -> AppResult<Page<RemoteSession>> {
    p.require(Role::Viewer, "reading remote sessions")?;
    let page = PageRequest::parse(Some(q.limit.unwrap_or(100)), q.cursor.as_deref(), None, SORTS, "-started_at")?;
    let mut f = Filter::default();
    f.and("org_id = ?", [Bind::Text(p.org().to_string())]);
    if let Some(device) = &q.device {
        f.and("device_id = ?", [Bind::Text(device.clone())]);
    }
    page.apply(&mut f, Some("id"));
    let sql = format!("SELECT {COLUMNS} FROM remote_sessions{}{}", f.sql(), page.order_limit(Some("id")));
    let rows: Vec<Row> = bind_all(sqlx::query_as(&sql), &f.binds).fetch_all(db.pool()).await?;
    let (rows, next_cursor) = page.finish(rows, |r| (CursorValue::Int(r.7), Some(r.0.clone())));
    Ok(Page { items: rows.into_iter().map(to_session).collect(), next_cursor })
}

pub async fn get(db: &Db, p: &Principal, id: &str) -> AppResult<RemoteSession> {
    p.require(Role::Viewer, "reading remote sessions")?;
    let row: Option<Row> =
        sqlx::query_as(&format!("SELECT {COLUMNS} FROM remote_sessions WHERE org_id = $1 AND id = $2"))
            .bind(p.org().to_string())
            .bind(id.to_string())
            .fetch_optional(db.pool())
            .await?;
    row.map(to_session).ok_or_else(|| AppError::NotFound(format!("no remote session with id {id:?}")))
}

/// A terminal session's recording (asciicast v2). Recordings show everything typed and
/// shown, so reading one needs the operator role, like opening a terminal.
pub async fn recording(db: &Db, p: &Principal, id: &str) -> AppResult<String> {
    p.require(Role::Operator, "replaying terminal recordings")?;
    let row: Option<(String,)> =
        sqlx::query_as("SELECT cast_text FROM remote_recordings WHERE org_id = $1 AND session_id = $2")
            .bind(p.org().to_string())
            .bind(id.to_string())
            .fetch_optional(db.pool())
            .await?;
    row.map(|r| r.0).ok_or_else(|| AppError::NotFound(format!("no recording of session {id:?}")))
}

async fn recording_on(conn: &mut sqlx::AnyConnection, org: &str) -> AppResult<bool> {
    let row: Option<(i64,)> = sqlx::query_as("SELECT recording FROM remote_settings WHERE org_id = $1")
        .bind(org.to_string())
        .fetch_optional(conn)
        .await?;
    Ok(row.is_some_and(|r| r.0 != 0))
}

pub async fn settings(db: &Db, p: &Principal) -> AppResult<RemoteSettings> {
    p.require(Role::Viewer, "reading remote access settings")?;
    let mut conn = db.pool().acquire().await?;
    Ok(RemoteSettings { recording: recording_on(&mut conn, p.org()).await? })
}

/// Turns the recording of terminal sessions on or off (admins only).
pub async fn set_settings(db: &Db, p: &Principal, req: RemoteSettings) -> AppResult<RemoteSettings> {
    p.require(Role::Admin, "changing remote access settings")?;
    let mut tx = db.begin_write().await?;
    let before = recording_on(tx.conn(), p.org()).await?;
    if before != req.recording {
        sqlx::query("DELETE FROM remote_settings WHERE org_id = $1")
            .bind(p.org().to_string())
            .execute(tx.conn())
            .await?;
        sqlx::query("INSERT INTO remote_settings (org_id, recording, updated_at, updated_by) VALUES ($1, $2, $3, $4)")
            .bind(p.org().to_string())
            .bind(i64::from(req.recording))
            .bind(now_ms())
            .bind(p.name.clone())
            .execute(tx.conn())
            .await?;
        let summary = format!("recording of terminal sessions turned {}", if req.recording { "on" } else { "off" });
        audit::append(
            tx.conn(),
            Event { actor: p, action: "remote.settings", target_kind: "organization", target_id: p.org(), summary },
        )
        .await?;
    }
    tx.commit().await?;
    Ok(req)
}
