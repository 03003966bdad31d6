//! The MQTT 5 broker embedded in `droverd`.
//!
//! It speaks MQTT 5 over mutual TLS only. A client is who its certificate says: the subject's
//! common name is either a device id (see [`drover_proto::device::valid_device_id`]) or
//! `service:{name}` for Drover's own server replicas. A device may publish and subscribe only
//! under its own prefix `drover/v1/d/{id}/`; anything else is refused with the MQTT 5 reason
//! "not authorized" (0x87), logged, and the device stays connected for its own topics. A
//! service may use every topic, including shared subscriptions (`$share/{group}/{filter}`),
//! through which several server replicas split the fleet's traffic.
//!
//! What it does not do, by design (see `docs/decisions/0002-own-embedded-broker.md`): QoS 2
//! (CONNACK says maximum QoS 1), persistent sessions (every session ends with its connection;
//! the device protocol re-announces state on every connect), topic aliases, will delay.

mod conn;
mod trie;

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{DisconnectReasonCode, PublishProperties};
use tokio::net::TcpListener;
use tokio::sync::{Notify, Semaphore, mpsc};

pub use conn::read_packet;
pub use trie::{Subscriber, Trie};

/// The client id suffix of a device's second connection, for remote-access sessions: a device
/// may connect as `{device_id}` and as `{device_id}/remote`, nothing else.
pub const DEVICE_REMOTE_SUFFIX: &str = "/remote";

/// The prefix of a service identity's common name.
pub const SERVICE_PREFIX: &str = "service:";

/// Limits and TLS settings of one broker listener.
#[derive(Clone)]
pub struct Config {
    pub listen: SocketAddr,
    /// Must require and verify client certificates.
    pub tls: Arc<rustls::ServerConfig>,
    /// Connections beyond this are closed before the TLS handshake.
    pub max_connections: usize,
    /// Largest MQTT packet accepted (and announced in CONNACK), in bytes.
    pub max_packet_size: u32,
    /// QoS 1 messages in flight to one client before further ones wait in its queue.
    pub receive_maximum: u16,
    /// Messages waiting for one client before new ones are dropped (and counted).
    pub max_queued: usize,
    /// Keep-alive imposed on clients that ask for none or for more.
    pub max_keep_alive: u16,
    /// Time allowed for the TLS handshake and the CONNECT packet.
    pub connect_timeout: Duration,
    /// Retained topics one device may hold.
    pub max_retained_per_device: usize,
    /// How long a share group whose members' queues are all full may take no message at all
    /// before a publisher waiting for it gives up (the server replicas are wedged, not just
    /// behind). Then a QoS 1 message is not acknowledged: its publisher is disconnected with
    /// "server busy" and sends it again after reconnecting; a QoS 0 message is dropped (and
    /// counted). Publishers wait as long as the group keeps taking messages.
    pub busy_wait: Duration,
}

impl Config {
    pub fn new(listen: SocketAddr, tls: Arc<rustls::ServerConfig>) -> Config {
        Config {
            listen,
            tls,
            max_connections: 20_000,
            max_packet_size: 1024 * 1024,
            receive_maximum: 32,
            max_queued: 256,
            max_keep_alive: 600,
            connect_timeout: Duration::from_secs(10),
            max_retained_per_device: 16,
            busy_wait: Duration::from_secs(30),
        }
    }
}

/// Who a connected client is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    Device(String),
    Service(String),
}

impl Identity {
    /// The identity a certificate's common name stands for; `None` for anything else.
    pub fn from_common_name(cn: &str) -> Option<Identity> {
        if let Some(name) = cn.strip_prefix(SERVICE_PREFIX) {
            return (!name.is_empty()).then(|| Identity::Service(name.to_string()));
        }
        drover_proto::device::valid_device_id(cn).then(|| Identity::Device(cn.to_string()))
    }

    /// The MQTT client id this identity must use.
    pub fn client_id(&self) -> String {
        match self {
            Identity::Device(id) => id.clone(),
            Identity::Service(name) => format!("{SERVICE_PREFIX}{name}"),
        }
    }
}

