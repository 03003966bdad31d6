//! `drover-agent run`: enroll if needed, then run the session until SIGTERM/SIGINT.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::Path;

use crate::config::Config;
use crate::enroll::{self, EnrollClient, EnrollError};
use crate::inventory::SystemInventory;
use crate::session::{Session, SessionConfig, SystemSource};
use crate::store::{Provisioned, Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Enroll(#[from] EnrollError),
    #[error("{0}")]
    Other(String),
}

/// The default identity when `[identity]` is not configured: `machine_id` from
/// `/etc/machine-id` and `mac`, the first non-loopback MAC address (interfaces by name).
pub fn default_identity() -> BTreeMap<String, String> {
    let mut id = BTreeMap::new();
    if let Some(m) =
        std::fs::read_to_string("/etc/machine-id").ok().map(|s| s.trim().to_string()).filter(|s| !s.is_empty())
    {
        id.insert("machine_id".to_string(), m);
    }
    if let Some(mac) = first_mac() {
        id.insert("mac".to_string(), mac);
    }
    id
}

fn first_mac() -> Option<String> {
    let mut names: Vec<String> = std::fs::read_dir("/sys/class/net")
        .ok()?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != "lo")
        .collect();
    names.sort();
    // Hardware first (they have a `device` link), then virtual interfaces.
    names.sort_by_key(|n| !Path::new(&format!("/sys/class/net/{n}/device")).exists());
    names.iter().find_map(|n| {
        std::fs::read_to_string(format!("/sys/class/net/{n}/address"))
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|m| !m.is_empty() && m != "00:00:00:00:00:00")
    })
}

