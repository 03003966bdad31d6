//! Logs on demand: `down/logs` asks for the last lines of the journal or of a file the
//! device's config names; the answer goes on `up/logs`, capped at
//! [`MAX_LOG_BYTES`](drover_proto::telemetry::MAX_LOG_BYTES) (the newest lines are kept).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use drover_proto::device::PROTOCOL_VERSION;
use drover_proto::telemetry::{LogSource, LogsReply, LogsRequest, MAX_LOG_BYTES};

/// What the config allows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogsPolicy {
    pub journal: bool,
    pub files: BTreeMap<String, PathBuf>,
}

/// Answers one request (never fails: errors go in the reply's `error`).
pub async fn answer(policy: &LogsPolicy, req: &LogsRequest) -> LogsReply {
    let mut reply =
        LogsReply { v: PROTOCOL_VERSION, request: req.request.clone(), lines: vec![], truncated: false, error: None };
    let lines = match req.check().and_then(|()| req.parsed_source()) {
        Err(e) => Err(e),
        Ok(LogSource::Journal) if !policy.journal => {
            Err("source journal is not allowed by this device's config".to_string())
        }
        Ok(LogSource::Journal) => journal(req.lines).await,
        Ok(LogSource::File(name)) => match policy.files.get(name) {
            None => Err(format!("source file:{name} is not allowed by this device's config")),
            Some(path) => tail_file(path.clone(), req.lines as usize).await,
        },
    };
    match lines {
        Ok(l) => {
            let (l, cut) = cap(l, MAX_LOG_BYTES);
            reply.lines = l;
            reply.truncated = cut;
        }
        Err(e) => reply.error = Some(drover_proto::update::tail(&e, 1000).to_string()),
    }
    reply
}

/// Keeps the newest lines whose total length fits in `max` bytes.
pub fn cap(lines: Vec<String>, max: usize) -> (Vec<String>, bool) {
    let mut total = 0;
    let mut keep = lines.len();
    for (i, l) in lines.iter().enumerate().rev() {
        if total + l.len() > max {
            break;
        }
        total += l.len();
        keep = i;
    }
    let cut = keep > 0;
    (lines.into_iter().skip(keep).collect(), cut)
}

async fn journal(n: u32) -> Result<Vec<String>, String> {
    let mut cmd = tokio::process::Command::new("journalctl");
    cmd.args(["-n", &n.to_string(), "--no-pager", "-o", "short-iso"]).kill_on_drop(true);
    cmd.stdin(std::process::Stdio::null());
    let out = tokio::time::timeout(Duration::from_secs(20), cmd.output())
        .await
        .map_err(|_| "journalctl took longer than 20 s".to_string())?
        .map_err(|e| format!("cannot run journalctl: {e}"))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(format!("journalctl: {} {}", out.status, err.trim()));
    }
    Ok(String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect())
}

/// The last `n` lines of a file, reading at most the last 4 × MAX_LOG_BYTES of it.
async fn tail_file(path: PathBuf, n: usize) -> Result<Vec<String>, String> {
    tokio::task::spawn_blocking(move || {
        use std::io::{Read, Seek, SeekFrom};
        let mut f = std::fs::File::open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let len = f.metadata().map_err(|e| e.to_string())?.len();
        let start = len.saturating_sub(4 * MAX_LOG_BYTES as u64);
        f.seek(SeekFrom::Start(start)).map_err(|e| e.to_string())?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf).map_err(|e| format!("{}: {e}", path.display()))?;
        let text = String::from_utf8_lossy(&buf);
        let mut lines: Vec<&str> = text.lines().collect();
        if start > 0 && !lines.is_empty() {
            lines.remove(0); // most likely a partial line
        }
        let skip = lines.len().saturating_sub(n);
        Ok(lines[skip..].iter().map(|s| s.to_string()).collect())
    })
    .await
    .map_err(|e| e.to_string())?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(source: &str, lines: u32) -> LogsRequest {
        LogsRequest { v: 1, request: "r1".into(), source: source.into(), lines }
    }

    #[tokio::test]
    async fn files_the_config_allows_and_refusals() {
        let d = std::env::temp_dir().join(format!("drover-logs-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let f = d.join("app.log");
        std::fs::write(&f, (1..=100).map(|i| format!("line {i}\n")).collect::<String>()).unwrap();
        let policy = LogsPolicy { journal: false, files: [("app".to_string(), f.clone())].into() };
        let r = answer(&policy, &req("file:app", 3)).await;
        assert_eq!(
            (r.lines, r.truncated, r.error),
            (vec!["line 98".into(), "line 99".into(), "line 100".into()], false, None)
        );
        // Bad input: a file the config does not name, the journal when not allowed, a path.
        for (src, why) in [("file:secrets", "not allowed"), ("journal", "not allowed"), ("file:/etc/shadow", "source")]
        {
            let r = answer(&policy, &req(src, 3)).await;
            assert!(r.error.as_deref().is_some_and(|e| e.contains(why)), "{src}: {:?}", r.error);
            assert!(r.lines.is_empty());
        }
        let gone = LogsPolicy { journal: false, files: [("app".to_string(), d.join("missing.log"))].into() };
        assert!(answer(&gone, &req("file:app", 3)).await.error.is_some_and(|e| e.contains("missing.log")));
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn cap_keeps_the_newest() {
        let l: Vec<String> = (0..10).map(|i| format!("{i:03}")).collect();
        let (kept, cut) = cap(l.clone(), 9);
        assert_eq!((kept, cut), (vec!["007".to_string(), "008".into(), "009".into()], true));
        assert_eq!(cap(l.clone(), 100), (l, false));
    }
}
