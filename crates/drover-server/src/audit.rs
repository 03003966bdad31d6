//! The audit log: append-only and hash-chained.
//!
//! Every entry stores the hash of the one before it, and its own hash covers that link and
//! every field it holds. The chain head (last sequence number and hash) lives in
//! `audit_head`, whose row is locked by the append so that concurrent writers — other
//! requests, other replicas — line up instead of forking the chain. An entry edited, removed
//! or inserted behind the server's back breaks the chain, and [`verify`] names the first
//! entry where it breaks. The database also refuses `UPDATE` and `DELETE` on the table
//! (triggers), and no interface of droverd changes or removes entries.

use drover_proto::api::{Actor, AuditEntry, AuditListQuery, AuditVerification, PrincipalKind};
use sha2::{Digest, Sha256};

use crate::auth::Principal;
use crate::db::{Bind, Db, Filter, bind_all};
use crate::error::{AppError, AppResult};
use crate::migrations::AUDIT_GENESIS;
use crate::page::{CursorValue, PageRequest, SortField};
use crate::time::{now_ms, to_rfc3339};

/// What happened, before it gets its place in the chain.
#[derive(Debug, Clone)]
pub struct Event<'a> {
    pub actor: &'a Principal,
    pub action: &'a str,
    pub target_kind: &'a str,
    pub target_id: &'a str,
    pub summary: String,
}

type Row = (i64, Option<String>, i64, String, String, String, String, String, String, String, String, String, String);

const COLUMNS: &str = "seq, org_id, at, actor_kind, actor_id, actor_name, action, target_kind, target_id, source, summary, prev_hash, hash";

/// The hash of one entry: SHA-256 over an unambiguous JSON encoding of its fields and the
/// previous entry's hash.
#[allow(clippy::too_many_arguments)]
fn entry_hash(
    prev_hash: &str,
    seq: i64,
    org_id: Option<&str>,
    at: i64,
    actor: (&str, &str, &str),
    action: &str,
    target: (&str, &str),
    source: &str,
    summary: &str,
) -> String {
    let canonical = serde_json::to_string(&(
        prev_hash, seq, org_id, at, actor.0, actor.1, actor.2, action, target.0, target.1, source, summary,
    ))
    .unwrap_or_default();
    hex::encode(Sha256::digest(canonical.as_bytes()))
}

fn row_hash(r: &Row) -> String {
    entry_hash(&r.11, r.0, r.1.as_deref(), r.2, (&r.3, &r.4, &r.5), &r.6, (&r.7, &r.8), &r.9, &r.10)
}

/// Appends an entry within the caller's transaction, so that the change and its record
/// commit together or not at all.
pub async fn append(conn: &mut sqlx::AnyConnection, ev: Event<'_>) -> Result<i64, sqlx::Error> {
    // Taking the head row first serializes appenders (row lock on PostgreSQL; the writer
    // lock on SQLite).
    let (seq, prev_hash): (i64, String) =
        sqlx::query_as("UPDATE audit_head SET seq = seq + 1 WHERE id = 1 RETURNING seq, hash")
            .fetch_one(&mut *conn)
            .await?;
    let at = now_ms();
    let p = ev.actor;
    let org_id = p.org_id.as_deref();
    let hash = entry_hash(
        &prev_hash,
        seq,
        org_id,
        at,
        (p.kind.as_str(), &p.id, &p.name),
        ev.action,
        (ev.target_kind, ev.target_id),
        &p.source,
        &ev.summary,
    );
    sqlx::query(
        "INSERT INTO audit_log (seq, org_id, at, actor_kind, actor_id, actor_name, action, target_kind, \
         target_id, source, summary, prev_hash, hash) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
    )
    .bind(seq)
    .bind(org_id.map(str::to_string))
    .bind(at)
    .bind(p.kind.as_str())
    .bind(p.id.clone())
    .bind(p.name.clone())
    .bind(ev.action.to_string())
    .bind(ev.target_kind.to_string())
    .bind(ev.target_id.to_string())
    .bind(p.source.clone())
    .bind(ev.summary)
    .bind(prev_hash)
    .bind(hash.clone())
    .execute(&mut *conn)
    .await?;
    sqlx::query("UPDATE audit_head SET hash = $1 WHERE id = 1").bind(hash).execute(&mut *conn).await?;
    Ok(seq)
}

fn to_entry(r: Row) -> AuditEntry {
    let kind = match r.3.as_str() {
        "user" => PrincipalKind::User,
        "token" => PrincipalKind::Token,
        "device" => PrincipalKind::Device,
        _ => PrincipalKind::System,
    };
    AuditEntry {
        seq: r.0,
        at: to_rfc3339(r.2),
        actor: Actor { kind, id: r.4, name: r.5 },
        action: r.6,
        target_kind: r.7,
        target_id: r.8,
        source: r.9,
        summary: r.10,
        hash: r.12,
    }
}

const SORTS: &[SortField] = &[SortField { name: "seq", column: "seq", int: true }];

