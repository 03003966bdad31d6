//! Telemetry on the server: storage, rollups, retention and queries on SQLite and
//! PostgreSQL (through the ingest's write path and the router), and the ingest end to end
//! through the real broker of a real droverd.

use axum::http::{Method, StatusCode};
use drover_server::telemetry::maintenance;
use drover_server::telemetry::store::{Batch, Event, Point};
use serde_json::{Value, json};

use crate::devices::accepted_devices;
use crate::each_backend;
use crate::support::TestApp;

const MIN: i64 = 60_000;
const HOUR: i64 = 3_600_000;
const DAY: i64 = 86_400_000;

fn batch(device: &str, seq: u64, points: &[(&str, i64, f64)]) -> Batch {
    Batch {
        device_id: device.to_string(),
        seq,
        points: points.iter().map(|(n, t, v)| Point { name: n.to_string(), t: *t, v: *v }).collect(),
        events: Vec::new(),
        dropped: 0,
        refused_future: 0,
        refused_old: 0,
    }
}

async fn count(app: &TestApp, sql: &str) -> i64 {
    let (n,): (i64,) = sqlx::query_as(sql).fetch_one(app.db.pool()).await.unwrap();
    n
}

async fn rollup(app: &TestApp, table: &str, device: &str, name: &str, bucket: i64) -> Option<(i64, f64, f64, f64)> {
    sqlx::query_as(&format!(
        "SELECT r.count, r.sum, r.min, r.max FROM {table} r JOIN metric_series s ON s.id = r.series_id \
         WHERE s.device_id = $1 AND s.name = $2 AND r.bucket = $3"
    ))
    .bind(device.to_string())
    .bind(name.to_string())
    .bind(bucket)
    .fetch_optional(app.db.pool())
    .await
    .unwrap()
}

/// A time in the middle of an hour, so that the tests' minutes stay in one hour.
fn base_time() -> i64 {
    let now = drover_server::time::now_ms();
    now - now % HOUR - 2 * HOUR + 10 * MIN
}

