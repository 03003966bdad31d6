//! The operations behind the REST API, the web UI and droverd's command line: each checks
//! the caller's role, validates its input, makes its change and writes the audit entry in
//! the same transaction.

use std::net::IpAddr;
use std::time::Instant;

use drover_proto::api::{
    ApiToken, ChangePassword, CreateToken, CreateUser, CreatedToken, CreatedUser, Me, Organization, Page,
    PrincipalKind, Role, SetPassword, TokenListQuery, UpdateOrganization, UpdateUser, User, UserListQuery,
};
use drover_proto::validate;

use crate::audit::{self, Event};
use crate::auth::{self, LoginLimiter, Principal};
use crate::db::{Bind, Db, Filter, bind_all, is_unique_violation};
use crate::error::{AppError, AppResult};
use crate::page::{CursorValue, PageRequest, SortField};
use crate::time::{now_ms, opt_rfc3339, to_rfc3339};

pub fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

fn role_of(s: &str) -> AppResult<Role> {
    Role::parse(s).ok_or_else(|| AppError::Internal(format!("unknown role {s:?} in the database")))
}

// ---------------------------------------------------------------- organizations

pub async fn get_org(db: &Db, id: &str) -> AppResult<Organization> {
    let row: Option<(String, String, i64)> =
        sqlx::query_as("SELECT id, name, created_at FROM organizations WHERE id = $1")
            .bind(id.to_string())
            .fetch_optional(db.pool())
            .await?;
    let (id, name, created_at) = row.ok_or_else(|| AppError::NotFound("organization not found".into()))?;
    Ok(Organization { id, name, created_at: to_rfc3339(created_at) })
}

/// The organization droverd's command line acts for when none is named: `default`, or the
/// oldest one.
pub async fn find_org(db: &Db, name: Option<&str>) -> AppResult<String> {
    let row: Option<(String,)> = match name {
        Some(n) => {
            sqlx::query_as("SELECT id FROM organizations WHERE name = $1")
                .bind(n.to_string())
                .fetch_optional(db.pool())
                .await?
        }
        None => sqlx::query_as(
            "SELECT id FROM organizations ORDER BY CASE WHEN name = 'default' THEN 0 ELSE 1 END, created_at LIMIT 1",
        )
        .fetch_optional(db.pool())
        .await?,
    };
    row.map(|r| r.0).ok_or_else(|| AppError::NotFound(format!("no organization {:?}", name.unwrap_or("default"))))
}

pub async fn update_org(db: &Db, p: &Principal, req: UpdateOrganization) -> AppResult<Organization> {
    p.require(Role::Admin, "renaming the organization")?;
    validate::display_name("organization", &req.name).map_err(AppError::BadRequest)?;
    let before = get_org(db, p.org()).await?;
    let mut tx = db.begin_write().await?;
    let res = sqlx::query("UPDATE organizations SET name = $1 WHERE id = $2")
        .bind(req.name.clone())
        .bind(p.org().to_string())
        .execute(tx.conn())
        .await;
    if let Err(e) = &res
        && is_unique_violation(e)
    {
        return Err(AppError::Conflict(format!("an organization named {:?} exists already", req.name)));
    }
    res?;
    let summary = format!("name: {:?} → {:?}", before.name, req.name);
    audit::append(
        tx.conn(),
        Event { actor: p, action: "organization.update", target_kind: "organization", target_id: p.org(), summary },
    )
    .await?;
    tx.commit().await?;
    get_org(db, p.org()).await
}

/// What the first start created.
pub struct Bootstrap {
    pub org_id: String,
    pub username: String,
    /// None when the password came from `DROVER_ADMIN_PASSWORD`.
    pub generated_password: Option<String>,
}

