//! `drover artifact …`: the real binary on real files; `upload` against a minimal HTTP server.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Output;

use serde_json::Value;

use super::{drover, fails, json, ok};

struct Dir(PathBuf);

impl Dir {
    fn new(tag: &str) -> Dir {
        let p = std::env::temp_dir().join(format!(
            "drover-cli-artifact-{tag}-{}-{}",
            std::process::id(),
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
        ));
        std::fs::create_dir_all(&p).unwrap();
        Dir(p)
    }

    fn p(&self, name: &str) -> String {
        self.0.join(name).to_str().unwrap().to_string()
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs `drover` offline (no server, an empty config).
fn run(d: &Dir, args: &[&str]) -> Output {
    drover(Path::new(&d.p("config.json")), &[], args, None)
}

/// Makes a key pair; returns its key id (from `-o json`: the table is for people).
fn keygen(d: &Dir, name: &str) -> String {
    let v = json(&run(d, &["-o", "json", "artifact", "keygen", "--out", &d.p(name)]));
    v["key_id"].as_str().unwrap().to_string()
}

fn write(d: &Dir, name: &str, data: &[u8]) -> String {
    std::fs::write(d.p(name), data).unwrap();
    d.p(name)
}

/// A payload of 50 000 bytes and an artifact built from it, signed by `key` if given.
fn build(d: &Dir, out: &str, key: Option<&str>) -> String {
    let payload = write(d, "firmware.bin", &(0..50_000u32).map(|i| (i * 7 % 251) as u8).collect::<Vec<_>>());
    let mut args = vec![
        "artifact",
        "build",
        "--name",
        "edge-app",
        "--version",
        "1.4.2",
        "--device-type",
        "rpi4",
        "--device-type",
        "x86-gw",
        "--type",
        "file",
        "--payload",
        &payload,
        "--provides",
        "app.edge-app.version=1.4.2",
        "--depends",
        "os.version=12,13",
        "--arg",
        "dest=/opt/edge",
        "--out",
    ];
    let out_path = d.p(out);
    args.push(&out_path);
    let key_path;
    if let Some(k) = key {
        key_path = d.p(k);
        args.extend(["--key", &key_path]);
    }
    ok(&run(d, &args));
    out_path
}

#[test]
fn keygen_writes_a_private_key_only_its_owner_reads() {
    use std::os::unix::fs::PermissionsExt as _;
    let d = Dir::new("keygen");
    let out = run(&d, &["artifact", "keygen", "--out", &d.p("release.key")]);
    // What it wrote is output (stdout), so `>/dev/null` quiets it; stderr stays for problems.
    let text = ok(&out);
    assert!(out.stderr.is_empty(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("(keep it secret)") && text.contains("release.key.pub"), "{text}");
    let id = text.lines().next().unwrap().strip_prefix("key id:").unwrap().trim().to_string();
    assert_eq!(id.len(), 16, "{id}");
    let mode = std::fs::metadata(d.p("release.key")).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let private = std::fs::read_to_string(d.p("release.key")).unwrap();
    assert!(private.starts_with("-----BEGIN PRIVATE KEY-----\n"), "{private}");
    let public = std::fs::read_to_string(d.p("release.key.pub")).unwrap();
    let parsed: drover_artifact::PublicKey = public.parse().unwrap();
    assert_eq!(parsed.key_id(), id);
    assert_eq!(drover_artifact::SigningKey::from_pem(&private).unwrap().public(), parsed);

    // An existing key is not overwritten by accident.
    let err = fails(&run(&d, &["artifact", "keygen", "--out", &d.p("release.key")]));
    assert!(err.contains("--force"), "{err}");
    assert_eq!(std::fs::read_to_string(d.p("release.key")).unwrap(), private);
    let v = json(&run(&d, &["-o", "json", "artifact", "keygen", "--out", &d.p("release.key"), "--force"]));
    assert_ne!(v["key_id"], id.as_str());
    assert_eq!(v["public"], std::fs::read_to_string(d.p("release.key.pub")).unwrap().trim());
}

#[test]
fn build_verify_and_tamper() {
    let d = Dir::new("verify");
    let id = keygen(&d, "release.key");
    keygen(&d, "other.key");
    let art = build(&d, "edge.drover", Some("release.key"));

    let v = json(&run(&d, &["-o", "json", "artifact", "verify", &art, "--key", &d.p("release.key.pub")]));
    assert_eq!(v["ok"], true);
    assert_eq!(v["verified_key"], id.as_str());
    assert_eq!(v["name"], "edge-app");
    let data = std::fs::read(&art).unwrap();
    assert_eq!(v["size"], data.len() as u64);
    assert_eq!(v["sha256"], drover_artifact::sha256_hex(&data));
    // The key may be given as text too.
    let public = std::fs::read_to_string(d.p("release.key.pub")).unwrap();
    ok(&run(&d, &["artifact", "verify", &art, "--key", public.trim()]));

    // Another key.
    let err = fails(&run(&d, &["artifact", "verify", &art, "--key", &d.p("other.key.pub")]));
    assert!(err.contains(&id) && err.contains("not list"), "{err}");

    // One payload byte flipped.
    let mut bad = data.clone();
    let n = bad.len();
    bad[n - 100] ^= 1;
    let bad_payload = write(&d, "bad-payload.drover", &bad);
    let err = fails(&run(&d, &["artifact", "verify", &bad_payload, "--key", &d.p("release.key.pub")]));
    assert!(err.contains("\"firmware.bin\"") && err.contains("SHA-256"), "{err}");

    // One manifest byte changed: 1.4.2 -> 1.4.3.
    let mut bad = data.clone();
    let at = bad.windows(7).position(|w| w == b"\"1.4.2\"").unwrap() + 5;
    bad[at] = b'3';
    let bad_manifest = write(&d, "bad-manifest.drover", &bad);
    let err = fails(&run(&d, &["artifact", "verify", &bad_manifest, "--key", &d.p("release.key.pub")]));
    assert!(err.contains("does not match the manifest"), "{err}");

    // Truncated, and with bytes appended.
    let cut = write(&d, "cut.drover", &data[..data.len() - 1]);
    let err = fails(&run(&d, &["artifact", "verify", &cut, "--key", &d.p("release.key.pub")]));
    assert!(err.contains("truncated"), "{err}");
    let mut long = data.clone();
    long.push(b'\n');
    let long = write(&d, "long.drover", &long);
    let err = fails(&run(&d, &["artifact", "verify", &long, "--key", &d.p("release.key.pub")]));
    assert!(err.contains("after its last payload"), "{err}");

    // Not an artifact at all.
    let txt = write(&d, "notes.txt", b"hello");
    let err = fails(&run(&d, &["artifact", "verify", &txt, "--key", &d.p("release.key.pub")]));
    assert!(err.contains("not a Drover artifact"), "{err}");
    // Neither --root nor --key.
    fails(&run(&d, &["artifact", "verify", &art]));
}

#[test]
fn sign_in_place_and_to_another_file() {
    let d = Dir::new("sign");
    let id = keygen(&d, "release.key");
    let id2 = keygen(&d, "second.key");
    let art = build(&d, "edge.drover", None);
    let err = fails(&run(&d, &["artifact", "verify", &art, "--key", &d.p("release.key.pub")]));
    assert!(err.contains("not signed"), "{err}");

    let unsigned = std::fs::read(&art).unwrap();
    ok(&run(&d, &["artifact", "sign", "--key", &d.p("release.key"), &art]));
    ok(&run(&d, &["artifact", "verify", &art, "--key", &d.p("release.key.pub")]));
    assert_ne!(std::fs::read(&art).unwrap(), unsigned);
    let leftovers: Vec<_> = std::fs::read_dir(&d.0)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    let v = json(&run(
        &d,
        &["-o", "json", "artifact", "sign", "--key", &d.p("second.key"), &art, "--out", &d.p("two.drover")],
    ));
    assert_eq!(v["signed_by"], serde_json::json!([id, id2]));
    ok(&run(&d, &["artifact", "verify", &d.p("two.drover"), "--key", &d.p("second.key.pub")]));
    ok(&run(&d, &["artifact", "verify", &d.p("two.drover"), "--key", &d.p("release.key.pub")]));

    // Signing a corrupt artifact fails and leaves the file as it was.
    let mut bad = std::fs::read(&art).unwrap();
    let n = bad.len();
    bad[n - 1] ^= 1;
    let bad_path = write(&d, "bad.drover", &bad);
    let err = fails(&run(&d, &["artifact", "sign", "--key", &d.p("second.key"), &bad_path]));
    assert!(err.contains("firmware.bin"), "{err}");
    assert_eq!(std::fs::read(&bad_path).unwrap(), bad);
}

#[test]
fn inspect_shows_the_manifest_and_signatures() {
    let d = Dir::new("inspect");
    let id = keygen(&d, "release.key");
    let app = d.0.join("app");
    std::fs::create_dir_all(app.join("bin")).unwrap();
    std::fs::write(app.join("bin/run"), b"#!/bin/sh\n").unwrap();
    write(&d, "sbom.spdx.json", b"{\"spdxVersion\":\"SPDX-2.3\"}");
    let art = d.p("app.drover");
    let built = json(&run(
        &d,
        &[
            "-o",
            "json",
            "artifact",
            "build",
            "--name",
            "edge-app",
            "--version",
            "2.0.0",
            "--device-type",
            "rpi4",
            "--type",
            "app",
            "--dir",
            app.to_str().unwrap(),
            "--sbom",
            &d.p("sbom.spdx.json"),
            "--source",
            "https://git.example/acme/edge",
            "--commit",
            "0123abc",
            "--build-id",
            "ci-123",
            "--key",
            &d.p("release.key"),
            "--out",
            &art,
        ],
    ));
    assert_eq!(built["signed_by"], serde_json::json!([id]));
    let v = json(&run(&d, &["-o", "json", "artifact", "inspect", &art]));
    let m = &v["manifest"];
    assert_eq!(m["name"], "edge-app");
    assert_eq!(m["payload_type"], "app");
    assert_eq!(m["payloads"][0]["name"], "app.tar");
    assert_eq!(m["payloads"][1]["name"], "sbom.spdx.json");
    assert_eq!(m["payloads"][1]["role"], "sbom");
    assert_eq!(m["provenance"]["sbom"], "sbom.spdx.json");
    assert_eq!(m["provenance"]["commit"], "0123abc");
    assert!(m["created_at"].as_str().unwrap().ends_with('Z'));
    assert_eq!(v["signatures"][0]["key_id"], id.as_str());
    assert_eq!(v["size"], std::fs::metadata(&art).unwrap().len());
    assert_eq!(v["expected_size"], v["size"]);
    // No temporary pack file is left behind.
    let names: Vec<String> =
        std::fs::read_dir(&d.0).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert!(!names.iter().any(|n| n.contains("pack")), "{names:?}");

    let table = ok(&run(&d, &["artifact", "inspect", &art]));
    assert!(table.contains("edge-app 2.0.0") && table.contains("app.tar") && table.contains(&id), "{table}");

    // The packed tree is reproducible: same directory, same payload digest.
    std::thread::sleep(std::time::Duration::from_millis(10));
    std::fs::write(app.join("bin/run"), b"#!/bin/sh\n").unwrap();
    let again = json(&run(
        &d,
        &[
            "-o",
            "json",
            "artifact",
            "build",
            "--name",
            "edge-app",
            "--version",
            "2.0.0",
            "--device-type",
            "rpi4",
            "--type",
            "app",
            "--dir",
            app.to_str().unwrap(),
            "--out",
            &d.p("again.drover"),
        ],
    ));
    assert_eq!(again["payloads"][0]["sha256"], m["payloads"][0]["sha256"]);

    // Bad input is refused with the rule broken.
    let err = fails(&run(
        &d,
        &[
            "artifact",
            "build",
            "--name",
            "x",
            "--version",
            "1",
            "--device-type",
            "rpi4",
            "--type",
            "Bad Type",
            "--dir",
            app.to_str().unwrap(),
            "--out",
            &d.p("x.drover"),
        ],
    ));
    assert!(err.contains("payload_type"), "{err}");
    assert!(!Path::new(&d.p("x.drover")).exists());
}

#[test]
fn roots_rotate_and_verify_artifacts() {
    let d = Dir::new("root");
    let root1 = keygen(&d, "root-2026.key");
    keygen(&d, "root-2027.key");
    let rel1 = keygen(&d, "ci-2026.key");
    let rel2 = keygen(&d, "ci-2027.key");
    let art1 = build(&d, "one.drover", Some("ci-2026.key"));

    let v = json(&run(
        &d,
        &[
            "-o",
            "json",
            "artifact",
            "root",
            "create",
            "--root-key",
            &d.p("root-2026.key"),
            "--release-key",
            &d.p("ci-2026.key.pub"),
            "--out",
            &d.p("root.json"),
        ],
    ));
    assert_eq!(v["complete"], true);
    assert_eq!(v["root"]["root_keys"][0]["id"], root1.as_str());
    assert_eq!(v["root"]["root_keys"][0]["name"], "root-2026");
    assert_eq!(v["root"]["release_keys"][0]["name"], "ci-2026");
    let doc: Value = serde_json::from_slice(&std::fs::read(d.p("root.json")).unwrap()).unwrap();
    assert_eq!(doc["signed"]["type"], "drover-root");
    assert_eq!(doc["signatures"][0]["key_id"], root1.as_str());

    let v = json(&run(&d, &["-o", "json", "artifact", "verify", &art1, "--root", &d.p("root.json")]));
    assert_eq!(v["verified_key"], rel1.as_str());

    // Version 2: new root key and release key, ci-2026 revoked. Signed by the new root key
    // only, it does not follow from version 1.
    ok(&run(
        &d,
        &[
            "artifact",
            "root",
            "create",
            "--version",
            "2",
            "--root-key",
            &d.p("root-2027.key"),
            "--release-key",
            &d.p("ci-2027.key.pub"),
            "--revoke",
            &rel1,
            "--out",
            &d.p("root2.json"),
        ],
    ));
    let err = fails(&run(&d, &["artifact", "root", "verify", "--trusted", &d.p("root.json"), &d.p("root2.json")]));
    assert!(err.contains("root2.json") && err.contains("current root"), "{err}");
    // The old root key signs the handover.
    ok(&run(&d, &["artifact", "root", "sign", "--key", &d.p("root-2026.key"), &d.p("root2.json")]));
    let v = json(&run(
        &d,
        &["-o", "json", "artifact", "root", "verify", "--trusted", &d.p("root.json"), &d.p("root2.json")],
    ));
    assert_eq!(v["root"]["version"], 2);
    assert_eq!(v["root"]["revoked"], serde_json::json!([rel1]));

    // After the rotation the old release key is refused, the new one accepted.
    let err =
        fails(&run(&d, &["artifact", "verify", &art1, "--root", &d.p("root.json"), "--root", &d.p("root2.json")]));
    assert!(err.contains(&rel1) && err.contains("revoke"), "{err}");
    let art2 = build(&d, "two.drover", Some("ci-2027.key"));
    let v = json(&run(
        &d,
        &["-o", "json", "artifact", "verify", &art2, "--root", &d.p("root.json"), "--root", &d.p("root2.json")],
    ));
    assert_eq!(v["verified_key"], rel2.as_str());
    // ... and not trusted by version 1 alone.
    let err = fails(&run(&d, &["artifact", "verify", &art2, "--root", &d.p("root.json")]));
    assert!(err.contains(&rel2), "{err}");

    // A root that is not self-signed enough is reported when created.
    let out = run(
        &d,
        &[
            "artifact",
            "root",
            "create",
            "--root-key",
            &d.p("root-2026.key"),
            "--root-pub",
            &d.p("root-2027.key.pub"),
            "--threshold",
            "2",
            "--release-key",
            &d.p("ci-2026.key.pub"),
            "--out",
            &d.p("two-of-two.json"),
        ],
    );
    ok(&out);
    assert!(String::from_utf8_lossy(&out.stderr).contains("root sign"));
    fails(&run(&d, &["artifact", "root", "verify", "--trusted", &d.p("two-of-two.json")]));
    ok(&run(&d, &["artifact", "root", "sign", "--key", &d.p("root-2027.key"), &d.p("two-of-two.json")]));
    ok(&run(&d, &["artifact", "root", "verify", "--trusted", &d.p("two-of-two.json")]));

    // A bad expiry is refused.
    let err = fails(&run(
        &d,
        &[
            "artifact",
            "root",
            "create",
            "--root-key",
            &d.p("root-2026.key"),
            "--release-key",
            &d.p("ci-2026.key.pub"),
            "--expires",
            "soon",
            "--out",
            &d.p("bad.json"),
        ],
    ));
    assert!(err.contains("expires"), "{err}");
}

/// What the fake server saw.
struct Request {
    head: String,
    body: Vec<u8>,
}

/// Accepts one request, answers 201 with `response`, and hands back the request.
fn one_request_server(response: &'static str) -> (String, std::thread::JoinHandle<Request>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let handle = std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut head = String::new();
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            if line == "\r\n" || line.is_empty() {
                break;
            }
            head.push_str(&line);
        }
        let len: usize = head
            .lines()
            .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap()))
            .expect("a Content-Length header");
        let mut body = vec![0u8; len];
        reader.read_exact(&mut body).unwrap();
        let mut stream = stream;
        write!(
            stream,
            "HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{response}",
            response.len()
        )
        .unwrap();
        Request { head, body }
    });
    (url, handle)
}

