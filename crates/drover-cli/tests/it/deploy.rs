//! `drover deploy …` and `drover device list --artifact/--commit` against a real droverd, with
//! devices speaking the update protocol by hand over MQTT 5 with mutual TLS (rumqttc), the way
//! firmware would: they take the install command and report success or failure.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use drover_artifact::{Builder, Manifest, PayloadRole, Provenance, SigningKey};
use drover_proto::device::{Channel, topic};
use drover_proto::update::{Software, UpdateAction, UpdateCommand, UpdateReport, UpdateState};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use rumqttc::{TlsConfiguration, Transport};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::{Value, json};

use super::{Server, drover, fails, free_port, http, json, ok};

const COMMIT: &str = "4f1c2a9e8b7d6c5f4e3d2c1b0a9f8e7d6c5b4a39";

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

/// Builds a signed artifact with provenance and uploads it through the API; returns its id.
fn upload_artifact(s: &Server, name: &str, version: &str) -> String {
    let dir = s.dir.join(format!("artifact-{name}-{version}"));
    std::fs::create_dir_all(&dir).unwrap();
    let payload = dir.join("app.bin");
    std::fs::write(&payload, format!("{name} {version} ").repeat(2000)).unwrap();
    let mut m = Manifest::new(name, version, vec!["test-board".into()], "file");
    m.provenance = Some(Provenance {
        source: Some("https://git.example.com/edge-app".into()),
        commit: Some(COMMIT.into()),
        build_id: Some("ci-1234".into()),
        sbom: None,
    });
    let key = SigningKey::generate().unwrap();
    let file = dir.join("app.drover");
    Builder::new(m)
        .payload("app.bin", &payload, PayloadRole::Install)
        .build(std::fs::File::create(&file).unwrap(), &[&key])
        .unwrap();
    let mut resp = http()
        .post(&format!("{}/api/v1/artifacts", s.url))
        .header("Authorization", &format!("Bearer {}", s.admin_token))
        .header("Content-Type", "application/octet-stream")
        .send(std::fs::read(&file).unwrap())
        .unwrap();
    let v: Value = resp.body_mut().read_json().unwrap();
    assert_eq!(resp.status().as_u16(), 201, "upload: {v}");
    v["id"].as_str().unwrap().to_string()
}

/// A device enrolled through the API (pre-authorized, so accepted at once): id, key, cert.
struct Enrolled {
    id: String,
    key_pem: String,
    cert_pem: String,
}

fn enroll(s: &Server, serial: &str) -> Enrolled {
    api(s, "POST", "/devices/preauthorize", json!({"identities": [{"serial": serial}]}));
    let key = rcgen::KeyPair::generate().unwrap();
    let csr = rcgen::CertificateParams::default().serialize_request(&key).unwrap().pem().unwrap();
    let mut resp = http()
        .post(&format!("{}/api/v1/enroll", s.url))
        .send_json(json!({"csr_pem": csr, "identity": {"serial": serial}}))
        .unwrap();
    let v: Value = resp.body_mut().read_json().unwrap();
    assert_eq!(v["status"], "accepted", "{v}");
    Enrolled {
        id: v["device_id"].as_str().unwrap().to_string(),
        key_pem: key.serialize_pem(),
        cert_pem: v["certificate_pem"].as_str().unwrap().to_string(),
    }
}

/// What a scripted device answers to an install.
#[derive(Clone, Copy)]
enum Outcome {
    Succeed,
    Fail,
}

/// A device speaking the protocol by hand: status, hello, then an answer to every install:
/// downloading with progress, then success (with what it now runs) or failure with a log.
struct FakeDevice {
    /// The device's task; it ends with its runtime.
    _rt: tokio::runtime::Runtime,
}

