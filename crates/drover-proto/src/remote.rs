//! Remote access (`docs/protocol.md`, "Remote access"): terminal, file transfer and port
//! forwarding through connections the device opened.
//!
//! - `down/remote` (server → device, QoS 1, JSON): [`RemoteCommand`] — open a session of a
//!   kind (terminal, files, forward) or close one.
//! - Session data travels on two per-session topics under the device's prefix
//!   ([`session_topic`]): `rs/{session}/d` to the device and `rs/{session}/u` from it, as binary
//!   [`Frame`]s (QoS 0): a 12-byte header — type, stream, sequence, credit — then bytes.
//! - Flow control is by credit ([`SessionFlow`], [`StreamFlow`]): per stream in bytes, per
//!   session in DATA frames. A sender never has more in flight than its peer granted, so no
//!   broker queue and no receiver buffer grows without bound.
//!
//! Everything here is sans-I/O: the agent and the server drive it with their own sockets.

use serde::{Deserialize, Serialize};

use crate::device::TOPIC_ROOT;

/// Bytes of a frame header.
pub const HEADER_LEN: usize = 12;
/// Most data bytes in one DATA frame.
pub const MAX_FRAME_DATA: usize = 64 * 1024;
/// Most bytes of a non-DATA frame's payload (JSON bodies, targets).
pub const MAX_CONTROL_PAYLOAD: usize = 4096;
/// Byte credit each side holds on a stream the moment it opens, before any grant.
pub const STREAM_WINDOW: u32 = 256 * 1024;
/// DATA frames each side may send in a session before the first session grant.
pub const SESSION_FRAMES: u32 = 32;
/// Highest credit a sender may hold (bytes on a stream, or frames on the session); a grant
/// beyond it is a protocol error.
pub const MAX_CREDIT: u32 = 64 * 1024 * 1024;
/// Most streams open at once in one forward session.
pub const MAX_STREAMS: usize = 256;
/// Longest session id.
pub const MAX_SESSION_ID_LEN: usize = 64;
/// Longest path in a file transfer, in bytes.
pub const MAX_PATH_LEN: usize = 4096;
/// Longest `message` in a refusal, close or reset, in bytes.
pub const MAX_MESSAGE_LEN: usize = 512;
/// The stream of a terminal's bytes, or of a file's.
pub const MAIN_STREAM: u16 = 1;

/// The two directions of session data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// `d`: server → device.
    Down,
    /// `u`: device → server.
    Up,
}

impl Direction {
    pub fn letter(self) -> &'static str {
        match self {
            Direction::Down => "d",
            Direction::Up => "u",
        }
    }
}

/// `drover/v1/d/{device_id}/rs/{session}/d` or `…/u`.
pub fn session_topic(device_id: &str, session: &str, dir: Direction) -> String {
    format!("{TOPIC_ROOT}/{device_id}/rs/{session}/{}", dir.letter())
}

/// The filter a device subscribes to on its remote connection: every session's `d` topic.
pub fn device_sessions_filter(device_id: &str) -> String {
    format!("{TOPIC_ROOT}/{device_id}/rs/+/d")
}

/// Splits a session topic into device id, session id and direction.
pub fn parse_session_topic(topic: &str) -> Option<(&str, &str, Direction)> {
    let rest = topic.strip_prefix(TOPIC_ROOT)?.strip_prefix('/')?;
    let (device, rest) = rest.split_once('/')?;
    let rest = rest.strip_prefix("rs/")?;
    let (session, dir) = rest.split_once('/')?;
    let dir = match dir {
        "d" => Direction::Down,
        "u" => Direction::Up,
        _ => return None,
    };
    (crate::device::valid_device_id(device) && valid_session_id(session)).then_some((device, session, dir))
}

/// 1 to 64 ASCII letters, digits, `-` or `_` — nothing MQTT gives a meaning.
pub fn valid_session_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_SESSION_ID_LEN
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

// ---------------------------------------------------------------------------------------
// Control: down/remote

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    Open,
    Close,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SessionKind {
    Terminal,
    Files,
    Forward,
}

impl SessionKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SessionKind::Terminal => "terminal",
            SessionKind::Files => "files",
            SessionKind::Forward => "forward",
        }
    }
}

/// A terminal's size and terminal type.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TerminalParams {
    pub rows: u16,
    pub cols: u16,
    /// `TERM` for the shell, e.g. `xterm-256color`.
    pub term: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FileDirection {
    /// To the device.
    Upload,
    /// From the device.
    Download,
}

/// The file of a `files` session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileParams {
    pub direction: FileDirection,
    /// Absolute path on the device.
    pub path: String,
    /// Upload: the file's size in bytes (required).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// Upload: SHA-256 of the whole file, lowercase hex (required).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// Upload: permission bits of the new file (default `0o644`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<u32>,
}

/// On `down/remote`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteCommand {
    pub v: u32,
    pub op: Op,
    pub session: String,
    /// `open` only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<SessionKind>,
    /// `open` of a terminal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub terminal: Option<TerminalParams>,
    /// `open` of a file transfer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<FileParams>,
    /// `open` of a forward session: the `host:port` the operator means to reach, so the device
    /// can refuse at once; each stream still names its own target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// The server's limits; the device applies the smaller of these and its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout_s: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_duration_s: Option<u32>,
}

