//! Monitoring with a real `drover-agent` process against a real droverd (embedded broker):
//! a group's device rule set reaches the agent, which applies it and evaluates it with droverd
//! stopped — raising its events and running the action its own config allows — and delivers
//! them once droverd is back; logs on demand answered by the agent from a file its config names.

use std::io::Write as _;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

use crate::e2e::{agent as http, get_json};
use crate::fleet::{Droverd, admin_token, droverd_cli, post};
use crate::support::{TempDir, agent_bin, eventually};

struct AgentProc(Child);

impl Drop for AgentProc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn put(base: &str, path: &str, token: &str, body: Value) -> (u16, Value) {
    let resp = http()
        .put(&format!("{base}{path}"))
        .header("Authorization", &format!("Bearer {token}"))
        .send_json(body)
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.into_body().read_json().unwrap_or(Value::Null))
}

fn events(base: &str, token: &str, device: &str) -> Vec<Value> {
    let (status, body) = get_json(&format!("{base}/api/v1/devices/{device}/telemetry-events?limit=500"), Some(token));
    assert_eq!(status, 200, "{body}");
    body.as_array().cloned().unwrap_or_default()
}

/// An event's `data`, whether the API gives it as an object or as JSON text.
fn event_data(e: &Value) -> Value {
    match &e["data"] {
        Value::String(s) => serde_json::from_str(s).unwrap_or(Value::Null),
        v => v.clone(),
    }
}

fn has_event<'a>(events: &'a [Value], name: &str) -> Option<&'a Value> {
    events.iter().find(|e| e["name"] == name)
}

/// A line on the agent's local interface, as an application on the device writes it.
fn local_line(socket: &Path, line: &str) {
    let mut s = UnixStream::connect(socket).unwrap();
    s.write_all(format!("{line}\n").as_bytes()).unwrap();
}

