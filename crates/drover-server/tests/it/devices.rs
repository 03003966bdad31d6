//! Enrollment and the device registry through the API, on every backend: by enrollment
//! token, by pre-authorization, by an operator's acceptance; and the refusals.

use axum::http::{Method, StatusCode};
use serde_json::{Value, json};

use crate::each_backend;
use crate::support::{TestApp, hello};

/// A device's key and CSR, made the way an agent makes them.
pub(crate) fn device_csr() -> String {
    let key = rcgen::KeyPair::generate().unwrap();
    rcgen::CertificateParams::default().serialize_request(&key).unwrap().pem().unwrap()
}

pub(crate) async fn enroll(app: &TestApp, csr: &str, identity: Value, token: Option<&str>) -> crate::support::Resp {
    let mut body = json!({"csr_pem": csr, "identity": identity});
    if let Some(t) = token {
        body["token"] = json!(t);
    }
    app.call(Method::POST, "/api/v1/enroll", None, Some(body)).await
}

#[tokio::test]
async fn enrollment_by_token_is_zero_touch_and_limited() {
    each_backend!(|app| {
        let operator = app.token("operator").await;
        let r = app
            .call(
                Method::POST,
                "/api/v1/enrollment-tokens",
                Some(&operator),
                Some(
                    json!({"name": "factory line 3", "max_uses": 2, "expires_in_days": 30, "tags": {"site": "berlin"}}),
                ),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        let secret = r.body["secret"].as_str().unwrap().to_string();
        let token_id = r.body["token"]["id"].as_str().unwrap().to_string();
        assert!(secret.starts_with("dre_"));
        // An enrollment token is not an API token.
        assert_eq!(app.call(Method::GET, "/api/v1/me", Some(&secret), None).await.status, StatusCode::UNAUTHORIZED);

        let r = enroll(&app, &device_csr(), json!({"serial": "SN-1", "mac": "02:00:00:00:00:01"}), Some(&secret)).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        assert_eq!(r.body["status"], "accepted");
        assert!(r.body["certificate_pem"].as_str().unwrap().starts_with("-----BEGIN CERTIFICATE-----"));
        assert_eq!(r.body["ca_pem"].as_str().unwrap(), app.state.ca.cert_pem());
        let id = r.body["device_id"].as_str().unwrap().to_string();
        let d = app.admin(Method::GET, &format!("/api/v1/devices/{id}"), None).await;
        assert_eq!(d.body["status"], "accepted");
        assert_eq!(d.body["tags"]["site"], "berlin", "the token's tags");
        assert_eq!(d.body["enrolled_via"], "token:factory line 3");
        assert!(d.body["certificate_expires_at"].is_string());

        assert_eq!(enroll(&app, &device_csr(), json!({"serial": "SN-2"}), Some(&secret)).await.status, StatusCode::OK);
        let r = enroll(&app, &device_csr(), json!({"serial": "SN-3"}), Some(&secret)).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.text);
        assert!(r.text.contains("used up (2 of 2 uses)"), "{}", r.text);
        let tokens = app.call(Method::GET, "/api/v1/enrollment-tokens", Some(&operator), None).await;
        assert_eq!(tokens.body["items"][0]["uses"], 2);
        assert!(!tokens.text.contains(&secret));

        let r = enroll(&app, &device_csr(), json!({"serial": "SN-4"}), Some("dre_nonsense")).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED);
        let r = app.call(Method::DELETE, &format!("/api/v1/enrollment-tokens/{token_id}"), Some(&operator), None).await;
        assert!(r.body["revoked_at"].is_string());

        // A prefix with '_' matches literally.
        let audit = app.admin(Method::GET, "/api/v1/audit?action=enrollment_token.", None).await;
        let actions: Vec<&str> =
            audit.body["items"].as_array().unwrap().iter().map(|e| e["action"].as_str().unwrap()).collect();
        assert_eq!(actions, ["enrollment_token.revoke", "enrollment_token.create"]);

        let audit = app.admin(Method::GET, "/api/v1/audit?action=device.enroll", None).await;
        let entries = audit.body["items"].as_array().unwrap();
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0]["actor"]["kind"], "device");
        assert_eq!(entries[0]["source"], "local");
    });
}

#[tokio::test]
async fn enrollment_by_preauthorization_and_by_acceptance() {
    each_backend!(|app| {
        let operator = app.token("operator").await;
        let r = app
            .call(
                Method::POST,
                "/api/v1/devices/preauthorize",
                Some(&operator),
                Some(json!({"identities": [{"serial": "SN-P1"}, {"serial": "SN-P2", "mac": "02:00:00:00:00:02"}]})),
            )
            .await;
        assert_eq!(r.body, json!({"added": 2, "already": 0}), "{}", r.text);
        let again = app
            .call(
                Method::POST,
                "/api/v1/devices/preauthorize",
                Some(&operator),
                Some(json!({"identities": [{"serial": "SN-P1"}]})),
            )
            .await;
        assert_eq!(again.body, json!({"added": 0, "already": 1}));

        let r = enroll(&app, &device_csr(), json!({"serial": "SN-P1"}), None).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        assert_eq!(r.body["status"], "accepted");

        // Unknown to Drover: it waits, and asking again with the same key tells the same.
        let csr = device_csr();
        let r = enroll(&app, &csr, json!({"serial": "SN-NEW"}), None).await;
        assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
        assert_eq!(r.body["status"], "pending");
        assert_eq!(r.body["retry_after_secs"], 60);
        assert!(r.body.get("certificate_pem").is_none());
        let id = r.body["device_id"].as_str().unwrap().to_string();
        let again = enroll(&app, &csr, json!({"serial": "SN-NEW"}), None).await;
        assert_eq!((again.status, again.body["device_id"].as_str()), (StatusCode::ACCEPTED, Some(id.as_str())));
        let pending = app.call(Method::GET, "/api/v1/devices?status=pending", Some(&operator), None).await;
        assert_eq!(pending.body["items"].as_array().unwrap().len(), 1);

        let r = app.call(Method::POST, &format!("/api/v1/devices/{id}/accept"), Some(&operator), None).await;
        assert_eq!(r.body["status"], "accepted", "{}", r.text);
        assert_eq!(r.body["enrolled_via"], "accepted:operator token");
        let done = enroll(&app, &csr, json!({"serial": "SN-NEW"}), None).await;
        assert_eq!(done.status, StatusCode::OK);
        assert!(done.body["certificate_pem"].is_string());

        // A rejected device stays rejected.
        let csr2 = device_csr();
        let r = enroll(&app, &csr2, json!({"serial": "SN-ROGUE"}), None).await;
        let rogue = r.body["device_id"].as_str().unwrap().to_string();
        let r = app.call(Method::POST, &format!("/api/v1/devices/{rogue}/reject"), Some(&operator), None).await;
        assert_eq!(r.body["status"], "rejected");
        let r = enroll(&app, &csr2, json!({"serial": "SN-ROGUE"}), None).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN);
        assert!(r.text.contains("rejected by an operator"));
        let r = app.call(Method::POST, &format!("/api/v1/devices/{rogue}/accept"), Some(&operator), None).await;
        assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.text);

        // Decommissioned: the key is done for; the hardware may come back with a new key.
        let r = app.call(Method::POST, &format!("/api/v1/devices/{id}/decommission"), Some(&operator), None).await;
        assert_eq!(r.body["status"], "decommissioned");
        let r = enroll(&app, &csr, json!({"serial": "SN-NEW"}), None).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN);
        let r = enroll(&app, &device_csr(), json!({"serial": "SN-NEW"}), None).await;
        assert_eq!(r.status, StatusCode::ACCEPTED, "a replacement may ask again: {}", r.text);

        let actions: Vec<String> =
            app.admin(Method::GET, "/api/v1/audit?action=device.&limit=100", None).await.body["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["action"].as_str().unwrap().to_string())
                .collect();
        for a in ["device.preauthorize", "device.enroll", "device.accept", "device.reject", "device.decommission"] {
            assert!(actions.iter().any(|x| x == a), "{a} in {actions:?}");
        }
    });
}

