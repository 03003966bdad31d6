//! Downloading an artifact over HTTPS with the device's client certificate, into
//! `<artifact id>.part`, resuming with `Range` after a cut or a restart.
//!
//! Every byte goes through a [`StreamVerifier`] — the bytes already in the `.part` file first —
//! so a tampered payload fails the download as soon as that payload ends, and a bad signature
//! as soon as the header is in (through `on_header`), before the rest is fetched.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use drover_artifact::stream::{Header, StreamVerifier, Verified};
use drover_proto::update::ArtifactOffer;

use crate::tls::DeviceKey;

const CHUNK: usize = 64 * 1024;

/// What came of one download attempt.
#[derive(Debug)]
pub enum Fetch {
    Done(Box<Verified>),
    /// Worth trying again later (network, server busy); the `.part` file is kept.
    Retry(String),
    /// Trying again will not help (tampered, refused, too large); the `.part` file is removed.
    Failed(String),
    /// Stopped through the cancel flag.
    Cancelled,
}

/// An HTTPS client that presents the device certificate and trusts only the fleet CA.
#[derive(Clone)]
pub struct Downloader {
    base: String,
    http: crate::http::Client,
    /// Bytes per second at most; `None`: as fast as the network goes.
    rate: Option<u64>,
}

impl std::fmt::Debug for Downloader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Downloader").field("base", &self.base).finish()
    }
}

impl Downloader {
    /// `server_url` is the base (`https://host:8443`); `ca_pems` the CAs that may sign the
    /// server's certificate; the client certificate is `cert_pem` with `key`.
    pub fn new(server_url: &str, ca_pems: &[&[u8]], cert_pem: &[u8], key: &DeviceKey) -> Result<Downloader, String> {
        let base = server_url.trim_end_matches('/').to_string();
        let tls = if base.starts_with("https://") {
            if ca_pems.is_empty() {
                return Err("no CA certificate to verify the server".into());
            }
            let cas: Vec<(&[u8], &str)> = ca_pems.iter().map(|p| (*p, "CA")).collect();
            Some(crate::tls::mqtt_client_config(&cas, cert_pem, key).map_err(|e| e.to_string())?)
        } else if base.starts_with("http://") {
            None
        } else {
            return Err(format!("server_url {base:?} must start with https://"));
        };
        let mut http = crate::http::Client::new(&base, tls)?;
        http.connect_timeout = Duration::from_secs(15);
        http.io_timeout = Duration::from_secs(60);
        Ok(Downloader { base, http, rate: None })
    }

    /// Downloads at most `bytes_per_sec` (at least 1) on average from the start of each
    /// attempt: the simulator's `--download-rate`, so a simulated update is slow enough to
    /// watch. Reads are made small enough for a steady pace.
    pub fn with_rate_limit(mut self, bytes_per_sec: u64) -> Downloader {
        self.rate = Some(bytes_per_sec.max(1));
        self
    }

    pub fn url(&self, offer: &ArtifactOffer) -> String {
        format!("{}{}", self.base, offer.path)
    }

