//! The server's own figures in the Prometheus text format: requests by route and status,
//! request latency, the database pool, and the device-traffic worker.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::Duration;

const BUCKETS: [f64; 11] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

#[derive(Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    fn observe(&mut self, d: Duration) {
        let secs = d.as_secs_f64();
        for (i, b) in BUCKETS.iter().enumerate() {
            if secs <= *b {
                self.counts[i] += 1;
            }
        }
        self.count += 1;
        self.sum += secs;
    }

    /// The histogram's lines for `name` with `labels` (`key="value"` pairs, or empty).
    fn write(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        for (i, b) in BUCKETS.iter().enumerate() {
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {}", self.counts[i]);
        }
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}", self.count);
        let braces = if labels.is_empty() { String::new() } else { format!("{{{labels}}}") };
        let _ = writeln!(out, "{name}_sum{braces} {}", self.sum);
        let _ = writeln!(out, "{name}_count{braces} {}", self.count);
    }
}

/// The device-traffic worker's figures (`crate::devnet::run_ingest`): how long each device
/// message took to record and acknowledge, by channel, and how long it waited in droverd
/// before that. While it records, the broker holds the devices back, so these say how fast
/// the fleet's reports can come in.
#[derive(Default)]
pub struct DeviceTraffic {
    handled: Mutex<BTreeMap<&'static str, Histogram>>,
    waited: Mutex<Histogram>,
}

impl DeviceTraffic {
    pub fn observe(&self, channel: &'static str, waited: Duration, handled: Duration) {
        self.handled.lock().unwrap_or_else(|e| e.into_inner()).entry(channel).or_default().observe(handled);
        self.waited.lock().unwrap_or_else(|e| e.into_inner()).observe(waited);
    }

    fn render(&self, out: &mut String) {
        out.push_str(
            "# HELP drover_device_message_seconds Time to record and acknowledge one device message, by channel.\n",
        );
        out.push_str("# TYPE drover_device_message_seconds histogram\n");
        for (channel, h) in self.handled.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            h.write(out, "drover_device_message_seconds", &format!("channel=\"{channel}\""));
        }
        out.push_str(
            "# HELP drover_device_message_wait_seconds Time a device message waited in droverd before its turn.\n",
        );
        out.push_str("# TYPE drover_device_message_wait_seconds histogram\n");
        self.waited.lock().unwrap_or_else(|e| e.into_inner()).write(out, "drover_device_message_wait_seconds", "");
    }
}

#[derive(Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(String, String, u16), u64>>,
    latency: Mutex<BTreeMap<String, Histogram>>,
    /// Bytes of artifact files sent to devices.
    pub artifact_bytes_served: std::sync::atomic::AtomicU64,
    pub device_traffic: std::sync::Arc<DeviceTraffic>,
}

impl Metrics {
    /// `route` is the matched route pattern (e.g. `/api/v1/users/{id}`), never the raw path,
    /// so that the number of series stays bounded.
    pub fn observe(&self, method: &str, route: &str, status: u16, elapsed: Duration) {
        {
            let mut r = self.requests.lock().unwrap_or_else(|e| e.into_inner());
            *r.entry((method.to_string(), route.to_string(), status)).or_default() += 1;
        }
        self.latency.lock().unwrap_or_else(|e| e.into_inner()).entry(route.to_string()).or_default().observe(elapsed);
    }

    pub fn render(&self, pool_size: u32, pool_idle: usize, pool_max: u32, backend: &str) -> String {
        let mut out = String::new();
        out.push_str("# HELP drover_http_requests_total HTTP requests served, by method, route and status.\n");
        out.push_str("# TYPE drover_http_requests_total counter\n");
        for ((method, route, status), n) in self.requests.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ = writeln!(
                out,
                "drover_http_requests_total{{method=\"{method}\",route=\"{}\",status=\"{status}\"}} {n}",
                escape(route)
            );
        }
        out.push_str("# HELP drover_http_request_duration_seconds Time to answer HTTP requests, by route.\n");
        out.push_str("# TYPE drover_http_request_duration_seconds histogram\n");
        for (route, h) in self.latency.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            h.write(&mut out, "drover_http_request_duration_seconds", &format!("route=\"{}\"", escape(route)));
        }
        out.push_str(
            "# HELP drover_db_pool_connections Open database connections.\n# TYPE drover_db_pool_connections gauge\n",
        );
        let _ = writeln!(out, "drover_db_pool_connections{{backend=\"{backend}\"}} {pool_size}");
        out.push_str("# HELP drover_db_pool_idle_connections Idle database connections.\n# TYPE drover_db_pool_idle_connections gauge\n");
        let _ = writeln!(out, "drover_db_pool_idle_connections{{backend=\"{backend}\"}} {pool_idle}");
        out.push_str("# HELP drover_db_pool_max_connections Largest size of the database pool.\n# TYPE drover_db_pool_max_connections gauge\n");
        let _ = writeln!(out, "drover_db_pool_max_connections{{backend=\"{backend}\"}} {pool_max}");
        out.push_str("# HELP drover_artifact_bytes_served_total Bytes of artifacts sent to devices.\n# TYPE drover_artifact_bytes_served_total counter\n");
        let served = self.artifact_bytes_served.load(std::sync::atomic::Ordering::Relaxed);
        let _ = writeln!(out, "drover_artifact_bytes_served_total {served}");
        self.device_traffic.render(&mut out);
        out
    }
}

