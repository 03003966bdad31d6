//! Shared test harness: a fresh database per test on each backend, and an app to call.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::http::{Method, Request, StatusCode, header};
use drover_proto::api::{CreateToken, Role};
use drover_server::app::{AppState, router};
use drover_server::auth::Principal;
use drover_server::config::Config;
use drover_server::db::Db;
use serde_json::Value;
use tower::ServiceExt as _;

pub const ADMIN_PASSWORD: &str = "first-admin-password";

static COUNTER: AtomicU64 = AtomicU64::new(0);

pub fn unique(prefix: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    format!("{prefix}_{}_{n}_{nanos}", std::process::id())
}

/// A temporary directory removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        let d = std::env::temp_dir().join(unique(&format!("drover-it-{name}")));
        std::fs::create_dir_all(&d).unwrap();
        TempDir(d)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A database for one test.
pub struct TestDb {
    pub label: &'static str,
    pub url: String,
    pub dir: TempDir,
    schema: Option<(String, String)>,
}

pub fn pg_base_url() -> Option<String> {
    std::env::var("DROVER_TEST_DATABASE_URL").ok().filter(|u| !u.is_empty())
}

impl TestDb {
    pub fn sqlite() -> TestDb {
        let dir = TempDir::new("sqlite");
        let url = format!("sqlite://{}?mode=rwc", dir.path().join("drover.db").display());
        TestDb { label: "sqlite", url, dir, schema: None }
    }

    /// A fresh schema in the test PostgreSQL database.
    pub async fn postgres(base: &str) -> TestDb {
        let schema = unique("drover_t");
        let mut conn = pg_connect(base).await;
        sqlx::raw_sql(&format!("CREATE SCHEMA {schema}")).execute(&mut conn).await.unwrap();
        let sep = if base.contains('?') { '&' } else { '?' };
        let url = format!("{base}{sep}options=-c%20search_path%3D{schema}");
        TestDb { label: "postgres", url, dir: TempDir::new("pg"), schema: Some((base.to_string(), schema)) }
    }

    /// Every backend this run tests: SQLite always, PostgreSQL when configured (always in CI).
    pub async fn all() -> Vec<TestDb> {
        let mut v = vec![TestDb::sqlite()];
        match pg_base_url() {
            Some(base) => v.push(TestDb::postgres(&base).await),
            None if std::env::var("CI").is_ok_and(|v| v == "true") => {
                panic!("CI must test PostgreSQL too: set DROVER_TEST_DATABASE_URL")
            }
            None => eprintln!("note: DROVER_TEST_DATABASE_URL is not set; testing SQLite only"),
        }
        v
    }

    pub async fn drop_schema(&self) {
        if let Some((base, schema)) = &self.schema {
            let mut conn = pg_connect(base).await;
            let _ = sqlx::raw_sql(&format!("DROP SCHEMA {schema} CASCADE")).execute(&mut conn).await;
        }
    }
}

async fn pg_connect(url: &str) -> sqlx::AnyConnection {
    use sqlx::Connection as _;
    sqlx::any::install_default_drivers();
    sqlx::AnyConnection::connect(url).await.unwrap()
}

/// The HTTP application over a fresh database, with an admin token ready.
pub struct TestApp {
    pub db: Db,
    pub state: AppState,
    pub app: Router,
    pub device_app: Router,
    pub admin_token: String,
    pub label: &'static str,
}

pub struct Resp {
    pub status: StatusCode,
    pub headers: axum::http::HeaderMap,
    pub body: Value,
    pub text: String,
}

impl TestApp {
    pub async fn new(tdb: &TestDb) -> TestApp {
        TestApp::new_with(tdb, |_| {}).await
    }

