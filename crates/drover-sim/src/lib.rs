//! `drover-sim`: N simulated devices, each with its own key pair, enrolled through the real
//! enrollment API, each running the agent's own [`Session`] on its own MQTT connection over
//! mutual TLS — all in one multi-thread tokio runtime.
//!
//! The parts: [`inventory`] makes up a plausible inventory per device, [`state`] keeps keys
//! and certificates across runs (`--state-dir`), and [`run`] enrolls (a bounded number at a
//! time), paces new connections (`--connect-rate`), churns a fraction of the fleet
//! (`--churn`), and reports.
//!
//! With `--device-type` each device also runs the agent's update engine
//! ([`drover_agent::update::Engine`]): real downloads over HTTPS with its certificate, real
//! verification against `--root-file`, real `file` / `app` installs into its own folder under
//! `--update-dir`. An engine is a task, not a thread: only the steps running at a moment take a
//! thread from tokio's blocking pool, for at most `--update-slots` devices updating at once.
//! `--download-rate` caps each device's download speed, so an update can be watched.
//!
//! With `--remote` each device also runs the agent's remote access ([`drover_agent::remote`]):
//! terminals and file transfers confined to the device's own folder under `--remote-dir`
//! (`STATE_DIR/remote` by default), port forwarding only to `--remote-forward` targets. Each
//! device's hello names what it really does (`update`, `telemetry`, `rules`, `terminal`,
//! `files`, `forward`).
//!
//! The enrollment token comes from `--token-file`, `DROVER_SIM_TOKEN` or `--token` (the last is
//! visible to other users in `ps`).

pub mod inventory;
pub mod state;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Parser;
use drover_agent::backoff::BackoffPolicy;
use drover_agent::config::UpdateConfig;
use drover_agent::enroll::{EnrollClient, EnrollError, Outcome, enroll};
use drover_agent::session::{Session, SessionConfig, SessionStats, StaticSource};
use drover_agent::tls::{DeviceKey, mqtt_client_config};
use drover_agent::update::download::Downloader;
use drover_agent::update::{Engine, UpdateLink};
use drover_proto::api::EnrollRequest;
use tokio::sync::{Notify, Semaphore, watch};
use tokio::time::Instant;

use crate::state::Store;

/// The `up/hello` agent string of simulated devices.
pub const AGENT: &str = concat!("drover-sim/", env!("CARGO_PKG_VERSION"));

#[derive(Parser, Debug, Clone)]
#[command(
    name = "drover-sim",
    version,
    about = "A fleet of simulated Drover devices: each enrolls with its own key and runs the agent's MQTT session over mutual TLS.",
    after_help = "Prints a status line every --report seconds, `all N devices connected in X s` once every \
                  device is connected, and a summary when stopped (SIGINT/SIGTERM: each device says offline \
                  and disconnects). Logs of the sessions: DROVER_LOG (default error)."
)]
pub struct Args {
    /// Base URL of droverd's HTTPS device endpoint (enrollment).
    #[arg(long, default_value = "https://localhost:8443")]
    pub server: String,
    /// The fleet CA certificate, PEM (`droverd ca cert`).
    #[arg(long)]
    pub ca: PathBuf,
    /// The MQTT broker, HOST:PORT (mutual TLS).
    #[arg(long, default_value = "localhost:8883")]
    pub mqtt: String,
    /// Enrollment token (`dre_…`); needed unless every device is in --state-dir already.
    /// On the command line it is visible to every user of this machine (`ps`): prefer the
    /// environment variable DROVER_SIM_TOKEN or --token-file.
    #[arg(long, env = "DROVER_SIM_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Read the enrollment token from this file (surrounding whitespace ignored) instead of
    /// --token / DROVER_SIM_TOKEN.
    #[arg(long, value_name = "PATH")]
    pub token_file: Option<PathBuf>,
    /// Number of devices.
    #[arg(short = 'n', long = "devices", default_value_t = 100)]
    pub devices: u64,
    /// New connections per second across the fleet, e.g. `200/s` (0: unpaced).
    #[arg(long, default_value = "200/s", value_parser = parse_rate)]
    pub connect_rate: f64,
    /// Fraction of the devices that disconnect (and come back after a while) per minute.
    #[arg(long, default_value_t = 0.0, value_parser = parse_churn)]
    pub churn: f64,
    /// Keep keys and certificates here; a restarted simulator reuses its devices.
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Name prefix of the simulated hosts (`{prefix}-00042`) and their serials.
    #[arg(long, default_value = "sim", value_parser = parse_prefix)]
    pub prefix: String,
    /// Seconds between heartbeats.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub heartbeat: u64,
    /// MQTT keep-alive, seconds.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(5..=600))]
    pub keepalive: u64,
    /// Seconds between status lines (0: none).
    #[arg(long, default_value_t = 5)]
    pub report: u64,
    /// Exit 0 (after disconnecting cleanly) as soon as all devices are connected.
    #[arg(long)]
    pub until_connected: bool,
    /// Give up (exit 1) if not all devices are connected after this many seconds.
    #[arg(long)]
    pub timeout: Option<u64>,
    /// Enrollment requests in flight at a time.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=512))]
    pub enroll_concurrency: u32,
    /// Longest wait between reconnect attempts, seconds (the agent's default: 300).
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub max_backoff: u64,
    /// Take software updates as this device type, with the agent's own update engine
    /// (download, verification, `file` / `app` modules into each device's folder).
    #[arg(long, requires = "root_file")]
    pub device_type: Option<String>,
    /// The trust root (`root.json`) the simulated devices are provisioned with.
    #[arg(long)]
    pub root_file: Option<PathBuf>,
    /// Each device's update state and installed files: `DIR/{name}/` (`state/`, `files/` for
    /// the `file` module — its paths are taken under this folder — and `apps/`). Default:
    /// `STATE_DIR/updates`, or a folder under the system's temporary directory.
    #[arg(long)]
    pub update_dir: Option<PathBuf>,
    /// Devices updating at once across the fleet: a device keeps its slot from the start of
    /// a job to its final report, the others wait `pending` (a step takes a thread while it
    /// runs; idle devices take none).
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=512))]
    pub update_slots: u32,
    /// Send telemetry every this many seconds per device, through the agent's own telemetry
    /// core (outbox, numbered batches, acks, re-sends). Off by default.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub telemetry_interval: Option<u64>,
    /// Metrics per device per telemetry round (`sim.m0` … `sim.m{N-1}`, random walks).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=2000))]
    pub metrics: u32,
    /// Report what the agent's health collector reports (`cpu.percent`, `mem.used_percent`,
    /// `disk.used_percent.root`, `temp.zone0_celsius`, `net.rx_bytes`, …), each device with its
    /// own plausible level, instead of `--metrics` random walks.
    #[arg(long, requires = "telemetry_interval")]
    pub health: bool,
    /// Each device's outbox: `DIR/{name}/`. Default: `STATE_DIR/telemetry`, or a folder under
    /// the system's temporary directory.
    #[arg(long)]
    pub telemetry_dir: Option<PathBuf>,
    /// fdatasync the outboxes as the agent does (off by default: the simulator's outboxes
    /// survive a crash of the simulator, not a power cut).
    #[arg(long)]
    pub telemetry_fsync: bool,
    /// Download artifacts at most this fast, per device: bytes per second with an optional
    /// unit, e.g. `64KiB`, `1MiB/s`, `500kB` (k = 1000, Ki = 1024). Unlimited by default.
    #[arg(long, value_name = "RATE", requires = "device_type", value_parser = parse_byte_rate)]
    pub download_rate: Option<u64>,
    /// Take remote-access terminals and file transfers, with the agent's own remote-access
    /// code. Each device is confined to its own folder, `--remote-dir`/{name}/: the shell
    /// starts there (and it is its HOME), and file transfers may only read and write under it.
    /// The shell runs as the simulator's user. No port forwarding unless --remote-forward.
    #[arg(long)]
    pub remote: bool,
    /// Each device's remote-access folder: `DIR/{name}/`. Default: `STATE_DIR/remote`, or a
    /// folder under the system's temporary directory.
    #[arg(long, value_name = "DIR", requires = "remote")]
    pub remote_dir: Option<PathBuf>,
    /// Allow port forwarding to this target, `HOST:PORT` or `HOST:*` (repeat for more).
    #[arg(long, value_name = "HOST:PORT", requires = "remote", value_parser = parse_forward)]
    pub remote_forward: Vec<String>,
    /// Let terminals run as root when the simulator runs as root (refused otherwise, as the
    /// agent refuses them without `allow_root`).
    #[arg(long, requires = "remote")]
    pub remote_allow_root: bool,
}

