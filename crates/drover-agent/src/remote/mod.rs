//! Remote access on the device (`docs/protocol.md`, "Remote access"; `docs/remote-access.md`):
//! terminal, file transfer and port forwarding, each switched on by `[remote]`.
//!
//! The main session hands `down/remote` commands to the [`manager`] task ([`RemoteLink`]).
//! The manager checks them against the configuration, opens a second MQTT connection
//! (`{device_id}/remote`, same certificate) while sessions are open, subscribes to every
//! session's `d` topic, and routes each frame to its session's task. A session task owns its
//! I/O — the PTY and shell ([`terminal`]), the file ([`files`]), the TCP connections
//! ([`forward`]) — and sends its frames through a [`Link`] that stamps sequence numbers and
//! waits for frame credit. Dropping a session task ends everything it owns: the shell gets
//! SIGHUP, a half-received file is removed, sockets close.

mod files;
mod forward;
mod stream;
mod sys;
mod terminal;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use drover_proto::device::PROTOCOL_VERSION;
use drover_proto::remote::{
    self, Control, ControlOp, FileDirection, FrameType, Header, Op, Reason, RemoteCommand, SessionFlow, SessionKind,
};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};
use rumqttc::{TlsConfiguration, Transport};
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;

use crate::config::RemoteConfig;

/// How long the remote connection stays up after its last session ended.
const LINGER: Duration = Duration::from_secs(20);

/// Where and how the remote connection connects: the main session's broker and TLS.
#[derive(Clone)]
pub struct ConnParams {
    pub device_id: String,
    pub host: String,
    pub port: u16,
    pub tls: Arc<rustls::ClientConfig>,
    pub keepalive: Duration,
}

/// The main session's handle on the manager.
#[derive(Clone)]
pub struct RemoteLink {
    commands: mpsc::Sender<Bytes>,
}

impl RemoteLink {
    /// A `down/remote` payload, as received.
    pub fn command(&self, payload: Bytes) {
        if self.commands.try_send(payload).is_err() {
            tracing::warn!("remote access: too many commands at once; one dropped");
        }
    }
}

/// Starts the manager task (on the current runtime).
pub fn spawn(cfg: RemoteConfig, conn: ConnParams) -> RemoteLink {
    let (tx, rx) = mpsc::channel(32);
    tokio::spawn(manager(Arc::new(cfg), conn, rx));
    RemoteLink { commands: tx }
}

/// A frame (or a close) on its way to a session task.
enum In {
    Frame(Bytes),
    Close,
}

/// A frame on its way to a stream: its type, the credit it carries and its payload.
pub(crate) struct StreamIn {
    kind: FrameType,
    credit: u32,
    payload: Bytes,
}

/// A session's way out: sequence numbers, frame credit, counters.
pub(crate) struct Link {
    client: AsyncClient,
    topic: String,
    flow: tokio::sync::Mutex<SessionFlow>,
    credit: Notify,
    started: Instant,
    /// Milliseconds after `started` of the last DATA either way.
    last_data_ms: AtomicU64,
    bytes_down: AtomicU64,
    bytes_up: AtomicU64,
}

