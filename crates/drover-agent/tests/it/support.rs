//! Test fixtures: a PKI made with rcgen, a real Mosquitto with mutual TLS configured as
//! `docs/mosquitto.md` says, an observer with the server's full-access certificate, and a TCP
//! proxy that can freeze connections (a network that silently dies).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use drover_agent::tls::DeviceKey;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use rumqttc::{TlsConfiguration, Transport};
use tokio::sync::mpsc;

pub const MOSQUITTO: &str = "/usr/sbin/mosquitto";
/// The CN of the server's service certificate, which the ACL gives full access.
pub const SERVICE_CN: &str = "drover-server";

pub fn temp_dir(name: &str) -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let d = std::env::temp_dir().join(format!(
        "drover-agent-it-{}-{name}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A certificate authority.
pub struct Ca {
    pub cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(DnType::CommonName, name);
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let cert = p.self_signed(&key).unwrap();
        Ca { cert_pem: cert.pem(), issuer: Issuer::new(p, key) }
    }

    /// The broker's certificate for 127.0.0.1 and localhost: (cert, key) PEM.
    pub fn server_cert(&self) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
        p.distinguished_name.push(DnType::CommonName, "localhost");
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        (p.signed_by(&key, &self.issuer).unwrap().pem(), key.serialize_pem())
    }

    /// A client certificate with `cn` for `key`, as the fleet CA issues it.
    pub fn client_cert(&self, cn: &str, key: &DeviceKey) -> String {
        let kp = KeyPair::from_pem(&key.to_pem()).unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(DnType::CommonName, cn);
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        p.signed_by(&kp, &self.issuer).unwrap().pem()
    }
}

/// A device identity: key and certificate.
pub struct Device {
    pub id: String,
    pub key: DeviceKey,
    pub cert_pem: String,
}

impl Device {
    pub fn new(ca: &Ca, id: &str) -> Device {
        let key = DeviceKey::generate().unwrap();
        let cert_pem = ca.client_cert(id, &key);
        Device { id: id.to_string(), key, cert_pem }
    }

    pub fn tls(&self, ca_pem: &str) -> Arc<rustls::ClientConfig> {
        drover_agent::tls::mqtt_client_config(&[(ca_pem.as_bytes(), "ca")], self.cert_pem.as_bytes(), &self.key)
            .unwrap()
    }
}

/// A Mosquitto with the TLS listener and ACL of `docs/mosquitto.md`; killed on drop.
pub struct Mosquitto {
    pub port: u16,
    pub dir: PathBuf,
    child: Option<Child>,
}

impl Mosquitto {
    pub fn start(ca: &Ca) -> Mosquitto {
        let dir = temp_dir("mosquitto");
        let (cert, key) = ca.server_cert();
        std::fs::write(dir.join("ca.crt"), &ca.cert_pem).unwrap();
        std::fs::write(dir.join("server.crt"), cert).unwrap();
        std::fs::write(dir.join("server.key"), key).unwrap();
        // The ACL as documented: each device its own prefix, the server everything.
        std::fs::write(
            dir.join("acl"),
            format!("pattern readwrite drover/v1/d/%u/#\n\nuser {SERVICE_CN}\ntopic readwrite #\n"),
        )
        .unwrap();
        let port = free_port();
        let d = dir.display();
        std::fs::write(
            dir.join("mosquitto.conf"),
            format!(
                "per_listener_settings false\n\
                 allow_anonymous false\n\
                 acl_file {d}/acl\n\
                 persistence false\n\
                 log_dest stderr\n\
                 log_type error\nlog_type warning\nlog_type notice\nlog_type information\n\
                 listener {port} 127.0.0.1\n\
                 cafile {d}/ca.crt\n\
                 certfile {d}/server.crt\n\
                 keyfile {d}/server.key\n\
                 require_certificate true\n\
                 use_identity_as_username true\n"
            ),
        )
        .unwrap();
        let mut m = Mosquitto { port, dir, child: None };
        m.spawn();
        m
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join("mosquitto.log")).unwrap();
        let child = Command::new(MOSQUITTO)
            .arg("-c")
            .arg(self.dir.join("mosquitto.conf"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {MOSQUITTO}: {e}"));
        self.child = Some(child);
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("mosquitto did not listen on {}: {}", self.port, self.log());
    }

    /// SIGKILL: the broker vanishes without a goodbye.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts again on the same port.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("mosquitto.log")).unwrap_or_default()
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[derive(Debug, Clone)]
pub struct Msg {
    pub topic: String,
    pub payload: serde_json::Value,
    pub retain: bool,
}

/// An MQTT client with the server's service certificate, subscribed to every device's topics.
pub struct Observer {
    pub client: AsyncClient,
    rx: mpsc::UnboundedReceiver<Msg>,
    task: tokio::task::JoinHandle<()>,
}

impl Observer {
    pub fn start(ca: &Ca, port: u16, filter: &str) -> Observer {
        let me = Device::new(ca, SERVICE_CN);
        let mut o = MqttOptions::new(format!("observer-{}", free_port()), "127.0.0.1", port);
        o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(me.tls(&ca.cert_pem))));
        o.set_keep_alive(Duration::from_secs(30));
        let (client, mut ev) = AsyncClient::new(o, 64);
        let (tx, rx) = mpsc::unbounded_channel();
        let (c, filter) = (client.clone(), filter.to_string());
        let task = tokio::spawn(async move {
            loop {
                match ev.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        c.subscribe(filter.clone(), QoS::AtLeastOnce).await.unwrap();
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let payload = serde_json::from_slice(&p.payload)
                            .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(&p.payload).into()));
                        let topic = String::from_utf8_lossy(&p.topic).into_owned();
                        let _ = tx.send(Msg { topic, payload, retain: p.retain });
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            }
        });
        Observer { client, rx, task }
    }

    /// The next message matching `pred` within `within`; panics with what was seen otherwise.
    pub async fn expect(&mut self, within: Duration, what: &str, pred: impl Fn(&Msg) -> bool) -> Msg {
        let deadline = tokio::time::Instant::now() + within;
        let mut seen = Vec::new();
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(m)) if pred(&m) => return m,
                Ok(Some(m)) => seen.push(m),
                Ok(None) | Err(_) => panic!("no {what} within {within:?}; saw {seen:#?}"),
            }
        }
    }

    /// Every message that arrives within `during`.
    pub async fn collect(&mut self, during: Duration) -> Vec<Msg> {
        let deadline = tokio::time::Instant::now() + during;
        let mut out = Vec::new();
        while let Ok(Some(m)) = tokio::time::timeout_at(deadline, self.rx.recv()).await {
            out.push(m);
        }
        out
    }
}

