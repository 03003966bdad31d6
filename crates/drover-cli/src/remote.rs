//! Remote access from the command line: `drover term`, `drover cp` and `drover forward`, each
//! one WebSocket to droverd (`docs/remote-access.md`), which relays it to the device.

use std::io::{IsTerminal as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use drover_proto::api::ErrorBody;
use drover_proto::operator::{Control, INITIAL_CREDIT, MAX_DATA, MuxFrame, MuxKind};
use futures_util::{SinkExt as _, StreamExt as _};
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;

use crate::client::{CliError, Client, segment};

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

fn runtime() -> Result<tokio::runtime::Runtime, CliError> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| CliError::Usage(format!("cannot start: {e}")))
}

fn query_value(s: &str) -> String {
    segment(s)
}

fn lost(e: impl std::fmt::Display) -> CliError {
    CliError::Usage(format!("the remote session was cut: {e}"))
}

/// Opens the WebSocket at `/api/v1{path}` and waits for the device to accept the session.
async fn connect(client: &Client, path: &str) -> Result<Socket, CliError> {
    let base = client.base();
    let ws_base = if let Some(rest) = base.strip_prefix("https://") {
        format!("wss://{rest}")
    } else {
        format!("ws://{}", base.trim_start_matches("http://"))
    };
    let mut req = format!("{ws_base}/api/v1{path}")
        .into_client_request()
        .map_err(|e| CliError::Usage(format!("invalid server address {base:?}: {e}")))?;
    if let Some(t) = client.token()
        && let Ok(v) = format!("Bearer {t}").parse()
    {
        req.headers_mut().insert("authorization", v);
    }
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| CliError::Usage(format!("TLS: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_tungstenite::Connector::Rustls(Arc::new(tls));
    let connecting = tokio_tungstenite::connect_async_tls_with_config(req, None, true, Some(connector));
    let (mut ws, _) = match connecting.await {
        Ok(c) => c,
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            let status = resp.status().as_u16();
            let body = resp.body().as_deref().unwrap_or_default();
            let Ok(err) = serde_json::from_slice::<ErrorBody>(body) else {
                let detail = String::from_utf8_lossy(body).chars().take(200).collect();
                return Err(CliError::Protocol { status, detail });
            };
            let message = err.error.message;
            return Err(match status {
                401 => CliError::Unauthorized { message },
                403 if message.starts_with("permission denied") => CliError::Forbidden { message },
                403 => CliError::Forbidden { message: format!("permission denied: {message}") },
                _ => CliError::Api { status, code: err.error.code, message },
            });
        }
        Err(e) => return Err(CliError::Unreachable { url: base.to_string(), cause: e.to_string() }),
    };
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) => match serde_json::from_str::<Control>(&t) {
                Ok(Control::Opened { .. }) => return Ok(ws),
                Ok(Control::Error { code, message }) => return Err(refused(&code, &message)),
                _ => {}
            },
            Some(Ok(Message::Close(_))) | None => return Err(lost("the server closed the connection")),
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(lost(e)),
        }
    }
}

fn refused(code: &str, message: &str) -> CliError {
    CliError::Api { status: 0, code: code.to_string(), message: message.to_string() }
}

// ------------------------------------------------------------------ term

/// The size a terminal gets when this one does not say: no terminal at all, or one that
/// reports 0 × 0 (CI runners, serial consoles).
const DEFAULT_SIZE: (u16, u16) = (80, 24);

/// The terminal's size (columns, rows), from `stty size` on the controlling terminal; `None`
/// when there is none or it reports no size.
fn window_size() -> Option<(u16, u16)> {
    let tty = std::fs::File::open("/dev/tty").ok()?;
    let out = std::process::Command::new("stty").arg("size").stdin(tty).output().ok()?;
    parse_stty_size(&String::from_utf8(out.stdout).ok()?)
}