/// The answer to a device asking to connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Allowed,
    /// Unknown, not accepted, decommissioned or revoked: CONNACK "not authorized".
    Refused,
    /// The registry cannot answer now: CONNACK "server unavailable"; the device retries.
    Unavailable,
}

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What the broker asks of the rest of the server.
pub trait Gatekeeper: Send + Sync + 'static {
    /// Whether this device may connect now (its certificate already verified against the CA).
    fn admit<'a>(&'a self, device_id: &'a str) -> BoxFuture<'a, Admission>;
    /// A device tried to use a topic outside its prefix (already logged by the broker).
    fn violation(&self, _device_id: &str, _what: &str) {}
}

/// Admits every device whose certificate the CA signed.
pub struct AdmitAll;

impl Gatekeeper for AdmitAll {
    fn admit<'a>(&'a self, _device_id: &'a str) -> BoxFuture<'a, Admission> {
        Box::pin(async { Admission::Allowed })
    }
}

/// Counters, as exposed on `/metrics`.
#[derive(Debug, Default)]
pub struct Stats {
    pub connections: AtomicUsize,
    pub connects_total: AtomicU64,
    pub refused_total: AtomicU64,
    pub messages_in: AtomicU64,
    pub messages_out: AtomicU64,
    pub dropped_total: AtomicU64,
    pub acl_denied_total: AtomicU64,
    /// Publishers disconnected because the server replicas took no message for `busy_wait`.
    pub busy_disconnects_total: AtomicU64,
}

/// A message as routed: shared by every subscriber's queue.
#[derive(Debug)]
pub(crate) struct Message {
    pub topic: Bytes,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
    pub properties: Option<PublishProperties>,
    /// The connection that published it (for no-local subscriptions); 0 for the broker itself.
    pub from_conn: u64,
}

/// One message on its way to one subscriber.
pub(crate) struct Delivery {
    pub msg: Arc<Message>,
    pub qos: QoS,
    pub retain: bool,
}

/// A delivery to a share group whose members' queues were all full when it was routed.
pub(crate) struct Blocked {
    tx: mpsc::Sender<Delivery>,
    delivery: Delivery,
    /// The member's count of messages taken from its queue.
    taken: Arc<AtomicU64>,
}

impl Blocked {
    /// Waits for room in the member's queue, in line with the other publishers waiting for
    /// it, for as long as the member keeps taking messages; false if the member took none for
    /// `wait` (a wedged server) or left. A server that is merely slower than its fleet's
    /// burst — a thousand devices reporting at once — holds the devices back without
    /// disconnecting them.
    pub(crate) async fn wait(self, wait: Duration, stats: &Stats) -> bool {
        let Blocked { tx, delivery, taken } = self;
        let send = tx.send(delivery);
        tokio::pin!(send);
        let mut seen = taken.load(Ordering::Relaxed);
        loop {
            match tokio::time::timeout(wait, &mut send).await {
                Ok(Ok(())) => {
                    stats.messages_out.fetch_add(1, Ordering::Relaxed);
                    return true;
                }
                Ok(Err(_)) => return false,
                Err(_) => {
                    let now = taken.load(Ordering::Relaxed);
                    if now == seen {
                        return false;
                    }
                    seen = now;
                }
            }
        }
    }
}

/// How the broker tells a connection to close, and why.
pub(crate) struct Kick {
    reason: Mutex<DisconnectReasonCode>,
    notify: Notify,
}

impl Kick {
    fn new() -> Kick {
        Kick { reason: Mutex::new(DisconnectReasonCode::AdministrativeAction), notify: Notify::new() }
    }

    pub(crate) fn fire(&self, reason: DisconnectReasonCode) {
        *self.reason.lock().unwrap_or_else(|e| e.into_inner()) = reason;
        self.notify.notify_one();
    }

