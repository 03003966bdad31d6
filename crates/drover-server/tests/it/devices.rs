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