#[tokio::test]
async fn resent_batches_change_nothing_and_events_are_kept_once() {
    each_backend!(|app| {
        let d = accepted_devices(&app, "resend", 1).await.remove(0);
        let t0 = base_time();
        let now = t0 + 5_000;
        let mut b = batch(&d, 1, &[("cpu.percent", t0, 10.0), ("cpu.percent", t0 + 1000, 20.0), ("mem.used", t0, 1.5)]);
        b.events.push(Event {
            id: "e-1".into(),
            t: t0,
            name: "door.open".into(),
            severity: "warning".into(),
            data: r#"{"door":2}"#.into(),
        });
        b.dropped = 3;
        let w = app.state.telemetry.write_at(std::slice::from_ref(&b), now).await.unwrap();
        // 3 points + the drop counter's point.
        assert_eq!((w.points, w.late, w.events), (4, 0, 1));
        // The same batch again (its ack was lost), under a new seq and alone: nothing changes.
        b.seq = 2;
        let w = app.state.telemetry.write_at(std::slice::from_ref(&b), now + 60_000).await.unwrap();
        assert_eq!((w.points, w.events), (0, 0));
        // And twice within one transaction with a new point.
        let mut b3 = b.clone();
        b3.seq = 3;
        b3.points.push(Point { name: "cpu.percent".into(), t: t0 + 2000, v: 30.0 });
        let w = app.state.telemetry.write_at(&[b.clone(), b3], now + 61_000).await.unwrap();
        // The new point, and the drop counter at the batch's new newest time.
        assert_eq!(w.points, 2);
        assert_eq!(count(&app, "SELECT COUNT(*) FROM metric_points").await, 6);
        assert_eq!(count(&app, "SELECT COUNT(*) FROM telemetry_events").await, 1);
        // The rollups counted each point once.
        let minute = t0 - t0 % MIN;
        assert_eq!(rollup(&app, "metric_rollup_1m", &d, "cpu.percent", minute).await, Some((3, 60.0, 10.0, 30.0)));
        assert_eq!(
            rollup(&app, "metric_rollup_1h", &d, "cpu.percent", t0 - t0 % HOUR).await,
            Some((3, 60.0, 10.0, 30.0))
        );
        let (seq, dropped): (i64, i64) =
            sqlx::query_as("SELECT last_seq, dropped FROM telemetry_devices WHERE device_id = $1")
                .bind(d.clone())
                .fetch_one(app.db.pool())
                .await
                .unwrap();
        assert_eq!((seq, dropped), (3, 3));
        // The API shows the event with its data, and the drop counter as a metric.
        let r = app.admin(Method::GET, &format!("/api/v1/devices/{d}/telemetry-events?from={}", t0 - 1000), None).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        assert_eq!(r.body[0]["name"], "door.open");
        assert_eq!(r.body[0]["data"], r#"{"door":2}"#);
        let r = app.admin(Method::GET, &format!("/api/v1/devices/{d}/metrics"), None).await;
        let names: Vec<&str> =
            r.body["items"].as_array().unwrap().iter().map(|m| m["name"].as_str().unwrap()).collect();
        assert_eq!(names, ["cpu.percent", "drover.outbox.dropped", "mem.used"]);
        assert_eq!(r.body["items"][0]["last_value"], 30.0);
        assert!(r.body.get("next_cursor").is_none(), "{}", r.body);
    });
}

#[tokio::test]
async fn late_points_are_stored_in_place_and_correct_their_rollups() {
    each_backend!(|app| {
        let d = accepted_devices(&app, "late", 1).await.remove(0);
        let t0 = base_time();
        // On time: minute 0 has 10 and 20.
        let pts: Vec<(&str, i64, f64)> =
            vec![("temp", t0, 10.0), ("temp", t0 + 30_000, 20.0), ("temp", t0 + MIN, 40.0)];
        app.state.telemetry.write_at(&[batch(&d, 1, &pts)], t0 + MIN + 1000).await.unwrap();
        let minute = t0 - t0 % MIN;
        assert_eq!(rollup(&app, "metric_rollup_1m", &d, "temp", minute).await, Some((2, 30.0, 10.0, 20.0)));
        // An hour later a point measured inside minute 0 arrives (the device was offline).
        let w = app.state.telemetry.write_at(&[batch(&d, 2, &[("temp", t0 + 15_000, -5.0)])], t0 + HOUR).await.unwrap();
        assert_eq!((w.points, w.late), (1, 1));
        let (late, v): (i64, f64) = sqlx::query_as(
            "SELECT p.late, p.value FROM metric_points p JOIN metric_series s ON s.id = p.series_id \
             WHERE s.device_id = $1 AND p.ts = $2",
        )
        .bind(d.clone())
        .bind(t0 + 15_000)
        .fetch_one(app.db.pool())
        .await
        .unwrap();
        assert_eq!((late, v), (1, -5.0));
        assert_eq!(rollup(&app, "metric_rollup_1m", &d, "temp", minute).await, Some((3, 25.0, -5.0, 20.0)));
        assert_eq!(rollup(&app, "metric_rollup_1h", &d, "temp", t0 - t0 % HOUR).await, Some((4, 65.0, -5.0, 40.0)));
        let quarter = t0 - t0 % (15 * MIN);
        assert_eq!(rollup(&app, "metric_rollup_15m", &d, "temp", quarter).await, Some((4, 65.0, -5.0, 40.0)));
        // The series read from raw points, from 1-minute and from 1-hour rollups agree.
        let from = t0 - t0 % HOUR;
        let raw = app
            .admin(
                Method::GET,
                &format!("/api/v1/devices/{d}/metrics/temp?from={from}&to={}&step=30s", from + HOUR),
                None,
            )
            .await;
        assert_eq!(raw.status, StatusCode::OK, "{}", raw.text);
        assert_eq!(raw.body["resolution"], "raw");
        let m = app
            .admin(
                Method::GET,
                &format!("/api/v1/devices/{d}/metrics/temp?from={from}&to={}&step=1m", from + HOUR),
                None,
            )
            .await;
        assert_eq!(m.body["resolution"], "1m");
        let first = &m.body["points"][0];
        assert_eq!(
            (first["t"].as_i64(), first["count"].as_i64(), first["min"].as_f64()),
            (Some(minute), Some(3), Some(-5.0))
        );
        assert!((first["avg"].as_f64().unwrap() - 25.0 / 3.0).abs() < 1e-9);
        let h = app
            .admin(
                Method::GET,
                &format!("/api/v1/devices/{d}/metrics/temp?from={from}&to={}&step=1h", from + HOUR),
                None,
            )
            .await;
        assert_eq!(h.body["resolution"], "1h");
        assert_eq!(h.body["points"][0]["count"], 4);
        assert_eq!(h.body["points"][0]["avg"], 65.0 / 4.0);
        // The alert engine's read leaves the late point out.
        let vals =
            drover_server::telemetry::query::device_values(&app.db, &org(&app).await, None, "temp", t0, t0 + MIN)
                .await
                .unwrap();
        assert_eq!(vals[0].points, vec![(t0, 10.0), (t0 + 30_000, 20.0)]);
    });
}

async fn org(app: &TestApp) -> String {
    drover_server::ops::find_org(&app.db, None).await.unwrap()
}

#[tokio::test]
async fn retention_drops_old_data_by_the_clock_given() {
    each_backend!(|app| {
        let d = accepted_devices(&app, "ret", 1).await.remove(0);
        let now = drover_server::time::now_ms();
        let today = now - now % DAY;
        // Points 10, 3 and 0 days old (default: raw 7 days, 1m 30 days, 1h 400 days).
        let pts = [("m", today - 10 * DAY + HOUR, 1.0), ("m", today - 3 * DAY + HOUR, 2.0), ("m", today + 1000, 3.0)];
        app.state.telemetry.write_at(&[batch(&d, 1, &pts)], now).await.unwrap();
        let cfg = app.state.config.telemetry.clone();
        let cache = app.state.telemetry.cache.clone();
        let r = maintenance::run_once(&app.db, &cache, &cfg, now).await.unwrap();
        let raw: Vec<(i64,)> =
            sqlx::query_as("SELECT ts FROM metric_points ORDER BY ts").fetch_all(app.db.pool()).await.unwrap();
        assert_eq!(raw.iter().map(|r| r.0).collect::<Vec<_>>(), vec![today - 3 * DAY + HOUR, today + 1000], "{r:?}");
        assert_eq!(count(&app, "SELECT COUNT(*) FROM metric_rollup_1m").await, 3);
        // 40 days on: raw and 1-minute rollups are gone, 1-hour rollups stay.
        let later = now + 40 * DAY;
        maintenance::run_once(&app.db, &cache, &cfg, later).await.unwrap();
        assert_eq!(count(&app, "SELECT COUNT(*) FROM metric_points").await, 0);
        assert_eq!(count(&app, "SELECT COUNT(*) FROM metric_rollup_1m").await, 0);
        assert_eq!(count(&app, "SELECT COUNT(*) FROM metric_rollup_1h").await, 3);
        // New data still goes in after partitions were dropped (PostgreSQL).
        let w = app.state.telemetry.write_at(&[batch(&d, 2, &[("m", later, 4.0)])], later).await.unwrap();
        assert_eq!(w.points, 1);
        if app.db.backend() == drover_server::db::Backend::Postgres {
            let parts = maintenance::partitions(&app.db).await.unwrap();
            assert!(parts.iter().all(|p| (p + 1) * DAY > later - 7 * DAY), "{parts:?}");
            assert!(parts.contains(&(later / DAY + 2)), "partitions are made ahead: {parts:?}");
        }
        // One replica at a time: a second holder cannot take the lease before it expires.
        assert!(maintenance::take_lease(&app.db, "t", "a", now, 1000).await.unwrap());
        assert!(!maintenance::take_lease(&app.db, "t", "b", now + 500, 1000).await.unwrap());
        assert!(maintenance::take_lease(&app.db, "t", "a", now + 500, 1000).await.unwrap());
        assert!(maintenance::take_lease(&app.db, "t", "b", now + 2000, 1000).await.unwrap());
    });
}

fn nearest_rank(sorted: &[f64], p: f64) -> f64 {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Fleet statistics per bucket of `step` computed from the batches of the devices `pick`
/// selects (by index): (t, devices, mean of the devices' means, min, max, p50, p95).
fn fleet_here(batches: &[Batch], pick: impl Fn(usize) -> bool, step: i64) -> Vec<(i64, i64, f64, f64, f64, f64, f64)> {
    let mut per_bucket: std::collections::BTreeMap<i64, Vec<(f64, f64, f64)>> = Default::default();
    for (_, b) in batches.iter().enumerate().filter(|(i, _)| pick(*i)) {
        let mut per_device: std::collections::BTreeMap<i64, Vec<f64>> = Default::default();
        for p in &b.points {
            per_device.entry(p.t - p.t % step).or_default().push(p.v);
        }
        for (t, vals) in per_device {
            let mean = vals.iter().sum::<f64>() / vals.len() as f64;
            let lo = vals.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = vals.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            per_bucket.entry(t).or_default().push((mean, lo, hi));
        }
    }
    per_bucket
        .into_iter()
        .map(|(t, rows)| {
            let mut means: Vec<f64> = rows.iter().map(|r| r.0).collect();
            means.sort_by(f64::total_cmp);
            let lo = rows.iter().map(|r| r.1).fold(f64::INFINITY, f64::min);
            let hi = rows.iter().map(|r| r.2).fold(f64::NEG_INFINITY, f64::max);
            let avg = means.iter().sum::<f64>() / means.len() as f64;
            (t, means.len() as i64, avg, lo, hi, nearest_rank(&means, 50.0), nearest_rank(&means, 95.0))
        })
        .collect()
}

#[tokio::test]
async fn fleet_aggregates_match_values_computed_here() {
    each_backend!(|app| {
        let ids = accepted_devices(&app, "agg", 20).await;
        // Half the devices in Berlin, the first 5 in a static group.
        for (i, d) in ids.iter().enumerate() {
            let site = if i % 2 == 0 { "berlin" } else { "paris" };
            let r = app
                .admin(Method::PUT, &format!("/api/v1/devices/{d}/tags"), Some(json!({"tags": {"site": site}})))
                .await;
            assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        }
        let g = app.admin(Method::POST, "/api/v1/groups", Some(json!({"name": "first-five", "kind": "static"}))).await;
        let gid = g.body["id"].as_str().unwrap().to_string();
        let r =
            app.admin(Method::POST, &format!("/api/v1/groups/{gid}/devices"), Some(json!({"devices": ids[..5]}))).await;
        assert!(r.status.is_success(), "{}", r.text);
        let t0 = base_time() - base_time() % (10 * MIN);
        // Device i: in each of 3 ten-minute buckets, 4 values i*k + j.
        let mut expected: Vec<Vec<(f64, f64, f64)>> = vec![Vec::new(); 3];
        let mut batches = Vec::new();
        for (i, d) in ids.iter().enumerate() {
            let mut pts = Vec::new();
            for (k, exp) in expected.iter_mut().enumerate() {
                let vals: Vec<f64> = (0..4).map(|j| (i * (k + 1)) as f64 + j as f64 * 0.5).collect();
                for (j, v) in vals.iter().enumerate() {
                    pts.push(("cpu.percent", t0 + k as i64 * 10 * MIN + j as i64 * MIN, *v));
                }
                let mean = vals.iter().sum::<f64>() / 4.0;
                exp.push((mean, vals[0], vals[3]));
            }
            batches.push(batch(d, 1, &pts));
        }
        app.state.telemetry.write_at(&batches, t0 + 30 * MIN).await.unwrap();
        let viewer = app.token("viewer").await;
        let check = |body: &Value, subset: &dyn Fn(usize) -> bool| {
            for (k, exp) in expected.iter().enumerate() {
                let rows: Vec<&(f64, f64, f64)> =
                    exp.iter().enumerate().filter(|(i, _)| subset(*i)).map(|(_, e)| e).collect();
                let mut means: Vec<f64> = rows.iter().map(|r| r.0).collect();
                means.sort_by(f64::total_cmp);
                let b = &body["buckets"][k];
                assert_eq!(b["t"].as_i64(), Some(t0 + k as i64 * 10 * MIN), "{body}");
                assert_eq!(b["devices"].as_i64(), Some(rows.len() as i64));
                let avg = means.iter().sum::<f64>() / means.len() as f64;
                assert!((b["avg"].as_f64().unwrap() - avg).abs() < 1e-9, "bucket {k}: {b} vs {avg}");
                assert_eq!(b["min"].as_f64().unwrap(), rows.iter().map(|r| r.1).fold(f64::INFINITY, f64::min));
                assert_eq!(b["max"].as_f64().unwrap(), rows.iter().map(|r| r.2).fold(f64::NEG_INFINITY, f64::max));
                assert_eq!(b["p50"].as_f64().unwrap(), nearest_rank(&means, 50.0));
                assert_eq!(b["p95"].as_f64().unwrap(), nearest_rank(&means, 95.0));
            }
        };
        let (from, to) = (t0, t0 + 30 * MIN);
        for step in ["10m", "600s"] {
            // 10m reads the 1-minute rollups; 600s is also whole minutes. Same answer.
            let r = app
                .call(
                    Method::GET,
                    &format!("/api/v1/metrics/fleet?metric=cpu.percent&from={from}&to={to}&step={step}"),
                    Some(&viewer),
                    None,
                )
                .await;
            assert_eq!(r.status, StatusCode::OK, "{}", r.text);
            assert_eq!(r.body["devices"], 20);
            check(&r.body, &|_| true);
        }
        // Raw points: a step that is not whole minutes.
        let r = app.call(Method::GET, &format!("/api/v1/metrics/fleet?metric=cpu.percent&from={from}&to={to}&step=300s&filter=tag.site%20%3D%20%22berlin%22"), Some(&viewer), None).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        assert_eq!(r.body["devices"], 10);
        let r = app.call(Method::GET, &format!("/api/v1/metrics/fleet?metric=cpu.percent&from={from}&to={to}&step=10m&filter=tag.site%20%3D%20%22berlin%22"), Some(&viewer), None).await;
        check(&r.body, &|i| i % 2 == 0);
        let r = app
            .call(
                Method::GET,
                &format!("/api/v1/metrics/fleet?metric=cpu.percent&from={from}&to={to}&step=10m&group=first-five"),
                Some(&viewer),
                None,
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        check(&r.body, &|i| i < 5);
        // Steps of quarter hours read the 15-minute rollups (15m: one row per device and
        // bucket; 30m: two rows), whole hours the 1-hour rollups. The same statistics computed
        // here from the points, for the Berlin devices.
        let hour = t0 - t0 % HOUR;
        for (step, step_ms, resolution) in [("15m", 15 * MIN, "15m"), ("30m", 30 * MIN, "15m"), ("1h", HOUR, "1h")] {
            let path = format!(
                "/api/v1/metrics/fleet?metric=cpu.percent&from={hour}&to={}&step={step}&filter=tag.site%20%3D%20%22berlin%22",
                hour + HOUR
            );
            let r = app.call(Method::GET, &path, Some(&viewer), None).await;
            assert_eq!(r.status, StatusCode::OK, "{}", r.text);
            assert_eq!(r.body["resolution"], resolution, "{step}");
            assert_eq!(r.body["devices"], 10, "{step}");
            let want = fleet_here(&batches, |i| i % 2 == 0, step_ms);
            let got = r.body["buckets"].as_array().unwrap();
            assert_eq!(got.len(), want.len(), "{step}: {}", r.body);
            for (g, w) in got.iter().zip(&want) {
                assert_eq!(g["t"].as_i64(), Some(w.0), "{step}");
                assert_eq!(g["devices"].as_i64(), Some(w.1), "{step}");
                assert!((g["avg"].as_f64().unwrap() - w.2).abs() < 1e-9, "{step}: {g} vs {w:?}");
                assert_eq!((g["min"].as_f64(), g["max"].as_f64()), (Some(w.3), Some(w.4)), "{step}");
                assert_eq!((g["p50"].as_f64(), g["p95"].as_f64()), (Some(w.5), Some(w.6)), "{step}: {g} vs {w:?}");
            }
        }
        // Top 3 by max: the last three devices, highest first.
        let r = app
            .call(
                Method::GET,
                &format!("/api/v1/metrics/top?metric=cpu.percent&from={from}&to={to}&by=max&n=3"),
                Some(&viewer),
                None,
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        let top: Vec<&str> = r.body.as_array().unwrap().iter().map(|r| r["device_id"].as_str().unwrap()).collect();
        assert_eq!(top, [ids[19].as_str(), ids[18].as_str(), ids[17].as_str()]);
        assert_eq!(r.body[0]["value"], 19.0 * 3.0 + 1.5);
        // By last: the newest value of each device.
        let r = app
            .call(
                Method::GET,
                &format!("/api/v1/metrics/top?metric=cpu.percent&from={from}&to={to}&by=last&n=1&group=first-five"),
                Some(&viewer),
                None,
            )
            .await;
        assert_eq!(r.body[0]["device_id"], ids[4].as_str());
        assert_eq!(r.body[0]["value"], 4.0 * 3.0 + 1.5);
    });
}

/// A device past its series cap (or its organization past its own) keeps its known names;
/// new names are left out and counted per batch and in the ingest counters; the listing of a
/// device's metrics is paginated by name.
#[tokio::test]
async fn series_caps_leave_out_new_names_and_the_listing_is_paginated() {
    each_backend!(|app| {
        let d = accepted_devices(&app, "caps", 2).await;
        let cfg = drover_server::telemetry::TelemetryConfig {
            max_series_per_device: 3,
            max_series_per_org: 5,
            ..Default::default()
        };
        let ingest = drover_server::telemetry::ingest::Ingest::new(app.db.clone(), cfg);
        let t0 = base_time();
        fn pts(names: &[&'static str], t0: i64) -> Vec<(&'static str, i64, f64)> {
            names.iter().map(|n| (*n, t0, 1.0)).collect()
        }
        let a = batch(&d[0], 1, &pts(&["a1", "a2", "a3", "a4"], t0));
        let mut a2 = batch(&d[0], 2, &pts(&["a1", "a5"], t0));
        a2.points.push(Point { name: "a5".into(), t: t0 + 1, v: 2.0 });
        let w = ingest.write_at(&[a, a2], t0 + 1000).await.unwrap();
        assert_eq!(w.refused_series, vec![1, 1], "a4, then a5 over the device's cap of 3");
        assert_eq!(w.refused_series_points, 3);
        // The second device: the organization holds 3 of its 5.
        let w = ingest.write_at(&[batch(&d[1], 1, &pts(&["b1", "b2", "b3"], t0))], t0 + 1000).await.unwrap();
        assert_eq!(w.refused_series, vec![1], "b3 over the organization's cap of 5");
        // Known names keep being stored; a fresh cache (another replica, a restart) agrees.
        let other = drover_server::telemetry::ingest::Ingest::new(app.db.clone(), ingest.config().clone());
        let w =
            other.write_at(&[batch(&d[0], 3, &[("a1", t0 + 5, 3.0), ("a9", t0 + 5, 3.0)])], t0 + 1000).await.unwrap();
        assert_eq!((w.points, w.refused_series.clone()), (1, vec![1]));
        use std::sync::atomic::Ordering;
        assert_eq!(ingest.stats.refused_series.load(Ordering::Relaxed), 3);
        assert_eq!(ingest.stats.refused_series_points.load(Ordering::Relaxed), 4);
        assert_eq!(count(&app, "SELECT COUNT(*) FROM metric_series").await, 5);
        let ack = drover_server::telemetry::ingest::ack(&batch(&d[0], 9, &[]), 2);
        assert_eq!(serde_json::from_slice::<Value>(&ack.payload).unwrap(), json!({"v":1,"seq":9,"refused_series":2}));

        // The listing, two by two.
        let mut names = Vec::new();
        let mut url = format!("/api/v1/devices/{}/metrics?limit=2", d[0]);
        loop {
            let r = app.admin(Method::GET, &url, None).await;
            assert_eq!(r.status, StatusCode::OK, "{}", r.text);
            let items = r.body["items"].as_array().unwrap();
            assert!(items.len() <= 2);
            names.extend(items.iter().map(|m| m["name"].as_str().unwrap().to_string()));
            match r.body["next_cursor"].as_str() {
                Some(c) => url = format!("/api/v1/devices/{}/metrics?limit=2&cursor={c}", d[0]),
                None => break,
            }
        }
        assert_eq!(names, ["a1", "a2", "a3"]);
        // Bad input: a limit out of range, a cursor that is not one.
        let r = app.admin(Method::GET, &format!("/api/v1/devices/{}/metrics?limit=0", d[0]), None).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text);
        let r = app.admin(Method::GET, &format!("/api/v1/devices/{}/metrics?cursor=zzz", d[0]), None).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text);
    });
}

/// Values at the edge of what a double holds, stored before ingest refused them, read back as
/// numbers (JSON has no infinity: `null` broke the published schema).
#[tokio::test]
async fn aggregates_of_huge_values_stay_finite() {
    each_backend!(|app| {
        let d = accepted_devices(&app, "huge", 3).await;
        let t0 = base_time();
        let minute = t0 - t0 % MIN;
        for dev in &d {
            sqlx::query("INSERT INTO metric_series (device_id, name) VALUES ($1, 'big')")
                .bind(dev.clone())
                .execute(app.db.pool())
                .await
                .unwrap();
            sqlx::query(
                "INSERT INTO metric_rollup_1m (series_id, bucket, count, sum, min, max) \
                 SELECT id, $2, 1, 1.797e308, 1.797e308, 1.797e308 FROM metric_series WHERE device_id = $1",
            )
            .bind(dev.clone())
            .bind(minute)
            .execute(app.db.pool())
            .await
            .unwrap();
        }
        let r = app
            .admin(
                Method::GET,
                &format!("/api/v1/metrics/fleet?metric=big&from={minute}&to={}&step=1m", minute + MIN),
                None,
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        let b = &r.body["buckets"][0];
        assert_eq!(b["devices"], 3, "{}", r.body);
        for k in ["avg", "min", "max", "p50", "p95"] {
            let v = b[k].as_f64().unwrap_or_else(|| panic!("{k} is not a number: {b}"));
            assert!((v - 1.797e308).abs() < 1e300, "{k} = {v}");
        }
    });
}

#[tokio::test]
async fn bad_queries_get_clear_400s_and_roles_are_enforced() {
    each_backend!(|app| {
        let d = accepted_devices(&app, "bad", 1).await.remove(0);
        let viewer = app.token("viewer").await;
        let cases = [
            // An empty range.
            (format!("/api/v1/devices/{d}/metrics/cpu?from=now&to=now-1h"), "empty"),
            // A step under a second.
            (format!("/api/v1/devices/{d}/metrics/cpu?step=10ms"), "1s"),
            // Too many buckets.
            (format!("/api/v1/devices/{d}/metrics/cpu?from=now-30d&step=1s"), "buckets"),
            // A time that is no time.
            (format!("/api/v1/devices/{d}/metrics/cpu?from=yesterday"), "invalid from"),
            // A metric name outside the alphabet.
            (format!("/api/v1/devices/{d}/metrics/CPU%25"), "invalid metric"),
            // A filter that does not parse, and one naming no group.
            ("/api/v1/metrics/fleet?metric=cpu&filter=tag.site%20%3D%3D".into(), "invalid filter"),
            ("/api/v1/metrics/fleet?metric=cpu&filter=group%20%3D%20%22nope%22".into(), "no group"),
            // Group and filter at once; an unknown parameter; n out of range; an unknown ranking.
            ("/api/v1/metrics/fleet?metric=cpu&group=a&filter=id%20%3D%20%22x%22".into(), "not both"),
            ("/api/v1/metrics/fleet?metric=cpu&bucket=5m".into(), "unknown field"),
            ("/api/v1/metrics/top?metric=cpu&n=0".into(), "invalid n"),
            ("/api/v1/metrics/top?metric=cpu&by=median".into(), "invalid query"),
        ];
        for (path, want) in cases {
            let r = app.call(Method::GET, &path, Some(&viewer), None).await;
            assert_eq!(r.status, StatusCode::BAD_REQUEST, "{path}: {}", r.text);
            let msg = r.body["error"]["message"].as_str().unwrap_or_default();
            assert!(msg.contains(want), "{path}: {msg:?} should say {want:?}");
        }
        let r = app.call(Method::GET, "/api/v1/metrics/fleet?metric=cpu&group=nope", Some(&viewer), None).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.text);
        let r = app.call(Method::GET, "/api/v1/devices/nope/metrics", Some(&viewer), None).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.text);
        // Logs on demand need the operator role; a viewer is refused and nothing is recorded.
        let op = app.token("operator").await;
        let before = app.audit_count().await;
        let r = app
            .call(Method::POST, &format!("/api/v1/devices/{d}/logs"), Some(&viewer), Some(json!({"source": "journal"})))
            .await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.text);
        // An operator asking for a source outside the protocol, or an offline device.
        let r = app
            .call(Method::POST, &format!("/api/v1/devices/{d}/logs"), Some(&op), Some(json!({"source": "/etc/shadow"})))
            .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text);
        let r = app
            .call(Method::POST, &format!("/api/v1/devices/{d}/logs"), Some(&op), Some(json!({"source": "journal"})))
            .await;
        assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.text);
        assert!(r.text.contains("offline"), "{}", r.text);
        assert_eq!(app.audit_count().await, before);
        // Prometheus: a viewer token reads fleet aggregates; no token, no answer.
        let r = app.call(Method::GET, "/metrics/fleet", None, None).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED);
        let r = app.call(Method::GET, "/metrics/fleet", Some(&viewer), None).await;
        assert_eq!(r.status, StatusCode::OK);
        assert!(r.text.contains("drover_telemetry_points_total"), "{}", r.text);
    });
}

