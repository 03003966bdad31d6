//! A device's local web UI (a router's or a gateway's admin page) in the operator's browser,
//! through droverd (`docs/remote-access.md`, "A device's web UI in the browser").
//!
//! Opening one is a forward session like `drover forward`'s: audited, refused by the device
//! unless its `[remote] forward_allow` names the target, ended by the same idle and duration
//! limits. droverd is its operator: the relay ([`super::relay`]) talks to an in-process client
//! ([`Mux`]) instead of a WebSocket, and every browser request to the session's capability
//! path `/web/{token}/…` is an HTTP/1.1 request (hyper's client) on a new stream of the
//! session, bodies streamed both ways under the streams' credit. Any replica serves any
//! session: the session is a row ([`super::links`]), and each replica that gets a request for
//! it opens a forward session of its own on the device (a leg) and reuses it after.
//!
//! The device's pages are not Drover's: a compromised device must not script Drover with the
//! operator's cookies. So the capability path alone authenticates (a 256-bit token bound to
//! the session's operator, device and target, gone when the session ends), every response is
//! served with `Content-Security-Policy: sandbox …` without `allow-same-origin` (an opaque
//! origin: the page can run its scripts but cannot read Drover's cookies, storage or pages),
//! the operator's Drover cookies and bearer token never reach the device, and headers that
//! would act on Drover's origin (`Strict-Transport-Security`, `Clear-Site-Data`, CORS) are
//! dropped. Root-relative links in HTML and CSS, `Location` and the device's cookies are
//! rewritten to stay under the capability path.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::ws::Message;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Version, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::any;
use bytes::Bytes;
use drover_proto::api::{ErrorBody, Role};
use drover_proto::operator::{self, INITIAL_CREDIT, MAX_DATA, MuxFrame, MuxKind};
use drover_proto::remote::{self, Direction, RemoteCommand};
use futures_util::StreamExt as _;
use hyper_util::rt::TokioIo;
use minijinja::context;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{mpsc, oneshot, watch};
use utoipa::ToSchema;

use super::links::{self, Link};
use super::relay;
use super::sessions::{self, SessionKind};
use crate::app::{ApiJson, ApiPath, AppState};
use crate::auth::Principal;
use crate::error::{AppError, AppResult};

/// The sandbox every proxied response runs in: scripts, forms, pop-ups (sandboxed too) and
/// downloads, but no `allow-same-origin`, so the page's origin is opaque.
pub const SANDBOX: &str = "sandbox allow-scripts allow-forms allow-popups allow-downloads";

/// The device's cookies live in the browser under this prefix and the capability path; only
/// cookies with it are sent to the device (without it), so no other cookie of droverd's
/// origin ever reaches the device.
pub const COOKIE_PREFIX: &str = "dw_";

/// How long the device's web server has to start its answer.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(60);

/// Bytes read by the proxy before they are granted back to the device in one credit frame.
const GRANT_AT: u32 = 64 * 1024;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

// ------------------------------------------------------------------ sessions

/// How often a replica's leg checks that its session is still open (closed through another
/// replica, or ended by the sweep), and at most how stale a session's last use may be in the
/// database.
const WATCH_EVERY: Duration = Duration::from_secs(2);

/// This replica's legs: for each web UI session it has served, its own forward session on
/// the device. A slot is locked while its leg opens, so concurrent requests open one leg.
#[derive(Default)]
pub struct Registry {
    slots: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Option<Arc<Leg>>>>>>,
}

/// This replica's forward session on the device for one web UI session.
struct Leg {
    session_id: String,
    mux: Arc<Mux>,
    /// True once the leg has ended and its bytes are on the session's row.
    done: watch::Receiver<bool>,
    /// This replica's last request through the leg.
    used: AtomicI64,
    /// When this replica last recorded a request in the database.
    touched: AtomicI64,
}

impl Leg {
    fn alive(&self) -> bool {
        self.mux.ended().is_none() && !*self.done.borrow()
    }

    /// Ends the leg and waits (a few seconds at most) until its bytes are recorded.
    async fn close(&self) {
        let _ = self.mux.out.send(Message::Close(None));
        let mut done = self.done.clone();
        let _ = tokio::time::timeout(Duration::from_secs(10), done.wait_for(|d| *d)).await;
    }
}

/// Why a leg did not open.
enum LegError {
    /// The device's refusal: its code and message.
    Refused(String, String),
    /// No answer, or no broker.
    Unavailable(String),
}

impl LegError {
    fn reason(&self) -> String {
        match self {
            LegError::Refused(code, message) => format!("device: {code}: {message}"),
            LegError::Unavailable(why) => why.clone(),
        }
    }
}

impl Registry {
    fn slot(&self, session_id: &str) -> Arc<tokio::sync::Mutex<Option<Arc<Leg>>>> {
        lock(&self.slots).entry(session_id.to_string()).or_default().clone()
    }

    /// This replica's open leg of the session, if it has one.
    fn current(&self, session_id: &str) -> Option<Arc<Leg>> {
        let slot = lock(&self.slots).get(session_id)?.clone();
        let leg = slot.try_lock().ok()?.clone()?;
        leg.alive().then_some(leg)
    }

    /// Forgets the session's slot if it still holds `leg` (or nothing).
    fn forget(&self, session_id: &str, leg: &Arc<Leg>) {
        let mut slots = lock(&self.slots);
        let mine = slots
            .get(session_id)
            .is_some_and(|slot| slot.try_lock().is_ok_and(|held| held.as_ref().is_none_or(|l| Arc::ptr_eq(l, leg))));
        if mine {
            slots.remove(session_id);
        }
    }

    /// The session's leg on this replica, opened when it has none (or it ended).
    async fn leg(&self, s: &AppState, link: &Link) -> Result<Arc<Leg>, LegError> {
        let slot = self.slot(&link.session_id);
        let mut held = slot.lock().await;
        if let Some(leg) = held.as_ref().filter(|l| l.alive()) {
            return Ok(leg.clone());
        }
        let leg = open_leg(s, link).await?;
        *held = Some(leg.clone());
        Ok(leg)
    }
}

