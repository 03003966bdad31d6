//! The real `droverd` binary: first start, serving, graceful stop, startup errors, and the
//! commands that need no running server.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::{Value, json};

use crate::support::{TempDir, TestDb, eventually, free_port};

const BIN: &str = env!("CARGO_BIN_EXE_droverd");

fn droverd(data_dir: &Path, db_url: Option<&str>) -> Command {
    let mut c = Command::new(BIN);
    c.arg("--data-dir").arg(data_dir);
    // Tests run side by side: each server's device-facing listeners on ports of their own.
    c.args(["--mqtt-listen", "127.0.0.1:0", "--device-listen", "127.0.0.1:0"]);
    if let Some(url) = db_url {
        c.arg("--database-url").arg(url);
    }
    c.env_remove("DROVER_ADMIN_PASSWORD").env_remove("DROVER_HTTP_LISTEN").env_remove("DROVER_DATABASE_URL");
    c.env("DROVER_LOG", "warn");
    c
}

pub struct Server {
    pub child: Child,
    pub base: String,
    pub stdout: mpsc::Receiver<String>,
    pub stderr: mpsc::Receiver<String>,
}

impl Server {
    /// Starts droverd and waits until it is ready.
    pub fn start(data_dir: &Path, db_url: Option<&str>, env: &[(&str, &str)]) -> Server {
        let port = free_port();
        let mut cmd = droverd(data_dir, db_url);
        cmd.arg("--http-listen").arg(format!("127.0.0.1:{port}")).envs(env.iter().copied());
        // Both outputs are pipes, as under a service manager or in a log file.
        let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        let lines = |out: Box<dyn std::io::Read + Send>, echo: bool| {
            let (tx, rx) = mpsc::channel();
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    if echo {
                        eprintln!("{line}");
                    }
                    let _ = tx.send(line);
                }
            });
            rx
        };
        let stdout = lines(Box::new(child.stdout.take().unwrap()), false);
        let stderr = lines(Box::new(child.stderr.take().unwrap()), true);
        let base = format!("http://127.0.0.1:{port}");
        let mut server = Server { child, base, stdout, stderr };
        let ready = format!("{}/readyz", server.base);
        eventually(Duration::from_secs(30), "droverd to be ready", || {
            if let Ok(Some(status)) = server.child.try_wait() {
                panic!("droverd exited early: {status}");
            }
            agent().get(&ready).call().ok().filter(|r| r.status() == 200)
        });
        server
    }

    pub fn stdout_lines(&self) -> Vec<String> {
        self.stdout.try_iter().collect()
    }

    pub fn stderr_lines(&self) -> Vec<String> {
        self.stderr.try_iter().collect()
    }

    pub fn terminate(&mut self) -> std::process::ExitStatus {
        Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status().unwrap();
        eventually(Duration::from_secs(10), "droverd to stop after SIGTERM", || self.child.try_wait().unwrap())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .into()
}

pub fn get_json(url: &str, token: Option<&str>) -> (u16, Value) {
    let mut req = agent().get(url);
    if let Some(t) = token {
        req = req.header("Authorization", &format!("Bearer {t}"));
    }
    let mut resp = req.call().unwrap();
    let status = resp.status().as_u16();
    let body = resp.body_mut().read_json::<Value>().unwrap_or(Value::Null);
    (status, body)
}

fn pg_schema_url() -> Option<TestDbHandle> {
    crate::support::pg_base_url().map(|base| {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let tdb = rt.block_on(TestDb::postgres(&base));
        TestDbHandle { tdb, rt }
    })
}

struct TestDbHandle {
    tdb: TestDb,
    rt: tokio::runtime::Runtime,
}

impl Drop for TestDbHandle {
    fn drop(&mut self) {
        self.rt.block_on(self.tdb.drop_schema());
    }
}

