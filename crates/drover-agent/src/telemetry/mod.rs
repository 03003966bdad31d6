//! Telemetry on the device (`docs/telemetry-agent.md`): health metrics collected every
//! interval, metrics and events from applications through the local socket ([`local`]),
//! device rules evaluated on all of it ([`rules`]), everything stored in the on-disk
//! [`outbox`] and sent from there in numbered batches that the server acknowledges, and logs
//! on demand ([`logs`]).
//!
//! The [`Core`] owns the outbox, the sender's window and the rules; the MQTT session talks to
//! it through a [`TelemetryLink`] (connect/disconnect, downlink messages in; messages to
//! publish out), so the fleet simulator drives the same core with made-up metrics.

pub mod collect;
pub mod config;
pub mod local;
pub mod logs;
pub mod outbox;
pub mod rules;

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use drover_proto::device::{Channel, PROTOCOL_VERSION};
use drover_proto::telemetry::{
    Event, LogsRequest, MAX_BATCH_EVENTS, Point, RuleSet, Severity, TelemetryAck, TelemetryBatch,
};
use serde_json::{Map, Value, json};
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};

use self::local::{Aggregator, Sample};
use self::outbox::{Outbox, OutboxConfig, OutboxError, Record};
use self::rules::{Evaluator, Firing, RuleFile};

/// From the session to the core.
#[derive(Debug)]
pub enum Input {
    Connected,
    Disconnected,
    /// A message on `down/telemetry`, `down/rules` or `down/logs`.
    Downlink(Channel, Vec<u8>),
    /// The session could not queue a batch: send it again.
    PublishFailed,
}

/// From the core to the session: publish this.
#[derive(Debug)]
pub struct Outgoing {
    pub channel: Channel,
    pub payload: Vec<u8>,
}

/// The session's ends of the core.
#[derive(Clone)]
pub struct TelemetryLink {
    pub input: mpsc::Sender<Input>,
    pub out: Arc<tokio::sync::Mutex<mpsc::Receiver<Outgoing>>>,
}

impl TelemetryLink {
    pub fn send(&self, i: Input) {
        if let Err(e) = self.input.try_send(i) {
            tracing::debug!("telemetry core busy, input dropped: {e}");
        }
    }
}

/// Where the periodic metrics come from.
pub trait MetricSource: Send + 'static {
    fn collect(&mut self) -> Vec<(String, f64)>;
}

impl MetricSource for collect::Collector {
    fn collect(&mut self) -> Vec<(String, f64)> {
        collect::Collector::collect(self)
    }
}

/// Everything the core needs.
#[derive(Debug, Clone)]
pub struct CoreConfig {
    pub dir: PathBuf,
    pub outbox: OutboxConfig,
    pub interval: Duration,
    pub sync_interval: Duration,
    pub batch_max_points: usize,
    pub window: usize,
    pub ack_timeout: Duration,
    pub action_timeout: Duration,
    pub actions: std::collections::BTreeMap<String, Vec<String>>,
    pub logs: logs::LogsPolicy,
    /// Report the agent's own counters (`agent.outbox.*`, `link.rtt_ms`) each round.
    pub self_metrics: bool,
}

impl CoreConfig {
    pub fn from_config(c: &config::TelemetryConfig) -> Self {
        CoreConfig {
            dir: c.dir.clone(),
            outbox: OutboxConfig::new(c.outbox_max_bytes),
            interval: c.interval,
            sync_interval: c.sync_interval,
            batch_max_points: c.batch_max_points,
            window: c.window,
            ack_timeout: c.ack_timeout,
            action_timeout: c.action_timeout,
            actions: c.actions.clone(),
            logs: logs::LogsPolicy { journal: c.journal, files: c.log_files.clone() },
            self_metrics: true,
        }
    }
}

/// Largest payload of records per batch (keeps a batch well under the 256 KiB message limit).
const BATCH_BYTES: usize = 96 * 1024;

struct Sent {
    seq: u64,
    last: u64,
    at: Instant,
    acked: bool,
}

