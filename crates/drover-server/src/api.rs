//! The REST API under `/api/v1`, and its OpenAPI 3.1 document, generated from these
//! handlers' annotations.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use drover_proto::api::*;
use utoipa::OpenApi;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};

use crate::app::{ApiJson, ApiPath, ApiQuery, AppState, client_ip, cookie, session_cookie};
use crate::audit;
use crate::auth::{Principal, SESSION_COOKIE};
use crate::error::{AppError, AppResult};
use crate::ops;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/openapi.json", get(openapi_json))
        .route("/auth/login", post(login))
        .route("/auth/logout", post(logout))
        .route("/me", get(me))
        .route("/me/password", post(change_password))
        .route("/organization", get(get_organization).patch(update_organization))
        .route("/users", get(list_users).post(create_user))
        .route("/users/{id}", get(get_user).patch(update_user).delete(delete_user))
        .route("/users/{id}/password", post(set_password))
        .route("/tokens", get(list_tokens).post(create_token))
        .route("/tokens/{id}", get(get_token).delete(revoke_token))
        .route("/audit", get(list_audit))
        .route("/audit/verify", get(verify_audit))
        .route("/enroll", post(enroll_on_api))
        .route("/devices", get(list_devices))
        .route("/devices/preauthorize", post(preauthorize))
        .route("/devices/preauthorize/bulk", post(preauthorize_bulk))
        .route("/preauthorizations", get(list_preauthorizations))
        .route("/preauthorizations/{id}", axum::routing::delete(revoke_preauthorization))
        .route("/devices/{id}", get(get_device).patch(patch_device))
        .route("/devices/{id}/tags", axum::routing::put(replace_device_tags).patch(patch_device_tags))
        .route("/groups", get(list_groups).post(create_group))
        .route("/groups/preview", get(preview_group))
        .route("/groups/{id}", get(get_group).patch(update_group).delete(delete_group))
        .route("/groups/{id}/devices", get(list_group_devices).post(add_group_devices))
        .route("/groups/{id}/devices/{device_id}", axum::routing::delete(remove_group_device))
        .route("/devices/{id}/accept", post(accept_device))
        .route("/devices/{id}/reject", post(reject_device))
        .route("/devices/{id}/decommission", post(decommission_device))
        .route("/enrollment-tokens", get(list_enrollment_tokens).post(create_enrollment_token))
        .route("/enrollment-tokens/{id}", axum::routing::delete(revoke_enrollment_token))
        .route("/artifacts", get(list_artifacts).post(upload_artifact))
        .route("/artifacts/{id}", get(get_artifact).delete(delete_artifact))
        .route("/trust-root", get(get_trust_root).put(put_trust_root))
        .route("/trust-root/{version}", get(get_trust_root_json))
        .route("/deployments", get(list_deployments).post(create_deployment))
        .route("/deployments/{id}", get(get_deployment))
        .route("/deployments/{id}/devices", get(list_deployment_devices))
        .route("/deployments/{id}/devices/{device_id}/log", get(get_deployment_device_log))
        .route("/deployments/{id}/abort", post(abort_deployment))
        .merge(crate::alerts::api::routes())
        .merge(crate::telemetry::api::routes())
        .merge(crate::remote::api_routes())
}

struct SecurityAddon;

impl utoipa::Modify for SecurityAddon {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "token",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("An API token (drv_…) from `drover token create` or `droverd token create`."))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "session",
            SecurityScheme::ApiKey(ApiKey::Cookie(ApiKeyValue::with_description(
                SESSION_COOKIE,
                "A web session from POST /api/v1/auth/login; changes also need the X-CSRF-Token header.",
            ))),
        );
    }
}

#[derive(OpenApi)]
#[openapi(
    info(title = "Drover API", description = "Manage a fleet of devices: users, tokens and the audit log of a Drover server. Every failure answers with `{\"error\":{\"code\":…,\"message\":…}}`; listings are paginated with `cursor`/`next_cursor`."),
    paths(
        login, logout, me, change_password, get_organization, update_organization,
        list_users, create_user, get_user, update_user, delete_user, set_password,
        list_tokens, create_token, get_token, revoke_token, list_audit, verify_audit,
        enroll, list_devices, get_device, patch_device, accept_device, reject_device, decommission_device, preauthorize,
        preauthorize_bulk, list_preauthorizations, revoke_preauthorization, replace_device_tags, patch_device_tags,
        list_groups, create_group, preview_group, get_group, update_group, delete_group,
        list_group_devices, add_group_devices, remove_group_device,
        list_enrollment_tokens, create_enrollment_token, revoke_enrollment_token,
        upload_artifact, list_artifacts, get_artifact, delete_artifact,
        get_trust_root, put_trust_root, get_trust_root_json,
        create_deployment, list_deployments, get_deployment, list_deployment_devices,
        get_deployment_device_log, abort_deployment,
    ),
    modifiers(&SecurityAddon),
    security(("token" = []), ("session" = [])),
    tags(
        (name = "auth", description = "Sessions and the caller's identity"),
        (name = "organization", description = "The caller's organization"),
        (name = "users", description = "People who sign in, with a role each"),
        (name = "tokens", description = "API tokens for automation"),
        (name = "audit", description = "The append-only, hash-chained record of every change"),
        (name = "devices", description = "The device registry and enrollment"),
        (name = "groups", description = "Static groups (chosen devices) and dynamic groups (devices matching a filter; see docs/filters.md)"),
        (name = "artifacts", description = "Signed update artifacts (docs/artifact-format.md), addressed by the SHA-256 of their file, and the trust root devices verify them with"),
        (name = "deployments", description = "An artifact for a set of devices, followed device by device (docs/updates-server.md)"),
    )
)]
pub struct ApiDoc;

