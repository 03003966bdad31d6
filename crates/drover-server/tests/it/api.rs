//! The REST API through the router, without a socket, on every backend.

use axum::body::Body;
use axum::http::{Method, Request, StatusCode, header};
use serde_json::{Value, json};

use crate::each_backend;
use crate::support::{ADMIN_PASSWORD, TestApp};

fn assert_error_shape(r: &crate::support::Resp, status: StatusCode, code: &str) {
    assert_eq!(r.status, status, "body: {}", r.text);
    assert_eq!(r.body["error"]["code"], code, "body: {}", r.text);
    let msg = r.body["error"]["message"].as_str().unwrap_or_default();
    assert!(!msg.is_empty(), "an error has a message: {}", r.text);
    for leak in ["sqlx", "SELECT", "panicked", "src/"] {
        assert!(!msg.contains(leak), "error leaks internals ({leak}): {msg}");
    }
}

async fn raw_post(app: &TestApp, path: &str, content_type: Option<&str>, body: Vec<u8>) -> crate::support::Resp {
    let mut b = Request::builder()
        .method(Method::POST)
        .uri(path)
        .header(header::AUTHORIZATION, format!("Bearer {}", app.admin_token));
    if let Some(ct) = content_type {
        b = b.header(header::CONTENT_TYPE, ct);
    }
    app.send(b.body(Body::from(body)).unwrap()).await
}

