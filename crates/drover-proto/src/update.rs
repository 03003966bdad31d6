//! The update protocol between the server and a device (`docs/protocol.md`, "Updates").
//!
//! - `down/update` (server → device, QoS 1): [`UpdateCommand`] — install an artifact for a
//!   deployment, or abort one. The server sends it when the deployment starts, and again
//!   every time the device says `hello` while the deployment is unfinished for it, so a device
//!   that was offline (or a broker without stored sessions) still gets it. Commands are
//!   idempotent: a device answers a repeated `install` with its current [`UpdateReport`].
//! - `up/update` (device → server, QoS 1): [`UpdateReport`] — the device's state for one
//!   deployment, sent on every transition, every few seconds of download progress, and again
//!   after each reconnect until the deployment has a final state.
//!
//! The device downloads the artifact over HTTPS from `GET {server_url}{ArtifactOffer::path}`
//! with its own client certificate and `Range` to resume; the server serves it only to devices
//! the artifact is deployed to.

use serde::{Deserialize, Serialize};

#[cfg(feature = "openapi")]
use utoipa::ToSchema;

/// Longest `message` in a report, in bytes.
pub const MAX_REPORT_MESSAGE: usize = 1024;
/// Longest `log` in a report, in bytes: the tail of the agent's update log.
pub const MAX_REPORT_LOG: usize = 64 * 1024;

/// Where one device stands in one deployment.
///
/// The happy path is `pending → downloading → installing → rebooting → verifying → success`
/// (`rebooting` only when the update module asks for a reboot). The final states are
/// `success`, `failure`, `rolled-back`, `already-installed`, `incompatible` and `aborted`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub enum UpdateState {
    /// Waiting for the device: not yet sent, offline, or another deployment is still running
    /// on it (a device never runs two installs at once).
    Pending,
    Downloading,
    Installing,
    Rebooting,
    /// Back after the install (and reboot): checking the connection to the server and the
    /// health-check command before committing.
    Verifying,
    Success,
    /// Refused or failed before anything was changed (bad signature, digest mismatch, download
    /// error, a state hook's veto that never cleared) — the device runs what it ran before.
    Failure,
    /// Installed, then failed verification (or crashed mid-install) and was rolled back to the
    /// previous version.
    RolledBack,
    /// The device already runs this artifact; nothing was done.
    AlreadyInstalled,
    /// The artifact is not for this device type, or its `depends` are not met.
    Incompatible,
    /// Aborted by an operator before the install started.
    Aborted,
}

impl UpdateState {
    pub const ALL: [UpdateState; 11] = [
        UpdateState::Pending,
        UpdateState::Downloading,
        UpdateState::Installing,
        UpdateState::Rebooting,
        UpdateState::Verifying,
        UpdateState::Success,
        UpdateState::Failure,
        UpdateState::RolledBack,
        UpdateState::AlreadyInstalled,
        UpdateState::Incompatible,
        UpdateState::Aborted,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            UpdateState::Pending => "pending",
            UpdateState::Downloading => "downloading",
            UpdateState::Installing => "installing",
            UpdateState::Rebooting => "rebooting",
            UpdateState::Verifying => "verifying",
            UpdateState::Success => "success",
            UpdateState::Failure => "failure",
            UpdateState::RolledBack => "rolled-back",
            UpdateState::AlreadyInstalled => "already-installed",
            UpdateState::Incompatible => "incompatible",
            UpdateState::Aborted => "aborted",
        }
    }

    pub fn parse(s: &str) -> Option<UpdateState> {
        UpdateState::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// No further change will come for this device in this deployment.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            UpdateState::Success
                | UpdateState::Failure
                | UpdateState::RolledBack
                | UpdateState::AlreadyInstalled
                | UpdateState::Incompatible
                | UpdateState::Aborted
        )
    }

    /// A final state that counts against the deployment.
    pub fn is_failed(self) -> bool {
        matches!(self, UpdateState::Failure | UpdateState::RolledBack | UpdateState::Incompatible)
    }

    /// The device has started changing itself: an abort no longer stops it.
    pub fn past_point_of_no_return(self) -> bool {
        matches!(self, UpdateState::Installing | UpdateState::Rebooting | UpdateState::Verifying)
    }
}

impl std::fmt::Display for UpdateState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for UpdateState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        UpdateState::parse(s).ok_or_else(|| format!("unknown update state {s:?}"))
    }
}

/// The artifact a device is asked to install.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactOffer {
    /// SHA-256 of the whole artifact file, lowercase hex: its content address.
    pub id: String,
    pub name: String,
    pub version: String,
    /// Bytes of the whole file.
    pub size: u64,
    /// Path on the server's device endpoint, e.g. `/device/v1/artifacts/{id}`; the device
    /// joins it to its `server_url`.
    pub path: String,
}

/// On `down/update`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateCommand {
    pub v: u32,
    pub deployment: String,
    #[serde(flatten)]
    pub action: UpdateAction,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "lowercase")]
pub enum UpdateAction {
    /// Download, verify and install. `roots` are the signed trust roots the server knows
    /// (`root.json` documents, oldest first); the device applies those newer than its own
    /// in order before it verifies the artifact.
    Install {
        artifact: ArtifactOffer,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        roots: Vec<String>,
    },
    /// Stop this deployment if the install has not started; after that the device finishes
    /// (or rolls back) and reports as usual.
    Abort,
}

/// What a device runs, as far as Drover installed it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct Software {
    /// The artifact's content address, when Drover installed it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact: Option<String>,
    pub name: String,
    pub version: String,
}