/// The OpenAPI document as JSON.
pub fn openapi_document() -> utoipa::openapi::OpenApi {
    let mut doc = ApiDoc::openapi();
    doc.merge(<crate::alerts::api::AlertsApi as OpenApi>::openapi());
    doc.merge(<crate::telemetry::api::TelemetryApi as OpenApi>::openapi());
    doc.merge(<crate::remote::RemoteApiDoc as OpenApi>::openapi());
    doc.info.version = env!("CARGO_PKG_VERSION").to_string();
    doc
}

async fn openapi_json() -> Response {
    Json(openapi_document()).into_response()
}

#[utoipa::path(post, path = "/api/v1/auth/login", tag = "auth", request_body = LoginRequest, security(),
    responses((status = 200, body = LoginResponse, description = "Signed in; the session cookie is set"),
              (status = 401, body = ErrorBody), (status = 429, body = ErrorBody, description = "Too many failed attempts")))]
async fn login(
    State(s): State<AppState>,
    parts: axum::http::request::Parts,
    ApiJson(req): ApiJson<LoginRequest>,
) -> AppResult<Response> {
    let ip = client_ip(&parts);
    let source = crate::app::source_of(&parts);
    let session =
        ops::login(&s.db, &s.limiter, &req.username, req.password, ip, source, s.config.idle_timeout_ms()).await?;
    let me = ops::me(&s.db, &session.principal).await?;
    let set_cookie = session_cookie(&s, &parts.headers, &session.cookie, ops::SESSION_MAX_AGE_MS / 1000);
    Ok(([(header::SET_COOKIE, set_cookie)], Json(LoginResponse { csrf_token: session.csrf, me })).into_response())
}

#[utoipa::path(post, path = "/api/v1/auth/logout", tag = "auth", responses((status = 204, description = "Signed out"), (status = 401, body = ErrorBody)))]
async fn logout(State(s): State<AppState>, p: Principal, headers: HeaderMap) -> AppResult<Response> {
    if let Some(c) = cookie(&headers, SESSION_COOKIE) {
        ops::logout(&s.db, &p, &c).await?;
    }
    let clear = session_cookie(&s, &headers, "", 0);
    Ok((StatusCode::NO_CONTENT, [(header::SET_COOKIE, clear)]).into_response())
}

#[utoipa::path(get, path = "/api/v1/me", tag = "auth", responses((status = 200, body = Me), (status = 401, body = ErrorBody)))]
async fn me(State(s): State<AppState>, p: Principal) -> AppResult<Json<Me>> {
    Ok(Json(ops::me(&s.db, &p).await?))
}

#[utoipa::path(post, path = "/api/v1/me/password", tag = "auth", request_body = ChangePassword,
    responses((status = 204, description = "Changed; every session of the user ended"), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody)))]
async fn change_password(
    State(s): State<AppState>,
    p: Principal,
    ApiJson(req): ApiJson<ChangePassword>,
) -> AppResult<StatusCode> {
    ops::change_own_password(&s.db, &p, req).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/api/v1/organization", tag = "organization", responses((status = 200, body = Organization), (status = 401, body = ErrorBody)))]
async fn get_organization(State(s): State<AppState>, p: Principal) -> AppResult<Json<Organization>> {
    Ok(Json(ops::get_org(&s.db, p.org()).await?))
}

#[utoipa::path(patch, path = "/api/v1/organization", tag = "organization", request_body = UpdateOrganization,
    responses((status = 200, body = Organization), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn update_organization(
    State(s): State<AppState>,
    p: Principal,
    ApiJson(req): ApiJson<UpdateOrganization>,
) -> AppResult<Json<Organization>> {
    Ok(Json(ops::update_org(&s.db, &p, req).await?))
}

#[utoipa::path(get, path = "/api/v1/users", tag = "users", params(UserListQuery),
    responses((status = 200, body = Page<User>), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)))]
async fn list_users(
    State(s): State<AppState>,
    p: Principal,
    ApiQuery(q): ApiQuery<UserListQuery>,
) -> AppResult<Json<Page<User>>> {
    Ok(Json(ops::list_users(&s.db, &p, &q).await?))
}

#[utoipa::path(post, path = "/api/v1/users", tag = "users", request_body = CreateUser,
    responses((status = 201, body = CreatedUser), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn create_user(
    State(s): State<AppState>,
    p: Principal,
    ApiJson(req): ApiJson<CreateUser>,
) -> AppResult<(StatusCode, Json<CreatedUser>)> {
    Ok((StatusCode::CREATED, Json(ops::create_user(&s.db, &p, req).await?)))
}

#[utoipa::path(get, path = "/api/v1/users/{id}", tag = "users", params(("id" = String, Path, description = "User id")),
    responses((status = 200, body = User), (status = 404, body = ErrorBody)))]