    /// Downloads `offer` into `part`, resuming from what is there. `progress` is called with
    /// the bytes on disk every `every`; `on_header` once the header is in (a verdict on the
    /// signature: `Err` stops the download as failed).
    #[allow(clippy::too_many_arguments)]
    pub fn fetch(
        &self,
        offer: &ArtifactOffer,
        part: &Path,
        limit: u64,
        cancel: &AtomicBool,
        every: Duration,
        progress: &mut dyn FnMut(u64),
        on_header: &mut dyn FnMut(&Header) -> Result<(), String>,
    ) -> Fetch {
        if offer.size > limit {
            return Fetch::Failed(format!(
                "the artifact is {} bytes; this device takes at most {limit} (max_artifact_size)",
                offer.size
            ));
        }
        if !offer.path.starts_with('/') {
            return Fetch::Failed(format!("the artifact path {:?} must start with /", offer.path));
        }
        let fail = |msg: String| {
            let _ = std::fs::remove_file(part);
            Fetch::Failed(msg)
        };
        // The bytes already here go through the verifier first.
        let mut v = StreamVerifier::with_limit(offer.size);
        let mut header_seen = false;
        let mut file = match std::fs::OpenOptions::new().read(true).append(true).create(true).open(part) {
            Ok(f) => f,
            Err(e) => return Fetch::Retry(format!("{}: {e}", part.display())),
        };
        let have = match refeed(&mut file, &mut v) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(part = %part.display(), "the partial download is unusable ({e}); starting over");
                drop(file);
                let _ = std::fs::remove_file(part);
                v = StreamVerifier::with_limit(offer.size);
                file = match std::fs::OpenOptions::new().read(true).append(true).create(true).open(part) {
                    Ok(f) => f,
                    Err(e) => return Fetch::Retry(format!("{}: {e}", part.display())),
                };
                0
            }
        };
        if let Some(h) = v.header() {
            header_seen = true;
            if let Err(e) = on_header(h) {
                return fail(e);
            }
        }
        if have == offer.size {
            return finish(v, offer, part);
        }
        let url = self.url(offer);
        let range = format!("bytes={have}-");
        let headers: &[(&str, &str)] = if have > 0 { &[("Range", range.as_str())] } else { &[] };
        let resp = match self.http.request("GET", &offer.path, headers, None) {
            Ok(r) => r,
            Err(e) => return Fetch::Retry(format!("GET {url}: {e}")),
        };
        let status = resp.status;
        let mut restart = false;
        match status {
            206 => {
                let cr = resp.header("content-range").unwrap_or("");
                match parse_content_range(cr) {
                    Some((start, total)) if start == have && total.is_none_or(|t| t == offer.size) => {}
                    Some((_, Some(total))) if total != offer.size => {
                        return fail(format!(
                            "the server serves {total} bytes for artifact {}, which has {} (truncated or altered)",
                            offer.id, offer.size
                        ));
                    }
                    _ => return Fetch::Retry(format!("GET {url}: unexpected Content-Range {cr:?} for bytes={have}-")),
                }
            }
            200 => {
                if let Some(len) = content_length(&resp)
                    && len != offer.size
                {
                    return fail(format!(
                        "the server serves {len} bytes for artifact {}, which has {} (truncated or altered)",
                        offer.id, offer.size
                    ));
                }
                // The server ignored the range: start over.
                restart = have > 0;
            }
            416 => return fail(format!("GET {url}: the server has fewer than {have} bytes of the artifact")),
            401 | 403 | 404 | 410 => {
                return fail(format!("GET {url}: the server refused the download (HTTP {status})"));
            }
            _ => return Fetch::Retry(format!("GET {url}: HTTP {status}")),
        }
        if restart {
            tracing::info!("the server ignored Range; downloading from the start");
            if let Err(e) = file.set_len(0) {
                return Fetch::Retry(format!("{}: {e}", part.display()));
            }
            v = StreamVerifier::with_limit(offer.size);
        }
        let mut on_disk = if restart { 0 } else { have };
        let mut body = resp.into_body();
        // Under a rate limit, about ten reads a second.
        let read_size = self.rate.map_or(CHUNK, |r| (r / 10).clamp(1024, CHUNK as u64) as usize);
        let mut buf = vec![0u8; read_size];
        let mut last_progress = Instant::now();
        let (started, mut got) = (Instant::now(), 0u64);
        loop {
            if cancel.load(Ordering::Relaxed) {
                return Fetch::Cancelled;
            }
            let n = match body.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    let _ = file.sync_data();
                    return Fetch::Retry(format!("GET {url}: cut after {on_disk} of {} bytes: {e}", offer.size));
                }
            };
            if let Err(e) = v.feed(&buf[..n]) {
                return fail(format!("artifact verification failed: {e}"));
            }
            if !header_seen && let Some(h) = v.header() {
                header_seen = true;
                if let Err(e) = on_header(h) {
                    return fail(e);
                }
            }
            if let Err(e) = file.write_all(&buf[..n]) {
                return Fetch::Retry(format!("{}: {e}", part.display()));
            }
            on_disk += n as u64;
            got += n as u64;
            if let Some(rate) = self.rate
                && !pace(started, got, rate, cancel)
            {
                return Fetch::Cancelled;
            }
            if last_progress.elapsed() >= every {
                last_progress = Instant::now();
                progress(on_disk);
            }
        }
        if let Err(e) = file.sync_all() {
            return Fetch::Retry(format!("{}: {e}", part.display()));
        }
        if on_disk < offer.size {
            return Fetch::Retry(format!("GET {url}: the connection ended after {on_disk} of {} bytes", offer.size));
        }
        progress(on_disk);
        finish(v, offer, part)
    }
}