    /// As [`TestApp::new`], with the configuration changed by `configure` first.
    pub async fn new_with(tdb: &TestDb, configure: impl FnOnce(&mut Config)) -> TestApp {
        let mut config = Config::defaults(tdb.dir.path());
        config.database_url = tdb.url.clone();
        configure(&mut config);
        let db = drover_server::app::open_db(&config, Some(ADMIN_PASSWORD.into())).await.unwrap();
        let org_id = drover_server::ops::find_org(&db, None).await.unwrap();
        let admin_token = drover_server::ops::create_token(
            &db,
            &Principal::cli(&org_id),
            CreateToken { name: "test admin".into(), role: Role::Admin, expires_in_days: None },
        )
        .await
        .unwrap()
        .secret;
        let ca = drover_server::app::open_ca(&config, &db).await.unwrap();
        let state = AppState::new(db.clone(), config, std::sync::Arc::new(ca));
        let app = router(state.clone());
        let device_app = drover_server::devnet::device_router(state.clone());
        TestApp { db, state, app, device_app, admin_token, label: tdb.label }
    }

    /// A request as droverd's listeners take it: enrollment on the device endpoint (as a
    /// device sends it), everything else on the operator API.
    pub async fn send(&self, req: Request<Body>) -> Resp {
        let app = if req.uri().path() == "/api/v1/enroll" { &self.device_app } else { &self.app };
        self.send_to(app, req).await
    }

    /// A request to the operator API, whatever its path.
    pub async fn send_api(&self, req: Request<Body>) -> Resp {
        self.send_to(&self.app, req).await
    }

    async fn send_to(&self, app: &Router, req: Request<Body>) -> Resp {
        let resp = app.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = axum::body::to_bytes(resp.into_body(), 64 * 1024 * 1024).await.unwrap();
        let text = String::from_utf8_lossy(&bytes).to_string();
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Resp { status, headers, body, text }
    }

