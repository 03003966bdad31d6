//! Remote access with real processes end to end: the real `droverd` binary (embedded broker or
//! two replicas on one PostgreSQL database and one broker), real `drover-agent` processes with
//! a PTY, files and TCP connections on the device side, and the real `drover` CLI (`term`,
//! `cp`, `forward`) or a WebSocket client speaking the operator protocol.
//!
//! Bad input tried here: a viewer's token, a browser WebSocket from another site's page (wrong
//! Origin), a kind of session the device's config switches off, a path outside the device's
//! allowed folders, an upload cut by kill -9 of the CLI, a download cut by dropping the
//! WebSocket; for a device's web UI: a viewer opening one, a target outside the device's
//! `forward_allow`, a made-up or ended capability path, a target with nothing listening.

use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use drover_proto::operator::Control;
use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;

use crate::e2e::agent as http;
use crate::support::{TempDir, agent_bin, eventually, free_port, workspace_bin};

const DROVERD: &str = env!("CARGO_BIN_EXE_droverd");

/// An admin token made by `droverd token create` against the replica's database.
fn admin_token(data: &Path, env: &[(&str, &str)]) -> String {
    let out = Command::new(DROVERD)
        .arg("--data-dir")
        .arg(data)
        .args(["token", "create", "--role", "admin", "--name", "remote admin"])
        .env_remove("DROVER_DATABASE_URL")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    assert!(out.status.success(), "droverd token create: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().split_whitespace().find(|w| w.starts_with("drv_")).unwrap().to_string()
}

fn cli_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| workspace_bin("drover-cli", "drover")).clone()
}

struct Server {
    d: crate::fleet::Droverd,
    token: String,
    ca: PathBuf,
    /// The broker devices connect to.
    mqtt: u16,
}

/// A fleet CA in files (made by droverd), and Mosquitto configured as docs/mosquitto.md says,
/// with a server certificate from that CA: the broker every droverd of a test and every device
/// connect to.
struct Broker {
    cert: PathBuf,
    key: PathBuf,
    port: u16,
    child: Child,
}

