//! REST handlers for telemetry (`/api/v1`): a device's metrics, series and events, fleet
//! aggregates, top devices, logs on demand. Reading needs the viewer role, logs the operator.

use axum::extract::State;
use axum::routing::{get, post};
use axum::{Json, Router};
use drover_proto::api::{ErrorBody, Page, Role};
use serde::Deserialize;
use utoipa::OpenApi;

use crate::app::{ApiJson, ApiPath, ApiQuery, AppState};
use crate::auth::Principal;
use crate::error::{AppError, AppResult};
use crate::time::now_ms;

use super::logs::{LogsAnswer, LogsQuery};
use super::query::{self, FleetSeries, MetricInfo, Scope, Series, TelemetryEvent, TopBy, TopRow};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/devices/{id}/metrics", get(device_metrics))
        .route("/devices/{id}/metrics/{metric}", get(device_series))
        .route("/devices/{id}/telemetry-events", get(device_events))
        .route("/devices/{id}/logs", post(device_logs))
        .route("/devices/{id}/logs/{request}", get(device_logs_answer))
        .route("/metrics/fleet", get(fleet_metric))
        .route("/metrics/top", get(top_devices))
}

#[derive(OpenApi)]
#[openapi(
    paths(device_metrics, device_series, device_events, device_logs, device_logs_answer, fleet_metric, top_devices),
    components(schemas(MetricInfo, Series, query::SeriesBucket, query::Resolution, FleetSeries, query::FleetBucket,
        TopRow, TopBy, TelemetryEvent, LogsQuery, LogsAnswer)),
    tags((name = "telemetry", description = "Device metrics and events, fleet aggregates, logs on demand (docs/telemetry-server.md)"))
)]
pub struct TelemetryApi;

/// A page of a device's metrics.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct MetricsQuery {
    /// Metrics per page (default 50, at most 500).
    pub limit: Option<u32>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

/// A range: `from`/`to` as Unix ms, RFC 3339, `now` or `now-24h`; `step` as `10s`, `5m`, `1h`.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct RangeQuery {
    /// Start (default: `to` minus 1 hour).
    pub from: Option<String>,
    /// End, exclusive (default: now).
    pub to: Option<String>,
    /// Bucket size (default: about 300 buckets). Whole hours read the 1-hour rollups, whole
    /// minutes the 1-minute rollups, finer steps the raw points.
    pub step: Option<String>,
}

fn scope(group: Option<String>, filter: Option<String>) -> AppResult<Scope> {
    match (group, filter) {
        (Some(_), Some(_)) => Err(AppError::BadRequest("give group or filter, not both".into())),
        (Some(g), None) => Ok(Scope::Group(g)),
        (None, Some(f)) => Ok(Scope::Filter(crate::filter::parse(&f)?)),
        (None, None) => Ok(Scope::All),
    }
}

/// Checks the groups a filter names.
async fn checked(s: &AppState, p: &Principal, scope: Scope) -> AppResult<Scope> {
    if let Scope::Filter(e) = &scope {
        for name in e.group_names() {
            crate::filter::check(&s.db, p.org(), &format!("group = {name:?}")).await?;
        }
    }
    Ok(scope)
}

#[utoipa::path(get, path = "/api/v1/devices/{id}/metrics", tag = "telemetry", params(("id" = String, Path, description = "Device id"), MetricsQuery),
    responses((status = 200, body = Page<MetricInfo>, description = "The metrics the device has reported, by name, with their newest value; paginated"), (status = 400, body = ErrorBody, description = "Bad limit or cursor"), (status = 404, body = ErrorBody)))]
async fn device_metrics(
    State(s): State<AppState>,
    p: Principal,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<MetricsQuery>,
) -> AppResult<Json<Page<MetricInfo>>> {
    p.require(Role::Viewer, "reading metrics")?;
    Ok(Json(query::metric_names(&s.db, p.org(), &id, q.limit, q.cursor.as_deref()).await?))
}

#[utoipa::path(get, path = "/api/v1/devices/{id}/metrics/{metric}", tag = "telemetry",
    params(("id" = String, Path, description = "Device id"), ("metric" = String, Path, description = "Metric name"), RangeQuery),
    responses((status = 200, body = Series, description = "The series in buckets of `step`"), (status = 400, body = ErrorBody, description = "Bad range, step or metric name"), (status = 404, body = ErrorBody)))]
async fn device_series(
    State(s): State<AppState>,
    p: Principal,
    ApiPath((id, metric)): ApiPath<(String, String)>,
    ApiQuery(q): ApiQuery<RangeQuery>,
) -> AppResult<Json<Series>> {
    p.require(Role::Viewer, "reading metrics")?;
    let r = query::range(q.from.as_deref(), q.to.as_deref(), q.step.as_deref(), now_ms(), super::HOUR_MS)?;
    Ok(Json(query::series(&s.db, p.org(), &id, &metric, r).await?))
}

