//! Types of the REST API under `/api/v1`.
//!
//! Request bodies reject unknown fields, so a typo in a field name is an error rather than a
//! silently ignored setting. Timestamps are RFC 3339 strings in UTC.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

#[cfg(feature = "openapi")]
use utoipa::{IntoParams, ToSchema};

/// The path prefix of every API route.
pub const API_PREFIX: &str = "/api/v1";

/// The body of every failed API request.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

/// What went wrong: a stable machine-readable `code` and a message for people.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct ErrorDetail {
    /// Stable identifier, e.g. `invalid_request`, `unauthorized`, `forbidden`, `not_found`.
    pub code: String,
    pub message: String,
}

/// A role within an organization.
///
/// - `admin`: everything.
/// - `operator`: devices, deployments and remote access; not users or tokens.
/// - `viewer`: reads everything, changes nothing.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[serde(rename_all = "lowercase")]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub enum Role {
    Viewer,
    Operator,
    Admin,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Admin, Role::Operator, Role::Viewer];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Operator => "operator",
            Role::Viewer => "viewer",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "admin" => Some(Role::Admin),
            "operator" => Some(Role::Operator),
            "viewer" => Some(Role::Viewer),
            _ => None,
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::parse(s).ok_or_else(|| format!("unknown role {s:?}: expected admin, operator or viewer"))
    }
}

/// One page of a listing. Pass `next_cursor` back as `cursor` to get the next page; it is
/// absent on the last page.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct Page<T> {
    pub items: Vec<T>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct Organization {
    pub id: String,
    pub name: String,
    pub created_at: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct UpdateOrganization {
    pub name: String,
}

/// A user's membership of the caller's organization.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct User {
    pub id: String,
    pub username: String,
    pub role: Role,
    pub disabled: bool,
    pub created_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_login_at: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct CreateUser {
    pub username: String,
    pub role: Role,
    /// Omit to have the server generate one; it is then returned once in the response.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct CreatedUser {
    pub user: User,
    /// Present only when the server generated the password; shown this once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generated_password: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct UpdateUser {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disabled: Option<bool>,
}

/// An administrator sets another user's password.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct SetPassword {
    pub password: String,
}

/// A signed-in user changes their own password.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct ChangePassword {
    pub current_password: String,
    pub new_password: String,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub enum PrincipalKind {
    User,
    Token,
    System,
    Device,
}

impl PrincipalKind {
    pub fn as_str(self) -> &'static str {
        match self {
            PrincipalKind::User => "user",
            PrincipalKind::Token => "token",
            PrincipalKind::System => "system",
            PrincipalKind::Device => "device",
        }
    }
}

/// Who the caller is.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct Me {
    pub kind: PrincipalKind,
    pub id: String,
    pub name: String,
    pub role: Role,
    pub organization: Organization,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct LoginRequest {
    pub username: String,
    pub password: String,
}

/// The answer to a successful `POST /api/v1/auth/login`; the session itself travels in an
/// HttpOnly cookie.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct LoginResponse {
    /// Send this as the `X-CSRF-Token` header with every change made through the session.
    pub csrf_token: String,
    pub me: Me,
}

