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
mod der;
pub mod enroll;
pub mod inventory;
pub mod remote;
pub mod session;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod update;

/// `drover-agent/<version>`, as sent in `up/hello`.
pub const AGENT: &str = concat!("drover-agent/", env!("CARGO_PKG_VERSION"));