async fn get_user(State(s): State<AppState>, p: Principal, ApiPath(id): ApiPath<String>) -> AppResult<Json<User>> {
    Ok(Json(ops::get_user(&s.db, &p, &id).await?))
}

#[utoipa::path(patch, path = "/api/v1/users/{id}", tag = "users", params(("id" = String, Path, description = "User id")), request_body = UpdateUser,
    responses((status = 200, body = User), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody, description = "Would leave no active admin")))]
async fn update_user(
    State(s): State<AppState>,
    p: Principal,
    ApiPath(id): ApiPath<String>,
    ApiJson(req): ApiJson<UpdateUser>,
) -> AppResult<Json<User>> {
    Ok(Json(ops::update_user(&s.db, &p, &id, req).await?))
}

#[utoipa::path(delete, path = "/api/v1/users/{id}", tag = "users", params(("id" = String, Path, description = "User id")),
    responses((status = 204, description = "Deleted"), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn delete_user(State(s): State<AppState>, p: Principal, ApiPath(id): ApiPath<String>) -> AppResult<StatusCode> {
    ops::delete_user(&s.db, &p, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/api/v1/users/{id}/password", tag = "users", params(("id" = String, Path, description = "User id")), request_body = SetPassword,
    responses((status = 204, description = "Set; the user's sessions ended"), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn set_password(
    State(s): State<AppState>,
    p: Principal,
    ApiPath(id): ApiPath<String>,
    ApiJson(req): ApiJson<SetPassword>,
) -> AppResult<StatusCode> {
    ops::set_password(&s.db, &p, &id, req).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/api/v1/tokens", tag = "tokens", params(TokenListQuery),
    responses((status = 200, body = Page<ApiToken>), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)))]
async fn list_tokens(
    State(s): State<AppState>,
    p: Principal,
    ApiQuery(q): ApiQuery<TokenListQuery>,
) -> AppResult<Json<Page<ApiToken>>> {
    Ok(Json(ops::list_tokens(&s.db, &p, &q).await?))
}

#[utoipa::path(post, path = "/api/v1/tokens", tag = "tokens", request_body = CreateToken,
    responses((status = 201, body = CreatedToken, description = "Created; `secret` is shown this once"), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody)))]
async fn create_token(
    State(s): State<AppState>,
    p: Principal,
    ApiJson(req): ApiJson<CreateToken>,
) -> AppResult<(StatusCode, Json<CreatedToken>)> {
    Ok((StatusCode::CREATED, Json(ops::create_token(&s.db, &p, req).await?)))
}

#[utoipa::path(get, path = "/api/v1/tokens/{id}", tag = "tokens", params(("id" = String, Path, description = "Token id")),
    responses((status = 200, body = ApiToken), (status = 404, body = ErrorBody)))]
async fn get_token(State(s): State<AppState>, p: Principal, ApiPath(id): ApiPath<String>) -> AppResult<Json<ApiToken>> {
    Ok(Json(ops::get_token(&s.db, &p, &id).await?))
}

#[utoipa::path(delete, path = "/api/v1/tokens/{id}", tag = "tokens", params(("id" = String, Path, description = "Token id")),
    responses((status = 200, body = ApiToken, description = "Revoked (kept for the record)"), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn revoke_token(
    State(s): State<AppState>,
    p: Principal,
    ApiPath(id): ApiPath<String>,
) -> AppResult<Json<ApiToken>> {
    Ok(Json(ops::revoke_token(&s.db, &p, &id).await?))
}

#[utoipa::path(get, path = "/api/v1/audit", tag = "audit", params(AuditListQuery),
    responses((status = 200, body = Page<AuditEntry>), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)))]
async fn list_audit(
    State(s): State<AppState>,
    p: Principal,
    ApiQuery(q): ApiQuery<AuditListQuery>,
) -> AppResult<Json<Page<AuditEntry>>> {
    p.require(Role::Viewer, "reading the audit log")?;
    let (items, next_cursor) = audit::list(&s.db, p.org(), &q).await?;
    Ok(Json(Page { items, next_cursor }))
}

#[utoipa::path(get, path = "/api/v1/audit/verify", tag = "audit",
    responses((status = 200, body = AuditVerification, description = "The result of checking the whole chain"), (status = 403, body = ErrorBody)))]
async fn verify_audit(State(s): State<AppState>, p: Principal) -> AppResult<Json<AuditVerification>> {
    p.require(Role::Admin, "verifying the audit log")?;
    Ok(Json(audit::verify(&s.db).await.map_err(AppError::from)?))
}

/// Served on the HTTPS device endpoint (`device_listen`, port 8443), not on the operator API,
/// which answers 403 unless `insecure_enroll_over_http` is on (development only).
#[utoipa::path(post, path = "/api/v1/enroll", tag = "devices", request_body = EnrollRequest, security(),
    responses((status = 200, body = EnrollResponse, description = "Accepted: the certificate is in the answer"),
              (status = 202, body = EnrollResponse, description = "Pending an operator: ask again with the same CSR"),
              (status = 400, body = ErrorBody, description = "Malformed CSR or identity"),
              (status = 401, body = ErrorBody, description = "Unknown, revoked or expired enrollment token"),
              (status = 403, body = ErrorBody, description = "Rejected or decommissioned device, a used-up token, or sent to the operator API instead of the device endpoint"),
              (status = 409, body = ErrorBody, description = "The identity is enrolled already with another key"),
              (status = 429, body = ErrorBody, description = "A limit applied (named in the message): too many requests from this address, or too many devices waiting for an operator; Retry-After says when to ask again")))]
