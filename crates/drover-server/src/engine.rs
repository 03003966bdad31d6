//! The deployment engine: sends `down/update` commands and takes `up/update` reports.
//!
//! Rules, all decided from the database so that any number of replicas can run it
//! (design decision 3):
//!
//! - A device works on one deployment at a time: its **current** row is its oldest
//!   unfinished `deployment_devices` row (by the deployment's creation). Only that one is
//!   ever sent; the next is sent when the current one becomes final.
//! - An install is sent to a device's current row when the deployment is created (devices
//!   online then), when the device says `hello` (every connection: the broker keeps no
//!   session), and when its previous deployment ends. A row of an aborted deployment that is
//!   still unfinished gets `abort` instead.
//! - A send that no device event asked for (creation, the next in the queue, the sweep) is
//!   **claimed** first: `UPDATE … SET sent_at = now WHERE sent_at IS NULL`, and only the
//!   replica whose update changed the row sends. A `hello` re-sends without a claim: commands
//!   are idempotent on the device. Every few seconds each replica sweeps for current rows of
//!   online devices that no one has sent (a replica that stopped right after a creation).
//! - A current row that was sent but has heard nothing for [`STALE`] (its report lost on the
//!   way, say) is sent again by the sweep, claimed by moving `sent_at`: the device answers a
//!   repeated command with where it stands, so no row waits for ever on a device that is
//!   online.
//! - A device whose hello lists its capabilities without `update` never gets a command: its
//!   unfinished rows end `incompatible` at once (at creation, at its hello, in the sweep).
//! - Reports: final states stay final (a late report is ignored); the last final report
//!   sets what the device runs (`software`); the deployment finishes when its last device
//!   does. Progress reports (the same state, more bytes) are merged in memory and written
//!   once a second in one transaction; state changes are written at once.
//!
//! The MQTT client belongs to the ingest loop (`devnet::run_ingest`); the engine hands it
//! messages through a queue, so nothing here waits on the broker while the ingest loop is
//! busy handling a message.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use drover_proto::device::{Channel, PROTOCOL_VERSION};
use drover_proto::update::{ArtifactOffer, Software, UpdateAction, UpdateCommand, UpdateReport, UpdateState};
use tokio::sync::{mpsc, watch};

use crate::db::Db;
use crate::error::AppResult;
use crate::time::now_ms;

/// Messages waiting for the MQTT client, at most.
const QUEUE: usize = 8192;
/// Rows one sweep or one creation sends at a time.
const BATCH: i64 = 500;
/// How often progress is written.
const PROGRESS_FLUSH: Duration = Duration::from_secs(1);
/// States remembered for telling progress from a state change, at most.
const MAX_KNOWN: usize = 200_000;
/// How often each replica looks for current rows nobody sent.
const SWEEP: Duration = Duration::from_secs(10);
/// A sent row of an online device silent this long (ms) gets its command again.
const STALE: i64 = 120_000;

/// Rows with an older unfinished row of the same device wait (`dd` is the candidate row).
/// Devices whose hello listed what they can do, without `update` (`devices.capabilities` is
/// the JSON list of known capability names).
const NO_UPDATES: &str = "d.capabilities IS NOT NULL AND d.capabilities NOT LIKE '%\"update\"%'";
/// Why such a device's row ended `incompatible`.
pub const NO_UPDATES_MESSAGE: &str =
    "the device does not take updates: its hello lists no `update` capability (is [update] off in its agent's config?)";
const IS_CURRENT: &str = "NOT EXISTS (SELECT 1 FROM deployment_devices o WHERE o.device_id = dd.device_id \
                          AND o.finished = 0 AND (o.created_at < dd.created_at OR \
                          (o.created_at = dd.created_at AND o.deployment_id < dd.deployment_id)))";

/// A command on its way to a device.
#[derive(Debug)]
pub struct Outgoing {
    pub topic: String,
    pub payload: Vec<u8>,
}

#[derive(Debug, Clone, Copy)]
struct Progress {
    state: UpdateState,
    bytes: Option<u64>,
    total: Option<u64>,
    at: i64,
}

