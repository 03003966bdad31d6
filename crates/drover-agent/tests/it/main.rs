//! drover-agent's integration tests: the session and the real binary against a real
//! Mosquitto with mutual TLS (started by each test on a free port).

mod binary;
mod fuzz;
mod remote;
mod session;
mod support;
mod telemetry;
mod update;
