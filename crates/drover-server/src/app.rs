//! The HTTP application: shared state, extractors that give bad input the API's error
//! shape, the router, and the server's start and graceful stop.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{ConnectInfo, DefaultBodyLimit, FromRequest, FromRequestParts, MatchedPath, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::de::DeserializeOwned;

use crate::auth::{CSRF_HEADER, LoginLimiter, Principal, SESSION_COOKIE};
use crate::config::Config;
use crate::db::Db;
use crate::error::AppError;
use crate::metrics::Metrics;
use crate::ops;

pub struct Inner {
    pub db: Db,
    pub ca: Arc<crate::ca::FleetCa>,
    pub config: Config,
    pub limiter: LoginLimiter,
    /// Enrollment rates per client address and the cap on waiting devices.
    pub enroll_limiter: crate::devices::EnrollLimiter,
    pub metrics: Metrics,
    pub ui: crate::ui::Templates,
    /// The embedded broker, when this replica runs one (to drop decommissioned devices at once).
    pub broker: std::sync::OnceLock<drover_broker::BrokerHandle>,
    /// Where artifact files are.
    pub store: crate::store::ArtifactStore,
    /// Sends update commands and takes reports (connected once the MQTT client runs).
    pub engine: Arc<crate::engine::Engine>,
    /// Stores device telemetry and acks it (connected once the MQTT client runs).
    pub telemetry: Arc<crate::telemetry::ingest::Ingest>,
    /// This replica's broker connection for remote sessions (connected once it runs).
    pub remote: Arc<crate::remote::Hub>,
}

/// Shared state of every request handler.
#[derive(Clone)]
pub struct AppState(pub Arc<Inner>);

impl std::ops::Deref for AppState {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

impl AppState {
    /// State with the artifact store the configuration names.
    ///
    /// # Panics
    /// When that store cannot be opened; [`serve`] opens it first and reports the error.
    pub fn new(db: Db, config: Config, ca: Arc<crate::ca::FleetCa>) -> AppState {
        let store = crate::store::ArtifactStore::open(&config.artifact_store, &config.data_dir)
            .unwrap_or_else(|e| panic!("{e}"));
        AppState::with_store(db, config, ca, store)
    }

    pub fn with_store(
        db: Db,
        config: Config,
        ca: Arc<crate::ca::FleetCa>,
        store: crate::store::ArtifactStore,
    ) -> AppState {
        let engine = crate::engine::Engine::new(db.clone());
        let (db_for_telemetry, telemetry_config) = (db.clone(), config.telemetry.clone());
        let enroll_limiter = crate::devices::EnrollLimiter::new(&config);
        AppState(Arc::new(Inner {
            db,
            ca,
            config,
            limiter: LoginLimiter::default(),
            enroll_limiter,
            metrics: Metrics::default(),
            ui: crate::ui::Templates::new(),
            broker: std::sync::OnceLock::new(),
            store,
            engine,
            telemetry: crate::telemetry::ingest::Ingest::new(db_for_telemetry, telemetry_config),
            remote: crate::remote::Hub::new(),
        }))
    }
}

/// The whole HTTP application.
pub fn router(state: AppState) -> Router {
    let api = crate::api::routes()
        .fallback(|| async { AppError::NotFound("no such API route: see /api/v1/openapi.json".into()) })
        .layer(middleware::from_fn(json_errors));
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/metrics/fleet", get(crate::telemetry::prometheus::handler))
        .nest("/api/v1", api)
        .merge(crate::ui::routes())
        .layer(middleware::from_fn_with_state(state.clone(), refuse_nul))
        .layer(DefaultBodyLimit::max(state.config.max_body_bytes))
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .with_state(state)
}

/// 200 `ready` when the database answers and — after a write failed for lack of space —
/// can write again; else 503 `{"status":"unavailable","reason":"database: disk full"}` (or
/// `database: unreachable`, `database: cannot write`).
async fn readyz(State(s): State<AppState>) -> Response {
    match s.db.readiness().await {
        Ok(()) => (StatusCode::OK, "ready\n").into_response(),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(serde_json::json!({"status": "unavailable", "reason": why.reason()})),
        )
            .into_response(),
    }
}