pub(crate) async fn enroll(
    State(s): State<AppState>,
    parts: axum::http::request::Parts,
    ApiJson(req): ApiJson<EnrollRequest>,
) -> AppResult<Response> {
    let source = crate::app::source_of(&parts);
    let resp = crate::devices::enroll(&s.db, &s.ca, req, &source, client_ip(&parts), &s.enroll_limiter).await?;
    let status = if resp.status == DeviceStatus::Pending { StatusCode::ACCEPTED } else { StatusCode::OK };
    Ok((status, Json(resp)).into_response())
}

/// `POST /api/v1/enroll` on the operator API: devices enroll on the HTTPS device endpoint,
/// where their token is not sent in clear text; here only with the development switch.
async fn enroll_on_api(State(s): State<AppState>, req: axum::extract::Request) -> AppResult<Response> {
    if !s.config.insecure_enroll_over_http {
        return Err(AppError::Forbidden(format!(
            "enroll on the device endpoint, https://SERVER:{}/api/v1/enroll (device_listen), not on the \
             operator API: here an enrollment token would travel in clear text",
            s.config.device_listen.rsplit(':').next().filter(|p| !p.is_empty()).unwrap_or("8443")
        )));
    }
    let (parts, body) = req.into_parts();
    let json = <ApiJson<EnrollRequest> as axum::extract::FromRequest<()>>::from_request(
        axum::extract::Request::from_parts(parts.clone(), body),
        &(),
    )
    .await?;
    enroll(State(s), parts, json).await
}

#[utoipa::path(get, path = "/api/v1/devices", tag = "devices", params(DeviceListQuery),
    responses((status = 200, body = Page<Device>), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)))]
async fn list_devices(
    State(s): State<AppState>,
    p: Principal,
    ApiQuery(q): ApiQuery<DeviceListQuery>,
) -> AppResult<Json<Page<Device>>> {
    Ok(Json(crate::devices::list_devices(&s.db, &p, &q).await?))
}

#[utoipa::path(get, path = "/api/v1/devices/{id}", tag = "devices", params(("id" = String, Path, description = "Device id")),
    responses((status = 200, body = DeviceDetail, description = "The device with its inventory, groups and newest events"), (status = 404, body = ErrorBody)))]
async fn get_device(
    State(s): State<AppState>,
    p: Principal,
    ApiPath(id): ApiPath<String>,
) -> AppResult<Json<DeviceDetail>> {
    Ok(Json(crate::devices::get_device_detail(&s.db, &p, &id).await?))
}

#[utoipa::path(patch, path = "/api/v1/devices/{id}", tag = "devices", params(("id" = String, Path, description = "Device id")), request_body = DevicePatch,
    responses((status = 200, body = Device, description = "The device with its new name (or, cleared, its hostname or serial as display name)"),
              (status = 400, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn patch_device(
    State(s): State<AppState>,
    p: Principal,
    ApiPath(id): ApiPath<String>,
    ApiJson(req): ApiJson<DevicePatch>,
) -> AppResult<Json<Device>> {
    Ok(Json(crate::devices::patch_device(&s.db, &p, &id, req).await?))
}

#[utoipa::path(put, path = "/api/v1/devices/{id}/tags", tag = "devices", params(("id" = String, Path, description = "Device id")), request_body = ReplaceTags,
    responses((status = 200, body = Device, description = "The device with exactly these tags"), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn replace_device_tags(
    State(s): State<AppState>,
    p: Principal,
    ApiPath(id): ApiPath<String>,
    ApiJson(req): ApiJson<ReplaceTags>,
) -> AppResult<Json<Device>> {
    Ok(Json(crate::devices::replace_tags(&s.db, &p, &id, req).await?))
}

#[utoipa::path(patch, path = "/api/v1/devices/{id}/tags", tag = "devices", params(("id" = String, Path, description = "Device id")), request_body = PatchTags,
    responses((status = 200, body = Device), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn patch_device_tags(
    State(s): State<AppState>,
    p: Principal,
    ApiPath(id): ApiPath<String>,
    ApiJson(req): ApiJson<PatchTags>,
) -> AppResult<Json<Device>> {
    Ok(Json(crate::devices::patch_tags(&s.db, &p, &id, req).await?))
}

#[utoipa::path(get, path = "/api/v1/preauthorizations", tag = "devices", params(PreauthorizationQuery),
    responses((status = 200, body = Page<Preauthorization>, description = "Newest first"), (status = 400, body = ErrorBody)))]
async fn list_preauthorizations(
    State(s): State<AppState>,
    p: Principal,
    ApiQuery(q): ApiQuery<PreauthorizationQuery>,
) -> AppResult<Json<Page<Preauthorization>>> {
    Ok(Json(crate::preauth::list(&s.db, &p, &q).await?))
}

/// No device is accepted on its strength any more; devices it admitted stay as they are.
#[utoipa::path(delete, path = "/api/v1/preauthorizations/{id}", tag = "devices", params(("id" = String, Path)),
    responses((status = 200, body = Preauthorization, description = "Revoked"), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn revoke_preauthorization(
    State(s): State<AppState>,
    p: Principal,
    ApiPath(id): ApiPath<String>,
) -> AppResult<Json<Preauthorization>> {
    Ok(Json(crate::preauth::revoke(&s.db, &p, &id).await?))
}

#[utoipa::path(post, path = "/api/v1/devices/preauthorize/bulk", tag = "devices",
    request_body(content = String, content_type = "text/csv", description = "A header line of identity attribute names (e.g. `serial,mac`), then one device per line"),
    responses((status = 200, body = BulkPreauthorized, description = "Every line pre-authorized"),
              (status = 400, body = ErrorBody, description = "A bad line (named); nothing was pre-authorized"),
              (status = 403, body = ErrorBody), (status = 415, body = ErrorBody)))]
async fn preauthorize_bulk(
    State(s): State<AppState>,
    p: Principal,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> AppResult<Json<BulkPreauthorized>> {
    p.require(Role::Operator, "pre-authorizing devices")?;
    let ct = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or_default();
    if !ct.split(';').next().unwrap_or_default().trim().eq_ignore_ascii_case("text/csv") {
        return Err(AppError::UnsupportedMediaType("send the file as Content-Type: text/csv".into()));
    }
    let text = std::str::from_utf8(&body).map_err(|_| AppError::BadRequest("the CSV is not UTF-8".into()))?;
    if text.contains('\0') {
        return Err(AppError::BadRequest(format!("invalid CSV: {}", crate::app::NUL_MESSAGE)));
    }
    Ok(Json(crate::devices::preauthorize_csv(&s.db, &p, text).await?))
}

#[utoipa::path(get, path = "/api/v1/groups", tag = "groups", params(GroupListQuery),
    responses((status = 200, body = Page<Group>), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)))]
