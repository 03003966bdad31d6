//! Artifacts through the API on every backend: streamed, verified uploads (and every way an
//! upload is refused, leaving nothing behind), the trust root and its rotation, deletion;
//! and downloads over the real TLS device endpoint with device certificates and `Range`.
//!
//! Bad input tried here: a flipped payload byte, an edited manifest, a truncated file,
//! trailing bytes, an unsigned file, a file signed by a key the root does not list, a wrong
//! announced SHA-256, a JSON body, an oversized file (with and without Content-Length), a
//! root that skips a version or lacks the current keys' signature; downloads without a
//! certificate, by a device not in the deployment, past the end, and cut mid-body.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode, header};
use drover_artifact::root::{Root, RootKey, create_root};
use drover_artifact::{Builder, Manifest, PayloadRole, SigningKey};
use serde_json::json;

use crate::each_backend;
use crate::support::{Resp, TempDir, TestApp};

/// A signed (by `signers`) artifact with one payload of `payload`.
pub(crate) fn build_artifact(
    name: &str,
    version: &str,
    payload: &[u8],
    signers: &[&SigningKey],
    commit: Option<&str>,
) -> Vec<u8> {
    let dir = TempDir::new("artifact");
    let file = dir.path().join("app.bin");
    std::fs::write(&file, payload).unwrap();
    let mut m = Manifest::new(name, version, vec!["test-board".into()], "file");
    m.provenance = Some(drover_artifact::Provenance {
        source: Some("https://git.example/edge-app".into()),
        commit: commit.map(str::to_string),
        build_id: Some("build-7".into()),
        sbom: None,
    });
    let mut out = Vec::new();
    Builder::new(m).payload("app.bin", &file, PayloadRole::Install).build(&mut out, signers).unwrap();
    out
}

pub(crate) fn sha256_hex(b: &[u8]) -> String {
    drover_artifact::sha256_hex(b)
}

/// `POST /api/v1/artifacts` with the raw file.
pub(crate) async fn upload(app: &TestApp, token: &str, bytes: Vec<u8>, headers: &[(&str, &str)]) -> Resp {
    let mut b = Request::builder()
        .method(Method::POST)
        .uri("/api/v1/artifacts")
        .header(header::AUTHORIZATION, format!("Bearer {token}"))
        .header(header::CONTENT_TYPE, "application/octet-stream");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    app.send(b.body(Body::from(bytes)).unwrap()).await
}

/// A root (version `version`) naming `root` as root key and `release` as release keys,
/// signed by `signers`.
pub(crate) fn root_json(version: u64, root: &SigningKey, release: &[&SigningKey], signers: &[&SigningKey]) -> String {
    let r = Root::new(
        version,
        vec![RootKey::new(root.public(), "root")],
        release.iter().map(|k| RootKey::new(k.public(), "ci")).collect(),
    );
    String::from_utf8(create_root(r, signers).unwrap().to_json()).unwrap()
}

pub(crate) async fn put_root(app: &TestApp, token: &str, json: &str) -> Resp {
    let req = Request::builder()
        .method(Method::PUT)
        .uri("/api/v1/trust-root")
        .header(header::AUTHORIZATION, format!("Bearer {token}"))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(json.to_string()))
        .unwrap();
    app.send(req).await
}

fn stored_files(app: &TestApp) -> Vec<String> {
    let dir = app.state.config.data_dir.join("artifacts");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().to_string()).collect())
        .unwrap_or_default();
    let uploads = dir.join("uploads");
    if let Ok(d) = std::fs::read_dir(&uploads) {
        names.extend(d.filter_map(|e| e.ok()).map(|e| format!("uploads/{}", e.file_name().to_string_lossy())));
    }
    names.retain(|n| n != "uploads");
    names.sort();
    names
}

