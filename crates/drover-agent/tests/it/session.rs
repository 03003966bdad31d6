//! The session against a real Mosquitto with mutual TLS.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use drover_agent::backoff::BackoffPolicy;
use drover_agent::inventory::{Attributes, SystemInventory};
use drover_agent::session::{InventorySource, Session, SessionConfig, SessionStats, SystemSource};
use rumqttc::v5::mqttbytes::QoS;
use tokio::sync::oneshot;

use crate::support::*;

const S: Duration = Duration::from_secs(1);

fn session_config(m: &Mosquitto, ca: &Ca, dev: &Device, port: u16) -> SessionConfig {
    let mut c = SessionConfig::new(dev.id.clone(), "127.0.0.1", port, dev.tls(&ca.cert_pem));
    c.keepalive = Duration::from_secs(5);
    c.heartbeat_interval = Duration::from_secs(3600);
    c.backoff = BackoffPolicy { base: Duration::from_millis(200), cap: S, reset_after: Duration::from_secs(60) };
    c.boot_id = Some("boot-1".into());
    let _ = m;
    c
}

/// Runs a session in the background; dropping the guard stops it gracefully.
struct Running {
    stats: Arc<SessionStats>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    fn start<I: InventorySource>(cfg: SessionConfig, source: I) -> Running {
        let session = Session::new(cfg, source).unwrap();
        let stats = session.stats();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(session.run(async move {
            let _ = rx.await;
        }));
        Running { stats, stop: Some(tx), task }
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(5), &mut self.task).await.expect("session did not stop").unwrap();
    }
}

/// An inventory the test changes at will.
#[derive(Clone)]
struct Shared(Arc<Mutex<Attributes>>);

impl InventorySource for Shared {
    fn collect(&mut self) -> impl std::future::Future<Output = Attributes> + Send {
        std::future::ready(self.0.lock().unwrap().clone())
    }
}

/// The agent's announcements, with the machine's real inventory plus a script's value;
/// heartbeats at the interval with a rising seq; a ping answered at once; a ping of another
/// protocol version (bad input) ignored; retained `online` for a late subscriber; and a graceful
/// stop leaving a retained `offline`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn announces_heartbeats_and_answers_pings() {
    drover_agent::tls::install_default_provider();
    let ca = Ca::new("fleet CA");
    let m = Mosquitto::start(&ca);
    let mut obs = Observer::start(&ca, m.port, "drover/v1/d/#");
    tokio::time::sleep(Duration::from_millis(500)).await;

    let scripts = temp_dir("scripts");
    let script = scripts.join("10-site");
    write(&script, "#!/bin/sh\necho site=lab-7\necho rack=r12\n");
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let dev = Device::new(&ca, "dev-announce");
    let mut cfg = session_config(&m, &ca, &dev, m.port);
    cfg.heartbeat_interval = S;
    let source = SystemSource(SystemInventory { scripts_dir: scripts.clone(), script_timeout: Duration::from_secs(5) });
    let run = Running::start(cfg, source);

    let online = obs.expect(10 * S, "online", |m| is(m, &dev.id, "up/status")).await;
    assert_eq!(state(&online), "online");
    let hello = obs.expect(5 * S, "hello", |m| is(m, &dev.id, "up/hello")).await;
    assert_eq!(hello.payload["v"], 1);
    assert_eq!(hello.payload["agent"], drover_agent::AGENT);
    assert_eq!(hello.payload["boot_id"], "boot-1");
    let inv = obs.expect(10 * S, "inventory", |m| is(m, &dev.id, "up/inventory")).await;
    let attrs = &inv.payload["attributes"];
    assert_eq!(attrs["site"], "lab-7", "{attrs}");
    assert_eq!(attrs["rack"], "r12");
    assert_eq!(attrs["agent_version"], env!("CARGO_PKG_VERSION"));
    for k in ["os", "arch", "kernel", "hostname", "cpu_count", "mem_total_kb", "disk_total_kb"] {
        assert!(attrs.get(k).is_some(), "{k} missing from {attrs}");
    }

    let hb1 = obs.expect(3 * S, "heartbeat", |m| is(m, &dev.id, "up/heartbeat")).await;
    let hb2 = obs.expect(3 * S, "second heartbeat", |m| is(m, &dev.id, "up/heartbeat")).await;
    assert_eq!(hb2.payload["seq"].as_u64().unwrap(), hb1.payload["seq"].as_u64().unwrap() + 1);
    assert!(hb1.payload["uptime_s"].as_u64().unwrap() > 0);

    // A late subscriber gets the retained status.
    let mut late = Observer::start(&ca, m.port, &format!("drover/v1/d/{}/up/status", dev.id));
    let st = late.expect(5 * S, "retained status", |_| true).await;
    assert!(st.retain && state(&st) == "online", "{st:?}");

    run.stop().await;
    let off = obs.expect(5 * S, "offline", |m| is(m, &dev.id, "up/status") && state(m) == "offline").await;
    assert_eq!(off.payload, serde_json::json!({"v": 1, "state": "offline"}));
    let mut late = Observer::start(&ca, m.port, &format!("drover/v1/d/{}/up/status", dev.id));
    let st = late.expect(5 * S, "retained offline", |_| true).await;
    assert!(st.retain && state(&st) == "offline", "{st:?}");
    std::fs::remove_dir_all(scripts).unwrap();
}

