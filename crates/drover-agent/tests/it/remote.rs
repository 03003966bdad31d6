//! Remote access end to end: the real `drover-agent` binary and a real Mosquitto with mutual
//! TLS; the test plays droverd with an MQTT client of the server's certificate and the
//! protocol crate's frame codec and flow control (so a device that overran its credit fails
//! the test).

use std::collections::{HashMap, VecDeque};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use drover_proto::remote::{
    self, Control, ControlOp, Direction, ExitStatus, FileDirection, FileParams, FileSummary, FrameType, Header, Reason,
    RemoteCommand, ResetBody, STREAM_WINDOW, SessionFlow, StreamFlow, TerminalParams,
};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use rumqttc::{TlsConfiguration, Transport};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::time::{Instant, timeout};

use crate::support::*;

const BIN: &str = env!("CARGO_BIN_EXE_drover-agent");
const WAIT: Duration = Duration::from_secs(20);
/// The unprivileged user the terminal runs as (the tests run the agent as root).
const TERM_USER: &str = "cloudsdk";

/// A real agent process, provisioned with a device certificate; SIGTERM and reaped on drop.
struct Agent {
    child: Child,
    dir: PathBuf,
}

impl Agent {
    fn start(ca: &Ca, m: &Mosquitto, id: &str, remote: &str) -> Agent {
        let dir = temp_dir(&format!("remote-{id}"));
        let dev = Device::new(ca, id);
        let data = dir.join("data");
        std::fs::create_dir_all(&data).unwrap();
        write(&data.join("device.key"), &dev.key.to_pem());
        std::fs::set_permissions(data.join("device.key"), std::fs::Permissions::from_mode(0o600)).unwrap();
        write(&data.join("device.crt"), &dev.cert_pem);
        write(&data.join("ca.crt"), &ca.cert_pem);
        write(&data.join("device.json"), &format!("{{\"device_id\":\"{id}\"}}"));
        let cfg = dir.join("agent.toml");
        write(
            &cfg,
            &format!(
                "mqtt_url = \"mqtts://127.0.0.1:{}\"\nca_file = {:?}\ndata_dir = {data:?}\nkeepalive_secs = 5\n\
                 inventory_scripts_dir = {:?}\nlog_level = \"debug\"\n{remote}",
                m.port,
                data.join("ca.crt"),
                dir.join("inventory.d")
            ),
        );
        let log = std::fs::File::create(dir.join("agent.log")).unwrap();
        let child =
            Command::new(BIN).args(["run", "--config"]).arg(&cfg).stdout(Stdio::null()).stderr(log).spawn().unwrap();
        Agent { child, dir }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }

    /// Resident memory in KiB.
    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg(self.child.id().to_string()).status();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("agent log:\n{}", self.log());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The server's side: an MQTT client with the service certificate, subscribed to one device.
struct Server {
    client: AsyncClient,
    device: String,
    rx: mpsc::UnboundedReceiver<(String, Bytes)>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Server {
    /// Connects, subscribes to everything of `device`, and waits for the agent's retained
    /// `online` (sent after it subscribed to its downlink).
    async fn start(ca: &Ca, m: &Mosquitto, device: &str) -> Server {
        let me = Device::new(ca, SERVICE_CN);
        let mut o = MqttOptions::new(format!("server-{}", free_port()), "127.0.0.1", m.port);
        o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(me.tls(&ca.cert_pem))));
        o.set_keep_alive(Duration::from_secs(30));
        o.set_max_packet_size(Some(1 << 20));
        let (client, mut ev) = AsyncClient::new(o, 256);
        let (tx, rx) = mpsc::unbounded_channel();
        let (c, filter) = (client.clone(), format!("drover/v1/d/{device}/#"));
        let task = tokio::spawn(async move {
            loop {
                match ev.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        c.subscribe(filter.clone(), QoS::AtLeastOnce).await.unwrap()
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let _ = tx.send((String::from_utf8_lossy(&p.topic).into_owned(), p.payload));
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            }
        });
        let mut s = Server { client, device: device.to_string(), rx, task };
        let deadline = Instant::now() + WAIT;
        loop {
            match tokio::time::timeout_at(deadline, s.rx.recv()).await {
                Ok(Some((t, p))) if t.ends_with("/up/status") && p.as_ref() == br#"{"v":1,"state":"online"}"# => break,
                Ok(Some(_)) => {}
                _ => panic!("{device} did not come online"),
            }
        }
        s
    }

