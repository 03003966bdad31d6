//! The real `drover-sim` binary against the real `droverd` binary: a fleet enrolls over HTTPS
//! with an enrollment token, connects over mutual-TLS MQTT, is seen online with its inventory,
//! goes offline when the simulator is stopped, and comes back from its state directory without
//! enrolling again.
//!
//! Bad input tried here: a wrong enrollment token, an unreachable server, a CA that did not
//! sign the server's certificate, a state directory without a token for new devices.
//!
//! `droverd` is taken from beside `drover-sim` in `target/<profile>/` (there when the
//! workspace is built); when it is missing it is built into a separate target directory.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

const SIM: &str = env!("CARGO_BIN_EXE_drover-sim");

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A temporary directory removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let d = std::env::temp_dir().join(format!("drover-sim-it-{name}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        TempDir(d)
    }
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A binary of the workspace: beside drover-sim, or built for these tests.
fn workspace_bin(package: &str, bin: &str) -> PathBuf {
    let dir = Path::new(SIM).parent().unwrap();
    let beside = dir.join(bin);
    if beside.exists() {
        return beside;
    }
    // The outer cargo may hold the lock on this target directory: build elsewhere.
    let target = dir.parent().unwrap().join("drover-sim-it");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args(["build", "-p", package, "--bin", bin])
        .env("CARGO_TARGET_DIR", &target)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .expect("cargo runs");
    assert!(status.success(), "cargo build -p {package} --bin {bin} failed");
    target.join("debug").join(bin)
}

/// The droverd binary.
fn droverd_bin() -> PathBuf {
    static BIN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BIN.get_or_init(|| workspace_bin("drover-server", "droverd")).clone()
}

/// The `drover` CLI, the operator's side of remote access here.
fn drover_bin() -> PathBuf {
    static BIN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BIN.get_or_init(|| workspace_bin("drover-cli", "drover")).clone()
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .into()
}

fn eventually<T>(within: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

struct Droverd {
    child: Child,
    base: String,
    dev: u16,
    mqtt: u16,
    data: PathBuf,
}

impl Droverd {
    /// Starts droverd on free ports (trying others if one was taken meanwhile).
    fn start(data: &Path) -> Droverd {
        for _ in 0..5 {
            let (http, mqtt, dev) = (free_port(), free_port(), free_port());
            let mut child = Command::new(droverd_bin())
                .arg("--data-dir")
                .arg(data)
                .args(["--http-listen", &format!("127.0.0.1:{http}")])
                .args(["--mqtt-listen", &format!("127.0.0.1:{mqtt}")])
                .args(["--device-listen", &format!("127.0.0.1:{dev}")])
                .env_remove("DROVER_DATABASE_URL")
                .env("DROVER_LOG", "warn")
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .unwrap();
            let base = format!("http://127.0.0.1:{http}");
            let deadline = Instant::now() + Duration::from_secs(30);
            let started = loop {
                if let Ok(Some(_)) = child.try_wait() {
                    break false;
                }
                if agent().get(&format!("{base}/readyz")).call().is_ok_and(|r| r.status() == 200) {
                    break true;
                }
                assert!(Instant::now() < deadline, "droverd not ready after 30 s");
                std::thread::sleep(Duration::from_millis(50));
            };
            if started {
                return Droverd { child, base, dev, mqtt, data: data.to_path_buf() };
            }
        }
        panic!("droverd would not start (see its error above)");
    }

    fn cli(&self, args: &[&str]) -> String {
        let out = Command::new(droverd_bin())
            .arg("--data-dir")
            .arg(&self.data)
            .args(args)
            .env_remove("DROVER_DATABASE_URL")
            .output()
            .unwrap();
        assert!(out.status.success(), "droverd {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    }

    fn admin_token(&self) -> String {
        let out = self.cli(&["token", "create", "--role", "admin", "--name", "sim test"]);
        out.split_whitespace().find(|w| w.starts_with("drv_")).expect("a token in the output").to_string()
    }

    /// Writes the fleet CA to `path`.
    fn ca_file(&self, path: &Path) {
        std::fs::write(path, self.cli(&["ca", "cert"])).unwrap();
    }

    fn enrollment_token(&self, admin: &str, max_uses: u32) -> String {
        let resp = agent()
            .post(&format!("{}/api/v1/enrollment-tokens", self.base))
            .header("Authorization", &format!("Bearer {admin}"))
            .send_json(json!({"name": "simulated fleet", "max_uses": max_uses}))
            .unwrap();
        assert_eq!(resp.status().as_u16(), 201);
        let v: Value = resp.into_body().read_json().unwrap();
        v["secret"].as_str().unwrap().to_string()
    }

    fn get(&self, path: &str, admin: &str) -> Value {
        let mut resp = agent()
            .get(&format!("{}{path}", self.base))
            .header("Authorization", &format!("Bearer {admin}"))
            .call()
            .unwrap();
        assert_eq!(resp.status().as_u16(), 200, "GET {path}");
        resp.body_mut().read_json().unwrap()
    }

    /// `drover-sim` with this server's endpoints and `extra` arguments.
    fn sim(&self, ca: &Path, extra: &[&str]) -> Command {
        let mut c = Command::new(SIM);
        c.args(["--server", &format!("https://localhost:{}", self.dev)])
            .arg("--ca")
            .arg(ca)
            .args(["--mqtt", &format!("localhost:{}", self.mqtt)])
            .args(extra)
            .env_remove("DROVER_SIM_TOKEN");
        c
    }
}

impl Drop for Droverd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn sigterm(child: &Child) {
    assert!(Command::new("kill").arg("-TERM").arg(child.id().to_string()).status().unwrap().success());
}

/// Starts a command and forwards its stdout lines to a channel (and to the test's output).
fn spawn_lines(mut cmd: Command) -> (Child, mpsc::Receiver<String>) {
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().unwrap();
    let out = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            println!("drover-sim: {line}");
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (child, rx)
}

fn wait_line(rx: &mpsc::Receiver<String>, within: Duration, pred: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) if pred(&l) => return l,
            Ok(_) => {}
            Err(e) => panic!("no such line from drover-sim: {e}"),
        }
    }
}

fn devices(d: &Droverd, admin: &str) -> Vec<Value> {
    d.get("/api/v1/devices?limit=100", admin)["items"].as_array().unwrap().clone()
}

/// Kills a child process by id if the test fails before it was stopped, so that a simulator
/// does not outlive its test (and hold the test's output open).
struct KillOnPanic(u32);

impl Drop for KillOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let _ = Command::new("kill").arg("-KILL").arg(self.0.to_string()).status();
        }
    }
}

