//! Software updates with real processes on both sides: the real `droverd` binary (embedded
//! broker, HTTPS device endpoint, REST API) and real `drover-agent` processes enrolled with a
//! token, updating real files and app trees — and killed with SIGKILL in every state.
//!
//! Bad input tried here: artifacts altered in the server's store after upload (a payload byte,
//! the manifest, the end cut off — the "compromised storage" case), a signature by a key the
//! devices do not trust (uploaded while the server has no trust root), the wrong device type,
//! app payloads that climb out with `..` or a symlink.
//!
//! The agent binary is built for these tests (`cargo build -p drover-agent`; a no-op when it is
//! up to date) or taken from `DROVER_AGENT_BIN`.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use drover_artifact::keys::SigningKey;
use drover_artifact::manifest::{Manifest, PayloadRole};
use drover_artifact::root::{Root, RootKey, create_root};
use drover_artifact::write::Builder;
use serde_json::{Value, json};

use crate::e2e::agent as http;
use crate::support::{TempDir, agent_bin, eventually};

const DEVICE_TYPE: &str = "test-gw";
const FINAL: [&str; 6] = ["success", "failure", "rolled-back", "already-installed", "incompatible", "aborted"];

fn sha256_hex(b: &[u8]) -> String {
    drover_artifact::sha256_hex(b)
}

/// droverd (the suite's `fleet::Droverd`: fresh ports, readiness) with an admin token and the
/// fleet CA certificate on disk for the agents.
struct Server {
    d: crate::fleet::Droverd,
    data: PathBuf,
    token: String,
    ca: PathBuf,
}

impl Server {
    fn start(dir: &Path) -> Server {
        let data = dir.join("server");
        let d = crate::fleet::Droverd::start(&data, None, &[]);
        let token = crate::fleet::admin_token(&data);
        let ca = dir.join("ca.crt");
        std::fs::write(&ca, crate::fleet::droverd_cli(&data, &["ca", "cert"])).unwrap();
        Server { d, data, token, ca }
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let url = format!("{}{path}", self.d.base);
        let auth = format!("Bearer {}", self.token);
        let resp = match (method, body) {
            ("GET", _) => http().get(&url).header("Authorization", &auth).call(),
            ("POST", Some(b)) => http().post(&url).header("Authorization", &auth).send_json(b),
            ("POST", None) => http().post(&url).header("Authorization", &auth).send_empty(),
            _ => panic!("{method}"),
        };
        let mut resp = resp.unwrap();
        let status = resp.status().as_u16();
        (status, resp.body_mut().read_json::<Value>().unwrap_or(Value::Null))
    }

    /// Uploads an artifact; its id.
    fn upload(&self, bytes: &[u8]) -> String {
        let mut resp = http()
            .post(&format!("{}/api/v1/artifacts", self.d.base))
            .header("Authorization", &format!("Bearer {}", self.token))
            .header("Content-Type", "application/octet-stream")
            .send(bytes)
            .unwrap();
        let status = resp.status().as_u16();
        let body = resp.body_mut().read_to_string().unwrap_or_default();
        assert!(status == 201 || status == 200, "upload: {status} {body}");
        sha256_hex(bytes)
    }

    fn put_root(&self, json: &[u8]) {
        let mut resp = http()
            .put(&format!("{}/api/v1/trust-root", self.d.base))
            .header("Authorization", &format!("Bearer {}", self.token))
            .header("Content-Type", "application/json")
            .send(json)
            .unwrap();
        let status = resp.status().as_u16();
        assert_eq!(status, 200, "trust root: {}", resp.body_mut().read_to_string().unwrap_or_default());
    }

    fn enrollment_token(&self) -> String {
        let (s, b) = self.call("POST", "/api/v1/enrollment-tokens", Some(json!({"name": "update agents"})));
        assert_eq!(s, 201, "{b}");
        b["secret"].as_str().unwrap().to_string()
    }

    fn deploy(&self, artifact: &str, devices: &[&str]) -> String {
        let (s, b) = self.call("POST", "/api/v1/deployments", Some(json!({"artifact": artifact, "devices": devices})));
        assert_eq!(s, 201, "{b}");
        b["id"].as_str().unwrap().to_string()
    }

    fn rows(&self, dep: &str) -> Vec<Value> {
        let (s, b) = self.call("GET", &format!("/api/v1/deployments/{dep}/devices?limit=500"), None);
        assert_eq!(s, 200, "{b}");
        b["items"].as_array().cloned().unwrap_or_default()
    }

    fn device(&self, id: &str) -> Value {
        self.call("GET", &format!("/api/v1/devices/{id}"), None).1
    }

