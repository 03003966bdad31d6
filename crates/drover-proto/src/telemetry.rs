//! Telemetry, device rules and logs on demand: the messages on `up/telemetry`,
//! `down/telemetry`, `down/rules`, `down/logs` and `up/logs`, as specified for firmware authors
//! in `docs/protocol.md` ("Telemetry", "Device rules", "Logs on demand"). The tests decode that
//! document's examples verbatim.
//!
//! A device keeps what it measures in an outbox and sends it in numbered batches
//! ([`TelemetryBatch`]); the server stores a batch and acknowledges it ([`TelemetryAck`],
//! cumulative). A batch that was not acknowledged is sent again, so the server treats points
//! (device + name + `t`) and events (device + `id`) idempotently.

use serde::{Deserialize, Serialize};

/// Most points in one batch.
pub const MAX_BATCH_POINTS: usize = 2000;
/// Most events in one batch.
pub const MAX_BATCH_EVENTS: usize = 100;
/// Longest metric or event name, in bytes (alphabet: `a-z 0-9 _ . -`).
pub const MAX_NAME_LEN: usize = 64;
/// Longest event id, in bytes (alphabet: ASCII letters, digits, `_ . - :`).
pub const MAX_EVENT_ID_LEN: usize = 64;
/// Largest `data` of an event, serialized as JSON, in bytes.
pub const MAX_EVENT_DATA: usize = 1024;
/// Largest magnitude of a point's value. Bigger finite numbers (up to 1.8e308) would make the
/// server's sums over a bucket overflow to infinity, which JSON cannot carry; 1e18 leaves
/// room for any sum of points (a sum overflows only past 1e290 points) and still holds a
/// byte counter of 1 Gbit/s for 250 years.
pub const MAX_ABS_VALUE: f64 = 1e18;
/// Most rules in one rule set.
pub const MAX_RULES: usize = 256;
/// Longest hold time of a rule: one day.
pub const MAX_FOR_S: u64 = 86_400;
/// Most log lines a request may ask for.
pub const MAX_LOG_LINES: u32 = 10_000;
/// Largest sum of the line lengths in a logs reply, in bytes (the device keeps the newest
/// lines and sets `truncated`).
pub const MAX_LOG_BYTES: usize = 128 * 1024;

/// A value a point may carry: finite, with a magnitude of at most [`MAX_ABS_VALUE`].
pub fn valid_value(v: f64) -> bool {
    v.is_finite() && v.abs() <= MAX_ABS_VALUE
}

/// `[a-z0-9_.-]{1,64}`: metric names, event names.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'.' | b'-'))
}

/// `[A-Za-z0-9_.:-]{1,64}`: event ids, rule ids, request ids.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_EVENT_ID_LEN
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-' | b':'))
}

/// How serious an event is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Info,
    Warning,
    Critical,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Critical => "critical",
        }
    }

    pub fn parse(s: &str) -> Option<Severity> {
        [Severity::Info, Severity::Warning, Severity::Critical].into_iter().find(|x| x.as_str() == s)
    }
}

impl std::fmt::Display for Severity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One measurement: metric name, Unix time in milliseconds when it was measured, value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Point {
    pub n: String,
    pub t: i64,
    pub v: f64,
}

/// Something that happened on the device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Unique per device; a re-sent event carries the same id.
    pub id: String,
    /// Unix time in milliseconds when it happened.
    pub t: i64,
    pub name: String,
    pub severity: Severity,
    /// Free-form details, at most [`MAX_EVENT_DATA`] bytes of JSON.
    #[serde(default)]
    pub data: serde_json::Map<String, serde_json::Value>,
}

/// On `up/telemetry`: one batch from the device's outbox.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TelemetryBatch {
    pub v: u32,
    /// Increases by one per batch per device, across restarts; a re-sent batch may carry a
    /// new number (the server deduplicates on the points and events, not on `seq`).
    pub seq: u64,
    #[serde(default)]
    pub points: Vec<Point>,
    #[serde(default)]
    pub events: Vec<Event>,
    /// Records the device's outbox has discarded (full) or found corrupted, in total since the
    /// agent was installed.
    #[serde(default)]
    pub dropped: u64,
}

