//! The metrics pages: a device's charts (one per metric it reports) with its telemetry events,
//! the fleet dashboard (a metric over every device or a filter's devices, optionally split by
//! a tag, with the top devices), and the assets both draw with (uPlot, embedded and pinned).
//!
//! The pages are server-rendered shells: what the server knows cheaply (the device, the metrics
//! it reports, whether a filter is valid) is in the HTML, and `charts.js` fetches the series
//! from the same JSON API the CLI uses (`/api/v1/devices/{id}/metrics/…`, `/api/v1/metrics/fleet`,
//! `/api/v1/metrics/top`), which checks the role again. Every page here only reads, so the
//! viewer role sees all of it.

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::header;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, extract::rejection::QueryRejection};
use drover_proto::api::Role;
use minijinja::context;
use serde::{Deserialize, Serialize};

use super::{Flash, UiUser, error_page, merge, page_ctx, urlencode};
use crate::app::AppState;
use crate::auth::Principal;
use crate::db::{Filter, bind_all};
use crate::devices;
use crate::error::{AppError, AppResult};
use crate::telemetry::query::{self, Scope};
use crate::time::{now_ms, to_rfc3339};

const CHARTS_JS: &str = include_str!("../../assets/charts.js");
const CHARTS_CSS: &str = include_str!("../../assets/charts.css");
const UPLOT_JS: &str = include_str!("../../assets/vendor/uPlot-1.6.32.iife.min.js");
const UPLOT_CSS: &str = include_str!("../../assets/vendor/uPlot-1.6.32.min.css");
pub const UPLOT_LICENSE: &str = include_str!("../../assets/vendor/uPlot-1.6.32.LICENSE");

pub const TEMPLATES: &[(&str, &str)] = &[
    ("metrics.html", include_str!("../../templates/metrics.html")),
    ("metrics_device.html", include_str!("../../templates/metrics_device.html")),
    ("metrics_assets.html", include_str!("../../templates/metrics_assets.html")),
    ("metrics_fleet_panel.html", include_str!("../../templates/metrics_fleet_panel.html")),
    ("metrics_range.html", include_str!("../../templates/metrics_range.html")),
];

/// The ranges the pages offer, as `charts.js` knows them.
const RANGES: &[&str] = &["5m", "15m", "1h", "6h", "24h", "7d"];
/// Tag values a split draws at most, the most common first.
const SPLIT_VALUES: i64 = 8;
/// Metric names a chooser lists at most.
const MAX_NAMES: i64 = 500;

fn asset(content_type: &'static str, body: &'static str, immutable: bool) -> Response {
    // The vendored files carry their version in the name; Drover's own scripts change with
    // Drover, so the browser checks them again.
    let cache = if immutable { "public, max-age=31536000, immutable" } else { "no-cache" };
    ([(header::CONTENT_TYPE, content_type), (header::CACHE_CONTROL, cache)], body).into_response()
}

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/ui/metrics", get(fleet_page))
        .route("/ui/metrics/names", get(names))
        .route("/devices/{id}/metrics", get(device_page))
        .route("/assets/charts.js", get(|| async { asset("application/javascript", CHARTS_JS, false) }))
        .route("/assets/charts.css", get(|| async { asset("text/css", CHARTS_CSS, false) }))
        .route(
            "/assets/vendor/uPlot-1.6.32.iife.min.js",
            get(|| async { asset("application/javascript", UPLOT_JS, true) }),
        )
        .route("/assets/vendor/uPlot-1.6.32.min.css", get(|| async { asset("text/css", UPLOT_CSS, true) }))
}

/// The chart library's licence, for `/assets/licenses`.
pub fn licenses() -> String {
    format!("uPlot 1.6.32 (https://github.com/leeoniya/uPlot)\n\n{UPLOT_LICENSE}")
}

/// A range the pages offer; anything else falls back to the last hour.
fn range_or_default(r: Option<&str>) -> &'static str {
    r.and_then(|r| RANGES.iter().find(|k| **k == r)).copied().unwrap_or("1h")
}

/// The metric names the devices of a scope have reported, sorted.
async fn names_in(s: &AppState, p: &Principal, scope: &Scope) -> AppResult<Vec<String>> {
    p.require(Role::Viewer, "reading metrics")?;
    let (cond, binds) = query::scope_condition(&s.db, p.org(), scope).await?;
    let mut f = Filter::default();
    f.and(&format!("ms.device_id IN (SELECT d.id FROM devices d WHERE {cond})"), binds);
    let sql = format!("SELECT DISTINCT ms.name FROM metric_series ms{} ORDER BY ms.name LIMIT {MAX_NAMES}", f.sql());
    let rows: Vec<(String,)> = bind_all(sqlx::query_as(&sql), &f.binds).fetch_all(s.db.pool()).await?;
    Ok(rows.into_iter().map(|r| r.0).collect())
}

