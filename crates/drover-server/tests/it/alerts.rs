//! Alerts on every backend: rules evaluated by the real evaluator (time is its input, so a
//! test can move it), notifications delivered over real sockets to a webhook receiver that
//! checks the HMAC, a Slack-style receiver and an SMTP sink speaking STARTTLS and AUTH;
//! late data, de-duplication, flap suppression, silences, absence and fleet rules, roles;
//! device rule sets pushed on change and on hello.

use std::sync::{Arc, Mutex};

use axum::http::{HeaderMap, Method, StatusCode};
use drover_server::alerts::engine::tick;
use drover_server::alerts::notify::{Notifier, deliver_due};
use drover_server::telemetry::store::{Batch, Cache, Event, Point};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::devices::accepted_devices;
use crate::each_backend;
use crate::support::TestApp;

const LATE_AFTER_MS: i64 = 120_000;

fn now_ms() -> i64 {
    drover_server::time::now_ms()
}

/// Writes points through the telemetry store as if they arrived at `arrived` (points older
/// than two minutes then are stored late).
async fn points(app: &TestApp, device: &str, name: &str, pts: &[(i64, f64)], arrived: i64) {
    let batch = Batch {
        device_id: device.to_string(),
        seq: 0,
        points: pts.iter().map(|(t, v)| Point { name: name.into(), t: *t, v: *v }).collect(),
        events: vec![],
        dropped: 0,
        refused_future: 0,
        refused_old: 0,
    };
    drover_server::telemetry::store::write(&app.db, &Cache::default(), &[batch], arrived, LATE_AFTER_MS).await.unwrap();
}

async fn event(app: &TestApp, device: &str, id: &str, name: &str, t: i64, arrived: i64) {
    let batch = Batch {
        device_id: device.to_string(),
        seq: 0,
        points: vec![],
        events: vec![Event { id: id.into(), t, name: name.into(), severity: "critical".into(), data: "{}".into() }],
        dropped: 0,
        refused_future: 0,
        refused_old: 0,
    };
    drover_server::telemetry::store::write(&app.db, &Cache::default(), &[batch], arrived, LATE_AFTER_MS).await.unwrap();
}

/// What the receivers got.
#[derive(Default, Clone)]
struct Inbox {
    webhook: Arc<Mutex<Vec<Value>>>,
    slack: Arc<Mutex<Vec<String>>>,
    mail: Arc<Mutex<Vec<String>>>,
    bad_signatures: Arc<Mutex<u32>>,
}

impl Inbox {
    fn webhook_events(&self) -> Vec<String> {
        self.webhook.lock().unwrap().iter().map(|v| v["event"].as_str().unwrap_or_default().to_string()).collect()
    }
}

/// A webhook receiver that checks `X-Drover-Signature` with `secret` and refuses timestamps
/// more than five minutes away; and a Slack-style receiver. Returns their base URL.
async fn receivers(inbox: Inbox, secret: Arc<Mutex<String>>) -> String {
    use axum::routing::post;
    let i1 = inbox.clone();
    let i2 = inbox.clone();
    let app = axum::Router::new()
        .route(
            "/hook/{token}",
            post(move |headers: HeaderMap, body: String| {
                let inbox = i1.clone();
                let secret = secret.clone();
                async move {
                    let ts = headers.get("x-drover-timestamp").and_then(|v| v.to_str().ok()).unwrap_or_default();
                    let sig = headers.get("x-drover-signature").and_then(|v| v.to_str().ok()).unwrap_or_default();
                    let fresh = ts.parse::<i64>().is_ok_and(|t| (t - now_ms() / 1000).abs() < 300);
                    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.lock().unwrap().as_bytes());
                    let valid = sig
                        .strip_prefix("v1=")
                        .and_then(|h| hex::decode(h).ok())
                        .is_some_and(|mac| ring::hmac::verify(&key, format!("{ts}.{body}").as_bytes(), &mac).is_ok());
                    if !(fresh && valid) {
                        *inbox.bad_signatures.lock().unwrap() += 1;
                        return StatusCode::UNAUTHORIZED;
                    }
                    inbox.webhook.lock().unwrap().push(serde_json::from_str(&body).unwrap());
                    StatusCode::NO_CONTENT
                }
            }),
        )
        .route(
            "/slack/{*rest}",
            post(move |body: String| {
                let inbox = i2.clone();
                async move {
                    let v: Value = serde_json::from_str(&body).unwrap();
                    inbox.slack.lock().unwrap().push(v["text"].as_str().unwrap().to_string());
                    "ok"
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}")
}

/// An SMTP sink: STARTTLS with a certificate for `localhost` from its own CA, then AUTH
/// PLAIN (user `alerts`, password `s3cret`), MAIL, RCPT, DATA. Returns its address and the
/// CA file droverd should trust.
async fn smtp_sink(inbox: Inbox, dir: &std::path::Path) -> (String, String) {
    let ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    let mut ca = ca;
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_pem(&ca_cert.pem(), ca_key).unwrap();
    let leaf_cert = leaf.signed_by(&leaf_key, &issuer).unwrap();
    let ca_file = dir.join("smtp-ca.pem");
    std::fs::write(&ca_file, ca_cert.pem()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf_cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::try_from(leaf_key.serialize_der()).unwrap(),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let acceptor = acceptor.clone();
            let inbox = inbox.clone();
            tokio::spawn(async move {
                let mut plain = BufReader::new(tcp);
                plain.get_mut().write_all(b"220 sink ESMTP\r\n").await.unwrap();
                let mut line = String::new();
                // Before TLS: EHLO offers STARTTLS only; anything else is refused.
                loop {
                    line.clear();
                    if plain.read_line(&mut line).await.unwrap() == 0 {
                        return;
                    }
                    let cmd = line.trim().to_ascii_uppercase();
                    if cmd.starts_with("EHLO") {
                        plain.get_mut().write_all(b"250-sink\r\n250 STARTTLS\r\n").await.unwrap();
                    } else if cmd == "STARTTLS" {
                        plain.get_mut().write_all(b"220 go ahead\r\n").await.unwrap();
                        break;
                    } else {
                        plain.get_mut().write_all(b"530 must issue STARTTLS first\r\n").await.unwrap();
                    }
                }
                let tls = acceptor.accept(plain.into_inner()).await.unwrap();
                let mut s = BufReader::new(tls);
                let mut authed = false;
                let mut data = String::new();
                loop {
                    line.clear();
                    if s.read_line(&mut line).await.unwrap_or(0) == 0 {
                        return;
                    }
                    let cmd = line.trim_end().to_string();
                    let up = cmd.to_ascii_uppercase();
                    let reply: &[u8] = if up.starts_with("EHLO") {
                        b"250-sink\r\n250 AUTH PLAIN\r\n"
                    } else if let Some(tok) = cmd.strip_prefix("AUTH PLAIN ") {
                        use base64::Engine as _;
                        let raw = base64::engine::general_purpose::STANDARD.decode(tok).unwrap_or_default();
                        authed = raw == b"\0alerts\0s3cret";
                        if authed { b"235 ok\r\n" } else { b"535 bad credentials\r\n" }
                    } else if up.starts_with("MAIL FROM") || up.starts_with("RCPT TO") {
                        if authed { b"250 ok\r\n" } else { b"530 authenticate first\r\n" }
                    } else if up == "DATA" {
                        s.get_mut().write_all(b"354 go\r\n").await.unwrap();
                        loop {
                            line.clear();
                            s.read_line(&mut line).await.unwrap();
                            if line == ".\r\n" {
                                break;
                            }
                            data.push_str(&line);
                        }
                        inbox.mail.lock().unwrap().push(std::mem::take(&mut data));
                        b"250 queued\r\n"
                    } else if up == "QUIT" {
                        s.get_mut().write_all(b"221 bye\r\n").await.unwrap();
                        return;
                    } else {
                        b"502 no\r\n"
                    };
                    s.get_mut().write_all(reply).await.unwrap();
                }
            });
        }
    });
    (format!("localhost:{port}"), ca_file.display().to_string())
}