async fn list_groups(
    State(s): State<AppState>,
    p: Principal,
    ApiQuery(q): ApiQuery<GroupListQuery>,
) -> AppResult<Json<Page<Group>>> {
    Ok(Json(crate::groups::list(&s.db, &p, &q).await?))
}

#[utoipa::path(post, path = "/api/v1/groups", tag = "groups", request_body = CreateGroup,
    responses((status = 201, body = Group), (status = 400, body = ErrorBody, description = "Bad name, or a filter that does not parse (the message names the column)"),
              (status = 403, body = ErrorBody), (status = 409, body = ErrorBody, description = "The name is taken")))]
async fn create_group(
    State(s): State<AppState>,
    p: Principal,
    ApiJson(req): ApiJson<CreateGroup>,
) -> AppResult<(StatusCode, Json<Group>)> {
    Ok((StatusCode::CREATED, Json(crate::groups::create(&s.db, &p, req).await?)))
}

#[utoipa::path(get, path = "/api/v1/groups/preview", tag = "groups", params(GroupPreviewQuery),
    responses((status = 200, body = GroupPreview, description = "How many devices match now, and the newest 20"), (status = 400, body = ErrorBody)))]
async fn preview_group(
    State(s): State<AppState>,
    p: Principal,
    ApiQuery(q): ApiQuery<GroupPreviewQuery>,
) -> AppResult<Json<GroupPreview>> {
    Ok(Json(crate::groups::preview(&s.db, &p, &q.filter).await?))
}

#[utoipa::path(get, path = "/api/v1/groups/{id}", tag = "groups", params(("id" = String, Path, description = "Group id")),
    responses((status = 200, body = Group, description = "With `device_count`"), (status = 404, body = ErrorBody)))]
async fn get_group(State(s): State<AppState>, p: Principal, ApiPath(id): ApiPath<String>) -> AppResult<Json<Group>> {
    Ok(Json(crate::groups::get(&s.db, &p, &id).await?))
}

#[utoipa::path(patch, path = "/api/v1/groups/{id}", tag = "groups", params(("id" = String, Path, description = "Group id")), request_body = UpdateGroup,
    responses((status = 200, body = Group), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn update_group(
    State(s): State<AppState>,
    p: Principal,
    ApiPath(id): ApiPath<String>,
    ApiJson(req): ApiJson<UpdateGroup>,
) -> AppResult<Json<Group>> {
    Ok(Json(crate::groups::update(&s.db, &p, &id, req).await?))
}

#[utoipa::path(delete, path = "/api/v1/groups/{id}", tag = "groups", params(("id" = String, Path, description = "Group id")),
    responses((status = 204, description = "Deleted"), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody, description = "A dynamic group's filter names it")))]
async fn delete_group(State(s): State<AppState>, p: Principal, ApiPath(id): ApiPath<String>) -> AppResult<StatusCode> {
    crate::groups::delete(&s.db, &p, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/api/v1/groups/{id}/devices", tag = "groups", params(("id" = String, Path, description = "Group id"), DeviceListQuery),
    responses((status = 200, body = Page<Device>, description = "Members (a dynamic group's evaluated now)"), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn list_group_devices(
    State(s): State<AppState>,
    p: Principal,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<DeviceListQuery>,
) -> AppResult<Json<Page<Device>>> {
    Ok(Json(crate::groups::devices(&s.db, &p, &id, &q).await?))
}

#[utoipa::path(post, path = "/api/v1/groups/{id}/devices", tag = "groups", params(("id" = String, Path, description = "Group id")), request_body = AddGroupDevices,
    responses((status = 200, body = GroupDevicesAdded), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody),
              (status = 404, body = ErrorBody, description = "Unknown group, or unknown device ids (named; nothing added)"),
              (status = 409, body = ErrorBody, description = "A dynamic group")))]
