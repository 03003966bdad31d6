//! Software updates through the real `drover-agent` binary: commands and reports over a real
//! Mosquitto with mutual TLS, artifacts from an HTTPS server with client certificates and
//! Range (with injected cuts), real files, hooks, modules and `kill -9`.
//!
//! The same scenarios run against the real droverd in `drover-server`'s
//! `tests/it/update_agents.rs`; these need no server and pin the agent's behaviour alone.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use drover_artifact::keys::SigningKey;
use drover_artifact::manifest::{Manifest, PayloadRole};
use drover_artifact::root::{Root, RootKey, create_root};
use drover_artifact::write::Builder;
use rumqttc::v5::mqttbytes::QoS;
use serde_json::{Value, json};

use crate::support::*;

const BIN: &str = env!("CARGO_BIN_EXE_drover-agent");
const DEVICE_TYPE: &str = "test-box";

struct Rig {
    ca: Ca,
    m: Mosquitto,
    server: ArtifactServer,
    obs: Observer,
    release: SigningKey,
    dir: PathBuf,
}

struct Offer {
    id: String,
    json: Value,
}

fn sha256_hex(b: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(b))
}

impl Rig {
    async fn new(name: &str) -> Rig {
        drover_agent::tls::install_default_provider();
        let ca = Ca::new("fleet CA");
        let m = Mosquitto::start(&ca);
        let server = ArtifactServer::start(&ca);
        let obs = Observer::start(&ca, m.port, "drover/v1/d/+/up/#");
        let release = SigningKey::generate().unwrap();
        let root_key = SigningKey::generate().unwrap();
        let root =
            Root::new(1, vec![RootKey::new(root_key.public(), "root")], vec![RootKey::new(release.public(), "ci")]);
        let root_json = create_root(root, &[&root_key]).unwrap().to_json();
        let dir = temp_dir(name);
        std::fs::write(dir.join("ca.crt"), &ca.cert_pem).unwrap();
        std::fs::write(dir.join("root.json"), &root_json).unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        Rig { ca, m, server, obs, release, dir }
    }

    /// Builds an artifact, puts it on the server and returns the offer for it.
    fn artifact(&self, m: Manifest, payloads: &[(&str, &[u8])], key: Option<&SigningKey>) -> (Offer, Vec<u8>) {
        let d = temp_dir("artifact");
        let mut b = Builder::new(m.clone());
        for (n, data) in payloads {
            std::fs::write(d.join(n), data).unwrap();
            b = b.payload(*n, d.join(n), PayloadRole::Install);
        }
        let mut bytes = Vec::new();
        let signers: Vec<&SigningKey> = key.into_iter().collect();
        b.build(&mut bytes, &signers).unwrap();
        std::fs::remove_dir_all(&d).unwrap();
        let offer = self.offer(&m, bytes.clone());
        (offer, bytes)
    }

    /// Serves `bytes` as an artifact named by the manifest; the id is their SHA-256.
    fn offer(&self, m: &Manifest, bytes: Vec<u8>) -> Offer {
        let id = sha256_hex(&bytes);
        let path = format!("/device/v1/artifacts/{id}");
        let json = json!({"id": id, "name": m.name, "version": m.version, "size": bytes.len(), "path": path});
        self.server.put(&path, bytes);
        Offer { id, json }
    }

    fn file_artifact(&self, dev: &Dev, version: &str, content: &[u8]) -> Offer {
        let mut m = Manifest::new("app-conf", version, vec![DEVICE_TYPE.into()], "file");
        m.module_args.insert("path".into(), dev.target().display().to_string());
        m.provides.insert("app-conf.version".into(), version.into());
        self.artifact(m, &[("app.conf", content)], Some(&self.release)).0
    }

