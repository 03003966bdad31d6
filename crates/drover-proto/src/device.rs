//! The device protocol: MQTT topics and the JSON messages on them, as specified for firmware
//! authors in `docs/protocol.md`. Every type here round-trips through that document's
//! examples (see the tests).
//!
//! All topics of one device live under `drover/v1/d/{device_id}/`; `up/…` is what the device
//! publishes, `down/…` what it subscribes to. The broker lets a device use only its own prefix.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The version of this contract, sent as `v` in every message.
pub const PROTOCOL_VERSION: u32 = 1;

/// The root of every Drover topic.
pub const TOPIC_ROOT: &str = "drover/v1/d";

/// Largest message on any topic, in bytes ("largest message" in `docs/protocol.md`): a
/// larger uplink is refused before it is parsed.
pub const MAX_MESSAGE_BYTES: usize = 256 * 1024;

/// Longest accepted inventory: attributes, and bytes of one key or value.
pub const MAX_INVENTORY_ATTRIBUTES: usize = 256;
pub const MAX_ATTRIBUTE_KEY_LEN: usize = 64;
pub const MAX_ATTRIBUTE_VALUE_LEN: usize = 1024;

/// The MQTT delivery guarantee a message kind uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Qos {
    AtMostOnce = 0,
    AtLeastOnce = 1,
}

/// The kinds of topic under a device's prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Channel {
    /// `up/status`, retained: `online` after connecting; the broker publishes the last will
    /// `offline` when the connection dies.
    Status,
    /// `up/hello`: once per connection, who the agent is.
    Hello,
    /// `up/inventory`: the device's attributes, on connect and whenever they change.
    Inventory,
    /// `up/heartbeat`: liveness between other traffic.
    Heartbeat,
    /// `down/ping`: the server asks for a heartbeat now.
    Ping,
    /// `up/update`: the device's state in a deployment ([`crate::update::UpdateReport`]).
    UpdateReport,
    /// `down/update`: install or abort ([`crate::update::UpdateCommand`]).
    Update,
    /// `up/telemetry`: a batch of metric points and events from the device's outbox.
    Telemetry,
    /// `down/telemetry`: the server acknowledges stored telemetry batches.
    TelemetryAck,
    /// `down/rules`: the rule set the device evaluates on its own data.
    Rules,
    /// `down/logs`: the server asks for log lines.
    LogsRequest,
    /// `up/logs`: log lines answering a `down/logs` request.
    Logs,
    /// `down/remote`: open or close a remote-access session.
    Remote,
}

impl Channel {
    pub const ALL: [Channel; 13] = [
        Channel::Status,
        Channel::Hello,
        Channel::Inventory,
        Channel::Heartbeat,
        Channel::Ping,
        Channel::UpdateReport,
        Channel::Update,
        Channel::Telemetry,
        Channel::TelemetryAck,
        Channel::Rules,
        Channel::LogsRequest,
        Channel::Logs,
        Channel::Remote,
    ];

    /// The part of the topic after the device prefix.
    pub fn suffix(self) -> &'static str {
        match self {
            Channel::Status => "up/status",
            Channel::Hello => "up/hello",
            Channel::Inventory => "up/inventory",
            Channel::Heartbeat => "up/heartbeat",
            Channel::Ping => "down/ping",
            Channel::UpdateReport => "up/update",
            Channel::Update => "down/update",
            Channel::Telemetry => "up/telemetry",
            Channel::TelemetryAck => "down/telemetry",
            Channel::Rules => "down/rules",
            Channel::LogsRequest => "down/logs",
            Channel::Logs => "up/logs",
            Channel::Remote => "down/remote",
        }
    }

    pub fn is_uplink(self) -> bool {
        self.suffix().starts_with("up/")
    }

    pub fn qos(self) -> Qos {
        match self {
            Channel::Heartbeat | Channel::Ping | Channel::TelemetryAck => Qos::AtMostOnce,
            Channel::Status
            | Channel::Hello
            | Channel::Inventory
            | Channel::UpdateReport
            | Channel::Update
            | Channel::Telemetry
            | Channel::Rules
            | Channel::LogsRequest
            | Channel::Logs
            | Channel::Remote => Qos::AtLeastOnce,
        }
    }

    pub fn retained(self) -> bool {
        matches!(self, Channel::Status)
    }

    fn from_suffix(s: &str) -> Option<Channel> {
        Channel::ALL.into_iter().find(|c| c.suffix() == s)
    }
}

/// A device id: what the fleet CA puts in the certificate's common name and what the topics
/// carry. 1 to 64 characters of lowercase letters, digits and `-`, starting with a letter or
/// digit — nothing MQTT gives a meaning (`/`, `+`, `#`).
pub fn valid_device_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !id.starts_with('-')
}