/// `ROWS COLS` as `stty size` prints it → (columns, rows), kept within what the server takes
/// (1 to 1000); a 0 in either is no size.
fn parse_stty_size(text: &str) -> Option<(u16, u16)> {
    let mut it = text.split_whitespace();
    let rows: u16 = it.next()?.parse().ok()?;
    let cols: u16 = it.next()?.parse().ok()?;
    (rows > 0 && cols > 0).then(|| (cols.min(1000), rows.min(1000)))
}

/// Raw mode on stdin while it lives: every key goes to the device as typed (Ctrl-C
/// included), nothing is echoed locally; the old mode is restored on drop.
struct RawMode {
    saved: nix::sys::termios::Termios,
}

impl RawMode {
    fn enter() -> Option<RawMode> {
        use nix::sys::termios::{SetArg, cfmakeraw, tcgetattr, tcsetattr};
        let stdin = std::io::stdin();
        if !stdin.is_terminal() {
            return None;
        }
        let saved = tcgetattr(&stdin).ok()?;
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        tcsetattr(&stdin, SetArg::TCSANOW, &raw).ok()?;
        Some(RawMode { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = nix::sys::termios::tcsetattr(std::io::stdin(), nix::sys::termios::SetArg::TCSANOW, &self.saved);
    }
}

/// `drover term DEVICE`: a shell on the device; exits with the shell's status.
pub fn term(client: &Client, device: &str) -> Result<ExitCode, CliError> {
    let device = &crate::fleet::resolve_device_id(client, device)?;
    let (cols, rows) = window_size().unwrap_or(DEFAULT_SIZE);
    runtime()?.block_on(async {
        let path = format!("/devices/{}/terminal?cols={cols}&rows={rows}", segment(device));
        let ws = connect(client, &path).await?;
        let raw = RawMode::enter();
        let code = run_term(ws).await;
        drop(raw);
        let code = code?;
        Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)))
    })
    // Returning ends the process at once: the thread reading stdin is never joined.
}