    fn log(&self, dep: &str, device: &str) -> String {
        let resp = http()
            .get(&format!("{}/api/v1/deployments/{dep}/devices/{device}/log", self.d.base))
            .header("Authorization", &format!("Bearer {}", self.token))
            .call();
        resp.ok().and_then(|mut r| r.body_mut().read_to_string().ok()).unwrap_or_default()
    }

    fn bytes_served(&self) -> u64 {
        let mut resp = http()
            .get(&format!("{}/metrics", self.d.base))
            .header("Authorization", &format!("Bearer {}", self.token))
            .call()
            .unwrap();
        let text = resp.body_mut().read_to_string().unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix("drover_artifact_bytes_served_total "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no drover_artifact_bytes_served_total in /metrics:\n{text}"))
    }

    /// The stored object of an artifact (the local store).
    fn object(&self, id: &str) -> PathBuf {
        self.data.join("artifacts").join(id)
    }
}

/// A device: a real drover-agent process with its own folders.
struct Agent {
    name: String,
    dir: PathBuf,
    cfg: PathBuf,
    data: PathBuf,
    child: Option<Child>,
    starts: u32,
    id: String,
}

impl Agent {
    fn new(s: &Server, root: &Path, base: &Path, name: &str, token: &str, update_extra: &str) -> Agent {
        let dir = base.join(name);
        for d in ["target", "hooks", "modules", "apps"] {
            std::fs::create_dir_all(dir.join(d)).unwrap();
        }
        let data = dir.join("data");
        let cfg = dir.join("agent.toml");
        let update_extra = if update_extra.contains("reboot_command") {
            update_extra.to_string()
        } else {
            format!("reboot_command = \"false\"\n{update_extra}")
        };
        std::fs::write(
            &cfg,
            format!(
                "server_url = \"https://localhost:{dev}\"\n\
                 mqtt_url = \"mqtts://localhost:{mqtt}\"\n\
                 ca_file = {ca:?}\n\
                 data_dir = {data:?}\n\
                 enrollment_token = \"{token}\"\n\
                 keepalive_secs = 10\n\
                 log_level = \"debug\"\n\
                 inventory_scripts_dir = {inv:?}\n\
                 [identity]\n\
                 serial = \"{name}\"\n\
                 [update]\n\
                 device_type = \"{DEVICE_TYPE}\"\n\
                 root_file = {root:?}\n\
                 hooks_dir = {hooks:?}\n\
                 modules_dir = {modules:?}\n\
                 file_allow = [{target:?}]\n\
                 apps_dir = {apps:?}\n\
                 download_retries = 2\n\
                 download_backoff_secs = 1\n\
                 download_backoff_max_secs = 1\n\
                 verify_timeout_secs = 60\n\
                 hook_retry_interval_secs = 1\n\
                 {update_extra}\n",
                dev = s.d.dev,
                mqtt = s.d.mqtt,
                ca = s.ca,
                inv = dir.join("inventory.d"),
                hooks = dir.join("hooks"),
                modules = dir.join("modules"),
                target = dir.join("target"),
                apps = dir.join("apps"),
            ),
        )
        .unwrap();
        let mut a = Agent { name: name.to_string(), dir, cfg, data, child: None, starts: 0, id: String::new() };
        a.start();
        let json = a.data.join("device.json");
        a.id = eventually(Duration::from_secs(30), "the agent to enroll", || {
            let v: Value = serde_json::from_slice(&std::fs::read(&json).ok()?).ok()?;
            v["device_id"].as_str().map(str::to_string)
        });
        a
    }

    fn start(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join("agent.log")).unwrap();
        self.child = Some(
            Command::new(agent_bin())
                .current_dir(&self.dir)
                .args(["run", "--config"])
                .arg(&self.cfg)
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap(),
        );
        self.starts += 1;
    }