#[tokio::test]
async fn uploads_are_verified_while_they_stream_and_bad_ones_leave_nothing() {
    each_backend!(|app| {
        let operator = app.token("operator").await;
        let viewer = app.token("viewer").await;
        let key = SigningKey::generate().unwrap();
        let payload: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
        let good =
            build_artifact("edge-app", "1.0.0", &payload, &[&key], Some("0123456789abcdef0123456789abcdef01234567"));
        let id = sha256_hex(&good);

        // Every refusal first: 400 with the reason, nothing stored.
        let mut flipped = good.clone();
        *flipped.last_mut().unwrap() ^= 0x01;
        let r = upload(&app, &operator, flipped, &[]).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text);
        assert!(r.text.contains("does not match the SHA-256"), "{}", r.text);
        let r = upload(&app, &operator, good[..good.len() - 100].to_vec(), &[]).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text);
        assert!(r.text.contains("truncated"), "{}", r.text);
        let mut trailing = good.clone();
        trailing.extend_from_slice(b"garbage");
        let r = upload(&app, &operator, trailing, &[]).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text);
        assert!(r.text.contains("after its last payload"), "{}", r.text);
        let r = upload(&app, &operator, b"PK\x03\x04 not an artifact".to_vec(), &[]).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        assert!(r.text.contains("not a Drover artifact"), "{}", r.text);
        let unsigned = build_artifact("edge-app", "1.0.0", &payload, &[], None);
        let r = upload(&app, &operator, unsigned, &[]).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        assert!(r.text.contains("not signed"), "{}", r.text);
        let r = upload(&app, &operator, good.clone(), &[("x-drover-sha256", &"0".repeat(64))]).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        assert!(r.text.contains("announced"), "{}", r.text);
        let req = Request::builder()
            .method(Method::POST)
            .uri("/api/v1/artifacts")
            .header(header::AUTHORIZATION, format!("Bearer {operator}"))
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from("{}"))
            .unwrap();
        assert_eq!(app.send(req).await.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
        assert_eq!(upload(&app, &viewer, good.clone(), &[]).await.status, StatusCode::FORBIDDEN);
        assert_eq!(stored_files(&app), Vec::<String>::new(), "refused uploads leave nothing");
        let r = app.admin(Method::GET, "/api/v1/artifacts", None).await;
        assert_eq!(r.body["items"].as_array().unwrap().len(), 0);

        // Over the size limit: 413 from Content-Length, and from the header's sizes without it.
        let mut small = app.state.config.clone();
        small.max_artifact_size = 100_000;
        let limited = TestApp {
            db: app.db.clone(),
            state: drover_server::app::AppState::new(app.db.clone(), small, app.state.ca.clone()),
            app: axum::Router::new(),
            device_app: axum::Router::new(),
            admin_token: app.admin_token.clone(),
            label: app.label,
        };
        let limited = TestApp { app: drover_server::app::router(limited.state.clone()), ..limited };
        let len = good.len().to_string();
        let r = upload(&limited, &operator, good.clone(), &[("content-length", len.as_str())]).await;
        assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE, "{}", r.text);
        assert!(r.text.contains("100000"), "{}", r.text);
        let stream = futures_util::stream::iter(
            good.chunks(8192).map(|c| Ok::<_, std::io::Error>(bytes::Bytes::copy_from_slice(c))).collect::<Vec<_>>(),
        );
        let req = Request::builder()
            .method(Method::POST)
            .uri("/api/v1/artifacts")
            .header(header::AUTHORIZATION, format!("Bearer {operator}"))
            .header(header::CONTENT_TYPE, "application/octet-stream")
            .body(Body::from_stream(stream))
            .unwrap();
        let r = limited.send(req).await;
        assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE, "{}", r.text);
        assert_eq!(stored_files(&app), Vec::<String>::new());

        // The good one: 201, stored at its content address; the same file again: 200, same record.
        let audit_before = app.audit_count().await;
        let r = upload(&app, &operator, good.clone(), &[("x-drover-sha256", id.as_str())]).await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        assert_eq!(r.body["id"], id.as_str());
        assert_eq!(r.body["name"], "edge-app");
        assert_eq!(r.body["size"], good.len() as u64);
        assert_eq!(r.body["signed_by"], json!([key.key_id()]));
        assert_eq!(r.body["provenance"]["commit"], "0123456789abcdef0123456789abcdef01234567");
        assert_eq!(r.body["payloads"][0]["sha256"], sha256_hex(&payload).as_str());
        assert_eq!(r.body["active_deployments"], 0);
        assert!(r.body["uploaded_by"].as_str().unwrap().starts_with("token:"), "{}", r.body);
        assert_eq!(stored_files(&app), vec![id.clone()]);
        assert_eq!(std::fs::read(app.state.config.data_dir.join("artifacts").join(&id)).unwrap(), good);
        assert_eq!(app.audit_count().await, audit_before + 1);
        let digest = {
            use base64::Engine as _;
            format!("sha-256={}", base64::engine::general_purpose::STANDARD.encode(hex::decode(&id).unwrap()))
        };
        let again = upload(&app, &operator, good.clone(), &[("digest", digest.as_str())]).await;
        assert_eq!(again.status, StatusCode::OK, "{}", again.text);
        assert_eq!(again.body, r.body);
        assert_eq!(app.audit_count().await, audit_before + 1);

        // Same name and version, other bytes: refused.
        let other = build_artifact("edge-app", "1.0.0", b"other bytes", &[&key], None);
        let r = upload(&app, &operator, other, &[]).await;
        assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.text);

        // Read back by id and by NAME@VERSION; listed; filtered by name; paged.
        let v2 = build_artifact("edge-app", "2.0.0", b"two", &[&key], None);
        assert_eq!(upload(&app, &operator, v2, &[]).await.status, StatusCode::CREATED);
        let tool = build_artifact("tool", "1", b"tool", &[&key], None);
        assert_eq!(upload(&app, &operator, tool, &[]).await.status, StatusCode::CREATED);
        let r = app.call(Method::GET, &format!("/api/v1/artifacts/{id}"), Some(&viewer), None).await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.body["version"], "1.0.0");
        let r = app.call(Method::GET, "/api/v1/artifacts/edge-app@1.0.0", Some(&viewer), None).await;
        assert_eq!(r.body["id"], id.as_str());
        assert_eq!(app.admin(Method::GET, "/api/v1/artifacts/edge-app@9", None).await.status, StatusCode::NOT_FOUND);
        let r = app.admin(Method::GET, "/api/v1/artifacts?name=edge-app", None).await;
        let names: Vec<&str> =
            r.body["items"].as_array().unwrap().iter().map(|a| a["version"].as_str().unwrap()).collect();
        assert_eq!(names, ["2.0.0", "1.0.0"], "newest first");
        let p1 = app.admin(Method::GET, "/api/v1/artifacts?limit=2", None).await;
        assert_eq!(p1.body["items"].as_array().unwrap().len(), 2);
        let cursor = p1.body["next_cursor"].as_str().unwrap().to_string();
        let p2 = app.admin(Method::GET, &format!("/api/v1/artifacts?limit=2&cursor={cursor}"), None).await;
        assert_eq!(p2.body["items"].as_array().unwrap().len(), 1);
        assert!(p2.body["next_cursor"].is_null());

        // Deleted: gone with its file; the viewer may not.
        let r = app.call(Method::DELETE, "/api/v1/artifacts/tool@1", Some(&viewer), None).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN);
        let r = app.call(Method::DELETE, "/api/v1/artifacts/tool@1", Some(&operator), None).await;
        assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text);
        assert_eq!(stored_files(&app).len(), 2);
        assert_eq!(app.admin(Method::GET, "/api/v1/artifacts/tool@1", None).await.status, StatusCode::NOT_FOUND);
    });
}