/// Reads stdin on a thread of its own, never joined, and hands over what it reads. A read
/// blocks until a key is pressed; on tokio's blocking pool that read would hold the runtime
/// open after the shell ended, so the command would wait for one more key before exiting.
fn stdin_keys() -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel::<Vec<u8>>(16);
    let spawned = std::thread::Builder::new().name("stdin".into()).spawn(move || {
        use std::io::Read as _;
        let mut stdin = std::io::stdin().lock();
        let mut buf = vec![0u8; 4096];
        loop {
            match stdin.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => {
                    if tx.blocking_send(buf[..n].to_vec()).is_err() {
                        return;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    });
    // Without the thread, no keys reach the device, as with a closed stdin.
    drop(spawned);
    rx
}

async fn run_term(ws: Socket) -> Result<i32, CliError> {
    let (mut tx, mut rx) = ws.split();
    let (out_tx, mut out_rx) = mpsc::channel::<Message>(16);
    let keys = out_tx.clone();
    // Keys: stdin as it comes (a pipe's end sends nothing: the shell ends when told to).
    let mut stdin = stdin_keys();
    tokio::spawn(async move {
        while let Some(b) = stdin.recv().await {
            if keys.send(Message::Binary(b.into())).await.is_err() {
                return;
            }
        }
    });
    if let Ok(mut winch) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change()) {
        let resize = out_tx.clone();
        tokio::spawn(async move {
            while winch.recv().await.is_some() {
                if let Some((cols, rows)) = window_size() {
                    let m = Message::Text(Control::Resize { cols, rows }.to_text().into());
                    if resize.send(m).await.is_err() {
                        return;
                    }
                }
            }
        });
    }
    drop(out_tx);
    let writer = tokio::spawn(async move {
        while let Some(m) = out_rx.recv().await {
            if tx.send(m).await.is_err() {
                return;
            }
        }
    });
    let mut stdout = tokio::io::stdout();
    let result = loop {
        match rx.next().await {
            Some(Ok(Message::Binary(b))) => {
                if stdout.write_all(&b).await.is_err() || stdout.flush().await.is_err() {
                    break Err(lost("cannot write to the terminal"));
                }
            }
            Some(Ok(Message::Text(t))) => match serde_json::from_str::<Control>(&t) {
                Ok(Control::Exit { code }) => break Ok(code),
                Ok(Control::Error { code, message }) => break Err(refused(&code, &message)),
                _ => {}
            },
            Some(Ok(Message::Close(_))) | None => break Err(lost("the server closed the connection")),
            Some(Ok(_)) => {}
            Some(Err(e)) => break Err(lost(e)),
        }
    };
    writer.abort();
    result
}

// ------------------------------------------------------------------ cp

/// `DEVICE:/path` → (device, path); anything else is a local path.
fn remote_spec(s: &str) -> Option<(&str, &str)> {
    let (device, path) = s.split_once(':')?;
    (!device.is_empty() && !device.contains('/') && path.starts_with('/')).then_some((device, path))
}

fn io_err(what: &str, path: &Path, e: std::io::Error) -> CliError {
    CliError::Usage(format!("cannot {what} {}: {e}", path.display()))
}

struct Progress {
    total: u64,
    done: u64,
    started: Instant,
    last: Instant,
    show: bool,
}

impl Progress {
    fn new(total: u64) -> Progress {
        let now = Instant::now();
        Progress { total, done: 0, started: now, last: now, show: std::io::stderr().is_terminal() }
    }

    fn add(&mut self, n: usize) {
        self.done += n as u64;
        if self.show && self.last.elapsed() >= Duration::from_millis(200) {
            self.last = Instant::now();
            let pct = (self.done * 100).checked_div(self.total).unwrap_or(100);
            eprint!("\r{} / {} bytes ({pct}%)   ", self.done, self.total);
            let _ = std::io::stderr().flush();
        }
    }

    fn finish(&self, what: &str) {
        let secs = self.started.elapsed().as_secs_f64().max(0.001);
        if self.show {
            // Clears the progress line; the summary is output, on stdout.
            eprint!("\r\x1b[K");
        }
        println!(
            "{what}: {} bytes in {secs:.1} s ({:.1} MB/s), SHA-256 verified",
            self.done,
            self.done as f64 / secs / 1e6
        );
    }
}

/// Where an upload goes on the device: `path` itself, or, for a directory written as scp does
/// (`/dir/`), the local file's name in it.
fn upload_target(local: &Path, path: &str) -> Result<String, CliError> {
    if !path.ends_with('/') {
        return Ok(path.to_string());
    }
    let name = local
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| CliError::Usage(format!("{}: name the file to copy, not a directory", local.display())))?;
    Ok(format!("{path}{name}"))
}

/// Where a download is written: `local`, or for a local directory the remote file's name in it.
fn download_target(path: &str, local: &Path) -> Result<PathBuf, CliError> {
    let name = path.rsplit('/').next().filter(|n| !n.is_empty() && *n != "." && *n != "..");
    let Some(name) = name else {
        return Err(CliError::Usage(format!("{path}: name a file on the device, not a directory")));
    };
    if local.is_dir() {
        return Ok(local.join(name));
    }
    if local.as_os_str().to_string_lossy().ends_with('/') {
        return Err(CliError::Usage(format!("{}: no such directory", local.display())));
    }
    Ok(local.to_path_buf())
}

/// `drover cp SRC DST`: one side is `DEVICE:/path`.
pub fn cp(client: &Client, src: &str, dst: &str) -> Result<ExitCode, CliError> {
    match (remote_spec(src), remote_spec(dst)) {
        (None, Some((device, path))) => {
            let path = upload_target(Path::new(src), path)?;
            let device = crate::fleet::resolve_device_id(client, device)?;
            runtime()?.block_on(upload(client, Path::new(src), &device, &path))
        }
        (Some((device, path)), None) => {
            let target = download_target(path, Path::new(dst))?;
            let device = crate::fleet::resolve_device_id(client, device)?;
            runtime()?.block_on(download(client, &device, path, &target))
        }
        (Some(_), Some(_)) => {
            Err(CliError::Usage("copy between a device and this machine: one side must be a local path".into()))
        }
        (None, None) => {
            Err(CliError::Usage(format!("name the device side as DEVICE:/absolute/path (got {src:?} and {dst:?})")))
        }
    }?;
    Ok(ExitCode::SUCCESS)
}

