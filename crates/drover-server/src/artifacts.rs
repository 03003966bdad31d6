//! Artifacts (`/api/v1/artifacts`) and the devices' trust root (`/api/v1/trust-root`).
//!
//! An upload streams: every chunk of the request body goes to the artifact format's
//! [`StreamVerifier`] and to a temporary object in the store, so the server never holds a
//! whole file. The verifier checks the structure and every payload digest; as soon as the
//! header has arrived the server also refuses an unsigned artifact and, when it holds a trust
//! root, one that no current release key signed — devices would refuse both, and the operator
//! learns it at upload rather than after a failed deployment. The server holds no release key:
//! it checks signatures, it cannot make them (design decision 5). A refused upload leaves
//! nothing behind.
//!
//! The same file uploaded again answers 200 with the record made the first time (201 the
//! first time): uploads are idempotent, as the content address makes them. Another file with
//! the name and version of an existing artifact is refused (409): `NAME@VERSION` names one
//! artifact, for deployments and for people.

use std::collections::BTreeMap;

use bytes::Bytes;
use drover_artifact::{ArtifactError, Manifest, StreamVerifier, TrustStore};
use drover_proto::api::{Page, Role};
use drover_proto::deploy::{Artifact, ArtifactListQuery, ArtifactPayload, Provenance, TrustRoot};
use futures_util::{Stream, StreamExt as _};

use crate::audit::{self, Event};
use crate::auth::Principal;
use crate::db::{Bind, Db, Filter, bind_all, is_unique_violation};
use crate::error::{AppError, AppResult};
use crate::page::{CursorValue, PageRequest, SortField};
use crate::store::ArtifactStore;
use crate::time::{now_ms, to_rfc3339};

type ArtifactRow = (String, String, String, String, String, i64, String, String, i64, String, i64);
const ARTIFACT_COLUMNS: &str = "a.id, a.name, a.version, a.device_types, a.payload_type, a.size, a.manifest, \
                                a.signed_by, a.uploaded_at, a.uploaded_by, \
                                (SELECT COUNT(*) FROM deployments dep WHERE dep.org_id = a.org_id \
                                 AND dep.artifact_id = a.id AND dep.finished_at IS NULL)";

fn to_artifact(r: ArtifactRow) -> Artifact {
    let manifest: Option<Manifest> = serde_json::from_str(&r.6).ok();
    let (payloads, provides, depends, provenance) = match manifest {
        Some(m) => (
            m.payloads
                .into_iter()
                .map(|p| ArtifactPayload { name: p.name, size: p.size, sha256: p.sha256, role: p.role.to_string() })
                .collect(),
            m.provides,
            m.depends,
            m.provenance.map(|p| Provenance { source: p.source, commit: p.commit, build_id: p.build_id, sbom: p.sbom }),
        ),
        None => (Vec::new(), BTreeMap::new(), BTreeMap::new(), None),
    };
    Artifact {
        id: r.0,
        name: r.1,
        version: r.2,
        device_types: serde_json::from_str(&r.3).unwrap_or_default(),
        payload_type: r.4,
        size: u64::try_from(r.5).unwrap_or(0),
        payloads,
        provides,
        depends,
        provenance,
        signed_by: serde_json::from_str(&r.7).unwrap_or_default(),
        uploaded_at: to_rfc3339(r.8),
        uploaded_by: r.9,
        active_deployments: u64::try_from(r.10).unwrap_or(0),
    }
}

/// How an API caller is named in records: `user:NAME` or `token:NAME`.
pub fn principal_label(p: &Principal) -> String {
    format!("{}:{}", p.kind.as_str(), p.name)
}

/// An artifact by id or `NAME@VERSION`, in the caller's organization.
pub(crate) async fn fetch(conn: &mut sqlx::AnyConnection, org_id: &str, reference: &str) -> AppResult<Artifact> {
    let row: Option<ArtifactRow> = if drover_proto::update::is_sha256_hex(reference) {
        sqlx::query_as(&format!("SELECT {ARTIFACT_COLUMNS} FROM artifacts a WHERE a.org_id = $1 AND a.id = $2"))
            .bind(org_id.to_string())
            .bind(reference.to_string())
            .fetch_optional(&mut *conn)
            .await?
    } else if let Some((name, version)) = reference.rsplit_once('@') {
        sqlx::query_as(&format!(
            "SELECT {ARTIFACT_COLUMNS} FROM artifacts a WHERE a.org_id = $1 AND a.name = $2 AND a.version = $3"
        ))
        .bind(org_id.to_string())
        .bind(name.to_string())
        .bind(version.to_string())
        .fetch_optional(&mut *conn)
        .await?
    } else {
        return Err(AppError::BadRequest(format!(
            "{reference:?} is neither an artifact id (64 hex digits) nor NAME@VERSION"
        )));
    };
    row.map(to_artifact).ok_or_else(|| AppError::NotFound(format!("no artifact {reference:?}")))
}

