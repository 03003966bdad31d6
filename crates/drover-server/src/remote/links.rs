//! Web UI sessions in the database (`super::web`): what any replica needs to serve a
//! capability path — the session, its target, when it was last used and when it must end —
//! and the SHA-256 of each capability token (never the token itself).
//!
//! A web UI session belongs to no replica. Each replica that gets a request for it opens a
//! forward session of its own on the device (a leg) and adds that leg's bytes to the
//! session's row when the leg ends; the session itself ends once, whoever notices first:
//! closed by an operator, idle (no request through any replica for the idle timeout), at its
//! maximum duration, or ended by the device.

use crate::audit::{self, Event};
use crate::auth::Principal;
use crate::db::Db;
use crate::error::AppResult;
use crate::time::now_ms;

use super::sessions::Opened;

/// Schema version 11, the same on both engines.
pub const MIGRATION_11: &str = "CREATE TABLE remote_web (
    session_id TEXT PRIMARY KEY REFERENCES remote_sessions(id),
    target TEXT NOT NULL,
    idle_ms BIGINT NOT NULL,
    ends_at BIGINT NOT NULL,
    used_at BIGINT NOT NULL
);
CREATE TABLE remote_web_links (
    token_hash TEXT PRIMARY KEY,
    session_id TEXT NOT NULL REFERENCES remote_web(session_id),
    created_at BIGINT NOT NULL
);
CREATE INDEX remote_web_links_session ON remote_web_links (session_id);";

/// An open web UI session, as a replica serving it needs it.
#[derive(Debug, Clone)]
pub struct Link {
    pub session_id: String,
    pub org_id: String,
    pub device_id: String,
    /// `host:port` on the device's side.
    pub target: String,
    pub actor_id: String,
    pub actor_name: String,
    pub started_at: i64,
    /// The last request through any replica (kept to within a couple of seconds).
    pub used_at: i64,
    pub idle_ms: i64,
    pub ends_at: i64,
}

impl Link {
    /// Why the session must end at `now`, if it must: idle through every replica, or at
    /// its maximum duration.
    pub fn expired(&self, now: i64) -> Option<String> {
        if now >= self.ends_at {
            return Some(self.max_duration_reason());
        }
        if now >= self.used_at + self.idle_ms {
            return Some(format!("idle-timeout: no request for {} s", self.idle_ms / 1000));
        }
        None
    }

    pub fn max_duration_reason(&self) -> String {
        let max = (self.ends_at - self.started_at) / 1000;
        format!("max-duration: the session reached its maximum duration of {max} s")
    }
}

type Row = (String, String, String, String, String, String, i64, i64, i64, i64);

const SELECT: &str = "SELECT w.session_id, s.org_id, s.device_id, w.target, s.actor_id, s.actor_name, \
                      s.started_at, w.used_at, w.idle_ms, w.ends_at \
                      FROM remote_web w JOIN remote_sessions s ON s.id = w.session_id";

fn to_link(r: Row) -> Link {
    Link {
        session_id: r.0,
        org_id: r.1,
        device_id: r.2,
        target: r.3,
        actor_id: r.4,
        actor_name: r.5,
        started_at: r.6,
        used_at: r.7,
        idle_ms: r.8,
        ends_at: r.9,
    }
}

/// Makes a forward session a web UI session with its first capability token.
pub async fn create(
    db: &Db,
    opened: &Opened,
    target: &str,
    idle_ms: i64,
    max_ms: i64,
    token_hash: &str,
) -> AppResult<()> {
    let now = now_ms();
    let mut tx = db.begin_write().await?;
    sqlx::query("INSERT INTO remote_web (session_id, target, idle_ms, ends_at, used_at) VALUES ($1, $2, $3, $4, $5)")
        .bind(opened.id.clone())
        .bind(target.to_string())
        .bind(idle_ms)
        .bind(now.saturating_add(max_ms))
        .bind(now)
        .execute(tx.conn())
        .await?;
    sqlx::query("INSERT INTO remote_web_links (token_hash, session_id, created_at) VALUES ($1, $2, $3)")
        .bind(token_hash.to_string())
        .bind(opened.id.clone())
        .bind(now)
        .execute(tx.conn())
        .await?;
    tx.commit().await?;
    Ok(())
}

