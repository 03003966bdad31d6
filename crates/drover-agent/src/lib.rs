//! The device agent: enrollment, the MQTT session, inventory, and the `check` diagnostics.
//!
//! The core is I/O at the edges (design decision 7): [`backoff`] is pure, [`session`] runs one
//! device's connection from a [`session::SessionConfig`] and a pluggable
//! [`session::InventorySource`], and [`enroll::enroll`] works with an in-memory key, so the fleet
//! simulator runs thousands of the same sessions in one runtime.

pub mod agent;
pub mod backoff;
pub mod check;
pub mod config;
#[doc(hidden)] // public for the fuzz targets in tests/it/fuzz.rs only
pub mod der;
pub mod enroll;
pub mod http;
pub mod inventory;
pub mod log;
pub mod remote;
pub mod session;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod update;

/// `drover-agent/<version>`, as sent in `up/hello`.
pub const AGENT: &str = concat!("drover-agent/", env!("CARGO_PKG_VERSION"));

/// Whether log lines on stderr get colours: only when stderr is a terminal and `NO_COLOR` is
/// unset or empty (<https://no-color.org>), so a log file or the journal gets plain text.
pub fn log_colours() -> bool {
    use std::io::IsTerminal;
    colours_for(std::io::stderr().is_terminal(), std::env::var_os("NO_COLOR").as_deref())
}

fn colours_for(terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    terminal && no_color.is_none_or(|v| v.is_empty())
}

#[cfg(test)]
mod tests {
    #[test]
    fn colours_only_on_a_terminal_without_no_color() {
        use std::ffi::OsStr;
        assert!(super::colours_for(true, None));
        assert!(super::colours_for(true, Some(OsStr::new(""))));
        assert!(!super::colours_for(true, Some(OsStr::new("1"))));
        assert!(!super::colours_for(false, None));
    }
}