    /// Opens a session: the `ready`, or the refusal.
    async fn open(&mut self, cmd: RemoteCommand) -> Result<Sess<'_>, Control> {
        let id = cmd.session.clone();
        let topic = format!("drover/v1/d/{}/down/remote", self.device);
        self.client.publish(topic, QoS::AtLeastOnce, false, serde_json::to_vec(&cmd).unwrap()).await.unwrap();
        let mut s = Sess {
            d: remote::session_topic(&self.device, &id, Direction::Down),
            u: remote::session_topic(&self.device, &id, Direction::Up),
            srv: self,
            flow: SessionFlow::new(),
            streams: HashMap::new(),
            backlog: VecDeque::new(),
        };
        let f = s.recv().await;
        assert_eq!((f.kind, f.stream), (FrameType::Control, 0), "first frame");
        let c: Control = serde_json::from_slice(&f.payload).unwrap();
        match c.op {
            ControlOp::Ready => {
                s.streams.insert(remote::MAIN_STREAM, StreamFlow::new());
                Ok(s)
            }
            ControlOp::Refused => Err(c),
            ControlOp::Close => panic!("close before ready: {c:?}"),
        }
    }
}

#[derive(Debug)]
struct F {
    kind: FrameType,
    stream: u16,
    payload: Vec<u8>,
}

impl F {
    fn json<T: serde::de::DeserializeOwned>(&self) -> T {
        serde_json::from_slice(&self.payload)
            .unwrap_or_else(|e| panic!("{:?}: {e}", String::from_utf8_lossy(&self.payload)))
    }
}

/// One session, driven as droverd would: sequence checked, credit kept both ways.
struct Sess<'a> {
    srv: &'a mut Server,
    d: String,
    u: String,
    flow: SessionFlow,
    streams: HashMap<u16, StreamFlow>,
    backlog: VecDeque<F>,
}

impl Sess<'_> {
    /// The next frame off the wire. Checks the sequence, the device's credit (an overrun
    /// fails the test) and grants session frames back.
    async fn recv(&mut self) -> F {
        loop {
            let (t, p) = match timeout(WAIT, self.srv.rx.recv()).await {
                Ok(Some(m)) => m,
                _ => panic!("no frame on {} within {WAIT:?}", self.u),
            };
            if t != self.u {
                continue;
            }
            let f = remote::decode(&p).unwrap();
            let h = f.header;
            self.flow.on_frame(&h).unwrap();
            if let Some(g) = self.flow.take_grant() {
                self.send(FrameType::Window, 0, g, &[]).await;
            }
            if h.stream != 0
                && let Some(s) = self.streams.get_mut(&h.stream)
            {
                s.on_credit(h.stream, h.credit).unwrap();
                if h.kind == FrameType::Data {
                    s.on_received(h.stream, f.payload.len()).expect("the device sent more than it was granted");
                }
            }
            return F { kind: h.kind, stream: h.stream, payload: f.payload.to_vec() };
        }
    }

    async fn next(&mut self) -> F {
        match self.backlog.pop_front() {
            Some(f) => f,
            None => self.recv().await,
        }
    }

    async fn send(&mut self, kind: FrameType, stream: u16, credit: u32, payload: &[u8]) {
        let frame = self.flow.encode(Header::new(kind, stream, credit), payload);
        self.srv.client.publish(self.d.as_str(), QoS::AtMostOnce, false, frame).await.unwrap();
    }

    /// Whether `n` bytes of DATA may go on `stream` now.
    fn may_send(&self, stream: u16, n: usize) -> bool {
        self.flow.can_send_data() && self.streams.get(&stream).is_some_and(|s| s.sendable() >= n)
    }

    /// Sends DATA, waiting (and keeping what arrives meanwhile) for credit.
    async fn send_data(&mut self, stream: u16, data: &[u8]) {
        for chunk in data.chunks(remote::MAX_FRAME_DATA) {
            while !self.may_send(stream, chunk.len()) {
                let f = self.recv().await;
                self.backlog.push_back(f);
            }
            self.flow.on_data_sent();
            self.streams.get_mut(&stream).unwrap().on_sent(chunk.len());
            self.send(FrameType::Data, stream, 0, chunk).await;
        }
    }

    /// The test has taken `n` bytes of `stream`: grant them back.
    async fn consumed(&mut self, stream: u16, n: usize) {
        let s = self.streams.get_mut(&stream).unwrap();
        s.on_consumed(n);
        if let Some(g) = s.take_grant(false) {
            self.send(FrameType::Window, stream, g, &[]).await;
        }
    }

    async fn control(&mut self, c: &Control) {
        self.send(FrameType::Control, 0, 0, &serde_json::to_vec(c).unwrap()).await;
    }

    /// Reads the terminal until its output contains `needle`.
    async fn read_until(&mut self, needle: &str) -> String {
        let mut out = String::new();
        let deadline = Instant::now() + WAIT;
        while !out.contains(needle) {
            assert!(Instant::now() < deadline, "no {needle:?} in the terminal's output: {out:?}");
            let f = self.next().await;
            if f.kind == FrameType::Data {
                out.push_str(&String::from_utf8_lossy(&f.payload));
                self.consumed(f.stream, f.payload.len()).await;
            }
        }
        out
    }

    /// The frames up to the device's `close`, and that close.
    async fn until_close(&mut self) -> (Vec<F>, Control) {
        let mut seen = Vec::new();
        loop {
            let f = self.next().await;
            if f.kind == FrameType::Control {
                let c: Control = f.json();
                if c.op == ControlOp::Close {
                    return (seen, c);
                }
            }
            seen.push(f);
        }
    }
}