/// A port-forwarding target as `[remote] forward_allow` takes it: `host:port` or `host:*`.
fn parse_forward(s: &str) -> Result<String, String> {
    let ok = s
        .rsplit_once(':')
        .is_some_and(|(h, p)| !h.is_empty() && (p == "*" || drover_proto::remote::Target::parse(s).is_ok()));
    if ok { Ok(s.to_string()) } else { Err(format!("{s:?}: expected HOST:PORT or HOST:*")) }
}

/// `64KiB`, `1MiB/s`, `500kB`, `1000`: bytes per second.
fn parse_byte_rate(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t.strip_suffix("/s").unwrap_or(t);
    let split = t.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let mult: f64 = match unit.trim() {
        "" | "B" => 1.0,
        "k" | "kB" | "K" | "KB" => 1e3,
        "Ki" | "KiB" => 1024.0,
        "M" | "MB" => 1e6,
        "Mi" | "MiB" => 1024.0 * 1024.0,
        "G" | "GB" => 1e9,
        "Gi" | "GiB" => 1024.0 * 1024.0 * 1024.0,
        _ => return Err(format!("{s:?}: not a rate such as 64KiB or 1MiB/s")),
    };
    let n: f64 = num.parse().map_err(|_| format!("{s:?}: not a rate such as 64KiB or 1MiB/s"))?;
    let rate = (n * mult).round();
    if !(1.0..=1e12).contains(&rate) {
        return Err(format!("{s:?}: the rate must be between 1 byte and 1 TB per second"));
    }
    Ok(rate as u64)
}

fn parse_rate(s: &str) -> Result<f64, String> {
    let n = s.strip_suffix("/s").unwrap_or(s);
    let r: f64 = n.trim().parse().map_err(|_| format!("{s:?} is not a rate such as 200/s"))?;
    if !r.is_finite() || r < 0.0 {
        return Err(format!("{s:?}: the rate must be 0 or more"));
    }
    Ok(r)
}

fn parse_churn(s: &str) -> Result<f64, String> {
    let f: f64 = s.parse().map_err(|_| format!("{s:?} is not a fraction such as 0.05"))?;
    if !(0.0..=1.0).contains(&f) {
        return Err(format!("{s:?}: churn is a fraction of the fleet per minute, 0 to 1"));
    }
    Ok(f)
}

fn parse_prefix(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= 32
        && !s.starts_with('-')
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok { Ok(s.to_string()) } else { Err(format!("{s:?}: 1-32 lowercase letters, digits or '-'")) }
}