    fn exited(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| c.try_wait().unwrap().is_some())
    }

    fn signal(&self, sig: &str) {
        if let Some(c) = &self.child {
            let _ = Command::new("kill").args([sig, &c.id().to_string()]).status();
        }
    }

    /// The process is stopped (SIGSTOP took effect): state `T` in /proc.
    fn stopped(&self) -> bool {
        let Some(c) = &self.child else { return false };
        std::fs::read_to_string(format!("/proc/{}/stat", c.id()))
            .ok()
            .and_then(|stat| stat.rsplit_once(") ").map(|(_, rest)| rest.starts_with('T')))
            .unwrap_or(false)
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn log(&self) -> String {
        let text = std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default();
        let start = text.len().saturating_sub(6000);
        let start = (start..text.len()).find(|i| text.is_char_boundary(*i)).unwrap_or(0);
        text[start..].to_string()
    }

    fn target(&self) -> PathBuf {
        self.dir.join("target/app.conf")
    }

    fn part_len(&self, id: &str) -> u64 {
        std::fs::metadata(self.data.join(format!("update/{id}.part"))).map(|m| m.len()).unwrap_or(0)
    }

    /// What the agent says it runs (`hello.software`): its record of installed software.
    fn installed(&self) -> Value {
        let v: Value = std::fs::read(self.data.join("update/installed.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or(Value::Null);
        v["software"].clone()
    }

    fn script(&self, sub: &str, name: &str, body: &str) {
        let p = self.dir.join(sub).join(name);
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    /// A state hook that kills the agent (`kill -9 $PPID`) the first time it runs.
    fn kill_hook(&self, name: &str) {
        let m = self.dir.join(format!("killed-{name}"));
        self.script(
            "hooks",
            name,
            &format!("[ -e {m} ] && exit 0; touch {m}; kill -9 $PPID; sleep 10", m = m.display()),
        );
    }

    /// `current` of app `name`, relative (`versions/2`).
    fn app_current(&self, name: &str) -> Option<String> {
        std::fs::read_link(self.dir.join("apps").join(name).join("current"))
            .ok()
            .map(|p| p.to_string_lossy().into_owned())
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Waits until every agent's row in `dep` is final, restarting agents that die meanwhile (a
/// `kill -9` from a hook, a module, the reboot command or the health check).
fn wait_final(s: &Server, dep: &str, agents: &mut [&mut Agent], within: Duration) -> Vec<Value> {
    let deadline = Instant::now() + within;
    loop {
        let rows = s.rows(dep);
        let done: Vec<Value> = agents
            .iter()
            .filter_map(|a| rows.iter().find(|r| r["device_id"] == a.id.as_str()))
            .filter(|r| FINAL.contains(&r["state"].as_str().unwrap_or("")))
            .cloned()
            .collect();
        if done.len() == agents.len() {
            return agents
                .iter()
                .map(|a| done.iter().find(|r| r["device_id"] == a.id.as_str()).unwrap().clone())
                .collect();
        }
        for a in agents.iter_mut() {
            if a.exited() {
                a.start();
            }
        }
        if Instant::now() > deadline {
            let logs: Vec<String> = agents.iter().map(|a| format!("--- {}:\n{}", a.name, a.log())).collect();
            panic!("deployment {dep}: not final within {within:?}: {rows:#?}\n{}", logs.join("\n"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

struct Keys {
    root: SigningKey,
    release: SigningKey,
    root_v1: Vec<u8>,
}

fn keys() -> Keys {
    let root = SigningKey::generate().unwrap();
    let release = SigningKey::generate().unwrap();
    let r = Root::new(1, vec![RootKey::new(root.public(), "root")], vec![RootKey::new(release.public(), "ci")]);
    let root_v1 = create_root(r, &[&root]).unwrap().to_json();
    Keys { root, release, root_v1 }
}

fn build(m: Manifest, payloads: &[(&str, &[u8])], key: Option<&SigningKey>) -> Vec<u8> {
    let d = TempDir::new("artifact");
    let mut b = Builder::new(m);
    for (name, data) in payloads {
        std::fs::write(d.path().join(name), data).unwrap();
        b = b.payload(*name, d.path().join(name), PayloadRole::Install);
    }
    let mut out = Vec::new();
    let signers: Vec<&SigningKey> = key.into_iter().collect();
    b.build(&mut out, &signers).unwrap();
    out
}

fn file_artifact(name: &str, version: &str, target: &Path, content: &[u8], key: &SigningKey) -> Vec<u8> {
    let mut m = Manifest::new(name, version, vec![DEVICE_TYPE.into()], "file");
    m.module_args.insert("path".into(), target.display().to_string());
    build(m, &[("app.conf", content)], Some(key))
}

/// An `app` artifact of a tree with `bin/run` saying which version it is.
fn app_artifact(name: &str, version: &str, key: &SigningKey) -> Vec<u8> {
    let d = TempDir::new("app-tree");
    std::fs::create_dir_all(d.path().join("tree/bin")).unwrap();
    std::fs::write(d.path().join("tree/bin/run"), format!("{name} {version}\n")).unwrap();
    let mut tar = Vec::new();
    drover_artifact::tree::pack_dir(&d.path().join("tree"), &mut tar).unwrap();
    let mut m = Manifest::new(name, version, vec![DEVICE_TYPE.into()], "app");
    m.module_args.insert("name".into(), name.into());
    build(m, &[("app.tar", &tar)], Some(key))
}

/// A one-entry tar written by hand, so that it can hold what a careful builder refuses to
/// write: a file entry with `path` (contents `evil`), or a symlink to `link`.
fn raw_tar(path: &str, link: Option<&str>) -> Vec<u8> {
    let mut h = [0u8; 512];
    let put = |h: &mut [u8; 512], at: usize, v: &[u8]| h[at..at + v.len()].copy_from_slice(v);
    let body: &[u8] = if link.is_some() { b"" } else { b"evil\n" };
    put(&mut h, 0, path.as_bytes());
    put(&mut h, 100, b"0000644\0");
    put(&mut h, 108, b"0000000\0");
    put(&mut h, 116, b"0000000\0");
    put(&mut h, 124, format!("{:011o}\0", body.len()).as_bytes());
    put(&mut h, 136, b"00000000000\0");
    put(&mut h, 148, b"        ");
    h[156] = if link.is_some() { b'2' } else { b'0' };
    if let Some(l) = link {
        put(&mut h, 157, l.as_bytes());
    }
    put(&mut h, 257, b"ustar\0");
    put(&mut h, 263, b"00");
    let sum: u32 = h.iter().map(|b| u32::from(*b)).sum();
    put(&mut h, 148, format!("{sum:06o}\0 ").as_bytes());
    let mut out = h.to_vec();
    out.extend_from_slice(body);
    out.resize(out.len().div_ceil(512) * 512, 0);
    out.extend_from_slice(&[0u8; 1024]);
    out
}

/// A deployment to several real agents, then a second one signed by a release key that only
/// the server's rotated trust root (v2) names: the devices, provisioned with v1, take v2 from
/// the install command's `roots` before they verify. Every device ends `success` and runs the
/// new version — its app tree switched on disk, in its own record and in the server's
/// inventory — keeps the previous version for rollback, and keeps root v2. The same artifact
/// again is `already-installed`, with nothing downloaded.
#[test]
fn a_deployment_to_several_agents_succeeds_across_a_root_rotation() {
    let dir = TempDir::new("update-agents-e2e");
    let s = Server::start(dir.path());
    let k = keys();
    let root = dir.path().join("root.json");
    std::fs::write(&root, &k.root_v1).unwrap();
    s.put_root(&k.root_v1);
    let token = s.enrollment_token();
    let mut agents: Vec<Agent> =
        (0..3).map(|i| Agent::new(&s, &root, dir.path(), &format!("e2e-{i}"), &token, "")).collect();
    let ids: Vec<String> = agents.iter().map(|a| a.id.clone()).collect();
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();

    let v1 = s.upload(&app_artifact("edge", "1.0", &k.release));
    let dep = s.deploy(&v1, &ids);
    let mut refs: Vec<&mut Agent> = agents.iter_mut().collect();
    let rows = wait_final(&s, &dep, &mut refs, Duration::from_secs(90));
    for (a, r) in agents.iter().zip(&rows) {
        assert_eq!(r["state"], "success", "{}: {r}\n{}", a.name, a.log());
        assert_eq!(a.app_current("edge").as_deref(), Some("versions/1.0"), "{}", a.name);
    }

    // The rotation: v2 adds a second release key; the new artifact is signed by it alone.
    let next = SigningKey::generate().unwrap();
    let r2 = Root::new(
        2,
        vec![RootKey::new(k.root.public(), "root")],
        vec![RootKey::new(k.release.public(), "ci"), RootKey::new(next.public(), "ci-2027")],
    );
    s.put_root(&create_root(r2, &[&k.root]).unwrap().to_json());
    let v2 = s.upload(&app_artifact("edge", "2.0", &next));
    let dep = s.deploy(&v2, &ids);
    let mut refs: Vec<&mut Agent> = agents.iter_mut().collect();
    let rows = wait_final(&s, &dep, &mut refs, Duration::from_secs(90));
    for (a, r) in agents.iter().zip(&rows) {
        assert_eq!(r["state"], "success", "{}: {r}\n{}", a.name, a.log());
        assert_eq!(a.app_current("edge").as_deref(), Some("versions/2.0"), "{}", a.name);
        assert_eq!(std::fs::read_to_string(a.dir.join("apps/edge/current/bin/run")).unwrap(), "edge 2.0\n");
        let mut kept: Vec<String> = std::fs::read_dir(a.dir.join("apps/edge/versions"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        kept.sort();
        assert_eq!(kept, ["1.0", "2.0"], "{}: the previous version is kept", a.name);
        let sw = json!({"artifact": v2, "name": "edge", "version": "2.0"});
        assert_eq!(a.installed(), sw, "{}", a.name);
        assert_eq!(s.device(&a.id)["software"], sw, "{}", a.name);
        let root_now: Value = serde_json::from_slice(&std::fs::read(a.data.join("update/root.json")).unwrap()).unwrap();
        assert_eq!(root_now["signed"]["version"], 2, "{}", a.name);
        assert_eq!(a.starts, 1, "{}: the agent restarted\n{}", a.name, a.log());
    }
    let (_, d) = s.call("GET", &format!("/api/v1/deployments/{dep}"), None);
    assert_eq!(d["status"], "succeeded", "{d}");

    let served = s.bytes_served();
    let dep = s.deploy(&v2, &[ids[1]]);
    let rows = wait_final(&s, &dep, &mut [&mut agents[1]], Duration::from_secs(30));
    assert_eq!(rows[0]["state"], "already-installed", "{rows:?}");
    assert_eq!(s.bytes_served(), served, "nothing downloaded");
}

/// Bad input: what the server serves was altered after upload (its store is compromised), or
/// is not for these devices. Each is refused on the device with a clear state and message, the
/// device keeps running what it ran, and the server's deployment says so.
#[test]
fn tampered_and_unsuitable_artifacts_are_refused_and_the_device_is_unchanged() {
    let dir = TempDir::new("update-agents-tamper");
    // No trust root on the server: it accepts any signed upload, so the devices' check is the
    // only one.
    let s = Server::start(dir.path());
    let k = keys();
    std::fs::write(dir.path().join("root.json"), &k.root_v1).unwrap();
    let token = s.enrollment_token();
    let mut a = Agent::new(&s, &dir.path().join("root.json"), dir.path(), "tamper", &token, "");
    let target = a.target();
    let v1 = file_artifact("conf", "1", &target, b"good v1\n", &k.release);
    let v1_id = s.upload(&v1);
    let dep = s.deploy(&v1_id, &[&a.id]);
    assert_eq!(wait_final(&s, &dep, &mut [&mut a], Duration::from_secs(60))[0]["state"], "success", "{}", a.log());
    let app1 = app_artifact("edge", "1", &k.release);
    let app1_id = s.upload(&app1);
    let dep = s.deploy(&app1_id, &[&a.id]);
    assert_eq!(wait_final(&s, &dep, &mut [&mut a], Duration::from_secs(60))[0]["state"], "success", "{}", a.log());
    let software = a.installed();

    type Alter = Box<dyn Fn(&mut Vec<u8>)>;
    let mut cases: Vec<(&str, Vec<u8>, Option<Alter>, &str, &str)> = Vec::new();
    cases.push((
        "a payload byte flipped in the store",
        file_artifact("conf", "2", &target, b"evil v2\n", &k.release),
        Some(Box::new(|b: &mut Vec<u8>| {
            let n = b.len();
            b[n - 3] ^= 0x01;
        })),
        "failure",
        "does not match",
    ));
    cases.push((
        "the manifest edited in the store",
        file_artifact("conf", "3", &target, b"evil v3\n", &k.release),
        Some(Box::new(|b: &mut Vec<u8>| {
            let at = b.windows(13).position(|w| w == b"\"version\":\"3\"").unwrap();
            b[at + 11] = b'9';
        })),
        "failure",
        "signature",
    ));
    cases.push((
        "the end cut off in the store",
        file_artifact("conf", "4", &target, &vec![b'x'; 100_000], &k.release),
        Some(Box::new(|b: &mut Vec<u8>| b.truncate(b.len() - 50_000))),
        "failure",
        "",
    ));
    let stranger = SigningKey::generate().unwrap();
    cases.push((
        "signed by a key the devices do not trust",
        file_artifact("conf", "5", &target, b"evil v5\n", &stranger),
        None,
        "failure",
        "does not list as a release key",
    ));
    let mut other = Manifest::new("conf", "6", vec!["some-other-device".into()], "file");
    other.module_args.insert("path".into(), target.display().to_string());
    cases.push((
        "for another device type",
        build(other, &[("app.conf", b"x")], Some(&k.release)),
        None,
        "incompatible",
        "some-other-device",
    ));
    for (what, version, payload) in [
        ("an app payload with ../", "7", raw_tar("../../../escaped", None)),
        ("an app payload with an escaping symlink", "8", raw_tar("out", Some("../../../../.."))),
        ("an app payload with an absolute path", "9", raw_tar("/tmp/drover-escaped", None)),
    ] {
        let mut m = Manifest::new("edge", version, vec![DEVICE_TYPE.into()], "app");
        m.module_args.insert("name".into(), "edge".into());
        cases.push((what, build(m, &[("app.tar", &payload)], Some(&k.release)), None, "failure", "refused"));
    }

    let mut failures = Vec::new();
    for (what, bytes, alter, want_state, want_msg) in cases {
        let id = s.upload(&bytes);
        if let Some(f) = alter {
            let path = s.object(&id);
            let mut stored = std::fs::read(&path).unwrap();
            f(&mut stored);
            std::fs::write(&path, stored).unwrap();
        }
        let dep = s.deploy(&id, &[&a.id]);
        let row = wait_final(&s, &dep, &mut [&mut a], Duration::from_secs(60)).remove(0);
        let msg = row["message"].as_str().unwrap_or_default().to_string();
        eprintln!("{what}: {} — {msg}", row["state"]);
        let mut problems = Vec::new();
        if row["state"] != want_state {
            problems.push(format!("state {} (expected {want_state})", row["state"]));
        }
        if msg.is_empty() || !msg.contains(want_msg) {
            problems.push(format!("message {msg:?} (expected it to say {want_msg:?})"));
        }
        if !s.log(&dep, &a.id).contains("step") {
            problems.push("no log with the report".into());
        }
        if std::fs::read_to_string(&target).unwrap_or_default() != "good v1\n" {
            problems.push("the file changed".into());
        }
        if a.app_current("edge").as_deref() != Some("versions/1") {
            problems.push(format!("app current is {:?}", a.app_current("edge")));
        }
        let versions: Vec<_> =
            std::fs::read_dir(a.dir.join("apps/edge/versions")).unwrap().flatten().map(|e| e.file_name()).collect();
        if versions.len() != 1 {
            problems.push(format!("app versions left behind: {versions:?}"));
        }
        if a.installed() != software || s.device(&a.id)["software"] != software {
            problems.push(format!("software {} / {}", a.installed(), s.device(&a.id)["software"]));
        }
        if a.part_len(&id) != 0 {
            problems.push("the refused download is kept".into());
        }
        if !problems.is_empty() {
            failures.push(format!("{what}: {}", problems.join("; ")));
        }
    }
    assert!(!dir.path().join("escaped").exists() && !Path::new("/tmp/drover-escaped").exists());
    assert!(failures.is_empty(), "{}\n{}", failures.join("\n"), a.log());
}

/// A download cut by `kill -9` of the agent in the middle resumes where it stopped: the server
/// serves the rest, not the whole file again (its byte counter), and the update succeeds.
#[test]
fn a_download_cut_by_kill_9_resumes_where_it_stopped() {
    let dir = TempDir::new("update-agents-resume");
    let s = Server::start(dir.path());
    let k = keys();
    std::fs::write(dir.path().join("root.json"), &k.root_v1).unwrap();
    let token = s.enrollment_token();
    let mut a = Agent::new(&s, &dir.path().join("root.json"), dir.path(), "resume", &token, "");
    let size = 96 << 20;
    let content: Vec<u8> = (0..size as u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
    let art = file_artifact("big", "1", &a.target(), &content, &k.release);
    let id = s.upload(&art);
    let before = s.bytes_served();
    let dep = s.deploy(&id, &[&a.id]);
    // Freeze the agent once a fair part is on disk, note how much, then kill it.
    let threshold = 24 << 20;
    eventually(Duration::from_secs(60), "the download to pass 24 MiB", || (a.part_len(&id) >= threshold).then_some(()));
    a.signal("-STOP");
    eventually(Duration::from_secs(10), "the agent to stop", || a.stopped().then_some(()));
    let had = a.part_len(&id);
    a.kill();
    assert!(had < art.len() as u64, "the download finished before the kill ({had} bytes); make the artifact larger");
    a.start();
    let row = wait_final(&s, &dep, &mut [&mut a], Duration::from_secs(120)).remove(0);
    assert_eq!(row["state"], "success", "{row}\n{}", a.log());
    assert_eq!(std::fs::read(a.target()).unwrap(), content);
    let served = s.bytes_served() - before;
    let total = art.len() as u64;
    // Starting over would serve at least `total + had`; resuming serves `total` plus what was
    // in flight when the agent stopped.
    assert!(
        served < total + had,
        "served {served} bytes for a {total}-byte artifact with {had} on disk: it started over"
    );
    assert!(served >= total, "served {served} < {total}");
}

/// A module in shell that installs a file with rollback, and on request kills the agent
/// halfway through the install or at the commit, or asks for a reboot.
fn shellfile(a: &Agent) -> String {
    let d = a.dir.display();
    format!(
        r#"state="$1"; work="$2"
kill_once() {{ [ -e "{d}/killed-$1" ] && return 0; touch "{d}/killed-$1"; kill -9 $PPID; sleep 10; }}
case "$state" in
  SupportsRollback) echo Yes ;;
  NeedsArtifactReboot) [ "$DROVER_ARG_REBOOT" = yes ] && echo Yes || echo No ;;
  ArtifactInstall)
    cp "$DROVER_ARG_TARGET" "$work/tmp/backup"
    head -c 3 "$work/files/app.conf" > "$DROVER_ARG_TARGET"
    [ "$DROVER_ARG_KILL" = install ] && kill_once install
    cp "$work/files/app.conf" "$DROVER_ARG_TARGET.new" && mv "$DROVER_ARG_TARGET.new" "$DROVER_ARG_TARGET" ;;
  ArtifactCommit) [ "$DROVER_ARG_KILL" = commit ] && kill_once commit; true ;;
  ArtifactRollback)
    [ -f "$work/tmp/backup" ] && cp "$work/tmp/backup" "$DROVER_ARG_TARGET.new" && mv "$DROVER_ARG_TARGET.new" "$DROVER_ARG_TARGET"; true ;;
esac
exit 0"#
    )
}

struct Case {
    name: &'static str,
    update: &'static str,
    /// `file`, `app` or `shellfile`.
    module: &'static str,
    args: &'static [(&'static str, &'static str)],
    hook: Option<&'static str>,
    /// "success": the new version; "rolled-back": the old one.
    expect: &'static str,
}

/// The kill -9 matrix: the agent is killed in each state — at each state boundary by a hook,
/// halfway through the install and at the commit by a module, by the reboot command, by the
/// health check — and restarted (the mid-download case is
/// `a_download_cut_by_kill_9_resumes_where_it_stopped`). Every run ends with the device on the
/// old or the new version: the file or app on disk, the agent's software record and the
/// server's inventory agree, and the server's final state says which. The cases run side by
/// side, one device each, against one droverd.
#[test]
fn kill_9_in_every_state_ends_on_the_old_or_the_new_version() {
    let dir = TempDir::new("update-agents-kill9");
    let s = Server::start(dir.path());
    let k = keys();
    let root = dir.path().join("root.json");
    std::fs::write(&root, &k.root_v1).unwrap();
    let token = s.enrollment_token();
    let failing_health = "health_check = \"test $DROVER_ARTIFACT_VERSION != 2\"";
    let mut cases = Vec::new();
    for hook in [
        "Download_Enter",
        "Download_Leave",
        "Install_Enter",
        "Install_Leave",
        "Verify_Enter",
        "Verify_Leave",
        "Commit_Enter",
        "Commit_Leave",
    ] {
        cases.push(Case { name: hook, update: "", module: "file", args: &[], hook: Some(hook), expect: "success" });
    }
    cases.push(Case {
        name: "Install_Leave (app)",
        update: "",
        module: "app",
        args: &[],
        hook: Some("Install_Leave"),
        expect: "success",
    });
    for hook in ["Rollback_Enter", "Rollback_Leave"] {
        cases.push(Case {
            name: hook,
            update: failing_health,
            module: "file",
            args: &[],
            hook: Some(hook),
            expect: "rolled-back",
        });
    }
    cases.push(Case {
        name: "Rollback_Leave (app)",
        update: failing_health,
        module: "app",
        args: &[],
        hook: Some("Rollback_Leave"),
        expect: "rolled-back",
    });
    cases.push(Case {
        name: "Installing (halfway through the module's install)",
        update: "",
        module: "shellfile",
        args: &[("kill", "install")],
        hook: None,
        expect: "rolled-back",
    });
    cases.push(Case {
        name: "Rebooting (the reboot command)",
        update: "reboot_command = \"kill -9 $PPID\"",
        module: "shellfile",
        args: &[("reboot", "yes")],
        hook: None,
        expect: "success",
    });
    cases.push(Case {
        name: "Verifying (the health check)",
        // The agent runs in its own folder (see Agent::start).
        update: "health_check = \"[ $DROVER_ARTIFACT_VERSION != 2 ] || [ -e killed-verify ] || { touch killed-verify; kill -9 $PPID; sleep 10; }\"",
        module: "file",
        args: &[],
        hook: None,
        expect: "success",
    });
    cases.push(Case {
        name: "Committing (the module's commit)",
        update: "",
        module: "shellfile",
        args: &[("kill", "commit")],
        hook: None,
        expect: "success",
    });

    let run = |i: usize, case: &Case| -> Result<(), String> {
        let name = format!("k{i}");
        let mut a = Agent::new(&s, &root, dir.path(), &name, &token, case.update);
        a.script("modules", "shellfile", &shellfile(&a));
        std::fs::write(a.target(), "factory\n").unwrap();
        // v1, so that "old" is a version Drover installed.
        let (old, new) = match case.module {
            "app" => (
                app_artifact(&format!("app-{name}"), "1", &k.release),
                app_artifact(&format!("app-{name}"), "2", &k.release),
            ),
            module => {
                let v1 = file_artifact(&format!("conf-{name}"), "1", &a.target(), b"v1 old\n", &k.release);
                let mut m = Manifest::new(format!("conf-{name}"), "2", vec![DEVICE_TYPE.into()], module);
                let key = if module == "file" { "path" } else { "target" };
                m.module_args.insert(key.into(), a.target().display().to_string());
                for (k, v) in case.args {
                    m.module_args.insert(k.to_string(), v.to_string());
                }
                (v1, build(m, &[("app.conf", b"v2 new\n")], Some(&k.release)))
            }
        };
        let old_id = s.upload(&old);
        let dep = s.deploy(&old_id, &[&a.id]);
        let r = wait_final(&s, &dep, &mut [&mut a], Duration::from_secs(90)).remove(0);
        if r["state"] != "success" {
            return Err(format!("v1 did not install: {r}\n{}", a.log()));
        }
        if let Some(h) = case.hook {
            a.kill_hook(&format!("{h}_00"));
        }
        let new_id = s.upload(&new);
        let starts = a.starts;
        let dep = s.deploy(&new_id, &[&a.id]);
        let r = wait_final(&s, &dep, &mut [&mut a], Duration::from_secs(120)).remove(0);
        let (version, sw_id) = if case.expect == "success" { ("2", &new_id) } else { ("1", &old_id) };
        let mut problems = Vec::new();
        if r["state"] != case.expect {
            problems.push(format!("final state {} (expected {}): {}", r["state"], case.expect, r["message"]));
        }
        if a.starts == starts {
            problems.push("the agent was never killed".into());
        }
        match case.module {
            "app" => {
                let want = format!("versions/{version}");
                if a.app_current(&format!("app-{name}")) != Some(want.clone()) {
                    problems.push(format!("app current {:?}, expected {want}", a.app_current(&format!("app-{name}"))));
                }
            }
            _ => {
                let want = if version == "2" { "v2 new\n" } else { "v1 old\n" };
                let have = std::fs::read_to_string(a.target()).unwrap_or_default();
                if have != want {
                    problems.push(format!("the file holds {have:?}, expected {want:?}"));
                }
            }
        }
        let sw = a.installed();
        if sw["version"] != version || sw["artifact"] != sw_id.as_str() {
            problems.push(format!("the agent's software record says {sw}"));
        }
        if s.device(&a.id)["software"] != sw {
            problems.push(format!("the server says the device runs {}", s.device(&a.id)["software"]));
        }
        let (_, d) = s.call("GET", &format!("/api/v1/deployments/{dep}"), None);
        let want_status = if case.expect == "success" { "succeeded" } else { "failed" };
        if d["status"] != want_status {
            problems.push(format!("deployment status {} (expected {want_status})", d["status"]));
        }
        if problems.is_empty() { Ok(()) } else { Err(format!("{}\n{}", problems.join("; "), a.log())) }
    };
    // The cases side by side, four at a time (two cores).
    let numbered: Vec<(usize, &Case)> = cases.iter().enumerate().collect();
    let results: Vec<(usize, Result<(), String>)> = std::thread::scope(|scope| {
        let mut out = Vec::new();
        for chunk in numbered.chunks(4) {
            let handles: Vec<_> = chunk.iter().map(|&(i, c)| (i, scope.spawn(move || run(i, c)))).collect();
            for (i, h) in handles {
                out.push((i, h.join().unwrap_or_else(|_| Err("panicked".into()))));
            }
        }
        out
    });
    let failed: Vec<String> = results
        .iter()
        .filter_map(|(i, r)| r.as_ref().err().map(|e| format!("== {} (k{i}): {e}", cases[*i].name)))
        .collect();
    assert!(failed.is_empty(), "{} of {} states failed:\n{}", failed.len(), cases.len(), failed.join("\n\n"));
}
