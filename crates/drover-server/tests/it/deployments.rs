//! Deployments: the API on every backend (targets, counts, paging, abort, roles), the
//! engine's handling of reports (final states stay final, software, the deployment's end),
//! and the whole path with devices speaking the protocol over MQTT to a real droverd —
//! install on connect, an offline device served when it says hello, one deployment at a time
//! per device, and a droverd restarted in the middle of a deployment.
//!
//! Bad input tried here: an empty target, unknown and pending devices, two targets at once,
//! an unknown artifact, a viewer creating or aborting, reports for a deployment the device is
//! not in, a late progress report after a final one, aborting a finished deployment.

use std::time::{Duration, Instant};

use axum::http::{Method, StatusCode};
use drover_artifact::SigningKey;
use drover_proto::update::{Software, UpdateReport, UpdateState};
use serde_json::{Value, json};

use crate::artifacts::{accepted_device, build_artifact, sha256_hex, upload};
use crate::each_backend;
use crate::support::TestApp;

async fn uploaded(app: &TestApp, token: &str, name: &str, version: &str, commit: Option<&str>) -> String {
    let key = SigningKey::generate().unwrap();
    let file = build_artifact(name, version, format!("{name} {version}").as_bytes(), &[&key], commit);
    let r = upload(app, token, file.clone(), &[]).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    sha256_hex(&file)
}

async fn create(app: &TestApp, token: &str, body: Value) -> crate::support::Resp {
    app.call(Method::POST, "/api/v1/deployments", Some(token), Some(body)).await
}

fn report(dep: &str, state: UpdateState) -> UpdateReport {
    UpdateReport::new(dep, state)
}