fn file_sha256(path: &Path) -> Result<(u64, String), CliError> {
    let mut f = std::fs::File::open(path).map_err(|e| io_err("read", path, e))?;
    let mut h = Sha256::new();
    let n = std::io::copy(&mut f, &mut h).map_err(|e| io_err("read", path, e))?;
    Ok((n, hex::encode(h.finalize())))
}

async fn upload(client: &Client, local: &Path, device: &str, path: &str) -> Result<(), CliError> {
    let meta = std::fs::metadata(local).map_err(|e| io_err("read", local, e))?;
    if !meta.is_file() {
        return Err(CliError::Usage(format!("{} is not a regular file", local.display())));
    }
    let (size, sha) = file_sha256(local)?;
    let q = format!("/devices/{}/files?op=upload&path={}&size={size}&sha256={sha}", segment(device), query_value(path));
    let mut ws = connect(client, &q).await?;
    let mut f = tokio::fs::File::open(local).await.map_err(|e| io_err("read", local, e))?;
    let mut progress = Progress::new(size);
    let mut buf = vec![0u8; MAX_DATA];
    let mut sent = 0u64;
    loop {
        let n = f.read(&mut buf).await.map_err(|e| io_err("read", local, e))?;
        if n == 0 {
            break;
        }
        sent += n as u64;
        ws.send(Message::Binary(buf[..n].to_vec().into())).await.map_err(lost)?;
        progress.add(n);
    }
    if sent != size {
        return Err(CliError::Usage(format!("{} changed while it was being sent", local.display())));
    }
    ws.send(Message::Text(Control::Eof.to_text().into())).await.map_err(lost)?;
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) => match serde_json::from_str::<Control>(&t) {
                Ok(Control::Done { size: got, sha256 }) => {
                    if got != size || sha256 != sha {
                        return Err(CliError::Usage(format!(
                            "the device reports {got} bytes with SHA-256 {sha256}, not {size} bytes with {sha}"
                        )));
                    }
                    progress.finish(&format!("{} → {device}:{path}", local.display()));
                    return Ok(());
                }
                Ok(Control::Error { code, message }) => return Err(refused(&code, &message)),
                _ => {}
            },
            Some(Ok(Message::Close(_))) | None => {
                return Err(lost("the server closed the connection before the device confirmed the file"));
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(lost(e)),
        }
    }
}

/// Resolves when the signal arrives; never without a handler.
async fn on_signal(s: Option<&mut tokio::signal::unix::Signal>) {
    match s {
        Some(s) => {
            s.recv().await;
        }
        None => std::future::pending().await,
    }
}

/// Removes the partial file unless the download completed.
struct PartFile(Option<PathBuf>);

impl Drop for PartFile {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Downloads `path` into the file `target` (see `download_target`).
async fn download(client: &Client, device: &str, path: &str, target: &Path) -> Result<(), CliError> {
    let target = target.to_path_buf();
    let dir = match target.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let part_path = dir.join(format!(".{name}.drover-part-{}", std::process::id()));
    let q = format!("/devices/{}/files?op=download&path={}", segment(device), query_value(path));
    let mut ws = connect(client, &q).await?;
    let mut part = PartFile(Some(part_path.clone()));
    // Ctrl-C, a kill or the terminal closing (SIGHUP) leaves no partial file behind.
    let interrupted = {
        let part_path = part_path.clone();
        async move {
            use tokio::signal::unix::{SignalKind, signal};
            let mut term = signal(SignalKind::terminate()).ok();
            let mut hangup = signal(SignalKind::hangup()).ok();
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = on_signal(term.as_mut()) => {}
                _ = on_signal(hangup.as_mut()) => {}
            }
            let _ = std::fs::remove_file(&part_path);
        }
    };
    tokio::select! {
        r = receive(&mut ws, &part_path, device, path, &target) => {
            r?;
            part.0 = None;
            Ok(())
        }
        _ = interrupted => Err(CliError::Usage("interrupted; nothing was written".into())),
    }
}