fn parse_host_port(s: &str) -> Result<(String, u16), String> {
    let (host, port) = match s.rsplit_once(':') {
        Some((h, p)) => (h, p.parse::<u16>().map_err(|_| format!("--mqtt {s:?}: bad port"))?),
        None => (s, 8883),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(format!("--mqtt {s:?}: no host"));
    }
    Ok((host.to_string(), port))
}

/// The binary's entry point.
pub fn main_entry() -> ExitCode {
    let args = Args::parse();
    drover_agent::tls::install_default_provider();
    let filter = tracing_subscriber::EnvFilter::try_from_env("DROVER_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(drover_agent::log_colours())
        .with_target(false)
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("drover-sim: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let code = match rt.block_on(run(args)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("drover-sim: {e}");
            ExitCode::from(1)
        }
    };
    rt.shutdown_timeout(Duration::from_secs(1));
    code
}

/// What is shared by every device task.
struct Ctx {
    args: Args,
    host: String,
    port: u16,
    ca_pem: Vec<u8>,
    client: EnrollClient,
    store: Store,
    run_id: String,
    enroll_slots: Semaphore,
    pacer: Pacer,
    fleet: Fleet,
    /// `--device-type`: where each device's update folders go, and the shared work slots.
    updates: Option<(PathBuf, Arc<Semaphore>)>,
    /// `--telemetry-interval`: where each device's outbox goes.
    telemetry: Option<PathBuf>,
    /// `--remote`: where each device's remote-access folder goes.
    remote: Option<PathBuf>,
    /// The enrollment token: `--token-file`, or `--token` / DROVER_SIM_TOKEN.
    token: Option<String>,
    /// `up/hello`'s capabilities of every simulated device.
    capabilities: Vec<String>,
}

/// Spaces new connections `period` apart across the fleet.
struct Pacer {
    period: Duration,
    next: Mutex<Instant>,
}

impl Pacer {
    fn new(rate: f64) -> Pacer {
        let period = if rate > 0.0 { Duration::from_secs_f64(1.0 / rate) } else { Duration::ZERO };
        Pacer { period, next: Mutex::new(Instant::now()) }
    }

    async fn wait(&self) {
        if self.period.is_zero() {
            return;
        }
        let at = {
            let mut next = self.next.lock().unwrap_or_else(|p| p.into_inner());
            let at = (*next).max(Instant::now());
            *next = at + self.period;
            at
        };
        tokio::time::sleep_until(at).await;
    }
}

/// Counters of one device across its sessions (a churned device gets a new session).
#[derive(Default)]
struct Slot {
    done: [u64; 4],
    current: Option<Arc<SessionStats>>,
}

struct Fleet {
    slots: Vec<Mutex<Slot>>,
    churn: Vec<Notify>,
    enrolled: AtomicU64,
    reused: AtomicU64,
    enroll_failures: AtomicU64,
    churned: AtomicU64,
    /// The first few enrollment errors are printed; the rest only counted.
    errors_shown: AtomicU64,
}

#[derive(Debug, Default, Clone, Copy)]
struct Totals {
    enrolled: u64,
    reused: u64,
    enroll_failures: u64,
    connected: u64,
    connects: u64,
    connect_failures: u64,
    heartbeats: u64,
    inventories: u64,
    churned: u64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn counts(s: &SessionStats) -> [u64; 4] {
    [s.connects(), s.connect_failures(), s.heartbeats(), s.inventories()]
}

impl Fleet {
    fn new(n: u64) -> Fleet {
        Fleet {
            slots: (0..n).map(|_| Mutex::default()).collect(),
            churn: (0..n).map(|_| Notify::new()).collect(),
            enrolled: AtomicU64::new(0),
            reused: AtomicU64::new(0),
            enroll_failures: AtomicU64::new(0),
            churned: AtomicU64::new(0),
            errors_shown: AtomicU64::new(0),
        }
    }

    fn totals(&self) -> Totals {
        let mut t = Totals {
            enrolled: self.enrolled.load(Ordering::Relaxed),
            reused: self.reused.load(Ordering::Relaxed),
            enroll_failures: self.enroll_failures.load(Ordering::Relaxed),
            churned: self.churned.load(Ordering::Relaxed),
            ..Totals::default()
        };
        for slot in &self.slots {
            let s = lock(slot);
            let mut c = s.done;
            if let Some(cur) = &s.current {
                let now = counts(cur);
                for (a, b) in c.iter_mut().zip(now) {
                    *a += b;
                }
                t.connected += u64::from(cur.connected());
            }
            t.connects += c[0];
            t.connect_failures += c[1];
            t.heartbeats += c[2];
            t.inventories += c[3];
        }
        t
    }

    fn connected(&self, i: usize) -> bool {
        lock(&self.slots[i]).current.as_ref().is_some_and(|c| c.connected())
    }

    fn start_session(&self, i: usize, stats: Arc<SessionStats>) {
        lock(&self.slots[i]).current = Some(stats);
    }

    fn end_session(&self, i: usize) {
        let mut s = lock(&self.slots[i]);
        if let Some(cur) = s.current.take() {
            for (a, b) in s.done.iter_mut().zip(counts(&cur)) {
                *a += b;
            }
        }
    }

