//! `drover-agent check`: one line per check, with a stable id, `ok`, `warn` or `FAIL`.
//!
//! ```text
//! ok   config       /etc/drover/agent.toml (+2 drop-ins)
//! ok   clock        2026-03-01T10:00:00Z
//! ok   identity     device 0193f2c4-… (key and certificate match)
//! warn certificate  expires 2026-03-20T00:00:00Z (19 days)
//! ok   server       https://drover.example:8443: TLS verified
//! FAIL broker       drover.example:8883: connection refused
//! ```

use std::io::Read;
use std::net::{TcpStream, ToSocketAddrs};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;

use crate::config::{self, Config};
use crate::store::Store;
use crate::tls::CertInfo;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Ok,
    Warn,
    Fail,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Ok => "ok",
            Level::Warn => "warn",
            Level::Fail => "FAIL",
        }
    }
}

#[derive(Debug, Clone)]
pub struct CheckLine {
    pub id: &'static str,
    pub level: Level,
    pub detail: String,
}

impl std::fmt::Display for CheckLine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:<4} {:<12} {}", self.level.as_str(), self.id, self.detail)
    }
}

fn line(id: &'static str, level: Level, detail: impl Into<String>) -> CheckLine {
    CheckLine { id, level, detail: detail.into() }
}

/// 2025-01-01T00:00:00Z: a clock before this has not been set.
const SANE_EPOCH: i64 = 1_735_689_600;

fn fmt_time(t: i64) -> String {
    crate::der::format_time(t)
}

fn now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

/// Runs every check. Blocking (TLS handshakes with timeouts): call from a blocking context.
pub fn run_checks(config_path: &Path) -> Vec<CheckLine> {
    let mut out = Vec::new();
    let cfg = match config::load(config_path) {
        Ok(c) => {
            let n = c.dropins.len();
            let extra =
                if n == 0 { String::new() } else { format!(" (+{n} drop-in{})", if n == 1 { "" } else { "s" }) };
            out.push(line("config", Level::Ok, format!("{}{extra}", config_path.display())));
            c
        }
        Err(e) => {
            let msg = e.to_string();
            let one_line: Vec<&str> = msg.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
            out.push(line("config", Level::Fail, one_line.join(" ")));
            return out;
        }
    };
    let store = Store::new(&cfg.data_dir);
    out.push(check_clock(&cfg, &store));
    let provisioned = match store.load_provisioned() {
        Ok(Some(p)) => {
            out.push(line("identity", Level::Ok, format!("device {} (key and certificate match)", p.device_id)));
            Some(p)
        }
        Ok(None) => {
            out.push(line(
                "identity",
                Level::Warn,
                format!("not enrolled yet: {} has no identity; `run` will enroll", store.dir().display()),
            ));
            None
        }
        Err(e) => {
            out.push(line("identity", Level::Fail, e.to_string()));
            None
        }
    };
    out.push(match &provisioned {
        Some(p) => check_certificate(p.cert_pem.as_bytes(), now()),
        None => line("certificate", Level::Warn, "no device certificate yet"),
    });
    out.push(check_server(&cfg));
    out.push(check_broker(&cfg, &store, provisioned.as_ref()));
    if let Some(u) = &cfg.update {
        out.push(check_update(&cfg, u));
    }
    out
}

/// Only with `[update]`: the trust root in force, and the update in flight.
fn check_update(cfg: &Config, u: &config::UpdateConfig) -> CheckLine {
    let dir = crate::update::persist::UpdateDir::new(&cfg.data_dir);
    let root = match crate::update::trust::current(&dir, &u.root_file) {
        Ok((store, _)) => {
            let keys = store.root().release_keys.len();
            format!("trust root v{} ({keys} release key{})", store.version(), if keys == 1 { "" } else { "s" })
        }
        Err(e) => return line("update", Level::Fail, e),
    };
    let flight = match dir.load() {
        Ok(p) => match p.job {
            Some(j) => format!("deployment {} at step {}", j.deployment, j.step.as_str()),
            None => "no update in flight".to_string(),
        },
        Err(e) => return line("update", Level::Fail, format!("update state: {e}")),
    };
    line("update", Level::Ok, format!("device type {}, {root}, {flight}", u.device_type))
}