fn all_on(files: &Path) -> String {
    format!(
        "[remote]\nterminal = true\nfiles = true\nforward = true\nuser = \"{TERM_USER}\"\nfile_paths = [{files:?}]\n\
         max_file_size = 67108864\nforward_allow = [\"127.0.0.1:*\"]\n"
    )
}

fn session_id() -> String {
    format!("s-{:x}", rand::random::<u64>())
}

/// A PTY session through the broker: typed input runs as the configured user, output comes
/// back, a resize changes `stty size`, Ctrl-C interrupts a `sleep`, the exit status is
/// reported. Bad input: a RESIZE to 0 rows (ignored, the size stays).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminal_session() {
    let ca = Ca::new("fleet CA");
    let m = Mosquitto::start(&ca);
    let files = temp_dir("term-files");
    let _agent = Agent::start(&ca, &m, "term-1", &all_on(&files));
    let mut srv = Server::start(&ca, &m, "term-1").await;
    let t = TerminalParams { rows: 24, cols: 80, term: "xterm-256color".into() };
    let mut s = srv.open(RemoteCommand::open_terminal(&session_id(), t)).await.expect("ready");

    s.send_data(1, b"echo drover-$((6*7)) $(id -un) $TERM\r").await;
    let out = s.read_until(&format!("drover-42 {TERM_USER} xterm-256color")).await;
    assert!(!out.contains("drover-42 root"), "{out}");

    s.send(FrameType::Resize, 1, 0, &remote::resize_payload(50, 132)).await;
    s.send(FrameType::Resize, 1, 0, &remote::resize_payload(0, 10)).await;
    s.send_data(1, b"echo size=$(stty size)\r").await;
    s.read_until("size=50 132").await;

    s.send_data(1, b"sleep 29.75; echo not-$((2+3))\r").await;
    s.read_until("sleep 29.75").await;
    // Wait for the sleep to run (its command line is echoed before it starts): a process
    // with exactly that command line.
    let deadline = Instant::now() + WAIT;
    while !std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .any(|e| std::fs::read(e.path().join("cmdline")).is_ok_and(|c| c == b"sleep\x0029.75\x00"))
    {
        assert!(Instant::now() < deadline, "the sleep did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let t0 = Instant::now();
    s.send_data(1, &[3]).await;
    s.send_data(1, b"echo after-$((1+1))\r").await;
    let out = s.read_until("after-2").await;
    assert!(t0.elapsed() < Duration::from_secs(10), "Ctrl-C did not interrupt the sleep");
    assert!(!out.contains("not-5"), "{out}");

    s.send_data(1, b"exit 7\r").await;
    let (frames, close) = s.until_close().await;
    let exit = frames.iter().find(|f| f.kind == FrameType::Exit).expect("an EXIT frame");
    assert_eq!(exit.json::<ExitStatus>(), ExitStatus { code: Some(7), signal: None });
    assert_eq!(close.reason, Some(Reason::Exited));
    assert!(close.bytes_down.unwrap() > 50 && close.bytes_up.unwrap() > 50, "{close:?}");
}

/// Closing a terminal session hangs up the shell: nothing of it runs afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminal_close_hangs_up_the_shell() {
    let ca = Ca::new("fleet CA");
    let m = Mosquitto::start(&ca);
    let files = temp_dir("hup-files");
    let _agent = Agent::start(&ca, &m, "term-2", &all_on(&files));
    let mut srv = Server::start(&ca, &m, "term-2").await;
    let t = TerminalParams { rows: 24, cols: 80, term: "xterm".into() };
    let mut s = srv.open(RemoteCommand::open_terminal(&session_id(), t)).await.expect("ready");
    // The echoed command line holds neither digits after "pid=" nor "42end".
    s.send_data(1, b"echo pid=$$ $((40+2))end\r").await;
    let out = s.read_until("42end").await;
    let pid: u32 = out
        .split("pid=")
        .find_map(|r| r.split(' ').next().and_then(|p| p.parse().ok()))
        .unwrap_or_else(|| panic!("no pid in {out:?}"));
    assert!(Path::new(&format!("/proc/{pid}")).exists());
    s.control(&Control::with_reason(ControlOp::Close, Reason::Closed, "")).await;
    let (_, close) = s.until_close().await;
    assert_eq!(close.reason, Some(Reason::Closed));
    let deadline = Instant::now() + WAIT;
    while Path::new(&format!("/proc/{pid}")).exists() {
        assert!(Instant::now() < deadline, "the shell {pid} survived the close");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn sha(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

fn upload(path: &Path, data: &[u8]) -> FileParams {
    FileParams {
        direction: FileDirection::Upload,
        path: path.display().to_string(),
        size: Some(data.len() as u64),
        sha256: Some(sha(data)),
        mode: Some(0o640),
    }
}

fn download(path: &Path) -> FileParams {
    FileParams {
        direction: FileDirection::Download,
        path: path.display().to_string(),
        size: None,
        sha256: None,
        mode: None,
    }
}

/// No temporary file is left in `dir`.
fn no_part_files(dir: &Path) {
    let left: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".part"))
        .collect();
    assert!(left.is_empty(), "temporary files left: {left:?}");
}

/// A file both ways with the hash checked; a wrong hash, a cut transfer and a short one leave
/// the target as it was and no temporary file; paths outside `file_paths` (also through a
/// symbolic link) and files over `max_file_size` are refused. Bad input: each of those.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_transfer() {
    let ca = Ca::new("fleet CA");
    let m = Mosquitto::start(&ca);
    let files = temp_dir("files");
    std::fs::create_dir_all(files.join("sub")).unwrap();
    std::os::unix::fs::symlink("/etc", files.join("etc-link")).unwrap();
    let _agent = Agent::start(&ca, &m, "files-1", &all_on(&files));
    let mut srv = Server::start(&ca, &m, "files-1").await;
    let data = pattern(24 << 20, 7);
    let target = files.join("sub/blob.bin");

    // Up.
    let mut s = srv.open(RemoteCommand::open_files(&session_id(), upload(&target, &data))).await.expect("ready");
    s.send_data(1, &data).await;
    s.send(FrameType::Eof, 1, 0, &[]).await;
    let (frames, close) = s.until_close().await;
    let eof = frames.iter().find(|f| f.kind == FrameType::Eof).expect("EOF with the summary");
    assert_eq!(eof.json::<FileSummary>(), FileSummary { size: data.len() as u64, sha256: sha(&data) });
    assert_eq!(close.reason, Some(Reason::Closed));
    assert!(std::fs::read(&target).unwrap() == data, "the file on the device differs");
    assert_eq!(std::fs::metadata(&target).unwrap().permissions().mode() & 0o777, 0o640);
    no_part_files(&files.join("sub"));

    // Down.
    let mut s = srv.open(RemoteCommand::open_files(&session_id(), download(&target))).await.expect("ready");
    let mut got = Vec::new();
    let summary: FileSummary = loop {
        let f = s.next().await;
        match f.kind {
            FrameType::Data => {
                got.extend_from_slice(&f.payload);
                s.consumed(1, f.payload.len()).await;
            }
            FrameType::Eof => break f.json(),
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(summary, FileSummary { size: data.len() as u64, sha256: sha(&data) });
    assert!(got == data, "downloaded bytes differ");
    s.control(&Control::with_reason(ControlOp::Close, Reason::Closed, "")).await;
    assert_eq!(s.until_close().await.1.reason, Some(Reason::Closed));

    // A wrong hash: refused at the end, the old file stays.
    let mut bad = upload(&target, b"new content");
    bad.sha256 = Some(sha(b"other content"));
    let mut s = srv.open(RemoteCommand::open_files(&session_id(), bad)).await.expect("ready");
    s.send_data(1, b"new content").await;
    s.send(FrameType::Eof, 1, 0, &[]).await;
    let (frames, close) = s.until_close().await;
    let reset = frames.iter().find(|f| f.kind == FrameType::Reset).expect("RESET");
    assert_eq!(reset.json::<ResetBody>().reason, Reason::HashMismatch);
    assert_eq!(close.reason, Some(Reason::HashMismatch));
    assert!(std::fs::read(&target).unwrap() == data);
    no_part_files(&files.join("sub"));

    // Fewer bytes than announced.
    let mut s =
        srv.open(RemoteCommand::open_files(&session_id(), upload(&target, b"0123456789"))).await.expect("ready");
    s.send_data(1, b"01234").await;
    s.send(FrameType::Eof, 1, 0, &[]).await;
    assert_eq!(s.until_close().await.1.reason, Some(Reason::SizeMismatch));
    assert!(std::fs::read(&target).unwrap() == data);

    // Cut in the middle: half the bytes, then the session is closed.
    let other = pattern(8 << 20, 9);
    let mut s = srv.open(RemoteCommand::open_files(&session_id(), upload(&target, &other))).await.expect("ready");
    s.send_data(1, &other[..4 << 20]).await;
    s.control(&Control::with_reason(ControlOp::Close, Reason::Closed, "")).await;
    assert_eq!(s.until_close().await.1.reason, Some(Reason::Closed));
    assert!(std::fs::read(&target).unwrap() == data, "a cut upload changed the target");
    no_part_files(&files.join("sub"));

    // A new file cut in the middle does not appear at all.
    let fresh = files.join("sub/fresh.bin");
    let mut s = srv.open(RemoteCommand::open_files(&session_id(), upload(&fresh, &other))).await.expect("ready");
    s.send_data(1, &other[..1 << 20]).await;
    s.control(&Control::with_reason(ControlOp::Close, Reason::Closed, "")).await;
    s.until_close().await;
    assert!(!fresh.exists());
    no_part_files(&files.join("sub"));

    // Refusals.
    let r = refused_for(srv.open(RemoteCommand::open_files(&session_id(), download(Path::new("/etc/passwd")))).await);
    assert_eq!(r, Reason::PathNotAllowed);
    let r =
        refused_for(srv.open(RemoteCommand::open_files(&session_id(), download(&files.join("etc-link/passwd")))).await);
    assert_eq!(r, Reason::PathNotAllowed);
    let r =
        refused_for(srv.open(RemoteCommand::open_files(&session_id(), upload(&files.join("etc-link/x"), b"x"))).await);
    assert_eq!(r, Reason::PathNotAllowed);
    let r = refused_for(srv.open(RemoteCommand::open_files(&session_id(), download(&files.join("missing")))).await);
    assert_eq!(r, Reason::NotFound);
    let mut huge = upload(&files.join("huge"), b"x");
    huge.size = Some(64 << 20 | 1);
    let r = refused_for(srv.open(RemoteCommand::open_files(&session_id(), huge)).await);
    assert_eq!(r, Reason::TooLarge);
    assert!(!Path::new("/etc/x").exists());
}

fn refused_for(r: Result<Sess<'_>, Control>) -> Reason {
    match r {
        Ok(_) => panic!("opened"),
        Err(c) => c.reason.unwrap(),
    }
}

/// Answers every connection with `HTTP/1.1 200` and a body of the length the path asks
/// (`GET /N`); `/flood` writes without end; `/sink` reads nothing.
async fn http_server() -> u16 {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((mut c, _)) = l.accept().await else { return };
            tokio::spawn(async move {
                let mut req = Vec::new();
                let mut buf = [0u8; 1024];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match c.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                let path = String::from_utf8_lossy(&req).split_whitespace().nth(1).unwrap_or("/").to_string();
                match path.as_str() {
                    "/flood" => {
                        let chunk = vec![b'f'; 65536];
                        while c.write_all(&chunk).await.is_ok() {}
                    }
                    "/sink" => tokio::time::sleep(Duration::from_secs(600)).await,
                    p => {
                        let n: usize = p[1..].parse().unwrap_or(0);
                        let body = pattern(n, n as u64);
                        let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {n}\r\nConnection: close\r\n\r\n");
                        let _ = c.write_all(head.as_bytes()).await;
                        let _ = c.write_all(&body).await;
                    }
                }
            });
        }
    });
    port
}