#[tokio::test]
async fn deployments_target_devices_groups_and_filters_and_can_be_aborted() {
    each_backend!(|app| {
        let operator = app.token("operator").await;
        let viewer = app.token("viewer").await;
        let art = uploaded(&app, &operator, "edge-app", "1.0.0", None).await;
        let mut ids = Vec::new();
        for i in 0..4 {
            ids.push(accepted_device(&app, &format!("SN-DEP-{i}")).await.0);
        }
        for id in &ids[..2] {
            let r = app
                .call(
                    Method::PUT,
                    &format!("/api/v1/devices/{id}/tags"),
                    Some(&operator),
                    Some(json!({"tags": {"ring": "canary"}})),
                )
                .await;
            assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        }
        let r = create(&app, &operator, json!({"artifact": art, "devices": [ids[0], "no-such-device"]})).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        assert!(r.text.contains("no-such-device"), "{}", r.text);
        let r = create(&app, &operator, json!({"artifact": art, "devices": [ids[0]], "filter": "online"})).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        let r = create(&app, &operator, json!({"artifact": art, "filter": "tag.ring = nowhere"})).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        assert!(r.text.contains("no accepted device"), "{}", r.text);
        let r = create(&app, &operator, json!({"artifact": "nothing@1", "devices": [ids[0]]})).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        let pending =
            crate::devices::enroll(&app, &crate::devices::device_csr(), json!({"serial": "SN-WAIT"}), None).await;
        let pending_id = pending.body["device_id"].as_str().unwrap();
        let r = create(&app, &operator, json!({"artifact": art, "devices": [pending_id]})).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        assert!(r.text.contains("only accepted devices"), "{}", r.text);
        assert_eq!(
            create(&app, &viewer, json!({"artifact": art, "devices": [ids[0]]})).await.status,
            StatusCode::FORBIDDEN
        );

        // By device ids, by NAME@VERSION.
        let r = create(&app, &operator, json!({"artifact": "edge-app@1.0.0", "devices": [ids[3], ids[3]]})).await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        assert_eq!(r.body["total"], 1);
        assert_eq!(r.body["name"], "edge-app 1.0.0");
        assert_eq!(r.body["target"], "devices");
        assert_eq!(r.body["status"], "active");
        assert_eq!(r.body["counts"], json!({"pending": 1}));
        let by_ids = r.body["id"].as_str().unwrap().to_string();
        // By a dynamic filter.
        let r = create(&app, &operator, json!({"artifact": art, "filter": "tag.ring = canary", "name": "canary ring"}))
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        assert_eq!(r.body["total"], 2);
        assert_eq!(r.body["target"], "filter:tag.ring = canary");
        let canary = r.body["id"].as_str().unwrap().to_string();
        // By a static group and by a dynamic group.
        let g = app.admin(Method::POST, "/api/v1/groups", Some(json!({"name": "lab", "kind": "static"}))).await;
        let gid = g.body["id"].as_str().unwrap().to_string();
        app.admin(Method::POST, &format!("/api/v1/groups/{gid}/devices"), Some(json!({"devices": [ids[1], ids[2]]})))
            .await;
        let r = create(&app, &operator, json!({"artifact": art, "group": "lab"})).await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        assert_eq!((r.body["total"].clone(), r.body["target"].clone()), (json!(2), json!("group:lab")));
        let lab = r.body["id"].as_str().unwrap().to_string();
        app.admin(
            Method::POST,
            "/api/v1/groups",
            Some(json!({"name": "all", "kind": "dynamic", "filter": "status = accepted"})),
        )
        .await;
        let r = create(&app, &operator, json!({"artifact": art, "group": "all"})).await;
        assert_eq!(r.body["total"], 4, "{}", r.text);
        let all = r.body["id"].as_str().unwrap().to_string();
        assert_eq!(
            create(&app, &operator, json!({"artifact": art, "group": "nope"})).await.status,
            StatusCode::BAD_REQUEST
        );

        // Listed newest first, paged, by status; devices paged and by state.
        let r = app.call(Method::GET, "/api/v1/deployments?limit=3", Some(&viewer), None).await;
        let got: Vec<&str> = r.body["items"].as_array().unwrap().iter().map(|d| d["id"].as_str().unwrap()).collect();
        assert_eq!(got, [all.as_str(), lab.as_str(), canary.as_str()]);
        let cursor = r.body["next_cursor"].as_str().unwrap().to_string();
        let r =
            app.call(Method::GET, &format!("/api/v1/deployments?limit=3&cursor={cursor}"), Some(&viewer), None).await;
        assert_eq!(r.body["items"][0]["id"], by_ids.as_str());
        assert!(r.body["next_cursor"].is_null());
        let r = app.call(Method::GET, &format!("/api/v1/deployments/{all}/devices?limit=3"), Some(&viewer), None).await;
        assert_eq!(r.body["items"].as_array().unwrap().len(), 3);
        let cursor = r.body["next_cursor"].as_str().unwrap().to_string();
        let r2 = app
            .call(
                Method::GET,
                &format!("/api/v1/deployments/{all}/devices?limit=3&cursor={cursor}"),
                Some(&viewer),
                None,
            )
            .await;
        assert_eq!(r2.body["items"].as_array().unwrap().len(), 1);

        // Reports move the counts; a failure's log is kept.
        let engine = &app.state.engine;
        engine.on_report(&ids[0], report(&canary, UpdateState::Downloading)).await.unwrap();
        let mut failed = report(&canary, UpdateState::Failure);
        failed.message = Some("signature check failed".into());
        failed.log = Some("step 1\nstep 2: bad signature\n".into());
        engine.on_report(&ids[1], failed).await.unwrap();
        let r = app.call(Method::GET, &format!("/api/v1/deployments/{canary}"), Some(&viewer), None).await;
        assert_eq!(r.body["counts"], json!({"downloading": 1, "failure": 1}));
        let r = app
            .call(Method::GET, &format!("/api/v1/deployments/{canary}/devices?state=failure"), Some(&viewer), None)
            .await;
        assert_eq!(r.body["items"][0]["device_id"], ids[1].as_str());
        assert_eq!(r.body["items"][0]["message"], "signature check failed");
        assert_eq!(r.body["items"][0]["has_log"], true);
        let r = app
            .call(Method::GET, &format!("/api/v1/deployments/{canary}/devices/{}/log", ids[1]), Some(&viewer), None)
            .await;
        assert_eq!(r.body["log"], "step 1\nstep 2: bad signature\n");
        let r = app
            .call(Method::GET, &format!("/api/v1/deployments/{canary}/devices/{}/log", ids[0]), Some(&viewer), None)
            .await;
        assert_eq!(r.status, StatusCode::NOT_FOUND);

        // Abort: the pending device at once; the downloading one is told to stop and stays
        // until it reports; then the deployment is finished (aborted).
        assert_eq!(
            app.call(Method::POST, &format!("/api/v1/deployments/{canary}/abort"), Some(&viewer), None).await.status,
            StatusCode::FORBIDDEN
        );
        let r = app.call(Method::POST, &format!("/api/v1/deployments/{lab}/abort"), Some(&operator), None).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        assert_eq!(r.body["status"], "aborted");
        assert_eq!(r.body["counts"], json!({"aborted": 2}));
        assert!(r.body["finished_at"].is_string());
        let r = app.call(Method::POST, &format!("/api/v1/deployments/{canary}/abort"), Some(&operator), None).await;
        assert_eq!(r.body["status"], "aborted");
        assert_eq!(r.body["counts"], json!({"downloading": 1, "failure": 1}));
        assert!(r.body["finished_at"].is_null(), "a device is still downloading");
        engine.on_report(&ids[0], report(&canary, UpdateState::Aborted)).await.unwrap();
        let r = app.call(Method::GET, &format!("/api/v1/deployments/{canary}"), Some(&viewer), None).await;
        assert!(r.body["finished_at"].is_string(), "{}", r.body);
        assert_eq!(r.body["status"], "aborted");
        let r = app.call(Method::GET, "/api/v1/deployments?status=aborted", Some(&viewer), None).await;
        assert_eq!(r.body["items"].as_array().unwrap().len(), 2);
        // The abort is audited; a finished one cannot be aborted.
        let r = app.admin(Method::GET, "/api/v1/audit?action=deployment.", None).await;
        assert_eq!(r.body["items"].as_array().unwrap().len(), 6, "{}", r.body);
        engine.on_report(&ids[3], report(&by_ids, UpdateState::Success)).await.unwrap();
        let r = app.call(Method::POST, &format!("/api/v1/deployments/{by_ids}/abort"), Some(&operator), None).await;
        assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.text);
    });
}

