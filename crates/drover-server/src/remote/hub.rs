//! This replica's MQTT connection for remote sessions.
//!
//! It is a client of its own (`service:droverd/{instance}/remote`), apart from the ingest
//! connection, so a bulk transfer never delays the fleet's uplink, and it subscribes to each
//! session's `rs/{session}/u` topic without a share group: the device's data reaches the
//! replica that holds the operator's WebSocket, whichever replica the device's main
//! connection's messages reach.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use rumqttc::{TlsConfiguration, Transport};
use tokio::sync::{mpsc, oneshot, watch};

use crate::devnet::IngestTarget;

/// Messages from one session's device topic waiting for the relay; the device never has more
/// in flight than the credit it was given, so a full queue means a misbehaving device.
const SESSION_QUEUE: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("remote access is not available: this droverd has no MQTT broker (set mqtt_listen or mqtt_url)")]
    NoBroker,
    #[error("remote access: the broker connection is down, try again shortly")]
    Disconnected,
    #[error("remote access: the broker refused this replica's subscription to the session")]
    Refused,
}

#[derive(Default)]
pub struct Hub {
    client: std::sync::OnceLock<AsyncClient>,
    routes: Mutex<HashMap<String, mpsc::Sender<Bytes>>>,
    connected: std::sync::atomic::AtomicBool,
    /// Subscriptions sent in this order and not yet given a packet id by the event loop,
    /// then those waiting for their SUBACK: a session tells the device to start only once
    /// its topic is subscribed, or the device's first messages would be lost.
    subscribing: Mutex<Subscribing>,
    /// This replica's legs of web UI sessions (`super::web`).
    pub web: super::web::Registry,
}

#[derive(Default)]
struct Subscribing {
    queued: std::collections::VecDeque<Option<oneshot::Sender<bool>>>,
    sent: HashMap<u16, oneshot::Sender<bool>>,
}

/// A session's subscription: messages published by the device on its `u` topic. Dropping it
/// unsubscribes.
pub struct Inbox {
    hub: Arc<Hub>,
    topic: String,
    pub rx: mpsc::Receiver<Bytes>,
}

impl Drop for Inbox {
    fn drop(&mut self) {
        self.hub.routes.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.topic);
        if let Some(c) = self.hub.client.get() {
            let _ = c.try_unsubscribe(self.topic.clone());
        }
    }
}

impl Hub {
    pub fn new() -> Arc<Hub> {
        Arc::new(Hub::default())
    }