/// The most common values of a tag among the devices of a scope.
async fn tag_values(s: &AppState, p: &Principal, scope: &Scope, key: &str) -> AppResult<Vec<String>> {
    let (cond, binds) = query::scope_condition(&s.db, p.org(), scope).await?;
    let mut f = Filter::default();
    f.and("t.key = ?", [crate::db::Bind::Text(key.to_string())]);
    f.and(&format!("t.device_id IN (SELECT d.id FROM devices d WHERE {cond})"), binds);
    let sql = format!(
        "SELECT t.value, COUNT(*) AS n FROM device_tags t{} GROUP BY t.value ORDER BY n DESC, t.value LIMIT {SPLIT_VALUES}",
        f.sql()
    );
    let rows: Vec<(String, i64)> = bind_all(sqlx::query_as(&sql), &f.binds).fetch_all(s.db.pool()).await?;
    Ok(rows.into_iter().map(|r| r.0).collect())
}

/// A tag key as the filter language takes it.
fn check_tag_key(key: &str) -> AppResult<()> {
    let ok = !key.is_empty()
        && key.len() <= 64
        && key.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(AppError::BadRequest(format!(
            "invalid tag key {key:?} to split by: use 1 to 64 letters, digits, '_', '.' or '-'"
        )))
    }
}

#[derive(Debug, Deserialize)]
struct NamesQuery {
    group: Option<String>,
    filter: Option<String>,
}

#[derive(Serialize)]
struct Names {
    metrics: Vec<String>,
}

/// The metrics a group's or a filter's devices report, for the choosers `charts.js` fills.
async fn names(
    State(s): State<AppState>,
    UiUser(p): UiUser,
    q: Result<Query<NamesQuery>, QueryRejection>,
) -> AppResult<Json<Names>> {
    let Query(q) = q.map_err(|e| AppError::BadRequest(e.body_text()))?;
    let scope = match (q.group.filter(|g| !g.is_empty()), q.filter.filter(|f| !f.trim().is_empty())) {
        (Some(_), Some(_)) => return Err(AppError::BadRequest("give group or filter, not both".into())),
        (Some(g), None) => Scope::Group(g),
        (None, Some(f)) => Scope::Filter(crate::filter::check(&s.db, p.org(), &f).await?),
        (None, None) => Scope::All,
    };
    Ok(Json(Names { metrics: names_in(&s, &p, &scope).await? }))
}

#[derive(Debug, Default, Deserialize)]
struct FleetUi {
    metric: Option<String>,
    filter: Option<String>,
    /// A tag key: one line per value of it.
    split: Option<String>,
    range: Option<String>,
    /// What ranks the top devices: `avg`, `max` or `last`.
    by: Option<String>,
}

/// The fleet dashboard: a metric over the devices of a filter (all by default).
async fn fleet_page(State(s): State<AppState>, UiUser(p): UiUser, Query(q): Query<FleetUi>) -> Response {
    let r: AppResult<Html<String>> = async {
        p.require(Role::Viewer, "reading metrics")?;
        let ctx = page_ctx(&s, &p, "metrics", &Flash::default()).await?;
        let filter = q.filter.as_deref().map(str::trim).filter(|f| !f.is_empty()).map(str::to_string);
        let split = q.split.as_deref().map(str::trim).filter(|k| !k.is_empty()).map(str::to_string);
        // A filter that does not parse or names a missing group is said here, with where it
        // went wrong, and nothing is charted: charts of a different set of devices than the
        // one asked for would mislead.
        let mut filter_error = None;
        let mut caret = None;
        let scope = match &filter {
            None => Some(Scope::All),
            Some(f) => match drover_proto::filter::parse(f) {
                Err(e) => {
                    caret = Some(" ".repeat(e.column.saturating_sub(1)) + "^");
                    filter_error = Some(format!("invalid filter: {e}"));
                    None
                }
                Ok(_) => match crate::filter::check(&s.db, p.org(), f).await {
                    Ok(e) => Some(Scope::Filter(e)),
                    Err(e @ AppError::BadRequest(_)) => {
                        filter_error = Some(e.public_message());
                        None
                    }
                    Err(e) => return Err(e),
                },
            },
        };
        let mut split_error = None;
        let (metrics, split_values) = match &scope {
            Some(scope) => {
                let metrics = names_in(&s, &p, scope).await?;
                let values = match &split {
                    Some(k) => match check_tag_key(k) {
                        Ok(()) => tag_values(&s, &p, scope, k).await?,
                        Err(e) => {
                            split_error = Some(e.public_message());
                            Vec::new()
                        }
                    },
                    None => Vec::new(),
                };
                (metrics, values)
            }
            None => (Vec::new(), Vec::new()),
        };
        let metric = match q.metric.as_deref().filter(|m| !m.is_empty()) {
            Some(m) => {
                query::check_metric(m)?;
                Some(m.to_string())
            }
            None => metrics.iter().find(|m| *m == "cpu.percent").or_else(|| metrics.first()).cloned(),
        };
        let by = q.by.as_deref().filter(|b| matches!(*b, "avg" | "max" | "last")).unwrap_or("avg");
        // The range links keep the rest of the query (they work without JavaScript too).
        let mut range_query = String::new();
        for (k, v) in [("metric", &metric), ("filter", &filter), ("split", &split)] {
            if let Some(v) = v {
                range_query.push_str(&format!("{k}={}&", urlencode(v)));
            }
        }
        let extra = context! {
            range_query => range_query,
            metrics => metrics,
            metric => metric,
            filter => filter,
            filter_error => filter_error,
            caret => caret,
            split => split,
            split_error => split_error,
            split_values => serde_json::to_string(&split_values).map_err(AppError::internal)?,
            split_count => split_values.len(),
            range => range_or_default(q.range.as_deref()),
            by => by,
        };
        s.ui.render("metrics.html", merge(ctx, extra))
    }
    .await;
    r.map(IntoResponse::into_response).unwrap_or_else(|e| error_page(&s, e))
}