fn wait_exit(child: &mut Child, within: Duration) -> std::process::ExitStatus {
    eventually(within, "drover-sim to exit", || child.try_wait().unwrap())
}

#[test]
fn a_fleet_enrolls_connects_is_seen_goes_offline_and_comes_back_from_its_state() {
    let dir = TempDir::new("fleet");
    let server = Droverd::start(&dir.path().join("data"));
    let admin = server.admin_token();
    let ca = dir.path().join("ca.pem");
    server.ca_file(&ca);
    let token = server.enrollment_token(&admin, 100);
    let state = dir.path().join("state");
    let state_arg = state.to_str().unwrap();

    let mut cmd = server.sim(&ca, &["--token", &token, "-n", "20", "--state-dir", state_arg, "--report", "1"]);
    cmd.args(["--connect-rate", "100/s", "--heartbeat", "2"]);
    let (mut sim, lines) = spawn_lines(cmd);
    let line = wait_line(&lines, Duration::from_secs(90), |l| l.starts_with("all 20 devices connected in "));
    assert!(line.ends_with('s'), "{line}");

    // The server sees all twenty online, named by their certificates, with an inventory.
    let listed = eventually(Duration::from_secs(20), "20 devices online", || {
        let list = devices(&server, &admin);
        (list.len() == 20 && list.iter().all(|d| d["online"] == true)).then_some(list)
    });
    assert!(
        listed.iter().all(|d| d["status"] == "accepted" && d["agent"].as_str().unwrap().starts_with("drover-sim/"))
    );
    assert!(listed.iter().all(|d| d["identity"]["serial"].as_str().unwrap().starts_with("sim-")));
    let id = listed[0]["id"].as_str().unwrap().to_string();
    let detail = eventually(Duration::from_secs(20), "an inventory", || {
        let d = server.get(&format!("/api/v1/devices/{id}"), &admin);
        d["attributes"]["arch"].is_string().then_some(d)
    });
    let attrs = &detail["attributes"];
    for key in ["os", "os_version", "kernel", "hostname", "agent_version", "mem_total_kb", "region", "model"] {
        assert!(attrs[key].as_str().is_some_and(|v| !v.is_empty()), "{key} missing: {attrs}");
    }
    assert!(attrs["hostname"].as_str().unwrap().starts_with("sim-"));
    // Heartbeats flow (every 2 s here) and are counted in the status line.
    wait_line(&lines, Duration::from_secs(20), |l| {
        l.contains("connected 20") && !l.contains("heartbeats 0 ") && l.contains("enrolled 20/20")
    });

    // SIGTERM: every device says offline and disconnects; the simulator sums up and exits 0.
    sigterm(&sim);
    let status = wait_exit(&mut sim, Duration::from_secs(30));
    assert!(status.success(), "{status:?}");
    let summary = wait_line(&lines, Duration::from_secs(5), |l| l.starts_with("summary:"));
    assert!(summary.contains("enrolled 20 (new 20, reused 0)"), "{summary}");
    eventually(Duration::from_secs(20), "all 20 devices offline", || {
        devices(&server, &admin).iter().all(|d| d["online"] == false).then_some(())
    });

    // Again from the state directory, without a token: the same twenty devices, none new.
    // Its session logs on (stderr is a pipe, not a terminal): plain lines, no colour codes.
    let out = server
        .sim(&ca, &["-n", "20", "--state-dir", state_arg, "--until-connected", "--timeout", "60"])
        .env("DROVER_LOG", "info")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(stderr.contains(" INFO ") && stderr.contains("connected"), "{stderr}");
    assert!(!stderr.contains('\u{1b}'), "colour codes in a pipe: {stderr:?}");
    assert!(stdout.contains("all 20 devices connected in "), "{stdout}");
    assert!(stdout.contains("enrolled 20 (new 0, reused 20)"), "{stdout}");
    let again = devices(&server, &admin);
    assert_eq!(again.len(), 20, "no device enrolled twice");
    let mut before: Vec<_> = listed.iter().map(|d| d["id"].clone()).collect();
    let mut after: Vec<_> = again.iter().map(|d| d["id"].clone()).collect();
    before.sort_by_key(|v| v.to_string());
    after.sort_by_key(|v| v.to_string());
    assert_eq!(before, after);

    // More devices than are in the state directory, without a token: a clear error.
    let out = server.sim(&ca, &["-n", "21", "--state-dir", state_arg, "--until-connected"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--token"), "{stderr}");
}

fn expect_failure(out: Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(needle), "expected {needle:?} in: {stderr}");
    assert_eq!(stderr.lines().filter(|l| !l.trim().is_empty()).count(), 1, "one clear line: {stderr}");
}

#[test]
fn a_wrong_token_server_or_ca_is_one_clear_error() {
    let dir = TempDir::new("errors");
    let server = Droverd::start(&dir.path().join("data"));
    let admin = server.admin_token();
    let ca = dir.path().join("ca.pem");
    server.ca_file(&ca);
    let n = ["-n", "5", "--until-connected", "--timeout", "30"];

    let out = server.sim(&ca, &[&["--token", "dre_not-a-real-token"][..], &n].concat()).output().unwrap();
    expect_failure(out, "the enrollment token was refused");

    let token = server.enrollment_token(&admin, 10);
    let mut cmd = Command::new(SIM);
    cmd.args(["--server", &format!("https://localhost:{}", free_port()), "--ca"]).arg(&ca);
    cmd.args(["--mqtt", &format!("localhost:{}", server.mqtt), "--token", &token]).args(n);
    expect_failure(cmd.output().unwrap(), "cannot reach the enrollment endpoint");

    // A CA of its own, not the fleet's.
    let other = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let other_ca = dir.path().join("other-ca.pem");
    std::fs::write(&other_ca, params.self_signed(&other).unwrap().pem()).unwrap();
    let out = server.sim(&other_ca, &[&["--token", &token][..], &n].concat()).output().unwrap();
    expect_failure(out, "droverd ca cert");

    // The token from a file, or from DROVER_SIM_TOKEN, instead of the command line: the
    // wrong one is refused the same way (so it was read and sent); an empty file, a missing
    // one, and a token given two ways are each a clear error before anything is sent.
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "dre_not-a-real-token\n").unwrap();
    let out = server.sim(&ca, &[&["--token-file", token_file.to_str().unwrap()][..], &n].concat()).output().unwrap();
    expect_failure(out, "the enrollment token was refused");
    let out = server.sim(&ca, &n).env("DROVER_SIM_TOKEN", "dre_not-a-real-token").output().unwrap();
    expect_failure(out, "the enrollment token was refused");
    std::fs::write(&token_file, " \n").unwrap();
    let out = server.sim(&ca, &[&["--token-file", token_file.to_str().unwrap()][..], &n].concat()).output().unwrap();
    expect_failure(out, "is empty");
    let missing = dir.path().join("no-such-token");
    let out = server.sim(&ca, &[&["--token-file", missing.to_str().unwrap()][..], &n].concat()).output().unwrap();
    expect_failure(out, "cannot read --token-file");
    let out = server
        .sim(&ca, &[&["--token-file", token_file.to_str().unwrap()][..], &n].concat())
        .env("DROVER_SIM_TOKEN", &token)
        .output()
        .unwrap();
    expect_failure(out, "one way");

    let not_pem = dir.path().join("not.pem");
    std::fs::write(&not_pem, "hello").unwrap();
    expect_failure(server.sim(&not_pem, &[&["--token", &token][..], &n].concat()).output().unwrap(), "no certificate");

    // None of this enrolled anything, and the token is unused.
    assert!(devices(&server, &admin).is_empty());
}

