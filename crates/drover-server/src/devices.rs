//! The device registry and enrollment: a device asks with a CSR and its identity, and is
//! accepted at once (enrollment token, pre-authorized identity) or waits for an operator.
//! Every lifecycle step is audited.

use std::collections::BTreeMap;

use drover_proto::api::{
    CreateEnrollmentToken, CreatedEnrollmentToken, Device, DeviceDetail, DeviceEvent, DeviceListQuery, DevicePatch,
    DeviceStatus, EnrollRequest, EnrollResponse, EnrollmentToken, GroupKind, GroupRef, Page, PatchTags, PrincipalKind,
    ReplaceTags, Role,
};
use drover_proto::validate;

use crate::audit::{self, Event};
use crate::auth::{self, Principal};
use crate::ca::FleetCa;
use crate::db::{Bind, Db, Filter, bind_all, like_escape};
use crate::error::{AppError, AppResult};
use crate::ops::{find_org, new_id};
use crate::page::{CursorValue, PageRequest, SortField};
use crate::time::{now_ms, opt_rfc3339, to_rfc3339};

/// How long a pending device should wait before asking again.
pub const PENDING_RETRY_SECS: u64 = 60;
/// Prefix of enrollment token secrets (distinct from API tokens: they cannot call the API).
pub const ENROLL_TOKEN_PREFIX: &str = "dre_";

/// Identity attributes: 1 to 16, keys like inventory keys, values 1 to 256 printable bytes.
pub fn check_identity(identity: &BTreeMap<String, String>) -> AppResult<()> {
    if identity.is_empty() || identity.len() > 16 {
        return Err(AppError::BadRequest("identity must have 1 to 16 attributes (serial, mac…)".into()));
    }
    drover_proto::device::check_inventory(identity).map_err(|e| AppError::BadRequest(format!("identity: {e}")))?;
    if identity.values().any(|v| v.trim().is_empty() || v.len() > 256) {
        return Err(AppError::BadRequest("identity values must be 1 to 256 bytes".into()));
    }
    Ok(())
}

pub(crate) fn identity_json(identity: &BTreeMap<String, String>) -> String {
    // A BTreeMap serializes in key order: one identity, one text, one hash.
    serde_json::to_string(identity).unwrap_or_default()
}

fn tags_json(tags: &BTreeMap<String, String>) -> String {
    serde_json::to_string(tags).unwrap_or_else(|_| "{}".into())
}

pub(crate) fn parse_map(text: &str) -> BTreeMap<String, String> {
    serde_json::from_str(text).unwrap_or_default()
}

fn parse_list(text: &str) -> Vec<String> {
    serde_json::from_str(text).unwrap_or_default()
}

/// Checks the CSR and returns the SHA-256 of its public key: the device's lasting identity
/// on the wire (the same key asking again is the same device).
fn key_fingerprint(csr_pem: &str) -> AppResult<String> {
    use rcgen::PublicKeyData as _;
    if csr_pem.len() > 16 * 1024 {
        return Err(AppError::BadRequest("invalid certificate signing request: larger than 16 KiB".into()));
    }
    let csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem)
        .map_err(|e| AppError::BadRequest(format!("invalid certificate signing request: {e}")))?;
    Ok(hex::encode(<sha2::Sha256 as sha2::Digest>::digest(csr.public_key.der_bytes())))
}

/// Most tags on one device; longest tag value.
pub const MAX_TAGS: usize = 64;
pub const MAX_TAG_VALUE_LEN: usize = 256;

/// Tags: keys like inventory keys (letters, digits, `_ . -`, 1 to 64), values up to 256
/// printable bytes, at most 64 per device.
pub fn check_tags(tags: &BTreeMap<String, String>) -> AppResult<()> {
    if tags.len() > MAX_TAGS {
        return Err(AppError::BadRequest(format!("{} tags: a device has at most {MAX_TAGS}", tags.len())));
    }
    drover_proto::device::check_inventory(tags).map_err(|e| AppError::BadRequest(format!("tags: {e}")))?;
    if let Some((k, _)) = tags.iter().find(|(_, v)| v.len() > MAX_TAG_VALUE_LEN) {
        return Err(AppError::BadRequest(format!("tag {k:?}: value over {MAX_TAG_VALUE_LEN} bytes")));
    }
    Ok(())
}

type DeviceRow = (
    String,
    String,
    String,
    Option<i64>,
    String,
    i64,
    i64,
    i64,
    Option<i64>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    String,
    Option<String>,
);
const DEVICE_COLUMNS: &str = "d.id, d.status, d.identity, d.cert_not_after, d.enrolled_via, d.created_at, \
                              d.updated_at, d.online, d.last_seen_at, d.agent, d.sw_artifact, d.sw_name, d.sw_version, \
                              d.name, d.display_name, d.capabilities";

/// Longest operator-set device name, in characters.
pub const MAX_DEVICE_NAME: usize = 64;

/// What a device is called: its operator-set name, else its inventory's hostname, else its
/// identity's serial, else its id.
pub fn display_name(
    name: Option<&str>,
    hostname: Option<&str>,
    identity: &BTreeMap<String, String>,
    id: &str,
) -> String {
    [name, hostname, identity.get("serial").map(String::as_str)]
        .into_iter()
        .flatten()
        .map(str::trim)
        .find(|s| !s.is_empty())
        .unwrap_or(id)
        .to_string()
}