/// Checks a timestamp: Unix milliseconds, not negative.
fn check_t(t: i64, what: &str) -> Result<(), String> {
    if t < 0 {
        return Err(format!("{what}: t must be Unix milliseconds, not negative"));
    }
    Ok(())
}

impl Event {
    pub fn check(&self) -> Result<(), String> {
        if !valid_id(&self.id) {
            return Err(format!(
                "event id {:?}: use 1 to {MAX_EVENT_ID_LEN} ASCII letters, digits, '_', '.', '-' or ':'",
                self.id
            ));
        }
        if !valid_name(&self.name) {
            return Err(format!(
                "event name {:?}: use 1 to {MAX_NAME_LEN} lowercase letters, digits, '_', '.' or '-'",
                self.name
            ));
        }
        check_t(self.t, &format!("event {:?}", self.id))?;
        let size = serde_json::to_string(&self.data).map(|s| s.len()).unwrap_or(usize::MAX);
        if size > MAX_EVENT_DATA {
            return Err(format!("event {:?}: data is {size} bytes of JSON, at most {MAX_EVENT_DATA}", self.id));
        }
        Ok(())
    }
}

impl Point {
    pub fn check(&self) -> Result<(), String> {
        if !valid_name(&self.n) {
            return Err(format!(
                "metric name {:?}: use 1 to {MAX_NAME_LEN} lowercase letters, digits, '_', '.' or '-'",
                self.n
            ));
        }
        check_t(self.t, &format!("point {:?}", self.n))?;
        if !valid_value(self.v) {
            return Err(format!(
                "point {:?}: value {} must be a finite number of magnitude at most {MAX_ABS_VALUE:e}",
                self.n, self.v
            ));
        }
        Ok(())
    }
}

impl TelemetryBatch {
    /// Limits a device must keep; the server refuses a batch outside them (and does not
    /// acknowledge it).
    pub fn check(&self) -> Result<(), String> {
        if self.points.len() > MAX_BATCH_POINTS {
            return Err(format!("{} points, at most {MAX_BATCH_POINTS} per batch", self.points.len()));
        }
        if self.events.len() > MAX_BATCH_EVENTS {
            return Err(format!("{} events, at most {MAX_BATCH_EVENTS} per batch", self.events.len()));
        }
        for p in &self.points {
            p.check()?;
        }
        for e in &self.events {
            e.check()?;
        }
        Ok(())
    }
}

/// On `down/telemetry`: every batch up to and including `seq` is stored (cumulative).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TelemetryAck {
    pub v: u32,
    pub seq: u64,
    /// Points of this batch the server did not store because their `t` lay too far in the
    /// future (the device's clock is ahead or unset); absent when none.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub refused_future: u64,
    /// Points of this batch the server did not store because they were older than it keeps
    /// raw points (often a clock at 1970 before time sync); absent when none.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub refused_old: u64,
    /// Metric names of this batch whose points the server did not store because the device
    /// (or its organization) has as many metric series as it may; absent when none.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub refused_series: u64,
}

impl TelemetryAck {
    pub fn new(seq: u64) -> TelemetryAck {
        TelemetryAck { v: crate::device::PROTOCOL_VERSION, seq, refused_future: 0, refused_old: 0, refused_series: 0 }
    }
}

/// A comparison in a metric rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
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

impl Op {
    pub fn holds(self, value: f64, threshold: f64) -> bool {
        match self {
            Op::Gt => value > threshold,
            Op::Ge => value >= threshold,
            Op::Lt => value < threshold,
            Op::Le => value <= threshold,
            Op::Eq => value == threshold,
            Op::Ne => value != threshold,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Op::Gt => ">",
            Op::Ge => ">=",
            Op::Lt => "<",
            Op::Le => "<=",
            Op::Eq => "==",
            Op::Ne => "!=",
        }
    }
}

/// The event a rule raises when it fires.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Raise {
    pub name: String,
    pub severity: Severity,
}