/// The embedded broker's counters, in the exposition format.
pub fn render_broker(stats: &drover_broker::Stats, retained: usize) -> String {
    use std::fmt::Write as _;
    use std::sync::atomic::Ordering::Relaxed;
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, value: u64| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
    };
    metric(
        "drover_mqtt_connections",
        "gauge",
        "Clients connected to the embedded broker.",
        stats.connections.load(Relaxed) as u64,
    );
    metric("drover_mqtt_connects_total", "counter", "Successful MQTT connections.", stats.connects_total.load(Relaxed));
    metric(
        "drover_mqtt_refused_total",
        "counter",
        "Connections refused (TLS, identity, registry or limits).",
        stats.refused_total.load(Relaxed),
    );
    metric(
        "drover_mqtt_messages_in_total",
        "counter",
        "PUBLISH packets received (and wills).",
        stats.messages_in.load(Relaxed),
    );
    metric(
        "drover_mqtt_messages_out_total",
        "counter",
        "Messages queued for delivery to subscribers.",
        stats.messages_out.load(Relaxed),
    );
    metric(
        "drover_mqtt_dropped_total",
        "counter",
        "Messages dropped for a full subscriber queue or size.",
        stats.dropped_total.load(Relaxed),
    );
    metric(
        "drover_mqtt_busy_disconnects_total",
        "counter",
        "Devices disconnected (server busy) because the server replicas took none of their messages for the broker's busy wait.",
        stats.busy_disconnects_total.load(Relaxed),
    );
    metric(
        "drover_mqtt_acl_denied_total",
        "counter",
        "Publishes and subscriptions refused as not authorized.",
        stats.acl_denied_total.load(Relaxed),
    );
    metric("drover_mqtt_retained", "gauge", "Retained messages held.", retained as u64);
    out
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_cumulative_buckets() {
        let m = Metrics::default();
        m.observe("GET", "/api/v1/users", 200, Duration::from_millis(3));
        m.observe("GET", "/api/v1/users", 200, Duration::from_millis(30));
        m.observe("POST", "/api/v1/users", 403, Duration::from_millis(1));
        let text = m.render(2, 1, 8, "sqlite");
        assert!(text.contains("drover_http_requests_total{method=\"GET\",route=\"/api/v1/users\",status=\"200\"} 2"));
        assert!(text.contains("drover_http_requests_total{method=\"POST\",route=\"/api/v1/users\",status=\"403\"} 1"));
        assert!(text.contains("drover_http_request_duration_seconds_bucket{route=\"/api/v1/users\",le=\"0.005\"} 2"));
        assert!(text.contains("drover_http_request_duration_seconds_bucket{route=\"/api/v1/users\",le=\"0.025\"} 2"));
        assert!(text.contains("drover_http_request_duration_seconds_bucket{route=\"/api/v1/users\",le=\"0.05\"} 3"));
        assert!(text.contains("drover_db_pool_connections{backend=\"sqlite\"} 2"));
        assert!(text.contains("drover_http_request_duration_seconds_count{route=\"/api/v1/users\"} 3"));
    }

    #[test]
    fn device_traffic_by_channel_and_the_wait_before_it() {
        let m = Metrics::default();
        m.device_traffic.observe("up/update", Duration::from_millis(2), Duration::from_millis(700));
        m.device_traffic.observe("up/update", Duration::from_secs(3), Duration::from_millis(4));
        m.device_traffic.observe("up/status", Duration::ZERO, Duration::from_millis(20));
        let text = m.render(2, 1, 8, "sqlite");
        assert!(text.contains("drover_device_message_seconds_bucket{channel=\"up/update\",le=\"0.005\"} 1"), "{text}");
        assert!(text.contains("drover_device_message_seconds_bucket{channel=\"up/update\",le=\"1\"} 2"), "{text}");
        assert!(text.contains("drover_device_message_seconds_count{channel=\"up/status\"} 1"), "{text}");
        assert!(text.contains("drover_device_message_wait_seconds_bucket{le=\"0.005\"} 2"), "{text}");
        assert!(text.contains("drover_device_message_wait_seconds_bucket{le=\"2.5\"} 2"), "{text}");
        assert!(text.contains("drover_device_message_wait_seconds_count 3"), "{text}");
    }
}