#[tokio::test]
async fn a_trust_root_makes_the_server_refuse_artifacts_devices_would_refuse() {
    each_backend!(|app| {
        let operator = app.token("operator").await;
        let root1 = SigningKey::generate().unwrap();
        let release = SigningKey::generate().unwrap();
        let stranger = SigningKey::generate().unwrap();
        assert_eq!(app.admin(Method::GET, "/api/v1/trust-root", None).await.status, StatusCode::NOT_FOUND);

        // The first root must sign itself; only an admin sets it.
        let unsigned = root_json(1, &root1, &[&release], &[]);
        let r = put_root(&app, &app.admin_token, &unsigned).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text);
        let v1 = root_json(1, &root1, &[&release], &[&root1]);
        assert_eq!(put_root(&app, &operator, &v1).await.status, StatusCode::FORBIDDEN);
        let r = put_root(&app, &app.admin_token, &v1).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        assert_eq!(r.body["version"], 1);
        assert_eq!(r.body["release_keys"], json!([release.key_id()]));
        assert_eq!(put_root(&app, &app.admin_token, &v1).await.status, StatusCode::CONFLICT);

        // Signed by a key the root does not list, or altered after signing: refused.
        let foreign = build_artifact("app", "1", b"payload", &[&stranger], None);
        let r = upload(&app, &operator, foreign, &[]).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        assert!(r.text.contains("does not list"), "{}", r.text);
        let good = build_artifact("app", "1.0.0", b"payload", &[&release], None);
        let mut edited = good.clone();
        let at = edited.windows(7).position(|w| w == b"\"1.0.0\"").unwrap();
        edited[at + 5] = b'1';
        let r = upload(&app, &operator, edited, &[]).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text);
        assert!(r.text.contains("does not match the manifest"), "{}", r.text);
        assert_eq!(stored_files(&app), Vec::<String>::new());
        assert_eq!(upload(&app, &operator, good, &[]).await.status, StatusCode::CREATED);

        // Rotation: the next version, signed by the current root key and its own.
        let root2 = SigningKey::generate().unwrap();
        let skip = root_json(3, &root2, &[&stranger], &[&root1, &root2]);
        let r = put_root(&app, &app.admin_token, &skip).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        assert!(r.text.contains("version 2 first"), "{}", r.text);
        let not_chained = root_json(2, &root2, &[&stranger], &[&root2]);
        assert_eq!(put_root(&app, &app.admin_token, &not_chained).await.status, StatusCode::BAD_REQUEST);
        let v2 = root_json(2, &root2, &[&stranger], &[&root1, &root2]);
        let r = put_root(&app, &app.admin_token, &v2).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        assert_eq!(r.body["chain"], json!([1, 2]));
        let r = app.call(Method::GET, "/api/v1/trust-root/1", Some(&operator), None).await;
        assert_eq!(r.text, v1);
        // Now the stranger signs releases, and the old release key no longer counts.
        let r = upload(&app, &operator, build_artifact("app", "2", b"x", &[&stranger], None), &[]).await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        let r = upload(&app, &operator, build_artifact("app", "3", b"y", &[&release], None), &[]).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        let audit = app.admin(Method::GET, "/api/v1/audit?action=trust_root.", None).await;
        assert_eq!(audit.body["items"].as_array().unwrap().len(), 2);
    });
}

