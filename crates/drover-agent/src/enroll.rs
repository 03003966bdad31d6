//! Enrollment: send a CSR and identity to `POST /api/v1/enroll`, wait while pending, and come
//! back with a certificate. No files here — the caller decides where the key and the
//! certificate live (the agent: `data_dir`; the simulator: memory).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use drover_proto::api::{DeviceStatus, EnrollRequest, EnrollResponse, ErrorBody};

use crate::backoff::{Backoff, BackoffPolicy};
use crate::tls::{CertInfo, DeviceKey};

#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    /// Bad client configuration (URL, CA file).
    #[error("{0}")]
    Config(String),
    /// The server could not be reached or answered garbage; worth retrying.
    #[error("cannot reach the enrollment endpoint: {0}")]
    Transport(String),
    /// The server said no; asking again will not help.
    #[error("enrollment refused (HTTP {status}, {code}): {message}")]
    Refused { status: u16, code: String, message: String },
    /// The device is rejected or decommissioned.
    #[error("device {device_id} is {status}: an operator must act before it can enroll")]
    NotAllowed { device_id: String, status: String },
    /// The answer did not make sense (e.g. a certificate for another key).
    #[error("unexpected answer from the enrollment endpoint: {0}")]
    Protocol(String),
}

impl EnrollError {
    /// Whether waiting and asking again could succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            EnrollError::Transport(_) => true,
            EnrollError::Refused { status, .. } => *status >= 500 || *status == 429,
            _ => false,
        }
    }
}

/// Where and how to reach the enrollment endpoint.
#[derive(Clone, Debug)]
pub struct EnrollClient {
    path: String,
    http: crate::http::Client,
}

impl EnrollClient {
    /// `server_url` is the base (`https://host:8443`); `ca_pem` the CA that signed the
    /// server's certificate, required for `https://`. `http://` is for development only.
    pub fn new(server_url: &str, ca_pem: Option<&[u8]>) -> Result<EnrollClient, EnrollError> {
        let base = server_url.trim_end_matches('/');
        let tls = if base.starts_with("https://") {
            let pem = ca_pem.ok_or_else(|| EnrollError::Config("https:// needs a CA certificate (ca_file)".into()))?;
            let roots = crate::tls::root_store(&[(pem, "ca_file")]).map_err(|e| EnrollError::Config(e.to_string()))?;
            let cfg = crate::tls::client_config(roots, None).map_err(|e| EnrollError::Config(e.to_string()))?;
            Some(std::sync::Arc::new(cfg))
        } else if base.starts_with("http://") {
            tracing::warn!(url = base, "enrolling over plain http://: only for development");
            None
        } else {
            return Err(EnrollError::Config(format!("server_url {base:?} must start with https:// or http://")));
        };
        let mut http = crate::http::Client::new(base, tls).map_err(EnrollError::Config)?;
        http.io_timeout = Duration::from_secs(30);
        Ok(EnrollClient { path: format!("{}/enroll", drover_proto::api::API_PREFIX), http })
    }

    /// One request, blocking. Prefer [`enroll`], which waits and polls.
    pub fn request(&self, req: &EnrollRequest) -> Result<Outcome, EnrollError> {
        let body = serde_json::to_vec(req).map_err(|e| EnrollError::Protocol(e.to_string()))?;
        let resp = self
            .http
            .request("POST", &self.path, &[("Content-Type", "application/json")], Some(&body))
            .map_err(|e| EnrollError::Transport(e.to_string()))?;
        let status = resp.status;
        let text = resp.read_to_string(256 * 1024).map_err(|e| EnrollError::Transport(e.to_string()))?;
        interpret(status, &text)
    }
}

/// What one enrollment request came back with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Accepted(Enrolled),
    Pending { device_id: String, retry_after: Duration },
}

/// A device with a certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Enrolled {
    pub device_id: String,
    pub certificate_pem: String,
    pub ca_pem: String,
}

/// Turns an HTTP answer into an outcome. Pure.
pub fn interpret(status: u16, body: &str) -> Result<Outcome, EnrollError> {
    if !(200..300).contains(&status) {
        let (code, message) = match serde_json::from_str::<ErrorBody>(body) {
            Ok(e) => (e.error.code, e.error.message),
            Err(_) => ("unknown".to_string(), body.chars().take(200).collect()),
        };
        return Err(EnrollError::Refused { status, code, message });
    }
    let r: EnrollResponse = serde_json::from_str(body).map_err(|e| EnrollError::Protocol(e.to_string()))?;
    match r.status {
        DeviceStatus::Accepted => {
            let (Some(certificate_pem), Some(ca_pem)) = (r.certificate_pem, r.ca_pem) else {
                return Err(EnrollError::Protocol("accepted without certificate_pem and ca_pem".into()));
            };
            Ok(Outcome::Accepted(Enrolled { device_id: r.device_id, certificate_pem, ca_pem }))
        }
        DeviceStatus::Pending => Ok(Outcome::Pending {
            device_id: r.device_id,
            retry_after: Duration::from_secs(r.retry_after_secs.unwrap_or(60).clamp(5, 3600)),
        }),
        other => Err(EnrollError::NotAllowed { device_id: r.device_id, status: other.as_str().to_string() }),
    }
}