/// What `POST /api/v1/devices/{id}/web` asks for.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WebOpenRequest {
    /// The host on the device's side (default `127.0.0.1`); the device's `forward_allow`
    /// must name it.
    #[serde(default)]
    pub host: Option<String>,
    pub port: u16,
}

/// An open web UI session.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct WebOpened {
    /// The remote session's id (`GET /api/v1/remote-sessions/{id}`).
    pub session: String,
    /// The capability path to open in a browser (`/web/{token}/`), on any replica: it is the
    /// only credential the proxied pages need, so treat it as a secret; it stops working when
    /// the session ends.
    pub url: String,
}

fn url_of(token: &str) -> String {
    format!("/web/{token}/")
}

/// Opens a web UI session to `host:port` on the device and, once the device has accepted
/// this replica's leg of it, a capability path for the browser. The device's refusal is the
/// error's message.
pub async fn open(s: &AppState, p: &Principal, device_id: &str, host: &str, port: u16) -> AppResult<WebOpened> {
    p.require(Role::Operator, "opening a remote session")?;
    let host = if host.trim().is_empty() { "127.0.0.1" } else { host.trim() };
    let target = if host.contains(':') { format!("[{host}]:{port}") } else { format!("{host}:{port}") };
    remote::Target::parse(&target).map_err(AppError::BadRequest)?;
    let opened = sessions::open(&s.db, p, device_id, SessionKind::Forward, &format!("web UI to {target}")).await?;
    let (idle, max) = super::limits(s);
    let token = crate::auth::random_secret(32);
    let ms = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
    let created = links::create(&s.db, &opened, &target, ms(idle), ms(max), &crate::auth::sha256_hex(&token)).await;
    if let Err(e) = created {
        let end = sessions::Ending { reason: format!("unavailable: {e}"), ..Default::default() };
        sessions::close(&s.db, p, &opened, end).await?;
        return Err(e);
    }
    let link = links::get_open(&s.db, &opened.org_id, &opened.id)
        .await?
        .ok_or_else(|| AppError::Internal(format!("web UI session {} vanished as it opened", opened.id)))?;
    // This replica's leg now, so that the device's refusal is the caller's answer.
    if let Err(e) = s.remote.web.leg(s, &link).await {
        let why = e.reason();
        links::end(&s.db, p, &link, &why).await?;
        return Err(AppError::Conflict(match e {
            LegError::Refused(code, message) => format!("the device refused the web UI session ({code}): {message}"),
            LegError::Unavailable(why) => format!("the session ended before the device answered: {why}"),
        }));
    }
    tracing::info!(session = %opened.id, device = device_id, "remote access: web UI session opened");
    Ok(WebOpened { session: opened.id, url: url_of(&token) })
}

/// A new capability path to an open session, for the operator who opened it (its first
/// address is known only to the browser it was sent to).
pub async fn new_address(s: &AppState, p: &Principal, session_id: &str) -> AppResult<WebOpened> {
    p.require(Role::Operator, "opening a remote session")?;
    let link = links::get_open(&s.db, p.org(), session_id)
        .await?
        .ok_or_else(|| AppError::NotFound(format!("no open web UI session {session_id:?}")))?;
    if link.actor_id != p.id {
        return Err(AppError::Forbidden(format!(
            "web UI session {session_id} was opened by {}: only they may have its address",
            link.actor_name
        )));
    }
    let token = crate::auth::random_secret(32);
    links::add_token(&s.db, p, &link, &crate::auth::sha256_hex(&token)).await?;
    Ok(WebOpened { session: link.session_id, url: url_of(&token) })
}

/// Opens this replica's leg: a forward session of its own on the device, under an id of its
/// own (`{session}_{random}`), to the session's target, until the session's end at most.
async fn open_leg(s: &AppState, link: &Link) -> Result<Arc<Leg>, LegError> {
    let leg_id = format!("{}_{}", link.session_id, crate::auth::random_secret(6));
    let up = remote::session_topic(&link.device_id, &leg_id, Direction::Up);
    let inbox = s.remote.subscribe(up).await.map_err(|e| LegError::Unavailable(format!("unavailable: {e}")))?;
    let now = crate::time::now_ms();
    let idle = Duration::from_millis(u64::try_from(link.idle_ms).unwrap_or(1).max(1));
    let max = Duration::from_millis(u64::try_from(link.ends_at - now).unwrap_or(0).max(1));
    let mut command = RemoteCommand::open_forward(&leg_id, Some(&link.target));
    command.idle_timeout_s = Some(u32::try_from(idle.as_secs()).unwrap_or(u32::MAX).max(1));
    command.max_duration_s = Some(u32::try_from(max.as_secs()).unwrap_or(u32::MAX).max(1));
    let relay = relay::Relay {
        hub: s.remote.clone(),
        session: sessions::Opened {
            id: leg_id,
            org_id: link.org_id.clone(),
            device_id: link.device_id.clone(),
            recording: false,
        },
        mode: relay::Mode::Forward { target: link.target.clone() },
        idle_timeout: idle,
        max_duration: max,
    };
    let (to_relay, relay_rx) = mpsc::unbounded_channel();
    let (relay_tx, from_relay) = mpsc::unbounded_channel();
    let mux =
        Arc::new(Mux { out: to_relay, conns: Mutex::default(), next: AtomicU32::new(1), ended: Mutex::default() });
    let (answer_tx, answer) = oneshot::channel();
    tokio::spawn(dispatch(mux.clone(), from_relay, answer_tx));
    let (done_tx, done) = watch::channel(false);
    let leg = Arc::new(Leg {
        session_id: link.session_id.clone(),
        mux: mux.clone(),
        done,
        used: AtomicI64::new(now),
        touched: AtomicI64::new(now),
    });
    {
        let (s, link, leg) = (s.clone(), link.clone(), leg.clone());
        tokio::spawn(async move {
            let watch = tokio::spawn(watch_session(s.db.clone(), leg.clone(), link.idle_ms));
            let ending = relay.run(relay::Operator::Local { rx: relay_rx, tx: relay_tx }, inbox, command).await;
            watch.abort();
            s.remote.web.forget(&link.session_id, &leg);
            leg_ended(&s, &link, &leg, ending).await;
            let _ = done_tx.send(true);
        });
    }
    // A caller that goes away before the device answers (the browser's request dropped)
    // ends the leg rather than leaving it open with nothing to use it.
    let mut guard = CloseOnDrop(Some(mux.out.clone()));
    match tokio::time::timeout(Duration::from_secs(40), answer).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err((code, message)))) => return Err(LegError::Refused(code, message)),
        _ => {
            let why = mux.ended().unwrap_or_else(|| "no answer within 40 s".into());
            return Err(LegError::Unavailable(format!("unavailable: {why}")));
        }
    }
    guard.0 = None;
    tracing::debug!(session = %link.session_id, device = %link.device_id, "remote access: web UI leg opened");
    Ok(leg)
}

