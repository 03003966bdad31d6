//! From `up/telemetry` to the database: a bounded queue, one writer task per replica that
//! writes the batches that arrived together in one transaction, and acks after the commit.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use drover_proto::device::Channel;
use drover_proto::telemetry::{TelemetryAck, TelemetryBatch};
use tokio::sync::{mpsc, watch};

use crate::db::Db;
use crate::engine::Outgoing;

use super::TelemetryConfig;
use super::store::{self, Batch, Cache, Event, Point};

/// Batches waiting for the writer, at most; then `submit` waits (and with it the ingest
/// loop, and the broker's share group: the devices slow down, nothing is dropped).
const QUEUE: usize = 4096;
/// Acks waiting for the MQTT client, at most (the devices resend what is not acked, so a full
/// ack queue loses nothing but time).
const ACK_QUEUE: usize = 65_536;
/// Points one transaction takes, at most.
const MAX_GROUP_POINTS: usize = 50_000;
/// How long the writer waits for more batches once it has one and the queue is empty.
const COALESCE: Duration = Duration::from_millis(3);

/// Counters of this replica's ingest (for `/metrics/fleet` and the benchmarks).
#[derive(Debug, Default)]
pub struct Stats {
    pub batches: AtomicU64,
    pub points: AtomicU64,
    pub late_points: AtomicU64,
    pub events: AtomicU64,
    pub transactions: AtomicU64,
    pub write_errors: AtomicU64,
    /// Points left out: stamped too far in the future, or older than the raw retention.
    pub refused_future: AtomicU64,
    pub refused_old: AtomicU64,
    /// Points left out because their name would pass a series cap, and the names.
    pub refused_series_points: AtomicU64,
    pub refused_series: AtomicU64,
}

/// See the module documentation.
pub struct Ingest {
    db: Db,
    config: TelemetryConfig,
    pub cache: Arc<Cache>,
    queue: OnceLock<mpsc::Sender<Batch>>,
    /// Messages to devices on the ingest loop's MQTT client: acks and log requests.
    out: OnceLock<mpsc::Sender<Outgoing>>,
    pub stats: Arc<Stats>,
}

impl std::fmt::Debug for Ingest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ingest").field("started", &self.queue.get().is_some()).finish_non_exhaustive()
    }
}

/// Converts a checked wire batch, leaving out the points whose time is outside `window`
/// (counted in the batch).
pub fn from_wire(device_id: &str, b: TelemetryBatch, window: std::ops::RangeInclusive<i64>) -> Batch {
    let before = b.points.len();
    let refused_future = b.points.iter().filter(|p| p.t > *window.end()).count() as u64;
    let points: Vec<Point> =
        b.points.into_iter().filter(|p| window.contains(&p.t)).map(|p| Point { name: p.n, t: p.t, v: p.v }).collect();
    let refused_old = (before - points.len()) as u64 - refused_future;
    Batch {
        device_id: device_id.to_string(),
        seq: b.seq,
        refused_future,
        refused_old,
        points,
        events: b
            .events
            .into_iter()
            .map(|e| Event {
                id: e.id,
                t: e.t,
                name: e.name,
                severity: e.severity.as_str().to_string(),
                data: serde_json::to_string(&e.data).unwrap_or_else(|_| "{}".into()),
            })
            .collect(),
        dropped: b.dropped,
    }
}

/// The `down/telemetry` message acknowledging `seq`, with `refused_series` names left out
/// for the series caps.
pub fn ack(b: &Batch, refused_series: u64) -> Outgoing {
    let mut a = TelemetryAck::new(b.seq);
    a.refused_future = b.refused_future;
    a.refused_old = b.refused_old;
    a.refused_series = refused_series;
    Outgoing {
        topic: drover_proto::device::topic(&b.device_id, Channel::TelemetryAck),
        payload: serde_json::to_vec(&a).unwrap_or_default(),
    }
}

impl Ingest {
    pub fn new(db: Db, config: TelemetryConfig) -> Arc<Ingest> {
        Arc::new(Ingest {
            db,
            config,
            cache: Arc::default(),
            queue: OnceLock::new(),
            out: OnceLock::new(),
            stats: Arc::default(),
        })
    }

    /// Queues a message to a device; false when this replica has no broker connection or
    /// the queue is full.
    pub fn send(&self, msg: Outgoing) -> bool {
        self.out.get().is_some_and(|o| o.try_send(msg).is_ok())
    }

    pub fn config(&self) -> &TelemetryConfig {
        &self.config
    }

    /// Starts the writer, with acks published on the ingest loop's MQTT client, until `stop`.
    pub fn start(self: &Arc<Self>, client: rumqttc::v5::AsyncClient, stop: watch::Receiver<bool>) {
        let (tx, mut rx) = mpsc::channel::<Outgoing>(ACK_QUEUE);
        let mut s = stop.clone();
        tokio::spawn(async move {
            loop {
                let msg = tokio::select! {
                    _ = s.wait_for(|s| *s) => return,
                    m = rx.recv() => match m { Some(m) => m, None => return },
                };
                // Acks are QoS 0 (a lost one means a resend, acked again); requests QoS 1.
                let qos = if msg.topic.ends_with(Channel::TelemetryAck.suffix()) {
                    rumqttc::v5::mqttbytes::QoS::AtMostOnce
                } else {
                    rumqttc::v5::mqttbytes::QoS::AtLeastOnce
                };
                if let Err(e) = client.publish(msg.topic, qos, false, msg.payload).await {
                    tracing::warn!("cannot publish a telemetry ack: {e}");
                }
            }
        });
        self.start_with(tx, stop);
    }