fn check_clock(cfg: &Config, store: &Store) -> CheckLine {
    let t = now();
    if t < SANE_EPOCH {
        return line("clock", Level::Fail, format!("{} is before 2025: the clock is not set", fmt_time(t)));
    }
    for path in [cfg.ca_file.clone(), store.ca_path()] {
        if let Ok(pem) = std::fs::read(&path)
            && let Ok(ca) = CertInfo::from_pem(&pem, "CA")
            && t < ca.not_before
        {
            return line(
                "clock",
                Level::Fail,
                format!(
                    "{} is before the CA certificate's start {} ({})",
                    fmt_time(t),
                    fmt_time(ca.not_before),
                    path.display()
                ),
            );
        }
    }
    line("clock", Level::Ok, fmt_time(t))
}

/// Validity of the device certificate at `now`: FAIL outside it, warn under 30 days left.
pub fn check_certificate(cert_pem: &[u8], now: i64) -> CheckLine {
    let info = match CertInfo::from_pem(cert_pem, "device.crt") {
        Ok(i) => i,
        Err(e) => return line("certificate", Level::Fail, e.to_string()),
    };
    if now < info.not_before {
        return line("certificate", Level::Fail, format!("not valid before {}", fmt_time(info.not_before)));
    }
    if now >= info.not_after {
        return line("certificate", Level::Fail, format!("expired {}", fmt_time(info.not_after)));
    }
    let days = (info.not_after - now) / 86_400;
    let level = if days < 30 { Level::Warn } else { Level::Ok };
    line("certificate", level, format!("expires {} ({days} days)", fmt_time(info.not_after)))
}

fn check_server(cfg: &Config) -> CheckLine {
    let Some(url) = cfg.server_url.as_deref() else {
        return line("server", Level::Warn, "server_url not set (only needed to enroll)");
    };
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let hostport = rest.split('/').next().unwrap_or("");
    let default_port = if scheme == "https" { 443 } else { 80 };
    let Ok((host, port)) = config::split_host_port(hostport, default_port) else {
        return line("server", Level::Fail, format!("{url}: no host"));
    };
    if scheme == "http" {
        return match connect(&host, port) {
            Ok(_) => line("server", Level::Warn, format!("{url}: reachable, but plain http (development only)")),
            Err(e) => line("server", Level::Fail, format!("{url}: {e}")),
        };
    }
    let roots = match std::fs::read(&cfg.ca_file)
        .map_err(|e| format!("ca_file {}: {e}", cfg.ca_file.display()))
        .and_then(|pem| crate::tls::root_store(&[(&pem, "ca_file")]).map_err(|e| e.to_string()))
    {
        Ok(r) => r,
        Err(e) => return line("server", Level::Fail, e),
    };
    let tls = match crate::tls::client_config(roots, None) {
        Ok(c) => Arc::new(c),
        Err(e) => return line("server", Level::Fail, e.to_string()),
    };
    let ca = cfg.ca_file.display().to_string();
    match handshake(&host, port, tls, false, &Peer { what: "server", ca: &ca }) {
        Ok(()) => line("server", Level::Ok, format!("{url}: TLS verified against {ca}")),
        Err(e) => line("server", Level::Fail, format!("{url}: {e}")),
    }
}

fn check_broker(cfg: &Config, store: &Store, p: Option<&crate::store::Provisioned>) -> CheckLine {
    let target = format!("{}:{}", cfg.broker.host, cfg.broker.port);
    let pems = match crate::agent::broker_ca_pems(cfg, store) {
        Ok(p) => p,
        Err(e) => return line("broker", Level::Fail, e.to_string()),
    };
    let refs: Vec<(&[u8], &str)> = pems.iter().map(|(p, n)| (p.as_slice(), n.as_str())).collect();
    let ca = pems.iter().map(|(_, n)| n.as_str()).collect::<Vec<_>>().join(" or ");
    let tls = match p {
        Some(p) => crate::tls::mqtt_client_config(&refs, p.cert_pem.as_bytes(), &p.key),
        None => crate::tls::root_store(&refs).and_then(|r| crate::tls::client_config(r, None)).map(Arc::new),
    };
    let tls = match tls {
        Ok(t) => t,
        Err(e) => return line("broker", Level::Fail, e.to_string()),
    };
    let peer = Peer { what: "broker", ca: &ca };
    match (handshake(&cfg.broker.host, cfg.broker.port, tls, p.is_some(), &peer), p) {
        (Ok(()), Some(_)) => line("broker", Level::Ok, format!("{target}: mutual TLS accepted")),
        (Ok(()), None) => {
            line("broker", Level::Warn, format!("{target}: server verified; no device certificate to present yet"))
        }
        (Err(e), _) => line("broker", Level::Fail, format!("{target}: {e}")),
    }
}

