//! `drover term` and `drover cp` against a real device: the real `drover-agent` binary (built
//! from this workspace) enrolled with an enrollment token into a real droverd (in-process, its
//! embedded broker), and `drover term` run under a real pseudo-terminal (`script` from
//! util-linux), which reports a size of 0 × 0 as CI runners do.

use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::{BIN, Server, drover, fails, free_port, http, ok};

fn api(s: &Server, method: &str, path: &str, body: Value) -> Value {
    let url = format!("{}/api/v1{path}", s.url);
    let auth = format!("Bearer {}", s.admin_token);
    let mut resp = match method {
        "GET" => http().get(&url).header("Authorization", &auth).call(),
        _ => http().post(&url).header("Authorization", &auth).send_json(body),
    }
    .unwrap();
    let v: Value = resp.body_mut().read_json().unwrap_or(Value::Null);
    assert!(resp.status().is_success(), "{method} {path}: {v}");
    v
}

/// Waits for `cond` to give a value, failing with `what` after `timeout`.
fn eventually<T>(timeout: Duration, what: &str, mut cond: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = cond() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The `drover-agent` binary of this workspace (`DROVER_AGENT_BIN` if set), built now if needed.
fn agent_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("DROVER_AGENT_BIN") {
        return PathBuf::from(p);
    }
    let dir = Path::new(BIN).parent().unwrap();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "-p", "drover-agent", "--bin", "drover-agent"]).current_dir(env!("CARGO_MANIFEST_DIR"));
    if dir.file_name().is_some_and(|n| n == "release") {
        cmd.arg("--release");
    }
    assert!(cmd.status().expect("cargo runs").success(), "cargo build -p drover-agent failed");
    dir.join("drover-agent")
}

/// A device: a real drover-agent enrolled with an enrollment token, terminal and file
/// transfers on (files only under its `files` folder).
struct Agent {
    child: Child,
    id: String,
    files: PathBuf,
    dir: PathBuf,
}

