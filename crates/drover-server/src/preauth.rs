//! Pre-authorizations: identities an operator vouches for before their devices ask. A device
//! whose identity is pre-authorized is accepted at enrollment without a token — as many times
//! as the pre-authorization says (once by default), until it expires or is revoked. A device
//! enrolled by one that is decommissioned (say, stolen) uses it up, so the same identity with
//! a new key is not accepted again by it. Every change is audited.

use std::collections::BTreeMap;

use drover_proto::api::{
    BulkPreauthorized, Page, Preauthorization, PreauthorizationQuery, PreauthorizationState, Preauthorize,
    Preauthorized, Role,
};

use crate::audit::{self, Event};
use crate::auth::{self, Principal};
use crate::db::{Bind, Db, Filter, bind_all, like_escape};
use crate::devices::{check_identity, identity_json, parse_map};
use crate::error::{AppError, AppResult};
use crate::ops::new_id;
use crate::page::{CursorValue, PageRequest, SortField};
use crate::time::{now_ms, opt_rfc3339, to_rfc3339};

/// Enrollments one pre-authorization admits unless the operator says otherwise.
pub const DEFAULT_MAX_USES: u32 = 1;
/// Most uses of one pre-authorization.
pub const MAX_USES: u32 = 1_000_000;
/// Longest lifetime, in days.
pub const MAX_DAYS: u32 = 3650;
/// Most identities in one CSV file.
pub const MAX_CSV_ROWS: usize = 10_000;

const DAY_MS: i64 = 86_400_000;

/// Where a row stands at `now`.
fn state(
    max_uses: i64,
    uses: i64,
    expires_at: Option<i64>,
    revoked_at: Option<i64>,
    now: i64,
) -> PreauthorizationState {
    if revoked_at.is_some() {
        PreauthorizationState::Revoked
    } else if uses >= max_uses {
        PreauthorizationState::Used
    } else if expires_at.is_some_and(|e| e <= now) {
        PreauthorizationState::Expired
    } else {
        PreauthorizationState::Active
    }
}

/// The SQL condition of a state at `$n` = now (for the listing's filter).
fn state_sql(s: PreauthorizationState) -> &'static str {
    match s {
        PreauthorizationState::Revoked => "revoked_at IS NOT NULL",
        PreauthorizationState::Used => "revoked_at IS NULL AND uses >= max_uses",
        PreauthorizationState::Expired => {
            "revoked_at IS NULL AND uses < max_uses AND expires_at IS NOT NULL AND expires_at <= ?"
        }
        PreauthorizationState::Active => {
            "revoked_at IS NULL AND uses < max_uses AND (expires_at IS NULL OR expires_at > ?)"
        }
    }
}

type Row = (String, String, String, i64, i64, i64, Option<i64>, Option<i64>);
const COLUMNS: &str = "id, identity, created_by, created_at, max_uses, uses, expires_at, revoked_at";

fn to_preauthorization(r: Row, now: i64) -> Preauthorization {
    Preauthorization {
        state: state(r.4, r.5, r.6, r.7, now),
        id: r.0,
        identity: parse_map(&r.1),
        created_by: r.2,
        created_at: to_rfc3339(r.3),
        max_uses: u32::try_from(r.4).unwrap_or(u32::MAX),
        uses: u32::try_from(r.5).unwrap_or(u32::MAX),
        expires_at: opt_rfc3339(r.6),
        revoked_at: opt_rfc3339(r.7),
    }
}

/// The organization and id of the usable pre-authorization of this identity, with one use
/// taken; `None` when there is none (unknown, used up, expired or revoked).
pub(crate) async fn take(
    conn: &mut sqlx::AnyConnection,
    identity_hash: &str,
    now: i64,
) -> Result<Option<(String, String)>, sqlx::Error> {
    let row: Option<(String, String)> = sqlx::query_as(
        "UPDATE preauthorizations SET uses = uses + 1 WHERE identity_hash = $1 AND revoked_at IS NULL \
         AND uses < max_uses AND (expires_at IS NULL OR expires_at > $2) RETURNING org_id, id",
    )
    .bind(identity_hash.to_string())
    .bind(now)
    .fetch_optional(&mut *conn)
    .await?;
    Ok(row)
}

/// A device enrolled by pre-authorization is decommissioned: its pre-authorization is used
/// up, so its identity cannot come back with a new key on its strength. Returns whether the
/// identity had one (now used up, or used up already).
pub(crate) async fn consume(conn: &mut sqlx::AnyConnection, identity_hash: &str) -> Result<bool, sqlx::Error> {
    let r = sqlx::query("UPDATE preauthorizations SET uses = max_uses WHERE identity_hash = $1 AND revoked_at IS NULL")
        .bind(identity_hash.to_string())
        .execute(&mut *conn)
        .await?;
    Ok(r.rows_affected() > 0)
}