/// One more capability token for an open session (its opener lost the first one's tab, or
/// asks from another replica's page), audited.
pub async fn add_token(db: &Db, p: &Principal, link: &Link, token_hash: &str) -> AppResult<()> {
    let mut tx = db.begin_write().await?;
    sqlx::query("INSERT INTO remote_web_links (token_hash, session_id, created_at) VALUES ($1, $2, $3)")
        .bind(token_hash.to_string())
        .bind(link.session_id.clone())
        .bind(now_ms())
        .execute(tx.conn())
        .await?;
    let summary =
        format!("new address for web UI session {} on device {} ({})", link.session_id, link.device_id, link.target);
    audit::append(
        tx.conn(),
        Event { actor: p, action: "remote.link", target_kind: "device", target_id: &link.device_id, summary },
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

/// The open session a token belongs to.
pub async fn find(db: &Db, token_hash: &str) -> AppResult<Option<Link>> {
    let row: Option<Row> = sqlx::query_as(&format!(
        "{SELECT} JOIN remote_web_links l ON l.session_id = w.session_id \
         WHERE l.token_hash = $1 AND s.ended_at IS NULL"
    ))
    .bind(token_hash.to_string())
    .fetch_optional(db.pool())
    .await?;
    Ok(row.map(to_link))
}

/// An open web UI session of the organization.
pub async fn get_open(db: &Db, org: &str, session_id: &str) -> AppResult<Option<Link>> {
    let row: Option<Row> =
        sqlx::query_as(&format!("{SELECT} WHERE s.org_id = $1 AND w.session_id = $2 AND s.ended_at IS NULL"))
            .bind(org.to_string())
            .bind(session_id.to_string())
            .fetch_optional(db.pool())
            .await?;
    Ok(row.map(to_link))
}

/// The open web UI sessions on a device, oldest first.
pub async fn open_on_device(db: &Db, org: &str, device: &str) -> AppResult<Vec<Link>> {
    let rows: Vec<Row> = sqlx::query_as(&format!(
        "{SELECT} WHERE s.org_id = $1 AND s.device_id = $2 AND s.ended_at IS NULL ORDER BY s.started_at, s.id"
    ))
    .bind(org.to_string())
    .bind(device.to_string())
    .fetch_all(db.pool())
    .await?;
    Ok(rows.into_iter().map(to_link).collect())
}

/// Whether the session is still open.
pub async fn is_open(db: &Db, session_id: &str) -> AppResult<bool> {
    let row: Option<(i64,)> =
        sqlx::query_as("SELECT started_at FROM remote_sessions WHERE id = $1 AND ended_at IS NULL")
            .bind(session_id.to_string())
            .fetch_optional(db.pool())
            .await?;
    Ok(row.is_some())
}

/// Records a request through a replica at `at`.
pub async fn touch(db: &Db, session_id: &str, at: i64) -> AppResult<()> {
    let mut tx = db.begin_write().await?;
    sqlx::query("UPDATE remote_web SET used_at = $1 WHERE session_id = $2 AND used_at < $1")
        .bind(at)
        .bind(session_id.to_string())
        .execute(tx.conn())
        .await?;
    tx.commit().await?;
    Ok(())
}

/// Adds a leg's bytes to the session's row (also after the session's end: a replica's leg
/// reports when it closes).
pub async fn add_bytes(db: &Db, session_id: &str, bytes_in: i64, bytes_out: i64) -> AppResult<()> {
    if bytes_in == 0 && bytes_out == 0 {
        return Ok(());
    }
    let mut tx = db.begin_write().await?;
    sqlx::query("UPDATE remote_sessions SET bytes_in = bytes_in + $1, bytes_out = bytes_out + $2 WHERE id = $3")
        .bind(bytes_in)
        .bind(bytes_out)
        .bind(session_id.to_string())
        .execute(tx.conn())
        .await?;
    tx.commit().await?;
    Ok(())
}

/// Ends the session (once; false when it had already ended), forgets its tokens and audits
/// the end as `p`'s with the bytes recorded so far.
pub async fn end(db: &Db, p: &Principal, link: &Link, reason: &str) -> AppResult<bool> {
    let mut tx = db.begin_write().await?;
    let done =
        sqlx::query("UPDATE remote_sessions SET ended_at = $1, end_reason = $2 WHERE id = $3 AND ended_at IS NULL")
            .bind(now_ms())
            .bind(reason.to_string())
            .bind(link.session_id.clone())
            .execute(tx.conn())
            .await?;
    if done.rows_affected() == 0 {
        return Ok(false);
    }
    sqlx::query("DELETE FROM remote_web_links WHERE session_id = $1")
        .bind(link.session_id.clone())
        .execute(tx.conn())
        .await?;
    let (bytes_in, bytes_out): (i64, i64) =
        sqlx::query_as("SELECT bytes_in, bytes_out FROM remote_sessions WHERE id = $1")
            .bind(link.session_id.clone())
            .fetch_one(tx.conn())
            .await?;
    let summary = format!(
        "session {} on device {} ended ({reason}): {bytes_in} bytes from the device, {bytes_out} bytes to it \
         (a replica still connected adds its bytes to the session as it closes)",
        link.session_id, link.device_id
    );
    audit::append(
        tx.conn(),
        Event { actor: p, action: "remote.close", target_kind: "device", target_id: &link.device_id, summary },
    )
    .await?;
    tx.commit().await?;
    Ok(true)
}

/// Ends the web UI sessions idle through every replica or past their maximum duration at
/// `now`, as droverd's own; any replica may run it. Returns how many it ended.
pub async fn expire(db: &Db, now: i64) -> AppResult<usize> {
    let rows: Vec<Row> = sqlx::query_as(&format!(
        "{SELECT} WHERE s.ended_at IS NULL AND (w.ends_at <= $1 OR w.used_at + w.idle_ms <= $1) LIMIT 1000"
    ))
    .bind(now)
    .fetch_all(db.pool())
    .await?;
    let mut ended = 0;
    for link in rows.into_iter().map(to_link) {
        let Some(reason) = link.expired(now) else { continue };
        if end(db, &Principal::system(Some(&link.org_id)), &link, &reason).await? {
            ended += 1;
        }
    }
    Ok(ended)
}