/// `drover/v1/d/{device_id}/{suffix}`.
pub fn topic(device_id: &str, channel: Channel) -> String {
    format!("{TOPIC_ROOT}/{device_id}/{}", channel.suffix())
}

/// The filter matching everything a device may use: its own prefix.
pub fn device_prefix_filter(device_id: &str) -> String {
    format!("{TOPIC_ROOT}/{device_id}/#")
}

/// The shared subscription through which server replicas split the fleet's uplink traffic.
pub const SERVER_UPLINK_SUBSCRIPTION: &str = "$share/drover/drover/v1/d/+/up/#";

/// Splits a topic into device id and channel; `None` for anything outside the contract.
pub fn parse_topic(topic: &str) -> Option<(&str, Channel)> {
    let rest = topic.strip_prefix(TOPIC_ROOT)?.strip_prefix('/')?;
    let (device_id, suffix) = rest.split_once('/')?;
    if !valid_device_id(device_id) {
        return None;
    }
    Some((device_id, Channel::from_suffix(suffix)?))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnlineState {
    Online,
    Offline,
}

/// On `up/status` (retained). The device publishes `online` right after connecting and sets
/// the same topic's last will to `offline`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub v: u32,
    pub state: OnlineState,
}

/// On `up/hello`, once per connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub v: u32,
    /// The software speaking, e.g. `drover-agent/0.1.0` or `acme-fw/2.3`.
    pub agent: String,
    /// Changes on every boot; tells a reboot from a reconnect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_id: Option<String>,
    /// What Drover last installed on the device (after a commit or a rollback).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub software: Option<crate::update::Software>,
    /// What this device can do, from [`CAPABILITIES`] (unknown names are ignored). Absent:
    /// the device does not say, and the server assumes it takes updates and nothing else is
    /// promised. Present: exactly these; a deployment to a device without `update` ends
    /// `incompatible` at once, and the console offers no terminal, files or forwarding a
    /// device does not list.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capabilities: Option<Vec<String>>,
}

/// Takes `down/update` and reports on `up/update`.
pub const CAP_UPDATE: &str = "update";
/// Sends `up/telemetry` batches.
pub const CAP_TELEMETRY: &str = "telemetry";
/// Applies device rule sets (`down/rules`).
pub const CAP_RULES: &str = "rules";
/// Answers logs on demand (`down/logs`).
pub const CAP_LOGS: &str = "logs";
/// Remote access: a terminal session.
pub const CAP_TERMINAL: &str = "terminal";
/// Remote access: file transfer.
pub const CAP_FILES: &str = "files";
/// Remote access: TCP port forwarding (and so a device's web UI).
pub const CAP_FORWARD: &str = "forward";
/// Every capability a device may name in its hello.
pub const CAPABILITIES: &[&str] =
    &[CAP_UPDATE, CAP_TELEMETRY, CAP_RULES, CAP_LOGS, CAP_TERMINAL, CAP_FILES, CAP_FORWARD];

/// On `up/inventory`: the complete set of attributes (not a delta), flat `key = value`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inventory {
    pub v: u32,
    pub attributes: BTreeMap<String, String>,
}

/// On `up/heartbeat`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub v: u32,
    /// Seconds since the device booted.
    pub uptime_s: u64,
    /// Increases by one per heartbeat within a connection.
    pub seq: u64,
}

/// On `down/ping`: answer with a heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ping {
    pub v: u32,
}

/// Why a message from a device was not accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MessageError {
    /// Not JSON of the channel's shape.
    Malformed(String),
    /// A `v` this side does not speak.
    UnsupportedVersion(u32),
    /// Within the shape, but outside the limits.
    Invalid(String),
}

impl std::fmt::Display for MessageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MessageError::Malformed(m) => write!(f, "malformed message: {m}"),
            MessageError::UnsupportedVersion(v) => {
                write!(f, "unsupported protocol version {v} (this side speaks {PROTOCOL_VERSION})")
            }
            MessageError::Invalid(m) => write!(f, "invalid message: {m}"),
        }
    }
}

impl std::error::Error for MessageError {}

/// A message on an uplink channel, decoded and checked.
#[derive(Debug, Clone, PartialEq)]
pub enum Uplink {
    Status(Status),
    Hello(Hello),
    Inventory(Inventory),
    Heartbeat(Heartbeat),
    UpdateReport(crate::update::UpdateReport),
    Telemetry(crate::telemetry::TelemetryBatch),
    Logs(crate::telemetry::LogsReply),
}

#[derive(Deserialize)]
struct VersionOnly {
    v: u32,
}

