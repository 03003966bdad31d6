//! REST handlers for alerts, silences, notification channels and device rule sets, with
//! their own OpenAPI document merged into the server's (`crate::api::openapi_document`).

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use drover_proto::api::ErrorBody;
use utoipa::OpenApi;

use super::rules;
use super::types::*;
use crate::app::{ApiJson, ApiPath, ApiQuery, AppState};
use crate::auth::Principal;
use crate::error::{AppError, AppResult};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/alert-rules", get(list_rules).post(create_rule))
        .route("/alert-rules/{id}", get(get_rule).patch(update_rule).delete(delete_rule))
        .route("/alerts", get(list_alerts))
        .route("/alerts/history", get(alert_history))
        .route("/silences", get(list_silences).post(create_silence))
        .route("/silences/{id}/expire", post(expire_silence))
        .route("/notification-channels", get(list_channels).post(create_channel))
        .route("/notification-channels/{id}", axum::routing::delete(delete_channel))
        .route("/notification-channels/{id}/test", post(test_channel))
        .route("/notifications", get(list_deliveries))
        .route("/device-rule-sets", get(list_rule_sets))
        .route("/device-rule-sets/{group}", get(get_rule_set).put(put_rule_set).delete(delete_rule_set))
        .route("/devices/{id}/rules", get(device_rules))
}

#[derive(OpenApi)]
#[openapi(
    paths(
        list_rules, create_rule, get_rule, update_rule, delete_rule, list_alerts, alert_history,
        list_silences, create_silence, expire_silence, list_channels, create_channel, delete_channel,
        test_channel, list_deliveries, list_rule_sets, get_rule_set, put_rule_set, delete_rule_set, device_rules,
    ),
    tags(
        (name = "alerts", description = "Alert rules, alerts and their history, silences (docs/alerts.md)"),
        (name = "notifications", description = "Notification channels (webhook, Slack-compatible, email) and the delivery log"),
        (name = "device-rules", description = "Rule sets pushed to the devices of a group and evaluated by the agent (docs/alerts.md)"),
    )
)]
pub struct AlertsApi;

#[utoipa::path(get, path = "/api/v1/alert-rules", tag = "alerts",
    responses((status = 200, body = Vec<AlertRule>), (status = 401, body = ErrorBody)))]
async fn list_rules(State(s): State<AppState>, p: Principal) -> AppResult<axum::Json<Vec<AlertRule>>> {
    rules::list_rules(&s.db, &p).await.map(axum::Json)
}

#[utoipa::path(post, path = "/api/v1/alert-rules", tag = "alerts", request_body = CreateAlertRule,
    responses((status = 201, body = AlertRule), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody),
              (status = 409, body = ErrorBody)))]
async fn create_rule(
    State(s): State<AppState>,
    p: Principal,
    ApiJson(req): ApiJson<CreateAlertRule>,
) -> AppResult<Response> {
    let r = rules::create_rule(&s.db, &p, req).await?;
    Ok((StatusCode::CREATED, axum::Json(r)).into_response())
}

#[utoipa::path(get, path = "/api/v1/alert-rules/{id}", tag = "alerts", params(("id" = String, Path, description = "id or name")),
    responses((status = 200, body = AlertRule), (status = 404, body = ErrorBody)))]
async fn get_rule(
    State(s): State<AppState>,
    p: Principal,
    ApiPath(id): ApiPath<String>,
) -> AppResult<axum::Json<AlertRule>> {
    rules::get_rule(&s.db, &p, &id).await.map(axum::Json)
}

#[utoipa::path(patch, path = "/api/v1/alert-rules/{id}", tag = "alerts", request_body = UpdateAlertRule,
    params(("id" = String, Path, description = "id or name")),
    responses((status = 200, body = AlertRule), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody),
              (status = 404, body = ErrorBody)))]
async fn update_rule(
    State(s): State<AppState>,
    p: Principal,
    ApiPath(id): ApiPath<String>,
    ApiJson(req): ApiJson<UpdateAlertRule>,
) -> AppResult<axum::Json<AlertRule>> {
    rules::update_rule(&s.db, &p, &id, req).await.map(axum::Json)
}