impl RemoteCommand {
    fn base(op: Op, session: &str) -> Self {
        RemoteCommand {
            v: crate::device::PROTOCOL_VERSION,
            op,
            session: session.to_string(),
            kind: None,
            terminal: None,
            file: None,
            target: None,
            idle_timeout_s: None,
            max_duration_s: None,
        }
    }

    pub fn open_terminal(session: &str, t: TerminalParams) -> Self {
        RemoteCommand { kind: Some(SessionKind::Terminal), terminal: Some(t), ..Self::base(Op::Open, session) }
    }

    pub fn open_files(session: &str, f: FileParams) -> Self {
        RemoteCommand { kind: Some(SessionKind::Files), file: Some(f), ..Self::base(Op::Open, session) }
    }

    pub fn open_forward(session: &str, target: Option<&str>) -> Self {
        RemoteCommand {
            kind: Some(SessionKind::Forward),
            target: target.map(str::to_string),
            ..Self::base(Op::Open, session)
        }
    }

    pub fn close(session: &str) -> Self {
        Self::base(Op::Close, session)
    }

    /// The shape and limits of the command; an `open` that fails gets `refused` with
    /// [`Reason::BadRequest`] and this message.
    pub fn check(&self) -> Result<(), String> {
        if !valid_session_id(&self.session) {
            return Err("session must be 1 to 64 ASCII letters, digits, '-' or '_'".into());
        }
        if self.op == Op::Close {
            return Ok(());
        }
        match self.kind {
            None => Err("open needs a kind".into()),
            Some(SessionKind::Terminal) => {
                let t = self.terminal.as_ref().ok_or("a terminal session needs terminal {rows, cols, term}")?;
                check_size(t.rows, t.cols)?;
                let term_ok = !t.term.is_empty()
                    && t.term.len() <= 64
                    && t.term.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.+".contains(&b));
                if !term_ok {
                    return Err("term must be 1 to 64 ASCII letters, digits, '-', '_', '.' or '+'".into());
                }
                Ok(())
            }
            Some(SessionKind::Files) => {
                let f = self.file.as_ref().ok_or("a files session needs file {direction, path, …}")?;
                check_path(&f.path)?;
                if f.direction == FileDirection::Upload {
                    if f.size.is_none() {
                        return Err("an upload needs size".into());
                    }
                    if !f.sha256.as_deref().is_some_and(crate::update::is_sha256_hex) {
                        return Err("an upload needs sha256: 64 lowercase hex digits".into());
                    }
                    if f.mode.is_some_and(|m| m > 0o7777) {
                        return Err("mode must be permission bits (at most 0o7777)".into());
                    }
                }
                Ok(())
            }
            Some(SessionKind::Forward) => match &self.target {
                Some(t) => Target::parse(t).map(|_| ()),
                None => Ok(()),
            },
        }
    }
}

/// Rows and columns of a terminal: 1 to 1000 each.
pub fn check_size(rows: u16, cols: u16) -> Result<(), String> {
    if !(1..=1000).contains(&rows) || !(1..=1000).contains(&cols) {
        return Err("rows and cols must be 1 to 1000".into());
    }
    Ok(())
}

/// An absolute path without `.` or `..` components, NUL or empty components, at most
/// [`MAX_PATH_LEN`] bytes, not ending in `/`.
pub fn check_path(path: &str) -> Result<(), String> {
    let ok = path.len() <= MAX_PATH_LEN
        && path.len() > 1
        && path.starts_with('/')
        && !path.ends_with('/')
        && !path.contains('\0')
        && path[1..].split('/').all(|c| !c.is_empty() && c != "." && c != "..");
    if ok {
        Ok(())
    } else {
        Err(format!("path must be absolute, without '.', '..' or empty components, at most {MAX_PATH_LEN} bytes"))
    }
}

/// The target of a forwarded stream: `host:port`, `[v6]:port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target<'a> {
    pub host: &'a str,
    pub port: u16,
}

