//! The device registry and enrollment: a device asks with a CSR and its identity, and is
//! accepted at once (enrollment token, pre-authorized identity) or waits for an operator.
//! Every lifecycle step is audited.

use std::collections::BTreeMap;

use drover_proto::api::{
    CreateEnrollmentToken, CreatedEnrollmentToken, Device, DeviceListQuery, DeviceStatus, EnrollRequest,
    EnrollResponse, EnrollmentToken, Page, Preauthorize, Preauthorized, PrincipalKind, Role,
};
use drover_proto::validate;

use crate::audit::{self, Event};
use crate::auth::{self, Principal};
use crate::ca::FleetCa;
use crate::db::{Bind, Db, Filter, bind_all};
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

fn identity_json(identity: &BTreeMap<String, String>) -> String {
    // A BTreeMap serializes in key order: one identity, one text, one hash.
    serde_json::to_string(identity).unwrap_or_default()
}

fn tags_json(tags: &BTreeMap<String, String>) -> String {
    serde_json::to_string(tags).unwrap_or_else(|_| "{}".into())
}

fn parse_map(text: &str) -> BTreeMap<String, String> {
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

type DeviceRow = (String, String, String, String, Option<i64>, String, i64, i64);
const DEVICE_COLUMNS: &str = "id, status, identity, tags, cert_not_after, enrolled_via, created_at, updated_at";

fn to_device(r: DeviceRow) -> AppResult<Device> {
    Ok(Device {
        id: r.0,
        status: DeviceStatus::parse(&r.1)
            .ok_or_else(|| AppError::Internal(format!("unknown device status {:?}", r.1)))?,
        identity: parse_map(&r.2),
        tags: parse_map(&r.3),
        certificate_expires_at: opt_rfc3339(r.4),
        enrolled_via: r.5,
        created_at: to_rfc3339(r.6),
        updated_at: to_rfc3339(r.7),
    })
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
pub async fn enroll(db: &Db, ca: &FleetCa, req: EnrollRequest, source: &str) -> AppResult<EnrollResponse> {
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
    let (org_id, via, tags, token_id): (String, Option<String>, _, _) = match &req.token {
        Some(secret) => {
            let row: Option<(String, String, String, Option<i64>, i64, String, Option<i64>, Option<i64>)> = sqlx::query_as(
                "SELECT id, org_id, name, max_uses, uses, tags, expires_at, revoked_at FROM enrollment_tokens WHERE secret_hash = $1",
            )
            .bind(auth::sha256_hex(secret))
            .fetch_optional(tx.conn())
            .await?;
            let unknown = || AppError::Unauthorized("the enrollment token is unknown or revoked".into());
            let (tid, org, name, max_uses, uses, tags, expires_at, revoked_at) = row.ok_or_else(unknown)?;
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
            (org, Some(format!("token:{name}")), parse_map(&tags), Some(tid))
        }
        None => {
            let pre: Option<(String,)> =
                sqlx::query_as("SELECT org_id FROM preauthorizations WHERE identity_hash = $1")
                    .bind(identity_hash.clone())
                    .fetch_optional(tx.conn())
                    .await?;
            match pre {
                Some((org,)) => (org, Some("preauthorized".to_string()), BTreeMap::new(), None),
                None => (find_org(db, None).await?, None, BTreeMap::new(), None),
            }
        }
    };

    // One live device per identity: a replacement needs the old one decommissioned first.
    let dup: Option<(String,)> = sqlx::query_as(
        "SELECT id FROM devices WHERE org_id = $1 AND identity_hash = $2 AND status <> 'decommissioned'",
    )
    .bind(org_id.clone())
    .bind(identity_hash.clone())
    .fetch_optional(tx.conn())
    .await?;
    if let Some((other,)) = dup {
        return Err(AppError::Conflict(format!(
            "a device with this identity is enrolled already ({other}) with another key: decommission it to enroll a replacement"
        )));
    }

    let id = new_id();
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
         cert_not_after, enrolled_via, tags, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $13)",
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
    .bind(tags_json(&tags))
    .bind(now)
    .execute(tx.conn())
    .await?;
    if let Some(tid) = token_id {
        sqlx::query("UPDATE enrollment_tokens SET uses = uses + 1 WHERE id = $1").bind(tid).execute(tx.conn()).await?;
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

const DEVICE_SORTS: &[SortField] = &[
    SortField { name: "created_at", column: "created_at", int: true },
    SortField { name: "updated_at", column: "updated_at", int: true },
];

pub async fn list_devices(db: &Db, p: &Principal, q: &DeviceListQuery) -> AppResult<Page<Device>> {
    p.require(Role::Viewer, "listing devices")?;
    let page = PageRequest::parse(q.limit, q.cursor.as_deref(), q.sort.as_deref(), DEVICE_SORTS, "-created_at")?;
    let mut f = Filter::default();
    f.and("org_id = ?", [Bind::Text(p.org().to_string())]);
    if let Some(s) = q.status {
        f.and("status = ?", [Bind::Text(s.as_str().into())]);
    }
    page.apply(&mut f, Some("id"));
    let sql = format!("SELECT {DEVICE_COLUMNS} FROM devices{}{}", f.sql(), page.order_limit(Some("id")));
    let rows: Vec<DeviceRow> = bind_all(sqlx::query_as(&sql), &f.binds).fetch_all(db.pool()).await?;
    let by_updated = page.sort.field.name == "updated_at";
    let (rows, next_cursor) =
        page.finish(rows, |r| (CursorValue::Int(if by_updated { r.7 } else { r.6 }), Some(r.0.clone())));
    Ok(Page { items: rows.into_iter().map(to_device).collect::<AppResult<_>>()?, next_cursor })
}

async fn fetch_device(conn: &mut sqlx::AnyConnection, org_id: &str, id: &str) -> AppResult<Device> {
    let row: Option<DeviceRow> =
        sqlx::query_as(&format!("SELECT {DEVICE_COLUMNS} FROM devices WHERE org_id = $1 AND id = $2"))
            .bind(org_id.to_string())
            .bind(id.to_string())
            .fetch_optional(conn)
            .await?;
    to_device(row.ok_or_else(|| AppError::NotFound(format!("no device with id {id:?}")))?)
}

pub async fn get_device(db: &Db, p: &Principal, id: &str) -> AppResult<Device> {
    p.require(Role::Viewer, "reading devices")?;
    let mut conn = db.pool().acquire().await?;
    fetch_device(&mut conn, p.org(), id).await
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
                "UPDATE devices SET status = 'decommissioned', cert_revoked_at = $1, updated_at = $1 WHERE id = $2",
            )
            .bind(now)
            .bind(id.to_string())
            .execute(tx.conn())
            .await?;
            "device.decommission"
        }
        DeviceStatus::Pending => return Err(AppError::BadRequest("a device cannot be made pending".into())),
    };
    let identity = identity_json(&device.identity);
    let summary = format!("device {identity}: {} → {}", device.status.as_str(), to.as_str());
    audit::append(tx.conn(), Event { actor: p, action, target_kind: "device", target_id: id, summary }).await?;
    let after = fetch_device(tx.conn(), p.org(), id).await?;
    tx.commit().await?;
    Ok(after)
}

