//! One remote session: the operator's WebSocket on one side, the device's session topics on
//! the other (`drover_proto::remote` frames), in one task.
//!
//! Flow control runs end to end. Bytes from the device are granted back only once they have
//! been written to the operator's WebSocket (terminal, files) or once the operator's client
//! grants them (forward: its `Credit` frames become the device's `WINDOW` frames); bytes from
//! the operator are read from the WebSocket only while the device has granted room for them,
//! so a slow side stalls the other through TCP instead of filling a queue.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket};
use bytes::Bytes;
use drover_proto::operator::{self, MuxFrame, MuxKind};
use drover_proto::remote::{
    self, Control, ControlOp, Direction, ExitStatus, FileSummary, FrameType, Header, MAIN_STREAM, Reason, ResetBody,
    SessionFlow, StreamFlow,
};
use rumqttc::v5::mqttbytes::QoS;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::hub::{Hub, Inbox};
use super::recording::Recorder;
use super::sessions::{Ending, Opened};

/// How long the device has to answer an `open`.
const OPEN_TIMEOUT: Duration = Duration::from_secs(20);

/// What the session carries, with what the relay needs to know of it.
pub enum Mode {
    Terminal { recorder: Option<Recorder> },
    Upload { size: u64 },
    Download,
    Forward { target: String },
}

pub struct Relay {
    pub hub: Arc<Hub>,
    pub session: Opened,
    pub mode: Mode,
    pub idle_timeout: Duration,
    pub max_duration: Duration,
}

/// The end of a relay, as the session row records it.
struct End {
    reason: String,
    /// Sent to the operator before the socket closes.
    error: Option<(String, String)>,
    /// Tell the device to close the session (it did not end it itself).
    close_device: Option<Reason>,
}

impl End {
    fn operator(reason: &str) -> End {
        End { reason: reason.into(), error: None, close_device: Some(Reason::Closed) }
    }

    fn fail(code: &str, message: impl Into<String>, close_device: Option<Reason>) -> End {
        let message = message.into();
        End { reason: format!("{code}: {message}"), error: Some((code.into(), message)), close_device }
    }
}

/// One forwarded connection: the operator's id for it, the device's stream, their credits.
struct FwdStream {
    op_id: u32,
    flow: StreamFlow,
    accepted: bool,
    /// Operator bytes that arrived before the device accepted the stream (bounded by the
    /// operator's initial credit).
    held: Vec<u8>,
}

struct State {
    hub: Arc<Hub>,
    down: String,
    flow: SessionFlow,
    main: StreamFlow,
    bytes_in: i64,
    bytes_out: i64,
    last_activity: Instant,
    /// Operator bytes read but not yet sent for lack of credit.
    pending: Option<(Bytes, usize)>,
    upload_eof: bool,
    streams: HashMap<u16, FwdStream>,
    by_op: HashMap<u32, u16>,
    next_stream: u16,
}

impl State {
    async fn send(&mut self, h: Header, payload: &[u8]) -> Result<(), End> {
        let frame = self.flow.encode(h, payload);
        self.hub
            .publish(self.down.clone(), QoS::AtMostOnce, frame)
            .await
            .map_err(|e| End::fail("unavailable", e.to_string(), None))
    }

    async fn send_control(&mut self, c: &Control) -> Result<(), End> {
        let body = serde_json::to_vec(c).unwrap_or_default();
        self.send(Header::new(FrameType::Control, 0, 0), &body).await
    }

    /// Sends operator bytes on the main stream, as far as credit allows; the rest waits.
    async fn push_main(&mut self) -> Result<(), End> {
        while let Some((buf, off)) = self.pending.take() {
            let n = self.main.sendable().min(buf.len() - off);
            if n == 0 || !self.flow.can_send_data() {
                self.pending = Some((buf, off));
                return Ok(());
            }
            self.send(Header::new(FrameType::Data, MAIN_STREAM, 0), &buf[off..off + n]).await?;
            self.main.on_sent(n);
            self.flow.on_data_sent();
            self.bytes_out += n as i64;
            if off + n < buf.len() {
                self.pending = Some((buf, off + n));
            }
        }
        Ok(())
    }

    /// Whether the operator's socket may be read now.
    fn may_read_operator(&self, forward: bool) -> bool {
        if self.pending.is_some() || self.upload_eof {
            return false;
        }
        if forward {
            // Streams' byte credit is the operator's business (relayed grants); the session's
            // frame credit is this relay's.
            self.flow.can_send_data()
        } else {
            self.flow.can_send_data() && self.main.sendable() > 0
        }
    }

