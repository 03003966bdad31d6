//! Drover's wire contract, written once: the REST API's request and response types and
//! their validation rules.
//!
//! **Architecture invariant:** this crate does no I/O. It depends on `serde` only (plus
//! `utoipa` behind the `openapi` feature, which only the server turns on to publish the
//! OpenAPI document); the agent, the CLI and the server all speak through these types.

pub mod api;
pub mod deploy;
pub mod device;
pub mod filter;
pub mod operator;
pub mod remote;
pub mod telemetry;
pub mod update;
pub mod validate;