/// Lists an organization's entries with filters, newest first by default.
pub async fn list(db: &Db, org_id: &str, q: &AuditListQuery) -> AppResult<(Vec<AuditEntry>, Option<String>)> {
    let page = PageRequest::parse(q.limit, q.cursor.as_deref(), q.sort.as_deref(), SORTS, "-seq")?;
    let mut f = Filter::default();
    f.and("org_id = ?", [Bind::Text(org_id.to_string())]);
    if let Some(action) = q.action.as_deref().filter(|s| !s.is_empty()) {
        if let Some(prefix) = action.strip_suffix('.') {
            f.and("action LIKE ? ESCAPE '\\'", [Bind::Text(format!("{}.%", crate::db::like_escape(prefix)))]);
        } else {
            f.and("action = ?", [Bind::Text(action.to_string())]);
        }
    }
    if let Some(actor) = q.actor.as_deref().filter(|s| !s.is_empty()) {
        f.and("actor_name = ?", [Bind::Text(actor.to_string())]);
    }
    if let Some(k) = q.target_kind.as_deref().filter(|s| !s.is_empty()) {
        f.and("target_kind = ?", [Bind::Text(k.to_string())]);
    }
    if let Some(id) = q.target_id.as_deref().filter(|s| !s.is_empty()) {
        f.and("target_id = ?", [Bind::Text(id.to_string())]);
    }
    for (name, value, op) in [("since", &q.since, ">="), ("until", &q.until, "<")] {
        if let Some(v) = value.as_deref().filter(|s| !s.is_empty()) {
            let ms = crate::time::parse(v).ok_or_else(|| {
                AppError::BadRequest(format!("{name} must be an RFC 3339 time or a date YYYY-MM-DD, not {v:?}"))
            })?;
            f.and(&format!("at {op} ?"), [Bind::Int(ms)]);
        }
    }
    page.apply(&mut f, None);
    let sql = format!("SELECT {COLUMNS} FROM audit_log{}{}", f.sql(), page.order_limit(None));
    let rows: Vec<Row> = bind_all(sqlx::query_as(&sql), &f.binds).fetch_all(db.pool()).await?;
    let (rows, next) = page.finish(rows, |r| (CursorValue::Int(r.0), None));
    Ok((rows.into_iter().map(to_entry).collect(), next))
}

/// The sequence number of the newest entry (0 for an empty log).
pub async fn last_seq(db: &Db) -> Result<i64, sqlx::Error> {
    let seq: Option<i64> = sqlx::query_scalar("SELECT MAX(seq) FROM audit_log").fetch_one(db.pool()).await?;
    Ok(seq.unwrap_or(0))
}

/// `(seq, target_id)` of the entries after `after` with one of `actions`, oldest first: how a
/// replica learns of decisions made elsewhere.
pub async fn targets_since(db: &Db, after: i64, actions: &[&str]) -> Result<Vec<(i64, String)>, sqlx::Error> {
    let placeholders: Vec<String> = (0..actions.len()).map(|i| format!("${}", i + 2)).collect();
    let sql = format!(
        "SELECT seq, target_id FROM audit_log WHERE seq > $1 AND action IN ({}) ORDER BY seq",
        placeholders.join(", ")
    );
    let mut q = sqlx::query_as(&sql).bind(after);
    for a in actions {
        q = q.bind(a.to_string());
    }
    q.fetch_all(db.pool()).await
}

/// Walks the whole chain (every organization) and checks each link and hash.
pub async fn verify(db: &Db) -> Result<AuditVerification, sqlx::Error> {
    let mut prev_hash = AUDIT_GENESIS.to_string();
    let mut expected_seq = 1i64;
    let mut checked = 0i64;
    let bad = |seq: i64, checked: i64, message: String| AuditVerification {
        ok: false,
        checked,
        first_bad_seq: Some(seq),
        message,
    };
    loop {
        // Batches keep memory flat on a long log.
        let rows: Vec<Row> =
            sqlx::query_as(&format!("SELECT {COLUMNS} FROM audit_log WHERE seq >= $1 ORDER BY seq LIMIT 1000"))
                .bind(expected_seq)
                .fetch_all(db.pool())
                .await?;
        if rows.is_empty() {
            break;
        }
        for r in rows {
            if r.0 != expected_seq {
                return Ok(bad(
                    expected_seq,
                    checked,
                    format!("audit entry {expected_seq} is missing (the next entry present is {})", r.0),
                ));
            }
            if r.11 != prev_hash {
                return Ok(bad(r.0, checked, format!("audit entry {} does not link to entry {}", r.0, r.0 - 1)));
            }
            let computed = row_hash(&r);
            if computed != r.12 {
                return Ok(bad(
                    r.0,
                    checked,
                    format!("audit entry {} was altered: its content does not match its hash", r.0),
                ));
            }
            prev_hash = r.12;
            expected_seq += 1;
            checked += 1;
        }
    }
    let (head_seq, head_hash): (i64, String) =
        sqlx::query_as("SELECT seq, hash FROM audit_head WHERE id = 1").fetch_one(db.pool()).await?;
    if head_seq != checked || head_hash != prev_hash {
        return Ok(bad(
            checked + 1,
            checked,
            format!(
                "the audit log ends at entry {checked} but its head records entry {head_seq}: entries were removed"
            ),
        ));
    }
    Ok(AuditVerification {
        ok: true,
        checked,
        first_bad_seq: None,
        message: format!("audit log intact: {checked} entries"),
    })
}