/// (label, database URL or None for the default SQLite file)
fn backends() -> (Vec<(&'static str, Option<String>)>, Option<TestDbHandle>) {
    let pg = pg_schema_url();
    let mut v = vec![("sqlite", None)];
    if let Some(h) = &pg {
        v.push(("postgres", Some(h.tdb.url.clone())));
    }
    (v, pg)
}

#[test]
fn first_start_serves_the_api_and_stops_gracefully() {
    let (backends, _pg) = backends();
    for (label, url) in backends {
        eprintln!("— on {label}");
        let dir = TempDir::new("e2e");
        let data = dir.path().join("data");
        let mut server = Server::start(&data, url.as_deref(), &[]);

        // The first start made the data dir, its config file and the admin, whose password
        // it printed once.
        assert!(data.join("drover.toml").is_file());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&data).unwrap().permissions().mode() & 0o777, 0o700);
            if url.is_none() {
                assert_eq!(std::fs::metadata(data.join("drover.db")).unwrap().permissions().mode() & 0o777, 0o600);
            }
        }
        // …and the fleet CA, its key private.
        let ca_key = data.join("ca").join("fleet-ca.key");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&ca_key).unwrap().permissions().mode() & 0o777, 0o600);
        }
        let out = droverd(&data, url.as_deref()).args(["ca", "cert"]).output().unwrap();
        let ca_pem = String::from_utf8(out.stdout).unwrap();
        assert!(ca_pem.starts_with("-----BEGIN CERTIFICATE-----"), "{ca_pem}");
        assert_eq!(ca_pem, std::fs::read_to_string(data.join("ca").join("fleet-ca.crt")).unwrap());
        // Its output is no terminal, so the password is in a file only droverd's user reads,
        // and the output names the file but holds no secret.
        let password_file = data.join("initial-admin-password");
        let mut said = Vec::new();
        let line = eventually(Duration::from_secs(5), "the line naming the password file", || {
            said.extend(server.stdout_lines());
            said.iter().find(|l| l.contains("initial-admin-password")).cloned()
        });
        assert!(line.contains(&password_file.display().to_string()), "{line}");
        let password = std::fs::read_to_string(&password_file).unwrap().trim().to_string();
        assert_eq!(password.len(), 20, "a generated password: {password:?}");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&password_file).unwrap().permissions().mode() & 0o777, 0o600);
        }
        let mut login = agent()
            .post(&format!("{}/api/v1/auth/login", server.base))
            .send_json(json!({"username": "admin", "password": password}))
            .unwrap();
        assert_eq!(login.status(), 200, "{}", login.body_mut().read_to_string().unwrap());

        // The OpenAPI document is served, and is valid OpenAPI 3.1.
        let (status, doc) = get_json(&format!("{}/api/v1/openapi.json", server.base), None);
        assert_eq!(status, 200);
        assert_eq!(doc["openapi"], "3.1.0");
        validate_openapi(&doc);

        // A token made by the command line beside the running server works at once.
        let out = droverd(&data, url.as_deref())
            .args(["token", "create", "--role", "viewer", "--name", "dashboards"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let secret = String::from_utf8(out.stdout).unwrap().trim().to_string();
        assert!(secret.starts_with("drv_"));
        let (status, me) = get_json(&format!("{}/api/v1/me", server.base), Some(&secret));
        assert_eq!(status, 200);
        assert_eq!(me["role"], "viewer");
        let (_, audit) = get_json(&format!("{}/api/v1/audit?action=token.create", server.base), Some(&secret));
        assert_eq!(audit["items"][0]["source"], "cli");
        assert_eq!(audit["items"][0]["actor"]["name"], "droverd command line");
        let metrics =
            agent().get(&format!("{}/metrics", server.base)).call().unwrap().body_mut().read_to_string().unwrap();
        assert!(metrics.contains("route=\"/api/v1/me\""));

        let status = server.terminate();
        assert!(status.success(), "SIGTERM is a clean stop: {status}");
        said.extend(server.stdout_lines());
        said.extend(server.stderr_lines());
        assert!(said.iter().all(|l| !l.contains(&password)), "the password is in droverd's output: {said:?}");

        // A second start finds everything in place and prints no password.
        let mut again = Server::start(&data, url.as_deref(), &[]);
        let (status, _) = get_json(&format!("{}/api/v1/me", again.base), Some(&secret));
        assert_eq!(status, 200);
        again.terminate();
        assert!(again.stdout_lines().iter().chain(&again.stderr_lines()).all(|l| !l.contains("password")));
        assert_eq!(std::fs::read_to_string(&password_file).unwrap().trim(), password, "written once");
    }
}