#[test]
fn upload_streams_the_file_with_the_token() {
    let d = Dir::new("upload");
    keygen(&d, "release.key");
    let art = build(&d, "edge.drover", Some("release.key"));
    let response = r#"{"id":"abc","name":"edge-app","version":"1.4.2","device_types":["rpi4"],"payload_type":"file","size":1,"payloads":[],"provides":{},"depends":{},"signed_by":["k"],"uploaded_at":"2026-11-23T10:00:00Z","uploaded_by":"token:ci","active_deployments":0}"#;
    let (url, server) = one_request_server(response);
    let out = drover(
        Path::new(&d.p("config.json")),
        &[("DROVER_URL", &url), ("DROVER_TOKEN", "secret-token")],
        &["-o", "json", "artifact", "upload", &art],
        None,
    );
    let printed: Value = serde_json::from_str(&ok(&out)).unwrap();
    assert_eq!(printed["id"], "abc");
    let req = server.join().unwrap();
    assert!(req.head.starts_with("POST /api/v1/artifacts HTTP/1.1\r\n"), "{}", req.head);
    let lower = req.head.to_ascii_lowercase();
    assert!(lower.contains("authorization: bearer secret-token"), "{}", req.head);
    assert!(lower.contains("content-type: application/octet-stream"), "{}", req.head);
    assert!(!lower.contains("transfer-encoding"), "{}", req.head);
    assert_eq!(req.body, std::fs::read(&art).unwrap());

    // Not an artifact: refused before anything is sent (no server is listening).
    let txt = write(&d, "notes.txt", b"hello");
    let err = fails(&drover(
        Path::new(&d.p("config.json")),
        &[("DROVER_URL", "http://127.0.0.1:9"), ("DROVER_TOKEN", "t")],
        &["artifact", "upload", &txt],
        None,
    ));
    assert!(err.contains("not a Drover artifact"), "{err}");
}

#[test]
fn upload_to_a_real_droverd() {
    let server = super::Server::start();
    let d = Dir::new("upload-real");
    let id = keygen(&d, "release.key");
    let art = build(&d, "edge.drover", Some("release.key"));
    let env = [("DROVER_URL", server.url.as_str()), ("DROVER_TOKEN", server.admin_token.as_str())];
    let cfg = d.p("config.json");
    let v = json(&drover(Path::new(&cfg), &env, &["-o", "json", "artifact", "upload", &art], None));
    let data = std::fs::read(&art).unwrap();
    assert_eq!(v["id"], drover_artifact::sha256_hex(&data));
    assert_eq!(v["size"], data.len() as u64);
    assert_eq!(v["signed_by"], serde_json::json!([id]));
    let table = ok(&drover(Path::new(&cfg), &env, &["artifact", "upload", &art], None));
    assert!(table.contains("edge-app 1.4.2"), "{table}");

    // The server refuses an unsigned artifact, and the CLI says why.
    let unsigned = build(&d, "unsigned.drover", None);
    let err = fails(&drover(Path::new(&cfg), &env, &["artifact", "upload", &unsigned], None));
    assert!(err.contains("not signed"), "{err}");
}