impl FakeDevice {
    fn connect(s: &Server, mqtt_port: u16, d: &Enrolled, outcome: Outcome) -> FakeDevice {
        let ca_pem = std::fs::read_to_string(s.dir.join("data").join("ca").join("fleet-ca.crt")).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap()).unwrap();
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(d.cert_pem.as_bytes()).unwrap()],
                PrivateKeyDer::from_pem_slice(d.key_pem.as_bytes()).unwrap(),
            )
            .unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let id = d.id.clone();
        rt.spawn(async move {
            let mut opts = MqttOptions::new(&id, "localhost", mqtt_port);
            opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(Arc::new(tls))));
            opts.set_keep_alive(Duration::from_secs(30));
            let (client, mut eventloop) = AsyncClient::new(opts, 16);
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        // Subscribed before hello: the server answers hello with the install.
                        let _ = client.subscribe(topic(&id, Channel::Update), QoS::AtLeastOnce).await;
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        let online = r#"{"v":1,"state":"online"}"#;
                        let _ = client.publish(topic(&id, Channel::Status), QoS::AtLeastOnce, true, online).await;
                        let hello = r#"{"v":1,"agent":"cli-test/1"}"#;
                        let _ = client.publish(topic(&id, Channel::Hello), QoS::AtLeastOnce, false, hello).await;
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let Ok(cmd) = serde_json::from_slice::<UpdateCommand>(&p.payload) else { continue };
                        let UpdateAction::Install { artifact, .. } = cmd.action else { continue };
                        let mut reports = Vec::new();
                        let mut r = UpdateReport::new(&cmd.deployment, UpdateState::Downloading);
                        (r.bytes, r.total) = (Some(artifact.size / 2), Some(artifact.size));
                        reports.push(r);
                        reports.push(match outcome {
                            Outcome::Succeed => {
                                let mut r = UpdateReport::new(&cmd.deployment, UpdateState::Success);
                                r.software = Some(Software {
                                    artifact: Some(artifact.id.clone()),
                                    name: artifact.name.clone(),
                                    version: artifact.version.clone(),
                                });
                                r
                            }
                            Outcome::Fail => {
                                let mut r = UpdateReport::new(&cmd.deployment, UpdateState::Failure);
                                r.message = Some("digest mismatch in app.bin".into());
                                r.log = Some("downloading app.bin\nverifying app.bin: digest mismatch\n".into());
                                r
                            }
                        });
                        for r in reports {
                            let body = serde_json::to_vec(&r).unwrap();
                            let _ =
                                client.publish(topic(&id, Channel::UpdateReport), QoS::AtLeastOnce, false, body).await;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(300)).await,
                }
            }
        });
        FakeDevice { _rt: rt }
    }
}