    fn enroll_failed(&self, name: &str, error: &str) {
        self.enroll_failures.fetch_add(1, Ordering::Relaxed);
        let shown = self.errors_shown.fetch_add(1, Ordering::Relaxed);
        if shown < 3 {
            eprintln!("drover-sim: {name}: {error}");
        } else if shown == 3 {
            eprintln!("drover-sim: more devices failed to enroll; counting them in the status line");
        }
    }
}

async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

/// Why a transport failure happened, in words an operator can act on.
fn explain_transport(server: &str, ca: &std::path::Path, msg: &str) -> String {
    let lower = msg.to_ascii_lowercase();
    if lower.contains("unknownissuer") || lower.contains("unknown issuer") || lower.contains("badsignature") {
        format!(
            "the server at {server} presented a certificate that the CA in {} did not sign ({msg}); \
             pass the fleet CA that `droverd ca cert` prints",
            ca.display()
        )
    } else if lower.contains("notvalidforname") || lower.contains("not valid for name") {
        format!(
            "the server's certificate is not valid for the host in {server} ({msg}); use localhost, 127.0.0.1 or the server's host name"
        )
    } else {
        format!("cannot reach the enrollment endpoint at {server}: {msg}")
    }
}

fn explain_enroll_error(ctx: &Ctx, e: &EnrollError) -> String {
    match e {
        EnrollError::Transport(msg) => explain_transport(&ctx.args.server, &ctx.args.ca, msg),
        EnrollError::Refused { status: 401, message, .. } => {
            format!("the enrollment token was refused: {message} (create one with POST /api/v1/enrollment-tokens)")
        }
        EnrollError::Refused { status: 403, message, .. } => format!("enrollment forbidden: {message}"),
        other => other.to_string(),
    }
}

/// One device's credentials and MQTT TLS configuration.
struct Ready {
    device_id: String,
    tls: Arc<rustls::ClientConfig>,
    cert_pem: String,
    key: DeviceKey,
}

fn identity(ctx: &Ctx, index: u64) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("serial".to_string(), inventory::serial(&ctx.args.prefix, &ctx.run_id, index)),
        ("mac".to_string(), inventory::mac(&ctx.run_id, index)),
    ])
}

fn load_key(ctx: &Ctx, name: &str, saved: Option<String>) -> Result<DeviceKey, String> {
    match saved {
        Some(pem) => DeviceKey::from_pem(&pem).map_err(|e| format!("state directory: {name}: {e}")),
        None => {
            let key = DeviceKey::generate().map_err(|e| e.to_string())?;
            ctx.store.save_key(name, &key.to_pem()).map_err(|e| format!("state directory: {name}: {e}"))?;
            Ok(key)
        }
    }
}

/// Loads device `index` from the state directory, or makes its key and enrolls it.
async fn prepare(ctx: &Ctx, index: u64, name: &str) -> Result<Ready, String> {
    let saved = ctx.store.load(name).map_err(|e| format!("state directory: {name}: {e}"))?;
    let key = load_key(ctx, name, saved.key_pem)?;
    let ca = (&ctx.ca_pem[..], "--ca");
    if let Some((device_id, cert)) = saved.enrolled {
        let tls =
            mqtt_client_config(&[ca], cert.as_bytes(), &key).map_err(|e| format!("state directory: {name}: {e}"))?;
        ctx.fleet.reused.fetch_add(1, Ordering::Relaxed);
        return Ok(Ready { device_id, tls, cert_pem: cert, key });
    }
    let token =
        ctx.token.as_deref().ok_or("not enrolled yet, and no enrollment token (--token-file, --token) to enroll it")?;
    let enrolled = {
        let _slot = ctx.enroll_slots.acquire().await.map_err(|e| e.to_string())?;
        enroll(&ctx.client, &key, &identity(ctx, index), Some(token))
            .await
            .map_err(|e| explain_enroll_error(ctx, &e))?
    };
    ctx.store
        .save_enrolled(name, &enrolled.device_id, &enrolled.certificate_pem)
        .map_err(|e| format!("state directory: {name}: {e}"))?;
    let tls =
        mqtt_client_config(&[ca, (enrolled.ca_pem.as_bytes(), "ca_pem")], enrolled.certificate_pem.as_bytes(), &key)
            .map_err(|e| e.to_string())?;
    ctx.fleet.enrolled.fetch_add(1, Ordering::Relaxed);
    Ok(Ready { device_id: enrolled.device_id, tls, cert_pem: enrolled.certificate_pem, key })
}

/// The agent's update engine for one simulated device, in `DIR/{name}/`: the same engine,
/// modules and downloads as the agent; reboots are simulated.
fn update_engine(ctx: &Ctx, name: &str, ready: &Ready) -> Result<Option<UpdateLink>, String> {
    let (Some((dir, slots)), Some(device_type)) = (&ctx.updates, &ctx.args.device_type) else {
        return Ok(None);
    };
    let dev = dir.join(name);
    let mut cfg = UpdateConfig::new(device_type.clone());
    cfg.root_file = ctx.args.root_file.clone().unwrap_or_default();
    cfg.hooks_dir = dev.join("hooks");
    cfg.modules_dir = dev.join("modules");
    cfg.file_allow = vec![dev.join("files")];
    cfg.file_root = Some(dev.join("files"));
    cfg.apps_dir = dev.join("apps");
    cfg.reboot_command = "true".into();
    cfg.download_backoff = Duration::from_secs(2);
    cfg.download_backoff_max = Duration::from_secs(60);
    std::fs::create_dir_all(dev.join("files")).map_err(|e| format!("{}: {e}", dev.display()))?;
    let mut dl = Downloader::new(&ctx.args.server, &[&ctx.ca_pem], ready.cert_pem.as_bytes(), &ready.key)?;
    if let Some(rate) = ctx.args.download_rate {
        dl = dl.with_rate_limit(rate);
    }
    let engine = Engine::new(cfg, &dev.join("state"), Some(dl)).simulated_reboot().with_slots(slots.clone());
    Ok(Some(drover_agent::update::spawn(engine)))
}