/// See the module documentation.
pub struct Engine {
    db: Db,
    out: OnceLock<mpsc::Sender<Outgoing>>,
    /// Progress waiting to be written, by (deployment, device); only while the flusher runs.
    progress: Mutex<HashMap<(String, String), Progress>>,
    /// The state last written per (deployment, device) by this replica: a report in that
    /// state is progress.
    known: Mutex<HashMap<(String, String), UpdateState>>,
    batching: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").field("connected", &self.out.get().is_some()).finish_non_exhaustive()
    }
}

fn to_i64(v: Option<u64>) -> Option<i64> {
    v.map(|b| i64::try_from(b).unwrap_or(i64::MAX))
}

impl Engine {
    pub fn new(db: Db) -> Arc<Engine> {
        Arc::new(Engine {
            db,
            out: OnceLock::new(),
            progress: Mutex::new(HashMap::new()),
            known: Mutex::new(HashMap::new()),
            batching: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Gives the engine the broker connection and starts its background work (publishing,
    /// progress writes, the sweep) until `stop`.
    pub fn start(self: &Arc<Self>, client: rumqttc::v5::AsyncClient, stop: watch::Receiver<bool>) {
        let (tx, mut rx) = mpsc::channel::<Outgoing>(QUEUE);
        let mut s1 = stop.clone();
        tokio::spawn(async move {
            loop {
                let msg = tokio::select! {
                    _ = s1.wait_for(|s| *s) => return,
                    m = rx.recv() => match m { Some(m) => m, None => return },
                };
                let qos = rumqttc::v5::mqttbytes::QoS::AtLeastOnce;
                if let Err(e) = client.publish(msg.topic, qos, false, msg.payload).await {
                    tracing::warn!("cannot publish an update command: {e}");
                }
            }
        });
        self.start_with(tx, stop);
    }

    /// As [`Engine::start`], with commands handed to `out` instead of an MQTT client (what
    /// [`Engine::start`] itself does; tests read the queue).
    pub fn start_with(self: &Arc<Self>, out: mpsc::Sender<Outgoing>, stop: watch::Receiver<bool>) {
        if self.out.set(out).is_err() {
            return;
        }
        self.batching.store(true, std::sync::atomic::Ordering::Relaxed);
        let me = self.clone();
        let mut s2 = stop.clone();
        tokio::spawn(async move {
            loop {
                let stopping = tokio::select! {
                    _ = s2.wait_for(|s| *s) => true,
                    _ = tokio::time::sleep(PROGRESS_FLUSH) => false,
                };
                me.flush_progress().await;
                if stopping {
                    return;
                }
            }
        });
        let me = self.clone();
        let mut s3 = stop;
        tokio::spawn(async move {
            loop {
                let stopping = tokio::select! {
                    _ = s3.wait_for(|s| *s) => true,
                    _ = tokio::time::sleep(SWEEP) => false,
                };
                if stopping {
                    return;
                }
                if let Err(e) = me.sweep().await {
                    tracing::warn!("deployment sweep: {e}");
                }
            }
        });
    }

    fn connected(&self) -> bool {
        self.out.get().is_some()
    }

    fn send(&self, device_id: &str, payload: Vec<u8>) -> bool {
        let Some(out) = self.out.get() else { return false };
        let topic = drover_proto::device::topic(device_id, Channel::Update);
        match out.try_send(Outgoing { topic, payload }) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(device_id, "update command not sent: {e}");
                false
            }
        }
    }

    /// As [`Engine::send`], waiting for room in the queue (never on the ingest loop).
    async fn send_wait(&self, device_id: &str, payload: Vec<u8>) -> bool {
        let Some(out) = self.out.get() else { return false };
        let topic = drover_proto::device::topic(device_id, Channel::Update);
        out.send(Outgoing { topic, payload }).await.is_ok()
    }

    /// The install command of a deployment (the same for every device in it), or `None` when
    /// the deployment or its artifact is gone.
    async fn install_payload(&self, deployment_id: &str) -> AppResult<Option<Vec<u8>>> {
        let mut conn = self.db.pool().acquire().await?;
        let row: Option<(String, String, String, String, i64)> = sqlx::query_as(
            "SELECT dep.org_id, a.id, a.name, a.version, a.size FROM deployments dep \
             JOIN artifacts a ON a.org_id = dep.org_id AND a.id = dep.artifact_id WHERE dep.id = $1",
        )
        .bind(deployment_id.to_string())
        .fetch_optional(&mut *conn)
        .await?;
        let Some((org_id, id, name, version, size)) = row else { return Ok(None) };
        let roots = crate::artifacts::trust_chain(&mut conn, &org_id).await?.into_iter().map(|(_, j)| j).collect();
        let cmd = UpdateCommand {
            v: PROTOCOL_VERSION,
            deployment: deployment_id.to_string(),
            action: UpdateAction::Install {
                artifact: ArtifactOffer {
                    path: format!("/device/v1/artifacts/{id}"),
                    id,
                    name,
                    version,
                    size: u64::try_from(size).unwrap_or(0),
                },
                roots,
            },
        };
        Ok(Some(serde_json::to_vec(&cmd).unwrap_or_default()))
    }

    fn abort_payload(deployment_id: &str) -> Vec<u8> {
        let cmd =
            UpdateCommand { v: PROTOCOL_VERSION, deployment: deployment_id.to_string(), action: UpdateAction::Abort };
        serde_json::to_vec(&cmd).unwrap_or_default()
    }

    /// Claims a row for sending; true when this replica won it. Every write here goes through
    /// the writer queue (`Db::begin_write`): on SQLite a write beside it spins in the busy
    /// handler while queued writers keep the lock, which stalled dispatch during rollouts.
    async fn claim(&self, deployment_id: &str, device_id: &str) -> AppResult<bool> {
        let mut tx = self.db.begin_write().await?;
        let n = sqlx::query(
            "UPDATE deployment_devices SET sent_at = $1 WHERE deployment_id = $2 AND device_id = $3 \
             AND sent_at IS NULL AND finished = 0",
        )
        .bind(now_ms())
        .bind(deployment_id.to_string())
        .bind(device_id.to_string())
        .execute(tx.conn())
        .await?
        .rows_affected();
        tx.commit().await?;
        Ok(n == 1)
    }

    /// A claimed row whose command could not be queued goes back to unsent.
    async fn unclaim(&self, deployment_id: &str, device_id: &str) {
        let Ok(mut tx) = self.db.begin_write().await else { return };
        let done =
            sqlx::query("UPDATE deployment_devices SET sent_at = NULL WHERE deployment_id = $1 AND device_id = $2")
                .bind(deployment_id.to_string())
                .bind(device_id.to_string())
                .execute(tx.conn())
                .await;
        if done.is_ok() {
            let _ = tx.commit().await;
        }
    }

    /// Sends the install to every online device whose current row is in this (new)
    /// deployment; in the background.
    pub fn kick(self: &Arc<Self>, deployment_id: &str) {
        if !self.connected() {
            return;
        }
        let me = self.clone();
        let id = deployment_id.to_string();
        tokio::spawn(async move {
            if let Err(e) = me.send_unsent(Some(&id)).await {
                tracing::warn!(deployment = id, "cannot send the deployment's commands: {e}");
            }
        });
    }

    /// Ends `incompatible` the unfinished rows (of one deployment, or of all) of devices whose
    /// hello listed capabilities without `update`: such a device would never answer.
    async fn end_incapable(&self, deployment_id: Option<&str>, device_id: Option<&str>) -> AppResult<usize> {
        let rows: Vec<(String, String)> = sqlx::query_as(&format!(
            "SELECT dd.deployment_id, dd.device_id FROM deployment_devices dd JOIN devices d ON d.id = dd.device_id \
             WHERE dd.finished = 0 AND {NO_UPDATES} AND ($1 = '' OR dd.deployment_id = $1) AND ($2 = '' OR dd.device_id = $2) \
             LIMIT {BATCH}"
        ))
        .bind(deployment_id.unwrap_or_default().to_string())
        .bind(device_id.unwrap_or_default().to_string())
        .fetch_all(self.db.pool())
        .await?;
        let mut ended = 0;
        for (dep, device) in rows {
            let mut r = UpdateReport::new(dep, UpdateState::Incompatible);
            r.message = Some(NO_UPDATES_MESSAGE.to_string());
            if self.write_report(&device, &r).await? == Written::Current {
                ended += 1;
            }
        }
        Ok(ended)
    }

    /// Claims and sends current, unsent rows of online devices: of one deployment, or of all.
    async fn send_unsent(&self, deployment_id: Option<&str>) -> AppResult<usize> {
        self.end_incapable(deployment_id, None).await?;
        let mut sent = 0;
        let mut payloads: HashMap<String, Option<Vec<u8>>> = HashMap::new();
        loop {
            let rows: Vec<(String, String)> = match deployment_id {
                Some(id) => {
                    sqlx::query_as(&format!(
                        "SELECT dd.deployment_id, dd.device_id FROM deployment_devices dd JOIN devices d ON d.id = dd.device_id \
                         WHERE dd.deployment_id = $1 AND dd.finished = 0 AND dd.sent_at IS NULL AND d.online = 1 \
                         AND {IS_CURRENT} LIMIT {BATCH}"
                    ))
                    .bind(id.to_string())
                    .fetch_all(self.db.pool())
                    .await?
                }
                None => {
                    sqlx::query_as(&format!(
                        "SELECT dd.deployment_id, dd.device_id FROM deployment_devices dd JOIN devices d ON d.id = dd.device_id \
                         WHERE dd.finished = 0 AND dd.sent_at IS NULL AND d.online = 1 AND {IS_CURRENT} LIMIT {BATCH}"
                    ))
                    .fetch_all(self.db.pool())
                    .await?
                }
            };
            let n = rows.len();
            let mut by_deployment: HashMap<String, Vec<String>> = HashMap::new();
            for (dep, device) in rows {
                by_deployment.entry(dep).or_default().push(device);
            }
            let mut progressed = false;
            for (dep, devices) in by_deployment {
                let claimed = self.claim_many(&dep, &devices).await?;
                if claimed.is_empty() {
                    continue;
                }
                progressed = true;
                if !payloads.contains_key(&dep) {
                    let p = self.current_command(&dep).await?;
                    payloads.insert(dep.clone(), p);
                }
                let Some(p) = payloads.get(&dep).and_then(|p| p.clone()) else { continue };
                for device in claimed {
                    // Off the ingest loop: waiting for room in the queue is fine here.
                    if !self.send_wait(&device, p.clone()).await {
                        self.unclaim(&dep, &device).await;
                        return Ok(sent);
                    }
                    sent += 1;
                }
            }
            if (n as i64) < BATCH || !progressed {
                return Ok(sent);
            }
        }
    }

    /// Claims the unsent rows of these devices in one deployment, in one statement; returns
    /// the devices this replica won.
    async fn claim_many(&self, deployment_id: &str, devices: &[String]) -> AppResult<Vec<String>> {
        self.claim_where(deployment_id, devices, now_ms(), None).await
    }

    /// Moves `sent_at` to `now` on these devices' unfinished rows of one deployment that were
    /// unsent (`stale_before` None) or sent and silent since before `stale_before`; returns the
    /// devices this replica won.
    async fn claim_where(
        &self,
        deployment_id: &str,
        devices: &[String],
        now: i64,
        stale_before: Option<i64>,
    ) -> AppResult<Vec<String>> {
        let first = if stale_before.is_some() { 4 } else { 3 };
        let marks: Vec<String> = (first..devices.len() + first).map(|i| format!("${i}")).collect();
        let sent = match stale_before {
            None => "sent_at IS NULL",
            Some(_) => "sent_at < $3 AND updated_at < $3",
        };
        let sql = format!(
            "UPDATE deployment_devices SET sent_at = $1 WHERE deployment_id = $2 AND {sent} AND finished = 0 \
             AND device_id IN ({}) RETURNING device_id",
            marks.join(", ")
        );
        let mut q = sqlx::query_as::<_, (String,)>(&sql).bind(now).bind(deployment_id.to_string());
        if let Some(t) = stale_before {
            q = q.bind(t);
        }
        for d in devices {
            q = q.bind(d.clone());
        }
        let mut tx = self.db.begin_write().await?;
        let won = q.fetch_all(tx.conn()).await?.into_iter().map(|(d,)| d).collect();
        tx.commit().await?;
        Ok(won)
    }

    /// Install for an active deployment, abort for an aborted one.
    async fn current_command(&self, deployment_id: &str) -> AppResult<Option<Vec<u8>>> {
        let status: Option<(String,)> = sqlx::query_as("SELECT status FROM deployments WHERE id = $1")
            .bind(deployment_id.to_string())
            .fetch_optional(self.db.pool())
            .await?;
        match status {
            Some((s,)) if s == "aborted" => Ok(Some(Engine::abort_payload(deployment_id))),
            Some(_) => self.install_payload(deployment_id).await,
            None => Ok(None),
        }
    }

    /// One pass of the sweep (see the module documentation).
    pub async fn sweep(&self) -> AppResult<usize> {
        if !self.connected() {
            return Ok(0);
        }
        let sent = self.send_unsent(None).await?;
        Ok(sent + self.resend_stale(now_ms()).await?)
    }

    /// Sends the command again to current rows of online devices sent and silent for
    /// [`STALE`] as of `now`; each claimed by moving its `sent_at`, so one replica sends.
    pub async fn resend_stale(&self, now: i64) -> AppResult<usize> {
        let rows: Vec<(String, String)> = sqlx::query_as(&format!(
            "SELECT dd.deployment_id, dd.device_id FROM deployment_devices dd JOIN devices d ON d.id = dd.device_id \
             WHERE dd.finished = 0 AND dd.sent_at < $1 AND dd.updated_at < $1 AND d.online = 1 AND {IS_CURRENT} \
             LIMIT {BATCH}"
        ))
        .bind(now - STALE)
        .fetch_all(self.db.pool())
        .await?;
        let mut by_deployment: HashMap<String, Vec<String>> = HashMap::new();
        for (dep, device) in rows {
            by_deployment.entry(dep).or_default().push(device);
        }
        let mut sent = 0;
        for (dep, devices) in by_deployment {
            let won = self.claim_where(&dep, &devices, now, Some(now - STALE)).await?;
            if won.is_empty() {
                continue;
            }
            let Some(payload) = self.current_command(&dep).await? else { continue };
            tracing::info!(
                deployment = dep,
                devices = won.len(),
                "no word from devices for a while: command sent again"
            );
            for device in won {
                if !self.send_wait(&device, payload.clone()).await {
                    return Ok(sent);
                }
                sent += 1;
            }
        }
        Ok(sent)
    }

    /// Sends `abort` for a deployment to these devices.
    pub fn send_abort(&self, deployment_id: &str, devices: Vec<String>) {
        let payload = Engine::abort_payload(deployment_id);
        for d in devices {
            self.send(&d, payload.clone());
        }
    }

    /// Sends the next queued deployment to each of these devices (whose current one just
    /// ended), in the background.
    pub fn dispatch_next(self: &Arc<Self>, devices: Vec<String>) {
        if devices.is_empty() || !self.connected() {
            return;
        }
        let me = self.clone();
        tokio::spawn(async move {
            for d in devices {
                if let Err(e) = me.dispatch(&d, false).await {
                    tracing::warn!(device_id = d, "cannot send the next deployment: {e}");
                }
            }
        });
    }

    /// Sends the device's current row: always when `resend` (the device said hello), else
    /// only if this replica claims it (and the device is online).
    pub async fn dispatch(&self, device_id: &str, resend: bool) -> AppResult<()> {
        if !self.connected() {
            return Ok(());
        }
        let row: Option<(String, Option<i64>, i64)> = sqlx::query_as(
            "SELECT dd.deployment_id, dd.sent_at, d.online FROM deployment_devices dd JOIN devices d ON d.id = dd.device_id \
             WHERE dd.device_id = $1 AND dd.finished = 0 ORDER BY dd.created_at, dd.deployment_id LIMIT 1",
        )
        .bind(device_id.to_string())
        .fetch_optional(self.db.pool())
        .await?;
        let Some((dep, _sent_at, online)) = row else { return Ok(()) };
        if self.end_incapable(None, Some(device_id)).await? > 0 {
            return Ok(());
        }
        if resend {
            let mut tx = self.db.begin_write().await?;
            sqlx::query("UPDATE deployment_devices SET sent_at = $1 WHERE deployment_id = $2 AND device_id = $3")
                .bind(now_ms())
                .bind(dep.clone())
                .bind(device_id.to_string())
                .execute(tx.conn())
                .await?;
            tx.commit().await?;
        } else if online == 0 || !self.claim(&dep, device_id).await? {
            return Ok(());
        }
        if let Some(p) = self.current_command(&dep).await?
            && !self.send(device_id, p)
            && !resend
        {
            self.unclaim(&dep, device_id).await;
        }
        Ok(())
    }

    /// The device connected and said hello: record what it runs, and send its current
    /// deployment again.
    pub async fn on_hello(&self, device_id: &str, software: Option<&Software>) -> AppResult<()> {
        if let Some(sw) = software {
            let mut tx = self.db.begin_write().await?;
            sqlx::query(
                "UPDATE devices SET sw_artifact = $1, sw_name = $2, sw_version = $3 WHERE id = $4 AND status = 'accepted'",
            )
            .bind(sw.artifact.clone())
            .bind(sw.name.clone())
            .bind(sw.version.clone())
            .bind(device_id.to_string())
            .execute(tx.conn())
            .await?;
            tx.commit().await?;
        }
        self.dispatch(device_id, true).await
    }

    /// A device's `up/update`.
    pub async fn on_report(self: &Arc<Self>, device_id: &str, r: UpdateReport) -> AppResult<()> {
        if r.state == UpdateState::Pending {
            // The server's own state: a device has nothing to say with it.
            return Ok(());
        }
        let key = (r.deployment.clone(), device_id.to_string());
        if !r.state.is_final() && self.batching.load(std::sync::atomic::Ordering::Relaxed) {
            let same = self.known.lock().unwrap_or_else(|e| e.into_inner()).get(&key) == Some(&r.state);
            if same && r.message.is_none() && r.log.is_none() {
                let p = Progress { state: r.state, bytes: r.bytes, total: r.total, at: now_ms() };
                self.progress.lock().unwrap_or_else(|e| e.into_inner()).insert(key, p);
                return Ok(());
            }
        }
        // Progress still waiting for the next flush belongs to this row too: a state change
        // (say, downloading → installing) without byte counts keeps the last ones reported.
        let mut r = r;
        if let Some(p) = self.progress.lock().unwrap_or_else(|e| e.into_inner()).remove(&key) {
            r.bytes = r.bytes.or(p.bytes);
            r.total = r.total.or(p.total);
        }
        let outcome = self.write_report(device_id, &r).await?;
        {
            let mut known = self.known.lock().unwrap_or_else(|e| e.into_inner());
            if known.len() > MAX_KNOWN {
                // Rows that never ended here (another replica took their last report): forget
                // them all; the next report of each is written at once.
                known.clear();
            }
            if outcome == Written::Current && !r.state.is_final() {
                known.insert(key, r.state);
            } else {
                known.remove(&key);
            }
        }
        if outcome == Written::Current && r.state.is_final() {
            self.dispatch(device_id, false).await?;
        }
        Ok(())
    }

    async fn write_report(&self, device_id: &str, r: &UpdateReport) -> AppResult<Written> {
        let now = now_ms();
        let fin = r.state.is_final();
        let mut tx = self.db.begin_write().await?;
        if fin {
            // Serializes the devices finishing one deployment (PostgreSQL row lock), so the
            // last of them sees the others' rows and ends it.
            sqlx::query("UPDATE deployments SET status = status WHERE id = $1")
                .bind(r.deployment.clone())
                .execute(tx.conn())
                .await?;
        }
        let row: Option<(i64, String, String, String, String, String)> = sqlx::query_as(
            "SELECT dd.finished, dep.artifact_id, dep.artifact_name, dep.artifact_version, dep.name, dd.state \
             FROM deployment_devices dd JOIN deployments dep ON dep.id = dd.deployment_id \
             WHERE dd.deployment_id = $1 AND dd.device_id = $2",
        )
        .bind(r.deployment.clone())
        .bind(device_id.to_string())
        .fetch_optional(tx.conn())
        .await?;
        let Some((finished, artifact_id, artifact_name, artifact_version, dep_name, old_state)) = row else {
            tracing::warn!(device_id, deployment = r.deployment, "update report for a deployment the device is not in");
            return Ok(Written::Ignored);
        };
        if finished != 0 {
            tracing::debug!(device_id, deployment = r.deployment, state = %r.state, "report after a final state, ignored");
            return Ok(Written::Ignored);
        }
        let log =
            r.log.as_deref().map(|l| drover_proto::update::tail(l, drover_proto::update::MAX_REPORT_LOG).to_string());
        sqlx::query(
            "UPDATE deployment_devices SET state = $1, finished = $2, bytes = COALESCE($3, bytes), \
             total = COALESCE($4, total), message = $5, log = COALESCE($6, log), updated_at = $7 \
             WHERE deployment_id = $8 AND device_id = $9 AND finished = 0",
        )
        .bind(r.state.as_str())
        .bind(i64::from(fin))
        .bind(to_i64(r.bytes))
        .bind(to_i64(r.total))
        .bind(r.message.clone())
        .bind(log)
        .bind(now)
        .bind(r.deployment.clone())
        .bind(device_id.to_string())
        .execute(tx.conn())
        .await?;
        if fin {
            let software = r.software.clone().or_else(|| {
                matches!(r.state, UpdateState::Success | UpdateState::AlreadyInstalled).then(|| Software {
                    artifact: Some(artifact_id.clone()),
                    name: artifact_name.clone(),
                    version: artifact_version.clone(),
                })
            });
            if let Some(sw) = software {
                sqlx::query("UPDATE devices SET sw_artifact = $1, sw_name = $2, sw_version = $3 WHERE id = $4")
                    .bind(sw.artifact)
                    .bind(sw.name)
                    .bind(sw.version)
                    .bind(device_id.to_string())
                    .execute(tx.conn())
                    .await?;
            }
            let mut detail = format!("{artifact_name} {artifact_version}: {} (deployment {dep_name:?})", r.state);
            if let Some(m) = &r.message {
                detail.push_str(": ");
                detail.extend(m.chars().take(300));
            }
            crate::presence::add_event(tx.conn(), device_id, now, EVENT_UPDATE, &detail).await?;
            crate::deployments::finish_if_done(tx.conn(), &r.deployment, now).await?;
        }
        tx.commit().await?;
        if old_state != r.state.as_str() {
            tracing::debug!(device_id, deployment = r.deployment, from = old_state, to = %r.state, "update state");
        }
        Ok(Written::Current)
    }

    /// Writes the progress gathered since the last flush, in one transaction. A row whose
    /// state moved on meanwhile (here or on another replica) is left alone.
    pub async fn flush_progress(&self) {
        let batch: Vec<((String, String), Progress)> = {
            let mut p = self.progress.lock().unwrap_or_else(|e| e.into_inner());
            if p.is_empty() {
                return;
            }
            p.drain().collect()
        };
        let result = async {
            let mut tx = self.db.begin_write().await?;
            for ((dep, device), p) in &batch {
                sqlx::query(
                    "UPDATE deployment_devices SET bytes = COALESCE($1, bytes), total = COALESCE($2, total), updated_at = $3 \
                     WHERE deployment_id = $4 AND device_id = $5 AND state = $6 AND finished = 0",
                )
                .bind(to_i64(p.bytes))
                .bind(to_i64(p.total))
                .bind(p.at)
                .bind(dep.clone())
                .bind(device.clone())
                .bind(p.state.as_str())
                .execute(tx.conn())
                .await?;
            }
            tx.commit().await
        }
        .await;
        if let Err(e) = result {
            tracing::warn!("cannot write update progress of {} device(s): {e}", batch.len());
        }
    }
}

/// The device event written when an update ends on a device.
pub const EVENT_UPDATE: &str = "update";

#[derive(Debug, PartialEq, Eq)]
enum Written {
    /// Stored.
    Current,
    /// Unknown deployment or device, or after a final state.
    Ignored,
}
