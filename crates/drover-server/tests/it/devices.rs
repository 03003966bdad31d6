//! Enrollment and the device registry through the API, on every backend: by enrollment
//! token, by pre-authorization, by an operator's acceptance; and the refusals.

use axum::http::{Method, StatusCode};
use serde_json::{Value, json};

use crate::each_backend;
use crate::support::TestApp;

/// A device's key and CSR, made the way an agent makes them.
fn device_csr() -> String {
    let key = rcgen::KeyPair::generate().unwrap();
    rcgen::CertificateParams::default().serialize_request(&key).unwrap().pem().unwrap()
}

async fn enroll(app: &TestApp, csr: &str, identity: Value, token: Option<&str>) -> crate::support::Resp {
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
        assert_eq!(tokens.body[0]["uses"], 2);
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
        assert_eq!(enroll(&app, &csr, json!({"serial": "SN-D"}), None).await.status, StatusCode::ACCEPTED);
        let r = enroll(&app, &device_csr(), json!({"serial": "SN-D"}), None).await;
        assert_eq!(r.status, StatusCode::CONFLICT);
        assert!(r.text.contains("enrolled already") && r.text.contains("decommission"), "{}", r.text);
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

        presence::record_hello(db, &id, "drover-agent/0.1.0", Some("boot-a"), 6_000).await.unwrap();
        presence::record_hello(db, &id, "drover-agent/0.1.0", Some("boot-a"), 6_500).await.unwrap();
        presence::record_hello(db, &id, "drover-agent/0.2.0", Some("boot-b"), 7_000).await.unwrap();
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
        presence::record_hello(db, &id, "x", Some("boot-c"), 10_000).await.unwrap();
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