async fn metrics(State(s): State<AppState>) -> Response {
    let pool = s.db.pool();
    let mut body =
        s.metrics.render(pool.size(), pool.num_idle(), pool.options().get_max_connections(), s.db.backend().name());
    if let Some(broker) = s.broker.get() {
        body.push_str(&crate::metrics::render_broker(broker.stats(), broker.retained_count()));
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}

async fn observe(State(s): State<AppState>, req: Request, next: Next) -> Response {
    let start = Instant::now();
    let method = req.method().clone();
    let route = req.extensions().get::<MatchedPath>().map(|p| p.as_str().to_string()).unwrap_or_else(|| {
        if req.uri().path().starts_with("/api/") { "/api/unmatched".into() } else { "unmatched".into() }
    });
    let resp = next.run(req).await;
    s.metrics.observe(method.as_str(), &route, resp.status().as_u16(), start.elapsed());
    resp
}

/// Errors that axum produces itself (405, a rejected body…) leave the API in its error shape too.
async fn json_errors(req: Request, next: Next) -> Response {
    let resp = next.run(req).await;
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return resp;
    }
    let (code, message) = match status {
        StatusCode::NOT_FOUND => ("not_found", "no such route".to_string()),
        StatusCode::METHOD_NOT_ALLOWED => {
            ("method_not_allowed", "this method is not allowed on this route".to_string())
        }
        StatusCode::PAYLOAD_TOO_LARGE => ("payload_too_large", "the request body is too large".to_string()),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => ("unsupported_media_type", "unsupported content type".to_string()),
        s if s.is_server_error() => ("internal", "internal server error".to_string()),
        s => ("invalid_request", s.canonical_reason().unwrap_or("bad request").to_lowercase()),
    };
    let body = drover_proto::api::ErrorBody { error: drover_proto::api::ErrorDetail { code: code.into(), message } };
    let mut out = (status, axum::Json(body)).into_response();
    if let Some(allow) = resp.headers().get(header::ALLOW) {
        out.headers_mut().insert(header::ALLOW, allow.clone());
    }
    out
}

/// A JSON body; malformed, mistyped, unknown-field, oversized and wrongly labelled bodies are
/// refused with the API's error shape.
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = AppError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        if !is_json_content_type(req.headers()) {
            return Err(AppError::UnsupportedMediaType(
                "send the body as JSON with Content-Type: application/json".into(),
            ));
        }
        let bytes = match axum::body::Bytes::from_request(req, state).await {
            Ok(b) => b,
            Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                return Err(AppError::PayloadTooLarge(
                    "the request body is larger than the server accepts (max_body_bytes)".into(),
                ));
            }
            Err(e) => return Err(AppError::BadRequest(e.body_text())),
        };
        if json_has_nul(&bytes) {
            return Err(AppError::BadRequest(format!("invalid request body: {NUL_MESSAGE}")));
        }
        match axum::Json::<T>::from_bytes(&bytes) {
            Ok(axum::Json(v)) => Ok(ApiJson(v)),
            Err(rejection) => Err(json_rejection(rejection)),
        }
    }
}

/// What a request with a NUL character in its text is told. PostgreSQL cannot store NUL in
/// text, and no name, query or identity needs one: it is refused at the edge on every backend.
pub const NUL_MESSAGE: &str = "text must not contain NUL (\\u0000)";

/// `application/json` or any `…+json` type, as axum's own `Json` accepts.
fn is_json_content_type(headers: &HeaderMap) -> bool {
    let Some(ct) = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()) else { return false };
    let essence = ct.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
    let Some((ty, sub)) = essence.split_once('/') else { return false };
    ty == "application" && (sub == "json" || sub.ends_with("+json"))
}

/// True when a JSON text holds a NUL: a raw 0x00 byte, or a `\u0000` escape in a string
/// (an escaped backslash followed by `u0000` is not one).
pub fn json_has_nul(bytes: &[u8]) -> bool {
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            0 => return true,
            b'\\' => {
                if bytes.get(i + 1) == Some(&b'u') && bytes.get(i + 2..i + 6) == Some(b"0000".as_slice()) {
                    return true;
                }
                i += 2;
            }
            _ => i += 1,
        }
    }
    false
}

