//! The real `drover` binary against a real droverd (run in-process on a free port, SQLite).

mod alerts;
mod artifact;
mod deploy;
mod metrics;
mod remote;
mod tour;
mod trust;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;

use drover_proto::api::{CreateToken, Role};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_drover");

/// A port nothing listens on now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// An HTTP client that hands back error statuses instead of failing on them.
fn http() -> ureq::Agent {
    ureq::Agent::config_builder().http_status_as_error(false).build().into()
}

struct Server {
    url: String,
    admin_token: String,
    dir: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    fn start() -> Server {
        Server::start_on("127.0.0.1:0")
    }

    /// A server whose embedded broker listens on `mqtt_listen`, for tests with devices.
    fn start_on(mqtt_listen: &str) -> Server {
        Server::start_with(mqtt_listen, "127.0.0.1:0")
    }

    /// A server whose embedded broker listens on `mqtt_listen` and whose device endpoint
    /// (enrollment over HTTPS) on `device_listen`, for tests with real agents.
    fn start_with(mqtt_listen: &str, device_listen: &str) -> Server {
        let mqtt_listen = mqtt_listen.to_string();
        let device_listen = device_listen.to_string();
        let dir = std::env::temp_dir().join(format!(
            "drover-cli-it-{}-{}",
            std::process::id(),
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let (ready_tx, ready_rx) = mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let data = dir.join("data");
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
            rt.block_on(async move {
                let mut config = drover_server::config::Config::defaults(&data);
                config.http_listen = "127.0.0.1:0".into();
                config.mqtt_listen = mqtt_listen;
                config.device_listen = device_listen;
                // The scripted devices of these tests enroll on the API's address (the device
                // endpoint's port is random); real agents use the device endpoint.
                config.insecure_enroll_over_http = true;
                // The tests' webhook receivers listen on 127.0.0.1, which droverd refuses as a
                // notification target unless allowed, as a real internal receiver would be.
                config.alerts.notify_allow_hosts = vec!["127.0.0.1".into()];
                drover_server::app::prepare_data_dir(&data).unwrap();
                let db = drover_server::app::open_db(&config, Some("cli test admin pw".into())).await.unwrap();
                let org = drover_server::ops::find_org(&db, None).await.unwrap();
                let created = drover_server::ops::create_token(
                    &db,
                    &drover_server::auth::Principal::cli(&org),
                    CreateToken { name: "cli test admin".into(), role: Role::Admin, expires_in_days: None },
                )
                .await
                .unwrap();
                let stop = async move {
                    let _ = stop_rx.await;
                };
                let secret = created.secret;
                drover_server::app::serve(config, db, stop, move |addr| {
                    ready_tx.send((format!("http://{addr}"), secret)).unwrap();
                })
                .await
                .unwrap();
            });
        });
        let (url, admin_token) = ready_rx
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("the test server did not start listening within 60 s (see its panic above)");
        Server { url, admin_token, dir, stop: Some(stop_tx), thread: Some(thread) }
    }