async fn receive(ws: &mut Socket, part_path: &Path, device: &str, path: &str, target: &Path) -> Result<(), CliError> {
    let mut f = tokio::fs::File::create(part_path).await.map_err(|e| io_err("write", part_path, e))?;
    let mut h = Sha256::new();
    let mut progress = Progress::new(0);
    let mut got = 0u64;
    loop {
        match ws.next().await {
            Some(Ok(Message::Binary(b))) => {
                f.write_all(&b).await.map_err(|e| io_err("write", part_path, e))?;
                h.update(&b);
                got += b.len() as u64;
                progress.add(b.len());
            }
            Some(Ok(Message::Text(t))) => match serde_json::from_str::<Control>(&t) {
                Ok(Control::Meta { size }) => progress.total = size,
                Ok(Control::Done { size, sha256 }) => {
                    let mine = hex::encode(h.finalize());
                    if size != got || sha256 != mine {
                        return Err(CliError::Usage(format!(
                            "{device}:{path}: received {got} bytes with SHA-256 {mine}, the device sent {size} bytes with {sha256}; nothing was written"
                        )));
                    }
                    f.sync_all().await.map_err(|e| io_err("write", part_path, e))?;
                    drop(f);
                    tokio::fs::rename(part_path, target).await.map_err(|e| io_err("write", target, e))?;
                    progress.finish(&format!("{device}:{path} → {}", target.display()));
                    return Ok(());
                }
                Ok(Control::Error { code, message }) => return Err(refused(&code, &message)),
                _ => {}
            },
            Some(Ok(Message::Close(_))) | None => {
                return Err(lost("the server closed the connection mid-transfer; nothing was written"));
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(lost(format!("{e}; nothing was written"))),
        }
    }
}

// ------------------------------------------------------------------ forward

/// `LOCAL_PORT:HOST:PORT`.
fn forward_spec(spec: &str) -> Result<(u16, String, u16), CliError> {
    let bad =
        || CliError::Usage(format!("give the forward as LOCAL_PORT:HOST:PORT, e.g. 8080:127.0.0.1:80 (got {spec:?})"));
    let (local, rest) = spec.split_once(':').ok_or_else(bad)?;
    let (host, port) = rest.rsplit_once(':').ok_or_else(bad)?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(bad());
    }
    Ok((local.parse().map_err(|_| bad())?, host.to_string(), port.parse().map_err(|_| bad())?))
}

/// One forwarded connection's side of the socket: what the server sends for it.
enum Inbound {
    Data(Vec<u8>),
    Eof,
    Reset(String),
}

struct Conn {
    to_local: mpsc::UnboundedSender<Inbound>,
    credit: Arc<tokio::sync::Semaphore>,
}

type Conns = Arc<std::sync::Mutex<std::collections::HashMap<u32, Conn>>>;