    fn device(&self, name: &str, update_extra: &str) -> Dev {
        let update_extra = if update_extra.contains("reboot_command") {
            update_extra.to_string()
        } else {
            format!("reboot_command = \"false\"\n{update_extra}")
        };
        let dir = self.dir.join(name);
        let data = dir.join("data");
        std::fs::create_dir_all(dir.join("target")).unwrap();
        std::fs::create_dir_all(dir.join("hooks")).unwrap();
        std::fs::create_dir_all(dir.join("modules")).unwrap();
        let dev = Device::new(&self.ca, name);
        std::fs::create_dir_all(&data).unwrap();
        write(&data.join("device.key"), &dev.key.to_pem());
        std::fs::set_permissions(data.join("device.key"), std::fs::Permissions::from_mode(0o600)).unwrap();
        write(&data.join("device.crt"), &dev.cert_pem);
        write(&data.join("ca.crt"), &self.ca.cert_pem);
        write(&data.join("device.json"), &format!("{{\"device_id\":\"{name}\"}}"));
        let cfg = dir.join("agent.toml");
        write(
            &cfg,
            &format!(
                "server_url = \"https://127.0.0.1:{http}\"\n\
                 mqtt_url = \"mqtts://127.0.0.1:{mqtt}\"\n\
                 ca_file = {ca:?}\n\
                 data_dir = {data:?}\n\
                 keepalive_secs = 5\n\
                 log_level = \"debug\"\n\
                 inventory_scripts_dir = {inv:?}\n\
                 [update]\n\
                 device_type = \"{DEVICE_TYPE}\"\n\
                 root_file = {root:?}\n\
                 hooks_dir = {hooks:?}\n\
                 modules_dir = {modules:?}\n\
                 file_allow = [{target:?}]\n\
                 apps_dir = {apps:?}\n\
                 download_backoff_secs = 1\n\
                 download_backoff_max_secs = 1\n\
                 verify_timeout_secs = 30\n\
                 hook_retry_interval_secs = 1\n\
                 {update_extra}\n",
                http = self.server.port,
                mqtt = self.m.port,
                ca = self.dir.join("ca.crt"),
                inv = dir.join("inventory.d"),
                root = self.dir.join("root.json"),
                hooks = dir.join("hooks"),
                modules = dir.join("modules"),
                target = dir.join("target"),
                apps = dir.join("apps"),
            ),
        );
        Dev { id: name.to_string(), dir, data, cfg, child: None, starts: 0 }
    }

    async fn install(&self, dev: &Dev, deployment: &str, offer: &Offer) {
        self.command(dev, json!({"v": 1, "deployment": deployment, "action": "install", "artifact": offer.json})).await;
    }

    async fn command(&self, dev: &Dev, cmd: Value) {
        let topic = format!("drover/v1/d/{}/down/update", dev.id);
        self.obs.client.publish(topic, QoS::AtLeastOnce, false, serde_json::to_vec(&cmd).unwrap()).await.unwrap();
    }

    /// Waits for the final report of `deployment`, restarting the agent whenever it dies (a
    /// `kill -9` from a hook, a module, the reboot command or the test). Returns the report
    /// and every state reported on the way.
    async fn final_report(&mut self, dev: &mut Dev, deployment: &str, within: Duration) -> (Value, Vec<String>) {
        let deadline = Instant::now() + within;
        let mut states = Vec::new();
        loop {
            for m in self.obs.collect(Duration::from_millis(100)).await {
                if is(&m, &dev.id, "up/update") && m.payload["deployment"] == deployment {
                    let s = state(&m).to_string();
                    if states.last() != Some(&s) {
                        states.push(s.clone());
                    }
                    if ["success", "failure", "rolled-back", "already-installed", "incompatible", "aborted"]
                        .contains(&s.as_str())
                    {
                        return (m.payload, states);
                    }
                }
            }
            if dev.exited() {
                dev.start();
            }
            assert!(
                Instant::now() < deadline,
                "{deployment}: no final report within {within:?}; states {states:?}\n{}",
                dev.log()
            );
        }
    }

    /// Starts the agent and waits for its `hello` (it is subscribed by then).
    async fn start(&mut self, dev: &mut Dev) -> Value {
        dev.start();
        let hello = self.obs.expect(Duration::from_secs(15), "hello", |m| is(m, &dev.id, "up/hello")).await;
        hello.payload
    }

