//! One device's MQTT session: connect over mutual TLS, announce (`online`, `hello`,
//! `inventory`), heartbeat, answer pings, re-send the inventory when it changes, reconnect
//! forever with jittered backoff, and say `offline` on the way out.
//!
//! Everything device-specific comes in through [`SessionConfig`] and an [`InventorySource`],
//! so the fleet simulator runs thousands of these in one tokio runtime, each with its own key,
//! certificate and TLS connection. Per-device memory stays small: a short request channel and
//! a bounded in-flight window.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use drover_proto::device::{self, Channel, Heartbeat, Hello, Inventory, OnlineState, PROTOCOL_VERSION, Ping, Status};
use drover_proto::update::{UpdateCommand, UpdateReport};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{LastWill, Packet};
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};
use rumqttc::{Outgoing, TlsConfiguration, Transport};
use tokio::sync::{OwnedMutexGuard, mpsc, watch};
use tokio::time::{Instant, MissedTickBehavior};

use crate::backoff::{Backoff, BackoffPolicy};
use crate::inventory::{self, Attributes};

/// Where the attributes of `up/inventory` come from. The agent reads the machine
/// ([`SystemSource`]); the simulator makes them up.
pub trait InventorySource: Send + 'static {
    /// The complete current set of attributes. Called at start and then every
    /// `inventory_interval`; the session sends it when it differs from what it sent last.
    fn collect(&mut self) -> impl Future<Output = Attributes> + Send;
}

/// The machine the agent runs on.
pub struct SystemSource(pub inventory::SystemInventory);

impl InventorySource for SystemSource {
    fn collect(&mut self) -> impl Future<Output = Attributes> + Send {
        let inv = self.0.clone();
        async move { inv.collect().await }
    }
}

/// A fixed set of attributes (tests, simulators).
pub struct StaticSource(pub Attributes);

impl InventorySource for StaticSource {
    fn collect(&mut self) -> impl Future<Output = Attributes> + Send {
        std::future::ready(self.0.clone())
    }
}

/// Everything one session needs.
#[derive(Clone)]
pub struct SessionConfig {
    /// The CN of the device certificate; also the MQTT client id.
    pub device_id: String,
    pub host: String,
    pub port: u16,
    /// Mutual TLS: trusts the fleet CA, presents the device certificate
    /// (see [`crate::tls::mqtt_client_config`]).
    pub tls: Arc<rustls::ClientConfig>,
    pub keepalive: Duration,
    pub heartbeat_interval: Duration,
    pub inventory_interval: Duration,
    /// `up/hello`'s `agent`, e.g. [`crate::AGENT`].
    pub agent: String,
    pub boot_id: Option<String>,
    /// Uptime to report: `Some(n)` counts from `n` seconds at the start of the session (a
    /// simulator); `None` reads `/proc/uptime`.
    pub uptime_base_secs: Option<u64>,
    pub backoff: BackoffPolicy,
    /// Capacity of the request channel between the session and its MQTT event loop.
    pub channel_capacity: usize,
    /// Most QoS 1 messages awaiting acknowledgement.
    pub max_inflight: u16,
    /// MQTT 5 session expiry, so QoS 1 messages queued while offline are delivered.
    pub session_expiry_secs: u32,
    pub connect_timeout_secs: u64,
    /// The update engine to hand `down/update` commands to and publish `up/update` reports
    /// of; `None`: updates are off (commands are ignored).
    pub updates: Option<crate::update::UpdateLink>,
    /// Remote access, to hand `down/remote` commands to; `None`: they are ignored.
    pub remote: Option<crate::remote::RemoteLink>,
    /// The telemetry core: told about the connection and `down/telemetry`, `down/rules`,
    /// `down/logs`; what it hands back is published. `None`: no telemetry.
    pub telemetry: Option<crate::telemetry::TelemetryLink>,
    /// `up/hello`'s `capabilities` (names of [`device::CAPABILITIES`]): what this device
    /// really does, e.g. [`crate::config::Config::capabilities`]. `None`: not said.
    pub capabilities: Option<Vec<String>>,
}