impl<'a> Target<'a> {
    pub fn parse(s: &'a str) -> Result<Target<'a>, String> {
        let bad = || format!("target {s:?} must be host:port (port 1-65535; IPv6 as [addr]:port)");
        let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
        let port: u16 = port.parse().ok().filter(|p| *p != 0).ok_or_else(bad)?;
        let host = match host.strip_prefix('[') {
            Some(h) => {
                h.strip_suffix(']').filter(|h| h.bytes().all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.'))
            }
            None => Some(host).filter(|h| h.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')),
        }
        .filter(|h| !h.is_empty() && h.len() <= 253)
        .ok_or_else(bad)?;
        Ok(Target { host, port })
    }

    /// Whether one of `allow` permits this target: `host:port`, `host:*`, compared as written
    /// (case-insensitive host); `[::1]:22` for IPv6.
    pub fn allowed_by<S: AsRef<str>>(&self, allow: &[S]) -> bool {
        allow.iter().any(|a| {
            let a = a.as_ref();
            let Some((h, p)) = a.rsplit_once(':') else { return false };
            let h = h.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(h);
            h.eq_ignore_ascii_case(self.host) && (p == "*" || p.parse::<u16>().is_ok_and(|p| p == self.port))
        })
    }
}

// ---------------------------------------------------------------------------------------
// Session control frames (type CONTROL, stream 0) and reasons

/// Why a session or stream was refused, reset or closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Reason {
    /// The device's configuration switches this kind of session off.
    Disabled,
    /// The path is outside the prefixes the device allows.
    PathNotAllowed,
    /// The file is larger than the device allows.
    TooLarge,
    /// The device has as many sessions (or streams) open as it allows.
    Busy,
    /// The command or frame breaks this contract (the message says how).
    BadRequest,
    /// The configured user does not exist, or is root without `allow_root`.
    UserNotAllowed,
    /// The forward target is not in the device's allow list.
    TargetNotAllowed,
    /// The file to download does not exist (or is not a regular file).
    NotFound,
    /// The forward target refused the connection or did not answer.
    ConnectFailed,
    /// The uploaded bytes do not hash to the announced SHA-256; nothing was written.
    HashMismatch,
    /// More or fewer bytes arrived than announced; nothing was written.
    SizeMismatch,
    /// A file or process error on the device (the message says which).
    IoError,
    /// No data either way for the idle timeout.
    IdleTimeout,
    /// The session reached its maximum duration.
    MaxDuration,
    /// Closed by the other side, normally.
    Closed,
    /// The terminal's shell exited.
    Exited,
    /// A frame was lost (sequence gap) or credit was overrun.
    ProtocolError,
    /// The agent is stopping.
    Shutdown,
    /// A `v` this side does not speak.
    UnsupportedVersion,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Disabled => "disabled",
            Reason::PathNotAllowed => "path-not-allowed",
            Reason::TooLarge => "too-large",
            Reason::Busy => "busy",
            Reason::BadRequest => "bad-request",
            Reason::UserNotAllowed => "user-not-allowed",
            Reason::TargetNotAllowed => "target-not-allowed",
            Reason::NotFound => "not-found",
            Reason::ConnectFailed => "connect-failed",
            Reason::HashMismatch => "hash-mismatch",
            Reason::SizeMismatch => "size-mismatch",
            Reason::IoError => "io-error",
            Reason::IdleTimeout => "idle-timeout",
            Reason::MaxDuration => "max-duration",
            Reason::Closed => "closed",
            Reason::Exited => "exited",
            Reason::ProtocolError => "protocol-error",
            Reason::Shutdown => "shutdown",
            Reason::UnsupportedVersion => "unsupported-version",
        }
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ControlOp {
    /// Device → server: the session is open; data may flow.
    Ready,
    /// Device → server: the session will not open (`reason`, `message`).
    Refused,
    /// Either way: the session ends (`reason`; from the device also byte counts).
    Close,
}

/// The JSON body of a CONTROL frame (stream 0).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Control {
    pub v: u32,
    pub op: ControlOp,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<Reason>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// `ready` of a download: the file's size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// `close` from the device: DATA bytes received from and sent to the server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_down: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_up: Option<u64>,
}

impl Control {
    pub fn new(op: ControlOp) -> Self {
        Control {
            v: crate::device::PROTOCOL_VERSION,
            op,
            reason: None,
            message: None,
            size: None,
            bytes_down: None,
            bytes_up: None,
        }
    }

    pub fn with_reason(op: ControlOp, reason: Reason, message: impl Into<String>) -> Self {
        let m: String = message.into();
        Control { reason: Some(reason), message: (!m.is_empty()).then(|| clip(m)), ..Control::new(op) }
    }
}

/// The JSON body of a RESET frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResetBody {
    pub reason: Reason,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// The JSON body of the device's EOF on a file stream: what was written (upload, sent after
/// the file is in place) or read (download).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileSummary {
    pub size: u64,
    pub sha256: String,
}

/// The JSON body of an EXIT frame: how the terminal's shell ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
}

/// Cuts a message to [`MAX_MESSAGE_LEN`] bytes at a character boundary.
pub fn clip(mut m: String) -> String {
    if m.len() > MAX_MESSAGE_LEN {
        let mut end = MAX_MESSAGE_LEN;
        while !m.is_char_boundary(end) {
            end -= 1;
        }
        m.truncate(end);
    }
    m
}

// ---------------------------------------------------------------------------------------
// Frames

/// The type byte of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameType {
    /// Bytes of a stream (1 to [`MAX_FRAME_DATA`]). Spends byte credit of the stream and one
    /// frame of session credit.
    Data = 0,
    /// Only the header's credit: a grant.
    Window = 1,
    /// Opens a forward stream; payload: the target `host:port`.
    Open = 2,
    /// The device connected the stream's target.
    Accept = 3,
    /// No more data from this side on the stream. On a file stream from the device, payload:
    /// [`FileSummary`] JSON.
    Eof = 4,
    /// The stream is abandoned; payload: [`ResetBody`] JSON.
    Reset = 5,
    /// A terminal's new size; payload: rows and cols, two big-endian u16.
    Resize = 6,
    /// The terminal's shell ended; payload: [`ExitStatus`] JSON.
    Exit = 7,
    /// Session control on stream 0; payload: [`Control`] JSON.
    Control = 8,
}