/// Recomputes a device's stored display name after its name, inventory or identity changed.
pub(crate) async fn refresh_display_name(conn: &mut sqlx::AnyConnection, id: &str) -> Result<(), sqlx::Error> {
    let row: Option<(Option<String>, String)> = sqlx::query_as("SELECT name, identity FROM devices WHERE id = $1")
        .bind(id.to_string())
        .fetch_optional(&mut *conn)
        .await?;
    let Some((name, identity)) = row else { return Ok(()) };
    let hostname: Option<(String,)> =
        sqlx::query_as("SELECT value FROM device_attributes WHERE device_id = $1 AND key = 'hostname'")
            .bind(id.to_string())
            .fetch_optional(&mut *conn)
            .await?;
    let shown = display_name(name.as_deref(), hostname.as_ref().map(|h| h.0.as_str()), &parse_map(&identity), id);
    sqlx::query("UPDATE devices SET display_name = $1 WHERE id = $2 AND display_name <> $1")
        .bind(shown)
        .bind(id.to_string())
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// An operator's name for a device: 1 to 64 characters, no control characters, no leading or
/// trailing space, and not shaped like a device id (so a name never hides another device).
pub fn check_device_name(name: &str) -> AppResult<()> {
    let n = name.chars().count();
    if n == 0 || n > MAX_DEVICE_NAME {
        return Err(AppError::BadRequest(format!("name: 1 to {MAX_DEVICE_NAME} characters")));
    }
    if name.trim() != name {
        return Err(AppError::BadRequest("name: no leading or trailing spaces".into()));
    }
    if name.chars().any(char::is_control) {
        return Err(AppError::BadRequest("name: no control characters".into()));
    }
    if uuid::Uuid::parse_str(name).is_ok() {
        return Err(AppError::BadRequest("name: a device id cannot be a name".into()));
    }
    Ok(())
}

fn to_device(r: DeviceRow, tags: BTreeMap<String, String>) -> AppResult<Device> {
    Ok(Device {
        display_name: if r.14.is_empty() { r.0.clone() } else { r.14 },
        name: r.13,
        capabilities: r.15.as_deref().map(parse_list),
        id: r.0,
        status: DeviceStatus::parse(&r.1)
            .ok_or_else(|| AppError::Internal(format!("unknown device status {:?}", r.1)))?,
        identity: parse_map(&r.2),
        tags,
        certificate_expires_at: opt_rfc3339(r.3),
        enrolled_via: r.4,
        created_at: to_rfc3339(r.5),
        updated_at: to_rfc3339(r.6),
        online: r.7 != 0,
        last_seen_at: opt_rfc3339(r.8),
        agent: r.9,
        software: match (r.11, r.12) {
            (Some(name), Some(version)) => Some(drover_proto::update::Software { artifact: r.10, name, version }),
            _ => None,
        },
    })
}

/// Devices from their rows, with their tags (one query for the lot).
async fn to_devices(conn: &mut sqlx::AnyConnection, rows: Vec<DeviceRow>) -> AppResult<Vec<Device>> {
    let mut tags: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    if !rows.is_empty() {
        let marks: Vec<String> = (1..=rows.len()).map(|i| format!("${i}")).collect();
        let sql = format!("SELECT device_id, key, value FROM device_tags WHERE device_id IN ({})", marks.join(", "));
        let mut q = sqlx::query_as::<_, (String, String, String)>(&sql);
        for r in &rows {
            q = q.bind(r.0.clone());
        }
        for (d, k, v) in q.fetch_all(&mut *conn).await? {
            tags.entry(d).or_default().insert(k, v);
        }
    }
    rows.into_iter()
        .map(|r| {
            let t = tags.remove(&r.0).unwrap_or_default();
            to_device(r, t)
        })
        .collect()
}

async fn device_tags(conn: &mut sqlx::AnyConnection, id: &str) -> Result<BTreeMap<String, String>, sqlx::Error> {
    let rows: Vec<(String, String)> = sqlx::query_as("SELECT key, value FROM device_tags WHERE device_id = $1")
        .bind(id.to_string())
        .fetch_all(conn)
        .await?;
    Ok(rows.into_iter().collect())
}

/// Replaces a device's tag set, touching only rows that change.
async fn write_tags(
    conn: &mut sqlx::AnyConnection,
    id: &str,
    old: &BTreeMap<String, String>,
    new: &BTreeMap<String, String>,
) -> Result<(), sqlx::Error> {
    for k in old.keys().filter(|k| !new.contains_key(*k)) {
        sqlx::query("DELETE FROM device_tags WHERE device_id = $1 AND key = $2")
            .bind(id.to_string())
            .bind(k.clone())
            .execute(&mut *conn)
            .await?;
    }
    for (k, v) in new {
        match old.get(k) {
            Some(o) if o == v => {}
            Some(_) => {
                sqlx::query("UPDATE device_tags SET value = $3 WHERE device_id = $1 AND key = $2")
                    .bind(id.to_string())
                    .bind(k.clone())
                    .bind(v.clone())
                    .execute(&mut *conn)
                    .await?;
            }
            None => {
                sqlx::query("INSERT INTO device_tags (device_id, key, value) VALUES ($1, $2, $3)")
                    .bind(id.to_string())
                    .bind(k.clone())
                    .bind(v.clone())
                    .execute(&mut *conn)
                    .await?;
            }
        }
    }
    Ok(())
}

fn device_principal(device_id: &str, org_id: &str, source: &str) -> Principal {
    Principal {
        kind: PrincipalKind::Device,
        id: device_id.to_string(),
        name: format!("device {device_id}"),
        role: Role::Viewer,
        org_id: Some(org_id.to_string()),
        source: source.to_string(),
        session_csrf: None,
    }
}

fn response(device_id: String, status: DeviceStatus, cert: Option<String>, ca: &FleetCa) -> EnrollResponse {
    let accepted = status == DeviceStatus::Accepted;
    EnrollResponse {
        device_id,
        status,
        certificate_pem: if accepted { cert } else { None },
        ca_pem: accepted.then(|| ca.cert_pem().to_string()),
        retry_after_secs: (status == DeviceStatus::Pending).then_some(PENDING_RETRY_SECS),
    }
}

/// What a device asking to enroll is told.
/// The limits on enrollment: token buckets per client address — one for requests that would
/// make a device wait for an operator (no token, no pre-authorization), one for requests
/// with proof, which factory lines send fast — and the cap on waiting devices per
/// organization. A rate of 0 is no limit.
pub struct EnrollLimiter {
    pending_per_minute: u32,
    proof_per_minute: u32,
    max_pending_devices: u64,
    buckets: std::sync::Mutex<std::collections::HashMap<(Option<std::net::IpAddr>, bool), Bucket>>,
}

#[derive(Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: std::time::Instant,
}

/// The network a client address is counted in: the address itself for IPv4, its /64 for
/// IPv6 (one subscriber holds a whole /64, and could otherwise take a fresh address per
/// request).
fn network_of(ip: std::net::IpAddr) -> std::net::IpAddr {
    match ip {
        std::net::IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => std::net::IpAddr::V4(v4),
            None => std::net::IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        },
        v4 => v4,
    }
}

/// How long a request refused for a full organization is told to wait.
const PENDING_CAP_RETRY_SECS: u64 = 600;

impl EnrollLimiter {
    pub fn new(config: &crate::config::Config) -> EnrollLimiter {
        EnrollLimiter {
            pending_per_minute: config.enroll_pending_per_minute,
            proof_per_minute: config.enroll_with_proof_per_minute,
            max_pending_devices: config.max_pending_devices,
            buckets: Default::default(),
        }
    }