#[utoipa::path(delete, path = "/api/v1/alert-rules/{id}", tag = "alerts", params(("id" = String, Path, description = "id or name")),
    responses((status = 204), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn delete_rule(State(s): State<AppState>, p: Principal, ApiPath(id): ApiPath<String>) -> AppResult<StatusCode> {
    rules::delete_rule(&s.db, &p, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/api/v1/alerts", tag = "alerts", params(AlertListQuery),
    responses((status = 200, body = inline(drover_proto::api::Page<Alert>), description = "Firing first, then pending, newest first"), (status = 400, body = ErrorBody)))]
async fn list_alerts(
    State(s): State<AppState>,
    p: Principal,
    ApiQuery(q): ApiQuery<AlertListQuery>,
) -> AppResult<axum::Json<drover_proto::api::Page<Alert>>> {
    rules::list_alerts(&s.db, &p, &q).await.map(axum::Json)
}

#[utoipa::path(get, path = "/api/v1/alerts/history", tag = "alerts", params(HistoryQuery),
    responses((status = 200, body = inline(drover_proto::api::Page<AlertHistoryEntry>)), (status = 400, body = ErrorBody)))]
async fn alert_history(
    State(s): State<AppState>,
    p: Principal,
    ApiQuery(q): ApiQuery<HistoryQuery>,
) -> AppResult<axum::Json<drover_proto::api::Page<AlertHistoryEntry>>> {
    rules::history(&s.db, &p, &q).await.map(axum::Json)
}

#[utoipa::path(get, path = "/api/v1/silences", tag = "alerts", responses((status = 200, body = Vec<Silence>)))]
async fn list_silences(State(s): State<AppState>, p: Principal) -> AppResult<axum::Json<Vec<Silence>>> {
    rules::list_silences(&s.db, &p).await.map(axum::Json)
}

#[utoipa::path(post, path = "/api/v1/silences", tag = "alerts", request_body = CreateSilence,
    responses((status = 201, body = Silence), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody)))]
async fn create_silence(
    State(s): State<AppState>,
    p: Principal,
    ApiJson(req): ApiJson<CreateSilence>,
) -> AppResult<Response> {
    let r = rules::create_silence(&s.db, &p, req).await?;
    Ok((StatusCode::CREATED, axum::Json(r)).into_response())
}

#[utoipa::path(post, path = "/api/v1/silences/{id}/expire", tag = "alerts", params(("id" = String, Path)),
    responses((status = 200, body = Silence), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn expire_silence(
    State(s): State<AppState>,
    p: Principal,
    ApiPath(id): ApiPath<String>,
) -> AppResult<axum::Json<Silence>> {
    rules::expire_silence(&s.db, &p, &id).await.map(axum::Json)
}

#[utoipa::path(get, path = "/api/v1/notification-channels", tag = "notifications",
    responses((status = 200, body = Vec<Channel>)))]
async fn list_channels(State(s): State<AppState>, p: Principal) -> AppResult<axum::Json<Vec<Channel>>> {
    rules::list_channels(&s.db, &p).await.map(axum::Json)
}

