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
        assert_eq!(tokens.body.as_array().unwrap().len(), 0, "{}", tokens.text);
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