async fn add_group_devices(
    State(s): State<AppState>,
    p: Principal,
    ApiPath(id): ApiPath<String>,
    ApiJson(req): ApiJson<AddGroupDevices>,
) -> AppResult<Json<GroupDevicesAdded>> {
    Ok(Json(crate::groups::add_devices(&s.db, &p, &id, req).await?))
}

#[utoipa::path(delete, path = "/api/v1/groups/{id}/devices/{device_id}", tag = "groups",
    params(("id" = String, Path, description = "Group id"), ("device_id" = String, Path, description = "Device id")),
    responses((status = 204, description = "Removed"), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn remove_group_device(
    State(s): State<AppState>,
    p: Principal,
    ApiPath((id, device_id)): ApiPath<(String, String)>,
) -> AppResult<StatusCode> {
    crate::groups::remove_device(&s.db, &p, &id, &device_id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/api/v1/devices/{id}/accept", tag = "devices", params(("id" = String, Path, description = "Device id")),
    responses((status = 200, body = Device, description = "Accepted; its certificate is issued"), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn accept_device(
    State(s): State<AppState>,
    p: Principal,
    ApiPath(id): ApiPath<String>,
) -> AppResult<Json<Device>> {
    Ok(Json(crate::devices::decide(&s.db, &s.ca, &p, &id, DeviceStatus::Accepted).await?))
}

#[utoipa::path(post, path = "/api/v1/devices/{id}/reject", tag = "devices", params(("id" = String, Path, description = "Device id")),
    responses((status = 200, body = Device), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn reject_device(
    State(s): State<AppState>,
    p: Principal,
    ApiPath(id): ApiPath<String>,
) -> AppResult<Json<Device>> {
    Ok(Json(crate::devices::decide(&s.db, &s.ca, &p, &id, DeviceStatus::Rejected).await?))
}

#[utoipa::path(post, path = "/api/v1/devices/{id}/decommission", tag = "devices", params(("id" = String, Path, description = "Device id")),
    responses((status = 200, body = Device, description = "Decommissioned; its certificate is revoked"), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn decommission_device(
    State(s): State<AppState>,
    p: Principal,
    ApiPath(id): ApiPath<String>,
) -> AppResult<Json<Device>> {
    Ok(Json(crate::devices::decide(&s.db, &s.ca, &p, &id, DeviceStatus::Decommissioned).await?))
}

#[utoipa::path(post, path = "/api/v1/devices/preauthorize", tag = "devices", request_body = Preauthorize,
    responses((status = 200, body = Preauthorized), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn preauthorize(
    State(s): State<AppState>,
    p: Principal,
    ApiJson(req): ApiJson<Preauthorize>,
) -> AppResult<Json<Preauthorized>> {
    Ok(Json(crate::devices::preauthorize(&s.db, &p, req).await?))
}

#[utoipa::path(get, path = "/api/v1/enrollment-tokens", tag = "devices", params(EnrollmentTokenQuery),
    responses((status = 200, body = Page<EnrollmentToken>, description = "Newest first"), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)))]
async fn list_enrollment_tokens(
    State(s): State<AppState>,
    p: Principal,
    ApiQuery(q): ApiQuery<EnrollmentTokenQuery>,
) -> AppResult<Json<Page<EnrollmentToken>>> {
    Ok(Json(crate::devices::list_enrollment_tokens(&s.db, &p, &q).await?))
}

#[utoipa::path(post, path = "/api/v1/enrollment-tokens", tag = "devices", request_body = CreateEnrollmentToken,
    responses((status = 201, body = CreatedEnrollmentToken, description = "Created; `secret` is shown this once"), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody)))]
async fn create_enrollment_token(
    State(s): State<AppState>,
    p: Principal,
    ApiJson(req): ApiJson<CreateEnrollmentToken>,
) -> AppResult<(StatusCode, Json<CreatedEnrollmentToken>)> {
    Ok((StatusCode::CREATED, Json(crate::devices::create_enrollment_token(&s.db, &p, req).await?)))
}

#[utoipa::path(delete, path = "/api/v1/enrollment-tokens/{id}", tag = "devices", params(("id" = String, Path, description = "Enrollment token id")),
    responses((status = 200, body = EnrollmentToken, description = "Revoked"), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn revoke_enrollment_token(
    State(s): State<AppState>,
    p: Principal,
    ApiPath(id): ApiPath<String>,
) -> AppResult<Json<EnrollmentToken>> {
    Ok(Json(crate::devices::revoke_enrollment_token(&s.db, &p, &id).await?))
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim).filter(|v| !v.is_empty())
}

/// The SHA-256 the client announces: `X-Drover-Sha256: HEX`, or `Digest: sha-256=BASE64`.
fn announced_sha256(headers: &HeaderMap) -> AppResult<Option<String>> {
    if let Some(hex) = header_str(headers, "x-drover-sha256") {
        return Ok(Some(hex.to_lowercase()));
    }
    let Some(digest) = header_str(headers, "digest") else { return Ok(None) };
    for part in digest.split(',') {
        if let Some((alg, value)) = part.trim().split_once('=')
            && alg.trim().eq_ignore_ascii_case("sha-256")
        {
            use base64::Engine as _;
            let raw = base64::engine::general_purpose::STANDARD
                .decode(value.trim())
                .map_err(|_| AppError::BadRequest("Digest: sha-256 must be base64".into()))?;
            return Ok(Some(hex::encode(raw)));
        }
    }
    Ok(None)
}

#[utoipa::path(post, path = "/api/v1/artifacts", tag = "artifacts",
    request_body(content = Vec<u8>, content_type = "application/octet-stream", description = "The artifact file, as `drover artifact build` wrote it. Optional header `X-Drover-Sha256` (or `Digest: sha-256=…`): the file's SHA-256, checked."),
    responses((status = 201, body = drover_proto::deploy::Artifact, description = "Stored"),
              (status = 200, body = drover_proto::deploy::Artifact, description = "The same file was uploaded before: its record"),
              (status = 400, body = ErrorBody, description = "Not a valid artifact (malformed, altered, truncated, trailing bytes), unsigned, not signed by a release key of the trust root, or not the announced SHA-256; nothing is stored"),
              (status = 403, body = ErrorBody), (status = 409, body = ErrorBody, description = "Another artifact has this name and version"),
              (status = 413, body = ErrorBody, description = "Larger than max_artifact_size"), (status = 415, body = ErrorBody)))]