fn limits(max_uses: Option<u32>, expires_in_days: Option<u32>, now: i64) -> AppResult<(i64, Option<i64>)> {
    let uses = max_uses.unwrap_or(DEFAULT_MAX_USES);
    if !(1..=MAX_USES).contains(&uses) {
        return Err(AppError::BadRequest(format!("max_uses: 1 to {MAX_USES}")));
    }
    if let Some(d) = expires_in_days
        && !(1..=MAX_DAYS).contains(&d)
    {
        return Err(AppError::BadRequest(format!("expires_in_days: 1 to {MAX_DAYS}")));
    }
    Ok((i64::from(uses), expires_in_days.map(|d| now + i64::from(d) * DAY_MS)))
}

/// Adds (or renews) one identity; `Ok(false)` when it was active already.
async fn put(
    conn: &mut sqlx::AnyConnection,
    p: &Principal,
    text: &str,
    (max_uses, expires_at): (i64, Option<i64>),
    now: i64,
) -> AppResult<bool> {
    let hash = auth::sha256_hex(text);
    let existing: Option<Row> =
        sqlx::query_as(&format!("SELECT {COLUMNS} FROM preauthorizations WHERE identity_hash = $1 AND org_id = $2"))
            .bind(hash.clone())
            .bind(p.org().to_string())
            .fetch_optional(&mut *conn)
            .await?;
    let other: Option<(String,)> =
        sqlx::query_as("SELECT org_id FROM preauthorizations WHERE identity_hash = $1 AND org_id <> $2")
            .bind(hash.clone())
            .bind(p.org().to_string())
            .fetch_optional(&mut *conn)
            .await?;
    if other.is_some() {
        return Err(AppError::Conflict("this identity is pre-authorized by another organization".into()));
    }
    match existing {
        Some(r) if state(r.4, r.5, r.6, r.7, now) == PreauthorizationState::Active => Ok(false),
        // Used, expired or revoked: vouched for again, from scratch.
        Some(r) => {
            sqlx::query(
                "UPDATE preauthorizations SET max_uses = $1, uses = 0, expires_at = $2, revoked_at = NULL, \
                 created_by = $3, created_at = $4 WHERE id = $5",
            )
            .bind(max_uses)
            .bind(expires_at)
            .bind(p.name.clone())
            .bind(now)
            .bind(r.0)
            .execute(&mut *conn)
            .await?;
            Ok(true)
        }
        None => {
            sqlx::query(
                "INSERT INTO preauthorizations (id, org_id, identity, identity_hash, created_by, created_at, max_uses, uses, \
                 expires_at) VALUES ($1, $2, $3, $4, $5, $6, $7, 0, $8)",
            )
            .bind(new_id())
            .bind(p.org().to_string())
            .bind(text.to_string())
            .bind(hash)
            .bind(p.name.clone())
            .bind(now)
            .bind(max_uses)
            .bind(expires_at)
            .execute(&mut *conn)
            .await?;
            Ok(true)
        }
    }
}

fn terms(max_uses: i64, expires_at: Option<i64>) -> String {
    let uses = if max_uses == 1 { "once".to_string() } else { format!("{max_uses} times") };
    match expires_at {
        Some(e) => format!("usable {uses}, until {}", to_rfc3339(e)),
        None => format!("usable {uses}"),
    }
}

/// `POST /api/v1/devices/preauthorize`: identities, each usable `max_uses` times.
pub async fn preauthorize(db: &Db, p: &Principal, req: Preauthorize) -> AppResult<Preauthorized> {
    p.require(Role::Operator, "pre-authorizing devices")?;
    if req.identities.is_empty() || req.identities.len() > 10_000 {
        return Err(AppError::BadRequest("give 1 to 10000 identities".into()));
    }
    for (i, identity) in req.identities.iter().enumerate() {
        check_identity(identity)
            .map_err(|e| AppError::BadRequest(format!("identity {}: {}", i + 1, e.public_message())))?;
    }
    let now = now_ms();
    let lim = limits(req.max_uses, req.expires_in_days, now)?;
    let mut tx = db.begin_write().await?;
    let (mut added, mut already) = (0u32, 0u32);
    for identity in &req.identities {
        if put(tx.conn(), p, &identity_json(identity), lim, now).await? {
            added += 1;
        } else {
            already += 1;
        }
    }
    if added > 0 {
        let summary = match &req.identities[..] {
            [one] => format!("device identity {} pre-authorized, {}", identity_json(one), terms(lim.0, lim.1)),
            _ => format!("{added} device identities pre-authorized, {}", terms(lim.0, lim.1)),
        };
        audit::append(
            tx.conn(),
            Event { actor: p, action: "device.preauthorize", target_kind: "device", target_id: "-", summary },
        )
        .await?;
    }
    tx.commit().await?;
    Ok(Preauthorized { added, already })
}