/// `drover forward DEVICE LOCAL_PORT:HOST:PORT`: every connection to the local port is a
/// connection from the device to HOST:PORT, until Ctrl-C.
pub fn forward(client: &Client, device: &str, spec: &str) -> Result<ExitCode, CliError> {
    let (local_port, host, port) = forward_spec(spec)?;
    let device = &crate::fleet::resolve_device_id(client, device)?;
    runtime()?.block_on(async move {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", local_port))
            .await
            .map_err(|e| CliError::Usage(format!("cannot listen on 127.0.0.1:{local_port}: {e}")))?;
        let q = format!("/devices/{}/forward?host={}&port={port}", segment(device), query_value(&host));
        let ws = connect(client, &q).await?;
        let addr = listener.local_addr().map_err(|e| CliError::Usage(e.to_string()))?;
        println!("forwarding {addr} to {host}:{port} on {device}; Ctrl-C to stop");
        let _ = std::io::stdout().flush();
        let (mut tx, mut rx) = ws.split();
        let (out_tx, mut out_rx) = mpsc::channel::<Vec<u8>>(256);
        let writer = tokio::spawn(async move {
            while let Some(f) = out_rx.recv().await {
                if tx.send(Message::Binary(f.into())).await.is_err() {
                    return;
                }
            }
        });
        let conns: Conns = Default::default();
        let reader = {
            let conns = conns.clone();
            async move {
                while let Some(m) = rx.next().await {
                    match m {
                        Ok(Message::Binary(b)) => {
                            let Some(f) = MuxFrame::decode(&b) else { continue };
                            let guard = conns.lock().unwrap_or_else(|e| e.into_inner());
                            let Some(c) = guard.get(&f.stream) else { continue };
                            match f.kind {
                                MuxKind::Data => {
                                    let _ = c.to_local.send(Inbound::Data(f.payload.to_vec()));
                                }
                                MuxKind::Eof => {
                                    let _ = c.to_local.send(Inbound::Eof);
                                }
                                MuxKind::Reset => {
                                    let _ = c.to_local.send(Inbound::Reset(String::from_utf8_lossy(f.payload).into()));
                                }
                                MuxKind::Credit => c.credit.add_permits(f.credit_bytes() as usize),
                                MuxKind::Open => {}
                            }
                        }
                        Ok(Message::Text(t)) => {
                            if let Ok(Control::Error { code, message }) = serde_json::from_str::<Control>(&t) {
                                return refused(&code, &message);
                            }
                        }
                        Ok(Message::Close(_)) => break,
                        Ok(_) => {}
                        Err(e) => return lost(e),
                    }
                }
                lost("the server closed the connection")
            }
        };
        let next_id = AtomicU32::new(1);
        let accept = async {
            loop {
                let Ok((sock, _)) = listener.accept().await else { continue };
                let _ = sock.set_nodelay(true);
                let id = next_id.fetch_add(1, Ordering::Relaxed);
                let (to_local, from_ws) = mpsc::unbounded_channel();
                let credit = Arc::new(tokio::sync::Semaphore::new(INITIAL_CREDIT as usize));
                conns.lock().unwrap_or_else(|e| e.into_inner()).insert(id, Conn { to_local, credit: credit.clone() });
                if out_tx.send(MuxFrame::encode(id, MuxKind::Open, &[])).await.is_err() {
                    return;
                }
                tokio::spawn(pump(id, sock, from_ws, credit, out_tx.clone(), conns.clone()));
            }
        };
        let stop = tokio::signal::ctrl_c();
        let result = tokio::select! {
            e = reader => Err(e),
            _ = accept => Ok(()),
            _ = stop => Ok(()),
        };
        writer.abort();
        result.map(|()| ExitCode::SUCCESS)
    })
}