    pub(crate) fn reason(&self) -> DisconnectReasonCode {
        *self.reason.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) async fn wait(&self) -> DisconnectReasonCode {
        self.notify.notified().await;
        self.reason()
    }
}

pub(crate) struct ClientEntry {
    pub conn: u64,
    pub tx: mpsc::Sender<Delivery>,
    pub kick: Arc<Kick>,
    /// Messages the connection has taken from `tx`'s queue.
    pub taken: Arc<AtomicU64>,
}

pub(crate) struct Shared {
    pub config: Config,
    pub gate: Arc<dyn Gatekeeper>,
    pub subs: RwLock<Trie>,
    pub clients: Mutex<HashMap<Arc<str>, ClientEntry>>,
    pub retained: Mutex<BTreeMap<String, Arc<Message>>>,
    pub stats: Stats,
    pub next_conn: AtomicU64,
    pub round_robin: AtomicUsize,
    pub slots: Arc<Semaphore>,
}

impl Shared {
    /// Delivers `msg` to every matching subscription: each ordinary subscriber once (at the
    /// highest QoS among its matching subscriptions), each share group to one member.
    ///
    /// An ordinary subscriber whose queue is full loses the message (counted): a slow device
    /// must not hold up anyone. A share group — the server replicas consuming the fleet's
    /// traffic — whose members' queues are all full gets it as a [`Blocked`] delivery that
    /// the publisher's connection waits for ([`Blocked::wait`]) before it acknowledges the
    /// publish, so a busy server slows its devices down instead of losing their messages.
    #[must_use = "blocked deliveries must be awaited or they are lost"]
    pub(crate) fn route(&self, msg: Arc<Message>) -> Vec<Blocked> {
        let mut blocked = Vec::new();
        let Ok(topic) = std::str::from_utf8(&msg.topic) else { return blocked };
        let mut direct: Vec<(Arc<str>, QoS, bool)> = Vec::new();
        let mut groups: Vec<(Arc<str>, Vec<(Arc<str>, QoS)>)> = Vec::new();
        {
            let subs = self.subs.read().unwrap_or_else(|e| e.into_inner());
            subs.matches(topic, |s| {
                let qos = min_qos(s.qos, msg.qos);
                match &s.share {
                    Some(group) => match groups.iter_mut().find(|(g, _)| g == group) {
                        Some((_, members)) => members.push((s.client.clone(), qos)),
                        None => groups.push((group.clone(), vec![(s.client.clone(), qos)])),
                    },
                    None => {
                        if s.no_local && msg.from_conn == s.conn {
                            return;
                        }
                        match direct.iter_mut().find(|(c, _, _)| *c == s.client) {
                            Some(d) => {
                                d.1 = max_qos(d.1, qos);
                                d.2 |= s.retain_as_published;
                            }
                            None => direct.push((s.client.clone(), qos, s.retain_as_published)),
                        }
                    }
                }
            });
        }
        if direct.is_empty() && groups.is_empty() {
            return blocked;
        }
        let clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        for (client, qos, rap) in direct {
            let retain = rap && msg.retain;
            self.offer(&clients, &client, Delivery { msg: msg.clone(), qos, retain });
        }
        for (_, members) in groups {
            // Round robin, skipping members whose queue is full.
            let start = self.round_robin.fetch_add(1, Ordering::Relaxed);
            let mut sent = false;
            for i in 0..members.len() {
                let (client, qos) = &members[(start + i) % members.len()];
                if let Some(entry) = clients.get(client)
                    && entry.tx.try_send(Delivery { msg: msg.clone(), qos: *qos, retain: false }).is_ok()
                {
                    self.stats.messages_out.fetch_add(1, Ordering::Relaxed);
                    sent = true;
                    break;
                }
            }
            if !sent && let Some((client, qos)) = members.get(start % members.len().max(1)) {
                match clients.get(client) {
                    Some(entry) => blocked.push(Blocked {
                        tx: entry.tx.clone(),
                        delivery: Delivery { msg: msg.clone(), qos: *qos, retain: false },
                        taken: entry.taken.clone(),
                    }),
                    None => {
                        self.stats.dropped_total.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
        blocked
    }

    fn offer(&self, clients: &HashMap<Arc<str>, ClientEntry>, client: &str, out: Delivery) {
        let Some(entry) = clients.get(client) else { return };
        match entry.tx.try_send(out) {
            Ok(()) => {
                self.stats.messages_out.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => {
                self.stats.dropped_total.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(client, "broker: queue full, message dropped");
            }
        }
    }

    /// Stores (or with an empty payload, clears) a retained message. `device_prefix` is the
    /// publishing device's topic prefix; returns false when that device already holds its
    /// share of retained topics.
    pub(crate) fn retain(&self, msg: &Arc<Message>, device_prefix: Option<&str>) -> bool {
        let Ok(topic) = std::str::from_utf8(&msg.topic) else { return false };
        let mut retained = self.retained.lock().unwrap_or_else(|e| e.into_inner());
        if msg.payload.is_empty() {
            retained.remove(topic);
            return true;
        }
        if let Some(prefix) = device_prefix
            && !retained.contains_key(topic)
        {
            let held = retained.range(prefix.to_string()..).take_while(|(t, _)| t.starts_with(prefix)).count();
            if held >= self.config.max_retained_per_device {
                return false;
            }
        }
        retained.insert(topic.to_string(), msg.clone());
        true
    }

    /// Retained messages matching `filter`, scanning only the literal part of its prefix.
    pub(crate) fn retained_for(&self, filter: &str) -> Vec<Arc<Message>> {
        let literal_end = filter.find(['+', '#']).unwrap_or(filter.len());
        let literal = &filter[..literal_end];
        let retained = self.retained.lock().unwrap_or_else(|e| e.into_inner());
        retained
            .range(literal.to_string()..)
            .take_while(|(t, _)| t.starts_with(literal))
            .filter(|(t, _)| topic_matches(t, filter))
            .map(|(_, m)| m.clone())
            .collect()
    }
}

fn min_qos(a: QoS, b: QoS) -> QoS {
    if (a as u8) <= (b as u8) { a } else { b }
}

fn max_qos(a: QoS, b: QoS) -> QoS {
    if (a as u8) >= (b as u8) { a } else { b }
}

/// MQTT topic matching, `$` topics hidden from leading wildcards.
pub fn topic_matches(topic: &str, filter: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut topics = topic.split('/');
    for f in filter.split('/') {
        if f == "#" {
            return true;
        }
        match topics.next() {
            Some(t) if f == "+" || f == t => continue,
            _ => return false,
        }
    }
    topics.next().is_none()
}

/// Whether `filter` is a well-formed MQTT topic filter.
pub fn valid_filter(filter: &str) -> bool {
    if filter.is_empty() || filter.len() > 1024 || filter.contains('\0') {
        return false;
    }
    let levels: Vec<&str> = filter.split('/').collect();
    levels
        .iter()
        .enumerate()
        .all(|(i, l)| (!l.contains('#') || (*l == "#" && i == levels.len() - 1)) && (!l.contains('+') || *l == "+"))
}

/// Whether `topic` is a well-formed topic name to publish to.
pub fn valid_topic(topic: &str) -> bool {
    !topic.is_empty() && topic.len() <= 1024 && !topic.contains(['+', '#', '\0'])
}

/// A running broker's controls.
#[derive(Clone)]
pub struct BrokerHandle {
    shared: Arc<Shared>,
    local_addr: SocketAddr,
}

impl BrokerHandle {
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Closes a client's connection with the given reason (no will is published), and for a
    /// device its remote-access connection too. Returns whether it was connected.
    pub fn disconnect(&self, client_id: &str, reason: DisconnectReasonCode) -> bool {
        let clients = self.shared.clients.lock().unwrap_or_else(|e| e.into_inner());
        let remote = format!("{client_id}{DEVICE_REMOTE_SUFFIX}");
        let mut found = false;
        for id in [client_id, remote.as_str()] {
            if let Some(entry) = clients.get(id) {
                entry.kick.fire(reason);
                found = true;
            }
        }
        found
    }

    pub fn is_connected(&self, client_id: &str) -> bool {
        self.shared.clients.lock().unwrap_or_else(|e| e.into_inner()).contains_key(client_id)
    }

    pub fn stats(&self) -> &Stats {
        &self.shared.stats
    }

    pub fn retained_count(&self) -> usize {
        self.shared.retained.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// A bound broker, not yet accepting.
pub struct Broker {
    listener: TcpListener,
    handle: BrokerHandle,
}

impl Broker {
    pub async fn bind(config: Config, gate: Arc<dyn Gatekeeper>) -> std::io::Result<Broker> {
        let listener = TcpListener::bind(config.listen).await?;
        let local_addr = listener.local_addr()?;
        let slots = Arc::new(Semaphore::new(config.max_connections));
        let shared = Arc::new(Shared {
            config,
            gate,
            subs: RwLock::new(Trie::default()),
            clients: Mutex::new(HashMap::new()),
            retained: Mutex::new(BTreeMap::new()),
            stats: Stats::default(),
            next_conn: AtomicU64::new(1),
            round_robin: AtomicUsize::new(0),
            slots,
        });
        Ok(Broker { listener, handle: BrokerHandle { shared, local_addr } })
    }

    pub fn handle(&self) -> BrokerHandle {
        self.handle.clone()
    }

    /// Accepts connections until `stop` completes, then closes every connection with
    /// "server shutting down" (their wills are not published: the broker is going, not them).
    pub async fn run(self, stop: impl Future<Output = ()>) {
        let shared = self.handle.shared.clone();
        let acceptor = tokio_rustls::TlsAcceptor::from(shared.config.tls.clone());
        tokio::pin!(stop);
        loop {
            tokio::select! {
                _ = &mut stop => break,
                accepted = self.listener.accept() => match accepted {
                    Ok((tcp, peer)) => {
                        let Ok(permit) = shared.slots.clone().try_acquire_owned() else {
                            shared.stats.refused_total.fetch_add(1, Ordering::Relaxed);
                            tracing::warn!(%peer, "broker: connection limit reached, refused");
                            continue;
                        };
                        let _ = tcp.set_nodelay(true);
                        let shared = shared.clone();
                        let acceptor = acceptor.clone();
                        tokio::spawn(async move {
                            conn::serve(shared, acceptor, tcp, peer).await;
                            drop(permit);
                        });
                    }
                    Err(e) => {
                        // Out of file descriptors, most likely: wait instead of spinning.
                        tracing::warn!("broker: accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
            }
        }
        let clients = shared.clients.lock().unwrap_or_else(|e| e.into_inner());
        for entry in clients.values() {
            entry.kick.fire(DisconnectReasonCode::ServerShuttingDown);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_come_from_the_common_name() {
        assert_eq!(Identity::from_common_name("dev-1"), Some(Identity::Device("dev-1".into())));
        assert_eq!(Identity::from_common_name("service:droverd"), Some(Identity::Service("droverd".into())));
        assert_eq!(Identity::from_common_name("service:"), None);
        assert_eq!(Identity::from_common_name("Dev/1"), None);
        assert_eq!(Identity::from_common_name("a+b"), None);
    }

    #[test]
    fn filters_and_topics() {
        assert!(valid_filter("a/+/c/#"));
        assert!(valid_filter("#"));
        assert!(!valid_filter("a/#/c"));
        assert!(!valid_filter("a/b+"));
        assert!(!valid_filter(""));
        assert!(valid_topic("a/b"));
        assert!(!valid_topic("a/+"));
        assert!(topic_matches("a/b/c", "a/+/c"));
        assert!(topic_matches("a", "a/#"));
        assert!(!topic_matches("$SYS/x", "#"));
        assert!(!topic_matches("a/b", "a/b/c"));
    }
}
