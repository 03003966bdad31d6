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

/// What the artifact server did: each request's path and Range header.
#[derive(Debug, Default)]
pub struct Served {
    pub requests: Vec<(String, Option<String>)>,
    pub body_bytes: u64,
}

/// Faults the artifact server injects into its next responses.
#[derive(Debug, Default, Clone)]
pub struct Faults {
    /// Close the connection after this many body bytes, once.
    pub cut_after: Option<u64>,
    /// Sleep this long after each 16 KiB of body.
    pub throttle: Option<Duration>,
}

/// A tiny HTTPS server for artifacts, like droverd's device endpoint: mutual TLS with the
/// fleet CA, `GET <path>` with `Range: bytes=N-`; faults on request.
pub struct ArtifactServer {
    pub port: u16,
    pub files: Arc<std::sync::Mutex<std::collections::HashMap<String, Vec<u8>>>>,
    pub served: Arc<std::sync::Mutex<Served>>,
    pub faults: Arc<std::sync::Mutex<Faults>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl ArtifactServer {
    pub fn start(ca: &Ca) -> ArtifactServer {
        use rustls::pki_types::pem::PemObject;
        let (cert, key) = ca.server_cert();
        let chain = drover_agent::tls::certs_from_pem(cert.as_bytes(), "server").unwrap();
        let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
        let roots = drover_agent::tls::root_store(&[(ca.cert_pem.as_bytes(), "ca")]).unwrap();
        let provider = drover_agent::tls::provider();
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .build()
            .unwrap();
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .unwrap();
        let config = Arc::new(config);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let s = ArtifactServer {
            port,
            files: Arc::default(),
            served: Arc::default(),
            faults: Arc::default(),
            stop: Arc::default(),
        };
        let (files, served, faults, stop) = (s.files.clone(), s.served.clone(), s.faults.clone(), s.stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((tcp, _)) => {
                        let (config, files, served, faults) =
                            (config.clone(), files.clone(), served.clone(), faults.clone());
                        std::thread::spawn(move || {
                            let _ = serve_one(tcp, config, files, served, faults);
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        s
    }

    pub fn put(&self, path: &str, bytes: Vec<u8>) {
        self.files.lock().unwrap().insert(path.to_string(), bytes);
    }

    pub fn set_faults(&self, f: Faults) {
        *self.faults.lock().unwrap() = f;
    }
}

impl Drop for ArtifactServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn serve_one(
    tcp: std::net::TcpStream,
    config: Arc<rustls::ServerConfig>,
    files: Arc<std::sync::Mutex<std::collections::HashMap<String, Vec<u8>>>>,
    served: Arc<std::sync::Mutex<Served>>,
    faults: Arc<std::sync::Mutex<Faults>>,
) -> std::io::Result<()> {
    use std::io::{Read, Write};
    tcp.set_nonblocking(false)?;
    tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
    let conn = rustls::ServerConnection::new(config).map_err(std::io::Error::other)?;
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if tls.read(&mut b)? == 0 || head.len() > 16 * 1024 {
            return Ok(());
        }
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let path = head.split_whitespace().nth(1).unwrap_or("").to_string();
    let range = head.lines().find_map(|l| {
        l.split_once(':').filter(|(k, _)| k.eq_ignore_ascii_case("range")).map(|(_, v)| v.trim().to_string())
    });
    served.lock().unwrap().requests.push((path.clone(), range.clone()));
    let Some(data) = files.lock().unwrap().get(&path).cloned() else {
        tls.write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")?;
        return Ok(());
    };
    let start: u64 = range
        .as_deref()
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    let total = data.len() as u64;
    if start > total {
        tls.write_all(format!("HTTP/1.1 416 Range Not Satisfiable\r\ncontent-range: bytes */{total}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n").as_bytes())?;
        return Ok(());
    }
    let body = &data[start as usize..];
    let head = if range.is_some() {
        format!(
            "HTTP/1.1 206 Partial Content\r\ncontent-length: {}\r\ncontent-range: bytes {start}-{}/{total}\r\nconnection: close\r\n\r\n",
            body.len(),
            total.saturating_sub(1)
        )
    } else {
        format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n", body.len())
    };
    tls.write_all(head.as_bytes())?;
    let f = {
        let mut f = faults.lock().unwrap();
        let now = f.clone();
        f.cut_after = None;
        now
    };
    let mut sent = 0u64;
    for chunk in body.chunks(16 * 1024) {
        let chunk = match f.cut_after {
            Some(cut) if sent + chunk.len() as u64 > cut => &chunk[..(cut - sent) as usize],
            _ => chunk,
        };
        tls.write_all(chunk)?;
        tls.flush()?;
        sent += chunk.len() as u64;
        served.lock().unwrap().body_bytes += chunk.len() as u64;
        if f.cut_after.is_some_and(|c| sent >= c) {
            // A cut connection: no close_notify, just gone.
            tls.sock.shutdown(std::net::Shutdown::Both)?;
            return Ok(());
        }
        if let Some(t) = f.throttle {
            std::thread::sleep(t);
        }
    }
    tls.conn.send_close_notify();
    let _ = tls.flush();
    Ok(())
}
