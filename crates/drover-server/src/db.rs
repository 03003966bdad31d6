//! One storage layer over SQLite (the embedded default, in WAL mode) and PostgreSQL.
//!
//! Queries are written once in the SQL both engines accept, with `$1`-style parameters;
//! schema migrations are written per engine. Values cross the boundary as `i64`, `String`
//! and `Option`s of them — timestamps are Unix milliseconds — so every query decodes the
//! same way on both.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Once};
use std::time::Duration;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::pool::PoolConnectionMetadata;
use sqlx::{AnyConnection, AnyPool, Connection as _, Executor as _};
use tokio::sync::{Mutex, OwnedMutexGuard};

use crate::migrations::MIGRATIONS;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("unsupported database URL {0:?}: use sqlite://PATH or postgres://USER@HOST/DB")]
    UnsupportedUrl(String),
    #[error("cannot open the database at {url}: {source}")]
    Connect {
        url: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("database migration {version} ({name}) failed: {source}")]
    Migration {
        version: i64,
        name: &'static str,
        #[source]
        source: sqlx::Error,
    },
    #[error("the database schema is at version {found}, newer than this droverd knows ({known}); run a newer droverd")]
    SchemaTooNew { found: i64, known: i64 },
    #[error(transparent)]
    Sql(#[from] sqlx::Error),
}

/// A pool of connections plus which engine is behind it.
#[derive(Clone)]
pub struct Db {
    pool: AnyPool,
    backend: Backend,
    /// SQLite allows one writer at a time; this process's writers queue here rather than
    /// each holding a pooled connection while SQLite's busy handler spins. PostgreSQL needs
    /// no such lock.
    write_lock: Option<Arc<Mutex<()>>>,
}

/// A write transaction. On SQLite it also holds the writer lock until it ends.
pub struct WriteTx {
    pub tx: sqlx::Transaction<'static, sqlx::Any>,
    _guard: Option<OwnedMutexGuard<()>>,
}

impl WriteTx {
    pub fn conn(&mut self) -> &mut sqlx::AnyConnection {
        &mut self.tx
    }

    /// Commits. When the COMMIT fails (a full disk, say) the transaction is rolled back as
    /// the connection goes back to the pool, and a connection still in a transaction after
    /// that is closed rather than pooled (see [`release_check`]).
    pub async fn commit(self) -> Result<(), sqlx::Error> {
        let result = self.tx.commit().await;
        if let Err(e) = &result {
            note_error(e);
        }
        result
    }
}

/// A pooled connection may be reused only outside any transaction. sqlx counts the depth
/// itself and does not learn of a transaction the database ended on its own: SQLite rolls a
/// transaction back by itself on `SQLITE_FULL`, so the ROLLBACK queued when the
/// `Transaction` is dropped fails ("no transaction is active") and the count stays at 1 —
/// and every later `BEGIN IMMEDIATE` on that connection would fail with "attempted to call
/// begin_with at non-zero transaction depth". Such a connection is closed instead (which
/// also ends any transaction the database still holds), and the pool opens a fresh one.
///
/// On release a connection outside a transaction passes at once; otherwise the rollback the
/// dropped `Transaction` queued is let run first (a ping is served after it) and the depth
/// checked again.
fn release_check(
    conn: &mut AnyConnection,
    _meta: PoolConnectionMetadata,
) -> futures_util::future::BoxFuture<'_, Result<bool, sqlx::Error>> {
    Box::pin(async move {
        if !conn.is_in_transaction() {
            return Ok(true);
        }
        conn.ping().await?;
        if conn.is_in_transaction() {
            tracing::warn!(
                "database: a connection was left in a transaction (a failed commit or rollback); closing it"
            );
            return Ok(false);
        }
        Ok(true)
    })
}

/// The same check before a pooled connection is handed out (cheap: no round trip).
fn acquire_check(
    conn: &mut AnyConnection,
    _meta: PoolConnectionMetadata,
) -> futures_util::future::BoxFuture<'_, Result<bool, sqlx::Error>> {
    Box::pin(async move {
        if conn.is_in_transaction() {
            tracing::warn!("database: a pooled connection was still in a transaction; closing it");
            return Ok(false);
        }
        Ok(true)
    })
}

