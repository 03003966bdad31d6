//! Request and response types of the alerts API. Requests reject unknown fields.

use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

/// A comparison of a value with a threshold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub enum CmpOp {
    #[serde(rename = ">")]
    Gt,
    #[serde(rename = ">=")]
    Ge,
    #[serde(rename = "<")]
    Lt,
    #[serde(rename = "<=")]
    Le,
    #[serde(rename = "==")]
    Eq,
    #[serde(rename = "!=")]
    Ne,
}

impl CmpOp {
    pub fn as_str(self) -> &'static str {
        match self {
            CmpOp::Gt => ">",
            CmpOp::Ge => ">=",
            CmpOp::Lt => "<",
            CmpOp::Le => "<=",
            CmpOp::Eq => "=",
            CmpOp::Ne => "<>",
        }
    }

    pub fn symbol(self) -> &'static str {
        match self {
            CmpOp::Eq => "==",
            CmpOp::Ne => "!=",
            o => o.as_str(),
        }
    }

    pub fn holds(self, v: f64, t: f64) -> bool {
        match self {
            CmpOp::Gt => v > t,
            CmpOp::Ge => v >= t,
            CmpOp::Lt => v < t,
            CmpOp::Le => v <= t,
            CmpOp::Eq => v == t,
            CmpOp::Ne => v != t,
        }
    }
}

/// How the points of a window become one value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Aggregate {
    #[default]
    Avg,
    Min,
    Max,
    /// Every point of the window satisfies the comparison (and there is at least one).
    Every,
}

impl Aggregate {
    pub fn as_str(self) -> &'static str {
        match self {
            Aggregate::Avg => "avg",
            Aggregate::Min => "min",
            Aggregate::Max => "max",
            Aggregate::Every => "every",
        }
    }
}

/// What an absence rule watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AbsenceMode {
    /// Disconnected from the broker for longer than `minutes`.
    #[default]
    Offline,
    /// No telemetry point with a timestamp in the last `minutes`.
    Silent,
}

/// The condition of an alert rule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Condition {
    /// Per device: `aggregate(metric over the last window_s) op threshold`.
    Threshold {
        metric: String,
        op: CmpOp,
        threshold: f64,
        window_s: u64,
        #[serde(default)]
        aggregate: Aggregate,
    },
    /// Per device: offline or silent longer than `minutes`.
    Absence {
        #[serde(default)]
        mode: AbsenceMode,
        minutes: u64,
    },
    /// Per device: an event whose name matches `name` (`*` is any run of characters), of at
    /// least `min_severity`; the alert resolves `resolve_after_s` after the last match.
    Event {
        name: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        min_severity: Option<String>,
        #[serde(default = "default_resolve_after")]
        resolve_after_s: u64,
    },
    /// Fleet: the share of the selected devices that are offline is above `percent`.
    FleetOffline { percent: f64 },
    /// Fleet: `aggregate` (avg, min or max) of `metric` over every selected device's points
    /// of the last `window_s`, compared with `threshold`.
    FleetMetric {
        metric: String,
        op: CmpOp,
        threshold: f64,
        window_s: u64,
        #[serde(default)]
        aggregate: Aggregate,
    },
}

fn default_resolve_after() -> u64 {
    300
}

impl Condition {
    pub fn is_fleet(&self) -> bool {
        matches!(self, Condition::FleetOffline { .. } | Condition::FleetMetric { .. })
    }

    /// A one-line description, e.g. `avg(cpu.percent) > 90 over 5m`.
    pub fn describe(&self) -> String {
        match self {
            Condition::Threshold { metric, op, threshold, window_s, aggregate }
            | Condition::FleetMetric { metric, op, threshold, window_s, aggregate } => {
                let fleet = if self.is_fleet() { "fleet " } else { "" };
                format!("{fleet}{}({metric}) {} {threshold} over {}", aggregate.as_str(), op.symbol(), dur(*window_s))
            }
            Condition::Absence { mode: AbsenceMode::Offline, minutes } => format!("offline for more than {minutes}m"),
            Condition::Absence { mode: AbsenceMode::Silent, minutes } => {
                format!("no telemetry for more than {minutes}m")
            }
            Condition::Event { name, min_severity, .. } => match min_severity {
                Some(s) => format!("event {name} (severity {s} or higher)"),
                None => format!("event {name}"),
            },
            Condition::FleetOffline { percent } => format!("more than {percent}% of the devices offline"),
        }
    }
}

fn dur(s: u64) -> String {
    if s.is_multiple_of(3600) && s > 0 {
        format!("{}h", s / 3600)
    } else if s.is_multiple_of(60) && s > 0 {
        format!("{}m", s / 60)
    } else {
        format!("{s}s")
    }
}