impl SessionConfig {
    /// Defaults from `docs/protocol.md`: keep-alive and heartbeat 60 s, inventory re-read hourly.
    pub fn new(
        device_id: impl Into<String>,
        host: impl Into<String>,
        port: u16,
        tls: Arc<rustls::ClientConfig>,
    ) -> Self {
        SessionConfig {
            device_id: device_id.into(),
            host: host.into(),
            port,
            tls,
            keepalive: Duration::from_secs(60),
            heartbeat_interval: Duration::from_secs(60),
            inventory_interval: Duration::from_secs(3600),
            agent: crate::AGENT.to_string(),
            boot_id: None,
            uptime_base_secs: None,
            backoff: BackoffPolicy::default(),
            channel_capacity: 16,
            max_inflight: 8,
            session_expiry_secs: 3600,
            connect_timeout_secs: 10,
            updates: None,
            remote: None,
            telemetry: None,
            capabilities: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("{0:?} is not a valid device id")]
    DeviceId(String),
    #[error("keepalive must be 5 s or more")]
    Keepalive,
}

/// Counters a supervisor (or a test) can read while the session runs.
#[derive(Debug, Default)]
pub struct SessionStats {
    connected: AtomicBool,
    connects: AtomicU64,
    connect_failures: AtomicU64,
    heartbeats: AtomicU64,
    inventories: AtomicU64,
    pings: AtomicU64,
}

impl SessionStats {
    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }
    /// Connections accepted by the broker so far.
    pub fn connects(&self) -> u64 {
        self.connects.load(Ordering::Relaxed)
    }
    /// Connection attempts that failed and connections that were lost.
    pub fn connect_failures(&self) -> u64 {
        self.connect_failures.load(Ordering::Relaxed)
    }
    pub fn heartbeats(&self) -> u64 {
        self.heartbeats.load(Ordering::Relaxed)
    }
    pub fn inventories(&self) -> u64 {
        self.inventories.load(Ordering::Relaxed)
    }
    pub fn pings(&self) -> u64 {
        self.pings.load(Ordering::Relaxed)
    }
}

/// One device's session. Build with [`Session::new`], drive with [`Session::run`].
pub struct Session<I> {
    cfg: SessionConfig,
    source: I,
    stats: Arc<SessionStats>,
}

fn status_payload(state: OnlineState) -> Vec<u8> {
    serde_json::to_vec(&Status { v: PROTOCOL_VERSION, state }).unwrap_or_default()
}

fn qos(channel: Channel) -> QoS {
    match channel.qos() {
        device::Qos::AtMostOnce => QoS::AtMostOnce,
        device::Qos::AtLeastOnce => QoS::AtLeastOnce,
    }
}