/// Set when a write failed for lack of space and cleared when a write probe succeeds:
/// `/readyz` probes with a write while it is set ([`Db::readiness`]). Process-wide because the
/// error reaches [`crate::error::AppError`] without its `Db`; a stale flag costs one probe.
static STORAGE_FULL_SEEN: AtomicBool = AtomicBool::new(false);

/// True when the error says the disk (or the database's quota) is full: SQLite's
/// `SQLITE_FULL` (13), PostgreSQL's `53100 disk_full`, or an I/O error `ENOSPC`.
pub fn is_storage_full(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Database(db) => {
            matches!(db.code().as_deref(), Some("13") | Some("53100"))
                || db.message().contains("database or disk is full")
        }
        sqlx::Error::Io(io) => is_io_storage_full(io),
        _ => false,
    }
}

/// True for an I/O error that means no space is left on the device (`ENOSPC`, or `EDQUOT`).
pub fn is_io_storage_full(err: &std::io::Error) -> bool {
    matches!(err.kind(), std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded)
}

/// Records a storage-full error, so that `/readyz` checks whether the database can write.
pub fn note_error(err: &sqlx::Error) {
    if is_storage_full(err) {
        note_storage_full();
    }
}

/// See [`note_error`].
pub fn note_storage_full() {
    STORAGE_FULL_SEEN.store(true, Ordering::Relaxed);
}

/// Why the server is not ready, for `/readyz`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotReady {
    /// The database does not answer.
    Unreachable,
    /// The database answers but a write fails for lack of space.
    DiskFull,
    /// The database answers but a write fails otherwise.
    CannotWrite,
}

impl NotReady {
    pub fn reason(&self) -> &'static str {
        match self {
            NotReady::Unreachable => "database: unreachable",
            NotReady::DiskFull => "database: disk full",
            NotReady::CannotWrite => "database: cannot write",
        }
    }
}

static DRIVERS: Once = Once::new();

/// Removes the password from a database URL so that it can be shown in a message.
pub fn redact_url(url: &str) -> String {
    if let Some((scheme, rest)) = url.split_once("://")
        && let Some((creds, host)) = rest.split_once('@')
        && let Some((user, _pw)) = creds.split_once(':')
    {
        return format!("{scheme}://{user}:***@{host}");
    }
    url.to_string()
}

impl Db {
    /// Connects and applies pending migrations.
    pub async fn open(url: &str) -> Result<Db, DbError> {
        DRIVERS.call_once(sqlx::any::install_default_drivers);
        let backend = if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Backend::Postgres
        } else {
            return Err(DbError::UnsupportedUrl(redact_url(url)));
        };
        let connect_err = |source| DbError::Connect { url: redact_url(url), source };
        let opts: AnyConnectOptions = url.parse().map_err(connect_err)?;
        let pool = match backend {
            Backend::Sqlite => {
                AnyPoolOptions::new()
                    .max_connections(8)
                    .acquire_timeout(Duration::from_secs(10))
                    .after_release(release_check)
                    .before_acquire(acquire_check)
                    .after_connect(|conn, _meta| {
                        Box::pin(async move {
                            conn.execute(
                                "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; \
                                 PRAGMA foreign_keys = ON; PRAGMA busy_timeout = 10000;",
                            )
                            .await?;
                            Ok(())
                        })
                    })
                    .connect_with(opts)
                    .await
            }
            Backend::Postgres => {
                AnyPoolOptions::new()
                    .max_connections(16)
                    .acquire_timeout(Duration::from_secs(5))
                    .after_release(release_check)
                    .before_acquire(acquire_check)
                    .connect_with(opts)
                    .await
            }
        }
        .map_err(connect_err)?;
        let db = Db { pool, backend, write_lock: (backend == Backend::Sqlite).then(|| Arc::new(Mutex::new(()))) };
        db.migrate().await?;
        Ok(db)
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// Starts a transaction that will write.
    pub async fn begin_write(&self) -> Result<WriteTx, sqlx::Error> {
        let guard = match &self.write_lock {
            Some(lock) => Some(lock.clone().lock_owned().await),
            None => None,
        };
        let tx = match self.backend {
            // Take the write lock at BEGIN: a deferred transaction that read first and then
            // writes fails with SQLITE_BUSY if anyone wrote in between, instead of waiting.
            Backend::Sqlite => self.pool.begin_with("BEGIN IMMEDIATE").await?,
            Backend::Postgres => self.pool.begin().await?,
        };
        Ok(WriteTx { tx, _guard: guard })
    }

