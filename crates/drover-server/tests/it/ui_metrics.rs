//! The metrics pages through the router on every backend: a device's charts page lists the
//! metrics that device reports (and no other device's) with its telemetry events, the fleet
//! dashboard offers the fleet's metrics and says what is wrong with a bad filter, a group's
//! chooser lists its devices' metrics, a viewer sees all of it, and uPlot is served from the
//! binary with its licence.

use axum::body::Body;
use axum::http::{Method, Request, StatusCode, header};
use drover_server::telemetry::store::{Batch, Cache, Event, Point};
use serde_json::json;

use crate::devices::accepted_devices;
use crate::each_backend;
use crate::support::{Resp, TestApp};

async fn get(app: &TestApp, path: &str, cookie: &str) -> Resp {
    app.send(Request::get(path).header(header::COOKIE, cookie).body(Body::empty()).unwrap()).await
}

/// Stores points and events for a device through the telemetry store, as ingest does.
async fn telemetry(app: &TestApp, device: &str, points: &[(&str, i64, f64)], events: &[(&str, &str, i64)]) {
    let batch = Batch {
        device_id: device.to_string(),
        seq: 0,
        points: points.iter().map(|(n, t, v)| Point { name: (*n).into(), t: *t, v: *v }).collect(),
        events: events
            .iter()
            .map(|(id, name, t)| Event {
                id: (*id).into(),
                t: *t,
                name: (*name).into(),
                severity: "warning".into(),
                data: r#"{"door":"north"}"#.into(),
            })
            .collect(),
        dropped: 0,
        refused_future: 0,
        refused_old: 0,
    };
    let now = drover_server::time::now_ms();
    drover_server::telemetry::store::write(&app.db, &Cache::default(), &[batch], now, 120_000).await.unwrap();
}