/// The test receivers listen on 127.0.0.1, which droverd refuses as a notification target
/// unless `notify_allow_hosts` allows it: these tests allow it, as an operator with an internal
/// receiver would.
fn allow_local(c: &mut drover_server::config::Config) {
    c.alerts.notify_allow_hosts = vec!["127.0.0.1".into()];
}

/// A notifier allowed to send to the local test receivers (see [`allow_local`]).
fn local_notifier() -> Notifier {
    Notifier::new(drover_server::alerts::AlertsConfig {
        notify_allow_hosts: vec!["127.0.0.1".into()],
        ..Default::default()
    })
    .unwrap()
}

async fn post(app: &TestApp, token: &str, path: &str, body: Value) -> crate::support::Resp {
    app.call(Method::POST, path, Some(token), Some(body)).await
}

/// Runs the evaluator at `now`, then delivers what it queued.
async fn evaluate(app: &TestApp, notifier: &Notifier, now: i64) {
    assert!(tick(&app.db, "test-replica", now).await.unwrap().is_some(), "this replica holds the lease");
    // Queued for the evaluator's (moved) time.
    deliver_due(&app.db, notifier, now.max(now_ms())).await.unwrap();
}

async fn states(app: &TestApp, token: &str) -> Vec<(String, String)> {
    let r = app.call(Method::GET, "/api/v1/alerts?state=firing", Some(token), None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    r.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| (a["device_id"].as_str().unwrap_or("fleet").to_string(), a["rule_name"].as_str().unwrap().to_string()))
        .collect()
}