/// The device's telemetry state; see the module documentation.
pub struct Core {
    cfg: CoreConfig,
    outbox: Outbox,
    connected: bool,
    inflight: VecDeque<Sent>,
    /// Batches sent before the last rewind: an ack for them still counts.
    stale: VecDeque<Sent>,
    rules: Evaluator,
    rule_file: RuleFile,
    agg: Aggregator,
    nonce: u32,
    events: u64,
    rtt_ms: Option<f64>,
    bad_lines: Arc<std::sync::atomic::AtomicU64>,
    out: mpsc::Sender<Outgoing>,
    action_done: mpsc::Sender<Event>,
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// Starts the core on the current runtime; the link goes into the session's configuration.
/// `local` receives the local interface's samples (see [`serve_socket`]).
pub fn spawn(
    cfg: CoreConfig,
    source: impl MetricSource,
    local: Option<mpsc::Receiver<Sample>>,
    bad_lines: Arc<std::sync::atomic::AtomicU64>,
) -> Result<TelemetryLink, OutboxError> {
    let (in_tx, in_rx) = mpsc::channel(256);
    let (out_tx, out_rx) = mpsc::channel(cfg.window + 16);
    let (done_tx, done_rx) = mpsc::channel(64);
    std::fs::create_dir_all(&cfg.dir).map_err(|source| OutboxError::Io { path: cfg.dir.clone(), source })?;
    let outbox = Outbox::open(&cfg.dir.join("outbox"), cfg.outbox)?;
    let rule_file = RuleFile::new(&cfg.dir);
    let set = rule_file.load();
    if let Some(s) = &set {
        tracing::info!(version = s.version, rules = s.rules.len(), "device rules in force");
    }
    let core = Core {
        outbox,
        connected: false,
        inflight: VecDeque::new(),
        stale: VecDeque::new(),
        rules: Evaluator::new(set),
        rule_file,
        agg: Aggregator::default(),
        nonce: rand::random(),
        events: 0,
        rtt_ms: None,
        bad_lines,
        out: out_tx,
        action_done: done_tx,
        cfg,
    };
    tokio::spawn(core.run(source, in_rx, local, done_rx));
    Ok(TelemetryLink { input: in_tx, out: Arc::new(tokio::sync::Mutex::new(out_rx)) })
}

async fn recv_opt<T>(rx: &mut Option<mpsc::Receiver<T>>) -> Option<T> {
    match rx {
        Some(r) => r.recv().await,
        None => std::future::pending().await,
    }
}

impl Core {
    async fn run(
        mut self,
        mut source: impl MetricSource,
        mut input: mpsc::Receiver<Input>,
        mut local: Option<mpsc::Receiver<Sample>>,
        mut done: mpsc::Receiver<Event>,
    ) {
        let mut round = tokio::time::interval(self.cfg.interval);
        round.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut sync = tokio::time::interval(self.cfg.sync_interval);
        sync.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut check = tokio::time::interval(Duration::from_secs(1));
        check.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            let r = tokio::select! {
                _ = round.tick() => {
                    let values = source.collect();
                    self.round(values)
                }
                _ = sync.tick() => self.outbox.sync(),
                _ = check.tick() => {
                    self.check_timeout();
                    self.pump()
                }
                i = input.recv() => match i {
                    Some(i) => self.input(i),
                    None => break,
                },
                Some(s) = recv_opt(&mut local) => self.sample(s),
                Some(e) = done.recv() => self.append_event(e).and_then(|()| self.pump()),
            };
            if let Err(e) = r {
                tracing::error!("telemetry: {e}");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
        let _ = self.outbox.sync();
    }

    /// One collection round: the source's metrics, the local interface's aggregates, the
    /// agent's own counters; rules over all of them; one fsync; send.
    fn round(&mut self, mut values: Vec<(String, f64)>) -> Result<(), OutboxError> {
        let t = now_ms();
        values.extend(self.agg.take());
        if self.cfg.self_metrics {
            values.push(("agent.outbox.dropped".into(), self.outbox.dropped() as f64));
            values.push(("agent.outbox.pending".into(), self.outbox.pending() as f64));
            values.push(("agent.outbox.bytes".into(), self.outbox.bytes() as f64));
            values.push((
                "agent.local.bad_lines".into(),
                self.bad_lines.load(std::sync::atomic::Ordering::Relaxed) as f64,
            ));
            if let Some(r) = self.rtt_ms.take() {
                values.push(("link.rtt_ms".into(), r));
            }
        }
        for (n, v) in values {
            self.point(n, v, t)?;
        }
        self.outbox.sync()?;
        self.pump()
    }

    fn point(&mut self, n: String, v: f64, t: i64) -> Result<(), OutboxError> {
        if !drover_proto::telemetry::valid_value(v) || !drover_proto::telemetry::valid_name(&n) {
            tracing::debug!(name = %n, "telemetry: point outside the protocol's limits, skipped");
            return Ok(());
        }
        let firings = self.rules.metric(&n, v, t);
        self.outbox.append(&Record::Point(Point { n, t, v }))?;
        self.fire(firings)
    }

    fn sample(&mut self, s: Sample) -> Result<(), OutboxError> {
        match s {
            Sample::Point(n, v, t) => self.point(n, v, t.unwrap_or_else(now_ms)),
            Sample::Event { name, severity, data, t } => {
                let t = t.unwrap_or_else(now_ms);
                let firings = self.rules.event(&name, t);
                self.raise(&name, severity, data, t)?;
                self.fire(firings)
            }
            s => {
                if !self.agg.add(&s) {
                    tracing::debug!("local interface: too many names this interval, sample dropped");
                }
                Ok(())
            }
        }
    }

    fn next_event_id(&mut self) -> String {
        self.events += 1;
        format!("{:08x}-{}", self.nonce, self.events)
    }

    fn raise(&mut self, name: &str, severity: Severity, data: Map<String, Value>, t: i64) -> Result<(), OutboxError> {
        let id = self.next_event_id();
        self.append_event(Event { id, t, name: name.into(), severity, data })
    }

    fn append_event(&mut self, e: Event) -> Result<(), OutboxError> {
        tracing::info!(event = %e.name, severity = %e.severity, "telemetry event");
        self.outbox.append(&Record::Event(e))
    }

    fn fire(&mut self, firings: Vec<Firing>) -> Result<(), OutboxError> {
        for f in firings {
            let r = &f.rule;
            tracing::info!(rule = %r.id, value = ?f.value, "device rule fired");
            if let Some(raise) = &r.raise {
                let mut data = Map::new();
                data.insert("rule".into(), r.id.clone().into());
                if let (Some(m), Some(v)) = (&r.metric, f.value) {
                    data.insert("metric".into(), m.clone().into());
                    data.insert("value".into(), json!(v));
                    data.insert("threshold".into(), json!(r.threshold));
                }
                if let Some(ev) = &r.event {
                    data.insert("event".into(), ev.clone().into());
                }
                self.raise(&raise.name, raise.severity, data, f.t)?;
            }
            if let Some(action) = &r.action {
                match self.cfg.actions.get(action).cloned() {
                    None => {
                        tracing::warn!(rule = %r.id, action = %action, "rule names an action this device does not allow");
                        let data = json!({"rule": r.id, "action": action,
                            "error": format!("action {action:?} is not in [telemetry.actions] of this device's config")});
                        self.raise("drover.rules.action_refused", Severity::Warning, obj(data), f.t)?;
                    }
                    Some(argv) => {
                        let id = self.next_event_id();
                        tokio::spawn(run_action(
                            id,
                            r.id.clone(),
                            action.clone(),
                            argv,
                            self.cfg.action_timeout,
                            self.action_done.clone(),
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    fn input(&mut self, i: Input) -> Result<(), OutboxError> {
        match i {
            Input::Connected => {
                self.connected = true;
                self.rewind();
                self.pump()
            }
            Input::Disconnected => {
                self.connected = false;
                Ok(())
            }
            Input::PublishFailed => {
                self.rewind();
                Ok(())
            }
            Input::Downlink(Channel::TelemetryAck, p) => match serde_json::from_slice::<TelemetryAck>(&p) {
                Ok(a) if a.v == PROTOCOL_VERSION => {
                    self.ack(a.seq)?;
                    self.pump()
                }
                Ok(a) => {
                    tracing::warn!(v = a.v, "ignoring a telemetry ack of an unsupported protocol version");
                    Ok(())
                }
                Err(e) => {
                    tracing::warn!("ignoring a malformed telemetry ack: {e}");
                    Ok(())
                }
            },
            Input::Downlink(Channel::Rules, p) => self.on_rules(&p),
            Input::Downlink(Channel::LogsRequest, p) => {
                match serde_json::from_slice::<LogsRequest>(&p) {
                    Ok(req) => {
                        let policy = self.cfg.logs.clone();
                        let out = self.out.clone();
                        tokio::spawn(async move {
                            let reply = logs::answer(&policy, &req).await;
                            tracing::info!(request = %req.request, lines = reply.lines.len(), error = ?reply.error, "logs requested");
                            let payload = serde_json::to_vec(&reply).unwrap_or_default();
                            let _ = out.send(Outgoing { channel: Channel::Logs, payload }).await;
                        });
                    }
                    Err(e) => tracing::warn!("ignoring a malformed logs request: {e}"),
                }
                Ok(())
            }
            Input::Downlink(c, _) => {
                tracing::debug!(channel = c.suffix(), "telemetry: not for me");
                Ok(())
            }
        }
    }

    fn on_rules(&mut self, p: &[u8]) -> Result<(), OutboxError> {
        let t = now_ms();
        let set = match serde_json::from_slice::<RuleSet>(p) {
            Ok(s) if s.v != PROTOCOL_VERSION => {
                tracing::warn!(v = s.v, "ignoring a rule set of an unsupported protocol version");
                return Ok(());
            }
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("refusing a malformed rule set: {e}");
                let data = json!({"error": e.to_string()});
                return self.raise("drover.rules.refused", Severity::Warning, obj(data), t);
            }
        };
        if let Err(e) = set.check() {
            tracing::warn!(version = set.version, "refusing an invalid rule set: {e}");
            let data = json!({"version": set.version, "error": e});
            return self.raise("drover.rules.refused", Severity::Warning, obj(data), t);
        }
        if self.rules.version().is_some_and(|v| set.version <= v) {
            tracing::debug!(version = set.version, "rule set already in force (or older)");
            return Ok(());
        }
        if let Err(e) = self.rule_file.save(&set) {
            tracing::error!(path = %self.rule_file.0.display(), "cannot store the rule set; applied until restart: {e}");
        }
        tracing::info!(version = set.version, rules = set.rules.len(), "device rules applied");
        let version = set.version;
        self.rules.replace(set);
        self.raise("drover.rules.applied", Severity::Info, obj(json!({"version": version})), t)?;
        self.outbox.sync()?;
        self.pump()
    }

    fn rewind(&mut self) {
        self.stale.extend(self.inflight.drain(..));
        while self.stale.len() > 64 {
            self.stale.pop_front();
        }
        self.outbox.rewind();
    }

    fn check_timeout(&mut self) {
        if let Some(s) = self.inflight.iter().find(|s| !s.acked)
            && s.at.elapsed() > self.cfg.ack_timeout
        {
            tracing::warn!(seq = s.seq, "telemetry batch not acknowledged in time; sending again");
            self.rewind();
        }
    }

    /// An ack names one stored batch. Records are deleted only up to the end of the longest
    /// run of acknowledged batches from the oldest, so a batch lost on the way (a server that
    /// was not subscribed yet) is sent again rather than covered by a later batch's ack.
    fn ack(&mut self, seq: u64) -> Result<(), OutboxError> {
        tracing::debug!(seq, "telemetry ack");
        let mut upto = None;
        for q in [&mut self.inflight, &mut self.stale] {
            if let Some(s) = q.iter_mut().find(|s| s.seq == seq) {
                if !s.acked {
                    self.rtt_ms = Some(s.at.elapsed().as_secs_f64() * 1000.0);
                }
                s.acked = true;
            }
            while q.front().is_some_and(|s| s.acked) {
                let s = q.pop_front().expect("checked");
                upto = Some(upto.unwrap_or(0).max(s.last));
            }
        }
        match upto {
            Some(l) => self.outbox.ack(l),
            None => Ok(()),
        }
    }

    /// Sends batches while connected and the window has room.
    fn pump(&mut self) -> Result<(), OutboxError> {
        while self.connected && self.inflight.len() < self.cfg.window && self.outbox.unread() {
            let r = self.outbox.read_batch(self.cfg.batch_max_points, MAX_BATCH_EVENTS, BATCH_BYTES)?;
            if r.points.is_empty() && r.events.is_empty() {
                break;
            }
            let seq = self.outbox.take_seq()?;
            let batch = TelemetryBatch {
                v: PROTOCOL_VERSION,
                seq,
                points: r.points,
                events: r.events,
                dropped: self.outbox.dropped(),
            };
            if let Err(e) = batch.check() {
                // Cannot happen for what the core appends; never block the outbox on it.
                tracing::error!(seq, "telemetry batch outside the protocol's limits, skipped: {e}");
                self.outbox.ack(r.last)?;
                continue;
            }
            let payload = serde_json::to_vec(&batch).unwrap_or_default();
            if let Err(e) = self.out.try_send(Outgoing { channel: Channel::Telemetry, payload }) {
                tracing::debug!(seq, "telemetry batch not handed to the session: {e}");
                self.rewind();
                break;
            }
            tracing::debug!(seq, last = r.last, "telemetry batch sent");
            self.inflight.push_back(Sent { seq, last: r.last, at: Instant::now(), acked: false });
        }
        Ok(())
    }
}

fn obj(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

/// Runs a rule's action (argv, no shell) with a timeout; reports how it went as an event.
async fn run_action(
    id: String,
    rule: String,
    action: String,
    argv: Vec<String>,
    timeout: Duration,
    done: mpsc::Sender<Event>,
) {
    let mut cmd = tokio::process::Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let started = Instant::now();
    let (severity, outcome) = match cmd.spawn() {
        Err(e) => (Severity::Warning, json!({"error": format!("cannot start {}: {e}", argv[0])})),
        Ok(child) => match tokio::time::timeout(timeout, child.wait_with_output()).await {
            Err(_) => (Severity::Warning, json!({"error": format!("killed after {} s", timeout.as_secs())})),
            Ok(Err(e)) => (Severity::Warning, json!({"error": e.to_string()})),
            Ok(Ok(out)) => {
                let stderr = String::from_utf8_lossy(&out.stderr);
                let stderr = drover_proto::update::tail(stderr.trim(), 512).to_string();
                match out.status.code() {
                    Some(0) => (Severity::Info, json!({"exit": 0})),
                    Some(c) => (Severity::Warning, json!({"exit": c, "stderr": stderr})),
                    None => (Severity::Warning, json!({"error": format!("{}", out.status), "stderr": stderr})),
                }
            }
        },
    };
    let mut data = obj(outcome);
    data.insert("rule".into(), rule.into());
    data.insert("action".into(), action.clone().into());
    data.insert("ms".into(), (started.elapsed().as_millis() as u64).into());
    tracing::info!(action = %action, ?data, "rule action finished");
    let _ = done.send(Event { id, t: now_ms(), name: "drover.rules.action".into(), severity, data }).await;
}

/// The local interface: listens on `path` (mode `mode`) and sends parsed samples to the core.
/// Bad lines are counted in `bad` and logged at most once a minute.
pub fn serve_socket(
    path: &std::path::Path,
    mode: u32,
    bad: Arc<std::sync::atomic::AtomicU64>,
) -> std::io::Result<mpsc::Receiver<Sample>> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = tokio::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    let (tx, rx) = mpsc::channel(1024);
    let last_log = Arc::new(std::sync::Mutex::new(None::<Instant>));
    tokio::spawn(async move {
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!("local interface: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let (tx, bad, last_log) = (tx.clone(), bad.clone(), last_log.clone());
            tokio::spawn(async move {
                use tokio::io::AsyncBufReadExt;
                let mut r = tokio::io::BufReader::new(stream);
                let mut line = Vec::new();
                loop {
                    line.clear();
                    // Lines are at most 8 KiB; a longer one is read (and refused) in pieces.
                    let n = match (&mut r).take(8192).read_until(b'\n', &mut line).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    let parsed = match std::str::from_utf8(&line[..n]) {
                        Ok(_) if n == 8192 && line.last() != Some(&b'\n') => Err("line longer than 8 KiB".to_string()),
                        Ok(s) => local::parse_line(s),
                        Err(_) => Err("not UTF-8".to_string()),
                    };
                    match parsed {
                        Ok(Some(s)) => {
                            if tx.send(s).await.is_err() {
                                return;
                            }
                        }
                        Ok(None) => {}
                        Err(e) => {
                            let total = bad.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                            let mut l = last_log.lock().unwrap_or_else(|p| p.into_inner());
                            if l.is_none_or(|t| t.elapsed() > Duration::from_secs(60)) {
                                *l = Some(Instant::now());
                                tracing::warn!(bad_lines = total, "local interface: bad line ignored: {e}");
                            }
                        }
                    }
                }
            });
        }
    });
    Ok(rx)
}

use tokio::io::AsyncReadExt as _;