// ------------------------------------------------------------------ end to end

mod e2e {
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};

    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::mqttbytes::v5::Packet;
    use rumqttc::v5::{AsyncClient, Event, MqttOptions};
    use rumqttc::{TlsConfiguration, Transport};
    use serde_json::{Value, json};

    use crate::e2e::get_json;
    use crate::fleet::{DeviceKey, Droverd, admin_token, client_tls, droverd_cli, enroll_https, post};
    use crate::support::{TempDir, agent_bin, eventually};

    /// Points of a device's metric as the API returns them (raw, 1 s buckets).
    fn points(base: &str, token: &str, id: &str, metric: &str, from: i64, to: i64) -> Vec<(i64, f64)> {
        let mut out = Vec::new();
        let mut start = from;
        while start < to {
            let end = (start + 3_000_000).min(to);
            let (s, v) = get_json(
                &format!("{base}/api/v1/devices/{id}/metrics/{metric}?from={start}&to={end}&step=1s"),
                Some(token),
            );
            assert_eq!(s, 200, "{v}");
            for p in v["points"].as_array().unwrap() {
                assert_eq!(p["count"], 1, "one point per second at most: {p}");
                out.push((p["t"].as_i64().unwrap(), p["avg"].as_f64().unwrap()));
            }
            start = end;
        }
        out
    }

    #[tokio::test]
    async fn batches_through_the_real_broker_are_stored_once_and_acked_after_commit() {
        let dir = TempDir::new("telemetry-e2e");
        let data = dir.path().join("data");
        let server = Droverd::start(&data, None, &[]);
        let token = admin_token(&data);
        let ca_pem = droverd_cli(&data, &["ca", "cert"]);
        let base = server.base.clone();
        let (status, t) = post(&base, "/api/v1/enrollment-tokens", &token, json!({"name": "t", "max_uses": 1}));
        assert_eq!(status, 201, "{t}");
        let secret = t["secret"].as_str().unwrap().to_string();
        let key = DeviceKey::new();
        let key_pem = key.key.serialize_pem();
        let (dev, ca) = (server.dev, ca_pem.clone());
        let (id, cert) =
            tokio::task::spawn_blocking(move || enroll_https(dev, &ca, &key, "SN-T1", &secret)).await.unwrap();

        let mut opts = MqttOptions::new(id.clone(), "localhost", server.mqtt);
        opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(client_tls(&ca_pem, &cert, &key_pem))));
        let (client, mut events) = AsyncClient::new(opts, 64);
        client.subscribe(format!("drover/v1/d/{id}/down/#"), QoS::AtLeastOnce).await.unwrap();
        let now = drover_server::time::now_ms();
        let up = format!("drover/v1/d/{id}/up/telemetry");
        // Bad input: a batch with a metric name outside the alphabet is refused, never acked.
        let bad = json!({"v":1,"seq":1,"points":[{"n":"CPU!","t":now,"v":1.0}]});
        client.publish(&up, QoS::AtLeastOnce, false, bad.to_string()).await.unwrap();
        // Bad input: a batch within every per-field limit (2,000 points, 100 events of 1 KiB)
        // but over the largest message, 256 KiB (342 KB before the limit was enforced), and
        // one with a value JSON aggregates cannot carry, are refused and never acked.
        let long = "m".repeat(64);
        let big = json!({"v":1,"seq":1,
            "points": (0..2000).map(|i| json!({"n": long, "t": now - 1000 - i, "v": 1.2345678901234567e-300})).collect::<Vec<_>>(),
            "events": (0..100).map(|i| json!({"id": format!("e{i}"), "t": now, "name": "x", "severity": "info",
                "data": {"d": "x".repeat(1000)}})).collect::<Vec<_>>()})
        .to_string();
        assert!(big.len() > 256 * 1024 && big.len() < 1024 * 1024, "{}", big.len());
        client.publish(&up, QoS::AtLeastOnce, false, big).await.unwrap();
        let huge = json!({"v":1,"seq":1,"points":[{"n":"huge","t":now,"v":1.797e308}]});
        client.publish(&up, QoS::AtLeastOnce, false, huge.to_string()).await.unwrap();
        // Five good batches of 100 points, then batch 3 again (its ack "lost").
        let batch = |seq: i64| {
            let pts: Vec<Value> = (0..100)
                .map(|i| json!({"n":"load","t": now - 700_000 + (seq * 100 + i) * 1000, "v": (seq * 100 + i) as f64}))
                .collect();
            json!({"v":1,"seq":seq + 1,"points":pts,"dropped":7}).to_string()
        };
        for seq in 1..=5 {
            client.publish(&up, QoS::AtLeastOnce, false, batch(seq)).await.unwrap();
        }
        client.publish(&up, QoS::AtLeastOnce, false, batch(3)).await.unwrap();
        let mut acks = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !acks.contains(&6) {
            assert!(Instant::now() < deadline, "acks so far: {acks:?}");
            let ev = tokio::time::timeout(Duration::from_secs(30), events.poll()).await.unwrap().unwrap();
            if let Event::Incoming(Packet::Publish(p)) = ev {
                assert!(p.topic.ends_with(b"/down/telemetry"), "{:?}", p.topic);
                let v: Value = serde_json::from_slice(&p.payload).unwrap();
                acks.push(v["seq"].as_i64().unwrap());
                // Acked means stored: the points of every batch up to seq are in the API now.
                let (b, tk, dev_id) = (base.clone(), token.clone(), id.clone());
                let seq = v["seq"].as_i64().unwrap();
                let n = tokio::task::spawn_blocking(move || points(&b, &tk, &dev_id, "load", now - 700_000, now).len())
                    .await
                    .unwrap();
                assert!(n as i64 >= (seq - 1) * 100, "ack {seq} with only {n} points stored");
            }
        }
        assert!(!acks.contains(&1), "a refused batch was acked: {acks:?}");
        let (s, m) = get_json(&format!("{base}/api/v1/devices/{id}/metrics"), Some(&token));
        assert_eq!(s, 200, "{m}");
        let names: Vec<&str> = m["items"].as_array().unwrap().iter().map(|x| x["name"].as_str().unwrap()).collect();
        assert!(!names.iter().any(|n| n.starts_with("mmm") || *n == "huge"), "refused batches stored: {names:?}");
        // Every stored batch has its own ack: a device reads an ack as covering that batch
        // only, so an ack for the highest alone would leave the others resent for ever.
        for seq in 2..=6 {
            assert!(acks.contains(&seq), "batch {seq} never acknowledged: {acks:?}");
        }
        let (b, tk, dev_id) = (base.clone(), token.clone(), id.clone());
        let pts =
            tokio::task::spawn_blocking(move || points(&b, &tk, &dev_id, "load", now - 700_000, now)).await.unwrap();
        assert_eq!(pts.len(), 500);
        assert!(pts.windows(2).all(|w| w[1].0 - w[0].0 == 1000 && w[1].1 - w[0].1 == 1.0));
        let (s, m) = get_json(&format!("{base}/api/v1/devices/{id}/metrics"), Some(&token));
        assert_eq!(s, 200);
        let dropped = m["items"].as_array().unwrap().iter().find(|x| x["name"] == "drover.outbox.dropped").unwrap();
        assert_eq!(dropped["last_value"], 7.0);

        // Bad input: points stamped a day ahead (a clock set wrong), at 1970 (a clock never
        // set) and eight days back (before the raw retention) are left out; the batch is
        // stored and acknowledged — naming what was left out — so the device does not resend
        // it for ever.
        let day = 86_400_000;
        let skewed = json!({"v":1,"seq":7,"points":[
            {"n":"clock","t":now,"v":1.0},
            {"n":"clock","t":now + day,"v":2.0},
            {"n":"clock","t":1000,"v":3.0},
            {"n":"clock","t":now - 8 * day,"v":4.0},
        ]});
        client.publish(&up, QoS::AtLeastOnce, false, skewed.to_string()).await.unwrap();
        let ack = loop {
            assert!(Instant::now() < deadline + Duration::from_secs(30), "no ack for the skewed batch");
            let ev = tokio::time::timeout(Duration::from_secs(30), events.poll()).await.unwrap().unwrap();
            if let Event::Incoming(Packet::Publish(p)) = ev {
                let v: Value = serde_json::from_slice(&p.payload).unwrap();
                if v["seq"] == 7 {
                    break v;
                }
            }
        };
        assert_eq!(ack, json!({"v":1,"seq":7,"refused_future":1,"refused_old":2}));
        let url = format!("{base}/api/v1/devices/{id}/metrics/clock?from=0&to={}&step=30d", now + 2 * day);
        let tk = token.clone();
        let (s, v) = tokio::task::spawn_blocking(move || get_json(&url, Some(&tk))).await.unwrap();
        assert_eq!(s, 200, "{v}");
        let stored: Vec<(i64, f64)> = v["points"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| (p["count"].as_i64().unwrap(), p["max"].as_f64().unwrap()))
            .collect();
        assert_eq!(stored, vec![(1, 1.0)], "only the point inside the window is stored: {v}");
        let metrics = crate::e2e::agent()
            .get(&format!("{base}/metrics/fleet"))
            .header("authorization", &format!("Bearer {token}"))
            .call()
            .unwrap()
            .into_body()
            .read_to_string()
            .unwrap();
        assert!(metrics.contains("drover_telemetry_refused_points_total{reason=\"future\"} 1"), "{metrics}");
        assert!(metrics.contains("drover_telemetry_refused_points_total{reason=\"too_old\"} 2"), "{metrics}");
        assert!(metrics.contains("drover_telemetry_refused_points_total{reason=\"series_limit\"} 0"), "{metrics}");
        assert!(metrics.contains("drover_telemetry_refused_series_total 0"), "{metrics}");
        drop(server);
    }

    struct AgentProc(Child);

    impl Drop for AgentProc {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    /// A real agent measuring every second, offline for ten real minutes while droverd is
    /// stopped, then reconnected: every second of the outage arrives, in order, with its own
    /// timestamp, marked late; nothing is lost or doubled.
    #[tokio::test]
    async fn a_device_offline_ten_minutes_loses_no_point() {
        let outage = Duration::from_secs(
            std::env::var("DROVER_TEST_OUTAGE_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(600),
        );
        let dir = TempDir::new("telemetry-offline");
        let data = dir.path().join("data");
        let mut server = Droverd::start(&data, None, &[]);
        let token = admin_token(&data);
        let ca_pem = droverd_cli(&data, &["ca", "cert"]);
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, &ca_pem).unwrap();
        let base = server.base.clone();
        let (status, t) = post(&base, "/api/v1/enrollment-tokens", &token, json!({"name": "t", "max_uses": 1}));
        assert_eq!(status, 201, "{t}");
        let secret = t["secret"].as_str().unwrap();
        let adir = dir.path().join("agent");
        std::fs::create_dir_all(&adir).unwrap();
        let adata = adir.join("data");
        let cfg = adir.join("agent.toml");
        std::fs::write(
            &cfg,
            format!(
                "server_url = \"https://localhost:{dev}\"\nmqtt_url = \"mqtts://localhost:{mqtt}\"\nca_file = {ca_file:?}\n\
                 data_dir = {adata:?}\nenrollment_token = \"{secret}\"\nkeepalive_secs = 10\nlog_level = \"debug\"\n\
                 [identity]\nserial = \"offline-1\"\n[telemetry]\ninterval_s = 1\n",
                dev = server.dev,
                mqtt = server.mqtt,
            ),
        )
        .unwrap();
        let log = std::fs::File::create(adir.join("agent.log")).unwrap();
        let _agent = AgentProc(
            Command::new(agent_bin())
                .args(["run", "--config"])
                .arg(&cfg)
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap(),
        );
        let json_path = adata.join("device.json");
        let id = eventually(Duration::from_secs(60), "the agent to enroll", || {
            let v: Value = serde_json::from_slice(&std::fs::read(&json_path).ok()?).ok()?;
            v["device_id"].as_str().map(str::to_string)
        });
        let metric = "mem.used_percent";
        let start = drover_server::time::now_ms();
        let (b, tk, d) = (base.clone(), token.clone(), id.clone());
        let agent_log = adir.join("agent.log");
        tokio::task::spawn_blocking(move || {
            eventually(Duration::from_secs(60), "points stored before the outage", || {
                let n = points(&b, &tk, &d, metric, start - 60_000, drover_server::time::now_ms() + 1000).len();
                (n >= 5).then_some(())
            })
        })
        .await
        .unwrap_or_else(|_| panic!("{}", std::fs::read_to_string(&agent_log).unwrap_or_default()));

        server.stop();
        let down_at = drover_server::time::now_ms();
        tokio::time::sleep(outage).await;
        let up_at = drover_server::time::now_ms();
        server.restart();
        let base = server.base.clone();

        // Wait until the newest points are in: the outbox has been sent. After ten minutes of
        // refused connections the agent's reconnect backoff (full jitter, ceiling 300 s) may
        // wait up to five minutes before its next attempt, as a device in the field would.
        let (b, tk, d) = (base.clone(), token.clone(), id.clone());
        let pts = tokio::task::spawn_blocking(move || {
            eventually(Duration::from_secs(300 + 180), "the outbox to be delivered", || {
                let now = drover_server::time::now_ms();
                let pts = points(&b, &tk, &d, metric, start - 60_000, now + 1000);
                (pts.last().is_some_and(|p| p.0 > up_at + 5_000)).then_some(pts)
            })
        })
        .await
        .unwrap();
        // A point for every second across the outage: no gap longer than two intervals.
        let span: Vec<i64> = pts.iter().map(|p| p.0).filter(|t| *t >= start).collect();
        let gaps: Vec<(i64, i64)> = span.windows(2).filter(|w| w[1] - w[0] > 2_100).map(|w| (w[0], w[1])).collect();
        assert!(gaps.is_empty(), "gaps in the series (ms): {gaps:?}");
        let during = span.iter().filter(|t| **t > down_at && **t < up_at).count() as u64;
        let secs = (up_at - down_at) as u64 / 1000;
        assert!(during + 3 >= secs && during <= secs + 1, "{during} points in a {secs} s outage");
        // Timestamps are the device's own: strictly increasing, and the outage's are late.
        assert!(span.windows(2).all(|w| w[1] > w[0]));
        // In droverd's database, the outage's points are marked late, the others not.
        use sqlx::Connection as _;
        sqlx::any::install_default_drivers();
        let url = format!("sqlite://{}?mode=ro", data.join("drover.db").display());
        let mut conn = sqlx::AnyConnection::connect(&url).await.unwrap();
        let (late, on_time): (i64, i64) = sqlx::query_as(
            "SELECT COALESCE(SUM(CASE WHEN p.late = 1 THEN 1 ELSE 0 END), 0), \
             COALESCE(SUM(CASE WHEN p.late = 0 THEN 1 ELSE 0 END), 0) FROM metric_points p \
             JOIN metric_series s ON s.id = p.series_id WHERE s.device_id = $1 AND s.name = $2 AND p.ts > $3 AND p.ts < $4",
        )
        .bind(id.clone())
        .bind(metric)
        .bind(down_at + 1000)
        .bind(up_at - 130_000)
        .fetch_one(&mut conn)
        .await
        .unwrap();
        assert!(late > 0 && on_time == 0, "late {late}, on time {on_time}");
        drop(server);
    }
}