pub async fn preauthorize(db: &Db, p: &Principal, req: Preauthorize) -> AppResult<Preauthorized> {
    p.require(Role::Operator, "pre-authorizing devices")?;
    if req.identities.is_empty() || req.identities.len() > 10_000 {
        return Err(AppError::BadRequest("give 1 to 10000 identities".into()));
    }
    for (i, identity) in req.identities.iter().enumerate() {
        check_identity(identity)
            .map_err(|e| AppError::BadRequest(format!("identity {}: {}", i + 1, e.public_message())))?;
    }
    let mut tx = db.begin_write().await?;
    let (mut added, mut already) = (0u32, 0u32);
    for identity in &req.identities {
        let text = identity_json(identity);
        let hash = auth::sha256_hex(&text);
        let exists: Option<(String,)> = sqlx::query_as("SELECT org_id FROM preauthorizations WHERE identity_hash = $1")
            .bind(hash.clone())
            .fetch_optional(tx.conn())
            .await?;
        match exists {
            Some((org,)) if org == p.org() => already += 1,
            Some(_) => {
                return Err(AppError::Conflict(format!("identity {text} is pre-authorized by another organization")));
            }
            None => {
                sqlx::query(
                    "INSERT INTO preauthorizations (id, org_id, identity, identity_hash, created_by, created_at) VALUES ($1, $2, $3, $4, $5, $6)",
                )
                .bind(new_id())
                .bind(p.org().to_string())
                .bind(text)
                .bind(hash)
                .bind(p.name.clone())
                .bind(now_ms())
                .execute(tx.conn())
                .await?;
                added += 1;
            }
        }
    }
    if added > 0 {
        let summary = format!("{added} device identities pre-authorized");
        audit::append(
            tx.conn(),
            Event { actor: p, action: "device.preauthorize", target_kind: "device", target_id: "-", summary },
        )
        .await?;
    }
    tx.commit().await?;
    Ok(Preauthorized { added, already })
}