pub async fn get(db: &Db, p: &Principal, reference: &str) -> AppResult<Artifact> {
    p.require(Role::Viewer, "reading artifacts")?;
    let mut conn = db.pool().acquire().await?;
    fetch(&mut conn, p.org(), reference).await
}

const SORTS: &[SortField] = &[SortField { name: "uploaded_at", column: "a.uploaded_at", int: true }];

/// Newest first; `name` narrows to one artifact name.
pub async fn list(db: &Db, p: &Principal, q: &ArtifactListQuery) -> AppResult<Page<Artifact>> {
    p.require(Role::Viewer, "listing artifacts")?;
    let page = PageRequest::parse(q.limit, q.cursor.as_deref(), None, SORTS, "-uploaded_at")?;
    let mut f = Filter::default();
    f.and("a.org_id = ?", [Bind::Text(p.org().to_string())]);
    if let Some(name) = q.name.as_deref().filter(|n| !n.is_empty()) {
        f.and("a.name = ?", [Bind::Text(name.to_string())]);
    }
    page.apply(&mut f, Some("a.id"));
    let sql = format!("SELECT {ARTIFACT_COLUMNS} FROM artifacts a{}{}", f.sql(), page.order_limit(Some("a.id")));
    let rows: Vec<ArtifactRow> = bind_all(sqlx::query_as(&sql), &f.binds).fetch_all(db.pool()).await?;
    let (rows, next_cursor) = page.finish(rows, |r| (CursorValue::Int(r.8), Some(r.0.clone())));
    Ok(Page { items: rows.into_iter().map(to_artifact).collect(), next_cursor })
}

/// What an upload made: the artifact, and whether it is new (201) or was there already (200).
#[derive(Debug)]
pub struct Uploaded {
    pub artifact: Artifact,
    pub created: bool,
}

/// What the client said about the upload besides its bytes.
#[derive(Debug, Default, Clone)]
pub struct UploadHints {
    /// `Content-Length`, when sent: over the limit is refused before reading.
    pub content_length: Option<u64>,
    /// The SHA-256 the client expects (`X-Drover-Sha256`, or `Digest: sha-256=…`).
    pub sha256: Option<String>,
}

fn verify_error(e: ArtifactError, limit: u64) -> AppError {
    match e {
        ArtifactError::TooLarge { .. } => too_large(limit),
        e => AppError::BadRequest(format!("invalid artifact: {e}")),
    }
}

fn too_large(limit: u64) -> AppError {
    AppError::PayloadTooLarge(format!(
        "the artifact is larger than this server accepts ({limit} bytes; max_artifact_size / --max-artifact-size)"
    ))
}

/// Checks the signatures as soon as the header is there: devices refuse unsigned artifacts,
/// and artifacts no current release key signed.
fn check_signed(h: &drover_artifact::Header, trust: Option<&TrustStore>) -> AppResult<Vec<String>> {
    if h.signatures.is_empty() {
        return Err(AppError::BadRequest(
            "the artifact is not signed, and devices refuse unsigned artifacts: sign it with a release key \
             (drover artifact sign --key KEY FILE) and upload it again"
                .into(),
        ));
    }
    if let Some(trust) = trust {
        trust.verify_header_at(h, now_ms() / 1000).map_err(|e| {
            AppError::BadRequest(format!(
                "{e} (trust root version {}; devices would refuse this artifact)",
                trust.version()
            ))
        })?;
    }
    Ok(h.signatures.iter().map(|s| s.key_id.clone()).collect())
}