fn connect(host: &str, port: u16) -> Result<TcpStream, String> {
    let addrs: Vec<_> = (host, port).to_socket_addrs().map_err(|e| format!("cannot resolve {host}: {e}"))?.collect();
    let mut last = format!("cannot resolve {host}");
    for a in addrs {
        match TcpStream::connect_timeout(&a, Duration::from_secs(5)) {
            Ok(s) => return Ok(s),
            Err(e) => last = e.to_string(),
        }
    }
    Err(last)
}

/// Who is on the other end of a handshake, for the error messages: `server` or `broker`, and
/// the CA file(s) its certificate was checked against.
struct Peer<'a> {
    what: &'a str,
    ca: &'a str,
}

/// A TLS handshake; with `client_auth`, waits a moment afterwards for the server's verdict on
/// the client certificate (in TLS 1.3 it comes after the client's side of the handshake). No
/// MQTT is spoken, so a running agent's session is not disturbed.
fn handshake(
    host: &str,
    port: u16,
    tls: Arc<rustls::ClientConfig>,
    client_auth: bool,
    peer: &Peer<'_>,
) -> Result<(), String> {
    let name = ServerName::try_from(host.to_string()).map_err(|e| format!("{host}: {e}"))?;
    let mut conn = rustls::ClientConnection::new(tls, name).map_err(|e| e.to_string())?;
    let mut sock = connect(host, port)?;
    let _ = sock.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = sock.set_write_timeout(Some(Duration::from_secs(5)));
    while conn.is_handshaking() {
        conn.complete_io(&mut sock).map_err(|e| tls_error(&e, peer))?;
    }
    if client_auth {
        let _ = sock.set_read_timeout(Some(Duration::from_millis(1000)));
        let mut buf = [0u8; 64];
        let mut stream = rustls::Stream::new(&mut conn, &mut sock);
        match stream.read(&mut buf) {
            Ok(0) => return Err("the server closed the connection after the handshake".into()),
            Ok(_) => {}
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(e) => return Err(tls_error(&e, peer)),
        }
    }
    Ok(())
}

fn tls_error(e: &std::io::Error, peer: &Peer<'_>) -> String {
    use rustls::CertificateError::{BadSignature, UnknownIssuer};
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        return "the server closed the connection during the TLS handshake".into();
    }
    // A certificate from another CA (UnknownIssuer), or from one of the same name but another
    // key (BadSignature): the usual cause is a ca_file of another server or an older fleet CA.
    if let Some(rustls::Error::InvalidCertificate(UnknownIssuer | BadSignature)) =
        e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>())
    {
        return format!(
            "the {}'s certificate is not signed by the CA in {} — is it this server's fleet CA (`droverd ca cert`)? ({e})",
            peer.what, peer.ca
        );
    }
    format!("TLS: {e}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(not_before: (i32, u8, u8), not_after: (i32, u8, u8)) -> String {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(vec!["x".to_string()]).unwrap();
        p.not_before = rcgen::date_time_ymd(not_before.0, not_before.1, not_before.2);
        p.not_after = rcgen::date_time_ymd(not_after.0, not_after.1, not_after.2);
        p.self_signed(&key).unwrap().pem()
    }

    /// Bad inputs: an expired certificate, one not valid yet, one about to expire, garbage.
    #[test]
    fn certificate_validity() {
        let now = 1_780_000_000; // 2026-05-28
        let c = check_certificate(cert((2026, 1, 1), (2027, 1, 1)).as_bytes(), now);
        assert_eq!(c.level, Level::Ok, "{c}");
        assert!(c.to_string().starts_with("ok   certificate  expires 2027-01-01"), "{c}");
        let c = check_certificate(cert((2026, 1, 1), (2026, 6, 10)).as_bytes(), now);
        assert_eq!(c.level, Level::Warn, "{c}");
        assert!(c.detail.contains("(12 days)"), "{c}");
        assert_eq!(check_certificate(cert((2025, 1, 1), (2026, 1, 1)).as_bytes(), now).level, Level::Fail);
        assert_eq!(check_certificate(cert((2027, 1, 1), (2028, 1, 1)).as_bytes(), now).level, Level::Fail);
        assert_eq!(check_certificate(b"nope", now).level, Level::Fail);
    }
}