impl Broker {
    fn start(dir: &Path) -> Broker {
        let made = dir.join("ca-made");
        drover_server::ca::FleetCa::load_or_create(&made.join("ca"), "default").unwrap();
        let (cert, key) = (made.join("ca/fleet-ca.crt"), made.join("ca/fleet-ca.key"));
        let ca_pem = std::fs::read_to_string(&cert).unwrap();
        let ca_key = rcgen::KeyPair::from_pem(&std::fs::read_to_string(&key).unwrap()).unwrap();
        let issuer = rcgen::Issuer::from_ca_cert_pem(&ca_pem, ca_key).unwrap();
        let mdir = dir.join("mosquitto");
        std::fs::create_dir_all(&mdir).unwrap();
        let skey = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
        params.distinguished_name.push(rcgen::DnType::CommonName, "mosquitto");
        let scert = params.signed_by(&skey, &issuer).unwrap();
        std::fs::write(mdir.join("ca.crt"), &ca_pem).unwrap();
        std::fs::write(mdir.join("server.crt"), scert.pem()).unwrap();
        std::fs::write(mdir.join("server.key"), skey.serialize_pem()).unwrap();
        let port = free_port();
        let conf = crate::support::mosquitto_config(&mdir, port);
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto (Debian package mosquitto) must be installed");
        eventually(Duration::from_secs(10), "mosquitto to listen", || {
            std::net::TcpStream::connect(("127.0.0.1", port)).ok()
        });
        Broker { cert, key, port, child }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    /// A new enrollment token's secret.
    fn enrollment_secret(&self, name: &str) -> String {
        self.admin("POST", "/api/v1/enrollment-tokens", Some(json!({"name": name})))["secret"]
            .as_str()
            .expect("an enrollment token")
            .to_string()
    }

    /// A droverd on the shared CA and broker; `env` adds settings (a database).
    fn start(dir: &Path, name: &str, broker: &Broker, env: &[(&str, &str)]) -> Server {
        let data = dir.join(name);
        let mut all = vec![
            ("DROVER_CA_CERT_FILE", broker.cert.to_str().unwrap()),
            ("DROVER_CA_KEY_FILE", broker.key.to_str().unwrap()),
        ];
        all.extend_from_slice(env);
        let url = format!("mqtts://127.0.0.1:{}", broker.port);
        let d = crate::fleet::Droverd::start(&data, Some(&url), &all);
        let token = admin_token(&data, &all);
        Server { d, token, ca: broker.cert.clone(), mqtt: broker.port }
    }

    fn call(&self, method: &str, path: &str, token: &str, body: Option<Value>) -> (u16, Value) {
        let url = format!("{}{path}", self.d.base);
        let auth = format!("Bearer {token}");
        let resp = match (method, body) {
            ("GET", _) => http().get(&url).header("Authorization", &auth).call(),
            ("POST", Some(b)) => http().post(&url).header("Authorization", &auth).send_json(b),
            ("PUT", Some(b)) => http().put(&url).header("Authorization", &auth).send_json(b),
            _ => panic!("{method}"),
        };
        let mut resp = resp.unwrap();
        let status = resp.status().as_u16();
        (status, resp.body_mut().read_json::<Value>().unwrap_or(Value::Null))
    }

    fn admin(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let (s, b) = self.call(method, path, &self.token, body);
        assert!((200..300).contains(&s), "{method} {path}: {s} {b}");
        b
    }

    fn token(&self, role: &str) -> String {
        let b = self.admin("POST", "/api/v1/tokens", Some(json!({"name": format!("remote {role}"), "role": role})));
        b["secret"].as_str().unwrap().to_string()
    }

    fn ws_base(&self) -> String {
        self.d.base.replace("http://", "ws://")
    }
}

/// A device: a real drover-agent with `[remote]` as given.
struct Agent {
    dir: PathBuf,
    child: Child,
    id: String,
}

impl Agent {
    fn start(s: &Server, base: &Path, name: &str, token: &str, remote: &str) -> Agent {
        let dir = base.join(name);
        std::fs::create_dir_all(dir.join("files")).unwrap();
        let data = dir.join("data");
        let cfg = dir.join("agent.toml");
        std::fs::write(
            &cfg,
            format!(
                "server_url = \"https://localhost:{dev}\"\n\
                 mqtt_url = \"mqtts://localhost:{mqtt}\"\n\
                 ca_file = {ca:?}\n\
                 data_dir = {data:?}\n\
                 enrollment_token = \"{token}\"\n\
                 keepalive_secs = 10\n\
                 log_level = \"debug\"\n\
                 [identity]\n\
                 serial = \"{name}\"\n\
                 [remote]\n\
                 {remote}\n",
                dev = s.d.dev,
                mqtt = s.mqtt,
                ca = s.ca,
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.join("agent.log")).unwrap();
        let child = Command::new(agent_bin())
            .current_dir(&dir)
            .args(["run", "--config"])
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let json = data.join("device.json");
        let id = eventually(Duration::from_secs(30), "the agent to enroll", || {
            let v: Value = serde_json::from_slice(&std::fs::read(&json).ok()?).ok()?;
            v["device_id"].as_str().map(str::to_string)
        });
        eventually(Duration::from_secs(30), "the device to be online", || {
            s.admin("GET", &format!("/api/v1/devices/{id}"), None)["online"].as_bool().filter(|o| *o)
        });
        Agent { dir, child, id }
    }

    fn files(&self) -> PathBuf {
        std::fs::canonicalize(self.dir.join("files")).unwrap()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn everything_on(files: &Path) -> String {
    format!(
        "terminal = true\nfiles = true\nforward = true\nallow_root = true\nfile_paths = [{files:?}]\n\
         forward_allow = [\"127.0.0.1:*\"]\nmax_file_size = 200000000\n"
    )
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens an operator WebSocket; the handshake's HTTP status and body on refusal.
async fn ws_open(url: &str, headers: &[(&str, &str)]) -> Result<Ws, (u16, String)> {
    let mut req = url.into_client_request().unwrap();
    for (k, v) in headers {
        req.headers_mut().insert(axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
    }
    match tokio_tungstenite::connect_async(req).await {
        Ok((ws, _)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => Err((
            resp.status().as_u16(),
            String::from_utf8_lossy(resp.body().as_deref().unwrap_or_default()).into_owned(),
        )),
        Err(e) => panic!("{url}: {e}"),
    }
}

/// The next JSON control frame, skipping bytes.
async fn next_control(ws: &mut Ws) -> Control {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(30), ws.next()).await.expect("a frame within 30 s");
        match m {
            Some(Ok(Message::Text(t))) => return serde_json::from_str(&t).unwrap(),
            Some(Ok(_)) => {}
            other => panic!("socket ended: {other:?}"),
        }
    }
}

/// Terminal output until it contains `needle`.
async fn read_until(ws: &mut Ws, seen: &mut String, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !seen.contains(needle) {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, ws.next()).await {
            Ok(Some(Ok(Message::Binary(b)))) => seen.push_str(&String::from_utf8_lossy(&b)),
            Ok(Some(Ok(Message::Text(t)))) => panic!("control frame while waiting for {needle:?}: {t}\noutput: {seen}"),
            Ok(Some(Ok(_))) => {}
            other => panic!("no {needle:?} in the terminal ({other:?}); output so far: {seen}"),
        }
    }
}

fn sessions(s: &Server, device: &str) -> Vec<Value> {
    s.admin("GET", &format!("/api/v1/remote-sessions?device={device}"), None)["items"].as_array().unwrap().clone()
}

/// A real PTY through droverd, the broker and the agent: a command and its output, a resize
/// seen by `stty`, the shell's exit status; the session row and the audit log; a viewer, a
/// foreign page and a switched-off kind refused; a recorded session replayed.
#[test]
fn terminal_through_the_whole_stack_with_refusals_records_and_audit() {
    let dir = TempDir::new("remote-term");
    let broker = Broker::start(dir.path());
    let s = Server::start(dir.path(), "server", &broker, &[]);
    let enroll = s.enrollment_secret("remote");
    let files = dir.path().join("dev-a").join("files");
    std::fs::create_dir_all(&files).unwrap();
    let a = Agent::start(&s, dir.path(), "dev-a", &enroll, &everything_on(&files));
    let off = Agent::start(&s, dir.path(), "dev-off", &enroll, "terminal = false\nfiles = true\n");
    let viewer = s.token("viewer");
    let operator = s.token("operator");
    // Recording on (admins only; a viewer may not).
    let (st, _) = s.call("PUT", "/api/v1/remote-settings", &viewer, Some(json!({"recording": true})));
    assert_eq!(st, 403);
    s.admin("PUT", "/api/v1/remote-settings", Some(json!({"recording": true})));

    let rt = runtime();
    rt.block_on(async {
        let url = format!("{}/api/v1/devices/{}/terminal?cols=80&rows=24", s.ws_base(), a.id);
        // A viewer is refused before any session exists.
        let (status, body) = ws_open(&url, &[("authorization", &format!("Bearer {viewer}"))]).await.err().unwrap();
        assert_eq!(status, 403, "{body}");
        assert!(body.contains("opening a remote session needs the operator role"), "{body}");
        // A cookie-authenticated socket from another site's page is refused (cross-site
        // WebSocket hijacking); the Origin check runs before the session lookup.
        let (status, body) =
            ws_open(&url, &[("cookie", "drover_session=whatever"), ("origin", "https://evil.example")])
                .await
                .err()
                .unwrap();
        assert!(status == 401 || status == 403, "{status} {body}");

        let mut ws = ws_open(&url, &[("authorization", &format!("Bearer {operator}"))]).await.unwrap();
        let session = match next_control(&mut ws).await {
            Control::Opened { session } => session,
            other => panic!("expected opened, got {other:?}; agent log:\n{}", a.log()),
        };
        let mut seen = String::new();
        ws.send(Message::Binary(b"echo hello-$((6*7))\n".to_vec().into())).await.unwrap();
        read_until(&mut ws, &mut seen, "hello-42").await;
        ws.send(Message::Text(Control::Resize { cols: 101, rows: 33 }.to_text().into())).await.unwrap();
        ws.send(Message::Binary(b"stty size\n".to_vec().into())).await.unwrap();
        read_until(&mut ws, &mut seen, "33 101").await;
        ws.send(Message::Binary(b"exit 3\n".to_vec().into())).await.unwrap();
        let mut code = None;
        while code.is_none() {
            if let Control::Exit { code: c } = next_control(&mut ws).await {
                code = Some(c);
            }
        }
        assert_eq!(code, Some(3));

        // The row: who, what, bytes both ways, why it ended; the audit log has both ends.
        let row = eventually(Duration::from_secs(10), "the session to end", || {
            sessions(&s, &a.id).into_iter().find(|r| r["id"] == session.as_str() && r["ended_at"].is_string())
        });
        assert_eq!(row["kind"], "terminal");
        assert_eq!(row["actor_name"], "remote operator");
        assert_eq!(row["end_reason"], "exit 3");
        assert!(row["bytes_in"].as_i64().unwrap() > 20, "{row}");
        assert_eq!(row["bytes_out"].as_i64().unwrap(), 37, "the bytes typed: {row}");
        assert_eq!(row["recorded"], true);
        let audit = s.admin("GET", "/api/v1/audit?action=remote.&limit=50", None);
        let entries: Vec<&Value> = audit["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["summary"].as_str().unwrap().contains(&session))
            .collect();
        let actions: Vec<&str> = entries.iter().map(|e| e["action"].as_str().unwrap()).collect();
        assert_eq!(actions, ["remote.close", "remote.open"], "{audit}");
        let close = entries[0]["summary"].as_str().unwrap();
        assert!(close.contains("bytes from the device") && close.contains("37 bytes to it"), "{close}");
        assert_eq!(entries[1]["actor"]["name"], "remote operator");

        // The recording replays what the terminal showed (asciicast v2).
        let cast = http()
            .get(&format!("{}/api/v1/remote-sessions/{session}/recording", s.d.base))
            .header("Authorization", &format!("Bearer {operator}"))
            .call()
            .unwrap()
            .body_mut()
            .read_to_string()
            .unwrap();
        let header: Value = serde_json::from_str(cast.lines().next().unwrap()).unwrap();
        assert_eq!((header["version"].as_i64(), header["width"].as_i64()), (Some(2), Some(80)));
        assert!(cast.contains("hello-42") && cast.contains("\"r\",\"101x33\""), "{cast}");
        let (st, _) = s.call("GET", &format!("/api/v1/remote-sessions/{session}/recording"), &viewer, None);
        assert_eq!(st, 403, "recordings show everything: not for viewers");

        // The device switched terminals off: the operator is told so, clearly.
        let url = format!("{}/api/v1/devices/{}/terminal", s.ws_base(), off.id);
        let mut ws = ws_open(&url, &[("authorization", &format!("Bearer {operator}"))]).await.unwrap();
        match next_control(&mut ws).await {
            Control::Error { code, message } => {
                assert_eq!(code, "disabled", "{message}");
                assert!(message.contains("terminal"), "{message}");
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        let row = eventually(Duration::from_secs(10), "the refused session's row", || {
            sessions(&s, &off.id).into_iter().find(|r| r["ended_at"].is_string())
        });
        assert!(row["end_reason"].as_str().unwrap().starts_with("device: disabled"), "{row}");
    });
    drop(off);
    assert!(!a.log().contains("panicked"), "{}", a.log());
}

fn sha256_file(p: &Path) -> String {
    let mut f = std::fs::File::open(p).unwrap();
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).unwrap();
    hex::encode(h.finalize())
}

fn drover(s: &Server, args: &[&str]) -> std::process::Output {
    Command::new(cli_bin())
        .args(args)
        .env("DROVER_URL", &s.d.base)
        .env("DROVER_TOKEN", &s.token)
        .env("DROVER_CONFIG", "/nonexistent/drover-config.json")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// `drover cp` both ways with 100 MB and a hash check, cut transfers leaving nothing at the
/// target, a path outside the allowed folders refused; `drover term` with its exit status;
/// `drover forward` carrying 50 concurrent HTTP requests to a server on the device side.
#[test]
fn cli_copies_forwards_and_runs_a_terminal() {
    let dir = TempDir::new("remote-cli");
    let broker = Broker::start(dir.path());
    let s = Server::start(dir.path(), "server", &broker, &[]);
    let enroll = s.enrollment_secret("remote");
    let files = dir.path().join("dev-c").join("files");
    std::fs::create_dir_all(&files).unwrap();
    let a = Agent::start(&s, dir.path(), "dev-c", &enroll, &everything_on(&files));
    let remote_dir = a.files();
    let local = dir.path().join("local");
    std::fs::create_dir_all(&local).unwrap();

    // 100 MB of bytes that do not compress, up and back down.
    let big = local.join("big.bin");
    {
        let mut f = std::fs::File::create(&big).unwrap();
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut buf = vec![0u8; 1 << 20];
        for _ in 0..100 {
            for chunk in buf.chunks_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                chunk.copy_from_slice(&x.to_le_bytes());
            }
            f.write_all(&buf).unwrap();
        }
    }
    let want = sha256_file(&big);
    let target = format!("{}:{}/big.bin", a.id, remote_dir.display());
    let out = drover(&s, &["cp", big.to_str().unwrap(), &target]);
    assert!(out.status.success(), "upload: {}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("SHA-256 verified"));
    assert_eq!(sha256_file(&remote_dir.join("big.bin")), want);
    let back = local.join("back.bin");
    let out = drover(&s, &["cp", &target, back.to_str().unwrap()]);
    assert!(out.status.success(), "download: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(sha256_file(&back), want);

    // An upload cut by kill -9 of the CLI mid-transfer leaves no file at the target (nor a
    // temporary one, once the device has noticed).
    let cut_target = format!("{}:{}/cut.bin", a.id, remote_dir.display());
    let mut child = Command::new(cli_bin())
        .args(["cp", big.to_str().unwrap(), &cut_target])
        .env("DROVER_URL", &s.d.base)
        .env("DROVER_TOKEN", &s.token)
        .env("DROVER_CONFIG", "/nonexistent/drover-config.json")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let temp_seen = eventually(Duration::from_secs(30), "the upload to be under way on the device", || {
        std::fs::read_dir(&remote_dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .find(|e| e.file_name() != "big.bin" && e.metadata().is_ok_and(|m| m.len() > 1 << 20))
            .map(|e| e.path())
    });
    child.kill().unwrap();
    child.wait().unwrap();
    eventually(Duration::from_secs(30), "the device to remove the partial upload", || {
        (!temp_seen.exists()).then_some(())
    });
    assert!(!remote_dir.join("cut.bin").exists(), "no file at the target");

    // A path outside [remote] file_paths: refused with the device's reason.
    let out = drover(&s, &["cp", big.to_str().unwrap(), &format!("{}:/etc/drover-test", a.id)]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("path-not-allowed") && err.contains("file_paths"), "{err}");
    assert!(!Path::new("/etc/drover-test").exists());

    // `drover term` exits with the shell's status; its output is the shell's.
    let mut child = Command::new(cli_bin())
        .args(["term", &a.id])
        .env("DROVER_URL", &s.d.base)
        .env("DROVER_TOKEN", &s.token)
        .env("DROVER_CONFIG", "/nonexistent/drover-config.json")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"echo term-$((40+2)); exit 7\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(7), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("term-42"));

    // `drover forward` with 50 concurrent HTTP requests to a server on the device's side.
    let web = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let web_port = web.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in web.incoming() {
            let Ok(mut conn) = conn else { continue };
            std::thread::spawn(move || {
                let mut req = Vec::new();
                let mut buf = [0u8; 1024];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                let path = String::from_utf8_lossy(&req).split_whitespace().nth(1).unwrap_or("/").to_string();
                let body = format!("{path} {}", "x".repeat(100_000));
                let _ = write!(
                    conn,
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            });
        }
    });
    let local_port = free_port();
    let mut fwd = Command::new(cli_bin())
        .args(["forward", &a.id, &format!("{local_port}:127.0.0.1:{web_port}")])
        .env("DROVER_URL", &s.d.base)
        .env("DROVER_TOKEN", &s.token)
        .env("DROVER_CONFIG", "/nonexistent/drover-config.json")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdout = fwd.stdout.take().unwrap();
    let mut first = [0u8; 10];
    stdout.read_exact(&mut first).unwrap();
    assert_eq!(&first, b"forwarding", "the forward is ready");
    let handles: Vec<_> = (0..50)
        .map(|i| {
            std::thread::spawn(move || {
                let mut c = std::net::TcpStream::connect(("127.0.0.1", local_port)).unwrap();
                write!(c, "GET /req-{i} HTTP/1.1\r\nHost: device\r\nConnection: close\r\n\r\n").unwrap();
                let mut resp = String::new();
                c.read_to_string(&mut resp).unwrap();
                resp
            })
        })
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        let resp = h.join().unwrap();
        assert!(resp.starts_with("HTTP/1.1 200 OK"), "request {i}: {}", &resp[..resp.len().min(200)]);
        assert!(resp.contains(&format!("/req-{i} ")) && resp.ends_with(&"x".repeat(100_000)), "request {i}");
    }
    let _ = fwd.kill();
    let _ = fwd.wait();

    // Every session is in the table with its bytes.
    let rows = eventually(Duration::from_secs(15), "every session to end", || {
        let rows = sessions(&s, &a.id);
        rows.iter().all(|r| r["ended_at"].is_string()).then_some(rows)
    });
    let kinds: Vec<&str> = rows.iter().map(|r| r["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["forward", "terminal", "files", "files", "files", "files"], "{rows:?}");
    let upload = &rows[5];
    assert_eq!(upload["bytes_out"].as_i64(), Some(100 << 20));
    assert!(upload["end_reason"].as_str().unwrap().starts_with("uploaded 104857600 bytes"), "{upload}");
    assert_eq!(rows[4]["bytes_in"].as_i64(), Some(100 << 20));
    assert!(rows[0]["bytes_in"].as_i64().unwrap() > 50 * 100_000, "{}", rows[0]);
}

/// Two replicas on one PostgreSQL database and one broker: the device's main connection's
/// messages reach replica A (or either), the operator talks to replica B, whose own broker
/// connection carries the session.
#[test]
fn a_session_through_the_other_replica() {
    let Some(pg) = crate::support::pg_base_url() else {
        eprintln!("note: DROVER_TEST_DATABASE_URL is not set; skipping the two-replica test");
        return;
    };
    let dir = TempDir::new("remote-replicas");
    let rt = runtime();
    let db = rt.block_on(crate::support::TestDb::postgres(&pg));
    // One CA and one broker for both replicas.
    let broker = Broker::start(dir.path());
    // Web UI sessions idle out after 3 s without a request through any replica.
    let env = [("DROVER_DATABASE_URL", db.url.as_str()), ("DROVER_REMOTE_IDLE_TIMEOUT_SECS", "3")];
    let a = Server::start(dir.path(), "replica-a", &broker, &env);
    let b = Server::start(dir.path(), "replica-b", &broker, &env);
    let enroll = a.enrollment_secret("remote");
    let files = dir.path().join("dev-r").join("files");
    std::fs::create_dir_all(&files).unwrap();
    let dev = Agent::start(&a, dir.path(), "dev-r", &enroll, &everything_on(&files));
    rt.block_on(async {
        let url = format!("{}/api/v1/devices/{}/terminal", b.ws_base(), dev.id);
        let mut ws = ws_open(&url, &[("authorization", &format!("Bearer {}", b.token))]).await.unwrap();
        let Control::Opened { session } = next_control(&mut ws).await else { panic!("expected opened") };
        let mut seen = String::new();
        ws.send(Message::Binary(b"echo via-$((1+1))-replicas; exit\n".to_vec().into())).await.unwrap();
        read_until(&mut ws, &mut seen, "via-2-replicas").await;
        assert!(matches!(next_control(&mut ws).await, Control::Exit { code: 0 }));
        // Either replica reads the same row.
        let row = eventually(Duration::from_secs(10), "the row", || {
            sessions(&a, &dev.id).into_iter().find(|r| r["id"] == session.as_str() && r["ended_at"].is_string())
        });
        assert_eq!(row["end_reason"], "exit 0");
    });

    // A web UI session opened through A: its address works through either replica (each
    // opens its own leg on the device), is kept alive by requests through B alone, and dies
    // everywhere at once when closed through B; the row adds up both legs' bytes.
    let web = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let web_port = web.local_addr().unwrap().port();
    let big: Vec<u8> = (0..1u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let heads = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    rt.spawn(device_web(web, heads, std::sync::Arc::new(big.clone())));
    let browser: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .max_redirects(0)
        .timeout_global(Some(Duration::from_secs(60)))
        .build()
        .into();
    let get = |url: &str| {
        let mut r = browser.get(url).call().unwrap();
        let body = r.body_mut().with_config().limit(4 << 20).read_to_vec().unwrap();
        (r.status().as_u16(), body)
    };
    let open_web = || {
        let (st, opened) = a.call(
            "POST",
            &format!("/api/v1/devices/{}/web", dev.id),
            &a.token,
            Some(json!({"host": "127.0.0.1", "port": web_port})),
        );
        assert_eq!(st, 201, "{opened}");
        (opened["session"].as_str().unwrap().to_string(), opened["url"].as_str().unwrap().to_string())
    };
    let (web_id, path) = open_web();
    let (via_a, via_b) = (format!("{}{path}", a.d.base), format!("{}{path}", b.d.base));
    for via in [&via_b, &via_a] {
        let (st, body) = get(&format!("{via}big"));
        assert_eq!(st, 200, "{via}");
        assert!(body == big, "{via}: {} bytes, not the device's", body.len());
    }
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(6) {
        let (st, body) = get(&via_b);
        assert_eq!(st, 200, "still open after {:?} of use through B alone", started.elapsed());
        assert!(String::from_utf8_lossy(&body).contains("Gateway admin"));
        std::thread::sleep(Duration::from_millis(500));
    }
    let (st, body) = get(&via_a);
    assert_eq!(st, 200, "A opens a new leg: {}", String::from_utf8_lossy(&body));
    let (st, body) = b.call("POST", &format!("/api/v1/remote-sessions/{web_id}/close"), &b.token, Some(json!({})));
    assert_eq!(st, 204, "{body}");
    assert_eq!(get(&via_a).0, 404, "closed through B, dead through A");
    assert_eq!(get(&via_b).0, 404);
    let row = eventually(Duration::from_secs(15), "both legs' bytes on the closed row", || {
        sessions(&a, &dev.id)
            .into_iter()
            .find(|r| r["id"] == web_id.as_str() && r["bytes_in"].as_i64().unwrap_or(0) > 2 << 20)
    });
    assert_eq!(row["end_reason"], "closed by the operator", "{row}");
    assert!(row["ended_at"].is_string(), "{row}");

    // Unused through every replica for the idle timeout: ended, and dead through both.
    let (idle_id, path) = open_web();
    assert_eq!(get(&format!("{}{path}", b.d.base)).0, 200);
    let row = eventually(Duration::from_secs(20), "the idle web UI session to end", || {
        sessions(&b, &dev.id).into_iter().find(|r| r["id"] == idle_id.as_str() && r["ended_at"].is_string())
    });
    assert_eq!(row["end_reason"], "idle-timeout: no request for 3 s", "{row}");
    assert_eq!(get(&format!("{}{path}", a.d.base)).0, 404);
    assert_eq!(get(&format!("{}{path}", b.d.base)).0, 404);
    drop(dev);
    drop(b);
    drop(a);
    rt.block_on(db.drop_schema());
}

/// The benchmark behind `scripts/bench-remote.sh` (release build; ignored in the suite):
/// keystroke round trips through WebSocket → droverd → broker → agent → PTY running `cat` →
/// back; port-forward throughput through `drover forward`; file-transfer throughput through
/// `drover cp`.
#[test]
#[ignore]
fn bench_remote() {
    let dir = TempDir::new("remote-bench");
    let broker = Broker::start(dir.path());
    let s = Server::start(dir.path(), "server", &broker, &[]);
    let enroll = s.enrollment_secret("bench");
    let files = dir.path().join("dev-b").join("files");
    std::fs::create_dir_all(&files).unwrap();
    let a = Agent::start(&s, dir.path(), "dev-b", &enroll, &everything_on(&files));
    let keys: usize = std::env::var("BENCH_KEYS").ok().and_then(|v| v.parse().ok()).unwrap_or(1000);
    let rt = runtime();
    rt.block_on(async {
        let url = format!("{}/api/v1/devices/{}/terminal", s.ws_base(), a.id);
        let mut ws = ws_open(&url, &[("authorization", &format!("Bearer {}", s.token))]).await.unwrap();
        assert!(matches!(next_control(&mut ws).await, Control::Opened { .. }));
        let mut seen = String::new();
        ws.send(Message::Binary(b"stty raw -echo; echo cat-$((1+1)); exec cat\n".to_vec().into())).await.unwrap();
        read_until(&mut ws, &mut seen, "cat-2").await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut times = Vec::with_capacity(keys);
        for i in 0..keys {
            let k = b'a' + (i % 26) as u8;
            let t = Instant::now();
            ws.send(Message::Binary(vec![k].into())).await.unwrap();
            loop {
                match ws.next().await {
                    Some(Ok(Message::Binary(b))) if b.contains(&k) => break,
                    Some(Ok(_)) => {}
                    other => panic!("{other:?}"),
                }
            }
            times.push(t.elapsed());
        }
        times.sort();
        let pct = |p: f64| times[((times.len() as f64 * p) as usize).min(times.len() - 1)].as_secs_f64() * 1e3;
        println!(
            "BENCH keystroke round trip over {keys}: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            pct(0.5),
            pct(0.99),
            pct(1.0)
        );
    });

    // Forward: one connection reading 256 MB from a server on the device's side.
    let total: usize = 256 << 20;
    let web = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let web_port = web.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in web.incoming() {
            let Ok(mut conn) = conn else { continue };
            std::thread::spawn(move || {
                let buf = vec![7u8; 1 << 16];
                let mut left = total;
                while left > 0 {
                    let n = left.min(buf.len());
                    if conn.write_all(&buf[..n]).is_err() {
                        return;
                    }
                    left -= n;
                }
            });
        }
    });
    let local_port = free_port();
    let mut fwd = Command::new(cli_bin())
        .args(["forward", &a.id, &format!("{local_port}:127.0.0.1:{web_port}")])
        .env("DROVER_URL", &s.d.base)
        .env("DROVER_TOKEN", &s.token)
        .env("DROVER_CONFIG", "/nonexistent/drover-config.json")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut first = [0u8; 10];
    let mut stdout = fwd.stdout.take().unwrap();
    stdout.read_exact(&mut first).unwrap();
    // Keep reading what the CLI prints: a closed pipe would fail its next line.
    std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
    let t = Instant::now();
    let mut c = std::net::TcpStream::connect(("127.0.0.1", local_port)).unwrap();
    let mut buf = vec![0u8; 1 << 16];
    let mut got = 0;
    while got < total {
        let n = c.read(&mut buf).unwrap();
        assert!(n > 0, "forward ended after {got} bytes");
        got += n;
    }
    let secs = t.elapsed().as_secs_f64();
    println!("BENCH forward: {} MB in {secs:.2} s = {:.1} MB/s", total >> 20, total as f64 / secs / 1e6);
    let _ = fwd.kill();
    let _ = fwd.wait();

    // The device's web UI through droverd's proxy: 64 MiB from the device's web server.
    let size: usize = 64 << 20;
    let http = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let http_port = http.local_addr().unwrap().port();
    let body = std::sync::Arc::new(vec![7u8; size]);
    rt.spawn(device_web(http, std::sync::Arc::default(), body));
    let (st, opened) = s.call(
        "POST",
        &format!("/api/v1/devices/{}/web", a.id),
        &s.token,
        Some(json!({"host": "127.0.0.1", "port": http_port})),
    );
    assert_eq!(st, 201, "{opened}");
    let url = format!("{}{}big", s.d.base, opened["url"].as_str().unwrap());
    let browser: ureq::Agent =
        ureq::Agent::config_builder().timeout_global(Some(Duration::from_secs(300))).build().into();
    let t = Instant::now();
    let mut r = browser.get(&url).call().unwrap();
    let mut reader = r.body_mut().with_config().limit(u64::MAX).reader();
    let mut got = 0;
    loop {
        let n = reader.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        got += n;
    }
    assert_eq!(got, size);
    let secs = t.elapsed().as_secs_f64();
    println!("BENCH web UI proxy: {} MiB in {secs:.2} s = {:.1} MB/s", size >> 20, size as f64 / secs / 1e6);

    // Files: 100 MB up and down.
    let big = dir.path().join("big.bin");
    std::fs::write(&big, (0..100u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect::<Vec<u8>>())
        .unwrap();
    let target = format!("{}:{}/big.bin", a.id, a.files().display());
    for (what, args) in [
        ("upload", vec!["cp".to_string(), big.to_str().unwrap().to_string(), target.clone()]),
        ("download", vec!["cp".to_string(), target.clone(), dir.path().join("back.bin").to_str().unwrap().to_string()]),
    ] {
        let t = Instant::now();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = drover(&s, &args);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let secs = t.elapsed().as_secs_f64();
        println!(
            "BENCH files {what}: 100 MiB in {secs:.2} s = {:.1} MB/s (with hashing)",
            (100 << 20) as f64 / secs / 1e6
        );
    }
}

/// The terminal in headless Chromium: an operator signs in, opens the device's terminal from
/// its page, types a command and reads its output in xterm.js.
#[test]
fn browser_terminal_in_headless_chromium() {
    let dir = TempDir::new("remote-browser");
    let broker = Broker::start(dir.path());
    let s = Server::start(dir.path(), "server", &broker, &[("DROVER_ADMIN_PASSWORD", "browser admin password")]);
    let enroll = s.enrollment_secret("remote");
    let files = dir.path().join("dev-w").join("files");
    std::fs::create_dir_all(&files).unwrap();
    let a = Agent::start(&s, dir.path(), "dev-w", &enroll, &everything_on(&files));
    let b = crate::browser::Browser::start();
    b.goto(&format!("{}/devices/{}", s.d.base, a.id));
    b.wait_title("Sign in");
    b.type_into("input[name=username]", "admin");
    b.type_into("input[name=password]", "browser admin password");
    b.click("button[type=submit]");
    b.wait_title("Device");
    b.click("#terminal-button");
    b.wait_title("Terminal");
    eventually(Duration::from_secs(30), "the terminal session to open", || {
        let state = b.cmd(
            "POST",
            "/execute/sync",
            Some(json!({"script": "return document.getElementById('terminal').dataset.state || '';", "args": []})),
        );
        match state.as_str() {
            Some("open") => Some(()),
            Some("error") => panic!("the terminal failed: {}", b.text("#terminal-status")),
            _ => None,
        }
    });
    b.click("#terminal");
    let area = b.find("textarea.xterm-helper-textarea");
    b.cmd("POST", &format!("/element/{area}/value"), Some(json!({"text": "echo browser-$((6*7))\n"})));
    let text = eventually(Duration::from_secs(30), "the command's output in the terminal", || {
        let t =
            b.cmd("POST", "/execute/sync", Some(json!({"script": "return window.droverTerminalText();", "args": []})));
        let t = t.as_str().unwrap_or_default().to_string();
        t.lines().any(|l| l.trim() == "browser-42").then_some(t)
    });
    assert!(text.contains("echo browser-$((6*7))"), "{text}");
    // The session is recorded as the browser user's.
    let rows = sessions(&s, &a.id);
    assert_eq!(rows[0]["actor_name"], "admin");
    assert_eq!(rows[0]["kind"], "terminal");
}

/// The page a device's web server serves at `/`: root-relative links and a form.
const DEVICE_INDEX: &str = "<!doctype html><html><head><link rel=\"stylesheet\" href=\"/style.css\"></head>\
<body><h1 id=\"device-title\">Gateway admin</h1><a id=\"next\" href=\"/next\">next</a>\
<form action=\"/save\" method=\"post\"><input name=\"x\"></form></body></html>";

/// A web server on the device's side, as a router's admin page would be: `/` the page above
/// with a cookie, `/old` a redirect to `/new`, `/big` `big`'s bytes, `POST /upload` answers
/// the SHA-256 of what it got. Every request's head is kept in `heads`.
async fn device_web(
    listener: tokio::net::TcpListener,
    heads: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    big: std::sync::Arc<Vec<u8>>,
) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    loop {
        let Ok((mut sock, _)) = listener.accept().await else { continue };
        let (heads, big) = (heads.clone(), big.clone());
        tokio::spawn(async move {
            let (mut buf, mut tmp) = (Vec::new(), vec![0u8; 64 * 1024]);
            let end = loop {
                if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    break p + 4;
                }
                match sock.read(&mut tmp).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&tmp[..n]),
                }
            };
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            heads.lock().unwrap().push(head.clone());
            let mut first = head.lines().next().unwrap_or_default().split_whitespace();
            let (method, path) = (first.next().unwrap_or_default(), first.next().unwrap_or_default());
            let len: usize = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    if k.eq_ignore_ascii_case("content-length") { v.trim().parse().ok() } else { None }
                })
                .unwrap_or(0);
            let (status, ctype, extra, body): (&str, &str, &str, Vec<u8>) = match (method, path) {
                ("GET", "/") => (
                    "200 OK",
                    "text/html; charset=utf-8",
                    "Set-Cookie: sid=device-session; Path=/; HttpOnly\r\n",
                    DEVICE_INDEX.as_bytes().to_vec(),
                ),
                ("GET", "/old") => ("302 Found", "text/plain", "Location: /new\r\n", b"moved".to_vec()),
                ("GET", "/big") => ("200 OK", "application/octet-stream", "", big.to_vec()),
                ("POST", "/upload") => {
                    let mut body = buf[end..].to_vec();
                    while body.len() < len {
                        match sock.read(&mut tmp).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => body.extend_from_slice(&tmp[..n]),
                        }
                    }
                    ("200 OK", "text/plain", "", hex::encode(Sha256::digest(&body)).into_bytes())
                }
                _ => ("404 Not Found", "text/plain", "", b"no such page".to_vec()),
            };
            let head = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\n{extra}\
                 Strict-Transport-Security: max-age=31536000\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = sock.write_all(head.as_bytes()).await;
            let _ = sock.write_all(&body).await;
            let _ = sock.shutdown().await;
        });
    }
}

/// A device's local web UI opened through droverd: an operator (API and the device page's
/// form) gets a capability path whose pages come back sandboxed, with root-relative links,
/// redirects and cookies kept under it, 5 MB down and 3 MB up intact; the operator's Drover
/// cookie and token never reach the device. Bad input tried: a viewer opening one, a target
/// the device's `forward_allow` does not name, a made-up token, the path of a closed session,
/// a target with nothing listening.
#[test]
fn device_web_ui_through_the_capability_path() {
    let dir = TempDir::new("remote-web");
    let broker = Broker::start(dir.path());
    let s = Server::start(dir.path(), "server", &broker, &[]);
    let enroll = s.enrollment_secret("remote");
    let rt = runtime();
    let web = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let web_port = web.local_addr().unwrap().port();
    let down_port = free_port();
    let heads = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let big: Vec<u8> = (0..5 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    rt.spawn(device_web(web, heads.clone(), std::sync::Arc::new(big.clone())));
    let remote = format!("forward = true\nforward_allow = [\"127.0.0.1:{web_port}\", \"127.0.0.1:{down_port}\"]\n");
    let a = Agent::start(&s, dir.path(), "dev-w", &enroll, &remote);
    let viewer = s.token("viewer");
    let operator = s.token("operator");
    let open = |token: &str, port: u16| {
        let body = json!({"host": "127.0.0.1", "port": port});
        s.call("POST", &format!("/api/v1/devices/{}/web", a.id), token, Some(body))
    };
    let browser: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .max_redirects(0)
        .timeout_global(Some(Duration::from_secs(60)))
        .build()
        .into();

    // A viewer may not; a target outside the device's forward_allow is refused by the device.
    let (st, body) = open(&viewer, web_port);
    assert_eq!(st, 403, "{body}");
    let (st, body) = open(&operator, 22);
    assert_eq!(st, 409, "{body}");
    let msg = body.to_string();
    assert!(msg.contains("target-not-allowed") && msg.contains("forward_allow"), "{msg}");

    // A signed-in operator (a real Drover session cookie, to see that it stays in the browser).
    let user = json!({"username": "webop", "role": "operator", "password": "correct horse battery staple"});
    s.admin("POST", "/api/v1/users", Some(user));
    let mut login = browser
        .post(&format!("{}/api/v1/auth/login", s.d.base))
        .send_json(json!({"username": "webop", "password": "correct horse battery staple"}))
        .unwrap();
    assert_eq!(login.status(), 200);
    let session_cookie = login
        .headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().split(';').next().unwrap().to_string())
        .find(|c| c.starts_with("drover_session="))
        .unwrap();
    let csrf = login.body_mut().read_json::<Value>().unwrap()["csrf_token"].as_str().unwrap().to_string();

    // "Open web UI" on the device page: a redirect to the capability path.
    let r = browser
        .post(&format!("{}/devices/{}/web", s.d.base, a.id))
        .header("Cookie", &session_cookie)
        .send_form([("csrf", csrf.as_str()), ("host", "127.0.0.1"), ("port", &web_port.to_string())])
        .unwrap();
    assert_eq!(r.status(), 303);
    let path = r.headers().get("location").unwrap().to_str().unwrap().to_string();
    assert!(path.starts_with("/web/") && path.ends_with('/') && path.len() > 40, "{path}");
    let prefix = path.trim_end_matches('/').to_string();
    let url = format!("{}{path}", s.d.base);

    // The page, sandboxed, its links and its cookie under the capability path; the device
    // got neither the Drover cookie nor a bearer token, only its own cookie.
    let mut r = browser
        .get(&url)
        .header("Cookie", &format!("{session_cookie}; dw_sid=device-session"))
        .header("Authorization", &format!("Bearer {operator}"))
        .call()
        .unwrap();
    assert_eq!(r.status(), 200);
    let header = |r: &ureq::http::Response<ureq::Body>, name: &str| {
        r.headers().get(name).map(|v| v.to_str().unwrap().to_string()).unwrap_or_default()
    };
    assert_eq!(header(&r, "content-security-policy"), "sandbox allow-scripts allow-forms allow-popups allow-downloads");
    assert_eq!(header(&r, "strict-transport-security"), "", "the device may not set HSTS on Drover's origin");
    assert_eq!(header(&r, "set-cookie"), format!("dw_sid=device-session; Path={prefix}/; HttpOnly"));
    let html = r.body_mut().read_to_string().unwrap();
    assert!(html.contains(&format!("href=\"{prefix}/next\"")), "{html}");
    assert!(
        html.contains(&format!("href=\"{prefix}/style.css\"")) && html.contains(&format!("action=\"{prefix}/save\""))
    );
    let head = heads.lock().unwrap().last().unwrap().to_ascii_lowercase();
    assert!(head.starts_with("get / http/1.1\r\n"), "{head}");
    assert!(head.contains(&format!("host: 127.0.0.1:{web_port}\r\n")), "{head}");
    assert!(head.contains("cookie: sid=device-session\r\n"), "{head}");
    let secret = session_cookie.split_once('=').unwrap().1.to_ascii_lowercase();
    assert!(
        !head.contains(&secret) && !head.contains("drover_session"),
        "the Drover cookie reached the device: {head}"
    );
    assert!(!head.contains("authorization") && !head.contains(&operator.to_ascii_lowercase()), "{head}");

    // A redirect stays under the capability path.
    let r = browser.get(&format!("{url}old")).call().unwrap();
    assert_eq!(r.status(), 302);
    assert_eq!(header(&r, "location"), format!("{prefix}/new"));

    // 5 MB down and 3 MB up, byte for byte.
    let started = Instant::now();
    let mut r = browser.get(&format!("{url}big")).call().unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "content-length"), (5 << 20).to_string());
    let got = r.body_mut().with_config().limit(16 << 20).read_to_vec().unwrap();
    let secs = started.elapsed().as_secs_f64();
    eprintln!("web UI proxy: 5 MiB in {secs:.3} s ({:.1} MiB/s)", 5.0 / secs);
    assert_eq!(got.len(), big.len());
    assert_eq!(hex::encode(Sha256::digest(&got)), hex::encode(Sha256::digest(&big)));
    let up = &big[..3 << 20];
    let mut r = browser.post(&format!("{url}upload")).send(up).unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.body_mut().read_to_string().unwrap(), hex::encode(Sha256::digest(up)));

    // A made-up token: 404, and nothing reaches the device.
    let before = heads.lock().unwrap().len();
    let r = browser.get(&format!("{}/web/{}/", s.d.base, "A".repeat(43))).call().unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(header(&r, "content-security-policy"), "sandbox");
    assert_eq!(heads.lock().unwrap().len(), before);

    // Nothing listening at an allowed target: a clear 502 with the device's reason.
    let (st, down) = open(&operator, down_port);
    assert_eq!(st, 201, "{down}");
    let mut r = browser.get(&format!("{}{}", s.d.base, down["url"].as_str().unwrap())).call().unwrap();
    assert_eq!(r.status(), 502);
    let page = r.body_mut().read_to_string().unwrap();
    assert!(page.contains("refused") && page.contains(&format!("127.0.0.1:{down_port}")), "{page}");

    // The device page lists the open sessions; the one who opened a session may get a new
    // address for it (its first one is never stored), the others may not.
    let session = eventually(Duration::from_secs(10), "the web UI session's row", || {
        sessions(&s, &a.id).into_iter().find(|r| r["detail"] == format!("web UI to 127.0.0.1:{web_port}"))
    });
    let id = session["id"].as_str().unwrap();
    let down_id = down["session"].as_str().unwrap();
    let mut r =
        browser.get(&format!("{}/devices/{}/remote", s.d.base, a.id)).header("Cookie", &session_cookie).call().unwrap();
    let page = r.body_mut().read_to_string().unwrap();
    let token_of = |p: &str| p.trim_start_matches("/web/").trim_end_matches('/').to_string();
    assert!(page.contains("id=\"web-sessions\"") && page.contains(down_id), "{page}");
    assert!(!page.contains(&token_of(&path)), "a capability path is never shown again");
    assert!(page.contains(&format!("/web/{id}/address")), "{page}");
    assert!(!page.contains(&format!("/web/{down_id}/address")), "another's session has no address for this user");
    let address = |session: &str| {
        browser
            .post(&format!("{}/devices/{}/web/{session}/address", s.d.base, a.id))
            .header("Cookie", &session_cookie)
            .send_form([("csrf", csrf.as_str())])
            .unwrap()
    };
    let r = address(id);
    assert_eq!(r.status(), 303);
    let again = r.headers().get("location").unwrap().to_str().unwrap().to_string();
    assert!(again.starts_with("/web/") && again != path, "{again}");
    let mut r = browser.get(&format!("{}{again}", s.d.base)).call().unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.body_mut().read_to_string().unwrap().contains("Gateway admin"));
    let r = address(down_id);
    assert_eq!(r.status(), 303);
    assert!(
        r.headers().get("location").unwrap().to_str().unwrap().starts_with(&format!("/devices/{}/remote", a.id)),
        "refused: back to the device page"
    );
    let audit = s.admin("GET", "/api/v1/audit?action=remote.link", None);
    assert_eq!(audit["items"].as_array().unwrap().len(), 1, "{audit}");

    // Closing: every address is dead at once, the row has the bytes.
    let (st, _) = s.call("POST", &format!("/api/v1/remote-sessions/{id}/close"), &viewer, Some(json!({})));
    assert_eq!(st, 403, "a viewer may not close it");
    let (st, body) = s.call("POST", &format!("/api/v1/remote-sessions/{id}/close"), &operator, Some(json!({})));
    assert_eq!(st, 204, "{body}");
    for u in [url.clone(), format!("{}{again}", s.d.base)] {
        let r = browser.get(&u).call().unwrap();
        assert_eq!(r.status(), 404, "a closed session's path");
    }
    let row = sessions(&s, &a.id).into_iter().find(|r| r["id"] == id).unwrap();
    assert!(row["ended_at"].is_string(), "{row}");
    assert!(row["bytes_in"].as_i64().unwrap() > 5 << 20, "{row}");
    assert!(row["bytes_out"].as_i64().unwrap() > 3 << 20, "{row}");
    assert!(!a.log().contains("panicked"), "{}", a.log());
}