/// Tried: a threshold rule on two devices, one hot; notified by webhook (HMAC checked),
/// Slack and email (STARTTLS + AUTH); de-duplicated while it stays hot; resolved and
/// notified again; a viewer cannot create rules or channels, or read a channel's secret.
#[tokio::test]
async fn a_threshold_alert_fires_notifies_every_channel_and_resolves() {
    each_backend!(config = allow_local, |app| {
        let operator = app.token("operator").await;
        let viewer = app.token("viewer").await;
        let inbox = Inbox::default();
        let secret = Arc::new(Mutex::new(String::new()));
        let base = receivers(inbox.clone(), secret.clone()).await;
        let (smtp, ca_file) = smtp_sink(inbox.clone(), app.state.config.data_dir.as_path()).await;
        let cfg = drover_server::alerts::AlertsConfig {
            smtp_server: smtp,
            smtp_from: "drover@example.com".into(),
            smtp_username: "alerts".into(),
            smtp_password: "s3cret".into(),
            notify_ca_file: ca_file,
            notify_allow_hosts: vec!["127.0.0.1".into()],
            ..Default::default()
        };
        let notifier = Notifier::new(cfg).unwrap();

        let r = post(
            &app,
            &operator,
            "/api/v1/notification-channels",
            json!({"name": "ops hook", "kind": "webhook", "target": format!("{base}/hook/t0ken")}),
        )
        .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        let hook = r.body["id"].as_str().unwrap().to_string();
        *secret.lock().unwrap() = r.body["secret"].as_str().unwrap().to_string();
        assert!(!r.body["target"].as_str().unwrap().contains("t0ken"), "the URL's path is not shown");
        let r = post(
            &app,
            &operator,
            "/api/v1/notification-channels",
            json!({"name": "chat", "kind": "slack", "target": format!("{base}/slack/T000/B000")}),
        )
        .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        let slack = r.body["id"].as_str().unwrap().to_string();
        // The API's server has no SMTP configured: email channels are refused there.
        let r = post(
            &app,
            &operator,
            "/api/v1/notification-channels",
            json!({"name": "mail", "kind": "email", "target": "oncall@example.com"}),
        )
        .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text);
        assert!(r.text.contains("smtp_server"), "{}", r.text);
        let org = drover_server::ops::find_org(&app.db, None).await.unwrap();
        let mail = drover_server::alerts::rules::create_channel(
            &app.db,
            &drover_server::auth::Principal::cli(&org),
            drover_server::alerts::types::CreateChannel {
                name: "mail".into(),
                kind: "email".into(),
                target: "oncall@example.com, lead@example.com".into(),
            },
            true,
            &Default::default(),
        )
        .await
        .unwrap()
        .channel
        .id;
        let channels = app.call(Method::GET, "/api/v1/notification-channels", Some(&viewer), None).await;
        assert_eq!(channels.status, StatusCode::OK);
        assert!(
            !channels.text.contains("whsec_") && !channels.text.contains("t0ken") && !channels.text.contains("B000"),
            "{}",
            channels.text
        );

        let ids = accepted_devices(&app, "ALR", 2).await;
        app.call(
            Method::PUT,
            &format!("/api/v1/devices/{}/tags", ids[0]),
            Some(&operator),
            Some(json!({"tags": {"site": "berlin"}})),
        )
        .await;
        app.call(
            Method::PUT,
            &format!("/api/v1/devices/{}/tags", ids[1]),
            Some(&operator),
            Some(json!({"tags": {"site": "berlin"}})),
        )
        .await;
        let rule = json!({
            "name": "hot cpu", "severity": "critical", "filter": "tag.site = berlin",
            "condition": {"kind": "threshold", "metric": "cpu.percent", "op": ">", "threshold": 90, "window_s": 300, "aggregate": "avg"},
            "channels": [hook, slack, mail],
        });
        let r = post(&app, &viewer, "/api/v1/alert-rules", rule.clone()).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "a viewer cannot create rules: {}", r.text);
        let r = post(
            &app,
            &viewer,
            "/api/v1/notification-channels",
            json!({"name": "x", "kind": "slack", "target": "http://x/"}),
        )
        .await;
        assert_eq!(r.status, StatusCode::FORBIDDEN);
        // Bad input: an unknown aggregate, an infinite window, a channel that does not exist.
        let mut bad = rule.clone();
        bad["condition"]["aggregate"] = json!("median");
        assert_eq!(post(&app, &operator, "/api/v1/alert-rules", bad).await.status, StatusCode::BAD_REQUEST);
        let mut bad = rule.clone();
        bad["condition"]["window_s"] = json!(0);
        assert_eq!(post(&app, &operator, "/api/v1/alert-rules", bad).await.status, StatusCode::BAD_REQUEST);
        let mut bad = rule.clone();
        bad["channels"] = json!(["nope"]);
        let r = post(&app, &operator, "/api/v1/alert-rules", bad).await;
        assert!(r.status == StatusCode::BAD_REQUEST && r.text.contains("nope"), "{}", r.text);
        let before = app.audit_count().await;
        let r = post(&app, &operator, "/api/v1/alert-rules", rule.clone()).await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        assert_eq!(r.body["description"], "avg(cpu.percent) > 90 over 5m");
        assert_eq!(app.audit_count().await, before + 1, "audited");

        let t0 = now_ms();
        points(&app, &ids[0], "cpu.percent", &[(t0 - 60_000, 95.0), (t0 - 30_000, 97.0), (t0 - 1_000, 99.0)], t0).await;
        points(&app, &ids[1], "cpu.percent", &[(t0 - 60_000, 20.0), (t0 - 1_000, 30.0)], t0).await;
        evaluate(&app, &notifier, t0).await;
        assert_eq!(states(&app, &viewer).await, vec![(ids[0].clone(), "hot cpu".to_string())]);
        assert_eq!(inbox.webhook_events(), ["firing"]);
        let w = inbox.webhook.lock().unwrap()[0].clone();
        assert_eq!(
            (w["device_id"].as_str(), w["rule"]["severity"].as_str()),
            (Some(ids[0].as_str()), Some("critical"))
        );
        assert_eq!(w["value"].as_f64(), Some(97.0));
        assert_eq!(inbox.slack.lock().unwrap().len(), 1);
        assert!(
            inbox.slack.lock().unwrap()[0].starts_with("[FIRING] hot cpu on "),
            "{:?}",
            inbox.slack.lock().unwrap()
        );
        {
            let mail = inbox.mail.lock().unwrap();
            assert_eq!(mail.len(), 1, "one message to both addresses");
            assert!(
                mail[0].contains("Subject: [Drover] FIRING: hot cpu on ")
                    && mail[0].contains("To: oncall@example.com, lead@example.com"),
                "{}",
                mail[0]
            );
        }

        // Still hot: one firing alert, nothing new sent.
        points(&app, &ids[0], "cpu.percent", &[(t0 + 4_000, 98.0)], t0 + 5_000).await;
        evaluate(&app, &notifier, t0 + 5_000).await;
        assert_eq!(inbox.webhook_events(), ["firing"], "de-duplicated");

        // Cool again (the hot points leave the window): resolved, notified everywhere.
        let t1 = t0 + 400_000;
        points(&app, &ids[0], "cpu.percent", &[(t1 - 1_000, 12.0)], t1).await;
        evaluate(&app, &notifier, t1).await;
        assert!(states(&app, &viewer).await.is_empty());
        assert_eq!(inbox.webhook_events(), ["firing", "resolved"]);
        assert_eq!(inbox.slack.lock().unwrap().len(), 2);
        assert_eq!(inbox.mail.lock().unwrap().len(), 2);
        assert_eq!(*inbox.bad_signatures.lock().unwrap(), 0);

        let h = app.call(Method::GET, "/api/v1/alerts/history?rule=hot%20cpu", Some(&viewer), None).await;
        let events: Vec<&str> =
            h.body["items"].as_array().unwrap().iter().map(|e| e["event"].as_str().unwrap()).collect();
        assert_eq!(events, ["resolved", "firing"], "{}", h.text);
        let d = app.call(Method::GET, "/api/v1/notifications", Some(&viewer), None).await;
        let sent = d.body.as_array().unwrap().iter().filter(|n| n["status"] == "sent").count();
        assert_eq!(sent, 6, "{}", d.text);

        // A wrong secret is refused by the receiver: the delivery is retried, then logged as failing.
        *secret.lock().unwrap() = "not the secret".into();
        let r = post(&app, &operator, &format!("/api/v1/notification-channels/{hook}/test"), json!({})).await;
        assert_eq!((r.status, r.body["status"].as_str()), (StatusCode::OK, Some("failed")), "{}", r.text);
        assert!(r.body["last_error"].as_str().unwrap().contains("401"), "{}", r.text);
        assert!(!r.text.contains("t0ken"));
    });
}