/// Tried: an identity enrolled already under another key, the same key with another identity,
/// a malformed CSR, a CSR with a flipped byte, no identity, unknown fields.
#[tokio::test]
async fn duplicate_identities_and_malformed_requests_are_refused_clearly() {
    each_backend!(|app| {
        let csr = device_csr();
        let first = enroll(&app, &csr, json!({"serial": "SN-D"}), None).await;
        assert_eq!(first.status, StatusCode::ACCEPTED);
        let r = enroll(&app, &device_csr(), json!({"serial": "SN-D"}), None).await;
        assert_eq!(r.status, StatusCode::CONFLICT);
        assert!(r.text.contains("waiting for an operator"), "{}", r.text);
        assert!(!r.text.contains(first.body["device_id"].as_str().unwrap()), "names no other device: {}", r.text);
        let r = enroll(&app, &csr, json!({"serial": "SN-OTHER"}), None).await;
        assert_eq!(r.status, StatusCode::CONFLICT);

        let r = enroll(
            &app,
            "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
            json!({"serial": "x"}),
            None,
        )
        .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        assert!(r.text.contains("invalid certificate signing request"), "{}", r.text);
        let mut lines: Vec<String> = device_csr().lines().map(str::to_string).collect();
        let mid = lines.len() - 2;
        let flipped: String = lines[mid].chars().rev().collect();
        lines[mid] = flipped;
        let r = enroll(&app, &lines.join("\n"), json!({"serial": "SN-T"}), None).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text);
        let r = enroll(&app, &device_csr(), json!({}), None).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        assert!(r.text.contains("identity"));
        let r = app
            .call(
                Method::POST,
                "/api/v1/enroll",
                None,
                Some(json!({"csr_pem": csr, "identity": {"serial": "SN-D"}, "org": "x"})),
            )
            .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        let devices = app.admin(Method::GET, "/api/v1/devices", None).await;
        assert_eq!(devices.body["items"].as_array().unwrap().len(), 1, "nothing else was created");
    });
}