impl FrameType {
    pub fn from_u8(b: u8) -> Option<FrameType> {
        Some(match b {
            0 => FrameType::Data,
            1 => FrameType::Window,
            2 => FrameType::Open,
            3 => FrameType::Accept,
            4 => FrameType::Eof,
            5 => FrameType::Reset,
            6 => FrameType::Resize,
            7 => FrameType::Exit,
            8 => FrameType::Control,
            _ => return None,
        })
    }
}

/// A frame's header. `credit` is a grant to the receiver of this frame: bytes it may send on
/// `stream`, or with stream 0, DATA frames it may send in the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub kind: FrameType,
    pub stream: u16,
    /// Counts every frame one side sends in a session, from 0.
    pub seq: u32,
    pub credit: u32,
}

/// A decoded frame, borrowing its payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame<'a> {
    pub header: Header,
    pub payload: &'a [u8],
}

/// Why bytes are not a frame, or a frame breaks the flow-control rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameError {
    Short(usize),
    UnknownType(u8),
    Flags(u8),
    TooLong {
        kind: FrameType,
        len: usize,
    },
    Empty,
    WrongStream {
        kind: FrameType,
        stream: u16,
    },
    /// A sequence gap: frames were lost.
    Sequence {
        expected: u32,
        got: u32,
    },
    /// More data than granted (bytes on a stream, or frames in the session).
    Overrun {
        stream: u16,
    },
    /// A grant pushed credit beyond [`MAX_CREDIT`].
    CreditOverflow {
        stream: u16,
    },
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameError::Short(n) => write!(f, "frame of {n} bytes is shorter than its {HEADER_LEN}-byte header"),
            FrameError::UnknownType(t) => write!(f, "unknown frame type {t}"),
            FrameError::Flags(b) => write!(f, "reserved flags byte is {b}, must be 0"),
            FrameError::TooLong { kind, len } => write!(f, "{kind:?} frame payload of {len} bytes is too long"),
            FrameError::Empty => write!(f, "DATA frame without data"),
            FrameError::WrongStream { kind, stream } => write!(f, "{kind:?} frame on stream {stream}"),
            FrameError::Sequence { expected, got } => {
                write!(f, "frame {got} arrived, expected {expected}: frames lost")
            }
            FrameError::Overrun { stream } => write!(f, "peer sent more than it was granted on stream {stream}"),
            FrameError::CreditOverflow { stream } => write!(f, "grant on stream {stream} exceeds {MAX_CREDIT}"),
        }
    }
}

impl std::error::Error for FrameError {}

impl Header {
    pub fn new(kind: FrameType, stream: u16, credit: u32) -> Header {
        Header { kind, stream, seq: 0, credit }
    }

    pub fn write(&self, out: &mut Vec<u8>) {
        out.push(self.kind as u8);
        out.push(0);
        out.extend_from_slice(&self.stream.to_be_bytes());
        out.extend_from_slice(&self.seq.to_be_bytes());
        out.extend_from_slice(&self.credit.to_be_bytes());
    }
}

/// Encodes one frame.
pub fn encode(h: Header, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    h.write(&mut out);
    out.extend_from_slice(payload);
    out
}

/// Decodes one frame and checks its shape (not its sequence or credit: see [`SessionFlow`]).
pub fn decode(buf: &[u8]) -> Result<Frame<'_>, FrameError> {
    if buf.len() < HEADER_LEN {
        return Err(FrameError::Short(buf.len()));
    }
    let kind = FrameType::from_u8(buf[0]).ok_or(FrameError::UnknownType(buf[0]))?;
    if buf[1] != 0 {
        return Err(FrameError::Flags(buf[1]));
    }
    let be32 = |i: usize| u32::from_be_bytes([buf[i], buf[i + 1], buf[i + 2], buf[i + 3]]);
    let header = Header { kind, stream: u16::from_be_bytes([buf[2], buf[3]]), seq: be32(4), credit: be32(8) };
    let payload = &buf[HEADER_LEN..];
    let max = if kind == FrameType::Data { MAX_FRAME_DATA } else { MAX_CONTROL_PAYLOAD };
    if payload.len() > max {
        return Err(FrameError::TooLong { kind, len: payload.len() });
    }
    match kind {
        FrameType::Data if payload.is_empty() => return Err(FrameError::Empty),
        FrameType::Control if header.stream != 0 => {
            return Err(FrameError::WrongStream { kind, stream: header.stream });
        }
        FrameType::Data
        | FrameType::Open
        | FrameType::Accept
        | FrameType::Eof
        | FrameType::Reset
        | FrameType::Resize
        | FrameType::Exit
            if header.stream == 0 =>
        {
            return Err(FrameError::WrongStream { kind, stream: 0 });
        }
        _ => {}
    }
    Ok(Frame { header, payload })
}