fn post_bytes(d: &Droverd, path: &str, admin: &str, content_type: &str, body: &[u8]) -> (u16, Value) {
    let mut resp = agent()
        .post(&format!("{}{path}", d.base))
        .header("Authorization", &format!("Bearer {admin}"))
        .header("Content-Type", content_type)
        .send(body)
        .unwrap();
    (resp.status().as_u16(), resp.body_mut().read_json().unwrap_or(Value::Null))
}

/// Simulated devices run the agent's update engine: a `file` and then an `app` deployment to
/// a simulated fleet end `succeeded`, each device's folder holds what it installed, and the
/// server knows what each device runs.
#[test]
fn a_simulated_fleet_takes_file_and_app_updates() {
    use drover_artifact::keys::SigningKey;
    use drover_artifact::manifest::{Manifest, PayloadRole};
    use drover_artifact::root::{Root, RootKey, create_root};
    use drover_artifact::write::Builder;

    let dir = TempDir::new("updates");
    let server = Droverd::start(&dir.path().join("data"));
    let admin = server.admin_token();
    let ca = dir.path().join("ca.pem");
    server.ca_file(&ca);
    let token = server.enrollment_token(&admin, 100);
    let (root_key, release) = (SigningKey::generate().unwrap(), SigningKey::generate().unwrap());
    let root = Root::new(1, vec![RootKey::new(root_key.public(), "root")], vec![RootKey::new(release.public(), "ci")]);
    let root_file = dir.path().join("root.json");
    std::fs::write(&root_file, create_root(root, &[&root_key]).unwrap().to_json()).unwrap();
    let state = dir.path().join("state");
    let n = 8;
    // One update slot for the whole fleet: the devices take their turns.
    let mut cmd = server.sim(&ca, &["--token", &token, "-n", &n.to_string(), "--report", "0", "--update-slots", "1"]);
    cmd.arg("--state-dir").arg(&state).args(["--device-type", "sim-box", "--root-file"]).arg(&root_file);
    let (mut sim, lines) = spawn_lines(cmd);
    wait_line(&lines, Duration::from_secs(90), |l| l.starts_with(&format!("all {n} devices connected")));
    let ids: Vec<String> = devices(&server, &admin).iter().map(|d| d["id"].as_str().unwrap().to_string()).collect();
    assert_eq!(ids.len(), n);

    let build = |m: Manifest, name: &str, data: &[u8]| {
        let p = dir.path().join(name);
        std::fs::write(&p, data).unwrap();
        let mut out = Vec::new();
        Builder::new(m).payload(name, p, PayloadRole::Install).build(&mut out, &[&release]).unwrap();
        out
    };
    let mut conf = Manifest::new("sim-conf", "1", vec!["sim-box".into()], "file");
    conf.module_args.insert("path".into(), "/etc/sim/app.conf".into());
    let tree = dir.path().join("tree");
    std::fs::create_dir_all(tree.join("bin")).unwrap();
    std::fs::write(tree.join("bin/run"), "edge 3\n").unwrap();
    let mut tar = Vec::new();
    drover_artifact::tree::pack_dir(&tree, &mut tar).unwrap();
    let mut app = Manifest::new("edge", "3", vec!["sim-box".into()], "app");
    app.module_args.insert("name".into(), "edge".into());
    for (artifact, check) in [
        (build(conf, "app.conf", b"configured\n"), "files/etc/sim/app.conf"),
        (build(app, "app.tar", &tar), "apps/edge/current/bin/run"),
    ] {
        let (status, a) = post_bytes(&server, "/api/v1/artifacts", &admin, "application/octet-stream", &artifact);
        assert_eq!(status, 201, "{a}");
        let id = a["id"].as_str().unwrap().to_string();
        let body = serde_json::to_vec(&json!({"artifact": id, "devices": ids})).unwrap();
        let (status, dep) = post_bytes(&server, "/api/v1/deployments", &admin, "application/json", &body);
        assert_eq!(status, 201, "{dep}");
        let dep_id = dep["id"].as_str().unwrap();
        // Devices past their download at once, at most: a device keeps the slot from its
        // first step to its final report, while the others wait `pending`. (Two: the next
        // device's first report may reach the server before the last one's final report.)
        let mut most_in_flight = 0;
        let done = eventually(Duration::from_secs(90), "the deployment to finish", || {
            let d = server.get(&format!("/api/v1/deployments/{dep_id}"), &admin);
            let in_flight: u64 = ["downloading", "installing", "rebooting", "verifying"]
                .iter()
                .map(|s| d["counts"][s].as_u64().unwrap_or(0))
                .sum();
            most_in_flight = most_in_flight.max(in_flight);
            (d["status"] != "active").then_some(d)
        });
        assert_eq!(done["status"], "succeeded", "{done}");
        assert!(most_in_flight <= 2, "{most_in_flight} devices were updating at once with one update slot");
        for i in 0..n {
            let path = state.join("updates").join(format!("sim-{i:05}")).join(check);
            let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert!(text == "configured\n" || text == "edge 3\n", "{text}");
        }
        for d in devices(&server, &admin) {
            assert_eq!(d["software"]["artifact"], id, "{d}");
        }
    }
    sigterm(&sim);
    assert!(wait_exit(&mut sim, Duration::from_secs(30)).success());
}

