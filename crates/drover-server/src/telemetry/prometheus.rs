//! `GET /metrics/fleet`: fleet aggregates for Prometheus (a viewer's API token as the bearer
//! token). For each metric in `prometheus_metrics`, over the last five minutes: devices
//! reporting, mean of the devices' means, min, max, p50 and p95 — for the whole fleet, per
//! group and per value of each tag key in `prometheus_tags`. Cardinality is bounded: at most
//! [`MAX_GROUPS`] groups and [`MAX_VALUES`] values per tag key (the most common ones); when a
//! cap cuts, `drover_fleet_capped{dimension=…} 1` says so.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use drover_proto::api::Role;

use crate::app::AppState;
use crate::auth::Principal;
use crate::error::AppResult;

use super::query::{self, DeviceWindow, Scope, percentile};

pub const MAX_GROUPS: usize = 50;
pub const MAX_VALUES: usize = 50;
const WINDOW_MS: i64 = 5 * 60_000;

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn emit(out: &mut String, metric: &str, labels: &str, rows: &[&DeviceWindow]) {
    let mut means: Vec<f64> = rows.iter().map(|r| r.avg).collect();
    means.sort_unstable_by(f64::total_cmp);
    let m = escape(metric);
    let _ = writeln!(out, "drover_fleet_devices{{metric=\"{m}\",{labels}}} {}", means.len());
    if means.is_empty() {
        return;
    }
    let avg = super::query::mean(&means);
    let min = rows.iter().map(|r| r.min).fold(f64::INFINITY, f64::min);
    let max = rows.iter().map(|r| r.max).fold(f64::NEG_INFINITY, f64::max);
    for (name, v) in
        [("avg", avg), ("min", min), ("max", max), ("p50", percentile(&means, 50.0)), ("p95", percentile(&means, 95.0))]
    {
        let _ = writeln!(out, "drover_fleet_{name}{{metric=\"{m}\",{labels}}} {v}");
    }
}