    /// Takes one request from the bucket of `ip` (`proof`: with a token or pre-authorization);
    /// `Err(seconds)` until the next one would be let through.
    fn take(&self, ip: Option<std::net::IpAddr>, proof: bool, now: std::time::Instant) -> Result<(), u64> {
        let rate = if proof { self.proof_per_minute } else { self.pending_per_minute };
        if rate == 0 {
            return Ok(());
        }
        let (cap, per_sec) = (f64::from(rate), f64::from(rate) / 60.0);
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if buckets.len() > 100_000 {
            // Forget the addresses whose bucket has filled up again: they are as good as new.
            buckets.retain(|_, b| b.tokens + now.duration_since(b.at).as_secs_f64() * per_sec < cap);
        }
        let b = buckets.entry((ip.map(network_of), proof)).or_insert(Bucket { tokens: cap, at: now });
        b.tokens = (b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * per_sec).min(cap);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err((((1.0 - b.tokens) / per_sec).ceil() as u64).max(1))
        }
    }

    fn limit(&self, ip: Option<std::net::IpAddr>, proof: bool) -> AppResult<()> {
        self.take(ip, proof, std::time::Instant::now()).map_err(|wait| AppError::TooManyRequests {
            message: if proof {
                format!(
                    "too many enrollments from this address (more than {} a minute, enroll_with_proof_per_minute): \
                     try again in {wait} seconds",
                    self.proof_per_minute
                )
            } else {
                format!(
                    "too many enrollment requests without an enrollment token from this address (more than {} a \
                     minute, enroll_pending_per_minute): try again in {wait} seconds, or enroll with a token",
                    self.pending_per_minute
                )
            },
            retry_after_secs: wait,
        })
    }
}

/// Enrolls a device: at once with a valid token or pre-authorization, else pending an
/// operator, within the limits of `limiter` for the client address `ip`.
pub async fn enroll(
    db: &Db,
    ca: &FleetCa,
    req: EnrollRequest,
    source: &str,
    ip: Option<std::net::IpAddr>,
    limiter: &EnrollLimiter,
) -> AppResult<EnrollResponse> {
    check_identity(&req.identity)?;
    let fingerprint = key_fingerprint(&req.csr_pem)?;
    let identity = identity_json(&req.identity);
    let identity_hash = auth::sha256_hex(&identity);

    let mut tx = db.begin_write().await?;
    // The same key asking again: tell it where it stands (this is how a pending device polls).
    let existing: Option<(String, String, String, Option<String>)> =
        sqlx::query_as("SELECT id, status, identity_hash, cert_pem FROM devices WHERE key_fingerprint = $1")
            .bind(fingerprint.clone())
            .fetch_optional(tx.conn())
            .await?;
    if let Some((id, status, ih, cert)) = existing {
        if ih != identity_hash {
            return Err(AppError::Conflict("this key is enrolled already with another identity".into()));
        }
        let status = DeviceStatus::parse(&status).unwrap_or(DeviceStatus::Rejected);
        return match status {
            DeviceStatus::Rejected => Err(AppError::Forbidden("this device was rejected by an operator".into())),
            DeviceStatus::Decommissioned => {
                Err(AppError::Forbidden("this device was decommissioned: enroll again with a new key".into()))
            }
            s => Ok(response(id, s, cert, ca)),
        };
    }

    // How it may come in: a token or a pre-authorization (`via`, accepted at once), or wait.
    // (A device that asked already, polling above, is not counted.)
    let (org_id, via, tags, token_id): (String, Option<String>, _, _) = match &req.token {
        Some(secret) => {
            limiter.limit(ip, true)?;
            type Row = (String, String, String, Option<i64>, i64, String, Option<i64>, Option<i64>, String);
            let row: Option<Row> = sqlx::query_as(
                "SELECT id, org_id, name, max_uses, uses, tags, expires_at, revoked_at, groups FROM enrollment_tokens WHERE secret_hash = $1",
            )
            .bind(auth::sha256_hex(secret))
            .fetch_optional(tx.conn())
            .await?;
            let unknown = || AppError::Unauthorized("the enrollment token is unknown or revoked".into());
            let (tid, org, name, max_uses, uses, tags, expires_at, revoked_at, groups) = row.ok_or_else(unknown)?;
            if revoked_at.is_some() {
                return Err(unknown());
            }
            if expires_at.is_some_and(|e| e <= now_ms()) {
                return Err(AppError::Unauthorized(format!("the enrollment token {name:?} has expired")));
            }
            if let Some(max) = max_uses
                && uses >= max
            {
                return Err(AppError::Forbidden(format!(
                    "the enrollment token {name:?} is used up ({uses} of {max} uses)"
                )));
            }
            (org, Some(format!("token:{name}")), parse_map(&tags), Some((tid, parse_list(&groups))))
        }
        None => match crate::preauth::take(tx.conn(), &identity_hash, now_ms()).await? {
            // Taken only if the device is let in below: an error rolls the use back.
            Some((org, _)) => {
                limiter.limit(ip, true)?;
                (org, Some("preauthorized".to_string()), BTreeMap::new(), None)
            }
            None => {
                limiter.limit(ip, false)?;
                let org = find_org(db, None).await?;
                if limiter.max_pending_devices > 0 {
                    let (waiting,): (i64,) =
                        sqlx::query_as("SELECT COUNT(*) FROM devices WHERE org_id = $1 AND status = 'pending'")
                            .bind(org.clone())
                            .fetch_one(tx.conn())
                            .await?;
                    if u64::try_from(waiting).unwrap_or(0) >= limiter.max_pending_devices {
                        return Err(AppError::TooManyRequests {
                            message: format!(
                                "{waiting} devices wait for an operator already, the most this server takes \
                                 (max_pending_devices): try again later, or enroll with a token"
                            ),
                            retry_after_secs: PENDING_CAP_RETRY_SECS,
                        });
                    }
                }
                (org, None, BTreeMap::new(), None)
            }
        },
    };

    // One live device per identity: a replacement needs the old one decommissioned first. A
    // rejected claim blocks nobody, and a claim still pending without proof gives way to a
    // device that brings one (a token or a pre-authorization): anyone can claim a serial, so
    // a squatter must not lock the real device out. The answer names no other device.
    let id = new_id();
    let dups: Vec<(String, String)> = sqlx::query_as(
        "SELECT id, status FROM devices WHERE org_id = $1 AND identity_hash = $2 AND status IN ('pending', 'accepted')",
    )
    .bind(org_id.clone())
    .bind(identity_hash.clone())
    .fetch_all(tx.conn())
    .await?;
    for (other, status) in dups {
        if status == "pending" && via.is_some() {
            sqlx::query("UPDATE devices SET status = 'rejected', updated_at = $1 WHERE id = $2")
                .bind(now_ms())
                .bind(other.clone())
                .execute(tx.conn())
                .await?;
            let principal = device_principal(&id, &org_id, source);
            audit::append(
                tx.conn(),
                Event {
                    actor: &principal,
                    action: "device.reject",
                    target_kind: "device",
                    target_id: &other,
                    summary: format!(
                        "pending claim of {identity} superseded by device {id}, which enrolled with proof ({})",
                        via.as_deref().unwrap_or_default()
                    ),
                },
            )
            .await?;
            continue;
        }
        return Err(AppError::Conflict(match status.as_str() {
            "pending" => "a device with this identity is waiting for an operator already: wait for the decision, \
                          or enroll with an enrollment token"
                .into(),
            _ => "a device with this identity is enrolled already with another key: an operator must decommission \
                  it to enroll a replacement"
                .into(),
        }));
    }

    let (status, cert) = match via {
        Some(_) => {
            let issued = ca.issue_device(&req.csr_pem, &id).map_err(|e| AppError::BadRequest(e.to_string()))?;
            (DeviceStatus::Accepted, Some(issued))
        }
        None => (DeviceStatus::Pending, None),
    };
    let via = via.unwrap_or_else(|| "pending".into());
    let now = now_ms();
    sqlx::query(
        "INSERT INTO devices (id, org_id, status, identity, identity_hash, key_fingerprint, csr_pem, cert_pem, cert_serial, \
         cert_not_after, enrolled_via, created_at, updated_at, display_name) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $12, $13)",
    )
    .bind(id.clone())
    .bind(org_id.clone())
    .bind(status.as_str())
    .bind(identity.clone())
    .bind(identity_hash)
    .bind(fingerprint)
    .bind(req.csr_pem.clone())
    .bind(cert.as_ref().map(|c| c.cert_pem.clone()))
    .bind(cert.as_ref().map(|c| c.serial_hex.clone()))
    .bind(cert.as_ref().map(|c| (c.not_after.unix_timestamp_nanos() / 1_000_000) as i64))
    .bind(via.clone())
    .bind(now)
    .bind(display_name(None, None, &req.identity, &id))
    .execute(tx.conn())
    .await?;
    write_tags(tx.conn(), &id, &BTreeMap::new(), &tags).await?;
    if let Some((tid, group_ids)) = token_id {
        sqlx::query("UPDATE enrollment_tokens SET uses = uses + 1 WHERE id = $1").bind(tid).execute(tx.conn()).await?;
        // The token's groups; one deleted since the token was made is passed over.
        for gid in group_ids {
            sqlx::query(
                "INSERT INTO device_group_members (group_id, device_id, added_at) SELECT id, $2, $3 FROM device_groups \
                 WHERE id = $1 AND org_id = $4 AND kind = 'static'",
            )
            .bind(gid)
            .bind(id.clone())
            .bind(now)
            .bind(org_id.clone())
            .execute(tx.conn())
            .await?;
        }
    }
    let actor = device_principal(&id, &org_id, source);
    let summary = match status {
        DeviceStatus::Accepted => format!("device {identity} enrolled ({via}), certificate issued"),
        _ => format!("device {identity} asked to enroll; pending an operator"),
    };
    audit::append(
        tx.conn(),
        Event { actor: &actor, action: "device.enroll", target_kind: "device", target_id: &id, summary },
    )
    .await?;
    tx.commit().await?;
    Ok(response(id, status, cert.map(|c| c.cert_pem), ca))
}