/// Presence as the MQTT ingest reports it: transitions make events, repeats do not; an
/// inventory replaces the attribute set; a decommissioned device's traffic changes nothing
/// and it may not connect.
#[tokio::test]
async fn presence_is_recorded_for_accepted_devices_only() {
    use drover_server::presence;
    use std::collections::BTreeMap;
    each_backend!(|app| {
        let operator = app.token("operator").await;
        app.call(
            Method::POST,
            "/api/v1/devices/preauthorize",
            Some(&operator),
            Some(json!({"identities": [{"serial": "SN-PR"}]})),
        )
        .await;
        let r = enroll(&app, &device_csr(), json!({"serial": "SN-PR"}), None).await;
        let id = r.body["device_id"].as_str().unwrap().to_string();
        let db = &app.db;
        assert!(presence::device_may_connect(db, &id).await.unwrap());
        assert!(!presence::device_may_connect(db, "no-such-device").await.unwrap());

        let events = |db: drover_server::db::Db, id: String| async move {
            let rows: Vec<(String, String)> =
                sqlx::query_as("SELECT kind, detail FROM device_events WHERE device_id = $1 ORDER BY at, id")
                    .bind(id)
                    .fetch_all(db.pool())
                    .await
                    .unwrap();
            rows
        };
        presence::record_status(db, &id, true, 1_000).await.unwrap();
        presence::record_status(db, &id, true, 2_000).await.unwrap(); // a repeat: no event
        presence::record_heartbeat(db, &id, 3_000).await.unwrap();
        presence::record_status(db, &id, false, 4_000).await.unwrap();
        presence::record_heartbeat(db, &id, 5_000).await.unwrap(); // alive again: online
        let kinds: Vec<String> = events(db.clone(), id.clone()).await.into_iter().map(|e| e.0).collect();
        assert_eq!(kinds, ["connected", "disconnected", "connected"]);
        let (online, last_seen, connected): (i64, Option<i64>, Option<i64>) =
            sqlx::query_as("SELECT online, last_seen_at, connected_at FROM devices WHERE id = $1")
                .bind(id.clone())
                .fetch_one(db.pool())
                .await
                .unwrap();
        assert_eq!((online, last_seen, connected), (1, Some(5_000), Some(5_000)));
        // A burst recorded in one transaction: an unknown device in it changes nothing, and a
        // device marked offline is online again from its first heartbeat of the batch.
        presence::record_status(db, &id, false, 5_500).await.unwrap();
        let beats = [(id.clone(), 5_600), ("no-such-device".to_string(), 5_600), (id.clone(), 5_700)];
        presence::record_heartbeats(db, &beats).await.unwrap();
        let kinds: Vec<String> = events(db.clone(), id.clone()).await.into_iter().map(|e| e.0).collect();
        assert_eq!(kinds, ["connected", "disconnected", "connected", "disconnected", "connected"]);
        let (online, last_seen): (i64, Option<i64>) =
            sqlx::query_as("SELECT online, last_seen_at FROM devices WHERE id = $1")
                .bind(id.clone())
                .fetch_one(db.pool())
                .await
                .unwrap();
        assert_eq!((online, last_seen), (1, Some(5_700)));

        presence::record_hello(db, &id, &hello("drover-agent/0.1.0", "boot-a"), 6_000).await.unwrap();
        presence::record_hello(db, &id, &hello("drover-agent/0.1.0", "boot-a"), 6_500).await.unwrap();
        presence::record_hello(db, &id, &hello("drover-agent/0.2.0", "boot-b"), 7_000).await.unwrap();
        let ev = events(db.clone(), id.clone()).await;
        assert_eq!(ev.iter().filter(|e| e.0 == "rebooted").count(), 1, "{ev:?}");
        assert!(ev.last().unwrap().1.contains("0.2.0"));

        let inv = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
        };
        presence::record_inventory(db, &id, &inv(&[("arch", "aarch64"), ("os", "debian 12"), ("disk", "8G")]), 8_000)
            .await
            .unwrap();
        presence::record_inventory(db, &id, &inv(&[("arch", "aarch64"), ("os", "debian 13")]), 9_000).await.unwrap();
        presence::record_inventory(db, &id, &inv(&[("arch", "aarch64"), ("os", "debian 13")]), 9_500).await.unwrap();
        let attrs: Vec<(String, String)> =
            sqlx::query_as("SELECT key, value FROM device_attributes WHERE device_id = $1 ORDER BY key")
                .bind(id.clone())
                .fetch_all(db.pool())
                .await
                .unwrap();
        assert_eq!(attrs, [("arch".to_string(), "aarch64".to_string()), ("os".into(), "debian 13".into())]);
        let ev = events(db.clone(), id.clone()).await;
        let inv_events: Vec<&(String, String)> = ev.iter().filter(|e| e.0 == "inventory changed").collect();
        assert_eq!(inv_events.len(), 2, "an unchanged inventory makes no event: {ev:?}");
        assert_eq!(inv_events[1].1, "~os -disk (2 changes)");
        // An invalid inventory (a key with a space) is refused, not stored.
        assert!(presence::record_inventory(db, &id, &inv(&[("bad key", "x")]), 9_600).await.is_err());
        // Telemetry is not audited.
        let audit = app.admin(Method::GET, &format!("/api/v1/audit?target_id={id}"), None).await;
        assert_eq!(audit.body["items"].as_array().unwrap().len(), 1, "only the enrollment: {}", audit.text);

        // Decommissioned: its traffic is ignored, and the broker must refuse it.
        app.call(Method::POST, &format!("/api/v1/devices/{id}/decommission"), Some(&operator), None).await;
        assert!(!presence::device_may_connect(db, &id).await.unwrap());
        let before = events(db.clone(), id.clone()).await.len();
        presence::record_status(db, &id, false, 10_000).await.unwrap();
        presence::record_hello(db, &id, &hello("x", "boot-c"), 10_000).await.unwrap();
        presence::record_inventory(db, &id, &inv(&[("arch", "x86_64")]), 10_000).await.unwrap();
        presence::record_heartbeat(db, &id, 11_000).await.unwrap();
        assert_eq!(events(db.clone(), id.clone()).await.len(), before);
        let (last_seen,): (Option<i64>,) = sqlx::query_as("SELECT last_seen_at FROM devices WHERE id = $1")
            .bind(id.clone())
            .fetch_one(db.pool())
            .await
            .unwrap();
        assert_eq!(last_seen, Some(9_500), "unchanged");
        // Unknown and pending devices are ignored too.
        presence::record_status(db, "no-such-device", true, 1).await.unwrap();
        let p = enroll(&app, &device_csr(), json!({"serial": "SN-PEND"}), None).await;
        let pending = p.body["device_id"].as_str().unwrap().to_string();
        presence::record_status(db, &pending, true, 1).await.unwrap();
        assert!(events(db.clone(), pending.clone()).await.is_empty());
        assert!(!presence::device_may_connect(db, &pending).await.unwrap());

        // Events stay bounded: the newest 200 are kept.
        app.call(
            Method::POST,
            "/api/v1/devices/preauthorize",
            Some(&operator),
            Some(json!({"identities": [{"serial": "SN-FLAP"}]})),
        )
        .await;
        let r = enroll(&app, &device_csr(), json!({"serial": "SN-FLAP"}), None).await;
        let flap = r.body["device_id"].as_str().unwrap().to_string();
        for i in 0..(presence::MAX_EVENTS_PER_DEVICE + 10) {
            presence::record_status(db, &flap, i % 2 == 0, 1_000 + i).await.unwrap();
        }
        let ev = events(db.clone(), flap.clone()).await;
        assert_eq!(ev.len() as i64, presence::MAX_EVENTS_PER_DEVICE);
    });
}

/// Enrolls `n` accepted devices (pre-authorized `{prefix}-{i}` serials); returns their ids
/// in enrollment order.
pub(crate) async fn accepted_devices(app: &TestApp, prefix: &str, n: usize) -> Vec<String> {
    let identities: Vec<Value> = (0..n).map(|i| json!({"serial": format!("{prefix}-{i:03}")})).collect();
    let r = app.admin(Method::POST, "/api/v1/devices/preauthorize", Some(json!({"identities": identities}))).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let mut ids = Vec::new();
    for i in 0..n {
        let r = enroll(app, &device_csr(), json!({"serial": format!("{prefix}-{i:03}")}), None).await;
        assert_eq!(r.body["status"], "accepted", "{}", r.text);
        ids.push(r.body["device_id"].as_str().unwrap().to_string());
    }
    ids
}

/// Every id of a listing, following `next_cursor` page by page.
pub(crate) async fn all_pages(app: &TestApp, token: &str, path_and_query: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..1000 {
        let sep = if path_and_query.contains('?') { '&' } else { '?' };
        let url = match &cursor {
            Some(c) => format!("{path_and_query}{sep}cursor={c}"),
            None => path_and_query.to_string(),
        };
        let r = app.call(Method::GET, &url, Some(token), None).await;
        assert_eq!(r.status, StatusCode::OK, "{url}: {}", r.text);
        out.extend(r.body["items"].as_array().unwrap().iter().map(|d| d["id"].as_str().unwrap().to_string()));
        match r.body["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => return out,
        }
    }
    panic!("more than 1000 pages");
}

