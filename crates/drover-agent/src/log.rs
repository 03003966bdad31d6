//! The agent's log output: one line per event on stderr,
//! `2026-03-01T10:00:00.123456Z  INFO message key=value …`, at or above `log_level`.
//!
//! A small [`tracing::Subscriber`] of its own rather than `tracing-subscriber`'s: the agent has
//! no spans and one output, and the registry, span storage and formatting machinery it would
//! not use cost tens of kB (design decision 7: small; `BENCHMARKS.md`). Colours (the level
//! only) when [`crate::log_colours`] says stderr is a terminal.

use std::fmt::Write as _;
use std::io::Write as _;

use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Metadata, Subscriber};

/// Writes events at `max` and more severe to stderr.
pub struct StderrLog {
    max: Level,
    colours: bool,
}

impl StderrLog {
    pub fn new(max: Level, colours: bool) -> StderrLog {
        StderrLog { max, colours }
    }

    /// Installs it as the process's subscriber; `false` if one was installed already.
    pub fn install(self) -> bool {
        tracing::subscriber::set_global_default(self).is_ok()
    }
}

/// The message first, then `key=value` for every other field (strings quoted, as
/// `tracing-subscriber` writes them).
struct Fields {
    message: String,
    rest: String,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message.push_str(value);
        } else {
            let _ = write!(self.rest, " {}={value:?}", field.name());
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.message, "{value:?}");
        } else {
            let _ = write!(self.rest, " {}={value:?}", field.name());
        }
    }
}

/// Civil date of a day count since 1970-01-01 (Howard Hinnant's algorithm).
fn civil(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// `YYYY-MM-DDTHH:MM:SS.ffffffZ` (UTC) of a time since the Unix epoch.
fn timestamp(out: &mut String, since_epoch: std::time::Duration) {
    let secs = since_epoch.as_secs() as i64;
    let (y, mo, d) = civil(secs.div_euclid(86_400));
    let s = secs.rem_euclid(86_400);
    let _ = write!(
        out,
        "{y:04}-{mo:02}-{d:02}T{:02}:{:02}:{:02}.{:06}Z",
        s / 3600,
        s / 60 % 60,
        s % 60,
        since_epoch.subsec_micros()
    );
}

fn level_label(level: Level, colours: bool) -> &'static str {
    match (level, colours) {
        (Level::ERROR, false) => "ERROR",
        (Level::WARN, false) => " WARN",
        (Level::INFO, false) => " INFO",
        (Level::DEBUG, false) => "DEBUG",
        (_, false) => "TRACE",
        (Level::ERROR, true) => "\x1b[31mERROR\x1b[0m",
        (Level::WARN, true) => "\x1b[33m WARN\x1b[0m",
        (Level::INFO, true) => "\x1b[32m INFO\x1b[0m",
        (Level::DEBUG, true) => "\x1b[34mDEBUG\x1b[0m",
        (_, true) => "\x1b[35mTRACE\x1b[0m",
    }
}

/// One event as its line (with the newline).
fn line(event: &Event<'_>, now: std::time::Duration, colours: bool) -> String {
    let mut f = Fields { message: String::new(), rest: String::new() };
    event.record(&mut f);
    let mut out = String::with_capacity(48 + f.message.len() + f.rest.len());
    timestamp(&mut out, now);
    out.push(' ');
    out.push_str(level_label(*event.metadata().level(), colours));
    out.push(' ');
    out.push_str(&f.message);
    out.push_str(&f.rest);
    out.push('\n');
    out
}

impl Subscriber for StderrLog {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        *metadata.level() <= self.max
    }

    fn max_level_hint(&self) -> Option<tracing::level_filters::LevelFilter> {
        Some(tracing::level_filters::LevelFilter::from_level(self.max))
    }

    fn new_span(&self, _: &Attributes<'_>) -> Id {
        // The agent makes no spans; every one gets the same id and is ignored.
        Id::from_u64(1)
    }

    fn record(&self, _: &Id, _: &Record<'_>) {}

    fn record_follows_from(&self, _: &Id, _: &Id) {}

    fn event(&self, event: &Event<'_>) {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let text = line(event, now, self.colours);
        // One write per line, so lines of concurrent tasks do not interleave.
        let _ = std::io::stderr().lock().write_all(text.as_bytes());
    }

    fn enter(&self, _: &Id) {}

    fn exit(&self, _: &Id) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339_utc() {
        let mut s = String::new();
        timestamp(&mut s, std::time::Duration::new(1_780_000_000, 123_456_789));
        assert_eq!(s, "2026-05-28T20:26:40.123456Z");
        let mut s = String::new();
        timestamp(&mut s, std::time::Duration::new(951_782_400, 0));
        assert_eq!(s, "2000-02-29T00:00:00.000000Z");
    }

    /// Events through the real subscriber: the level filter, the message, fields.
    #[test]
    fn lines_have_level_message_and_fields() {
        use std::sync::{Arc, Mutex};
        struct Capture(Arc<Mutex<Vec<String>>>, StderrLog);
        impl Subscriber for Capture {
            fn enabled(&self, m: &Metadata<'_>) -> bool {
                self.1.enabled(m)
            }
            fn new_span(&self, a: &Attributes<'_>) -> Id {
                self.1.new_span(a)
            }
            fn record(&self, _: &Id, _: &Record<'_>) {}
            fn record_follows_from(&self, _: &Id, _: &Id) {}
            fn event(&self, e: &Event<'_>) {
                self.0.lock().unwrap().push(line(e, std::time::Duration::ZERO, self.1.colours));
            }
            fn enter(&self, _: &Id) {}
            fn exit(&self, _: &Id) {}
        }
        let got = Arc::new(Mutex::new(Vec::new()));
        let sub = Capture(got.clone(), StderrLog::new(Level::INFO, false));
        tracing::subscriber::with_default(sub, || {
            tracing::debug!("not shown");
            tracing::info!(device_id = "d-1", port = 8883, session_present = false, "connected");
            tracing::warn!(reason = "a b", "the broker closed the connection");
            tracing::error!("{} of {} failed", 1, 2);
        });
        let got = got.lock().unwrap();
        assert_eq!(
            *got,
            [
                "1970-01-01T00:00:00.000000Z  INFO connected device_id=\"d-1\" port=8883 session_present=false\n",
                "1970-01-01T00:00:00.000000Z  WARN the broker closed the connection reason=\"a b\"\n",
                "1970-01-01T00:00:00.000000Z ERROR 1 of 2 failed\n",
            ]
        );
        let coloured = StderrLog::new(Level::INFO, true);
        assert!(level_label(Level::WARN, coloured.colours).starts_with('\x1b'));
    }
}