/// Streams an upload into the store while verifying it; see the module documentation.
pub async fn upload<S, E>(
    db: &Db,
    store: &ArtifactStore,
    max_size: u64,
    p: &Principal,
    hints: UploadHints,
    body: S,
) -> AppResult<Uploaded>
where
    S: Stream<Item = Result<Bytes, E>> + Send,
    E: std::fmt::Display,
{
    p.require(Role::Operator, "uploading artifacts")?;
    if hints.content_length.is_some_and(|n| n > max_size) {
        return Err(too_large(max_size));
    }
    if let Some(sha) = &hints.sha256
        && !drover_proto::update::is_sha256_hex(sha)
    {
        return Err(AppError::BadRequest("X-Drover-Sha256 must be 64 lowercase hex digits".into()));
    }
    let trust = {
        let mut conn = db.pool().acquire().await?;
        load_trust(&mut conn, p.org()).await?
    };
    let mut upload = store.begin_upload().await?;
    let mut verifier = StreamVerifier::with_limit(max_size);
    let mut signed_by: Option<Vec<String>> = None;
    let mut body = std::pin::pin!(body);
    let failed = loop {
        let chunk = match body.next().await {
            None => break None,
            Some(Ok(c)) => c,
            Some(Err(e)) => break Some(AppError::BadRequest(format!("the upload was interrupted: {e}"))),
        };
        if let Err(e) = verifier.feed(&chunk) {
            break Some(verify_error(e, max_size));
        }
        if signed_by.is_none()
            && let Some(h) = verifier.header()
        {
            match check_signed(h, trust.as_ref()) {
                Ok(keys) => signed_by = Some(keys),
                Err(e) => break Some(e),
            }
        }
        if let Err(e) = upload.write(chunk).await {
            break Some(e.into());
        }
    };
    if let Some(e) = failed {
        upload.abort().await;
        return Err(e);
    }
    let verified = match verifier.finish() {
        Ok(v) => v,
        Err(e) => {
            upload.abort().await;
            return Err(verify_error(e, max_size));
        }
    };
    let signed_by = signed_by.unwrap_or_default();
    if let Some(expected) = &hints.sha256
        && *expected != verified.file_sha256
    {
        upload.abort().await;
        return Err(AppError::BadRequest(format!(
            "the uploaded file's SHA-256 is {}, not the {expected} the request announced: it changed on the way",
            verified.file_sha256
        )));
    }
    let id = verified.file_sha256.clone();
    let m = &verified.header.manifest;
    {
        let mut conn = db.pool().acquire().await?;
        if let Ok(existing) = fetch(&mut conn, p.org(), &id).await {
            drop(conn);
            upload.abort().await;
            return Ok(Uploaded { artifact: existing, created: false });
        }
        let same_name: Option<(String,)> =
            sqlx::query_as("SELECT id FROM artifacts WHERE org_id = $1 AND name = $2 AND version = $3")
                .bind(p.org().to_string())
                .bind(m.name.clone())
                .bind(m.version.clone())
                .fetch_optional(&mut *conn)
                .await?;
        if let Some((other,)) = same_name {
            drop(conn);
            upload.abort().await;
            return Err(name_taken(&m.name, &m.version, &other));
        }
    }
    upload.commit(&id).await?;

    // The file is at its content address now: if the record cannot be written (a full disk,
    // say), the file goes again unless a record of another organization holds the same bytes.
    let recorded = record_upload(db, p, &id, &verified, signed_by).await;
    if recorded.is_err() {
        remove_unreferenced(db, store, &id).await;
    }
    recorded
}

/// Writes the artifact's record and its audit entry for [`upload`].
async fn record_upload(
    db: &Db,
    p: &Principal,
    id: &str,
    verified: &drover_artifact::stream::Verified,
    signed_by: Vec<String>,
) -> AppResult<Uploaded> {
    let id = id.to_string();
    let m = &verified.header.manifest;
    let manifest_json = String::from_utf8_lossy(&verified.header.manifest_bytes).to_string();
    let prov = m.provenance.clone().unwrap_or_default();
    let mut tx = db.begin_write().await?;
    let inserted = sqlx::query(
        "INSERT INTO artifacts (org_id, id, name, version, device_types, payload_type, size, manifest, signed_by, \
         source, source_commit, build_id, uploaded_at, uploaded_by) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)",
    )
    .bind(p.org().to_string())
    .bind(id.clone())
    .bind(m.name.clone())
    .bind(m.version.clone())
    .bind(serde_json::to_string(&m.device_types).unwrap_or_else(|_| "[]".into()))
    .bind(m.payload_type.clone())
    .bind(i64::try_from(verified.size).unwrap_or(i64::MAX))
    .bind(manifest_json)
    .bind(serde_json::to_string(&signed_by).unwrap_or_else(|_| "[]".into()))
    .bind(prov.source.clone())
    .bind(prov.commit.clone().map(|c| c.to_lowercase()))
    .bind(prov.build_id.clone())
    .bind(now_ms())
    .bind(principal_label(p))
    .execute(tx.conn())
    .await;
    match inserted {
        // Another upload of the same file (or name) won the race.
        Err(e) if is_unique_violation(&e) => {
            drop(tx);
            let mut conn = db.pool().acquire().await?;
            return match fetch(&mut conn, p.org(), &id).await {
                Ok(existing) => Ok(Uploaded { artifact: existing, created: false }),
                Err(_) => Err(name_taken(&m.name, &m.version, "another upload")),
            };
        }
        other => other?,
    };
    let summary = format!(
        "artifact {}@{} ({} bytes, {}, signed by {})",
        m.name,
        m.version,
        verified.size,
        m.payload_type,
        signed_by.join(", ")
    );
    audit::append(
        tx.conn(),
        Event { actor: p, action: "artifact.upload", target_kind: "artifact", target_id: &id, summary },
    )
    .await?;
    let artifact = fetch(tx.conn(), p.org(), &id).await?;
    tx.commit().await?;
    Ok(Uploaded { artifact, created: true })
}