/// `%XX`-encodes a query value.
pub(crate) fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.".contains(&b) { (b as char).to_string() } else { format!("%{b:02X}") }
        })
        .collect()
}

/// Tried: a key with a space, a value over 256 bytes, 65 tags, a key both set and removed,
/// an unknown body field, an unknown device, a viewer.
#[tokio::test]
async fn tags_are_replaced_and_patched_audited_and_checked() {
    each_backend!(|app| {
        let operator = app.token("operator").await;
        let viewer = app.token("viewer").await;
        let id = accepted_devices(&app, "TAG", 1).await.remove(0);
        let url = format!("/api/v1/devices/{id}/tags");
        let r =
            app.call(Method::PUT, &url, Some(&operator), Some(json!({"tags": {"region": "eu", "rack": "r1"}}))).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        assert_eq!(r.body["tags"], json!({"region": "eu", "rack": "r1"}));
        let r = app
            .call(
                Method::PATCH,
                &url,
                Some(&operator),
                Some(json!({"set": {"region": "us", "site": "nyc"}, "remove": ["rack"]})),
            )
            .await;
        assert_eq!(r.body["tags"], json!({"region": "us", "site": "nyc"}), "{}", r.text);
        let d = app.call(Method::GET, &format!("/api/v1/devices/{id}"), Some(&viewer), None).await;
        assert_eq!(d.body["tags"], json!({"region": "us", "site": "nyc"}));

        let audit = app.admin(Method::GET, &format!("/api/v1/audit?action=device.tags&target_id={id}"), None).await;
        let summaries: Vec<&str> =
            audit.body["items"].as_array().unwrap().iter().map(|e| e["summary"].as_str().unwrap()).collect();
        assert_eq!(
            summaries,
            [
                r#"tags {"rack":"r1","region":"eu"} → {"region":"us","site":"nyc"}"#,
                r#"tags {} → {"rack":"r1","region":"eu"}"#
            ]
        );
        // The same tags again change nothing and record nothing.
        let before = app.audit_count().await;
        let r = app.call(Method::PATCH, &url, Some(&operator), Some(json!({"set": {"region": "us"}}))).await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(app.audit_count().await, before);

        let too_many: serde_json::Map<String, Value> = (0..65).map(|i| (format!("k{i}"), json!("v"))).collect();
        let bad = [
            (Method::PUT, json!({"tags": {"bad key": "x"}}), "bad key"),
            (Method::PUT, json!({"tags": {"k": "x".repeat(257)}}), "over 256 bytes"),
            (Method::PUT, json!({"tags": too_many}), "at most 64"),
            (Method::PATCH, json!({"set": {"a": "1"}, "remove": ["a"]}), "both set and removed"),
            (Method::PATCH, json!({"add": {"a": "1"}}), "unknown field"),
        ];
        for (method, body, want) in bad {
            let r = app.call(method.clone(), &url, Some(&operator), Some(body.clone())).await;
            assert_eq!(r.status, StatusCode::BAD_REQUEST, "{method} {body}: {}", r.text);
            assert!(r.text.contains(want), "{want:?} in {}", r.text);
        }
        let r = app.call(Method::PUT, "/api/v1/devices/nope/tags", Some(&operator), Some(json!({"tags": {}}))).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND);
        let r = app.call(Method::PUT, &url, Some(&viewer), Some(json!({"tags": {}}))).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN);
        let r = app.call(Method::PATCH, &url, Some(&viewer), Some(json!({"remove": ["region"]}))).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN);
        assert_eq!(app.audit_count().await, before, "refusals change nothing");
        let d = app.call(Method::GET, &format!("/api/v1/devices/{id}"), Some(&viewer), None).await;
        assert_eq!(d.body["tags"], json!({"region": "us", "site": "nyc"}));
    });
}