/// Enrolls: asks, waits `retry_after_secs` while pending (always with the same CSR), retries
/// transport failures with jittered backoff, and returns the certificate once accepted. Gives up
/// at once when the server refuses (4xx) or the device is rejected or decommissioned.
///
/// The certificate is checked: it must be for `key` and name the device id in its CN.
pub async fn enroll(
    client: &EnrollClient,
    key: &DeviceKey,
    identity: &BTreeMap<String, String>,
    token: Option<&str>,
) -> Result<Enrolled, EnrollError> {
    let req = Arc::new(EnrollRequest {
        csr_pem: key.csr_pem().map_err(|e| EnrollError::Config(e.to_string()))?,
        identity: identity.clone(),
        token: token.map(str::to_string),
    });
    let mut backoff = Backoff::new(BackoffPolicy::default());
    loop {
        let (c, r) = (client.clone(), req.clone());
        let outcome = tokio::task::spawn_blocking(move || c.request(&r))
            .await
            .map_err(|e| EnrollError::Transport(format!("enrollment task: {e}")))?;
        match outcome {
            Ok(Outcome::Accepted(enrolled)) => {
                check_certificate(&enrolled, key)?;
                tracing::info!(device_id = %enrolled.device_id, "enrolled");
                return Ok(enrolled);
            }
            Ok(Outcome::Pending { device_id, retry_after }) => {
                tracing::info!(%device_id, "enrollment pending until an operator accepts; asking again in {}s", retry_after.as_secs());
                backoff = Backoff::new(BackoffPolicy::default());
                tokio::time::sleep(retry_after).await;
            }
            Err(e) if e.is_retryable() => {
                let wait = backoff.next_delay(None, rand::random::<f64>()).max(Duration::from_millis(200));
                tracing::warn!("{e}; retrying in {:.1}s", wait.as_secs_f64());
                tokio::time::sleep(wait).await;
            }
            Err(e) => return Err(e),
        }
    }
}

fn check_certificate(enrolled: &Enrolled, key: &DeviceKey) -> Result<(), EnrollError> {
    let info = CertInfo::from_pem(enrolled.certificate_pem.as_bytes(), "certificate_pem")
        .map_err(|e| EnrollError::Protocol(e.to_string()))?;
    if info.public_key_raw != key.public_key_raw() {
        return Err(EnrollError::Protocol("the certificate is not for this device's key".into()));
    }
    if info.common_name.as_deref() != Some(enrolled.device_id.as_str()) {
        return Err(EnrollError::Protocol(format!(
            "the certificate names {:?}, not device {:?}",
            info.common_name, enrolled.device_id
        )));
    }
    crate::tls::certs_from_pem(enrolled.ca_pem.as_bytes(), "ca_pem")
        .map_err(|e| EnrollError::Protocol(e.to_string()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bad inputs: every refusal status, a rejected and a decommissioned device, an accepted
    /// answer without a certificate, a non-JSON body.
    #[test]
    fn answers_are_interpreted() {
        let ok = r#"{"device_id":"d1","status":"accepted","certificate_pem":"C","ca_pem":"A"}"#;
        assert_eq!(
            interpret(200, ok).unwrap(),
            Outcome::Accepted(Enrolled { device_id: "d1".into(), certificate_pem: "C".into(), ca_pem: "A".into() })
        );
        let pending = r#"{"device_id":"d1","status":"pending","retry_after_secs":60}"#;
        assert_eq!(
            interpret(202, pending).unwrap(),
            Outcome::Pending { device_id: "d1".into(), retry_after: Duration::from_secs(60) }
        );
        // A server asking for a zero wait does not make the device hammer it.
        let hammer = r#"{"device_id":"d1","status":"pending","retry_after_secs":0}"#;
        assert!(
            matches!(interpret(202, hammer).unwrap(), Outcome::Pending { retry_after, .. } if retry_after.as_secs() == 5)
        );
        for s in ["rejected", "decommissioned"] {
            let body = format!(r#"{{"device_id":"d1","status":"{s}"}}"#);
            let err = interpret(200, &body).unwrap_err();
            assert!(!err.is_retryable());
            assert!(err.to_string().contains(s), "{err}");
        }
        for status in [400, 401, 403, 409] {
            let err = interpret(status, r#"{"error":{"code":"forbidden","message":"token used up"}}"#).unwrap_err();
            assert!(!err.is_retryable(), "{status}");
            assert!(err.to_string().contains("token used up"), "{err}");
        }
        assert!(interpret(503, "<html>busy</html>").unwrap_err().is_retryable());
        assert!(matches!(interpret(200, r#"{"device_id":"d1","status":"accepted"}"#), Err(EnrollError::Protocol(_))));
        assert!(matches!(interpret(200, "nope"), Err(EnrollError::Protocol(_))));
    }

    /// Bad inputs: https without a CA, an unsupported scheme.
    #[test]
    fn client_configuration_errors() {
        crate::tls::install_default_provider();
        assert!(EnrollClient::new("https://x:8443", None).unwrap_err().to_string().contains("ca_file"));
        assert!(EnrollClient::new("ftp://x", None).is_err());
        assert!(EnrollClient::new("https://x:8443", Some(b"junk")).is_err());
        assert!(EnrollClient::new("http://127.0.0.1:1", None).is_ok());
    }
}