/// Waits until `pred` holds on the device's API view.
fn device_becomes(s: &Server, id: &str, what: &str, pred: impl Fn(&Value) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let v = api(s, "GET", &format!("/devices/{id}"), Value::Null);
        if pred(&v) {
            return;
        }
        assert!(Instant::now() < deadline, "device {id} never became {what}: {v}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `drover` started in the background (for `--wait` while another command acts).
fn spawn_drover(cfg: &Path, env: &[(&str, &str)], args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_drover"))
        .args(args)
        .env("DROVER_CONFIG", cfg)
        .env_remove("DROVER_URL")
        .env_remove("DROVER_TOKEN")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn deploy_to_a_group_wait_for_a_failure_and_trace_what_devices_run() {
    let mqtt = free_port();
    let s = Server::start_on(&format!("127.0.0.1:{mqtt}"));
    let cfg = s.config_path("deploy");
    let admin = [("DROVER_URL", s.url.as_str()), ("DROVER_TOKEN", s.admin_token.as_str())];
    let run = |args: &[&str]| drover(&cfg, &admin, args, None);

    let good = enroll(&s, "SN-OK");
    let bad = enroll(&s, "SN-BAD");
    ok(&run(&["group", "create", "lab"]));
    ok(&run(&["group", "add", "lab", &good.id, &bad.id]));
    let _good_dev = FakeDevice::connect(&s, mqtt, &good, Outcome::Succeed);
    let _bad_dev = FakeDevice::connect(&s, mqtt, &bad, Outcome::Fail);
    for d in [&good.id, &bad.id] {
        device_becomes(&s, d, "online", |v| v["online"] == true);
    }
    let artifact = upload_artifact(&s, "edge-app", "1.0.0");

    // Mistakes are told before anything is deployed.
    let out = run(&["deploy", "create", "--artifact", "edge-app@1.0.0"]);
    assert_eq!(out.status.code(), Some(2), "no target is a usage error");
    let err = fails(&run(&["deploy", "create", "--artifact", "edge-app@1.0.0", "--filter", "tag.a = "]));
    assert!(err.contains("invalid filter"), "{err}");
    let err = fails(&run(&["deploy", "create", "--artifact", "edge-app@9.9", "--group", "lab"]));
    assert!(err.contains("no artifact \"edge-app@9.9\""), "{err}");
    let err = fails(&run(&[
        "deploy",
        "create",
        "--artifact",
        "edge-app@1.0.0",
        "--group",
        "lab",
        "--wait",
        "--timeout",
        "1d",
    ]));
    assert!(err.contains("invalid timeout \"1d\""), "{err}");
    let help = ok(&run(&["deploy", "create", "--help"]));
    assert!(help.contains("3  the deployment failed") && help.contains("5  --timeout passed"), "{help}");

    // --wait follows it to the end and says how it ended in the exit code: one device failed.
    let out = run(&["deploy", "create", "--artifact", "edge-app@1.0.0", "--group", "lab", "--wait", "--timeout", "60"]);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(
        out.status.code(),
        Some(3),
        "a failed deployment exits 3: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("target:") && stdout.contains("group:lab"), "the deployment first: {stdout}");
    assert!(stdout.contains("2/2 done (1 ok, 1 failed)"), "a progress line per change, not a redrawn bar: {stdout}");
    assert!(!stdout.contains('\r'), "no redrawing when stdout is not a terminal: {stdout:?}");
    assert!(stdout.contains("failed devices (1):") && stdout.contains("digest mismatch in app.bin"), "{stdout}");
    let id = stdout.lines().find_map(|l| l.strip_prefix("id:")).unwrap().trim().to_string();
    assert!(
        stdout.trim_end().ends_with(&format!("deployment {id} failed"))
            || stdout.contains(&format!("deployment {id} failed at")),
        "{stdout}"
    );

    // The record, its devices, the failed device's log.
    let d = json(&run(&["deploy", "show", &id, "-o", "json"]));
    assert_eq!((d["status"].as_str(), d["total"].as_u64()), (Some("failed"), Some(2)));
    assert_eq!(d["counts"], json!({"success": 1, "failure": 1}));
    assert_eq!(d["artifact"]["id"], artifact.as_str());
    let shown = ok(&run(&["deploy", "show", &id]));
    assert!(shown.contains("edge-app 1.0.0") && shown.contains("success 1, failure 1"), "{shown}");
    let listed = json(&run(&["deploy", "list", "--status", "failed", "-o", "json"]));
    assert_eq!(listed[0]["id"], id.as_str());
    assert!(json(&run(&["deploy", "list", "--status", "active", "-o", "json"])).as_array().unwrap().is_empty());
    let table = ok(&run(&["deploy", "list"]));
    assert!(table.starts_with("ID") && table.contains("edge-app@1.0.0") && table.contains("2/2"), "{table}");
    let err = fails(&run(&["deploy", "list", "--status", "done"]));
    assert!(err.contains("use active, succeeded, failed or aborted"), "{err}");

    let failed = json(&run(&["deploy", "devices", &id, "--state", "failure", "-o", "json"]));
    assert_eq!(failed.as_array().unwrap().len(), 1);
    assert_eq!((failed[0]["device_id"].as_str(), failed[0]["has_log"].as_bool()), (Some(bad.id.as_str()), Some(true)));
    let table = ok(&run(&["deploy", "devices", &id]));
    assert!(table.starts_with("DEVICE") && table.contains("success") && table.contains("digest mismatch"), "{table}");
    let err = fails(&run(&["deploy", "devices", &id, "--state", "broken"]));
    assert!(err.contains("unknown update state \"broken\""), "{err}");
    let log = ok(&run(&["deploy", "log", &id, &bad.id]));
    assert_eq!(log, "downloading app.bin\nverifying app.bin: digest mismatch\n");
    let err = fails(&run(&["deploy", "show", "no-such-deployment"]));
    assert!(
        err.contains("no deployment with id \"no-such-deployment\"") && err.contains("drover deploy list"),
        "{err}"
    );

    // --watch on a finished deployment prints where it ended and exits as --wait would.
    let out = run(&["deploy", "show", &id, "--watch"]);
    assert_eq!(out.status.code(), Some(3));
    // Aborting a finished deployment is refused with the server's reason.
    let err = fails(&run(&["deploy", "abort", &id]));
    assert!(err.contains("has finished"), "{err}");

    // Traceability: which devices run the artifact, or a build of the commit.
    for filter in [["--artifact", "edge-app@1.0.0"], ["--artifact", artifact.as_str()], ["--commit", &COMMIT[..8]]] {
        let found = json(&run(&["device", "list", filter[0], filter[1], "-o", "json"]));
        let ids: Vec<&str> = found.as_array().unwrap().iter().map(|d| d["id"].as_str().unwrap()).collect();
        assert_eq!(ids, [good.id.as_str()], "{filter:?}");
    }
    assert!(json(&run(&["device", "list", "--commit", "0000000", "-o", "json"])).as_array().unwrap().is_empty());
    let table = ok(&run(&["device", "list", "--artifact", "edge-app"]));
    assert!(table.contains("edge-app@1.0.0") && table.contains("SOFTWARE"), "{table}");
    let shown = ok(&run(&["device", "show", &good.id]));
    assert!(shown.contains(&format!("edge-app 1.0.0 (artifact {artifact})")), "{shown}");
    assert!(shown.contains("provenance:") && shown.contains(COMMIT) && shown.contains("ci-1234"), "{shown}");

    // The artifacts on the server, beside the offline `artifact` commands.
    let listed = json(&run(&["artifact", "list", "-o", "json"]));
    assert_eq!(listed[0]["id"], artifact.as_str());
    let table = ok(&run(&["artifact", "list", "--name", "edge-app"]));
    assert!(table.starts_with("NAME") && table.contains("1.0.0") && table.contains("test-board"), "{table}");
    let shown = ok(&run(&["artifact", "show", "edge-app@1.0.0"]));
    assert!(shown.contains(&artifact) && shown.contains(COMMIT) && shown.contains("app.bin"), "{shown}");
    let err = fails(&run(&["artifact", "show", "edge-app@0.0.1"]));
    assert!(err.contains("no artifact \"edge-app@0.0.1\" on the server"), "{err}");

    // A deployment every device takes exits 0.
    upload_artifact(&s, "edge-app", "1.0.1");
    let out = run(&["deploy", "create", "--artifact", "edge-app@1.0.1", "--devices", &good.id, "--wait", "-o", "json"]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let d: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((d["status"].as_str(), d["target"].as_str()), (Some("succeeded"), Some("devices")));
    assert!(String::from_utf8_lossy(&out.stderr).contains("1/1 done"), "with -o json the progress goes to stderr");
}

#[test]
fn deploy_abort_timeout_and_roles() {
    let s = Server::start();
    let cfg = s.config_path("abort");
    let admin = [("DROVER_URL", s.url.as_str()), ("DROVER_TOKEN", s.admin_token.as_str())];
    let run = |args: &[&str]| drover(&cfg, &admin, args, None);
    // Devices that never connect: their part of a deployment stays pending.
    let a = enroll(&s, "SN-OFF-A");
    let b = enroll(&s, "SN-OFF-B");
    ok(&run(&["device", "tag", &a.id, "region=eu"]));
    ok(&run(&["device", "tag", &b.id, "region=eu"]));
    upload_artifact(&s, "edge-app", "2.0.0");

    let created = json(&run(&[
        "deploy",
        "create",
        "--artifact",
        "edge-app@2.0.0",
        "--filter",
        "tag.region = eu",
        "--name",
        "eu rollout",
        "-o",
        "json",
    ]));
    assert_eq!((created["name"].as_str(), created["status"].as_str()), (Some("eu rollout"), Some("active")));
    assert_eq!((created["total"].as_u64(), created["counts"]["pending"].as_u64()), (Some(2), Some(2)));
    let id = created["id"].as_str().unwrap().to_string();

    // In use by an unfinished deployment: the artifact stays, with the server's reason.
    let err = fails(&run(&["artifact", "delete", "edge-app@2.0.0"]));
    assert!(err.contains("unfinished deployment"), "{err}");

    // --timeout gives up with its own code; the deployment goes on.
    let started = Instant::now();
    let out = run(&["deploy", "show", &id, "--watch", "--timeout", "2"]);
    assert_eq!(out.status.code(), Some(5), "{}", String::from_utf8_lossy(&out.stdout));
    assert!(started.elapsed() < Duration::from_secs(15));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("timed out after") && stdout.contains("0/2 done | pending 2"), "{stdout}");

    // A viewer reads but cannot deploy or abort.
    let viewer_token = ok(&run(&["token", "create", "--name", "v", "--role", "viewer"])).trim().to_string();
    let viewer = [("DROVER_URL", s.url.as_str()), ("DROVER_TOKEN", viewer_token.as_str())];
    assert_eq!(json(&drover(&cfg, &viewer, &["deploy", "show", &id, "-o", "json"], None))["id"], id.as_str());
    let err = fails(&drover(&cfg, &viewer, &["deploy", "abort", &id], None));
    assert!(err.contains("permission denied"), "{err}");
    let err =
        fails(&drover(&cfg, &viewer, &["deploy", "create", "--artifact", "edge-app@2.0.0", "--devices", &a.id], None));
    assert!(err.contains("permission denied"), "{err}");

    // A pipeline waiting on a deployment someone aborts exits 4.
    let mut waiting = spawn_drover(&cfg, &admin, &["deploy", "show", &id, "--watch"]);
    // Its first progress line says it is following the deployment.
    let mut watch_out = std::io::BufReader::new(waiting.stdout.take().unwrap());
    let mut stdout = String::new();
    std::io::BufRead::read_line(&mut watch_out, &mut stdout).unwrap();
    assert!(!stdout.is_empty(), "drover deploy show --watch printed nothing");
    let aborted = json(&run(&["deploy", "abort", &id, "-o", "json"]));
    assert_eq!(aborted["status"], "aborted");
    let deadline = Instant::now() + Duration::from_secs(20);
    let code = loop {
        if let Some(status) = waiting.try_wait().unwrap() {
            break status.code();
        }
        assert!(Instant::now() < deadline, "drover deploy show --watch did not end after the abort");
        std::thread::sleep(Duration::from_millis(100));
    };
    std::io::Read::read_to_string(&mut watch_out, &mut stdout).unwrap();
    assert_eq!(code, Some(4), "{stdout}");
    assert!(
        stdout.contains("2/2 done (0 ok, 2 aborted)") && stdout.contains(&format!("deployment {id} aborted")),
        "{stdout}"
    );
    let devices = json(&run(&["deploy", "devices", &id, "-o", "json"]));
    assert!(
        devices.as_array().unwrap().iter().all(|d| d["state"] == "aborted" && d["message"] == "aborted by an operator")
    );
    // Aborting again changes nothing; it is not an error.
    assert_eq!(json(&run(&["deploy", "abort", &id, "-o", "json"]))["status"], "aborted");
    let err = fails(&run(&["deploy", "log", &id, &a.id]));
    assert!(err.contains(&format!("drover deploy devices {id}")), "{err}");
    // create --wait on an abort made elsewhere: exit 4 too (the table output first shows the record).
    let waiting = spawn_drover(
        &cfg,
        &admin,
        &["deploy", "create", "--artifact", "edge-app@2.0.0", "--devices", &format!("{},{}", a.id, b.id), "--wait"],
    );
    let active = (0..100)
        .find_map(|_| {
            let list = json(&run(&["deploy", "list", "--status", "active", "-o", "json"]));
            let id = list.as_array().unwrap().first().map(|d| d["id"].as_str().unwrap().to_string());
            if id.is_none() {
                std::thread::sleep(Duration::from_millis(100));
            }
            id
        })
        .expect("the new deployment is listed as active");
    ok(&run(&["deploy", "abort", &active]));
    let out = waiting.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(4), "{}", String::from_utf8_lossy(&out.stdout));
    assert!(String::from_utf8_lossy(&out.stdout).contains("target:"));

    // Every deployment of it finished: the artifact can go (a viewer cannot make it go).
    let err = fails(&drover(&cfg, &viewer, &["artifact", "delete", "edge-app@2.0.0"], None));
    assert!(err.contains("permission denied"), "{err}");
    let out = ok(&run(&["artifact", "delete", "edge-app@2.0.0"]));
    assert!(out.starts_with("deleted artifact edge-app 2.0.0"), "{out}");
    assert!(json(&run(&["artifact", "list", "-o", "json"])).as_array().unwrap().is_empty());
}