/// Decodes a device's message: the version first (so that a newer device gets a clear
/// answer), then the shape, then the limits.
pub fn decode_uplink(channel: Channel, payload: &[u8]) -> Result<Uplink, MessageError> {
    fn parse<'a, T: Deserialize<'a>>(payload: &'a [u8]) -> Result<T, MessageError> {
        serde_json::from_slice(payload).map_err(|e| MessageError::Malformed(e.to_string()))
    }
    if payload.len() > MAX_MESSAGE_BYTES {
        return Err(MessageError::Invalid(format!(
            "{} bytes, larger than the largest message ({MAX_MESSAGE_BYTES} bytes)",
            payload.len()
        )));
    }
    let VersionOnly { v } = parse(payload)?;
    if v != PROTOCOL_VERSION {
        return Err(MessageError::UnsupportedVersion(v));
    }
    let msg = match channel {
        Channel::Status => Uplink::Status(parse(payload)?),
        Channel::Hello => {
            let h: Hello = parse(payload)?;
            if h.agent.is_empty() || h.agent.len() > 128 {
                return Err(MessageError::Invalid("agent must be 1 to 128 bytes".into()));
            }
            if let Some(s) = &h.software {
                crate::update::check_software(s).map_err(MessageError::Invalid)?;
            }
            Uplink::Hello(h)
        }
        Channel::Inventory => {
            let inv: Inventory = parse(payload)?;
            check_inventory(&inv.attributes).map_err(MessageError::Invalid)?;
            Uplink::Inventory(inv)
        }
        Channel::Heartbeat => Uplink::Heartbeat(parse(payload)?),
        Channel::UpdateReport => {
            let r: crate::update::UpdateReport = parse(payload)?;
            r.check().map_err(MessageError::Invalid)?;
            Uplink::UpdateReport(r)
        }
        Channel::Telemetry => {
            let b: crate::telemetry::TelemetryBatch = parse(payload)?;
            b.check().map_err(MessageError::Invalid)?;
            Uplink::Telemetry(b)
        }
        Channel::Logs => {
            let r: crate::telemetry::LogsReply = parse(payload)?;
            r.check().map_err(MessageError::Invalid)?;
            Uplink::Logs(r)
        }
        Channel::Ping
        | Channel::Update
        | Channel::TelemetryAck
        | Channel::Rules
        | Channel::LogsRequest
        | Channel::Remote => {
            return Err(MessageError::Invalid(format!("{} is not an uplink channel", channel.suffix())));
        }
    };
    Ok(msg)
}

/// Inventory limits: how many attributes, and the size and alphabet of keys and values.
pub fn check_inventory(attrs: &BTreeMap<String, String>) -> Result<(), String> {
    if attrs.len() > MAX_INVENTORY_ATTRIBUTES {
        return Err(format!("{} attributes, at most {MAX_INVENTORY_ATTRIBUTES}", attrs.len()));
    }
    for (k, v) in attrs {
        let key_ok = !k.is_empty()
            && k.len() <= MAX_ATTRIBUTE_KEY_LEN
            && k.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
        if !key_ok {
            return Err(format!(
                "attribute key {k:?}: use 1 to {MAX_ATTRIBUTE_KEY_LEN} ASCII letters, digits, '_', '.' or '-'"
            ));
        }
        if v.len() > MAX_ATTRIBUTE_VALUE_LEN || v.chars().any(char::is_control) {
            return Err(format!(
                "attribute {k:?}: value over {MAX_ATTRIBUTE_VALUE_LEN} bytes or with control characters"
            ));
        }
    }
    Ok(())
}