#[test]
fn a_one_off_command_on_a_fresh_data_dir_keeps_the_password_out_of_its_output() {
    let dir = TempDir::new("e2e-oneoff");
    let data = dir.path().join("data");
    let out = droverd(&data, None)
        .args(["token", "create", "--role", "viewer", "--name", "ci"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8(out.stdout).unwrap(), String::from_utf8(out.stderr).unwrap());
    assert!(out.status.success(), "{stderr}");
    assert_eq!(stdout.lines().count(), 1, "only the token on stdout: {stdout}");
    let file = data.join("initial-admin-password");
    assert!(stderr.contains(&file.display().to_string()), "{stderr}");
    let password = std::fs::read_to_string(&file).unwrap().trim().to_string();
    assert!(!password.is_empty());
    assert!(!stderr.contains(&password) && !stdout.contains(&password), "{stderr}");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);
    }
}

fn validate_openapi(doc: &Value) {
    let dir = TempDir::new("openapi");
    let path = dir.path().join("openapi.json");
    std::fs::write(&path, serde_json::to_vec(doc).unwrap()).unwrap();
    let script = "import json, sys\nfrom openapi_spec_validator import validate, OpenAPIV31SpecValidator\nvalidate(json.load(open(sys.argv[1])), cls=OpenAPIV31SpecValidator)\nprint('valid')";
    let out = Command::new("python3").arg("-c").arg(script).arg(&path).output().expect("python3 runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("No module named 'openapi_spec_validator'"),
        "the OpenAPI validator is missing: run the README's test command (scripts/test.sh), which installs it"
    );
    assert!(out.status.success(), "the OpenAPI document is not valid OpenAPI 3.1:\n{stderr}");
}

fn run_fail(cmd: &mut Command) -> String {
    let out = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).output().unwrap();
    assert!(!out.status.success(), "expected failure, got success: {}", String::from_utf8_lossy(&out.stdout));
    String::from_utf8(out.stderr).unwrap()
}

#[test]
fn startup_errors_are_one_clear_line() {
    let dir = TempDir::new("errors");

    // A port someone else holds.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let err = run_fail(droverd(&dir.path().join("a"), None).args(["--http-listen", &addr]));
    assert_eq!(err.lines().filter(|l| l.contains("error")).count(), 1, "{err}");
    assert!(err.contains(&format!("cannot listen on {addr}")) && err.contains("in use"), "{err}");

    // A data dir that is a file.
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, "x").unwrap();
    let err = run_fail(&mut droverd(&file, None));
    assert!(err.contains("cannot use the data directory") && err.contains("not a directory"), "{err}");

    // A database nobody answers at; the password in the URL never shows.
    let started = std::time::Instant::now();
    let err = run_fail(&mut droverd(&dir.path().join("b"), Some("postgres://drover:hunter2@127.0.0.1:1/drover")));
    assert!(err.contains("cannot open the database at postgres://drover:***@127.0.0.1:1/drover"), "{err}");
    assert!(!err.contains("hunter2"));
    assert!(started.elapsed() < Duration::from_secs(30));
    let err = run_fail(&mut droverd(&dir.path().join("c"), Some("mysql://x@y/z")));
    assert!(err.contains("unsupported database URL"), "{err}");

    // A typo in the config file is named.
    let d = dir.path().join("d");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("drover.toml"), "http_listn = \"127.0.0.1:1\"\n").unwrap();
    let err = run_fail(&mut droverd(&d, None));
    assert!(err.contains("invalid configuration") && err.contains("http_listn"), "{err}");

    // A weak DROVER_ADMIN_PASSWORD is refused before anything is created.
    let err = run_fail(droverd(&dir.path().join("e"), None).env("DROVER_ADMIN_PASSWORD", "123"));
    assert!(err.contains("DROVER_ADMIN_PASSWORD") && err.contains("too short"), "{err}");
}

#[test]
fn config_generate_prints_the_commented_default() {
    let out = Command::new(BIN).args(["config", "generate"]).output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(text, drover_server::config::DEFAULT_TOML);
    assert!(text.contains("# Address of the web UI and REST API."));
}