/// Pings: a heartbeat comes back at once (periodic heartbeats are off); a ping with
/// `"v":2` and a malformed one (bad inputs) get nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_is_answered_with_a_heartbeat() {
    drover_agent::tls::install_default_provider();
    let ca = Ca::new("fleet CA");
    let m = Mosquitto::start(&ca);
    let mut obs = Observer::start(&ca, m.port, "drover/v1/d/#");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let dev = Device::new(&ca, "dev-ping");
    let run = Running::start(session_config(&m, &ca, &dev, m.port), Shared(Arc::default()));
    obs.expect(10 * S, "online", |m| is(m, &dev.id, "up/status") && state(m) == "online").await;
    obs.expect(5 * S, "inventory", |m| is(m, &dev.id, "up/inventory")).await;
    let ping = format!("drover/v1/d/{}/down/ping", dev.id);

    for bad in [&br#"{"v":2}"#[..], b"ping"] {
        obs.client.publish(&ping, QoS::AtMostOnce, false, bad.to_vec()).await.unwrap();
    }
    let got = obs.collect(2 * S).await;
    assert!(!got.iter().any(|m| is(m, &dev.id, "up/heartbeat")), "answered a bad ping: {got:?}");

    let asked = Instant::now();
    obs.client.publish(&ping, QoS::AtMostOnce, false, br#"{"v":1}"#.to_vec()).await.unwrap();
    let hb = obs.expect(3 * S, "heartbeat answering the ping", |m| is(m, &dev.id, "up/heartbeat")).await;
    assert!(asked.elapsed() < 2 * S);
    assert_eq!(hb.payload["seq"], 0);
    assert_eq!(run.stats.pings(), 1);
    run.stop().await;
}

/// Inventory is re-sent when it changes and only then (bad input: an unchanged re-collection
/// must not be re-sent).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inventory_is_resent_on_change_only() {
    drover_agent::tls::install_default_provider();
    let ca = Ca::new("fleet CA");
    let m = Mosquitto::start(&ca);
    let mut obs = Observer::start(&ca, m.port, "drover/v1/d/#");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let dev = Device::new(&ca, "dev-inv");
    let inv = Shared(Arc::new(Mutex::new(BTreeMap::from([("fw".to_string(), "1.0".to_string())]))));
    let mut cfg = session_config(&m, &ca, &dev, m.port);
    cfg.inventory_interval = Duration::from_millis(300);
    let run = Running::start(cfg, inv.clone());
    let first = obs.expect(10 * S, "inventory", |m| is(m, &dev.id, "up/inventory")).await;
    assert_eq!(first.payload["attributes"]["fw"], "1.0");
    let got = obs.collect(2 * S).await;
    assert!(!got.iter().any(|m| is(m, &dev.id, "up/inventory")), "unchanged inventory re-sent: {got:?}");
    inv.0.lock().unwrap().insert("fw".into(), "1.1".into());
    let second = obs.expect(3 * S, "changed inventory", |m| is(m, &dev.id, "up/inventory")).await;
    assert_eq!(second.payload["attributes"]["fw"], "1.1");
    assert_eq!(run.stats.inventories(), 2);
    run.stop().await;
}

/// Bad input: a device publishing into another device's prefix. The broker refuses it
/// (MQTT 5 "not authorized") and the observer never sees it, while the same device's message
/// under its own prefix does arrive (so the test can tell a dead observer from a refusal).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_cannot_use_another_devices_prefix() {
    use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason};
    use rumqttc::v5::{AsyncClient, Event, MqttOptions};
    drover_agent::tls::install_default_provider();
    let ca = Ca::new("fleet CA");
    let m = Mosquitto::start(&ca);
    let mut obs = Observer::start(&ca, m.port, "drover/v1/d/#");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let intruder = Device::new(&ca, "dev-intruder");
    let mut o = MqttOptions::new(intruder.id.clone(), "127.0.0.1", m.port);
    o.set_transport(rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(intruder.tls(&ca.cert_pem))));
    let (client, mut ev) = AsyncClient::new(o, 10);
    let acks = tokio::spawn(async move {
        let mut reasons = Vec::new();
        while let Ok(e) = ev.poll().await {
            if let Event::Incoming(Packet::PubAck(a)) = e {
                reasons.push(a.reason);
                if reasons.len() == 2 {
                    break;
                }
            }
        }
        reasons
    });
    let forged = br#"{"v":1,"state":"offline"}"#.to_vec();
    client.publish("drover/v1/d/dev-victim/up/status", QoS::AtLeastOnce, true, forged).await.unwrap();
    client
        .publish("drover/v1/d/dev-intruder/up/status", QoS::AtLeastOnce, true, br#"{"v":1,"state":"online"}"#.to_vec())
        .await
        .unwrap();
    let reasons = tokio::time::timeout(10 * S, acks).await.expect("no PUBACKs").unwrap();
    assert_eq!(reasons, vec![PubAckReason::NotAuthorized, PubAckReason::Success]);
    let own = obs.expect(5 * S, "the intruder's own status", |m| is(m, "dev-intruder", "up/status")).await;
    assert_eq!(state(&own), "online");
    let got = obs.collect(S).await;
    assert!(!got.iter().any(|m| m.topic.contains("dev-victim")), "{got:?}");
}