/// The payload of a RESIZE frame.
pub fn resize_payload(rows: u16, cols: u16) -> [u8; 4] {
    let [r0, r1] = rows.to_be_bytes();
    let [c0, c1] = cols.to_be_bytes();
    [r0, r1, c0, c1]
}

/// Rows and cols of a RESIZE frame's payload.
pub fn parse_resize(p: &[u8]) -> Option<(u16, u16)> {
    let [r0, r1, c0, c1] = p.try_into().ok()?;
    Some((u16::from_be_bytes([r0, r1]), u16::from_be_bytes([c0, c1])))
}

// ---------------------------------------------------------------------------------------
// Flow control

/// One side's view of a session: sequence numbers both ways and session (frame) credit both
/// ways. Every frame sent takes [`SessionFlow::next_seq`]; every frame received goes through
/// [`SessionFlow::on_frame`] before anything else.
#[derive(Debug, Clone)]
pub struct SessionFlow {
    send_seq: u32,
    recv_seq: u32,
    /// DATA frames this side may still send.
    send_frames: u32,
    /// DATA frames the peer may still send.
    recv_frames: u32,
    /// DATA frames received since the last session grant.
    to_grant: u32,
}

impl Default for SessionFlow {
    fn default() -> Self {
        SessionFlow { send_seq: 0, recv_seq: 0, send_frames: SESSION_FRAMES, recv_frames: SESSION_FRAMES, to_grant: 0 }
    }
}

impl SessionFlow {
    pub fn new() -> Self {
        Self::default()
    }

    /// The sequence number of the next frame to send.
    pub fn next_seq(&mut self) -> u32 {
        let s = self.send_seq;
        self.send_seq = self.send_seq.wrapping_add(1);
        s
    }

    /// Stamps and encodes a frame: the next sequence number goes into the header.
    pub fn encode(&mut self, mut h: Header, payload: &[u8]) -> Vec<u8> {
        h.seq = self.next_seq();
        encode(h, payload)
    }

    /// Whether a DATA frame may go now.
    pub fn can_send_data(&self) -> bool {
        self.send_frames > 0
    }

    /// Records a DATA frame sent.
    pub fn on_data_sent(&mut self) {
        self.send_frames = self.send_frames.saturating_sub(1);
    }

    /// Checks a received frame's sequence number and applies the session-level parts: a
    /// session grant (stream 0 credit) and a DATA frame spending the peer's frame credit.
    pub fn on_frame(&mut self, h: &Header) -> Result<(), FrameError> {
        if h.seq != self.recv_seq {
            return Err(FrameError::Sequence { expected: self.recv_seq, got: h.seq });
        }
        self.recv_seq = self.recv_seq.wrapping_add(1);
        if h.stream == 0 && h.credit > 0 {
            self.send_frames = self.send_frames.saturating_add(h.credit);
            if self.send_frames > MAX_CREDIT {
                return Err(FrameError::CreditOverflow { stream: 0 });
            }
        }
        if h.kind == FrameType::Data {
            if self.recv_frames == 0 {
                return Err(FrameError::Overrun { stream: 0 });
            }
            self.recv_frames -= 1;
            self.to_grant += 1;
        }
        Ok(())
    }

    /// A session grant to send back, once half the initial frame credit has arrived: the
    /// receiver hands DATA frames to its streams as they arrive (their buffers are bounded by
    /// byte credit), so frames are granted back at once.
    pub fn take_grant(&mut self) -> Option<u32> {
        (self.to_grant >= SESSION_FRAMES / 2).then(|| {
            let n = std::mem::take(&mut self.to_grant);
            self.recv_frames += n;
            n
        })
    }
}

/// One stream's byte credit both ways.
#[derive(Debug, Clone)]
pub struct StreamFlow {
    /// Bytes this side may still send.
    send: u32,
    /// Bytes the peer may still send.
    recv: u32,
    /// Bytes received and consumed (written to the PTY, socket or file) but not granted back.
    consumed: u32,
}

impl Default for StreamFlow {
    fn default() -> Self {
        StreamFlow { send: STREAM_WINDOW, recv: STREAM_WINDOW, consumed: 0 }
    }
}

impl StreamFlow {
    pub fn new() -> Self {
        Self::default()
    }

    /// Bytes that may go in the next DATA frame (0: wait for a grant).
    pub fn sendable(&self) -> usize {
        (self.send as usize).min(MAX_FRAME_DATA)
    }

    pub fn on_sent(&mut self, n: usize) {
        self.send = self.send.saturating_sub(n as u32);
    }

    /// A grant from the peer (the header's credit of a frame on this stream).
    pub fn on_credit(&mut self, stream: u16, n: u32) -> Result<(), FrameError> {
        self.send = self.send.saturating_add(n);
        if self.send > MAX_CREDIT {
            return Err(FrameError::CreditOverflow { stream });
        }
        Ok(())
    }

