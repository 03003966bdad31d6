//! Telemetry with the real agent binary and a real Mosquitto; the test plays the server: it
//! subscribes to the fleet's uplink, records every batch and acknowledges it on
//! `down/telemetry`, and sends rule sets and log requests.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use rumqttc::{TlsConfiguration, Transport};
use serde_json::Value;

use crate::support::*;

const BIN: &str = env!("CARGO_BIN_EXE_drover-agent");
const S: Duration = Duration::from_secs(1);

/// The server's side: every `up/telemetry` batch and `up/logs` reply received, in order.
#[derive(Default)]
struct Seen {
    batches: Vec<Value>,
    logs: Vec<Value>,
}

struct Server {
    client: AsyncClient,
    seen: Arc<Mutex<Seen>>,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    fn start(ca: &Ca, port: u16) -> Server {
        let me = Device::new(ca, SERVICE_CN);
        let mut o = MqttOptions::new(format!("server-{}", free_port()), "127.0.0.1", port);
        o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(me.tls(&ca.cert_pem))));
        o.set_keep_alive(Duration::from_secs(30));
        // Batches are up to ~100 KiB (rumqttc's default limit is 10 KiB).
        o.set_max_packet_size(Some(512 * 1024));
        let (client, mut ev) = AsyncClient::new(o, 256);
        let seen = Arc::new(Mutex::new(Seen::default()));
        let (c, s) = (client.clone(), seen.clone());
        let task = tokio::spawn(async move {
            loop {
                match ev.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        c.subscribe("drover/v1/d/+/up/#", QoS::AtLeastOnce).await.unwrap();
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let topic = String::from_utf8_lossy(&p.topic).into_owned();
                        let Ok(v) = serde_json::from_slice::<Value>(&p.payload) else { continue };
                        if topic.ends_with("/up/telemetry") {
                            // Checked as droverd checks it.
                            let b: drover_proto::telemetry::TelemetryBatch = serde_json::from_value(v.clone()).unwrap();
                            b.check().unwrap();
                            let ack = format!("{{\"v\":1,\"seq\":{}}}", b.seq);
                            let down = topic.replace("/up/telemetry", "/down/telemetry");
                            s.lock().unwrap().batches.push(v);
                            let _ = c.try_publish(down, QoS::AtMostOnce, false, ack);
                        } else if topic.ends_with("/up/logs") {
                            s.lock().unwrap().logs.push(v);
                        }
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            }
        });
        Server { client, seen, task }
    }

    async fn send(&self, device: &str, suffix: &str, payload: &str) {
        let topic = format!("drover/v1/d/{device}/{suffix}");
        self.client.publish(topic, QoS::AtLeastOnce, false, payload.to_string()).await.unwrap();
    }

    /// Points by name, in arrival order, each point once (a re-sent batch repeats points; the
    /// server keeps the first, as droverd does by device + name + t).
    fn points(&self, name: &str) -> Vec<(i64, f64)> {
        let s = self.seen.lock().unwrap();
        let mut seen_t = std::collections::BTreeSet::new();
        let mut out = Vec::new();
        for b in &s.batches {
            for p in b["points"].as_array().unwrap() {
                if p["n"] == name {
                    let t = p["t"].as_i64().unwrap();
                    if seen_t.insert(t) {
                        out.push((t, p["v"].as_f64().unwrap()));
                    }
                }
            }
        }
        out
    }

    fn events(&self, name: &str) -> Vec<Value> {
        let s = self.seen.lock().unwrap();
        let mut ids = std::collections::BTreeSet::new();
        s.batches
            .iter()
            .flat_map(|b| b["events"].as_array().unwrap().clone())
            .filter(|e| e["name"] == name && ids.insert(e["id"].as_str().unwrap().to_string()))
            .collect()
    }

    fn last_dropped(&self) -> u64 {
        self.seen.lock().unwrap().batches.last().map(|b| b["dropped"].as_u64().unwrap()).unwrap_or(0)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Polls `f` until it is true or `within` passes.
async fn eventually(within: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + within;
    while !f() {
        assert!(tokio::time::Instant::now() < deadline, "not within {within:?}: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

struct Agent {
    dir: PathBuf,
    data: PathBuf,
    config: PathBuf,
    child: Option<Child>,
    runs: u32,
}

impl Agent {
    fn new(ca: &Ca, id: &str, port: u16, extra: &str) -> Agent {
        let dir = temp_dir(id);
        let data = dir.join("data");
        std::fs::create_dir_all(&data).unwrap();
        let dev = Device::new(ca, id);
        write(&data.join("device.key"), &dev.key.to_pem());
        std::fs::set_permissions(data.join("device.key"), std::fs::Permissions::from_mode(0o600)).unwrap();
        write(&data.join("device.crt"), &dev.cert_pem);
        write(&data.join("ca.crt"), &ca.cert_pem);
        write(&data.join("device.json"), &format!("{{\"device_id\":\"{id}\"}}"));
        let config = dir.join("agent.toml");
        write(
            &config,
            &format!(
                "mqtt_url = \"mqtts://127.0.0.1:{port}\"\n\
                 ca_file = {:?}\n\
                 data_dir = {data:?}\n\
                 keepalive_secs = 5\n\
                 log_level = \"debug\"\n\
                 inventory_scripts_dir = {:?}\n\
                 [telemetry]\n\
                 interval_s = 1\n\
                 sync_interval_ms = 100\n\
                 ack_timeout_s = 5\n\
                 {extra}\n",
                data.join("ca.crt"),
                dir.join("inventory.d"),
            ),
        );
        Agent { dir, data, config, child: None, runs: 0 }
    }

    fn socket(&self) -> PathBuf {
        self.data.join("telemetry.sock")
    }

    fn start(&mut self) {
        self.runs += 1;
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join("stderr")).unwrap();
        self.child = Some(
            Command::new(BIN)
                .args(["run", "--config"])
                .arg(&self.config)
                .env("RUST_LOG", "info")
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap(),
        );
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("stderr")).unwrap_or_default()
    }

    async fn connect_socket(&self) -> UnixStream {
        let path = self.socket();
        let deadline = tokio::time::Instant::now() + 10 * S;
        loop {
            if let Ok(s) = UnixStream::connect(&path) {
                return s;
            }
            assert!(tokio::time::Instant::now() < deadline, "no local socket at {}: {}", path.display(), self.log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            eprintln!("agent log (last lines, newest first):\n{}", tail.join("\n"));
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn send_lines(s: &mut UnixStream, lines: &[String]) {
    let mut text = lines.join("\n");
    text.push('\n');
    s.write_all(text.as_bytes()).unwrap();
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
}

/// The whole path through an outage: health metrics and application data (StatsD and JSON
/// lines, and one bad line) arrive in order with their original timestamps; the broker is
/// killed for a while and data produced meanwhile arrives after it is back, none lost; a device
/// rule fires while the broker is unreachable (its event recorded, its action run); a rule
/// naming an action the config does not allow raises a clear event instead; a rule update is
/// applied without restarting; logs on demand from an allowed file, and refused for the journal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_rules_local_interface_and_logs() {
    drover_agent::tls::install_default_provider();
    let ca = Ca::new("fleet CA");
    let mut m = Mosquitto::start(&ca);
    let srv = Server::start(&ca, m.port);
    let id = "dev-tel";
    let scratch = temp_dir("tel-scratch");
    let touched = scratch.join("touched");
    let app_log = scratch.join("app.log");
    std::fs::write(&app_log, "one\ntwo\nthree\n").unwrap();
    let extra =
        format!("[telemetry.actions]\ntouch = [\"touch\", {touched:?}]\n[telemetry.log_files]\napp = {app_log:?}\n");
    let mut agent = Agent::new(&ca, id, m.port, &extra);
    agent.start();
    eventually(15 * S, "health metrics", || {
        !srv.points("uptime_s").is_empty() && !srv.points("mem.used_bytes").is_empty()
    })
    .await;
    assert!(!srv.points("disk.used_percent.root").is_empty());

    let rules = |version: u32, extra_rule: &str| {
        format!(
            r#"{{"v":1,"version":{version},"rules":[
              {{"id":"hot","name":"App hot","metric":"app.temp","op":">","threshold":50,"raise":{{"name":"app.hot","severity":"warning"}},"action":"touch"}},
              {{"id":"door","name":"Door","event":"door.open","action":"reboot"}}{extra_rule}]}}"#
        )
    };
    srv.send(id, "down/rules", &rules(1, "")).await;
    eventually(10 * S, "rules applied", || {
        srv.events("drover.rules.applied").iter().any(|e| e["data"]["version"] == 1)
    })
    .await;
    assert!(agent.data.join("telemetry/rules.json").exists());

    let mut sock = agent.connect_socket().await;
    let t0 = now_ms() - 60_000;
    let seq = |from: i64, to: i64| -> Vec<String> {
        (from..to).map(|i| format!(r#"{{"metric":"app.seq","value":{i},"t":{}}}"#, t0 + i)).collect()
    };
    send_lines(&mut sock, &seq(0, 20));
    let mut statsd: Vec<String> =
        ["req:1|c", "req:1|c", "req:1|c", "lat:10|ms", "lat:30|ms", "this is not a metric"].map(String::from).to_vec();
    statsd.push("queue.depth:7|g".into());
    send_lines(&mut sock, &statsd);
    eventually(10 * S, "the first app points", || srv.points("app.seq").len() == 20).await;

    // The broker goes away; the device keeps measuring.
    m.kill();
    send_lines(&mut sock, &seq(20, 60));
    send_lines(
        &mut sock,
        &[r#"{"metric":"app.temp","value":60}"#.into(), r#"{"event":"door.open","data":{"door":"rear"}}"#.into()],
    );
    eventually(10 * S, "the rule's action, run while offline", || touched.exists()).await;
    let down_until = std::time::Instant::now() + 3 * S;
    send_lines(&mut sock, &seq(60, 80));
    while std::time::Instant::now() < down_until {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    m.restart();

    eventually(60 * S, "every app point after the outage", || srv.points("app.seq").len() == 80).await;
    let pts = srv.points("app.seq");
    let want: Vec<(i64, f64)> = (0..80).map(|i| (t0 + i, i as f64)).collect();
    assert_eq!(pts, want, "in order, original timestamps, none lost");
    // Health metrics kept their order too.
    let up = srv.points("uptime_s");
    assert!(up.windows(2).all(|w| w[0].0 < w[1].0), "{up:?}");

    eventually(20 * S, "rule events", || {
        !srv.events("app.hot").is_empty()
            && !srv.events("drover.rules.action").is_empty()
            && !srv.events("drover.rules.action_refused").is_empty()
            && !srv.events("door.open").is_empty()
    })
    .await;
    let hot = &srv.events("app.hot")[0];
    assert_eq!((hot["severity"].as_str(), hot["data"]["value"].as_f64()), (Some("warning"), Some(60.0)));
    let action = &srv.events("drover.rules.action")[0];
    assert_eq!((action["data"]["action"].as_str(), action["data"]["exit"].as_i64()), (Some("touch"), Some(0)));
    let refused = &srv.events("drover.rules.action_refused")[0];
    assert!(refused["data"]["error"].as_str().unwrap().contains("reboot"), "{refused}");
    assert_eq!(srv.events("door.open")[0]["data"]["door"], "rear");
    assert_eq!(srv.events("app.hot").len(), 1, "fired once");

    // StatsD aggregation per interval, and the bad line counted.
    eventually(10 * S, "statsd aggregates", || {
        srv.points("req").iter().map(|p| p.1).sum::<f64>() == 3.0
            && srv.points("lat.avg").first().map(|p| p.1) == Some(20.0)
            && srv.points("lat.max").first().map(|p| p.1) == Some(30.0)
            && srv.points("queue.depth").first().map(|p| p.1) == Some(7.0)
            && srv.points("agent.local.bad_lines").last().map(|p| p.1) == Some(1.0)
    })
    .await;
    assert!(srv.points("link.rtt_ms").iter().all(|p| p.1 >= 0.0) && !srv.points("link.rtt_ms").is_empty());
    assert_eq!(srv.last_dropped(), 0);

    // A rule update is applied without a restart: the new rule fires.
    let cold = r#",{"id":"cold","name":"App cold","metric":"app.temp","op":"<","threshold":0,"raise":{"name":"app.cold","severity":"critical"}}"#;
    srv.send(id, "down/rules", &rules(2, cold)).await;
    eventually(10 * S, "rules v2 applied", || {
        srv.events("drover.rules.applied").iter().any(|e| e["data"]["version"] == 2)
    })
    .await;
    send_lines(&mut sock, &[r#"{"metric":"app.temp","value":-5}"#.into()]);
    eventually(10 * S, "the new rule fires", || !srv.events("app.cold").is_empty()).await;
    assert_eq!(agent.runs, 1);
    // Bad input: an invalid rule set is refused with an event; the rules in force stay.
    srv.send(id, "down/rules", r#"{"v":1,"version":3,"rules":[{"id":"x","name":"X","metric":"m"}]}"#).await;
    eventually(10 * S, "refused", || !srv.events("drover.rules.refused").is_empty()).await;
    let stored: Value =
        serde_json::from_slice(&std::fs::read(agent.data.join("telemetry/rules.json")).unwrap()).unwrap();
    assert_eq!(stored["version"], 2);

    // Logs on demand: an allowed file; the journal, which this config does not allow.
    srv.send(id, "down/logs", r#"{"v":1,"request":"r1","source":"file:app","lines":2}"#).await;
    srv.send(id, "down/logs", r#"{"v":1,"request":"r2","source":"journal","lines":2}"#).await;
    eventually(10 * S, "log replies", || srv.seen.lock().unwrap().logs.len() == 2).await;
    let logs: BTreeMap<String, Value> =
        srv.seen.lock().unwrap().logs.iter().map(|l| (l["request"].as_str().unwrap().to_string(), l.clone())).collect();
    assert_eq!(logs["r1"]["lines"], serde_json::json!(["two", "three"]));
    assert_eq!(logs["r1"]["error"], Value::Null);
    assert!(logs["r2"]["error"].as_str().unwrap().contains("not allowed"), "{}", logs["r2"]);
    std::fs::remove_dir_all(&scratch).unwrap();
}

/// kill -9 of the agent over and over while an application floods it with points: every
/// restart finds a valid outbox (no corruption found, `dropped` stays 0), points keep their
/// order, and what is lost is only what was in flight inside the killed process (points the
/// application had written to the socket but the agent had not yet appended): at most one gap
/// per kill.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loop_under_load() {
    drover_agent::tls::install_default_provider();
    let ca = Ca::new("fleet CA");
    let m = Mosquitto::start(&ca);
    let srv = Server::start(&ca, m.port);
    let id = "dev-kill";
    let mut agent = Agent::new(&ca, id, m.port, "");
    agent.start();
    let t0 = now_ms() - 3_600_000;
    let kills = 6;
    let mut i: i64 = 0;
    for _ in 0..kills {
        let mut sock = agent.connect_socket().await;
        let until = std::time::Instant::now() + Duration::from_millis(1200);
        while std::time::Instant::now() < until {
            let lines: Vec<String> =
                (i..i + 20).map(|k| format!(r#"{{"metric":"app.seq","value":{k},"t":{}}}"#, t0 + k)).collect();
            if sock.write_all((lines.join("\n") + "\n").as_bytes()).is_err() {
                break;
            }
            i += 20;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        agent.kill9();
        agent.start();
    }
    let total = i;
    // The last run gets a final, clean marker; wait for it to arrive.
    let mut sock = agent.connect_socket().await;
    send_lines(&mut sock, &[format!(r#"{{"metric":"app.seq","value":{total},"t":{}}}"#, t0 + total)]);
    eventually(60 * S, "the final point", || srv.points("app.seq").last().is_some_and(|p| p.1 == total as f64)).await;
    let pts = srv.points("app.seq");
    assert!(pts.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 < w[1].1), "order kept");
    assert!(pts.iter().all(|(t, v)| *t == t0 + *v as i64), "original timestamps");
    let gaps = pts.windows(2).filter(|w| w[1].1 - w[0].1 > 1.0).count();
    let lost = total + 1 - pts.len() as i64;
    assert!(gaps <= kills, "{gaps} gaps for {kills} kills (lost {lost} of {total})");
    assert_eq!(srv.last_dropped(), 0, "no record found corrupted after kill -9; log:\n{}", agent.log());
    eprintln!("kill -9 ×{kills}: {} of {} points arrived, {lost} lost in {gaps} gaps", pts.len(), total + 1);
}

/// The outbox bound and the drop counter, and a damaged segment file: the agent runs with the
/// broker unreachable and a 64 KiB outbox while an application sends 3,000 points; garbage
/// is then appended to its oldest segment file (bad input) and one segment is truncated mid
/// record. After the restart with the broker back, what arrives is the newest points in order
/// past the damage, and every batch reports the records dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_bound_drop_counter_and_damaged_segments() {
    drover_agent::tls::install_default_provider();
    let ca = Ca::new("fleet CA");
    let mut m = Mosquitto::start(&ca);
    m.kill();
    let id = "dev-bound";
    let mut agent = Agent::new(&ca, id, m.port, "outbox_max_bytes = 65536\ndisks = []\n");
    agent.start();
    let mut sock = agent.connect_socket().await;
    let t0 = now_ms() - 3_600_000;
    let n = 3000;
    for chunk in (0..n).collect::<Vec<i64>>().chunks(100) {
        let lines: Vec<String> =
            chunk.iter().map(|k| format!(r#"{{"metric":"app.seq","value":{k},"t":{}}}"#, t0 + k)).collect();
        send_lines(&mut sock, &lines);
    }
    let outbox = agent.data.join("telemetry/outbox");
    let segments = || -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(&outbox)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "seg"))
            .collect();
        v.sort();
        v
    };
    let last_written = format!("\"v\":{}.0", n - 1);
    eventually(20 * S, "the last point in the outbox", || {
        segments().iter().any(|p| {
            let b = std::fs::read(p).unwrap_or_default();
            b.windows(last_written.len()).any(|w| w == last_written.as_bytes())
        })
    })
    .await;
    let bytes: u64 = segments().iter().map(|p| std::fs::metadata(p).unwrap().len()).sum();
    assert!(bytes <= 65536, "bounded: {bytes}");
    agent.kill9();
    let segs = segments();
    assert!(segs.len() >= 3, "{segs:?}");
    let mut f = std::fs::OpenOptions::new().append(true).open(&segs[0]).unwrap();
    f.write_all(b"DR\xff\x00\x00\x00 not a record, just garbage after a crash").unwrap();
    drop(f);

    m.restart();
    let srv = Server::start(&ca, m.port);
    agent.start();
    eventually(30 * S, "the newest point", || srv.points("app.seq").last().is_some_and(|p| p.1 == (n - 1) as f64))
        .await;
    let pts = srv.points("app.seq");
    let first = pts[0].1 as i64;
    assert!(first > 0, "the oldest were dropped");
    let want: Vec<(i64, f64)> = (first..n).map(|k| (t0 + k, k as f64)).collect();
    assert_eq!(pts, want, "the newest, contiguous and in order, past the garbage");
    let dropped = srv.last_dropped();
    assert!(dropped >= first as u64, "dropped {dropped} counts at least the {first} app points lost");
    eventually(10 * S, "the drop counter as a metric", || {
        srv.points("agent.outbox.dropped").iter().any(|p| p.1 as u64 == dropped)
    })
    .await;
    assert!(agent.log().contains("outbox full"), "{}", agent.log());
}