    /// Sends forwarded bytes that wait for their stream's acceptance or for session credit.
    async fn flush_held(&mut self) -> Result<(), End> {
        let ready: Vec<u16> =
            self.streams.iter().filter(|(_, s)| s.accepted && !s.held.is_empty()).map(|(id, _)| *id).collect();
        for id in ready {
            while self.flow.can_send_data() {
                let Some(s) = self.streams.get_mut(&id) else { break };
                if s.held.is_empty() {
                    break;
                }
                let n = s.held.len().min(remote::MAX_FRAME_DATA);
                let chunk: Vec<u8> = s.held.drain(..n).collect();
                s.flow.on_sent(n);
                self.send(Header::new(FrameType::Data, id, 0), &chunk).await?;
                self.flow.on_data_sent();
                self.bytes_out += n as i64;
            }
        }
        Ok(())
    }

    async fn grant_session(&mut self) -> Result<(), End> {
        if let Some(n) = self.flow.take_grant() {
            self.send(Header::new(FrameType::Window, 0, n), &[]).await?;
        }
        Ok(())
    }
}

fn device_error(code: Option<Reason>, message: Option<String>, fallback: &str) -> End {
    let code = code.map(|r| r.as_str().to_string()).unwrap_or_else(|| "device".into());
    let message = message.unwrap_or_else(|| fallback.to_string());
    End { reason: format!("device: {code}: {message}"), error: Some((code, message)), close_device: None }
}

/// The operator's end of a session: a WebSocket (the API, the CLI, the browser's terminal),
/// or a pair of channels inside droverd speaking the same messages (the web UI proxy,
/// `super::web`).
pub enum Operator {
    Ws(Box<WebSocket>),
    Local { rx: mpsc::UnboundedReceiver<Message>, tx: mpsc::UnboundedSender<Message> },
}

impl Operator {
    async fn recv(&mut self) -> Option<Result<Message, axum::Error>> {
        match self {
            Operator::Ws(ws) => ws.recv().await,
            Operator::Local { rx, .. } => rx.recv().await.map(Ok),
        }
    }

    async fn send(&mut self, m: Message) -> Result<(), axum::Error> {
        match self {
            Operator::Ws(ws) => ws.send(m).await,
            Operator::Local { tx, .. } => tx.send(m).map_err(axum::Error::new),
        }
    }
}

async fn ws_send(ws: &mut Operator, m: Message) -> Result<(), End> {
    ws.send(m).await.map_err(|_| End::operator("operator disconnected"))
}

async fn ws_control(ws: &mut Operator, c: operator::Control) -> Result<(), End> {
    ws_send(ws, Message::Text(c.to_text().into())).await
}

impl Relay {
    /// Runs the session to its end and returns what the session row records.
    pub async fn run(mut self, mut ws: Operator, mut inbox: Inbox, command: remote::RemoteCommand) -> Ending {
        let down = remote::session_topic(&self.session.device_id, &self.session.id, Direction::Down);
        let mut st = State {
            hub: self.hub.clone(),
            down,
            flow: SessionFlow::new(),
            main: StreamFlow::new(),
            bytes_in: 0,
            bytes_out: 0,
            last_activity: Instant::now(),
            pending: None,
            upload_eof: false,
            streams: HashMap::new(),
            by_op: HashMap::new(),
            next_stream: 1,
        };
        let mut mode = std::mem::replace(&mut self.mode, Mode::Download);
        let end = match self.open(&mut ws, &mut inbox, &mut st, &mut mode, &command).await {
            Ok(()) => Self::relay(&mut ws, &mut inbox, &mut st, &mut mode, self.idle_timeout, self.max_duration)
                .await
                .err()
                .unwrap_or_else(|| End::operator("closed")),
            Err(e) => e,
        };
        if let Some(reason) = end.close_device {
            let _ = st.send_control(&Control::with_reason(ControlOp::Close, reason, "")).await;
            // The device may not have its session yet (an open still in flight).
            let close = serde_json::to_vec(&remote::RemoteCommand::close(&self.session.id)).unwrap_or_default();
            let topic = drover_proto::device::topic(&self.session.device_id, drover_proto::device::Channel::Remote);
            let _ = self.hub.publish(topic, QoS::AtLeastOnce, close).await;
        }
        if let Some((code, message)) = &end.error {
            let _ =
                ws_control(&mut ws, operator::Control::Error { code: code.clone(), message: message.clone() }).await;
        }
        let _ = ws.send(Message::Close(None)).await;
        let recording = match mode {
            Mode::Terminal { recorder: Some(r) } => Some(r.finish()),
            _ => None,
        };
        Ending { reason: end.reason, bytes_in: st.bytes_in, bytes_out: st.bytes_out, recording }
    }