/// The agent's remote access for one simulated device, confined to `DIR/{name}/`: terminals
/// start there (it is their HOME), file transfers stay under it, port forwarding only to the
/// `--remote-forward` targets.
fn remote_access(ctx: &Ctx, name: &str, ready: &Ready) -> Result<Option<drover_agent::remote::RemoteLink>, String> {
    let Some(base) = &ctx.remote else { return Ok(None) };
    let dir = base.join(name);
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    // The real path, so what the shell's `pwd` says is what file transfers take.
    let dir = std::fs::canonicalize(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let cfg = drover_agent::config::RemoteConfig {
        terminal: true,
        files: true,
        forward: !ctx.args.remote_forward.is_empty(),
        forward_allow: ctx.args.remote_forward.clone(),
        allow_root: ctx.args.remote_allow_root,
        file_paths: vec![dir.clone()],
        home: Some(dir),
        ..drover_agent::config::RemoteConfig::default()
    };
    let conn = drover_agent::remote::ConnParams {
        device_id: ready.device_id.clone(),
        host: ctx.host.clone(),
        port: ctx.port,
        tls: ready.tls.clone(),
        keepalive: Duration::from_secs(ctx.args.keepalive),
    };
    Ok(Some(drover_agent::remote::spawn(cfg, conn)))
}

/// What a simulated device does, as its hello says: `update` with `--device-type`,
/// `telemetry` and `rules` (the agent's telemetry core applies rule sets) with
/// `--telemetry-interval`, `terminal` and `files` with `--remote`, `forward` with
/// `--remote-forward`. No `logs`: a simulated device has no logs to serve.
fn capabilities(args: &Args) -> Vec<String> {
    use drover_proto::device::{CAP_FILES, CAP_FORWARD, CAP_RULES, CAP_TELEMETRY, CAP_TERMINAL, CAP_UPDATE};
    let telemetry = args.telemetry_interval.is_some();
    [
        (CAP_UPDATE, args.device_type.is_some()),
        (CAP_TELEMETRY, telemetry),
        (CAP_RULES, telemetry),
        (CAP_TERMINAL, args.remote),
        (CAP_FILES, args.remote),
        (CAP_FORWARD, args.remote && !args.remote_forward.is_empty()),
    ]
    .into_iter()
    .filter(|(_, on)| *on)
    .map(|(c, _)| c.to_string())
    .collect()
}

/// The enrollment token: `--token-file`'s content, or `--token` / DROVER_SIM_TOKEN; not both.
fn resolve_token(args: &Args) -> Result<Option<String>, String> {
    match (&args.token_file, &args.token) {
        (Some(_), Some(_)) => {
            Err("give the enrollment token one way: --token-file, or --token / DROVER_SIM_TOKEN (both are set)".into())
        }
        (Some(path), None) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read --token-file {}: {e}", path.display()))?;
            let t = text.trim();
            if t.is_empty() {
                return Err(format!("--token-file {}: the file is empty", path.display()));
            }
            Ok(Some(t.to_string()))
        }
        (None, t) => Ok(t.clone()),
    }
}

/// `--metrics` random walks, one point each per round.
struct SimMetrics(Vec<f64>);

impl drover_agent::telemetry::MetricSource for SimMetrics {
    fn collect(&mut self) -> Vec<(String, f64)> {
        self.0
            .iter_mut()
            .enumerate()
            .map(|(i, v)| {
                *v = (*v + rand::random::<f64>() * 2.0 - 1.0).clamp(0.0, 100.0);
                (format!("sim.m{i}"), (*v * 100.0).round() / 100.0)
            })
            .collect()
    }
}

/// `--health`: the agent collector's metric names with values a real device might report.
/// Each device has its own baseline (some run hot, some are nearly full), levels wander, and
/// the counters only grow.
struct SimHealth {
    cpu: f64,
    mem: f64,
    disk: f64,
    temp: f64,
    rx: f64,
    tx: f64,
    uptime: f64,
    interval: f64,
}

impl SimHealth {
    fn new(index: u64, interval: u64, uptime: u64) -> SimHealth {
        // A fixed spread over the fleet: device 7 is always the same kind of device.
        let h = (index.wrapping_mul(2_654_435_761) % 1000) as f64 / 1000.0;
        SimHealth {
            cpu: 5.0 + 60.0 * h,
            mem: 25.0 + 50.0 * ((h * 7.0) % 1.0),
            disk: 20.0 + 75.0 * ((h * 13.0) % 1.0),
            temp: 40.0 + 40.0 * h,
            rx: 0.0,
            tx: 0.0,
            uptime: uptime as f64,
            interval: interval as f64,
        }
    }
}

impl drover_agent::telemetry::MetricSource for SimHealth {
    fn collect(&mut self) -> Vec<(String, f64)> {
        let step = |v: &mut f64, by: f64, lo: f64, hi: f64| {
            *v = (*v + (rand::random::<f64>() * 2.0 - 1.0) * by).clamp(lo, hi);
            (*v * 100.0).round() / 100.0
        };
        let cpu = step(&mut self.cpu, 6.0, 0.5, 100.0);
        let temp = step(&mut self.temp, 1.0, 25.0, 95.0);
        let mem = step(&mut self.mem, 1.5, 5.0, 99.0);
        let disk = step(&mut self.disk, 0.05, 1.0, 100.0);
        self.rx += (2_000.0 + rand::random::<f64>() * 50_000.0) * self.interval;
        self.tx += (500.0 + rand::random::<f64>() * 10_000.0) * self.interval;
        self.uptime += self.interval;
        vec![
            ("cpu.percent".into(), cpu),
            ("cpu.load1".into(), (cpu / 25.0 * 100.0).round() / 100.0),
            ("mem.used_percent".into(), mem),
            ("disk.used_percent.root".into(), disk),
            ("temp.zone0_celsius".into(), temp),
            ("net.rx_bytes".into(), self.rx.floor()),
            ("net.tx_bytes".into(), self.tx.floor()),
            ("uptime_s".into(), self.uptime.floor()),
        ]
    }
}

