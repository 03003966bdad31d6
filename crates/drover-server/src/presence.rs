//! What devices tell the server about themselves over MQTT: presence (online/offline),
//! the agent's hello, inventory attributes and heartbeats. The MQTT ingest calls these; the
//! broker asks [`device_may_connect`] on every CONNECT.
//!
//! This is device telemetry, not a user's action: nothing here is audited. Changes that
//! matter to an operator (connected, disconnected, rebooted, inventory changed) become
//! device events, kept to the newest [`MAX_EVENTS_PER_DEVICE`] per device.
//!
//! Traffic of an unknown, pending, rejected or decommissioned device is ignored (`Ok`):
//! only accepted devices have presence.

use std::collections::BTreeMap;

use crate::db::Db;
use crate::error::{AppError, AppResult};
use crate::ops::new_id;

/// Device events kept per device; older ones are removed as new ones arrive.
pub const MAX_EVENTS_PER_DEVICE: i64 = 200;

pub const EVENT_CONNECTED: &str = "connected";
pub const EVENT_DISCONNECTED: &str = "disconnected";
pub const EVENT_REBOOTED: &str = "rebooted";
pub const EVENT_INVENTORY: &str = "inventory changed";

/// `last_seen_at` moves forward only: a late message does not make a device look older.
const BUMP_LAST_SEEN: &str =
    "last_seen_at = CASE WHEN last_seen_at IS NULL OR last_seen_at < $1 THEN $1 ELSE last_seen_at END";

