//! The web UI in a real headless Chromium, driven over WebDriver by chromedriver: sign in,
//! move around, create a token through a form, filter the audit log, accept a pending device.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

use crate::e2e::{Server, agent, get_json};
use crate::support::{TempDir, eventually, free_port};

const W3C_ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// These tests enroll their devices on the API's address (the device endpoint's port is
/// random): the development switch for that, the pages are what they test.
const ENROLL_OVER_HTTP: (&str, &str) = ("DROVER_INSECURE_ENROLL_OVER_HTTP", "true");

pub(crate) struct Browser {
    driver: Child,
    base: String,
    session: String,
    _profile: TempDir,
}

fn find_program(candidates: &[&str]) -> Option<String> {
    candidates.iter().find(|p| Path::new(p).exists()).map(|p| p.to_string())
}

impl Browser {
    pub(crate) fn start() -> Browser {
        let install =
            "run the README's test command (scripts/test.sh), which installs Debian's chromium and chromium-driver";
        let chromium = find_program(&["/usr/bin/chromium", "/usr/bin/chromium-browser"])
            .unwrap_or_else(|| panic!("Chromium is missing: {install}"));
        let chromedriver =
            find_program(&["/usr/bin/chromedriver"]).unwrap_or_else(|| panic!("chromedriver is missing: {install}"));
        let port = free_port();
        let driver = Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let base = format!("http://127.0.0.1:{port}");
        eventually(Duration::from_secs(20), "chromedriver to listen", || {
            agent().get(&format!("{base}/status")).call().ok().filter(|r| r.status() == 200)
        });
        let profile = TempDir::new("chromium-profile");
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                    "--no-first-run", "--disable-background-networking", "--disable-component-update",
                    "--disable-sync", "--window-size=1440,900",
                    format!("--user-data-dir={}", profile.path().display()),
                ]
            }
        }}});
        let mut resp = agent().post(&format!("{base}/session")).send_json(caps).unwrap();
        let v: Value = resp.body_mut().read_json().unwrap();
        let session =
            v["value"]["sessionId"].as_str().unwrap_or_else(|| panic!("no WebDriver session: {v}")).to_string();
        Browser { driver, base, session, _profile: profile }
    }

    pub(crate) fn cmd(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        self.try_cmd(method, path, body).unwrap_or_else(|e| panic!("WebDriver {method} {path} failed: {e}"))
    }

    fn try_cmd(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, String> {
        let url = format!("{}/session/{}{path}", self.base, self.session);
        let mut resp = match method {
            "GET" => agent().get(&url).call().unwrap(),
            "DELETE" => agent().delete(&url).call().unwrap(),
            _ => agent().post(&url).send_json(body.unwrap_or(json!({}))).unwrap(),
        };
        let v: Value = resp.body_mut().read_json().unwrap();
        match v["value"].get("error") {
            Some(err) => Err(format!("{err} {}", v["value"]["message"])),
            None => Ok(v["value"].clone()),
        }
    }

    /// Runs `f` on the element, finding it again when the page replaced it meanwhile
    /// (htmx swaps parts of pages).
    fn with_element(&self, css: &str, f: impl Fn(&str) -> Result<Value, String>) -> Value {
        eventually(Duration::from_secs(10), &format!("a usable element {css}"), || match f(&self.find(css)) {
            Ok(v) => Some(v),
            // The page replaced the element (htmx, or a new page) between finding and using it.
            Err(e) if e.contains("stale element") || e.contains("does not belong to the document") => None,
            Err(e) => panic!("WebDriver on {css} failed: {e}"),
        })
    }

    pub(crate) fn goto(&self, url: &str) {
        self.cmd("POST", "/url", Some(json!({"url": url})));
    }

    pub(crate) fn find(&self, css: &str) -> String {
        let url = format!("{}/session/{}/element", self.base, self.session);
        eventually(Duration::from_secs(10), &format!("element {css}"), || {
            let mut r = agent().post(&url).send_json(json!({"using": "css selector", "value": css})).ok()?;
            let v: Value = r.body_mut().read_json().ok()?;
            v["value"][W3C_ELEMENT].as_str().map(str::to_string)
        })
    }

    pub(crate) fn type_into(&self, css: &str, text: &str) {
        self.with_element(css, |el| self.try_cmd("POST", &format!("/element/{el}/clear"), None));
        self.with_element(css, |el| self.try_cmd("POST", &format!("/element/{el}/value"), Some(json!({"text": text}))));
    }

    pub(crate) fn click(&self, css: &str) {
        self.with_element(css, |el| self.try_cmd("POST", &format!("/element/{el}/click"), None));
    }

    pub(crate) fn text(&self, css: &str) -> String {
        let v = self.with_element(css, |el| self.try_cmd("GET", &format!("/element/{el}/text"), None));
        v.as_str().unwrap_or_default().to_string()
    }

    /// Follows a link of the navigation: opens its menu (a `<details>`), then the link.
    pub(crate) fn nav(&self, menu: &str, href: &str) {
        self.click(&format!("#menu-{menu} summary"));
        self.click(&format!("#menu-{menu} a[href='{href}']"));
    }

    /// Runs a script in the page and returns what it returns.
    pub(crate) fn script(&self, js: &str) -> Value {
        self.cmd("POST", "/execute/sync", Some(json!({"script": js, "args": []})))
    }

    fn title(&self) -> String {
        self.cmd("GET", "/title", None).as_str().unwrap_or_default().to_string()
    }

    pub(crate) fn wait_title(&self, contains: &str) {
        eventually(Duration::from_secs(10), &format!("page title with {contains:?}"), || {
            self.title().contains(contains).then_some(())
        });
    }

    fn page_source(&self) -> String {
        self.cmd("GET", "/source", None).as_str().unwrap_or_default().to_string()
    }

    /// Saves a PNG of the page when DROVER_SCREENSHOT_DIR is set, for people to look at.
    fn screenshot(&self, name: &str) {
        if let Ok(dir) = std::env::var("DROVER_SCREENSHOT_DIR") {
            use base64::Engine as _;
            let b64 = self.cmd("GET", "/screenshot", None);
            let png = base64::engine::general_purpose::STANDARD.decode(b64.as_str().unwrap()).unwrap();
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(Path::new(&dir).join(format!("{name}.png")), png).unwrap();
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = agent().delete(&format!("{}/session/{}", self.base, self.session)).call();
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

#[test]
fn sign_in_and_use_the_ui_in_headless_chromium() {
    let dir = TempDir::new("browser");
    let server = Server::start(
        &dir.path().join("data"),
        None,
        &[("DROVER_ADMIN_PASSWORD", "browser admin password"), ENROLL_OVER_HTTP],
    );
    let b = Browser::start();

    b.goto(&format!("{}/tokens", server.base));
    b.wait_title("Sign in");
    b.type_into("input[name=username]", "admin");
    b.type_into("input[name=password]", "wrong password!");
    b.click("button[type=submit]");
    eventually(Duration::from_secs(10), "the error message", || {
        b.page_source().contains("wrong username or password").then_some(())
    });

    b.type_into("input[name=username]", "admin");
    b.type_into("input[name=password]", "browser admin password");
    b.click("button[type=submit]");
    // Back where the browser was going, signed in.
    b.wait_title("API tokens");
    assert!(b.text("header .who").contains("admin"));

    b.click("a[href='/']");
    b.wait_title("Overview");
    assert!(b.text("main").contains("Recent changes"));
    assert!(b.text("#audit-table").contains("session.login"));
    b.screenshot("overview");

    // The navigation is one line at 1440 px, its groups menus that open without a script.
    let nav_height = b.script("return document.querySelector('header.top').getBoundingClientRect().height");
    assert!(nav_height.as_f64().unwrap() < 60.0, "the header wraps: {nav_height} px high");
    let icon = b.script("return document.querySelector('link[rel=icon]').href");
    assert!(icon.as_str().unwrap().ends_with("/assets/favicon.svg"), "{icon}");
    let favicon = agent().get(&format!("{}/assets/favicon.svg", server.base)).call().unwrap();
    assert_eq!(favicon.headers().get("content-type").unwrap(), "image/svg+xml");
    // Opening one menu closes the other (with the page's script; without it each stays open).
    b.click("#menu-fleet summary");
    b.click("#menu-settings summary");
    let open = b.script("return [...document.querySelectorAll('header details.menu[open]')].map(d => d.id)");
    assert_eq!(open, json!(["menu-settings"]));
    b.click("#menu-settings a[href='/tokens']");
    b.wait_title("API tokens");
    b.type_into("input[name=name]", "release pipeline");
    b.click("form.stack button[type=submit]");
    let secret = eventually(Duration::from_secs(10), "the new token", || {
        let s = b.page_source();
        s.contains("new-token").then(|| b.text("#new-token"))
    });
    assert!(secret.starts_with("drv_"), "{secret}");
    let (status, me) = get_json(&format!("{}/api/v1/me", server.base), Some(&secret));
    assert_eq!(status, 200);
    assert_eq!(me["name"], "release pipeline");
    assert_eq!(me["role"], "viewer");
    b.screenshot("tokens");

    b.nav("settings", "/audit");
    b.wait_title("Audit log");
    b.type_into("input[name=action]", "token.");
    b.click("form.filters button[type=submit]");
    eventually(Duration::from_secs(10), "the filtered audit log", || {
        let t = b.text("#audit-table");
        (t.contains("token.create") && !t.contains("session.login")).then_some(())
    });
    b.screenshot("audit");
    let url = b.cmd("GET", "/url", None);
    assert!(url.as_str().unwrap().contains("action=token."), "the filter is in the address, to share or reload: {url}");
    assert!(!url.as_str().unwrap().contains("None"), "empty filters stay empty: {url}");

    // A device asks to enroll; the operator finds it in the pending list and accepts it.
    let key = rcgen::KeyPair::generate().unwrap();
    let csr = rcgen::CertificateParams::default().serialize_request(&key).unwrap().pem().unwrap();
    let mut resp = agent()
        .post(&format!("{}/api/v1/enroll", server.base))
        .send_json(json!({"csr_pem": csr, "identity": {"serial": "SN-BROWSER-1"}}))
        .unwrap();
    assert_eq!(resp.status(), 202);
    let enrolled: Value = resp.body_mut().read_json().unwrap();
    let device_id = enrolled["device_id"].as_str().unwrap().to_string();
    b.goto(&format!("{}/", server.base));
    b.wait_title("Overview");
    assert!(b.text("#menu-fleet summary").contains('1'), "the navigation counts the pending device");
    b.nav("fleet", "/devices?status=pending");
    b.wait_title("Pending devices");
    assert!(b.text(&format!("#device-{device_id}")).contains("SN-BROWSER-1"));
    b.screenshot("pending");
    b.click(&format!("input[type=checkbox][value='{device_id}']"));
    b.click("#bulk-accept");
    eventually(Duration::from_secs(10), "the acceptance notice", || {
        b.page_source().contains("Accepted 1 device.").then_some(())
    });
    b.click("#tab-accepted");
    b.wait_title("Devices");
    b.screenshot("devices");
    b.click(&format!("a[href='/devices/{device_id}']"));
    b.wait_title("SN-BROWSER-1");
    assert_eq!(b.text("#device-status"), "accepted");
    assert!(b.text("main").contains("Certificate expires"));
    b.screenshot("device");

    // The dynamic group editor previews what a filter matches while it is typed.
    b.nav("fleet", "/groups");
    b.wait_title("Groups");
    b.type_into("#create-group input[name=filter]", "status = accepted");
    eventually(Duration::from_secs(10), "the live preview", || {
        let s = b.page_source();
        (s.contains("preview-count") && b.text("#preview").contains("1 device matches")).then_some(())
    });
    assert!(b.text("#preview").contains("SN-BROWSER-1"));
    b.type_into("#create-group input[name=filter]", "status = ");
    eventually(Duration::from_secs(10), "the mistake in the preview", || {
        b.page_source().contains("preview-error").then(|| assert!(b.text("#preview").contains("column")))
    });
    b.screenshot("groups");

    b.click("header form button");
    b.wait_title("Sign in");
}

/// An API session signed in as `user`, for setting up what a test needs besides the page.
struct ApiSession {
    base: String,
    cookie: String,
    csrf: String,
}

impl ApiSession {
    fn sign_in(base: &str, username: &str, password: &str) -> ApiSession {
        let mut resp = agent()
            .post(&format!("{base}/api/v1/auth/login"))
            .send_json(json!({"username": username, "password": password}))
            .unwrap();
        assert_eq!(resp.status(), 200);
        let cookie = resp.headers().get("set-cookie").unwrap().to_str().unwrap().split(';').next().unwrap().to_string();
        let v: Value = resp.body_mut().read_json().unwrap();
        ApiSession { base: base.to_string(), cookie, csrf: v["csrf_token"].as_str().unwrap().to_string() }
    }

    fn post(&self, path: &str, body: Value) -> Value {
        let mut resp = agent()
            .post(&format!("{}/api/v1{path}", self.base))
            .header("Cookie", &self.cookie)
            .header("X-CSRF-Token", &self.csrf)
            .send_json(body)
            .unwrap();
        let v: Value = resp.body_mut().read_json().unwrap_or(Value::Null);
        assert!(resp.status().is_success(), "POST {path}: {v}");
        v
    }
}

#[test]
fn upload_an_artifact_deploy_it_to_a_group_and_abort_in_headless_chromium() {
    let dir = TempDir::new("browser-updates");
    let password = "browser admin password";
    let server =
        Server::start(&dir.path().join("data"), None, &[("DROVER_ADMIN_PASSWORD", password), ENROLL_OVER_HTTP]);
    let api = ApiSession::sign_in(&server.base, "admin", password);

    // A signed artifact on disk, as a release pipeline leaves it.
    let payload = dir.path().join("app.bin");
    std::fs::write(&payload, vec![42u8; 200_000]).unwrap();
    let mut m = drover_artifact::Manifest::new("edge-app", "1.2.3", vec!["test-board".into()], "file");
    m.provenance = Some(drover_artifact::Provenance {
        source: Some("https://git.example/edge-app".into()),
        commit: Some("c0ffee0123456789c0ffee0123456789c0ffee01".into()),
        build_id: Some("build-42".into()),
        sbom: None,
    });
    let key = drover_artifact::SigningKey::generate().unwrap();
    let file = dir.path().join("edge-app-1.2.3.drover");
    drover_artifact::Builder::new(m)
        .payload("app.bin", &payload, drover_artifact::PayloadRole::Install)
        .build(std::fs::File::create(&file).unwrap(), &[&key])
        .unwrap();

    // Two accepted devices in a static group.
    let mut devices = Vec::new();
    for serial in ["SN-UPD-1", "SN-UPD-2"] {
        api.post("/devices/preauthorize", json!({"identities": [{"serial": serial}]}));
        let key = rcgen::KeyPair::generate().unwrap();
        let csr = rcgen::CertificateParams::default().serialize_request(&key).unwrap().pem().unwrap();
        let mut resp = agent()
            .post(&format!("{}/api/v1/enroll", server.base))
            .send_json(json!({"csr_pem": csr, "identity": {"serial": serial}}))
            .unwrap();
        let v: Value = resp.body_mut().read_json().unwrap();
        assert_eq!(v["status"], "accepted", "{v}");
        devices.push(v["device_id"].as_str().unwrap().to_string());
    }
    let group = api.post("/groups", json!({"name": "lab", "kind": "static"}));
    api.post(&format!("/groups/{}/devices", group["id"].as_str().unwrap()), json!({"devices": devices}));

    let b = Browser::start();
    b.goto(&format!("{}/artifacts", server.base));
    b.wait_title("Sign in");
    b.type_into("input[name=username]", "admin");
    b.type_into("input[name=password]", password);
    b.click("button[type=submit]");
    b.wait_title("Artifacts");

    // Upload through the page: the file input, then the page's script streams it to the API.
    b.with_element("#upload-artifact input[type=file]", |el| {
        b.try_cmd("POST", &format!("/element/{el}/value"), Some(json!({"text": file.display().to_string()})))
    });
    // The button works once the page's script has run (it stays disabled without JavaScript).
    eventually(Duration::from_secs(10), "the upload button to be enabled", || {
        let v = b.with_element("#upload-artifact button[type=submit]", |el| {
            b.try_cmd("GET", &format!("/element/{el}/enabled"), None)
        });
        (v == json!(true)).then_some(())
    });
    b.click("#upload-artifact button[type=submit]");
    b.wait_title("Artifact edge-app 1.2.3");
    assert!(b.text("main .notice").contains("Artifact edge-app 1.2.3 uploaded."));
    assert!(b.text("#provenance").contains("c0ffee0123456789c0ffee0123456789c0ffee01"));
    assert!(b.text("#payloads").contains("app.bin") && b.text("#payloads").contains("195.3 KiB"));
    assert!(b.text("#signatures").contains(&key.key_id()));
    b.screenshot("artifact");

    // A deployment to the group, from the artifact's page.
    b.click("#deploy-artifact");
    b.wait_title("New deployment");
    b.type_into("#create-deployment input[name=name]", "lab rollout");
    b.click("#create-deployment input[name=target][value=group]");
    b.click("#create-deployment select[name=group] option[value=lab]");
    b.screenshot("deployment-new");
    b.click("#create-deployment button[type=submit]");
    b.wait_title("Deployment lab rollout");
    assert!(b.text("main .notice").contains("created for 2 devices"));
    assert!(b.text("#progress-text").contains("0 of 2 devices finished"));
    b.find("#deployment-progress");
    let rows = b.text("#deployment-devices");
    // Each device by its name (the serial here), its id in the row's link.
    for d in &devices {
        b.find(&format!("#dd-{d} a[href='/devices/{d}']"));
    }
    assert!(rows.contains("SN-UPD-1") && rows.contains("SN-UPD-2"), "{rows}");
    assert!(rows.contains("pending"));
    b.screenshot("deployment");

    // Abort, after the confirmation.
    b.click("#abort-deployment");
    eventually(Duration::from_secs(10), "the confirmation to accept", || b.try_cmd("POST", "/alert/accept", None).ok());
    eventually(Duration::from_secs(10), "the deployment aborted", || {
        b.page_source().contains("status-aborted").then_some(())
    });
    assert!(b.text("main .notice").contains("Deployment lab rollout aborted."));
    assert!(
        b.text("#progress-text").contains("2 of 2 devices finished") && b.text("#progress-text").contains("2 aborted")
    );
    assert!(b.text("#deployment-devices").contains("aborted by an operator"));
    assert!(!b.page_source().contains("abort-deployment"), "nothing left to abort");
    b.screenshot("deployment-aborted");

    b.nav("updates", "/deployments");
    b.wait_title("Deployments");
    assert!(b.text("#deployments-table").contains("lab rollout") && b.text("#deployments-table").contains("aborted"));
    b.screenshot("deployments");
}

#[test]
fn telemetry_charts_of_a_device_and_the_fleet_in_headless_chromium() {
    use drover_server::telemetry::store::{Batch, Cache, Event, Point};

    let dir = TempDir::new("browser-charts");
    let password = "browser admin password";
    let data = dir.path().join("data");
    let server = Server::start(&data, None, &[("DROVER_ADMIN_PASSWORD", password), ENROLL_OVER_HTTP]);
    let api = ApiSession::sign_in(&server.base, "admin", password);
    api.post("/devices/preauthorize", json!({"identities": [{"serial": "SN-CHART-1"}]}));
    let key = rcgen::KeyPair::generate().unwrap();
    let csr = rcgen::CertificateParams::default().serialize_request(&key).unwrap().pem().unwrap();
    let mut resp = agent()
        .post(&format!("{}/api/v1/enroll", server.base))
        .send_json(json!({"csr_pem": csr, "identity": {"serial": "SN-CHART-1"}}))
        .unwrap();
    let v: Value = resp.body_mut().read_json().unwrap();
    assert_eq!(v["status"], "accepted", "{v}");
    let device = v["device_id"].as_str().unwrap().to_string();

    // Telemetry with known values, stored as ingest stores it: one point a minute over the
    // last 40 minutes with a 10-minute outage (no points 15 to 24 minutes ago), so 30 points,
    // the highest 87.5; a constant 512 MiB of memory; one event.
    let now = drover_server::time::now_ms();
    let minutes: Vec<i64> = (1..=40).filter(|k| !(15..=24).contains(k)).collect();
    let cpu = |k: i64| if k == 5 { 87.5 } else { 20.0 + (k % 7) as f64 };
    let mut points: Vec<Point> =
        minutes.iter().map(|&k| Point { name: "cpu.percent".into(), t: now - k * 60_000, v: cpu(k) }).collect();
    points.extend(minutes.iter().map(|&k| Point {
        name: "mem.used_bytes".into(),
        t: now - k * 60_000,
        v: 536_870_912.0,
    }));
    // A counter (bytes since boot, 60 000 more each minute: 1000 B/s) and one of the agent's own.
    points.extend(minutes.iter().map(|&k| Point {
        name: "net.rx_bytes".into(),
        t: now - k * 60_000,
        v: ((40 - k) * 60_000) as f64,
    }));
    points.extend(minutes.iter().map(|&k| Point { name: "agent.outbox.pending".into(), t: now - k * 60_000, v: 0.0 }));
    // And a metric last reported three hours ago: nothing to draw in the last hour.
    points.push(Point { name: "uptime_s".into(), t: now - 3 * 3_600_000, v: 86_400.0 });
    let batch = Batch {
        device_id: device.clone(),
        seq: 0,
        points,
        events: vec![Event {
            id: "ev-door".into(),
            t: now - 120_000,
            name: "door.open".into(),
            severity: "warning".into(),
            data: r#"{"door":"north"}"#.into(),
        }],
        dropped: 0,
        refused_future: 0,
        refused_old: 0,
    };
    let url = format!("sqlite://{}?mode=rw", data.join("drover.db").display());
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let db = drover_server::db::Db::open(&url).await.unwrap();
        drover_server::telemetry::store::write(&db, &Cache::default(), &[batch], now, 86_400_000).await.unwrap();
        db.close().await;
    });

    let b = Browser::start();
    b.goto(&format!("{}/devices/{device}", server.base));
    b.wait_title("Sign in");
    b.type_into("input[name=username]", "admin");
    b.type_into("input[name=password]", password);
    b.click("button[type=submit]");
    b.wait_title("SN-CHART-1");
    // The device's page lists its metrics with the latest value, in their units.
    let summary = eventually(Duration::from_secs(10), "the metrics summary", || {
        let t = b.text("#device-metrics-summary");
        t.contains("cpu.percent").then_some(t)
    });
    assert!(summary.contains("mem.used_bytes") && summary.contains("512 MiB"), "{summary}");

    b.click("#metrics-link");
    b.wait_title("Metrics SN-CHART-1");
    let js = |script: &str| b.cmd("POST", "/execute/sync", Some(json!({"script": script, "args": []})));
    let card = r#"document.querySelector('.chart-card[data-metric="cpu.percent"]')"#;
    let state = |attr: &str| js(&format!("return {card}.dataset.{attr} || null;"));
    eventually(Duration::from_secs(20), "the cpu.percent chart drawn", || {
        (state("state") == json!("ok")).then_some(())
    });
    // What uPlot holds: 30 values and one null where the outage is (a gap, not a line across it).
    let held = js(&format!(
        "const u = {card}.querySelector('.chart')._uplot; const ys = u.data[1];
         return {{values: ys.filter(v => v !== null).length, nulls: ys.filter(v => v === null).length,
                  max: Math.max(...ys.filter(v => v !== null)), series: u.series.length, resolution: {card}.dataset.resolution}};"
    ));
    assert_eq!(held, json!({"values": 30, "nulls": 1, "max": 87.5, "series": 2, "resolution": "raw"}), "{held}");
    assert_eq!(b.text(r#".chart-card[data-metric="cpu.percent"] [data-stat=max]"#), "87.5 %");
    assert_eq!(b.text(r#".chart-card[data-metric="mem.used_bytes"] [data-stat=max]"#), "512 MiB");
    assert!(b.text("#telemetry-events").contains("door.open"));
    let uptime = r#".chart-card[data-metric="uptime_s"]"#;
    eventually(Duration::from_secs(20), "the empty chart", || {
        (js(&format!("return document.querySelector('{uptime}').dataset.state || null;")) == json!("empty"))
            .then_some(())
    });
    assert_eq!(b.text(&format!("{uptime} .chart-message")), "No data in this range.");
    // The device's health first, the agent's own metrics last.
    let order = js("return [...document.querySelectorAll('.chart-card[data-metric]')].map(f => f.dataset.metric);");
    assert_eq!(order, json!(["cpu.percent", "mem.used_bytes", "net.rx_bytes", "uptime_s", "agent.outbox.pending"]));
    // A counter is drawn as its rate per second.
    let rx = r#"document.querySelector('.chart-card[data-metric="net.rx_bytes"]')"#;
    eventually(Duration::from_secs(20), "the counter drawn", || {
        (js(&format!("return {rx}.dataset.state || null;")) == json!("ok")).then_some(())
    });
    let rates =
        js(&format!("return [...new Set({rx}.querySelector('.chart')._uplot.data[1].filter(v => v !== null))];"));
    assert_eq!(rates, json!([1000]), "{rates}");
    assert_eq!(b.text(r#".chart-card[data-metric="net.rx_bytes"] .chart-unit"#), "bytes per second");
    // A flat series gets an axis with distinct ticks around its value; times read in UTC.
    let ticks = js(
        r#"return document.querySelector('.chart-card[data-metric="mem.used_bytes"] .chart')._uplot.axes[1]._values.filter(v => v);"#,
    );
    let ticks: Vec<String> = serde_json::from_value(ticks).unwrap();
    let distinct: std::collections::BTreeSet<&String> = ticks.iter().collect();
    assert!(ticks.len() >= 3 && distinct.len() == ticks.len() && ticks.contains(&"512 MiB".to_string()), "{ticks:?}");
    assert!(b.text(".charts-status").contains(" UTC"), "{}", b.text(".charts-status"));
    assert!(b.text(".charts-status").contains("refreshes every 30 s"), "{}", b.text(".charts-status"));
    b.screenshot("metrics-device");

    // Another range asks the server again, now for the 1-minute rollups.
    b.click(r#".range-picker [data-range="6h"]"#);
    eventually(Duration::from_secs(20), "the chart loaded again for 6 h", || {
        (state("resolution") == json!("1m") && state("loads") == json!("2") && state("state") == json!("ok"))
            .then_some(())
    });
    assert_eq!(state("points"), json!("30"));
    assert_eq!(
        js(r#"return document.querySelector('.range-picker [aria-pressed="true"]').dataset.range;"#),
        json!("6h")
    );
    assert!(b.cmd("GET", "/url", None).as_str().unwrap().ends_with("range=6h"), "the range is in the address");

    // The fleet dashboard: the aggregate over the one device, and the device on top.
    b.nav("monitoring", "/ui/metrics");
    b.wait_title("Metrics");
    let fleet = "document.querySelector('.fleet-panel [data-chart=fleet]')";
    eventually(Duration::from_secs(20), "the fleet chart drawn", || {
        (js(&format!("return {fleet}.dataset.state || null;")) == json!("ok")).then_some(())
    });
    let held = js(&format!(
        "const u = {fleet}.querySelector('.chart')._uplot; const avg = u.data[1].filter(v => v !== null);
         const d = document.querySelector('.fleet-panel [data-chart=devices] .chart')._uplot;
         return {{values: avg.length, max: Math.max(...u.data[3].filter(v => v !== null)),
                  devices: Math.max(...d.data[1].filter(v => v !== null))}};"
    ));
    assert_eq!(held, json!({"values": 30, "max": 87.5, "devices": 1}), "{held}");
    assert_eq!(b.text(".fleet-panel [data-chart=fleet] [data-stat=max]"), "87.5 %");
    // Fleet aggregates read rollups, even over the last hour: the 1-minute ones.
    assert_eq!(js(&format!("return {fleet}.dataset.resolution;")), json!("1m"));
    assert!(b.text(".fleet-devices").contains("1 device reported cpu.percent"), "{}", b.text(".fleet-devices"));
    let top = eventually(Duration::from_secs(10), "the top devices", || {
        let t = b.text(".top-devices tbody");
        t.contains("SN-CHART-1").then_some(t)
    });
    assert!(top.starts_with("1 SN-CHART-1"), "{top}");
    b.find(&format!(".top-devices a[href='/devices/{device}/metrics']"));
    // Ranked by maximum: the highest value there is.
    b.click(".top-by option[value=max]");
    eventually(Duration::from_secs(10), "the ranking by maximum", || {
        b.text(".top-devices tbody").contains("87.5 %").then_some(())
    });
    b.screenshot("metrics-fleet");

    // An answer the API refuses is shown where the chart would be, not swallowed: here a
    // filter the page did not check (set behind its back), on the next load.
    js("document.querySelector('.fleet-panel').dataset.filter = 'tag.site ='; return null;");
    b.click(r#".range-picker [data-range="24h"]"#);
    let refused = eventually(Duration::from_secs(20), "the API's refusal on the page", || {
        (js(&format!("return {fleet}.dataset.state || null;")) == json!("error"))
            .then(|| b.text(".fleet-panel [data-chart=fleet] .chart-message.error"))
    });
    assert!(refused.contains("invalid filter") && refused.contains("column"), "{refused}");
    assert!(b.text(".top-devices tbody").contains("invalid filter"));
    assert!(b.text(".charts-status").contains("could not be loaded"), "{}", b.text(".charts-status"));

    // A filter that does not parse is refused on the page with the server's message.
    b.type_into("#metrics-form input[name=filter]", "tag.site =");
    b.click("#metrics-form button[type=submit]");
    eventually(Duration::from_secs(10), "the filter's error", || {
        b.page_source().contains("filter-error").then(|| b.text("#filter-error"))
    });
    assert!(b.text("#filter-error").contains("invalid filter"));
    b.screenshot("metrics-bad-filter");

    // A group's page charts its devices.
    let group = api.post("/groups", json!({"name": "lab", "kind": "static"}));
    let group = group["id"].as_str().unwrap().to_string();
    api.post(&format!("/groups/{group}/devices"), json!({"devices": [device]}));
    b.goto(&format!("{}/groups/{group}", server.base));
    b.wait_title("Group lab");
    eventually(Duration::from_secs(20), "the group's chart drawn", || {
        (js(&format!("return {fleet}.dataset.state || null;")) == json!("ok")).then_some(())
    });
    assert_eq!(js("return document.querySelector('select.metric-choice').value;"), json!("cpu.percent"));
    assert_eq!(b.text(".fleet-panel [data-chart=fleet] [data-stat=max]"), "87.5 %");
    b.screenshot("metrics-group");
}