    /// Sends the `open` and waits for the device's `ready` (or its refusal).
    async fn open(
        &self,
        ws: &mut Operator,
        inbox: &mut Inbox,
        st: &mut State,
        mode: &mut Mode,
        command: &remote::RemoteCommand,
    ) -> Result<(), End> {
        let topic = drover_proto::device::topic(&self.session.device_id, drover_proto::device::Channel::Remote);
        let body = serde_json::to_vec(command).unwrap_or_default();
        self.hub
            .publish(topic, QoS::AtLeastOnce, body)
            .await
            .map_err(|e| End::fail("unavailable", e.to_string(), None))?;
        let deadline = Instant::now() + OPEN_TIMEOUT;
        loop {
            let msg = tokio::select! {
                m = inbox.rx.recv() => m,
                m = ws.recv() => match m {
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return Err(End::operator("operator left before the device answered")),
                    _ => continue,
                },
                _ = tokio::time::sleep_until(deadline) => {
                    return Err(End::fail(
                        "timeout",
                        format!("device {} did not answer within {} s: is it online, and does its agent support remote access?", self.session.device_id, OPEN_TIMEOUT.as_secs()),
                        Some(Reason::Closed),
                    ));
                }
            };
            let Some(bytes) = msg else { return Err(End::fail("unavailable", "the broker connection was lost", None)) };
            let frame = remote::decode(&bytes)
                .map_err(|e| End::fail("protocol", e.to_string(), Some(Reason::ProtocolError)))?;
            st.flow
                .on_frame(&frame.header)
                .map_err(|e| End::fail("protocol", e.to_string(), Some(Reason::ProtocolError)))?;
            if frame.header.kind != FrameType::Control {
                continue;
            }
            let c: Control = serde_json::from_slice(frame.payload)
                .map_err(|e| End::fail("protocol", format!("bad control frame: {e}"), Some(Reason::ProtocolError)))?;
            match c.op {
                ControlOp::Ready => {
                    ws_control(ws, operator::Control::Opened { session: self.session.id.clone() }).await?;
                    if let (Mode::Download, Some(size)) = (&*mode, c.size) {
                        ws_control(ws, operator::Control::Meta { size }).await?;
                    }
                    st.last_activity = Instant::now();
                    return Ok(());
                }
                ControlOp::Refused | ControlOp::Close => {
                    return Err(device_error(c.reason, c.message, "the device refused the session"));
                }
            }
        }
    }

    async fn relay(
        ws: &mut Operator,
        inbox: &mut Inbox,
        st: &mut State,
        mode: &mut Mode,
        idle: Duration,
        max: Duration,
    ) -> Result<(), End> {
        let forward = matches!(mode, Mode::Forward { .. });
        let ends_at = Instant::now() + max;
        loop {
            let read_ws = st.may_read_operator(forward);
            let idle_at = st.last_activity + idle;
            tokio::select! {
                m = inbox.rx.recv() => {
                    let Some(bytes) = m else { return Err(End::fail("unavailable", "the broker connection was lost", None)) };
                    st.last_activity = Instant::now();
                    Self::from_device(ws, st, mode, &bytes).await?;
                }
                m = ws.recv(), if read_ws => {
                    st.last_activity = Instant::now();
                    match m {
                        Some(Ok(m)) => Self::from_operator(st, mode, m).await?,
                        None | Some(Err(_)) => return Err(End::operator("operator disconnected")),
                    }
                }
                _ = tokio::time::sleep_until(idle_at) => {
                    return Err(End::fail("idle-timeout", format!("no data either way for {} s", idle.as_secs()), Some(Reason::IdleTimeout)));
                }
                _ = tokio::time::sleep_until(ends_at) => {
                    return Err(End::fail("max-duration", format!("the session reached its maximum duration of {} s", max.as_secs()), Some(Reason::MaxDuration)));
                }
            }
        }
    }

