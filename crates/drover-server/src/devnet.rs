//! The device-facing side of droverd: the HTTPS endpoint devices enroll through, the embedded
//! MQTT broker, and the MQTT client through which this replica consumes device traffic — the
//! same client whether the broker is the embedded one or an external cluster (design
//! decision 2).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use drover_broker::{Admission, BoxFuture, Broker, BrokerHandle, Gatekeeper};
use drover_proto::device::{self, OnlineState, Uplink};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use rumqttc::{TlsConfiguration, Transport};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::{mpsc, watch};

use crate::app::{AppState, StartError};
use crate::ca::FleetCa;
use crate::config::Config;
use crate::db::Db;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn tls_error(what: &str, e: impl std::fmt::Display) -> StartError {
    StartError::Bootstrap(format!("{what}: {e}"))
}

fn certs(pem: &str, what: &str) -> Result<Vec<CertificateDer<'static>>, StartError> {
    let certs: Vec<_> =
        CertificateDer::pem_slice_iter(pem.as_bytes()).collect::<Result<_, _>>().map_err(|e| tls_error(what, e))?;
    if certs.is_empty() {
        return Err(tls_error(what, "no certificate in the PEM"));
    }
    Ok(certs)
}

fn key(pem: &str, what: &str) -> Result<PrivateKeyDer<'static>, StartError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| tls_error(what, e))
}

fn roots(ca_pem: &str) -> Result<Arc<rustls::RootCertStore>, StartError> {
    let mut roots = rustls::RootCertStore::empty();
    for c in certs(ca_pem, "fleet CA certificate")? {
        roots.add(c).map_err(|e| tls_error("fleet CA certificate", e))?;
    }
    Ok(Arc::new(roots))
}

/// The names the device-facing certificate is valid for: the configured ones and this host's.
pub fn server_names(config: &Config) -> Vec<String> {
    let mut names = config.public_names.clone();
    if let Ok(host) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
        let host = host.trim().to_string();
        if !host.is_empty() && !names.contains(&host) {
            names.push(host);
        }
    }
    names
}

/// TLS for the device-facing listeners, both with one server certificate from the fleet CA.
pub struct DeviceTls {
    /// The broker: a client certificate from the fleet CA is mandatory.
    pub broker: Arc<rustls::ServerConfig>,
    /// The HTTPS endpoint: a client certificate is optional (a new device has none yet).
    pub https: Arc<rustls::ServerConfig>,
}

pub fn device_tls(ca: &FleetCa, names: &[String]) -> Result<DeviceTls, StartError> {
    let (cert_pem, key_pem) = ca.issue_server(names)?;
    let mut chain = certs(&cert_pem, "server certificate")?;
    chain.extend(certs(ca.cert_pem(), "fleet CA certificate")?);
    let key = key(&key_pem, "server key")?;
    let roots = roots(ca.cert_pem())?;
    let config = |require_client: bool| {
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(roots.clone(), provider());
        let verifier = if require_client { verifier } else { verifier.allow_unauthenticated() };
        let verifier = verifier.build().map_err(|e| tls_error("client verifier", e))?;
        let config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| tls_error("TLS", e))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(|e| tls_error("server certificate", e))?;
        Ok::<_, StartError>(Arc::new(config))
    };
    Ok(DeviceTls { broker: config(true)?, https: config(false)? })
}

/// Lets a device connect when the registry says it is accepted and not revoked.
struct Registry {
    db: Db,
}

impl Gatekeeper for Registry {
    fn admit<'a>(&'a self, device_id: &'a str) -> BoxFuture<'a, Admission> {
        Box::pin(async move {
            match crate::presence::device_may_connect(&self.db, device_id).await {
                Ok(true) => Admission::Allowed,
                Ok(false) => Admission::Refused,
                Err(e) => {
                    tracing::warn!(device_id, "cannot check a connecting device: {e}");
                    Admission::Unavailable
                }
            }
        })
    }
}

fn listen_error(addr: &str, source: std::io::Error, flag: &'static str) -> StartError {
    let hint = match source.kind() {
        std::io::ErrorKind::AddrInUse => flag,
        _ => "",
    };
    StartError::Listen { addr: addr.to_string(), source, hint }
}

/// Binds the embedded broker; it runs until `stop` changes.
pub async fn start_broker(
    addr: SocketAddr,
    db: &Db,
    tls: Arc<rustls::ServerConfig>,
    mut stop: watch::Receiver<bool>,
) -> Result<BrokerHandle, StartError> {
    let broker = Broker::bind(drover_broker::Config::new(addr, tls), Arc::new(Registry { db: db.clone() }))
        .await
        .map_err(|e| listen_error(&addr.to_string(), e, " (choose another with --mqtt-listen)"))?;
    let handle = broker.handle();
    tokio::spawn(broker.run(async move {
        let _ = stop.wait_for(|s| *s).await;
    }));
    Ok(handle)
}