/// An accepted device made through enrollment: (id, key PEM, certificate PEM).
pub(crate) async fn accepted_device(app: &TestApp, serial: &str) -> (String, String, String) {
    let r = app.admin(Method::POST, "/api/v1/enrollment-tokens", Some(json!({"name": format!("t-{serial}")}))).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let secret = r.body["secret"].as_str().unwrap().to_string();
    let key = rcgen::KeyPair::generate().unwrap();
    let csr = rcgen::CertificateParams::default().serialize_request(&key).unwrap().pem().unwrap();
    let r = crate::devices::enroll(app, &csr, json!({"serial": serial}), Some(&secret)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    (
        r.body["device_id"].as_str().unwrap().to_string(),
        key.serialize_pem(),
        r.body["certificate_pem"].as_str().unwrap().to_string(),
    )
}

/// The device endpoint of `app` on a TLS port of its own.
async fn device_endpoint(app: &TestApp) -> u16 {
    use drover_server::devnet;
    let tls = devnet::device_tls(&app.state.ca, &["localhost".into()]).unwrap();
    let listener = devnet::TlsListener::bind("127.0.0.1:0", tls.https).await.unwrap();
    let port = axum::serve::Listener::local_addr(&listener).unwrap().port();
    let svc = devnet::device_router(app.state.clone()).into_make_service_with_connect_info::<devnet::DevicePeer>();
    tokio::spawn(async move {
        let _ = axum::serve(listener, svc).await;
    });
    port
}

/// An HTTPS client trusting the fleet CA, presenting a device certificate when given.
pub(crate) fn https(ca_pem: &str, device: Option<(&str, &str)>) -> ureq::Agent {
    use ureq::tls::{Certificate, ClientCert, PrivateKey, RootCerts, TlsConfig};
    let ca = Certificate::from_pem(ca_pem.as_bytes()).unwrap();
    let mut tls = TlsConfig::builder().root_certs(RootCerts::Specific(Arc::new(vec![ca])));
    if let Some((key, cert)) = device {
        let chain = [Certificate::from_pem(cert.as_bytes()).unwrap()];
        tls = tls.client_cert(Some(ClientCert::new_with_certs(&chain, PrivateKey::from_pem(key.as_bytes()).unwrap())));
    }
    ureq::Agent::config_builder().tls_config(tls.build()).http_status_as_error(false).build().new_agent()
}

/// GET with an optional Range; (status, headers, body).
fn get(agent: &ureq::Agent, url: &str, range: Option<&str>) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let mut req = agent.get(url);
    if let Some(r) = range {
        req = req.header("Range", r);
    }
    let resp = req.call().unwrap();
    let status = resp.status().as_u16();
    let headers = resp
        .headers()
        .iter()
        .map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap_or_default().to_string()))
        .collect();
    let body = resp.into_body().with_config().limit(1 << 30).read_to_vec().unwrap();
    (status, headers, body)
}

