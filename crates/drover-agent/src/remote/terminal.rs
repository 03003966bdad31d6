//! A terminal session: the user's login shell on a new PTY, in its own session with the PTY
//! as controlling terminal, as the user `[remote] user` names.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::process::Stdio;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use drover_proto::remote::{Control, ExitStatus, FrameType, MAIN_STREAM, Reason, TerminalParams, parse_resize};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;

use super::stream::{Pump, PumpEnd};
use super::{End, Shared, StreamIn, io_end, refusal, sys};
use crate::config::RemoteConfig;

pub(crate) struct Terminal {
    params: TerminalParams,
    user: sys::User,
    /// The agent runs as root and the shell as another user.
    switch: bool,
    /// `HOME` and the working directory: `[remote]`'s `home` if set, else the user's home.
    home: std::path::PathBuf,
}

/// Resolves the configured user and decides whether the agent may start a shell as it.
pub(crate) fn check(cfg: &RemoteConfig, params: TerminalParams) -> Result<Terminal, Control> {
    let who = cfg.user.as_deref().unwrap_or("the agent's own user");
    let user = match sys::lookup_user(cfg.user.as_deref()) {
        Ok(Some(u)) => u,
        Ok(None) => return Err(refusal(Reason::UserNotAllowed, format!("no user {who} on this device"))),
        Err(e) => return Err(refusal(Reason::IoError, format!("looking up {who}: {e}"))),
    };
    if user.uid == 0 && !cfg.allow_root {
        return Err(refusal(
            Reason::UserNotAllowed,
            format!("the terminal user {} is root and [remote] allow_root is false", user.name),
        ));
    }
    let me = sys::euid();
    if user.uid != me && me != 0 {
        return Err(refusal(
            Reason::UserNotAllowed,
            format!("the agent runs as uid {me} and cannot start a shell as {}", user.name),
        ));
    }
    let home = cfg.home.clone().unwrap_or_else(|| user.home.clone());
    Ok(Terminal { params, switch: user.uid != me, user, home })
}

/// Hangs up the shell's process group unless it has been reaped.
struct Hangup(Option<u32>);

impl Drop for Hangup {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            sys::kill_group(pid, libc::SIGHUP);
            sys::kill_group(pid, libc::SIGCONT);
        }
    }
}

impl Terminal {
    pub(crate) async fn run(self, sh: &Shared, mut rx: mpsc::UnboundedReceiver<StreamIn>) -> End {
        let (master, slave) = match sys::open_pty(self.params.rows, self.params.cols) {
            Ok(p) => p,
            Err(e) => return io_end("opening a PTY", &e),
        };
        let u = &self.user;
        let name = u.shell.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "sh".into());
        let mut cmd = tokio::process::Command::new(&u.shell);
        cmd.arg0(format!("-{name}"))
            .env_clear()
            .env("TERM", &self.params.term)
            .env("HOME", &self.home)
            .env("USER", &u.name)
            .env("LOGNAME", &u.name)
            .env("SHELL", &u.shell)
            .env("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
            .current_dir(if self.home.is_dir() { self.home.as_path() } else { std::path::Path::new("/") });
        if let Ok(lang) = std::env::var("LANG") {
            cmd.env("LANG", lang);
        }
        let stdio = || slave.try_clone().map(Stdio::from);
        match (stdio(), stdio(), stdio()) {
            (Ok(i), Ok(o), Ok(e)) => cmd.stdin(i).stdout(o).stderr(e),
            _ => return (Reason::IoError, "cannot duplicate the PTY".into()),
        };
        sys::in_new_session(&mut cmd, self.switch.then(|| (u.uid, u.gid, u.groups.clone())));
        let child = cmd.spawn();
        // The shell holds the only copies of the slave from here: its end is the master's EOF.
        drop(cmd);
        drop(slave);
        let mut child = match child {
            Ok(c) => c,
            Err(e) => return io_end(&format!("starting {}", u.shell.display()), &e),
        };
        let mut hangup = Hangup(child.id());
        tracing::info!(user = %u.name, shell = %u.shell.display(), pid = ?child.id(), "remote access: terminal started");
        let raw = master.as_raw_fd();
        let fd = match sys::async_fd(File::from(master)) {
            Ok(fd) => fd,
            Err(e) => return io_end("watching the PTY", &e),
        };
        let pump = Pump { link: &sh.link, id: MAIN_STREAM, read_end_finishes: true };
        let mut resize = |m: &StreamIn| {
            if m.kind == FrameType::Resize
                && let Some((rows, cols)) = parse_resize(&m.payload)
                && drover_proto::remote::check_size(rows, cols).is_ok()
                && let Err(e) = sys::set_size(raw, rows, cols)
            {
                tracing::warn!("remote access: resizing the terminal: {e}");
            }
        };
        let (mut r, mut w) = (PtyRef(&fd), PtyRef(&fd));
        let run = pump.run(&mut rx, &mut r, &mut w, &mut resize);
        tokio::pin!(run);
        let status = tokio::select! {
            end = &mut run => {
                match end {
                    PumpEnd::Done => {}
                    PumpEnd::Peer => return (Reason::Closed, String::new()),
                    PumpEnd::Failed(e) => return e,
                }
                // The output is over; the shell is exiting (or a child of it held the PTY).
                match tokio::time::timeout(Duration::from_secs(5), child.wait()).await {
                    Ok(s) => s,
                    Err(_) => return (Reason::Exited, "the terminal closed; the shell did not exit".into()),
                }
            }
            s = child.wait() => {
                // Whatever the shell wrote last is still in the PTY: send it first.
                let _ = tokio::time::timeout(Duration::from_millis(500), &mut run).await;
                s
            }
        };
        hangup.0 = None;
        let exit = match status {
            Ok(s) => {
                use std::os::unix::process::ExitStatusExt;
                ExitStatus { code: s.code(), signal: s.signal() }
            }
            Err(e) => return io_end("waiting for the shell", &e),
        };
        tracing::info!(code = ?exit.code, signal = ?exit.signal, "remote access: terminal ended");
        sh.link.send_json(FrameType::Exit, MAIN_STREAM, &exit).await;
        (Reason::Exited, String::new())
    }
}

/// The PTY's master as tokio reader and writer.
struct PtyRef<'a>(&'a AsyncFd<File>);

impl AsyncRead for PtyRef<'_> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.0.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            match guard.try_io(|f| f.get_ref().read(unfilled)) {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for PtyRef<'_> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = ready!(self.0.poll_write_ready(cx))?;
            match guard.try_io(|f| f.get_ref().write(data)) {
                Ok(r) => return Poll::Ready(r),
                Err(_would_block) => continue,
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    /// The peer's EOF: a terminal has no half-close; the shell sees Ctrl-D if it wants one.
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