    /// As [`Ingest::start`], with acks handed to `acks` (tests read them).
    pub fn start_with(self: &Arc<Self>, acks: mpsc::Sender<Outgoing>, stop: watch::Receiver<bool>) {
        let (tx, rx) = mpsc::channel::<Batch>(QUEUE);
        if self.queue.set(tx).is_err() {
            return;
        }
        let _ = self.out.set(acks.clone());
        let me = self.clone();
        tokio::spawn(async move { me.writer(rx, acks, stop).await });
    }

    /// Queues a device's batch (checked by `decode_uplink`); waits while the queue is full.
    /// Without a started writer the batch is written at once and not acknowledged.
    pub async fn submit(&self, device_id: &str, batch: TelemetryBatch) {
        let b = from_wire(device_id, batch, self.config.window(crate::time::now_ms()));
        if b.refused_future + b.refused_old > 0 {
            self.stats.refused_future.fetch_add(b.refused_future, Ordering::Relaxed);
            self.stats.refused_old.fetch_add(b.refused_old, Ordering::Relaxed);
            tracing::debug!(
                device_id,
                future = b.refused_future,
                too_old = b.refused_old,
                "telemetry points outside the stored time window left out (is the device's clock set?)"
            );
        }
        match self.queue.get() {
            Some(q) => {
                if q.send(b).await.is_err() {
                    tracing::warn!(device_id, "telemetry writer stopped: batch not stored (the device will resend it)");
                }
            }
            None => {
                if let Err(e) = self.write(&[b]).await {
                    tracing::warn!(device_id, "cannot store telemetry: {e}");
                }
            }
        }
    }

    /// Writes batches now, in one transaction (what the writer does; tests and benchmarks
    /// call it directly).
    pub async fn write(&self, batches: &[Batch]) -> Result<store::Written, sqlx::Error> {
        self.write_at(batches, crate::time::now_ms()).await
    }

    /// As [`Ingest::write`] with the time of arrival given.
    pub async fn write_at(&self, batches: &[Batch], now: i64) -> Result<store::Written, sqlx::Error> {
        let w = store::write_limited(
            &self.db,
            &self.cache,
            batches,
            now,
            self.config.late_after_ms(),
            self.config.series_limits(),
        )
        .await?;
        let names: u64 = w.refused_series.iter().sum();
        if names > 0 {
            self.stats.refused_series.fetch_add(names, Ordering::Relaxed);
            self.stats.refused_series_points.fetch_add(w.refused_series_points, Ordering::Relaxed);
            for (b, n) in batches.iter().zip(&w.refused_series).filter(|(_, n)| **n > 0) {
                tracing::debug!(
                    device_id = b.device_id,
                    names = n,
                    "telemetry: new metric names over the series cap left out ([telemetry] max_series_per_device / max_series_per_org)"
                );
            }
        }
        self.stats.batches.fetch_add(batches.len() as u64, Ordering::Relaxed);
        self.stats.points.fetch_add(w.points, Ordering::Relaxed);
        self.stats.late_points.fetch_add(w.late, Ordering::Relaxed);
        self.stats.events.fetch_add(w.events, Ordering::Relaxed);
        self.stats.transactions.fetch_add(1, Ordering::Relaxed);
        Ok(w)
    }

    async fn writer(
        self: Arc<Self>,
        mut rx: mpsc::Receiver<Batch>,
        acks: mpsc::Sender<Outgoing>,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut group: Vec<Batch> = Vec::new();
        loop {
            let first = tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                b = rx.recv() => match b { Some(b) => b, None => return },
            };
            let mut points = first.points.len();
            group.push(first);
            // Take what is already queued, then wait a moment for more.
            let deadline = tokio::time::Instant::now() + COALESCE;
            while points < MAX_GROUP_POINTS {
                let next = match rx.try_recv() {
                    Ok(b) => Some(b),
                    Err(mpsc::error::TryRecvError::Empty) => {
                        tokio::time::timeout_at(deadline, rx.recv()).await.ok().flatten()
                    }
                    Err(mpsc::error::TryRecvError::Disconnected) => None,
                };
                let Some(b) = next else { break };
                points += b.points.len();
                group.push(b);
            }
            match self.write(&group).await {
                Ok(w) => {
                    // One ack per stored batch: a device reads an ack as covering that batch
                    // only (docs/protocol.md), so acking only the highest of a transaction
                    // would leave the others to be resent for ever.
                    for (i, b) in group.iter().enumerate() {
                        let refused = w.refused_series.get(i).copied().unwrap_or(0);
                        if let Err(e) = acks.try_send(ack(b, refused)) {
                            tracing::debug!(
                                device_id = b.device_id,
                                "telemetry ack not sent (the device will resend): {e}"
                            );
                        }
                    }
                }
                Err(e) => {
                    self.stats.write_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        "cannot store {} telemetry batch(es) ({points} points); not acknowledged, the devices resend them: {e}",
                        group.len()
                    );
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
            group.clear();
        }
    }
}
