//! One client connection: TLS handshake, CONNECT, then packets both ways until it ends.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rumqttc::v5::mqttbytes::v5::{
    ConnAck, ConnAckProperties, Connect, ConnectReturnCode, Disconnect, DisconnectProperties, DisconnectReasonCode,
    LastWill, Packet, PingResp, PubAck, PubAckReason, Publish, SubAck, Subscribe, SubscribeReasonCode, UnsubAck,
    UnsubAckReason, Unsubscribe,
};
use rumqttc::v5::mqttbytes::{Error as CodecError, QoS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_rustls::server::TlsStream;

use crate::trie::Subscriber;
use crate::{Admission, ClientEntry, Delivery, Identity, Kick, Message, Shared, valid_filter, valid_topic};

type Io = TlsStream<TcpStream>;

/// Takes the next packet from `buf`: `Ok(None)` while it is incomplete. What the broker reads
/// from every connection (the fuzz target `broker_mqtt_packet_read` feeds it arbitrary bytes).
pub fn read_packet(buf: &mut BytesMut, max_packet_size: u32) -> Result<Option<Packet>, CodecError> {
    if buf.is_empty() {
        return Ok(None);
    }
    // MQTT 5 (3.14.2.1): a DISCONNECT with reason 0x00 and no properties may have a remaining
    // length of 0. rumqttc's reader refuses that form, so it is read here.
    if buf.starts_with(&[0xe0, 0x00]) {
        let _ = buf.split_to(2);
        return Ok(Some(Packet::Disconnect(Disconnect::new(DisconnectReasonCode::NormalDisconnection))));
    }
    match Packet::read(buf, Some(max_packet_size)) {
        Ok(p) => Ok(Some(p)),
        Err(CodecError::InsufficientBytes(_)) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Why a connection ended, for the will and the log.
enum End {
    /// DISCONNECT 0x00 from the client: no will.
    Normal,
    /// The broker closed it on purpose (takeover, decommission, shutdown): no will.
    Kicked(DisconnectReasonCode),
    /// Anything else (dropped TCP, keep-alive timeout, protocol error, DISCONNECT 0x04): will.
    Abnormal(String),
}

pub(crate) async fn serve(shared: Arc<Shared>, acceptor: tokio_rustls::TlsAcceptor, tcp: TcpStream, peer: SocketAddr) {
    let timeout = shared.config.connect_timeout;
    let io = match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
        Ok(Ok(io)) => io,
        Ok(Err(e)) => {
            shared.stats.refused_total.fetch_add(1, Ordering::Relaxed);
            tracing::info!(%peer, "broker: TLS handshake refused: {e}");
            return;
        }
        Err(_) => {
            shared.stats.refused_total.fetch_add(1, Ordering::Relaxed);
            tracing::info!(%peer, "broker: TLS handshake timed out");
            return;
        }
    };
    let identity = match peer_identity(&io) {
        Some(identity) => identity,
        None => {
            shared.stats.refused_total.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%peer, "broker: certificate names neither a device nor a service");
            return;
        }
    };
    let mut conn = Conn::new(shared, io, peer, identity);
    conn.run().await;
}

fn peer_identity(io: &Io) -> Option<Identity> {
    let certs = io.get_ref().1.peer_certificates()?;
    let (_, cert) = x509_parser::parse_x509_certificate(certs.first()?.as_ref()).ok()?;
    let cn = cert.subject().iter_common_name().next()?.as_str().ok()?.to_string();
    Identity::from_common_name(&cn)
}

struct Conn {
    shared: Arc<Shared>,
    io: Io,
    peer: SocketAddr,
    identity: Identity,
    /// `drover/v1/d/{id}/` for a device: every topic it uses starts so.
    device_prefix: Option<String>,
    conn_id: u64,
    client_id: Arc<str>,
    rbuf: BytesMut,
    wbuf: BytesMut,
    /// The client's own limit on packets we send.
    client_max_packet: Option<u32>,
    /// QoS 1 messages sent and not yet acknowledged, by packet id.
    inflight: HashMap<u16, Arc<Message>>,
    /// Messages waiting for a free in-flight slot.
    waiting: VecDeque<(Arc<Message>, QoS, bool)>,
    client_receive_max: u16,
    next_pkid: u16,
    /// Filters this connection subscribed to (with their share group).
    filters: Vec<(String, Option<Arc<str>>)>,
    will: Option<LastWill>,
    /// Messages this connection has taken from its queue: a share group's publishers wait
    /// while it goes up ([`crate::Blocked::wait`]).
    taken: Arc<AtomicU64>,
}

impl Conn {
    fn new(shared: Arc<Shared>, io: Io, peer: SocketAddr, identity: Identity) -> Conn {
        let conn_id = shared.next_conn.fetch_add(1, Ordering::Relaxed);
        let client_id: Arc<str> = identity.client_id().into();
        let device_prefix = match &identity {
            Identity::Device(id) => Some(format!("{}/{id}/", drover_proto::device::TOPIC_ROOT)),
            Identity::Service(_) => None,
        };
        Conn {
            shared,
            io,
            peer,
            identity,
            device_prefix,
            conn_id,
            client_id,
            rbuf: BytesMut::new(),
            wbuf: BytesMut::new(),
            client_max_packet: None,
            inflight: HashMap::new(),
            waiting: VecDeque::new(),
            client_receive_max: 1,
            next_pkid: 1,
            filters: Vec::new(),
            will: None,
            taken: Arc::new(AtomicU64::new(0)),
        }
    }

    fn device(&self) -> Option<&str> {
        match &self.identity {
            Identity::Device(id) => Some(id),
            Identity::Service(_) => None,
        }
    }

    /// Whether this client may use `topic` (a topic name or filter).
    fn allowed(&self, topic: &str) -> bool {
        self.device_prefix.as_ref().is_none_or(|prefix| topic.starts_with(prefix.as_str()))
    }

    fn denied(&self, what: &str) {
        self.shared.stats.acl_denied_total.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(client = %self.client_id, peer = %self.peer, "broker: not authorized: {what}");
        if let Some(id) = self.device() {
            self.shared.gate.violation(id, what);
        }
    }

    async fn send(&mut self, packet: Packet) -> std::io::Result<()> {
        self.wbuf.clear();
        packet.write(&mut self.wbuf, self.client_max_packet).map_err(std::io::Error::other)?;
        self.io.write_all(&self.wbuf).await?;
        self.io.flush().await?;
        if self.wbuf.capacity() > 16 * 1024 {
            self.wbuf = BytesMut::new();
        }
        Ok(())
    }

    /// Reads the first packet, waiting at most until `deadline`. `Ok(None)`: the peer closed or
    /// went quiet.
    async fn read_first_packet(&mut self, deadline: Instant) -> Result<Option<Packet>, CodecError> {
        loop {
            if let Some(p) = self.parse()? {
                return Ok(Some(p));
            }
            self.rbuf.reserve(1024);
            match tokio::time::timeout_at(deadline, self.io.read_buf(&mut self.rbuf)).await {
                Ok(Ok(n)) if n > 0 => {}
                _ => return Ok(None),
            }
        }
    }

    fn parse(&mut self) -> Result<Option<Packet>, CodecError> {
        read_packet(&mut self.rbuf, self.shared.config.max_packet_size)
    }

    async fn refuse(&mut self, code: ConnectReturnCode, why: &str) {
        self.shared.stats.refused_total.fetch_add(1, Ordering::Relaxed);
        tracing::info!(client = %self.client_id, peer = %self.peer, "broker: connection refused: {why}");
        let props = ConnAckProperties { reason_string: Some(why.to_string()), ..no_properties() };
        let _ = self.send(Packet::ConnAck(ConnAck { session_present: false, code, properties: Some(props) })).await;
        let _ = self.io.shutdown().await;
    }

    async fn run(&mut self) {
        let deadline = Instant::now() + self.shared.config.connect_timeout;
        let connect = match self.read_first_packet(deadline).await {
            Ok(Some(Packet::Connect(c, will, _login))) => (c, will),
            Ok(_) => return,
            Err(CodecError::InvalidProtocolLevel(_)) => {
                // An MQTT 3 client: answer in its own dialect, "unacceptable protocol version".
                let _ = self.io.write_all(&[0x20, 0x02, 0x00, 0x01]).await;
                let _ = self.io.shutdown().await;
                self.shared.stats.refused_total.fetch_add(1, Ordering::Relaxed);
                tracing::info!(peer = %self.peer, "broker: refused a client that does not speak MQTT 5");
                return;
            }
            Err(e) => {
                tracing::info!(peer = %self.peer, "broker: no valid CONNECT: {e}");
                return;
            }
        };
        let Some((keep_alive, kick, mut rx)) = self.accept(connect.0, connect.1).await else { return };

        let end = self.session(keep_alive, &kick, &mut rx).await;

        // Leave the registry (only if still ours: a takeover may have replaced us already).
        {
            let mut clients = self.shared.clients.lock().unwrap_or_else(|e| e.into_inner());
            if clients.get(&self.client_id).is_some_and(|e| e.conn == self.conn_id) {
                clients.remove(&self.client_id);
            }
        }
        {
            let mut subs = self.shared.subs.write().unwrap_or_else(|e| e.into_inner());
            for (filter, share) in self.filters.drain(..) {
                subs.remove(&filter, &self.client_id, share.as_deref(), Some(self.conn_id));
            }
        }
        self.shared.stats.connections.fetch_sub(1, Ordering::Relaxed);
        match end {
            End::Normal => tracing::debug!(client = %self.client_id, "broker: disconnected"),
            End::Kicked(reason) => {
                tracing::info!(client = %self.client_id, "broker: disconnected by the broker ({reason:?})");
                // Let the client read the DISCONNECT and close first, so it learns why.
                let mut sink = [0u8; 256];
                let _ = tokio::time::timeout(Duration::from_millis(500), async {
                    while matches!(self.io.read(&mut sink).await, Ok(n) if n > 0) {}
                })
                .await;
            }
            End::Abnormal(why) => {
                tracing::debug!(client = %self.client_id, "broker: connection lost: {why}");
                if let Some(will) = self.will.take() {
                    self.publish_will(will).await;
                }
            }
        }
        let _ = self.io.shutdown().await;
    }

    /// Checks the CONNECT, registers the client and answers CONNACK.
    async fn accept(
        &mut self,
        connect: Connect,
        will: Option<LastWill>,
    ) -> Option<(Duration, Arc<Kick>, mpsc::Receiver<Delivery>)> {
        let expected = self.identity.client_id();
        // A service may add `/{instance}` (several replicas sharing one service identity); a
        // device may open one more connection, `{device_id}/remote`, for remote-access
        // sessions (docs/protocol.md).
        let suffix = connect.client_id.strip_prefix(&expected);
        let instance = match self.identity {
            Identity::Service(_) => suffix.is_some_and(|rest| rest.len() > 1 && rest.starts_with('/')),
            Identity::Device(_) => suffix == Some(crate::DEVICE_REMOTE_SUFFIX),
        };
        if instance {
            self.client_id = connect.client_id.as_str().into();
        } else if !connect.client_id.is_empty() && connect.client_id != expected {
            self.refuse(
                ConnectReturnCode::ClientIdentifierNotValid,
                &format!("client id must be {expected:?}, the certificate's identity"),
            )
            .await;
            return None;
        }
        if let Some(w) = &will {
            let topic = String::from_utf8_lossy(&w.topic).into_owned();
            if !valid_topic(&topic) || !self.allowed(&topic) {
                self.denied(&format!("will topic {topic:?}"));
                self.refuse(ConnectReturnCode::NotAuthorized, "will topic outside the device's prefix").await;
                return None;
            }
            if w.qos == QoS::ExactlyOnce {
                self.refuse(ConnectReturnCode::QoSNotSupported, "maximum QoS is 1").await;
                return None;
            }
        }
        if let Some(id) = self.device().map(str::to_string) {
            match self.shared.gate.admit(&id).await {
                Admission::Allowed => {}
                Admission::Refused => {
                    self.refuse(ConnectReturnCode::NotAuthorized, "device not accepted, decommissioned or revoked")
                        .await;
                    return None;
                }
                Admission::Unavailable => {
                    self.refuse(ConnectReturnCode::ServerUnavailable, "device registry unavailable, retry later").await;
                    return None;
                }
            }
        }
        let props = connect.properties.as_ref();
        self.client_max_packet = props.and_then(|p| p.max_packet_size);
        self.client_receive_max =
            props.and_then(|p| p.receive_maximum).unwrap_or(u16::MAX).clamp(1, self.shared.config.receive_maximum);
        self.will = will;

        let max_ka = self.shared.config.max_keep_alive;
        let imposed = (connect.keep_alive == 0 || connect.keep_alive > max_ka).then_some(max_ka);
        let keep_alive = Duration::from_secs(u64::from(imposed.unwrap_or(connect.keep_alive)));

        let (tx, rx) = mpsc::channel(self.shared.config.max_queued);
        let kick = Arc::new(Kick::new());
        {
            let mut clients = self.shared.clients.lock().unwrap_or_else(|e| e.into_inner());
            let entry = ClientEntry { conn: self.conn_id, tx, kick: kick.clone(), taken: self.taken.clone() };
            if let Some(old) = clients.insert(self.client_id.clone(), entry) {
                // The same client again (a device whose old connection has not died yet):
                // the new connection wins, and the old one leaves without its will.
                old.kick.fire(DisconnectReasonCode::SessionTakenOver);
            }
        }
        self.shared.stats.connections.fetch_add(1, Ordering::Relaxed);
        self.shared.stats.connects_total.fetch_add(1, Ordering::Relaxed);

        let ack = ConnAck {
            session_present: false,
            code: ConnectReturnCode::Success,
            properties: Some(ConnAckProperties {
                session_expiry_interval: Some(0),
                receive_max: Some(self.shared.config.receive_maximum),
                max_qos: Some(1),
                retain_available: Some(1),
                max_packet_size: Some(self.shared.config.max_packet_size),
                assigned_client_identifier: connect.client_id.is_empty().then(|| expected.clone()),
                topic_alias_max: Some(0),
                wildcard_subscription_available: Some(1),
                subscription_identifiers_available: Some(0),
                // Shared subscriptions are for services (droverd's replicas); a device may
                // subscribe only to its own topics, so it is told there are none.
                shared_subscription_available: Some(u8::from(matches!(self.identity, Identity::Service(_)))),
                server_keep_alive: imposed,
                ..no_properties()
            }),
        };
        if self.send(Packet::ConnAck(ack)).await.is_err() {
            return None;
        }
        tracing::debug!(client = %self.client_id, peer = %self.peer, "broker: connected");
        Some((keep_alive, kick, rx))
    }

    async fn session(&mut self, keep_alive: Duration, kick: &Kick, rx: &mut mpsc::Receiver<Delivery>) -> End {
        let grace = keep_alive + keep_alive / 2;
        let mut deadline = Instant::now() + grace;
        loop {
            loop {
                match self.parse() {
                    Ok(Some(packet)) => {
                        let handled = self.handle(packet).await;
                        // After it: a publish may have waited in line for a long while, its
                        // client answered meanwhile (`wait_answering_pings`).
                        deadline = Instant::now() + grace;
                        match handled {
                            Ok(None) => {}
                            Ok(Some(end)) => return end,
                            Err(e) => return End::Abnormal(e.to_string()),
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        let reason = if matches!(e, CodecError::PayloadSizeLimitExceeded { .. }) {
                            DisconnectReasonCode::PacketTooLarge
                        } else {
                            DisconnectReasonCode::MalformedPacket
                        };
                        let _ = self.send(disconnect(reason)).await;
                        return End::Abnormal(format!("bad packet: {e}"));
                    }
                }
            }
            if self.rbuf.capacity() > 64 * 1024 && self.rbuf.is_empty() {
                self.rbuf = BytesMut::new();
            }
            if self.rbuf.capacity() - self.rbuf.len() < 256 {
                self.rbuf.reserve(1024);
            }
            tokio::select! {
                read = self.io.read_buf(&mut self.rbuf) => match read {
                    Ok(0) => return End::Abnormal("connection closed without DISCONNECT".into()),
                    Ok(_) => {}
                    Err(e) => return End::Abnormal(e.to_string()),
                },
                out = rx.recv(), if self.waiting.is_empty() || self.inflight.len() < self.client_receive_max as usize => {
                    let Some(Delivery { msg, qos, retain }) = out else {
                        // Our registry entry is gone: replaced by a takeover, or removed by a kick.
                        let reason = kick.reason();
                        let _ = self.send(disconnect(reason)).await;
                        return End::Kicked(reason);
                    };
                    self.taken.fetch_add(1, Ordering::Relaxed);
                    if let Err(e) = self.deliver(msg, qos, retain).await {
                        return End::Abnormal(e.to_string());
                    }
                }
                reason = kick.wait() => {
                    let _ = self.send(disconnect(reason)).await;
                    return End::Kicked(reason);
                }
                _ = tokio::time::sleep_until(deadline) => {
                    let _ = self.send(disconnect(DisconnectReasonCode::KeepAliveTimeout)).await;
                    return End::Abnormal("keep-alive timeout".into());
                }
            }
        }
    }

    /// Sends a message now, or queues it behind a full in-flight window.
    async fn deliver(&mut self, msg: Arc<Message>, qos: QoS, retain: bool) -> std::io::Result<()> {
        if qos == QoS::AtLeastOnce && self.inflight.len() >= self.client_receive_max as usize {
            if self.waiting.len() >= self.shared.config.max_queued {
                self.shared.stats.dropped_total.fetch_add(1, Ordering::Relaxed);
                return Ok(());
            }
            self.waiting.push_back((msg, qos, retain));
            return Ok(());
        }
        let pkid = if qos == QoS::AtLeastOnce { self.take_pkid(&msg) } else { 0 };
        let publish = Publish {
            dup: false,
            qos,
            retain,
            topic: msg.topic.clone(),
            pkid,
            payload: msg.payload.clone(),
            properties: msg.properties.clone(),
        };
        let packet = Packet::Publish(publish);
        if self.client_max_packet.is_some_and(|max| packet.size() > max as usize) {
            // Larger than the client accepts: drop it, keep the connection.
            self.inflight.remove(&pkid);
            self.shared.stats.dropped_total.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        self.send(packet).await
    }

    fn take_pkid(&mut self, msg: &Arc<Message>) -> u16 {
        loop {
            let id = self.next_pkid;
            self.next_pkid = self.next_pkid.checked_add(1).unwrap_or(1);
            if let std::collections::hash_map::Entry::Vacant(slot) = self.inflight.entry(id) {
                slot.insert(msg.clone());
                return id;
            }
        }
    }

    async fn handle(&mut self, packet: Packet) -> std::io::Result<Option<End>> {
        match packet {
            Packet::Publish(p) => return self.on_publish(p).await,
            Packet::PubAck(ack) => {
                self.inflight.remove(&ack.pkid);
                while self.inflight.len() < self.client_receive_max as usize {
                    let Some((msg, qos, retain)) = self.waiting.pop_front() else { break };
                    self.deliver(msg, qos, retain).await?;
                }
                if self.inflight.is_empty() && self.inflight.capacity() > 64 {
                    self.inflight = HashMap::new();
                }
            }
            Packet::Subscribe(s) => self.on_subscribe(s).await?,
            Packet::Unsubscribe(u) => self.on_unsubscribe(u).await?,
            Packet::PingReq(_) => self.send(Packet::PingResp(PingResp)).await?,
            Packet::Disconnect(d) => {
                return Ok(Some(match d.reason_code {
                    DisconnectReasonCode::NormalDisconnection => End::Normal,
                    other => End::Abnormal(format!("client disconnected with {other:?}")),
                }));
            }
            Packet::Connect(..) => {
                self.send(disconnect(DisconnectReasonCode::ProtocolError)).await?;
                return Ok(Some(End::Abnormal("second CONNECT".into())));
            }
            Packet::PubRec(_) | Packet::PubRel(_) | Packet::PubComp(_) => {
                self.send(disconnect(DisconnectReasonCode::QoSNotSupported)).await?;
                return Ok(Some(End::Abnormal("QoS 2 is not supported".into())));
            }
            Packet::Auth(_) | Packet::ConnAck(_) | Packet::SubAck(_) | Packet::UnsubAck(_) | Packet::PingResp(_) => {
                self.send(disconnect(DisconnectReasonCode::ProtocolError)).await?;
                return Ok(Some(End::Abnormal("unexpected packet from a client".into())));
            }
        }
        Ok(None)
    }

    async fn on_publish(&mut self, p: Publish) -> std::io::Result<Option<End>> {
        if p.qos == QoS::ExactlyOnce {
            self.send(disconnect(DisconnectReasonCode::QoSNotSupported)).await?;
            return Ok(Some(End::Abnormal("QoS 2 publish".into())));
        }
        let topic = match std::str::from_utf8(&p.topic) {
            Ok(t) if valid_topic(t) => t.to_string(),
            _ => {
                self.send(disconnect(DisconnectReasonCode::TopicNameInvalid)).await?;
                return Ok(Some(End::Abnormal("invalid topic name".into())));
            }
        };
        self.shared.stats.messages_in.fetch_add(1, Ordering::Relaxed);
        let mut reason = PubAckReason::Success;
        if !self.allowed(&topic) {
            self.denied(&format!("publish to {topic:?}"));
            reason = PubAckReason::NotAuthorized;
        } else {
            let mut properties = p.properties;
            if let Some(props) = properties.as_mut() {
                props.topic_alias = None;
                props.subscription_identifiers.clear();
            }
            let msg = Arc::new(Message {
                topic: Bytes::from(topic),
                payload: p.payload,
                qos: p.qos,
                retain: p.retain,
                properties,
                from_conn: self.conn_id,
            });
            if msg.retain && !self.shared.retain(&msg, self.device_prefix.as_deref()) {
                self.denied("more retained topics than a device may hold");
                reason = PubAckReason::QuotaExceeded;
            } else {
                let mut undelivered = 0;
                for b in self.shared.route(msg) {
                    if !self.wait_answering_pings(b).await {
                        undelivered += 1;
                    }
                }
                if undelivered > 0 {
                    if p.qos == QoS::AtLeastOnce {
                        // No PUBACK for a message the servers did not take: the device
                        // sends its state again once reconnected.
                        self.shared.stats.busy_disconnects_total.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(
                            "broker: the server replicas took no message for {:?}; disconnecting the publisher (server busy)",
                            self.shared.config.busy_wait
                        );
                        self.send(disconnect(DisconnectReasonCode::ServerBusy)).await?;
                        return Ok(Some(End::Abnormal("server busy".into())));
                    }
                    self.shared.stats.dropped_total.fetch_add(undelivered, Ordering::Relaxed);
                    tracing::warn!(
                        "broker: a share group stayed full for {:?}, message dropped",
                        self.shared.config.busy_wait
                    );
                }
            }
        }
        if p.qos == QoS::AtLeastOnce {
            self.send(Packet::PubAck(PubAck { pkid: p.pkid, reason, properties: None })).await?;
        }
        Ok(None)
    }

    async fn on_subscribe(&mut self, s: Subscribe) -> std::io::Result<()> {
        let mut codes = Vec::with_capacity(s.filters.len());
        let mut retained = Vec::new();
        for f in &s.filters {
            let (share, filter) = match f.path.strip_prefix("$share/") {
                Some(rest) => match rest.split_once('/') {
                    Some((group, filter)) if !group.is_empty() && !group.contains(['+', '#']) => {
                        (Some(Arc::<str>::from(format!("$share/{group}/{filter}"))), filter.to_string())
                    }
                    _ => {
                        codes.push(SubscribeReasonCode::TopicFilterInvalid);
                        continue;
                    }
                },
                None => (None, f.path.clone()),
            };
            if !valid_filter(&filter) {
                codes.push(SubscribeReasonCode::TopicFilterInvalid);
                continue;
            }
            if share.is_some() && self.device().is_some() {
                self.denied(&format!("shared subscription {:?}", f.path));
                codes.push(SubscribeReasonCode::NotAuthorized);
                continue;
            }
            if !self.allowed(&filter) {
                self.denied(&format!("subscribe to {:?}", f.path));
                codes.push(SubscribeReasonCode::NotAuthorized);
                continue;
            }
            let qos = if f.qos == QoS::AtMostOnce { QoS::AtMostOnce } else { QoS::AtLeastOnce };
            let sub = Subscriber {
                client: self.client_id.clone(),
                conn: self.conn_id,
                qos,
                no_local: f.nolocal,
                retain_as_published: f.preserve_retain,
                share: share.clone(),
            };
            let existed = self.shared.subs.write().unwrap_or_else(|e| e.into_inner()).insert(&filter, sub);
            if !self.filters.iter().any(|(fl, sh)| *fl == filter && *sh == share) {
                self.filters.push((filter.clone(), share.clone()));
            }
            use rumqttc::v5::mqttbytes::v5::RetainForwardRule;
            let send_retained = share.is_none()
                && match f.retain_forward_rule {
                    RetainForwardRule::OnEverySubscribe => true,
                    RetainForwardRule::OnNewSubscribe => !existed,
                    RetainForwardRule::Never => false,
                };
            if send_retained {
                retained.extend(self.shared.retained_for(&filter).into_iter().map(|m| (m, qos)));
            }
            codes.push(SubscribeReasonCode::Success(qos));
        }
        self.send(Packet::SubAck(SubAck { pkid: s.pkid, return_codes: codes, properties: None })).await?;
        for (msg, qos) in retained {
            let qos = if (msg.qos as u8) < (qos as u8) { msg.qos } else { qos };
            self.deliver(msg, qos, true).await?;
        }
        Ok(())
    }

    async fn on_unsubscribe(&mut self, u: Unsubscribe) -> std::io::Result<()> {
        let mut reasons = Vec::with_capacity(u.filters.len());
        for path in &u.filters {
            let (share, filter) = match path.strip_prefix("$share/").and_then(|r| r.split_once('/')) {
                Some((_, filter)) => (Some(path.as_str()), filter),
                None => (None, path.as_str()),
            };
            let removed = self.shared.subs.write().unwrap_or_else(|e| e.into_inner()).remove(
                filter,
                &self.client_id,
                share,
                Some(self.conn_id),
            );
            self.filters.retain(|(f, s)| !(f == filter && s.as_deref() == share));
            reasons.push(if removed { UnsubAckReason::Success } else { UnsubAckReason::NoSubscriptionExisted });
        }
        self.send(Packet::UnsubAck(UnsubAck { pkid: u.pkid, reasons, properties: None })).await
    }

    async fn publish_will(&self, will: LastWill) {
        let msg = Arc::new(Message {
            topic: will.topic,
            payload: will.message,
            qos: will.qos,
            retain: will.retain,
            properties: None,
            from_conn: 0,
        });
        self.shared.stats.messages_in.fetch_add(1, Ordering::Relaxed);
        if msg.retain {
            self.shared.retain(&msg, None);
        }
        for b in self.shared.route(msg) {
            if !b.wait(self.shared.config.busy_wait, &self.shared.stats).await {
                self.shared.stats.dropped_total.fetch_add(1, Ordering::Relaxed);
                tracing::warn!("broker: a share group stayed full; a last will was dropped");
            }
        }
    }
}

impl Conn {
    /// Waits for a delivery blocked on a full share group ([`crate::Blocked::wait`]) while
    /// answering the client's PINGREQs. They arrive behind its publishes, and a client whose
    /// ping goes unanswered for a keep-alive drops its connection: a device in line behind a
    /// busy server would reconnect (and its messages wait in line again) instead of waiting.
    /// Other packets stay buffered, in order, for the session loop.
    async fn wait_answering_pings(&mut self, b: crate::Blocked) -> bool {
        let shared = self.shared.clone();
        let wait = b.wait(shared.config.busy_wait, &shared.stats);
        tokio::pin!(wait);
        let mut reading = true;
        loop {
            let read = tokio::select! {
                delivered = &mut wait => return delivered,
                read = self.io.read_buf(&mut self.rbuf), if reading => read,
            };
            match read {
                // The session loop sees the end (or the error) once the wait is over.
                Ok(0) | Err(_) => reading = false,
                Ok(_) => {
                    for _ in 0..take_pingreqs(&mut self.rbuf) {
                        if self.send(Packet::PingResp(PingResp)).await.is_err() {
                            reading = false;
                        }
                    }
                    // A client that keeps sending while it waits is held back by TCP.
                    if self.rbuf.len() > MAX_BUFFERED_WHILE_BLOCKED {
                        reading = false;
                    }
                }
            }
        }
    }
}

/// Bytes a connection waiting for a full share group reads ahead, looking for PINGREQs.
const MAX_BUFFERED_WHILE_BLOCKED: usize = 256 * 1024;

/// Removes the complete PINGREQ packets from `buf` (anywhere among the buffered packets,
/// keeping the others in order) and returns how many there were. Stops at the first
/// incomplete or malformed header: the session's parser deals with it.
fn take_pingreqs(buf: &mut BytesMut) -> usize {
    const PINGREQ: u8 = 0xC0;
    let mut kept = BytesMut::new();
    let (mut i, mut pings) = (0, 0);
    while i < buf.len() {
        let (mut len, mut shift, mut j, mut complete) = (0usize, 0, i + 1, false);
        while j < buf.len() && j < i + 5 {
            len |= usize::from(buf[j] & 0x7f) << shift;
            shift += 7;
            j += 1;
            if buf[j - 1] & 0x80 == 0 {
                complete = true;
                break;
            }
        }
        let end = j.saturating_add(len);
        if !complete || end > buf.len() {
            break;
        }
        if buf[i] == PINGREQ && len == 0 {
            pings += 1;
        } else {
            kept.extend_from_slice(&buf[i..end]);
        }
        i = end;
    }
    if pings > 0 {
        kept.extend_from_slice(&buf[i..]);
        *buf = kept;
    }
    pings
}

fn disconnect(reason: DisconnectReasonCode) -> Packet {
    // Always with a reason string: the codec mis-sizes a DISCONNECT with no properties.
    let why = match reason {
        DisconnectReasonCode::SessionTakenOver => "another connection of this client took over",
        DisconnectReasonCode::ServerShuttingDown => "the broker is shutting down",
        DisconnectReasonCode::NotAuthorized => "not authorized (decommissioned or revoked)",
        DisconnectReasonCode::KeepAliveTimeout => "nothing received within 1.5 keep-alive intervals",
        DisconnectReasonCode::PacketTooLarge => "packet larger than the broker's maximum packet size",
        DisconnectReasonCode::QoSNotSupported => "QoS 2 is not supported (maximum QoS is 1)",
        DisconnectReasonCode::TopicNameInvalid => "invalid topic name",
        DisconnectReasonCode::MalformedPacket => "malformed packet",
        DisconnectReasonCode::ProtocolError => "protocol error",
        DisconnectReasonCode::ServerBusy => "server busy: the servers are behind; send again after reconnecting",
        _ => "disconnected by the broker",
    };
    let properties = DisconnectProperties {
        session_expiry_interval: None,
        reason_string: Some(why.to_string()),
        user_properties: Vec::new(),
        server_reference: None,
    };
    Packet::Disconnect(Disconnect { reason_code: reason, properties: Some(properties) })
}

fn no_properties() -> ConnAckProperties {
    ConnAckProperties {
        session_expiry_interval: None,
        receive_max: None,
        max_qos: None,
        retain_available: None,
        max_packet_size: None,
        assigned_client_identifier: None,
        topic_alias_max: None,
        reason_string: None,
        user_properties: Vec::new(),
        wildcard_subscription_available: None,
        subscription_identifiers_available: None,
        shared_subscription_available: None,
        server_keep_alive: None,
        response_information: None,
        server_reference: None,
        authentication_method: None,
        authentication_data: None,
    }
}

#[cfg(test)]
mod tests {
    use super::take_pingreqs;
    use bytes::BytesMut;

    #[test]
    fn pingreqs_are_taken_from_among_buffered_packets_in_order() {
        // PUBACK(pkid 1), PINGREQ, a PUBLISH with a 3-byte body, PINGREQ, half a PINGREQ.
        let mut buf = BytesMut::from(&[0x40, 0x02, 0x00, 0x01, 0xC0, 0x00, 0x30, 0x03, 1, 2, 3, 0xC0, 0x00, 0xC0][..]);
        assert_eq!(take_pingreqs(&mut buf), 2);
        assert_eq!(&buf[..], &[0x40, 0x02, 0x00, 0x01, 0x30, 0x03, 1, 2, 3, 0xC0]);
        // An incomplete packet first: nothing is taken behind it.
        let mut buf = BytesMut::from(&[0x30, 0x05, 1, 2, 0xC0, 0x00][..]);
        assert_eq!(take_pingreqs(&mut buf), 0);
        assert_eq!(buf.len(), 6);
        // A two-byte remaining length.
        let mut body = vec![0x30, 0x80, 0x01];
        body.extend(std::iter::repeat_n(7u8, 128));
        body.extend([0xC0, 0x00]);
        let mut buf = BytesMut::from(&body[..]);
        assert_eq!(take_pingreqs(&mut buf), 1);
        assert_eq!(buf.len(), 131);
    }
}