/// Every file in `dir`, hidden ones included.
fn names_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        std::fs::read_dir(dir).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

/// A `drover cp` download of `src` to `dst` that is cut once its partial file holds more than
/// 1 MiB, by `cut` (given the CLI's process); returns the CLI's output.
fn cut_download(s: &Server, src: &str, dst: &Path, cut: impl FnOnce(&Child)) -> std::process::Output {
    let child = Command::new(cli_bin())
        .args(["cp", src, dst.to_str().unwrap()])
        .env("DROVER_URL", &s.d.base)
        .env("DROVER_TOKEN", &s.token)
        .env("DROVER_CONFIG", "/nonexistent/drover-config.json")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let dir = dst.parent().unwrap();
    eventually(Duration::from_secs(60), "the download's partial file to grow", || {
        std::fs::read_dir(dir).unwrap().flatten().find(|e| {
            e.file_name().to_string_lossy().contains(".drover-part-") && e.metadata().unwrap().len() > 1 << 20
        })
    });
    cut(&child);
    child.wait_with_output().unwrap()
}

/// Transfers cut in the middle leave no partial file: a download by `drover cp` stopped by
/// SIGTERM, by SIGHUP (the terminal closing) and by the device going away leaves nothing at
/// the local target, hidden partial file included; an upload whose WebSocket is dropped
/// mid-way leaves no file at the device's target and no temporary file once the session has
/// ended; a download whose WebSocket is dropped ends the session and leaves the device's file
/// as it was. Bad input tried: each of those cuts.
#[test]
fn transfers_cut_mid_way_leave_no_partial_file() {
    let dir = TempDir::new("remote-cut");
    let broker = Broker::start(dir.path());
    // A short idle limit: a device that vanishes mid-transfer ends the session within seconds.
    let s = Server::start(dir.path(), "server", &broker, &[("DROVER_REMOTE_IDLE_TIMEOUT_SECS", "5")]);
    let enroll = s.enrollment_secret("remote");
    let files = dir.path().join("dev-cut").join("files");
    std::fs::create_dir_all(&files).unwrap();
    let mut a = Agent::start(&s, dir.path(), "dev-cut", &enroll, &everything_on(&files));
    let remote_dir = a.files();
    let local = dir.path().join("local");
    std::fs::create_dir_all(&local).unwrap();
    let size = 100usize << 20;
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let data: Vec<u8> = (0..size / 8)
        .flat_map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()
        })
        .collect();
    std::fs::write(remote_dir.join("big.bin"), &data).unwrap();
    let want = hex::encode(Sha256::digest(&data));
    let src = format!("{}:{}/big.bin", a.id, remote_dir.display());
    let dst = local.join("dl.bin");

    // The CLI stopped mid-download by SIGTERM, then by SIGHUP: nothing at the target, no
    // hidden partial file.
    for sig in ["-TERM", "-HUP"] {
        let out = cut_download(&s, &src, &dst, |c| {
            Command::new("kill").args([sig, &c.id().to_string()]).status().unwrap();
        });
        assert!(!out.status.success(), "kill {sig}: the CLI reports the cut");
        assert!(String::from_utf8_lossy(&out.stderr).contains("nothing was written"), "{out:?}");
        assert_eq!(names_in(&local), Vec::<String>::new(), "kill {sig}: files left");
    }

    let rt = runtime();
    rt.block_on(async {
        let auth = format!("Bearer {}", s.token);
        // An upload whose WebSocket is dropped once the device holds more than 1 MiB of it.
        let q = format!("path={}/up.bin&size={size}&sha256={want}", remote_dir.display());
        let url = format!("{}/api/v1/devices/{}/files?op=upload&{q}", s.ws_base(), a.id);
        let mut ws = ws_open(&url, &[("authorization", &auth)]).await.unwrap();
        assert!(matches!(next_control(&mut ws).await, Control::Opened { .. }));
        let sender = tokio::spawn(async move {
            for chunk in data.chunks(32 * 1024) {
                if ws.send(Message::Binary(chunk.to_vec().into())).await.is_err() {
                    break;
                }
            }
            ws
        });
        let dir2 = remote_dir.clone();
        tokio::task::spawn_blocking(move || {
            eventually(Duration::from_secs(60), "the upload to be under way on the device", || {
                std::fs::read_dir(&dir2)
                    .unwrap()
                    .flatten()
                    .find(|e| e.file_name() != "big.bin" && e.metadata().is_ok_and(|m| m.len() > 1 << 20))
            })
        })
        .await
        .unwrap();
        sender.abort();
        let _ = sender.await;
        let row = eventually(Duration::from_secs(30), "the cut upload's session to end", || {
            sessions(&s, &a.id)
                .into_iter()
                .find(|r| r["detail"].as_str().unwrap().contains("up.bin") && r["ended_at"].is_string())
        });
        assert!(row["end_reason"].as_str().unwrap().contains("operator"), "{row}");
        eventually(Duration::from_secs(30), "the device to remove its temporary file", || {
            (names_in(&remote_dir) == ["big.bin"]).then_some(())
        });

        // A download whose WebSocket is dropped after its first MiB.
        let url =
            format!("{}/api/v1/devices/{}/files?op=download&path={}/big.bin", s.ws_base(), a.id, remote_dir.display());
        let mut ws = ws_open(&url, &[("authorization", &auth)]).await.unwrap();
        let mut got = 0;
        while got < 1 << 20 {
            match tokio::time::timeout(Duration::from_secs(30), ws.next()).await.unwrap() {
                Some(Ok(Message::Binary(b))) => got += b.len(),
                Some(Ok(_)) => {}
                other => panic!("the download ended early: {other:?}"),
            }
        }
        drop(ws);
        let row = eventually(Duration::from_secs(30), "the cut download's session to end", || {
            sessions(&s, &a.id)
                .into_iter()
                .find(|r| r["detail"].as_str().unwrap().starts_with("download") && r["ended_at"].is_string())
        });
        assert!(row["bytes_in"].as_i64().unwrap() < size as i64, "{row}");
        assert!(row["end_reason"].as_str().unwrap().contains("operator"), "{row}");
    });
    assert_eq!(sha256_file(&remote_dir.join("big.bin")), want, "the device's file is as it was");

    // The device goes away mid-download: the session ends at the idle limit, the CLI fails
    // and leaves nothing.
    let out = cut_download(&s, &src, &dst, |_| {
        let _ = a.child.kill();
    });
    let _ = a.child.wait();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("idle-timeout"), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(names_in(&local), Vec::<String>::new(), "files left after the device went away");
}