/// Carries one local connection both ways. Bytes from the device are granted back as they
/// are written to the local socket, so a slow local reader holds at most one window.
async fn pump(
    id: u32,
    sock: tokio::net::TcpStream,
    mut from_ws: mpsc::UnboundedReceiver<Inbound>,
    credit: Arc<tokio::sync::Semaphore>,
    out: mpsc::Sender<Vec<u8>>,
    conns: Conns,
) {
    let (mut r, mut w) = sock.into_split();
    let up = {
        let out = out.clone();
        async move {
            let mut buf = vec![0u8; MAX_DATA];
            loop {
                let n = match r.read(&mut buf).await {
                    Ok(0) => {
                        let _ = out.send(MuxFrame::encode(id, MuxKind::Eof, &[])).await;
                        return;
                    }
                    Ok(n) => n,
                    Err(e) => {
                        let _ = out.send(MuxFrame::encode(id, MuxKind::Reset, e.to_string().as_bytes())).await;
                        return;
                    }
                };
                match credit.acquire_many(n as u32).await {
                    Ok(p) => p.forget(),
                    Err(_) => return,
                }
                if out.send(MuxFrame::encode(id, MuxKind::Data, &buf[..n])).await.is_err() {
                    return;
                }
            }
        }
    };
    // Ends with true when the device reset the connection.
    let down = async {
        while let Some(m) = from_ws.recv().await {
            match m {
                Inbound::Data(b) => {
                    if w.write_all(&b).await.is_err() {
                        let _ = out.send(MuxFrame::encode(id, MuxKind::Reset, b"local connection closed")).await;
                        return true;
                    }
                    let _ = out.send(MuxFrame::credit(id, b.len() as u32)).await;
                }
                Inbound::Eof => {
                    let _ = w.shutdown().await;
                    return false;
                }
                Inbound::Reset(why) => {
                    eprintln!("drover: forwarded connection {id} closed by the device: {why}");
                    return true;
                }
            }
        }
        true
    };
    // The connection ends when both directions have, or at once when either side resets it.
    tokio::pin!(up);
    tokio::pin!(down);
    tokio::select! {
        () = &mut up => {
            down.await;
        }
        reset = &mut down => {
            if !reset {
                up.await;
            }
        }
    }
    conns.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_terminal_without_a_size_gets_80_by_24() {
        assert_eq!(parse_stty_size("50 132\n"), Some((132, 50)));
        assert_eq!(parse_stty_size("0 0\n"), None);
        assert_eq!(parse_stty_size("0 80\n"), None);
        assert_eq!(parse_stty_size(""), None);
        assert_eq!(parse_stty_size("2000 5000"), Some((1000, 1000)), "kept within what the server takes");
        assert_eq!(DEFAULT_SIZE, (80, 24));
    }

    #[test]
    fn copies_into_directories_keep_the_file_name() {
        assert_eq!(upload_target(Path::new("./a/notes.txt"), "/tmp/").unwrap(), "/tmp/notes.txt");
        assert_eq!(upload_target(Path::new("notes.txt"), "/tmp/x.txt").unwrap(), "/tmp/x.txt");
        assert!(upload_target(Path::new(".."), "/tmp/").unwrap_err().to_string().contains("name the file"));

        let here = std::env::temp_dir();
        assert_eq!(download_target("/etc/hosts", &here).unwrap(), here.join("hosts"));
        assert_eq!(download_target("/etc/hosts", Path::new("copy")).unwrap(), PathBuf::from("copy"));
        let err = download_target("/etc/hosts", Path::new("/no/such/dir/")).unwrap_err().to_string();
        assert!(err.contains("no such directory"), "{err}");
        let err = download_target("/etc/", &here).unwrap_err().to_string();
        assert!(err.contains("not a directory"), "{err}");
    }

    #[test]
    fn device_paths_and_forward_specs() {
        assert_eq!(remote_spec("dev-1:/tmp/x"), Some(("dev-1", "/tmp/x")));
        // Tried: a local path with a colon, a relative device path, no device.
        assert_eq!(remote_spec("./a:b"), None);
        assert_eq!(remote_spec("dev:tmp/x"), None);
        assert_eq!(remote_spec(":/x"), None);
        assert_eq!(forward_spec("8080:127.0.0.1:80").unwrap(), (8080, "127.0.0.1".into(), 80));
        assert_eq!(forward_spec("1:[::1]:22").unwrap(), (1, "::1".into(), 22));
        for bad in ["8080", "8080:host", "x:h:1", "1::2", "1:h:99999"] {
            assert!(forward_spec(bad).unwrap_err().to_string().contains("LOCAL_PORT:HOST:PORT"), "{bad}");
        }
    }
}