async fn upload_artifact(
    State(s): State<AppState>,
    p: Principal,
    headers: HeaderMap,
    body: axum::body::Body,
) -> AppResult<Response> {
    let ct = header_str(&headers, header::CONTENT_TYPE.as_str()).unwrap_or("application/octet-stream");
    let mime = ct.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
    if mime != "application/octet-stream" {
        return Err(AppError::UnsupportedMediaType(
            "send the artifact file itself as the body, with Content-Type: application/octet-stream".into(),
        ));
    }
    let hints = crate::artifacts::UploadHints {
        content_length: header_str(&headers, header::CONTENT_LENGTH.as_str()).and_then(|v| v.parse().ok()),
        sha256: announced_sha256(&headers)?,
    };
    let up = crate::artifacts::upload(&s.db, &s.store, s.config.max_artifact_size, &p, hints, body.into_data_stream())
        .await?;
    let status = if up.created { StatusCode::CREATED } else { StatusCode::OK };
    Ok((status, Json(up.artifact)).into_response())
}

#[utoipa::path(get, path = "/api/v1/artifacts", tag = "artifacts", params(drover_proto::deploy::ArtifactListQuery),
    responses((status = 200, body = Page<drover_proto::deploy::Artifact>, description = "Newest first"), (status = 400, body = ErrorBody)))]
async fn list_artifacts(
    State(s): State<AppState>,
    p: Principal,
    ApiQuery(q): ApiQuery<drover_proto::deploy::ArtifactListQuery>,
) -> AppResult<Json<Page<drover_proto::deploy::Artifact>>> {
    Ok(Json(crate::artifacts::list(&s.db, &p, &q).await?))
}

#[utoipa::path(get, path = "/api/v1/artifacts/{id}", tag = "artifacts", params(("id" = String, Path, description = "Artifact id (SHA-256) or NAME@VERSION")),
    responses((status = 200, body = drover_proto::deploy::Artifact, description = "With its manifest's payloads, provides, depends and provenance"), (status = 404, body = ErrorBody)))]
async fn get_artifact(
    State(s): State<AppState>,
    p: Principal,
    ApiPath(id): ApiPath<String>,
) -> AppResult<Json<drover_proto::deploy::Artifact>> {
    Ok(Json(crate::artifacts::get(&s.db, &p, &id).await?))
}

#[utoipa::path(delete, path = "/api/v1/artifacts/{id}", tag = "artifacts", params(("id" = String, Path, description = "Artifact id (SHA-256) or NAME@VERSION")),
    responses((status = 204, description = "Deleted, with its file"), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
              (status = 409, body = ErrorBody, description = "An unfinished deployment uses it")))]
async fn delete_artifact(
    State(s): State<AppState>,
    p: Principal,
    ApiPath(id): ApiPath<String>,
) -> AppResult<StatusCode> {
    crate::artifacts::delete(&s.db, &s.store, &p, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/api/v1/trust-root", tag = "artifacts",
    responses((status = 200, body = drover_proto::deploy::TrustRoot), (status = 404, body = ErrorBody, description = "No root uploaded yet")))]
async fn get_trust_root(State(s): State<AppState>, p: Principal) -> AppResult<Json<drover_proto::deploy::TrustRoot>> {
    Ok(Json(crate::artifacts::get_trust_root(&s.db, &p).await?))
}

#[utoipa::path(put, path = "/api/v1/trust-root", tag = "artifacts",
    request_body(content = String, content_type = "application/json", description = "root.json: the first one signed by its own root keys; later ones the next version, signed by the current root keys and their own"),
    responses((status = 200, body = drover_proto::deploy::TrustRoot, description = "Now the current root; devices get the chain with every install"),
              (status = 400, body = ErrorBody, description = "Malformed, or not signed as the rotation rules require"), (status = 403, body = ErrorBody),
              (status = 409, body = ErrorBody, description = "Not newer than the current root")))]