/// Until the leg ends: records the session as used while requests are in flight through the
/// leg (a long download, a WebSocket), and ends the leg once its session has ended elsewhere
/// (closed through another replica, idle, too long).
async fn watch_session(db: crate::db::Db, leg: Arc<Leg>, idle_ms: i64) {
    loop {
        tokio::time::sleep(WATCH_EVERY).await;
        if !lock(&leg.mux.conns).is_empty() {
            let now = crate::time::now_ms();
            leg.used.fetch_max(now, Ordering::Relaxed);
            record_use(&db, &leg, &leg.session_id, idle_ms, now).await;
        }
        if matches!(links::is_open(&db, &leg.session_id).await, Ok(false)) {
            let _ = leg.mux.out.send(Message::Close(None));
            return;
        }
    }
}

/// Writes the session's last use, at most every couple of seconds per replica (and at least
/// a few times per idle timeout), so that every replica's idle check sees it.
async fn record_use(db: &crate::db::Db, leg: &Leg, session_id: &str, idle_ms: i64, now: i64) {
    let every = (idle_ms / 4).clamp(1, i64::try_from(WATCH_EVERY.as_millis()).unwrap_or(2000));
    if now - leg.touched.load(Ordering::Relaxed) < every {
        return;
    }
    leg.touched.store(now, Ordering::Relaxed);
    if let Err(e) = links::touch(db, session_id, now).await {
        tracing::warn!(session = %session_id, "web UI proxy: cannot record the session's use: {e}");
    }
}

/// Records a leg's end: its bytes on the session's row, and the session's end when the
/// leg's end is the session's — the device refused or ended it, the session's maximum
/// duration, or no request through any replica for the idle timeout.
async fn leg_ended(s: &AppState, link: &Link, leg: &Leg, ending: sessions::Ending) {
    if let Err(e) = links::add_bytes(&s.db, &link.session_id, ending.bytes_in, ending.bytes_out).await {
        tracing::error!(session = %link.session_id, "cannot record a web UI session's bytes: {e}");
    }
    let used = leg.used.load(Ordering::Relaxed);
    if used > leg.touched.load(Ordering::Relaxed)
        && let Err(e) = links::touch(&s.db, &link.session_id, used).await
    {
        tracing::warn!(session = %link.session_id, "cannot record a web UI session's last use: {e}");
    }
    let reason = ending.reason;
    // The leg's own limits run on both sides: droverd's relay and the device may each end it.
    let why = reason.strip_prefix("device: ").unwrap_or(&reason);
    let reason = if why.starts_with("idle-timeout") {
        // Idle here; the session only if no replica has had a request for as long.
        match links::get_open(&s.db, &link.org_id, &link.session_id).await {
            Ok(Some(now)) => match now.expired(crate::time::now_ms()) {
                Some(why) => why,
                None => return,
            },
            _ => return,
        }
    } else if why.starts_with("max-duration") {
        link.max_duration_reason()
    } else if reason.starts_with("device: ") && !why.starts_with("busy") {
        // A device at its session limit refuses this replica's leg, not the session.
        reason
    } else {
        return;
    };
    let system = Principal::system(Some(&link.org_id));
    if let Err(e) = links::end(&s.db, &system, link, &reason).await {
        tracing::error!(session = %link.session_id, "cannot record the end of a web UI session: {e}");
    }
}

/// Closes a leg whose opening did not finish.
struct CloseOnDrop(Option<mpsc::UnboundedSender<Message>>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        if let Some(out) = self.0.take() {
            let _ = out.send(Message::Close(None));
        }
    }
}

/// Ends a web UI session (operators and admins of its organization), through whichever
/// replica: this replica's leg first, so that its bytes are on the row the end records; the
/// other replicas' legs close within seconds and add theirs.
pub async fn close(s: &AppState, p: &Principal, session_id: &str) -> AppResult<()> {
    p.require(Role::Operator, "closing a remote session")?;
    let link = links::get_open(&s.db, p.org(), session_id)
        .await?
        .ok_or_else(|| AppError::NotFound(format!("no open web UI session {session_id:?}")))?;
    if let Some(leg) = s.remote.web.current(session_id) {
        leg.close().await;
    }
    links::end(&s.db, p, &link, "closed by the operator").await?;
    Ok(())
}

/// Opens a device's local web UI for the browser: a forward session to `host:port` on the
/// device (its `[remote] forward_allow` must allow it), answered with the capability path
/// that proxies it (`/web/{token}/`) through any replica.
#[utoipa::path(post, path = "/api/v1/devices/{id}/web", tag = "remote", params(("id" = String, Path)),
    request_body = WebOpenRequest,
    responses((status = 201, body = WebOpened), (status = 400, body = ErrorBody),
              (status = 403, body = ErrorBody, description = "Viewers"), (status = 404, body = ErrorBody),
              (status = 409, body = ErrorBody, description = "Device not accepted, offline, or it refused the target (its reason)")))]
pub async fn open_api(
    State(s): State<AppState>,
    p: Principal,
    ApiPath(id): ApiPath<String>,
    ApiJson(req): ApiJson<WebOpenRequest>,
) -> AppResult<Response> {
    let opened = open(&s, &p, &id, req.host.as_deref().unwrap_or_default(), req.port).await?;
    Ok((StatusCode::CREATED, axum::Json(opened)).into_response())
}

/// Closes a web UI session (operators and admins) through any replica; the session's row
/// records the end and the bytes each way.
#[utoipa::path(post, path = "/api/v1/remote-sessions/{id}/close", tag = "remote", params(("id" = String, Path)),
    responses((status = 204, description = "Closed"), (status = 403, body = ErrorBody),
              (status = 404, body = ErrorBody, description = "No open web UI session with this id")))]