#[derive(Debug, Default, Deserialize)]
struct DeviceUi {
    range: Option<String>,
}

#[derive(Serialize)]
struct MetricRow {
    name: String,
    last_at: Option<String>,
    last_value: Option<f64>,
}

#[derive(Serialize)]
struct EventRow {
    at: String,
    name: String,
    severity: String,
    data: String,
    late: bool,
}

/// A device's charts: one per metric it has reported, and its telemetry events.
async fn device_page(
    State(s): State<AppState>,
    UiUser(p): UiUser,
    Path(id): Path<String>,
    Query(q): Query<DeviceUi>,
) -> Response {
    let r: AppResult<Html<String>> = async {
        let ctx = page_ctx(&s, &p, "devices", &Flash::default()).await?;
        let device = devices::get_device_detail(&s.db, &p, &id).await?;
        // The first 500 by name (a page of the API listing; the charts script reads the same).
        let mut metrics: Vec<MetricRow> = query::metric_names(&s.db, p.org(), &id, Some(crate::page::MAX_LIMIT), None)
            .await?
            .items
            .into_iter()
            .map(|m| MetricRow { name: m.name, last_at: m.last_t.map(to_rfc3339), last_value: m.last_value })
            .collect();
        // The device's health first, the agent's own metrics last (as charts.js orders them).
        let rank = |m: &str| match m {
            _ if m.starts_with("agent.") => 2,
            _ if m.starts_with("link.") || m == "uptime_s" => 1,
            _ => 0,
        };
        metrics.sort_by(|a, b| rank(&a.name).cmp(&rank(&b.name)).then_with(|| a.name.cmp(&b.name)));
        let now = now_ms();
        let events: Vec<EventRow> =
            query::device_events(&s.db, p.org(), &id, now - crate::telemetry::DAY_MS, now + 1, 50)
                .await?
                .into_iter()
                .map(|e| EventRow { at: to_rfc3339(e.ts), name: e.name, severity: e.severity, data: e.data, late: e.late })
                .collect();
        let extra =
            context! { d => device, metrics => metrics, events => events, range => range_or_default(q.range.as_deref()) };
        s.ui.render("metrics_device.html", merge(ctx, extra))
    }
    .await;
    r.map(IntoResponse::into_response).unwrap_or_else(|e| error_page(&s, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_fall_back_to_an_hour() {
        assert_eq!(range_or_default(Some("7d")), "7d");
        // Bad input: a range the page does not offer, and none.
        assert_eq!(range_or_default(Some("90d")), "1h");
        assert_eq!(range_or_default(None), "1h");
    }

    #[test]
    fn tag_keys_are_checked() {
        assert!(check_tag_key("site").is_ok());
        assert!(check_tag_key("hw.rev-2").is_ok());
        // Bad input: empty, a space and a quote, too long.
        assert!(check_tag_key("").is_err());
        assert!(check_tag_key("a b\"").is_err());
        assert!(check_tag_key(&"k".repeat(65)).is_err());
    }
}