/// True when percent-encoded text (a path or query string) decodes to something with a NUL.
pub fn percent_encoded_has_nul(s: &str) -> bool {
    s.as_bytes().windows(3).any(|w| w == b"%00") || s.as_bytes().contains(&0)
}

/// Refuses a request whose path or query string carries a NUL.
fn uri_nul_check(uri: &axum::http::Uri) -> Result<(), AppError> {
    if percent_encoded_has_nul(uri.path()) {
        return Err(AppError::BadRequest(format!("invalid path: {NUL_MESSAGE}")));
    }
    if uri.query().is_some_and(percent_encoded_has_nul) {
        return Err(AppError::BadRequest(format!("invalid query: {NUL_MESSAGE}")));
    }
    Ok(())
}

/// Every route, the web UI's included: a NUL in the path or query string, or in a form
/// body (URL-encoded, or a raw NUL in a multipart one), is refused with 400 before any handler sees it.
async fn refuse_nul(State(s): State<AppState>, req: Request, next: Next) -> Response {
    if let Err(e) = uri_nul_check(req.uri()) {
        return e.into_response();
    }
    let essence = |v: &str| v.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
    let form = req.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).map(essence);
    let urlencoded = match form.as_deref() {
        Some("application/x-www-form-urlencoded") => true,
        // The web UI's multipart forms carry text (a pasted or chosen CSV file), never binaries.
        Some("multipart/form-data") => false,
        _ => return next.run(req).await,
    };
    let (parts, body) = req.into_parts();
    let bytes = match axum::body::to_bytes(body, s.config.max_body_bytes).await {
        Ok(b) => b,
        Err(_) => {
            return AppError::PayloadTooLarge(
                "the request body is larger than the server accepts (max_body_bytes)".into(),
            )
            .into_response();
        }
    };
    if bytes.contains(&0) || (urlencoded && std::str::from_utf8(&bytes).is_ok_and(percent_encoded_has_nul)) {
        return AppError::BadRequest(format!("invalid form: {NUL_MESSAGE}")).into_response();
    }
    next.run(Request::from_parts(parts, axum::body::Body::from(bytes))).await
}

fn json_rejection(r: JsonRejection) -> AppError {
    match r {
        JsonRejection::JsonDataError(e) => AppError::BadRequest(format!(
            "invalid request body: {}",
            e.body_text().trim_start_matches("Failed to deserialize the JSON body into the target type: ")
        )),
        JsonRejection::JsonSyntaxError(e) => AppError::BadRequest(format!(
            "malformed JSON: {}",
            e.body_text().trim_start_matches("Failed to parse the request body as JSON: ")
        )),
        JsonRejection::MissingJsonContentType(_) => {
            AppError::UnsupportedMediaType("send the body as JSON with Content-Type: application/json".into())
        }
        JsonRejection::BytesRejection(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            AppError::PayloadTooLarge("the request body is larger than the server accepts (max_body_bytes)".into())
        }
        other => AppError::BadRequest(other.body_text()),
    }
}

/// Query parameters with the API's error shape on failure.
pub struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        if parts.uri.query().is_some_and(percent_encoded_has_nul) {
            return Err(AppError::BadRequest(format!("invalid query: {NUL_MESSAGE}")));
        }
        axum::extract::Query::<T>::from_request_parts(parts, state).await.map(|q| ApiQuery(q.0)).map_err(
            |e: QueryRejection| {
                AppError::BadRequest(format!(
                    "invalid query: {}",
                    e.body_text().trim_start_matches("Failed to deserialize query string: ")
                ))
            },
        )
    }
}

/// A path parameter with the API's error shape on failure.
pub struct ApiPath<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for ApiPath<T> {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        if percent_encoded_has_nul(parts.uri.path()) {
            return Err(AppError::BadRequest(format!("invalid path: {NUL_MESSAGE}")));
        }
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|p| ApiPath(p.0))
            .map_err(|e: PathRejection| AppError::BadRequest(e.body_text()))
    }
}

pub fn client_ip(parts: &Parts) -> Option<IpAddr> {
    parts.extensions.get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip())
}