    /// DATA of `n` bytes arrived: the peer spends its credit.
    pub fn on_received(&mut self, stream: u16, n: usize) -> Result<(), FrameError> {
        let n = u32::try_from(n).map_err(|_| FrameError::Overrun { stream })?;
        if n > self.recv {
            return Err(FrameError::Overrun { stream });
        }
        self.recv -= n;
        Ok(())
    }

    /// `n` received bytes left this side (written out); they may be granted back.
    pub fn on_consumed(&mut self, n: usize) {
        self.consumed = self.consumed.saturating_add(n as u32);
    }

    /// A grant to send, once a quarter of the window has been consumed (or with `flush`,
    /// whatever was consumed).
    pub fn take_grant(&mut self, flush: bool) -> Option<u32> {
        let due = self.consumed >= STREAM_WINDOW / 4 || (flush && self.consumed > 0);
        due.then(|| {
            let n = std::mem::take(&mut self.consumed);
            self.recv += n;
            n
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The examples in docs/protocol.md, verbatim.
    #[test]
    fn documented_examples_round_trip() {
        let examples = [
            r#"{"v":1,"op":"open","session":"s-7f3a9c","kind":"terminal","terminal":{"rows":24,"cols":80,"term":"xterm-256color"},"idle_timeout_s":900,"max_duration_s":14400}"#,
            r#"{"v":1,"op":"open","session":"s-7f3a9d","kind":"files","file":{"direction":"upload","path":"/var/lib/app/config.json","size":1432,"sha256":"9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08","mode":420}}"#,
            r#"{"v":1,"op":"open","session":"s-7f3a9e","kind":"files","file":{"direction":"download","path":"/var/log/app.log"}}"#,
            r#"{"v":1,"op":"open","session":"s-7f3a9f","kind":"forward","target":"127.0.0.1:80"}"#,
            r#"{"v":1,"op":"close","session":"s-7f3a9c"}"#,
        ];
        for e in examples {
            let c: RemoteCommand = serde_json::from_str(e).unwrap();
            assert_eq!(c.check(), Ok(()), "{e}");
            assert_eq!(serde_json::to_string(&c).unwrap(), e);
        }
        let controls = [
            r#"{"v":1,"op":"ready"}"#,
            r#"{"v":1,"op":"ready","size":52428800}"#,
            r#"{"v":1,"op":"refused","reason":"disabled","message":"terminal sessions are switched off on this device"}"#,
            r#"{"v":1,"op":"close","reason":"closed"}"#,
            r#"{"v":1,"op":"close","reason":"idle-timeout","bytes_down":1200,"bytes_up":98000}"#,
        ];
        for e in controls {
            let c: Control = serde_json::from_str(e).unwrap();
            assert_eq!(serde_json::to_string(&c).unwrap(), e);
        }
        let reset = r#"{"reason":"connect-failed","message":"127.0.0.1:8080: connection refused"}"#;
        let r: ResetBody = serde_json::from_str(reset).unwrap();
        assert_eq!(r.reason, Reason::ConnectFailed);
        assert_eq!(serde_json::to_string(&r).unwrap(), reset);
        let exit = r#"{"code":0}"#;
        assert_eq!(serde_json::to_string(&serde_json::from_str::<ExitStatus>(exit).unwrap()).unwrap(), exit);
        // The documented header example: DATA on stream 3, frame 7, granting 65536 bytes.
        let f = encode(Header { kind: FrameType::Data, stream: 3, seq: 7, credit: 65536 }, b"hi");
        assert_eq!(f, [0, 0, 0, 3, 0, 0, 0, 7, 0, 1, 0, 0, b'h', b'i']);
    }

    #[test]
    fn every_reason_serializes_as_its_name() {
        use Reason::*;
        for r in [
            Disabled,
            PathNotAllowed,
            TooLarge,
            Busy,
            BadRequest,
            UserNotAllowed,
            TargetNotAllowed,
            NotFound,
            ConnectFailed,
            HashMismatch,
            SizeMismatch,
            IoError,
            IdleTimeout,
            MaxDuration,
            Closed,
            Exited,
            ProtocolError,
            Shutdown,
            UnsupportedVersion,
        ] {
            assert_eq!(serde_json::to_string(&r).unwrap(), format!("\"{r}\""));
        }
    }

    #[test]
    fn topics() {
        let d = session_topic("dev-1", "s_1", Direction::Down);
        assert_eq!(d, "drover/v1/d/dev-1/rs/s_1/d");
        assert_eq!(parse_session_topic(&d), Some(("dev-1", "s_1", Direction::Down)));
        assert_eq!(parse_session_topic("drover/v1/d/dev-1/rs/s_1/u"), Some(("dev-1", "s_1", Direction::Up)));
        assert_eq!(device_sessions_filter("dev-1"), "drover/v1/d/dev-1/rs/+/d");
        // Bad input: wrong direction letter, a wildcard session, a bad device id, extra levels.
        for bad in [
            "drover/v1/d/dev-1/rs/s_1/x",
            "drover/v1/d/dev-1/rs/+/d",
            "drover/v1/d/DEV/rs/s/d",
            "drover/v1/d/dev-1/rs/a/b/d",
            "drover/v1/d/dev-1/up/status",
        ] {
            assert_eq!(parse_session_topic(bad), None, "{bad}");
        }
        assert!(valid_session_id("0193f2c4-7e1a_x"));
        for bad in ["", "a/b", "a+", "#", "a b", &"x".repeat(65)] {
            assert!(!valid_session_id(bad), "{bad}");
        }
    }

    /// Bad input: each kind without its parameters, out-of-range sizes, odd TERM, relative and
    /// dotted paths, uploads without size or hash, bad targets, a bad session id.
    #[test]
    fn commands_are_checked() {
        let t = TerminalParams { rows: 24, cols: 80, term: "xterm".into() };
        assert_eq!(RemoteCommand::open_terminal("s", t.clone()).check(), Ok(()));
        let mut c = RemoteCommand::open_terminal("s", TerminalParams { rows: 0, ..t.clone() });
        assert!(c.check().unwrap_err().contains("rows"));
        c.terminal = Some(TerminalParams { term: "x;rm".into(), ..t.clone() });
        assert!(c.check().unwrap_err().contains("term"));
        c.terminal = None;
        assert!(c.check().is_err());
        assert!(RemoteCommand::open_terminal("bad/id", t).check().unwrap_err().contains("session"));
        let up = FileParams {
            direction: FileDirection::Upload,
            path: "/tmp/x".into(),
            size: Some(3),
            sha256: Some("a".repeat(64)),
            mode: None,
        };
        assert_eq!(RemoteCommand::open_files("s", up.clone()).check(), Ok(()));
        for p in ["tmp/x", "/tmp/../etc/passwd", "/tmp/./x", "/tmp//x", "/", "/tmp/", "/a\0b"] {
            let c = RemoteCommand::open_files("s", FileParams { path: p.into(), ..up.clone() });
            assert!(c.check().unwrap_err().contains("path"), "{p}");
        }
        assert!(RemoteCommand::open_files("s", FileParams { size: None, ..up.clone() }).check().is_err());
        assert!(
            RemoteCommand::open_files("s", FileParams { sha256: Some("AB".into()), ..up.clone() }).check().is_err()
        );
        assert!(RemoteCommand::open_files("s", FileParams { mode: Some(0o10000), ..up.clone() }).check().is_err());
        let down = FileParams {
            direction: FileDirection::Download,
            path: "/var/log/x".into(),
            size: None,
            sha256: None,
            mode: None,
        };
        assert_eq!(RemoteCommand::open_files("s", down).check(), Ok(()));
        assert_eq!(RemoteCommand::open_forward("s", None).check(), Ok(()));
        for bad in ["localhost", "localhost:0", "localhost:99999", "a b:1", ":80", "[zz]:1", "h:-1"] {
            assert!(RemoteCommand::open_forward("s", Some(bad)).check().is_err(), "{bad}");
        }
        let mut open = RemoteCommand::close("s");
        open.op = Op::Open;
        assert!(open.check().unwrap_err().contains("kind"));
    }

    #[test]
    fn targets_and_allow_lists() {
        let t = Target::parse("127.0.0.1:80").unwrap();
        assert_eq!((t.host, t.port), ("127.0.0.1", 80));
        let v6 = Target::parse("[::1]:22").unwrap();
        assert_eq!((v6.host, v6.port), ("::1", 22));
        let allow = ["127.0.0.1:80", "localhost:*", "[::1]:22"];
        assert!(t.allowed_by(&allow));
        assert!(v6.allowed_by(&allow));
        assert!(Target::parse("LocalHost:8080").unwrap().allowed_by(&allow));
        assert!(!Target::parse("127.0.0.1:81").unwrap().allowed_by(&allow));
        assert!(!Target::parse("10.0.0.1:80").unwrap().allowed_by(&allow));
        assert!(!Target::parse("[::1]:23").unwrap().allowed_by(&allow));
        assert!(!t.allowed_by::<&str>(&[]));
    }

    /// Bad input: short buffers, unknown types, flags set, oversized payloads, empty DATA,
    /// CONTROL off stream 0 and stream frames on stream 0.
    #[test]
    fn frame_codec() {
        let h = Header { kind: FrameType::Control, stream: 0, seq: 5, credit: 16 };
        let bytes = encode(h, br#"{"v":1,"op":"ready"}"#);
        let f = decode(&bytes).unwrap();
        assert_eq!(f.header, h);
        assert_eq!(f.payload, br#"{"v":1,"op":"ready"}"#);
        let big = vec![7u8; MAX_FRAME_DATA];
        let d = encode(Header::new(FrameType::Data, 9, 0), &big);
        assert_eq!(decode(&d).unwrap().payload.len(), MAX_FRAME_DATA);

        assert_eq!(decode(&bytes[..11]), Err(FrameError::Short(11)));
        let mut b = bytes.clone();
        b[0] = 9;
        assert_eq!(decode(&b), Err(FrameError::UnknownType(9)));
        let mut b = bytes.clone();
        b[1] = 1;
        assert_eq!(decode(&b), Err(FrameError::Flags(1)));
        let too_big = encode(Header::new(FrameType::Data, 1, 0), &vec![0; MAX_FRAME_DATA + 1]);
        assert!(matches!(decode(&too_big), Err(FrameError::TooLong { .. })));
        let too_big = encode(Header::new(FrameType::Reset, 1, 0), &vec![b'x'; MAX_CONTROL_PAYLOAD + 1]);
        assert!(matches!(decode(&too_big), Err(FrameError::TooLong { .. })));
        assert_eq!(decode(&encode(Header::new(FrameType::Data, 1, 0), b"")), Err(FrameError::Empty));
        assert!(matches!(
            decode(&encode(Header::new(FrameType::Control, 1, 0), b"{}")),
            Err(FrameError::WrongStream { .. })
        ));
        for k in [FrameType::Data, FrameType::Open, FrameType::Eof, FrameType::Resize] {
            assert!(
                matches!(decode(&encode(Header::new(k, 0, 0), b"x")), Err(FrameError::WrongStream { .. })),
                "{k:?}"
            );
        }
        // A WINDOW on stream 0 (a session grant) is fine.
        assert!(decode(&encode(Header::new(FrameType::Window, 0, 16), b"")).is_ok());
        assert_eq!(parse_resize(&resize_payload(50, 132)), Some((50, 132)));
        assert_eq!(parse_resize(b"abc"), None);
    }

    /// A sender that keeps to its grants never overruns; frame credit returns as frames
    /// arrive; a lost frame and an overrun are caught.
    #[test]
    fn session_flow() {
        let mut tx = SessionFlow::new();
        let mut rx = SessionFlow::new();
        let mut sent = 0;
        // Send as long as credit allows, without the receiver granting anything.
        while tx.can_send_data() {
            let b = tx.encode(Header::new(FrameType::Data, 1, 0), b"x");
            tx.on_data_sent();
            rx.on_frame(&decode(&b).unwrap().header).unwrap();
            sent += 1;
        }
        assert_eq!(sent, SESSION_FRAMES);
        // The receiver granted back (half the window at a time); the grant lets the sender on.
        let mut rx2 = SessionFlow::new();
        let mut granted = 0;
        for i in 0..SESSION_FRAMES {
            rx2.on_frame(&Header { kind: FrameType::Data, stream: 1, seq: i, credit: 0 }).unwrap();
            if let Some(g) = rx2.take_grant() {
                granted += g;
            }
        }
        assert_eq!(granted, SESSION_FRAMES);
        let g = Header { kind: FrameType::Window, stream: 0, seq: tx.recv_seq, credit: granted };
        tx.on_frame(&g).unwrap();
        assert!(tx.can_send_data());

        // Overrun: one DATA frame more than granted.
        let mut rx = SessionFlow::new();
        for i in 0..SESSION_FRAMES {
            rx.on_frame(&Header { kind: FrameType::Data, stream: 1, seq: i, credit: 0 }).unwrap();
        }
        let over = Header { kind: FrameType::Data, stream: 1, seq: SESSION_FRAMES, credit: 0 };
        assert_eq!(rx.on_frame(&over), Err(FrameError::Overrun { stream: 0 }));
        // A gap.
        let mut rx = SessionFlow::new();
        let h = Header { kind: FrameType::Window, stream: 1, seq: 1, credit: 0 };
        assert_eq!(rx.on_frame(&h), Err(FrameError::Sequence { expected: 0, got: 1 }));
        // A grant beyond the cap.
        let mut rx = SessionFlow::new();
        let h = Header { kind: FrameType::Window, stream: 0, seq: 0, credit: MAX_CREDIT };
        assert_eq!(rx.on_frame(&h), Err(FrameError::CreditOverflow { stream: 0 }));
    }

    #[test]
    fn stream_flow() {
        let mut tx = StreamFlow::new();
        let mut rx = StreamFlow::new();
        let mut in_flight = 0usize;
        // The sender fills the window; the receiver holds it all (a slow reader).
        loop {
            let n = tx.sendable();
            if n == 0 {
                break;
            }
            tx.on_sent(n);
            rx.on_received(1, n).unwrap();
            in_flight += n;
        }
        assert_eq!(in_flight, STREAM_WINDOW as usize);
        assert_eq!(rx.on_received(1, 1), Err(FrameError::Overrun { stream: 1 }));
        // Nothing consumed: nothing to grant, even flushed.
        assert_eq!(rx.take_grant(true), None);
        // Less than a quarter consumed: held back unless flushed.
        rx.on_consumed(1000);
        assert_eq!(rx.take_grant(false), None);
        assert_eq!(rx.take_grant(true), Some(1000));
        rx.on_consumed(STREAM_WINDOW as usize / 4);
        let g = rx.take_grant(false).unwrap();
        tx.on_credit(1, g).unwrap();
        assert_eq!(tx.sendable(), (g as usize).min(MAX_FRAME_DATA));
        assert!(tx.on_credit(1, MAX_CREDIT).is_err());
    }
}