// ------------------------------------------------------------------ measurements

/// This process's CPU time (user + system, all threads, the SQLite workers included), seconds.
fn process_cpu_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    // Fields after the command name (which may hold spaces) start at field 3.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
    // CLK_TCK is 100 on every Linux this runs on.
    ticks / 100.0
}

/// The write path's cost per point, shaped like `scripts/bench-telemetry.sh`'s fleet: DEVICES
/// (1000) devices × METRICS (100) metrics, one batch per device per second, SECS (20) seconds,
/// written in transactions of the writer's size (50,000 points). A measurement, not a check;
/// run it by name:
/// `cargo test --release -p drover-server --test it -- --ignored --nocapture telemetry::ingest_cost`
#[tokio::test]
#[ignore = "a measurement, not a check; run it by name"]
async fn ingest_cost() {
    let env = |k: &str, d: usize| std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(d);
    let (devices, metrics, secs) = (env("DEVICES", 1000), env("METRICS", 100), env("SECS", 20));
    each_backend!(|app| {
        let names: Vec<String> = (0..metrics).map(|m| format!("bench.m{m:03}")).collect();
        let t0 = drover_server::time::now_ms() - secs as i64 * 1000;
        let second = |s: usize| -> Vec<Batch> {
            (0..devices)
                .map(|d| Batch {
                    device_id: format!("bench-{d:05}"),
                    seq: s as u64 + 1,
                    points: names
                        .iter()
                        .enumerate()
                        .map(|(i, n)| Point {
                            name: n.clone(),
                            t: t0 + s as i64 * 1000 + d as i64 % 1000,
                            v: (d + i + s) as f64,
                        })
                        .collect(),
                    events: Vec::new(),
                    dropped: 0,
                    refused_future: 0,
                    refused_old: 0,
                })
                .collect()
        };
        let per_tx = (50_000 / metrics).max(1);
        // Second 0 makes the series; not measured.
        for group in second(0).chunks(per_tx) {
            app.state.telemetry.write_at(group, t0 + 1000).await.unwrap();
        }
        let (mut cpu, mut wall, mut stored) = (0.0, 0.0, 0u64);
        for s in 1..secs {
            let batches = second(s);
            let (c0, w0) = (process_cpu_secs(), std::time::Instant::now());
            for group in batches.chunks(per_tx) {
                stored += app.state.telemetry.write_at(group, t0 + s as i64 * 1000 + 1000).await.unwrap().points;
            }
            cpu += process_cpu_secs() - c0;
            wall += w0.elapsed().as_secs_f64();
        }
        // A second sent again (acks lost) stores nothing.
        let again = second(secs / 2);
        let w = app.state.telemetry.write_at(&again[..per_tx.min(again.len())], t0 + secs as i64 * 1000).await.unwrap();
        assert_eq!(w.points, 0);
        assert_eq!(stored, (devices * metrics * (secs - 1)) as u64);
        eprintln!(
            "{}: {stored} points in {wall:.2} s ({:.0} points/s); CPU {:.3} s per 100,000 points ({:.0} points per CPU second)",
            app.label,
            stored as f64 / wall,
            cpu * 100_000.0 / stored as f64,
            stored as f64 / cpu
        );
    });
}