pub fn source_of(parts: &Parts) -> String {
    client_ip(parts).map(|ip| ip.to_string()).unwrap_or_else(|| "local".into())
}

pub fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_string())
}

/// The `Set-Cookie` value of a web session (an empty `value` with age 0 clears it). It is
/// marked Secure when the config says so or the request came through an HTTPS proxy.
pub fn session_cookie(s: &AppState, request: &HeaderMap, value: &str, max_age_secs: i64) -> String {
    let secure = s.config.secure_cookies
        || request
            .get("x-forwarded-proto")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.eq_ignore_ascii_case("https"));
    format!(
        "{SESSION_COOKIE}={value}; Path=/; HttpOnly; SameSite=Lax; Max-Age={max_age_secs}{}",
        if secure { "; Secure" } else { "" }
    )
}

fn is_safe(m: &Method) -> bool {
    matches!(*m, Method::GET | Method::HEAD | Method::OPTIONS)
}

/// An API caller: a bearer token, or a web session (whose changes must carry the session's
/// CSRF token in the `X-CSRF-Token` header).
impl FromRequestParts<AppState> for Principal {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, s: &AppState) -> Result<Self, Self::Rejection> {
        let source = source_of(parts);
        if let Some(auth) = parts.headers.get(header::AUTHORIZATION) {
            let auth = auth.to_str().unwrap_or_default();
            let Some(secret) = auth.strip_prefix("Bearer ").or_else(|| auth.strip_prefix("bearer ")) else {
                return Err(AppError::Unauthorized("use Authorization: Bearer <API token>".into()));
            };
            return ops::authenticate_token(&s.db, secret.trim(), source).await;
        }
        let Some(cookie) = cookie(&parts.headers, SESSION_COOKIE) else {
            return Err(AppError::Unauthorized(
                "authentication required: send an API token as Authorization: Bearer <token>".into(),
            ));
        };
        let p = ops::authenticate_session(&s.db, &cookie, source, s.config.idle_timeout_ms()).await?;
        if !is_safe(&parts.method) {
            let sent = parts.headers.get(CSRF_HEADER).and_then(|v| v.to_str().ok());
            if !crate::auth::csrf_matches(p.session_csrf.as_deref(), sent) {
                return Err(AppError::Forbidden(
                    "missing or wrong X-CSRF-Token header for a session-authenticated change".into(),
                ));
            }
        }
        Ok(p)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot use the data directory {path}: {source}")]
    DataDir { path: String, source: std::io::Error },
    #[error("cannot listen on {addr}: {source}{hint}")]
    Listen { addr: String, source: std::io::Error, hint: &'static str },
    #[error(transparent)]
    Db(#[from] crate::db::DbError),
    #[error(transparent)]
    Ca(#[from] crate::ca::CaError),
    #[error("{0}")]
    Bootstrap(String),
    #[error("server error: {0}")]
    Serve(std::io::Error),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

/// Makes the data directory (mode 0700) and its default config file if they are missing.
pub fn prepare_data_dir(dir: &std::path::Path) -> Result<(), StartError> {
    let err = |source| StartError::DataDir { path: dir.display().to_string(), source };
    if !dir.exists() {
        let mut b = std::fs::DirBuilder::new();
        b.recursive(true);
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut b, 0o700);
        b.create(dir).map_err(err)?;
    }
    let meta = std::fs::metadata(dir).map_err(err)?;
    if !meta.is_dir() {
        return Err(err(std::io::Error::new(std::io::ErrorKind::NotADirectory, "it is not a directory")));
    }
    std::fs::read_dir(dir).map_err(err)?;
    let cfg = dir.join(crate::config::CONFIG_FILE);
    if !cfg.exists() {
        std::fs::write(&cfg, crate::config::DEFAULT_TOML).map_err(err)?;
    }
    Ok(())
}

/// Opens the database and creates the default organization and admin on first start,
/// announcing it on stdout (the generated password only when stdout is a terminal).
pub async fn open_db(config: &Config, admin_password: Option<String>) -> Result<Db, StartError> {
    use std::io::IsTerminal as _;
    open_db_announcing(config, admin_password, |m| println!("{m}"), std::io::stdout().is_terminal()).await
}

/// Where the first start leaves the admin's generated password when no terminal shows it.
pub const INITIAL_PASSWORD_FILE: &str = "initial-admin-password";

/// As [`open_db`], telling `announce` what the first start created (one-off commands send it
/// to stderr, so that their own output on stdout stays clean). A generated password is in
/// the announcement only when `to_terminal` says that `announce` writes to a terminal;
/// otherwise (a service, a pipe, a log file) it is written to
/// `DATA_DIR/initial-admin-password` (mode 0600) and the announcement names that file.
pub async fn open_db_announcing(
    config: &Config,
    admin_password: Option<String>,
    announce: impl Fn(&str),
    to_terminal: bool,
) -> Result<Db, StartError> {
    if config.database_url.is_empty() {
        // The database holds password and token hashes: readable by droverd's user only.
        // (SQLite gives its -wal and -shm files the same mode.)
        let db_file = config.data_dir.join(crate::config::SQLITE_FILE);
        if !db_file.exists() {
            let err = |source| StartError::DataDir { path: config.data_dir.display().to_string(), source };
            let mut o = std::fs::OpenOptions::new();
            o.write(true).create_new(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut o, 0o600);
            o.open(&db_file).map_err(err)?;
        }
    }
    let db = Db::open(&config.effective_database_url()).await?;
    match ops::bootstrap(&db, admin_password).await {
        // Never into a log: the log may be shipped elsewhere.
        Ok(Some(b)) => match b.generated_password {
            Some(pw) if to_terminal => announce(&format!(
                "droverd: first start — created organization \"default\" and user {:?} with password: {pw}\n\
                 droverd: this password is shown once; sign in and change it.",
                b.username
            )),
            Some(pw) => {
                let path = config.data_dir.join(INITIAL_PASSWORD_FILE);
                write_secret_file(&path, &pw)
                    .map_err(|source| StartError::DataDir { path: path.display().to_string(), source })?;
                announce(&format!(
                    "droverd: first start — created organization \"default\" and user {:?}; its password is in {} \
                     (readable by droverd's user only): sign in, change it and delete the file.",
                    b.username,
                    path.display()
                ))
            }
            None => announce(&format!(
                "droverd: first start — created user {:?} with the password from DROVER_ADMIN_PASSWORD",
                b.username
            )),
        },
        Ok(None) => {}
        Err(e) => return Err(StartError::Bootstrap(e.to_string())),
    }
    Ok(db)
}

/// Writes `secret` to a new file only droverd's user may read (a stale one is replaced).
fn write_secret_file(path: &std::path::Path, secret: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut o, 0o600);
    let mut f = o.open(path)?;
    f.write_all(format!("{secret}\n").as_bytes())?;
    f.sync_all()
}

/// The fleet CA: the configured files, or the one in the data directory (made on first start).
pub async fn open_ca(config: &Config, db: &Db) -> Result<crate::ca::FleetCa, StartError> {
    use crate::ca::{CA_DIR, FleetCa};
    match (config.ca_cert_file.is_empty(), config.ca_key_file.is_empty()) {
        (false, false) => Ok(FleetCa::from_files(config.ca_cert_file.as_ref(), config.ca_key_file.as_ref())?),
        (true, true) => {
            let org = ops::find_org(db, None).await.map_err(|e| StartError::Bootstrap(e.to_string()))?;
            let name = ops::get_org(db, &org).await.map(|o| o.name).unwrap_or_else(|_| "default".into());
            Ok(FleetCa::load_or_create(&config.data_dir.join(CA_DIR), &name)?)
        }
        _ => Err(StartError::Bootstrap("set both ca_cert_file and ca_key_file, or neither".into())),
    }
}

/// Runs the server until SIGTERM or Ctrl-C (or until `stop` resolves), then finishes the
/// requests in flight and closes the database.
pub async fn serve(
    config: Config,
    db: Db,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
    on_listening: impl FnOnce(SocketAddr),
) -> Result<(), StartError> {
    let listener = tokio::net::TcpListener::bind(&config.http_listen).await.map_err(|source| {
        let hint = match source.kind() {
            std::io::ErrorKind::AddrInUse => {
                " (another program, perhaps another droverd, uses it: choose another with --http-listen)"
            }
            std::io::ErrorKind::PermissionDenied => {
                " (ports below 1024 need privileges: choose another with --http-listen)"
            }
            _ => "",
        };
        StartError::Listen { addr: config.http_listen.clone(), source, hint }
    })?;
    let addr = listener.local_addr().map_err(StartError::Serve)?;
    let ca = Arc::new(open_ca(&config, &db).await?);
    let (stop_devices, stopping) = tokio::sync::watch::channel(false);
    let store = crate::store::ArtifactStore::open(&config.artifact_store, &config.data_dir)?;
    tracing::info!(store = store.describe(), "artifact store");
    let sweep = store.clone();
    tokio::spawn(async move {
        match sweep.remove_stale_uploads().await {
            Ok(0) => {}
            Ok(n) => tracing::info!("removed {n} interrupted artifact upload(s)"),
            Err(e) => tracing::warn!("cannot clean interrupted artifact uploads: {e}"),
        }
    });
    let devices = start_device_side(&config, &db, &ca, stopping.clone()).await?;
    let state = AppState::with_store(db.clone(), config, ca, store);
    if let Some(broker) = devices.broker {
        tokio::spawn(crate::devnet::run_revocation_watch(db.clone(), broker.clone(), stopping.clone()));
        let _ = state.broker.set(broker);
    }
    if let Some(listener) = devices.https {
        let app = crate::devnet::device_router(state.clone())
            .into_make_service_with_connect_info::<crate::devnet::DevicePeer>();
        let mut stopping = stopping.clone();
        tokio::spawn(async move {
            let stop = async move {
                let _ = stopping.wait_for(|s| *s).await;
            };
            if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(stop).await {
                tracing::error!("device endpoint stopped: {e}");
            }
        });
    }
    let engine = state.engine.clone();
    tokio::spawn(crate::devices::run_pending_expiry(
        db.clone(),
        state.config.pending_expiry_days,
        std::time::Duration::from_secs(3600),
        stopping.clone(),
    ));
    tokio::spawn(crate::alerts::engine::run(
        db.clone(),
        std::time::Duration::from_secs(state.config.alerts.interval_secs.max(1)),
        stopping.clone(),
    ));
    match crate::alerts::notify::Notifier::new(state.config.alerts.clone()) {
        Ok(n) => {
            tokio::spawn(crate::alerts::notify::run(db.clone(), Arc::new(n), stopping.clone()));
        }
        Err(e) => return Err(StartError::Bootstrap(format!("alert notifications: {e}"))),
    }
    if let Some(target) = devices.ingest.clone() {
        tokio::spawn(state.remote.clone().run(target, stopping.clone()));
    }
    tokio::spawn(state.remote.clone().run_liveness(
        db.clone(),
        std::time::Duration::from_secs(state.config.remote_lost_after_secs.max(1)),
        stopping.clone(),
    ));
    tokio::spawn(crate::telemetry::maintenance::run(
        db.clone(),
        state.telemetry.cache.clone(),
        state.config.telemetry.clone(),
        uuid::Uuid::now_v7().simple().to_string(),
        stopping.clone(),
    ));
    let telemetry = state.telemetry.clone();
    let traffic = state.metrics.device_traffic.clone();
    let ingest = devices.ingest.map(|target| {
        tokio::spawn(crate::devnet::run_ingest(db.clone(), engine, telemetry, target, traffic, stopping))
    });
    let app = router(state).into_make_service_with_connect_info::<SocketAddr>();
    on_listening(addr);
    tracing::info!(%addr, backend = db.backend().name(), "droverd listening");
    // No Nagle on API connections: remote-access WebSockets carry keystrokes and echoes as
    // small frames that must not wait for the peer's delayed ACK.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp: &mut tokio::net::TcpStream| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            tokio::select! {
                _ = stop => {}
                _ = shutdown_signal() => {}
            }
            tracing::info!("shutting down: finishing requests in flight");
        })
        .await
        .map_err(StartError::Serve)?;
    let _ = stop_devices.send(true);
    if let Some(ingest) = ingest {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), ingest).await;
    }
    db.close().await;
    Ok(())
}