pub async fn close_api(State(s): State<AppState>, p: Principal, ApiPath(id): ApiPath<String>) -> AppResult<StatusCode> {
    close(&s, &p, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

// ------------------------------------------------------------------ the in-process client

/// droverd's own operator side of a forward session: the same frames `drover forward` sends
/// over its WebSocket, one connection per proxied HTTP request.
struct Mux {
    out: mpsc::UnboundedSender<Message>,
    conns: Mutex<HashMap<u32, Arc<Mutex<Conn>>>>,
    next: AtomicU32,
    /// Why the session ended, once it has.
    ended: Mutex<Option<String>>,
}

#[derive(Default)]
struct Conn {
    inbound: VecDeque<Bytes>,
    eof: bool,
    reset: Option<String>,
    /// Bytes the device has room for.
    credit: u32,
    /// Bytes read and not yet granted back.
    ungranted: u32,
    shut: bool,
    read_waker: Option<Waker>,
    write_waker: Option<Waker>,
}

impl Conn {
    fn wake(&mut self) {
        if let Some(w) = self.read_waker.take() {
            w.wake();
        }
        if let Some(w) = self.write_waker.take() {
            w.wake();
        }
    }
}

impl Mux {
    fn send(&self, frame: Vec<u8>) {
        let _ = self.out.send(Message::Binary(frame.into()));
    }

    fn ended(&self) -> Option<String> {
        lock(&self.ended).clone()
    }

    fn end(&self, why: &str) {
        lock(&self.ended).get_or_insert_with(|| why.to_string());
        let conns: Vec<_> = lock(&self.conns).drain().map(|(_, c)| c).collect();
        for c in conns {
            let mut c = lock(&c);
            c.reset.get_or_insert_with(|| why.to_string());
            c.wake();
        }
    }

    /// A new connection from the device to the session's target.
    fn connect(self: &Arc<Self>) -> Result<MuxStream, String> {
        if let Some(why) = self.ended() {
            return Err(why);
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let conn = Arc::new(Mutex::new(Conn { credit: INITIAL_CREDIT, ..Conn::default() }));
        lock(&self.conns).insert(id, conn.clone());
        self.send(MuxFrame::encode(id, MuxKind::Open, &[]));
        Ok(MuxStream { id, conn, mux: self.clone() })
    }
}

/// Takes the relay's messages: the session's answer, then each connection's frames.
async fn dispatch(
    mux: Arc<Mux>,
    mut rx: mpsc::UnboundedReceiver<Message>,
    answer: oneshot::Sender<Result<(), (String, String)>>,
) {
    let mut answer = Some(answer);
    let mut why = "the session ended".to_string();
    while let Some(m) = rx.recv().await {
        match m {
            Message::Binary(b) => {
                let Some(f) = MuxFrame::decode(&b) else { continue };
                let Some(conn) = lock(&mux.conns).get(&f.stream).cloned() else { continue };
                let mut c = lock(&conn);
                match f.kind {
                    MuxKind::Data => c.inbound.push_back(b.slice(5..)),
                    MuxKind::Eof => c.eof = true,
                    MuxKind::Reset => c.reset = Some(String::from_utf8_lossy(f.payload).into_owned()),
                    MuxKind::Credit => c.credit = c.credit.saturating_add(f.credit_bytes()),
                    MuxKind::Open => {}
                }
                c.wake();
                let gone = c.reset.is_some();
                drop(c);
                if gone {
                    lock(&mux.conns).remove(&f.stream);
                }
            }
            Message::Text(t) => match serde_json::from_str::<operator::Control>(&t) {
                Ok(operator::Control::Opened { .. }) => {
                    if let Some(a) = answer.take() {
                        let _ = a.send(Ok(()));
                    }
                }
                Ok(operator::Control::Error { code, message }) => {
                    why = format!("{code}: {message}");
                    if let Some(a) = answer.take() {
                        let _ = a.send(Err((code, message)));
                    }
                }
                _ => {}
            },
            Message::Close(_) => break,
            _ => {}
        }
    }
    mux.end(&why);
}

/// One connection from the device to the target, as a byte stream for hyper. Reads grant
/// the device more room as they take bytes; writes wait for the device's grants.
struct MuxStream {
    id: u32,
    conn: Arc<Mutex<Conn>>,
    mux: Arc<Mux>,
}

impl AsyncRead for MuxStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        let mut c = lock(&self.conn);
        if let Some(front) = c.inbound.front_mut() {
            let n = front.len().min(buf.remaining());
            buf.put_slice(&front[..n]);
            if n == front.len() {
                c.inbound.pop_front();
            } else {
                let _ = front.split_to(n);
            }
            c.ungranted += n as u32;
            if (c.ungranted >= GRANT_AT || c.inbound.is_empty()) && c.reset.is_none() && !c.eof {
                let g = std::mem::take(&mut c.ungranted);
                drop(c);
                self.mux.send(MuxFrame::credit(self.id, g));
            }
            return Poll::Ready(Ok(()));
        }
        if c.eof {
            return Poll::Ready(Ok(()));
        }
        if let Some(why) = &c.reset {
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::ConnectionReset, why.clone())));
        }
        c.read_waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

impl AsyncWrite for MuxStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let mut c = lock(&self.conn);
        if let Some(why) = &c.reset {
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::BrokenPipe, why.clone())));
        }
        if c.shut {
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::BrokenPipe, "write after shutdown")));
        }
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if c.credit == 0 {
            c.write_waker = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let n = data.len().min(c.credit as usize).min(MAX_DATA);
        c.credit -= n as u32;
        drop(c);
        self.mux.send(MuxFrame::encode(self.id, MuxKind::Data, &data[..n]));
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut c = lock(&self.conn);
        if !c.shut && c.reset.is_none() {
            c.shut = true;
            drop(c);
            self.mux.send(MuxFrame::encode(self.id, MuxKind::Eof, &[]));
        }
        Poll::Ready(Ok(()))
    }
}