/// The device's web UI in a real browser: "Open web UI" on the device's page (with the form's
/// CSRF token) lands on the device's page, rendered, in an opaque origin (the sandbox holds:
/// no cookie access), and the signed-in browser's Drover session cookie does not reach the
/// device.
#[test]
fn device_web_ui_in_headless_chromium() {
    let dir = TempDir::new("remote-web-browser");
    let broker = Broker::start(dir.path());
    let s = Server::start(dir.path(), "server", &broker, &[("DROVER_ADMIN_PASSWORD", "browser admin password")]);
    let enroll = s.enrollment_secret("remote");
    let rt = runtime();
    let web = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let web_port = web.local_addr().unwrap().port();
    let heads = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    rt.spawn(device_web(web, heads.clone(), std::sync::Arc::new(Vec::new())));
    let a = Agent::start(
        &s,
        dir.path(),
        "dev-wb",
        &enroll,
        &format!("forward = true\nforward_allow = [\"127.0.0.1:{web_port}\"]\n"),
    );
    let b = crate::browser::Browser::start();
    b.goto(&format!("{}/devices/{}/remote", s.d.base, a.id));
    b.wait_title("Sign in");
    b.type_into("input[name=username]", "admin");
    b.type_into("input[name=password]", "browser admin password");
    b.click("button[type=submit]");
    b.wait_title("Remote access");
    let script = |js: &str| b.cmd("POST", "/execute/sync", Some(json!({"script": js, "args": []})));
    // The form opens a new tab; here the same tab, so that the driver follows it.
    script(&format!(
        "const f = document.querySelector('#web-ui form'); f.removeAttribute('target'); \
         f.querySelector('input[name=port]').value = '{web_port}';"
    ));
    b.click("#web-ui button[type=submit]");
    let title = eventually(Duration::from_secs(30), "the device's page", || {
        let t = script("const h = document.getElementById('device-title'); return h ? h.textContent : '';");
        t.as_str().filter(|t| !t.is_empty()).map(str::to_string)
    });
    assert_eq!(title, "Gateway admin");
    let seen = script(
        "let c; try { c = document.cookie; c = 'readable'; } catch (e) { c = 'blocked'; } \
         return [location.pathname, window.origin, c, document.getElementById('next').getAttribute('href')];",
    );
    let path = seen[0].as_str().unwrap();
    assert!(path.starts_with("/web/"), "{seen}");
    assert_eq!(seen[1], "null", "an opaque origin: {seen}");
    assert_eq!(seen[2], "blocked", "no cookie access: {seen}");
    assert_eq!(seen[3].as_str().unwrap(), format!("{path}next"), "{seen}");
    let head = heads.lock().unwrap().iter().find(|h| h.starts_with("GET / ")).cloned().unwrap();
    assert!(!head.to_ascii_lowercase().contains("drover_session"), "{head}");
}