/// One device rule. Its condition is either on a metric (`metric`, `op`, `threshold`, and
/// optionally `for_s`: how long it must hold) or on an event name (`event`); when it fires it
/// raises an event (`raise`) and/or runs an action the device's own config names (`action`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rule {
    pub id: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metric: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub op: Option<Op>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold: Option<f64>,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub for_s: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raise: Option<Raise>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// What a rule watches, once checked.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Condition<'a> {
    Metric { metric: &'a str, op: Op, threshold: f64, for_s: u64 },
    Event { name: &'a str },
}

impl Rule {
    /// The rule's condition; `None` for a rule that [`Rule::check`] refuses.
    pub fn condition(&self) -> Option<Condition<'_>> {
        match (&self.metric, &self.event) {
            (Some(metric), None) => {
                Some(Condition::Metric { metric, op: self.op?, threshold: self.threshold?, for_s: self.for_s })
            }
            (None, Some(name)) => Some(Condition::Event { name }),
            _ => None,
        }
    }

    pub fn check(&self) -> Result<(), String> {
        if !valid_id(&self.id) {
            return Err(format!(
                "rule id {:?}: use 1 to {MAX_EVENT_ID_LEN} ASCII letters, digits, '_', '.', '-' or ':'",
                self.id
            ));
        }
        let id = &self.id;
        if self.name.is_empty() || self.name.len() > 128 || self.name.chars().any(char::is_control) {
            return Err(format!("rule {id}: name must be 1 to 128 bytes without control characters"));
        }
        match (&self.metric, &self.event) {
            (Some(m), None) => {
                if !valid_name(m) {
                    return Err(format!("rule {id}: metric {m:?} is not a valid metric name"));
                }
                if self.op.is_none() {
                    return Err(format!("rule {id}: a metric rule needs op (>, >=, <, <=, ==, !=)"));
                }
                match self.threshold {
                    Some(t) if t.is_finite() => {}
                    _ => return Err(format!("rule {id}: a metric rule needs a finite threshold")),
                }
                if self.for_s > MAX_FOR_S {
                    return Err(format!("rule {id}: for_s at most {MAX_FOR_S}"));
                }
            }
            (None, Some(e)) => {
                if !valid_name(e) {
                    return Err(format!("rule {id}: event {e:?} is not a valid event name"));
                }
                if self.op.is_some() || self.threshold.is_some() || self.for_s != 0 {
                    return Err(format!("rule {id}: an event rule takes no op, threshold or for_s"));
                }
            }
            _ => return Err(format!("rule {id}: give exactly one of metric or event")),
        }
        if self.raise.is_none() && self.action.is_none() {
            return Err(format!("rule {id}: give raise, action, or both"));
        }
        if let Some(r) = &self.raise
            && !valid_name(&r.name)
        {
            return Err(format!("rule {id}: raise.name {:?} is not a valid event name", r.name));
        }
        if let Some(a) = &self.action
            && !valid_name(a)
        {
            return Err(format!("rule {id}: action {a:?}: use 1 to {MAX_NAME_LEN} of a-z 0-9 _ . -"));
        }
        Ok(())
    }
}

/// On `down/rules`: the complete rule set for the device (not a delta). An empty `rules`
/// removes every rule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RuleSet {
    pub v: u32,
    /// Increases with every change; a device ignores a rule set older than the one it has.
    pub version: u64,
    #[serde(default)]
    pub rules: Vec<Rule>,
}

impl RuleSet {
    pub fn check(&self) -> Result<(), String> {
        if self.rules.len() > MAX_RULES {
            return Err(format!("{} rules, at most {MAX_RULES}", self.rules.len()));
        }
        let mut ids = std::collections::BTreeSet::new();
        for r in &self.rules {
            r.check()?;
            if !ids.insert(r.id.as_str()) {
                return Err(format!("rule id {:?} appears twice", r.id));
            }
        }
        Ok(())
    }
}

/// On `down/logs`: send me the last `lines` lines of `source`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogsRequest {
    pub v: u32,
    pub request: String,
    /// `journal` (the systemd journal) or `file:<name>`, a name the device's config maps to a
    /// file.
    pub source: String,
    pub lines: u32,
}

