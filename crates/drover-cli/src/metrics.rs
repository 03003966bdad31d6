//! `drover metrics …`: a device's metrics and series, fleet aggregates, top devices, and
//! logs on demand, over the REST API (`docs/telemetry-server.md`). Times are Unix ms,
//! RFC 3339, `now` or `now-24h`; steps `10s`, `5m`, `1h`.

use std::process::ExitCode;

use clap::Subcommand;
use serde_json::Value;

use crate::client::{CliError, Client, segment};
use crate::output::{self, Format};

#[derive(Subcommand, Debug)]
pub(crate) enum MetricsCommand {
    /// The metrics a device has reported, with their newest value.
    List {
        /// The device: its id or its name.
        device: String,
        #[command(flatten)]
        paging: crate::commands::Paging,
    },
    /// One metric of one device, in buckets of --step.
    Show {
        /// The device: its id or its name.
        device: String,
        /// The metric's name, e.g. cpu.percent.
        metric: String,
        /// Start: Unix ms, RFC 3339, `now-24h`, or a duration meaning that long ago (`15m`).
        #[arg(long, value_name = "TIME")]
        from: Option<String>,
        /// End (default now): Unix ms, RFC 3339, `now`, `now-1h`, or a duration ago (`1h`).
        #[arg(long, value_name = "TIME")]
        to: Option<String>,
        /// Bucket width: 10s, 5m, 1h (default: chosen from the range).
        #[arg(long, value_name = "DURATION")]
        step: Option<String>,
    },
    /// A metric over a group or a filter, per bucket (devices, avg, min, max, p50, p95).
    Fleet {
        /// The metric's name, e.g. cpu.percent.
        metric: String,
        /// A group, by name or id.
        #[arg(long, conflicts_with = "filter")]
        group: Option<String>,
        /// A device filter, e.g. 'tag.site = "berlin"'.
        #[arg(long)]
        filter: Option<String>,
        /// Show only this statistic: devices, avg, min, max, p50 or p95.
        #[arg(long)]
        stat: Option<String>,
        /// Start: Unix ms, RFC 3339, `now-24h`, or a duration meaning that long ago (`15m`).
        #[arg(long, value_name = "TIME")]
        from: Option<String>,
        /// End (default now): Unix ms, RFC 3339, `now`, `now-1h`, or a duration ago (`1h`).
        #[arg(long, value_name = "TIME")]
        to: Option<String>,
        /// Bucket width: 10s, 5m, 1h (default: chosen from the range).
        #[arg(long, value_name = "DURATION")]
        step: Option<String>,
    },
    /// The devices with the highest avg, max or last value of a metric.
    Top {
        /// The metric's name, e.g. cpu.percent.
        metric: String,
        /// How many devices to show.
        #[arg(short = 'n', long, default_value_t = 10)]
        n: u32,
        /// avg, max or last.
        #[arg(long, default_value = "avg")]
        by: String,
        /// Only the devices of this group, by name or id.
        #[arg(long, conflicts_with = "filter")]
        group: Option<String>,
        /// Only the devices matching this filter, e.g. 'tag.site = "berlin"'.
        #[arg(long)]
        filter: Option<String>,
        /// Start: Unix ms, RFC 3339, `now-24h`, or a duration meaning that long ago (`15m`).
        #[arg(long, value_name = "TIME")]
        from: Option<String>,
        /// End (default now): Unix ms, RFC 3339, `now`, `now-1h`, or a duration ago (`1h`).
        #[arg(long, value_name = "TIME")]
        to: Option<String>,
    },
    /// Fetch log lines from a device (the journal or a file its configuration allows).
    Logs {
        /// The device: its id or its name.
        device: String,
        /// A file name the device's configuration allows.
        #[arg(long, conflicts_with = "journal")]
        file: Option<String>,
        /// The systemd journal (the default).
        #[arg(long)]
        journal: bool,
        /// How many of the newest lines.
        #[arg(short = 'n', long, default_value_t = 100)]
        lines: u32,
        /// Seconds to wait for the device.
        #[arg(long, default_value_t = 15)]
        timeout: u64,
    },
}