#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct EventsQuery {
    /// Start (default: 24 hours before `to`).
    pub from: Option<String>,
    /// End, exclusive (default: now).
    pub to: Option<String>,
    /// Most events (default 100, at most 10,000).
    pub limit: Option<u32>,
}

#[utoipa::path(get, path = "/api/v1/devices/{id}/telemetry-events", tag = "telemetry",
    params(("id" = String, Path, description = "Device id"), EventsQuery),
    responses((status = 200, body = [TelemetryEvent], description = "The device's events, newest first"), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn device_events(
    State(s): State<AppState>,
    p: Principal,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<EventsQuery>,
) -> AppResult<Json<Vec<TelemetryEvent>>> {
    p.require(Role::Viewer, "reading events")?;
    let r = query::range(q.from.as_deref(), q.to.as_deref(), None, now_ms(), super::DAY_MS)?;
    Ok(Json(query::device_events(&s.db, p.org(), &id, r.from, r.to, q.limit.unwrap_or(100)).await?))
}

#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct FleetQuery {
    /// Metric name.
    pub metric: String,
    /// A group, by id or name.
    pub group: Option<String>,
    /// A device filter (docs/filters.md), e.g. `tag.site = "berlin"`.
    pub filter: Option<String>,
    pub from: Option<String>,
    pub to: Option<String>,
    pub step: Option<String>,
}

#[utoipa::path(get, path = "/api/v1/metrics/fleet", tag = "telemetry", params(FleetQuery),
    responses((status = 200, body = FleetSeries, description = "Per bucket: devices, avg of the devices' means, min, max, p50 and p95 across devices"),
              (status = 400, body = ErrorBody, description = "Bad range, step, metric or filter"), (status = 404, body = ErrorBody, description = "No such group")))]
async fn fleet_metric(
    State(s): State<AppState>,
    p: Principal,
    ApiQuery(q): ApiQuery<FleetQuery>,
) -> AppResult<Json<FleetSeries>> {
    p.require(Role::Viewer, "reading metrics")?;
    let scope = checked(&s, &p, scope(q.group, q.filter)?).await?;
    let r = query::range(q.from.as_deref(), q.to.as_deref(), q.step.as_deref(), now_ms(), super::DAY_MS)?;
    Ok(Json(query::fleet(&s.db, p.org(), &scope, &q.metric, r).await?))
}

#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct TopQuery {
    /// Metric name.
    pub metric: String,
    /// Devices (default 10, at most 1000).
    pub n: Option<u32>,
    /// `avg` (default), `max` or `last`.
    pub by: Option<TopBy>,
    pub group: Option<String>,
    pub filter: Option<String>,
    /// Start (default: 1 hour before `to`).
    pub from: Option<String>,
    pub to: Option<String>,
}

#[utoipa::path(get, path = "/api/v1/metrics/top", tag = "telemetry", params(TopQuery),
    responses((status = 200, body = [TopRow], description = "The devices with the highest values, highest first"), (status = 400, body = ErrorBody)))]
async fn top_devices(
    State(s): State<AppState>,
    p: Principal,
    ApiQuery(q): ApiQuery<TopQuery>,
) -> AppResult<Json<Vec<TopRow>>> {
    p.require(Role::Viewer, "reading metrics")?;
    let scope = checked(&s, &p, scope(q.group, q.filter)?).await?;
    let r = query::range(q.from.as_deref(), q.to.as_deref(), None, now_ms(), super::HOUR_MS)?;
    let by = q.by.unwrap_or(TopBy::Avg);
    Ok(Json(query::top(&s.db, p.org(), &scope, &q.metric, (r.from, r.to), by, q.n.unwrap_or(10)).await?))
}

#[utoipa::path(post, path = "/api/v1/devices/{id}/logs", tag = "telemetry", params(("id" = String, Path, description = "Device id")), request_body = LogsQuery,
    responses((status = 200, body = LogsAnswer, description = "The device's answer, or answered = false after the timeout"),
              (status = 400, body = ErrorBody), (status = 403, body = ErrorBody, description = "Needs the operator role"), (status = 404, body = ErrorBody),
              (status = 409, body = ErrorBody, description = "The device is offline or not accepted")))]
async fn device_logs(
    State(s): State<AppState>,
    p: Principal,
    ApiPath(id): ApiPath<String>,
    ApiJson(q): ApiJson<LogsQuery>,
) -> AppResult<Json<LogsAnswer>> {
    Ok(Json(super::logs::request(&s.db, &s.telemetry, &p, &id, q).await?))
}

#[utoipa::path(get, path = "/api/v1/devices/{id}/logs/{request}", tag = "telemetry",
    params(("id" = String, Path, description = "Device id"), ("request" = String, Path, description = "Request id")),
    responses((status = 200, body = LogsAnswer), (status = 404, body = ErrorBody)))]
async fn device_logs_answer(
    State(s): State<AppState>,
    p: Principal,
    ApiPath((id, request)): ApiPath<(String, String)>,
) -> AppResult<Json<LogsAnswer>> {
    Ok(Json(super::logs::get(&s.db, &p, &id, &request).await?))
}
