//! The local interface: applications on the device send metrics and events to a Unix socket,
//! one per line (`docs/telemetry-agent.md`, "Local interface").
//!
//! - StatsD: `name:value|g` (gauge: last value), `name:value|c` (counter: summed over the
//!   collection interval; `|@rate` scales it), `name:value|ms` / `|h` (timer: `name.count`,
//!   `name.avg`, `name.min`, `name.max` per interval). Several `name:value|type` parts may be
//!   joined by newlines; tags (`|#…`) are ignored.
//! - JSON: `{"metric":"name","value":1.5,"t":1764000000123}` (`t` optional: now) is a point
//!   with its own timestamp; `{"event":"name","severity":"warning","data":{…}}` an event.
//!
//! Names are lowercased and must then be `[a-z0-9_.-]{1,64}`. Bad lines are counted
//! (`agent.local.bad_lines`) and logged at most once a minute; the connection stays open.

use std::collections::BTreeMap;

use drover_proto::telemetry::{MAX_EVENT_DATA, Severity, valid_name};
use serde::Deserialize;

/// One parsed line.
#[derive(Debug, Clone, PartialEq)]
pub enum Sample {
    Gauge(String, f64),
    Counter(String, f64),
    Timer(String, f64),
    /// A point with its own time (Unix ms; `None`: now).
    Point(String, f64, Option<i64>),
    Event {
        name: String,
        severity: Severity,
        data: serde_json::Map<String, serde_json::Value>,
        t: Option<i64>,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonLine {
    metric: Option<String>,
    value: Option<f64>,
    t: Option<i64>,
    event: Option<String>,
    severity: Option<Severity>,
    data: Option<serde_json::Map<String, serde_json::Value>>,
}

fn name(raw: &str) -> Result<String, String> {
    let n = raw.trim().to_ascii_lowercase();
    if valid_name(&n) { Ok(n) } else { Err(format!("name {raw:?}: use 1 to 64 of a-z 0-9 _ . -")) }
}

/// Parses one line (without its newline). Blank lines give `Ok(None)`.
pub fn parse_line(line: &str) -> Result<Option<Sample>, String> {
    let line = line.trim();
    if line.is_empty() {
        return Ok(None);
    }
    if line.starts_with('{') {
        let j: JsonLine = serde_json::from_str(line).map_err(|e| format!("JSON line: {e}"))?;
        if let Some(t) = j.t
            && t < 0
        {
            return Err("t must be Unix milliseconds".into());
        }
        return match (j.metric, j.event) {
            (Some(m), None) => {
                if j.severity.is_some() || j.data.is_some() {
                    return Err("a metric line takes metric, value and t".into());
                }
                let v = j.value.ok_or("a metric line needs value")?;
                Ok(Some(Sample::Point(name(&m)?, finite(v)?, j.t)))
            }
            (None, Some(e)) => {
                if j.value.is_some() {
                    return Err("an event line takes event, severity, data and t".into());
                }
                let data = j.data.unwrap_or_default();
                if serde_json::to_string(&data).map(|s| s.len()).unwrap_or(usize::MAX) > MAX_EVENT_DATA {
                    return Err(format!("event data over {MAX_EVENT_DATA} bytes"));
                }
                Ok(Some(Sample::Event {
                    name: name(&e)?,
                    severity: j.severity.unwrap_or(Severity::Info),
                    data,
                    t: j.t,
                }))
            }
            _ => Err("a JSON line has either metric or event".into()),
        };
    }
    let (n, rest) = line.split_once(':').ok_or("expected name:value|type")?;
    let mut parts = rest.split('|');
    let value: f64 =
        parts.next().unwrap_or("").trim().parse().map_err(|_| format!("value in {line:?} is not a number"))?;
    let value = finite(value)?;
    let kind = parts.next().ok_or("expected name:value|type")?.trim();
    let mut rate = 1.0;
    for p in parts {
        if let Some(r) = p.strip_prefix('@') {
            rate = r.parse::<f64>().ok().filter(|r| *r > 0.0 && *r <= 1.0).ok_or("sample rate must be in (0, 1]")?;
        }
    }
    let n = name(n)?;
    match kind {
        "g" => Ok(Some(Sample::Gauge(n, value))),
        "c" => Ok(Some(Sample::Counter(n, value / rate))),
        "ms" | "h" => Ok(Some(Sample::Timer(n, value))),
        other => Err(format!("type {other:?}: use g, c, ms or h")),
    }
}

fn finite(v: f64) -> Result<f64, String> {
    if v.is_finite() { Ok(v) } else { Err("value must be finite".into()) }
}

#[derive(Debug, Clone, Copy)]
struct TimerAgg {
    count: u64,
    sum: f64,
    min: f64,
    max: f64,
}

/// StatsD aggregation over one collection interval.
#[derive(Debug, Default)]
pub struct Aggregator {
    gauges: BTreeMap<String, f64>,
    counters: BTreeMap<String, f64>,
    timers: BTreeMap<String, TimerAgg>,
}

/// Most distinct names aggregated per interval (a runaway application cannot grow memory).
pub const MAX_SERIES: usize = 1000;

impl Aggregator {
    fn room(&self) -> bool {
        self.gauges.len() + self.counters.len() + self.timers.len() < MAX_SERIES
    }

    /// Adds a StatsD sample; `false` when the interval already holds [`MAX_SERIES`] names.
    pub fn add(&mut self, s: &Sample) -> bool {
        match s {
            Sample::Gauge(n, v) => {
                if !self.gauges.contains_key(n) && !self.room() {
                    return false;
                }
                self.gauges.insert(n.clone(), *v);
            }
            Sample::Counter(n, v) => {
                if !self.counters.contains_key(n) && !self.room() {
                    return false;
                }
                *self.counters.entry(n.clone()).or_default() += v;
            }
            Sample::Timer(n, v) => {
                if !self.timers.contains_key(n) && !self.room() {
                    return false;
                }
                let t = self.timers.entry(n.clone()).or_insert(TimerAgg { count: 0, sum: 0.0, min: *v, max: *v });
                t.count += 1;
                t.sum += v;
                t.min = t.min.min(*v);
                t.max = t.max.max(*v);
            }
            Sample::Point(..) | Sample::Event { .. } => {}
        }
        true
    }

    /// The interval's values, and a fresh interval. Gauges keep no value into the next
    /// interval (an application that stops sending stops producing points).
    pub fn take(&mut self) -> Vec<(String, f64)> {
        let mut out = Vec::new();
        out.extend(std::mem::take(&mut self.gauges));
        out.extend(std::mem::take(&mut self.counters));
        for (n, t) in std::mem::take(&mut self.timers) {
            let base = n.len().min(64 - 6);
            let n = &n[..base];
            out.push((format!("{n}.count"), t.count as f64));
            out.push((format!("{n}.avg"), t.sum / t.count as f64));
            out.push((format!("{n}.min"), t.min));
            out.push((format!("{n}.max"), t.max));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statsd_lines() {
        assert_eq!(parse_line("queue.depth:42|g"), Ok(Some(Sample::Gauge("queue.depth".into(), 42.0))));
        assert_eq!(parse_line("Requests:1|c"), Ok(Some(Sample::Counter("requests".into(), 1.0))));
        assert_eq!(parse_line("req:1|c|@0.5"), Ok(Some(Sample::Counter("req".into(), 2.0))));
        assert_eq!(parse_line("db.query:12.5|ms|#env:prod"), Ok(Some(Sample::Timer("db.query".into(), 12.5))));
        assert_eq!(parse_line("  "), Ok(None));
    }

    #[test]
    fn json_lines() {
        assert_eq!(
            parse_line(r#"{"metric":"tank.level","value":0.75,"t":1764000000123}"#),
            Ok(Some(Sample::Point("tank.level".into(), 0.75, Some(1764000000123))))
        );
        let Ok(Some(Sample::Event { name, severity, data, t })) =
            parse_line(r#"{"event":"door.open","severity":"warning","data":{"door":"rear"}}"#)
        else {
            panic!()
        };
        assert_eq!(
            (name.as_str(), severity, data["door"].as_str(), t),
            ("door.open", Severity::Warning, Some("rear"), None)
        );
    }

    /// Bad input: each kind of malformed line gets a reason.
    #[test]
    fn bad_lines() {
        for bad in [
            "no-colon",
            "x:abc|g",
            "x:1",
            "x:1|q",
            "bad name:1|g",
            "x:1|c|@2",
            "x:inf|g",
            "x:NaN|g",
            r#"{"metric":"x"}"#,
            r#"{"metric":"x","value":"high"}"#,
            r#"{"event":"e","value":1}"#,
            r#"{"metric":"x","event":"e","value":1}"#,
            r#"{"event":"e","severity":"fatal"}"#,
            r#"{"metric":"x","value":1,"t":-5}"#,
            r#"{"metric":"x","value":1,"unknown":true}"#,
            "{broken json",
        ] {
            assert!(parse_line(bad).is_err(), "{bad}");
        }
        let big = format!(r#"{{"event":"e","data":{{"k":"{}"}}}}"#, "x".repeat(MAX_EVENT_DATA));
        assert!(parse_line(&big).unwrap_err().contains("data"));
    }

    #[test]
    fn aggregation_per_interval() {
        let mut a = Aggregator::default();
        for l in ["g:1|g", "g:5|g", "c:1|c", "c:2|c", "t:10|ms", "t:30|ms", "t:20|ms"] {
            assert!(a.add(&parse_line(l).unwrap().unwrap()));
        }
        let mut got = a.take();
        got.sort_by(|x, y| x.0.cmp(&y.0));
        let want: Vec<(String, f64)> =
            [("c", 3.0), ("g", 5.0), ("t.avg", 20.0), ("t.count", 3.0), ("t.max", 30.0), ("t.min", 10.0)]
                .into_iter()
                .map(|(n, v)| (n.to_string(), v))
                .collect();
        assert_eq!(got, want);
        assert!(a.take().is_empty(), "a new interval starts empty");
        for i in 0..MAX_SERIES {
            assert!(a.add(&Sample::Gauge(format!("g{i}"), 1.0)));
        }
        assert!(!a.add(&Sample::Gauge("one-more".into(), 1.0)), "bounded");
    }
}
