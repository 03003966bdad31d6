//! `drover`, the operator's command line over Drover's REST API.
//!
//! **Architecture invariant:** talks to the server only through the REST API and the types in
//! `drover-proto`; it never depends on the server crate.

mod alerts;
mod artifact;
pub mod client;
pub mod commands;
pub mod config;
mod deploy;
mod fleet;
mod metrics;
pub mod output;
mod remote;
mod trust;

use std::process::ExitCode;

/// Runs the command line and turns every failure into one line on stderr.
pub fn main() -> ExitCode {
    match commands::run(std::env::args_os()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("drover: error: {e}");
            ExitCode::FAILURE
        }
    }
}
