//! Hostile input at the edge: NUL characters, sign-in throttling, the first admin's
//! password, and unauthenticated enrollment floods.

use axum::body::Body;
use axum::http::{Method, Request, StatusCode, header};
use serde_json::json;

use crate::each_backend;
use crate::support::Resp;

const NUL: &str = "text must not contain NUL (\\u0000)";

fn refused_for_nul(r: &Resp, what: &str) {
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{what}: {}", r.text);
    assert_eq!(r.body["error"]["code"], "invalid_request", "{what}: {}", r.text);
    let msg = r.body["error"]["message"].as_str().unwrap_or_default();
    assert!(msg.contains(NUL), "{what}: {msg}");
}

#[tokio::test]
async fn nul_characters_are_refused_at_the_edge_on_every_backend() {
    each_backend!(|app| {
        let users_before = app.admin(Method::GET, "/api/v1/users", None).await.body["items"].as_array().unwrap().len();
        let audit_before = app.audit_count().await;

        // Unauthenticated sign-in, as JSON.
        let r = app
            .call(Method::POST, "/api/v1/auth/login", None, Some(json!({"username": "a\u{0}", "password": "x"})))
            .await;
        refused_for_nul(&r, "login username");
        // Query strings and paths.
        refused_for_nul(&app.admin(Method::GET, "/api/v1/users?q=%00", None).await, "?q=%00");
        refused_for_nul(&app.admin(Method::GET, "/api/v1/devices?q=a%00b", None).await, "devices ?q=");
        refused_for_nul(&app.admin(Method::GET, "/api/v1/users/%00", None).await, "/users/%00");
        refused_for_nul(&app.admin(Method::GET, "/api/v1/devices/x%00y", None).await, "/devices/x%00y");
        // Bodies that would store the text.
        let r = app.admin(Method::POST, "/api/v1/users", Some(json!({"username": "ann\u{0}", "role": "viewer"}))).await;
        refused_for_nul(&r, "user name");
        let r = app.admin(Method::POST, "/api/v1/enrollment-tokens", Some(json!({"name": "fac\u{0}tory"}))).await;
        refused_for_nul(&r, "enrollment token name");
        // Pre-authorization by CSV, a raw body.
        let csv = Request::builder()
            .method(Method::POST)
            .uri("/api/v1/devices/preauthorize/bulk")
            .header(header::AUTHORIZATION, format!("Bearer {}", app.admin_token))
            .header(header::CONTENT_TYPE, "text/csv")
            .body(Body::from("serial\nSN-1\u{0}\n"))
            .unwrap();
        refused_for_nul(&app.send(csv).await, "CSV pre-authorization");
        // The web UI's sign-in form.
        let form = Request::builder()
            .method(Method::POST)
            .uri("/login")
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(Body::from("username=admin%00&password=x&csrf=y"))
            .unwrap();
        refused_for_nul(&app.send(form).await, "UI sign-in form");
        // Unauthenticated enrollment on the device endpoint.
        let r = app
            .call(Method::POST, "/api/v1/enroll", None, Some(json!({"identity": {"serial": "SN\u{0}"}, "csr": "x"})))
            .await;
        refused_for_nul(&r, "enrollment identity");

        // An escaped backslash before `u0000` is no NUL: that name is merely invalid.
        let r =
            app.admin(Method::POST, "/api/v1/users", Some(json!({"username": "ann\\u0000", "role": "viewer"}))).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text);
        assert!(!r.text.contains("NUL"), "{}", r.text);

        // Nothing was stored.
        let users = app.admin(Method::GET, "/api/v1/users", None).await;
        assert_eq!(users.body["items"].as_array().unwrap().len(), users_before);
        let tokens = app.admin(Method::GET, "/api/v1/enrollment-tokens", None).await;
        assert_eq!(tokens.body["items"].as_array().unwrap().len(), 0, "{}", tokens.text);
        let pre = app.admin(Method::GET, "/api/v1/preauthorizations", None).await;
        assert_eq!(pre.status, StatusCode::OK, "{}", pre.text);
        assert!(!pre.text.contains("SN-1"), "{}", pre.text);
        let devices = app.admin(Method::GET, "/api/v1/devices", None).await;
        assert_eq!(devices.body["items"].as_array().unwrap().len(), 0, "{}", devices.text);
        assert_eq!(app.audit_count().await, audit_before);
    })
}

