//! The broker over real mutual TLS, with real MQTT 5 clients (rumqttc), on loopback.
//!
//! Bad input tried here: no client certificate, a certificate from another CA, an expired
//! certificate, a client id that is not the certificate's, a device refused by the registry,
//! publishes and subscriptions outside the device's prefix, a shared subscription by a device,
//! an oversized packet, an MQTT 3.1.1 client, a connection dropped without DISCONNECT and a
//! client that goes silent (keep-alive).

mod fuzz;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use drover_broker::{Admission, BoxFuture, Broker, BrokerHandle, Config, Gatekeeper};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{
    ConnectReturnCode, DisconnectReasonCode, LastWill, Packet, PubAckReason, SubscribeReasonCode,
};
use rumqttc::v5::{AsyncClient, ConnectionError, Event, MqttOptions};
use rumqttc::{TlsConfiguration, Transport};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::{mpsc, oneshot};

const WAIT: Duration = Duration::from_secs(10);

struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

fn ca(name: &str) -> Ca {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let cert = params.self_signed(&key).unwrap();
    Ca { pem: cert.pem(), issuer: Issuer::new(params, key) }
}

fn leaf(ca: &Ca, cn: &str, sans: Vec<String>, expired: bool) -> (String, String) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(sans).unwrap();
    params.distinguished_name.push(DnType::CommonName, cn);
    if expired {
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(2021, 1, 1);
    }
    let cert = params.signed_by(&key, &ca.issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn server_tls(ca: &Ca) -> Arc<rustls::ServerConfig> {
    let (cert, key) = leaf(ca, "broker", vec!["127.0.0.1".into(), "localhost".into()], false);
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_slice(ca.pem.as_bytes()).unwrap()).unwrap();
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider()).build().unwrap();
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            vec![CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()],
            PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
        )
        .unwrap();
    Arc::new(config)
}

fn client_tls(server_ca: &Ca, identity: Option<&(String, String)>) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_slice(server_ca.pem.as_bytes()).unwrap()).unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let config = match identity {
        Some((cert, key)) => builder
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()],
                PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    Arc::new(config)
}

/// Refuses the devices listed, records violations.
#[derive(Default)]
struct Registry {
    refused: Mutex<Vec<String>>,
    violations: Mutex<Vec<(String, String)>>,
}

impl Gatekeeper for Registry {
    fn admit<'a>(&'a self, device_id: &'a str) -> BoxFuture<'a, Admission> {
        let refused = self.refused.lock().unwrap().iter().any(|d| d == device_id);
        Box::pin(async move { if refused { Admission::Refused } else { Admission::Allowed } })
    }
    fn violation(&self, device_id: &str, what: &str) {
        self.violations.lock().unwrap().push((device_id.into(), what.into()));
    }
}

struct Harness {
    ca: Ca,
    broker: BrokerHandle,
    registry: Arc<Registry>,
    port: u16,
    _stop: oneshot::Sender<()>,
}

async fn harness_with(tweak: impl FnOnce(&mut Config)) -> Harness {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let ca = ca("fleet CA");
    let mut config = Config::new("127.0.0.1:0".parse().unwrap(), server_tls(&ca));
    tweak(&mut config);
    let registry = Arc::new(Registry::default());
    let broker = Broker::bind(config, registry.clone()).await.unwrap();
    let handle = broker.handle();
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    tokio::spawn(broker.run(async move {
        let _ = stop_rx.await;
    }));
    Harness { port: handle.local_addr().port(), broker: handle, registry, ca, _stop: stop_tx }
}

async fn harness() -> Harness {
    harness_with(|_| {}).await
}

/// A connected MQTT client whose events arrive on a channel.
struct Client {
    client: AsyncClient,
    events: mpsc::UnboundedReceiver<Result<Event, String>>,
    task: tokio::task::JoinHandle<()>,
}

