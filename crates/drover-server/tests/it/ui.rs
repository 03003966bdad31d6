//! The web UI through the router: sign-in with CSRF, pages rendered on the server, forms
//! that change things only with the session's CSRF token, and the role's limits.

use axum::body::Body;
use axum::http::{Method, Request, StatusCode, header};
use serde_json::json;

use crate::each_backend;
use crate::support::{ADMIN_PASSWORD, Resp, TestApp};

fn form(pairs: &[(&str, &str)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| {
            let enc: String = v
                .bytes()
                .map(|b| {
                    if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                        (b as char).to_string()
                    } else {
                        format!("%{b:02X}")
                    }
                })
                .collect();
            format!("{k}={enc}")
        })
        .collect::<Vec<_>>()
        .join("&")
}

fn extract(html: &str, before: &str, after: &str) -> Option<String> {
    let start = html.find(before)? + before.len();
    let end = html[start..].find(after)? + start;
    Some(html[start..end].to_string())
}

/// Signs in through the login form; returns the session cookie and the page CSRF token.
async fn sign_in(app: &TestApp, username: &str, password: &str) -> (String, String) {
    let page = app.send(Request::get("/login").body(Body::empty()).unwrap()).await;
    assert_eq!(page.status, StatusCode::OK);
    let login_cookie =
        page.headers.get(header::SET_COOKIE).unwrap().to_str().unwrap().split(';').next().unwrap().to_string();
    let csrf = extract(&page.text, r#"name="csrf" value=""#, "\"").unwrap();
    let r = post_form(
        app,
        "/login",
        &login_cookie,
        &[("username", username), ("password", password), ("csrf", &csrf), ("next", "/")],
    )
    .await;
    assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", r.text);
    let session = r
        .headers
        .get_all(header::SET_COOKIE)
        .iter()
        .map(|v| v.to_str().unwrap())
        .find(|v| v.starts_with("drover_session="))
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_string();
    let overview = get(app, "/", &session).await;
    let page_csrf = extract(&overview.text, r#"name="csrf" value=""#, "\"").unwrap();
    (session, page_csrf)
}

async fn get(app: &TestApp, path: &str, cookie: &str) -> Resp {
    app.send(Request::get(path).header(header::COOKIE, cookie).body(Body::empty()).unwrap()).await
}

async fn post_form(app: &TestApp, path: &str, cookie: &str, pairs: &[(&str, &str)]) -> Resp {
    app.send(
        Request::post(path)
            .header(header::COOKIE, cookie)
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(Body::from(form(pairs)))
            .unwrap(),
    )
    .await
}

#[tokio::test]
async fn sign_in_pages_and_forms() {
    each_backend!(|app| {
        // Without a session every page sends the browser to sign in, remembering where it was.
        let r = app.send(Request::get("/audit?action=user.").body(Body::empty()).unwrap()).await;
        assert_eq!(r.status, StatusCode::SEE_OTHER);
        assert_eq!(r.headers.get(header::LOCATION).unwrap(), "/login?next=/audit%3Faction%3Duser.");

        // A login form posted without its CSRF cookie is refused.
        let r =
            post_form(&app, "/login", "", &[("username", "admin"), ("password", ADMIN_PASSWORD), ("csrf", "guess")])
                .await;
        assert_eq!(r.status, StatusCode::FORBIDDEN);
        assert!(
            r.headers.get_all(header::SET_COOKIE).iter().all(|c| !c.to_str().unwrap().starts_with("drover_session="))
        );

        // A wrong password shows the form again with a message.
        let page = app.send(Request::get("/login").body(Body::empty()).unwrap()).await;
        let lc = page.headers.get(header::SET_COOKIE).unwrap().to_str().unwrap().split(';').next().unwrap().to_string();
        let csrf = extract(&page.text, r#"name="csrf" value=""#, "\"").unwrap();
        let r =
            post_form(&app, "/login", &lc, &[("username", "admin"), ("password", "nope nope nope"), ("csrf", &csrf)])
                .await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED);
        assert!(r.text.contains("wrong username or password"));

        let (session, csrf) = sign_in(&app, "admin", ADMIN_PASSWORD).await;
        let overview = get(&app, "/", &session).await;
        assert_eq!(overview.status, StatusCode::OK);
        assert!(overview.text.contains("session.login"), "recent changes list the sign-in");
        // Scripts come from the binary's own files only: no inline code, nothing from elsewhere.
        for tag in overview.text.split("<script").skip(1) {
            let tag = &tag[..tag.find('>').unwrap()];
            assert!(tag.contains(r#"src="/assets/"#), "script without a local src: <script{tag}>");
        }

        // Create a user through the form: refused without the token, done with it.
        let r =
            post_form(&app, "/users", &session, &[("username", "dora"), ("role", "viewer"), ("password", "")]).await;
        assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "a form without csrf is malformed: {}", r.text);
        let r = post_form(
            &app,
            "/users",
            &session,
            &[("csrf", "wrong"), ("username", "dora"), ("role", "viewer"), ("password", "")],
        )
        .await;
        assert_eq!(r.status, StatusCode::FORBIDDEN);
        let r = post_form(
            &app,
            "/users",
            &session,
            &[("csrf", &csrf), ("username", "dora"), ("role", "viewer"), ("password", "")],
        )
        .await;
        assert_eq!(r.status, StatusCode::OK);
        let password = extract(&r.text, r#"id="new-password">"#, "<").expect("the generated password is shown once");
        let users = get(&app, "/users", &session).await;
        assert!(users.text.contains("dora"));
        assert!(!users.text.contains(&password), "shown only once");

        // Tokens: created through the form, the secret shown once, not cached, revocable.
        let r = post_form(
            &app,
            "/tokens",
            &session,
            &[("csrf", &csrf), ("name", "pipeline"), ("role", "operator"), ("expires_in_days", "30")],
        )
        .await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.headers.get(header::CACHE_CONTROL).unwrap(), "no-store");
        let secret = extract(&r.text, r#"id="new-token">"#, "<").unwrap();
        assert!(secret.starts_with("drv_"));
        let me = app.call(Method::GET, "/api/v1/me", Some(&secret), None).await;
        assert_eq!(me.body["name"], "pipeline");

        // Duplicate username: back to the page with the error.
        let r = post_form(
            &app,
            "/users",
            &session,
            &[("csrf", &csrf), ("username", "dora"), ("role", "viewer"), ("password", "")],
        )
        .await;
        assert_eq!(r.status, StatusCode::SEE_OTHER);
        let loc = r.headers.get(header::LOCATION).unwrap().to_str().unwrap().to_string();
        assert!(loc.starts_with("/users?error="), "{loc}");
        let shown = get(&app, &loc, &session).await;
        assert!(shown.text.contains("is taken"), "{}", shown.text);

        // The audit page filters.
        let audit = get(&app, "/audit?action=token.", &session).await;
        assert!(audit.text.contains("token.create"));
        assert!(!audit.text.contains("<code>user.create</code>"));

        // An admin sets dora's password through the form.
        let dora = app.admin(Method::GET, "/api/v1/users?q=dora", None).await;
        let dora_id = dora.body["items"][0]["id"].as_str().unwrap().to_string();
        let r =
            post_form(&app, &format!("/users/{dora_id}/password"), &session, &[("csrf", &csrf), ("password", "short")])
                .await;
        assert!(r.headers.get(header::LOCATION).unwrap().to_str().unwrap().contains("error=password%20too%20short"));
        let r = post_form(
            &app,
            &format!("/users/{dora_id}/password"),
            &session,
            &[("csrf", &csrf), ("password", "dora's new password")],
        )
        .await;
        assert_eq!(r.headers.get(header::LOCATION).unwrap(), "/users?notice=Password%20set.");
        let old = app
            .call(Method::POST, "/api/v1/auth/login", None, Some(json!({"username": "dora", "password": password})))
            .await;
        assert_eq!(old.status, StatusCode::UNAUTHORIZED);

        // The viewer sees everything and no forms that change things.
        let (vs, _) = sign_in(&app, "dora", "dora's new password").await;
        let users = get(&app, "/users", &vs).await;
        assert!(users.text.contains("dora") && users.text.contains("admin"));
        assert!(!users.text.contains("Add user"));
        let r = post_form(
            &app,
            "/tokens",
            &vs,
            &[
                ("csrf", &extract(&users.text, r#"name="csrf" value=""#, "\"").unwrap()),
                ("name", "x"),
                ("role", "admin"),
            ],
        )
        .await;
        assert_eq!(r.status, StatusCode::SEE_OTHER);
        assert!(r.headers.get(header::LOCATION).unwrap().to_str().unwrap().contains("permission%20denied"));

        // Behind an HTTPS proxy the web sign-in and sign-out set Secure cookies, as the API does.
        let page = app.send(Request::get("/login").body(Body::empty()).unwrap()).await;
        let lc = page.headers.get(header::SET_COOKIE).unwrap().to_str().unwrap().split(';').next().unwrap().to_string();
        let login_csrf = extract(&page.text, r#"name="csrf" value=""#, "\"").unwrap();
        let via_proxy = |path: &str, cookie: &str, body: String| {
            Request::post(path)
                .header(header::COOKIE, cookie)
                .header("x-forwarded-proto", "HTTPS")
                .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
                .body(Body::from(body))
                .unwrap()
        };
        let body = form(&[("username", "admin"), ("password", ADMIN_PASSWORD), ("csrf", &login_csrf)]);
        let r = app.send(via_proxy("/login", &lc, body)).await;
        let set: Vec<&str> = r.headers.get_all(header::SET_COOKIE).iter().map(|v| v.to_str().unwrap()).collect();
        let session_set = set.iter().find(|c| c.starts_with("drover_session=")).unwrap();
        assert!(session_set.ends_with("; Secure"), "{session_set}");
        let proxied = session_set.split(';').next().unwrap().to_string();
        let proxied_csrf = extract(&get(&app, "/", &proxied).await.text, r#"name="csrf" value=""#, "\"").unwrap();
        let r = app.send(via_proxy("/logout", &proxied, form(&[("csrf", &proxied_csrf)]))).await;
        let cleared = r.headers.get(header::SET_COOKIE).unwrap().to_str().unwrap();
        assert!(cleared.contains("Max-Age=0") && cleared.ends_with("; Secure"), "{cleared}");

        // Signing out ends the session.
        let r = post_form(&app, "/logout", &session, &[("csrf", &csrf)]).await;
        assert_eq!(r.status, StatusCode::SEE_OTHER);
        assert_eq!(get(&app, "/", &session).await.status, StatusCode::SEE_OTHER);

        // Third-party code is served from the binary with its licence.
        let js = app.call(Method::GET, "/assets/vendor/htmx-2.0.4.min.js", None, None).await;
        assert_eq!(js.status, StatusCode::OK);
        let lic = app.call(Method::GET, "/assets/licenses", None, None).await;
        assert!(lic.text.contains("htmx 2.0.4") && lic.text.contains("Zero-Clause BSD"), "{}", lic.text);
    });
}