/// A session whose droverd dies without ending it (kill -9) does not stay open for ever: once
/// no droverd has vouched for it for `remote_lost_after_secs`, the restarted droverd ends it as
/// `lost`, at the last moment it was known alive, in the audit log as droverd's own act; a
/// session on a running droverd is vouched for and stays open however long it lasts.
#[test]
fn a_session_whose_droverd_dies_is_ended_as_lost_and_audited() {
    let dir = TempDir::new("remote-lost");
    let broker = Broker::start(dir.path());
    let mut s = Server::start(dir.path(), "server", &broker, &[("DROVER_REMOTE_LOST_AFTER_SECS", "2")]);
    let enroll = s.enrollment_secret("remote");
    let files = dir.path().join("dev-lost").join("files");
    std::fs::create_dir_all(&files).unwrap();
    let a = Agent::start(&s, dir.path(), "dev-lost", &enroll, &everything_on(&files));
    let rt = runtime();
    let url = format!("{}/api/v1/devices/{}/terminal", s.ws_base(), a.id);
    let auth = format!("Bearer {}", s.token);
    let open = |rt: &tokio::runtime::Runtime| {
        rt.block_on(async {
            let mut ws = ws_open(&url, &[("authorization", &auth)]).await.unwrap();
            let Control::Opened { session } = next_control(&mut ws).await else { panic!("expected opened") };
            (ws, session)
        })
    };
    let (ws, first) = open(&rt);
    let session = |s: &Server, id: &str| s.admin("GET", &format!("/api/v1/remote-sessions/{id}"), None);
    assert!(session(&s, &first)["ended_at"].is_null());
    // Longer than the limit: the running droverd keeps vouching for its session.
    std::thread::sleep(Duration::from_secs(5));
    assert!(session(&s, &first)["ended_at"].is_null(), "a live session is not lost: {}", session(&s, &first));

    s.d.kill();
    drop(ws);
    s.d.restart();
    let row = eventually(Duration::from_secs(20), "the dead droverd's session ended as lost", || {
        let row = session(&s, &first);
        (row["end_reason"] == "lost").then_some(row)
    });
    assert!(row["ended_at"].is_string(), "{row}");
    let audit = s.admin("GET", "/api/v1/audit?action=remote.close", None);
    let entries: Vec<&Value> = audit["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["summary"].as_str().is_some_and(|t| t.contains(&first)))
        .collect();
    assert_eq!(entries.len(), 1, "ended once, audited once: {audit}");
    assert!(entries[0]["summary"].as_str().unwrap().contains("(lost)"), "{}", entries[0]);

    // A session opened on the restarted droverd outlives the limit too, and ends normally.
    let (mut ws, second) = open(&rt);
    std::thread::sleep(Duration::from_secs(5));
    assert!(session(&s, &second)["ended_at"].is_null(), "{}", session(&s, &second));
    rt.block_on(async { ws.close(None).await.unwrap() });
    let row = eventually(Duration::from_secs(20), "the second session to end", || {
        let row = session(&s, &second);
        row["ended_at"].is_string().then_some(row)
    });
    assert_ne!(row["end_reason"], "lost", "{row}");
    drop(a);
}