/// The exposition text for the caller's organization.
pub async fn render(s: &AppState, p: &Principal, now: i64) -> AppResult<String> {
    p.require(Role::Viewer, "reading fleet metrics")?;
    let cfg = &s.config.telemetry;
    let mut out = String::new();
    out.push_str("# HELP drover_fleet_devices Devices that reported the metric in the last 5 minutes.\n");
    out.push_str("# TYPE drover_fleet_devices gauge\n");
    for n in ["avg", "min", "max", "p50", "p95"] {
        let _ = writeln!(
            out,
            "# HELP drover_fleet_{n} {n} of the metric over the last 5 minutes (avg, p50 and p95 across the devices' means)."
        );
        let _ = writeln!(out, "# TYPE drover_fleet_{n} gauge");
    }
    // Groups (bounded).
    let groups: Vec<(String, String)> =
        sqlx::query_as("SELECT id, name FROM device_groups WHERE org_id = $1 ORDER BY name")
            .bind(p.org().to_string())
            .fetch_all(s.db.pool())
            .await?;
    let mut capped: Vec<String> = Vec::new();
    if groups.len() > MAX_GROUPS {
        capped.push("group".into());
    }
    // Tag values per device for each key (bounded to the most common values).
    let mut tags: Vec<(String, HashMap<String, String>, Vec<String>)> = Vec::new();
    for key in &cfg.prometheus_tags {
        let rows: Vec<(String, String)> = sqlx::query_as(
            "SELECT t.device_id, t.value FROM device_tags t JOIN devices d ON d.id = t.device_id \
             WHERE d.org_id = $1 AND t.key = $2",
        )
        .bind(p.org().to_string())
        .bind(key.clone())
        .fetch_all(s.db.pool())
        .await?;
        let mut counts: HashMap<&str, usize> = HashMap::new();
        for (_, v) in &rows {
            *counts.entry(v.as_str()).or_default() += 1;
        }
        let mut values: Vec<(&str, usize)> = counts.into_iter().collect();
        values.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        if values.len() > MAX_VALUES {
            capped.push(format!("tag.{key}"));
        }
        let kept: Vec<String> = values.into_iter().take(MAX_VALUES).map(|(v, _)| v.to_string()).collect();
        let by_device = rows.into_iter().collect();
        tags.push((key.clone(), by_device, kept));
    }
    for metric in &cfg.prometheus_metrics {
        if query::check_metric(metric).is_err() {
            continue;
        }
        let all = query::top_window(&s.db, p.org(), &Scope::All, metric, now - WINDOW_MS, now).await?;
        emit(&mut out, metric, "scope=\"fleet\"", &all.iter().collect::<Vec<_>>());
        for (id, name) in groups.iter().take(MAX_GROUPS) {
            let rows =
                query::top_window(&s.db, p.org(), &Scope::Group(id.clone()), metric, now - WINDOW_MS, now).await?;
            emit(
                &mut out,
                metric,
                &format!("scope=\"group\",group=\"{}\"", escape(name)),
                &rows.iter().collect::<Vec<_>>(),
            );
        }
        for (key, by_device, kept) in &tags {
            for value in kept {
                let rows: Vec<&DeviceWindow> =
                    all.iter().filter(|d| by_device.get(&d.device_id) == Some(value)).collect();
                emit(
                    &mut out,
                    metric,
                    &format!("scope=\"tag\",tag=\"{}\",value=\"{}\"", escape(key), escape(value)),
                    &rows,
                );
            }
        }
    }
    out.push_str(
        "# HELP drover_fleet_capped 1 when a dimension had more values than are exposed (the most common are kept).\n",
    );
    out.push_str("# TYPE drover_fleet_capped gauge\n");
    for c in capped {
        let _ = writeln!(out, "drover_fleet_capped{{dimension=\"{}\"}} 1", escape(&c));
    }
    let st = &s.telemetry.stats;
    out.push_str("# HELP drover_telemetry_points_total Points this replica stored.\n# TYPE drover_telemetry_points_total counter\n");
    let _ = writeln!(out, "drover_telemetry_points_total {}", st.points.load(Ordering::Relaxed));
    out.push_str("# HELP drover_telemetry_late_points_total Late points this replica stored.\n# TYPE drover_telemetry_late_points_total counter\n");
    let _ = writeln!(out, "drover_telemetry_late_points_total {}", st.late_points.load(Ordering::Relaxed));
    out.push_str("# HELP drover_telemetry_batches_total Batches this replica wrote.\n# TYPE drover_telemetry_batches_total counter\n");
    let _ = writeln!(out, "drover_telemetry_batches_total {}", st.batches.load(Ordering::Relaxed));
    out.push_str("# HELP drover_telemetry_refused_points_total Points not stored: their time was outside the stored window (future, too_old) or their name would pass a series cap (series_limit).\n# TYPE drover_telemetry_refused_points_total counter\n");
    let _ = writeln!(
        out,
        "drover_telemetry_refused_points_total{{reason=\"future\"}} {}",
        st.refused_future.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        out,
        "drover_telemetry_refused_points_total{{reason=\"too_old\"}} {}",
        st.refused_old.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        out,
        "drover_telemetry_refused_points_total{{reason=\"series_limit\"}} {}",
        st.refused_series_points.load(Ordering::Relaxed)
    );
    out.push_str("# HELP drover_telemetry_refused_series_total Metric names left out of batches because a series cap was reached.\n# TYPE drover_telemetry_refused_series_total counter\n");
    let _ = writeln!(out, "drover_telemetry_refused_series_total {}", st.refused_series.load(Ordering::Relaxed));
    out.push_str("# HELP drover_telemetry_write_errors_total Failed telemetry transactions.\n# TYPE drover_telemetry_write_errors_total counter\n");
    let _ = writeln!(out, "drover_telemetry_write_errors_total {}", st.write_errors.load(Ordering::Relaxed));
    Ok(out)
}

pub async fn handler(State(s): State<AppState>, p: Principal) -> AppResult<Response> {
    let body = render(&s, &p, crate::time::now_ms()).await?;
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response())
}