/// Bad input: webhook and Slack targets in droverd's own network — loopback, private,
/// link-local (cloud metadata), IPv6 loopback, a name resolving to loopback — are refused when
/// the channel is created and again when it sends (a channel stored before, or a name whose
/// answer changed); `notify_allow_hosts` lets an operator allow an internal receiver.
#[tokio::test]
async fn notification_targets_inside_droverd_s_network_are_refused_unless_allowed() {
    let inbox = Inbox::default();
    let base = receivers(inbox.clone(), Arc::new(Mutex::new(String::new()))).await;
    let port = base.rsplit(':').next().unwrap().to_string();
    each_backend!(|app| {
        let operator = app.token("operator").await;
        for (i, target) in [
            format!("http://127.0.0.1:{port}/slack/x"),
            "http://10.0.0.1/hook".to_string(),
            "http://169.254.169.254/latest/meta-data/".to_string(),
            format!("http://[::1]:{port}/slack/x"),
            format!("http://localhost:{port}/slack/x"),
            "https://0.0.0.0/x".to_string(),
        ]
        .into_iter()
        .enumerate()
        {
            for kind in ["webhook", "slack"] {
                let r = post(
                    &app,
                    &operator,
                    "/api/v1/notification-channels",
                    json!({"name": format!("c{i}{kind}"), "kind": kind, "target": target}),
                )
                .await;
                assert_eq!(r.status, StatusCode::BAD_REQUEST, "{target}: {}", r.text);
                assert!(r.text.contains("internal address") && r.text.contains("notify_allow_hosts"), "{}", r.text);
            }
        }
        // A channel stored without the check (before it existed): the send refuses it, and the
        // receiver hears nothing.
        let org = drover_server::ops::find_org(&app.db, None).await.unwrap();
        for (id, host) in [("old-ip", "127.0.0.1"), ("old-name", "localhost")] {
            sqlx::query(
                "INSERT INTO notification_channels (id, org_id, name, kind, target, secret, created_by, created_at) \
                 VALUES ($1, $2, $1, 'slack', $3, '', 'test', 0)",
            )
            .bind(id)
            .bind(org.clone())
            .bind(format!("http://{host}:{port}/slack/x"))
            .execute(app.db.pool())
            .await
            .unwrap();
            let r = post(&app, &operator, &format!("/api/v1/notification-channels/{id}/test"), json!({})).await;
            assert_eq!(r.status, StatusCode::OK, "{}", r.text);
            assert_eq!(r.body["status"], "failed", "{}", r.body);
            let err = r.body["last_error"].as_str().unwrap();
            assert!(err.contains("internal address") && err.contains("notify_allow_hosts"), "{err}");
        }
        assert!(inbox.slack.lock().unwrap().is_empty(), "a refused target was reached");
    });
    // With the allow-list: the name, the address and a CIDR block.
    each_backend!(
        config = |c: &mut drover_server::config::Config| {
            c.alerts.notify_allow_hosts = vec!["localhost".into(), "127.0.0.1".into(), "10.0.0.0/8".into()];
        },
        |app| {
            let operator = app.token("operator").await;
            for (name, target) in [
                ("by-ip", format!("http://127.0.0.1:{port}/slack/x")),
                ("by-name", format!("http://localhost:{port}/slack/x")),
                ("by-net", "http://10.0.0.1/hook".to_string()),
            ] {
                let r = post(
                    &app,
                    &operator,
                    "/api/v1/notification-channels",
                    json!({"name": name, "kind": "slack", "target": target}),
                )
                .await;
                assert_eq!(r.status, StatusCode::CREATED, "{target}: {}", r.text);
            }
            let before = inbox.slack.lock().unwrap().len();
            for name in ["by-ip", "by-name"] {
                let r = post(&app, &operator, &format!("/api/v1/notification-channels/{name}/test"), json!({})).await;
                assert_eq!(r.status, StatusCode::OK, "{}", r.text);
                assert_eq!(r.body["status"], "sent", "{}", r.body);
            }
            assert_eq!(inbox.slack.lock().unwrap().len(), before + 2);
            // Still refused: an internal address the list does not name.
            let r = post(
                &app,
                &operator,
                "/api/v1/notification-channels",
                json!({"name": "meta", "kind": "webhook", "target": "http://169.254.169.254/"}),
            )
            .await;
            assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text);
        }
    );
}