    /// A bookkeeping write (`UPDATE … SET column = $1 WHERE key = $2`: when a token or a
    /// session was last used) in its own write transaction. One that fails for lack of space
    /// is logged and skipped, so that reads keep working on a full disk.
    pub async fn bookkeeping(&self, sql: &'static str, at: i64, key: &str) -> Result<(), sqlx::Error> {
        let write = async {
            let mut tx = self.begin_write().await?;
            sqlx::query(sql).bind(at).bind(key.to_string()).execute(tx.conn()).await?;
            tx.commit().await
        };
        match write.await {
            Err(e) if is_storage_full(&e) => {
                note_storage_full();
                tracing::warn!(error = %e, "database: bookkeeping write skipped for lack of space");
                Ok(())
            }
            other => other,
        }
    }

    /// Checks the database answers (for `/readyz`).
    pub async fn ping(&self) -> Result<(), sqlx::Error> {
        sqlx::query("SELECT 1").execute(&self.pool).await.map(|_| ())
    }

    /// Whether the server can serve (for `/readyz`): the database answers and, after a write
    /// failed for lack of space, a small write commits again. The probe writes one row of
    /// its own in `job_leases` (`readiness-probe`, which no job uses) with a new value each
    /// time, so that the commit really has to write.
    pub async fn readiness(&self) -> Result<(), NotReady> {
        if let Err(e) = self.ping().await {
            tracing::warn!(error = %e, "readiness check: database unreachable");
            return Err(NotReady::Unreachable);
        }
        if !STORAGE_FULL_SEEN.load(Ordering::Relaxed) {
            return Ok(());
        }
        let probe = async {
            let mut tx = self.begin_write().await?;
            let now = crate::time::now_ms();
            sqlx::query(
                "INSERT INTO job_leases (name, holder, expires_at, last_run_at) VALUES ('readiness-probe', 'droverd', $1, $1) \
                 ON CONFLICT (name) DO UPDATE SET expires_at = excluded.expires_at, last_run_at = excluded.last_run_at",
            )
            .bind(now)
            .execute(tx.conn())
            .await?;
            tx.commit().await
        };
        match tokio::time::timeout(Duration::from_secs(5), probe).await {
            Ok(Ok(())) => {
                STORAGE_FULL_SEEN.store(false, Ordering::Relaxed);
                tracing::info!("readiness check: the database writes again");
                Ok(())
            }
            Ok(Err(e)) if is_storage_full(&e) => {
                tracing::warn!(error = %e, "readiness check: the database cannot write: disk full");
                Err(NotReady::DiskFull)
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "readiness check: the database cannot write");
                Err(NotReady::CannotWrite)
            }
            Err(_) => {
                tracing::warn!("readiness check: a write did not finish within 5 s");
                Err(NotReady::CannotWrite)
            }
        }
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }

    async fn migrate(&self) -> Result<(), DbError> {
        let mut conn = self.pool.acquire().await?;
        if self.backend == Backend::Postgres {
            // Replicas starting together: one migrates, the others wait for it.
            sqlx::query("SELECT pg_advisory_lock(7243001)").execute(&mut *conn).await?;
        }
        let result = self.migrate_on(&mut conn).await;
        if self.backend == Backend::Postgres {
            sqlx::query("SELECT pg_advisory_unlock(7243001)").execute(&mut *conn).await?;
        }
        result
    }

    async fn migrate_on(&self, conn: &mut sqlx::AnyConnection) -> Result<(), DbError> {
        sqlx::raw_sql(
            "CREATE TABLE IF NOT EXISTS schema_migrations (\
               version BIGINT PRIMARY KEY, name TEXT NOT NULL, applied_at BIGINT NOT NULL)",
        )
        .execute(&mut *conn)
        .await?;
        let applied: Vec<(i64,)> =
            sqlx::query_as("SELECT version FROM schema_migrations ORDER BY version").fetch_all(&mut *conn).await?;
        let known = MIGRATIONS.last().map(|m| m.version).unwrap_or(0);
        if let Some(&(found,)) = applied.last()
            && found > known
        {
            return Err(DbError::SchemaTooNew { found, known });
        }
        for m in MIGRATIONS {
            if applied.iter().any(|(v,)| *v == m.version) {
                continue;
            }
            let sql = match self.backend {
                Backend::Sqlite => m.sqlite,
                Backend::Postgres => m.postgres,
            };
            let err = |source| DbError::Migration { version: m.version, name: m.name, source };
            let mut tx = conn.begin().await?;
            sqlx::raw_sql(sql).execute(&mut *tx).await.map_err(err)?;
            sqlx::query("INSERT INTO schema_migrations (version, name, applied_at) VALUES ($1, $2, $3)")
                .bind(m.version)
                .bind(m.name)
                .bind(crate::time::now_ms())
                .execute(&mut *tx)
                .await
                .map_err(err)?;
            tx.commit().await.map_err(err)?;
            tracing::info!(version = m.version, name = m.name, "applied database migration");
        }
        Ok(())
    }
}