/// On an empty database: the default organization and its first administrator.
pub async fn bootstrap(db: &Db, admin_password: Option<String>) -> AppResult<Option<Bootstrap>> {
    let (orgs,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM organizations").fetch_one(db.pool()).await?;
    if orgs > 0 {
        return Ok(None);
    }
    let (password, generated) = match admin_password {
        Some(pw) => {
            validate::password(&pw).map_err(|e| AppError::BadRequest(format!("DROVER_ADMIN_PASSWORD: {e}")))?;
            (pw, false)
        }
        None => {
            let pw = auth::generate_password();
            (pw.clone(), true)
        }
    };
    let hash = auth::hash_password(password.clone()).await?;
    let org_id = new_id();
    let user_id = new_id();
    let now = now_ms();
    let mut tx = db.begin_write().await?;
    // Another replica may bootstrap at the same instant: the unique name decides.
    let inserted = sqlx::query("INSERT INTO organizations (id, name, created_at) VALUES ($1, 'default', $2)")
        .bind(org_id.clone())
        .bind(now)
        .execute(tx.conn())
        .await;
    if let Err(e) = &inserted
        && is_unique_violation(e)
    {
        return Ok(None);
    }
    inserted?;
    sqlx::query(
        "INSERT INTO users (id, org_id, username, password_hash, role, disabled, created_at) VALUES ($1, $2, 'admin', $3, 'admin', 0, $4)",
    )
    .bind(user_id.clone())
    .bind(org_id.clone())
    .bind(hash)
    .bind(now)
    .execute(tx.conn())
    .await?;
    let system = Principal::system(Some(&org_id));
    audit::append(
        tx.conn(),
        Event {
            actor: &system,
            action: "organization.create",
            target_kind: "organization",
            target_id: &org_id,
            summary: "first start: organization \"default\"".into(),
        },
    )
    .await?;
    audit::append(
        tx.conn(),
        Event {
            actor: &system,
            action: "user.create",
            target_kind: "user",
            target_id: &user_id,
            summary: "first start: user \"admin\" with role admin".into(),
        },
    )
    .await?;
    tx.commit().await?;
    Ok(Some(Bootstrap { org_id, username: "admin".into(), generated_password: generated.then_some(password) }))
}

// ---------------------------------------------------------------- users

type UserRow = (String, String, String, i64, i64, Option<i64>);
const USER_COLUMNS: &str = "id, username, role, disabled, created_at, last_login_at";

fn to_user(r: UserRow) -> AppResult<User> {
    Ok(User {
        id: r.0,
        username: r.1,
        role: role_of(&r.2)?,
        disabled: r.3 != 0,
        created_at: to_rfc3339(r.4),
        last_login_at: opt_rfc3339(r.5),
    })
}

const USER_SORTS: &[SortField] = &[
    SortField { name: "username", column: "username", int: false },
    SortField { name: "created_at", column: "created_at", int: true },
];

pub async fn list_users(db: &Db, p: &Principal, q: &UserListQuery) -> AppResult<Page<User>> {
    p.require(Role::Viewer, "listing users")?;
    let page = PageRequest::parse(q.limit, q.cursor.as_deref(), q.sort.as_deref(), USER_SORTS, "username")?;
    let mut f = Filter::default();
    f.and("org_id = ?", [Bind::Text(p.org().to_string())]);
    if let Some(role) = q.role {
        f.and("role = ?", [Bind::Text(role.as_str().into())]);
    }
    if let Some(d) = q.disabled {
        f.and("disabled = ?", [Bind::Int(i64::from(d))]);
    }
    if let Some(s) = q.q.as_deref().filter(|s| !s.is_empty()) {
        f.and("username LIKE ? ESCAPE '\\'", [Bind::Text(format!("%{}%", crate::db::like_escape(s)))]);
    }
    page.apply(&mut f, Some("id"));
    let sql = format!("SELECT {USER_COLUMNS} FROM users{}{}", f.sql(), page.order_limit(Some("id")));
    let rows: Vec<UserRow> = bind_all(sqlx::query_as(&sql), &f.binds).fetch_all(db.pool()).await?;
    let sort = page.sort.field.name;
    let (rows, next_cursor) = page.finish(rows, |r| {
        let v = if sort == "username" { CursorValue::Text(r.1.clone()) } else { CursorValue::Int(r.4) };
        (v, Some(r.0.clone()))
    });
    let items = rows.into_iter().map(to_user).collect::<AppResult<_>>()?;
    Ok(Page { items, next_cursor })
}

async fn fetch_user(conn: &mut sqlx::AnyConnection, org_id: &str, id: &str) -> AppResult<User> {
    let row: Option<UserRow> =
        sqlx::query_as(&format!("SELECT {USER_COLUMNS} FROM users WHERE org_id = $1 AND id = $2"))
            .bind(org_id.to_string())
            .bind(id.to_string())
            .fetch_optional(conn)
            .await?;
    to_user(row.ok_or_else(|| AppError::NotFound(format!("no user with id {id:?}")))?)
}

pub async fn get_user(db: &Db, p: &Principal, id: &str) -> AppResult<User> {
    p.require(Role::Viewer, "reading users")?;
    let mut conn = db.pool().acquire().await?;
    fetch_user(&mut conn, p.org(), id).await
}

pub async fn create_user(db: &Db, p: &Principal, req: CreateUser) -> AppResult<CreatedUser> {
    p.require(Role::Admin, "creating users")?;
    validate::username(&req.username).map_err(AppError::BadRequest)?;
    let (password, generated) = match req.password {
        Some(pw) => {
            validate::password(&pw).map_err(AppError::BadRequest)?;
            (pw, None)
        }
        None => {
            let pw = auth::generate_password();
            (pw.clone(), Some(pw))
        }
    };
    let hash = auth::hash_password(password).await?;
    let id = new_id();
    let mut tx = db.begin_write().await?;
    let res = sqlx::query(
        "INSERT INTO users (id, org_id, username, password_hash, role, disabled, created_at) VALUES ($1, $2, $3, $4, $5, 0, $6)",
    )
    .bind(id.clone())
    .bind(p.org().to_string())
    .bind(req.username.clone())
    .bind(hash)
    .bind(req.role.as_str())
    .bind(now_ms())
    .execute(tx.conn())
    .await;
    if let Err(e) = &res
        && is_unique_violation(e)
    {
        return Err(AppError::Conflict(format!("the username {:?} is taken", req.username)));
    }
    res?;
    let summary = format!("user {:?} with role {}", req.username, req.role);
    audit::append(tx.conn(), Event { actor: p, action: "user.create", target_kind: "user", target_id: &id, summary })
        .await?;
    let user = fetch_user(tx.conn(), p.org(), &id).await?;
    tx.commit().await?;
    Ok(CreatedUser { user, generated_password: generated })
}

/// Active administrators of an organization other than `except`.
async fn other_active_admins(conn: &mut sqlx::AnyConnection, org_id: &str, except: &str) -> AppResult<i64> {
    let (n,): (i64,) =
        sqlx::query_as("SELECT COUNT(*) FROM users WHERE org_id = $1 AND role = 'admin' AND disabled = 0 AND id <> $2")
            .bind(org_id.to_string())
            .bind(except.to_string())
            .fetch_one(conn)
            .await?;
    Ok(n)
}

pub async fn update_user(db: &Db, p: &Principal, id: &str, req: UpdateUser) -> AppResult<User> {
    p.require(Role::Admin, "changing users")?;
    let mut tx = db.begin_write().await?;
    let before = fetch_user(tx.conn(), p.org(), id).await?;
    let role = req.role.unwrap_or(before.role);
    let disabled = req.disabled.unwrap_or(before.disabled);
    let still_admin = role == Role::Admin && !disabled;
    if before.role == Role::Admin
        && !before.disabled
        && !still_admin
        && other_active_admins(tx.conn(), p.org(), id).await? == 0
    {
        return Err(AppError::Conflict(format!(
            "{:?} is the organization's last active admin: make another user admin first",
            before.username
        )));
    }
    if p.kind == PrincipalKind::User && p.id == id && disabled {
        return Err(AppError::Conflict("you cannot disable your own account".into()));
    }
    let mut changes = Vec::new();
    if role != before.role {
        changes.push(format!("role: {} → {}", before.role, role));
    }
    if disabled != before.disabled {
        changes.push(format!("disabled: {} → {}", before.disabled, disabled));
    }
    if changes.is_empty() {
        return Ok(before);
    }
    sqlx::query("UPDATE users SET role = $1, disabled = $2 WHERE id = $3")
        .bind(role.as_str())
        .bind(i64::from(disabled))
        .bind(id.to_string())
        .execute(tx.conn())
        .await?;
    if disabled || role != before.role {
        // A disabled user is signed out at once; a new role applies from the next login.
        sqlx::query("DELETE FROM sessions WHERE user_id = $1").bind(id.to_string()).execute(tx.conn()).await?;
    }
    let summary = format!("user {:?}: {}", before.username, changes.join(", "));
    audit::append(tx.conn(), Event { actor: p, action: "user.update", target_kind: "user", target_id: id, summary })
        .await?;
    let after = fetch_user(tx.conn(), p.org(), id).await?;
    tx.commit().await?;
    Ok(after)
}

pub async fn set_password(db: &Db, p: &Principal, id: &str, req: SetPassword) -> AppResult<()> {
    p.require(Role::Admin, "setting other users' passwords")?;
    validate::password(&req.password).map_err(AppError::BadRequest)?;
    let hash = auth::hash_password(req.password).await?;
    let mut tx = db.begin_write().await?;
    let user = fetch_user(tx.conn(), p.org(), id).await?;
    store_password(&mut tx, &user, hash).await?;
    let summary = format!("password of {:?} set by an admin; their sessions ended", user.username);
    audit::append(
        tx.conn(),
        Event { actor: p, action: "user.set_password", target_kind: "user", target_id: id, summary },
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

async fn store_password(tx: &mut crate::db::WriteTx, user: &User, hash: String) -> AppResult<()> {
    sqlx::query("UPDATE users SET password_hash = $1 WHERE id = $2")
        .bind(hash)
        .bind(user.id.clone())
        .execute(tx.conn())
        .await?;
    sqlx::query("DELETE FROM sessions WHERE user_id = $1").bind(user.id.clone()).execute(tx.conn()).await?;
    Ok(())
}

pub async fn change_own_password(db: &Db, p: &Principal, req: ChangePassword) -> AppResult<()> {
    if p.kind != PrincipalKind::User {
        return Err(AppError::Forbidden(
            "permission denied: only a signed-in user can change their own password; an API token has none".into(),
        ));
    }
    validate::password(&req.new_password).map_err(AppError::BadRequest)?;
    let stored: Option<(String,)> = sqlx::query_as("SELECT password_hash FROM users WHERE id = $1")
        .bind(p.id.clone())
        .fetch_optional(db.pool())
        .await?;
    if !auth::verify_password(req.current_password, stored.map(|s| s.0)).await {
        return Err(AppError::BadRequest("the current password is wrong".into()));
    }
    let hash = auth::hash_password(req.new_password).await?;
    let mut tx = db.begin_write().await?;
    let user = fetch_user(tx.conn(), p.org(), &p.id).await?;
    store_password(&mut tx, &user, hash).await?;
    audit::append(
        tx.conn(),
        Event {
            actor: p,
            action: "user.change_password",
            target_kind: "user",
            target_id: &p.id,
            summary: format!("{:?} changed their password; their sessions ended", user.username),
        },
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

pub async fn delete_user(db: &Db, p: &Principal, id: &str) -> AppResult<()> {
    p.require(Role::Admin, "deleting users")?;
    if p.kind == PrincipalKind::User && p.id == id {
        return Err(AppError::Conflict("you cannot delete your own account".into()));
    }
    let mut tx = db.begin_write().await?;
    let user = fetch_user(tx.conn(), p.org(), id).await?;
    if user.role == Role::Admin && !user.disabled && other_active_admins(tx.conn(), p.org(), id).await? == 0 {
        return Err(AppError::Conflict(format!("{:?} is the organization's last active admin", user.username)));
    }
    sqlx::query("DELETE FROM sessions WHERE user_id = $1").bind(id.to_string()).execute(tx.conn()).await?;
    sqlx::query("DELETE FROM users WHERE id = $1").bind(id.to_string()).execute(tx.conn()).await?;
    let summary = format!("user {:?} (role {}) deleted", user.username, user.role);
    audit::append(tx.conn(), Event { actor: p, action: "user.delete", target_kind: "user", target_id: id, summary })
        .await?;
    tx.commit().await?;
    Ok(())
}

// ---------------------------------------------------------------- tokens

type TokenRow = (String, String, String, String, String, i64, Option<i64>, Option<i64>, Option<i64>);
const TOKEN_COLUMNS: &str = "id, name, role, prefix, created_by, created_at, expires_at, last_used_at, revoked_at";

fn to_token(r: TokenRow) -> AppResult<ApiToken> {
    Ok(ApiToken {
        id: r.0,
        name: r.1,
        role: role_of(&r.2)?,
        prefix: r.3,
        created_by: r.4,
        created_at: to_rfc3339(r.5),
        expires_at: opt_rfc3339(r.6),
        last_used_at: opt_rfc3339(r.7),
        revoked_at: opt_rfc3339(r.8),
    })
}

const TOKEN_SORTS: &[SortField] = &[
    SortField { name: "created_at", column: "created_at", int: true },
    SortField { name: "name", column: "name", int: false },
];

pub async fn list_tokens(db: &Db, p: &Principal, q: &TokenListQuery) -> AppResult<Page<ApiToken>> {
    p.require(Role::Viewer, "listing tokens")?;
    let page = PageRequest::parse(q.limit, q.cursor.as_deref(), q.sort.as_deref(), TOKEN_SORTS, "-created_at")?;
    let mut f = Filter::default();
    f.and("org_id = ?", [Bind::Text(p.org().to_string())]);
    if let Some(role) = q.role {
        f.and("role = ?", [Bind::Text(role.as_str().into())]);
    }
    if !q.include_revoked.unwrap_or(false) {
        f.and("revoked_at IS NULL", []);
    }
    page.apply(&mut f, Some("id"));
    let sql = format!("SELECT {TOKEN_COLUMNS} FROM api_tokens{}{}", f.sql(), page.order_limit(Some("id")));
    let rows: Vec<TokenRow> = bind_all(sqlx::query_as(&sql), &f.binds).fetch_all(db.pool()).await?;
    let sort = page.sort.field.name;
    let (rows, next_cursor) = page.finish(rows, |r| {
        let v = if sort == "name" { CursorValue::Text(r.1.clone()) } else { CursorValue::Int(r.5) };
        (v, Some(r.0.clone()))
    });
    let items = rows.into_iter().map(to_token).collect::<AppResult<_>>()?;
    Ok(Page { items, next_cursor })
}

async fn fetch_token(conn: &mut sqlx::AnyConnection, org_id: &str, id: &str) -> AppResult<ApiToken> {
    let row: Option<TokenRow> =
        sqlx::query_as(&format!("SELECT {TOKEN_COLUMNS} FROM api_tokens WHERE org_id = $1 AND id = $2"))
            .bind(org_id.to_string())
            .bind(id.to_string())
            .fetch_optional(conn)
            .await?;
    to_token(row.ok_or_else(|| AppError::NotFound(format!("no token with id {id:?}")))?)
}

pub async fn get_token(db: &Db, p: &Principal, id: &str) -> AppResult<ApiToken> {
    p.require(Role::Viewer, "reading tokens")?;
    let mut conn = db.pool().acquire().await?;
    fetch_token(&mut conn, p.org(), id).await
}

pub async fn create_token(db: &Db, p: &Principal, req: CreateToken) -> AppResult<CreatedToken> {
    p.require(Role::Admin, "creating API tokens")?;
    validate::display_name("token", &req.name).map_err(AppError::BadRequest)?;
    if req.expires_in_days == Some(0) || req.expires_in_days.is_some_and(|d| d > 3650) {
        return Err(AppError::BadRequest("expires_in_days must be between 1 and 3650".into()));
    }
    let secret = auth::new_token_secret();
    let id = new_id();
    let now = now_ms();
    let expires_at = req.expires_in_days.map(|d| now + i64::from(d) * 86_400_000);
    let prefix: String = secret.chars().take(12).collect();
    let mut tx = db.begin_write().await?;
    sqlx::query(
        "INSERT INTO api_tokens (id, org_id, name, role, secret_hash, prefix, created_by, created_at, expires_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
    )
    .bind(id.clone())
    .bind(p.org().to_string())
    .bind(req.name.clone())
    .bind(req.role.as_str())
    .bind(auth::sha256_hex(&secret))
    .bind(prefix)
    .bind(p.name.clone())
    .bind(now)
    .bind(expires_at)
    .execute(tx.conn())
    .await?;
    let expiry = match req.expires_in_days {
        Some(d) => format!("expires in {d} days"),
        None => "does not expire".into(),
    };
    let summary = format!("token {:?} with role {}, {expiry}", req.name, req.role);
    audit::append(tx.conn(), Event { actor: p, action: "token.create", target_kind: "token", target_id: &id, summary })
        .await?;
    let token = fetch_token(tx.conn(), p.org(), &id).await?;
    tx.commit().await?;
    Ok(CreatedToken { token, secret })
}

pub async fn revoke_token(db: &Db, p: &Principal, id: &str) -> AppResult<ApiToken> {
    p.require(Role::Admin, "revoking API tokens")?;
    let mut tx = db.begin_write().await?;
    let token = fetch_token(tx.conn(), p.org(), id).await?;
    if token.revoked_at.is_some() {
        return Ok(token);
    }
    sqlx::query("UPDATE api_tokens SET revoked_at = $1 WHERE id = $2")
        .bind(now_ms())
        .bind(id.to_string())
        .execute(tx.conn())
        .await?;
    let summary = format!("token {:?} (role {}) revoked", token.name, token.role);
    audit::append(tx.conn(), Event { actor: p, action: "token.revoke", target_kind: "token", target_id: id, summary })
        .await?;
    let token = fetch_token(tx.conn(), p.org(), id).await?;
    tx.commit().await?;
    Ok(token)
}

// ---------------------------------------------------------------- authentication

fn unauthorized_token() -> AppError {
    AppError::Unauthorized("the API token is unknown, revoked or expired".into())
}

/// Resolves a bearer token to its principal.
pub async fn authenticate_token(db: &Db, secret: &str, source: String) -> AppResult<Principal> {
    if !secret.starts_with(auth::TOKEN_PREFIX) || secret.len() > 200 {
        return Err(unauthorized_token());
    }
    let row: Option<(String, String, String, String, Option<i64>, Option<i64>, Option<i64>)> = sqlx::query_as(
        "SELECT id, org_id, name, role, expires_at, revoked_at, last_used_at FROM api_tokens WHERE secret_hash = $1",
    )
    .bind(auth::sha256_hex(secret))
    .fetch_optional(db.pool())
    .await?;
    let (id, org_id, name, role, expires_at, revoked_at, last_used_at) = row.ok_or_else(unauthorized_token)?;
    let now = now_ms();
    if revoked_at.is_some() || expires_at.is_some_and(|e| e <= now) {
        return Err(unauthorized_token());
    }
    if last_used_at.is_none_or(|t| now - t > 60_000) {
        // Bookkeeping, not a change anyone made: not audited. Through the writer queue like
        // every write: on SQLite a write beside it would otherwise spin in the busy handler
        // while queued writers keep taking the lock (API calls took 10–30 s during a rollout).
        db.bookkeeping("UPDATE api_tokens SET last_used_at = $1 WHERE id = $2", now, &id).await?;
    }
    Ok(Principal {
        kind: PrincipalKind::Token,
        id,
        name,
        role: role_of(&role)?,
        org_id: Some(org_id),
        source,
        session_csrf: None,
    })
}

/// A new web session.
pub struct NewSession {
    /// The cookie value; only its hash is stored.
    pub cookie: String,
    pub csrf: String,
    pub principal: Principal,
}

pub const SESSION_MAX_AGE_MS: i64 = 7 * 86_400_000;

#[allow(clippy::too_many_arguments)]
pub async fn login(
    db: &Db,
    limiter: &LoginLimiter,
    username: &str,
    password: String,
    ip: Option<IpAddr>,
    source: String,
    idle_timeout_ms: i64,
) -> AppResult<NewSession> {
    let username = username.trim().to_lowercase();
    match limiter.check(&username, ip, Instant::now()) {
        Err(wait) => {
            return Err(AppError::TooManyRequests {
                message: format!("too many failed sign-ins from this address: try again in {wait} seconds"),
                retry_after_secs: wait,
            });
        }
        // Others are guessing this user's password: slower, but never refused.
        Ok(delay) if !delay.is_zero() => tokio::time::sleep(delay).await,
        Ok(_) => {}
    }
    let row: Option<(String, String, String, String, i64)> =
        sqlx::query_as("SELECT id, org_id, role, password_hash, disabled FROM users WHERE username = $1")
            .bind(username.clone())
            .fetch_optional(db.pool())
            .await?;
    let stored = row.as_ref().map(|r| r.3.clone());
    let ok = auth::verify_password(password, stored).await;
    let row = match row {
        Some(r) if ok && r.4 == 0 => r,
        _ => {
            limiter.failed(&username, ip, Instant::now());
            tracing::warn!(%username, %source, "failed sign-in");
            return Err(AppError::Unauthorized("wrong username or password, or the account is disabled".into()));
        }
    };
    limiter.succeeded(&username, ip);
    let (user_id, org_id, role, _, _) = row;
    let cookie = auth::random_secret(32);
    let csrf = auth::random_secret(24);
    let now = now_ms();
    let principal = Principal {
        kind: PrincipalKind::User,
        id: user_id.clone(),
        name: username.clone(),
        role: role_of(&role)?,
        org_id: Some(org_id),
        source,
        session_csrf: Some(csrf.clone()),
    };
    let mut tx = db.begin_write().await?;
    sqlx::query("DELETE FROM sessions WHERE expires_at < $1 OR last_seen_at < $2")
        .bind(now)
        .bind(now - idle_timeout_ms)
        .execute(tx.conn())
        .await?;
    sqlx::query("INSERT INTO sessions (id_hash, user_id, csrf_token, created_at, expires_at, last_seen_at) VALUES ($1, $2, $3, $4, $5, $6)")
        .bind(auth::sha256_hex(&cookie))
        .bind(user_id.clone())
        .bind(csrf.clone())
        .bind(now)
        .bind(now + SESSION_MAX_AGE_MS)
        .bind(now)
        .execute(tx.conn())
        .await?;
    sqlx::query("UPDATE users SET last_login_at = $1 WHERE id = $2")
        .bind(now)
        .bind(user_id.clone())
        .execute(tx.conn())
        .await?;
    audit::append(
        tx.conn(),
        Event {
            actor: &principal,
            action: "session.login",
            target_kind: "user",
            target_id: &user_id,
            summary: format!("{username:?} signed in"),
        },
    )
    .await?;
    tx.commit().await?;
    Ok(NewSession { cookie, csrf, principal })
}

/// Resolves a session cookie to its principal; an idle or expired session is gone.
pub async fn authenticate_session(db: &Db, cookie: &str, source: String, idle_timeout_ms: i64) -> AppResult<Principal> {
    let expired = || AppError::Unauthorized("your session has ended: sign in again".into());
    let id_hash = auth::sha256_hex(cookie);
    let row: Option<(String, String, String, String, String, i64, i64, i64)> = sqlx::query_as(
        "SELECT u.id, u.org_id, u.username, u.role, s.csrf_token, s.expires_at, s.last_seen_at, u.disabled \
         FROM sessions s JOIN users u ON u.id = s.user_id WHERE s.id_hash = $1",
    )
    .bind(id_hash.clone())
    .fetch_optional(db.pool())
    .await?;
    let (id, org_id, name, role, csrf, expires_at, last_seen, disabled) = row.ok_or_else(expired)?;
    let now = now_ms();
    if expires_at <= now || now - last_seen > idle_timeout_ms || disabled != 0 {
        return Err(expired());
    }
    if now - last_seen > 60_000 {
        // Through the writer queue, as for tokens above.
        db.bookkeeping("UPDATE sessions SET last_seen_at = $1 WHERE id_hash = $2", now, &id_hash).await?;
    }
    Ok(Principal {
        kind: PrincipalKind::User,
        id,
        name,
        role: role_of(&role)?,
        org_id: Some(org_id),
        source,
        session_csrf: Some(csrf),
    })
}

pub async fn logout(db: &Db, p: &Principal, cookie: &str) -> AppResult<()> {
    let mut tx = db.begin_write().await?;
    let gone = sqlx::query("DELETE FROM sessions WHERE id_hash = $1")
        .bind(auth::sha256_hex(cookie))
        .execute(tx.conn())
        .await?;
    if gone.rows_affected() > 0 {
        audit::append(
            tx.conn(),
            Event {
                actor: p,
                action: "session.logout",
                target_kind: "user",
                target_id: &p.id,
                summary: format!("{:?} signed out", p.name),
            },
        )
        .await?;
    }
    tx.commit().await?;
    Ok(())
}

pub async fn me(db: &Db, p: &Principal) -> AppResult<Me> {
    Ok(Me {
        kind: p.kind,
        id: p.id.clone(),
        name: p.name.clone(),
        role: p.role,
        organization: get_org(db, p.org()).await?,
    })
}