/// Tried: points that were measured while the device was offline (old timestamps) arriving
/// now; a late event. Neither fires; the late event is in the history as late.
#[tokio::test]
async fn late_data_never_fires_as_if_now() {
    each_backend!(config = allow_local, |app| {
        let operator = app.token("operator").await;
        let inbox = Inbox::default();
        let base = receivers(inbox.clone(), Arc::new(Mutex::new(String::new()))).await;
        let notifier = local_notifier();
        let r = post(
            &app,
            &operator,
            "/api/v1/notification-channels",
            json!({"name": "chat", "kind": "slack", "target": format!("{base}/slack/x")}),
        )
        .await;
        let slack = r.body["id"].as_str().unwrap().to_string();
        let ids = accepted_devices(&app, "LATE", 1).await;
        for rule in [
            json!({"name": "hot", "condition": {"kind": "threshold", "metric": "temp", "op": ">=", "threshold": 80, "window_s": 600, "aggregate": "every"}, "channels": [slack]}),
            json!({"name": "door", "condition": {"kind": "event", "name": "door.*"}, "channels": [slack]}),
        ] {
            let r = post(&app, &operator, "/api/v1/alert-rules", rule).await;
            assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        }
        // An event rule looks at what arrived after it was made; creation can share this
        // millisecond, so everything here arrives from the next one on.
        let t0 = now_ms() + 1;
        // Measured 3 to 9 minutes ago — inside the window — but arriving only now: late.
        points(&app, &ids[0], "temp", &[(t0 - 540_000, 85.0), (t0 - 360_000, 90.0), (t0 - 180_000, 95.0)], t0).await;
        let (late,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM metric_points p JOIN metric_series s ON s.id = p.series_id WHERE s.name = 'temp' AND p.late = 1").fetch_one(app.db.pool()).await.unwrap();
        assert_eq!(late, 3, "stored, marked late");
        event(&app, &ids[0], "e1", "door.open", t0 - 3_600_000, t0).await;
        evaluate(&app, &notifier, t0 + 1).await;
        assert!(states(&app, &operator).await.is_empty());
        assert!(inbox.slack.lock().unwrap().is_empty());
        let h = app.call(Method::GET, "/api/v1/alerts/history", Some(&operator), None).await;
        let items = h.body["items"].as_array().unwrap();
        assert_eq!(items.len(), 1, "{}", h.text);
        assert_eq!((items[0]["event"].as_str(), items[0]["rule_name"].as_str()), (Some("late_event"), Some("door")));

        // The same data arriving on time fires.
        points(&app, &ids[0], "temp", &[(t0 + 1_000, 88.0)], t0 + 2_000).await;
        event(&app, &ids[0], "e2", "door.open", t0 + 1_500, t0 + 2_000).await;
        evaluate(&app, &notifier, t0 + 3_000).await;
        let mut firing = states(&app, &operator).await;
        firing.sort_by(|a, b| a.1.cmp(&b.1));
        assert_eq!(firing.iter().map(|f| f.1.as_str()).collect::<Vec<_>>(), ["door", "hot"]);
    });
}

/// Tried: a condition going on and off every evaluation (flapping); a silence on one device.
#[tokio::test]
async fn flapping_is_notified_once_and_silences_mute() {
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    each_backend!(config = allow_local, |app| {
        let operator = app.token("operator").await;
        let inbox = Inbox::default();
        let base = receivers(inbox.clone(), Arc::new(Mutex::new(String::new()))).await;
        let notifier = local_notifier();
        let r = post(
            &app,
            &operator,
            "/api/v1/notification-channels",
            json!({"name": "chat", "kind": "slack", "target": format!("{base}/slack/x")}),
        )
        .await;
        let slack = r.body["id"].as_str().unwrap().to_string();
        let ids = accepted_devices(&app, "FLAP", 2).await;
        app.call(
            Method::PUT,
            &format!("/api/v1/devices/{}/tags", ids[1]),
            Some(&operator),
            Some(json!({"tags": {"muted": "yes"}})),
        )
        .await;
        let r = post(&app, &operator, "/api/v1/alert-rules", json!({
            "name": "load", "flap_window_s": 60, "flap_changes": 3,
            "condition": {"kind": "threshold", "metric": "load", "op": ">", "threshold": 1, "window_s": 5, "aggregate": "max"},
            "channels": [slack]})).await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        // Bad input: a silence without reason, one ending in the past.
        let r = post(
            &app,
            &operator,
            "/api/v1/silences",
            json!({"filter": "tag.muted = yes", "duration_s": 3600, "reason": " "}),
        )
        .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        let r =
            post(&app, &operator, "/api/v1/silences", json!({"ends_at": "2001-01-01T00:00:00Z", "reason": "x"})).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        let r = post(
            &app,
            &operator,
            "/api/v1/silences",
            json!({"rule": "load", "filter": "tag.muted = yes", "duration_s": 3600, "reason": "maintenance"}),
        )
        .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        let silence = r.body["id"].as_str().unwrap().to_string();

        let t0 = now_ms();
        // On, off, on, off, on: 10 s apart, the 5 s window sees one point each time.
        for (i, v) in [5.0, 0.5, 5.0, 0.5, 5.0].into_iter().enumerate() {
            let t = t0 + i as i64 * 10_000;
            points(&app, &ids[0], "load", &[(t - 1_000, v)], t).await;
            points(&app, &ids[1], "load", &[(t - 1_000, v)], t).await;
            evaluate(&app, &notifier, t).await;
        }
        let texts = inbox.slack.lock().unwrap().clone();
        let mine: Vec<&String> = texts.iter().filter(|t| t.contains(&ids[0])).collect();
        assert_eq!(mine.len(), 3, "firing, resolved, flapping — then quiet: {texts:?}");
        assert!(mine[2].starts_with("[FLAPPING]"), "{mine:?}");
        assert!(!texts.iter().any(|t| t.contains(&ids[1])), "the silenced device is never notified: {texts:?}");
        let d = app.call(Method::GET, "/api/v1/notifications", Some(&operator), None).await;
        assert!(
            d.body.as_array().unwrap().iter().any(|n| n["status"] == "silenced" && n["device_id"] == ids[1].as_str())
        );

        // It stays on for a whole flap window: settled, notified as firing once.
        for k in 1..=7 {
            let t = t0 + 40_000 + k * 10_000;
            points(&app, &ids[0], "load", &[(t - 1_000, 5.0)], t).await;
            evaluate(&app, &notifier, t).await;
        }
        let texts = inbox.slack.lock().unwrap().clone();
        let mine: Vec<&String> = texts.iter().filter(|t| t.contains(&ids[0])).collect();
        assert_eq!(mine.len(), 4, "{texts:?}");
        assert!(mine[3].starts_with("[FIRING]"), "{mine:?}");

        // Expired silence: the muted device's next change is notified.
        let r = post(&app, &operator, &format!("/api/v1/silences/{silence}/expire"), json!({})).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        let t = t0 + 200_000;
        points(&app, &ids[1], "load", &[(t - 1_000, 0.1)], t).await;
        evaluate(&app, &notifier, t).await;
        let t = t0 + 300_000;
        points(&app, &ids[1], "load", &[(t - 1_000, 9.0)], t).await;
        evaluate(&app, &notifier, t).await;
        assert!(inbox.slack.lock().unwrap().iter().any(|t| t.contains(&ids[1])), "{:?}", inbox.slack.lock().unwrap());
    });
}

/// Tried: a device offline past the limit (fires) and back (resolves); a silent device; the
/// share of a group offline; a fleet average; a second replica that does not hold the lease.
#[tokio::test]
async fn absence_and_fleet_rules() {
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    each_backend!(|app| {
        let operator = app.token("operator").await;
        let ids = accepted_devices(&app, "ABS", 4).await;
        let notifier = Notifier::new(Default::default()).unwrap();
        let t0 = now_ms();
        for id in &ids {
            drover_server::presence::record_status(&app.db, id, true, t0 - 3_600_000).await.unwrap();
        }
        let r = post(&app, &operator, "/api/v1/groups", json!({"name": "edge", "kind": "static"})).await;
        let gid = r.body["id"].as_str().unwrap().to_string();
        post(&app, &operator, &format!("/api/v1/groups/{gid}/devices"), json!({"devices": [ids[0], ids[1]]})).await;
        for rule in [
            json!({"name": "gone", "condition": {"kind": "absence", "mode": "offline", "minutes": 10}}),
            json!({"name": "quiet", "condition": {"kind": "absence", "mode": "silent", "minutes": 5}}),
            json!({"name": "edge down", "group": gid, "condition": {"kind": "fleet_offline", "percent": 40}}),
            json!({"name": "fleet warm", "condition": {"kind": "fleet_metric", "metric": "temp", "op": ">", "threshold": 50, "window_s": 60, "aggregate": "avg"}}),
        ] {
            let r = post(&app, &operator, "/api/v1/alert-rules", rule).await;
            assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        }
        let r = post(
            &app,
            &operator,
            "/api/v1/alert-rules",
            json!({"name": "x", "condition": {"kind": "fleet_offline", "percent": 140}}),
        )
        .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        drover_server::presence::record_status(&app.db, &ids[0], false, t0 - 20 * 60_000).await.unwrap();
        points(&app, &ids[2], "temp", &[(t0 - 30 * 60_000, 70.0)], t0 - 30 * 60_000).await;
        points(&app, &ids[3], "temp", &[(t0 - 10_000, 60.0)], t0).await;
        points(&app, &ids[1], "temp", &[(t0 - 10_000, 50.0)], t0).await;

        // One replica evaluates at a time: the lease is free, then held, then expired.
        assert!(tick(&app.db, "replica-b", t0).await.unwrap().is_some(), "the free lease is taken");
        assert_eq!(tick(&app.db, "replica-a", t0 + 1_000).await.unwrap(), None, "b holds the lease");
        assert_eq!(
            tick(&app.db, "replica-a", t0 + 16_000).await.unwrap(),
            Some(4),
            "b's lease expired; every rule evaluated"
        );
        assert_eq!(tick(&app.db, "replica-b", t0 + 17_000).await.unwrap(), None, "a holds the lease");
        deliver_due(&app.db, &notifier, t0).await.unwrap();
        let mut firing = states(&app, &operator).await;
        firing.sort();
        let mut want = vec![
            (ids[0].clone(), "gone".to_string()),
            (ids[2].clone(), "quiet".to_string()),
            ("fleet".to_string(), "edge down".to_string()),
            ("fleet".to_string(), "fleet warm".to_string()),
        ];
        want.sort();
        assert_eq!(firing, want);

        // The device is back: its absence alert and the group's share resolve.
        drover_server::presence::record_status(&app.db, &ids[0], true, t0 + 20_000).await.unwrap();
        points(&app, &ids[2], "uptime", &[(t0 + 20_000, 10.0)], t0 + 20_000).await;
        assert!(tick(&app.db, "replica-a", t0 + 21_000).await.unwrap().is_some());
        let firing = states(&app, &operator).await;
        assert_eq!(firing, vec![("fleet".to_string(), "fleet warm".to_string())], "{firing:?}");
    });
}

/// Tried: a rule set with a duplicate rule id and one with an action name outside the
/// alphabet (refused); a viewer putting one (refused). A device in two groups gets the
/// merged set on change and again on hello; the applied version comes from its event.
#[tokio::test]
async fn device_rule_sets_are_pushed_on_change_and_on_hello() {
    each_backend!(|app| {
        let operator = app.token("operator").await;
        let viewer = app.token("viewer").await;
        let ids = accepted_devices(&app, "RUL", 2).await;
        let (tx, mut rx) = tokio::sync::mpsc::channel(64);
        let (stop_tx, stop) = tokio::sync::watch::channel(false);
        drover_server::device_rules::start_with(app.db.clone(), tx, stop);
        let r = post(&app, &operator, "/api/v1/groups", json!({"name": "a-static", "kind": "static"})).await;
        let g1 = r.body["id"].as_str().unwrap().to_string();
        post(&app, &operator, &format!("/api/v1/groups/{g1}/devices"), json!({"devices": [ids[0]]})).await;
        app.call(
            Method::PUT,
            &format!("/api/v1/devices/{}/tags", ids[0]),
            Some(&operator),
            Some(json!({"tags": {"hw": "pi"}})),
        )
        .await;
        let r = post(
            &app,
            &operator,
            "/api/v1/groups",
            json!({"name": "b-dynamic", "kind": "dynamic", "filter": "tag.hw = pi"}),
        )
        .await;
        let g2 = r.body["id"].as_str().unwrap().to_string();

        let hot = json!({"id": "hot", "name": "hot", "metric": "cpu.temp", "op": ">", "threshold": 80, "for_s": 60, "raise": {"name": "cpu.hot", "severity": "warning"}});
        let put = |g: String, rules: Value, token: String| {
            let app = &app;
            async move {
                app.call(
                    Method::PUT,
                    &format!("/api/v1/device-rule-sets/{g}"),
                    Some(&token),
                    Some(json!({"rules": rules})),
                )
                .await
            }
        };
        let r = put(g1.clone(), json!([hot.clone(), hot.clone()]), operator.clone()).await;
        assert!(r.status == StatusCode::BAD_REQUEST && r.text.contains("twice"), "{}", r.text);
        let r = put(
            g1.clone(),
            json!([{"id": "x", "name": "x", "event": "door.open", "action": "rm -rf /"}]),
            operator.clone(),
        )
        .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text);
        let r = put(g1.clone(), json!([hot.clone()]), viewer.clone()).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN);

        let r = put(g1.clone(), json!([hot]), operator.clone()).await;
        assert_eq!((r.status, r.body["version"].as_u64()), (StatusCode::OK, Some(1)), "{}", r.text);
        let door = json!({"id": "door", "name": "door", "event": "door.open", "action": "restart-app"});
        let other_hot = json!({"id": "hot", "name": "hot elsewhere", "metric": "cpu.temp", "op": ">", "threshold": 99, "raise": {"name": "x", "severity": "info"}});
        let r = put(g2.clone(), json!([door, other_hot]), operator.clone()).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);

        let mut got = None;
        while let Some(m) = next_push(&mut rx).await {
            let done = m.1["rules"].as_array().map(|a| a.len()) == Some(2);
            got = Some(m);
            if done {
                break;
            }
        }
        let (topic, set) = got.expect("a rule set was pushed");
        assert_eq!(topic, format!("drover/v1/d/{}/down/rules", ids[0]));
        let names: Vec<&str> = set["rules"].as_array().unwrap().iter().map(|r| r["name"].as_str().unwrap()).collect();
        assert_eq!(names, ["hot", "door"], "a-static's hot wins over b-dynamic's");
        let version = set["version"].as_u64().unwrap();
        assert!(version >= 1);

        // The device connects again: the same set, re-sent on its hello.
        let hello = json!({"v": 1, "agent": "drover-agent/test"}).to_string();
        drover_server::devnet::handle_uplink(
            &app.db,
            &app.state.engine,
            &format!("drover/v1/d/{}/up/hello", ids[0]),
            hello.as_bytes(),
        )
        .await;
        let (topic, set2) = next_push(&mut rx).await.expect("re-sent on hello");
        assert_eq!(topic, format!("drover/v1/d/{}/down/rules", ids[0]));
        assert_eq!((set2["version"].as_u64(), set2["rules"].clone()), (Some(version), set["rules"].clone()));
        // The other device has no rules and gets nothing on its hello.
        drover_server::devnet::handle_uplink(
            &app.db,
            &app.state.engine,
            &format!("drover/v1/d/{}/up/hello", ids[1]),
            hello.as_bytes(),
        )
        .await;
        // Then the first device again: the next push is its own, so the other got nothing.
        drover_server::devnet::handle_uplink(
            &app.db,
            &app.state.engine,
            &format!("drover/v1/d/{}/up/hello", ids[0]),
            hello.as_bytes(),
        )
        .await;
        let (topic, _) = next_push(&mut rx).await.expect("re-sent on the first device's hello");
        assert_eq!(topic, format!("drover/v1/d/{}/down/rules", ids[0]), "the device without rules got a push");

        let data = format!("{{\"version\":{version}}}");
        let t = now_ms();
        let batch = Batch {
            device_id: ids[0].clone(),
            seq: 0,
            points: vec![],
            events: vec![Event {
                id: "ap1".into(),
                t,
                name: "drover.rules.applied".into(),
                severity: "info".into(),
                data,
            }],
            dropped: 0,
            refused_future: 0,
            refused_old: 0,
        };
        drover_server::telemetry::store::write(&app.db, &Cache::default(), &[batch], t, LATE_AFTER_MS).await.unwrap();
        let v = app.call(Method::GET, &format!("/api/v1/devices/{}/rules", ids[0]), Some(&viewer), None).await;
        assert_eq!(v.status, StatusCode::OK, "{}", v.text);
        assert_eq!((v.body["version"].as_u64(), v.body["applied_version"].as_u64()), (Some(version), Some(version)));
        assert_eq!(v.body["conflicts"].as_array().unwrap().len(), 1, "{}", v.text);
        let _ = stop_tx.send(true);
    });
}