/// A signed trust root with one release key, written to `DIR/root.json`.
fn trust_root(dir: &Path) -> (PathBuf, drover_artifact::keys::SigningKey) {
    use drover_artifact::keys::SigningKey;
    use drover_artifact::root::{Root, RootKey, create_root};
    let (root_key, release) = (SigningKey::generate().unwrap(), SigningKey::generate().unwrap());
    let root = Root::new(1, vec![RootKey::new(root_key.public(), "root")], vec![RootKey::new(release.public(), "ci")]);
    let root_file = dir.join("root.json");
    std::fs::write(&root_file, create_root(root, &[&root_key]).unwrap().to_json()).unwrap();
    (root_file, release)
}

/// `--download-rate`: a simulated device's download of an artifact takes at least the time the
/// rate implies (and the deployment is seen downloading meanwhile).
#[test]
fn a_download_rate_makes_an_update_take_its_time() {
    use drover_artifact::manifest::{Manifest, PayloadRole};
    use drover_artifact::write::Builder;

    let dir = TempDir::new("rate");
    let server = Droverd::start(&dir.path().join("data"));
    let admin = server.admin_token();
    let ca = dir.path().join("ca.pem");
    server.ca_file(&ca);
    let token = server.enrollment_token(&admin, 10);
    let (root_file, release) = trust_root(dir.path());
    let mut cmd =
        server.sim(&ca, &["-n", "1", "--report", "0", "--device-type", "sim-box", "--download-rate", "64KiB"]);
    cmd.arg("--root-file")
        .arg(&root_file)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .env("DROVER_SIM_TOKEN", &token);
    let (mut sim, lines) = spawn_lines(cmd);
    let _kill = KillOnPanic(sim.id());
    wait_line(&lines, Duration::from_secs(90), |l| l.starts_with("all 1 devices connected"));
    let ids: Vec<String> = devices(&server, &admin).iter().map(|d| d["id"].as_str().unwrap().to_string()).collect();

    // 256 KiB of payload that does not compress: at 64 KiB/s, 4 s at least.
    let payload: Vec<u8> = (0..256 * 1024u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let mut m = Manifest::new("big-conf", "1", vec!["sim-box".into()], "file");
    m.module_args.insert("path".into(), "/etc/sim/big.bin".into());
    let p = dir.path().join("big.bin");
    std::fs::write(&p, &payload).unwrap();
    let mut artifact = Vec::new();
    Builder::new(m).payload("big.bin", p, PayloadRole::Install).build(&mut artifact, &[&release]).unwrap();
    let (status, a) = post_bytes(&server, "/api/v1/artifacts", &admin, "application/octet-stream", &artifact);
    assert_eq!(status, 201, "{a}");
    let size = a["size"].as_u64().unwrap();
    let least = Duration::from_secs_f64(size as f64 / 65_536.0);
    let body = serde_json::to_vec(&json!({"artifact": a["id"], "devices": ids})).unwrap();
    let started = Instant::now();
    let (status, dep) = post_bytes(&server, "/api/v1/deployments", &admin, "application/json", &body);
    assert_eq!(status, 201, "{dep}");
    let dep_id = dep["id"].as_str().unwrap();
    let mut seen_downloading = 0;
    let done = eventually(Duration::from_secs(90), "the deployment to finish", || {
        let d = server.get(&format!("/api/v1/deployments/{dep_id}"), &admin);
        seen_downloading += u32::from(d["counts"]["downloading"].as_u64().unwrap_or(0) > 0);
        (d["status"] != "active").then_some(d)
    });
    let took = started.elapsed();
    assert_eq!(done["status"], "succeeded", "{done}");
    assert!(took >= least, "{size} bytes at 64 KiB/s took {took:?}, less than {least:?}");
    assert!(seen_downloading >= 2, "the download was seen {seen_downloading} times in {took:?}");
    let installed = dir.path().join("state/updates/sim-00000/files/etc/sim/big.bin");
    assert_eq!(std::fs::read(&installed).unwrap(), payload);
    sigterm(&sim);
    assert!(wait_exit(&mut sim, Duration::from_secs(30)).success());
}

/// `drover` (the operator's CLI) against this server, as the admin.
fn drover(server: &Droverd, admin: &str, args: &[&str]) -> Command {
    let mut c = Command::new(drover_bin());
    c.args(args)
        .env("DROVER_URL", &server.base)
        .env("DROVER_TOKEN", admin)
        .env("DROVER_CONFIG", "/nonexistent/drover-sim-it.toml")
        .stdin(Stdio::null());
    c
}

/// `--remote`: an operator copies a file to and from a simulated device and opens a terminal
/// on it, through droverd, with the real CLI; the device runs the agent's remote-access code
/// confined to its own folder: the shell starts there, file transfers stay under it, and port
/// forwarding is refused without `--remote-forward`.
#[test]
fn a_simulated_device_takes_a_terminal_and_file_transfers_in_its_own_folder() {
    let dir = TempDir::new("remote");
    let server = Droverd::start(&dir.path().join("data"));
    let admin = server.admin_token();
    let ca = dir.path().join("ca.pem");
    server.ca_file(&ca);
    let token = server.enrollment_token(&admin, 10);
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    let state = dir.path().join("state");
    // The tests run as root; a simulator run as root needs --remote-allow-root for terminals.
    let mut cmd = server.sim(&ca, &["-n", "2", "--report", "0", "--remote", "--remote-allow-root"]);
    cmd.arg("--token-file").arg(&token_file).arg("--state-dir").arg(&state).env("DROVER_LOG", "info");
    let (mut sim, lines) = spawn_lines(cmd);
    let _kill = KillOnPanic(sim.id());
    wait_line(&lines, Duration::from_secs(90), |l| l.starts_with("all 2 devices connected"));
    let list = devices(&server, &admin);
    let dev = list.iter().find(|d| d["identity"]["serial"].as_str().unwrap().contains("00000")).unwrap();
    let id = dev["id"].as_str().unwrap().to_string();
    let home = std::fs::canonicalize(state.join("remote/sim-00000")).unwrap();
    let other = std::fs::canonicalize(state.join("remote/sim-00001")).unwrap();

    // A file up and back down.
    let local = dir.path().join("hello.txt");
    std::fs::write(&local, "hello, simulated device\n").unwrap();
    let remote_path = format!("{id}:{}/hello.txt", home.display());
    let out = drover(&server, &admin, &["cp", local.to_str().unwrap(), &remote_path]).output().unwrap();
    assert!(out.status.success(), "upload: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read_to_string(home.join("hello.txt")).unwrap(), "hello, simulated device\n");
    let back = dir.path().join("back.txt");
    let out = drover(&server, &admin, &["cp", &remote_path, back.to_str().unwrap()]).output().unwrap();
    assert!(out.status.success(), "download: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read_to_string(&back).unwrap(), "hello, simulated device\n");

    // Outside its folder, even another simulated device's: refused.
    std::fs::write(other.join("secret.txt"), "not yours\n").unwrap();
    for outside in [format!("{}/secret.txt", other.display()), "/etc/hostname".to_string()] {
        let out = drover(&server, &admin, &["cp", &format!("{id}:{outside}"), dir.path().join("x").to_str().unwrap()])
            .output()
            .unwrap();
        assert!(!out.status.success(), "{outside} was copied");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("file_paths") || err.contains("not allowed"), "{outside}: {err}");
    }

    // A terminal: the shell starts in the device's folder (its HOME), sees the uploaded file,
    // and its exit status comes back.
    let mut term = drover(&server, &admin, &["term", &id])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        // The keys, then the pipe's end (which the CLI does not pass on: the shell ends when
        // told to).
        let mut stdin = term.stdin.take().unwrap();
        stdin.write_all(b"echo \"cwd=$(pwd) home=$HOME\"; ls; exit 7\n").unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = term.try_wait().unwrap() {
            break Some(s);
        }
        if Instant::now() >= deadline {
            let _ = term.kill();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut out = String::new();
    std::io::Read::read_to_string(term.stdout.as_mut().unwrap(), &mut out).unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(term.stderr.as_mut().unwrap(), &mut err).unwrap();
    let status = status.unwrap_or_else(|| panic!("drover term did not end within 30 s: {out:?} {err:?}"));
    assert_eq!(status.code(), Some(7), "{out}\n{err}");
    let want = format!("cwd={} home={}", home.display(), home.display());
    assert!(out.contains(&want), "{want:?} not in {out:?}");
    assert!(out.contains("hello.txt"), "{out:?}");

    // No port forwarding without --remote-forward: the device refuses the session.
    let port = free_port();
    let mut fwd = drover(&server, &admin, &["forward", &id, &format!("{port}:127.0.0.1:{}", server.dev)])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = fwd.try_wait().unwrap() {
            break s;
        }
        // Should the session open only with a first connection: make one.
        let _ = std::net::TcpStream::connect(("127.0.0.1", port));
        if Instant::now() >= deadline {
            let _ = fwd.kill();
            panic!("drover forward still running: the device did not refuse the session");
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let mut ferr = String::new();
    std::io::Read::read_to_string(fwd.stderr.as_mut().unwrap(), &mut ferr).unwrap();
    assert!(!status.success(), "{ferr}");
    assert!(ferr.contains("disabled") || ferr.contains("switched off"), "{ferr}");

    sigterm(&sim);
    assert!(wait_exit(&mut sim, Duration::from_secs(30)).success());
}