    fn config_path(&self, name: &str) -> PathBuf {
        self.dir.join(name).join("config.json")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs `drover` with its own config file and no inherited DROVER_* settings.
fn drover(config: &Path, env: &[(&str, &str)], args: &[&str], stdin: Option<&str>) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env("DROVER_CONFIG", config)
        .env_remove("DROVER_URL")
        .env_remove("DROVER_TOKEN")
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let mut input = child.stdin.take().unwrap();
    if let Some(s) = stdin {
        input.write_all(s.as_bytes()).unwrap();
    }
    drop(input);
    child.wait_with_output().unwrap()
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "drover failed: {}\nstdout: {}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn fails(out: &Output) -> String {
    assert!(!out.status.success(), "expected failure: {}", String::from_utf8_lossy(&out.stdout));
    String::from_utf8(out.stderr.clone()).unwrap()
}

fn json(out: &Output) -> Value {
    serde_json::from_str(&ok(out)).unwrap()
}

#[test]
fn login_saves_a_private_config_and_commands_use_it() {
    let s = Server::start();
    let cfg = s.config_path("admin");
    let out = drover(&cfg, &[], &["login", "--url", &s.url], Some(&format!("{}\n", s.admin_token)));
    let stdout = ok(&out);
    assert!(stdout.contains("token cli test admin (admin) in organization default"), "{stdout}");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&cfg).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(std::fs::metadata(cfg.parent().unwrap()).unwrap().permissions().mode() & 0o777, 0o700);
    }
    let saved: Value = serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    assert_eq!((saved["url"].as_str(), saved["token"].as_str()), (Some(s.url.as_str()), Some(s.admin_token.as_str())));
    let me = json(&drover(&cfg, &[], &["whoami", "-o", "json"], None));
    assert_eq!(me["role"], "admin");

    // A wrong token is not saved.
    let other = s.config_path("wrong");
    let err = fails(&drover(&other, &[], &["login", "--url", &s.url, "--token", "drv_wrong"], None));
    assert!(err.contains("the server rejected the token"), "{err}");
    assert!(!other.exists());
    let err = fails(&drover(&other, &[], &["user", "list"], None));
    assert!(err.contains("not logged in: run `drover login"), "{err}");

    // Users: create, list, change, delete.
    let created = json(&drover(&cfg, &[], &["user", "create", "nina", "--role", "viewer", "-o", "json"], None));
    assert_eq!(created["user"]["username"], "nina");
    assert!(created["generated_password"].as_str().unwrap().len() >= 16);
    ok(&drover(
        &cfg,
        &[],
        &["user", "create", "omar", "--role", "operator", "--password-stdin"],
        Some("omar's password!\n"),
    ));
    let users = json(&drover(&cfg, &[], &["user", "list", "-o", "json"], None));
    let names: Vec<&str> = users.as_array().unwrap().iter().map(|u| u["username"].as_str().unwrap()).collect();
    assert_eq!(names, ["admin", "nina", "omar"]);
    let table = ok(&drover(&cfg, &[], &["user", "list", "--role", "operator"], None));
    assert!(table.starts_with("USERNAME") && table.contains("omar") && !table.contains("nina"), "{table}");
    let u = json(&drover(&cfg, &[], &["user", "set-role", "nina", "operator", "-o", "json"], None));
    assert_eq!((u["username"].as_str(), u["role"].as_str()), (Some("nina"), Some("operator")));
    let u = json(&drover(&cfg, &[], &["user", "disable", "nina", "-o", "json"], None));
    assert_eq!(u["disabled"], true);
    let shown = json(&drover(&cfg, &[], &["user", "show", u["id"].as_str().unwrap(), "-o", "json"], None));
    assert_eq!(shown, u, "show takes an id as well as a username");
    ok(&drover(&cfg, &[], &["user", "reset-password", "omar"], Some("omar's new password\n")));
    ok(&drover(&cfg, &[], &["user", "delete", "nina"], None));
    let err = fails(&drover(&cfg, &[], &["user", "show", "nina"], None));
    assert!(err.contains("no user named or with id \"nina\""), "{err}");
    let err = fails(&drover(&cfg, &[], &["user", "create", "omar", "--role", "viewer"], None));
    assert!(err.contains("the username \"omar\" is taken") && err.contains("conflict"), "{err}");

    // The changes made through the command line are in the audit log, by this token.
    let audit = json(&drover(&cfg, &[], &["audit", "list", "--action", "user.", "--all", "-o", "json"], None));
    let actions: Vec<&str> = audit.as_array().unwrap().iter().map(|e| e["action"].as_str().unwrap()).collect();
    assert_eq!(
        actions,
        ["user.delete", "user.set_password", "user.update", "user.update", "user.create", "user.create", "user.create"]
    );
    assert!(audit[0]["actor"]["name"] == "cli test admin");
    let verify = ok(&drover(&cfg, &[], &["audit", "verify"], None));
    assert!(verify.starts_with("audit log intact"), "{verify}");

    // Logging out forgets the token.
    ok(&drover(&cfg, &[], &["logout"], None));
    let err = fails(&drover(&cfg, &[], &["whoami"], None));
    assert!(err.contains("not logged in"), "{err}");
}