mod pages {
    use axum::body::Body;
    use axum::http::{Request, StatusCode, header};

    use crate::each_backend;
    use crate::support::{ADMIN_PASSWORD, Resp, TestApp};

    fn form(pairs: &[(&str, &str)]) -> String {
        let enc = |v: &str| -> String {
            v.bytes()
                .map(|b| {
                    if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                        (b as char).to_string()
                    } else {
                        format!("%{b:02X}")
                    }
                })
                .collect()
        };
        pairs.iter().map(|(k, v)| format!("{k}={}", enc(v))).collect::<Vec<_>>().join("&")
    }

    fn extract(html: &str, before: &str) -> String {
        let start = html.find(before).unwrap() + before.len();
        html[start..start + html[start..].find('"').unwrap()].to_string()
    }

    async fn get(app: &TestApp, path: &str, cookie: &str) -> Resp {
        app.send(Request::get(path).header(header::COOKIE, cookie).body(Body::empty()).unwrap()).await
    }

    async fn post(app: &TestApp, path: &str, cookie: &str, pairs: &[(&str, &str)]) -> Resp {
        let req = Request::post(path)
            .header(header::COOKIE, cookie)
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(Body::from(form(pairs)))
            .unwrap();
        app.send(req).await
    }

    /// Tried: a form without the CSRF token (refused), a rule form without a threshold, a
    /// device rule set that is not JSON (both sent back with the reason).
    #[tokio::test]
    async fn alert_pages_create_rules_channels_silences_and_rule_sets() {
        each_backend!(config = super::allow_local, |app| {
            let page = app.send(Request::get("/login").body(Body::empty()).unwrap()).await;
            let login_cookie =
                page.headers.get(header::SET_COOKIE).unwrap().to_str().unwrap().split(';').next().unwrap().to_string();
            let csrf = extract(&page.text, r#"name="csrf" value=""#);
            let r = post(
                &app,
                "/login",
                &login_cookie,
                &[("username", "admin"), ("password", ADMIN_PASSWORD), ("csrf", &csrf), ("next", "/")],
            )
            .await;
            let cookie = r
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
            let rules_page = get(&app, "/alerts/rules", &cookie).await;
            assert_eq!(rules_page.status, StatusCode::OK, "{}", rules_page.text);
            let csrf = extract(&rules_page.text, r#"name="csrf" value=""#);

            let r = post(
                &app,
                "/alerts/rules",
                &cookie,
                &[("csrf", "wrong"), ("name", "x"), ("kind", "offline"), ("minutes", "5")],
            )
            .await;
            assert_eq!(r.status, StatusCode::FORBIDDEN);
            let r = post(
                &app,
                "/alerts/channels",
                &cookie,
                &[("csrf", &csrf), ("name", "hook"), ("kind", "webhook"), ("target", "http://127.0.0.1:9/h")],
            )
            .await;
            let to = r.headers.get(header::LOCATION).unwrap().to_str().unwrap().to_string();
            assert!(to.contains("signing%20secret") || to.contains("signing+secret") || to.contains("whsec_"), "{to}");
            let r = post(
                &app,
                "/alerts/rules",
                &cookie,
                &[
                    ("csrf", &csrf),
                    ("name", "hot"),
                    ("kind", "threshold"),
                    ("metric", "cpu.percent"),
                    ("op", ">"),
                    ("threshold", ""),
                    ("window_min", "5"),
                    ("aggregate", "avg"),
                ],
            )
            .await;
            // The form comes back with the error under its field and the input kept.
            assert_eq!(r.status, axum::http::StatusCode::BAD_REQUEST, "{}", r.text);
            assert!(r.text.contains("threshold") && r.text.contains("value=\"cpu.percent\""), "{}", r.text);
            let r = post(
                &app,
                "/alerts/rules",
                &cookie,
                &[
                    ("csrf", &csrf),
                    ("name", "hot"),
                    ("kind", "threshold"),
                    ("metric", "cpu.percent"),
                    ("op", ">"),
                    ("threshold", "90"),
                    ("window_min", "5"),
                    ("aggregate", "max"),
                    ("filter", "tag.site = berlin"),
                ],
            )
            .await;
            assert!(r.headers.get(header::LOCATION).unwrap().to_str().unwrap().contains("notice="), "{:?}", r.headers);
            let page = get(&app, "/alerts/rules", &cookie).await;
            assert!(
                page.text.contains("max(cpu.percent) &gt; 90 over 5m") && page.text.contains("Send a test"),
                "{}",
                page.text
            );
            let id = app
                .call(axum::http::Method::GET, "/api/v1/alert-rules/hot", Some(&app.admin_token.clone()), None)
                .await
                .body["id"]
                .as_str()
                .unwrap()
                .to_string();
            post(&app, &format!("/alerts/rules/{id}/disable"), &cookie, &[("csrf", &csrf)]).await;
            let r = app
                .call(axum::http::Method::GET, "/api/v1/alert-rules/hot", Some(&app.admin_token.clone()), None)
                .await;
            assert_eq!(r.body["enabled"], false);

            let r = post(
                &app,
                "/alerts/silences",
                &cookie,
                &[("csrf", &csrf), ("rule", &id), ("filter", ""), ("hours", "2"), ("reason", "window cleaning")],
            )
            .await;
            assert!(r.headers.get(header::LOCATION).unwrap().to_str().unwrap().contains("notice="));
            let page = get(&app, "/alerts", &cookie).await;
            assert!(page.text.contains("window cleaning") && page.text.contains("Expire"), "{}", page.text);

            let g = app
                .call(
                    axum::http::Method::POST,
                    "/api/v1/groups",
                    Some(&app.admin_token.clone()),
                    Some(serde_json::json!({"name": "pis", "kind": "static"})),
                )
                .await;
            let gid = g.body["id"].as_str().unwrap().to_string();
            let r = post(&app, "/device-rules", &cookie, &[("csrf", &csrf), ("group", &gid), ("rules", "[{")]).await;
            assert!(r.headers.get(header::LOCATION).unwrap().to_str().unwrap().contains("error="));
            let rules = r#"[{"id": "hot", "name": "hot", "metric": "cpu.temp", "op": ">", "threshold": 80, "raise": {"name": "cpu.hot", "severity": "warning"}}]"#;
            post(&app, "/device-rules", &cookie, &[("csrf", &csrf), ("group", &gid), ("rules", rules)]).await;
            let page = get(&app, "/device-rules", &cookie).await;
            assert!(page.text.contains("pis") && page.text.contains("cpu.hot"), "{}", page.text);
        });
    }
}

/// The next message the device-rules pusher queued, waiting up to 5 s.
async fn next_push(rx: &mut tokio::sync::mpsc::Receiver<drover_server::engine::Outgoing>) -> Option<(String, Value)> {
    let m = tokio::time::timeout(std::time::Duration::from_secs(5), rx.recv()).await.ok()??;
    Some((m.topic, serde_json::from_slice(&m.payload).unwrap()))
}