/// A TCP listener whose connections are TLS: handshakes run in their own tasks, so a slow
/// client cannot hold up the others.
pub struct TlsListener {
    local: SocketAddr,
    rx: mpsc::Receiver<(tokio_rustls::server::TlsStream<tokio::net::TcpStream>, SocketAddr)>,
}

impl TlsListener {
    pub async fn bind(addr: &str, tls: Arc<rustls::ServerConfig>) -> Result<TlsListener, StartError> {
        let tcp = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| listen_error(addr, e, " (choose another with --device-listen)"))?;
        let local = tcp.local_addr().map_err(StartError::Serve)?;
        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                let (stream, peer) = match tcp.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!("device endpoint: accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                if tx.is_closed() {
                    return;
                }
                let acceptor = acceptor.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send((tls, peer)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, "device endpoint: TLS handshake failed: {e}"),
                        Err(_) => tracing::debug!(%peer, "device endpoint: TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(TlsListener { local, rx })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(conn) => conn,
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.local)
    }
}

/// The peer of a device-endpoint connection (what `ConnectInfo<SocketAddr>` is on the API),
/// and the device its client certificate names, when it sent one. The certificate was
/// verified against the fleet CA in the handshake, so its common name is the device's id.
#[derive(Clone, Debug)]
pub struct DevicePeer(pub SocketAddr, pub Option<Arc<str>>);

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, TlsListener>> for DevicePeer {
    fn connect_info(stream: axum::serve::IncomingStream<'_, TlsListener>) -> DevicePeer {
        let device = stream.io().get_ref().1.peer_certificates().and_then(|certs| certificate_device(certs.first()?));
        DevicePeer(*stream.remote_addr(), device)
    }
}

/// The device id a (verified) client certificate names: its subject's common name.
fn certificate_device(cert: &CertificateDer<'_>) -> Option<Arc<str>> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let cn = cert.subject().iter_common_name().next()?.as_str().ok()?;
    device::valid_device_id(cn).then(|| Arc::from(cn))
}

/// The routes served to devices over HTTPS: enrollment, artifact downloads and health,
/// nothing an operator uses.
pub fn device_router(state: AppState) -> axum::Router {
    use axum::extract::ConnectInfo;
    use axum::routing::{get, post};
    axum::Router::new()
        .route("/api/v1/enroll", post(crate::api::enroll))
        .route("/device/v1/artifacts/{id}", get(crate::download::artifact))
        .route("/healthz", get(|| async { "ok\n" }))
        .layer(tower_http::limit::RequestBodyLimitLayer::new(64 * 1024))
        .layer(axum::middleware::map_request(|mut req: axum::extract::Request| async move {
            if let Some(ConnectInfo(DevicePeer(addr, device))) =
                req.extensions().get::<ConnectInfo<DevicePeer>>().cloned()
            {
                req.extensions_mut().insert(ConnectInfo(addr));
                if let Some(d) = device {
                    req.extensions_mut().insert(crate::download::PeerDevice(d));
                }
            }
            req
        }))
        .with_state(state)
}

/// Where and how this replica reaches the broker as a service client.
#[derive(Clone)]
pub struct IngestTarget {
    pub host: String,
    pub port: u16,
    pub tls: Arc<rustls::ClientConfig>,
    pub client_id: String,
}

/// A TLS client configuration presenting `cert_pem`/`key_pem`, trusting `ca_pem`.
pub fn client_tls(ca_pem: &str, cert_pem: &str, key_pem: &str) -> Result<Arc<rustls::ClientConfig>, StartError> {
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_error("TLS", e))?
        .with_root_certificates(roots(ca_pem)?)
        .with_client_auth_cert(certs(cert_pem, "MQTT client certificate")?, key(key_pem, "MQTT client key")?)
        .map_err(|e| tls_error("MQTT client certificate", e))?;
    Ok(Arc::new(config))
}

/// Parses `mqtts://host:port` (port 8883 when absent).
pub fn parse_mqtt_url(url: &str) -> Result<(String, u16), StartError> {
    let bad = |why: &str| StartError::Bootstrap(format!("invalid mqtt_url {url:?}: {why}"));
    let rest = url.strip_prefix("mqtts://").ok_or_else(|| bad("must start with mqtts:// (devices talk TLS only)"))?;
    let rest = rest.trim_end_matches('/');
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => {
            (h.trim_start_matches('[').trim_end_matches(']'), p.parse().map_err(|_| bad("bad port"))?)
        }
        _ => (rest, 8883),
    };
    if host.is_empty() {
        return Err(bad("no host"));
    }
    Ok((host.to_string(), port))
}