/// A viewer's session cookie.
async fn viewer(app: &TestApp) -> String {
    let r = app
        .admin(
            Method::POST,
            "/api/v1/users",
            Some(json!({"username": "vera", "role": "viewer", "password": "vera's password"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let (r, cookie, _) = app.sign_in("vera", "vera's password").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    cookie
}

#[tokio::test]
async fn metrics_pages_for_a_viewer() {
    each_backend!(|app| {
        let ids = accepted_devices(&app, "SN-MET", 2).await;
        let now = drover_server::time::now_ms();
        telemetry(
            &app,
            &ids[0],
            &[("cpu.percent", now - 60_000, 12.5), ("mem.used_bytes", now - 60_000, 1e9)],
            &[("ev-1", "door.open", now - 30_000)],
        )
        .await;
        telemetry(&app, &ids[1], &[("temp.zone0_celsius", now - 60_000, 48.0)], &[]).await;
        let r = app.admin(Method::POST, "/api/v1/groups", Some(json!({"name": "lab", "kind": "static"}))).await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        let group = r.body["id"].as_str().unwrap().to_string();
        let r = app
            .admin(Method::POST, &format!("/api/v1/groups/{group}/devices"), Some(json!({"devices": [ids[1]]})))
            .await;
        assert!(r.status.is_success(), "{}", r.text);
        let cookie = viewer(&app).await;

        // The device's charts page: a chart for each metric this device reports, not the other's.
        let page = get(&app, &format!("/devices/{}/metrics", ids[0]), &cookie).await;
        assert_eq!(page.status, StatusCode::OK, "{}", page.text);
        assert!(page.text.contains(r#"data-metric="cpu.percent""#), "{}", page.text);
        assert!(page.text.contains(r#"data-metric="mem.used_bytes""#));
        assert!(!page.text.contains("temp.zone0_celsius"), "another device's metric is not on this page");
        assert!(page.text.contains("latest 12.5"), "the newest value is in the page without JavaScript");
        assert!(page.text.contains(&format!(r#"data-device="{}""#, ids[0])));
        assert!(
            page.text.contains("/assets/vendor/uPlot-1.6.32.iife.min.js") && page.text.contains("/assets/charts.js")
        );
        let events = &page.text[page.text.find(r#"id="telemetry-events""#).unwrap()..];
        assert!(events.contains("door.open") && events.contains("severity-warning"), "{events}");
        // A device without telemetry says so.
        let quiet = get(&app, &format!("/devices/{}/metrics", ids[1]), &cookie).await;
        assert!(quiet.text.contains("temp.zone0_celsius") && !quiet.text.contains("cpu.percent"));
        assert!(quiet.text.contains("No telemetry events in the last 24 hours."));

        // The device's own page leads there.
        let device = get(&app, &format!("/devices/{}", ids[0]), &cookie).await;
        assert!(device.text.contains(&format!(r#"href="/devices/{}/metrics""#, ids[0])));
        assert!(device.text.contains(r#"id="device-metrics-summary""#));

        // The fleet dashboard: in the navigation, every metric of the fleet in the chooser,
        // cpu.percent chosen first.
        let fleet = get(&app, "/ui/metrics", &cookie).await;
        assert_eq!(fleet.status, StatusCode::OK, "{}", fleet.text);
        assert!(fleet.text.contains(r#"<a href="/ui/metrics" aria-current="page">Metrics</a>"#));
        for m in ["cpu.percent", "mem.used_bytes", "temp.zone0_celsius"] {
            assert!(fleet.text.contains(&format!(r#"<option value="{m}""#)), "{m} in the chooser");
        }
        assert!(fleet.text.contains(r#"<option value="cpu.percent" selected>"#));
        assert!(fleet.text.contains(r#"class="fleet-panel" data-metric="cpu.percent""#));
        // A filter narrows the chooser, and a split by tag names the values to draw.
        let r = app
            .admin(Method::PUT, &format!("/api/v1/devices/{}/tags", ids[1]), Some(json!({"tags": {"site": "berlin"}})))
            .await;
        assert!(r.status.is_success(), "{}", r.text);
        let narrowed = get(&app, "/ui/metrics?filter=tag.site%20%3D%20berlin&split=site&range=24h", &cookie).await;
        assert!(narrowed.text.contains(r#"<option value="temp.zone0_celsius" selected>"#), "{}", narrowed.text);
        assert!(!narrowed.text.contains(r#"<option value="cpu.percent""#));
        assert!(narrowed.text.contains(r#"data-split-key="site" data-split-values="[&quot;berlin&quot;]""#));
        assert!(narrowed.text.contains(r#"data-range="24h" aria-pressed="true""#));

        // A group's page has its metrics section; its chooser lists the group's metrics only.
        let g = get(&app, &format!("/groups/{group}"), &cookie).await;
        assert!(g.text.contains(r#"id="group-metrics""#) && g.text.contains(&format!(r#"data-group="{group}""#)));
        let names = get(&app, &format!("/ui/metrics/names?group={group}"), &cookie).await;
        assert_eq!(names.status, StatusCode::OK, "{}", names.text);
        assert_eq!(names.body, json!({"metrics": ["temp.zone0_celsius"]}));
        let all = get(&app, "/ui/metrics/names", &cookie).await;
        assert_eq!(all.body["metrics"], json!(["cpu.percent", "mem.used_bytes", "temp.zone0_celsius"]));
        // Bad input: a group that does not exist.
        let missing = get(&app, "/ui/metrics/names?group=nope", &cookie).await;
        assert_eq!(missing.status, StatusCode::NOT_FOUND, "{}", missing.text);

        // The API the charts read answers the viewer's session too.
        let series =
            get(&app, &format!("/api/v1/devices/{}/metrics/cpu.percent?from=now-1h&step=30s", ids[0]), &cookie).await;
        assert_eq!(series.status, StatusCode::OK, "{}", series.text);
        assert_eq!(series.body["points"][0]["avg"], 12.5);

        // uPlot comes from the binary, cached for good (the version is in the name), with its licence.
        let js = app.call(Method::GET, "/assets/vendor/uPlot-1.6.32.iife.min.js", None, None).await;
        assert_eq!(js.status, StatusCode::OK);
        assert!(js.text.contains("var uPlot="));
        assert!(js.headers[header::CACHE_CONTROL].to_str().unwrap().contains("immutable"));
        let css = app.call(Method::GET, "/assets/vendor/uPlot-1.6.32.min.css", None, None).await;
        assert_eq!(css.headers[header::CONTENT_TYPE], "text/css");
        let charts = app.call(Method::GET, "/assets/charts.js", None, None).await;
        assert!(charts.text.contains("/api/v1/metrics/fleet"));
        let lic = app.call(Method::GET, "/assets/licenses", None, None).await;
        assert!(lic.text.contains("uPlot 1.6.32") && lic.text.contains("Leon Sorokin"), "{}", lic.text);
    });
}

#[tokio::test]
async fn unknown_device_bad_filter_and_no_session() {
    each_backend!(|app| {
        let cookie = viewer(&app).await;

        // Bad input: a device id that does not exist.
        let r = get(&app, "/devices/no-such-device/metrics", &cookie).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND);
        assert!(r.text.contains("no-such-device"), "{}", r.text);

        // Bad input: a filter cut off after its operator. The page says what and where, and
        // draws nothing.
        let r = get(&app, "/ui/metrics?filter=tag.site%20%3D", &cookie).await;
        assert_eq!(r.status, StatusCode::OK);
        let err = &r.text[r.text.find(r#"id="filter-error""#).expect("the error is in the page")..];
        assert!(err.contains("invalid filter") && err.contains("column"), "{err}");
        assert!(err.contains("tag.site =\n"), "the filter is shown under its caret: {err}");
        assert!(!r.text.contains("fleet-panel"), "no charts of a filter that does not parse");
        assert!(r.text.contains(r#"value="tag.site =""#), "the filter stays in its field to be corrected");

        // Bad input: a filter naming a group that does not exist.
        let r = get(&app, "/ui/metrics?filter=group%20%3D%20ghosts", &cookie).await;
        assert!(r.text.contains("there is no group named &quot;ghosts&quot;"), "{}", r.text);

        // Bad input: a tag key with a space to split by.
        let ids = accepted_devices(&app, "SN-BAD", 1).await;
        telemetry(&app, &ids[0], &[("cpu.percent", drover_server::time::now_ms() - 1000, 5.0)], &[]).await;
        let r = get(&app, "/ui/metrics?split=a%20b", &cookie).await;
        assert!(r.text.contains(r#"id="split-error""#) && r.text.contains("invalid tag key"), "{}", r.text);

        // Bad input: a metric name with characters metrics cannot have.
        let r = get(&app, "/ui/metrics?metric=CPU%20load", &cookie).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        assert!(r.text.contains("invalid metric name"), "{}", r.text);

        // Bad input: both a group and a filter for the chooser's list.
        let r = get(&app, "/ui/metrics/names?group=lab&filter=online", &cookie).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST);

        // A fleet with no metrics yet in the filter's devices says so instead of an empty chart.
        let r = get(&app, "/ui/metrics?filter=tag.site%20%3D%20nowhere", &cookie).await;
        assert!(r.text.contains(r#"id="no-metrics""#) && !r.text.contains("fleet-panel"), "{}", r.text);

        // Without a session: to the sign-in page, and back here afterwards.
        let r = app.send(Request::get("/ui/metrics?range=6h").body(Body::empty()).unwrap()).await;
        assert_eq!(r.status, StatusCode::SEE_OTHER);
        assert_eq!(r.headers[header::LOCATION], "/login?next=/ui/metrics%3Frange%3D6h");
    });
}