/// Deletes the stored file `id` when no artifact record refers to it.
async fn remove_unreferenced(db: &Db, store: &ArtifactStore, id: &str) {
    let refs: Result<(i64,), sqlx::Error> =
        sqlx::query_as("SELECT COUNT(*) FROM artifacts WHERE id = $1").bind(id.to_string()).fetch_one(db.pool()).await;
    match refs {
        Ok((0,)) => {
            if let Err(e) = store.delete(id).await {
                tracing::warn!(artifact = id, error = %e, "artifact store: cannot remove the file of a failed upload");
            }
        }
        Ok(_) => {}
        Err(e) => {
            tracing::warn!(artifact = id, error = %e, "cannot tell whether the file of a failed upload is in use; left in the store")
        }
    }
}

fn name_taken(name: &str, version: &str, other: &str) -> AppError {
    AppError::Conflict(format!(
        "artifact {name}@{version} exists already ({other}) with other content: give the build a new version, \
         or delete the old artifact first"
    ))
}

/// Deletes an artifact and its file; refused while an unfinished deployment uses it.
pub async fn delete(db: &Db, store: &ArtifactStore, p: &Principal, reference: &str) -> AppResult<()> {
    p.require(Role::Operator, "deleting artifacts")?;
    let mut tx = db.begin_write().await?;
    let a = fetch(tx.conn(), p.org(), reference).await?;
    if a.active_deployments > 0 {
        return Err(AppError::Conflict(format!(
            "artifact {}@{} is used by {} unfinished deployment(s): abort them or let them finish first",
            a.name, a.version, a.active_deployments
        )));
    }
    sqlx::query("DELETE FROM artifacts WHERE org_id = $1 AND id = $2")
        .bind(p.org().to_string())
        .bind(a.id.clone())
        .execute(tx.conn())
        .await?;
    let summary = format!("artifact {}@{} deleted ({} bytes)", a.name, a.version, a.size);
    audit::append(
        tx.conn(),
        Event { actor: p, action: "artifact.delete", target_kind: "artifact", target_id: &a.id, summary },
    )
    .await?;
    // Content-addressed: another organization may hold the same file.
    let (others,): (i64,) =
        sqlx::query_as("SELECT COUNT(*) FROM artifacts WHERE id = $1").bind(a.id.clone()).fetch_one(tx.conn()).await?;
    tx.commit().await?;
    if others == 0 {
        store.delete(&a.id).await?;
    }
    Ok(())
}

/// The organization's root chain, oldest first (`root.json` documents as stored).
pub async fn trust_chain(conn: &mut sqlx::AnyConnection, org_id: &str) -> Result<Vec<(i64, String)>, sqlx::Error> {
    sqlx::query_as("SELECT version, json FROM trust_roots WHERE org_id = $1 ORDER BY version")
        .bind(org_id.to_string())
        .fetch_all(conn)
        .await
}

/// The trust the organization's devices have, by the chain the server holds.
pub async fn load_trust(conn: &mut sqlx::AnyConnection, org_id: &str) -> AppResult<Option<TrustStore>> {
    let chain = trust_chain(conn, org_id).await?;
    let Some(((_, first), rest)) = chain.split_first() else { return Ok(None) };
    let mut store = TrustStore::from_initial(first.as_bytes())
        .map_err(|e| AppError::Internal(format!("the stored trust root does not verify: {e}")))?;
    for (_, json) in rest {
        store
            .apply(json.as_bytes())
            .map_err(|e| AppError::Internal(format!("the stored trust root chain does not verify: {e}")))?;
    }
    Ok(Some(store))
}