/// Filter, search, online and every sort, paged 4 at a time: each page follows the last with
/// no device twice and none missed. Tried: filters that do not parse (with their column), an
/// unknown sort, a cursor from another sort, a filter naming an unknown group.
#[tokio::test]
async fn device_list_filters_sorts_and_pages_without_gaps() {
    use drover_server::presence;
    each_backend!(|app| {
        let ids = accepted_devices(&app, "LST", 14).await;
        let viewer = app.token("viewer").await;
        // Even devices in eu, odd in us; every third aarch64; the first half online (pairs seen
        // at the same time, to exercise the tie-breaker).
        for (i, id) in ids.iter().enumerate() {
            let region = if i % 2 == 0 { "eu" } else { "us" };
            app.admin(Method::PUT, &format!("/api/v1/devices/{id}/tags"), Some(json!({"tags": {"region": region}})))
                .await;
            let arch = if i % 3 == 0 { "aarch64" } else { "x86_64" };
            let attrs = [("arch".to_string(), arch.to_string())].into();
            // The last device never reports (and so was never seen).
            if i < 13 {
                presence::record_inventory(&app.db, id, &attrs, 1_000).await.unwrap();
            }
            if i < 7 {
                presence::record_status(&app.db, id, true, 10_000 + (i as i64 / 2) * 1000).await.unwrap();
            }
        }
        let expect = |pred: &dyn Fn(usize) -> bool| -> Vec<String> {
            let mut v: Vec<String> = ids.iter().enumerate().filter(|(i, _)| pred(*i)).map(|(_, d)| d.clone()).collect();
            v.sort();
            v
        };
        let sorted = |mut v: Vec<String>| {
            v.sort();
            v
        };

        let f = enc(r#"tag.region = "eu" and attr.arch = "aarch64" and online"#);
        let got = all_pages(&app, &viewer, &format!("/api/v1/devices?limit=4&filter={f}")).await;
        assert_eq!(sorted(got), expect(&|i| i % 2 == 0 && i % 3 == 0 && i < 7), "i = 0, 6");

        let f = enc(r#"(tag.region = us or attr.arch ~ "aarch*") and not online"#);
        let got = all_pages(&app, &viewer, &format!("/api/v1/devices?limit=4&filter={f}")).await;
        assert_eq!(sorted(got), expect(&|i| (i % 2 == 1 || i % 3 == 0) && i >= 7));

        let f = enc(r#"tag.region in (eu, "mars") and tag.site not exists and status = accepted"#);
        let got = all_pages(&app, &viewer, &format!("/api/v1/devices?limit=3&filter={f}&online=false")).await;
        assert_eq!(sorted(got), expect(&|i| i % 2 == 0 && i >= 7));

        let got = all_pages(&app, &viewer, "/api/v1/devices?limit=4&q=lst-01").await;
        assert_eq!(sorted(got), expect(&|i| (10..14).contains(&i)), "identity serial substring, any case");
        let got = all_pages(&app, &viewer, &format!("/api/v1/devices?q={}", &ids[3][..18])).await;
        assert!(got.contains(&ids[3]), "id substring");
        let got = all_pages(&app, &viewer, "/api/v1/devices?limit=5&online=true").await;
        assert_eq!(sorted(got), expect(&|i| i < 7));

        // Every sort, both ways, pages of 4: the whole fleet once, in order.
        for sort in
            ["created_at", "-created_at", "id", "-id", "last_seen_at", "-last_seen_at", "updated_at", "-updated_at"]
        {
            let got = all_pages(&app, &viewer, &format!("/api/v1/devices?limit=4&sort={sort}")).await;
            assert_eq!(sorted(got.clone()), expect(&|_| true), "sort {sort}: each device once");
            match sort.trim_start_matches('-') {
                "id" => {
                    let mut want = expect(&|_| true);
                    if sort.starts_with('-') {
                        want.reverse();
                    }
                    assert_eq!(got, want, "sort {sort}");
                }
                "created_at" => {
                    // uuid v7 ids made in order; created_at in order too.
                    let mut want = ids.clone();
                    if sort.starts_with('-') {
                        want.reverse();
                    }
                    assert_eq!(got, want, "sort {sort}");
                }
                "last_seen_at" if !sort.starts_with('-') => {
                    // Never seen first (as 0), then the offline ones (seen at 1000), then by time.
                    assert_eq!(got[0], ids[13], "never seen first");
                    assert_eq!(sorted(got[1..7].to_vec()), expect(&|i| (7..13).contains(&i)));
                    assert_eq!(got[7..9].to_vec(), sorted(ids[0..2].to_vec()), "a tie goes by id");
                }
                _ => {}
            }
        }

        // Bad input: 400 with the column; no results leak out.
        let cases = [
            ("tag.region =", "expected a value after '=' at column 13"),
            ("tag.region = eu and", "expected a condition"),
            ("colour = red", "unknown field 'colour'"),
            ("group = nowhere", "there is no group named \"nowhere\""),
        ];
        for (filter, want) in cases {
            let r =
                app.call(Method::GET, &format!("/api/v1/devices?filter={}", enc(filter)), Some(&viewer), None).await;
            assert_eq!(r.status, StatusCode::BAD_REQUEST, "{filter}: {}", r.text);
            assert!(r.body["error"]["message"].as_str().unwrap().contains(want), "{filter}: {}", r.text);
        }
        let r = app.call(Method::GET, "/api/v1/devices?sort=identity", Some(&viewer), None).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        let first = app.call(Method::GET, "/api/v1/devices?limit=2&sort=id", Some(&viewer), None).await;
        let c = first.body["next_cursor"].as_str().unwrap();
        let r = app.call(Method::GET, &format!("/api/v1/devices?limit=2&cursor={c}"), Some(&viewer), None).await;
        assert_eq!(r.body["error"]["code"], "invalid_cursor", "{}", r.text);
        // The list shows presence.
        let page = app.call(Method::GET, "/api/v1/devices?sort=id&limit=500", Some(&viewer), None).await;
        let d0 = page.body["items"].as_array().unwrap().iter().find(|d| d["id"] == ids[0].as_str()).unwrap().clone();
        assert_eq!(d0["online"], true);
        assert_eq!(d0["tags"], json!({"region": "eu"}));
        assert!(d0["last_seen_at"].is_string());
    });
}

/// Tried: a duplicate identity on line 4, a line with too few fields, a bad header, an
/// identity pre-authorized already, the wrong content type, a viewer. Each refuses the whole
/// file.
#[tokio::test]
async fn csv_preauthorization_is_all_or_nothing() {
    each_backend!(|app| {
        let operator = app.token("operator").await;
        let viewer = app.token("viewer").await;
        let post = |token: String, ct: &'static str, body: &'static str| {
            let app = &app;
            async move {
                let req = axum::http::Request::builder()
                    .method(Method::POST)
                    .uri("/api/v1/devices/preauthorize/bulk")
                    .header("authorization", format!("Bearer {token}"))
                    .header("content-type", ct)
                    .body(axum::body::Body::from(body))
                    .unwrap();
                app.send(req).await
            }
        };
        let before = app.audit_count().await;
        let bad = [
            (
                "serial,mac\nA1,02:00:00:00:00:01\nA2,\nA3,x\nA1,02:00:00:00:00:01\n",
                "line 5: duplicate identity (the same as line 2)",
            ),
            ("serial,mac\nA1,m1\nA2\n", "line 3: 1 fields, the header has 2"),
            ("serial,bad col\nA1,x\n", "line 1: column 2"),
            ("serial\n\"A1\n", "line 2: an unclosed quote"),
            ("serial\n", "no devices"),
        ];
        for (csv, want) in bad {
            let r = post(operator.clone(), "text/csv", csv).await;
            assert_eq!(r.status, StatusCode::BAD_REQUEST, "{csv:?}: {}", r.text);
            assert!(r.text.contains(want), "{want:?} in {}", r.text);
        }
        assert_eq!(app.audit_count().await, before);
        // Nothing was pre-authorized: A1 must wait for an operator.
        let r = enroll(&app, &device_csr(), json!({"serial": "A1", "mac": "02:00:00:00:00:01"}), None).await;
        assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);

        let before = app.audit_count().await;
        let r =
            post(operator.clone(), "text/csv; charset=utf-8", "\u{feff}serial,mac\r\nB1,m1\r\nB2,\r\n\"B,3\",m3\r\n")
                .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        assert_eq!(r.body, json!({"created": 3}));
        assert_eq!(app.audit_count().await, before + 1, "audited once");
        let a = app.admin(Method::GET, "/api/v1/audit?limit=1", None).await;
        assert!(a.body["items"][0]["summary"].as_str().unwrap().starts_with("3 device identities pre-authorized"));
        // An empty cell leaves the attribute out: B2's identity is just its serial.
        let r = enroll(&app, &device_csr(), json!({"serial": "B2"}), None).await;
        assert_eq!(r.body["status"], "accepted", "{}", r.text);
        let r = enroll(&app, &device_csr(), json!({"serial": "B,3", "mac": "m3"}), None).await;
        assert_eq!(r.body["status"], "accepted", "{}", r.text);

        // B1 is pre-authorized and unused still (B2's was used: vouching for it again renews it).
        let r = post(operator.clone(), "text/csv", "serial,mac\nC1,\nB1,m1\n").await;
        assert_eq!(
            r.body["error"]["message"],
            "line 3: identity {\"mac\":\"m1\",\"serial\":\"B1\"} is pre-authorized already"
        );
        let r = enroll(&app, &device_csr(), json!({"serial": "C1"}), None).await;
        assert_eq!(r.status, StatusCode::ACCEPTED, "C1 was not added: {}", r.text);
        let r = post(operator.clone(), "application/json", "serial\nD1\n").await;
        assert_eq!(r.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
        let r = post(viewer.clone(), "text/csv", "serial\nD1\n").await;
        assert_eq!(r.status, StatusCode::FORBIDDEN);
    });
}

/// Tried: an unknown group name and a dynamic group's name at token creation.
#[tokio::test]
async fn enrollment_token_groups_are_joined_at_enrollment() {
    each_backend!(|app| {
        let operator = app.token("operator").await;
        for (name, kind, filter) in
            [("ops", "static", None), ("berlin", "static", None), ("eu", "dynamic", Some("tag.site = berlin"))]
        {
            let r = app
                .call(
                    Method::POST,
                    "/api/v1/groups",
                    Some(&operator),
                    Some(json!({"name": name, "kind": kind, "filter": filter})),
                )
                .await;
            assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        }
        let token = |groups: Value| {
            let app = &app;
            let operator = operator.clone();
            async move {
                app.call(
                    Method::POST,
                    "/api/v1/enrollment-tokens",
                    Some(&operator),
                    Some(json!({"name": "line", "tags": {"site": "berlin"}, "groups": groups})),
                )
                .await
            }
        };
        let r = token(json!(["ops", "nope"])).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        assert_eq!(r.body["error"]["message"], "groups: there is no group named \"nope\"");
        let r = token(json!(["eu"])).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        assert!(r.text.contains("dynamic"), "{}", r.text);
        let r = token(json!(["ops", "berlin"])).await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        assert_eq!(r.body["token"]["groups"], json!(["ops", "berlin"]));
        let secret = r.body["secret"].as_str().unwrap().to_string();

        let r = enroll(&app, &device_csr(), json!({"serial": "TG-1"}), Some(&secret)).await;
        let id = r.body["device_id"].as_str().unwrap().to_string();
        let d = app.call(Method::GET, &format!("/api/v1/devices/{id}"), Some(&operator), None).await;
        let mut groups: Vec<(String, String)> = d.body["groups"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| (g["name"].as_str().unwrap().to_string(), g["kind"].as_str().unwrap().to_string()))
            .collect();
        groups.sort();
        assert_eq!(
            groups,
            [("berlin".into(), "static".into()), ("eu".into(), "dynamic".into()), ("ops".into(), "static".into())],
            "the token's static groups, and the dynamic group its token tags match: {}",
            d.text
        );
        assert_eq!(d.body["tags"], json!({"site": "berlin"}));
        let tokens = app.call(Method::GET, "/api/v1/enrollment-tokens", Some(&operator), None).await;
        assert_eq!(tokens.body["items"][0]["groups"], json!(["ops", "berlin"]));
    });
}

/// Bad input tried: an enrollment (a valid token and CSR) sent to the plain-HTTP operator API
/// instead of the HTTPS device endpoint.
#[tokio::test]
async fn enrollment_is_served_only_on_the_device_endpoint() {
    each_backend!(|app| {
        let created =
            app.admin(Method::POST, "/api/v1/enrollment-tokens", Some(json!({"name": "factory", "max_uses": 5}))).await;
        let secret = created.body["secret"].as_str().unwrap().to_string();
        let body = json!({"csr_pem": device_csr(), "identity": {"serial": "SN-PLAIN"}, "token": secret});
        let req = || {
            axum::http::Request::builder()
                .method(Method::POST)
                .uri("/api/v1/enroll")
                .header("content-type", "application/json")
                .body(axum::body::Body::from(body.to_string()))
                .unwrap()
        };
        let r = app.send_api(req()).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.text);
        assert!(r.text.contains("device endpoint") && r.text.contains(":8443/api/v1/enroll"), "{}", r.text);
        let devices = app.admin(Method::GET, "/api/v1/devices", None).await;
        assert_eq!(devices.body["items"].as_array().unwrap().len(), 0, "nothing was enrolled");
        let tokens = app.admin(Method::GET, "/api/v1/enrollment-tokens", None).await;
        assert!(tokens.text.contains("\"uses\":0"), "the token was not used: {}", tokens.text);

        // The development switch takes it on the API too.
        let mut config = app.state.config.clone();
        config.insecure_enroll_over_http = true;
        let state = drover_server::app::AppState::new(app.db.clone(), config, app.state.ca.clone());
        let dev = drover_server::app::router(state);
        let resp = tower::ServiceExt::oneshot(dev, req()).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        // And the device endpoint takes it as always.
        let r = enroll(&app, &device_csr(), json!({"serial": "SN-TLS"}), Some(&secret)).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    });
}

/// A device is called by its operator-set name, else its inventory's hostname, else its
/// serial, else its id — in the API, its search and its sort. Bad input tried: an empty name,
/// one with a control character, one with surrounding spaces, a 65-character one, one shaped
/// like a device id, an unknown field, and a viewer renaming.
#[tokio::test]
async fn devices_have_display_names_that_operators_can_set() {
    each_backend!(|app| {
        let operator = app.token("operator").await;
        let viewer = app.token("viewer").await;
        let created = app.admin(Method::POST, "/api/v1/enrollment-tokens", Some(json!({"name": "names"}))).await;
        let secret = created.body["secret"].as_str().unwrap().to_string();
        let r = enroll(&app, &device_csr(), json!({"serial": "SN-NAME-1", "mac": "aa:bb"}), Some(&secret)).await;
        let id = r.body["device_id"].as_str().unwrap().to_string();
        let r = enroll(&app, &device_csr(), json!({"mac": "cc:dd"}), Some(&secret)).await;
        let no_serial = r.body["device_id"].as_str().unwrap().to_string();
        let get = |id: String| {
            let app = &app;
            async move { app.admin(Method::GET, &format!("/api/v1/devices/{id}"), None).await.body }
        };
        assert_eq!(get(id.clone()).await["display_name"], "SN-NAME-1");
        assert_eq!(get(no_serial.clone()).await["display_name"], json!(no_serial), "no serial: the id");

        // The hostname from its inventory wins over the serial, and follows the inventory.
        drover_server::presence::record_status(&app.db, &id, true, 1_000).await.unwrap();
        let inv = |h: &str| [("hostname".to_string(), h.to_string())].into_iter().collect();
        drover_server::presence::record_inventory(&app.db, &id, &inv("kiosk-lobby"), 2_000).await.unwrap();
        assert_eq!(get(id.clone()).await["display_name"], "kiosk-lobby");

        // An operator's name wins over both; it is audited; clearing it falls back.
        let patch = |token: String, body: serde_json::Value| {
            let (app, id) = (&app, id.clone());
            async move { app.call(Method::PATCH, &format!("/api/v1/devices/{id}"), Some(&token), Some(body)).await }
        };
        let r = patch(viewer.clone(), json!({"name": "front door"})).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN);
        for bad in [json!(""), json!("a\u{7}b"), json!(" padded"), json!("x".repeat(65)), json!(id.clone())] {
            let r = patch(operator.clone(), json!({ "name": bad })).await;
            assert_eq!(r.status, StatusCode::BAD_REQUEST, "{bad}: {}", r.text);
        }
        let r = patch(operator.clone(), json!({"name": "x", "tags": {}})).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text);
        let r = patch(operator.clone(), json!({"name": "front door"})).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        assert_eq!(
            (r.body["name"].clone(), r.body["display_name"].clone()),
            (json!("front door"), json!("front door"))
        );
        drover_server::presence::record_inventory(&app.db, &id, &inv("kiosk-2"), 3_000).await.unwrap();
        assert_eq!(get(id.clone()).await["display_name"], "front door", "the inventory does not override a name");
        let audit = app.admin(Method::GET, &format!("/api/v1/audit?target_id={id}&action=device.rename"), None).await;
        assert!(audit.text.contains("named \\\"front door\\\" (was \\\"kiosk-lobby\\\")"), "{}", audit.text);

        // Search and sort by the display name.
        let r = app.admin(Method::GET, "/api/v1/devices?q=FRONT", None).await;
        let found: Vec<&str> = r.body["items"].as_array().unwrap().iter().map(|d| d["id"].as_str().unwrap()).collect();
        assert_eq!(found, [id.as_str()], "{}", r.text);
        let r = app.admin(Method::GET, "/api/v1/devices?sort=name&limit=1", None).await;
        let first = std::cmp::min(no_serial.clone(), "front door".to_string());
        assert_eq!(r.body["items"][0]["display_name"], json!(first), "{}", r.text);
        let next = r.body["next_cursor"].as_str().unwrap().to_string();
        let r2 = app.admin(Method::GET, &format!("/api/v1/devices?sort=name&limit=1&cursor={next}"), None).await;
        assert_ne!(r2.body["items"][0]["id"], r.body["items"][0]["id"], "the cursor moves on");

        let r = patch(operator.clone(), json!({"name": null})).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        assert!(r.body.get("name").is_none());
        assert_eq!(r.body["display_name"], "kiosk-2");
    });
}