impl Client {
    fn start(
        h: &Harness,
        client_id: &str,
        tls: Arc<rustls::ClientConfig>,
        tweak: impl FnOnce(&mut MqttOptions),
    ) -> Client {
        let mut opts = MqttOptions::new(client_id, "127.0.0.1", h.port);
        opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls)));
        opts.set_keep_alive(Duration::from_secs(30));
        tweak(&mut opts);
        let (client, mut eventloop) = AsyncClient::new(opts, 64);
        let (tx, events) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(e) => {
                        if tx.send(Ok(e)).is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(describe(&e)));
                        return;
                    }
                }
            }
        });
        Client { client, events, task }
    }

    fn device(h: &Harness, id: &str) -> Client {
        let identity = leaf(&h.ca, id, vec![], false);
        Client::start(h, id, client_tls(&h.ca, Some(&identity)), |_| {})
    }

    fn service(h: &Harness, name: &str) -> Client {
        let cn = format!("service:{name}");
        let identity = leaf(&h.ca, &cn, vec![], false);
        Client::start(h, &cn, client_tls(&h.ca, Some(&identity)), |_| {})
    }

    /// Waits for an event `f` picks, failing on a connection error or timeout.
    async fn expect<T>(&mut self, what: &str, mut f: impl FnMut(&Packet) -> Option<T>) -> T {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let ev = tokio::time::timeout_at(deadline, self.events.recv())
                .await
                .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
                .unwrap_or_else(|| panic!("event loop ended before {what}"));
            match ev {
                Ok(Event::Incoming(p)) => {
                    if let Some(t) = f(&p) {
                        return t;
                    }
                }
                Ok(Event::Outgoing(_)) => {}
                Err(e) => panic!("connection error while waiting for {what}: {e}"),
            }
        }
    }

    /// Waits for the connection to end; returns its error.
    async fn expect_error(&mut self) -> String {
        loop {
            match tokio::time::timeout(WAIT, self.events.recv()).await.expect("timed out waiting for an error") {
                Some(Err(e)) => return e,
                Some(Ok(_)) => {}
                None => panic!("event loop ended without an error"),
            }
        }
    }

    async fn connected(&mut self) {
        self.expect("CONNACK", |p| matches!(p, Packet::ConnAck(_)).then_some(())).await;
    }

    /// Asserts no publish on `topic` arrives within `d`.
    async fn silent_on(&mut self, topic: &str, d: Duration) {
        let deadline = tokio::time::Instant::now() + d;
        while let Ok(Some(ev)) = tokio::time::timeout_at(deadline, self.events.recv()).await {
            if let Ok(Event::Incoming(Packet::Publish(p))) = ev {
                assert_ne!(p.topic.as_ref(), topic.as_bytes(), "message on {topic} should not have been delivered");
            }
        }
    }
}

fn describe(e: &ConnectionError) -> String {
    match e {
        ConnectionError::ConnectionRefused(code) => format!("refused: {code:?}"),
        other => other.to_string(),
    }
}

fn publish_on<'a>(topic: &'a str) -> impl FnMut(&Packet) -> Option<(Vec<u8>, bool)> + 'a {
    move |p| match p {
        Packet::Publish(p) if p.topic.as_ref() == topic.as_bytes() => Some((p.payload.to_vec(), p.retain)),
        _ => None,
    }
}

