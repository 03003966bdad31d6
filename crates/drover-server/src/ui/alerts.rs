//! The alert pages: current alerts with the history and silences (`/alerts`), rules and
//! notification channels with a test-send button (`/alerts/rules`), and device rule sets
//! (`/device-rules`). Every change goes through the same operations as the API.

use axum::Router;
use axum::extract::{Form, Path, Query, State};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use minijinja::context;
use serde::Deserialize;

use super::{CsrfForm, Flash, UiUser, back, check_csrf, device_names, error_page, merge, page_ctx};
use crate::alerts::rules;
use crate::alerts::types::{
    AbsenceMode, Aggregate, AlertListQuery, CmpOp, Condition, CreateAlertRule, CreateChannel, CreateSilence,
    HistoryQuery, UpdateAlertRule,
};
use crate::app::AppState;
use crate::error::{AppError, AppResult};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/alerts", get(alerts_page))
        .route("/alerts/silences", post(silence_create))
        .route("/alerts/silences/{id}/expire", post(silence_expire))
        .route("/alerts/rules", get(rules_page).post(rule_create))
        .route("/alerts/rules/{id}/enable", post(rule_enable))
        .route("/alerts/rules/{id}/disable", post(rule_disable))
        .route("/alerts/rules/{id}/delete", post(rule_delete))
        .route("/alerts/channels", post(channel_create))
        .route("/alerts/channels/{id}/test", post(channel_test))
        .route("/alerts/channels/{id}/delete", post(channel_delete))
        .route("/device-rules", get(device_rules_page).post(device_rules_set))
}

#[derive(Deserialize, Default)]
struct FlashQuery {
    notice: Option<String>,
    error: Option<String>,
}

async fn alerts_page(State(s): State<AppState>, UiUser(p): UiUser, Query(q): Query<FlashQuery>) -> Response {
    let flash = Flash { notice: q.notice, error: q.error };
    render_alerts(&s, &p, flash, None, Default::default()).await
}

/// The alerts page; after a failed silence, with its form as typed and the error under the field.
async fn render_alerts(
    s: &AppState,
    p: &crate::auth::Principal,
    flash: Flash,
    form: Option<&SilenceForm>,
    errors: std::collections::BTreeMap<&'static str, String>,
) -> Response {
    let status = if errors.is_empty() { axum::http::StatusCode::OK } else { axum::http::StatusCode::BAD_REQUEST };
    let r: AppResult<Html<String>> = async {
        let ctx = page_ctx(s, p, "alerts", &flash).await?;
        let current = rules::list_alerts(&s.db, p, &AlertListQuery::default()).await?.items;
        let history = rules::history(&s.db, p, &HistoryQuery { limit: Some(50), ..Default::default() }).await?;
        let silences = rules::list_silences(&s.db, p).await?;
        let rule_list = rules::list_rules(&s.db, p).await?;
        let ids = current.iter().filter_map(|a| a.device_id.as_deref());
        let names = device_names(s, p, ids.chain(history.items.iter().filter_map(|e| e.device_id.as_deref()))).await?;
        s.ui.render(
            "alerts.html",
            merge(
                ctx,
                context! {
                    alerts => current, history => history.items, silences => silences, rules => rule_list,
                    names => names, sf => form, errors => errors,
                },
            ),
        )
    }
    .await;
    match r {
        Ok(html) => (status, html).into_response(),
        Err(e) => error_page(s, e),
    }
}

#[derive(Deserialize, serde::Serialize)]
struct SilenceForm {
    #[serde(skip_serializing)]
    csrf: String,
    rule: Option<String>,
    filter: Option<String>,
    hours: Option<String>,
    reason: String,
}