/// The agent's telemetry core for one simulated device, its outbox in `DIR/{name}/`.
fn telemetry(ctx: &Ctx, index: u64, name: &str) -> Result<Option<drover_agent::telemetry::TelemetryLink>, String> {
    let (Some(dir), Some(secs)) = (&ctx.telemetry, ctx.args.telemetry_interval) else { return Ok(None) };
    let mut cfg = drover_agent::telemetry::config::TelemetryConfig::defaults(&dir.join(name));
    cfg.interval = Duration::from_secs(secs);
    cfg.batch_max_points = drover_proto::telemetry::MAX_BATCH_POINTS;
    let mut core = drover_agent::telemetry::CoreConfig::from_config(&cfg);
    core.outbox.fsync = ctx.args.telemetry_fsync;
    core.self_metrics = false;
    let bad = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let link = if ctx.args.health {
        let source = SimHealth::new(index, secs, inventory::uptime_base(index));
        drover_agent::telemetry::spawn(core, source, None, bad)
    } else {
        let source = SimMetrics((0..ctx.args.metrics).map(|i| (i * 7 % 100) as f64).collect());
        drover_agent::telemetry::spawn(core, source, None, bad)
    };
    link.map(Some).map_err(|e| e.to_string())
}

/// One simulated device: enroll (or load), then sessions until the simulator stops. A churned
/// session ends cleanly (`offline`, DISCONNECT); the device stays away 5–30 s and comes back
/// through the connection pacer.
async fn device(ctx: Arc<Ctx>, index: u64, mut stop: watch::Receiver<bool>) {
    let i = index as usize;
    let name = inventory::hostname(&ctx.args.prefix, index);
    let ready = tokio::select! {
        r = prepare(&ctx, index, &name) => r,
        () = stopped(&mut stop) => return,
    };
    let ready = match ready {
        Ok(r) => r,
        Err(e) => return ctx.fleet.enroll_failed(&name, &e),
    };
    let updates = match update_engine(&ctx, &name, &ready) {
        Ok(u) => u,
        Err(e) => return ctx.fleet.enroll_failed(&name, &format!("updates: {e}")),
    };
    let telemetry = match telemetry(&ctx, index, &name) {
        Ok(t) => t,
        Err(e) => return ctx.fleet.enroll_failed(&name, &format!("telemetry: {e}")),
    };
    let remote = match remote_access(&ctx, &name, &ready) {
        Ok(r) => r,
        Err(e) => return ctx.fleet.enroll_failed(&name, &format!("remote access: {e}")),
    };
    let attrs = inventory::attributes(&ctx.args.prefix, &ctx.run_id, index);
    let boot_id = format!("{:016x}", rand::random::<u64>());
    loop {
        tokio::select! {
            () = ctx.pacer.wait() => {}
            () = stopped(&mut stop) => return,
        }
        let mut cfg = SessionConfig::new(ready.device_id.clone(), ctx.host.clone(), ctx.port, ready.tls.clone());
        cfg.keepalive = Duration::from_secs(ctx.args.keepalive);
        cfg.heartbeat_interval = Duration::from_secs(ctx.args.heartbeat);
        cfg.agent = AGENT.to_string();
        cfg.boot_id = Some(boot_id.clone());
        cfg.uptime_base_secs = Some(inventory::uptime_base(index));
        cfg.backoff = BackoffPolicy { cap: Duration::from_secs(ctx.args.max_backoff), ..BackoffPolicy::default() };
        cfg.updates = updates.clone();
        cfg.telemetry = telemetry.clone();
        cfg.remote = remote.clone();
        cfg.capabilities = Some(ctx.capabilities.clone());
        let session = match Session::new(cfg, StaticSource(attrs.clone())) {
            Ok(s) => s,
            Err(e) => return ctx.fleet.enroll_failed(&name, &format!("session: {e}")),
        };
        ctx.fleet.start_session(i, session.stats());
        let churned = AtomicBool::new(false);
        let mut stop2 = stop.clone();
        session
            .run(async {
                tokio::select! {
                    () = stopped(&mut stop2) => {}
                    () = ctx.fleet.churn[i].notified() => churned.store(true, Ordering::Relaxed),
                }
            })
            .await;
        ctx.fleet.end_session(i);
        if !churned.load(Ordering::Relaxed) || *stop.borrow() {
            return;
        }
        ctx.fleet.churned.fetch_add(1, Ordering::Relaxed);
        let away = Duration::from_millis(5_000 + rand::random::<u64>() % 25_000);
        tokio::select! {
            () = tokio::time::sleep(away) => {}
            () = stopped(&mut stop) => return,
        }
    }
}

/// Every second, asks `churn × n / 60` connected devices (on average) to disconnect.
async fn churner(ctx: Arc<Ctx>, mut stop: watch::Receiver<bool>) {
    let n = ctx.fleet.slots.len();
    let per_second = ctx.args.churn * n as f64 / 60.0;
    let mut carry = 0.0;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stopped(&mut stop) => return,
        }
        carry += per_second;
        let k = carry.floor();
        carry -= k;
        let picks: Vec<usize> = {
            use rand::Rng;
            let mut rng = rand::thread_rng();
            (0..k as usize).map(|_| rng.gen_range(0..n)).collect()
        };
        for i in picks {
            if ctx.fleet.connected(i) {
                ctx.fleet.churn[i].notify_one();
            }
        }
    }
}