/// Appends a device event and drops the ones beyond the newest [`MAX_EVENTS_PER_DEVICE`].
pub(crate) async fn add_event(
    conn: &mut sqlx::AnyConnection,
    device_id: &str,
    at_ms: i64,
    kind: &str,
    detail: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO device_events (id, device_id, at, kind, detail) VALUES ($1, $2, $3, $4, $5)")
        .bind(new_id())
        .bind(device_id.to_string())
        .bind(at_ms)
        .bind(kind.to_string())
        .bind(detail.to_string())
        .execute(&mut *conn)
        .await?;
    // The oldest event still kept; everything at or before the one after it goes.
    let cut: Option<(i64, String)> = sqlx::query_as(
        "SELECT at, id FROM device_events WHERE device_id = $1 ORDER BY at DESC, id DESC LIMIT 1 OFFSET $2",
    )
    .bind(device_id.to_string())
    .bind(MAX_EVENTS_PER_DEVICE)
    .fetch_optional(&mut *conn)
    .await?;
    if let Some((at, id)) = cut {
        sqlx::query("DELETE FROM device_events WHERE device_id = $1 AND (at < $2 OR (at = $2 AND id <= $3))")
            .bind(device_id.to_string())
            .bind(at)
            .bind(id)
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

/// The device's presence columns, if it is accepted (anyone else's traffic is ignored).
async fn accepted_online(conn: &mut sqlx::AnyConnection, device_id: &str) -> Result<Option<i64>, sqlx::Error> {
    let row: Option<(String, i64)> = sqlx::query_as("SELECT status, online FROM devices WHERE id = $1")
        .bind(device_id.to_string())
        .fetch_optional(conn)
        .await?;
    Ok(row.filter(|(s, _)| s == "accepted").map(|(_, o)| o))
}

/// The device connected (`online`) or its connection ended (`offline`, usually the
/// broker's last will). Events are written only on a change.
pub async fn record_status(db: &Db, device_id: &str, online: bool, at_ms: i64) -> AppResult<()> {
    let mut tx = db.begin_write().await?;
    let Some(was) = accepted_online(tx.conn(), device_id).await? else {
        return Ok(());
    };
    let changed = (was != 0) != online;
    if changed && online {
        sqlx::query(&format!("UPDATE devices SET online = 1, connected_at = $1, {BUMP_LAST_SEEN} WHERE id = $2"))
            .bind(at_ms)
            .bind(device_id.to_string())
            .execute(tx.conn())
            .await?;
    } else {
        sqlx::query(&format!("UPDATE devices SET online = $2, {BUMP_LAST_SEEN} WHERE id = $3"))
            .bind(at_ms)
            .bind(i64::from(online))
            .bind(device_id.to_string())
            .execute(tx.conn())
            .await?;
    }
    if changed {
        let kind = if online { EVENT_CONNECTED } else { EVENT_DISCONNECTED };
        add_event(tx.conn(), device_id, at_ms, kind, "").await?;
    }
    tx.commit().await?;
    Ok(())
}

/// The agent said who it is: its name/version and the id of the current boot. A boot id
/// different from the last one stored means the device rebooted.
pub async fn record_hello(db: &Db, device_id: &str, hello: &drover_proto::device::Hello, at_ms: i64) -> AppResult<()> {
    let agent: String = hello.agent.chars().take(256).collect();
    let boot_id: Option<String> = hello.boot_id.as_deref().map(|b| b.chars().take(128).collect());
    // Known names only, each once, in the contract's order: what the console and the update
    // engine go by.
    let capabilities: Option<String> = hello.capabilities.as_ref().map(|caps| {
        let known: Vec<&str> =
            drover_proto::device::CAPABILITIES.iter().copied().filter(|c| caps.iter().any(|x| x == c)).collect();
        serde_json::to_string(&known).unwrap_or_else(|_| "[]".into())
    });
    let mut tx = db.begin_write().await?;
    let row: Option<(String, Option<String>, Option<String>)> =
        sqlx::query_as("SELECT status, boot_id, agent FROM devices WHERE id = $1")
            .bind(device_id.to_string())
            .fetch_optional(tx.conn())
            .await?;
    let Some((status, old_boot, old_agent)) = row else { return Ok(()) };
    if status != "accepted" {
        return Ok(());
    }
    sqlx::query(&format!(
        "UPDATE devices SET agent = $2, boot_id = COALESCE($3, boot_id), capabilities = $5, {BUMP_LAST_SEEN} WHERE id = $4"
    ))
    .bind(at_ms)
    .bind(agent.clone())
    .bind(boot_id.clone())
    .bind(device_id.to_string())
    .bind(capabilities)
    .execute(tx.conn())
    .await?;
    if let (Some(old), Some(new)) = (&old_boot, &boot_id)
        && old != new
    {
        let detail = match &old_agent {
            Some(a) if *a != agent => format!("agent {a} → {agent}"),
            _ => format!("agent {agent}"),
        };
        add_event(tx.conn(), device_id, at_ms, EVENT_REBOOTED, &detail).await?;
    }
    tx.commit().await?;
    Ok(())
}

/// Summarizes changed keys for an event, e.g. `+os.version ~kernel -disk.sdb (3 changes)`.
fn summarize(added: &[&str], changed: &[&str], removed: &[&str]) -> String {
    let total = added.len() + changed.len() + removed.len();
    let mut parts = Vec::new();
    let mut len = 0;
    let all =
        added.iter().map(|k| ('+', k)).chain(changed.iter().map(|k| ('~', k))).chain(removed.iter().map(|k| ('-', k)));
    for (sign, key) in all {
        if len > 200 {
            parts.push("…".to_string());
            break;
        }
        let s = format!("{sign}{key}");
        len += s.len() + 1;
        parts.push(s);
    }
    format!("{} ({total} change{})", parts.join(" "), if total == 1 { "" } else { "s" })
}

/// The device's full inventory: it replaces the stored attribute set, touching only rows
/// that changed; keys the device no longer sends are removed.
pub async fn record_inventory(db: &Db, device_id: &str, attrs: &BTreeMap<String, String>, at_ms: i64) -> AppResult<()> {
    drover_proto::device::check_inventory(attrs).map_err(|e| AppError::BadRequest(format!("inventory: {e}")))?;
    let mut tx = db.begin_write().await?;
    if accepted_online(tx.conn(), device_id).await?.is_none() {
        return Ok(());
    }
    let old: Vec<(String, String)> = sqlx::query_as("SELECT key, value FROM device_attributes WHERE device_id = $1")
        .bind(device_id.to_string())
        .fetch_all(tx.conn())
        .await?;
    let old: BTreeMap<String, String> = old.into_iter().collect();
    let removed: Vec<&str> = old.keys().filter(|k| !attrs.contains_key(*k)).map(String::as_str).collect();
    let added: Vec<&str> = attrs.keys().filter(|k| !old.contains_key(*k)).map(String::as_str).collect();
    let changed: Vec<&str> =
        attrs.iter().filter(|(k, v)| old.get(*k).is_some_and(|o| o != *v)).map(|(k, _)| k.as_str()).collect();
    for k in &removed {
        sqlx::query("DELETE FROM device_attributes WHERE device_id = $1 AND key = $2")
            .bind(device_id.to_string())
            .bind(k.to_string())
            .execute(tx.conn())
            .await?;
    }
    for k in &changed {
        sqlx::query("UPDATE device_attributes SET value = $3 WHERE device_id = $1 AND key = $2")
            .bind(device_id.to_string())
            .bind(k.to_string())
            .bind(attrs[*k].clone())
            .execute(tx.conn())
            .await?;
    }
    for k in &added {
        sqlx::query("INSERT INTO device_attributes (device_id, key, value) VALUES ($1, $2, $3)")
            .bind(device_id.to_string())
            .bind(k.to_string())
            .bind(attrs[*k].clone())
            .execute(tx.conn())
            .await?;
    }
    sqlx::query(&format!("UPDATE devices SET inventory_at = $1, {BUMP_LAST_SEEN} WHERE id = $2"))
        .bind(at_ms)
        .bind(device_id.to_string())
        .execute(tx.conn())
        .await?;
    if !(added.is_empty() && changed.is_empty() && removed.is_empty()) {
        add_event(tx.conn(), device_id, at_ms, EVENT_INVENTORY, &summarize(&added, &changed, &removed)).await?;
    }
    if [&added, &changed, &removed].iter().any(|keys| keys.contains(&"hostname")) {
        crate::devices::refresh_display_name(tx.conn(), device_id).await?;
    }
    tx.commit().await?;
    Ok(())
}

/// The device is alive. One `UPDATE` when it is known online; a device thought offline is
/// marked online (as by [`record_status`], with its `connected` event).
pub async fn record_heartbeat(db: &Db, device_id: &str, at_ms: i64) -> AppResult<()> {
    record_heartbeats(db, &[(device_id.to_string(), at_ms)]).await
}

/// Records many devices' heartbeats (device, when) in one transaction: a fleet's heartbeats
/// arrive in bursts, and one commit each would hold the device-traffic worker for seconds.
pub async fn record_heartbeats(db: &Db, beats: &[(String, i64)]) -> AppResult<()> {
    if beats.is_empty() {
        return Ok(());
    }
    let mut missed = Vec::new();
    let mut tx = db.begin_write().await?;
    for (device_id, at_ms) in beats {
        let done = sqlx::query(&format!(
            "UPDATE devices SET {BUMP_LAST_SEEN} WHERE id = $2 AND status = 'accepted' AND online = 1"
        ))
        .bind(*at_ms)
        .bind(device_id.clone())
        .execute(tx.conn())
        .await?
        .rows_affected();
        if done == 0 {
            missed.push((device_id, *at_ms));
        }
    }
    tx.commit().await?;
    for (device_id, at_ms) in missed {
        // Offline, or not accepted (then record_status ignores it too).
        record_status(db, device_id, true, at_ms).await?;
    }
    Ok(())
}

/// Marks every device offline: the embedded broker is starting, so none is connected to it.
pub async fn mark_all_offline(db: &Db) -> AppResult<()> {
    sqlx::query("UPDATE devices SET online = 0 WHERE online = 1").execute(db.pool()).await?;
    Ok(())
}

/// Whether the broker should let this device connect: accepted, with a certificate that has
/// not been revoked.
pub async fn device_may_connect(db: &Db, device_id: &str) -> AppResult<bool> {
    let row: Option<(String, Option<String>, Option<i64>)> =
        sqlx::query_as("SELECT status, cert_pem, cert_revoked_at FROM devices WHERE id = $1")
            .bind(device_id.to_string())
            .fetch_optional(db.pool())
            .await?;
    Ok(matches!(row, Some((status, Some(_), None)) if status == "accepted"))
}

#[cfg(test)]
mod tests {
    use super::summarize;

    #[test]
    fn summaries_name_keys_and_stay_short() {
        assert_eq!(summarize(&["a"], &["b"], &["c"]), "+a ~b -c (3 changes)");
        assert_eq!(summarize(&[], &["k"], &[]), "~k (1 change)");
        let many: Vec<String> = (0..100).map(|i| format!("key{i}")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        let s = summarize(&many, &[], &[]);
        assert!(s.len() < 260 && s.ends_with("… (100 changes)"), "{s}");
    }
}