/// The CA certificates that may sign the broker's certificate: `ca_file` and the CA received at
/// enrollment, whichever exist.
pub fn broker_ca_pems(cfg: &Config, store: &Store) -> Result<Vec<(Vec<u8>, String)>, AgentError> {
    let mut out = Vec::new();
    for path in [cfg.ca_file.clone(), store.ca_path()] {
        match std::fs::read(&path) {
            Ok(pem) => out.push((pem, path.display().to_string())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(AgentError::Other(format!("{}: {e}", path.display()))),
        }
    }
    if out.is_empty() {
        return Err(AgentError::Other(format!(
            "no CA certificate to verify the broker: neither {} nor {} exists",
            cfg.ca_file.display(),
            store.ca_path().display()
        )));
    }
    Ok(out)
}

/// Enrolls unless the data folder already holds an identity.
pub async fn ensure_enrolled(cfg: &Config, store: &Store) -> Result<Provisioned, AgentError> {
    if let Some(p) = store.load_provisioned()? {
        return Ok(p);
    }
    let server_url = cfg.server_url.as_deref().ok_or_else(|| {
        AgentError::Other(format!(
            "not enrolled yet ({} has no identity) and server_url is not set",
            store.dir().display()
        ))
    })?;
    let key = store.load_or_create_key()?;
    let ca = if server_url.starts_with("https://") {
        Some(
            std::fs::read(&cfg.ca_file)
                .map_err(|e| AgentError::Other(format!("ca_file {}: {e}", cfg.ca_file.display())))?,
        )
    } else {
        None
    };
    let identity = if cfg.identity.is_empty() { default_identity() } else { cfg.identity.clone() };
    crate::config::check_identity(&identity).map_err(|e| AgentError::Other(format!("identity: {e}")))?;
    if identity.is_empty() {
        return Err(AgentError::Other(
            "no identity: /etc/machine-id and network MAC addresses are unavailable; set [identity] in the config"
                .into(),
        ));
    }
    let token = cfg.enrollment_token()?;
    let client = EnrollClient::new(server_url, ca.as_deref())?;
    tracing::info!(url = server_url, ?identity, with_token = token.is_some(), "enrolling");
    let enrolled = enroll::enroll(&client, &key, &identity, token.as_deref()).await?;
    store.save_enrolled(&enrolled.device_id, &enrolled.certificate_pem, &enrolled.ca_pem)?;
    store.load_provisioned()?.ok_or_else(|| AgentError::Other("enrolled, but the stored identity is incomplete".into()))
}

/// The session configuration of this device from the agent's configuration.
pub fn session_config(cfg: &Config, store: &Store, p: &Provisioned) -> Result<SessionConfig, AgentError> {
    let pems = broker_ca_pems(cfg, store)?;
    let refs: Vec<(&[u8], &str)> = pems.iter().map(|(p, n)| (p.as_slice(), n.as_str())).collect();
    let tls = crate::tls::mqtt_client_config(&refs, p.cert_pem.as_bytes(), &p.key)
        .map_err(|e| AgentError::Other(e.to_string()))?;
    let mut sc = SessionConfig::new(p.device_id.clone(), cfg.broker.host.clone(), cfg.broker.port, tls);
    sc.keepalive = cfg.keepalive;
    sc.heartbeat_interval = cfg.heartbeat_interval;
    sc.inventory_interval = cfg.inventory_interval;
    sc.boot_id = crate::inventory::boot_id();
    sc.capabilities = Some(cfg.capabilities());
    Ok(sc)
}

/// The update engine of this device, `None` (with a log line saying so) when `[update]` is not
/// configured.
pub fn update_engine(
    cfg: &Config,
    store: &Store,
    p: &Provisioned,
) -> Result<Option<crate::update::Engine>, AgentError> {
    let Some(u) = &cfg.update else {
        tracing::info!("software updates are off: set [update] device_type in the configuration to take them");
        return Ok(None);
    };
    let downloader = match cfg.server_url.as_deref() {
        Some(url) => {
            let pems = broker_ca_pems(cfg, store)?;
            let cas: Vec<&[u8]> = pems.iter().map(|(p, _)| p.as_slice()).collect();
            let d = crate::update::download::Downloader::new(url, &cas, p.cert_pem.as_bytes(), &p.key)
                .map_err(|e| AgentError::Other(format!("update downloads: {e}")))?;
            Some(d)
        }
        None => {
            tracing::warn!("server_url is not set: updates will fail, the device cannot download artifacts");
            None
        }
    };
    if !u.root_file.exists() && !crate::update::persist::UpdateDir::new(&cfg.data_dir).root_path().exists() {
        tracing::warn!(
            root_file = %u.root_file.display(),
            "no trust root: every update will be refused until the release trust root is installed there"
        );
    }
    tracing::info!(device_type = %u.device_type, "software updates are on");
    Ok(Some(crate::update::Engine::new(u.clone(), &cfg.data_dir, downloader)))
}

/// Remote access with the main session's broker and certificate; logs which kinds are on.
pub fn remote_access(cfg: &Config, sc: &SessionConfig) -> crate::remote::RemoteLink {
    let r = &cfg.remote;
    tracing::info!(
        terminal = r.terminal,
        files = r.files,
        forward = r.forward,
        "remote access{}",
        if r.terminal || r.files || r.forward { "" } else { " is off: switch kinds on in [remote]" }
    );
    let conn = crate::remote::ConnParams {
        device_id: sc.device_id.clone(),
        host: sc.host.clone(),
        port: sc.port,
        tls: sc.tls.clone(),
        keepalive: sc.keepalive,
    };
    crate::remote::spawn(r.clone(), conn)
}

/// The telemetry core of this device with its local interface, `None` (logged) when
/// `[telemetry] enabled = false`.
pub fn telemetry(cfg: &Config) -> Result<Option<crate::telemetry::TelemetryLink>, AgentError> {
    let t = &cfg.telemetry;
    if !t.enabled {
        tracing::info!("telemetry is off ([telemetry] enabled = false)");
        return Ok(None);
    }
    let bad = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let local = match &t.socket {
        Some(path) => match crate::telemetry::serve_socket(path, t.socket_mode, bad.clone()) {
            Ok(rx) => {
                tracing::info!(socket = %path.display(), "local telemetry interface listening");
                Some(rx)
            }
            Err(e) => {
                tracing::error!(socket = %path.display(), "local telemetry interface unavailable: {e}");
                None
            }
        },
        None => None,
    };
    let core = crate::telemetry::CoreConfig::from_config(t);
    let collector = crate::telemetry::collect::Collector::new(t.disks.clone());
    let link = crate::telemetry::spawn(core, collector, local, bad).map_err(|e| AgentError::Other(e.to_string()))?;
    tracing::info!(interval_s = t.interval.as_secs(), outbox = %t.dir.display(), "telemetry is on");
    Ok(Some(link))
}

/// Resolves on SIGTERM or SIGINT.
pub fn shutdown_signal() -> Result<impl Future<Output = ()>, AgentError> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).map_err(|e| AgentError::Other(format!("SIGTERM handler: {e}")))?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| AgentError::Other(format!("SIGINT handler: {e}")))?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: going offline"),
            _ = int.recv() => tracing::info!("SIGINT: going offline"),
        }
    })
}

/// `drover-agent run`.
pub async fn run(cfg: Config) -> Result<(), AgentError> {
    let shutdown = shutdown_signal()?;
    tokio::pin!(shutdown);
    let store = Store::new(&cfg.data_dir);
    let provisioned = tokio::select! {
        p = ensure_enrolled(&cfg, &store) => p?,
        _ = &mut shutdown => return Ok(()),
    };
    let mut sc = session_config(&cfg, &store, &provisioned)?;
    sc.updates = update_engine(&cfg, &store, &provisioned)?.map(crate::update::spawn);
    sc.remote = Some(remote_access(&cfg, &sc));
    sc.telemetry = telemetry(&cfg)?;
    drop(provisioned);
    let source = SystemSource(SystemInventory {
        scripts_dir: cfg.inventory_scripts_dir.clone(),
        script_timeout: cfg.inventory_script_timeout,
    });
    let session = Session::new(sc, source).map_err(|e| AgentError::Other(e.to_string()))?;
    session.run(shutdown).await;
    Ok(())
}