async fn silence_create(State(s): State<AppState>, UiUser(p): UiUser, Form(f): Form<SilenceForm>) -> Response {
    if let Err(e) = check_csrf(&p, &f.csrf) {
        return error_page(&s, e);
    }
    let again = |field: &'static str, msg: String| {
        let f = &f;
        let s = &s;
        let p = &p;
        async move { render_alerts(s, p, Flash::default(), Some(f), [(field, msg)].into_iter().collect()).await }
    };
    let hours: f64 = match f.hours.as_deref().unwrap_or("1").trim().parse() {
        Ok(h) if h > 0.0 && h <= 8760.0 => h,
        _ => return again("hours", "give the duration in hours (up to a year)".into()).await,
    };
    let req = CreateSilence {
        rule: f.rule.clone().filter(|r| !r.is_empty()),
        filter: f.filter.clone().filter(|r| !r.trim().is_empty()),
        starts_at: None,
        ends_at: None,
        duration_s: Some((hours * 3600.0) as u64),
        reason: f.reason.clone(),
    };
    match rules::create_silence(&s.db, &p, req).await {
        Ok(_) => back("/alerts", Ok("Silence created.".to_string())),
        Err(e @ AppError::BadRequest(_)) => {
            let msg = e.public_message();
            let field = if msg.contains("filter") {
                "filter"
            } else if msg.contains("reason") {
                "reason"
            } else {
                "rule"
            };
            again(field, msg).await
        }
        Err(e) => back("/alerts", Err(e)),
    }
}

async fn silence_expire(
    State(s): State<AppState>,
    UiUser(p): UiUser,
    Path(id): Path<String>,
    Form(f): Form<CsrfForm>,
) -> Response {
    if let Err(e) = check_csrf(&p, &f.csrf) {
        return error_page(&s, e);
    }
    back("/alerts", rules::expire_silence(&s.db, &p, &id).await.map(|_| "Silence expired.".to_string()))
}

async fn rules_page(State(s): State<AppState>, UiUser(p): UiUser, Query(q): Query<FlashQuery>) -> Response {
    let flash = Flash { notice: q.notice, error: q.error };
    render_rules(&s, &p, flash, None, None).await
}

/// The fields of the rule form a message names, the first it names.
const RULE_FIELDS: &[&str] =
    &["filter", "metric", "threshold", "window", "aggregate", "minutes", "event", "percent", "channel", "name"];

/// The rules page; after a failed create, with the form as typed and the error under the field
/// it is about (or above the form).
async fn render_rules(
    s: &AppState,
    p: &crate::auth::Principal,
    mut flash: Flash,
    form: Option<&RuleForm>,
    error: Option<AppError>,
) -> Response {
    let status = error.as_ref().map(AppError::status).unwrap_or(axum::http::StatusCode::OK);
    let mut errors = std::collections::BTreeMap::new();
    if let Some(e) = error {
        let msg = e.public_message();
        match RULE_FIELDS.iter().find(|f| msg.contains(*f)) {
            Some(&f) if matches!(e, AppError::BadRequest(_) | AppError::Conflict(_)) => {
                errors.insert(if f == "window" { "window_min" } else { f }, msg);
            }
            _ => flash.error = Some(msg),
        }
    }
    let r: AppResult<Html<String>> = async {
        let ctx = page_ctx(s, p, "alerts", &flash).await?;
        let rule_list = rules::list_rules(&s.db, p).await?;
        let channels = rules::list_channels(&s.db, p).await?;
        let deliveries = rules::deliveries(&s.db, p, &Default::default()).await?;
        let names = device_names(s, p, deliveries.iter().filter_map(|d| d.device_id.as_deref())).await?;
        let extra = context! {
            rules => rule_list, channels => channels, deliveries => deliveries, names => names, rf => form,
            errors => errors,
        };
        s.ui.render("alerts_rules.html", merge(ctx, extra))
    }
    .await;
    match r {
        Ok(html) => (status, html).into_response(),
        Err(e) => error_page(s, e),
    }
}

#[derive(Deserialize, serde::Serialize)]
struct RuleForm {
    #[serde(skip_serializing)]
    csrf: String,
    name: String,
    kind: String,
    severity: Option<String>,
    filter: Option<String>,
    metric: Option<String>,
    op: Option<String>,
    threshold: Option<String>,
    window_min: Option<String>,
    aggregate: Option<String>,
    minutes: Option<String>,
    event: Option<String>,
    percent: Option<String>,
    channel: Option<String>,
}

fn num<T: std::str::FromStr>(v: &Option<String>, what: &str) -> AppResult<T> {
    v.as_deref()
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| AppError::BadRequest(format!("give a number for {what}")))
}