#[tokio::test]
async fn reports_keep_final_states_final_and_set_what_devices_run() {
    each_backend!(|app| {
        let operator = app.token("operator").await;
        let art =
            uploaded(&app, &operator, "edge-app", "1.4.2", Some("89abcdef0123456789abcdef0123456789abcdef")).await;
        let (a, _, _) = accepted_device(&app, "SN-R-A").await;
        let (b, _, _) = accepted_device(&app, "SN-R-B").await;
        let (c, _, _) = accepted_device(&app, "SN-R-C").await;
        let r = create(&app, &operator, json!({"artifact": art, "devices": [a, b]})).await;
        let dep = r.body["id"].as_str().unwrap().to_string();
        let engine = &app.state.engine;

        // Not in the deployment, or no such deployment: ignored.
        engine.on_report(&c, report(&dep, UpdateState::Success)).await.unwrap();
        engine.on_report(&a, report("0193f2c4-0000-7000-8000-000000000000", UpdateState::Success)).await.unwrap();
        let mut progress = report(&dep, UpdateState::Downloading);
        (progress.bytes, progress.total) = (Some(1000), Some(5000));
        engine.on_report(&a, progress.clone()).await.unwrap();
        engine.on_report(&a, report(&dep, UpdateState::Installing)).await.unwrap();
        engine.on_report(&a, report(&dep, UpdateState::Success)).await.unwrap();
        // Late: a progress report after success changes nothing.
        engine.on_report(&a, progress).await.unwrap();
        let r = app.admin(Method::GET, &format!("/api/v1/deployments/{dep}/devices"), None).await;
        let a_row = r.body["items"].as_array().unwrap().iter().find(|d| d["device_id"] == a.as_str()).unwrap().clone();
        assert_eq!(a_row["state"], "success");
        assert_eq!((a_row["bytes"].clone(), a_row["total"].clone()), (json!(1000), json!(5000)));
        let r = app.admin(Method::GET, &format!("/api/v1/devices/{a}"), None).await;
        assert_eq!(r.body["software"], json!({"artifact": art, "name": "edge-app", "version": "1.4.2"}));
        assert_eq!(r.body["artifact"]["provenance"]["commit"], "89abcdef0123456789abcdef0123456789abcdef");
        let events: Vec<&str> =
            r.body["recent_events"].as_array().unwrap().iter().map(|e| e["detail"].as_str().unwrap()).collect();
        assert!(events.iter().any(|e| e.contains("edge-app 1.4.2: success")), "{events:?}");
        let r = app.admin(Method::GET, &format!("/api/v1/deployments/{dep}"), None).await;
        assert_eq!(r.body["status"], "active");

        // B rolls back, reporting what it runs: the deployment ends failed.
        let mut rolled = report(&dep, UpdateState::RolledBack);
        rolled.message = Some("health check failed".into());
        rolled.software = Some(Software { artifact: None, name: "edge-app".into(), version: "1.4.1".into() });
        engine.on_report(&b, rolled).await.unwrap();
        let r = app.admin(Method::GET, &format!("/api/v1/deployments/{dep}"), None).await;
        assert_eq!(r.body["status"], "failed");
        assert!(r.body["finished_at"].is_string());
        assert_eq!(r.body["counts"], json!({"success": 1, "rolled-back": 1}));
        let r = app.admin(Method::GET, &format!("/api/v1/devices/{b}"), None).await;
        assert_eq!(r.body["software"], json!({"name": "edge-app", "version": "1.4.1"}));
        assert!(r.body.get("artifact").is_none(), "{}", r.body);

        // Traceability: who runs what.
        let list = |q: String| {
            let app = &app;
            async move {
                let r = app.admin(Method::GET, &format!("/api/v1/devices?{q}"), None).await;
                assert_eq!(r.status, StatusCode::OK, "{q}: {}", r.text);
                let mut v: Vec<String> =
                    r.body["items"].as_array().unwrap().iter().map(|d| d["id"].as_str().unwrap().to_string()).collect();
                v.sort();
                v
            }
        };
        assert_eq!(list(format!("artifact={art}")).await, vec![a.clone()]);
        assert_eq!(list("artifact=edge-app@1.4.2".into()).await, vec![a.clone()]);
        let mut both = vec![a.clone(), b.clone()];
        both.sort();
        assert_eq!(list("artifact=edge-app".into()).await, both);
        assert_eq!(list("commit=89abcdef".into()).await, vec![a.clone()]);
        assert_eq!(list("commit=89ABCDEF0123456789abcdef0123456789abcdef".into()).await, vec![a.clone()]);
        assert!(list("commit=0000000".into()).await.is_empty());
        let r = app.admin(Method::GET, "/api/v1/devices?commit=abc", None).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        // The same in the filter language (docs/filters.md).
        let filter = |f: &str| {
            let enc: String = f
                .chars()
                .map(|ch| match ch {
                    ' ' => "%20".to_string(),
                    '=' => "%3D".into(),
                    '"' => "%22".into(),
                    '*' => "%2A".into(),
                    '~' => "%7E".into(),
                    '!' => "%21".into(),
                    c => c.to_string(),
                })
                .collect();
            format!("filter={enc}")
        };
        assert_eq!(list(filter(r#"artifact.commit ~ "89ABCDEF*""#)).await, vec![a.clone()]);
        assert_eq!(list(filter("artifact.version = 1.4.1")).await, vec![b.clone()]);
        assert_eq!(list(filter("artifact.name != edge-app")).await, vec![c.clone()]);
        assert_eq!(list(filter(&format!("artifact.id = {art}"))).await, vec![a.clone()]);

        // A decommissioned device ends its unfinished rows (aborted), so deployments finish —
        // as failed: not every device got the artifact.
        let r = create(&app, &operator, json!({"artifact": art, "devices": [c]})).await;
        let dep2 = r.body["id"].as_str().unwrap().to_string();
        let r = app.admin(Method::POST, &format!("/api/v1/devices/{c}/decommission"), None).await;
        assert_eq!(r.status, StatusCode::OK);
        let r = app.admin(Method::GET, &format!("/api/v1/deployments/{dep2}"), None).await;
        assert_eq!((r.body["status"].clone(), r.body["counts"].clone()), (json!("failed"), json!({"aborted": 1})));
    });
}

// ---------------------------------------------------------------------------------------
// Devices speaking the protocol over MQTT to a real droverd.

use crate::fleet::{DeviceKey, Droverd, admin_token, client_tls, droverd_cli, enroll_https, post};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{LastWill, Packet};
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use rumqttc::{TlsConfiguration, Transport};
use tokio::sync::mpsc;

/// A device written against docs/protocol.md with rumqttc: subscribes to its downlink,
/// announces itself (with what it runs), hands every `down/update` to the test.
struct UpdateDevice {
    id: String,
    client: AsyncClient,
    commands: mpsc::UnboundedReceiver<Value>,
    task: tokio::task::JoinHandle<()>,
}

impl UpdateDevice {
    fn connect(
        id: &str,
        port: u16,
        tls: std::sync::Arc<rustls::ClientConfig>,
        software: Option<Value>,
    ) -> UpdateDevice {
        let mut opts = MqttOptions::new(id, "localhost", port);
        opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls)));
        opts.set_keep_alive(Duration::from_secs(30));
        let status = format!("drover/v1/d/{id}/up/status");
        opts.set_last_will(LastWill::new(&status, r#"{"v":1,"state":"offline"}"#, QoS::AtLeastOnce, true, None));
        let (client, mut eventloop) = AsyncClient::new(opts, 32);
        let (tx, commands) = mpsc::unbounded_channel();
        let (c, id2) = (client.clone(), id.to_string());
        let task = tokio::spawn(async move {
            let id = id2;
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        let up = |ch: &str| format!("drover/v1/d/{id}/up/{ch}");
                        let _ = c.try_subscribe(format!("drover/v1/d/{id}/down/#"), QoS::AtLeastOnce);
                        let _ = c.try_publish(up("status"), QoS::AtLeastOnce, true, r#"{"v":1,"state":"online"}"#);
                        let mut hello = json!({"v": 1, "agent": "update-test/1"});
                        if let Some(sw) = &software {
                            hello["software"] = sw.clone();
                        }
                        let _ = c.try_publish(up("hello"), QoS::AtLeastOnce, false, hello.to_string());
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        if p.topic.ends_with(b"/down/update")
                            && let Ok(v) = serde_json::from_slice::<Value>(&p.payload)
                        {
                            let _ = tx.send(v);
                        }
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(300)).await,
                }
            }
        });
        UpdateDevice { id: id.to_string(), client, commands, task }
    }

    async fn command(&mut self, what: &str) -> Value {
        tokio::time::timeout(Duration::from_secs(20), self.commands.recv())
            .await
            .unwrap_or_else(|_| panic!("device {} timed out waiting for {what}", self.id))
            .unwrap()
    }

    /// Waits for an install of `deployment` (repeats of others are skipped).
    async fn install_of(&mut self, deployment: &str) -> Value {
        loop {
            let c = self.command(&format!("the install of {deployment}")).await;
            if c["deployment"] == deployment && c["action"] == "install" {
                return c;
            }
            assert_ne!(c["action"], "install", "{} got an install of another deployment while waiting: {c}", self.id);
        }
    }

    async fn report(&self, v: Value) {
        let topic = format!("drover/v1/d/{}/up/update", self.id);
        self.client.publish(topic, QoS::AtLeastOnce, false, v.to_string()).await.unwrap();
    }

    /// Asserts nothing is sent to the device for a while.
    async fn nothing_for(&mut self, d: Duration) {
        if let Ok(Some(c)) = tokio::time::timeout(d, self.commands.recv()).await {
            panic!("{} got an unexpected command: {c}", self.id);
        }
    }
}