fn default_true() -> bool {
    true
}
fn default_severity() -> String {
    "warning".into()
}
fn default_flap_window() -> u64 {
    600
}
fn default_flap_changes() -> u64 {
    4
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateAlertRule {
    pub name: String,
    /// info, warning (default) or critical.
    #[serde(default = "default_severity")]
    pub severity: String,
    /// Which devices the rule watches (docs/filters.md); none: every accepted device.
    #[serde(default)]
    pub filter: Option<String>,
    /// Or: the devices of this group (id), static or dynamic; with `filter`, both must match.
    #[serde(default)]
    pub group: Option<String>,
    pub condition: Condition,
    /// How long the condition must hold before the alert fires (pending until then).
    #[serde(default)]
    pub pending_s: u64,
    /// Flap suppression: `flap_changes` state changes within `flap_window_s` make the alert
    /// flapping (one notification) until it stays put for `flap_window_s`.
    #[serde(default = "default_flap_window")]
    pub flap_window_s: u64,
    #[serde(default = "default_flap_changes")]
    pub flap_changes: u64,
    /// Notification channel ids.
    #[serde(default)]
    pub channels: Vec<String>,
    #[serde(default = "default_true")]
    pub enabled: bool,
}

/// A change to a rule: the fields given are replaced.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateAlertRule {
    pub name: Option<String>,
    pub severity: Option<String>,
    /// An empty string removes the filter.
    pub filter: Option<String>,
    pub condition: Option<Condition>,
    pub pending_s: Option<u64>,
    pub channels: Option<Vec<String>>,
    pub enabled: Option<bool>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct AlertRule {
    pub id: String,
    pub name: String,
    pub severity: String,
    pub filter: Option<String>,
    pub group: Option<String>,
    pub condition: Condition,
    /// The condition in words.
    pub description: String,
    pub pending_s: u64,
    pub flap_window_s: u64,
    pub flap_changes: u64,
    pub channels: Vec<String>,
    pub enabled: bool,
    pub created_by: String,
    pub created_at: String,
    pub updated_at: String,
}

/// The state of one alert: a rule and a device (or the fleet).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Alert {
    pub rule_id: String,
    pub rule_name: String,
    pub severity: String,
    /// The device, or null for a fleet-level rule.
    pub device_id: Option<String>,
    /// pending, firing or resolved.
    pub state: String,
    /// True while flap suppression holds its notifications back.
    pub flapping: bool,
    /// True when an active silence matches it.
    pub silenced: bool,
    pub since: String,
    pub fired_at: Option<String>,
    pub resolved_at: Option<String>,
    pub value: Option<f64>,
    pub message: String,
}

#[derive(Debug, Clone, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct AlertListQuery {
    /// pending, firing or resolved; default: all but resolved.
    pub state: Option<String>,
    pub rule: Option<String>,
    /// Page size, 1 to 500 (default 200).
    pub limit: Option<u32>,
    pub cursor: Option<String>,
}

/// One entry of the alert history.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AlertHistoryEntry {
    pub id: String,
    pub rule_id: String,
    pub rule_name: String,
    pub device_id: Option<String>,
    pub at: String,
    /// pending, firing, resolved, flapping, flapping_ended, late_event.
    pub event: String,
    pub message: String,
}

#[derive(Debug, Clone, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct HistoryQuery {
    pub rule: Option<String>,
    pub device: Option<String>,
    /// Newest first; `cursor` from the last page's `next_cursor`.
    pub limit: Option<u32>,
    pub cursor: Option<String>,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSilence {
    /// The rule it mutes; none: every rule.
    #[serde(default)]
    pub rule: Option<String>,
    /// The devices it mutes (a filter); none: every device and the fleet-level alerts.
    #[serde(default)]
    pub filter: Option<String>,
    /// RFC 3339; default: now.
    #[serde(default)]
    pub starts_at: Option<String>,
    /// RFC 3339, or give `duration_s`.
    #[serde(default)]
    pub ends_at: Option<String>,
    #[serde(default)]
    pub duration_s: Option<u64>,
    pub reason: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Silence {
    pub id: String,
    pub rule: Option<String>,
    pub filter: Option<String>,
    pub starts_at: String,
    pub ends_at: String,
    pub reason: String,
    pub created_by: String,
    pub created_at: String,
    pub active: bool,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateChannel {
    pub name: String,
    /// webhook, slack or email.
    pub kind: String,
    /// The URL (webhook, slack) or the comma-separated addresses (email).
    pub target: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Channel {
    pub id: String,
    pub name: String,
    pub kind: String,
    /// The addresses of an email channel; a webhook's URL shown as scheme and host only
    /// (its path is often a credential).
    pub target: String,
    pub created_by: String,
    pub created_at: String,
}

/// A new channel. A webhook channel's signing secret is in `secret`, shown this once.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CreatedChannel {
    #[serde(flatten)]
    pub channel: Channel,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
}

/// One notification and how its delivery went.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Delivery {
    pub id: String,
    pub channel_id: String,
    pub channel_name: String,
    pub rule_id: String,
    pub device_id: Option<String>,
    /// firing, resolved, flapping or test.
    pub event: String,
    /// pending, sent, failed or silenced.
    pub status: String,
    pub attempts: u64,
    pub last_error: Option<String>,
    pub created_at: String,
    pub sent_at: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct DeliveryQuery {
    pub channel: Option<String>,
    pub rule: Option<String>,
    pub limit: Option<u32>,
}

/// The device rule set of a group (the agent evaluates these rules itself).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DeviceRuleSet {
    pub group_id: String,
    pub group_name: String,
    /// Increases with every change.
    pub version: u64,
    /// The rules, as in `down/rules` (docs/protocol.md).
    #[schema(value_type = Vec<Object>)]
    pub rules: Vec<drover_proto::telemetry::Rule>,
    pub updated_by: String,
    pub updated_at: String,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PutDeviceRuleSet {
    #[schema(value_type = Vec<Object>)]
    pub rules: Vec<drover_proto::telemetry::Rule>,
}

/// What a device gets: the merged rule set of its groups, and what it last said it applied.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DeviceRulesView {
    pub device_id: String,
    /// The version last sent to the device (0: never).
    pub version: u64,
    #[schema(value_type = Vec<Object>)]
    pub rules: Vec<drover_proto::telemetry::Rule>,
    /// Group names the rules come from, in merge order.
    pub groups: Vec<String>,
    /// Rule ids defined by more than one group, with the group whose rule won.
    pub conflicts: Vec<String>,
    /// The version in the device's last `drover.rules.applied` event.
    pub applied_version: Option<u64>,
    pub applied_at: Option<String>,
}
