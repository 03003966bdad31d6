//! The operator's side of remote access: what travels on the WebSockets droverd serves at
//! `/api/v1/devices/{id}/terminal`, `…/files` and `…/forward` (`docs/remote-access.md`).
//!
//! Binary frames carry bytes; text frames carry one JSON [`Control`] each. On the `forward`
//! socket every binary frame starts with a 5-byte header ([`MuxFrame`]): the TCP connection
//! it belongs to and what it is.

use serde::{Deserialize, Serialize};

/// A JSON text frame on an operator WebSocket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Control {
    /// Client → server (terminal): the window's new size.
    Resize { cols: u16, rows: u16 },
    /// Server → client: the device accepted the session; bytes may flow.
    Opened { session: String },
    /// Server → client (terminal): the remote command ended with this status; the socket closes.
    Exit { code: i32 },
    /// Server → client: the session failed or was refused; the socket closes. `code` is
    /// stable (`refused`, `disabled`, `not_allowed`, `timeout`, `device`, `offline`, …).
    Error { code: String, message: String },
    /// Server → client (download): the file's size, before its bytes.
    Meta { size: u64 },
    /// Client → server (upload): every byte was sent.
    Eof,
    /// Server → client: the transfer is complete — for an upload, the file is in place on
    /// the device (renamed after its SHA-256 matched); for a download, every byte was sent.
    Done { size: u64, sha256: String },
}

impl Control {
    pub fn to_text(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// What a [`MuxFrame`] on the `forward` socket is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum MuxKind {
    /// Client → server: a new TCP connection to the session's target; no payload.
    Open = 1,
    /// Either way: bytes of the connection.
    Data = 2,
    /// Either way: this side will send no more (half close); no payload.
    Eof = 3,
    /// Either way: the connection is gone; the payload is a UTF-8 reason.
    Reset = 4,
    /// Either way: the receiver grants the sender this many more bytes of `Data` on the
    /// connection (payload: u32 big-endian). A sender never has more ungranted bytes in
    /// flight; each connection starts with [`INITIAL_CREDIT`].
    Credit = 5,
}

/// Bytes each side may send on a new forwarded connection before the first grant.
pub const INITIAL_CREDIT: u32 = 256 * 1024;

/// Largest payload of one `Data` frame on an operator socket.
pub const MAX_DATA: usize = 32 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MuxFrame<'a> {
    pub stream: u32,
    pub kind: MuxKind,
    pub payload: &'a [u8],
}

impl MuxFrame<'_> {
    pub fn encode(stream: u32, kind: MuxKind, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(5 + payload.len());
        out.extend_from_slice(&stream.to_be_bytes());
        out.push(kind as u8);
        out.extend_from_slice(payload);
        out
    }

    pub fn credit(stream: u32, bytes: u32) -> Vec<u8> {
        MuxFrame::encode(stream, MuxKind::Credit, &bytes.to_be_bytes())
    }

    /// A frame, or `None` for a malformed one (too short, unknown kind, a bad credit).
    pub fn decode(b: &[u8]) -> Option<MuxFrame<'_>> {
        if b.len() < 5 {
            return None;
        }
        let stream = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        let kind = match b[4] {
            1 => MuxKind::Open,
            2 => MuxKind::Data,
            3 => MuxKind::Eof,
            4 => MuxKind::Reset,
            5 => MuxKind::Credit,
            _ => return None,
        };
        let payload = &b[5..];
        if kind == MuxKind::Credit && payload.len() != 4 {
            return None;
        }
        Some(MuxFrame { stream, kind, payload })
    }

    /// The grant of a `Credit` frame.
    pub fn credit_bytes(&self) -> u32 {
        match self.payload {
            [a, b, c, d] => u32::from_be_bytes([*a, *b, *c, *d]),
            _ => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_frames_are_tagged_json() {
        assert_eq!(Control::Resize { cols: 80, rows: 24 }.to_text(), r#"{"type":"resize","cols":80,"rows":24}"#);
        let c: Control = serde_json::from_str(r#"{"type":"exit","code":3}"#).unwrap();
        assert_eq!(c, Control::Exit { code: 3 });
        // Tried: an unknown type, a missing field.
        assert!(serde_json::from_str::<Control>(r#"{"type":"launch"}"#).is_err());
        assert!(serde_json::from_str::<Control>(r#"{"type":"resize","cols":80}"#).is_err());
    }

    #[test]
    fn mux_frames_round_trip_and_bad_ones_are_refused() {
        let f = MuxFrame::encode(7, MuxKind::Data, b"hi");
        assert_eq!(MuxFrame::decode(&f), Some(MuxFrame { stream: 7, kind: MuxKind::Data, payload: b"hi" }));
        let c = MuxFrame::credit(1, 65536);
        assert_eq!(MuxFrame::decode(&c).unwrap().credit_bytes(), 65536);
        // Tried: too short, an unknown kind, a credit without its 4 bytes.
        assert_eq!(MuxFrame::decode(&[0, 0, 0]), None);
        assert_eq!(MuxFrame::decode(&[0, 0, 0, 1, 9]), None);
        assert_eq!(MuxFrame::decode(&[0, 0, 0, 1, 5, 1]), None);
    }
}