impl Link {
    fn new(client: AsyncClient, device_id: &str, session: &str) -> Link {
        Link {
            client,
            topic: remote::session_topic(device_id, session, remote::Direction::Up),
            flow: tokio::sync::Mutex::new(SessionFlow::new()),
            credit: Notify::new(),
            started: Instant::now(),
            last_data_ms: AtomicU64::new(0),
            bytes_down: AtomicU64::new(0),
            bytes_up: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        self.last_data_ms.store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// Sends a frame other than DATA.
    pub(crate) async fn send(&self, kind: FrameType, stream: u16, credit: u32, payload: &[u8]) {
        let mut flow = self.flow.lock().await;
        let frame = flow.encode(Header::new(kind, stream, credit), payload);
        // Under the lock: frames leave in sequence order.
        let _ = self.client.publish(self.topic.as_str(), QoS::AtMostOnce, false, frame).await;
    }

    pub(crate) async fn send_json<T: serde::Serialize>(&self, kind: FrameType, stream: u16, body: &T) {
        self.send(kind, stream, 0, &serde_json::to_vec(body).unwrap_or_default()).await;
    }

    /// Sends DATA once the session has frame credit (the caller holds stream credit).
    pub(crate) async fn send_data(&self, stream: u16, credit: u32, data: &[u8]) {
        loop {
            let notified = self.credit.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut flow = self.flow.lock().await;
                if flow.can_send_data() {
                    flow.on_data_sent();
                    let frame = flow.encode(Header::new(FrameType::Data, stream, credit), data);
                    let _ = self.client.publish(self.topic.as_str(), QoS::AtMostOnce, false, frame).await;
                    drop(flow);
                    self.bytes_up.fetch_add(data.len() as u64, Ordering::Relaxed);
                    self.touch();
                    return;
                }
            }
            notified.await;
        }
    }

    async fn control(&self, c: &Control) {
        self.send_json(FrameType::Control, 0, c).await;
    }
}

/// A stream's way in.
type Streams = Mutex<HashMap<u16, mpsc::UnboundedSender<StreamIn>>>;

/// What one session task holds.
pub(crate) struct Shared {
    link: Arc<Link>,
    streams: Arc<Streams>,
}

impl Shared {
    /// Registers a stream and returns its way in.
    fn add_stream(&self, id: u16) -> mpsc::UnboundedReceiver<StreamIn> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.streams.lock().unwrap_or_else(|e| e.into_inner()).insert(id, tx);
        rx
    }
}

/// A session's end: the reason and one line on it.
pub(crate) type End = (Reason, String);

/// What a checked `open` starts.
enum Work {
    Terminal(terminal::Terminal),
    Upload(files::Upload),
    Download(files::Download),
    Forward(Arc<RemoteConfig>),
}

struct Mqtt {
    client: AsyncClient,
    eventloop: EventLoop,
    subscribed: bool,
}

async fn poll(m: &mut Option<Mqtt>) -> Result<Event, rumqttc::v5::ConnectionError> {
    match m {
        Some(m) => m.eventloop.poll().await,
        None => std::future::pending().await,
    }
}

fn options(c: &ConnParams) -> MqttOptions {
    let mut o = MqttOptions::new(format!("{}/remote", c.device_id), c.host.clone(), c.port);
    o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(c.tls.clone())));
    o.set_keep_alive(c.keepalive);
    o.set_clean_start(true);
    // Keystrokes and their echo are tiny packets: Nagle's algorithm would hold them back.
    let mut net = rumqttc::NetworkOptions::new();
    net.set_tcp_nodelay(true);
    o.set_network_options(net);
    o.set_max_packet_size(Some((remote::HEADER_LEN + remote::MAX_FRAME_DATA + 1024) as u32));
    o
}

fn refusal(reason: Reason, message: impl Into<String>) -> Control {
    Control::with_reason(ControlOp::Refused, reason, message)
}