fn header_of<'a>(h: &'a [(String, String)], name: &str) -> Option<&'a str> {
    h.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_download_deployed_artifacts_over_tls_and_resume_with_range() {
    each_backend!(|app| {
        let operator = app.token("operator").await;
        let key = SigningKey::generate().unwrap();
        let payload: Vec<u8> = (0..1_500_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 7) as u8).collect();
        let file = build_artifact("edge-app", "1.0.0", &payload, &[&key], None);
        let id = sha256_hex(&file);
        assert_eq!(upload(&app, &operator, file.clone(), &[]).await.status, StatusCode::CREATED);
        let (a, a_key, a_cert) = accepted_device(&app, "SN-DL-A").await;
        let (b, b_key, b_cert) = accepted_device(&app, "SN-DL-B").await;
        let r = app
            .call(Method::POST, "/api/v1/deployments", Some(&operator), Some(json!({"artifact": id, "devices": [a]})))
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        // Deleting the artifact is refused while the deployment runs.
        let r = app.call(Method::DELETE, &format!("/api/v1/artifacts/{id}"), Some(&operator), None).await;
        assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.text);
        let r = app.admin(Method::GET, &format!("/api/v1/artifacts/{id}"), None).await;
        assert_eq!(r.body["active_deployments"], 1);

        let port = device_endpoint(&app).await;
        let ca = app.state.ca.cert_pem().to_string();
        let url = format!("https://localhost:{port}/device/v1/artifacts/{id}");
        let dev_a = https(&ca, Some((&a_key, &a_cert)));
        let (url2, id2, file2, agent) = (url.clone(), id.clone(), file.clone(), dev_a.clone());
        tokio::task::spawn_blocking(move || {
            let (url, id, file, dev_a) = (url2, id2, file2, agent);
            let size = file.len();
            // Whole.
            let (status, h, body) = get(&dev_a, &url, None);
            assert_eq!(status, 200);
            assert_eq!(sha256_hex(&body), id);
            assert_eq!(header_of(&h, "etag"), Some(format!("\"{id}\"").as_str()));
            assert_eq!(header_of(&h, "content-length"), Some(size.to_string().as_str()));
            assert_eq!(header_of(&h, "accept-ranges"), Some("bytes"));
            // Cut mid-body, then resumed from what arrived: the same bytes.
            let resp = dev_a.get(&url).call().unwrap();
            let mut reader = resp.into_body().into_reader();
            let mut got = vec![0u8; 400_000];
            std::io::Read::read_exact(&mut reader, &mut got).unwrap();
            drop(reader);
            let (status, h, rest) = get(&dev_a, &url, Some(&format!("bytes={}-", got.len())));
            assert_eq!(status, 206);
            assert_eq!(header_of(&h, "content-range"), Some(format!("bytes 400000-{}/{size}", size - 1).as_str()));
            got.extend_from_slice(&rest);
            assert_eq!(sha256_hex(&got), id, "resumed download is identical");
            let (status, _, part) = get(&dev_a, &url, Some("bytes=10-19"));
            assert_eq!((status, part.as_slice()), (206, &file[10..20]));
            let (status, h, _) = get(&dev_a, &url, Some(&format!("bytes={size}-")));
            assert_eq!(status, 416);
            assert_eq!(header_of(&h, "content-range"), Some(format!("bytes */{size}").as_str()));
            // Unknown artifact; no certificate; a device not in the deployment.
            let (status, _, _) = get(&dev_a, &url.replace(&id, &"e".repeat(64)), None);
            assert_eq!(status, 404);
            let (status, _, body) = get(&https(&ca, None), &url, None);
            assert_eq!(status, 401, "{}", String::from_utf8_lossy(&body));
            let (status, _, body) = get(&https(&ca, Some((&b_key, &b_cert))), &url, None);
            assert_eq!(status, 403, "{}", String::from_utf8_lossy(&body));
        })
        .await
        .unwrap();
        let metrics = app.send(Request::get("/metrics").body(Body::empty()).unwrap()).await.text;
        let served: u64 = metrics
            .lines()
            .find_map(|l| l.strip_prefix("drover_artifact_bytes_served_total "))
            .unwrap()
            .parse()
            .unwrap();
        assert!(served >= file.len() as u64 * 2, "{served}");

        // The device finishes: it may no longer download, and the artifact may go.
        let dep = app.admin(Method::GET, "/api/v1/deployments", None).await.body["items"][0]["id"]
            .as_str()
            .unwrap()
            .to_string();
        let report = drover_proto::update::UpdateReport::new(dep, drover_proto::update::UpdateState::Success);
        app.state.engine.on_report(&a, report).await.unwrap();
        let u = url.clone();
        let status = tokio::task::spawn_blocking(move || get(&dev_a, &u, None).0).await.unwrap();
        assert_eq!(status, 403);
        let _ = b;
        let r = app.call(Method::DELETE, &format!("/api/v1/artifacts/{id}"), Some(&operator), None).await;
        assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text);
        assert!(!app.state.config.data_dir.join("artifacts").join(&id).exists());
    });
}