/// Removes the devices that have waited for an operator longer than `days` (0: never), with
/// their tags, attributes, group memberships and events; one audit entry per organization
/// and sweep. Returns how many were removed.
pub async fn expire_pending(db: &Db, days: u32, now: i64) -> AppResult<u64> {
    if days == 0 {
        return Ok(0);
    }
    let cutoff = now.saturating_sub(i64::from(days) * 86_400_000);
    let orgs: Vec<(String,)> =
        sqlx::query_as("SELECT DISTINCT org_id FROM devices WHERE status = 'pending' AND created_at < $1")
            .bind(cutoff)
            .fetch_all(db.pool())
            .await?;
    let mut removed = 0;
    for (org,) in orgs {
        let mut tx = db.begin_write().await?;
        const EXPIRED: &str = "SELECT id FROM devices WHERE org_id = $1 AND status = 'pending' AND created_at < $2 \
             AND NOT EXISTS (SELECT 1 FROM deployment_devices dd WHERE dd.device_id = devices.id)";
        for table in ["device_attributes", "device_tags", "device_group_members", "device_events"] {
            sqlx::query(&format!("DELETE FROM {table} WHERE device_id IN ({EXPIRED})"))
                .bind(org.clone())
                .bind(cutoff)
                .execute(tx.conn())
                .await?;
        }
        let n = sqlx::query(&format!("DELETE FROM devices WHERE id IN ({EXPIRED})"))
            .bind(org.clone())
            .bind(cutoff)
            .execute(tx.conn())
            .await?
            .rows_affected();
        if n > 0 {
            audit::append(
                tx.conn(),
                Event {
                    actor: &Principal::system(Some(&org)),
                    action: "device.expire",
                    target_kind: "device",
                    target_id: "-",
                    summary: format!(
                        "{n} pending device(s) nobody accepted or rejected within {days} days removed \
                         (pending_expiry_days)"
                    ),
                },
            )
            .await?;
        }
        tx.commit().await?;
        removed += n;
    }
    Ok(removed)
}

/// Sweeps expired pending devices every `every` until `stopping` turns true.
pub async fn run_pending_expiry(
    db: Db,
    days: u32,
    every: std::time::Duration,
    mut stopping: tokio::sync::watch::Receiver<bool>,
) {
    if days == 0 {
        return;
    }
    loop {
        match expire_pending(&db, days, now_ms()).await {
            Ok(0) => {}
            Ok(n) => tracing::info!("removed {n} pending device(s) older than {days} days"),
            Err(e) => tracing::warn!("cannot remove expired pending devices: {e}"),
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stopping.wait_for(|s| *s) => return,
        }
    }
}

const DEVICE_SORTS: &[SortField] = &[
    SortField { name: "created_at", column: "d.created_at", int: true },
    SortField { name: "updated_at", column: "d.updated_at", int: true },
    // Never-seen devices sort as the oldest; the v4 index has the same expression.
    SortField { name: "last_seen_at", column: "COALESCE(d.last_seen_at, 0)", int: true },
    SortField { name: "id", column: "d.id", int: false },
    SortField { name: "name", column: "d.display_name", int: false },
];