struct DeviceSide {
    broker: Option<drover_broker::BrokerHandle>,
    https: Option<crate::devnet::TlsListener>,
    ingest: Option<crate::devnet::IngestTarget>,
}

/// Binds the device-facing listeners (the broker and the HTTPS endpoint) and decides where
/// this replica consumes device traffic from.
async fn start_device_side(
    config: &Config,
    db: &Db,
    ca: &crate::ca::FleetCa,
    stopping: tokio::sync::watch::Receiver<bool>,
) -> Result<DeviceSide, StartError> {
    use crate::devnet;
    let mqtt_listen: Option<std::net::SocketAddr> = match config.mqtt_listen.as_str() {
        "" => None,
        addr => Some(addr.parse().map_err(|e| StartError::Bootstrap(format!("invalid mqtt_listen {addr:?}: {e}")))?),
    };
    // The device-facing certificate also names the addresses this server reaches its own broker at.
    let mut names = devnet::server_names(config);
    let own = mqtt_listen.map(|a| a.ip()).filter(|ip| !ip.is_unspecified()).map(|ip| ip.to_string());
    for local in ["localhost", "127.0.0.1"].into_iter().map(str::to_string).chain(own) {
        if !names.contains(&local) {
            names.push(local);
        }
    }
    let tls = devnet::device_tls(ca, &names)?;
    let instance = uuid::Uuid::now_v7().simple().to_string();
    let read = |path: &str, what: &str| {
        std::fs::read_to_string(path).map_err(|e| StartError::Bootstrap(format!("cannot read {what} {path}: {e}")))
    };
    let mut side = DeviceSide { broker: None, https: None, ingest: None };
    if !config.mqtt_url.is_empty() {
        let (host, port) = devnet::parse_mqtt_url(&config.mqtt_url)?;
        let (cert, key) = match (config.mqtt_client_cert_file.as_str(), config.mqtt_client_key_file.as_str()) {
            ("", "") => ca.issue_service("droverd")?,
            (c, k) if !c.is_empty() && !k.is_empty() => {
                (read(c, "mqtt_client_cert_file")?, read(k, "mqtt_client_key_file")?)
            }
            _ => {
                return Err(StartError::Bootstrap(
                    "give both mqtt_client_cert_file and mqtt_client_key_file, or neither".into(),
                ));
            }
        };
        let ca_pem = if config.mqtt_ca_file.is_empty() {
            ca.cert_pem().to_string()
        } else {
            read(&config.mqtt_ca_file, "mqtt_ca_file")?
        };
        let tls = devnet::client_tls(&ca_pem, &cert, &key)?;
        side.ingest = Some(devnet::IngestTarget { host, port, tls, client_id: format!("service:droverd/{instance}") });
    } else if let Some(listen) = mqtt_listen {
        let broker = devnet::start_broker(listen, db, tls.broker.clone(), stopping.clone()).await?;
        // Nobody is connected to a broker that just started: presence from before is stale.
        crate::presence::mark_all_offline(db).await.map_err(|e| StartError::Bootstrap(e.to_string()))?;
        let addr = broker.local_addr();
        let host = if addr.ip().is_unspecified() { "127.0.0.1".to_string() } else { addr.ip().to_string() };
        tracing::info!(%addr, "MQTT broker listening (mutual TLS)");
        let (cert, key) = ca.issue_service("droverd")?;
        let tls = devnet::client_tls(ca.cert_pem(), &cert, &key)?;
        side.ingest = Some(devnet::IngestTarget {
            host,
            port: addr.port(),
            tls,
            client_id: format!("service:droverd/{instance}"),
        });
        side.broker = Some(broker);
    } else {
        tracing::warn!("no MQTT broker: set mqtt_listen or mqtt_url, or devices cannot connect");
    }
    if !config.device_listen.is_empty() {
        let listener = devnet::TlsListener::bind(&config.device_listen, tls.https.clone()).await?;
        tracing::info!(addr = %axum::serve::Listener::local_addr(&listener).map_err(StartError::Serve)?, "device endpoint listening (HTTPS)");
        side.https = Some(listener);
    }
    Ok(side)
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}