/// An API token as listed: never its secret.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct ApiToken {
    pub id: String,
    pub name: String,
    pub role: Role,
    /// The first characters of the secret, to recognise a token without revealing it.
    pub prefix: String,
    pub created_at: String,
    pub created_by: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_used_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct CreateToken {
    pub name: String,
    pub role: Role,
    /// Days until the token expires; omit for a token that does not expire.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_in_days: Option<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct CreatedToken {
    pub token: ApiToken,
    /// The bearer secret. Shown this once; the server keeps only its hash.
    pub secret: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct Actor {
    pub kind: PrincipalKind,
    pub id: String,
    pub name: String,
}

/// One entry of the append-only, hash-chained audit log.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct AuditEntry {
    /// Position in the chain, increasing by one per entry across the whole server.
    pub seq: i64,
    pub at: String,
    pub actor: Actor,
    /// Dotted verb, e.g. `user.create`, `token.revoke`, `session.login`.
    pub action: String,
    pub target_kind: String,
    pub target_id: String,
    /// Where the request came from: a client address, `cli` or `system`.
    pub source: String,
    /// What changed, for people.
    pub summary: String,
    /// SHA-256 of this entry chained to the previous one (hex).
    pub hash: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct AuditVerification {
    pub ok: bool,
    /// Entries checked.
    pub checked: i64,
    /// The first entry whose hash does not match, when `ok` is false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_bad_seq: Option<i64>,
    pub message: String,
}

/// Query of `GET /api/v1/users`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(IntoParams))]
#[cfg_attr(feature = "openapi", into_params(parameter_in = Query))]
pub struct UserListQuery {
    /// Page size, 1 to 500 (default 50).
    pub limit: Option<u32>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
    /// `username`, `created_at`; prefix `-` for descending. Default `username`.
    pub sort: Option<String>,
    pub role: Option<Role>,
    /// Substring of the username.
    pub q: Option<String>,
    pub disabled: Option<bool>,
}

/// Query of `GET /api/v1/tokens`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(IntoParams))]
#[cfg_attr(feature = "openapi", into_params(parameter_in = Query))]
pub struct TokenListQuery {
    /// Page size, 1 to 500 (default 50).
    pub limit: Option<u32>,
    pub cursor: Option<String>,
    /// `created_at`, `name`; prefix `-` for descending. Default `-created_at`.
    pub sort: Option<String>,
    pub role: Option<Role>,
    /// Include revoked tokens (default false).
    pub include_revoked: Option<bool>,
}

/// Query of `GET /api/v1/audit`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(IntoParams))]
#[cfg_attr(feature = "openapi", into_params(parameter_in = Query))]
pub struct AuditListQuery {
    /// Page size, 1 to 500 (default 50).
    pub limit: Option<u32>,
    pub cursor: Option<String>,
    /// `seq` or `-seq` (default, newest first).
    pub sort: Option<String>,
    /// Exact action, or a prefix ending in `.` such as `user.`.
    pub action: Option<String>,
    /// Actor name (username or token name).
    pub actor: Option<String>,
    pub target_kind: Option<String>,
    pub target_id: Option<String>,
    /// RFC 3339 lower bound (inclusive).
    pub since: Option<String>,
    /// RFC 3339 upper bound (exclusive).
    pub until: Option<String>,
}

/// Where a device is in its life.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub enum DeviceStatus {
    /// Asked to enroll; waits for an operator.
    Pending,
    /// Has a certificate and may connect.
    Accepted,
    /// Refused by an operator; stays refused.
    Rejected,
    /// Retired: its certificate is revoked.
    Decommissioned,
}

impl DeviceStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceStatus::Pending => "pending",
            DeviceStatus::Accepted => "accepted",
            DeviceStatus::Rejected => "rejected",
            DeviceStatus::Decommissioned => "decommissioned",
        }
    }

    pub fn parse(s: &str) -> Option<DeviceStatus> {
        [DeviceStatus::Pending, DeviceStatus::Accepted, DeviceStatus::Rejected, DeviceStatus::Decommissioned]
            .into_iter()
            .find(|d| d.as_str() == s)
    }
}

/// `POST /api/v1/enroll`, sent by a device. Unauthenticated: the proof is the token, a
/// pre-authorized identity, or an operator's acceptance.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct EnrollRequest {
    /// PKCS#10 certificate signing request (PEM) for the key the device made.
    pub csr_pem: String,
    /// What identifies the hardware: serial number, MAC address… (1 to 16 attributes).
    pub identity: BTreeMap<String, String>,
    /// An enrollment token, for zero-touch provisioning.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct EnrollResponse {
    pub device_id: String,
    pub status: DeviceStatus,
    /// The device's certificate, once accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_pem: Option<String>,
    /// The fleet CA certificate: trust it for the server's endpoints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_pem: Option<String>,
    /// While pending: ask again (with the same CSR) after this many seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_secs: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct Device {
    pub id: String,
    /// What people call the device: its operator-set `name`, else the `hostname` from its
    /// inventory, else its identity's `serial`, else its id. Shown wherever a device is, and
    /// accepted by the CLI wherever a device id is.
    #[serde(default)]
    pub display_name: String,
    /// The name an operator gave it (`PATCH /api/v1/devices/{id}`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub status: DeviceStatus,
    pub identity: BTreeMap<String, String>,
    /// Operator-set labels (`PUT`/`PATCH /api/v1/devices/{id}/tags`).
    pub tags: BTreeMap<String, String>,
    /// `token:NAME`, `preauthorized` or `accepted:USER`.
    pub enrolled_via: String,
    pub created_at: String,
    pub updated_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_expires_at: Option<String>,
    /// Connected to the broker now.
    #[serde(default)]
    pub online: bool,
    /// When the device last sent anything.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen_at: Option<String>,
    /// The agent's name and version, from its hello.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    /// The software Drover installed and the device runs (from its hello and its last final
    /// update report).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub software: Option<crate::update::Software>,
    /// What the device said it can do in its last hello (see `device::CAPABILITIES`);
    /// absent when it never said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capabilities: Option<Vec<String>>,
}