/// Enrolls the first device once, by hand, so a wrong token, an unreachable server or a wrong
/// CA is one clear error instead of a fleet retrying forever.
async fn preflight(ctx: &Ctx) -> Result<(), String> {
    let name = inventory::hostname(&ctx.args.prefix, 0);
    let saved = ctx.store.load(&name).map_err(|e| format!("state directory: {e}"))?;
    if saved.enrolled.is_some() {
        return Ok(());
    }
    let token = ctx.token.clone().ok_or(
        "an enrollment token (dre_…) is needed to enroll new devices: --token-file, DROVER_SIM_TOKEN or --token",
    )?;
    let key = load_key(ctx, &name, saved.key_pem)?;
    let req = EnrollRequest {
        csr_pem: key.csr_pem().map_err(|e| e.to_string())?,
        identity: identity(ctx, 0),
        token: Some(token),
    };
    let client = ctx.client.clone();
    let outcome = tokio::task::spawn_blocking(move || client.request(&req)).await.map_err(|e| e.to_string())?;
    match outcome {
        Ok(Outcome::Accepted(_)) => Ok(()),
        Ok(Outcome::Pending { device_id, .. }) => Err(format!(
            "device {device_id} is pending instead of accepted: the server did not take the token as valid"
        )),
        Err(e) => Err(explain_enroll_error(ctx, &e)),
    }
}

fn status_line(t: &Totals, n: u64, elapsed: Duration) -> String {
    format!(
        "[{:>7.1}s] enrolled {}/{n} (reused {})  connected {}  connects {}  connect failures {}  enroll failures {}  heartbeats {}  churned {}",
        elapsed.as_secs_f64(),
        t.enrolled + t.reused,
        t.reused,
        t.connected,
        t.connects,
        t.connect_failures,
        t.enroll_failures,
        t.heartbeats,
        t.churned,
    )
}

async fn signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
    }
}