/// A listing of an organization's devices, with the query's conditions and `extra` (a
/// group's membership or filter) applied.
pub(crate) async fn list_where(
    db: &Db,
    org_id: &str,
    q: &DeviceListQuery,
    extra: Option<crate::filter::Compiled>,
) -> AppResult<Page<Device>> {
    let page = PageRequest::parse(q.limit, q.cursor.as_deref(), q.sort.as_deref(), DEVICE_SORTS, "-created_at")?;
    let mut f = Filter::default();
    f.and("d.org_id = ?", [Bind::Text(org_id.to_string())]);
    if let Some(s) = q.status {
        f.and("d.status = ?", [Bind::Text(s.as_str().into())]);
    }
    if let Some(on) = q.online {
        f.and("d.online = ?", [Bind::Int(i64::from(on))]);
    }
    if let Some(text) = q.q.as_deref().map(str::trim).filter(|s| !s.is_empty()) {
        if text.len() > 256 {
            return Err(AppError::BadRequest("q: at most 256 bytes".into()));
        }
        let pat = format!("%{}%", like_escape(&text.to_lowercase()));
        f.and(
            "(LOWER(d.display_name) LIKE ? ESCAPE '\\' OR LOWER(d.id) LIKE ? ESCAPE '\\' \
             OR LOWER(d.identity) LIKE ? ESCAPE '\\')",
            [Bind::Text(pat.clone()), Bind::Text(pat.clone()), Bind::Text(pat)],
        );
    }
    if let Some(text) = q.filter.as_deref().filter(|s| !s.trim().is_empty()) {
        let c = crate::filter::prepare(db, org_id, text).await?;
        f.and(&c.sql, c.binds);
    }
    if let Some(a) = q.artifact.as_deref().map(str::trim).filter(|s| !s.is_empty()) {
        software_condition(&mut f, a);
    }
    if let Some(c) = q.commit.as_deref().map(str::trim).filter(|s| !s.is_empty()) {
        commit_condition(&mut f, org_id, c)?;
    }
    if let Some(c) = extra {
        f.and(&c.sql, c.binds);
    }
    let by = page.sort.field.name;
    let id_col = (by != "id").then_some("d.id");
    page.apply(&mut f, id_col);
    let sql = format!("SELECT {DEVICE_COLUMNS} FROM devices d{}{}", f.sql(), page.order_limit(id_col));
    let mut conn = db.pool().acquire().await?;
    let rows: Vec<DeviceRow> = bind_all(sqlx::query_as(&sql), &f.binds).fetch_all(&mut *conn).await?;
    let (rows, next_cursor) = page.finish(rows, |r| match by {
        "id" => (CursorValue::Text(r.0.clone()), None),
        "name" => (CursorValue::Text(r.14.clone()), Some(r.0.clone())),
        "updated_at" => (CursorValue::Int(r.6), Some(r.0.clone())),
        "last_seen_at" => (CursorValue::Int(r.8.unwrap_or(0)), Some(r.0.clone())),
        _ => (CursorValue::Int(r.5), Some(r.0.clone())),
    });
    Ok(Page { items: to_devices(&mut conn, rows).await?, next_cursor })
}

/// `artifact=`: devices running an artifact, by id, `NAME@VERSION` or `NAME`.
fn software_condition(f: &mut Filter, a: &str) {
    if drover_proto::update::is_sha256_hex(a) {
        f.and("d.sw_artifact = ?", [Bind::Text(a.to_string())]);
    } else if let Some((name, version)) = a.rsplit_once('@') {
        f.and("d.sw_name = ? AND d.sw_version = ?", [Bind::Text(name.to_string()), Bind::Text(version.to_string())]);
    } else {
        f.and("d.sw_name = ?", [Bind::Text(a.to_string())]);
    }
}

/// `commit=`: devices running an artifact built from a source commit (a full hash or a
/// prefix of at least 7 hex digits), by the artifacts' provenance.
fn commit_condition(f: &mut Filter, org_id: &str, commit: &str) -> AppResult<()> {
    let commit = commit.to_lowercase();
    if commit.len() < 7 || commit.len() > 64 || !commit.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(AppError::BadRequest("commit: give a commit hash or a prefix of at least 7 hex digits".into()));
    }
    f.and(
        "d.sw_artifact IN (SELECT a.id FROM artifacts a WHERE a.org_id = ? AND a.source_commit LIKE ? ESCAPE '\\')",
        [Bind::Text(org_id.to_string()), Bind::Text(format!("{}%", like_escape(&commit)))],
    );
    Ok(())
}

pub async fn list_devices(db: &Db, p: &Principal, q: &DeviceListQuery) -> AppResult<Page<Device>> {
    p.require(Role::Viewer, "listing devices")?;
    list_where(db, p.org(), q, None).await
}

/// How many of the organization's devices match a compiled condition.
pub(crate) async fn count_where(db: &Db, org_id: &str, c: crate::filter::Compiled) -> AppResult<u64> {
    let mut f = Filter::default();
    f.and("d.org_id = ?", [Bind::Text(org_id.to_string())]);
    f.and(&c.sql, c.binds);
    let sql = format!("SELECT COUNT(*) FROM devices d{}", f.sql());
    let (n,): (i64,) = bind_all(sqlx::query_as(&sql), &f.binds).fetch_one(db.pool()).await?;
    Ok(u64::try_from(n).unwrap_or(0))
}

pub(crate) async fn fetch_device(conn: &mut sqlx::AnyConnection, org_id: &str, id: &str) -> AppResult<Device> {
    let row: Option<DeviceRow> =
        sqlx::query_as(&format!("SELECT {DEVICE_COLUMNS} FROM devices d WHERE d.org_id = $1 AND d.id = $2"))
            .bind(org_id.to_string())
            .bind(id.to_string())
            .fetch_optional(&mut *conn)
            .await?;
    let row = row.ok_or_else(|| AppError::NotFound(format!("no device with id {id:?}")))?;
    let tags = device_tags(conn, id).await?;
    to_device(row, tags)
}

pub async fn get_device(db: &Db, p: &Principal, id: &str) -> AppResult<Device> {
    p.require(Role::Viewer, "reading devices")?;
    let mut conn = db.pool().acquire().await?;
    fetch_device(&mut conn, p.org(), id).await
}

/// Events shown with a device.
pub const RECENT_EVENTS: i64 = 50;