async fn put_trust_root(
    State(s): State<AppState>,
    p: Principal,
    body: axum::body::Bytes,
) -> AppResult<Json<drover_proto::deploy::TrustRoot>> {
    if crate::app::json_has_nul(&body) {
        return Err(AppError::BadRequest(format!("invalid root.json: {}", crate::app::NUL_MESSAGE)));
    }
    Ok(Json(crate::artifacts::put_trust_root(&s.db, &p, &body).await?))
}

#[utoipa::path(get, path = "/api/v1/trust-root/{version}", tag = "artifacts", params(("version" = u64, Path, description = "Root version")),
    responses((status = 200, content_type = "application/json", body = String, description = "That root.json exactly as uploaded"), (status = 404, body = ErrorBody)))]
async fn get_trust_root_json(
    State(s): State<AppState>,
    p: Principal,
    ApiPath(version): ApiPath<u64>,
) -> AppResult<Response> {
    let json = crate::artifacts::get_trust_root_json(&s.db, &p, version).await?;
    Ok(([(header::CONTENT_TYPE, "application/json")], json).into_response())
}

#[utoipa::path(post, path = "/api/v1/deployments", tag = "deployments", request_body = drover_proto::deploy::CreateDeployment,
    responses((status = 201, body = drover_proto::deploy::Deployment, description = "Created; every device pending, the install sent to those online"),
              (status = 400, body = ErrorBody, description = "Unknown artifact, bad target, or no accepted device in it"), (status = 403, body = ErrorBody)))]
async fn create_deployment(
    State(s): State<AppState>,
    p: Principal,
    ApiJson(req): ApiJson<drover_proto::deploy::CreateDeployment>,
) -> AppResult<(StatusCode, Json<drover_proto::deploy::Deployment>)> {
    Ok((StatusCode::CREATED, Json(crate::deployments::create(&s.db, &s.engine, &p, req).await?)))
}

#[utoipa::path(get, path = "/api/v1/deployments", tag = "deployments", params(drover_proto::deploy::DeploymentListQuery),
    responses((status = 200, body = Page<drover_proto::deploy::Deployment>, description = "Newest first"), (status = 400, body = ErrorBody)))]
async fn list_deployments(
    State(s): State<AppState>,
    p: Principal,
    ApiQuery(q): ApiQuery<drover_proto::deploy::DeploymentListQuery>,
) -> AppResult<Json<Page<drover_proto::deploy::Deployment>>> {
    Ok(Json(crate::deployments::list(&s.db, &p, &q).await?))
}

#[utoipa::path(get, path = "/api/v1/deployments/{id}", tag = "deployments", params(("id" = String, Path, description = "Deployment id")),
    responses((status = 200, body = drover_proto::deploy::Deployment, description = "With `total` and devices per state"), (status = 404, body = ErrorBody)))]
async fn get_deployment(
    State(s): State<AppState>,
    p: Principal,
    ApiPath(id): ApiPath<String>,
) -> AppResult<Json<drover_proto::deploy::Deployment>> {
    Ok(Json(crate::deployments::get(&s.db, &p, &id).await?))
}

#[utoipa::path(get, path = "/api/v1/deployments/{id}/devices", tag = "deployments",
    params(("id" = String, Path, description = "Deployment id"), drover_proto::deploy::DeploymentDeviceQuery),
    responses((status = 200, body = Page<drover_proto::deploy::DeploymentDevice>, description = "By device id"), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn list_deployment_devices(
    State(s): State<AppState>,
    p: Principal,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<drover_proto::deploy::DeploymentDeviceQuery>,
) -> AppResult<Json<Page<drover_proto::deploy::DeploymentDevice>>> {
    Ok(Json(crate::deployments::devices(&s.db, &p, &id, &q).await?))
}

#[utoipa::path(get, path = "/api/v1/deployments/{id}/devices/{device_id}/log", tag = "deployments",
    params(("id" = String, Path, description = "Deployment id"), ("device_id" = String, Path, description = "Device id")),
    responses((status = 200, body = drover_proto::deploy::DeploymentDeviceLog), (status = 404, body = ErrorBody, description = "Not in the deployment, or no log sent")))]
async fn get_deployment_device_log(
    State(s): State<AppState>,
    p: Principal,
    ApiPath((id, device_id)): ApiPath<(String, String)>,
) -> AppResult<Json<drover_proto::deploy::DeploymentDeviceLog>> {
    Ok(Json(crate::deployments::device_log(&s.db, &p, &id, &device_id).await?))
}

#[utoipa::path(post, path = "/api/v1/deployments/{id}/abort", tag = "deployments", params(("id" = String, Path, description = "Deployment id")),
    responses((status = 200, body = drover_proto::deploy::Deployment, description = "Aborted: pending devices at once, downloading ones told to stop, installing ones finish"),
              (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody, description = "Already finished")))]
async fn abort_deployment(
    State(s): State<AppState>,
    p: Principal,
    ApiPath(id): ApiPath<String>,
) -> AppResult<Json<drover_proto::deploy::Deployment>> {
    Ok(Json(crate::deployments::abort(&s.db, &s.engine, &p, &id).await?))
}
