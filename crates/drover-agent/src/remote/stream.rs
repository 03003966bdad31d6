//! One byte stream between a local reader/writer (the PTY, a TCP connection) and the peer,
//! under stream credit: read only what the peer granted, grant back only what left the
//! local buffer, so a slow reader at either end holds memory to one window.

use std::collections::VecDeque;

use bytes::Bytes;
use drover_proto::remote::{FrameType, MAX_FRAME_DATA, Reason, ResetBody, StreamFlow};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use super::{End, Link, StreamIn};

pub(crate) struct Pump<'a> {
    pub link: &'a Link,
    pub id: u16,
    /// The local reader's end is the stream's end (a terminal: the shell's output is over);
    /// otherwise it is a half-close (EOF) and the stream goes on until the peer's EOF.
    pub read_end_finishes: bool,
}

/// How a pump ended.
pub(crate) enum PumpEnd {
    /// Both ways finished (or the reader's end, with `read_end_finishes`).
    Done,
    /// The peer reset the stream, or the session is going away.
    Peer,
    /// A local failure or a protocol error; a RESET was sent.
    Failed(End),
}

impl Pump<'_> {
    /// Reader and writer are trait objects: one copy of this code serves the PTY and TCP.
    pub async fn run(
        &self,
        rx: &mut mpsc::UnboundedReceiver<StreamIn>,
        r: &mut (dyn AsyncRead + Unpin + Send),
        w: &mut (dyn AsyncWrite + Unpin + Send),
        other: &mut (dyn FnMut(&StreamIn) + Send),
    ) -> PumpEnd {
        let mut flow = StreamFlow::new();
        let mut inbox: VecDeque<Bytes> = VecDeque::new();
        let (mut peer_eof, mut read_done, mut shut) = (false, false, false);
        let mut buf = vec![0u8; MAX_FRAME_DATA];
        loop {
            if peer_eof && inbox.is_empty() && !shut {
                let _ = w.shutdown().await;
                shut = true;
            }
            if read_done && (shut || self.read_end_finishes) {
                return PumpEnd::Done;
            }
            let n = flow.sendable();
            tokio::select! {
                m = rx.recv() => {
                    let Some(m) = m else { return PumpEnd::Peer };
                    if let Err(e) = flow.on_credit(self.id, m.credit) {
                        return self.fail(Reason::ProtocolError, e.to_string()).await;
                    }
                    match m.kind {
                        FrameType::Data => {
                            if peer_eof {
                                return self.fail(Reason::ProtocolError, "DATA after EOF".into()).await;
                            }
                            if let Err(e) = flow.on_received(self.id, m.payload.len()) {
                                return self.fail(Reason::ProtocolError, e.to_string()).await;
                            }
                            inbox.push_back(m.payload);
                        }
                        FrameType::Eof => peer_eof = true,
                        FrameType::Reset => return PumpEnd::Peer,
                        _ => other(&m),
                    }
                }
                res = r.read(&mut buf[..n]), if !read_done && n > 0 => match res {
                    Ok(0) => {
                        read_done = true;
                        if !self.read_end_finishes {
                            self.link.send(FrameType::Eof, self.id, flow.take_grant(true).unwrap_or(0), &[]).await;
                        }
                    }
                    Ok(k) => {
                        flow.on_sent(k);
                        self.link.send_data(self.id, flow.take_grant(true).unwrap_or(0), &buf[..k]).await;
                    }
                    // A PTY's master reads EIO once every holder of the slave has gone.
                    Err(e) if e.raw_os_error() == Some(libc::EIO) => read_done = true,
                    Err(e) => return self.fail(Reason::IoError, format!("read: {e}")).await,
                },
                res = w.write(inbox.front().map_or(&[][..], |b| &b[..])), if !inbox.is_empty() => match res {
                    Ok(k) => {
                        if let Some(front) = inbox.front_mut() {
                            if k >= front.len() {
                                inbox.pop_front();
                            } else {
                                let _ = front.split_to(k);
                            }
                        }
                        flow.on_consumed(k);
                        if let Some(g) = flow.take_grant(false) {
                            self.link.send(FrameType::Window, self.id, g, &[]).await;
                        }
                    }
                    Err(e) => return self.fail(Reason::IoError, format!("write: {e}")).await,
                },
            }
        }
    }

    async fn fail(&self, reason: Reason, message: String) -> PumpEnd {
        let body = ResetBody { reason, message: Some(drover_proto::remote::clip(message.clone())) };
        self.link.send_json(FrameType::Reset, self.id, &body).await;
        PumpEnd::Failed((reason, message))
    }
}
