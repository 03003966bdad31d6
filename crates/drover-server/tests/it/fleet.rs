//! Devices against a real droverd process: enrollment over HTTPS, MQTT over mutual TLS through
//! the embedded broker and through an external Mosquitto, presence as the API reports it.
//!
//! Bad input tried here: plain HTTP on the TLS device port, a decommissioned device's live
//! connection and its reconnect, a connection dropped without DISCONNECT, a server restart
//! under connected devices.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{LastWill, Packet};
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use rumqttc::{TlsConfiguration, Transport};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::e2e::{agent, get_json};
use crate::support::{TempDir, eventually, free_port};

const BIN: &str = env!("CARGO_BIN_EXE_droverd");

pub(crate) struct Droverd {
    child: Child,
    pub(crate) base: String,
    /// Ports of the embedded broker (when there is one) and of the HTTPS device endpoint.
    pub(crate) mqtt: u16,
    pub(crate) dev: u16,
    data: std::path::PathBuf,
    external: Option<String>,
    env: Vec<(String, String)>,
}

impl Droverd {
    /// Starts droverd on fresh ports (retrying with others if one was taken meanwhile by
    /// another test's connection), with the embedded broker or, given `external`, none.
    pub(crate) fn start(data: &Path, external: Option<&str>, env: &[(&str, &str)]) -> Droverd {
        let env: Vec<(String, String)> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        for _ in 0..5 {
            if let Some(d) = Droverd::try_start(data, external, &env, free_port(), free_port(), free_port()) {
                return d;
            }
        }
        panic!("droverd would not start (see its error above)");
    }

    fn try_start(
        data: &Path,
        external: Option<&str>,
        env: &[(String, String)],
        http: u16,
        mqtt: u16,
        dev: u16,
    ) -> Option<Droverd> {
        let mut cmd = Command::new(BIN);
        cmd.arg("--data-dir").arg(data).args(["--http-listen", &format!("127.0.0.1:{http}")]);
        cmd.args(["--device-listen", &format!("127.0.0.1:{dev}")]);
        match external {
            Some(url) => cmd.args(["--mqtt-listen=", "--mqtt-url", url]),
            None => cmd.args(["--mqtt-listen", &format!("127.0.0.1:{mqtt}")]),
        };
        cmd.env_remove("DROVER_DATABASE_URL").env("DROVER_LOG", "warn").envs(env.iter().map(|(k, v)| (k, v)));
        let child = cmd.stdout(Stdio::null()).stderr(Stdio::inherit()).spawn().unwrap();
        let mut d = Droverd {
            child,
            base: format!("http://127.0.0.1:{http}"),
            mqtt,
            dev,
            data: data.to_path_buf(),
            external: external.map(str::to_string),
            env: env.to_vec(),
        };
        let ready = format!("{}/readyz", d.base);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(_)) = d.child.try_wait() {
                return None;
            }
            if agent().get(&ready).call().ok().filter(|r| r.status() == 200).is_some() {
                return Some(d);
            }
            assert!(Instant::now() < deadline, "droverd not ready after 30 s");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops and starts again on the same ports and data.
    pub(crate) fn restart(&mut self) {
        self.stop();
        let http: u16 = self.base.rsplit(':').next().unwrap().parse().unwrap();
        let (data, external, env) = (self.data.clone(), self.external.clone(), self.env.clone());
        *self = Droverd::try_start(&data, external.as_deref(), &env, http, self.mqtt, self.dev)
            .expect("droverd restarts on its own ports");
    }

    /// Kills droverd at once (SIGKILL): a crash, as far as its state is concerned.
    pub(crate) fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub(crate) fn stop(&mut self) {
        Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status().unwrap();
        eventually(Duration::from_secs(15), "droverd to stop", || self.child.try_wait().unwrap());
    }
}