#[test]
fn audit_verify_names_an_entry_edited_behind_the_servers_back() {
    let (backends, _pg) = backends();
    for (label, url) in backends {
        eprintln!("— on {label}");
        let dir = TempDir::new("verify");
        let data = dir.path().join("data");
        for i in 0..3 {
            let out = droverd(&data, url.as_deref())
                .env("DROVER_ADMIN_PASSWORD", "an admin password")
                .args(["token", "create", "--role", "operator", "--name", &format!("t{i}")])
                .output()
                .unwrap();
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            // Only the secret on stdout, even on the first start, so scripts can capture it.
            let stdout = String::from_utf8(out.stdout).unwrap();
            assert_eq!(stdout.lines().count(), 1, "{stdout}");
            assert!(stdout.starts_with("drv_"));
        }
        let out = droverd(&data, url.as_deref()).args(["audit", "verify"]).output().unwrap();
        assert!(out.status.success());
        // organization.create, user.create, and three token.create
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "audit log intact: 5 entries");

        let db_url = url.clone().unwrap_or_else(|| format!("sqlite://{}", data.join("drover.db").display()));
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            use sqlx::Connection as _;
            sqlx::any::install_default_drivers();
            let mut conn = sqlx::AnyConnection::connect(&db_url).await.unwrap();
            let drop_guard = if label == "sqlite" {
                "DROP TRIGGER audit_log_no_update"
            } else {
                "DROP TRIGGER audit_log_no_change ON audit_log"
            };
            sqlx::query(drop_guard).execute(&mut conn).await.unwrap();
            sqlx::query(
                "UPDATE audit_log SET summary = 'token \"t1\" with role viewer, does not expire' WHERE seq = 4",
            )
            .execute(&mut conn)
            .await
            .unwrap();
        });
        let out = droverd(&data, url.as_deref()).args(["audit", "verify"]).output().unwrap();
        assert_eq!(out.status.code(), Some(1));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains("TAMPERED") && stdout.contains("audit entry 4 was altered"), "{stdout}");
    }
}

#[test]
fn an_external_fleet_ca_is_used_instead_of_making_one() {
    let dir = TempDir::new("external-ca");
    let own = dir.path().join("own-ca");
    let ca = drover_server::ca::FleetCa::load_or_create(&own, "Acme").unwrap();
    let data = dir.path().join("data");
    let cert = own.join("fleet-ca.crt");
    let key = own.join("fleet-ca.key");
    // A read-only command on a data directory that does not exist is refused, and makes none.
    let err = run_fail(
        droverd(&data, None).env("DROVER_CA_CERT_FILE", &cert).env("DROVER_CA_KEY_FILE", &key).args(["ca", "cert"]),
    );
    assert!(err.contains("no data directory at") && err.contains("--data-dir"), "{err}");
    assert!(!data.exists());
    let err = run_fail(droverd(&data, None).args(["audit", "verify"]));
    assert!(err.contains("no data directory at"), "{err}");
    std::fs::create_dir_all(&data).unwrap();
    let err = run_fail(droverd(&data, None).args(["ca", "cert"]));
    assert!(err.contains("no database at"), "{err}");
    assert!(!data.join("ca").exists() && !data.join("drover.db").exists(), "nothing is made");
    let out = droverd(&data, None)
        .env("DROVER_CA_CERT_FILE", &cert)
        .env("DROVER_CA_KEY_FILE", &key)
        .env("DROVER_ADMIN_PASSWORD", "an admin password")
        .args(["token", "create", "--role", "admin", "--name", "setup"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = droverd(&data, None)
        .env("DROVER_CA_CERT_FILE", &cert)
        .env("DROVER_CA_KEY_FILE", &key)
        .args(["ca", "cert"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8(out.stdout).unwrap(), ca.cert_pem());
    assert!(!data.join("ca").exists(), "no CA of its own is made");

    let err = run_fail(droverd(&data, None).env("DROVER_CA_CERT_FILE", &cert).args(["ca", "cert"]));
    assert!(err.contains("set both ca_cert_file and ca_key_file"), "{err}");
    std::fs::write(dir.path().join("garbage.key"), "not a key").unwrap();
    let err = run_fail(
        droverd(&data, None)
            .env("DROVER_CA_CERT_FILE", &cert)
            .env("DROVER_CA_KEY_FILE", dir.path().join("garbage.key"))
            .args(["ca", "cert"]),
    );
    assert!(err.contains("the fleet CA at") && err.contains("private key"), "{err}");
}
