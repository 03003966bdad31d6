//! `drover alert …` and `drover rules …` against a real droverd (its evaluator running every
//! second): a channel to a local receiver, a rule that fires on a device's telemetry, the
//! alert list and history, a silence, enable/disable, device rule sets. Bad input tried: a
//! condition that does not parse and a filter that does not parse (refused before any
//! request), an unknown channel name, a rule set file that is not JSON, a viewer creating a
//! rule (the server's 403).

use std::sync::{Arc, Mutex};

use serde_json::{Value, json};

use super::{Server, drover, fails, json as json_out, ok};

fn api(s: &Server, token: &str, method: &str, path: &str, body: Value) -> Value {
    let url = format!("{}/api/v1{path}", s.url);
    let auth = format!("Bearer {token}");
    let resp = match method {
        "PUT" => ureq::put(&url).header("Authorization", &auth).send_json(body),
        _ => ureq::post(&url).header("Authorization", &auth).send_json(body),
    };
    resp.unwrap().into_body().read_json().unwrap()
}

fn eventually<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(std::time::Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

#[test]
fn alert_rules_channels_silences_and_device_rule_sets() {
    let s = Server::start();
    let cfg = s.config_path("a");
    ok(&drover(&cfg, &[], &["login", "--url", &s.url, "--token", &s.admin_token], None));

    // A Slack-style receiver.
    let got: Arc<Mutex<Vec<String>>> = Arc::default();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let receiver = {
        let got = got.clone();
        rt.block_on(async move {
            let app = axum::Router::new().route(
                "/slack/x",
                axum::routing::post(move |body: String| {
                    let got = got.clone();
                    async move {
                        let v: Value = serde_json::from_str(&body).unwrap();
                        got.lock().unwrap().push(v["text"].as_str().unwrap().to_string());
                        "ok"
                    }
                }),
            );
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = l.local_addr().unwrap();
            tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
            format!("http://{addr}/slack/x")
        })
    };
    let out =
        ok(&drover(&cfg, &[], &["alert", "channel", "create", "chat", "--kind", "slack", "--target", &receiver], None));
    assert!(out.contains("chat") && !out.contains("/slack/x"), "{out}");
    let out = ok(&drover(&cfg, &[], &["alert", "channel", "test", "chat"], None));
    assert!(out.contains("sent"), "{out}");
    assert_eq!(got.lock().unwrap().len(), 1);

    // Bad input, refused before any request or by the server.
    let e = fails(&drover(&cfg, &[], &["alert", "rule", "create", "hot", "--when", "cpu.percent >> 90"], None));
    assert!(e.contains("METRIC OP NUMBER"), "{e}");
    let e = fails(&drover(
        &cfg,
        &[],
        &["alert", "rule", "create", "hot", "--when", "cpu > 1", "--filter", "tag.site ="],
        None,
    ));
    assert!(e.contains("invalid filter"), "{e}");
    let e =
        fails(&drover(&cfg, &[], &["alert", "rule", "create", "hot", "--when", "cpu > 1", "--channels", "nope"], None));
    assert!(e.contains("nope"), "{e}");
    let viewer = api(&s, &s.admin_token, "POST", "/tokens", json!({"name": "v", "role": "viewer"}));
    let vcfg = s.config_path("v");
    ok(&drover(&vcfg, &[], &["login", "--url", &s.url, "--token", viewer["secret"].as_str().unwrap()], None));
    let e = fails(&drover(&vcfg, &[], &["alert", "rule", "create", "hot", "--when", "cpu > 1"], None));
    assert!(e.contains("permission denied"), "{e}");

    // A device, hot.
    api(&s, &s.admin_token, "POST", "/devices/preauthorize", json!({"identities": [{"serial": "a-1"}]}));
    let key = rcgen::KeyPair::generate().unwrap();
    let csr = rcgen::CertificateParams::default().serialize_request(&key).unwrap().pem().unwrap();
    let r = api(&s, &s.admin_token, "POST", "/enroll", json!({"csr_pem": csr, "identity": {"serial": "a-1"}}));
    let id = r["device_id"].as_str().unwrap().to_string();
    let out = json_out(&drover(
        &cfg,
        &[],
        &[
            "-o",
            "json",
            "alert",
            "rule",
            "create",
            "hot",
            "--when",
            "cpu.percent > 90",
            "--for",
            "10m",
            "--agg",
            "max",
            "--channels",
            "chat",
            "--severity",
            "critical",
        ],
        None,
    ));
    assert_eq!(out["description"], "max(cpu.percent) > 90 over 10m");
    let db_url = format!("sqlite://{}?mode=rw", s.dir.join("data").join("drover.db").display());
    rt.block_on(async {
        let db = drover_server::db::Db::open(&db_url).await.unwrap();
        let now = drover_server::time::now_ms();
        let batch = drover_server::telemetry::store::Batch {
            device_id: id.clone(),
            seq: 0,
            points: vec![drover_server::telemetry::store::Point { name: "cpu.percent".into(), t: now - 1000, v: 99.5 }],
            events: vec![],
            dropped: 0,
            refused_future: 0,
            refused_old: 0,
        };
        drover_server::telemetry::store::write(&db, &Default::default(), &[batch], now, 120_000).await.unwrap();
        db.close().await;
    });
    let list = eventually("the alert to fire", || {
        let v = json_out(&drover(&cfg, &[], &["-o", "json", "alert", "list", "--firing"], None));
        (v.as_array().map(|a| a.len()) == Some(1)).then_some(v)
    });
    assert_eq!(list[0]["device_id"], id.as_str());
    eventually("the firing notification", || {
        got.lock().unwrap().iter().any(|t| t.starts_with("[FIRING] hot")).then_some(())
    });
    let table = ok(&drover(&cfg, &[], &["alert", "list"], None));
    assert!(table.contains("firing") && table.contains(&id), "{table}");
    let hist = ok(&drover(&cfg, &[], &["alert", "history", "--rule", "hot"], None));
    assert!(hist.contains("firing"), "{hist}");

    let out = ok(&drover(
        &cfg,
        &[],
        &["alert", "silence", "create", "--rule", "hot", "--for", "1h", "--reason", "maintenance"],
        None,
    ));
    assert!(out.contains("maintenance"), "{out}");
    let silences = json_out(&drover(&cfg, &[], &["-o", "json", "alert", "silence", "list"], None));
    let sid = silences[0]["id"].as_str().unwrap().to_string();
    assert_eq!(silences[0]["active"], true);
    ok(&drover(&cfg, &[], &["alert", "silence", "expire", &sid], None));
    let out = json_out(&drover(&cfg, &[], &["-o", "json", "alert", "rule", "disable", "hot"], None));
    assert_eq!(out["enabled"], false);
    let listed = ok(&drover(&cfg, &[], &["alert", "rule", "list"], None));
    assert!(listed.contains("hot") && listed.contains("off"), "{listed}");

    // Device rule sets.
    let g = api(&s, &s.admin_token, "POST", "/groups", json!({"name": "pis", "kind": "static"}));
    let gid = g["id"].as_str().unwrap();
    api(&s, &s.admin_token, "POST", &format!("/groups/{gid}/devices"), json!({"devices": [id]}));
    let file = s.dir.join("rules.json");
    std::fs::write(&file, "not json").unwrap();
    let e = fails(&drover(&cfg, &[], &["rules", "set", "pis", file.to_str().unwrap()], None));
    assert!(e.contains("not JSON"), "{e}");
    let set = json!({"rules": [{"id": "hot", "name": "hot", "metric": "cpu.temp", "op": ">", "threshold": 80, "raise": {"name": "cpu.hot", "severity": "warning"}}]});
    std::fs::write(&file, set.to_string()).unwrap();
    let out = json_out(&drover(&cfg, &[], &["-o", "json", "rules", "set", "pis", file.to_str().unwrap()], None));
    assert_eq!(out["version"], 1);
    let out = ok(&drover(&cfg, &[], &["rules", "show", "--device", &id], None));
    assert!(out.contains("cpu.hot") && out.contains("pis"), "{out}");
    ok(&drover(&cfg, &[], &["rules", "delete", "pis"], None));
    let out = ok(&drover(&cfg, &[], &["rules", "show"], None));
    assert!(!out.contains("pis"), "{out}");
    drop(rt);
}