/// Where log lines come from, parsed from [`LogsRequest::source`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogSource<'a> {
    Journal,
    File(&'a str),
}

impl LogsRequest {
    pub fn check(&self) -> Result<(), String> {
        if !valid_id(&self.request) {
            return Err(format!("request id {:?} is not valid", self.request));
        }
        if self.lines == 0 || self.lines > MAX_LOG_LINES {
            return Err(format!("lines must be 1 to {MAX_LOG_LINES}"));
        }
        self.parsed_source().map(|_| ())
    }

    pub fn parsed_source(&self) -> Result<LogSource<'_>, String> {
        if self.source == "journal" {
            return Ok(LogSource::Journal);
        }
        match self.source.strip_prefix("file:") {
            Some(name) if valid_name(name) => Ok(LogSource::File(name)),
            _ => Err(format!("source {:?}: use journal or file:<name>", self.source)),
        }
    }
}

/// On `up/logs`: the answer to a [`LogsRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogsReply {
    pub v: u32,
    pub request: String,
    #[serde(default)]
    pub lines: Vec<String>,
    /// More lines were asked for than fit in [`MAX_LOG_BYTES`]: these are the newest.
    #[serde(default)]
    pub truncated: bool,
    /// Why the device could not answer (source not allowed, file missing…); `null` otherwise.
    #[serde(default)]
    pub error: Option<String>,
}