/// On `up/update`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateReport {
    pub v: u32,
    pub deployment: String,
    pub state: UpdateState,
    /// Download progress: bytes on the device so far, and of the whole artifact.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total: Option<u64>,
    /// One line on why (failure, incompatible, rolled-back), at most 1 KiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The tail of the device's log of this update, at most 64 KiB; sent with final states
    /// other than `success`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log: Option<String>,
    /// What the device runs now; sent with final states.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub software: Option<Software>,
}

impl UpdateReport {
    pub fn new(deployment: impl Into<String>, state: UpdateState) -> Self {
        UpdateReport {
            v: crate::device::PROTOCOL_VERSION,
            deployment: deployment.into(),
            state,
            bytes: None,
            total: None,
            message: None,
            log: None,
            software: None,
        }
    }

    /// Limits a device must keep; the server refuses a report outside them.
    pub fn check(&self) -> Result<(), String> {
        if self.deployment.is_empty() || self.deployment.len() > 64 {
            return Err("deployment must be 1 to 64 bytes".into());
        }
        if self.message.as_ref().is_some_and(|m| m.len() > MAX_REPORT_MESSAGE) {
            return Err(format!("message over {MAX_REPORT_MESSAGE} bytes"));
        }
        if self.log.as_ref().is_some_and(|l| l.len() > MAX_REPORT_LOG) {
            return Err(format!("log over {MAX_REPORT_LOG} bytes"));
        }
        if let Some(s) = &self.software {
            check_software(s)?;
        }
        Ok(())
    }
}

pub fn check_software(s: &Software) -> Result<(), String> {
    let ok = |x: &str| !x.is_empty() && x.len() <= 128 && !x.chars().any(char::is_control);
    if !ok(&s.name) || !ok(&s.version) {
        return Err("software name and version must be 1 to 128 bytes without control characters".into());
    }
    if s.artifact.as_ref().is_some_and(|a| !is_sha256_hex(a)) {
        return Err("software.artifact must be 64 lowercase hex digits".into());
    }
    Ok(())
}

/// 64 lowercase hex digits.
pub fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Cuts `text` to its last `max` bytes at a character boundary (for report logs).
pub fn tail(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut start = text.len() - max;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The examples in docs/protocol.md, verbatim.
    #[test]
    fn documented_examples_round_trip() {
        let install = r#"{"v":1,"deployment":"0193f2c4-7e1a-7b2e-9c1d-2f6a1b3c4d5e","action":"install","artifact":{"id":"9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08","name":"edge-app","version":"1.4.2","size":20971520,"path":"/device/v1/artifacts/9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"}}"#;
        let cmd: UpdateCommand = serde_json::from_str(install).unwrap();
        let UpdateAction::Install { artifact, roots } = &cmd.action else { panic!("{cmd:?}") };
        assert_eq!(artifact.size, 20971520);
        assert!(roots.is_empty());
        assert_eq!(serde_json::to_string(&cmd).unwrap(), install);

        let abort = r#"{"v":1,"deployment":"0193f2c4-7e1a-7b2e-9c1d-2f6a1b3c4d5e","action":"abort"}"#;
        let cmd: UpdateCommand = serde_json::from_str(abort).unwrap();
        assert_eq!(cmd.action, UpdateAction::Abort);
        assert_eq!(serde_json::to_string(&cmd).unwrap(), abort);

        let progress = r#"{"v":1,"deployment":"0193f2c4-7e1a-7b2e-9c1d-2f6a1b3c4d5e","state":"downloading","bytes":1048576,"total":20971520}"#;
        let r: UpdateReport = serde_json::from_str(progress).unwrap();
        assert_eq!(r.state, UpdateState::Downloading);
        assert_eq!(serde_json::to_string(&r).unwrap(), progress);

        let rolled = r#"{"v":1,"deployment":"0193f2c4-7e1a-7b2e-9c1d-2f6a1b3c4d5e","state":"rolled-back","message":"health check failed: exit status 1","log":"…","software":{"artifact":"5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8","name":"edge-app","version":"1.4.1"}}"#;
        let r: UpdateReport = serde_json::from_str(rolled).unwrap();
        assert_eq!(r.state, UpdateState::RolledBack);
        assert!(r.check().is_ok());
        assert_eq!(serde_json::to_string(&r).unwrap(), rolled);
    }

    #[test]
    fn states() {
        for s in UpdateState::ALL {
            assert_eq!(UpdateState::parse(s.as_str()), Some(s));
            assert_eq!(serde_json::to_string(&s).unwrap(), format!("\"{s}\""));
        }
        assert!(UpdateState::RolledBack.is_final() && UpdateState::RolledBack.is_failed());
        assert!(!UpdateState::Verifying.is_final());
        assert!(UpdateState::AlreadyInstalled.is_final() && !UpdateState::AlreadyInstalled.is_failed());
        assert!(UpdateState::Installing.past_point_of_no_return());
        assert!(!UpdateState::Downloading.past_point_of_no_return());
    }

    #[test]
    fn report_limits() {
        let mut r = UpdateReport::new("d1", UpdateState::Failure);
        r.message = Some("x".repeat(MAX_REPORT_MESSAGE + 1));
        assert!(r.check().unwrap_err().contains("message"));
        r.message = None;
        r.software = Some(Software { artifact: Some("XYZ".into()), name: "a".into(), version: "1".into() });
        assert!(r.check().unwrap_err().contains("artifact"));
        assert!(UpdateReport::new("", UpdateState::Failure).check().is_err());
        assert_eq!(tail("héllo", 4), "llo");
        assert_eq!(tail("abc", 10), "abc");
    }
}