    /// Restarts the agent and returns the software in its `hello`.
    async fn hello_software(&mut self, dev: &mut Dev) -> Value {
        dev.stop();
        self.obs.collect(Duration::from_millis(100)).await;
        dev.start();
        let hello = self.obs.expect(Duration::from_secs(15), "hello", |m| is(m, &dev.id, "up/hello")).await;
        hello.payload["software"].clone()
    }
}

struct Dev {
    id: String,
    dir: PathBuf,
    data: PathBuf,
    cfg: PathBuf,
    child: Option<Child>,
    starts: u32,
}

impl Dev {
    fn target(&self) -> PathBuf {
        self.dir.join("target/app.conf")
    }

    fn start(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join("agent.log")).unwrap();
        let child = Command::new(BIN)
            .args(["run", "--config"])
            .arg(&self.cfg)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        self.starts += 1;
    }

    fn exited(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => c.try_wait().unwrap().is_some(),
            None => false,
        }
    }

    /// kill -9.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill").args(["-TERM", &c.id().to_string()]).status();
            let t = Instant::now();
            while c.try_wait().unwrap().is_none() && t.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }

    fn part_len(&self, id: &str) -> u64 {
        std::fs::metadata(self.data.join(format!("update/{id}.part"))).map(|m| m.len()).unwrap_or(0)
    }

    fn hook(&self, name: &str, body: &str) {
        let p = self.dir.join("hooks").join(name);
        write(&p, &format!("#!/bin/sh\n{body}\n"));
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    /// A hook that kills the agent (`kill -9 $PPID`) the first time it runs.
    fn kill_hook(&self, name: &str) {
        let mark = self.dir.join(format!("killed-{name}"));
        self.hook(name, &format!("[ -e {m} ] && exit 0; touch {m}; kill -9 $PPID; sleep 10", m = mark.display()));
    }

    fn module(&self, name: &str, body: &str) {
        let p = self.dir.join("modules").join(name);
        write(&p, &format!("#!/bin/sh\n{body}\n"));
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
}

impl Drop for Dev {
    fn drop(&mut self) {
        self.kill();
    }
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| format!("<{e}>"))
}

/// One device takes a file update end to end; says so in `hello`; the same artifact again is
/// `already-installed`; a failing health check rolls back, with the log's tail in the report.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_update_end_to_end_then_already_installed_then_rollback() {
    let mut rig = Rig::new("e2e").await;
    let unhealthy = rig.dir.join("dev-e2e/unhealthy");
    let mut dev = rig.device("dev-e2e", &format!("health_check = \"test ! -e {}\"", unhealthy.display()));
    write(&dev.target(), "v0\n");
    rig.start(&mut dev).await;
    let v1 = rig.file_artifact(&dev, "1", b"v1\n");
    rig.install(&dev, "dep-1", &v1).await;
    let (r, states) = rig.final_report(&mut dev, "dep-1", Duration::from_secs(30)).await;
    assert_eq!(r["state"], "success", "{r}\n{}", dev.log());
    assert_eq!(states, ["downloading", "installing", "verifying", "success"]);
    assert_eq!(r["software"], json!({"artifact": v1.id, "name": "app-conf", "version": "1"}));
    assert!(r.get("log").is_none(), "no log with success: {r}");
    assert_eq!(read(&dev.target()), "v1\n");
    assert_eq!(dev.starts, 1);
    let sw = rig.hello_software(&mut dev).await;
    assert_eq!(sw, json!({"artifact": v1.id, "name": "app-conf", "version": "1"}));
    // After a reconnect, the last final report is sent again.
    let again =
        rig.obs.expect(Duration::from_secs(10), "the final report again", |m| is(m, "dev-e2e", "up/update")).await;
    assert_eq!((again.payload["deployment"].as_str(), state(&again)), (Some("dep-1"), "success"));
    // The same command again: the same answer, nothing done.
    rig.install(&dev, "dep-1", &v1).await;
    let (r, _) = rig.final_report(&mut dev, "dep-1", Duration::from_secs(10)).await;
    assert_eq!(r["state"], "success");

    rig.install(&dev, "dep-2", &v1).await;
    let (r, states) = rig.final_report(&mut dev, "dep-2", Duration::from_secs(10)).await;
    assert_eq!(r["state"], "already-installed", "{r}");
    assert_eq!(states, ["already-installed"]);

    // Bad input: an update that makes the device unhealthy.
    write(&unhealthy, "");
    let v2 = rig.file_artifact(&dev, "2", b"v2\n");
    rig.install(&dev, "dep-3", &v2).await;
    let (r, _) = rig.final_report(&mut dev, "dep-3", Duration::from_secs(30)).await;
    assert_eq!(r["state"], "rolled-back", "{r}");
    assert!(r["message"].as_str().unwrap().contains("health check failed"), "{r}");
    assert!(r["log"].as_str().unwrap().contains("rolled back"), "{r}");
    assert_eq!(r["software"]["version"], "1");
    assert_eq!(read(&dev.target()), "v1\n");
    assert_eq!(dev.starts, 2, "{}", dev.log());
}

