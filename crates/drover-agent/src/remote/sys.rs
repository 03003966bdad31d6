//! The few system calls remote access needs that std does not wrap: a PTY pair, its size, the
//! controlling terminal of a new session, switching to the terminal's user, and the user
//! database. The only module of the agent with `unsafe` code; each block is one libc call on
//! values it owns.
#![allow(unsafe_code)]

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r == -1 { Err(io::Error::last_os_error()) } else { Ok(r) }
}

fn winsize(rows: u16, cols: u16) -> libc::winsize {
    libc::winsize { ws_row: rows, ws_col: cols, ws_xpixel: 0, ws_ypixel: 0 }
}

/// A new PTY pair of the given size: (master, slave), both close-on-exec, the master
/// non-blocking.
pub fn open_pty(rows: u16, cols: u16) -> io::Result<(OwnedFd, OwnedFd)> {
    let (mut m, mut s) = (-1, -1);
    let ws = winsize(rows, cols);
    // SAFETY: openpty writes two fds into m and s; name, termios may be null.
    cvt(unsafe { libc::openpty(&mut m, &mut s, std::ptr::null_mut(), std::ptr::null(), &ws) })?;
    // SAFETY: openpty succeeded, so both are open fds that nothing else owns.
    let (m, s) = unsafe { (OwnedFd::from_raw_fd(m), OwnedFd::from_raw_fd(s)) };
    for fd in [m.as_raw_fd(), s.as_raw_fd()] {
        // SAFETY: fcntl on an fd we own.
        cvt(unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) })?;
    }
    // SAFETY: as above.
    let fl = cvt(unsafe { libc::fcntl(m.as_raw_fd(), libc::F_GETFL) })?;
    // SAFETY: as above.
    cvt(unsafe { libc::fcntl(m.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK) })?;
    Ok((m, s))
}

/// TIOCSWINSZ: the terminal's new size; the foreground process group gets SIGWINCH.
pub fn set_size(master: RawFd, rows: u16, cols: u16) -> io::Result<()> {
    let ws = winsize(rows, cols);
    // SAFETY: TIOCSWINSZ reads a winsize we pass by reference.
    cvt(unsafe { libc::ioctl(master, libc::TIOCSWINSZ, &ws) }).map(drop)
}

/// A user to run the terminal as.
#[derive(Debug, Clone)]
pub struct User {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
    pub shell: PathBuf,
    /// Supplementary groups, looked up before the fork (the child may not read files).
    pub groups: Vec<libc::gid_t>,
}

/// The user named `name`, or with `None` the user the agent runs as. `Ok(None)`: no such user.
pub fn lookup_user(name: Option<&str>) -> io::Result<Option<User>> {
    // SAFETY: a passwd is plain data; getpw*_r fill it with pointers into `buf`.
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    let mut out: *mut libc::passwd = std::ptr::null_mut();
    let cname = name.map(CString::new).transpose().map_err(io::Error::other)?;
    // SAFETY: every pointer is valid for the call; `buf` outlives the use of `pw`'s fields.
    let r = unsafe {
        match &cname {
            Some(n) => libc::getpwnam_r(n.as_ptr(), &mut pw, buf.as_mut_ptr(), buf.len(), &mut out),
            None => libc::getpwuid_r(libc::geteuid(), &mut pw, buf.as_mut_ptr(), buf.len(), &mut out),
        }
    };
    if r != 0 {
        return Err(io::Error::from_raw_os_error(r));
    }
    if out.is_null() {
        return Ok(None);
    }
    // SAFETY: on success the fields point at NUL-terminated strings inside `buf`.
    let s = |p: *const libc::c_char| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned();
    let user_name = s(pw.pw_name);
    let cuser = CString::new(user_name.clone()).map_err(io::Error::other)?;
    let mut groups = vec![0 as libc::gid_t; 64];
    loop {
        let mut n = groups.len() as libc::c_int;
        // SAFETY: getgrouplist writes at most n gids and sets n.
        let r = unsafe { libc::getgrouplist(cuser.as_ptr(), pw.pw_gid, groups.as_mut_ptr(), &mut n) };
        if r >= 0 {
            groups.truncate(n.max(0) as usize);
            break;
        }
        if groups.len() >= 65536 {
            groups = vec![pw.pw_gid];
            break;
        }
        groups.resize((n.max(0) as usize).max(groups.len() * 2), 0);
    }
    let shell = s(pw.pw_shell);
    Ok(Some(User {
        name: user_name,
        uid: pw.pw_uid,
        gid: pw.pw_gid,
        home: s(pw.pw_dir).into(),
        shell: if shell.is_empty() { "/bin/sh".into() } else { shell.into() },
        groups,
    }))
}

pub fn euid() -> u32 {
    // SAFETY: no arguments, cannot fail.
    unsafe { libc::geteuid() }
}

/// Runs in the forked child before exec (stdin/out/err are the PTY's slave already): a new
/// session with the PTY as its controlling terminal, then the user's groups, group and user.
/// Only async-signal-safe calls: everything was looked up before the fork.
pub fn child_setup(user: Option<(u32, u32, Vec<libc::gid_t>)>) -> impl FnMut() -> io::Result<()> + Send + Sync {
    move || {
        // SAFETY: setsid and ioctl on fd 0 have no memory arguments.
        unsafe {
            cvt(libc::setsid())?;
            cvt(libc::ioctl(0, libc::TIOCSCTTY as _, 0))?;
        }
        if let Some((uid, gid, groups)) = &user {
            // SAFETY: setgroups reads `groups.len()` gids from a live Vec.
            unsafe {
                cvt(libc::setgroups(groups.len() as _, groups.as_ptr()))?;
                cvt(libc::setgid(*gid))?;
                cvt(libc::setuid(*uid))?;
            }
        }
        Ok(())
    }
}

/// Sends `sig` to the process group `pgid` (the terminal's shell leads its own).
pub fn kill_group(pgid: u32, sig: libc::c_int) {
    // SAFETY: kill has no memory arguments; a vanished group is ESRCH, ignored.
    unsafe {
        libc::kill(-(pgid as libc::pid_t), sig);
    }
}

/// Makes `cmd` start its child in a new session with the PTY (its stdin) as controlling
/// terminal, as `user` (uid, gid, supplementary groups) when given.
pub fn in_new_session(cmd: &mut tokio::process::Command, user: Option<(u32, u32, Vec<libc::gid_t>)>) {
    // SAFETY: the closure makes only async-signal-safe calls (see `child_setup`).
    unsafe {
        cmd.pre_exec(child_setup(user));
    }
}

/// Registers the PTY's master with tokio's reactor.
pub fn async_fd(f: std::fs::File) -> io::Result<tokio::io::unix::AsyncFd<std::fs::File>> {
    // SAFETY: the AsyncFd owns the File, so the fd stays open for as long as it is registered.
    unsafe { tokio::io::unix::AsyncFd::register(f) }.map_err(|e| e.into_parts().1)
}