/// QoS 0 messages (heartbeats) waiting for the worker, at most; more are dropped. QoS 1 ones
/// are bounded by the broker's in-flight window: they are acknowledged only once handled.
const INGEST_QOS0_BACKLOG: usize = 4096;

/// At most this many heartbeats are recorded in one transaction.
const MAX_HEARTBEAT_BATCH: usize = 1000;

/// A device message whose recording and acknowledgement take this long is logged.
const SLOW_MESSAGE: Duration = Duration::from_millis(500);

/// Consumes the fleet's uplink traffic through the shared subscription until `stop`; the
/// same connection carries the engine's commands to devices.
///
/// The connection is polled without pause (keep-alive, outgoing commands) while one worker
/// handles the messages in order. QoS 1 messages are acknowledged by hand once handled: when
/// the database is slow, the broker stops sending once this replica's in-flight window is
/// full and holds the devices back (flow control) — nothing waits in memory here, and a
/// message is acknowledged only when it has been recorded.
pub async fn run_ingest(
    db: Db,
    engine: Arc<crate::engine::Engine>,
    telemetry: Arc<crate::telemetry::ingest::Ingest>,
    target: IngestTarget,
    stats: Arc<crate::metrics::DeviceTraffic>,
    mut stop: watch::Receiver<bool>,
) {
    let mut opts = MqttOptions::new(target.client_id.clone(), target.host.clone(), target.port);
    opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(target.tls.clone())));
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_clean_start(true);
    opts.set_max_packet_size(Some(2 * 1024 * 1024));
    opts.set_manual_acks(true);
    let (client, mut eventloop) = AsyncClient::new(opts, 256);
    engine.start(client.clone(), stop.clone());
    telemetry.start(client.clone(), stop.clone());
    crate::device_rules::start(db.clone(), client.clone(), stop.clone());
    // Which connection a message came on: an acknowledgement is sent only on that one (a
    // packet id means nothing on the next connection).
    let epoch = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let backlog = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    // Unbounded, but bounded in effect: QoS 1 by the in-flight window, QoS 0 by `backlog`. The
    // poll loop never waits on the worker, so the worker may wait on the client's queue.
    let (work, mut queue) = mpsc::unbounded_channel::<(u64, rumqttc::v5::mqttbytes::v5::Publish, std::time::Instant)>();
    // On stop the worker finishes the message in hand and leaves the rest unacknowledged (the
    // broker gives them to another replica, or the devices send them again), so nothing is
    // handled after the database closes.
    let worker = {
        let (db, engine, telemetry, client, epoch, backlog) =
            (db.clone(), engine.clone(), telemetry.clone(), client.clone(), epoch.clone(), backlog.clone());
        let mut stop = stop.clone();
        tokio::spawn(async move {
            // Heartbeats waiting to be recorded together (device, when, arrived): a fleet's
            // heartbeats come in bursts, one commit each would hold everything behind them.
            let mut beats: Vec<(String, i64, std::time::Instant)> = Vec::new();
            loop {
                let next = if beats.is_empty() {
                    tokio::select! {
                        biased;
                        _ = stop.wait_for(|s| *s) => None,
                        next = queue.recv() => next,
                    }
                } else {
                    match queue.try_recv() {
                        Ok(m) => Some(m),
                        Err(mpsc::error::TryRecvError::Empty) => {
                            record_beats(&db, &stats, &mut beats).await;
                            continue;
                        }
                        Err(mpsc::error::TryRecvError::Disconnected) => None,
                    }
                };
                let Some((on, p, arrived)) = next else { break };
                if p.qos == QoS::AtMostOnce {
                    backlog.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                }
                let topic = std::str::from_utf8(&p.topic).ok().and_then(device::parse_topic);
                if p.qos == QoS::AtMostOnce
                    && let Some((device_id, device::Channel::Heartbeat)) = topic
                    && device::decode_uplink(device::Channel::Heartbeat, &p.payload).is_ok()
                {
                    beats.push((device_id.to_string(), crate::time::now_ms(), arrived));
                    if beats.len() >= MAX_HEARTBEAT_BATCH {
                        record_beats(&db, &stats, &mut beats).await;
                    }
                    continue;
                }
                // In order: a device's heartbeats before its next message.
                record_beats(&db, &stats, &mut beats).await;
                let started = std::time::Instant::now();
                // A message not recorded for lack of space is not acknowledged: it is tried
                // again (the broker holds the devices back meanwhile) until it is, or until stop.
                let mut retry = Duration::from_millis(250);
                let mut stopped = false;
                while !handle_publish(&db, &engine, &telemetry, &p).await {
                    tracing::warn!(
                        "device traffic: a message not recorded (disk full), not acknowledged; retrying in {retry:?}"
                    );
                    tokio::select! {
                        _ = stop.wait_for(|s| *s) => { stopped = true; break; }
                        _ = tokio::time::sleep(retry) => {}
                    }
                    retry = (retry * 2).min(Duration::from_secs(5));
                }
                if stopped {
                    break;
                }
                let handled = started.elapsed();
                if p.qos != QoS::AtMostOnce
                    && on == epoch.load(std::sync::atomic::Ordering::Acquire)
                    && let Err(e) = client.ack(&p).await
                {
                    tracing::warn!("device traffic: cannot acknowledge: {e}");
                }
                let took = started.elapsed();
                let channel = topic.map_or("other", |(_, c)| c.suffix());
                stats.observe(channel, started - arrived, took);
                if took >= SLOW_MESSAGE {
                    tracing::warn!(
                        channel,
                        "device traffic: one message took {took:?} to record ({handled:?}) and acknowledge; \
                         the broker holds the devices back meanwhile"
                    );
                }
            }
            record_beats(&db, &stats, &mut beats).await;
        })
    };
    let mut dropped = 0u64;
    let mut failures = 0u32;
    loop {
        let event = tokio::select! {
            _ = stop.wait_for(|s| *s) => None,
            event = eventloop.poll() => Some(event),
        };
        let Some(event) = event else {
            let _ = worker.await;
            let _ = client.try_disconnect();
            return;
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                epoch.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
                failures = 0;
                tracing::info!(broker = %format!("{}:{}", target.host, target.port), "consuming device traffic");
                if let Err(e) = client.try_subscribe(device::SERVER_UPLINK_SUBSCRIPTION, QoS::AtLeastOnce) {
                    tracing::error!("cannot subscribe to device traffic: {e}");
                }
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                if ack
                    .return_codes
                    .iter()
                    .any(|c| !matches!(c, rumqttc::v5::mqttbytes::v5::SubscribeReasonCode::Success(_)))
                {
                    tracing::error!("the broker refused the device traffic subscription: {:?}", ack.return_codes);
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                if p.qos == QoS::AtMostOnce
                    && backlog.fetch_add(1, std::sync::atomic::Ordering::Relaxed) >= INGEST_QOS0_BACKLOG
                {
                    backlog.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                    dropped += 1;
                    if dropped.is_power_of_two() {
                        tracing::warn!("device traffic: the worker is behind; {dropped} QoS 0 message(s) dropped");
                    }
                    continue;
                }
                let on = epoch.load(std::sync::atomic::Ordering::Acquire);
                if work.send((on, p, std::time::Instant::now())).is_err() {
                    return;
                }
            }
            Ok(_) => {}
            Err(e) => {
                failures += 1;
                let wait = Duration::from_millis(200u64.saturating_mul(1 << failures.min(5)));
                tracing::warn!("device traffic: broker connection lost ({e}); retrying in {wait:?}");
                tokio::select! {
                    _ = stop.wait_for(|s| *s) => return,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
}

/// One message from the shared subscription: telemetry to its writer, the rest recorded.
/// Records the heartbeats waiting in `beats` in one transaction, and empties it.
async fn record_beats(
    db: &Db,
    stats: &crate::metrics::DeviceTraffic,
    beats: &mut Vec<(String, i64, std::time::Instant)>,
) {
    if beats.is_empty() {
        return;
    }
    let started = std::time::Instant::now();
    let batch: Vec<(String, i64)> = beats.iter().map(|(d, at, _)| (d.clone(), *at)).collect();
    if let Err(e) = crate::presence::record_heartbeats(db, &batch).await {
        tracing::warn!("device traffic: cannot record {} heartbeats: {e}", batch.len());
    }
    let took = started.elapsed();
    // Each heartbeat's share of the batch's time.
    let each = took / u32::try_from(beats.len()).unwrap_or(u32::MAX);
    for (_, _, arrived) in beats.drain(..) {
        stats.observe(device::Channel::Heartbeat.suffix(), started.saturating_duration_since(arrived), each);
    }
    if took >= SLOW_MESSAGE {
        tracing::warn!("device traffic: {} heartbeats took {took:?} to record", batch.len());
    }
}

async fn handle_publish(
    db: &Db,
    engine: &Arc<crate::engine::Engine>,
    telemetry: &Arc<crate::telemetry::ingest::Ingest>,
    p: &rumqttc::v5::mqttbytes::v5::Publish,
) -> bool {
    let Ok(topic) = std::str::from_utf8(&p.topic) else { return true };
    if let Some((device_id, device::Channel::Telemetry)) = device::parse_topic(topic) {
        // Checked here, queued for the telemetry writer (waits while its queue is full).
        match device::decode_uplink(device::Channel::Telemetry, &p.payload) {
            Ok(Uplink::Telemetry(b)) => telemetry.submit(device_id, b).await,
            Ok(_) => {}
            Err(e) => tracing::warn!(device_id, topic, "device traffic: telemetry refused: {e}"),
        }
        return true;
    }
    handle_uplink(db, engine, topic, &p.payload).await
}

/// Records one device message. Traffic from devices the registry does not know as accepted is
/// ignored by the presence functions. False when it was not recorded for lack of space (to be
/// tried again, not acknowledged).
pub async fn handle_uplink(db: &Db, engine: &Arc<crate::engine::Engine>, topic: &str, payload: &[u8]) -> bool {
    let Some((device_id, channel)) = device::parse_topic(topic) else {
        tracing::debug!(topic, "device traffic: topic outside the protocol, ignored");
        return true;
    };
    let now = crate::time::now_ms();
    let result = match device::decode_uplink(channel, payload) {
        Ok(Uplink::Status(s)) => {
            crate::presence::record_status(db, device_id, s.state == OnlineState::Online, now).await
        }
        Ok(Uplink::Hello(h)) => match crate::presence::record_hello(db, device_id, &h, now).await {
            Ok(()) => {
                if let Err(e) = crate::device_rules::on_hello(db, device_id).await {
                    tracing::warn!(device_id, "device rule set not queued: {e}");
                }
                engine.on_hello(device_id, h.software.as_ref()).await
            }
            Err(e) => Err(e),
        },
        Ok(Uplink::Inventory(i)) => crate::presence::record_inventory(db, device_id, &i.attributes, now).await,
        Ok(Uplink::Heartbeat(_)) => crate::presence::record_heartbeat(db, device_id, now).await,
        Ok(Uplink::UpdateReport(r)) => engine.on_report(device_id, r).await,
        // Telemetry goes to the writer in `run_ingest`; this arm is for callers without one.
        Ok(Uplink::Telemetry(_)) => Ok(()),
        Ok(Uplink::Logs(r)) => crate::telemetry::logs::record_answer(db, device_id, &r).await,
        Err(e) => {
            tracing::warn!(device_id, topic, "device traffic: message refused: {e}");
            return true;
        }
    };
    match result {
        Err(crate::error::AppError::StorageFull(_)) => return false,
        Err(e) => tracing::warn!(device_id, topic, "device traffic: cannot record: {e}"),
        Ok(()) => {}
    }
    true
}

/// Drops the live connection of every device rejected or decommissioned — through the API,
/// the UI or another replica — within a second, by following the audit log (each such
/// decision is audited in the same transaction that makes it).
pub async fn run_revocation_watch(db: Db, broker: BrokerHandle, mut stop: watch::Receiver<bool>) {
    const REVOKING: &[&str] = &["device.decommission", "device.reject"];
    let mut last = match crate::audit::last_seq(&db).await {
        Ok(seq) => seq,
        Err(e) => {
            tracing::error!("revocation watch cannot read the audit log: {e}");
            0
        }
    };
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
        match crate::audit::targets_since(&db, last, REVOKING).await {
            Ok(rows) => {
                for (seq, device_id) in rows {
                    last = last.max(seq);
                    if broker.disconnect(&device_id, rumqttc::v5::mqttbytes::v5::DisconnectReasonCode::NotAuthorized) {
                        tracing::info!(device_id, "dropped the connection of a device no longer accepted");
                    }
                }
            }
            Err(e) => tracing::warn!("revocation watch: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mqtt_urls() {
        assert_eq!(parse_mqtt_url("mqtts://broker.example:1884").unwrap(), ("broker.example".into(), 1884));
        assert_eq!(parse_mqtt_url("mqtts://broker").unwrap(), ("broker".into(), 8883));
        assert_eq!(parse_mqtt_url("mqtts://[::1]:8883").unwrap(), ("::1".into(), 8883));
        assert!(parse_mqtt_url("mqtt://broker:1883").unwrap_err().to_string().contains("TLS"));
        assert!(parse_mqtt_url("mqtts://:1").is_err());
    }
}