    fn client(&self) -> Result<&AsyncClient, HubError> {
        let c = self.client.get().ok_or(HubError::NoBroker)?;
        if !self.connected.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(HubError::Disconnected);
        }
        Ok(c)
    }

    /// Subscribes to `topic` (without a share group) for one session.
    pub async fn subscribe(self: &Arc<Hub>, topic: String) -> Result<Inbox, HubError> {
        let client = self.client()?.clone();
        let (tx, rx) = mpsc::channel(SESSION_QUEUE);
        self.routes.lock().unwrap_or_else(|e| e.into_inner()).insert(topic.clone(), tx);
        let inbox = Inbox { hub: self.clone(), topic: topic.clone(), rx };
        let (done, acked) = oneshot::channel();
        self.send_subscribe(&client, topic, Some(done))?;
        match tokio::time::timeout(Duration::from_secs(10), acked).await {
            Ok(Ok(true)) => Ok(inbox),
            Ok(Ok(false)) => Err(HubError::Refused),
            _ => Err(HubError::Disconnected),
        }
    }

    fn send_subscribe(
        &self,
        client: &AsyncClient,
        topic: String,
        done: Option<oneshot::Sender<bool>>,
    ) -> Result<(), HubError> {
        // Held across the send so that the queue's order is the order the event loop sees.
        let mut pending = self.subscribing.lock().unwrap_or_else(|e| e.into_inner());
        client.try_subscribe(topic, QoS::AtMostOnce).map_err(|_| HubError::Disconnected)?;
        pending.queued.push_back(done);
        Ok(())
    }

    /// Publishes to a device; waits while the client's outgoing queue is full.
    pub async fn publish(&self, topic: String, qos: QoS, payload: Vec<u8>) -> Result<(), HubError> {
        let client = self.client()?;
        client.publish(topic, qos, false, payload).await.map_err(|_| HubError::Disconnected)
    }

    fn deliver(&self, topic: &str, payload: Bytes) {
        let tx = self.routes.lock().unwrap_or_else(|e| e.into_inner()).get(topic).cloned();
        if let Some(tx) = tx
            && let Err(mpsc::error::TrySendError::Full(_)) = tx.try_send(payload)
        {
            tracing::warn!(topic, "remote session: the device sent more than its credit; message dropped");
        }
    }

    /// The sessions this replica relays, by id (from their `rs/{session}/u` topics).
    pub fn session_ids(&self) -> Vec<String> {
        let routes = self.routes.lock().unwrap_or_else(|e| e.into_inner());
        routes.keys().filter_map(|t| t.rsplit('/').nth(1)).map(str::to_string).collect()
    }

    /// Until `stop`: every quarter of `lost_after`, vouches for the sessions this replica
    /// relays and ends as lost the open sessions no replica has vouched for in `lost_after`
    /// (their droverd stopped without ending them); ends the web UI sessions no replica has
    /// served for their idle timeout, or past their maximum duration.
    pub async fn run_liveness(
        self: Arc<Hub>,
        db: crate::db::Db,
        lost_after: Duration,
        mut stop: watch::Receiver<bool>,
    ) {
        let lost_ms = i64::try_from(lost_after.as_millis()).unwrap_or(i64::MAX);
        let mut tick = tokio::time::interval((lost_after / 4).max(Duration::from_millis(250)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                _ = tick.tick() => {}
            }
            let now = crate::time::now_ms();
            if let Err(e) = super::sessions::keep_alive(&db, &self.session_ids(), now).await {
                tracing::warn!("remote sessions: cannot record them alive: {e}");
            }
            match super::sessions::close_lost(&db, now, lost_ms).await {
                Ok(0) => {}
                Ok(n) => {
                    tracing::info!("remote sessions: {n} ended as lost (their droverd stopped without ending them)")
                }
                Err(e) => tracing::warn!("remote sessions: cannot end lost sessions: {e}"),
            }
            match super::links::expire(&db, now).await {
                Ok(0) => {}
                Ok(n) => {
                    tracing::info!("remote sessions: {n} web UI sessions ended (idle or at their maximum duration)")
                }
                Err(e) => tracing::warn!("remote sessions: cannot end idle web UI sessions: {e}"),
            }
        }
    }

    /// Runs the connection until `stop`: reconnects with backoff, subscribes again to every
    /// open session's topic after a reconnect.
    pub async fn run(self: Arc<Hub>, target: IngestTarget, mut stop: watch::Receiver<bool>) {
        let mut opts = MqttOptions::new(format!("{}/remote", target.client_id), target.host.clone(), target.port);
        opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(target.tls.clone())));
        opts.set_keep_alive(Duration::from_secs(30));
        opts.set_clean_start(true);
        opts.set_max_packet_size(Some(2 * 1024 * 1024));
        // Keystrokes are single small frames: without TCP_NODELAY, Nagle holds each one back
        // until the previous is acknowledged (up to the peer's 40 ms delayed ACK).
        let mut net = opts.network_options();
        net.set_tcp_nodelay(true);
        opts.set_network_options(net);
        let (client, mut eventloop) = AsyncClient::new(opts, 1024);
        let _ = self.client.set(client.clone());
        let mut failures = 0u32;
        loop {
            let event = tokio::select! {
                _ = stop.wait_for(|s| *s) => {
                    let _ = client.try_disconnect();
                    return;
                }
                event = eventloop.poll() => event,
            };
            match event {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    failures = 0;
                    self.connected.store(true, std::sync::atomic::Ordering::Relaxed);
                    let topics: Vec<String> =
                        self.routes.lock().unwrap_or_else(|e| e.into_inner()).keys().cloned().collect();
                    for t in topics {
                        let _ = self.send_subscribe(&client, t, None);
                    }
                }
                Ok(Event::Outgoing(rumqttc::Outgoing::Subscribe(pkid))) => {
                    let mut pending = self.subscribing.lock().unwrap_or_else(|e| e.into_inner());
                    if let Some(Some(done)) = pending.queued.pop_front() {
                        pending.sent.insert(pkid, done);
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(ack))) => {
                    let done = self.subscribing.lock().unwrap_or_else(|e| e.into_inner()).sent.remove(&ack.pkid);
                    if let Some(done) = done {
                        let ok = ack
                            .return_codes
                            .iter()
                            .all(|c| matches!(c, rumqttc::v5::mqttbytes::v5::SubscribeReasonCode::Success(_)));
                        let _ = done.send(ok);
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if let Ok(topic) = std::str::from_utf8(&p.topic) {
                        self.deliver(topic, p.payload);
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    self.connected.store(false, std::sync::atomic::Ordering::Relaxed);
                    {
                        // Waiters fail now (their sessions report it); the routes stay and are
                        // subscribed again after the reconnect.
                        let mut pending = self.subscribing.lock().unwrap_or_else(|e| e.into_inner());
                        pending.queued.clear();
                        pending.sent.clear();
                    }
                    failures += 1;
                    let wait = Duration::from_millis(200u64.saturating_mul(1 << failures.min(5)));
                    tracing::warn!("remote sessions: broker connection lost ({e}); retrying in {wait:?}");
                    tokio::select! {
                        _ = stop.wait_for(|s| *s) => return,
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
    }
}