/// Bad input tried: a squatter claiming a real device's serial without a token (before the
/// real device, and again after being rejected), and an unauthenticated flood of claims of
/// the same serial.
#[tokio::test]
async fn a_claim_without_proof_cannot_block_the_real_device() {
    each_backend!(|app| {
        let operator = app.token("operator").await;
        let created = app.admin(Method::POST, "/api/v1/enrollment-tokens", Some(json!({"name": "line 3"}))).await;
        let secret = created.body["secret"].as_str().unwrap().to_string();
        // The squatter claims SN-REAL first, without a token: it waits.
        let squat = enroll(&app, &device_csr(), json!({"serial": "SN-REAL"}), None).await;
        assert_eq!(squat.status, StatusCode::ACCEPTED);
        let squatter = squat.body["device_id"].as_str().unwrap().to_string();
        // The real device, with a valid token, wins; the squatter's claim is rejected.
        let real = enroll(&app, &device_csr(), json!({"serial": "SN-REAL"}), Some(&secret)).await;
        assert_eq!(real.status, StatusCode::OK, "{}", real.text);
        assert_eq!(real.body["status"], "accepted");
        let d = app.admin(Method::GET, &format!("/api/v1/devices/{squatter}"), None).await;
        assert_eq!(d.body["status"], "rejected");
        let audit = app.admin(Method::GET, &format!("/api/v1/audit?target_id={squatter}"), None).await;
        assert!(audit.text.contains("superseded by device"), "{}", audit.text);
        // Now the real device is enrolled: a new claim gets a conflict naming nobody.
        let again = enroll(&app, &device_csr(), json!({"serial": "SN-REAL"}), None).await;
        assert_eq!(again.status, StatusCode::CONFLICT);
        assert!(!again.text.contains(real.body["device_id"].as_str().unwrap()), "{}", again.text);

        // A rejected claim blocks nobody either: an operator rejects a squatter, and the real
        // device (pre-authorized this time) comes in.
        let squat = enroll(&app, &device_csr(), json!({"serial": "SN-REAL-2"}), None).await;
        let squatter = squat.body["device_id"].as_str().unwrap().to_string();
        app.call(Method::POST, &format!("/api/v1/devices/{squatter}/reject"), Some(&operator), None).await;
        let r = app
            .call(
                Method::POST,
                "/api/v1/devices/preauthorize",
                Some(&operator),
                Some(json!({"identities": [{"serial": "SN-REAL-2"}]})),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        let real = enroll(&app, &device_csr(), json!({"serial": "SN-REAL-2"}), None).await;
        assert_eq!(real.status, StatusCode::OK, "{}", real.text);
    });
}

/// Pre-authorizations are listed, used once (or as many times as said), lapse, can be
/// revoked, and are used up when their device is decommissioned — so a stolen device's
/// identity with a new key is not accepted again. Bad input tried: 0 and too many uses, a
/// lifetime of 0 days, a viewer revoking, an unknown id.
#[tokio::test]
async fn preauthorizations_are_listed_used_once_revoked_and_spent_by_decommissioning() {
    each_backend!(|app| {
        let operator = app.token("operator").await;
        let viewer = app.token("viewer").await;
        let pre = |body: Value| {
            let (app, operator) = (&app, operator.clone());
            async move { app.call(Method::POST, "/api/v1/devices/preauthorize", Some(&operator), Some(body)).await }
        };
        for bad in [json!({"max_uses": 0}), json!({"max_uses": 1_000_001}), json!({"expires_in_days": 0})] {
            let mut body = json!({"identities": [{"serial": "SN-X"}]});
            body.as_object_mut().unwrap().extend(bad.as_object().unwrap().clone());
            assert_eq!(pre(body.clone()).await.status, StatusCode::BAD_REQUEST, "{body}");
        }
        assert_eq!(pre(json!({"identities": [{"serial": "SN-ONCE"}]})).await.status, StatusCode::OK);
        assert_eq!(pre(json!({"identities": [{"serial": "SN-TWICE"}], "max_uses": 2})).await.status, StatusCode::OK);
        assert_eq!(pre(json!({"identities": [{"serial": "SN-GONE"}]})).await.status, StatusCode::OK);
        let list = app.call(Method::GET, "/api/v1/preauthorizations", Some(&viewer), None).await;
        assert_eq!(list.status, StatusCode::OK, "{}", list.text);
        let items = list.body["items"].as_array().unwrap();
        assert_eq!(items.len(), 3);
        assert_eq!(items[0]["identity"], json!({"serial": "SN-GONE"}), "newest first");
        assert!(items.iter().all(|i| i["state"] == "active" && i["uses"] == 0));
        let id_of = |serial: &str| -> String {
            items.iter().find(|i| i["identity"]["serial"] == serial).unwrap()["id"].as_str().unwrap().to_string()
        };
        let (gone, twice) = (id_of("SN-GONE"), id_of("SN-TWICE"));

        // Once: the device comes in; the same identity with another key does not, as the
        // device is still there (one live device per identity), and after it is
        // decommissioned its pre-authorization is spent.
        let r = enroll(&app, &device_csr(), json!({"serial": "SN-ONCE"}), None).await;
        assert_eq!(r.status, StatusCode::OK);
        let once_dev = r.body["device_id"].as_str().unwrap().to_string();
        app.call(Method::POST, &format!("/api/v1/devices/{once_dev}/decommission"), Some(&operator), None).await;
        let r = enroll(&app, &device_csr(), json!({"serial": "SN-ONCE"}), None).await;
        assert_eq!(r.status, StatusCode::ACCEPTED, "the thief's new key waits for an operator: {}", r.text);
        let audit = app.admin(Method::GET, &format!("/api/v1/audit?target_id={once_dev}"), None).await;
        assert!(audit.text.contains("pre-authorization is used up"), "{}", audit.text);

        // Twice: two enrollments (the second after the first was decommissioned), not three.
        for round in 0..2 {
            let r = enroll(&app, &device_csr(), json!({"serial": "SN-TWICE"}), None).await;
            assert_eq!(r.status, StatusCode::OK, "round {round}: {}", r.text);
            let id = r.body["device_id"].as_str().unwrap().to_string();
            if round == 0 {
                let l = app.admin(Method::GET, "/api/v1/preauthorizations?state=active&q=twice", None).await;
                assert_eq!(l.body["items"][0]["uses"], 1, "{}", l.text);
                // Re-imaged in place: decommissioned, but one use is left.
                let p = app.admin(Method::GET, "/api/v1/preauthorizations", None).await;
                assert!(p.text.contains("SN-TWICE"));
                let row = sqlx::query_as::<_, (i64,)>("SELECT uses FROM preauthorizations WHERE id = $1")
                    .bind(twice.clone())
                    .fetch_one(app.db.pool())
                    .await
                    .unwrap();
                assert_eq!(row.0, 1);
                sqlx::query("UPDATE devices SET status = 'decommissioned' WHERE id = $1")
                    .bind(id)
                    .execute(app.db.pool())
                    .await
                    .unwrap();
            }
        }
        let used = app.admin(Method::GET, "/api/v1/preauthorizations?state=used", None).await;
        let serials: Vec<&str> =
            used.body["items"].as_array().unwrap().iter().map(|i| i["identity"]["serial"].as_str().unwrap()).collect();
        assert_eq!(serials, ["SN-TWICE", "SN-ONCE"], "{}", used.text);

        // Revoked: nobody comes in on it; a viewer may not revoke; unknown ids are 404.
        let r = app.call(Method::DELETE, &format!("/api/v1/preauthorizations/{gone}"), Some(&viewer), None).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN);
        let r = app.call(Method::DELETE, "/api/v1/preauthorizations/nope", Some(&operator), None).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND);
        let r = app.call(Method::DELETE, &format!("/api/v1/preauthorizations/{gone}"), Some(&operator), None).await;
        assert_eq!((r.status, r.body["state"].clone()), (StatusCode::OK, json!("revoked")), "{}", r.text);
        let r = enroll(&app, &device_csr(), json!({"serial": "SN-GONE"}), None).await;
        assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
        let audit = app.admin(Method::GET, "/api/v1/audit?action=device.preauthorize.revoke", None).await;
        assert_eq!(audit.body["items"].as_array().unwrap().len(), 1, "{}", audit.text);

        // Expired: set in the past, it admits nobody; vouching for it again renews it.
        assert_eq!(
            pre(json!({"identities": [{"serial": "SN-OLD"}], "expires_in_days": 1})).await.status,
            StatusCode::OK
        );
        sqlx::query("UPDATE preauthorizations SET expires_at = 1 WHERE identity LIKE '%SN-OLD%'")
            .execute(app.db.pool())
            .await
            .unwrap();
        let l = app.admin(Method::GET, "/api/v1/preauthorizations?state=expired", None).await;
        assert_eq!(l.body["items"].as_array().unwrap().len(), 1, "{}", l.text);
        let csr = device_csr();
        assert_eq!(enroll(&app, &csr, json!({"serial": "SN-OLD"}), None).await.status, StatusCode::ACCEPTED);
        let r = pre(json!({"identities": [{"serial": "SN-ONCE"}]})).await;
        assert_eq!(r.body, json!({"added": 1, "already": 0}), "a used one is renewed: {}", r.text);
    });
}
