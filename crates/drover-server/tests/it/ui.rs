//! The web UI through the router: sign-in with CSRF, pages rendered on the server, forms
//! that change things only with the session's CSRF token, and the role's limits.

use axum::body::Body;
use axum::http::{Method, Request, StatusCode, header};
use serde_json::json;

use crate::each_backend;
use crate::support::{ADMIN_PASSWORD, Resp, TestApp, hello};

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

/// A device asks to enroll with a fresh key; returns its id.
async fn enroll_device(app: &TestApp, identity: serde_json::Value, token: Option<&str>) -> String {
    let key = rcgen::KeyPair::generate().unwrap();
    let csr = rcgen::CertificateParams::default().serialize_request(&key).unwrap().pem().unwrap();
    let mut body = json!({"csr_pem": csr, "identity": identity});
    if let Some(t) = token {
        body["token"] = json!(t);
    }
    let r = app.call(Method::POST, "/api/v1/enroll", None, Some(body)).await;
    assert!(r.status.is_success(), "{}", r.text);
    r.body["device_id"].as_str().unwrap().to_string()
}

fn location(r: &Resp) -> String {
    r.headers.get(header::LOCATION).map(|l| l.to_str().unwrap().to_string()).unwrap_or_default()
}

async fn device_status(app: &TestApp, id: &str) -> String {
    app.admin(Method::GET, &format!("/api/v1/devices/{id}"), None).await.body["status"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn device_pages_pending_accept_tags_decommission() {
    each_backend!(|app| {
        let a = enroll_device(&app, json!({"serial": "SN-UI-A"}), None).await;
        let b = enroll_device(&app, json!({"serial": "SN-UI-B"}), None).await;
        let (session, csrf) = sign_in(&app, "admin", ADMIN_PASSWORD).await;

        // The list, with counts per status and the pending devices in the navigation.
        let list = get(&app, "/devices", &session).await;
        assert_eq!(list.status, StatusCode::OK, "{}", list.text);
        // Devices by their display name (here the serial), the id small beside it.
        assert!(list.text.contains(">SN-UI-A</a>") && list.text.contains(">SN-UI-B</a>"), "{}", list.text);
        assert!(list.text.contains(&format!(
            r#"title="{a}">SN-UI-A</a> <span class="muted mono device-id">…{}</span>"#,
            &a[a.len() - 8..]
        )));
        assert!(!list.text.contains("serial=SN-UI-A"), "no identity strings");
        assert!(list.text.contains(r#"id="tab-pending">pending <span class="count">2</span>"#), "{}", list.text);
        assert!(list.text.contains(r#"Pending <span class="badge">2</span>"#));
        let overview = get(&app, "/", &session).await;
        assert!(overview.text.contains(r#"id="card-pending"><span class="n">2</span>"#), "{}", overview.text);
        assert!(list.text.contains(r#"hx-trigger="every 5s""#), "the table refreshes itself");
        // A refresh whose session ended sends the whole page to sign in, then back to the list.
        let r = app
            .send(
                Request::get("/devices/table")
                    .header("hx-request", "true")
                    .header("hx-current-url", "http://drover.test/devices?status=accepted")
                    .body(Body::empty())
                    .unwrap(),
            )
            .await;
        assert_eq!(r.headers.get("hx-redirect").unwrap(), "/login?next=/devices%3Fstatus%3Daccepted");
        let table = get(&app, "/devices/table?sort=-created_at", &session).await;
        assert!(table.text.starts_with(r#"<div id="devices-table""#) && !table.text.contains("<html"), "a fragment");
        assert!(table.text.contains("SN-UI-A"));

        // The pending list has boxes to tick and a bulk accept.
        let pending = get(&app, "/devices?status=pending", &session).await;
        assert!(pending.text.contains("Pending devices") && pending.text.contains(r#"id="bulk-accept""#));
        assert!(pending.text.contains(&format!(r#"name="id" value="{a}" form="bulk""#)));
        assert!(!pending.text.contains(r#"hx-trigger="every 5s""#), "ticked boxes are not swapped away");

        let r = post_form(&app, "/devices/bulk", &session, &[("action", "accept"), ("id", &a)]).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "no CSRF token: {}", r.text);
        let r =
            post_form(&app, "/devices/bulk", &session, &[("csrf", "wrong"), ("action", "accept"), ("id", &a)]).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN);
        assert_eq!(device_status(&app, &a).await, "pending");
        let r = post_form(
            &app,
            "/devices/bulk",
            &session,
            &[("csrf", &csrf), ("return_to", "/devices?status=pending"), ("action", "accept"), ("id", &a)],
        )
        .await;
        assert_eq!(r.status, StatusCode::SEE_OTHER);
        assert_eq!(location(&r), "/devices?status=pending&notice=Accepted%201%20device.");
        assert_eq!(device_status(&app, &a).await, "accepted");

        // The device page: identity, presence, agent, certificate, inventory, events.
        drover_server::presence::record_hello(&app.db, &a, &hello("drover-agent/0.1.0", "boot-1"), 1_700_000_000_000)
            .await
            .unwrap();
        drover_server::presence::record_status(&app.db, &a, true, 1_700_000_000_000).await.unwrap();
        let inventory = [("arch".to_string(), "aarch64".to_string())].into_iter().collect();
        drover_server::presence::record_inventory(&app.db, &a, &inventory, 1_700_000_000_500).await.unwrap();
        let page = get(&app, &format!("/devices/{a}"), &session).await;
        assert_eq!(page.status, StatusCode::OK);
        assert!(page.text.contains(r#"id="device-status">accepted"#), "{}", page.text);
        assert!(page.text.contains(r#"id="device-presence">● online"#));
        assert!(page.text.contains("drover-agent&#x2f;0.1.0") && page.text.contains("aarch64"));
        assert!(page.text.contains("Certificate expires</dt><dd><time datetime=\"20"), "the expiry date is shown");
        assert!(page.text.contains("<title>Device SN-UI-A · Drover</title>"), "the title is the device's name");
        assert!(page.text.contains(r#"<h1 id="device-title">SN-UI-A</h1>"#));
        // Times: how long ago, the absolute time with its zone in the tooltip.
        assert!(page.text.contains(r#"title="2023-11-14 22:13:20 UTC">"#), "{}", page.text);
        assert!(page.text.contains("connected"), "recent events");
        assert!(page.text.contains(&format!(r#"href="/devices/{a}/decommission""#)));
        let online = get(&app, "/devices?online=true", &session).await;
        assert!(online.text.contains("SN-UI-A") && !online.text.contains("SN-UI-B"));

        // Tags through the form, then a filter on them.
        let r = post_form(
            &app,
            &format!("/devices/{a}/tags"),
            &session,
            &[("csrf", &csrf), ("tags", "region=eu\nrack = 7\n")],
        )
        .await;
        assert_eq!(location(&r), format!("/devices/{a}?notice=Tags%20saved."));
        let d = app.admin(Method::GET, &format!("/api/v1/devices/{a}"), None).await;
        assert_eq!(d.body["tags"], json!({"region": "eu", "rack": "7"}));
        let r =
            post_form(&app, &format!("/devices/{a}/tags"), &session, &[("csrf", &csrf), ("tags", "no equals sign")])
                .await;
        assert!(location(&r).contains("error=tags"), "{}", location(&r));
        let eu = get(&app, "/devices?filter=tag.region%20%3D%20%22eu%22&sort=-created_at", &session).await;
        assert_eq!(eu.status, StatusCode::OK, "{}", eu.text);
        assert!(eu.text.contains("SN-UI-A") && !eu.text.contains("SN-UI-B"));
        let q = get(&app, "/devices?q=ui-b", &session).await;
        assert!(q.text.contains("SN-UI-B") && !q.text.contains("SN-UI-A"));

        // A filter that does not parse: the page with its form as typed, the reason under the field.
        let r = get(&app, "/devices?filter=tag.region%20%3D&q=ui", &session).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        assert!(r.text.contains(r#"<form method="get" action="/devices""#), "the page, not a bare error");
        assert!(r.text.contains(r#"name="filter" value="tag.region =""#), "{}", r.text);
        assert!(r.text.contains(r#"name="q" value="ui""#), "the other fields are kept");
        let err = extract(&r.text, r#"<span class="field-error" id="filter-error">"#, "</span>").unwrap();
        assert!(err.contains("column"), "{err}");
        // Every field: an unknown status or presence is shown under its own field.
        let r = get(&app, "/devices?status=lost&online=maybe", &session).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        assert!(r.text.contains(r#"id="status-error">unknown status &quot;lost&quot;"#), "{}", r.text);
        assert!(r.text.contains(r#"id="online-error">"#));
        assert!(r.text.contains(r#"<option value="lost" selected>"#), "the input kept");

        // Reject from the device page.
        let r = post_form(&app, &format!("/devices/{b}/reject"), &session, &[("csrf", &csrf)]).await;
        assert_eq!(r.status, StatusCode::SEE_OTHER);
        assert_eq!(device_status(&app, &b).await, "rejected");

        // Decommission asks first.
        let r = post_form(&app, &format!("/devices/{a}/decommission"), &session, &[("csrf", &csrf)]).await;
        assert_eq!(location(&r), format!("/devices/{a}/decommission"));
        assert_eq!(device_status(&app, &a).await, "accepted");
        let confirm = get(&app, &format!("/devices/{a}/decommission"), &session).await;
        assert!(confirm.text.contains("cannot be undone") && confirm.text.contains(r#"name="confirm" value="yes""#));
        let r =
            post_form(&app, &format!("/devices/{a}/decommission"), &session, &[("csrf", &csrf), ("confirm", "yes")])
                .await;
        assert!(location(&r).starts_with(&format!("/devices/{a}?notice=Device%20decommissioned")));
        assert_eq!(device_status(&app, &a).await, "decommissioned");

        // A viewer sees the devices and no buttons, and is refused if posting anyway.
        let c = enroll_device(&app, json!({"serial": "SN-UI-C"}), None).await;
        let r = app
            .admin(
                Method::POST,
                "/api/v1/users",
                Some(json!({"username": "vic", "role": "viewer", "password": "vic's password"})),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED);
        let (vs, vcsrf) = sign_in(&app, "vic", "vic's password").await;
        let page = get(&app, &format!("/devices/{c}"), &vs).await;
        assert!(
            page.text.contains("SN-UI-C") && !page.text.contains(r#"id="accept""#) && !page.text.contains("Save tags")
        );
        let pending = get(&app, "/devices?status=pending", &vs).await;
        assert!(pending.text.contains("SN-UI-C") && !pending.text.contains("bulk-accept"));
        let r = post_form(&app, &format!("/devices/{c}/accept"), &vs, &[("csrf", &vcsrf)]).await;
        assert!(location(&r).contains("error=permission%20denied"), "{}", location(&r));
        assert_eq!(device_status(&app, &c).await, "pending");

        let missing = get(&app, "/devices/no-such-device", &session).await;
        assert_eq!(missing.status, StatusCode::NOT_FOUND);
    });
}

/// A multipart/form-data body as a browser sends a file upload.
fn multipart(boundary: &str, fields: &[(&str, Option<&str>, &str)]) -> String {
    let mut body = String::new();
    for (name, filename, content) in fields {
        body.push_str(&format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\""));
        if let Some(f) = filename {
            body.push_str(&format!("; filename=\"{f}\"\r\nContent-Type: text/csv"));
        }
        body.push_str(&format!("\r\n\r\n{content}\r\n"));
    }
    body + &format!("--{boundary}--\r\n")
}

#[tokio::test]
async fn enrollment_tokens_and_preauthorization_pages() {
    each_backend!(|app| {
        let (session, csrf) = sign_in(&app, "admin", ADMIN_PASSWORD).await;
        let page = get(&app, "/enrollment", &session).await;
        assert_eq!(page.status, StatusCode::OK);
        assert!(page.text.contains("No enrollment tokens yet."));

        let r = post_form(
            &app,
            "/enrollment/tokens",
            &session,
            &[("name", "line 3"), ("max_uses", "5"), ("expires_in_days", "30"), ("tags", "site=berlin")],
        )
        .await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "no CSRF token");
        let r = post_form(
            &app,
            "/enrollment/tokens",
            &session,
            &[
                ("csrf", &csrf),
                ("name", "line 3"),
                ("max_uses", "5"),
                ("expires_in_days", "30"),
                ("tags", "site=berlin"),
            ],
        )
        .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        assert_eq!(r.headers.get(header::CACHE_CONTROL).unwrap(), "no-store");
        let secret = extract(&r.text, r#"id="new-enrollment-token">"#, "<").expect("the secret is shown once");
        assert!(secret.starts_with("dre_"));
        let d = enroll_device(&app, json!({"serial": "SN-TOK"}), Some(&secret)).await;
        assert_eq!(device_status(&app, &d).await, "accepted");
        let page = get(&app, "/enrollment", &session).await;
        assert!(page.text.contains("line 3") && page.text.contains("1 of 5") && page.text.contains("site=berlin"));
        assert!(!page.text.contains(&secret), "shown only once");
        let r =
            post_form(&app, "/enrollment/tokens", &session, &[("csrf", &csrf), ("name", "x"), ("max_uses", "lots")])
                .await;
        assert!(location(&r).contains("error=max%20uses%20must%20be%20a%20whole%20number"), "{}", location(&r));

        let tokens = app.admin(Method::GET, "/api/v1/enrollment-tokens", None).await;
        let tid = tokens.body["items"][0]["id"].as_str().unwrap().to_string();
        let r = post_form(&app, &format!("/enrollment/tokens/{tid}/revoke"), &session, &[("csrf", &csrf)]).await;
        assert_eq!(location(&r), "/enrollment?notice=Enrollment%20token%20line%203%20revoked.");
        assert!(
            app.admin(Method::GET, "/api/v1/enrollment-tokens", None).await.body["items"][0]["revoked_at"].is_string()
        );

        // One identity typed, then a CSV file uploaded: those devices enroll at once.
        let r =
            post_form(&app, "/enrollment/preauthorize", &session, &[("csrf", &csrf), ("identity", "serial=SN-PRE\n")])
                .await;
        assert!(location(&r).contains("notice=1%20device%20identities%20pre-authorized"), "{}", location(&r));
        let d = enroll_device(&app, json!({"serial": "SN-PRE"}), None).await;
        assert_eq!(device_status(&app, &d).await, "accepted");
        let csv = "serial,mac\r\nSN-CSV-1,02:00:00:00:00:11\r\nSN-CSV-2,02:00:00:00:00:12\r\n";
        let body =
            multipart("XbOuNdArY", &[("csrf", None, &csrf), ("file", Some("devices.csv"), csv), ("csv", None, "")]);
        let req = Request::post("/enrollment/preauthorize")
            .header(header::COOKIE, &session)
            .header(header::CONTENT_TYPE, "multipart/form-data; boundary=XbOuNdArY")
            .body(Body::from(body))
            .unwrap();
        let r = app.send(req).await;
        assert!(location(&r).contains("notice=2%20device%20identities%20pre-authorized"), "{}", location(&r));
        let d = enroll_device(&app, json!({"serial": "SN-CSV-2", "mac": "02:00:00:00:00:12"}), None).await;
        assert_eq!(device_status(&app, &d).await, "accepted");
        let body = multipart("b", &[("csrf", None, "wrong"), ("file", Some("d.csv"), csv)]);
        let req = Request::post("/enrollment/preauthorize")
            .header(header::COOKIE, &session)
            .header(header::CONTENT_TYPE, "multipart/form-data; boundary=b")
            .body(Body::from(body))
            .unwrap();
        assert_eq!(app.send(req).await.status, StatusCode::FORBIDDEN);
        let r = post_form(&app, "/enrollment/preauthorize", &session, &[("csrf", &csrf), ("csv", "serial\n\n")]).await;
        assert!(location(&r).contains("error="), "{}", location(&r));

        // The page lists pre-authorizations with their uses; one for twice is revoked there.
        let r = post_form(
            &app,
            "/enrollment/preauthorize",
            &session,
            &[("csrf", &csrf), ("identity", "serial=SN-TWICE\n"), ("max_uses", "2"), ("expires_in_days", "")],
        )
        .await;
        assert!(location(&r).contains("notice="), "{}", location(&r));
        let page = get(&app, "/enrollment", &session).await;
        assert!(page.text.contains("serial=SN-TWICE") && page.text.contains("0 of 2"), "{}", page.text);
        assert!(page.text.contains("serial=SN-PRE") && page.text.contains("1 of 1"), "the used one: {}", page.text);
        let list = app.admin(Method::GET, "/api/v1/preauthorizations?q=SN-TWICE", None).await;
        let pid = list.body["items"][0]["id"].as_str().unwrap().to_string();
        let r =
            post_form(&app, &format!("/enrollment/preauthorizations/{pid}/revoke"), &session, &[("csrf", "bad")]).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN);
        let r =
            post_form(&app, &format!("/enrollment/preauthorizations/{pid}/revoke"), &session, &[("csrf", &csrf)]).await;
        assert!(location(&r).contains("notice=Pre-authorization"), "{}", location(&r));
        let page = get(&app, "/enrollment", &session).await;
        assert!(
            page.text.contains("revoked")
                && !page.text.contains(&format!("/enrollment/preauthorizations/{pid}/revoke"))
        );
        let d = enroll_device(&app, json!({"serial": "SN-TWICE"}), None).await;
        assert_eq!(device_status(&app, &d).await, "pending", "revoked: it admits nobody");

        // A viewer sees the tokens, not the forms, and cannot create one.
        app.admin(
            Method::POST,
            "/api/v1/users",
            Some(json!({"username": "vic", "role": "viewer", "password": "vic's password"})),
        )
        .await;
        let (vs, vcsrf) = sign_in(&app, "vic", "vic's password").await;
        let page = get(&app, "/enrollment", &vs).await;
        assert!(page.text.contains("line 3") && !page.text.contains("create-enrollment-token"));
        let r = post_form(&app, "/enrollment/tokens", &vs, &[("csrf", &vcsrf), ("name", "sneaky")]).await;
        assert!(location(&r).contains("permission%20denied"), "{}", location(&r));
    });
}

#[tokio::test]
async fn group_pages_static_dynamic_and_the_live_preview() {
    each_backend!(|app| {
        let token = app
            .admin(Method::POST, "/api/v1/enrollment-tokens", Some(json!({"name": "t", "tags": {"region": "eu"}})))
            .await;
        let secret = token.body["secret"].as_str().unwrap().to_string();
        let eu1 = enroll_device(&app, json!({"serial": "SN-G1"}), Some(&secret)).await;
        let _eu2 = enroll_device(&app, json!({"serial": "SN-G2"}), Some(&secret)).await;
        let other = enroll_device(&app, json!({"serial": "SN-G3"}), None).await;
        let (session, csrf) = sign_in(&app, "admin", ADMIN_PASSWORD).await;
        let page = get(&app, "/groups", &session).await;
        assert_eq!(page.status, StatusCode::OK);
        assert!(
            page.text.contains("No groups yet.") && page.text.contains(r#"hx-trigger="keyup changed delay:400ms""#)
        );

        // The live preview: a fragment with the count, or the mistake and where it is.
        let pv = get(&app, "/groups/preview?filter=tag.region%20%3D%20eu", &session).await;
        assert_eq!(pv.status, StatusCode::OK);
        assert!(pv.text.contains("<strong>2</strong> devices match") && pv.text.contains("SN-G1"), "{}", pv.text);
        assert!(!pv.text.contains("<html"));
        let pv = get(&app, "/groups/preview?filter=tag.region%20%3D", &session).await;
        assert!(pv.text.contains(r#"id="preview-error""#) && pv.text.contains("column 13"), "{}", pv.text);
        assert!(pv.text.contains("            ^"), "a caret under the mistake: {}", pv.text);

        // A dynamic group from the form; its page lists what the filter matches.
        let r =
            post_form(&app, "/groups", &session, &[("name", "eu"), ("kind", "dynamic"), ("filter", "tag.region = eu")])
                .await;
        assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "a form without its CSRF token is malformed");
        let r = post_form(
            &app,
            "/groups",
            &session,
            &[
                ("csrf", &csrf),
                ("name", "eu"),
                ("kind", "dynamic"),
                ("filter", "tag.region = eu"),
                ("description", "Europe"),
            ],
        )
        .await;
        let loc = location(&r);
        assert!(loc.starts_with("/groups/") && loc.contains("notice=Group%20eu%20created."), "{loc}");
        let eu_page = get(&app, &loc, &session).await;
        assert!(eu_page.text.contains(r#"id="device-count">2<"#), "{}", eu_page.text);
        assert!(eu_page.text.contains("SN-G1") && !eu_page.text.contains("SN-G3"));
        assert!(eu_page.text.contains(r#"id="edit-group""#) && eu_page.text.contains("hx-get=\"/groups/preview\""));
        let eu_id = loc.trim_start_matches("/groups/").split('?').next().unwrap().to_string();
        let r =
            post_form(&app, &format!("/groups/{eu_id}/edit"), &session, &[("csrf", &csrf), ("filter", "id = nobody")])
                .await;
        assert!(location(&r).contains("notice=Group%20eu%20saved."), "{}", location(&r));
        let eu_page = get(&app, &format!("/groups/{eu_id}"), &session).await;
        assert!(eu_page.text.contains(r#"id="device-count">0<"#));
        let r = post_form(&app, &format!("/groups/{eu_id}/edit"), &session, &[("csrf", &csrf), ("filter", "tag.x =")])
            .await;
        assert!(location(&r).contains("error="), "a bad filter is refused: {}", location(&r));
        let r = post_form(
            &app,
            "/groups",
            &session,
            &[("csrf", &csrf), ("name", "bad"), ("kind", "dynamic"), ("filter", "(")],
        )
        .await;
        // The form again, as typed, the reason under the filter.
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text);
        assert!(r.text.contains(r#"<span class="field-error" id="filter-error">invalid filter"#), "{}", r.text);
        assert!(r.text.contains(r#"value="(""#) && r.text.contains(r#"value="bad""#));
        assert!(r.text.contains(r#"value="dynamic" checked"#));

        // A static group: members added and removed by hand.
        let r = post_form(
            &app,
            "/groups",
            &session,
            &[("csrf", &csrf), ("name", "lab"), ("kind", "static"), ("filter", "")],
        )
        .await;
        let lab = location(&r).trim_start_matches("/groups/").split('?').next().unwrap().to_string();
        let r = post_form(
            &app,
            &format!("/groups/{lab}/devices"),
            &session,
            &[("csrf", &csrf), ("devices", &format!("{eu1}\n{other}, "))],
        )
        .await;
        assert!(location(&r).contains("notice=2%20devices%20added"), "{}", location(&r));
        let lab_page = get(&app, &format!("/groups/{lab}"), &session).await;
        assert!(lab_page.text.contains("SN-G1") && lab_page.text.contains("SN-G3") && !lab_page.text.contains("SN-G2"));
        let device_page = get(&app, &format!("/devices/{eu1}"), &session).await;
        assert!(
            device_page.text.contains(&format!(r#"href="/groups/{lab}">lab</a>"#)),
            "the device page names its groups"
        );
        let r = post_form(&app, &format!("/groups/{lab}/devices/{other}/remove"), &session, &[("csrf", &csrf)]).await;
        assert!(location(&r).contains("notice=Device%20removed"), "{}", location(&r));
        let lab_page = get(&app, &format!("/groups/{lab}"), &session).await;
        assert!(lab_page.text.contains("SN-G1") && !lab_page.text.contains("SN-G3"));

        // Enrollment tokens offer the static groups; a device enrolled with one joins them.
        let page = get(&app, "/enrollment", &session).await;
        assert!(page.text.contains(r#"<option value="lab">lab</option>"#), "{}", page.text);
        let r =
            post_form(&app, "/enrollment/tokens", &session, &[("csrf", &csrf), ("name", "to lab"), ("group", "lab")])
                .await;
        let secret = extract(&r.text, r#"id="new-enrollment-token">"#, "<").unwrap();
        let joined = enroll_device(&app, json!({"serial": "SN-G4"}), Some(&secret)).await;
        let lab_page = get(&app, &format!("/groups/{lab}"), &session).await;
        assert!(lab_page.text.contains(&joined), "{}", lab_page.text);

        // A viewer sees groups, no forms, and cannot change them.
        app.admin(
            Method::POST,
            "/api/v1/users",
            Some(json!({"username": "vic", "role": "viewer", "password": "vic's password"})),
        )
        .await;
        let (vs, vcsrf) = sign_in(&app, "vic", "vic's password").await;
        let page = get(&app, "/groups", &vs).await;
        assert!(page.text.contains("lab") && !page.text.contains(r#"id="create-group""#));
        let lab_page = get(&app, &format!("/groups/{lab}"), &vs).await;
        assert!(!lab_page.text.contains("add-devices") && !lab_page.text.contains("delete-group"));
        let r = post_form(&app, &format!("/groups/{lab}/delete"), &vs, &[("csrf", &vcsrf)]).await;
        assert!(location(&r).contains("permission%20denied"), "{}", location(&r));

        // Deleting a group keeps its devices.
        let r = post_form(&app, &format!("/groups/{lab}/delete"), &session, &[("csrf", &csrf)]).await;
        assert_eq!(location(&r), "/groups?notice=Group%20deleted.");
        assert_eq!(get(&app, &format!("/groups/{lab}"), &session).await.status, StatusCode::NOT_FOUND);
        assert_eq!(device_status(&app, &eu1).await, "accepted");
    });
}

#[tokio::test]
async fn names_overview_bulk_actions_and_the_audit_filters() {
    each_backend!(|app| {
        let token = app.admin(Method::POST, "/api/v1/enrollment-tokens", Some(json!({"name": "t"}))).await;
        let secret = token.body["secret"].as_str().unwrap().to_string();
        let a = enroll_device(&app, json!({"serial": "SN-N1", "mac": "02:00:00:00:00:01"}), Some(&secret)).await;
        let b = enroll_device(&app, json!({"serial": "SN-N2"}), Some(&secret)).await;
        let c = enroll_device(&app, json!({"serial": "SN-N3"}), Some(&secret)).await;
        let (session, csrf) = sign_in(&app, "admin", ADMIN_PASSWORD).await;

        // An operator's name for a device is what every page shows.
        let r = app.admin(Method::PATCH, &format!("/api/v1/devices/{a}"), Some(json!({"name": "gw berlin 1"}))).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        let list = get(&app, "/devices?q=berlin", &session).await;
        assert!(list.text.contains(">gw berlin 1</a>"), "the search box finds names: {}", list.text);
        assert!(!list.text.contains("SN-N2"));
        let page = get(&app, &format!("/devices/{a}"), &session).await;
        assert!(page.text.contains("<title>Device gw berlin 1 · Drover</title>"), "{}", page.text);
        // The rename form does what the PATCH route does, audited; empty clears the name.
        assert!(page.text.contains(r#"id="rename-form""#) && page.text.contains(r#"name="name" value="gw berlin 1""#));
        let r =
            post_form(&app, &format!("/devices/{b}/name"), &session, &[("csrf", &csrf), ("name", " edge 2 ")]).await;
        assert_eq!(location(&r), format!("/devices/{b}?notice=Device%20renamed%20edge%202."));
        let d = app.admin(Method::GET, &format!("/api/v1/devices/{b}"), None).await;
        assert_eq!((d.body["name"].as_str(), d.body["display_name"].as_str()), (Some("edge 2"), Some("edge 2")));
        let r =
            post_form(&app, &format!("/devices/{b}/name"), &session, &[("csrf", "wrong"), ("name", "sneaky")]).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "no CSRF token");
        let r = post_form(&app, &format!("/devices/{b}/name"), &session, &[("csrf", &csrf), ("name", "")]).await;
        assert!(location(&r).contains("notice=Name%20cleared"), "{}", location(&r));
        let d = app.admin(Method::GET, &format!("/api/v1/devices/{b}"), None).await;
        assert_eq!(d.body["display_name"], "SN-N2");
        let audit = app.admin(Method::GET, &format!("/api/v1/audit?action=device.rename&target_id={b}"), None).await;
        assert_eq!(audit.body["items"].as_array().unwrap().len(), 2);

        // Remote access only as far as the device offers it (absent: it never said, all offered).
        assert!(page.text.contains(r#"id="terminal-button""#) && !page.text.contains(r#"id="no-remote""#));
        let mut h = crate::support::hello("drover-agent/0.2.0", "boot-1");
        h.capabilities = Some(vec!["update".into(), "telemetry".into()]);
        drover_server::presence::record_hello(&app.db, &a, &h, drover_server::time::now_ms()).await.unwrap();
        let page = get(&app, &format!("/devices/{a}"), &session).await;
        assert!(!page.text.contains(r#"id="terminal-button""#) && !page.text.contains(r#"id="remote-button""#));
        assert!(page.text.contains("This device does not offer remote access."), "{}", page.text);
        h.capabilities = Some(vec!["files".into()]);
        drover_server::presence::record_hello(&app.db, &a, &h, drover_server::time::now_ms()).await.unwrap();
        let page = get(&app, &format!("/devices/{a}"), &session).await;
        assert!(!page.text.contains(r#"id="terminal-button""#) && page.text.contains(r#"id="remote-button""#));
        let remote = get(&app, &format!("/devices/{a}/remote"), &session).await;
        assert!(remote.text.contains(r#"id="remote-upload""#) && !remote.text.contains(r#"id="web-ui""#));

        // The overview: presence counts linking to the filtered list, and readable recent changes.
        drover_server::presence::record_status(&app.db, &b, true, drover_server::time::now_ms()).await.unwrap();
        let overview = get(&app, "/", &session).await;
        assert!(
            overview.text.contains(
                r#"href="/devices?status=accepted&amp;online=true" id="card-online"><span class="n online">1</span>"#
            ),
            "{}",
            overview.text
        );
        assert!(overview.text.contains(r#"id="card-offline"><span class="n">2</span>"#));
        assert!(overview.text.contains(r#"id="card-alerting"><span class="n">0</span>"#));
        assert!(overview.text.contains("No device failed an update lately."));
        let recent = extract(&overview.text, r#"<table class="list" id="audit-table">"#, "</table>").unwrap();
        assert!(!recent.contains("{&quot;") && !recent.contains("{\""), "no raw JSON: {recent}");
        assert!(recent.contains("device gw berlin 1 enrolled"), "{recent}");

        // Bulk: tags for every device matching the filter, no boxes ticked.
        let r = post_form(
            &app,
            "/devices/bulk",
            &session,
            &[
                ("csrf", &csrf),
                ("action", "tags"),
                ("all", "1"),
                ("matching", "q=SN-N"),
                ("tags", "site=lab"),
                ("return_to", "/devices?q=SN-N"),
            ],
        )
        .await;
        assert_eq!(location(&r), "/devices?q=SN-N&notice=Tags%20added%20to%203%20devices.");
        let d = app.admin(Method::GET, &format!("/api/v1/devices/{c}"), None).await;
        assert_eq!(d.body["tags"], json!({"site": "lab"}));
        let audit = app.admin(Method::GET, "/api/v1/audit?action=device.tags", None).await;
        assert_eq!(audit.body["items"].as_array().unwrap().len(), 3, "each change audited: {}", audit.body);
        // Without the CSRF token nothing happens.
        let r = post_form(&app, "/devices/bulk", &session, &[("action", "tags"), ("id", &a), ("tags", "x=y")]).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN);

        // Bulk: to a static group, ticked devices; the group's page takes names too.
        let g = app.admin(Method::POST, "/api/v1/groups", Some(json!({"name": "lab", "kind": "static"}))).await;
        let gid = g.body["id"].as_str().unwrap().to_string();
        let r = post_form(
            &app,
            "/devices/bulk",
            &session,
            &[("csrf", &csrf), ("action", "group"), ("group", &gid), ("id", &b)],
        )
        .await;
        assert!(location(&r).contains("notice=1%20device%20added"), "{}", location(&r));
        let r = post_form(
            &app,
            &format!("/groups/{gid}/devices"),
            &session,
            &[("csrf", &csrf), ("devices", "gw berlin 1\n")],
        )
        .await;
        assert!(location(&r).contains("notice=1%20devices%20added"), "{}", location(&r));
        let r = post_form(
            &app,
            &format!("/groups/{gid}/devices"),
            &session,
            &[("csrf", &csrf), ("devices", "nobody here")],
        )
        .await;
        assert!(location(&r).contains("error=no%20device%20is%20named"), "{}", location(&r));
        let members = get(&app, &format!("/groups/{gid}"), &session).await;
        assert!(members.text.contains(">gw berlin 1</a>") && members.text.contains(">SN-N2</a>"), "{}", members.text);

        // Bulk: deploy opens the new-deployment form with the devices; the form takes names.
        let key = drover_artifact::SigningKey::generate().unwrap();
        let file = crate::artifacts::build_artifact("edge-app", "1.0.0", &[7u8; 100], &[&key], None);
        let up = app
            .send(
                Request::post("/api/v1/artifacts")
                    .header(header::COOKIE, &session)
                    .header("x-csrf-token", &csrf)
                    .header(header::CONTENT_TYPE, "application/octet-stream")
                    .body(Body::from(file))
                    .unwrap(),
            )
            .await;
        assert_eq!(up.status, StatusCode::CREATED, "{}", up.text);
        let artifact = up.body["id"].as_str().unwrap().to_string();
        let r = post_form(
            &app,
            "/devices/bulk",
            &session,
            &[("csrf", &csrf), ("action", "deploy"), ("id", &a), ("id", &c)],
        )
        .await;
        assert_eq!(r.status, StatusCode::OK);
        assert!(r.text.contains(&format!("{a}\n{c}</textarea>")), "{}", r.text);
        assert!(r.text.contains(r#"value="devices" checked"#));
        let r = post_form(
            &app,
            "/deployments",
            &session,
            &[("csrf", &csrf), ("artifact", &artifact), ("target", "devices"), ("devices", "gw berlin 1\nnobody")],
        )
        .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        assert!(r.text.contains(r#"id="devices-error">no device is named &quot;nobody&quot;"#), "{}", r.text);
        assert!(r.text.contains("gw berlin 1\nnobody</textarea>"), "what was typed is kept");
        let r = post_form(
            &app,
            "/deployments",
            &session,
            &[("csrf", &csrf), ("artifact", &artifact), ("target", "devices"), ("devices", "gw berlin 1")],
        )
        .await;
        assert!(location(&r).contains("created%20for%201%20device"), "{} {}", location(&r), r.text);
        let dep = location(&r).trim_start_matches("/deployments/").split('?').next().unwrap().to_string();
        // The overview shows it running, then the device's failure, each linking to the page.
        let overview = get(&app, "/", &session).await;
        let active = extract(&overview.text, r#"<section id="active-deployments">"#, "</section>").unwrap();
        assert!(active.contains(&format!(r#"href="/deployments/{dep}""#)) && active.contains("0/1"), "{active}");
        let mut failed =
            drover_proto::update::UpdateReport::new(dep.clone(), drover_proto::update::UpdateState::Failure);
        failed.message = Some("disk full".into());
        (failed.bytes, failed.total) = (Some(0), Some(100));
        app.state.engine.on_report(&a, failed).await.unwrap();
        let overview = get(&app, "/", &session).await;
        let failures = extract(&overview.text, r#"<section id="recent-failures">"#, "</section>").unwrap();
        assert!(failures.contains(">gw berlin 1</a>") && failures.contains("disk full"), "{failures}");
        assert!(failures.contains(&format!(r#"href="/deployments/{dep}?state=failure""#)), "{failures}");
        // The deployment's device table: the device's name, no download shown once it ended.
        let page = get(&app, &format!("/deployments/{dep}"), &session).await;
        let row = extract(&page.text, &format!(r#"<tr id="dd-{a}">"#), "</tr>").unwrap();
        assert!(row.contains(">gw berlin 1</a>") && !row.contains(" of ") && !row.contains("<progress"), "{row}");

        // Bulk: decommission asks first, then does it.
        let r = post_form(&app, "/devices/bulk", &session, &[("csrf", &csrf), ("action", "decommission"), ("id", &c)])
            .await;
        assert_eq!(r.status, StatusCode::OK);
        assert!(r.text.contains("cannot be undone") && r.text.contains(">SN-N3</a>"), "{}", r.text);
        assert_eq!(device_status(&app, &c).await, "accepted");
        let r = post_form(
            &app,
            "/devices/bulk",
            &session,
            &[("csrf", &csrf), ("action", "decommission"), ("confirm", "yes"), ("id", &c), ("return_to", "/devices")],
        )
        .await;
        assert!(location(&r).starts_with("/devices?notice=Decommissioned%201%20device"), "{}", location(&r));
        assert_eq!(device_status(&app, &c).await, "decommissioned");

        // The audit log by target: a device by its name, entries linking to it.
        let r = get(&app, "/audit?target_kind=device&target=gw%20berlin%201", &session).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        let t = extract(&r.text, r#"id="audit-table">"#, "</table>").unwrap();
        assert!(t.contains("device.tags") && t.contains("device.enroll") && !t.contains("SN-N2"), "{t}");
        assert!(t.contains(&format!(r#"href="/devices/{a}""#)));
        let r = get(
            &app,
            &format!("/audit?target_kind=group&target=lab&since=2020-01-01T00:00&until={}", "2999-01-01"),
            &session,
        )
        .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        assert!(
            r.text.contains(&format!(r#"href="/groups/{gid}" title="{gid}">lab</a>"#))
                && r.text.contains("group.create"),
            "{}",
            r.text
        );
        // A bad bound: the page, the error under the field, what was typed kept.
        let r = get(&app, "/audit?since=last%20week&action=device.", &session).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        assert!(r.text.contains(r#"id="since-error">"#) && r.text.contains(r#"value="last week""#), "{}", r.text);
        assert!(r.text.contains(r#"name="action" value="device.""#));
        // The alert forms too: the page again with what was typed, the error under its field.
        let r = post_form(
            &app,
            "/alerts/rules",
            &session,
            &[
                ("csrf", &csrf),
                ("name", "hot"),
                ("kind", "threshold"),
                ("metric", "cpu.percent"),
                ("op", ">="),
                ("threshold", "90"),
                ("window_min", "5"),
                ("aggregate", "avg"),
                ("filter", "tag.site ="),
            ],
        )
        .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text);
        assert!(r.text.contains(r#"id="rule-filter-error">"#), "{}", r.text);
        assert!(
            r.text.contains(r#"name="name" required maxlength="100" value="hot""#)
                && r.text.contains("<option selected>&gt;=</option>")
        );
        let r = post_form(
            &app,
            "/alerts/silences",
            &session,
            &[("csrf", &csrf), ("hours", "forever"), ("reason", "maintenance")],
        )
        .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        assert!(
            r.text.contains(r#"id="silence-hours-error">"#) && r.text.contains(r#"value="maintenance""#),
            "{}",
            r.text
        );
        let r = get(&app, "/audit?target=nobody", &session).await;
        assert!(r.text.contains(r#"id="target-error">choose the kind of target first"#), "{}", r.text);
    });
}
