//! REST types for software updates: artifacts (`/api/v1/artifacts`), deployments
//! (`/api/v1/deployments`) and the trust root the server hands to devices
//! (`/api/v1/trust-root`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

#[cfg(feature = "openapi")]
use utoipa::{IntoParams, ToSchema};

pub use crate::update::{Software, UpdateState};

/// One payload inside an artifact.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct ArtifactPayload {
    pub name: String,
    pub size: u64,
    pub sha256: String,
    /// `install` or `sbom`.
    pub role: String,
}

/// Where a build came from (all optional, as the release pipeline declared it in the signed
/// manifest).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct Provenance {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build_id: Option<String>,
    /// Name of the payload holding the SBOM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sbom: Option<String>,
}

/// An uploaded artifact (`docs/artifact-format.md`), addressed by the SHA-256 of its file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct Artifact {
    /// SHA-256 of the whole file, lowercase hex.
    pub id: String,
    pub name: String,
    pub version: String,
    pub device_types: Vec<String>,
    /// The update module that installs it: `file`, `app`, `script` or an external module.
    pub payload_type: String,
    /// Bytes of the whole file.
    pub size: u64,
    pub payloads: Vec<ArtifactPayload>,
    pub provides: BTreeMap<String, String>,
    pub depends: BTreeMap<String, Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provenance: Option<Provenance>,
    /// Key ids of the release keys that signed the manifest (verified on the device, not by
    /// the server, which holds no release key).
    pub signed_by: Vec<String>,
    pub uploaded_at: String,
    /// `user:NAME` or `token:NAME`.
    pub uploaded_by: String,
    /// Deployments that use it and are not finished; while above zero it cannot be deleted.
    pub active_deployments: u64,
}

/// Query of `GET /api/v1/artifacts`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(IntoParams))]
#[cfg_attr(feature = "openapi", into_params(parameter_in = Query))]
pub struct ArtifactListQuery {
    /// Page size, 1 to 500 (default 50).
    pub limit: Option<u32>,
    pub cursor: Option<String>,
    /// Only artifacts of this name.
    pub name: Option<String>,
}

/// `POST /api/v1/deployments`: exactly one of `devices`, `group` and `filter`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct CreateDeployment {
    /// Artifact id (SHA-256), or `NAME@VERSION`.
    pub artifact: String,
    /// Defaults to `NAME VERSION`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Device ids.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub devices: Option<Vec<String>>,
    /// A static or dynamic group, by name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// A device filter (docs/filters.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<String>,
}

/// A deployment as a whole.
///
/// - `active`: some devices have not reached a final state.
/// - `succeeded`: every device ended in `success` or `already-installed`.
/// - `failed`: finished, and at least one device ended otherwise (`failure`, `rolled-back`,
///   `incompatible`, or `aborted` because it was decommissioned mid-way).
/// - `aborted`: an operator aborted it.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub enum DeploymentStatus {
    Active,
    Succeeded,
    Failed,
    Aborted,
}

impl DeploymentStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            DeploymentStatus::Active => "active",
            DeploymentStatus::Succeeded => "succeeded",
            DeploymentStatus::Failed => "failed",
            DeploymentStatus::Aborted => "aborted",
        }
    }

    pub fn parse(s: &str) -> Option<DeploymentStatus> {
        [DeploymentStatus::Active, DeploymentStatus::Succeeded, DeploymentStatus::Failed, DeploymentStatus::Aborted]
            .into_iter()
            .find(|d| d.as_str() == s)
    }

    pub fn is_finished(self) -> bool {
        self != DeploymentStatus::Active
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct Deployment {
    pub id: String,
    pub name: String,
    pub artifact: ArtifactRef,
    /// How the devices were chosen: `devices`, `group:NAME` or `filter:EXPR`. The device set
    /// is fixed when the deployment is created.
    pub target: String,
    pub status: DeploymentStatus,
    pub created_at: String,
    pub created_by: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
    /// Devices in the deployment.
    pub total: u64,
    /// Devices per state (states with no device are left out).
    pub counts: BTreeMap<UpdateState, u64>,
}

/// The artifact of a deployment, in short.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct ArtifactRef {
    pub id: String,
    pub name: String,
    pub version: String,
}

/// Query of `GET /api/v1/deployments`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(IntoParams))]
#[cfg_attr(feature = "openapi", into_params(parameter_in = Query))]
pub struct DeploymentListQuery {
    pub limit: Option<u32>,
    pub cursor: Option<String>,
    pub status: Option<DeploymentStatus>,
}

/// One device in a deployment.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct DeploymentDevice {
    pub device_id: String,
    /// The device's display name (its name, hostname, serial or id).
    #[serde(default)]
    pub display_name: String,
    pub state: UpdateState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// A log was attached (`GET …/devices/{device_id}/log`).
    pub has_log: bool,
    pub updated_at: String,
}

/// Query of `GET /api/v1/deployments/{id}/devices`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(IntoParams))]
#[cfg_attr(feature = "openapi", into_params(parameter_in = Query))]
pub struct DeploymentDeviceQuery {
    pub limit: Option<u32>,
    pub cursor: Option<String>,
    pub state: Option<UpdateState>,
}

/// `GET /api/v1/deployments/{id}/devices/{device_id}/log`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct DeploymentDeviceLog {
    pub device_id: String,
    pub state: UpdateState,
    pub log: String,
}

/// What the server knows of the devices' trust root (`GET /api/v1/trust-root`). Devices get
/// the chain with every install command; a new root is uploaded with
/// `PUT /api/v1/trust-root` (the raw `root.json`) and must be signed by the current one.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct TrustRoot {
    pub version: u64,
    /// Key ids allowed to sign artifacts.
    pub release_keys: Vec<String>,
    pub revoked: Vec<String>,
    /// Every root version the server holds, oldest first.
    pub chain: Vec<u64>,
}