/// `PATCH /api/v1/devices/{id}`: `name` set to a string renames the device, `null` clears the
/// operator's name (the display name falls back to the hostname or serial).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct DevicePatch {
    pub name: Option<String>,
}

/// Static or dynamic: members added by hand, or every device matching a filter.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub enum GroupKind {
    Static,
    Dynamic,
}

impl GroupKind {
    pub fn as_str(self) -> &'static str {
        match self {
            GroupKind::Static => "static",
            GroupKind::Dynamic => "dynamic",
        }
    }

    pub fn parse(s: &str) -> Option<GroupKind> {
        match s {
            "static" => Some(GroupKind::Static),
            "dynamic" => Some(GroupKind::Dynamic),
            _ => None,
        }
    }
}

/// A group a device belongs to.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct GroupRef {
    pub id: String,
    pub name: String,
    pub kind: GroupKind,
}

/// Something that happened to a device: `connected`, `disconnected`, `rebooted`,
/// `inventory changed`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct DeviceEvent {
    pub at: String,
    pub kind: String,
    pub detail: String,
}

/// One device with everything known about it (`GET /api/v1/devices/{id}`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct DeviceDetail {
    #[serde(flatten)]
    pub device: Device,
    /// The inventory the device last reported.
    pub attributes: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inventory_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connected_at: Option<String>,
    /// Static groups it is a member of, and dynamic groups whose filter it matches now.
    pub groups: Vec<GroupRef>,
    /// Newest first, at most 50.
    pub recent_events: Vec<DeviceEvent>,
    /// The artifact the device runs, when the server has it: name, version, provenance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact: Option<crate::deploy::Artifact>,
}

/// Query of `GET /api/v1/devices` (and of a group's devices).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(IntoParams))]
#[cfg_attr(feature = "openapi", into_params(parameter_in = Query))]
pub struct DeviceListQuery {
    /// Page size, 1 to 500 (default 50).
    pub limit: Option<u32>,
    pub cursor: Option<String>,
    /// `created_at` (default `-created_at`, newest first), `updated_at`, `last_seen_at`
    /// (never-seen devices count as oldest), `id`, `name` (the display name); prefix `-` for
    /// descending.
    pub sort: Option<String>,
    pub status: Option<DeviceStatus>,
    /// The filter language, e.g. `tag.region = "eu" and attr.arch = "aarch64" and online`
    /// (see docs/filters.md).
    pub filter: Option<String>,
    /// Substring of the device's display name, id or identity (serial, MAC…),
    /// case-insensitive.
    pub q: Option<String>,
    pub online: Option<bool>,
    /// Devices running this artifact: its id, `NAME` or `NAME@VERSION`.
    pub artifact: Option<String>,
    /// Devices running a build of this source commit (a full hash or a prefix of at least 7).
    pub commit: Option<String>,
}

/// `PUT /api/v1/devices/{id}/tags`: the device's whole tag set.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct ReplaceTags {
    pub tags: BTreeMap<String, String>,
}

