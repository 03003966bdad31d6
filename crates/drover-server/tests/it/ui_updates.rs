//! The software update pages through the router on every backend: artifacts (list, inspect,
//! upload through the API with the session's CSRF token, delete refused while in use),
//! deployments (new by form, live progress, devices and their logs, abort), the device page's
//! software, and a viewer who sees no controls and is refused by the server.
//!
//! Bad input tried here: an upload without the CSRF header, a form with no target, a filter
//! with a mistake (the form comes back with what was typed), a deployment state that does not
//! exist, a log that was never sent, a viewer posting every update form.

use axum::body::Body;
use axum::http::{Method, Request, StatusCode, header};
use drover_artifact::SigningKey;
use drover_proto::update::{Software, UpdateReport, UpdateState};
use serde_json::{Value, json};

use crate::artifacts::{accepted_device, build_artifact, sha256_hex};
use crate::each_backend;
use crate::support::{ADMIN_PASSWORD, Resp, TestApp};

const COMMIT: &str = "5d41402abc4b2a76b9719d911017c592aaaabbbb";

fn encode(v: &str) -> String {
    v.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn form(pairs: &[(&str, &str)]) -> String {
    pairs.iter().map(|(k, v)| format!("{k}={}", encode(v))).collect::<Vec<_>>().join("&")
}

/// A page, with the slashes the template engine escapes (`&#x2f;`) read back as slashes.
async fn page(app: &TestApp, path: &str, cookie: &str) -> Resp {
    let mut r = app.send(Request::get(path).header(header::COOKIE, cookie).body(Body::empty()).unwrap()).await;
    r.text = r.text.replace("&#x2f;", "/");
    r
}

async fn post_form(app: &TestApp, path: &str, cookie: &str, pairs: &[(&str, &str)]) -> Resp {
    let req = Request::post(path)
        .header(header::COOKIE, cookie)
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(Body::from(form(pairs)))
        .unwrap();
    app.send(req).await
}

fn location(r: &Resp) -> String {
    assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", r.text);
    r.headers.get(header::LOCATION).unwrap().to_str().unwrap().to_string()
}

/// The artifacts page's upload: the raw file to the API, authenticated by the session.
async fn upload_as_page(app: &TestApp, cookie: &str, csrf: Option<&str>, file: Vec<u8>) -> Resp {
    let mut b = Request::post("/api/v1/artifacts")
        .header(header::COOKIE, cookie)
        .header(header::CONTENT_TYPE, "application/octet-stream");
    if let Some(c) = csrf {
        b = b.header("x-csrf-token", c);
    }
    app.send(b.body(Body::from(file)).unwrap()).await
}

async fn signed_in(app: &TestApp, user: &str, password: &str) -> (String, String) {
    let (r, cookie, csrf) = app.sign_in(user, password).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    (cookie, csrf)
}

#[tokio::test]
async fn artifacts_and_deployments_pages_work_through_the_same_operations_as_the_api() {
    each_backend!(|app| {
        let (cookie, csrf) = signed_in(&app, "admin", ADMIN_PASSWORD).await;
        let key = SigningKey::generate().unwrap();
        let file = build_artifact("edge-app", "2.1.0", &[7u8; 3000], &[&key], Some(COMMIT));
        let id = sha256_hex(&file);

        // The page's upload is the API's, with the session and its CSRF token.
        let r = upload_as_page(&app, &cookie, None, file.clone()).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "no CSRF header, no upload: {}", r.text);
        let r = upload_as_page(&app, &cookie, Some(&csrf), file.clone()).await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        assert_eq!(r.body["uploaded_by"], "user:admin");

        let r = page(&app, "/artifacts", &cookie).await;
        assert_eq!(r.status, StatusCode::OK);
        for text in ["edge-app", "2.1.0", "test-board", &key.key_id(), "id=\"upload-artifact\"", "/assets/updates.js"] {
            assert!(r.text.contains(text), "the artifact list has {text:?}: {}", r.text);
        }
        let js = page(&app, "/assets/updates.js", &cookie).await;
        assert!(js.text.contains("X-CSRF-Token") && js.text.contains("xhr.send(file)"), "{}", js.text);
        let r = page(&app, &format!("/artifacts/{id}"), &cookie).await;
        assert_eq!(r.status, StatusCode::OK);
        for text in
            ["app.bin", COMMIT, "build-7", "https://git.example/edge-app", &key.key_id(), "id=\"deploy-artifact\""]
        {
            assert!(r.text.contains(text), "the artifact page has {text:?}");
        }
        assert!(r.text.contains("No device runs it."));

        let (device, _, _) = accepted_device(&app, "SN-UI-1").await;
        let g = app.admin(Method::POST, "/api/v1/groups", Some(json!({"name": "lab", "kind": "static"}))).await;
        let gid = g.body["id"].as_str().unwrap().to_string();
        let r =
            app.admin(Method::POST, &format!("/api/v1/groups/{gid}/devices"), Some(json!({"devices": [device]}))).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);

        // The new-deployment form: the artifact preselected from its page's link.
        let r = page(&app, &format!("/deployments/new?artifact={id}"), &cookie).await;
        assert_eq!(r.status, StatusCode::OK);
        assert!(r.text.contains(&format!("<option value=\"{id}\" selected>edge-app 2.1.0")), "{}", r.text);
        assert!(r.text.contains("<option value=\"lab\" >lab (static)</option>") || r.text.contains(">lab (static)<"));
        // Mistakes come back on the form, with what was typed.
        let bad = [("csrf", csrf.as_str()), ("artifact", id.as_str()), ("target", "filter"), ("filter", "tag.x = ")];
        let r = post_form(&app, "/deployments", &cookie, &bad).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        // The reason under the field it is about, what was typed kept.
        assert!(r.text.contains(r#"<span class="field-error" id="filter-error">"#), "{}", r.text);
        assert!(r.text.contains(r#"name="filter" value="tag.x = ""#), "{}", r.text);
        let r =
            post_form(&app, "/deployments", &cookie, &[("csrf", &csrf), ("artifact", &id), ("target", "group")]).await;
        assert!(r.text.contains("choose the group"), "{}", r.text);
        let r = post_form(
            &app,
            "/deployments",
            &cookie,
            &[("csrf", "forged"), ("artifact", &id), ("target", "group"), ("group", "lab")],
        )
        .await;
        assert_eq!(r.status, StatusCode::FORBIDDEN);

        let ok = [
            ("csrf", csrf.as_str()),
            ("artifact", id.as_str()),
            ("target", "group"),
            ("group", "lab"),
            ("name", "lab rollout"),
        ];
        let to = location(&post_form(&app, "/deployments", &cookie, &ok).await);
        assert!(to.starts_with("/deployments/") && to.contains("notice="), "{to}");
        let dep = to.trim_start_matches("/deployments/").split('?').next().unwrap().to_string();

        let r = page(&app, &to, &cookie).await;
        assert_eq!(r.status, StatusCode::OK);
        for text in
            ["lab rollout", "group:lab", "id=\"deployment-progress\"", "id=\"abort-deployment\"", &device, "pending"]
        {
            assert!(r.text.contains(text), "the deployment page has {text:?}: {}", r.text);
        }
        assert!(r.text.contains(&format!("hx-get=\"/deployments/{dep}/live?\"")), "it refreshes while active");
        let list = page(&app, "/deployments", &cookie).await;
        assert!(list.text.contains("lab rollout") && list.text.contains("hx-trigger=\"every 3s\""), "{}", list.text);
        let active = page(&app, "/deployments?status=active", &cookie).await;
        assert!(active.text.contains("lab rollout"));
        assert!(!page(&app, "/deployments?status=failed", &cookie).await.text.contains("lab rollout"));

        // While in use the artifact stays, with the server's reason.
        let to = location(&post_form(&app, &format!("/artifacts/{id}/delete"), &cookie, &[("csrf", &csrf)]).await);
        assert!(to.starts_with(&format!("/artifacts/{id}?error=")), "{to}");
        assert!(page(&app, &to, &cookie).await.text.contains("unfinished deployment"));

        // The device reports: downloading, then a failure with its log.
        let engine = &app.state.engine;
        let mut progress = UpdateReport::new(&dep, UpdateState::Downloading);
        (progress.bytes, progress.total) = (Some(1024), Some(4096));
        engine.on_report(&device, progress).await.unwrap();
        let live = page(&app, &format!("/deployments/{dep}/live"), &cookie).await;
        assert!(!live.text.contains("<html"), "a fragment for htmx");
        assert!(live.text.contains("1.0 KiB of 4.0 KiB") && live.text.contains("value=\"25\""), "{}", live.text);
        let mut failed = UpdateReport::new(&dep, UpdateState::Failure);
        failed.message = Some("signature by an unknown key".into());
        failed.log = Some("fetching\nverifying: signature by an unknown key <ed25519>\n".into());
        engine.on_report(&device, failed).await.unwrap();
        let r = page(&app, &format!("/deployments/{dep}"), &cookie).await;
        assert!(r.text.contains("status-failed") && r.text.contains("1 failed"), "{}", r.text);
        assert!(!r.text.contains("hx-trigger=\"every 2s\""), "a finished deployment stops refreshing");
        assert!(!r.text.contains("id=\"abort-deployment\""), "nothing to abort");
        assert!(r.text.contains(&format!("/deployments/{dep}/devices/{device}/log")));
        let log = page(&app, &format!("/deployments/{dep}/devices/{device}/log"), &cookie).await;
        assert_eq!(log.status, StatusCode::OK);
        assert!(log.text.contains("verifying: signature by an unknown key &lt;ed25519&gt;"), "escaped: {}", log.text);
        let filtered = page(&app, &format!("/deployments/{dep}?state=success"), &cookie).await;
        assert!(filtered.text.contains("No devices in state success."));
        let bad = page(&app, &format!("/deployments/{dep}?state=exploded"), &cookie).await;
        assert_eq!(bad.status, StatusCode::BAD_REQUEST);

        // Another deployment, aborted from its page; the device then takes a third one.
        let to = location(
            &post_form(
                &app,
                "/deployments",
                &cookie,
                &[("csrf", &csrf), ("artifact", "edge-app@2.1.0"), ("target", "devices"), ("devices", &device)],
            )
            .await,
        );
        let dep2 = to.trim_start_matches("/deployments/").split('?').next().unwrap().to_string();
        let none = page(&app, &format!("/deployments/{dep2}/devices/{device}/log"), &cookie).await;
        assert_eq!(none.status, StatusCode::NOT_FOUND);
        let to = location(&post_form(&app, &format!("/deployments/{dep2}/abort"), &cookie, &[("csrf", &csrf)]).await);
        assert!(to.contains("notice=Deployment"), "{to}");
        let r = page(&app, &to, &cookie).await;
        assert!(
            r.text.contains("status-aborted")
                && r.text.contains("1 aborted")
                && !r.text.contains("id=\"abort-deployment\"")
        );
        let to = location(
            &post_form(
                &app,
                "/deployments",
                &cookie,
                &[("csrf", &csrf), ("artifact", &id), ("target", "filter"), ("filter", "status = accepted")],
            )
            .await,
        );
        let dep3 = to.trim_start_matches("/deployments/").split('?').next().unwrap().to_string();
        let mut done = UpdateReport::new(&dep3, UpdateState::Success);
        done.software = Some(Software { artifact: Some(id.clone()), name: "edge-app".into(), version: "2.1.0".into() });
        engine.on_report(&device, done).await.unwrap();

        // The device page says what it runs and where that came from; the artifact page lists it.
        let r = page(&app, &format!("/devices/{device}"), &cookie).await;
        assert!(r.text.contains("id=\"software\"") && r.text.contains("edge-app 2.1.0"), "{}", r.text);
        assert!(r.text.contains(COMMIT) && r.text.contains("build-7") && r.text.contains(&format!("/artifacts/{id}")));
        let r = page(&app, &format!("/artifacts/{id}"), &cookie).await;
        assert!(r.text.contains(&format!("/devices/{device}")) && !r.text.contains("No device runs it."));
        assert!(r.text.contains(&format!("href=\"/devices?artifact={id}\"")), "{}", r.text);
        assert!(r.text.contains(&format!("href=\"/devices?commit={COMMIT}\"")));
        let r = page(&app, &format!("/devices?commit={}", &COMMIT[..10]), &cookie).await;
        assert!(r.text.contains(&format!("device-{device}")), "the link lands on the devices running it");

        // Finished now: the artifact can go.
        let to = location(&post_form(&app, &format!("/artifacts/{id}/delete"), &cookie, &[("csrf", &csrf)]).await);
        assert!(to.starts_with("/artifacts?notice=Artifact%20edge-app%202.1.0%20deleted"), "{to}");
        let audit = app.admin(Method::GET, "/api/v1/audit?actor=admin", None).await;
        let actions: Vec<&str> =
            audit.body["items"].as_array().unwrap().iter().map(|e| e["action"].as_str().unwrap()).collect();
        for a in ["artifact.upload", "deployment.create", "deployment.abort", "artifact.delete"] {
            assert!(actions.contains(&a), "{a} audited as the signed-in user: {actions:?}");
        }
    });
}

#[tokio::test]
async fn a_viewer_sees_no_update_controls_and_the_server_refuses_them() {
    each_backend!(|app| {
        let key = SigningKey::generate().unwrap();
        let file = build_artifact("edge-app", "3.0.0", b"payload", &[&key], None);
        let id = sha256_hex(&file);
        let r = crate::artifacts::upload(&app, &app.admin_token.clone(), file.clone(), &[]).await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        let (device, _, _) = accepted_device(&app, "SN-UI-V").await;
        let r =
            app.admin(Method::POST, "/api/v1/deployments", Some(json!({"artifact": id, "devices": [device]}))).await;
        let dep = r.body["id"].as_str().unwrap().to_string();
        let r = app
            .admin(
                Method::POST,
                "/api/v1/users",
                Some(json!({"username": "vera", "role": "viewer", "password": "viewer password 1"})),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        let (cookie, csrf) = signed_in(&app, "vera", "viewer password 1").await;

        // Reads everything, sees no control.
        let r = page(&app, "/artifacts", &cookie).await;
        assert!(r.text.contains("edge-app") && !r.text.contains("upload-artifact"), "{}", r.text);
        let r = page(&app, &format!("/artifacts/{id}"), &cookie).await;
        assert!(!r.text.contains("deploy-artifact") && !r.text.contains("delete-artifact"));
        let r = page(&app, "/deployments", &cookie).await;
        assert!(r.text.contains("edge-app 3.0.0") && !r.text.contains("new-deployment"));
        let r = page(&app, &format!("/deployments/{dep}"), &cookie).await;
        assert_eq!(r.status, StatusCode::OK);
        assert!(!r.text.contains("abort-deployment"));
        let r = page(&app, "/deployments/new", &cookie).await;
        assert!(r.text.contains("Only an operator or an admin") && !r.text.contains("create-deployment"));

        // And the server refuses what the pages do not offer.
        let r =
            upload_as_page(&app, &cookie, Some(&csrf), build_artifact("edge-app", "3.0.1", b"x", &[&key], None)).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.text);
        let r = post_form(
            &app,
            "/deployments",
            &cookie,
            &[("csrf", &csrf), ("artifact", &id), ("target", "devices"), ("devices", &device)],
        )
        .await;
        assert_eq!(r.status, StatusCode::FORBIDDEN);
        assert!(r.text.contains("permission denied"), "{}", r.text);
        let to = location(&post_form(&app, &format!("/deployments/{dep}/abort"), &cookie, &[("csrf", &csrf)]).await);
        assert!(to.contains("error=permission%20denied"), "{to}");
        let to = location(&post_form(&app, &format!("/artifacts/{id}/delete"), &cookie, &[("csrf", &csrf)]).await);
        assert!(to.contains("error=permission%20denied"), "{to}");
        let d: Value = app.admin(Method::GET, &format!("/api/v1/deployments/{dep}"), None).await.body;
        assert_eq!(d["status"], "active", "nothing changed");
        assert_eq!(
            app.admin(Method::GET, "/api/v1/deployments", None).await.body["items"].as_array().unwrap().len(),
            1
        );
    });
}