    async fn from_operator(st: &mut State, mode: &mut Mode, m: Message) -> Result<(), End> {
        match (m, &mut *mode) {
            (Message::Close(_), _) => Err(End::operator("closed by the operator")),
            (Message::Binary(b), Mode::Forward { target }) => {
                let target = target.clone();
                Self::forward_from_operator(st, &target, &b).await
            }
            (Message::Binary(b), Mode::Terminal { .. } | Mode::Upload { .. }) => {
                if b.is_empty() {
                    return Ok(());
                }
                st.pending = Some((b, 0));
                st.push_main().await
            }
            (Message::Text(t), _) => match serde_json::from_str::<operator::Control>(&t) {
                Ok(operator::Control::Resize { cols, rows }) if matches!(mode, Mode::Terminal { .. }) => {
                    if remote::check_size(rows, cols).is_err() {
                        return Ok(());
                    }
                    if let Mode::Terminal { recorder: Some(r) } = mode {
                        r.resize(cols, rows);
                    }
                    st.send(Header::new(FrameType::Resize, MAIN_STREAM, 0), &remote::resize_payload(rows, cols)).await
                }
                Ok(operator::Control::Eof) if matches!(mode, Mode::Upload { .. }) => {
                    if let Mode::Upload { size } = mode
                        && st.bytes_out as u64 != *size
                    {
                        return Err(End::fail(
                            "size-mismatch",
                            format!("{} bytes were sent, {size} were announced; nothing was written", st.bytes_out),
                            Some(Reason::SizeMismatch),
                        ));
                    }
                    st.upload_eof = true;
                    st.send(Header::new(FrameType::Eof, MAIN_STREAM, 0), &[]).await
                }
                _ => Ok(()),
            },
            _ => Ok(()),
        }
    }

    async fn forward_from_operator(st: &mut State, target: &str, b: &[u8]) -> Result<(), End> {
        let Some(f) = MuxFrame::decode(b) else {
            return Err(End::fail("invalid_request", "malformed forward frame", Some(Reason::Closed)));
        };
        match f.kind {
            MuxKind::Open => {
                if st.by_op.contains_key(&f.stream) {
                    return Ok(());
                }
                if st.streams.len() >= remote::MAX_STREAMS {
                    return Err(End::fail("busy", "too many forwarded connections at once", Some(Reason::Busy)));
                }
                let mut id = st.next_stream;
                while id == 0 || st.streams.contains_key(&id) {
                    id = id.wrapping_add(1);
                }
                st.next_stream = id.wrapping_add(1);
                st.streams.insert(
                    id,
                    FwdStream { op_id: f.stream, flow: StreamFlow::new(), accepted: false, held: Vec::new() },
                );
                st.by_op.insert(f.stream, id);
                st.send(Header::new(FrameType::Open, id, 0), target.as_bytes()).await
            }
            MuxKind::Data => {
                let Some(&id) = st.by_op.get(&f.stream) else { return Ok(()) };
                let Some(s) = st.streams.get_mut(&id) else { return Ok(()) };
                if f.payload.len() > remote::MAX_FRAME_DATA {
                    return Err(End::fail("invalid_request", "forward frame too large", Some(Reason::ProtocolError)));
                }
                // The operator spends the device's grants, relayed to it one for one; bytes
                // wait here only until the device accepts the stream or grants session credit.
                s.held.extend_from_slice(f.payload);
                st.flush_held().await
            }
            MuxKind::Eof => {
                let Some(&id) = st.by_op.get(&f.stream) else { return Ok(()) };
                st.send(Header::new(FrameType::Eof, id, 0), &[]).await
            }
            MuxKind::Reset => {
                let Some(id) = st.by_op.remove(&f.stream) else { return Ok(()) };
                st.streams.remove(&id);
                let body = serde_json::to_vec(&ResetBody { reason: Reason::Closed, message: None }).unwrap_or_default();
                st.send(Header::new(FrameType::Reset, id, 0), &body).await
            }
            MuxKind::Credit => {
                let Some(&id) = st.by_op.get(&f.stream) else { return Ok(()) };
                let Some(s) = st.streams.get_mut(&id) else { return Ok(()) };
                // The device may send these bytes again: this relay's count of the stream's
                // window grows with them, or a connection would end after its first window.
                s.flow.on_consumed(f.credit_bytes() as usize);
                let n = s.flow.take_grant(true).unwrap_or(0);
                if n > 0 {
                    st.send(Header::new(FrameType::Window, id, n), &[]).await?;
                }
                Ok(())
            }
        }
    }