    /// A JSON API call with a bearer token.
    pub async fn call(&self, method: Method, path: &str, token: Option<&str>, body: Option<Value>) -> Resp {
        let mut b = Request::builder().method(method).uri(path);
        if let Some(t) = token {
            b = b.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let req = match body {
            Some(v) => b.header(header::CONTENT_TYPE, "application/json").body(Body::from(v.to_string())).unwrap(),
            None => b.body(Body::empty()).unwrap(),
        };
        self.send(req).await
    }

    pub async fn admin(&self, method: Method, path: &str, body: Option<Value>) -> Resp {
        self.call(method, path, Some(&self.admin_token.clone()), body).await
    }

    /// Signs in through `POST /api/v1/auth/login`. Returns the answer and, on success, the
    /// session cookie (`name=value`) and its CSRF token.
    pub async fn sign_in(&self, username: &str, password: &str) -> (Resp, String, String) {
        let r = self
            .call(
                Method::POST,
                "/api/v1/auth/login",
                None,
                Some(serde_json::json!({"username": username, "password": password})),
            )
            .await;
        let cookie = r
            .headers
            .get(header::SET_COOKIE)
            .map(|c| c.to_str().unwrap().split(';').next().unwrap().to_string())
            .unwrap_or_default();
        let csrf = r.body["csrf_token"].as_str().unwrap_or_default().to_string();
        (r, cookie, csrf)
    }

    /// A token of the given role, made through the API.
    pub async fn token(&self, role: &str) -> String {
        let r = self
            .admin(
                Method::POST,
                "/api/v1/tokens",
                Some(serde_json::json!({"name": format!("{role} token"), "role": role})),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        r.body["secret"].as_str().unwrap().to_string()
    }

    pub async fn audit_count(&self) -> i64 {
        let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM audit_log").fetch_one(self.db.pool()).await.unwrap();
        n
    }
}

/// Runs `f` against every backend, naming the backend when it fails.
#[macro_export]
macro_rules! each_backend {
    (config = $configure:expr, |$app:ident| $body:block) => {{
        for tdb in $crate::support::TestDb::all().await {
            let $app = $crate::support::TestApp::new_with(&tdb, $configure).await;
            eprintln!("— on {}", $app.label);
            $body
            $app.db.close().await;
            tdb.drop_schema().await;
        }
    }};
    (|$app:ident| $body:block) => {{
        for tdb in $crate::support::TestDb::all().await {
            let $app = $crate::support::TestApp::new(&tdb).await;
            eprintln!("— on {}", $app.label);
            $body
            $app.db.close().await;
            tdb.drop_schema().await;
        }
    }};
}

/// Waits until `cond` holds, or panics after `timeout`.
pub fn eventually<T>(timeout: Duration, what: &str, mut cond: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = cond() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A binary of this workspace, built now if needed (`cargo build -p PKG --bin BIN`), in the
/// profile this test binary was built in.
pub fn workspace_bin(pkg: &str, bin: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_BIN_EXE_droverd")).parent().unwrap();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = std::process::Command::new(cargo);
    cmd.args(["build", "-p", pkg, "--bin", bin]).current_dir(env!("CARGO_MANIFEST_DIR"));
    if dir.file_name().is_some_and(|n| n == "release") {
        cmd.arg("--release");
    }
    assert!(cmd.status().expect("cargo runs").success(), "cargo build -p {pkg} failed");
    dir.join(bin)
}

/// The `drover-agent` binary of this workspace (`DROVER_AGENT_BIN` if set), built once.
pub fn agent_bin() -> PathBuf {
    static BIN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        std::env::var_os("DROVER_AGENT_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| workspace_bin("drover-agent", "drover-agent"))
    })
    .clone()
}

/// A device's hello as an agent without capabilities sends it.
pub fn hello(agent: &str, boot_id: &str) -> drover_proto::device::Hello {
    drover_proto::device::Hello {
        v: drover_proto::device::PROTOCOL_VERSION,
        agent: agent.to_string(),
        boot_id: Some(boot_id.to_string()),
        software: None,
        capabilities: None,
    }
}

/// Mosquitto's configuration and ACL exactly as `docs/mosquitto.md` gives them — its `conf`
/// blocks in order (the listener, then the tuning ones) and its ACL block — with the paths
/// pointed at `dir` (which holds `ca.crt`, `server.crt`, `server.key`), the listener on
/// 127.0.0.1:`port`, and no persistence. Writes `dir/mosquitto.conf` and `dir/drover.acl`
/// and returns the configuration file's path. A doc that drifts from what works fails the
/// tests that run it.
pub fn mosquitto_config(dir: &Path, port: u16) -> PathBuf {
    let doc = include_str!("../../../../docs/mosquitto.md");
    let mut blocks: Vec<(String, String)> = Vec::new();
    let mut heading = String::new();
    let mut lines = doc.lines();
    while let Some(line) = lines.next() {
        if let Some(h) = line.strip_prefix("## ") {
            heading = h.to_string();
        } else if line.trim() == "```conf" {
            let body: Vec<&str> = lines.by_ref().take_while(|l| l.trim() != "```").collect();
            blocks.push((heading.clone(), body.join("\n")));
        }
    }
    let acl: Vec<&str> = blocks.iter().filter(|(h, _)| h.starts_with("ACL")).map(|(_, b)| b.as_str()).collect();
    let conf: Vec<&str> = blocks.iter().filter(|(h, _)| !h.starts_with("ACL")).map(|(_, b)| b.as_str()).collect();
    assert_eq!(acl.len(), 1, "docs/mosquitto.md has one ACL block");
    assert!(conf.len() >= 2, "docs/mosquitto.md has the listener's conf block and the tuning ones");
    let d = dir.display().to_string();
    let conf = conf
        .join("\n")
        .replace("/etc/mosquitto/drover.acl", &format!("{d}/drover.acl"))
        .replace("/etc/mosquitto/certs", &d)
        .replace("listener 8883", &format!("listener {port} 127.0.0.1"));
    assert!(conf.contains(&format!("listener {port} 127.0.0.1")), "the doc's listener is on 8883: {conf}");
    std::fs::write(dir.join("drover.acl"), acl[0]).unwrap();
    std::fs::write(dir.join("mosquitto.conf"), format!("{conf}\npersistence false\n")).unwrap();
    dir.join("mosquitto.conf")
}