struct Running {
    tx: mpsc::UnboundedSender<In>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn manager(cfg: Arc<RemoteConfig>, conn: ConnParams, mut commands: mpsc::Receiver<Bytes>) {
    let mut mqtt: Option<Mqtt> = None;
    let mut sessions: HashMap<String, Running> = HashMap::new();
    // Checked sessions waiting for the subscription before they may say `ready`.
    let mut waiting: Vec<(String, Work, RemoteCommand)> = Vec::new();
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<String>();
    let mut idle_since = Instant::now();
    loop {
        let idle = mqtt.is_some() && sessions.is_empty() && waiting.is_empty();
        tokio::select! {
            cmd = commands.recv() => {
                let Some(cmd) = cmd else { break };
                let refused = match serde_json::from_slice::<RemoteCommand>(&cmd) {
                    Err(e) => {
                        tracing::warn!("remote access: ignoring a malformed command: {e}");
                        continue;
                    }
                    Ok(c) if c.op == Op::Close => {
                        if let Some(s) = sessions.get(&c.session) {
                            let _ = s.tx.send(In::Close);
                        }
                        waiting.retain(|w| w.0 != c.session);
                        continue;
                    }
                    Ok(c) if !remote::valid_session_id(&c.session) => {
                        tracing::warn!(session = %c.session, "remote access: ignoring a command with a bad session id");
                        continue;
                    }
                    Ok(c) if sessions.contains_key(&c.session) || waiting.iter().any(|w| w.0 == c.session) => {
                        tracing::debug!(session = %c.session, "remote access: open repeated; ignored");
                        continue;
                    }
                    Ok(c) => match check_open(&cfg, &c, sessions.len() + waiting.len()) {
                        Ok(work) => {
                            tracing::info!(session = %c.session, kind = ?c.kind, "remote access: session opening");
                            waiting.push((c.session.clone(), work, c));
                            None
                        }
                        Err(r) => {
                            tracing::warn!(session = %c.session, reason = %r.reason.map(|r| r.as_str()).unwrap_or(""),
                                message = r.message.as_deref().unwrap_or(""), "remote access: session refused");
                            Some((c.session, r))
                        }
                    },
                };
                let m = mqtt.get_or_insert_with(|| {
                    let (client, eventloop) = AsyncClient::new(options(&conn), 64);
                    Mqtt { client, eventloop, subscribed: false }
                });
                if let Some((session, r)) = refused {
                    let topic = remote::session_topic(&conn.device_id, &session, remote::Direction::Up);
                    let frame = remote::encode(Header::new(FrameType::Control, 0, 0), &serde_json::to_vec(&r).unwrap_or_default());
                    let _ = m.client.try_publish(topic, QoS::AtMostOnce, false, frame);
                    idle_since = Instant::now();
                }
                if m.subscribed {
                    for (id, work, c) in waiting.drain(..) {
                        let r = start(&m.client, &conn.device_id, &id, work, &c, &cfg, done_tx.clone());
                        sessions.insert(id, r);
                    }
                }
            }
            ev = poll(&mut mqtt) => match ev {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    if let Some(m) = &mqtt {
                        let _ = m.client.try_subscribe(remote::device_sessions_filter(&conn.device_id), QoS::AtMostOnce);
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    if let Some(m) = &mut mqtt {
                        m.subscribed = true;
                        for (id, work, c) in waiting.drain(..) {
                            let r = start(&m.client, &conn.device_id, &id, work, &c, &cfg, done_tx.clone());
                            sessions.insert(id, r);
                        }
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let topic = std::str::from_utf8(&p.topic).unwrap_or("");
                    if let Some((_, id, remote::Direction::Down)) = remote::parse_session_topic(topic)
                        && let Some(s) = sessions.get(id)
                    {
                        let _ = s.tx.send(In::Frame(p.payload));
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    // Frames may have been lost with the connection: its sessions cannot go on.
                    tracing::warn!(sessions = sessions.len(), "remote access: connection lost: {e}");
                    sessions.clear();
                    waiting.clear();
                    mqtt = None;
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            },
            Some(id) = done_rx.recv() => {
                sessions.remove(&id);
                idle_since = Instant::now();
            }
            () = tokio::time::sleep_until(idle_since + LINGER), if idle => {
                if let Some(m) = mqtt.take() {
                    tracing::debug!("remote access: no session open; disconnecting");
                    let _ = m.client.try_disconnect();
                    let mut ev = m.eventloop;
                    let _ = tokio::time::timeout(Duration::from_secs(2), async {
                        while ev.poll().await.is_ok() {}
                    })
                    .await;
                }
            }
        }
    }
}

/// Checks an `open` against the contract and the configuration; the session's work, or the
/// refusal to send.
fn check_open(cfg: &Arc<RemoteConfig>, c: &RemoteCommand, open: usize) -> Result<Work, Control> {
    if c.v != PROTOCOL_VERSION {
        return Err(refusal(Reason::UnsupportedVersion, format!("this device speaks v{PROTOCOL_VERSION}")));
    }
    c.check().map_err(|m| refusal(Reason::BadRequest, m))?;
    let kind = c.kind.unwrap_or(SessionKind::Terminal);
    let on = match kind {
        SessionKind::Terminal => cfg.terminal,
        SessionKind::Files => cfg.files,
        SessionKind::Forward => cfg.forward,
    };
    if !on {
        return Err(refusal(
            Reason::Disabled,
            format!("{} sessions are switched off on this device ([remote] {} = false)", kind.as_str(), kind.as_str()),
        ));
    }
    if open >= cfg.max_sessions {
        return Err(refusal(Reason::Busy, format!("{open} sessions open, at most {}", cfg.max_sessions)));
    }
    match kind {
        SessionKind::Terminal => {
            let t = c.terminal.clone().unwrap_or_else(|| remote::TerminalParams {
                rows: 24,
                cols: 80,
                term: "vt100".into(),
            });
            terminal::check(cfg, t).map(Work::Terminal)
        }
        SessionKind::Files => {
            let f = c.file.as_ref().ok_or_else(|| refusal(Reason::BadRequest, "no file"))?;
            match f.direction {
                FileDirection::Upload => files::Upload::check(cfg, f).map(Work::Upload),
                FileDirection::Download => files::Download::check(cfg, f).map(Work::Download),
            }
        }
        SessionKind::Forward => {
            if let Some(t) = &c.target {
                let target = remote::Target::parse(t).map_err(|m| refusal(Reason::BadRequest, m))?;
                if !target.allowed_by(&cfg.forward_allow) {
                    return Err(refusal(Reason::TargetNotAllowed, format!("{t} is not in [remote] forward_allow")));
                }
            }
            Ok(Work::Forward(cfg.clone()))
        }
    }
}

fn start(
    client: &AsyncClient,
    device_id: &str,
    id: &str,
    work: Work,
    c: &RemoteCommand,
    cfg: &RemoteConfig,
    done: mpsc::UnboundedSender<String>,
) -> Running {
    let (tx, rx) = mpsc::unbounded_channel();
    let link = Arc::new(Link::new(client.clone(), device_id, id));
    let idle = limit(cfg.idle_timeout, c.idle_timeout_s);
    let max = limit(cfg.max_duration, c.max_duration_s);
    let id = id.to_string();
    let task = tokio::spawn(async move {
        let shared = Shared { link: link.clone(), streams: Arc::default() };
        let (reason, message) = run_session(&shared, work, rx, idle, max).await;
        let level_info = matches!(reason, Reason::Closed | Reason::Exited);
        if level_info {
            tracing::info!(session = %id, %reason, "remote access: session ended");
        } else {
            tracing::warn!(session = %id, %reason, message, "remote access: session ended");
        }
        let mut end = Control::with_reason(ControlOp::Close, reason, message);
        end.bytes_down = Some(link.bytes_down.load(Ordering::Relaxed));
        end.bytes_up = Some(link.bytes_up.load(Ordering::Relaxed));
        link.control(&end).await;
        let _ = done.send(id);
    });
    Running { tx, task }
}

/// The smaller of the device's limit and the server's.
fn limit(own: Duration, server: Option<u32>) -> Duration {
    server.map_or(own, |s| own.min(Duration::from_secs(u64::from(s.max(1)))))
}

async fn run_session(sh: &Shared, work: Work, rx: mpsc::UnboundedReceiver<In>, idle: Duration, max: Duration) -> End {
    let mut ready = Control::new(ControlOp::Ready);
    if let Work::Download(d) = &work {
        ready.size = Some(d.size);
    }
    // Streams the session opens itself exist before `ready`, so no frame finds them missing.
    let main = match &work {
        Work::Forward(_) => None,
        _ => Some(sh.add_stream(remote::MAIN_STREAM)),
    };
    sh.link.control(&ready).await;
    let forward_cfg = match &work {
        Work::Forward(c) => Some(c.clone()),
        _ => None,
    };
    let body = async {
        match (work, main) {
            (Work::Terminal(t), Some(rx)) => t.run(sh, rx).await,
            (Work::Upload(u), Some(rx)) => u.run(sh, rx).await,
            (Work::Download(d), Some(rx)) => d.run(sh, rx).await,
            _ => std::future::pending().await,
        }
    };
    tokio::select! {
        end = body => end,
        end = dispatch(sh, rx, forward_cfg) => end,
        end = limits(&sh.link, idle, max) => end,
    }
}

/// Takes the session's frames in order: sequence and session credit, then to their stream;
/// forward streams are opened here.
async fn dispatch(sh: &Shared, mut rx: mpsc::UnboundedReceiver<In>, forward: Option<Arc<RemoteConfig>>) -> End {
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        let frame = match rx.recv().await {
            Some(In::Frame(b)) => b,
            Some(In::Close) | None => return (Reason::Closed, String::new()),
        };
        let f = match remote::decode(&frame) {
            Ok(f) => f,
            Err(e) => return (Reason::ProtocolError, e.to_string()),
        };
        let h = f.header;
        let grant = {
            let mut flow = sh.link.flow.lock().await;
            if let Err(e) = flow.on_frame(&h) {
                return (Reason::ProtocolError, e.to_string());
            }
            flow.take_grant()
        };
        if h.stream == 0 && h.credit > 0 {
            sh.link.credit.notify_waiters();
        }
        if let Some(g) = grant {
            sh.link.send(FrameType::Window, 0, g, &[]).await;
        }
        if h.kind == FrameType::Data {
            sh.link.bytes_down.fetch_add(f.payload.len() as u64, Ordering::Relaxed);
            sh.link.touch();
        }
        if h.kind == FrameType::Control {
            match serde_json::from_slice::<Control>(f.payload) {
                Ok(c) if c.op == ControlOp::Close => return (Reason::Closed, String::new()),
                Ok(_) => {}
                Err(e) => return (Reason::ProtocolError, format!("bad CONTROL: {e}")),
            }
            continue;
        }
        if h.stream == 0 {
            continue;
        }
        if h.kind == FrameType::Open {
            match &forward {
                Some(cfg) => forward::open(sh, &mut tasks, cfg, h.stream, f.payload).await,
                None => return (Reason::ProtocolError, "OPEN outside a forward session".into()),
            }
            continue;
        }
        let payload = frame.slice(remote::HEADER_LEN..);
        let tx = sh.streams.lock().unwrap_or_else(|e| e.into_inner()).get(&h.stream).cloned();
        if let Some(tx) = tx {
            let _ = tx.send(StreamIn { kind: h.kind, credit: h.credit, payload });
        }
        // Reap finished forward streams as we go.
        while tasks.try_join_next().is_some() {}
    }
}

async fn limits(link: &Link, idle: Duration, max: Duration) -> End {
    let deadline = link.started + max;
    loop {
        let last = link.started + Duration::from_millis(link.last_data_ms.load(Ordering::Relaxed));
        let idle_at = last + idle;
        let now = Instant::now();
        if now >= deadline {
            return (Reason::MaxDuration, format!("open for {} s", max.as_secs()));
        }
        if now >= idle_at {
            return (Reason::IdleTimeout, format!("no data for {} s", idle.as_secs()));
        }
        tokio::time::sleep_until(idle_at.min(deadline)).await;
    }
}

/// One line for a refusal, reset or close: an I/O error with what it was about.
pub(crate) fn io_end(what: &str, e: &std::io::Error) -> End {
    (Reason::IoError, format!("{what}: {e}"))
}