impl Drop for MuxStream {
    /// The connection is over (the response was read, or the browser left): the relay and the
    /// device free the stream.
    fn drop(&mut self) {
        let live = lock(&self.conn).reset.is_none();
        lock(&self.mux.conns).remove(&self.id);
        if live {
            self.mux.send(MuxFrame::encode(self.id, MuxKind::Reset, b"closed"));
        }
    }
}

// ------------------------------------------------------------------ the proxy

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/web/{token}", any(to_root))
        .route("/web/{token}/", any(proxy))
        .route("/web/{token}/{*rest}", any(proxy))
}

async fn to_root(req: Request) -> Response {
    let q = req.uri().query().map(|q| format!("?{q}")).unwrap_or_default();
    Redirect::temporary(&format!("{}/{q}", req.uri().path())).into_response()
}

async fn proxy(State(s): State<AppState>, req: Request) -> Response {
    let path = req.uri().path().to_string();
    let rest = path.strip_prefix("/web/").unwrap_or_default();
    let (token, tail) = match rest.split_once('/') {
        Some((t, r)) => (t.to_string(), format!("/{r}")),
        None => (rest.to_string(), "/".to_string()),
    };
    let gone = || {
        proxy_page(
            StatusCode::NOT_FOUND,
            "No such web UI session",
            "This link is not valid, or its session has ended. Open the device's web UI again from its Remote access page.",
            None,
        )
    };
    let unavailable = |e: AppError| {
        tracing::error!("web UI proxy: cannot read the session: {e}");
        proxy_page(StatusCode::SERVICE_UNAVAILABLE, "Drover is unavailable", "Try again in a moment.", None)
    };
    let link = match links::find(&s.db, &crate::auth::sha256_hex(&token)).await {
        Ok(Some(l)) => l,
        Ok(None) => return gone(),
        Err(e) => return unavailable(e),
    };
    let now = crate::time::now_ms();
    if let Some(why) = link.expired(now) {
        if let Err(e) = links::end(&s.db, &Principal::system(Some(&link.org_id)), &link, &why).await {
            return unavailable(e);
        }
        return gone();
    }
    let leg = match s.remote.web.leg(&s, &link).await {
        Ok(leg) => leg,
        Err(e) => {
            // The device refused (the session is over) or was at its session limit (try again).
            let status = match &e {
                LegError::Refused(code, _) if code != "busy" => StatusCode::BAD_GATEWAY,
                _ => StatusCode::SERVICE_UNAVAILABLE,
            };
            return proxy_page(
                status,
                "The device did not open the web UI",
                &format!("{} on device {}: {}", link.target, link.device_id, e.reason()),
                Some(&link),
            );
        }
    };
    leg.used.fetch_max(now, Ordering::Relaxed);
    leg.touched.fetch_max(link.used_at, Ordering::Relaxed);
    record_use(&s.db, &leg, &link.session_id, link.idle_ms, now).await;
    let up_path = match req.uri().query() {
        Some(q) => format!("{tail}?{q}"),
        None => tail,
    };
    let route = Route { prefix: format!("/web/{token}"), link: &link, mux: &leg.mux };
    forward(&route, req, up_path).await
}

/// Where one request goes: the capability path it came by, its session, this replica's leg.
struct Route<'a> {
    prefix: String,
    link: &'a Link,
    mux: &'a Arc<Mux>,
}

/// A page of droverd's own at the proxy's address (no such session, the device's service
/// down): sandboxed without scripts, like everything under `/web/`.
/// The proxy's own page: a template of its own (it is not one of the signed-in pages).
fn error_template() -> Option<minijinja::Template<'static, 'static>> {
    static ENV: std::sync::OnceLock<minijinja::Environment<'static>> = std::sync::OnceLock::new();
    ENV.get_or_init(|| {
        let mut env = minijinja::Environment::new();
        if let Err(e) = env.add_template("web_proxy_error.html", include_str!("../../templates/web_proxy_error.html")) {
            tracing::error!("the web UI proxy's page does not compile: {e}");
        }
        env
    })
    .get_template("web_proxy_error.html")
    .ok()
}

fn proxy_page(status: StatusCode, title: &str, message: &str, w: Option<&Link>) -> Response {
    let ctx = context! {
        status => status.as_u16(), title => title, message => message,
        device => w.map(|w| w.device_id.clone()), target => w.map(|w| w.target.clone()),
    };
    let body = error_template().and_then(|t| t.render(ctx).ok()).unwrap_or_else(|| message.to_string());
    let mut resp = (status, body).into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static("sandbox"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

fn wants_upgrade(h: &HeaderMap) -> bool {
    h.get(header::UPGRADE).is_some()
        && h.get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("upgrade")))
}