/// Waits until `got` bytes since `started` are within `rate` bytes per second; `false` when
/// cancelled meanwhile.
fn pace(started: Instant, got: u64, rate: u64, cancel: &AtomicBool) -> bool {
    let due = started + Duration::from_secs_f64(got as f64 / rate as f64);
    loop {
        if cancel.load(Ordering::Relaxed) {
            return false;
        }
        let now = Instant::now();
        if now >= due {
            return true;
        }
        std::thread::sleep((due - now).min(Duration::from_millis(100)));
    }
}

fn content_length(resp: &crate::http::Response) -> Option<u64> {
    resp.header("content-length")?.trim().parse().ok()
}

/// `bytes START-END/TOTAL` → (START, TOTAL); TOTAL may be `*`.
fn parse_content_range(v: &str) -> Option<(u64, Option<u64>)> {
    let rest = v.trim().strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let (start, _end) = range.split_once('-')?;
    let total = if total == "*" { None } else { Some(total.trim().parse().ok()?) };
    Some((start.trim().parse().ok()?, total))
}

/// Feeds the bytes already in `file` to `v`; the number of bytes.
fn refeed(file: &mut File, v: &mut StreamVerifier) -> Result<u64, String> {
    file.seek(SeekFrom::Start(0)).map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; CHUNK];
    let mut n = 0u64;
    loop {
        let k = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(k) => k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.to_string()),
        };
        v.feed(&buf[..k]).map_err(|e| e.to_string())?;
        n += k as u64;
    }
    Ok(n)
}

fn finish(v: StreamVerifier, offer: &ArtifactOffer, part: &Path) -> Fetch {
    match v.finish() {
        Ok(verified) if verified.file_sha256 != offer.id => {
            let _ = std::fs::remove_file(part);
            Fetch::Failed(format!(
                "the downloaded artifact's SHA-256 is {}, not the {} the server offered",
                verified.file_sha256, offer.id
            ))
        }
        Ok(verified) => Fetch::Done(Box::new(verified)),
        Err(e) => {
            let _ = std::fs::remove_file(part);
            Fetch::Failed(format!("artifact verification failed: {e}"))
        }
    }
}

/// Verifies a complete file on disk (after a restart, before installing from it).
pub fn verify_file(path: &Path, limit: u64) -> Result<Verified, String> {
    let mut f = File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut v = StreamVerifier::with_limit(limit);
    refeed(&mut f, &mut v).map_err(|e| format!("artifact verification failed: {e}"))?;
    v.finish().map_err(|e| format!("artifact verification failed: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_range_parses() {
        assert_eq!(parse_content_range("bytes 100-199/200"), Some((100, Some(200))));
        assert_eq!(parse_content_range("bytes 0-9/*"), Some((0, None)));
        assert_eq!(parse_content_range("items 0-9/10"), None);
        assert_eq!(parse_content_range(""), None);
    }
}