fn condition_of(f: &RuleForm) -> AppResult<Condition> {
    let op = || -> AppResult<CmpOp> {
        serde_json::from_value(serde_json::Value::String(f.op.clone().unwrap_or_default()))
            .map_err(|_| AppError::BadRequest("choose a comparison".into()))
    };
    let agg = || -> AppResult<Aggregate> {
        serde_json::from_value(serde_json::Value::String(f.aggregate.clone().unwrap_or_else(|| "avg".into())))
            .map_err(|_| AppError::BadRequest("choose avg, min, max or every".into()))
    };
    let metric = || f.metric.clone().unwrap_or_default().trim().to_string();
    Ok(match f.kind.as_str() {
        "threshold" | "fleet_metric" => {
            let (metric, op, threshold, window_s, aggregate) = (
                metric(),
                op()?,
                num(&f.threshold, "the threshold")?,
                num::<u64>(&f.window_min, "the window")? * 60,
                agg()?,
            );
            if f.kind == "threshold" {
                Condition::Threshold { metric, op, threshold, window_s, aggregate }
            } else {
                Condition::FleetMetric { metric, op, threshold, window_s, aggregate }
            }
        }
        "offline" => Condition::Absence { mode: AbsenceMode::Offline, minutes: num(&f.minutes, "the minutes")? },
        "silent" => Condition::Absence { mode: AbsenceMode::Silent, minutes: num(&f.minutes, "the minutes")? },
        "event" => Condition::Event {
            name: f.event.clone().unwrap_or_default().trim().to_string(),
            min_severity: None,
            resolve_after_s: 300,
        },
        "fleet_offline" => Condition::FleetOffline { percent: num(&f.percent, "the percentage")? },
        _ => return Err(AppError::BadRequest("choose what the rule watches".into())),
    })
}

async fn rule_create(State(s): State<AppState>, UiUser(p): UiUser, Form(f): Form<RuleForm>) -> Response {
    if let Err(e) = check_csrf(&p, &f.csrf) {
        return error_page(&s, e);
    }
    let condition = match condition_of(&f) {
        Ok(c) => c,
        Err(e) => return render_rules(&s, &p, Flash::default(), Some(&f), Some(e)).await,
    };
    let req = CreateAlertRule {
        name: f.name.trim().to_string(),
        severity: f.severity.clone().unwrap_or_else(|| "warning".into()),
        filter: f.filter.clone().filter(|v| !v.trim().is_empty()),
        group: None,
        condition,
        pending_s: 0,
        flap_window_s: 600,
        flap_changes: 4,
        channels: f.channel.clone().filter(|c| !c.is_empty()).into_iter().collect(),
        enabled: true,
    };
    match rules::create_rule(&s.db, &p, req).await {
        Ok(r) => back("/alerts/rules", Ok(format!("Rule {} created.", r.name))),
        Err(e @ AppError::Forbidden(_)) => back("/alerts/rules", Err(e)),
        Err(e) => render_rules(&s, &p, Flash::default(), Some(&f), Some(e)).await,
    }
}

async fn set_enabled(s: AppState, p: crate::auth::Principal, id: String, csrf: String, on: bool) -> Response {
    if let Err(e) = check_csrf(&p, &csrf) {
        return error_page(&s, e);
    }
    let req = UpdateAlertRule { enabled: Some(on), ..Default::default() };
    back(
        "/alerts/rules",
        rules::update_rule(&s.db, &p, &id, req)
            .await
            .map(|r| format!("Rule {} {}.", r.name, if on { "enabled" } else { "disabled" })),
    )
}

async fn rule_enable(
    State(s): State<AppState>,
    UiUser(p): UiUser,
    Path(id): Path<String>,
    Form(f): Form<CsrfForm>,
) -> Response {
    set_enabled(s, p, id, f.csrf, true).await
}

async fn rule_disable(
    State(s): State<AppState>,
    UiUser(p): UiUser,
    Path(id): Path<String>,
    Form(f): Form<CsrfForm>,
) -> Response {
    set_enabled(s, p, id, f.csrf, false).await
}

async fn rule_delete(
    State(s): State<AppState>,
    UiUser(p): UiUser,
    Path(id): Path<String>,
    Form(f): Form<CsrfForm>,
) -> Response {
    if let Err(e) = check_csrf(&p, &f.csrf) {
        return error_page(&s, e);
    }
    back("/alerts/rules", rules::delete_rule(&s.db, &p, &id).await.map(|()| "Rule deleted.".to_string()))
}

#[derive(Deserialize)]
struct ChannelForm {
    csrf: String,
    name: String,
    kind: String,
    target: String,
}