impl Agent {
    fn start(s: &Server, mqtt: u16, dev: u16, serial: &str) -> Agent {
        let secret =
            api(s, "POST", "/enrollment-tokens", json!({"name": serial}))["secret"].as_str().unwrap().to_string();
        let dir = s.dir.join(serial);
        let files = dir.join("files");
        std::fs::create_dir_all(&files).unwrap();
        let files = std::fs::canonicalize(files).unwrap();
        let data = dir.join("data");
        let ca = s.dir.join("data").join("ca").join("fleet-ca.crt");
        let cfg = dir.join("agent.toml");
        std::fs::write(
            &cfg,
            format!(
                "server_url = \"https://localhost:{dev}\"\nmqtt_url = \"mqtts://localhost:{mqtt}\"\n\
                 ca_file = {ca:?}\ndata_dir = {data:?}\nenrollment_token = \"{secret}\"\nkeepalive_secs = 10\n\
                 log_level = \"debug\"\n[identity]\nserial = \"{serial}\"\n[remote]\nterminal = true\n\
                 files = true\nallow_root = true\nfile_paths = [{files:?}]\n"
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.join("agent.log")).unwrap();
        let child = Command::new(agent_bin())
            .current_dir(&dir)
            .args(["run", "--config"])
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut agent = Agent { child, id: String::new(), files, dir };
        let json = data.join("device.json");
        agent.id = eventually(Duration::from_secs(30), "the agent to enroll", || {
            let v: Value = serde_json::from_slice(&std::fs::read(&json).ok()?).ok()?;
            v["device_id"].as_str().map(str::to_string)
        });
        eventually(Duration::from_secs(30), "the device to be online", || {
            api(s, "GET", &format!("/devices/{}", agent.id), Value::Null)["online"].as_bool().filter(|o| *o)
        });
        agent
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `drover term DEVICE` under a pseudo-terminal of its own (`script -qfec`); what it prints
/// is collected as it comes.
struct Term {
    child: Child,
    stdin: std::process::ChildStdin,
    seen: Arc<Mutex<String>>,
}

impl Term {
    fn start(s: &Server, device: &str) -> Term {
        let command = format!("{BIN} term {device}");
        let mut child = Command::new("script")
            .args(["-qfec", &command, "/dev/null"])
            .env("DROVER_CONFIG", s.dir.join("term-config.json"))
            .env("DROVER_URL", &s.url)
            .env("DROVER_TOKEN", &s.admin_token)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("script (util-linux) runs");
        let stdin = child.stdin.take().unwrap();
        let mut stdout = child.stdout.take().unwrap();
        let seen = Arc::new(Mutex::new(String::new()));
        let into = seen.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = stdout.read(&mut buf) {
                into.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Term { child, stdin, seen }
    }

    fn type_line(&mut self, line: &str) {
        self.stdin.write_all(format!("{line}\r").as_bytes()).unwrap();
        self.stdin.flush().unwrap();
    }

    fn wait_for(&mut self, needle: &str, agent: &Agent) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.seen.lock().unwrap().contains(needle) {
            if let Ok(Some(status)) = self.child.try_wait() {
                let mut err = String::new();
                let _ = self.child.stderr.take().unwrap().read_to_string(&mut err);
                panic!("drover term ended ({status}) before {needle:?}: {err}\noutput: {}", self.seen.lock().unwrap());
            }
            assert!(
                Instant::now() < deadline,
                "no {needle:?} in the terminal within 30 s; output: {}\nagent log: {}",
                self.seen.lock().unwrap(),
                agent.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Term {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The shell's `exit 7` ends `drover term` at once with status 7, with stdin still open and
/// no key pressed after it; the pseudo-terminal's 0 × 0 size becomes 80 × 24 on the device.
/// Then `cp` into a directory both ways, and a refusal from the device shown with its code.
#[test]
fn term_exits_with_the_shell_and_cp_copies_into_directories() {
    let (mqtt, dev) = (free_port(), free_port());
    let s = Server::start_with(&format!("127.0.0.1:{mqtt}"), &format!("127.0.0.1:{dev}"));
    let agent = Agent::start(&s, mqtt, dev, "pty-dev");

    let mut term = Term::start(&s, &agent.id);
    // The size the shell sees, computed there so the echo of what was typed cannot match.
    term.type_line("echo \"size=$(stty size | tr ' ' x)\"");
    term.wait_for("size=24x80", &agent);
    term.type_line("exit 7");
    let typed = Instant::now();
    let status =
        eventually(Duration::from_secs(5), "drover term to exit after `exit 7`", || term.child.try_wait().unwrap());
    assert_eq!(status.code(), Some(7), "output: {}", term.seen.lock().unwrap());
    assert!(typed.elapsed() < Duration::from_secs(3), "exited only after {:?}", typed.elapsed());
    drop(term);

    // cp into a device directory written as scp does, and down into a local directory.
    let cfg = s.config_path("cp");
    let env = [("DROVER_URL", s.url.as_str()), ("DROVER_TOKEN", s.admin_token.as_str())];
    let local = s.dir.join("local");
    std::fs::create_dir_all(&local).unwrap();
    let src = local.join("notes.txt");
    std::fs::write(&src, "field notes\n".repeat(100)).unwrap();
    let device_dir = format!("{}:{}/", agent.id, agent.files.display());
    let out = ok(&drover(&cfg, &env, &["cp", src.to_str().unwrap(), &device_dir], None));
    assert!(out.contains("SHA-256 verified"), "the summary is output, on stdout: {out}");
    assert_eq!(std::fs::read(agent.files.join("notes.txt")).unwrap(), std::fs::read(&src).unwrap());

    std::fs::write(agent.files.join("hosts"), "127.0.0.1 localhost\n").unwrap();
    let down = s.dir.join("down");
    std::fs::create_dir_all(&down).unwrap();
    let remote = format!("{}:{}/hosts", agent.id, agent.files.display());
    let out = Command::new(BIN)
        .args(["cp", &remote, "."])
        .current_dir(&down)
        .stdin(Stdio::null())
        .env("DROVER_CONFIG", &cfg)
        .envs(env)
        .output()
        .unwrap();
    ok(&out);
    assert_eq!(std::fs::read_to_string(down.join("hosts")).unwrap(), "127.0.0.1 localhost\n");

    let err = fails(&drover(&cfg, &env, &["cp", &remote, s.dir.join("no-such-dir/").to_str().unwrap()], None));
    assert!(err.contains("no such directory"), "{err}");

    // A path outside the device's allowed folders: the device's reason, and no "HTTP 0".
    let outside = format!("{}:/etc/", agent.id);
    let err = fails(&drover(&cfg, &env, &["cp", src.to_str().unwrap(), &outside], None));
    assert!(err.trim_end().ends_with("[path-not-allowed]"), "{err}");
}

/// Devices by name end to end: `device rename`, the name first in `device list`, `term NAME`
/// and `cp NAME:…`, then `rename --clear` back to the hostname the agent reports.
#[test]
fn devices_by_name_rename_list_term_and_clear() {
    let (mqtt, dev) = (free_port(), free_port());
    let s = Server::start_with(&format!("127.0.0.1:{mqtt}"), &format!("127.0.0.1:{dev}"));
    let agent = Agent::start(&s, mqtt, dev, "name-dev");
    let cfg = s.config_path("names");
    let env = [("DROVER_URL", s.url.as_str()), ("DROVER_TOKEN", s.admin_token.as_str())];
    let run = |args: &[&str]| drover(&cfg, &env, args, None);

    let shown = super::json(&run(&["device", "rename", &agent.id, "bench-pump", "-o", "json"]));
    assert_eq!(shown["name"], "bench-pump");
    let table = ok(&run(&["device", "list"]));
    assert!(table.lines().nth(1).unwrap().starts_with("bench-pump "), "{table}");
    assert_eq!(super::json(&run(&["device", "show", "bench-pump", "-o", "json"]))["id"], agent.id.as_str());

    let mut term = Term::start(&s, "bench-pump");
    term.type_line("echo \"got=$((40+2))\"");
    term.wait_for("got=42", &agent);
    term.type_line("exit 3");
    let status = eventually(Duration::from_secs(5), "drover term NAME to exit", || term.child.try_wait().unwrap());
    assert_eq!(status.code(), Some(3));
    drop(term);

    std::fs::write(agent.files.join("by-name"), "x").unwrap();
    let down = s.dir.join("by-name-copy");
    ok(&run(&["cp", &format!("bench-pump:{}/by-name", agent.files.display()), down.to_str().unwrap()]));
    assert_eq!(std::fs::read_to_string(&down).unwrap(), "x");

    // Cleared: the display name falls back to the hostname from the inventory.
    let cleared = super::json(&run(&["device", "rename", &agent.id, "--clear", "-o", "json"]));
    assert!(cleared["name"].is_null(), "{cleared}");
    assert_ne!(cleared["display_name"], "bench-pump");
    let err = super::fails(&run(&["device", "show", "bench-pump"]));
    assert!(err.contains("no device named \"bench-pump\""), "{err}");
}