/// `POST /api/v1/auth/login` from the client address `ip`, as the listener tells the router.
async fn login_from(app: &crate::support::TestApp, ip: [u8; 4], username: &str, password: &str) -> Resp {
    let mut req = Request::builder()
        .method(Method::POST)
        .uri("/api/v1/auth/login")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(json!({"username": username, "password": password}).to_string()))
        .unwrap();
    let addr = std::net::SocketAddr::from((ip, 40000));
    req.extensions_mut().insert(axum::extract::ConnectInfo(addr));
    app.send(req).await
}

#[tokio::test]
async fn an_attacker_cannot_lock_the_real_user_out() {
    use crate::support::ADMIN_PASSWORD;
    use drover_server::auth::LoginLimiter;
    each_backend!(|app| {
        let attacker = [198, 51, 100, 7];
        let mut refused = 0;
        for _ in 0..LoginLimiter::FREE_FAILURES + 5 {
            let r = login_from(&app, attacker, "admin", "wrong guess").await;
            match r.status {
                StatusCode::UNAUTHORIZED => {}
                StatusCode::TOO_MANY_REQUESTS => refused += 1,
                s => panic!("unexpected {s}: {}", r.text),
            }
        }
        assert!(refused >= 5, "the attacker's address is throttled after its free failures");

        // The real user, from their own address, signs in with the right password at once.
        let started = std::time::Instant::now();
        let r = login_from(&app, [203, 0, 113, 9], "admin", ADMIN_PASSWORD).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        assert!(started.elapsed() < std::time::Duration::from_secs(5), "took {:?}", started.elapsed());

        // The attacker's address stays throttled, even with the right password.
        let r = login_from(&app, attacker, "admin", ADMIN_PASSWORD).await;
        assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{}", r.text);
        assert!(r.headers.contains_key(header::RETRY_AFTER));

        // Guessing from many addresses slows the user name down, but never refuses the right
        // password from an address that has not failed: at most a short delay.
        for i in 0..LoginLimiter::USER_SLOW_AFTER + 3 {
            let r = login_from(&app, [198, 51, 101, i as u8], "admin", "wrong guess").await;
            assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.text);
        }
        let started = std::time::Instant::now();
        let r = login_from(&app, [203, 0, 113, 10], "admin", ADMIN_PASSWORD).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        let took = started.elapsed();
        assert!(took >= std::time::Duration::from_millis(250), "slowed down: {took:?}");
        assert!(took < LoginLimiter::USER_MAX_DELAY + std::time::Duration::from_secs(3), "took {took:?}");
    })
}

/// `POST /api/v1/enroll` on the device endpoint of `router` from the client address `ip`.
async fn enroll_from(
    router: &axum::Router,
    ip: [u8; 4],
    csr: &str,
    serial: &str,
    token: Option<&str>,
) -> (StatusCode, axum::http::HeaderMap, serde_json::Value) {
    use tower::ServiceExt as _;
    let mut body = json!({"csr_pem": csr, "identity": {"serial": serial}});
    if let Some(t) = token {
        body["token"] = json!(t);
    }
    let mut req = Request::builder()
        .method(Method::POST)
        .uri("/api/v1/enroll")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_string()))
        .unwrap();
    req.extensions_mut().insert(axum::extract::ConnectInfo(std::net::SocketAddr::from((ip, 50000))));
    let resp = router.clone().oneshot(req).await.unwrap();
    let (status, headers) = (resp.status(), resp.headers().clone());
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20).await.unwrap();
    (status, headers, serde_json::from_slice(&bytes).unwrap_or_default())
}

fn refused_with(status: StatusCode, headers: &axum::http::HeaderMap, body: &serde_json::Value, setting: &str) {
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    let retry: u64 = headers.get(header::RETRY_AFTER).expect("Retry-After").to_str().unwrap().parse().unwrap();
    assert!(retry >= 1, "{retry}");
    assert!(body["error"]["message"].as_str().unwrap().contains(setting), "{body}");
}