impl LogsReply {
    pub fn check(&self) -> Result<(), String> {
        if !valid_id(&self.request) {
            return Err(format!("request id {:?} is not valid", self.request));
        }
        if self.lines.len() > MAX_LOG_LINES as usize {
            return Err(format!("{} lines, at most {MAX_LOG_LINES}", self.lines.len()));
        }
        let bytes: usize = self.lines.iter().map(String::len).sum();
        if bytes > MAX_LOG_BYTES {
            return Err(format!("{bytes} bytes of lines, at most {MAX_LOG_BYTES}"));
        }
        if self.error.as_ref().is_some_and(|e| e.len() > 1024) {
            return Err("error over 1024 bytes".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::{Channel, MessageError, Uplink, decode_uplink};

    /// The examples in docs/protocol.md, verbatim.
    const BATCH: &str = r#"{"v":1,"seq":42,"points":[{"n":"cpu.percent","t":1764000000123,"v":12.5},{"n":"mem.used_bytes","t":1764000000123,"v":183500800.0},{"n":"disk.used_percent.root","t":1764000000123,"v":61.2}],"events":[{"id":"e-7f3a-1051","t":1764000004410,"name":"door.open","severity":"warning","data":{"door":"rear"}}],"dropped":0}"#;
    const ACK: &str = r#"{"v":1,"seq":42}"#;
    const RULES: &str = r#"{"v":1,"version":3,"rules":[{"id":"cpu-hot","name":"CPU hot for 5 minutes","metric":"cpu.percent","op":">","threshold":90.0,"for_s":300,"raise":{"name":"cpu.hot","severity":"warning"},"action":"restart-app"},{"id":"door","name":"Rear door opened","event":"door.open","raise":{"name":"door.alarm","severity":"critical"}}]}"#;
    const LOGS_REQ: &str = r#"{"v":1,"request":"0193f2c4-7e1a","source":"file:app","lines":200}"#;
    const LOGS_REPLY: &str = r#"{"v":1,"request":"0193f2c4-7e1a","lines":["12:00:01 app started","12:00:02 listening on :8080"],"truncated":false,"error":null}"#;
    const LOGS_REFUSED: &str = r#"{"v":1,"request":"0193f2c4-7e1b","lines":[],"truncated":false,"error":"source journal is not allowed by this device's config"}"#;

    #[test]
    fn documented_examples_round_trip() {
        let Uplink::Telemetry(b) = decode_uplink(Channel::Telemetry, BATCH.as_bytes()).unwrap() else { panic!() };
        assert_eq!(b.seq, 42);
        assert_eq!(b.points[0], Point { n: "cpu.percent".into(), t: 1764000000123, v: 12.5 });
        assert_eq!(b.events[0].severity, Severity::Warning);
        assert_eq!(b.events[0].data["door"], "rear");
        assert_eq!(serde_json::to_string(&b).unwrap(), BATCH);

        let a: TelemetryAck = serde_json::from_str(ACK).unwrap();
        assert_eq!(a, TelemetryAck::new(42));
        assert_eq!(serde_json::to_string(&a).unwrap(), ACK);

        let rs: RuleSet = serde_json::from_str(RULES).unwrap();
        rs.check().unwrap();
        assert_eq!(
            rs.rules[0].condition(),
            Some(Condition::Metric { metric: "cpu.percent", op: Op::Gt, threshold: 90.0, for_s: 300 })
        );
        assert_eq!(rs.rules[1].condition(), Some(Condition::Event { name: "door.open" }));
        assert_eq!(serde_json::to_string(&rs).unwrap(), RULES);

        let req: LogsRequest = serde_json::from_str(LOGS_REQ).unwrap();
        req.check().unwrap();
        assert_eq!(req.parsed_source(), Ok(LogSource::File("app")));
        assert_eq!(serde_json::to_string(&req).unwrap(), LOGS_REQ);

        for reply in [LOGS_REPLY, LOGS_REFUSED] {
            let Uplink::Logs(r) = decode_uplink(Channel::Logs, reply.as_bytes()).unwrap() else { panic!() };
            assert_eq!(serde_json::to_string(&r).unwrap(), reply);
        }
    }

    #[test]
    fn minimal_batch_defaults() {
        let Uplink::Telemetry(b) = decode_uplink(Channel::Telemetry, br#"{"v":1,"seq":1}"#).unwrap() else { panic!() };
        assert!(b.points.is_empty() && b.events.is_empty() && b.dropped == 0);
    }

    /// Bad input: names outside the alphabet, non-finite values (which JSON cannot carry, but
    /// a Rust sender could build), negative times, oversized data, too many points.
    #[test]
    fn batch_limits() {
        let ok = || TelemetryBatch {
            v: 1,
            seq: 1,
            points: vec![Point { n: "a.b".into(), t: 1, v: 1.0 }],
            events: vec![Event {
                id: "e1".into(),
                t: 1,
                name: "x".into(),
                severity: Severity::Info,
                data: Default::default(),
            }],
            dropped: 0,
        };
        ok().check().unwrap();
        let mut b = ok();
        b.points[0].n = "CPU".into();
        assert!(b.check().unwrap_err().contains("metric name"));
        b.points[0].n = "x".repeat(65);
        assert!(b.check().is_err());
        b = ok();
        b.points[0].v = f64::NAN;
        assert!(b.check().unwrap_err().contains("finite"));
        for v in [1.797e308, -1.797e308, 1.000_001e18] {
            b = ok();
            b.points[0].v = v;
            assert!(b.check().unwrap_err().contains("magnitude"), "{v}");
        }
        for v in [MAX_ABS_VALUE, -MAX_ABS_VALUE, 0.0, -1e-300] {
            b = ok();
            b.points[0].v = v;
            b.check().unwrap();
        }
        assert!(matches!(
            decode_uplink(Channel::Telemetry, br#"{"v":1,"seq":1,"points":[{"n":"a","t":1,"v":1.797e308}]}"#),
            Err(MessageError::Invalid(_))
        ));
        b = ok();
        b.points[0].t = -1;
        assert!(b.check().unwrap_err().contains("negative"));
        b = ok();
        b.events[0].data.insert("k".into(), "x".repeat(MAX_EVENT_DATA).into());
        assert!(b.check().unwrap_err().contains("data"));
        b = ok();
        b.events[0].id = "a b".into();
        assert!(b.check().unwrap_err().contains("event id"));
        b = ok();
        b.points = vec![Point { n: "a".into(), t: 1, v: 1.0 }; MAX_BATCH_POINTS + 1];
        assert!(b.check().unwrap_err().contains("points"));
        assert!(matches!(
            decode_uplink(Channel::Telemetry, br#"{"v":1,"seq":1,"points":[{"n":"Bad Name","t":1,"v":1}]}"#),
            Err(MessageError::Invalid(_))
        ));
        assert!(matches!(
            decode_uplink(Channel::Telemetry, br#"{"v":1,"seq":1,"points":[{"n":"a","t":1,"v":"high"}]}"#),
            Err(MessageError::Malformed(_))
        ));
        assert!(matches!(
            decode_uplink(
                Channel::Telemetry,
                br#"{"v":1,"seq":1,"events":[{"id":"e","t":1,"name":"a","severity":"fatal"}]}"#
            ),
            Err(MessageError::Malformed(_))
        ));
    }

    /// Bad input: each way a rule can be incomplete or contradictory.
    #[test]
    fn rule_limits() {
        let parse = |r: &str| -> Result<(), String> {
            let rs: RuleSet =
                serde_json::from_str(&format!(r#"{{"v":1,"version":1,"rules":[{r}]}}"#)).map_err(|e| e.to_string())?;
            rs.check()
        };
        let raise = r#""raise":{"name":"x","severity":"info"}"#;
        assert!(parse(&format!(r#"{{"id":"a","name":"A","metric":"m","op":"<=","threshold":1,{raise}}}"#)).is_ok());
        assert!(
            parse(&format!(r#"{{"id":"a","name":"A","metric":"m","threshold":1,{raise}}}"#))
                .unwrap_err()
                .contains("op")
        );
        assert!(
            parse(&format!(r#"{{"id":"a","name":"A","metric":"m","op":">",{raise}}}"#))
                .unwrap_err()
                .contains("threshold")
        );
        assert!(parse(&format!(r#"{{"id":"a","name":"A","metric":"m","op":"~","threshold":1,{raise}}}"#)).is_err());
        assert!(
            parse(&format!(r#"{{"id":"a","name":"A","event":"e","metric":"m",{raise}}}"#))
                .unwrap_err()
                .contains("exactly one")
        );
        assert!(parse(&format!(r#"{{"id":"a","name":"A",{raise}}}"#)).unwrap_err().contains("exactly one"));
        assert!(parse(r#"{"id":"a","name":"A","event":"e"}"#).unwrap_err().contains("raise, action"));
        assert!(parse(r#"{"id":"a","name":"A","event":"e","action":"Restart App"}"#).unwrap_err().contains("action"));
        assert!(parse(&format!(r#"{{"id":"a","name":"A","event":"e","for_s":5,{raise}}}"#)).is_err());
        assert!(
            parse(&format!(r#"{{"id":"a","name":"A","metric":"m","op":">","threshold":1,"for_s":86401,{raise}}}"#))
                .is_err()
        );
        let dup = format!(r#"{{"id":"a","name":"A","event":"e",{raise}}},{{"id":"a","name":"B","event":"f",{raise}}}"#);
        assert!(parse(&dup).unwrap_err().contains("twice"));
        for (op, v, t, holds) in
            [(Op::Gt, 2.0, 1.0, true), (Op::Ge, 1.0, 1.0, true), (Op::Lt, 1.0, 1.0, false), (Op::Ne, 1.0, 2.0, true)]
        {
            assert_eq!(op.holds(v, t), holds, "{op:?}");
        }
    }

    /// Bad input: unknown source forms, zero or too many lines, bad request id.
    #[test]
    fn logs_limits() {
        let req = |source: &str, lines: u32| LogsRequest { v: 1, request: "r1".into(), source: source.into(), lines };
        assert_eq!(req("journal", 10).parsed_source(), Ok(LogSource::Journal));
        assert!(req("file:/etc/shadow", 10).check().is_err());
        assert!(req("file:", 10).check().is_err());
        assert!(req("syslog", 10).check().is_err());
        assert!(req("journal", 0).check().is_err());
        assert!(req("journal", MAX_LOG_LINES + 1).check().is_err());
        let reply = LogsReply {
            v: 1,
            request: "r1".into(),
            lines: vec!["x".repeat(MAX_LOG_BYTES + 1)],
            truncated: true,
            error: None,
        };
        assert!(reply.check().unwrap_err().contains("bytes"));
    }
}
