//! Running hooks, update modules, the health check and the reboot command: blocking, with a
//! time limit, output captured (the last 64 KiB of each stream).

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Kept of each of stdout and stderr.
const KEEP: usize = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    /// The exit code; `None` when killed by a signal or the time limit.
    pub code: Option<i32>,
    pub timed_out: bool,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    /// "exit status 3", "killed after 10 s", "killed by a signal".
    pub fn describe(&self, limit: Duration) -> String {
        match (self.code, self.timed_out) {
            (_, true) => format!("no result within {} s; killed", limit.as_secs()),
            (Some(c), _) => format!("exit status {c}"),
            (None, _) => "killed by a signal".into(),
        }
    }

    /// The last non-empty line of stderr (or stdout), for one-line messages.
    pub fn last_line(&self) -> Option<&str> {
        [&self.stderr, &self.stdout].into_iter().find_map(|s| s.lines().rev().map(str::trim).find(|l| !l.is_empty()))
    }
}

fn reader(mut r: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut kept: Vec<u8> = Vec::new();
        let mut buf = [0u8; 8192];
        loop {
            match r.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    kept.extend_from_slice(&buf[..n]);
                    if kept.len() > 2 * KEEP {
                        kept.drain(..kept.len() - KEEP);
                    }
                }
            }
        }
        if kept.len() > KEEP {
            kept.drain(..kept.len() - KEEP);
        }
        let _ = tx.send(String::from_utf8_lossy(&kept).into_owned());
    });
    rx
}

/// Runs `cmd` (stdin from /dev/null) in a process group of its own, waiting at most `limit`;
/// then the whole group is killed.
pub fn run(cmd: &mut Command, limit: Duration) -> std::io::Result<Output> {
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).process_group(0);
    let mut child = cmd.spawn()?;
    let out_rx = reader(child.stdout.take().expect("piped"));
    let err_rx = reader(child.stderr.take().expect("piped"));
    let deadline = Instant::now() + limit;
    let mut pause = Duration::from_millis(5);
    let (code, timed_out) = loop {
        if let Some(status) = child.try_wait()? {
            break (status.code(), false);
        }
        if Instant::now() >= deadline {
            kill_group(child.id());
            let _ = child.kill();
            let _ = child.wait();
            break (None, true);
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(100));
    };
    // A grandchild may hold the pipes open; do not wait for it forever.
    let grace = Duration::from_secs(if timed_out { 1 } else { 5 });
    let stdout = out_rx.recv_timeout(grace).unwrap_or_default();
    let stderr = err_rx.recv_timeout(grace).unwrap_or_default();
    Ok(Output { code, timed_out, stdout, stderr })
}

/// `kill -KILL -<pgid>`: the process group started by [`run`].
fn kill_group(pgid: u32) {
    let _ = Command::new("kill")
        .args(["-KILL", "--", &format!("-{pgid}")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// `/bin/sh -c <command>`.
pub fn shell(command: &str) -> Command {
    let mut c = Command::new("/bin/sh");
    c.arg("-c").arg(command);
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captures_output_and_exit_code_and_kills_on_timeout() {
        let o = run(&mut shell("echo out; echo err >&2; exit 3"), Duration::from_secs(5)).unwrap();
        assert_eq!((o.code, o.timed_out), (Some(3), false));
        assert_eq!((o.stdout.as_str(), o.stderr.as_str()), ("out\n", "err\n"));
        assert_eq!(o.last_line(), Some("err"));
        assert_eq!(o.describe(Duration::from_secs(1)), "exit status 3");
        // Bad input: a command that never ends, with a child of its own holding the pipes.
        let t = Instant::now();
        let o = run(&mut shell("sleep 30 & sleep 30"), Duration::from_millis(300)).unwrap();
        assert!(o.timed_out && o.code.is_none(), "{o:?}");
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        assert!(run(&mut Command::new("/nonexistent/x"), Duration::from_secs(1)).is_err());
        // Large output keeps its tail.
        let o = run(&mut shell("yes | head -c 300000; echo END"), Duration::from_secs(10)).unwrap();
        assert!(o.stdout.len() <= KEEP && o.stdout.ends_with("END\n"));
    }
}