async fn pending_count(app: &crate::support::TestApp) -> usize {
    let r = app.admin(Method::GET, "/api/v1/devices?status=pending&limit=200", None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    r.body["items"].as_array().unwrap().len()
}

#[tokio::test]
async fn unauthenticated_enrollment_is_rate_limited_capped_and_expires() {
    use crate::devices::device_csr;
    each_backend!(|app| {
        let (a, b) = ([198, 51, 100, 1], [198, 51, 100, 2]);
        let per_minute = app.state.config.enroll_pending_per_minute as usize;
        assert_eq!(per_minute, 10, "the default");
        let first = device_csr();
        for i in 0..per_minute {
            let csr = if i == 0 { first.clone() } else { device_csr() };
            let (status, _, body) = enroll_from(&app.device_app, a, &csr, &format!("SQ-{i}"), None).await;
            assert_eq!(status, StatusCode::ACCEPTED, "{body}");
        }
        // The next claim without proof from that address is refused, and stores nothing.
        let (status, headers, body) = enroll_from(&app.device_app, a, &device_csr(), "SQ-over", None).await;
        refused_with(status, &headers, &body, "enroll_pending_per_minute");
        assert_eq!(pending_count(&app).await, per_minute);
        // A waiting device asking again (polling) is not counted; other addresses have their own
        // bucket; and a device with a token has a much higher limit.
        let (status, _, body) = enroll_from(&app.device_app, a, &first, "SQ-0", None).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
        let (status, _, body) = enroll_from(&app.device_app, b, &device_csr(), "OTHER-1", None).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
        let t = app.admin(Method::POST, "/api/v1/enrollment-tokens", Some(json!({"name": "factory"}))).await;
        let secret = t.body["secret"].as_str().unwrap().to_string();
        for i in 0..per_minute + 5 {
            let (status, _, body) =
                enroll_from(&app.device_app, a, &device_csr(), &format!("FAB-{i}"), Some(&secret)).await;
            assert_eq!(status, StatusCode::OK, "a factory line enrolls fast: {body}");
        }

        // The cap on waiting devices per organization (max_pending_devices).
        let mut config = app.state.config.clone();
        config.enroll_pending_per_minute = 0;
        config.max_pending_devices = per_minute as u64 + 2;
        let capped = drover_server::devnet::device_router(drover_server::app::AppState::new(
            app.db.clone(),
            config,
            app.state.ca.clone(),
        ));
        let (status, _, body) = enroll_from(&capped, [198, 51, 100, 3], &device_csr(), "LAST-1", None).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
        let (status, headers, body) = enroll_from(&capped, [198, 51, 100, 4], &device_csr(), "LAST-2", None).await;
        refused_with(status, &headers, &body, "max_pending_devices");
        assert_eq!(pending_count(&app).await, per_minute + 2);
        let (status, _, body) =
            enroll_from(&capped, [198, 51, 100, 4], &device_csr(), "FAB-capped", Some(&secret)).await;
        assert_eq!(status, StatusCode::OK, "a token is not capped: {body}");

        // Devices that waited longer than pending_expiry_days are removed by the sweep, with one
        // audit entry; the others stay, and so do accepted ones.
        let eight_days_ago = drover_server::time::now_ms() - 8 * 86_400_000;
        sqlx::query("UPDATE devices SET created_at = $1 WHERE status = 'pending' AND identity LIKE '%SQ-%'")
            .bind(eight_days_ago)
            .execute(app.db.pool())
            .await
            .unwrap();
        let days = app.state.config.pending_expiry_days;
        assert_eq!(days, 7, "the default");
        let removed =
            drover_server::devices::expire_pending(&app.db, days, drover_server::time::now_ms()).await.unwrap();
        assert_eq!(removed, per_minute as u64);
        assert_eq!(pending_count(&app).await, 2);
        let audit = app.admin(Method::GET, "/api/v1/audit?action=device.expire", None).await;
        assert_eq!(audit.body["items"].as_array().unwrap().len(), 1, "{}", audit.text);
        let accepted = app.admin(Method::GET, "/api/v1/devices?status=accepted&limit=200", None).await;
        assert_eq!(accepted.body["items"].as_array().unwrap().len(), per_minute + 6);
        // A second sweep finds nothing, and writes no audit entry.
        assert_eq!(
            drover_server::devices::expire_pending(&app.db, days, drover_server::time::now_ms()).await.unwrap(),
            0
        );
        let audit = app.admin(Method::GET, "/api/v1/audit?action=device.expire", None).await;
        assert_eq!(audit.body["items"].as_array().unwrap().len(), 1, "{}", audit.text);
    })
}