impl Drop for Droverd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) fn droverd_cli(data: &Path, args: &[&str]) -> String {
    let out =
        Command::new(BIN).arg("--data-dir").arg(data).args(args).env_remove("DROVER_DATABASE_URL").output().unwrap();
    assert!(out.status.success(), "droverd {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

pub(crate) fn admin_token(data: &Path) -> String {
    let out = droverd_cli(data, &["token", "create", "--role", "admin", "--name", "fleet test"]);
    out.split_whitespace().find(|w| w.starts_with("drv_")).expect("a token in the output").to_string()
}

pub(crate) fn post(base: &str, path: &str, token: &str, body: Value) -> (u16, Value) {
    let resp = agent()
        .post(&format!("{base}{path}"))
        .header("Authorization", &format!("Bearer {token}"))
        .send_json(body)
        .unwrap();
    let status = resp.status().as_u16();
    let body: Value = resp.into_body().read_json().unwrap_or(Value::Null);
    (status, body)
}

/// A device's key pair, made here as the agent makes it on the device.
pub(crate) struct DeviceKey {
    pub(crate) key: rcgen::KeyPair,
}

impl DeviceKey {
    pub(crate) fn new() -> DeviceKey {
        DeviceKey { key: rcgen::KeyPair::generate().unwrap() }
    }
    fn csr(&self) -> String {
        rcgen::CertificateParams::default().serialize_request(&self.key).unwrap().pem().unwrap()
    }
}

/// Enrolls over the HTTPS device endpoint, trusting only the fleet CA. Returns (id, cert).
pub(crate) fn enroll_https(
    device_port: u16,
    ca_pem: &str,
    key: &DeviceKey,
    serial: &str,
    token: &str,
) -> (String, String) {
    let ca = ureq::tls::Certificate::from_pem(ca_pem.as_bytes()).unwrap();
    let tls = ureq::tls::TlsConfig::builder().root_certs(ureq::tls::RootCerts::Specific(Arc::new(vec![ca]))).build();
    let https = ureq::Agent::config_builder().tls_config(tls).http_status_as_error(false).build().new_agent();
    let body = json!({"csr_pem": key.csr(), "identity": {"serial": serial}, "token": token});
    let resp = https.post(&format!("https://localhost:{device_port}/api/v1/enroll")).send_json(&body).unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let v: Value = resp.into_body().read_json().unwrap();
    assert_eq!(v["status"], "accepted", "{v}");
    (v["device_id"].as_str().unwrap().to_string(), v["certificate_pem"].as_str().unwrap().to_string())
}

pub(crate) fn client_tls(ca_pem: &str, cert_pem: &str, key_pem: &str) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(
            vec![CertificateDer::from_pem_slice(cert_pem.as_bytes()).unwrap()],
            PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap(),
        )
        .unwrap();
    Arc::new(config)
}

/// A device speaking the protocol by hand (rumqttc): status with its will, hello, inventory.
/// It reconnects by itself after errors, like any MQTT device; events arrive on a channel.
struct MqttDevice {
    events: mpsc::UnboundedReceiver<String>,
    task: tokio::task::JoinHandle<()>,
}

impl MqttDevice {
    fn connect(id: &str, port: u16, tls: Arc<rustls::ClientConfig>, keep_alive: u64) -> MqttDevice {
        let status = format!("drover/v1/d/{id}/up/status");
        let mut opts = MqttOptions::new(id, "localhost", port);
        opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls)));
        opts.set_keep_alive(Duration::from_secs(keep_alive));
        opts.set_last_will(LastWill::new(&status, r#"{"v":1,"state":"offline"}"#, QoS::AtLeastOnce, true, None));
        let (client, mut eventloop) = AsyncClient::new(opts, 16);
        let (tx, events) = mpsc::unbounded_channel();
        let id = id.to_string();
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        let _ = tx.send("connected".into());
                        let up = |c: &str| format!("drover/v1/d/{id}/up/{c}");
                        let _ = client.try_publish(up("status"), QoS::AtLeastOnce, true, r#"{"v":1,"state":"online"}"#);
                        let _ = client.try_publish(
                            up("hello"),
                            QoS::AtLeastOnce,
                            false,
                            r#"{"v":1,"agent":"fleet-test/1"}"#,
                        );
                        let inventory = r#"{"v":1,"attributes":{"arch":"aarch64","os":"Test OS 1"}}"#;
                        let _ = client.try_publish(up("inventory"), QoS::AtLeastOnce, false, inventory);
                    }
                    Ok(_) => {}
                    Err(e) => {
                        let _ = tx.send(format!("error: {e}"));
                        tokio::time::sleep(Duration::from_millis(300)).await;
                    }
                }
            }
        });
        MqttDevice { events, task }
    }

    async fn next(&mut self, what: &str) -> String {
        tokio::time::timeout(Duration::from_secs(20), self.events.recv())
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
            .unwrap()
    }
}