/// `PATCH /api/v1/devices/{id}/tags`: set some tags and remove others.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct PatchTags {
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    #[serde(default)]
    pub remove: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct Group {
    pub id: String,
    pub name: String,
    pub kind: GroupKind,
    /// The filter of a dynamic group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<String>,
    pub description: String,
    pub created_by: String,
    pub created_at: String,
    pub updated_at: String,
    /// Members now (dynamic groups: devices matching now). Only on `GET /api/v1/groups/{id}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_count: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct CreateGroup {
    /// 1 to 100 printable characters, unique in the organization.
    pub name: String,
    pub kind: GroupKind,
    /// Required for a dynamic group, refused for a static one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<String>,
    #[serde(default)]
    pub description: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct UpdateGroup {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// A dynamic group's new filter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// Query of `GET /api/v1/groups`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(IntoParams))]
#[cfg_attr(feature = "openapi", into_params(parameter_in = Query))]
pub struct GroupListQuery {
    /// Page size, 1 to 500 (default 50).
    pub limit: Option<u32>,
    pub cursor: Option<String>,
    /// `name` (default), `created_at`; prefix `-` for descending.
    pub sort: Option<String>,
    pub kind: Option<GroupKind>,
}

/// `POST /api/v1/groups/{id}/devices`: devices to add to a static group (all or none).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct AddGroupDevices {
    pub devices: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct GroupDevicesAdded {
    /// Devices newly added.
    pub added: u32,
    /// Devices that were members already.
    pub already: u32,
}

/// Query of `GET /api/v1/groups/preview`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(IntoParams))]
#[cfg_attr(feature = "openapi", into_params(parameter_in = Query))]
pub struct GroupPreviewQuery {
    /// A filter to try, as a dynamic group would use it.
    pub filter: String,
}

/// What a filter matches now: how many devices, and the first few (newest first).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct GroupPreview {
    pub count: u64,
    /// At most 20.
    pub devices: Vec<Device>,
}

/// The answer to `POST /api/v1/devices/preauthorize/bulk`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct BulkPreauthorized {
    /// Identities pre-authorized (every line of the file).
    pub created: u32,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct CreateEnrollmentToken {
    pub name: String,
    /// How many devices may enroll with it; omit for no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_uses: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_in_days: Option<u32>,
    /// Tags every device enrolled with it starts with.
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// Static groups (by name) every device enrolled with it joins.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct EnrollmentToken {
    pub id: String,
    pub name: String,
    pub prefix: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_uses: Option<u32>,
    pub uses: u32,
    pub tags: BTreeMap<String, String>,
    /// Static groups (by name) devices enrolled with it join.
    #[serde(default)]
    pub groups: Vec<String>,
    pub created_by: String,
    pub created_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<String>,
}

/// Query of `GET /api/v1/enrollment-tokens` (newest first).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(IntoParams))]
#[cfg_attr(feature = "openapi", into_params(parameter_in = Query))]
pub struct EnrollmentTokenQuery {
    /// Page size, 1 to 500 (default 50).
    pub limit: Option<u32>,
    pub cursor: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct CreatedEnrollmentToken {
    pub token: EnrollmentToken,
    /// Shown this once; give it to the factory or bake it into the image.
    pub secret: String,
}

/// Devices an operator vouches for before they ask: each an identity as the device will send it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[derive(Default)]
pub struct Preauthorize {
    pub identities: Vec<BTreeMap<String, String>>,
    /// How many enrollments each pre-authorization admits (default 1: the device itself;
    /// more for hardware re-imaged in place), 1 to 1,000,000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_uses: Option<u32>,
    /// Days until the pre-authorizations lapse unused (default: never), 1 to 3650.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_in_days: Option<u32>,
}

/// Where a pre-authorization stands.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub enum PreauthorizationState {
    /// A device with this identity is accepted when it asks.
    Active,
    /// Every use taken (or consumed when its device was decommissioned).
    Used,
    Expired,
    Revoked,
}

impl PreauthorizationState {
    pub fn as_str(self) -> &'static str {
        match self {
            PreauthorizationState::Active => "active",
            PreauthorizationState::Used => "used",
            PreauthorizationState::Expired => "expired",
            PreauthorizationState::Revoked => "revoked",
        }
    }
}

/// An identity an operator vouched for (`GET /api/v1/preauthorizations`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct Preauthorization {
    pub id: String,
    pub identity: BTreeMap<String, String>,
    pub state: PreauthorizationState,
    pub max_uses: u32,
    pub uses: u32,
    pub created_by: String,
    pub created_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<String>,
}

/// Query of `GET /api/v1/preauthorizations` (newest first).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(IntoParams))]
#[cfg_attr(feature = "openapi", into_params(parameter_in = Query))]
pub struct PreauthorizationQuery {
    /// Page size, 1 to 500 (default 50).
    pub limit: Option<u32>,
    pub cursor: Option<String>,
    /// Only those in this state.
    pub state: Option<PreauthorizationState>,
    /// Substring of the identity (serial, MAC…), case-insensitive.
    pub q: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct Preauthorized {
    /// Identities newly pre-authorized.
    pub added: u32,
    /// Identities that were pre-authorized already.
    pub already: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_bodies_reject_unknown_fields() {
        let err = serde_json::from_str::<CreateToken>(r#"{"name":"ci","role":"admin","rol":"x"}"#).unwrap_err();
        assert!(err.to_string().contains("unknown field `rol`"), "{err}");
    }

    #[test]
    fn roles_are_lowercase_on_the_wire_and_ordered_by_power() {
        assert_eq!(serde_json::to_string(&Role::Operator).unwrap(), r#""operator""#);
        assert!(Role::Admin > Role::Operator && Role::Operator > Role::Viewer);
        assert_eq!("viewer".parse::<Role>().unwrap(), Role::Viewer);
        assert!("root".parse::<Role>().is_err());
    }
}