/// A download cut by the network resumes with Range from where it stopped; so does one cut by
/// `kill -9` of the agent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downloads_resume_after_a_cut_and_after_kill_9() {
    let mut rig = Rig::new("resume").await;
    let mut dev = rig.device("dev-resume", "");
    rig.start(&mut dev).await;
    let big: Vec<u8> = (0..1_500_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let offer = rig.file_artifact(&dev, "1", &big);
    let path = offer.json["path"].as_str().unwrap().to_string();
    rig.server.set_faults(Faults { cut_after: Some(400_000), throttle: None });
    rig.install(&dev, "dep-cut", &offer).await;
    let (r, _) = rig.final_report(&mut dev, "dep-cut", Duration::from_secs(30)).await;
    assert_eq!(r["state"], "success", "{r}\n{}", dev.log());
    assert_eq!(std::fs::read(dev.target()).unwrap(), big);
    {
        let served = rig.server.served.lock().unwrap();
        let ranges: Vec<_> = served.requests.iter().filter(|(p, _)| *p == path).map(|(_, r)| r.clone()).collect();
        assert_eq!(ranges.len(), 2, "{ranges:?}");
        assert_eq!(ranges[0], None);
        let resumed_at: u64 =
            ranges[1].as_deref().unwrap().trim_start_matches("bytes=").trim_end_matches('-').parse().unwrap();
        assert!(resumed_at >= 300_000, "resumed at {resumed_at}");
        assert!(
            served.body_bytes < big.len() as u64 + 200_000,
            "{} bytes served: it did not start over",
            served.body_bytes
        );
    }

    let big2: Vec<u8> = (0..1_500_000u32).map(|i| (i * 13 % 251) as u8).collect();
    let offer = rig.file_artifact(&dev, "2", &big2);
    rig.server.set_faults(Faults { cut_after: None, throttle: Some(Duration::from_millis(20)) });
    rig.install(&dev, "dep-kill", &offer).await;
    let t = Instant::now();
    while dev.part_len(&offer.id) < 300_000 {
        assert!(t.elapsed() < Duration::from_secs(30), "the download does not progress\n{}", dev.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    dev.kill();
    let had = dev.part_len(&offer.id);
    rig.server.set_faults(Faults::default());
    rig.start(&mut dev).await;
    let (r, _) = rig.final_report(&mut dev, "dep-kill", Duration::from_secs(30)).await;
    assert_eq!(r["state"], "success", "{r}\n{}", dev.log());
    assert_eq!(std::fs::read(dev.target()).unwrap(), big2);
    let served = rig.server.served.lock().unwrap();
    let last = served.requests.last().unwrap().1.clone().unwrap();
    let resumed_at: u64 = last.trim_start_matches("bytes=").trim_end_matches('-').parse().unwrap();
    assert!(resumed_at >= had.min(300_000), "resumed at {resumed_at}, had {had}");
}

/// Bad input: a flipped payload byte, an edited manifest, an unknown signing key, the wrong
/// device type, an unsigned artifact, a truncated file, escaping app payloads. Each is refused
/// with a clear status and message, and the device is unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_and_incompatible_artifacts_are_refused() {
    let mut rig = Rig::new("tamper").await;
    let mut dev = rig.device("dev-tamper", "");
    write(&dev.target(), "original\n");
    rig.start(&mut dev).await;
    let mut m = Manifest::new("app-conf", "9", vec![DEVICE_TYPE.into()], "file");
    m.module_args.insert("path".into(), dev.target().display().to_string());
    let (_, good) = rig.artifact(m.clone(), &[("app.conf", b"evil\n")], Some(&rig.release));
    let stranger = SigningKey::generate().unwrap();
    let mut cases: Vec<(&str, Offer, &str, &str)> = Vec::new();
    let mut flipped = good.clone();
    let n = flipped.len();
    flipped[n - 2] ^= 0x20;
    cases.push(("payload byte flipped", rig.offer(&m, flipped), "failure", "does not match"));
    let mut edited = good.clone();
    let at = edited.windows(13).position(|w| w == b"\"version\":\"9\"").unwrap();
    edited[at + 11] = b'8';
    cases.push(("manifest edited", rig.offer(&m, edited), "failure", "signature"));
    let (o, _) = rig.artifact(m.clone(), &[("app.conf", b"evil\n")], Some(&stranger));
    cases.push(("unknown key", o, "failure", "does not list as a release key"));
    let (o, _) = rig.artifact(m.clone(), &[("app.conf", b"evil\n")], None);
    cases.push(("unsigned", o, "failure", "signature"));
    let mut other = m.clone();
    other.device_types = vec!["other-box".into()];
    let (o, _) = rig.artifact(other, &[("app.conf", b"evil\n")], Some(&rig.release));
    cases.push(("wrong device type", o, "incompatible", "other-box"));
    let mut dep = m.clone();
    dep.depends.insert("os.version".into(), vec!["13".into()]);
    let (o, _) = rig.artifact(dep, &[("app.conf", b"evil\n")], Some(&rig.release));
    cases.push(("unmet depends", o, "incompatible", "os.version"));
    // Truncated: the offer names the whole file, the server has lost its end.
    let whole = rig.offer(&m, good.clone());
    rig.server.put(whole.json["path"].as_str().unwrap(), good[..good.len() - 3].to_vec());
    cases.push(("truncated", whole, "failure", "truncated"));
    let mut app = Manifest::new("edge", "2", vec![DEVICE_TYPE.into()], "app");
    app.module_args.insert("name".into(), "edge".into());
    let evil_tar = {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        h.set_path("escape").unwrap();
        h.set_link_name("../../../..").unwrap();
        h.set_cksum();
        b.append(&h, &[][..]).unwrap();
        b.into_inner().unwrap()
    };
    let (o, _) = rig.artifact(app, &[("app.tar", &evil_tar)], Some(&rig.release));
    cases.push(("app payload with an escaping symlink", o, "failure", "refused"));

    for (i, (what, offer, want_state, want_msg)) in cases.iter().enumerate() {
        let dep = format!("dep-bad-{i}");
        rig.install(&dev, &dep, offer).await;
        let (r, _) = rig.final_report(&mut dev, &dep, Duration::from_secs(30)).await;
        assert_eq!(r["state"], *want_state, "{what}: {r}\n{}", dev.log());
        let msg = r["message"].as_str().unwrap_or_default().to_lowercase();
        assert!(msg.contains(want_msg), "{what}: message {msg:?} should say {want_msg:?}");
        assert!(r["log"].as_str().is_some_and(|l| !l.is_empty()), "{what}: {r}");
        assert_eq!(read(&dev.target()), "original\n", "{what}: the device changed");
        assert!(!dev.dir.join("apps/edge/current").exists(), "{what}");
        assert_eq!(dev.part_len(&offer.id), 0, "{what}: the download is not kept");
    }
}

/// What a kill -9 case sets up and expects.
struct Case {
    name: &'static str,
    /// `[update]` lines for this device.
    update: String,
    /// The module (`file` or an external `shellfile`) and module_args of v2.
    external: bool,
    args: Vec<(&'static str, String)>,
    /// Set up hooks etc. on the device before the update.
    setup: Box<dyn Fn(&Dev)>,
    /// Kill the agent from the test when the download has this many bytes.
    kill_at_bytes: Option<u64>,
    /// "success" (new version) or "rolled-back" (old version).
    expect: &'static str,
}

/// A file-installing update module in shell, with rollback and optional kills in the middle
/// of the install and at the commit, and a reboot on request.
fn shellfile(dev: &Dev) -> String {
    let d = dev.dir.display();
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

/// The kill -9 matrix: for every state, the agent is killed there (by a hook at the state's
/// boundary, by a module halfway through its work, by the reboot command, by the health
/// check, or by the test mid-download) and restarted. Every run ends with the device on the
/// old or the new version — the file on disk, the final report and the software in the next
/// `hello` agree — and the final state says which.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_in_every_state_leaves_old_or_new() {
    let mut rig = Rig::new("kill9").await;
    let mark = |dev: &Dev, n: &str| dev.dir.join(format!("killed-{n}")).display().to_string();
    let mut cases: Vec<Case> = Vec::new();
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
        cases.push(Case {
            name: hook,
            update: String::new(),
            external: false,
            args: vec![],
            setup: Box::new(move |d: &Dev| d.kill_hook(&format!("{hook}_00"))),
            kill_at_bytes: None,
            expect: "success",
        });
    }
    for hook in ["Rollback_Enter", "Rollback_Leave"] {
        cases.push(Case {
            name: hook,
            update: "health_check = \"test $DROVER_ARTIFACT_VERSION != 2\"".into(),
            external: false,
            args: vec![],
            setup: Box::new(move |d: &Dev| d.kill_hook(&format!("{hook}_00"))),
            kill_at_bytes: None,
            expect: "rolled-back",
        });
    }
    cases.push(Case {
        name: "Downloading (mid-download)",
        update: String::new(),
        external: false,
        args: vec![],
        setup: Box::new(|_| {}),
        kill_at_bytes: Some(200_000),
        expect: "success",
    });
    cases.push(Case {
        name: "Installing (mid-install)",
        update: String::new(),
        external: true,
        args: vec![("kill", "install".into())],
        setup: Box::new(|_| {}),
        kill_at_bytes: None,
        expect: "rolled-back",
    });
    cases.push(Case {
        name: "Rebooting",
        update: "reboot_command = \"kill -9 $PPID\"".into(),
        external: true,
        args: vec![("reboot", "yes".into())],
        setup: Box::new(|_| {}),
        kill_at_bytes: None,
        expect: "success",
    });
    cases.push(Case {
        name: "Verifying (health check)",
        update: String::new(),
        external: false,
        args: vec![],
        setup: Box::new(move |d: &Dev| {
            let m = mark(d, "verify");
            let cfg = read(&d.cfg).replace(
                "[update]\n",
                &format!("[update]\nhealth_check = \"[ -e {m} ] && exit 0; touch {m}; kill -9 $PPID; sleep 10\"\n"),
            );
            write(&d.cfg, &cfg);
        }),
        kill_at_bytes: None,
        expect: "success",
    });
    cases.push(Case {
        name: "Committing",
        update: String::new(),
        external: true,
        args: vec![("kill", "commit".into())],
        setup: Box::new(|_| {}),
        kill_at_bytes: None,
        expect: "success",
    });

    let mut failures = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        let mut dev = rig.device(&format!("dev-k{i}"), &case.update);
        dev.module("shellfile", &shellfile(&dev));
        write(&dev.target(), "v0-old\n");
        rig.start(&mut dev).await;
        // v1 first, so "old" is a Drover-installed version.
        let v1 = rig.file_artifact(&dev, "1", b"v1-old\n");
        rig.install(&dev, &format!("k{i}-v1"), &v1).await;
        let (r, _) = rig.final_report(&mut dev, &format!("k{i}-v1"), Duration::from_secs(30)).await;
        if r["state"] != "success" && case.expect == "success" {
            failures.push(format!("{}: v1 did not install: {r}", case.name));
            continue;
        }
        (case.setup)(&dev);
        if case.name.starts_with("Verifying") {
            // The configuration changed for v2: restart the agent on it.
            dev.stop();
            rig.start(&mut dev).await;
        }
        let content: Vec<u8> = if case.kill_at_bytes.is_some() {
            (0..1_000_000u32).map(|i| (i % 200) as u8 + 32).collect()
        } else {
            b"v2-new\n".to_vec()
        };
        let mut m =
            Manifest::new("app-conf", "2", vec![DEVICE_TYPE.into()], if case.external { "shellfile" } else { "file" });
        let key = if case.external { "target" } else { "path" };
        m.module_args.insert(key.into(), dev.target().display().to_string());
        for (k, v) in &case.args {
            m.module_args.insert(k.to_string(), v.clone());
        }
        let (v2, _) = rig.artifact(m, &[("app.conf", &content)], Some(&rig.release));
        if case.kill_at_bytes.is_some() {
            rig.server.set_faults(Faults { cut_after: None, throttle: Some(Duration::from_millis(30)) });
        }
        let dep = format!("k{i}-v2");
        let starts_before = dev.starts;
        rig.install(&dev, &dep, &v2).await;
        if let Some(at) = case.kill_at_bytes {
            let t = Instant::now();
            while dev.part_len(&v2.id) < at && t.elapsed() < Duration::from_secs(20) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            dev.kill();
            rig.server.set_faults(Faults::default());
            rig.start(&mut dev).await;
        }
        let (r, states) = rig.final_report(&mut dev, &dep, Duration::from_secs(60)).await;
        let (want_file, want_version) =
            if case.expect == "success" { (content.clone(), "2") } else { (b"v1-old\n".to_vec(), "1") };
        let file = std::fs::read(dev.target()).unwrap_or_default();
        let killed = dev.starts > starts_before;
        let hello = rig.hello_software(&mut dev).await;
        let mut problems = Vec::new();
        if r["state"] != case.expect {
            problems.push(format!("final state {} (expected {}), message {}", r["state"], case.expect, r["message"]));
        }
        if file != want_file {
            problems.push(format!("file holds {:?}", String::from_utf8_lossy(&file[..file.len().min(40)])));
        }
        if r["software"]["version"] != want_version || hello["version"] != want_version {
            problems.push(format!("software: report {} hello {}", r["software"], hello));
        }
        if !killed {
            problems.push("the agent was not killed".to_string());
        }
        if !problems.is_empty() {
            failures.push(format!("{}: {}; states {states:?}\n{}", case.name, problems.join("; "), dev.log()));
        }
        dev.stop();
    }
    assert!(failures.is_empty(), "{} of {} cases failed:\n{}", failures.len(), cases.len(), failures.join("\n\n"));
}

/// `check` with `[update]`: one more line, with the trust root and the update in flight.
/// Bad input: no trust root at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_the_update_setup() {
    let rig = Rig::new("check").await;
    let dev = rig.device("dev-check-update", "");
    let check = |cfg: &Path| {
        let out = Command::new(BIN).args(["check", "--config"]).arg(cfg).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.lines().find(|l| l[5..].starts_with("update ")).map(str::to_string).unwrap_or_else(|| panic!("{text}"))
    };
    let l = check(&dev.cfg);
    assert_eq!(l, "ok   update       device type test-box, trust root v1 (1 release key), no update in flight");
    let cfg = read(&dev.cfg).replace(&rig.dir.join("root.json").display().to_string(), "/nonexistent/root.json");
    write(&dev.cfg, &cfg);
    let l = check(&dev.cfg);
    assert!(l.starts_with("FAIL update       this device has no trust root: /nonexistent/root.json"), "{l}");
}