async fn forward(r: &Route<'_>, mut req: Request, path: String) -> Response {
    let w = r.link;
    let upgrade = wants_upgrade(req.headers());
    let browser_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (parts, body) = req.into_parts();
    let mut up = hyper::Request::new(body);
    *up.method_mut() = parts.method.clone();
    *up.version_mut() = Version::HTTP_11;
    *up.uri_mut() = match path.parse() {
        Ok(u) => u,
        Err(_) => {
            return proxy_page(StatusCode::BAD_REQUEST, "Bad request", "This path cannot be proxied.", Some(w));
        }
    };
    *up.headers_mut() = request_headers(&parts.headers, &w.target, upgrade);
    let bad_gateway = |why: String| {
        proxy_page(
            StatusCode::BAD_GATEWAY,
            "The device's web server did not answer",
            &format!("{} on device {}: {why}", w.target, w.device_id),
            Some(w),
        )
    };
    let stream = match r.mux.connect() {
        Ok(st) => st,
        Err(why) => return bad_gateway(format!("the session has ended ({why})")),
    };
    let conn_state = stream.conn.clone();
    let (mut sender, conn) = match hyper::client::conn::http1::handshake(TokioIo::new(stream)).await {
        Ok(x) => x,
        Err(e) => return bad_gateway(e.to_string()),
    };
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    let mut resp = match tokio::time::timeout(RESPONSE_TIMEOUT, sender.send_request(up)).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            // The device's reason (connection refused, …) rather than hyper's summary.
            let why = lock(&conn_state).reset.clone().unwrap_or_else(|| e.to_string());
            return bad_gateway(why);
        }
        Err(_) => {
            return proxy_page(
                StatusCode::GATEWAY_TIMEOUT,
                "The device's web server did not answer",
                &format!(
                    "{} on device {} did not answer within {} s",
                    w.target,
                    w.device_id,
                    RESPONSE_TIMEOUT.as_secs()
                ),
                Some(w),
            );
        }
    };
    drop(sender);
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        let Some(browser) = browser_upgrade else {
            return bad_gateway("the device switched protocols without being asked".into());
        };
        let device = hyper::upgrade::on(&mut resp);
        tokio::spawn(async move {
            if let (Ok(b), Ok(d)) = (browser.await, device.await) {
                let _ = tokio::io::copy_bidirectional(&mut TokioIo::new(b), &mut TokioIo::new(d)).await;
            }
        });
        let mut out = Response::new(Body::empty());
        *out.status_mut() = resp.status();
        *out.headers_mut() = response_headers(resp.headers(), r, false, true);
        return out;
    }
    let (mut rparts, rbody) = resp.into_parts();
    let rewrite = rewritable(&rparts.headers);
    rparts.headers = response_headers(&rparts.headers, r, rewrite, false);
    let body = if rewrite {
        let mut rw = LinkRewriter::new(&r.prefix);
        let data = Body::new(rbody).into_data_stream();
        let tail = futures_util::stream::once(async { Ok::<Bytes, axum::Error>(Bytes::new()) });
        let mut ended = false;
        Body::from_stream(data.map(Some).chain(tail.map(|_| None)).map(move |chunk| match chunk {
            Some(Ok(b)) => Ok(Bytes::from(rw.push(&b))),
            Some(Err(e)) => {
                ended = true;
                Err(e)
            }
            None if ended => Ok(Bytes::new()),
            None => Ok(Bytes::from(rw.finish())),
        }))
    } else {
        Body::new(rbody)
    };
    let mut out = Response::new(body);
    *out.status_mut() = rparts.status;
    *out.headers_mut() = rparts.headers;
    out
}

const HOP_BY_HOP: &[&str] =
    &["connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade"];

/// Headers never sent to the device: droverd's credentials (cookies are filtered, bearer
/// tokens dropped), what would tell the device about the operator's network, and
/// `Accept-Encoding` (so that HTML arrives uncompressed and its links can be rewritten).
const REQUEST_DROPPED: &[&str] = &[
    "host",
    "cookie",
    "origin",
    "referer",
    "accept-encoding",
    "proxy-authorization",
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-real-ip",
];

/// Headers of the device's answers that would act on droverd's origin rather than on the
/// sandboxed page.
const RESPONSE_DROPPED: &[&str] = &[
    "strict-transport-security",
    "clear-site-data",
    "alt-svc",
    "public-key-pins",
    "service-worker-allowed",
    "access-control-allow-origin",
    "access-control-allow-credentials",
    "access-control-allow-headers",
    "access-control-allow-methods",
    "access-control-expose-headers",
    "access-control-max-age",
    "set-cookie",
    "content-security-policy-report-only",
    "referrer-policy",
];

/// Header names the `Connection` header lists: hop-by-hop too.
fn connection_listed(h: &HeaderMap) -> Vec<String> {
    h.get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .collect()
}

/// The browser's request headers as the device gets them.
pub fn request_headers(src: &HeaderMap, target: &str, upgrade: bool) -> HeaderMap {
    let listed = connection_listed(src);
    let mut out = HeaderMap::new();
    for (k, v) in src {
        let n = k.as_str();
        if HOP_BY_HOP.contains(&n) || REQUEST_DROPPED.contains(&n) || listed.iter().any(|l| l == n) {
            continue;
        }
        // Never the browser's credentials for this origin: a bearer token is droverd's, and
        // Basic credentials may be those of a proxy in front of droverd (a browser sends them
        // with every request to the origin), not the device's.
        if n == "authorization" {
            continue;
        }
        out.append(k.clone(), v.clone());
    }
    if let Ok(v) = HeaderValue::from_str(target) {
        out.insert(header::HOST, v);
    }
    // A sandboxed page's requests say `Origin: null`; the device sees its own origin.
    if src.contains_key(header::ORIGIN)
        && let Ok(v) = HeaderValue::from_str(&format!("http://{target}"))
    {
        out.insert(header::ORIGIN, v);
    }
    if let Some(c) = device_cookies(src)
        && let Ok(v) = HeaderValue::from_str(&c)
    {
        out.insert(header::COOKIE, v);
    }
    if upgrade {
        out.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        if let Some(u) = src.get(header::UPGRADE) {
            out.insert(header::UPGRADE, u.clone());
        }
    }
    out
}

/// The cookies the device set through this proxy (`dw_` prefix), without the prefix; every
/// other cookie (droverd's session above all) stays in the browser.
pub fn device_cookies(h: &HeaderMap) -> Option<String> {
    let pairs: Vec<&str> = h
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .map(str::trim)
        .filter_map(|p| p.strip_prefix(COOKIE_PREFIX))
        .filter(|p| !p.is_empty())
        .collect();
    (!pairs.is_empty()).then(|| pairs.join("; "))
}

/// A device's `Set-Cookie`, renamed and confined to the session's capability path.
pub fn rewrite_set_cookie(v: &str, prefix: &str) -> Option<String> {
    let mut parts = v.split(';');
    let (name, value) = parts.next()?.trim().split_once('=')?;
    let name = name.trim();
    if name.is_empty() {
        return None;
    }
    let mut out = format!("{COOKIE_PREFIX}{name}={}; Path={prefix}/", value.trim());
    for a in parts.map(str::trim) {
        let key = a.split('=').next().unwrap_or_default().trim().to_ascii_lowercase();
        if key.is_empty() || key == "path" || key == "domain" {
            continue;
        }
        out.push_str("; ");
        out.push_str(a);
    }
    Some(out)
}