#[test]
fn tokens_roles_and_revocation() {
    let s = Server::start();
    let cfg = s.config_path("t");
    let admin = [("DROVER_URL", s.url.as_str()), ("DROVER_TOKEN", s.admin_token.as_str())];
    let out = drover(&cfg, &admin, &["token", "create", "--name", "dashboards", "--role", "viewer"], None);
    let secret = ok(&out).trim().to_string();
    assert!(secret.starts_with("drv_") && !secret.contains('\n'));
    assert!(String::from_utf8_lossy(&out.stderr).contains("shown once"));

    // The environment overrides the saved file: here there is none.
    let viewer = [("DROVER_URL", s.url.as_str()), ("DROVER_TOKEN", secret.as_str())];
    let me = json(&drover(&cfg, &viewer, &["whoami", "-o", "json"], None));
    assert_eq!((me["name"].as_str(), me["role"].as_str()), (Some("dashboards"), Some("viewer")));
    let err = fails(&drover(&cfg, &viewer, &["user", "create", "eve", "--role", "admin"], None));
    assert!(err.starts_with("drover: error: permission denied: creating users needs the admin role"), "{err}");
    let users = json(&drover(&cfg, &viewer, &["user", "list", "-o", "json"], None));
    assert_eq!(users.as_array().unwrap().len(), 1, "a viewer reads, and eve was not created");

    let tokens = json(&drover(&cfg, &admin, &["token", "list", "-o", "json"], None));
    let id = tokens.as_array().unwrap().iter().find(|t| t["name"] == "dashboards").unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(!tokens.to_string().contains(&secret), "listings never show secrets");
    ok(&drover(&cfg, &admin, &["token", "revoke", &id], None));
    let err = fails(&drover(&cfg, &viewer, &["whoami"], None));
    assert!(err.contains("the server rejected the token") && err.contains("drover token create"), "{err}");
    let all = json(&drover(&cfg, &admin, &["token", "list", "--include-revoked", "-o", "json"], None));
    assert!(all.as_array().unwrap().iter().any(|t| t["id"] == id.as_str() && t["revoked_at"].is_string()));
}

#[test]
fn paging_with_all_and_an_unreachable_server() {
    let s = Server::start();
    let cfg = s.config_path("p");
    let admin = [("DROVER_URL", s.url.as_str()), ("DROVER_TOKEN", s.admin_token.as_str())];
    for i in 0..5 {
        ok(&drover(&cfg, &admin, &["user", "create", &format!("p{i}"), "--role", "viewer"], None));
    }
    let first = drover(&cfg, &admin, &["user", "list", "--limit", "2", "-o", "json"], None);
    assert_eq!(json(&first).as_array().unwrap().len(), 2);
    assert!(String::from_utf8_lossy(&first.stderr).contains("--all"));
    let all = json(&drover(&cfg, &admin, &["user", "list", "--limit", "2", "--all", "-o", "json"], None));
    let names: Vec<&str> = all.as_array().unwrap().iter().map(|u| u["username"].as_str().unwrap()).collect();
    assert_eq!(names, ["admin", "p0", "p1", "p2", "p3", "p4"]);
    let err = fails(&drover(&cfg, &admin, &["user", "list", "--limit", "0"], None));
    assert!(err.contains("limit must be between 1 and 500"), "{err}");

    // A port nobody listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let err = fails(&drover(&cfg, &[("DROVER_URL", &url), ("DROVER_TOKEN", "drv_x")], &["user", "list"], None));
    assert!(err.contains(&format!("cannot reach the Drover server at {url}")) && err.contains("DROVER_URL"), "{err}");
}

