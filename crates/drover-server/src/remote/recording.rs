//! Terminal recordings in asciicast v2 (a JSON header line, then one `[seconds, "o", text]`
//! line per output chunk and `[seconds, "r", "COLSxROWS"]` per resize). Only the device's
//! output is recorded — what the operator types appears as the terminal echoes it, so a
//! password typed at a prompt that does not echo stays out of the recording.

use std::time::Instant;

use super::sessions::MAX_RECORDING_BYTES;

pub struct Recorder {
    started: Instant,
    out: String,
    /// The start of a UTF-8 character cut by a chunk boundary.
    carry: Vec<u8>,
    truncated: bool,
}

impl Recorder {
    pub fn new(cols: u16, rows: u16, term: &str, unix_secs: i64) -> Recorder {
        let header = serde_json::json!({
            "version": 2, "width": cols, "height": rows, "timestamp": unix_secs,
            "env": {"TERM": term},
        });
        Recorder { started: Instant::now(), out: format!("{header}\n"), carry: Vec::new(), truncated: false }
    }

    fn event(&mut self, kind: &str, text: &str) {
        if self.truncated {
            return;
        }
        let t = self.started.elapsed().as_secs_f64();
        let line = format!("{}\n", serde_json::json!([(t * 1e6).round() / 1e6, kind, text]));
        if self.out.len() + line.len() > MAX_RECORDING_BYTES {
            self.truncated = true;
            return;
        }
        self.out.push_str(&line);
    }

    pub fn output(&mut self, bytes: &[u8]) {
        let mut buf = std::mem::take(&mut self.carry);
        buf.extend_from_slice(bytes);
        let text = match std::str::from_utf8(&buf) {
            Ok(s) => s.to_string(),
            Err(e) if e.error_len().is_none() => {
                // An incomplete character at the end waits for the next chunk.
                let (ok, rest) = buf.split_at(e.valid_up_to());
                self.carry = rest.to_vec();
                String::from_utf8_lossy(ok).into_owned()
            }
            Err(_) => String::from_utf8_lossy(&buf).into_owned(),
        };
        if !text.is_empty() {
            self.event("o", &text);
        }
    }

    pub fn resize(&mut self, cols: u16, rows: u16) {
        self.event("r", &format!("{cols}x{rows}"));
    }

    /// The recording, and whether it stopped at the size limit.
    pub fn finish(self) -> (String, bool) {
        (self.out, self.truncated)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn asciicast_lines_and_split_characters() {
        let mut r = Recorder::new(80, 24, "xterm-256color", 1_764_000_000);
        r.output("hé".as_bytes());
        let e = "é".as_bytes();
        r.output(&[b'x', e[0]]);
        r.output(&[e[1], b'!']);
        r.resize(100, 30);
        let (cast, truncated) = r.finish();
        assert!(!truncated);
        let lines: Vec<serde_json::Value> = cast.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines[0]["version"], 2);
        assert_eq!(lines[0]["width"], 80);
        let texts: Vec<&str> = lines[1..].iter().map(|l| l[2].as_str().unwrap()).collect();
        assert_eq!(texts, ["hé", "x", "é!", "100x30"]);
        assert_eq!(lines[4][1], "r");
    }
}