async fn subscribed(c: &mut Client, filter: &str) -> SubscribeReasonCode {
    c.client.subscribe(filter, QoS::AtLeastOnce).await.unwrap();
    c.expect("SUBACK", |p| match p {
        Packet::SubAck(s) => Some(s.return_codes[0]),
        _ => None,
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_uses_only_its_own_prefix_and_stays_connected() {
    let h = harness().await;
    let mut server = Client::service(&h, "droverd");
    server.connected().await;
    assert_eq!(
        subscribed(&mut server, "$share/drover/drover/v1/d/+/up/#").await,
        SubscribeReasonCode::Success(QoS::AtLeastOnce)
    );
    let mut spy = Client::service(&h, "spy");
    spy.connected().await;
    subscribed(&mut spy, "drover/v1/d/dev-b/#").await;

    let mut a = Client::device(&h, "dev-a");
    a.connected().await;

    // Its own prefix: delivered to the server.
    a.client.publish("drover/v1/d/dev-a/up/heartbeat", QoS::AtLeastOnce, false, "hi").await.unwrap();
    let ack = a
        .expect("PUBACK", |p| match p {
            Packet::PubAck(ack) => Some(ack.reason),
            _ => None,
        })
        .await;
    assert_eq!(ack, PubAckReason::Success);
    let (payload, _) = server.expect("the device's heartbeat", publish_on("drover/v1/d/dev-a/up/heartbeat")).await;
    assert_eq!(payload, b"hi");

    // Another device's prefix: refused with "not authorized", never delivered.
    a.client.publish("drover/v1/d/dev-b/up/status", QoS::AtLeastOnce, false, "forged").await.unwrap();
    let ack = a
        .expect("PUBACK", |p| match p {
            Packet::PubAck(ack) => Some(ack.reason),
            _ => None,
        })
        .await;
    assert_eq!(ack, PubAckReason::NotAuthorized);
    a.client.publish("drover/v1/d/dev-b/up/status", QoS::AtMostOnce, false, "forged0").await.unwrap();
    // Subscribing outside, or to a shared subscription: refused.
    assert_eq!(subscribed(&mut a, "drover/v1/d/dev-b/#").await, SubscribeReasonCode::NotAuthorized);
    assert_eq!(subscribed(&mut a, "drover/#").await, SubscribeReasonCode::NotAuthorized);
    assert_eq!(subscribed(&mut a, "$share/x/drover/v1/d/dev-a/#").await, SubscribeReasonCode::NotAuthorized);
    assert_eq!(subscribed(&mut a, "drover/v1/d/dev-a/down/#").await, SubscribeReasonCode::Success(QoS::AtLeastOnce));

    // Still connected, and still delivering its own traffic.
    a.client.publish("drover/v1/d/dev-a/up/heartbeat", QoS::AtLeastOnce, false, "still here").await.unwrap();
    let (payload, _) = server.expect("the second heartbeat", publish_on("drover/v1/d/dev-a/up/heartbeat")).await;
    assert_eq!(payload, b"still here");
    spy.silent_on("drover/v1/d/dev-b/up/status", Duration::from_millis(300)).await;

    // The server reaches the device on its downlink.
    server.client.publish("drover/v1/d/dev-a/down/ping", QoS::AtLeastOnce, false, "{}").await.unwrap();
    a.expect("the ping", publish_on("drover/v1/d/dev-a/down/ping")).await;

    let violations = h.registry.violations.lock().unwrap().clone();
    assert_eq!(violations.len(), 5, "each refusal is reported: {violations:?}");
    assert!(violations.iter().all(|(d, _)| d == "dev-a"));
    assert_eq!(h.broker.stats().acl_denied_total.load(std::sync::atomic::Ordering::Relaxed), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_certificates_and_identities_are_refused() {
    let h = harness().await;
    // No client certificate: the TLS handshake fails.
    let mut c = Client::start(&h, "dev-x", client_tls(&h.ca, None), |_| {});
    let e = c.expect_error().await;
    assert!(!e.contains("refused:"), "refused in TLS, before MQTT: {e}");

    // A certificate from another CA.
    let other = ca("someone else's CA");
    let forged = leaf(&other, "dev-x", vec![], false);
    let mut c = Client::start(&h, "dev-x", client_tls(&h.ca, Some(&forged)), |_| {});
    let e = c.expect_error().await;
    assert!(!e.contains("refused:"), "{e}");

    // An expired certificate from the right CA.
    let expired = leaf(&h.ca, "dev-x", vec![], true);
    let mut c = Client::start(&h, "dev-x", client_tls(&h.ca, Some(&expired)), |_| {});
    let e = c.expect_error().await;
    assert!(!e.contains("refused:"), "{e}");

    // A valid certificate but another client id.
    let good = leaf(&h.ca, "dev-x", vec![], false);
    let mut c = Client::start(&h, "dev-y", client_tls(&h.ca, Some(&good)), |_| {});
    assert_eq!(c.expect_error().await, format!("refused: {:?}", ConnectReturnCode::ClientIdentifierNotValid));

    // A certificate whose name is neither a device id nor a service.
    let odd = leaf(&h.ca, "Not A Device", vec![], false);
    let mut c = Client::start(&h, "Not A Device", client_tls(&h.ca, Some(&odd)), |_| {});
    c.expect_error().await;

    // A device the registry refuses (decommissioned, say).
    h.registry.refused.lock().unwrap().push("dev-x".into());
    let mut c = Client::start(&h, "dev-x", client_tls(&h.ca, Some(&good)), |_| {});
    assert_eq!(c.expect_error().await, format!("refused: {:?}", ConnectReturnCode::NotAuthorized));
    assert!(h.broker.stats().refused_total.load(std::sync::atomic::Ordering::Relaxed) >= 6);
    assert_eq!(h.broker.stats().connections.load(std::sync::atomic::Ordering::Relaxed), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wills_retained_status_and_disconnects() {
    let h = harness().await;
    let status = "drover/v1/d/dev-w/up/status";
    let will = || LastWill::new(status, "offline", QoS::AtLeastOnce, true, None);
    let identity = leaf(&h.ca, "dev-w", vec![], false);

    let mut d = Client::start(&h, "dev-w", client_tls(&h.ca, Some(&identity)), |o| {
        o.set_last_will(will());
    });
    d.connected().await;
    d.client.publish(status, QoS::AtLeastOnce, true, "online").await.unwrap();
    d.expect("PUBACK", |p| matches!(p, Packet::PubAck(_)).then_some(())).await;

    // A subscriber arriving later gets the retained status; a shared subscription does not.
    let mut server = Client::service(&h, "droverd");
    server.connected().await;
    subscribed(&mut server, "$share/drover/drover/v1/d/+/up/#").await;
    let mut late = Client::service(&h, "late");
    late.connected().await;
    subscribed(&mut late, "drover/v1/d/+/up/status").await;
    let (payload, retained) = late.expect("the retained status", publish_on(status)).await;
    assert_eq!((payload.as_slice(), retained), (&b"online"[..], true));

    // The connection drops without DISCONNECT: the will is published (and retained).
    d.task.abort();
    let (payload, _) = server.expect("the will", publish_on(status)).await;
    assert_eq!(payload, b"offline");
    let (payload, _) = late.expect("the will", publish_on(status)).await;
    assert_eq!(payload, b"offline");

    // Reconnect, then the broker drops it on purpose (decommissioned): no will.
    let mut d = Client::start(&h, "dev-w", client_tls(&h.ca, Some(&identity)), |o| {
        o.set_last_will(will());
    });
    d.connected().await;
    d.client.publish(status, QoS::AtLeastOnce, true, "online").await.unwrap();
    server.expect("online again", publish_on(status)).await;
    assert!(h.broker.disconnect("dev-w", DisconnectReasonCode::NotAuthorized));
    let e = d.expect_error().await;
    assert!(e.contains("NotAuthorized"), "{e}");
    server.silent_on(status, Duration::from_millis(500)).await;

    // The same device twice: the newer connection takes over, the older leaves without its will.
    let mut first = Client::start(&h, "dev-w", client_tls(&h.ca, Some(&identity)), |o| {
        o.set_last_will(will());
    });
    first.connected().await;
    let mut second = Client::start(&h, "dev-w", client_tls(&h.ca, Some(&identity)), |o| {
        o.set_last_will(will());
    });
    second.connected().await;
    let e = first.expect_error().await;
    assert!(e.contains("SessionTakenOver"), "{e}");
    server.silent_on(status, Duration::from_millis(500)).await;
    assert!(h.broker.is_connected("dev-w"));
}

/// MQTT 5 lets a normal DISCONNECT omit its reason code (remaining length 0; rumqttc's own
/// client writes it so): that is a clean disconnect, so the will is discarded. (Found by the
/// fuzz target `broker_mqtt_packet_read`: rumqttc's reader refuses the short form.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_disconnect_is_a_normal_disconnect() {
    use rumqttc::v5::mqttbytes::v5::Connect;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    let h = harness().await;
    let status = "drover/v1/d/dev-s/up/status";
    let mut server = Client::service(&h, "droverd");
    server.connected().await;
    subscribed(&mut server, "drover/v1/d/+/up/status").await;

    let identity = leaf(&h.ca, "dev-s", vec![], false);
    let tls = tokio_rustls::TlsConnector::from(client_tls(&h.ca, Some(&identity)));
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", h.port)).await.unwrap();
    let mut io = tls.connect("localhost".try_into().unwrap(), tcp).await.unwrap();
    let mut connect = bytes::BytesMut::new();
    let will = LastWill::new(status, "offline", QoS::AtLeastOnce, false, None);
    Packet::Connect(
        Connect { keep_alive: 30, client_id: "dev-s".into(), clean_start: true, properties: None },
        Some(will),
        None,
    )
    .write(&mut connect, None)
    .unwrap();
    io.write_all(&connect).await.unwrap();
    let mut connack = [0u8; 2];
    tokio::time::timeout(WAIT, io.read_exact(&mut connack)).await.unwrap().unwrap();
    assert_eq!(connack[0], 0x20, "CONNACK expected");
    let deadline = tokio::time::Instant::now() + WAIT;
    while !h.broker.is_connected("dev-s") {
        assert!(tokio::time::Instant::now() < deadline, "dev-s never connected");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    io.write_all(&[0xe0, 0x00]).await.unwrap();
    io.flush().await.unwrap();
    while h.broker.is_connected("dev-s") {
        assert!(tokio::time::Instant::now() < deadline, "dev-s still connected after DISCONNECT");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    server.silent_on(status, Duration::from_millis(500)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_client_is_dropped_after_one_and_a_half_keep_alives() {
    // The broker imposes a 1 s keep-alive (clients may not ask for less than 5 s).
    let h = harness_with(|c| c.max_keep_alive = 1).await;
    let status = "drover/v1/d/dev-s/up/status";
    let mut server = Client::service(&h, "droverd");
    server.connected().await;
    subscribed(&mut server, "$share/drover/drover/v1/d/+/up/#").await;
    let identity = leaf(&h.ca, "dev-s", vec![], false);
    let mut opts = MqttOptions::new("dev-s", "127.0.0.1", h.port);
    opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(client_tls(&h.ca, Some(&identity)))));
    opts.set_keep_alive(Duration::from_secs(5));
    opts.set_last_will(LastWill::new(status, "offline", QoS::AtLeastOnce, true, None));
    let (_client, mut eventloop) = AsyncClient::new(opts, 8);
    // Poll only until connected, then go silent (as a device whose network vanished).
    loop {
        if let Event::Incoming(Packet::ConnAck(_)) = eventloop.poll().await.unwrap() {
            break;
        }
    }
    let started = std::time::Instant::now();
    server.expect("the will", publish_on(status)).await;
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(1400) && took < Duration::from_secs(4), "dropped after {took:?}");
    drop(eventloop);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_subscriptions_split_traffic_between_replicas() {
    let h = harness().await;
    let mut r1 = Client::service(&h, "replica-1");
    let mut r2 = Client::service(&h, "replica-2");
    r1.connected().await;
    r2.connected().await;
    subscribed(&mut r1, "$share/drover/drover/v1/d/+/up/#").await;
    subscribed(&mut r2, "$share/drover/drover/v1/d/+/up/#").await;
    let mut d = Client::device(&h, "dev-r");
    d.connected().await;
    for i in 0..20 {
        d.client.publish("drover/v1/d/dev-r/up/heartbeat", QoS::AtLeastOnce, false, format!("{i}")).await.unwrap();
    }
    let mut got = Vec::new();
    let (mut n1, mut n2) = (0, 0);
    while got.len() < 20 {
        tokio::select! {
            (p, _) = r1.expect("a heartbeat", publish_on("drover/v1/d/dev-r/up/heartbeat")) => { n1 += 1; got.push(p) }
            (p, _) = r2.expect("a heartbeat", publish_on("drover/v1/d/dev-r/up/heartbeat")) => { n2 += 1; got.push(p) }
        }
    }
    got.sort();
    got.dedup();
    assert_eq!(got.len(), 20, "each message reaches exactly one replica");
    assert!(n1 > 0 && n2 > 0, "both replicas take a share: {n1} and {n2}");
}

/// A device may not use shared subscriptions (its ACL allows only its own topics), so its
/// CONNACK says none are available; a service is told they are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_services_are_offered_shared_subscriptions() {
    let h = harness().await;
    let shared = |p: &Packet| match p {
        Packet::ConnAck(a) => Some(a.properties.as_ref().and_then(|p| p.shared_subscription_available)),
        _ => None,
    };
    let mut d = Client::device(&h, "dev-share");
    assert_eq!(d.expect("CONNACK", shared).await, Some(0));
    let mut r = Client::service(&h, "replica-share");
    assert_eq!(r.expect("CONNACK", shared).await, Some(1));
}

/// A server replica that stops reading (busy writing to its database) slows the devices down
/// instead of losing their messages: with a queue of 4 and an in-flight window of 2, a device
/// publishes 60 messages while the replica acknowledges nothing; once it does, all 60 arrive,
/// none dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_server_replica_slows_devices_down_and_loses_nothing() {
    let h = harness_with(|c| {
        c.max_queued = 4;
        c.receive_maximum = 2;
    })
    .await;
    let identity = leaf(&h.ca, "service:drover", vec![], false);
    let mut r = Client::start(&h, "service:drover", client_tls(&h.ca, Some(&identity)), |o| {
        o.set_manual_acks(true);
    });
    r.connected().await;
    subscribed(&mut r, "$share/drover/drover/v1/d/+/up/#").await;
    let mut d = Client::device(&h, "dev-busy");
    d.connected().await;
    let publisher = {
        let client = d.client.clone();
        tokio::spawn(async move {
            for i in 0..60 {
                client
                    .publish("drover/v1/d/dev-busy/up/heartbeat", QoS::AtLeastOnce, false, format!("{i}"))
                    .await
                    .unwrap();
            }
        })
    };
    // Unacknowledged, the replica holds only its in-flight window.
    let mut held = Vec::new();
    let quiet_until = tokio::time::Instant::now() + Duration::from_millis(1500);
    while let Ok(Some(ev)) = tokio::time::timeout_at(quiet_until, r.events.recv()).await {
        if let Ok(Event::Incoming(Packet::Publish(p))) = ev {
            held.push(p);
        }
    }
    assert!(held.len() <= 2, "the broker kept its in-flight window: {} delivered unacknowledged", held.len());
    let stats = h.broker.stats();
    assert_eq!(stats.dropped_total.load(std::sync::atomic::Ordering::Relaxed), 0, "nothing dropped while blocked");
    // The replica catches up.
    let mut got: Vec<u32> = Vec::new();
    for p in held {
        got.push(std::str::from_utf8(&p.payload).unwrap().parse().unwrap());
        r.client.ack(&p).await.unwrap();
    }
    while got.len() < 60 {
        let p = r.expect("a heartbeat", |p| match p {
            Packet::Publish(p) => Some(p.clone()),
            _ => None,
        });
        let p = p.await;
        got.push(std::str::from_utf8(&p.payload).unwrap().parse().unwrap());
        r.client.ack(&p).await.unwrap();
    }
    publisher.await.unwrap();
    assert_eq!(got, (0..60).collect::<Vec<_>>(), "every message, in order");
    assert_eq!(stats.dropped_total.load(std::sync::atomic::Ordering::Relaxed), 0);
    // The device drained its own publishes: it was slowed, not cut off.
    d.expect("its last acknowledgement", |p| matches!(p, Packet::PubAck(_)).then_some(())).await;
}

/// A server replica slower than a burst of its fleet but still reading: eight devices publish
/// at once into a group with room for one message and one in flight, so most of them wait in
/// line for several times the busy wait (300 ms) while the replica takes a message every
/// 60 ms. Nobody is disconnected and every message arrives once: the busy wait counts time
/// in which the group takes nothing, not time spent in line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_server_replica_that_keeps_reading_disconnects_nobody() {
    let h = harness_with(|c| {
        c.max_queued = 1;
        c.receive_maximum = 1;
        c.busy_wait = Duration::from_millis(300);
    })
    .await;
    let identity = leaf(&h.ca, "service:drover", vec![], false);
    let mut r = Client::start(&h, "service:drover", client_tls(&h.ca, Some(&identity)), |o| {
        o.set_manual_acks(true);
    });
    r.connected().await;
    subscribed(&mut r, "$share/drover/drover/v1/d/+/up/#").await;
    let mut devices = Vec::new();
    for n in 0..8 {
        let mut d = Client::device(&h, &format!("dev-line-{n}"));
        d.connected().await;
        devices.push(d);
    }
    let publishers: Vec<_> = devices
        .iter()
        .enumerate()
        .map(|(n, d)| {
            let client = d.client.clone();
            tokio::spawn(async move {
                for i in 0..5 {
                    let topic = format!("drover/v1/d/dev-line-{n}/up/heartbeat");
                    client.publish(topic, QoS::AtLeastOnce, false, format!("{n}-{i}")).await.unwrap();
                }
            })
        })
        .collect();
    let started = tokio::time::Instant::now();
    let mut got = std::collections::BTreeSet::new();
    while got.len() < 40 {
        let p = r
            .expect("a heartbeat", |p| match p {
                Packet::Publish(p) => Some(p.clone()),
                _ => None,
            })
            .await;
        tokio::time::sleep(Duration::from_millis(60)).await;
        got.insert(String::from_utf8(p.payload.to_vec()).unwrap());
        r.client.ack(&p).await.unwrap();
    }
    assert!(started.elapsed() > Duration::from_millis(2000), "the line took several busy waits to drain");
    for p in publishers {
        p.await.unwrap();
    }
    let stats = h.broker.stats();
    assert_eq!(stats.busy_disconnects_total.load(std::sync::atomic::Ordering::Relaxed), 0, "nobody disconnected");
    assert_eq!(stats.dropped_total.load(std::sync::atomic::Ordering::Relaxed), 0);
    let expected: std::collections::BTreeSet<String> =
        (0..8).flat_map(|n| (0..5).map(move |i| format!("{n}-{i}"))).collect();
    assert_eq!(got, expected, "every message once");
    for d in &mut devices {
        let mut acks = 0;
        while acks < 5 {
            let ev = tokio::time::timeout(WAIT, d.events.recv()).await.expect("timed out").expect("event loop ended");
            match ev {
                Ok(Event::Incoming(Packet::PubAck(_))) => acks += 1,
                Ok(_) => {}
                Err(e) => panic!("a device was cut off: {e}"),
            }
        }
    }
}

/// A device whose publish waits in line behind a slow server for longer than its keep-alive
/// (5 s) stays connected: the broker answers its PINGREQs while it waits (they arrive behind
/// its publish), so the device does not give up on the connection and join the line again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_waiting_in_line_longer_than_its_keep_alive_stays_connected() {
    let h = harness_with(|c| {
        c.max_queued = 1;
        c.receive_maximum = 1;
        c.busy_wait = Duration::from_secs(3);
    })
    .await;
    let identity = leaf(&h.ca, "service:drover", vec![], false);
    let mut r = Client::start(&h, "service:drover", client_tls(&h.ca, Some(&identity)), |o| {
        o.set_manual_acks(true);
    });
    r.connected().await;
    subscribed(&mut r, "$share/drover/drover/v1/d/+/up/#").await;
    // Twenty other devices' messages in line first.
    let mut others = Vec::new();
    for n in 0..20 {
        let mut d = Client::device(&h, &format!("dev-ahead-{n}"));
        d.connected().await;
        let topic = format!("drover/v1/d/dev-ahead-{n}/up/heartbeat");
        d.client.publish(topic, QoS::AtLeastOnce, false, format!("ahead-{n}")).await.unwrap();
        others.push(d);
    }
    let identity = leaf(&h.ca, "dev-ka", vec![], false);
    let mut d = Client::start(&h, "dev-ka", client_tls(&h.ca, Some(&identity)), |o| {
        o.set_keep_alive(Duration::from_secs(5));
    });
    d.connected().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    d.client.publish("drover/v1/d/dev-ka/up/heartbeat", QoS::AtLeastOnce, false, "last").await.unwrap();
    // The replica takes one message every 0.7 s: dev-ka's waits about 14 s.
    let started = tokio::time::Instant::now();
    let mut got = Vec::new();
    while !got.iter().any(|m| m == "last") {
        let p = r
            .expect("a heartbeat", |p| match p {
                Packet::Publish(p) => Some(p.clone()),
                _ => None,
            })
            .await;
        tokio::time::sleep(Duration::from_millis(700)).await;
        got.push(String::from_utf8(p.payload.to_vec()).unwrap());
        r.client.ack(&p).await.unwrap();
    }
    assert!(started.elapsed() > Duration::from_secs(11), "{:?}", started.elapsed());
    assert_eq!(got.len(), 21, "every message once: {got:?}");
    let mut pongs = 0;
    loop {
        let ev = tokio::time::timeout(WAIT, d.events.recv()).await.expect("timed out").expect("event loop ended");
        match ev {
            Ok(Event::Incoming(Packet::PubAck(_))) => break,
            Ok(Event::Incoming(Packet::PingResp(_))) => pongs += 1,
            Ok(_) => {}
            Err(e) => panic!("the device dropped its connection while in line: {e}"),
        }
    }
    assert!(pongs >= 1, "its pings were answered while it waited");
    let stats = h.broker.stats();
    assert_eq!(stats.busy_disconnects_total.load(std::sync::atomic::Ordering::Relaxed), 0);
    drop(others);
}

/// A server replica wedged for longer than the broker's busy wait: the device's QoS 1 message
/// is not acknowledged (it would be lost); the device is disconnected with "server busy",
/// reconnects and sends it again, and once the replica reads again every message arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wedged_server_replica_gets_devices_disconnected_busy_and_still_loses_nothing() {
    let h = harness_with(|c| {
        c.max_queued = 1;
        c.receive_maximum = 1;
        c.busy_wait = Duration::from_millis(300);
    })
    .await;
    let identity = leaf(&h.ca, "service:drover", vec![], false);
    let mut r = Client::start(&h, "service:drover", client_tls(&h.ca, Some(&identity)), |o| {
        o.set_manual_acks(true);
    });
    r.connected().await;
    subscribed(&mut r, "$share/drover/drover/v1/d/+/up/#").await;
    let mut d = Client::device(&h, "dev-wedged");
    d.connected().await;
    for i in 0..6 {
        d.client.publish("drover/v1/d/dev-wedged/up/heartbeat", QoS::AtLeastOnce, false, format!("{i}")).await.unwrap();
    }
    // The replica acknowledges nothing: one message in flight, one queued, the third waits
    // for the busy wait and then costs its publisher the connection instead of a PUBACK.
    let mut acked = 0;
    let e = loop {
        match tokio::time::timeout(WAIT, d.events.recv()).await.expect("timed out").expect("event loop ended") {
            Ok(Event::Incoming(Packet::PubAck(_))) => acked += 1,
            Ok(_) => {}
            Err(e) => break e,
        }
    };
    assert!(e.contains("ServerBusy"), "disconnected as server busy: {e}");
    assert!(acked < 6, "only what the servers took was acknowledged ({acked})");
    let stats = h.broker.stats();
    assert!(stats.busy_disconnects_total.load(std::sync::atomic::Ordering::Relaxed) >= 1);
    assert_eq!(stats.dropped_total.load(std::sync::atomic::Ordering::Relaxed), 0, "nothing dropped");
    // The device reconnects and sends again what was not acknowledged; the replica reads
    // again, and every message arrives (at least once: QoS 1).
    let d = Client::device(&h, "dev-wedged");
    for i in acked..6 {
        d.client.publish("drover/v1/d/dev-wedged/up/heartbeat", QoS::AtLeastOnce, false, format!("{i}")).await.unwrap();
    }
    let mut got = std::collections::BTreeSet::new();
    while got.len() < 6 {
        let p = r
            .expect("a heartbeat", |p| match p {
                Packet::Publish(p) => Some(p.clone()),
                _ => None,
            })
            .await;
        got.insert(std::str::from_utf8(&p.payload).unwrap().parse::<u32>().unwrap());
        r.client.ack(&p).await.unwrap();
    }
    assert_eq!(got, (0..6).collect(), "every message arrived");
}

/// A device may hold a second connection, `{id}/remote`, for remote-access sessions, within
/// its own prefix like the first; any other client id is refused; dropping the device (as
/// droverd does on decommissioning) closes both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_may_add_its_remote_access_connection_and_nothing_else() {
    let h = harness().await;
    let mut main = Client::device(&h, "dev-ra");
    main.connected().await;
    let identity = leaf(&h.ca, "dev-ra", vec![], false);
    let mut remote = Client::start(&h, "dev-ra/remote", client_tls(&h.ca, Some(&identity)), |_| {});
    remote.connected().await;
    subscribed(&mut remote, "drover/v1/d/dev-ra/rs/+/d").await;
    main.client.publish("drover/v1/d/dev-ra/rs/s1/d", QoS::AtLeastOnce, false, "frame").await.unwrap();
    let got = remote
        .expect("the session frame", |p| match p {
            Packet::Publish(p) => Some(p.payload.clone()),
            _ => None,
        })
        .await;
    assert_eq!(&got[..], b"frame");
    // Only under its own prefix, as for the main connection.
    remote.client.publish("drover/v1/d/dev-other/rs/s1/u", QoS::AtLeastOnce, false, "x").await.unwrap();
    let code = remote
        .expect("PUBACK", |p| match p {
            Packet::PubAck(a) => Some(a.reason),
            _ => None,
        })
        .await;
    assert_eq!(code, rumqttc::v5::mqttbytes::v5::PubAckReason::NotAuthorized);
    // Any other suffix is refused.
    let identity = leaf(&h.ca, "dev-ra", vec![], false);
    let mut other = Client::start(&h, "dev-ra/extra", client_tls(&h.ca, Some(&identity)), |_| {});
    let e = other.expect_error().await;
    assert!(e.contains("ClientIdentifierNotValid"), "{e}");
    // Dropping the device closes both of its connections.
    assert!(h.broker.disconnect("dev-ra", rumqttc::v5::mqttbytes::v5::DisconnectReasonCode::NotAuthorized));
    let e = remote.expect_error().await;
    assert!(e.contains("NotAuthorized"), "{e}");
    let e = main.expect_error().await;
    assert!(e.contains("NotAuthorized"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_packets_and_mqtt_3_clients_are_refused() {
    let h = harness_with(|c| c.max_packet_size = 4096).await;
    let mut d = Client::device(&h, "dev-big");
    let announced = d
        .expect("CONNACK", |p| match p {
            Packet::ConnAck(a) => Some(a.properties.as_ref().and_then(|p| p.max_packet_size)),
            _ => None,
        })
        .await;
    assert_eq!(announced, Some(4096));
    d.client.publish("drover/v1/d/dev-big/up/inventory", QoS::AtLeastOnce, false, vec![b'x'; 3000]).await.unwrap();
    d.expect("PUBACK", |p| matches!(p, Packet::PubAck(_)).then_some(())).await;

    // rumqttc will not send more than the broker announced, so speak MQTT by hand to send an
    // 8 KB PUBLISH: the broker answers DISCONNECT "packet too large" and closes.
    use rumqttc::v5::mqttbytes::v5::{Connect, Publish};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let identity = leaf(&h.ca, "dev-raw", vec![], false);
    let connector = tokio_rustls::TlsConnector::from(client_tls(&h.ca, Some(&identity)));
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", h.port)).await.unwrap();
    let mut io = connector.connect("127.0.0.1".try_into().unwrap(), tcp).await.unwrap();
    let mut buf = bytes::BytesMut::new();
    let connect = Connect { keep_alive: 30, client_id: "dev-raw".into(), clean_start: true, properties: None };
    Packet::Connect(connect, None, None).write(&mut buf, None).unwrap();
    let publish = Publish::new("drover/v1/d/dev-raw/up/inventory", QoS::AtMostOnce, vec![b'x'; 8000], None);
    Packet::Publish(publish).write(&mut buf, None).unwrap();
    io.write_all(&buf).await.unwrap();
    let mut got = Vec::new();
    let _ = tokio::time::timeout(WAIT, io.read_to_end(&mut got)).await.expect("the broker closes the connection");
    let mut got = bytes::BytesMut::from(&got[..]);
    assert!(matches!(Packet::read(&mut got, None).unwrap(), Packet::ConnAck(_)));
    match Packet::read(&mut got, None).unwrap() {
        Packet::Disconnect(d) => assert_eq!(d.reason_code, DisconnectReasonCode::PacketTooLarge),
        other => panic!("expected DISCONNECT, got {other:?}"),
    }
    // The well-behaved device is unaffected.
    d.client.publish("drover/v1/d/dev-big/up/inventory", QoS::AtLeastOnce, false, "small").await.unwrap();
    d.expect("PUBACK", |p| matches!(p, Packet::PubAck(_)).then_some(())).await;

    // An MQTT 3.1.1 client is told its protocol version is unacceptable.
    let identity = leaf(&h.ca, "dev-old", vec![], false);
    let mut opts = rumqttc::MqttOptions::new("dev-old", "127.0.0.1", h.port);
    opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(client_tls(&h.ca, Some(&identity)))));
    let (_c, mut eventloop) = rumqttc::AsyncClient::new(opts, 8);
    match eventloop.poll().await {
        Err(rumqttc::ConnectionError::ConnectionRefused(code)) => {
            assert_eq!(code, rumqttc::ConnectReturnCode::RefusedProtocolVersion)
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}