fn get_json(url: &str, token: &str) -> Value {
    crate::e2e::get_json(url, Some(token)).1
}

async fn api_get(base: &str, path: &str, token: &str) -> Value {
    let (url, token) = (format!("{base}{path}"), token.to_string());
    tokio::task::spawn_blocking(move || get_json(&url, &token)).await.unwrap()
}

async fn until(base: &str, path: &str, token: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let v = api_get(base, path, token).await;
        if pred(&v) {
            return v;
        }
        assert!(Instant::now() < deadline, "never {what}: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Downloads what an install points at, over HTTPS with the device's certificate.
async fn download(dev_port: u16, ca: &str, key: &str, cert: &str, install: &Value) -> Vec<u8> {
    let url = format!("https://localhost:{dev_port}{}", install["artifact"]["path"].as_str().unwrap());
    let agent = crate::artifacts::https(ca, Some((key, cert)));
    tokio::task::spawn_blocking(move || {
        let resp = agent.get(&url).call().unwrap();
        assert_eq!(resp.status().as_u16(), 200);
        resp.into_body().with_config().limit(1 << 30).read_to_vec().unwrap()
    })
    .await
    .unwrap()
}

fn upload_http(base: &str, token: &str, file: Vec<u8>) -> Value {
    let resp = crate::e2e::agent()
        .post(&format!("{base}/api/v1/artifacts"))
        .header("Authorization", &format!("Bearer {token}"))
        .header("Content-Type", "application/octet-stream")
        .send(&file[..])
        .unwrap();
    assert_eq!(resp.status().as_u16(), 201);
    resp.into_body().read_json().unwrap()
}

struct Enrolled {
    id: String,
    key: String,
    cert: String,
}

async fn enroll(dev: u16, ca: &str, secret: &str, serial: &str) -> Enrolled {
    let (ca, secret, serial) = (ca.to_string(), secret.to_string(), serial.to_string());
    tokio::task::spawn_blocking(move || {
        let key = DeviceKey::new();
        let (id, cert) = enroll_https(dev, &ca, &key, &serial, &secret);
        Enrolled { id, key: key.key.serialize_pem(), cert }
    })
    .await
    .unwrap()
}

/// The whole path on one database (`db_url`: None for droverd's own SQLite).
async fn end_to_end(db_url: Option<String>) {
    let dir = crate::support::TempDir::new("updates");
    let data = dir.path().join("data");
    let env: Vec<(&str, &str)> = db_url.as_deref().map(|u| vec![("DROVER_DATABASE_URL", u)]).unwrap_or_default();
    let mut server = Droverd::start(&data, None, &env);
    let (mqtt, dev) = (server.mqtt, server.dev);
    let base = server.base.clone();
    let token = {
        let data = data.clone();
        let url = db_url.clone();
        tokio::task::spawn_blocking(move || match url {
            None => admin_token(&data),
            Some(u) => {
                let out = std::process::Command::new(env!("CARGO_BIN_EXE_droverd"))
                    .arg("--data-dir")
                    .arg(&data)
                    .args(["--database-url", &u, "token", "create", "--role", "admin", "--name", "updates"])
                    .output()
                    .unwrap();
                String::from_utf8(out.stdout).unwrap().trim().to_string()
            }
        })
        .await
        .unwrap()
    };
    let ca = match &db_url {
        None => droverd_cli(&data, &["ca", "cert"]),
        Some(u) => droverd_cli(&data, &["--database-url", u, "ca", "cert"]),
    };
    let (b2, t2) = (base.clone(), token.clone());
    let (status, t) =
        tokio::task::spawn_blocking(move || post(&b2, "/api/v1/enrollment-tokens", &t2, json!({"name": "factory"})))
            .await
            .unwrap();
    assert_eq!(status, 201, "{t}");
    let secret = t["secret"].as_str().unwrap().to_string();
    let a = enroll(dev, &ca, &secret, "SN-UP-A").await;
    let b = enroll(dev, &ca, &secret, "SN-UP-B").await;

    let key = SigningKey::generate().unwrap();
    let payload: Vec<u8> = (0..700_000u32).map(|i| (i % 241) as u8).collect();
    let v1 = build_artifact("edge-app", "2.0.0", &payload, &[&key], Some("fedcba9876543210fedcba9876543210fedcba98"));
    let v2 = build_artifact("edge-app", "2.1.0", b"the next one", &[&key], None);
    let (b2, t2, f1, f2) = (base.clone(), token.clone(), v1.clone(), v2.clone());
    let (art1, art2) =
        tokio::task::spawn_blocking(move || (upload_http(&b2, &t2, f1), upload_http(&b2, &t2, f2))).await.unwrap();
    let (id1, id2) = (art1["id"].as_str().unwrap().to_string(), art2["id"].as_str().unwrap().to_string());

    // A is online; B is not.
    let mut dev_a = UpdateDevice::connect(&a.id, mqtt, client_tls(&ca, &a.cert, &a.key), None);
    until(&base, &format!("/api/v1/devices/{}", a.id), &token, "A online", |v| v["online"] == true).await;
    let new_deployment = |body: Value| {
        let (b2, t2) = (base.clone(), token.clone());
        async move {
            let (status, d) =
                tokio::task::spawn_blocking(move || post(&b2, "/api/v1/deployments", &t2, body)).await.unwrap();
            assert_eq!(status, 201, "{d}");
            d["id"].as_str().unwrap().to_string()
        }
    };
    let d1 = new_deployment(json!({"artifact": id1, "devices": [a.id, b.id]})).await;
    // B's second deployment waits behind its first.
    let d2 = new_deployment(json!({"artifact": "edge-app@2.1.0", "devices": [b.id]})).await;

    // A gets the install at once, downloads, reports each step.
    let install = dev_a.install_of(&d1).await;
    assert_eq!(install["artifact"]["id"], id1.as_str());
    assert_eq!(install["artifact"]["size"], v1.len());
    let got = download(dev, &ca, &a.key, &a.cert, &install).await;
    assert_eq!(sha256_hex(&got), id1);
    dev_a.report(json!({"v": 1, "deployment": d1, "state": "downloading", "bytes": 0, "total": v1.len()})).await;
    dev_a
        .report(json!({"v": 1, "deployment": d1, "state": "downloading", "bytes": v1.len() / 2, "total": v1.len()}))
        .await;
    dev_a.report(json!({"v": 1, "deployment": d1, "state": "downloading", "bytes": v1.len(), "total": v1.len()})).await;
    until(&base, &format!("/api/v1/deployments/{d1}/devices?state=downloading"), &token, "A's progress written", |v| {
        v["items"][0]["bytes"] == v1.len()
    })
    .await;
    dev_a.report(json!({"v": 1, "deployment": d1, "state": "installing"})).await;
    dev_a.report(json!({"v": 1, "deployment": d1, "state": "verifying"})).await;
    let sw = json!({"artifact": id1, "name": "edge-app", "version": "2.0.0"});
    dev_a.report(json!({"v": 1, "deployment": d1, "state": "success", "software": sw})).await;
    let dep =
        until(&base, &format!("/api/v1/deployments/{d1}"), &token, "A's success", |v| v["counts"]["success"] == 1)
            .await;
    assert_eq!(dep["counts"], json!({"success": 1, "pending": 1}));
    assert_eq!(dep["status"], "active");
    let d = api_get(&base, &format!("/api/v1/devices/{}", a.id), &token).await;
    assert_eq!(d["software"], sw);
    let listed = api_get(&base, "/api/v1/devices?commit=fedcba98", &token).await;
    assert_eq!(listed["items"].as_array().unwrap().len(), 1);
    assert_eq!(listed["items"][0]["id"], a.id.as_str());
    dev_a.nothing_for(Duration::from_millis(300)).await;

    // B comes online later: its hello brings the first deployment, not the second.
    let mut dev_b = UpdateDevice::connect(&b.id, mqtt, client_tls(&ca, &b.cert, &b.key), None);
    let install = dev_b.install_of(&d1).await;
    dev_b.report(json!({"v": 1, "deployment": d1, "state": "downloading", "bytes": 1000, "total": v1.len()})).await;
    until(&base, &format!("/api/v1/deployments/{d1}"), &token, "B downloading", |v| v["counts"]["downloading"] == 1)
        .await;

    // droverd restarts in the middle: B reconnects, says hello, gets the install again.
    tokio::task::block_in_place(|| server.restart());
    let again = dev_b.install_of(&d1).await;
    assert_eq!(again, install, "the same command after the restart");
    let got = download(server.dev, &ca, &b.key, &b.cert, &again).await;
    assert_eq!(sha256_hex(&got), id1);
    dev_b.report(json!({"v": 1, "deployment": d1, "state": "installing"})).await;
    dev_b.report(json!({"v": 1, "deployment": d1, "state": "success"})).await;
    // Its first deployment final, the second follows at once.
    let next = dev_b.install_of(&d2).await;
    assert_eq!(next["artifact"]["id"], id2.as_str());
    let dep =
        until(&base, &format!("/api/v1/deployments/{d1}"), &token, "d1 succeeded", |v| v["status"] == "succeeded")
            .await;
    assert!(dep["finished_at"].is_string());
    // A late progress report for d1 changes nothing.
    dev_b.report(json!({"v": 1, "deployment": d1, "state": "downloading", "bytes": 5})).await;
    dev_b.report(json!({"v": 1, "deployment": d2, "state": "already-installed"})).await;
    until(&base, &format!("/api/v1/deployments/{d2}"), &token, "d2 succeeded", |v| v["status"] == "succeeded").await;
    let dep = api_get(&base, &format!("/api/v1/deployments/{d1}"), &token).await;
    assert_eq!(dep["counts"], json!({"success": 2}));
    let d = api_get(&base, &format!("/api/v1/devices/{}", b.id), &token).await;
    assert_eq!(d["software"]["version"], "2.1.0");
    assert_eq!(d["artifact"]["id"], id2.as_str());
    let metrics = tokio::task::spawn_blocking({
        let url = format!("{base}/metrics");
        move || crate::e2e::agent().get(&url).call().unwrap().into_body().read_to_string().unwrap()
    })
    .await
    .unwrap();
    assert!(metrics.contains("drover_artifact_bytes_served_total"), "{metrics}");
    dev_a.task.abort();
    dev_b.task.abort();
    tokio::task::block_in_place(|| server.stop());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_are_updated_over_mqtt_and_a_restart_resumes_the_deployment() {
    end_to_end(None).await;
    if let Some(base) = crate::support::pg_base_url() {
        eprintln!("— on postgres");
        let tdb = crate::support::TestDb::postgres(&base).await;
        end_to_end(Some(tdb.url.clone())).await;
        tdb.drop_schema().await;
    }
}

/// Commands each engine queued, as (device id, deployment, action), until `quiet` passes
/// without one.
async fn drain(
    rx: &mut tokio::sync::mpsc::Receiver<drover_server::engine::Outgoing>,
    quiet: Duration,
) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    while let Ok(Some(m)) = tokio::time::timeout(quiet, rx.recv()).await {
        let device = m.topic.split('/').nth(3).unwrap().to_string();
        let v: Value = serde_json::from_slice(&m.payload).unwrap();
        out.push((device, v["deployment"].as_str().unwrap().to_string(), v["action"].as_str().unwrap().to_string()));
    }
    out
}

/// Two droverd replicas on one database (design decision 3): a deployment's installs are
/// sent once each although both sweep at the same time; reports taken by either replica
/// finish the deployment and send each device its next one, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_share_the_work_and_send_each_command_once() {
    for tdb in crate::support::TestDb::all().await {
        let app = TestApp::new(&tdb).await;
        eprintln!("— on {}", app.label);
        let db2 = drover_server::db::Db::open(&tdb.url).await.unwrap();
        let replica2 = drover_server::app::AppState::new(db2.clone(), app.state.config.clone(), app.state.ca.clone());
        let (stop_tx, stop) = tokio::sync::watch::channel(false);
        let (tx1, mut rx1) = tokio::sync::mpsc::channel(10_000);
        let (tx2, mut rx2) = tokio::sync::mpsc::channel(10_000);
        app.state.engine.start_with(tx1, stop.clone());
        replica2.engine.start_with(tx2, stop.clone());

        let operator = app.token("operator").await;
        let art1 = uploaded(&app, &operator, "edge-app", "5.0.0", None).await;
        let art2 = uploaded(&app, &operator, "edge-app", "5.1.0", None).await;
        let mut ids = Vec::new();
        for i in 0..30 {
            let (id, _, _) = accepted_device(&app, &format!("SN-REP-{i}")).await;
            drover_server::presence::record_status(&app.db, &id, true, 1_000).await.unwrap();
            ids.push(id);
        }
        let r = create(&app, &operator, json!({"artifact": art1, "devices": ids})).await;
        let d1 = r.body["id"].as_str().unwrap().to_string();
        // Both replicas sweep while the creating one sends.
        let (e1, e2) = (app.state.engine.clone(), replica2.engine.clone());
        let sweeps: Vec<_> = (0..6)
            .map(|i| {
                let e = if i % 2 == 0 { e1.clone() } else { e2.clone() };
                tokio::spawn(async move { e.sweep().await.unwrap() })
            })
            .collect();
        for s in sweeps {
            s.await.unwrap();
        }
        let mut sent = drain(&mut rx1, Duration::from_millis(300)).await;
        sent.extend(drain(&mut rx2, Duration::from_millis(300)).await);
        sent.sort();
        let mut expected: Vec<(String, String, String)> =
            ids.iter().map(|id| (id.clone(), d1.clone(), "install".to_string())).collect();
        expected.sort();
        assert_eq!(sent, expected, "one install per device, from one replica or the other");

        // A second deployment to the same devices waits behind the first.
        let r = create(&app, &operator, json!({"artifact": art2, "devices": ids})).await;
        let d2 = r.body["id"].as_str().unwrap().to_string();
        e1.sweep().await.unwrap();
        e2.sweep().await.unwrap();
        assert!(drain(&mut rx1, Duration::from_millis(200)).await.is_empty());
        assert!(drain(&mut rx2, Duration::from_millis(200)).await.is_empty());

        // Final reports arrive at either replica, two at a time: each device gets its next
        // deployment once, and the first one ends.
        let mut tasks = Vec::new();
        for (i, id) in ids.iter().enumerate() {
            let e = if i % 2 == 0 { e1.clone() } else { e2.clone() };
            let (id, d1) = (id.clone(), d1.clone());
            tasks.push(tokio::spawn(async move { e.on_report(&id, report(&d1, UpdateState::Success)).await.unwrap() }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        e1.sweep().await.unwrap();
        e2.sweep().await.unwrap();
        let mut sent = drain(&mut rx1, Duration::from_millis(300)).await;
        sent.extend(drain(&mut rx2, Duration::from_millis(300)).await);
        sent.sort();
        let mut expected: Vec<(String, String, String)> =
            ids.iter().map(|id| (id.clone(), d2.clone(), "install".to_string())).collect();
        expected.sort();
        assert_eq!(sent, expected);
        let r = app.admin(Method::GET, &format!("/api/v1/deployments/{d1}"), None).await;
        assert_eq!((r.body["status"].clone(), r.body["counts"].clone()), (json!("succeeded"), json!({"success": 30})));

        // Progress through a running engine is merged and written within a flush.
        let mut p = report(&d2, UpdateState::Downloading);
        e1.on_report(&ids[0], p.clone()).await.unwrap();
        for b in [10u64, 20, 30] {
            (p.bytes, p.total) = (Some(b), Some(100));
            e1.on_report(&ids[0], p.clone()).await.unwrap();
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let r = app.admin(Method::GET, &format!("/api/v1/deployments/{d2}/devices?state=downloading"), None).await;
            if r.body["items"][0]["bytes"] == 30 {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "progress never written: {}", r.body);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }

        // Reports lost on the way (a broker that gave up on a wedged replica): three minutes
        // later the rows have heard nothing, and the sweep of either replica sends each
        // device its command again, once; right after, nothing more.
        let later = drover_server::time::now_ms() + 180_000;
        let (a, b) = tokio::join!(e1.resend_stale(later), e2.resend_stale(later));
        assert_eq!(a.unwrap() + b.unwrap(), ids.len());
        let mut sent = drain(&mut rx1, Duration::from_millis(300)).await;
        sent.extend(drain(&mut rx2, Duration::from_millis(300)).await);
        sent.sort();
        assert_eq!(sent, expected, "the current command again, once per device");
        assert_eq!(e1.resend_stale(later + 1_000).await.unwrap() + e2.resend_stale(later + 1_000).await.unwrap(), 0);
        let _ = stop_tx.send(true);
        db2.close().await;
        app.db.close().await;
        tdb.drop_schema().await;
    }
}

/// What a device says it can do decides what it is sent: a device whose hello lists no
/// `update` ends `incompatible` at once, with the reason, instead of staying pending for ever;
/// one that never said (older firmware) is sent the install as before. And a state change
/// keeps the download progress reported just before it (still waiting for the next flush).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_without_updates_end_incompatible_and_state_changes_keep_the_last_progress() {
    each_backend!(|app| {
        let (stop_tx, stop) = tokio::sync::watch::channel(false);
        let (tx, mut rx) = tokio::sync::mpsc::channel(1000);
        app.state.engine.start_with(tx, stop.clone());
        let operator = app.token("operator").await;
        let art = uploaded(&app, &operator, "edge-app", "7.0.0", None).await;
        let mut ids = Vec::new();
        for (serial, caps) in [
            ("SN-CAP-UPD", Some(vec!["terminal", "bogus", "update"])),
            ("SN-CAP-NONE", Some(vec!["telemetry"])),
            ("SN-CAP-OLD", None),
        ] {
            let (id, _, _) = accepted_device(&app, serial).await;
            drover_server::presence::record_status(&app.db, &id, true, 1_000).await.unwrap();
            let mut h = crate::support::hello("acme-fw/1.0", "boot-1");
            h.capabilities = caps.map(|c| c.into_iter().map(String::from).collect());
            drover_server::presence::record_hello(&app.db, &id, &h, 1_000).await.unwrap();
            ids.push(id);
        }
        let (upd, none, old) = (ids[0].clone(), ids[1].clone(), ids[2].clone());
        // Known names only, in the contract's order.
        let d = app.admin(Method::GET, &format!("/api/v1/devices/{upd}"), None).await;
        assert_eq!(d.body["capabilities"], json!(["update", "terminal"]), "{}", d.text);
        let d = app.admin(Method::GET, &format!("/api/v1/devices/{old}"), None).await;
        assert!(d.body.get("capabilities").is_none(), "{}", d.text);

        let r = create(&app, &operator, json!({"artifact": art, "devices": ids})).await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        let dep = r.body["id"].as_str().unwrap().to_string();
        let mut sent = drain(&mut rx, Duration::from_millis(500)).await;
        sent.sort();
        let mut expected =
            vec![(upd.clone(), dep.clone(), "install".into()), (old.clone(), dep.clone(), "install".into())];
        expected.sort();
        assert_eq!(sent, expected, "no install for the device that does not take updates");
        let row = app.admin(Method::GET, &format!("/api/v1/deployments/{dep}/devices?state=incompatible"), None).await;
        let items = row.body["items"].as_array().unwrap();
        assert_eq!(items.len(), 1, "{}", row.text);
        assert_eq!(items[0]["device_id"], json!(none));
        assert!(items[0]["message"].as_str().unwrap().contains("does not take updates"), "{}", row.text);

        // Progress, then at once a state change without byte counts.
        let e = app.state.engine.clone();
        let mut p = report(&dep, UpdateState::Downloading);
        e.on_report(&upd, p.clone()).await.unwrap();
        for b in [100u64, 900, 1000] {
            (p.bytes, p.total) = (Some(b), Some(1000));
            e.on_report(&upd, p.clone()).await.unwrap();
        }
        e.on_report(&upd, report(&dep, UpdateState::Installing)).await.unwrap();
        let r = app.admin(Method::GET, &format!("/api/v1/deployments/{dep}/devices?state=installing"), None).await;
        assert_eq!(
            (r.body["items"][0]["bytes"].clone(), r.body["items"][0]["total"].clone()),
            (json!(1000), json!(1000))
        );
        let _ = stop_tx.send(true);
    });
}
