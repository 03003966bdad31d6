//! Logs on demand: `POST /api/v1/devices/{id}/logs` records the request (audited), sends
//! `down/logs` and polls the `log_requests` row until the answer is stored — by whichever
//! replica the device's `up/logs` reached — or the timeout passes.

use std::time::Duration;

use drover_proto::api::Role;
use drover_proto::device::{Channel, PROTOCOL_VERSION};
use drover_proto::telemetry::{LogsReply, LogsRequest, MAX_LOG_LINES};
use serde::{Deserialize, Serialize};

use crate::audit::{self, Event};
use crate::auth::Principal;
use crate::db::Db;
use crate::engine::Outgoing;
use crate::error::{AppError, AppResult};
use crate::time::now_ms;

use super::ingest::Ingest;

/// Longest wait for an answer, in seconds.
pub const MAX_TIMEOUT_S: u64 = 120;
const DEFAULT_TIMEOUT_S: u64 = 15;
const POLL: Duration = Duration::from_millis(200);

/// What to fetch from the device.
#[derive(Debug, Clone, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LogsQuery {
    /// `journal`, or `file:NAME` with a name the device's configuration allows.
    pub source: String,
    /// Newest lines wanted (1 to 10,000; default 100).
    #[serde(default)]
    pub lines: Option<u32>,
    /// Seconds to wait for the device (default 15, at most 120).
    #[serde(default)]
    pub timeout_s: Option<u64>,
}

/// The device's answer.
#[derive(Debug, Clone, Deserialize, Serialize, utoipa::ToSchema)]
pub struct LogsAnswer {
    pub request: String,
    pub device_id: String,
    pub source: String,
    /// False when the device did not answer in time (the answer may still arrive: `GET
    /// /api/v1/devices/{id}/logs/{request}`).
    pub answered: bool,
    pub lines: Vec<String>,
    /// The device had more lines than fit in one answer; these are the newest.
    pub truncated: bool,
    /// Why the device could not answer (source not allowed, file missing…).
    pub error: Option<String>,
}

type Row = (String, String, Option<i64>, Option<String>, i64, Option<String>);

async fn fetch(db: &Db, org_id: &str, device_id: &str, request: &str) -> AppResult<Option<LogsAnswer>> {
    let row: Option<Row> = sqlx::query_as(
        "SELECT device_id, source, answered_at, lines, truncated, error FROM log_requests \
         WHERE id = $1 AND org_id = $2 AND device_id = $3",
    )
    .bind(request.to_string())
    .bind(org_id.to_string())
    .bind(device_id.to_string())
    .fetch_optional(db.pool())
    .await?;
    Ok(row.map(|(device_id, source, answered_at, lines, truncated, error)| LogsAnswer {
        request: request.to_string(),
        device_id,
        source,
        answered: answered_at.is_some(),
        lines: lines.and_then(|l| serde_json::from_str(&l).ok()).unwrap_or_default(),
        truncated: truncated != 0,
        error,
    }))
}

/// A stored answer (or the pending request).
pub async fn get(db: &Db, p: &Principal, device_id: &str, request: &str) -> AppResult<LogsAnswer> {
    p.require(Role::Operator, "reading device logs")?;
    fetch(db, p.org(), device_id, request)
        .await?
        .ok_or_else(|| AppError::NotFound(format!("no log request {request:?} for device {device_id:?}")))
}

/// Asks the device for logs and waits for its answer.
pub async fn request(db: &Db, ingest: &Ingest, p: &Principal, device_id: &str, q: LogsQuery) -> AppResult<LogsAnswer> {
    p.require(Role::Operator, "reading device logs")?;
    let lines = q.lines.unwrap_or(100);
    let timeout = q.timeout_s.unwrap_or(DEFAULT_TIMEOUT_S);
    if timeout == 0 || timeout > MAX_TIMEOUT_S {
        return Err(AppError::BadRequest(format!("timeout_s must be 1 to {MAX_TIMEOUT_S}")));
    }
    if lines == 0 || lines > MAX_LOG_LINES {
        return Err(AppError::BadRequest(format!("lines must be 1 to {MAX_LOG_LINES}")));
    }
    let id = uuid::Uuid::now_v7().simple().to_string();
    let msg = LogsRequest { v: PROTOCOL_VERSION, request: id.clone(), source: q.source.clone(), lines };
    msg.check().map_err(|e| AppError::BadRequest(format!("invalid logs request: {e}")))?;
    let device: Option<(String, i64)> =
        sqlx::query_as("SELECT status, online FROM devices WHERE org_id = $1 AND id = $2")
            .bind(p.org().to_string())
            .bind(device_id.to_string())
            .fetch_optional(db.pool())
            .await?;
    match device {
        None => return Err(AppError::NotFound(format!("no device with id {device_id:?}"))),
        Some((status, _)) if status != "accepted" => {
            return Err(AppError::Conflict(format!("device {device_id:?} is {status}, not accepted")));
        }
        Some((_, 0)) => return Err(AppError::Conflict(format!("device {device_id:?} is offline"))),
        Some(_) => {}
    }
    let mut tx = db.begin_write().await?;
    sqlx::query(
        "INSERT INTO log_requests (id, org_id, device_id, source, lines_wanted, requested_by, requested_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(id.clone())
    .bind(p.org().to_string())
    .bind(device_id.to_string())
    .bind(q.source.clone())
    .bind(i64::from(lines))
    .bind(p.name.clone())
    .bind(now_ms())
    .execute(tx.conn())
    .await?;
    let summary = format!("asked for {lines} log line(s) from {}", q.source);
    audit::append(
        tx.conn(),
        Event { actor: p, action: "device.logs", target_kind: "device", target_id: device_id, summary },
    )
    .await?;
    tx.commit().await?;
    let out = Outgoing {
        topic: drover_proto::device::topic(device_id, Channel::LogsRequest),
        payload: serde_json::to_vec(&msg).unwrap_or_default(),
    };
    if !ingest.send(out) {
        return Err(AppError::Conflict("this server has no connection to the devices' broker right now".into()));
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(timeout);
    loop {
        if let Some(a) = fetch(db, p.org(), device_id, &id).await?
            && (a.answered || tokio::time::Instant::now() >= deadline)
        {
            return Ok(a);
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Stores a device's `up/logs` answer to its own pending request (any other is ignored).
pub async fn record_answer(db: &Db, device_id: &str, r: &LogsReply) -> AppResult<()> {
    let mut tx = db.begin_write().await?;
    let n = sqlx::query(
        "UPDATE log_requests SET answered_at = $1, lines = $2, truncated = $3, error = $4 \
         WHERE id = $5 AND device_id = $6 AND answered_at IS NULL",
    )
    .bind(now_ms())
    .bind(serde_json::to_string(&r.lines).unwrap_or_else(|_| "[]".into()))
    .bind(i64::from(r.truncated))
    .bind(r.error.clone())
    .bind(r.request.clone())
    .bind(device_id.to_string())
    .execute(tx.conn())
    .await?
    .rows_affected();
    tx.commit().await?;
    if n == 0 {
        tracing::debug!(device_id, request = r.request, "logs answer to no pending request of this device, ignored");
    }
    Ok(())
}