type TokenRow = (String, String, String, Option<i64>, i64, String, String, i64, Option<i64>, Option<i64>);
const TOKEN_COLUMNS: &str = "id, name, prefix, max_uses, uses, tags, created_by, created_at, expires_at, revoked_at";

fn to_token(r: TokenRow) -> EnrollmentToken {
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
    drover_proto::device::check_inventory(&req.tags).map_err(|e| AppError::BadRequest(format!("tags: {e}")))?;
    let secret = format!("{ENROLL_TOKEN_PREFIX}{}", auth::random_secret(32));
    let id = new_id();
    let now = now_ms();
    let mut tx = db.begin_write().await?;
    sqlx::query(
        "INSERT INTO enrollment_tokens (id, org_id, name, secret_hash, prefix, max_uses, uses, tags, created_by, created_at, expires_at) \
         VALUES ($1, $2, $3, $4, $5, $6, 0, $7, $8, $9, $10)",
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
    .execute(tx.conn())
    .await?;
    let limit = req.max_uses.map(|m| format!("{m} uses")).unwrap_or_else(|| "unlimited uses".into());
    let summary = format!("enrollment token {:?}, {limit}, tags {}", req.name, tags_json(&req.tags));
    audit::append(
        tx.conn(),
        Event { actor: p, action: "enrollment_token.create", target_kind: "enrollment_token", target_id: &id, summary },
    )
    .await?;
    let row: TokenRow = sqlx::query_as(&format!("SELECT {TOKEN_COLUMNS} FROM enrollment_tokens WHERE id = $1"))
        .bind(id.clone())
        .fetch_one(tx.conn())
        .await?;
    tx.commit().await?;
    Ok(CreatedEnrollmentToken { token: to_token(row), secret })
}

pub async fn list_enrollment_tokens(db: &Db, p: &Principal) -> AppResult<Vec<EnrollmentToken>> {
    p.require(Role::Viewer, "listing enrollment tokens")?;
    let rows: Vec<TokenRow> = sqlx::query_as(&format!(
        "SELECT {TOKEN_COLUMNS} FROM enrollment_tokens WHERE org_id = $1 ORDER BY created_at DESC, id DESC"
    ))
    .bind(p.org().to_string())
    .fetch_all(db.pool())
    .await?;
    Ok(rows.into_iter().map(to_token).collect())
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
    let token = to_token(row.ok_or_else(|| AppError::NotFound(format!("no enrollment token with id {id:?}")))?);
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
    Ok(to_token(row))
}