/// Splits one CSV line into fields (RFC 4180 quoting: `"a, b"` and `""` for a quote).
fn csv_fields(line: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = line.chars().peekable();
    let mut quoted = false;
    let mut was_quoted = false;
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (true, '"') if chars.peek() == Some(&'"') => {
                cur.push('"');
                chars.next();
            }
            (true, '"') => quoted = false,
            (true, c) => cur.push(c),
            (false, '"') if cur.trim().is_empty() && !was_quoted => {
                cur.clear();
                quoted = true;
                was_quoted = true;
            }
            (false, '"') => return Err("a quote inside an unquoted field".into()),
            (false, ',') => {
                out.push(if was_quoted {
                    std::mem::take(&mut cur)
                } else {
                    std::mem::take(&mut cur).trim().to_string()
                });
                was_quoted = false;
            }
            (false, c) if was_quoted && !c.is_whitespace() => return Err("text after a closing quote".into()),
            (false, c) => cur.push(c),
        }
    }
    if quoted {
        return Err("an unclosed quote".into());
    }
    out.push(if was_quoted { cur } else { cur.trim().to_string() });
    Ok(out)
}

/// `POST /api/v1/devices/preauthorize/bulk`: a CSV file, all or nothing; each identity usable
/// once. An identity pre-authorized and still active already is refused by line.
pub async fn preauthorize_csv(db: &Db, p: &Principal, csv: &str) -> AppResult<BulkPreauthorized> {
    p.require(Role::Operator, "pre-authorizing devices")?;
    let bad = |n: usize, m: String| AppError::BadRequest(format!("line {n}: {m}"));
    let mut lines = csv.lines().enumerate().map(|(i, l)| (i + 1, l.trim_end_matches('\r')));
    let header = loop {
        match lines.next() {
            None => {
                return Err(AppError::BadRequest(
                    "the CSV is empty: give a header line of identity attribute names".into(),
                ));
            }
            Some((_, l)) if l.trim().is_empty() => continue,
            Some((n, l)) => break (n, csv_fields(l.trim_start_matches('\u{feff}')).map_err(|e| bad(n, e))?),
        }
    };
    let (hn, names) = header;
    for (i, name) in names.iter().enumerate() {
        let one: BTreeMap<String, String> = [(name.clone(), "x".to_string())].into();
        drover_proto::device::check_inventory(&one).map_err(|e| bad(hn, format!("column {}: {e}", i + 1)))?;
        if names[..i].contains(name) {
            return Err(bad(hn, format!("column {name:?} appears twice")));
        }
    }
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut rows: Vec<(String, usize)> = Vec::new();
    for (n, line) in lines {
        if line.trim().is_empty() {
            continue;
        }
        let fields = csv_fields(line).map_err(|e| bad(n, e))?;
        if fields.len() != names.len() {
            return Err(bad(n, format!("{} fields, the header has {}", fields.len(), names.len())));
        }
        let identity: BTreeMap<String, String> =
            names.iter().cloned().zip(fields).filter(|(_, v)| !v.is_empty()).collect();
        check_identity(&identity).map_err(|e| bad(n, e.public_message()))?;
        let text = identity_json(&identity);
        if let Some(first) = seen.get(&text) {
            return Err(bad(n, format!("duplicate identity (the same as line {first})")));
        }
        seen.insert(text.clone(), n);
        rows.push((text, n));
        if rows.len() > MAX_CSV_ROWS {
            return Err(bad(n, format!("more than {MAX_CSV_ROWS} devices in one file")));
        }
    }
    if rows.is_empty() {
        return Err(AppError::BadRequest("the CSV has a header but no devices".into()));
    }
    let now = now_ms();
    let lim = limits(None, None, now)?;
    let mut tx = db.begin_write().await?;
    for (text, n) in &rows {
        if !put(tx.conn(), p, text, lim, now).await? {
            return Err(bad(*n, format!("identity {text} is pre-authorized already")));
        }
    }
    let created = u32::try_from(rows.len()).unwrap_or(u32::MAX);
    let summary = format!("{created} device identities pre-authorized from a CSV file (columns {})", names.join(", "));
    audit::append(
        tx.conn(),
        Event { actor: p, action: "device.preauthorize", target_kind: "device", target_id: "-", summary },
    )
    .await?;
    tx.commit().await?;
    Ok(BulkPreauthorized { created })
}