#[test]
fn a_real_agent_applies_pushed_rules_offline_and_answers_logs_on_demand() {
    let dir = TempDir::new("agent-monitoring");
    let data = dir.path().join("data");
    let mut server = Droverd::start(&data, None, &[]);
    let admin = admin_token(&data);
    let viewer = droverd_cli(&data, &["token", "create", "--role", "viewer", "--name", "watcher"])
        .split_whitespace()
        .find(|w| w.starts_with("drv_"))
        .unwrap()
        .to_string();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, droverd_cli(&data, &["ca", "cert"])).unwrap();
    let (status, t) = post(&server.base, "/api/v1/enrollment-tokens", &admin, json!({"name": "t", "max_uses": 1}));
    assert_eq!(status, 201, "{t}");

    let adir = dir.path().join("agent");
    let adata = adir.join("data");
    std::fs::create_dir_all(&adata).unwrap();
    let app_log = adir.join("app.log");
    std::fs::write(&app_log, (1..=50).map(|i| format!("app line {i}\n")).collect::<String>()).unwrap();
    let marker = adir.join("action-ran");
    let cfg = adir.join("agent.toml");
    std::fs::write(
        &cfg,
        format!(
            "server_url = \"https://localhost:{dev}\"\nmqtt_url = \"mqtts://localhost:{mqtt}\"\nca_file = {ca_file:?}\n\
             data_dir = {adata:?}\nenrollment_token = \"{secret}\"\nkeepalive_secs = 10\nlog_level = \"debug\"\n\
             [identity]\nserial = \"monitor-1\"\n[telemetry]\ninterval_s = 1\n\
             [telemetry.log_files]\napp = {app_log:?}\n\
             [telemetry.actions]\nmark = [\"touch\", {marker:?}]\n",
            dev = server.dev,
            mqtt = server.mqtt,
            secret = t["secret"].as_str().unwrap(),
        ),
    )
    .unwrap();
    let agent_log = adir.join("agent.log");
    let _agent = AgentProc(
        Command::new(agent_bin())
            .args(["run", "--config"])
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&agent_log).unwrap())
            .spawn()
            .unwrap(),
    );
    let log = || std::fs::read_to_string(&agent_log).unwrap_or_default();
    let json_path = adata.join("device.json");
    let id = eventually(Duration::from_secs(60), "the agent to enroll", || {
        let v: Value = serde_json::from_slice(&std::fs::read(&json_path).ok()?).ok()?;
        v["device_id"].as_str().map(str::to_string)
    });
    let base = server.base.clone();
    eventually(Duration::from_secs(30), "the device online", || {
        let (_, d) = get_json(&format!("{base}/api/v1/devices/{id}"), Some(&admin));
        (d["online"] == true).then_some(())
    });

    // A rule set on a group the device is in: pushed, stored and applied without a restart.
    let (status, g) = post(&base, "/api/v1/groups", &admin, json!({"name": "pumps", "kind": "static"}));
    assert_eq!(status, 201, "{g}");
    let gid = g["id"].as_str().unwrap().to_string();
    let (status, r) = post(&base, &format!("/api/v1/groups/{gid}/devices"), &admin, json!({"devices": [id]}));
    assert!(status < 300, "{r}");
    let rules = json!({"rules": [
        {"id": "tank-high", "name": "Tank above 5", "metric": "tank.level", "op": ">", "threshold": 5.0, "for_s": 0,
         "raise": {"name": "tank.high", "severity": "warning"}},
        {"id": "door", "name": "Door opened", "event": "door.open",
         "raise": {"name": "door.alarm", "severity": "critical"}, "action": "mark"},
        {"id": "reboot", "name": "Not allowed here", "event": "reboot.please", "action": "reboot"},
    ]});
    // Bad input first: a viewer may not set rule sets.
    let (status, _) = put(&base, "/api/v1/device-rule-sets/pumps", &viewer, rules.clone());
    assert_eq!(status, 403);
    let (status, set) = put(&base, "/api/v1/device-rule-sets/pumps", &admin, rules);
    assert_eq!(status, 200, "{set}");
    let version = eventually(Duration::from_secs(30), "the agent to apply the rule set", || {
        let (_, v) = get_json(&format!("{base}/api/v1/devices/{id}/rules"), Some(&viewer));
        (v["applied_version"].as_u64().is_some() && v["applied_version"] == v["version"]).then(|| v["version"].clone())
    });
    assert!(version.as_u64().unwrap() >= 1, "{version}");
    let stored: Value = serde_json::from_slice(&std::fs::read(adata.join("telemetry/rules.json")).unwrap()).unwrap();
    assert_eq!(stored["rules"].as_array().map(Vec::len), Some(3), "the agent keeps the set on disk: {stored}");

    // droverd away: the agent evaluates on its own, runs the allowed action, refuses the other.
    server.stop();
    let socket = adata.join("telemetry.sock");
    local_line(&socket, r#"{"metric":"tank.level","value":9.5}"#);
    local_line(&socket, r#"{"event":"door.open","severity":"info","data":{"door":"rear"}}"#);
    local_line(&socket, r#"{"event":"reboot.please"}"#);
    eventually(Duration::from_secs(20), "the rule's action to run with droverd down", || marker.exists().then_some(()));
    server.restart();
    let base = server.base.clone();
    let evs = eventually(Duration::from_secs(120), "the offline events delivered", || {
        let evs = events(&base, &admin, &id);
        ["tank.high", "door.alarm", "drover.rules.action", "drover.rules.action_refused"]
            .iter()
            .all(|n| has_event(&evs, n).is_some())
            .then_some(evs)
    });
    let tank = has_event(&evs, "tank.high").unwrap();
    assert_eq!(tank["severity"], "warning", "{tank}");
    let action = has_event(&evs, "drover.rules.action").unwrap();
    assert_eq!(event_data(action)["exit"], 0, "the action ran and succeeded: {action}\n{}", log());
    let refused = has_event(&evs, "drover.rules.action_refused").unwrap();
    assert_eq!(event_data(refused)["rule"], "reboot", "{refused}");

    // Logs on demand: the last lines of the file the config names, nothing else.
    let (status, ans) =
        post(&base, &format!("/api/v1/devices/{id}/logs"), &admin, json!({"source": "file:app", "lines": 3}));
    assert_eq!(status, 200, "{ans}\n{}", log());
    assert_eq!(ans["answered"], true, "{ans}");
    let lines: Vec<&str> = ans["lines"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
    assert_eq!(lines, ["app line 48", "app line 49", "app line 50"], "{ans}");
    // Bad input: a file the config does not name, a path instead of a name, and a viewer.
    for source in ["file:secrets", "file:/etc/shadow"] {
        let (status, ans) =
            post(&base, &format!("/api/v1/devices/{id}/logs"), &admin, json!({"source": source, "lines": 3}));
        let refused = (status == 200 && ans["error"].is_string() && ans["lines"].as_array().is_none_or(Vec::is_empty))
            || status == 400;
        assert!(refused, "{source}: {status} {ans}");
        assert!(!ans.to_string().contains("root:"), "{ans}");
    }
    let (status, _) = post(&base, &format!("/api/v1/devices/{id}/logs"), &viewer, json!({"source": "file:app"}));
    assert_eq!(status, 403);
}
