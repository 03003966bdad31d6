//! The README's tour, as a newcomer runs it: `scripts/demo.sh` (with this workspace's debug
//! binaries instead of a release build, and ports of its own), then every command of the
//! tour's `sh` blocks, in order, from the folder the demo keeps its data in — with `drover`
//! and `droverd` on `PATH`, the token the tour's first command prints where the README says
//! `drv_…`, and the demo's address where it says `127.0.0.1:8080`. Each must succeed. So a
//! README that drifts from the demo, the CLI or the server fails here.

use std::io::{BufRead as _, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{BIN, free_port};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).ancestors().nth(2).unwrap().to_path_buf()
}

/// `droverd` and `drover-sim` of this workspace, built now if needed, beside `drover`.
fn demo_bins() -> PathBuf {
    let dir = Path::new(BIN).parent().unwrap().to_path_buf();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "-p", "drover-server", "--bin", "droverd", "-p", "drover-sim", "--bin", "drover-sim"])
        .current_dir(repo_root());
    if dir.file_name().is_some_and(|n| n == "release") {
        cmd.arg("--release");
    }
    assert!(cmd.status().expect("cargo runs").success(), "cargo build of droverd and drover-sim failed");
    dir
}

/// The tour's commands: every line of the `sh` blocks between "## A five-minute tour" and the
/// next section, comments stripped.
fn tour_commands() -> Vec<String> {
    let readme = std::fs::read_to_string(repo_root().join("README.md")).unwrap();
    let start = readme.find("## A five-minute tour").expect("the README has its tour");
    let rest = &readme[start + 3..];
    let tour = &rest[..rest.find("\n## ").unwrap_or(rest.len())];
    let mut out = Vec::new();
    let mut in_sh = false;
    for line in tour.lines() {
        let t = line.trim();
        if t.starts_with("```") {
            in_sh = !in_sh && t == "```sh";
            continue;
        }
        if in_sh && !t.is_empty() && !t.starts_with('#') {
            let cmd = match t.find("   #") {
                Some(i) => t[..i].trim_end(),
                None => t,
            };
            out.push(cmd.to_string());
        }
    }
    out
}

struct Demo {
    child: Child,
}

impl Drop for Demo {
    fn drop(&mut self) {
        // demo.sh stops the fleet and droverd on SIGTERM.
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn get(url: &str, token: &str) -> Option<serde_json::Value> {
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    let mut r = agent.get(url).header("Authorization", &format!("Bearer {token}")).call().ok()?;
    (r.status() == 200).then(|| r.body_mut().read_json().ok()).flatten()
}

#[test]
fn the_readme_tour_runs_as_written_against_the_demo() {
    let bins = demo_bins();
    let work = std::env::temp_dir().join(format!("drover-tour-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(work.join("home")).unwrap();
    let (http, mqtt, dev) = (free_port(), free_port(), free_port());
    let url = format!("127.0.0.1:{http}");
    let path = format!("{}:{}", bins.display(), std::env::var("PATH").unwrap_or_default());
    let env = |c: &mut Command| {
        c.env("PATH", &path)
            .env("HOME", work.join("home"))
            .env("XDG_CONFIG_HOME", work.join("home/.config"))
            .env_remove("DROVER_URL")
            .env_remove("DROVER_TOKEN")
            .env_remove("DROVER_DATABASE_URL")
            .env_remove("DROVER_ADMIN_PASSWORD");
    };

    // 1. Start it, as the README's first command does (the binaries are ours, not built).
    let mut cmd = Command::new(repo_root().join("scripts/demo.sh"));
    env(&mut cmd);
    cmd.env("DEMO_BIN_DIR", &bins)
        .env("DEMO_DATA", work.join("demo-data"))
        .env("DEMO_DEVICES", "8")
        .env("DROVER_HTTP_LISTEN", &url)
        .env("DROVER_MQTT_LISTEN", format!("127.0.0.1:{mqtt}"))
        .env("DROVER_DEVICE_LISTEN", format!("127.0.0.1:{dev}"))
        .env("DROVER_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut child = cmd.spawn().expect("scripts/demo.sh runs");
    let stdout = child.stdout.take().unwrap();
    let demo = Demo { child };
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            eprintln!("demo: {line}");
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        match rx.recv_timeout(Duration::from_secs(1)) {
            Ok(l) if l.contains("sign in as admin / drover-demo-admin") => break,
            _ => assert!(Instant::now() < deadline, "demo.sh did not say it was up within 120 s"),
        }
    }
    // The fleet joins: every device online, named by its hostname.
    let admin = std::fs::read_to_string(work.join("demo-data/sim/admin-token")).unwrap().trim().to_string();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let page = get(&format!("http://{url}/api/v1/devices?online=true&limit=100"), &admin);
        let names: Vec<String> = page
            .map(|p| {
                p["items"].as_array().unwrap().iter().map(|d| d["display_name"].as_str().unwrap().to_string()).collect()
            })
            .unwrap_or_default();
        if names.len() == 8 && names.iter().any(|n| n == "demo-00007") {
            break;
        }
        assert!(Instant::now() < deadline, "the demo fleet did not come online: {names:?}");
        std::thread::sleep(Duration::from_millis(500));
    }

    // The tour, command by command.
    let commands = tour_commands();
    assert!(commands.len() >= 15, "the tour has its commands: {commands:?}");
    let mut token: Option<String> = None;
    for (n, line) in commands.iter().enumerate() {
        let mut line = line.replace("127.0.0.1:8080", &url);
        if line.contains("drv_…") {
            let t = token.as_deref().expect("a command before this one prints a token");
            line = line.replace("drv_…", t);
        }
        let mut c = Command::new("bash");
        c.arg("-c").arg(&line).current_dir(&work);
        env(&mut c);
        // `drover term` reads the keyboard: type into the device's shell, then leave it.
        let input: &[u8] = if line.starts_with("drover term") { b"pwd\nexit\n" } else { b"" };
        let mut p = c.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        p.stdin.take().unwrap().write_all(input).unwrap();
        let out = wait_with_timeout(p, Duration::from_secs(180), &line);
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(
            out.status.success(),
            "tour command {} failed ({}): {line}\nstdout: {stdout}\nstderr: {stderr}",
            n + 1,
            out.status
        );
        if token.is_none()
            && let Some(t) = stdout.split_whitespace().find(|w| w.starts_with("drv_"))
        {
            token = Some(t.to_string());
        }
        if line.starts_with("drover term") {
            assert!(
                stdout.contains("demo-data/sim/remote/demo-00007"),
                "the shell starts in the device's folder: {stdout}"
            );
        }
    }
    // What the tour did is there: the renamed device took the update.
    let d = get(&format!("http://{url}/api/v1/devices?q=lobby-kiosk"), &admin).unwrap();
    assert_eq!(d["items"][0]["display_name"], "lobby-kiosk", "{d}");
    assert_eq!(d["items"][0]["software"]["version"], "1.1.0", "{d}");
    assert!(work.join("demo-data/sim/remote/demo-00007/root.json").exists(), "drover cp delivered the file");
    drop(demo);
    let _ = std::fs::remove_dir_all(&work);
}

fn wait_with_timeout(p: Child, timeout: Duration, what: &str) -> std::process::Output {
    let pid = p.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(p.wait_with_output());
    });
    match rx.recv_timeout(timeout) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            let _ = Command::new("kill").arg("-KILL").arg(pid.to_string()).status();
            panic!("tour command did not finish in {timeout:?}: {what}");
        }
    }
}