/// 50 concurrent forwarded HTTP requests in one session; a slow reader on either side holds
/// the device at its window (it never overruns, and its memory stays bounded); targets not
/// allowed and closed ports are reset. Bad input: a target outside `forward_allow`, a port
/// nobody listens on, a malformed target.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn port_forwarding() {
    let ca = Ca::new("fleet CA");
    let m = Mosquitto::start(&ca);
    let files = temp_dir("fwd-files");
    let agent = Agent::start(&ca, &m, "fwd-1", &all_on(&files));
    let mut srv = Server::start(&ca, &m, "fwd-1").await;
    let port = http_server().await;
    let target = format!("127.0.0.1:{port}");
    let mut s = srv.open(RemoteCommand::open_forward(&session_id(), Some(&target))).await.expect("ready");

    // 50 streams at once, each a request for a different body length.
    const N: u16 = 50;
    for id in 1..=N {
        s.streams.insert(id, StreamFlow::new());
        s.send(FrameType::Open, id, 0, target.as_bytes()).await;
    }
    let mut bodies: HashMap<u16, Vec<u8>> = HashMap::new();
    let mut accepted = 0;
    let mut done = 0;
    while done < N {
        let f = s.next().await;
        match f.kind {
            FrameType::Accept => {
                accepted += 1;
                let req = format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", 1000 + 7919 * f.stream as usize);
                s.send_data(f.stream, req.as_bytes()).await;
                s.send(FrameType::Eof, f.stream, 0, &[]).await;
            }
            FrameType::Data => {
                bodies.entry(f.stream).or_default().extend_from_slice(&f.payload);
                s.consumed(f.stream, f.payload.len()).await;
            }
            FrameType::Eof => done += 1,
            FrameType::Window => {}
            other => panic!("unexpected {other:?} on stream {}: {:?}", f.stream, String::from_utf8_lossy(&f.payload)),
        }
    }
    assert_eq!(accepted, N);
    for id in 1..=N {
        let n = 1000 + 7919 * id as usize;
        let resp = &bodies[&id];
        let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {n}\r\nConnection: close\r\n\r\n");
        assert!(resp.starts_with(head.as_bytes()), "stream {id}");
        assert!(resp[head.len()..] == pattern(n, n as u64)[..], "stream {id}: body differs");
    }

    // Refused targets.
    s.streams.insert(100, StreamFlow::new());
    s.send(FrameType::Open, 100, 0, b"10.1.2.3:80").await;
    s.streams.insert(101, StreamFlow::new());
    s.send(FrameType::Open, 101, 0, format!("127.0.0.1:{}", free_port()).as_bytes()).await;
    s.streams.insert(102, StreamFlow::new());
    s.send(FrameType::Open, 102, 0, b"not a target").await;
    let mut resets = HashMap::new();
    while resets.len() < 3 {
        let f = s.next().await;
        if f.kind == FrameType::Reset {
            resets.insert(f.stream, f.json::<ResetBody>().reason);
        }
    }
    assert_eq!(resets[&100], Reason::TargetNotAllowed);
    assert_eq!(resets[&101], Reason::ConnectFailed);
    assert_eq!(resets[&102], Reason::BadRequest);

    // A slow reader here: the device side floods, the test grants nothing. The device stops at
    // its window, and its memory stays put.
    let rss_before = agent.rss_kib();
    s.streams.insert(200, StreamFlow::new());
    s.send(FrameType::Open, 200, 0, target.as_bytes()).await;
    let mut flood = 0usize;
    let quiet_for = Duration::from_secs(2);
    let mut last = Instant::now();
    let mut accepted = false;
    while last.elapsed() < quiet_for {
        let f = match timeout(quiet_for, s.next()).await {
            Ok(f) => f,
            Err(_) => break,
        };
        last = Instant::now();
        match f.kind {
            FrameType::Accept => {
                accepted = true;
                s.send_data(200, b"GET /flood HTTP/1.1\r\n\r\n").await;
            }
            FrameType::Data => flood += f.payload.len(),
            _ => {}
        }
    }
    assert!(accepted);
    assert_eq!(flood, STREAM_WINDOW as usize, "the device must send exactly its window, then wait");
    // Reading it now drains at full speed: 64 MiB more through the same stream.
    s.consumed(200, flood).await;
    let mut more = 0usize;
    let t0 = Instant::now();
    while more < 64 << 20 {
        let f = s.next().await;
        if f.kind == FrameType::Data && f.stream == 200 {
            more += f.payload.len();
            s.consumed(200, f.payload.len()).await;
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    eprintln!("forwarded 64 MiB device → test in {secs:.2} s ({:.1} MB/s)", 64.0 * 1.048576 / secs);
    s.send(
        FrameType::Reset,
        200,
        0,
        &serde_json::to_vec(&ResetBody { reason: Reason::Closed, message: None }).unwrap(),
    )
    .await;

    // A slow reader there: the device-side server reads nothing; the test may send its window
    // plus what the device's socket buffers take, then no more.
    s.streams.insert(201, StreamFlow::new());
    s.send(FrameType::Open, 201, 0, target.as_bytes()).await;
    loop {
        let f = s.next().await;
        if f.kind == FrameType::Accept && f.stream == 201 {
            break;
        }
    }
    s.send_data(201, b"GET /sink HTTP/1.1\r\n\r\n").await;
    let chunk = vec![b's'; remote::MAX_FRAME_DATA];
    let mut pushed = 0usize;
    loop {
        while !s.may_send(201, chunk.len()) {
            match timeout(Duration::from_secs(3), s.recv()).await {
                Ok(f) => s.backlog.push_back(f),
                Err(_) => break,
            }
        }
        if !s.may_send(201, chunk.len()) {
            break;
        }
        s.send_data(201, &chunk).await;
        pushed += chunk.len();
        assert!(pushed < 64 << 20, "the device kept granting: {pushed} bytes into a socket nobody reads");
    }
    eprintln!("slow reader on the device: the device took {pushed} bytes, then stopped granting");
    let rss_after = agent.rss_kib();
    eprintln!("agent RSS {rss_before} KiB before the slow readers, {rss_after} KiB after");
    assert!(rss_after < rss_before + 8 * 1024, "memory grew from {rss_before} to {rss_after} KiB");
}

/// Each kind is refused when the device's configuration leaves it off (the default), and a
/// root terminal without `allow_root`. Bad input: a terminal, a file transfer and a forward
/// session to a device that allows none; a terminal as root.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switched_off_kinds_are_refused() {
    let ca = Ca::new("fleet CA");
    let m = Mosquitto::start(&ca);
    let _off = Agent::start(&ca, &m, "off-1", "");
    let _root = Agent::start(&ca, &m, "root-1", "[remote]\nterminal = true\nuser = \"root\"\n");
    let mut srv = Server::start(&ca, &m, "off-1").await;
    let t = TerminalParams { rows: 24, cols: 80, term: "xterm".into() };
    let dl = download(Path::new("/etc/hostname"));
    for cmd in [
        RemoteCommand::open_terminal(&session_id(), t.clone()),
        RemoteCommand::open_files(&session_id(), dl),
        RemoteCommand::open_forward(&session_id(), Some("127.0.0.1:22")),
    ] {
        let kind = cmd.kind;
        match srv.open(cmd).await {
            Ok(_) => panic!("{kind:?} opened on a device that allows none"),
            Err(c) => {
                assert_eq!(c.reason, Some(Reason::Disabled), "{c:?}");
                assert!(c.message.unwrap().contains("switched off"));
            }
        }
    }
    let mut srv = Server::start(&ca, &m, "root-1").await;
    match srv.open(RemoteCommand::open_terminal(&session_id(), t)).await {
        Ok(_) => panic!("a root terminal without allow_root"),
        Err(c) => assert_eq!(c.reason, Some(Reason::UserNotAllowed), "{c:?}"),
    }
}