/// Runs the fleet until a signal, `--until-connected`, or a fatal error.
pub async fn run(args: Args) -> Result<ExitCode, String> {
    let (host, port) = parse_host_port(&args.mqtt)?;
    let token = resolve_token(&args)?;
    let ca_pem = std::fs::read(&args.ca).map_err(|e| format!("cannot read --ca {}: {e}", args.ca.display()))?;
    drover_agent::tls::certs_from_pem(&ca_pem, &format!("--ca {}", args.ca.display())).map_err(|e| e.to_string())?;
    let client = EnrollClient::new(&args.server, Some(&ca_pem)).map_err(|e| format!("--server: {e}"))?;
    let (store, run_id) = Store::open(args.state_dir.as_deref()).map_err(|e| {
        format!("state directory {}: {e}", args.state_dir.as_deref().unwrap_or(std::path::Path::new("")).display())
    })?;
    let updates = match &args.device_type {
        None => None,
        Some(_) => {
            let root = args.root_file.as_deref().unwrap_or(std::path::Path::new(""));
            let text = std::fs::read(root).map_err(|e| format!("cannot read --root-file {}: {e}", root.display()))?;
            drover_agent::update::trust::check_root(&text)
                .map_err(|e| format!("--root-file {}: {e}", root.display()))?;
            let dir = match (&args.update_dir, &args.state_dir) {
                (Some(d), _) => d.clone(),
                (None, Some(s)) => s.join("updates"),
                (None, None) => std::env::temp_dir().join(format!("drover-sim-{run_id}")),
            };
            std::fs::create_dir_all(&dir).map_err(|e| format!("--update-dir {}: {e}", dir.display()))?;
            Some((dir, Arc::new(Semaphore::new(args.update_slots as usize))))
        }
    };
    let telemetry = match (&args.telemetry_interval, &args.telemetry_dir, &args.state_dir) {
        (None, _, _) => None,
        (Some(_), Some(d), _) => Some(d.clone()),
        (Some(_), None, Some(s)) => Some(s.join("telemetry")),
        (Some(_), None, None) => Some(std::env::temp_dir().join(format!("drover-sim-{run_id}-telemetry"))),
    };
    let remote = match (args.remote, &args.remote_dir, &args.state_dir) {
        (false, _, _) => None,
        (true, Some(d), _) => Some(d.clone()),
        (true, None, Some(s)) => Some(s.join("remote")),
        (true, None, None) => Some(std::env::temp_dir().join(format!("drover-sim-{run_id}-remote"))),
    };
    if let Some(d) = &remote {
        std::fs::create_dir_all(d).map_err(|e| format!("--remote-dir {}: {e}", d.display()))?;
    }
    let n = args.devices;
    let ctx = Arc::new(Ctx {
        token,
        capabilities: capabilities(&args),
        remote,
        telemetry,
        updates,
        host,
        port,
        ca_pem,
        client,
        store,
        run_id,
        enroll_slots: Semaphore::new(args.enroll_concurrency as usize),
        pacer: Pacer::new(args.connect_rate),
        fleet: Fleet::new(n),
        args,
    });
    let started = Instant::now();
    if n > 0 {
        tokio::select! {
            r = preflight(&ctx) => r?,
            () = signal() => return Ok(ExitCode::from(130)),
        }
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    for index in 0..n {
        tasks.spawn(device(ctx.clone(), index, stop_rx.clone()));
    }
    if ctx.args.churn > 0.0 {
        tasks.spawn(churner(ctx.clone(), stop_rx.clone()));
    }
    let report = (ctx.args.report > 0).then(|| Duration::from_secs(ctx.args.report));
    let deadline = ctx.args.timeout.map(|s| started + Duration::from_secs(s));
    let mut next_report = report.map(|r| started + r);
    let mut all_connected = false;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut sig = std::pin::pin!(signal());
    let failure: Option<String> = loop {
        tokio::select! {
            () = &mut sig => break None,
            _ = tick.tick() => {}
        }
        let now = Instant::now();
        let t = ctx.fleet.totals();
        if !all_connected && t.connected == n {
            all_connected = true;
            println!("all {n} devices connected in {:.2}s", started.elapsed().as_secs_f64());
            if ctx.args.until_connected {
                break None;
            }
        }
        if t.enroll_failures > 0
            && t.enroll_failures + t.enrolled + t.reused == n
            && (ctx.args.until_connected || t.enroll_failures == n)
        {
            break Some(format!("{} of {n} devices could not enroll", t.enroll_failures));
        }
        if deadline.is_some_and(|d| now >= d) && !all_connected {
            break Some(format!(
                "only {} of {n} devices connected after {}s (--timeout)",
                t.connected,
                ctx.args.timeout.unwrap_or(0)
            ));
        }
        if let (Some(at), Some(every)) = (next_report, report)
            && now >= at
        {
            println!("{}", status_line(&t, n, started.elapsed()));
            next_report = Some(at + every);
        }
    };
    let _ = stop_tx.send(true);
    let stopping = Instant::now();
    let drained =
        tokio::time::timeout(Duration::from_secs(15), async { while tasks.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        eprintln!("drover-sim: some devices did not disconnect within 15 s");
        tasks.abort_all();
    }
    let t = ctx.fleet.totals();
    println!(
        "summary: {n} devices, enrolled {} (new {}, reused {}), enroll failures {}, connections {}, connect failures {}, heartbeats {}, inventories {}, churned {}; ran {:.1}s, stopped in {:.1}s",
        t.enrolled + t.reused,
        t.enrolled,
        t.reused,
        t.enroll_failures,
        t.connects,
        t.connect_failures,
        t.heartbeats,
        t.inventories,
        t.churned,
        started.elapsed().as_secs_f64(),
        stopping.elapsed().as_secs_f64(),
    );
    match failure {
        Some(f) => Err(f),
        None => Ok(ExitCode::SUCCESS),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_are_checked() {
        assert_eq!(parse_rate("200/s").unwrap(), 200.0);
        assert_eq!(parse_rate("0").unwrap(), 0.0);
        assert!(parse_rate("fast").is_err());
        assert!(parse_rate("-1/s").is_err());
        assert!(parse_churn("1.5").is_err());
        assert_eq!(parse_churn("0.05").unwrap(), 0.05);
        assert!(parse_prefix("Sim").is_err());
        assert!(parse_prefix("-x").is_err());
        assert_eq!(parse_host_port("localhost:8883").unwrap(), ("localhost".to_string(), 8883));
        assert_eq!(parse_host_port("example").unwrap(), ("example".to_string(), 8883));
        assert!(parse_host_port(":1").is_err());
        assert!(parse_host_port("h:x").is_err());
        assert_eq!(parse_byte_rate("64KiB").unwrap(), 65_536);
        assert_eq!(parse_byte_rate("64KiB/s").unwrap(), 65_536);
        assert_eq!(parse_byte_rate("1MiB").unwrap(), 1_048_576);
        assert_eq!(parse_byte_rate("500kB").unwrap(), 500_000);
        assert_eq!(parse_byte_rate("1.5M").unwrap(), 1_500_000);
        assert_eq!(parse_byte_rate("1000").unwrap(), 1000);
        for bad in ["fast", "0", "64 parsecs", "-1KiB", "", "KiB"] {
            assert!(parse_byte_rate(bad).is_err(), "{bad}");
        }
        assert!(parse_forward("127.0.0.1:80").is_ok());
        assert!(parse_forward("localhost:*").is_ok());
        assert!(parse_forward("localhost").is_err());
        assert!(parse_forward(":80").is_err());
    }

    #[test]
    fn capabilities_follow_the_flags() {
        let args = |extra: &[&str]| {
            let base = ["drover-sim", "--ca", "ca.pem"];
            Args::try_parse_from(base.iter().chain(extra)).unwrap()
        };
        assert!(capabilities(&args(&[])).is_empty());
        assert_eq!(capabilities(&args(&["--remote"])), ["terminal", "files"]);
        assert_eq!(
            capabilities(&args(&[
                "--device-type",
                "x",
                "--root-file",
                "r.json",
                "--telemetry-interval",
                "5",
                "--remote",
                "--remote-forward",
                "127.0.0.1:80"
            ])),
            ["update", "telemetry", "rules", "terminal", "files", "forward"]
        );
        // The remote flags need --remote; the rate needs updates.
        for bad in [&["--remote-forward", "127.0.0.1:80"][..], &["--remote-allow-root"], &["--download-rate", "1KiB"]] {
            let base = ["drover-sim", "--ca", "ca.pem"];
            assert!(Args::try_parse_from(base.iter().chain(bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn transport_errors_are_explained() {
        let ca = std::path::Path::new("ca.pem");
        assert!(
            explain_transport("https://h", ca, "invalid peer certificate: UnknownIssuer").contains("droverd ca cert")
        );
        assert!(explain_transport("https://h", ca, "Connection refused").contains("cannot reach"));
    }
}