fn trust_view(store: &TrustStore, chain: Vec<u64>) -> TrustRoot {
    let root = store.root();
    TrustRoot {
        version: store.version(),
        release_keys: root.release_keys.iter().map(|k| k.id.clone()).collect(),
        revoked: root.revoked.clone(),
        chain,
    }
}

pub async fn get_trust_root(db: &Db, p: &Principal) -> AppResult<TrustRoot> {
    p.require(Role::Viewer, "reading the trust root")?;
    let mut conn = db.pool().acquire().await?;
    let chain: Vec<u64> =
        trust_chain(&mut conn, p.org()).await?.into_iter().map(|(v, _)| u64::try_from(v).unwrap_or(0)).collect();
    let store = load_trust(&mut conn, p.org()).await?.ok_or_else(|| {
        AppError::NotFound("no trust root yet: upload the first root.json with PUT /api/v1/trust-root".into())
    })?;
    Ok(trust_view(&store, chain))
}

/// One version of the root, exactly as uploaded.
pub async fn get_trust_root_json(db: &Db, p: &Principal, version: u64) -> AppResult<String> {
    p.require(Role::Viewer, "reading the trust root")?;
    let row: Option<(String,)> = sqlx::query_as("SELECT json FROM trust_roots WHERE org_id = $1 AND version = $2")
        .bind(p.org().to_string())
        .bind(i64::try_from(version).unwrap_or(i64::MAX))
        .fetch_optional(db.pool())
        .await?;
    row.map(|(j,)| j).ok_or_else(|| AppError::NotFound(format!("no trust root version {version}")))
}

/// `PUT /api/v1/trust-root`: the first root (signed by its own root keys), or the next
/// version, signed by the current root keys and its own (`TrustStore::apply`).
pub async fn put_trust_root(db: &Db, p: &Principal, json: &[u8]) -> AppResult<TrustRoot> {
    p.require(Role::Admin, "changing the trust root")?;
    let text = std::str::from_utf8(json).map_err(|_| AppError::BadRequest("root.json is not UTF-8".into()))?;
    let mut tx = db.begin_write().await?;
    // Serializes root changes of one organization (PostgreSQL row lock; SQLite's writer lock).
    sqlx::query("UPDATE organizations SET name = name WHERE id = $1")
        .bind(p.org().to_string())
        .execute(tx.conn())
        .await?;
    let store = match load_trust(tx.conn(), p.org()).await? {
        None => TrustStore::from_initial(json).map_err(|e| {
            AppError::BadRequest(format!("the first trust root must be signed by its own root keys: {e}"))
        })?,
        Some(mut store) => {
            let current = store.version();
            match store.apply(json) {
                Ok(true) => store,
                Ok(false) => {
                    return Err(AppError::Conflict(format!(
                        "this root is not newer than the current version {current}: upload version {}",
                        current + 1
                    )));
                }
                Err(e) => return Err(AppError::BadRequest(format!("the trust root was refused: {e}"))),
            }
        }
    };
    sqlx::query(
        "INSERT INTO trust_roots (org_id, version, json, uploaded_at, uploaded_by) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(p.org().to_string())
    .bind(i64::try_from(store.version()).unwrap_or(i64::MAX))
    .bind(text.to_string())
    .bind(now_ms())
    .bind(principal_label(p))
    .execute(tx.conn())
    .await?;
    let root = store.root();
    let summary = format!(
        "trust root version {}: release keys {}{}",
        store.version(),
        root.release_keys.iter().map(|k| k.id.as_str()).collect::<Vec<_>>().join(", "),
        if root.revoked.is_empty() { String::new() } else { format!("; revoked {}", root.revoked.join(", ")) }
    );
    let version = store.version().to_string();
    audit::append(
        tx.conn(),
        Event { actor: p, action: "trust_root.update", target_kind: "trust_root", target_id: &version, summary },
    )
    .await?;
    let chain: Vec<u64> =
        trust_chain(tx.conn(), p.org()).await?.into_iter().map(|(v, _)| u64::try_from(v).unwrap_or(0)).collect();
    tx.commit().await?;
    Ok(trust_view(&store, chain))
}
