//! `drover metrics …` against a real droverd: a device's metrics and series, fleet
//! aggregates by filter and group, top devices, logs on demand refused for an offline device.
//! Bad input tried: a filter that does not parse (refused before any request), a step under a
//! second (the server's 400), an unknown --stat.

use serde_json::{Value, json};

use super::{Server, drover, fails, json as json_out, ok};

fn api(s: &Server, method: &str, path: &str, body: Value) -> Value {
    let url = format!("{}/api/v1{path}", s.url);
    let auth = format!("Bearer {}", s.admin_token);
    let resp = match method {
        "PUT" => ureq::put(&url).header("Authorization", &auth).send_json(body),
        _ => ureq::post(&url).header("Authorization", &auth).send_json(body),
    };
    resp.unwrap().into_body().read_json().unwrap()
}

#[test]
fn metrics_list_show_fleet_top_and_logs() {
    let s = Server::start();
    let cfg = s.config_path("m");
    ok(&drover(&cfg, &[], &["login", "--url", &s.url, "--token", &s.admin_token], None));
    // Two accepted devices, one in Berlin.
    let mut ids = Vec::new();
    for (serial, site) in [("m-1", "berlin"), ("m-2", "paris")] {
        api(&s, "POST", "/devices/preauthorize", json!({"identities": [{"serial": serial}]}));
        let key = rcgen::KeyPair::generate().unwrap();
        let csr = rcgen::CertificateParams::default().serialize_request(&key).unwrap().pem().unwrap();
        let r = api(&s, "POST", "/enroll", json!({"csr_pem": csr, "identity": {"serial": serial}}));
        let id = r["device_id"].as_str().unwrap().to_string();
        api(&s, "PUT", &format!("/devices/{id}/tags"), json!({"tags": {"site": site}}));
        ids.push(id);
    }
    // Telemetry stored through droverd's own write path: 10 minutes, a point a minute.
    let now = drover_server::time::now_ms();
    let t0 = now - now % 600_000 - 600_000;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let url = format!("sqlite://{}", s.dir.join("data").join("drover.db").display());
        let db = drover_server::db::Db::open(&url).await.unwrap();
        let batches: Vec<_> = ids
            .iter()
            .enumerate()
            .map(|(i, d)| drover_server::telemetry::store::Batch {
                device_id: d.clone(),
                seq: 1,
                points: (0..10)
                    .map(|k| drover_server::telemetry::store::Point {
                        name: "cpu.percent".into(),
                        t: t0 + k * 60_000,
                        v: (10 * (i + 1)) as f64 + k as f64,
                    })
                    .chain(std::iter::once(drover_server::telemetry::store::Point {
                        name: "mem.used".into(),
                        t: t0,
                        v: 1.0,
                    }))
                    .collect(),
                events: vec![],
                dropped: 0,
                refused_future: 0,
                refused_old: 0,
            })
            .collect();
        let cache = drover_server::telemetry::store::Cache::default();
        drover_server::telemetry::store::write(&db, &cache, &batches, now, 120_000).await.unwrap();
        db.close().await;
    });
    let (from, to) = (t0.to_string(), (t0 + 600_000).to_string());

    let out = ok(&drover(&cfg, &[], &["metrics", "list", &ids[0]], None));
    assert!(out.contains("cpu.percent") && out.contains("19"), "{out}");
    // The listing is paginated: one page of --limit, a hint on stderr; --all follows every page.
    let page = drover(&cfg, &[], &["metrics", "list", &ids[0], "--limit", "1"], None);
    let out = ok(&page);
    assert!(out.contains("cpu.percent") && !out.contains("mem.used"), "{out}");
    assert!(String::from_utf8_lossy(&page.stderr).contains("--all"), "{page:?}");
    let all = json_out(&drover(&cfg, &[], &["-o", "json", "metrics", "list", &ids[0], "--limit", "1", "--all"], None));
    let names: Vec<&str> = all.as_array().unwrap().iter().map(|m| m["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["cpu.percent", "mem.used"]);
    let v = json_out(&drover(
        &cfg,
        &[],
        &["-o", "json", "metrics", "show", &ids[0], "cpu.percent", "--from", &from, "--to", &to, "--step", "5m"],
        None,
    ));
    assert_eq!(v["resolution"], "1m");
    assert_eq!(v["points"][0]["count"], 5);
    assert_eq!(v["points"][0]["avg"], 12.0);
    // A duration alone means that long ago; the step is printed in its unit.
    let args = ["metrics", "show", &ids[0], "cpu.percent", "--from", "30m", "--step", "5m"];
    let v = json_out(&drover(&cfg, &[], &[&args[..], &["-o", "json"]].concat(), None));
    let counted: u64 = v["points"].as_array().unwrap().iter().map(|p| p["count"].as_u64().unwrap()).sum();
    assert_eq!(counted, 10, "all ten points are within the last 30 minutes: {v}");
    let out = ok(&drover(&cfg, &[], &args, None));
    assert!(out.starts_with(&format!("cpu.percent of {}, step 5m from 1m", ids[0])), "{out}");
    let out = ok(&drover(
        &cfg,
        &[],
        &[
            "metrics",
            "fleet",
            "cpu.percent",
            "--filter",
            "tag.site = \"berlin\"",
            "--from",
            &from,
            "--to",
            &to,
            "--step",
            "10m",
            "--stat",
            "max",
        ],
        None,
    ));
    assert!(out.contains("over 1 device(s)") && out.contains("MAX") && out.contains("19"), "{out}");
    let v = json_out(&drover(
        &cfg,
        &[],
        &["-o", "json", "metrics", "fleet", "cpu.percent", "--from", &from, "--to", &to, "--step", "10m"],
        None,
    ));
    assert_eq!(v["buckets"][0]["devices"], 2);
    assert_eq!(v["buckets"][0]["p95"], 24.5);
    let out = ok(&drover(
        &cfg,
        &[],
        &["metrics", "top", "cpu.percent", "-n", "1", "--by", "last", "--from", &from, "--to", &to],
        None,
    ));
    assert!(out.contains(&ids[1]) && !out.contains(&ids[0]) && out.contains("29"), "{out}");

    // Bad input: a filter that does not parse, a step under a second, an unknown statistic.
    let err = fails(&drover(&cfg, &[], &["metrics", "fleet", "cpu.percent", "--filter", "tag.site =="], None));
    assert!(err.contains("invalid filter"), "{err}");
    let err = fails(&drover(&cfg, &[], &["metrics", "show", &ids[0], "cpu.percent", "--step", "10ms"], None));
    assert!(err.contains("smallest step is 1s"), "{err}");
    let err = fails(&drover(&cfg, &[], &["metrics", "fleet", "cpu.percent", "--stat", "p99"], None));
    assert!(err.contains("--stat"), "{err}");
    // Logs from a device that is not connected: refused at once.
    let err = fails(&drover(&cfg, &[], &["metrics", "logs", &ids[0], "--journal"], None));
    assert!(err.contains("offline"), "{err}");
}