/// How fast the device endpoint serves a download over TLS: one client on this machine
/// fetching a 256 MiB artifact (the client's decryption shares the two cores). Run with
/// `cargo test --release -p drover-server --test it download_throughput -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, not a check; run it by name"]
async fn download_throughput() {
    let tdb = crate::support::TestDb::sqlite();
    let app = TestApp::new(&tdb).await;
    let key = SigningKey::generate().unwrap();
    let payload: Vec<u8> = (0..256u32 * 1024 * 1024).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let file = build_artifact("big", "1", &payload, &[&key], None);
    drop(payload);
    let id = sha256_hex(&file);
    let started = std::time::Instant::now();
    let r = upload(&app, &app.admin_token, file.clone(), &[]).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let up = started.elapsed();
    let (device, dkey, cert) = accepted_device(&app, "SN-BIG").await;
    let r = app.admin(Method::POST, "/api/v1/deployments", Some(json!({"artifact": id, "devices": [device]}))).await;
    assert_eq!(r.status, StatusCode::CREATED);
    let port = device_endpoint(&app).await;
    let agent = https(app.state.ca.cert_pem(), Some((&dkey, &cert)));
    let url = format!("https://localhost:{port}/device/v1/artifacts/{id}");
    let (n, took) = tokio::task::spawn_blocking(move || {
        let mut best = (0u64, Duration::MAX);
        for _ in 0..3 {
            let started = std::time::Instant::now();
            let resp = agent.get(&url).call().unwrap();
            let mut reader = resp.into_body().into_reader();
            let mut buf = vec![0u8; 256 * 1024];
            let mut n = 0u64;
            loop {
                let k = std::io::Read::read(&mut reader, &mut buf).unwrap();
                if k == 0 {
                    break;
                }
                n += k as u64;
            }
            let took = started.elapsed();
            if took < best.1 {
                best = (n, took);
            }
        }
        best
    })
    .await
    .unwrap();
    assert_eq!(n, file.len() as u64);
    let mbit = |bytes: u64, d: Duration| bytes as f64 * 8.0 / d.as_secs_f64() / 1e6;
    eprintln!(
        "upload {:.0} Mbit/s; download over TLS {:.0} Mbit/s ({} bytes in {took:?})",
        mbit(file.len() as u64, up),
        mbit(n, took),
        n
    );
    tdb.drop_schema().await;
}

/// A local S3-compatible server (moto's, from PyPI: `pip install "moto[server]"`).
struct S3Server {
    child: std::process::Child,
    port: u16,
}