#[utoipa::path(post, path = "/api/v1/notification-channels", tag = "notifications", request_body = CreateChannel,
    responses((status = 201, body = CreatedChannel, description = "A webhook channel's secret is in `secret`, shown this once"),
              (status = 400, body = ErrorBody), (status = 403, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn create_channel(
    State(s): State<AppState>,
    p: Principal,
    ApiJson(req): ApiJson<CreateChannel>,
) -> AppResult<Response> {
    let ready = !s.config.alerts.smtp_server.is_empty() && !s.config.alerts.smtp_from.is_empty();
    let allow = super::target::AllowList::parse(&s.config.alerts.notify_allow_hosts).map_err(AppError::Internal)?;
    let r = rules::create_channel(&s.db, &p, req, ready, &allow).await?;
    Ok((StatusCode::CREATED, axum::Json(r)).into_response())
}

#[utoipa::path(delete, path = "/api/v1/notification-channels/{id}", tag = "notifications", params(("id" = String, Path)),
    responses((status = 204), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn delete_channel(
    State(s): State<AppState>,
    p: Principal,
    ApiPath(id): ApiPath<String>,
) -> AppResult<StatusCode> {
    rules::delete_channel(&s.db, &p, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/api/v1/notification-channels/{id}/test", tag = "notifications", params(("id" = String, Path)),
    responses((status = 200, body = Delivery, description = "Sent (or not: see status and last_error)"),
              (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn test_channel(
    State(s): State<AppState>,
    p: Principal,
    ApiPath(id): ApiPath<String>,
) -> AppResult<axum::Json<Delivery>> {
    let notifier = super::notify::Notifier::new(s.config.alerts.clone()).map_err(AppError::Internal)?;
    super::notify::test_channel(&s.db, &notifier, &p, &id).await.map(axum::Json)
}

#[utoipa::path(get, path = "/api/v1/notifications", tag = "notifications", params(DeliveryQuery),
    responses((status = 200, body = Vec<Delivery>)))]
async fn list_deliveries(
    State(s): State<AppState>,
    p: Principal,
    ApiQuery(q): ApiQuery<DeliveryQuery>,
) -> AppResult<axum::Json<Vec<Delivery>>> {
    rules::deliveries(&s.db, &p, &q).await.map(axum::Json)
}

#[utoipa::path(get, path = "/api/v1/device-rule-sets", tag = "device-rules", responses((status = 200, body = Vec<DeviceRuleSet>)))]
async fn list_rule_sets(State(s): State<AppState>, p: Principal) -> AppResult<axum::Json<Vec<DeviceRuleSet>>> {
    crate::device_rules::list(&s.db, &p).await.map(axum::Json)
}

#[utoipa::path(get, path = "/api/v1/device-rule-sets/{group}", tag = "device-rules", params(("group" = String, Path, description = "group id or name")),
    responses((status = 200, body = DeviceRuleSet), (status = 404, body = ErrorBody)))]
async fn get_rule_set(
    State(s): State<AppState>,
    p: Principal,
    ApiPath(g): ApiPath<String>,
) -> AppResult<axum::Json<DeviceRuleSet>> {
    crate::device_rules::get(&s.db, &p, &g).await.map(axum::Json)
}

#[utoipa::path(put, path = "/api/v1/device-rule-sets/{group}", tag = "device-rules", request_body = PutDeviceRuleSet,
    params(("group" = String, Path, description = "group id or name")),
    responses((status = 200, body = DeviceRuleSet), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody),
              (status = 404, body = ErrorBody)))]
async fn put_rule_set(
    State(s): State<AppState>,
    p: Principal,
    ApiPath(g): ApiPath<String>,
    ApiJson(req): ApiJson<PutDeviceRuleSet>,
) -> AppResult<axum::Json<DeviceRuleSet>> {
    crate::device_rules::put(&s.db, &p, &g, req.rules).await.map(axum::Json)
}

#[utoipa::path(delete, path = "/api/v1/device-rule-sets/{group}", tag = "device-rules", params(("group" = String, Path)),
    responses((status = 204), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn delete_rule_set(
    State(s): State<AppState>,
    p: Principal,
    ApiPath(g): ApiPath<String>,
) -> AppResult<StatusCode> {
    crate::device_rules::delete(&s.db, &p, &g).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/api/v1/devices/{id}/rules", tag = "device-rules", params(("id" = String, Path)),
    responses((status = 200, body = DeviceRulesView), (status = 404, body = ErrorBody)))]
async fn device_rules(
    State(s): State<AppState>,
    p: Principal,
    ApiPath(id): ApiPath<String>,
) -> AppResult<axum::Json<DeviceRulesView>> {
    crate::device_rules::device_view(&s.db, &p, &id).await.map(axum::Json)
}