/// A device with its inventory, groups (static memberships and the dynamic groups it
/// matches now) and newest events.
pub async fn get_device_detail(db: &Db, p: &Principal, id: &str) -> AppResult<DeviceDetail> {
    p.require(Role::Viewer, "reading devices")?;
    let mut conn = db.pool().acquire().await?;
    let device = fetch_device(&mut conn, p.org(), id).await?;
    let attrs: Vec<(String, String)> = sqlx::query_as("SELECT key, value FROM device_attributes WHERE device_id = $1")
        .bind(id.to_string())
        .fetch_all(&mut *conn)
        .await?;
    let (inventory_at, connected_at): (Option<i64>, Option<i64>) =
        sqlx::query_as("SELECT inventory_at, connected_at FROM devices WHERE id = $1")
            .bind(id.to_string())
            .fetch_one(&mut *conn)
            .await?;
    let events: Vec<(i64, String, String)> = sqlx::query_as(
        "SELECT at, kind, detail FROM device_events WHERE device_id = $1 ORDER BY at DESC, id DESC LIMIT $2",
    )
    .bind(id.to_string())
    .bind(RECENT_EVENTS)
    .fetch_all(&mut *conn)
    .await?;
    let mut groups: Vec<GroupRef> = sqlx::query_as::<_, (String, String)>(
        "SELECT g.id, g.name FROM device_group_members m JOIN device_groups g ON g.id = m.group_id \
         WHERE m.device_id = $1 ORDER BY g.name",
    )
    .bind(id.to_string())
    .fetch_all(&mut *conn)
    .await?
    .into_iter()
    .map(|(id, name)| GroupRef { id, name, kind: GroupKind::Static })
    .collect();
    let dynamic: Vec<(String, String, Option<String>)> = sqlx::query_as(
        "SELECT id, name, filter FROM device_groups WHERE org_id = $1 AND kind = 'dynamic' ORDER BY name",
    )
    .bind(p.org().to_string())
    .fetch_all(&mut *conn)
    .await?;
    let artifact = match device.software.as_ref().and_then(|sw| sw.artifact.clone()) {
        Some(a) => crate::artifacts::fetch(&mut conn, p.org(), &a).await.ok(),
        None => None,
    };
    drop(conn);
    for (gid, name, filter) in dynamic {
        // A stored filter parsed when it was saved; one that no longer does matches nothing.
        let Some(Ok(e)) = filter.as_deref().map(drover_proto::filter::parse) else { continue };
        let mut c = crate::filter::compile(&e, p.org());
        c.sql = format!("d.id = ? AND {}", c.sql);
        c.binds.insert(0, Bind::Text(id.to_string()));
        if count_where(db, p.org(), c).await? > 0 {
            groups.push(GroupRef { id: gid, name, kind: GroupKind::Dynamic });
        }
    }
    Ok(DeviceDetail {
        device,
        attributes: attrs.into_iter().collect(),
        inventory_at: opt_rfc3339(inventory_at),
        connected_at: opt_rfc3339(connected_at),
        groups,
        recent_events: events
            .into_iter()
            .map(|(at, kind, detail)| DeviceEvent { at: to_rfc3339(at), kind, detail })
            .collect(),
        artifact,
    })
}

fn tags_summary(tags: &BTreeMap<String, String>) -> String {
    let s = tags_json(tags);
    if s.len() > 300 { format!("{}…", s.chars().take(300).collect::<String>()) } else { s }
}

async fn change_tags(
    db: &Db,
    p: &Principal,
    id: &str,
    change: impl FnOnce(&BTreeMap<String, String>) -> BTreeMap<String, String>,
) -> AppResult<Device> {
    p.require(Role::Operator, "changing device tags")?;
    let mut tx = db.begin_write().await?;
    let before = fetch_device(tx.conn(), p.org(), id).await?;
    let after_tags = change(&before.tags);
    check_tags(&after_tags)?;
    if after_tags != before.tags {
        write_tags(tx.conn(), id, &before.tags, &after_tags).await?;
        sqlx::query("UPDATE devices SET updated_at = $1 WHERE id = $2")
            .bind(now_ms())
            .bind(id.to_string())
            .execute(tx.conn())
            .await?;
        let summary = format!("tags {} → {}", tags_summary(&before.tags), tags_summary(&after_tags));
        audit::append(
            tx.conn(),
            Event { actor: p, action: "device.tags", target_kind: "device", target_id: id, summary },
        )
        .await?;
    }
    let after = fetch_device(tx.conn(), p.org(), id).await?;
    tx.commit().await?;
    Ok(after)
}

/// `PUT …/tags`: the device's tags become exactly these.
pub async fn replace_tags(db: &Db, p: &Principal, id: &str, req: ReplaceTags) -> AppResult<Device> {
    change_tags(db, p, id, |_| req.tags).await
}

/// `PATCH …/tags`: set some, remove others (a key both set and removed is refused).
pub async fn patch_tags(db: &Db, p: &Principal, id: &str, req: PatchTags) -> AppResult<Device> {
    if let Some(k) = req.remove.iter().find(|k| req.set.contains_key(*k)) {
        return Err(AppError::BadRequest(format!("tag {k:?} is both set and removed")));
    }
    if req.remove.len() > MAX_TAGS * 4 {
        return Err(AppError::BadRequest("too many tags to remove".into()));
    }
    change_tags(db, p, id, |old| {
        let mut t = old.clone();
        for k in &req.remove {
            t.remove(k);
        }
        t.extend(req.set);
        t
    })
    .await
}

/// `PATCH /api/v1/devices/{id}`: an operator names a device, or clears its name (`null`).
pub async fn patch_device(db: &Db, p: &Principal, id: &str, req: DevicePatch) -> AppResult<Device> {
    p.require(Role::Operator, "renaming devices")?;
    if let Some(n) = &req.name {
        check_device_name(n)?;
    }
    let mut tx = db.begin_write().await?;
    let before = fetch_device(tx.conn(), p.org(), id).await?;
    if before.name != req.name {
        sqlx::query("UPDATE devices SET name = $1, updated_at = $2 WHERE id = $3")
            .bind(req.name.clone())
            .bind(now_ms())
            .bind(id.to_string())
            .execute(tx.conn())
            .await?;
        refresh_display_name(tx.conn(), id).await?;
        let summary = match (&before.name, &req.name) {
            (_, Some(n)) => format!("named {n:?} (was {:?})", before.display_name),
            (Some(old), None) => format!("name {old:?} cleared"),
            (None, None) => unreachable!("names differ"),
        };
        audit::append(
            tx.conn(),
            Event { actor: p, action: "device.rename", target_kind: "device", target_id: id, summary },
        )
        .await?;
    }
    let after = fetch_device(tx.conn(), p.org(), id).await?;
    tx.commit().await?;
    Ok(after)
}