/// Polls the device until `pred` holds on its API view.
async fn device_becomes(base: &str, token: &str, id: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (url, token) = (format!("{base}/api/v1/devices/{id}"), token.to_string());
        let (status, v) = tokio::task::spawn_blocking(move || get_json(&url, Some(&token))).await.unwrap();
        assert_eq!(status, 200, "{v}");
        if pred(&v) {
            return v;
        }
        assert!(Instant::now() < deadline, "device {id} never became {what}: {v}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn online(v: &Value) -> bool {
    v["online"] == true || v["device"]["online"] == true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_enroll_over_https_connect_over_mutual_tls_and_are_seen() {
    let dir = TempDir::new("fleet");
    let data = dir.path().join("data");
    let mut server = Droverd::start(&data, None, &[]);
    let (mqtt, dev) = (server.mqtt, server.dev);
    let token = admin_token(&data);
    let ca_pem = droverd_cli(&data, &["ca", "cert"]);
    let base = server.base.clone();

    // The device port speaks TLS only.
    let plain = agent().post(&format!("http://127.0.0.1:{dev}/api/v1/enroll")).send_json(json!({}));
    assert!(plain.is_err(), "plain HTTP on the device port must fail");

    let (status, t) = post(&base, "/api/v1/enrollment-tokens", &token, json!({"name": "factory", "max_uses": 5}));
    assert_eq!(status, 201, "{t}");
    let enroll_secret = t["secret"].as_str().unwrap().to_string();

    let keys = [DeviceKey::new(), DeviceKey::new()];
    let mut ids = Vec::new();
    let mut tls = Vec::new();
    for (i, key) in keys.iter().enumerate() {
        let (ca, secret) = (ca_pem.clone(), enroll_secret.clone());
        let (csr_key, serial) = (key.key.serialize_pem(), format!("SN-{i}"));
        let (id, cert) = tokio::task::spawn_blocking(move || {
            let key = DeviceKey { key: rcgen::KeyPair::from_pem(&csr_key).unwrap() };
            enroll_https(dev, &ca, &key, &serial, &secret)
        })
        .await
        .unwrap();
        tls.push(client_tls(&ca_pem, &cert, &key.key.serialize_pem()));
        ids.push(id);
    }

    // Connected and reporting: online, agent and inventory in the API.
    let mut a = MqttDevice::connect(&ids[0], mqtt, tls[0].clone(), 30);
    assert_eq!(a.next("CONNACK").await, "connected");
    let v = device_becomes(&base, &token, &ids[0], "online with its inventory", |v| {
        online(v) && v["attributes"]["arch"] == "aarch64"
    })
    .await;
    assert_eq!(v["agent"].as_str().or(v["device"]["agent"].as_str()), Some("fleet-test/1"), "{v}");
    let metrics_url = format!("{base}/metrics");
    let metrics = tokio::task::spawn_blocking(move || {
        agent().get(&metrics_url).call().unwrap().into_body().read_to_string().unwrap()
    })
    .await
    .unwrap();
    // The device, this server's consumer of device traffic and its remote-access relay.
    assert!(metrics.contains("drover_mqtt_connections 3"), "{metrics}");

    // The connection dies without DISCONNECT: offline at once (the broker publishes the will).
    a.task.abort();
    let started = Instant::now();
    device_becomes(&base, &token, &ids[0], "offline", |v| !online(v)).await;
    assert!(started.elapsed() < Duration::from_secs(5), "offline after {:?}", started.elapsed());

    // Decommissioned while connected: dropped within seconds, and refused when it retries.
    let mut b = MqttDevice::connect(&ids[1], mqtt, tls[1].clone(), 30);
    assert_eq!(b.next("CONNACK").await, "connected");
    device_becomes(&base, &token, &ids[1], "online", online).await;
    let (status, _) = post(&base, &format!("/api/v1/devices/{}/decommission", ids[1]), &token, json!({}));
    assert_eq!(status, 200);
    let dropped = b.next("the broker dropping the device").await;
    assert!(dropped.contains("NotAuthorized"), "{dropped}");
    let retry = b.next("the reconnect being refused").await;
    assert!(retry.contains("NotAuthorized"), "{retry}");
    b.task.abort();

    // The server (and its embedded broker) restarts under a connected device: it comes back.
    let mut a = MqttDevice::connect(&ids[0], mqtt, tls[0].clone(), 30);
    assert_eq!(a.next("CONNACK").await, "connected");
    let before = device_becomes(&base, &token, &ids[0], "online", online).await["connected_at"].clone();
    assert!(before.is_string(), "connected_at is reported");
    tokio::task::block_in_place(|| server.restart());
    let _lost = a.next("the connection to end with the server").await;
    loop {
        if a.next("a reconnect").await == "connected" {
            break;
        }
    }
    device_becomes(&base, &token, &ids[0], "online again after the restart", |v| {
        online(v) && v["connected_at"] != before
    })
    .await;
    a.task.abort();
    tokio::task::block_in_place(|| server.stop());
}

/// Mosquitto configured exactly as docs/mosquitto.md says (read from it): mutual TLS with the
/// fleet CA, the certificate's name as the username, each device confined to its own prefix.
struct Mosquitto {
    child: Child,
}

impl Mosquitto {
    fn start(dir: &Path, port: u16, ca: &rcgen::Issuer<'static, rcgen::KeyPair>, ca_pem: &str) -> Mosquitto {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
        params.distinguished_name.push(rcgen::DnType::CommonName, "mosquitto");
        let cert = params.signed_by(&key, ca).unwrap();
        std::fs::write(dir.join("ca.crt"), ca_pem).unwrap();
        std::fs::write(dir.join("server.crt"), cert.pem()).unwrap();
        std::fs::write(dir.join("server.key"), key.serialize_pem()).unwrap();
        let conf = crate::support::mosquitto_config(dir, port);
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto (Debian package mosquitto) must be installed");
        eventually(Duration::from_secs(10), "mosquitto to listen", || {
            std::net::TcpStream::connect(("127.0.0.1", port)).ok()
        });
        Mosquitto { child }
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_devices_work_through_an_external_mosquitto() {
    let dir = TempDir::new("fleet-mosquitto");
    let data = dir.path().join("data");
    // An external CA shared by droverd (issuing) and Mosquitto (verifying).
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name.push(rcgen::DnType::CommonName, "Fleet CA for Mosquitto");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_pem = params.self_signed(&ca_key).unwrap().pem();
    std::fs::write(dir.path().join("fleet-ca.crt"), &ca_pem).unwrap();
    std::fs::write(dir.path().join("fleet-ca.key"), ca_key.serialize_pem()).unwrap();
    let issuer = rcgen::Issuer::new(params, ca_key);
    let broker_port = free_port();
    let _mosquitto = Mosquitto::start(dir.path(), broker_port, &issuer, &ca_pem);

    let url = format!("mqtts://localhost:{broker_port}");
    let ca_cert = dir.path().join("fleet-ca.crt").display().to_string();
    let ca_key = dir.path().join("fleet-ca.key").display().to_string();
    let server = Droverd::start(
        &data,
        Some(&url),
        &[("DROVER_CA_CERT_FILE", ca_cert.as_str()), ("DROVER_CA_KEY_FILE", ca_key.as_str())],
    );
    let dev = server.dev;
    let token = admin_token(&data);
    let base = server.base.clone();
    let (status, t) = post(&base, "/api/v1/enrollment-tokens", &token, json!({"name": "factory"}));
    assert_eq!(status, 201, "{t}");
    let secret = t["secret"].as_str().unwrap().to_string();

    let key = DeviceKey::new();
    let key_pem = key.key.serialize_pem();
    let (ca, kp) = (ca_pem.clone(), key_pem.clone());
    let (id, cert) = tokio::task::spawn_blocking(move || {
        let key = DeviceKey { key: rcgen::KeyPair::from_pem(&kp).unwrap() };
        enroll_https(dev, &ca, &key, "SN-M1", &secret)
    })
    .await
    .unwrap();

    // Through Mosquitto, the server sees the device come online with its inventory...
    let mut d = MqttDevice::connect(&id, broker_port, client_tls(&ca_pem, &cert, &key_pem), 30);
    assert_eq!(d.next("CONNACK").await, "connected");
    device_becomes(&base, &token, &id, "online with its inventory through Mosquitto", |v| {
        online(v) && v["attributes"]["os"] == "Test OS 1"
    })
    .await;
    // ...and go offline when its connection dies (Mosquitto publishes the will).
    d.task.abort();
    device_becomes(&base, &token, &id, "offline through Mosquitto", |v| !online(v)).await;
}