/// A `Location` (or `Content-Location`) of the device's, kept under the capability path:
/// root-relative paths and absolute URLs naming the target itself.
pub fn rewrite_location(loc: &str, prefix: &str, target: &str) -> String {
    if loc.starts_with('/') && !loc.starts_with("//") {
        return format!("{prefix}{loc}");
    }
    let (host, port) = target.rsplit_once(':').unwrap_or((target, "80"));
    for (scheme, default_port) in [("http://", "80"), ("https://", "443"), ("//", "80")] {
        let Some(rest) = loc.strip_prefix(scheme) else { continue };
        let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let (authority, path) = rest.split_at(end);
        let same =
            authority.eq_ignore_ascii_case(target) || (port == default_port && authority.eq_ignore_ascii_case(host));
        if same {
            let path = if path.starts_with('/') { path.to_string() } else { format!("/{path}") };
            return format!("{prefix}{path}");
        }
    }
    loc.to_string()
}

fn rewritable(h: &HeaderMap) -> bool {
    let ct = h.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or_default().to_ascii_lowercase();
    let encoded = h
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|e| !e.trim().eq_ignore_ascii_case("identity"));
    !encoded && (ct.starts_with("text/html") || ct.starts_with("application/xhtml+xml") || ct.starts_with("text/css"))
}

/// The device's response headers as the browser gets them: the sandbox added, headers that
/// would act on droverd's origin dropped, locations and cookies kept under the capability path.
fn response_headers(src: &HeaderMap, r: &Route<'_>, rewriting: bool, upgrade: bool) -> HeaderMap {
    let listed = connection_listed(src);
    let (prefix, w) = (&r.prefix, r.link);
    let mut out = HeaderMap::new();
    for (k, v) in src {
        let n = k.as_str();
        let hop = HOP_BY_HOP.contains(&n) || listed.iter().any(|l| l == n);
        if (hop && !(upgrade && (n == "connection" || n == "upgrade"))) || RESPONSE_DROPPED.contains(&n) {
            continue;
        }
        if rewriting && n == "content-length" {
            continue;
        }
        if n == "location" || n == "content-location" {
            if let Some(new) = v.to_str().ok().map(|l| rewrite_location(l, prefix, &w.target))
                && let Ok(v) = HeaderValue::from_str(&new)
            {
                out.append(k.clone(), v);
            }
            continue;
        }
        out.append(k.clone(), v.clone());
    }
    for c in src.get_all(header::SET_COOKIE).iter().filter_map(|v| v.to_str().ok()) {
        if let Some(v) = rewrite_set_cookie(c, prefix).and_then(|c| HeaderValue::from_str(&c).ok()) {
            out.append(header::SET_COOKIE, v);
        }
    }
    out.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(SANDBOX));
    out.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    out
}

// ------------------------------------------------------------------ link rewriting

/// Attributes whose root-relative URL is rewritten (`href="/x"` → `href="/web/{token}/x"`).
const URL_ATTRIBUTES: &[&[u8]] =
    &[b"href", b"src", b"action", b"formaction", b"poster", b"background", b"cite", b"data", b"manifest"];

/// The longest stretch a pattern may span: held back between chunks.
const HOLD: usize = 48;

/// Rewrites root-relative URLs in HTML and CSS as the body streams through, chunk by chunk,
/// holding back at most a few dozen bytes: URL attributes, CSS `url(/…)` and
/// `<meta http-equiv=refresh content="0; url=/…">`. Protocol-relative `//host` URLs, absolute
/// URLs, `srcset` after its first URL, and URLs built by scripts are left alone.
pub struct LinkRewriter {
    prefix: Vec<u8>,
    held: Vec<u8>,
    /// The byte before `held` (whether an attribute name starts a word).
    prev: u8,
}

enum Found {
    /// A root-relative URL's `/` at this index.
    At(usize),
    No,
    NeedMore,
}

impl LinkRewriter {
    pub fn new(prefix: &str) -> LinkRewriter {
        LinkRewriter { prefix: prefix.as_bytes().to_vec(), held: Vec::new(), prev: b' ' }
    }

    pub fn push(&mut self, chunk: &[u8]) -> Vec<u8> {
        self.run(chunk, false)
    }

    pub fn finish(&mut self) -> Vec<u8> {
        self.run(&[], true)
    }

    fn run(&mut self, chunk: &[u8], last: bool) -> Vec<u8> {
        let mut buf = std::mem::take(&mut self.held);
        buf.extend_from_slice(chunk);
        let mut out = Vec::with_capacity(buf.len() + 64);
        let (mut i, mut emitted) = (0, 0);
        while i < buf.len() {
            let prev = if i == 0 { self.prev } else { buf[i - 1] };
            match find_at(&buf, i, prev) {
                Found::At(slash) => {
                    out.extend_from_slice(&buf[emitted..slash]);
                    out.extend_from_slice(&self.prefix);
                    emitted = slash;
                    i = slash + 1;
                }
                Found::No => i += 1,
                Found::NeedMore if last => i += 1,
                Found::NeedMore => break,
            }
        }
        if i < buf.len() {
            out.extend_from_slice(&buf[emitted..i]);
            self.prev = if i == 0 { self.prev } else { buf[i - 1] };
            self.held = buf[i..].to_vec();
            debug_assert!(self.held.len() <= HOLD);
        } else {
            out.extend_from_slice(&buf[emitted..]);
            if let Some(&b) = buf.last() {
                self.prev = b;
            }
        }
        out
    }
}