const SORTS: &[SortField] = &[SortField { name: "created_at", column: "created_at", int: true }];

/// `GET /api/v1/preauthorizations`: newest first, by state or identity.
pub async fn list(db: &Db, p: &Principal, q: &PreauthorizationQuery) -> AppResult<Page<Preauthorization>> {
    p.require(Role::Viewer, "listing pre-authorizations")?;
    let page = PageRequest::parse(q.limit, q.cursor.as_deref(), None, SORTS, "-created_at")?;
    let now = now_ms();
    let mut f = Filter::default();
    f.and("org_id = ?", [Bind::Text(p.org().to_string())]);
    if let Some(s) = q.state {
        let binds = match s {
            PreauthorizationState::Active | PreauthorizationState::Expired => vec![Bind::Int(now)],
            _ => vec![],
        };
        f.and(state_sql(s), binds);
    }
    if let Some(text) = q.q.as_deref().map(str::trim).filter(|s| !s.is_empty()) {
        if text.len() > 256 {
            return Err(AppError::BadRequest("q: at most 256 bytes".into()));
        }
        f.and("LOWER(identity) LIKE ? ESCAPE '\\'", [Bind::Text(format!("%{}%", like_escape(&text.to_lowercase())))]);
    }
    page.apply(&mut f, Some("id"));
    let sql = format!("SELECT {COLUMNS} FROM preauthorizations{}{}", f.sql(), page.order_limit(Some("id")));
    let rows: Vec<Row> = bind_all(sqlx::query_as(&sql), &f.binds).fetch_all(db.pool()).await?;
    let (rows, next_cursor) = page.finish(rows, |r| (CursorValue::Int(r.3), Some(r.0.clone())));
    Ok(Page { items: rows.into_iter().map(|r| to_preauthorization(r, now)).collect(), next_cursor })
}

async fn fetch(conn: &mut sqlx::AnyConnection, org_id: &str, id: &str) -> Result<Option<Row>, sqlx::Error> {
    sqlx::query_as::<_, Row>(&format!("SELECT {COLUMNS} FROM preauthorizations WHERE org_id = $1 AND id = $2"))
        .bind(org_id.to_string())
        .bind(id.to_string())
        .fetch_optional(conn)
        .await
}

/// `DELETE /api/v1/preauthorizations/{id}`: no device is accepted on its strength any more
/// (devices it admitted stay as they are). Revoking a revoked one changes nothing.
pub async fn revoke(db: &Db, p: &Principal, id: &str) -> AppResult<Preauthorization> {
    p.require(Role::Operator, "revoking pre-authorizations")?;
    let mut tx = db.begin_write().await?;
    let row = fetch(tx.conn(), p.org(), id)
        .await?
        .ok_or_else(|| AppError::NotFound(format!("no pre-authorization {id:?}")))?;
    let now = now_ms();
    if row.7.is_none() {
        sqlx::query("UPDATE preauthorizations SET revoked_at = $1 WHERE id = $2")
            .bind(now)
            .bind(id.to_string())
            .execute(tx.conn())
            .await?;
        let summary = format!("pre-authorization of {} revoked ({} of {} uses taken)", row.1, row.5, row.4);
        audit::append(
            tx.conn(),
            Event {
                actor: p,
                action: "device.preauthorize.revoke",
                target_kind: "preauthorization",
                target_id: id,
                summary,
            },
        )
        .await?;
    }
    let after = fetch(tx.conn(), p.org(), id)
        .await?
        .ok_or_else(|| AppError::NotFound(format!("no pre-authorization {id:?}")))?;
    tx.commit().await?;
    Ok(to_preauthorization(after, now))
}

#[cfg(test)]
mod tests {
    use super::csv_fields;

    #[test]
    fn csv_quoting() {
        assert_eq!(csv_fields("a, b ,c").unwrap(), ["a", "b", "c"]);
        assert_eq!(csv_fields(r#""x, y","say ""hi""",,z"#).unwrap(), ["x, y", r#"say "hi""#, "", "z"]);
        // Tried: an unclosed quote, a quote mid-field, text after a closing quote.
        assert!(csv_fields(r#""open"#).is_err());
        assert!(csv_fields(r#"ab"c"#).is_err());
        assert!(csv_fields(r#""a"b"#).is_err());
    }
}