/// Bad input: the broker dies (SIGKILL) and comes back on the same port. The session
/// reconnects with backoff and is `online` again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_after_the_broker_restarts() {
    drover_agent::tls::install_default_provider();
    let ca = Ca::new("fleet CA");
    let mut m = Mosquitto::start(&ca);
    let mut obs = Observer::start(&ca, m.port, "drover/v1/d/#");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let dev = Device::new(&ca, "dev-restart");
    let run = Running::start(session_config(&m, &ca, &dev, m.port), Shared(Arc::default()));
    obs.expect(10 * S, "online", |m| is(m, &dev.id, "up/status") && state(m) == "online").await;
    assert_eq!(run.stats.connects(), 1);

    m.kill();
    tokio::time::sleep(2 * S).await;
    assert!(!run.stats.connected(), "the session did not notice the broker died");
    assert!(run.stats.connect_failures() >= 2, "no retries while the broker is down");
    m.restart();
    let again =
        obs.expect(15 * S, "online after restart", |m| is(m, &dev.id, "up/status") && state(m) == "online").await;
    assert_eq!(state(&again), "online");
    obs.expect(5 * S, "hello after restart", |m| is(m, &dev.id, "up/hello")).await;
    assert_eq!(run.stats.connects(), 2);
    run.stop().await;
}

/// Bad input: the connection is cut (both TCP sockets closed, no MQTT DISCONNECT). The broker
/// publishes the will, retained `offline`, well within keepalive × 1.5 + slack, and the session
/// reconnects and is `online` again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_connection_leaves_the_will_and_the_session_reconnects() {
    drover_agent::tls::install_default_provider();
    let ca = Ca::new("fleet CA");
    let m = Mosquitto::start(&ca);
    let proxy = Proxy::start(m.port).await;
    let mut obs = Observer::start(&ca, m.port, "drover/v1/d/#");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let dev = Device::new(&ca, "dev-cut");
    let cfg = session_config(&m, &ca, &dev, proxy.port);
    let keepalive = cfg.keepalive;
    let run = Running::start(cfg, Shared(Arc::default()));
    obs.expect(10 * S, "online", |m| is(m, &dev.id, "up/status") && state(m) == "online").await;

    proxy.cut();
    let will = obs
        .expect(keepalive.mul_f64(1.5) + 2 * S, "will", |m| is(m, &dev.id, "up/status") && state(m) == "offline")
        .await;
    assert_eq!(will.payload, serde_json::json!({"v": 1, "state": "offline"}));
    obs.expect(5 * S, "online after reconnecting", |m| is(m, &dev.id, "up/status") && state(m) == "online").await;
    assert_eq!(run.stats.connects(), 2);
    run.stop().await;
}

/// Bad inputs: the device's network silently dies (a black hole: no FIN, no RST).
/// 1. The session notices by its keep-alive (no PINGRESP) and reconnects on a fresh
///    connection: `online` again within about two keep-alives.
/// 2. The device then loses power behind a dead network (the session is dropped, nothing is
///    sent): the broker's keep-alive check publishes the will (Mosquitto checks lazily, so one
///    extra keep-alive of slack).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silently_dead_network_is_detected_both_ways() {
    drover_agent::tls::install_default_provider();
    let ca = Ca::new("fleet CA");
    let m = Mosquitto::start(&ca);
    let proxy = Proxy::start(m.port).await;
    let mut obs = Observer::start(&ca, m.port, "drover/v1/d/#");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let dev = Device::new(&ca, "dev-blackhole");
    let cfg = session_config(&m, &ca, &dev, proxy.port);
    let keepalive = cfg.keepalive;
    let run = Running::start(cfg, Shared(Arc::default()));
    obs.expect(10 * S, "online", |m| is(m, &dev.id, "up/status") && state(m) == "online").await;

    proxy.freeze();
    obs.expect(keepalive * 2 + 4 * S, "online after reconnecting", |m| {
        is(m, &dev.id, "up/status") && state(m) == "online"
    })
    .await;
    assert_eq!(run.stats.connects(), 2);

    proxy.freeze();
    run.task.abort();
    let lost = Instant::now();
    let will = obs
        .expect(keepalive.mul_f64(2.5) + 3 * S, "will", |m| is(m, &dev.id, "up/status") && state(m) == "offline")
        .await;
    assert_eq!(will.payload, serde_json::json!({"v": 1, "state": "offline"}));
    assert!(lost.elapsed() >= keepalive, "offline before the keep-alive could expire: {:?}", lost.elapsed());
}