#[test]
fn usernames_ids_and_addresses_that_need_care() {
    let s = Server::start();
    let cfg = s.config_path("c");
    let admin = [("DROVER_URL", s.url.as_str()), ("DROVER_TOKEN", s.admin_token.as_str())];

    // The server's `q` ignores '_', so the username is found by its longest other part.
    ok(&drover(&cfg, &admin, &["user", "create", "ann_b", "--role", "viewer"], None));
    ok(&drover(&cfg, &admin, &["user", "create", "annb", "--role", "viewer"], None));
    let u = json(&drover(&cfg, &admin, &["user", "set-role", "ann_b", "operator", "-o", "json"], None));
    assert_eq!((u["username"].as_str(), u["role"].as_str()), (Some("ann_b"), Some("operator")));
    let table = ok(&drover(&cfg, &admin, &["-o", "text", "user", "show", "ann_b"], None));
    assert!(table.starts_with("USERNAME") && table.lines().nth(1).unwrap().starts_with("ann_b "), "{table}");

    // What is typed stays one path segment.
    for odd in ["a b", "x/../../me"] {
        let err = fails(&drover(&cfg, &admin, &["user", "show", odd], None));
        assert!(err.contains(&format!("no user named or with id {odd:?}")), "{err}");
    }

    // `-o text` prints the secret alone.
    let out = drover(&cfg, &admin, &["token", "create", "--name", "ci", "--role", "viewer", "-o", "text"], None);
    assert!(ok(&out).trim_end().starts_with("drv_") && ok(&out).lines().count() == 1);

    let err = fails(&drover(&cfg, &[], &["login", "--url", "127.0.0.1:1", "--token", "drv_x"], None));
    assert!(err.contains("invalid server address \"127.0.0.1:1\": give it as http://HOST:PORT"), "{err}");
    assert!(!cfg.exists());

    // Logging in again repairs an unreadable config file.
    std::fs::create_dir_all(cfg.parent().unwrap()).unwrap();
    std::fs::write(&cfg, "{oops").unwrap();
    let err = fails(&drover(&cfg, &[], &["whoami"], None));
    assert!(err.contains("config.json"), "{err}");
    ok(&drover(&cfg, &[], &["login", "--url", &s.url, "--token", &format!("  {}  ", s.admin_token)], None));
    assert_eq!(json(&drover(&cfg, &[], &["whoami", "-o", "json"], None))["name"], "cli test admin");
}

/// Asks to enroll as a device would: a fresh key, its CSR and an identity. Returns the answer.
fn enroll(url: &str, identity: Value, token: Option<&str>) -> Value {
    let key = rcgen::KeyPair::generate().unwrap();
    let csr = rcgen::CertificateParams::default().serialize_request(&key).unwrap().pem().unwrap();
    let mut body = serde_json::json!({"csr_pem": csr, "identity": identity});
    if let Some(t) = token {
        body["token"] = serde_json::json!(t);
    }
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    let mut resp = agent.post(&format!("{url}/api/v1/enroll")).send_json(body).unwrap();
    let v: Value = resp.body_mut().read_json().unwrap();
    assert!(resp.status().is_success(), "enroll failed: {v}");
    v
}