/// True when the error is a violated unique constraint (on either engine).
pub fn is_unique_violation(err: &sqlx::Error) -> bool {
    err.as_database_error().is_some_and(|e| e.is_unique_violation())
}

/// Escapes `\`, `%` and `_` for a `LIKE … ESCAPE '\'` pattern, so that user input matches
/// literally (usernames and actions contain `_`).
pub fn like_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '\\' | '%' | '_') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// A value bound to a dynamically built query.
#[derive(Debug, Clone, PartialEq)]
pub enum Bind {
    Int(i64),
    Text(String),
}

/// Builds a `WHERE` clause with numbered parameters for both engines.
#[derive(Debug, Default)]
pub struct Filter {
    clauses: Vec<String>,
    pub binds: Vec<Bind>,
}

impl Filter {
    /// Adds a clause; each `?` in it becomes the next numbered parameter.
    pub fn and(&mut self, clause: &str, binds: impl IntoIterator<Item = Bind>) -> &mut Self {
        let mut out = String::with_capacity(clause.len() + 8);
        let mut binds = binds.into_iter();
        for ch in clause.chars() {
            if ch == '?' {
                let b = binds.next().expect("one bind per placeholder");
                self.binds.push(b);
                out.push_str(&format!("${}", self.binds.len()));
            } else {
                out.push(ch);
            }
        }
        assert!(binds.next().is_none(), "more binds than placeholders");
        self.clauses.push(out);
        self
    }

    pub fn sql(&self) -> String {
        if self.clauses.is_empty() { String::new() } else { format!(" WHERE {}", self.clauses.join(" AND ")) }
    }

    /// The next free parameter number.
    pub fn next_param(&self) -> usize {
        self.binds.len() + 1
    }
}

/// Binds the values of a [`Filter`] to a query built from its SQL.
pub fn bind_all<'q, O>(
    mut q: sqlx::query::QueryAs<'q, sqlx::Any, O, sqlx::any::AnyArguments<'q>>,
    binds: &[Bind],
) -> sqlx::query::QueryAs<'q, sqlx::Any, O, sqlx::any::AnyArguments<'q>> {
    for b in binds {
        q = match b {
            Bind::Int(i) => q.bind(*i),
            Bind::Text(s) => q.bind(s.clone()),
        };
    }
    q
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_numbers_parameters_in_order() {
        let mut f = Filter::default();
        f.and("role = ?", [Bind::Text("admin".into())]).and(
            "(created_at > ? OR (created_at = ? AND id > ?))",
            [Bind::Int(1), Bind::Int(1), Bind::Text("x".into())],
        );
        assert_eq!(f.sql(), " WHERE role = $1 AND (created_at > $2 OR (created_at = $3 AND id > $4))");
        assert_eq!(f.next_param(), 5);
    }

    #[test]
    fn like_patterns_match_literally() {
        assert_eq!(like_escape("ann_b%\\"), "ann\\_b\\%\\\\");
    }

    #[test]
    fn passwords_are_redacted_from_urls() {
        assert_eq!(redact_url("postgres://drover:s3cret@db:5432/drover"), "postgres://drover:***@db:5432/drover");
        assert_eq!(redact_url("postgres://drover@db/drover"), "postgres://drover@db/drover");
    }
}