/// The next report from the update engine; never, without one.
async fn next_report(rx: &mut Option<OwnedMutexGuard<mpsc::Receiver<UpdateReport>>>) -> Option<UpdateReport> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// The next message from the telemetry core; never, without one.
async fn next_telemetry(
    rx: &mut Option<OwnedMutexGuard<mpsc::Receiver<crate::telemetry::Outgoing>>>,
) -> Option<crate::telemetry::Outgoing> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Aborts the inventory collector when the session ends.
struct AbortOnDrop(tokio::task::JoinHandle<()>);
impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl<I: InventorySource> Session<I> {
    pub fn new(cfg: SessionConfig, source: I) -> Result<Self, SessionError> {
        if !device::valid_device_id(&cfg.device_id) {
            return Err(SessionError::DeviceId(cfg.device_id));
        }
        if cfg.keepalive < Duration::from_secs(5) {
            return Err(SessionError::Keepalive);
        }
        Ok(Session { cfg, source, stats: Arc::default() })
    }

    pub fn stats(&self) -> Arc<SessionStats> {
        self.stats.clone()
    }

    fn mqtt_options(c: &SessionConfig) -> MqttOptions {
        let mut o = MqttOptions::new(c.device_id.clone(), c.host.clone(), c.port);
        o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(c.tls.clone())));
        o.set_keep_alive(c.keepalive);
        o.set_clean_start(false);
        o.set_session_expiry_interval(Some(c.session_expiry_secs));
        o.set_last_will(LastWill::new(
            device::topic(&c.device_id, Channel::Status),
            status_payload(OnlineState::Offline),
            qos(Channel::Status),
            Channel::Status.retained(),
            None,
        ));
        o.set_outgoing_inflight_upper_limit(c.max_inflight);
        o.set_connection_timeout(c.connect_timeout_secs);
        o.set_max_packet_size(Some(256 * 1024 + 1024));
        o
    }

    /// Runs until `shutdown` completes; then publishes the retained `offline` status (if
    /// connected) and disconnects cleanly. Never gives up on the broker before that.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let Session { cfg, source, stats } = self;
        let (inv_tx, mut inv_rx) = watch::channel::<Option<Arc<Attributes>>>(None);
        let collector = {
            let mut source = source;
            let every = cfg.inventory_interval;
            AbortOnDrop(tokio::spawn(async move {
                let mut last = None;
                loop {
                    let attrs = source.collect().await;
                    let d = inventory::digest(&attrs);
                    if last != Some(d) {
                        last = Some(d);
                        let _ = inv_tx.send(Some(Arc::new(attrs)));
                    }
                    tokio::time::sleep(every).await;
                }
            }))
        };
        let (client, mut eventloop) = AsyncClient::new(Self::mqtt_options(&cfg), cfg.channel_capacity);
        // One session at a time reads the engine's reports (a simulated device's next
        // session takes over after this one ends).
        let mut reports = match &cfg.updates {
            Some(l) => Some(l.reports.clone().lock_owned().await),
            None => None,
        };
        let mut telemetry = match &cfg.telemetry {
            Some(l) => Some(l.out.clone().lock_owned().await),
            None => None,
        };
        let mut st = State {
            cfg: &cfg,
            stats: &stats,
            client: &client,
            backoff: Backoff::new(cfg.backoff),
            connected_at: None,
            seq: 0,
            sent_digest: None,
            started: Instant::now(),
            ping_topic: device::topic(&cfg.device_id, Channel::Ping),
            update_topic: device::topic(&cfg.device_id, Channel::Update),
            unsent: VecDeque::new(),
        };
        let mut heartbeat = tokio::time::interval(cfg.heartbeat_interval);
        heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
        tokio::pin!(shutdown);
        loop {
            let connected = st.connected_at.is_some();
            tokio::select! {
                biased;
                _ = &mut shutdown => {
                    if connected {
                        st.goodbye(&mut eventloop).await;
                    }
                    break;
                }
                ev = eventloop.poll() => match ev {
                    Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                        st.on_connect(ack.session_present, &mut inv_rx);
                        heartbeat.reset_after(cfg.heartbeat_interval);
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => st.on_publish(&p.topic, &p.payload),
                    Ok(Event::Incoming(Packet::PubAck(a))) if a.reason != rumqttc::v5::mqttbytes::v5::PubAckReason::Success => {
                        tracing::warn!(reason = ?a.reason, "the broker refused a message");
                    }
                    Ok(Event::Incoming(Packet::SubAck(s))) => {
                        if s.return_codes.iter().any(|c| !matches!(c, rumqttc::v5::mqttbytes::v5::SubscribeReasonCode::Success(_))) {
                            tracing::warn!(codes = ?s.return_codes, "the broker refused the downlink subscription");
                        }
                    }
                    Ok(Event::Incoming(Packet::Disconnect(d))) => {
                        tracing::warn!(reason = ?d.reason_code, "the broker closed the connection");
                    }
                    Ok(_) => {}
                    Err(e) => {
                        let delay = st.on_error(&e);
                        tokio::select! {
                            _ = tokio::time::sleep(delay) => {}
                            _ = &mut shutdown => break,
                        }
                    }
                },
                _ = heartbeat.tick(), if connected => st.heartbeat(),
                Some(r) = next_report(&mut reports) => st.report(r),
                Some(o) = next_telemetry(&mut telemetry) => st.telemetry_out(o),
                () = tokio::time::sleep(Duration::from_secs(1)), if connected && !st.unsent.is_empty() => st.flush_unsent(),
                Ok(()) = inv_rx.changed(), if connected => {
                    let current = inv_rx.borrow_and_update().clone();
                    if let Some(attrs) = current {
                        st.inventory(&attrs);
                    }
                }
            }
        }
        stats.connected.store(false, Ordering::Relaxed);
        if let Some(l) = &cfg.updates {
            l.shared.set_connected(false);
        }
        if let Some(t) = &cfg.telemetry {
            t.send(crate::telemetry::Input::Disconnected);
        }
        drop(collector);
    }
}

struct State<'a> {
    cfg: &'a SessionConfig,
    stats: &'a SessionStats,
    client: &'a AsyncClient,
    backoff: Backoff,
    connected_at: Option<Instant>,
    seq: u64,
    sent_digest: Option<[u8; 32]>,
    started: Instant,
    ping_topic: String,
    update_topic: String,
    /// Update reports the client's queue did not take; tried again every second.
    unsent: VecDeque<UpdateReport>,
}