    async fn from_device(ws: &mut Operator, st: &mut State, mode: &mut Mode, bytes: &[u8]) -> Result<(), End> {
        let proto = |e: remote::FrameError| End::fail("protocol", e.to_string(), Some(Reason::ProtocolError));
        let frame = remote::decode(bytes).map_err(proto)?;
        let h = frame.header;
        st.flow.on_frame(&h).map_err(proto)?;
        if matches!(mode, Mode::Forward { .. }) {
            Self::forward_from_device(ws, st, h, frame.payload).await?;
            st.flush_held().await?;
            return st.grant_session().await;
        }
        if h.stream == MAIN_STREAM && h.credit > 0 {
            st.main.on_credit(h.stream, h.credit).map_err(proto)?;
            st.push_main().await?;
        }
        match h.kind {
            FrameType::Control => {
                let c: Control = serde_json::from_slice(frame.payload).map_err(|e| {
                    End::fail("protocol", format!("bad control frame: {e}"), Some(Reason::ProtocolError))
                })?;
                if c.op != ControlOp::Ready {
                    return Err(device_error(c.reason, c.message, "the device closed the session"));
                }
            }
            FrameType::Data if h.stream == MAIN_STREAM => {
                st.main.on_received(h.stream, frame.payload.len()).map_err(proto)?;
                if let Mode::Terminal { recorder: Some(r) } = mode {
                    r.output(frame.payload);
                }
                ws_send(ws, Message::Binary(Bytes::copy_from_slice(frame.payload))).await?;
                st.bytes_in += frame.payload.len() as i64;
                st.main.on_consumed(frame.payload.len());
                if let Some(n) = st.main.take_grant(false) {
                    st.send(Header::new(FrameType::Window, MAIN_STREAM, n), &[]).await?;
                }
            }
            FrameType::Exit => {
                let status: ExitStatus =
                    serde_json::from_slice(frame.payload).unwrap_or(ExitStatus { code: None, signal: None });
                let code = status.code.unwrap_or_else(|| 128 + status.signal.unwrap_or(0));
                ws_control(ws, operator::Control::Exit { code }).await?;
                return Err(End { reason: format!("exit {code}"), error: None, close_device: Some(Reason::Closed) });
            }
            FrameType::Eof if h.stream == MAIN_STREAM => {
                let summary: FileSummary = serde_json::from_slice(frame.payload).map_err(|e| {
                    End::fail("protocol", format!("bad file summary: {e}"), Some(Reason::ProtocolError))
                })?;
                ws_control(ws, operator::Control::Done { size: summary.size, sha256: summary.sha256.clone() }).await?;
                let what = if matches!(mode, Mode::Upload { .. }) { "uploaded" } else { "downloaded" };
                return Err(End {
                    reason: format!("{what} {} bytes, sha256 {}", summary.size, summary.sha256),
                    error: None,
                    close_device: Some(Reason::Closed),
                });
            }
            FrameType::Reset => {
                let r: Option<ResetBody> = serde_json::from_slice(frame.payload).ok();
                let (reason, message) = r.map(|r| (Some(r.reason), r.message)).unwrap_or((None, None));
                let mut end = device_error(reason, message, "the device abandoned the transfer");
                end.close_device = Some(Reason::Closed);
                return Err(end);
            }
            _ => {}
        }
        st.grant_session().await
    }

    async fn forward_from_device(ws: &mut Operator, st: &mut State, h: Header, payload: &[u8]) -> Result<(), End> {
        let proto = |e: remote::FrameError| End::fail("protocol", e.to_string(), Some(Reason::ProtocolError));
        if h.kind == FrameType::Control {
            let c: Control = serde_json::from_slice(payload)
                .map_err(|e| End::fail("protocol", format!("bad control frame: {e}"), Some(Reason::ProtocolError)))?;
            if c.op != ControlOp::Ready {
                return Err(device_error(c.reason, c.message, "the device closed the session"));
            }
            return Ok(());
        }
        let Some(s) = st.streams.get_mut(&h.stream) else { return Ok(()) };
        let op_id = s.op_id;
        if h.credit > 0 {
            s.flow.on_credit(h.stream, h.credit).map_err(proto)?;
            // The operator's client keeps its own count from the same initial window.
            ws_send(ws, Message::Binary(MuxFrame::credit(op_id, h.credit).into())).await?;
        }
        match h.kind {
            FrameType::Accept => {
                s.accepted = true;
            }
            FrameType::Data => {
                s.flow.on_received(h.stream, payload.len()).map_err(proto)?;
                st.bytes_in += payload.len() as i64;
                ws_send(ws, Message::Binary(MuxFrame::encode(op_id, MuxKind::Data, payload).into())).await?;
            }
            FrameType::Eof => {
                ws_send(ws, Message::Binary(MuxFrame::encode(op_id, MuxKind::Eof, &[]).into())).await?;
            }
            FrameType::Reset => {
                let why = serde_json::from_slice::<ResetBody>(payload)
                    .map(|r| match r.message {
                        Some(m) => format!("{}: {m}", r.reason),
                        None => r.reason.to_string(),
                    })
                    .unwrap_or_else(|_| "reset by the device".into());
                st.streams.remove(&h.stream);
                st.by_op.remove(&op_id);
                ws_send(ws, Message::Binary(MuxFrame::encode(op_id, MuxKind::Reset, why.as_bytes()).into())).await?;
            }
            _ => {}
        }
        Ok(())
    }
}