/// An operator's decision about a device: accept, reject or decommission.
pub async fn decide(db: &Db, ca: &FleetCa, p: &Principal, id: &str, to: DeviceStatus) -> AppResult<Device> {
    p.require(Role::Operator, "accepting, rejecting or decommissioning devices")?;
    let mut tx = db.begin_write().await?;
    let device = fetch_device(tx.conn(), p.org(), id).await?;
    let allowed = matches!(
        (device.status, to),
        (DeviceStatus::Pending, DeviceStatus::Accepted | DeviceStatus::Rejected)
            | (DeviceStatus::Accepted | DeviceStatus::Rejected | DeviceStatus::Pending, DeviceStatus::Decommissioned)
    );
    if device.status == to {
        return Ok(device);
    }
    if !allowed {
        return Err(AppError::Conflict(format!("a {} device cannot become {}", device.status.as_str(), to.as_str())));
    }
    let now = now_ms();
    let mut consumed = false;
    let action = match to {
        DeviceStatus::Accepted => {
            let (csr,): (String,) = sqlx::query_as("SELECT csr_pem FROM devices WHERE id = $1")
                .bind(id.to_string())
                .fetch_one(tx.conn())
                .await?;
            let issued = ca.issue_device(&csr, id).map_err(|e| AppError::Internal(e.to_string()))?;
            sqlx::query(
                "UPDATE devices SET status = 'accepted', cert_pem = $1, cert_serial = $2, cert_not_after = $3, \
                 enrolled_via = $4, updated_at = $5 WHERE id = $6",
            )
            .bind(issued.cert_pem)
            .bind(issued.serial_hex)
            .bind((issued.not_after.unix_timestamp_nanos() / 1_000_000) as i64)
            .bind(format!("accepted:{}", p.name))
            .bind(now)
            .bind(id.to_string())
            .execute(tx.conn())
            .await?;
            "device.accept"
        }
        DeviceStatus::Rejected => {
            sqlx::query("UPDATE devices SET status = 'rejected', updated_at = $1 WHERE id = $2")
                .bind(now)
                .bind(id.to_string())
                .execute(tx.conn())
                .await?;
            "device.reject"
        }
        DeviceStatus::Decommissioned => {
            sqlx::query(
                "UPDATE devices SET status = 'decommissioned', cert_revoked_at = $1, updated_at = $1, online = 0 WHERE id = $2",
            )
            .bind(now)
            .bind(id.to_string())
            .execute(tx.conn())
            .await?;
            crate::deployments::end_for_device(tx.conn(), id, now).await?;
            // Its pre-authorization is spent: the identity (a stolen device's, say) is not
            // accepted again with a new key unless an operator vouches for it anew.
            let (hash,): (String,) = sqlx::query_as("SELECT identity_hash FROM devices WHERE id = $1")
                .bind(id.to_string())
                .fetch_one(tx.conn())
                .await?;
            consumed = crate::preauth::consume(tx.conn(), &hash).await?;
            "device.decommission"
        }
        DeviceStatus::Pending => return Err(AppError::BadRequest("a device cannot be made pending".into())),
    };
    let identity = identity_json(&device.identity);
    let mut summary = format!("device {identity}: {} → {}", device.status.as_str(), to.as_str());
    if consumed {
        summary.push_str("; its pre-authorization is used up");
    }
    audit::append(tx.conn(), Event { actor: p, action, target_kind: "device", target_id: id, summary }).await?;
    let after = fetch_device(tx.conn(), p.org(), id).await?;
    tx.commit().await?;
    Ok(after)
}

/// Pre-authorizations live in their own room; these are their old addresses.
pub use crate::preauth::{MAX_CSV_ROWS, preauthorize, preauthorize_csv};

type TokenRow = (String, String, String, Option<i64>, i64, String, String, i64, Option<i64>, Option<i64>, String);
const TOKEN_COLUMNS: &str =
    "id, name, prefix, max_uses, uses, tags, created_by, created_at, expires_at, revoked_at, groups";

/// Group names by id, to show a token's groups (stored by id, so a renamed group follows).
async fn group_names(conn: &mut sqlx::AnyConnection, org_id: &str) -> Result<BTreeMap<String, String>, sqlx::Error> {
    let rows: Vec<(String, String)> = sqlx::query_as("SELECT id, name FROM device_groups WHERE org_id = $1")
        .bind(org_id.to_string())
        .fetch_all(conn)
        .await?;
    Ok(rows.into_iter().collect())
}

fn to_token(r: TokenRow, names: &BTreeMap<String, String>) -> EnrollmentToken {
    let groups = parse_list(&r.10).iter().filter_map(|id| names.get(id).cloned()).collect();
    EnrollmentToken {
        id: r.0,
        name: r.1,
        prefix: r.2,
        max_uses: r.3.and_then(|m| u32::try_from(m).ok()),
        uses: u32::try_from(r.4).unwrap_or(u32::MAX),
        tags: parse_map(&r.5),
        created_by: r.6,
        created_at: to_rfc3339(r.7),
        expires_at: opt_rfc3339(r.8),
        revoked_at: opt_rfc3339(r.9),
        groups,
    }
}

pub async fn create_enrollment_token(
    db: &Db,
    p: &Principal,
    req: CreateEnrollmentToken,
) -> AppResult<CreatedEnrollmentToken> {
    p.require(Role::Operator, "creating enrollment tokens")?;
    validate::display_name("enrollment token", &req.name).map_err(AppError::BadRequest)?;
    if req.max_uses == Some(0) {
        return Err(AppError::BadRequest("max_uses must be at least 1 (omit it for no limit)".into()));
    }
    if req.expires_in_days == Some(0) || req.expires_in_days.is_some_and(|d| d > 3650) {
        return Err(AppError::BadRequest("expires_in_days must be between 1 and 3650".into()));
    }
    check_tags(&req.tags)?;
    if req.groups.len() > 64 {
        return Err(AppError::BadRequest("an enrollment token has at most 64 groups".into()));
    }
    let mut tx = db.begin_write().await?;
    let mut group_ids = Vec::new();
    for name in &req.groups {
        let g: Option<(String, String)> =
            sqlx::query_as("SELECT id, kind FROM device_groups WHERE org_id = $1 AND name = $2")
                .bind(p.org().to_string())
                .bind(name.clone())
                .fetch_optional(tx.conn())
                .await?;
        match g {
            None => return Err(AppError::BadRequest(format!("groups: there is no group named {name:?}"))),
            Some((_, kind)) if kind != "static" => {
                return Err(AppError::BadRequest(format!(
                    "groups: {name:?} is a dynamic group; devices join it by matching its filter"
                )));
            }
            Some((id, _)) if !group_ids.contains(&id) => group_ids.push(id),
            Some(_) => {}
        }
    }
    let secret = format!("{ENROLL_TOKEN_PREFIX}{}", auth::random_secret(32));
    let id = new_id();
    let now = now_ms();
    sqlx::query(
        "INSERT INTO enrollment_tokens (id, org_id, name, secret_hash, prefix, max_uses, uses, tags, created_by, created_at, expires_at, groups) \
         VALUES ($1, $2, $3, $4, $5, $6, 0, $7, $8, $9, $10, $11)",
    )
    .bind(id.clone())
    .bind(p.org().to_string())
    .bind(req.name.clone())
    .bind(auth::sha256_hex(&secret))
    .bind(secret.chars().take(12).collect::<String>())
    .bind(req.max_uses.map(i64::from))
    .bind(tags_json(&req.tags))
    .bind(p.name.clone())
    .bind(now)
    .bind(req.expires_in_days.map(|d| now + i64::from(d) * 86_400_000))
    .bind(serde_json::to_string(&group_ids).unwrap_or_else(|_| "[]".into()))
    .execute(tx.conn())
    .await?;
    let limit = req.max_uses.map(|m| format!("{m} uses")).unwrap_or_else(|| "unlimited uses".into());
    let groups = if req.groups.is_empty() { String::new() } else { format!(", groups {:?}", req.groups) };
    let summary = format!("enrollment token {:?}, {limit}, tags {}{groups}", req.name, tags_json(&req.tags));
    audit::append(
        tx.conn(),
        Event { actor: p, action: "enrollment_token.create", target_kind: "enrollment_token", target_id: &id, summary },
    )
    .await?;
    let row: TokenRow = sqlx::query_as(&format!("SELECT {TOKEN_COLUMNS} FROM enrollment_tokens WHERE id = $1"))
        .bind(id.clone())
        .fetch_one(tx.conn())
        .await?;
    let names = group_names(tx.conn(), p.org()).await?;
    tx.commit().await?;
    Ok(CreatedEnrollmentToken { token: to_token(row, &names), secret })
}

