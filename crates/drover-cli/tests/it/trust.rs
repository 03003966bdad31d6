//! `drover trust-root set|show` against a real droverd: the first root, a rotation signed by
//! the old root key, a root that is not newer, one the rotation rules refuse, and a viewer.

use super::{Server, drover, fails, json, ok};

#[test]
fn trust_root_set_show_and_rotate() {
    let s = Server::start();
    let cfg = s.config_path("trust");
    let admin = [("DROVER_URL", s.url.as_str()), ("DROVER_TOKEN", s.admin_token.as_str())];
    let run = |args: &[&str]| drover(&cfg, &admin, args, None);
    let p = |name: &str| s.dir.join(name).to_str().unwrap().to_string();
    let key_id = |name: &str| {
        let v = json(&run(&["-o", "json", "artifact", "keygen", "--out", &p(name)]));
        v["key_id"].as_str().unwrap().to_string()
    };
    key_id("root.key");
    key_id("other-root.key");
    let rel1 = key_id("ci-1.key");
    let rel2 = key_id("ci-2.key");

    let err = fails(&run(&["trust-root", "show"]));
    assert!(err.contains("no trust root yet") && err.contains("drover trust-root set"), "{err}");

    let create = |version: &str, signer: &str, release: &str, out: &str| {
        ok(&run(&[
            "artifact",
            "root",
            "create",
            "--version",
            version,
            "--root-key",
            &p(signer),
            "--release-key",
            &p(&format!("{release}.pub")),
            "--out",
            &p(out),
        ]));
    };
    create("1", "root.key", "ci-1.key", "root-1.json");
    let v = json(&run(&["-o", "json", "trust-root", "set", &p("root-1.json")]));
    assert_eq!((v["version"].as_u64(), v["release_keys"].clone()), (Some(1), serde_json::json!([rel1])));
    let shown = ok(&run(&["trust-root", "show"]));
    assert!(shown.contains("version:") && shown.contains(&rel1), "{shown}");

    // The same version again is not newer: refused, and the server keeps version 1.
    let err = fails(&run(&["trust-root", "set", &p("root-1.json")]));
    assert!(err.contains("not newer than the current version 1") && err.contains("conflict"), "{err}");

    // Version 2 signed only by a key the current root does not list: refused.
    create("2", "other-root.key", "ci-2.key", "root-2-bad.json");
    let err = fails(&run(&["trust-root", "set", &p("root-2-bad.json")]));
    assert!(err.contains("HTTP 400"), "{err}");

    // A rotation signed by the current root key: the chain has both versions.
    create("2", "root.key", "ci-2.key", "root-2.json");
    let v = json(&run(&["-o", "json", "trust-root", "set", &p("root-2.json")]));
    assert_eq!((v["version"].as_u64(), v["chain"].clone()), (Some(2), serde_json::json!([1, 2])));
    assert_eq!(json(&run(&["-o", "json", "trust-root", "show"]))["release_keys"], serde_json::json!([rel2]));

    // Not JSON, no file, and a viewer.
    std::fs::write(p("junk.json"), "not json").unwrap();
    let err = fails(&run(&["trust-root", "set", &p("junk.json")]));
    assert!(err.contains("is not JSON"), "{err}");
    let err = fails(&run(&["trust-root", "set", &p("missing.json")]));
    assert!(err.contains("cannot read"), "{err}");
    let viewer = ok(&run(&["token", "create", "--name", "v", "--role", "viewer"])).trim().to_string();
    let as_viewer = [("DROVER_URL", s.url.as_str()), ("DROVER_TOKEN", viewer.as_str())];
    let err = fails(&drover(&cfg, &as_viewer, &["trust-root", "set", &p("root-2.json")], None));
    assert!(err.contains("permission denied"), "{err}");
    assert_eq!(json(&drover(&cfg, &as_viewer, &["-o", "json", "trust-root", "show"], None))["version"], 2);
}