async fn channel_create(State(s): State<AppState>, UiUser(p): UiUser, Form(f): Form<ChannelForm>) -> Response {
    if let Err(e) = check_csrf(&p, &f.csrf) {
        return error_page(&s, e);
    }
    let ready = !s.config.alerts.smtp_server.is_empty() && !s.config.alerts.smtp_from.is_empty();
    let req = CreateChannel { name: f.name, kind: f.kind, target: f.target };
    let allow = crate::alerts::target::AllowList::parse(&s.config.alerts.notify_allow_hosts).unwrap_or_default();
    back(
        "/alerts/rules",
        rules::create_channel(&s.db, &p, req, ready, &allow).await.map(|c| match c.secret {
            Some(secret) => {
                format!("Channel {} created. Its signing secret, shown this once: {secret}", c.channel.name)
            }
            None => format!("Channel {} created.", c.channel.name),
        }),
    )
}

async fn channel_test(
    State(s): State<AppState>,
    UiUser(p): UiUser,
    Path(id): Path<String>,
    Form(f): Form<CsrfForm>,
) -> Response {
    if let Err(e) = check_csrf(&p, &f.csrf) {
        return error_page(&s, e);
    }
    let notifier = match crate::alerts::notify::Notifier::new(s.config.alerts.clone()) {
        Ok(n) => n,
        Err(e) => return back("/alerts/rules", Err(AppError::Internal(e))),
    };
    let r =
        crate::alerts::notify::test_channel(&s.db, &notifier, &p, &id).await.and_then(|d| match d.status.as_str() {
            "sent" => Ok(format!("Test notification sent to {}.", d.channel_name)),
            _ => Err(AppError::BadRequest(format!(
                "The test notification to {} failed: {}",
                d.channel_name,
                d.last_error.unwrap_or_default()
            ))),
        });
    back("/alerts/rules", r)
}

async fn channel_delete(
    State(s): State<AppState>,
    UiUser(p): UiUser,
    Path(id): Path<String>,
    Form(f): Form<CsrfForm>,
) -> Response {
    if let Err(e) = check_csrf(&p, &f.csrf) {
        return error_page(&s, e);
    }
    back("/alerts/rules", rules::delete_channel(&s.db, &p, &id).await.map(|()| "Channel deleted.".to_string()))
}

async fn device_rules_page(State(s): State<AppState>, UiUser(p): UiUser, Query(q): Query<FlashQuery>) -> Response {
    let flash = Flash { notice: q.notice, error: q.error };
    let r: AppResult<Html<String>> = async {
        let ctx = page_ctx(&s, &p, "alerts", &flash).await?;
        let sets = crate::device_rules::list(&s.db, &p).await?;
        let sets: Vec<minijinja::Value> = sets
            .into_iter()
            .map(|set| {
                let json = serde_json::to_string_pretty(&set.rules).unwrap_or_default();
                minijinja::Value::from_serialize(serde_json::json!({
                    "group_id": set.group_id, "group_name": set.group_name, "version": set.version,
                    "updated_by": set.updated_by, "updated_at": set.updated_at, "json": json,
                    "count": set.rules.len(),
                }))
            })
            .collect();
        let groups = crate::groups::list(
            &s.db,
            &p,
            &drover_proto::api::GroupListQuery { limit: Some(500), ..Default::default() },
        )
        .await?;
        s.ui.render("device_rules.html", merge(ctx, context! { sets => sets, groups => groups.items }))
    }
    .await;
    r.map(IntoResponse::into_response).unwrap_or_else(|e| error_page(&s, e))
}

#[derive(Deserialize)]
struct RuleSetForm {
    csrf: String,
    group: String,
    rules: String,
}

async fn device_rules_set(State(s): State<AppState>, UiUser(p): UiUser, Form(f): Form<RuleSetForm>) -> Response {
    if let Err(e) = check_csrf(&p, &f.csrf) {
        return error_page(&s, e);
    }
    let rules: Vec<drover_proto::telemetry::Rule> = match serde_json::from_str(&f.rules) {
        Ok(r) => r,
        Err(e) => {
            return back(
                "/device-rules",
                Err(AppError::BadRequest(format!("the rules are not a JSON list of rules: {e}"))),
            );
        }
    };
    back(
        "/device-rules",
        crate::device_rules::put(&s.db, &p, &f.group, rules).await.map(|set| {
            format!("Rule set of {} saved as version {}; its devices get it now.", set.group_name, set.version)
        }),
    )
}