impl Drop for Observer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub fn is(m: &Msg, device: &str, suffix: &str) -> bool {
    m.topic == format!("drover/v1/d/{device}/{suffix}")
}

pub fn state(m: &Msg) -> &str {
    m.payload["state"].as_str().unwrap_or("")
}

/// A TCP proxy in front of the broker, to break a device's connection in two ways:
/// `freeze` makes every open connection a black hole (no bytes either way, no FIN, no RST), as
/// when a device's network silently dies; `cut` closes every open connection on both sides at
/// once, without an MQTT DISCONNECT. New connections pass normally.
pub struct Proxy {
    pub port: u16,
    frozen_below: Arc<AtomicU64>,
    cut_below: tokio::sync::watch::Sender<u64>,
    next_id: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    pub async fn start(upstream: u16) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let frozen_below = Arc::new(AtomicU64::new(0));
        let next_id = Arc::new(AtomicU64::new(0));
        let (cut_below, cut_rx) = tokio::sync::watch::channel(0u64);
        let (fb, ni) = (frozen_below.clone(), next_id.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((down, _)) = listener.accept().await else { return };
                let id = ni.fetch_add(1, Ordering::SeqCst);
                let (fb, cut) = (fb.clone(), cut_rx.clone());
                tokio::spawn(async move {
                    let Ok(up) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await else { return };
                    let (dr, dw) = down.into_split();
                    let (ur, uw) = up.into_split();
                    tokio::join!(pump(dr, uw, id, fb.clone(), cut.clone()), pump(ur, dw, id, fb, cut));
                });
            }
        });
        Proxy { port, frozen_below, cut_below, next_id, task }
    }

    pub fn freeze(&self) {
        self.frozen_below.store(self.next_id.load(Ordering::SeqCst), Ordering::SeqCst);
    }

    pub fn cut(&self) {
        let _ = self.cut_below.send(self.next_id.load(Ordering::SeqCst));
    }
}

async fn pump(
    mut r: tokio::net::tcp::OwnedReadHalf,
    mut w: tokio::net::tcp::OwnedWriteHalf,
    id: u64,
    frozen_below: Arc<AtomicU64>,
    mut cut_below: tokio::sync::watch::Receiver<u64>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = tokio::select! {
            r = r.read(&mut buf) => match r {
                Ok(0) | Err(_) => 0,
                Ok(n) => n,
            },
            _ = cut_below.wait_for(|below| id < *below) => return,
        };
        if id < frozen_below.load(Ordering::SeqCst) {
            // Not even an end of stream gets through.
            // Hold both halves open, forward nothing: a black hole.
            let _ = cut_below.wait_for(|below| id < *below).await;
            return;
        }
        if n == 0 {
            return;
        }
        if w.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut_below.send_replace(u64::MAX);
        self.task.abort();
    }
}

pub fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
}