impl S3Server {
    /// scripts/test.sh installs it; a machine without it fails this test rather than skip it.
    fn start() -> S3Server {
        let port = crate::support::free_port();
        let child = std::process::Command::new("python3")
            .args(["-m", "moto.server", "-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("python3 to run moto's S3 server (pip install \"moto[server]\"; scripts/test.sh installs it)");
        let s = S3Server { child, port };
        crate::support::eventually(Duration::from_secs(30), "the S3 server to listen", || {
            std::net::TcpStream::connect(("127.0.0.1", port)).ok()
        });
        s
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}/{path}", self.port)
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The keys under `prefix` in `bucket` (ListObjectsV2).
fn s3_keys(s3: &S3Server, bucket: &str, prefix: &str) -> Vec<String> {
    let xml = crate::e2e::agent()
        .get(&s3.url(&format!("{bucket}?list-type=2&prefix={prefix}")))
        .call()
        .unwrap()
        .into_body()
        .read_to_string()
        .unwrap();
    xml.split("<Key>").skip(1).filter_map(|k| k.split("</Key>").next()).map(str::to_string).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn artifacts_can_live_in_an_s3_bucket() {
    let s3 = tokio::task::spawn_blocking(S3Server::start).await.unwrap();
    let bucket = "drover-artifacts";
    let made = crate::e2e::agent().put(&s3.url(bucket)).send_empty().unwrap();
    assert_eq!(made.status().as_u16(), 200);
    let builder = object_store::aws::AmazonS3Builder::new()
        .with_endpoint(s3.url(""))
        .with_allow_http(true)
        .with_access_key_id("test")
        .with_secret_access_key("test")
        .with_region("us-east-1");
    let store = drover_server::store::ArtifactStore::s3(builder, bucket, "fleet/eu").unwrap();
    let tdb = crate::support::TestDb::sqlite();
    let base = TestApp::new(&tdb).await;
    let state = drover_server::app::AppState::with_store(
        base.db.clone(),
        base.state.config.clone(),
        base.state.ca.clone(),
        store,
    );
    let app = TestApp { app: drover_server::app::router(state.clone()), state, ..base };

    // Large enough for a multipart upload of two parts.
    let key = SigningKey::generate().unwrap();
    let payload: Vec<u8> = (0..9_500_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8).collect();
    let file = build_artifact("edge-app", "3.0.0", &payload, &[&key], None);
    let id = sha256_hex(&file);
    let mut flipped = file.clone();
    *flipped.last_mut().unwrap() ^= 1;
    let r = upload(&app, &app.admin_token, flipped, &[]).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text);
    let keys = tokio::task::block_in_place(|| s3_keys(&s3, bucket, "fleet/eu/"));
    assert!(keys.is_empty(), "a refused upload leaves nothing in the bucket: {keys:?}");
    let r = upload(&app, &app.admin_token, file.clone(), &[]).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let keys = tokio::task::block_in_place(|| s3_keys(&s3, bucket, "fleet/eu/"));
    assert_eq!(keys, [format!("fleet/eu/artifacts/{id}")]);

    // Served to a device from the bucket, whole and resumed.
    let (device, dkey, cert) = accepted_device(&app, "SN-S3").await;
    let r = app.admin(Method::POST, "/api/v1/deployments", Some(json!({"artifact": id, "devices": [device]}))).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let port = device_endpoint(&app).await;
    let agent = https(app.state.ca.cert_pem(), Some((&dkey, &cert)));
    let url = format!("https://localhost:{port}/device/v1/artifacts/{id}");
    let (whole, head, tail) = tokio::task::spawn_blocking(move || {
        let (s1, _, whole) = get(&agent, &url, None);
        assert_eq!(s1, 200);
        let (s2, _, head) = get(&agent, &url, Some("bytes=0-999999"));
        let (s3, _, tail) = get(&agent, &url, Some("bytes=1000000-"));
        assert_eq!((s2, s3), (206, 206));
        (whole, head, tail)
    })
    .await
    .unwrap();
    assert_eq!(sha256_hex(&whole), id);
    assert_eq!(sha256_hex(&[head, tail].concat()), id);

    // Finished and deleted: gone from the bucket.
    let dep = r.body["id"].as_str().unwrap().to_string();
    let report = drover_proto::update::UpdateReport::new(dep, drover_proto::update::UpdateState::Success);
    app.state.engine.on_report(&device, report).await.unwrap();
    let r = app.admin(Method::DELETE, &format!("/api/v1/artifacts/{id}"), None).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text);
    let keys = tokio::task::block_in_place(|| s3_keys(&s3, bucket, "fleet/eu/"));
    assert!(keys.is_empty(), "{keys:?}");
}