/// Parses the output of an inventory script: `key=value` lines; blank lines and `#` comments
/// are skipped; the last value of a repeated key wins.
pub fn parse_key_value_lines(text: &str) -> Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (k, v) = line.split_once('=').ok_or_else(|| format!("line {}: expected key=value, got {line:?}", n + 1))?;
        out.insert(k.trim().to_string(), v.trim().to_string());
    }
    check_inventory(&out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_round_trip_and_foreign_topics_are_rejected() {
        for c in Channel::ALL {
            let t = topic("dev-42", c);
            assert_eq!(parse_topic(&t), Some(("dev-42", c)), "{t}");
        }
        assert_eq!(topic("dev-42", Channel::Status), "drover/v1/d/dev-42/up/status");
        for bad in [
            "drover/v1/d/dev-42/up/unknown",
            "drover/v1/d/DEV/up/status",
            "drover/v1/d/+/up/status",
            "drover/v2/d/dev-42/up/status",
            "drover/v1/d/dev-42",
            "other/topic",
        ] {
            assert_eq!(parse_topic(bad), None, "{bad}");
        }
        assert_eq!(device_prefix_filter("dev-42"), "drover/v1/d/dev-42/#");
    }

    #[test]
    fn device_ids() {
        for ok in ["a", "0193f2c4-7e1a-7b2e-9c1d-2f6a1b3c4d5e", "gateway-7"] {
            assert!(valid_device_id(ok), "{ok}");
        }
        for bad in ["", "-a", "A", "a/b", "a+b", "a#", &"x".repeat(65)] {
            assert!(!valid_device_id(bad), "{bad}");
        }
    }

    #[test]
    fn qos_and_retain_per_channel() {
        assert_eq!(Channel::Status.qos(), Qos::AtLeastOnce);
        assert!(Channel::Status.retained());
        assert_eq!(Channel::Heartbeat.qos(), Qos::AtMostOnce);
        assert!(!Channel::Inventory.retained());
        assert!(!Channel::Ping.is_uplink());
    }

    /// The examples in docs/protocol.md, verbatim.
    #[test]
    fn documented_examples_decode() {
        let status = br#"{"v":1,"state":"online"}"#;
        assert_eq!(
            decode_uplink(Channel::Status, status).unwrap(),
            Uplink::Status(Status { v: 1, state: OnlineState::Online })
        );
        let hello = br#"{"v":1,"agent":"acme-fw/2.3.1","boot_id":"7d1c9a"}"#;
        assert!(
            matches!(decode_uplink(Channel::Hello, hello).unwrap(), Uplink::Hello(h) if h.agent == "acme-fw/2.3.1")
        );
        let inv =
            br#"{"v":1,"attributes":{"os":"linux","arch":"aarch64","serial":"SN-0042","mem_total_kb":"1015808"}}"#;
        let Uplink::Inventory(inv) = decode_uplink(Channel::Inventory, inv).unwrap() else { panic!() };
        assert_eq!(inv.attributes["arch"], "aarch64");
        let hb = br#"{"v":1,"uptime_s":86400,"seq":17}"#;
        assert_eq!(
            decode_uplink(Channel::Heartbeat, hb).unwrap(),
            Uplink::Heartbeat(Heartbeat { v: 1, uptime_s: 86400, seq: 17 })
        );
    }

    #[test]
    fn bad_messages_get_a_reason() {
        assert!(matches!(decode_uplink(Channel::Status, b"online"), Err(MessageError::Malformed(_))));
        assert_eq!(
            decode_uplink(Channel::Status, br#"{"v":2,"state":"online"}"#),
            Err(MessageError::UnsupportedVersion(2))
        );
        assert!(matches!(
            decode_uplink(Channel::Status, br#"{"v":1,"state":"asleep"}"#),
            Err(MessageError::Malformed(_))
        ));
        let bad_key = br#"{"v":1,"attributes":{"has space":"x"}}"#;
        assert!(matches!(decode_uplink(Channel::Inventory, bad_key), Err(MessageError::Invalid(_))));
        let many: BTreeMap<String, String> = (0..300).map(|i| (format!("k{i}"), "v".to_string())).collect();
        let payload = serde_json::to_vec(&Inventory { v: 1, attributes: many }).unwrap();
        assert!(matches!(decode_uplink(Channel::Inventory, &payload), Err(MessageError::Invalid(_))));
        assert!(decode_uplink(Channel::Ping, br#"{"v":1}"#).is_err());
    }

    /// Bad input: a message over the documented 256 KiB is refused whatever its channel, one
    /// at the limit is not.
    #[test]
    fn messages_over_the_largest_size_are_refused() {
        let pad = |total: usize| {
            let head = r#"{"v":1,"attributes":{"k":""#;
            let tail = r#""}}"#;
            format!("{head}{}{tail}", " ".repeat(total - head.len() - tail.len()))
        };
        // At the limit: parsed (and refused for its value's length, not its size).
        match decode_uplink(Channel::Inventory, pad(MAX_MESSAGE_BYTES).as_bytes()) {
            Err(MessageError::Invalid(m)) => assert!(m.contains("attribute"), "{m}"),
            other => panic!("{other:?}"),
        }
        match decode_uplink(Channel::Inventory, pad(MAX_MESSAGE_BYTES + 1).as_bytes()) {
            Err(MessageError::Invalid(m)) => assert!(m.contains("largest message"), "{m}"),
            other => panic!("{other:?}"),
        }
        let mut big = br#"{"v":1,"uptime_s":1,"seq":1}"#.to_vec();
        big.resize(MAX_MESSAGE_BYTES + 10, b' ');
        assert!(matches!(decode_uplink(Channel::Heartbeat, &big), Err(MessageError::Invalid(_))));
        big.truncate(MAX_MESSAGE_BYTES);
        assert!(decode_uplink(Channel::Heartbeat, &big).is_ok());
    }

    #[test]
    fn inventory_script_output() {
        let attrs = parse_key_value_lines("# site facts\nrack = r12\n\nzone=b\nzone=c\n").unwrap();
        assert_eq!(attrs.len(), 2);
        assert_eq!(attrs["rack"], "r12");
        assert_eq!(attrs["zone"], "c");
        assert!(parse_key_value_lines("no equals sign").unwrap_err().contains("line 1"));
    }
}