/// Tried: malformed JSON, wrong types, unknown fields, an oversized body, a missing content
/// type, invalid pagination cursors, limits and sorts, unknown query parameters, unknown
/// routes and methods. Each gets a 4xx in the error shape and changes nothing.
#[tokio::test]
async fn bad_input_gets_a_clear_error_and_changes_nothing() {
    each_backend!(|app| {
        let before = app.audit_count().await;
        let json = Some("application/json");
        let r = raw_post(&app, "/api/v1/users", json, b"{\"username\": \"ann\", ".to_vec()).await;
        assert_error_shape(&r, StatusCode::BAD_REQUEST, "invalid_request");
        assert!(r.body["error"]["message"].as_str().unwrap().contains("malformed JSON"), "{}", r.text);

        let r = raw_post(&app, "/api/v1/users", json, br#"{"username": 5, "role": "viewer"}"#.to_vec()).await;
        assert_error_shape(&r, StatusCode::BAD_REQUEST, "invalid_request");
        assert!(r.text.contains("username"), "names the field: {}", r.text);

        let r = raw_post(&app, "/api/v1/users", json, br#"{"username": "ann", "role": "root"}"#.to_vec()).await;
        assert_error_shape(&r, StatusCode::BAD_REQUEST, "invalid_request");

        let r =
            raw_post(&app, "/api/v1/users", json, br#"{"username": "ann", "role": "viewer", "admin": true}"#.to_vec())
                .await;
        assert_error_shape(&r, StatusCode::BAD_REQUEST, "invalid_request");
        assert!(r.text.contains("unknown field"), "{}", r.text);

        let big = format!(r#"{{"name": "{}", "role": "viewer"}}"#, "x".repeat(2 * 1024 * 1024));
        let r = raw_post(&app, "/api/v1/tokens", json, big.into_bytes()).await;
        assert_error_shape(&r, StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large");

        let r = raw_post(&app, "/api/v1/tokens", None, br#"{"name": "x", "role": "viewer"}"#.to_vec()).await;
        assert_error_shape(&r, StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type");

        let r = raw_post(&app, "/api/v1/users", json, br#"{"username": "Not Valid", "role": "viewer"}"#.to_vec()).await;
        assert_error_shape(&r, StatusCode::BAD_REQUEST, "invalid_request");
        let r = raw_post(
            &app,
            "/api/v1/users",
            json,
            br#"{"username": "shorty", "role": "viewer", "password": "short"}"#.to_vec(),
        )
        .await;
        assert_error_shape(&r, StatusCode::BAD_REQUEST, "invalid_request");

        for path in
            ["/api/v1/users?cursor=not-a-cursor", "/api/v1/tokens?cursor=eyJ4IjoxfQ", "/api/v1/audit?cursor=%ff%01"]
        {
            let r = app.admin(Method::GET, path, None).await;
            assert_error_shape(&r, StatusCode::BAD_REQUEST, "invalid_cursor");
        }
        for path in [
            "/api/v1/users?limit=0",
            "/api/v1/users?limit=100000",
            "/api/v1/users?limit=ten",
            "/api/v1/users?sort=password_hash",
            "/api/v1/users?colour=blue",
            "/api/v1/audit?since=last-tuesday",
            "/api/v1/tokens?role=superuser",
        ] {
            let r = app.admin(Method::GET, path, None).await;
            assert_error_shape(&r, StatusCode::BAD_REQUEST, "invalid_request");
        }
        let r = app.admin(Method::GET, "/api/v1/no-such-thing", None).await;
        assert_error_shape(&r, StatusCode::NOT_FOUND, "not_found");
        let r = app.admin(Method::GET, "/api/v1/users/00000000-0000-0000-0000-000000000000", None).await;
        assert_error_shape(&r, StatusCode::NOT_FOUND, "not_found");
        let r = app.admin(Method::PUT, "/api/v1/users", Some(json!({}))).await;
        assert_error_shape(&r, StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed");

        assert_eq!(app.audit_count().await, before, "bad input changed nothing");
        let users = app.admin(Method::GET, "/api/v1/users", None).await;
        assert_eq!(users.body["items"].as_array().unwrap().len(), 1, "only the first admin exists");
    });
}

/// Every mutating route in the OpenAPI document, with a plausible body.
fn mutating_routes(doc: &Value) -> Vec<(Method, String)> {
    let mut out = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in ["post", "put", "patch", "delete"] {
            if item.get(method).is_some() {
                out.push((Method::from_bytes(method.to_uppercase().as_bytes()).unwrap(), path.clone()));
            }
        }
    }
    out
}

fn body_for(path: &str, method: &Method) -> Option<Value> {
    match (method.as_str(), path) {
        ("POST", "/api/v1/users") => {
            Some(json!({"username": "mallory", "role": "admin", "password": "long enough password"}))
        }
        ("PATCH", "/api/v1/users/{id}") => Some(json!({"role": "viewer"})),
        ("POST", "/api/v1/users/{id}/password") => Some(json!({"password": "another long password"})),
        ("POST", "/api/v1/tokens") => Some(json!({"name": "escalate", "role": "admin"})),
        ("PATCH", "/api/v1/organization") => Some(json!({"name": "taken over"})),
        ("POST", "/api/v1/me/password") => {
            Some(json!({"current_password": "x", "new_password": "long enough password"}))
        }
        ("POST", "/api/v1/auth/login") => Some(json!({"username": "admin", "password": ADMIN_PASSWORD})),
        ("POST", "/api/v1/devices/preauthorize") => Some(json!({"identities": [{"serial": "SN-1"}]})),
        ("POST", "/api/v1/enrollment-tokens") => Some(json!({"name": "factory", "max_uses": 10})),
        ("PATCH", "/api/v1/devices/{id}") => Some(json!({"name": "renamed"})),
        ("PUT", "/api/v1/devices/{id}/tags") => Some(json!({"tags": {"region": "eu"}})),
        ("PATCH", "/api/v1/devices/{id}/tags") => Some(json!({"set": {"region": "eu"}})),
        ("POST", "/api/v1/groups") => Some(json!({"name": "fleet", "kind": "static"})),
        ("PATCH", "/api/v1/groups/{id}") => Some(json!({"name": "renamed"})),
        ("POST", "/api/v1/groups/{id}/devices") => Some(json!({"devices": ["x"]})),
        ("POST", "/api/v1/deployments") => Some(json!({"artifact": "edge-app@1", "devices": ["x"]})),
        ("POST", "/api/v1/alert-rules") => Some(json!({
            "name": "hot",
            "condition": {"kind": "threshold", "metric": "cpu.percent", "op": ">", "threshold": 90.0, "window_s": 300}
        })),
        ("PATCH", "/api/v1/alert-rules/{id}") => Some(json!({"enabled": false})),
        ("PUT", "/api/v1/device-rule-sets/{group}") => Some(json!({"rules": []})),
        ("POST", "/api/v1/devices/{id}/logs") => Some(json!({"source": "journal"})),
        ("POST", "/api/v1/devices/{id}/web") => Some(json!({"host": "127.0.0.1", "port": 80})),
        ("POST", "/api/v1/notification-channels") => {
            Some(json!({"name": "ops", "kind": "webhook", "target": "https://hooks.example.com/drover"}))
        }
        ("PUT", "/api/v1/remote-settings") => Some(json!({"recording": true})),
        ("POST", "/api/v1/silences") => Some(json!({"reason": "maintenance", "duration_s": 3600})),
        _ => None,
    }
}

#[tokio::test]
async fn a_viewer_is_refused_on_every_mutating_route_and_the_audit_log_is_unchanged() {
    each_backend!(|app| {
        let viewer = app.token("viewer").await;
        let operator = app.token("operator").await;
        let users = app.admin(Method::GET, "/api/v1/users", None).await;
        let admin_id = users.body["items"][0]["id"].as_str().unwrap().to_string();
        let tokens = app.admin(Method::GET, "/api/v1/tokens", None).await;
        let token_id = tokens.body["items"][0]["id"].as_str().unwrap().to_string();
        let doc = app.call(Method::GET, "/api/v1/openapi.json", None, None).await.body;
        let routes = mutating_routes(&doc);
        assert!(routes.len() >= 10, "the document lists the mutating routes: {routes:?}");
        let before = app.audit_count().await;
        let mut checked = 0;
        for (method, path) in &routes {
            // Signing in and out are how sessions start and end, and devices enroll with their
            // own proofs: none of these act with a role.
            if path.starts_with("/api/v1/auth/") || path == "/api/v1/enroll" {
                continue;
            }
            let id = if path.starts_with("/api/v1/tokens/") { &token_id } else { &admin_id };
            let concrete = path.replace("{id}", id).replace("{device_id}", id).replace("{group}", id);
            // Devices (their logs and web UIs among them), groups, enrollment tokens,
            // artifacts, deployments, alerting, device rules and closing remote sessions are an
            // operator's work; the rest (the trust root and the remote-access settings among
            // them) an admin's.
            let operator_may = [
                "/api/v1/devices",
                "/api/v1/enrollment-tokens",
                "/api/v1/preauthorizations",
                "/api/v1/groups",
                "/api/v1/artifacts",
                "/api/v1/deployments",
                "/api/v1/alert-rules",
                "/api/v1/silences",
                "/api/v1/notification-channels",
                "/api/v1/device-rule-sets",
                "/api/v1/remote-sessions/",
            ]
            .iter()
            .any(|prefix| path.starts_with(prefix));
            let mut refused = vec![("viewer", &viewer)];
            if !operator_may {
                refused.push(("operator", &operator));
            }
            for (who, token) in refused {
                let r = app.call(method.clone(), &concrete, Some(token), body_for(path, method)).await;
                assert_error_shape(&r, StatusCode::FORBIDDEN, "forbidden");
                assert!(
                    r.body["error"]["message"].as_str().unwrap().contains("permission denied"),
                    "{who} {method} {path}: {}",
                    r.text
                );
            }
            checked += 1;
        }
        assert!(checked >= 14, "checked {checked} routes");
        assert_eq!(app.audit_count().await, before, "refused requests change nothing");
        // And the admin still is one, the organization keeps its name.
        let me = app.admin(Method::GET, "/api/v1/me", None).await;
        assert_eq!(me.body["role"], "admin");
        assert_eq!(me.body["organization"]["name"], "default");
        // Reads are fine for a viewer.
        for path in ["/api/v1/users", "/api/v1/tokens", "/api/v1/audit", "/api/v1/organization", "/api/v1/me"] {
            let r = app.call(Method::GET, path, Some(&viewer), None).await;
            assert_eq!(r.status, StatusCode::OK, "viewer reads {path}: {}", r.text);
        }
    });
}

#[tokio::test]
async fn revoked_expired_unknown_and_malformed_tokens_get_401() {
    each_backend!(|app| {
        let created = app.admin(Method::POST, "/api/v1/tokens", Some(json!({"name": "ci", "role": "operator"}))).await;
        assert_eq!(created.status, StatusCode::CREATED);
        let secret = created.body["secret"].as_str().unwrap().to_string();
        let id = created.body["token"]["id"].as_str().unwrap().to_string();
        assert!(secret.starts_with("drv_") && secret.len() > 40);
        assert!(secret.starts_with(created.body["token"]["prefix"].as_str().unwrap()));

        let r = app.call(Method::GET, "/api/v1/me", Some(&secret), None).await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.body["kind"], "token");
        assert_eq!(r.body["role"], "operator");

        // Listing never shows the secret.
        let list = app.admin(Method::GET, "/api/v1/tokens", None).await;
        assert!(!list.text.contains(&secret));
        let (hash,): (String,) = sqlx::query_as("SELECT secret_hash FROM api_tokens WHERE id = $1")
            .bind(id.clone())
            .fetch_one(app.db.pool())
            .await
            .unwrap();
        assert_ne!(hash, secret, "stored hashed");

        let r = app.admin(Method::DELETE, &format!("/api/v1/tokens/{id}"), None).await;
        assert_eq!(r.status, StatusCode::OK);
        assert!(r.body["revoked_at"].is_string());
        let r = app.call(Method::GET, "/api/v1/me", Some(&secret), None).await;
        assert_error_shape(&r, StatusCode::UNAUTHORIZED, "unauthorized");
        let listed = app.admin(Method::GET, "/api/v1/tokens", None).await;
        assert!(!listed.text.contains(&id), "revoked tokens are hidden by default");
        let listed = app.admin(Method::GET, "/api/v1/tokens?include_revoked=true", None).await;
        assert!(listed.text.contains(&id), "…and listed on request");

        let expiring = app
            .admin(
                Method::POST,
                "/api/v1/tokens",
                Some(json!({"name": "short", "role": "viewer", "expires_in_days": 1})),
            )
            .await;
        let exp_secret = expiring.body["secret"].as_str().unwrap().to_string();
        assert_eq!(app.call(Method::GET, "/api/v1/me", Some(&exp_secret), None).await.status, StatusCode::OK);
        sqlx::query("UPDATE api_tokens SET expires_at = 1 WHERE id = $1")
            .bind(expiring.body["token"]["id"].as_str().unwrap().to_string())
            .execute(app.db.pool())
            .await
            .unwrap();
        let r = app.call(Method::GET, "/api/v1/me", Some(&exp_secret), None).await;
        assert_error_shape(&r, StatusCode::UNAUTHORIZED, "unauthorized");

        let r = app.call(Method::GET, "/api/v1/me", Some("drv_not-a-real-token"), None).await;
        assert_error_shape(&r, StatusCode::UNAUTHORIZED, "unauthorized");
        let r = app
            .send(
                Request::get("/api/v1/me")
                    .header(header::AUTHORIZATION, "Basic YWRtaW46YWRtaW4=")
                    .body(Body::empty())
                    .unwrap(),
            )
            .await;
        assert_error_shape(&r, StatusCode::UNAUTHORIZED, "unauthorized");
        let r = app.call(Method::GET, "/api/v1/users", None, None).await;
        assert_error_shape(&r, StatusCode::UNAUTHORIZED, "unauthorized");
    });
}

#[tokio::test]
async fn users_lifecycle_pagination_and_last_admin_protection() {
    each_backend!(|app| {
        let mut names = Vec::new();
        for i in 0..7 {
            let name = format!("user{i}");
            let role = ["viewer", "operator"][i % 2];
            let r = app.admin(Method::POST, "/api/v1/users", Some(json!({"username": name, "role": role}))).await;
            assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
            let pw = r.body["generated_password"].as_str().expect("a generated password is returned once");
            assert!(pw.len() >= 16);
            names.push(name);
        }
        let dup = app.admin(Method::POST, "/api/v1/users", Some(json!({"username": "user3", "role": "viewer"}))).await;
        assert_error_shape(&dup, StatusCode::CONFLICT, "conflict");

        // Three pages of three by username; nothing repeated, nothing lost.
        let mut seen = Vec::new();
        let mut cursor: Option<String> = None;
        let mut pages = 0;
        loop {
            let path = match &cursor {
                Some(c) => format!("/api/v1/users?limit=3&cursor={c}"),
                None => "/api/v1/users?limit=3".to_string(),
            };
            let r = app.admin(Method::GET, &path, None).await;
            assert_eq!(r.status, StatusCode::OK, "{}", r.text);
            for u in r.body["items"].as_array().unwrap() {
                seen.push(u["username"].as_str().unwrap().to_string());
            }
            pages += 1;
            match r.body["next_cursor"].as_str() {
                Some(c) => cursor = Some(c.to_string()),
                None => break,
            }
        }
        assert_eq!(pages, 3);
        let mut expected = names.clone();
        expected.push("admin".into());
        expected.sort();
        assert_eq!(seen, expected);

        // Newest first, then filtered by role and substring.
        let r = app.admin(Method::GET, "/api/v1/users?sort=-created_at&limit=2", None).await;
        let first: Vec<_> =
            r.body["items"].as_array().unwrap().iter().map(|u| u["username"].as_str().unwrap()).collect();
        assert_eq!(first, ["user6", "user5"]);
        let cursor = r.body["next_cursor"].as_str().unwrap();
        let r2 = app.admin(Method::GET, &format!("/api/v1/users?sort=-created_at&limit=2&cursor={cursor}"), None).await;
        let second: Vec<_> =
            r2.body["items"].as_array().unwrap().iter().map(|u| u["username"].as_str().unwrap()).collect();
        assert_eq!(second, ["user4", "user3"]);
        let r = app.admin(Method::GET, "/api/v1/users?role=operator", None).await;
        assert_eq!(r.body["items"].as_array().unwrap().len(), 3);
        let r = app.admin(Method::GET, "/api/v1/users?q=er6", None).await;
        assert_eq!(r.body["items"][0]["username"], "user6");
        // '_' and '%' in a search match themselves, not any character.
        for name in ["ann_b", "annxb"] {
            app.admin(Method::POST, "/api/v1/users", Some(json!({"username": name, "role": "viewer"}))).await;
        }
        let r = app.admin(Method::GET, "/api/v1/users?q=n_b", None).await;
        let found: Vec<&str> =
            r.body["items"].as_array().unwrap().iter().map(|u| u["username"].as_str().unwrap()).collect();
        assert_eq!(found, ["ann_b"]);
        let r = app.admin(Method::GET, "/api/v1/users?q=%25", None).await;
        assert!(r.body["items"].as_array().unwrap().is_empty());
        for name in ["ann_b", "annxb"] {
            let id = app.admin(Method::GET, &format!("/api/v1/users?q={name}"), None).await.body["items"][0]["id"]
                .as_str()
                .unwrap()
                .to_string();
            app.admin(Method::DELETE, &format!("/api/v1/users/{id}"), None).await;
        }
        let mixed = app.admin(Method::GET, &format!("/api/v1/users?sort=username&cursor={cursor}"), None).await;
        assert_error_shape(&mixed, StatusCode::BAD_REQUEST, "invalid_cursor");

        // The only admin cannot be demoted, disabled or deleted.
        let admin = app.admin(Method::GET, "/api/v1/users?role=admin", None).await;
        let admin_id = admin.body["items"][0]["id"].as_str().unwrap().to_string();
        for body in [json!({"role": "viewer"}), json!({"disabled": true})] {
            let r = app.admin(Method::PATCH, &format!("/api/v1/users/{admin_id}"), Some(body)).await;
            assert_error_shape(&r, StatusCode::CONFLICT, "conflict");
        }
        let r = app.admin(Method::DELETE, &format!("/api/v1/users/{admin_id}"), None).await;
        assert_error_shape(&r, StatusCode::CONFLICT, "conflict");

        // Promote user1, then the first admin may step down.
        let u1 = app.admin(Method::GET, "/api/v1/users?q=user1", None).await;
        let u1_id = u1.body["items"][0]["id"].as_str().unwrap().to_string();
        let r = app.admin(Method::PATCH, &format!("/api/v1/users/{u1_id}"), Some(json!({"role": "admin"}))).await;
        assert_eq!(r.body["role"], "admin", "{}", r.text);
        let r = app.admin(Method::PATCH, &format!("/api/v1/users/{admin_id}"), Some(json!({"role": "operator"}))).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);

        let u2 = app.admin(Method::GET, "/api/v1/users?q=user2", None).await;
        let u2_id = u2.body["items"][0]["id"].as_str().unwrap().to_string();
        let r = app.admin(Method::DELETE, &format!("/api/v1/users/{u2_id}"), None).await;
        assert_eq!(r.status, StatusCode::NO_CONTENT);
        let r = app.admin(Method::GET, &format!("/api/v1/users/{u2_id}"), None).await;
        assert_error_shape(&r, StatusCode::NOT_FOUND, "not_found");

        // Each change is in the audit log with who did it and what changed.
        let audit = app.admin(Method::GET, "/api/v1/audit?action=user.&limit=100", None).await;
        let entries = audit.body["items"].as_array().unwrap();
        let creates =
            entries.iter().filter(|e| e["action"] == "user.create" && e["actor"]["name"] == "test admin").count();
        assert_eq!(creates, 9, "user0-6, ann_b and annxb");
        assert!(entries.iter().any(|e| e["action"] == "user.update"
            && e["summary"].as_str().unwrap().contains("user \"user1\": role: operator → admin")));
        assert!(entries.iter().any(|e| e["action"] == "user.delete" && e["target_id"] == u2_id.as_str()));
        assert!(entries.iter().all(|e| e["actor"]["kind"] == "token" || e["actor"]["kind"] == "system"));
    });
}

#[tokio::test]
async fn sessions_need_csrf_for_changes_and_repeated_wrong_passwords_are_throttled() {
    each_backend!(|app| {
        let (login, cookie, csrf) = app.sign_in("admin", ADMIN_PASSWORD).await;
        assert_eq!(login.status, StatusCode::OK, "{}", login.text);
        let set_cookie = login.headers.get(header::SET_COOKIE).unwrap().to_str().unwrap().to_string();
        assert!(set_cookie.contains("HttpOnly") && set_cookie.contains("SameSite=Lax"), "{set_cookie}");
        assert!(!set_cookie.contains("Secure"), "plain HTTP without a proxy: no Secure flag");
        let with_cookie = |method: Method, path: &str, csrf: Option<&str>, body: Option<Value>| {
            let mut b = Request::builder().method(method).uri(path).header(header::COOKIE, cookie.clone());
            if let Some(c) = csrf {
                b = b.header("x-csrf-token", c);
            }
            match body {
                Some(v) => b.header(header::CONTENT_TYPE, "application/json").body(Body::from(v.to_string())).unwrap(),
                None => b.body(Body::empty()).unwrap(),
            }
        };
        let me = app.send(with_cookie(Method::GET, "/api/v1/me", None, None)).await;
        assert_eq!(me.body["kind"], "user");
        assert_eq!(me.body["name"], "admin");
        let body = json!({"username": "via-session", "role": "viewer"});
        let r = app.send(with_cookie(Method::POST, "/api/v1/users", None, Some(body.clone()))).await;
        assert_error_shape(&r, StatusCode::FORBIDDEN, "forbidden");
        let r = app.send(with_cookie(Method::POST, "/api/v1/users", Some("forged"), Some(body.clone()))).await;
        assert_error_shape(&r, StatusCode::FORBIDDEN, "forbidden");
        let r = app.send(with_cookie(Method::POST, "/api/v1/users", Some(&csrf), Some(body))).await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        let audit = app.admin(Method::GET, "/api/v1/audit?action=user.create&limit=1", None).await;
        assert_eq!(audit.body["items"][0]["actor"]["name"], "admin");
        assert_eq!(audit.body["items"][0]["actor"]["kind"], "user");

        // Behind an HTTPS proxy the cookie is Secure.
        let r = app
            .send(
                Request::post("/api/v1/auth/login")
                    .header(header::CONTENT_TYPE, "application/json")
                    .header("x-forwarded-proto", "https")
                    .body(Body::from(json!({"username": "admin", "password": ADMIN_PASSWORD}).to_string()))
                    .unwrap(),
            )
            .await;
        assert!(r.headers.get(header::SET_COOKIE).unwrap().to_str().unwrap().contains("; Secure"));

        let r = app.send(with_cookie(Method::POST, "/api/v1/auth/logout", Some(&csrf), None)).await;
        assert_eq!(r.status, StatusCode::NO_CONTENT);
        let r = app.send(with_cookie(Method::GET, "/api/v1/me", None, None)).await;
        assert_error_shape(&r, StatusCode::UNAUTHORIZED, "unauthorized");

        // Wrong passwords: five are answered, then the account is throttled — even for the
        // right password — and the answer says when to retry.
        let wrong = json!({"username": "admin", "password": "not the password"});
        for _ in 0..5 {
            let r = app.call(Method::POST, "/api/v1/auth/login", None, Some(wrong.clone())).await;
            assert_error_shape(&r, StatusCode::UNAUTHORIZED, "unauthorized");
        }
        let right = json!({"username": "admin", "password": ADMIN_PASSWORD});
        let r = app.call(Method::POST, "/api/v1/auth/login", None, Some(right)).await;
        assert_error_shape(&r, StatusCode::TOO_MANY_REQUESTS, "too_many_requests");
        assert!(r.headers.get(header::RETRY_AFTER).is_some());
        let unknown = app
            .call(
                Method::POST,
                "/api/v1/auth/login",
                None,
                Some(json!({"username": "nobody", "password": "whatever123"})),
            )
            .await;
        assert_error_shape(&unknown, StatusCode::UNAUTHORIZED, "unauthorized");
        assert_eq!(unknown.body["error"]["message"], json!("wrong username or password, or the account is disabled"));
    });
}

#[tokio::test]
async fn the_audit_chain_detects_an_entry_edited_in_the_database() {
    each_backend!(|app| {
        for i in 0..5 {
            let r = app
                .admin(Method::POST, "/api/v1/users", Some(json!({"username": format!("crew{i}"), "role": "viewer"})))
                .await;
            assert_eq!(r.status, StatusCode::CREATED);
        }
        let v = app.admin(Method::GET, "/api/v1/audit/verify", None).await;
        assert_eq!(v.body["ok"], true, "{}", v.text);
        let total = app.audit_count().await;
        assert_eq!(v.body["checked"], total);

        // No interface edits or deletes entries…
        for method in [Method::PUT, Method::PATCH, Method::DELETE] {
            let r = app.admin(method, "/api/v1/audit", Some(json!({}))).await;
            assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
        }
        // …and the database itself refuses it.
        let refused =
            sqlx::query("UPDATE audit_log SET summary = 'nothing happened' WHERE seq = 4").execute(app.db.pool()).await;
        assert!(refused.is_err(), "the append-only trigger refuses edits");
        let refused = sqlx::query("DELETE FROM audit_log WHERE seq = 4").execute(app.db.pool()).await;
        assert!(refused.is_err(), "the append-only trigger refuses deletes");

        // Someone with the database in hand removes the guard and rewrites history.
        let drop_guard = match app.db.backend() {
            drover_server::db::Backend::Sqlite => "DROP TRIGGER audit_log_no_update",
            drover_server::db::Backend::Postgres => "DROP TRIGGER audit_log_no_change ON audit_log",
        };
        sqlx::query(drop_guard).execute(app.db.pool()).await.unwrap();
        sqlx::query("UPDATE audit_log SET actor_name = 'somebody else' WHERE seq = 4")
            .execute(app.db.pool())
            .await
            .unwrap();
        let v = drover_server::audit::verify(&app.db).await.unwrap();
        assert!(!v.ok);
        assert_eq!(v.first_bad_seq, Some(4));
        assert!(v.message.contains("entry 4"), "{}", v.message);
        let api = app.admin(Method::GET, "/api/v1/audit/verify", None).await;
        assert_eq!(api.body["ok"], false);
        assert_eq!(api.body["first_bad_seq"], 4);

        // Recomputing the edited entry's own hash does not help: the next entry's link to it
        // breaks instead.
        let row: (String, i64, Option<String>, i64, String, String, String, String, String, String, String, String) =
            sqlx::query_as(
                "SELECT prev_hash, seq, org_id, at, actor_kind, actor_id, actor_name, action, target_kind, target_id, \
                 source, summary FROM audit_log WHERE seq = 4",
            )
            .fetch_one(app.db.pool())
            .await
            .unwrap();
        let canonical = serde_json::to_string(&row).unwrap();
        let rehashed = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(canonical.as_bytes()));
        sqlx::query("UPDATE audit_log SET hash = $1 WHERE seq = 4")
            .bind(rehashed)
            .execute(app.db.pool())
            .await
            .unwrap();
        let v = drover_server::audit::verify(&app.db).await.unwrap();
        assert_eq!(v.first_bad_seq, Some(5), "{}", v.message);
        assert!(v.message.contains("audit entry 5 does not link to entry 4"), "{}", v.message);
    });
}

#[tokio::test]
async fn audit_filters_and_paging() {
    each_backend!(|app| {
        let viewer = app.token("viewer").await;
        for i in 0..4 {
            app.admin(Method::POST, "/api/v1/users", Some(json!({"username": format!("f{i}"), "role": "viewer"})))
                .await;
        }
        let r = app.admin(Method::PATCH, "/api/v1/organization", Some(json!({"name": "Acme Fleet"}))).await;
        assert_eq!(r.body["name"], "Acme Fleet");

        let all = app.call(Method::GET, "/api/v1/audit?limit=500", Some(&viewer), None).await;
        let items = all.body["items"].as_array().unwrap();
        let seqs: Vec<i64> = items.iter().map(|e| e["seq"].as_i64().unwrap()).collect();
        assert!(seqs.windows(2).all(|w| w[0] > w[1]), "newest first: {seqs:?}");
        assert_eq!(items[0]["action"], "organization.update");
        assert!(items[0]["summary"].as_str().unwrap().contains("Acme Fleet"));
        assert_eq!(items[0]["source"], "local");

        let r = app.admin(Method::GET, "/api/v1/audit?action=token.create", None).await;
        assert!(r.body["items"].as_array().unwrap().iter().all(|e| e["action"] == "token.create"));
        let r = app.admin(Method::GET, "/api/v1/audit?action=user.&actor=test%20admin", None).await;
        assert_eq!(r.body["items"].as_array().unwrap().len(), 4);
        let r = app.admin(Method::GET, "/api/v1/audit?since=2999-01-01", None).await;
        assert!(r.body["items"].as_array().unwrap().is_empty());
        let r = app.admin(Method::GET, "/api/v1/audit?until=2000-01-01T00:00:00Z", None).await;
        assert!(r.body["items"].as_array().unwrap().is_empty());
        let r = app.admin(Method::GET, "/api/v1/audit?sort=seq&limit=2", None).await;
        assert_eq!(r.body["items"][0]["seq"], 1);
        let next = r.body["next_cursor"].as_str().unwrap();
        let r = app.admin(Method::GET, &format!("/api/v1/audit?sort=seq&limit=2&cursor={next}"), None).await;
        assert_eq!(r.body["items"][0]["seq"], 3);
        // Audit verification is for admins.
        let r = app.call(Method::GET, "/api/v1/audit/verify", Some(&viewer), None).await;
        assert_error_shape(&r, StatusCode::FORBIDDEN, "forbidden");
    });
}

#[tokio::test]
async fn health_readiness_and_metrics() {
    each_backend!(|app| {
        assert_eq!(app.call(Method::GET, "/healthz", None, None).await.status, StatusCode::OK);
        assert_eq!(app.call(Method::GET, "/readyz", None, None).await.status, StatusCode::OK);
        app.admin(Method::GET, "/api/v1/users", None).await;
        app.call(Method::GET, "/api/v1/users", Some("drv_nope"), None).await;
        let m = app.call(Method::GET, "/metrics", None, None).await;
        assert!(
            m.text.contains("drover_http_requests_total{method=\"GET\",route=\"/api/v1/users\",status=\"200\"} 1"),
            "{}",
            m.text
        );
        assert!(m.text.contains("drover_http_requests_total{method=\"GET\",route=\"/api/v1/users\",status=\"401\"} 1"));
        assert!(m.text.contains("drover_http_request_duration_seconds_count{route=\"/api/v1/users\"} 2"));
        assert!(m.text.contains(&format!("drover_db_pool_max_connections{{backend=\"{}\"}}", app.label)));
        // The database going away makes the server unready, not dead.
        app.db.close().await;
        assert_eq!(app.call(Method::GET, "/readyz", None, None).await.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(app.call(Method::GET, "/healthz", None, None).await.status, StatusCode::OK);
    });
}

#[tokio::test]
async fn own_password_change_needs_the_current_one_and_ends_sessions() {
    each_backend!(|app| {
        let (_, cookie, csrf) = app.sign_in("admin", ADMIN_PASSWORD).await;
        let change = |current: &str| {
            Request::post("/api/v1/me/password")
                .header(header::COOKIE, cookie.clone())
                .header("x-csrf-token", csrf.clone())
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(
                    json!({"current_password": current, "new_password": "a brand new password"}).to_string(),
                ))
                .unwrap()
        };
        let r = app.send(change("wrong current password")).await;
        assert_error_shape(&r, StatusCode::BAD_REQUEST, "invalid_request");
        let r = app.send(change(ADMIN_PASSWORD)).await;
        assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text);
        let r = app
            .send(Request::get("/api/v1/me").header(header::COOKIE, cookie.clone()).body(Body::empty()).unwrap())
            .await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "sessions ended");
        let (r, _, _) = app.sign_in("admin", "a brand new password").await;
        assert_eq!(r.status, StatusCode::OK);
        // A token has no password of its own.
        let r = app
            .admin(
                Method::POST,
                "/api/v1/me/password",
                Some(json!({"current_password": "x", "new_password": "long enough password"})),
            )
            .await;
        assert_error_shape(&r, StatusCode::FORBIDDEN, "forbidden");
    });
}

/// Two server replicas on one database, changing things at the same time: every change
/// lands, and the audit log stays one unbroken chain.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_changes_from_two_replicas_keep_one_unbroken_chain() {
    for tdb in crate::support::TestDb::all().await {
        let app = TestApp::new(&tdb).await;
        eprintln!("— on {}", app.label);
        let mut config = drover_server::config::Config::defaults(tdb.dir.path());
        config.database_url = tdb.url.clone();
        let db2 = drover_server::db::Db::open(&tdb.url).await.unwrap();
        let ca = std::sync::Arc::new(drover_server::app::open_ca(&config, &db2).await.unwrap());
        let replica2 = drover_server::app::router(drover_server::app::AppState::new(db2.clone(), config, ca));
        let before = app.audit_count().await;
        let mut tasks = Vec::new();
        for i in 0..24 {
            let router = if i % 2 == 0 { app.app.clone() } else { replica2.clone() };
            let token = app.admin_token.clone();
            tasks.push(tokio::spawn(async move {
                use tower::ServiceExt as _;
                let (method, path, body) = if i % 3 == 0 {
                    ("POST", "/api/v1/tokens".to_string(), json!({"name": format!("t{i}"), "role": "viewer"}))
                } else {
                    ("POST", "/api/v1/users".to_string(), json!({"username": format!("u{i}"), "role": "viewer"}))
                };
                let req = Request::builder()
                    .method(method)
                    .uri(path)
                    .header(header::AUTHORIZATION, format!("Bearer {token}"))
                    .header(header::CONTENT_TYPE, "application/json")
                    .body(Body::from(body.to_string()))
                    .unwrap();
                router.oneshot(req).await.unwrap().status()
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap(), StatusCode::CREATED);
        }
        assert_eq!(app.audit_count().await, before + 24);
        let v = drover_server::audit::verify(&app.db).await.unwrap();
        assert!(v.ok, "{}", v.message);
        db2.close().await;
        app.db.close().await;
        tdb.drop_schema().await;
    }
}