fn num(v: &Value) -> String {
    match v.as_f64() {
        Some(f) if f.fract() == 0.0 && f.abs() < 1e15 => format!("{f:.0}"),
        Some(f) => format!("{f:.3}"),
        None => "-".into(),
    }
}

fn time(v: &Value) -> String {
    v.as_i64()
        .map(|ms| ms_to_rfc3339(ms).replace('T', " ").trim_end_matches('Z').to_string())
        .unwrap_or_else(|| "-".into())
}

/// Unix ms as RFC 3339 (UTC), without a time crate.
fn ms_to_rfc3339(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// Whether `s` is a duration as the server writes them: digits and a unit (`15m`, `24h`).
fn is_duration(s: &str) -> bool {
    let unit = s.trim_start_matches(|c: char| c.is_ascii_digit());
    unit.len() < s.len() && matches!(unit, "ms" | "s" | "m" | "h" | "d" | "w")
}

/// A time argument as the server takes it: a duration alone means that long ago
/// (`15m` → `now-15m`); anything else is passed on as given.
fn time_arg(s: String) -> String {
    let t = s.trim();
    if is_duration(t) { format!("now-{t}") } else { s }
}

fn range(q: &mut Vec<(&'static str, String)>, from: Option<String>, to: Option<String>, step: Option<String>) {
    for (k, v) in [("from", from.map(time_arg)), ("to", to.map(time_arg)), ("step", step)] {
        if let Some(v) = v {
            q.push((k, v));
        }
    }
}

fn scope(q: &mut Vec<(&'static str, String)>, group: Option<String>, filter: Option<String>) -> Result<(), CliError> {
    if let Some(f) = filter {
        crate::fleet::check_filter(&f)?;
        q.push(("filter", f));
    }
    if let Some(g) = group {
        q.push(("group", g));
    }
    Ok(())
}

pub(crate) fn metrics(client: &Client, out: Format, cmd: MetricsCommand) -> Result<ExitCode, CliError> {
    match cmd {
        MetricsCommand::List { device, paging } => {
            let device = crate::fleet::resolve_device_id(client, &device)?;
            // A page of the listing (by name), or every page with --all.
            let items: Vec<Value> =
                crate::commands::list(client, &format!("/devices/{}/metrics", segment(&device)), Vec::new(), &paging)?;
            if out == Format::Json {
                println!("{}", output::json(&items));
                return Ok(ExitCode::SUCCESS);
            }
            let rows: Vec<Vec<String>> = items
                .iter()
                .map(|m| {
                    vec![m["name"].as_str().unwrap_or_default().to_string(), num(&m["last_value"]), time(&m["last_t"])]
                })
                .collect();
            print!("{}", output::table(&["METRIC", "LAST", "AT"], &rows));
        }
        MetricsCommand::Show { device, metric, from, to, step } => {
            let device = crate::fleet::resolve_device_id(client, &device)?;
            let mut q = Vec::new();
            range(&mut q, from, to, step);
            let v: Value = client.get(&format!("/devices/{}/metrics/{}", segment(&device), segment(&metric)), &q)?;
            if out == Format::Json {
                println!("{}", output::json(&v));
                return Ok(ExitCode::SUCCESS);
            }
            let rows: Vec<Vec<String>> = v["points"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|p| vec![time(&p["t"]), num(&p["count"]), num(&p["avg"]), num(&p["min"]), num(&p["max"])])
                .collect();
            println!(
                "{metric} of {device}, step {} from {}",
                v["step"].as_i64().map(output::duration_ms).unwrap_or_else(|| "?".into()),
                v["resolution"].as_str().unwrap_or("?")
            );
            print!("{}", output::table(&["TIME", "COUNT", "AVG", "MIN", "MAX"], &rows));
        }
        MetricsCommand::Fleet { metric, group, filter, stat, from, to, step } => {
            let stats = ["devices", "avg", "min", "max", "p50", "p95"];
            if let Some(s) = &stat
                && !stats.contains(&s.as_str())
            {
                return Err(CliError::Usage(format!("--stat {s:?}: use one of {}", stats.join(", "))));
            }
            let mut q = vec![("metric", metric.clone())];
            scope(&mut q, group, filter)?;
            range(&mut q, from, to, step);
            let v: Value = client.get("/metrics/fleet", &q)?;
            if out == Format::Json {
                println!("{}", output::json(&v));
                return Ok(ExitCode::SUCCESS);
            }
            let cols: Vec<&str> = match &stat {
                Some(s) => vec![s.as_str()],
                None => stats.to_vec(),
            };
            let rows: Vec<Vec<String>> = v["buckets"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|b| std::iter::once(time(&b["t"])).chain(cols.iter().map(|c| num(&b[*c]))).collect())
                .collect();
            let headers: Vec<String> =
                std::iter::once("TIME".to_string()).chain(cols.iter().map(|c| c.to_uppercase())).collect();
            let headers: Vec<&str> = headers.iter().map(String::as_str).collect();
            println!(
                "{metric} over {} device(s), from {}",
                num(&v["devices"]),
                v["resolution"].as_str().unwrap_or("?")
            );
            print!("{}", output::table(&headers, &rows));
        }
        MetricsCommand::Top { metric, n, by, group, filter, from, to } => {
            let mut q = vec![("metric", metric), ("n", n.to_string()), ("by", by.clone())];
            scope(&mut q, group, filter)?;
            range(&mut q, from, to, None);
            let v: Value = client.get("/metrics/top", &q)?;
            if out == Format::Json {
                println!("{}", output::json(&v));
                return Ok(ExitCode::SUCCESS);
            }
            let rows: Vec<Vec<String>> = v
                .as_array()
                .into_iter()
                .flatten()
                .map(|r| {
                    vec![r["device_id"].as_str().unwrap_or_default().to_string(), num(&r["value"]), num(&r["count"])]
                })
                .collect();
            print!("{}", output::table(&["DEVICE", &by.to_uppercase(), "VALUES"], &rows));
        }
        MetricsCommand::Logs { device, file, journal: _, lines, timeout } => {
            let device = crate::fleet::resolve_device_id(client, &device)?;
            let source = file.map(|f| format!("file:{f}")).unwrap_or_else(|| "journal".into());
            let body = serde_json::json!({"source": source, "lines": lines, "timeout_s": timeout});
            let v: Value = client.send("POST", &format!("/devices/{}/logs", segment(&device)), &body)?;
            if out == Format::Json {
                println!("{}", output::json(&v));
            } else {
                for l in v["lines"].as_array().into_iter().flatten() {
                    println!("{}", l.as_str().unwrap_or_default());
                }
            }
            if let Some(e) = v["error"].as_str() {
                eprintln!("drover: the device refused: {e}");
                return Ok(ExitCode::from(1));
            }
            if v["answered"] != true {
                eprintln!("drover: no answer from the device within {timeout} s (request {})", v["request"]);
                return Ok(ExitCode::from(5));
            }
            if v["truncated"] == true {
                eprintln!("drover: more lines than fit in one answer; these are the newest");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    #[test]
    fn durations_mean_that_long_ago_and_print_in_units() {
        use super::time_arg;
        use crate::output::duration_ms as human_ms;
        assert_eq!(time_arg("15m".into()), "now-15m");
        assert_eq!(time_arg("24h".into()), "now-24h");
        for kept in ["now-15m", "now", "1700000000000", "2026-12-01T00:00:00Z", "m"] {
            assert_eq!(time_arg(kept.into()), kept);
        }
        assert_eq!(human_ms(30_000), "30s");
        assert_eq!(human_ms(300_000), "5m");
        assert_eq!(human_ms(3_600_000), "1h");
        assert_eq!(human_ms(86_400_000), "1d");
        assert_eq!(human_ms(90_000), "90s");
        assert_eq!(human_ms(250), "250ms");
    }

    #[test]
    fn rfc3339() {
        assert_eq!(super::ms_to_rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(super::ms_to_rfc3339(1_700_000_000_123), "2023-11-14T22:13:20Z");
    }
}