#[test]
fn enrollment_tokens_and_preauthorization() {
    let s = Server::start();
    let cfg = s.config_path("e");
    let admin = [("DROVER_URL", s.url.as_str()), ("DROVER_TOKEN", s.admin_token.as_str())];
    let out = drover(
        &cfg,
        &admin,
        &[
            "enroll-token",
            "create",
            "--name",
            "line 3",
            "--max-uses",
            "5",
            "--expires-in",
            "30d",
            "--tag",
            "site=berlin",
        ],
        None,
    );
    let secret = ok(&out).trim().to_string();
    assert!(secret.starts_with("dre_") && !secret.contains('\n'), "{secret}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("shown once"));

    let d = enroll(&s.url, serde_json::json!({"serial": "SN-T1"}), Some(&secret));
    assert_eq!(d["status"], "accepted");
    let tokens = json(&drover(&cfg, &admin, &["enroll-token", "list", "-o", "json"], None));
    let t = &tokens[0];
    assert_eq!((t["name"].as_str(), t["uses"].as_u64(), t["max_uses"].as_u64()), (Some("line 3"), Some(1), Some(5)));
    assert_eq!(t["tags"]["site"], "berlin");
    assert!(t["expires_at"].is_string());
    assert!(!tokens.to_string().contains(&secret), "listings never show secrets");
    let table = ok(&drover(&cfg, &admin, &["enroll-token", "list"], None));
    assert!(table.starts_with("NAME") && table.contains("line 3") && table.contains("1/5"), "{table}");

    let id = t["id"].as_str().unwrap();
    let revoked = json(&drover(&cfg, &admin, &["enroll-token", "revoke", id, "-o", "json"], None));
    assert!(revoked["revoked_at"].is_string());
    let err = fails(&drover(&cfg, &admin, &["enroll-token", "revoke", "nope"], None));
    assert!(err.contains("no enrollment token with id \"nope\"") && err.contains("drover enroll-token list"), "{err}");
    let err = fails(&drover(&cfg, &admin, &["enroll-token", "create", "--name", "x", "--expires-in", "12h"], None));
    assert!(err.contains("e.g. 30d or 2w"), "{err}");
    let err = fails(&drover(&cfg, &admin, &["enroll-token", "create", "--name", "x", "--tag", "oops"], None));
    assert!(err.contains("write it as KEY=VALUE"), "{err}");

    // Pre-authorized identities enroll at once.
    let p =
        json(&drover(&cfg, &admin, &["preauth", "add", "serial=SN-P1", "mac=02:00:00:00:00:01", "-o", "json"], None));
    assert_eq!(p, serde_json::json!({"added": 1, "already": 0}));
    let again = ok(&drover(&cfg, &admin, &["preauth", "add", "mac=02:00:00:00:00:01", "serial=SN-P1"], None));
    assert_eq!(again.trim(), "0 pre-authorized, 1 already were");
    let d = enroll(&s.url, serde_json::json!({"serial": "SN-P1", "mac": "02:00:00:00:00:01"}), None);
    assert_eq!(d["status"], "accepted");

    // Listed with their state and uses; one for twice, expiring; revoked by id.
    ok(&drover(&cfg, &admin, &["preauth", "add", "serial=SN-P2", "--max-uses", "2", "--expires-in", "30d"], None));
    let list = json(&drover(&cfg, &admin, &["preauth", "list", "-o", "json"], None));
    let items = list.as_array().unwrap();
    assert_eq!(items.len(), 2, "{list}");
    assert_eq!((items[0]["identity"]["serial"].as_str(), items[0]["max_uses"].as_u64()), (Some("SN-P2"), Some(2)));
    assert!(items[0]["expires_at"].is_string());
    assert_eq!((items[1]["state"].as_str(), items[1]["uses"].as_u64()), (Some("used"), Some(1)));
    let table = ok(&drover(&cfg, &admin, &["preauth", "list", "--state", "active"], None));
    assert!(table.contains("serial=SN-P2") && table.contains("0/2") && !table.contains("SN-P1"), "{table}");
    let id = items[0]["id"].as_str().unwrap();
    let revoked = json(&drover(&cfg, &admin, &["preauth", "revoke", id, "-o", "json"], None));
    assert_eq!(revoked["state"], "revoked");
    let err = fails(&drover(&cfg, &admin, &["preauth", "revoke", "no-such-id"], None));
    assert!(err.contains("no pre-authorization with id \"no-such-id\""), "{err}");
    let d = enroll_status(&s.url, serde_json::json!({"serial": "SN-P2"}));
    assert_eq!(d, "pending", "a revoked pre-authorization admits nobody");
}

/// Asks to enroll without a token; the status the server answers.
fn enroll_status(url: &str, identity: Value) -> String {
    enroll(url, identity, None)["status"].as_str().unwrap().to_string()
}

#[test]
fn devices_list_show_accept_reject_decommission() {
    let s = Server::start();
    let cfg = s.config_path("d");
    let admin = [("DROVER_URL", s.url.as_str()), ("DROVER_TOKEN", s.admin_token.as_str())];
    let a = enroll(&s.url, serde_json::json!({"serial": "SN-A"}), None);
    let b = enroll(&s.url, serde_json::json!({"serial": "SN-B"}), None);
    assert_eq!((a["status"].as_str(), b["status"].as_str()), (Some("pending"), Some("pending")));
    let (a, b) = (a["device_id"].as_str().unwrap(), b["device_id"].as_str().unwrap());

    let pending = json(&drover(&cfg, &admin, &["device", "list", "--status", "pending", "-o", "json"], None));
    let ids: Vec<&str> = pending.as_array().unwrap().iter().map(|d| d["id"].as_str().unwrap()).collect();
    assert_eq!(ids, [b, a], "newest first");
    let table = ok(&drover(&cfg, &admin, &["device", "list"], None));
    assert!(table.starts_with("NAME ") && table.contains("serial=SN-A") && table.contains("pending"), "{table}");
    let err = fails(&drover(&cfg, &admin, &["device", "list", "--status", "sleeping"], None));
    assert!(err.contains("unknown status \"sleeping\": use pending, accepted"), "{err}");

    let accepted = json(&drover(&cfg, &admin, &["device", "accept", a, "-o", "json"], None));
    assert_eq!(accepted["status"], "accepted");
    assert!(accepted["certificate_expires_at"].is_string());
    let shown = ok(&drover(&cfg, &admin, &["device", "show", a], None));
    assert!(shown.contains("status:") && shown.contains("accepted") && shown.contains("serial=SN-A"), "{shown}");
    assert!(shown.contains("certificate expires:"), "{shown}");
    let shown = json(&drover(&cfg, &admin, &["device", "show", a, "-o", "json"], None));
    assert_eq!(shown["id"], a);

    let rejected = json(&drover(&cfg, &admin, &["device", "reject", b, "-o", "json"], None));
    assert_eq!(rejected["status"], "rejected");
    let err = fails(&drover(&cfg, &admin, &["device", "accept", b], None));
    assert!(err.contains("a rejected device cannot become accepted") && err.contains("conflict"), "{err}");

    let err = fails(&drover(&cfg, &admin, &["device", "decommission", a], None));
    assert!(err.contains("--yes"), "{err}");
    assert_eq!(json(&drover(&cfg, &admin, &["device", "show", a, "-o", "json"], None))["status"], "accepted");
    let gone = json(&drover(&cfg, &admin, &["device", "decommission", a, "--yes", "-o", "json"], None));
    assert_eq!(gone["status"], "decommissioned");

    // Not an id: a name, and no device has it.
    let err = fails(&drover(&cfg, &admin, &["device", "show", "no-such-device"], None));
    assert!(err.contains("no device named \"no-such-device\"") && err.contains("drover device list"), "{err}");
    // An id no device has.
    let unknown = "0190c0de-0000-7000-8000-000000000000";
    let err = fails(&drover(&cfg, &admin, &["device", "show", unknown], None));
    assert!(err.contains(&format!("no device with id \"{unknown}\"")), "{err}");

    // A viewer reads but cannot decide.
    let out = drover(&cfg, &admin, &["token", "create", "--name", "v", "--role", "viewer"], None);
    let viewer_token = ok(&out).trim().to_string();
    let viewer = [("DROVER_URL", s.url.as_str()), ("DROVER_TOKEN", viewer_token.as_str())];
    assert_eq!(json(&drover(&cfg, &viewer, &["device", "list", "-o", "json"], None)).as_array().unwrap().len(), 2);
    let err = fails(&drover(&cfg, &viewer, &["device", "reject", a], None));
    assert!(err.contains("permission denied"), "{err}");
}

#[test]
fn tags_groups_filters_and_csv_import() {
    let s = Server::start();
    let cfg = s.config_path("g");
    let admin = [("DROVER_URL", s.url.as_str()), ("DROVER_TOKEN", s.admin_token.as_str())];
    let run = |args: &[&str]| drover(&cfg, &admin, args, None);

    // A static group first, so an enrollment token can put its devices in it.
    let lab = json(&run(&["group", "create", "lab", "--description", "bench devices", "-o", "json"]));
    assert_eq!((lab["name"].as_str(), lab["kind"].as_str()), (Some("lab"), Some("static")));
    let secret = ok(&run(&["enroll-token", "create", "--name", "bench", "--group", "lab", "--tag", "site=berlin"]))
        .trim()
        .to_string();
    let tokens = json(&run(&["enroll-token", "list", "-o", "json"]));
    assert_eq!(tokens[0]["groups"], serde_json::json!(["lab"]));
    let a = enroll(&s.url, serde_json::json!({"serial": "SN-G-A"}), Some(&secret));
    let a = a["device_id"].as_str().unwrap().to_string();
    let b = enroll(&s.url, serde_json::json!({"serial": "SN-G-B"}), Some(&secret));
    let b = b["device_id"].as_str().unwrap().to_string();

    // Tags: set some, remove some; `show` has tags and groups.
    let shown = json(&run(&["device", "tag", &a, "region=eu", "rack=7", "-o", "json"]));
    assert_eq!(shown["tags"], serde_json::json!({"region": "eu", "rack": "7", "site": "berlin"}));
    let shown = json(&run(&["device", "untag", &a, "rack", "-o", "json"]));
    assert_eq!(shown["tags"], serde_json::json!({"region": "eu", "site": "berlin"}));
    assert_eq!(shown["groups"][0]["name"], "lab");
    let text = ok(&run(&["device", "show", &a]));
    assert!(text.contains("tags:") && text.contains("region=eu") && text.contains("lab (static)"), "{text}");
    assert!(text.contains("presence:") && text.contains("never seen"), "{text}");
    let err = fails(&run(&["device", "tag", &a, "region"]));
    assert!(err.contains("write it as KEY=VALUE"), "{err}");
    let err = fails(&run(&["device", "tag", "nope", "a=b"]));
    assert!(err.contains("no device named \"nope\""), "{err}");

    // The filter language, and a mistake shown where it is, before any request.
    let eu = json(&run(&["device", "list", "--filter", r#"tag.region = "eu""#, "-o", "json"]));
    let ids: Vec<&str> = eu.as_array().unwrap().iter().map(|d| d["id"].as_str().unwrap()).collect();
    assert_eq!(ids, [a.as_str()]);
    let offline = json(&run(&["device", "list", "--offline", "--sort", "id", "-o", "json"]));
    assert_eq!(offline.as_array().unwrap().len(), 2);
    assert!(json(&run(&["device", "list", "--online", "-o", "json"])).as_array().unwrap().is_empty());
    let found = json(&run(&["device", "list", "--search", "g-b", "-o", "json"]));
    assert_eq!(found[0]["id"], b.as_str());
    let found = json(&run(&["device", "list", "--q", "g-b", "-o", "json"]));
    assert_eq!(found[0]["id"], b.as_str(), "--q stays as a hidden alias");
    let err = fails(&run(&["device", "list", "--filter", "tag.region = "]));
    assert!(err.contains("invalid filter: expected a value") && err.contains("at column 14"), "{err}");
    assert!(err.contains(&format!("\n  tag.region = \n  {}^\n", " ".repeat(13))), "a caret under the mistake: {err}");
    let err = fails(&run(&["device", "list", "--sort", "colour"]));
    assert!(err.contains("cannot sort by \"colour\""), "{err}");

    // Groups: dynamic by filter, preview, members, static add/remove, delete.
    let pv = json(&run(&["group", "preview", "--filter", "tag.site = berlin", "-o", "json"]));
    assert_eq!(pv["count"], 2);
    let table = ok(&run(&["group", "preview", "--filter", "tag.region = eu"]));
    assert!(table.contains("SN-G-A") && !table.contains("SN-G-B") && table.ends_with("1 devices match\n"), "{table}");
    let err = fails(&run(&["group", "create", "broken", "--filter", "(tag.a = b"]));
    assert!(err.contains("invalid filter"), "{err}");
    let eu_group = json(&run(&["group", "create", "eu", "--filter", "tag.region = eu", "-o", "json"]));
    assert_eq!(eu_group["kind"], "dynamic");
    let shown = ok(&run(&["group", "show", "eu"]));
    assert!(shown.contains("devices:") && shown.contains(" 1\n") && shown.contains("tag.region = eu"), "{shown}");
    let members = json(&run(&["group", "members", "eu", "-o", "json"]));
    assert_eq!(members[0]["id"], a.as_str());
    let listed = json(&run(&["group", "list", "-o", "json"]));
    let names: Vec<&str> = listed.as_array().unwrap().iter().map(|g| g["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["eu", "lab"]);
    assert_eq!(json(&run(&["group", "list", "--kind", "dynamic", "-o", "json"])).as_array().unwrap().len(), 1);

    let ops = json(&run(&["group", "create", "ops", "-o", "json"]));
    let added = json(&run(&["group", "add", "ops", &a, &b, "-o", "json"]));
    assert_eq!(added, serde_json::json!({"added": 2, "already": 0}));
    assert_eq!(
        ok(&run(&["group", "add", ops["id"].as_str().unwrap(), &a])).trim(),
        "0 added to ops, 1 were members already"
    );
    ok(&run(&["group", "remove", "ops", &b]));
    let members = json(&run(&["group", "members", "ops", "-o", "json"]));
    assert_eq!(members.as_array().unwrap().len(), 1);
    let err = fails(&run(&["group", "add", "eu", &b]));
    assert!(
        err.contains("conflict") || err.contains("invalid_request"),
        "a dynamic group takes no members by hand: {err}"
    );
    ok(&run(&["group", "delete", "ops"]));
    let err = fails(&run(&["group", "show", "ops"]));
    assert!(err.contains("no group named or with id \"ops\"") && err.contains("drover group list"), "{err}");

    // Pre-authorization from a CSV file.
    let csv = s.dir.join("devices.csv");
    std::fs::write(&csv, "serial,mac\nSN-CSV-1,02:00:00:00:00:21\nSN-CSV-2,02:00:00:00:00:22\n").unwrap();
    let out = ok(&run(&["preauth", "import", csv.to_str().unwrap()]));
    assert!(out.starts_with("2 device identities pre-authorized"), "{out}");
    let d = enroll(&s.url, serde_json::json!({"serial": "SN-CSV-2", "mac": "02:00:00:00:00:22"}), None);
    assert_eq!(d["status"], "accepted");
    std::fs::write(&csv, "serial\n\"unterminated\n").unwrap();
    let err = fails(&run(&["preauth", "import", csv.to_str().unwrap()]));
    assert!(err.contains("invalid_request"), "{err}");
    let err = fails(&run(&["preauth", "import", "/no/such/file.csv"]));
    assert!(err.contains("cannot read /no/such/file.csv"), "{err}");
}