/// Whether a root-relative URL starts after a pattern at `i`.
fn find_at(buf: &[u8], i: usize, prev: u8) -> Found {
    let rest = &buf[i..];
    let starts = |name: &[u8]| -> Option<bool> {
        let n = name.len().min(rest.len());
        if !rest[..n].eq_ignore_ascii_case(&name[..n]) {
            return Some(false);
        }
        if n < name.len() { None } else { Some(true) }
    };
    let word_start = prev.is_ascii_whitespace();
    let mut need_more = false;
    let mut after: Option<(usize, bool)> = None;
    if word_start {
        for name in URL_ATTRIBUTES {
            match starts(name) {
                Some(true) => {
                    after = Some((i + name.len(), true));
                    break;
                }
                Some(false) => {}
                None => need_more = true,
            }
        }
    }
    if after.is_none() && !prev.is_ascii_alphanumeric() && prev != b'-' {
        for name in [&b"url("[..], &b"url="[..]] {
            match starts(name) {
                Some(true) => {
                    after = Some((i + name.len(), false));
                    break;
                }
                Some(false) => {}
                None => need_more = true,
            }
        }
    }
    let Some((mut j, attribute)) = after else {
        return if need_more && rest.len() < HOLD { Found::NeedMore } else { Found::No };
    };
    let skip_ws = |j: &mut usize| -> bool {
        let mut k = 0;
        while *j < buf.len() && buf[*j].is_ascii_whitespace() {
            *j += 1;
            k += 1;
            if k > 8 {
                return false;
            }
        }
        true
    };
    if !skip_ws(&mut j) {
        return Found::No;
    }
    if attribute {
        match buf.get(j) {
            None => return Found::NeedMore,
            Some(b'=') => j += 1,
            Some(_) => return Found::No,
        }
        if !skip_ws(&mut j) {
            return Found::No;
        }
    }
    if matches!(buf.get(j), Some(b'"' | b'\'')) {
        j += 1;
    }
    match (buf.get(j), buf.get(j + 1)) {
        (None, _) | (Some(b'/'), None) => Found::NeedMore,
        (Some(b'/'), Some(b'/' | b'\\')) => Found::No,
        (Some(b'/'), Some(_)) => Found::At(j),
        _ => Found::No,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderName;

    fn rewrite_in_chunks(html: &str, size: usize) -> String {
        let mut rw = LinkRewriter::new("/web/T");
        let mut out = Vec::new();
        for c in html.as_bytes().chunks(size) {
            out.extend(rw.push(c));
        }
        out.extend(rw.finish());
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn root_relative_links_are_kept_under_the_capability_path_whatever_the_chunking() {
        let html = r#"<a href="/status">s</a> <img SRC='/logo.png'> <form action=/save method=post>
<link href = "/a.css"> <a href="//cdn.example/x">cdn</a> <a href="rel/x">r</a> <a href="https://other/">o</a>
<div style="background:url(/bg.png)"></div><meta http-equiv="refresh" content="5; url=/next">
<a data-href="/no">d</a> <p>href="/in-text"</p>"#;
        let want = r#"<a href="/web/T/status">s</a> <img SRC='/web/T/logo.png'> <form action=/web/T/save method=post>
<link href = "/web/T/a.css"> <a href="//cdn.example/x">cdn</a> <a href="rel/x">r</a> <a href="https://other/">o</a>
<div style="background:url(/web/T/bg.png)"></div><meta http-equiv="refresh" content="5; url=/web/T/next">
<a data-href="/no">d</a> <p>href="/in-text"</p>"#;
        for size in [1, 2, 3, 7, 13, 64, 4096] {
            assert_eq!(rewrite_in_chunks(html, size), want, "chunks of {size}");
        }
        // Tried: patterns cut at the very end of the body (left as they are), a link to the root.
        assert_eq!(rewrite_in_chunks("<a href=\"/", 1), "<a href=\"/");
        assert_eq!(rewrite_in_chunks("<a href=\"/\">home</a>", 2), "<a href=\"/web/T/\">home</a>");
        assert_eq!(rewrite_in_chunks("<a href", 3), "<a href");
    }

    #[test]
    fn locations_and_cookies_stay_under_the_capability_path() {
        let t = "127.0.0.1:8080";
        assert_eq!(rewrite_location("/login?next=/", "/web/T", t), "/web/T/login?next=/");
        assert_eq!(rewrite_location("http://127.0.0.1:8080/a", "/web/T", t), "/web/T/a");
        assert_eq!(rewrite_location("http://127.0.0.1:8080", "/web/T", t), "/web/T/");
        assert_eq!(rewrite_location("http://localhost/", "/web/T", "localhost:80"), "/web/T/");
        // Tried: another site, a relative path, a protocol-relative URL to another host.
        assert_eq!(rewrite_location("https://example.com/x", "/web/T", t), "https://example.com/x");
        assert_eq!(rewrite_location("next", "/web/T", t), "next");
        assert_eq!(rewrite_location("//evil.example/x", "/web/T", t), "//evil.example/x");

        let c = rewrite_set_cookie("sid=abc; Path=/; Domain=example.com; HttpOnly; SameSite=Lax", "/web/T").unwrap();
        assert_eq!(c, "dw_sid=abc; Path=/web/T/; HttpOnly; SameSite=Lax");
        // Tried: a cookie without a name, and garbage.
        assert_eq!(rewrite_set_cookie("=x", "/web/T"), None);
        assert_eq!(rewrite_set_cookie("garbage", "/web/T"), None);

        let mut h = HeaderMap::new();
        h.append(header::COOKIE, HeaderValue::from_static("drover_session=secret; dw_sid=abc"));
        h.append(header::COOKIE, HeaderValue::from_static("dw_lang=en; other=1"));
        assert_eq!(device_cookies(&h).as_deref(), Some("sid=abc; lang=en"));
    }

    #[test]
    fn the_device_gets_no_drover_credentials() {
        let mut h = HeaderMap::new();
        h.insert(header::COOKIE, HeaderValue::from_static("drover_session=secret"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer drv_secret"));
        h.insert(header::HOST, HeaderValue::from_static("drover.example"));
        h.insert(header::ORIGIN, HeaderValue::from_static("null"));
        h.insert(header::REFERER, HeaderValue::from_static("https://drover.example/web/T/"));
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, x-private"));
        h.insert(HeaderName::from_static("x-private"), HeaderValue::from_static("1"));
        h.insert(header::ACCEPT, HeaderValue::from_static("text/html"));
        let out = request_headers(&h, "127.0.0.1:80", false);
        assert_eq!(out.get(header::HOST).unwrap(), "127.0.0.1:80");
        assert_eq!(out.get(header::ORIGIN).unwrap(), "http://127.0.0.1:80");
        assert_eq!(out.get(header::ACCEPT).unwrap(), "text/html");
        for gone in ["cookie", "authorization", "referer", "connection", "x-private"] {
            assert!(!out.contains_key(gone), "{gone} reached the device");
        }
        // Basic credentials too: they may be those of a proxy in front of droverd.
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic YWRtaW46YWRtaW4="));
        let out = request_headers(&h, "127.0.0.1:80", false);
        assert!(!out.contains_key(header::AUTHORIZATION), "Basic credentials reached the device");
    }
}