impl State<'_> {
    fn publish(&self, channel: Channel, payload: Vec<u8>) -> bool {
        let topic = device::topic(&self.cfg.device_id, channel);
        match self.client.try_publish(topic, qos(channel), channel.retained(), payload) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(channel = channel.suffix(), "message not sent: {e}");
                false
            }
        }
    }

    fn on_connect(&mut self, session_present: bool, inv_rx: &mut watch::Receiver<Option<Arc<Attributes>>>) {
        tracing::info!(device_id = %self.cfg.device_id, host = %self.cfg.host, port = self.cfg.port, session_present, "connected");
        self.connected_at = Some(Instant::now());
        self.seq = 0;
        self.stats.connected.store(true, Ordering::Relaxed);
        self.stats.connects.fetch_add(1, Ordering::Relaxed);
        // Subscribe before saying hello: the server answers hello with commands (an update
        // in flight), and the broker takes this connection's packets in order.
        let filter = format!("{}/{}/down/#", device::TOPIC_ROOT, self.cfg.device_id);
        if let Err(e) = self.client.try_subscribe(filter, QoS::AtLeastOnce) {
            tracing::warn!("cannot subscribe to the downlink: {e}");
        }
        self.publish(Channel::Status, status_payload(OnlineState::Online));
        let hello = Hello {
            v: PROTOCOL_VERSION,
            agent: self.cfg.agent.clone(),
            boot_id: self.cfg.boot_id.clone(),
            software: self.cfg.updates.as_ref().and_then(|l| l.shared.software()),
            capabilities: self.cfg.capabilities.clone(),
        };
        self.publish(Channel::Hello, serde_json::to_vec(&hello).unwrap_or_default());
        let current = inv_rx.borrow_and_update().clone();
        if let Some(attrs) = current {
            self.inventory(&attrs);
        }
        if let Some(l) = &self.cfg.updates {
            // The state of the update in flight, or the last final report: the server may not
            // have seen it before the connection went.
            self.unsent.clear();
            if let Some(r) = l.shared.resend() {
                self.report(r);
            }
            l.shared.set_connected(true);
        }
        if let Some(t) = &self.cfg.telemetry {
            t.send(crate::telemetry::Input::Connected);
        }
    }

    /// Publishes what the telemetry core hands over; while disconnected it is dropped (the
    /// core sends its outbox again after the next connect).
    fn telemetry_out(&mut self, o: crate::telemetry::Outgoing) {
        if self.connected_at.is_none() {
            return;
        }
        if !self.publish(o.channel, o.payload)
            && o.channel == Channel::Telemetry
            && let Some(t) = &self.cfg.telemetry
        {
            t.send(crate::telemetry::Input::PublishFailed);
        }
    }

    /// Publishes an update report (QoS 1). While disconnected it is dropped: the engine's
    /// latest state is sent again at the next connect.
    fn report(&mut self, r: UpdateReport) {
        if self.connected_at.is_none() {
            return;
        }
        if let Err(e) = r.check() {
            tracing::warn!(deployment = %r.deployment, "not sending an invalid update report: {e}");
            return;
        }
        let topic = device::topic(&self.cfg.device_id, Channel::UpdateReport);
        let payload = serde_json::to_vec(&r).unwrap_or_default();
        if self.client.try_publish(topic, qos(Channel::UpdateReport), false, payload).is_err() {
            self.unsent.push_back(r);
        } else {
            tracing::debug!(deployment = %r.deployment, state = %r.state, "update report sent");
        }
    }

    fn flush_unsent(&mut self) {
        let pending: Vec<_> = self.unsent.drain(..).collect();
        for r in pending {
            self.report(r);
        }
    }

    fn on_update_command(&mut self, payload: &[u8]) {
        let Some(l) = &self.cfg.updates else {
            tracing::warn!(
                "ignoring an update command: updates are not configured on this device ([update] device_type)"
            );
            return;
        };
        match serde_json::from_slice::<UpdateCommand>(payload) {
            Ok(c) if c.v == PROTOCOL_VERSION => {
                tracing::info!(deployment = %c.deployment, "update command");
                if l.commands.try_send(c).is_err() {
                    tracing::warn!("update engine busy; the server sends the command again");
                }
            }
            Ok(c) => tracing::warn!(v = c.v, "ignoring an update command of an unsupported protocol version"),
            Err(e) => tracing::warn!("ignoring a malformed update command: {e}"),
        }
    }

    fn inventory(&mut self, attrs: &Attributes) {
        let d = inventory::digest(attrs);
        let msg = Inventory { v: PROTOCOL_VERSION, attributes: attrs.clone() };
        if self.publish(Channel::Inventory, serde_json::to_vec(&msg).unwrap_or_default()) {
            if self.sent_digest.is_some_and(|s| s != d) {
                tracing::info!(attributes = attrs.len(), "inventory changed; sent");
            }
            self.sent_digest = Some(d);
            self.stats.inventories.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn heartbeat(&mut self) {
        let uptime_s = match self.cfg.uptime_base_secs {
            Some(base) => base + self.started.elapsed().as_secs(),
            None => inventory::uptime_secs(),
        };
        let hb = Heartbeat { v: PROTOCOL_VERSION, uptime_s, seq: self.seq };
        if self.publish(Channel::Heartbeat, serde_json::to_vec(&hb).unwrap_or_default()) {
            self.seq += 1;
            self.stats.heartbeats.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn on_publish(&mut self, topic: &[u8], payload: &[u8]) {
        if topic == self.update_topic.as_bytes() {
            return self.on_update_command(payload);
        }
        if topic.ends_with(b"/down/remote") {
            match &self.cfg.remote {
                Some(r) => r.command(bytes::Bytes::copy_from_slice(payload)),
                None => tracing::warn!("ignoring a remote-access command: remote access is not running"),
            }
            return;
        }
        if let Some(t) = &self.cfg.telemetry
            && let Some((_, c @ (Channel::TelemetryAck | Channel::Rules | Channel::LogsRequest))) =
                std::str::from_utf8(topic).ok().and_then(device::parse_topic)
        {
            t.send(crate::telemetry::Input::Downlink(c, payload.to_vec()));
            return;
        }
        if topic != self.ping_topic.as_bytes() {
            tracing::debug!(topic = %String::from_utf8_lossy(topic), "ignoring an unknown downlink message");
            return;
        }
        match serde_json::from_slice::<Ping>(payload) {
            Ok(p) if p.v == PROTOCOL_VERSION => {
                self.stats.pings.fetch_add(1, Ordering::Relaxed);
                self.heartbeat();
            }
            Ok(p) => tracing::warn!(v = p.v, "ignoring a ping of an unsupported protocol version"),
            Err(e) => tracing::warn!("ignoring a malformed ping: {e}"),
        }
    }

    fn on_error(&mut self, e: &rumqttc::v5::ConnectionError) -> Duration {
        let up = self.connected_at.take().map(|t| t.elapsed());
        self.stats.connected.store(false, Ordering::Relaxed);
        if let Some(l) = &self.cfg.updates {
            l.shared.set_connected(false);
        }
        if let Some(t) = &self.cfg.telemetry {
            t.send(crate::telemetry::Input::Disconnected);
        }
        self.stats.connect_failures.fetch_add(1, Ordering::Relaxed);
        let delay = self.backoff.next_delay(up, rand::random::<f64>());
        match up {
            Some(up) => tracing::warn!(
                "connection lost after {}s: {e}; reconnecting in {:.1}s",
                up.as_secs(),
                delay.as_secs_f64()
            ),
            None => tracing::warn!(
                host = %self.cfg.host, port = self.cfg.port,
                "cannot connect: {e}; retrying in {:.1}s (attempt {})", delay.as_secs_f64(), self.backoff.failures()
            ),
        }
        delay
    }

    /// `offline` (retained), then DISCONNECT, so the broker does not publish the will.
    async fn goodbye(&mut self, eventloop: &mut EventLoop) {
        self.publish(Channel::Status, status_payload(OnlineState::Offline));
        if let Err(e) = self.client.try_disconnect() {
            tracing::warn!("cannot disconnect cleanly: {e}");
            return;
        }
        let flushed = tokio::time::timeout(Duration::from_secs(3), async {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Outgoing(Outgoing::Disconnect)) => return true,
                    Ok(_) => {}
                    Err(_) => return false,
                }
            }
        })
        .await;
        match flushed {
            Ok(true) => tracing::info!("disconnected"),
            _ => tracing::warn!("the broker did not take the disconnect in time"),
        }
    }
}