const TOKEN_SORTS: &[SortField] = &[SortField { name: "created_at", column: "created_at", int: true }];

/// Enrollment tokens, newest first, a page at a time.
pub async fn list_enrollment_tokens(
    db: &Db,
    p: &Principal,
    q: &drover_proto::api::EnrollmentTokenQuery,
) -> AppResult<Page<EnrollmentToken>> {
    p.require(Role::Viewer, "listing enrollment tokens")?;
    let page = PageRequest::parse(q.limit, q.cursor.as_deref(), None, TOKEN_SORTS, "-created_at")?;
    let mut f = Filter::default();
    f.and("org_id = ?", [Bind::Text(p.org().to_string())]);
    page.apply(&mut f, Some("id"));
    let sql = format!("SELECT {TOKEN_COLUMNS} FROM enrollment_tokens{}{}", f.sql(), page.order_limit(Some("id")));
    let rows: Vec<TokenRow> = bind_all(sqlx::query_as(&sql), &f.binds).fetch_all(db.pool()).await?;
    let (rows, next_cursor) = page.finish(rows, |r| (CursorValue::Int(r.7), Some(r.0.clone())));
    let mut conn = db.pool().acquire().await?;
    let names = group_names(&mut conn, p.org()).await?;
    Ok(Page { items: rows.into_iter().map(|r| to_token(r, &names)).collect(), next_cursor })
}

pub async fn revoke_enrollment_token(db: &Db, p: &Principal, id: &str) -> AppResult<EnrollmentToken> {
    p.require(Role::Operator, "revoking enrollment tokens")?;
    let mut tx = db.begin_write().await?;
    let row: Option<TokenRow> =
        sqlx::query_as(&format!("SELECT {TOKEN_COLUMNS} FROM enrollment_tokens WHERE org_id = $1 AND id = $2"))
            .bind(p.org().to_string())
            .bind(id.to_string())
            .fetch_optional(tx.conn())
            .await?;
    let names = group_names(tx.conn(), p.org()).await?;
    let token = to_token(row.ok_or_else(|| AppError::NotFound(format!("no enrollment token with id {id:?}")))?, &names);
    if token.revoked_at.is_none() {
        sqlx::query("UPDATE enrollment_tokens SET revoked_at = $1 WHERE id = $2")
            .bind(now_ms())
            .bind(id.to_string())
            .execute(tx.conn())
            .await?;
        let summary = format!("enrollment token {:?} revoked after {} uses", token.name, token.uses);
        audit::append(
            tx.conn(),
            Event {
                actor: p,
                action: "enrollment_token.revoke",
                target_kind: "enrollment_token",
                target_id: id,
                summary,
            },
        )
        .await?;
    }
    let row: TokenRow = sqlx::query_as(&format!("SELECT {TOKEN_COLUMNS} FROM enrollment_tokens WHERE id = $1"))
        .bind(id.to_string())
        .fetch_one(tx.conn())
        .await?;
    tx.commit().await?;
    Ok(to_token(row, &names))
}

/// The display names of the organization's devices among `ids`, for pages that show a device
/// they know only by id (deployments, alerts, the audit log, remote sessions). Ids of no
/// device of the organization are left out.
pub async fn display_names(db: &Db, org: &str, ids: &[String]) -> AppResult<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    let mut ids: Vec<&String> = ids.iter().collect();
    ids.sort();
    ids.dedup();
    for chunk in ids.chunks(500) {
        let marks: Vec<String> = (0..chunk.len()).map(|i| format!("${}", i + 2)).collect();
        let sql = format!("SELECT id, {DISPLAY_NAME} FROM devices WHERE org_id = $1 AND id IN ({})", marks.join(", "));
        let mut q = sqlx::query_as::<_, (String, String)>(&sql).bind(org.to_string());
        for id in chunk {
            q = q.bind((*id).clone());
        }
        out.extend(q.fetch_all(db.pool()).await?);
    }
    Ok(out)
}

/// How many of the organization's accepted devices are online and offline.
pub async fn presence_counts(db: &Db, p: &Principal) -> AppResult<(i64, i64)> {
    p.require(Role::Viewer, "listing devices")?;
    let (online, all): (i64, i64) = sqlx::query_as(
        "SELECT COALESCE(SUM(CASE WHEN online <> 0 THEN 1 ELSE 0 END), 0), COUNT(*) FROM devices \
         WHERE org_id = $1 AND status = 'accepted'",
    )
    .bind(p.org().to_string())
    .fetch_one(db.pool())
    .await?;
    Ok((online, all - online))
}

/// The ids of the organization's devices whose display name is `name` (case-insensitive).
pub async fn ids_named(db: &Db, org: &str, name: &str) -> AppResult<Vec<String>> {
    let sql = format!("SELECT id FROM devices WHERE org_id = $1 AND LOWER({DISPLAY_NAME}) = $2 ORDER BY id LIMIT 100");
    let rows: Vec<(String,)> =
        sqlx::query_as(&sql).bind(org.to_string()).bind(name.trim().to_lowercase()).fetch_all(db.pool()).await?;
    Ok(rows.into_iter().map(|r| r.0).collect())
}

/// The SQL for a device's display name (see `Device::display_name`).
const DISPLAY_NAME: &str = "display_name";

#[cfg(test)]
mod tests {
    #[test]
    fn enrollment_buckets_fill_at_the_rate_and_count_ipv6_by_its_64() {
        let mut config = crate::config::Config::defaults(std::path::Path::new("/nonexistent"));
        config.enroll_pending_per_minute = 2;
        let l = super::EnrollLimiter::new(&config);
        let t0 = std::time::Instant::now();
        let a: std::net::IpAddr = "2001:db8:1:2::10".parse().unwrap();
        let same_64: std::net::IpAddr = "2001:db8:1:2:ffff::1".parse().unwrap();
        let other_64: std::net::IpAddr = "2001:db8:1:3::10".parse().unwrap();
        assert!(l.take(Some(a), false, t0).is_ok());
        assert!(l.take(Some(same_64), false, t0).is_ok());
        assert_eq!(l.take(Some(a), false, t0), Err(30), "one more in 30 s at 2 a minute");
        assert!(l.take(Some(other_64), false, t0).is_ok());
        assert!(l.take(Some(a), true, t0).is_ok(), "requests with proof have their own bucket");
        assert!(l.take(Some(a), false, t0 + std::time::Duration::from_secs(30)).is_ok());
    }
}
